//! The datapath follows the bridge (run as root): `xbr attach --follow` picks up containers
//! that come and go, never delivers a frame to the wrong namespace, survives its own restart
//! (the pins carry the datapath), and stops cleanly on detach and on bridge deletion.

use std::time::{Duration, Instant};

use xbr::netns::NetNs;
use xbr_tests::{
    lab_support::{ExtraContainers, LabBuilder, ip_in},
    witness::{
        BridgeForwardCounter, Follower, IngressCounter, PinRoot, UdpStream, tc_programs, tcp_echo,
        wait_for,
    },
};

#[test]
fn a_new_container_is_on_the_fast_path_within_a_second() {
    let lab = LabBuilder::three_containers().up();
    let spec = lab.spec().clone();
    let host = spec.host_netns();
    let pins = PinRoot::new(&host);
    let _follower = Follower::start(&host, &pins.path, "br0", &[]);
    let bridge = BridgeForwardCounter::install(&host);

    let mut extra = ExtraContainers::new(&spec);
    let netns = format!("{}-new", spec.name);
    let added = Instant::now();
    extra.add(&netns, "veth-new", "02:77:00:00:01:01", "10.77.0.101/24");
    let took = wait_for(
        "the new container's endpoint",
        Duration::from_secs(1),
        || pins.endpoints().get("veth-new").map(String::as_str) == Some("02:77:00:00:01:01"),
    );
    eprintln!(
        "time to fast path for a new container: {:?} (port added {:?} before)",
        took,
        added.elapsed() - took
    );

    let before = bridge.read();
    let a = NetNs::open(&spec.container_netns("a")).unwrap();
    let new = NetNs::open(&netns).unwrap();
    tcp_echo(&a, &new, "10.77.0.101".parse().unwrap(), 128 * 1024);
    assert_eq!(
        bridge.read().ipv4_unicast,
        before.ipv4_unicast,
        "traffic to the new container crossed the bridge"
    );

    // And when it leaves, its endpoint goes.
    extra.remove(&netns);
    wait_for(
        "the removed container's endpoint to go",
        Duration::from_secs(1),
        || !pins.endpoints().contains_key("veth-new"),
    );
}

#[test]
fn churn_never_misdelivers_and_the_long_lived_pair_loses_nothing() {
    const PAIR_PORT: u16 = 7777;
    let lab = LabBuilder::three_containers().up();
    let spec = lab.spec().clone();
    let host = spec.host_netns();
    let pins = PinRoot::new(&host);
    let follower = Follower::start(&host, &pins.path, "br0", &[]);
    let bridge = BridgeForwardCounter::install(&host);
    let a = NetNs::open(&spec.container_netns("a")).unwrap();
    let b = NetNs::open(&spec.container_netns("b")).unwrap();
    // Warm up ARP so that the stream starts on the fast path.
    tcp_echo(&a, &b, "10.77.0.3".parse().unwrap(), 1024);
    let before = bridge.read();
    // The same witness on the stream's own receiver: it must count every datagram.
    let at_b = IngressCounter::install(&spec.container_netns("b"), "eth0", PAIR_PORT);
    let stream = UdpStream::start(
        &a,
        &b,
        "10.77.0.3".parse().unwrap(),
        PAIR_PORT,
        // Slow enough that the per-CPU backlog of the container's veth (1000 frames) never
        // fills while tests beside this one keep both cores busy: a loss there would be the
        // kernel's first veth hop, the same with or without xbr.
        Duration::from_millis(2),
    );

    // 50 containers come and go; names and MACs repeat every ten.
    let mut extra = ExtraContainers::new(&spec);
    let mut misdelivered = Vec::new();
    for round in 0..50 {
        let slot = round % 10;
        let netns = format!("{}-x{slot}", spec.name);
        let port = format!("veth-x{slot}");
        extra.add(
            &netns,
            &port,
            &format!("02:77:00:00:02:{slot:02x}"),
            &format!("10.77.0.{}/24", 110 + slot),
        );
        let counter = IngressCounter::install(&netns, "eth0", PAIR_PORT);
        std::thread::sleep(Duration::from_millis(20));
        let arrived = counter.read();
        if arrived != 0 {
            misdelivered.push((round, netns.clone(), arrived));
        }
        extra.remove(&netns);
    }
    let (sent, received) = stream.finish();
    let after = bridge.read();
    assert!(
        misdelivered.is_empty(),
        "frames of the a->b stream reached other namespaces: {misdelivered:?}"
    );
    assert!(sent > 300, "the stream ran ({sent} datagrams)");
    assert_eq!(
        received, sent,
        "the long-lived pair lost datagrams during churn"
    );
    assert_eq!(
        at_b.read(),
        sent,
        "the ingress witness at b counts the stream"
    );
    assert_eq!(
        after.ipv4_unicast, before.ipv4_unicast,
        "the long-lived pair left the fast path during churn"
    );
    let endpoints = pins.endpoints();
    assert_eq!(
        endpoints.len(),
        3,
        "only a, b and c are left: {endpoints:?}"
    );
    assert!(
        !follower.log().contains("WARN"),
        "the follower warned: {}",
        follower.log()
    );
}

