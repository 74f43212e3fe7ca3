//! `xbr`: attach a tc fast path to a Linux container bridge, and build labs to try it on.

use std::path::PathBuf;

use anyhow::{Context as _, bail};
use clap::{Args, Parser, Subcommand};
use xbr::{
    datapath::{self, ModeChoice, UplinkModeChoice},
    features,
    follow::Stopped,
    lab, lock, netlink, netns, observe, pins, plan,
    publish::PublishSpec,
    reconcile,
};

mod report;

#[derive(Parser)]
#[command(
    name = "xbr",
    version,
    about = "A tc/eBPF fast path for Linux container bridges",
    long_about = "xbr moves container-to-container traffic on a Linux bridge (docker0, br-*, cni0, \
                  any bridge with veth ports) off the bridge: a tc program on every veth port \
                  redirects unicast IP frames for a known container MAC straight into that \
                  container (bpf_redirect_peer). Everything else - ARP, broadcast, multicast, \
                  traffic to the host or the outside, unknown MACs - takes the bridge as before.\n\n\
                  Published ports (`xbr publish`, or Docker's `-p` with --follow) are NATed in \
                  the datapath too: connections arriving on an uplink go straight into their \
                  container, replies straight back out. So are the containers' own outbound \
                  connections (egress NAT: --masquerade, or a Docker network that masquerades): \
                  source-NATed to the uplink's address and sent straight out, replies straight \
                  back in.\n\n\
                  On Docker overlay networks (Swarm), frames to containers on other hosts skip \
                  the bridge too, straight out of the VXLAN device, and frames from them go \
                  straight in; `xbr follow` follows every network of a Docker engine.\n\n\
                  Netfilter rules are honoured: traffic a rule on the skipped path could drop, \
                  translate or mark stays on the kernel path (`xbr status` says which rule holds \
                  what).\n\n\
                  The attachment is pinned on bpffs, so it outlives this process; `xbr detach` \
                  removes every trace of it.",
    after_help = "Examples:\n  \
                  xbr attach docker0          accelerate docker0\n  \
                  xbr attach docker0 --follow follow containers (and Docker's -p) as they come and go\n  \
                  xbr publish docker0 8080:172.17.0.2:80  a published port in the datapath\n  \
                  xbr attach br0 --uplink eth0 --masquerade  containers' outbound NAT in the datapath\n  \
                  xbr status                  what is attached, with which mode\n  \
                  xbr stats docker0 --json    per-container counters for scripts\n  \
                  xbr detach docker0          back to the plain bridge\n  \
                  xbr follow                  every Docker network, overlay (Swarm) ones too\n  \
                  xbr -n lab-host attach br0  the same inside network namespace lab-host\n  \
                  xbr lab up examples/lab.toml  build a lab of namespaces to try it on"
)]
struct Cli {
    /// Run in network namespace NAME (as created by `ip netns add`), like `ip -n NAME`; a
    /// path names a namespace file (/proc/PID/ns/net, /var/run/docker/netns/1-0123456789).
    #[arg(short = 'n', long = "netns", global = true, value_name = "NAME")]
    netns: Option<String>,
    /// More log output: -v info, -vv debug (also logs from the eBPF programs of a new
    /// attachment). RUST_LOG (e.g. RUST_LOG=xbr=debug) takes precedence.
    #[arg(short, long, global = true, action = clap::ArgAction::Count)]
    verbose: u8,
    /// Where attachments are pinned; must be on a bpf filesystem.
    #[arg(long, global = true, value_name = "DIR", default_value = pins::DEFAULT_PIN_ROOT)]
    pin_root: PathBuf,
    /// How long to wait while another xbr changes the same bridge (an attach, a detach, a
    /// follower's reconcile; one writer at a time) before giving up and naming it.
    #[arg(long, global = true, value_name = "SECONDS", default_value_t = lock::DEFAULT_WAIT.as_secs())]
    wait: u64,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Attach the fast path to BRIDGE's veth ports, pin it and exit.
    Attach {
        /// The bridge, e.g. docker0, br-1a2b3c4d5e6f, cni0; or a Docker network's name or ID
        /// (an overlay network: its bridge br0, in its namespace).
        bridge: String,
        /// How to hook the ports: tcx links (kernel 6.6+) or a clsact qdisc with a cls_bpf filter.
        #[arg(long, value_enum, default_value = "auto")]
        mode: ModeChoice,
        /// An interface where outside traffic to published ports arrives (repeatable). Default,
        /// on the first attach: the interfaces of this namespace's IPv4 default routes, since
        /// that is where clients of `-p HOSTPORT:...` come from; none when there is no
        /// default route. A later attach keeps the uplinks it finds and adds those named.
        #[arg(long = "uplink", value_name = "IFACE")]
        uplinks: Vec<String>,
        /// How to hook the uplinks. `auto`: tc, or the mode the bridge is attached with
        /// (why XDP is never chosen automatically: see `auto` below).
        #[arg(long, value_enum, default_value = "auto", value_name = "MODE")]
        uplink_mode: UplinkModeChoice,
        /// Established NATed connections (published ports) the new attachment tracks; as many
        /// again, halved, fit in its table of connections that are not established (new ones
        /// before their handshake completes, closing ones), where a flood replaces the oldest.
        /// Default: 65536, less on a host with little memory. The tables exist while a port is
        /// published: 176 bytes of kernel memory per N (the transient table is preallocated),
        /// and 272 bytes per established connection. Fixed once attached: a bridge attached
        /// with another size must be detached first.
        #[arg(long, value_name = "N", value_parser = clap::value_parser!(u32).range(i64::from(datapath::MIN_MAX_FLOWS)..=i64::from(datapath::MAX_MAX_FLOWS)))]
        max_flows: Option<u32>,
        /// Hook the socket programs, which serve published ports to clients on the host itself
        /// (`curl 127.0.0.1:8080`, the host's own address, `[::1]:8080`) by pointing their
        /// sockets at the container when they connect, instead of docker-proxy or hairpin NAT,
        /// to this cgroup v2 directory: only its processes (and its descendants') are served.
        /// Default: the root of the cgroup v2 hierarchy (every process of the host), when the
        /// kernel has what they need (5.14+). Decided at the first attach; a later attach
        /// that names another cgroup (or --no-socket-hooks) is refused.
        #[arg(long, value_name = "PATH", conflicts_with = "no_socket_hooks")]
        cgroup: Option<PathBuf>,
        /// No socket hooks: clients on the host reach published ports the kernel's way
        /// (docker-proxy, or hairpin NAT), as without xbr.
        #[arg(long)]
        no_socket_hooks: bool,
        /// Egress NAT in the datapath: the containers' new outbound connections (TCP, UDP) to
        /// addresses outside the bridge's subnet are source-NATed to the uplink's address,
        /// the way a MASQUERADE rule would, and sent out of the uplink the kernel's routing
        /// picks, skipping the bridge, netfilter and conntrack; replies go straight back into
        /// the container. A flow keeps the container's own source port where nothing else
        /// holds it (as MASQUERADE does), else gets one outside
        /// net.ipv4.ip_local_port_range; never one a socket of the host holds. A Docker
        /// network asks for this by itself (unless --internal or
        /// enable_ip_masquerade=false); `xbr status` says whether egress is accelerated and
        /// why not. Kept by later attaches until detach.
        #[arg(long)]
        masquerade: bool,
        /// Stay in the foreground and follow the bridge: containers that join are on the fast
        /// path within milliseconds, containers that leave are removed, hooks removed outside
        /// xbr are put back. Ctrl-C or SIGTERM stop following and leave the datapath in place;
        /// `xbr detach` stops the follower too. While another follower follows the bridge,
        /// this one stands by and takes over when that one stops.
        #[arg(long)]
        follow: bool,
        /// With --follow: serve Prometheus metrics at http://ADDR/metrics (e.g. 127.0.0.1:9477).
        #[arg(long, value_name = "ADDR", requires = "follow")]
        metrics: Option<std::net::SocketAddr>,
        /// With --follow: reconcile this often even without events (1 to 60 s), as a safety
        /// net for missed events; it bounds how long any drift can last.
        #[arg(
            long,
            value_name = "SECONDS",
            default_value_t = 30,
            requires = "follow",
            value_parser = clap::value_parser!(u64).range(1..=60)
        )]
        resync: u64,
        /// Mirror Docker when a Docker network owns BRIDGE (`auto`: when Docker's socket,
        /// DOCKER_HOST or /var/run/docker.sock, answers and one of its networks uses the
        /// bridge). Then the network's enable_icc=false keeps east-west traffic on the bridge,
        /// `xbr status` names the network, and with --follow the ports Docker publishes
        /// (`docker run -p`) are published here too and follow containers starting and
        /// stopping. `on` fails when Docker cannot be used; `off` never asks it. (Firewall
        /// rules, Docker's included, are honoured either way: see `xbr status`.)
        #[arg(long, value_enum, default_value = "auto", value_name = "WHEN")]
        docker: xbr::docker::DockerChoice,
        #[command(flatten)]
        output: Output,
    },
    /// Publish a container's port on the uplinks, like `docker run -p`: connections to
    /// HOSTPORT are DNATed to CONTAINERIP:CONTAINERPORT in the datapath.
    #[command(after_help = "Examples:\n  \
                            xbr publish docker0 8080:172.17.0.2:80             any host address, TCP\n  \
                            xbr publish docker0 192.0.2.10:5353:172.17.0.3:53/udp")]
    Publish {
        bridge: String,
        /// [HOSTIP:]HOSTPORT:CONTAINERIP:CONTAINERPORT[/tcp|/udp]
        spec: PublishSpec,
        #[command(flatten)]
        output: Output,
    },
    /// Stop publishing a port; its connections end.
    Unpublish {
        bridge: String,
        /// As given to `xbr publish`.
        spec: PublishSpec,
        #[command(flatten)]
        output: Output,
    },
    /// Remove everything xbr added to BRIDGE: programs, links, filters, qdiscs, pins.
    #[command(after_help = "Examples:\n  \
                            xbr detach docker0   one bridge\n  \
                            xbr detach --all     every attachment under the pin root, in every namespace")]
    Detach {
        #[arg(required_unless_present = "all", conflicts_with = "all")]
        bridge: Option<String>,
        /// Every attachment under the pin root, in every network namespace (Docker's overlay
        /// namespaces and lab namespaces too). Attachments of namespaces that no longer exist
        /// lose their pins (their hooks went with their devices).
        #[arg(long)]
        all: bool,
        #[command(flatten)]
        output: Output,
    },
    /// Follow every network of the Docker engine (bridge and overlay), present and future.
    ///
    /// Bridge networks are followed on their bridges, overlay networks (Swarm) on the bridge
    /// in their namespace, each as
    /// `xbr attach NETWORK --follow` would. One process per host. Networks that stay on
    /// Docker's path (the ingress network, encrypted overlays, drivers without a bridge) are
    /// named once with the reason. SIGTERM or Ctrl-C stop following and leave the datapaths
    /// in place; an overlay network that leaves this host is detached.
    #[command(after_help = "Examples:\n  \
                            xbr follow                       every network of the local engine\n  \
                            DOCKER_HOST=unix:///run/d2.sock xbr follow   another engine's")]
    Follow {
        /// Reconcile each network this often even without events (1 to 60 s), and list
        /// Docker's networks again.
        #[arg(
            long,
            value_name = "SECONDS",
            default_value_t = 30,
            value_parser = clap::value_parser!(u64).range(1..=60)
        )]
        resync: u64,
        /// Serve Prometheus metrics of every followed network at http://ADDR/metrics (e.g.
        /// 127.0.0.1:9477); series carry `bridge` and `network` labels.
        #[arg(long, value_name = "ADDR")]
        metrics: Option<std::net::SocketAddr>,
        /// As for `attach`: hook the socket programs of bridge networks to this cgroup v2
        /// directory (default: the root, when the kernel can).
        #[arg(long, value_name = "PATH", conflicts_with = "no_socket_hooks")]
        cgroup: Option<PathBuf>,
        /// As for `attach`: no socket programs for clients on the host.
        #[arg(long)]
        no_socket_hooks: bool,
    },
    /// Show attached bridges, their ports and endpoints, and the kernel features in use.
    Status {
        /// Only this bridge.
        bridge: Option<String>,
        #[command(flatten)]
        output: Output,
    },
    /// Per-endpoint counters: frames on the fast path, frames handed to the bridge.
    Stats {
        /// Only this bridge.
        bridge: Option<String>,
        #[command(flatten)]
        output: Output,
    },
    /// Build or remove a lab of network namespaces from a topology file.
    #[command(subcommand)]
    Lab(LabCommand),
    /// Print a shell completion script to stdout (needs no root).
    #[command(after_help = "Examples:\n  \
                            xbr completions bash > /etc/bash_completion.d/xbr\n  \
                            xbr completions zsh > /usr/local/share/zsh/site-functions/_xbr\n  \
                            xbr completions fish > ~/.config/fish/completions/xbr.fish")]
    Completions {
        /// The shell to complete for.
        shell: CompletionShell,
    },
    /// Print the xbr(8) man page (roff) to stdout; the package installs it.
    #[command(hide = true)]
    Man,
}

