//! `cargo xtask bench`: xbr side by side with a plain bridge, Docker's netfilter path and a
//! direct veth pair (the limit), for published ports with Docker's DNAT and docker-proxy, and
//! for host clients of a published port with docker-proxy, hairpin DNAT and a direct
//! connection, for a container's connections to the outside with Docker's MASQUERADE and
//! a routed limit, and for containers on two nodes of a Docker overlay network (VXLAN) with
//! the nodes' own VXLAN devices as the limit, interleaved round by round; see BENCHMARKS.md.

mod chart;
mod host;
mod memory;
mod peer;
mod report;
mod results;
mod workloads;
mod worlds;

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use anyhow::Context as _;
use indicatif::{ProgressBar, ProgressStyle};
use serde::{Deserialize, Serialize};
use serde_json::{Value, json};

pub use self::peer::{ClientArgs, client};

use self::host::{BpfStats, Machine};
use self::results::{ConfigDescription, Report, Sample, summarize};
use self::workloads::{Load, Workload};
use self::worlds::{Config, PathCounters, Placement, Worlds};
use crate::cmd::Interrupt;
use crate::{build, cmd, setup};

/// Every namespace of a `cargo xtask bench` run starts with `xbench-`.
const PREFIX: &str = "xbench";
/// Endpoints on each bridge in the base rounds: the client, the server and idle containers.
const BASE_ENDPOINTS: usize = 10;

#[derive(clap::Args, Debug)]
pub struct Args {
    /// One short round of everything (about a second per workload): a smoke test.
    #[arg(long)]
    quick: bool,
    /// Rounds; each runs every workload in every configuration [default: 5, --quick 1].
    #[arg(long, value_name = "N")]
    rounds: Option<u32>,
    /// Seconds per traffic run [default: 3, --quick 1].
    #[arg(long, value_name = "SECONDS")]
    seconds: Option<u32>,
    /// Endpoints on each bridge in the scale rounds.
    #[arg(long, value_name = "N", default_value_t = 1000)]
    scale_endpoints: usize,
    /// Offered load of the CPU-per-packet workload, in thousands of 64-byte datagrams per
    /// second; low enough that every configuration delivers all of it.
    #[arg(long, value_name = "KPPS", default_value_t = 20)]
    cpu_kpps: u32,
    /// The rate of the spoofed SYN flood in the published-port flood workload, in thousands of
    /// SYNs per second; low enough that the flood's one thread sends all of it.
    #[arg(long, value_name = "KPPS", default_value_t = 25)]
    flood_kpps: u32,
    /// Run only these workloads (repeatable; ids as in bench.json, e.g.
    /// tcp-connections-syn-flood): for trying one thing. The report then lacks the rest.
    #[arg(long = "workload", value_name = "ID", value_parser = workload_parser())]
    workloads: Vec<Workload>,
    /// Where bench.json, bench.svg and bench.md go [default: target/bench].
    #[arg(long, value_name = "DIR")]
    out_dir: Option<PathBuf>,
    /// Measure this xbr binary instead of building the workspace's.
    #[arg(long, value_name = "PATH")]
    xbr: Option<PathBuf>,
    /// Measure nothing: redraw the table, chart and Markdown of an earlier bench.json.
    #[arg(long, value_name = "JSON", conflicts_with_all = ["quick", "rounds", "seconds", "xbr"])]
    from: Option<PathBuf>,
}

/// What one bench run does, as recorded in its report.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct Settings {
    pub quick: bool,
    pub rounds: u32,
    pub seconds: u32,
    pub endpoints: usize,
    pub scale_endpoints: usize,
    /// Rounds that time `xbr attach` (clsact, then tcx) at the scale endpoint count: at
    /// 1000 ports a tcx attach and detach take tens of seconds, so at most three.
    pub attach_rounds: u32,
    pub cpu_pps: u32,
    pub client_cpu: Option<usize>,
    pub server_cpu: Option<usize>,
    /// The one CPU of the published-port workloads (absent in reports from before them).
    #[serde(default)]
    pub published_cpu: Option<usize>,
    /// The SYN flood's rate (absent in reports from before it).
    #[serde(default)]
    pub flood_pps: u32,
    /// Only these workloads ran (`--workload`); empty: all of them.
    #[serde(default)]
    pub only: Vec<String>,
}

/// A workload id: one of `Workload::ALL`'s, which `--help` lists and an error names.
fn workload_parser() -> impl clap::builder::TypedValueParser<Value = Workload> {
    use clap::builder::TypedValueParser as _;
    clap::builder::PossibleValuesParser::new(Workload::ALL.map(Workload::id))
        .map(|id| Workload::from_id(&id).expect("every possible value is a workload's id"))
}

impl Settings {
    fn new(args: &Args) -> Settings {
        // Many short rounds rather than few long ones: on a shared machine, bursts of other
        // load spoil a run, and the median of more rounds shrugs more of them off.
        let (rounds, seconds) = if args.quick { (1, 1) } else { (5, 3) };
        // The client on the first CPU, the server on the second: every configuration gets the
        // same placement. One CPU: nothing to choose.
        let two_cpus = std::thread::available_parallelism().map_or(1, usize::from) >= 2;
        let rounds = args.rounds.unwrap_or(rounds).max(1);
        Settings {
            quick: args.quick,
            rounds,
            attach_rounds: rounds.min(3),
            seconds: args.seconds.unwrap_or(seconds).max(1),
            endpoints: BASE_ENDPOINTS,
            scale_endpoints: args.scale_endpoints.max(2),
            cpu_pps: args.cpu_kpps.max(1) * 1000,
            client_cpu: two_cpus.then_some(0),
            server_cpu: two_cpus.then_some(1),
            published_cpu: Some(0),
            flood_pps: args.flood_kpps.max(1) * 1000,
            only: args.workloads.iter().map(|w| w.id().to_owned()).collect(),
        }
    }

    /// Whether `workload` runs (all do unless `--workload` picked some).
    fn runs(&self, workload: Workload) -> bool {
        self.only.is_empty() || self.only.iter().any(|id| id == workload.id())
    }

    fn placement(&self) -> Placement {
        Placement {
            client_cpu: self.client_cpu,
            server_cpu: self.server_cpu,
            published_cpu: self.published_cpu,
        }
    }

    /// The configurations the chosen workloads run in: only their worlds are built.
    fn configs(&self) -> Vec<Config> {
        Config::ALL
            .into_iter()
            .filter(|config| {
                Workload::ALL.into_iter().any(|workload| {
                    self.runs(workload)
                        && if Workload::ATTACH.contains(&workload) {
                            *config == Config::Xbr
                        } else {
                            results::configs(workload).contains(config)
                        }
                })
            })
            .collect()
    }

