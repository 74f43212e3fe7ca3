//! What the CLI prints: a table for people, JSON (`--json`) for scripts, from the same values.

use std::collections::BTreeMap;

use bridge_common::{AttachMode, EndpointKey, NatEvent, PortStats};
use serde_json::{Value, json};
use xbr::{
    datapath::{Attached, Attachment, Detached, mode_name, uplink_mode_name},
    docker::{DockerState, Synced},
    features::Features,
    observe::{BridgeView, format_mac},
    plan::{Plan, Policy, plan},
    publish::{NatState, PublishSpec, Published},
};

/// An attachment, its bridge now (`None`: gone), and Docker's view of it (where Docker owns it).
pub type Observed = (Attachment, Option<BridgeView>, Option<DockerState>);

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

/// The traffic classes a policy keeps on the kernel path, as (class, reason).
fn held_back(policy: &Policy) -> Vec<(&'static str, &str)> {
    let mut held = Vec::new();
    if let Some(reason) = &policy.east_west {
        held.push(("east-west traffic", reason.as_str()));
    }
    if let Some(reason) = &policy.published {
        held.push(("Docker's published ports", reason.as_str()));
    }
    held
}

fn policy_json(policy: &Policy) -> Value {
    json!({ "east_west": policy.east_west, "published": policy.published })
}

fn docker_json(state: &DockerState) -> Value {
    json!({
        "network": state.network.name,
        "network_id": state.network.id,
        "enable_icc": state.network.icc,
        "published": state.ports.specs.iter().map(ToString::to_string).collect::<Vec<_>>(),
        "left_to_docker": state.ports.skipped,
        "policy": policy_json(&state.policy),
    })
}

