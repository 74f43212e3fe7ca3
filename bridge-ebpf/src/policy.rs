//! Netfilter rules the fast path would skip: an east-west frame that a rule on the kernel path
//! could drop, translate or change takes the bridge, so the rule applies. The control plane
//! writes one `HOLDS` entry per packet pattern; a frame is looked up once per pattern shape in
//! use, and not at all when no rule touches east-west traffic.

use aya_ebpf::programs::TcContext;
use bridge_common::{Endpoint, HoldKey, IPPROTO_TCP, IPPROTO_UDP};
use network_types::{
    eth::EthHdr,
    ip::{Ipv4Hdr, Ipv6Hdr},
};

use crate::{
    frame::ptr_at,
    maps::{HOLD_SCRATCH, HOLD_SHAPES, HOLDS},
};

/// Where the policy was decided for containers using their own IPv4 addresses
/// (`Endpoint::CHECK_IPV4`): whether this IPv4 frame goes from the sender's address to the
/// receiver's. A frame that does not take the bridge, where the rules see its real addresses.
#[inline(always)]
pub fn addresses_are_theirs(ctx: &TcContext, sender: &Endpoint, receiver: &Endpoint) -> bool {
    if receiver.flags & Endpoint::CHECK_IPV4 == 0 {
        return true;
    }
    match ptr_at::<Ipv4Hdr>(ctx, EthHdr::LEN) {
        Some(ip) => {
            // SAFETY: ptr_at checked that the header lies within the frame's linear data.
            let ip = unsafe { &*ip };
            ip.src_addr == sender.ipv4 && ip.dst_addr == receiver.ipv4
        }
        None => false,
    }
}

/// Whether an IP frame (IPv4 when `ipv4`, else IPv6) must take the bridge for the policy.
#[inline(always)]
pub fn holds_back(ctx: &TcContext, ipv4: bool) -> bool {
    let Some(shapes) = HOLD_SHAPES.get(if ipv4 { 0 } else { 1 }) else {
        return false;
    };
    let shapes = *shapes;
    if shapes == 0 {
        return false;
    }
    // Rules exist: from here on, a frame that cannot be looked up might be one they touch.
    let (Some(key), Some(probe)) = (HOLD_SCRATCH.get_ptr_mut(0), HOLD_SCRATCH.get_ptr_mut(1))
    else {
        return true;
    };
    // SAFETY: per-CPU map values, valid for the whole program run and used by nothing else.
    let (key, probe) = unsafe { (&mut *key, &mut *probe) };
    let read = if ipv4 {
        read_ipv4(ctx, key)
    } else {
        read_ipv6(ctx, key)
    };
    if read.is_none() {
        return true;
    }
    for shape in 0..HoldKey::SHAPES {
        if shapes & (1 << shape) != 0 {
            key.mask_into(shape as u8, &mut *probe);
            // SAFETY: only whether the entry exists is read.
            if unsafe { HOLDS.get(&*probe) }.is_some() {
                return true;
            }
        }
    }
    false
}

/// The frame's IPv4 fields into `key`; `None` for a frame whose ports cannot be read.
#[inline(always)]
fn read_ipv4(ctx: &TcContext, key: &mut HoldKey) -> Option<()> {
    // SAFETY: ptr_at checked that the header lies within the frame's linear data.
    let ip = unsafe { &*ptr_at::<Ipv4Hdr>(ctx, EthHdr::LEN)? };
    // A fragment after the first has no transport header; any fragment goes to the bridge.
    if u16::from_be_bytes(ip.frags) & 0x3fff != 0 {
        return None;
    }
    let header_len = usize::from(ip.vihl & 0x0f) * 4;
    key.family = 4;
    key.protocol = ip.proto;
    key.source = [0; 16];
    key.destination = [0; 16];
    key.source[..4].copy_from_slice(&ip.src_addr);
    key.destination[..4].copy_from_slice(&ip.dst_addr);
    read_ports(ctx, EthHdr::LEN + header_len, key)
}

/// The frame's IPv6 fields into `key`; `None` for a frame whose ports cannot be read.
#[inline(always)]
fn read_ipv6(ctx: &TcContext, key: &mut HoldKey) -> Option<()> {
    // SAFETY: ptr_at checked that the header lies within the frame's linear data.
    let ip = unsafe { &*ptr_at::<Ipv6Hdr>(ctx, EthHdr::LEN)? };
    // An extension header: the transport header (and its ports) lies further on.
    if matches!(
        ip.next_hdr,
        0 | 43 | 44 | 50 | 51 | 60 | 135 | 139 | 140 | 253 | 254
    ) {
        return None;
    }
    key.family = 6;
    key.protocol = ip.next_hdr;
    key.source = ip.src_addr;
    key.destination = ip.dst_addr;
    read_ports(ctx, EthHdr::LEN + Ipv6Hdr::LEN, key)
}

/// TCP and UDP ports into `key` (zero for other protocols: hold-backs name ports only for
/// TCP and UDP); `None` when a TCP or UDP header is cut short.
#[inline(always)]
fn read_ports(ctx: &TcContext, offset: usize, key: &mut HoldKey) -> Option<()> {
    key.source_port = [0; 2];
    key.destination_port = [0; 2];
    if key.protocol == IPPROTO_TCP || key.protocol == IPPROTO_UDP {
        // SAFETY: ptr_at checked that the ports lie within the frame's linear data.
        let ports = unsafe { &*ptr_at::<[[u8; 2]; 2]>(ctx, offset)? };
        key.source_port = ports[0];
        key.destination_port = ports[1];
    }
    Some(())
}
