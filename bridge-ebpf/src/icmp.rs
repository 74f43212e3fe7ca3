//! ICMP errors about translated outbound flows (egress NAT): a router or the destination
//! answers a container's flow with "port unreachable", "fragmentation needed", "time
//! exceeded", quoting the frame as it left the uplink (the uplink's address and xbr's port).
//! Translated back (outer destination, quoted source address and port, their checksums) and
//! delivered into the container, as the kernel's NAT would for its own flows: without this
//! the kernel path finds no translation for it, and path MTU discovery of a translated flow
//! would break.

use aya_ebpf::{bindings::BPF_F_HDR_FIELD_MASK, programs::TcContext};
use bridge_common::{Flow, FlowKey, IPPROTO_TCP, IPPROTO_UDP};

use crate::{
    checksum::update,
    frame::ptr_at,
    maps::{FLOWS, PORTS, TRANSIENT},
    nat::{ETH_DST, ETH_SRC, IP_CHECK, IP_DST, IP_TTL, IPV4_FRAGMENT, alive, now},
};

pub const IPPROTO_ICMP: u8 = 1;
const DESTINATION_UNREACHABLE: u8 = 3;
const TIME_EXCEEDED: u8 = 11;

/// Offsets: the outer IPv4 header (no options), the ICMP header, the quoted IPv4 header (no
/// options) and the quoted transport header's first 8 bytes (ports; UDP's checksum).
const ICMP: usize = 14 + 20;
const ICMP_CHECK: usize = ICMP + 2;
const INNER: usize = ICMP + 8;
const INNER_PROTO: usize = INNER + 9;
const INNER_CHECK: usize = INNER + 10;
const INNER_SRC: usize = INNER + 12;
const INNER_DST: usize = INNER + 16;
const INNER_L4: usize = INNER + 20;
const INNER_UDP_CHECK: usize = INNER_L4 + 6;
const INNER_TCP_CHECK: usize = INNER_L4 + 16;
/// The shortest error that quotes what the lookup needs.
const QUOTED_END: usize = INNER_L4 + 8;

const CSUM_FIELD_U32: u64 = 4 & BPF_F_HDR_FIELD_MASK as u64;
const CSUM_FIELD_U16: u64 = 2 & BPF_F_HDR_FIELD_MASK as u64;

/// What an ICMP error on an uplink is to xbr.
pub enum Error {
    /// Not an error about one of its outbound flows: the kernel's.
    NotOurs,
    /// Translated: into the container behind this bridge port.
    Deliver(u32),
}

