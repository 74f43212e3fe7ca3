//! Reconcile's safety ordering as data: the ordered steps that bring the pinned maps from
//! what they hold to what the plan wants, computed without touching the kernel (`steps`), so
//! that the order can be tested; `Pinned::reconcile` (apply.rs) executes them in order.
//!
//! The order is what keeps every frame on a safe path while the maps change:
//! - removals first: a port that left stops being delivered to before its hook and record go;
//! - a kept port's record (the MAC it delivers to) is rewritten before any endpoint moves;
//! - an endpoint that stays on its port with another address or flags is rewritten in place,
//!   never removed and added back (its frames would take the bridge meanwhile);
//! - the hooks are made (or put right) before anything can point at them, and a failed hook
//!   stops the reconcile before endpoints are added;
//! - the policy's hold-backs are in place before any new endpoint takes the fast path;
//! - endpoints are added last, each only where its port holds a record.

use std::collections::BTreeMap;

use bridge_common::{Endpoint, EndpointKey, PortRecord};

use crate::plan::{Plan, PlannedPort};

/// What a reconcile wants, as far as the order of its steps is concerned.
pub(super) struct Wanted<'p> {
    pub ports: &'p [PlannedPort],
    /// The endpoint MAC each port's record delivers to (absent: none).
    pub port_macs: &'p BTreeMap<u32, [u8; 6]>,
    /// ... and its container's IPv4 address (absent: not known).
    pub port_ipv4s: &'p BTreeMap<u32, [u8; 4]>,
    pub endpoints: &'p BTreeMap<EndpointKey, Endpoint>,
    /// The plan read the containers' addresses: published ports can follow them.
    pub containers_read: bool,
}

impl<'p> Wanted<'p> {
    pub fn of(plan: &'p Plan) -> Wanted<'p> {
        Wanted {
            ports: &plan.ports,
            port_macs: &plan.port_macs,
            port_ipv4s: &plan.port_ipv4s,
            endpoints: &plan.endpoints,
            containers_read: plan.containers.is_some(),
        }
    }
}

/// One step of a reconcile, in the order `steps` gives them.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(super) enum Step<'p> {
    /// A port that left: first no delivery there (its record's MAC goes), then its hook,
    /// then its record; its counters and the connections into its container end too.
    RemovePort { ifindex: u32, record: PortRecord },
    /// A kept port whose endpoint MAC changed (or went): its record, rewritten.
    SetPortRecord { ifindex: u32, record: PortRecord },
    /// An endpoint entry the plan does not have, or has behind another port.
    RemoveEndpoint(EndpointKey),
    /// An endpoint that stays on its port with another address or flags, rewritten in place.
    RewriteEndpoint(EndpointKey, Endpoint),
    /// Kept ports whose hook is not what their record says, put right (what the kernel runs
    /// is read when the step runs).
    RepairPortHooks,
    /// New ports: counters, a record that delivers nothing yet, the hook, then the record
    /// with the MAC it delivers to.
    HookNewPorts(Vec<&'p PlannedPort>),
    /// Uplinks whose hook is not what their record says, put right.
    RepairUplinkHooks,
    /// A hook that failed above ends the reconcile here, before anything points at it.
    StopIfHookFailed,
    /// The east-west hold-backs brought to the plan's.
    SyncHolds,
    /// An endpoint the map does not hold as planned: added, if its port holds a record by
    /// now (a new port that could not be hooked has none).
    AddEndpoint(EndpointKey, Endpoint),
    /// Published ports follow their container to its current port and MAC.
    UpdatePublished,
    /// What writers stopped half-way left beside the records, removed.
    RemoveLeftovers,
}

/// The ordered steps from the maps' `ports` records and `endpoints` to `wanted`.
pub(super) fn steps<'p>(
    ports: &BTreeMap<u32, PortRecord>,
    endpoints: &BTreeMap<EndpointKey, Endpoint>,
    wanted: &Wanted<'p>,
) -> Vec<Step<'p>> {
    let wanted_ports: BTreeMap<u32, &PlannedPort> =
        wanted.ports.iter().map(|p| (p.ifindex, p)).collect();
    let mut steps = Vec::new();
    // 1. Ports that left.
    for (ifindex, record) in ports {
        if !wanted_ports.contains_key(ifindex) {
            steps.push(Step::RemovePort {
                ifindex: *ifindex,
                record: *record,
            });
        }
    }
    // 2. Kept ports whose endpoint (MAC, address) changed.
    for (ifindex, record) in ports {
        let mac = wanted.port_macs.get(ifindex).copied().unwrap_or_default();
        let ipv4 = wanted.port_ipv4s.get(ifindex).copied().unwrap_or_default();
        if wanted_ports.contains_key(ifindex)
            && (record.endpoint_mac != mac || record.endpoint_ipv4 != ipv4)
        {
            steps.push(Step::SetPortRecord {
                ifindex: *ifindex,
                record: PortRecord {
                    endpoint_mac: mac,
                    endpoint_ipv4: ipv4,
                    ..*record
                },
            });
        }
    }
    // 3. Endpoints that go, or stay on their port changed.
    for (key, endpoint) in endpoints {
        match wanted.endpoints.get(key) {
            Some(planned) if planned == endpoint => {}
            Some(planned) if planned.ifindex == endpoint.ifindex => {
                steps.push(Step::RewriteEndpoint(*key, *planned));
            }
            _ => steps.push(Step::RemoveEndpoint(*key)),
        }
    }
    // 4. The hooks.
    steps.push(Step::RepairPortHooks);
    let new_ports: Vec<&PlannedPort> = wanted_ports
        .iter()
        .filter(|(ifindex, _)| !ports.contains_key(ifindex))
        .map(|(_, port)| *port)
        .collect();
    if !new_ports.is_empty() {
        steps.push(Step::HookNewPorts(new_ports));
    }
    steps.push(Step::RepairUplinkHooks);
    steps.push(Step::StopIfHookFailed);
    // 5. Hold-backs, before any new endpoint.
    steps.push(Step::SyncHolds);
    // 6. Endpoints, last; those rewritten in place hold the plan's value already.
    for (key, planned) in wanted.endpoints {
        let in_place = endpoints
            .get(key)
            .is_some_and(|current| current.ifindex == planned.ifindex);
        if !in_place {
            steps.push(Step::AddEndpoint(*key, *planned));
        }
    }
    // 7, 8.
    if wanted.containers_read {
        steps.push(Step::UpdatePublished);
    }
    steps.push(Step::RemoveLeftovers);
    steps
}