pub fn attached(
    plan: &Plan,
    attached: &Attached,
    features: &Features,
    docker: Option<(&DockerState, Synced)>,
    as_json: bool,
) -> anyhow::Result<()> {
    let mode = mode_name(attached.mode as u32);
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
            "policy": policy_json(&plan.policy),
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
        }));
    }
    let verb = if attached.created {
        "attached"
    } else {
        "already attached; brought up to date"
    };
    println!(
        "{verb} {} ({mode}, {}, uplinks {}): {} ports, {} endpoints; pinned at {}",
        plan.bridge,
        redirect_name(features.redirect_peer),
        uplink_mode_name(attached.uplink_mode),
        attached.ports,
        attached.endpoints,
        attached.dir.display()
    );
    for skipped in &plan.skipped {
        println!("  not accelerated: {}: {}", skipped.port, skipped.reason);
    }
    for (class, reason) in held_back(&plan.policy) {
        println!("  not accelerated: {class}: {reason}");
    }
    if let Some((state, synced)) = &docker {
        let bindings = state.ports.specs.len();
        let mirrored = match (bindings, synced.mirrored) {
            (0, _) => "none".to_owned(),
            _ if plan.policy.published.is_some() => {
                format!("{bindings}, left to Docker while the firewall holds them back")
            }
            (_, 0) => format!(
                "{bindings}, left to Docker: they are mirrored with --follow only, which keeps \
                 them in step with containers"
            ),
            (_, mirrored) => format!("{bindings}, {mirrored} of them accelerated"),
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
    no_uplink: bool,
    as_json: bool,
) -> anyhow::Result<()> {
    if as_json {
        return print_json(
            &json!({ "bridge": bridge, "published": spec.to_string(), "uplinks": !no_uplink }),
        );
    }
    println!("published {spec} on {bridge}");
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

fn nat_json(nat: &NatState) -> Value {
    let events: serde_json::Map<String, Value> = nat
        .events
        .iter()
        .map(|(event, count)| (event.name().to_owned(), json!(count)))
        .collect();
    json!({
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
fn macs_by_port(attachment: &Attachment) -> BTreeMap<u32, EndpointKey> {
    attachment
        .endpoints
        .iter()
        .map(|(key, endpoint)| (endpoint.ifindex, *key))
        .collect()
}

struct PortLine {
    ifindex: u32,
    name: String,
    mac: Option<String>,
    container_interface: Option<String>,
    container_ips: Vec<String>,
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
            }
        })
        .collect()
}

pub fn status(attachments: &[Observed], features: &Features, as_json: bool) -> anyhow::Result<()> {
    let kernel = json!({
        "release": features.kernel,
        "tcx": features.tcx,
        "redirect_peer": features.redirect_peer,
        "xdp": features.xdp,
    });
    if as_json {
        let bridges: Vec<Value> = attachments
            .iter()
            .map(|(attachment, view, docker)| {
                let ports: Vec<Value> = port_lines(attachment, view.as_ref())
                    .into_iter()
                    .map(|line| {
                        json!({
                            "name": line.name,
                            "ifindex": line.ifindex,
                            "endpoint_mac": line.mac,
                            "container_interface": line.container_interface,
                            "container_ips": line.container_ips,
                        })
                    })
                    .collect();
                let published: Vec<Value> = attachment
                    .published
                    .iter()
                    .map(|p| json!({ "spec": p.spec.to_string(), "container_port_ifindex": p.port_ifindex }))
                    .collect();
                json!({
                    "published": published,
                    "uplinks": attachment.uplinks.iter().map(|i| link_name(*i)).collect::<Vec<_>>(),
                    "uplink_mode": uplink_mode_name(attachment.record.uplink_mode),
                    "uplink_xdp": attachment
                        .uplink_xdp
                        .iter()
                        .map(|(i, how)| (link_name(*i), *how))
                        .collect::<BTreeMap<_, _>>(),
                    "connections": attachment.nat.established + attachment.nat.transient,
                    "nat": nat_json(&attachment.nat),
                    "name": attachment.bridge,
                    "ifindex": attachment.record.ifindex,
                    "present": view.is_some(),
                    "mode": mode_name(attachment.record.attach_mode),
                    "redirect": redirect_name(attachment.record.redirect_peer != 0),
                    "pins": attachment.dir,
                    "ports": ports,
                    "not_accelerated": view.as_ref().and_then(|v| plan(v).ok()).map(|p| skipped_json(&p)),
                    "policy": policy_json(&docker.as_ref().map(|d| d.policy.clone()).unwrap_or_default()),
                    "docker": docker.as_ref().map(docker_json),
                })
            })
            .collect();
        return print_json(&json!({ "kernel": kernel, "bridges": bridges }));
    }

    println!(
        "kernel {}: tcx {}, bpf_redirect_peer {}, xdp {}",
        features.kernel,
        if features.tcx { "yes" } else { "no" },
        if features.redirect_peer { "yes" } else { "no" },
        if features.xdp { "yes" } else { "no" }
    );
    if attachments.is_empty() {
        println!(
            "no bridge attached in this network namespace; attach one with `xbr attach BRIDGE`"
        );
    }
    for (attachment, view, docker) in attachments {
        println!();
        println!(
            "bridge {}  mode {}  {}  pins {}{}",
            attachment.bridge,
            mode_name(attachment.record.attach_mode),
            redirect_name(attachment.record.redirect_peer != 0),
            attachment.dir.display(),
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
            uplink_mode_name(attachment.record.uplink_mode),
            if uplinks.is_empty() {
                "none".to_owned()
            } else {
                uplinks.join(" ")
            },
        );
        print_nat(&attachment.nat);
        for Published { spec, port_ifindex } in &attachment.published {
            let target = match port_ifindex {
                Some(ifindex) => format!("via {}", link_name(*ifindex)),
                None => "container not on the bridge now: kernel path".to_owned(),
            };
            println!("  published {spec}  ({target})");
        }
        if let Some(plan) = view.as_ref().and_then(|v| plan(v).ok()) {
            for skipped in &plan.skipped {
                println!("  not accelerated: {}: {}", skipped.port, skipped.reason);
            }
        }
        if let Some(docker) = docker {
            println!(
                "  Docker network {} (enable_icc {})",
                docker.network.name, docker.network.icc
            );
            for (class, reason) in held_back(&docker.policy) {
                println!("  not accelerated: {class}: {reason}");
            }
            // What the firewall says now, against what the pins do: without a follower, a
            // change since the last attach is not applied yet.
            if docker.policy.east_west.is_some() && !attachment.endpoints.is_empty() {
                println!(
                    "  warning: east-west traffic is still accelerated; run `xbr attach {}` (or keep \
                     `xbr attach {} --follow` running) to apply this",
                    attachment.bridge, attachment.bridge
                );
            }
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
    for (attachment, view, _) in attachments {
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
            .map(|(attachment, _, _)| {
                let mut counts = serde_json::Map::new();
                counts.insert("bridge".to_owned(), json!(attachment.bridge));
                for (verdict, count) in &attachment.verdicts {
                    counts.insert(verdict.name().to_owned(), json!(count));
                }
                Value::Object(counts)
            })
            .collect();
        return print_json(&json!({ "endpoints": endpoints, "verdicts": verdicts }));
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
    for (attachment, _, _) in attachments {
        let verdicts: Vec<String> = attachment
            .verdicts
            .iter()
            .map(|(verdict, count)| format!("{}={count}", verdict.name()))
            .collect();
        println!("verdicts {}: {}", attachment.bridge, verdicts.join(" "));
    }
    Ok(())
}
