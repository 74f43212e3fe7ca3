//! Published ports: a connection from outside to `host:port` is DNATed on the uplink and
//! delivered into the container; the container's replies are SNATed at its bridge port and
//! sent out of the uplink. Both directions skip the bridge and netfilter, so the kernel's
//! conntrack never sees the connection; `NAT_FLOWS` is its state here.
//!
//! The decisions (parsing, lookups, opening and ending connections) are written once, for
//! any `Frame`; only writing the translation differs by program type (`Rewriter`): the skb
//! helpers here for tc, direct writes with RFC 1624 arithmetic in `uplink_xdp` for XDP.

use aya_ebpf::maps::lpm_trie::Key;
use aya_ebpf::{
    bindings::{BPF_F_MARK_MANGLED_0, BPF_F_PSEUDO_HDR, BPF_NOEXIST},
    helpers::bpf_ktime_get_ns,
    programs::TcContext,
};
use bridge_common::{
    ClientHoldKey, ClientPrefix, Flow, FlowKey, IPPROTO_TCP, IPPROTO_UDP, PublishedKey,
    PublishedPort, Verdict,
};
use network_types::{
    eth::{EthHdr, EtherType},
    ip::Ipv4Hdr,
};

use crate::{
    frame::{Frame, ptr_at},
    maps::{CLIENT_HOLDS, CLIENT_PREFIX_HOLDS, NAT_FLOWS, PORTS, PUBLISHED},
};

const TCP_FIN: u8 = 0x01;
const TCP_SYN: u8 = 0x02;
const TCP_RST: u8 = 0x04;
const TCP_ACK: u8 = 0x10;

/// Offsets in the frame: the Ethernet header, then an IPv4 header without options.
pub const IP: usize = EthHdr::LEN;
pub const IP_TTL: usize = IP + 8;
pub const IP_CHECK: usize = IP + 10;
pub const IP_SRC: usize = IP + 12;
pub const IP_DST: usize = IP + 16;
pub const L4: usize = IP + Ipv4Hdr::LEN;
pub const L4_SRC_PORT: usize = L4;
pub const L4_DST_PORT: usize = L4 + 2;
const TCP_FLAGS: usize = L4 + 13;
pub const TCP_CHECK: usize = L4 + 16;
pub const UDP_CHECK: usize = L4 + 6;

/// The parts of an IPv4 TCP/UDP frame that NAT reads.
pub struct Segment {
    pub eth_dst: [u8; 6],
    pub eth_src: [u8; 6],
    pub key: FlowKey,
    pub ttl: u8,
    pub tcp_flags: u8,
}

/// Reads an IPv4 TCP or UDP frame that NAT can translate: no fragment, no IP options, the
/// whole transport header present. Anything else is the kernel's.
#[inline(always)]
pub fn parse(ctx: &impl Frame) -> Option<Segment> {
    let eth = unsafe { &*ptr_at::<EthHdr>(ctx, 0)? };
    if eth.ether_type != EtherType::Ipv4 as u16 {
        return None;
    }
    let ip = unsafe { &*ptr_at::<Ipv4Hdr>(ctx, IP)? };
    // Options would move the transport header; fragments have no ports (or only some).
    let fragment = u16::from_be_bytes(ip.frags) & 0x3fff != 0;
    if ip.vihl != 0x45 || fragment {
        return None;
    }
    let total_len = usize::from(u16::from_be_bytes(ip.tot_len));
    let (header_len, tcp_flags) = match ip.proto {
        IPPROTO_TCP => (20, unsafe { *ptr_at::<u8>(ctx, TCP_FLAGS)? }),
        IPPROTO_UDP => (8, 0),
        _ => return None,
    };
    // The transport header must be there, and inside what the IP header claims.
    if total_len < Ipv4Hdr::LEN + header_len || IP + total_len > ctx.frame_len() {
        return None;
    }
    let ports = unsafe { &*ptr_at::<[[u8; 2]; 2]>(ctx, L4_SRC_PORT)? };
    if header_len == 20 {
        ptr_at::<[u8; 20]>(ctx, L4)?;
    } else {
        ptr_at::<[u8; 8]>(ctx, L4)?;
    }
    Some(Segment {
        eth_dst: eth.dst_addr,
        eth_src: eth.src_addr,
        key: FlowKey {
            proto: ip.proto,
            _pad: [0; 3],
            src_ip: ip.src_addr,
            dst_ip: ip.dst_addr,
            src_port: ports[0],
            dst_port: ports[1],
        },
        ttl: ip.ttl,
        tcp_flags,
    })
}

