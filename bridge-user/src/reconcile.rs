//! One reconcile: observe the bridge, plan under a policy, bring the pins to the plan and sync
//! Docker's published ports. `xbr attach` runs it once, the follower on every event; both call
//! the functions here, so the two can never drift apart.

use std::path::Path;

use crate::{
    datapath::{self, Attached, Changes, EgressApplied, ModeChoice, Pinned, UplinkModeChoice},
    docker::{self, DockerState},
    egress::{self, Egress},
    error::{Error, Result},
    features::Features,
    netlink,
    observe::{self, Detail},
    plan::{self, Plan, Policy},
    publish::Synced,
};

/// What a reconcile takes besides the kernel's state.
#[derive(Clone, Copy)]
pub struct Inputs<'a> {
    /// The traffic classes the kernel path's own rules keep off the fast path.
    pub policy: &'a Policy,
    /// Docker's view of the bridge, where a Docker network owns it.
    pub docker: Option<&'a DockerState>,
    /// Mirror Docker's published ports: only while a follower keeps them current.
    pub mirror_docker: bool,
    /// Ports (ifindexes) whose container is being removed (a CNI DEL runs before the
    /// `bridge` plugin deletes the veth): planned as gone although still on the bridge.
    pub leaving: &'a [u32],
}

/// How much to read about the containers: their addresses only when published ports (ours or
/// Docker's) have to find them, egress checks them, or rules are to be honoured.
fn detail(pinned: Option<&Pinned>, masquerade: bool, inputs: &Inputs) -> Detail {
    // Rules are decided for containers that use their own addresses, which the datapath
    // checks: it needs them too.
    if pinned.is_some_and(|p| p.has_published() || p.masquerade_requested())
        || masquerade
        || inputs.docker.is_some()
        || inputs.policy.has_rules()
    {
        Detail::Addresses
    } else {
        Detail::Macs
    }
}

/// Observe `bridge` and plan what its datapath should hold.
pub fn observe_and_plan(bridge: &str, pinned: Option<&Pinned>, inputs: &Inputs) -> Result<Plan> {
    observe_and_plan_with(bridge, pinned, false, inputs)
}

/// `observe_and_plan`, reading the containers' addresses also when `masquerade` (an attach
/// that turns egress on: its ports' records want them).
fn observe_and_plan_with(
    bridge: &str,
    pinned: Option<&Pinned>,
    masquerade: bool,
    inputs: &Inputs,
) -> Result<Plan> {
    let detail = detail(pinned, masquerade, inputs);
    let name = bridge.to_owned();
    let mut view =
        netlink::run(|handle| async move { observe::bridge(&handle, &name, detail).await })
            .map_err(|e| Error::io("opening a netlink socket", e))??;
    view.ports
        .retain(|port| !inputs.leaving.contains(&port.ifindex));
    plan::plan_with(&view, inputs.policy)
}

/// What one pass of an attached bridge did.
pub struct Pass {
    pub plan: Plan,
    /// The pins brought to the plan (or why not).
    pub changes: Result<Changes>,
    /// Egress NAT decided and applied (or why it could not be).
    pub egress: Result<(Egress, EgressApplied)>,
    /// Docker's published ports synced (where Docker owns the bridge), or why not.
    pub docker: Option<Result<Synced>>,
}

pub enum Outcome {
    Reconciled(Box<Pass>),
    /// The bridge was deleted, or another bridge now has its name.
    BridgeGone,
}

/// One pass over an attached bridge: observe, plan, apply, sync Docker. A port that vanished
/// meanwhile is skipped, not an error.
pub fn once(pinned: &mut Pinned, inputs: &Inputs) -> Result<Outcome> {
    let plan = match observe_and_plan(&pinned.bridge.clone(), Some(pinned), inputs) {
        Ok(plan) if plan.bridge_ifindex == pinned.record.ifindex => plan,
        Ok(_) | Err(Error::BridgeNotFound(_)) | Err(Error::NotABridge { .. }) => {
            return Ok(Outcome::BridgeGone);
        }
        Err(error) => return Err(error),
    };
    let changes = pinned.reconcile(&plan, false);
    let changes = changes.and_then(|changes| {
        sync_sockets(pinned)?;
        Ok(changes)
    });
    let docker = inputs
        .docker
        .map(|state| docker::apply(pinned, state, &plan, inputs.mirror_docker));
    // After Docker's sync, so that ports it just published are decided too; whatever the
    // rest of the pass did, or they would stay held until the next one.
    let published = pinned.apply_published_policy(&plan);
    let changes = changes.and_then(|mut changes| {
        changes.connections_held = published?.connections_ended;
        Ok(changes)
    });
    let egress = sync_egress(pinned, &plan, inputs);
    Ok(Outcome::Reconciled(Box::new(Pass {
        plan,
        changes,
        egress,
        docker,
    })))
}

