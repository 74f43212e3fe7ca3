//! Docker networks by the names people give them (`xbr attach mynet`): which Linux bridge
//! carries a network on this host, and in which network namespace.
//!
//! A bridge network's bridge (docker0, br-<id>) lives in the daemon's namespace. An overlay
//! network has a namespace of its own on every host where one of its containers runs,
//! `<exec-root>/netns/1-<first 10 of the id>`, holding a bridge `br0` whose ports are
//! `vxlan0` and the local containers' veths. The exec-root is read from the daemon (a
//! container's sandbox key lives beside it), not assumed.

use std::path::{Path, PathBuf};

use bollard::models::NetworkInspect;
use serde::Serialize;

use super::Client;
use crate::error::{Error, Result};

/// The bridge inside an overlay network's namespace.
pub const OVERLAY_BRIDGE: &str = "br0";
/// `docker network create -d overlay --opt encrypted`.
const ENCRYPTED_OPTION: &str = "encrypted";

/// Where a Docker network's bridge is on this host.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct Placed {
    pub id: String,
    pub name: String,
    pub driver: String,
    /// The bridge's network namespace: `None` for the daemon's own (the bridge driver's),
    /// an overlay network's namespace file otherwise.
    pub netns: Option<PathBuf>,
    pub bridge: String,
    /// An overlay network's load balancer endpoint on this host (`lb-<network>`), which
    /// stays on Docker's path; its MAC.
    pub load_balancer: Option<String>,
}

impl Placed {
    /// The endpoints that stay on Docker's path, for `Policy::held_endpoints`.
    pub fn held_endpoints(&self) -> std::collections::BTreeMap<[u8; 6], String> {
        self.load_balancer
            .as_deref()
            .and_then(parse_mac)
            .map(|mac| {
                (
                    mac,
                    "is the network's load balancer endpoint (Docker's path)".to_owned(),
                )
            })
            .into_iter()
            .collect()
    }
}

/// `02:42:0a:fb:00:03`
fn parse_mac(text: &str) -> Option<[u8; 6]> {
    let bytes: Vec<u8> = text
        .split(':')
        .map(|part| u8::from_str_radix(part, 16))
        .collect::<std::result::Result<_, _>>()
        .ok()?;
    bytes.try_into().ok()
}

/// Where `network` is carried on this host, or why xbr leaves it to Docker. `sandboxes`: the
/// directory of the daemon's namespace files (`<exec-root>/netns`), known when a container of
/// this host is on the network.
pub fn place(
    network: &NetworkInspect,
    sandboxes: Option<&Path>,
) -> std::result::Result<Placed, String> {
    let id = network.id.clone().unwrap_or_default();
    let name = network.name.clone().unwrap_or_default();
    let driver = network.driver.clone().unwrap_or_default();
    // Docker lists the load balancer endpoint under `lb-<network>` among the containers.
    let load_balancer = network
        .containers
        .iter()
        .flatten()
        .find(|(key, _)| key.starts_with("lb-"))
        .and_then(|(_, endpoint)| endpoint.mac_address.clone());
    let placed = |netns: Option<PathBuf>, bridge: String| Placed {
        id: id.clone(),
        name: name.clone(),
        driver: driver.clone(),
        netns,
        bridge,
        load_balancer: load_balancer.clone(),
    };
    match driver.as_str() {
        "bridge" => Ok(placed(
            None,
            super::bridge_name(&id, &name, network.options.as_ref()),
        )),
        "overlay" if network.ingress == Some(true) => Err("it is the ingress network (the \
             routing mesh of published service ports), which stays on Docker's path"
            .to_owned()),
        "overlay"
            if network
                .options
                .as_ref()
                .is_some_and(|options| options.contains_key(ENCRYPTED_OPTION)) =>
        {
            Err(
                "it is an encrypted overlay (IPsec between hosts), which stays on Docker's \
                 path"
                    .to_owned(),
            )
        }
        "overlay" => match sandboxes {
            Some(dir) if id.len() >= 10 => Ok(placed(
                Some(dir.join(format!("1-{}", &id[..10]))),
                OVERLAY_BRIDGE.to_owned(),
            )),
            Some(_) => Err(format!("Docker gave it an id too short to name it ({id})")),
            None => Err(
                "no container of this host is on it, so it has no namespace here \
                         yet (start one on it)"
                    .to_owned(),
            ),
        },
        "" => Err("Docker names no driver for it".to_owned()),
        other => Err(format!(
            "its driver, {other}, puts no Linux bridge between containers"
        )),
    }
}

