//! Egress NAT's control plane: whether a bridge's containers' new outbound flows take the
//! datapath's source NAT (`decide`, pure), from what is true now (`observe`); and which
//! tuples the kernel path owns (`kernel_flows`), which egress must leave alone.
//!
//! Egress is asked for by `xbr attach --masquerade`, or by the Docker network that owns the
//! bridge (Docker masquerades a network unless it is `--internal` or has
//! `com.docker.network.bridge.enable_ip_masquerade=false`). It is taken only where the kernel
//! path would do the same: the rules on its hooks (read by the policy reader) change nothing
//! but the masquerade that xbr makes itself.

use std::{collections::BTreeSet, net::Ipv4Addr};

use bridge_common::{EgressConfig, FlowKey, IPPROTO_TCP, IPPROTO_UDP};
use futures::TryStreamExt as _;
use netlink_packet_route::{
    AddressFamily,
    address::AddressAttribute,
    link::{LinkAttribute, LinkMessage},
};
use rtnetlink::Handle;

use crate::{
    conntrack::Tracked,
    error::{Error, Result},
    observe::UplinkView,
};

/// Who asked for egress NAT on a bridge.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Requested {
    /// Nobody: outbound flows are the kernel's.
    No,
    /// `xbr attach --masquerade`.
    ByUser,
    /// The Docker network that owns the bridge, with its settings.
    ByDocker {
        network: String,
        masquerade: bool,
        internal: bool,
    },
}

/// An uplink as egress sees it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Uplink {
    pub name: String,
    pub ifindex: u32,
    /// Its first IPv4 address: what flows leaving by it are translated to.
    pub address: Option<Ipv4Addr>,
    pub mtu: u32,
}

/// What is true now, for the decision.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Facts {
    pub requested: Requested,
    pub bridge_ifindex: u32,
    /// The bridge's IPv4 addresses with their prefix lengths: the containers' subnets.
    pub subnets: Vec<(Ipv4Addr, u8)>,
    pub bridge_mtu: u32,
    pub uplinks: Vec<Uplink>,
    /// `net.ipv4.ip_local_port_range`: the ports of the host's own connections, and the ones
    /// the kernel's MASQUERADE keeps for containers (theirs come from the same default).
    pub local_ports: (u16, u16),
    /// What the policy reader says of the class (`None`: no rule could change its fate).
    pub held_by: Option<String>,
}

/// The decision for one bridge.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Egress {
    /// New outbound flows from `subnet` are translated to the uplinks' addresses, with source
    /// ports `ports` except `skip`.
    Accelerated {
        subnet: (Ipv4Addr, u8),
        uplinks: Vec<(Uplink, Ipv4Addr)>,
        ports: (u16, u16),
        skip: (u16, u16),
    },
    /// The kernel path keeps egress, for this reason.
    Kernel(String),
}

impl Egress {
    /// The `EGRESS` map's entry.
    pub fn config(&self, bridge_ifindex: u32) -> EgressConfig {
        match self {
            Egress::Accelerated {
                subnet: (address, prefix_len),
                ports: (port_min, port_max),
                skip: (skip_min, skip_max),
                ..
            } => {
                let mask = prefix_mask(*prefix_len);
                EgressConfig {
                    enabled: 1,
                    bridge_ifindex,
                    subnet: (u32::from(*address) & mask).to_be_bytes(),
                    subnet_mask: mask.to_be_bytes(),
                    port_min: *port_min,
                    port_max: *port_max,
                    skip_min: *skip_min,
                    skip_max: *skip_max,
                }
            }
            Egress::Kernel(_) => EgressConfig::default(),
        }
    }

    /// The `EGRESS_UPLINKS` entries: uplink ifindex -> address.
    pub fn uplink_addresses(&self) -> Vec<(u32, Ipv4Addr)> {
        match self {
            Egress::Accelerated { uplinks, .. } => uplinks
                .iter()
                .map(|(uplink, address)| (uplink.ifindex, *address))
                .collect(),
            Egress::Kernel(_) => Vec::new(),
        }
    }

    pub fn is_accelerated(&self) -> bool {
        matches!(self, Egress::Accelerated { .. })
    }
}

/// One line: accelerated (from which subnet, to which addresses, with which ports) or on the
/// kernel path, and why.
impl std::fmt::Display for Egress {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Egress::Accelerated {
                subnet: (address, prefix_len),
                uplinks,
                ports: (port_min, port_max),
                skip: (skip_min, skip_max),
            } => {
                let to: Vec<String> = uplinks
                    .iter()
                    .map(|(uplink, address)| format!("{address} on {}", uplink.name))
                    .collect();
                write!(
                    f,
                    "accelerated: new outbound flows from {address}/{prefix_len} are \
                     source-NATed to {} (ports {port_min}-{port_max} except \
                     {skip_min}-{skip_max})",
                    to.join(", ")
                )
            }
            Egress::Kernel(reason) => write!(f, "kernel path: {reason}"),
        }
    }
}

