//! A Docker overlay network without Docker: two "nodes" (namespaces joined by an underlay veth)
//! and, per overlay network and node, an overlay namespace laid out as Docker's overlay driver
//! lays it out, built with the real `ip` and `bridge` tools.
//!
//! Per network and node, Docker makes:
//! - a namespace holding bridge `br0` (MTU 1450, the network's gateway address);
//! - a VXLAN device created in the node's namespace (`id VNI dstport 4789 proxy l2miss l3miss
//!   learning`, no `local`, no `dev`) and moved into the overlay namespace as `vxlan0`: its UDP
//!   socket stays in the node's namespace, bound to 0.0.0.0:4789 and shared by every VNI;
//! - one veth pair per local container, `eth0` inside the container (MTU 1450, a MAC made from
//!   its address, 02:42:IP), the other end a port of `br0`;
//! - for each container on another node, a permanent FDB entry on `vxlan0` pointing at that
//!   node (`bridge fdb add MAC dev vxlan0 dst NODE self permanent`) and a permanent neighbour
//!   entry (`ip neigh add IP lladdr MAC dev vxlan0 nud permanent`), so that `vxlan0` answers
//!   ARP for remote containers itself (`proxy`) and knows where to send their frames. Docker
//!   writes both with netlink's add-or-replace (NeighSet), as `bridge fdb replace` and `ip
//!   neigh replace` do here: a MAC that `learning` picked up from inbound traffic meanwhile
//!   does not make the permanent entry fail.
//!
//! Every namespace gets a name no parallel test shares and is deleted when the lab drops, on
//! every path (the VXLAN devices go with their namespaces). The machine's own namespace is
//! never touched.

use std::net::{Ipv4Addr, UdpSocket};
use std::path::PathBuf;
use std::process::Command;
use std::time::Duration;

use xbr::netns::NetNs;

use crate::lab_support::{run, unique_name};
use crate::witness::{without_root_cgroup, xbr_ok, xbr_quietly};

/// The VXLAN UDP port Docker uses.
pub const VXLAN_PORT: u16 = 4789;
/// Docker's overlay MTU: 1500 on the underlay minus 50 bytes of VXLAN encapsulation.
pub const OVERLAY_MTU: &str = "1450";
/// Containers per network and node.
pub const CONTAINERS_PER_NODE: usize = 2;
/// Nodes in every lab.
pub const NODES: usize = 2;

/// What one overlay network is: its VNI, its /24 (`a.b.c.0/24`, gateway `.1`) and the last
/// octet of its first container's address (the others follow, node by node).
#[derive(Clone, Copy, Debug)]
pub struct NetworkSpec {
    pub vni: u32,
    pub subnet: [u8; 3],
    pub first_host: u8,
}

/// A node: a namespace with the underlay interface `ul0`.
#[derive(Clone, Debug)]
pub struct Node {
    pub netns: String,
    pub underlay_ip: Ipv4Addr,
}

/// A container of an overlay network.
#[derive(Clone, Debug)]
pub struct Container {
    pub netns: String,
    /// Its port on the overlay namespace's `br0`.
    pub port: String,
    pub ip: Ipv4Addr,
    pub mac: String,
    /// Index of the node it runs on.
    pub node: usize,
}

impl Container {
    pub fn ns(&self) -> NetNs {
        NetNs::open(&self.netns).expect("container namespace exists")
    }
}

/// One overlay network across the nodes.
#[derive(Clone, Debug)]
pub struct Network {
    pub spec: NetworkSpec,
    /// The overlay namespace on each node (index = node).
    pub overlay: Vec<String>,
    /// The containers on each node (index = node).
    pub containers: Vec<Vec<Container>>,
}

impl Network {
    /// Container `index` on node `node`.
    pub fn container(&self, node: usize, index: usize) -> &Container {
        &self.containers[node][index]
    }

    /// Every container of the network, node by node.
    pub fn all_containers(&self) -> impl Iterator<Item = &Container> {
        self.containers.iter().flatten()
    }

