//! Docker through its Engine API (bollard, over Docker's unix socket): the network that owns a
//! bridge, its options and the published ports of its running containers, plus the iptables
//! rules on the forwarding path. Pure functions turn them into a `Policy` and a set of
//! `PublishSpec`s; the Docker-owned entries of the PUBLISHED map follow that set.

use std::{
    collections::{BTreeMap, BTreeSet, HashMap},
    net::{IpAddr, Ipv4Addr},
    os::fd::{AsRawFd as _, FromRawFd as _, OwnedFd},
    path::{Path, PathBuf},
    pin::Pin,
    process::Command,
    time::Duration,
};

use bollard::{
    models::{ContainerInspectResponse, EventMessage, Network},
    query_parameters::{EventsOptions, ListNetworksOptions},
};
use bridge_common::{IPPROTO_TCP, IPPROTO_UDP, PublishedKey, PublishedPort};
use futures::{Stream, StreamExt as _};
use tracing::{debug, info, warn};

use crate::{
    datapath::Pinned,
    error::{Error, Result},
    observe::Mac,
    plan::{Plan, Policy},
    publish::{Proto, PublishSpec},
};

/// Where Docker listens unless DOCKER_HOST says otherwise.
pub const DEFAULT_SOCKET: &str = "/var/run/docker.sock";
/// A local daemon answers in milliseconds; one that takes longer is treated as absent.
const REQUEST_TIMEOUT_SECS: u64 = 10;
const BRIDGE_NAME_OPTION: &str = "com.docker.network.bridge.name";
const ICC_OPTION: &str = "com.docker.network.bridge.enable_icc";
/// br_netfilter's switch: whether bridged IPv4 frames meet iptables' FORWARD chain.
const BRIDGE_NF_CALL_IPTABLES: &str = "/proc/sys/net/bridge/bridge-nf-call-iptables";

/// `xbr attach --docker`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum DockerChoice {
    /// On when Docker's socket answers and one of its networks owns the bridge.
    Auto,
    /// Required: fail when Docker cannot be asked or does not own the bridge.
    On,
    /// Never ask Docker.
    Off,
}

/// Docker's socket: DOCKER_HOST when it names a unix socket (`unix:///run/docker.sock`), else
/// the default. xbr talks to the local daemon only.
pub fn socket() -> std::result::Result<PathBuf, String> {
    match std::env::var("DOCKER_HOST") {
        Ok(host) if !host.is_empty() => match host.strip_prefix("unix://") {
            Some(path) => Ok(PathBuf::from(path)),
            None => Err(format!(
                "DOCKER_HOST={host} is not a unix socket; xbr talks to the local Docker daemon \
                 only (DOCKER_HOST=unix:///PATH)"
            )),
        },
        _ => Ok(PathBuf::from(DEFAULT_SOCKET)),
    }
}

/// A Docker network with a Linux bridge, as far as xbr cares.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct NetworkView {
    pub id: String,
    pub name: String,
    /// The Linux bridge that carries it (docker0, br-1a2b3c4d5e6f, or the name it was given).
    pub bridge: String,
    /// `com.docker.network.bridge.enable_icc`: whether its containers may talk to each other.
    pub icc: bool,
}

/// The bridge network a `docker network ls` entry describes; `None` for other drivers.
pub fn network_view(network: &Network) -> Option<NetworkView> {
    if network.driver.as_deref() != Some("bridge") {
        return None;
    }
    let id = network.id.clone()?;
    let name = network.name.clone().unwrap_or_default();
    let option = |key: &str| {
        network
            .options
            .as_ref()
            .and_then(|options| options.get(key))
            .map(String::as_str)
    };
    let bridge = match option(BRIDGE_NAME_OPTION) {
        Some(bridge) if !bridge.is_empty() => bridge.to_owned(),
        // The daemon names the default network's bridge in its options; older ones did not.
        _ if name == "bridge" => "docker0".to_owned(),
        _ => format!("br-{}", &id[..id.len().min(12)]),
    };
    Some(NetworkView {
        id,
        name,
        bridge,
        icc: option(ICC_OPTION).is_none_or(parse_docker_bool),
    })
}

/// Go's strconv.ParseBool, which Docker uses for network options. Anything else is read as
/// false: for enable_icc that is the safe side (east-west traffic stays on the bridge).
fn parse_docker_bool(value: &str) -> bool {
    matches!(value, "1" | "t" | "T" | "true" | "TRUE" | "True")
}

/// Docker's port bindings on one network, as published ports.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct DockerPorts {
    /// Bindings xbr serves: IPv4, TCP or UDP, of running containers on this network.
    pub specs: BTreeSet<PublishSpec>,
    /// Bindings left to Docker's own path, and why.
    pub skipped: Vec<String>,
}

impl DockerPorts {
    fn extend(&mut self, other: DockerPorts) {
        self.specs.extend(other.specs);
        self.skipped.extend(other.skipped);
    }
}

/// The published ports of one container (`docker inspect`) on network `network_id`: its
/// bindings (NetworkSettings.Ports, which has the host ports Docker picked for `-p 80`) to
/// its address on that network.
pub fn container_ports(container: &ContainerInspectResponse, network_id: &str) -> DockerPorts {
    let mut ports = DockerPorts::default();
    let name = container
        .name
        .as_deref()
        .unwrap_or("?")
        .trim_start_matches('/');
    let running = container
        .state
        .as_ref()
        .and_then(|state| state.running)
        .unwrap_or(false);
    let settings = container.network_settings.as_ref();
    let bindings = settings.and_then(|s| s.ports.as_ref());
    let networks = settings.and_then(|s| s.networks.as_ref());
    let here = networks.and_then(|networks| {
        networks
            .values()
            .find(|endpoint| endpoint.network_id.as_deref() == Some(network_id))
    });
    let (Some(bindings), Some(networks), Some(here), true) = (bindings, networks, here, running)
    else {
        return ports;
    };
    let mut bindings: Vec<_> = bindings
        .iter()
        .filter_map(|(port, list)| Some((port, list.as_ref().filter(|l| !l.is_empty())?)))
        .collect();
    if bindings.is_empty() {
        return ports;
    }
    bindings.sort_by_key(|(port, _)| *port);
    if networks.len() > 1 {
        // Docker publishes through the network with the container's default gateway; which
        // one that is depends on priorities xbr does not repeat.
        ports.skipped.push(format!(
            "container {name} is on {} networks: its published ports are left to Docker",
            networks.len()
        ));
        return ports;
    }
    let Some(container_ip) = here
        .ip_address
        .as_deref()
        .and_then(|ip| ip.parse::<Ipv4Addr>().ok())
    else {
        ports.skipped.push(format!(
            "container {name} has no IPv4 address on this network: its published ports are left to Docker"
        ));
        return ports;
    };
    for (port, list) in bindings {
        let parsed = port.split_once('/').and_then(|(number, proto)| {
            let proto = match proto {
                "tcp" => Proto::Tcp,
                "udp" => Proto::Udp,
                _ => return None,
            };
            Some((number.parse::<u16>().ok().filter(|p| *p != 0)?, proto))
        });
        let Some((container_port, proto)) = parsed else {
            ports.skipped.push(format!(
                "container {name} port {port}: only TCP and UDP are accelerated; left to Docker"
            ));
            continue;
        };
        for binding in list {
            let host_ip = binding.host_ip.as_deref().unwrap_or("");
            let host_port = binding.host_port.as_deref().unwrap_or("");
            let Some(host_port) = host_port.parse::<u16>().ok().filter(|p| *p != 0) else {
                ports.skipped.push(format!(
                    "container {name} port {port}: host port `{host_port}` is not a port; left to Docker"
                ));
                continue;
            };
            let host_ip = match host_ip {
                "" | "0.0.0.0" => None,
                ip => match ip.parse::<IpAddr>() {
                    Ok(IpAddr::V4(ip)) => Some(ip),
                    Ok(IpAddr::V6(_)) => {
                        ports.skipped.push(format!(
                            "container {name} port {port}: IPv6 binding [{ip}]:{host_port} left to Docker (xbr translates IPv4)"
                        ));
                        continue;
                    }
                    Err(_) => {
                        ports.skipped.push(format!(
                            "container {name} port {port}: host address `{ip}` does not parse; left to Docker"
                        ));
                        continue;
                    }
                },
            };
            ports.specs.insert(PublishSpec {
                host_ip,
                host_port,
                container_ip,
                container_port,
                proto,
            });
        }
    }
    ports
}

