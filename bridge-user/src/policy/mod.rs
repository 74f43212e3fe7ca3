//! The policy reader: xbr changes how fast packets move, never where they may go. For each
//! traffic class xbr accelerates, the hooks that class would pass on the kernel path are
//! walked in the namespace's whole ruleset (`read`); every rule there that could drop,
//! reject, queue, translate or change some of its packets holds those packets back on the
//! kernel path, as narrowly as the rule's own matches allow (`Hold`).
//!
//! The classes:
//! - east-west on a bridge: frames from one container port to another, which xbr hands over
//!   skipping the netdev ingress of the sending port, the bridge family's hooks, with
//!   br_netfilter the ip/ip6 hooks, and the netdev egress of the receiving port. Also the
//!   replies of connections the kernel translated for a client on the bridge (hairpin NAT):
//!   only conntrack can translate them back.
//! - a published port: connections from an uplink DNATed into a container, and the
//!   container's replies; they skip the uplink's netdev ingress, the ip hooks of both
//!   directions and the bridge family's hooks.
//! - a published port's clients on the host, which the socket hooks point at the container
//!   when they connect: they skip the hooks the connection to the host's port would pass
//!   (output, postrouting and input over loopback, with the nat output chain's DNAT or
//!   docker-proxy behind them); the connection to the container passes its hooks either way.
//! - egress from a bridge: its containers' new outbound IPv4 TCP/UDP connections out of an
//!   uplink, which xbr source-NATs to an uplink's address itself, and their replies; they
//!   skip the container port's and the bridge's netdev hooks, the bridge family's hooks (the
//!   requests are for the bridge's MAC), the ip hooks of both directions and the uplink's
//!   netdev ingress. A masquerade, or an snat to an uplink's address, is xbr's own
//!   translation there, as a published port's own DNAT is.

mod eval;
mod events;
pub mod model;
mod nft;
mod read;
mod xtables;

use std::net::{IpAddr, Ipv4Addr};

pub use eval::{Hold, Pattern, Translation, Why};
use eval::{Packets, Traversal, holds, holds_and_state};
pub use events::RulesetChanges;
use model::{ConntrackState, Family, Hook, Layer3};
pub use read::{Firewall, ReadError, read};

/// One bridge and its container ports, as the east-west class sees them.
#[derive(Clone, Debug)]
pub struct Bridge<'a> {
    pub name: &'a str,
    pub ports: &'a [String],
    /// The containers' IPv4 addresses, when the datapath takes only IPv4 frames from a
    /// container's own address to another's (`None`: any address, for all the rules know).
    pub own_ipv4: Option<&'a [Ipv4Addr]>,
}

/// Every hold-back for east-west frames on `bridge`.
pub fn east_west(firewall: &Firewall, bridge: &Bridge) -> Vec<Hold> {
    let mut found = Vec::new();
    let mut by_state = false;
    for traversal in east_west_traversals(firewall, bridge) {
        let (holds, state) = holds_and_state(&firewall.ruleset, &traversal);
        found.extend(holds);
        by_state |= state;
    }
    // A held frame meets the rules with conntrack's view of its connection, and conntrack
    // sees only the frames that take the kernel path: where a rule decides by state (the CNI
    // firewall plugin's `-d A ctstate RELATED,ESTABLISHED -j ACCEPT` for C's replies to A), the
    // other direction of what is held is held too, so conntrack sees both (A's SYN to C, and C's
    // SYN-ACK is established, as without xbr).
    if by_state {
        for hold in &mut found {
            let reversed: Vec<Pattern> = hold
                .patterns
                .iter()
                .map(Pattern::reversed)
                .filter(|pattern| !hold.patterns.contains(pattern))
                .collect();
            hold.patterns.extend(reversed);
        }
    }
    found.extend(translated_replies(firewall, bridge));
    found
}

/// A published port: connections from the uplinks to (`host_ip` or any address, `host_port`)
/// go to `container_ip:container_port` behind bridge port `container_port_name`.
#[derive(Clone, Debug)]
pub struct Published<'a> {
    pub bridge: &'a str,
    pub uplinks: &'a [String],
    /// The container's bridge port; `None` when no container has the address now.
    pub port_name: Option<&'a str>,
    pub protocol: u8,
    pub host_ip: Option<Ipv4Addr>,
    pub host_port: u16,
    pub container_ip: Ipv4Addr,
    pub container_port: u16,
}

