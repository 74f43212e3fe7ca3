//! The worlds the bench compares, all built before the first round so that rounds can
//! interleave them without rebuilding. East-west: `limit`, a veth pair without a bridge, and
//! three labs from the lab builder (`xbr lab up`) - a plain bridge, Docker's netfilter setup,
//! and that setup with xbr attached. Published ports: four labs with an uplink to an outside
//! namespace, where the client connects to the host's port 8080 - served by Docker's DNAT
//! rule, by docker-proxy, by xbr's tc NAT and by its XDP NAT. Host clients of published ports:
//! four more labs where a client in the lab's host namespace connects to 127.0.0.1:8080 -
//! served by docker-proxy, by Docker's DNAT with `--userland-proxy=false`, by xbr's socket
//! hooks (the client in a cgroup the bench makes), or, the limit, dialling the container
//! itself. Egress: a container's connections to a server outside, behind the uplink, which has
//! no route back to the containers - source-NATed by Docker's MASQUERADE (egress-docker-like)
//! or by xbr's datapath with no MASQUERADE rule at all (egress-xbr), against a routed limit
//! without bridge, NAT or netfilter (egress-limit). Across nodes: two node namespaces joined by
//! an underlay veth, with Docker's overlay network between them (an overlay namespace per node
//! with br0 and vxlan0, a container behind a veth: overlay-docker-like, and with xbr attached:
//! overlay-xbr), against the nodes' own VXLAN devices (overlay-limit). Everything made here is
//! removed again on every way out.

use std::net::{Ipv4Addr, SocketAddr};
use std::os::unix::process::CommandExt as _;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context as _, bail};
use serde_json::Value;

use super::host;
use super::peer::EchoServer;
use crate::cmd;
use crate::cmd::{Interrupt, Processes, run_captured};
use crate::demo::witness::Witness;
use crate::lab::{self, BridgeSpec, ContainerSpec, Ipv4Cidr, LabSpec, MacAddr, UplinkSpec};

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
const BRIDGE_ADDRESS: Ipv4Cidr = Ipv4Cidr::new(Ipv4Addr::new(10, 77, 0, 1), PREFIX_LEN);
/// Host part of the first idle container; a and b are .2 and .3, the bridge .1.
const FIRST_IDLE: usize = 4;

pub const IPERF3_PORT: u16 = 5201;
pub const SOCKPERF_UDP_PORT: u16 = 11111;
pub const SOCKPERF_TCP_PORT: u16 = 11112;

/// The published-port labs: uplink0 in the host namespace, eth0 in the outside namespace
/// (the client's), and the server's port 80 published as the host's port 8080.
pub const UPLINK: &str = "uplink0";
const UPLINK_HOST_IP: Ipv4Addr = Ipv4Addr::new(10, 78, 0, 1);
const UPLINK_HOST_ADDRESS: Ipv4Cidr = Ipv4Cidr::new(UPLINK_HOST_IP, 24);
const OUTSIDE_ADDRESS: Ipv4Cidr = Ipv4Cidr::new(Ipv4Addr::new(10, 78, 0, 2), 24);
const HOST_PORT: u16 = 8080;
const ECHO_PORT: u16 = 80;
/// Connections at a time in the host-client connections workload (and acceptor threads of
/// the host-client labs' echo servers).
pub const HOST_PARALLEL: usize = 4;
/// Where Debian's docker.io installs Docker's userland proxy.
const DOCKER_PROXY: &str = "/usr/sbin/docker-proxy";
/// From a server starting to its socket listening: milliseconds, unless the machine is busy.
const SERVER_START: Duration = Duration::from_secs(10);

/// The overlay worlds: Docker's VXLAN device, its VNI and port (Docker's first overlay
/// network gets VNI 4097), the underlay veth of each node and its address, the overlay's MTU
/// (1500 less VXLAN's 50 bytes), and an address for each node's br0 in the overlay subnet.
const OVERLAY_VXLAN: &str = "vxlan0";
const OVERLAY_VNI: u32 = 4097;
const OVERLAY_PORT: u16 = 4789;
const OVERLAY_MTU: u32 = 1450;
const OVERLAY_UNDERLAY: [&str; 2] = ["und1", "und2"];
const OVERLAY_UNDERLAY_IPS: [&str; 2] = ["10.250.0.1", "10.250.0.2"];
const OVERLAY_BRIDGE_IPS: [&str; 2] = ["10.251.0.251", "10.251.0.252"];

/// The overlay endpoint of node N (0, 1): the client's 10.251.0.2, the server's .3.
fn overlay_ip(node: usize) -> Ipv4Addr {
    Ipv4Addr::new(10, 251, 0, 2 + node as u8)
}

/// Its MAC, as Docker derives one from the address: 02:42 and the address's four bytes.
fn overlay_mac(node: usize) -> MacAddr {
    let [a, b, c, d] = overlay_ip(node).octets();
    MacAddr([0x02, 0x42, a, b, c, d])
}

/// The namespaces of one overlay world (`Worlds::overlay_names`).
pub struct OverlayNames {
    pub nodes: [String; 2],
    pub overlays: [String; 2],
    pub containers: [String; 2],
}

/// br_netfilter's switches, per network namespace since Linux 5.3.
const BR_NETFILTER_SYSCTLS: [&str; 3] = [
    "net.bridge.bridge-nf-call-iptables",
    "net.bridge.bridge-nf-call-ip6tables",
    "net.bridge.bridge-nf-call-arptables",
];

/// What the traffic crosses: between two containers (east-west), or from outside to a
/// container's published port.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Config {
    Limit,
    Bridge,
    DockerLike,
    Xbr,
    Dnat,
    DockerProxy,
    XbrNat,
    XbrNatXdp,
    HostLimit,
    HostProxy,
    HostDnat,
    HostXbr,
    EgressLimit,
    EgressDocker,
    EgressXbr,
    OverlayLimit,
    OverlayDocker,
    OverlayXbr,
}

impl Config {
    /// East-west, in the order every round runs them, and the tables list them.
    pub const EAST_WEST: [Config; 4] = [
        Config::Limit,
        Config::Bridge,
        Config::DockerLike,
        Config::Xbr,
    ];
    /// Published ports, likewise.
    pub const PUBLISHED: [Config; 4] = [
        Config::Dnat,
        Config::DockerProxy,
        Config::XbrNat,
        Config::XbrNatXdp,
    ];
    /// Host clients of a published port, likewise.
    pub const HOST: [Config; 4] = [
        Config::HostLimit,
        Config::HostProxy,
        Config::HostDnat,
        Config::HostXbr,
    ];
    /// Egress: a container's connections to a server outside, source-NATed to the uplink's
    /// address (the limit routes them, un-NATed, with no netfilter at all).
    pub const EGRESS: [Config; 3] = [Config::EgressLimit, Config::EgressDocker, Config::EgressXbr];
    /// Across nodes: a container on one node to a container on another, over VXLAN (the
    /// limit: the two nodes' own VXLAN devices, no bridge, no container).
    pub const OVERLAY: [Config; 3] = [
        Config::OverlayLimit,
        Config::OverlayDocker,
        Config::OverlayXbr,
    ];
    pub const ALL: [Config; 18] = [
        Config::Limit,
        Config::Bridge,
        Config::DockerLike,
        Config::Xbr,
        Config::Dnat,
        Config::DockerProxy,
        Config::XbrNat,
        Config::XbrNatXdp,
        Config::HostLimit,
        Config::HostProxy,
        Config::HostDnat,
        Config::HostXbr,
        Config::EgressLimit,
        Config::EgressDocker,
        Config::EgressXbr,
        Config::OverlayLimit,
        Config::OverlayDocker,
        Config::OverlayXbr,
    ];

