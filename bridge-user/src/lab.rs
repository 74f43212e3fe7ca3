//! The lab builder: a small compose-like topology (a bridge, containers on its veth ports, an
//! optional uplink to an outside namespace) built in named network namespaces, by netlink only.
//! The spec it builds from (types, parsing, validation, names) is bridge-common's, which xtask
//! shares; it is re-exported here, so `xbr::lab::LabSpec` is the one spec.

use std::fs::{self, File};
use std::future::Future;
use std::io;
use std::net::{IpAddr, Ipv4Addr};
use std::os::fd::AsRawFd;

use futures::TryStreamExt;
use netlink_packet_route::address::AddressAttribute;
use netlink_packet_route::link::{InfoData, InfoKind, InfoVeth, LinkFlags, LinkMessage};
use netlink_packet_route::route::{
    RouteAddress, RouteAttribute, RouteHeader, RouteMessage, RouteType,
};
use rtnetlink::{
    Handle, LinkBridge, LinkMessageBuilder, LinkUnspec, LinkVeth, RouteMessageBuilder,
};

pub use bridge_common::lab::*;

use crate::netlink;
use crate::netns::{NetNs, NetNsError};

const IP_FORWARD: &str = "/proc/sys/net/ipv4/ip_forward";

#[derive(Debug, thiserror::Error)]
pub enum LabError {
    #[error(transparent)]
    Spec(#[from] LabSpecError),
    #[error(transparent)]
    NetNs(#[from] NetNsError),
    #[error(
        "cannot {step} in network namespace {netns}: {cause}; inspect it with \
         `ip -n {netns} addr` and `ip -n {netns} route`"
    )]
    Kernel {
        netns: String,
        step: String,
        cause: io::Error,
    },
    #[error(
        "network namespace {netns} already has a link {ifname}, but {problem}; delete it with \
         `ip -n {netns} link del {ifname}` or give the lab another name"
    )]
    Conflict {
        netns: String,
        ifname: String,
        problem: String,
    },
    #[error(
        "lab namespace {netns} is incomplete ({problem}); rebuild the lab with \
         `xbr lab down FILE` then `xbr lab up FILE`"
    )]
    Incomplete { netns: String, problem: String },
}

/// Builds the lab, completing whatever part of it already exists; a second `up` on a complete
/// lab changes nothing. When a step fails, the namespaces and links this call made are removed
/// again (an address added to an older link stays).
///
/// Traffic flows as soon as this returns; the kernel may still report the bridge's operstate as
/// UNKNOWN for up to a second (linkwatch), which matters only to code comparing link states.
pub fn up(spec: &LabSpec) -> Result<(), LabError> {
    spec.validate()?;
    let mut made = Rollback::default();
    build(spec, &mut made)?;
    made.keep();
    Ok(())
}

/// Deletes every namespace the spec names (the kernel destroys their veths with them); a lab
/// that is already gone is fine.
pub fn down(spec: &LabSpec) -> Result<(), LabError> {
    let mut first_error = None;
    for name in spec.namespaces() {
        if let Err(error) = NetNs::delete(&name) {
            first_error.get_or_insert(error);
        }
    }
    first_error.map_or(Ok(()), |error| Err(error.into()))
}

/// A lab that is torn down (`down`) when the guard is dropped, on panic too.
#[derive(Debug)]
pub struct LabGuard {
    spec: LabSpec,
    armed: bool,
}

impl LabGuard {
    pub fn up(spec: LabSpec) -> Result<LabGuard, LabError> {
        up(&spec)?;
        Ok(LabGuard { spec, armed: true })
    }

    pub fn spec(&self) -> &LabSpec {
        &self.spec
    }

    /// Tears the lab down now, reporting what Drop would swallow.
    pub fn down(mut self) -> Result<(), LabError> {
        self.armed = false;
        down(&self.spec)
    }
}