    /// Progress steps: building, every run, the profile, growing, attaching.
    fn steps(&self) -> u64 {
        let runs = |workloads: &[Workload]| {
            every_config(workloads)
                .filter(|(workload, _)| self.runs(*workload))
                .count() as u64
        };
        let base = runs(&Workload::TRAFFIC)
            + runs(&Workload::PUBLISHED)
            + runs(&Workload::HOST)
            + runs(&Workload::EGRESS)
            + runs(&Workload::OVERLAY);
        let scale_runs = runs(&Workload::SCALE);
        let attach = Workload::ATTACH
            .iter()
            .filter(|workload| self.runs(**workload))
            .count() as u64
            * u64::from(self.attach_rounds);
        let configs = self.configs();
        let grow = if scale_runs + attach > 0 {
            Config::EAST_WEST
                .iter()
                .filter(|config| **config != Config::Limit && configs.contains(config))
                .count() as u64
        } else {
            0
        };
        configs.len() as u64 + u64::from(self.rounds) * (base + scale_runs) + attach + 1 + grow
    }
}

pub fn run(args: Args) -> anyhow::Result<()> {
    if let Some(json) = &args.from {
        return redraw(json, args.out_dir.as_deref());
    }
    cmd::require_root("the bench creates network namespaces and loads BPF programs")?;
    let interrupt = Interrupt::install()?;
    setup::run()?;
    let built = match &args.xbr {
        Some(xbr) => std::path::absolute(xbr)
            .with_context(|| format!("finding the xbr binary {}", xbr.display()))?,
        None => build::release_binary()?,
    };
    let built_flood = build::flood_binary()?;
    let built_client = build::xtask_binary()?;
    interrupt.check().context("building xbr")?;
    let settings = Settings::new(&args);
    let out_dir = args
        .out_dir
        .clone()
        .unwrap_or_else(|| cmd::target_dir().join("bench"));
    // A copy of its own: a rebuild of the workspace during the run cannot swap the binary.
    std::fs::create_dir_all(&out_dir).with_context(|| format!("creating {}", out_dir.display()))?;
    let xbr = out_dir.join("xbr");
    std::fs::copy(&built, &xbr)
        .with_context(|| format!("copying {} to {}", built.display(), xbr.display()))?;
    let flood = out_dir.join("syn-flood");
    std::fs::copy(&built_flood, &flood)
        .with_context(|| format!("copying {} to {}", built_flood.display(), flood.display()))?;
    let client = out_dir.join("bench-client");
    std::fs::copy(&built_client, &client)
        .with_context(|| format!("copying {} to {}", built_client.display(), client.display()))?;
    let about = About {
        command: std::iter::once("cargo xtask".to_owned())
            .chain(std::env::args().skip(1))
            .collect::<Vec<_>>()
            .join(" "),
        xbr_source: match &args.xbr {
            Some(_) => format!("the binary {}", built.display()),
            None => source_revision(),
        },
    };
    println!();
    println!(
        "== xbr bench: {} round{} of {} s runs, {} endpoints per bridge, then {}",
        settings.rounds,
        if settings.rounds == 1 { "" } else { "s" },
        settings.seconds,
        settings.endpoints,
        settings.scale_endpoints
    );
    for config in Config::ALL {
        println!("   {:<12} {}", config.name(), config.describe());
    }
    let report = measure(
        &settings,
        (&xbr, &flood, &client),
        PREFIX,
        &out_dir.join("labs"),
        &about,
        &interrupt,
    )?;
    print!("{}", report.table());
    let written = report.write(&out_dir)?;
    println!();
    println!(
        "== {:.0} s in all; wrote {} (every sample), {} (chart), {} (tables)",
        report.wall_seconds,
        written.json.display(),
        written.svg.display(),
        written.markdown.display()
    );
    Ok(())
}

/// How a run was asked for, and which xbr it measured.
pub struct About {
    pub command: String,
    pub xbr_source: String,
}

/// The workspace's commit, and whether the tree differs from it: what `build` compiled.
fn source_revision() -> String {
    let git = |args: &[&str]| {
        cmd::output(
            std::process::Command::new("git")
                .arg("-C")
                .arg(cmd::workspace_root())
                .args(args),
            "asking git for the workspace's commit",
        )
    };
    match git(&["rev-parse", "--short=12", "HEAD"]) {
        Ok(commit) => {
            let dirty = git(&["status", "--porcelain", "--untracked-files=no"])
                .map(|status| !status.trim().is_empty())
                .unwrap_or(false);
            format!(
                "the workspace at commit {}{}",
                commit.trim(),
                if dirty {
                    " with uncommitted changes"
                } else {
                    ""
                }
            )
        }
        Err(_) => "the workspace (not a git checkout)".to_owned(),
    }
}

/// Rewrites bench.svg and bench.md (and prints the table) from a saved report.
fn redraw(json: &Path, out_dir: Option<&Path>) -> anyhow::Result<()> {
    let text = std::fs::read_to_string(json)
        .with_context(|| format!("reading the report {}", json.display()))?;
    let report: Report = serde_json::from_str(&text)
        .with_context(|| format!("{} is not a bench report", json.display()))?;
    let out_dir = out_dir.map_or_else(|| cmd::target_dir().join("bench"), Path::to_owned);
    print!("{}", report.table());
    let written = report.write(&out_dir)?;
    println!();
    println!(
        "== redrew {} and {} from {}",
        written.svg.display(),
        written.markdown.display(),
        json.display()
    );
    Ok(())
}

