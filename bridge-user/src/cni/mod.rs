//! `xbr-cni`: xbr as a chained CNI plugin. Appended to a network's plugin list after
//! `bridge` (and `portmap`, `firewall`), it puts each container on the fast path before ADD
//! returns, through the same observe -> plan -> apply and the same pins (and lock) as
//! `xbr attach`: `xbr status`, `stats` and `detach` see CNI endpoints like any other.
//!
//! - ADD attaches the bridge if it is not (no socket hooks unless configured, no uplinks
//!   unless configured) or reconciles it, which hooks the new veth and retires a veth an
//!   earlier ADD of the container left (`podman network reload`); with uplinks configured,
//!   the `portMappings` capability's ports are published in the datapath.
//! - DEL runs before `bridge` deletes the veth (plugins are deleted in reverse order): the
//!   reconcile plans that port as gone. It unpublishes the container's ports, and when the
//!   bridge was attached by xbr-cni and has no port left, detaches it: a network whose last
//!   container left holds no xbr state. Idempotent: no prevResult, container gone, twice.
//! - CHECK fails unless the container's veth holds the program with the container's MAC.
//! - GC reconciles the bridges xbr-cni attached; STATUS says whether the kernel can run xbr.

pub mod protocol;

use std::{
    collections::BTreeMap,
    fs::File,
    net::Ipv4Addr,
    path::{Path, PathBuf},
    time::Duration,
};

use futures::TryStreamExt as _;
use netlink_packet_route::link::{InfoKind, LinkAttribute, LinkMessage};
use nix::sched::{CloneFlags, setns};

use crate::{
    datapath::{self, ModeChoice, Pinned, SocketHooksChoice, UplinkModeChoice},
    error::Error,
    features, lock, netlink,
    observe::format_mac,
    pins,
    plan::{self, Plan},
    publish::{Proto, PublishSpec},
    reconcile::{self, Inputs, Outcome},
};
pub use protocol::{CniError, Code, Command, Environment, NetConf};

/// The marker directory in an attachment that xbr-cni made (bpffs holds directories, not
/// files): its last DEL detaches the bridge. An attachment made by `xbr attach` has none,
/// and stays when its CNI containers leave.
const CNI_MARKER: &str = "cni";

/// Runs one plugin call: `vars` is the process environment, `stdin` the configuration.
/// Returns what to print on stdout, or the error to print.
pub fn run(vars: &BTreeMap<String, String>, stdin: &[u8]) -> Result<Option<String>, CniError> {
    let env = Environment::from_vars(vars)?;
    if env.command == Command::Version {
        return Ok(Some(protocol::version_result(stdin)));
    }
    let conf = NetConf::parse(stdin, env.command)?;
    if !nix::unistd::geteuid().is_root() {
        return Err(CniError::new(
            Code::NotAvailable,
            "xbr-cni must run as root",
            "it loads eBPF programs and writes bpffs pins; runtimes run CNI plugins as root",
        ));
    }
    match env.command {
        Command::Add => add(&env, &conf).map(Some),
        Command::Del => del(&env, &conf).map(|()| None),
        Command::Check => check(&env, &conf).map(|()| None),
        Command::Gc => gc(&conf).map(|()| None),
        Command::Status => status().map(|()| None),
        Command::Version => unreachable!("answered above"),
    }
}

fn pin_root(conf: &NetConf) -> PathBuf {
    conf.pin_root
        .clone()
        .unwrap_or_else(|| PathBuf::from(pins::DEFAULT_PIN_ROOT))
}

fn wait(conf: &NetConf) -> Duration {
    conf.wait_seconds
        .map_or(lock::DEFAULT_WAIT, Duration::from_secs)
}

/// An xbr error as a CNI error: a busy bridge is worth retrying, the rest is the datapath's.
fn datapath_error(doing: &str, error: Error) -> CniError {
    let code = match error {
        Error::Busy { .. } => Code::TryAgainLater,
        Error::MissingFeature { .. } => Code::NotAvailable,
        _ => Code::Datapath,
    };
    CniError::new(code, format!("xbr-cni: {doing}"), error.to_string())
}

fn io_error(doing: &str, error: std::io::Error) -> CniError {
    CniError::new(Code::Io, format!("xbr-cni: {doing}"), error.to_string())
}

/// Where a container's veth is: the bridge, and the port when the veth is still there.
#[derive(Debug)]
struct Place {
    bridge: String,
    port: Option<u32>,
}