/// Keys of a network's `Containers` that are not containers: an overlay's load balancer
/// endpoint (`lb-<network>`) and the routing mesh's sandbox.
fn is_container_id(key: &str) -> bool {
    key.len() == 64 && key.bytes().all(|b| b.is_ascii_hexdigit())
}

impl Client {
    /// The network Docker knows as `name` (its name, ID or a unique ID prefix, as `docker
    /// network inspect` takes them) and where it is carried; `None` when there is none.
    pub async fn placed(&self, name: &str) -> Result<Option<std::result::Result<Placed, String>>> {
        let network = match self.docker.inspect_network(name, None).await {
            Ok(network) => network,
            Err(bollard::errors::Error::DockerResponseServerError {
                status_code: 404, ..
            }) => return Ok(None),
            Err(e) => return Err(Error::docker(format!("inspecting network {name}"), e)),
        };
        let sandboxes = match self.sandboxes(&network).await? {
            Some(dir) => Some(dir),
            None => self.any_sandboxes().await?,
        };
        let placed = place(&network, sandboxes.as_deref()).and_then(|placed| match &placed.netns {
            // Docker makes an overlay's namespace when a container of this host joins it, and
            // removes it when nothing of this host (a container, its load balancer) is left.
            Some(path) if !crate::netns::is_namespace(path) => Err(format!(
                "nothing of this host is on it, so it has no namespace here ({} does not \
                 exist; start a container on it)",
                path.display()
            )),
            _ => Ok(placed),
        });
        Ok(Some(placed))
    }

    /// The daemon's directory of namespace files, from any container of this host.
    async fn any_sandboxes(&self) -> Result<Option<PathBuf>> {
        let containers = self
            .docker
            .list_containers(None::<bollard::query_parameters::ListContainersOptions>)
            .await
            .map_err(|e| Error::docker("listing containers", e))?;
        for id in containers.into_iter().filter_map(|c| c.id) {
            if let Some(dir) = self.sandbox_dir_of(&id).await? {
                return Ok(Some(dir));
            }
        }
        Ok(None)
    }

    /// The directory of container `id`'s namespace file; `None` when it has none (or is gone).
    async fn sandbox_dir_of(&self, id: &str) -> Result<Option<PathBuf>> {
        let container = match self.docker.inspect_container(id, None).await {
            Ok(container) => container,
            Err(bollard::errors::Error::DockerResponseServerError {
                status_code: 404, ..
            }) => return Ok(None),
            Err(e) => return Err(Error::docker(format!("inspecting container {id}"), e)),
        };
        let key = container
            .network_settings
            .and_then(|settings| settings.sandbox_key)
            .filter(|key| !key.is_empty());
        Ok(key
            .as_deref()
            .map(Path::new)
            .and_then(Path::parent)
            .map(Path::to_owned))
    }

    /// Every network of the engine and where it is carried here (or why not), by name.
    pub async fn all_placed(&self) -> Result<Vec<(String, std::result::Result<Placed, String>)>> {
        let listed = self
            .docker
            .list_networks(None::<bollard::query_parameters::ListNetworksOptions>)
            .await
            .map_err(|e| Error::docker("listing networks", e))?;
        let mut placed = Vec::new();
        for network in listed {
            let Some(id) = network.id else { continue };
            // Removed since listed: nothing to place.
            if let Some(found) = self.placed(&id).await? {
                placed.push((network.name.unwrap_or(id), found));
            }
        }
        placed.sort_by(|a, b| a.0.cmp(&b.0));
        Ok(placed)
    }