impl Drop for LabGuard {
    fn drop(&mut self) {
        if self.armed {
            let _ = down(&self.spec);
        }
    }
}

/// What one `up` call created, undone on drop unless `keep` ran, so no path (error or panic)
/// leaves half a lab. Links are listed only where their namespace predates this call.
#[derive(Default)]
struct Rollback {
    namespaces: Vec<String>,
    links: Vec<(String, String)>,
    kept: bool,
}

impl Rollback {
    fn netns(&mut self, name: &str) -> Result<NetNs, LabError> {
        let existed = NetNs::exists(name);
        let netns = NetNs::create(name)?;
        if !existed {
            self.namespaces.push(name.to_owned());
        }
        Ok(netns)
    }

    fn links_in(&mut self, netns: &NetNs, links: Vec<String>) {
        if !self.namespaces.iter().any(|name| name == netns.name()) {
            self.links.extend(
                links
                    .into_iter()
                    .map(|link| (netns.name().to_owned(), link)),
            );
        }
    }

    fn keep(mut self) {
        self.kept = true;
    }
}

impl Drop for Rollback {
    fn drop(&mut self) {
        if self.kept {
            return;
        }
        for (netns, link) in self.links.drain(..).rev() {
            if let Ok(netns) = NetNs::open(&netns) {
                let _ = in_netns(&netns, |nl| async move { nl.delete_link(&link).await });
            }
        }
        for netns in self.namespaces.drain(..).rev() {
            let _ = NetNs::delete(&netns);
        }
    }
}

fn build(spec: &LabSpec, made: &mut Rollback) -> Result<(), LabError> {
    let host = made.netns(&spec.host_netns())?;
    let containers = spec
        .containers
        .iter()
        .map(|container| made.netns(&spec.container_netns(&container.name)))
        .collect::<Result<Vec<_>, _>>()?;
    let outside = spec
        .outside_netns()
        .map(|name| made.netns(&name))
        .transpose()?;

    // The container ends of the veths are born in their namespaces, so nothing ever appears in
    // the root namespace, even for a moment.
    let peers = containers
        .iter()
        .map(NetNs::file)
        .collect::<Result<Vec<_>, _>>()?;
    let outside_peer = outside.as_ref().map(NetNs::file).transpose()?;
    let mut host_links = Vec::new();
    let host_built = in_netns(&host, |nl| {
        build_host(nl, spec, &peers, outside_peer.as_ref(), &mut host_links)
    });
    made.links_in(&host, host_links);
    host_built?;
    if spec.uplink.is_some() {
        enable_forwarding(&host)?;
    }

    for (container, netns) in spec.containers.iter().zip(&containers) {
        in_netns(netns, |nl| build_container(nl, spec, container))?;
    }
    if let (Some(uplink), Some(outside)) = (&spec.uplink, &outside) {
        in_netns(outside, |nl| build_outside(nl, uplink))?;
    }
    Ok(())
}

