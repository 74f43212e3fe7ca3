//! `cargo xtask demo`: a lab bridge with containers on its ports (examples/lab.toml), the same
//! traffic before and after `xbr attach`, and the bridge's own nftables counters as witness.

mod traffic;
pub(crate) mod witness;

use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::{Context as _, bail};

use self::traffic::Container;
use self::witness::{FrameCounts, Witness};
use crate::cmd::{Interrupt, Processes};
use crate::lab::LabSpec;
use crate::{build, cmd, setup};

pub struct Options {
    pub lab: PathBuf,
    pub seconds: u32,
}

pub fn run(options: Options) -> anyhow::Result<()> {
    cmd::require_root("the demo creates network namespaces and loads BPF programs")?;
    let interrupt = Interrupt::install()?;
    setup::run()?;
    let xbr = build::release_binary()?;
    interrupt.check().context("building xbr")?;
    let lab_path = std::path::absolute(&options.lab)
        .with_context(|| format!("finding the lab file {}", options.lab.display()))?;
    let lab = read_lab(&lab_path)?;
    let mut demo = Demo {
        xbr,
        lab,
        lab_path,
        seconds: options.seconds,
        interrupt,
        processes: Processes::default(),
        lab_up: false,
        attached: false,
    };
    // On every way out of show() - error, Ctrl-C, panic - Demo's Drop cleans up.
    demo.show()
}

/// The lab file, with the two containers the demo sends traffic between.
fn read_lab(path: &Path) -> anyhow::Result<LabSpec> {
    let lab = LabSpec::from_file(path)?;
    if lab.containers.len() < 2 {
        bail!(
            "the lab file {} has {} containers; the demo needs two",
            path.display(),
            lab.containers.len()
        );
    }
    Ok(lab)
}

/// Container INDEX of LAB, as the traffic sees it.
fn container(lab: &LabSpec, index: usize) -> Container {
    let container = &lab.containers[index];
    Container {
        name: container.name.clone(),
        netns: lab.container_netns(&container.name),
        ip: container.address.addr.to_string(),
    }
}

struct Demo {
    xbr: PathBuf,
    lab: LabSpec,
    lab_path: PathBuf,
    seconds: u32,
    interrupt: Interrupt,
    processes: Processes,
    /// What cleanup must undo; set before the step that might leave something behind.
    lab_up: bool,
    attached: bool,
}

/// One phase's numbers.
struct Phase {
    name: &'static str,
    gbit_per_second: f64,
    frames: FrameCounts,
}

impl Demo {
    fn show(&mut self) -> anyhow::Result<()> {
        let host = self.lab.host_netns();
        let bridge = self.lab.bridge.name.clone();
        let lab_file = self.lab_path.display().to_string();
        let (a, b) = (container(&self.lab, 0), container(&self.lab, 1));
        println!();
        println!("== xbr demo: lab {:?} from {lab_file}", self.lab.name);
        println!(
            "   bridge {bridge} in namespace {host}; traffic from {} ({}) to {} ({})",
            a.name, a.ip, b.name, b.ip
        );

        let leftovers: Vec<_> = self
            .lab
            .namespaces()
            .into_iter()
            .filter(|netns| Path::new("/run/netns").join(netns).exists())
            .collect();
        if !leftovers.is_empty() {
            println!(
                "   the lab is still there from an earlier run ({}); taking it down first",
                leftovers.join(", ")
            );
            self.lab_up = true;
            self.xbr(&["lab", "down", &lab_file])?;
            self.lab_up = false;
        }
        self.lab_up = true;
        self.xbr(&["lab", "up", &lab_file])?;
        let witness = Witness::install(&host)?;
        println!(
            "   witness: nftables table `bridge xbr_demo` in {host} counts the frames {bridge} forwards"
        );

        println!();
        println!("== phase 1: plain bridge");
        let plain = self.phase("plain bridge", &a, &b, &witness)?;

        println!();
        println!("== attaching xbr to {bridge}");
        self.attached = true;
        // The demo is about traffic between containers: the host's cgroups are left alone
        // (no socket hooks, which serve host clients of published ports).
        self.xbr(&["-n", &host, "attach", &bridge, "--no-socket-hooks"])?;
        self.xbr(&["-n", &host, "status"])?;

        println!();
        println!("== phase 2: xbr attached");
        let accelerated = self.phase("xbr attached", &a, &b, &witness)?;
        self.xbr(&["-n", &host, "stats"])?;

        println!();
        println!("== tearing down");
        self.xbr(&["-n", &host, "detach", &bridge])?;
        self.attached = false;
        self.xbr(&["lab", "down", &lab_file])?;
        self.lab_up = false;

        print_summary(&bridge, &plain, &accelerated);
        Ok(())
    }