    pub fn name(self) -> &'static str {
        match self {
            Config::Limit => "limit",
            Config::Bridge => "bridge",
            Config::DockerLike => "docker-like",
            Config::Xbr => "xbr",
            Config::Dnat => "dnat",
            Config::DockerProxy => "docker-proxy",
            Config::XbrNat => "xbr-nat",
            Config::XbrNatXdp => "xbr-nat-xdp",
            Config::HostLimit => "host-limit",
            Config::HostProxy => "host-proxy",
            Config::HostDnat => "host-dnat",
            Config::HostXbr => "host-xbr",
            Config::EgressLimit => "egress-limit",
            Config::EgressDocker => "egress-docker-like",
            Config::EgressXbr => "egress-xbr",
            Config::OverlayLimit => "overlay-limit",
            Config::OverlayDocker => "overlay-docker-like",
            Config::OverlayXbr => "overlay-xbr",
        }
    }

    pub fn is_published(self) -> bool {
        Config::PUBLISHED.contains(&self)
    }

    /// A lab whose client is on the host itself (its host namespace).
    pub fn is_host(self) -> bool {
        Config::HOST.contains(&self)
    }

    /// A lab whose client is a container talking to a server outside, behind the uplink.
    pub fn is_egress(self) -> bool {
        Config::EGRESS.contains(&self)
    }

    /// A world of two nodes whose containers talk over VXLAN.
    pub fn is_overlay(self) -> bool {
        Config::OVERLAY.contains(&self)
    }

    /// Whether a run must show, in the counters, that it took the path it measures: every
    /// published port, xbr between containers, and every egress world (which path carried it
    /// is the whole comparison there: the kernel's forwarding, or xbr's), and every overlay
    /// world (the underlay carried it; the bridge or xbr's tunnel fast path, which). (The
    /// bridge's witness is an nftables counter in its forward hook: in the xbr world the fast
    /// path never reaches it, in `bridge` and `docker-like` it would add a rule to the very
    /// path they measure; the overlay worlds have it in both, as their check needs it.)
    pub fn path_checked(self) -> bool {
        self.is_published()
            || self == Config::Xbr
            || self.is_host()
            || self.is_egress()
            || self.is_overlay()
    }

    /// How xbr's uplink is hooked in the configurations that attach it for published ports.
    pub fn uplink_mode(self) -> Option<&'static str> {
        match self {
            Config::XbrNat => Some("tc"),
            Config::XbrNatXdp => Some("xdp"),
            _ => None,
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
            Config::Dnat => {
                "a client outside (behind the lab's uplink) connects to the host's port 8080; \
                 Docker's rules for `-p 8080:80` (DNAT, FORWARD accept) send it to the \
                 container, conntrack tracks every connection"
            }
            Config::DockerProxy => {
                "the same port served by Docker's userland proxy, docker-proxy from docker.io, \
                 in the host namespace: a second connection to the container per connection \
                 (the path of connections the DNAT rule does not catch)"
            }
            Config::XbrNat => {
                "dnat after `xbr attach br0 --uplink uplink0` and `xbr publish br0 \
                 8080:CONTAINER:80`: the uplink's tc program NATs (Docker's rules stay, unused)"
            }
            Config::XbrNatXdp => {
                "xbr-nat with --uplink-mode xdp: the uplink's XDP program NATs; as on a physical \
                 uplink the client sends full checksums (tx offload off), and the container's \
                 eth0 has GRO on (the NAPI an XDP redirect into a veth needs)"
            }
            Config::HostLimit => {
                "a client in the lab's host namespace connects to the container's address \
                 itself (10.77.0.3:80), across the bridge with Docker's netfilter setup: what \
                 any way of serving 127.0.0.1:8080 adds is measured against this"
            }
            Config::HostProxy => {
                "the client connects to 127.0.0.1:8080, published as Docker does with \
                 `-p 127.0.0.1:8080:80` by default: docker-proxy (docker.io's, unpinned) \
                 accepts and opens a second connection to the container"
            }
            Config::HostDnat => {
                "the same with Docker's `--userland-proxy=false`: nat OUTPUT jumps to the \
                 DOCKER chain for 127.0.0.1 too, whose DNAT rule sends the connection to the \
                 container (route_localnet=1 on br0, MASQUERADE of local sources out br0)"
            }
            Config::HostXbr => {
                "host-proxy after `xbr attach br0 --cgroup DIR` and `xbr publish br0 \
                 127.0.0.1:8080:CONTAINER:80`, the client in DIR (a cgroup the bench makes): \
                 its socket is pointed at the container at connect(), docker-proxy stays idle"
            }
            Config::EgressLimit => {
                "a container's veth routed by the host namespace without a bridge (the host's \
                 end has the gateway address), out of the uplink to a server outside that has \
                 a route back to the containers: no NAT, no netfilter, no conntrack"
            }
            Config::EgressDocker => {
                "a container on the bridge with Docker's netfilter setup talks to a server \
                 outside, behind the uplink, which has no route back to the containers: \
                 Docker's MASQUERADE (conntrack) source-NATs it, FORWARD accepts it"
            }
            Config::EgressXbr => {
                "egress-docker-like without the MASQUERADE rule, after `xbr attach br0 --uplink \
                 uplink0 --masquerade`: xbr's datapath source-NATs the container's flows to the \
                 uplink's address, past netfilter and conntrack"
            }
            Config::OverlayLimit => {
                "two node namespaces joined by an underlay veth, each with a VXLAN device of its \
                 own (VNI 4097, port 4789, proxy l2miss l3miss learning, MTU 1450) holding an \
                 overlay address, and static FDB and neighbour entries for the other: node to \
                 node over VXLAN, no bridge, no container"
            }
            Config::OverlayDocker => {
                "Docker's overlay network: per node an overlay namespace with br0 whose ports \
                 are vxlan0 (made in the node's namespace, so its UDP socket stays there) and a \
                 container's veth, the other node's container as permanent FDB and neighbour \
                 entries on vxlan0, br_netfilter on (the kernel's default in a new namespace) \
                 and no iptables rules; container to container across the nodes (an nftables \
                 counter in each br0's forward hook witnesses the bridge)"
            }
            Config::OverlayXbr => {
                "overlay-docker-like after `xbr attach br0` in both overlay namespaces: vxlan0's \
                 static MACs are remote endpoints, so a container's frames go straight out of \
                 vxlan0 and decapsulated ones straight into the container, past br0"
            }
        }
    }

    /// The lab's name suffix; `limit` is no lab.
    fn lab_suffix(self) -> Option<&'static str> {
        match self {
            Config::Limit
            | Config::EgressLimit
            | Config::OverlayLimit
            | Config::OverlayDocker
            | Config::OverlayXbr => None,
            Config::Bridge => Some("bridge"),
            Config::DockerLike => Some("docker"),
            Config::Xbr => Some("xbr"),
            Config::Dnat => Some("dnat"),
            Config::DockerProxy => Some("proxy"),
            Config::XbrNat => Some("nat"),
            Config::XbrNatXdp => Some("natxdp"),
            Config::HostLimit => Some("hlimit"),
            Config::HostProxy => Some("hproxy"),
            Config::HostDnat => Some("hdnat"),
            Config::HostXbr => Some("hxbr"),
            Config::EgressDocker => Some("edocker"),
            Config::EgressXbr => Some("exbr"),
        }
    }
}

/// One configuration, ready for traffic from its client to its server.
pub struct World {
    pub config: Config,
    pub client_netns: String,
    pub server_netns: String,
    /// The namespace holding the bridge (egress-limit: the router); None for `limit`.
    pub host_netns: Option<String>,
    /// The server's address: a container's, or for egress the outside namespace's.
    pub server_ip: Ipv4Addr,
    /// Where the client connects in the published-port worlds: the host's port 8080 (for
    /// host clients 127.0.0.1:8080, or the container in host-limit); in the egress worlds the
    /// echo server outside.
    pub published: Option<SocketAddr>,
    /// The cgroup the host client runs in (host-xbr: the one xbr's socket hooks serve).
    pub cgroup: Option<PathBuf>,
    lab: Option<Lab>,
    servers: Servers,
}

struct Lab {
    name: String,
    file: PathBuf,
}

/// The servers of a world, running from build to teardown: pids of processes in its
/// server namespace, the echo server's thread, docker-proxy in its host namespace.
#[derive(Default)]
struct Servers {
    iperf3: Option<u32>,
    sockperf_udp: Option<u32>,
    sockperf_tcp: Option<u32>,
    echo: Option<EchoServer>,
    docker_proxy: Option<u32>,
}

impl Servers {
    fn pids(&self) -> impl Iterator<Item = u32> {
        [
            self.iperf3,
            self.sockperf_udp,
            self.sockperf_tcp,
            self.docker_proxy,
        ]
        .into_iter()
        .flatten()
    }
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
    /// Client and server of the published-port workloads, both on one CPU. Their
    /// exchanges are one at a time: across two CPUs each would wait for a wake-up of the
    /// other CPU (tens of µs here, alike for every path, and hiding the path); on one CPU a
    /// connection or request costs exactly the CPU time of its path, so the rate is the
    /// inverse of that cost.
    pub published_cpu: Option<usize>,
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
    /// Namespaces made with `ip netns add` (the limits), recorded before they are made.
    netns_made: Vec<String>,
    labs_up: Vec<PathBuf>,
    /// Host namespaces of the labs xbr is attached in.
    attached: Vec<String>,
    /// Facts about this machine the report should state (e.g. br_netfilter missing).
    pub notes: Vec<String>,
    /// The pin directory `xbr attach --json` reported, for reading the program's stats.
    pub pins: Option<PathBuf>,
    /// The cgroup v2 directory made for host-xbr's client; removed at teardown.
    cgroup: Option<PathBuf>,
    /// The bridge's own count of what it forwarded in the xbr world.
    witness: Option<Witness>,
    /// The same in each overlay namespace (node 1's, node 2's) of the overlay worlds.
    overlay_witnesses: Vec<(Config, [Witness; 2])>,
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
            netns_made: Vec::new(),
            labs_up: Vec::new(),
            attached: Vec::new(),
            notes: Vec::new(),
            pins: None,
            witness: None,
            overlay_witnesses: Vec::new(),
            cgroup: None,
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
    /// from the xbr labs' bridges first, so no pins stay behind). Returns how many there were.
    pub fn remove_leftovers(&self) -> anyhow::Result<usize> {
        let leftovers = namespaces_with_prefix(&format!("{}-", self.prefix))?;
        if leftovers.is_empty() {
            return Ok(0);
        }
        for config in [
            Config::Xbr,
            Config::XbrNat,
            Config::XbrNatXdp,
            Config::HostXbr,
            Config::EgressXbr,
        ] {
            let lab = self
                .lab_name(config)
                .expect("xbr's configurations are labs");
            let host = lab::host_netns(&lab);
            if leftovers.contains(&host) {
                self.detach(&host)?;
            }
        }
        for overlay in self.overlay_names(Config::OverlayXbr).overlays {
            if leftovers.contains(&overlay) {
                self.detach(&overlay)?;
            }
        }
        for netns in &leftovers {
            cmd::run(
                Command::new("ip").args(["netns", "delete", netns]),
                &format!("removing namespace {netns}, left from an earlier bench run"),
            )?;
        }
        if let Some(cgroup) = self.host_clients_cgroup()
            && cgroup.exists()
        {
            remove_cgroup(&cgroup)?;
        }
        Ok(leftovers.len())
    }

