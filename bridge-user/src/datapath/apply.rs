//! Apply: bringing the pinned state to a plan (`Pinned::reconcile`, executing the ordered
//! steps of `steps.rs`): removals first, then additions, so that at every moment each map
//! entry points at a port that holds it; and the
//! firewall policy's hold-backs, east-west and on published ports.

use std::collections::{BTreeMap, BTreeSet};

use aya::{
    maps::{PerCpuValues, lpm_trie::Key},
    util::nr_cpus,
};
use bridge_common::{
    ClientHoldKey, ClientPrefix, Endpoint, EndpointKey, Flow, FlowKey, HoldKey, PortRecord,
    PortStats, PublishedKey, PublishedPort,
};

use super::pinned::allocating;
use super::{
    hooking::Role,
    pinned::Pinned,
    steps::{Step, Wanted, steps},
};
use crate::{
    error::{Error, Result},
    hooks::Drift,
    plan::{Plan, PlannedPort},
};

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

impl Pinned {
    /// Brings the pinned state to `plan`. With `strict`, a port that cannot be hooked is an
    /// error (a first attach is all or nothing); otherwise it is skipped and reported.
    ///
    /// The steps and their order come from `steps::steps` (removals first, a port's record
    /// before its endpoints, hooks before anything points at them); this executes them.
    ///
    /// The records are only a claim: what the kernel runs on each recorded port and uplink is
    /// read first, and a hook removed behind xbr's back, found twice, or left unrecorded by a
    /// writer that stopped half-way, is put right.
    pub fn reconcile(&mut self, plan: &Plan, strict: bool) -> Result<Changes> {
        let mut changes = Changes::default();
        let current = self.records(Role::Port)?;
        let endpoints: BTreeMap<EndpointKey, Endpoint> = self
            .endpoints
            .iter()
            .filter_map(|entry| entry.ok())
            .collect();
        let wanted_mac = &plan.port_macs;
        let wanted: BTreeMap<u32, &PlannedPort> =
            plan.ports.iter().map(|p| (p.ifindex, p)).collect();
        let mut failure = None;
        // The ports holding a record once the hooks are done (read at the first endpoint).
        let mut hooked: Option<BTreeSet<u32>> = None;
        for step in steps(&current, &endpoints, &Wanted::of(plan)) {
            match step {
                Step::RemovePort { ifindex, record } => {
                    self.forget(ifindex, &record)?;
                    let _ = self.stats.remove(&ifindex);
                    // Connections into the container that left end with it.
                    self.retire_flows(|_, flow| {
                        flow.flags & Flow::INBOUND != 0 && flow.ifindex == ifindex
                    });
                    changes.ports_removed.push(ifindex);
                }
                Step::SetPortRecord { ifindex, record } => {
                    allocating(|| self.ports.insert(ifindex, record, 0))
                        .map_err(|e| Error::ebpf("updating the ports map", e))?
                }
                Step::RemoveEndpoint(key) => {
                    changes.endpoints_removed += 1;
                    self.endpoints
                        .remove(&key)
                        .map_err(|e| Error::ebpf("updating the endpoints map", e))?;
                }
                Step::RewriteEndpoint(key, endpoint) => {
                    allocating(|| self.endpoints.insert(key, endpoint, 0))
                        .map_err(|e| Error::ebpf("updating the endpoints map", e))?
                }
                // Delivery into kept ports never stopped (their record keeps its MAC); their
                // own frames took the bridge meanwhile.
                Step::RepairPortHooks => {
                    let kept: BTreeMap<u32, PortRecord> = self
                        .records(Role::Port)?
                        .into_iter()
                        .filter(|(ifindex, _)| wanted.contains_key(ifindex))
                        .collect();
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
                }
                // Counters; a record that delivers nothing yet, so that a writer stopped
                // half-way leaves a trace the next one finishes; the hook; then the record
                // that lets frames be delivered there.
                Step::HookNewPorts(new_ports) => {
                    let cpus = nr_cpus()
                        .map_err(|(what, e)| Error::io(format!("counting CPUs ({what})"), e))?;
                    let ifindexes: Vec<u32> = new_ports.iter().map(|p| p.ifindex).collect();
                    let observed = self.observe(Role::Port, &ifindexes)?;
                    for (port, observed) in new_ports.iter().zip(observed) {
                        let zeros = vec![PortStats::default(); cpus];
                        allocating(|| {
                            let zeros = PerCpuValues::try_from(zeros.clone())
                                .map_err(aya::maps::MapError::IoError)?;
                            self.stats.insert(port.ifindex, zeros, 0)
                        })
                        .map_err(|e| Error::ebpf("adding port counters", e))?;
                        match self.hook_one(Role::Port, port, None, &observed) {
                            Ok(mut record) => {
                                record.endpoint_mac =
                                    wanted_mac.get(&port.ifindex).copied().unwrap_or_default();
                                record.endpoint_ipv4 = plan
                                    .port_ipv4s
                                    .get(&port.ifindex)
                                    .copied()
                                    .unwrap_or_default();
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
                                    // Keep recording the ports that did get hooked, so undo
                                    // finds them.
                                    error => failure = failure.or(Some(error)),
                                }
                            }
                        }
                    }
                }
                // Likewise (an uplink that is gone keeps its record, as before).
                Step::RepairUplinkHooks => {
                    let uplinks = self.records(Role::Uplink)?;
                    for (ifindex, (drift, observed)) in self.drift(Role::Uplink, &uplinks)? {
                        let Ok(name) = nix::net::if_::if_indextoname(ifindex) else {
                            continue;
                        };
                        let uplink = PlannedPort {
                            name: name.to_string_lossy().into_owned(),
                            ifindex,
                        };
                        let recorded = Some(uplinks[&ifindex]);
                        match self.hook_one(Role::Uplink, &uplink, recorded, &observed) {
                            Ok(record) => {
                                self.write_record(Role::Uplink, ifindex, record)?;
                                changes.repaired.push((uplink.name, drift));
                            }
                            Err(Error::PortVanished { .. }) => {}
                            Err(error) => failure = failure.or(Some(error)),
                        }
                    }
                }
                Step::StopIfHookFailed => {
                    if let Some(error) = failure.take() {
                        return Err(error);
                    }
                }
                Step::SyncHolds => changes.holds = self.sync_holds(&plan.east_west.holds)?,
                Step::AddEndpoint(key, endpoint) => {
                    let hooked = hooked
                        .get_or_insert_with(|| self.ports.keys().filter_map(|k| k.ok()).collect());
                    if hooked.contains(&endpoint.ifindex) {
                        allocating(|| self.endpoints.insert(key, endpoint, 0))
                            .map_err(|e| Error::ebpf("updating the endpoints map", e))?;
                        changes.endpoints_added += 1;
                    }
                }
                Step::UpdatePublished => {
                    if let Some(containers) = &plan.containers {
                        changes.published_updated =
                            self.update_published(containers, plan.bridge_mac)?;
                    }
                }
                Step::RemoveLeftovers => changes.leftovers_removed = self.remove_leftovers()?,
            }
        }
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
            allocating(|| self.holds.insert(**key, 1, 0)).map_err(as_error)?;
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
            allocating(|| self.client_prefix_holds.insert(&trie_key(prefix), 1, 0))
                .map_err(as_error)?;
        }
        let current: Vec<ClientHoldKey> = self.client_holds.keys().filter_map(|k| k.ok()).collect();
        let new_clients: Vec<ClientHoldKey> = wanted_clients
            .keys()
            .filter(|k| !current.contains(k))
            .copied()
            .collect();
        for key in &new_clients {
            allocating(|| self.client_holds.insert(key, 1, 0)).map_err(as_error)?;
        }
        let mut newly_held = Vec::new();
        for (key, value, flags) in flagged {
            if flags != value.flags {
                allocating(|| {
                    self.published
                        .insert(key, PublishedPort { flags, ..value }, 0)
                })
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
                allocating(|| self.published.insert(key, current, 0))
                    .map_err(|e| Error::ebpf("updating the published ports map", e))?;
                updated += 1;
            }
        }
        Ok(updated)
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
