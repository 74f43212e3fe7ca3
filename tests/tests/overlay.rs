//! Docker overlay networks without Docker (run as root): two nodes joined by an underlay
//! veth, and per network and node an overlay namespace laid out as Docker's overlay driver
//! lays it out (`br0` with `vxlan0` and one veth per local container; remote containers as
//! permanent FDB and neighbour entries on `vxlan0`; see `xbr_tests::overlay_support`).
//!
//! With xbr attached to `br0` in the overlay namespaces:
//! - frames between a local container and a remote one skip `br0`: xbr sends them straight
//!   out of `vxlan0`, and hands decapsulated ones straight to the container. An nftables
//!   bridge-family forward counter (not xbr) sees no unicast IPv4 cross the bridge while TCP
//!   and UDP work across nodes and between containers of one node; a netdev counter on the
//!   underlay sees the VXLAN packets, so the frames did cross between the nodes;
//! - a remote container whose FDB entry Docker removes stops being a destination within a
//!   second of the follower seeing it (its frames take the bridge again), and comes back as
//!   one when the entry comes back;
//! - two overlay networks sharing the nodes (and the nodes' VXLAN socket) stay isolated: a
//!   container of one reaches no container of the other, even sending straight to its MAC.
//!
//! After `xbr detach` nothing of xbr is left on any port, `vxlan0` included, and traffic takes
//! the bridge again.

use std::net::TcpListener;
use std::time::Duration;

use xbr_tests::{
    lab_support::{assert_ping, ip_in, netns_list, ping},
    overlay_support::{
        Container, Network, NetworkSpec, OverlayLab, SharedPinRoot, VXLAN_PORT, pin_neighbour,
        send_udp, tcp_connects, vxlan_destinations,
    },
    witness::{
        BridgeForwardCounter, Follower, IngressCounter, remote_endpoint_macs, tc_ingress_filters,
        tc_programs, tc_qdiscs, tcp_echo, udp_echo, wait_for,
    },
};

/// Network A: VNI 4097 (Docker's first overlay VNI), containers 10.88.0.2-5.
const NETWORK_A: NetworkSpec = NetworkSpec {
    vni: 4097,
    subnet: [10, 88, 0],
    first_host: 2,
};

/// Network B: VNI 4098, the same subnet as A (Docker allows that across networks), its
/// containers at 10.88.0.12-15.
const NETWORK_B: NetworkSpec = NetworkSpec {
    vni: 4098,
    subnet: [10, 88, 0],
    first_host: 12,
};

const MIB: usize = 1024 * 1024;
/// UDP port of the probes that must (or must not) arrive.
const PROBE_PORT: u16 = 9099;
/// How long the follower may take to see an FDB change.
const FOLLOW_LIMIT: Duration = Duration::from_secs(1);

/// `vxlan0`'s counters from `xbr stats br0 --json` (its entry in `endpoints`, by `port`):
/// `delivered_*` are frames xbr sent to remote containers, `fast_path_*` frames from remote
/// containers xbr delivered to local ones.
#[derive(Clone, Copy, Debug, Default)]
struct VxlanCounters {
    fast_path_packets: u64,
    fast_path_bytes: u64,
    delivered_packets: u64,
    delivered_bytes: u64,
}

impl VxlanCounters {
    fn read(pins: &SharedPinRoot, overlay: &str) -> VxlanCounters {
        let stats = pins.stats(overlay);
        let entry = stats["endpoints"]
            .as_array()
            .into_iter()
            .flatten()
            .find(|entry| entry["port"] == "vxlan0")
            .unwrap_or_else(|| panic!("xbr stats in {overlay} has no vxlan0 port: {stats}"));
        let counter = |field: &str| {
            entry[field]
                .as_u64()
                .unwrap_or_else(|| panic!("vxlan0's {field} in {overlay}: {entry}"))
        };
        VxlanCounters {
            fast_path_packets: counter("fast_path_packets"),
            fast_path_bytes: counter("fast_path_bytes"),
            delivered_packets: counter("delivered_packets"),
            delivered_bytes: counter("delivered_bytes"),
        }
    }
}

/// Whether `xbr status --json` lists `mac` as a remote endpoint of the bridge's vxlan0 port
/// (`bridges[].ports[].remote_endpoints[].mac`).
fn status_lists_mac(pins: &SharedPinRoot, overlay: &str, mac: &str) -> bool {
    remote_endpoint_macs(&pins.status(overlay), "vxlan0").contains(&mac.to_lowercase())
}

