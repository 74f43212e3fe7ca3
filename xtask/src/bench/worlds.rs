//! The worlds the bench compares, all built before the first round so that rounds can
//! interleave them without rebuilding: `limit`, a veth pair without a bridge, and three labs
//! from the lab builder (`xbr lab up`) - a plain bridge, Docker's netfilter setup, and that
//! setup with xbr attached. Everything made here is removed again on every way out.

use std::io::Write as _;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context as _, bail};
use serde_json::Value;

use crate::cmd;
use crate::demo::processes::{Interrupt, Processes, run_captured};

/// The bridge of every lab, in the lab's `-host` namespace.
pub const BRIDGE: &str = "br0";
/// Containers `a` (client) and `b` (server) carry the traffic; the others are idle endpoints.
const CLIENT: &str = "a";
const SERVER: &str = "b";
const CLIENT_IP: &str = "10.77.0.2";
pub const SERVER_IP: &str = "10.77.0.3";
/// A /16, so that 1000 containers fit in one subnet as on a large Docker network.
const PREFIX_LEN: u8 = 16;
const SUBNET: &str = "10.77.0.0/16";
const BRIDGE_ADDRESS: &str = "10.77.0.1/16";
/// Host part of the first idle container; a and b are .2 and .3, the bridge .1.
const FIRST_IDLE: usize = 4;

pub const IPERF3_PORT: u16 = 5201;
pub const SOCKPERF_UDP_PORT: u16 = 11111;
pub const SOCKPERF_TCP_PORT: u16 = 11112;
/// From a server starting to its socket listening: milliseconds, unless the machine is busy.
const SERVER_START: Duration = Duration::from_secs(10);

/// br_netfilter's switches, per network namespace since Linux 5.3.
const BR_NETFILTER_SYSCTLS: [&str; 3] = [
    "net.bridge.bridge-nf-call-iptables",
    "net.bridge.bridge-nf-call-ip6tables",
    "net.bridge.bridge-nf-call-arptables",
];

/// What traffic between two containers crosses. North-south configurations (iptables DNAT,
/// docker-proxy, xbr NAT for published ports) join this list with the NAT issue; a world
/// for them adds an outside namespace (the lab's `[uplink]`) and a client there.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Config {
    Limit,
    Bridge,
    DockerLike,
    Xbr,
}

impl Config {
    /// In the order every round runs them, and the tables list them.
    pub const ALL: [Config; 4] = [
        Config::Limit,
        Config::Bridge,
        Config::DockerLike,
        Config::Xbr,
    ];

    pub fn name(self) -> &'static str {
        match self {
            Config::Limit => "limit",
            Config::Bridge => "bridge",
            Config::DockerLike => "docker-like",
            Config::Xbr => "xbr",
        }
    }

    pub fn describe(self) -> &'static str {
        match self {
            Config::Limit => "a direct veth pair between two namespaces, no bridge",
            Config::Bridge => "a plain Linux bridge (br_netfilter off in its namespace)",
            Config::DockerLike => {
                "the bridge with Docker's netfilter setup: br_netfilter on, FORWARD policy DROP \
                 with conntrack RELATED,ESTABLISHED accept, intra-bridge accept, MASQUERADE"
            }
            Config::Xbr => "docker-like after `xbr attach br0`",
        }
    }

    /// The lab's name suffix; `limit` is no lab.
    fn lab_suffix(self) -> Option<&'static str> {
        match self {
            Config::Limit => None,
            Config::Bridge => Some("bridge"),
            Config::DockerLike => Some("docker"),
            Config::Xbr => Some("xbr"),
        }
    }
}

/// One configuration, ready for traffic from its client to its server.
pub struct World {
    pub config: Config,
    pub client_netns: String,
    pub server_netns: String,
    /// The namespace holding the bridge; None for `limit`.
    pub host_netns: Option<String>,
    lab: Option<Lab>,
    servers: Servers,
}

struct Lab {
    name: String,
    file: PathBuf,
}

/// Pids of the servers in the world's server namespace, running from build to teardown.
#[derive(Default)]
struct Servers {
    iperf3: Option<u32>,
    sockperf_udp: Option<u32>,
    sockperf_tcp: Option<u32>,
}