async fn link_by_index(
    handle: &rtnetlink::Handle,
    index: u32,
) -> Result<Option<LinkMessage>, rtnetlink::Error> {
    match handle
        .link()
        .get()
        .match_index(index)
        .execute()
        .try_next()
        .await
    {
        Ok(link) => Ok(link),
        Err(error) if netlink::is_errno(&error, libc::ENODEV) => Ok(None),
        Err(error) => Err(error),
    }
}

/// The bridge `link` is a port of, if any.
async fn bridge_of(
    handle: &rtnetlink::Handle,
    link: &LinkMessage,
) -> Result<Option<String>, rtnetlink::Error> {
    let Some(controller) = netlink::link_controller(link) else {
        return Ok(None);
    };
    Ok(link_by_index(handle, controller)
        .await?
        .filter(|c| netlink::link_kind(c) == Some(&InfoKind::Bridge))
        .map(|c| netlink::link_name(&c)))
}

/// Finds the container's place from the host interfaces `prevResult` names: the one that is
/// a port of a bridge (the veth), else the one that is a bridge (the veth is gone).
fn place_of(names: &[String]) -> Result<Option<Place>, CniError> {
    let names = names.to_vec();
    netlink::run(|handle| async move {
        let mut named_bridge = None;
        for name in &names {
            let Some(link) = netlink::link_by_name(&handle, name).await? else {
                continue;
            };
            if netlink::link_kind(&link) == Some(&InfoKind::Bridge) {
                named_bridge.get_or_insert_with(|| name.clone());
            } else if let Some(bridge) = bridge_of(&handle, &link).await? {
                return Ok(Some(Place {
                    bridge,
                    port: Some(link.header.index),
                }));
            }
        }
        Ok(named_bridge.map(|bridge| Place { bridge, port: None }))
    })
    .map_err(|e| io_error("opening a netlink socket", e))?
    .map_err(|e: rtnetlink::Error| {
        CniError::new(Code::Io, "xbr-cni: reading the host's links", e.to_string())
    })
}

/// Without `prevResult` (DEL after a failed ADD): the container's interface in its namespace
/// names its veth peer on the host. `None` when the namespace or the interface is gone.
fn place_from_netns(netns: &Path, ifname: &str) -> Result<Option<Place>, CniError> {
    let Ok(file) = File::open(netns) else {
        return Ok(None);
    };
    let ifname = ifname.to_owned();
    let peer = std::thread::scope(|scope| {
        scope
            .spawn(move || -> Option<u32> {
                setns(&file, CloneFlags::CLONE_NEWNET).ok()?;
                netlink::run(|handle| async move {
                    let link = netlink::link_by_name(&handle, &ifname).await.ok()??;
                    link.attributes.iter().find_map(|a| match a {
                        LinkAttribute::Link(peer) => Some(*peer),
                        _ => None,
                    })
                })
                .ok()?
            })
            .join()
            .ok()
            .flatten()
    });
    let Some(peer) = peer else {
        return Ok(None);
    };
    netlink::run(|handle| async move {
        let Some(link) = link_by_index(&handle, peer).await? else {
            return Ok(None);
        };
        Ok(bridge_of(&handle, &link).await?.map(|bridge| Place {
            bridge,
            port: Some(link.header.index),
        }))
    })
    .map_err(|e| io_error("opening a netlink socket", e))?
    .map_err(|e: rtnetlink::Error| {
        CniError::new(Code::Io, "xbr-cni: reading the host's links", e.to_string())
    })
}

/// The policy and inputs of a CNI reconcile: the firewall's rules, no Docker.
fn policy() -> plan::Policy {
    plan::Policy {
        firewall: crate::policy::read(),
        ..plan::Policy::default()
    }
}