/// The shells `xbr completions` writes for (the ones the package ships).
#[derive(Clone, Copy, clap::ValueEnum)]
enum CompletionShell {
    Bash,
    Zsh,
    Fish,
}

/// `xbr completions` and `xbr man`: generated from this very clap definition, without root.
fn print_generated(command: &Command) -> Option<anyhow::Result<()>> {
    use clap::CommandFactory as _;
    let mut cli = Cli::command();
    let mut stdout = std::io::stdout().lock();
    match command {
        Command::Completions { shell } => {
            let shell = match shell {
                CompletionShell::Bash => clap_complete::Shell::Bash,
                CompletionShell::Zsh => clap_complete::Shell::Zsh,
                CompletionShell::Fish => clap_complete::Shell::Fish,
            };
            clap_complete::generate(shell, &mut cli, "xbr", &mut stdout);
            Some(Ok(()))
        }
        Command::Man => Some(
            clap_mangen::Man::new(cli)
                .section("8")
                .render(&mut stdout)
                .context("writing the man page"),
        ),
        _ => None,
    }
}

#[derive(Subcommand)]
enum LabCommand {
    /// Create the namespaces, bridge and veths of FILE (idempotent).
    Up { file: PathBuf },
    /// Remove exactly what `lab up FILE` made, detaching xbr from the lab's bridge first.
    Down { file: PathBuf },
}

