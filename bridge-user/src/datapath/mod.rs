//! Apply: bring a bridge's pinned datapath to what the plan wants. A first attach loads the
//! programs and pins them with empty maps; from then on every attach (and every event of a
//! follower) reconciles the pinned state: removals first, then additions, so that at every
//! moment each map entry points at a port that holds it. Also reads the pins back for
//! `status`, `stats` and `detach`.

use std::{
    collections::{BTreeMap, BTreeSet},
    os::unix::fs::MetadataExt as _,
    path::{Path, PathBuf},
};

use aya::{
    EbpfLoader,
    maps::{
        Array, ArrayOfMaps, HashMap, Map, MapData, PerCpuArray, PerCpuHashMap, PerCpuValues,
        lpm_trie::{Key, LpmTrie},
    },
    programs::{
        LinkOrder, SchedClassifier, TcAttachType, Xdp, XdpMode,
        links::FdLink,
        tc::{self, NlOptions, TcAttachOptions, TcError},
    },
    util::nr_cpus,
};
use bridge_common::{
    AttachMode, BridgeRecord, ClientHoldKey, ClientPrefix, Endpoint, EndpointKey, Flow, FlowKey,
    HoldKey, PortRecord, PortStats, PublishedKey, PublishedPort, UplinkMode, Verdict,
};
use netlink_packet_route::tc::{TcAttribute, TcHandle};

pub use bridge_common::memory::flow_table_entries;

use crate::{
    error::{Error, Result},
    features::Features,
    hooks::{self, Drift, Observed, Recorded},
    netlink,
    observe::UplinkView,
    pins,
    plan::{Plan, PlannedPort},
};

/// The compiled kernel programs, built by this crate's build script.
pub static OBJECT: &[u8] = aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/bridge-ebpf"));

#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum ModeChoice {
    /// tcx where the kernel has it (6.6+), clsact before.
    Auto,
    Tcx,
    Clsact,
}

impl ModeChoice {
    pub fn resolve(self, features: &Features) -> Result<AttachMode> {
        match self {
            ModeChoice::Auto if features.tcx => Ok(AttachMode::Tcx),
            ModeChoice::Auto | ModeChoice::Clsact => Ok(AttachMode::Clsact),
            ModeChoice::Tcx if features.tcx => Ok(AttachMode::Tcx),
            ModeChoice::Tcx => Err(Error::MissingFeature {
                feature: "tcx links",
                detail: format!(
                    "kernel {} is older than 6.6; use --mode clsact",
                    features.kernel
                ),
            }),
        }
    }
}

/// How to hook the uplinks (`--uplink-mode`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum UplinkModeChoice {
    /// tc: right for every uplink. XDP cannot tell a frame with a partial (offloaded) L4
    /// checksum from a full one, and its redirect into a container's veth is dropped unless
    /// the container's end has NAPI (GRO on, or an XDP program) - neither can be probed from
    /// here, so xdp is never chosen automatically. A bridge attached already keeps its mode.
    Auto,
    /// The tc program alone.
    Tc,
    /// An XDP program in front of the tc program (native where the driver has it, else
    /// generic): published-port connections are delivered from XDP, the rest goes on to tc.
    /// Only for uplinks whose frames carry full checksums (physical NICs), and containers
    /// whose eth0 has GRO on (`ethtool -K eth0 gro on`, kernel 5.13+) or an XDP program.
    Xdp,
}

impl UplinkModeChoice {
    pub fn resolve(self, features: &Features) -> Result<UplinkMode> {
        match self {
            UplinkModeChoice::Auto | UplinkModeChoice::Tc => Ok(UplinkMode::Tc),
            UplinkModeChoice::Xdp if features.xdp => Ok(UplinkMode::Xdp),
            UplinkModeChoice::Xdp => Err(Error::MissingFeature {
                feature: "XDP programs (BPF_PROG_TYPE_XDP) with bpf links",
                detail: format!(
                    "kernel {} refused a test program or is older than 5.9; use --uplink-mode tc",
                    features.kernel
                ),
            }),
        }
    }
}

pub fn uplink_mode_name(mode: u32) -> &'static str {
    match mode {
        m if m == UplinkMode::Xdp as u32 => "xdp",
        _ => "tc",
    }
}

/// How `uplink_xdp` is attached to an uplink, from its record's flags.
pub fn xdp_attach_name(flags: u32) -> Option<&'static str> {
    if flags & PortRecord::XDP_NATIVE != 0 {
        Some("native")
    } else if flags & PortRecord::XDP_GENERIC != 0 {
        Some("generic")
    } else {
        None
    }
}

pub fn mode_name(mode: u32) -> &'static str {
    match mode {
        m if m == AttachMode::Tcx as u32 => "tcx",
        m if m == AttachMode::Clsact as u32 => "clsact",
        _ => "unknown",
    }
}

/// What `apply_published_policy` did.
#[derive(Debug, Default)]
pub struct PublishedApplied {
    /// Connections ended because the policy now holds them back.
    pub connections_ended: usize,
    /// What the policy says about each published port.
    pub policies: BTreeMap<PublishedKey, crate::plan::PublishedPolicy>,
}

/// What one reconcile changed.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct Changes {
    pub ports_added: Vec<String>,
    pub ports_removed: Vec<u32>,
    pub endpoints_added: usize,
    pub endpoints_removed: usize,
    /// Ports that could not be hooked this time (they vanished meanwhile); a later reconcile
    /// picks them up if they come back.
    pub ports_skipped: Vec<String>,
    pub uplinks_added: Vec<String>,
    /// Published ports whose container (port, MAC) changed.
    pub published_updated: usize,
    /// East-west hold-backs added and removed.
    pub holds: (usize, usize),
    /// NATed connections ended because the policy now holds them back.
    pub connections_held: usize,
    /// Hooks (of ports and uplinks) found other than recorded, and put right: (name, what).
    pub repaired: Vec<(String, Drift)>,
    /// Link pins and counters of ports without a record, left by a writer that stopped
    /// half-way, removed.
    pub leftovers_removed: usize,
}

impl Changes {
    pub fn is_empty(&self) -> bool {
        *self == Changes::default()
    }
}

/// The result of `attach`.
#[derive(Debug)]
pub struct Attached {
    pub dir: PathBuf,
    pub mode: AttachMode,
    /// A `UplinkMode` value (as pinned).
    pub uplink_mode: u32,
    /// False when the bridge was attached already and this attach brought it up to date.
    pub created: bool,
    /// The pins were an interrupted attach or detach, removed before attaching afresh.
    pub replaced_incomplete: bool,
    pub ports: usize,
    pub endpoints: usize,
    pub changes: Changes,
}

/// Attaches `plan`'s bridge (and hooks `uplinks` for its published ports): creates the pinned
/// datapath, or picks up the one already pinned and reconciles it. A failed first attach
/// removes everything it made. `max_flows`: established connections the new datapath's table
/// holds (`default_max_flows()` when None); an attached bridge keeps its size.
pub fn attach(
    plan: &Plan,
    uplinks: &[UplinkView],
    mode: ModeChoice,
    uplink_mode: UplinkModeChoice,
    max_flows: Option<u32>,
    features: &Features,
    root: &Path,
) -> Result<Attached> {
    match Pinned::open(root, &plan.bridge) {
        Ok(pinned) => {
            return reattach(
                pinned,
                plan,
                uplinks,
                mode,
                uplink_mode,
                max_flows,
                features,
            );
        }
        Err(Error::NotAttached { .. } | Error::Incomplete { .. }) => {}
        Err(error) => return Err(error),
    }
    // Nothing, or what an attach or detach stopped half-way left: start afresh. (The caller's
    // writer lock may have made the directory already.)
    let dir = pins::bridge_dir(root, &plan.bridge)?;
    let replaced_incomplete = holds_pins(&dir);
    if dir.exists() {
        pins::clear(&dir)?;
    }
    let mode = mode.resolve(features)?;
    let uplink_mode = uplink_mode.resolve(features)?;
    let max_flows = max_flows.unwrap_or_else(default_max_flows);
    let mut pinned = match Pinned::create(plan, mode, uplink_mode, max_flows, features, root) {
        Ok(pinned) => pinned,
        Err(error) => {
            let _ = pins::remove(&dir, root);
            return Err(error);
        }
    };
    // Uplinks first: their records say which to hook, so an attach stopped while hooking
    // ports leaves the next one only ports to finish.
    let attached = pinned
        .hook_uplinks(plan, uplinks)
        .and_then(|uplinks_added| {
            let mut changes = pinned.reconcile(plan, true)?;
            changes.uplinks_added = uplinks_added;
            Ok(changes)
        });
    match attached {
        Ok(changes) => {
            let mut attached = pinned.attached(plan, true, changes);
            attached.replaced_incomplete = replaced_incomplete;
            Ok(attached)
        }
        Err(error) => {
            let _ = pinned.detach();
            Err(error)
        }
    }
}

