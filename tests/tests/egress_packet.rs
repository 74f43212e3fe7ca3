//! Egress NAT packet tests through BPF_PROG_TEST_RUN (run as root): a container's SYN and
//! UDP datagrams source-NATed byte for byte (checksums, TTL, MACs), the outside's replies
//! translated back into the container, the handshake making the flow established, ICMP
//! errors about a flow translated into its container; and what goes to the kernel path
//! unchanged: an expiring TTL, no free port, no room to track, a destination inside the
//! subnet, a sender that is not the port's container, mutated frames.
//!
//! The FIB lookup needs routes: each test runs its frames inside a network namespace it
//! makes, with a bridge (the lookup's input interface) and an uplink whose next hop has
//! a permanent neighbour entry.

use bridge_common::{EgressConfig, Flow, FlowKey, IPPROTO_TCP, IPPROTO_UDP, NatEvent, Verdict};
use etherparse::PacketBuilder;
use xbr::netns::NetNs;
use xbr_tests::{
    datapath_support::{Datapath, PORT_PROGRAM, TC_ACT_OK, TC_ACT_REDIRECT, UPLINK_PROGRAM},
    frames::{Addresses, UDP_CHECKSUM, assert_frame, show, tcp_numbered as tcp, udp},
    lab_support::unique_name,
};

const OUTSIDE_MAC: [u8; 6] = [0x02, 0x78, 0, 0, 0, 0x02];
const UPLINK_MAC: [u8; 6] = [0x02, 0x78, 0, 0, 0, 0x01];
const BRIDGE_MAC: [u8; 6] = [0x02, 0x77, 0, 0, 0, 0x01];
const CONTAINER_MAC: [u8; 6] = [0x02, 0x77, 0, 0, 0, 0x02];
const OUTSIDE_IP: [u8; 4] = [10, 78, 0, 2];
const UPLINK_IP: [u8; 4] = [10, 78, 0, 1];
const CONTAINER_IP: [u8; 4] = [10, 77, 0, 2];
/// The container's bridge port: the device BPF_PROG_TEST_RUN runs frames as arriving on
/// (the namespace's loopback), so that the datapath finds the port's record.
const CONTAINER_PORT_IFINDEX: u32 = 1;
const CONTAINER_PORT: u16 = 40000;
const SERVER_PORT: u16 = 80;
const TC_ACT_UNSPEC: u32 = u32::MAX;

/// A namespace with br0 (10.77.0.1/24) and uplink0 (a veth, 10.78.0.1/24, MAC UPLINK_MAC)
/// whose neighbour 10.78.0.2 is OUTSIDE_MAC, forwarding on; removed on drop.
struct Routes {
    netns: NetNs,
    bridge: u32,
    uplink: u32,
}

impl Drop for Routes {
    fn drop(&mut self) {
        let _ = NetNs::delete(self.netns.name());
    }
}

fn ip(netns: &str, args: &str) {
    let mut full = vec!["-n", netns];
    full.extend(args.split_whitespace());
    let output = std::process::Command::new("ip")
        .args(&full)
        .output()
        .unwrap();
    assert!(
        output.status.success(),
        "ip {}: {}",
        full.join(" "),
        String::from_utf8_lossy(&output.stderr)
    );
}

fn routes() -> Routes {
    let netns = NetNs::create(&unique_name("egp")).expect("create a namespace");
    let name = netns.name().to_owned();
    let mut routes = Routes {
        netns,
        bridge: 0,
        uplink: 0,
    };
    ip(&name, "link add br0 address 02:77:00:00:00:01 type bridge");
    ip(&name, "addr add 10.77.0.1/24 dev br0");
    ip(&name, "link set br0 up");
    ip(
        &name,
        "link add uplink0 address 02:78:00:00:00:01 type veth peer name outside0",
    );
    ip(&name, "addr add 10.78.0.1/24 dev uplink0");
    ip(&name, "link set outside0 up");
    ip(&name, "link set uplink0 up");
    ip(
        &name,
        "neigh add 10.78.0.2 lladdr 02:78:00:00:00:02 dev uplink0 nud permanent",
    );
    routes
        .netns
        .run(|| std::fs::write("/proc/sys/net/ipv4/ip_forward", "1"))
        .unwrap()
        .unwrap();
    routes.bridge = xbr_tests::lab_support::ifindex_in(&name, "br0");
    routes.uplink = xbr_tests::lab_support::ifindex_in(&name, "uplink0");
    routes
}

