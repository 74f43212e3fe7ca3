//! The workloads, each one run of a traffic tool from a world's client to its server, turned
//! into named numbers (metrics) plus the raw figures behind them (details).

use std::collections::BTreeMap;
use std::process::{Command, ExitStatus};
use std::time::{Duration, Instant};

use anyhow::{Context as _, bail};
use serde_json::{Value, json};

use super::host::{self, CpuTimes};
use super::peer::{self, ClientKind, ClientReport, RateKind};
use super::worlds::{
    HOST_PARALLEL, IPERF3_PORT, Placement, SOCKPERF_TCP_PORT, SOCKPERF_UDP_PORT, UPLINK, World,
    on_cpu,
};
use crate::cmd::{Captured, Interrupt, Running, run_captured};

/// iperf3's UDP payload for the packet-rate workloads.
pub const UDP_PAYLOAD: u32 = 64;
/// The CPU-per-packet window starts this long after the client, past iperf3's handshake.
const CPU_WINDOW_START: Duration = Duration::from_millis(600);

#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Workload {
    TcpOneStream,
    TcpTwoStreams,
    UdpPps,
    CpuPerPacket,
    SockperfTcp,
    SockperfUdp,
    AttachTcx,
    AttachClsact,
    TcpConnections,
    TcpRequests,
    TcpConnectionsFlooded,
    HostConnections,
    HostRequests,
    HostStream,
    EgressConnections,
    EgressRr,
    EgressStream,
    EgressUdp64,
    OverlayStream,
    OverlayUdp64,
    OverlayRr,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Better {
    Higher,
    Lower,
}

/// One number a workload produces.
#[derive(Clone, Copy, Debug)]
pub struct Metric {
    pub key: &'static str,
    pub unit: &'static str,
    pub better: Better,
}

const GBIT: Metric = Metric {
    key: "gbit_per_s",
    unit: "Gbit/s",
    better: Better::Higher,
};
const UDP_RATES: [Metric; 2] = [
    Metric {
        key: "kpps",
        unit: "kpps received",
        better: Better::Higher,
    },
    // The sender runs the whole path in its system calls (veth, bridge or redirect, up to
    // the receiver's socket), so its rate shows the path's cost where the receiver caps the
    // received rate.
    Metric {
        key: "sent_kpps",
        unit: "kpps sent",
        better: Better::Higher,
    },
];
const CPU_PER_PACKET: [Metric; 2] = [
    Metric {
        key: "ns_per_packet",
        unit: "ns CPU/packet, whole machine",
        better: Better::Lower,
    },
    Metric {
        key: "task_ns_per_packet",
        unit: "ns CPU/packet, bench tasks",
        better: Better::Lower,
    },
];
const ROUND_TRIPS: [Metric; 3] = [
    Metric {
        key: "k_round_trips_per_s",
        unit: "k round trips/s",
        better: Better::Higher,
    },
    Metric {
        key: "p50_rtt_us",
        unit: "µs RTT p50",
        better: Better::Lower,
    },
    Metric {
        key: "p99_rtt_us",
        unit: "µs RTT p99",
        better: Better::Lower,
    },
];
const CONNECTIONS: Metric = Metric {
    key: "connections_per_s",
    unit: "connections/s",
    better: Better::Higher,
};
/// The same client, right after the flood ended (the tables still full of its state).
const CONNECTIONS_AFTER: Metric = Metric {
    key: "connections_per_s_after",
    unit: "connections/s right after the flood",
    better: Better::Higher,
};
const REQUESTS: Metric = Metric {
    key: "requests_per_s",
    unit: "requests/s",
    better: Better::Higher,
};
const ATTACH_MS: Metric = Metric {
    key: "ms",
    unit: "ms",
    better: Better::Lower,
};

