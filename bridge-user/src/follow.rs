//! Follow: after attach, stay and keep the bridge's pinned datapath in step with the kernel.
//! Every netlink event (links here and in the containers' namespaces, FDB changes, a tc
//! filter or qdisc of ours deleted) triggers the same observe -> plan -> reconcile that attach
//! runs; on a Docker bridge, so do Docker's events and iptables changes, and each reconcile
//! also syncs Docker's published ports. The follower owns nothing the datapath needs: killing
//! it leaves traffic flowing on the pins.
//!
//! Many writers, one truth: each reconcile holds the attachment's writer lock (`lock`); one
//! follower per bridge holds the follower lock, and a second one stands by until the first
//! stops. What no event reports is found by looking: every second the tcx (and XDP) links of
//! every hooked port are checked, and every `--resync` seconds (30 by default, 60 at most) a
//! full reconcile runs anyway. A reconcile that fails is retried with backoff.

use std::{
    collections::{BTreeMap, BTreeSet},
    net::SocketAddr,
    sync::Arc,
    time::{Duration, Instant},
};

use futures::StreamExt as _;
use rtnetlink::{
    MulticastGroup,
    packet_core::{NetlinkMessage, NetlinkPayload},
    packet_route::RouteNetlinkMessage,
    sys::AsyncSocket as _,
};
use tokio::signal::unix::{SignalKind, signal};
use tracing::{debug, info, warn};

use crate::{
    datapath::{Detached, Pinned},
    docker::{self, DockerBridge},
    error::{Error, Result},
    lock::{self, Attempt},
    metrics::{FollowMetrics, SharedMetrics, Watched, serve_metrics},
    plan::Policy,
    policy,
    publish::Timeouts,
    reconcile::{self, Outcome},
};

/// Events closer together than this are handled by one reconcile.
const QUIET: Duration = Duration::from_millis(20);
/// ...but a storm of events does not postpone a reconcile longer than this.
const MAX_DELAY: Duration = Duration::from_millis(200);
/// How often the follower checks that its pins still exist (`xbr detach` removes them), and
/// a standby follower whether it can take over.
const PIN_CHECK: Duration = Duration::from_millis(250);
/// How often the hooks no event reports gone (tcx and XDP links) are checked.
pub const HOOK_CHECK: Duration = Duration::from_secs(1);
/// A failed reconcile is retried after this, doubling up to `MAX_BACKOFF`.
const FIRST_BACKOFF: Duration = Duration::from_millis(100);
const MAX_BACKOFF: Duration = Duration::from_secs(5);
/// How often a follower waiting for another writer tries the lock again.
const LOCK_POLL: Duration = Duration::from_millis(20);

pub struct FollowOptions {
    pub metrics: Option<SocketAddr>,
    /// A full reconcile this often even without events: a safety net for missed events.
    pub resync: Duration,
    /// Mirror this Docker network: its published ports and what its firewall lets through.
    pub docker: Option<DockerBridge>,
    /// After waiting this long for another writer, say who holds the bridge (and wait on).
    pub wait: Duration,
    /// Becomes true when whoever started the follower wants it to stop (as on a signal).
    pub stop: Option<tokio::sync::watch::Receiver<bool>>,
    /// Container MACs kept off the fast path (`Policy::held_endpoints`).
    pub held_endpoints: BTreeMap<[u8; 6], String>,
    /// A metrics server shared with other followers, and how this attachment is listed there.
    pub shared_metrics: Option<(SharedMetrics, Watched)>,
}

/// Why the follower stopped.
#[derive(Debug)]
pub enum Stopped {
    /// SIGTERM or SIGINT (or `FollowOptions::stop`): the datapath stays in place.
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
    let mut terminate =
        signal(SignalKind::terminate()).map_err(|e| Error::io("handling SIGTERM", e))?;
    let mut interrupt =
        signal(SignalKind::interrupt()).map_err(|e| Error::io("handling SIGINT", e))?;
    let mut stop_asked = options.stop.clone();
    // One follower per bridge: a second one waits here until the first stops.
    let _following =
        match stand_by(&pinned, &mut terminate, &mut interrupt, &mut stop_asked).await? {
            Ok(following) => following,
            Err(stopped) => return Ok(stopped),
        };

