//! The pinned state of one attachment: its programs and maps loaded and pinned
//! (`Pinned::create`) and opened again (`Pinned::open`), and the NAT connection tables, made
//! with the first published port and removed once unused, behind their slots.

use std::{
    os::{
        fd::{AsFd as _, BorrowedFd},
        unix::fs::MetadataExt as _,
    },
    path::{Path, PathBuf},
};

use aya::{
    EbpfLoader,
    maps::{
        Array, ArrayOfMaps, HashMap, Map, MapData, PerCpuArray, PerCpuHashMap, lpm_trie::LpmTrie,
    },
    programs::{SchedClassifier, Xdp},
    util::nr_cpus,
};
use bridge_common::{
    AttachMode, BridgeRecord, ClientHoldKey, ClientPrefix, EgressConfig, Endpoint, EndpointKey,
    Flow, FlowKey, HoldKey, PortRecord, PortStats, PublishedKey, PublishedPort, SocketCounts,
    UplinkMode, memory::flow_table_entries,
};

use super::hooking::Modes;
use crate::{
    error::{Error, Result},
    features::Features,
    pins,
    plan::Plan,
};

/// The compiled kernel programs, built by this crate's build script.
pub static OBJECT: &[u8] = aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/bridge-ebpf"));

/// A pinned attachment, opened: the program and the maps of one bridge.
pub struct Pinned {
    pub bridge: String,
    pub dir: PathBuf,
    /// The identity (device, inode) of the bridge record's pin when opened: a detach removes
    /// it, and a new attach (even into the same directory) pins another.
    pub(super) record_pin_id: (u64, u64),
    pub(super) root: PathBuf,
    pub record: BridgeRecord,
    /// The record's modes, decoded.
    pub modes: Modes,
    /// The kernel's ids of the pinned programs: how their hooks are recognised.
    pub(super) port_program_id: u32,
    pub(super) uplink_program_id: u32,
    pub(super) uplink_xdp_id: Option<u32>,
    pub(super) program: SchedClassifier,
    pub(super) uplink_program: SchedClassifier,
    /// In uplink xdp mode: the XDP program in front of `uplink_program`.
    pub(super) uplink_xdp: Option<Xdp>,
    pub(super) endpoints: HashMap<MapData, EndpointKey, Endpoint>,
    pub(super) ports: HashMap<MapData, u32, PortRecord>,
    pub(super) stats: PerCpuHashMap<MapData, u32, PortStats>,
    pub(super) verdicts: PerCpuArray<MapData, u64>,
    pub(super) published: HashMap<MapData, PublishedKey, PublishedPort>,
    /// The slots of the connection tables (see `NatTables`).
    pub(super) nat_flows_slot: ArrayOfMaps<MapData, MapData>,
    pub(super) nat_transient_slot: ArrayOfMaps<MapData, MapData>,
    pub(super) nat_events: PerCpuArray<MapData, u64>,
    /// The connection tables' sizes, from the bridge record.
    pub(super) capacity: crate::publish::Capacity,
    pub(super) uplinks: HashMap<MapData, u32, PortRecord>,
    pub(super) holds: HashMap<MapData, HoldKey, u8>,
    pub(super) hold_shapes: Array<MapData, u32>,
    pub(super) client_holds: HashMap<MapData, ClientHoldKey, u8>,
    pub(super) client_prefix_holds: LpmTrie<MapData, ClientPrefix, u8>,
    /// The host's own addresses, for the socket programs.
    pub(super) local_addresses: HashMap<MapData, [u8; 4], u8>,
    pub(super) socket_counts: PerCpuHashMap<MapData, PublishedKey, SocketCounts>,
    /// Egress NAT: its settings, the uplinks it may leave by, and the kernel's flows.
    pub(super) egress: Array<MapData, EgressConfig>,
    pub(super) egress_uplinks: HashMap<MapData, u32, [u8; 4]>,
    pub(super) kernel_flows: HashMap<MapData, FlowKey, u8>,
    /// While this attachment replaces one of another layout: that one's hooks, taken over
    /// in place as this one's are made (see `replace`).
    pub(super) adopt: Option<super::replace::Adopt>,
}

pub(super) fn open_pinned<T>(dir: &Path, object_name: &str) -> Result<T>
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
pub(super) struct NatTables {
    /// Established connections (a hash, not preallocated).
    pub flows: FlowTable,
    /// New and closing connections (an LRU, preallocated by the kernel).
    pub transient: FlowTable,
}