/// How `xbr attach` wants the bridge hooked.
pub struct AttachOptions<'a> {
    /// Uplinks named on the command line; none: keep those hooked, or on a first attach, the
    /// interfaces of this namespace's default routes (when `default_uplinks`).
    pub uplinks: Vec<String>,
    /// Whether a first attach without named uplinks takes the default routes' interfaces.
    pub default_uplinks: bool,
    pub mode: ModeChoice,
    pub uplink_mode: UplinkModeChoice,
    /// `--max-flows`: the NAT tables' size on a first attach (checked on a later one).
    pub max_flows: Option<u32>,
    /// Whether and where to hook the socket programs (on a first attach; checked on a later
    /// one).
    pub socket_hooks: &'a datapath::SocketHooksChoice,
    /// `--masquerade`: source-NAT the containers' outbound flows in the datapath (recorded;
    /// a later attach without it keeps it).
    pub masquerade: bool,
    pub features: &'a Features,
    pub root: &'a Path,
}

/// What `xbr attach` did.
pub struct Attach {
    pub plan: Plan,
    pub attached: Attached,
    pub egress: Egress,
    pub docker: Option<Synced>,
}

/// `xbr attach`: creates the pinned datapath or picks up the one pinned, and reconciles it.
pub fn attach(bridge: &str, options: AttachOptions, inputs: &Inputs) -> Result<Attach> {
    // Pins that are there but unusable (`BrokenPins`, another layout) are the user's to see
    // now, not after observing the bridge as if it were a first attach.
    let mut replacing = false;
    let existing = match Pinned::open(options.root, bridge) {
        Ok(pinned) => Some(pinned),
        Err(Error::NotAttached { .. } | Error::Incomplete { .. }) => None,
        // Another layout (an upgrade): `datapath::attach` replaces it, planned as a first
        // attach; what can still be read of it (its published ports) is planned with.
        Err(Error::OtherLayout { .. }) => {
            replacing = true;
            Pinned::open_any_layout(options.root, bridge).ok()
        }
        Err(error) => return Err(error),
    };
    let first_attach = existing.is_none() || replacing;
    let plan = observe_and_plan_with(bridge, existing.as_ref(), options.masquerade, inputs)?;
    drop(existing);
    let requested = options.uplinks;
    let default_uplinks = options.default_uplinks;
    let uplinks = netlink::run(|handle| async move {
        let names = if requested.is_empty() && first_attach && default_uplinks {
            observe::default_route_interfaces(&handle).await?
        } else {
            requested
        };
        observe::uplinks(&handle, &names).await
    })
    .map_err(|e| Error::io("opening a netlink socket", e))??;
    let attached = datapath::attach(
        &plan,
        &uplinks,
        &datapath::Choices {
            mode: options.mode,
            uplink_mode: options.uplink_mode,
            max_flows: options.max_flows,
            socket_hooks: options.socket_hooks,
        },
        options.features,
        options.root,
    )?;
    let mut pinned = Pinned::open(options.root, &plan.bridge)?;
    sync_sockets(&mut pinned)?;
    let docker = match inputs.docker {
        Some(state) => Some(docker::apply(
            &mut pinned,
            state,
            &plan,
            inputs.mirror_docker,
        )?),
        None => None,
    };
    // The uplinks are hooked now: published ports can be decided.
    pinned.apply_published_policy(&plan)?;
    if options.masquerade {
        pinned.request_masquerade()?;
    }
    let (egress, _) = sync_egress(&mut pinned, &plan, inputs)?;
    Ok(Attach {
        plan,
        attached,
        egress,
        docker,
    })
}

/// Who asked for egress NAT on the bridge: `--masquerade`, or the Docker network that owns
/// it.
pub fn egress_requested(by_user: bool, docker: Option<&DockerState>) -> egress::Requested {
    if by_user {
        return egress::Requested::ByUser;
    }
    match docker {
        Some(state) => egress::Requested::ByDocker {
            network: state.network.name.clone(),
            masquerade: state.network.masquerade,
            internal: state.network.internal,
        },
        None => egress::Requested::No,
    }
}

