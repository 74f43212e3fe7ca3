//! Egress NAT: a container's new outbound flow (a TCP SYN, a UDP flow's first datagram) to a
//! destination outside the bridge's subnet is source-NATed to an uplink's address and a port
//! xbr allocates, then sent out of the uplink the kernel's own routing picks. From then on the
//! flow is a NAT connection like a published port's, only opened from the other end: `nat`
//! translates its frames both ways and retires it.
//!
//! Only flows xbr sees begin are taken; everything else stays on the kernel path for its
//! whole life: a flow the kernel's conntrack holds (`KERNEL_FLOWS`), a new flow xbr cannot
//! take (TTL about to expire, no free port, no room), a destination the kernel delivers
//! locally or routes out of an interface xbr did not hook.

use aya_ebpf::{
    bindings::{BPF_FIB_LKUP_RET_NO_NEIGH, BPF_FIB_LKUP_RET_SUCCESS, BPF_NOEXIST, bpf_fib_lookup},
    helpers::{bpf_fib_lookup as fib_lookup, bpf_get_prandom_u32},
    programs::TcContext,
};
use bridge_common::{Flow, FlowKey, NatEvent, PublishedKey, Verdict};

use crate::{
    maps::{
        EGRESS, EGRESS_UPLINKS, FIB_SCRATCH, FLOW_SCRATCH, FLOWS, KERNEL_FLOWS, PORTS, PUBLISHED,
        TRANSIENT,
    },
    nat::{
        self, IP_SRC, L4_SRC_PORT, Nat, Segment, count, opens_connection, transient_put,
        transient_remove, translate,
    },
};

/// `AF_INET`, the FIB lookup's family.
const AF_INET: u8 = 2;
/// How many random ports a new flow tries before it is left to the kernel path.
const PORT_TRIES: u32 = 8;

/// A frame a container sent on bridge port `port` that is no NATed connection's: the first
/// frame of a new outbound flow, if egress takes it.
#[inline(always)]
pub fn open(ctx: &TcContext, segment: &Segment, port: u32) -> Nat {
    let Some(config) = EGRESS.get(0) else {
        return Nat::NotOurs;
    };
    let key = &segment.key;
    let mask = u32::from_ne_bytes(config.subnet_mask);
    let subnet = u32::from_ne_bytes(config.subnet);
    let outbound = config.enabled != 0
        && u32::from_ne_bytes(key.src_ip) & mask == subnet
        && u32::from_ne_bytes(key.dst_ip) & mask != subnet;
    if !outbound || !opens_connection(segment) {
        return Nat::NotOurs;
    }
    // Only the container learned on this port: replies are delivered to its MAC.
    // SAFETY: a map value, only read, during the run (see `nat`'s "Map access").
    match unsafe { PORTS.get(&port) } {
        Some(record) if record.endpoint_mac == segment.eth_src => {}
        _ => return Nat::NotOurs,
    }
    // SAFETY: as above.
    if unsafe { KERNEL_FLOWS.get(key) }.is_some() {
        return kernel_path();
    }
    // The kernel answers an expiring TTL with ICMP; the flow then lives in its conntrack.
    if segment.ttl <= 1 {
        return leave_to_kernel(key);
    }
    let mut uplink = Route::default();
    if !route(ctx, segment, config.bridge_ifindex, &mut uplink) {
        return Nat::NotOurs;
    }
    match create(segment, port, &uplink, config.port_min, config.port_max) {
        Created::Yes => {}
        Created::NoPort => {
            count(NatEvent::EgressPortsExhausted);
            return leave_to_kernel(key);
        }
        Created::NoRoom => return leave_to_kernel(key),
    }
    // SAFETY: as above.
    match unsafe { TRANSIENT.get(key) } {
        Some(flow) => translate(ctx, segment, flow, IP_SRC, L4_SRC_PORT),
        None => leave_to_kernel(key),
    }
}