impl Workload {
    /// Every workload at the base endpoint count, in the order of a round.
    pub const TRAFFIC: [Workload; 6] = [
        Workload::TcpOneStream,
        Workload::TcpTwoStreams,
        Workload::UdpPps,
        Workload::CpuPerPacket,
        Workload::SockperfTcp,
        Workload::SockperfUdp,
    ];
    /// What the scale phase repeats with many endpoints.
    pub const SCALE: [Workload; 2] = [Workload::UdpPps, Workload::CpuPerPacket];
    pub const ATTACH: [Workload; 2] = [Workload::AttachClsact, Workload::AttachTcx];
    /// From outside to a container's published port, in the published-port configurations.
    pub const PUBLISHED: [Workload; 3] = [
        Workload::TcpConnections,
        Workload::TcpRequests,
        Workload::TcpConnectionsFlooded,
    ];
    /// From a client on the host to a published port, in the host-client configurations.
    pub const HOST: [Workload; 3] = [
        Workload::HostConnections,
        Workload::HostRequests,
        Workload::HostStream,
    ];
    /// From a container to a server outside, in the egress configurations.
    pub const EGRESS: [Workload; 4] = [
        Workload::EgressConnections,
        Workload::EgressRr,
        Workload::EgressStream,
        Workload::EgressUdp64,
    ];
    /// From a container on one node to a container on another, over VXLAN, in the overlay
    /// configurations.
    pub const OVERLAY: [Workload; 3] = [
        Workload::OverlayStream,
        Workload::OverlayUdp64,
        Workload::OverlayRr,
    ];
    pub const ALL: [Workload; 21] = [
        Workload::TcpOneStream,
        Workload::TcpTwoStreams,
        Workload::UdpPps,
        Workload::CpuPerPacket,
        Workload::SockperfTcp,
        Workload::SockperfUdp,
        Workload::AttachTcx,
        Workload::AttachClsact,
        Workload::TcpConnections,
        Workload::TcpRequests,
        Workload::TcpConnectionsFlooded,
        Workload::HostConnections,
        Workload::HostRequests,
        Workload::HostStream,
        Workload::EgressConnections,
        Workload::EgressRr,
        Workload::EgressStream,
        Workload::EgressUdp64,
        Workload::OverlayStream,
        Workload::OverlayUdp64,
        Workload::OverlayRr,
    ];

    pub fn id(self) -> &'static str {
        match self {
            Workload::TcpOneStream => "tcp-1-stream",
            Workload::TcpTwoStreams => "tcp-2-streams",
            Workload::UdpPps => "udp-64b-pps",
            Workload::CpuPerPacket => "cpu-per-packet",
            Workload::SockperfTcp => "sockperf-tcp",
            Workload::SockperfUdp => "sockperf-udp",
            Workload::AttachTcx => "attach-tcx",
            Workload::AttachClsact => "attach-clsact",
            Workload::TcpConnections => "tcp-connections",
            Workload::TcpRequests => "tcp-requests",
            Workload::TcpConnectionsFlooded => "tcp-connections-syn-flood",
            Workload::HostConnections => "host-connections",
            Workload::HostRequests => "host-requests",
            Workload::HostStream => "host-stream",
            Workload::EgressConnections => "egress-connections",
            Workload::EgressRr => "egress-rr",
            Workload::EgressStream => "egress-stream",
            Workload::EgressUdp64 => "egress-udp64",
            Workload::OverlayStream => "overlay-stream",
            Workload::OverlayUdp64 => "overlay-udp64",
            Workload::OverlayRr => "overlay-rr",
        }
    }

    pub fn from_id(id: &str) -> Option<Workload> {
        Workload::ALL
            .into_iter()
            .find(|workload| workload.id() == id)
    }

    pub fn label(self) -> &'static str {
        match self {
            Workload::TcpOneStream => "iperf3 TCP, 1 stream",
            Workload::TcpTwoStreams => "iperf3 TCP, 2 streams",
            Workload::UdpPps => "iperf3 UDP 64 B",
            Workload::CpuPerPacket => "CPU per packet, UDP 64 B at fixed rate",
            Workload::SockperfTcp => "sockperf ping-pong TCP",
            Workload::SockperfUdp => "sockperf ping-pong UDP",
            Workload::AttachTcx => "xbr attach, tcx",
            Workload::AttachClsact => "xbr attach, clsact",
            Workload::TcpConnections => {
                "TCP connections to a published port: connect, 64 B request, response, close"
            }
            Workload::TcpRequests => {
                "TCP requests to a published port, 64 B each way, one connection"
            }
            Workload::TcpConnectionsFlooded => {
                "TCP connections to a published port during a flood of spoofed SYNs at a fixed rate \
                 (connect, 64 B request, response, close)"
            }
            Workload::HostConnections => {
                "host client, TCP connections to 127.0.0.1:8080, 4 at a time: connect, 64 B \
                 request, response, close"
            }
            Workload::HostRequests => {
                "host client, TCP requests to 127.0.0.1:8080, 64 B each way, one connection"
            }
            Workload::HostStream => "host client, one TCP stream to 127.0.0.1:8080",
            Workload::EgressConnections => {
                "egress, TCP connections from a container to a server outside: connect, 64 B \
                 request, response, close"
            }
            Workload::EgressRr => "egress, sockperf ping-pong TCP from a container to outside",
            Workload::EgressStream => "egress, iperf3 TCP, 1 stream from a container to outside",
            Workload::EgressUdp64 => "egress, iperf3 UDP 64 B from a container to outside",
            Workload::OverlayStream => {
                "across nodes, iperf3 TCP, 1 stream from a container to one on the other node"
            }
            Workload::OverlayUdp64 => {
                "across nodes, iperf3 UDP 64 B from a container to one on the other node"
            }
            Workload::OverlayRr => {
                "across nodes, sockperf ping-pong TCP from a container to one on the other node"
            }
        }
    }

    pub fn metrics(self) -> &'static [Metric] {
        match self {
            Workload::TcpOneStream | Workload::TcpTwoStreams => &[GBIT],
            Workload::UdpPps => &UDP_RATES,
            Workload::CpuPerPacket => &CPU_PER_PACKET,
            Workload::SockperfTcp | Workload::SockperfUdp => &ROUND_TRIPS,
            Workload::AttachTcx | Workload::AttachClsact => &[ATTACH_MS],
            Workload::TcpConnections => &[CONNECTIONS],
            Workload::TcpRequests => &[REQUESTS],
            Workload::TcpConnectionsFlooded => &[CONNECTIONS, CONNECTIONS_AFTER],
            Workload::HostConnections => &[CONNECTIONS],
            Workload::HostRequests => &[REQUESTS],
            Workload::HostStream => &[GBIT],
            Workload::EgressConnections => &[CONNECTIONS],
            Workload::EgressRr => &ROUND_TRIPS,
            Workload::EgressStream => &[GBIT],
            Workload::EgressUdp64 => &UDP_RATES,
            Workload::OverlayStream => &[GBIT],
            Workload::OverlayUdp64 => &UDP_RATES,
            Workload::OverlayRr => &ROUND_TRIPS,
        }
    }

    pub fn is_published(self) -> bool {
        Workload::PUBLISHED.contains(&self)
    }

    pub fn is_host(self) -> bool {
        Workload::HOST.contains(&self)
    }

    pub fn is_egress(self) -> bool {
        Workload::EGRESS.contains(&self)
    }

    pub fn is_overlay(self) -> bool {
        Workload::OVERLAY.contains(&self)
    }

    /// Attaching is xbr's alone; traffic runs in every configuration.
    #[cfg(test)]
    pub fn xbr_only(self) -> bool {
        matches!(self, Workload::AttachTcx | Workload::AttachClsact)
    }
}