fn config(routes: &Routes, port_min: u16, port_max: u16) -> EgressConfig {
    EgressConfig {
        enabled: 1,
        bridge_ifindex: routes.bridge,
        subnet: [10, 77, 0, 0],
        subnet_mask: [255, 255, 255, 0],
        port_min,
        port_max,
        skip_min: 0,
        skip_max: 0,
    }
}

/// A datapath with the container's endpoint and egress on, translating to ports
/// `port_min..=port_max`.
fn egress_datapath(routes: &Routes, port_min: u16, port_max: u16) -> Datapath {
    let mut datapath = Datapath::load(true, None);
    datapath.add_endpoint(CONTAINER_MAC, CONTAINER_PORT_IFINDEX);
    datapath.set_port_ipv4(CONTAINER_PORT_IFINDEX, CONTAINER_IP);
    datapath.enable_egress(config(routes, port_min, port_max), routes.uplink, UPLINK_IP);
    datapath
}

/// The container to the outside server, as it arrives at its bridge port.
fn out(port: u16) -> Addresses {
    Addresses {
        eth: (CONTAINER_MAC, BRIDGE_MAC),
        ip: (CONTAINER_IP, OUTSIDE_IP),
        ports: (port, SERVER_PORT),
        ttl: 64,
    }
}

/// The same after source NAT to `nat_port`, as it must leave the uplink.
fn out_translated(nat_port: u16) -> Addresses {
    Addresses {
        eth: (UPLINK_MAC, OUTSIDE_MAC),
        ip: (UPLINK_IP, OUTSIDE_IP),
        ports: (nat_port, SERVER_PORT),
        ttl: 63,
    }
}

/// The server's answer to `nat_port`, as it arrives on the uplink.
fn back(nat_port: u16) -> Addresses {
    Addresses {
        eth: (OUTSIDE_MAC, UPLINK_MAC),
        ip: (OUTSIDE_IP, UPLINK_IP),
        ports: (SERVER_PORT, nat_port),
        ttl: 64,
    }
}

/// The answer translated back, as it must enter the container.
fn back_translated(port: u16) -> Addresses {
    Addresses {
        eth: (BRIDGE_MAC, CONTAINER_MAC),
        ip: (OUTSIDE_IP, CONTAINER_IP),
        ports: (SERVER_PORT, port),
        ttl: 63,
    }
}

/// The port xbr gave the flow the container opened from `port`, from its outbound entry.
fn nat_port(datapath: &Datapath, proto: u8, port: u16) -> u16 {
    let key = FlowKey {
        proto,
        _pad: [0; 3],
        src_ip: CONTAINER_IP,
        dst_ip: OUTSIDE_IP,
        src_port: port.to_be_bytes(),
        dst_port: SERVER_PORT.to_be_bytes(),
    };
    let entries: Vec<(FlowKey, Flow)> = datapath
        .transient()
        .into_iter()
        .chain(datapath.flows())
        .collect();
    let (_, flow) = entries
        .iter()
        .find(|(k, _)| *k == key)
        .unwrap_or_else(|| panic!("no entry for the flow from port {port}: {entries:?}"));
    assert!(flow.flags & Flow::EGRESS != 0 && flow.flags & Flow::OUTBOUND != 0);
    u16::from_be_bytes(flow.new_port)
}

