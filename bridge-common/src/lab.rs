//! The lab file (see examples/lab.toml): its types, parsing, validation and the names of what a
//! lab makes. xbr builds labs from it (`xbr::lab`); xtask writes and reads lab files with it.
//!
//! It lives here, not in bridge-user, because xtask cannot depend on bridge-user: building that
//! compiles the eBPF object, which needs the bpf-linker xtask installs. Behind the `lab`
//! feature, the only part of this crate that uses std.

extern crate std;

use std::borrow::ToOwned;
use std::collections::HashSet;
use std::fmt;
use std::format;
use std::fs;
use std::io;
use std::net::Ipv4Addr;
use std::path::{Path, PathBuf};
use std::str::FromStr;
use std::string::{String, ToString};
use std::vec::Vec;

use serde::{Deserialize, Serialize};

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

/// Why a lab file or spec is refused. ORIGIN names what was read: the file, `lab spec` for
/// text, `lab NAME` for a spec built in code.
#[derive(Debug, thiserror::Error)]
pub enum LabSpecError {
    #[error("cannot read lab file {}: {cause}", path.display())]
    Read { path: PathBuf, cause: io::Error },
    #[error("{origin}: not a lab topology (see examples/lab.toml for the format): {cause}")]
    Syntax {
        origin: String,
        cause: toml::de::Error,
    },
    /// The value at KEY (as in `containers[1].mac`) is wrong; CONTAINER, when set, names the
    /// container it belongs to, so the reader need not count.
    #[error("{origin}: `{key}` {}{problem}", of_container(container))]
    Invalid {
        origin: String,
        key: String,
        container: Option<String>,
        problem: InvalidValue,
    },
}

/// What is wrong with one value of a lab spec; `LabSpecError::Invalid` says where it is.
/// Each message follows the key, so most start with the value (`= "10.77.0.2" ...`).
#[derive(Debug, thiserror::Error)]
pub enum InvalidValue {
    // Addresses.
    #[error("= {text:?} has no prefix length; {WANT_CIDR}")]
    CidrWithoutPrefix { text: String },
    #[error("= {text:?} is not an IPv4 address; {WANT_CIDR}")]
    NotIpv4 { text: String },
    #[error("= {text:?} has no prefix length from 0 to 32; {WANT_CIDR}")]
    BadPrefixLength { text: String },
    /// Only a spec built in code can hold one; text is refused with `BadPrefixLength`.
    #[error("= \"{cidr}\" has a prefix length above 32")]
    PrefixAbove32 { cidr: Ipv4Cidr },
    #[error("= {text:?} is not a MAC address; want six hex bytes like 02:77:00:00:00:02")]
    NotAMac { text: String },
    #[error(
        "= \"{mac}\" is not a unicast MAC; use a locally administered one like 02:77:00:00:00:02"
    )]
    NotUnicast { mac: MacAddr },
    #[error("= {mac} is used by an earlier container; MACs must be unique")]
    DuplicateMac { mac: MacAddr },

    // Names.
    #[error("is empty")]
    EmptyName,
    #[error("= {name:?} may hold only letters, digits, '-' and '_'")]
    NameCharacters { name: String },
    #[error("makes namespace name {netns} longer than 255 bytes; shorten it")]
    NamespaceTooLong { netns: String },
    #[error("= {name:?} is reserved for the lab's own namespace; rename the container")]
    ReservedContainerName { name: String },
    #[error(
        "= {name:?} is too long: its bridge port {port} exceeds {IFNAME_MAX} bytes (keep names to {keep} bytes)",
        keep = IFNAME_MAX - PORT_PREFIX.len()
    )]
    ContainerNameTooLong { name: String, port: String },
    #[error("= {name:?} is used by an earlier container; names must be unique")]
    DuplicateContainer { name: String },
    #[error("= {name:?} must be 1 to {IFNAME_MAX} bytes long (an interface name)")]
    IfnameLength { name: String },
    #[error("= {name:?} is not a valid interface name (no '/', ':' or spaces)")]
    IfnameCharacters { name: String },
    #[error("= {name:?} is also the name of another link in the host namespace; rename the bridge")]
    BridgeNameTaken { name: String },
}

const WANT_CIDR: &str = "want an IPv4 address with prefix length, like 10.77.0.2/24";

/// `(container a) `, before a problem with one of container a's values.
fn of_container(container: &Option<String>) -> String {
    container
        .as_ref()
        .map(|name| format!("(container {name}) "))
        .unwrap_or_default()
}

/// The namespace holding lab LAB's bridge.
pub fn host_netns(lab: &str) -> String {
    format!("{lab}-host")
}