// ---------------------------------------------------------------------------------------------
// The firewall: iptables' filter table on the forwarding path.

/// Reads the filter table with `iptables-save` (read-only). There is no maintained Rust library
/// for iptables over nf_tables, and Docker itself writes its rules with the iptables binary:
/// reading them back the same way sees exactly what Docker and its users wrote, whichever
/// backend (nf_tables or legacy) the host's iptables uses.
pub fn read_iptables() -> std::result::Result<String, String> {
    let output = Command::new("iptables-save")
        .args(["-t", "filter"])
        .output()
        .map_err(|e| format!("cannot run iptables-save: {e}"))?;
    if !output.status.success() {
        return Err(format!(
            "iptables-save failed: {}",
            String::from_utf8_lossy(&output.stderr).trim()
        ));
    }
    Ok(String::from_utf8_lossy(&output.stdout).into_owned())
}

/// Whether frames the bridge forwards between its ports meet iptables (br_netfilter on, with
/// bridge-nf-call-iptables). Without br_netfilter they never do.
pub fn bridged_traffic_filtered() -> bool {
    match std::fs::read_to_string(BRIDGE_NF_CALL_IPTABLES) {
        Ok(value) => value.trim() != "0",
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => false,
        // Unreadable: assume the rules apply (the safe side).
        Err(_) => true,
    }
}

/// The two traffic classes xbr accelerates.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Class {
    /// In on a port of the bridge, out on another one.
    EastWest,
    /// In on some other interface (an uplink), DNATed, out on the bridge.
    Published,
}

#[derive(Clone, Debug, PartialEq, Eq)]
struct Interface {
    /// A name, or a prefix ending in `+`.
    pattern: String,
    negated: bool,
}

impl Interface {
    fn matches(&self, name: &str) -> bool {
        let hit = match self.pattern.strip_suffix('+') {
            Some(prefix) => name.starts_with(prefix),
            None => self.pattern == name,
        };
        hit != self.negated
    }

    /// Whether it matches some interface other than `bridge`.
    fn matches_some_other_than(&self, bridge: &str) -> bool {
        self.negated || self.pattern.ends_with('+') || self.pattern != bridge
    }

    /// Whether it matches every interface other than `bridge`.
    fn matches_all_other_than(&self, bridge: &str) -> bool {
        self.negated && self.pattern == bridge
    }
}

#[derive(Clone, Debug, PartialEq, Eq)]
struct Rule {
    chain: String,
    /// As iptables-save wrote it, for messages.
    text: String,
    input: Option<Interface>,
    output: Option<Interface>,
    target: Option<String>,
    /// Matches other than the interfaces (protocol, addresses, modules).
    other_matches: bool,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Reach {
    None,
    Some,
    Every,
}

impl Rule {
    /// Whether the rule sees packets of `class` on `bridge`: none, some, or every one of them.
    fn reach(&self, class: Class, bridge: &str) -> Reach {
        if self.output.as_ref().is_some_and(|o| !o.matches(bridge)) {
            return Reach::None;
        }
        let (some, every) = match (class, &self.input) {
            (_, None) => (true, true),
            (Class::EastWest, Some(input)) => (input.matches(bridge), input.matches(bridge)),
            (Class::Published, Some(input)) => (
                input.matches_some_other_than(bridge),
                input.matches_all_other_than(bridge),
            ),
        };
        match (some, every && !self.other_matches) {
            (false, _) => Reach::None,
            (true, false) => Reach::Some,
            (true, true) => Reach::Every,
        }
    }

    /// `RETURN` with no match at all: the end of a chain in effect.
    fn is_unconditional_return(&self) -> bool {
        self.target.as_deref() == Some("RETURN")
            && self.input.is_none()
            && self.output.is_none()
            && !self.other_matches
    }
}

/// The filter table as iptables-save prints it.
#[derive(Debug, Default)]
struct FilterTable {
    policies: HashMap<String, String>,
    rules: Vec<Rule>,
}

impl FilterTable {
    fn parse(save: &str) -> FilterTable {
        let mut table = FilterTable::default();
        let mut in_filter = false;
        for line in save.lines().map(str::trim) {
            if let Some(name) = line.strip_prefix('*') {
                in_filter = name == "filter";
            } else if !in_filter {
                continue;
            } else if let Some(chain) = line.strip_prefix(':') {
                let mut fields = chain.split_whitespace();
                if let (Some(name), Some(policy)) = (fields.next(), fields.next()) {
                    table.policies.insert(name.to_owned(), policy.to_owned());
                }
            } else if line.starts_with("-A ") {
                table.rules.extend(parse_rule(line));
            }
        }
        table
    }

    fn chain<'a>(&'a self, name: &'a str) -> impl Iterator<Item = &'a Rule> + 'a {
        self.rules.iter().filter(move |rule| rule.chain == name)
    }