/// What NAT decided for a frame.
pub enum Nat {
    /// Not a NATed connection or published port: someone else's frame.
    NotOurs,
    /// Ours, but the kernel path takes it (the verdict says why).
    Pass(Verdict),
    /// Translated; send it to this ifindex (into the container, or out of the uplink).
    Redirect(u32),
}

/// A frame that arrived on an uplink: an existing inbound connection, or the first frame of a
/// new one to a published port.
#[inline(always)]
pub fn inbound(ctx: &impl Rewriter, segment: &Segment, uplink: u32) -> Nat {
    let flow = match unsafe { NAT_FLOWS.get(&segment.key) } {
        Some(flow)
            if flow.flags & Flow::INBOUND != 0 && port_holds(flow.ifindex, &flow.eth_dst) =>
        {
            *flow
        }
        Some(flow) if flow.flags & Flow::INBOUND != 0 => {
            // Its container left that port (stopped, restarted elsewhere): the connection
            // is over. A retransmitted SYN opens it anew toward where the port points now.
            let peer = flow.peer;
            let _ = NAT_FLOWS.remove(&peer);
            let _ = NAT_FLOWS.remove(&segment.key);
            if !opens_connection(segment) {
                return Nat::Pass(Verdict::StaleEndpoint);
            }
            match open(segment, uplink) {
                Ok(flow) => flow,
                Err(nat) => return nat,
            }
        }
        Some(_) => return Nat::NotOurs,
        None => match open(segment, uplink) {
            Ok(flow) => flow,
            Err(nat) => return nat,
        },
    };
    translate(ctx, segment, &flow, IP_DST, L4_DST_PORT)
}

/// Only a connection's first segment opens it: a TCP connection that began on the kernel
/// path (before attach, or while the table was full) stays there.
#[inline(always)]
fn opens_connection(segment: &Segment) -> bool {
    segment.key.proto == IPPROTO_UDP || segment.tcp_flags & (TCP_SYN | TCP_ACK | TCP_RST) == TCP_SYN
}

/// Whether bridge port `ifindex` is one xbr hooked and still holds container `mac`: the
/// same guard as east-west, so a connection never follows a stale port to another container.
#[inline(always)]
fn port_holds(ifindex: u32, mac: &[u8; 6]) -> bool {
    match unsafe { PORTS.get(&ifindex) } {
        Some(port) => port.endpoint_mac == *mac,
        None => false,
    }
}