/// The namespace of CONTAINER in lab LAB.
pub fn container_netns(lab: &str, container: &str) -> String {
    format!("{lab}-{container}")
}

/// The namespace behind lab LAB's uplink.
pub fn outside_netns(lab: &str) -> String {
    format!("{lab}-out")
}

impl LabSpec {
    pub fn from_file(path: &Path) -> Result<LabSpec, LabSpecError> {
        let text = fs::read_to_string(path).map_err(|cause| LabSpecError::Read {
            path: path.to_owned(),
            cause,
        })?;
        parse_lab(&text, &path.display().to_string())
    }

    pub fn parse(text: &str) -> Result<LabSpec, LabSpecError> {
        parse_lab(text, "lab spec")
    }

    /// Checks what `parse` checks, for specs built in code.
    pub fn validate(&self) -> Result<(), LabSpecError> {
        self.validate_in(&format!("lab {}", self.name))
    }

    /// The lab file's text, which `parse` reads back as the same spec.
    pub fn to_toml(&self) -> String {
        toml::to_string(&LabFile::from(self)).expect("a lab file is plain strings and tables")
    }

    pub fn host_netns(&self) -> String {
        host_netns(&self.name)
    }

    pub fn container_netns(&self, container: &str) -> String {
        container_netns(&self.name, container)
    }

    pub fn outside_netns(&self) -> Option<String> {
        self.uplink.as_ref().map(|_| outside_netns(&self.name))
    }

    /// Every namespace `xbr lab up` makes: host, containers in order, then outside.
    pub fn namespaces(&self) -> Vec<String> {
        let containers = self
            .containers
            .iter()
            .map(|c| self.container_netns(&c.name));
        core::iter::once(self.host_netns())
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

    fn validate_in(&self, origin: &str) -> Result<(), LabSpecError> {
        let invalid = |key: &str, problem| LabSpecError::Invalid {
            origin: origin.to_owned(),
            key: key.to_owned(),
            container: None,
            problem,
        };
        check_plain_name(&self.name).map_err(|problem| invalid("name", problem))?;
        if let Some(netns) = self.namespaces().into_iter().find(|ns| ns.len() > 255) {
            return Err(invalid("name", InvalidValue::NamespaceTooLong { netns }));
        }
        check_ifname(&self.bridge.name).map_err(|problem| invalid("bridge.name", problem))?;
        if let Some(address) = self.bridge.address {
            address
                .check()
                .map_err(|problem| invalid("bridge.address", problem))?;
        }

        let mut names = HashSet::new();
        let mut macs = HashSet::new();
        for (index, container) in self.containers.iter().enumerate() {
            let key = |field: &str| format!("containers[{index}].{field}");
            let invalid_name = |problem| invalid(&key("name"), problem);
            // The container's own values name it: the key's index alone leaves one counting.
            let invalid_value = |field: &str, problem| LabSpecError::Invalid {
                origin: origin.to_owned(),
                key: key(field),
                container: Some(container.name.clone()),
                problem,
            };
            check_container_name(&container.name).map_err(invalid_name)?;
            if !names.insert(container.name.as_str()) {
                return Err(invalid_name(InvalidValue::DuplicateContainer {
                    name: container.name.clone(),
                }));
            }
            container
                .address
                .check()
                .map_err(|problem| invalid_value("address", problem))?;
            if let Some(mac) = container.mac {
                mac.check()
                    .map_err(|problem| invalid_value("mac", problem))?;
                if !macs.insert(mac) {
                    return Err(invalid_value("mac", InvalidValue::DuplicateMac { mac }));
                }
            }
        }

        let mut host_links = std::vec!["lo".to_owned()];
        host_links.extend(self.containers.iter().map(|c| LabSpec::port_name(&c.name)));
        if let Some(uplink) = &self.uplink {
            host_links.push(UPLINK_IFNAME.to_owned());
            uplink
                .host_address
                .check()
                .map_err(|problem| invalid("uplink.host_address", problem))?;
            uplink
                .outside_address
                .check()
                .map_err(|problem| invalid("uplink.outside_address", problem))?;
        }
        if host_links.contains(&self.bridge.name) {
            return Err(invalid(
                "bridge.name",
                InvalidValue::BridgeNameTaken {
                    name: self.bridge.name.clone(),
                },
            ));
        }
        Ok(())
    }
}

impl Ipv4Cidr {
    pub const fn new(addr: Ipv4Addr, prefix_len: u8) -> Ipv4Cidr {
        Ipv4Cidr { addr, prefix_len }
    }

