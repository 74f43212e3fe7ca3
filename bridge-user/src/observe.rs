//! Observe: read a bridge, its ports and the containers behind them from the kernel into
//! plain values. Nothing here changes the kernel; `plan` decides what to do with the view.

use std::net::IpAddr;

use futures::TryStreamExt as _;
use netlink_packet_route::{
    AddressFamily,
    address::{AddressAttribute, AddressMessage},
    link::{
        BridgePortState, InfoBridge, InfoBridgePort, InfoData, InfoKind, InfoPortData, InfoVxlan,
        LinkAttribute, LinkFlags, LinkInfo, LinkMessage,
    },
    neighbour::{NeighbourAddress, NeighbourAttribute, NeighbourFlags, NeighbourMessage},
};
use rtnetlink::Handle;

pub use crate::netlink::link_name;
use crate::{
    error::{Error, Result},
    netlink::{self, link_infos},
};

pub type Mac = [u8; 6];

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct BridgeView {
    pub name: String,
    pub ifindex: u32,
    pub mac: Mac,
    pub vlan_filtering: bool,
    /// Whether the containers' addresses were read (`Detail::Addresses`).
    pub addresses_read: bool,
    pub ports: Vec<PortView>,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PortView {
    pub name: String,
    pub ifindex: u32,
    /// The link kind ("veth", "tun", ...; empty for a physical NIC).
    pub kind: String,
    pub mac: Mac,
    pub state: PortState,
    /// Bridge port isolation: isolated ports may not talk to each other.
    pub isolated: bool,
    /// The other end of a veth port: the container's interface.
    pub peer: Option<PeerView>,
    /// A VXLAN port: the containers on other hosts that its own forwarding table sends to.
    pub tunnel: Option<TunnelView>,
}

/// A VXLAN bridge port, as an overlay network (Docker's `vxlan0`) uses one.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct TunnelView {
    /// Metadata mode (`external`): the device has no forwarding table of its own, frames
    /// need a tunnel key from whoever sends them.
    pub external: bool,
    /// The static entries of the device's forwarding table (`bridge fdb ... dst NODE self
    /// permanent`, what Docker writes for a container on another node).
    pub remotes: Vec<RemoteView>,
}

/// A MAC that a VXLAN device sends to another host.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RemoteView {
    pub mac: Mac,
    /// The host (VTEP) the device encapsulates it to.
    pub node: IpAddr,
    /// The container's IPv4 address, from a static neighbour entry on the device.
    pub ipv4: Option<std::net::Ipv4Addr>,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum PortState {
    Forwarding,
    /// Disabled (link down), listening, learning or blocking: the bridge forwards nothing
    /// from or to it.
    NotForwarding,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PeerView {
    pub name: String,
    pub mac: Mac,
    pub addresses: Vec<IpAddr>,
}

/// How much to read about the containers behind the ports.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Detail {
    /// Their MACs: what a plan needs.
    Macs,
    /// Their MACs and IP addresses, for showing people (one more request per container).
    Addresses,
}

/// Reads bridge `name` and every port on it.
pub async fn bridge(handle: &Handle, name: &str, detail: Detail) -> Result<BridgeView> {
    let message = link_by_name(handle, name)
        .await?
        .ok_or_else(|| Error::BridgeNotFound(name.to_owned()))?;
    let kind = link_kind(&message);
    if kind != "bridge" {
        let kind = if kind.is_empty() {
            "physical".to_owned()
        } else {
            kind
        };
        return Err(Error::NotABridge {
            name: name.to_owned(),
            kind,
        });
    }
    let ifindex = message.header.index;
    let vlan_filtering =
        bridge_info(&message).any(|info| matches!(info, InfoBridge::VlanFiltering(true)));

    let mut ports = Vec::new();
    let mut links = handle.link().get().execute();
    while let Some(link) = links
        .try_next()
        .await
        .map_err(|e| Error::netlink(format!("listing the ports of {name}"), e))?
    {
        let controller = link.attributes.iter().find_map(|a| match a {
            LinkAttribute::Controller(index) => Some(*index),
            _ => None,
        });
        if controller == Some(ifindex) {
            ports.push(port(handle, &link, detail).await?);
        }
    }
    ports.sort_by_key(|p| p.ifindex);
    Ok(BridgeView {
        name: name.to_owned(),
        ifindex,
        mac: link_mac(&message),
        vlan_filtering,
        addresses_read: detail == Detail::Addresses,
        ports,
    })
}

