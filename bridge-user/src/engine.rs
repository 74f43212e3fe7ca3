//! Follow a whole Docker engine (`xbr follow`): one follower per network xbr can accelerate,
//! present and future, each on a thread of its own. A bridge network is followed in the
//! daemon's namespace, an overlay network in its own namespace (its thread enters it for
//! good). Docker's network and container events start followers for new networks; a network
//! that left this host (an overlay whose last local container stopped: Docker unmounts its
//! namespace) gets its follower stopped and its datapath removed, so that xbr never keeps a
//! dead namespace alive.

use std::{
    collections::BTreeMap,
    path::PathBuf,
    sync::{
        Arc,
        atomic::{AtomicBool, Ordering},
    },
    thread::JoinHandle,
    time::Duration,
};

use futures::StreamExt as _;
use tokio::{
    signal::unix::{SignalKind, signal},
    sync::watch,
};
use tracing::{debug, info, warn};

use crate::{
    datapath::{self, ModeChoice, Pinned, SocketHooksChoice, UplinkModeChoice},
    docker::{self, Client, DockerChoice, networks::Placed},
    error::{Error, Result},
    features::Features,
    follow::{self, FollowOptions, Stopped},
    lock,
    metrics::{SharedMetrics, Watched, serve_metrics},
    netns, plan, policy, reconcile,
};

/// Docker's events come in bursts (a container start is several): one scan after the burst.
const QUIET: Duration = Duration::from_millis(100);
/// How often the followed overlay namespaces are checked to still be Docker's.
const NAMESPACE_CHECK: Duration = Duration::from_secs(1);

pub struct EngineOptions {
    /// Docker's unix socket.
    pub socket: PathBuf,
    pub root: PathBuf,
    pub features: Features,
    /// Socket programs for bridge networks (an overlay namespace never has host clients).
    pub socket_hooks: SocketHooksChoice,
    /// Serve every followed network's metrics here.
    pub metrics: Option<std::net::SocketAddr>,
    /// Each follower's full reconcile period, and the engine's own rescan of the networks.
    pub resync: Duration,
    pub wait: Duration,
}

/// A network being followed: the thread that follows it and how to stop it.
struct Running {
    placed: Placed,
    /// The namespace's inode when the follower started (overlay networks): a namespace file
    /// with another inode is a new namespace, and this follower's is gone.
    inode: Option<u64>,
    stop: watch::Sender<bool>,
    /// Set before `stop`: the network left this host, so its datapath goes too.
    remove: Arc<AtomicBool>,
    /// Says whether the follower ended without an error.
    thread: JoinHandle<bool>,
}

impl Running {
    fn namespace_is_gone(&self) -> bool {
        match (&self.placed.netns, self.inode) {
            (Some(path), Some(inode)) => !netns::path_is(path, inode),
            _ => false,
        }
    }

    fn stop(&self, remove: bool) {
        self.remove.store(remove, Ordering::SeqCst);
        let _ = self.stop.send(true);
    }
}

/// Where a network is followed: its namespace (none: the daemon's) and bridge.
type Key = (Option<PathBuf>, String);

fn key(placed: &Placed) -> Key {
    (placed.netns.clone(), placed.bridge.clone())
}

/// Follows every network of the Docker engine at `options.socket` until SIGTERM or SIGINT;
/// the datapaths stay in place after that, as with `xbr attach --follow`.
pub fn follow_engine(options: EngineOptions) -> Result<()> {
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(|e| Error::io("starting the engine follower's runtime", e))?;
    runtime.block_on(run(Arc::new(options)))
}

