//! The lab builder: a small compose-like topology (a bridge, containers on its veth ports, an
//! optional uplink to an outside namespace) built in named network namespaces, by netlink only.

use std::collections::HashSet;
use std::fmt;
use std::fs::{self, File};
use std::future::Future;
use std::io;
use std::net::{IpAddr, Ipv4Addr};
use std::os::fd::AsRawFd;
use std::path::{Path, PathBuf};
use std::str::FromStr;

use futures::TryStreamExt;
use netlink_packet_route::address::AddressAttribute;
use netlink_packet_route::link::{InfoData, InfoKind, InfoVeth, LinkFlags, LinkMessage};
use netlink_packet_route::route::{
    RouteAddress, RouteAttribute, RouteHeader, RouteMessage, RouteType,
};
use rtnetlink::{
    Handle, LinkBridge, LinkMessageBuilder, LinkUnspec, LinkVeth, RouteMessageBuilder,
};
use serde::Deserialize;

use crate::netlink;
use crate::netns::{NetNs, NetNsError};

/// Each container's interface, inside its own namespace.
pub const CONTAINER_IFNAME: &str = "eth0";
/// The host-side end of the uplink veth, in the host namespace (not a bridge port).
pub const UPLINK_IFNAME: &str = "uplink0";

/// IFNAMSIZ without the NUL.
const IFNAME_MAX: usize = 15;
const PORT_PREFIX: &str = "veth-";
/// `{lab}-host` and `{lab}-out` are the lab's own namespaces; a container of that name would
/// share one of them.
const RESERVED_CONTAINER_NAMES: [&str; 2] = ["host", "out"];
const IP_FORWARD: &str = "/proc/sys/net/ipv4/ip_forward";

