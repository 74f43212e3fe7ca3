//! Follow: after attach, stay and keep the bridge's pinned datapath in step with the kernel.
//! Every netlink event (links here and in the containers' namespaces, FDB changes) triggers
//! the same observe -> plan -> reconcile that attach runs; on a Docker bridge, so do Docker's
//! events and iptables changes, and each reconcile also syncs Docker's published ports. The
//! follower owns nothing the datapath needs: killing it leaves traffic flowing on the pins.

use std::{
    net::SocketAddr,
    sync::Arc,
    time::{Duration, Instant},
};

use futures::StreamExt as _;
use rtnetlink::{MulticastGroup, sys::AsyncSocket as _};
use tokio::signal::unix::{SignalKind, signal};
use tracing::{debug, info, warn};

use crate::{
    datapath::{Detached, Pinned},
    docker::{self, DockerBridge},
    error::{Error, Result},
    metrics::{FollowMetrics, serve_metrics},
    plan::Policy,
    policy,
    publish::Timeouts,
    reconcile::{self, Outcome},
};

/// Events closer together than this are handled by one reconcile.
const QUIET: Duration = Duration::from_millis(20);
/// ...but a storm of events does not postpone a reconcile longer than this.
const MAX_DELAY: Duration = Duration::from_millis(200);
/// How often the follower checks that its pins still exist (`xbr detach` removes them).
const PIN_CHECK: Duration = Duration::from_millis(250);

pub struct FollowOptions {
    pub metrics: Option<SocketAddr>,
    /// A full reconcile this often even without events: a safety net for missed events.
    pub resync: Duration,
    /// Mirror this Docker network: its published ports and what its firewall lets through.
    pub docker: Option<DockerBridge>,
}

/// Why the follower stopped.
#[derive(Debug)]
pub enum Stopped {
    /// SIGTERM or SIGINT: the datapath stays in place.
    Signal,
    /// `xbr detach` removed the pins.
    Detached,
    /// The bridge was deleted (or replaced); the follower removed what was left.
    BridgeDeleted(Detached),
}

pub fn follow(pinned: Pinned, options: FollowOptions) -> Result<Stopped> {
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(|e| Error::io("starting the follower's runtime", e))?;
    runtime.block_on(run(pinned, options))
}

async fn run(mut pinned: Pinned, options: FollowOptions) -> Result<Stopped> {
    let (mut connection, _, mut events) =
        rtnetlink::new_multicast_connection(&[MulticastGroup::Link, MulticastGroup::Neigh])
            .map_err(|e| Error::io("subscribing to netlink link and neighbour events", e))?;
    // Containers change their MACs in their own namespaces: hear those too.
    connection
        .socket_mut()
        .socket_mut()
        .set_listen_all_namespaces(true)
        .map_err(|e| Error::io("listening to all namespaces' netlink events", e))?;
    tokio::spawn(connection);

    let metrics = Arc::new(FollowMetrics::default());
    if let Some(address) = options.metrics {
        serve_metrics(
            address,
            pinned.root().to_owned(),
            pinned.bridge.clone(),
            metrics.clone(),
        )?;
        info!(%address, "serving Prometheus metrics at /metrics");
    }
    let mut ebpf_logs = if tracing::enabled!(target: "xbr::ebpf", tracing::Level::DEBUG) {
        pinned
            .program_id()
            .ok()
            .and_then(|id| aya_log::EbpfLogger::init_from_id(id).ok())
    } else {
        None
    };

    let mut terminate =
        signal(SignalKind::terminate()).map_err(|e| Error::io("handling SIGTERM", e))?;
    let mut interrupt =
        signal(SignalKind::interrupt()).map_err(|e| Error::io("handling SIGINT", e))?;
    let mut pin_check = tokio::time::interval(PIN_CHECK);
    let mut resync = tokio::time::interval(options.resync);
    resync.reset();
    let mut docker = match options.docker {
        Some(bridge) => Some(docker::Follow::start(bridge).await),
        None => None,
    };
    // The ruleset, read again after each change to it.
    let mut ruleset_changes = policy::RulesetChanges::open();
    let mut firewall = None;
    let mut policy_said = None;
    info!(bridge = %pinned.bridge, "following the bridge; Ctrl-C stops following and leaves the datapath in place");

    let mut dirty = true;
    loop {
        if dirty {
            // Let a burst of events (a container start is a dozen of them) settle.
            let first = Instant::now();
            while first.elapsed() < MAX_DELAY {
                match tokio::time::timeout(QUIET, events.next()).await {
                    Ok(Some(_)) => continue,
                    Ok(None) => {
                        return Err(Error::io(
                            "netlink events",
                            std::io::ErrorKind::UnexpectedEof.into(),
                        ));
                    }
                    Err(_) => break,
                }
            }
            dirty = false;
            if !pinned.dir.exists() {
                return Ok(Stopped::Detached);
            }
            let firewall = firewall.get_or_insert_with(policy::read).clone();
            let step = reconcile(
                &mut pinned,
                &metrics,
                firewall,
                docker.as_mut(),
                &mut policy_said,
            );
            if step.await? == Step::BridgeGone {
                // Deleting a bridge releases its ports with our programs still on them.
                return Ok(Stopped::BridgeDeleted(pinned.detach()?));
            }
        }
        tokio::select! {
            event = events.next() => match event {
                Some(_) => dirty = true,
                None => return Err(Error::io("netlink events", std::io::ErrorKind::UnexpectedEof.into())),
            },
            _ = terminate.recv() => return Ok(stop(&mut pinned, &docker)),
            _ = interrupt.recv() => return Ok(stop(&mut pinned, &docker)),
            _ = docker::changed(&mut docker) => dirty = true,
            _ = ruleset_changes.changed() => {
                debug!("the netfilter ruleset changed");
                firewall = None;
                dirty = true;
            }
            _ = pin_check.tick() => {
                if let Some(logs) = ebpf_logs.as_mut() {
                    logs.flush();
                }
                if !pinned.dir.exists() {
                    return Ok(Stopped::Detached);
                }
            }
            _ = resync.tick() => {
                let ended = pinned.expire_flows(&Timeouts::default());
                if ended > 0 {
                    info!(ended, "retired closed or idle NATed connections");
                }
                if let Some(docker) = docker.as_mut() {
                    docker.subscribe().await;
                }
                firewall = None;
                dirty = true;
            }
        }
    }
}

