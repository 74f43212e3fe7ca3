//! Docker through its Engine API (bollard, over Docker's unix socket): the network that owns a
//! bridge, its options and the published ports of its running containers. Pure functions turn
//! them into a set of `PublishSpec`s; the Docker-owned entries of the PUBLISHED map follow that
//! set. Docker's firewall rules are read by the policy reader, like everyone else's.

use std::{
    collections::{BTreeSet, HashMap},
    net::{IpAddr, Ipv4Addr},
    path::{Path, PathBuf},
    pin::Pin,
};

use bollard::{
    models::{ContainerInspectResponse, EventMessage, Network},
    query_parameters::{EventsOptions, ListNetworksOptions},
};
use futures::{Stream, StreamExt as _};
use tracing::{debug, info, warn};

pub mod networks;

use crate::{
    datapath::Pinned,
    error::{Error, Result},
    plan::Plan,
    publish::{Proto, PublishSpec, Synced},
};

/// Where Docker listens unless DOCKER_HOST says otherwise.
pub const DEFAULT_SOCKET: &str = "/var/run/docker.sock";
/// A local daemon answers in milliseconds; one that takes longer is treated as absent.
const REQUEST_TIMEOUT_SECS: u64 = 10;
const BRIDGE_NAME_OPTION: &str = "com.docker.network.bridge.name";
const ICC_OPTION: &str = "com.docker.network.bridge.enable_icc";
const MASQUERADE_OPTION: &str = "com.docker.network.bridge.enable_ip_masquerade";
/// Docker 27+: `nat` (the default) and `nat-unprotected` masquerade; `routed` sends the
/// containers' own addresses out, `isolated` nothing at all.
const GATEWAY_MODE_OPTION: &str = "com.docker.network.bridge.gateway_mode_ipv4";

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
pub fn socket() -> std::result::Result<PathBuf, NotUnixSocket> {
    match std::env::var("DOCKER_HOST") {
        Ok(host) if !host.is_empty() => match host.strip_prefix("unix://") {
            Some(path) => Ok(PathBuf::from(path)),
            None => Err(NotUnixSocket(host)),
        },
        _ => Ok(PathBuf::from(DEFAULT_SOCKET)),
    }
}

/// DOCKER_HOST names something other than a unix socket.
#[derive(Debug, PartialEq, Eq, thiserror::Error)]
#[error(
    "DOCKER_HOST={0} is not a unix socket; xbr talks to the local Docker daemon only \
     (DOCKER_HOST=unix:///PATH)"
)]
pub struct NotUnixSocket(pub String);

/// A Docker network with a Linux bridge, as far as xbr cares.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct NetworkView {
    pub id: String,
    pub name: String,
    /// The Linux bridge that carries it (docker0, br-1a2b3c4d5e6f, or the name it was given).
    pub bridge: String,
    /// `com.docker.network.bridge.enable_icc`: whether its containers may talk to each other.
    pub icc: bool,
    /// `com.docker.network.bridge.enable_ip_masquerade`: whether Docker masquerades its
    /// containers' outbound flows.
    pub masquerade: bool,
    /// `docker network create --internal`: no way out at all.
    pub internal: bool,
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
    let bridge = bridge_name(&id, &name, network.options.as_ref());
    Some(NetworkView {
        id,
        name,
        bridge,
        icc: option(ICC_OPTION).is_none_or(parse_docker_bool),
        masquerade: option(MASQUERADE_OPTION).is_none_or(parse_docker_bool)
            && option(GATEWAY_MODE_OPTION).is_none_or(|mode| mode.starts_with("nat")),
        internal: network.internal.unwrap_or(false),
    })
}

/// The Linux bridge Docker gives bridge network `name` (`id`).
fn bridge_name(id: &str, name: &str, options: Option<&HashMap<String, String>>) -> String {
    match options.and_then(|options| options.get(BRIDGE_NAME_OPTION)) {
        Some(bridge) if !bridge.is_empty() => bridge.to_owned(),
        // The daemon names the default network's bridge in its options; older ones did not.
        _ if name == "bridge" => "docker0".to_owned(),
        _ => format!("br-{}", &id[..id.len().min(12)]),
    }
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
// Talking to Docker.

/// Docker's event stream.
pub type Events =
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

    /// Networks created and removed, containers joining and leaving them: what changes the
    /// networks a host carries (an overlay has a namespace here while a container is on it).
    pub fn engine_events(&self) -> Events {
        let filters = HashMap::from([
            (
                "type".to_owned(),
                vec!["container".to_owned(), "network".to_owned()],
            ),
            (
                "event".to_owned(),
                ["start", "die", "create", "destroy", "connect", "disconnect"]
                    .map(str::to_owned)
                    .to_vec(),
            ),
        ]);
        Box::pin(self.docker.events(Some(EventsOptions {
            filters: Some(filters),
            ..Default::default()
        })))
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

/// What Docker says about one bridge, read now.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DockerState {
    pub network: NetworkView,
    pub ports: DockerPorts,
}

impl DockerState {
    /// Why no container of the network may talk to another, when none may.
    pub fn icc_off(&self) -> Option<String> {
        (!self.network.icc).then(|| {
            format!(
                "Docker network {} has enable_icc=false: its containers may not talk to each other",
                self.network.name
            )
        })
    }
}

/// A bridge that a Docker network owns, and where that Docker listens.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DockerBridge {
    pub socket: PathBuf,
    pub network: NetworkView,
}

