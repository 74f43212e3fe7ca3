//! Running other programs, each call naming what it was doing, so that a failure reads as a
//! sentence: "reading the bridge's counters: `nsenter ... nft ...` failed (exit status: 1): ...".
//! Every task runs its programs through here: to completion (`run`, `output`, `run_with_input`),
//! with a deadline and Ctrl-C (`run_captured`, `Running`), or in the background (`Processes`).

use std::ffi::OsString;
use std::io::{Read, Write as _};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

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
    let stdout = output_bytes(command, doing)?;
    String::from_utf8(stdout)
        .with_context(|| format!("{doing}: `{}` printed non-UTF-8", show(command)))
}

/// `output`, the bytes as printed.
pub fn output_bytes(command: &mut Command, doing: &str) -> anyhow::Result<Vec<u8>> {
    let output = command
        .stdin(Stdio::null())
        .output()
        .with_context(|| format!("{doing}: cannot start `{}`", show(command)))?;
    check(command, doing, output.status, &output.stderr)?;
    Ok(output.stdout)
}

/// Runs COMMAND with INPUT on its stdin and its stdout discarded; fails, quoting its stderr,
/// unless it exits 0 (`nft -f -`, `iptables-restore`).
pub fn run_with_input(command: &mut Command, input: &str, doing: &str) -> anyhow::Result<()> {
    let mut child = command
        .stdin(Stdio::piped())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .with_context(|| format!("{doing}: cannot start `{}`", show(command)))?;
    child
        .stdin
        .take()
        .expect("stdin is piped")
        .write_all(input.as_bytes())
        .with_context(|| format!("{doing}: writing to `{}`", show(command)))?;
    let output = child
        .wait_with_output()
        .with_context(|| format!("{doing}: waiting for `{}`", show(command)))?;
    check(command, doing, output.status, &output.stderr)
}