fn prefix_mask(prefix_len: u8) -> u32 {
    match prefix_len {
        0 => 0,
        len => u32::MAX << (32 - u32::from(len.min(32))),
    }
}

/// Whether egress takes the fast path, and why not.
pub fn decide(facts: &Facts) -> Egress {
    match &facts.requested {
        Requested::No => {
            return Egress::Kernel(
                "not asked for (`xbr attach --masquerade`, or a Docker network that masquerades)"
                    .into(),
            );
        }
        Requested::ByDocker {
            network, internal, ..
        } if *internal => {
            return Egress::Kernel(format!(
                "Docker network {network} is internal: its containers do not reach the outside"
            ));
        }
        Requested::ByDocker {
            network,
            masquerade,
            ..
        } if !masquerade => {
            return Egress::Kernel(format!(
                "Docker network {network} does not masquerade (enable_ip_masquerade=false, or \
                 gateway_mode_ipv4 routed or isolated): its containers' addresses are routed as \
                 they are"
            ));
        }
        _ => {}
    }
    let Some(subnet) = facts.subnets.first().copied() else {
        return Egress::Kernel("the bridge has no IPv4 address: no subnet to masquerade".into());
    };
    let uplinks: Vec<(Uplink, Ipv4Addr)> = facts
        .uplinks
        .iter()
        // A frame the container may send must fit the uplink whole: the kernel path would
        // fragment it (or answer "fragmentation needed"), the datapath does neither.
        .filter(|uplink| uplink.mtu >= facts.bridge_mtu)
        .filter_map(|uplink| uplink.address.map(|address| (uplink.clone(), address)))
        .collect();
    if uplinks.is_empty() {
        return Egress::Kernel(if facts.uplinks.is_empty() {
            "no uplink (`xbr attach BRIDGE --uplink IFACE`)".into()
        } else {
            format!(
                "no uplink with an IPv4 address and an MTU of at least the bridge's {} ({})",
                facts.bridge_mtu,
                facts
                    .uplinks
                    .iter()
                    .map(|u| u.name.as_str())
                    .collect::<Vec<_>>()
                    .join(", ")
            )
        });
    }
    let (local_min, local_max) = facts.local_ports;
    if local_min <= FIRST_PORT && local_max == u16::MAX {
        return Egress::Kernel(format!(
            "net.ipv4.ip_local_port_range is {local_min}-{local_max}: no source ports are left \
             that the host's own connections never use"
        ));
    }
    if let Some(rule) = &facts.held_by {
        return Egress::Kernel(rule.clone());
    }
    Egress::Accelerated {
        subnet,
        uplinks,
        ports: (FIRST_PORT, u16::MAX),
        skip: (local_min.max(FIRST_PORT), local_max),
    }
}

/// Below it, the well-known ports: never given to a flow.
pub const FIRST_PORT: u16 = 1024;

/// This namespace's `net.ipv4.ip_local_port_range` (32768-60999 by default).
pub fn local_ports() -> Result<(u16, u16)> {
    let path = "/proc/sys/net/ipv4/ip_local_port_range";
    let text =
        std::fs::read_to_string(path).map_err(|e| Error::io(format!("reading {path}"), e))?;
    let mut ends = text.split_whitespace().map(str::parse::<u16>);
    match (ends.next(), ends.next()) {
        (Some(Ok(min)), Some(Ok(max))) if min <= max => Ok((min, max)),
        _ => Err(Error::io(
            format!("reading {path}"),
            std::io::Error::other(format!("unexpected contents {text:?}")),
        )),
    }
}