#[derive(Args, Clone, Copy)]
struct Output {
    /// Print JSON for scripts instead of a table.
    #[arg(long)]
    json: bool,
}

fn main() {
    let cli = Cli::parse();
    if let Some(result) = print_generated(&cli.command) {
        if let Err(error) = result {
            eprintln!("xbr: {error:#}");
            std::process::exit(1);
        }
        return;
    }
    init_logging(cli.verbose);
    if let Err(error) = run(cli) {
        eprintln!("xbr: {error:#}");
        std::process::exit(1);
    }
}

fn init_logging(verbose: u8) {
    let default = match verbose {
        0 => "warn",
        1 => "info",
        _ => "debug",
    };
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(default));
    use std::io::IsTerminal as _;
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_ansi(std::io::stderr().is_terminal())
        .init();
}

fn run(cli: Cli) -> anyhow::Result<()> {
    if !nix::unistd::geteuid().is_root() {
        bail!(xbr::error::Error::NotRoot);
    }
    let wait = std::time::Duration::from_secs(cli.wait);
    if let Command::Lab(command) = &cli.command {
        return run_lab(command, &cli.pin_root, wait);
    }
    if let Some(name) = &cli.netns {
        netns::enter(name)?;
    }
    let root = &cli.pin_root;
    // BRIDGE may name a Docker network: find its bridge (and enter its namespace).
    let mut command = cli.command;
    let network = match command.bridge_mut() {
        Some(bridge) => {
            let placed = locate(bridge)?;
            if let Some(placed) = &placed {
                bridge.clone_from(&placed.bridge);
            }
            placed
        }
        _ => None,
    };
    match command {
        Command::Attach {
            bridge,
            mode,
            uplinks,
            uplink_mode,
            max_flows,
            cgroup,
            no_socket_hooks,
            masquerade,
            follow,
            metrics,
            resync,
            docker,
            output,
        } => {
            let features = tc_features()?;
            // One writer at a time, from the first look at the bridge to the last write.
            let writer = lock::Writer::acquire(root, &bridge, true, wait)?;
            let docker = xbr::docker::find(docker, &bridge)?;
            let docker_state = docker.as_ref().map(|d| d.observe_blocking()).transpose()?;
            let held_endpoints = network
                .as_ref()
                .map(|placed| placed.held_endpoints())
                .unwrap_or_default();
            let policy = plan::Policy {
                firewall: xbr::policy::read(),
                icc_off: docker_state.as_ref().and_then(|d| d.icc_off()),
                held_endpoints: held_endpoints.clone(),
            };
            let inputs = reconcile::Inputs {
                policy: &policy,
                docker: docker_state.as_ref(),
                mirror_docker: follow,
                leaving: &[],
            };
            let socket_hooks = socket_hooks_choice(cgroup, no_socket_hooks);
            let options = reconcile::AttachOptions {
                uplinks,
                default_uplinks: true,
                mode,
                uplink_mode,
                max_flows,
                socket_hooks: &socket_hooks,
                masquerade,
                features: &features,
                root,
            };
            let reconcile::Attach {
                plan,
                attached,
                egress,
                docker: synced,
            } = reconcile::attach(&bridge, options, &inputs)?;
            xbr::cni::hand_to_user(&attached.dir)
                .with_context(|| format!("taking {} over from xbr-cni", plan.bridge))?;
            let synced = docker_state.as_ref().zip(synced);
            report::attached(&plan, &attached, &egress, &features, synced, output.json)?;
            drop(writer);
            if !follow {
                return Ok(());
            }
            let pinned = datapath::Pinned::open(root, &plan.bridge)?;
            let options = xbr::follow::FollowOptions {
                metrics,
                resync: std::time::Duration::from_secs(resync),
                docker,
                wait,
                stop: None,
                held_endpoints,
                shared_metrics: None,
            };
            match xbr::follow::follow(pinned, options)? {
                Stopped::Signal => {
                    eprintln!(
                        "xbr: stopped following {}; the datapath stays attached",
                        plan.bridge
                    );
                    Ok(())
                }
                Stopped::Detached => {
                    eprintln!("xbr: {} was detached; stopped following", plan.bridge);
                    Ok(())
                }
                Stopped::BridgeDeleted(detached) => bail!(
                    "bridge {} was deleted; removed xbr from its {} former ports ({})",
                    plan.bridge,
                    detached.ports,
                    detached.dir.display()
                ),
            }
        }
        Command::Publish {
            bridge,
            spec,
            output,
        } => {
            let _writer = lock::Writer::acquire(root, &bridge, false, wait)?;
            let mut pinned = datapath::Pinned::open(root, &bridge)?;
            let name = bridge.clone();
            let view = netlink::run(|handle| async move {
                observe::bridge(&handle, &name, observe::Detail::Addresses).await
            })??;
            let policy = plan::Policy {
                firewall: xbr::policy::read(),
                icc_off: None,
                held_endpoints: network
                    .as_ref()
                    .map(|placed| placed.held_endpoints())
                    .unwrap_or_default(),
            };
            let plan = plan::plan_with(&view, &policy)?;
            pinned.publish(
                &spec,
                plan.containers.as_ref().expect("addresses were read"),
                plan.bridge_mac,
            )?;
            let applied = pinned.apply_published_policy(&plan)?;
            report::published(
                &bridge,
                &spec,
                applied.policies.get(&spec.key()),
                pinned.uplink_ifindexes().is_empty(),
                output.json,
            )
        }
        Command::Unpublish {
            bridge,
            spec,
            output,
        } => {
            let _writer = lock::Writer::acquire(root, &bridge, false, wait)?;
            let mut pinned = datapath::Pinned::open(root, &bridge)?;
            let ended = pinned.unpublish(&spec)?;
            report::unpublished(&bridge, &spec, ended, output.json)
        }
        Command::Detach {
            bridge: Some(bridge),
            output,
            ..
        } => {
            let _writer = lock::Writer::acquire(root, &bridge, false, wait)?;
            let detached = datapath::detach(root, &bridge)?;
            report::detached(&bridge, &detached, output.json)
        }
        Command::Detach {
            bridge: None,
            output,
            ..
        } => {
            let detached = detach_all(root, wait)?;
            report::detached_all(&detached, output.json)
        }
        Command::Status { bridge, output } => {
            let (mut attachments, mut incomplete) =
                read_attachments(root, bridge.as_deref(), true, network.as_ref())?;
            if bridge.is_none() {
                for (more, unfinished) in overlay_attachments(root)? {
                    attachments.extend(more);
                    incomplete.extend(unfinished);
                }
            }
            report::status(&attachments, &incomplete, &features::detect(), output.json)
        }
        Command::Stats { bridge, output } => {
            let (attachments, _) =
                read_attachments(root, bridge.as_deref(), false, network.as_ref())?;
            report::stats(&attachments, output.json)
        }
        Command::Follow {
            resync,
            metrics,
            cgroup,
            no_socket_hooks,
        } => {
            let features = tc_features()?;
            let socket = xbr::docker::socket()?;
            if !socket.exists() {
                bail!(
                    "no Docker socket at {} (start dockerd, or set DOCKER_HOST=unix:///PATH)",
                    socket.display()
                );
            }
            xbr::engine::follow_engine(xbr::engine::EngineOptions {
                socket,
                root: root.to_owned(),
                features,
                socket_hooks: socket_hooks_choice(cgroup, no_socket_hooks),
                metrics,
                resync: std::time::Duration::from_secs(resync),
                wait,
            })?;
            Ok(())
        }
        Command::Lab(_) => unreachable!("handled above"),
        Command::Completions { .. } | Command::Man => unreachable!("handled in main"),
    }
}