/// Creates both directions of a new connection to a published port.
#[inline(always)]
fn open(segment: &Segment, uplink: u32) -> Result<Flow, Nat> {
    let key = &segment.key;
    let exact = PublishedKey {
        proto: key.proto,
        _pad: 0,
        host_port: key.dst_port,
        host_ip: key.dst_ip,
    };
    let any = PublishedKey {
        host_ip: [0; 4],
        ..exact
    };
    let (published_key, published) = match unsafe { PUBLISHED.get(&exact) } {
        Some(published) => (exact, *published),
        None => match unsafe { PUBLISHED.get(&any) } {
            Some(published) => (any, *published),
            None => return Err(Nat::NotOurs),
        },
    };
    // An expiring TTL is answered by the kernel (ICMP); no connection is opened for it. Nor
    // for a client that claims the container's own address (Docker masquerades that one).
    let here = port_holds(published.ifindex, &published.container_mac);
    if !here
        || !opens_connection(segment)
        || segment.ttl <= 1
        || key.src_ip == published.container_ip
    {
        return Err(Nat::Pass(Verdict::NatNotTranslated));
    }
    if policy_holds_back(&published_key, &published, key) {
        return Err(Nat::Pass(Verdict::HeldByPolicy));
    }
    let reply_key = FlowKey {
        proto: key.proto,
        _pad: [0; 3],
        src_ip: published.container_ip,
        dst_ip: key.src_ip,
        src_port: published.container_port,
        dst_port: key.src_port,
    };
    let now = unsafe { bpf_ktime_get_ns() };
    let inbound = Flow {
        new_ip: published.container_ip,
        new_port: published.container_port,
        flags: Flow::INBOUND,
        ifindex: published.ifindex,
        eth_src: published.gateway_mac,
        eth_dst: published.container_mac,
        last_seen_ns: now,
        peer: reply_key,
    };
    let outbound = Flow {
        new_ip: key.dst_ip,
        new_port: key.dst_port,
        flags: Flow::OUTBOUND,
        ifindex: uplink,
        // Replies leave from the uplink's MAC to the MAC the connection came from (the
        // client, or the router in front of it).
        eth_src: segment.eth_dst,
        eth_dst: segment.eth_src,
        last_seen_ns: now,
        peer: *key,
    };
    // The reply direction first, and only if no other connection owns that tuple.
    if NAT_FLOWS
        .insert(&reply_key, &outbound, BPF_NOEXIST as u64)
        .is_err()
    {
        return Err(Nat::Pass(Verdict::NatTableFull));
    }
    if NAT_FLOWS.insert(key, &inbound, BPF_NOEXIST as u64).is_err() {
        let _ = NAT_FLOWS.remove(&reply_key);
        return Err(Nat::Pass(Verdict::NatTableFull));
    }
    Ok(inbound)
}

/// Whether a netfilter rule on the kernel path could touch this client's connection to the
/// published port, so the kernel path must take it.
#[inline(always)]
fn policy_holds_back(
    published_key: &PublishedKey,
    published: &PublishedPort,
    key: &FlowKey,
) -> bool {
    if published.flags & PublishedPort::HELD != 0 {
        return true;
    }
    if published.flags & PublishedPort::CLIENT_HOLDS == 0 {
        return false;
    }
    let client = |shape: u8| ClientHoldKey {
        published: *published_key,
        client_ip: if shape & ClientHoldKey::ADDRESS != 0 {
            key.src_ip
        } else {
            [0; 4]
        },
        client_port: if shape & ClientHoldKey::PORT != 0 {
            key.src_port
        } else {
            [0; 2]
        },
        shape,
        _pad: 0,
    };
    let by_address = Key::new(
        ClientPrefix::prefix_len(32),
        ClientPrefix {
            published: *published_key,
            client_ip: key.src_ip,
        },
    );
    [
        ClientHoldKey::ADDRESS | ClientHoldKey::PORT,
        ClientHoldKey::PORT,
    ]
    .iter()
    .any(|shape| unsafe { CLIENT_HOLDS.get(&client(*shape)) }.is_some())
        || CLIENT_PREFIX_HOLDS.get(&by_address).is_some()
}

/// A frame a container sent: the reply direction of a NATed connection, if there is one.
#[inline(always)]
pub fn outbound(ctx: &impl Rewriter, segment: &Segment) -> Nat {
    match unsafe { NAT_FLOWS.get(&segment.key) } {
        Some(flow) if flow.flags & Flow::OUTBOUND != 0 => {
            let flow = *flow;
            translate(ctx, segment, &flow, IP_SRC, L4_SRC_PORT)
        }
        _ => Nat::NotOurs,
    }
}

/// One translation, as the NAT decisions made it: the address and port at `ip_at` and
/// `port_at` change from `old_*` to `new_*`, the TTL drops by one, the MACs are replaced, and
/// the IP and L4 (`l4_check`) checksums must stay right.
pub struct Rewrite {
    pub ip_at: usize,
    pub port_at: usize,
    pub l4_check: usize,
    pub proto: u8,
    pub old_ip: [u8; 4],
    pub new_ip: [u8; 4],
    pub old_port: [u8; 2],
    pub new_port: [u8; 2],
    /// The TTL as it arrived (> 1).
    pub ttl: u8,
    pub eth_dst: [u8; 6],
    pub eth_src: [u8; 6],
}

/// Writes a `Rewrite` into the frame; false when the frame is too short for it.
pub trait Rewriter: Frame {
    fn rewrite(&self, rewrite: &Rewrite) -> bool;
}

