//! The maps of one attached bridge. Every bridge gets its own instance of the programs and
//! maps, so ports of different bridges can never reach each other through xbr.

use aya_ebpf::{
    macros::map,
    maps::{Array, HashMap, LpmTrie, LruHashMap, PerCpuArray, PerCpuHashMap},
};
use bridge_common::{
    BridgeRecord, ClientHoldKey, ClientPrefix, Endpoint, EndpointKey, Flow, FlowKey, HoldKey,
    MAX_CLIENT_HOLDS, MAX_ENDPOINTS, MAX_FLOW_ENTRIES, MAX_HOLDS, MAX_PORTS, MAX_PUBLISHED,
    MAX_TRANSIENT_ENTRIES, MAX_UPLINKS, NatEvent, PortRecord, PortStats, PublishedKey,
    PublishedPort, Verdict,
};

/// Destination MAC -> the bridge port it lives behind. Filled by the control plane.
#[map]
pub static ENDPOINTS: HashMap<EndpointKey, Endpoint> = HashMap::with_max_entries(MAX_ENDPOINTS, 0);

/// Per-port counters, keyed by host-side ifindex; the control plane creates an entry per port.
#[map]
pub static PORT_STATS: PerCpuHashMap<u32, PortStats> =
    PerCpuHashMap::with_max_entries(MAX_PORTS, 0);

/// How many frames got each `Verdict`.
#[map]
pub static VERDICTS: PerCpuArray<u64> = PerCpuArray::with_max_entries(Verdict::COUNT, 0);

/// Control-plane bookkeeping kept beside the pins; the datapath never reads it.
#[map]
pub static BRIDGE: Array<BridgeRecord> = Array::with_max_entries(1, 0);

/// Every port xbr hooked, with the endpoint MAC it holds: the datapath checks a redirect
/// target here. Written by the control plane.
#[map]
pub static PORTS: HashMap<u32, PortRecord> = HashMap::with_max_entries(MAX_PORTS, 0);

/// Published ports: what a client connects to -> the container that serves it.
#[map]
pub static PUBLISHED: HashMap<PublishedKey, PublishedPort> =
    HashMap::with_max_entries(MAX_PUBLISHED, 0);

/// Established NATed connections, one entry per direction. A plain hash (not LRU): nothing
/// may evict a live connection; only a connection whose handshake completed gets in, so a
/// flood of spoofed SYNs cannot fill it.
#[map]
pub static NAT_FLOWS: HashMap<FlowKey, Flow> = HashMap::with_max_entries(MAX_FLOW_ENTRIES, 0);

/// NATed connections that are not established (opened, handshake not complete; or closing),
/// one entry per direction. An LRU: when it is full, a new connection replaces the least
/// recently used entries, so a flood costs unanswered SYNs their state and nothing else.
#[map]
pub static NAT_TRANSIENT: LruHashMap<FlowKey, Flow> =
    LruHashMap::with_max_entries(MAX_TRANSIENT_ENTRIES, 0);

/// Where a new connection's entries are put together before they go into `NAT_TRANSIENT`:
/// a program has 512 bytes of stack, and the NAT decisions need most of them.
#[map]
pub static FLOW_SCRATCH: PerCpuArray<Flow> = PerCpuArray::with_max_entries(1, 0);

/// How many connections had each `NatEvent`.
#[map]
pub static NAT_EVENTS: PerCpuArray<u64> = PerCpuArray::with_max_entries(NatEvent::COUNT, 0);

/// Every uplink xbr hooked (control-plane bookkeeping; the datapath never reads it).
#[map]
pub static UPLINKS: HashMap<u32, PortRecord> = HashMap::with_max_entries(MAX_UPLINKS, 0);

/// East-west frames a netfilter rule could touch on the kernel path: they take the bridge.
/// Written by the control plane from the policy reader's hold-backs.
#[map]
pub static HOLDS: HashMap<HoldKey, u8> = HashMap::with_max_entries(MAX_HOLDS, 0);

/// Per family (0: IPv4, 1: IPv6), a bit for each `HoldKey` shape that `HOLDS` has entries
/// of; zero (no rule touches east-west traffic) costs the datapath nothing more.
#[map]
pub static HOLD_SHAPES: Array<u32> = Array::with_max_entries(2, 0);

/// Clients of published ports whose connections a netfilter rule could touch on the kernel
/// path; consulted only for entries with `PublishedPort::CLIENT_HOLDS`.
#[map]
pub static CLIENT_HOLDS: HashMap<ClientHoldKey, u8> =
    HashMap::with_max_entries(MAX_CLIENT_HOLDS, 0);

/// ... and clients named by an address prefix (a rule's `ip saddr 10.0.0.0/8`).
#[map]
pub static CLIENT_PREFIX_HOLDS: LpmTrie<ClientPrefix, u8> =
    LpmTrie::with_max_entries(MAX_CLIENT_HOLDS, 0);

/// Scratch space for the policy lookup (per CPU, off the 512-byte stack): index 0 holds the
/// frame's key, index 1 the key of the shape being looked up.
#[map]
pub static HOLD_SCRATCH: PerCpuArray<HoldKey> = PerCpuArray::with_max_entries(2, 0);

/// Scratch space for looking up a published port's client holds (per CPU, off the stack).
#[repr(C)]
pub struct ClientProbe {
    pub hold: ClientHoldKey,
    pub prefix: aya_ebpf::maps::lpm_trie::Key<ClientPrefix>,
}

#[map]
pub static CLIENT_PROBE: PerCpuArray<ClientProbe> = PerCpuArray::with_max_entries(1, 0);
