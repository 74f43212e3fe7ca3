//! QEMU: which accelerator works here (KVM only where a kernel really boots with it), and one
//! VM run with its serial console read line by line, stopped on a deadline or when told.

use std::io::{BufRead as _, BufReader};
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use anyhow::Context as _;

use super::guest::HOST_TAG;

const QEMU: &str = "qemu-system-x86_64";

#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum Accel {
    /// KVM when a kernel boots with it here, TCG otherwise.
    Auto,
    Kvm,
    Tcg,
}

impl Accel {
    fn args(self) -> &'static [&'static str] {
        match self {
            Accel::Kvm => &["-accel", "kvm", "-cpu", "host"],
            _ => &["-accel", "tcg"],
        }
    }
}

/// How long a kernel under KVM may take to print its banner before KVM counts as broken.
/// On some nested hosts /dev/kvm opens and runs real-mode code, then hangs at the switch to
/// protected mode, so the probe boots a real kernel.
const KVM_PROBE_LIMIT: Duration = Duration::from_secs(5);

/// Resolves Auto: KVM if /dev/kvm opens and VMLINUZ gets as far as "Linux version" under it.
pub fn choose(requested: Accel, vmlinuz: &Path) -> anyhow::Result<Accel> {
    if requested != Accel::Auto {
        return Ok(requested);
    }
    let kvm_opens = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open("/dev/kvm")
        .is_ok();
    if !kvm_opens {
        return Ok(Accel::Tcg);
    }
    let command = boot(
        Accel::Kvm,
        vmlinuz,
        256,
        "console=ttyS0 earlyprintk=serial,ttyS0 panic=-1",
    );
    let mut vm = Vm::start(command, "probing KVM")?;
    let deadline = Instant::now() + KVM_PROBE_LIMIT;
    let mut works = false;
    while let Some(line) = vm.next_line(deadline) {
        if line.contains("Linux version") {
            works = true;
            break;
        }
    }
    vm.stop();
    Ok(if works { Accel::Kvm } else { Accel::Tcg })
}

/// QEMU booting VMLINUZ with CMDLINE on its serial console (stdio), no display, no devices
/// but what is asked for, and no reboot: a guest that ends powers the VM off.
fn boot(accel: Accel, vmlinuz: &Path, memory_mib: u32, cmdline: &str) -> Command {
    let mut command = Command::new(QEMU);
    command
        .args(accel.args())
        .args(["-m", &memory_mib.to_string()])
        .args([
            "-nodefaults",
            "-display",
            "none",
            "-serial",
            "stdio",
            "-no-reboot",
        ])
        .arg("-kernel")
        .arg(vmlinuz)
        .args(["-append", cmdline]);
    command
}

/// The VM's hardware: enough for the tests, nothing they do not use.
pub struct Machine<'a> {
    pub accel: Accel,
    pub vmlinuz: &'a Path,
    pub initramfs: &'a Path,
    pub cmdline: &'a str,
    pub cpus: u32,
    pub memory_mib: u32,
}

impl Machine<'_> {
    pub fn command(&self) -> Command {
        let mut command = boot(self.accel, self.vmlinuz, self.memory_mib, self.cmdline);
        command
            .args(["-smp", &self.cpus.to_string()])
            .arg("-initrd")
            .arg(self.initramfs)
            // The host's root, read-only: the suites run on the host's own binaries and tools.
            .arg("-virtfs")
            .arg(format!(
                "local,path=/,mount_tag={HOST_TAG},security_model=none,readonly=on,multidevs=remap"
            ));
        command
    }
}

/// A running QEMU, its console lines arriving on a channel.
pub struct Vm {
    child: Child,
    lines: mpsc::Receiver<String>,
}

impl Vm {
    pub fn start(mut command: Command, doing: &str) -> anyhow::Result<Vm> {
        // stdin is not a terminal, so QEMU leaves the terminal's mode alone.
        let mut child = command
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .with_context(|| format!("{doing}: cannot start `{}`", crate::cmd::show(&command)))?;
        let (sender, lines) = mpsc::channel();
        let stdout = child.stdout.take().expect("stdout is piped");
        let stderr = child.stderr.take().expect("stderr is piped");
        for stream in [
            Box::new(stdout) as Box<dyn std::io::Read + Send>,
            Box::new(stderr),
        ] {
            let sender = sender.clone();
            std::thread::spawn(move || {
                let mut reader = BufReader::new(stream);
                let mut buffer = Vec::new();
                while reader.read_until(b'\n', &mut buffer).is_ok_and(|n| n > 0) {
                    let line = String::from_utf8_lossy(&buffer);
                    let line = line.trim_end_matches(['\n', '\r']).replace('\r', "");
                    if sender.send(line).is_err() {
                        break;
                    }
                    buffer.clear();
                }
            });
        }
        Ok(Vm { child, lines })
    }

    /// The next console line, or None when the VM has ended (or DEADLINE passed).
    pub fn next_line(&mut self, deadline: Instant) -> Option<String> {
        let left = deadline.saturating_duration_since(Instant::now());
        self.lines.recv_timeout(left).ok()
    }

    /// Waits up to LIMIT for QEMU to exit by itself (the guest powered off).
    pub fn wait_exit(&mut self, limit: Duration) -> bool {
        let deadline = Instant::now() + limit;
        while Instant::now() < deadline {
            if let Ok(Some(_)) = self.child.try_wait() {
                return true;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        false
    }

    /// Ends QEMU (this process's own child, by its pid) if it still runs.
    pub fn stop(&mut self) {
        if let Ok(None) = self.child.try_wait() {
            let _ = self.child.kill();
        }
        let _ = self.child.wait();
    }
}

impl Drop for Vm {
    fn drop(&mut self) {
        self.stop();
    }
}