async fn build_host(
    nl: Netlink,
    spec: &LabSpec,
    peers: &[File],
    outside_peer: Option<&File>,
    made: &mut Vec<String>,
) -> Result<(), LabError> {
    nl.loopback_up().await?;
    let bridge_name = &spec.bridge.name;
    let bridge = match nl.link(bridge_name).await? {
        Some(bridge) => {
            nl.expect_kind(bridge_name, &bridge, InfoKind::Bridge)?;
            nl.ensure_up(bridge_name, &bridge).await?;
            bridge
        }
        None => {
            nl.add_link(
                LinkBridge::new(bridge_name).build(),
                format!("create bridge {bridge_name}"),
            )
            .await?;
            made.push(bridge_name.clone());
            nl.require_link(bridge_name).await?
        }
    };
    if let Some(address) = spec.bridge.address {
        nl.ensure_address(bridge_name, &bridge, address).await?;
    }

    for (container, peer) in spec.containers.iter().zip(peers) {
        let port = LabSpec::port_name(&container.name);
        match nl.link(&port).await? {
            Some(link) => {
                nl.expect_kind(&port, &link, InfoKind::Veth)?;
                if link.controller != Some(bridge.index) {
                    let message = LinkUnspec::new_with_index(link.index)
                        .controller(bridge.index)
                        .build();
                    nl.set_link(message, format!("attach {port} to bridge {bridge_name}"))
                        .await?;
                }
                nl.ensure_up(&port, &link).await?;
            }
            None => {
                let message = veth_into(&port, peer, container.mac)
                    .controller(bridge.index)
                    .up()
                    .build();
                let step = format!(
                    "create veth {port} on bridge {bridge_name} with peer {CONTAINER_IFNAME} in {}",
                    spec.container_netns(&container.name)
                );
                nl.add_link(message, step).await?;
                made.push(port);
            }
        }
    }

    if let (Some(uplink), Some(outside_peer)) = (&spec.uplink, outside_peer) {
        let link = match nl.link(UPLINK_IFNAME).await? {
            Some(link) => {
                nl.expect_kind(UPLINK_IFNAME, &link, InfoKind::Veth)?;
                if link.controller.is_some() {
                    return Err(
                        nl.conflict(UPLINK_IFNAME, "it is a port of a bridge or bond".into())
                    );
                }
                nl.ensure_up(UPLINK_IFNAME, &link).await?;
                link
            }
            None => {
                let step = format!(
                    "create veth {UPLINK_IFNAME} with peer {CONTAINER_IFNAME} in {}",
                    spec.outside_netns().unwrap_or_default()
                );
                nl.add_link(
                    veth_into(UPLINK_IFNAME, outside_peer, None).up().build(),
                    step,
                )
                .await?;
                made.push(UPLINK_IFNAME.to_owned());
                nl.require_link(UPLINK_IFNAME).await?
            }
        };
        nl.ensure_address(UPLINK_IFNAME, &link, uplink.host_address)
            .await?;
    }
    Ok(())
}

async fn build_container(
    nl: Netlink,
    spec: &LabSpec,
    container: &ContainerSpec,
) -> Result<(), LabError> {
    nl.loopback_up().await?;
    let eth0 = nl.require_link(CONTAINER_IFNAME).await?;
    if let Some(mac) = container.mac
        && eth0.mac.as_deref() != Some(&mac.0[..])
    {
        // veth takes a new MAC while up (IFF_LIVE_ADDR_CHANGE).
        let message = LinkUnspec::new_with_index(eth0.index)
            .address(mac.0.to_vec())
            .build();
        nl.set_link(message, format!("set MAC {mac} on {CONTAINER_IFNAME}"))
            .await?;
    }
    nl.ensure_up(CONTAINER_IFNAME, &eth0).await?;
    nl.ensure_address(CONTAINER_IFNAME, &eth0, container.address)
        .await?;
    if let Some(gateway) = spec.gateway(container) {
        nl.ensure_default_route(gateway).await?;
    }
    Ok(())
}

async fn build_outside(nl: Netlink, uplink: &UplinkSpec) -> Result<(), LabError> {
    nl.loopback_up().await?;
    let eth0 = nl.require_link(CONTAINER_IFNAME).await?;
    nl.ensure_up(CONTAINER_IFNAME, &eth0).await?;
    nl.ensure_address(CONTAINER_IFNAME, &eth0, uplink.outside_address)
        .await
}

/// A veth `name` whose peer is created as eth0 directly in the namespace behind `peer_netns`.
fn veth_into(
    name: &str,
    peer_netns: &File,
    peer_mac: Option<MacAddr>,
) -> LinkMessageBuilder<LinkVeth> {
    let mut peer = LinkUnspec::new_with_name(CONTAINER_IFNAME).setns_by_fd(peer_netns.as_raw_fd());
    if let Some(mac) = peer_mac {
        peer = peer.address(mac.0.to_vec());
    }
    LinkVeth::new(name, CONTAINER_IFNAME)
        .set_info_data(InfoData::Veth(InfoVeth::Peer(peer.build())))
}