/// Builds the worlds, runs every round, tears everything down (also on errors, Ctrl-C and
/// panics: `Worlds` cleans up when dropped) and returns the report.
pub fn measure(
    settings: &Settings,
    (xbr, flood, client): (&Path, &Path, &Path),
    prefix: &str,
    lab_dir: &Path,
    about: &About,
    interrupt: &Interrupt,
) -> anyhow::Result<Report> {
    let started = Instant::now();
    let started_unix = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |since| since.as_secs());
    let machine = Machine::describe();
    let load = Load {
        seconds: settings.seconds,
        cpu_pps: settings.cpu_pps,
        placement: settings.placement(),
        flood_pps: settings.flood_pps,
        flood: flood.to_owned(),
        client: client.to_owned(),
    };
    let progress = Progress::new(settings.steps());
    let mut worlds = Worlds::new(xbr, prefix, lab_dir, settings.placement(), interrupt);
    let leftovers = worlds.remove_leftovers()?;
    if leftovers > 0 {
        progress.say(&format!(
            "   removed {leftovers} namespaces left by an earlier run ({prefix}-*)"
        ));
    }
    worlds.build(settings.endpoints, &settings.configs(), &|what| {
        progress.step(what);
    })?;
    settle(
        settings,
        "building the worlds",
        &progress,
        &mut worlds,
        interrupt,
    )?;

    let mut samples = Vec::new();
    progress.say(&format!(
        "   base rounds: {} endpoints on each bridge",
        settings.endpoints
    ));
    for round in 1..=settings.rounds {
        let runs = every_config(&Workload::TRAFFIC)
            .chain(every_config(&Workload::PUBLISHED))
            .chain(every_config(&Workload::HOST))
            .chain(every_config(&Workload::EGRESS))
            .chain(every_config(&Workload::OVERLAY));
        let built: Vec<Config> = Config::ALL
            .into_iter()
            .filter(|config| worlds.has(*config))
            .collect();
        let runs =
            runs.filter(|(workload, config)| settings.runs(*workload) && built.contains(config));
        for (workload, config) in runs {
            let sample = traffic_sample(
                &mut worlds,
                settings.endpoints,
                (round, workload, config),
                &load,
                &progress,
                interrupt,
            )?;
            samples.push(sample);
        }
    }
    progress.step("profiling xbr's program");
    let xbr_program = match settings
        .runs(Workload::UdpPps)
        .then(|| profile(&worlds, &load, interrupt))
    {
        Some(Ok(profile)) => Some(profile),
        Some(Err(error)) => {
            interrupt.check()?;
            worlds.notes.push(format!(
                "no BPF run-time statistics for xbr's program: {error:#}"
            ));
            None
        }
        None => None,
    };
    // What only the east-west xbr world has (not built when `--workload` left it out).
    let xbr_built = worlds.has(Config::Xbr);
    let xbr_stats = xbr_built.then(|| worlds.xbr_stats().ok()).flatten();
    let mut memory_measured: Vec<memory::Measured> = if xbr_built {
        worlds.xbr_memory(settings.endpoints).into_iter().collect()
    } else {
        Vec::new()
    };

    let scale = Workload::SCALE
        .iter()
        .chain(&Workload::ATTACH)
        .any(|workload| settings.runs(*workload));
    if scale {
        progress.say(&format!(
            "   scale rounds: {} endpoints on each bridge",
            settings.scale_endpoints
        ));
        worlds.grow(settings.scale_endpoints, &|what| progress.step(what))?;
        settle(
            settings,
            "growing the labs",
            &progress,
            &mut worlds,
            interrupt,
        )?;
    }
    for round in (1..=settings.rounds).filter(|_| scale) {
        for workload in Workload::ATTACH
            .into_iter()
            .filter(|workload| round <= settings.attach_rounds && settings.runs(*workload))
        {
            samples.push(attach_sample(
                &mut worlds,
                round,
                workload,
                settings,
                &progress,
            )?);
        }
        for (workload, config) in
            every_config(&Workload::SCALE).filter(|(workload, _)| settings.runs(*workload))
        {
            let sample = traffic_sample(
                &mut worlds,
                settings.scale_endpoints,
                (round, workload, config),
                &load,
                &progress,
                interrupt,
            )?;
            samples.push(sample);
        }
    }
    if scale && xbr_built {
        memory_measured.extend(worlds.xbr_memory(settings.scale_endpoints));
    }
    progress.finish("tearing down");
    worlds.teardown()?;
    let notes = std::mem::take(&mut worlds.notes);
    drop(worlds);

    Ok(Report {
        command: about.command.clone(),
        xbr_source: Some(about.xbr_source.clone()),
        machine,
        settings: settings.clone(),
        configurations: Config::ALL
            .iter()
            .map(|config| ConfigDescription {
                name: config.name().to_owned(),
                description: config.describe().to_owned(),
            })
            .collect(),
        notes,
        started_unix,
        wall_seconds: started.elapsed().as_secs_f64(),
        summary: summarize(&samples, &[settings.endpoints, settings.scale_endpoints]),
        samples,
        xbr_program,
        xbr_stats,
        memory: memory::table(),
        memory_measured,
    })
}

/// Each of WORKLOADS in each configuration it runs in, in the order of a round.
fn every_config(workloads: &[Workload]) -> impl Iterator<Item = (Workload, Config)> + '_ {
    workloads.iter().flat_map(|&workload| {
        results::configs(workload)
            .iter()
            .map(move |&config| (workload, config))
    })
}

/// Waits for the kernel to finish what building or growing the labs set off, so that no
/// configuration pays for it; says so in the report when the machine stayed busy.
fn settle(
    settings: &Settings,
    after: &str,
    progress: &Progress,
    worlds: &mut Worlds,
    interrupt: &Interrupt,
) -> anyhow::Result<()> {
    let max = Duration::from_secs(if settings.quick { 30 } else { 90 });
    progress.set(&format!("waiting for the kernel to go quiet after {after}"));
    let quiet = host::wait_quiet(max, interrupt)?;
    let line = format!(
        "waited {:.0} s after {after} for the kernel to go quiet: system + irq + softirq at \
         {:.0}% of all CPUs",
        quiet.waited.as_secs_f64(),
        quiet.kernel_busy * 100.0
    );
    progress.say(&format!("   {line}"));
    if quiet.waited >= max {
        worlds
            .notes
            .push(format!("{line}; the machine stayed busy (other load?)"));
    }
    Ok(())
}