/// Ports of `br0` in overlay namespace `node` of `network`: the containers' veths and vxlan0.
fn ports(network: &Network, node: usize) -> Vec<String> {
    network.containers[node]
        .iter()
        .map(|container| container.port.clone())
        .chain(["vxlan0".to_owned()])
        .collect()
}

/// TCP echo of `bytes` and 50 UDP datagrams each way between `a` and `b`.
fn exchange(a: &Container, b: &Container, bytes: usize) {
    tcp_echo(&a.ns(), &b.ns(), b.ip, bytes);
    for (from, to) in [(a, b), (b, a)] {
        let answers = udp_echo(&from.ns(), &to.ns(), to.ip, 50);
        assert_eq!(
            answers, 50,
            "UDP {} -> {} lost datagrams",
            from.netns, to.netns
        );
    }
}

fn forget_neighbours(network: &Network) {
    for container in network.all_containers() {
        ip_in(&container.netns, &["neigh", "flush", "all"]);
    }
}

#[test]
fn remote_frames_skip_the_bridge() {
    let lab = OverlayLab::up(&[NETWORK_A]);
    let net = &lab.networks[0];
    let (local, neighbour) = (net.container(0, 0), net.container(0, 1));
    let remote = net.container(1, 0);

    // The kernel path first: the overlay must work without xbr, or nothing below means much.
    assert_ping(&local.netns, remote.ip);
    assert_ping(&remote.netns, local.ip);
    tcp_echo(&local.ns(), &remote.ns(), remote.ip, 256 * 1024);

    // The witnesses must see the plain overlay carry IPv4 across both bridges and the underlay.
    let bridges: Vec<BridgeForwardCounter> = net
        .overlay
        .iter()
        .map(|overlay| BridgeForwardCounter::install(overlay))
        .collect();
    let underlay = IngressCounter::install(&lab.nodes[1].netns, "ul0", VXLAN_PORT);
    let before: Vec<_> = bridges.iter().map(BridgeForwardCounter::read).collect();
    exchange(local, remote, 64 * 1024);
    for (node, bridge) in bridges.iter().enumerate() {
        assert!(
            bridge.read().ipv4_unicast > before[node].ipv4_unicast,
            "without xbr, br0 of node {node} should forward the overlay's IPv4"
        );
    }
    assert!(
        underlay.read() >= 100,
        "the overlay's frames should cross the underlay as VXLAN"
    );

    // One pin root for both overlay namespaces, as the machine's one root serves them all.
    let pins = SharedPinRoot::new(&net.overlay);
    for overlay in &net.overlay {
        pins.xbr_ok(overlay, &["attach", "br0"]);
    }

    // The kernel's view: xbr's program on every port of both bridges, vxlan0 included.
    for (node, overlay) in net.overlay.iter().enumerate() {
        for port in ports(net, node) {
            assert_eq!(
                tc_programs(overlay, &port),
                vec!["port_ingress"],
                "one xbr program on {port} of node {node}"
            );
        }
    }
    // xbr's view: vxlan0 is one of its ports, hooked, and not left to the bridge.
    for overlay in &net.overlay {
        let status = pins.status(overlay);
        let bridge = &status["bridges"][0];
        let vxlan = bridge["ports"]
            .as_array()
            .into_iter()
            .flatten()
            .find(|port| port["name"] == "vxlan0")
            .unwrap_or_else(|| panic!("xbr status in {overlay} lists no vxlan0 port: {status}"));
        assert_eq!(vxlan["hook"], "ok", "{vxlan}");
        let left_to_bridge = bridge["not_accelerated"]
            .as_array()
            .into_iter()
            .flatten()
            .any(|skipped| skipped["port"] == "vxlan0");
        assert!(!left_to_bridge, "vxlan0 is left to the bridge: {status}");
    }

    // Fresh neighbour caches: ARP (answered by vxlan0's proxy) still crosses the bridge.
    forget_neighbours(net);
    let counters: Vec<_> = net
        .overlay
        .iter()
        .map(|overlay| VxlanCounters::read(&pins, overlay))
        .collect();
    let before: Vec<_> = bridges.iter().map(BridgeForwardCounter::read).collect();
    let underlay_before = underlay.read();
    exchange(local, remote, MIB);
    exchange(neighbour, local, 256 * 1024);

    for (node, bridge) in bridges.iter().enumerate() {
        let during = bridge.read();
        assert_eq!(
            during.ipv4_unicast, before[node].ipv4_unicast,
            "unicast IPv4 crossed br0 of node {node} while attached"
        );
        assert!(
            during.arp > before[node].arp,
            "ARP should still cross br0 of node {node} ({:?} -> {during:?})",
            before[node]
        );
    }
    // 50 datagrams each way from node 0, plus TCP (segments may travel as GSO bursts).
    assert!(
        underlay.read() >= underlay_before + 100,
        "the fast path's frames should still cross the underlay as VXLAN"
    );
    // Node 0 sent 100 datagrams and 1 MiB to node 1 and got as much back; so did node 1.
    for (node, overlay) in net.overlay.iter().enumerate() {
        let (was, now) = (counters[node], VxlanCounters::read(&pins, overlay));
        assert!(
            now.delivered_packets >= was.delivered_packets + 100
                && now.delivered_bytes >= was.delivered_bytes + MIB as u64,
            "node {node}: xbr should have sent the remote frames out of vxlan0: {was:?} -> {now:?}"
        );
        assert!(
            now.fast_path_packets >= was.fast_path_packets + 100
                && now.fast_path_bytes >= was.fast_path_bytes + MIB as u64,
            "node {node}: xbr should have delivered the remote frames: {was:?} -> {now:?}"
        );
    }

    for overlay in &net.overlay {
        pins.xbr_ok(overlay, &["detach", "br0"]);
    }
    for (node, overlay) in net.overlay.iter().enumerate() {
        for port in ports(net, node) {
            assert!(
                tc_programs(overlay, &port).is_empty(),
                "a program is left on {port} of node {node}"
            );
            assert!(
                tc_ingress_filters(overlay, &port).trim().is_empty(),
                "a filter is left on {port} of node {node}"
            );
            assert!(
                !tc_qdiscs(overlay, &port).contains("clsact"),
                "a clsact qdisc is left on {port} of node {node}"
            );
        }
    }
    assert!(!pins.path.exists(), "pins left at {}", pins.path.display());

    // The kernel path again.
    let before: Vec<_> = bridges.iter().map(BridgeForwardCounter::read).collect();
    exchange(remote, local, 64 * 1024);
    for (node, bridge) in bridges.iter().enumerate() {
        assert!(
            bridge.read().ipv4_unicast > before[node].ipv4_unicast,
            "after detach IPv4 takes br0 of node {node} again"
        );
    }
}