/// What one run measured.
pub struct Measured {
    pub metrics: BTreeMap<String, f64>,
    pub details: Value,
}

/// How long and how hard the traffic workloads run.
#[derive(Clone, Debug)]
pub struct Load {
    pub seconds: u32,
    /// The fixed offered load of the CPU-per-packet workload.
    pub cpu_pps: u32,
    pub placement: Placement,
    /// The SYN flood's rate, and the program that sends it.
    pub flood_pps: u32,
    pub flood: std::path::PathBuf,
    /// The host clients' program: this xtask, as `bench-client`.
    pub client: std::path::PathBuf,
}

pub fn run(
    workload: Workload,
    world: &World,
    load: &Load,
    interrupt: &Interrupt,
) -> anyhow::Result<Measured> {
    match workload {
        Workload::TcpOneStream => tcp(world, 1, load, interrupt),
        Workload::TcpTwoStreams => tcp(world, 2, load, interrupt),
        Workload::UdpPps => udp_pps(world, load, interrupt),
        Workload::CpuPerPacket => cpu_per_packet(world, load, interrupt),
        Workload::SockperfTcp => sockperf(world, true, load, interrupt),
        Workload::SockperfUdp => sockperf(world, false, load, interrupt),
        Workload::AttachTcx | Workload::AttachClsact => {
            unreachable!("attach time is measured by the worlds")
        }
        Workload::TcpConnections => rate(world, RateKind::Connections, load, interrupt),
        Workload::TcpRequests => rate(world, RateKind::Requests, load, interrupt),
        Workload::TcpConnectionsFlooded => flooded(world, load, interrupt),
        Workload::HostConnections => host_client(world, ClientKind::Connections, load, interrupt),
        Workload::HostRequests => host_client(world, ClientKind::Requests, load, interrupt),
        Workload::HostStream => host_client(world, ClientKind::Stream, load, interrupt),
        Workload::EgressConnections => rate(world, RateKind::Connections, load, interrupt),
        Workload::EgressRr => sockperf(world, true, load, interrupt),
        Workload::EgressStream => tcp(world, 1, load, interrupt),
        Workload::EgressUdp64 => udp_pps(world, load, interrupt),
        Workload::OverlayStream => tcp(world, 1, load, interrupt),
        Workload::OverlayUdp64 => udp_pps(world, load, interrupt),
        Workload::OverlayRr => sockperf(world, true, load, interrupt),
    }
}