/// A parsed and validated lab topology; see examples/lab.toml for the file format.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct LabSpec {
    /// Prefix of every namespace the lab makes.
    pub name: String,
    pub bridge: BridgeSpec,
    pub containers: Vec<ContainerSpec>,
    pub uplink: Option<UplinkSpec>,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct BridgeSpec {
    pub name: String,
    /// The bridge's own address: the containers' gateway.
    pub address: Option<Ipv4Cidr>,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ContainerSpec {
    pub name: String,
    pub address: Ipv4Cidr,
    /// Without one the kernel picks a random MAC for the container's eth0.
    pub mac: Option<MacAddr>,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct UplinkSpec {
    /// Address of `uplink0` in the host namespace.
    pub host_address: Ipv4Cidr,
    /// Address of `eth0` in the outside namespace.
    pub outside_address: Ipv4Cidr,
}

/// An IPv4 address with its prefix length, as in `10.77.0.2/24`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct Ipv4Cidr {
    pub addr: Ipv4Addr,
    pub prefix_len: u8,
}

/// An Ethernet address, as in `02:77:00:00:00:02`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct MacAddr(pub [u8; 6]);

#[derive(Debug, thiserror::Error)]
pub enum LabError {
    #[error("cannot read lab file {}: {cause}", path.display())]
    Read { path: PathBuf, cause: io::Error },
    #[error("{origin}: not a lab topology (see examples/lab.toml for the format): {cause}")]
    Syntax {
        origin: String,
        cause: toml::de::Error,
    },
    #[error("{origin}: `{key}` {problem}")]
    Invalid {
        origin: String,
        key: String,
        problem: String,
    },
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

impl LabSpec {
    pub fn from_file(path: &Path) -> Result<LabSpec, LabError> {
        let text = fs::read_to_string(path).map_err(|cause| LabError::Read {
            path: path.to_owned(),
            cause,
        })?;
        parse_lab(&text, &path.display().to_string())
    }

    pub fn parse(text: &str) -> Result<LabSpec, LabError> {
        parse_lab(text, "lab spec")
    }

    /// Checks what `parse` checks, for specs built in code.
    pub fn validate(&self) -> Result<(), LabError> {
        self.validate_in(&format!("lab {}", self.name))
    }

    pub fn host_netns(&self) -> String {
        format!("{}-host", self.name)
    }

    pub fn container_netns(&self, container: &str) -> String {
        format!("{}-{container}", self.name)
    }

    pub fn outside_netns(&self) -> Option<String> {
        self.uplink.as_ref().map(|_| format!("{}-out", self.name))
    }

    /// Every namespace `up` makes: host, containers in order, then outside.
    pub fn namespaces(&self) -> Vec<String> {
        let containers = self
            .containers
            .iter()
            .map(|c| self.container_netns(&c.name));
        std::iter::once(self.host_netns())
            .chain(containers)
            .chain(self.outside_netns())
            .collect()
    }

    /// Host-side name of a container's veth, the bridge port.
    pub fn port_name(container: &str) -> String {
        format!("{PORT_PREFIX}{container}")
    }

    pub fn container(&self, name: &str) -> Option<&ContainerSpec> {
        self.containers.iter().find(|c| c.name == name)
    }

    /// The container's default gateway: the bridge address, when it lies in the container's
    /// subnet (a container deliberately placed elsewhere gets no default route).
    pub fn gateway(&self, container: &ContainerSpec) -> Option<Ipv4Addr> {
        let bridge = self.bridge.address?;
        (container.address.contains(bridge.addr) && bridge.addr != container.address.addr)
            .then_some(bridge.addr)
    }

    fn validate_in(&self, origin: &str) -> Result<(), LabError> {
        let invalid = |key: String, problem: String| LabError::Invalid {
            origin: origin.to_owned(),
            key,
            problem,
        };
        if let Err(problem) = check_plain_name(&self.name) {
            return Err(invalid("name".into(), problem));
        }
        if let Some(long) = self.namespaces().into_iter().find(|ns| ns.len() > 255) {
            return Err(invalid(
                "name".into(),
                format!("makes namespace name {long} longer than 255 bytes; shorten it"),
            ));
        }
        check_ifname(&self.bridge.name)
            .map_err(|problem| invalid("bridge.name".into(), problem))?;
        if let Some(address) = self.bridge.address {
            address
                .check()
                .map_err(|problem| invalid("bridge.address".into(), problem))?;
        }

        let mut names = HashSet::new();
        let mut macs = HashSet::new();
        for (index, container) in self.containers.iter().enumerate() {
            let key = |field: &str| format!("containers[{index}].{field}");
            let in_container =
                |problem: String| format!("(container {}) {problem}", container.name);
            check_container_name(&container.name)
                .map_err(|problem| invalid(key("name"), problem))?;
            if !names.insert(container.name.as_str()) {
                return Err(invalid(
                    key("name"),
                    format!(
                        "= {:?} is used by an earlier container; names must be unique",
                        container.name
                    ),
                ));
            }
            container
                .address
                .check()
                .map_err(|problem| invalid(key("address"), in_container(problem)))?;
            if let Some(mac) = container.mac {
                mac.check()
                    .map_err(|problem| invalid(key("mac"), in_container(problem)))?;
                if !macs.insert(mac) {
                    return Err(invalid(
                        key("mac"),
                        in_container(format!(
                            "= {mac} is used by an earlier container; MACs must be unique"
                        )),
                    ));
                }
            }
        }

        let mut host_links = vec!["lo".to_owned()];
        host_links.extend(self.containers.iter().map(|c| LabSpec::port_name(&c.name)));
        if let Some(uplink) = &self.uplink {
            host_links.push(UPLINK_IFNAME.to_owned());
            uplink
                .host_address
                .check()
                .map_err(|problem| invalid("uplink.host_address".into(), problem))?;
            uplink
                .outside_address
                .check()
                .map_err(|problem| invalid("uplink.outside_address".into(), problem))?;
        }
        if host_links.contains(&self.bridge.name) {
            return Err(invalid(
                "bridge.name".into(),
                format!(
                    "= {:?} is also the name of another link in the host namespace; rename the bridge",
                    self.bridge.name
                ),
            ));
        }
        Ok(())
    }
}

impl Ipv4Cidr {
    pub fn new(addr: Ipv4Addr, prefix_len: u8) -> Ipv4Cidr {
        Ipv4Cidr { addr, prefix_len }
    }

    pub fn contains(&self, ip: Ipv4Addr) -> bool {
        let mask = u32::MAX
            .checked_shl(32 - u32::from(self.prefix_len.min(32)))
            .unwrap_or(0);
        u32::from(self.addr) & mask == u32::from(ip) & mask
    }

    fn check(&self) -> Result<(), String> {
        if self.prefix_len > 32 {
            return Err(format!("= \"{self}\" has a prefix length above 32"));
        }
        Ok(())
    }
}

impl FromStr for Ipv4Cidr {
    type Err = String;

    fn from_str(text: &str) -> Result<Ipv4Cidr, String> {
        let wanted = "want an IPv4 address with prefix length, like 10.77.0.2/24";
        let (addr, prefix_len) = text
            .split_once('/')
            .ok_or_else(|| format!("= {text:?} has no prefix length; {wanted}"))?;
        let addr = addr
            .parse()
            .map_err(|_| format!("= {text:?} is not an IPv4 address; {wanted}"))?;
        let prefix_len = prefix_len
            .parse()
            .ok()
            .filter(|len| *len <= 32)
            .ok_or_else(|| format!("= {text:?} has no prefix length from 0 to 32; {wanted}"))?;
        Ok(Ipv4Cidr { addr, prefix_len })
    }
}

impl fmt::Display for Ipv4Cidr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.addr, self.prefix_len)
    }
}