    /// Removes `peer` (a container on another node) from node `node`'s `vxlan0`, as Docker
    /// does when that container stops: its FDB entry, then its neighbour entry.
    pub fn forget_peer(&self, node: usize, peer: &Container) {
        let overlay = &self.overlay[node];
        run(
            "bridge",
            &[
                "-n", overlay, "fdb", "del", &peer.mac, "dev", "vxlan0", "self",
            ],
        );
        run(
            "ip",
            &[
                "-n",
                overlay,
                "neigh",
                "del",
                &peer.ip.to_string(),
                "dev",
                "vxlan0",
            ],
        );
    }

    /// Programs `peer` (a container on node `peer_node`) into node `node`'s `vxlan0`, as
    /// Docker does when it learns of a remote container.
    pub fn learn_peer(&self, node: usize, peer: &Container, peer_node: &Node) {
        let overlay = &self.overlay[node];
        run(
            "bridge",
            &[
                "-n",
                overlay,
                "fdb",
                "replace",
                &peer.mac,
                "dev",
                "vxlan0",
                "dst",
                &peer_node.underlay_ip.to_string(),
                "self",
                "permanent",
            ],
        );
        run(
            "ip",
            &[
                "-n",
                overlay,
                "neigh",
                "replace",
                &peer.ip.to_string(),
                "lladdr",
                &peer.mac,
                "dev",
                "vxlan0",
                "nud",
                "permanent",
            ],
        );
    }
}

/// Two nodes and their overlay networks; every namespace is deleted on drop.
pub struct OverlayLab {
    pub nodes: Vec<Node>,
    pub networks: Vec<Network>,
    /// Namespaces made, in the order made (deleted in reverse).
    made: Vec<String>,
}

impl OverlayLab {
    /// Builds two nodes and `networks` on both, each container of one node programmed into
    /// the other node's `vxlan0`. Panics if any step fails (the namespaces made so far are
    /// deleted as the half-built lab drops).
    pub fn up(networks: &[NetworkSpec]) -> OverlayLab {
        let prefix = unique_name("ov");
        let mut lab = OverlayLab {
            nodes: Vec::new(),
            networks: Vec::new(),
            made: Vec::new(),
        };
        lab.underlay(&prefix);
        for spec in networks {
            let network = lab.network(&prefix, *spec);
            lab.networks.push(network);
        }
        for network in &lab.networks {
            for (node, _) in lab.nodes.iter().enumerate() {
                for (peer_node, containers) in network.containers.iter().enumerate() {
                    if peer_node == node {
                        continue;
                    }
                    for peer in containers {
                        network.learn_peer(node, peer, &lab.nodes[peer_node]);
                    }
                }
            }
        }
        lab
    }

    fn add_netns(&mut self, name: &str) {
        run("ip", &["netns", "add", name]);
        self.made.push(name.to_owned());
        run("ip", &["-n", name, "link", "set", "lo", "up"]);
    }

    /// Nodes `PREFIXn0` and `PREFIXn1`, joined by veth `ul0` (192.168.88.1-2/24).
    fn underlay(&mut self, prefix: &str) {
        for node in 0..NODES {
            let netns = format!("{prefix}n{node}");
            self.add_netns(&netns);
            self.nodes.push(Node {
                netns,
                underlay_ip: Ipv4Addr::new(192, 168, 88, node as u8 + 1),
            });
        }
        let (first, second) = (&self.nodes[0].netns, &self.nodes[1].netns);
        run(
            "ip",
            &[
                "-n", first, "link", "add", "ul0", "type", "veth", "peer", "name", "ul0", "netns",
                second,
            ],
        );
        for node in &self.nodes {
            let address = format!("{}/24", node.underlay_ip);
            run(
                "ip",
                &["-n", &node.netns, "addr", "add", &address, "dev", "ul0"],
            );
            run("ip", &["-n", &node.netns, "link", "set", "ul0", "up"]);
        }
    }

