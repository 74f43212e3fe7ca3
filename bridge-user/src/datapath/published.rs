//! The published ports of an attachment, in its pinned `PUBLISHED` map: publishing and
//! unpublishing (`xbr publish`, and Docker's bindings mirrored by a follower), and the NATed
//! connections that came through them: retiring them when they go idle or lose their port,
//! and counting them.

use std::{
    collections::{BTreeMap, BTreeSet},
    net::Ipv4Addr,
    time::Duration,
};

use aya::maps::PerCpuValues;
use bridge_common::{Flow, FlowKey, NatEvent, PublishedKey, PublishedPort};

use super::pinned::allocating;
use super::pinned::{FlowTable, NatTables, Pinned};
use crate::{
    error::{Error, Result},
    observe::Mac,
    publish::{NatState, Proto, PublishSpec, Published, Synced, Timeouts, diff},
};

impl Pinned {
    /// Publishes `spec`. The container must be on the bridge now (`containers` maps the
    /// bridge's container addresses to their port and MAC); the follower keeps it current.
    pub fn publish(
        &mut self,
        spec: &PublishSpec,
        containers: &std::collections::BTreeMap<Ipv4Addr, (u32, [u8; 6])>,
        bridge_mac: [u8; 6],
    ) -> Result<()> {
        let Some((ifindex, container_mac)) = containers.get(&spec.container_ip).copied() else {
            return Err(Error::Publish(format!(
                "no container on bridge {} has address {}; see the container addresses with `xbr status`",
                self.bridge, spec.container_ip
            )));
        };
        let key = spec.key();
        if let Ok(existing) = self.published.get(&key, 0)
            && let Some(existing) = PublishSpec::from_entry(&key, &existing)
            && existing != *spec
        {
            return Err(Error::Publish(format!(
                "{} is already published to {}:{}; unpublish it first with `xbr unpublish {} {existing}`",
                self.bridge_port_name(spec),
                existing.container_ip,
                existing.container_port,
                self.bridge
            )));
        }
        self.ensure_nat_tables()?;
        let value = PublishedPort {
            container_ip: spec.container_ip.octets(),
            container_port: spec.container_port.to_be_bytes(),
            // Held until the policy has been asked (`apply_published_policy`).
            flags: PublishedPort::HELD | PublishedPort::HOST_CLIENTS_HELD,
            _pad: 0,
            ifindex,
            container_mac,
            gateway_mac: bridge_mac,
        };
        self.add_socket_counts(&key)?;
        allocating(|| self.published.insert(key, value, 0))
            .map_err(|e| Error::ebpf("writing the published ports map", e))
    }

    fn bridge_port_name(&self, spec: &PublishSpec) -> String {
        match spec.host_ip {
            Some(ip) => format!(
                "{ip}:{}/{}",
                spec.host_port,
                if spec.proto == Proto::Tcp {
                    "tcp"
                } else {
                    "udp"
                }
            ),
            None => format!(
                "port {}/{}",
                spec.host_port,
                if spec.proto == Proto::Tcp {
                    "tcp"
                } else {
                    "udp"
                }
            ),
        }
    }

    /// Unpublishes `spec` and ends the connections that came through it.
    pub fn unpublish(&mut self, spec: &PublishSpec) -> Result<usize> {
        let key = spec.key();
        match self
            .published
            .get(&key, 0)
            .ok()
            .and_then(|v| PublishSpec::from_entry(&key, &v))
        {
            Some(existing) if existing == *spec => {}
            _ => {
                return Err(Error::Publish(format!(
                    "{spec} is not published on bridge {}; list published ports with `xbr status`",
                    self.bridge
                )));
            }
        }
        self.published
            .remove(&key)
            .map_err(|e| Error::ebpf("updating the published ports map", e))?;
        self.remove_socket_counts(&key);
        let ended = self
            .retire_flows(|key, flow| flow.flags & Flow::INBOUND != 0 && spec.matches_inbound(key));
        self.release_unused_nat_tables()?;
        Ok(ended)
    }

    pub fn published(&self) -> Vec<Published> {
        let mut published: Vec<Published> = self
            .published
            .iter()
            .filter_map(|entry| entry.ok())
            .filter_map(|(key, value)| {
                Some(Published {
                    spec: PublishSpec::from_entry(&key, &value)?,
                    port_ifindex: (value.ifindex != 0).then_some(value.ifindex),
                    flags: value.flags,
                    host_clients: self.socket_counts(&key),
                })
            })
            .collect();
        published.sort_by_key(|p| p.spec);
        published
    }

