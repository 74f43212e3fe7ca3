//! Published ports through a real lab (run as root): a client in the outside namespace
//! reaches uplink-address:HOSTPORT and is served by the container through xbr alone (no NAT
//! rule anywhere: without xbr nothing listens there), many TCP connections in a row, large
//! transfers with veth checksum offload on (CHECKSUM_PARTIAL), UDP; after unpublish and after
//! detach the port is gone.

use std::{
    net::{Ipv4Addr, SocketAddr, UdpSocket},
    process::Command,
    time::Duration,
};

use xbr::netns::NetNs;
use xbr_tests::{
    lab_support::LabBuilder,
    skip::skip,
    traffic::{exchange, tcp_echo_server},
    witness::{PinRoot, xbr, xbr_ok},
};

const HOST: Ipv4Addr = Ipv4Addr::new(10, 78, 0, 1);
const CONTAINER_A: Ipv4Addr = Ipv4Addr::new(10, 77, 0, 2);

/// A UDP server in `server` at `bind` answers each datagram reversed; the client in `client`
/// sends datagrams of 1, 3, 512 and 1401 bytes to `to` (the published address) and must get
/// every answer back, from `to`.
fn udp_round_trips(server: &NetNs, bind: SocketAddr, client: &NetNs, to: SocketAddr) {
    let socket = server
        .run(|| UdpSocket::bind(bind))
        .unwrap()
        .expect("bind the UDP server");
    socket
        .set_read_timeout(Some(Duration::from_secs(2)))
        .unwrap();
    let answer = std::thread::spawn(move || {
        let mut buffer = [0u8; 2048];
        let mut answered = 0;
        while let Ok((n, from)) = socket.recv_from(&mut buffer) {
            buffer[..n].reverse();
            socket.send_to(&buffer[..n], from).unwrap();
            answered += 1;
        }
        answered
    });
    let sender = client
        .run(|| UdpSocket::bind(("0.0.0.0", 0)))
        .unwrap()
        .unwrap();
    sender
        .set_read_timeout(Some(Duration::from_secs(2)))
        .unwrap();
    for (i, size) in [1usize, 3, 512, 1401].into_iter().enumerate() {
        let datagram: Vec<u8> = (0..size).map(|j| (i + j) as u8).collect();
        sender.send_to(&datagram, to).unwrap();
        let mut buffer = [0u8; 2048];
        let (n, from) = sender
            .recv_from(&mut buffer)
            .unwrap_or_else(|e| panic!("no answer to {size} bytes: {e}"));
        assert_eq!(from, to, "the answer comes from the published address");
        let mut want = datagram.clone();
        want.reverse();
        assert_eq!(&buffer[..n], &want[..]);
    }
    assert_eq!(answer.join().unwrap(), 4);
}

fn verdict(pins: &PinRoot, name: &str) -> u64 {
    let stats: serde_json::Value =
        serde_json::from_str(&xbr_ok(&pins.args(&["stats", "--json"]))).unwrap();
    stats["verdicts"][0][name]
        .as_u64()
        .unwrap_or_else(|| panic!("no verdict {name}: {stats}"))
}

fn tx_checksum_offload(netns: &str, device: &str) -> bool {
    let output = Command::new("ip")
        .args(["netns", "exec", netns, "ethtool", "-k", device])
        .output()
        .unwrap();
    String::from_utf8_lossy(&output.stdout)
        .lines()
        .any(|l| l.trim() == "tx-checksumming: on")
}

