//! The maps of one attached bridge. Every bridge gets its own instance of the programs and
//! maps, so ports of different bridges can never reach each other through xbr.

use aya_ebpf::{
    bindings::BPF_F_NO_PREALLOC,
    btf_maps::{self, ArrayOfMaps, SkStorage},
    macros::{btf_map, map},
    maps::{Array, HashMap, LpmTrie, PerCpuArray, PerCpuHashMap},
};
use bridge_common::{
    BridgeRecord, ClientHoldKey, ClientPrefix, EgressConfig, Endpoint, EndpointKey, Flow, FlowKey,
    HoldKey, MAX_CLIENT_HOLDS, MAX_ENDPOINTS, MAX_HOLDS, MAX_KERNEL_FLOWS, MAX_LOCAL_ADDRESSES,
    MAX_PORTS, MAX_PUBLISHED, MAX_UPLINKS, NatEvent, PortRecord, PortStats, PublishedKey,
    PublishedPort, SocketConfig, SocketCounts, SocketDials, Verdict,
};

/// Hash maps are allocated entry by entry as the control plane fills them (not all at
/// creation): an attachment's memory follows its ports, endpoints and rules.
const NO_PREALLOC: u32 = BPF_F_NO_PREALLOC;

/// Destination MAC -> the bridge port it lives behind. Filled by the control plane.
#[map]
pub static ENDPOINTS: HashMap<EndpointKey, Endpoint> =
    HashMap::with_max_entries(MAX_ENDPOINTS, NO_PREALLOC);

/// Per-port counters, keyed by host-side ifindex; the control plane creates an entry per port.
#[map]
pub static PORT_STATS: PerCpuHashMap<u32, PortStats> =
    PerCpuHashMap::with_max_entries(MAX_PORTS, NO_PREALLOC);

/// How many frames got each `Verdict`.
#[map]
pub static VERDICTS: PerCpuArray<u64> = PerCpuArray::with_max_entries(Verdict::COUNT, 0);

/// Control-plane bookkeeping kept beside the pins; the datapath never reads it.
#[map]
pub static BRIDGE: Array<BridgeRecord> = Array::with_max_entries(1, 0);

/// Every port xbr hooked, with the endpoint MAC it holds: the datapath checks a redirect
/// target here. Written by the control plane.
#[map]
pub static PORTS: HashMap<u32, PortRecord> = HashMap::with_max_entries(MAX_PORTS, NO_PREALLOC);

/// Published ports: what a client connects to -> the container that serves it.
#[map]
pub static PUBLISHED: HashMap<PublishedKey, PublishedPort> =
    HashMap::with_max_entries(MAX_PUBLISHED, NO_PREALLOC);

/// Established NATed connections, one entry per direction. A plain hash (not LRU): nothing
/// may evict a live connection; only a connection whose handshake completed gets in, so a
/// flood of spoofed SYNs cannot fill it. Not preallocated: it costs what is connected.
pub type FlowTable = btf_maps::HashMap<FlowKey, Flow, 1, { BPF_F_NO_PREALLOC as usize }>;

/// NATed connections that are not established (opened, handshake not complete; or closing),
/// one entry per direction. An LRU: when it is full, a new connection replaces the least
/// recently used entries, so a flood costs unanswered SYNs their state and nothing else.
/// The kernel preallocates every LRU entry.
pub type TransientTable = btf_maps::LruHashMap<FlowKey, Flow, 1>;

/// The two connection tables live behind one-slot arrays of maps: the control plane creates
/// them (sized by `--max-flows`) when the bridge's first port is published and removes them
/// with its last, so a bridge with nothing published locks no memory for NAT. An empty slot
/// reads as an empty table.
#[btf_map]
pub static NAT_FLOWS: ArrayOfMaps<FlowTable, 1> = ArrayOfMaps::new();
#[btf_map]
pub static NAT_TRANSIENT: ArrayOfMaps<TransientTable, 1> = ArrayOfMaps::new();

/// Prototypes of the two tables, never used by the programs: the control plane makes each
/// connection table by loading this object again with the prototype's size, so that the
/// table carries the same BTF as the slot's template (kernels 5.15 to 6.1 accept a map into
/// a slot only if what its BTF says about the value matches, not only its sizes).
#[btf_map]
pub static FLOW_TABLE: FlowTable = FlowTable::new();
#[btf_map]
pub static TRANSIENT_TABLE: TransientTable = TransientTable::new();

/// A connection table through its slot, with the operations of a map (an empty slot: no
/// entry is found, nothing can be written).
pub struct Table<M: 'static>(&'static ArrayOfMaps<M, 1>);

pub static FLOWS: Table<FlowTable> = Table(&NAT_FLOWS);
pub static TRANSIENT: Table<TransientTable> = Table(&NAT_TRANSIENT);

/// `-ENOENT`, what writing into an absent table returns.
const NO_TABLE: i32 = -2;