    /// Why packets of `class` on `bridge` must stay on the kernel path, if they must: the
    /// FORWARD chain as the kernel walks it for them.
    fn holds_back(&self, class: Class, bridge: &str) -> Option<String> {
        for rule in self.chain("FORWARD") {
            let reach = rule.reach(class, bridge);
            if reach == Reach::None {
                continue;
            }
            match rule.target.as_deref() {
                // Accepting never drops; accepting every such packet ends the walk.
                Some("ACCEPT") if reach == Reach::Every => return None,
                Some("ACCEPT") | None => continue,
                Some("DOCKER-USER") => {
                    if let Some(reason) = self.user_rule(class, bridge) {
                        return Some(reason);
                    }
                }
                // Isolation between Docker's networks: xbr never crosses bridges anyway.
                Some("DOCKER-ISOLATION-STAGE-1") => continue,
                // Docker's ACCEPT per published port, for exactly the ports the sync mirrors;
                // its rules never match traffic that comes in on the bridge itself.
                Some("DOCKER") if class == Class::Published => return None,
                Some("DOCKER") => continue,
                Some(_) => {
                    return Some(format!(
                        "iptables FORWARD rule `{}` applies to it on the kernel path",
                        rule.text
                    ));
                }
            }
        }
        match self.policies.get("FORWARD").map(String::as_str) {
            None | Some("ACCEPT") => None,
            Some(policy) => Some(format!(
                "the iptables FORWARD policy is {policy} and no rule accepts it"
            )),
        }
    }

    /// The first DOCKER-USER rule (before its final RETURN) that sees packets of `class`.
    fn user_rule(&self, class: Class, bridge: &str) -> Option<String> {
        for rule in self.chain("DOCKER-USER") {
            if rule.is_unconditional_return() {
                return None;
            }
            // A conditional RETURN only skips the rules after it, for some packets.
            if rule.reach(class, bridge) == Reach::None || rule.target.as_deref() == Some("RETURN")
            {
                continue;
            }
            return Some(format!(
                "DOCKER-USER rule `{}` applies to it on the kernel path",
                rule.text
            ));
        }
        None
    }
}

/// One `-A CHAIN ...` line.
fn parse_rule(line: &str) -> Option<Rule> {
    let words = split_words(line);
    let mut words = words.iter().map(String::as_str).peekable();
    words.next(); // -A
    let chain = words.next()?.to_owned();
    let mut rule = Rule {
        chain,
        text: line.to_owned(),
        input: None,
        output: None,
        target: None,
        other_matches: false,
    };
    let mut negated = false;
    while let Some(word) = words.next() {
        match word {
            "!" => {
                negated = true;
                continue;
            }
            "-i" | "--in-interface" | "-o" | "--out-interface" => {
                let interface = Interface {
                    pattern: words.next()?.to_owned(),
                    negated,
                };
                if matches!(word, "-i" | "--in-interface") {
                    rule.input = Some(interface);
                } else {
                    rule.output = Some(interface);
                }
            }
            // Options after the target belong to it (REJECT --reject-with ...).
            "-j" | "--jump" | "-g" | "--goto" => {
                rule.target = Some(words.next()?.to_owned());
                break;
            }
            // A comment matches everything.
            "-m" if words.peek() == Some(&"comment") => {
                words.next();
            }
            "--comment" => {
                words.next();
            }
            _ => rule.other_matches = true,
        }
        negated = false;
    }
    Some(rule)
}

/// Splits an iptables-save line into words; "quoted strings" (comments) stay one word.
fn split_words(line: &str) -> Vec<String> {
    let mut words = Vec::new();
    let mut word = String::new();
    let mut quoted = false;
    let mut chars = line.chars();
    while let Some(c) = chars.next() {
        match c {
            '\\' if quoted => word.extend(chars.next()),
            '"' => quoted = !quoted,
            c if c.is_whitespace() && !quoted => {
                if !word.is_empty() {
                    words.push(std::mem::take(&mut word));
                }
            }
            c => word.push(c),
        }
    }
    if !word.is_empty() {
        words.push(word);
    }
    words
}

/// What may take the fast path on `network`'s bridge: its enable_icc option and the iptables
/// rules (`rules`: iptables-save output, or why it could not be read) decide. East-west traffic
/// meets iptables only when `bridged_filtered` (br_netfilter).
pub fn policy(
    network: &NetworkView,
    rules: std::result::Result<&str, &str>,
    bridged_filtered: bool,
) -> Policy {
    let mut policy = match rules {
        Ok(rules) => {
            let table = FilterTable::parse(rules);
            Policy {
                east_west: bridged_filtered
                    .then(|| table.holds_back(Class::EastWest, &network.bridge))
                    .flatten(),
                published: table.holds_back(Class::Published, &network.bridge),
            }
        }
        Err(why) => {
            let reason = format!(
                "the iptables rules cannot be read ({why}), so xbr cannot tell what they drop"
            );
            Policy {
                east_west: Some(reason.clone()),
                published: Some(reason),
            }
        }
    };
    if !network.icc {
        policy.east_west = Some(format!(
            "Docker network {} has enable_icc=false: its containers may not talk to each other",
            network.name
        ));
    }
    policy
}

// ---------------------------------------------------------------------------------------------
// Talking to Docker.

/// Docker's event stream.
type Events =
    Pin<Box<dyn Stream<Item = std::result::Result<EventMessage, bollard::errors::Error>> + Send>>;

/// A connection to the Docker daemon, on an API version it speaks.
pub struct Client {
    docker: bollard::Docker,
}

impl Client {
    pub async fn connect(socket: &Path) -> Result<Client> {
        let context = || format!("connecting to Docker at {}", socket.display());
        let path = socket.to_string_lossy();
        let docker = bollard::Docker::connect_with_unix(
            &path,
            REQUEST_TIMEOUT_SECS,
            bollard::API_DEFAULT_VERSION,
        )
        .map_err(|e| Error::docker(context(), e))?;
        // A daemon refuses clients newer than itself (Docker 20.10 speaks API 1.41).
        let docker = docker
            .negotiate_version()
            .await
            .map_err(|e| Error::docker(context(), e))?;
        Ok(Client { docker })
    }

    /// The Docker network whose Linux bridge is `bridge`.
    pub async fn network_of(&self, bridge: &str) -> Result<Option<NetworkView>> {
        let filters = HashMap::from([("driver".to_owned(), vec!["bridge".to_owned()])]);
        let networks = self
            .docker
            .list_networks(Some(ListNetworksOptions {
                filters: Some(filters),
            }))
            .await
            .map_err(|e| Error::docker("listing networks", e))?;
        Ok(networks
            .iter()
            .filter_map(network_view)
            .find(|network| network.bridge == bridge))
    }

    /// The published ports of the running containers on `network`.
    pub async fn ports(&self, network: &NetworkView) -> Result<DockerPorts> {
        let inspected = self
            .docker
            .inspect_network(&network.id, None)
            .await
            .map_err(|e| Error::docker(format!("inspecting network {}", network.name), e))?;
        let mut ids: Vec<String> = inspected
            .containers
            .unwrap_or_default()
            .into_keys()
            .collect();
        ids.sort();
        let mut ports = DockerPorts::default();
        for id in ids {
            match self.docker.inspect_container(&id, None).await {
                Ok(container) => ports.extend(container_ports(&container, &network.id)),
                // Gone since the network listed it: nothing of it to publish.
                Err(bollard::errors::Error::DockerResponseServerError {
                    status_code: 404, ..
                }) => {}
                Err(e) => {
                    return Err(Error::docker(format!("inspecting container {id}"), e));
                }
            }
        }
        Ok(ports)
    }