    /// Retires what has been quiet for longer than its lifetime: established connections
    /// quiet in both directions (24 h TCP, 60 s after a FIN, 120 s UDP), and transient entries
    /// (30 s; the datapath ignores them already, this frees their room). Returns how many
    /// established connections and transient entries it removed.
    pub fn expire_flows(&mut self, timeouts: &Timeouts) -> usize {
        let Some(NatTables {
            mut flows,
            mut transient,
        }) = self.nat_tables()
        else {
            return 0;
        };
        let now = monotonic_ns();
        let established: std::collections::BTreeMap<FlowKey, Flow> =
            flows.iter().filter_map(|entry| entry.ok()).collect();
        let ended = retire_established(&mut flows, |key, flow| {
            // A connection is quiet when neither direction carried a frame for the limit.
            let (last_seen, limit) = match established.get(&flow.peer) {
                Some(peer) => (
                    flow.last_seen_ns.max(peer.last_seen_ns),
                    timeouts
                        .limit(key.proto, flow)
                        .min(timeouts.limit(key.proto, peer)),
                ),
                None => (flow.last_seen_ns, timeouts.limit(key.proto, flow)),
            };
            Duration::from_nanos(now.saturating_sub(last_seen)) > limit
        });
        let expired: Vec<FlowKey> = transient
            .iter()
            .filter_map(|entry| entry.ok())
            .filter(|(key, flow)| {
                let limit = timeouts.limit(key.proto, flow);
                Duration::from_nanos(now.saturating_sub(flow.last_seen_ns)) > limit
            })
            .map(|(key, _)| key)
            .collect();
        let swept = expired
            .iter()
            .filter(|key| transient.remove(key).is_ok())
            .count();
        self.count_swept(swept);
        // Connections of a withdrawn port may have been the last users of the tables.
        let _ = self.release_unused_nat_tables();
        ended + swept
    }

    /// Removes every connection one of whose directions `retire` picks (both directions go),
    /// established or transient; returns how many connections it ended.
    pub(super) fn retire_flows(&mut self, retire: impl Fn(&FlowKey, &Flow) -> bool) -> usize {
        let Some(NatTables {
            mut flows,
            mut transient,
        }) = self.nat_tables()
        else {
            return 0;
        };
        let mut ended = retire_established(&mut flows, &retire);
        let mut swept = 0;
        for (key, peer) in picked(&transient, &retire) {
            if transient.remove(&key).is_ok() {
                ended += 1;
                swept += 1 + usize::from(transient.remove(&peer).is_ok());
            }
        }
        self.count_swept(swept);
        ended
    }

    /// Adds `entries` to the `TransientSwept` counter (the datapath never writes it), so that
    /// what the LRU replaced can be told from what was removed.
    fn count_swept(&mut self, entries: usize) {
        if entries == 0 {
            return;
        }
        let index = NatEvent::TransientSwept as u32;
        let Ok(values) = self.nat_events.get(&index, 0) else {
            return;
        };
        let mut values: Vec<u64> = values.iter().copied().collect();
        if let Some(first) = values.first_mut() {
            *first += entries as u64;
        }
        if let Ok(values) = PerCpuValues::try_from(values) {
            let _ = self.nat_events.set(index, values, 0);
        }
    }

    /// The NATed connections now: how many in each table, the tables' sizes, and what
    /// happened to connections since the attachment was made.
    pub fn nat_state(&self) -> NatState {
        let now = monotonic_ns();
        let tables = self.nat_tables();
        let established = tables.as_ref().map_or(0, |tables| {
            tables
                .flows
                .iter()
                .filter_map(|entry| entry.ok())
                .filter(|(_, flow)| flow.flags & Flow::INBOUND != 0)
                .count()
        });
        let transient = tables.as_ref().map(|tables| &tables.transient);
        let (mut live, mut expired, mut entries) = (0usize, 0, 0u64);
        for (key, flow) in transient
            .into_iter()
            .flat_map(|table| table.iter().filter_map(|entry| entry.ok()))
        {
            entries += 1;
            if now.saturating_sub(flow.last_seen_ns) > flow.lifetime_ns(key.proto) {
                expired += 1;
            } else {
                live += 1;
            }
        }
        let events: Vec<(NatEvent, u64)> = NatEvent::ALL
            .iter()
            .map(|event| {
                let count = self
                    .nat_events
                    .get(&(*event as u32), 0)
                    .map(|values| values.iter().sum())
                    .unwrap_or(0);
                (*event, count)
            })
            .collect();
        let mut state = NatState {
            tables: tables.is_some(),
            established,
            established_capacity: self.capacity.established,
            // Entries in pairs; the LRU may have replaced one of a pair.
            transient: live.div_ceil(2),
            transient_entries: live,
            transient_expired: expired,
            transient_capacity: self.capacity.transient,
            replaced: 0,
            events,
        };
        // Entries that left the LRU without the datapath or the control plane removing them:
        // the kernel replaced them to make room for new ones.
        let replaced_entries = state.event(NatEvent::TransientAdded).saturating_sub(
            state.event(NatEvent::TransientRemoved)
                + state.event(NatEvent::TransientSwept)
                + entries,
        );
        state.replaced = replaced_entries / 2;
        state
    }