#[test]
fn a_published_port_is_served_through_xbr_alone() {
    let lab = LabBuilder::three_containers().with_uplink().up();
    let spec = lab.spec().clone();
    let host = spec.host_netns();
    let outside = NetNs::open(&spec.outside_netns().unwrap()).unwrap();
    let a = NetNs::open(&spec.container_netns("a")).unwrap();
    let pins = PinRoot::new(&host);
    assert!(
        tx_checksum_offload(outside.name(), "eth0"),
        "the test wants CHECKSUM_PARTIAL frames from the client"
    );
    assert!(
        tx_checksum_offload(a.name(), "eth0"),
        "and from the container"
    );
    let _server = tcp_echo_server(&a, CONTAINER_A, 80);
    let published = SocketAddr::from((HOST, 8080));

    // Nothing serves host:8080 before xbr: no NAT rule exists in the lab.
    assert!(
        exchange(&outside, published, 10).is_err(),
        "host:8080 answered before anything was published"
    );

    xbr_ok(&pins.args(&["attach", "br0", "--uplink", "uplink0"]));
    xbr_ok(&pins.args(&["publish", "br0", "8080:10.77.0.2:80"]));
    for round in 0..100 {
        exchange(&outside, published, 1000)
            .unwrap_or_else(|e| panic!("connection {round} through the published port: {e}"));
    }
    // Large transfers: GSO segments and partial checksums both ways.
    exchange(&outside, published, 4 << 20).expect("4 MiB through the published port");
    let nat_in = verdict(&pins, "nat_in");
    assert!(
        nat_in > 100 * 3,
        "the connections went through xbr's NAT ({nat_in} frames in)"
    );
    assert!(verdict(&pins, "nat_out") > 100 * 3);

    let status: serde_json::Value =
        serde_json::from_str(&xbr_ok(&pins.args(&["status", "--json"]))).unwrap();
    assert_eq!(
        status["bridges"][0]["published"][0]["spec"], "8080:10.77.0.2:80/tcp",
        "{status}"
    );
    assert_eq!(status["bridges"][0]["uplinks"][0], "uplink0", "{status}");

    xbr_ok(&pins.args(&["unpublish", "br0", "8080:10.77.0.2:80"]));
    assert!(
        exchange(&outside, published, 10).is_err(),
        "host:8080 still answers after unpublish"
    );

    // Published again, then detached: gone again.
    xbr_ok(&pins.args(&["publish", "br0", "8080:10.77.0.2:80"]));
    exchange(&outside, published, 10).expect("published again");
    xbr_ok(&pins.args(&["detach", "br0"]));
    assert!(
        exchange(&outside, published, 10).is_err(),
        "host:8080 still answers after detach; programs on uplink0: {:?}; listening in {host}: {}",
        xbr_tests::witness::tc_programs(&host, "uplink0"),
        String::from_utf8_lossy(
            &Command::new("ip")
                .args(["netns", "exec", &host, "ss", "-ltnp"])
                .output()
                .unwrap()
                .stdout
        )
    );
    assert!(!pins.path.exists());
}

#[test]
fn a_published_udp_port_answers_and_bad_publish_requests_change_nothing() {
    let lab = LabBuilder::three_containers().with_uplink().up();
    let spec = lab.spec().clone();
    let host = spec.host_netns();
    let outside = NetNs::open(&spec.outside_netns().unwrap()).unwrap();
    let b = NetNs::open(&spec.container_netns("b")).unwrap();
    let pins = PinRoot::new(&host);
    xbr_ok(&pins.args(&["attach", "br0", "--uplink", "uplink0"]));

    let (code, _, stderr) = xbr(&pins.args(&["publish", "br0", "5353:10.77.0.99:53/udp"]));
    assert_eq!(code, 1);
    assert!(
        stderr.contains("no container on bridge br0 has address 10.77.0.99"),
        "{stderr}"
    );
    let (code, _, stderr) = xbr(&pins.args(&["publish", "br0", "5353:53"]));
    assert_eq!(code, 2, "clap rejects a malformed spec");
    assert!(
        stderr.contains("HOSTPORT:CONTAINERIP:CONTAINERPORT"),
        "{stderr}"
    );
    let (code, _, stderr) = xbr(&pins.args(&["unpublish", "br0", "5353:10.77.0.3:53/udp"]));
    assert_eq!(code, 1);
    assert!(
        stderr.contains("is not published on bridge br0"),
        "{stderr}"
    );

    xbr_ok(&pins.args(&["publish", "br0", "10.78.0.1:5353:10.77.0.3:53/udp"]));
    udp_round_trips(
        &b,
        SocketAddr::from(([10, 77, 0, 3], 53)),
        &outside,
        SocketAddr::from((HOST, 5353)),
    );
}