impl MacAddr {
    fn check(&self) -> Result<(), String> {
        // The kernel refuses a multicast or all-zero address on an Ethernet device.
        if self.0[0] & 1 != 0 || self.0 == [0; 6] {
            return Err(format!(
                "= \"{self}\" is not a unicast MAC; use a locally administered one like 02:77:00:00:00:02"
            ));
        }
        Ok(())
    }
}

impl FromStr for MacAddr {
    type Err = String;

    fn from_str(text: &str) -> Result<MacAddr, String> {
        let problem = || {
            format!("= {text:?} is not a MAC address; want six hex bytes like 02:77:00:00:00:02")
        };
        let mut mac = [0u8; 6];
        let mut bytes = text.split(':');
        for byte in &mut mac {
            let part = bytes
                .next()
                .filter(|part| part.len() == 2)
                .ok_or_else(problem)?;
            *byte = u8::from_str_radix(part, 16).map_err(|_| problem())?;
        }
        if bytes.next().is_some() {
            return Err(problem());
        }
        Ok(MacAddr(mac))
    }
}

impl fmt::Display for MacAddr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let [a, b, c, d, e, g] = self.0;
        write!(f, "{a:02x}:{b:02x}:{c:02x}:{d:02x}:{e:02x}:{g:02x}")
    }
}

