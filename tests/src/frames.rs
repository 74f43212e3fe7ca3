//! Frames for the packet tests, built with etherparse: one IPv4 TCP or UDP frame from its
//! addresses, and the comparison that shows both frames when they differ.

use etherparse::PacketBuilder;

/// The addresses of one frame: MACs, IPv4 addresses and ports (source, destination), TTL.
pub struct Addresses {
    pub eth: ([u8; 6], [u8; 6]),
    pub ip: ([u8; 4], [u8; 4]),
    pub ports: (u16, u16),
    pub ttl: u8,
}

/// A TCP segment with these flags (`S`, `A`, `F`, `R`, `P`), sequence and acknowledgment
/// numbers (the latter sent with `A`).
pub fn tcp_numbered(a: &Addresses, flags: &str, seq: u32, ack: u32, payload: &[u8]) -> Vec<u8> {
    let mut builder = PacketBuilder::ethernet2(a.eth.0, a.eth.1)
        .ipv4(a.ip.0, a.ip.1, a.ttl)
        .tcp(a.ports.0, a.ports.1, seq, 64240);
    for flag in flags.chars() {
        builder = match flag {
            'S' => builder.syn(),
            'A' => builder.ack(ack),
            'F' => builder.fin(),
            'R' => builder.rst(),
            'P' => builder.psh(),
            other => panic!("unknown TCP flag {other}"),
        };
    }
    let mut frame = Vec::new();
    builder.write(&mut frame, payload).unwrap();
    frame
}

pub fn udp(a: &Addresses, payload: &[u8]) -> Vec<u8> {
    let mut frame = Vec::new();
    PacketBuilder::ethernet2(a.eth.0, a.eth.1)
        .ipv4(a.ip.0, a.ip.1, a.ttl)
        .udp(a.ports.0, a.ports.1)
        .write(&mut frame, payload)
        .unwrap();
    frame
}

/// Where a UDP frame (IPv4 without options) has its checksum.
pub const UDP_CHECKSUM: usize = 14 + 20 + 6;

pub fn show(frame: &[u8]) -> String {
    frame.iter().map(|b| format!("{b:02x}")).collect()
}

pub fn assert_frame(case: &str, got: &[u8], want: &[u8]) {
    assert!(
        got == want,
        "{case}: the frame differs\n got: {}\nwant: {}",
        show(got),
        show(want)
    );
}