/// A client of a published port, as a hold-back names it; `None` fields: any.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Client {
    /// An address prefix (length 32: one address).
    pub address: Option<(Ipv4Addr, u8)>,
    pub port: Option<u16>,
}

/// What the policy holds back of a published port's connections.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct PublishedHolds {
    /// A rule that could touch every connection (the first found).
    pub whole: Option<Hold>,
    /// Rules that could touch the connections of some clients only.
    pub clients: Vec<(Client, Hold)>,
}

/// Which end of a published port's connection is the client in a traversal's packets.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum ClientIs {
    /// Requests: client to container.
    Source,
    /// Replies: container to client.
    Destination,
}

/// The first rule that could touch the host's own connections to `published` on the hooks
/// the socket hooks skip (`None`: the socket hooks may serve them).
pub fn host_clients(firewall: &Firewall, published: &Published) -> Option<Hold> {
    host_client_traversals(published)
        .iter()
        .flat_map(|traversal| holds(&firewall.ruleset, traversal))
        .next()
}

/// The hooks a host client's connection to a published port passes on its way to the
/// host's port, which a connection pointed at the container at connect() does not: the
/// request through output (where Docker's nat rule DNATs it, the translation the socket
/// hooks make) and postrouting, and over loopback through input to docker-proxy; the
/// replies the other way.
fn host_client_traversals(published: &Published) -> Vec<Traversal> {
    let loopback = names(&["lo"]);
    let none = names(&[""]);
    let request = Packets {
        layer3: any_of(&[Layer3::V4]),
        protocol: any_of(&[published.protocol]),
        destination: published.host_ip.map(|ip| vec![IpAddr::V4(ip)]),
        destination_port: any_of(&[published.host_port]),
        conntrack: any_of(&[ConntrackState::New, ConntrackState::Established]),
        dnat: any_of(&[false]),
        local_source: any_of(&[true]),
        local_destination: any_of(&[true]),
        ..Packets::default()
    };
    let reply = Packets {
        layer3: any_of(&[Layer3::V4]),
        protocol: any_of(&[published.protocol]),
        source: published.host_ip.map(|ip| vec![IpAddr::V4(ip)]),
        source_port: any_of(&[published.host_port]),
        conntrack: any_of(&[ConntrackState::Established]),
        dnat: any_of(&[false]),
        local_source: any_of(&[true]),
        local_destination: any_of(&[true]),
        ..Packets::default()
    };
    let ip = [Family::Ip, Family::Inet];
    let own_dnat = Some((IpAddr::V4(published.container_ip), published.container_port));
    let mut traversals = Vec::new();
    for (packets, first_packets) in [(request, true), (reply, false)] {
        let at =
            |hook, in_interface: &Option<Vec<String>>, out_interface, first_packets| Traversal {
                hook,
                families: ip.to_vec(),
                devices: None,
                packets: Packets {
                    in_interface: in_interface.clone(),
                    out_interface,
                    ..packets.clone()
                },
                first_packets,
                own_dnat,
                own_snat: None,
            };
        traversals.push(at(Hook::Output, &none, None, first_packets));
        // Over loopback to docker-proxy, a source NAT (a network's MASQUERADE of its subnet,
        // when the client dialled the bridge's own address) changes only the address the
        // proxy sees, never what the client gets: postrouting's nat chains are left out.
        traversals.push(at(Hook::Postrouting, &none, loopback.clone(), false));
        traversals.push(at(Hook::Input, &loopback, none.clone(), first_packets));
    }
    traversals
}

/// Every hold-back for the connections to `published`.
pub fn published(firewall: &Firewall, published: &Published) -> PublishedHolds {
    let mut found = PublishedHolds::default();
    for (client_is, traversal) in published_traversals(published) {
        for hold in holds(&firewall.ruleset, &traversal) {
            for pattern in &hold.patterns {
                let (host, prefix, port) = match client_is {
                    ClientIs::Source => {
                        (pattern.source, pattern.source_prefix, pattern.source_port)
                    }
                    ClientIs::Destination => (
                        pattern.destination,
                        pattern.destination_prefix,
                        pattern.destination_port,
                    ),
                };
                let address = match host.map(|host| (host, 32)).or(prefix) {
                    Some((IpAddr::V4(address), len)) => Some((address, len)),
                    // An IPv6 client is never one of an IPv4 published port.
                    Some((IpAddr::V6(_), _)) => continue,
                    None => None,
                };
                if address.is_none() && port.is_none() {
                    found.whole.get_or_insert_with(|| hold.clone());
                } else {
                    found.clients.push((Client { address, port }, hold.clone()));
                }
            }
        }
    }
    found
}