#[test]
fn a_tcp_connection_out_is_translated_both_ways_byte_for_byte() {
    let routes = routes();
    routes
        .netns
        .run(|| {
            let mut datapath = egress_datapath(&routes, 61000, 65535);
            let syn = tcp(&out(CONTAINER_PORT), "S", 1000, 0, &[]);
            let (code, sent) = datapath.run(PORT_PROGRAM, &syn).unwrap();
            assert_eq!(code, TC_ACT_REDIRECT, "the SYN leaves by the uplink");
            let nat = nat_port(&datapath, IPPROTO_TCP, CONTAINER_PORT);
            assert_eq!(
                nat, CONTAINER_PORT,
                "the container's own port, free, is kept"
            );
            assert_frame(
                "SYN out",
                &sent,
                &tcp(&out_translated(nat), "S", 1000, 0, &[]),
            );
            assert_eq!(datapath.event_count(NatEvent::EgressOpened), 1);

            // The server's SYN-ACK comes back in, translated to the container's tuple.
            let syn_ack = tcp(&back(nat), "SA", 7000, 1001, &[]);
            let (code, delivered) = datapath.run(UPLINK_PROGRAM, &syn_ack).unwrap();
            assert_eq!(code, TC_ACT_REDIRECT, "the SYN-ACK goes into the container");
            assert_frame(
                "SYN-ACK in",
                &delivered,
                &tcp(&back_translated(CONTAINER_PORT), "SA", 7000, 1001, &[]),
            );
            assert_eq!(datapath.event_count(NatEvent::Established), 0);

            // The container's ACK of it completes the handshake: established, both ways.
            let ack = tcp(
                &out(CONTAINER_PORT),
                "A",
                1001,
                7001,
                b"GET / HTTP/1.0\r\n\r\n",
            );
            let (code, sent) = datapath.run(PORT_PROGRAM, &ack).unwrap();
            assert_eq!(code, TC_ACT_REDIRECT);
            assert_frame(
                "ACK out",
                &sent,
                &tcp(
                    &out_translated(nat),
                    "A",
                    1001,
                    7001,
                    b"GET / HTTP/1.0\r\n\r\n",
                ),
            );
            assert_eq!(datapath.event_count(NatEvent::Established), 1);
            let established = datapath.flows();
            assert_eq!(established.len(), 2, "{established:?}");
            assert!(established.iter().all(|(_, f)| f.flags & Flow::EGRESS != 0));

            // Data in, established: still exact.
            let data = tcp(&back(nat), "A", 7001, 1019, b"HTTP/1.0 200 OK\r\n\r\nhello");
            let (code, delivered) = datapath.run(UPLINK_PROGRAM, &data).unwrap();
            assert_eq!(code, TC_ACT_REDIRECT);
            assert_frame(
                "data in",
                &delivered,
                &tcp(
                    &back_translated(CONTAINER_PORT),
                    "A",
                    7001,
                    1019,
                    b"HTTP/1.0 200 OK\r\n\r\nhello",
                ),
            );
            assert_eq!(datapath.verdict_count(Verdict::EgressOut), 2);
            assert_eq!(datapath.verdict_count(Verdict::EgressIn), 2);

            // A RST ends it: the next segment of that tuple is nobody's.
            let rst = tcp(&out(CONTAINER_PORT), "RA", 1019, 7026, &[]);
            assert_eq!(datapath.run(PORT_PROGRAM, &rst).unwrap().0, TC_ACT_REDIRECT);
            assert!(datapath.flows().is_empty());
            let late = tcp(&back(nat), "A", 7026, 1019, b"late");
            let (code, passed) = datapath.run(UPLINK_PROGRAM, &late).unwrap();
            assert_eq!(code, TC_ACT_UNSPEC, "after RST the uplink passes it on");
            assert_frame("late segment", &passed, &late);
        })
        .unwrap();
}

#[test]
fn udp_datagrams_keep_a_zero_checksum_and_odd_payloads_their_checksum() {
    let routes = routes();
    routes
        .netns
        .run(|| {
            let mut datapath = egress_datapath(&routes, 61000, 65535);
            // No checksum (0): it stays 0 through the translation.
            let mut first = udp(&out(CONTAINER_PORT), b"odd");
            first[UDP_CHECKSUM..UDP_CHECKSUM + 2].copy_from_slice(&[0, 0]);
            let (code, sent) = datapath.run(PORT_PROGRAM, &first).unwrap();
            assert_eq!(code, TC_ACT_REDIRECT);
            let nat = nat_port(&datapath, IPPROTO_UDP, CONTAINER_PORT);
            let mut want = udp(&out_translated(nat), b"odd");
            want[UDP_CHECKSUM..UDP_CHECKSUM + 2].copy_from_slice(&[0, 0]);
            assert_frame("UDP without checksum out", &sent, &want);

            // With checksums, odd and even payload lengths, both ways.
            for payload in [&b"x"[..], b"three", &[0xffu8; 1401][..]] {
                let (code, sent) = datapath
                    .run(PORT_PROGRAM, &udp(&out(CONTAINER_PORT), payload))
                    .unwrap();
                assert_eq!(code, TC_ACT_REDIRECT);
                assert_frame("UDP out", &sent, &udp(&out_translated(nat), payload));
                let (code, delivered) = datapath
                    .run(UPLINK_PROGRAM, &udp(&back(nat), payload))
                    .unwrap();
                assert_eq!(code, TC_ACT_REDIRECT);
                assert_frame(
                    "UDP in",
                    &delivered,
                    &udp(&back_translated(CONTAINER_PORT), payload),
                );
            }
            assert_eq!(datapath.event_count(NatEvent::EgressOpened), 1, "one flow");
        })
        .unwrap();
}

