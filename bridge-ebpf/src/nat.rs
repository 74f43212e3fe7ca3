//! Published ports: a connection from outside to `host:port` is DNATed on the uplink and
//! delivered into the container; the container's replies are SNATed at its bridge port and
//! sent out of the uplink. Both directions skip the bridge and netfilter, so the kernel's
//! conntrack never sees the connection; two tables are its state here.
//!
//! A new connection starts in `NAT_TRANSIENT`, an LRU: when a flood fills it, the least
//! recently used entries make room, and they are entries of connections that never
//! completed a handshake (or already closed). Only when the client acknowledges the
//! container's SYN-ACK (TCP; the exact acknowledgment number, which a spoofer never sees) or
//! keeps talking after an answer (UDP) does the connection move to `NAT_FLOWS`, a plain hash
//! that never evicts. A connection closed by FIN both ways moves back to the LRU for its last
//! segments; a RST ends it. Transient state expires by timestamp where it is read, so none of
//! this needs a process in user space.
//!
//! The decisions (parsing, lookups, opening and ending connections) are written once, for
//! any `Frame`; only writing the translation differs by program type (`Rewriter`): the skb
//! helpers here for tc, direct writes with RFC 1624 arithmetic in `uplink_xdp` for XDP.

use aya_ebpf::{
    bindings::{
        BPF_ANY, BPF_F_HDR_FIELD_MASK, BPF_F_MARK_MANGLED_0, BPF_F_PSEUDO_HDR, BPF_NOEXIST,
    },
    helpers::bpf_ktime_get_ns,
    programs::TcContext,
};
use bridge_common::{
    ClientHoldKey, ClientPrefix, Flow, FlowKey, IPPROTO_TCP, IPPROTO_UDP, NatEvent, PublishedKey,
    PublishedPort, Verdict, lifetime,
};
use network_types::{
    eth::{EthHdr, EtherType},
    ip::Ipv4Hdr,
    tcp::TcpHdr,
    udp::UdpHdr,
};

use crate::{
    frame::{Frame, ptr_at},
    maps::{
        CLIENT_HOLDS, CLIENT_PREFIX_HOLDS, CLIENT_PROBE, FLOW_SCRATCH, FLOWS, NAT_EVENTS, PORTS,
        PUBLISHED, TRANSIENT,
    },
};

// Map access. A lookup hands out a reference (`get`) or a pointer (`get_ptr_mut`) into the
// map's value, which the kernel keeps valid memory for the whole program run: a hash map
// frees a removed entry only after an RCU grace period, an LRU reuses its preallocated
// entries but never unmaps them, a per-CPU array's value is this CPU's alone. Map lookups
// are unsafe because the entry may change meanwhile (the control plane, another CPU on the
// same connection, the LRU giving the entry to another key): the value read is then stale or
// mixed, as with any BPF map, never invalid memory. Writes through `get_ptr_mut` are plain
// stores of whole fields; two CPUs on one connection at once keep the last one's.

const TCP_FIN: u8 = 0x01;
const TCP_SYN: u8 = 0x02;
const TCP_RST: u8 = 0x04;
const TCP_ACK: u8 = 0x10;

/// Offsets in the frame: the Ethernet header, then an IPv4 header without options.
pub const ETH_DST: usize = 0;
pub const ETH_SRC: usize = ETH_DST + MAC_LEN;
pub const MAC_LEN: usize = 6;
pub const IP: usize = EthHdr::LEN;
pub const IP_TTL: usize = IP + 8;
pub const IP_CHECK: usize = IP + 10;
pub const IP_SRC: usize = IP + 12;
pub const IP_DST: usize = IP + 16;
pub const L4: usize = IP + Ipv4Hdr::LEN;
pub const L4_SRC_PORT: usize = L4;
pub const L4_DST_PORT: usize = L4 + 2;
pub const TCP_CHECK: usize = L4 + 16;
pub const UDP_CHECK: usize = L4 + 6;
/// Where the ports end: the frame's bytes from its start to here hold every field NAT
/// rewrites except the L4 checksum.
pub const L4_PORTS_END: usize = L4_DST_PORT + 2;

/// Offsets in the TCP header.
const TCP_SEQ: usize = 4;
const TCP_ACK_SEQ: usize = 8;
const TCP_FLAGS: usize = 13;

/// The first byte of an IPv4 header without options: version 4, 5 words of header.
const IPV4_NO_OPTIONS: u8 = 0x45;
/// In the IPv4 header's flags and fragment offset: "more fragments" and the offset. Either
/// set, and the frame is a fragment.
pub const IPV4_FRAGMENT: u16 = 0x3fff;