/// The host client (`cargo xtask bench-client`) in the world's host namespace, on the
/// published-port CPU at nice -20, and in the world's cgroup when it has one (host-xbr: the
/// cgroup xbr's socket hooks serve). More than one failed exchange in a thousand is an error.
fn host_client(
    world: &World,
    kind: ClientKind,
    load: &Load,
    interrupt: &Interrupt,
) -> anyhow::Result<Measured> {
    let to = world
        .published
        .with_context(|| format!("{} has no published port", world.config.name()))?;
    let program = load.client.to_string_lossy().into_owned();
    let mut client = on_cpu(&world.client_netns, load.placement.published_cpu, &program);
    let kind_name = match kind {
        ClientKind::Connections => "connections",
        ClientKind::Requests => "requests",
        ClientKind::Stream => "stream",
    };
    client.args([
        "bench-client",
        "--kind",
        kind_name,
        "--to",
        &to.to_string(),
        "--seconds",
        &load.seconds.to_string(),
        "--parallel",
        &HOST_PARALLEL.to_string(),
    ]);
    let mut command = match &world.cgroup {
        // The child joins the cgroup, then becomes the client: never the bench itself.
        Some(cgroup) => {
            let mut command = Command::new("sh");
            command
                .arg("-c")
                .arg("echo $$ > \"$0/cgroup.procs\" && exec \"$@\"")
                .arg(cgroup)
                .arg(client.get_program())
                .args(client.get_args());
            command
        }
        None => client,
    };
    let doing = format!(
        "running the host client ({kind_name}) to {to} in {}",
        world.config.name()
    );
    let timeout = Duration::from_secs(u64::from(load.seconds) + 30);
    let captured = run_captured(&mut command, &doing, timeout, interrupt)?;
    if !captured.status.success() {
        bail!(
            "{doing}: failed ({}): {}",
            captured.status,
            captured.stderr.trim()
        );
    }
    let report: ClientReport = serde_json::from_str(captured.stdout.trim())
        .with_context(|| format!("{doing}: no report: {}", captured.stdout))?;
    if report.completed == 0 || report.failed * 1000 > report.completed || report.seconds <= 0.0 {
        bail!(
            "{doing}: {} completed, {} failed (first: {})",
            report.completed,
            report.failed,
            report.first_error.as_deref().unwrap_or("none")
        );
    }
    let per_second = report.completed as f64 / report.seconds;
    let metric = match kind {
        ClientKind::Connections => (CONNECTIONS.key, per_second),
        ClientKind::Requests => (REQUESTS.key, per_second),
        ClientKind::Stream => (GBIT.key, report.bytes as f64 * 8.0 / report.seconds / 1e9),
    };
    // What the path check expects: every connection made (a connect() each), and the bytes
    // a relay on the way would have read.
    let connections = match kind {
        ClientKind::Connections => report.completed,
        ClientKind::Requests | ClientKind::Stream => 1,
    };
    Ok(Measured {
        metrics: metrics(&[metric]),
        details: json!({
            "completed": report.completed,
            "failed": report.failed,
            "seconds": report.seconds,
            "first_error": report.first_error,
            "bytes": report.bytes,
            "connections": connections,
            "parallel": if kind == ClientKind::Connections { HOST_PARALLEL } else { 1 },
            "in_cgroup": world.cgroup.is_some(),
        }),
    })
}

/// The spoofed sources of the flood: a /16 the published-port labs route to the outside
/// namespace, where nobody has it, so nobody ever answers a SYN-ACK.
pub const SPOOFED_SOURCES: &str = "10.79.0.0";
/// How long the flood runs before the client starts: the tables fill first.
const FLOOD_LEAD: Duration = Duration::from_secs(1);