#[test]
fn removed_peer_stops_being_a_destination() {
    let lab = OverlayLab::up(&[NETWORK_A]);
    let net = &lab.networks[0];
    let overlay = &net.overlay[0];
    let local = net.container(0, 0);
    let (peer, other_peer) = (net.container(1, 0), net.container(1, 1));
    assert_ping(&local.netns, peer.ip);

    let bridge = BridgeForwardCounter::install(overlay);
    let arrived = IngressCounter::install(&peer.netns, "eth0", PROBE_PORT);
    // The container keeps sending to the MAC it knew, as with a cached neighbour entry.
    pin_neighbour(&local.netns, peer.ip, &peer.mac);

    let pins = SharedPinRoot::new(&net.overlay[..1]);
    let follower = Follower::start(overlay, &pins.path, "br0", &[]);
    assert!(
        status_lists_mac(&pins, overlay, &peer.mac),
        "remote container {} should be an endpoint: {}",
        peer.mac,
        pins.status(overlay)
    );

    // While Docker programs the peer, frames to it take the fast path to vxlan0.
    let (was, forwarded) = (VxlanCounters::read(&pins, overlay), bridge.read());
    assert_eq!(udp_echo(&local.ns(), &peer.ns(), peer.ip, 20), 20);
    assert_eq!(
        bridge.read().ipv4_unicast,
        forwarded.ipv4_unicast,
        "frames to the programmed peer crossed br0"
    );
    let now = VxlanCounters::read(&pins, overlay);
    assert!(
        now.delivered_packets >= was.delivered_packets + 20,
        "frames to the peer should be delivered to vxlan0: {was:?} -> {now:?}"
    );

    // Docker removes the stopped container: vxlan0 no longer knows where it is.
    net.forget_peer(0, peer);
    assert!(vxlan_destinations(overlay, &peer.mac).is_empty());
    let took = wait_for("xbr forgetting the removed peer", FOLLOW_LIMIT, || {
        !status_lists_mac(&pins, overlay, &peer.mac)
    });
    eprintln!("the follower dropped the removed peer after {took:?}");

    // Its frames go back to the bridge, which has nowhere to send them.
    let (was, forwarded, probes) = (
        VxlanCounters::read(&pins, overlay),
        bridge.read(),
        arrived.read(),
    );
    send_udp(&local.ns(), peer.ip, PROBE_PORT, 20);
    std::thread::sleep(Duration::from_millis(200));
    assert!(
        bridge.read().ipv4_unicast >= forwarded.ipv4_unicast + 20,
        "frames to the removed peer should take br0 again"
    );
    let now = VxlanCounters::read(&pins, overlay);
    assert_eq!(
        now.delivered_packets, was.delivered_packets,
        "frames to the removed peer were still delivered to vxlan0"
    );
    assert_eq!(
        arrived.read(),
        probes,
        "the removed peer should be unreachable"
    );
    // The other remote container keeps its fast path.
    let forwarded = bridge.read();
    assert_eq!(
        udp_echo(&local.ns(), &other_peer.ns(), other_peer.ip, 20),
        20
    );
    assert_eq!(
        bridge.read().ipv4_unicast,
        forwarded.ipv4_unicast,
        "frames to the peer still programmed crossed br0"
    );

    // Docker programs it again: a destination again within a second.
    net.learn_peer(0, peer, &lab.nodes[1]);
    let took = wait_for("xbr learning the peer again", FOLLOW_LIMIT, || {
        status_lists_mac(&pins, overlay, &peer.mac)
    });
    eprintln!("the follower took the peer back after {took:?}");
    let (was, forwarded) = (VxlanCounters::read(&pins, overlay), bridge.read());
    assert_eq!(udp_echo(&local.ns(), &peer.ns(), peer.ip, 20), 20);
    assert_eq!(
        bridge.read().ipv4_unicast,
        forwarded.ipv4_unicast,
        "frames to the peer programmed again crossed br0"
    );
    let now = VxlanCounters::read(&pins, overlay);
    assert!(
        now.delivered_packets >= was.delivered_packets + 20,
        "frames to the peer should be delivered to vxlan0 again: {was:?} -> {now:?}"
    );
    drop(follower);
}