#[test]
fn the_datapath_survives_the_follower_and_a_new_one_reconciles() {
    let lab = LabBuilder::three_containers().up();
    let spec = lab.spec().clone();
    let host = spec.host_netns();
    let pins = PinRoot::new(&host);
    let bridge = BridgeForwardCounter::install(&host);
    let a = NetNs::open(&spec.container_netns("a")).unwrap();
    let b = NetNs::open(&spec.container_netns("b")).unwrap();
    let b_ip = "10.77.0.3".parse().unwrap();
    tcp_echo(&a, &b, b_ip, 1024);

    for (signal, name) in [(libc::SIGTERM, "SIGTERM"), (libc::SIGKILL, "SIGKILL")] {
        let mut follower = Follower::start(&host, &pins.path, "br0", &[]);
        let before = bridge.read();
        let stream = UdpStream::start(
            &a,
            &b,
            b_ip,
            7000 + signal as u16,
            // Slow enough that the per-CPU backlog of the container's veth (1000 frames) never
            // fills while tests beside this one keep both cores busy: a loss there would be the
            // kernel's first veth hop, the same with or without xbr.
            Duration::from_millis(2),
        );
        std::thread::sleep(Duration::from_millis(200));
        follower.signal(signal);
        let code = follower
            .wait_exit(Duration::from_secs(5))
            .expect("the follower exits");
        if signal == libc::SIGTERM {
            assert_eq!(code, 0, "SIGTERM is a clean stop: {}", follower.log());
            assert!(
                follower.log().contains("stays attached"),
                "{}",
                follower.log()
            );
        }
        std::thread::sleep(Duration::from_millis(200));
        let (sent, received) = stream.finish();
        assert_eq!(
            received, sent,
            "{name}: datagrams were lost when the follower stopped"
        );
        assert_eq!(
            bridge.read().ipv4_unicast,
            before.ipv4_unicast,
            "{name}: traffic left the fast path"
        );
        for port in ["veth-a", "veth-b", "veth-c"] {
            assert_eq!(
                tc_programs(&host, port),
                vec!["port_ingress"],
                "{name}: {port}"
            );
        }
    }

    // While no follower runs, a container arrives; the next follower picks it up.
    let mut extra = ExtraContainers::new(&spec);
    extra.add(
        &format!("{}-late", spec.name),
        "veth-late",
        "02:77:00:00:03:01",
        "10.77.0.120/24",
    );
    assert!(
        !pins.endpoints().contains_key("veth-late"),
        "nobody followed, yet the endpoint appeared"
    );
    let _follower = Follower::start(&host, &pins.path, "br0", &[]);
    wait_for(
        "the late container's endpoint",
        Duration::from_secs(1),
        || pins.endpoints().contains_key("veth-late"),
    );
    for port in ["veth-a", "veth-b", "veth-c", "veth-late"] {
        assert_eq!(
            tc_programs(&host, port),
            vec!["port_ingress"],
            "one program on {port} after the restart"
        );
    }
}

