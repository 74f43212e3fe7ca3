//! Scale (run as root): 1000 containers on one bridge. Its own test binary, so that the
//! load of building 1000 namespaces never overlaps the timing of the other traffic tests.

use std::collections::BTreeMap;
use std::io::Write as _;
use std::net::{Ipv4Addr, UdpSocket};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use xbr::netns::NetNs;
use xbr_tests::{
    lab_support::{ExtraContainers, LabBuilder, wait_ports_forwarding},
    witness::{BridgeForwardCounter, Follower, PinRoot, force_receive_buffer, wait_for},
};

/// Container number `i` of the big lab (2, 3, ...): its name, address and MAC.
fn container(i: u32) -> (String, Ipv4Addr, [u8; 6]) {
    (
        format!("c{i}"),
        Ipv4Addr::from(0x0a4d_0000 | i),
        [0x02, 0x77, 0x10, 0, (i >> 8) as u8, i as u8],
    )
}

fn mac_text(mac: [u8; 6]) -> String {
    mac.map(|b| format!("{b:02x}")).join(":")
}

/// Per-endpoint counters from `xbr stats --json`, by MAC: (fast path packets sent,
/// packets delivered into it).
fn endpoint_counters(pins: &PinRoot) -> BTreeMap<String, (u64, u64)> {
    let stats: serde_json::Value =
        serde_json::from_str(&pins.xbr_ok(&["stats", "--json"])).expect("stats --json");
    stats["endpoints"]
        .as_array()
        .expect("endpoints")
        .iter()
        .filter_map(|e| {
            Some((
                e["mac"].as_str()?.to_owned(),
                (
                    e["fast_path_packets"].as_u64()?,
                    e["delivered_packets"].as_u64()?,
                ),
            ))
        })
        .collect()
}

/// Permanent neighbour entries in `netns` for `neighbours` (address, MAC), in one `ip -batch`:
/// the traffic then needs no ARP, which would flood every one of the bridge's ports.
fn static_neighbours(netns: &str, neighbours: &[(Ipv4Addr, [u8; 6])]) {
    let batch: String = neighbours
        .iter()
        .map(|(address, mac)| {
            format!(
                "neigh replace {address} lladdr {} dev eth0 nud permanent\n",
                mac_text(*mac)
            )
        })
        .collect();
    let mut child = Command::new("ip")
        .args(["-n", netns, "-batch", "-"])
        .stdin(Stdio::piped())
        .spawn()
        .expect("run ip -batch");
    child
        .stdin
        .take()
        .unwrap()
        .write_all(batch.as_bytes())
        .unwrap();
    assert!(child.wait().unwrap().success(), "ip -batch in {netns}");
}

/// 1000 containers on one bridge: attach, a reconcile without change, and the follower's
/// reconcile when one more container arrives (prints the times, see the lifecycle note);
/// and traffic at every endpoint, each on the fast path (below).
#[test]
fn a_thousand_endpoints() {
    let count: usize = std::env::var("XBR_SCALE_ENDPOINTS")
        .ok()
        .and_then(|n| n.parse().ok())
        .unwrap_or(1000);
    let mut spec = LabBuilder::three_containers().build();
    spec.bridge.address = Some(xbr::lab::Ipv4Cidr::new("10.77.0.1".parse().unwrap(), 16));
    spec.containers = (0..count)
        .map(|i| {
            let (name, address, mac) = container(i as u32 + 2);
            xbr::lab::ContainerSpec {
                name,
                address: xbr::lab::Ipv4Cidr::new(address, 16),
                mac: Some(xbr::lab::MacAddr(mac)),
            }
        })
        .collect();
    let started = Instant::now();
    let lab = xbr::lab::LabGuard::up(spec).expect("the big lab comes up");
    eprintln!("lab of {count} containers up in {:?}", started.elapsed());
    let host = lab.spec().host_netns();
    let pins = PinRoot::new(&host);
    wait_ports_forwarding(lab.spec(), Duration::from_secs(60));

    let mode = std::env::var("XBR_SCALE_MODE").unwrap_or_else(|_| "auto".to_owned());
    let started = Instant::now();
    pins.xbr_ok(&["attach", "br0", "--mode", &mode]);
    eprintln!(
        "attach ({mode}) with {count} endpoints: {:?}",
        started.elapsed()
    );
    assert_eq!(pins.endpoints().len(), count);

    let started = Instant::now();
    let stdout = pins.xbr_ok(&["attach", "br0"]);
    eprintln!(
        "reconcile without change at {count} endpoints (a second attach): {:?}",
        started.elapsed()
    );
    assert!(stdout.contains("already attached"), "{stdout}");

    fast_path_at_every_endpoint(lab.spec(), &pins, count as u32);

    let follower = Follower::start(&host, &pins.path, "br0", &[]);
    let mut extra = ExtraContainers::new(lab.spec());
    extra.add(
        &format!("{}-more", lab.spec().name),
        "veth-more",
        "02:77:00:00:04:01",
        "10.77.200.1/16",
    );
    let took = wait_for(
        "the extra container's endpoint",
        Duration::from_secs(5),
        || pins.endpoints().contains_key("veth-more"),
    );
    eprintln!("time to fast path at {count} endpoints: {took:?}");
    let reconciles: Vec<&str> = follower
        .log()
        .lines()
        .filter(|l| l.contains("reconciled"))
        .map(|_| "")
        .collect();
    assert!(!reconciles.is_empty());
    for line in follower.log().lines().filter(|l| l.contains("reconciled")) {
        eprintln!("follower: {line}");
    }
}