impl World {
    /// The iperf3 server, whose /proc/PID/net shows the server namespace's counters.
    pub fn iperf3_server(&self) -> anyhow::Result<u32> {
        self.servers
            .iperf3
            .with_context(|| format!("the iperf3 server of {} is not running", self.config.name()))
    }
}

/// Which CPUs the traffic's two ends run on: pinned, so that every configuration sees the same
/// placement; None on a one-CPU machine.
#[derive(Clone, Copy, Debug)]
pub struct Placement {
    pub client_cpu: Option<usize>,
    pub server_cpu: Option<usize>,
}

/// The nice value of every traffic process: other load on a shared machine (a build, say)
/// then preempts the traffic far less, and disturbs the comparison less.
const TRAFFIC_NICE: &str = "-20";

/// PROGRAM in NETNS at nice -20, pinned to CPU when given (nsenter, nice and taskset each
/// exec the next, so the pid is PROGRAM's).
pub fn on_cpu(netns: &str, cpu: Option<usize>, program: &str) -> Command {
    let mut command = cmd::in_netns(netns, "nice");
    command.args(["-n", TRAFFIC_NICE]);
    if let Some(cpu) = cpu {
        command.args(["taskset", "-c", &cpu.to_string()]);
    }
    command.arg(program);
    command
}

/// All worlds of one bench run, and the record of what cleanup must undo.
pub struct Worlds {
    xbr: PathBuf,
    /// Every namespace the bench makes starts with `{prefix}-`.
    prefix: String,
    lab_dir: PathBuf,
    placement: Placement,
    interrupt: Interrupt,
    processes: Processes,
    pub worlds: Vec<World>,
    /// Set before the step that might leave something behind.
    limit_made: bool,
    labs_up: Vec<PathBuf>,
    attached: Option<String>,
    /// Facts about this machine the report should state (e.g. br_netfilter missing).
    pub notes: Vec<String>,
    /// The pin directory `xbr attach --json` reported, for reading the program's stats.
    pub pins: Option<PathBuf>,
}

impl Worlds {
    pub fn new(
        xbr: &Path,
        prefix: &str,
        lab_dir: &Path,
        placement: Placement,
        interrupt: &Interrupt,
    ) -> Worlds {
        Worlds {
            xbr: xbr.to_owned(),
            prefix: prefix.to_owned(),
            lab_dir: lab_dir.to_owned(),
            placement,
            interrupt: interrupt.clone(),
            processes: Processes::default(),
            worlds: Vec::new(),
            limit_made: false,
            labs_up: Vec::new(),
            attached: None,
            notes: Vec::new(),
            pins: None,
        }
    }

    pub fn get(&self, config: Config) -> &World {
        self.worlds
            .iter()
            .find(|world| world.config == config)
            .expect("every configuration has a world once built")
    }

    fn limit_netns(&self) -> [String; 2] {
        [
            format!("{}-limit-{CLIENT}", self.prefix),
            format!("{}-limit-{SERVER}", self.prefix),
        ]
    }

    fn lab_name(&self, config: Config) -> Option<String> {
        config
            .lab_suffix()
            .map(|suffix| format!("{}-{suffix}", self.prefix))
    }

    /// Removes what an earlier, killed run left: namespaces named `{prefix}-*` (detaching xbr
    /// from the xbr lab's bridge first, so no pins stay behind). Returns how many there were.
    pub fn remove_leftovers(&self) -> anyhow::Result<usize> {
        let leftovers = namespaces_with_prefix(&format!("{}-", self.prefix))?;
        if leftovers.is_empty() {
            return Ok(0);
        }
        if let Some(lab) = self.lab_name(Config::Xbr) {
            let host = format!("{lab}-host");
            if leftovers.contains(&host) {
                self.detach(&host)?;
            }
        }
        for netns in &leftovers {
            cmd::run(
                Command::new("ip").args(["netns", "delete", netns]),
                &format!("removing namespace {netns}, left from an earlier bench run"),
            )?;
        }
        Ok(leftovers.len())
    }

