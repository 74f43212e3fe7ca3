//! What the bench reads from the machine itself: CPU time from /proc/stat, a namespace's UDP
//! counters, the machine's description, and the run time of xbr's BPF program.

use std::os::fd::{FromRawFd as _, OwnedFd};
use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

use anyhow::{Context as _, bail};
use serde::{Deserialize, Serialize};
use serde_json::{Value, json};

use crate::cmd;
use crate::cmd::Interrupt;

/// The machine-wide CPU time counters of /proc/stat's `cpu` line, in clock ticks, and the
/// number of CPUs it sums (its `cpuN` lines).
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub struct CpuTimes {
    pub cpus: u64,
    pub user: u64,
    pub nice: u64,
    pub system: u64,
    pub idle: u64,
    pub iowait: u64,
    pub irq: u64,
    pub softirq: u64,
    pub steal: u64,
}

impl CpuTimes {
    pub fn read() -> anyhow::Result<CpuTimes> {
        let text = std::fs::read_to_string("/proc/stat").context("reading /proc/stat")?;
        CpuTimes::parse(&text)
    }

    pub fn parse(stat: &str) -> anyhow::Result<CpuTimes> {
        let line = stat
            .lines()
            .find(|line| line.starts_with("cpu "))
            .context("/proc/stat has no `cpu` line")?;
        let values = line
            .split_whitespace()
            .skip(1)
            .map(str::parse::<u64>)
            .collect::<Result<Vec<_>, _>>()
            .context("/proc/stat's `cpu` line holds a non-number")?;
        if values.len() < 8 {
            bail!(
                "/proc/stat's `cpu` line has {} fields, expected 8 or more",
                values.len()
            );
        }
        let cpus = stat
            .lines()
            .filter(|line| {
                line.strip_prefix("cpu")
                    .is_some_and(|rest| rest.starts_with(|c: char| c.is_ascii_digit()))
            })
            .count() as u64;
        Ok(CpuTimes {
            cpus,
            user: values[0],
            nice: values[1],
            system: values[2],
            idle: values[3],
            iowait: values[4],
            irq: values[5],
            softirq: values[6],
            steal: values[7],
        })
    }

    pub fn since(&self, earlier: &CpuTimes) -> CpuTimes {
        CpuTimes {
            cpus: self.cpus,
            user: self.user.saturating_sub(earlier.user),
            nice: self.nice.saturating_sub(earlier.nice),
            system: self.system.saturating_sub(earlier.system),
            idle: self.idle.saturating_sub(earlier.idle),
            iowait: self.iowait.saturating_sub(earlier.iowait),
            irq: self.irq.saturating_sub(earlier.irq),
            softirq: self.softirq.saturating_sub(earlier.softirq),
            steal: self.steal.saturating_sub(earlier.steal),
        }
    }

    /// user + nice + system + irq + softirq + steal, in ns. These fields are sampled by the
    /// timer tick, which a CPU sleeping between packets stops (NO_HZ_IDLE): short busy spells
    /// between idle ones go uncounted, and over a window they can fall well short.
    pub fn busy_ns(&self) -> f64 {
        let busy = self.user + self.nice + self.system + self.irq + self.softirq + self.steal;
        ticks_to_ns(busy)
    }

    /// Everything but idle and iowait over a window of SECONDS on all CPUs, in ns: the same
    /// busy time, but from the idle time, which the kernel measures exactly (nohz).
    pub fn not_idle_ns(&self, seconds: f64) -> f64 {
        (self.cpus as f64 * seconds * 1e9 - ticks_to_ns(self.idle + self.iowait)).max(0.0)
    }

    pub fn as_json(&self) -> Value {
        json!({
            "user": ticks_to_ns(self.user),
            "nice": ticks_to_ns(self.nice),
            "system": ticks_to_ns(self.system),
            "idle": ticks_to_ns(self.idle),
            "iowait": ticks_to_ns(self.iowait),
            "irq": ticks_to_ns(self.irq),
            "softirq": ticks_to_ns(self.softirq),
            "steal": ticks_to_ns(self.steal),
        })
    }
}

fn ticks_to_ns(ticks: u64) -> f64 {
    // SAFETY: sysconf has no preconditions.
    let per_second = unsafe { libc::sysconf(libc::_SC_CLK_TCK) };
    let per_second = if per_second > 0 { per_second } else { 100 };
    ticks as f64 * 1e9 / per_second as f64
}