async fn run(options: Arc<EngineOptions>) -> Result<()> {
    let shared_metrics = SharedMetrics::default();
    if let Some(address) = options.metrics {
        serve_metrics(
            address,
            shared_metrics.watched.clone(),
            shared_metrics.metrics.clone(),
        )?;
        info!(%address, "serving Prometheus metrics of every followed network at /metrics");
    }
    let mut terminate =
        signal(SignalKind::terminate()).map_err(|e| Error::io("handling SIGTERM", e))?;
    let mut interrupt =
        signal(SignalKind::interrupt()).map_err(|e| Error::io("handling SIGINT", e))?;
    let mut client = Client::connect(&options.socket).await?;
    let mut events = client.engine_events();
    eprintln!(
        "xbr: following every network of the Docker engine at {}",
        options.socket.display()
    );
    let mut running: BTreeMap<Key, Running> = BTreeMap::new();
    // What was last said about each network left to Docker, so it is said once.
    let mut left_to_docker: BTreeMap<String, String> = BTreeMap::new();
    // Followers that failed, and when: started again only after a resync period, so that a
    // network xbr cannot attach to is not retried (and reported) every second.
    let mut failed: BTreeMap<Key, std::time::Instant> = BTreeMap::new();
    let mut resync = tokio::time::interval(options.resync);
    let mut namespace_check = tokio::time::interval(NAMESPACE_CHECK);
    let mut dirty = true;
    loop {
        if dirty {
            // Let a burst of events settle.
            while let Ok(Some(_)) = tokio::time::timeout(QUIET, events.next()).await {}
            dirty = false;
            match client.all_placed().await {
                Ok(placed) => {
                    failed.retain(|_, at| at.elapsed() < options.resync);
                    scan(
                        &options,
                        &shared_metrics,
                        placed,
                        &mut running,
                        &failed,
                        &mut left_to_docker,
                    );
                }
                Err(error) => {
                    warn!(%error, "listing Docker's networks failed; retrying at the next resync");
                }
            }
        }
        tokio::select! {
            event = events.next() => match event {
                Some(Ok(event)) => {
                    debug!(action = ?event.action, kind = ?event.typ, "Docker event");
                    dirty = true;
                }
                Some(Err(_)) | None => {
                    warn!("Docker's event stream ended (dockerd restarting?); reconnecting at the next resync");
                    let silent: docker::Events = Box::pin(futures::stream::pending());
                    events = silent;
                }
            },
            _ = resync.tick() => {
                if let Ok(again) = Client::connect(&options.socket).await {
                    events = again.engine_events();
                    client = again;
                }
                dirty = true;
            }
            _ = namespace_check.tick() => {
                for follower in running.values().filter(|f| f.namespace_is_gone()) {
                    info!(network = %follower.placed.name, "the network's namespace is gone; removing its datapath");
                    follower.stop(true);
                }
                for (key, ended_well) in reap(&mut running) {
                    if !ended_well {
                        failed.insert(key, std::time::Instant::now());
                    }
                    dirty = true;
                }
            }
            _ = terminate.recv() => break,
            _ = interrupt.recv() => break,
        }
    }
    // Each follower hears the signal too; make sure, then wait for them.
    for follower in running.values() {
        follower.stop(false);
    }
    for (_, follower) in running {
        let _ = follower.thread.join();
    }
    eprintln!("xbr: stopped following the Docker engine; the datapaths stay attached");
    Ok(())
}

/// Starts a follower for every network that has none, stops those of networks that are gone.
fn scan(
    options: &Arc<EngineOptions>,
    shared_metrics: &SharedMetrics,
    placed: Vec<(String, std::result::Result<Placed, String>)>,
    running: &mut BTreeMap<Key, Running>,
    failed: &BTreeMap<Key, std::time::Instant>,
    left_to_docker: &mut BTreeMap<String, String>,
) {
    let mut wanted = BTreeMap::new();
    for (name, placed) in placed {
        match placed {
            Ok(placed) => {
                left_to_docker.remove(&name);
                wanted.insert(key(&placed), placed);
            }
            Err(why) => {
                if left_to_docker.get(&name) != Some(&why) {
                    eprintln!("xbr: Docker network {name} stays on Docker's path: {why}");
                    left_to_docker.insert(name, why);
                }
            }
        }
    }
    for (key, follower) in running.iter() {
        if !wanted.contains_key(key) {
            info!(network = %follower.placed.name, "the network is gone from this host; stopping its follower");
            follower.stop(follower.namespace_is_gone());
        }
    }
    for (key, placed) in wanted {
        if running.contains_key(&key) || failed.contains_key(&key) {
            continue;
        }
        match start(options, shared_metrics, placed) {
            Ok(follower) => {
                running.insert(key, follower);
            }
            Err(error) => warn!(%error, "cannot start a follower"),
        }
    }
}

/// Joins the followers that ended: each one's key and whether it ended without an error
/// (their networks are looked at again).
fn reap(running: &mut BTreeMap<Key, Running>) -> Vec<(Key, bool)> {
    let ended: Vec<Key> = running
        .iter()
        .filter(|(_, follower)| follower.thread.is_finished())
        .map(|(key, _)| key.clone())
        .collect();
    ended
        .into_iter()
        .filter_map(|key| {
            let follower = running.remove(&key)?;
            Some((key, follower.thread.join().unwrap_or(false)))
        })
        .collect()
}