    /// Builds CONFIGS' worlds (in the order of `Config::ALL`) with ENDPOINTS containers on
    /// each bridge, attaches xbr, publishes the port, and starts the servers. STEP is told what
    /// is being built.
    pub fn build(
        &mut self,
        endpoints: usize,
        configs: &[Config],
        step: &dyn Fn(&str),
    ) -> anyhow::Result<()> {
        std::fs::create_dir_all(&self.lab_dir)
            .with_context(|| format!("creating {}", self.lab_dir.display()))?;
        for config in Config::ALL.into_iter().filter(|c| configs.contains(c)) {
            self.interrupt.check()?;
            step(&format!("building {}", config.name()));
            let world = match config {
                Config::Limit => self.build_limit()?,
                Config::EgressLimit => self.build_egress_limit()?,
                Config::OverlayLimit | Config::OverlayDocker | Config::OverlayXbr => {
                    self.build_overlay(config)?
                }
                _ => self.build_lab(config, endpoints)?,
            };
            self.worlds.push(world);
            match config {
                Config::Limit | Config::EgressLimit | Config::OverlayLimit => {}
                Config::OverlayDocker => self.overlay_witnesses(config)?,
                Config::OverlayXbr => {
                    self.overlay_witnesses(config)?;
                    self.attach_overlay()?;
                }
                Config::EgressDocker => self.docker_netfilter(config)?,
                Config::EgressXbr => {
                    self.docker_netfilter(config)?;
                    self.without_masquerade(config)?;
                    self.attach_masquerade(config)?;
                    self.check_egress_accelerated(config)?;
                }
                Config::Bridge => self.plain_bridge()?,
                Config::DockerLike => self.docker_netfilter(Config::DockerLike)?,
                Config::Xbr => {
                    self.docker_netfilter(Config::Xbr)?;
                    self.witness = Some(Witness::install(&self.host(Config::Xbr))?);
                    self.attach("auto")?;
                }
                Config::Dnat | Config::XbrNat | Config::XbrNatXdp => {
                    self.docker_netfilter(config)?;
                    self.publish_with_dnat(config)?;
                }
                // Docker's base rules; the proxy itself starts with the servers.
                Config::DockerProxy => self.docker_netfilter(config)?,
                Config::HostLimit => self.docker_netfilter(config)?,
                Config::HostProxy => {
                    self.docker_netfilter(config)?;
                    self.publish_on_loopback(config, true)?;
                }
                Config::HostDnat => {
                    self.docker_netfilter(config)?;
                    self.publish_on_loopback(config, false)?;
                }
                // Docker's default (docker-proxy serves the port), then xbr.
                Config::HostXbr => {
                    self.docker_netfilter(config)?;
                    self.publish_on_loopback(config, true)?;
                    self.attach_host_clients()?;
                }
            }
            if config.is_published() {
                self.route_spoofed_sources(config)?;
            }
            if config == Config::HostXbr {
                self.check_host_clients_served()?;
            }
            if config == Config::XbrNatXdp {
                self.xdp_conditions(config)?;
            }
            if let Some(uplink_mode) = config.uplink_mode() {
                self.attach_uplink(config, uplink_mode)?;
            }
            self.start_servers(config)?;
        }
        Ok(())
    }

    /// Whether CONFIG's world was built (`build` builds those of the workloads that run).
    pub fn has(&self, config: Config) -> bool {
        self.worlds.iter().any(|world| world.config == config)
    }

    /// `ip netns add NETNS`, recorded first so that teardown removes it whatever follows.
    fn add_netns(&mut self, netns: &str, config: Config) -> anyhow::Result<()> {
        self.netns_made.push(netns.to_owned());
        cmd::run(
            Command::new("ip").args(["netns", "add", netns]),
            &format!("creating namespace {netns} for `{}`", config.name()),
        )
    }

    fn egress_limit_netns(&self) -> [String; 3] {
        ["a", "host", "out"].map(|part| format!("{}-elimit-{part}", self.prefix))
    }

    /// egress-limit: the container's veth peer in a router namespace, no bridge (its end has
    /// the gateway address, the container's default route points there), the router's uplink0
    /// to eth0 in an outside namespace that routes the containers' subnet back through it.
    /// No NAT, no netfilter rule, no conntrack: the lab builder has no such topology, so it is
    /// made with `ip` like `limit`.
    fn build_egress_limit(&mut self) -> anyhow::Result<World> {
        let config = Config::EgressLimit;
        let [client, host, outside] = self.egress_limit_netns();
        for netns in [&client, &host, &outside] {
            self.add_netns(netns, config)?;
        }
        let ip = |netns: &str, args: &[&str]| {
            cmd::run(
                Command::new("ip").args(["-n", netns]).args(args),
                &format!("`ip {}` in {netns} (`{}`)", args.join(" "), config.name()),
            )
        };
        let client_mac = mac(2).to_string();
        let client_address = format!("{CLIENT_IP}/{PREFIX_LEN}");
        let gateway = BRIDGE_ADDRESS.addr.to_string();
        let gateway_address = BRIDGE_ADDRESS.to_string();
        let uplink_address = UPLINK_HOST_ADDRESS.to_string();
        let outside_address = OUTSIDE_ADDRESS.to_string();
        let uplink_ip = UPLINK_HOST_IP.to_string();
        let steps: [(&str, &[&str]); 15] = [
            (
                &client,
                &[
                    "link",
                    "add",
                    "eth0",
                    "address",
                    &client_mac,
                    "type",
                    "veth",
                    "peer",
                    "name",
                    "veth-a",
                    "netns",
                    &host,
                ],
            ),
            (&client, &["addr", "add", &client_address, "dev", "eth0"]),
            (&client, &["link", "set", "eth0", "up"]),
            (&client, &["link", "set", "lo", "up"]),
            (&client, &["route", "add", "default", "via", &gateway]),
            (&host, &["addr", "add", &gateway_address, "dev", "veth-a"]),
            (&host, &["link", "set", "veth-a", "up"]),
            (&host, &["link", "set", "lo", "up"]),
            (
                &host,
                &[
                    "link", "add", UPLINK, "type", "veth", "peer", "name", "eth0", "netns",
                    &outside,
                ],
            ),
            (&host, &["addr", "add", &uplink_address, "dev", UPLINK]),
            (&host, &["link", "set", UPLINK, "up"]),
            (&outside, &["addr", "add", &outside_address, "dev", "eth0"]),
            (&outside, &["link", "set", "eth0", "up"]),
            (&outside, &["link", "set", "lo", "up"]),
            (&outside, &["route", "add", SUBNET, "via", &uplink_ip]),
        ];
        for (netns, args) in steps {
            ip(netns, args)?;
        }
        set_sysctl(&host, "net.ipv4.ip_forward", "1")?;
        let ruleset = cmd::output(
            cmd::in_netns(&host, "nft").args(["list", "ruleset"]),
            &format!("listing the nftables ruleset of {host}"),
        )?;
        if !ruleset.trim().is_empty() {
            bail!(
                "{host} should have no netfilter rules, it has: {}",
                ruleset.trim()
            );
        }
        Ok(World {
            config,
            client_netns: client,
            server_netns: outside,
            host_netns: Some(host),
            server_ip: OUTSIDE_ADDRESS.addr,
            published: Some(SocketAddr::from((OUTSIDE_ADDRESS.addr, ECHO_PORT))),
            cgroup: None,
            lab: None,
            servers: Servers::default(),
        })
    }

    /// The namespaces of an overlay world: `{prefix}-{tag}-node1` and `-node2` (joined by the
    /// underlay; in the limit each has its VXLAN device), and in the others `-ovl1`/`-ovl2`
    /// (br0 and vxlan0, Docker's overlay namespace) and `-c1`/`-c2` (the containers).
    pub fn overlay_names(&self, config: Config) -> OverlayNames {
        let tag = match config {
            Config::OverlayLimit => "olimit",
            Config::OverlayDocker => "odocker",
            _ => "oxbr",
        };
        let name = |part: &str| format!("{}-{tag}-{part}", self.prefix);
        OverlayNames {
            nodes: [name("node1"), name("node2")],
            overlays: [name("ovl1"), name("ovl2")],
            containers: [name("c1"), name("c2")],
        }
    }

