//! Issue 10's rule-case table, proven with real traffic (run as root). Each case builds its
//! own lab with an uplink, serves the published ports on the kernel path with a Docker-like
//! DNAT, installs its rules and runs four probes twice: on the plain kernel path, then with
//! xbr attached and both ports published. With xbr every probe must be delivered exactly as
//! without it; the classes the rules cannot touch take the fast path (`redirected` or `nat_in`
//! grows), the ones they can touch are held (`held_by_policy` grows), and `xbr status --json`
//! names the rule that holds each of them.
//!
//! The probes: P1 UDP a -> c:7000 and P2 UDP a -> c:7001 (datagrams counted at c), P3 TCP
//! outside -> 10.78.0.1:8000 (published to b:8000) and P4 TCP outside -> 10.78.0.1:8080
//! (published to c:80), each connection an echo exchange. A last case adds and removes a
//! rule under `xbr attach --follow`, and measures how long the follower takes to apply it.

use std::{
    io::{ErrorKind, Write as _},
    net::{Ipv4Addr, SocketAddr, UdpSocket},
    process::{Command, Stdio},
    sync::{
        Arc,
        atomic::{AtomicBool, Ordering},
    },
    time::{Duration, Instant},
};

use rstest::rstest;
use serde_json::Value;
use xbr::{lab::LabSpec, netns::NetNs};
use xbr_tests::{
    lab_support::LabBuilder,
    traffic::{EchoServer, exchange, tcp_echo_server},
    witness::{Follower, PinRoot, force_receive_buffer, wait_for, xbr_binary},
};

const HOST: Ipv4Addr = Ipv4Addr::new(10, 78, 0, 1);
const CONTAINER_A: Ipv4Addr = Ipv4Addr::new(10, 77, 0, 2);
const CONTAINER_B: Ipv4Addr = Ipv4Addr::new(10, 77, 0, 3);
const CONTAINER_C: Ipv4Addr = Ipv4Addr::new(10, 77, 0, 4);

/// Docker's `-p 8000:8000` and `-p 8080:80` as its nat table does them: the kernel path
/// serves the published ports too, so there is a path to compare with.
const DOCKER_LIKE_DNAT: &str = "table ip nat {
  chain prerouting {
    type nat hook prerouting priority dstnat; policy accept;
    ip daddr 10.78.0.1 tcp dport 8000 dnat to 10.77.0.3:8000
    ip daddr 10.78.0.1 tcp dport 8080 dnat to 10.77.0.4:80
  }
}
";
const PUBLISHED: [&str; 2] = ["8000:10.77.0.3:8000", "8080:10.77.0.4:80"];

/// An xbr PATH without nft (nor anything else): the policy reader cannot run it.
const PATH_WITHOUT_NFT: &str = "/nonexistent/xbr-policy-test";

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Probe {
    P1,
    P2,
    P3,
    P4,
}

impl Probe {
    const ALL: [Probe; 4] = [Probe::P1, Probe::P2, Probe::P3, Probe::P4];

    fn what(self) -> &'static str {
        match self {
            Probe::P1 => "P1 UDP a -> c:7000",
            Probe::P2 => "P2 UDP a -> c:7001",
            Probe::P3 => "P3 TCP outside -> 10.78.0.1:8000 (b:8000)",
            Probe::P4 => "P4 TCP outside -> 10.78.0.1:8080 (c:80)",
        }
    }

    fn east_west(self) -> bool {
        matches!(self, Probe::P1 | Probe::P2)
    }

    fn udp_port(self) -> u16 {
        match self {
            Probe::P1 => 7000,
            Probe::P2 => 7001,
            _ => unreachable!("{self:?} is not a UDP probe"),
        }
    }

    fn host_port(self) -> u16 {
        match self {
            Probe::P3 => 8000,
            Probe::P4 => 8080,
            _ => unreachable!("{self:?} is not a published-port probe"),
        }
    }

    /// The published port's spec as `xbr status` prints it.
    fn published_spec(self) -> &'static str {
        match self {
            Probe::P3 => "8000:10.77.0.3:8000/tcp",
            Probe::P4 => "8080:10.77.0.4:80/tcp",
            _ => unreachable!("{self:?} is not a published-port probe"),
        }
    }
}

/// What a probe got through.
#[derive(Clone, Debug, PartialEq, Eq)]
enum Delivery {
    /// Datagrams that reached the container, of those sent.
    Datagrams { received: usize, sent: usize },
    /// Connections whose bytes came back whole, and how the others failed.
    Connections {
        echoed: usize,
        failed: Vec<ErrorKind>,
    },
}

impl Delivery {
    fn delivered_all(&self) -> bool {
        match self {
            Delivery::Datagrams { received, sent } => received == sent,
            Delivery::Connections { failed, .. } => failed.is_empty(),
        }
    }

    fn delivered_none(&self) -> bool {
        match self {
            Delivery::Datagrams { received, .. } => *received == 0,
            Delivery::Connections { echoed, .. } => *echoed == 0,
        }
    }
}

impl std::fmt::Display for Delivery {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Delivery::Datagrams { received, sent } => write!(f, "{received}/{sent} datagrams"),
            Delivery::Connections { echoed, failed } => {
                let tried = echoed + failed.len();
                write!(f, "{echoed}/{tried} connections")?;
                if let Some(kind) = failed.first() {
                    write!(f, " (failed: {kind:?})")?;
                }
                Ok(())
            }
        }
    }
}