/// This kernel's features, when it runs tc BPF programs at all (else nothing can attach).
fn tc_features() -> anyhow::Result<features::Features> {
    let features = features::detect();
    if !features.sched_cls {
        bail!(xbr::error::Error::MissingFeature {
            feature: "tc BPF programs (BPF_PROG_TYPE_SCHED_CLS)",
            detail: format!("kernel {} refused a test program", features.kernel),
        });
    }
    Ok(features)
}

fn socket_hooks_choice(
    cgroup: Option<PathBuf>,
    no_socket_hooks: bool,
) -> datapath::SocketHooksChoice {
    match (cgroup, no_socket_hooks) {
        (_, true) => datapath::SocketHooksChoice::Off,
        (Some(path), false) => datapath::SocketHooksChoice::At(path),
        (None, false) => datapath::SocketHooksChoice::Auto,
    }
}

impl Command {
    /// The bridge a command names, where it names one.
    fn bridge_mut(&mut self) -> Option<&mut String> {
        match self {
            Command::Attach { bridge, .. }
            | Command::Publish { bridge, .. }
            | Command::Unpublish { bridge, .. } => Some(bridge),
            Command::Detach { bridge, .. }
            | Command::Status { bridge, .. }
            | Command::Stats { bridge, .. } => bridge.as_mut(),
            Command::Follow { .. } | Command::Lab(_) => None,
            Command::Completions { .. } | Command::Man => None,
        }
    }
}