    /// Network `spec` on every node: overlay namespace `PREFIXn<node>v<vni>` with br0 and
    /// vxlan0, and its containers `PREFIXn<node>v<vni>c<index>` behind ports `veth<index>`.
    fn network(&mut self, prefix: &str, spec: NetworkSpec) -> Network {
        let [a, b, c] = spec.subnet;
        let gateway = format!("{}/24", Ipv4Addr::new(a, b, c, 1));
        let mut network = Network {
            spec,
            overlay: Vec::new(),
            containers: Vec::new(),
        };
        for node in 0..NODES {
            let overlay = format!("{prefix}n{node}v{}", spec.vni);
            self.add_netns(&overlay);
            run(
                "ip",
                &[
                    "-n",
                    &overlay,
                    "link",
                    "add",
                    "br0",
                    "mtu",
                    OVERLAY_MTU,
                    "type",
                    "bridge",
                ],
            );
            run(
                "ip",
                &["-n", &overlay, "addr", "add", &gateway, "dev", "br0"],
            );
            run("ip", &["-n", &overlay, "link", "set", "br0", "up"]);
            self.vxlan(node, &overlay, spec.vni);

            let mut containers = Vec::new();
            for index in 0..CONTAINERS_PER_NODE {
                let last = spec.first_host + (node * CONTAINERS_PER_NODE + index) as u8;
                let container = Container {
                    netns: format!("{overlay}c{index}"),
                    port: format!("veth{index}"),
                    ip: Ipv4Addr::new(a, b, c, last),
                    mac: format!("02:42:{a:02x}:{b:02x}:{c:02x}:{last:02x}"),
                    node,
                };
                self.container(&overlay, &container);
                containers.push(container);
            }
            network.overlay.push(overlay);
            network.containers.push(containers);
        }
        network
    }

    /// The VXLAN device as Docker makes it: created in the node's namespace under a name of
    /// its own, moved into the overlay namespace, renamed `vxlan0` and enslaved to br0.
    fn vxlan(&self, node: usize, overlay: &str, vni: u32) {
        let node_ns = &self.nodes[node].netns;
        let temporary = format!("vx-{vni:06x}");
        let vni = vni.to_string();
        let port = VXLAN_PORT.to_string();
        run(
            "ip",
            &[
                "-n",
                node_ns,
                "link",
                "add",
                &temporary,
                "mtu",
                OVERLAY_MTU,
                "type",
                "vxlan",
                "id",
                &vni,
                "dstport",
                &port,
                "proxy",
                "l2miss",
                "l3miss",
                "learning",
            ],
        );
        run(
            "ip",
            &["-n", node_ns, "link", "set", &temporary, "netns", overlay],
        );
        run(
            "ip",
            &["-n", overlay, "link", "set", &temporary, "name", "vxlan0"],
        );
        run(
            "ip",
            &["-n", overlay, "link", "set", "vxlan0", "master", "br0"],
        );
        run("ip", &["-n", overlay, "link", "set", "vxlan0", "up"]);
    }

    /// A container behind a veth port of the overlay namespace's br0.
    fn container(&mut self, overlay: &str, container: &Container) {
        let netns = &container.netns;
        self.add_netns(netns);
        run(
            "ip",
            &[
                "-n",
                overlay,
                "link",
                "add",
                &container.port,
                "mtu",
                OVERLAY_MTU,
                "type",
                "veth",
                "peer",
                "name",
                "eth0",
                "mtu",
                OVERLAY_MTU,
                "netns",
                netns,
            ],
        );
        run(
            "ip",
            &[
                "-n",
                netns,
                "link",
                "set",
                "eth0",
                "address",
                &container.mac,
            ],
        );
        let address = format!("{}/24", container.ip);
        run("ip", &["-n", netns, "addr", "add", &address, "dev", "eth0"]);
        run("ip", &["-n", netns, "link", "set", "eth0", "up"]);
        run(
            "ip",
            &[
                "-n",
                overlay,
                "link",
                "set",
                &container.port,
                "master",
                "br0",
            ],
        );
        run("ip", &["-n", overlay, "link", "set", &container.port, "up"]);
    }

    /// Every namespace of the lab (`ip netns list` must show none of them after drop).
    pub fn namespaces(&self) -> &[String] {
        &self.made
    }
}

impl Drop for OverlayLab {
    fn drop(&mut self) {
        for netns in self.made.iter().rev() {
            let _ = Command::new("ip").args(["netns", "del", netns]).output();
        }
    }
}

