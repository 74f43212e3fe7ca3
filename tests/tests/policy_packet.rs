//! The policy's hold-backs through BPF_PROG_TEST_RUN (run as root): an east-west frame that
//! matches a `HOLDS` entry of any shape in use goes to the bridge unchanged, counted as
//! `held_by_policy`, and frames beside it keep the fast path; frames whose ports cannot be
//! read go to the bridge while holds exist; a published port held whole, or for one client,
//! opens no connection for what is held.

use bridge_common::{
    ClientHoldKey, ClientPrefix, HoldKey, IPPROTO_TCP, IPPROTO_UDP, PublishedKey, PublishedPort,
    Verdict,
};
use etherparse::{IpNumber, Ipv4Header, PacketBuilder};
use rstest::rstest;
use xbr_tests::datapath_support::{
    Datapath, PORT_PROGRAM, TC_ACT_OK, TC_ACT_REDIRECT, TC_ACT_UNSPEC, UPLINK_PROGRAM,
};

/// BPF_PROG_TEST_RUN runs a tc program on loopback: the sender's port is ifindex 1.
const PORT_A: u32 = 1;
const PORT_B: u32 = 11;
const MAC_A: [u8; 6] = [0x02, 0x79, 0, 0, 0, 0x0a];
const MAC_B: [u8; 6] = [0x02, 0x79, 0, 0, 0, 0x0b];
const IP_A: [u8; 4] = [10, 79, 0, 10];
const IP_B: [u8; 4] = [10, 79, 0, 11];
const IP6_A: [u8; 16] = [0xfd, 0x79, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0x0a];
const IP6_B: [u8; 16] = [0xfd, 0x79, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0x0b];

fn east_west() -> Datapath {
    let mut datapath = Datapath::load(true, None);
    datapath.add_endpoint(MAC_A, PORT_A);
    datapath.add_endpoint(MAC_B, PORT_B);
    datapath
}

fn udp4(source_port: u16, destination_port: u16) -> Vec<u8> {
    let mut frame = Vec::new();
    PacketBuilder::ethernet2(MAC_A, MAC_B)
        .ipv4(IP_A, IP_B, 64)
        .udp(source_port, destination_port)
        .write(&mut frame, b"policy")
        .unwrap();
    frame
}

fn tcp6(destination_port: u16) -> Vec<u8> {
    let mut frame = Vec::new();
    PacketBuilder::ethernet2(MAC_A, MAC_B)
        .ipv6(IP6_A, IP6_B, 64)
        .tcp(40000, destination_port, 1, 64240)
        .syn()
        .write(&mut frame, &[])
        .unwrap();
    frame
}

fn v4(address: [u8; 4]) -> [u8; 16] {
    let mut wide = [0; 16];
    wide[..4].copy_from_slice(&address);
    wide
}

/// The hold-back `ip saddr A ip daddr B udp dport 7000 drop` makes.
fn a_to_b_udp_7000() -> HoldKey {
    HoldKey {
        shape: HoldKey::SOURCE
            | HoldKey::DESTINATION
            | HoldKey::PROTOCOL
            | HoldKey::DESTINATION_PORT,
        family: 4,
        protocol: IPPROTO_UDP,
        destination_port: 7000u16.to_be_bytes(),
        source: v4(IP_A),
        destination: v4(IP_B),
        ..HoldKey::default()
    }
}

/// Runs `frame` through the port program; checks it either redirected or passed unchanged.
fn run(datapath: &mut Datapath, frame: &[u8]) -> u32 {
    let (code, out) = datapath
        .run(PORT_PROGRAM, frame)
        .expect("BPF_PROG_TEST_RUN");
    if code == TC_ACT_OK {
        assert_eq!(
            out, frame,
            "a frame for the bridge leaves exactly as it came"
        );
    }
    code
}

#[rstest]
#[case::the_held_class(udp4(40000, 7000), TC_ACT_OK)]
#[case::another_port(udp4(40000, 7001), TC_ACT_REDIRECT)]
#[case::the_reverse_direction(udp4(7000, 40000), TC_ACT_REDIRECT)]
#[case::ipv6_is_another_family(tcp6(7000), TC_ACT_REDIRECT)]
fn an_exact_hold_back_takes_only_its_class(#[case] frame: Vec<u8>, #[case] expected: u32) {
    let mut datapath = east_west();
    datapath.hold(a_to_b_udp_7000());
    assert_eq!(run(&mut datapath, &frame), expected);
    let held = datapath.verdict_count(Verdict::HeldByPolicy);
    assert_eq!(
        held,
        u64::from(expected == TC_ACT_OK),
        "held_by_policy counts the held frame"
    );
}

