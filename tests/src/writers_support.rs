//! For the many-writers tests: labs of any number of containers, the checks that every port is
//! hooked exactly once (bpftool and tc as witnesses) and on the fast path (traffic, xbr's
//! counters and the bridge's nftables counter), hooks removed behind xbr's back the way an
//! admin would, and a seeded random source (XBR_TEST_SEED repeats a run).

use std::{
    collections::BTreeMap,
    net::Ipv4Addr,
    process::Command,
    time::{Duration, Instant},
};

use bridge_common::programs;
use xbr::{
    lab::{BridgeSpec, ContainerSpec, Ipv4Cidr, LabGuard, LabSpec, MacAddr},
    netns::NetNs,
};

use crate::{
    lab_support::unique_name,
    witness::{BridgeForwardCounter, PinRoot, tc_programs, tc_qdiscs, udp_echo},
};

/// A lab of `containers` containers c0, c1, ... (10.77.0.2/16 on, MACs 02:77:00:00:HI:LO)
/// on bridge br0 (10.77.0.1/16), under a unique name; torn down when the guard drops.
pub fn lab_of(containers: usize) -> LabGuard {
    let name = unique_name("w");
    let spec = LabSpec {
        name: name.clone(),
        bridge: BridgeSpec {
            name: "br0".to_owned(),
            address: Some(Ipv4Cidr::new(Ipv4Addr::new(10, 77, 0, 1), 16)),
        },
        containers: (0..containers)
            .map(|i| {
                let n = i + 2;
                ContainerSpec {
                    name: format!("c{i}"),
                    address: Ipv4Cidr::new(Ipv4Addr::new(10, 77, (n / 256) as u8, n as u8), 16),
                    mac: Some(MacAddr([0x02, 0x77, 0, 0, (n / 256) as u8, n as u8])),
                }
            })
            .collect(),
        uplink: None,
    };
    LabGuard::up(spec).unwrap_or_else(|error| panic!("lab {name} should come up: {error}"))
}

/// A container that sends traffic: its namespace, its bridge port, its address.
#[derive(Clone, Debug)]
pub struct Sender {
    pub netns: String,
    pub port: String,
    pub ip: Ipv4Addr,
}

/// The lab's containers as senders.
pub fn senders(spec: &LabSpec) -> Vec<Sender> {
    spec.containers
        .iter()
        .map(|c| Sender {
            netns: spec.container_netns(&c.name),
            port: LabSpec::port_name(&c.name),
            ip: c.address.addr,
        })
        .collect()
}

/// How many times xbr's port program runs on `port`'s ingress (tcx or cls_bpf).
pub fn xbr_hooks(netns: &str, port: &str) -> usize {
    tc_programs(netns, port)
        .iter()
        .filter(|name| *name == programs::PORT)
        .count()
}

/// Panics unless every one of `ports` runs xbr's program exactly once.
pub fn assert_hooked_once(netns: &str, ports: &[String], when: &str) {
    let wrong: Vec<(String, Vec<String>)> = ports
        .iter()
        .map(|port| (port.clone(), tc_programs(netns, port)))
        .filter(|(_, hooked)| hooked.iter().filter(|p| *p == programs::PORT).count() != 1)
        .collect();
    assert!(
        wrong.is_empty(),
        "{when}: ports not running xbr's program exactly once (port, programs): {wrong:?}"
    );
}

/// Panics unless none of `ports` has anything of xbr left: no program, no clsact qdisc.
pub fn assert_nothing_left(netns: &str, ports: &[String], when: &str) {
    for port in ports {
        let programs = tc_programs(netns, port);
        assert!(
            programs.is_empty(),
            "{when}: programs left on {port}: {programs:?}"
        );
        let qdiscs = tc_qdiscs(netns, port);
        assert!(
            !qdiscs.contains("clsact"),
            "{when}: a clsact qdisc left on {port}: {qdiscs}"
        );
    }
}

/// Fast-path packets per port, from `xbr stats --json`.
pub fn fast_path_packets(pins: &PinRoot) -> BTreeMap<String, u64> {
    let stats: serde_json::Value =
        serde_json::from_str(&pins.xbr_ok(&["stats", "br0", "--json"])).expect("stats --json");
    stats["endpoints"]
        .as_array()
        .into_iter()
        .flatten()
        .map(|e| {
            (
                e["port"].as_str().unwrap_or_default().to_owned(),
                e["fast_path_packets"].as_u64().unwrap_or_default(),
            )
        })
        .collect()
}

/// Every sender sends UDP to the next one (the last to the first) and gets its answers: each
/// sender's port must count at least that many frames on the fast path, and the bridge must
/// forward no unicast IPv4 meanwhile.
pub fn assert_fast_path(pins: &PinRoot, bridge: &BridgeForwardCounter, senders: &[Sender]) {
    const DATAGRAMS: usize = 20;
    assert!(senders.len() >= 2, "traffic needs two containers");
    let pairs: Vec<(&Sender, &Sender)> =
        senders.iter().zip(senders.iter().cycle().skip(1)).collect();
    let open = |s: &Sender| NetNs::open(&s.netns).expect("container namespace");
    // ARP first: it takes the bridge by design.
    for (from, to) in &pairs {
        assert_eq!(
            udp_echo(&open(from), &open(to), to.ip, 1),
            1,
            "{} -> {}: no answer",
            from.port,
            to.port
        );
    }
    let before_bridge = bridge.read();
    let before = fast_path_packets(pins);
    for (from, to) in &pairs {
        let answers = udp_echo(&open(from), &open(to), to.ip, DATAGRAMS);
        assert_eq!(
            answers, DATAGRAMS,
            "{} -> {}: lost datagrams",
            from.port, to.port
        );
    }
    let after = fast_path_packets(pins);
    let after_bridge = bridge.read();
    let slow: Vec<(&str, u64)> = senders
        .iter()
        .map(|s| {
            let grew = after.get(&s.port).copied().unwrap_or(0)
                - before.get(&s.port).copied().unwrap_or(0);
            (s.port.as_str(), grew)
        })
        .filter(|(_, grew)| *grew < DATAGRAMS as u64)
        .collect();
    assert!(
        slow.is_empty(),
        "ports whose frames did not take the fast path (port, fast-path frames of {DATAGRAMS}): {slow:?}"
    );
    assert_eq!(
        after_bridge.ipv4_unicast, before_bridge.ipv4_unicast,
        "unicast IPv4 crossed the bridge"
    );
}