/// One private pin root serving several namespaces, as the machine's one pin root serves
/// every namespace (xbr keys its pins by the namespace's inode). On drop `br0` is detached in
/// each namespace, then the root is removed, on every path.
pub struct SharedPinRoot {
    pub path: PathBuf,
    namespaces: Vec<String>,
}

impl SharedPinRoot {
    pub fn new(namespaces: &[String]) -> SharedPinRoot {
        SharedPinRoot {
            path: PathBuf::from(format!("/sys/fs/bpf/{}", unique_name("xbrtest"))),
            namespaces: namespaces.to_vec(),
        }
    }

    pub fn arg(&self) -> &str {
        self.path.to_str().expect("UTF-8 pin root")
    }

    /// `xbr -n NETNS --pin-root ROOT ARGS...`; panics with its stderr unless it succeeds.
    pub fn xbr_ok(&self, netns: &str, args: &[&str]) -> String {
        let mut full = vec!["-n", netns, "--pin-root", self.arg()];
        full.extend_from_slice(args);
        xbr_ok(&without_root_cgroup(&full))
    }

    /// `xbr status --json` in `netns`.
    pub fn status(&self, netns: &str) -> serde_json::Value {
        serde_json::from_str(&self.xbr_ok(netns, &["status", "--json"])).expect("status --json")
    }

    /// `xbr stats br0 --json` in `netns`.
    pub fn stats(&self, netns: &str) -> serde_json::Value {
        serde_json::from_str(&self.xbr_ok(netns, &["stats", "br0", "--json"]))
            .expect("stats --json")
    }
}

impl Drop for SharedPinRoot {
    fn drop(&mut self) {
        for netns in &self.namespaces {
            xbr_quietly(&[
                "-n",
                netns,
                "--pin-root",
                self.path.to_str().unwrap_or_default(),
                "detach",
                "br0",
            ]);
        }
        let _ = std::fs::remove_dir_all(&self.path);
    }
}

/// Sends `count` datagrams from `client` to `to:port` without waiting for answers (for traffic
/// that must not arrive; a witness at the receiver counts what did).
pub fn send_udp(client: &NetNs, to: Ipv4Addr, port: u16, count: usize) {
    let socket = client
        .run(|| UdpSocket::bind((Ipv4Addr::UNSPECIFIED, 0)))
        .expect("enter client namespace")
        .expect("bind UDP sender");
    for i in 0..count {
        // Unreachable destinations may report errors back on the socket; they are no failure.
        let _ = socket.send_to(format!("datagram {i}").as_bytes(), (to, port));
        std::thread::sleep(Duration::from_millis(2));
    }
}

/// Pins `ip`'s neighbour entry in `netns` to `mac` (`nud permanent` on eth0): the container
/// then sends to that MAC without asking ARP, as it does with a cached entry.
pub fn pin_neighbour(netns: &str, ip: Ipv4Addr, mac: &str) {
    run(
        "ip",
        &[
            "-n",
            netns,
            "neigh",
            "replace",
            &ip.to_string(),
            "lladdr",
            mac,
            "dev",
            "eth0",
            "nud",
            "permanent",
        ],
    );
}

/// Whether a TCP connection from `client` to `to:port` is set up within `limit`.
pub fn tcp_connects(client: &NetNs, to: Ipv4Addr, port: u16, limit: Duration) -> bool {
    let address = (to, port).into();
    client
        .run(|| std::net::TcpStream::connect_timeout(&address, limit))
        .expect("enter client namespace")
        .is_ok()
}

/// `vxlan0`'s own FDB entries for `mac` in `overlay` (`bridge fdb show`'s lines with a `dst`,
/// not the bridge's learned ones): the kernel's view of the node frames to `mac` go to.
pub fn vxlan_destinations(overlay: &str, mac: &str) -> Vec<String> {
    run("bridge", &["-n", overlay, "fdb", "show", "dev", "vxlan0"])
        .lines()
        .filter(|line| line.starts_with(mac) && line.contains(" dst "))
        .map(str::to_owned)
        .collect()
}