/// The path xbr must give a probe's packets.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Path {
    /// The fast path: `redirected` (east-west) or `nat_in` (published) counts every packet.
    Fast,
    /// Held back by the policy: `held_by_policy` counts it, the fast path never does.
    Held,
    /// Never the fast path, whatever the verdict (east-west with no endpoints at all).
    NotFast,
}

/// The datapath's verdict counters that tell the paths apart.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
struct Verdicts {
    redirected: u64,
    held_by_policy: u64,
    nat_in: u64,
}

impl std::ops::Sub for Verdicts {
    type Output = Verdicts;
    fn sub(self, before: Verdicts) -> Verdicts {
        Verdicts {
            redirected: self.redirected - before.redirected,
            held_by_policy: self.held_by_policy - before.held_by_policy,
            nat_in: self.nat_in - before.nat_in,
        }
    }
}

impl std::fmt::Display for Verdicts {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "redirected +{} held_by_policy +{} nat_in +{}",
            self.redirected, self.held_by_policy, self.nat_in
        )
    }
}

// ---------------------------------------------------------------------------------------------
// The lab's servers and probes.

/// A UDP socket in a container that keeps what it receives until asked.
struct UdpSink {
    socket: UdpSocket,
    received: Vec<String>,
}

impl UdpSink {
    fn bind(ns: &NetNs, address: Ipv4Addr, port: u16) -> UdpSink {
        let socket = ns
            .run(|| UdpSocket::bind((address, port)))
            .expect("enter the container")
            .unwrap_or_else(|e| panic!("bind UDP {address}:{port}: {e}"));
        socket.set_nonblocking(true).unwrap();
        force_receive_buffer(&socket);
        UdpSink {
            socket,
            received: Vec::new(),
        }
    }

    /// Takes what has arrived.
    fn drain(&mut self) {
        let mut buffer = [0u8; 2048];
        while let Ok(n) = self.socket.recv(&mut buffer) {
            self.received
                .push(String::from_utf8_lossy(&buffer[..n]).into_owned());
        }
    }

    /// Datagrams received whose payload starts with `tag` and a space.
    fn count(&self, tag: &str) -> usize {
        self.received
            .iter()
            .filter(|payload| {
                payload
                    .strip_prefix(tag)
                    .is_some_and(|rest| rest.starts_with(' '))
            })
            .count()
    }
}

/// A lab with an uplink, the Docker-like DNAT, and servers behind every probe.
struct World {
    host: String,
    a: NetNs,
    outside: NetNs,
    sinks: [UdpSink; 2],
    _servers: [EchoServer; 2],
}

impl World {
    fn new(spec: &LabSpec) -> World {
        let host = spec.host_netns();
        nft(&host, DOCKER_LIKE_DNAT);
        let ns = |name: &str| NetNs::open(&spec.container_netns(name)).unwrap();
        let (a, b, c) = (ns("a"), ns("b"), ns("c"));
        World {
            host,
            a,
            outside: NetNs::open(&spec.outside_netns().expect("the lab has an uplink")).unwrap(),
            sinks: [
                UdpSink::bind(&c, CONTAINER_C, 7000),
                UdpSink::bind(&c, CONTAINER_C, 7001),
            ],
            _servers: [
                tcp_echo_server(&b, CONTAINER_B, 8000),
                tcp_echo_server(&c, CONTAINER_C, 80),
            ],
        }
    }

    fn sink(&mut self, probe: Probe) -> &mut UdpSink {
        &mut self.sinks[usize::from(probe == Probe::P2)]
    }

    fn probe(&mut self, probe: Probe, phase: &str, size: Size) -> Delivery {
        if probe.east_west() {
            self.datagrams(probe, phase, size.datagrams)
        } else {
            self.connections(probe, size.connections)
        }
    }

    /// `count` datagrams a -> c, a millisecond apart; how many reached c.
    fn datagrams(&mut self, probe: Probe, phase: &str, count: usize) -> Delivery {
        let tag = format!("{phase}-{probe:?}");
        let port = probe.udp_port();
        let sender = self
            .a
            .run(|| UdpSocket::bind((CONTAINER_A, 0)))
            .unwrap()
            .expect("bind the UDP sender");
        for i in 0..count {
            sender
                .send_to(format!("{tag} {i}").as_bytes(), (CONTAINER_C, port))
                .expect("send a datagram");
            std::thread::sleep(Duration::from_millis(1));
        }
        self.await_datagrams(probe, &tag, count)
    }