/// An attach of an attached bridge: same modes, brought up to date.
fn reattach(
    mut pinned: Pinned,
    plan: &Plan,
    uplinks: &[UplinkView],
    mode: ModeChoice,
    uplink_mode: UplinkModeChoice,
    max_flows: Option<u32>,
    features: &Features,
) -> Result<Attached> {
    if let Some(wanted) = max_flows
        && wanted as usize != pinned.capacity.established
    {
        return Err(Error::FlowTableSize {
            bridge: plan.bridge.clone(),
            attached: pinned.capacity.established,
            wanted,
        });
    }
    if mode != ModeChoice::Auto && pinned.mode() != mode.resolve(features)? {
        return Err(Error::ModeMismatch {
            bridge: plan.bridge.clone(),
            attached: mode_name(pinned.record.attach_mode),
            wanted: mode_name(mode.resolve(features)? as u32),
        });
    }
    let pinned_uplink_mode = uplink_mode_name(pinned.record.uplink_mode);
    if uplink_mode != UplinkModeChoice::Auto
        && pinned_uplink_mode != uplink_mode_name(uplink_mode.resolve(features)? as u32)
    {
        return Err(Error::ModeMismatch {
            bridge: plan.bridge.clone(),
            attached: if pinned_uplink_mode == "xdp" {
                "uplink xdp"
            } else {
                "uplink tc"
            },
            wanted: if pinned_uplink_mode == "xdp" {
                "uplink tc"
            } else {
                "uplink xdp"
            },
        });
    }
    let mut changes = pinned.reconcile(plan, false)?;
    changes.uplinks_added = pinned.hook_uplinks(plan, uplinks)?;
    // Without a follower, an attach is when closed connections get retired.
    pinned.expire_flows(&crate::publish::Timeouts::default());
    Ok(pinned.attached(plan, false, changes))
}

/// Whether `dir` holds any pin (its follower's lock directory aside).
fn holds_pins(dir: &Path) -> bool {
    let follower = pins::follower_dir(dir);
    std::fs::read_dir(dir).is_ok_and(|entries| {
        entries
            .filter_map(|e| e.ok())
            .any(|entry| entry.path() != follower)
    })
}

/// Which of xbr's two tc programs, and the map that records where it is hooked.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Role {
    /// `port_ingress` on a bridge port; records in PORTS.
    Port,
    /// `uplink_ingress` (and in uplink xdp mode `uplink_xdp`) on an uplink; records in UPLINKS.
    Uplink,
}

/// A pinned attachment, opened: the program and the maps of one bridge.
pub struct Pinned {
    pub bridge: String,
    pub dir: PathBuf,
    /// The identity (device, inode) of the bridge record's pin when opened: a detach removes
    /// it, and a new attach (even into the same directory) pins another.
    record_pin_id: (u64, u64),
    root: PathBuf,
    pub record: BridgeRecord,
    /// The kernel's ids of the pinned programs: how their hooks are recognised.
    port_program_id: u32,
    uplink_program_id: u32,
    uplink_xdp_id: Option<u32>,
    program: SchedClassifier,
    uplink_program: SchedClassifier,
    /// In uplink xdp mode: the XDP program in front of `uplink_program`.
    uplink_xdp: Option<Xdp>,
    endpoints: HashMap<MapData, EndpointKey, Endpoint>,
    ports: HashMap<MapData, u32, PortRecord>,
    stats: PerCpuHashMap<MapData, u32, PortStats>,
    verdicts: PerCpuArray<MapData, u64>,
    pub(crate) published: HashMap<MapData, PublishedKey, PublishedPort>,
    /// The slots of the connection tables (see `NatTables`).
    nat_flows_slot: ArrayOfMaps<MapData, MapData>,
    nat_transient_slot: ArrayOfMaps<MapData, MapData>,
    pub(crate) nat_events: PerCpuArray<MapData, u64>,
    /// The connection tables' sizes, from the bridge record.
    pub(crate) capacity: crate::publish::Capacity,
    uplinks: HashMap<MapData, u32, PortRecord>,
    holds: HashMap<MapData, HoldKey, u8>,
    hold_shapes: Array<MapData, u32>,
    client_holds: HashMap<MapData, ClientHoldKey, u8>,
    client_prefix_holds: LpmTrie<MapData, ClientPrefix, u8>,
}

fn open_pinned<T>(dir: &Path, object_name: &str) -> Result<T>
where
    T: TryFrom<Map, Error = aya::maps::MapError>,
{
    let path = pins::map_pin(dir, object_name);
    let data = MapData::from_pin(&path)
        .map_err(|e| Error::ebpf(format!("opening pinned map {}", path.display()), e))?;
    let map = Map::from_map_data(data)
        .map_err(|e| Error::ebpf(format!("opening {}", path.display()), e))?;
    T::try_from(map).map_err(|e| Error::ebpf(format!("opening {}", path.display()), e))
}

/// A connection table as user space sees it (`NAT_FLOWS` is a hash, `NAT_TRANSIENT` an LRU
/// hash: the same operations).
pub type FlowTable = HashMap<MapData, FlowKey, Flow>;

/// The NAT connection tables of an attachment that has them: made when its first port is
/// published, removed once nothing is published and no connection is left, so that a bridge
/// without published ports locks no memory for them. They live in one-slot arrays of maps
/// (pinned `nat_flows` and `nat_transient`), read afresh from the slot at every use: another
/// writer may have made or removed them since this one opened the pins.
pub(crate) struct NatTables {
    /// Established connections (a hash, not preallocated).
    pub flows: FlowTable,
    /// New and closing connections (an LRU, preallocated by the kernel).
    pub transient: FlowTable,
}

/// The two connection tables.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum FlowTableKind {
    /// `NAT_FLOWS`: a hash, not preallocated.
    Established,
    /// `NAT_TRANSIENT`: an LRU hash (the kernel preallocates every LRU).
    Transient,
}

/// Makes a connection table of `entries` entries, to be put in its slot.
pub fn new_flow_table(kind: FlowTableKind, entries: u32) -> Result<MapData> {
    const BPF_MAP_TYPE_HASH: u32 = 1;
    const BPF_MAP_TYPE_LRU_HASH: u32 = 9;
    const BPF_F_NO_PREALLOC: u32 = 1;
    let (map_type, flags, name) = match kind {
        FlowTableKind::Established => (BPF_MAP_TYPE_HASH, BPF_F_NO_PREALLOC, "nat_flows"),
        FlowTableKind::Transient => (BPF_MAP_TYPE_LRU_HASH, 0, "nat_transient"),
    };
    let definition = aya_obj::Map::new_from_params(
        map_type,
        std::mem::size_of::<FlowKey>() as u32,
        std::mem::size_of::<Flow>() as u32,
        entries,
        flags,
    );
    MapData::create(definition, name, None)
        .map_err(|e| Error::ebpf(format!("creating the connection table {name}"), e))
}

/// The established connections a new attachment holds when `--max-flows` is not given:
/// 65536, less on a host with under 15 GB of memory, so that the connection tables, full,
/// take at most 1/512 of it; never fewer than 4096. Full, a connection of capacity costs 448
/// bytes (`bridge_common::memory`): two entries of 136 bytes and their buckets in
/// `NAT_FLOWS`, one preallocated entry of 128 bytes and its bucket in `NAT_TRANSIENT`.
pub fn default_max_flows() -> u32 {
    // SAFETY: sysinfo fills the struct it is given.
    let memory = unsafe {
        let mut info: libc::sysinfo = std::mem::zeroed();
        if libc::sysinfo(&mut info) == 0 {
            info.totalram as u64 * u64::from(info.mem_unit)
        } else {
            u64::MAX
        }
    };
    let cpus = nr_cpus().map_or(1, |cpus| cpus as u64);
    let full_tables = |max_flows: u32| {
        let (flow_entries, transient_entries) = flow_table_entries(max_flows);
        let [flows, transient] = &bridge_common::memory::NAT_TABLES;
        bridge_common::memory::map_bytes(flows, flow_entries, u64::from(flow_entries), cpus)
            + bridge_common::memory::map_bytes(transient, transient_entries, 0, cpus)
    };
    // Powers of two, like the kernel's own table sizes.
    (12..=16)
        .map(|log| 1u32 << log)
        .take_while(|&max_flows| max_flows == 4096 || full_tables(max_flows) <= memory / 512)
        .last()
        .unwrap_or(4096)
}

/// The smallest and largest `--max-flows`.
pub const MIN_MAX_FLOWS: u32 = 16;
pub const MAX_MAX_FLOWS: u32 = 1 << 22;