/// The bridge's IPv4 subnets and MTU, and the uplinks' addresses and MTUs, from netlink.
pub async fn observe_links(
    handle: &Handle,
    bridge_ifindex: u32,
    uplinks: &[UplinkView],
) -> Result<(Vec<(Ipv4Addr, u8)>, u32, Vec<Uplink>)> {
    let mut addresses: Vec<(u32, Ipv4Addr, u8)> = Vec::new();
    let mut stream = handle.address().get().execute();
    while let Some(message) = stream
        .try_next()
        .await
        .map_err(|e| Error::netlink("listing this namespace's addresses", e))?
    {
        if message.header.family != AddressFamily::Inet {
            continue;
        }
        // IFA_LOCAL is the interface's own address (IFA_ADDRESS the peer's, on a
        // point-to-point link); on others the two are the same.
        let local = message.attributes.iter().find_map(|a| match a {
            AddressAttribute::Local(std::net::IpAddr::V4(a)) => Some(*a),
            _ => None,
        });
        let address = local.or_else(|| {
            message.attributes.iter().find_map(|a| match a {
                AddressAttribute::Address(std::net::IpAddr::V4(a)) => Some(*a),
                _ => None,
            })
        });
        if let Some(address) = address {
            addresses.push((message.header.index, address, message.header.prefix_len));
        }
    }
    let subnets = addresses
        .iter()
        .filter(|(index, _, _)| *index == bridge_ifindex)
        .map(|(_, address, prefix_len)| (*address, *prefix_len))
        .collect();
    let bridge_mtu = link_mtu(handle, bridge_ifindex).await?;
    let mut found = Vec::new();
    for uplink in uplinks {
        found.push(Uplink {
            name: uplink.name.clone(),
            ifindex: uplink.ifindex,
            address: addresses
                .iter()
                .find(|(index, _, _)| *index == uplink.ifindex)
                .map(|(_, address, _)| *address),
            mtu: link_mtu(handle, uplink.ifindex).await?,
        });
    }
    Ok((subnets, bridge_mtu, found))
}

async fn link_mtu(handle: &Handle, ifindex: u32) -> Result<u32> {
    let mut links = handle.link().get().match_index(ifindex).execute();
    let link: Option<LinkMessage> = links
        .try_next()
        .await
        .map_err(|e| Error::netlink(format!("reading link {ifindex}"), e))?;
    Ok(link
        .and_then(|link| {
            link.attributes.into_iter().find_map(|a| match a {
                LinkAttribute::Mtu(mtu) => Some(mtu),
                _ => None,
            })
        })
        .unwrap_or(1500))
}

/// The tuples of `connections` (the kernel's conntrack) that egress must leave to the kernel
/// path: a container's side of every flow from `subnet` (it began on the kernel path, or xbr
/// left it there), and the uplink side of every connection to an uplink address on a port
/// egress gives (a translation of the kernel's, a connection of the host's: egress must not
/// give that port to a flow to the same destination).
pub fn kernel_flows(connections: &[Tracked], egress: &Egress) -> BTreeSet<FlowKey> {
    let Egress::Accelerated {
        subnet: (address, prefix_len),
        uplinks,
        ports: (port_min, port_max),
        skip: (skip_min, skip_max),
    } = egress
    else {
        return BTreeSet::new();
    };
    let mask = prefix_mask(*prefix_len);
    let in_subnet = |a: Ipv4Addr| u32::from(a) & mask == u32::from(*address) & mask;
    let uplink_addresses: BTreeSet<Ipv4Addr> = uplinks.iter().map(|(_, a)| *a).collect();
    let mut keys = BTreeSet::new();
    for connection in connections {
        if connection.protocol != IPPROTO_TCP && connection.protocol != IPPROTO_UDP {
            continue;
        }
        let original = &connection.original;
        if in_subnet(original.source) {
            keys.insert(flow_key(connection.protocol, original));
        }
        let reply = &connection.reply;
        if uplink_addresses.contains(&reply.destination)
            && (*port_min..=*port_max).contains(&reply.destination_port)
            && !(*skip_min..=*skip_max).contains(&reply.destination_port)
        {
            keys.insert(flow_key(connection.protocol, reply));
        }
    }
    keys
}