    /// An overlay world, laid out as Docker lays out an overlay network: two node
    /// namespaces joined by an underlay veth (10.250.0.1 and .2), and a VXLAN device per node
    /// (VNI 4097, port 4789, `proxy l2miss l3miss learning`, MTU 1450), made in the node's
    /// namespace, so that its UDP socket is the node's. The limit gives that device the
    /// overlay address itself; Docker moves it into an overlay namespace as a port of br0,
    /// beside the veth of a container. Either way the other node's overlay address is a
    /// permanent neighbour entry on vxlan0, and its MAC a permanent FDB entry pointing at the
    /// other node, as Docker writes them.
    fn build_overlay(&mut self, config: Config) -> anyhow::Result<World> {
        let names = self.overlay_names(config);
        let limit = config == Config::OverlayLimit;
        let mut made: Vec<&String> = names.nodes.iter().collect();
        if !limit {
            made.extend(names.overlays.iter().chain(&names.containers));
        }
        for netns in made {
            self.add_netns(netns, config)?;
        }
        let run = |command: &mut Command, netns: &str, args: &[&str]| {
            let doing = format!(
                "`{} {}` in {netns} (`{}`)",
                command.get_program().to_string_lossy(),
                args.join(" "),
                config.name()
            );
            cmd::run(command.args(args), &doing)
        };
        let ip =
            |netns: &str, args: &[&str]| run(Command::new("ip").args(["-n", netns]), netns, args);
        let bridge =
            |netns: &str, args: &[&str]| run(&mut cmd::in_netns(netns, "bridge"), netns, args);
        let [node1, node2] = &names.nodes;
        ip(
            node1,
            &[
                "link",
                "add",
                OVERLAY_UNDERLAY[0],
                "type",
                "veth",
                "peer",
                "name",
                OVERLAY_UNDERLAY[1],
                "netns",
                node2,
            ],
        )?;
        let mtu = OVERLAY_MTU.to_string();
        for n in 0..2 {
            let node = &names.nodes[n];
            let underlay = OVERLAY_UNDERLAY[n];
            let underlay_address = format!("{}/24", OVERLAY_UNDERLAY_IPS[n]);
            ip(node, &["addr", "add", &underlay_address, "dev", underlay])?;
            ip(node, &["link", "set", underlay, "up"])?;
            ip(node, &["link", "set", "lo", "up"])?;
            let vni = OVERLAY_VNI.to_string();
            let port = OVERLAY_PORT.to_string();
            let mac = overlay_mac(n).to_string();
            let mut add = vec!["link", "add", OVERLAY_VXLAN];
            if limit {
                // The limit's node is the endpoint itself: the device has the container's MAC.
                add.extend(["address", &mac]);
            }
            add.extend([
                "type", "vxlan", "id", &vni, "dstport", &port, "proxy", "l2miss", "l3miss",
                "learning",
            ]);
            ip(node, &add)?;
            let address = format!("{}/24", overlay_ip(n));
            let (holder, other) = if limit {
                ip(node, &["link", "set", OVERLAY_VXLAN, "mtu", &mtu])?;
                ip(node, &["addr", "add", &address, "dev", OVERLAY_VXLAN])?;
                ip(node, &["link", "set", OVERLAY_VXLAN, "up"])?;
                (node, 1 - n)
            } else {
                let overlay = &names.overlays[n];
                let container = &names.containers[n];
                ip(node, &["link", "set", OVERLAY_VXLAN, "netns", overlay])?;
                ip(overlay, &["link", "add", BRIDGE, "type", "bridge"])?;
                ip(
                    overlay,
                    &["link", "set", OVERLAY_VXLAN, "master", BRIDGE, "mtu", &mtu],
                )?;
                let bridge_address = format!("{}/24", OVERLAY_BRIDGE_IPS[n]);
                ip(overlay, &["addr", "add", &bridge_address, "dev", BRIDGE])?;
                for link in [BRIDGE, OVERLAY_VXLAN, "lo"] {
                    ip(overlay, &["link", "set", link, "up"])?;
                }
                ip(
                    overlay,
                    &[
                        "link", "add", "veth0", "mtu", &mtu, "type", "veth", "peer", "name",
                        "eth0", "netns", container, "mtu", &mtu,
                    ],
                )?;
                ip(overlay, &["link", "set", "veth0", "master", BRIDGE, "up"])?;
                ip(container, &["link", "set", "eth0", "address", &mac])?;
                ip(container, &["addr", "add", &address, "dev", "eth0"])?;
                ip(container, &["link", "set", "eth0", "up"])?;
                ip(container, &["link", "set", "lo", "up"])?;
                (overlay, 1 - n)
            };
            // The other node's endpoint, as Docker's overlay driver writes it.
            let other_ip = overlay_ip(other).to_string();
            let other_mac = overlay_mac(other).to_string();
            ip(
                holder,
                &[
                    "neigh",
                    "add",
                    &other_ip,
                    "lladdr",
                    &other_mac,
                    "dev",
                    OVERLAY_VXLAN,
                    "nud",
                    "permanent",
                ],
            )?;
            bridge(
                holder,
                &[
                    "fdb",
                    "add",
                    &other_mac,
                    "dev",
                    OVERLAY_VXLAN,
                    "dst",
                    OVERLAY_UNDERLAY_IPS[other],
                    "self",
                    "permanent",
                ],
            )?;
        }
        if limit {
            for node in &names.nodes {
                let bridges = cmd::output(
                    cmd::in_netns(node, "ip").args(["-o", "link", "show", "type", "bridge"]),
                    &format!("listing the bridges of {node}"),
                )?;
                if !bridges.trim().is_empty() {
                    bail!("{node} should have no bridge, it has: {}", bridges.trim());
                }
            }
        }
        let (client, server) = if limit {
            (names.nodes[0].clone(), names.nodes[1].clone())
        } else {
            (names.containers[0].clone(), names.containers[1].clone())
        };
        Ok(World {
            config,
            client_netns: client,
            server_netns: server,
            host_netns: (!limit).then(|| names.overlays[0].clone()),
            server_ip: overlay_ip(1),
            published: None,
            cgroup: None,
            lab: None,
            servers: Servers::default(),
        })
    }

    /// The bridge's witness in both overlay namespaces of CONFIG's world.
    fn overlay_witnesses(&mut self, config: Config) -> anyhow::Result<()> {
        let [first, second] = self.overlay_names(config).overlays;
        let witnesses = [Witness::install(&first)?, Witness::install(&second)?];
        self.overlay_witnesses.push((config, witnesses));
        Ok(())
    }

    /// `xbr -n OVERLAY attach br0` in both overlay namespaces of overlay-xbr (after the FDB
    /// entries exist: they are its remote endpoints), then a check that each sees the other
    /// node's container as one.
    fn attach_overlay(&mut self) -> anyhow::Result<()> {
        let names = self.overlay_names(Config::OverlayXbr);
        for overlay in &names.overlays {
            self.mark_attached(overlay);
            self.xbr(&[
                "-n",
                overlay,
                "attach",
                BRIDGE,
                "--no-socket-hooks",
                "--docker",
                "off",
            ])?;
        }
        Ok(())
    }

