//! Packet tests: crafted frames through the port program with BPF_PROG_TEST_RUN, checking
//! the verdict, the counters, and that the frame's bytes come out exactly as they went in.
//! Needs root (loads BPF programs); touches no interface.

use aya::maps::{HashMap, PerCpuHashMap};
use bridge_common::{PortRecord, PortStats, Verdict};
use etherparse::{ArpHardwareId, ArpOperation, ArpPacket, EtherType, PacketBuilder, VlanId};
use rstest::rstest;

use Expect::{Pass, RedirectTo};
use xbr_tests::datapath_support::{Datapath, PORT_PROGRAM, TC_ACT_OK, TC_ACT_REDIRECT};

/// BPF_PROG_TEST_RUN runs a tc program on loopback: the frame "arrives" on ifindex 1, so
/// container A's port is 1 here.
const PORT_A: u32 = 1;
const PORT_B: u32 = 11;
const PORT_C: u32 = 12;
const MAC_A: [u8; 6] = [0x02, 0x77, 0, 0, 0, 0x0a];
const MAC_B: [u8; 6] = [0x02, 0x77, 0, 0, 0, 0x0b];
const MAC_C: [u8; 6] = [0x02, 0x77, 0, 0, 0, 0x0c];
const BRIDGE_MAC: [u8; 6] = [0x02, 0x77, 0, 0, 0, 0x01];
const UNKNOWN_MAC: [u8; 6] = [0x02, 0x77, 0, 0, 0, 0xee];
const BROADCAST: [u8; 6] = [0xff; 6];
const IP_A: [u8; 4] = [10, 77, 0, 10];
const IP_B: [u8; 4] = [10, 77, 0, 11];

/// The datapath of one attached bridge with endpoints A, B and C, loaded but attached
/// nowhere; frames go through the port program.
struct PortProgram {
    datapath: Datapath,
}

impl PortProgram {
    fn load(redirect_peer: bool) -> PortProgram {
        let mut datapath = Datapath::load(redirect_peer, None);
        for (mac, port) in [(MAC_A, PORT_A), (MAC_B, PORT_B), (MAC_C, PORT_C)] {
            datapath.add_endpoint(mac, port);
        }
        PortProgram { datapath }
    }

    fn run(&mut self, frame: &[u8]) -> (u32, Vec<u8>) {
        self.try_run(frame).expect("BPF_PROG_TEST_RUN")
    }

    fn try_run(&mut self, frame: &[u8]) -> Result<(u32, Vec<u8>), aya::programs::ProgramError> {
        self.datapath.run(PORT_PROGRAM, frame)
    }

    fn verdict_count(&self, verdict: Verdict) -> u64 {
        self.datapath.verdict_count(verdict)
    }

    fn port_stats(&self, port: u32) -> PortStats {
        self.datapath.port_stats(port)
    }
}

fn udp4(src: [u8; 6], dst: [u8; 6], payload: &[u8]) -> Vec<u8> {
    let mut frame = Vec::new();
    PacketBuilder::ethernet2(src, dst)
        .ipv4(IP_A, IP_B, 64)
        .udp(40000, 5201)
        .write(&mut frame, payload)
        .unwrap();
    frame
}

fn tcp6(src: [u8; 6], dst: [u8; 6]) -> Vec<u8> {
    let mut frame = Vec::new();
    let a = [0xfd, 0x77, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0x0a];
    let b = [0xfd, 0x77, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0x0b];
    PacketBuilder::ethernet2(src, dst)
        .ipv6(a, b, 64)
        .tcp(40000, 80, 1, 65535)
        .syn()
        .write(&mut frame, &[])
        .unwrap();
    frame
}

fn arp(src: [u8; 6], dst: [u8; 6], operation: ArpOperation) -> Vec<u8> {
    let target_hw = if dst == BROADCAST { [0; 6] } else { dst };
    let packet = ArpPacket::new(
        ArpHardwareId::ETHERNET,
        EtherType::IPV4,
        operation,
        &src,
        &IP_A,
        &target_hw,
        &IP_B,
    )
    .unwrap();
    let mut frame = Vec::new();
    PacketBuilder::ethernet2(src, dst)
        .arp(packet)
        .write(&mut frame)
        .unwrap();
    frame
}

