//! Published-port packet tests through BPF_PROG_TEST_RUN (run as root): the uplink program's
//! DNAT and the port program's SNAT byte for byte (checksums, TTL, MACs); connection state
//! (transient until the handshake completes, established, closing, reset, expired); a SYN
//! flood that replaces only connections that were never established; a full established
//! table; frames NAT must leave alone; random and mutated frames; and the same for the
//! uplink's XDP program (`--uplink-mode xdp`), which writes the checksums itself.

use bridge_common::{
    Flow, FlowKey, IPPROTO_TCP, IPPROTO_UDP, NatEvent, PublishedKey, PublishedPort, Verdict,
};
use etherparse::PacketBuilder;
use rstest::rstest;
use xbr_tests::datapath_support::{
    Datapath, PORT_PROGRAM, TC_ACT_OK, TC_ACT_REDIRECT, TC_ACT_UNSPEC, UPLINK_PROGRAM, XDP_PASS,
    XDP_REDIRECT,
};
use xbr_tests::frames::{Addresses, UDP_CHECKSUM, assert_frame, show, tcp_numbered, udp};

const CLIENT_MAC: [u8; 6] = [0x02, 0x78, 0, 0, 0, 0x02];
const UPLINK_MAC: [u8; 6] = [0x02, 0x78, 0, 0, 0, 0x01];
const BRIDGE_MAC: [u8; 6] = [0x02, 0x77, 0, 0, 0, 0x01];
const CONTAINER_MAC: [u8; 6] = [0x02, 0x77, 0, 0, 0, 0x02];
const CLIENT_IP: [u8; 4] = [10, 78, 0, 2];
const HOST_IP: [u8; 4] = [10, 78, 0, 1];
const CONTAINER_IP: [u8; 4] = [10, 77, 0, 2];
const CONTAINER_PORT_IFINDEX: u32 = 11;
const HOST_PORT: u16 = 8080;
const CONTAINER_PORT: u16 = 80;
const CLIENT_PORT: u16 = 40000;

fn published(proto: u8, ifindex: u32) -> (PublishedKey, PublishedPort) {
    (
        PublishedKey {
            proto,
            _pad: 0,
            host_port: HOST_PORT.to_be_bytes(),
            host_ip: [0; 4],
        },
        PublishedPort {
            container_ip: CONTAINER_IP,
            container_port: CONTAINER_PORT.to_be_bytes(),
            flags: 0,
            _pad: 0,
            ifindex,
            container_mac: CONTAINER_MAC,
            gateway_mac: BRIDGE_MAC,
        },
    )
}

/// A datapath with TCP and UDP port 8080 published to the container's port 80.
fn nat_datapath(flow_capacity: Option<u32>) -> Datapath {
    let mut datapath = Datapath::load(true, flow_capacity);
    datapath.add_endpoint(CONTAINER_MAC, CONTAINER_PORT_IFINDEX);
    for proto in [IPPROTO_TCP, IPPROTO_UDP] {
        let (key, port) = published(proto, CONTAINER_PORT_IFINDEX);
        datapath.publish(key, port);
    }
    datapath
}

/// Client -> host:8080, as it arrives on the uplink.
fn inbound() -> Addresses {
    Addresses {
        eth: (CLIENT_MAC, UPLINK_MAC),
        ip: (CLIENT_IP, HOST_IP),
        ports: (CLIENT_PORT, HOST_PORT),
        ttl: 64,
    }
}

/// The same after DNAT, as it must enter the container.
fn inbound_translated() -> Addresses {
    Addresses {
        eth: (BRIDGE_MAC, CONTAINER_MAC),
        ip: (CLIENT_IP, CONTAINER_IP),
        ports: (CLIENT_PORT, CONTAINER_PORT),
        ttl: 63,
    }
}

/// The container's reply, as it arrives at its bridge port (to the gateway's MAC).
fn reply() -> Addresses {
    Addresses {
        eth: (CONTAINER_MAC, BRIDGE_MAC),
        ip: (CONTAINER_IP, CLIENT_IP),
        ports: (CONTAINER_PORT, CLIENT_PORT),
        ttl: 64,
    }
}

/// The reply after SNAT, as it must leave the uplink.
fn reply_translated() -> Addresses {
    Addresses {
        eth: (UPLINK_MAC, CLIENT_MAC),
        ip: (HOST_IP, CLIENT_IP),
        ports: (HOST_PORT, CLIENT_PORT),
        ttl: 63,
    }
}

/// A TCP segment with the builder's default numbers: sequence 1000, acknowledgment 2000 (when
/// 'A' is among `flags`).
fn tcp(a: &Addresses, flags: &str, payload: &[u8]) -> Vec<u8> {
    tcp_numbered(a, flags, 1000, 2000, payload)
}

/// Recomputes the IPv4 header checksum after a hand edit.
fn fix_ip_checksum(frame: &mut [u8]) {
    let header_len = usize::from(frame[14] & 0x0f) * 4;
    frame[24] = 0;
    frame[25] = 0;
    let mut sum: u32 = 0;
    for chunk in frame[14..14 + header_len].chunks(2) {
        sum += u32::from(u16::from_be_bytes([chunk[0], chunk[1]]));
    }
    while sum > 0xffff {
        sum = (sum & 0xffff) + (sum >> 16);
    }
    frame[24..26].copy_from_slice(&(!(sum as u16)).to_be_bytes());
}

/// Client -> host:8080 from another client port.
fn inbound_from(port: u16) -> Addresses {
    let mut a = inbound();
    a.ports.0 = port;
    a
}

/// The container's reply to the client on `port`.
fn reply_to(port: u16) -> Addresses {
    let mut a = reply();
    a.ports.1 = port;
    a
}

/// The container's initial sequence number in the handshakes of these tests.
const CONTAINER_ISN: u32 = 5000;

/// SYN, the container's SYN-ACK, the client's ACK of it: the connection from client port
/// `port` is established.
fn handshake(datapath: &mut Datapath, port: u16) {
    let (code, _) = datapath
        .run(
            UPLINK_PROGRAM,
            &tcp_numbered(&inbound_from(port), "S", 1000, 0, &[]),
        )
        .unwrap();
    assert_eq!(code, TC_ACT_REDIRECT, "port {port}: SYN");
    let syn_ack = tcp_numbered(&reply_to(port), "SA", CONTAINER_ISN, 1001, &[]);
    let (code, _) = datapath.run(PORT_PROGRAM, &syn_ack).unwrap();
    assert_eq!(code, TC_ACT_REDIRECT, "port {port}: SYN-ACK");
    let ack = tcp_numbered(&inbound_from(port), "A", 1001, CONTAINER_ISN + 1, &[]);
    let (code, _) = datapath.run(UPLINK_PROGRAM, &ack).unwrap();
    assert_eq!(code, TC_ACT_REDIRECT, "port {port}: ACK");
}

/// The inbound key of the connection from client port `port`.
fn inbound_key(port: u16) -> FlowKey {
    FlowKey {
        proto: IPPROTO_TCP,
        _pad: [0; 3],
        src_ip: CLIENT_IP,
        dst_ip: HOST_IP,
        src_port: port.to_be_bytes(),
        dst_port: HOST_PORT.to_be_bytes(),
    }
}

fn reply_key(proto: u8, port: u16) -> FlowKey {
    FlowKey {
        proto,
        _pad: [0; 3],
        src_ip: CONTAINER_IP,
        dst_ip: CLIENT_IP,
        src_port: CONTAINER_PORT.to_be_bytes(),
        dst_port: port.to_be_bytes(),
    }
}