#[test]
fn no_free_port_and_no_table_leave_the_flow_to_the_kernel_unchanged() {
    let routes = routes();
    routes
        .netns
        .run(|| {
            // One port to give: the first flow to the server takes it. (Source ports below
            // 1024 are never kept: these flows need one of the range.)
            let mut datapath = egress_datapath(&routes, 61000, 61000);
            let syn = |port| tcp(&out(port), "S", 1000, 0, &[]);
            assert_eq!(
                datapath.run(PORT_PROGRAM, &syn(800)).unwrap().0,
                TC_ACT_REDIRECT
            );
            assert_eq!(nat_port(&datapath, IPPROTO_TCP, 800), 61000);
            let second = syn(801);
            let (code, passed) = datapath.run(PORT_PROGRAM, &second).unwrap();
            assert_eq!(code, TC_ACT_OK, "no port left: the bridge takes it");
            assert_frame("exhausted", &passed, &second);
            assert_eq!(datapath.event_count(NatEvent::EgressPortsExhausted), 1);
            assert_eq!(datapath.verdict_count(Verdict::EgressKernel), 1);
            // The kernel path owns that flow now: its retransmission stays there even when a
            // port is free again.
            datapath.drop_transient(&FlowKey {
                proto: IPPROTO_TCP,
                _pad: [0; 3],
                src_ip: OUTSIDE_IP,
                dst_ip: UPLINK_IP,
                src_port: SERVER_PORT.to_be_bytes(),
                dst_port: 61000u16.to_be_bytes(),
            });
            assert!(
                datapath
                    .kernel_flows()
                    .iter()
                    .any(|k| k.src_port == 801u16.to_be_bytes())
            );
            let (code, passed) = datapath.run(PORT_PROGRAM, &second).unwrap();
            assert_eq!(code, TC_ACT_OK);
            assert_frame("the kernel's flow", &passed, &second);

            // A range with a hole: only the port left at either end is given, then no more.
            for ((skip_min, skip_max), left) in [((1024, 65534), 65535), ((1025, 65535), 1024)] {
                let mut holed = Datapath::load(true, None);
                holed.add_endpoint(CONTAINER_MAC, CONTAINER_PORT_IFINDEX);
                holed.set_port_ipv4(CONTAINER_PORT_IFINDEX, CONTAINER_IP);
                let mut range = config(&routes, 1024, 65535);
                (range.skip_min, range.skip_max) = (skip_min, skip_max);
                holed.enable_egress(range, routes.uplink, UPLINK_IP);
                assert_eq!(
                    holed.run(PORT_PROGRAM, &syn(800)).unwrap().0,
                    TC_ACT_REDIRECT
                );
                assert_eq!(nat_port(&holed, IPPROTO_TCP, 800), left);
                assert_eq!(holed.run(PORT_PROGRAM, &syn(801)).unwrap().0, TC_ACT_OK);
            }

            // Without connection tables (none made yet): the kernel path, unchanged.
            let mut untracked = Datapath::load_without_connection_tables(true);
            untracked.add_endpoint(CONTAINER_MAC, CONTAINER_PORT_IFINDEX);
            untracked.set_port_ipv4(CONTAINER_PORT_IFINDEX, CONTAINER_IP);
            untracked.enable_egress(config(&routes, 61000, 65535), routes.uplink, UPLINK_IP);
            let (code, passed) = untracked.run(PORT_PROGRAM, &syn(802)).unwrap();
            assert_eq!(code, TC_ACT_OK);
            assert_frame("no table", &passed, &syn(802));
            assert_eq!(untracked.verdict_count(Verdict::EgressKernel), 1);
        })
        .unwrap();
}