fn vlan_udp4(src: [u8; 6], dst: [u8; 6]) -> Vec<u8> {
    let mut frame = Vec::new();
    PacketBuilder::ethernet2(src, dst)
        .single_vlan(VlanId::try_new(10).unwrap())
        .ipv4(IP_A, IP_B, 64)
        .udp(40000, 5201)
        .write(&mut frame, b"tagged")
        .unwrap();
    frame
}

/// A UDP frame between two containers' addresses, for frames whose IP header matters.
fn udp4_between((src, src_ip): ([u8; 6], [u8; 4]), (dst, dst_ip): ([u8; 6], [u8; 4])) -> Vec<u8> {
    let mut frame = Vec::new();
    PacketBuilder::ethernet2(src, dst)
        .ipv4(src_ip, dst_ip, 64)
        .udp(40000, 5201)
        .write(&mut frame, b"hairpin")
        .unwrap();
    frame
}

/// `frame` with `bytes` written at offset `at`: a header field made to lie.
fn patched(mut frame: Vec<u8>, at: usize, bytes: &[u8]) -> Vec<u8> {
    frame[at..at + bytes.len()].copy_from_slice(bytes);
    frame
}

#[derive(Clone, Copy, Debug)]
enum Expect {
    RedirectTo(u32),
    Pass(Verdict),
}