/// Makes the two connection tables, `NAT_FLOWS`' with `flow_entries` entries and
/// `NAT_TRANSIENT`'s with `transient_entries`, to be put in their slots: each like its
/// prototype in the object (`FLOW_TABLE`, `TRANSIENT_TABLE`; pinned with the attachment), so
/// that it carries the BTF the slots' templates have.
pub fn new_flow_tables(
    prototypes: [BorrowedFd<'_>; 2],
    flow_entries: u32,
    transient_entries: u32,
) -> Result<(MapData, MapData)> {
    let [flows, transient] = prototypes;
    let create = |prototype, entries, name: &str| {
        let fd = crate::bpf_link::create_like(prototype, entries, name)
            .map_err(|e| Error::io(format!("creating the connection table {name}"), e))?;
        MapData::from_fd(fd)
            .map_err(|e| Error::ebpf(format!("opening the connection table {name}"), e))
    };
    Ok((
        create(flows, flow_entries, "nat_flows")?,
        create(transient, transient_entries, "nat_transient")?,
    ))
}

/// Runs a write into a map whose entries are allocated as they come (`BPF_F_NO_PREALLOC`),
/// retrying it while the kernel reports ENOMEM for a moment: it refills its per-CPU allocation
/// caches (and the per-CPU memory area) asynchronously, and a burst of writes, such as 1000
/// ports at one attach on a busy host, can find them empty. Gives up after about a second.
pub(super) fn allocating<T>(
    mut write: impl FnMut() -> std::result::Result<T, aya::maps::MapError>,
) -> std::result::Result<T, aya::maps::MapError> {
    let mut pause = std::time::Duration::from_millis(1);
    for _ in 0..20 {
        match write() {
            Err(aya::maps::MapError::SyscallError(ref error))
                if error.io_error.raw_os_error() == Some(libc::ENOMEM) =>
            {
                std::thread::sleep(pause);
                pause = (pause * 2).min(std::time::Duration::from_millis(100));
            }
            done => return done,
        }
    }
    write()
}

/// The object's prototypes of the two connection tables (see `new_flow_tables`): one entry
/// each, pinned with the attachment.
pub const FLOW_TABLE_PROTOTYPE: &str = "FLOW_TABLE";
pub const TRANSIENT_TABLE_PROTOTYPE: &str = "TRANSIENT_TABLE";

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

impl Pinned {
    /// The connection tables, when the attachment has them.
    pub(super) fn nat_tables(&self) -> Option<NatTables> {
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
        if self.has_socket_hooks() {
            // (A socket program unpinned behind xbr's back is not counted.)
            programs.extend(
                bridge_common::programs::SOCKET.iter().filter_map(|name| {
                    aya::programs::ProgramInfo::from_pin(self.dir.join(name)).ok()
                }),
            );
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
    pub(super) fn ensure_nat_tables(&mut self) -> Result<()> {
        if self.nat_tables().is_some() {
            return Ok(());
        }
        let (flow_entries, transient_entries) = flow_table_entries(self.record.max_flows);
        let prototype = |object_name| {
            let pin = pins::map_pin(&self.dir, object_name);
            MapData::from_pin(&pin)
                .map_err(|e| Error::ebpf(format!("opening pinned map {}", pin.display()), e))
        };
        let prototypes = [
            prototype(FLOW_TABLE_PROTOTYPE)?,
            prototype(TRANSIENT_TABLE_PROTOTYPE)?,
        ];
        let (flows, transient) = new_flow_tables(
            [prototypes[0].fd().as_fd(), prototypes[1].fd().as_fd()],
            flow_entries,
            transient_entries,
        )?;
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
    pub(super) fn release_unused_nat_tables(&mut self) -> Result<bool> {
        let Some(tables) = self.nat_tables() else {
            return Ok(false);
        };
        let in_use = |table: &FlowTable| table.keys().next().is_some();
        if self.has_published()
            || self.egress_enabled()
            || in_use(&tables.flows)
            || in_use(&tables.transient)
        {
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

    pub fn has_published(&self) -> bool {
        self.published.keys().next().is_some()
    }

    /// Opens the attachment of `bridge`: `NotAttached`, `Incomplete`, `OtherLayout` (pinned by
    /// an xbr whose pinned layout differs from this one's, see `pins::layout_stamp`) or
    /// `BrokenPins` when it cannot.
    pub fn open(root: &Path, bridge: &str) -> Result<Pinned> {
        Self::open_checking(root, bridge, true)
    }

    /// Opens the attachment of `bridge` whatever its layout stamp says (for a detach: what
    /// can be read of another layout is used to take its hooks off).
    pub fn open_any_layout(root: &Path, bridge: &str) -> Result<Pinned> {
        Self::open_checking(root, bridge, false)
    }

    fn open_checking(root: &Path, bridge: &str, check_layout: bool) -> Result<Pinned> {
        Self::open_at(root, bridge, pins::bridge_dir(root, bridge)?, check_layout)
    }

    /// Opens the attachment of `bridge` pinned in `dir` (its own directory, or a replacement
    /// being built, see `replace`).
    pub(super) fn open_at(
        root: &Path,
        bridge: &str,
        dir: PathBuf,
        check_layout: bool,
    ) -> Result<Pinned> {
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
        // The stamp first: another layout's maps may open, and then be misread.
        if check_layout && !pins::layout_pin(&dir).exists() {
            return Err(Error::OtherLayout {
                bridge: bridge.to_owned(),
                found: pins::found_layout(&dir),
                wanted: pins::layout_stamp().to_owned(),
                pins: dir,
            });
        }
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
        let modes = Modes::try_from(&record).map_err(|e| Error::BrokenPins {
            bridge: bridge.to_owned(),
            pins: dir.clone(),
            detail: e.to_string(),
        })?;
        let uplink_xdp = if modes.uplink == UplinkMode::Xdp {
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
            modes,
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
            local_addresses: open_pinned(&dir, "LOCAL_ADDRESSES").map_err(broken)?,
            socket_counts: open_pinned(&dir, "SOCKET_COUNTS").map_err(broken)?,
            egress: open_pinned(&dir, "EGRESS").map_err(broken)?,
            egress_uplinks: open_pinned(&dir, "EGRESS_UPLINKS").map_err(broken)?,
            kernel_flows: open_pinned(&dir, "KERNEL_FLOWS").map_err(broken)?,
            endpoints: open_pinned(&dir, "ENDPOINTS").map_err(broken)?,
            ports: open_pinned(&dir, "PORTS").map_err(broken)?,
            stats: open_pinned(&dir, "PORT_STATS").map_err(broken)?,
            verdicts: open_pinned(&dir, "VERDICTS").map_err(broken)?,
            adopt: None,
            dir,
        })
    }

    /// Loads the programs, pins them and their (empty) maps in `dir`, and opens the result.
    #[allow(clippy::too_many_arguments)]
    pub(super) fn create(
        plan: &Plan,
        mode: AttachMode,
        uplink_mode: UplinkMode,
        max_flows: u32,
        socket_cgroup: Option<&Path>,
        features: &Features,
        root: &Path,
        dir: &Path,
    ) -> Result<Pinned> {
        pins::ensure_bpffs(root)?;
        let dir = dir.to_path_buf();
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
        // Without socket hooks, their maps are never written: one entry each.
        let (local_addresses, socket_counts) =
            bridge_common::memory::socket_hooks_entries(socket_cgroup.is_some());
        loader
            .map_max_entries("LOCAL_ADDRESSES", local_addresses)
            .map_max_entries("SOCKET_COUNTS", socket_counts);
        let mut ebpf = loader
            .load(OBJECT)
            .map_err(|e| Error::ebpf("loading xbr's eBPF object", e))?;
        let mut record = BridgeRecord {
            ifindex: plan.bridge_ifindex,
            attach_mode: mode as u32,
            redirect_peer: u32::from(features.redirect_peer),
            uplink_mode: uplink_mode as u32,
            max_flows,
            masquerade: 0,
            socket_cgroup: 0,
        };

        std::fs::create_dir_all(&dir)
            .map_err(|e| Error::io(format!("creating {}", dir.display()), e))?;
        if let Some(cgroup) = socket_cgroup {
            record.socket_cgroup = super::sockets::hook(&mut ebpf, &dir, cgroup)?;
        }
        let mut bridge: Array<_, BridgeRecord> =
            Array::try_from(ebpf.map_mut("BRIDGE").expect("BRIDGE map"))
                .map_err(|e| Error::ebpf("opening the bridge record", e))?;
        bridge
            .set(0, record, 0)
            .map_err(|e| Error::ebpf("writing the bridge record", e))?;
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
        // The layout's stamp before the bridge record: a whole attachment always has one.
        pins::stamp_layout(&dir)?;
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
        Pinned::open_at(root, &plan.bridge, dir, true)
    }

    /// Whether the attachment this was opened from is still the one pinned: false once a
    /// detach began, also when a new attach pinned a new one under the same name.
    pub fn still_pinned(&self) -> bool {
        std::fs::metadata(self.dir.join(pins::COMPLETE))
            .is_ok_and(|meta| (meta.dev(), meta.ino()) == self.record_pin_id)
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
}

/// The kernel's page size: the smallest ring buffer.
fn page_size() -> u32 {
    // SAFETY: sysconf only reads a system constant.
    let size = unsafe { libc::sysconf(libc::_SC_PAGESIZE) };
    u32::try_from(size).unwrap_or(4096)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn table_sizes_follow_max_flows_and_memory() {
        assert_eq!(flow_table_entries(65536), (131072, 65536));
        let default = default_max_flows();
        assert!(default.is_power_of_two(), "{default}");
        assert!((4096..=65536).contains(&default), "{default}");
    }
}
