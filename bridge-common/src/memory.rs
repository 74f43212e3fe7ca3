//! What an attachment's maps cost the kernel, computed from their definitions: the formulas
//! of the kernel's own accounting (`map_mem_usage` of each map type, the `memlock` figure
//! `bpftool` and `xbr status` show), so the cost of any host (its CPUs, its containers, its
//! connections) can be told without having it. The struct sizes are those of Linux 6.18 on
//! x86-64; `xbr`'s tests check the result against the kernel's figures on the machine that
//! runs them.
//!
//! An attachment's maps, in short (`c` CPUs, `p` ports, N = `--max-flows`, `n` established
//! connections): 401 KiB + 864·c + p·(256 + 48·c) bytes, 80 KiB more with socket hooks,
//! and once a port is published 176·N + 272·n bytes more (the transient LRU is
//! preallocated; the rest follows use).

use core::mem::size_of;

use crate::{
    BridgeRecord, ClientHoldKey, ClientPrefix, EgressConfig, Endpoint, EndpointKey, Flow, FlowKey,
    HoldKey, MAX_CLIENT_HOLDS, MAX_ENDPOINTS, MAX_HOLDS, MAX_KERNEL_FLOWS, MAX_LOCAL_ADDRESSES,
    MAX_PORTS, MAX_PUBLISHED, MAX_UPLINKS, NatEvent, PortRecord, PortStats, PublishedKey,
    PublishedPort, SocketConfig, SocketCounts, SocketDials, Verdict,
};

/// The kernel's map types that xbr uses (named as `aya::maps::MapType`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Kind {
    Hash,
    PerCpuHash,
    LruHash,
    Array,
    PerCpuArray,
    ArrayOfMaps,
    RingBuf,
    LpmTrie,
    /// Per-socket storage: the map itself is small; each socket's value is charged to the
    /// socket (its memory follows the host's open sockets), not to the map.
    SkStorage,
}

/// What decides how many entries a map holds.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Entries {
    /// Ports (and their endpoints) of the bridge.
    Ports,
    Published,
    Uplinks,
    /// Two per established connection.
    Established,
    /// Preallocated or fixed: entries do not change the cost.
    Fixed,
    /// Netfilter hold-backs (none on a host whose rules leave the fast path alone).
    Holds,
    /// The host's own addresses (with socket hooks only).
    LocalAddresses,
    /// Egress NAT's state: the uplinks it may leave by, the kernel's flows it leaves alone;
    /// written only while egress is on (the model counts none).
    Egress,
}

/// One map as the object defines it (and the control plane creates the connection tables).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct MapDefinition {
    /// The kernel's name: the object's, cut to 15 bytes.
    pub name: &'static str,
    pub kind: Kind,
    pub key_size: u32,
    pub value_size: u32,
    /// `None`: set when the map is made (`AYA_LOGS` by the log level, the connection tables
    /// by `--max-flows`).
    pub max_entries: Option<u32>,
    pub preallocated: bool,
    pub entries: Entries,
}

const fn map(
    name: &'static str,
    kind: Kind,
    key_size: usize,
    value_size: usize,
    max_entries: u32,
    entries: Entries,
) -> MapDefinition {
    MapDefinition {
        name,
        kind,
        key_size: key_size as u32,
        value_size: value_size as u32,
        max_entries: Some(max_entries),
        // Hash maps are made with BPF_F_NO_PREALLOC; arrays are always allocated whole.
        preallocated: !matches!(
            kind,
            Kind::Hash | Kind::PerCpuHash | Kind::LpmTrie | Kind::SkStorage
        ),
        entries,
    }
}