/// One traffic run, ENDPOINTS on each bridge; a failed run is retried once with fresh servers.
/// A run in a configuration whose path is checked (published ports, xbr between containers)
/// must also show, in the counters, that it took the path it measures.
fn traffic_sample(
    worlds: &mut Worlds,
    endpoints: usize,
    (round, workload, config): (u32, Workload, Config),
    load: &Load,
    progress: &Progress,
    interrupt: &Interrupt,
) -> anyhow::Result<Sample> {
    progress.set(&format!(
        "round {round}: {} in {} ({endpoints} endpoints)",
        workload.id(),
        config.name()
    ));
    let counted_before = if config.path_checked() {
        Some(worlds.path_counters(config)?)
    } else {
        None
    };
    let world = worlds.get(config);
    let mut measured = match workloads::run(workload, world, load, interrupt) {
        Ok(measured) => measured,
        Err(error) => {
            interrupt.check()?;
            progress.say(&format!(
                "   {} in {} failed, retrying with fresh servers: {error:#}",
                workload.id(),
                config.name()
            ));
            worlds.restart_servers(config)?;
            workloads::run(workload, worlds.get(config), load, interrupt).with_context(|| {
                format!(
                    "{} in {} failed twice (first: {error:#})",
                    workload.id(),
                    config.name()
                )
            })?
        }
    };
    if let Some(before) = counted_before {
        let after = worlds.path_counters(config)?;
        let ran = Ran {
            completed: measured.details["completed"].as_u64().unwrap_or(0),
            connections: measured.details["connections"].as_u64().unwrap_or(0),
        };
        measured.details["path"] = check_path(config, &before, &after, &ran)?;
    }
    if config == Config::EgressXbr {
        // How xbr's connection tables fared: ports exhausted, flows left to the kernel.
        measured.details["xbr_nat"] = worlds.nat_state(config)?;
    }
    if workload == Workload::TcpConnectionsFlooded && config.uplink_mode().is_some() {
        // What the flood did to xbr's tables: how full, how much it replaced.
        measured.details["xbr_nat"] = worlds.nat_state(config)?;
    }
    let sample = Sample {
        round,
        endpoints,
        config: config.name().to_owned(),
        workload: workload.id().to_owned(),
        metrics: measured.metrics,
        details: measured.details,
    };
    progress.done(&sample);
    Ok(sample)
}

/// Frames of an east-west run that may miss xbr's fast path by design (ARP and neighbour
/// discovery take the bridge), besides one in a hundred of the frames sent.
const EAST_WEST_SLACK_FRAMES: u64 = 20;

/// What a run did, as its path check needs it: exchanges completed, and connections made
/// (host clients).
#[derive(Clone, Copy, Debug, Default)]
struct Ran {
    completed: u64,
    connections: u64,
}

/// What the counters grew by during a run, after checking that they grew as the
/// configuration's path implies. Published ports: Docker's DNAT rule counts (the first packet
/// of) each connection it translates, xbr each frame its tc or XDP program delivers. xbr
/// between containers: about every frame client and server sent is redirected by xbr, and the
/// bridge forwards (about) no IPv4 frame itself. Host clients: docker-proxy accepts each
/// connection in the host namespace (its Tcp PassiveOpens; the server is in the container's),
/// the DNAT rule counts each connection, xbr each connect() it translated.
fn check_path(
    config: Config,
    before: &PathCounters,
    after: &PathCounters,
    ran: &Ran,
) -> anyhow::Result<Value> {
    let completed = ran.completed;
    let grown = |counter: fn(&PathCounters) -> u64| counter(after).saturating_sub(counter(before));
    if config.is_host() {
        let dnat = grown(|c| c.dnat_packets);
        let proxied = grown(|c| c.host_passive_opens);
        let translated = grown(|c| c.host_connects);
        let connections = ran.connections;
        let took_its_path = connections > 0
            && match config {
                Config::HostProxy => dnat == 0 && proxied >= connections,
                Config::HostDnat => dnat >= connections && proxied == 0,
                Config::HostXbr => dnat == 0 && proxied == 0 && translated >= connections,
                // Straight to the container: neither Docker's way (nor xbr: not attached).
                Config::HostLimit => dnat == 0 && proxied == 0 && translated == 0,
                _ => true,
            };
        anyhow::ensure!(
            took_its_path,
            "{} did not take its own path: Docker's DNAT rule +{dnat} packets, the host \
             namespace accepted +{proxied} connections (docker-proxy), xbr translated \
             +{translated} connect()s, for {connections} connections",
            config.name()
        );
        return Ok(json!({
            "dnat_packets": dnat,
            "host_accepted_connections": proxied,
            "xbr_host_connects": translated,
        }));
    }
    if config.is_egress() {
        return check_egress_path(config, before, after, ran);
    }
    if config.is_overlay() {
        return check_overlay_path(config, before, after);
    }
    if config == Config::Xbr {
        let sent = grown(|c| c.sent);
        let redirected = grown(|c| c.xbr_redirected);
        let bridged = grown(|c| c.bridge_forwarded_ipv4);
        let slack = EAST_WEST_SLACK_FRAMES + sent / 100;
        anyhow::ensure!(
            sent > 0 && redirected + slack >= sent && bridged <= slack,
            "{} did not take the fast path: xbr redirected +{redirected} frames and the bridge \
             forwarded +{bridged} IPv4 frames itself, of {sent} frames client and server sent",
            config.name()
        );
        return Ok(json!({
            "sent": sent,
            "xbr_redirected": redirected,
            "bridge_forwarded_ipv4": bridged,
        }));
    }
    let dnat = grown(|c| c.dnat_packets);
    let tc = grown(|c| c.xbr_nat_in);
    let xdp = grown(|c| c.xbr_nat_in_xdp);
    let took_its_path = match config {
        Config::Dnat => dnat > 0,
        Config::DockerProxy => dnat == 0,
        Config::XbrNat => dnat == 0 && tc >= completed,
        Config::XbrNatXdp => dnat == 0 && xdp >= completed,
        _ => true,
    };
    anyhow::ensure!(
        took_its_path,
        "{} did not take its own path: Docker's DNAT rule +{dnat} packets, xbr's NAT +{tc} \
         frames from tc and +{xdp} from XDP, for {completed} exchanges",
        config.name()
    );
    Ok(json!({ "dnat_packets": dnat, "xbr_nat_in": tc, "xbr_nat_in_xdp": xdp }))
}

