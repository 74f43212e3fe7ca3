//! Processes the demo starts, each known by its pid and killed on every way out, and the
//! Ctrl-C flag that turns an interrupt into an ordinary error, so cleanup still runs.

use std::io::Read;
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use anyhow::{Context as _, bail};

use crate::cmd;

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
    let mut child = command
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .with_context(|| format!("{doing}: cannot start `{}`", cmd::show(command)))?;
    // Read both pipes while waiting, so a chatty child never blocks on a full pipe.
    let stdout = drain(child.stdout.take());
    let stderr = drain(child.stderr.take());
    let deadline = Instant::now() + timeout;
    let status = loop {
        if let Some(status) = child
            .try_wait()
            .with_context(|| format!("{doing}: waiting for pid {}", child.id()))?
        {
            break status;
        }
        if interrupt.check().is_err() || Instant::now() > deadline {
            let _ = child.kill();
            let _ = child.wait();
            interrupt.check().with_context(|| doing.to_owned())?;
            bail!(
                "{doing}: `{}` took longer than {}s; killed it",
                cmd::show(command),
                timeout.as_secs()
            );
        }
        std::thread::sleep(POLL);
    };
    interrupt.check().with_context(|| doing.to_owned())?;
    Ok(Captured {
        status,
        stdout: joined(stdout),
        stderr: joined(stderr),
    })
}

fn drain(pipe: Option<impl Read + Send + 'static>) -> JoinHandle<String> {
    std::thread::spawn(move || {
        let mut text = String::new();
        if let Some(mut pipe) = pipe {
            let mut bytes = Vec::new();
            let _ = pipe.read_to_end(&mut bytes);
            text = String::from_utf8_lossy(&bytes).into_owned();
        }
        text
    })
}

fn joined(reader: JoinHandle<String>) -> String {
    reader.join().unwrap_or_default()
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
            .with_context(|| format!("starting {what}: cannot start `{}`", cmd::show(command)))?;
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