/// The connections client from outside while `syn-flood` (on the other CPU, like traffic
/// arriving there) sends spoofed SYNs to the same port at `load.flood_pps`; then the same
/// client again right after the flood stopped, with the tables still full of its state.
/// Failed connections are counted, not fatal (unless none completes): that is what this
/// workload is about.
fn flooded(world: &World, load: &Load, interrupt: &Interrupt) -> anyhow::Result<Measured> {
    let to = world
        .published
        .with_context(|| format!("{} has no published port", world.config.name()))?;
    let host = world
        .host_netns
        .as_deref()
        .context("a published-port world has a host namespace")?;
    let flood_seconds = FLOOD_LEAD.as_secs_f64() + f64::from(load.seconds) + 0.5;
    let doing = format!("flooding {to} in {}", world.config.name());
    let received_before = host::link_packets(host, UPLINK)?.rx;
    // On the other CPU, at nice -20 like every traffic process: the flood's frames are handled
    // there (as a NIC queue of another CPU would), so what the client sees is what the flood's
    // state does to it, not its CPU time.
    let program = load.flood.to_string_lossy().into_owned();
    let mut flood = on_cpu(&world.client_netns, load.placement.server_cpu, &program);
    flood.args([
        "--netns",
        &world.client_netns,
        "--device",
        "eth0",
        "--dst-mac-of",
        &format!("{host}:{}", UPLINK),
        "--dst",
        &to.to_string(),
        "--sources",
        SPOOFED_SOURCES,
        "--rate",
        &load.flood_pps.to_string(),
        "--seconds",
        &format!("{flood_seconds:.1}"),
    ]);
    let mut flood = Running::spawn(&mut flood, &doing)?;
    std::thread::sleep(FLOOD_LEAD);
    if flood.finished() {
        let ended = flood.wait(Duration::from_secs(1), interrupt)?;
        bail!(
            "{doing}: syn-flood ended early ({}): {}",
            ended.status,
            ended.stderr.trim()
        );
    }
    let kind = RateKind::Connections;
    let cpu = load.placement.published_cpu;
    let during = peer::measure_rate(kind, &world.client_netns, cpu, to, load.seconds, interrupt)?;
    let Captured {
        status,
        stdout,
        stderr,
    } = flood.wait(Duration::from_secs(30), interrupt)?;
    if !status.success() {
        bail!("{doing}: syn-flood failed ({status}): {}", stderr.trim());
    }
    let report: Value = serde_json::from_str(stdout.trim())
        .with_context(|| format!("{doing}: syn-flood printed no JSON: {stdout}"))?;
    let received = host::link_packets(host, UPLINK)?
        .rx
        .saturating_sub(received_before);
    let after = peer::measure_rate(kind, &world.client_netns, cpu, to, load.seconds, interrupt)?;
    for (when, rate) in [("during", &during), ("after", &after)] {
        if rate.completed == 0 {
            bail!(
                "connections to {to} in {} {when} the flood: none completed, {} failed (first: {})",
                world.config.name(),
                rate.failed,
                rate.first_error.as_deref().unwrap_or("none")
            );
        }
    }
    let sent = report["sent"].as_f64().unwrap_or(0.0);
    let seconds = report["seconds"].as_f64().unwrap_or(flood_seconds);
    Ok(Measured {
        metrics: metrics(&[
            (CONNECTIONS.key, during.per_second()),
            (CONNECTIONS_AFTER.key, after.per_second()),
        ]),
        details: json!({
            "completed": during.completed + after.completed,
            "during": during.as_json(),
            "after": after.as_json(),
            "flood": {
                "rate_pps": load.flood_pps,
                "sent": sent,
                "seconds": seconds,
                "sent_pps": sent / seconds,
                "received_by_uplink": received,
                "sources": format!("{SPOOFED_SOURCES}/16"),
            },
        }),
    })
}

/// The bench's own client, from outside to the world's published port. A run with more than
/// one failed exchange in a thousand is an error, not a number.
fn rate(
    world: &World,
    kind: RateKind,
    load: &Load,
    interrupt: &Interrupt,
) -> anyhow::Result<Measured> {
    let to = world
        .published
        .with_context(|| format!("{} has no published port", world.config.name()))?;
    let rate = peer::measure_rate(
        kind,
        &world.client_netns,
        load.placement.published_cpu,
        to,
        load.seconds,
        interrupt,
    )?;
    let what = match kind {
        RateKind::Connections => "connections",
        RateKind::Requests => "requests",
    };
    if rate.completed == 0 || rate.failed * 1000 > rate.completed {
        bail!(
            "{what} to {to} in {}: {} completed, {} failed (first: {})",
            world.config.name(),
            rate.completed,
            rate.failed,
            rate.first_error.as_deref().unwrap_or("none")
        );
    }
    let key = match kind {
        RateKind::Connections => CONNECTIONS.key,
        RateKind::Requests => REQUESTS.key,
    };
    Ok(Measured {
        metrics: metrics(&[(key, rate.per_second())]),
        details: rate.as_json(),
    })
}

fn metrics(pairs: &[(&str, f64)]) -> BTreeMap<String, f64> {
    pairs
        .iter()
        .map(|(key, value)| ((*key).to_owned(), *value))
        .collect()
}

/// `iperf3 -c` in the world's client namespace, on the client CPU, with a JSON report.
fn iperf3_client(world: &World, args: &[String], seconds: u32, load: &Load) -> Command {
    let port = IPERF3_PORT.to_string();
    let server = world.server_ip.to_string();
    let mut client = on_cpu(&world.client_netns, load.placement.client_cpu, "iperf3");
    client
        .args(["-c", &server, "-p", &port, "-J", "-t", &seconds.to_string()])
        .args(args);
    client
}

/// iperf3's JSON report; iperf3 reports its errors inside it, also when it exits 1.
fn iperf3_report(
    doing: &str,
    status: ExitStatus,
    stdout: &str,
    stderr: &str,
) -> anyhow::Result<Value> {
    let report: Value = serde_json::from_str(stdout).with_context(|| {
        format!(
            "{doing}: iperf3 printed no JSON ({status}): {}",
            stderr.trim()
        )
    })?;
    if let Some(error) = report["error"].as_str() {
        bail!("{doing}: iperf3 says: {error}");
    }
    Ok(report)
}

