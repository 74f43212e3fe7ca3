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
    bindings::{
        BPF_F_CURRENT_NETNS, BPF_FIB_LKUP_RET_NO_NEIGH, BPF_FIB_LKUP_RET_SUCCESS, BPF_NOEXIST,
        bpf_fib_lookup, bpf_sock_tuple, bpf_sock_tuple__bindgen_ty_1,
        bpf_sock_tuple__bindgen_ty_1__bindgen_ty_1,
    },
    helpers::{
        bpf_fib_lookup as fib_lookup, bpf_get_prandom_u32, bpf_sk_lookup_udp, bpf_sk_release,
        bpf_skc_lookup_tcp,
    },
    programs::TcContext,
};
use bridge_common::{Flow, FlowKey, IPPROTO_TCP, NatEvent, PublishedKey, Verdict};

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
/// How many random ports a new flow tries (after its own) before it is left to the kernel
/// path.
const PORT_TRIES: u32 = 8;
/// Below it, the well-known ports: a source port there is never kept (as the kernel's
/// MASQUERADE maps them elsewhere too) nor given.
const FIRST_PORT: u16 = 1024;

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
    // Only the container learned on this port, from its own address: replies are delivered
    // to its MAC, and the kernel path would route them to the address's owner.
    // SAFETY: a map value, only read, during the run (see `nat`'s "Map access").
    match unsafe { PORTS.get(&port) } {
        Some(record)
            if record.endpoint_mac == segment.eth_src && record.endpoint_ipv4 == key.src_ip => {}
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
    let ports = Ports {
        min: config.port_min,
        max: config.port_max,
        skip_min: config.skip_min,
        skip_max: config.skip_max,
    };
    match create(ctx, segment, port, &uplink, &ports) {
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

/// The source ports egress gives flows: `min..=max` without `skip_min..=skip_max`.
struct Ports {
    min: u16,
    max: u16,
    skip_min: u16,
    skip_max: u16,
}

impl Ports {
    /// The `n`th port of the range (any `n`: it wraps).
    #[inline(always)]
    fn nth(&self, n: u32) -> u16 {
        let span = u32::from(self.max.saturating_sub(self.min)) + 1;
        // A hole inside the range (the control plane never writes one that is not).
        let skipped = if self.skip_min >= self.min
            && self.skip_min <= self.skip_max
            && self.skip_max <= self.max
        {
            u32::from(self.skip_max - self.skip_min) + 1
        } else {
            0
        };
        let usable = span.saturating_sub(skipped).max(1);
        let mut port = u32::from(self.min) + n % usable;
        if skipped > 0 && port >= u32::from(self.skip_min) {
            port += skipped;
        }
        port as u16
    }
}

enum Created {
    Yes,
    /// Every port tried is taken for this destination.
    NoPort,
    NoRoom,
}

/// Creates both directions of a new outbound flow in the transient table, with a source port
/// of `ports` that nothing else holds for the same destination.
#[inline(never)]
fn create(ctx: &TcContext, segment: &Segment, port: u32, route: &Route, ports: &Ports) -> Created {
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
    // The container's own source port first, as the kernel's MASQUERADE keeps it: a
    // container that opens the same connection again (its port reused, the server's side
    // still in TIME_WAIT) then meets the server on the same tuple as before, with timestamps
    // that follow on. Another container's flow on that tuple would be refused by the server's
    // PAWS check.
    let mut free = None;
    for attempt in 0..=PORT_TRIES {
        reply_key.dst_port = if attempt == 0 {
            key.src_port
        } else {
            // SAFETY: a BPF helper without arguments.
            ports.nth(unsafe { bpf_get_prandom_u32() }).to_be_bytes()
        };
        if attempt == 0 && u16::from_be_bytes(key.src_port) < FIRST_PORT {
            continue;
        }
        free = port_is_free(&reply_key);
        if free.is_some() && !local_socket_takes(ctx, &reply_key) {
            break;
        }
        free = None;
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

/// Whether one of the host's own sockets would receive a frame with the tuple `reply_key` (a
/// connection from that port, a listener on it, one in TIME_WAIT): the port is the host's.
#[inline(always)]
fn local_socket_takes(ctx: &TcContext, reply_key: &FlowKey) -> bool {
    let mut tuple = bpf_sock_tuple {
        __bindgen_anon_1: bpf_sock_tuple__bindgen_ty_1 {
            ipv4: bpf_sock_tuple__bindgen_ty_1__bindgen_ty_1 {
                saddr: u32::from_ne_bytes(reply_key.src_ip),
                daddr: u32::from_ne_bytes(reply_key.dst_ip),
                sport: u16::from_ne_bytes(reply_key.src_port),
                dport: u16::from_ne_bytes(reply_key.dst_port),
            },
        },
    };
    let size = core::mem::size_of::<bpf_sock_tuple__bindgen_ty_1__bindgen_ty_1>() as u32;
    let skb = ctx.skb.skb as *mut _;
    // SAFETY: the helpers read `tuple` (its IPv4 part, of the size given) and return a
    // referenced socket or null; a socket found is released before returning.
    unsafe {
        let socket = if reply_key.proto == IPPROTO_TCP {
            bpf_skc_lookup_tcp(skb, &mut tuple, size, BPF_F_CURRENT_NETNS as u64, 0)
        } else {
            bpf_sk_lookup_udp(skb, &mut tuple, size, BPF_F_CURRENT_NETNS as u64, 0)
        };
        if socket.is_null() {
            return false;
        }
        bpf_sk_release(socket as *mut _);
    }
    true
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
