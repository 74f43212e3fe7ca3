//! Egress NAT in the pins: the decision (`crate::egress`) written for the datapath, the
//! kernel's flows kept current, and the request of `xbr attach --masquerade` recorded.

use std::{collections::BTreeSet, net::Ipv4Addr};

use aya::maps::Array;
use bridge_common::{BridgeRecord, EgressConfig, Flow, FlowKey};

use super::Pinned;
use crate::{
    egress::Egress,
    error::{Error, Result},
    pins,
};

/// What applying an egress decision changed.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct EgressApplied {
    /// Egress went from the kernel path to the datapath (or back).
    pub turned_on: bool,
    pub turned_off: bool,
    /// Tuples now left to the kernel path, and tuples no longer (their flows ended).
    pub kernel_flows_added: usize,
    pub kernel_flows_removed: usize,
    /// Translated flows ended because egress turned off.
    pub flows_ended: usize,
}

impl Pinned {
    /// Whether `xbr attach --masquerade` asked for egress NAT on this bridge.
    pub fn masquerade_requested(&self) -> bool {
        self.record.masquerade != 0
    }

    /// Records `xbr attach --masquerade` in the bridge record.
    pub fn request_masquerade(&mut self) -> Result<()> {
        if self.masquerade_requested() {
            return Ok(());
        }
        let pin = pins::map_pin(&self.dir, "BRIDGE");
        let mut record_map: Array<_, BridgeRecord> =
            super::pinned::open_pinned(&self.dir, "BRIDGE")?;
        let record = BridgeRecord {
            masquerade: 1,
            ..self.record
        };
        record_map
            .set(0, record, 0)
            .map_err(|e| Error::ebpf(format!("writing the bridge record {}", pin.display()), e))?;
        self.record = record;
        Ok(())
    }

    /// The datapath's egress settings now (all zero: egress is the kernel's).
    pub fn egress_config(&self) -> EgressConfig {
        self.egress.get(&0, 0).unwrap_or_default()
    }

    pub fn egress_enabled(&self) -> bool {
        self.egress_config().enabled != 0
    }

    /// Brings the datapath to `egress`, with `kernel_flows` the tuples the kernel path owns
    /// now. Turning on, everything the datapath reads is in place before the switch; turning
    /// off, the switch goes first. Flows already translated keep going either way, until
    /// they end or expire (the kernel has no state for them).
    pub fn apply_egress(
        &mut self,
        egress: &Egress,
        kernel_flows: &BTreeSet<FlowKey>,
    ) -> Result<EgressApplied> {
        let was_on = self.egress_enabled();
        let wanted = egress.config(self.record.ifindex);
        let mut applied = EgressApplied::default();
        if wanted.enabled == 0 {
            if was_on || self.egress_config() != wanted {
                self.write_egress_config(wanted)?;
            }
            applied.turned_off = was_on;
            // The flows xbr translated end with it: the kernel path has no state for them,
            // and whatever turned egress off (a rule now holding it, Docker's settings) would
            // apply to them there. (Only then: the walk costs a pass over both tables.)
            if was_on {
                applied.flows_ended = self.retire_flows(|_, flow| flow.flags & Flow::EGRESS != 0);
            }
            self.sync_egress_uplinks(&[])?;
            applied.kernel_flows_removed = self.sync_kernel_flows(&BTreeSet::new())?.1;
            self.release_unused_nat_tables()?;
            return Ok(applied);
        }
        self.ensure_nat_tables()?;
        (applied.kernel_flows_added, applied.kernel_flows_removed) =
            self.sync_kernel_flows(kernel_flows)?;
        self.sync_egress_uplinks(&egress.uplink_addresses())?;
        if self.egress_config() != wanted {
            self.write_egress_config(wanted)?;
        }
        applied.turned_on = !was_on;
        Ok(applied)
    }

    /// Adds tuples the kernel path owns (without removing any): for flows that began while
    /// egress was being turned on. A full map (`MAX_KERNEL_FLOWS`) takes no more: the flows
    /// left out are warned of; TCP ones stay the kernel's anyway (egress takes only SYNs).
    pub fn add_kernel_flows(&mut self, kernel_flows: &BTreeSet<FlowKey>) -> Result<usize> {
        let present: BTreeSet<FlowKey> = self.kernel_flows.keys().filter_map(|k| k.ok()).collect();
        let mut added = 0;
        let mut left_out = 0;
        for key in kernel_flows.difference(&present) {
            match self.kernel_flows.insert(key, 1, 0) {
                Ok(()) => added += 1,
                Err(aya::maps::MapError::SyscallError(e))
                    if e.io_error.raw_os_error() == Some(libc::E2BIG) =>
                {
                    left_out += 1;
                }
                Err(e) => return Err(Error::ebpf("writing the kernel's flows for egress", e)),
            }
        }
        if left_out > 0 {
            tracing::warn!(
                bridge = %self.bridge,
                left_out,
                "the kernel's flows outnumber what egress can track ({}): egress may take \
                 later datagrams of UDP flows that began on the kernel path",
                bridge_common::MAX_KERNEL_FLOWS
            );
        }
        Ok(added)
    }

    fn write_egress_config(&mut self, config: EgressConfig) -> Result<()> {
        self.egress
            .set(0, config, 0)
            .map_err(|e| Error::ebpf("writing the egress settings", e))
    }

    fn sync_egress_uplinks(&mut self, wanted: &[(u32, Ipv4Addr)]) -> Result<()> {
        let present: Vec<(u32, [u8; 4])> =
            self.egress_uplinks.iter().filter_map(|e| e.ok()).collect();
        for (ifindex, address) in wanted {
            if !present.contains(&(*ifindex, address.octets())) {
                self.egress_uplinks
                    .insert(ifindex, address.octets(), 0)
                    .map_err(|e| Error::ebpf("writing egress's uplinks", e))?;
            }
        }
        for (ifindex, _) in present {
            if !wanted.iter().any(|(wanted, _)| *wanted == ifindex) {
                let _ = self.egress_uplinks.remove(&ifindex);
            }
        }
        Ok(())
    }

    /// Makes `KERNEL_FLOWS` hold exactly `wanted`: (added, removed).
    fn sync_kernel_flows(&mut self, wanted: &BTreeSet<FlowKey>) -> Result<(usize, usize)> {
        let added = self.add_kernel_flows(wanted)?;
        let stale: Vec<FlowKey> = self
            .kernel_flows
            .keys()
            .filter_map(|k| k.ok())
            .filter(|key| !wanted.contains(key))
            .collect();
        let removed = stale
            .iter()
            .filter(|key| self.kernel_flows.remove(key).is_ok())
            .count();
        Ok((added, removed))
    }

    /// How many tuples the kernel path owns, as the datapath sees them.
    pub fn kernel_flow_count(&self) -> usize {
        self.kernel_flows.keys().filter_map(|k| k.ok()).count()
    }
}