#[cfg(test)]
mod tests {
    use super::*;

    fn key(n: u8) -> EndpointKey {
        EndpointKey {
            mac: [2, 0, 0, 0, 0, n],
        }
    }

    fn endpoint(ifindex: u32, ipv4_last: u8) -> Endpoint {
        Endpoint {
            ifindex,
            flags: 0,
            ipv4: [10, 0, 0, ipv4_last],
        }
    }

    fn record(n: u8) -> PortRecord {
        PortRecord {
            endpoint_mac: key(n).mac,
            ..PortRecord::default()
        }
    }

    fn port(ifindex: u32) -> PlannedPort {
        PlannedPort {
            name: format!("veth{ifindex}"),
            ifindex,
        }
    }

    fn position(steps: &[Step], wanted: impl Fn(&Step) -> bool) -> usize {
        steps
            .iter()
            .position(wanted)
            .unwrap_or_else(|| panic!("no such step in {steps:#?}"))
    }

    /// The map before: ports 10 (MAC 1), 11 (MAC 2), 12 (MAC 3), 13 (MAC 4); endpoints 1 on
    /// 10, 2 on 11, 3 on 12, 4 on 13. The plan: 10 left; MAC 2 moved from 11 to new port 14,
    /// which leaves 11 with MAC 5 (new); 3 stays on 12 with another address; 4 unchanged.
    fn scenario() -> Vec<Step<'static>> {
        let ports: BTreeMap<u32, PortRecord> = [
            (10, record(1)),
            (11, record(2)),
            (12, record(3)),
            (13, record(4)),
        ]
        .into();
        let endpoints: BTreeMap<EndpointKey, Endpoint> = [
            (key(1), endpoint(10, 1)),
            (key(2), endpoint(11, 2)),
            (key(3), endpoint(12, 3)),
            (key(4), endpoint(13, 4)),
        ]
        .into();
        let planned_ports: &'static [PlannedPort] =
            Vec::leak(vec![port(11), port(12), port(13), port(14)]);
        let port_macs: &'static BTreeMap<u32, [u8; 6]> = Box::leak(Box::new(
            [
                (11, key(5).mac),
                (12, key(3).mac),
                (13, key(4).mac),
                (14, key(2).mac),
            ]
            .into(),
        ));
        let planned_endpoints: &'static BTreeMap<EndpointKey, Endpoint> = Box::leak(Box::new(
            [
                (key(2), endpoint(14, 2)),
                (key(3), endpoint(12, 33)),
                (key(4), endpoint(13, 4)),
                (key(5), endpoint(11, 5)),
            ]
            .into(),
        ));
        steps(
            &ports,
            &endpoints,
            &Wanted {
                ports: planned_ports,
                port_macs,
                port_ipv4s: Box::leak(Box::new(BTreeMap::new())),
                endpoints: planned_endpoints,
                containers_read: true,
            },
        )
    }

    #[test]
    fn removals_come_first() {
        let steps = scenario();
        assert!(matches!(
            steps[0],
            Step::RemovePort {
                ifindex: 10,
                record
            } if record == self::record(1)
        ));
        let last_removal = steps
            .iter()
            .rposition(|s| matches!(s, Step::RemovePort { .. } | Step::RemoveEndpoint(_)))
            .unwrap();
        let first_addition = position(&steps, |s| {
            matches!(s, Step::HookNewPorts(_) | Step::AddEndpoint(..))
        });
        assert!(last_removal < first_addition, "{steps:#?}");
        // The endpoint of the port that left, and the one that moved, go before anything is
        // added; the one that moved comes back on its new port.
        let removed_1 = position(&steps, |s| *s == Step::RemoveEndpoint(key(1)));
        let removed_2 = position(&steps, |s| *s == Step::RemoveEndpoint(key(2)));
        let added_2 = position(&steps, |s| *s == Step::AddEndpoint(key(2), endpoint(14, 2)));
        assert!(
            removed_1 < first_addition && removed_2 < added_2,
            "{steps:#?}"
        );
        assert!(!steps.contains(&Step::AddEndpoint(key(1), endpoint(10, 1))));
    }

    #[test]
    fn a_ports_record_is_rewritten_before_endpoints_move() {
        let steps = scenario();
        let port_11 = position(
            &steps,
            |s| matches!(s, Step::SetPortRecord { ifindex: 11, record } if record.endpoint_mac == key(5).mac),
        );
        let first_endpoint_change = position(&steps, |s| {
            matches!(
                s,
                Step::RemoveEndpoint(_) | Step::RewriteEndpoint(..) | Step::AddEndpoint(..)
            )
        });
        assert!(port_11 < first_endpoint_change, "{steps:#?}");
        // A new port is hooked (and its record written) before its endpoint is added.
        let hooked_14 = position(
            &steps,
            |s| matches!(s, Step::HookNewPorts(ports) if ports.iter().any(|p| p.ifindex == 14)),
        );
        let added_2 = position(&steps, |s| *s == Step::AddEndpoint(key(2), endpoint(14, 2)));
        let added_5 = position(&steps, |s| *s == Step::AddEndpoint(key(5), endpoint(11, 5)));
        assert!(hooked_14 < added_2 && port_11 < added_5, "{steps:#?}");
        // Kept ports whose MAC did not change keep their record.
        assert!(
            !steps.iter().any(|s| matches!(
                s,
                Step::SetPortRecord {
                    ifindex: 12 | 13,
                    ..
                }
            )),
            "{steps:#?}"
        );
    }

    #[test]
    fn an_endpoint_that_stays_on_its_port_is_rewritten_in_place() {
        let steps = scenario();
        let rewrites: Vec<&Step> = steps
            .iter()
            .filter(|s| {
                matches!(s, Step::RemoveEndpoint(k) | Step::RewriteEndpoint(k, _) | Step::AddEndpoint(k, _) if *k == key(3))
            })
            .collect();
        assert_eq!(
            rewrites,
            [&Step::RewriteEndpoint(key(3), endpoint(12, 33))],
            "{steps:#?}"
        );
        // An unchanged endpoint has no step at all.
        assert!(
            !steps.iter().any(|s| matches!(
                s,
                Step::RemoveEndpoint(k) | Step::RewriteEndpoint(k, _) | Step::AddEndpoint(k, _) if *k == key(4)
            )),
            "{steps:#?}"
        );
    }

    #[test]
    fn hooks_are_checked_and_holds_synced_before_any_endpoint_is_added() {
        let steps = scenario();
        let stop = position(&steps, |s| *s == Step::StopIfHookFailed);
        let holds = position(&steps, |s| *s == Step::SyncHolds);
        let hooks = steps
            .iter()
            .rposition(|s| {
                matches!(
                    s,
                    Step::RepairPortHooks | Step::HookNewPorts(_) | Step::RepairUplinkHooks
                )
            })
            .unwrap();
        let first_add = position(&steps, |s| matches!(s, Step::AddEndpoint(..)));
        assert!(
            hooks < stop && stop < holds && holds < first_add,
            "{steps:#?}"
        );
        assert_eq!(
            &steps[steps.len() - 2..],
            [Step::UpdatePublished, Step::RemoveLeftovers]
        );
    }

    #[test]
    fn nothing_to_do_is_only_the_checks() {
        let ports: BTreeMap<u32, PortRecord> = [(11, record(2))].into();
        let endpoints: BTreeMap<EndpointKey, Endpoint> = [(key(2), endpoint(11, 2))].into();
        let planned = [port(11)];
        let port_macs = [(11, key(2).mac)].into();
        let wanted = Wanted {
            ports: &planned,
            port_macs: &port_macs,
            port_ipv4s: &BTreeMap::new(),
            endpoints: &endpoints,
            containers_read: false,
        };
        assert_eq!(
            steps(&ports, &endpoints, &wanted),
            [
                Step::RepairPortHooks,
                Step::RepairUplinkHooks,
                Step::StopIfHookFailed,
                Step::SyncHolds,
                Step::RemoveLeftovers
            ]
        );
    }
}
