//! Published ports under a flood (run as root). Spoofed TCP SYNs (and UDP datagrams) come from
//! a subnet inside the lab that nobody owns (10.79.0.0/16, routed to the outside namespace,
//! which drops what is sent there), many times more than xbr's transient table holds, while a
//! legitimate client keeps connecting: the port stays reachable during and after the flood,
//! with `xbr publish` alone and with a kernel DNAT rule behind the port; a connection
//! established before the flood keeps working through it; the flood's state is gone within
//! its documented lifetime, with and without a follower.

use std::ffi::OsStr;
use std::{
    io::{Read as _, Write as _},
    net::{Ipv4Addr, SocketAddr, SocketAddrV4, TcpStream, UdpSocket},
    process::Command,
    time::{Duration, Instant},
};

use xbr::{lab::LabGuard, netns::NetNs};
use xbr_tests::{
    docker_support::UdpEcho,
    flood::{Flood, FloodProto, FloodSpec, mac_of},
    lab_support::LabBuilder,
    traffic::{EchoServer, exchange, tcp_echo_server},
    witness::{Follower, PinRoot, scrape_metrics},
};

const HOST: Ipv4Addr = Ipv4Addr::new(10, 78, 0, 1);
const OUTSIDE: Ipv4Addr = Ipv4Addr::new(10, 78, 0, 2);
const CONTAINER_A: Ipv4Addr = Ipv4Addr::new(10, 77, 0, 2);
/// The flood's sources: a /16 routed to the outside namespace, where nobody has it.
const SPOOFED: Ipv4Addr = Ipv4Addr::new(10, 79, 0, 0);
/// Established connections the tests' attachments hold; the transient table holds half as
/// many (512), which the floods exceed many times.
const MAX_FLOWS: u64 = 1024;
const TRANSIENT_CAPACITY: u64 = MAX_FLOWS / 2;
/// Packets per flood, and their rate: 60 times the transient table, in 1.5 s. At this rate a
/// transient entry lasts about 25 ms before the flood replaces it, a hundred times a
/// handshake's round trip in the lab.
const FLOOD_PACKETS: u64 = 30_000;
const FLOOD_RATE: u64 = 20_000;

/// A lab with an uplink, xbr attached with small tables and port 8080 (TCP, and 5353 UDP)
/// published to container a, which runs an echo server.
struct FloodLab {
    _server: Option<EchoServer>,
    pins: PinRoot,
    outside: NetNs,
    a: NetNs,
    host: String,
    _lab: LabGuard,
}

impl FloodLab {
    fn new(kernel_dnat: bool) -> FloodLab {
        let lab = LabBuilder::three_containers().with_uplink().up();
        let spec = lab.spec().clone();
        let host = spec.host_netns();
        let outside = NetNs::open(&spec.outside_netns().unwrap()).unwrap();
        let a = NetNs::open(&spec.container_netns("a")).unwrap();
        // The host's replies to the spoofed sources (on the kernel path) go to the outside
        // namespace, which does not forward and drops them: nobody ever answers.
        run_in(
            &host,
            &["ip", "route", "add", "10.79.0.0/16", "via", "10.78.0.2"],
        );
        if kernel_dnat {
            for proto in ["tcp", "udp"] {
                let (port, to) = if proto == "tcp" {
                    ("8080", "10.77.0.2:80")
                } else {
                    ("5353", "10.77.0.2:53")
                };
                run_in(
                    &host,
                    &[
                        "iptables",
                        "-t",
                        "nat",
                        "-A",
                        "PREROUTING",
                        "-i",
                        "uplink0",
                        "-p",
                        proto,
                        "--dport",
                        port,
                        "-j",
                        "DNAT",
                        "--to-destination",
                        to,
                    ],
                );
            }
        }
        let pins = PinRoot::new(&host);
        let max_flows = MAX_FLOWS.to_string();
        pins.xbr_ok(&[
            "attach",
            "br0",
            "--uplink",
            "uplink0",
            "--max-flows",
            &max_flows,
        ]);
        pins.xbr_ok(&["publish", "br0", "8080:10.77.0.2:80"]);
        pins.xbr_ok(&["publish", "br0", "5353:10.77.0.2:53/udp"]);
        FloodLab {
            _server: Some(tcp_echo_server(&a, CONTAINER_A, 80)),
            pins,
            outside,
            a,
            host,
            _lab: lab,
        }
    }