/// The mark of a packet that came in from a container or an uplink, for every packet of
/// the class that no rule holds back: a packet that crosses into the namespace, or comes
/// off a NIC, carries none, and every rule that could set one (`meta mark set`, `-j MARK`,
/// a mark restored from conntrack) holds back the packets it matches. So a mark match (the
/// CNI portmap plugin's `-m mark --mark 0x2000/0x2000 -j MASQUERADE`) is decided on mark 0.
/// The host's own clients are not: a socket can set its own (SO_MARK).
fn unmarked() -> Option<Vec<u32>> {
    Some(vec![0])
}

fn names(names: &[&str]) -> Option<Vec<String>> {
    Some(names.iter().map(|name| (*name).to_owned()).collect())
}

fn any_of<T: Clone>(values: &[T]) -> Option<Vec<T>> {
    Some(values.to_vec())
}

/// The hooks an east-west frame passes on the kernel path.
fn east_west_traversals(firewall: &Firewall, bridge: &Bridge) -> Vec<Traversal> {
    let ports = Some(bridge.ports.to_vec());
    let mut traversals = Vec::new();
    for (layer3, bridged_to_ip, ip_family) in [
        (Layer3::V4, firewall.bridged_ipv4, Family::Ip),
        (Layer3::V6, firewall.bridged_ipv6, Family::Ip6),
    ] {
        let own: Option<Vec<IpAddr>> = match (layer3, bridge.own_ipv4) {
            (Layer3::V4, Some(own)) => Some(own.iter().map(|a| IpAddr::V4(*a)).collect()),
            _ => None,
        };
        let bridged = Packets {
            layer3: any_of(&[layer3]),
            in_interface: ports.clone(),
            out_interface: ports.clone(),
            source: own.clone(),
            // Both directions of a connection are east-west: any state but the ones xbr
            // never takes (it takes no ICMP errors and nothing conntrack finds invalid; see
            // docs/DESIGN.md).
            conntrack: any_of(&[ConntrackState::New, ConntrackState::Established]),
            dnat: any_of(&[false]),
            // Containers send from their own addresses, not the host's (see docs/DESIGN.md)...
            local_source: any_of(&[false]),
            // ... and, where the datapath checks it, to another container's own address.
            local_destination: own.is_some().then(|| vec![false]),
            destination: own,
            mark: unmarked(),
            ..Packets::default()
        };
        let traversal = |hook, families: &[Family], packets: Packets| Traversal {
            hook,
            families: families.to_vec(),
            devices: None,
            packets,
            first_packets: true,
            own_dnat: None,
            own_snat: None,
        };
        traversals.push(Traversal {
            devices: ports.clone(),
            ..traversal(
                Hook::Ingress,
                &[Family::Netdev],
                Packets {
                    out_interface: None,
                    ..bridged.clone()
                },
            )
        });
        traversals.push(traversal(
            Hook::Prerouting,
            &[Family::Bridge],
            Packets {
                out_interface: names(&[""]),
                ..bridged.clone()
            },
        ));
        traversals.push(traversal(Hook::Forward, &[Family::Bridge], bridged.clone()));
        traversals.push(traversal(
            Hook::Postrouting,
            &[Family::Bridge],
            bridged.clone(),
        ));
        traversals.push(Traversal {
            devices: ports.clone(),
            ..traversal(
                Hook::Egress,
                &[Family::Netdev],
                Packets {
                    in_interface: None,
                    ..bridged.clone()
                },
            )
        });
        if !bridged_to_ip {
            continue;
        }
        // With br_netfilter, bridged frames also meet the ip (ip6) hooks, where the bridge is
        // their interface and the ports are their bridge ports (verified with counters).
        let families = [ip_family, Family::Inet];
        let packets = Packets {
            in_interface: names(&[bridge.name]),
            out_interface: names(&[bridge.name]),
            in_bridge_port: ports.clone(),
            out_bridge_port: ports.clone(),
            ..bridged
        };
        traversals.push(traversal(
            Hook::Prerouting,
            &families,
            Packets {
                out_interface: names(&[""]),
                out_bridge_port: names(&[""]),
                ..packets.clone()
            },
        ));
        traversals.push(traversal(Hook::Forward, &families, packets.clone()));
        traversals.push(traversal(
            Hook::Postrouting,
            &families,
            Packets {
                in_interface: names(&[""]),
                ..packets
            },
        ));
    }
    traversals
}

