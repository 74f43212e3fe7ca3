//! What the CLI prints: a table for people, JSON (`--json`) for scripts, from the same values.

use std::{collections::BTreeMap, path::PathBuf};

use bridge_common::{AttachMode, Endpoint, EndpointKey, NatEvent, PortStats, PublishedPort};
use serde_json::{Value, json};
use xbr::{
    datapath::{Attached, Attachment, Detached, mode_name, uplink_mode_name},
    docker::{DockerState, networks::Placed},
    egress::Egress,
    features::Features,
    hooks::Drift,
    lock::Holder,
    memory::Memory,
    observe::{BridgeView, format_mac},
    plan::{Plan, PublishedPolicy},
    publish::{NatState, PublishSpec, Published, Synced},
};

/// An attachment as read back from its pins, and what is true now beside it.
pub struct Observed {
    pub attachment: Attachment,
    /// The bridge now; `None`: gone.
    pub view: Option<BridgeView>,
    /// Docker's view of it, where Docker owns it.
    pub docker: Option<DockerState>,
    /// What xbr would plan for it now, under the ruleset as it is now.
    pub plan: Option<Plan>,
    /// Egress NAT as decided now (or why it could not be decided).
    pub egress: Option<std::result::Result<Egress, String>>,
    /// The Docker network it was named by, with its driver and namespace.
    pub network: Option<Placed>,
}

/// Pins that are not a whole attachment: an attach or detach interrupted, or running now.
pub struct Incomplete {
    pub bridge: String,
    pub dir: std::path::PathBuf,
    pub detail: String,
    /// Who is writing it now, if anyone.
    pub writer: Option<Holder>,
}

fn holder_json(holder: &Option<Holder>) -> Value {
    match holder {
        Some(holder) => json!({ "pid": holder.pid, "command": holder.command }),
        None => Value::Null,
    }
}

/// A port (or uplink) whose hook is not what xbr recorded, or that xbr has not hooked.
struct DriftLine {
    port: String,
    drift: Drift,
}

/// Every drift of an attachment: recorded hooks the kernel does not run as recorded, and
/// ports of the bridge now that xbr has not hooked.
fn drift_lines(attachment: &Attachment, view: Option<&BridgeView>) -> Vec<DriftLine> {
    let mut lines: Vec<DriftLine> = attachment
        .port_drift
        .iter()
        .chain(attachment.uplink_drift.iter())
        .map(|(ifindex, drift)| DriftLine {
            port: view
                .and_then(|v| v.ports.iter().find(|p| p.ifindex == *ifindex))
                .map(|p| p.name.clone())
                .unwrap_or_else(|| link_name(*ifindex)),
            drift: *drift,
        })
        .collect();
    if let Some(plan) = view.and_then(|v| xbr::plan::plan(v).ok()) {
        for port in &plan.ports {
            if !attachment.ports.contains_key(&port.ifindex) {
                lines.push(DriftLine {
                    port: port.name.clone(),
                    drift: Drift::NotHooked,
                });
            }
        }
    }
    lines
}

fn print_json(value: &Value) -> anyhow::Result<()> {
    println!("{}", serde_json::to_string_pretty(value)?);
    Ok(())
}

fn redirect_name(redirect_peer: bool) -> &'static str {
    if redirect_peer {
        "bpf_redirect_peer"
    } else {
        "bpf_redirect"
    }
}

/// The east-west traffic the plan's policy keeps on the kernel path, as (class, reason).
fn east_west_held(plan: &Plan) -> Vec<(String, &str)> {
    match &plan.east_west.off {
        Some(reason) => vec![("east-west traffic".to_owned(), reason.as_str())],
        None => plan
            .east_west
            .held
            .iter()
            .map(|(packets, reason)| (format!("east-west {packets}"), reason.as_str()))
            .collect(),
    }
}

/// A published port's policy as (class, reason) lines.
fn published_held(spec: &PublishSpec, policy: &PublishedPolicy) -> Vec<(String, String)> {
    let host_clients = policy.host_clients_held.iter().map(|reason| {
        (
            format!("published {spec} for clients on the host"),
            reason.clone(),
        )
    });
    if let Some(reason) = &policy.held {
        return std::iter::once((format!("published {spec}"), reason.clone()))
            .chain(host_clients)
            .collect();
    }
    let prefixes = policy
        .client_prefixes
        .iter()
        .map(|((prefix, len), reason)| {
            (
                format!(
                    "published {spec} for clients {}/{len}",
                    std::net::Ipv4Addr::from(prefix.client_ip)
                ),
                reason.clone(),
            )
        });
    policy
        .clients
        .iter()
        .map(|(client, reason)| {
            let address = match client.shape & bridge_common::ClientHoldKey::ADDRESS {
                0 => "*".to_owned(),
                _ => std::net::Ipv4Addr::from(client.client_ip).to_string(),
            };
            let port = match client.shape & bridge_common::ClientHoldKey::PORT {
                0 => "*".to_owned(),
                _ => u16::from_be_bytes(client.client_port).to_string(),
            };
            (
                format!("published {spec} for clients {address}:{port}"),
                reason.clone(),
            )
        })
        .chain(prefixes)
        .chain(host_clients)
        .collect()
}