/// The frame goes to the kernel path, and its flow with it: every later frame too.
#[inline(always)]
fn leave_to_kernel(key: &FlowKey) -> Nat {
    let _ = KERNEL_FLOWS.insert(key, &1, BPF_NOEXIST as u64);
    kernel_path()
}

#[inline(always)]
fn kernel_path() -> Nat {
    Nat::Pass(Verdict::EgressKernel)
}

/// Where the kernel would send the flow: an uplink xbr hooked, its address, and the MACs.
#[derive(Default)]
struct Route {
    uplink: u32,
    address: [u8; 4],
    eth_src: [u8; 6],
    eth_dst: [u8; 6],
    /// The next hop's neighbour entry was missing: bpf_redirect_neigh resolves it.
    resolve_neigh: bool,
}

/// The kernel's FIB lookup for the frame, as if it arrived on the bridge to be forwarded
/// (the kernel path routes it from there), into `found`. False: not forwarded out of an
/// uplink egress may use (a local destination, no route, forwarding off, an interface xbr
/// did not hook).
///
/// (A BPF function returns one register: the route comes back through `found`.)
#[inline(never)]
fn route(ctx: &TcContext, segment: &Segment, bridge: u32, found: &mut Route) -> bool {
    const _: () = assert!(core::mem::size_of::<bpf_fib_lookup>() == 64);
    let Some(params) = FIB_SCRATCH.get_ptr_mut(0) else {
        return false;
    };
    let params = params.cast::<bpf_fib_lookup>();
    // SAFETY: a per-CPU array value of the struct's size and alignment (8), valid for the
    // whole program run and used by nothing else meanwhile (no other program runs on this
    // CPU).
    let params: &mut bpf_fib_lookup = unsafe { &mut *params };
    let key = &segment.key;
    params.family = AF_INET;
    params.l4_protocol = key.proto;
    params.sport = u16::from_ne_bytes(key.src_port);
    params.dport = u16::from_ne_bytes(key.dst_port);
    // Zero: the kernel checks the frame's own length against the MTU (GSO-aware).
    params.__bindgen_anon_1.tot_len = 0;
    params.ifindex = bridge;
    params.__bindgen_anon_2.tos = 0;
    params.__bindgen_anon_3.ipv4_src = u32::from_ne_bytes(key.src_ip);
    params.__bindgen_anon_4.ipv4_dst = u32::from_ne_bytes(key.dst_ip);
    params.__bindgen_anon_5.tbid = 0;
    params.smac = [0; 6];
    params.dmac = [0; 6];
    // SAFETY: the helper reads and writes `params`, a valid bpf_fib_lookup of the size given.
    let result = unsafe {
        fib_lookup(
            ctx.skb.skb as *mut _,
            params,
            core::mem::size_of::<bpf_fib_lookup>() as i32,
            0,
        )
    } as u32;
    let resolve_neigh = match result {
        BPF_FIB_LKUP_RET_SUCCESS => false,
        BPF_FIB_LKUP_RET_NO_NEIGH => true,
        _ => return false,
    };
    let uplink = params.ifindex;
    // SAFETY: a map value, only read, during the run.
    let Some(address) = (unsafe { EGRESS_UPLINKS.get(&uplink) }) else {
        return false;
    };
    found.uplink = uplink;
    found.address = *address;
    found.eth_src = params.smac;
    found.eth_dst = params.dmac;
    found.resolve_neigh = resolve_neigh;
    true
}

enum Created {
    Yes,
    /// Every port tried is taken for this destination.
    NoPort,
    NoRoom,
}