    /// Container start/stop/die and network connect/disconnect: what changes published ports.
    fn events(&self) -> Events {
        let filters = HashMap::from([
            (
                "type".to_owned(),
                vec!["container".to_owned(), "network".to_owned()],
            ),
            (
                "event".to_owned(),
                ["start", "stop", "die", "connect", "disconnect"]
                    .map(str::to_owned)
                    .to_vec(),
            ),
        ]);
        Box::pin(self.docker.events(Some(EventsOptions {
            filters: Some(filters),
            ..Default::default()
        })))
    }
}

/// What Docker and the firewall say about one bridge, read now.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DockerState {
    pub network: NetworkView,
    pub ports: DockerPorts,
    pub policy: Policy,
}

/// A bridge that a Docker network owns, and where that Docker listens.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DockerBridge {
    pub socket: PathBuf,
    pub network: NetworkView,
}

fn block_on<F: std::future::Future>(future: F) -> Result<F::Output> {
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(|e| Error::io("starting a runtime to talk to Docker", e))?;
    Ok(runtime.block_on(future))
}

/// Whether this thread is in the network namespace of PID 1, where Docker's bridges live.
/// Read with readlink: stat on another process's namespace needs ptrace rights. When it
/// cannot be told, yes (`-n NETNS` is how xbr is told to work elsewhere).
fn in_host_netns() -> bool {
    let host = std::fs::read_link("/proc/1/ns/net");
    let here = std::fs::read_link("/proc/thread-self/ns/net");
    match (host, here) {
        (Ok(host), Ok(here)) => host == here,
        _ => true,
    }
}

/// Resolves `--docker` for `bridge`: the Docker network that owns it, or `None` when Docker is
/// off for this bridge. `On` turns every reason for `None` into an error.
pub fn find(choice: DockerChoice, bridge: &str) -> Result<Option<DockerBridge>> {
    let unavailable = |why: String| match choice {
        DockerChoice::On => Err(Error::DockerUnavailable(format!(
            "--docker on: {why}; or attach with --docker off"
        ))),
        _ => {
            debug!(bridge, "not mirroring Docker: {why}");
            Ok(None)
        }
    };
    match choice {
        DockerChoice::Off => return Ok(None),
        DockerChoice::Auto if !in_host_netns() => {
            return unavailable("not in the host's network namespace".to_owned());
        }
        _ => {}
    }
    let socket = match socket() {
        Ok(socket) => socket,
        Err(why) => return unavailable(why),
    };
    if !socket.exists() {
        return unavailable(format!(
            "no Docker socket at {} (start dockerd, or set DOCKER_HOST=unix:///PATH)",
            socket.display()
        ));
    }
    let found = block_on(async {
        let client = Client::connect(&socket).await?;
        client.network_of(bridge).await
    })?;
    match found {
        Ok(Some(network)) => {
            info!(bridge, network = %network.name, "mirroring Docker network");
            Ok(Some(DockerBridge { socket, network }))
        }
        Ok(None) => unavailable(format!(
            "no Docker network uses bridge {bridge} (see `docker network ls`)"
        )),
        Err(error) => {
            if choice == DockerChoice::Auto {
                warn!(%error, "Docker does not answer; attaching without it");
            }
            unavailable(format!("Docker does not answer: {error}"))
        }
    }
}

impl DockerBridge {
    /// Reads the network, its containers' published ports and the firewall now.
    pub async fn observe(&self, client: &Client) -> Result<DockerState> {
        let network = client
            .network_of(&self.network.bridge)
            .await?
            .unwrap_or_else(|| self.network.clone());
        let ports = client.ports(&network).await?;
        let rules = read_iptables();
        let policy = policy(
            &network,
            rules.as_deref().map_err(String::as_str),
            bridged_traffic_filtered(),
        );
        Ok(DockerState {
            network,
            ports,
            policy,
        })
    }

    pub fn observe_blocking(&self) -> Result<DockerState> {
        block_on(async {
            let client = Client::connect(&self.socket).await?;
            self.observe(&client).await
        })?
    }
}

/// For `xbr status`: Docker's view of `bridge` when Docker answers and owns it.
pub fn status(bridge: &str) -> Option<DockerState> {
    find(DockerChoice::Auto, bridge)
        .ok()
        .flatten()?
        .observe_blocking()
        .ok()
}

// ---------------------------------------------------------------------------------------------
// Keeping the PUBLISHED map in step with Docker.

/// What a sync of Docker's published ports changed.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Synced {
    pub added: Vec<PublishSpec>,
    pub removed: Vec<PublishSpec>,
    /// Docker bindings whose host port an `xbr publish` entry holds: the user's entry stays.
    pub held_by_user: Vec<PublishSpec>,
    /// Docker bindings in the map after the sync.
    pub mirrored: usize,
}

impl Synced {
    pub fn is_empty(&self) -> bool {
        self.added.is_empty() && self.removed.is_empty()
    }
}

/// The pure part of a sync: the entries now (spec, whether Docker's) and the wanted Docker
/// bindings -> which Docker entries go and which come. Entries of `xbr publish` stay.
pub fn diff(current: &[(PublishSpec, bool)], wanted: &BTreeSet<PublishSpec>) -> Synced {
    let mut synced = Synced::default();
    for (spec, by_docker) in current {
        if *by_docker && !wanted.contains(spec) {
            synced.removed.push(*spec);
        }
    }
    for spec in wanted {
        match current.iter().find(|(now, _)| now.key() == spec.key()) {
            None => synced.added.push(*spec),
            Some((now, true)) if now != spec => synced.added.push(*spec),
            Some((_, true)) => {}
            Some((_, false)) => synced.held_by_user.push(*spec),
        }
    }
    synced.mirrored = wanted.len() - synced.held_by_user.len();
    synced
}

fn spec_of(key: &PublishedKey, value: &PublishedPort) -> Option<PublishSpec> {
    Some(PublishSpec {
        host_ip: (key.host_ip != [0; 4]).then(|| Ipv4Addr::from(key.host_ip)),
        host_port: u16::from_be_bytes(key.host_port),
        container_ip: Ipv4Addr::from(value.container_ip),
        container_port: u16::from_be_bytes(value.container_port),
        proto: match key.proto {
            IPPROTO_TCP => Proto::Tcp,
            IPPROTO_UDP => Proto::Udp,
            _ => return None,
        },
    })
}