fn add(env: &Environment, conf: &NetConf) -> Result<String, CniError> {
    let endpoint = conf.required_endpoint(&env.ifname)?;
    let place = place_of(&endpoint.host_interfaces)?;
    let Some(Place {
        bridge,
        port: Some(port),
    }) = place
    else {
        return Err(CniError::new(
            Code::InvalidConfig,
            format!(
                "none of prevResult's host interfaces ({}) is a veth on a bridge",
                endpoint.host_interfaces.join(", ")
            ),
            "xbr-cni accelerates containers on a Linux bridge: put it after the `bridge` plugin",
        ));
    };
    let features = usable_kernel()?;
    let root = pin_root(conf);
    let doing = format!("putting the container on bridge {bridge}'s fast path");
    let _writer = lock::Writer::acquire(&root, &bridge, true, wait(conf))
        .map_err(|e| datapath_error(&doing, e))?;
    let first_attach = !pins::bridge_dir(&root, &bridge).is_ok_and(|dir| pins::is_complete(&dir));
    // Many ADDs started together queue on the lock; the first reconcile hooks every veth
    // there by then, and the others find theirs done.
    if !first_attach
        && conf.uplinks.is_empty()
        && let Some(mac) = endpoint.container_mac
        && Pinned::open(&root, &bridge)
            .is_ok_and(|pinned| pinned.serves(port, mac, &endpoint.container_ipv4))
    {
        return Ok(protocol::add_result(conf));
    }
    let socket_hooks = match &conf.socket_hooks {
        None | Some(protocol::SocketHooks::Enabled(true)) => SocketHooksChoice::Auto,
        Some(protocol::SocketHooks::Enabled(false)) => SocketHooksChoice::Off,
        Some(protocol::SocketHooks::Cgroup(path)) => SocketHooksChoice::At(path.clone()),
    };
    let mode = match conf.mode.as_deref() {
        Some("tcx") => ModeChoice::Tcx,
        Some("clsact") => ModeChoice::Clsact,
        _ => ModeChoice::Auto,
    };
    let policy = policy();
    let inputs = Inputs {
        policy: &policy,
        docker: None,
        mirror_docker: false,
        leaving: &[],
    };
    let options = reconcile::AttachOptions {
        uplinks: conf.uplinks.clone(),
        default_uplinks: false,
        mode,
        uplink_mode: UplinkModeChoice::Auto,
        max_flows: conf.max_flows,
        socket_hooks: &socket_hooks,
        masquerade: false,
        features: &features,
        root: &root,
    };
    let attach =
        reconcile::attach(&bridge, options, &inputs).map_err(|e| datapath_error(&doing, e))?;
    if first_attach {
        mark_as_cni(&attach.attached.dir).map_err(|e| io_error(&doing, e))?;
    }
    let plan = attach.plan;
    let Some(&container_mac) = plan.port_macs.get(&port) else {
        let name = plan
            .ports
            .iter()
            .find(|p| p.ifindex == port)
            .map(|p| &p.name);
        let why = name
            .and_then(|name| plan.skipped.iter().find(|s| &s.port == name))
            .map_or("it is not a veth port".to_owned(), |s| s.reason.clone());
        return Err(CniError::new(
            Code::Datapath,
            format!(
                "xbr-cni: the container's veth (ifindex {port}) on {bridge} is not an endpoint"
            ),
            why,
        ));
    };
    if !conf.uplinks.is_empty() && !conf.runtime_config.port_mappings.is_empty() {
        publish_ports(
            &root,
            &plan,
            port,
            container_mac,
            &endpoint.container_ipv4,
            conf,
        )?;
    }
    Ok(protocol::add_result(conf))
}

/// Whether xbr-cni made the attachment pinned at `dir` (its last container's DEL detaches it).
pub fn made_by_cni(dir: &Path) -> bool {
    dir.join(CNI_MARKER).is_dir()
}

/// `xbr attach` on an attachment xbr-cni made: from now on it is the user's, and stays when
/// the last container leaves (a follower beside the plugin keeps following).
pub fn hand_to_user(dir: &Path) -> std::io::Result<()> {
    match std::fs::remove_dir(dir.join(CNI_MARKER)) {
        Err(e) if e.kind() != std::io::ErrorKind::NotFound => Err(e),
        _ => Ok(()),
    }
}

fn mark_as_cni(dir: &Path) -> std::io::Result<()> {
    match std::fs::create_dir(dir.join(CNI_MARKER)) {
        Err(e) if e.kind() != std::io::ErrorKind::AlreadyExists => Err(e),
        _ => Ok(()),
    }
}

