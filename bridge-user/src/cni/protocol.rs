//! The CNI protocol as a chained plugin sees it: the environment and network configuration a
//! runtime hands over, the `prevResult` of the plugins before, and the replies (results,
//! errors, VERSION). Pure, so every case is tested over recorded inputs without root.
//! Spec: https://github.com/containernetworking/cni/blob/main/SPEC.md

use std::{collections::BTreeMap, net::Ipv4Addr, path::PathBuf};

use serde::Deserialize;
use serde_json::{Value, json};

/// The versions whose configurations and results xbr-cni reads and writes. From 0.3.0 on,
/// results have the shape a chained plugin needs (interfaces with sandboxes, ips pointing at
/// them); xbr-cni passes the result on unchanged, so every one of them is the same to it.
pub const SUPPORTED_VERSIONS: [&str; 5] = ["0.3.0", "0.3.1", "0.4.0", "1.0.0", "1.1.0"];
/// The newest version: VERSION's answer when the runtime's is unknown.
pub const NEWEST_VERSION: &str = "1.1.0";

/// The spec's error codes (1-99 are the spec's, 100 and up the plugin's own).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[repr(u32)]
pub enum Code {
    IncompatibleVersion = 1,
    UnsupportedField = 2,
    InvalidEnvironment = 4,
    Io = 5,
    Decode = 6,
    InvalidConfig = 7,
    TryAgainLater = 11,
    NotAvailable = 50,
    /// The datapath could not be brought to what the endpoint needs.
    Datapath = 100,
    /// CHECK: the endpoint is not on the fast path as `prevResult` says.
    NotOnFastPath = 101,
}

/// A CNI error: printed as the spec's error object on stdout, with exit status 1.
#[derive(Debug, PartialEq, Eq)]
pub struct CniError {
    pub code: Code,
    pub msg: String,
    /// What to do about it, or the underlying error.
    pub details: String,
}

impl CniError {
    pub fn new(code: Code, msg: impl Into<String>, details: impl Into<String>) -> CniError {
        CniError {
            code,
            msg: msg.into(),
            details: details.into(),
        }
    }

    pub fn to_json(&self, version: &str) -> String {
        json!({
            "cniVersion": version,
            "code": self.code as u32,
            "msg": self.msg,
            "details": self.details,
        })
        .to_string()
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Command {
    Add,
    Del,
    Check,
    Version,
    Gc,
    Status,
}

/// What the runtime says through the environment.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Environment {
    pub command: Command,
    pub container_id: String,
    /// The container's network namespace (a path); absent on DEL when it is gone.
    pub netns: Option<PathBuf>,
    /// The container's interface name.
    pub ifname: String,
}

impl Environment {
    /// Reads the CNI_* variables of `vars` (the process environment, or a recorded one).
    pub fn from_vars(vars: &BTreeMap<String, String>) -> Result<Environment, CniError> {
        let get = |name: &str| vars.get(name).filter(|v| !v.is_empty()).cloned();
        let missing = |name: &str| {
            CniError::new(
                Code::InvalidEnvironment,
                format!("{name} is not set"),
                "xbr-cni is a CNI plugin: a runtime (podman, containerd, kubelet) runs it with \
                 CNI_COMMAND, CNI_CONTAINERID, CNI_NETNS and CNI_IFNAME set",
            )
        };
        let command = match get("CNI_COMMAND")
            .ok_or_else(|| missing("CNI_COMMAND"))?
            .as_str()
        {
            "ADD" => Command::Add,
            "DEL" => Command::Del,
            "CHECK" => Command::Check,
            "VERSION" => Command::Version,
            "GC" => Command::Gc,
            "STATUS" => Command::Status,
            other => {
                return Err(CniError::new(
                    Code::InvalidEnvironment,
                    format!("unknown CNI_COMMAND {other:?}"),
                    "expected ADD, DEL, CHECK, VERSION, GC or STATUS",
                ));
            }
        };
        // What each command needs, as the spec lists it.
        let per_container = matches!(command, Command::Add | Command::Del | Command::Check);
        let container_id = match get("CNI_CONTAINERID") {
            Some(id) => id,
            None if per_container => return Err(missing("CNI_CONTAINERID")),
            None => String::new(),
        };
        let netns = get("CNI_NETNS").map(PathBuf::from);
        if netns.is_none() && matches!(command, Command::Add | Command::Check) {
            return Err(missing("CNI_NETNS"));
        }
        let ifname = match get("CNI_IFNAME") {
            Some(name) => name,
            None if per_container => return Err(missing("CNI_IFNAME")),
            None => String::new(),
        };
        Ok(Environment {
            command,
            container_id,
            netns,
            ifname,
        })
    }
}

/// xbr-cni's entry in the network's plugin list, with what the runtime adds to it.
#[derive(Clone, Debug, Deserialize, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct NetConf {
    pub cni_version: String,
    #[serde(default)]
    pub name: String,
    /// Where attachments are pinned (`xbr --pin-root`); default /sys/fs/bpf/xbr.
    pub pin_root: Option<PathBuf>,
    /// Interfaces where outside clients of published ports arrive (`xbr attach --uplink`).
    /// With uplinks, the `portMappings` capability's ports are published in xbr's datapath;
    /// without, the `portmap` plugin keeps them.
    #[serde(default)]
    pub uplinks: Vec<String>,
    /// `true` (default): the socket programs at the root of the cgroup v2 hierarchy, where the
    /// kernel has them; `false`: none; a path: that cgroup.
    pub socket_hooks: Option<SocketHooks>,
    /// "auto" (default), "tcx" or "clsact": as `xbr attach --mode`.
    pub mode: Option<String>,
    /// As `xbr attach --max-flows`.
    pub max_flows: Option<u32>,
    /// How long to wait for another xbr writer of the bridge (default 60 s).
    pub wait_seconds: Option<u64>,
    /// The result of the plugins before this one.
    pub prev_result: Option<Value>,
    #[serde(default)]
    pub runtime_config: RuntimeConfig,
}