/// `xbr detach --all`: every attachment under `root`, in every namespace, each detached in
/// its namespace; those of namespaces that are gone lose their pins.
fn detach_all(
    root: &std::path::Path,
    wait: std::time::Duration,
) -> anyhow::Result<Vec<report::DetachedOne>> {
    let namespaces = pins::attached_namespaces(root);
    let inodes: Vec<u64> = namespaces.iter().map(|(inode, _)| *inode).collect();
    let overlays = docker_overlay_namespaces();
    let paths = netns::find_paths(&inodes, &overlays);
    let mut detached = Vec::new();
    for (inode, dir) in namespaces {
        match paths.get(&inode) {
            Some(path) => {
                let in_namespace = netns::run_in_path(path, || -> anyhow::Result<_> {
                    let mut here = Vec::new();
                    for bridge in pins::attached_bridges(root)? {
                        let _writer = lock::Writer::acquire(root, &bridge, false, wait)?;
                        let result = datapath::detach(root, &bridge)?;
                        here.push(report::DetachedOne {
                            bridge,
                            netns: path.clone(),
                            ports: Some(result.ports),
                            removed: result.dir,
                        });
                    }
                    Ok(here)
                })?;
                detached.extend(in_namespace?);
            }
            None => {
                for bridge_dir in std::fs::read_dir(&dir)?.filter_map(|e| e.ok()) {
                    let bridge = bridge_dir.file_name().to_string_lossy().into_owned();
                    pins::remove(&bridge_dir.path(), root)?;
                    detached.push(report::DetachedOne {
                        bridge,
                        netns: dir.clone(),
                        ports: None,
                        removed: bridge_dir.path(),
                    });
                }
                pins::remove(&dir, root)?;
            }
        }
    }
    Ok(detached)
}