/// /proc/sys/net belongs to the reading thread's network namespace, hence the trip into it.
fn enable_forwarding(host: &NetNs) -> Result<(), LabError> {
    host.run(|| -> io::Result<()> {
        if fs::read_to_string(IP_FORWARD)?.trim() != "1" {
            fs::write(IP_FORWARD, "1")?;
        }
        Ok(())
    })?
    .map_err(|cause| LabError::Kernel {
        netns: host.name().to_owned(),
        step: format!("enable IPv4 forwarding ({IP_FORWARD})"),
        cause,
    })
}

/// Runs one netlink job inside `netns`.
fn in_netns<T, F, Fut>(netns: &NetNs, job: F) -> Result<T, LabError>
where
    T: Send,
    F: FnOnce(Netlink) -> Fut + Send,
    Fut: Future<Output = Result<T, LabError>>,
{
    let name = netns.name().to_owned();
    netns
        .run(move || {
            netlink::run(move |handle| {
                job(Netlink {
                    handle,
                    netns: name,
                })
            })
        })?
        .map_err(|cause| LabError::Kernel {
            netns: netns.name().to_owned(),
            step: "open a netlink connection".into(),
            cause,
        })?
}

/// An rtnetlink handle inside one namespace, whose errors say what was being done where.
struct Netlink {
    handle: Handle,
    netns: String,
}

/// What the builder needs to know about an existing link.
struct Link {
    index: u32,
    up: bool,
    kind: Option<InfoKind>,
    controller: Option<u32>,
    mac: Option<Vec<u8>>,
}

impl From<LinkMessage> for Link {
    fn from(message: LinkMessage) -> Link {
        Link {
            index: message.header.index,
            up: message.header.flags.contains(LinkFlags::Up),
            kind: netlink::link_kind(&message).cloned(),
            controller: netlink::link_controller(&message),
            mac: netlink::link_address(&message).map(<[u8]>::to_vec),
        }
    }
}

impl Netlink {
    fn failed(&self, step: String, error: rtnetlink::Error) -> LabError {
        let cause = match error {
            rtnetlink::Error::NetlinkError(message) => message.to_io(),
            // Kept whole (not its text): the caller can still downcast it.
            other => io::Error::other(other),
        };
        LabError::Kernel {
            netns: self.netns.clone(),
            step,
            cause,
        }
    }

    fn conflict(&self, ifname: &str, problem: String) -> LabError {
        LabError::Conflict {
            netns: self.netns.clone(),
            ifname: ifname.to_owned(),
            problem,
        }
    }

    async fn link(&self, name: &str) -> Result<Option<Link>, LabError> {
        netlink::link_by_name(&self.handle, name)
            .await
            .map(|found| found.map(Link::from))
            .map_err(|error| self.failed(format!("look up link {name}"), error))
    }

    /// A link the lab made earlier; missing means someone removed part of the lab.
    async fn require_link(&self, name: &str) -> Result<Link, LabError> {
        self.link(name).await?.ok_or_else(|| LabError::Incomplete {
            netns: self.netns.clone(),
            problem: format!("link {name} is missing"),
        })
    }

    fn expect_kind(&self, name: &str, link: &Link, wanted: InfoKind) -> Result<(), LabError> {
        match &link.kind {
            Some(kind) if *kind == wanted => Ok(()),
            Some(kind) => Err(self.conflict(name, format!("it is a {kind}, not a {wanted}"))),
            None => Err(self.conflict(name, format!("it is not a {wanted}"))),
        }
    }

    async fn add_link(&self, message: LinkMessage, step: String) -> Result<(), LabError> {
        self.handle
            .link()
            .add(message)
            .execute()
            .await
            .map_err(|error| self.failed(step, error))
    }