/// The kernel's page size: the smallest ring buffer.
fn page_size() -> u32 {
    // SAFETY: sysconf only reads a system constant.
    let size = unsafe { libc::sysconf(libc::_SC_PAGESIZE) };
    u32::try_from(size).unwrap_or(4096)
}

impl Pinned {
    /// The connection tables, when the attachment has them.
    pub(crate) fn nat_tables(&self) -> Option<NatTables> {
        let typed = |data: MapData| FlowTable::try_from(Map::from_map_data(data).ok()?).ok();
        let (flows, transient) = self.nat_table_data()?;
        Some(NatTables {
            flows: typed(flows)?,
            transient: typed(transient)?,
        })
    }

    /// The connection tables' maps, untyped (for their memory figures).
    fn nat_table_data(&self) -> Option<(MapData, MapData)> {
        Some((
            self.nat_flows_slot.get(&0, 0).ok()?,
            self.nat_transient_slot.get(&0, 0).ok()?,
        ))
    }

    /// The memory the attachment locks: its programs, the maps they use, its other pinned
    /// maps, and the connection tables behind their slots.
    pub fn memory(&self) -> Result<crate::memory::Memory> {
        let as_error = |e| Error::ebpf("reading a pinned program's info", e);
        let mut programs = vec![
            self.program.info().map_err(as_error)?,
            self.uplink_program.info().map_err(as_error)?,
        ];
        if let Some(xdp) = &self.uplink_xdp {
            programs.push(xdp.info().map_err(as_error)?);
        }
        // Pinned maps the programs do not use (BRIDGE, UPLINKS) and the connection tables.
        let mut maps = Vec::new();
        for (object_name, _) in pins::MAPS {
            let pin = pins::map_pin(&self.dir, object_name);
            let info = aya::maps::MapInfo::from_pin(&pin)
                .map_err(|e| Error::ebpf(format!("reading pinned map {}", pin.display()), e))?;
            maps.push(info.id());
        }
        if let Some((flows, transient)) = self.nat_table_data() {
            for table in [flows, transient] {
                let info = table
                    .info()
                    .map_err(|e| Error::ebpf("reading a connection table's info", e))?;
                maps.push(info.id());
            }
        }
        crate::memory::of(&programs, &maps)
    }

    /// Makes the connection tables if the attachment has none: before a port is published,
    /// so that the datapath never finds a published port without them.
    pub(crate) fn ensure_nat_tables(&mut self) -> Result<()> {
        if self.nat_tables().is_some() {
            return Ok(());
        }
        let (flow_entries, transient_entries) = flow_table_entries(self.record.max_flows);
        let flows = new_flow_table(FlowTableKind::Established, flow_entries)?;
        let transient = new_flow_table(FlowTableKind::Transient, transient_entries)?;
        // Established first: the datapath opens connections only once the transient one is in.
        self.nat_flows_slot
            .set(0, &flows, 0)
            .map_err(|e| Error::ebpf("installing the established connection table", e))?;
        self.nat_transient_slot
            .set(0, &transient, 0)
            .map_err(|e| Error::ebpf("installing the transient connection table", e))?;
        Ok(())
    }

    /// Removes the connection tables once nothing is published and no connection is left in
    /// them (connections of a withdrawn port keep going until they end or expire). Returns
    /// whether it removed them.
    pub(crate) fn release_unused_nat_tables(&mut self) -> Result<bool> {
        let Some(tables) = self.nat_tables() else {
            return Ok(false);
        };
        let in_use = |table: &FlowTable| table.keys().next().is_some();
        if self.has_published() || in_use(&tables.flows) || in_use(&tables.transient) {
            return Ok(false);
        }
        // Transient first, the reverse of `ensure_nat_tables`.
        for object_name in ["NAT_TRANSIENT", "NAT_FLOWS"] {
            let pin = pins::map_pin(&self.dir, object_name);
            crate::bpf_link::clear_slot(&pin, 0).map_err(|e| {
                Error::io(
                    format!("removing the connection table in {}", pin.display()),
                    e,
                )
            })?;
        }
        Ok(true)
    }

    pub fn open(root: &Path, bridge: &str) -> Result<Pinned> {
        let dir = pins::bridge_dir(root, bridge)?;
        if !dir.exists() {
            return Err(Error::NotAttached {
                bridge: bridge.to_owned(),
                pins: dir,
            });
        }
        let Ok(record_pin) = std::fs::metadata(dir.join(pins::COMPLETE)) else {
            return Err(Error::Incomplete {
                bridge: bridge.to_owned(),
                pins: dir,
            });
        };
        let record_pin_id = (record_pin.dev(), record_pin.ino());
        let broken = |e: Error| Error::BrokenPins {
            bridge: bridge.to_owned(),
            pins: dir.clone(),
            detail: e.to_string(),
        };
        let record_map: Array<MapData, BridgeRecord> =
            open_pinned(&dir, "BRIDGE").map_err(broken)?;
        let record = record_map
            .get(&0, 0)
            .map_err(|e| broken(Error::ebpf("reading the bridge record", e)))?;
        let program = SchedClassifier::from_pin(dir.join(pins::PORT_PROGRAM))
            .map_err(|e| broken(Error::ebpf("opening the pinned port program", e)))?;
        let uplink_program = SchedClassifier::from_pin(dir.join(pins::UPLINK_PROGRAM))
            .map_err(|e| broken(Error::ebpf("opening the pinned uplink program", e)))?;
        let uplink_xdp = if record.uplink_mode == UplinkMode::Xdp as u32 {
            let xdp = Xdp::from_pin(
                dir.join(pins::UPLINK_XDP_PROGRAM),
                aya_obj::programs::XdpAttachType::Interface,
            )
            .map_err(|e| broken(Error::ebpf("opening the pinned uplink XDP program", e)))?;
            Some(xdp)
        } else {
            None
        };
        let id_of = |info: std::result::Result<aya::programs::ProgramInfo, _>| {
            info.map(|info| info.id())
                .map_err(|e| broken(Error::ebpf("reading a pinned program's id", e)))
        };
        Ok(Pinned {
            bridge: bridge.to_owned(),
            record_pin_id,
            root: root.to_owned(),
            record,
            port_program_id: id_of(program.info())?,
            uplink_program_id: id_of(uplink_program.info())?,
            uplink_xdp_id: uplink_xdp
                .as_ref()
                .map(|xdp| id_of(xdp.info()))
                .transpose()?,
            program,
            uplink_program,
            uplink_xdp,
            published: open_pinned(&dir, "PUBLISHED").map_err(broken)?,
            nat_flows_slot: open_pinned(&dir, "NAT_FLOWS").map_err(broken)?,
            nat_transient_slot: open_pinned(&dir, "NAT_TRANSIENT").map_err(broken)?,
            nat_events: open_pinned(&dir, "NAT_EVENTS").map_err(broken)?,
            capacity: crate::publish::Capacity::of(record.max_flows),
            uplinks: open_pinned(&dir, "UPLINKS").map_err(broken)?,
            holds: open_pinned(&dir, "HOLDS").map_err(broken)?,
            hold_shapes: open_pinned(&dir, "HOLD_SHAPES").map_err(broken)?,
            client_holds: open_pinned(&dir, "CLIENT_HOLDS").map_err(broken)?,
            client_prefix_holds: open_pinned(&dir, "CLIENT_PREFIX_HOLDS").map_err(broken)?,
            endpoints: open_pinned(&dir, "ENDPOINTS").map_err(broken)?,
            ports: open_pinned(&dir, "PORTS").map_err(broken)?,
            stats: open_pinned(&dir, "PORT_STATS").map_err(broken)?,
            verdicts: open_pinned(&dir, "VERDICTS").map_err(broken)?,
            dir,
        })
    }