    /// Brings the Docker-owned entries of PUBLISHED to `wanted`. New entries point at their
    /// container's port when `containers` knows its address (else the kernel path serves them
    /// until a reconcile finds it); removed ones end their connections.
    pub fn sync_docker_published(
        &mut self,
        wanted: &BTreeSet<PublishSpec>,
        containers: &BTreeMap<Ipv4Addr, (u32, Mac)>,
        bridge_mac: Mac,
    ) -> Result<Synced> {
        let current: Vec<(PublishSpec, bool)> = self
            .published
            .iter()
            .filter_map(|entry| entry.ok())
            .filter_map(|(key, value)| {
                Some((PublishSpec::from_entry(&key, &value)?, value.by_docker()))
            })
            .collect();
        let synced = diff(&current, wanted);
        for spec in &synced.removed {
            self.unpublish(spec)?;
        }
        if !synced.added.is_empty() {
            self.ensure_nat_tables()?;
        }
        for spec in &synced.added {
            let (ifindex, container_mac) = containers
                .get(&spec.container_ip)
                .copied()
                .unwrap_or((0, [0; 6]));
            let value = PublishedPort {
                container_ip: spec.container_ip.octets(),
                container_port: spec.container_port.to_be_bytes(),
                // Held until the policy has been asked (`apply_published_policy`).
                flags: PublishedPort::BY_DOCKER
                    | PublishedPort::HELD
                    | PublishedPort::HOST_CLIENTS_HELD,
                _pad: 0,
                ifindex,
                container_mac,
                gateway_mac: bridge_mac,
            };
            self.add_socket_counts(&spec.key())?;
            allocating(|| self.published.insert(spec.key(), value, 0))
                .map_err(|e| Error::ebpf("writing the published ports map", e))?;
        }
        Ok(synced)
    }

    /// Removes the Docker-owned published ports (their live connections keep going), so new
    /// connections take Docker's own path: nothing keeps those entries current without a
    /// follower.
    pub fn withdraw_docker_published(&mut self) -> usize {
        let keys: Vec<PublishedKey> = self
            .published
            .iter()
            .filter_map(|entry| entry.ok())
            .filter(|(_, value)| value.by_docker())
            .map(|(key, _)| key)
            .collect();
        let withdrawn = keys
            .iter()
            .filter(|key| self.published.remove(key).is_ok())
            .count();
        for key in &keys {
            self.remove_socket_counts(key);
        }
        withdrawn
    }
}

/// The entries of `table` that `pick` picks, each with its other direction's key.
fn picked(table: &FlowTable, pick: impl Fn(&FlowKey, &Flow) -> bool) -> Vec<(FlowKey, FlowKey)> {
    table
        .iter()
        .filter_map(|entry| entry.ok())
        .filter(|(key, flow)| pick(key, flow))
        .map(|(key, flow)| (key, flow.peer))
        .collect()
}

/// Removes the established connections one of whose directions `retire` picks (both
/// directions go); returns how many it ended.
fn retire_established(flows: &mut FlowTable, retire: impl Fn(&FlowKey, &Flow) -> bool) -> usize {
    let mut ended = 0;
    for (key, peer) in picked(flows, &retire) {
        // A connection whose both directions were picked is counted once.
        if flows.remove(&key).is_ok() {
            ended += 1;
            let _ = flows.remove(&peer);
        }
    }
    ended
}

/// CLOCK_MONOTONIC, the clock of bpf_ktime_get_ns.
fn monotonic_ns() -> u64 {
    let now =
        nix::time::clock_gettime(nix::time::ClockId::CLOCK_MONOTONIC).expect("CLOCK_MONOTONIC");
    now.tv_sec() as u64 * 1_000_000_000 + now.tv_nsec() as u64
}