/// The Udp InDatagrams counter of PID's network namespace (/proc/PID/net/snmp): datagrams
/// delivered to a socket there.
pub fn udp_in_datagrams(pid: u32) -> anyhow::Result<u64> {
    let path = format!("/proc/{pid}/net/snmp");
    let text = std::fs::read_to_string(&path).with_context(|| format!("reading {path}"))?;
    snmp_counter(&text, "Udp", "InDatagrams").with_context(|| format!("reading {path}"))
}

/// /proc/net/snmp has pairs of lines: `Udp: Name1 Name2 ...` then `Udp: 1 2 ...`.
fn snmp_counter(snmp: &str, protocol: &str, name: &str) -> anyhow::Result<u64> {
    let prefix = format!("{protocol}:");
    let mut lines = snmp.lines().filter(|line| line.starts_with(&prefix));
    let (Some(names), Some(values)) = (lines.next(), lines.next()) else {
        bail!("no {protocol} lines");
    };
    let index = names
        .split_whitespace()
        .position(|field| field == name)
        .with_context(|| format!("no {protocol} counter {name}"))?;
    values
        .split_whitespace()
        .nth(index)
        .context("fewer values than names")?
        .parse()
        .with_context(|| format!("{protocol} {name} is not a number"))
}

/// Frames LINK in NETNS has received and sent so far (its netlink counters).
#[derive(Clone, Copy, Debug)]
pub struct LinkPackets {
    pub rx: u64,
    pub tx: u64,
}

pub fn link_packets(netns: &str, link: &str) -> anyhow::Result<LinkPackets> {
    let printed = cmd::output(
        cmd::in_netns(netns, "ip").args(["-s", "-j", "link", "show", link]),
        &format!("reading the counters of {link} in {netns}"),
    )?;
    let links: Value = serde_json::from_str(&printed).context("`ip -j` printed no JSON")?;
    let packets = |direction: &str| {
        links[0]["stats64"][direction]["packets"]
            .as_u64()
            .with_context(|| format!("`ip -s -j link` has no stats64.{direction}.packets"))
    };
    Ok(LinkPackets {
        rx: packets("rx")?,
        tx: packets("tx")?,
    })
}

/// TCP connections accepted in NETNS so far (Tcp PassiveOpens of its /proc/net/snmp, which
/// shows the namespace of whoever reads it).
pub fn tcp_passive_opens(netns: &str) -> anyhow::Result<u64> {
    let doing = format!("reading /proc/net/snmp in {netns}");
    let text = cmd::output(cmd::in_netns(netns, "cat").arg("/proc/net/snmp"), &doing)?;
    snmp_counter(&text, "Tcp", "PassiveOpens").context(doing)
}

/// IPv4 datagrams NETNS has forwarded so far (Ip ForwDatagrams of its /proc/net/snmp): what
/// its kernel routed, whether netfilter looked at it or not.
pub fn ip_forwarded(netns: &str) -> anyhow::Result<u64> {
    let doing = format!("reading /proc/net/snmp in {netns}");
    let text = cmd::output(cmd::in_netns(netns, "cat").arg("/proc/net/snmp"), &doing)?;
    snmp_counter(&text, "Ip", "ForwDatagrams").context(doing)
}

/// Connections NETNS's conntrack tracks now (net.netfilter.nf_conntrack_count, per namespace);
/// 0 where conntrack is not loaded at all.
pub fn conntrack_entries(netns: &str) -> anyhow::Result<u64> {
    let doing = format!("reading nf_conntrack_count in {netns}");
    let mut command = cmd::in_netns(netns, "sh");
    command.args([
        "-c",
        "f=/proc/sys/net/netfilter/nf_conntrack_count; if [ -e $f ]; then cat $f; else echo 0; fi",
    ]);
    let text = cmd::output(&mut command, &doing)?;
    text.trim()
        .parse()
        .with_context(|| format!("{doing}: not a number: {text:?}"))
}

/// CPU time a task has run, in ns (/proc/PID/schedstat: the scheduler's own clock, not
/// sampled by ticks).
pub fn task_runtime_ns(pid: u32) -> anyhow::Result<u64> {
    let path = format!("/proc/{pid}/schedstat");
    let text = std::fs::read_to_string(&path).with_context(|| format!("reading {path}"))?;
    text.split_whitespace()
        .next()
        .and_then(|ns| ns.parse().ok())
        .with_context(|| format!("{path} holds no run time: {text:?}"))
}