macro_rules! table_operations {
    ($map:ty) => {
        impl Table<$map> {
            /// # Safety
            /// As `HashMap::get`: the entry may change or go while the reference lives.
            #[inline(always)]
            pub unsafe fn get(&self, key: &FlowKey) -> Option<&Flow> {
                // SAFETY: the caller accepts the map's aliasing rules.
                unsafe { self.0.get(0)?.get(key) }
            }

            #[inline(always)]
            pub fn get_ptr_mut(&self, key: &FlowKey) -> Option<*mut Flow> {
                self.0.get(0)?.get_ptr_mut(key)
            }

            #[inline(always)]
            pub fn insert(&self, key: &FlowKey, flow: &Flow, flags: u64) -> Result<(), i32> {
                match self.0.get(0) {
                    Some(table) => table.insert(key, flow, flags),
                    None => Err(NO_TABLE),
                }
            }

            #[inline(always)]
            pub fn remove(&self, key: &FlowKey) -> Result<(), i32> {
                match self.0.get(0) {
                    Some(table) => table.remove(key),
                    None => Err(NO_TABLE),
                }
            }
        }
    };
}
table_operations!(FlowTable);
table_operations!(TransientTable);

/// Where a new connection's entries are put together before they go into `NAT_TRANSIENT`:
/// a program has 512 bytes of stack, and the NAT decisions need most of them.
#[map]
pub static FLOW_SCRATCH: PerCpuArray<Flow> = PerCpuArray::with_max_entries(1, 0);

/// How many connections had each `NatEvent`.
#[map]
pub static NAT_EVENTS: PerCpuArray<u64> = PerCpuArray::with_max_entries(NatEvent::COUNT, 0);

/// Egress NAT: whether the containers' new outbound flows are translated, and how. Written
/// by the control plane (all zero: the kernel path's).
#[map]
pub static EGRESS: Array<EgressConfig> = Array::with_max_entries(1, 0);

/// Uplinks that egress may leave by -> the IPv4 address flows are translated to. Only
/// uplinks xbr hooked: the replies must meet `uplink_ingress`. Written by the control plane.
#[map]
pub static EGRESS_UPLINKS: HashMap<u32, [u8; 4]> =
    HashMap::with_max_entries(MAX_UPLINKS, NO_PREALLOC);

/// Tuples the kernel path owns, which egress must leave alone: flows the kernel's conntrack
/// holds (a container's side, written by the control plane from conntrack, and by the
/// datapath for a new flow it left to the kernel) and the uplink side of the kernel's own
/// translations into xbr's port range (no port is allocated where one is found).
#[map]
pub static KERNEL_FLOWS: HashMap<FlowKey, u8> =
    HashMap::with_max_entries(MAX_KERNEL_FLOWS, NO_PREALLOC);

/// Scratch space for the FIB lookup of a new outbound flow (per CPU, off the stack): a
/// `struct bpf_fib_lookup`, held as plain words (the loader's BTF for the map need not
/// describe the kernel's unions).
#[map]
pub static FIB_SCRATCH: PerCpuArray<[u64; 8]> = PerCpuArray::with_max_entries(1, 0);

/// Every uplink xbr hooked (control-plane bookkeeping; the datapath never reads it).
#[map]
pub static UPLINKS: HashMap<u32, PortRecord> = HashMap::with_max_entries(MAX_UPLINKS, NO_PREALLOC);

/// East-west frames a netfilter rule could touch on the kernel path: they take the bridge.
/// Written by the control plane from the policy reader's hold-backs.
#[map]
pub static HOLDS: HashMap<HoldKey, u8> = HashMap::with_max_entries(MAX_HOLDS, NO_PREALLOC);

/// Per family (0: IPv4, 1: IPv6), a bit for each `HoldKey` shape that `HOLDS` has entries
/// of; zero (no rule touches east-west traffic) costs the datapath nothing more.
#[map]
pub static HOLD_SHAPES: Array<u32> = Array::with_max_entries(2, 0);

/// Clients of published ports whose connections a netfilter rule could touch on the kernel
/// path; consulted only for entries with `PublishedPort::CLIENT_HOLDS`.
#[map]
pub static CLIENT_HOLDS: HashMap<ClientHoldKey, u8> =
    HashMap::with_max_entries(MAX_CLIENT_HOLDS, NO_PREALLOC);

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

/// What the socket programs know of the host: the bridge's network namespace. Written by the
/// control plane when it hooks the socket programs.
#[map]
pub static SOCKET_CONFIG: Array<SocketConfig> = Array::with_max_entries(1, 0);

/// The host's own IPv4 addresses (besides 127.0.0.0/8, which is always local): a port
/// published on every address serves a socket that dials any of them. Written by the control
/// plane from the bridge's namespace.
#[map]
pub static LOCAL_ADDRESSES: HashMap<[u8; 4], u8> =
    HashMap::with_max_entries(MAX_LOCAL_ADDRESSES, NO_PREALLOC);

/// Per published port (the control plane makes the entry with the port), what the socket
/// programs did with the host's connections to it.
#[map]
pub static SOCKET_COUNTS: PerCpuHashMap<PublishedKey, SocketCounts> =
    PerCpuHashMap::with_max_entries(MAX_PUBLISHED, NO_PREALLOC);

/// Per socket, the published ports it was sent to: how replies and `getpeername` show the
/// address it dialled. Socket storage lives and dies with its socket, so it costs what the
/// host's clients hold open and needs no expiry.
#[btf_map]
pub static SOCKET_DIALS: SkStorage<SocketDials> = SkStorage::new();
