//! Running other programs, each call naming what it was doing, so that a failure reads as a
//! sentence: "reading the bridge's counters: `nsenter ... nft ...` failed (exit status: 1): ...".

use std::ffi::OsString;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use anyhow::{Context as _, bail};

/// The workspace this xtask belongs to.
pub fn workspace_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("xtask lives one level below the workspace root")
        .to_owned()
}

/// Where cargo puts build output: CARGO_TARGET_DIR when set, target/ otherwise.
pub fn target_dir() -> PathBuf {
    match std::env::var_os("CARGO_TARGET_DIR") {
        Some(dir) => workspace_root().join(dir),
        None => workspace_root().join("target"),
    }
}

/// Where `cargo install` puts binaries such as bpf-linker.
pub fn cargo_bin_dir() -> PathBuf {
    match std::env::var_os("CARGO_HOME") {
        Some(home) => PathBuf::from(home).join("bin"),
        None => PathBuf::from(std::env::var_os("HOME").unwrap_or_else(|| "/root".into()))
            .join(".cargo/bin"),
    }
}

/// PATH with cargo's bin directory on it: the eBPF build looks for bpf-linker there.
pub fn path_with_cargo_bin() -> OsString {
    let bin = cargo_bin_dir();
    let current = std::env::var_os("PATH").unwrap_or_default();
    if std::env::split_paths(&current).any(|dir| dir == bin) {
        return current;
    }
    std::env::join_paths(std::iter::once(bin).chain(std::env::split_paths(&current)))
        .unwrap_or(current)
}

/// The cargo that runs this xtask, in the workspace root.
pub fn cargo() -> Command {
    let mut command = Command::new(std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into()));
    command
        .current_dir(workspace_root())
        .env("PATH", path_with_cargo_bin());
    command
}

/// PROGRAM run inside the named network namespace. nsenter, not `ip netns exec`: the latter
/// remounts /sys in a new mount namespace, and nsenter execs PROGRAM, so its pid is ours.
pub fn in_netns(netns: &str, program: &str) -> Command {
    let mut command = Command::new("nsenter");
    command
        .arg(format!("--net=/run/netns/{netns}"))
        .arg(program);
    command
}

/// The command line, for messages.
pub fn show(command: &Command) -> String {
    std::iter::once(command.get_program())
        .chain(command.get_args())
        .map(|part| part.to_string_lossy().into_owned())
        .collect::<Vec<_>>()
        .join(" ")
}

/// Runs COMMAND with the terminal as its output; fails unless it exits 0.
pub fn run(command: &mut Command, doing: &str) -> anyhow::Result<()> {
    let status = command
        .status()
        .with_context(|| format!("{doing}: cannot start `{}`", show(command)))?;
    if !status.success() {
        bail!("{doing}: `{}` failed ({status})", show(command));
    }
    Ok(())
}

/// Runs COMMAND and returns what it printed; fails, quoting its stderr, unless it exits 0.
pub fn output(command: &mut Command, doing: &str) -> anyhow::Result<String> {
    let output = command
        .stdin(Stdio::null())
        .output()
        .with_context(|| format!("{doing}: cannot start `{}`", show(command)))?;
    if !output.status.success() {
        bail!(
            "{doing}: `{}` failed ({}): {}",
            show(command),
            output.status,
            String::from_utf8_lossy(&output.stderr).trim()
        );
    }
    String::from_utf8(output.stdout)
        .with_context(|| format!("{doing}: `{}` printed non-UTF-8", show(command)))
}

/// Whether COMMAND starts and exits 0, its output discarded.
pub fn succeeds(command: &mut Command) -> bool {
    command
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|status| status.success())
}

pub fn is_root() -> bool {
    // SAFETY: geteuid has no preconditions and cannot fail.
    unsafe { libc::geteuid() == 0 }
}

/// Fails with WHY unless this process runs as root.
pub fn require_root(why: &str) -> anyhow::Result<()> {
    if !is_root() {
        bail!("{why}; run as root");
    }
    Ok(())
}