/// Egress: which path carried a run from the container to the server outside.
/// - egress-xbr: xbr's `egress_out` grew by (about) every frame the container sent and its
///   `egress_in` by every frame the server sent, while the host namespace's kernel forwarded
///   (about) no IPv4 datagram (Ip ForwDatagrams), conntrack gained no entries and no
///   MASQUERADE rule counted anything. A run the kernel carried forwards every frame and, for
///   connections, leaves a conntrack entry per connection: it fails this.
/// - egress-docker-like: the kernel forwarded (about) every frame of both directions, and
///   Docker's MASQUERADE rule translated each new connection (at least one).
/// - egress-limit: the kernel forwarded every frame, and nothing made a conntrack entry.
fn check_egress_path(
    config: Config,
    before: &PathCounters,
    after: &PathCounters,
    ran: &Ran,
) -> anyhow::Result<Value> {
    let grown = |counter: fn(&PathCounters) -> u64| counter(after).saturating_sub(counter(before));
    let sent = grown(|c| c.egress_sent);
    let replies = grown(|c| c.egress_replies);
    let forwarded = grown(|c| c.forwarded);
    let masqueraded = grown(|c| c.masqueraded);
    let conntrack = grown(|c| c.conntrack_entries);
    let out = grown(|c| c.xbr_egress_out);
    let back = grown(|c| c.xbr_egress_in);
    let left = grown(|c| c.xbr_egress_kernel);
    // ARP and neighbour discovery, and one frame in a hundred.
    let slack = |frames: u64| EAST_WEST_SLACK_FRAMES + frames / 100;
    let both = sent + replies;
    let took_its_path = sent > 0
        && replies > 0
        && match config {
            Config::EgressXbr => {
                out + slack(sent) >= sent
                    && back + slack(replies) >= replies
                    && forwarded <= slack(both)
                    && left <= slack(sent)
                    && conntrack <= EAST_WEST_SLACK_FRAMES
                    && masqueraded == 0
            }
            Config::EgressDocker => {
                forwarded + slack(both) >= both && masqueraded >= ran.completed.max(1)
            }
            Config::EgressLimit => {
                forwarded + slack(both) >= both && masqueraded == 0 && conntrack == 0
            }
            _ => true,
        };
    anyhow::ensure!(
        took_its_path,
        "{} did not take its own path: the container sent {sent} frames and the server \
         {replies}; xbr translated +{out} out and +{back} in, the host's kernel forwarded \
         +{forwarded} IPv4 datagrams (xbr left +{left} frames to it), MASQUERADE counted +{masqueraded} packets and conntrack \
         gained +{conntrack} entries, for {} exchanges",
        config.name(),
        ran.completed
    );
    Ok(json!({
        "container_sent": sent,
        "server_sent": replies,
        "xbr_egress_out": out,
        "xbr_egress_in": back,
        "xbr_egress_kernel": left,
        "kernel_forwarded": forwarded,
        "masqueraded": masqueraded,
        "conntrack_entries_added": conntrack,
    }))
}

/// Across nodes: which path carried a run between the two nodes' endpoints. Node 1 is the
/// client's, node 2 the server's; each sent frames (`overlay_sent`).
/// - every overlay world: each node's underlay veth sent (about) a VXLAN packet per frame its
///   end sent: the traffic crossed the underlay, encapsulated.
/// - overlay-xbr: in each overlay namespace, xbr's vxlan0 port sent (`delivered_packets`)
///   about every frame the local container sent, and redirected into the container
///   (`fast_path_packets`) about every frame the other node's container sent, while the
///   bridge's forward hook counted (about) no IPv4 frame: br0 was skipped both ways.
/// - overlay-docker-like: in each overlay namespace br0 forwarded (about) every frame of both
///   directions (out of the local container, into it from vxlan0), and xbr is not attached.
/// - overlay-limit: there is no bridge (checked when built); the underlay check alone.
fn check_overlay_path(
    config: Config,
    before: &PathCounters,
    after: &PathCounters,
) -> anyhow::Result<Value> {
    let grown = |counter: fn(&PathCounters) -> [u64; 2]| -> [u64; 2] {
        let (after, before) = (counter(after), counter(before));
        [
            after[0].saturating_sub(before[0]),
            after[1].saturating_sub(before[1]),
        ]
    };
    let sent = grown(|c| c.overlay_sent);
    let underlay = grown(|c| c.overlay_underlay);
    let bridged = grown(|c| c.overlay_bridged);
    let tunnelled = grown(|c| c.overlay_tunnelled);
    let arrived = grown(|c| c.overlay_arrived);
    let slack = |frames: u64| EAST_WEST_SLACK_FRAMES + frames / 100;
    let both = sent[0] + sent[1];
    let mut took_its_path = sent[0] > 0 && sent[1] > 0;
    for node in 0..2 {
        let (own, other) = (sent[node], sent[1 - node]);
        took_its_path &= underlay[node] + slack(own) >= own;
        took_its_path &= match config {
            Config::OverlayXbr => {
                tunnelled[node] + slack(own) >= own
                    && arrived[node] + slack(other) >= other
                    && bridged[node] <= slack(both)
            }
            Config::OverlayDocker => bridged[node] + slack(both) >= both,
            _ => true,
        };
    }
    anyhow::ensure!(
        took_its_path,
        "{} did not take its own path: the nodes' ends sent {sent:?} frames and their \
         underlays {underlay:?} packets; each br0 forwarded {bridged:?} IPv4 frames, xbr's \
         vxlan0 ports sent {tunnelled:?} frames to the other node and redirected {arrived:?} \
         from it into the containers (node 1, node 2)",
        config.name()
    );
    let mut path = json!({ "sent": sent, "underlay_sent": underlay });
    if config != Config::OverlayLimit {
        path["bridge_forwarded_ipv4"] = json!(bridged);
    }
    if config == Config::OverlayXbr {
        path["xbr_vxlan0_delivered"] = json!(tunnelled);
        path["xbr_vxlan0_fast_path"] = json!(arrived);
    }
    Ok(path)
}

/// Detach, then time `xbr attach --mode tcx|clsact` on the xbr lab's grown bridge. The last
/// attach of a round leaves xbr attached for the traffic that follows.
fn attach_sample(
    worlds: &mut Worlds,
    round: u32,
    workload: Workload,
    settings: &Settings,
    progress: &Progress,
) -> anyhow::Result<Sample> {
    let mode = match workload {
        Workload::AttachTcx => "tcx",
        _ => "clsact",
    };
    progress.set(&format!(
        "round {round}: xbr attach --mode {mode} ({} endpoints)",
        settings.scale_endpoints
    ));
    worlds.detach_xbr()?;
    let took = worlds.attach(mode)?;
    let sample = Sample {
        round,
        endpoints: settings.scale_endpoints,
        config: Config::Xbr.name().to_owned(),
        workload: workload.id().to_owned(),
        metrics: [("ms".to_owned(), took.as_secs_f64() * 1e3)].into(),
        details: json!({ "mode": mode, "ports": settings.scale_endpoints }),
    };
    progress.done(&sample);
    Ok(sample)
}

/// ns per run of xbr's tc program over one UDP 64 B run, from the kernel's BPF run-time
/// statistics (on only for this run: they cost two clock reads per program run).
fn profile(worlds: &Worlds, load: &Load, interrupt: &Interrupt) -> anyhow::Result<Value> {
    let pins = worlds
        .pins
        .clone()
        .context("`xbr attach` reported no pin directory")?;
    let stats = BpfStats::enable()?;
    let before = host::program_runs(&pins)?;
    let measured = workloads::run(Workload::UdpPps, worlds.get(Config::Xbr), load, interrupt)?;
    let after = host::program_runs(&pins)?;
    drop(stats);
    let runs = after.run_cnt.saturating_sub(before.run_cnt);
    let run_time_ns = after.run_time_ns.saturating_sub(before.run_time_ns);
    anyhow::ensure!(runs > 0, "xbr's program did not run during the profile");
    Ok(json!({
        "workload": Workload::UdpPps.id(),
        "run_cnt": runs,
        "run_time_ns": run_time_ns,
        "ns_per_run": run_time_ns as f64 / runs as f64,
        "kpps": measured.metrics.get("kpps"),
    }))
}