    fn flood(&self, proto: FloodProto, packets: u64, rate: u64) -> Flood {
        let port = if proto == FloodProto::TcpSyn {
            8080
        } else {
            5353
        };
        Flood::start(FloodSpec {
            netns: self.outside.name().to_owned(),
            device: "eth0".to_owned(),
            dst_mac: mac_of(&self.host, "uplink0").unwrap(),
            dst: SocketAddrV4::new(HOST, port),
            sources: SPOOFED,
            proto,
            rate,
            count: Some(packets),
            seed: u64::from(std::process::id()),
        })
        .expect("the flood starts")
    }

    /// `xbr status --json`'s view of the connection tables.
    fn nat(&self) -> serde_json::Value {
        self.pins.status()["bridges"][0]["nat"].clone()
    }

    fn verdict(&self, name: &str) -> u64 {
        let stats: serde_json::Value =
            serde_json::from_str(&self.pins.xbr_ok(&["stats", "--json"])).unwrap();
        stats["verdicts"][0][name].as_u64().unwrap()
    }
}

fn run_in(netns: &str, command: &[&str]) {
    let output = Command::new("nsenter")
        .arg(format!("--net=/run/netns/{netns}"))
        .args(command)
        .output()
        .unwrap();
    assert!(
        output.status.success(),
        "{} in {netns}: {}",
        command.join(" "),
        String::from_utf8_lossy(&output.stderr)
    );
}

/// Connections made while `busy` holds, and how many failed (with the first error).
#[derive(Debug, Default)]
struct Tally {
    ok: u64,
    failed: u64,
    first_error: Option<String>,
}

impl Tally {
    fn add(&mut self, result: std::io::Result<()>) {
        match result {
            Ok(()) => self.ok += 1,
            Err(error) => {
                self.failed += 1;
                self.first_error.get_or_insert(error.to_string());
            }
        }
    }
}

/// A connection opened before the flood, kept open through it: each call sends a line and
/// reads its echo.
struct Held(TcpStream);

impl Held {
    fn open(lab: &FloodLab) -> Held {
        let to = SocketAddr::from((HOST, 8080));
        let stream = lab
            .outside
            .run(|| TcpStream::connect_timeout(&to, Duration::from_secs(2)))
            .unwrap()
            .expect("connect before the flood");
        stream
            .set_read_timeout(Some(Duration::from_secs(5)))
            .unwrap();
        let mut held = Held(stream);
        held.echo("before the flood");
        held
    }

    fn echo(&mut self, line: &str) {
        self.0.write_all(line.as_bytes()).unwrap();
        let mut back = vec![0u8; line.len()];
        self.0
            .read_exact(&mut back)
            .unwrap_or_else(|e| panic!("the connection held through the flood ({line}): {e}"));
        assert_eq!(back, line.as_bytes());
    }
}

fn syn_flood_leaves_the_port_reachable(kernel_dnat: bool) {
    let lab = FloodLab::new(kernel_dnat);
    let published = SocketAddr::from((HOST, 8080));
    let mut held = Held::open(&lab);
    assert_eq!(lab.nat()["established"], 1, "{}", lab.nat());

    let flood = lab.flood(FloodProto::TcpSyn, FLOOD_PACKETS, FLOOD_RATE);
    let started = Instant::now();
    let mut during = Tally::default();
    let mut restarted = false;
    while !flood.is_done() {
        during.add(exchange(&lab.outside, published, 100));
        if !restarted && started.elapsed() > Duration::from_millis(500) {
            // xbr runs again mid-flood (an upgrade, a restart): the pinned state carries on.
            lab.pins.xbr_ok(&["attach", "br0"]);
            held.echo("during the flood");
            restarted = true;
        }
    }
    let sent = flood.finish().unwrap();
    assert_eq!(sent, FLOOD_PACKETS);
    let mut after = Tally::default();
    for _ in 0..50 {
        after.add(exchange(&lab.outside, published, 100));
    }
    held.echo("after the flood");

    let nat = lab.nat();
    eprintln!(
        "kernel DNAT behind the port: {kernel_dnat}; {sent} spoofed SYNs; legitimate \
         connections during: {during:?}, after: {after:?}; NAT: {nat}"
    );
    assert!(restarted, "the flood outlasted the restart");
    assert!(during.ok > 0, "no connection was tried during the flood");
    assert_eq!(
        during.failed, 0,
        "connections failed during the flood: {during:?}; {nat}"
    );
    assert_eq!(
        after.failed, 0,
        "connections failed after the flood: {after:?}; {nat}"
    );
    assert_eq!(
        nat["established"], 1,
        "the connection held through the flood is still established: {nat}"
    );
    assert!(
        nat["transient_entries"].as_u64().unwrap() <= 2 * TRANSIENT_CAPACITY,
        "{nat}"
    );
    assert!(
        nat["replaced"].as_u64().unwrap() > FLOOD_PACKETS / 2,
        "the flood outran the transient table, and the replacements are counted: {nat}"
    );
    assert_eq!(
        lab.verdict("nat_table_full"),
        0,
        "no connection was refused for room"
    );
    assert!(
        nat["events"]["established"].as_u64().unwrap() > during.ok + after.ok,
        "every legitimate connection was xbr's, none fell back to the kernel path: {nat}"
    );
}

