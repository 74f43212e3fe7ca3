//! Plan: from an observed bridge to the datapath state xbr wants for it. A pure function,
//! so every rule about what may take the fast path is unit-tested without root.

mod policy;

use std::collections::BTreeMap;

pub use policy::{
    EastWest, Policy, PublishedPlace, PublishedPolicy, egress, hold_keys, hold_shapes,
};

use bridge_common::{Endpoint, EndpointKey};

use crate::{
    error::{Error, Result},
    observe::{BridgeView, PortState, format_mac},
};

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Plan {
    pub bridge: String,
    pub bridge_ifindex: u32,
    /// Ports that get the tc ingress program: every veth port.
    pub ports: Vec<PlannedPort>,
    /// Destination MAC -> port, for ports the bridge would forward to.
    pub endpoints: BTreeMap<EndpointKey, Endpoint>,
    /// Port -> the container MAC it holds (its record's `endpoint_mac`): the endpoints, and
    /// also the ports the policy keeps out of `endpoints`, whose containers still get their
    /// published ports.
    pub port_macs: BTreeMap<u32, [u8; 6]>,
    /// Port -> its container's IPv4 address (its record's `endpoint_ipv4`), where the
    /// observation read addresses.
    pub port_ipv4s: BTreeMap<u32, [u8; 4]>,
    /// Ports (or their MACs) left to the bridge, and why.
    pub skipped: Vec<Skipped>,
    /// Containers' IPv4 addresses -> (bridge port, container MAC), for published ports;
    /// `None` when the observation did not read addresses (then published ports keep theirs).
    pub containers: Option<BTreeMap<std::net::Ipv4Addr, (u32, [u8; 6])>>,
    /// The bridge's MAC: the source MAC of frames NAT delivers into a container.
    pub bridge_mac: [u8; 6],
    /// East-west frames the kernel path's own rules keep off the fast path.
    pub east_west: EastWest,
    /// What the rules say, kept to decide for each published port (`published_policy`).
    pub policy: Policy,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PlannedPort {
    pub name: String,
    pub ifindex: u32,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Skipped {
    pub port: String,
    pub reason: String,
}

pub fn plan(view: &BridgeView) -> Result<Plan> {
    plan_with(view, &Policy::default())
}

/// `plan` under `policy`: with all east-west traffic kept on the bridge, the ports still get
/// the program (it translates replies of published ports) and containers are still found for
/// published ports, but no MAC becomes an endpoint.
pub fn plan_with(view: &BridgeView, policy: &Policy) -> Result<Plan> {
    if view.vlan_filtering {
        return Err(Error::VlanFiltering(view.name.clone()));
    }
    let mut ports = Vec::new();
    let mut skipped = Vec::new();
    let mut candidates: BTreeMap<EndpointKey, Vec<(&str, u32)>> = BTreeMap::new();
    // MACs on other hosts, behind a VXLAN port: their container IPv4 address.
    let mut remote_ipv4s: BTreeMap<EndpointKey, Option<std::net::Ipv4Addr>> = BTreeMap::new();
    for port in &view.ports {
        if let Some(tunnel) = &port.tunnel {
            let reason = match (tunnel.external, port.state, port.isolated) {
                (true, _, _) => {
                    skipped.push(Skipped {
                        port: port.name.clone(),
                        reason: "VXLAN port in metadata mode (external): left to the bridge"
                            .to_owned(),
                    });
                    continue;
                }
                (_, PortState::NotForwarding, _) => {
                    Some("port is not forwarding (down or blocked)")
                }
                (_, _, true) => Some("port is isolated"),
                (false, PortState::Forwarding, false) => None,
            };
            // The program runs there to deliver frames from other hosts into containers.
            ports.push(PlannedPort {
                name: port.name.clone(),
                ifindex: port.ifindex,
            });
            if let Some(reason) = reason {
                skipped.push(Skipped {
                    port: port.name.clone(),
                    reason: format!("no remote endpoints: {reason}"),
                });
                continue;
            }
            for remote in tunnel.remotes.iter().filter(|r| is_unicast_mac(&r.mac)) {
                let key = EndpointKey { mac: remote.mac };
                candidates
                    .entry(key)
                    .or_default()
                    .push((&port.name, port.ifindex));
                remote_ipv4s.insert(key, remote.ipv4);
            }
            continue;
        }
        if port.kind != "veth" {
            let kind = if port.kind.is_empty() {
                "physical"
            } else {
                port.kind.as_str()
            };
            skipped.push(Skipped {
                port: port.name.clone(),
                reason: format!("{kind} port, not a veth: left to the bridge"),
            });
            continue;
        }
        ports.push(PlannedPort {
            name: port.name.clone(),
            ifindex: port.ifindex,
        });
        let reason = match (&port.peer, port.state, port.isolated) {
            (None, _, _) => Some("veth peer not readable"),
            (_, PortState::NotForwarding, _) => Some("port is not forwarding (down or blocked)"),
            (_, _, true) => Some("port is isolated"),
            (Some(peer), _, _) if !is_unicast_mac(&peer.mac) => Some("peer MAC is not unicast"),
            (Some(_), PortState::Forwarding, false) => None,
        };
        match (reason, &port.peer) {
            (None, Some(peer)) => candidates
                .entry(EndpointKey { mac: peer.mac })
                .or_default()
                .push((&port.name, port.ifindex)),
            (reason, _) => skipped.push(Skipped {
                port: port.name.clone(),
                reason: format!("not an endpoint: {}", reason.unwrap_or("unknown")),
            }),
        }
    }

    let mut endpoints: BTreeMap<EndpointKey, Endpoint> = BTreeMap::new();
    for (key, owners) in candidates {
        match owners.as_slice() {
            [(_, ifindex)] => {
                let flags = if remote_ipv4s.contains_key(&key) {
                    Endpoint::REMOTE
                } else {
                    0
                };
                endpoints.insert(
                    key,
                    Endpoint {
                        ifindex: *ifindex,
                        flags,
                        ..Endpoint::default()
                    },
                );
            }
            // The bridge itself flaps between such ports; xbr does not pick one.
            _ => {
                let names: Vec<&str> = owners.iter().map(|(name, _)| *name).collect();
                for name in &names {
                    skipped.push(Skipped {
                        port: (*name).to_owned(),
                        reason: format!(
                            "not an endpoint: MAC {} is on ports {}",
                            format_mac(&key.mac),
                            names.join(", ")
                        ),
                    });
                }
            }
        }
    }
    for (mac, reason) in &policy.held_endpoints {
        if let Some(endpoint) = endpoints.remove(&EndpointKey { mac: *mac }) {
            let port = view
                .ports
                .iter()
                .find(|port| port.ifindex == endpoint.ifindex)
                .map_or_else(|| endpoint.ifindex.to_string(), |port| port.name.clone());
            skipped.push(Skipped {
                port,
                reason: format!("not an endpoint: {} {reason}", format_mac(mac)),
            });
        }
    }
    let containers = view.addresses_read.then(|| {
        let mut containers = BTreeMap::new();
        for port in &view.ports {
            let Some(peer) = &port.peer else { continue };
            let endpoint = endpoints.get(&EndpointKey { mac: peer.mac });
            if endpoint.is_some_and(|e| e.ifindex == port.ifindex) {
                for address in &peer.addresses {
                    if let std::net::IpAddr::V4(address) = address {
                        containers.insert(*address, (port.ifindex, peer.mac));
                    }
                }
            }
        }
        containers
    });
    // A VXLAN port holds no container of its own: its record stays without one.
    let port_macs: BTreeMap<u32, [u8; 6]> = endpoints
        .iter()
        .filter(|(_, endpoint)| endpoint.flags & Endpoint::REMOTE == 0)
        .map(|(key, endpoint)| (endpoint.ifindex, key.mac))
        .collect();
    let port_ipv4s = view
        .ports
        .iter()
        .filter(|port| view.addresses_read && port_macs.contains_key(&port.ifindex))
        .filter_map(|port| {
            let peer = port.peer.as_ref()?;
            peer.addresses.iter().find_map(|address| match address {
                std::net::IpAddr::V4(address) => Some((port.ifindex, address.octets())),
                _ => None,
            })
        })
        .collect();
    // With rules to honour (and the containers' addresses known), the policy is decided for
    // containers that use their own IPv4 addresses, and the datapath checks that they do.
    let check_ipv4 = policy.has_rules() && view.addresses_read;
    let mut own_addresses = Vec::new();
    if check_ipv4 {
        for port in &view.ports {
            let Some(peer) = &port.peer else { continue };
            let Some(endpoint) = endpoints.get_mut(&EndpointKey { mac: peer.mac }) else {
                continue;
            };
            let ipv4 = peer.addresses.iter().find_map(|address| match address {
                std::net::IpAddr::V4(address) => Some(*address),
                _ => None,
            });
            endpoint.flags |= Endpoint::CHECK_IPV4;
            if let Some(ipv4) = ipv4 {
                endpoint.ipv4 = ipv4.octets();
                own_addresses.push(ipv4);
            }
        }
        for (key, ipv4) in &remote_ipv4s {
            let Some(endpoint) = endpoints.get_mut(key) else {
                continue;
            };
            endpoint.flags |= Endpoint::CHECK_IPV4;
            if let Some(ipv4) = ipv4 {
                endpoint.ipv4 = ipv4.octets();
                own_addresses.push(*ipv4);
            }
        }
    }
    let port_names: Vec<String> = ports.iter().map(|port| port.name.clone()).collect();
    let east_west = policy::east_west(
        policy,
        &view.name,
        &port_names,
        check_ipv4.then_some(own_addresses.as_slice()),
    );
    if east_west.off.is_some() {
        endpoints.clear();
    }
    Ok(Plan {
        bridge: view.name.clone(),
        bridge_ifindex: view.ifindex,
        ports,
        endpoints,
        port_macs,
        port_ipv4s,
        skipped,
        containers,
        bridge_mac: view.mac,
        east_west,
        policy: policy.clone(),
    })
}

impl Plan {
    /// What the policy says about published port `key` -> `value`, whose clients come in on
    /// `uplinks`.
    pub fn published_policy(
        &self,
        key: &bridge_common::PublishedKey,
        value: &bridge_common::PublishedPort,
        uplinks: &[String],
    ) -> PublishedPolicy {
        let port_name = self
            .ports
            .iter()
            .find(|port| port.ifindex == value.ifindex)
            .map(|port| port.name.as_str());
        policy::published(
            &self.policy,
            key,
            value,
            &PublishedPlace {
                bridge: &self.bridge,
                port_name,
                uplinks,
            },
        )
    }
}

fn is_unicast_mac(mac: &[u8; 6]) -> bool {
    mac[0] & 1 == 0 && *mac != [0; 6]
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::observe::{PeerView, PortView, RemoteView, TunnelView};

    fn veth(name: &str, ifindex: u32, peer_mac: [u8; 6]) -> PortView {
        PortView {
            name: name.to_owned(),
            ifindex,
            kind: "veth".to_owned(),
            mac: [0x0a, 0, 0, 0, 0, ifindex as u8],
            state: PortState::Forwarding,
            isolated: false,
            peer: Some(PeerView {
                name: "eth0".to_owned(),
                mac: peer_mac,
                addresses: vec![],
            }),
            tunnel: None,
        }
    }

    fn vxlan(name: &str, ifindex: u32, remotes: &[([u8; 6], [u8; 4])]) -> PortView {
        PortView {
            name: name.to_owned(),
            ifindex,
            kind: "vxlan".to_owned(),
            mac: [0x0a, 0, 0, 0, 0, ifindex as u8],
            state: PortState::Forwarding,
            isolated: false,
            peer: None,
            tunnel: Some(TunnelView {
                external: false,
                remotes: remotes
                    .iter()
                    .map(|(mac, ipv4)| RemoteView {
                        mac: *mac,
                        node: std::net::IpAddr::V4([10, 250, 0, 2].into()),
                        ipv4: Some((*ipv4).into()),
                    })
                    .collect(),
            }),
        }
    }

    fn bridge(ports: Vec<PortView>) -> BridgeView {
        BridgeView {
            name: "br0".to_owned(),
            ifindex: 2,
            mac: [0x0a, 0, 0, 0, 0, 2],
            vlan_filtering: false,
            addresses_read: false,
            ports,
        }
    }

    const MAC_A: [u8; 6] = [0x02, 0, 0, 0, 0, 0xa];
    const MAC_B: [u8; 6] = [0x02, 0, 0, 0, 0, 0xb];

    #[test]
    fn every_forwarding_veth_becomes_an_endpoint() {
        let plan = plan(&bridge(vec![
            veth("veth-a", 10, MAC_A),
            veth("veth-b", 11, MAC_B),
        ]))
        .unwrap();
        assert_eq!(plan.ports.len(), 2);
        assert_eq!(
            plan.endpoints[&EndpointKey { mac: MAC_A }],
            Endpoint {
                ifindex: 10,
                ..Endpoint::default()
            }
        );
        assert_eq!(
            plan.endpoints[&EndpointKey { mac: MAC_B }],
            Endpoint {
                ifindex: 11,
                ..Endpoint::default()
            }
        );
        assert!(plan.skipped.is_empty(), "{:?}", plan.skipped);
    }

    #[test]
    fn non_forwarding_and_isolated_ports_keep_the_program_but_are_no_endpoint() {
        let mut down = veth("veth-a", 10, MAC_A);
        down.state = PortState::NotForwarding;
        let mut isolated = veth("veth-b", 11, MAC_B);
        isolated.isolated = true;
        let plan = plan(&bridge(vec![down, isolated])).unwrap();
        assert_eq!(
            plan.ports.len(),
            2,
            "the program still runs there (it passes their frames on)"
        );
        assert!(plan.endpoints.is_empty(), "{:?}", plan.endpoints);
        assert_eq!(plan.skipped.len(), 2);
    }

    const MAC_REMOTE: [u8; 6] = [0x02, 0, 0, 0, 0, 0xc];

    #[test]
    fn a_vxlan_ports_static_macs_are_remote_endpoints() {
        let plan = plan(&bridge(vec![
            veth("veth-a", 10, MAC_A),
            vxlan("vxlan0", 12, &[(MAC_REMOTE, [10, 0, 0, 3])]),
        ]))
        .unwrap();
        assert_eq!(plan.ports.len(), 2, "the VXLAN port gets the program");
        assert_eq!(
            plan.endpoints[&EndpointKey { mac: MAC_REMOTE }],
            Endpoint {
                ifindex: 12,
                flags: Endpoint::REMOTE,
                ..Endpoint::default()
            }
        );
        assert_eq!(
            plan.port_macs,
            BTreeMap::from([(10, MAC_A)]),
            "the VXLAN port holds no container"
        );
    }

    #[test]
    fn remote_endpoints_carry_their_address_when_rules_are_checked() {
        let mut view = bridge(vec![vxlan("vxlan0", 12, &[(MAC_REMOTE, [10, 0, 0, 3])])]);
        view.addresses_read = true;
        // An empty table: rules to honour, none that holds anything.
        let table = crate::policy::model::Table {
            family: crate::policy::model::Family::Inet,
            name: "filter".to_owned(),
            origin: crate::policy::model::Origin::Nftables,
            chains: vec![],
        };
        let policy = Policy {
            firewall: Ok(crate::policy::Firewall {
                ruleset: crate::policy::model::Ruleset {
                    tables: vec![table],
                },
                ..Default::default()
            }),
            icc_off: None,
            ..Policy::default()
        };
        let plan = plan_with(&view, &policy).unwrap();
        assert_eq!(
            plan.endpoints[&EndpointKey { mac: MAC_REMOTE }],
            Endpoint {
                ifindex: 12,
                flags: Endpoint::REMOTE | Endpoint::CHECK_IPV4,
                ipv4: [10, 0, 0, 3],
            }
        );
    }

    #[test]
    fn a_mac_both_local_and_remote_is_no_endpoint() {
        let plan = plan(&bridge(vec![
            veth("veth-a", 10, MAC_A),
            vxlan("vxlan0", 12, &[(MAC_A, [10, 0, 0, 3])]),
        ]))
        .unwrap();
        assert!(plan.endpoints.is_empty(), "{:?}", plan.endpoints);
    }

    #[test]
    fn a_held_endpoint_stays_on_the_bridge() {
        let policy = Policy {
            held_endpoints: BTreeMap::from([(MAC_B, "is the load balancer".to_owned())]),
            ..Policy::default()
        };
        let plan = plan_with(
            &bridge(vec![veth("veth-a", 10, MAC_A), veth("lb-b", 11, MAC_B)]),
            &policy,
        )
        .unwrap();
        assert_eq!(
            plan.endpoints.keys().map(|key| key.mac).collect::<Vec<_>>(),
            [MAC_A]
        );
        assert_eq!(plan.ports.len(), 2, "its port keeps the program");
        assert_eq!(plan.skipped[0].port, "lb-b");
        assert!(plan.skipped[0].reason.contains("load balancer"));
    }

    #[test]
    fn a_vxlan_port_in_metadata_mode_is_left_to_the_bridge() {
        let mut port = vxlan("vxlan0", 12, &[(MAC_REMOTE, [10, 0, 0, 3])]);
        port.tunnel.as_mut().unwrap().external = true;
        let plan = plan(&bridge(vec![port])).unwrap();
        assert!(plan.ports.is_empty());
        assert!(plan.endpoints.is_empty());
        assert_eq!(plan.skipped[0].port, "vxlan0");
    }

    #[test]
    fn non_veth_ports_are_left_to_the_bridge() {
        let mut tap = veth("tap0", 12, MAC_A);
        tap.kind = "tun".to_owned();
        tap.peer = None;
        let plan = plan(&bridge(vec![tap])).unwrap();
        assert!(plan.ports.is_empty());
        assert!(plan.endpoints.is_empty());
        assert_eq!(plan.skipped[0].port, "tap0");
    }

    #[test]
    fn a_mac_on_two_ports_is_on_neither() {
        let plan = plan(&bridge(vec![
            veth("veth-a", 10, MAC_A),
            veth("veth-b", 11, MAC_A),
        ]))
        .unwrap();
        assert!(plan.endpoints.is_empty());
        assert_eq!(plan.skipped.len(), 2);
        assert!(
            plan.skipped[0].reason.contains("veth-a, veth-b"),
            "{:?}",
            plan.skipped
        );
    }

    #[test]
    fn multicast_peer_mac_is_no_endpoint() {
        let plan = plan(&bridge(vec![veth("veth-a", 10, [0x01, 0, 0x5e, 0, 0, 1])])).unwrap();
        assert!(plan.endpoints.is_empty());
    }

    #[test]
    fn east_west_off_leaves_no_endpoint_but_keeps_ports_and_containers() {
        let mut a = veth("veth-a", 10, MAC_A);
        a.peer.as_mut().unwrap().addresses = vec!["10.77.0.2".parse().unwrap()];
        let mut view = bridge(vec![a, veth("veth-b", 11, MAC_B)]);
        view.addresses_read = true;
        let policy = Policy {
            icc_off: Some("enable_icc=false".to_owned()),
            ..Policy::default()
        };
        let plan = plan_with(&view, &policy).unwrap();
        assert_eq!(plan.east_west.off.as_deref(), Some("enable_icc=false"));
        assert!(plan.endpoints.is_empty(), "{:?}", plan.endpoints);
        assert_eq!(
            plan.ports.len(),
            2,
            "replies of published ports still need the program"
        );
        assert_eq!(
            plan.port_macs,
            BTreeMap::from([(10, MAC_A), (11, MAC_B)]),
            "the port records keep their MACs: NAT delivers only to a port that holds one"
        );
        assert_eq!(
            plan.containers.unwrap()[&"10.77.0.2".parse().unwrap()],
            (10, MAC_A),
            "published ports still find their container"
        );
        assert_eq!(plan.policy, policy);
    }

    #[test]
    fn vlan_filtering_bridge_is_refused() {
        let mut view = bridge(vec![veth("veth-a", 10, MAC_A)]);
        view.vlan_filtering = true;
        assert!(matches!(plan(&view), Err(Error::VlanFiltering(name)) if name == "br0"));
    }
}