#[derive(Clone, Debug, Deserialize, PartialEq, Eq)]
#[serde(untagged)]
pub enum SocketHooks {
    Enabled(bool),
    Cgroup(PathBuf),
}

#[derive(Clone, Debug, Default, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "camelCase")]
pub struct RuntimeConfig {
    #[serde(default)]
    pub port_mappings: Vec<PortMapping>,
}

/// One entry of the `portMappings` capability (`podman run -p`, a pod's hostPort).
#[derive(Clone, Debug, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "camelCase")]
pub struct PortMapping {
    pub host_port: u16,
    pub container_port: u16,
    #[serde(default = "tcp")]
    pub protocol: String,
    #[serde(default, rename = "hostIP")]
    pub host_ip: String,
}

fn tcp() -> String {
    "tcp".to_owned()
}

impl NetConf {
    /// Parses the configuration on stdin and checks its version against what `command` needs.
    pub fn parse(stdin: &[u8], command: Command) -> Result<NetConf, CniError> {
        let conf: NetConf = serde_json::from_slice(stdin).map_err(|e| {
            CniError::new(
                Code::Decode,
                "the network configuration on stdin is not valid",
                e.to_string(),
            )
        })?;
        if !SUPPORTED_VERSIONS.contains(&conf.cni_version.as_str()) {
            return Err(CniError::new(
                Code::IncompatibleVersion,
                format!("cniVersion {} is not supported", conf.cni_version),
                format!("xbr-cni supports {}", SUPPORTED_VERSIONS.join(", ")),
            ));
        }
        let needs = match command {
            Command::Check => Some("0.4.0"),
            Command::Gc | Command::Status => Some("1.1.0"),
            _ => None,
        };
        if let Some(needs) = needs
            && version_number(&conf.cni_version) < version_number(needs)
        {
            return Err(CniError::new(
                Code::IncompatibleVersion,
                format!("{command:?} needs cniVersion {needs} or later"),
                format!("the network's configuration says {}", conf.cni_version),
            ));
        }
        if let Some(mode) = &conf.mode
            && !["auto", "tcx", "clsact"].contains(&mode.as_str())
        {
            return Err(CniError::new(
                Code::InvalidConfig,
                format!("mode {mode:?} is not auto, tcx or clsact"),
                "set \"mode\" in xbr-cni's entry of the plugin list, or leave it out",
            ));
        }
        Ok(conf)
    }

    /// What `prevResult` says about the container, for ADD and CHECK (which need it).
    pub fn required_endpoint(&self, ifname: &str) -> Result<Endpoint, CniError> {
        let prev = self.prev_result.as_ref().ok_or_else(|| {
            CniError::new(
                Code::InvalidConfig,
                "no prevResult: xbr-cni is a chained plugin",
                "put xbr-cni after the `bridge` plugin in the network's plugin list",
            )
        })?;
        Endpoint::from_result(prev, ifname)
    }
}

