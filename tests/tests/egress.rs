//! Egress NAT through a real lab (run as root): containers reach a server in the outside
//! namespace, which has no route back to the containers' subnet, with no MASQUERADE rule
//! anywhere: only xbr's source NAT gets the answers back. Flows the kernel holds when xbr
//! attaches (with a MASQUERADE rule of their own) stay the kernel's across attach and detach.

use std::{
    io::{Read as _, Write as _},
    net::{Ipv4Addr, SocketAddr, TcpStream, UdpSocket},
    time::Duration,
};

use xbr::netns::NetNs;
use xbr_tests::{
    lab_support::LabBuilder,
    traffic::{self, EchoServer, exchange, tcp_echo_server},
    witness::{PinRoot, nft},
};

const UPLINK_ADDRESS: Ipv4Addr = Ipv4Addr::new(10, 78, 0, 1);
const OUTSIDE: Ipv4Addr = Ipv4Addr::new(10, 78, 0, 2);
/// The outside server's ports: an echo (TCP 80), and who-are-you (TCP and UDP 7000: answers
/// with the address and port it sees the client at).
const ECHO_PORT: u16 = 80;
const WHO_PORT: u16 = 7000;

fn who_are_you_server(ns: &NetNs, port: u16) {
    traffic::who_are_you_server(ns, OUTSIDE, port);
}

/// Where the outside server saw a connection from `client` come from, and the client's own
/// address.
fn seen_as(client: &NetNs) -> std::io::Result<(SocketAddr, SocketAddr)> {
    traffic::seen_as(client, SocketAddr::from((OUTSIDE, WHO_PORT)))
}

/// Sends `payload` from `socket` to the who-are-you server: where the server saw it come
/// from, and checks the payload came back.
fn udp_seen_as(socket: &UdpSocket, payload: &[u8]) -> std::io::Result<SocketAddr> {
    socket.send_to(payload, (OUTSIDE, WHO_PORT))?;
    let mut buffer = [0u8; 4096];
    let (n, from) = socket.recv_from(&mut buffer)?;
    assert_eq!(from, SocketAddr::from((OUTSIDE, WHO_PORT)));
    let answer = &buffer[..n];
    let space = answer.iter().position(|b| *b == b' ').unwrap();
    assert_eq!(&answer[space + 1..], payload, "the payload came back whole");
    std::str::from_utf8(&answer[..space])
        .unwrap()
        .parse()
        .map_err(|e| std::io::Error::other(format!("{e}")))
}

fn udp_socket(ns: &NetNs) -> UdpSocket {
    let socket = ns.run(|| UdpSocket::bind(("0.0.0.0", 0))).unwrap().unwrap();
    socket
        .set_read_timeout(Some(Duration::from_secs(2)))
        .unwrap();
    socket
}

fn stats(pins: &PinRoot) -> serde_json::Value {
    serde_json::from_str(&pins.xbr_ok(&["stats", "--json"])).unwrap()
}

fn verdict(pins: &PinRoot, name: &str) -> u64 {
    let stats = stats(pins);
    stats["verdicts"][0][name]
        .as_u64()
        .unwrap_or_else(|| panic!("no verdict {name}: {stats}"))
}

/// Whether the server saw the client `local` as xbr translates it: from the uplink's address,
/// with the client's own port (kept, as the kernel's MASQUERADE keeps it) or, where another
/// flow to the same server held that one, a port of xbr's range (outside the default
/// `ip_local_port_range`, 32768-60999).
fn translated_by_xbr(seen: SocketAddr, local: SocketAddr) -> bool {
    seen.ip() == UPLINK_ADDRESS
        && (seen.port() == local.port()
            || (seen.port() >= 1024 && !(32768..=60999).contains(&seen.port())))
}

fn egress_opened(pins: &PinRoot) -> u64 {
    stats(pins)["nat"][0]["egress_opened"].as_u64().unwrap()
}

/// A lab with an uplink to an outside namespace, whose server answers who-are-you (TCP and
/// UDP 7000) and echoes (TCP 80); removed on drop (the servers' sockets go with their
/// namespace).
struct EgressLab {
    host: String,
    a: NetNs,
    b: NetNs,
    pins: PinRoot,
    _echo: EchoServer,
    _lab: xbr::lab::LabGuard,
}