fn has(entries: &[(FlowKey, Flow)], key: &FlowKey) -> bool {
    entries.iter().any(|(k, _)| k == key)
}

/// CLOCK_MONOTONIC in ns, the clock of bpf_ktime_get_ns.
fn monotonic_ns() -> u64 {
    let mut now = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    assert_eq!(
        unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC, &mut now) },
        0
    );
    now.tv_sec as u64 * 1_000_000_000 + now.tv_nsec as u64
}

#[test]
fn tcp_syn_is_dnated_and_the_reply_snated_byte_for_byte() {
    let mut datapath = nat_datapath(None);
    let (code, out) = datapath
        .run(UPLINK_PROGRAM, &tcp(&inbound(), "S", &[]))
        .unwrap();
    assert_eq!(code, TC_ACT_REDIRECT, "the SYN goes into the container");
    assert_frame("SYN", &out, &tcp(&inbound_translated(), "S", &[]));
    assert_eq!(datapath.verdict_count(Verdict::NatIn), 1);
    let transient = datapath.transient();
    assert_eq!(
        transient.len(),
        2,
        "both directions are tracked, as a new connection: {transient:?}"
    );
    assert!(datapath.flows().is_empty(), "{:?}", datapath.flows());

    let syn_ack = |a: &Addresses| tcp_numbered(a, "SA", CONTAINER_ISN, 1001, &[]);
    let (code, out) = datapath.run(PORT_PROGRAM, &syn_ack(&reply())).unwrap();
    assert_eq!(code, TC_ACT_REDIRECT, "the SYN-ACK goes out of the uplink");
    assert_frame("SYN-ACK", &out, &syn_ack(&reply_translated()));
    assert_eq!(datapath.verdict_count(Verdict::NatOut), 1);

    let ack = |a: &Addresses| tcp_numbered(a, "A", 1001, CONTAINER_ISN + 1, &[]);
    let (code, out) = datapath.run(UPLINK_PROGRAM, &ack(&inbound())).unwrap();
    assert_eq!(code, TC_ACT_REDIRECT);
    assert_frame("ACK", &out, &ack(&inbound_translated()));
    assert_eq!(
        datapath.flows().len(),
        2,
        "established: {:?}",
        datapath.flows()
    );
    assert!(
        datapath.transient().is_empty(),
        "{:?}",
        datapath.transient()
    );

    // Data both ways, odd-length payloads included.
    for payload in [&b"GET / HTTP/1.0\r\n\r\n"[..], b"odd", b"x"] {
        let (code, out) = datapath
            .run(UPLINK_PROGRAM, &tcp(&inbound(), "AP", payload))
            .unwrap();
        assert_eq!(code, TC_ACT_REDIRECT);
        assert_frame("data in", &out, &tcp(&inbound_translated(), "AP", payload));
        let (code, out) = datapath
            .run(PORT_PROGRAM, &tcp(&reply(), "AP", payload))
            .unwrap();
        assert_eq!(code, TC_ACT_REDIRECT);
        assert_frame("data out", &out, &tcp(&reply_translated(), "AP", payload));
    }
}

/// A connection is established only when the client acknowledges the container's SYN-ACK
/// with its exact number, which a client that spoofs its address never sees.
#[test]
fn only_the_acknowledgment_of_the_syn_ack_establishes_a_connection() {
    let mut datapath = nat_datapath(None);
    datapath
        .run(UPLINK_PROGRAM, &tcp_numbered(&inbound(), "S", 1000, 0, &[]))
        .unwrap();
    // An ACK before any SYN-ACK, and ACKs with other numbers after it: translated (the
    // container's stack decides about them), but the connection stays transient.
    let early = tcp_numbered(&inbound(), "A", 1001, CONTAINER_ISN + 1, &[]);
    assert_eq!(
        datapath.run(UPLINK_PROGRAM, &early).unwrap().0,
        TC_ACT_REDIRECT
    );
    assert!(datapath.flows().is_empty(), "{:?}", datapath.flows());
    let syn_ack = tcp_numbered(&reply(), "SA", CONTAINER_ISN, 1001, &[]);
    assert_eq!(
        datapath.run(PORT_PROGRAM, &syn_ack).unwrap().0,
        TC_ACT_REDIRECT
    );
    for (case, ack) in [
        ("a guessed number", CONTAINER_ISN + 2),
        ("the SYN-ACK's own number", CONTAINER_ISN),
    ] {
        let frame = tcp_numbered(&inbound(), "A", 1001, ack, &[]);
        assert_eq!(
            datapath.run(UPLINK_PROGRAM, &frame).unwrap().0,
            TC_ACT_REDIRECT
        );
        assert!(
            datapath.flows().is_empty(),
            "{case}: {:?}",
            datapath.flows()
        );
        let answered = datapath
            .transient()
            .iter()
            .any(|(_, flow)| flow.flags & Flow::ANSWERED != 0);
        assert!(answered, "{case}: the container's answer is remembered");
    }
    assert_eq!(datapath.event_count(NatEvent::Established), 0);
    let frame = tcp_numbered(&inbound(), "AP", 1001, CONTAINER_ISN + 1, b"request");
    assert_eq!(
        datapath.run(UPLINK_PROGRAM, &frame).unwrap().0,
        TC_ACT_REDIRECT
    );
    assert_eq!(datapath.event_count(NatEvent::Established), 1);
    assert_eq!(datapath.flows().len(), 2);
    assert!(
        datapath
            .flows()
            .iter()
            .all(|(_, flow)| flow.flags & Flow::ESTABLISHED != 0)
    );
    assert!(
        datapath.transient().is_empty(),
        "{:?}",
        datapath.transient()
    );
}

#[test]
fn udp_is_translated_and_a_zero_checksum_stays_zero() {
    let mut datapath = nat_datapath(None);
    for payload in [&b"even"[..], b"odd", b""] {
        let (code, out) = datapath
            .run(UPLINK_PROGRAM, &udp(&inbound(), payload))
            .unwrap();
        assert_eq!(code, TC_ACT_REDIRECT, "{payload:?}");
        assert_frame("UDP in", &out, &udp(&inbound_translated(), payload));
        let (code, out) = datapath.run(PORT_PROGRAM, &udp(&reply(), payload)).unwrap();
        assert_eq!(code, TC_ACT_REDIRECT, "{payload:?}");
        assert_frame("UDP out", &out, &udp(&reply_translated(), payload));
    }
    // UDP over IPv4 may go without a checksum (0): translation must not invent one.
    let mut frame = udp(&inbound(), b"no checksum");
    frame[UDP_CHECKSUM..UDP_CHECKSUM + 2].copy_from_slice(&[0, 0]);
    let (code, out) = datapath.run(UPLINK_PROGRAM, &frame).unwrap();
    assert_eq!(code, TC_ACT_REDIRECT);
    let mut want = udp(&inbound_translated(), b"no checksum");
    want[UDP_CHECKSUM..UDP_CHECKSUM + 2].copy_from_slice(&[0, 0]);
    assert_frame("UDP without checksum", &out, &want);
}