/// Each case: a frame arriving on container A's port, and where it must go. Each runs as a
/// test of its own (one failure does not hide the others), on a fresh program, so that its
/// counters speak of this frame only.
///
/// BPF_PROG_TEST_RUN refuses IP frames shorter than their fixed IP header, so truncation is
/// shown by length fields that claim more than the frame holds.
#[rstest]
#[case::ipv4_udp_to_b(udp4(MAC_A, MAC_B, b"hello"), RedirectTo(PORT_B))]
#[case::ipv4_udp_odd_length_payload_to_c(udp4(MAC_A, MAC_C, b"odd"), RedirectTo(PORT_C))]
#[case::ipv6_tcp_syn_to_b(tcp6(MAC_A, MAC_B), RedirectTo(PORT_B))]
#[case::arp_request_broadcast(
    arp(MAC_A, BROADCAST, ArpOperation::REQUEST),
    Pass(Verdict::NotUnicast)
)]
#[case::arp_reply_unicast_to_b(arp(MAC_A, MAC_B, ArpOperation::REPLY), Pass(Verdict::NotIp))]
#[case::lldp_typed_unicast_to_b(
    patched(udp4(MAC_A, MAC_B, b"hello"), 12, &0x88ccu16.to_be_bytes()),
    Pass(Verdict::NotIp)
)]
#[case::ipv4_to_broadcast_mac(udp4(MAC_A, BROADCAST, b"hello"), Pass(Verdict::NotUnicast))]
#[case::ipv4_multicast(udp4(MAC_A, [0x01, 0x00, 0x5e, 0, 0, 1], b"hello"), Pass(Verdict::NotUnicast))]
#[case::ipv6_multicast_nd(tcp6(MAC_A, [0x33, 0x33, 0xff, 0, 0, 0x0b]), Pass(Verdict::NotUnicast))]
#[case::to_the_bridges_mac(udp4(MAC_A, BRIDGE_MAC, b"hello"), Pass(Verdict::UnknownDestination))]
#[case::to_an_unknown_mac(udp4(MAC_A, UNKNOWN_MAC, b"hello"), Pass(Verdict::UnknownDestination))]
#[case::vlan_tagged_to_b(vlan_udp4(MAC_A, MAC_B), Pass(Verdict::VlanTagged))]
// A real hairpin: A's own frame (its MAC, its address) to an endpoint on the port it came in
// on. Only the bridge may send a frame back out of its ingress port (hairpin mode), so xbr
// leaves it to the bridge, unchanged.
#[case::hairpin_a_to_itself(udp4_between((MAC_A, IP_A), (MAC_A, IP_A)), Pass(Verdict::SamePort))]
// The same-port check comes before the source check: B's MAC sent from A's port to A is
// the bridge's too, whatever its source.
#[case::to_a_from_bs_mac_on_as_port(udp4(MAC_B, MAC_A, b"hello"), Pass(Verdict::SamePort))]
#[case::spoofed_source_mac(udp4(UNKNOWN_MAC, MAC_B, b"hello"), Pass(Verdict::UnknownSource))]
#[case::source_mac_of_another_port(udp4(MAC_C, MAC_B, b"hello"), Pass(Verdict::UnknownSource))]
#[case::ipv4_header_cut_short(patched(udp4(MAC_A, MAC_B, b"hello"), 14, &[0x4f]), Pass(Verdict::Malformed))]
#[case::ipv4_total_length_beyond_the_frame(
    patched(udp4(MAC_A, MAC_B, b"hello"), 16, &200u16.to_be_bytes()),
    Pass(Verdict::Malformed)
)]
#[case::ipv4_header_length_below_20(patched(udp4(MAC_A, MAC_B, b"hello"), 14, &[0x44]), Pass(Verdict::Malformed))]
#[case::ipv4_ethertype_version_6_inside(
    patched(udp4(MAC_A, MAC_B, b"hello"), 14, &[0x65]),
    Pass(Verdict::Malformed)
)]
#[case::ipv6_payload_length_beyond_the_frame(
    patched(tcp6(MAC_A, MAC_B), 18, &1000u16.to_be_bytes()),
    Pass(Verdict::Malformed)
)]
#[case::truncated_arp(arp(MAC_A, MAC_B, ArpOperation::REPLY)[..20].to_vec(), Pass(Verdict::NotIp))]
fn every_frame_goes_where_it_must_and_leaves_unchanged(
    #[case] frame: Vec<u8>,
    #[case] expect: Expect,
) {
    let mut program = PortProgram::load(true);
    let (code, out) = program
        .try_run(&frame)
        .unwrap_or_else(|e| panic!("BPF_PROG_TEST_RUN failed: {e:?}"));
    assert_eq!(out, frame, "the program must not change the frame");
    let sender = program.port_stats(PORT_A);
    match expect {
        Expect::RedirectTo(_) => {
            assert_eq!(code, TC_ACT_REDIRECT, "expected a redirect");
            assert_eq!(program.verdict_count(Verdict::Redirected), 1);
            assert_eq!(
                (sender.fast_path_packets, sender.fast_path_bytes),
                (1, frame.len() as u64)
            );
            assert_eq!(sender.bridge_packets, 0);
        }
        Expect::Pass(verdict) => {
            assert_eq!(
                code, TC_ACT_OK,
                "expected the frame to be passed to the bridge"
            );
            assert_eq!(
                program.verdict_count(verdict),
                1,
                "expected verdict {verdict:?}"
            );
            assert_eq!(program.verdict_count(Verdict::Redirected), 0);
            assert_eq!(
                (sender.bridge_packets, sender.bridge_bytes),
                (1, frame.len() as u64)
            );
            assert_eq!(sender.fast_path_packets, 0);
        }
    }
    // Exactly one verdict counted, and delivered only where the frame was addressed (a
    // hairpin frame is delivered nowhere, not even back to A: the bridge decides).
    let verdicts: u64 = Verdict::ALL.iter().map(|&v| program.verdict_count(v)).sum();
    assert_eq!(verdicts, 1, "one verdict per frame");
    for other in [PORT_A, PORT_B, PORT_C] {
        let delivered = program.port_stats(other).delivered_packets;
        let wanted = u64::from(matches!(expect, Expect::RedirectTo(port) if port == other));
        assert_eq!(
            delivered, wanted,
            "delivered count of port {other} (expected {expect:?})"
        );
    }
}