/// The ksoftirqd threads: softirq work the kernel defers runs there.
pub fn ksoftirqd_pids() -> anyhow::Result<Vec<u32>> {
    let mut pids = Vec::new();
    for entry in std::fs::read_dir("/proc").context("listing /proc")? {
        let Ok(entry) = entry else { continue };
        let Some(pid) = entry
            .file_name()
            .to_str()
            .and_then(|name| name.parse().ok())
        else {
            continue;
        };
        let comm = std::fs::read_to_string(entry.path().join("comm")).unwrap_or_default();
        if comm.starts_with("ksoftirqd/") {
            pids.push(pid);
        }
    }
    Ok(pids)
}

/// How long the bench waited for the kernel to go quiet, and how busy it was then.
pub struct Quiet {
    pub waited: Duration,
    pub kernel_busy: f64,
}

/// Waits, up to MAX, until the kernel's share of all CPUs (system + irq + softirq) stays
/// below QUIET_KERNEL_BUSY for a second. New namespaces and veths keep the kernel busy for a
/// while (IPv6 duplicate address detection, router solicitations and MLD reports, each
/// flooded to every port of the bridge; deleted namespaces are cleaned up in the
/// background); measuring then would charge that work to whichever configuration runs.
pub fn wait_quiet(max: Duration, interrupt: &Interrupt) -> anyhow::Result<Quiet> {
    const QUIET_KERNEL_BUSY: f64 = 0.15;
    let started = Instant::now();
    loop {
        let before = CpuTimes::read()?;
        let until = Instant::now() + Duration::from_secs(1);
        while Instant::now() < until {
            interrupt.check()?;
            std::thread::sleep(Duration::from_millis(50));
        }
        let delta = CpuTimes::read()?.since(&before);
        let total = delta.user
            + delta.nice
            + delta.system
            + delta.idle
            + delta.iowait
            + delta.irq
            + delta.softirq
            + delta.steal;
        let kernel = delta.system + delta.irq + delta.softirq;
        let kernel_busy = if total == 0 {
            0.0
        } else {
            kernel as f64 / total as f64
        };
        let waited = started.elapsed();
        if kernel_busy < QUIET_KERNEL_BUSY || waited >= max {
            return Ok(Quiet {
                waited,
                kernel_busy,
            });
        }
    }
}

/// The machine a report was measured on.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct Machine {
    pub nproc: usize,
    pub kernel: String,
    pub cpu_model: String,
    pub memory_gib: f64,
    pub os: String,
    pub iperf3: String,
    pub sockperf: String,
}

impl Machine {
    pub fn describe() -> Machine {
        let read = |path: &str| std::fs::read_to_string(path).unwrap_or_default();
        let cpuinfo = read("/proc/cpuinfo");
        let meminfo = read("/proc/meminfo");
        let os_release = read("/etc/os-release");
        let memory_kib: f64 = meminfo
            .lines()
            .find_map(|line| line.strip_prefix("MemTotal:"))
            .and_then(|rest| rest.split_whitespace().next()?.parse().ok())
            .unwrap_or(0.0);
        let first_line = |program: &str, arg: &str| {
            Command::new(program)
                .arg(arg)
                .output()
                .map(|output| {
                    let text = format!(
                        "{}{}",
                        String::from_utf8_lossy(&output.stdout),
                        String::from_utf8_lossy(&output.stderr)
                    );
                    text.lines().next().unwrap_or_default().trim().to_owned()
                })
                .unwrap_or_default()
        };
        Machine {
            nproc: std::thread::available_parallelism().map_or(1, usize::from),
            kernel: read("/proc/sys/kernel/osrelease").trim().to_owned(),
            cpu_model: cpuinfo
                .lines()
                .find_map(|line| line.strip_prefix("model name"))
                .and_then(|rest| rest.split_once(':'))
                .map(|(_, model)| model.trim().to_owned())
                .unwrap_or_else(|| "unknown".to_owned()),
            memory_gib: (memory_kib / 1024.0 / 1024.0 * 10.0).round() / 10.0,
            os: os_release
                .lines()
                .find_map(|line| line.strip_prefix("PRETTY_NAME="))
                .map(|name| name.trim_matches('"').to_owned())
                .unwrap_or_default(),
            iperf3: first_line("iperf3", "--version"),
            sockperf: first_line("sockperf", "--version"),
        }
    }
}