    pub fn contains(&self, ip: Ipv4Addr) -> bool {
        let mask = u32::MAX
            .checked_shl(32 - u32::from(self.prefix_len.min(32)))
            .unwrap_or(0);
        u32::from(self.addr) & mask == u32::from(ip) & mask
    }

    fn check(&self) -> Result<(), InvalidValue> {
        if self.prefix_len > 32 {
            return Err(InvalidValue::PrefixAbove32 { cidr: *self });
        }
        Ok(())
    }
}

impl FromStr for Ipv4Cidr {
    type Err = InvalidValue;

    fn from_str(text: &str) -> Result<Ipv4Cidr, InvalidValue> {
        let (addr, prefix_len) = text
            .split_once('/')
            .ok_or_else(|| InvalidValue::CidrWithoutPrefix { text: text.into() })?;
        let addr = addr
            .parse()
            .map_err(|_| InvalidValue::NotIpv4 { text: text.into() })?;
        let prefix_len = prefix_len
            .parse()
            .ok()
            .filter(|len| *len <= 32)
            .ok_or_else(|| InvalidValue::BadPrefixLength { text: text.into() })?;
        Ok(Ipv4Cidr { addr, prefix_len })
    }
}

impl fmt::Display for Ipv4Cidr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.addr, self.prefix_len)
    }
}

impl MacAddr {
    fn check(&self) -> Result<(), InvalidValue> {
        // The kernel refuses a multicast or all-zero address on an Ethernet device.
        if self.0[0] & 1 != 0 || self.0 == [0; 6] {
            return Err(InvalidValue::NotUnicast { mac: *self });
        }
        Ok(())
    }
}

impl FromStr for MacAddr {
    type Err = InvalidValue;

    fn from_str(text: &str) -> Result<MacAddr, InvalidValue> {
        let problem = || InvalidValue::NotAMac {
            text: text.to_owned(),
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
#[derive(Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct LabFile {
    name: String,
    bridge: BridgeFile,
    #[serde(default)]
    containers: Vec<ContainerFile>,
    #[serde(skip_serializing_if = "Option::is_none")]
    uplink: Option<UplinkFile>,
}

#[derive(Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct BridgeFile {
    name: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    address: Option<String>,
}

#[derive(Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct ContainerFile {
    name: String,
    address: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    mac: Option<String>,
}

#[derive(Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct UplinkFile {
    host_address: String,
    outside_address: String,
}

impl From<&LabSpec> for LabFile {
    fn from(spec: &LabSpec) -> LabFile {
        LabFile {
            name: spec.name.clone(),
            bridge: BridgeFile {
                name: spec.bridge.name.clone(),
                address: spec.bridge.address.map(|address| address.to_string()),
            },
            containers: spec
                .containers
                .iter()
                .map(|container| ContainerFile {
                    name: container.name.clone(),
                    address: container.address.to_string(),
                    mac: container.mac.map(|mac| mac.to_string()),
                })
                .collect(),
            uplink: spec.uplink.as_ref().map(|uplink| UplinkFile {
                host_address: uplink.host_address.to_string(),
                outside_address: uplink.outside_address.to_string(),
            }),
        }
    }
}

