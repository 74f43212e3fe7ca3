//! Hooking: putting xbr's programs on bridge ports and uplinks (tcx links, clsact filters,
//! XDP links in front of an uplink's tc program), reading back what the kernel runs there
//! (drift), and taking them off again.

use std::{
    collections::{BTreeMap, BTreeSet},
    path::{Path, PathBuf},
};

use aya::programs::{
    LinkOrder, SchedClassifier, TcAttachType, Xdp, XdpMode,
    links::FdLink,
    tc::{self, NlOptions, TcAttachOptions, TcError},
};
use bridge_common::{AttachMode, BridgeRecord, PortRecord, UplinkMode};
use netlink_packet_route::tc::{TcAttribute, TcHandle};

use super::pinned::Pinned;
use super::pinned::allocating;
use crate::{
    error::{Error, Result},
    hooks::{self, Drift, Observed, Recorded},
    netlink,
    observe::UplinkView,
    pins,
    plan::{Plan, PlannedPort},
};

/// The modes of an attachment, decoded once from its bridge record's raw `u32`s.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Modes {
    pub attach: AttachMode,
    pub uplink: UplinkMode,
}

/// A bridge record with a mode value this xbr does not know.
#[derive(Debug, PartialEq, Eq, thiserror::Error)]
#[error("the bridge record names {what} mode {value}, which this xbr does not know")]
pub struct UnknownMode {
    pub what: &'static str,
    pub value: u32,
}

impl TryFrom<&BridgeRecord> for Modes {
    type Error = UnknownMode;

    fn try_from(record: &BridgeRecord) -> std::result::Result<Modes, UnknownMode> {
        let attach = match record.attach_mode {
            m if m == AttachMode::Tcx as u32 => AttachMode::Tcx,
            m if m == AttachMode::Clsact as u32 => AttachMode::Clsact,
            value => {
                return Err(UnknownMode {
                    what: "attach",
                    value,
                });
            }
        };
        let uplink = match record.uplink_mode {
            // 0: attachments made before XDP mode existed.
            0 => UplinkMode::Tc,
            m if m == UplinkMode::Tc as u32 => UplinkMode::Tc,
            m if m == UplinkMode::Xdp as u32 => UplinkMode::Xdp,
            value => {
                return Err(UnknownMode {
                    what: "uplink",
                    value,
                });
            }
        };
        Ok(Modes { attach, uplink })
    }
}

pub fn uplink_mode_name(mode: UplinkMode) -> &'static str {
    match mode {
        UplinkMode::Xdp => "xdp",
        UplinkMode::Tc => "tc",
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

pub fn mode_name(mode: AttachMode) -> &'static str {
    match mode {
        AttachMode::Tcx => "tcx",
        AttachMode::Clsact => "clsact",
    }
}

/// Which of xbr's two tc programs, and the map that records where it is hooked.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Role {
    /// `port_ingress` on a bridge port; records in PORTS.
    Port,
    /// `uplink_ingress` (and in uplink xdp mode `uplink_xdp`) on an uplink; records in UPLINKS.
    Uplink,
}

impl Pinned {
    /// The records of `role`'s hooks.
    pub(super) fn records(&self, role: Role) -> Result<BTreeMap<u32, PortRecord>> {
        let (map, what) = match role {
            Role::Port => (&self.ports, "reading the ports map"),
            Role::Uplink => (&self.uplinks, "reading the uplinks map"),
        };
        map.iter()
            .collect::<Result<_, _>>()
            .map_err(|e| Error::ebpf(what, e))
    }

    pub(super) fn write_record(
        &mut self,
        role: Role,
        ifindex: u32,
        record: PortRecord,
    ) -> Result<()> {
        let (map, what) = match role {
            Role::Port => (&mut self.ports, "updating the ports map"),
            Role::Uplink => (&mut self.uplinks, "updating the uplinks map"),
        };
        allocating(|| map.insert(ifindex, record, 0)).map_err(|e| Error::ebpf(what, e))
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
    pub(super) fn observe(&self, role: Role, ifindexes: &[u32]) -> Result<Vec<Observed>> {
        let program = self.program_id_of(role);
        match self.modes.attach {
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
    pub(super) fn drift(
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
    pub(super) fn hook_one(
        &mut self,
        role: Role,
        port: &PlannedPort,
        previous: Option<PortRecord>,
        observed: &Observed,
    ) -> Result<PortRecord> {
        if let Some(record) = self.adopt_hook(role, port, previous)? {
            return Ok(record);
        }
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
    pub(super) fn forget(&mut self, ifindex: u32, record: &PortRecord) -> Result<()> {
        if record.endpoint_mac != [0; 6] {
            let silent = PortRecord {
                endpoint_mac: [0; 6],
                endpoint_ipv4: [0; 4],
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
    pub(super) fn remove_leftovers(&mut self) -> Result<usize> {
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
        // A port deleted since the last reconcile has lost its hook with it: stale, not
        // drift (the next reconcile forgets its record).
        let exists = |ifindex: u32| nix::net::if_::if_indextoname(ifindex).is_ok();
        let only = |drifted: BTreeMap<u32, (Drift, Observed)>| {
            drifted
                .into_iter()
                .filter(|(ifindex, _)| exists(*ifindex))
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
        let ports_intact = match self.modes.attach {
            AttachMode::Tcx => self
                .drift(Role::Port, &self.records(Role::Port)?)?
                .is_empty(),
            AttachMode::Clsact => true,
        };
        let uplinks = self.records(Role::Uplink)?;
        let uplinks_intact = match self.modes.attach {
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

    /// Takes `role`'s program off a port: every filter of it (clsact), or the pinned link
    /// (tcx). A port that no longer exists took it along.
    pub(super) fn unhook(&self, role: Role, ifindex: u32, record: &PortRecord) -> Result<()> {
        match self.modes.attach {
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
}

/// Detaches the bpf link pinned at `link_pin` at once, then removes the pin.
pub(super) fn unpin_link(link_pin: &Path, ifindex: u32, what: &str) -> Result<()> {
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

#[cfg(test)]
mod tests {
    use bridge_common::{AttachMode, BridgeRecord, UplinkMode};

    use super::{Modes, UnknownMode};

    fn record(attach_mode: u32, uplink_mode: u32) -> BridgeRecord {
        BridgeRecord {
            attach_mode,
            uplink_mode,
            ..BridgeRecord::default()
        }
    }

    #[test]
    fn a_records_modes_are_decoded_once_and_unknown_values_refused() {
        let decode = |a, u| Modes::try_from(&record(a, u));
        assert_eq!(
            decode(AttachMode::Tcx as u32, UplinkMode::Xdp as u32),
            Ok(Modes {
                attach: AttachMode::Tcx,
                uplink: UplinkMode::Xdp
            })
        );
        // Uplink mode 0: pinned before XDP mode existed, which means tc.
        assert_eq!(
            decode(AttachMode::Clsact as u32, 0),
            Ok(Modes {
                attach: AttachMode::Clsact,
                uplink: UplinkMode::Tc
            })
        );
        assert_eq!(
            decode(7, UplinkMode::Tc as u32),
            Err(UnknownMode {
                what: "attach",
                value: 7
            })
        );
        assert_eq!(
            decode(AttachMode::Tcx as u32, 9),
            Err(UnknownMode {
                what: "uplink",
                value: 9
            })
        );
    }
}