fn iperf3(
    world: &World,
    args: &[String],
    seconds: u32,
    load: &Load,
    interrupt: &Interrupt,
) -> anyhow::Result<Value> {
    let doing = format!(
        "running iperf3 {} in {}",
        args.join(" "),
        world.config.name()
    );
    let mut client = iperf3_client(world, args, seconds, load);
    let timeout = Duration::from_secs(u64::from(seconds) + 30);
    let captured = run_captured(&mut client, &doing, timeout, interrupt)?;
    iperf3_report(&doing, captured.status, &captured.stdout, &captured.stderr)
}

fn tcp(
    world: &World,
    streams: u32,
    load: &Load,
    interrupt: &Interrupt,
) -> anyhow::Result<Measured> {
    let args = vec!["-P".to_owned(), streams.to_string()];
    let report = iperf3(world, &args, load.seconds, load, interrupt)?;
    let bits_per_second = report["end"]["sum_received"]["bits_per_second"]
        .as_f64()
        .context("iperf3's JSON has no end.sum_received.bits_per_second")?;
    Ok(Measured {
        metrics: metrics(&[("gbit_per_s", bits_per_second / 1e9)]),
        details: json!({
            "streams": streams,
            "received_bits_per_second": bits_per_second,
            "sent_bits_per_second": report["end"]["sum_sent"]["bits_per_second"],
            "retransmits": report["end"]["sum_sent"]["retransmits"],
            "seconds": report["end"]["sum_received"]["seconds"],
        }),
    })
}

/// UDP datagrams the server received: (received, sent by the client, seconds).
pub fn udp_received(report: &Value) -> anyhow::Result<(f64, f64, f64)> {
    let received = &report["end"]["sum_received"];
    let packets = received["packets"]
        .as_f64()
        .context("iperf3's JSON has no end.sum_received.packets")?;
    let lost = received["lost_packets"]
        .as_f64()
        .context("iperf3's JSON has no end.sum_received.lost_packets")?;
    let seconds = received["seconds"]
        .as_f64()
        .filter(|seconds| *seconds > 0.0)
        .context("iperf3's JSON has no end.sum_received.seconds")?;
    let sent = report["end"]["sum_sent"]["packets"]
        .as_f64()
        .unwrap_or(packets);
    Ok(((packets - lost).max(0.0), sent, seconds))
}

fn udp_pps(world: &World, load: &Load, interrupt: &Interrupt) -> anyhow::Result<Measured> {
    let args = ["-u", "-l", &UDP_PAYLOAD.to_string(), "-b", "0"].map(str::to_owned);
    let report = iperf3(world, &args, load.seconds, load, interrupt)?;
    let (received, sent, seconds) = udp_received(&report)?;
    Ok(Measured {
        metrics: metrics(&[
            ("kpps", received / seconds / 1e3),
            ("sent_kpps", sent / seconds / 1e3),
        ]),
        details: json!({
            "received_packets": received,
            "sent_packets": sent,
            "seconds": seconds,
            "sent_pps": sent / seconds,
            "lost_percent": report["end"]["sum_received"]["lost_percent"],
        }),
    })
}

/// 64-byte UDP at a fixed rate, measured over a window inside the run, per datagram the
/// server's namespace delivered to its socket in that window (its Udp InDatagrams counter):
/// - `ns_per_packet`: busy time of the whole machine (all CPUs, /proc/stat), which also
///   counts whatever else the machine runs. Busy is everything but idle and iowait: the
///   tick-sampled sum of user, nice, system, irq, softirq and steal misses most of a paced
///   workload's short busy spells (it is kept in the details as `tick_busy_ns`);
/// - `task_ns_per_packet`: run time of the bench's own tasks (iperf3 client and server) and of
///   the ksoftirqd threads, from the scheduler (/proc/PID/schedstat). Softirq work done on a
///   task's time is charged to that task, and the packet path runs there: in the sender's
///   system calls, in the receiver's, or in ksoftirqd.
fn cpu_per_packet(world: &World, load: &Load, interrupt: &Interrupt) -> anyhow::Result<Measured> {
    let server = world.iperf3_server()?;
    let bits_per_second = u64::from(load.cpu_pps) * u64::from(UDP_PAYLOAD) * 8;
    let args = [
        "-u",
        "-l",
        &UDP_PAYLOAD.to_string(),
        "-b",
        &bits_per_second.to_string(),
    ]
    .map(str::to_owned);
    let doing = format!(
        "running iperf3 UDP at {} pps in {}",
        load.cpu_pps,
        world.config.name()
    );
    // The client outlasts the window by about a second on each side.
    let client_seconds = load.seconds + 2;
    let mut client = Running::spawn(
        &mut iperf3_client(world, &args, client_seconds, load),
        &doing,
    )?;
    let mut tasks = vec![client.pid(), server];
    tasks.extend(host::ksoftirqd_pids()?);
    let window = measure_window(
        server,
        &tasks,
        Duration::from_secs(u64::from(load.seconds)),
        || client.finished(),
        interrupt,
    )
    .with_context(|| doing.clone())?;
    let Captured {
        status,
        stdout,
        stderr,
    } = client.wait(
        Duration::from_secs(u64::from(client_seconds) + 30),
        interrupt,
    )?;
    let report = iperf3_report(&doing, status, &stdout, &stderr)?;
    let Window {
        busy,
        tasks_ns,
        delivered,
        seconds,
    } = window;
    if delivered == 0 {
        bail!("{doing}: no UDP datagrams reached the server during the window");
    }
    let (client_received, _, client_seconds) = udp_received(&report)?;
    Ok(Measured {
        metrics: metrics(&[
            (
                "ns_per_packet",
                busy.not_idle_ns(seconds) / delivered as f64,
            ),
            ("task_ns_per_packet", tasks_ns as f64 / delivered as f64),
        ]),
        details: json!({
            "offered_pps": load.cpu_pps,
            "delivered_packets": delivered,
            "window_seconds": seconds,
            "delivered_pps": delivered as f64 / seconds,
            "busy_ns": busy.not_idle_ns(seconds),
            "tick_busy_ns": busy.busy_ns(),
            "cpu_ns": busy.as_json(),
            "tasks_ns": tasks_ns,
            "client_received_pps": client_received / client_seconds,
        }),
    })
}

