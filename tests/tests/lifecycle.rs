//! The datapath follows the bridge (run as root): `xbr attach --follow` picks up containers
//! that come and go, never delivers a frame to the wrong namespace, survives its own restart
//! (the pins carry the datapath), and stops cleanly on detach and on bridge deletion.

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use xbr::netns::NetNs;
use xbr_tests::{
    lab_support::{ExtraContainers, LabBuilder, PortOptions, ip_in},
    witness::{
        Addressed, AddressedCounter, BridgeForwardCounter, BridgeUdpForwardCounter, Follower,
        IngressCounter, PinRoot, UdpStream, scrape_metrics, tc_programs, tcp_echo, wait_for,
        xbr_ok,
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

/// Port records xbr holds (ifindex -> the endpoint MAC on it, if any), from `xbr status`.
fn port_records(pins: &PinRoot) -> BTreeMap<u64, Option<String>> {
    let status = pins.status();
    let mut records = BTreeMap::new();
    for bridge in status["bridges"].as_array().into_iter().flatten() {
        for port in bridge["ports"].as_array().into_iter().flatten() {
            records.insert(
                port["ifindex"].as_u64().expect("ifindex"),
                port["endpoint_mac"].as_str().map(str::to_owned),
            );
        }
    }
    records
}

/// Polls `done` for up to `limit`; whether it came true.
fn came_true(limit: Duration, mut done: impl FnMut() -> bool) -> bool {
    let deadline = Instant::now() + limit;
    loop {
        if done() {
            return true;
        }
        if Instant::now() > deadline {
            return false;
        }
        std::thread::sleep(Duration::from_millis(5));
    }
}

/// The dangerous case of churn, while frames are in flight: a container goes, and at once
/// another takes its MAC on a new port; then a third takes the old port's ifindex
/// (`ip link add ... index N`). A stream to that MAC runs throughout (c holds a permanent
/// neighbour entry for it, so frames keep coming whoever holds the MAC, and while nobody
/// does), beside a long-lived a -> b stream. 17 rounds, 51 containers; names and MACs
/// repeat every five rounds.
///
/// Every namespace is watched on its ingress for its whole life (a, b and c from before the
/// streams start, each new container from before its port comes up): a frame of either
/// stream that arrives addressed to another MAC than the namespace's own is a misdelivery.
/// The bridge floods no unknown unicast to these ports (`flood off`), so while no container
/// holds the MAC the kernel drops its frames instead of showing them to everyone: what a
/// witness then counts can only be a wrong redirect.
///
/// What this proves is what DESIGN.md "No misdelivery" promises: a MAC moved to another
/// port, with frames to it in flight, is never delivered to its old port (the new port has a
/// new ifindex, and its record names the MAC before the entry points there); and an ifindex
/// reused on purpose is safe once the follower has seen the old port's deletion (the test
/// waits for that: the old port's record is gone). An ifindex reused *before* the follower
/// hears of the deletion is the documented residual risk, not exercised here (with the
/// follower stopped across that step, this test fails: see the commit message).
#[test]
fn churn_never_misdelivers_and_the_long_lived_pair_loses_nothing() {
    const PAIR_PORT: u16 = 7777;
    const CHURN_PORT: u16 = 7778;
    const ROUNDS: usize = 17;
    const SLOTS: usize = 5;
    let lab = LabBuilder::three_containers().up();
    let spec = lab.spec().clone();
    let host = spec.host_netns();
    let pins = PinRoot::new(&host);
    let follower = Follower::start(&host, &pins.path, "br0", &[]);
    for port in ["veth-a", "veth-b", "veth-c"] {
        ip_in(
            &host,
            &["link", "set", port, "type", "bridge_slave", "flood", "off"],
        );
    }
    let a = NetNs::open(&spec.container_netns("a")).unwrap();
    let b = NetNs::open(&spec.container_netns("b")).unwrap();
    let c = NetNs::open(&spec.container_netns("c")).unwrap();
    // Warm up ARP so that the stream starts on the fast path.
    tcp_echo(&a, &b, "10.77.0.3".parse().unwrap(), 1024);
    let pair_via_bridge = BridgeUdpForwardCounter::install(&host, PAIR_PORT);
    let lasting: Vec<(String, AddressedCounter)> = ["a", "b", "c"]
        .iter()
        .enumerate()
        .map(|(i, name)| {
            let netns = spec.container_netns(name);
            let mac = format!("02:77:00:00:00:{:02x}", i + 2);
            let witness = AddressedCounter::install(&netns, "eth0", &mac, &[PAIR_PORT, CHURN_PORT]);
            (netns, witness)
        })
        .collect();
    // The stream's own receiver: its witness must count every datagram.
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

    // The churning MACs and addresses, one per slot; c sends to each in turn, whoever holds
    // it, from start to end.
    let slot_mac = |slot: usize| format!("02:77:00:00:02:{slot:02x}");
    let slot_ip = |slot: usize| std::net::Ipv4Addr::new(10, 77, 0, 110 + slot as u8);
    for slot in 0..SLOTS {
        ip_in(
            &spec.container_netns("c"),
            &[
                "neigh",
                "replace",
                &slot_ip(slot).to_string(),
                "lladdr",
                &slot_mac(slot),
                "dev",
                "eth0",
                "nud",
                "permanent",
            ],
        );
    }
    let churn_stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let churn_sender = {
        let socket = c
            .run(|| std::net::UdpSocket::bind(("0.0.0.0", 0)))
            .unwrap()
            .expect("bind the churn sender");
        let stop = churn_stop.clone();
        std::thread::spawn(move || {
            let mut sent = 0u64;
            while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                let target = slot_ip(sent as usize % SLOTS);
                // A send may fail while the kernel's queue is full: only delivery matters.
                let _ = socket.send_to(&sent.to_be_bytes(), (target, CHURN_PORT));
                sent += 1;
                std::thread::sleep(Duration::from_micros(500));
            }
            sent
        })
    };

    let no_flood = PortOptions {
        ifindex: None,
        no_flood: true,
    };
    let mut extra = ExtraContainers::new(&spec);
    // What the witness of each container that came and went saw in its whole life.
    let mut watched: Vec<(String, Addressed)> = Vec::new();
    // A container's port goes down first (nothing reaches it after), then its witness is
    // read, then it goes.
    let mut remove =
        |extra: &mut ExtraContainers,
         (netns, port, witness): (String, String, AddressedCounter)| {
            ip_in(&host, &["link", "set", &port, "down"]);
            std::thread::sleep(Duration::from_millis(5));
            let seen = witness.read();
            extra.remove_now(&netns, &port);
            watched.push((netns, seen));
            seen
        };
    let add =
        |extra: &mut ExtraContainers, role: &str, slot: usize, mac: &str, options: PortOptions| {
            let netns = format!("{}-{role}{slot}", spec.name);
            let port = format!("v{role}{slot}");
            let mut witness = None;
            extra.add_with(
                &netns,
                &port,
                mac,
                &format!("{}/24", slot_ip(slot)),
                options,
                || {
                    witness = Some(AddressedCounter::install(
                        &netns,
                        "eth0",
                        mac,
                        &[PAIR_PORT, CHURN_PORT],
                    ));
                },
            );
            (netns, port, witness.unwrap())
        };
    let mut unproven_rounds = Vec::new();
    let mut delivered_to_holders = 0;
    for round in 0..ROUNDS {
        let slot = round % SLOTS;
        let mac = slot_mac(slot);
        // X holds the slot's MAC, on the fast path.
        let x = add(&mut extra, "x", slot, &mac, no_flood);
        let old_ifindex = extra.ifindex(&x.1);
        wait_for("X's endpoint", Duration::from_secs(5), || {
            port_records(&pins).get(&u64::from(old_ifindex)) == Some(&Some(mac.clone()))
        });
        std::thread::sleep(Duration::from_millis(20));
        // X goes; Y takes its MAC on a new port at once, frames to the MAC in flight.
        delivered_to_holders += remove(&mut extra, x).to_me;
        let (y_netns, y_port, y_witness) = add(&mut extra, "y", slot, &mac, no_flood);
        let y_ifindex = u64::from(extra.ifindex(&y_port));
        // The follower has seen X's port go (its record is gone) and Y's arrive.
        wait_for(
            "the follower to move the MAC",
            Duration::from_secs(5),
            || {
                let records = port_records(&pins);
                !records.contains_key(&u64::from(old_ifindex))
                    && records.get(&y_ifindex) == Some(&Some(mac.clone()))
            },
        );
        // Z takes X's old ifindex, with a MAC of its own.
        let z_mac = format!("02:77:00:00:03:{round:02x}");
        let z_options = PortOptions {
            ifindex: Some(old_ifindex),
            no_flood: true,
        };
        let z = add(&mut extra, "z", slot, &z_mac, z_options);
        assert_eq!(extra.ifindex(&z.1), old_ifindex, "Z reuses X's ifindex");
        // Frames to the MAC keep arriving at Y while Z holds the old ifindex.
        let at_z_up = y_witness.read().to_me;
        if !came_true(Duration::from_secs(2), || {
            y_witness.read().to_me > at_z_up + 5
        }) {
            unproven_rounds.push(round);
        }
        delivered_to_holders += remove(&mut extra, (y_netns, y_port, y_witness)).to_me;
        remove(&mut extra, z);
    }
    churn_stop.store(true, std::sync::atomic::Ordering::Relaxed);
    let churned = churn_sender.join().expect("churn sender");
    let (sent, received) = stream.finish();

    watched.extend(
        lasting
            .iter()
            .map(|(netns, witness)| (netns.clone(), witness.read())),
    );
    let misdelivered: Vec<(&str, u64)> = watched
        .iter()
        .map(|(netns, seen)| (netns.as_str(), seen.to_others))
        .filter(|(_, to_others)| *to_others != 0)
        .collect();
    eprintln!(
        "churn: {} namespaces watched, {churned} datagrams to the churning MACs, {delivered_to_holders} \
         delivered to their holders; a -> b: {sent} sent, {received} received",
        watched.len()
    );
    assert!(
        misdelivered.is_empty(),
        "frames reached namespaces they were not addressed to: {misdelivered:?}"
    );
    assert!(
        unproven_rounds.is_empty(),
        "rounds in which no frame to the moved MAC reached its new holder while the old \
         ifindex was reused (the dangerous case was not produced): {unproven_rounds:?}"
    );
    assert_eq!(watched.len(), 3 + 3 * ROUNDS);
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
        pair_via_bridge.read(),
        0,
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
    let body = scrape_metrics(&host);
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

/// `xbr detach --all` removes every attachment under its pin root, in every namespace: two
/// live labs are detached in their namespaces (no program left on any port), and a lab whose
/// namespaces were deleted under its attachment loses its pins.
#[test]
fn detach_all_removes_every_attachment_in_every_namespace() {
    let first = LabBuilder::three_containers().up();
    let second = LabBuilder::three_containers().up();
    let gone = LabBuilder::three_containers().up();
    let pins = PinRoot::new(&first.spec().host_netns());
    for lab in [&first, &second, &gone] {
        xbr_ok(&[
            "-n",
            &lab.spec().host_netns(),
            "--pin-root",
            pins.arg(),
            "attach",
            "br0",
        ]);
    }
    // The third lab's namespaces go with its ports; only its pins remain.
    drop(gone);

    let output = xbr_ok(&["--pin-root", pins.arg(), "detach", "--all", "--json"]);
    let json: serde_json::Value = serde_json::from_str(&output).expect("detach --json");
    let detached = json["detached"]
        .as_array()
        .expect("a list of detached bridges");
    assert_eq!(detached.len(), 3, "{json}");
    let live: Vec<&serde_json::Value> = detached.iter().filter(|d| !d["ports"].is_null()).collect();
    assert_eq!(
        live.len(),
        2,
        "two live attachments detached in place: {json}"
    );
    assert!(live.iter().all(|d| d["ports"] == 3), "{json}");
    for lab in [&first, &second] {
        let host = lab.spec().host_netns();
        for port in ["veth-a", "veth-b", "veth-c"] {
            assert!(
                tc_programs(&host, port).is_empty(),
                "a program is left on {port} in {host}"
            );
        }
    }
    assert!(!pins.path.exists(), "pins left at {}", pins.path.display());
}