impl Pinned {
    /// Brings the Docker-owned entries of PUBLISHED to `wanted`. New entries point at their
    /// container's port when `containers` knows its address (else the kernel path serves them
    /// until a reconcile finds it); removed ones end their connections.
    pub fn sync_docker_published(
        &mut self,
        wanted: &BTreeSet<PublishSpec>,
        containers: &BTreeMap<Ipv4Addr, (u32, Mac)>,
        bridge_mac: Mac,
    ) -> Result<Synced> {
        let current: Vec<(PublishSpec, bool)> = self
            .published
            .iter()
            .filter_map(|entry| entry.ok())
            .filter_map(|(key, value)| Some((spec_of(&key, &value)?, value.by_docker())))
            .collect();
        let synced = diff(&current, wanted);
        for spec in &synced.removed {
            self.unpublish(spec)?;
        }
        for spec in &synced.added {
            let (ifindex, container_mac) = containers
                .get(&spec.container_ip)
                .copied()
                .unwrap_or((0, [0; 6]));
            let value = PublishedPort {
                container_ip: spec.container_ip.octets(),
                container_port: spec.container_port.to_be_bytes(),
                flags: PublishedPort::BY_DOCKER,
                _pad: 0,
                ifindex,
                container_mac,
                gateway_mac: bridge_mac,
            };
            self.published
                .insert(spec.key(), value, 0)
                .map_err(|e| Error::ebpf("writing the published ports map", e))?;
        }
        Ok(synced)
    }

    /// Removes the Docker-owned published ports (their live connections keep going), so new
    /// connections take Docker's own path: nothing keeps those entries current without a
    /// follower.
    pub fn withdraw_docker_published(&mut self) -> usize {
        let keys: Vec<PublishedKey> = self
            .published
            .iter()
            .filter_map(|entry| entry.ok())
            .filter(|(_, value)| value.by_docker())
            .map(|(key, _)| key)
            .collect();
        keys.iter()
            .filter(|key| self.published.remove(key).is_ok())
            .count()
    }
}

/// After an attach: Docker's published ports are mirrored only with a follower (`follow`) and
/// while the firewall lets them; otherwise Docker-owned entries are removed.
pub fn apply(
    pinned: &mut Pinned,
    state: &DockerState,
    plan: &Plan,
    follow: bool,
) -> Result<Synced> {
    let wanted = if follow && state.policy.published.is_none() {
        state.ports.specs.clone()
    } else {
        BTreeSet::new()
    };
    for skipped in &state.ports.skipped {
        debug!("{skipped}");
    }
    let containers = plan.containers.clone().unwrap_or_default();
    pinned.sync_docker_published(&wanted, &containers, plan.bridge_mac)
}

// ---------------------------------------------------------------------------------------------
// The follower's Docker side.

/// Changes that come closer together than this are handled by one reconcile.
const QUIET: Duration = Duration::from_millis(20);
const MAX_DELAY: Duration = Duration::from_millis(200);

/// What the follower hears from: Docker's events and nftables ruleset changes (iptables-nft
/// writes through nftables, so every iptables change is one).
pub struct Follow {
    bridge: DockerBridge,
    client: Option<Client>,
    events: Option<Events>,
    ruleset: Option<RulesetEvents>,
    last_policy: Option<Policy>,
}

impl Follow {
    pub async fn start(bridge: DockerBridge) -> Follow {
        let ruleset = match RulesetEvents::open() {
            Ok(ruleset) => Some(ruleset),
            Err(error) => {
                warn!(%error, "cannot hear nftables changes; iptables changes are seen at the next resync");
                None
            }
        };
        let mut follow = Follow {
            bridge,
            client: None,
            events: None,
            ruleset,
            last_policy: None,
        };
        follow.subscribe().await;
        follow
    }

    /// (Re)connects to Docker and subscribes to its events, when not subscribed.
    pub async fn subscribe(&mut self) {
        if self.events.is_some() {
            return;
        }
        match Client::connect(&self.bridge.socket).await {
            Ok(client) => {
                self.events = Some(client.events());
                self.client = Some(client);
            }
            Err(error) => warn!(%error, "Docker does not answer; retrying at the next resync"),
        }
    }

    /// Waits for the next change worth a reconcile; never returns when nothing can be heard.
    pub async fn changed(&mut self) {
        let events = async {
            match self.events.as_mut() {
                Some(events) => events.next().await,
                None => std::future::pending().await,
            }
        };
        let ruleset = async {
            match self.ruleset.as_ref() {
                Some(ruleset) => ruleset.changed().await,
                None => std::future::pending().await,
            }
        };
        tokio::select! {
            event = events => match event {
                Some(Ok(event)) => debug!(action = ?event.action, "Docker event"),
                Some(Err(error)) => {
                    warn!(%error, "Docker's event stream failed; resubscribing at the next resync");
                    self.events = None;
                }
                None => {
                    warn!("Docker's event stream ended; resubscribing at the next resync");
                    self.events = None;
                }
            },
            result = ruleset => if let Err(error) = result {
                warn!(%error, "nftables change events failed; iptables changes are seen at the next resync");
                self.ruleset = None;
            },
        }
    }

    /// Docker's and the firewall's view now. When Docker cannot be asked, its published ports
    /// are wanted nowhere (Docker's own path serves them) and icc is as last seen.
    pub async fn observe(&mut self) -> DockerState {
        let observed = match &self.client {
            Some(client) => self.bridge.observe(client).await,
            None => Err(Error::DockerUnavailable("not connected".to_owned())),
        };
        let state = match observed {
            Ok(state) => {
                self.bridge.network = state.network.clone();
                state
            }
            Err(error) => {
                warn!(%error, "reading Docker failed; its published ports take Docker's path for now");
                let rules = read_iptables();
                DockerState {
                    policy: policy(
                        &self.bridge.network,
                        rules.as_deref().map_err(String::as_str),
                        bridged_traffic_filtered(),
                    ),
                    network: self.bridge.network.clone(),
                    ports: DockerPorts::default(),
                }
            }
        };
        if self.last_policy.as_ref() != Some(&state.policy) {
            log_policy(&state.policy);
            self.last_policy = Some(state.policy.clone());
        }
        state
    }
}

fn log_policy(policy: &Policy) {
    match &policy.east_west {
        Some(reason) => info!("east-west traffic takes the bridge: {reason}"),
        None => info!("east-west traffic is accelerated"),
    }
    match &policy.published {
        Some(reason) => info!("Docker's published ports take Docker's path: {reason}"),
        None => info!("Docker's published ports are accelerated"),
    }
}

/// Waits for `follow`'s next change; never returns without one.
pub async fn changed(follow: &mut Option<Follow>) {
    match follow {
        Some(follow) => follow.changed().await,
        None => std::future::pending().await,
    }
}

/// A netlink socket on the nftables multicast group: one message per ruleset change.
struct RulesetEvents {
    socket: tokio::io::unix::AsyncFd<OwnedFd>,
}