#[test]
fn a_syn_flood_leaves_a_port_published_by_xbr_alone_reachable() {
    syn_flood_leaves_the_port_reachable(false);
}

#[test]
fn a_syn_flood_leaves_a_port_with_kernel_dnat_behind_it_reachable() {
    syn_flood_leaves_the_port_reachable(true);
}

/// What a flood left in the transient table is gone within its lifetime (30 s of quiet): in
/// the datapath's eyes with no process running (expired entries are ignored, and the LRU
/// reuses them first), and from the table itself with a follower (its resync removes them).
#[test]
fn a_floods_half_open_state_expires_with_and_without_a_follower() {
    let alone = FloodLab::new(false);
    let followed = FloodLab::new(false);
    let _follower = Follower::start(
        &followed.host,
        &followed.pins.path,
        "br0",
        &["--resync", "1", "--metrics", "127.0.0.1:9477"],
    );
    // Cookies for every SYN (no SYN queue): the container answers each spoofed SYN once and
    // never retransmits, so the flood's last frame is its last SYN-ACK.
    for lab in [&alone, &followed] {
        run_in(
            lab.a.name(),
            &["sysctl", "-q", "-w", "net.ipv4.tcp_syncookies=2"],
        );
    }
    let floods = [&alone, &followed].map(|lab| lab.flood(FloodProto::TcpSyn, 5000, 0));
    for flood in floods {
        assert_eq!(flood.wait().unwrap(), 5000);
    }
    let quiet_since = Instant::now();
    for lab in [&alone, &followed] {
        let nat = lab.nat();
        assert!(
            nat["transient"].as_u64().unwrap() > 0,
            "the flood left half-open state: {nat}"
        );
        // The witness below (bpftool on the table behind the pinned slot) sees it too.
        assert!(
            transient_entries(lab) > 0,
            "bpftool sees no transient entry: {nat}"
        );
    }
    // The follower's metrics say the same: occupancy, size, replacements, no fallback.
    let metrics = scrape_metrics(&followed.host);
    let value = |series: &str| -> u64 {
        metrics
            .lines()
            .find(|line| line.starts_with(series))
            .and_then(|line| line.rsplit(' ').next())
            .and_then(|value| value.parse().ok())
            .unwrap_or_else(|| panic!("no {series} in the metrics:\n{metrics}"))
    };
    assert!(value("xbr_nat_connections{bridge=\"br0\",table=\"transient\"}") > 0);
    assert_eq!(
        value("xbr_nat_capacity_connections{bridge=\"br0\",table=\"transient\"}"),
        TRANSIENT_CAPACITY
    );
    assert!(value("xbr_nat_replaced_total{bridge=\"br0\"}") > 4000);
    assert_eq!(value("xbr_nat_fallbacks_total{bridge=\"br0\"}"), 0);
    assert!(value("xbr_nat_connection_events_total{bridge=\"br0\",event=\"opened\"}") >= 5000);
    let lifetime = Duration::from_nanos(bridge_common::lifetime::TRANSIENT_NS);
    std::thread::sleep(lifetime.saturating_sub(quiet_since.elapsed()));
    // The follower removes them at its next resync after the lifetime (every second here).
    let deadline = quiet_since + lifetime + Duration::from_secs(5);
    loop {
        let nat = followed.nat();
        let entries = transient_entries(&followed);
        if nat["transient"] == 0 && nat["transient_expired"] == 0 && entries == 0 {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "with a follower, the flood's state is still there {:?} after the flood: {nat}, \
             {entries} entries in the map",
            quiet_since.elapsed()
        );
        std::thread::sleep(Duration::from_millis(200));
    }
    // Without a process nothing removes them, but none is alive: the datapath ignores them.
    let nat = alone.nat();
    assert_eq!(nat["transient"], 0, "{nat}");
    assert!(nat["transient_expired"].as_u64().unwrap() > 0, "{nat}");
    for lab in [&alone, &followed] {
        exchange(&lab.outside, SocketAddr::from((HOST, 8080)), 100)
            .expect("the port answers after the flood's state expired");
    }
}