#[test]
fn plain_redirect_variant_loads_and_redirects() {
    // The variant for kernels without bpf_redirect_peer must pass the verifier too.
    let mut program = PortProgram::load(false);
    let frame = udp4(MAC_A, MAC_B, b"hello");
    let (code, out) = program.run(&frame);
    assert_eq!(code, TC_ACT_REDIRECT);
    assert_eq!(out, frame);
    assert_eq!(program.port_stats(PORT_B).delivered_packets, 1);
}

#[test]
fn a_port_without_counters_still_forwards() {
    // Counters are optional bookkeeping: a missing entry must not change the verdict.
    let mut program = PortProgram::load(true);
    let mut stats: PerCpuHashMap<_, u32, PortStats> =
        PerCpuHashMap::try_from(program.datapath.ebpf.map_mut("PORT_STATS").unwrap()).unwrap();
    stats.remove(&PORT_A).unwrap();
    let (code, _) = program.run(&udp4(MAC_A, MAC_B, b"hello"));
    assert_eq!(code, TC_ACT_REDIRECT);
}

/// The misdelivery guard: a redirect needs the endpoint entry *and* the target port's record
/// to agree, so a control plane that has updated either one has already stopped it.
#[test]
fn a_stale_endpoint_entry_alone_delivers_nothing() {
    let frame = udp4(MAC_A, MAC_B, b"hello");

    // The port was removed (its record went first), the endpoint entry not yet.
    let mut program = PortProgram::load(true);
    let mut ports: HashMap<_, u32, PortRecord> =
        HashMap::try_from(program.datapath.ebpf.map_mut("PORTS").unwrap()).unwrap();
    ports.remove(&PORT_B).unwrap();
    let (code, out) = program.run(&frame);
    assert_eq!((code, out), (TC_ACT_OK, frame.clone()), "removed port");
    assert_eq!(program.verdict_count(Verdict::StaleEndpoint), 1);
    assert_eq!(program.port_stats(PORT_B).delivered_packets, 0);

    // The container behind port B took another MAC; the entry for its old MAC is stale.
    let mut program = PortProgram::load(true);
    let mut ports: HashMap<_, u32, PortRecord> =
        HashMap::try_from(program.datapath.ebpf.map_mut("PORTS").unwrap()).unwrap();
    let moved = PortRecord {
        endpoint_mac: UNKNOWN_MAC,
        ..PortRecord::default()
    };
    ports.insert(PORT_B, moved, 0).unwrap();
    let (code, out) = program.run(&frame);
    assert_eq!(
        (code, out),
        (TC_ACT_OK, frame),
        "MAC moved away from the port"
    );
    assert_eq!(program.verdict_count(Verdict::StaleEndpoint), 1);
    assert_eq!(program.port_stats(PORT_B).delivered_packets, 0);
}

/// The object holds each program under the name `bridge_common::programs` gives it (the name
/// its pin, the control plane and these tests use; the entry function in bridge-ebpf must be
/// spelled the same), of the type it is attached as, and no other program: renaming an entry
/// function without the constant fails here.
#[test]
fn the_object_holds_each_program_by_its_name() {
    use aya::programs::Program;
    use bridge_common::programs;

    let ebpf = aya::EbpfLoader::new()
        .load(xbr::datapath::OBJECT)
        .expect("xbr's eBPF object loads (run the tests as root)");
    let mut found: Vec<&str> = ebpf.programs().map(|(name, _)| name).collect();
    found.sort_unstable();
    let mut named = programs::ALL.to_vec();
    named.sort_unstable();
    assert_eq!(
        found, named,
        "the object's programs and bridge_common::programs"
    );
    for (name, tc) in [
        (programs::PORT, true),
        (programs::UPLINK, true),
        (programs::UPLINK_XDP, false),
    ] {
        let program = ebpf.program(name);
        let right_type = match program {
            Some(Program::SchedClassifier(_)) => tc,
            Some(Program::Xdp(_)) => !tc,
            _ => false,
        };
        assert!(right_type, "{name}: {program:?}");
    }
}