    /// Waits until `count` datagrams tagged `tag` arrived, or until none has arrived for half
    /// a second (and a second has passed): what a dropped probe looks like.
    fn await_datagrams(&mut self, probe: Probe, tag: &str, count: usize) -> Delivery {
        let sink = self.sink(probe);
        let started = Instant::now();
        let mut last_change = (0, Instant::now());
        loop {
            sink.drain();
            let received = sink.count(tag);
            if received != last_change.0 {
                last_change = (received, Instant::now());
            }
            let quiet = started.elapsed() > Duration::from_secs(1)
                && last_change.1.elapsed() > Duration::from_millis(500);
            if received >= count || quiet || started.elapsed() > Duration::from_secs(10) {
                return Delivery::Datagrams {
                    received,
                    sent: count,
                };
            }
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    /// `count` echo connections from outside to the published port, one after another.
    fn connections(&self, probe: Probe, count: usize) -> Delivery {
        let to = SocketAddr::from((HOST, probe.host_port()));
        let mut echoed = 0;
        let mut failed = Vec::new();
        for _ in 0..count {
            match exchange(&self.outside, to, 1000) {
                Ok(()) => echoed += 1,
                Err(e) => failed.push(e.kind()),
            }
        }
        Delivery::Connections { echoed, failed }
    }
}

/// How many datagrams and connections each probe makes.
#[derive(Clone, Copy, Debug)]
struct Size {
    datagrams: usize,
    connections: usize,
}

const USUAL: Size = Size {
    datagrams: 20,
    connections: 3,
};

/// Runs `nft -f -` with `script` in `netns` (entered with nsenter: `ip netns exec` remounts
/// /sys); panics when nft fails.
fn nft(netns: &str, script: &str) -> String {
    let (ok, stdout, stderr) = run_in(netns, &["nft", "-f", "-"], Some(script));
    assert!(ok, "nft -f in {netns} failed: {stderr}\n{script}");
    stdout
}

/// Runs `command` in `netns`; (success, stdout, stderr).
fn run_in(netns: &str, command: &[&str], stdin: Option<&str>) -> (bool, String, String) {
    let mut child = Command::new("nsenter")
        .arg(format!("--net=/run/netns/{netns}"))
        .args(command)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap_or_else(|e| panic!("cannot run {}: {e}", command.join(" ")));
    if let Some(text) = stdin {
        child
            .stdin
            .take()
            .unwrap()
            .write_all(text.as_bytes())
            .unwrap();
    }
    drop(child.stdin.take());
    let output = child.wait_with_output().expect("wait for the command");
    (
        output.status.success(),
        String::from_utf8_lossy(&output.stdout).into_owned(),
        String::from_utf8_lossy(&output.stderr).into_owned(),
    )
}

// ---------------------------------------------------------------------------------------------
// xbr, driven as a user drives it.

/// `xbr -n HOST --pin-root ROOT ...`, with PATH replaced where the case says so.
struct Xbr<'a> {
    pins: &'a PinRoot,
    path: Option<&'a str>,
}

impl Xbr<'_> {
    fn run(&self, args: &[&str]) -> (i32, String, String) {
        let mut command = Command::new(xbr_binary());
        command.args(self.pins.args(args));
        if let Some(path) = self.path {
            command.env("PATH", path);
        }
        let output = command.output().expect("run xbr");
        (
            output.status.code().unwrap_or(-1),
            String::from_utf8_lossy(&output.stdout).into_owned(),
            String::from_utf8_lossy(&output.stderr).into_owned(),
        )
    }

    fn ok(&self, args: &[&str]) -> String {
        let (code, stdout, stderr) = self.run(args);
        assert_eq!(code, 0, "`xbr {}` failed: {stderr}", args.join(" "));
        stdout
    }

    fn attach_and_publish(&self) {
        self.ok(&["attach", "br0", "--uplink", "uplink0", "--docker", "off"]);
        for spec in PUBLISHED {
            self.ok(&["publish", "br0", spec]);
        }
    }

    /// The bridge's entry in `xbr status --json`.
    fn status(&self) -> Value {
        let status: Value =
            serde_json::from_str(&self.ok(&["status", "--json"])).expect("status --json");
        status["bridges"][0].clone()
    }

    fn verdicts(&self) -> Verdicts {
        let stats: Value =
            serde_json::from_str(&self.ok(&["stats", "--json"])).expect("stats --json");
        let verdicts = &stats["verdicts"][0];
        let count = |name: &str| verdicts[name].as_u64().unwrap_or(0);
        Verdicts {
            redirected: count("redirected"),
            held_by_policy: count("held_by_policy"),
            nat_in: count("nat_in"),
        }
    }
}

/// Whether an `east_west_held` pattern (`udp 10.77.0.2:* -> 10.77.0.4:7000`) covers `probe`'s
/// datagrams.
fn pattern_covers(pattern: &str, probe: Probe) -> bool {
    let Some((protocol, ends)) = pattern.split_once(' ') else {
        return false;
    };
    let Some((source, destination)) = ends.split_once(" -> ") else {
        return false;
    };
    let end = |end: &str| {
        end.rsplit_once(':')
            .map(|(a, p)| (a.to_owned(), p.to_owned()))
    };
    let (Some((source, source_port)), Some((destination, destination_port))) =
        (end(source), end(destination))
    else {
        return false;
    };
    let is = |field: &str, value: &str| field == "*" || field == value;
    ["udp", "ipv4", "ip"].contains(&protocol)
        && is(&source, &CONTAINER_A.to_string())
        && source_port == "*"
        && is(&destination, &CONTAINER_C.to_string())
        && is(&destination_port, &probe.udp_port().to_string())
}

/// Why `xbr status` says `probe` is not accelerated; `None` when it does not say so.
fn held_reason(bridge: &Value, probe: Probe) -> Option<String> {
    let policy = &bridge["policy"];
    if probe.east_west() {
        if let Some(off) = policy["east_west"].as_str() {
            return Some(off.to_owned());
        }
        return policy["east_west_held"]
            .as_array()?
            .iter()
            .find(|held| {
                held["packets"]
                    .as_str()
                    .is_some_and(|p| pattern_covers(p, probe))
            })
            .map(|held| held["reason"].as_str().unwrap_or_default().to_owned());
    }
    let published = bridge["published"]
        .as_array()?
        .iter()
        .find(|p| p["spec"] == probe.published_spec())?;
    if published["held"] != true && published["clients_held"] != true {
        return None;
    }
    let reasons: Vec<&str> = published["not_accelerated"]
        .as_array()?
        .iter()
        .filter_map(|n| n["reason"].as_str())
        .collect();
    Some(reasons.join("; "))
}