/// Entries of the pinned transient map, counted by bpftool (the witness beside xbr).
fn transient_entries(lab: &FloodLab) -> usize {
    let slot = std::fs::read_dir(&lab.pins.path)
        .unwrap()
        .next()
        .unwrap()
        .unwrap()
        .path()
        .join("br0/nat_transient");
    // The pin is the table's slot (an array of maps): its one entry holds the table's id.
    let slot_entries = bpftool_dump(&[OsStr::new("pinned"), slot.as_os_str()]);
    let Some(entry) = slot_entries.first() else {
        return 0;
    };
    let id_bytes: Vec<u8> = entry["value"]
        .as_array()
        .unwrap()
        .iter()
        .map(|byte| {
            u8::from_str_radix(byte.as_str().unwrap().trim_start_matches("0x"), 16).unwrap()
        })
        .collect();
    let id = u32::from_le_bytes(id_bytes.try_into().unwrap()).to_string();
    bpftool_dump(&[OsStr::new("id"), OsStr::new(&id)]).len()
}

/// `bpftool -j map dump WHICH...`: the map's entries.
fn bpftool_dump(which: &[&OsStr]) -> Vec<serde_json::Value> {
    let output = Command::new("bpftool")
        .args(["-j", "map", "dump"])
        .args(which)
        .output()
        .unwrap();
    assert!(
        output.status.success(),
        "bpftool map dump {which:?}: {}",
        String::from_utf8_lossy(&output.stderr)
    );
    let dump: serde_json::Value = serde_json::from_slice(&output.stdout).unwrap();
    dump.as_array().cloned().unwrap_or_default()
}

/// A UDP round trip from outside with a few tries (a datagram may be lost in a full socket
/// buffer, which is not the path's doing).
fn udp_round_trip(socket: &UdpSocket, payload: &[u8]) -> std::io::Result<()> {
    let to = SocketAddr::from((HOST, 5353));
    let mut buffer = [0u8; 2048];
    for _ in 0..5 {
        socket.send_to(payload, to)?;
        if let Ok((n, from)) = socket.recv_from(&mut buffer)
            && from == to
            && &buffer[..n] == payload
        {
            return Ok(());
        }
    }
    Err(std::io::Error::other("no answer in 5 tries"))
}

fn udp_client(lab: &FloodLab) -> UdpSocket {
    let socket = lab
        .outside
        .run(|| UdpSocket::bind((OUTSIDE, 0)))
        .unwrap()
        .unwrap();
    socket
        .set_read_timeout(Some(Duration::from_millis(200)))
        .unwrap();
    socket
}

/// The same policy for UDP: a flood of spoofed datagrams (which the container answers) only
/// replaces flows that are not established; a stream established before it keeps going, and
/// new flows keep getting answers.
#[test]
fn a_udp_flood_leaves_a_published_udp_port_reachable() {
    let lab = FloodLab::new(false);
    let _echo = UdpEcho::start(&lab.a, CONTAINER_A, 53);
    // A stream: answered, and still talking 2 s after it began.
    let stream = udp_client(&lab);
    udp_round_trip(&stream, b"hello").unwrap();
    std::thread::sleep(Duration::from_millis(2100));
    udp_round_trip(&stream, b"still here").unwrap();
    assert_eq!(lab.nat()["established"], 1, "{}", lab.nat());

    let flood = lab.flood(FloodProto::Udp, FLOOD_PACKETS, FLOOD_RATE);
    let mut during = Tally::default();
    let mut round = 0u64;
    while !flood.is_done() {
        during.add(udp_round_trip(&udp_client(&lab), b"a new flow"));
        during.add(udp_round_trip(
            &stream,
            format!("stream {round}").as_bytes(),
        ));
        round += 1;
    }
    assert_eq!(flood.finish().unwrap(), FLOOD_PACKETS);
    let mut after = Tally::default();
    for _ in 0..20 {
        after.add(udp_round_trip(&udp_client(&lab), b"after"));
    }
    after.add(udp_round_trip(&stream, b"stream after"));
    let nat = lab.nat();
    eprintln!("UDP flood: during {during:?}, after {after:?}; NAT: {nat}");
    assert!(during.ok > 0);
    assert_eq!(during.failed, 0, "{during:?}; {nat}");
    assert_eq!(after.failed, 0, "{after:?}; {nat}");
    assert!(
        nat["established"].as_u64().unwrap() >= 1,
        "the stream is still established: {nat}"
    );
    assert!(
        nat["replaced"].as_u64().unwrap() > FLOOD_PACKETS / 2,
        "{nat}"
    );
    assert_eq!(lab.verdict("nat_table_full"), 0);
}