#[test]
fn a_port_the_hosts_own_sockets_use_is_never_given() {
    let routes = routes();
    routes
        .netns
        .run(|| {
            // The container's own port and the one port egress may give are a listener's
            // (TCP) and a bound socket's (UDP) on the host: a reply to them would be theirs.
            let _listeners =
                [40000, 61000].map(|port| std::net::TcpListener::bind(("0.0.0.0", port)).unwrap());
            let _bound =
                [40000, 61000].map(|port| std::net::UdpSocket::bind(("10.78.0.1", port)).unwrap());
            let mut datapath = egress_datapath(&routes, 61000, 61000);
            for frame in [
                tcp(&out(40000), "S", 1000, 0, &[]),
                udp(&out(40000), b"datagram"),
            ] {
                let (code, passed) = datapath.run(PORT_PROGRAM, &frame).unwrap();
                assert_eq!(code, TC_ACT_OK);
                assert_frame("the host's port", &passed, &frame);
            }
            assert_eq!(datapath.event_count(NatEvent::EgressPortsExhausted), 2);
            // Another port of the range is free: given instead of the container's own.
            let mut datapath = egress_datapath(&routes, 61001, 61001);
            assert_eq!(
                datapath
                    .run(PORT_PROGRAM, &tcp(&out(40000), "S", 1000, 0, &[]))
                    .unwrap()
                    .0,
                TC_ACT_REDIRECT
            );
            assert_eq!(nat_port(&datapath, IPPROTO_TCP, 40000), 61001);
        })
        .unwrap();
}

#[test]
fn frames_egress_must_not_take_pass_unchanged() {
    let routes = routes();
    routes
        .netns
        .run(|| {
            let mut datapath = egress_datapath(&routes, 61000, 65535);
            let mut expiring = out(40000);
            expiring.ttl = 1;
            let mut inside = out(40001);
            inside.ip.1 = [10, 77, 0, 9];
            let mut stranger = out(40002);
            stranger.eth.0 = [0x02, 0x77, 0, 0, 0, 0x63];
            let mut unrouted = out(40003);
            unrouted.ip.1 = [192, 0, 2, 1];
            let mut spoofed = out(40007);
            spoofed.ip.0 = [10, 77, 0, 9];
            let mut to_host = out(40004);
            to_host.ip.1 = UPLINK_IP;
            let cases: Vec<(&str, Vec<u8>)> = vec![
                ("TTL 1", tcp(&expiring, "S", 1, 0, &[])),
                ("a destination in the subnet", tcp(&inside, "S", 1, 0, &[])),
                ("not the port's container", tcp(&stranger, "S", 1, 0, &[])),
                (
                    "another address of the subnet, from the container's MAC",
                    tcp(&spoofed, "S", 1, 0, &[]),
                ),
                ("no route out", tcp(&unrouted, "S", 1, 0, &[])),
                ("the host's own address", tcp(&to_host, "S", 1, 0, &[])),
                (
                    "a segment of no flow",
                    tcp(&out(40005), "A", 1, 1, b"mid-flow"),
                ),
            ];
            for (case, frame) in cases {
                let (code, passed) = datapath.run(PORT_PROGRAM, &frame).unwrap();
                assert_eq!(code, TC_ACT_OK, "{case}");
                assert_frame(case, &passed, &frame);
            }
            assert_eq!(datapath.event_count(NatEvent::EgressOpened), 0);
            assert_eq!(datapath.verdict_count(Verdict::EgressOut), 0);
        })
        .unwrap();
}

/// An ICMP error from the outside about the frame `quoted` (as it left the uplink: the
/// first 28 bytes of its IP packet).
fn icmp_error(to: [u8; 4], ttl: u8, quoted: &[u8], eth: ([u8; 6], [u8; 6])) -> Vec<u8> {
    let mut frame = Vec::new();
    PacketBuilder::ethernet2(eth.0, eth.1)
        .ipv4(OUTSIDE_IP, to, ttl)
        .icmpv4(etherparse::Icmpv4Type::DestinationUnreachable(
            etherparse::icmpv4::DestUnreachableHeader::Port,
        ))
        .write(&mut frame, &quoted[14..14 + 28])
        .unwrap();
    frame
}