/// What egress NAT would be for the bridge now (observed, nothing changed): `by_user` whether
/// `--masquerade` asked for it, `uplink_ifindexes` the uplinks xbr hooked.
pub fn egress_now(
    by_user: bool,
    uplink_ifindexes: Vec<u32>,
    plan: &Plan,
    inputs: &Inputs,
) -> Result<Egress> {
    let requested = egress_requested(by_user, inputs.docker);
    if requested == egress::Requested::No {
        return Ok(egress::decide(&egress::Facts {
            requested,
            bridge_ifindex: plan.bridge_ifindex,
            subnets: Vec::new(),
            bridge_mtu: 0,
            uplinks: Vec::new(),
            local_ports: (0, 0),
            held_by: None,
        }));
    }
    let bridge_ifindex = plan.bridge_ifindex;
    let (subnets, bridge_mtu, uplinks) = netlink::run(|handle| async move {
        let names = observe::link_names(&handle).await?;
        let views: Vec<observe::UplinkView> = uplink_ifindexes
            .iter()
            .filter_map(|ifindex| {
                names.get(ifindex).map(|name| observe::UplinkView {
                    name: name.clone(),
                    ifindex: *ifindex,
                })
            })
            .collect();
        egress::observe_links(&handle, bridge_ifindex, &views).await
    })
    .map_err(|e| Error::io("opening a netlink socket", e))??;
    let held_by = egress_held_by(inputs.policy, plan, &subnets, &uplinks);
    Ok(egress::decide(&egress::Facts {
        requested,
        bridge_ifindex,
        subnets,
        bridge_mtu,
        uplinks,
        local_ports: egress::local_ports()?,
        held_by,
    }))
}

/// The rule on the kernel path that could change the egress class's fate, if any.
fn egress_held_by(
    policy: &Policy,
    plan: &Plan,
    subnets: &[(std::net::Ipv4Addr, u8)],
    uplinks: &[egress::Uplink],
) -> Option<String> {
    let ports: Vec<String> = plan.ports.iter().map(|port| port.name.clone()).collect();
    let uplink_names: Vec<String> = uplinks.iter().map(|uplink| uplink.name.clone()).collect();
    let uplink_addresses: Vec<std::net::Ipv4Addr> =
        uplinks.iter().filter_map(|uplink| uplink.address).collect();
    plan::egress(
        policy,
        &crate::policy::Egress {
            bridge: &plan.bridge,
            ports: &ports,
            subnets,
            uplinks: &uplink_names,
            uplink_addresses: &uplink_addresses,
        },
    )
}

/// Decides egress NAT now and brings the datapath to it, with the kernel's flows read from
/// conntrack: before the switch (flows that live there stay there), and once more after it
/// (flows that began meanwhile).
fn sync_egress(
    pinned: &mut Pinned,
    plan: &Plan,
    inputs: &Inputs,
) -> Result<(Egress, EgressApplied)> {
    let egress = egress_now(
        pinned.masquerade_requested(),
        pinned.uplink_ifindexes(),
        plan,
        inputs,
    )?;
    let read_kernel_flows = |egress: &Egress| -> Result<_> {
        if !egress.is_accelerated() {
            return Ok(Default::default());
        }
        let connections = crate::conntrack::ipv4_connections()
            .map_err(|e| Error::io("reading the kernel's connection tracking table", e))?;
        Ok(egress::kernel_flows(&connections, egress))
    };
    let mut applied = pinned.apply_egress(&egress, &read_kernel_flows(&egress)?)?;
    if applied.turned_on {
        applied.kernel_flows_added += pinned.add_kernel_flows(&read_kernel_flows(&egress)?)?;
    }
    Ok((egress, applied))
}

/// The socket hooks' part of a pass: the host's addresses written for them, and hooks that
/// were detached behind xbr's back put back.
fn sync_sockets(pinned: &mut Pinned) -> Result<()> {
    if !pinned.has_socket_hooks() {
        return Ok(());
    }
    let addresses =
        netlink::run(|handle| async move { observe::local_ipv4_addresses(&handle).await })
            .map_err(|e| Error::io("opening a netlink socket", e))??;
    pinned.sync_local_addresses(&addresses)?;
    let restored = pinned.restore_socket_hooks()?;
    if restored > 0 {
        tracing::warn!(
            "{}: {restored} socket hook(s) had been detached outside xbr; attached them again",
            pinned.bridge
        );
    }
    Ok(())
}
