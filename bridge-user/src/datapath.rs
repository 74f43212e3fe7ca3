//! Apply: load the programs, fill the maps, attach to the ports and pin it all — or, on any
//! failure, undo every step so that a failed attach leaves the machine as it was. Also reads
//! pinned attachments back for `status`, `stats` and `detach`.

use std::{
    collections::BTreeMap,
    path::{Path, PathBuf},
};

use aya::{
    Ebpf, EbpfLoader,
    maps::{Array, HashMap, Map, MapData, PerCpuArray, PerCpuHashMap, PerCpuValues},
    programs::{
        LinkOrder, SchedClassifier, TcAttachType,
        links::{FdLink, PinnedLink},
        tc::{self, NlOptions, SchedClassifierLink, TcAttachOptions, TcError},
    },
    util::nr_cpus,
};
use bridge_common::{
    AttachMode, BridgeRecord, Endpoint, EndpointKey, PortRecord, PortStats, Verdict,
};
use netlink_packet_route::tc::{TcAttribute, TcHandle};

use crate::{
    error::{Error, Result},
    features::Features,
    netlink, pins,
    plan::Plan,
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

pub fn mode_name(mode: u32) -> &'static str {
    match mode {
        m if m == AttachMode::Tcx as u32 => "tcx",
        m if m == AttachMode::Clsact as u32 => "clsact",
        _ => "unknown",
    }
}

/// Everything a finished attach did, for the CLI to report.
#[derive(Debug)]
pub struct Attached {
    pub dir: PathBuf,
    pub mode: AttachMode,
    pub ports: usize,
    pub endpoints: usize,
}

/// What to undo if attach fails part-way. Each step registers its undo before the next one.
#[derive(Default)]
struct Undo {
    pin_dir: Option<(PathBuf, PathBuf)>,
    /// tcx links not pinned yet, by port ifindex; dropping one detaches it.
    tcx_links: Vec<(u32, FdLink)>,
    /// tcx links pinned so far; dropped after their pins are removed, they detach.
    tcx_pinned: Vec<PinnedLink>,
    clsact_filters: Vec<SchedClassifierLink>,
    clsact_qdiscs: Vec<u32>,
}

impl Undo {
    fn run(mut self) {
        // Pins first: a pinned link would keep its program attached.
        if let Some((dir, root)) = self.pin_dir.take() {
            let _ = pins::remove(&dir, &root);
        }
        drop(std::mem::take(&mut self.tcx_links));
        drop(std::mem::take(&mut self.tcx_pinned));
        for filter in self.clsact_filters.drain(..) {
            let _ = aya::programs::links::Link::detach(filter);
        }
        for ifindex in std::mem::take(&mut self.clsact_qdiscs) {
            let _ = delete_clsact(ifindex);
        }
    }

    /// Attach succeeded: the pins own the tcx links; a clsact filter lives in its qdisc, so
    /// letting go of its handle without detaching keeps it attached.
    fn commit(mut self) {
        self.tcx_pinned.clear();
        for filter in self.clsact_filters.drain(..) {
            std::mem::forget(filter);
        }
    }
}

pub fn attach(plan: &Plan, mode: AttachMode, features: &Features, root: &Path) -> Result<Attached> {
    pins::ensure_bpffs(root)?;
    let dir = pins::bridge_dir(root, &plan.bridge)?;
    if dir.exists() {
        return Err(Error::AlreadyAttached {
            bridge: plan.bridge.clone(),
            pins: dir,
        });
    }
    // Registered up front: a failure also prunes the root and namespace directories that
    // ensure_bpffs or the pinning may have created.
    let mut undo = Undo {
        pin_dir: Some((dir.clone(), root.to_owned())),
        ..Undo::default()
    };
    match attach_steps(plan, mode, features, &dir, &mut undo) {
        Ok(attached) => {
            undo.commit();
            Ok(attached)
        }
        Err(error) => {
            undo.run();
            Err(error)
        }
    }
}