#[test]
fn detach_stops_the_follower_and_leaves_nothing() {
    let lab = LabBuilder::three_containers().up();
    let host = lab.spec().host_netns();
    let pins = PinRoot::new(&host);
    let mut follower = Follower::start(&host, &pins.path, "br0", &[]);
    pins.xbr_ok(&["detach", "br0"]);
    let code = follower
        .wait_exit(Duration::from_secs(2))
        .expect("the follower notices the detach");
    assert_eq!(code, 0, "{}", follower.log());
    assert!(
        follower.log().contains("was detached"),
        "{}",
        follower.log()
    );
    for port in ["veth-a", "veth-b", "veth-c"] {
        assert!(
            tc_programs(&host, port).is_empty(),
            "a program is left on {port}"
        );
    }
    assert!(!pins.path.exists(), "pins left at {}", pins.path.display());
}

#[test]
fn a_deleted_bridge_stops_the_follower_and_leaves_nothing() {
    for mode in ["tcx", "clsact"] {
        let lab = LabBuilder::three_containers().up();
        let host = lab.spec().host_netns();
        let pins = PinRoot::new(&host);
        let mut follower = Follower::start(&host, &pins.path, "br0", &["--mode", mode]);
        ip_in(&host, &["link", "del", "br0"]);
        let code = follower
            .wait_exit(Duration::from_secs(2))
            .expect("the follower notices the deletion");
        assert_eq!(code, 1, "{mode}: {}", follower.log());
        assert!(
            follower.log().contains("bridge br0 was deleted"),
            "{mode}: {}",
            follower.log()
        );
        for port in ["veth-a", "veth-b", "veth-c"] {
            assert!(
                tc_programs(&host, port).is_empty(),
                "{mode}: a program is left on former port {port}"
            );
        }
        assert!(
            !pins.path.exists(),
            "{mode}: pins left at {}",
            pins.path.display()
        );
    }
}

#[test]
fn metrics_are_served_in_prometheus_text_format() {
    let lab = LabBuilder::three_containers().up();
    let spec = lab.spec().clone();
    let host = spec.host_netns();
    let pins = PinRoot::new(&host);
    // The follower runs in the lab's namespace, so its metrics port is on that loopback.
    let _follower = Follower::start(&host, &pins.path, "br0", &["--metrics", "127.0.0.1:9477"]);
    let a = NetNs::open(&spec.container_netns("a")).unwrap();
    let b = NetNs::open(&spec.container_netns("b")).unwrap();
    tcp_echo(&a, &b, "10.77.0.3".parse().unwrap(), 64 * 1024);
    let body = NetNs::open(&host)
        .unwrap()
        .run(|| {
            use std::io::{Read as _, Write as _};
            let mut stream = std::net::TcpStream::connect("127.0.0.1:9477")
                .expect("connect to the metrics port");
            stream
                .write_all(b"GET /metrics HTTP/1.0\r\nHost: localhost\r\n\r\n")
                .unwrap();
            let mut response = String::new();
            stream.read_to_string(&mut response).unwrap();
            response
        })
        .unwrap();
    assert!(
        body.starts_with("HTTP/1.") && body.contains(" 200 "),
        "{body}"
    );
    assert!(body.contains("# TYPE xbr_reconciles counter"), "{body}");
    assert!(
        body.contains("xbr_reconcile_duration_seconds_bucket"),
        "{body}"
    );
    let fast_path_a = body
        .lines()
        .find(|line| {
            line.starts_with("xbr_fast_path_packets_total{") && line.contains("port=\"veth-a\"")
        })
        .unwrap_or_else(|| panic!("no fast path counter for veth-a: {body}"));
    let value: u64 = fast_path_a.rsplit(' ').next().unwrap().parse().unwrap();
    assert!(value > 0, "{fast_path_a}");
}