/// The file as written; strings are parsed in `parse_lab` so errors can name their key.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct LabFile {
    name: String,
    bridge: BridgeFile,
    #[serde(default)]
    containers: Vec<ContainerFile>,
    uplink: Option<UplinkFile>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct BridgeFile {
    name: String,
    address: Option<String>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct ContainerFile {
    name: String,
    address: String,
    mac: Option<String>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct UplinkFile {
    host_address: String,
    outside_address: String,
}

fn parse_lab(text: &str, origin: &str) -> Result<LabSpec, LabError> {
    let file: LabFile = toml::from_str(text).map_err(|cause| LabError::Syntax {
        origin: origin.to_owned(),
        cause,
    })?;
    let cidr = |key: String, value: &str| parse_field::<Ipv4Cidr>(origin, key, value);
    let mac = |key: String, value: &str| parse_field::<MacAddr>(origin, key, value);
    let bridge = BridgeSpec {
        address: file
            .bridge
            .address
            .as_deref()
            .map(|a| cidr("bridge.address".into(), a))
            .transpose()?,
        name: file.bridge.name,
    };
    let mut containers = Vec::new();
    for (index, container) in file.containers.into_iter().enumerate() {
        containers.push(ContainerSpec {
            address: cidr(format!("containers[{index}].address"), &container.address)?,
            mac: match &container.mac {
                Some(text) => Some(mac(format!("containers[{index}].mac"), text)?),
                None => None,
            },
            name: container.name,
        });
    }
    let uplink = match file.uplink {
        Some(uplink) => Some(UplinkSpec {
            host_address: cidr("uplink.host_address".into(), &uplink.host_address)?,
            outside_address: cidr("uplink.outside_address".into(), &uplink.outside_address)?,
        }),
        None => None,
    };
    let spec = LabSpec {
        name: file.name,
        bridge,
        containers,
        uplink,
    };
    spec.validate_in(origin)?;
    Ok(spec)
}

fn parse_field<T: FromStr<Err = String>>(
    origin: &str,
    key: String,
    value: &str,
) -> Result<T, LabError> {
    value.parse().map_err(|problem| LabError::Invalid {
        origin: origin.to_owned(),
        key,
        problem,
    })
}

/// Lab and container names become parts of namespace and interface names.
fn check_plain_name(name: &str) -> Result<(), String> {
    if name.is_empty() {
        return Err("is empty".into());
    }
    if !name
        .bytes()
        .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
    {
        return Err(format!(
            "= {name:?} may hold only letters, digits, '-' and '_'"
        ));
    }
    Ok(())
}

fn check_container_name(name: &str) -> Result<(), String> {
    check_plain_name(name)?;
    if RESERVED_CONTAINER_NAMES.contains(&name) {
        return Err(format!(
            "= {name:?} is reserved for the lab's own namespace; rename the container"
        ));
    }
    let port = LabSpec::port_name(name);
    if port.len() > IFNAME_MAX {
        return Err(format!(
            "= {name:?} is too long: its bridge port {port} exceeds {IFNAME_MAX} bytes (keep names to {} bytes)",
            IFNAME_MAX - PORT_PREFIX.len()
        ));
    }
    Ok(())
}

fn check_ifname(name: &str) -> Result<(), String> {
    if name.is_empty() || name.len() > IFNAME_MAX {
        return Err(format!(
            "= {name:?} must be 1 to {IFNAME_MAX} bytes long (an interface name)"
        ));
    }
    if name == "."
        || name == ".."
        || name
            .bytes()
            .any(|b| b == b'/' || b == b':' || b.is_ascii_whitespace())
    {
        return Err(format!(
            "= {name:?} is not a valid interface name (no '/', ':' or spaces)"
        ));
    }
    Ok(())
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

    const EXAMPLE: &str = include_str!("../../examples/lab.toml");

    fn cidr(text: &str) -> Ipv4Cidr {
        text.parse().unwrap()
    }

    /// Parses `text` expecting an `Invalid` error about `key`, and returns the message.
    fn invalid(text: &str, key: &str) -> String {
        match LabSpec::parse(text) {
            Err(error @ LabError::Invalid { .. }) => {
                let message = error.to_string();
                let LabError::Invalid { key: found, .. } = &error else {
                    unreachable!()
                };
                assert_eq!(found, key, "wrong key blamed in: {message}");
                message
            }
            other => panic!("expected an error about `{key}`, got {other:?}"),
        }
    }

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
    fn example_file_parses_into_the_demo_lab() {
        let spec = LabSpec::parse(EXAMPLE).expect("examples/lab.toml must parse");
        assert_eq!(spec.name, "demo");
        assert_eq!(spec.bridge.name, "br0");
        assert_eq!(spec.bridge.address, Some(cidr("10.77.0.1/24")));
        let names: Vec<_> = spec.containers.iter().map(|c| c.name.as_str()).collect();
        assert_eq!(names, ["a", "b", "c"]);
        let a = spec.container("a").unwrap();
        assert_eq!(a.address, cidr("10.77.0.2/24"));
        assert_eq!(a.mac, Some(MacAddr([0x02, 0x77, 0, 0, 0, 0x02])));
        let uplink = spec.uplink.as_ref().expect("the example has an uplink");
        assert_eq!(uplink.host_address, cidr("10.78.0.1/24"));
        assert_eq!(uplink.outside_address, cidr("10.78.0.2/24"));
        assert_eq!(
            spec.namespaces(),
            ["demo-host", "demo-a", "demo-b", "demo-c", "demo-out"]
        );
        assert_eq!(spec.gateway(a), Some(Ipv4Addr::new(10, 77, 0, 1)));
    }

    #[test]
    fn from_file_names_the_file() {
        let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("../examples/lab.toml");
        assert_eq!(
            LabSpec::from_file(&path).unwrap(),
            LabSpec::parse(EXAMPLE).unwrap()
        );
        let missing = Path::new("/nonexistent/lab.toml");
        let message = LabSpec::from_file(missing).unwrap_err().to_string();
        assert!(message.contains("/nonexistent/lab.toml"), "{message}");
    }

    #[test]
    fn derived_names() {
        let spec = LabSpec::parse(MINIMAL).unwrap();
        assert_eq!(spec.host_netns(), "t-host");
        assert_eq!(spec.container_netns("a"), "t-a");
        assert_eq!(spec.outside_netns(), None);
        assert_eq!(spec.namespaces(), ["t-host", "t-a"]);
        assert_eq!(LabSpec::port_name("a"), "veth-a");
    }

    #[test]
    fn no_gateway_outside_the_container_subnet() {
        let mut spec = LabSpec::parse(MINIMAL).unwrap();
        spec.containers[0].address = cidr("10.99.0.2/24");
        assert_eq!(spec.gateway(&spec.containers[0]), None);
        spec.bridge.address = None;
        spec.containers[0].address = cidr("10.77.0.2/24");
        assert_eq!(spec.gateway(&spec.containers[0]), None);
    }

    #[test]
    fn cidr_and_mac_round_trip() {
        assert_eq!(cidr("10.77.0.2/24").to_string(), "10.77.0.2/24");
        assert!(cidr("10.77.0.0/24").contains(Ipv4Addr::new(10, 77, 0, 200)));
        assert!(!cidr("10.77.0.0/24").contains(Ipv4Addr::new(10, 78, 0, 1)));
        assert!(cidr("0.0.0.0/0").contains(Ipv4Addr::new(192, 0, 2, 1)));
        let mac: MacAddr = "02:77:0A:00:00:ff".parse().unwrap();
        assert_eq!(mac.to_string(), "02:77:0a:00:00:ff");
        for bad in [
            "02:77:00:00:00",
            "02:77:00:00:00:02:03",
            "0277.0000.0002",
            "02:77:00:00:00:2",
            "zz:77:00:00:00:02",
        ] {
            assert!(
                bad.parse::<MacAddr>().is_err(),
                "{bad} should not parse as a MAC"
            );
        }
        for bad in [
            "10.77.0.2",
            "10.77.0.2/33",
            "10.77.0/24",
            "10.77.0.2/x",
            "fd00::1/64",
        ] {
            assert!(
                bad.parse::<Ipv4Cidr>().is_err(),
                "{bad} should not parse as an IPv4 CIDR"
            );
        }
    }

    #[test]
    fn malformed_values_name_their_key() {
        let message = invalid(
            &MINIMAL.replace("10.77.0.2/24", "10.77.0.2"),
            "containers[0].address",
        );
        assert!(message.contains("no prefix length"), "{message}");
        invalid(
            &MINIMAL.replace("10.77.0.1/24", "10.77.0.300/24"),
            "bridge.address",
        );
        let with_mac = format!("{MINIMAL}        mac = \"02:77:00:00:00\"\n");
        let message = invalid(&with_mac, "containers[0].mac");
        assert!(
            message.starts_with("lab spec: `containers[0].mac`"),
            "{message}"
        );
        invalid(
            &format!("{MINIMAL}        mac = \"01:00:5e:00:00:01\"\n"),
            "containers[0].mac",
        );
        let uplink = format!(
            "{MINIMAL}[uplink]\nhost_address = \"10.78.0.1/24\"\noutside_address = \"nope\"\n"
        );
        invalid(&uplink, "uplink.outside_address");
    }

    #[test]
    fn names_are_checked() {
        let second = |name: &str| {
            format!(
                "{MINIMAL}        [[containers]]\n        name = \"{name}\"\n        address = \"10.77.0.3/24\"\n"
            )
        };
        let message = invalid(&second("a"), "containers[1].name");
        assert!(message.contains("unique"), "{message}");
        let message = invalid(&second("abcdefghijk"), "containers[1].name");
        assert!(message.contains("veth-abcdefghijk"), "{message}");
        assert!(
            LabSpec::parse(&second("abcdefghij")).is_ok(),
            "10 bytes fit veth-NAME in 15"
        );
        invalid(&second("host"), "containers[1].name");
        invalid(&second("out"), "containers[1].name");
        invalid(&second("a/b"), "containers[1].name");
        invalid(&MINIMAL.replace("name = \"t\"", "name = \"t/x\""), "name");
        invalid(
            &MINIMAL.replace("name = \"br0\"", "name = \"a-very-long-bridge\""),
            "bridge.name",
        );
        invalid(
            &MINIMAL.replace("name = \"br0\"", "name = \"veth-a\""),
            "bridge.name",
        );
        invalid(
            &MINIMAL.replace("name = \"br0\"", "name = \"lo\""),
            "bridge.name",
        );
    }

    #[test]
    fn duplicate_macs_are_refused() {
        let text = format!(
            "{MINIMAL}        mac = \"02:77:00:00:00:02\"\n        [[containers]]\n        name = \"b\"\n        \
             address = \"10.77.0.3/24\"\n        mac = \"02:77:00:00:00:02\"\n"
        );
        invalid(&text, "containers[1].mac");
    }

    #[test]
    fn syntax_errors_and_unknown_keys_are_refused() {
        for text in [
            "name = ",
            &MINIMAL.replace("[bridge]", "[bridge]\nstp = true"),
            &MINIMAL.replace("address = \"10.77.0.2/24\"", ""),
        ] {
            match LabSpec::parse(text) {
                Err(error @ LabError::Syntax { .. }) => {
                    assert!(
                        error
                            .to_string()
                            .starts_with("lab spec: not a lab topology"),
                        "{error}"
                    );
                }
                other => panic!("expected a syntax error for {text:?}, got {other:?}"),
            }
        }
    }

    #[test]
    fn code_built_specs_are_validated_too() {
        let mut spec = LabSpec::parse(MINIMAL).unwrap();
        spec.containers[0].mac = Some(MacAddr([0xff; 6]));
        assert!(
            matches!(spec.validate(), Err(LabError::Invalid { key, .. }) if key == "containers[0].mac")
        );
        let mut spec = LabSpec::parse(MINIMAL).unwrap();
        spec.containers[0].address.prefix_len = 40;
        assert!(
            matches!(up(&spec), Err(LabError::Invalid { key, .. }) if key == "containers[0].address")
        );
    }
}