fn attach_steps(
    plan: &Plan,
    mode: AttachMode,
    features: &Features,
    dir: &Path,
    undo: &mut Undo,
) -> Result<Attached> {
    let mut ebpf = EbpfLoader::new()
        .override_global("REDIRECT_PEER", &u8::from(features.redirect_peer), true)
        .load(OBJECT)
        .map_err(|e| Error::ebpf("loading xbr's eBPF object", e))?;
    fill_maps(&mut ebpf, plan, mode, features)?;

    let program: &mut SchedClassifier = program_mut(&mut ebpf)?;
    program
        .load()
        .map_err(|e| Error::ebpf("loading the port program into the kernel", e))?;
    let mut port_records = Vec::new();
    for port in &plan.ports {
        let record = attach_port(program, plan, port, mode, undo)?;
        port_records.push((port.ifindex, record));
    }
    let mut ports: HashMap<_, u32, PortRecord> = typed_map(&mut ebpf, "PORTS")?;
    for (ifindex, record) in port_records {
        ports
            .insert(ifindex, record, 0)
            .map_err(|e| Error::ebpf("filling the ports map", e))?;
    }

    std::fs::create_dir_all(dir)
        .map_err(|e| Error::io(format!("creating {}", dir.display()), e))?;
    for (object_name, _) in pins::MAPS {
        let map = ebpf.map(object_name).expect("map defined by the object");
        map.pin(pins::map_pin(dir, object_name)).map_err(|e| {
            Error::ebpf(format!("pinning map {object_name} in {}", dir.display()), e)
        })?;
    }
    program_mut(&mut ebpf)?
        .pin(dir.join(pins::PROGRAM))
        .map_err(|e| Error::ebpf(format!("pinning the program in {}", dir.display()), e))?;
    for (ifindex, link) in std::mem::take(&mut undo.tcx_links) {
        let pinned = link
            .pin(pins::link_pin(dir, ifindex))
            .map_err(|e| Error::ebpf(format!("pinning the tcx link of ifindex {ifindex}"), e))?;
        undo.tcx_pinned.push(pinned);
    }
    Ok(Attached {
        dir: dir.to_owned(),
        mode,
        ports: plan.ports.len(),
        endpoints: plan.endpoints.len(),
    })
}

fn attach_port(
    program: &mut SchedClassifier,
    plan: &Plan,
    port: &crate::plan::PlannedPort,
    mode: AttachMode,
    undo: &mut Undo,
) -> Result<PortRecord> {
    // Attach goes by name: make sure the name still means the port we planned for.
    let vanished = || Error::PortVanished {
        bridge: plan.bridge.clone(),
        port: port.name.clone(),
    };
    if nix::net::if_::if_nametoindex(port.name.as_str()).ok() != Some(port.ifindex) {
        return Err(vanished());
    }
    let attach_error = |e: aya::programs::ProgramError| {
        if nix::net::if_::if_nametoindex(port.name.as_str()).ok() != Some(port.ifindex) {
            vanished()
        } else {
            Error::ebpf(
                format!("attaching to port {} of {}", port.name, plan.bridge),
                e,
            )
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
            undo.tcx_links.push((port.ifindex, link));
        }
        AttachMode::Clsact => {
            match tc::qdisc_add_clsact(&port.name) {
                Ok(()) => {
                    undo.clsact_qdiscs.push(port.ifindex);
                    record.flags |= PortRecord::ADDED_CLSACT;
                }
                Err(TcError::NetlinkError(e)) if e.raw_os_error() == Some(libc::EEXIST) => {}
                Err(e) => return Err(attach_error(e.into())),
            }
            let id = program
                .attach_with_options(
                    &port.name,
                    TcAttachType::Ingress,
                    TcAttachOptions::Netlink(NlOptions::default()),
                )
                .map_err(attach_error)?;
            let link = program.take_link(id).map_err(attach_error)?;
            record.tc_priority = u32::from(link.priority().map_err(attach_error)?);
            record.tc_handle = u32::from(link.handle().map_err(attach_error)?);
            undo.clsact_filters.push(link);
        }
    }
    Ok(record)
}

fn fill_maps(ebpf: &mut Ebpf, plan: &Plan, mode: AttachMode, features: &Features) -> Result<()> {
    let mut endpoints: HashMap<_, EndpointKey, Endpoint> = typed_map(ebpf, "ENDPOINTS")?;
    for (key, endpoint) in &plan.endpoints {
        endpoints
            .insert(key, endpoint, 0)
            .map_err(|e| Error::ebpf("filling the endpoints map", e))?;
    }
    let cpus = nr_cpus().map_err(|(what, e)| Error::io(format!("counting CPUs ({what})"), e))?;
    let mut stats: PerCpuHashMap<_, u32, PortStats> = typed_map(ebpf, "PORT_STATS")?;
    for port in &plan.ports {
        let zeros = PerCpuValues::try_from(vec![PortStats::default(); cpus])
            .map_err(|e| Error::ebpf("preparing port counters", e))?;
        stats
            .insert(port.ifindex, zeros, 0)
            .map_err(|e| Error::ebpf("filling the port counters map", e))?;
    }
    let mut bridge: Array<_, BridgeRecord> = typed_map(ebpf, "BRIDGE")?;
    let record = BridgeRecord {
        ifindex: plan.bridge_ifindex,
        attach_mode: mode as u32,
        redirect_peer: u32::from(features.redirect_peer),
        _pad: 0,
    };
    bridge
        .set(0, record, 0)
        .map_err(|e| Error::ebpf("writing the bridge record", e))
}

fn program_mut(ebpf: &mut Ebpf) -> Result<&mut SchedClassifier> {
    ebpf.program_mut(pins::PROGRAM)
        .expect("program defined by the object")
        .try_into()
        .map_err(|e| Error::ebpf("the port program is not a classifier", e))
}