/// Creates both directions of a new outbound flow in the transient table, with a source port
/// of `port_min..=port_max` that no other flow to the same destination holds.
#[inline(never)]
fn create(segment: &Segment, port: u32, route: &Route, port_min: u16, port_max: u16) -> Created {
    let key = &segment.key;
    let Some(scratch) = FLOW_SCRATCH.get_ptr_mut(0) else {
        return Created::NoRoom;
    };
    // SAFETY: a per-CPU array value, valid for the whole program run and used by nothing
    // else meanwhile (no other program runs on this CPU).
    let flow = unsafe { &mut *scratch };
    // The reply direction's key: from the destination to the uplink's address and port.
    let mut reply_key = FlowKey {
        proto: key.proto,
        _pad: [0; 3],
        src_ip: key.dst_ip,
        dst_ip: route.address,
        src_port: key.dst_port,
        dst_port: [0; 2],
    };
    let span = u32::from(port_max.saturating_sub(port_min)) + 1;
    let mut free = None;
    for _ in 0..PORT_TRIES {
        // SAFETY: a BPF helper without arguments.
        let candidate = port_min as u32 + unsafe { bpf_get_prandom_u32() } % span;
        reply_key.dst_port = (candidate as u16).to_be_bytes();
        free = port_is_free(&reply_key);
        if free.is_some() {
            break;
        }
    }
    let Some(reply_existed) = free else {
        return Created::NoPort;
    };
    let now = nat::now();
    // The reply direction: into the container, from the MAC it sent to (its gateway's).
    flow.new_ip = key.src_ip;
    flow.new_port = key.src_port;
    flow.flags = Flow::INBOUND | Flow::EGRESS;
    flow.ifindex = port;
    flow.eth_src = segment.eth_dst;
    flow.eth_dst = segment.eth_src;
    flow.last_seen_ns = now;
    flow.peer = *key;
    flow.opened_ns = now;
    flow.handshake_ack = [0; 4];
    flow._pad = [0; 4];
    if !transient_put(&reply_key, flow, reply_existed) {
        return Created::NoRoom;
    }
    // The container's direction: out of the uplink, from its address and the port found.
    flow.new_ip = route.address;
    flow.new_port = reply_key.dst_port;
    flow.flags = Flow::OUTBOUND
        | Flow::EGRESS
        | if route.resolve_neigh {
            Flow::RESOLVE_NEIGH
        } else {
            0
        };
    flow.ifindex = route.uplink;
    flow.eth_src = route.eth_src;
    flow.eth_dst = route.eth_dst;
    flow.peer = reply_key;
    // A dead entry of an earlier flow on the same tuple is replaced.
    // SAFETY: a map value, only read, during the run.
    let existed = unsafe { TRANSIENT.get(key) }.is_some();
    if !transient_put(key, flow, existed) {
        transient_remove(&reply_key);
        return Created::NoRoom;
    }
    count(NatEvent::Opened);
    count(NatEvent::EgressOpened);
    Created::Yes
}

/// Whether no flow, of xbr's or the kernel's, and no published port holds the uplink's
/// address and port that `reply_key` is addressed to, for that destination: `None` when one
/// does, else whether a dead transient entry is there (which the new flow replaces).
#[inline(always)]
fn port_is_free(reply_key: &FlowKey) -> Option<bool> {
    // SAFETY (each lookup): a map value, only read, during the run.
    if unsafe { FLOWS.get(reply_key) }.is_some() || unsafe { KERNEL_FLOWS.get(reply_key) }.is_some()
    {
        return None;
    }
    // A transient entry holds it while alive; a dead one is replaced.
    // SAFETY: as above.
    let dead_entry = match unsafe { TRANSIENT.get(reply_key) } {
        Some(flow) if nat::alive(flow, reply_key.proto, nat::now()) => return None,
        Some(_) => true,
        None => false,
    };
    let published = PublishedKey {
        proto: reply_key.proto,
        _pad: 0,
        host_port: reply_key.dst_port,
        host_ip: reply_key.dst_ip,
    };
    let any = PublishedKey {
        host_ip: [0; 4],
        ..published
    };
    // SAFETY: as above.
    let published = unsafe { PUBLISHED.get(&published).is_some() || PUBLISHED.get(&any).is_some() };
    (!published).then_some(dead_entry)
}