/// The policy's east-west hold-backs: `east_west` when none may take the fast path, else
/// each held class.
fn egress_json(egress: &Egress) -> Value {
    match egress {
        Egress::Accelerated {
            subnet: (address, prefix_len),
            uplinks,
            ports: (port_min, port_max),
            skip: (skip_min, skip_max),
        } => json!({
            "accelerated": true,
            "subnet": format!("{address}/{prefix_len}"),
            "uplinks": uplinks.iter().map(|(uplink, address)| json!({
                "name": uplink.name,
                "address": address.to_string(),
            })).collect::<Vec<_>>(),
            "ports": [port_min, port_max],
            "except_ports": [skip_min, skip_max],
        }),
        Egress::Kernel(reason) => json!({ "accelerated": false, "reason": reason }),
    }
}

fn east_west_json(plan: &Plan) -> Value {
    json!({
        "east_west": plan.east_west.off,
        "east_west_held": plan
            .east_west
            .held
            .iter()
            .map(|(packets, reason)| json!({ "packets": packets, "reason": reason }))
            .collect::<Vec<_>>(),
    })
}

fn docker_json(state: &DockerState) -> Value {
    json!({
        "network": state.network.name,
        "network_id": state.network.id,
        "enable_icc": state.network.icc,
        "published": state.ports.specs.iter().map(ToString::to_string).collect::<Vec<_>>(),
        "left_to_docker": state.ports.skipped,
    })
}

pub fn attached(
    plan: &Plan,
    attached: &Attached,
    egress: &Egress,
    features: &Features,
    docker: Option<(&DockerState, Synced)>,
    as_json: bool,
) -> anyhow::Result<()> {
    let mode = mode_name(attached.mode);
    if as_json {
        let docker = docker.as_ref().map(|(state, synced)| {
            let mut value = docker_json(state);
            value["synced"] = json!({
                "added": synced.added.iter().map(ToString::to_string).collect::<Vec<_>>(),
                "removed": synced.removed.iter().map(ToString::to_string).collect::<Vec<_>>(),
                "held_by_xbr_publish": synced.held_by_user.iter().map(ToString::to_string).collect::<Vec<_>>(),
                "mirrored": synced.mirrored,
            });
            value
        });
        return print_json(&json!({
            "policy": east_west_json(plan),
            "docker": docker,
            "bridge": plan.bridge,
            "created": attached.created,
            "mode": mode,
            "uplink_mode": uplink_mode_name(attached.uplink_mode),
            "redirect": redirect_name(features.redirect_peer),
            "ports": attached.ports,
            "endpoints": attached.endpoints,
            "pins": attached.dir,
            "not_accelerated": skipped_json(plan),
            "repaired": attached.changes.repaired.iter()
                .map(|(port, drift)| json!({ "port": port, "problem": drift.name() }))
                .collect::<Vec<_>>(),
            "replaced_incomplete": attached.replaced_incomplete,
            "replaced_layout": attached.replaced_layout.as_ref().map(|found| found.clone().unwrap_or_else(|| "none".to_owned())),
            "egress": egress_json(egress),
        }));
    }
    let verb = if attached.created {
        "attached"
    } else {
        "already attached; brought up to date"
    };
    if attached.replaced_incomplete {
        println!(
            "found the pins of an interrupted attach or detach of {}; removed them",
            plan.bridge
        );
    }
    if let Some(found) = &attached.replaced_layout {
        println!(
            "found {} pinned by another version of xbr (layout {}); replaced it in place, \
             port by port, without a gap (its NAT connections start again)",
            plan.bridge,
            found.as_deref().unwrap_or("without a stamp")
        );
    }
    println!(
        "{verb} {} ({mode}, {}, uplinks {}): {} ports, {} endpoints; pinned at {}",
        plan.bridge,
        redirect_name(features.redirect_peer),
        uplink_mode_name(attached.uplink_mode),
        attached.ports,
        attached.endpoints,
        attached.dir.display()
    );
    for (port, drift) in &attached.changes.repaired {
        println!("  repaired {port}: {}", drift.describe());
    }
    for skipped in &plan.skipped {
        println!("  not accelerated: {}: {}", skipped.port, skipped.reason);
    }
    for (class, reason) in east_west_held(plan) {
        println!("  not accelerated: {class}: {reason}");
    }
    println!("  egress: {}", egress);
    if let Some((state, synced)) = &docker {
        let bindings = state.ports.specs.len();
        let mirrored = match (bindings, synced.mirrored) {
            (0, _) => "none".to_owned(),
            (_, 0) => format!(
                "{bindings}, left to Docker: they are mirrored with --follow only, which keeps \
                 them in step with containers"
            ),
            (_, mirrored) => format!(
                "{bindings}, {mirrored} of them in the datapath (`xbr status` says which the \
                 firewall holds back)"
            ),
        };
        println!(
            "  Docker network {}: published ports: {mirrored}",
            state.network.name
        );
        for spec in &synced.held_by_user {
            println!("  Docker's {spec} is held by an `xbr publish` entry for the same host port");
        }
    }
    if attached.mode == AttachMode::Clsact {
        println!(
            "  (clsact mode: detach with `xbr detach {}` before removing the qdisc by hand)",
            plan.bridge
        );
    }
    Ok(())
}