fn egress_lab() -> EgressLab {
    let lab = LabBuilder::three_containers().with_uplink().up();
    let spec = lab.spec().clone();
    let host = spec.host_netns();
    let outside = NetNs::open(&spec.outside_netns().unwrap()).unwrap();
    who_are_you_server(&outside, WHO_PORT);
    EgressLab {
        a: NetNs::open(&spec.container_netns("a")).unwrap(),
        b: NetNs::open(&spec.container_netns("b")).unwrap(),
        pins: PinRoot::new(&host),
        host,
        _echo: tcp_echo_server(&outside, OUTSIDE, ECHO_PORT),
        _lab: lab,
    }
}

#[test]
fn containers_reach_the_outside_through_xbrs_source_nat_alone() {
    let EgressLab {
        host, a, b, pins, ..
    } = &egress_lab();
    let echo = SocketAddr::from((OUTSIDE, ECHO_PORT));
    assert!(
        !nft(host, &["list", "ruleset"], None).contains("masquerade"),
        "the lab has no MASQUERADE rule"
    );

    // The outside has no route back: without a translation nothing answers.
    assert!(seen_as(a).is_err(), "the outside answered before xbr");

    pins.xbr_ok(&["attach", "br0", "--uplink", "uplink0", "--masquerade"]);
    let status: serde_json::Value =
        serde_json::from_str(&pins.xbr_ok(&["status", "--json"])).unwrap();
    let egress = &status["bridges"][0]["egress"];
    assert_eq!(egress["accelerated"], true, "{status}");
    assert_eq!(egress["uplinks"][0]["address"], "10.78.0.1", "{status}");
    assert_eq!(
        egress["ports"],
        serde_json::json!([1024, 65535]),
        "{status}"
    );

    // Many connections, from two containers: each seen from the uplink's address, nearly all
    // with the container's own port (nothing else in the lab translates: every answer is
    // xbr's doing).
    let mut kept = 0;
    for round in 0..100 {
        let client = if round % 2 == 0 { &a } else { &b };
        let (seen, local) = seen_as(client).unwrap_or_else(|e| panic!("connection {round}: {e}"));
        assert!(
            translated_by_xbr(seen, local),
            "connection {round} from {local} seen as {seen}"
        );
        kept += usize::from(seen.port() == local.port());
    }
    assert!(kept >= 90, "{kept} of 100 connections kept their port");
    // A large transfer with the veths' offloads on: GSO segments and partial checksums.
    exchange(a, echo, 4 << 20).expect("4 MiB through egress NAT");
    // UDP, odd sizes, up to a full frame.
    let socket = udp_socket(a);
    let first = udp_seen_as(&socket, b"x").expect("a datagram's answer");
    assert!(
        translated_by_xbr(first, socket.local_addr().unwrap()),
        "{first}"
    );
    for size in [3usize, 512, 1401] {
        let payload: Vec<u8> = (0..size).map(|i| (i % 251) as u8).collect();
        let seen = udp_seen_as(&socket, &payload).expect("an answer");
        assert_eq!(seen, first, "one UDP flow keeps its translation");
    }

    // A closed port outside: the outside's ICMP error reaches the container's socket.
    let refused = udp_socket(a);
    refused.connect((OUTSIDE, 9)).unwrap();
    refused.send(b"anyone?").unwrap();
    let mut buffer = [0u8; 64];
    let error = refused
        .recv(&mut buffer)
        .expect_err("nothing listens on the outside's port 9");
    assert_eq!(
        error.kind(),
        std::io::ErrorKind::ConnectionRefused,
        "the port unreachable was translated back: {error}"
    );

    let out = verdict(pins, "egress_out");
    let back = verdict(pins, "egress_in");
    assert!(
        out > 100 * 3 && back > 100 * 2,
        "egress_out {out}, egress_in {back}"
    );
    assert!(egress_opened(pins) >= 102, "{}", stats(pins));

    // Detached, egress is the kernel's again: which, in this lab, answers nothing.
    pins.xbr_ok(&["detach", "br0"]);
    assert!(seen_as(a).is_err(), "the outside answered after detach");
    assert!(!pins.path.exists());
}