/// What the machine and the bench's tasks spent, and the server's namespace delivered, in
/// one window.
struct Window {
    busy: CpuTimes,
    tasks_ns: u64,
    delivered: u64,
    seconds: f64,
}

/// Samples /proc/stat, the TASKS' run times and the server namespace's Udp InDatagrams
/// (through the iperf3 server's /proc/PID/net) at the window's two ends, while the client
/// runs.
fn measure_window(
    server: u32,
    tasks: &[u32],
    window: Duration,
    mut client_finished: impl FnMut() -> bool,
    interrupt: &Interrupt,
) -> anyhow::Result<Window> {
    let mut sleep = |duration: Duration| -> anyhow::Result<()> {
        let until = Instant::now() + duration;
        loop {
            interrupt.check()?;
            if client_finished() {
                bail!("the iperf3 client ended before the measurement window did");
            }
            let now = Instant::now();
            if now >= until {
                return Ok(());
            }
            std::thread::sleep(Duration::from_millis(20).min(until - now));
        }
    };
    let sample = || -> anyhow::Result<(CpuTimes, u64, u64, Instant)> {
        let mut tasks_ns = 0;
        for pid in tasks {
            tasks_ns += host::task_runtime_ns(*pid)?;
        }
        Ok((
            CpuTimes::read()?,
            tasks_ns,
            host::udp_in_datagrams(server)?,
            Instant::now(),
        ))
    };
    sleep(CPU_WINDOW_START)?;
    let (cpu_before, tasks_before, datagrams_before, started) = sample()?;
    sleep(window)?;
    let (cpu_after, tasks_after, datagrams_after, ended) = sample()?;
    Ok(Window {
        busy: cpu_after.since(&cpu_before),
        tasks_ns: tasks_after.saturating_sub(tasks_before),
        delivered: datagrams_after.saturating_sub(datagrams_before),
        seconds: ended.duration_since(started).as_secs_f64(),
    })
}

fn sockperf(
    world: &World,
    tcp: bool,
    load: &Load,
    interrupt: &Interrupt,
) -> anyhow::Result<Measured> {
    let port = if tcp {
        SOCKPERF_TCP_PORT
    } else {
        SOCKPERF_UDP_PORT
    };
    let doing = format!(
        "running sockperf ping-pong {} in {}",
        if tcp { "TCP" } else { "UDP" },
        world.config.name()
    );
    let server = world.server_ip.to_string();
    let mut client = on_cpu(&world.client_netns, load.placement.client_cpu, "sockperf");
    client.args([
        "ping-pong",
        "-i",
        &server,
        "-p",
        &port.to_string(),
        "-m",
        &UDP_PAYLOAD.to_string(),
        "-t",
        &load.seconds.to_string(),
        "--full-rtt",
    ]);
    if tcp {
        client.arg("--tcp");
    }
    let timeout = Duration::from_secs(u64::from(load.seconds) + 30);
    let captured = run_captured(&mut client, &doing, timeout, interrupt)?;
    let printed = format!("{}\n{}", captured.stdout, captured.stderr);
    if !captured.status.success() {
        bail!(
            "{doing}: sockperf failed ({}): {}",
            captured.status,
            printed.trim()
        );
    }
    let result = parse_sockperf(&printed)
        .with_context(|| format!("{doing}: unexpected sockperf output: {}", printed.trim()))?;
    Ok(Measured {
        metrics: metrics(&[
            ("k_round_trips_per_s", result.round_trips_per_s / 1e3),
            ("p50_rtt_us", result.p50_us),
            ("p99_rtt_us", result.p99_us),
        ]),
        details: json!({
            "valid_seconds": result.seconds,
            "round_trips": result.round_trips,
            "round_trips_per_s": result.round_trips_per_s,
            "dropped_messages": result.dropped,
            "message_bytes": UDP_PAYLOAD,
        }),
    })
}