pub fn published(
    bridge: &str,
    spec: &PublishSpec,
    policy: Option<&PublishedPolicy>,
    no_uplink: bool,
    as_json: bool,
) -> anyhow::Result<()> {
    let held = policy.map(|p| published_held(spec, p)).unwrap_or_default();
    if as_json {
        return print_json(&json!({
            "bridge": bridge,
            "published": spec.to_string(),
            "uplinks": !no_uplink,
            "not_accelerated": held
                .iter()
                .map(|(class, reason)| json!({ "class": class, "reason": reason }))
                .collect::<Vec<_>>(),
        }));
    }
    println!("published {spec} on {bridge}");
    for (class, reason) in &held {
        println!("  not accelerated: {class}: {reason}");
    }
    if no_uplink {
        println!(
            "  warning: {bridge} has no uplink, so no outside connection reaches this port through xbr; \
             attach one with `xbr attach {bridge} --uplink IFACE`"
        );
    }
    Ok(())
}

pub fn unpublished(
    bridge: &str,
    spec: &PublishSpec,
    ended: usize,
    as_json: bool,
) -> anyhow::Result<()> {
    if as_json {
        return print_json(
            &json!({ "bridge": bridge, "unpublished": spec.to_string(), "connections_ended": ended }),
        );
    }
    println!("unpublished {spec} on {bridge}; ended {ended} connections");
    Ok(())
}

/// One attachment `xbr detach --all` removed.
#[derive(serde::Serialize)]
pub struct DetachedOne {
    pub bridge: String,
    /// Its namespace (a file to enter), or its pin directory when the namespace is gone.
    pub netns: PathBuf,
    /// Ports it was removed from; `None`: its namespace was gone, only pins were left.
    pub ports: Option<usize>,
    pub removed: PathBuf,
}

pub fn detached_all(detached: &[DetachedOne], as_json: bool) -> anyhow::Result<()> {
    if as_json {
        return print_json(&json!({ "detached": detached }));
    }
    if detached.is_empty() {
        println!("nothing attached");
    }
    for one in detached {
        match one.ports {
            Some(ports) => println!(
                "detached {} in {}: {ports} ports back on the plain bridge",
                one.bridge,
                one.netns.display()
            ),
            None => println!(
                "removed the pins of {} ({}): its namespace is gone",
                one.bridge,
                one.removed.display()
            ),
        }
    }
    Ok(())
}

pub fn detached(bridge: &str, detached: &Detached, as_json: bool) -> anyhow::Result<()> {
    if as_json {
        return print_json(
            &json!({ "bridge": bridge, "ports": detached.ports, "removed": detached.dir }),
        );
    }
    println!(
        "detached {bridge}: {} ports back on the plain bridge; removed {}",
        detached.ports,
        detached.dir.display()
    );
    Ok(())
}

fn memory_json(memory: &Memory) -> Value {
    json!({
        "locked_bytes": memory.total(),
        "maps_bytes": memory.maps_total(),
        "programs_bytes": memory.programs,
        "maps": memory.maps.iter().map(|map| json!({
            "name": map.name,
            "type": map.kind,
            "key_size": map.key_size,
            "value_size": map.value_size,
            "max_entries": map.max_entries,
            "flags": map.flags,
            "bytes": map.bytes,
        })).collect::<Vec<_>>(),
    })
}