/// Replies of connections whose destination the kernel translated for a client on the
/// bridge (hairpin to a published port, a DNAT or REDIRECT rule toward a container,
/// kube-proxy's services): the client's request reached the host through the bridge, and
/// conntrack must translate the reply back, so xbr must not deliver it. Every destination
/// NAT the nat prerouting chains can apply to packets coming in on the bridge holds back the
/// frames that come from its target.
fn translated_replies(firewall: &Firewall, bridge: &Bridge) -> Vec<Hold> {
    let mut replies = Vec::new();
    for (layer3, family) in [(Layer3::V4, Family::Ip), (Layer3::V6, Family::Ip6)] {
        // The client is a container on the bridge (its reply is an east-west frame to it).
        let client = match (layer3, bridge.own_ipv4) {
            (Layer3::V4, Some(own)) => Some(own.iter().map(|a| IpAddr::V4(*a)).collect()),
            _ => None,
        };
        let traversal = Traversal {
            hook: Hook::Prerouting,
            families: vec![family, Family::Inet],
            devices: None,
            packets: Packets {
                layer3: any_of(&[layer3]),
                source: client,
                in_interface: names(&[bridge.name]),
                out_interface: names(&[""]),
                conntrack: any_of(&[ConntrackState::New]),
                local_source: any_of(&[false]),
                mark: unmarked(),
                ..Packets::default()
            },
            first_packets: true,
            own_dnat: None,
            own_snat: None,
        };
        for hold in holds(&firewall.ruleset, &traversal) {
            // Replies of a source NAT (or a redirect) go to the host, which routes them.
            let Why::Translates(Translation::Destination { to, port }) = hold.why else {
                continue;
            };
            replies.push(Hold {
                patterns: hold
                    .patterns
                    .iter()
                    .map(|pattern| Pattern {
                        layer3: pattern.layer3.or(Some(layer3)),
                        source: to,
                        protocol: pattern.protocol,
                        source_port: port,
                        ..Pattern::default()
                    })
                    .collect(),
                ..hold
            });
        }
    }
    replies
}