// ---------------------------------------------------------------------------------------------
// The case table.

/// What a case installs in the host namespace.
#[derive(Clone, Copy, Debug)]
enum Rules {
    None,
    Nft(&'static str),
    /// `iptables-legacy` commands (arguments after the tool's name).
    IptablesLegacy(&'static [&'static [&'static str]]),
}

#[derive(Clone, Copy, Debug)]
struct Case {
    rules: Rules,
    /// Per probe (P1..P4): whether the kernel path delivers it, and the path xbr must give it.
    expect: [(bool, Path); 4],
    /// Per probe: what `xbr status` must say (each a substring) of a class the case holds.
    named: [&'static [&'static str]; 4],
    /// Run every xbr command with a PATH that has no nft.
    without_nft: bool,
    size: Size,
    /// A counter-only rule's chain (`family table chain`): it counts the kernel path's P1
    /// datagrams, and nothing while xbr carries them.
    counting: Option<&'static str>,
}

const DELIVERED_FAST: (bool, Path) = (true, Path::Fast);
const DELIVERED_HELD: (bool, Path) = (true, Path::Held);
const DROPPED_HELD: (bool, Path) = (false, Path::Held);
/// Nothing to name: a class the case does not hold.
const UNNAMED: &[&str] = &[];

const BRIDGE_FORWARD_DROP: Case = Case {
    rules: Rules::Nft(
        "table bridge lab_admin {
  chain forward {
    type filter hook forward priority 0; policy accept;
    ip saddr 10.77.0.2 ip daddr 10.77.0.4 udp dport 7000 drop
  }
}
",
    ),
    expect: [DROPPED_HELD, DELIVERED_FAST, DELIVERED_FAST, DELIVERED_FAST],
    named: [
        &["`table bridge lab_admin` chain forward rule", "drop"],
        UNNAMED,
        UNNAMED,
        UNNAMED,
    ],
    without_nft: false,
    size: USUAL,
    counting: None,
};

const INET_FORWARD_DROP_OF_A_PUBLISHED_PORT: Case = Case {
    rules: Rules::Nft(
        "table inet lab_admin {
  chain forward {
    type filter hook forward priority 0; policy accept;
    ip daddr 10.77.0.3 tcp dport 8000 drop
  }
}
",
    ),
    expect: [DELIVERED_FAST, DELIVERED_FAST, DROPPED_HELD, DELIVERED_FAST],
    named: [
        UNNAMED,
        UNNAMED,
        &["`table inet lab_admin` chain forward rule", "drop"],
        UNNAMED,
    ],
    without_nft: false,
    size: USUAL,
    counting: None,
};

const IPTABLES_LEGACY_FORWARD_REJECT: Case = Case {
    rules: Rules::IptablesLegacy(&[&[
        "-w", "-A", "FORWARD", "-p", "udp", "--dport", "7000", "-j", "REJECT",
    ]]),
    expect: [DROPPED_HELD, DELIVERED_FAST, DELIVERED_FAST, DELIVERED_FAST],
    named: [
        &[
            "iptables-legacy `table ip filter` chain FORWARD rule",
            "--dport 7000 -j REJECT",
        ],
        UNNAMED,
        UNNAMED,
        UNNAMED,
    ],
    without_nft: false,
    size: USUAL,
    counting: None,
};

/// nft 1.0.6's JSON omits a netdev chain's device, so the reader cannot tell which port the
/// chain is on and applies it to every port: the udp/7000 hold covers all of them. P2 (another
/// port number) cannot be touched by the rule on any device.
const NETDEV_INGRESS_DROP: Case = Case {
    rules: Rules::Nft(
        "table netdev lab_port {
  chain ingress {
    type filter hook ingress device veth-a priority 0; policy accept;
    udp dport 7000 drop
  }
}
",
    ),
    expect: [DROPPED_HELD, DELIVERED_FAST, DELIVERED_FAST, DELIVERED_FAST],
    named: [
        &["`table netdev lab_port` chain ingress rule", "drop"],
        UNNAMED,
        UNNAMED,
        UNNAMED,
    ],
    without_nft: false,
    size: USUAL,
    counting: None,
};

const PREROUTING_MARK: Case = Case {
    rules: Rules::Nft(
        "table inet lab_mangle {
  chain prerouting {
    type filter hook prerouting priority mangle; policy accept;
    udp dport 7000 meta mark set 0x1
  }
}
",
    ),
    expect: [
        DELIVERED_HELD,
        DELIVERED_FAST,
        DELIVERED_FAST,
        DELIVERED_FAST,
    ],
    named: [
        &["`table inet lab_mangle` chain prerouting rule", "mark set"],
        UNNAMED,
        UNNAMED,
        UNNAMED,
    ],
    without_nft: false,
    size: USUAL,
    counting: None,
};