async fn port(handle: &Handle, link: &LinkMessage, detail: Detail) -> Result<PortView> {
    let kind = link_kind(link);
    let port_info: Vec<&InfoBridgePort> = link_infos(link)
        .filter_map(|info| match info {
            LinkInfo::PortData(InfoPortData::BridgePort(infos)) => Some(infos.iter()),
            _ => None,
        })
        .flatten()
        .collect();
    let forwarding = port_info
        .iter()
        .any(|i| matches!(i, InfoBridgePort::State(BridgePortState::Forwarding)));
    let isolated = port_info
        .iter()
        .any(|i| matches!(i, InfoBridgePort::Isolated(true)));
    let up = link.header.flags.contains(LinkFlags::Up);
    let peer = if kind == "veth" {
        veth_peer(handle, link, detail).await?
    } else {
        None
    };
    let tunnel = if kind == "vxlan" {
        Some(tunnel(handle, link).await?)
    } else {
        None
    };
    Ok(PortView {
        name: link_name(link),
        ifindex: link.header.index,
        kind,
        mac: link_mac(link),
        state: if forwarding && up {
            PortState::Forwarding
        } else {
            PortState::NotForwarding
        },
        isolated,
        peer,
        tunnel,
    })
}

/// A VXLAN port's static remote MACs: its own forwarding table's permanent entries with a
/// destination (learned entries age out and are the bridge's business), each with the IPv4
/// address a permanent neighbour entry on the device gives it.
async fn tunnel(handle: &Handle, link: &LinkMessage) -> Result<TunnelView> {
    let ifindex = link.header.index;
    let external = link_infos(link).any(|info| {
        matches!(info, LinkInfo::Data(InfoData::Vxlan(infos))
            if infos.iter().any(|i| matches!(i, InfoVxlan::CollectMetadata(true))))
    });
    // NUD_PERMANENT or NUD_NOARP; a VXLAN device reports its static entries with both bits.
    let static_entries = |message: &NeighbourMessage| {
        message.header.ifindex == ifindex && u16::from(message.header.state) & 0xc0 != 0
    };
    let mut addresses = std::collections::BTreeMap::new();
    let mut neighbours = handle
        .neighbours()
        .get()
        .set_address_family(AddressFamily::Inet)
        .execute();
    while let Some(message) = neighbours
        .try_next()
        .await
        .map_err(|e| Error::netlink("listing the neighbours of a VXLAN port", e))?
    {
        if !static_entries(&message) {
            continue;
        }
        let mut ipv4 = None;
        let mut mac = None;
        for attribute in &message.attributes {
            match attribute {
                NeighbourAttribute::Destination(NeighbourAddress::Inet(address)) => {
                    ipv4 = Some(*address)
                }
                NeighbourAttribute::LinkLayerAddress(bytes) => {
                    mac = <Mac>::try_from(bytes.as_slice()).ok()
                }
                _ => {}
            }
        }
        if let (Some(ipv4), Some(mac)) = (ipv4, mac) {
            addresses.insert(mac, ipv4);
        }
    }
    let mut remotes = Vec::new();
    let mut entries = handle
        .neighbours()
        .get()
        .set_address_family(AddressFamily::Bridge)
        .execute();
    while let Some(message) = entries
        .try_next()
        .await
        .map_err(|e| Error::netlink("listing the forwarding table of a VXLAN port", e))?
    {
        // `self`: the device's own table, not the bridge's entries for the port.
        if !static_entries(&message) || !message.header.flags.contains(NeighbourFlags::Own) {
            continue;
        }
        let mut node = None;
        let mut mac = None;
        for attribute in &message.attributes {
            match attribute {
                NeighbourAttribute::Destination(NeighbourAddress::Inet(address)) => {
                    node = Some(IpAddr::V4(*address))
                }
                NeighbourAttribute::Destination(NeighbourAddress::Inet6(address)) => {
                    node = Some(IpAddr::V6(*address))
                }
                // In an AF_BRIDGE message the VTEP's address comes as plain bytes.
                NeighbourAttribute::Destination(NeighbourAddress::Other(bytes)) => {
                    node = match bytes.len() {
                        4 => <[u8; 4]>::try_from(bytes.as_slice()).ok().map(IpAddr::from),
                        16 => <[u8; 16]>::try_from(bytes.as_slice())
                            .ok()
                            .map(IpAddr::from),
                        _ => None,
                    }
                }
                NeighbourAttribute::LinkLayerAddress(bytes) => {
                    mac = <Mac>::try_from(bytes.as_slice()).ok()
                }
                _ => {}
            }
        }
        if let (Some(node), Some(mac)) = (node, mac) {
            remotes.push(RemoteView {
                mac,
                node,
                ipv4: addresses.get(&mac).copied(),
            });
        }
    }
    remotes.sort_by_key(|remote| remote.mac);
    Ok(TunnelView { external, remotes })
}