/// The namespaces of the local Docker engine's overlay networks, when Docker answers.
fn docker_overlay_namespaces() -> Vec<PathBuf> {
    let Ok(socket) = xbr::docker::socket() else {
        return vec![];
    };
    if !socket.exists() {
        return vec![];
    }
    let placed = xbr::docker::block_on(async {
        let client = xbr::docker::Client::connect(&socket).await?;
        client.all_placed().await
    });
    match placed {
        Ok(Ok(networks)) => networks
            .into_iter()
            .filter_map(|(_, placed)| placed.ok()?.netns)
            .collect(),
        _ => vec![],
    }
}

/// What `name` names when no link here has that name: a Docker network, whose bridge is then
/// used (after entering its namespace, for an overlay network). A Linux bridge of that name
/// wins; `None` when Docker does not answer or knows no such network (then the bridge is
/// looked for as named, and its absence reported as such).
fn locate(name: &str) -> anyhow::Result<Option<xbr::docker::networks::Placed>> {
    let owned = name.to_owned();
    let exists =
        netlink::run(|handle| async move { observe::link_by_name(&handle, &owned).await })??;
    if exists.is_some() {
        return Ok(None);
    }
    let Ok(socket) = xbr::docker::socket() else {
        return Ok(None);
    };
    if !socket.exists() {
        return Ok(None);
    }
    let found = xbr::docker::block_on(async {
        let client = xbr::docker::Client::connect(&socket).await?;
        client.placed(name).await
    })?;
    let placed = match found {
        Ok(Some(Ok(placed))) => placed,
        Ok(Some(Err(why))) => bail!(
            "Docker network {name} is not accelerated by xbr: {why}; `docker network inspect              {name}` shows it"
        ),
        // No such network, or Docker does not answer: `name` is looked for as a bridge.
        Ok(None) | Err(_) => return Ok(None),
    };
    if let Some(path) = &placed.netns {
        netns::enter_path(path).with_context(|| {
            format!(
                "entering the namespace of Docker network {} ({})",
                placed.name, placed.driver
            )
        })?;
    }
    tracing::info!(network = %placed.name, bridge = %placed.bridge, "using Docker network");
    Ok(Some(placed))
}