/// The progress bar on a terminal; plain lines, one per run, anywhere else (a log, CI).
struct Progress {
    bar: ProgressBar,
}

impl Progress {
    fn new(steps: u64) -> Progress {
        let bar = ProgressBar::new(steps);
        bar.set_style(
            ProgressStyle::with_template("   [{elapsed_precise}] {bar:30} {pos}/{len} {msg}")
                .expect("the template is valid"),
        );
        bar.enable_steady_tick(Duration::from_millis(250));
        Progress { bar }
    }

    /// A line above the bar (or in the log).
    fn say(&self, line: &str) {
        self.bar.suspend(|| println!("{line}"));
    }

    fn set(&self, what: &str) {
        self.bar.set_message(what.to_owned());
    }

    fn step(&self, what: &str) {
        self.set(what);
        if self.bar.is_hidden() {
            self.say(&format!("   {what}"));
        }
        self.bar.inc(1);
    }

    fn done(&self, sample: &Sample) {
        if self.bar.is_hidden() {
            let metrics: Vec<String> = sample
                .metrics
                .iter()
                .map(|(key, value)| format!("{key} {}", report::number(*value)))
                .collect();
            self.say(&format!(
                "   round {} {} {} ({} endpoints): {}",
                sample.round,
                sample.workload,
                sample.config,
                sample.endpoints,
                metrics.join(", ")
            ));
        }
        self.bar.inc(1);
    }