#[derive(Debug, PartialEq)]
pub struct SockperfResult {
    pub seconds: f64,
    pub round_trips: f64,
    pub round_trips_per_s: f64,
    pub p50_us: f64,
    pub p99_us: f64,
    /// Replies that never came (UDP); each one stalls the ping-pong.
    pub dropped: Option<f64>,
}

/// Reads sockperf's summary: the `[Valid Duration]` line (warm-up excluded) and the
/// percentile lines, which with --full-rtt are round-trip times in µs.
pub fn parse_sockperf(printed: &str) -> anyhow::Result<SockperfResult> {
    let field = |line: &str, name: &str| -> Option<f64> {
        let start = line.find(&format!("{name}="))? + name.len() + 1;
        let value: String = line[start..]
            .chars()
            .take_while(|c| c.is_ascii_digit() || *c == '.')
            .collect();
        value.parse().ok()
    };
    let mut valid = None;
    let mut dropped = None;
    let mut percentiles = BTreeMap::new();
    for line in printed.lines() {
        if let Some(rest) = line.split("# dropped messages = ").nth(1) {
            dropped = rest
                .split(';')
                .next()
                .and_then(|count| count.trim().parse().ok());
        }
        if line.contains("[Valid Duration]") {
            valid = Some((
                field(line, "RunTime").context("no RunTime in [Valid Duration]")?,
                field(line, "ReceivedMessages")
                    .context("no ReceivedMessages in [Valid Duration]")?,
            ));
        } else if let Some(rest) = line.split("---> percentile ").nth(1)
            && let Some((name, value)) = rest.split_once('=')
        {
            percentiles.insert(name.trim().to_owned(), value.trim().parse::<f64>()?);
        }
    }
    let (seconds, round_trips) = valid.context("no [Valid Duration] line")?;
    if seconds <= 0.0 || round_trips <= 0.0 {
        bail!("sockperf measured no round trips ({round_trips} in {seconds} s)");
    }
    let percentile = |name: &str| {
        percentiles
            .get(name)
            .copied()
            .with_context(|| format!("no percentile {name}"))
    };
    Ok(SockperfResult {
        seconds,
        round_trips,
        round_trips_per_s: round_trips / seconds,
        p50_us: percentile("50.000")?,
        p99_us: percentile("99.000")?,
        dropped,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_sockperf_summary() {
        let printed = "sockperf: == version #3.7-no.git ==\n\
            sockperf: [Total Run] RunTime=2.001 sec; Warm up time=400 msec; SentMessages=104969; ReceivedMessages=104968\n\
            sockperf: ========= Printing statistics for Server No: 0\n\
            sockperf: [Valid Duration] RunTime=1.550 sec; SentMessages=79956; ReceivedMessages=79956\n\
            sockperf: # dropped messages = 2; # duplicated messages = 0; # out-of-order messages = 0\n\
            sockperf: \x1b[2;35m====> avg-latency=19.356 (std-dev=77.124)\x1b[0m\n\
            sockperf: ---> <MAX> observation = 5372.564\n\
            sockperf: ---> percentile 99.999 = 5131.588\n\
            sockperf: ---> percentile 99.000 =   30.924\n\
            sockperf: ---> percentile 90.000 =   19.698\n\
            sockperf: ---> percentile 50.000 =   16.314\n\
            sockperf: ---> <MIN> observation =   15.482\n";
        let result = parse_sockperf(printed).unwrap();
        assert_eq!(result.seconds, 1.55);
        assert_eq!(result.round_trips, 79956.0);
        assert_eq!(result.p50_us, 16.314);
        assert_eq!(result.p99_us, 30.924);
        assert_eq!(result.dropped, Some(2.0));
        assert!((result.round_trips_per_s - 51584.5).abs() < 1.0);
        assert!(parse_sockperf("sockperf: error").is_err());
    }

    #[test]
    fn reads_udp_received_from_iperf3() {
        let report = json!({"end": {
            "sum_sent": {"packets": 215000, "seconds": 3.0},
            "sum_received": {"packets": 214995, "lost_packets": 73897, "seconds": 3.0}
        }});
        let (received, sent, seconds) = udp_received(&report).unwrap();
        assert_eq!((received, sent, seconds), (141098.0, 215000.0, 3.0));
    }

    #[test]
    fn workload_ids_round_trip() {
        for workload in Workload::ALL {
            assert_eq!(Workload::from_id(workload.id()), Some(workload));
        }
    }
}