    /// Loads the programs, pins them and their (empty) maps, and opens the result.
    fn create(
        plan: &Plan,
        mode: AttachMode,
        uplink_mode: UplinkMode,
        max_flows: u32,
        features: &Features,
        root: &Path,
    ) -> Result<Pinned> {
        pins::ensure_bpffs(root)?;
        let dir = pins::bridge_dir(root, &plan.bridge)?;
        // eBPF logging is decided at load time: off, the verifier prunes every log call.
        let log_level: u8 = if tracing::enabled!(target: "xbr::ebpf", tracing::Level::DEBUG) {
            aya_log::Level::Debug as u8
        } else {
            0
        };
        let redirect_peer = u8::from(features.redirect_peer);
        let mut loader = EbpfLoader::new();
        loader
            .override_global("REDIRECT_PEER", &redirect_peer, true)
            .override_global(aya_log::LEVEL, &log_level, true);
        if log_level == 0 {
            // The log ring's smallest size: nothing is ever written to it.
            loader.map_max_entries("AYA_LOGS", page_size());
        }
        let mut ebpf = loader
            .load(OBJECT)
            .map_err(|e| Error::ebpf("loading xbr's eBPF object", e))?;
        let record = BridgeRecord {
            ifindex: plan.bridge_ifindex,
            attach_mode: mode as u32,
            redirect_peer: u32::from(features.redirect_peer),
            uplink_mode: uplink_mode as u32,
            max_flows,
        };
        let mut bridge: Array<_, BridgeRecord> =
            Array::try_from(ebpf.map_mut("BRIDGE").expect("BRIDGE map"))
                .map_err(|e| Error::ebpf("opening the bridge record", e))?;
        bridge
            .set(0, record, 0)
            .map_err(|e| Error::ebpf("writing the bridge record", e))?;

        std::fs::create_dir_all(&dir)
            .map_err(|e| Error::io(format!("creating {}", dir.display()), e))?;
        for name in [pins::PORT_PROGRAM, pins::UPLINK_PROGRAM] {
            let program: &mut SchedClassifier = ebpf
                .program_mut(name)
                .expect("program defined by the object")
                .try_into()
                .map_err(|e| Error::ebpf(format!("program {name} is not a classifier"), e))?;
            program
                .load()
                .map_err(|e| Error::ebpf(format!("loading program {name} into the kernel"), e))?;
            program.pin(dir.join(name)).map_err(|e| {
                Error::ebpf(format!("pinning program {name} in {}", dir.display()), e)
            })?;
        }
        if uplink_mode == UplinkMode::Xdp {
            let name = pins::UPLINK_XDP_PROGRAM;
            let program: &mut Xdp = ebpf
                .program_mut(name)
                .expect("program defined by the object")
                .try_into()
                .map_err(|e| Error::ebpf(format!("program {name} is not an XDP program"), e))?;
            program
                .load()
                .map_err(|e| Error::ebpf(format!("loading program {name} into the kernel"), e))?;
            program.pin(dir.join(name)).map_err(|e| {
                Error::ebpf(format!("pinning program {name} in {}", dir.display()), e)
            })?;
        }
        // The bridge record last: its pin says the attachment is whole (see `pins`).
        let (complete, rest): (Vec<_>, Vec<_>) = pins::MAPS
            .iter()
            .partition(|(_, pin)| *pin == pins::COMPLETE);
        for (object_name, _) in rest.into_iter().chain(complete) {
            let map = ebpf.map(object_name).expect("map defined by the object");
            map.pin(pins::map_pin(&dir, object_name)).map_err(|e| {
                Error::ebpf(format!("pinning map {object_name} in {}", dir.display()), e)
            })?;
        }
        Pinned::open(root, &plan.bridge)
    }

    fn attached(&self, plan: &Plan, created: bool, changes: Changes) -> Attached {
        let mode = if self.record.attach_mode == AttachMode::Tcx as u32 {
            AttachMode::Tcx
        } else {
            AttachMode::Clsact
        };
        Attached {
            dir: self.dir.clone(),
            mode,
            uplink_mode: self.record.uplink_mode,
            created,
            replaced_incomplete: false,
            ports: self.ports.keys().filter_map(|k| k.ok()).count(),
            endpoints: plan.endpoints.len(),
            changes,
        }
    }

    fn mode(&self) -> AttachMode {
        if self.record.attach_mode == AttachMode::Tcx as u32 {
            AttachMode::Tcx
        } else {
            AttachMode::Clsact
        }
    }

    /// Brings the pinned state to `plan`. With `strict`, a port that cannot be hooked is an
    /// error (a first attach is all or nothing); otherwise it is skipped and reported.
    ///
    /// The records are only a claim: what the kernel runs on each recorded port and uplink is
    /// read first, and a hook removed behind xbr's back, found twice, or left unrecorded by a
    /// writer that stopped half-way, is put right.
    pub fn reconcile(&mut self, plan: &Plan, strict: bool) -> Result<Changes> {
        let mut changes = Changes::default();
        let current = self.records(Role::Port)?;
        let wanted_mac = &plan.port_macs;
        let wanted: BTreeMap<u32, &PlannedPort> =
            plan.ports.iter().map(|p| (p.ifindex, p)).collect();

        // 1. Ports that left: first no delivery there (the record's MAC goes), which alone
        // stops redirects to them; then the hook; then the record.
        for (ifindex, record) in &current {
            if !wanted.contains_key(ifindex) {
                self.forget(*ifindex, record)?;
                let _ = self.stats.remove(ifindex);
                // Connections into the container that left end with it.
                self.retire_flows(|_, flow| {
                    flow.flags & Flow::INBOUND != 0 && flow.ifindex == *ifindex
                });
                changes.ports_removed.push(*ifindex);
            }
        }
        // 2. Kept ports whose endpoint MAC changed (or went): the record first, as above.
        for (ifindex, record) in &current {
            let mac = wanted_mac.get(ifindex).copied().unwrap_or_default();
            if wanted.contains_key(ifindex) && record.endpoint_mac != mac {
                let updated = PortRecord {
                    endpoint_mac: mac,
                    ..*record
                };
                self.ports
                    .insert(ifindex, updated, 0)
                    .map_err(|e| Error::ebpf("updating the ports map", e))?;
            }
        }
        // 3. Endpoint entries the plan does not have, or has on another port, go. One that
        // stays on its port with another address or flags (rules appeared: the address check)
        // is rewritten in place, so its frames never leave the fast path meanwhile.
        let stale: Vec<(EndpointKey, Endpoint)> = self
            .endpoints
            .iter()
            .filter_map(|entry| entry.ok())
            .filter(|(key, endpoint)| plan.endpoints.get(key) != Some(endpoint))
            .collect();
        for (key, endpoint) in stale {
            let update = match plan.endpoints.get(&key) {
                Some(wanted) if wanted.ifindex == endpoint.ifindex => {
                    self.endpoints.insert(key, wanted, 0)
                }
                _ => {
                    changes.endpoints_removed += 1;
                    self.endpoints.remove(&key)
                }
            };
            update.map_err(|e| Error::ebpf("updating the endpoints map", e))?;
        }
        // 4. Kept ports whose hook is not what their record says. Delivery into them never
        // stopped (their record keeps its MAC); their own frames took the bridge meanwhile.
        let kept: BTreeMap<u32, PortRecord> = self
            .records(Role::Port)?
            .into_iter()
            .filter(|(ifindex, _)| wanted.contains_key(ifindex))
            .collect();
        let mut failure = None;
        for (ifindex, (drift, observed)) in self.drift(Role::Port, &kept)? {
            let port = wanted[&ifindex];
            match self.hook_one(Role::Port, port, Some(kept[&ifindex]), &observed) {
                Ok(record) => {
                    self.write_record(Role::Port, ifindex, record)?;
                    changes.repaired.push((port.name.clone(), drift));
                }
                Err(Error::PortVanished { .. }) if !strict => {
                    changes.ports_skipped.push(port.name.clone())
                }
                Err(error) => failure = failure.or(Some(error)),
            }
        }
        // 5. New ports: counters; a record that delivers nothing yet, so that a writer
        // stopped half-way leaves a trace the next one finishes; the hook; then the record
        // that lets frames be delivered there.
        let cpus =
            nr_cpus().map_err(|(what, e)| Error::io(format!("counting CPUs ({what})"), e))?;
        let new_ports: Vec<&PlannedPort> = wanted
            .iter()
            .filter(|(ifindex, _)| !current.contains_key(ifindex))
            .map(|(_, port)| *port)
            .collect();
        let ifindexes: Vec<u32> = new_ports.iter().map(|p| p.ifindex).collect();
        let observed = self.observe(Role::Port, &ifindexes)?;
        for (port, observed) in new_ports.iter().zip(observed) {
            let zeros = PerCpuValues::try_from(vec![PortStats::default(); cpus])
                .map_err(|e| Error::ebpf("preparing port counters", e))?;
            self.stats
                .insert(port.ifindex, zeros, 0)
                .map_err(|e| Error::ebpf("adding port counters", e))?;
            match self.hook_one(Role::Port, port, None, &observed) {
                Ok(mut record) => {
                    record.endpoint_mac =
                        wanted_mac.get(&port.ifindex).copied().unwrap_or_default();
                    self.write_record(Role::Port, port.ifindex, record)?;
                    changes.ports_added.push(port.name.clone());
                }
                Err(error) => {
                    let _ = self.stats.remove(&port.ifindex);
                    let _ = self.ports.remove(&port.ifindex);
                    match error {
                        Error::PortVanished { .. } if !strict => {
                            changes.ports_skipped.push(port.name.clone())
                        }
                        // Keep recording the ports that did get hooked, so undo finds them.
                        error => failure = failure.or(Some(error)),
                    }
                }
            }
        }
        // 4b. Uplinks, likewise (an uplink that is gone keeps its record, as before).
        let uplinks = self.records(Role::Uplink)?;
        for (ifindex, (drift, observed)) in self.drift(Role::Uplink, &uplinks)? {
            let Ok(name) = nix::net::if_::if_indextoname(ifindex) else {
                continue;
            };
            let uplink = PlannedPort {
                name: name.to_string_lossy().into_owned(),
                ifindex,
            };
            match self.hook_one(Role::Uplink, &uplink, Some(uplinks[&ifindex]), &observed) {
                Ok(record) => {
                    self.write_record(Role::Uplink, ifindex, record)?;
                    changes.repaired.push((uplink.name, drift));
                }
                Err(Error::PortVanished { .. }) => {}
                Err(error) => failure = failure.or(Some(error)),
            }
        }
        if let Some(error) = failure {
            return Err(error);
        }
        // 5. What the policy holds back, before any new endpoint can take the fast path.
        changes.holds = self.sync_holds(&plan.east_west.holds)?;
        // 6. Endpoints, last: every port they name now holds them.
        let hooked: BTreeSet<u32> = self.ports.keys().filter_map(|k| k.ok()).collect();
        for (key, endpoint) in &plan.endpoints {
            if !hooked.contains(&endpoint.ifindex) {
                continue;
            }
            let present = self.endpoints.get(key, 0).ok() == Some(*endpoint);
            if !present {
                self.endpoints
                    .insert(key, endpoint, 0)
                    .map_err(|e| Error::ebpf("updating the endpoints map", e))?;
                changes.endpoints_added += 1;
            }
        }
        // 7. Published ports follow their container to its current port and MAC.
        if let Some(containers) = &plan.containers {
            changes.published_updated = self.update_published(containers, plan.bridge_mac)?;
        }
        // 8. What writers stopped half-way left beside the records.
        changes.leftovers_removed = self.remove_leftovers()?;
        Ok(changes)
    }