#[test]
fn a_published_port_follows_its_container_to_a_new_port() {
    use xbr_tests::{lab_support::ExtraContainers, witness::Follower};
    let lab = LabBuilder::three_containers().with_uplink().up();
    let spec = lab.spec().clone();
    let host = spec.host_netns();
    let outside = NetNs::open(&spec.outside_netns().unwrap()).unwrap();
    let pins = PinRoot::new(&host);
    let published = SocketAddr::from((HOST, 8080));
    // The container behind 10.77.0.50 starts, stops, and starts again on another port
    // with another MAC, as a restarted container does.
    let mut extra = ExtraContainers::new(&spec);
    let first = format!("{}-web1", spec.name);
    extra.add(&first, "veth-web1", "02:77:00:00:05:01", "10.77.0.50/24");
    let first_server = tcp_echo_server(
        &NetNs::open(&first).unwrap(),
        Ipv4Addr::new(10, 77, 0, 50),
        80,
    );
    xbr_ok(&pins.args(&["attach", "br0", "--uplink", "uplink0"]));
    xbr_ok(&pins.args(&["publish", "br0", "8080:10.77.0.50:80"]));
    let _follower = Follower::start(&host, &pins.path, "br0", &[]);
    let serve = |what: &str| {
        let started = std::time::Instant::now();
        while exchange(&outside, published, 100).is_err() {
            assert!(
                started.elapsed() < Duration::from_secs(2),
                "{what}: the published port does not answer\n{}\n{}",
                xbr_ok(&pins.args(&["status"])),
                xbr_ok(&pins.args(&["stats"]))
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    };
    serve("first container");
    drop(first_server);
    extra.remove(&first);
    let second = format!("{}-web2", spec.name);
    extra.add(&second, "veth-web2", "02:77:00:00:05:02", "10.77.0.50/24");
    let _second_server = tcp_echo_server(
        &NetNs::open(&second).unwrap(),
        Ipv4Addr::new(10, 77, 0, 50),
        80,
    );
    serve("restarted container");
    let status: serde_json::Value =
        serde_json::from_str(&xbr_ok(&pins.args(&["status", "--json"]))).unwrap();
    let port_ifindex = status["bridges"][0]["published"][0]["container_port_ifindex"]
        .as_u64()
        .unwrap();
    let web2 = status["bridges"][0]["ports"]
        .as_array()
        .unwrap()
        .iter()
        .find(|p| p["name"] == "veth-web2")
        .unwrap_or_else(|| panic!("no port veth-web2: {status}"));
    assert_eq!(Some(port_ifindex), web2["ifindex"].as_u64(), "{status}");
    let ports = status["bridges"][0]["ports"].as_array().unwrap();
    assert!(
        ports.iter().all(|p| p["name"] != "veth-web1"),
        "the first container's port is gone: {status}"
    );
}

fn ethtool_k(netns: &str, device: &str, feature: &str, value: &str) {
    let output = Command::new("ip")
        .args([
            "netns", "exec", netns, "ethtool", "-K", device, feature, value,
        ])
        .output()
        .unwrap();
    assert!(
        output.status.success(),
        "ethtool -K {device} {feature} {value} in {netns}: {}",
        String::from_utf8_lossy(&output.stderr)
    );
}

/// `--uplink-mode xdp`: the uplink's XDP program delivers published-port connections into the
/// container. Its conditions are met as on a physical uplink: the client sends full
/// checksums (tx offload off on its eth0, as a NIC's frames arrive), and the container's eth0
/// has GRO on, so the veth has NAPI to take XDP-redirected frames.
#[test]
fn xdp_uplink_mode_delivers_published_ports_from_xdp() {
    // GRO on a veth gives it the NAPI an XDP redirect needs only since 5.13 ("veth: allow
    // enabling NAPI even without XDP"); before, the container's end would need an XDP program.
    let kernel = aya::util::KernelVersion::current().expect("kernel version");
    if kernel < aya::util::KernelVersion::new(5, 13, 0) {
        skip(
            "xdp_uplink_mode_delivers_published_ports_from_xdp",
            &format!("kernel {kernel} has no GRO-driven NAPI on veth (5.13+)"),
        );
        return;
    }
    let lab = LabBuilder::three_containers().with_uplink().up();
    let spec = lab.spec().clone();
    let host = spec.host_netns();
    let outside = NetNs::open(&spec.outside_netns().unwrap()).unwrap();
    let a = NetNs::open(&spec.container_netns("a")).unwrap();
    let pins = PinRoot::new(&host);
    ethtool_k(outside.name(), "eth0", "tx", "off");
    ethtool_k(a.name(), "eth0", "gro", "on");
    let _server = tcp_echo_server(&a, CONTAINER_A, 80);

    xbr_ok(&pins.args(&[
        "attach",
        "br0",
        "--uplink",
        "uplink0",
        "--uplink-mode",
        "xdp",
    ]));
    xbr_ok(&pins.args(&["publish", "br0", "8080:10.77.0.2:80"]));
    xbr_ok(&pins.args(&["publish", "br0", "5353:10.77.0.2:53/udp"]));
    let link = Command::new("ip")
        .args(["-n", &host, "link", "show", "uplink0"])
        .output()
        .unwrap();
    assert!(
        String::from_utf8_lossy(&link.stdout).contains("xdp"),
        "an XDP program is on uplink0: {}",
        String::from_utf8_lossy(&link.stdout)
    );
    let status: serde_json::Value =
        serde_json::from_str(&xbr_ok(&pins.args(&["status", "--json"]))).unwrap();
    assert_eq!(status["bridges"][0]["uplink_mode"], "xdp", "{status}");
    assert!(
        status["bridges"][0]["uplink_xdp"]["uplink0"] == "native",
        "veth has native XDP: {status}"
    );
    let text = xbr_ok(&pins.args(&["status"]));
    assert!(
        text.contains("uplinks (xdp mode): uplink0 (xdp native)"),
        "{text}"
    );

    let published = SocketAddr::from((HOST, 8080));
    for round in 0..100 {
        exchange(&outside, published, 1000)
            .unwrap_or_else(|e| panic!("connection {round} through the published port: {e}"));
    }
    exchange(&outside, published, 1 << 20).expect("1 MiB through the published port");

    udp_round_trips(
        &a,
        SocketAddr::from((CONTAINER_A, 53)),
        &outside,
        SocketAddr::from((HOST, 5353)),
    );

    let nat_in_xdp = verdict(&pins, "nat_in_xdp");
    let nat_in = verdict(&pins, "nat_in");
    assert!(
        nat_in_xdp > 100 * 3 + 4,
        "XDP delivered the connections ({nat_in_xdp} frames from XDP, {nat_in} from tc)"
    );
    assert!(
        nat_in < nat_in_xdp / 10,
        "the tc program delivered few of them ({nat_in} frames from tc, {nat_in_xdp} from XDP)"
    );
    assert!(verdict(&pins, "nat_out") > 100 * 3);

    // A re-attach keeps the mode; asking for the other one is refused.
    xbr_ok(&pins.args(&["attach", "br0"]));
    let (code, _, stderr) = xbr(&pins.args(&["attach", "br0", "--uplink-mode", "tc"]));
    assert_eq!(code, 1, "{stderr}");
    assert!(stderr.contains("uplink xdp mode"), "{stderr}");

    xbr_ok(&pins.args(&["detach", "br0"]));
    let link = Command::new("ip")
        .args(["-n", &host, "link", "show", "uplink0"])
        .output()
        .unwrap();
    assert!(
        !String::from_utf8_lossy(&link.stdout).contains("xdp"),
        "detach leaves no XDP program on uplink0: {}",
        String::from_utf8_lossy(&link.stdout)
    );
    assert!(
        xbr_tests::witness::tc_programs(&host, "uplink0").is_empty(),
        "nor a tc program"
    );
    assert!(
        exchange(&outside, published, 10).is_err(),
        "host:8080 still answers after detach"
    );
    assert!(!pins.path.exists());
}