/// The documented decision: a rule that only counts holds nothing back, so its counter counts
/// only what still takes the kernel path.
const COUNTER_ONLY: Case = Case {
    rules: Rules::Nft(
        "table bridge lab_count {
  chain forward {
    type filter hook forward priority 0; policy accept;
    udp dport 7000 counter
  }
}
",
    ),
    expect: [DELIVERED_FAST; 4],
    named: [UNNAMED; 4],
    without_nft: false,
    size: USUAL,
    counting: Some("bridge lab_count forward"),
};

/// bridge-user/src/policy/testdata/firewalld-like.nft with the lab's bridge: the bridge's
/// zone lets its containers talk (br0 to br0), established and DNATed connections are
/// accepted, everything else forwarded is rejected. The mangle mark is on an interface this
/// lab does not have, as firewalld marks only a zone's own interfaces.
const FIREWALLD_LIKE_ZONES: Case = Case {
    rules: Rules::Nft(
        "table inet firewalld {
  chain filter_FORWARD {
    type filter hook forward priority filter + 10; policy accept;
    ct state { established, related } accept
    ct status dnat accept
    iifname \"lo\" accept
    ct state invalid drop
    ip6 daddr { ::/96, ::ffff:0.0.0.0/96, 2002::/24 } reject
    jump filter_FORWARD_POLICIES
    reject with icmpx admin-prohibited
  }
  chain filter_FORWARD_POLICIES {
    iifname \"br0\" oifname \"br0\" jump filter_FWD_trusted
    iifname \"br0\" accept
    reject with icmpx admin-prohibited
  }
  chain filter_FWD_trusted {
    counter
    accept
  }
  chain mangle_PREROUTING {
    type filter hook prerouting priority mangle + 10; policy accept;
    jump mangle_PREROUTING_POLICIES
  }
  chain mangle_PREROUTING_POLICIES {
    iifname \"eth0\" meta mark set 0x1
    return
  }
}
",
    ),
    expect: [DELIVERED_FAST; 4],
    named: [UNNAMED; 4],
    without_nft: false,
    size: USUAL,
    counting: None,
};

/// The reader runs `nft`; without it nothing may take the fast path, and status says why.
const UNREADABLE_RULESET: Case = Case {
    rules: Rules::None,
    expect: [
        (true, Path::NotFast),
        (true, Path::NotFast),
        DELIVERED_HELD,
        DELIVERED_HELD,
    ],
    named: [&["cannot be read", "nft is not installed"]; 4],
    without_nft: true,
    size: USUAL,
    counting: None,
};

/// The issue's own scenario with the lab's addresses (and the `;` nft needs before a `}` on
/// a rule's line): both rules at once, 50 datagrams and 5 connections (echo exchanges where
/// the issue sent HTTP requests).
const ISSUE_SCENARIO: Case = Case {
    rules: Rules::Nft(
        "table bridge admin { chain forward { type filter hook forward priority 0; policy accept;
    ip saddr 10.77.0.2 ip daddr 10.77.0.4 udp dport 7000 drop; }; }
table inet admin { chain forward { type filter hook forward priority 0; policy accept;
    ip daddr 10.77.0.3 tcp dport 8000 drop; }; }
",
    ),
    expect: [DROPPED_HELD, DELIVERED_FAST, DROPPED_HELD, DELIVERED_FAST],
    named: [
        &[
            "`table bridge admin` chain forward rule",
            "udp dport 7000 drop",
        ],
        UNNAMED,
        &[
            "`table inet admin` chain forward rule",
            "tcp dport 8000 drop",
        ],
        UNNAMED,
    ],
    without_nft: false,
    size: Size {
        datagrams: 50,
        connections: 5,
    },
    counting: None,
};