#[rstest]
#[case::protocol_only(HoldKey { shape: HoldKey::PROTOCOL, family: 4, protocol: IPPROTO_UDP, ..HoldKey::default() })]
#[case::destination_port_only(HoldKey {
    shape: HoldKey::PROTOCOL | HoldKey::DESTINATION_PORT,
    family: 4,
    protocol: IPPROTO_UDP,
    destination_port: 5201u16.to_be_bytes(),
    ..HoldKey::default()
})]
#[case::source_address_only(HoldKey { shape: HoldKey::SOURCE, family: 4, source: v4(IP_A), ..HoldKey::default() })]
#[case::reply_of_a_translated_flow(HoldKey {
    shape: HoldKey::SOURCE | HoldKey::PROTOCOL | HoldKey::SOURCE_PORT,
    family: 4,
    protocol: IPPROTO_UDP,
    source_port: 40000u16.to_be_bytes(),
    source: v4(IP_A),
    ..HoldKey::default()
})]
#[case::the_whole_family(HoldKey { shape: 0, family: 4, ..HoldKey::default() })]
fn every_shape_is_looked_up(#[case] key: HoldKey) {
    let mut datapath = east_west();
    datapath.hold(key);
    assert_eq!(run(&mut datapath, &udp4(40000, 5201)), TC_ACT_OK, "{key:?}");
    assert_eq!(datapath.verdict_count(Verdict::HeldByPolicy), 1);
    // The same shape with other values holds nothing else.
    assert_eq!(
        run(&mut datapath, &tcp6(5201)),
        TC_ACT_REDIRECT,
        "IPv4 hold-backs leave IPv6 alone"
    );
}

#[test]
fn an_ipv6_hold_back_matches_ipv6_frames() {
    let mut datapath = east_west();
    datapath.hold(HoldKey {
        shape: HoldKey::DESTINATION | HoldKey::PROTOCOL | HoldKey::DESTINATION_PORT,
        family: 6,
        protocol: IPPROTO_TCP,
        destination_port: 8000u16.to_be_bytes(),
        destination: IP6_B,
        ..HoldKey::default()
    });
    assert_eq!(run(&mut datapath, &tcp6(8000)), TC_ACT_OK);
    assert_eq!(run(&mut datapath, &tcp6(8001)), TC_ACT_REDIRECT);
    assert_eq!(run(&mut datapath, &udp4(40000, 8000)), TC_ACT_REDIRECT);
}

/// An IPv4 fragment of the held flow: the first carries the ports, the others do not.
fn udp4_fragment(offset_units: u16, more_fragments: bool) -> Vec<u8> {
    let payload = [0x55u8; 64];
    let mut ip = Ipv4Header::new(payload.len() as u16, 64, IpNumber::UDP, IP_A, IP_B).unwrap();
    ip.more_fragments = more_fragments;
    ip.fragment_offset = offset_units.try_into().unwrap();
    ip.header_checksum = ip.calc_header_checksum();
    let mut frame = Vec::new();
    frame.extend_from_slice(&MAC_B);
    frame.extend_from_slice(&MAC_A);
    frame.extend_from_slice(&[0x08, 0x00]);
    ip.write(&mut frame).unwrap();
    frame.extend_from_slice(&payload);
    frame
}

/// A UDP frame whose IPv4 header says it ends two bytes into the UDP header.
fn udp4_cut_short() -> Vec<u8> {
    let mut ip = Ipv4Header::new(2, 64, IpNumber::UDP, IP_A, IP_B).unwrap();
    ip.header_checksum = ip.calc_header_checksum();
    let mut frame = Vec::new();
    frame.extend_from_slice(&MAC_B);
    frame.extend_from_slice(&MAC_A);
    frame.extend_from_slice(&[0x08, 0x00]);
    ip.write(&mut frame).unwrap();
    frame.extend_from_slice(&[0x9c, 0x40]);
    frame
}

/// TCP to B behind an IPv6 hop-by-hop options header.
fn tcp6_behind_hop_by_hop() -> Vec<u8> {
    let mut frame = tcp6(8000);
    let ip = 14;
    let transport = frame.split_off(ip + 40);
    frame[ip + 6] = 0; // next header: hop-by-hop options
    let payload_len = u16::from_be_bytes([frame[ip + 4], frame[ip + 5]]) + 8;
    frame[ip + 4..ip + 6].copy_from_slice(&payload_len.to_be_bytes());
    frame.extend_from_slice(&[6, 0, 1, 4, 0, 0, 0, 0]); // next: TCP; PadN
    frame.extend_from_slice(&transport);
    frame
}

