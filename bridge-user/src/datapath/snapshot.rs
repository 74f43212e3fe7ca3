//! Reading an attachment back for `status` and `stats`: its records, counters and map
//! contents, and how the kernel's hooks differ from the records.

use std::{
    collections::BTreeMap,
    path::{Path, PathBuf},
};

use bridge_common::{BridgeRecord, Endpoint, EndpointKey, HoldKey, PortRecord, PortStats, Verdict};

use super::{
    hooking::{Modes, xdp_attach_name},
    pinned::Pinned,
};
use crate::{
    error::{Error, Result},
    hooks::Drift,
};

/// A pinned attachment as read back from bpffs.
#[derive(Debug)]
pub struct Attachment {
    pub bridge: String,
    pub dir: PathBuf,
    pub record: BridgeRecord,
    /// The record's modes, decoded.
    pub modes: Modes,
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
    /// The socket programs' cgroup and links, if the attachment has socket hooks.
    pub socket_hooks: Option<super::SocketHooks>,
}

impl Pinned {
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
            modes: self.modes,
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
            socket_hooks: self.socket_hooks(),
        })
    }
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

#[cfg(test)]
mod tests {
    use bridge_common::Verdict;

    /// Where `verdict` must stand in `Verdict::ALL`: its index in the verdicts array. The
    /// match has no catch-all, so a new variant does not compile until it is listed here; then
    /// the test below fails until `ALL` and `COUNT` list it too.
    fn position(verdict: Verdict) -> usize {
        match verdict {
            Verdict::Redirected => 0,
            Verdict::NotUnicast => 1,
            Verdict::NotIp => 2,
            Verdict::VlanTagged => 3,
            Verdict::UnknownDestination => 4,
            Verdict::SamePort => 5,
            Verdict::Malformed => 6,
            Verdict::UnknownSource => 7,
            Verdict::StaleEndpoint => 8,
            Verdict::NatIn => 9,
            Verdict::NatOut => 10,
            Verdict::NatNotTranslated => 11,
            Verdict::NatTableFull => 12,
            Verdict::NatInXdp => 13,
            Verdict::HeldByPolicy => 14,
            Verdict::NotPublished => 15,
            Verdict::EgressOut => 16,
            Verdict::EgressIn => 17,
            Verdict::EgressKernel => 18,
        }
    }

    /// The highest position `position` gives; keep it in step with the match above.
    const LAST: usize = 18;

    #[test]
    fn verdict_all_lists_every_variant_once_at_its_index() {
        assert_eq!(Verdict::ALL.len(), Verdict::COUNT as usize);
        assert_eq!(
            Verdict::COUNT as usize,
            LAST + 1,
            "a variant is missing from ALL"
        );
        for (index, verdict) in Verdict::ALL.iter().enumerate() {
            assert_eq!(*verdict as usize, index, "{verdict:?} is not at its index");
            assert_eq!(position(*verdict), index, "{verdict:?}");
        }
        let mut names: Vec<&str> = Verdict::ALL.iter().map(|v| v.name()).collect();
        names.sort_unstable();
        names.dedup();
        assert_eq!(names.len(), Verdict::ALL.len(), "two verdicts share a name");
    }
}