    /// Brings `HOLDS` to `wanted`: new entries (and their shapes) first, so that no frame the
    /// policy now holds back slips through; then stale ones. Returns (added, removed).
    fn sync_holds(&mut self, wanted: &BTreeMap<HoldKey, String>) -> Result<(usize, usize)> {
        let current: Vec<HoldKey> = self.holds.keys().filter_map(|k| k.ok()).collect();
        let added: Vec<&HoldKey> = wanted.keys().filter(|k| !current.contains(k)).collect();
        let stale: Vec<&HoldKey> = current.iter().filter(|k| !wanted.contains_key(k)).collect();
        if added.is_empty() && stale.is_empty() {
            return Ok((0, 0));
        }
        let as_error = |e| Error::ebpf("updating the policy's hold-backs", e);
        for key in &added {
            self.holds.insert(**key, 1, 0).map_err(as_error)?;
        }
        let before = crate::plan::hold_shapes(&current);
        let after = crate::plan::hold_shapes(wanted.keys());
        for family in 0..2 {
            self.hold_shapes
                .set(family, before[family as usize] | after[family as usize], 0)
                .map_err(as_error)?;
        }
        for key in &stale {
            self.holds.remove(key).map_err(as_error)?;
        }
        for family in 0..2 {
            self.hold_shapes
                .set(family, after[family as usize], 0)
                .map_err(as_error)?;
        }
        Ok((added.len(), stale.len()))
    }

    /// Sets every published port's policy flags and the held clients, as `plan`'s policy says
    /// for it, and ends the connections the policy now holds back (on the kernel path a rule
    /// that appears applies to established connections too). New client holds go in before
    /// the flags that make the datapath look for them.
    pub fn apply_published_policy(&mut self, plan: &Plan) -> Result<PublishedApplied> {
        let uplinks: Vec<String> = self
            .uplink_ifindexes()
            .into_iter()
            .filter_map(|ifindex| nix::net::if_::if_indextoname(ifindex).ok())
            .map(|name| name.to_string_lossy().into_owned())
            .collect();
        let entries: Vec<(PublishedKey, PublishedPort)> =
            self.published.iter().filter_map(|e| e.ok()).collect();
        let as_error = |e| Error::ebpf("updating the published ports' hold-backs", e);
        let mut wanted_clients = BTreeMap::new();
        let mut wanted_prefixes = BTreeMap::new();
        let mut flagged = Vec::new();
        let mut policies = BTreeMap::new();
        for (key, value) in &entries {
            let policy = plan.published_policy(key, value, &uplinks);
            let flags = (value.flags & PublishedPort::BY_DOCKER) | policy.flags();
            wanted_clients.extend(policy.clients.clone());
            wanted_prefixes.extend(policy.client_prefixes.clone());
            flagged.push((*key, *value, flags));
            policies.insert(*key, policy);
        }
        let trie_key =
            |(prefix, len): &(ClientPrefix, u8)| Key::new(ClientPrefix::prefix_len(*len), *prefix);
        let current_prefixes: Vec<(ClientPrefix, u8)> = self
            .client_prefix_holds
            .keys()
            .filter_map(|k| k.ok())
            .map(|k| {
                (
                    k.data(),
                    (k.prefix_len() - ClientPrefix::prefix_len(0)) as u8,
                )
            })
            .collect();
        let new_prefixes: Vec<(ClientPrefix, u8)> = wanted_prefixes
            .keys()
            .filter(|k| !current_prefixes.contains(k))
            .copied()
            .collect();
        for prefix in &new_prefixes {
            self.client_prefix_holds
                .insert(&trie_key(prefix), 1, 0)
                .map_err(as_error)?;
        }
        let current: Vec<ClientHoldKey> = self.client_holds.keys().filter_map(|k| k.ok()).collect();
        let new_clients: Vec<ClientHoldKey> = wanted_clients
            .keys()
            .filter(|k| !current.contains(k))
            .copied()
            .collect();
        for key in &new_clients {
            self.client_holds.insert(key, 1, 0).map_err(as_error)?;
        }
        let mut newly_held = Vec::new();
        for (key, value, flags) in flagged {
            if flags != value.flags {
                self.published
                    .insert(key, PublishedPort { flags, ..value }, 0)
                    .map_err(as_error)?;
                if flags & PublishedPort::HELD != 0 {
                    newly_held.push(key);
                }
            }
        }
        for key in current.iter().filter(|k| !wanted_clients.contains_key(k)) {
            self.client_holds.remove(key).map_err(as_error)?;
        }
        for prefix in current_prefixes
            .iter()
            .filter(|k| !wanted_prefixes.contains_key(k))
        {
            self.client_prefix_holds
                .remove(&trie_key(prefix))
                .map_err(as_error)?;
        }
        let connections_ended = self.retire_flows(|flow_key, flow| {
            flow.flags & Flow::INBOUND != 0
                && (newly_held.iter().any(|held| serves(held, flow_key))
                    || new_clients.iter().any(|client| {
                        serves(&client.published, flow_key) && holds(client, flow_key)
                    })
                    || new_prefixes.iter().any(|(prefix, len)| {
                        serves(&prefix.published, flow_key)
                            && in_prefix(prefix.client_ip, *len, flow_key.src_ip)
                    }))
        });
        Ok(PublishedApplied {
            connections_ended,
            policies,
        })
    }

    /// The records of `role`'s hooks.
    fn records(&self, role: Role) -> Result<BTreeMap<u32, PortRecord>> {
        let (map, what) = match role {
            Role::Port => (&self.ports, "reading the ports map"),
            Role::Uplink => (&self.uplinks, "reading the uplinks map"),
        };
        map.iter()
            .collect::<Result<_, _>>()
            .map_err(|e| Error::ebpf(what, e))
    }

    fn write_record(&mut self, role: Role, ifindex: u32, record: PortRecord) -> Result<()> {
        let (map, what) = match role {
            Role::Port => (&mut self.ports, "updating the ports map"),
            Role::Uplink => (&mut self.uplinks, "updating the uplinks map"),
        };
        map.insert(ifindex, record, 0)
            .map_err(|e| Error::ebpf(what, e))
    }

    fn link_pin(&self, role: Role, ifindex: u32) -> PathBuf {
        match role {
            Role::Port => pins::link_pin(&self.dir, ifindex),
            Role::Uplink => pins::uplink_pin(&self.dir, ifindex),
        }
    }

    fn program_id_of(&self, role: Role) -> u32 {
        match role {
            Role::Port => self.port_program_id,
            Role::Uplink => self.uplink_program_id,
        }
    }