fn start(
    options: &Arc<EngineOptions>,
    shared_metrics: &SharedMetrics,
    placed: Placed,
) -> Result<Running> {
    let inode = match &placed.netns {
        Some(path) => Some(
            std::fs::metadata(path)
                .map(|meta| std::os::unix::fs::MetadataExt::ino(&meta))
                .map_err(|e| Error::io(format!("reading namespace {}", path.display()), e))?,
        ),
        None => None,
    };
    let (stop, stop_receiver) = watch::channel(false);
    let remove = Arc::new(AtomicBool::new(false));
    let thread = {
        let options = options.clone();
        let to_follow = placed.clone();
        let remove = remove.clone();
        let shared_metrics = options.metrics.map(|_| shared_metrics.clone());
        std::thread::Builder::new()
            .name(format!("xbr-{}", placed.name))
            .spawn(move || {
                let placed = to_follow;
                let name = placed.name.clone();
                match follow_network(&options, &placed, shared_metrics, stop_receiver, &remove) {
                    Ok(said) => {
                        eprintln!("xbr: Docker network {name}: {said}");
                        true
                    }
                    Err(error) => {
                        eprintln!(
                            "xbr: Docker network {name}: {error}; trying again after the next resync"
                        );
                        false
                    }
                }
            })
            .map_err(|e| Error::io(format!("starting a follower for {}", placed.name), e))?
    };
    Ok(Running {
        placed,
        inode,
        stop,
        remove,
        thread,
    })
}

/// On a thread of its own: attach to the network's bridge (in its namespace) and follow it
/// until told to stop or the bridge goes; what happened, for people.
fn follow_network(
    options: &EngineOptions,
    placed: &Placed,
    shared_metrics: Option<SharedMetrics>,
    stop: watch::Receiver<bool>,
    remove: &AtomicBool,
) -> Result<String> {
    if let Some(path) = &placed.netns {
        netns::enter_path(path)?;
    }
    let root = options.root.as_path();
    let bridge = placed.bridge.as_str();
    let overlay = placed.netns.is_some();
    let writer = lock::Writer::acquire(root, bridge, true, options.wait)?;
    // An overlay network has no published ports of its own to mirror (the routing mesh
    // publishes service ports, and stays Docker's).
    let docker = if overlay {
        None
    } else {
        docker::find(DockerChoice::Auto, bridge)?
    };
    let docker_state = docker.as_ref().map(|d| d.observe_blocking()).transpose()?;
    let policy = plan::Policy {
        firewall: policy::read(),
        icc_off: docker_state.as_ref().and_then(|d| d.icc_off()),
        held_endpoints: placed.held_endpoints(),
    };
    let inputs = reconcile::Inputs {
        policy: &policy,
        docker: docker_state.as_ref(),
        mirror_docker: true,
        leaving: &[],
    };
    // Clients on the host reach a bridge network's published ports through the socket
    // programs; an overlay namespace has no such clients.
    let socket_hooks = if overlay {
        SocketHooksChoice::Off
    } else {
        options.socket_hooks.clone()
    };
    let attach = reconcile::AttachOptions {
        uplinks: vec![],
        default_uplinks: !overlay,
        mode: ModeChoice::Auto,
        uplink_mode: UplinkModeChoice::Auto,
        max_flows: None,
        socket_hooks: &socket_hooks,
        masquerade: false,
        features: &options.features,
        root,
    };
    let attached = reconcile::attach(bridge, attach, &inputs)?;
    drop(writer);
    let where_ = placed
        .netns
        .as_ref()
        .map(|path| format!(" in namespace {}", path.display()))
        .unwrap_or_default();
    eprintln!(
        "xbr: following Docker network {} ({}): bridge {bridge}{where_}, {} ports, {} endpoints",
        placed.name,
        placed.driver,
        attached.plan.ports.len(),
        attached.plan.endpoints.len()
    );
    let pinned = Pinned::open(root, bridge)?;
    let follow = FollowOptions {
        metrics: None,
        resync: options.resync,
        docker,
        wait: options.wait,
        stop: Some(stop),
        held_endpoints: placed.held_endpoints(),
        shared_metrics: shared_metrics.map(|shared| {
            let watched = Watched {
                labels: vec![
                    ("bridge".to_owned(), bridge.to_owned()),
                    ("network".to_owned(), placed.name.clone()),
                ],
                root: root.to_owned(),
                bridge: bridge.to_owned(),
                netns: placed.netns.clone(),
            };
            (shared, watched)
        }),
    };
    match follow::follow(pinned, follow)? {
        Stopped::Signal if remove.load(Ordering::SeqCst) => {
            let _writer = lock::Writer::acquire(root, bridge, false, options.wait)?;
            let detached = datapath::detach(root, bridge)?;
            Ok(format!(
                "left this host; removed xbr from its {} ports",
                detached.ports
            ))
        }
        Stopped::Signal => Ok("stopped following; the datapath stays attached".to_owned()),
        Stopped::Detached => Ok("detached; stopped following".to_owned()),
        Stopped::BridgeDeleted(detached) => Ok(format!(
            "bridge {bridge} was deleted; removed xbr from its {} former ports",
            detached.ports
        )),
    }
}