#[rstest]
#[case::first_fragment(udp4_fragment(0, true))]
#[case::later_fragment(udp4_fragment(8, false))]
#[case::udp_header_cut_short(udp4_cut_short())]
fn fragments_and_frames_without_ports_go_to_the_bridge_while_ipv4_holds_exist(
    #[case] frame: Vec<u8>,
) {
    let mut datapath = east_west();
    assert_eq!(
        run(&mut datapath, &frame),
        TC_ACT_REDIRECT,
        "with no rule there is nothing to hold back"
    );
    datapath.hold(a_to_b_udp_7000());
    assert_eq!(run(&mut datapath, &frame), TC_ACT_OK);
    assert_eq!(datapath.verdict_count(Verdict::HeldByPolicy), 1);
}

#[test]
fn ipv6_extension_headers_go_to_the_bridge_while_ipv6_holds_exist() {
    let frame = tcp6_behind_hop_by_hop();
    let mut datapath = east_west();
    datapath.hold(a_to_b_udp_7000());
    assert_eq!(
        run(&mut datapath, &frame),
        TC_ACT_REDIRECT,
        "IPv4 hold-backs say nothing about IPv6"
    );
    datapath.hold(HoldKey {
        shape: HoldKey::PROTOCOL | HoldKey::DESTINATION_PORT,
        family: 6,
        protocol: IPPROTO_UDP,
        destination_port: 53u16.to_be_bytes(),
        ..HoldKey::default()
    });
    assert_eq!(run(&mut datapath, &frame), TC_ACT_OK);
    assert_eq!(run(&mut datapath, &tcp6(8000)), TC_ACT_REDIRECT);
}

fn udp4_between(source: [u8; 4], destination: [u8; 4]) -> Vec<u8> {
    let mut frame = Vec::new();
    PacketBuilder::ethernet2(MAC_A, MAC_B)
        .ipv4(source, destination, 64)
        .udp(40000, 5201)
        .write(&mut frame, b"policy")
        .unwrap();
    frame
}

#[rstest]
#[case::their_own_addresses(udp4_between(IP_A, IP_B), TC_ACT_REDIRECT)]
#[case::a_borrowed_source(udp4_between([10, 79, 0, 99], IP_B), TC_ACT_OK)]
#[case::another_destination(udp4_between(IP_A, [10, 79, 0, 99]), TC_ACT_OK)]
#[case::ipv6_is_not_checked(tcp6(80), TC_ACT_REDIRECT)]
fn with_rules_ipv4_takes_the_fast_path_only_between_containers_own_addresses(
    #[case] frame: Vec<u8>,
    #[case] expected: u32,
) {
    let mut datapath = east_west();
    assert_eq!(
        run(&mut datapath, &frame),
        TC_ACT_REDIRECT,
        "no rules, no check"
    );
    datapath.check_ipv4(MAC_A, IP_A);
    datapath.check_ipv4(MAC_B, IP_B);
    assert_eq!(run(&mut datapath, &frame), expected);
    assert_eq!(
        datapath.verdict_count(Verdict::HeldByPolicy),
        u64::from(expected == TC_ACT_OK)
    );
}

const UPLINK_MAC: [u8; 6] = [0x02, 0x7a, 0, 0, 0, 0x01];
const CLIENT_MAC: [u8; 6] = [0x02, 0x7a, 0, 0, 0, 0x02];
const BRIDGE_MAC: [u8; 6] = [0x02, 0x79, 0, 0, 0, 0x01];
const HOST_IP: [u8; 4] = [10, 80, 0, 1];
const CLIENT_IP: [u8; 4] = [10, 80, 0, 2];
const OTHER_CLIENT_IP: [u8; 4] = [10, 80, 0, 3];
const HOST_PORT: u16 = 8080;

fn published_key() -> PublishedKey {
    PublishedKey {
        proto: IPPROTO_TCP,
        _pad: 0,
        host_port: HOST_PORT.to_be_bytes(),
        host_ip: [0; 4],
    }
}

