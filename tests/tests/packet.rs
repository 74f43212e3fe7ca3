//! Packet tests: crafted frames through the port program with BPF_PROG_TEST_RUN, checking
//! the verdict, the counters, and that the frame's bytes come out exactly as they went in.
//! Needs root (loads BPF programs); touches no interface.

use aya::maps::{HashMap, PerCpuHashMap};
use bridge_common::{PortRecord, PortStats, Verdict};
use etherparse::{ArpHardwareId, ArpOperation, ArpPacket, EtherType, PacketBuilder, VlanId};

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

/// Each case: a frame from container A's port, and where it must go.
fn cases() -> Vec<(&'static str, Vec<u8>, Expect)> {
    // BPF_PROG_TEST_RUN refuses IP frames shorter than their fixed IP header, so truncation
    // is shown by length fields that claim more than the frame holds.
    let mut ip_header_cut = udp4(MAC_A, MAC_B, b"hello");
    ip_header_cut[14] = 0x4f;
    let mut length_beyond_frame = udp4(MAC_A, MAC_B, b"hello");
    length_beyond_frame[16..18].copy_from_slice(&200u16.to_be_bytes());
    let mut short_ihl = udp4(MAC_A, MAC_B, b"hello");
    short_ihl[14] = 0x44;
    let mut not_v4 = udp4(MAC_A, MAC_B, b"hello");
    not_v4[14] = 0x65;
    let mut ipv6_cut = tcp6(MAC_A, MAC_B);
    ipv6_cut[18..20].copy_from_slice(&1000u16.to_be_bytes());
    let mut lldp_unicast = udp4(MAC_A, MAC_B, b"hello");
    lldp_unicast[12..14].copy_from_slice(&0x88ccu16.to_be_bytes());

    use Expect::*;
    vec![
        (
            "IPv4 UDP to B",
            udp4(MAC_A, MAC_B, b"hello"),
            RedirectTo(PORT_B),
        ),
        (
            "IPv4 UDP odd-length payload to C",
            udp4(MAC_A, MAC_C, b"odd"),
            RedirectTo(PORT_C),
        ),
        ("IPv6 TCP SYN to B", tcp6(MAC_A, MAC_B), RedirectTo(PORT_B)),
        (
            "ARP request (broadcast)",
            arp(MAC_A, BROADCAST, ArpOperation::REQUEST),
            Pass(Verdict::NotUnicast),
        ),
        (
            "ARP reply (unicast to B)",
            arp(MAC_A, MAC_B, ArpOperation::REPLY),
            Pass(Verdict::NotIp),
        ),
        (
            "LLDP-typed unicast to B",
            lldp_unicast,
            Pass(Verdict::NotIp),
        ),
        (
            "IPv4 to broadcast MAC",
            udp4(MAC_A, BROADCAST, b"hello"),
            Pass(Verdict::NotUnicast),
        ),
        (
            "IPv4 multicast",
            udp4(MAC_A, [0x01, 0x00, 0x5e, 0, 0, 1], b"hello"),
            Pass(Verdict::NotUnicast),
        ),
        (
            "IPv6 multicast (ND)",
            tcp6(MAC_A, [0x33, 0x33, 0xff, 0, 0, 0x0b]),
            Pass(Verdict::NotUnicast),
        ),
        (
            "to the bridge's MAC",
            udp4(MAC_A, BRIDGE_MAC, b"hello"),
            Pass(Verdict::UnknownDestination),
        ),
        (
            "to an unknown MAC",
            udp4(MAC_A, UNKNOWN_MAC, b"hello"),
            Pass(Verdict::UnknownDestination),
        ),
        (
            "802.1Q-tagged to B",
            vlan_udp4(MAC_A, MAC_B),
            Pass(Verdict::VlanTagged),
        ),
        (
            "to A itself (hairpin)",
            udp4(MAC_B, MAC_A, b"hello"),
            Pass(Verdict::SamePort),
        ),
        (
            "spoofed source MAC",
            udp4(UNKNOWN_MAC, MAC_B, b"hello"),
            Pass(Verdict::UnknownSource),
        ),
        (
            "source MAC of another port",
            udp4(MAC_C, MAC_B, b"hello"),
            Pass(Verdict::UnknownSource),
        ),
        (
            "IPv4 header cut short",
            ip_header_cut,
            Pass(Verdict::Malformed),
        ),
        (
            "IPv4 total length beyond the frame",
            length_beyond_frame,
            Pass(Verdict::Malformed),
        ),
        (
            "IPv4 header length below 20",
            short_ihl,
            Pass(Verdict::Malformed),
        ),
        (
            "IPv4 ethertype, version 6 inside",
            not_v4,
            Pass(Verdict::Malformed),
        ),
        (
            "IPv6 payload length beyond the frame",
            ipv6_cut,
            Pass(Verdict::Malformed),
        ),
        (
            "truncated ARP",
            arp(MAC_A, MAC_B, ArpOperation::REPLY)[..20].to_vec(),
            Pass(Verdict::NotIp),
        ),
    ]
}

#[derive(Clone, Copy, Debug)]
enum Expect {
    RedirectTo(u32),
    Pass(Verdict),
}

#[test]
fn every_frame_goes_where_it_must_and_leaves_unchanged() {
    for (name, frame, expect) in cases() {
        // A fresh program per case, so its counters speak of this frame only.
        let mut program = PortProgram::load(true);
        let (code, out) = program
            .try_run(&frame)
            .unwrap_or_else(|e| panic!("{name}: BPF_PROG_TEST_RUN failed: {e:?}"));
        assert_eq!(out, frame, "{name}: the program must not change the frame");
        match expect {
            Expect::RedirectTo(port) => {
                assert_eq!(code, TC_ACT_REDIRECT, "{name}: expected a redirect");
                assert_eq!(program.verdict_count(Verdict::Redirected), 1, "{name}");
                let sender = program.port_stats(PORT_A);
                assert_eq!(
                    (sender.fast_path_packets, sender.fast_path_bytes),
                    (1, frame.len() as u64),
                    "{name}"
                );
                assert_eq!(sender.bridge_packets, 0, "{name}");
                for other in [PORT_B, PORT_C] {
                    let delivered = program.port_stats(other).delivered_packets;
                    let wanted = u64::from(other == port);
                    assert_eq!(
                        delivered, wanted,
                        "{name}: delivered count of port {other} (redirect target must be {port})"
                    );
                }
            }
            Expect::Pass(verdict) => {
                assert_eq!(
                    code, TC_ACT_OK,
                    "{name}: expected the frame to be passed to the bridge"
                );
                assert_eq!(
                    program.verdict_count(verdict),
                    1,
                    "{name}: expected verdict {verdict:?}"
                );
                assert_eq!(program.verdict_count(Verdict::Redirected), 0, "{name}");
                let sender = program.port_stats(PORT_A);
                assert_eq!(
                    (sender.bridge_packets, sender.bridge_bytes),
                    (1, frame.len() as u64),
                    "{name}"
                );
                assert_eq!(sender.fast_path_packets, 0, "{name}");
            }
        }
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