/// Stopping on a signal: Docker's published ports go back to Docker's path, since nothing
/// would keep them current; the rest of the datapath stays.
fn stop(pinned: &mut Pinned, docker: &Option<docker::Follow>) -> Stopped {
    if docker.is_some() {
        let withdrawn = pinned.withdraw_docker_published();
        info!(
            withdrawn,
            "Docker's published ports take Docker's path again (established connections stay)"
        );
    }
    Stopped::Signal
}

#[derive(Debug, PartialEq, Eq)]
enum Step {
    Continue,
    /// The bridge was deleted, or another bridge now has its name.
    BridgeGone,
}

/// One observe -> plan -> reconcile (and, with Docker, a sync of its published ports).
async fn reconcile(
    pinned: &mut Pinned,
    metrics: &FollowMetrics,
    firewall: std::result::Result<policy::Firewall, String>,
    docker: Option<&mut docker::Follow>,
    policy_said: &mut Option<String>,
) -> Result<Step> {
    let started = Instant::now();
    let docker = match docker {
        Some(docker) => Some(docker.observe().await),
        None => None,
    };
    let policy = Policy {
        firewall,
        icc_off: docker.as_ref().and_then(|d| d.icc_off()),
    };
    let inputs = reconcile::Inputs {
        policy: &policy,
        docker: docker.as_ref(),
        mirror_docker: true,
    };
    let pass = match reconcile::once(pinned, &inputs) {
        Ok(Outcome::Reconciled(pass)) => *pass,
        Ok(Outcome::BridgeGone) => return Ok(Step::BridgeGone),
        Err(error) => {
            metrics.error();
            warn!(%error, "observing the bridge failed; retrying on the next event");
            return Ok(Step::Continue);
        }
    };
    log_policy(&pass.plan, policy_said);
    match pass.changes {
        Ok(changes) => {
            metrics.reconciled(started.elapsed());
            if changes.is_empty() {
                debug!(took = ?started.elapsed(), "reconciled: no change");
            } else {
                info!(
                    took = ?started.elapsed(),
                    ports_added = ?changes.ports_added,
                    ports_removed = ?changes.ports_removed,
                    endpoints_added = changes.endpoints_added,
                    endpoints_removed = changes.endpoints_removed,
                    ports_skipped = ?changes.ports_skipped,
                    "reconciled"
                );
            }
        }
        Err(error) => {
            metrics.error();
            warn!(%error, "reconcile failed; retrying on the next event");
        }
    }
    match pass.docker {
        Some(Ok(synced)) if !synced.is_empty() => info!(
            added = ?synced.added.iter().map(ToString::to_string).collect::<Vec<_>>(),
            removed = ?synced.removed.iter().map(ToString::to_string).collect::<Vec<_>>(),
            "synced Docker's published ports"
        ),
        Some(Err(error)) => {
            metrics.error();
            warn!(%error, "syncing Docker's published ports failed; retrying on the next event");
        }
        _ => {}
    }
    Ok(Step::Continue)
}

/// Says what the policy holds back of east-west traffic, when that changed since it last
/// said (`said`).
fn log_policy(plan: &crate::plan::Plan, said: &mut Option<String>) {
    let east_west = &plan.east_west;
    let summary = format!("{:?} {:?}", east_west.off, east_west.held);
    if said.replace(summary.clone()).as_deref() == Some(summary.as_str()) {
        return;
    }
    match &east_west.off {
        Some(reason) => info!("east-west traffic takes the bridge: {reason}"),
        None if east_west.held.is_empty() => info!("east-west traffic is accelerated"),
        None => {
            for (packets, reason) in &east_west.held {
                info!("east-west {packets} takes the bridge: {reason}");
            }
        }
    }
}