fn parse_lab(text: &str, origin: &str) -> Result<LabSpec, LabSpecError> {
    let file: LabFile = toml::from_str(text).map_err(|cause| LabSpecError::Syntax {
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

fn parse_field<T: FromStr<Err = InvalidValue>>(
    origin: &str,
    key: String,
    value: &str,
) -> Result<T, LabSpecError> {
    value.parse().map_err(|problem| LabSpecError::Invalid {
        origin: origin.to_owned(),
        key,
        container: None,
        problem,
    })
}

/// Lab and container names become parts of namespace and interface names.
fn check_plain_name(name: &str) -> Result<(), InvalidValue> {
    if name.is_empty() {
        return Err(InvalidValue::EmptyName);
    }
    if !name
        .bytes()
        .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
    {
        return Err(InvalidValue::NameCharacters {
            name: name.to_owned(),
        });
    }
    Ok(())
}

fn check_container_name(name: &str) -> Result<(), InvalidValue> {
    check_plain_name(name)?;
    if RESERVED_CONTAINER_NAMES.contains(&name) {
        return Err(InvalidValue::ReservedContainerName {
            name: name.to_owned(),
        });
    }
    let port = LabSpec::port_name(name);
    if port.len() > IFNAME_MAX {
        return Err(InvalidValue::ContainerNameTooLong {
            name: name.to_owned(),
            port,
        });
    }
    Ok(())
}

fn check_ifname(name: &str) -> Result<(), InvalidValue> {
    if name.is_empty() || name.len() > IFNAME_MAX {
        return Err(InvalidValue::IfnameLength {
            name: name.to_owned(),
        });
    }
    if name == "."
        || name == ".."
        || name
            .bytes()
            .any(|b| b == b'/' || b == b':' || b.is_ascii_whitespace())
    {
        return Err(InvalidValue::IfnameCharacters {
            name: name.to_owned(),
        });
    }
    Ok(())
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
            Err(error @ LabSpecError::Invalid { .. }) => {
                let message = error.to_string();
                let LabSpecError::Invalid { key: found, .. } = &error else {
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
                Err(error @ LabSpecError::Syntax { .. }) => {
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
            matches!(spec.validate(), Err(LabSpecError::Invalid { key, .. }) if key == "containers[0].mac")
        );
        let mut spec = LabSpec::parse(MINIMAL).unwrap();
        spec.containers[0].address.prefix_len = 40;
        assert!(
            matches!(spec.validate(), Err(LabSpecError::Invalid { key, .. }) if key == "containers[0].address")
        );
    }

    /// The messages are what the user sees: each names the key, the value and the fix.
    #[test]
    fn messages_name_the_key_the_value_and_the_fix() {
        // MINIMAL's container a, its MAC A_MAC, and a container b with MAC B_MAC.
        let with_b = |a_mac: &str, b_mac: &str| {
            format!(
                "{MINIMAL}mac = \"{a_mac}\"\n[[containers]]\nname = \"b\"\naddress = \"10.77.0.3/24\"\n\
                 mac = \"{b_mac}\"\n"
            )
        };
        let cases = [
            (
                MINIMAL.replace("10.77.0.2/24", "10.77.0.2"),
                "lab spec: `containers[0].address` = \"10.77.0.2\" has no prefix length; want an \
                 IPv4 address with prefix length, like 10.77.0.2/24",
            ),
            (
                MINIMAL.replace("name = \"a\"", "name = \"abcdefghijk\""),
                "lab spec: `containers[0].name` = \"abcdefghijk\" is too long: its bridge port \
                 veth-abcdefghijk exceeds 15 bytes (keep names to 10 bytes)",
            ),
            (
                with_b("02:77:00:00:00:02", "02:77:00:00:00:02"),
                "lab spec: `containers[1].mac` (container b) = 02:77:00:00:00:02 is used by an \
                 earlier container; MACs must be unique",
            ),
            (
                with_b("02:77:00:00:00:02", "01:00:5e:00:00:01"),
                "lab spec: `containers[1].mac` (container b) = \"01:00:5e:00:00:01\" is not a \
                 unicast MAC; use a locally administered one like 02:77:00:00:00:02",
            ),
            (
                MINIMAL.replace("name = \"br0\"", "name = \"lo\""),
                "lab spec: `bridge.name` = \"lo\" is also the name of another link in the host \
                 namespace; rename the bridge",
            ),
            (
                MINIMAL.replace("name = \"t\"", "name = \"\""),
                "lab spec: `name` is empty",
            ),
        ];
        for (text, message) in cases {
            let error = LabSpec::parse(&text).expect_err(message);
            assert_eq!(error.to_string(), message);
        }
    }

    #[test]
    fn leaf_parsers_say_what_is_wrong_in_their_type() {
        assert!(matches!(
            "10.77.0.2".parse::<Ipv4Cidr>(),
            Err(InvalidValue::CidrWithoutPrefix { text }) if text == "10.77.0.2"
        ));
        assert!(matches!(
            "10.77.0.2/33".parse::<Ipv4Cidr>(),
            Err(InvalidValue::BadPrefixLength { .. })
        ));
        assert!(matches!(
            "02:77".parse::<MacAddr>(),
            Err(InvalidValue::NotAMac { .. })
        ));
    }

    #[test]
    fn a_written_lab_reads_back_the_same() {
        let example = LabSpec::parse(EXAMPLE).unwrap();
        assert_eq!(LabSpec::parse(&example.to_toml()).unwrap(), example);
        let mut minimal = LabSpec::parse(MINIMAL).unwrap();
        minimal.bridge.address = None;
        let text = minimal.to_toml();
        assert!(text.contains("[[containers]]"), "{text}");
        assert!(!text.contains("mac") && !text.contains("uplink"), "{text}");
        assert_eq!(LabSpec::parse(&text).unwrap(), minimal);
    }

    #[test]
    fn namespace_names_are_the_labs_prefix_and_a_role() {
        assert_eq!(host_netns("t"), "t-host");
        assert_eq!(container_netns("t", "a"), "t-a");
        assert_eq!(outside_netns("t"), "t-out");
    }
}