/// Traffic at every endpoint of the attached big lab, each on the fast path:
///
/// 1. The first container sends one datagram to each of the others: every destination's
///    `delivered` counter in `xbr stats` grows, and the sender's fast path counts them all.
///    (Each destination answers with ICMP port unreachable, after ARP: the answers are
///    IPv4 unicast too, so the bridge's counter below watches them as well.)
/// 2. Sampled pairs spread over the whole lab (each a sender and a receiver of its own) send
///    20 datagrams each to a bound socket: each receiver gets all of them, and each pair's
///    sender counts them as fast path and its receiver as delivered.
///
/// Throughout, the bridge's own forward hook (an nftables counter, independent of xbr) sees
/// no IPv4 unicast frame: none of it crossed the bridge.
fn fast_path_at_every_endpoint(spec: &xbr::lab::LabSpec, pins: &PinRoot, count: u32) {
    const PAIR_DATAGRAMS: u64 = 20;
    const PORT: u16 = 9999;
    let host = spec.host_netns();
    let everyone: Vec<(String, Ipv4Addr, [u8; 6])> = (2..count + 2).map(container).collect();
    let (first, _, first_mac) = everyone[0].clone();
    // Pairs: a spread of senders (from the front) and receivers (from the back), every one
    // a different container, covering the lab's whole range of ports.
    let pair_count = ((count as usize - 1) / 2).min(32);
    let stride = ((count as usize - 1) / 2) / pair_count;
    let pairs: Vec<(usize, usize)> = (0..pair_count)
        .map(|k| (1 + k * stride, everyone.len() - 1 - k * stride))
        .collect();
    static_neighbours(
        &spec.container_netns(&first),
        &everyone[1..]
            .iter()
            .map(|(_, address, mac)| (*address, *mac))
            .collect::<Vec<_>>(),
    );
    for &(from, to) in &pairs {
        let (from_name, from_address, from_mac) = &everyone[from];
        let (to_name, to_address, to_mac) = &everyone[to];
        static_neighbours(&spec.container_netns(from_name), &[(*to_address, *to_mac)]);
        static_neighbours(
            &spec.container_netns(to_name),
            &[(*from_address, *from_mac)],
        );
    }

    let bridge = BridgeForwardCounter::install(&host);
    let before_counters = endpoint_counters(pins);
    let before_bridge = bridge.read();

    // 1. One datagram to every other endpoint.
    let sender = NetNs::open(&spec.container_netns(&first))
        .unwrap()
        .run(|| UdpSocket::bind((Ipv4Addr::UNSPECIFIED, 0)))
        .unwrap()
        .expect("bind the sender");
    for (n, (_, address, _)) in everyone[1..].iter().enumerate() {
        sender
            .send_to(b"to every endpoint", (*address, PORT + 1))
            .expect("send");
        // Paced, so that the veth's per-CPU backlog (1000 frames) never overflows: a drop
        // there would be the kernel's first hop, not the path under test.
        if n % 32 == 31 {
            std::thread::sleep(Duration::from_millis(1));
        }
    }
    // 2. The sampled pairs.
    let mut received = Vec::new();
    for &(from, to) in &pairs {
        let (from_name, _, _) = &everyone[from];
        let (to_name, to_address, _) = &everyone[to];
        let receiver = NetNs::open(&spec.container_netns(to_name))
            .unwrap()
            .run(|| UdpSocket::bind((*to_address, PORT)))
            .unwrap()
            .expect("bind the receiver");
        force_receive_buffer(&receiver);
        receiver
            .set_read_timeout(Some(Duration::from_secs(2)))
            .unwrap();
        let sender = NetNs::open(&spec.container_netns(from_name))
            .unwrap()
            .run(|| UdpSocket::bind((Ipv4Addr::UNSPECIFIED, 0)))
            .unwrap()
            .expect("bind the sender");
        for n in 0..PAIR_DATAGRAMS {
            sender
                .send_to(&n.to_be_bytes(), (*to_address, PORT))
                .expect("send");
        }
        let mut got = 0;
        let mut buffer = [0u8; 64];
        while got < PAIR_DATAGRAMS && receiver.recv(&mut buffer).is_ok() {
            got += 1;
        }
        received.push(got);
    }

    // Counters are written as frames pass; give the last ones a moment to be read.
    let mut after_counters = endpoint_counters(pins);
    let grown = |after: &BTreeMap<String, (u64, u64)>, mac: [u8; 6]| -> (u64, u64) {
        let mac = mac_text(mac);
        let (fast_before, delivered_before) = before_counters.get(&mac).copied().unwrap_or((0, 0));
        let (fast_after, delivered_after) = after.get(&mac).copied().unwrap_or((0, 0));
        (
            fast_after.saturating_sub(fast_before),
            delivered_after.saturating_sub(delivered_before),
        )
    };
    let missing = |after: &BTreeMap<String, (u64, u64)>| -> Vec<String> {
        everyone[1..]
            .iter()
            .filter(|(_, _, mac)| grown(after, *mac).1 == 0)
            .map(|(name, _, _)| name.clone())
            .collect()
    };
    let deadline = Instant::now() + Duration::from_secs(10);
    while !missing(&after_counters).is_empty() && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(200));
        after_counters = endpoint_counters(pins);
    }
    // A datagram the kernel dropped before xbr saw it (the sender's per-CPU backlog, on a
    // loaded machine) is sent again, a few times at most: an endpoint the fast path cannot
    // reach counts no delivery however often it is sent to.
    for _ in 0..3 {
        let again = missing(&after_counters);
        if again.is_empty() {
            break;
        }
        println!(
            "sending again to {} endpoint(s) with no delivery yet: {again:?}",
            again.len()
        );
        for (_, address, _) in everyone[1..]
            .iter()
            .filter(|(name, _, _)| again.contains(name))
        {
            sender
                .send_to(b"to every endpoint", (*address, PORT + 1))
                .expect("send");
        }
        let deadline = Instant::now() + Duration::from_secs(2);
        while !missing(&after_counters).is_empty() && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(200));
            after_counters = endpoint_counters(pins);
        }
    }
    let after_bridge = bridge.read();

    let missing = missing(&after_counters);
    assert!(
        missing.is_empty(),
        "{} of {} endpoints counted no delivery on the fast path: {:?}",
        missing.len(),
        count - 1,
        &missing[..missing.len().min(20)]
    );
    let (first_fast, _) = grown(&after_counters, first_mac);
    assert!(
        first_fast >= u64::from(count - 1),
        "the first container sent {} datagrams, its fast path counted {first_fast}",
        count - 1
    );
    for (&(from, to), got) in pairs.iter().zip(&received) {
        let (from_name, _, from_mac) = &everyone[from];
        let (to_name, _, to_mac) = &everyone[to];
        assert_eq!(
            *got, PAIR_DATAGRAMS,
            "{from_name} -> {to_name}: datagrams received"
        );
        let (fast, _) = grown(&after_counters, *from_mac);
        let (_, delivered) = grown(&after_counters, *to_mac);
        assert!(
            fast >= PAIR_DATAGRAMS && delivered >= PAIR_DATAGRAMS,
            "{from_name} -> {to_name}: fast path {fast}, delivered {delivered}, of {PAIR_DATAGRAMS} sent"
        );
    }
    assert_eq!(
        after_bridge.ipv4_unicast, before_bridge.ipv4_unicast,
        "IPv4 unicast crossed the bridge: not every datagram took the fast path"
    );
    eprintln!(
        "fast path at {} endpoints and {} sampled pairs; bridge IPv4 forwards {} -> {}",
        count - 1,
        pairs.len(),
        before_bridge.ipv4_unicast,
        after_bridge.ipv4_unicast
    );
}