/// A UDP flow is established like conntrack assures one: the container answered, and the
/// client still sends 2 s after the flow opened. Until then it is transient.
#[test]
fn a_udp_flow_is_established_when_it_is_a_stream() {
    let mut datapath = nat_datapath(None);
    assert_eq!(
        datapath
            .run(UPLINK_PROGRAM, &udp(&inbound(), b"query"))
            .unwrap()
            .0,
        TC_ACT_REDIRECT
    );
    assert_eq!(
        datapath
            .run(UPLINK_PROGRAM, &udp(&inbound(), b"again"))
            .unwrap()
            .0,
        TC_ACT_REDIRECT
    );
    assert_eq!(datapath.transient().len(), 2, "not answered: transient");
    assert_eq!(
        datapath
            .run(PORT_PROGRAM, &udp(&reply(), b"answer"))
            .unwrap()
            .0,
        TC_ACT_REDIRECT
    );
    assert_eq!(
        datapath
            .run(UPLINK_PROGRAM, &udp(&inbound(), b"more"))
            .unwrap()
            .0,
        TC_ACT_REDIRECT
    );
    assert!(
        datapath.flows().is_empty(),
        "answered, but younger than 2 s: {:?}",
        datapath.flows()
    );
    // The flow opened 3 s ago (as if).
    let key = FlowKey {
        proto: IPPROTO_UDP,
        ..inbound_key(CLIENT_PORT)
    };
    let (_, mut flow) = datapath
        .transient()
        .into_iter()
        .find(|(k, _)| *k == key)
        .unwrap();
    flow.opened_ns = flow.opened_ns.saturating_sub(3_000_000_000);
    datapath.put_transient(key, flow);
    assert_eq!(
        datapath
            .run(UPLINK_PROGRAM, &udp(&inbound(), b"stream"))
            .unwrap()
            .0,
        TC_ACT_REDIRECT
    );
    assert_eq!(
        datapath.flows().len(),
        2,
        "a stream now: {:?}",
        datapath.flows()
    );
    assert!(datapath.transient().is_empty());
    assert_eq!(
        datapath
            .run(PORT_PROGRAM, &udp(&reply(), b"answer"))
            .unwrap()
            .0,
        TC_ACT_REDIRECT
    );
}

#[test]
fn fin_both_ways_closes_a_connection_and_rst_ends_one() {
    let mut datapath = nat_datapath(None);
    handshake(&mut datapath, CLIENT_PORT);
    let (code, _) = datapath
        .run(UPLINK_PROGRAM, &tcp(&inbound(), "AF", &[]))
        .unwrap();
    assert_eq!(
        code, TC_ACT_REDIRECT,
        "a FIN is translated like any segment"
    );
    assert!(
        datapath
            .flows()
            .iter()
            .any(|(_, flow)| flow.flags & Flow::FIN_SEEN != 0),
        "the FIN is remembered: {:?}",
        datapath.flows()
    );
    // Half closed: the other direction goes on.
    let (code, _) = datapath
        .run(PORT_PROGRAM, &tcp(&reply(), "AP", b"the rest"))
        .unwrap();
    assert_eq!(code, TC_ACT_REDIRECT);
    assert_eq!(datapath.flows().len(), 2, "half closed is established");
    let (code, _) = datapath
        .run(PORT_PROGRAM, &tcp(&reply(), "AF", &[]))
        .unwrap();
    assert_eq!(code, TC_ACT_REDIRECT);
    assert!(
        datapath.flows().is_empty(),
        "closed both ways: no longer established: {:?}",
        datapath.flows()
    );
    let transient = datapath.transient();
    assert_eq!(transient.len(), 2, "{transient:?}");
    assert!(
        transient
            .iter()
            .all(|(_, flow)| flow.flags & Flow::CLOSING != 0)
    );
    assert_eq!(datapath.event_count(NatEvent::Closed), 1);
    // The last ACK still goes through; then a new connection on the same tuple.
    let (code, out) = datapath
        .run(UPLINK_PROGRAM, &tcp(&inbound(), "A", &[]))
        .unwrap();
    assert_eq!(code, TC_ACT_REDIRECT);
    assert_frame("last ACK", &out, &tcp(&inbound_translated(), "A", &[]));
    handshake(&mut datapath, CLIENT_PORT);
    assert_eq!(datapath.flows().len(), 2, "{:?}", datapath.flows());

    let (code, out) = datapath
        .run(PORT_PROGRAM, &tcp(&reply(), "R", &[]))
        .unwrap();
    assert_eq!(
        code, TC_ACT_REDIRECT,
        "the RST itself still reaches the client"
    );
    assert_frame("RST", &out, &tcp(&reply_translated(), "R", &[]));
    assert!(
        datapath.flows().is_empty() && datapath.transient().is_empty(),
        "RST ends both directions: {:?} {:?}",
        datapath.flows(),
        datapath.transient()
    );
    assert_eq!(datapath.event_count(NatEvent::Reset), 1);
    // The connection is gone: a late segment is not translated.
    let late = tcp(&inbound(), "A", b"late");
    let (code, out) = datapath.run(UPLINK_PROGRAM, &late).unwrap();
    assert_eq!((code, out), (TC_ACT_UNSPEC, late));
}

/// A flood of SYNs from spoofed sources, many times what the transient table holds: every
/// SYN still gets through (the oldest transient entries make room), an established
/// connection is untouched, and what was replaced is counted.
#[test]
fn a_syn_flood_replaces_only_connections_that_were_never_established() {
    const TRANSIENT_ENTRIES: u32 = 512;
    const FLOOD: u32 = 5000;
    let mut datapath = Datapath::load_sized(true, Some(16), Some(TRANSIENT_ENTRIES));
    datapath.add_endpoint(CONTAINER_MAC, CONTAINER_PORT_IFINDEX);
    let (key, port) = published(IPPROTO_TCP, CONTAINER_PORT_IFINDEX);
    datapath.publish(key, port);
    handshake(&mut datapath, CLIENT_PORT);

    let spoofed = |n: u32| Addresses {
        ip: ([10, 79, (n >> 8) as u8, n as u8], HOST_IP),
        ..inbound_from(1024 + (n % 60000) as u16)
    };
    for n in 0..FLOOD {
        let (code, _) = datapath
            .run(UPLINK_PROGRAM, &tcp_numbered(&spoofed(n), "S", n, 0, &[]))
            .unwrap();
        assert_eq!(code, TC_ACT_REDIRECT, "spoofed SYN {n} is not refused");
        // The container answers every one; the SYN-ACKs go out to addresses that never answer.
        let mut syn_ack = reply_to(1024 + (n % 60000) as u16);
        syn_ack.ip.1 = spoofed(n).ip.0;
        let (code, _) = datapath
            .run(
                PORT_PROGRAM,
                &tcp_numbered(&syn_ack, "SA", CONTAINER_ISN, n + 1, &[]),
            )
            .unwrap();
        assert!(
            code == TC_ACT_REDIRECT || code == TC_ACT_OK,
            "SYN-ACK {n}: {code}"
        );
    }
    assert_eq!(datapath.verdict_count(Verdict::NatTableFull), 0);
    assert_eq!(datapath.event_count(NatEvent::Opened), 1 + u64::from(FLOOD));

    // The established connection is where it was, and still works both ways.
    let established = datapath.flows();
    assert_eq!(established.len(), 2, "{established:?}");
    assert!(has(&established, &inbound_key(CLIENT_PORT)));
    let (code, out) = datapath
        .run(UPLINK_PROGRAM, &tcp(&inbound(), "AP", b"after"))
        .unwrap();
    assert_eq!(code, TC_ACT_REDIRECT);
    assert_frame(
        "in, after",
        &out,
        &tcp(&inbound_translated(), "AP", b"after"),
    );
    let (code, out) = datapath
        .run(PORT_PROGRAM, &tcp(&reply(), "AP", b"after"))
        .unwrap();
    assert_eq!(code, TC_ACT_REDIRECT);
    assert_frame(
        "out, after",
        &out,
        &tcp(&reply_translated(), "AP", b"after"),
    );

    // The transient table holds what fits, the latest, and the oldest made room.
    let transient = datapath.transient();
    assert!(
        transient.len() <= TRANSIENT_ENTRIES as usize,
        "{}",
        transient.len()
    );
    let key_of = |n: u32| FlowKey {
        src_ip: spoofed(n).ip.0,
        ..inbound_key(1024 + (n % 60000) as u16)
    };
    assert!(
        has(&transient, &key_of(FLOOD - 1)),
        "the newest SYN's state is there"
    );
    assert!(
        !has(&transient, &key_of(0)),
        "the oldest SYN's state made room"
    );
    let added = datapath.event_count(NatEvent::TransientAdded);
    let removed = datapath.event_count(NatEvent::TransientRemoved);
    let replaced = added - removed - transient.len() as u64;
    assert!(
        replaced >= 2 * u64::from(FLOOD) - u64::from(TRANSIENT_ENTRIES),
        "replaced {replaced} entries (added {added}, removed {removed}, left {})",
        transient.len()
    );
    // A legitimate client connects after the flood as before it.
    handshake(&mut datapath, CLIENT_PORT + 1);
}