#[rstest]
#[case::bridge_forward_drop_between_two_containers(BRIDGE_FORWARD_DROP)]
#[case::inet_forward_drop_of_a_published_port(INET_FORWARD_DROP_OF_A_PUBLISHED_PORT)]
#[case::iptables_legacy_forward_reject(IPTABLES_LEGACY_FORWARD_REJECT)]
#[case::netdev_ingress_drop_on_a_container_port(NETDEV_INGRESS_DROP)]
#[case::prerouting_mark(PREROUTING_MARK)]
#[case::counter_only_rule(COUNTER_ONLY)]
#[case::firewalld_like_zones(FIREWALLD_LIKE_ZONES)]
#[case::unreadable_ruleset(UNREADABLE_RULESET)]
#[case::issue_scenario(ISSUE_SCENARIO)]
fn a_rule_case_delivers_as_the_kernel_path_and_accelerates_the_rest(#[case] case: Case) {
    let lab = LabBuilder::three_containers().with_uplink().up();
    let spec = lab.spec().clone();
    let mut world = World::new(&spec);
    let host = world.host.clone();
    match case.rules {
        Rules::None => {}
        Rules::Nft(script) => {
            nft(&host, script);
        }
        Rules::IptablesLegacy(commands) => {
            for args in commands {
                let mut command = vec!["iptables-legacy"];
                command.extend_from_slice(args);
                let (ok, _, stderr) = run_in(&host, &command, None);
                if !ok {
                    xbr_tests::skip::skip(
                        "a_rule_case_delivers_as_the_kernel_path_and_accelerates_the_rest",
                        &format!(
                            "iptables-legacy cannot make its rule here ({}): {}",
                            command.join(" "),
                            stderr.trim()
                        ),
                    );
                    return;
                }
            }
        }
    }

    // The kernel path alone: it must do what the case says, or the lab proves nothing.
    let kernel: Vec<Delivery> = Probe::ALL
        .iter()
        .map(|probe| world.probe(*probe, "kernel", case.size))
        .collect();
    for (probe, (delivery, (delivered, _))) in Probe::ALL.iter().zip(kernel.iter().zip(case.expect))
    {
        let as_expected = if delivered {
            delivery.delivered_all()
        } else {
            delivery.delivered_none()
        };
        assert!(
            as_expected,
            "without xbr, {} should be {}: {delivery}",
            probe.what(),
            if delivered { "delivered" } else { "dropped" }
        );
    }
    let counted_by_the_kernel = case.counting.map(|chain| rule_counter(&host, chain));

    let pins = PinRoot::new(&host);
    let xbr = Xbr {
        pins: &pins,
        path: case.without_nft.then_some(PATH_WITHOUT_NFT),
    };
    xbr.attach_and_publish();
    let status = xbr.status();
    let ruleset = status["policy"]["ruleset"].as_str().unwrap_or_default();
    if case.without_nft {
        assert!(
            ruleset.starts_with("unreadable") && ruleset.contains("nft is not installed"),
            "status should say the ruleset is unreadable and why: {status:#}"
        );
    } else {
        assert_eq!(ruleset, "read", "{status:#}");
    }
    assert_eq!(
        status["policy"]["applied"], true,
        "the datapath does what the plan says: {status:#}"
    );

    let mut failures = Vec::new();
    let mut table = Vec::new();
    for (((probe, kernel), (_, path)), named) in Probe::ALL
        .iter()
        .zip(&kernel)
        .zip(case.expect)
        .zip(case.named)
    {
        let before = xbr.verdicts();
        let with_xbr = world.probe(*probe, "xbr", case.size);
        let moved = xbr.verdicts() - before;
        table.push(format!(
            "  {:<42} without xbr {:<32} with xbr {:<32} {moved}",
            probe.what(),
            kernel.to_string(),
            with_xbr.to_string()
        ));
        if with_xbr != *kernel {
            failures.push(format!(
                "{}: delivered {with_xbr} with xbr, {kernel} without",
                probe.what()
            ));
        }
        let packets = match &with_xbr {
            Delivery::Datagrams { sent, .. } => *sent as u64,
            Delivery::Connections { echoed, failed } => (echoed + failed.len()) as u64,
        };
        let fast = if probe.east_west() {
            moved.redirected
        } else {
            moved.nat_in
        };
        let took_the_expected_path = match path {
            Path::Fast => fast >= packets && moved.held_by_policy == 0,
            Path::Held => moved.held_by_policy >= packets && fast == 0,
            Path::NotFast => fast == 0,
        };
        if !took_the_expected_path {
            failures.push(format!(
                "{}: expected the {path:?} path for {packets} packets or connections, counters: {moved}",
                probe.what()
            ));
        }
        if path != Path::Fast {
            let reason = held_reason(&status, *probe);
            table.push(format!(
                "    status: {}",
                reason.as_deref().unwrap_or("(not named)")
            ));
            match reason {
                Some(reason) if named.iter().all(|part| reason.contains(part)) => {}
                Some(reason) => failures.push(format!(
                    "{}: status holds it for another reason than {named:?}: {reason}",
                    probe.what(),
                )),
                None if path == Path::Held => failures.push(format!(
                    "{}: status does not say it is held back",
                    probe.what()
                )),
                None => {}
            }
        }
    }
    eprintln!("{} (ruleset {ruleset}):\n{}", spec.name, table.join("\n"));

    if let (Some(chain), Some(before)) = (case.counting, counted_by_the_kernel) {
        let after = rule_counter(&host, chain);
        eprintln!(
            "  counter-only rule: {before} packets after the kernel path's probes, {after} after xbr's"
        );
        assert!(
            before >= case.size.datagrams as u64,
            "the rule counted the kernel path's P1 ({before})"
        );
        if after != before {
            failures.push(format!(
                "the counter-only rule counted {} packets while xbr carried the traffic",
                after - before
            ));
        }
    }
    assert!(
        failures.is_empty(),
        "{}\nxbr status --json: {:#}\nxbr stats: {}",
        failures.join("\n"),
        xbr.status(),
        xbr.ok(&["stats"])
    );
}

/// Packets counted by the counter of chain `family table chain`.
fn rule_counter(netns: &str, chain: &str) -> u64 {
    let mut command = vec!["nft", "-j", "list", "chain"];
    command.extend(chain.split(' '));
    let (ok, listing, stderr) = run_in(netns, &command, None);
    assert!(ok, "nft list chain {chain}: {stderr}");
    let json: Value = serde_json::from_str(&listing).expect("nft -j prints JSON");
    json["nftables"]
        .as_array()
        .expect("an nftables array")
        .iter()
        .filter_map(|item| item["rule"]["expr"].as_array())
        .flatten()
        .find_map(|e| e["counter"]["packets"].as_u64())
        .expect("the rule has a counter")
}

// ---------------------------------------------------------------------------------------------
// A rule added and removed while a follower runs.

/// Numbered datagrams a -> c:7000 every 2 ms, each send's time remembered.
struct NumberedStream {
    stop: Arc<AtomicBool>,
    sender: Option<std::thread::JoinHandle<Vec<Instant>>>,
}