/// Where the socket programs are hooked, and whether all of them still are.
fn print_socket_hooks(attachment: &Attachment) {
    let Some(hooks) = &attachment.socket_hooks else {
        println!(
            "  socket hooks: none (the host's own clients reach published ports the kernel's way)"
        );
        return;
    };
    let cgroup = hooks.cgroup.as_ref().map_or_else(
        || format!("cgroup id {} (gone)", hooks.cgroup_id),
        |path| path.display().to_string(),
    );
    println!(
        "  socket hooks: {} of {} programs on cgroup {cgroup}: the host's clients of published ports connect straight to the container",
        hooks.attached.len(),
        hooks.attached.len() + hooks.missing.len()
    );
    if !hooks.missing.is_empty() {
        println!(
            "  not accelerated: host clients: {} detached outside xbr; `xbr attach {}` puts them back",
            hooks.missing.join(", "),
            attachment.bridge
        );
    }
}

/// The kernel's memory figure for the attachment, and its three largest maps.
fn print_memory(memory: &Memory) {
    let largest: Vec<String> = memory
        .maps
        .iter()
        .take(3)
        .map(|map| format!("{} {}", map.name, kib(map.bytes)))
        .collect();
    println!(
        "  kernel memory: {} locked (maps {}, programs {}); largest: {}",
        kib(memory.total()),
        kib(memory.maps_total()),
        kib(memory.programs),
        largest.join(", ")
    );
}

fn kib(bytes: u64) -> String {
    format!("{:.0} KiB", bytes as f64 / 1024.0)
}

fn nat_json(nat: &NatState) -> Value {
    let events: serde_json::Map<String, Value> = nat
        .events
        .iter()
        .map(|(event, count)| (event.name().to_owned(), json!(count)))
        .collect();
    json!({
        "tables": nat.tables,
        "established": nat.established,
        "established_capacity": nat.established_capacity,
        "transient": nat.transient,
        "transient_entries": nat.transient_entries,
        "transient_expired": nat.transient_expired,
        "transient_capacity": nat.transient_capacity,
        "replaced": nat.replaced,
        "events": events,
    })
}

/// The connection tables: use, size, and what happened to connections since attach.
fn print_nat(nat: &NatState) {
    if !nat.tables {
        println!(
            "  NAT connection tables: none until a port is published (then {} established, {} transient connections)",
            nat.established_capacity, nat.transient_capacity
        );
        return;
    }
    println!(
        "  NATed connections: {} established (table of {}), {} transient: new or closing (table of {}, \
         the oldest replaced when full){}",
        nat.established,
        nat.established_capacity,
        nat.transient,
        nat.transient_capacity,
        if nat.transient_expired > 0 {
            format!("; {} expired entries wait for reuse", nat.transient_expired)
        } else {
            String::new()
        }
    );
    let opened = nat.event(NatEvent::Opened);
    if opened > 0 {
        println!(
            "  since attach: {opened} opened, {} established, {} replaced while not established, \
             {} closed, {} reset{}",
            nat.event(NatEvent::Established),
            nat.replaced,
            nat.event(NatEvent::Closed),
            nat.event(NatEvent::Reset),
            match nat.event(NatEvent::EstablishedTableFull) {
                0 => String::new(),
                full => format!(
                    "; {full} found the established table full (they stay transient, where a flood can replace them)"
                ),
            }
        );
    }
}

fn link_name(ifindex: u32) -> String {
    nix::net::if_::if_indextoname(ifindex)
        .map(|name| name.to_string_lossy().into_owned())
        .unwrap_or_else(|_| format!("ifindex {ifindex}"))
}

fn skipped_json(plan: &Plan) -> Value {
    plan.skipped
        .iter()
        .map(|s| json!({ "port": s.port, "reason": s.reason }))
        .collect()
}

/// The endpoint MAC of each port, from the pinned endpoints map.
/// The container MAC behind each port (a VXLAN port's remote MACs are not its own).
fn macs_by_port(attachment: &Attachment) -> BTreeMap<u32, EndpointKey> {
    attachment
        .endpoints
        .iter()
        .filter(|(_, endpoint)| endpoint.flags & Endpoint::REMOTE == 0)
        .map(|(key, endpoint)| (endpoint.ifindex, *key))
        .collect()
}