    /// Builds every world with ENDPOINTS containers on each bridge, attaches xbr, and starts
    /// the servers. STEP is told what is being built.
    pub fn build(&mut self, endpoints: usize, step: &dyn Fn(&str)) -> anyhow::Result<()> {
        std::fs::create_dir_all(&self.lab_dir)
            .with_context(|| format!("creating {}", self.lab_dir.display()))?;
        for config in Config::ALL {
            self.interrupt.check()?;
            step(&format!("building {}", config.name()));
            let world = match config {
                Config::Limit => self.build_limit()?,
                _ => self.build_lab(config, endpoints)?,
            };
            self.worlds.push(world);
            match config {
                Config::Limit => {}
                Config::Bridge => self.plain_bridge()?,
                Config::DockerLike => self.docker_netfilter(Config::DockerLike)?,
                Config::Xbr => {
                    self.docker_netfilter(Config::Xbr)?;
                    self.attach("auto")?;
                }
            }
            self.start_servers(config)?;
        }
        Ok(())
    }

    fn build_limit(&mut self) -> anyhow::Result<World> {
        let [client, server] = self.limit_netns();
        self.limit_made = true;
        for netns in [&client, &server] {
            cmd::run(
                Command::new("ip").args(["netns", "add", netns]),
                &format!("creating namespace {netns} for `limit`"),
            )?;
        }
        let ip = |netns: &str, args: &[&str], doing: &str| {
            cmd::run(
                Command::new("ip").args(["-n", netns]).args(args),
                &format!("{doing} in {netns} (`limit`)"),
            )
        };
        ip(
            &client,
            &[
                "link",
                "add",
                "eth0",
                "address",
                &mac(2),
                "type",
                "veth",
                "peer",
                "name",
                "eth0",
                "address",
                &mac(3),
                "netns",
                &server,
            ],
            "creating the veth pair",
        )?;
        for (netns, address) in [(&client, CLIENT_IP), (&server, SERVER_IP)] {
            let cidr = format!("{address}/{PREFIX_LEN}");
            ip(
                netns,
                &["addr", "add", &cidr, "dev", "eth0"],
                "adding an address",
            )?;
            ip(netns, &["link", "set", "eth0", "up"], "setting eth0 up")?;
            ip(netns, &["link", "set", "lo", "up"], "setting lo up")?;
        }
        Ok(World {
            config: Config::Limit,
            client_netns: client,
            server_netns: server,
            host_netns: None,
            lab: None,
            servers: Servers::default(),
        })
    }

    fn build_lab(&mut self, config: Config, endpoints: usize) -> anyhow::Result<World> {
        let name = self.lab_name(config).expect("labs have names");
        let file = self.lab_dir.join(format!("{name}.toml"));
        write_lab_file(&file, &name, endpoints)?;
        self.labs_up.push(file.clone());
        self.xbr(&["lab", "up", &file.display().to_string()])?;
        Ok(World {
            config,
            client_netns: format!("{name}-{CLIENT}"),
            server_netns: format!("{name}-{SERVER}"),
            host_netns: Some(format!("{name}-host")),
            lab: Some(Lab { name, file }),
            servers: Servers::default(),
        })
    }

    /// Adds idle containers to every lab until each bridge has ENDPOINTS; `xbr lab up`
    /// completes what exists. xbr's new ports are attached by the next `attach`.
    pub fn grow(&mut self, endpoints: usize, step: &dyn Fn(&str)) -> anyhow::Result<()> {
        for index in 0..self.worlds.len() {
            self.interrupt.check()?;
            let world = &self.worlds[index];
            let Some(lab) = &world.lab else { continue };
            step(&format!(
                "growing {} to {endpoints} endpoints",
                world.config.name()
            ));
            write_lab_file(&lab.file, &lab.name, endpoints)?;
            let file = lab.file.display().to_string();
            self.xbr(&["lab", "up", &file])?;
        }
        Ok(())
    }