#[test]
fn an_icmp_error_about_an_outbound_flow_reaches_its_container() {
    let routes = routes();
    routes
        .netns
        .run(|| {
            let mut datapath = egress_datapath(&routes, 61000, 65535);
            for (proto, opening) in [
                (IPPROTO_UDP, udp(&out(40000), b"to a closed port")),
                (IPPROTO_TCP, tcp(&out(40000), "S", 1000, 0, &[])),
            ] {
                assert_eq!(
                    datapath.run(PORT_PROGRAM, &opening).unwrap().0,
                    TC_ACT_REDIRECT
                );
                let nat = nat_port(&datapath, proto, 40000);
                // What left the uplink, and what the container sent, as the error quotes it.
                let (left, sent) = if proto == IPPROTO_UDP {
                    let mut sent = out(40000);
                    sent.ttl = 63;
                    (
                        udp(&out_translated(nat), b"to a closed port"),
                        udp(&sent, b"to a closed port"),
                    )
                } else {
                    let mut sent = out(40000);
                    sent.ttl = 63;
                    (
                        tcp(&out_translated(nat), "S", 1000, 0, &[]),
                        tcp(&sent, "S", 1000, 0, &[]),
                    )
                };
                let error = icmp_error(UPLINK_IP, 64, &left, (OUTSIDE_MAC, UPLINK_MAC));
                let (code, delivered) = datapath.run(UPLINK_PROGRAM, &error).unwrap();
                assert_eq!(code, TC_ACT_REDIRECT, "proto {proto}: into the container");
                assert_frame(
                    &format!("ICMP error, proto {proto}"),
                    &delivered,
                    &icmp_error(CONTAINER_IP, 63, &sent, (BRIDGE_MAC, CONTAINER_MAC)),
                );
            }
            assert_eq!(datapath.verdict_count(Verdict::EgressIn), 2);

            // An error about no flow of xbr's (another server port) is the kernel's, unchanged.
            let mut elsewhere = out_translated(61000);
            elsewhere.ports.1 = SERVER_PORT + 1;
            let stranger = icmp_error(
                UPLINK_IP,
                64,
                &udp(&elsewhere, b"x"),
                (OUTSIDE_MAC, UPLINK_MAC),
            );
            let (code, passed) = datapath.run(UPLINK_PROGRAM, &stranger).unwrap();
            assert_eq!(code, TC_ACT_UNSPEC);
            assert_frame("ICMP error about nothing of xbr's", &passed, &stranger);
        })
        .unwrap();
}

#[test]
fn mutated_frames_are_never_misdelivered() {
    let routes = routes();
    routes
        .netns
        .run(|| {
            let mut datapath = egress_datapath(&routes, 61000, 65535);
            let base = udp(&out(40000), b"payload!");
            let mut redirected = 0;
            let mut resolving = 0;
            // Every truncation, and every single-byte change of the headers.
            // (BPF_PROG_TEST_RUN takes no frame shorter than an Ethernet header.)
            let mut frames: Vec<Vec<u8>> = (14..base.len()).map(|n| base[..n].to_vec()).collect();
            for at in 0..14 + 20 + 8 {
                for value in [0x00, 0x01, 0x45, 0x80, 0xff] {
                    let mut frame = base.clone();
                    frame[at] = value;
                    frames.push(frame);
                }
            }
            for frame in &frames {
                // A frame the kernel's test run refuses to build an skb from is not ours.
                let Ok((code, out_frame)) = datapath.run(PORT_PROGRAM, frame) else {
                    continue;
                };
                match code {
                    TC_ACT_OK => assert_frame("passed", &out_frame, frame),
                    TC_ACT_REDIRECT => {
                        redirected += 1;
                        // Only ever out of the uplink, from the uplink's address: to the next
                        // hop's MAC, or (no neighbour entry yet: a destination mutated to
                        // another address of the uplink's subnet) with the MACs left to
                        // bpf_redirect_neigh, which its flow says.
                        assert_eq!(&out_frame[26..30], &UPLINK_IP, "{}", show(&out_frame));
                        if out_frame[0..6] != OUTSIDE_MAC {
                            let destination = &out_frame[30..34];
                            assert!(
                                datapath.transient().iter().any(|(key, flow)| {
                                    key.dst_ip == destination
                                        && flow.flags & Flow::RESOLVE_NEIGH != 0
                                }),
                                "{}",
                                show(&out_frame)
                            );
                            resolving += 1;
                        }
                    }
                    other => panic!("unexpected action {other} for {}", show(frame)),
                }
            }
            assert!(redirected > 0, "the unmutated flow is translated");
            assert!(
                resolving > 0,
                "a destination without a neighbour entry was tried"
            );
        })
        .unwrap();
}