impl NumberedStream {
    const TAG: &'static str = "stream";

    fn start(a: &NetNs) -> NumberedStream {
        let socket = a
            .run(|| UdpSocket::bind((CONTAINER_A, 0)))
            .unwrap()
            .expect("bind the stream's sender");
        let stop = Arc::new(AtomicBool::new(false));
        let stopped = stop.clone();
        let sender = std::thread::spawn(move || {
            let mut sent_at = Vec::new();
            while !stopped.load(Ordering::Relaxed) {
                let payload = format!("{} {}", NumberedStream::TAG, sent_at.len());
                sent_at.push(Instant::now());
                socket
                    .send_to(payload.as_bytes(), (CONTAINER_C, 7000))
                    .expect("send a datagram");
                std::thread::sleep(Duration::from_millis(2));
            }
            sent_at
        });
        NumberedStream {
            stop,
            sender: Some(sender),
        }
    }

    /// Stops sending; when each datagram was sent.
    fn finish(mut self) -> Vec<Instant> {
        self.stop.store(true, Ordering::Relaxed);
        self.sender
            .take()
            .unwrap()
            .join()
            .expect("the stream's sender")
    }
}

impl Drop for NumberedStream {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(sender) = self.sender.take() {
            let _ = sender.join();
        }
    }
}

/// The sequence numbers of the stream's datagrams that reached c.
fn stream_received(sink: &UdpSink) -> Vec<usize> {
    let prefix = format!("{} ", NumberedStream::TAG);
    sink.received
        .iter()
        .filter_map(|payload| payload.strip_prefix(&prefix)?.parse().ok())
        .collect()
}

/// `nft add rule bridge lab_follow forward udp dport 7000 drop` in `netns`; the rule's handle.
fn add_follow_rule(netns: &str) -> String {
    let (ok, stdout, stderr) = run_in(
        netns,
        &[
            "nft",
            "--echo",
            "--handle",
            "add",
            "rule",
            "bridge",
            "lab_follow",
            "forward",
            "udp",
            "dport",
            "7000",
            "drop",
        ],
        None,
    );
    assert!(ok, "nft add rule: {stderr}");
    stdout
        .rsplit_once("# handle ")
        .map(|(_, handle)| handle.trim().to_owned())
        .unwrap_or_else(|| panic!("nft --echo --handle printed no handle: {stdout}"))
}

fn delete_follow_rule(netns: &str, handle: &str) {
    let (ok, _, stderr) = run_in(
        netns,
        &[
            "nft",
            "delete",
            "rule",
            "bridge",
            "lab_follow",
            "forward",
            "handle",
            handle,
        ],
        None,
    );
    assert!(ok, "nft delete rule handle {handle}: {stderr}");
}

/// Waits until `xbr status` says the datapath applies the ruleset as it is now, with P1 held
/// (`held`) or not; how long that took. Past `limit`, panics with the status and the
/// follower's log.
fn await_pickup(
    xbr: &Xbr,
    follower: &Follower,
    what: &str,
    held: bool,
    limit: Duration,
) -> Duration {
    let started = Instant::now();
    loop {
        let status = xbr.status();
        if status["policy"]["applied"] == true && held_reason(&status, Probe::P1).is_some() == held
        {
            return started.elapsed();
        }
        assert!(
            started.elapsed() < limit,
            "{what}: the follower did not apply the ruleset within {limit:?}\n\
             xbr status --json: {status:#}\nfollower log:\n{}",
            follower.log()
        );
        std::thread::sleep(Duration::from_millis(5));
    }
}