    let (mut connection, _, mut events) = rtnetlink::new_multicast_connection(&[
        MulticastGroup::Link,
        MulticastGroup::Neigh,
        MulticastGroup::Tc,
        // Containers' addresses: endpoints carry them while rules are honoured.
        MulticastGroup::Ipv4Ifaddr,
    ])
    .map_err(|e| Error::io("subscribing to netlink link, neighbour and tc events", e))?;
    // Containers change their MACs in their own namespaces: hear those too.
    connection
        .socket_mut()
        .socket_mut()
        .set_listen_all_namespaces(true)
        .map_err(|e| Error::io("listening to all namespaces' netlink events", e))?;
    tokio::spawn(connection);

    let metrics = match &options.shared_metrics {
        Some((shared, _)) => shared.metrics.clone(),
        None => Arc::new(FollowMetrics::default()),
    };
    let _listed = options
        .shared_metrics
        .as_ref()
        .map(|(shared, watched)| shared.list(watched.clone()));
    if let Some(address) = options.metrics {
        let watched = Watched {
            labels: vec![("bridge".to_owned(), pinned.bridge.clone())],
            root: pinned.root().to_owned(),
            bridge: pinned.bridge.clone(),
            netns: None,
        };
        serve_metrics(
            address,
            Arc::new(std::sync::Mutex::new(vec![watched])),
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

    let mut pin_check = tokio::time::interval(PIN_CHECK);
    let mut hook_check = tokio::time::interval(HOOK_CHECK);
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
    let mut expire_due = false;
    // When to try again: after a failure (backoff) or while another writer holds the lock.
    let mut retry_at: Option<tokio::time::Instant> = None;
    let mut backoff = FIRST_BACKOFF;
    let mut waiting_since: Option<Instant> = None;
    loop {
        if dirty && retry_at.is_none_or(|at| tokio::time::Instant::now() >= at) {
            retry_at = None;
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
            let writer = match lock::Writer::try_acquire(pinned.root(), &pinned.dir)? {
                Attempt::Acquired(writer) => writer,
                Attempt::Gone => return Ok(Stopped::Detached),
                Attempt::Busy => {
                    // Another writer (an attach, a publish, ...): wait without blocking events.
                    let since = *waiting_since.get_or_insert_with(Instant::now);
                    if since.elapsed() >= options.wait {
                        let holder = lock::writer(&pinned.dir)
                            .map(|h| h.to_string())
                            .unwrap_or_else(|| "another process".to_owned());
                        warn!(
                            %holder,
                            waited = ?since.elapsed(),
                            "the bridge is held by another writer; still waiting to reconcile"
                        );
                        waiting_since = Some(Instant::now());
                    }
                    retry_at = Some(tokio::time::Instant::now() + LOCK_POLL);
                    continue;
                }
            };
            waiting_since = None;
            if !pinned.still_pinned() {
                return Ok(Stopped::Detached);
            }
            if std::mem::take(&mut expire_due) {
                let ended = pinned.expire_flows(&Timeouts::default());
                if ended > 0 {
                    info!(ended, "retired closed or idle NATed connections");
                }
            }
            let firewall_now = firewall.get_or_insert_with(policy::read).clone();
            let step = reconcile(
                &mut pinned,
                &metrics,
                firewall_now,
                &options.held_endpoints,
                docker.as_mut(),
                &mut policy_said,
            );
            match step.await? {
                Step::Done => {
                    dirty = false;
                    backoff = FIRST_BACKOFF;
                }
                Step::Failed => {
                    metrics.retry();
                    info!(retry_in = ?backoff, "retrying the reconcile");
                    retry_at = Some(tokio::time::Instant::now() + backoff);
                    backoff = (backoff * 2).min(MAX_BACKOFF);
                }
                Step::BridgeGone => {
                    // Deleting a bridge releases its ports with our programs still on them.
                    return Ok(Stopped::BridgeDeleted(pinned.detach()?));
                }
            }
            drop(writer);
        }
        let retry = async {
            match retry_at {
                Some(at) => tokio::time::sleep_until(at).await,
                None => std::future::pending().await,
            }
        };
        tokio::select! {
            event = events.next() => match event {
                Some((message, _)) => dirty |= worth_a_reconcile(&message, || pinned.hooked_ifindexes()),
                None => return Err(Error::io("netlink events", std::io::ErrorKind::UnexpectedEof.into())),
            },
            _ = terminate.recv() => return Ok(stop(&mut pinned, &docker, options.wait)),
            _ = interrupt.recv() => return Ok(stop(&mut pinned, &docker, options.wait)),
            _ = asked_to_stop(&mut stop_asked) => return Ok(stop(&mut pinned, &docker, options.wait)),
            _ = docker::changed(&mut docker) => dirty = true,
            _ = ruleset_changes.changed() => {
                debug!("the netfilter ruleset changed");
                firewall = None;
                dirty = true;
            }
            _ = retry => {}
            _ = pin_check.tick() => {
                if let Some(logs) = ebpf_logs.as_mut() {
                    logs.flush();
                }
                if !pinned.still_pinned() {
                    return Ok(Stopped::Detached);
                }
            }
            _ = hook_check.tick() => {
                match pinned.silent_hooks_intact() {
                    Ok(true) => {}
                    Ok(false) => {
                        info!("a hook was removed outside xbr; repairing");
                        dirty = true;
                    }
                    Err(error) => debug!(%error, "checking the hooks failed"),
                }
            }
            _ = resync.tick() => {
                expire_due = true;
                if let Some(docker) = docker.as_mut() {
                    docker.subscribe().await;
                }
                firewall = None;
                dirty = true;
            }
        }
    }
}

/// Takes the follower lock, or stands by until the follower that holds it stops (then takes
/// over), the attachment is detached, or a signal comes.
async fn stand_by(
    pinned: &Pinned,
    terminate: &mut tokio::signal::unix::Signal,
    interrupt: &mut tokio::signal::unix::Signal,
    stop: &mut Option<tokio::sync::watch::Receiver<bool>>,
) -> Result<std::result::Result<lock::Following, Stopped>> {
    let mut standing_by = false;
    let mut check = tokio::time::interval(PIN_CHECK);
    loop {
        if !pinned.still_pinned() {
            return Ok(Err(Stopped::Detached));
        }
        match lock::Following::try_acquire(&pinned.dir)? {
            Attempt::Acquired(following) => {
                if standing_by {
                    eprintln!("xbr: taking over following {}", pinned.bridge);
                }
                return Ok(Ok(following));
            }
            Attempt::Gone => return Ok(Err(Stopped::Detached)),
            Attempt::Busy if !standing_by => {
                standing_by = true;
                let holder = lock::follower(&pinned.dir)
                    .map(|h| h.to_string())
                    .unwrap_or_else(|| "another process".to_owned());
                eprintln!(
                    "xbr: {} is followed already by {holder}; standing by to take over when it stops",
                    pinned.bridge
                );
            }
            Attempt::Busy => {}
        }
        tokio::select! {
            _ = check.tick() => {}
            _ = terminate.recv() => return Ok(Err(Stopped::Signal)),
            _ = interrupt.recv() => return Ok(Err(Stopped::Signal)),
            _ = asked_to_stop(stop) => return Ok(Err(Stopped::Signal)),
        }
    }
}

/// Returns once `stop` says true; never without a `stop` (or once its sender is gone).
async fn asked_to_stop(stop: &mut Option<tokio::sync::watch::Receiver<bool>>) {
    match stop {
        Some(receiver) => {
            if receiver.wait_for(|stop| *stop).await.is_err() {
                std::future::pending::<()>().await;
            }
        }
        None => std::future::pending().await,
    }
}

/// Whether a netlink event may change what the datapath should hold. Tc events (from every
/// namespace) count only when they delete a filter or qdisc on a port xbr hooked: that is a
/// hook removed behind xbr's back (or its own doing, which costs one empty reconcile).
fn worth_a_reconcile(
    message: &NetlinkMessage<RouteNetlinkMessage>,
    hooked: impl FnOnce() -> BTreeSet<u32>,
) -> bool {
    let NetlinkPayload::InnerMessage(message) = &message.payload else {
        return true;
    };
    match message {
        RouteNetlinkMessage::DelTrafficFilter(tc) | RouteNetlinkMessage::DelQueueDiscipline(tc) => {
            u32::try_from(tc.header.index).is_ok_and(|ifindex| hooked().contains(&ifindex))
        }
        RouteNetlinkMessage::NewTrafficFilter(_)
        | RouteNetlinkMessage::NewQueueDiscipline(_)
        | RouteNetlinkMessage::NewTrafficClass(_)
        | RouteNetlinkMessage::DelTrafficClass(_)
        | RouteNetlinkMessage::NewTrafficChain(_)
        | RouteNetlinkMessage::DelTrafficChain(_) => false,
        _ => true,
    }
}

/// Stopping on a signal: Docker's published ports go back to Docker's path, since nothing
/// would keep them current; the rest of the datapath stays.
fn stop(pinned: &mut Pinned, docker: &Option<docker::Follow>, wait: Duration) -> Stopped {
    if docker.is_some() {
        // A writer like any other, but one that does not hold up a shutdown for long.
        match lock::Writer::acquire(pinned.root(), &pinned.bridge, false, wait.min(STOP_WAIT)) {
            Ok(_writer) if pinned.still_pinned() => {
                let withdrawn = pinned.withdraw_docker_published();
                info!(
                    withdrawn,
                    "Docker's published ports take Docker's path again (established connections stay)"
                );
            }
            Ok(_) => {}
            Err(error) => warn!(%error, "left Docker's published ports in the datapath"),
        }
    }
    Stopped::Signal
}

/// How long a follower stopping on a signal waits for another writer.
const STOP_WAIT: Duration = Duration::from_secs(5);

#[derive(Debug, PartialEq, Eq)]
enum Step {
    Done,
    /// Something failed (and was logged): try again after a backoff.
    Failed,
    /// The bridge was deleted, or another bridge now has its name.
    BridgeGone,
}

/// One observe -> plan -> reconcile (and, with Docker, a sync of its published ports).
async fn reconcile(
    pinned: &mut Pinned,
    metrics: &FollowMetrics,
    firewall: std::result::Result<policy::Firewall, policy::ReadError>,
    held_endpoints: &BTreeMap<[u8; 6], String>,
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
        held_endpoints: held_endpoints.clone(),
    };
    let inputs = reconcile::Inputs {
        policy: &policy,
        docker: docker.as_ref(),
        mirror_docker: true,
        leaving: &[],
    };
    let pass = match reconcile::once(pinned, &inputs) {
        Ok(Outcome::Reconciled(pass)) => *pass,
        Ok(Outcome::BridgeGone) => return Ok(Step::BridgeGone),
        Err(error) => {
            metrics.error();
            warn!(%error, "observing the bridge failed");
            return Ok(Step::Failed);
        }
    };
    log_policy(&pass.plan, policy_said);
    let mut step = Step::Done;
    match &pass.egress {
        Ok((egress, applied)) if applied.turned_on || applied.turned_off => info!(
            egress = %egress,
            flows_ended = applied.flows_ended,
            "egress changed path"
        ),
        Ok(_) => {}
        Err(error) => {
            metrics.error();
            warn!(%error, "deciding egress failed");
            step = Step::Failed;
        }
    }
    match pass.changes {
        Ok(changes) => {
            metrics.reconciled(started.elapsed());
            for (port, drift) in &changes.repaired {
                metrics.repaired(*drift);
                info!(port, problem = drift.describe(), "repaired");
            }
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
                    repaired = changes.repaired.len(),
                    leftovers_removed = changes.leftovers_removed,
                    "reconciled"
                );
            }
        }
        Err(error) => {
            metrics.error();
            warn!(%error, "reconcile failed");
            step = Step::Failed;
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
            warn!(%error, "syncing Docker's published ports failed");
            step = Step::Failed;
        }
        _ => {}
    }
    Ok(step)
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