/// The hooks a published port's connections pass on the kernel path (Docker's `-p`: DNAT in
/// prerouting, forwarded into the bridge; replies back out of an uplink).
fn published_traversals(published: &Published) -> Vec<(ClientIs, Traversal)> {
    let uplinks = Some(published.uplinks.to_vec());
    let port = names(&[published.port_name.unwrap_or("")]);
    let bridge = names(&[published.bridge]);
    let container = Some(vec![IpAddr::V4(published.container_ip)]);
    let protocol = any_of(&[published.protocol]);
    let v4 = any_of(&[Layer3::V4]);
    let request = Packets {
        layer3: v4.clone(),
        in_interface: uplinks.clone(),
        // The datapath never takes a connection whose client claims the container's own
        // address (Docker masquerades that one, for its hairpin).
        source_is_not: vec![IpAddr::V4(published.container_ip)],
        protocol: protocol.clone(),
        destination: published.host_ip.map(|ip| vec![IpAddr::V4(ip)]),
        destination_port: any_of(&[published.host_port]),
        conntrack: any_of(&[ConntrackState::New, ConntrackState::Established]),
        local_destination: any_of(&[true]),
        // Martians: the kernel drops a packet from outside that claims a host address.
        local_source: any_of(&[false]),
        mark: unmarked(),
        ..Packets::default()
    };
    let translated = Packets {
        out_interface: bridge.clone(),
        out_bridge_port: port.clone(),
        destination: container.clone(),
        destination_port: any_of(&[published.container_port]),
        dnat: any_of(&[true]),
        local_destination: any_of(&[false]),
        ..request.clone()
    };
    let reply = Packets {
        layer3: v4,
        in_interface: bridge.clone(),
        in_bridge_port: port.clone(),
        protocol,
        source: container,
        source_port: any_of(&[published.container_port]),
        conntrack: any_of(&[ConntrackState::Established]),
        dnat: any_of(&[true]),
        local_source: any_of(&[false]),
        mark: unmarked(),
        ..Packets::default()
    };
    let at = |hook, families: &[Family], packets: Packets, first_packets| Traversal {
        hook,
        families: families.to_vec(),
        devices: None,
        packets,
        first_packets,
        own_dnat: None,
        own_snat: None,
    };
    let ip = [Family::Ip, Family::Inet];
    let requests = vec![
        Traversal {
            devices: uplinks.clone(),
            ..at(Hook::Ingress, &[Family::Netdev], request.clone(), true)
        },
        Traversal {
            own_dnat: Some((IpAddr::V4(published.container_ip), published.container_port)),
            ..at(Hook::Prerouting, &ip, request, true)
        },
        at(Hook::Forward, &ip, translated.clone(), true),
        at(
            Hook::Postrouting,
            &ip,
            Packets {
                in_interface: names(&[""]),
                ..translated.clone()
            },
            true,
        ),
        // Routed into the bridge: the bridge family's output and postrouting hooks.
        at(
            Hook::Output,
            &[Family::Bridge],
            Packets {
                in_interface: names(&[""]),
                out_interface: port.clone(),
                ..translated.clone()
            },
            true,
        ),
        at(
            Hook::Postrouting,
            &[Family::Bridge],
            Packets {
                in_interface: names(&[""]),
                out_interface: port.clone(),
                ..translated.clone()
            },
            true,
        ),
        Traversal {
            devices: port.clone(),
            ..at(
                Hook::Egress,
                &[Family::Netdev],
                Packets {
                    in_interface: None,
                    out_interface: port.clone(),
                    ..translated
                },
                true,
            )
        },
    ];
    // The container's replies: its port's netdev ingress, the bridge family's prerouting and
    // input (they are for the bridge's MAC), then routed out.
    let replies = vec![
        Traversal {
            devices: port.clone(),
            ..at(
                Hook::Ingress,
                &[Family::Netdev],
                Packets {
                    in_interface: port.clone(),
                    ..reply.clone()
                },
                false,
            )
        },
        at(
            Hook::Prerouting,
            &[Family::Bridge],
            Packets {
                in_interface: port.clone(),
                out_interface: names(&[""]),
                ..reply.clone()
            },
            false,
        ),
        at(
            Hook::Input,
            &[Family::Bridge],
            Packets {
                in_interface: port.clone(),
                out_interface: names(&[""]),
                ..reply.clone()
            },
            false,
        ),
        at(
            Hook::Prerouting,
            &ip,
            Packets {
                out_interface: names(&[""]),
                ..reply.clone()
            },
            false,
        ),
        at(
            Hook::Forward,
            &ip,
            Packets {
                out_interface: uplinks.clone(),
                ..reply.clone()
            },
            false,
        ),
        at(
            Hook::Postrouting,
            &ip,
            Packets {
                in_interface: names(&[""]),
                out_interface: uplinks,
                ..reply
            },
            false,
        ),
    ];
    let requests = requests.into_iter().map(|t| (ClientIs::Source, t));
    let replies = replies.into_iter().map(|t| (ClientIs::Destination, t));
    requests.chain(replies).collect()
}

/// A bridge's egress: its containers' new outbound IPv4 TCP and UDP connections to
/// destinations outside its subnets that go out of an uplink, which xbr translates to an
/// uplink's address itself, and their replies.
#[derive(Clone, Debug)]
pub struct Egress<'a> {
    pub bridge: &'a str,
    /// The containers' ports on the bridge.
    pub ports: &'a [String],
    /// The bridge's IPv4 subnets: the containers' addresses are in them, the destinations
    /// of egress are not.
    pub subnets: &'a [(Ipv4Addr, u8)],
    pub uplinks: &'a [String],
    /// The uplinks' addresses, the ones xbr translates the containers' to.
    pub uplink_addresses: &'a [Ipv4Addr],
}

/// Every hold-back for `egress` (empty: nothing on the hooks it skips could change its
/// packets' fate). A masquerade, or an snat to an uplink's address, on the way out of an
/// uplink is the translation xbr makes itself, so it holds nothing back.
pub fn egress(firewall: &Firewall, egress: &Egress) -> Vec<Hold> {
    egress_traversals(firewall, egress)
        .iter()
        .flat_map(|traversal| holds(&firewall.ruleset, traversal))
        .collect()
}