/// The LRU replaces entries one at a time: a connection that lost one direction gets it
/// back from the other side's next frame.
#[test]
fn a_connection_that_lost_one_direction_gets_it_back() {
    // BPF_PROG_TEST_RUN runs a tc program as if on ifindex 1: the container's port is 1 here,
    // so that the datapath can check that the SYN-ACK came from the container's port.
    const TEST_RUN_IFINDEX: u32 = 1;
    let mut datapath = Datapath::load(true, None);
    datapath.add_endpoint(CONTAINER_MAC, TEST_RUN_IFINDEX);
    let (key, port) = published(IPPROTO_TCP, TEST_RUN_IFINDEX);
    datapath.publish(key, port);
    // The inbound direction went between SYN and SYN-ACK: the SYN-ACK brings it back, and
    // the client's ACK establishes the connection.
    datapath
        .run(UPLINK_PROGRAM, &tcp_numbered(&inbound(), "S", 1000, 0, &[]))
        .unwrap();
    datapath.drop_transient(&inbound_key(CLIENT_PORT));
    let syn_ack = tcp_numbered(&reply(), "SA", CONTAINER_ISN, 1001, &[]);
    let (code, out) = datapath.run(PORT_PROGRAM, &syn_ack).unwrap();
    assert_eq!(code, TC_ACT_REDIRECT);
    assert_frame(
        "SYN-ACK",
        &out,
        &tcp_numbered(&reply_translated(), "SA", CONTAINER_ISN, 1001, &[]),
    );
    let ack = tcp_numbered(&inbound(), "A", 1001, CONTAINER_ISN + 1, &[]);
    let (code, out) = datapath.run(UPLINK_PROGRAM, &ack).unwrap();
    assert_eq!(code, TC_ACT_REDIRECT);
    assert_frame(
        "ACK",
        &out,
        &tcp_numbered(&inbound_translated(), "A", 1001, CONTAINER_ISN + 1, &[]),
    );
    assert_eq!(datapath.flows().len(), 2, "{:?}", datapath.flows());

    // The reply direction went: the client's retransmitted SYN brings it back.
    let port = CLIENT_PORT + 1;
    datapath
        .run(UPLINK_PROGRAM, &tcp(&inbound_from(port), "S", &[]))
        .unwrap();
    datapath.drop_transient(&reply_key(IPPROTO_TCP, port));
    assert_eq!(
        datapath
            .run(UPLINK_PROGRAM, &tcp(&inbound_from(port), "S", &[]))
            .unwrap()
            .0,
        TC_ACT_REDIRECT
    );
    assert!(has(&datapath.transient(), &reply_key(IPPROTO_TCP, port)));
    let (code, out) = datapath
        .run(PORT_PROGRAM, &tcp(&reply_to(port), "SA", &[]))
        .unwrap();
    assert_eq!(code, TC_ACT_REDIRECT);
    let mut want = reply_translated();
    want.ports.1 = port;
    assert_frame("SYN-ACK", &out, &tcp(&want, "SA", &[]));
}

/// With the established table full, a connection whose handshake completes stays in the
/// transient table (counted), works, and moves over once there is room.
#[test]
fn a_full_established_table_keeps_new_connections_transient_until_there_is_room() {
    let mut datapath = nat_datapath(Some(2));
    handshake(&mut datapath, CLIENT_PORT);
    handshake(&mut datapath, CLIENT_PORT + 1);
    assert_eq!(datapath.event_count(NatEvent::EstablishedTableFull), 1);
    assert!(has(&datapath.flows(), &inbound_key(CLIENT_PORT)));
    let transient = datapath.transient();
    assert_eq!(transient.len(), 2, "{transient:?}");
    assert!(
        transient
            .iter()
            .all(|(_, flow)| flow.flags & Flow::ESTABLISHED != 0),
        "established, where it is: {transient:?}"
    );
    // It works both ways.
    let (code, _) = datapath
        .run(
            UPLINK_PROGRAM,
            &tcp(&inbound_from(CLIENT_PORT + 1), "AP", b"x"),
        )
        .unwrap();
    assert_eq!(code, TC_ACT_REDIRECT);
    let (code, _) = datapath
        .run(PORT_PROGRAM, &tcp(&reply_to(CLIENT_PORT + 1), "AP", b"y"))
        .unwrap();
    assert_eq!(code, TC_ACT_REDIRECT);
    assert_eq!(
        datapath.event_count(NatEvent::EstablishedTableFull),
        1,
        "counted once per connection"
    );
    // The client half-closes while it waits.
    let (code, _) = datapath
        .run(
            UPLINK_PROGRAM,
            &tcp(&inbound_from(CLIENT_PORT + 1), "AF", &[]),
        )
        .unwrap();
    assert_eq!(code, TC_ACT_REDIRECT);
    // The first connection ends; the second moves over with its next frame.
    datapath
        .run(PORT_PROGRAM, &tcp(&reply(), "R", &[]))
        .unwrap();
    let (code, _) = datapath
        .run(
            UPLINK_PROGRAM,
            &tcp(&inbound_from(CLIENT_PORT + 1), "A", &[]),
        )
        .unwrap();
    assert_eq!(code, TC_ACT_REDIRECT);
    let moved = datapath.flows();
    let (_, inbound) = moved
        .iter()
        .find(|(key, _)| *key == inbound_key(CLIENT_PORT + 1))
        .unwrap_or_else(|| panic!("moved to the established table: {moved:?}"));
    assert_ne!(
        inbound.flags & Flow::FIN_SEEN,
        0,
        "the FIN it sent while it waited is remembered: {inbound:?}"
    );
    assert!(
        datapath.transient().is_empty(),
        "{:?}",
        datapath.transient()
    );
    assert_eq!(datapath.event_count(NatEvent::Established), 2);
}