/// A remote endpoint as people read it: its MAC and, when known, its IPv4 address.
#[derive(serde::Serialize)]
struct Remote {
    mac: String,
    ipv4: Option<String>,
}

struct PortLine {
    ifindex: u32,
    name: String,
    mac: Option<String>,
    container_interface: Option<String>,
    container_ips: Vec<String>,
    /// A VXLAN port: the containers on other hosts that frames reach through it.
    remotes: Vec<Remote>,
}

fn port_lines(attachment: &Attachment, view: Option<&BridgeView>) -> Vec<PortLine> {
    let macs = macs_by_port(attachment);
    attachment
        .ports
        .keys()
        .map(|ifindex| {
            let port = view.and_then(|v| v.ports.iter().find(|p| p.ifindex == *ifindex));
            let peer = port.and_then(|p| p.peer.as_ref());
            PortLine {
                ifindex: *ifindex,
                name: port
                    .map(|p| p.name.clone())
                    .unwrap_or_else(|| "(gone)".to_owned()),
                mac: macs.get(ifindex).map(|k| format_mac(&k.mac)),
                container_interface: peer.map(|p| p.name.clone()),
                container_ips: peer
                    .map(|p| p.addresses.iter().map(|a| a.to_string()).collect())
                    .unwrap_or_default(),
                remotes: attachment
                    .endpoints
                    .iter()
                    .filter(|(_, e)| e.ifindex == *ifindex && e.flags & Endpoint::REMOTE != 0)
                    .map(|(key, endpoint)| Remote {
                        mac: format_mac(&key.mac),
                        ipv4: (endpoint.ipv4 != [0; 4])
                            .then(|| std::net::Ipv4Addr::from(endpoint.ipv4).to_string()),
                    })
                    .collect(),
            }
        })
        .collect()
}

/// Each published port with what the policy says about it now (when it could be asked).
fn published_policies(observed: &Observed) -> Vec<(&Published, Option<PublishedPolicy>)> {
    let uplinks: Vec<String> = observed
        .attachment
        .uplinks
        .iter()
        .map(|i| link_name(*i))
        .collect();
    observed
        .attachment
        .published
        .iter()
        .map(|published| {
            let policy = observed.plan.as_ref().map(|plan| {
                let spec = &published.spec;
                let value = PublishedPort {
                    container_ip: spec.container_ip.octets(),
                    container_port: spec.container_port.to_be_bytes(),
                    ifindex: published.port_ifindex.unwrap_or(0),
                    ..PublishedPort::default()
                };
                plan.published_policy(&spec.key(), &value, &uplinks)
            });
            (published, policy)
        })
        .collect()
}

/// Whether the pinned datapath does what the plan (under the ruleset now) says: without a
/// follower, a rule added since the last attach is not applied yet.
fn up_to_date(observed: &Observed) -> bool {
    let Some(plan) = &observed.plan else {
        return true;
    };
    let attachment = &observed.attachment;
    let holds_match = plan.east_west.holds.keys().eq(attachment.holds.iter());
    let endpoints_match = plan.endpoints.keys().eq(attachment.endpoints.keys());
    let published_match = published_policies(observed)
        .iter()
        .all(|(published, policy)| {
            policy.as_ref().is_none_or(|policy| {
                published.flags
                    & (PublishedPort::HELD
                        | PublishedPort::CLIENT_HOLDS
                        | PublishedPort::HOST_CLIENTS_HELD)
                    == policy.flags()
            })
        });
    holds_match && endpoints_match && published_match
}