/// BPF run-time statistics, on while this value lives (BPF_ENABLE_STATS: the kernel turns
/// them off again when the fd closes, also when the bench is killed).
pub struct BpfStats {
    _fd: OwnedFd,
}

impl BpfStats {
    pub fn enable() -> anyhow::Result<BpfStats> {
        const BPF_ENABLE_STATS: libc::c_long = 32;
        const BPF_STATS_RUN_TIME: u32 = 0;
        // union bpf_attr's enable_stats member: one u32, the rest zero.
        let mut attr = [0u32; 8];
        attr[0] = BPF_STATS_RUN_TIME;
        // SAFETY: attr is a valid, zero-padded bpf_attr of the size passed.
        let fd = unsafe {
            libc::syscall(
                libc::SYS_bpf,
                BPF_ENABLE_STATS,
                attr.as_mut_ptr(),
                std::mem::size_of_val(&attr),
            )
        };
        if fd < 0 {
            return Err(std::io::Error::last_os_error())
                .context("enabling BPF run-time statistics (BPF_ENABLE_STATS)");
        }
        // SAFETY: the kernel returned a new fd that nothing else owns.
        Ok(BpfStats {
            _fd: unsafe { OwnedFd::from_raw_fd(fd as i32) },
        })
    }
}

/// Run count and run time of one BPF program.
#[derive(Clone, Copy, Debug, Default, Serialize, Deserialize)]
pub struct ProgramRuns {
    pub run_cnt: u64,
    pub run_time_ns: u64,
}

/// The tc programs pinned in an attachment's pin directory, summed (bpftool reads them).
pub fn program_runs(pins: &Path) -> anyhow::Result<ProgramRuns> {
    let entries = std::fs::read_dir(pins).with_context(|| format!("listing {}", pins.display()))?;
    let mut total = ProgramRuns::default();
    let mut programs = 0;
    for entry in entries {
        let path = entry
            .with_context(|| format!("listing {}", pins.display()))?
            .path();
        // Maps and links are pinned there too; only programs answer `prog show`.
        let Ok(shown) = cmd::output(
            Command::new("bpftool")
                .args(["-j", "prog", "show", "pinned"])
                .arg(&path),
            "",
        ) else {
            continue;
        };
        let Ok(program) = serde_json::from_str::<Value>(&shown) else {
            continue;
        };
        if program["type"].as_str() != Some("sched_cls") {
            continue;
        }
        programs += 1;
        total.run_cnt += program["run_cnt"].as_u64().unwrap_or(0);
        total.run_time_ns += program["run_time_ns"].as_u64().unwrap_or(0);
    }
    if programs == 0 {
        bail!("no tc program pinned in {}", pins.display());
    }
    Ok(total)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_proc_stat() {
        let stat = "cpu  100 2 30 4000 5 6 70 8 0 0\ncpu0 50 1 15 2000 2 3 35 4 0 0\nintr 1\n";
        let times = CpuTimes::parse(stat).unwrap();
        assert_eq!((times.user, times.softirq, times.steal), (100, 70, 8));
        assert_eq!(times.cpus, 1);
        let later = CpuTimes {
            user: 110,
            softirq: 75,
            ..times
        };
        let delta = later.since(&times);
        assert_eq!((delta.user, delta.softirq, delta.idle), (10, 5, 0));
        assert!(delta.busy_ns() > 0.0);
    }

    #[test]
    fn reads_snmp_counters() {
        let snmp = "Ip: Forwarding DefaultTTL\nIp: 1 64\n\
                    Udp: InDatagrams NoPorts InErrors OutDatagrams\nUdp: 1234 5 6 7\n\
                    UdpLite: InDatagrams NoPorts\nUdpLite: 0 0\n";
        assert_eq!(snmp_counter(snmp, "Udp", "InDatagrams").unwrap(), 1234);
        assert_eq!(snmp_counter(snmp, "Udp", "OutDatagrams").unwrap(), 7);
        assert!(snmp_counter(snmp, "Udp", "Nope").is_err());
    }
}