type Attachments = (Vec<report::Observed>, Vec<report::Incomplete>);

/// The attachments in the namespaces of Docker's overlay networks (when Docker answers):
/// `xbr status` on a Swarm node shows them beside the bridges of this namespace.
fn overlay_attachments(root: &std::path::Path) -> anyhow::Result<Vec<Attachments>> {
    let Ok(socket) = xbr::docker::socket() else {
        return Ok(vec![]);
    };
    if !socket.exists() {
        return Ok(vec![]);
    }
    let Ok(Ok(networks)) = xbr::docker::block_on(async {
        let client = xbr::docker::Client::connect(&socket).await?;
        client.all_placed().await
    }) else {
        return Ok(vec![]);
    };
    let mut found = Vec::new();
    for placed in networks.into_iter().filter_map(|(_, placed)| placed.ok()) {
        let Some(path) = placed.netns.clone() else {
            continue;
        };
        let attachments = netns::run_in_path(&path, || {
            let attached = pins::bridge_dir(root, &placed.bridge).is_ok_and(|dir| dir.exists());
            attached
                .then(|| read_attachments(root, Some(&placed.bridge), true, Some(&placed)))
                .transpose()
        })?;
        found.extend(attachments?);
    }
    Ok(found)
}

/// Pinned attachments, each with a fresh look at its bridge (names, container IPs, and
/// what is not accelerated); `None` when the bridge is gone. `with_docker`: also what Docker
/// (where a Docker network owns it) and the firewall say about it. Second: pins that are not
/// a whole attachment (an attach or detach interrupted, or running now).
fn read_attachments(
    root: &std::path::Path,
    only: Option<&str>,
    with_docker: bool,
    network: Option<&xbr::docker::networks::Placed>,
) -> anyhow::Result<(Vec<report::Observed>, Vec<report::Incomplete>)> {
    let names = match only {
        Some(name) => vec![name.to_owned()],
        None => pins::attached_bridges(root)?,
    };
    let firewall = with_docker.then(xbr::policy::read);
    let mut attachments = Vec::new();
    let mut incomplete = Vec::new();
    for name in names {
        let attachment = match datapath::read(root, &name) {
            Ok(attachment) => attachment,
            Err(
                error @ (xbr::error::Error::Incomplete { .. }
                | xbr::error::Error::BrokenPins { .. }
                | xbr::error::Error::OtherLayout { .. }),
            ) => {
                let dir = pins::bridge_dir(root, &name)?;
                incomplete.push(report::Incomplete {
                    writer: lock::writer(&dir),
                    bridge: name,
                    dir,
                    detail: error.to_string(),
                });
                continue;
            }
            Err(error) => return Err(error.into()),
        };
        let docker = with_docker.then(|| xbr::docker::status(&name)).flatten();
        let view = netlink::run(|handle| async move {
            observe::bridge(&handle, &name, observe::Detail::Addresses).await
        })?
        .ok();
        // What the rules say now, to set beside what the datapath does.
        let plan = match (&view, &firewall) {
            (Some(view), Some(firewall)) => {
                let policy = plan::Policy {
                    firewall: firewall.clone(),
                    icc_off: docker.as_ref().and_then(|d| d.icc_off()),
                    held_endpoints: network
                        .map(|placed| placed.held_endpoints())
                        .unwrap_or_default(),
                };
                plan::plan_with(view, &policy).ok()
            }
            _ => None,
        };
        let egress = plan.as_ref().map(|plan| {
            let policy = plan.policy.clone();
            let inputs = reconcile::Inputs {
                policy: &policy,
                docker: docker.as_ref(),
                mirror_docker: false,
                leaving: &[],
            };
            reconcile::egress_now(
                attachment.record.masquerade != 0,
                attachment.uplinks.clone(),
                plan,
                &inputs,
            )
            .map_err(|e| e.to_string())
        });
        attachments.push(report::Observed {
            attachment,
            view,
            docker,
            plan,
            egress,
            network: network.cloned(),
        });
    }
    Ok((attachments, incomplete))
}