pub fn status(
    attachments: &[Observed],
    incomplete: &[Incomplete],
    features: &Features,
    as_json: bool,
) -> anyhow::Result<()> {
    let kernel = json!({
        "release": features.kernel,
        "tcx": features.tcx,
        "redirect_peer": features.redirect_peer,
        "xdp": features.xdp,
        "socket_hooks": features.socket_hooks,
    });
    if as_json {
        let bridges: Vec<Value> = attachments
            .iter()
            .map(|observed| {
                let Observed {
                    attachment,
                    view,
                    docker,
                    plan,
                    egress,
                    network,
                } = observed;
                let ports: Vec<Value> = port_lines(attachment, view.as_ref())
                    .into_iter()
                    .map(|line| {
                        json!({
                            "name": line.name,
                            "ifindex": line.ifindex,
                            "endpoint_mac": line.mac,
                            "remote_endpoints": line.remotes,
                            "container_interface": line.container_interface,
                            "container_ips": line.container_ips,
                            "hook": attachment.port_drift.get(&line.ifindex).map_or("ok", |d| d.name()),
                        })
                    })
                    .collect();
                let repairing = attachment.follower.is_some();
                let drift: Vec<Value> = drift_lines(attachment, view.as_ref())
                    .iter()
                    .map(|line| {
                        json!({
                            "port": line.port,
                            "problem": line.drift.name(),
                            "detail": line.drift.describe(),
                            "repairing": repairing,
                        })
                    })
                    .collect();
                let published: Vec<Value> = published_policies(observed)
                    .iter()
                    .map(|(p, policy)| {
                        json!({
                            "spec": p.spec.to_string(),
                            "container_port_ifindex": p.port_ifindex,
                            "held": p.flags & PublishedPort::HELD != 0,
                            "clients_held": p.flags & PublishedPort::CLIENT_HOLDS != 0,
                            "host_clients_held": p.flags & PublishedPort::HOST_CLIENTS_HELD != 0,
                            "host_clients": json!({
                                "connects": p.host_clients.connects,
                                "datagrams": p.host_clients.datagrams,
                                "kernel_path": p.host_clients.kernel_path,
                            }),
                            "not_accelerated": policy.as_ref().map(|policy| {
                                published_held(&p.spec, policy)
                                    .into_iter()
                                    .map(|(class, reason)| json!({ "class": class, "reason": reason }))
                                    .collect::<Vec<_>>()
                            }),
                        })
                    })
                    .collect();
                json!({
                    "published": published,
                    "uplinks": attachment.uplinks.iter().map(|i| link_name(*i)).collect::<Vec<_>>(),
                    "uplink_mode": uplink_mode_name(attachment.modes.uplink),
                    "uplink_xdp": attachment
                        .uplink_xdp
                        .iter()
                        .map(|(i, how)| (link_name(*i), *how))
                        .collect::<BTreeMap<_, _>>(),
                    "connections": attachment.nat.established + attachment.nat.transient,
                    "nat": nat_json(&attachment.nat),
                    "memory": memory_json(&attachment.memory),
                    "socket_hooks": attachment.socket_hooks.as_ref().map(|hooks| json!({
                        "cgroup": hooks.cgroup,
                        "cgroup_id": hooks.cgroup_id,
                        "attached": hooks.attached,
                        "missing": hooks.missing,
                    })),
                    "name": attachment.bridge,
                    "ifindex": attachment.record.ifindex,
                    "present": view.is_some(),
                    "mode": mode_name(attachment.modes.attach),
                    "redirect": redirect_name(attachment.record.redirect_peer != 0),
                    "pins": attachment.dir,
                    "attached_by": if xbr::cni::made_by_cni(&attachment.dir) { "xbr-cni" } else { "xbr attach" },
                    "ports": ports,
                    "not_accelerated": plan.as_ref().map(skipped_json),
                    "policy": plan.as_ref().map(|plan| {
                        let mut policy = east_west_json(plan);
                        policy["ruleset"] = match &plan.policy.firewall {
                            Ok(_) => json!("read"),
                            Err(why) => json!(format!("unreadable: {why}")),
                        };
                        policy["applied"] = json!(up_to_date(observed));
                        policy
                    }),
                    "docker": docker.as_ref().map(docker_json),
                    "docker_network": network,
                    "egress": egress.as_ref().map(|egress| match egress {
                        Ok(egress) => egress_json(egress),
                        Err(error) => json!({ "accelerated": null, "error": error }),
                    }),
                    "drift": drift,
                    "follower": holder_json(&attachment.follower),
                    "writer": holder_json(&attachment.writer),
                })
            })
            .collect();
        let incomplete: Vec<Value> = incomplete
            .iter()
            .map(|i| {
                json!({
                    "name": i.bridge,
                    "pins": i.dir,
                    "detail": i.detail,
                    "writer": holder_json(&i.writer),
                })
            })
            .collect();
        return print_json(
            &json!({ "kernel": kernel, "bridges": bridges, "incomplete": incomplete }),
        );
    }

    println!(
        "kernel {}: tcx {}, bpf_redirect_peer {}, xdp {}, socket hooks {}",
        features.kernel,
        if features.tcx { "yes" } else { "no" },
        if features.redirect_peer { "yes" } else { "no" },
        if features.xdp { "yes" } else { "no" },
        if features.socket_hooks {
            "yes"
        } else {
            "no (needs 5.14)"
        }
    );
    if attachments.is_empty() && incomplete.is_empty() {
        println!(
            "no bridge attached in this network namespace; attach one with `xbr attach BRIDGE`"
        );
    }
    for incomplete in incomplete {
        println!();
        match &incomplete.writer {
            Some(writer) => println!(
                "bridge {}  being attached or detached now by {writer}  pins {}",
                incomplete.bridge,
                incomplete.dir.display()
            ),
            None => println!("bridge {}  {}", incomplete.bridge, incomplete.detail),
        }
    }
    for observed in attachments {
        let Observed {
            attachment,
            view,
            docker,
            plan,
            egress,
            network,
        } = observed;
        println!();
        println!(
            "bridge {}  mode {}  {}  pins {}{}{}",
            attachment.bridge,
            mode_name(attachment.modes.attach),
            redirect_name(attachment.record.redirect_peer != 0),
            attachment.dir.display(),
            if xbr::cni::made_by_cni(&attachment.dir) {
                "  (attached by xbr-cni: its last container's DEL detaches it)"
            } else {
                ""
            },
            if view.is_none() {
                "  (bridge is gone: run `xbr detach` to clean up)"
            } else {
                ""
            }
        );
        println!(
            "  {:<16} {:>7}  {:<17}  {:<10} IPS",
            "PORT", "IFINDEX", "ENDPOINT MAC", "CONTAINER"
        );
        for line in port_lines(attachment, view.as_ref()) {
            println!(
                "  {:<16} {:>7}  {:<17}  {:<10} {}",
                line.name,
                line.ifindex,
                line.mac.as_deref().unwrap_or("-"),
                line.container_interface.as_deref().unwrap_or("-"),
                line.container_ips.join(" ")
            );
            for remote in &line.remotes {
                println!(
                    "  {:<16} {:>7}  {:<17}  {:<10} {}",
                    "",
                    "",
                    remote.mac,
                    "(remote)",
                    remote.ipv4.as_deref().unwrap_or("")
                );
            }
        }
        let uplinks: Vec<String> = attachment
            .uplinks
            .iter()
            .map(|i| match attachment.uplink_xdp.get(i) {
                Some(how) => format!("{} (xdp {how})", link_name(*i)),
                None => link_name(*i),
            })
            .collect();
        println!(
            "  uplinks ({} mode): {}",
            uplink_mode_name(attachment.modes.uplink),
            if uplinks.is_empty() {
                "none".to_owned()
            } else {
                uplinks.join(" ")
            },
        );
        match egress {
            Some(Ok(egress)) => println!("  egress: {}", egress),
            Some(Err(error)) => println!("  egress: cannot tell: {error}"),
            None => {}
        }
        if let Some(follower) = &attachment.follower {
            println!("  followed by {follower}");
        }
        if let Some(writer) = &attachment.writer {
            println!("  being changed now by {writer}");
        }
        for line in drift_lines(attachment, view.as_ref()) {
            match &attachment.follower {
                Some(_) => println!("  {}: {}, repairing", line.port, line.drift.describe()),
                None => println!(
                    "  not accelerated: {}: {}; `xbr attach {}` repairs it",
                    line.port,
                    line.drift.describe(),
                    attachment.bridge
                ),
            }
        }
        print_nat(&attachment.nat);
        print_memory(&attachment.memory);
        print_socket_hooks(attachment);
        let published = published_policies(observed);
        for (
            Published {
                spec,
                port_ifindex,
                flags,
                host_clients,
            },
            _,
        ) in &published
        {
            let target = match port_ifindex {
                Some(_) if flags & PublishedPort::HELD != 0 => "held back: kernel path".to_owned(),
                Some(ifindex) => format!("via {}", link_name(*ifindex)),
                None => "container not on the bridge now: kernel path".to_owned(),
            };
            println!("  published {spec}  ({target})");
            if attachment.socket_hooks.is_some() {
                println!(
                    "    host clients: {} connects and {} datagrams sent straight to the container, {} left to the kernel path",
                    host_clients.connects, host_clients.datagrams, host_clients.kernel_path
                );
            }
        }
        if let Some(plan) = plan {
            for skipped in &plan.skipped {
                println!("  not accelerated: {}: {}", skipped.port, skipped.reason);
            }
            for (class, reason) in east_west_held(plan) {
                println!("  not accelerated: {class}: {reason}");
            }
            for (published, policy) in &published {
                for (class, reason) in policy
                    .iter()
                    .flat_map(|policy| published_held(&published.spec, policy))
                {
                    println!("  not accelerated: {class}: {reason}");
                }
            }
            if !up_to_date(observed) {
                println!(
                    "  warning: the datapath does not do this yet (a rule or container changed \
                     since it was last brought up to date); run `xbr attach {}` (or keep \
                     `xbr attach {} --follow` running)",
                    attachment.bridge, attachment.bridge
                );
            }
        }
        if let Some(network) = network.as_ref().filter(|_| docker.is_none()) {
            let netns = network
                .netns
                .as_ref()
                .map(|path| format!(", namespace {}", path.display()))
                .unwrap_or_default();
            println!(
                "  Docker network {} ({} driver{netns})",
                network.name, network.driver
            );
        }
        if let Some(docker) = docker {
            println!(
                "  Docker network {} (enable_icc {})",
                docker.network.name, docker.network.icc
            );
            // Docker binds every port on [::] too: say how many, not each.
            let (ipv6, other): (Vec<&String>, Vec<&String>) = docker
                .ports
                .skipped
                .iter()
                .partition(|skipped| skipped.contains("IPv6 binding"));
            if !ipv6.is_empty() {
                println!(
                    "  left to Docker: {} IPv6 bindings (xbr translates IPv4)",
                    ipv6.len()
                );
            }
            for skipped in other {
                println!("  left to Docker: {skipped}");
            }
        }
    }
    Ok(())
}