    /// A plain bridge: br_netfilter is built into this kernel and on by default in every
    /// namespace that has a bridge, so it is switched off explicitly.
    fn plain_bridge(&mut self) -> anyhow::Result<()> {
        let host = self.host(Config::Bridge);
        if !self.br_netfilter_present(&host)? {
            return Ok(());
        }
        for sysctl in BR_NETFILTER_SYSCTLS {
            set_sysctl(&host, sysctl, "0")?;
        }
        Ok(())
    }

    /// What dockerd 20.10 sets up for one bridge network (its chains and rules, with br0 for
    /// docker0), plus br_netfilter on and IPv4 forwarding, as dockerd does.
    fn docker_netfilter(&mut self, config: Config) -> anyhow::Result<()> {
        let host = self.host(config);
        if self.br_netfilter_present(&host)? {
            for sysctl in &BR_NETFILTER_SYSCTLS[..2] {
                set_sysctl(&host, sysctl, "1")?;
            }
        }
        set_sysctl(&host, "net.ipv4.ip_forward", "1")?;
        let doing = format!("installing Docker's iptables rules in {host}");
        let mut restore = cmd::in_netns(&host, "iptables-restore");
        restore
            .stdin(Stdio::piped())
            .stdout(Stdio::null())
            .stderr(Stdio::piped());
        let mut child = restore
            .spawn()
            .with_context(|| format!("{doing}: cannot start `{}`", cmd::show(&restore)))?;
        child
            .stdin
            .take()
            .context("iptables-restore's stdin")?
            .write_all(docker_ruleset(BRIDGE).as_bytes())
            .with_context(|| format!("{doing}: writing the rules"))?;
        let output = child
            .wait_with_output()
            .with_context(|| format!("{doing}: waiting for iptables-restore"))?;
        if !output.status.success() {
            bail!(
                "{doing}: iptables-restore failed ({}): {}",
                output.status,
                String::from_utf8_lossy(&output.stderr).trim()
            );
        }
        Ok(())
    }

    fn br_netfilter_present(&mut self, host: &str) -> anyhow::Result<bool> {
        let present =
            cmd::succeeds(cmd::in_netns(host, "sysctl").args(["-n", BR_NETFILTER_SYSCTLS[0]]));
        if !present {
            let note = format!(
                "br_netfilter is not available (no {} in the lab's namespace): docker-like and \
                 xbr run without it, and bridged traffic skips iptables",
                BR_NETFILTER_SYSCTLS[0]
            );
            if !self.notes.contains(&note) {
                self.notes.push(note);
            }
        }
        Ok(present)
    }

    fn host(&self, config: Config) -> String {
        self.get(config)
            .host_netns
            .clone()
            .expect("lab worlds have a host namespace")
    }

    /// `xbr -n HOST attach br0 --mode MODE` on the xbr lab; returns how long it took.
    pub fn attach(&mut self, mode: &str) -> anyhow::Result<Duration> {
        let host = self.host(Config::Xbr);
        self.attached = Some(host.clone());
        let started = Instant::now();
        let printed = self.xbr(&["-n", &host, "attach", BRIDGE, "--mode", mode, "--json"])?;
        let took = started.elapsed();
        let attached: Value = serde_json::from_str(&printed)
            .with_context(|| format!("`xbr attach --json` printed no JSON: {printed}"))?;
        self.pins = attached["pins"].as_str().map(PathBuf::from);
        Ok(took)
    }

    /// `xbr -n HOST detach br0` on the xbr lab; a bridge that is not attached is fine.
    pub fn detach_xbr(&mut self) -> anyhow::Result<()> {
        let host = self.host(Config::Xbr);
        self.detach(&host)?;
        self.attached = None;
        Ok(())
    }

    fn detach(&self, host: &str) -> anyhow::Result<()> {
        let output = Command::new(&self.xbr)
            .args(["-n", host, "detach", BRIDGE])
            .stdin(Stdio::null())
            .output()
            .with_context(|| format!("running {}", self.xbr.display()))?;
        let stderr = String::from_utf8_lossy(&output.stderr);
        if !output.status.success() && !stderr.contains("not attached") {
            bail!("`xbr -n {host} detach {BRIDGE}` failed: {}", stderr.trim());
        }
        Ok(())
    }