/// The maps of one attachment (the object's, in `bridge-ebpf/src/maps.rs`).
#[rustfmt::skip]
pub const MAPS: [MapDefinition; 28] = [
    map("ENDPOINTS", Kind::Hash, size_of::<EndpointKey>(), size_of::<Endpoint>(), MAX_ENDPOINTS, Entries::Ports),
    map("PORT_STATS", Kind::PerCpuHash, 4, size_of::<PortStats>(), MAX_PORTS, Entries::Ports),
    map("VERDICTS", Kind::PerCpuArray, 4, 8, Verdict::COUNT, Entries::Fixed),
    map("BRIDGE", Kind::Array, 4, size_of::<BridgeRecord>(), 1, Entries::Fixed),
    map("PORTS", Kind::Hash, 4, size_of::<PortRecord>(), MAX_PORTS, Entries::Ports),
    map("PUBLISHED", Kind::Hash, size_of::<PublishedKey>(), size_of::<PublishedPort>(), MAX_PUBLISHED, Entries::Published),
    map("NAT_FLOWS", Kind::ArrayOfMaps, 4, 4, 1, Entries::Fixed),
    map("NAT_TRANSIENT", Kind::ArrayOfMaps, 4, 4, 1, Entries::Fixed),
    map("FLOW_SCRATCH", Kind::PerCpuArray, 4, size_of::<Flow>(), 1, Entries::Fixed),
    map("NAT_EVENTS", Kind::PerCpuArray, 4, 8, NatEvent::COUNT, Entries::Fixed),
    map("UPLINKS", Kind::Hash, 4, size_of::<PortRecord>(), MAX_UPLINKS, Entries::Uplinks),
    map("HOLDS", Kind::Hash, size_of::<HoldKey>(), 1, MAX_HOLDS, Entries::Holds),
    map("HOLD_SHAPES", Kind::Array, 4, 4, 2, Entries::Fixed),
    map("CLIENT_HOLDS", Kind::Hash, size_of::<ClientHoldKey>(), 1, MAX_CLIENT_HOLDS, Entries::Holds),
    map("CLIENT_PREFIX_H", Kind::LpmTrie, 4 + size_of::<ClientPrefix>(), 1, MAX_CLIENT_HOLDS, Entries::Holds),
    map("HOLD_SCRATCH", Kind::PerCpuArray, 4, size_of::<HoldKey>(), 2, Entries::Fixed),
    // `ClientProbe`: a client hold key and an LPM key (prefix length, then the prefix).
    map("CLIENT_PROBE", Kind::PerCpuArray, 4, size_of::<ClientHoldKey>() + 4 + size_of::<ClientPrefix>(), 1, Entries::Fixed),
    // The connection tables' prototypes (one entry each); the tables are made like them.
    map("FLOW_TABLE", Kind::Hash, size_of::<FlowKey>(), size_of::<Flow>(), 1, Entries::Fixed),
    map("TRANSIENT_TABLE", Kind::LruHash, size_of::<FlowKey>(), size_of::<Flow>(), 1, Entries::Fixed),
    // The socket hooks' maps.
    map("SOCKET_CONFIG", Kind::Array, 4, size_of::<SocketConfig>(), 1, Entries::Fixed),
    // These two hold one entry unless the attachment has socket hooks (`socket_hooks_entries`).
    MapDefinition { max_entries: None, ..map("LOCAL_ADDRESSES", Kind::Hash, 4, 1, 0, Entries::LocalAddresses) },
    MapDefinition { max_entries: None, ..map("SOCKET_COUNTS", Kind::PerCpuHash, size_of::<PublishedKey>(), size_of::<SocketCounts>(), 0, Entries::Published) },
    map("SOCKET_DIALS", Kind::SkStorage, 4, size_of::<SocketDials>(), 0, Entries::Fixed),
    // Egress NAT's maps.
    map("EGRESS", Kind::Array, 4, size_of::<EgressConfig>(), 1, Entries::Fixed),
    map("EGRESS_UPLINKS", Kind::Hash, 4, 4, MAX_UPLINKS, Entries::Egress),
    map("KERNEL_FLOWS", Kind::Hash, size_of::<FlowKey>(), 1, MAX_KERNEL_FLOWS, Entries::Egress),
    // A `struct bpf_fib_lookup`.
    map("FIB_SCRATCH", Kind::PerCpuArray, 4, 64, 1, Entries::Fixed),
    MapDefinition {
        name: "AYA_LOGS",
        kind: Kind::RingBuf,
        key_size: 0,
        value_size: 0,
        max_entries: None,
        preallocated: true,
        entries: Entries::Fixed,
    },
];

/// The connection tables, made with the first published port.
pub const NAT_TABLES: [MapDefinition; 2] = [
    MapDefinition {
        name: "nat_flows",
        kind: Kind::Hash,
        key_size: size_of::<FlowKey>() as u32,
        value_size: size_of::<Flow>() as u32,
        max_entries: None,
        preallocated: false,
        entries: Entries::Established,
    },
    MapDefinition {
        name: "nat_transient",
        kind: Kind::LruHash,
        key_size: size_of::<FlowKey>() as u32,
        value_size: size_of::<Flow>() as u32,
        max_entries: None,
        preallocated: true,
        entries: Entries::Fixed,
    },
];

/// Kernel struct sizes (Linux 6.18, x86-64) that the accounting adds.
const HTAB_HEADER: u64 = 832;
const HTAB_ELEMENT_HEADER: u64 = 48;
const HTAB_BUCKET: u64 = 16;
/// `sizeof(int) * HASHTAB_MAP_LOCK_COUNT` per CPU.
const HTAB_LOCKS_PER_CPU: u64 = 32;
/// The free-list node of an entry that was not preallocated.
const LLIST_NODE: u64 = 8;
const ARRAY_HEADER: u64 = 312;
const RINGBUF_HEADER: u64 = 304;
const RINGBUF_META_PAGES: u64 = 3;
const PAGE: u64 = 4096;
const LPM_NODE_HEADER: u64 = 40;
/// `struct bpf_local_storage_map`, and one of its buckets (one per possible CPU, rounded up
/// to a power of two, at least two).
const SK_STORAGE_HEADER: u64 = 448;
const SK_STORAGE_BUCKET: u64 = 16;

const fn round8(size: u32) -> u64 {
    (size as u64).div_ceil(8) * 8
}