    async fn set_link(&self, message: LinkMessage, step: String) -> Result<(), LabError> {
        self.handle
            .link()
            .set(message)
            .execute()
            .await
            .map_err(|error| self.failed(step, error))
    }

    async fn delete_link(&self, name: &str) -> Result<(), LabError> {
        let Some(link) = self.link(name).await? else {
            return Ok(());
        };
        match self.handle.link().del(link.index).execute().await {
            Err(error) if netlink::is_errno(&error, libc::ENODEV) => Ok(()),
            result => result.map_err(|error| self.failed(format!("delete link {name}"), error)),
        }
    }

    async fn ensure_up(&self, name: &str, link: &Link) -> Result<(), LabError> {
        if link.up {
            return Ok(());
        }
        let message = LinkUnspec::new_with_index(link.index).up().build();
        self.set_link(message, format!("set link {name} up")).await
    }

    async fn loopback_up(&self) -> Result<(), LabError> {
        let lo = self.require_link("lo").await?;
        self.ensure_up("lo", &lo).await
    }

    async fn ensure_address(
        &self,
        name: &str,
        link: &Link,
        address: Ipv4Cidr,
    ) -> Result<(), LabError> {
        let wanted = IpAddr::V4(address.addr);
        let present = self
            .handle
            .address()
            .get()
            .set_link_index_filter(link.index)
            .execute()
            .try_any(|message| {
                let matches = message.header.prefix_len == address.prefix_len
                    && message.attributes.iter().any(|attribute| {
                        matches!(attribute, AddressAttribute::Local(ip) if *ip == wanted)
                    });
                std::future::ready(matches)
            })
            .await
            .map_err(|error| self.failed(format!("list addresses of {name}"), error))?;
        if present {
            return Ok(());
        }
        self.handle
            .address()
            .add(link.index, wanted, address.prefix_len)
            .execute()
            .await
            .map_err(|error| self.failed(format!("add address {address} to {name}"), error))
    }

    async fn ensure_default_route(&self, gateway: Ipv4Addr) -> Result<(), LabError> {
        let routes: Vec<RouteMessage> = self
            .handle
            .route()
            .get(RouteMessageBuilder::<Ipv4Addr>::new().build())
            .execute()
            .try_collect()
            .await
            .map_err(|error| self.failed("list IPv4 routes".into(), error))?;
        let default = routes.iter().find(|route| {
            route.header.table == RouteHeader::RT_TABLE_MAIN
                && route.header.destination_prefix_length == 0
                && route.header.kind == RouteType::Unicast
        });
        let via = |route: &RouteMessage| {
            route
                .attributes
                .iter()
                .find_map(|attribute| match attribute {
                    RouteAttribute::Gateway(RouteAddress::Inet(ip)) => Some(*ip),
                    _ => None,
                })
        };
        let request = self.handle.route().add(
            RouteMessageBuilder::<Ipv4Addr>::new()
                .gateway(gateway)
                .build(),
        );
        let request = match default {
            Some(route) if via(route) == Some(gateway) => return Ok(()),
            Some(_) => request.replace(),
            None => request,
        };
        request
            .execute()
            .await
            .map_err(|error| self.failed(format!("add default route via {gateway}"), error))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const MINIMAL: &str = r#"
        name = "t"
        [bridge]
        name = "br0"
        address = "10.77.0.1/24"
        [[containers]]
        name = "a"
        address = "10.77.0.2/24"
    "#;

    #[test]
    fn up_validates_code_built_specs() {
        let mut spec = LabSpec::parse(MINIMAL).unwrap();
        spec.containers[0].address.prefix_len = 40;
        assert!(
            matches!(up(&spec), Err(LabError::Spec(LabSpecError::Invalid { key, .. })) if key == "containers[0].address")
        );
    }
}