impl RulesetEvents {
    fn open() -> std::io::Result<RulesetEvents> {
        let fd = unsafe {
            libc::socket(
                libc::AF_NETLINK,
                libc::SOCK_RAW | libc::SOCK_NONBLOCK | libc::SOCK_CLOEXEC,
                libc::NETLINK_NETFILTER,
            )
        };
        if fd < 0 {
            return Err(std::io::Error::last_os_error());
        }
        let socket = unsafe { OwnedFd::from_raw_fd(fd) };
        let mut address: libc::sockaddr_nl = unsafe { std::mem::zeroed() };
        address.nl_family = libc::AF_NETLINK as libc::sa_family_t;
        let rc = unsafe {
            libc::bind(
                socket.as_raw_fd(),
                (&address as *const libc::sockaddr_nl).cast(),
                std::mem::size_of::<libc::sockaddr_nl>() as libc::socklen_t,
            )
        };
        if rc != 0 {
            return Err(std::io::Error::last_os_error());
        }
        let group: libc::c_int = libc::NFNLGRP_NFTABLES;
        let rc = unsafe {
            libc::setsockopt(
                socket.as_raw_fd(),
                libc::SOL_NETLINK,
                libc::NETLINK_ADD_MEMBERSHIP,
                (&group as *const libc::c_int).cast(),
                std::mem::size_of::<libc::c_int>() as libc::socklen_t,
            )
        };
        if rc != 0 {
            return Err(std::io::Error::last_os_error());
        }
        // SAFETY: the AsyncFd owns the socket, so the descriptor stays open while registered.
        let socket = unsafe {
            tokio::io::unix::AsyncFd::register_with_interest(socket, tokio::io::Interest::READABLE)
        }?;
        Ok(RulesetEvents { socket })
    }

    /// Waits for a ruleset change, then for the burst it belongs to (iptables writes a rule as
    /// a batch of messages, Docker a dozen rules per container) to settle.
    async fn changed(&self) -> std::io::Result<()> {
        self.drain_one().await?;
        let first = tokio::time::Instant::now();
        while first.elapsed() < MAX_DELAY {
            match tokio::time::timeout(QUIET, self.drain_one()).await {
                Ok(result) => result?,
                Err(_) => break,
            }
        }
        Ok(())
    }