fn version_number(version: &str) -> (u32, u32, u32) {
    let mut parts = version.split('.').map(|p| p.parse().unwrap_or(0));
    (
        parts.next().unwrap_or(0),
        parts.next().unwrap_or(0),
        parts.next().unwrap_or(0),
    )
}

/// The container's place as the plugins before xbr-cni made it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Endpoint {
    /// Interfaces of the host's namespace (no sandbox): the bridge and the container's veth
    /// end, in the order the result lists them.
    pub host_interfaces: Vec<String>,
    /// The container's interface MAC, when the result gives it.
    pub container_mac: Option<[u8; 6]>,
    /// The container interface's IPv4 addresses.
    pub container_ipv4: Vec<Ipv4Addr>,
}

#[derive(Deserialize)]
struct ResultShape {
    #[serde(default)]
    interfaces: Vec<InterfaceShape>,
    #[serde(default)]
    ips: Vec<IpShape>,
}

#[derive(Deserialize)]
struct InterfaceShape {
    name: String,
    #[serde(default)]
    mac: String,
    #[serde(default)]
    sandbox: String,
}

#[derive(Deserialize)]
struct IpShape {
    address: String,
    interface: Option<usize>,
}

impl Endpoint {
    pub fn from_result(result: &Value, ifname: &str) -> Result<Endpoint, CniError> {
        let shape: ResultShape = serde_json::from_value(result.clone()).map_err(|e| {
            CniError::new(
                Code::Decode,
                "prevResult is not a CNI result",
                e.to_string(),
            )
        })?;
        let container = shape
            .interfaces
            .iter()
            .position(|i| !i.sandbox.is_empty() && i.name == ifname)
            .or_else(|| shape.interfaces.iter().position(|i| !i.sandbox.is_empty()));
        let host_interfaces = shape
            .interfaces
            .iter()
            .filter(|i| i.sandbox.is_empty())
            .map(|i| i.name.clone())
            .collect::<Vec<_>>();
        if host_interfaces.is_empty() {
            return Err(CniError::new(
                Code::InvalidConfig,
                "prevResult names no interface on the host",
                "xbr-cni accelerates containers on a bridge: put it after the `bridge` plugin",
            ));
        }
        let container_mac = container.and_then(|at| parse_mac(&shape.interfaces[at].mac));
        let container_ipv4 = shape
            .ips
            .iter()
            .filter(|ip| ip.interface.is_none() || ip.interface == container)
            .filter_map(|ip| ip.address.split('/').next()?.parse().ok())
            .collect();
        Ok(Endpoint {
            host_interfaces,
            container_mac,
            container_ipv4,
        })
    }
}

pub fn parse_mac(text: &str) -> Option<[u8; 6]> {
    let mut mac = [0u8; 6];
    let mut parts = text.split(':');
    for byte in &mut mac {
        *byte = u8::from_str_radix(parts.next()?, 16).ok()?;
    }
    parts.next().is_none().then_some(mac)
}

/// ADD's result: the previous result unchanged, in the configuration's version.
pub fn add_result(conf: &NetConf) -> String {
    let mut result = conf.prev_result.clone().unwrap_or_else(|| json!({}));
    if let Some(object) = result.as_object_mut() {
        object.insert("cniVersion".to_owned(), json!(conf.cni_version));
    }
    result.to_string()
}

/// VERSION's answer, in the version the runtime asked with when xbr-cni speaks it.
pub fn version_result(stdin: &[u8]) -> String {
    let asked = serde_json::from_slice::<Value>(stdin)
        .ok()
        .and_then(|v| v.get("cniVersion")?.as_str().map(str::to_owned))
        .filter(|v| SUPPORTED_VERSIONS.contains(&v.as_str()))
        .unwrap_or_else(|| NEWEST_VERSION.to_owned());
    json!({ "cniVersion": asked, "supportedVersions": SUPPORTED_VERSIONS }).to_string()
}

/// The version to write an error in: the configuration's, when it can be read.
pub fn reply_version(stdin: &[u8]) -> String {
    serde_json::from_slice::<Value>(stdin)
        .ok()
        .and_then(|v| v.get("cniVersion")?.as_str().map(str::to_owned))
        .filter(|v| SUPPORTED_VERSIONS.contains(&v.as_str()))
        .unwrap_or_else(|| NEWEST_VERSION.to_owned())
}