#[test]
fn two_overlays_stay_isolated() {
    let lab = OverlayLab::up(&[NETWORK_A, NETWORK_B]);
    let (a, b) = (&lab.networks[0], &lab.networks[1]);
    // All four overlay namespaces under one pin root: xbr must keep their state apart.
    let overlays: Vec<String> = lab
        .networks
        .iter()
        .flat_map(|network| network.overlay.iter().cloned())
        .collect();
    let pins = SharedPinRoot::new(&overlays);
    for overlay in &overlays {
        pins.xbr_ok(overlay, &["attach", "br0"]);
    }

    // Within each network, traffic crosses the nodes.
    for network in [a, b] {
        exchange(network.container(0, 0), network.container(1, 1), 256 * 1024);
    }

    // From network A, no container of B answers: not by ARP (A's vxlan0 knows none of B's
    // addresses), nor when A's container sends straight to B's MAC.
    let client = a.container(0, 0);
    let probes: Vec<IngressCounter> = b
        .all_containers()
        .map(|target| IngressCounter::install(&target.netns, "eth0", PROBE_PORT))
        .collect();
    for target in b.all_containers() {
        assert!(
            !ping(&client.netns, target.ip),
            "{} of network B answered {} of network A",
            target.ip,
            client.ip
        );
        pin_neighbour(&client.netns, target.ip, &target.mac);
        // A listener, so that a frame that did get through would be answered, not refused.
        let _listener = target
            .ns()
            .run(|| TcpListener::bind((target.ip, PROBE_PORT)))
            .expect("enter target namespace")
            .expect("bind TCP listener");
        assert!(
            !tcp_connects(&client.ns(), target.ip, PROBE_PORT, Duration::from_secs(1)),
            "{} of network A connected to {} of network B",
            client.ip,
            target.ip
        );
        send_udp(&client.ns(), target.ip, PROBE_PORT, 20);
    }
    std::thread::sleep(Duration::from_millis(200));
    for (target, probe) in b.all_containers().zip(&probes) {
        assert_eq!(
            probe.read(),
            0,
            "frames from network A reached {} of network B",
            target.netns
        );
    }

    // The same probes do arrive within A: the counters can see them.
    let peer = a.container(1, 1);
    let arrived = IngressCounter::install(&peer.netns, "eth0", PROBE_PORT);
    send_udp(&client.ns(), peer.ip, PROBE_PORT, 20);
    wait_for(
        "the probes within network A",
        Duration::from_secs(2),
        || arrived.read() == 20,
    );

    for overlay in &overlays {
        pins.xbr_ok(overlay, &["detach", "br0"]);
    }
    assert!(!pins.path.exists(), "pins left at {}", pins.path.display());
    let namespaces = lab.namespaces().to_vec();
    drop(pins);
    drop(lab);
    let left = netns_list();
    assert!(
        namespaces.iter().all(|netns| !left.contains(netns)),
        "the lab left namespaces: {left:?}"
    );
}