    /// The daemon's directory of namespace files, read from the sandbox key of a container of
    /// this host on `network`; `None` when it has none.
    async fn sandboxes(&self, network: &NetworkInspect) -> Result<Option<PathBuf>> {
        let mut ids: Vec<&String> = network
            .containers
            .iter()
            .flatten()
            .map(|(id, _)| id)
            .filter(|id| is_container_id(id))
            .collect();
        ids.sort();
        for id in ids {
            if let Some(dir) = self.sandbox_dir_of(id).await? {
                return Ok(Some(dir));
            }
        }
        Ok(None)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const OVERLAY_ID: &str = "k5w2mbq0ac1m0r0n4s1vn9gcl";

    fn network(json: &str) -> NetworkInspect {
        serde_json::from_str(json).unwrap()
    }

    #[test]
    fn a_bridge_network_is_its_bridge_here() {
        let placed = place(
            &network(
                r#"{"Name": "web", "Id": "0123456789abcdef0123", "Driver": "bridge",
                    "Options": {}}"#,
            ),
            None,
        )
        .unwrap();
        assert_eq!(placed.bridge, "br-0123456789ab");
        assert_eq!(placed.netns, None);
        assert_eq!(placed.driver, "bridge");
    }

    #[test]
    fn an_overlay_network_is_br0_in_its_own_namespace() {
        let placed = place(
            &network(&format!(
                r#"{{"Name": "swlov", "Id": "{OVERLAY_ID}", "Driver": "overlay",
                     "Options": {{"com.docker.network.driver.overlay.vxlanid_list": "4097"}}}}"#
            )),
            Some(Path::new("/run/docker/netns")),
        )
        .unwrap();
        assert_eq!(placed.bridge, "br0");
        assert_eq!(
            placed.netns.as_deref(),
            Some(Path::new("/run/docker/netns/1-k5w2mbq0ac"))
        );
    }

    #[test]
    fn what_stays_on_dockers_path_says_why() {
        let overlay = |extra: &str| {
            network(&format!(
                r#"{{"Name": "n", "Id": "{OVERLAY_ID}", "Driver": "overlay" {extra}}}"#
            ))
        };
        let sandboxes = Some(Path::new("/run/docker/netns"));
        let why = |network: &NetworkInspect, sandboxes| place(network, sandboxes).unwrap_err();
        assert!(why(&overlay(r#", "Ingress": true"#), sandboxes).contains("ingress"));
        assert!(
            why(&overlay(r#", "Options": {"encrypted": ""}"#), sandboxes).contains("encrypted")
        );
        assert!(why(&overlay(""), None).contains("no container of this host"));
        assert!(
            why(
                &network(r#"{"Name": "host", "Id": "5da5db861f21", "Driver": "host"}"#),
                None
            )
            .contains("driver, host,")
        );
    }

    #[test]
    fn the_load_balancer_endpoint_is_held() {
        let placed = place(
            &network(&format!(
                r#"{{"Name": "swlov", "Id": "{OVERLAY_ID}", "Driver": "overlay",
                     "Containers": {{
                       "lb-swlov": {{"Name": "swlov-endpoint", "MacAddress": "02:42:0a:fb:00:03",
                                    "IPv4Address": "10.251.0.3/24"}},
                       "{c1}": {{"Name": "c1", "MacAddress": "02:42:0a:fb:00:02",
                                 "IPv4Address": "10.251.0.2/24"}}}}}}"#,
                c1 = "ab".repeat(32)
            )),
            Some(Path::new("/run/docker/netns")),
        )
        .unwrap();
        assert_eq!(
            placed.held_endpoints().into_keys().collect::<Vec<_>>(),
            [[0x02, 0x42, 0x0a, 0xfb, 0x00, 0x03]]
        );
    }

    #[test]
    fn load_balancer_endpoints_are_not_containers() {
        assert!(!is_container_id("lb-swlov"));
        assert!(!is_container_id("ingress-sbox"));
        assert!(is_container_id(&"ab".repeat(32)));
    }
}