pub fn stats(attachments: &[Observed], as_json: bool) -> anyhow::Result<()> {
    let mut endpoints = Vec::new();
    for Observed {
        attachment, view, ..
    } in attachments
    {
        for line in port_lines(attachment, view.as_ref()) {
            let stats = attachment
                .stats
                .get(&line.ifindex)
                .copied()
                .unwrap_or_default();
            endpoints.push((attachment.bridge.as_str(), line, stats));
        }
    }
    if as_json {
        let endpoints: Vec<Value> = endpoints
            .iter()
            .map(|(bridge, line, stats)| {
                let PortStats {
                    fast_path_packets,
                    fast_path_bytes,
                    bridge_packets,
                    bridge_bytes,
                    delivered_packets,
                    delivered_bytes,
                } = *stats;
                json!({
                    "bridge": bridge,
                    "port": line.name,
                    "ifindex": line.ifindex,
                    "mac": line.mac,
                    "fast_path_packets": fast_path_packets,
                    "fast_path_bytes": fast_path_bytes,
                    "bridge_packets": bridge_packets,
                    "bridge_bytes": bridge_bytes,
                    "delivered_packets": delivered_packets,
                    "delivered_bytes": delivered_bytes,
                })
            })
            .collect();
        let verdicts: Vec<Value> = attachments
            .iter()
            .map(|Observed { attachment, .. }| {
                let mut counts = serde_json::Map::new();
                counts.insert("bridge".to_owned(), json!(attachment.bridge));
                for (verdict, count) in &attachment.verdicts {
                    counts.insert(verdict.name().to_owned(), json!(count));
                }
                Value::Object(counts)
            })
            .collect();
        // What happened to NATed connections and flows (published ports and egress).
        let nat: Vec<Value> = attachments
            .iter()
            .map(|Observed { attachment, .. }| {
                let mut counts = serde_json::Map::new();
                counts.insert("bridge".to_owned(), json!(attachment.bridge));
                for (event, count) in &attachment.nat.events {
                    counts.insert(event.name().to_owned(), json!(count));
                }
                Value::Object(counts)
            })
            .collect();
        return print_json(&json!({ "endpoints": endpoints, "verdicts": verdicts, "nat": nat }));
    }
    println!(
        "{:<10} {:<16} {:<17} {:>12} {:>14} {:>12} {:>12}",
        "BRIDGE", "PORT", "MAC", "FAST PKTS", "FAST BYTES", "BRIDGE PKTS", "DELIVERED"
    );
    for (bridge, line, stats) in &endpoints {
        println!(
            "{:<10} {:<16} {:<17} {:>12} {:>14} {:>12} {:>12}",
            bridge,
            line.name,
            line.mac.as_deref().unwrap_or("-"),
            stats.fast_path_packets,
            stats.fast_path_bytes,
            stats.bridge_packets,
            stats.delivered_packets
        );
    }
    for Observed { attachment, .. } in attachments {
        let verdicts: Vec<String> = attachment
            .verdicts
            .iter()
            .map(|(verdict, count)| format!("{}={count}", verdict.name()))
            .collect();
        println!("verdicts {}: {}", attachment.bridge, verdicts.join(" "));
        let events: Vec<String> = attachment
            .nat
            .events
            .iter()
            .map(|(event, count)| format!("{}={count}", event.name()))
            .collect();
        println!("nat {}: {}", attachment.bridge, events.join(" "));
    }
    Ok(())
}