/// The `portMappings` of a container, as published ports of its IPv4 address. Mappings xbr
/// does not serve (IPv6 host addresses, other protocols) stay with `portmap`.
fn wanted_ports(mappings: &[protocol::PortMapping], container_ip: Ipv4Addr) -> Vec<PublishSpec> {
    mappings
        .iter()
        .filter_map(|m| {
            let proto = match m.protocol.to_ascii_lowercase().as_str() {
                "tcp" => Proto::Tcp,
                "udp" => Proto::Udp,
                _ => return None,
            };
            let host_ip = match m.host_ip.as_str() {
                "" | "0.0.0.0" => None,
                text => Some(text.parse::<Ipv4Addr>().ok()?),
            };
            (m.host_port != 0 && m.container_port != 0).then_some(PublishSpec {
                host_ip,
                host_port: m.host_port,
                container_ip,
                container_port: m.container_port,
                proto,
            })
        })
        .collect()
}

fn publish_ports(
    root: &Path,
    plan: &Plan,
    port: u32,
    container_mac: [u8; 6],
    container_ipv4: &[Ipv4Addr],
    conf: &NetConf,
) -> Result<(), CniError> {
    let doing = "publishing the container's ports";
    let Some(&container_ip) = container_ipv4.first() else {
        tracing::warn!("the container has no IPv4 address: its ports stay with portmap");
        return Ok(());
    };
    let mut pinned = Pinned::open(root, &plan.bridge).map_err(|e| datapath_error(doing, e))?;
    let containers = BTreeMap::from([(container_ip, (port, container_mac))]);
    let published = pinned.published();
    for spec in wanted_ports(&conf.runtime_config.port_mappings, container_ip) {
        // The runtime owns its host ports: an entry a container left behind (its DEL never
        // ran) gives way.
        if let Some(stale) = published
            .iter()
            .find(|p| p.spec.key() == spec.key() && p.spec != spec)
        {
            pinned
                .unpublish(&stale.spec)
                .map_err(|e| datapath_error(doing, e))?;
        }
        pinned
            .publish(&spec, &containers, plan.bridge_mac)
            .map_err(|e| datapath_error(doing, e))?;
    }
    pinned
        .apply_published_policy(plan)
        .map_err(|e| datapath_error(doing, e))?;
    Ok(())
}

fn del(env: &Environment, conf: &NetConf) -> Result<(), CniError> {
    // A prevResult that cannot be read is no reason to keep state: fall back to the netns.
    let endpoint = conf
        .prev_result
        .as_ref()
        .and_then(|prev| protocol::Endpoint::from_result(prev, &env.ifname).ok());
    let mut place = match &endpoint {
        Some(endpoint) => place_of(&endpoint.host_interfaces)?,
        None => None,
    };
    if place.as_ref().is_none_or(|p| p.port.is_none())
        && let Some(netns) = &env.netns
        && let Some(found) = place_from_netns(netns, &env.ifname)?
    {
        place = Some(found);
    }
    let Some(place) = place else {
        // The container's veth is gone and nothing says where it was: the bridges xbr-cni
        // attached forget whatever ports are gone.
        return gc(conf);
    };
    let root = pin_root(conf);
    let doing = format!(
        "taking the container off bridge {}'s fast path",
        place.bridge
    );
    let _writer = match lock::Writer::acquire(&root, &place.bridge, false, wait(conf)) {
        Ok(writer) => writer,
        Err(Error::NotAttached { .. }) => return Ok(()),
        Err(error) => return Err(datapath_error(&doing, error)),
    };
    let mut pinned = match Pinned::open(&root, &place.bridge) {
        Ok(pinned) => pinned,
        Err(Error::NotAttached { .. } | Error::Incomplete { .. }) => return Ok(()),
        Err(error) => return Err(datapath_error(&doing, error)),
    };
    if let Some(endpoint) = &endpoint {
        for published in pinned.published() {
            if endpoint
                .container_ipv4
                .contains(&published.spec.container_ip)
                && published.port_ifindex.is_none_or(|p| Some(p) == place.port)
            {
                pinned
                    .unpublish(&published.spec)
                    .map_err(|e| datapath_error(&doing, e))?;
            }
        }
    }
    let policy = policy();
    let leaving: Vec<u32> = place.port.into_iter().collect();
    let inputs = Inputs {
        policy: &policy,
        docker: None,
        mirror_docker: false,
        leaving: &leaving,
    };
    let bridge_gone = match reconcile::once(&mut pinned, &inputs) {
        Ok(Outcome::BridgeGone) => true,
        Ok(Outcome::Reconciled(pass)) => {
            pass.changes.map_err(|e| datapath_error(&doing, e))?;
            false
        }
        Err(error) => return Err(datapath_error(&doing, error)),
    };
    if made_by_cni(&pinned.dir)
        && (bridge_gone || (pinned.hooked_ports() == 0 && pinned.published().is_empty()))
    {
        pinned.detach().map_err(|e| datapath_error(&doing, e))?;
    }
    Ok(())
}