/// What the kernel accounts for `map` with `max_entries`, holding `entries`, on `cpus` CPUs.
pub const fn map_bytes(map: &MapDefinition, max_entries: u32, entries: u64, cpus: u64) -> u64 {
    let max = max_entries as u64;
    let value = round8(map.value_size);
    match map.kind {
        Kind::Hash | Kind::PerCpuHash | Kind::LruHash => {
            let percpu = matches!(map.kind, Kind::PerCpuHash);
            let element =
                HTAB_ELEMENT_HEADER + round8(map.key_size) + if percpu { 8 } else { value };
            let mut bytes =
                HTAB_HEADER + HTAB_BUCKET * max.next_power_of_two() + HTAB_LOCKS_PER_CPU * cpus;
            if map.preallocated {
                // (A preallocated plain hash also keeps one spare entry per CPU; xbr has none.)
                bytes += element * max;
                if percpu {
                    bytes += value * cpus * max;
                }
            } else {
                bytes += (element + LLIST_NODE) * entries;
                if percpu {
                    bytes += (LLIST_NODE + 8 + value * cpus) * entries;
                }
            }
            bytes
        }
        Kind::Array => ARRAY_HEADER + value * max,
        Kind::ArrayOfMaps => ARRAY_HEADER + 8 * max,
        Kind::PerCpuArray => ARRAY_HEADER + 8 * max + value * cpus * max,
        Kind::RingBuf => {
            let pages = max / PAGE;
            RINGBUF_HEADER
                + (RINGBUF_META_PAGES + pages) * PAGE
                + (RINGBUF_META_PAGES + 2 * pages) * 8
        }
        Kind::LpmTrie => 2 * entries * (LPM_NODE_HEADER + map.key_size as u64 - 4 + value),
        Kind::SkStorage => {
            let buckets = if cpus.next_power_of_two() < 2 {
                2
            } else {
                cpus.next_power_of_two()
            };
            SK_STORAGE_HEADER + SK_STORAGE_BUCKET * buckets
        }
    }
}

/// An attachment's work: what its maps' cost follows.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Work {
    pub cpus: u64,
    pub ports: u64,
    pub uplinks: u64,
    pub published: u64,
    /// Established connections (two entries each); counted only with `max_flows`.
    pub connections: u64,
    /// `Some(--max-flows)` once a port is published: the connection tables exist.
    pub max_flows: Option<u32>,
    /// Whether the eBPF log ring is full size (`-vv` at attach).
    pub logging: bool,
    /// Whether the attachment has socket hooks.
    pub socket_hooks: bool,
    /// The host's own IPv4 addresses the socket hooks know (0 without socket hooks).
    pub local_addresses: u64,
}

/// The entries of the socket hooks' maps `LOCAL_ADDRESSES` and `SOCKET_COUNTS`: the host's
/// addresses and the published ports with socket hooks; one each without (never written).
pub const fn socket_hooks_entries(socket_hooks: bool) -> (u32, u32) {
    if socket_hooks {
        (MAX_LOCAL_ADDRESSES, MAX_PUBLISHED)
    } else {
        (1, 1)
    }
}

/// The log ring: 128 KiB with logging on, one page otherwise.
pub const fn log_ring_bytes(logging: bool) -> u32 {
    if logging { 1 << 17 } else { PAGE as u32 }
}

/// The connection tables' entries for `max_flows`: two per connection in `NAT_FLOWS`, as
/// many as `max_flows` (half as many connections) in `NAT_TRANSIENT`.
pub const fn flow_table_entries(max_flows: u32) -> (u32, u32) {
    (max_flows * 2, max_flows)
}

/// What the kernel accounts for all of an attachment's maps doing `work`.
pub fn attachment_bytes(work: &Work) -> u64 {
    let entries = |map: &MapDefinition| match map.entries {
        Entries::Ports => work.ports,
        Entries::Uplinks => work.uplinks,
        Entries::Established => 2 * work.connections,
        Entries::LocalAddresses => work.local_addresses,
        // Counters of published ports exist only with socket hooks.
        Entries::Published if map.name == "SOCKET_COUNTS" && !work.socket_hooks => 0,
        Entries::Published => work.published,
        Entries::Fixed | Entries::Holds | Entries::Egress => 0,
    };
    let (local_addresses, socket_counts) = socket_hooks_entries(work.socket_hooks);
    let made_with = |map: &MapDefinition| match map.name {
        "LOCAL_ADDRESSES" => local_addresses,
        "SOCKET_COUNTS" => socket_counts,
        _ => log_ring_bytes(work.logging),
    };
    let mut bytes: u64 = MAPS
        .iter()
        .map(|map| {
            let max = map.max_entries.unwrap_or_else(|| made_with(map));
            map_bytes(map, max, entries(map), work.cpus)
        })
        .sum();
    if let Some(max_flows) = work.max_flows {
        let (flows, transient) = flow_table_entries(max_flows);
        bytes += map_bytes(&NAT_TABLES[0], flows, entries(&NAT_TABLES[0]), work.cpus);
        bytes += map_bytes(&NAT_TABLES[1], transient, 0, work.cpus);
    }
    bytes
}
