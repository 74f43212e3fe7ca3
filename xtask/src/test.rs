//! `cargo xtask test`: the whole suite, as root. cargo test prints one summary per test
//! binary, the last of them often a doc-test run of nothing; the suite ends with one line
//! adding them all up (`summary: N passed, N failed, N skipped`), which is what CI reads.
//! A test that cannot run here says `SKIPPED <test>: <reason>` (xbr-tests' `skip`): it counts
//! as skipped, not passed.

use std::{
    io::{BufRead as _, BufReader},
    process::{Command, Stdio},
};

use anyhow::Context as _;

use crate::{build, cmd, setup};

const BPFFS: &str = "/sys/fs/bpf";
/// What a test prints (past the harness's capture) when it cannot run here.
const SKIPPED: &str = "SKIPPED ";

pub fn run(extra_args: &[String]) -> anyhow::Result<()> {
    cmd::require_root("the tests create network namespaces and load BPF programs")?;
    setup::run()?;
    setup::packaging()?;
    mount_bpffs()?;
    // The traffic tests drive the real binary; `cargo test` builds no other package's bins.
    let xbr = build::release_binary()?;
    let mut test = cmd::cargo();
    test.args(["test", "--workspace", "--release"])
        .args(extra_args)
        .env("XBR", &xbr)
        .stdout(Stdio::piped());
    let mut child = test.spawn().with_context(|| {
        format!(
            "running the test suite: cannot start `{}`",
            cmd::show(&test)
        )
    })?;
    let mut total = Summary::default();
    let mut skipped = Vec::new();
    let stdout = child.stdout.take().expect("piped stdout");
    for line in BufReader::new(stdout).lines() {
        let line = line.context("reading the test output")?;
        println!("{line}");
        if let Some(summary) = Summary::parse(&line) {
            total.add(&summary);
        }
        if let Some(test) = line.strip_prefix(SKIPPED) {
            skipped.push(test.to_owned());
        }
    }
    // A skipped test returned early, so cargo counted it as passed.
    total.passed = total.passed.saturating_sub(skipped.len() as u64);
    total.ignored += skipped.len() as u64;
    for test in &skipped {
        println!("skipped: {test}");
    }
    let status = child.wait().context("waiting for cargo test")?;
    println!(
        "summary: {} passed, {} failed, {} skipped",
        total.passed, total.failed, total.ignored
    );
    if !status.success() {
        std::process::exit(status.code().unwrap_or(101));
    }
    Ok(())
}

/// The counts of one `test result:` line of cargo test.
#[derive(Debug, Default, PartialEq, Eq)]
struct Summary {
    passed: u64,
    failed: u64,
    ignored: u64,
}

impl Summary {
    /// `test result: ok. 6 passed; 0 failed; 1 ignored; 0 measured; 0 filtered out; ...`
    fn parse(line: &str) -> Option<Summary> {
        let counts = line.strip_prefix("test result: ")?.split_once(". ")?.1;
        let mut summary = Summary::default();
        for part in counts.split("; ") {
            // "finished in 3.59s" has no count.
            let Some((Ok(number), what)) = part.split_once(' ').map(|(n, w)| (n.parse::<u64>(), w))
            else {
                continue;
            };
            match what {
                "passed" => summary.passed = number,
                "failed" => summary.failed = number,
                "ignored" => summary.ignored = number,
                _ => {}
            }
        }
        Some(summary)
    }

    fn add(&mut self, other: &Summary) {
        self.passed += other.passed;
        self.failed += other.failed;
        self.ignored += other.ignored;
    }
}

/// xbr mounts bpffs itself when it is absent; this is belt and braces for tests that pin.
fn mount_bpffs() -> anyhow::Result<()> {
    let fs_type = cmd::output(
        Command::new("stat").args(["-f", "-c", "%T", BPFFS]),
        &format!("checking the file system at {BPFFS}"),
    )?;
    if fs_type.trim() == "bpf_fs" {
        return Ok(());
    }
    println!("mounting bpffs at {BPFFS}");
    cmd::run(
        Command::new("mount").args(["-t", "bpf", "bpf", BPFFS]),
        &format!("mounting bpffs at {BPFFS}"),
    )
}

#[cfg(test)]
mod tests {
    use super::Summary;

    #[test]
    fn cargo_test_summaries_are_read() {
        let line = "test result: FAILED. 5 passed; 2 failed; 1 ignored; 0 measured; 0 filtered out; finished in 3.59s";
        assert_eq!(
            Summary::parse(line),
            Some(Summary {
                passed: 5,
                failed: 2,
                ignored: 1
            })
        );
        assert_eq!(Summary::parse("running 3 tests"), None);
    }
}