/// Port 8080 published to B's port 80, with `flags`.
fn published(flags: u8) -> Datapath {
    let mut datapath = east_west();
    datapath.publish(
        published_key(),
        PublishedPort {
            container_ip: IP_B,
            container_port: 80u16.to_be_bytes(),
            flags,
            _pad: 0,
            ifindex: PORT_B,
            container_mac: MAC_B,
            gateway_mac: BRIDGE_MAC,
        },
    );
    datapath
}

fn syn_from(client: [u8; 4], client_port: u16) -> Vec<u8> {
    let mut frame = Vec::new();
    PacketBuilder::ethernet2(CLIENT_MAC, UPLINK_MAC)
        .ipv4(client, HOST_IP, 64)
        .tcp(client_port, HOST_PORT, 1000, 64240)
        .syn()
        .write(&mut frame, &[])
        .unwrap();
    frame
}

fn uplink(datapath: &mut Datapath, frame: &[u8]) -> u32 {
    let (code, out) = datapath
        .run(UPLINK_PROGRAM, frame)
        .expect("BPF_PROG_TEST_RUN");
    if code != TC_ACT_REDIRECT {
        assert_eq!(
            out, frame,
            "an untranslated frame leaves exactly as it came"
        );
    }
    code
}

#[test]
fn a_held_published_port_opens_no_connection() {
    let mut datapath = published(PublishedPort::HELD);
    assert_eq!(
        uplink(&mut datapath, &syn_from(CLIENT_IP, 40000)),
        TC_ACT_UNSPEC
    );
    assert_eq!(datapath.verdict_count(Verdict::HeldByPolicy), 1);
    assert!(datapath.flows().is_empty());
    let mut open = published(0);
    assert_eq!(
        uplink(&mut open, &syn_from(CLIENT_IP, 40000)),
        TC_ACT_REDIRECT
    );
}

#[rstest]
#[case::port_only(ClientHoldKey::PORT)]
#[case::address_and_port(ClientHoldKey::ADDRESS | ClientHoldKey::PORT)]
fn a_held_client_port_goes_to_the_kernel_and_others_do_not(#[case] shape: u8) {
    let mut datapath = published(PublishedPort::CLIENT_HOLDS);
    datapath.hold_client(ClientHoldKey {
        published: published_key(),
        client_ip: if shape & ClientHoldKey::ADDRESS != 0 {
            CLIENT_IP
        } else {
            [0; 4]
        },
        client_port: 40000u16.to_be_bytes(),
        shape,
        _pad: 0,
    });
    assert_eq!(
        uplink(&mut datapath, &syn_from(CLIENT_IP, 40000)),
        TC_ACT_UNSPEC
    );
    assert_eq!(datapath.verdict_count(Verdict::HeldByPolicy), 1);
    assert_eq!(
        uplink(&mut datapath, &syn_from(CLIENT_IP, 40001)),
        TC_ACT_REDIRECT
    );
    let expected = if shape & ClientHoldKey::ADDRESS != 0 {
        TC_ACT_REDIRECT
    } else {
        TC_ACT_UNSPEC
    };
    assert_eq!(
        uplink(&mut datapath, &syn_from(OTHER_CLIENT_IP, 40000)),
        expected
    );
}

#[rstest]
#[case::one_address(32, TC_ACT_REDIRECT)]
#[case::a_prefix_holding_both(24, TC_ACT_UNSPEC)]
fn held_client_prefixes_are_matched_longest_first(#[case] len: u8, #[case] other: u32) {
    let mut datapath = published(PublishedPort::CLIENT_HOLDS);
    datapath.hold_client_prefix(
        ClientPrefix {
            published: published_key(),
            client_ip: if len == 32 { CLIENT_IP } else { [10, 80, 0, 0] },
        },
        len,
    );
    assert_eq!(
        uplink(&mut datapath, &syn_from(CLIENT_IP, 40000)),
        TC_ACT_UNSPEC
    );
    assert_eq!(
        uplink(&mut datapath, &syn_from(OTHER_CLIENT_IP, 40000)),
        other
    );
    assert_eq!(
        uplink(&mut datapath, &syn_from([10, 81, 0, 2], 40000)),
        TC_ACT_REDIRECT,
        "a client outside the prefix"
    );
}

#[test]
fn a_client_with_the_containers_own_address_is_the_kernels() {
    let mut datapath = published(0);
    assert_eq!(uplink(&mut datapath, &syn_from(IP_B, 40000)), TC_ACT_UNSPEC);
    assert_eq!(datapath.verdict_count(Verdict::NatNotTranslated), 1);
    assert!(datapath.flows().is_empty());
}