    fn finish(&self, what: &str) {
        self.bar.finish_with_message(what.to_owned());
        if self.bar.is_hidden() {
            self.say(&format!("   {what}"));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Enough idle containers to exercise the scale rounds, few enough for the suite.
    const TEST_SCALE_ENDPOINTS: usize = 100;

    /// Every configuration x workload is in the summary, every number finite and positive.
    fn check_well_formed(report: &Value, settings: &Settings) -> Result<(), String> {
        let summary = report["summary"].as_array().ok_or("no summary array")?;
        let samples = report["samples"].as_array().ok_or("no samples array")?;
        let positive = |what: String, value: &Value| -> Result<(), String> {
            match value.as_f64() {
                Some(number) if number.is_finite() && number > 0.0 => Ok(()),
                _ => Err(format!(
                    "{what} is {value}, expected a finite positive number"
                )),
            }
        };
        let mut expected = Vec::new();
        for workload in Workload::TRAFFIC
            .into_iter()
            .chain(Workload::PUBLISHED)
            .chain(Workload::HOST)
            .chain(Workload::EGRESS)
            .chain(Workload::OVERLAY)
        {
            expected.push((settings.endpoints, workload));
        }
        for workload in Workload::SCALE.into_iter().chain(Workload::ATTACH) {
            expected.push((settings.scale_endpoints, workload));
        }
        for (endpoints, workload) in expected {
            let configs: &[Config] = if workload.xbr_only() {
                &[Config::Xbr]
            } else {
                results::configs(workload)
            };
            for config in configs {
                for metric in workload.metrics() {
                    let what = format!(
                        "{} / {} / {} at {endpoints} endpoints",
                        workload.id(),
                        metric.key,
                        config.name()
                    );
                    let row = summary
                        .iter()
                        .find(|row| {
                            row["endpoints"].as_u64() == Some(endpoints as u64)
                                && row["workload"] == workload.id()
                                && row["metric"] == metric.key
                                && row["config"] == config.name()
                        })
                        .ok_or_else(|| format!("the summary has no row for {what}"))?;
                    for field in ["median", "min", "max"] {
                        positive(format!("{field} of {what}"), &row[field])?;
                    }
                    if !workload.xbr_only() {
                        for reference in results::references(workload) {
                            let field = results::ratio_field(*reference);
                            positive(format!("{field} of {what}"), &row[field])?;
                        }
                    }
                }
            }
        }
        for sample in samples {
            let config = Config::ALL
                .into_iter()
                .find(|config| sample["config"] == config.name())
                .ok_or_else(|| format!("a sample of no configuration: {sample}"))?;
            let traffic = !Workload::ATTACH
                .iter()
                .any(|workload| sample["workload"] == workload.id());
            if config.path_checked() && traffic && !sample["details"]["path"].is_object() {
                return Err(format!("a sample without its path check: {sample}"));
            }
            let metrics = sample["metrics"]
                .as_object()
                .ok_or("a sample without metrics")?;
            for (key, value) in metrics {
                positive(format!("sample {} / {key}", sample["workload"]), value)?;
            }
        }
        Ok(())
    }

    /// The quick bench, in-process, on namespaces named after this process: it must produce
    /// a well-formed report and leave nothing behind. Never a speed assertion.
    #[test]
    fn quick_bench_writes_a_well_formed_report() {
        if !cmd::is_root() {
            xbr_tests::skip::skip(
                "quick_bench_writes_a_well_formed_report",
                "the quick bench needs root (network namespaces, BPF)",
            );
            return;
        }
        let xbr = build::release_binary().expect("building the xbr binary for the quick bench");
        let flood = build::flood_binary().expect("building the syn-flood binary");
        let client = build::xtask_binary().expect("building xtask, the host client");
        let interrupt = Interrupt::install().expect("installing the Ctrl-C handler");
        let prefix = format!("xbt{}", std::process::id() % 100_000);
        let dir = cmd::target_dir().join(format!("bench-test-{prefix}"));
        let args = Args {
            quick: true,
            rounds: None,
            seconds: None,
            scale_endpoints: TEST_SCALE_ENDPOINTS,
            cpu_kpps: 20,
            flood_kpps: 25,
            workloads: Vec::new(),
            out_dir: Some(dir.clone()),
            xbr: None,
            from: None,
        };
        let settings = Settings::new(&args);
        let measured = measure(
            &settings,
            (&xbr, &flood, &client),
            &prefix,
            &dir.join("labs"),
            &About {
                command: "xtask test: quick bench".to_owned(),
                xbr_source: "the workspace".to_owned(),
            },
            &interrupt,
        );
        let left =
            worlds::namespaces_with_prefix(&format!("{prefix}-")).expect("listing /run/netns");
        let report =
            measured.unwrap_or_else(|error| panic!("the quick bench should run: {error:#}"));
        assert!(
            left.is_empty(),
            "the quick bench should remove its namespaces, left: {left:?}"
        );
        let written = report.write(&dir).expect("writing the report");
        let json: Value = serde_json::from_str(
            &std::fs::read_to_string(&written.json).expect("reading bench.json"),
        )
        .expect("bench.json should be JSON");
        if let Err(problem) = check_well_formed(&json, &settings) {
            panic!("bench.json is not well-formed: {problem}");
        }
        let svg = std::fs::read_to_string(&written.svg).expect("reading bench.svg");
        assert!(
            svg.contains("<svg") && svg.contains("</svg>"),
            "bench.svg should be an SVG document"
        );
        assert!(
            std::fs::read_to_string(&written.markdown)
                .expect("reading bench.md")
                .contains("| workload |"),
            "bench.md should hold the tables"
        );
        std::fs::remove_dir_all(&dir).expect("removing the test's report directory");
    }

    /// An xbr run between containers is a number only when its frames took the fast path.
    #[test]
    fn an_east_west_xbr_run_off_the_fast_path_is_an_error() {
        let before = PathCounters {
            sent: 1000,
            xbr_redirected: 900,
            bridge_forwarded_ipv4: 50,
            ..PathCounters::default()
        };
        let after = |sent: u64, redirected: u64, bridged: u64| PathCounters {
            sent: before.sent + sent,
            xbr_redirected: before.xbr_redirected + redirected,
            bridge_forwarded_ipv4: before.bridge_forwarded_ipv4 + bridged,
            ..PathCounters::default()
        };
        let check = |after: PathCounters| check_path(Config::Xbr, &before, &after, &Ran::default());
        // ARP and a stray frame or two take the bridge: still the fast path.
        let path = check(after(100_000, 99_990, 0)).expect("the fast path");
        assert_eq!(path["xbr_redirected"], 99_990);
        // xbr attached but its program never ran (the bridge carried it all).
        let error = check(after(100_000, 0, 99_990)).unwrap_err().to_string();
        assert!(error.contains("did not take the fast path"), "{error}");
        // One direction on the fast path, the other through the bridge.
        assert!(check(after(100_000, 50_000, 50_000)).is_err());
        // Redirected, yet the bridge forwarded IPv4 too.
        assert!(check(after(100_000, 100_000, 5_000)).is_err());
        // Nothing sent proves nothing.
        assert!(check(after(0, 0, 0)).is_err());
    }

    /// A host client's run is a number only when its connections took the path it is
    /// labelled with: xbr translated every connect() and neither docker-proxy nor the DNAT
    /// rule saw one; docker-proxy accepted each; the DNAT rule counted each.
    #[test]
    fn a_host_client_run_off_its_path_is_an_error() {
        let before = PathCounters {
            dnat_packets: 7,
            host_passive_opens: 100,
            host_connects: 1000,
            ..PathCounters::default()
        };
        let after = |dnat: u64, accepted: u64, translated: u64| PathCounters {
            dnat_packets: before.dnat_packets + dnat,
            host_passive_opens: before.host_passive_opens + accepted,
            host_connects: before.host_connects + translated,
            ..PathCounters::default()
        };
        let ran = Ran {
            completed: 500,
            connections: 500,
        };
        let check = |config: Config, after: PathCounters| check_path(config, &before, &after, &ran);
        let path = check(Config::HostXbr, after(0, 0, 500)).expect("the socket path");
        assert_eq!(path["xbr_host_connects"], 500);
        // The hooks missed the client (not in the cgroup): docker-proxy served it.
        let error = check(Config::HostXbr, after(0, 500, 0))
            .unwrap_err()
            .to_string();
        assert!(error.contains("did not take its own path"), "{error}");
        // Translated, yet the DNAT rule counted some too; or fewer translated than made.
        assert!(check(Config::HostXbr, after(3, 0, 500)).is_err());
        assert!(check(Config::HostXbr, after(0, 0, 499)).is_err());
        assert!(check(Config::HostProxy, after(0, 500, 0)).is_ok());
        assert!(check(Config::HostProxy, after(500, 0, 0)).is_err());
        assert!(check(Config::HostDnat, after(500, 0, 0)).is_ok());
        assert!(check(Config::HostDnat, after(0, 500, 0)).is_err());
        assert!(check(Config::HostLimit, after(0, 0, 0)).is_ok());
        assert!(check(Config::HostLimit, after(0, 500, 0)).is_err());
        // Nothing made proves nothing.
        let none = Ran::default();
        assert!(check_path(Config::HostXbr, &before, &after(0, 0, 0), &none).is_err());
    }

    /// An egress run is a number only when the path it is labelled with carried it: in
    /// egress-xbr xbr translated every frame both ways and the kernel forwarded none (a run
    /// the kernel carried fails), in egress-docker-like the kernel forwarded them and
    /// MASQUERADE translated each connection, in egress-limit the kernel forwarded them
    /// without conntrack.
    #[test]
    fn an_egress_run_off_its_path_is_an_error() {
        let before = PathCounters {
            egress_sent: 500,
            egress_replies: 400,
            forwarded: 3000,
            masqueraded: 10,
            conntrack_entries: 5,
            xbr_egress_out: 70,
            xbr_egress_in: 60,
            ..PathCounters::default()
        };
        struct Grown {
            sent: u64,
            replies: u64,
            forwarded: u64,
            masqueraded: u64,
            conntrack: u64,
            out: u64,
            back: u64,
        }
        let after = |g: Grown| PathCounters {
            egress_sent: before.egress_sent + g.sent,
            egress_replies: before.egress_replies + g.replies,
            forwarded: before.forwarded + g.forwarded,
            masqueraded: before.masqueraded + g.masqueraded,
            conntrack_entries: before.conntrack_entries + g.conntrack,
            xbr_egress_out: before.xbr_egress_out + g.out,
            xbr_egress_in: before.xbr_egress_in + g.back,
            ..PathCounters::default()
        };
        let connections = Ran {
            completed: 5000,
            connections: 0,
        };
        let check =
            |config: Config, grown: Grown| check_path(config, &before, &after(grown), &connections);
        // 5000 connections, 5 frames each way, on xbr's path: a few ARP frames aside.
        let xbr = || Grown {
            sent: 25_010,
            replies: 25_005,
            forwarded: 0,
            masqueraded: 0,
            conntrack: 0,
            out: 25_000,
            back: 25_000,
        };
        let path = check(Config::EgressXbr, xbr()).expect("xbr's path");
        assert_eq!(path["xbr_egress_out"], 25_000);
        // The same run carried by the kernel (a MASQUERADE rule left behind, xbr not on the
        // uplink): forwarded, tracked and masqueraded, xbr's verdicts idle.
        let kernel = || Grown {
            sent: 25_010,
            replies: 25_005,
            forwarded: 50_000,
            masqueraded: 5000,
            conntrack: 5000,
            out: 0,
            back: 0,
        };
        let error = check(Config::EgressXbr, kernel()).unwrap_err().to_string();
        assert!(error.contains("did not take its own path"), "{error}");
        // Out through xbr, the replies through the kernel; or a conntrack entry per
        // connection though xbr counted everything.
        assert!(
            check(
                Config::EgressXbr,
                Grown {
                    back: 0,
                    forwarded: 25_005,
                    ..xbr()
                }
            )
            .is_err()
        );
        assert!(
            check(
                Config::EgressXbr,
                Grown {
                    conntrack: 5000,
                    ..xbr()
                }
            )
            .is_err()
        );
        assert!(
            check(
                Config::EgressXbr,
                Grown {
                    masqueraded: 1,
                    ..xbr()
                }
            )
            .is_err()
        );
        // Flows xbr left to the kernel path (no free port): within slack, recorded; beyond
        // it, not xbr's path.
        let leaked = |left: u64| {
            let mut after = after(xbr());
            after.xbr_egress_kernel = before.xbr_egress_kernel + left;
            check_path(Config::EgressXbr, &before, &after, &connections)
        };
        assert_eq!(
            leaked(2).expect("two frames are slack")["xbr_egress_kernel"],
            2
        );
        assert!(leaked(5000).is_err());
        // Docker's way: the kernel's path is right there, xbr's is not.
        assert!(check(Config::EgressDocker, kernel()).is_ok());
        assert!(check(Config::EgressDocker, xbr()).is_err());
        // Fewer masqueraded than connections: some went another way.
        assert!(
            check(
                Config::EgressDocker,
                Grown {
                    masqueraded: 10,
                    ..kernel()
                }
            )
            .is_err()
        );
        // The limit forwards without NAT or conntrack.
        let limit = Grown {
            masqueraded: 0,
            conntrack: 0,
            ..kernel()
        };
        assert!(check(Config::EgressLimit, limit).is_ok());
        assert!(check(Config::EgressLimit, kernel()).is_err());
        // Nothing sent proves nothing.
        let idle = Grown {
            sent: 0,
            replies: 0,
            forwarded: 0,
            masqueraded: 0,
            conntrack: 0,
            out: 0,
            back: 0,
        };
        assert!(check(Config::EgressXbr, idle).is_err());
    }

    /// An overlay run is a number only when its path carried it: in overlay-xbr, xbr's vxlan0
    /// port in each overlay namespace sent every frame of the local container to the other
    /// node and redirected every frame from it into the container, and neither br0 forwarded
    /// IPv4; in overlay-docker-like both br0s forwarded every frame; in every world the
    /// underlays carried them.
    #[test]
    fn an_overlay_run_off_its_path_is_an_error() {
        let before = PathCounters {
            overlay_sent: [100, 200],
            overlay_underlay: [110, 210],
            overlay_bridged: [5, 6],
            overlay_tunnelled: [70, 80],
            overlay_arrived: [60, 50],
            ..PathCounters::default()
        };
        let after = |sent: [u64; 2], underlay: [u64; 2], bridged: [u64; 2], xbr: [u64; 2]| {
            let add = |base: [u64; 2], grown: [u64; 2]| [base[0] + grown[0], base[1] + grown[1]];
            PathCounters {
                overlay_sent: add(before.overlay_sent, sent),
                overlay_underlay: add(before.overlay_underlay, underlay),
                overlay_bridged: add(before.overlay_bridged, bridged),
                // Node 1's vxlan0 sends node 1's frames and takes in node 2's.
                overlay_tunnelled: add(before.overlay_tunnelled, xbr),
                overlay_arrived: add(before.overlay_arrived, [xbr[1], xbr[0]]),
                ..PathCounters::default()
            }
        };
        let check = |config: Config, after: PathCounters| {
            check_path(config, &before, &after, &Ran::default())
        };
        let sent = [50_000, 30_000];
        // xbr's path: a few ARP frames bridged, the rest tunnelled both ways.
        let path = check(Config::OverlayXbr, after(sent, sent, [4, 4], sent)).expect("xbr's path");
        assert_eq!(path["xbr_vxlan0_delivered"], json!([50_000, 30_000]));
        // The bridge carried it (xbr not attached in one namespace, or stale endpoints).
        let error = check(
            Config::OverlayXbr,
            after(sent, sent, [80_000, 80_000], [0, 0]),
        )
        .unwrap_err()
        .to_string();
        assert!(error.contains("did not take its own path"), "{error}");
        // Out of vxlan0 on node 1, through br0 on node 2.
        assert!(
            check(
                Config::OverlayXbr,
                after(sent, sent, [4, 80_000], [50_000, 0])
            )
            .is_err()
        );
        // Docker's path: both bridges forwarded both directions.
        let bridged = [80_000, 80_000];
        assert!(check(Config::OverlayDocker, after(sent, sent, bridged, [0, 0])).is_ok());
        assert!(check(Config::OverlayDocker, after(sent, sent, [4, 4], sent)).is_err());
        // The underlay must carry it in every world; the limit has nothing else to show.
        assert!(check(Config::OverlayLimit, after(sent, sent, [0, 0], [0, 0])).is_ok());
        assert!(check(Config::OverlayLimit, after(sent, [0, 0], [0, 0], [0, 0])).is_err());
        assert!(
            check(
                Config::OverlayDocker,
                after(sent, [50_000, 0], bridged, [0, 0])
            )
            .is_err()
        );
        // Nothing sent proves nothing.
        assert!(check(Config::OverlayLimit, after([0, 0], [0, 0], [0, 0], [0, 0])).is_err());
    }

    #[test]
    fn quick_settings_are_one_short_round() {
        let args = Args {
            quick: true,
            rounds: None,
            seconds: None,
            scale_endpoints: 1000,
            cpu_kpps: 20,
            flood_kpps: 25,
            workloads: Vec::new(),
            out_dir: None,
            xbr: None,
            from: None,
        };
        let settings = Settings::new(&args);
        assert_eq!(
            (settings.rounds, settings.seconds, settings.cpu_pps),
            (1, 1, 20_000)
        );
        let full = Settings::new(&Args {
            quick: false,
            ..args
        });
        assert_eq!((full.rounds, full.seconds), (5, 3));
    }
}