    /// Ping, then one TCP stream, counting what the bridge forwarded meanwhile.
    fn phase(
        &mut self,
        name: &'static str,
        from: &Container,
        to: &Container,
        witness: &Witness,
    ) -> anyhow::Result<Phase> {
        let before = witness.read()?;
        let ping = traffic::ping(from, to, &self.interrupt)?;
        println!("   ping {} -> {}: {ping}", from.name, to.name);
        let bits_per_second =
            traffic::tcp_throughput(from, to, self.seconds, &mut self.processes, &self.interrupt)?;
        let frames = witness.read()?.since(&before);
        let gbit_per_second = bits_per_second / 1e9;
        println!(
            "   iperf3 TCP {} -> {} for {}s: {gbit_per_second:.2} Gbit/s",
            from.name, to.name, self.seconds
        );
        println!(
            "   the bridge forwarded {} IP frames (IPv4 {}, IPv6 {}) and {} ARP frames",
            frames.ip(),
            frames.ipv4,
            frames.ipv6,
            frames.arp
        );
        Ok(Phase {
            name,
            gbit_per_second,
            frames,
        })
    }

    /// Runs the xbr binary, its output on the terminal.
    fn xbr(&self, args: &[&str]) -> anyhow::Result<()> {
        self.interrupt.check()?;
        println!("$ xbr {}", args.join(" "));
        cmd::run(
            Command::new(&self.xbr).args(args),
            &format!("running `xbr {}`", args.join(" ")),
        )?;
        self.interrupt.check()
    }
}

impl Drop for Demo {
    fn drop(&mut self) {
        let processes_left = !self.processes.is_empty();
        if !processes_left && !self.attached && !self.lab_up {
            return;
        }
        println!();
        println!("== cleaning up");
        self.processes.kill_all();
        let host = self.lab.host_netns();
        if self.attached {
            let args = ["-n", host.as_str(), "detach", self.lab.bridge.name.as_str()];
            println!("$ xbr {}", args.join(" "));
            match Command::new(&self.xbr).args(args).output() {
                Ok(output) if output.status.success() => {
                    print!("{}", String::from_utf8_lossy(&output.stdout))
                }
                Ok(output) => {
                    let stderr = String::from_utf8_lossy(&output.stderr);
                    // Detaching what never got attached is fine; `lab down` detaches too.
                    if !stderr.contains("not attached") {
                        eprintln!("   warning: detach failed: {}", stderr.trim());
                    }
                }
                Err(error) => eprintln!("   warning: cannot run {}: {error}", self.xbr.display()),
            }
        }
        if self.lab_up {
            let lab_file = self.lab_path.display().to_string();
            println!("$ xbr lab down {lab_file}");
            if let Err(error) = cmd::run(
                Command::new(&self.xbr).args(["lab", "down", &lab_file]),
                "removing the lab",
            ) {
                eprintln!(
                    "   warning: {error:#}; remove what is left with `ip netns delete NAME` ({})",
                    self.lab.namespaces().join(", ")
                );
            }
        }
    }
}

fn print_summary(bridge: &str, plain: &Phase, accelerated: &Phase) {
    println!();
    println!(
        "== results ({bridge}, one TCP stream, frames counted by the bridge's nftables forward hook)"
    );
    let ip_header = format!("IP frames via {bridge}");
    let arp_header = format!("ARP frames via {bridge}");
    println!(
        "   {:<14} {:>10}  {ip_header:>20}  {arp_header:>20}",
        "phase", "TCP Gbit/s"
    );
    for phase in [plain, accelerated] {
        println!(
            "   {:<14} {:>10.2}  {:>20}  {:>20}",
            phase.name,
            phase.gbit_per_second,
            phase.frames.ip(),
            phase.frames.arp
        );
    }
    println!();
    if plain.gbit_per_second > 0.0 {
        println!(
            "   TCP with xbr attached: {:.2}x the plain bridge.",
            accelerated.gbit_per_second / plain.gbit_per_second
        );
    }
    // Judged by the witness, not by xbr: the fast path works when IPv4 between the containers
    // (nearly) stops crossing the bridge.
    if accelerated.frames.ipv4 * 100 <= plain.frames.ipv4 {
        println!(
            "   IPv4 between the containers skipped {bridge} ({} frames through it before, {} after);",
            plain.frames.ipv4, accelerated.frames.ipv4
        );
        println!(
            "   what still crosses it (ARP, IPv6 multicast such as neighbour discovery) is meant to."
        );
    } else {
        println!(
            "   {bridge} still forwarded {} IPv4 frames with xbr attached ({} without): the fast path",
            accelerated.frames.ipv4, plain.frames.ipv4
        );
        println!("   did not take this traffic; the verdicts of `xbr stats` above say why.");
    }
}