/// Transient state past its lifetime is not used, even when nothing removed it (no process
/// runs): a segment of that connection goes to the kernel, a new SYN opens it again.
#[test]
fn expired_transient_state_is_not_used() {
    let mut datapath = nat_datapath(None);
    datapath
        .run(UPLINK_PROGRAM, &tcp(&inbound(), "S", &[]))
        .unwrap();
    // "A lifetime and a second ago" must be after boot (a fresh VM of the kernel matrix).
    let age = bridge_common::lifetime::TRANSIENT_NS + 1_000_000_000;
    let uptime = monotonic_ns();
    if uptime <= age {
        std::thread::sleep(std::time::Duration::from_nanos(age + 1_000_000 - uptime));
    }
    let long_ago = monotonic_ns() - age;
    for (key, mut flow) in datapath.transient() {
        flow.last_seen_ns = long_ago;
        datapath.put_transient(key, flow);
    }
    let late = tcp(&inbound(), "A", b"late");
    let (code, out) = datapath.run(UPLINK_PROGRAM, &late).unwrap();
    assert_eq!((code, out), (TC_ACT_UNSPEC, late), "not translated");
    let answer = tcp(&reply(), "SA", &[]);
    let (code, out) = datapath.run(PORT_PROGRAM, &answer).unwrap();
    assert_eq!(
        (code, out),
        (TC_ACT_OK, answer),
        "the container's late answer is not ours either"
    );
    let (code, _) = datapath
        .run(UPLINK_PROGRAM, &tcp(&inbound(), "S", &[]))
        .unwrap();
    assert_eq!(code, TC_ACT_REDIRECT, "a new SYN opens it again");
    assert!(
        datapath
            .transient()
            .iter()
            .all(|(_, flow)| flow.last_seen_ns > long_ago)
    );
}

/// A first fragment of a published port's datagram.
fn first_fragment() -> Vec<u8> {
    let mut fragment = udp(&inbound(), b"first fragment");
    fragment[20] |= 0x20; // more fragments
    fix_ip_checksum(&mut fragment);
    fragment
}

/// A later fragment (offset 16 * 8) of a published port's datagram.
fn later_fragment() -> Vec<u8> {
    let mut fragment = udp(&inbound(), b"later fragment");
    fragment[21] = 0x10;
    fix_ip_checksum(&mut fragment);
    fragment
}

/// A SYN to the published port whose IP header carries options (NOP NOP NOP EOL).
fn syn_with_ip_options() -> Vec<u8> {
    let mut options = tcp(&inbound(), "S", &[]);
    options.splice(34..34, [1u8, 1, 1, 0]);
    options[14] = 0x46;
    let total = u16::from_be_bytes([options[16], options[17]]) + 4;
    options[16..18].copy_from_slice(&total.to_be_bytes());
    fix_ip_checksum(&mut options);
    options
}

/// A SYN whose IP header says it carries 10 bytes of TCP.
fn syn_cut_short() -> Vec<u8> {
    let mut tcp_cut = tcp(&inbound(), "S", &[]);
    tcp_cut[16..18].copy_from_slice(&30u16.to_be_bytes());
    fix_ip_checksum(&mut tcp_cut);
    tcp_cut
}

/// A SYN to the published port whose IP header claims `len` bytes (too few: below 20).
fn syn_with_header_length(len: u8) -> Vec<u8> {
    let mut frame = tcp(&inbound(), "S", &[]);
    frame[14] = 0x40 | (len / 4);
    fix_ip_checksum(&mut frame);
    frame
}

fn syn_to_port(host_port: u16) -> Vec<u8> {
    let mut other_port = inbound();
    other_port.ports.1 = host_port;
    tcp(&other_port, "S", &[])
}

fn syn_with_ttl(ttl: u8) -> Vec<u8> {
    let mut dying = inbound();
    dying.ttl = ttl;
    tcp(&dying, "S", &[])
}

/// ICMP port unreachable from the client about a (translated) connection.
fn icmp_error() -> Vec<u8> {
    let mut icmp_error = Vec::new();
    PacketBuilder::ethernet2(CLIENT_MAC, UPLINK_MAC)
        .ipv4(CLIENT_IP, HOST_IP, 64)
        .icmpv4_raw(3, 3, [0; 4])
        .write(&mut icmp_error, &tcp(&reply_translated(), "S", &[])[14..42])
        .unwrap();
    icmp_error
}

/// Who has the host's address, from the client (an Ethernet frame that is not IP).
fn arp_request() -> Vec<u8> {
    let mut arp = vec![0xff; 6];
    arp.extend_from_slice(&CLIENT_MAC);
    arp.extend_from_slice(&[0x08, 0x06, 0, 1, 0x08, 0, 6, 4, 0, 1]);
    arp.extend_from_slice(&CLIENT_MAC);
    arp.extend_from_slice(&CLIENT_IP);
    arp.extend_from_slice(&[0; 6]);
    arp.extend_from_slice(&HOST_IP);
    arp
}

fn ipv6_syn() -> Vec<u8> {
    let mut ipv6 = Vec::new();
    PacketBuilder::ethernet2(CLIENT_MAC, UPLINK_MAC)
        .ipv6([0xfd; 16], [0xfe; 16], 64)
        .tcp(CLIENT_PORT, HOST_PORT, 1, 1000)
        .syn()
        .write(&mut ipv6, &[])
        .unwrap();
    ipv6
}

/// The uplink's two programs: tc (`--uplink-mode tc`) and XDP (`--uplink-mode xdp`).
#[derive(Clone, Copy, Debug)]
enum Uplink {
    Tc,
    Xdp,
}

/// Frames NAT must leave alone, each a test of its own for each uplink program, on a fresh
/// datapath with a published TCP and UDP port: tc passes them on unchanged to the kernel
/// (`TC_ACT_UNSPEC`) and counts the verdict given (every frame it passes has one); XDP passes
/// them on unchanged to tc and counts nothing (tc counts what it passes). Neither opens a
/// connection.
#[rstest]
#[case::a_port_nobody_published(syn_to_port(9090), Verdict::NotPublished)]
#[case::tcp_without_syn_no_connection(tcp(&inbound(), "A", b"data"), Verdict::NatNotTranslated)]
#[case::syn_ack_from_outside(tcp(&inbound(), "SA", &[]), Verdict::NatNotTranslated)]
#[case::first_fragment(first_fragment(), Verdict::NatNotTranslated)]
#[case::later_fragment(later_fragment(), Verdict::NatNotTranslated)]
#[case::ip_options(syn_with_ip_options(), Verdict::NatNotTranslated)]
#[case::tcp_header_cut_short(syn_cut_short(), Verdict::Malformed)]
#[case::ip_header_length_below_20(syn_with_header_length(16), Verdict::Malformed)]
#[case::ttl_about_to_expire(syn_with_ttl(1), Verdict::NatNotTranslated)]
#[case::icmp_error_about_a_connection(icmp_error(), Verdict::NotPublished)]
#[case::ipv6(ipv6_syn(), Verdict::NotPublished)]
#[case::arp(arp_request(), Verdict::NotPublished)]
fn frames_nat_must_not_touch_pass_unchanged(
    #[case] frame: Vec<u8>,
    #[case] verdict: Verdict,
    #[values(Uplink::Tc, Uplink::Xdp)] uplink: Uplink,
) {
    let mut datapath = nat_datapath(None);
    match uplink {
        Uplink::Tc => {
            let (code, out) = datapath.run(UPLINK_PROGRAM, &frame).unwrap();
            assert_eq!(code, TC_ACT_UNSPEC, "must go on to the kernel");
            assert_frame("tc", &out, &frame);
        }
        Uplink::Xdp => {
            let (code, out) = datapath.run_xdp(&frame).unwrap();
            assert_eq!(code, XDP_PASS, "must go on to tc and the kernel");
            assert_frame("xdp", &out, &frame);
        }
    }
    for counted in Verdict::ALL {
        let wanted = match uplink {
            Uplink::Tc => u64::from(counted == verdict),
            Uplink::Xdp => 0,
        };
        assert_eq!(
            datapath.verdict_count(counted),
            wanted,
            "{uplink:?}: verdict {counted:?} (XDP counts only what it delivers)"
        );
    }
    assert!(
        datapath.flows().is_empty() && datapath.transient().is_empty(),
        "no connection was opened: {:?} {:?}",
        datapath.flows(),
        datapath.transient()
    );
}