    fn build_limit(&mut self) -> anyhow::Result<World> {
        let [client, server] = self.limit_netns();
        for netns in [&client, &server] {
            self.add_netns(netns, Config::Limit)?;
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
                &mac(2).to_string(),
                "type",
                "veth",
                "peer",
                "name",
                "eth0",
                "address",
                &mac(3).to_string(),
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
            server_ip: SERVER_IP.parse()?,
            published: None,
            cgroup: None,
            lab: None,
            servers: Servers::default(),
        })
    }

    fn build_lab(&mut self, config: Config, endpoints: usize) -> anyhow::Result<World> {
        let name = self.lab_name(config).expect("labs have names");
        let file = self.lab_dir.join(format!("{name}.toml"));
        // Host clients' labs have the uplink a Docker host has too (xbr's socket hooks serve a
        // published port only where its policy lets it take the fast path, and that policy is
        // about connections arriving from the uplink), but their client is on the host.
        // Egress labs have it for their server, outside.
        let uplink = config.is_published() || config.is_host() || config.is_egress();
        write_lab_file(&file, &name, endpoints, uplink)?;
        self.labs_up.push(file.clone());
        self.xbr(&["lab", "up", &file.display().to_string()])?;
        Ok(World {
            config,
            // The published-port client is outside, behind the uplink; the host client in
            // the host namespace.
            client_netns: if config.is_host() {
                lab::host_netns(&name)
            } else if uplink && !config.is_egress() {
                lab::outside_netns(&name)
            } else {
                lab::container_netns(&name, CLIENT)
            },
            server_netns: if config.is_egress() {
                lab::outside_netns(&name)
            } else {
                lab::container_netns(&name, SERVER)
            },
            host_netns: Some(lab::host_netns(&name)),
            server_ip: if config.is_egress() {
                OUTSIDE_ADDRESS.addr
            } else {
                SERVER_IP.parse()?
            },
            published: if config.is_egress() {
                Some(SocketAddr::from((OUTSIDE_ADDRESS.addr, ECHO_PORT)))
            } else if config == Config::HostLimit {
                Some(SocketAddr::from((
                    SERVER_IP.parse::<Ipv4Addr>()?,
                    ECHO_PORT,
                )))
            } else if config.is_host() {
                Some(SocketAddr::from((Ipv4Addr::LOCALHOST, HOST_PORT)))
            } else if uplink {
                Some(SocketAddr::from((UPLINK_HOST_IP, HOST_PORT)))
            } else {
                None
            },
            cgroup: None,
            lab: Some(Lab { name, file }),
            servers: Servers::default(),
        })
    }

    /// Adds idle containers to every east-west lab until each bridge has ENDPOINTS; `xbr lab
    /// up` completes what exists. xbr's new ports are attached by the next `attach`.
    pub fn grow(&mut self, endpoints: usize, step: &dyn Fn(&str)) -> anyhow::Result<()> {
        for index in 0..self.worlds.len() {
            self.interrupt.check()?;
            let world = &self.worlds[index];
            let Some(lab) = &world.lab else { continue };
            if world.config.is_published() || world.config.is_host() || world.config.is_egress() {
                continue;
            }
            step(&format!(
                "growing {} to {endpoints} endpoints",
                world.config.name()
            ));
            write_lab_file(&lab.file, &lab.name, endpoints, false)?;
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
        cmd::run_with_input(
            &mut cmd::in_netns(&host, "iptables-restore"),
            &docker_ruleset(BRIDGE),
            &doing,
        )?;
        Ok(())
    }

    /// Takes Docker's MASQUERADE rule out of CONFIG's nat table again, and makes sure no
    /// masquerade or SNAT is left anywhere in its namespace (iptables or nft): xbr's is then the
    /// only source NAT there, and a flow that missed it cannot reach the server outside, which
    /// has no route back to the containers.
    fn without_masquerade(&mut self, config: Config) -> anyhow::Result<()> {
        let host = self.host(config);
        let rule = format!("-t nat -D POSTROUTING -s {SUBNET} ! -o {BRIDGE} -j MASQUERADE");
        cmd::run(
            cmd::in_netns(&host, "iptables").args(rule.split_whitespace()),
            &format!("removing Docker's rule `iptables {rule}` in {host}"),
        )?;
        let ruleset = cmd::output(
            cmd::in_netns(&host, "nft").args(["list", "ruleset"]),
            &format!("listing the nftables ruleset of {host}"),
        )?;
        let lower = ruleset.to_lowercase();
        if lower.contains("masquerade") || lower.contains("snat") {
            bail!(
                "{host} still has a source NAT after removing Docker's MASQUERADE rule: {}",
                ruleset.trim()
            );
        }
        Ok(())
    }

    /// `xbr -n HOST attach br0 --uplink uplink0 --masquerade`: xbr source-NATs the bridge's
    /// containers' new flows out of the uplink to the uplink's address.
    fn attach_masquerade(&mut self, config: Config) -> anyhow::Result<()> {
        let host = self.host(config);
        self.mark_attached(&host);
        self.xbr(&[
            "-n",
            &host,
            "attach",
            BRIDGE,
            "--uplink",
            UPLINK,
            "--uplink-mode",
            "tc",
            "--masquerade",
            "--no-socket-hooks",
            "--docker",
            "off",
        ])?;
        Ok(())
    }

    /// Says so, with xbr's reason, when xbr leaves CONFIG's egress on the kernel path: every
    /// run would then fail its path check, and the reason is what to look at.
    fn check_egress_accelerated(&self, config: Config) -> anyhow::Result<()> {
        let host = self.host(config);
        let printed = self.xbr(&["-n", &host, "status", BRIDGE, "--json"])?;
        let status: Value =
            serde_json::from_str(&printed).context("`xbr status --json` printed no JSON")?;
        let egress = &status["bridges"][0]["egress"];
        if egress["accelerated"] != true {
            bail!(
                "xbr leaves {}'s egress on the kernel path: {}",
                config.name(),
                egress["reason"]
                    .as_str()
                    .map_or_else(|| egress.to_string(), str::to_owned)
            );
        }
        Ok(())
    }

    /// Docker's rules for `-p 8080:80` on the server container: DNAT in the nat table's
    /// DOCKER chain, the FORWARD accept, and the hairpin MASQUERADE.
    fn publish_with_dnat(&mut self, config: Config) -> anyhow::Result<()> {
        let host = self.host(config);
        let rules = [
            format!(
                "-t filter -A DOCKER -d {SERVER_IP}/32 ! -i {BRIDGE} -o {BRIDGE} -p tcp -m tcp \
                 --dport {ECHO_PORT} -j ACCEPT"
            ),
            format!(
                "-t nat -A POSTROUTING -s {SERVER_IP}/32 -d {SERVER_IP}/32 -p tcp -m tcp \
                 --dport {ECHO_PORT} -j MASQUERADE"
            ),
            format!(
                "-t nat -A DOCKER ! -i {BRIDGE} -p tcp -m tcp --dport {HOST_PORT} -j DNAT \
                 --to-destination {SERVER_IP}:{ECHO_PORT}"
            ),
        ];
        for rule in rules {
            cmd::run(
                cmd::in_netns(&host, "iptables").args(rule.split_whitespace()),
                &format!("adding Docker's rule `iptables {rule}` in {host}"),
            )?;
        }
        Ok(())
    }

    /// Docker's rules for `-p 127.0.0.1:8080:80` on the server container. With the userland
    /// proxy (Docker's default) they are those of publish_with_dnat with `-d 127.0.0.1/32`,
    /// which nat OUTPUT never reaches for 127.0.0.0/8: docker-proxy serves the host. Without
    /// it (`--userland-proxy=false`), as dockerd sets up then: nat OUTPUT jumps to DOCKER for
    /// every local destination, route_localnet=1 on the bridge lets 127.0.0.1-sourced packets
    /// out of it, and local sources leaving through it are masqueraded.
    fn publish_on_loopback(&mut self, config: Config, userland_proxy: bool) -> anyhow::Result<()> {
        let host = self.host(config);
        let mut rules = vec![
            format!(
                "-t filter -A DOCKER -d {SERVER_IP}/32 ! -i {BRIDGE} -o {BRIDGE} -p tcp -m tcp \
                 --dport {ECHO_PORT} -j ACCEPT"
            ),
            format!(
                "-t nat -A POSTROUTING -s {SERVER_IP}/32 -d {SERVER_IP}/32 -p tcp -m tcp \
                 --dport {ECHO_PORT} -j MASQUERADE"
            ),
            format!(
                "-t nat -A DOCKER -d 127.0.0.1/32 ! -i {BRIDGE} -p tcp -m tcp --dport \
                 {HOST_PORT} -j DNAT --to-destination {SERVER_IP}:{ECHO_PORT}"
            ),
        ];
        if !userland_proxy {
            rules.extend([
                "-t nat -D OUTPUT ! -d 127.0.0.0/8 -m addrtype --dst-type LOCAL -j DOCKER"
                    .to_owned(),
                "-t nat -A OUTPUT -m addrtype --dst-type LOCAL -j DOCKER".to_owned(),
                format!(
                    "-t nat -A POSTROUTING -o {BRIDGE} -m addrtype --src-type LOCAL -j MASQUERADE"
                ),
            ]);
            set_sysctl(
                &host,
                &format!("net.ipv4.conf.{BRIDGE}.route_localnet"),
                "1",
            )?;
        }
        for rule in rules {
            cmd::run(
                cmd::in_netns(&host, "iptables").args(rule.split_whitespace()),
                &format!("adding Docker's rule `iptables {rule}` in {host}"),
            )?;
        }
        Ok(())
    }

    /// The cgroup v2 directory for host-xbr's client, or None without a cgroup v2 hierarchy.
    fn host_clients_cgroup(&self) -> Option<PathBuf> {
        cgroup2_root().map(|root| root.join(format!("{}-host-clients", self.prefix)))
    }

    /// `xbr -n HOST attach br0 --cgroup DIR` on host-xbr's lab, with DIR a cgroup made for its
    /// client, and `xbr publish br0 127.0.0.1:8080:CONTAINER:80`, as `xbr attach --follow`
    /// would publish Docker's `-p 127.0.0.1:8080:80`.
    fn attach_host_clients(&mut self) -> anyhow::Result<()> {
        let config = Config::HostXbr;
        let host = self.host(config);
        let cgroup = self.host_clients_cgroup().context(
            "no cgroup v2 hierarchy is mounted here: host-xbr needs one for xbr's socket hooks",
        )?;
        std::fs::create_dir(&cgroup)
            .with_context(|| format!("creating the cgroup {}", cgroup.display()))?;
        self.cgroup = Some(cgroup.clone());
        self.mark_attached(&host);
        let path = cgroup.display().to_string();
        self.xbr(&[
            "-n", &host, "attach", BRIDGE, "--uplink", UPLINK, "--cgroup", &path, "--docker", "off",
        ])?;
        let spec = format!("127.0.0.1:{HOST_PORT}:{SERVER_IP}:{ECHO_PORT}");
        self.xbr(&["-n", &host, "publish", BRIDGE, &spec])?;
        let world = self
            .worlds
            .iter_mut()
            .find(|world| world.config == config)
            .expect("the world is built");
        world.cgroup = Some(cgroup);
        Ok(())
    }

    /// Says so, with xbr's reason, when xbr holds host-xbr's published port back for the
    /// kernel path: its socket hooks would then leave the host client to docker-proxy.
    fn check_host_clients_served(&self) -> anyhow::Result<()> {
        let host = self.host(Config::HostXbr);
        let printed = self.xbr(&["-n", &host, "status", BRIDGE, "--json"])?;
        let status: Value =
            serde_json::from_str(&printed).context("`xbr status --json` printed no JSON")?;
        let published = &status["bridges"][0]["published"];
        if published[0]["held"] != false {
            bail!("xbr holds host-xbr's published port back for the kernel path: {published}");
        }
        Ok(())
    }

    /// The SYN flood's sources (10.79.0.0/16) are routed to the outside namespace, which does
    /// not forward and drops what it gets for them: the host's answers on the kernel path go
    /// out like replies to a real flood's spoofed sources, and nobody ever answers them.
    fn route_spoofed_sources(&mut self, config: Config) -> anyhow::Result<()> {
        let host = self.host(config);
        let subnet = format!("{}/16", super::workloads::SPOOFED_SOURCES);
        let via = OUTSIDE_ADDRESS.addr.to_string();
        cmd::run(
            cmd::in_netns(&host, "ip").args(["route", "add", &subnet, "via", &via]),
            &format!("routing {subnet} to the outside namespace in {host}"),
        )
    }

    /// What XDP delivery needs on veths, as a physical uplink has it: full checksums from the
    /// client, and NAPI (GRO on) on the container's end.
    fn xdp_conditions(&mut self, config: Config) -> anyhow::Result<()> {
        let world = self.get(config);
        for (netns, feature, value) in [
            (world.client_netns.clone(), "tx", "off"),
            (world.server_netns.clone(), "gro", "on"),
        ] {
            // `output`: ethtool lists the features that changed with it, not for the terminal.
            cmd::output(
                cmd::in_netns(&netns, "ethtool").args(["-K", "eth0", feature, value]),
                &format!("setting {feature} {value} on eth0 in {netns}"),
            )?;
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
        self.mark_attached(&host);
        let started = Instant::now();
        // The socket hooks serve host clients of published ports, which this world has none
        // of: the host's cgroups are left alone.
        let printed = self.xbr(&[
            "-n",
            &host,
            "attach",
            BRIDGE,
            "--mode",
            mode,
            "--no-socket-hooks",
            "--json",
        ])?;
        let took = started.elapsed();
        let attached: Value = serde_json::from_str(&printed)
            .with_context(|| format!("`xbr attach --json` printed no JSON: {printed}"))?;
        self.pins = attached["pins"].as_str().map(PathBuf::from);
        Ok(took)
    }

    /// Attaches xbr with the lab's uplink in UPLINK_MODE and publishes the server's port 80
    /// as the host's 8080, as `docker run -p 8080:80` would with xbr following Docker.
    fn attach_uplink(&mut self, config: Config, uplink_mode: &str) -> anyhow::Result<()> {
        let host = self.host(config);
        self.mark_attached(&host);
        self.xbr(&[
            "-n",
            &host,
            "attach",
            BRIDGE,
            "--uplink",
            UPLINK,
            "--uplink-mode",
            uplink_mode,
            "--no-socket-hooks",
            "--docker",
            "off",
        ])?;
        let spec = format!("{HOST_PORT}:{SERVER_IP}:{ECHO_PORT}");
        self.xbr(&["-n", &host, "publish", BRIDGE, &spec])?;
        Ok(())
    }

    fn mark_attached(&mut self, host: &str) {
        if !self.attached.iter().any(|attached| attached == host) {
            self.attached.push(host.to_owned());
        }
    }

    /// `xbr -n HOST detach br0` on the xbr lab; a bridge that is not attached is fine.
    pub fn detach_xbr(&mut self) -> anyhow::Result<()> {
        let host = self.host(Config::Xbr);
        self.detach(&host)?;
        self.attached.retain(|attached| *attached != host);
        Ok(())
    }

    /// Counters that tell which path served a run in CONFIG (`Config::path_checked`).
    pub fn path_counters(&self, config: Config) -> anyhow::Result<PathCounters> {
        if config == Config::Xbr {
            return self.east_west_counters();
        }
        if config.is_egress() {
            return self.egress_counters(config);
        }
        if config.is_overlay() {
            return self.overlay_counters(config);
        }
        let host = self.host(config);
        let listing = cmd::output(
            cmd::in_netns(&host, "iptables").args(["-t", "nat", "-L", "DOCKER", "-v", "-x", "-n"]),
            &format!("reading Docker's DNAT counter in {host}"),
        )?;
        let dpt = format!("dpt:{HOST_PORT}");
        let dnat_packets = listing
            .lines()
            .find(|line| {
                let fields: Vec<&str> = line.split_whitespace().collect();
                fields.contains(&"DNAT") && fields.contains(&dpt.as_str())
            })
            .and_then(|line| line.split_whitespace().next()?.parse().ok())
            .unwrap_or(0);
        let (xbr_nat_in, xbr_nat_in_xdp) = if config.uplink_mode().is_some() {
            let verdicts = self.verdicts(config)?;
            (verdicts.count("nat_in")?, verdicts.count("nat_in_xdp")?)
        } else {
            (0, 0)
        };
        let host_connects = if config == Config::HostXbr {
            self.host_connects(config)?
        } else {
            0
        };
        let host_passive_opens = if config.is_host() {
            host::tcp_passive_opens(&host)?
        } else {
            0
        };
        Ok(PathCounters {
            dnat_packets,
            xbr_nat_in,
            xbr_nat_in_xdp,
            host_connects,
            host_passive_opens,
            ..PathCounters::default()
        })
    }

    /// The connect()s xbr's socket hooks pointed at the container for the published port of
    /// CONFIG's lab (`host_clients.connects` in `xbr status --json`).
    fn host_connects(&self, config: Config) -> anyhow::Result<u64> {
        let host = self.host(config);
        let printed = self.xbr(&["-n", &host, "status", BRIDGE, "--json"])?;
        let status: Value =
            serde_json::from_str(&printed).context("`xbr status --json` printed no JSON")?;
        let spec = format!("127.0.0.1:{HOST_PORT}:{SERVER_IP}:{ECHO_PORT}/tcp");
        status["bridges"][0]["published"]
            .as_array()
            .and_then(|published| published.iter().find(|p| p["spec"] == spec.as_str()))
            .and_then(|p| p["host_clients"]["connects"].as_u64())
            .with_context(|| {
                format!(
                    "`xbr status --json` in {host} shows no host_clients.connects for {spec}: {}",
                    status["bridges"][0]["published"]
                )
            })
    }

    /// The xbr world's counters: frames its client and server sent, frames xbr redirected,
    /// IPv4 frames the bridge forwarded.
    fn east_west_counters(&self) -> anyhow::Result<PathCounters> {
        let world = self.get(Config::Xbr);
        let mut sent = 0;
        for netns in [&world.client_netns, &world.server_netns] {
            sent += host::link_packets(netns, "eth0")?.tx;
        }
        let witness = self
            .witness
            .as_ref()
            .context("the xbr world has the bridge's witness")?;
        Ok(PathCounters {
            sent,
            xbr_redirected: self.verdicts(Config::Xbr)?.count("redirected")?,
            bridge_forwarded_ipv4: witness.read()?.ipv4,
            ..PathCounters::default()
        })
    }

    /// An egress world's counters (see `PathCounters`).
    fn egress_counters(&self, config: Config) -> anyhow::Result<PathCounters> {
        let world = self.get(config);
        let host = self.host(config);
        let (xbr_egress_out, xbr_egress_in, xbr_egress_kernel) = if config == Config::EgressXbr {
            let verdicts = self.verdicts(config)?;
            (
                verdicts.count("egress_out")?,
                verdicts.count("egress_in")?,
                verdicts.count("egress_kernel")?,
            )
        } else {
            (0, 0, 0)
        };
        Ok(PathCounters {
            egress_sent: host::link_packets(&world.client_netns, "eth0")?.tx,
            egress_replies: host::link_packets(&world.server_netns, "eth0")?.tx,
            forwarded: host::ip_forwarded(&host)?,
            // The limit's namespace has no nat table, and listing one must not make it.
            masqueraded: if config == Config::EgressLimit {
                0
            } else {
                masquerade_packets(&host)?
            },
            conntrack_entries: host::conntrack_entries(&host)?,
            xbr_egress_out,
            xbr_egress_in,
            xbr_egress_kernel,
            ..PathCounters::default()
        })
    }

    /// An overlay world's counters (see `PathCounters`).
    fn overlay_counters(&self, config: Config) -> anyhow::Result<PathCounters> {
        let names = self.overlay_names(config);
        let mut counters = PathCounters::default();
        for (n, (node, underlay)) in names.nodes.iter().zip(OVERLAY_UNDERLAY).enumerate() {
            let (netns, link) = if config == Config::OverlayLimit {
                (node, OVERLAY_VXLAN)
            } else {
                (&names.containers[n], "eth0")
            };
            counters.overlay_sent[n] = host::link_packets(netns, link)?.tx;
            counters.overlay_underlay[n] = host::link_packets(node, underlay)?.tx;
        }
        if let Some((_, witnesses)) = self
            .overlay_witnesses
            .iter()
            .find(|(world, _)| *world == config)
        {
            for (n, witness) in witnesses.iter().enumerate() {
                counters.overlay_bridged[n] = witness.read()?.ipv4;
            }
        }
        if config == Config::OverlayXbr {
            for (n, overlay) in names.overlays.iter().enumerate() {
                let (delivered, fast_path) = self.overlay_port_stats(overlay)?;
                counters.overlay_tunnelled[n] = delivered;
                counters.overlay_arrived[n] = fast_path;
            }
        }
        Ok(counters)
    }

    /// xbr's counters of vxlan0 in OVERLAY (`xbr stats --json`): its `delivered_packets`
    /// and `fast_path_packets`.
    fn overlay_port_stats(&self, overlay: &str) -> anyhow::Result<(u64, u64)> {
        let printed = self.xbr(&["-n", overlay, "stats", BRIDGE, "--json"])?;
        let stats: Value =
            serde_json::from_str(&printed).context("`xbr stats --json` printed no JSON")?;
        let port = stats["endpoints"]
            .as_array()
            .and_then(|rows| rows.iter().find(|row| row["port"] == OVERLAY_VXLAN))
            .with_context(|| {
                format!("`xbr -n {overlay} stats --json` has no row for {OVERLAY_VXLAN}: {stats}")
            })?;
        let count = |field: &str| {
            port[field].as_u64().with_context(|| {
                format!("`xbr -n {overlay} stats --json` has no {field} for {OVERLAY_VXLAN}")
            })
        };
        Ok((count("delivered_packets")?, count("fast_path_packets")?))
    }

    /// xbr's verdict counters on CONFIG's bridge (`xbr stats --json`).
    fn verdicts(&self, config: Config) -> anyhow::Result<Verdicts> {
        let stats = self.stats(config)?;
        Ok(Verdicts(stats["verdicts"][0].clone()))
    }

    /// `xbr status --json`'s connection tables in CONFIG's world (one that attaches xbr).
    pub fn nat_state(&self, config: Config) -> anyhow::Result<Value> {
        let host = self.host(config);
        let printed = self.xbr(&["-n", &host, "status", BRIDGE, "--json"])?;
        let status: Value =
            serde_json::from_str(&printed).context("`xbr status --json` printed no JSON")?;
        Ok(status["bridges"][0]["nat"].clone())
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
        self.stats(Config::Xbr)
    }

    /// `xbr -n HOST stats --json` in CONFIG's world (one that attaches xbr).
    fn stats(&self, config: Config) -> anyhow::Result<Value> {
        let host = self.host(config);
        let printed = self.xbr(&["-n", &host, "stats", BRIDGE, "--json"])?;
        serde_json::from_str(&printed).context("`xbr stats --json` printed no JSON")
    }

    /// What the kernel reports the xbr attachment locks (`xbr status --json`), now that each
    /// bridge has `endpoints` endpoints.
    pub fn xbr_memory(&self, endpoints: usize) -> anyhow::Result<super::memory::Measured> {
        let host = self.host(Config::Xbr);
        let printed = self.xbr(&["-n", &host, "status", "--json"])?;
        let status: Value =
            serde_json::from_str(&printed).context("`xbr status --json` printed no JSON")?;
        let memory = status["bridges"]
            .as_array()
            .and_then(|bridges| bridges.iter().find(|b| b["name"] == BRIDGE))
            .map(|bridge| &bridge["memory"])
            .context("`xbr status --json` shows no attachment of the bench's bridge")?;
        let bytes = |field: &str| {
            memory[field]
                .as_u64()
                .with_context(|| format!("no {field} in `xbr status --json`: {memory}"))
        };
        Ok(super::memory::Measured {
            endpoints,
            locked_bytes: bytes("locked_bytes")?,
            maps_bytes: bytes("maps_bytes")?,
        })
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

    /// The servers of CONFIG's world, pinned to the server CPU: iperf3 and sockperf, or for
    /// a published port the echo server on the published-port CPU, and docker-proxy.
    pub fn start_servers(&mut self, config: Config) -> anyhow::Result<()> {
        let index = self
            .worlds
            .iter()
            .position(|world| world.config == config)
            .expect("the world is built");
        let netns = self.worlds[index].server_netns.clone();
        let cpu = self.placement.server_cpu;
        let name = config.name();
        let server_ip = self.worlds[index].server_ip.to_string();
        // Egress worlds have both: the echo server for connections, iperf3 and sockperf for
        // the rest, all outside.
        if config.is_published() || config.is_host() || config.is_egress() {
            let cpu = self.placement.published_cpu;
            let address = SocketAddr::from((self.worlds[index].server_ip, ECHO_PORT));
            let acceptors = if config.is_host() { HOST_PARALLEL } else { 1 };
            self.worlds[index].servers.echo =
                Some(EchoServer::start(&netns, address, cpu, acceptors)?);
            let host_ip = match config {
                Config::DockerProxy => Some(UPLINK_HOST_IP),
                // Docker's default for `-p 127.0.0.1:8080:80`; host-xbr's clients bypass it.
                Config::HostProxy | Config::HostXbr => Some(Ipv4Addr::LOCALHOST),
                _ => None,
            };
            if let Some(host_ip) = host_ip {
                let host = self.host(config);
                let pid = self.start_server(
                    "docker-proxy",
                    docker_proxy(&host)?.args([
                        "-proto",
                        "tcp",
                        "-host-ip",
                        &host_ip.to_string(),
                        "-host-port",
                        &HOST_PORT.to_string(),
                        "-container-ip",
                        SERVER_IP,
                        "-container-port",
                        &ECHO_PORT.to_string(),
                    ]),
                    &host,
                    "tcp",
                    HOST_PORT,
                )?;
                self.worlds[index].servers.docker_proxy = Some(pid);
            }
            if !config.is_egress() {
                return Ok(());
            }
        }
        let port = IPERF3_PORT.to_string();
        let iperf3 = self.start_server(
            &format!("the iperf3 server of {name}"),
            on_cpu(&netns, cpu, "iperf3").args(["-s", "-B", &server_ip, "-p", &port]),
            &netns,
            "tcp",
            IPERF3_PORT,
        )?;
        self.worlds[index].servers.iperf3 = Some(iperf3);
        let mut sockperf_pids = Vec::new();
        for (proto, port) in [("udp", SOCKPERF_UDP_PORT), ("tcp", SOCKPERF_TCP_PORT)] {
            let port_text = port.to_string();
            let mut command = on_cpu(&netns, cpu, "sockperf");
            command.args(["server", "-i", &server_ip, "-p", &port_text]);
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
        for pid in servers.pids() {
            self.processes.kill(pid);
        }
        drop(servers);
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
        for host in std::mem::take(&mut self.attached) {
            if let Err(error) = self.detach(&host) {
                errors.push(format!("{error:#}"));
            }
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
        if let Some(cgroup) = self.cgroup.take()
            && let Err(error) = remove_cgroup(&cgroup)
        {
            errors.push(format!("{error:#}"));
        }
        for netns in std::mem::take(&mut self.netns_made) {
            if Path::new("/run/netns").join(&netns).exists()
                && let Err(error) = cmd::run(
                    Command::new("ip").args(["netns", "delete", &netns]),
                    &format!("removing namespace {netns}"),
                )
            {
                errors.push(format!("{error:#}"));
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

/// What `path_counters` read; a configuration reads the counters its path check needs, the
/// rest stay 0.
#[derive(Clone, Copy, Debug, Default)]
pub struct PathCounters {
    /// Published ports: packets of Docker's DNAT rule, frames xbr's NAT delivered from tc
    /// and from XDP.
    pub dnat_packets: u64,
    pub xbr_nat_in: u64,
    pub xbr_nat_in_xdp: u64,
    /// Host clients: connect()s xbr's socket hooks translated, and connections accepted in
    /// the host namespace (Tcp PassiveOpens), where only docker-proxy listens: the server
    /// is in the container's namespace.
    pub host_connects: u64,
    pub host_passive_opens: u64,
    /// Between containers (xbr): frames the client and the server sent from their eth0 (each
    /// crosses xbr's program on its port), frames xbr redirected past the bridge, and IPv4
    /// frames the bridge forwarded itself (the nftables witness).
    pub sent: u64,
    pub xbr_redirected: u64,
    pub bridge_forwarded_ipv4: u64,
    /// Egress: frames the container sent from its eth0 (each crosses xbr's program on its
    /// port) and the server outside sent from its eth0 (each crosses the uplink's), IPv4
    /// datagrams the host namespace forwarded itself (Ip ForwDatagrams: the kernel's path,
    /// whatever netfilter does), packets of Docker's MASQUERADE rule (the first of each
    /// connection it translates), conntrack entries in the host namespace, and xbr's
    /// `egress_out` and `egress_in` verdicts, and `egress_kernel` (frames of flows xbr left to
    /// the kernel path: no free port, no room).
    pub egress_sent: u64,
    pub egress_replies: u64,
    pub forwarded: u64,
    pub masqueraded: u64,
    pub conntrack_entries: u64,
    pub xbr_egress_out: u64,
    pub xbr_egress_in: u64,
    pub xbr_egress_kernel: u64,
    /// Overlay, per node (the client's, the server's): frames its end of the traffic sent
    /// (the container's eth0; in the limit the node's vxlan0), UDP datagrams its underlay veth
    /// sent (the VXLAN packets), IPv4 frames its br0 forwarded (the nftables witness), and
    /// xbr's counters of its vxlan0 port: `delivered_packets`, frames the fast path sent out
    /// of vxlan0 to the other node, and `fast_path_packets`, decapsulated frames from the
    /// other node it redirected into the container.
    pub overlay_sent: [u64; 2],
    pub overlay_underlay: [u64; 2],
    pub overlay_bridged: [u64; 2],
    pub overlay_tunnelled: [u64; 2],
    pub overlay_arrived: [u64; 2],
}

/// One bridge's verdicts from `xbr stats --json`.
struct Verdicts(Value);

impl Verdicts {
    fn count(&self, verdict: &str) -> anyhow::Result<u64> {
        self.0[verdict]
            .as_u64()
            .with_context(|| format!("`xbr stats --json` has no verdict {verdict}: {}", self.0))
    }
}

/// Docker's userland proxy in NETNS at nice -20, like the traffic's processes, but on no CPU
/// in particular: it is part of the path, and Docker does not pin it. (Its threads then run
/// on the other CPU and each request crosses CPUs; pinned beside client and server it served
/// about 3x the requests/s in a trial - BENCHMARKS.md.)
fn docker_proxy(netns: &str) -> anyhow::Result<Command> {
    if !Path::new(DOCKER_PROXY).exists() {
        bail!(
            "{DOCKER_PROXY} is missing: it comes with Debian's docker.io package (`cargo xtask \
             setup` installs it)"
        );
    }
    let mut command = on_cpu(netns, None, DOCKER_PROXY);
    // docker-proxy reports to dockerd on fd 3 that it listens, then closes fd 3; without a
    // file there it would close whatever holds fd 3 then: its own listening socket.
    // SAFETY: open and dup2 are async-signal-safe, as pre_exec requires.
    unsafe {
        command.pre_exec(|| {
            let null = libc::open(c"/dev/null".as_ptr(), libc::O_WRONLY);
            if null < 0 || (null != 3 && libc::dup2(null, 3) < 0) {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
    Ok(command)
}

/// Packets of the MASQUERADE rules in NETNS's nat POSTROUTING chain (0 when it has none, or no
/// nat table at all).
fn masquerade_packets(netns: &str) -> anyhow::Result<u64> {
    let listing = cmd::output(
        cmd::in_netns(netns, "iptables-save").args(["-c", "-t", "nat"]),
        &format!("reading the nat table's counters in {netns}"),
    )?;
    Ok(masquerade_packets_in(&listing))
}

/// The packet counts of `[PACKETS:BYTES] -A POSTROUTING ... -j MASQUERADE` lines of
/// `iptables-save -c`.
fn masquerade_packets_in(listing: &str) -> u64 {
    listing
        .lines()
        .filter(|line| line.contains("-A POSTROUTING") && line.contains("-j MASQUERADE"))
        .filter_map(|line| {
            let counters = line.strip_prefix('[')?.split(']').next()?;
            counters.split(':').next()?.parse::<u64>().ok()
        })
        .sum()
}

/// Where the cgroup v2 hierarchy is mounted (`/sys/fs/cgroup`, or `/sys/fs/cgroup/unified`
/// in the hybrid layout), from this process's mount table.
fn cgroup2_root() -> Option<PathBuf> {
    let table = std::fs::read_to_string("/proc/self/mountinfo").ok()?;
    table.lines().find_map(|line| {
        let (before, after) = line.split_once(" - ")?;
        let fstype = after.split_whitespace().next()?;
        let root = before.split_whitespace().nth(3)?;
        let mount_point = before.split_whitespace().nth(4)?;
        (fstype == "cgroup2" && root == "/").then(|| PathBuf::from(mount_point))
    })
}

/// Removes a cgroup the bench made. Its clients have exited by now; anything still in it
/// (only a client of the bench's can be) goes back to the root first.
fn remove_cgroup(cgroup: &Path) -> anyhow::Result<()> {
    let root = cgroup.parent().context("a cgroup has a parent")?;
    for _ in 0..50 {
        let procs = std::fs::read_to_string(cgroup.join("cgroup.procs")).unwrap_or_default();
        for pid in procs.split_whitespace() {
            let _ = std::fs::write(root.join("cgroup.procs"), pid);
        }
        match std::fs::remove_dir(cgroup) {
            Ok(()) => return Ok(()),
            Err(error) if error.kind() == std::io::ErrorKind::NotFound => return Ok(()),
            Err(_) => std::thread::sleep(Duration::from_millis(20)),
        }
    }
    std::fs::remove_dir(cgroup).with_context(|| format!("removing the cgroup {}", cgroup.display()))
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
fn mac(host_part: usize) -> MacAddr {
    let [.., high, low] = (host_part as u16).to_be_bytes();
    MacAddr([0x02, 0x77, 0, 0, high, low])
}

fn address(host_part: usize) -> Ipv4Cidr {
    let [.., high, low] = (host_part as u16).to_be_bytes();
    Ipv4Cidr::new(Ipv4Addr::new(10, 77, high, low), PREFIX_LEN)
}

/// The lab for `xbr lab up`: bridge br0, client a, server b, and idle containers up to
/// ENDPOINTS in all; with UPLINK, an outside namespace behind uplink0.
fn bench_lab(name: &str, endpoints: usize, uplink: bool) -> LabSpec {
    let containers = [(CLIENT.to_owned(), 2), (SERVER.to_owned(), 3)]
        .into_iter()
        .chain((FIRST_IDLE..).map(|n| (format!("e{n:04}"), n)))
        .take(endpoints.max(2))
        .map(|(name, host_part)| ContainerSpec {
            name,
            address: address(host_part),
            mac: Some(mac(host_part)),
        })
        .collect();
    LabSpec {
        name: name.to_owned(),
        bridge: BridgeSpec {
            name: BRIDGE.to_owned(),
            address: Some(BRIDGE_ADDRESS),
        },
        containers,
        uplink: uplink.then_some(UplinkSpec {
            host_address: UPLINK_HOST_ADDRESS,
            outside_address: OUTSIDE_ADDRESS,
        }),
    }
}

fn write_lab_file(file: &Path, name: &str, endpoints: usize, uplink: bool) -> anyhow::Result<()> {
    lab::write(&bench_lab(name, endpoints, uplink), file, WRITTEN_BY)
}

/// The comment atop the bench's lab files.
const WRITTEN_BY: &str =
    "Written by `cargo xtask bench`; `xbr lab down` with this file removes the lab.";

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
        let lab = bench_lab("xb-bridge", 1000, false);
        // What `xbr lab up` checks, unique names and MACs among it.
        lab.validate().expect("xbr takes the bench's lab");
        let containers = &lab.containers;
        assert_eq!(containers.len(), 1000);
        assert_eq!(containers[0].name, "a");
        assert_eq!(containers[1].address.to_string(), "10.77.0.3/16");
        let last = &containers[999];
        assert_eq!(last.name, "e1001");
        assert_eq!(last.address.to_string(), "10.77.3.233/16");
        assert_eq!(last.mac.unwrap().to_string(), "02:77:00:00:03:e9");
    }

    #[test]
    fn published_labs_have_an_uplink() {
        let published = bench_lab("xb-nat", 10, true);
        let uplink = published.uplink.as_ref().expect("an uplink");
        assert_eq!(uplink.host_address.to_string(), "10.78.0.1/24");
        assert_eq!(published.containers.len(), 10);
        assert!(bench_lab("xb-xbr", 10, false).uplink.is_none());
    }

    #[test]
    fn masquerade_packets_are_read_from_iptables_save() {
        let listing = "*nat\n\
            :POSTROUTING ACCEPT [12:720]\n\
            [7:420] -A POSTROUTING -s 10.77.0.0/16 ! -o br0 -j MASQUERADE\n\
            [3:180] -A POSTROUTING -s 10.77.0.3/32 -d 10.77.0.3/32 -p tcp -m tcp --dport 80 -j MASQUERADE\n\
            [9:540] -A DOCKER -i br0 -j RETURN\n\
            COMMIT\n";
        assert_eq!(masquerade_packets_in(listing), 10);
        assert_eq!(masquerade_packets_in("*nat\nCOMMIT\n"), 0);
    }

    #[test]
    fn docker_ruleset_names_the_bridge() {
        let rules = docker_ruleset("br0");
        assert!(rules.contains(":FORWARD DROP"));
        assert!(rules.contains("-A FORWARD -i br0 -o br0 -j ACCEPT"));
        assert!(rules.contains("-A POSTROUTING -s 10.77.0.0/16 ! -o br0 -j MASQUERADE"));
    }
}