#[test]
fn flows_the_kernel_holds_stay_the_kernels_across_attach_and_detach() {
    let EgressLab { host, a, pins, .. } = &egress_lab();
    // The kernel masquerades, as Docker's rule does.
    nft(
        host,
        &["-f", "-"],
        Some(
            "table ip nat {\n chain postrouting {\n  type nat hook postrouting priority srcnat;\n  \
             ip saddr 10.77.0.0/24 oifname \"uplink0\" masquerade\n }\n}\n",
        ),
    );

    // A TCP connection and a UDP flow begin on the kernel path.
    let mut stream = a
        .run(|| TcpStream::connect_timeout(&(OUTSIDE, ECHO_PORT).into(), Duration::from_secs(2)))
        .unwrap()
        .expect("connect on the kernel path");
    stream
        .set_read_timeout(Some(Duration::from_secs(3)))
        .unwrap();
    let round_trip = |stream: &mut TcpStream, what: &str| {
        stream.write_all(b"ping").unwrap();
        let mut answer = [0u8; 4];
        stream
            .read_exact(&mut answer)
            .unwrap_or_else(|e| panic!("{what}: {e}"));
        assert_eq!(&answer, b"ping");
    };
    round_trip(&mut stream, "before attach");
    let socket = udp_socket(a);
    let kernel_udp = udp_seen_as(&socket, b"first").expect("UDP on the kernel path");

    pins.xbr_ok(&["attach", "br0", "--uplink", "uplink0", "--masquerade"]);
    let status: serde_json::Value =
        serde_json::from_str(&pins.xbr_ok(&["status", "--json"])).unwrap();
    assert_eq!(
        status["bridges"][0]["egress"]["accelerated"], true,
        "a MASQUERADE of the subnet is xbr's own translation: {status}"
    );
    // Both keep going on the kernel path: the same connection, the same UDP translation,
    // and xbr opens no flow for them.
    round_trip(&mut stream, "after attach");
    for _ in 0..3 {
        assert_eq!(udp_seen_as(&socket, b"again").unwrap(), kernel_udp);
    }
    assert_eq!(egress_opened(pins), 0, "{}", stats(pins));
    assert!(verdict(pins, "egress_kernel") >= 1, "{}", stats(pins));
    // New flows are xbr's: one opened for each.
    let (seen, local) = seen_as(a).expect("a new connection");
    assert!(translated_by_xbr(seen, local), "{seen}");
    let fresh = udp_socket(a);
    let new_udp = udp_seen_as(&fresh, b"new").unwrap();
    assert!(translated_by_xbr(new_udp, fresh.local_addr().unwrap()));
    assert_eq!(egress_opened(pins), 2, "{}", stats(pins));

    // Detached: the kernel's flows never noticed; new flows are the kernel's again.
    pins.xbr_ok(&["detach", "br0"]);
    round_trip(&mut stream, "after detach");
    assert_eq!(udp_seen_as(&socket, b"still").unwrap(), kernel_udp);
    seen_as(a).expect("a new connection after detach, masqueraded by the kernel");
}

#[test]
fn a_rule_added_behind_xbrs_back_puts_egress_back_on_the_kernel_path() {
    let EgressLab { host, a, pins, .. } = &egress_lab();
    pins.xbr_ok(&["attach", "br0", "--uplink", "uplink0", "--masquerade"]);
    let mut stream = a
        .run(|| TcpStream::connect_timeout(&(OUTSIDE, ECHO_PORT).into(), Duration::from_secs(2)))
        .unwrap()
        .expect("connect through xbr");
    stream
        .set_read_timeout(Some(Duration::from_secs(2)))
        .unwrap();
    let round_trip = |stream: &mut TcpStream| -> std::io::Result<()> {
        stream.write_all(b"ping")?;
        let mut answer = [0u8; 4];
        stream.read_exact(&mut answer)
    };
    round_trip(&mut stream).expect("a round trip through xbr");

    // A rule the class would meet on the kernel path: egress goes back there, named, and
    // the flows xbr translated end (the kernel path has no state for them; here, with no
    // MASQUERADE, nothing at all carries them).
    nft(
        host,
        &["-f", "-"],
        Some(
            "table inet xbrtest {\n chain forward {\n  type filter hook forward priority 0;\n  \
             ip daddr 198.51.100.7 drop\n }\n}\n",
        ),
    );
    pins.xbr_ok(&["attach", "br0"]);
    let status: serde_json::Value =
        serde_json::from_str(&pins.xbr_ok(&["status", "--json"])).unwrap();
    let egress = &status["bridges"][0]["egress"];
    assert_eq!(egress["accelerated"], false, "{status}");
    assert!(
        egress["reason"].as_str().unwrap().contains("198.51.100.7"),
        "{status}"
    );
    assert!(
        round_trip(&mut stream).is_err(),
        "the translated flow ended with egress"
    );
    assert!(seen_as(a).is_err(), "no masquerade on the kernel path here");

    // The rule gone: accelerated again.
    nft(host, &["delete", "table", "inet", "xbrtest"], None);
    pins.xbr_ok(&["attach", "br0"]);
    let (seen, local) = seen_as(a).expect("a new connection through xbr again");
    assert!(translated_by_xbr(seen, local), "{seen}");
}