/// The hooks egress passes on the kernel path. Requests: the container port's netdev
/// ingress, the bridge family's prerouting and input (they are for the bridge's MAC), the
/// bridge's own netdev ingress, then routed: ip prerouting (with br_netfilter as a bridged
/// frame, its physdev the port), forward and postrouting, where the source NAT is. Replies:
/// the uplink's netdev ingress, ip prerouting (where conntrack translates the destination
/// back to the container), forward and postrouting into the bridge, the bridge's netdev
/// egress, the bridge family's output and postrouting and the port's netdev egress. nat
/// chains see only connections' first packets, so they are walked for requests only.
fn egress_traversals(firewall: &Firewall, egress: &Egress) -> Vec<Traversal> {
    let ports = Some(egress.ports.to_vec());
    let ports_or_none = Some(
        egress
            .ports
            .iter()
            .cloned()
            .chain([String::new()])
            .collect(),
    );
    let bridge = names(&[egress.bridge]);
    let uplinks = Some(egress.uplinks.to_vec());
    let none = names(&[""]);
    let subnets: Vec<(IpAddr, u8)> = egress
        .subnets
        .iter()
        .map(|(address, len)| (IpAddr::V4(*address), *len))
        .collect();
    let uplink_hosts: Vec<(IpAddr, u8)> = egress
        .uplink_addresses
        .iter()
        .map(|address| (IpAddr::V4(*address), 32))
        .collect();
    let subnets_or_uplinks: Vec<(IpAddr, u8)> =
        subnets.iter().chain(&uplink_hosts).copied().collect();
    // With br_netfilter the ip hooks see the bridge port a request came in on (physdev);
    // without it, none.
    let in_bridge_port = if firewall.bridged_ipv4 {
        ports.clone()
    } else {
        none.clone()
    };
    let tcp_udp = any_of(&[6, 17]);
    let v4 = any_of(&[Layer3::V4]);
    let request = Packets {
        layer3: v4.clone(),
        protocol: tcp_udp.clone(),
        // Containers send from their own addresses (see docs/DESIGN.md), in the subnet...
        source_within: subnets.clone(),
        local_source: any_of(&[false]),
        // ... to a destination outside it that is not the host's.
        destination_outside: subnets.clone(),
        local_destination: any_of(&[false]),
        conntrack: any_of(&[ConntrackState::New, ConntrackState::Established]),
        dnat: any_of(&[false]),
        mark: unmarked(),
        ..Packets::default()
    };
    let reply = Packets {
        layer3: v4,
        protocol: tcp_udp,
        // Martians: the kernel drops a packet from outside that claims a host address.
        source_outside: subnets.clone(),
        local_source: any_of(&[false]),
        destination_within: subnets.clone(),
        local_destination: any_of(&[false]),
        conntrack: any_of(&[ConntrackState::Established]),
        dnat: any_of(&[false]),
        mark: unmarked(),
        ..Packets::default()
    };
    let at = |hook, families: &[Family], devices: &Option<Vec<String>>, packets, first_packets| {
        Traversal {
            hook,
            families: families.to_vec(),
            devices: devices.clone(),
            packets,
            first_packets,
            own_dnat: None,
            own_snat: None,
        }
    };
    let ip = [Family::Ip, Family::Inet];
    let netdev = [Family::Netdev];
    let bridge_family = [Family::Bridge];
    let requests = vec![
        at(
            Hook::Ingress,
            &netdev,
            &ports,
            Packets {
                in_interface: ports.clone(),
                ..request.clone()
            },
            true,
        ),
        at(
            Hook::Prerouting,
            &bridge_family,
            &None,
            Packets {
                in_interface: ports.clone(),
                out_interface: none.clone(),
                ..request.clone()
            },
            true,
        ),
        at(
            Hook::Input,
            &bridge_family,
            &None,
            Packets {
                in_interface: ports.clone(),
                out_interface: none.clone(),
                ..request.clone()
            },
            true,
        ),
        at(
            Hook::Ingress,
            &netdev,
            &bridge,
            Packets {
                in_interface: bridge.clone(),
                ..request.clone()
            },
            true,
        ),
        at(
            Hook::Prerouting,
            &ip,
            &None,
            Packets {
                in_interface: bridge.clone(),
                out_interface: none.clone(),
                in_bridge_port: in_bridge_port.clone(),
                out_bridge_port: none.clone(),
                ..request.clone()
            },
            true,
        ),
        at(
            Hook::Forward,
            &ip,
            &None,
            Packets {
                in_interface: bridge.clone(),
                out_interface: uplinks.clone(),
                in_bridge_port: in_bridge_port.clone(),
                out_bridge_port: none.clone(),
                ..request.clone()
            },
            true,
        ),
        Traversal {
            // Translated here: chains after the source NAT see an uplink's address.
            own_snat: Some(
                egress
                    .uplink_addresses
                    .iter()
                    .map(|a| IpAddr::V4(*a))
                    .collect(),
            ),
            ..at(
                Hook::Postrouting,
                &ip,
                &None,
                Packets {
                    in_interface: none.clone(),
                    out_interface: uplinks.clone(),
                    in_bridge_port,
                    out_bridge_port: none.clone(),
                    source_within: subnets_or_uplinks.clone(),
                    local_source: None,
                    ..request
                },
                true,
            )
        },
    ];
    let replies = vec![
        at(
            Hook::Ingress,
            &netdev,
            &uplinks,
            Packets {
                in_interface: uplinks.clone(),
                // Still to an uplink's address.
                destination_within: uplink_hosts,
                local_destination: any_of(&[true]),
                ..reply.clone()
            },
            false,
        ),
        at(
            Hook::Prerouting,
            &ip,
            &None,
            Packets {
                in_interface: uplinks.clone(),
                out_interface: none.clone(),
                in_bridge_port: none.clone(),
                out_bridge_port: none.clone(),
                // Chains before conntrack's translation back see an uplink's address.
                destination_within: subnets_or_uplinks,
                local_destination: None,
                ..reply.clone()
            },
            false,
        ),
        at(
            Hook::Forward,
            &ip,
            &None,
            Packets {
                in_interface: uplinks.clone(),
                out_interface: bridge.clone(),
                in_bridge_port: none.clone(),
                out_bridge_port: ports_or_none.clone(),
                ..reply.clone()
            },
            false,
        ),
        at(
            Hook::Postrouting,
            &ip,
            &None,
            Packets {
                in_interface: none.clone(),
                out_interface: bridge.clone(),
                in_bridge_port: none.clone(),
                out_bridge_port: ports_or_none,
                ..reply.clone()
            },
            false,
        ),
        at(
            Hook::Egress,
            &netdev,
            &bridge,
            Packets {
                out_interface: bridge.clone(),
                ..reply.clone()
            },
            false,
        ),
        at(
            Hook::Output,
            &bridge_family,
            &None,
            Packets {
                in_interface: none.clone(),
                out_interface: ports.clone(),
                ..reply.clone()
            },
            false,
        ),
        at(
            Hook::Postrouting,
            &bridge_family,
            &None,
            Packets {
                in_interface: none,
                out_interface: ports.clone(),
                ..reply.clone()
            },
            false,
        ),
        at(
            Hook::Egress,
            &netdev,
            &ports,
            Packets {
                out_interface: ports.clone(),
                ..reply
            },
            false,
        ),
    ];
    requests.into_iter().chain(replies).collect()
}