    /// What the kernel runs on each of `ifindexes` where `role`'s program would be.
    fn observe(&self, role: Role, ifindexes: &[u32]) -> Result<Vec<Observed>> {
        let program = self.program_id_of(role);
        match self.mode() {
            AttachMode::Tcx => ifindexes
                .iter()
                .map(|ifindex| {
                    hooks::observe_tcx(*ifindex, program, &self.link_pin(role, *ifindex))
                })
                .collect(),
            AttachMode::Clsact => hooks::observe_clsact(ifindexes, program),
        }
    }

    /// The recorded hooks of `role` that differ from what the kernel runs, with what it runs.
    fn drift(
        &self,
        role: Role,
        records: &BTreeMap<u32, PortRecord>,
    ) -> Result<BTreeMap<u32, (Drift, Observed)>> {
        let ifindexes: Vec<u32> = records.keys().copied().collect();
        let observed = self.observe(role, &ifindexes)?;
        let mut drifted = BTreeMap::new();
        for ((ifindex, record), observed) in records.iter().zip(observed) {
            let recorded = Recorded {
                ifindex: *ifindex,
                priority: record.tc_priority as u16,
                handle: record.tc_handle,
            };
            let drift = hooks::judge(&recorded, &observed)
                .or_else(|| self.xdp_drift(role, *ifindex, record));
            if let Some(drift) = drift {
                drifted.insert(*ifindex, (drift, observed));
            }
        }
        Ok(drifted)
    }

    /// In uplink xdp mode: whether `uplink_xdp` is missing in front of an uplink's tc program.
    fn xdp_drift(&self, role: Role, ifindex: u32, record: &PortRecord) -> Option<Drift> {
        let xdp = self.uplink_xdp_id.filter(|_| role == Role::Uplink)?;
        let pin = pins::uplink_xdp_pin(&self.dir, ifindex);
        let attached = crate::bpf_link::pinned_link_target(&pin)
            .ok()
            .flatten()
            .is_some_and(|t| t.ifindex == ifindex && t.prog_id == xdp);
        let recorded = xdp_attach_name(record.flags).is_some();
        (!(attached && recorded)).then_some(Drift::Missing)
    }

    /// Hooks `role`'s program to `port` unless `observed` shows it there already (a writer
    /// that stopped before recording it), and returns the port's record: `previous` (its
    /// MAC kept) with the hook's flags. The record is written before anything is added, so
    /// that a writer stopped half-way leaves a record the next writer finds: for clsact, with
    /// whether xbr makes the qdisc, which only then can detach know.
    fn hook_one(
        &mut self,
        role: Role,
        port: &PlannedPort,
        previous: Option<PortRecord>,
        observed: &Observed,
    ) -> Result<PortRecord> {
        let ifindex = port.ifindex;
        let mut record = previous.unwrap_or_default();
        let pin = self.link_pin(role, ifindex);
        let program = self.program_id_of(role);
        match observed {
            Observed::Tcx {
                running,
                pin: target,
            } => {
                let ours_here =
                    target.is_some_and(|t| t.ifindex == ifindex && t.prog_id == program);
                if !(ours_here && *running) {
                    if target.is_some() {
                        unpin_link(&pin, ifindex, "tcx")?;
                    }
                    self.write_record(role, ifindex, record)?;
                    let program = match role {
                        Role::Port => &mut self.program,
                        Role::Uplink => &mut self.uplink_program,
                    };
                    hook(program, AttachMode::Tcx, &pin, &self.bridge, port)?;
                }
            }
            Observed::Clsact { qdisc, ours } => {
                let recorded = ours.iter().find(|f| {
                    previous.is_some()
                        && u32::from(f.priority) == record.tc_priority
                        && f.handle == record.tc_handle
                });
                if let Some(keep) = recorded.or(ours.first()).copied() {
                    for extra in ours.iter().filter(|f| **f != keep) {
                        hooks::delete_filter(ifindex, extra)?;
                    }
                    record.tc_priority = u32::from(keep.priority);
                    record.tc_handle = keep.handle;
                } else {
                    if !qdisc {
                        record.flags |= PortRecord::ADDED_CLSACT;
                    }
                    self.write_record(role, ifindex, record)?;
                    let program = match role {
                        Role::Port => &mut self.program,
                        Role::Uplink => &mut self.uplink_program,
                    };
                    let hooked = hook(program, AttachMode::Clsact, &pin, &self.bridge, port)?;
                    record.flags |= hooked.flags;
                    record.tc_priority = hooked.tc_priority;
                    record.tc_handle = hooked.tc_handle;
                }
            }
        }
        if role == Role::Uplink && self.xdp_drift(role, ifindex, &record).is_some() {
            let xdp_pin = pins::uplink_xdp_pin(&self.dir, ifindex);
            unpin_link(&xdp_pin, ifindex, "XDP")?;
            record.flags &= !(PortRecord::XDP_NATIVE | PortRecord::XDP_GENERIC);
            self.write_record(role, ifindex, record)?;
            let xdp = self
                .uplink_xdp
                .as_mut()
                .expect("xdp_drift: uplink xdp mode");
            match hook_xdp(xdp, &xdp_pin, port) {
                Ok(flag) => record.flags |= flag,
                Err(error) => {
                    if previous.is_none() {
                        let _ = self.unhook(role, ifindex, &record);
                    }
                    return Err(error);
                }
            }
        }
        Ok(record)
    }

    /// A bridge port that left: no delivery there, then no hook, then no record.
    fn forget(&mut self, ifindex: u32, record: &PortRecord) -> Result<()> {
        if record.endpoint_mac != [0; 6] {
            let silent = PortRecord {
                endpoint_mac: [0; 6],
                ..*record
            };
            self.write_record(Role::Port, ifindex, silent)?;
        }
        self.unhook(Role::Port, ifindex, record)?;
        match self.ports.remove(&ifindex) {
            Ok(()) | Err(aya::maps::MapError::KeyNotFound) => Ok(()),
            Err(e) => Err(Error::ebpf("updating the ports map", e)),
        }
    }

    /// Link pins and counters of ports and uplinks without a record: a writer stopped
    /// between removing a record and its hook (or an older xbr's). Returns how many.
    fn remove_leftovers(&mut self) -> Result<usize> {
        let ports: BTreeSet<u32> = self.ports.keys().filter_map(|k| k.ok()).collect();
        let uplinks: BTreeSet<u32> = self.uplinks.keys().filter_map(|k| k.ok()).collect();
        let mut removed = 0;
        let entries = std::fs::read_dir(&self.dir)
            .map_err(|e| Error::io(format!("listing {}", self.dir.display()), e))?;
        for entry in entries.filter_map(|e| e.ok()) {
            let name = entry.file_name();
            let Some((kind, ifindex)) = name.to_str().and_then(pins::parse_link_pin) else {
                continue;
            };
            let recorded = match kind {
                pins::LinkPin::Port => ports.contains(&ifindex),
                pins::LinkPin::Uplink | pins::LinkPin::UplinkXdp => uplinks.contains(&ifindex),
            };
            if !recorded {
                unpin_link(&entry.path(), ifindex, "leftover")?;
                removed += 1;
            }
        }
        let counters: Vec<u32> = self
            .stats
            .keys()
            .filter_map(|k| k.ok())
            .filter(|ifindex| !ports.contains(ifindex))
            .collect();
        for ifindex in counters {
            if self.stats.remove(&ifindex).is_ok() {
                removed += 1;
            }
        }
        Ok(removed)
    }

    /// How each recorded port's and uplink's hook differs from its record (read-only, for
    /// `status`): (ports, uplinks).
    pub fn drift_report(&self) -> Result<(BTreeMap<u32, Drift>, BTreeMap<u32, Drift>)> {
        let only = |drifted: BTreeMap<u32, (Drift, Observed)>| {
            drifted
                .into_iter()
                .map(|(ifindex, (drift, _))| (ifindex, drift))
                .collect()
        };
        Ok((
            only(self.drift(Role::Port, &self.records(Role::Port)?)?),
            only(self.drift(Role::Uplink, &self.records(Role::Uplink)?)?),
        ))
    }

    /// Whether every hook that no netlink event would report gone is still in place: tcx
    /// links (and XDP links) can be detached without an event, a clsact filter or qdisc
    /// cannot. A few syscalls per port; the follower calls it every second.
    pub fn silent_hooks_intact(&self) -> Result<bool> {
        let ports_intact = match self.mode() {
            AttachMode::Tcx => self
                .drift(Role::Port, &self.records(Role::Port)?)?
                .is_empty(),
            AttachMode::Clsact => true,
        };
        let uplinks = self.records(Role::Uplink)?;
        let uplinks_intact = match self.mode() {
            AttachMode::Tcx => self.drift(Role::Uplink, &uplinks)?.is_empty(),
            AttachMode::Clsact => uplinks
                .iter()
                .all(|(ifindex, record)| self.xdp_drift(Role::Uplink, *ifindex, record).is_none()),
        };
        Ok(ports_intact && uplinks_intact)
    }