/// An IPv4 ICMP error that arrived on an uplink: translated into the container whose
/// outbound flow it is about, if it is.
#[inline(never)]
pub fn error_inbound(ctx: &TcContext) -> Error {
    let Some(headers) = ptr_at::<[u8; QUOTED_END]>(ctx, 0) else {
        return Error::NotOurs;
    };
    // SAFETY: ptr_at checked that the bytes lie within the frame's linear data.
    let h = unsafe { &*headers };
    let fragment = u16::from_be_bytes([h[14 + 6], h[14 + 7]]) & IPV4_FRAGMENT != 0;
    let proto = h[INNER_PROTO];
    if h[12..14] != [0x08, 0x00]
        || h[14] != 0x45
        || fragment
        || h[14 + 9] != IPPROTO_ICMP
        || !(h[ICMP] == DESTINATION_UNREACHABLE || h[ICMP] == TIME_EXCEEDED)
        || h[INNER] != 0x45
        || !(proto == IPPROTO_TCP || proto == IPPROTO_UDP)
        || h[IP_TTL] <= 1
    {
        return Error::NotOurs;
    }
    let at4 = |i: usize| [h[i], h[i + 1], h[i + 2], h[i + 3]];
    let at2 = |i: usize| [h[i], h[i + 1]];
    let outer_dst = at4(IP_DST);
    let inner_src = at4(INNER_SRC);
    let inner_sport = at2(INNER_L4);
    // The quoted frame left from the address the error is sent to.
    if outer_dst != inner_src {
        return Error::NotOurs;
    }
    // The flow's reply direction: from the quoted destination to the quoted source.
    let reply_key = FlowKey {
        proto,
        _pad: [0; 3],
        src_ip: at4(INNER_DST),
        dst_ip: inner_src,
        src_port: at2(INNER_L4 + 2),
        dst_port: inner_sport,
    };
    // SAFETY: a map value, only read, during the run (see `nat`'s "Map access").
    let flow = match unsafe { FLOWS.get(&reply_key) } {
        Some(flow) => flow,
        // SAFETY: as above.
        None => match unsafe { TRANSIENT.get(&reply_key) } {
            Some(flow) if alive(flow, proto, now()) => flow,
            _ => return Error::NotOurs,
        },
    };
    if flow.flags & (Flow::EGRESS | Flow::INBOUND) != Flow::EGRESS | Flow::INBOUND {
        return Error::NotOurs;
    }
    // SAFETY: as above.
    match unsafe { PORTS.get(&flow.ifindex) } {
        Some(port) if port.endpoint_mac == flow.eth_dst => {}
        _ => return Error::NotOurs,
    }
    let (container_ip, container_port) = (flow.new_ip, flow.new_port);
    let (port, eth_src, eth_dst) = (flow.ifindex, flow.eth_src, flow.eth_dst);
    let ttl = h[IP_TTL];

    // The quoted header's checksum, and the quoted transport checksum where the error
    // carries it (UDP's is in the first 8 bytes; TCP's only when the error quotes more).
    let inner_check = at2(INNER_CHECK);
    let new_inner_check = update(
        u16::from_be_bytes(inner_check),
        &inner_src,
        &container_ip,
        0,
        0,
    )
    .to_be_bytes();
    let l4_check_at = if proto == IPPROTO_UDP {
        Some(INNER_UDP_CHECK)
    } else if ptr_at::<[u8; 2]>(ctx, INNER_TCP_CHECK).is_some() {
        Some(INNER_TCP_CHECK)
    } else {
        None
    };
    let l4_check = match l4_check_at {
        Some(at) => match ctx.load::<[u8; 2]>(at) {
            // UDP without a checksum keeps none.
            Ok(check) if check != [0, 0] || proto == IPPROTO_TCP => Some((at, check)),
            _ => None,
        },
        None => None,
    };
    let new_l4_check = l4_check.map(|(_, check)| {
        let mut new = update(
            u16::from_be_bytes(check),
            &inner_src,
            &container_ip,
            u16::from_be_bytes(inner_sport),
            u16::from_be_bytes(container_port),
        );
        if proto == IPPROTO_UDP && new == 0 {
            new = 0xffff;
        }
        new.to_be_bytes()
    });

    let word32 = |b: [u8; 4]| u32::from_ne_bytes(b) as u64;
    let word16 = |b: [u8; 2]| u16::from_ne_bytes(b) as u64;
    // The ICMP checksum covers the quoted bytes: every change there is accounted for.
    let mut ok = ctx
        .l4_csum_replace(
            ICMP_CHECK,
            word32(inner_src),
            word32(container_ip),
            CSUM_FIELD_U32,
        )
        .is_ok()
        && ctx
            .l4_csum_replace(
                ICMP_CHECK,
                word16(inner_check),
                word16(new_inner_check),
                CSUM_FIELD_U16,
            )
            .is_ok()
        && ctx
            .l4_csum_replace(
                ICMP_CHECK,
                word16(inner_sport),
                word16(container_port),
                CSUM_FIELD_U16,
            )
            .is_ok();
    if let (Some((at, old)), Some(new)) = (l4_check, new_l4_check) {
        ok = ok
            && ctx
                .l4_csum_replace(ICMP_CHECK, word16(old), word16(new), CSUM_FIELD_U16)
                .is_ok()
            && ctx.store(at, &new, 0).is_ok();
    }
    let old_ttl = u16::from_ne_bytes([ttl, IPPROTO_ICMP]) as u64;
    let new_ttl = u16::from_ne_bytes([ttl - 1, IPPROTO_ICMP]) as u64;
    ok = ok
        && ctx
            .l3_csum_replace(
                IP_CHECK,
                word32(outer_dst),
                word32(container_ip),
                CSUM_FIELD_U32,
            )
            .is_ok()
        && ctx
            .l3_csum_replace(IP_CHECK, old_ttl, new_ttl, CSUM_FIELD_U16)
            .is_ok()
        && ctx.store(IP_DST, &container_ip, 0).is_ok()
        && ctx.store(IP_TTL, &(ttl - 1), 0).is_ok()
        && ctx.store(INNER_SRC, &container_ip, 0).is_ok()
        && ctx.store(INNER_CHECK, &new_inner_check, 0).is_ok()
        && ctx.store(INNER_L4, &container_port, 0).is_ok()
        && ctx.store(ETH_DST, &eth_dst, 0).is_ok()
        && ctx.store(ETH_SRC, &eth_src, 0).is_ok();
    if ok {
        Error::Deliver(port)
    } else {
        Error::NotOurs
    }
}