impl std::fmt::Display for Hold {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let verb = match &self.why {
            Why::PolicyDrops => "drops it (no rule accepts it)".to_owned(),
            why => format!("{why} it"),
        };
        write!(
            f,
            "{} {verb} on the kernel path ({} hook)",
            self.rule,
            self.hook.name()
        )
    }
}

impl std::fmt::Display for Pattern {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let any = |value: Option<String>| value.unwrap_or_else(|| "*".to_owned());
        let protocol = match self.protocol {
            Some(6) => "tcp".to_owned(),
            Some(17) => "udp".to_owned(),
            Some(1) => "icmp".to_owned(),
            Some(58) => "icmpv6".to_owned(),
            Some(other) => format!("protocol {other}"),
            None => match self.layer3 {
                Some(Layer3::V4) => "ipv4".to_owned(),
                Some(Layer3::V6) => "ipv6".to_owned(),
                _ => "ip".to_owned(),
            },
        };
        let address = |host: Option<IpAddr>, prefix: Option<(IpAddr, u8)>| {
            host.map(|a| a.to_string())
                .or(prefix.map(|(a, len)| format!("{a}/{len}")))
        };
        write!(
            f,
            "{protocol} {}:{} -> {}:{}",
            any(address(self.source, self.source_prefix)),
            any(self.source_port.map(|p| p.to_string())),
            any(address(self.destination, self.destination_prefix)),
            any(self.destination_port.map(|p| p.to_string())),
        )
    }
}

#[cfg(test)]
mod egress_tests;
#[cfg(test)]
mod tests;