/// The container's end of a veth port, read across namespaces by netns id
/// (IFLA_TARGET_NETNSID), so no namespace has to be found or entered.
async fn veth_peer(
    handle: &Handle,
    port: &LinkMessage,
    detail: Detail,
) -> Result<Option<PeerView>> {
    let mut peer_index = None;
    let mut peer_netns = None;
    for attribute in &port.attributes {
        match attribute {
            LinkAttribute::Link(index) => peer_index = Some(*index),
            LinkAttribute::LinkNetNsId(id) => peer_netns = Some(*id),
            _ => {}
        }
    }
    let Some(peer_index) = peer_index else {
        return Ok(None);
    };
    let mut request = handle.link().get().match_index(peer_index);
    if let Some(netns) = peer_netns {
        request
            .message_mut()
            .attributes
            .push(LinkAttribute::IfNetnsId(netns));
    }
    let peer = match request.execute().try_next().await {
        Ok(Some(peer)) => peer,
        // The peer (or its namespace) is going away: no endpoint to learn.
        Ok(None) | Err(_) => return Ok(None),
    };

    let mut addresses = Vec::new();
    if detail == Detail::Macs {
        return Ok(Some(PeerView {
            name: link_name(&peer),
            mac: link_mac(&peer),
            addresses,
        }));
    }
    let mut request = handle.address().get().set_link_index_filter(peer_index);
    if let Some(netns) = peer_netns {
        request
            .message_mut()
            .attributes
            .push(AddressAttribute::TargetNetNsId(netns));
    }
    let mut stream = request.execute();
    // Addresses are only shown in `xbr status`; a namespace that vanishes mid-read leaves them out.
    while let Ok(Some(message)) = stream.try_next().await {
        addresses.extend(address_of(&message));
    }
    Ok(Some(PeerView {
        name: link_name(&peer),
        mac: link_mac(&peer),
        addresses,
    }))
}

/// Looks a link up by name; `None` when there is no such link.
pub async fn link_by_name(handle: &Handle, name: &str) -> Result<Option<LinkMessage>> {
    netlink::link_by_name(handle, name)
        .await
        .map_err(|e| Error::netlink(format!("looking up {name}"), e))
}