fn check(env: &Environment, conf: &NetConf) -> Result<(), CniError> {
    let endpoint = conf.required_endpoint(&env.ifname)?;
    let not_on_fast_path =
        |msg: String, details: &str| CniError::new(Code::NotOnFastPath, msg, details.to_owned());
    let Some(Place {
        bridge,
        port: Some(port),
    }) = place_of(&endpoint.host_interfaces)?
    else {
        return Err(not_on_fast_path(
            format!(
                "none of prevResult's host interfaces ({}) is a veth on a bridge",
                endpoint.host_interfaces.join(", ")
            ),
            "the container's veth is gone: the runtime should ADD it again",
        ));
    };
    let root = pin_root(conf);
    let attachment = datapath::read(&root, &bridge).map_err(|e| {
        not_on_fast_path(
            format!("bridge {bridge} is not attached"),
            &format!("{e}; the next ADD attaches it"),
        )
    })?;
    let Some(record) = attachment.ports.get(&port) else {
        return Err(not_on_fast_path(
            format!("the container's veth (ifindex {port}) on {bridge} holds no xbr program"),
            "ADD it again, or run `xbr attach` on the bridge",
        ));
    };
    if let Some(drift) = attachment.port_drift.get(&port) {
        return Err(not_on_fast_path(
            format!(
                "the container's veth (ifindex {port}) on {bridge}: {}",
                drift.describe()
            ),
            "a hook was changed outside xbr; ADD again or `xbr attach` the bridge to repair it",
        ));
    }
    if let Some(mac) = endpoint.container_mac
        && record.endpoint_mac != mac
    {
        return Err(not_on_fast_path(
            format!(
                "the container's veth on {bridge} holds MAC {}, prevResult says {}",
                format_mac(&record.endpoint_mac),
                format_mac(&mac)
            ),
            "the container's interface changed since ADD",
        ));
    }
    Ok(())
}

/// GC: the bridges xbr-cni attached are reconciled, which retires ports whose veth is gone;
/// one whose bridge is gone, or with no port left, is detached.
fn gc(conf: &NetConf) -> Result<(), CniError> {
    let root = pin_root(conf);
    let bridges = pins::attached_bridges(&root)
        .map_err(|e| datapath_error("listing the bridges attached here", e))?;
    let policy = policy();
    for bridge in bridges {
        let doing = format!("collecting bridge {bridge}'s garbage");
        let Ok(dir) = pins::bridge_dir(&root, &bridge) else {
            continue;
        };
        if !made_by_cni(&dir) {
            continue;
        }
        let _writer = match lock::Writer::acquire(&root, &bridge, false, wait(conf)) {
            Ok(writer) => writer,
            Err(Error::NotAttached { .. }) => continue,
            Err(error) => return Err(datapath_error(&doing, error)),
        };
        let Ok(mut pinned) = Pinned::open(&root, &bridge) else {
            continue;
        };
        let inputs = Inputs {
            policy: &policy,
            docker: None,
            mirror_docker: false,
            leaving: &[],
        };
        let gone = matches!(
            reconcile::once(&mut pinned, &inputs).map_err(|e| datapath_error(&doing, e))?,
            Outcome::BridgeGone
        );
        if gone || (pinned.hooked_ports() == 0 && pinned.published().is_empty()) {
            pinned.detach().map_err(|e| datapath_error(&doing, e))?;
        }
    }
    Ok(())
}

/// STATUS: whether the kernel can run xbr's programs.
fn status() -> Result<(), CniError> {
    usable_kernel().map(|_| ())
}

/// The kernel's features, when it can run xbr's programs.
fn usable_kernel() -> Result<features::Features, CniError> {
    let features = features::detect();
    if !features.sched_cls {
        return Err(CniError::new(
            Code::NotAvailable,
            "xbr-cni: the kernel refused a tc BPF program",
            format!(
                "kernel {}; xbr needs BPF_PROG_TYPE_SCHED_CLS",
                features.kernel
            ),
        ));
    }
    Ok(features)
}

#[cfg(test)]
mod tests;