fn typed_map<'a, T>(ebpf: &'a mut Ebpf, name: &str) -> Result<T>
where
    T: TryFrom<&'a mut Map, Error = aya::maps::MapError>,
{
    let map = ebpf.map_mut(name).expect("map defined by the object");
    T::try_from(map).map_err(|e| Error::ebpf(format!("opening map {name}"), e))
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
}

fn open_pinned(dir: &Path, object_name: &str) -> Result<Map> {
    let path = pins::map_pin(dir, object_name);
    let data = MapData::from_pin(&path)
        .map_err(|e| Error::ebpf(format!("opening pinned map {}", path.display()), e))?;
    Map::from_map_data(data).map_err(|e| Error::ebpf(format!("opening {}", path.display()), e))
}

pub fn read(root: &Path, bridge: &str) -> Result<Attachment> {
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
    let as_error = |what: &str, e: aya::maps::MapError| broken(Error::ebpf(what.to_owned(), e));

    let map = open_pinned(&dir, "BRIDGE").map_err(broken)?;
    let record = Array::<_, BridgeRecord>::try_from(map)
        .and_then(|a| a.get(&0, 0))
        .map_err(|e| as_error("reading the bridge record", e))?;

    let map = open_pinned(&dir, "PORTS").map_err(broken)?;
    let ports = HashMap::<_, u32, PortRecord>::try_from(map)
        .map_err(|e| as_error("opening the ports map", e))?
        .iter()
        .collect::<Result<BTreeMap<_, _>, _>>()
        .map_err(|e| as_error("reading the ports map", e))?;

    let map = open_pinned(&dir, "ENDPOINTS").map_err(broken)?;
    let endpoints = HashMap::<_, EndpointKey, Endpoint>::try_from(map)
        .map_err(|e| as_error("opening the endpoints map", e))?
        .iter()
        .collect::<Result<BTreeMap<_, _>, _>>()
        .map_err(|e| as_error("reading the endpoints map", e))?;

    let map = open_pinned(&dir, "PORT_STATS").map_err(broken)?;
    let mut stats = BTreeMap::new();
    for entry in PerCpuHashMap::<_, u32, PortStats>::try_from(map)
        .map_err(|e| as_error("opening the port counters", e))?
        .iter()
    {
        let (ifindex, per_cpu) = entry.map_err(|e| as_error("reading the port counters", e))?;
        let mut total = PortStats::default();
        for value in per_cpu.iter() {
            total.add(value);
        }
        stats.insert(ifindex, total);
    }

    let map = open_pinned(&dir, "VERDICTS").map_err(broken)?;
    let counters =
        PerCpuArray::<_, u64>::try_from(map).map_err(|e| as_error("opening the verdicts", e))?;
    let mut verdicts = Vec::new();
    for verdict in Verdict::ALL {
        let per_cpu = counters
            .get(&(verdict as u32), 0)
            .map_err(|e| as_error("reading the verdicts", e))?;
        verdicts.push((verdict, per_cpu.iter().sum()));
    }
    Ok(Attachment {
        bridge: bridge.to_owned(),
        dir,
        record,
        ports,
        endpoints,
        stats,
        verdicts,
    })
}

/// What detach removed.
#[derive(Debug)]
pub struct Detached {
    pub dir: PathBuf,
    pub ports: usize,
}

/// Removes the attachment of `bridge`: its filters or links, the qdiscs xbr added, and every
/// pin. Ports that no longer exist took their filters with them.
pub fn detach(root: &Path, bridge: &str) -> Result<Detached> {
    let attachment = read(root, bridge);
    let dir = pins::bridge_dir(root, bridge)?;
    let ports = match &attachment {
        Ok(attachment) if attachment.record.attach_mode == AttachMode::Clsact as u32 => {
            for (ifindex, record) in &attachment.ports {
                remove_clsact_filter(*ifindex, record)?;
            }
            attachment.ports.len()
        }
        Ok(attachment) => attachment.ports.len(),
        Err(Error::NotAttached { .. }) => return Err(attachment.unwrap_err()),
        // Unreadable bookkeeping: remove what is pinned; tcx links go with their pins.
        Err(_) => 0,
    };
    // Unpinning a tcx link drops its last reference: the kernel detaches the program.
    pins::remove(&dir, root)?;
    Ok(Detached { dir, ports })
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
            }) if e.raw_code() == -libc::ENODEV || e.raw_code() == -libc::EINVAL => Ok(()),
            other => other,
        };
    }
    let filter = SchedClassifierLink::attached(
        &name,
        TcAttachType::Ingress,
        record.tc_priority as u16,
        aya::programs::tc::TcHandle::from(record.tc_handle),
        None,
    )
    .map_err(|e| Error::io(format!("finding the filter on {name}"), e))?;
    match aya::programs::links::Link::detach(filter) {
        Ok(()) => Ok(()),
        // Already gone (someone flushed the qdisc): nothing left to remove.
        Err(e) if e.to_string().contains("No such file") => Ok(()),
        Err(e) => Err(Error::ebpf(format!("removing xbr's filter from {name}"), e)),
    }
}