/// A published port whose container is not on the bridge now: the kernel's.
#[test]
fn a_published_port_without_its_container_is_the_kernels() {
    let mut datapath = Datapath::load(true, None);
    let (key, port) = published(IPPROTO_TCP, 0);
    datapath.publish(key, port);
    let frame = tcp(&inbound(), "S", &[]);
    let (code, out) = datapath.run(UPLINK_PROGRAM, &frame).unwrap();
    assert_eq!((code, out), (TC_ACT_UNSPEC, frame));
}

/// Before its first published port an attachment has no connection tables (their slots are
/// empty): nothing is translated, every frame goes on unchanged, and a published port found
/// without tables (which the control plane never writes: it makes the tables first) is left to
/// the kernel as when the tables are full.
#[test]
fn without_connection_tables_frames_go_on_unchanged() {
    let mut datapath = Datapath::load_without_connection_tables(true);
    datapath.add_endpoint(CONTAINER_MAC, CONTAINER_PORT_IFINDEX);
    let reply = tcp(&reply(), "SA", &[]);
    let (code, out) = datapath.run(PORT_PROGRAM, &reply).unwrap();
    assert_eq!(code, TC_ACT_OK, "a frame to the gateway goes to the bridge");
    assert_frame("reply without tables", &out, &reply);

    let (key, port) = published(IPPROTO_TCP, CONTAINER_PORT_IFINDEX);
    datapath.publish(key, port);
    let syn = tcp(&inbound(), "S", &[]);
    let before = datapath.verdict_count(Verdict::NatTableFull);
    let (code, out) = datapath.run(UPLINK_PROGRAM, &syn).unwrap();
    assert_eq!(code, TC_ACT_UNSPEC, "the SYN goes on to the kernel");
    assert_frame("SYN without tables", &out, &syn);
    assert_eq!(datapath.verdict_count(Verdict::NatTableFull), before + 1);
    let (action, out) = datapath.run_xdp(&syn).unwrap();
    assert_eq!(action, XDP_PASS, "XDP leaves it to tc");
    assert_frame("SYN without tables, XDP", &out, &syn);
}

/// Connections carry the container's port with them; when the container leaves that port
/// (stopped, restarted elsewhere, port recycled), they must not follow the port.
#[test]
fn a_connection_never_follows_a_port_its_container_left() {
    let mut datapath = nat_datapath(None);
    let (code, _) = datapath
        .run(UPLINK_PROGRAM, &tcp(&inbound(), "S", &[]))
        .unwrap();
    assert_eq!(code, TC_ACT_REDIRECT);

    // Another container now holds the port (the control plane rewrote its record).
    const OTHER_MAC: [u8; 6] = [0x02, 0x77, 0, 0, 0, 0x99];
    datapath.add_endpoint(OTHER_MAC, CONTAINER_PORT_IFINDEX);
    let segment = tcp(&inbound(), "A", b"for the old container");
    let (code, out) = datapath.run(UPLINK_PROGRAM, &segment).unwrap();
    assert_eq!(
        (code, out),
        (TC_ACT_UNSPEC, segment),
        "not delivered to the port's new container"
    );
    assert_eq!(datapath.verdict_count(Verdict::StaleEndpoint), 1);
    assert!(
        datapath.flows().is_empty() && datapath.transient().is_empty(),
        "the connection is over: {:?} {:?}",
        datapath.flows(),
        datapath.transient()
    );

    // The container came back on another port: the published port points there, and a
    // (retransmitted) SYN opens the connection toward it.
    const NEW_PORT: u32 = 12;
    const NEW_MAC: [u8; 6] = [0x02, 0x77, 0, 0, 0, 0x03];
    datapath.add_endpoint(NEW_MAC, NEW_PORT);
    let (key, mut port) = published(IPPROTO_TCP, NEW_PORT);
    port.container_mac = NEW_MAC;
    datapath.publish(key, port);
    let (code, out) = datapath
        .run(UPLINK_PROGRAM, &tcp(&inbound(), "S", &[]))
        .unwrap();
    assert_eq!(code, TC_ACT_REDIRECT);
    assert_eq!(
        &out[0..6],
        &NEW_MAC,
        "delivered to the container's new port"
    );
    assert_eq!(
        datapath.port_stats(NEW_PORT).delivered_packets,
        1,
        "{:?} {:?} {:?}",
        datapath.port_stats(NEW_PORT),
        datapath.port_stats(CONTAINER_PORT_IFINDEX),
        datapath.port_stats(1)
    );
}

/// xorshift64*: deterministic, so a failure can be replayed.
struct Random(u64);

impl Random {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }

    fn below(&mut self, n: usize) -> usize {
        (self.next() % n as u64) as usize
    }

    /// Every fourth round a frame of random bytes, otherwise one of `seeds` with up to three
    /// bytes changed and, one time in four, cut short.
    fn frame(&mut self, round: usize, seeds: &[Vec<u8>]) -> Vec<u8> {
        if round.is_multiple_of(4) {
            let len = 14 + self.below(120);
            return (0..len).map(|_| self.next() as u8).collect();
        }
        let mut frame = seeds[self.below(seeds.len())].clone();
        for _ in 0..1 + self.below(3) {
            let at = self.below(frame.len());
            frame[at] = self.next() as u8;
        }
        if self.below(4) == 0 {
            let keep = 14 + self.below(frame.len() - 13);
            frame.truncate(keep);
        }
        frame
    }
}

/// Random frames, and valid ones with random bytes changed or cut off, through both programs:
/// nothing crashes, everything not translated comes out unchanged, and whatever is
/// translated was for the published port and goes to the container.
#[test]
fn random_and_mutated_frames_never_misdeliver() {
    let mut datapath = nat_datapath(None);
    let mut random = Random(0x005e_ed0f_0b5e_55ed);
    let seeds = [
        tcp(&inbound(), "S", b""),
        tcp(&inbound(), "AP", b"payload"),
        udp(&inbound(), b"datagram"),
        tcp(&reply(), "SA", b""),
        udp(&reply(), b"answer"),
    ];
    let mut translated = 0;
    for round in 0..4000 {
        let frame = random.frame(round, &seeds);
        for program in [UPLINK_PROGRAM, PORT_PROGRAM] {
            let mut connections = datapath.flows();
            connections.extend(datapath.transient());
            // The kernel refuses some frames (IP shorter than an IP header): not the program's.
            let Ok((code, out)) = datapath.run(program, &frame) else {
                continue;
            };
            match code {
                TC_ACT_OK | TC_ACT_UNSPEC => {
                    assert_frame(&format!("round {round}, {program}: passed"), &out, &frame)
                }
                TC_ACT_REDIRECT => {
                    translated += 1;
                    let (dst_mac, dst_ip, dst_port) = (
                        &out[0..6],
                        &out[30..34],
                        u16::from_be_bytes([out[36], out[37]]),
                    );
                    let into_container = dst_mac == CONTAINER_MAC
                        && dst_ip == CONTAINER_IP
                        && dst_port == CONTAINER_PORT;
                    // A reply goes back exactly where a connection came from (the frame that
                    // opened it may itself have been a mutated one).
                    let to_client = connections.iter().any(|(key, flow)| {
                        flow.flags & Flow::INBOUND != 0
                            && key.src_ip == dst_ip
                            && key.src_port == out[36..38]
                            && key.dst_ip == out[26..30]
                            && key.dst_port == out[34..36]
                    });
                    assert!(
                        (program == UPLINK_PROGRAM && into_container)
                            || (program == PORT_PROGRAM && to_client),
                        "round {round}, {program}: redirected somewhere else\n in: {}\nout: {}",
                        show(&frame),
                        show(&out)
                    );
                    assert_eq!(
                        out[22],
                        frame[22] - 1,
                        "round {round}: TTL decremented once"
                    );
                }
                other => panic!("round {round}, {program}: unexpected return code {other}"),
            }
        }
    }
    assert!(
        translated > 100,
        "the mutations kept enough frames valid to exercise NAT ({translated})"
    );
}