    /// `xbr -n HOST stats --json` on the xbr lab.
    pub fn xbr_stats(&self) -> anyhow::Result<Value> {
        let host = self.host(Config::Xbr);
        let printed = self.xbr(&["-n", &host, "stats", BRIDGE, "--json"])?;
        serde_json::from_str(&printed).context("`xbr stats --json` printed no JSON")
    }

    fn xbr(&self, args: &[&str]) -> anyhow::Result<String> {
        self.interrupt.check()?;
        let doing = format!("running `xbr {}`", args.join(" "));
        let mut command = Command::new(&self.xbr);
        command.args(args);
        let captured = run_captured(
            &mut command,
            &doing,
            Duration::from_secs(600),
            &self.interrupt,
        )?;
        if !captured.status.success() {
            bail!(
                "{doing}: failed ({}): {}",
                captured.status,
                captured.stderr.trim()
            );
        }
        Ok(captured.stdout)
    }

    /// The iperf3 and sockperf servers of CONFIG's world, pinned to the server CPU.
    pub fn start_servers(&mut self, config: Config) -> anyhow::Result<()> {
        let index = self
            .worlds
            .iter()
            .position(|world| world.config == config)
            .expect("the world is built");
        let netns = self.worlds[index].server_netns.clone();
        let cpu = self.placement.server_cpu;
        let name = config.name();
        let port = IPERF3_PORT.to_string();
        let iperf3 = self.start_server(
            &format!("the iperf3 server of {name}"),
            on_cpu(&netns, cpu, "iperf3").args(["-s", "-B", SERVER_IP, "-p", &port]),
            &netns,
            "tcp",
            IPERF3_PORT,
        )?;
        self.worlds[index].servers.iperf3 = Some(iperf3);
        let mut sockperf_pids = Vec::new();
        for (proto, port) in [("udp", SOCKPERF_UDP_PORT), ("tcp", SOCKPERF_TCP_PORT)] {
            let port_text = port.to_string();
            let mut command = on_cpu(&netns, cpu, "sockperf");
            command.args(["server", "-i", SERVER_IP, "-p", &port_text]);
            if proto == "tcp" {
                command.arg("--tcp");
            }
            let what = format!("the sockperf {proto} server of {name}");
            sockperf_pids.push(self.start_server(&what, &mut command, &netns, proto, port)?);
        }
        self.worlds[index].servers.sockperf_udp = Some(sockperf_pids[0]);
        self.worlds[index].servers.sockperf_tcp = Some(sockperf_pids[1]);
        Ok(())
    }

    /// Stops and starts CONFIG's servers: after a failed run, a server may be stuck in it.
    pub fn restart_servers(&mut self, config: Config) -> anyhow::Result<()> {
        let index = self
            .worlds
            .iter()
            .position(|world| world.config == config)
            .expect("the world is built");
        let servers = std::mem::take(&mut self.worlds[index].servers);
        for pid in [servers.iperf3, servers.sockperf_udp, servers.sockperf_tcp]
            .into_iter()
            .flatten()
        {
            self.processes.kill(pid);
        }
        self.start_servers(config)
    }

