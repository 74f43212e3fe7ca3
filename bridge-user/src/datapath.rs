//! Apply: bring a bridge's pinned datapath to what the plan wants. A first attach loads the
//! programs and pins them with empty maps; from then on every attach (and every event of a
//! follower) reconciles the pinned state: removals first, then additions, so that at every
//! moment each map entry points at a port that holds it. Also reads the pins back for
//! `status`, `stats` and `detach`.

use std::{
    collections::BTreeMap,
    path::{Path, PathBuf},
};

use aya::{
    EbpfLoader,
    maps::{Array, HashMap, Map, MapData, PerCpuArray, PerCpuHashMap, PerCpuValues},
    programs::{
        LinkOrder, SchedClassifier, TcAttachType, Xdp, XdpMode,
        links::{FdLink, Link as _},
        tc::{
            self, NlOptions, SchedClassifierLink, TcAttachOptions, TcError, TcHandle as AyaTcHandle,
        },
    },
    util::nr_cpus,
};
use bridge_common::{
    AttachMode, BridgeRecord, Endpoint, EndpointKey, Flow, FlowKey, PortRecord, PortStats,
    PublishedKey, PublishedPort, UplinkMode, Verdict,
};
use netlink_packet_route::tc::{TcAttribute, TcHandle};

use crate::{
    error::{Error, Result},
    features::Features,
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
    if let Ok(mut pinned) = Pinned::open(root, &plan.bridge) {
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
        return Ok(pinned.attached(plan, false, changes));
    }
    let dir = pins::bridge_dir(root, &plan.bridge)?;
    if dir.exists() {
        return Err(Error::AlreadyAttached {
            bridge: plan.bridge.clone(),
            pins: dir,
        });
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
    let attached = pinned.reconcile(plan, true).and_then(|mut changes| {
        changes.uplinks_added = pinned.hook_uplinks(plan, uplinks)?;
        Ok(changes)
    });
    match attached {
        Ok(changes) => Ok(pinned.attached(plan, true, changes)),
        Err(error) => {
            let _ = pinned.detach();
            Err(error)
        }
    }
}

/// A pinned attachment, opened: the program and the maps of one bridge.
pub struct Pinned {
    pub bridge: String,
    pub dir: PathBuf,
    root: PathBuf,
    pub record: BridgeRecord,
    program: SchedClassifier,
    uplink_program: SchedClassifier,
    /// In uplink xdp mode: the XDP program in front of `uplink_program`.
    uplink_xdp: Option<Xdp>,
    endpoints: HashMap<MapData, EndpointKey, Endpoint>,
    ports: HashMap<MapData, u32, PortRecord>,
    stats: PerCpuHashMap<MapData, u32, PortStats>,
    verdicts: PerCpuArray<MapData, u64>,
    pub(crate) published: HashMap<MapData, PublishedKey, PublishedPort>,
    /// Established NATed connections, and the transient ones (new, or closing).
    pub(crate) flows: HashMap<MapData, FlowKey, Flow>,
    pub(crate) transient: HashMap<MapData, FlowKey, Flow>,
    pub(crate) nat_events: PerCpuArray<MapData, u64>,
    /// The connection tables' sizes, from the pinned maps.
    pub(crate) capacity: crate::publish::Capacity,
    uplinks: HashMap<MapData, u32, PortRecord>,
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

/// How many entries the pinned map `object_name` holds at most.
fn map_capacity(dir: &Path, object_name: &str) -> Result<usize> {
    let path = pins::map_pin(dir, object_name);
    let info = aya::maps::MapInfo::from_pin(&path)
        .map_err(|e| Error::ebpf(format!("reading pinned map {}", path.display()), e))?;
    Ok(info.max_entries() as usize)
}

/// The connection tables' sizes (`xbr attach --max-flows`): `NAT_FLOWS` holds `max_flows`
/// established connections, `NAT_TRANSIENT` half as many transient ones; two entries each.
pub fn flow_table_entries(max_flows: u32) -> (u32, u32) {
    (max_flows * 2, max_flows)
}

/// The established connections a new attachment holds when `--max-flows` is not given:
/// 65536 (28 MB of kernel memory), less on a host with under 15 GB of memory, so that the
/// tables take at most 1/512 of it, and never fewer than 4096. A connection of capacity costs
/// 432 bytes: two entries of 144 bytes (key, value and the kernel's element header, as
/// `bpftool map show` reports for a preallocated hash) in `NAT_FLOWS`, one in `NAT_TRANSIENT`.
pub fn default_max_flows() -> u32 {
    const BYTES_PER_CONNECTION: u64 = 432;
    // SAFETY: sysinfo fills the struct it is given.
    let memory = unsafe {
        let mut info: libc::sysinfo = std::mem::zeroed();
        if libc::sysinfo(&mut info) == 0 {
            info.totalram as u64 * u64::from(info.mem_unit)
        } else {
            u64::MAX
        }
    };
    let fits = memory / 512 / BYTES_PER_CONNECTION;
    let fits = u32::try_from(fits).unwrap_or(u32::MAX);
    // A power of two, like the kernel's own table sizes.
    let rounded = fits.checked_ilog2().map_or(1, |log| 1 << log);
    rounded.clamp(4096, 65536)
}

/// The smallest and largest `--max-flows`.
pub const MIN_MAX_FLOWS: u32 = 16;
pub const MAX_MAX_FLOWS: u32 = 1 << 22;

impl Pinned {
    pub fn open(root: &Path, bridge: &str) -> Result<Pinned> {
        let dir = pins::bridge_dir(root, bridge)?;
        if !dir.exists() {
            return Err(Error::NotAttached {
                bridge: bridge.to_owned(),
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
        Ok(Pinned {
            bridge: bridge.to_owned(),
            root: root.to_owned(),
            record,
            program,
            uplink_program,
            uplink_xdp,
            published: open_pinned(&dir, "PUBLISHED").map_err(broken)?,
            flows: open_pinned(&dir, "NAT_FLOWS").map_err(broken)?,
            transient: open_pinned(&dir, "NAT_TRANSIENT").map_err(broken)?,
            nat_events: open_pinned(&dir, "NAT_EVENTS").map_err(broken)?,
            capacity: crate::publish::Capacity {
                established: map_capacity(&dir, "NAT_FLOWS").map_err(broken)? / 2,
                transient: map_capacity(&dir, "NAT_TRANSIENT").map_err(broken)? / 2,
            },
            uplinks: open_pinned(&dir, "UPLINKS").map_err(broken)?,
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
        let (flow_entries, transient_entries) = flow_table_entries(max_flows);
        let mut ebpf = EbpfLoader::new()
            .override_global("REDIRECT_PEER", &u8::from(features.redirect_peer), true)
            .override_global(aya_log::LEVEL, &log_level, true)
            .map_max_entries("NAT_FLOWS", flow_entries)
            .map_max_entries("NAT_TRANSIENT", transient_entries)
            .load(OBJECT)
            .map_err(|e| Error::ebpf("loading xbr's eBPF object", e))?;
        let record = BridgeRecord {
            ifindex: plan.bridge_ifindex,
            attach_mode: mode as u32,
            redirect_peer: u32::from(features.redirect_peer),
            uplink_mode: uplink_mode as u32,
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
        for (object_name, _) in pins::MAPS {
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
    pub fn reconcile(&mut self, plan: &Plan, strict: bool) -> Result<Changes> {
        let mut changes = Changes::default();
        let current: BTreeMap<u32, PortRecord> = self
            .ports
            .iter()
            .collect::<Result<_, _>>()
            .map_err(|e| Error::ebpf("reading the ports map", e))?;
        let wanted_mac = &plan.port_macs;
        let wanted: BTreeMap<u32, &PlannedPort> =
            plan.ports.iter().map(|p| (p.ifindex, p)).collect();

        // 1. Ports that left: their record goes first, which alone stops redirects to them.
        for (ifindex, record) in &current {
            if !wanted.contains_key(ifindex) {
                self.ports
                    .remove(ifindex)
                    .map_err(|e| Error::ebpf("updating the ports map", e))?;
                self.unhook(*ifindex, record, &pins::link_pin(&self.dir, *ifindex))?;
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
        // 3. Endpoint entries the plan does not have, or has on another port.
        let stale: Vec<EndpointKey> = self
            .endpoints
            .iter()
            .filter_map(|entry| entry.ok())
            .filter(|(key, endpoint)| plan.endpoints.get(key) != Some(endpoint))
            .map(|(key, _)| key)
            .collect();
        for key in stale {
            self.endpoints
                .remove(&key)
                .map_err(|e| Error::ebpf("updating the endpoints map", e))?;
            changes.endpoints_removed += 1;
        }
        // 4. New ports: counters, hook, then the record that lets frames be delivered there.
        let cpus =
            nr_cpus().map_err(|(what, e)| Error::io(format!("counting CPUs ({what})"), e))?;
        let new_ports: Vec<&PlannedPort> = wanted
            .iter()
            .filter(|(ifindex, _)| !current.contains_key(ifindex))
            .map(|(_, port)| *port)
            .collect();
        for port in &new_ports {
            let zeros = PerCpuValues::try_from(vec![PortStats::default(); cpus])
                .map_err(|e| Error::ebpf("preparing port counters", e))?;
            self.stats
                .insert(port.ifindex, zeros, 0)
                .map_err(|e| Error::ebpf("adding port counters", e))?;
        }
        let mut failure = None;
        for (port, hooked) in new_ports.iter().zip(self.hook_all(plan, &new_ports)) {
            match hooked {
                Ok(mut record) => {
                    record.endpoint_mac =
                        wanted_mac.get(&port.ifindex).copied().unwrap_or_default();
                    self.ports
                        .insert(port.ifindex, record, 0)
                        .map_err(|e| Error::ebpf("updating the ports map", e))?;
                    changes.ports_added.push(port.name.clone());
                }
                Err(error) => {
                    let _ = self.stats.remove(&port.ifindex);
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
        if let Some(error) = failure {
            return Err(error);
        }
        // 5. Endpoints, last: every port they name now holds them.
        let hooked: std::collections::BTreeSet<u32> =
            self.ports.keys().filter_map(|k| k.ok()).collect();
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
        // 6. Published ports follow their container to its current port and MAC.
        if let Some(containers) = &plan.containers {
            changes.published_updated = self.update_published(containers, plan.bridge_mac)?;
        }
        Ok(changes)
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

    /// Hooks the program to each port, one by one: a tcx attach waits for an RCU grace
    /// period under the RTNL lock (~15 ms here), so threads would not make it faster.
    fn hook_all(&mut self, plan: &Plan, ports: &[&PlannedPort]) -> Vec<Result<PortRecord>> {
        let mode = self.mode();
        ports
            .iter()
            .map(|port| {
                let pin = pins::link_pin(&self.dir, port.ifindex);
                hook(&mut self.program, mode, &pin, &plan.bridge, port)
            })
            .collect()
    }

    /// Takes the program off a port. A port that no longer exists took it along.
    fn unhook(&self, ifindex: u32, record: &PortRecord, link_pin: &Path) -> Result<()> {
        match self.mode() {
            AttachMode::Tcx => unpin_link(link_pin, ifindex, "tcx"),
            AttachMode::Clsact => remove_clsact_filter(ifindex, record),
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
            nat: self.nat_state(),
        })
    }

    /// Hooks the uplink program to uplinks not hooked yet; returns their names.
    pub fn hook_uplinks(&mut self, plan: &Plan, uplinks: &[UplinkView]) -> Result<Vec<String>> {
        let mut added = Vec::new();
        let mode = self.mode();
        for uplink in uplinks {
            if self.uplinks.get(&uplink.ifindex, 0).is_ok() {
                continue;
            }
            let port = PlannedPort {
                name: uplink.name.clone(),
                ifindex: uplink.ifindex,
            };
            let pin = pins::uplink_pin(&self.dir, uplink.ifindex);
            let mut record = hook(&mut self.uplink_program, mode, &pin, &plan.bridge, &port)?;
            if let Some(xdp) = &mut self.uplink_xdp {
                let xdp_pin = pins::uplink_xdp_pin(&self.dir, uplink.ifindex);
                match hook_xdp(xdp, &xdp_pin, &port) {
                    Ok(flags) => record.flags |= flags,
                    Err(error) => {
                        let _ = self.unhook(uplink.ifindex, &record, &pin);
                        return Err(error);
                    }
                }
            }
            self.uplinks
                .insert(uplink.ifindex, record, 0)
                .map_err(|e| Error::ebpf("updating the uplinks map", e))?;
            added.push(uplink.name.clone());
        }
        Ok(added)
    }

    /// The hooked uplinks' ifindexes.
    pub fn uplink_ifindexes(&self) -> Vec<u32> {
        self.uplinks.keys().filter_map(|k| k.ok()).collect()
    }

    /// Removes everything: hooks, qdiscs xbr added, pins.
    pub fn detach(self) -> Result<Detached> {
        let ports: Vec<(u32, PortRecord)> = self.ports.iter().filter_map(|e| e.ok()).collect();
        for (ifindex, record) in &ports {
            self.unhook(*ifindex, record, &pins::link_pin(&self.dir, *ifindex))?;
        }
        let uplinks: Vec<(u32, PortRecord)> = self.uplinks.iter().filter_map(|e| e.ok()).collect();
        for (ifindex, record) in &uplinks {
            // XDP first: it runs in front of the tc program.
            if xdp_attach_name(record.flags).is_some() {
                unpin_link(&pins::uplink_xdp_pin(&self.dir, *ifindex), *ifindex, "XDP")?;
            }
            self.unhook(*ifindex, record, &pins::uplink_pin(&self.dir, *ifindex))?;
        }
        pins::remove(&self.dir, &self.root)?;
        Ok(Detached {
            dir: self.dir.clone(),
            ports: ports.len(),
        })
    }
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
    /// NATed connections now, the tables' sizes, and what happened to connections.
    pub nat: crate::publish::NatState,
}

pub fn read(root: &Path, bridge: &str) -> Result<Attachment> {
    Pinned::open(root, bridge)?.snapshot()
}

/// What detach removed.
#[derive(Debug)]
pub struct Detached {
    pub dir: PathBuf,
    pub ports: usize,
}

/// Removes the attachment of `bridge`. Pins that are not a whole attachment (an attach
/// killed half-way) are removed as they are: tcx links go with their pins.
pub fn detach(root: &Path, bridge: &str) -> Result<Detached> {
    match Pinned::open(root, bridge) {
        Ok(pinned) => pinned.detach(),
        Err(Error::BrokenPins { pins: dir, .. }) => {
            pins::remove(&dir, root)?;
            Ok(Detached { dir, ports: 0 })
        }
        Err(error) => Err(error),
    }
}

/// Deletes the clsact qdisc of `ifindex` (and with it every filter on it).
fn delete_clsact(ifindex: u32) -> Result<()> {
    netlink::run(|handle| async move {
        let mut request = handle.qdisc().del(ifindex as i32);
        let message = request.message_mut();
        message.header.parent = TcHandle::CLSACT;
        message.header.handle = TcHandle::from(0xffff_0000);
        message
            .attributes
            .push(TcAttribute::Kind("clsact".to_owned()));
        request.execute().await
    })
    .map_err(|e| Error::io("opening a netlink socket", e))?
    .map_err(|e| Error::netlink(format!("deleting the clsact qdisc of ifindex {ifindex}"), e))
}

fn remove_clsact_filter(ifindex: u32, record: &PortRecord) -> Result<()> {
    let Ok(name) = nix::net::if_::if_indextoname(ifindex) else {
        return Ok(()); // the port is gone, and its qdisc with it
    };
    let name = name.to_string_lossy().into_owned();
    if record.flags & PortRecord::ADDED_CLSACT != 0 {
        // Deleting the qdisc xbr added removes our filter with it.
        return match delete_clsact(ifindex) {
            Err(Error::Netlink {
                source: rtnetlink::Error::NetlinkError(e),
                ..
            }) if e.raw_code() == -libc::ENODEV
                || e.raw_code() == -libc::EINVAL
                || e.raw_code() == -libc::ENOENT =>
            {
                Ok(())
            }
            other => other,
        };
    }
    let filter = SchedClassifierLink::attached(
        &name,
        TcAttachType::Ingress,
        record.tc_priority as u16,
        AyaTcHandle::from(record.tc_handle),
        None,
    )
    .map_err(|e| Error::io(format!("finding the filter on {name}"), e))?;
    match filter.detach() {
        Ok(()) => Ok(()),
        // Already gone (someone flushed the qdisc): nothing left to remove.
        Err(e) if e.to_string().contains("No such file") => Ok(()),
        Err(e) => Err(Error::ebpf(format!("removing xbr's filter from {name}"), e)),
    }
}