// The uplink's XDP program (`--uplink-mode xdp`): the same translation as the tc program,
// with the checksums computed by the program itself (RFC 1624), byte for byte.

#[test]
fn xdp_dnats_a_tcp_syn_and_data_byte_for_byte() {
    let mut datapath = nat_datapath(None);
    let (code, out) = datapath.run_xdp(&tcp(&inbound(), "S", &[])).unwrap();
    assert_eq!(code, XDP_REDIRECT, "the SYN goes into the container's port");
    assert_frame("XDP SYN", &out, &tcp(&inbound_translated(), "S", &[]));
    assert_eq!(datapath.verdict_count(Verdict::NatInXdp), 1);
    assert_eq!(
        datapath.verdict_count(Verdict::NatIn),
        0,
        "nat_in is the tc program's"
    );
    assert_eq!(datapath.transient().len(), 2, "both directions are tracked");
    assert_eq!(
        datapath
            .port_stats(CONTAINER_PORT_IFINDEX)
            .delivered_packets,
        1
    );

    // The reply direction is the tc program's, on the connection XDP opened.
    let (code, out) = datapath
        .run(PORT_PROGRAM, &tcp(&reply(), "SA", &[]))
        .unwrap();
    assert_eq!(code, TC_ACT_REDIRECT);
    assert_frame("SYN-ACK", &out, &tcp(&reply_translated(), "SA", &[]));

    for payload in [&b"GET / HTTP/1.0\r\n\r\n"[..], b"odd", b"x", b""] {
        let (code, out) = datapath.run_xdp(&tcp(&inbound(), "AP", payload)).unwrap();
        assert_eq!(code, XDP_REDIRECT, "{payload:?}");
        assert_frame(
            "XDP data in",
            &out,
            &tcp(&inbound_translated(), "AP", payload),
        );
    }
    // And the tc program translates the same connection the same way (a frame XDP passed).
    let (code, out) = datapath
        .run(UPLINK_PROGRAM, &tcp(&inbound(), "A", b"tc"))
        .unwrap();
    assert_eq!(code, TC_ACT_REDIRECT);
    assert_frame("tc data in", &out, &tcp(&inbound_translated(), "A", b"tc"));

    // The client's ACK of the SYN-ACK, through XDP, establishes the connection.
    let ack = tcp_numbered(&inbound(), "A", 1001, CONTAINER_ISN + 1, &[]);
    let syn_ack = tcp_numbered(&reply(), "SA", CONTAINER_ISN, 1001, &[]);
    assert_eq!(
        datapath.run(PORT_PROGRAM, &syn_ack).unwrap().0,
        TC_ACT_REDIRECT
    );
    let (code, out) = datapath.run_xdp(&ack).unwrap();
    assert_eq!(code, XDP_REDIRECT);
    assert_frame(
        "XDP ACK",
        &out,
        &tcp_numbered(&inbound_translated(), "A", 1001, CONTAINER_ISN + 1, &[]),
    );
    assert_eq!(
        datapath.flows().len(),
        2,
        "established: {:?}",
        datapath.flows()
    );

    // RST ends the connection from XDP too.
    let (code, _) = datapath.run_xdp(&tcp(&inbound(), "R", &[])).unwrap();
    assert_eq!(code, XDP_REDIRECT);
    assert!(datapath.flows().is_empty(), "{:?}", datapath.flows());
    assert!(
        datapath.transient().is_empty(),
        "{:?}",
        datapath.transient()
    );
}

#[test]
fn xdp_translates_udp_and_a_zero_checksum_stays_zero() {
    let mut datapath = nat_datapath(None);
    for payload in [&b"even"[..], b"odd", b"", b"a longer odd-length datagram"] {
        let (code, out) = datapath.run_xdp(&udp(&inbound(), payload)).unwrap();
        assert_eq!(code, XDP_REDIRECT, "{payload:?}");
        assert_frame("XDP UDP in", &out, &udp(&inbound_translated(), payload));
        let (code, out) = datapath.run(PORT_PROGRAM, &udp(&reply(), payload)).unwrap();
        assert_eq!(code, TC_ACT_REDIRECT, "{payload:?}");
        assert_frame("UDP out", &out, &udp(&reply_translated(), payload));
    }
    let mut frame = udp(&inbound(), b"no checksum");
    frame[UDP_CHECKSUM..UDP_CHECKSUM + 2].copy_from_slice(&[0, 0]);
    let (code, out) = datapath.run_xdp(&frame).unwrap();
    assert_eq!(code, XDP_REDIRECT);
    let mut want = udp(&inbound_translated(), b"no checksum");
    want[UDP_CHECKSUM..UDP_CHECKSUM + 2].copy_from_slice(&[0, 0]);
    assert_frame("XDP UDP without checksum", &out, &want);
    assert_eq!(datapath.verdict_count(Verdict::NatInXdp), 5);
}

/// Random source ports and payloads: the incremental update always equals a full
/// recomputation (etherparse's), including the checksums that come out 0x0000/0xffff.
#[test]
fn xdp_checksums_equal_full_recomputation_for_many_frames() {
    let mut datapath = nat_datapath(Some(4096));
    let mut random = Random(0x0dd_c0ffee);
    for round in 0..600u16 {
        let mut client = inbound();
        client.ports.0 = 1024 + round;
        client.ip.0 = [
            10,
            78,
            (random.next() % 256) as u8,
            (random.next() % 256) as u8,
        ];
        let len = random.below(40);
        let payload: Vec<u8> = (0..len).map(|_| random.next() as u8).collect();
        let mut translated = inbound_translated();
        translated.ports.0 = client.ports.0;
        translated.ip.0 = client.ip.0;
        let (frame, want) = if round % 2 == 0 {
            (udp(&client, &payload), udp(&translated, &payload))
        } else {
            (tcp(&client, "S", &payload), tcp(&translated, "S", &payload))
        };
        let (code, out) = datapath.run_xdp(&frame).unwrap();
        assert_eq!(code, XDP_REDIRECT, "round {round}");
        assert_frame(&format!("round {round}"), &out, &want);
    }
}