fn flow_key(protocol: u8, tuple: &crate::conntrack::Tuple) -> FlowKey {
    FlowKey {
        proto: protocol,
        _pad: [0; 3],
        src_ip: tuple.source.octets(),
        dst_ip: tuple.destination.octets(),
        src_port: tuple.source_port.to_be_bytes(),
        dst_port: tuple.destination_port.to_be_bytes(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::conntrack::Tuple;

    fn facts() -> Facts {
        Facts {
            requested: Requested::ByUser,
            bridge_ifindex: 3,
            subnets: vec![(Ipv4Addr::new(172, 17, 0, 1), 16)],
            bridge_mtu: 1500,
            uplinks: vec![Uplink {
                name: "eth0".into(),
                ifindex: 2,
                address: Some(Ipv4Addr::new(192, 0, 2, 10)),
                mtu: 1500,
            }],
            local_ports: (32768, 60999),
            held_by: None,
        }
    }

    #[test]
    fn masquerade_asked_for_takes_the_ports_above_the_local_range() {
        let egress = decide(&facts());
        let Egress::Accelerated {
            ports,
            skip,
            subnet,
            ..
        } = &egress
        else {
            panic!("{egress:?}");
        };
        assert_eq!((*ports, *skip), ((1024, 65535), (32768, 60999)));
        assert_eq!(
            egress.to_string(),
            "accelerated: new outbound flows from 172.17.0.1/16 are source-NATed to 192.0.2.10 \
             on eth0 (ports 1024-65535 except 32768-60999)"
        );
        assert_eq!(*subnet, (Ipv4Addr::new(172, 17, 0, 1), 16));
        let config = egress.config(3);
        assert_eq!(config.subnet, [172, 17, 0, 0]);
        assert_eq!(config.subnet_mask, [255, 255, 0, 0]);
        assert_eq!((config.enabled, config.bridge_ifindex), (1, 3));
        assert_eq!(
            egress.uplink_addresses(),
            vec![(2, Ipv4Addr::new(192, 0, 2, 10))]
        );
    }

    #[test]
    fn every_reason_to_stay_on_the_kernel_path_is_named() {
        let cases: Vec<(Facts, &str)> = vec![
            (
                Facts {
                    requested: Requested::No,
                    ..facts()
                },
                "not asked for",
            ),
            (
                Facts {
                    requested: Requested::ByDocker {
                        network: "backend".into(),
                        masquerade: true,
                        internal: true,
                    },
                    ..facts()
                },
                "backend is internal",
            ),
            (
                Facts {
                    requested: Requested::ByDocker {
                        network: "flat".into(),
                        masquerade: false,
                        internal: false,
                    },
                    ..facts()
                },
                "enable_ip_masquerade=false",
            ),
            (
                Facts {
                    subnets: vec![],
                    ..facts()
                },
                "no IPv4 address",
            ),
            (
                Facts {
                    uplinks: vec![],
                    ..facts()
                },
                "--uplink",
            ),
            (
                Facts {
                    bridge_mtu: 9000,
                    ..facts()
                },
                "MTU of at least the bridge's 9000 (eth0)",
            ),
            (
                Facts {
                    local_ports: (1024, 65535),
                    ..facts()
                },
                "is 1024-65535: no source ports are left",
            ),
            (
                Facts {
                    held_by: Some("rule X drops".into()),
                    ..facts()
                },
                "rule X drops",
            ),
        ];
        for (facts, expected) in cases {
            match decide(&facts) {
                Egress::Kernel(reason) => assert!(reason.contains(expected), "{reason}"),
                accelerated => panic!("{facts:?} gave {accelerated:?}"),
            }
        }
        let docker = Facts {
            requested: Requested::ByDocker {
                network: "bridge".into(),
                masquerade: true,
                internal: false,
            },
            ..facts()
        };
        assert!(decide(&docker).is_accelerated());
        assert_eq!(decide(&facts()).config(3).enabled, 1);
        assert_eq!(
            Egress::Kernel(String::new()).config(3),
            EgressConfig::default()
        );
    }

    #[test]
    fn the_kernels_flows_and_its_translations_into_the_range_are_left_to_it() {
        let tuple = |s: [u8; 4], sp, d: [u8; 4], dp| Tuple {
            source: Ipv4Addr::from(s),
            destination: Ipv4Addr::from(d),
            source_port: sp,
            destination_port: dp,
        };
        let connections = [
            // A container's flow the kernel masqueraded, keeping its port.
            Tracked {
                protocol: IPPROTO_UDP,
                original: tuple([172, 17, 0, 2], 40000, [198, 51, 100, 7], 53),
                reply: tuple([198, 51, 100, 7], 53, [192, 0, 2, 10], 40000),
            },
            // Another bridge's flow that the kernel moved into xbr's range.
            Tracked {
                protocol: IPPROTO_TCP,
                original: tuple([10, 9, 0, 2], 40000, [198, 51, 100, 7], 443),
                reply: tuple([198, 51, 100, 7], 443, [192, 0, 2, 10], 62000),
            },
            // The host's own connection: neither.
            Tracked {
                protocol: IPPROTO_TCP,
                original: tuple([192, 0, 2, 10], 50000, [198, 51, 100, 7], 22),
                reply: tuple([198, 51, 100, 7], 22, [192, 0, 2, 10], 50000),
            },
            // Not TCP or UDP.
            Tracked {
                protocol: 1,
                original: tuple([172, 17, 0, 2], 0, [198, 51, 100, 7], 0),
                reply: tuple([198, 51, 100, 7], 0, [192, 0, 2, 10], 62001),
            },
        ];
        let keys = kernel_flows(&connections, &decide(&facts()));
        let expected: BTreeSet<FlowKey> = [
            flow_key(IPPROTO_UDP, &connections[0].original),
            flow_key(IPPROTO_TCP, &connections[1].reply),
        ]
        .into();
        assert_eq!(keys, expected);
        assert!(kernel_flows(&connections, &Egress::Kernel(String::new())).is_empty());
    }
}