/// The issue asks that `--follow` pick a ruleset change up within a second; on this shared
/// machine each wait is bounded by `PICKUP_LIMIT` (well below the follower's 30 s resync, which
/// would mask a change the follower missed) and the time it took is printed. What is
/// asserted: every change is applied within that bound, once `xbr status` says a drop is
/// applied not one datagram it drops is delivered, and its removal gives P1 back to the fast
/// path. The rule comes and goes `CYCLES` times more, since a change can be missed on a race.
#[test]
fn a_rule_added_and_removed_under_a_follower_is_honoured_both_ways() {
    const PICKUP_LIMIT: Duration = Duration::from_secs(5);
    const CYCLES: usize = 10;
    let lab = LabBuilder::three_containers().with_uplink().up();
    let spec = lab.spec().clone();
    let mut world = World::new(&spec);
    let host = world.host.clone();
    nft(
        &host,
        "table bridge lab_follow {
  chain forward {
    type filter hook forward priority 0; policy accept;
  }
}
",
    );

    // The kernel path: P1 delivered, dropped while the rule exists, delivered again.
    let kernel_before = world.probe(Probe::P1, "kernel-before", USUAL);
    let handle = add_follow_rule(&host);
    let kernel_with = world.probe(Probe::P1, "kernel-with", USUAL);
    delete_follow_rule(&host, &handle);
    let kernel_after = world.probe(Probe::P1, "kernel-after", USUAL);
    assert!(kernel_before.delivered_all(), "{kernel_before}");
    assert!(
        kernel_with.delivered_none(),
        "the rule drops P1: {kernel_with}"
    );
    assert!(kernel_after.delivered_all(), "{kernel_after}");

    let pins = PinRoot::new(&host);
    let xbr = Xbr {
        pins: &pins,
        path: None,
    };
    xbr.attach_and_publish();
    let root = pins.arg();
    // The follower's own debug lines (not the eBPF programs' logging) say when it hears a
    // ruleset change: a failure message shows them.
    let follower = Follower::spawn(
        &[("RUST_LOG", "xbr=info,xbr::follow=debug")],
        &[
            "-n",
            &host,
            "--pin-root",
            root,
            "attach",
            "br0",
            "--follow",
            "--uplink",
            "uplink0",
            "--docker",
            "off",
        ],
        Duration::from_secs(10),
    );
    let probe = |world: &mut World, probe: Probe, phase: &str| {
        let before = xbr.verdicts();
        let delivery = world.probe(probe, phase, USUAL);
        (delivery, xbr.verdicts() - before)
    };

    let (before, moved) = probe(&mut world, Probe::P1, "xbr-before");
    eprintln!("P1 before the rule: {before}, {moved}");
    assert_eq!(before, kernel_before);
    assert!(
        moved.redirected >= 20 && moved.held_by_policy == 0,
        "P1 takes the fast path: {moved}"
    );

    // The rule goes in under a running stream.
    let stream = NumberedStream::start(&world.a);
    wait_for("the stream to reach c", PICKUP_LIMIT, || {
        world.sink(Probe::P1).drain();
        !stream_received(world.sink(Probe::P1)).is_empty()
    });
    let handle = add_follow_rule(&host);
    let added = Instant::now();
    let to_applied = await_pickup(&xbr, &follower, "the rule added", true, PICKUP_LIMIT);
    let applied = Instant::now();
    // Let the stream run on past the update, so that it shows the drop.
    while applied.elapsed() < Duration::from_millis(300) {
        world.sink(Probe::P1).drain();
        std::thread::sleep(Duration::from_millis(20));
    }
    let sent_at = stream.finish();
    let sink = world.sink(Probe::P1);
    let quiet = Instant::now();
    while quiet.elapsed() < Duration::from_millis(300) {
        sink.drain();
        std::thread::sleep(Duration::from_millis(20));
    }
    let received = stream_received(sink);
    let last_received = received
        .iter()
        .copied()
        .max()
        .expect("the stream reached c");
    let delivered_after = |at: Instant| received.iter().filter(|seq| sent_at[**seq] > at).count();
    let to_first_loss = sent_at
        .get(last_received + 1)
        .map(|first_lost| first_lost.saturating_duration_since(added));
    eprintln!(
        "rule added: applied (xbr status) after {to_applied:?}; first datagram lost {} after \
         `nft add rule` returned; the stream sent {} datagrams, {} of them after the rule, of \
         which {} were still delivered",
        to_first_loss.map_or("never".to_owned(), |d| format!("{d:?}")),
        sent_at.len(),
        sent_at.iter().filter(|at| **at > added).count(),
        delivered_after(added),
    );
    let status = xbr.status();
    let reason = held_reason(&status, Probe::P1).unwrap_or_default();
    assert!(
        reason.contains("`table bridge lab_follow` chain forward rule") && reason.contains("drop"),
        "status names the new rule for P1: {status:#}"
    );
    assert!(
        sent_at.iter().any(|at| *at > applied),
        "the stream ran on after the update"
    );
    assert_eq!(
        delivered_after(applied),
        0,
        "datagrams sent after status said the rule was applied were delivered past it: \
         {status:#}"
    );

    let (with_rule, moved) = probe(&mut world, Probe::P1, "xbr-with");
    eprintln!("P1 with the rule: {with_rule}, {moved}");
    assert_eq!(with_rule, kernel_with, "P1 is delivered as without xbr");
    assert!(
        moved.held_by_policy >= 20 && moved.redirected == 0,
        "P1 is held back: {moved}"
    );
    let (beside, moved) = probe(&mut world, Probe::P2, "xbr-with");
    eprintln!("P2 with the rule: {beside}, {moved}");
    assert!(beside.delivered_all(), "{beside}");
    assert!(
        moved.redirected >= 20 && moved.held_by_policy == 0,
        "P2, which the rule cannot touch, keeps the fast path: {moved}"
    );

    delete_follow_rule(&host, &handle);
    let to_released = await_pickup(&xbr, &follower, "the rule removed", false, PICKUP_LIMIT);
    eprintln!("rule removed: applied (xbr status) after {to_released:?}");
    let (after, moved) = probe(&mut world, Probe::P1, "xbr-after");
    eprintln!("P1 after the rule: {after}, {moved}");
    assert_eq!(after, kernel_after);
    assert!(
        moved.redirected >= 20 && moved.held_by_policy == 0,
        "P1 takes the fast path again: {moved}"
    );

    let mut pickups = Vec::new();
    for cycle in 1..=CYCLES {
        let handle = add_follow_rule(&host);
        let added = await_pickup(
            &xbr,
            &follower,
            &format!("cycle {cycle}: the rule added"),
            true,
            PICKUP_LIMIT,
        );
        delete_follow_rule(&host, &handle);
        let removed = await_pickup(
            &xbr,
            &follower,
            &format!("cycle {cycle}: the rule removed"),
            false,
            PICKUP_LIMIT,
        );
        eprintln!("cycle {cycle}: added applied after {added:?}, removed after {removed:?}");
        pickups.push(format!("{added:.0?}/{removed:.0?}"));
    }
    eprintln!(
        "{CYCLES} more cycles, added/removed applied after: {}",
        pickups.join(" ")
    );
}
