//! `cargo xtask test`: the whole suite, as root, with cargo test's own summary as the last
//! lines of output (CI reads them).

use std::process::Command;

use anyhow::Context as _;

use crate::{build, cmd, setup};

const BPFFS: &str = "/sys/fs/bpf";

pub fn run(extra_args: &[String]) -> anyhow::Result<()> {
    cmd::require_root("the tests create network namespaces and load BPF programs")?;
    setup::run()?;
    mount_bpffs()?;
    // The traffic tests drive the real binary; `cargo test` builds no other package's bins.
    let xbr = build::release_binary()?;
    let mut test = cmd::cargo();
    test.args(["test", "--workspace", "--release"]).args(extra_args).env("XBR", &xbr);
    let status = test.status().with_context(|| {
        format!(
            "running the test suite: cannot start `{}`",
            cmd::show(&test)
        )
    })?;
    if !status.success() {
        // cargo has already said what failed; anything printed here would follow its summary.
        std::process::exit(status.code().unwrap_or(101));
    }
    Ok(())
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