/// tc: the skb helpers, which update checksums incrementally, also correctly for
/// CHECKSUM_PARTIAL frames (where they update the pseudo-header part only).
impl Rewriter for TcContext {
    #[inline(always)]
    fn rewrite(&self, r: &Rewrite) -> bool {
        let zero_means_none = if r.proto == IPPROTO_TCP {
            0
        } else {
            BPF_F_MARK_MANGLED_0 as u64
        };
        let old_ip_word = u32::from_ne_bytes(r.old_ip) as u64;
        let new_ip_word = u32::from_ne_bytes(r.new_ip) as u64;
        let old_port_word = u16::from_ne_bytes(r.old_port) as u64;
        let new_port_word = u16::from_ne_bytes(r.new_port) as u64;
        let old_ttl_word = u16::from_ne_bytes([r.ttl, r.proto]) as u64;
        let new_ttl_word = u16::from_ne_bytes([r.ttl - 1, r.proto]) as u64;
        self.l4_csum_replace(
            r.l4_check,
            old_ip_word,
            new_ip_word,
            BPF_F_PSEUDO_HDR as u64 | zero_means_none | 4,
        )
        .is_ok()
            && self
                .l4_csum_replace(
                    r.l4_check,
                    old_port_word,
                    new_port_word,
                    zero_means_none | 2,
                )
                .is_ok()
            && self
                .l3_csum_replace(IP_CHECK, old_ip_word, new_ip_word, 4)
                .is_ok()
            && self
                .l3_csum_replace(IP_CHECK, old_ttl_word, new_ttl_word, 2)
                .is_ok()
            && self.store(r.ip_at, &r.new_ip, 0).is_ok()
            && self.store(r.port_at, &r.new_port, 0).is_ok()
            && self.store(IP_TTL, &(r.ttl - 1), 0).is_ok()
            && self.store(0, &r.eth_dst, 0).is_ok()
            && self.store(6, &r.eth_src, 0).is_ok()
    }
}

/// Rewrites one address and port (at `ip_at`, `port_at`), the MACs and the TTL, keeping
/// every checksum right.
#[inline(always)]
fn translate(
    ctx: &impl Rewriter,
    segment: &Segment,
    flow: &Flow,
    ip_at: usize,
    port_at: usize,
) -> Nat {
    // Routing semantics: the kernel path answers an expiring TTL with ICMP; so does it here.
    if segment.ttl <= 1 {
        return Nat::Pass(Verdict::NatNotTranslated);
    }
    let key = &segment.key;
    let (old_ip, old_port) = if ip_at == IP_DST {
        (key.dst_ip, key.dst_port)
    } else {
        (key.src_ip, key.src_port)
    };
    let rewrite = Rewrite {
        ip_at,
        port_at,
        l4_check: if key.proto == IPPROTO_TCP {
            TCP_CHECK
        } else {
            UDP_CHECK
        },
        proto: key.proto,
        old_ip,
        new_ip: flow.new_ip,
        old_port,
        new_port: flow.new_port,
        ttl: segment.ttl,
        eth_dst: flow.eth_dst,
        eth_src: flow.eth_src,
    };
    if !ctx.rewrite(&rewrite) {
        // Only a frame too short for its headers fails here, and parse() rules those out.
        return Nat::Pass(Verdict::Malformed);
    }
    track(key, segment.tcp_flags);
    Nat::Redirect(flow.ifindex)
}

/// Connection state: the time of the last frame, FINs seen, and RST closes at once.
#[inline(always)]
fn track(key: &FlowKey, tcp_flags: u8) {
    if tcp_flags & TCP_RST != 0 {
        if let Some(flow) = unsafe { NAT_FLOWS.get(key) } {
            let peer = flow.peer;
            let _ = NAT_FLOWS.remove(&peer);
        }
        let _ = NAT_FLOWS.remove(key);
        return;
    }
    if let Some(flow) = NAT_FLOWS.get_ptr_mut(key) {
        let flow = unsafe { &mut *flow };
        flow.last_seen_ns = unsafe { bpf_ktime_get_ns() };
        if tcp_flags & TCP_FIN != 0 {
            flow.flags |= Flow::FIN_SEEN;
        }
    }
}