/// Fails unless STATUS is success, quoting STDERR (when there is any).
fn check(command: &Command, doing: &str, status: ExitStatus, stderr: &[u8]) -> anyhow::Result<()> {
    if status.success() {
        return Ok(());
    }
    let stderr = String::from_utf8_lossy(stderr);
    let stderr = stderr.trim();
    if stderr.is_empty() {
        bail!("{doing}: `{}` failed ({status})", show(command));
    }
    bail!("{doing}: `{}` failed ({status}): {stderr}", show(command));
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

const POLL: Duration = Duration::from_millis(50);

/// Set by SIGINT or SIGTERM. The terminal sends SIGINT to our children too; whatever they
/// were doing fails, and the demo unwinds through its cleanup. The default is never set.
#[derive(Clone, Default)]
pub struct Interrupt(Arc<AtomicBool>);

impl Interrupt {
    pub fn install() -> anyhow::Result<Interrupt> {
        let flag = Arc::new(AtomicBool::new(false));
        let handler_flag = flag.clone();
        ctrlc::set_handler(move || handler_flag.store(true, Ordering::SeqCst))
            .context("installing the Ctrl-C handler")?;
        Ok(Interrupt(flag))
    }

    pub fn check(&self) -> anyhow::Result<()> {
        if self.0.load(Ordering::SeqCst) {
            bail!("interrupted (SIGINT or SIGTERM)");
        }
        Ok(())
    }
}

/// What a command printed and how it ended.
pub struct Captured {
    pub status: ExitStatus,
    pub stdout: String,
    pub stderr: String,
}

/// Runs COMMAND to completion with its output captured; kills it (by pid) on Ctrl-C or after
/// TIMEOUT. A non-zero exit is the caller's to judge.
pub fn run_captured(
    command: &mut Command,
    doing: &str,
    timeout: Duration,
    interrupt: &Interrupt,
) -> anyhow::Result<Captured> {
    let captured = Running::spawn(command, doing)?.wait(timeout, interrupt)?;
    // Ctrl-C reaches the child too: a child that ended by it ended by the interrupt.
    interrupt.check().with_context(|| doing.to_owned())?;
    Ok(captured)
}

/// A program running in the background, its output collected; killed (by pid) when dropped
/// before it ended, so no path leaves it running.
pub struct Running {
    child: Child,
    shown: String,
    doing: String,
    stdout: Option<JoinHandle<String>>,
    stderr: Option<JoinHandle<String>>,
}

impl Running {
    pub fn spawn(command: &mut Command, doing: &str) -> anyhow::Result<Running> {
        let mut child = command
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .with_context(|| format!("{doing}: cannot start `{}`", show(command)))?;
        // Read both pipes while it runs, so a chatty child never blocks on a full pipe.
        let stdout = child.stdout.take().map(read_all);
        let stderr = child.stderr.take().map(read_all);
        Ok(Running {
            child,
            shown: show(command),
            doing: doing.to_owned(),
            stdout,
            stderr,
        })
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    pub fn finished(&mut self) -> bool {
        matches!(self.child.try_wait(), Ok(Some(_)))
    }

    /// Waits for it to end on its own; kills it on Ctrl-C or after TIMEOUT.
    pub fn wait(mut self, timeout: Duration, interrupt: &Interrupt) -> anyhow::Result<Captured> {
        let doing = &self.doing;
        let deadline = Instant::now() + timeout;
        let status = loop {
            if let Some(status) = self
                .child
                .try_wait()
                .with_context(|| format!("{doing}: waiting for pid {}", self.child.id()))?
            {
                break status;
            }
            interrupt.check().with_context(|| doing.clone())?;
            if Instant::now() > deadline {
                bail!(
                    "{doing}: `{}` took longer than {}s; killed it",
                    self.shown,
                    timeout.as_secs()
                );
            }
            std::thread::sleep(POLL);
        };
        let joined = |reader: Option<JoinHandle<String>>| {
            reader
                .and_then(|reader| reader.join().ok())
                .unwrap_or_default()
        };
        Ok(Captured {
            status,
            stdout: joined(self.stdout.take()),
            stderr: joined(self.stderr.take()),
        })
    }
}

impl Drop for Running {
    fn drop(&mut self) {
        if let Ok(None) = self.child.try_wait() {
            let _ = self.child.kill();
        }
        let _ = self.child.wait();
    }
}

fn read_all(mut pipe: impl Read + Send + 'static) -> JoinHandle<String> {
    std::thread::spawn(move || {
        let mut bytes = Vec::new();
        let _ = pipe.read_to_end(&mut bytes);
        String::from_utf8_lossy(&bytes).into_owned()
    })
}

/// Background processes (the iperf3 server), by pid.
#[derive(Default)]
pub struct Processes {
    running: Vec<Background>,
}

struct Background {
    what: String,
    child: Child,
}

impl Processes {
    /// Starts COMMAND in the background, its output discarded but for stderr, kept for errors.
    pub fn start(&mut self, what: &str, command: &mut Command) -> anyhow::Result<u32> {
        let child = command
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .with_context(|| format!("starting {what}: cannot start `{}`", show(command)))?;
        let pid = child.id();
        self.running.push(Background {
            what: what.to_owned(),
            child,
        });
        Ok(pid)
    }

    /// How PID exited, if it has (its stderr with it); the process is then forgotten.
    pub fn exited(&mut self, pid: u32) -> anyhow::Result<Option<(ExitStatus, String)>> {
        let Some(index) = self
            .running
            .iter()
            .position(|process| process.child.id() == pid)
        else {
            bail!("pid {pid} is not a process this demo started");
        };
        let process = &mut self.running[index];
        let Some(status) = process
            .child
            .try_wait()
            .with_context(|| format!("waiting for {} (pid {pid})", process.what))?
        else {
            return Ok(None);
        };
        let mut stderr = String::new();
        if let Some(mut pipe) = process.child.stderr.take() {
            let _ = pipe.read_to_string(&mut stderr);
        }
        self.running.remove(index);
        Ok(Some((status, stderr)))
    }

    /// Waits up to TIMEOUT for PID to exit on its own, then kills it.
    pub fn finish(&mut self, pid: u32, timeout: Duration) -> anyhow::Result<()> {
        let deadline = Instant::now() + timeout;
        while Instant::now() < deadline {
            if self.exited(pid)?.is_some() {
                return Ok(());
            }
            std::thread::sleep(POLL);
        }
        self.kill(pid);
        Ok(())
    }

    /// Kills PID (SIGKILL) and reaps it.
    pub fn kill(&mut self, pid: u32) {
        if let Some(index) = self
            .running
            .iter()
            .position(|process| process.child.id() == pid)
        {
            let mut process = self.running.remove(index);
            let _ = process.child.kill();
            let _ = process.child.wait();
        }
    }

    pub fn is_empty(&self) -> bool {
        self.running.is_empty()
    }

    /// Kills every process still running, saying which.
    pub fn kill_all(&mut self) {
        for mut process in self.running.drain(..) {
            if let Ok(None) = process.child.try_wait() {
                println!("  stopping {} (pid {})", process.what, process.child.id());
                let _ = process.child.kill();
            }
            let _ = process.child.wait();
        }
    }
}