fn run_lab(
    command: &LabCommand,
    root: &std::path::Path,
    wait: std::time::Duration,
) -> anyhow::Result<()> {
    match command {
        LabCommand::Up { file } => {
            let spec = lab::LabSpec::from_file(file)?;
            lab::up(&spec).with_context(|| format!("building lab {}", spec.name))?;
            println!(
                "lab {} is up: bridge {} in namespace {} with {} containers",
                spec.name,
                spec.bridge.name,
                spec.host_netns(),
                spec.containers.len()
            );
            println!(
                "  try: xbr -n {} attach {}",
                spec.host_netns(),
                spec.bridge.name
            );
            Ok(())
        }
        LabCommand::Down { file } => {
            let spec = lab::LabSpec::from_file(file)?;
            // Deleting the namespace would take the ports but leave the pins behind.
            let host = netns::NetNs::open(&spec.host_netns()).ok();
            if let Some(host) = host {
                let bridge = spec.bridge.name.clone();
                let root = root.to_owned();
                host.run(move || {
                    let _writer = lock::Writer::acquire(&root, &bridge, false, wait)?;
                    datapath::detach(&root, &bridge).map(|_| ())
                })?
                .or_else(|error| match error {
                    xbr::error::Error::NotAttached { .. } => Ok(()),
                    error => Err(error),
                })?;
            }
            lab::down(&spec).with_context(|| format!("removing lab {}", spec.name))?;
            println!("lab {} is down", spec.name);
            Ok(())
        }
    }
}