    /// The ports and uplinks xbr has hooked, by ifindex.
    pub fn hooked_ifindexes(&self) -> BTreeSet<u32> {
        self.ports
            .keys()
            .chain(self.uplinks.keys())
            .filter_map(|k| k.ok())
            .collect()
    }

    /// Whether the attachment this was opened from is still the one pinned: false once a
    /// detach began, also when a new attach pinned a new one under the same name.
    pub fn still_pinned(&self) -> bool {
        std::fs::metadata(self.dir.join(pins::COMPLETE))
            .is_ok_and(|meta| (meta.dev(), meta.ino()) == self.record_pin_id)
    }

    /// Points every published port at its container's current port and MAC (ifindex 0 when
    /// no container has the address now: the kernel path serves it then).
    fn update_published(
        &mut self,
        containers: &BTreeMap<std::net::Ipv4Addr, (u32, [u8; 6])>,
        bridge_mac: [u8; 6],
    ) -> Result<usize> {
        let entries: Vec<(PublishedKey, PublishedPort)> =
            self.published.iter().filter_map(|e| e.ok()).collect();
        let mut updated = 0;
        for (key, published) in entries {
            let target = containers.get(&std::net::Ipv4Addr::from(published.container_ip));
            let (ifindex, container_mac) = target.copied().unwrap_or((0, [0; 6]));
            let current = PublishedPort {
                ifindex,
                container_mac,
                gateway_mac: bridge_mac,
                ..published
            };
            if current != published {
                self.published
                    .insert(key, current, 0)
                    .map_err(|e| Error::ebpf("updating the published ports map", e))?;
                updated += 1;
            }
        }
        Ok(updated)
    }

    /// Takes `role`'s program off a port: every filter of it (clsact), or the pinned link
    /// (tcx). A port that no longer exists took it along.
    fn unhook(&self, role: Role, ifindex: u32, record: &PortRecord) -> Result<()> {
        match self.mode() {
            AttachMode::Tcx => unpin_link(&self.link_pin(role, ifindex), ifindex, "tcx"),
            AttachMode::Clsact => {
                if nix::net::if_::if_indextoname(ifindex).is_err() {
                    return Ok(()); // the port is gone, and its qdisc with it
                }
                if record.flags & PortRecord::ADDED_CLSACT != 0 {
                    // Deleting the qdisc xbr added removes our filters with it.
                    return delete_clsact(ifindex);
                }
                let observed = hooks::observe_clsact(&[ifindex], self.program_id_of(role))?;
                for observed in observed {
                    if let Observed::Clsact { ours, .. } = observed {
                        for filter in &ours {
                            hooks::delete_filter(ifindex, filter)?;
                        }
                    }
                }
                Ok(())
            }
        }
    }

    pub fn root(&self) -> &Path {
        &self.root
    }

    /// The kernel's id of the pinned program (for reading its log ring buffer).
    pub fn program_id(&self) -> Result<u32> {
        Ok(self
            .program
            .info()
            .map_err(|e| Error::ebpf("reading the program's info", e))?
            .id())
    }

    /// Counters and map contents, read back for `status` and `stats`.
    pub fn snapshot(&self) -> Result<Attachment> {
        let as_error = |what: &str, e: aya::maps::MapError| Error::ebpf(what.to_owned(), e);
        let ports = self
            .ports
            .iter()
            .collect::<Result<BTreeMap<_, _>, _>>()
            .map_err(|e| as_error("reading the ports map", e))?;
        let endpoints = self
            .endpoints
            .iter()
            .collect::<Result<BTreeMap<_, _>, _>>()
            .map_err(|e| as_error("reading the endpoints map", e))?;
        let mut stats = BTreeMap::new();
        for entry in self.stats.iter() {
            let (ifindex, per_cpu) = entry.map_err(|e| as_error("reading the port counters", e))?;
            let mut total = PortStats::default();
            for value in per_cpu.iter() {
                total.add(value);
            }
            stats.insert(ifindex, total);
        }
        let mut verdicts = Vec::new();
        for verdict in Verdict::ALL {
            let per_cpu = match self.verdicts.get(&(verdict as u32), 0) {
                Ok(per_cpu) => per_cpu,
                // Pinned by an xbr from before this verdict existed: never counted.
                Err(_) if verdict == Verdict::NatInXdp => {
                    verdicts.push((verdict, 0));
                    continue;
                }
                Err(e) => return Err(as_error("reading the verdicts", e)),
            };
            verdicts.push((verdict, per_cpu.iter().sum()));
        }
        Ok(Attachment {
            bridge: self.bridge.clone(),
            dir: self.dir.clone(),
            record: self.record,
            ports,
            endpoints,
            stats,
            verdicts,
            uplinks: self.uplink_ifindexes(),
            uplink_xdp: self
                .uplinks
                .iter()
                .filter_map(|e| e.ok())
                .filter_map(|(ifindex, record)| Some((ifindex, xdp_attach_name(record.flags)?)))
                .collect(),
            published: self.published(),
            holds: self.holds.keys().filter_map(|k| k.ok()).collect(),
            port_drift: BTreeMap::new(),
            uplink_drift: BTreeMap::new(),
            follower: None,
            writer: None,
            nat: self.nat_state(),
            memory: self.memory()?,
        })
    }

    /// Hooks the uplink program to uplinks not hooked yet; returns their names. Each gets its
    /// record before any is hooked: a writer stopped half-way leaves records of uplinks with no
    /// hook, which the next reconcile hooks.
    pub fn hook_uplinks(&mut self, _plan: &Plan, uplinks: &[UplinkView]) -> Result<Vec<String>> {
        let current = self.records(Role::Uplink)?;
        let new: Vec<&UplinkView> = uplinks
            .iter()
            .filter(|uplink| !current.contains_key(&uplink.ifindex))
            .collect();
        for uplink in &new {
            self.write_record(Role::Uplink, uplink.ifindex, PortRecord::default())?;
        }
        let ifindexes: Vec<u32> = new.iter().map(|uplink| uplink.ifindex).collect();
        let observed = self.observe(Role::Uplink, &ifindexes)?;
        let mut added = Vec::new();
        for (uplink, observed) in new.iter().zip(observed) {
            let port = PlannedPort {
                name: uplink.name.clone(),
                ifindex: uplink.ifindex,
            };
            match self.hook_one(Role::Uplink, &port, None, &observed) {
                Ok(record) => self.write_record(Role::Uplink, uplink.ifindex, record)?,
                Err(error) => {
                    // This one and those not tried: no record claims them.
                    for left in new.iter().skip(added.len()) {
                        let _ = self.uplinks.remove(&left.ifindex);
                    }
                    return Err(error);
                }
            }
            added.push(uplink.name.clone());
        }
        Ok(added)
    }

    /// The hooked uplinks' ifindexes.
    pub fn uplink_ifindexes(&self) -> Vec<u32> {
        self.uplinks.keys().filter_map(|k| k.ok()).collect()
    }

    /// Removes everything: hooks, qdiscs xbr added, pins (the bridge record first, so a
    /// detach stopped half-way leaves pins that say so).
    pub fn detach(self) -> Result<Detached> {
        let ports = self.records(Role::Port)?;
        for (ifindex, record) in &ports {
            self.unhook(Role::Port, *ifindex, record)?;
        }
        for (ifindex, record) in &self.records(Role::Uplink)? {
            // XDP first: it runs in front of the tc program.
            unpin_link(&pins::uplink_xdp_pin(&self.dir, *ifindex), *ifindex, "XDP")?;
            self.unhook(Role::Uplink, *ifindex, record)?;
        }
        pins::remove(&self.dir, &self.root)?;
        Ok(Detached {
            dir: self.dir.clone(),
            ports: ports.len(),
        })
    }
}

/// Whether inbound connection `key` came through published port `published`.
fn serves(published: &PublishedKey, key: &FlowKey) -> bool {
    key.proto == published.proto
        && key.dst_port == published.host_port
        && (published.host_ip == [0; 4] || published.host_ip == key.dst_ip)
}

/// Whether client hold-back `client` covers inbound connection `key`.
fn holds(client: &ClientHoldKey, key: &FlowKey) -> bool {
    (client.shape & ClientHoldKey::ADDRESS == 0 || client.client_ip == key.src_ip)
        && (client.shape & ClientHoldKey::PORT == 0 || client.client_port == key.src_port)
}

/// Whether `address` is in the /`len` prefix `prefix`.
fn in_prefix(prefix: [u8; 4], len: u8, address: [u8; 4]) -> bool {
    let mask = u32::MAX
        .checked_shl(32 - u32::from(len.min(32)))
        .unwrap_or(0);
    u32::from_be_bytes(prefix) & mask == u32::from_be_bytes(address) & mask
}