    /// Waits until messages arrived, and reads all there are.
    async fn drain_one(&self) -> std::io::Result<()> {
        loop {
            let mut ready = self.socket.readable().await?;
            let mut got = false;
            let mut buffer = [0u8; 16 * 1024];
            loop {
                let n = unsafe {
                    libc::recv(
                        self.socket.as_raw_fd(),
                        buffer.as_mut_ptr().cast(),
                        buffer.len(),
                        libc::MSG_DONTWAIT,
                    )
                };
                if n > 0 {
                    got = true;
                    continue;
                }
                let error = std::io::Error::last_os_error();
                match error.raw_os_error() {
                    _ if n == 0 => break,
                    Some(libc::EAGAIN) => break,
                    // The socket overflowed: changes were missed, which is a change too.
                    Some(libc::ENOBUFS) => got = true,
                    Some(libc::EINTR) => continue,
                    _ => return Err(error),
                }
            }
            ready.clear_ready();
            if got {
                return Ok(());
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// `docker network ls` entries from Docker 20.10, trimmed.
    const NETWORKS: &str = r#"[
      {"Name": "bridge", "Id": "6e676271c3751f2c141fda9cd4cdb468e28361fe9812d9167a12e15a06e16600",
       "Created": "2026-11-28T08:00:19.40628483Z", "Scope": "local", "Driver": "bridge",
       "EnableIPv6": false, "Internal": false, "Attachable": false, "Ingress": false,
       "ConfigOnly": false,
       "Options": {"com.docker.network.bridge.default_bridge": "true",
                   "com.docker.network.bridge.enable_icc": "true",
                   "com.docker.network.bridge.name": "docker0"}, "Labels": {}},
      {"Name": "noicc", "Id": "efbf71399e0371ebf9b3114285510713684107b470d7bed1c3cd81e69ea7f8b8",
       "Driver": "bridge", "Options": {"com.docker.network.bridge.enable_icc": "false"}},
      {"Name": "named", "Id": "0123456789abcdef", "Driver": "bridge",
       "Options": {"com.docker.network.bridge.name": "xbri1"}},
      {"Name": "host", "Id": "5da5db861f21", "Driver": "host", "Options": {}}
    ]"#;

    /// `docker inspect` of a container with `-p 18080:8080 -p 18081:8081/udp` on the default
    /// network (Docker 20.10, trimmed).
    const CONTAINER: &str = r#"{
      "Id": "b05dbb80bd961e79dcfee2ba1604f098b2fa706b35b611c08ea4dea162a79e1c",
      "Name": "/s1",
      "State": {"Status": "running", "Running": true, "Paused": false, "Pid": 29311},
      "HostConfig": {"PortBindings": {"8080/tcp": [{"HostIp": "", "HostPort": "18080"}],
                                      "8081/udp": [{"HostIp": "", "HostPort": "18081"}]}},
      "NetworkSettings": {
        "Bridge": "", "SandboxID": "bd4ea52d9072", "HairpinMode": false,
        "Ports": {
          "8080/tcp": [{"HostIp": "0.0.0.0", "HostPort": "18080"}, {"HostIp": "::", "HostPort": "18080"}],
          "8081/udp": [{"HostIp": "0.0.0.0", "HostPort": "18081"}, {"HostIp": "::", "HostPort": "18081"}],
          "9000/tcp": null
        },
        "Gateway": "10.213.0.1", "IPAddress": "10.213.0.2", "IPPrefixLen": 24,
        "MacAddress": "02:42:0a:d5:00:02",
        "Networks": {
          "bridge": {
            "IPAMConfig": null, "Links": null, "Aliases": null,
            "NetworkID": "6e676271c3751f2c141fda9cd4cdb468e28361fe9812d9167a12e15a06e16600",
            "EndpointID": "ea2f5ea59523", "Gateway": "10.213.0.1", "IPAddress": "10.213.0.2",
            "IPPrefixLen": 24, "IPv6Gateway": "", "GlobalIPv6Address": "",
            "GlobalIPv6PrefixLen": 0, "MacAddress": "02:42:0a:d5:00:02", "DriverOpts": null
          }
        }
      }
    }"#;
    const DEFAULT_NETWORK: &str =
        "6e676271c3751f2c141fda9cd4cdb468e28361fe9812d9167a12e15a06e16600";

    fn networks() -> Vec<Network> {
        serde_json::from_str(NETWORKS).unwrap()
    }

    fn container() -> ContainerInspectResponse {
        serde_json::from_str(CONTAINER).unwrap()
    }

    fn spec(text: &str) -> PublishSpec {
        text.parse().unwrap()
    }

    #[test]
    fn bridges_are_named_like_docker_names_them() {
        let views: Vec<NetworkView> = networks().iter().filter_map(network_view).collect();
        let bridges: Vec<(&str, &str, bool)> = views
            .iter()
            .map(|v| (v.name.as_str(), v.bridge.as_str(), v.icc))
            .collect();
        assert_eq!(
            bridges,
            [
                ("bridge", "docker0", true),
                ("noicc", "br-efbf71399e03", false),
                ("named", "xbri1", true)
            ],
            "the host network has no bridge"
        );
    }

    #[test]
    fn the_default_network_without_a_name_option_is_docker0() {
        let network: Network =
            serde_json::from_str(r#"{"Name": "bridge", "Id": "abc", "Driver": "bridge"}"#).unwrap();
        assert_eq!(network_view(&network).unwrap().bridge, "docker0");
    }

    #[test]
    fn icc_reads_like_go_parse_bool() {
        for (value, icc) in [
            ("true", true),
            ("1", true),
            ("false", false),
            ("0", false),
            ("F", false),
            ("nonsense", false),
        ] {
            assert_eq!(parse_docker_bool(value), icc, "{value}");
        }
    }

    #[test]
    fn a_running_container_publishes_its_ipv4_bindings() {
        let ports = container_ports(&container(), DEFAULT_NETWORK);
        assert_eq!(
            ports.specs,
            BTreeSet::from([
                spec("18080:10.213.0.2:8080/tcp"),
                spec("18081:10.213.0.2:8081/udp")
            ])
        );
        assert_eq!(ports.skipped.len(), 2, "{:?}", ports.skipped);
        assert!(
            ports.skipped.iter().all(|s| s.contains("IPv6")),
            "the [::] bindings are named as skipped: {:?}",
            ports.skipped
        );
    }

    #[test]
    fn a_host_address_binding_keeps_its_address() {
        let mut container = container();
        let settings = container.network_settings.as_mut().unwrap();
        let ports = settings.ports.as_mut().unwrap();
        ports.insert(
            "8080/tcp".to_owned(),
            Some(vec![bollard::models::PortBinding {
                host_ip: Some("127.0.0.1".to_owned()),
                host_port: Some("18082".to_owned()),
            }]),
        );
        ports.insert(
            "5000/sctp".to_owned(),
            Some(vec![bollard::models::PortBinding {
                host_ip: Some("0.0.0.0".to_owned()),
                host_port: Some("5000".to_owned()),
            }]),
        );
        let published = container_ports(&container, DEFAULT_NETWORK);
        assert!(
            published
                .specs
                .contains(&spec("127.0.0.1:18082:10.213.0.2:8080/tcp"))
        );
        assert!(
            published.skipped.iter().any(|s| s.contains("5000/sctp")),
            "{:?}",
            published.skipped
        );
    }

    #[test]
    fn stopped_containers_and_other_networks_publish_nothing() {
        let mut stopped = container();
        stopped.state.as_mut().unwrap().running = Some(false);
        assert_eq!(
            container_ports(&stopped, DEFAULT_NETWORK),
            DockerPorts::default()
        );
        assert_eq!(
            container_ports(&container(), "efbf71399e03"),
            DockerPorts::default()
        );
    }

    #[test]
    fn a_container_on_two_networks_is_left_to_docker() {
        let mut container = container();
        let networks = container
            .network_settings
            .as_mut()
            .unwrap()
            .networks
            .as_mut()
            .unwrap();
        let mut second = networks["bridge"].clone();
        second.network_id = Some("efbf71399e03".to_owned());
        second.ip_address = Some("10.214.0.2".to_owned());
        networks.insert("noicc".to_owned(), second);
        let ports = container_ports(&container, DEFAULT_NETWORK);
        assert!(ports.specs.is_empty());
        assert!(
            ports.skipped[0].contains("2 networks"),
            "{:?}",
            ports.skipped
        );
    }

    /// The filter table of Docker 20.10 with the default network (bridge xbrt9) and an icc=false
    /// network, as iptables-save prints it.
    const DOCKER_RULES: &str = "\
# Generated by iptables-save v1.8.9 (nf_tables)
*filter
:INPUT ACCEPT [0:0]
:FORWARD DROP [0:0]
:OUTPUT ACCEPT [0:0]
:DOCKER - [0:0]
:DOCKER-ISOLATION-STAGE-1 - [0:0]
:DOCKER-ISOLATION-STAGE-2 - [0:0]
:DOCKER-USER - [0:0]
-A FORWARD -j DOCKER-USER
-A FORWARD -j DOCKER-ISOLATION-STAGE-1
-A FORWARD -o br-efbf71399e03 -m conntrack --ctstate RELATED,ESTABLISHED -j ACCEPT
-A FORWARD -o br-efbf71399e03 -j DOCKER
-A FORWARD -i br-efbf71399e03 ! -o br-efbf71399e03 -j ACCEPT
-A FORWARD -o xbrt9 -m conntrack --ctstate RELATED,ESTABLISHED -j ACCEPT
-A FORWARD -o xbrt9 -j DOCKER
-A FORWARD -i xbrt9 ! -o xbrt9 -j ACCEPT
-A FORWARD -i xbrt9 -o xbrt9 -j ACCEPT
-A FORWARD -i br-efbf71399e03 -o br-efbf71399e03 -j DROP
-A DOCKER -d 10.213.0.2/32 ! -i xbrt9 -o xbrt9 -p tcp -m tcp --dport 8080 -j ACCEPT
-A DOCKER-ISOLATION-STAGE-1 -i br-efbf71399e03 ! -o br-efbf71399e03 -j DOCKER-ISOLATION-STAGE-2
-A DOCKER-ISOLATION-STAGE-1 -i xbrt9 ! -o xbrt9 -j DOCKER-ISOLATION-STAGE-2
-A DOCKER-ISOLATION-STAGE-1 -j RETURN
-A DOCKER-ISOLATION-STAGE-2 -o br-efbf71399e03 -j DROP
-A DOCKER-ISOLATION-STAGE-2 -o xbrt9 -j DROP
-A DOCKER-ISOLATION-STAGE-2 -j RETURN
-A DOCKER-USER -j RETURN
COMMIT
";

    fn network(bridge: &str, icc: bool) -> NetworkView {
        NetworkView {
            id: "x".to_owned(),
            name: format!("net-{bridge}"),
            bridge: bridge.to_owned(),
            icc,
        }
    }

    fn with_user_rule(rule: &str) -> String {
        DOCKER_RULES.replace(
            "-A DOCKER-USER -j RETURN",
            &format!("{rule}\n-A DOCKER-USER -j RETURN"),
        )
    }

    #[test]
    fn dockers_own_rules_hold_nothing_back() {
        let policy = policy(&network("xbrt9", true), Ok(DOCKER_RULES), true);
        assert_eq!(policy, Policy::default());
    }

    #[test]
    fn icc_false_keeps_east_west_on_the_bridge_but_not_published_ports() {
        for (icc, reason) in [
            (false, "enable_icc=false"),
            (true, "-i br-efbf71399e03 -o br-efbf71399e03 -j DROP"),
        ] {
            let policy = policy(&network("br-efbf71399e03", icc), Ok(DOCKER_RULES), true);
            assert!(
                policy
                    .east_west
                    .as_deref()
                    .is_some_and(|r| r.contains(reason)),
                "icc {icc}: {policy:?}"
            );
            assert_eq!(policy.published, None, "icc {icc}");
        }
    }

    #[test]
    fn without_br_netfilter_iptables_never_sees_east_west_traffic() {
        let policy = policy(&network("br-efbf71399e03", true), Ok(DOCKER_RULES), false);
        assert_eq!(policy, Policy::default());
    }

    #[test]
    fn docker_user_rules_hold_back_the_classes_they_can_match() {
        let ew = |p: &Policy| p.east_west.is_some();
        let published = |p: &Policy| p.published.is_some();
        for (rule, east_west, outside) in [
            ("-A DOCKER-USER -j DROP", true, true),
            (
                "-A DOCKER-USER -i eth0 -p tcp -m tcp --dport 8080 -j DROP",
                false,
                true,
            ),
            ("-A DOCKER-USER ! -i xbrt9 -j DROP", false, true),
            ("-A DOCKER-USER -i xbrt9 -o xbrt9 -j DROP", true, false),
            ("-A DOCKER-USER -o xbrt+ -j LOG", true, true),
            ("-A DOCKER-USER -i br-efbf71399e03 -j DROP", false, true),
            ("-A DOCKER-USER -o br-efbf71399e03 -j DROP", false, false),
            (
                "-A DOCKER-USER -m comment --comment \"allow all\" -j RETURN",
                false,
                false,
            ),
            ("-A DOCKER-USER -s 10.0.0.0/8 -j RETURN", false, false),
        ] {
            let policy = policy(&network("xbrt9", true), Ok(&with_user_rule(rule)), true);
            assert_eq!(
                (ew(&policy), published(&policy)),
                (east_west, outside),
                "{rule}: {policy:?}"
            );
            if east_west {
                assert!(
                    policy.east_west.unwrap().contains(rule),
                    "the reason names the rule"
                );
            }
        }
    }

    #[test]
    fn rules_after_the_final_return_are_unreachable() {
        let rules = DOCKER_RULES.replace(
            "-A DOCKER-USER -j RETURN",
            "-A DOCKER-USER -j RETURN\n-A DOCKER-USER -j DROP",
        );
        assert_eq!(
            policy(&network("xbrt9", true), Ok(&rules), true),
            Policy::default()
        );
    }

    #[test]
    fn forward_rules_before_dockers_hold_back_what_they_match() {
        let rules = DOCKER_RULES.replace(
            "-A FORWARD -j DOCKER-USER",
            "-A FORWARD -p tcp -m tcp --dport 22 -j REJECT --reject-with icmp-port-unreachable\n-A FORWARD -j DOCKER-USER",
        );
        let held = policy(&network("xbrt9", true), Ok(&rules), true);
        assert!(
            held.east_west.is_some() && held.published.is_some(),
            "{held:?}"
        );
        // After Docker's ACCEPT for every east-west packet, a rule no longer matters to them.
        let rules = format!(
            "{}\n",
            DOCKER_RULES.replace(
                "-A DOCKER -d",
                "-A FORWARD -i xbrt9 -o xbrt9 -j DROP\n-A DOCKER -d",
            )
        );
        assert_eq!(
            policy(&network("xbrt9", true), Ok(&rules), true),
            Policy::default()
        );
    }

    #[test]
    fn no_docker_rules_and_a_drop_policy_hold_everything_back() {
        let rules =
            "*filter\n:INPUT ACCEPT [0:0]\n:FORWARD DROP [0:0]\n:OUTPUT ACCEPT [0:0]\nCOMMIT\n";
        let policy = policy(&network("xbrt9", true), Ok(rules), true);
        assert!(policy.east_west.unwrap().contains("policy is DROP"));
        assert!(policy.published.unwrap().contains("policy is DROP"));
        let no_table = super::policy(&network("xbrt9", true), Ok(""), true);
        assert_eq!(
            no_table,
            Policy::default(),
            "no filter table: nothing filters"
        );
    }

    #[test]
    fn unreadable_rules_hold_everything_back() {
        let policy = policy(
            &network("xbrt9", true),
            Err("cannot run iptables-save"),
            true,
        );
        assert!(policy.east_west.is_some() && policy.published.is_some());
    }

    #[test]
    fn quoted_comments_stay_one_word() {
        assert_eq!(
            split_words(r#"-A DOCKER-USER -m comment --comment "a \"b\" c" -j RETURN"#),
            [
                "-A",
                "DOCKER-USER",
                "-m",
                "comment",
                "--comment",
                "a \"b\" c",
                "-j",
                "RETURN"
            ]
        );
    }

    #[test]
    fn a_sync_touches_only_dockers_entries() {
        let current = [
            (spec("18080:10.213.0.2:8080"), true),
            (spec("18081:10.213.0.9:8081/udp"), true),
            (spec("9000:10.213.0.3:80"), false),
            (spec("18083:10.213.0.4:80"), true),
        ];
        let wanted = BTreeSet::from([
            spec("18080:10.213.0.2:8080"),
            spec("9000:10.213.0.5:80"),
            spec("18083:10.213.0.7:80"),
            spec("18084:10.213.0.2:8084"),
        ]);
        let synced = diff(&current, &wanted);
        assert_eq!(
            synced.removed,
            [
                spec("18081:10.213.0.9:8081/udp"),
                spec("18083:10.213.0.4:80")
            ]
        );
        assert_eq!(
            synced.added,
            [spec("18083:10.213.0.7:80"), spec("18084:10.213.0.2:8084")],
            "a moved binding is replaced, a new one added"
        );
        assert_eq!(synced.held_by_user, [spec("9000:10.213.0.5:80")]);
        assert_eq!(synced.mirrored, 3);
        assert!(diff(&current[..1], &BTreeSet::from([current[0].0])).is_empty());
    }

    #[test]
    fn docker_host_names_a_unix_socket() {
        // Only this test touches DOCKER_HOST in this process.
        unsafe { std::env::set_var("DOCKER_HOST", "unix:///run/x.sock") };
        assert_eq!(socket().unwrap(), PathBuf::from("/run/x.sock"));
        unsafe { std::env::set_var("DOCKER_HOST", "tcp://10.0.0.1:2375") };
        assert!(socket().unwrap_err().contains("unix"));
        unsafe { std::env::remove_var("DOCKER_HOST") };
        assert_eq!(socket().unwrap(), PathBuf::from(DEFAULT_SOCKET));
    }
}