/// The size of the field an l3/l4 checksum helper replaces, in its flags'
/// `BPF_F_HDR_FIELD_MASK` bits: a 32-bit word (an address) or a 16-bit one (a port; the TTL
/// with the protocol).
const CSUM_FIELD_U32: u64 = 4 & BPF_F_HDR_FIELD_MASK as u64;
const CSUM_FIELD_U16: u64 = 2 & BPF_F_HDR_FIELD_MASK as u64;

/// The parts of an IPv4 TCP/UDP frame that NAT reads.
pub struct Segment {
    pub eth_dst: [u8; 6],
    pub eth_src: [u8; 6],
    pub key: FlowKey,
    pub ttl: u8,
    pub tcp_flags: u8,
    /// TCP sequence and acknowledgment numbers, network byte order (zero for UDP).
    pub tcp_seq: [u8; 4],
    pub tcp_ack: [u8; 4],
}

/// Reads an IPv4 TCP or UDP frame that NAT can translate: no fragment, no IP options, the
/// whole transport header present. Anything else is the kernel's, with the verdict that says
/// why: `NotPublished` (not IPv4 TCP or UDP, which no published port is), `NatNotTranslated`
/// (a fragment or IP options: NAT does not read those) or `Malformed`.
#[inline(always)]
pub fn parse(ctx: &impl Frame) -> Result<Segment, Verdict> {
    let Some(eth) = ptr_at::<EthHdr>(ctx, 0) else {
        return Err(Verdict::Malformed);
    };
    // SAFETY: ptr_at checked that the header lies within the frame's linear data.
    let eth = unsafe { &*eth };
    if eth.ether_type != EtherType::Ipv4 as u16 {
        return Err(Verdict::NotPublished);
    }
    let Some(ip) = ptr_at::<Ipv4Hdr>(ctx, IP) else {
        return Err(Verdict::Malformed);
    };
    // SAFETY: ptr_at checked that the header lies within the frame's linear data.
    let ip = unsafe { &*ip };
    if ip.vihl >> 4 != 4 || usize::from(ip.vihl & 0x0f) * 4 < Ipv4Hdr::LEN {
        return Err(Verdict::Malformed);
    }
    let header_len = match ip.proto {
        IPPROTO_TCP => TcpHdr::LEN,
        IPPROTO_UDP => UdpHdr::LEN,
        _ => return Err(Verdict::NotPublished),
    };
    // Options would move the transport header; fragments have no ports (or only some).
    let fragment = u16::from_be_bytes(ip.frags) & IPV4_FRAGMENT != 0;
    if ip.vihl != IPV4_NO_OPTIONS || fragment {
        return Err(Verdict::NatNotTranslated);
    }
    let total_len = usize::from(u16::from_be_bytes(ip.tot_len));
    // The transport header must be there, and inside what the IP header claims.
    if total_len < Ipv4Hdr::LEN + header_len || IP + total_len > ctx.frame_len() {
        return Err(Verdict::Malformed);
    }
    let Some(ports) = ptr_at::<[[u8; 2]; 2]>(ctx, L4_SRC_PORT) else {
        return Err(Verdict::Malformed);
    };
    // SAFETY: ptr_at checked that the ports lie within the frame's linear data.
    let ports = unsafe { &*ports };
    let (tcp_flags, tcp_seq, tcp_ack) = if header_len == TcpHdr::LEN {
        let Some(tcp) = ptr_at::<[u8; TcpHdr::LEN]>(ctx, L4) else {
            return Err(Verdict::Malformed);
        };
        // SAFETY: ptr_at checked that the TCP header lies within the frame's linear data.
        let tcp = unsafe { &*tcp };
        let at = |offset: usize| {
            [
                tcp[offset],
                tcp[offset + 1],
                tcp[offset + 2],
                tcp[offset + 3],
            ]
        };
        (tcp[TCP_FLAGS], at(TCP_SEQ), at(TCP_ACK_SEQ))
    } else {
        if ptr_at::<[u8; UdpHdr::LEN]>(ctx, L4).is_none() {
            return Err(Verdict::Malformed);
        }
        (0, [0; 4], [0; 4])
    };
    Ok(Segment {
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
        tcp_seq,
        tcp_ack,
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
    /// Translated, a frame of an outbound flow (egress NAT): out of this uplink, or into the
    /// container behind this bridge port.
    Egress(u32),
    /// As `Egress`, out of this uplink, with the next hop's neighbour resolved by the kernel.
    EgressNeigh(u32),
}

impl Nat {
    /// Whether the frame was translated (and is to be redirected).
    #[inline(always)]
    pub fn translated(&self) -> bool {
        matches!(
            self,
            Nat::Redirect(_) | Nat::Egress(_) | Nat::EgressNeigh(_)
        )
    }
}

#[inline(always)]
pub fn now() -> u64 {
    // SAFETY: a BPF helper without arguments.
    unsafe { bpf_ktime_get_ns() }
}

#[inline(always)]
pub fn count(event: NatEvent) {
    if let Some(counter) = NAT_EVENTS.get_ptr_mut(event as u32) {
        // SAFETY: a per-CPU array's value, valid for the whole program run; no other program
        // runs on this CPU meanwhile, so nothing else writes it.
        unsafe { *counter += 1 };
    }
}

/// Whether a transient entry has been quiet for less than its lifetime.
#[inline(always)]
pub fn alive(flow: &Flow, proto: u8, now: u64) -> bool {
    // Another CPU may have stamped it a moment after this one read the clock.
    now <= flow.last_seen_ns || now - flow.last_seen_ns <= flow.lifetime_ns(proto)
}

/// Writes a transient entry; `existed`: whether the key was there already (for the count
/// from which the LRU's replacements are derived).
#[inline(always)]
pub fn transient_put(key: &FlowKey, flow: &Flow, existed: bool) -> bool {
    if TRANSIENT.insert(key, flow, BPF_ANY as u64).is_err() {
        return false;
    }
    if !existed {
        count(NatEvent::TransientAdded);
    }
    true
}

#[inline(always)]
pub fn transient_remove(key: &FlowKey) {
    if TRANSIENT.remove(key).is_ok() {
        count(NatEvent::TransientRemoved);
    }
}

/// A SYN that opens a TCP connection: no ACK, no RST.
#[inline(always)]
fn is_syn(segment: &Segment) -> bool {
    segment.key.proto == IPPROTO_TCP && segment.tcp_flags & (TCP_SYN | TCP_ACK | TCP_RST) == TCP_SYN
}

/// Only a connection's first segment opens it: a TCP connection that began on the kernel
/// path (before attach, or when xbr could not track it) stays there.
#[inline(always)]
pub fn opens_connection(segment: &Segment) -> bool {
    segment.key.proto == IPPROTO_UDP || is_syn(segment)
}

/// A frame that arrived on an uplink: an existing inbound connection, or the first frame of a
/// new one to a published port.
///
/// (The state changes live in functions of their own, BPF subprograms, each with its own
/// stack frame: inlined, the programs' stacks would exceed the kernel's 512 bytes.)
#[inline(always)]
pub fn inbound(ctx: &impl Rewriter, segment: &Segment, uplink: u32) -> Nat {
    let key = &segment.key;
    let now = now();
    // SAFETY: a map value, only read, during the run (see "Map access" at the top).
    if let Some(flow) = unsafe { FLOWS.get(key) } {
        if flow.flags & Flow::INBOUND == 0 {
            return Nat::NotOurs;
        }
        if port_holds(flow.ifindex, &flow.eth_dst) {
            return established(ctx, segment, flow, IP_DST, L4_DST_PORT, now);
        }
        // Its container left that port (stopped, restarted elsewhere): the connection is
        // over. A retransmitted SYN opens it anew toward where the port points now.
        let _ = FLOWS.remove(&flow.peer);
        let _ = FLOWS.remove(key);
        if !opens_connection(segment) {
            return Nat::Pass(Verdict::StaleEndpoint);
        }
        return open_and_translate(ctx, segment, uplink, now, false);
    }
    let mut existed = false;
    // SAFETY: a map value, only read, during the run (see "Map access" at the top).
    if let Some(flow) = unsafe { TRANSIENT.get(key) } {
        if flow.flags & Flow::INBOUND == 0 {
            return Nat::NotOurs;
        }
        existed = true;
        if !alive(flow, key.proto, now) {
            // Expired: as if it were not there (a new SYN or datagram opens it again).
        } else if !port_holds(flow.ifindex, &flow.eth_dst) {
            transient_remove(&flow.peer);
            transient_remove(key);
            existed = false;
            if !opens_connection(segment) {
                return Nat::Pass(Verdict::StaleEndpoint);
            }
        } else if !(is_syn(segment) && flow.flags & Flow::CLOSING != 0) {
            // The outside opened a connection to a published port; it answers an outbound one.
            let outside_opened = flow.flags & Flow::EGRESS == 0;
            let nat = translate(ctx, segment, flow, IP_DST, L4_DST_PORT);
            if nat.translated() {
                if outside_opened {
                    opener_spoke(segment, uplink, FROM_UPLINK, now);
                } else {
                    answerer_spoke(segment, uplink, FROM_UPLINK, now);
                }
            }
            return nat;
        }
        // A SYN on the tuple of a closing connection: a new connection.
    }
    open_and_translate(ctx, segment, uplink, now, existed)
}

/// Where a frame of a connection arrived: on an uplink (from the outside), or on a bridge
/// port (from a container).
const FROM_UPLINK: bool = true;
const FROM_PORT: bool = false;

/// The other direction's entry of a connection, as a frame that arrived on `arrived_on`
/// shows it: its answers go back where this frame came from, translated back, between the
/// same two MACs. For when the LRU replaced that entry.
#[inline(always)]
fn other_direction(
    segment: &Segment,
    arrived_on: u32,
    from_uplink: bool,
    flags: u16,
    opened_ns: u64,
    now: u64,
) -> Flow {
    let key = &segment.key;
    // Toward the uplink the other direction's source is translated back to what this frame
    // was sent to; toward a container, its destination to what this frame came from.
    let (new_ip, new_port, direction) = if from_uplink {
        (key.dst_ip, key.dst_port, Flow::OUTBOUND)
    } else {
        (key.src_ip, key.src_port, Flow::INBOUND)
    };
    Flow {
        new_ip,
        new_port,
        flags: direction | (flags & (Flow::ESTABLISHED | Flow::EGRESS)),
        ifindex: arrived_on,
        eth_src: segment.eth_dst,
        eth_dst: segment.eth_src,
        last_seen_ns: now,
        peer: *key,
        opened_ns,
        handshake_ack: [0; 4],
        _pad: [0; 4],
    }
}

/// The end that opened a transient connection sent a frame (the client of a published port,
/// or the container of an outbound flow). It completes the handshake when it acknowledges the
/// other end's SYN-ACK (TCP), or makes the flow a stream when the other end answered and the
/// flow is old enough (UDP): then the connection becomes established.
#[inline(never)]
fn opener_spoke(segment: &Segment, arrived_on: u32, from_uplink: bool, now: u64) {
    let key = &segment.key;
    // SAFETY: a map value, only read, during the run (see "Map access" at the top).
    let Some(flow) = (unsafe { TRANSIENT.get(key) }) else {
        return;
    };
    let reply_key = flow.peer;
    let (opened_ns, flags) = (flow.opened_ns, flow.flags);
    let reply_direction = if from_uplink {
        Flow::OUTBOUND
    } else {
        Flow::INBOUND
    };
    // SAFETY: a map value, only read, during the run (see "Map access" at the top).
    let (answered, handshake_ack) = match unsafe { TRANSIENT.get(&reply_key) } {
        Some(reply) if reply.flags & reply_direction != 0 => {
            (reply.flags & Flow::ANSWERED != 0, reply.handshake_ack)
        }
        Some(_) => (false, [0; 4]),
        None => {
            // Replaced by the LRU: the frame shows it again (as when the connection opened).
            if from_uplink || port_holds(arrived_on, &segment.eth_src) {
                let reply =
                    other_direction(segment, arrived_on, from_uplink, flags, opened_ns, now);
                let _ = transient_put(&reply_key, &reply, false);
            }
            (false, [0; 4])
        }
    };
    let completes = flags & Flow::ESTABLISHED != 0
        || (answered
            && if key.proto == IPPROTO_TCP {
                segment.tcp_flags & (TCP_SYN | TCP_RST | TCP_ACK) == TCP_ACK
                    && segment.tcp_ack == handshake_ack
            } else {
                now.saturating_sub(opened_ns) >= lifetime::UDP_STREAM_AFTER_NS
            });
    if completes && promote(key, &reply_key, now) {
        track_established(key, &reply_key, segment.tcp_flags, now);
    } else {
        track_transient(key, &reply_key, segment.tcp_flags, now);
    }
}

/// Moves a connection whose handshake completed from the transient to the established
/// table. False when the established table had no room: the connection then stays
/// transient, marked established (so it lives by the established rules), and tries again
/// with the client's next frame.
#[inline(always)]
fn promote(key: &FlowKey, reply_key: &FlowKey, now: u64) -> bool {
    let (Some(inbound), Some(outbound)) =
        (TRANSIENT.get_ptr_mut(key), TRANSIENT.get_ptr_mut(reply_key))
    else {
        return false;
    };
    // SAFETY: a connection-table value, valid for the run (see "Map access" at the top).
    let (inbound, outbound) = unsafe { (&mut *inbound, &mut *outbound) };
    let first_try = inbound.flags & Flow::ESTABLISHED == 0;
    // A FIN seen while it waited for room still counts.
    let kept = Flow::IDENTITY | Flow::FIN_SEEN;
    inbound.flags = (inbound.flags & kept) | Flow::ESTABLISHED;
    inbound.last_seen_ns = now;
    outbound.flags = (outbound.flags & kept) | Flow::ESTABLISHED;
    if FLOWS
        .insert(reply_key, &*outbound, BPF_NOEXIST as u64)
        .is_ok()
    {
        if FLOWS.insert(key, &*inbound, BPF_NOEXIST as u64).is_ok() {
            transient_remove(key);
            transient_remove(reply_key);
            count(NatEvent::Established);
            return true;
        }
        let _ = FLOWS.remove(reply_key);
    }
    if first_try {
        count(NatEvent::EstablishedTableFull);
    }
    false
}

/// Whether bridge port `ifindex` is one xbr hooked and still holds container `mac`: the
/// same guard as east-west, so a connection never follows a stale port to another container.
#[inline(always)]
fn port_holds(ifindex: u32, mac: &[u8; 6]) -> bool {
    // SAFETY: a map value, only read, during the run (see "Map access" at the top).
    match unsafe { PORTS.get(&ifindex) } {
        Some(port) => port.endpoint_mac == *mac,
        None => false,
    }
}

/// What `open` did.
const OPENED: u32 = 0;
const NOT_PUBLISHED: u32 = 1;
const NOT_OPENED: u32 = 2;
const NO_ROOM: u32 = 3;

#[inline(always)]
fn open_and_translate(
    ctx: &impl Rewriter,
    segment: &Segment,
    uplink: u32,
    now: u64,
    existed: bool,
) -> Nat {
    if published_held(&segment.key) {
        return Nat::Pass(Verdict::HeldByPolicy);
    }
    match open(segment, uplink, now, existed) {
        // SAFETY: a map value, only read, during the run (see "Map access" at the top).
        OPENED => match unsafe { TRANSIENT.get(&segment.key) } {
            Some(flow) => translate(ctx, segment, flow, IP_DST, L4_DST_PORT),
            None => Nat::Pass(Verdict::NatTableFull),
        },
        NOT_PUBLISHED => Nat::NotOurs,
        NOT_OPENED => Nat::Pass(Verdict::NatNotTranslated),
        _ => Nat::Pass(Verdict::NatTableFull),
    }
}

/// Creates both directions of a new connection to a published port, in the transient table.
/// `existed`: the inbound key has a (dead) transient entry that this one replaces.
#[inline(never)]
fn open(segment: &Segment, uplink: u32, now: u64, existed: bool) -> u32 {
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
    // SAFETY: a map value, only read, during the run (see "Map access" at the top).
    let published = match unsafe { PUBLISHED.get(&exact).or_else(|| PUBLISHED.get(&any)) } {
        Some(published) => published,
        None => return NOT_PUBLISHED,
    };
    // An expiring TTL is answered by the kernel (ICMP); no connection is opened for it. Nor
    // for a client that claims the container's own address (Docker masquerades that one).
    let here = port_holds(published.ifindex, &published.container_mac);
    if !here
        || !opens_connection(segment)
        || segment.ttl <= 1
        || key.src_ip == published.container_ip
    {
        return NOT_OPENED;
    }
    let reply_key = FlowKey {
        proto: key.proto,
        _pad: [0; 3],
        src_ip: published.container_ip,
        dst_ip: key.src_ip,
        src_port: published.container_port,
        dst_port: key.src_port,
    };
    // The reply tuple must be free: the container could not tell two connections on one
    // tuple apart. A dead transient entry does not hold it.
    // SAFETY: a map value, only read, during the run (see "Map access" at the top).
    if unsafe { FLOWS.get(&reply_key) }.is_some() {
        return NOT_OPENED;
    }
    // SAFETY: a map value, only read, during the run (see "Map access" at the top).
    let reply_existed = match unsafe { TRANSIENT.get(&reply_key) } {
        Some(other) if other.peer != *key && alive(other, key.proto, now) => {
            return NOT_OPENED;
        }
        Some(_) => true,
        None => false,
    };
    let Some(scratch) = FLOW_SCRATCH.get_ptr_mut(0) else {
        return NO_ROOM;
    };
    // SAFETY: a per-CPU array value, valid for the whole program run and used by nothing
    // else meanwhile (no other program runs on this CPU).
    let flow = unsafe { &mut *scratch };
    // The reply direction first.
    flow.new_ip = key.dst_ip;
    flow.new_port = key.dst_port;
    flow.flags = Flow::OUTBOUND;
    flow.ifindex = uplink;
    // Replies leave from the uplink's MAC to the MAC the connection came from (the client, or
    // the router in front of it).
    flow.eth_src = segment.eth_dst;
    flow.eth_dst = segment.eth_src;
    flow.last_seen_ns = now;
    flow.peer = *key;
    flow.opened_ns = now;
    flow.handshake_ack = [0; 4];
    flow._pad = [0; 4];
    if !transient_put(&reply_key, flow, reply_existed) {
        return NO_ROOM;
    }
    flow.new_ip = published.container_ip;
    flow.new_port = published.container_port;
    flow.flags = Flow::INBOUND;
    flow.ifindex = published.ifindex;
    flow.eth_src = published.gateway_mac;
    flow.eth_dst = published.container_mac;
    flow.peer = reply_key;
    if !transient_put(key, flow, existed) {
        transient_remove(&reply_key);
        return NO_ROOM;
    }
    count(NatEvent::Opened);
    OPENED
}

/// Whether a netfilter rule on the kernel path could touch the connection `key` opens to a
/// published port (the port is `HELD`, or has `CLIENT_HOLDS` naming this client), so the
/// kernel path must take it. A BPF function of its own, called beside `open` rather than
/// inside it (the stack of the two together would pass 512 bytes); its lookup keys are built
/// in per-CPU scratch memory.
#[inline(never)]
fn published_held(key: &FlowKey) -> bool {
    let Some(probe) = CLIENT_PROBE.get_ptr_mut(0) else {
        return true;
    };
    // SAFETY: a per-CPU map value, valid for the whole program run and used by nothing else.
    let probe = unsafe { &mut *probe };
    // Field by field: a struct built whole would take a stack slot of its own.
    let published_key = &mut probe.hold.published;
    published_key.proto = key.proto;
    published_key._pad = 0;
    published_key.host_port = key.dst_port;
    published_key.host_ip = key.dst_ip;
    // SAFETY: a map value, only read, during the run (see "Map access" at the top).
    let flags = match unsafe { PUBLISHED.get(&probe.hold.published) } {
        Some(published) => published.flags,
        None => {
            probe.hold.published.host_ip = [0; 4];
            // SAFETY: a map value, only read, during the run (see "Map access" at the top).
            match unsafe { PUBLISHED.get(&probe.hold.published) } {
                Some(published) => published.flags,
                None => return false,
            }
        }
    };
    if flags & PublishedPort::HELD != 0 {
        return true;
    }
    if flags & PublishedPort::CLIENT_HOLDS == 0 {
        return false;
    }
    let published_key = probe.hold.published;
    probe.prefix.prefix_len = ClientPrefix::prefix_len(32);
    probe.prefix.data.published = published_key;
    probe.prefix.data.client_ip = key.src_ip;
    if CLIENT_PREFIX_HOLDS.get(&probe.prefix).is_some() {
        return true;
    }
    probe.hold.client_ip = key.src_ip;
    probe.hold.client_port = key.src_port;
    probe.hold.shape = ClientHoldKey::ADDRESS | ClientHoldKey::PORT;
    probe.hold._pad = 0;
    // SAFETY: a map value, only read, during the run (see "Map access" at the top).
    if unsafe { CLIENT_HOLDS.get(&probe.hold) }.is_some() {
        return true;
    }
    probe.hold.client_ip = [0; 4];
    probe.hold.shape = ClientHoldKey::PORT;
    // SAFETY: a map value, only read, during the run (see "Map access" at the top).
    unsafe { CLIENT_HOLDS.get(&probe.hold) }.is_some()
}

/// A frame a container sent on bridge port `port`: the reply direction of a NATed
/// connection, if there is one.
#[inline(always)]
pub fn outbound(ctx: &impl Rewriter, segment: &Segment, port: u32) -> Nat {
    let key = &segment.key;
    let now = now();
    // SAFETY: a map value, only read, during the run (see "Map access" at the top).
    if let Some(flow) = unsafe { FLOWS.get(key) } {
        if flow.flags & Flow::OUTBOUND == 0 {
            return Nat::NotOurs;
        }
        return established(ctx, segment, flow, IP_SRC, L4_SRC_PORT, now);
    }
    // SAFETY: a map value, only read, during the run (see "Map access" at the top).
    let Some(flow) = (unsafe { TRANSIENT.get(key) }) else {
        return Nat::NotOurs;
    };
    if flow.flags & Flow::OUTBOUND == 0 || !alive(flow, key.proto, now) {
        return Nat::NotOurs;
    }
    // The container opened an outbound flow; it answers a connection to a published port.
    let container_opened = flow.flags & Flow::EGRESS != 0;
    let nat = translate(ctx, segment, flow, IP_SRC, L4_SRC_PORT);
    if nat.translated() {
        if container_opened {
            opener_spoke(segment, port, FROM_PORT, now);
        } else {
            answerer_spoke(segment, port, FROM_PORT, now);
        }
    }
    nat
}

/// The end that did not open a transient connection sent a frame (the container behind a
/// published port, or the outside server of an outbound flow). A SYN-ACK (TCP) or a datagram
/// (UDP) is its answer, remembered in its direction's entry: the opener's next frame can then
/// make the connection established. If the LRU replaced the opener's direction meanwhile,
/// the answer brings it back, so that the opener's ACK finds it.
#[inline(never)]
fn answerer_spoke(segment: &Segment, arrived_on: u32, from_uplink: bool, now: u64) {
    let key = &segment.key;
    let Some(flow) = TRANSIENT.get_ptr_mut(key) else {
        return;
    };
    // SAFETY: a connection-table value, valid for the run (see "Map access" at the top).
    let flow = unsafe { &mut *flow };
    let peer = flow.peer;
    let answer = if key.proto == IPPROTO_TCP {
        segment.tcp_flags & (TCP_SYN | TCP_ACK | TCP_RST) == TCP_SYN | TCP_ACK
    } else {
        true
    };
    if answer && flow.flags & (Flow::ESTABLISHED | Flow::CLOSING) == 0 {
        flow.flags |= Flow::ANSWERED;
        if key.proto == IPPROTO_TCP {
            flow.handshake_ack = u32::from_be_bytes(segment.tcp_seq)
                .wrapping_add(1)
                .to_be_bytes();
        }
        // SAFETY: a map value, only read, during the run (see "Map access" at the top).
        if unsafe { TRANSIENT.get(&peer) }.is_none()
            && (from_uplink || port_holds(arrived_on, &segment.eth_src))
        {
            let opener = other_direction(
                segment,
                arrived_on,
                from_uplink,
                flow.flags & Flow::EGRESS,
                flow.opened_ns,
                now,
            );
            let _ = transient_put(&peer, &opener, false);
        }
    }
    track_transient(key, &peer, segment.tcp_flags, now);
}

/// A frame of an established connection: translated, then its state updated.
#[inline(always)]
fn established(
    ctx: &impl Rewriter,
    segment: &Segment,
    flow: &Flow,
    ip_at: usize,
    port_at: usize,
    now: u64,
) -> Nat {
    let nat = translate(ctx, segment, flow, ip_at, port_at);
    if nat.translated() {
        let peer = flow.peer;
        track_established(&segment.key, &peer, segment.tcp_flags, now);
    }
    nat
}

/// Established state: the time of the last frame and FINs seen; a RST ends the connection,
/// and FIN in both directions moves it to the transient table for its last segments.
#[inline(never)]
fn track_established(key: &FlowKey, peer: &FlowKey, tcp_flags: u8, now: u64) {
    if tcp_flags & TCP_RST != 0 {
        let _ = FLOWS.remove(peer);
        let _ = FLOWS.remove(key);
        count(NatEvent::Reset);
        return;
    }
    let Some(this) = FLOWS.get_ptr_mut(key) else {
        return;
    };
    // SAFETY: a connection-table value, valid for the run (see "Map access" at the top).
    let this = unsafe { &mut *this };
    this.last_seen_ns = now;
    if tcp_flags & TCP_FIN == 0 {
        return;
    }
    this.flags |= Flow::FIN_SEEN;
    let Some(other) = FLOWS.get_ptr_mut(peer) else {
        return;
    };
    // SAFETY: a connection-table value, valid for the run (see "Map access" at the top).
    let other = unsafe { &mut *other };
    if other.flags & Flow::FIN_SEEN == 0 {
        return;
    }
    // Both ways closed: only the last ACK and retransmissions are left, which the transient
    // table serves (a flood may replace them there, costing a retransmission at most).
    for entry in [&mut *this, &mut *other] {
        entry.flags = (entry.flags & Flow::IDENTITY) | Flow::CLOSING;
        entry.opened_ns = now;
    }
    // SAFETY: a map value, only read, during the run (see "Map access" at the top).
    let key_existed = unsafe { TRANSIENT.get(key) }.is_some();
    // SAFETY: a map value, only read, during the run (see "Map access" at the top).
    let peer_existed = unsafe { TRANSIENT.get(peer) }.is_some();
    if transient_put(key, this, key_existed) && transient_put(peer, other, peer_existed) {
        let _ = FLOWS.remove(peer);
        let _ = FLOWS.remove(key);
        count(NatEvent::Closed);
    }
}

/// Transient state: the time of the last frame; a RST ends the connection. FIN both ways on
/// a connection that lives here only because the established table was full closes it.
#[inline(always)]
fn track_transient(key: &FlowKey, peer: &FlowKey, tcp_flags: u8, now: u64) {
    if tcp_flags & TCP_RST != 0 {
        transient_remove(peer);
        transient_remove(key);
        count(NatEvent::Reset);
        return;
    }
    let Some(this) = TRANSIENT.get_ptr_mut(key) else {
        return;
    };
    // SAFETY: a connection-table value, valid for the run (see "Map access" at the top).
    let this = unsafe { &mut *this };
    this.last_seen_ns = now;
    if tcp_flags & TCP_FIN == 0 || this.flags & Flow::ESTABLISHED == 0 {
        return;
    }
    this.flags |= Flow::FIN_SEEN;
    if let Some(other) = TRANSIENT.get_ptr_mut(peer) {
        // SAFETY: a connection-table value, valid for the run (see "Map access" at the top).
        let other = unsafe { &mut *other };
        if other.flags & Flow::FIN_SEEN != 0 {
            other.flags = (other.flags & !Flow::ESTABLISHED) | Flow::CLOSING;
            this.flags = (this.flags & !Flow::ESTABLISHED) | Flow::CLOSING;
            count(NatEvent::Closed);
        }
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

/// How a program type sends a translated frame on: its redirect, and writing a `Rewrite`.
pub trait Rewriter: Frame {
    /// Called once NAT has decided to send the frame to `ifindex`, before anything in the
    /// frame changes: false when the frame cannot be sent there, and then it goes on
    /// unchanged (`Nat::Pass`), never translated.
    fn redirect_to(&self, ifindex: u32) -> bool;
    /// Writes `rewrite` into the frame; false when the frame is too short for it.
    fn rewrite(&self, rewrite: &Rewrite) -> bool;
}

/// tc: the skb helpers, which update checksums incrementally, also correctly for
/// CHECKSUM_PARTIAL frames (where they update the pseudo-header part only).
impl Rewriter for TcContext {
    /// tc redirects after the rewrite, in `deliver`, whose helpers take any ifindex with
    /// flags 0 (and return TC_ACT_REDIRECT); the kernel drops a frame whose redirect then
    /// fails (no such device, no peer), it never passes it on translated.
    #[inline(always)]
    fn redirect_to(&self, _ifindex: u32) -> bool {
        true
    }

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
            BPF_F_PSEUDO_HDR as u64 | zero_means_none | CSUM_FIELD_U32,
        )
        .is_ok()
            && self
                .l4_csum_replace(
                    r.l4_check,
                    old_port_word,
                    new_port_word,
                    zero_means_none | CSUM_FIELD_U16,
                )
                .is_ok()
            && self
                .l3_csum_replace(IP_CHECK, old_ip_word, new_ip_word, CSUM_FIELD_U32)
                .is_ok()
            && self
                .l3_csum_replace(IP_CHECK, old_ttl_word, new_ttl_word, CSUM_FIELD_U16)
                .is_ok()
            && self.store(r.ip_at, &r.new_ip, 0).is_ok()
            && self.store(r.port_at, &r.new_port, 0).is_ok()
            && self.store(IP_TTL, &(r.ttl - 1), 0).is_ok()
            && self.store(ETH_DST, &r.eth_dst, 0).is_ok()
            && self.store(ETH_SRC, &r.eth_src, 0).is_ok()
    }
}

/// Rewrites one address and port (at `ip_at`, `port_at`), the MACs and the TTL, keeping
/// every checksum right.
#[inline(always)]
pub fn translate(
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
    // Nothing in the frame changes before its redirect is certain: a frame that cannot go
    // where the connection says goes on unchanged, to the kernel path.
    if !ctx.redirect_to(flow.ifindex) {
        return Nat::Pass(Verdict::NatNotTranslated);
    }
    if !ctx.rewrite(&rewrite) {
        // Only a frame too short for its headers fails here, and parse() rules those out.
        return Nat::Pass(Verdict::Malformed);
    }
    if flow.flags & Flow::EGRESS == 0 {
        Nat::Redirect(flow.ifindex)
    } else if flow.flags & Flow::RESOLVE_NEIGH != 0 {
        Nat::EgressNeigh(flow.ifindex)
    } else {
        Nat::Egress(flow.ifindex)
    }
}