/// The IPv4 addresses of this namespace's interfaces (the host's own addresses).
pub async fn local_ipv4_addresses(
    handle: &Handle,
) -> Result<std::collections::BTreeSet<std::net::Ipv4Addr>> {
    let mut stream = handle.address().get().execute();
    let mut addresses = std::collections::BTreeSet::new();
    while let Some(message) = stream
        .try_next()
        .await
        .map_err(|e| Error::netlink("listing this namespace's addresses", e))?
    {
        if let Some(IpAddr::V4(address)) = address_of(&message) {
            addresses.insert(address);
        }
    }
    Ok(addresses)
}

/// Names of the current links by ifindex, for showing pinned state.
pub async fn link_names(handle: &Handle) -> Result<std::collections::BTreeMap<u32, String>> {
    let mut names = std::collections::BTreeMap::new();
    let mut links = handle.link().get().execute();
    while let Some(link) = links
        .try_next()
        .await
        .map_err(|e| Error::netlink("listing links", e))?
    {
        names.insert(link.header.index, link_name(&link));
    }
    Ok(names)
}

fn address_of(message: &AddressMessage) -> Option<IpAddr> {
    let wanted = matches!(
        message.header.family,
        AddressFamily::Inet | AddressFamily::Inet6
    );
    message.attributes.iter().find_map(|a| match a {
        AddressAttribute::Address(address) if wanted => Some(*address),
        _ => None,
    })
}

fn bridge_info(link: &LinkMessage) -> impl Iterator<Item = &InfoBridge> {
    link_infos(link)
        .filter_map(|info| match info {
            LinkInfo::Data(InfoData::Bridge(infos)) => Some(infos.iter()),
            _ => None,
        })
        .flatten()
}

fn link_kind(link: &LinkMessage) -> String {
    match netlink::link_kind(link) {
        Some(InfoKind::Other(kind)) => kind.clone(),
        Some(kind) => kind.to_string(),
        None => String::new(),
    }
}

fn link_mac(link: &LinkMessage) -> Mac {
    netlink::link_address(link)
        .and_then(|bytes| bytes.try_into().ok())
        .unwrap_or_default()
}

/// `02:42:ac:11:00:02`
pub fn format_mac(mac: &Mac) -> String {
    mac.iter()
        .map(|b| format!("{b:02x}"))
        .collect::<Vec<_>>()
        .join(":")
}

/// An interface outside the bridge where traffic to published ports arrives.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct UplinkView {
    pub name: String,
    pub ifindex: u32,
}

/// Looks up uplinks by name.
pub async fn uplinks(handle: &Handle, names: &[String]) -> Result<Vec<UplinkView>> {
    let mut uplinks = Vec::new();
    for name in names {
        let link = link_by_name(handle, name)
            .await?
            .ok_or_else(|| Error::UplinkNotFound(name.clone()))?;
        uplinks.push(UplinkView {
            name: name.clone(),
            ifindex: link.header.index,
        });
    }
    Ok(uplinks)
}

/// The interfaces of this namespace's IPv4 default routes: where outside traffic arrives,
/// so the default uplinks.
pub async fn default_route_interfaces(handle: &Handle) -> Result<Vec<String>> {
    use netlink_packet_route::route::{RouteAttribute, RouteMessage};
    let mut request = RouteMessage::default();
    request.header.address_family = AddressFamily::Inet;
    let mut routes = handle.route().get(request).execute();
    let mut indexes = Vec::new();
    while let Some(route) = routes
        .try_next()
        .await
        .map_err(|e| Error::netlink("listing routes", e))?
    {
        if route.header.destination_prefix_length != 0 {
            continue;
        }
        for attribute in &route.attributes {
            if let RouteAttribute::Oif(index) = attribute
                && !indexes.contains(index)
            {
                indexes.push(*index);
            }
        }
    }
    let names = link_names(handle).await?;
    Ok(indexes
        .iter()
        .filter_map(|index| names.get(index).cloned())
        .collect())
}