/// XDP with a full transient table: new connections make room for themselves there; and a
/// connection whose container left its port is not delivered there, and is over.
#[test]
fn xdp_makes_room_in_a_full_transient_table_and_never_follows_a_left_port() {
    // A full transient table: new connections make room for themselves there.
    let mut datapath = Datapath::load_sized(true, None, Some(8));
    datapath.add_endpoint(CONTAINER_MAC, CONTAINER_PORT_IFINDEX);
    let (key, port) = published(IPPROTO_TCP, CONTAINER_PORT_IFINDEX);
    datapath.publish(key, port);
    for n in 0..64 {
        let (code, _) = datapath
            .run_xdp(&tcp(&inbound_from(CLIENT_PORT + n), "S", &[]))
            .unwrap();
        assert_eq!(code, XDP_REDIRECT, "SYN {n}");
    }
    assert!(datapath.transient().len() <= 8);

    // A connection whose container left its port: not delivered there, and over.
    let mut datapath = nat_datapath(None);
    datapath.run_xdp(&tcp(&inbound(), "S", &[])).unwrap();
    datapath.add_endpoint([0x02, 0x77, 0, 0, 0, 0x99], CONTAINER_PORT_IFINDEX);
    let segment = tcp(&inbound(), "A", b"for the old container");
    assert_eq!(datapath.run_xdp(&segment).unwrap(), (XDP_PASS, segment));
    assert!(
        datapath.transient().is_empty(),
        "{:?}",
        datapath.transient()
    );
}

/// Random and mutated frames through the XDP program: passed unchanged, or translated into
/// the container.
#[test]
fn xdp_random_and_mutated_frames_never_misdeliver() {
    let mut datapath = nat_datapath(None);
    let mut random = Random(0x00c0_ffee_5eed_0bad);
    let seeds = [
        tcp(&inbound(), "S", b""),
        tcp(&inbound(), "AP", b"payload"),
        udp(&inbound(), b"datagram"),
    ];
    let mut translated = 0;
    for round in 0..3000 {
        let frame = random.frame(round, &seeds);
        let Ok((code, out)) = datapath.run_xdp(&frame) else {
            continue;
        };
        match code {
            XDP_PASS => assert_frame(&format!("round {round}: passed"), &out, &frame),
            XDP_REDIRECT => {
                translated += 1;
                assert!(
                    out[0..6] == CONTAINER_MAC
                        && out[30..34] == CONTAINER_IP
                        && u16::from_be_bytes([out[36], out[37]]) == CONTAINER_PORT,
                    "round {round}: redirected somewhere else\n in: {}\nout: {}",
                    show(&frame),
                    show(&out)
                );
                assert_eq!(
                    out[22],
                    frame[22] - 1,
                    "round {round}: TTL decremented once"
                );
            }
            other => panic!("round {round}: unexpected XDP action {other}"),
        }
    }
    assert!(translated > 100, "{translated}");
    // Counted exactly what it redirected, nothing it passed.
    for verdict in Verdict::ALL {
        let wanted = if verdict == Verdict::NatInXdp {
            translated
        } else {
            0
        };
        assert_eq!(datapath.verdict_count(verdict), wanted, "{verdict:?}");
    }
    assert_eq!(
        datapath
            .port_stats(CONTAINER_PORT_IFINDEX)
            .delivered_packets,
        translated
    );
}

/// XDP rewrites a frame, and counts it, only once its redirect is certain: the program asks
/// for the redirect before anything in the frame changes. Every frame it passes on to tc is
/// the frame that arrived, uncounted (tc counts it), also where NAT read or changed the
/// connection's state before it passed the frame; every frame it redirects is counted once.
/// (BPF_PROG_TEST_RUN cannot make bpf_redirect refuse, which it does for flags 0 on no
/// kernel; what this shows is that no path rewrites or counts a frame it does not redirect.)
#[test]
fn xdp_rewrites_and_counts_only_what_it_redirects() {
    let mut datapath = nat_datapath(None);
    let mut redirected = 0;
    let mut run = |datapath: &mut Datapath, case: &str, frame: Vec<u8>, want: u32| {
        let delivered = || {
            datapath
                .port_stats(CONTAINER_PORT_IFINDEX)
                .delivered_packets
        };
        let before = delivered();
        let (action, out) = datapath.run_xdp(&frame).unwrap();
        assert_eq!(action, want, "{case}");
        if action == XDP_PASS {
            assert_frame(case, &out, &frame);
        } else {
            redirected += 1;
        }
        for verdict in Verdict::ALL {
            let wanted = if verdict == Verdict::NatInXdp {
                redirected
            } else {
                0
            };
            assert_eq!(
                datapath.verdict_count(verdict),
                wanted,
                "{case}: {verdict:?}"
            );
        }
        let after = datapath
            .port_stats(CONTAINER_PORT_IFINDEX)
            .delivered_packets;
        let wanted = u64::from(action == XDP_REDIRECT);
        assert_eq!(after - before, wanted, "{case}: delivered");
    };

    run(
        &mut datapath,
        "SYN",
        tcp(&inbound(), "S", &[]),
        XDP_REDIRECT,
    );
    // On the connection just opened: found, then left to the kernel by the translation itself.
    let mut dying = inbound();
    dying.ttl = 1;
    run(&mut datapath, "TTL 1", tcp(&dying, "A", b"x"), XDP_PASS);
    run(
        &mut datapath,
        "data",
        tcp(&inbound(), "A", b"x"),
        XDP_REDIRECT,
    );
    // Found, and ended because its container left the port.
    datapath.add_endpoint([0x02, 0x77, 0, 0, 0, 0x99], CONTAINER_PORT_IFINDEX);
    run(&mut datapath, "stale", tcp(&inbound(), "A", b"x"), XDP_PASS);
    datapath.add_endpoint(CONTAINER_MAC, CONTAINER_PORT_IFINDEX);
    run(
        &mut datapath,
        "SYN again",
        tcp(&inbound(), "S", &[]),
        XDP_REDIRECT,
    );
    // A new connection to a published port a netfilter rule holds back.
    let (key, mut port) = published(IPPROTO_UDP, CONTAINER_PORT_IFINDEX);
    port.flags |= PublishedPort::HELD;
    datapath.publish(key, port);
    run(&mut datapath, "held", udp(&inbound(), b"x"), XDP_PASS);
    run(&mut datapath, "not published", syn_to_port(9090), XDP_PASS);
    assert_eq!(redirected, 3);
}

/// A redirect the kernel refuses (here: asked for with flags bpf_redirect does not take; xbr
/// asks with 0, which no kernel refuses) leaves the frame as it arrived, uncounted, for tc:
/// the XDP program asks for the redirect before it rewrites anything. The tc program then
/// translates and delivers the same frame, on the connection XDP opened.
#[test]
fn xdp_leaves_a_frame_whose_redirect_is_refused_unchanged_for_tc() {
    let mut datapath = Datapath::load_with_xdp_redirect_flags(1);
    datapath.add_endpoint(CONTAINER_MAC, CONTAINER_PORT_IFINDEX);
    let (key, port) = published(IPPROTO_TCP, CONTAINER_PORT_IFINDEX);
    datapath.publish(key, port);

    let syn = tcp(&inbound(), "S", &[]);
    let (action, out) = datapath.run_xdp(&syn).unwrap();
    assert_eq!(action, XDP_PASS, "refused: on to tc");
    assert_frame("SYN whose redirect was refused", &out, &syn);
    assert_eq!(datapath.verdict_count(Verdict::NatInXdp), 0);
    assert_eq!(
        datapath
            .port_stats(CONTAINER_PORT_IFINDEX)
            .delivered_packets,
        0
    );

    let (code, out) = datapath.run(UPLINK_PROGRAM, &syn).unwrap();
    assert_eq!(code, TC_ACT_REDIRECT);
    assert_frame(
        "SYN through tc",
        &out,
        &tcp(&inbound_translated(), "S", &[]),
    );
    assert_eq!(datapath.verdict_count(Verdict::NatIn), 1);
    assert_eq!(
        datapath
            .port_stats(CONTAINER_PORT_IFINDEX)
            .delivered_packets,
        1
    );
}