pub fn block_on<F: std::future::Future>(future: F) -> Result<F::Output> {
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
        // Another namespace's daemon (a Docker node in a namespace) is asked only when
        // DOCKER_HOST names it.
        DockerChoice::Auto if !in_host_netns() && std::env::var_os("DOCKER_HOST").is_none() => {
            return unavailable(
                "not in the host's network namespace (and DOCKER_HOST is not set)".to_owned(),
            );
        }
        _ => {}
    }
    let socket = match socket() {
        Ok(socket) => socket,
        Err(why) => return unavailable(why.to_string()),
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
    /// Reads the network and its containers' published ports now.
    pub async fn observe(&self, client: &Client) -> Result<DockerState> {
        let network = client
            .network_of(&self.network.bridge)
            .await?
            .unwrap_or_else(|| self.network.clone());
        let ports = client.ports(&network).await?;
        Ok(DockerState { network, ports })
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

/// After an attach: Docker's published ports are mirrored only with a follower (`follow`);
/// otherwise Docker-owned entries are removed. (What the firewall says about each is the
/// reconcile's, as for `xbr publish`.)
pub fn apply(
    pinned: &mut Pinned,
    state: &DockerState,
    plan: &Plan,
    follow: bool,
) -> Result<Synced> {
    let wanted = if follow {
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

/// What the follower hears from Docker: its events (containers starting and stopping, network
/// connects), on a connection it re-opens when Docker restarts.
pub struct Follow {
    bridge: DockerBridge,
    client: Option<Client>,
    events: Option<Events>,
}

impl Follow {
    pub async fn start(bridge: DockerBridge) -> Follow {
        let mut follow = Follow {
            bridge,
            client: None,
            events: None,
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
        let event = match self.events.as_mut() {
            Some(events) => events.next().await,
            None => std::future::pending().await,
        };
        match event {
            Some(Ok(event)) => debug!(action = ?event.action, "Docker event"),
            Some(Err(error)) => {
                warn!(%error, "Docker's event stream failed; resubscribing at the next resync");
                self.events = None;
            }
            None => {
                warn!("Docker's event stream ended; resubscribing at the next resync");
                self.events = None;
            }
        }
    }

    /// Docker's view now. When Docker cannot be asked, its published ports are wanted nowhere
    /// (Docker's own path serves them) and icc is as last seen.
    pub async fn observe(&mut self) -> DockerState {
        let observed = match &self.client {
            Some(client) => self.bridge.observe(client).await,
            None => Err(Error::DockerUnavailable("not connected".to_owned())),
        };
        match observed {
            Ok(state) => {
                self.bridge.network = state.network.clone();
                state
            }
            Err(error) => {
                warn!(%error, "reading Docker failed; its published ports take Docker's path for now");
                DockerState {
                    network: self.bridge.network.clone(),
                    ports: DockerPorts::default(),
                }
            }
        }
    }
}

/// Waits for `follow`'s next change; never returns without one.
pub async fn changed(follow: &mut Option<Follow>) {
    match follow {
        Some(follow) => follow.changed().await,
        None => std::future::pending().await,
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
    fn a_network_masquerades_unless_internal_or_told_not_to() {
        let view = |json: &str| network_view(&serde_json::from_str(json).unwrap()).unwrap();
        let default = view(r#"{"Name": "a", "Id": "a1", "Driver": "bridge"}"#);
        assert!(default.masquerade && !default.internal);
        let internal = view(r#"{"Name": "b", "Id": "b1", "Driver": "bridge", "Internal": true}"#);
        assert!(internal.internal);
        for (option, value, masquerades) in [
            (
                "com.docker.network.bridge.enable_ip_masquerade",
                "false",
                false,
            ),
            (
                "com.docker.network.bridge.enable_ip_masquerade",
                "true",
                true,
            ),
            (
                "com.docker.network.bridge.gateway_mode_ipv4",
                "routed",
                false,
            ),
            (
                "com.docker.network.bridge.gateway_mode_ipv4",
                "isolated",
                false,
            ),
            ("com.docker.network.bridge.gateway_mode_ipv4", "nat", true),
            (
                "com.docker.network.bridge.gateway_mode_ipv4",
                "nat-unprotected",
                true,
            ),
        ] {
            let network = view(&format!(
                r#"{{"Name": "c", "Id": "c1", "Driver": "bridge", "Options": {{"{option}": "{value}"}}}}"#
            ));
            assert_eq!(network.masquerade, masquerades, "{option}={value}");
        }
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

    #[test]
    fn docker_host_names_a_unix_socket() {
        // Only this test touches DOCKER_HOST in this process.
        unsafe { std::env::set_var("DOCKER_HOST", "unix:///run/x.sock") };
        assert_eq!(socket().unwrap(), PathBuf::from("/run/x.sock"));
        unsafe { std::env::set_var("DOCKER_HOST", "tcp://10.0.0.1:2375") };
        assert_eq!(
            socket().unwrap_err(),
            NotUnixSocket("tcp://10.0.0.1:2375".to_owned())
        );
        unsafe { std::env::remove_var("DOCKER_HOST") };
        assert_eq!(socket().unwrap(), PathBuf::from(DEFAULT_SOCKET));
    }
}