    fn start_server(
        &mut self,
        what: &str,
        command: &mut Command,
        netns: &str,
        proto: &str,
        port: u16,
    ) -> anyhow::Result<u32> {
        let pid = self.processes.start(what, command)?;
        let flag = if proto == "tcp" { "-Hltn" } else { "-Hlun" };
        let sport = format!(":{port}");
        let deadline = Instant::now() + SERVER_START;
        loop {
            self.interrupt
                .check()
                .with_context(|| format!("starting {what}"))?;
            if let Some((status, stderr)) = self.processes.exited(pid)? {
                bail!(
                    "{what} exited before it listened ({status}): {}",
                    stderr.trim()
                );
            }
            let listening = cmd::output(
                cmd::in_netns(netns, "ss").args([flag, "sport", "=", &sport]),
                &format!("checking whether {what} listens"),
            )?;
            if !listening.trim().is_empty() {
                return Ok(pid);
            }
            if Instant::now() > deadline {
                bail!(
                    "{what} (pid {pid}) did not listen on {proto} port {port} within {}s",
                    SERVER_START.as_secs()
                );
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// Stops every server, detaches xbr and removes every namespace, saying what failed.
    pub fn teardown(&mut self) -> anyhow::Result<()> {
        self.processes.kill_all();
        for world in &mut self.worlds {
            world.servers = Servers::default();
        }
        let mut errors = Vec::new();
        if let Some(host) = self.attached.take()
            && let Err(error) = self.detach(&host)
        {
            errors.push(format!("{error:#}"));
        }
        for file in std::mem::take(&mut self.labs_up) {
            // `lab down` detaches xbr too, then deletes the lab's namespaces.
            let output = Command::new(&self.xbr)
                .args(["lab", "down"])
                .arg(&file)
                .stdin(Stdio::null())
                .output();
            match output {
                Ok(output) if output.status.success() => {}
                Ok(output) => errors.push(format!(
                    "`xbr lab down {}` failed: {}",
                    file.display(),
                    String::from_utf8_lossy(&output.stderr).trim()
                )),
                Err(error) => errors.push(format!("cannot run {}: {error}", self.xbr.display())),
            }
        }
        if std::mem::take(&mut self.limit_made) {
            for netns in self.limit_netns() {
                if Path::new("/run/netns").join(&netns).exists()
                    && let Err(error) = cmd::run(
                        Command::new("ip").args(["netns", "delete", &netns]),
                        &format!("removing namespace {netns}"),
                    )
                {
                    errors.push(format!("{error:#}"));
                }
            }
        }
        if !errors.is_empty() {
            bail!(
                "cleaning up: {}; remove what is left with `ip netns delete NAME` (names start \
                 with {}-)",
                errors.join("; "),
                self.prefix
            );
        }
        Ok(())
    }
}

impl Drop for Worlds {
    fn drop(&mut self) {
        if let Err(error) = self.teardown() {
            eprintln!("xtask bench: warning: {error:#}");
        }
    }
}

fn set_sysctl(netns: &str, key: &str, value: &str) -> anyhow::Result<()> {
    cmd::output(
        cmd::in_netns(netns, "sysctl").args(["-q", "-w", &format!("{key}={value}")]),
        &format!("setting {key}={value} in {netns}"),
    )
    .map(|_| ())
}

/// Names in /run/netns starting with PREFIX.
pub fn namespaces_with_prefix(prefix: &str) -> anyhow::Result<Vec<String>> {
    let entries = match std::fs::read_dir("/run/netns") {
        Ok(entries) => entries,
        Err(error) if error.kind() == std::io::ErrorKind::NotFound => return Ok(Vec::new()),
        Err(error) => return Err(error).context("listing /run/netns"),
    };
    let mut names = Vec::new();
    for entry in entries {
        let name = entry.context("listing /run/netns")?.file_name();
        let name = name.to_string_lossy();
        if name.starts_with(prefix) {
            names.push(name.into_owned());
        }
    }
    names.sort();
    Ok(names)
}

/// The container with host part N: 10.77.{N/256}.{N%256}, MAC 02:77:00:00:{N/256}:{N%256}.
fn mac(host_part: usize) -> String {
    format!(
        "02:77:00:00:{:02x}:{:02x}",
        host_part >> 8,
        host_part & 0xff
    )
}

fn address(host_part: usize) -> String {
    format!("10.77.{}.{}/{PREFIX_LEN}", host_part >> 8, host_part & 0xff)
}

/// A lab file for `xbr lab up`: bridge br0, client a, server b, and idle containers up to
/// ENDPOINTS in all.
pub fn lab_toml(name: &str, endpoints: usize) -> String {
    let mut text = format!(
        "# Written by `cargo xtask bench`; `xbr lab down` with this file removes the lab.\n\
         name = \"{name}\"\n\n[bridge]\nname = \"{BRIDGE}\"\naddress = \"{BRIDGE_ADDRESS}\"\n"
    );
    let containers = [(CLIENT.to_owned(), 2), (SERVER.to_owned(), 3)]
        .into_iter()
        .chain((FIRST_IDLE..).map(|n| (format!("e{n:04}"), n)))
        .take(endpoints.max(2));
    for (container, host_part) in containers {
        text.push_str(&format!(
            "\n[[containers]]\nname = \"{container}\"\naddress = \"{}\"\nmac = \"{}\"\n",
            address(host_part),
            mac(host_part)
        ));
    }
    text
}

fn write_lab_file(file: &Path, name: &str, endpoints: usize) -> anyhow::Result<()> {
    std::fs::write(file, lab_toml(name, endpoints))
        .with_context(|| format!("writing the lab file {}", file.display()))
}

/// Docker 20.10's filter and nat rules for one bridge network (docker0 renamed BRIDGE).
fn docker_ruleset(bridge: &str) -> String {
    format!(
        "*filter\n\
         :INPUT ACCEPT [0:0]\n\
         :FORWARD DROP [0:0]\n\
         :OUTPUT ACCEPT [0:0]\n\
         :DOCKER - [0:0]\n\
         :DOCKER-ISOLATION-STAGE-1 - [0:0]\n\
         :DOCKER-ISOLATION-STAGE-2 - [0:0]\n\
         :DOCKER-USER - [0:0]\n\
         -A FORWARD -j DOCKER-USER\n\
         -A FORWARD -j DOCKER-ISOLATION-STAGE-1\n\
         -A FORWARD -o {bridge} -m conntrack --ctstate RELATED,ESTABLISHED -j ACCEPT\n\
         -A FORWARD -o {bridge} -j DOCKER\n\
         -A FORWARD -i {bridge} ! -o {bridge} -j ACCEPT\n\
         -A FORWARD -i {bridge} -o {bridge} -j ACCEPT\n\
         -A DOCKER-ISOLATION-STAGE-1 -i {bridge} ! -o {bridge} -j DOCKER-ISOLATION-STAGE-2\n\
         -A DOCKER-ISOLATION-STAGE-1 -j RETURN\n\
         -A DOCKER-ISOLATION-STAGE-2 -o {bridge} -j DROP\n\
         -A DOCKER-ISOLATION-STAGE-2 -j RETURN\n\
         -A DOCKER-USER -j RETURN\n\
         COMMIT\n\
         *nat\n\
         :PREROUTING ACCEPT [0:0]\n\
         :INPUT ACCEPT [0:0]\n\
         :OUTPUT ACCEPT [0:0]\n\
         :POSTROUTING ACCEPT [0:0]\n\
         :DOCKER - [0:0]\n\
         -A PREROUTING -m addrtype --dst-type LOCAL -j DOCKER\n\
         -A OUTPUT ! -d 127.0.0.0/8 -m addrtype --dst-type LOCAL -j DOCKER\n\
         -A POSTROUTING -s {SUBNET} ! -o {bridge} -j MASQUERADE\n\
         -A DOCKER -i {bridge} -j RETURN\n\
         COMMIT\n"
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lab_files_hold_client_server_and_idle_containers() {
        let text = lab_toml("xb-bridge", 1000);
        let value: toml::Value = toml::from_str(&text).unwrap();
        let containers = value["containers"].as_array().unwrap();
        assert_eq!(containers.len(), 1000);
        assert_eq!(containers[0]["name"].as_str(), Some("a"));
        assert_eq!(containers[1]["address"].as_str(), Some("10.77.0.3/16"));
        let last = &containers[999];
        assert_eq!(last["name"].as_str(), Some("e1001"));
        assert_eq!(last["address"].as_str(), Some("10.77.3.233/16"));
        assert_eq!(last["mac"].as_str(), Some("02:77:00:00:03:e9"));
        let names: std::collections::HashSet<_> = containers
            .iter()
            .map(|c| c["mac"].as_str().unwrap())
            .collect();
        assert_eq!(names.len(), 1000, "MACs are unique");
    }

    #[test]
    fn docker_ruleset_names_the_bridge() {
        let rules = docker_ruleset("br0");
        assert!(rules.contains(":FORWARD DROP"));
        assert!(rules.contains("-A FORWARD -i br0 -o br0 -j ACCEPT"));
        assert!(rules.contains("-A POSTROUTING -s 10.77.0.0/16 ! -o br0 -j MASQUERADE"));
    }
}