/// The drift `xbr status --json` reports: (port, problem).
pub fn drift(pins: &PinRoot) -> Vec<(String, String)> {
    let status = pins.status();
    status["bridges"]
        .as_array()
        .into_iter()
        .flatten()
        .flat_map(|b| b["drift"].as_array().cloned().unwrap_or_default())
        .map(|d| {
            (
                d["port"].as_str().unwrap_or_default().to_owned(),
                d["problem"].as_str().unwrap_or_default().to_owned(),
            )
        })
        .collect()
}

/// Where br0's attachment is pinned, and the ifindex of each port, from `xbr status --json`.
pub fn pinned_dir_and_ports(pins: &PinRoot) -> (String, BTreeMap<String, u64>) {
    let status = pins.status();
    let bridge = &status["bridges"][0];
    let dir = bridge["pins"].as_str().expect("br0 is attached").to_owned();
    let ports = bridge["ports"]
        .as_array()
        .into_iter()
        .flatten()
        .map(|p| {
            (
                p["name"].as_str().unwrap_or_default().to_owned(),
                p["ifindex"].as_u64().unwrap_or_default(),
            )
        })
        .collect();
    (dir, ports)
}

/// How an admin takes xbr's hook off a port behind its back.
#[derive(Clone, Copy, Debug)]
pub enum Removal {
    /// `bpftool link detach pinned .../link_N`: the tcx link stays pinned but runs nothing.
    /// No netlink event tells of it.
    BpftoolLinkDetach,
    /// `rm .../link_N`: the pin goes, and with it the link.
    RemoveLinkPin,
    /// `tc filter del dev PORT ingress`: every filter on the port's ingress.
    TcFilterDel,
    /// `tc qdisc del dev PORT clsact`: the qdisc and its filters.
    TcQdiscDel,
}

pub fn remove_hook(pins: &PinRoot, port: &str, how: Removal) {
    let netns = &pins.netns;
    let run = |program: &str, args: &[&str]| {
        let output = Command::new("nsenter")
            .arg(format!("--net=/run/netns/{netns}"))
            .arg(program)
            .args(args)
            .output()
            .expect("run nsenter");
        assert!(
            output.status.success(),
            "{program} {}: {}",
            args.join(" "),
            String::from_utf8_lossy(&output.stderr)
        );
    };
    match how {
        Removal::BpftoolLinkDetach | Removal::RemoveLinkPin => {
            let (dir, ports) = pinned_dir_and_ports(pins);
            let pin = format!("{dir}/link_{}", ports[port]);
            match how {
                Removal::BpftoolLinkDetach => run("bpftool", &["link", "detach", "pinned", &pin]),
                _ => std::fs::remove_file(&pin).expect("remove the link pin"),
            }
        }
        Removal::TcFilterDel => run("tc", &["filter", "del", "dev", port, "ingress"]),
        Removal::TcQdiscDel => run("tc", &["qdisc", "del", "dev", port, "clsact"]),
    }
}

/// Waits up to `limit` until `port` runs xbr's program exactly once; returns how long it took.
pub fn wait_hooked_once(netns: &str, port: &str, limit: Duration) -> Duration {
    let started = Instant::now();
    loop {
        if xbr_hooks(netns, port) == 1 {
            return started.elapsed();
        }
        assert!(
            started.elapsed() < limit,
            "{port} was not hooked again within {limit:?}: {:?}",
            tc_programs(netns, port)
        );
        std::thread::sleep(Duration::from_millis(5));
    }
}

/// A small seeded random source (xorshift64*): tests print the seed, XBR_TEST_SEED repeats it.
pub struct Rng(u64);

impl Rng {
    pub fn seeded(test: &str) -> Rng {
        let seed = std::env::var("XBR_TEST_SEED")
            .ok()
            .and_then(|s| s.parse().ok())
            .unwrap_or_else(|| {
                std::time::SystemTime::now()
                    .duration_since(std::time::UNIX_EPOCH)
                    .unwrap()
                    .as_nanos() as u64
                    | 1
            });
        eprintln!("{test}: XBR_TEST_SEED={seed}");
        Rng(seed)
    }

    /// A source of its own for a thread, from a number another one drew.
    pub fn seeded_with(seed: u64) -> Rng {
        Rng(seed | 1)
    }

    pub fn draw(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }

    /// Uniform in `0..n`.
    pub fn below(&mut self, n: u64) -> u64 {
        self.draw() % n.max(1)
    }

    pub fn millis(&mut self, from: u64, to: u64) -> Duration {
        Duration::from_millis(from + self.below(to - from + 1))
    }
}