/// Detaches the bpf link pinned at `link_pin` at once, then removes the pin.
fn unpin_link(link_pin: &Path, ifindex: u32, what: &str) -> Result<()> {
    crate::bpf_link::detach_pinned(link_pin)
        .map_err(|e| Error::io(format!("detaching the {what} link of ifindex {ifindex}"), e))?;
    match std::fs::remove_file(link_pin) {
        Err(e) if e.kind() != std::io::ErrorKind::NotFound => Err(Error::io(
            format!("unpinning the {what} link of ifindex {ifindex}"),
            e,
        )),
        _ => Ok(()),
    }
}

/// Attaches the uplink XDP program to `port`, native (driver) mode where the driver has it,
/// generic (SKB) mode otherwise, and pins its bpf link; returns the record flag that says
/// which.
fn hook_xdp(program: &mut Xdp, link_pin: &Path, port: &PlannedPort) -> Result<u32> {
    let attached = match program.attach_to_if_index(port.ifindex, XdpMode::Driver) {
        Ok(id) => Ok((id, PortRecord::XDP_NATIVE)),
        Err(native) => {
            tracing::info!(
                "{}: native XDP refused ({native}); attaching in generic mode",
                port.name
            );
            program
                .attach_to_if_index(port.ifindex, XdpMode::Skb)
                .map(|id| (id, PortRecord::XDP_GENERIC))
        }
    };
    let (id, flag) = attached
        .map_err(|e| Error::ebpf(format!("attaching the XDP program to {}", port.name), e))?;
    let link = program
        .take_link(id)
        .map_err(|e| Error::ebpf(format!("taking the XDP link of {}", port.name), e))?;
    // A netlink attachment (kernels before 5.9) has no link to pin: refuse rather than leave
    // an attachment that detach cannot find.
    let link = match FdLink::try_from(link) {
        Ok(link) => link,
        Err(e) => {
            return Err(Error::ebpf(
                format!("the XDP attachment of {} is not a bpf link", port.name),
                e,
            ));
        }
    };
    link.pin(link_pin)
        .map_err(|e| Error::ebpf(format!("pinning the XDP link of {}", port.name), e))?;
    Ok(flag)
}

/// Hooks `program` to one port's tc ingress; returns the port's record (without its MAC).
fn hook(
    program: &mut SchedClassifier,
    mode: AttachMode,
    link_pin: &Path,
    bridge: &str,
    port: &PlannedPort,
) -> Result<PortRecord> {
    // Attach goes by name: make sure the name still means the port we planned for.
    let vanished = || Error::PortVanished {
        bridge: bridge.to_owned(),
        port: port.name.clone(),
    };
    let still_there =
        || nix::net::if_::if_nametoindex(port.name.as_str()).ok() == Some(port.ifindex);
    if !still_there() {
        return Err(vanished());
    }
    let attach_error = |e: aya::programs::ProgramError| {
        if still_there() {
            Error::ebpf(format!("attaching to {} (for {bridge})", port.name), e)
        } else {
            vanished()
        }
    };
    let mut record = PortRecord::default();
    match mode {
        AttachMode::Tcx => {
            let id = program
                .attach_with_options(
                    &port.name,
                    TcAttachType::Ingress,
                    TcAttachOptions::TcxOrder(LinkOrder::default()),
                )
                .map_err(attach_error)?;
            let link = program.take_link(id).map_err(attach_error)?;
            let link = FdLink::try_from(link)
                .map_err(|e| Error::ebpf(format!("taking the tcx link of {}", port.name), e))?;
            // The pin owns the link from here; dropping our fd leaves it attached.
            link.pin(link_pin)
                .map_err(|e| Error::ebpf(format!("pinning the tcx link of {}", port.name), e))?;
        }
        AttachMode::Clsact => {
            match tc::qdisc_add_clsact(&port.name) {
                Ok(()) => record.flags |= PortRecord::ADDED_CLSACT,
                Err(TcError::NetlinkError(e)) if e.raw_os_error() == Some(libc::EEXIST) => {}
                Err(e) => return Err(attach_error(e.into())),
            }
            let hooked = program
                .attach_with_options(
                    &port.name,
                    TcAttachType::Ingress,
                    TcAttachOptions::Netlink(NlOptions::default()),
                )
                .and_then(|id| program.take_link(id));
            let link = match hooked {
                Ok(link) => link,
                Err(e) => {
                    if record.flags & PortRecord::ADDED_CLSACT != 0 {
                        let _ = delete_clsact(port.ifindex);
                    }
                    return Err(attach_error(e));
                }
            };
            record.tc_priority = u32::from(link.priority().map_err(attach_error)?);
            record.tc_handle = u32::from(link.handle().map_err(attach_error)?);
            // A clsact filter lives in its qdisc, not in an fd: letting go of the handle
            // without detaching keeps it attached.
            std::mem::forget(link);
        }
    }
    Ok(record)
}

/// A pinned attachment as read back from bpffs.
#[derive(Debug)]
pub struct Attachment {
    pub bridge: String,
    pub dir: PathBuf,
    pub record: BridgeRecord,
    pub ports: BTreeMap<u32, PortRecord>,
    pub endpoints: BTreeMap<EndpointKey, Endpoint>,
    /// Per port, summed over CPUs.
    pub stats: BTreeMap<u32, PortStats>,
    pub verdicts: Vec<(Verdict, u64)>,
    pub uplinks: Vec<u32>,
    /// Uplinks with the XDP program, and how it is attached there ("native", "generic").
    pub uplink_xdp: BTreeMap<u32, &'static str>,
    pub published: Vec<crate::publish::Published>,
    /// The east-west hold-backs the datapath applies now.
    pub holds: std::collections::BTreeSet<HoldKey>,
    /// Ports and uplinks whose hook is not what their record says (read by `read`).
    pub port_drift: BTreeMap<u32, Drift>,
    pub uplink_drift: BTreeMap<u32, Drift>,
    /// Who follows the bridge, and who is changing it right now (read by `read`).
    pub follower: Option<crate::lock::Holder>,
    pub writer: Option<crate::lock::Holder>,
    /// NATed connections now, the tables' sizes, and what happened to connections.
    pub nat: crate::publish::NatState,
    /// The kernel memory the attachment locks.
    pub memory: crate::memory::Memory,
}

/// The attachment of `bridge` as it is: its pins, and how the kernel's hooks differ from them.
pub fn read(root: &Path, bridge: &str) -> Result<Attachment> {
    let pinned = Pinned::open(root, bridge)?;
    let mut attachment = pinned.snapshot()?;
    (attachment.port_drift, attachment.uplink_drift) = pinned.drift_report()?;
    attachment.follower = crate::lock::follower(&pinned.dir);
    attachment.writer = crate::lock::writer(&pinned.dir);
    Ok(attachment)
}

/// What detach removed.
#[derive(Debug)]
pub struct Detached {
    pub dir: PathBuf,
    pub ports: usize,
}

/// Removes the attachment of `bridge`. Pins that are not a whole attachment (an attach or
/// detach stopped half-way) are removed as they are: links are detached with their pins, and
/// clsact filters exist only once the attachment is whole.
pub fn detach(root: &Path, bridge: &str) -> Result<Detached> {
    match Pinned::open(root, bridge) {
        Ok(pinned) => pinned.detach(),
        Err(Error::BrokenPins { pins: dir, .. } | Error::Incomplete { pins: dir, .. }) => {
            pins::remove(&dir, root)?;
            Ok(Detached { dir, ports: 0 })
        }
        Err(error) => Err(error),
    }
}

/// Deletes the clsact qdisc of `ifindex` (and with it every filter on it). A qdisc (or port)
/// already gone is not an error.
fn delete_clsact(ifindex: u32) -> Result<()> {
    let deleted = netlink::run(|handle| async move {
        let mut request = handle.qdisc().del(ifindex as i32);
        let message = request.message_mut();
        message.header.parent = TcHandle::CLSACT;
        message.header.handle = TcHandle::from(0xffff_0000);
        message
            .attributes
            .push(TcAttribute::Kind("clsact".to_owned()));
        request.execute().await
    })
    .map_err(|e| Error::io("opening a netlink socket", e))?;
    match deleted {
        Err(rtnetlink::Error::NetlinkError(e))
            if e.raw_code() == -libc::ENODEV
                || e.raw_code() == -libc::EINVAL
                || e.raw_code() == -libc::ENOENT =>
        {
            Ok(())
        }
        other => other.map_err(|e| {
            Error::netlink(format!("deleting the clsact qdisc of ifindex {ifindex}"), e)
        }),
    }
}
