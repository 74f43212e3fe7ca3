//! xbr-cni driven as a runtime drives it (run as root): the real `bridge` and `host-local`
//! (and `portmap`, `firewall`) plugins, then xbr-cni, through `cni_driver`'s libcni semantics,
//! all inside namespaces of the test's own. Containers ADDed are on the fast path when ADD
//! returns (xbr's counters grow while an nftables counter on the bridge stays flat), in tcx and
//! clsact mode; CHECK agrees, and fails with a CNI error once the bridge is detached; DEL is
//! idempotent and the last one leaves no pins; a re-ADD with a new veth leaves one endpoint;
//! published ports are served by xbr's NAT and go with DEL; GC forgets a container that left
//! without DEL; 200 parallel ADDs and DELs lose and misdeliver nothing (their latencies are
//! printed, not asserted).

use std::{
    collections::BTreeMap,
    io::{Read as _, Write as _},
    net::{Ipv4Addr, SocketAddr, TcpListener, TcpStream},
    path::Path,
    process::Command,
    sync::{
        Arc,
        atomic::{AtomicBool, Ordering},
    },
    time::Duration,
};

use serde_json::{Value, json};
use xbr::netns::NetNs;
use xbr_tests::{
    cni_driver::{
        Attachment, CniPath, Network, TempDir, bridge_plugin, conflist, endpoint_of, median_p99,
        system_plugins_installed, verdict_total, xbr_cni_plugin,
    },
    lab_support::{assert_ping, ip_in, unique_name},
    skip::skip,
    traffic::{exchange, tcp_echo_server},
    witness::{BridgeForwardCounter, PinRoot, tc_programs, tcp_echo, udp_echo},
};

const BRIDGE: &str = "br0";

/// Namespaces a test made; deleted on drop (a container's veth goes with its namespace).
#[derive(Default)]
struct Namespaces {
    names: std::sync::Mutex<Vec<String>>,
}

impl Namespaces {
    fn create(&self, name: &str) -> NetNs {
        let netns = NetNs::create(name).unwrap_or_else(|e| panic!("create namespace {name}: {e}"));
        self.names.lock().unwrap().push(name.to_owned());
        netns
    }

    fn delete(&self, name: &str) {
        let _ = NetNs::delete(name);
        self.names.lock().unwrap().retain(|n| n != name);
    }
}

impl Drop for Namespaces {
    fn drop(&mut self) {
        // Containers first, the host last.
        for name in self.names.lock().unwrap().iter().rev() {
            let _ = NetNs::delete(name);
        }
    }
}

/// A CNI network in a host namespace of the test's own: the plugins run there, `br0` is made
/// there, xbr pins under a root of the test's own. On drop, on every path: DEL of every
/// attachment still cached, detach, pins, namespaces and files removed.
struct Fixture {
    host: String,
    network: Network,
    attachments: std::sync::Mutex<Vec<Attachment>>,
    // Dropped in this order, after `Drop for Fixture` ran the DELs: the detach needs the host.
    pins: PinRoot,
    namespaces: Namespaces,
    _cni_path: CniPath,
    state: TempDir,
}

impl Fixture {
    /// Plugins: `bridge` on br0 with `subnet`, then `after_bridge(pin_root)`.
    fn new(subnet: &str, after_bridge: impl FnOnce(&Path) -> Vec<Value>) -> Fixture {
        let host = unique_name("cni");
        let namespaces = Namespaces::default();
        namespaces.create(&host);
        let pins = PinRoot::new(&host);
        let state = TempDir::new("xbrcni");
        let cni_path = CniPath::new();
        let mut plugins = vec![bridge_plugin(BRIDGE, subnet, &state.join("ipam"))];
        plugins.extend(after_bridge(&pins.path));
        let list = conflist(&format!("{host}net"), "1.0.0", plugins);
        let network = Network::new(list, cni_path.dir(), &host, &state.join("cache"));
        Fixture {
            host,
            network,
            attachments: Default::default(),
            pins,
            namespaces,
            _cni_path: cni_path,
            state,
        }
    }

    /// A container: its namespace, and what the runtime will hand the plugins.
    fn container(&self, name: &str) -> Attachment {
        self.container_with(name, Value::Null)
    }

    /// A container whose ports `port_mappings` publishes (the portMappings capability).
    fn container_with(&self, name: &str, port_mappings: Value) -> Attachment {
        let netns = format!("{}{name}", self.host);
        self.namespaces.create(&netns);
        let mut attachment = Attachment::new(&format!("{netns}-id"), &netns);
        if !port_mappings.is_null() {
            attachment = attachment.with_port_mappings(port_mappings);
        }
        self.attachments.lock().unwrap().push(attachment.clone());
        attachment
    }

    fn netns_of(attachment: &Attachment) -> NetNs {
        let name = attachment.netns.file_name().unwrap().to_str().unwrap();
        NetNs::open(name).unwrap()
    }

    fn add(&self, attachment: &Attachment) -> (String, String, Ipv4Addr) {
        let run = self
            .network
            .add(attachment)
            .unwrap_or_else(|e| panic!("ADD of {}: {e}", attachment.container_id));
        endpoint_of(run.result.as_ref().unwrap(), &attachment.ifname)
    }

    /// Endpoint MAC per port, as `xbr status --json` lists them.
    fn endpoints(&self) -> BTreeMap<String, String> {
        self.pins.endpoints()
    }

    /// (fast-path packets sent, packets delivered) per port, from `xbr stats --json`.
    fn port_counters(&self) -> BTreeMap<String, (u64, u64)> {
        let stats: Value = serde_json::from_str(&self.pins.xbr_ok(&["stats", "--json"])).unwrap();
        stats["endpoints"]
            .as_array()
            .into_iter()
            .flatten()
            .map(|e| {
                (
                    e["port"].as_str().unwrap().to_owned(),
                    (
                        e["fast_path_packets"].as_u64().unwrap(),
                        e["delivered_packets"].as_u64().unwrap(),
                    ),
                )
            })
            .collect()
    }

    fn verdict(&self, name: &str) -> u64 {
        let stats: Value = serde_json::from_str(&self.pins.xbr_ok(&["stats", "--json"])).unwrap();
        verdict_total(&stats, name)
    }

    /// Files left under the pin root (none after a detach).
    fn pins_left(&self) -> Vec<String> {
        fn walk(dir: &Path, found: &mut Vec<String>) {
            for entry in std::fs::read_dir(dir).into_iter().flatten().flatten() {
                let path = entry.path();
                if path.is_dir() {
                    walk(&path, found);
                }
                found.push(path.display().to_string());
            }
        }
        let mut found = Vec::new();
        walk(&self.pins.path, &mut found);
        found
    }

    /// `xbr detach br0` after the last DEL (xbr-cni may have detached already).
    fn detach(&self) {
        let (code, _, stderr) = self.pins.xbr(&["detach", BRIDGE]);
        assert!(
            code == 0 || stderr.contains("not attached"),
            "xbr detach {BRIDGE}: {stderr}"
        );
    }

    /// Ports still on br0 in the host namespace.
    fn bridge_ports(&self) -> Vec<String> {
        let listing = ip_in(&self.host, &["-j", "link", "show", "master", BRIDGE]);
        let links: Value = serde_json::from_str(&listing).unwrap_or(json!([]));
        links
            .as_array()
            .into_iter()
            .flatten()
            .filter_map(|l| l["ifname"].as_str().map(str::to_owned))
            .collect()
    }
}

impl Drop for Fixture {
    fn drop(&mut self) {
        for attachment in self.attachments.lock().unwrap().iter() {
            if self.network.cached_result(attachment).is_some() {
                let _ = self.network.del(attachment);
            }
        }
    }
}

fn needs_plugins(test: &str) -> bool {
    let installed = system_plugins_installed();
    if !installed {
        skip(
            test,
            "containernetworking-plugins is not installed (/usr/lib/cni); `cargo xtask setup` installs it",
        );
    }
    installed
}

/// `mode` as xbr-cni's entry says it (None: left out, auto) and as `xbr status` reports it.
#[rstest::rstest]
#[case::auto(None, "tcx")]
#[case::clsact(Some("clsact"), "clsact")]
fn two_containers_take_the_fast_path_and_del_leaves_nothing(
    #[case] mode: Option<&str>,
    #[case] reported: &str,
) {
    let test = format!("two_containers_take_the_fast_path_and_del_leaves_nothing::{reported}");
    if !needs_plugins(&test) {
        return;
    }
    if reported == "tcx" && !xbr_tests::skip::needs_tcx(&test) {
        return;
    }
    let fixture = Fixture::new("10.201.0.0/24", |root| {
        let mut plugin = xbr_cni_plugin(root, &[]);
        if let Some(mode) = mode {
            plugin["mode"] = json!(mode);
        }
        vec![plugin]
    });
    let witness = BridgeForwardCounter::install(&fixture.host);

    let version = fixture
        .network
        .call_alone("xbr-cni", "VERSION", json!({}))
        .expect("VERSION");
    assert_eq!(
        version["supportedVersions"],
        json!(["0.3.0", "0.3.1", "0.4.0", "1.0.0", "1.1.0"]),
        "{version}"
    );
    // The contract says 1.1.0; xbr-cni answers in the version the runtime asked in, which
    // libcni accepts as well.
    assert!(
        ["1.0.0", "1.1.0"].contains(&version["cniVersion"].as_str().unwrap_or_default()),
        "{version}"
    );

    let a = fixture.container("a");
    let b = fixture.container("b");
    let run_a = fixture.network.add(&a).expect("ADD a");
    assert_eq!(
        run_a.result.as_ref().unwrap()["cniVersion"],
        "1.0.0",
        "xbr-cni answers in the network's version"
    );
    let (veth_a, mac_a, ip_a) = endpoint_of(run_a.result.as_ref().unwrap(), "eth0");
    // Right when ADD returned: a is an endpoint.
    assert_eq!(
        fixture.endpoints(),
        BTreeMap::from([(veth_a.clone(), mac_a.clone())]),
        "after ADD of a"
    );
    let (veth_b, mac_b, ip_b) = fixture.add(&b);
    assert_eq!(
        fixture.endpoints(),
        BTreeMap::from([(veth_a.clone(), mac_a), (veth_b.clone(), mac_b)]),
        "after ADD of b"
    );
    let status = fixture.pins.status();
    assert_eq!(status["bridges"][0]["mode"], reported, "{status}");
    assert_eq!(status["bridges"][0]["attached_by"], "xbr-cni", "{status}");

    let (ns_a, ns_b) = (Fixture::netns_of(&a), Fixture::netns_of(&b));
    let before = witness.read();
    let counters_before = fixture.port_counters();
    assert_ping(ns_a.name(), ip_b);
    assert_ping(ns_b.name(), ip_a);
    tcp_echo(&ns_a, &ns_b, ip_b, 256 * 1024);
    assert_eq!(udp_echo(&ns_b, &ns_a, ip_a, 50), 50, "UDP b -> a");
    let after = witness.read();
    let counters = fixture.port_counters();
    assert_eq!(
        after.ipv4_unicast, before.ipv4_unicast,
        "unicast IPv4 between CNI containers crossed the bridge ({before:?} -> {after:?})"
    );
    for veth in [&veth_a, &veth_b] {
        let (fast_before, delivered_before) = counters_before[veth];
        let (fast, delivered) = counters[veth];
        assert!(
            fast > fast_before + 50 && delivered > delivered_before + 50,
            "{veth}: fast path {fast_before} -> {fast}, delivered {delivered_before} -> {delivered}"
        );
    }

    fixture.network.check(&a).expect("CHECK a");
    fixture.network.check(&b).expect("CHECK b");

    // DEL a; then DEL a again with the same prevResult (a runtime retrying), then without.
    let cached_a = fixture.network.cached_result(&a).unwrap();
    fixture.network.del(&a).expect("DEL a");
    let endpoints = fixture.endpoints();
    assert!(
        !endpoints.contains_key(&veth_a) && endpoints.contains_key(&veth_b),
        "after DEL of a: {endpoints:?}"
    );
    fixture.network.remember(&a, &cached_a);
    fixture
        .network
        .del(&a)
        .expect("DEL a again, same prevResult");
    fixture.network.del(&a).expect("DEL a without prevResult");
    fixture.network.check(&b).expect("CHECK b after a left");

    // b's container is gone before its DEL.
    fixture
        .namespaces
        .delete(b.netns.file_name().unwrap().to_str().unwrap());
    fixture.network.del(&b).expect("DEL b, container gone");
    fixture.network.del(&b).expect("DEL b twice");
    assert!(
        fixture.endpoints().is_empty(),
        "after the last DEL: {:?}",
        fixture.endpoints()
    );
    fixture.detach();
    assert_eq!(fixture.pins_left(), Vec::<String>::new(), "pins left");
}

/// Endpoints of `fixture` whose MAC is `mac`.
fn ports_with_mac(fixture: &Fixture, mac: &str) -> Vec<String> {
    fixture
        .endpoints()
        .into_iter()
        .filter(|(_, m)| m.eq_ignore_ascii_case(mac))
        .map(|(port, _)| port)
        .collect()
}

#[test]
fn a_re_add_with_a_new_host_veth_leaves_one_endpoint() {
    if !needs_plugins("a_re_add_with_a_new_host_veth_leaves_one_endpoint") {
        return;
    }
    let fixture = Fixture::new("10.202.0.0/24", |root| vec![xbr_cni_plugin(root, &[])]);
    let witness = BridgeForwardCounter::install(&fixture.host);
    let a = fixture.container("a");
    let b = fixture.container("b");
    let (veth_a1, _, _) = fixture.add(&a);
    let (veth_b, _, _) = fixture.add(&b);
    let (ns_a, ns_b) = (Fixture::netns_of(&a), Fixture::netns_of(&b));

    // `podman network reload`: DEL, then ADD in the same namespace; the bridge plugin makes a
    // new veth.
    fixture.network.del(&a).expect("DEL a (reload)");
    let (veth_a2, mac_a2, ip_a2) = fixture.add(&a);
    assert_ne!(veth_a1, veth_a2, "the bridge plugin made a new veth");
    assert_eq!(
        fixture.endpoints().len(),
        2,
        "after the reload: {:?}",
        fixture.endpoints()
    );
    assert_eq!(ports_with_mac(&fixture, &mac_a2), vec![veth_a2.clone()]);
    fixture.network.check(&a).expect("CHECK a after the reload");
    let before = witness.read();
    let delivered_before = fixture.port_counters()[&veth_a2].1;
    tcp_echo(&ns_b, &ns_a, ip_a2, 64 * 1024);
    assert_eq!(witness.read().ipv4_unicast, before.ipv4_unicast);
    assert!(fixture.port_counters()[&veth_a2].1 > delivered_before);

    // The veth goes behind the runtime's back (no DEL); the runtime makes a new one for the
    // same container, same MAC and address, and ADDs xbr-cni with a prevResult naming it.
    let cached = fixture.network.cached_result(&a).unwrap();
    ip_in(ns_a.name(), &["link", "del", "eth0"]);
    let veth_a3 = format!("veth{:08x}", std::process::id() ^ 0x5a5a_0003);
    ip_in(
        &fixture.host,
        &[
            "link",
            "add",
            &veth_a3,
            "type",
            "veth",
            "peer",
            "name",
            "eth0",
            "netns",
            ns_a.name(),
        ],
    );
    ip_in(ns_a.name(), &["link", "set", "eth0", "address", &mac_a2]);
    ip_in(
        ns_a.name(),
        &["addr", "add", &format!("{ip_a2}/24"), "dev", "eth0"],
    );
    ip_in(ns_a.name(), &["link", "set", "eth0", "up"]);
    ip_in(
        ns_a.name(),
        &["route", "add", "default", "via", "10.202.0.1"],
    );
    ip_in(&fixture.host, &["link", "set", &veth_a3, "master", BRIDGE]);
    ip_in(&fixture.host, &["link", "set", &veth_a3, "up"]);
    let mut prev = cached.clone();
    for interface in prev["interfaces"].as_array_mut().unwrap() {
        if interface["name"] == veth_a2.as_str() {
            interface["name"] = json!(veth_a3);
            interface.as_object_mut().unwrap().remove("mac");
        }
    }
    fixture
        .network
        .add_alone("xbr-cni", &prev, &a)
        .expect("ADD with a new host veth");
    let endpoints = fixture.endpoints();
    assert_eq!(
        ports_with_mac(&fixture, &mac_a2),
        vec![veth_a3.clone()],
        "{endpoints:?}"
    );
    assert_eq!(
        endpoints.keys().cloned().collect::<Vec<_>>(),
        {
            let mut want = vec![veth_a3.clone(), veth_b.clone()];
            want.sort();
            want
        },
        "exactly one endpoint per container"
    );
    fixture.network.check(&a).expect("CHECK a on its new veth");
    let before = witness.read();
    tcp_echo(&ns_b, &ns_a, ip_a2, 64 * 1024);
    assert_eq!(witness.read().ipv4_unicast, before.ipv4_unicast);

    fixture.network.del(&a).expect("DEL a");
    fixture.network.del(&b).expect("DEL b");
    assert!(fixture.endpoints().is_empty(), "{:?}", fixture.endpoints());
    fixture.detach();
    assert_eq!(fixture.pins_left(), Vec::<String>::new(), "pins left");
}

/// The counter of the jump to portmap's DNAT chain from `chain` (PREROUTING: outside
/// clients; OUTPUT: the host's own), in namespace `netns`.
fn portmap_dnat_packets(netns: &str, chain: &str) -> u64 {
    let output = Command::new("ip")
        .args(["netns", "exec", netns, "iptables-save", "-c", "-t", "nat"])
        .output()
        .expect("run iptables-save");
    let listing = String::from_utf8_lossy(&output.stdout);
    listing
        .lines()
        .find(|l| l.contains(&format!("-A {chain} ")) && l.contains("-j CNI-HOSTPORT-DNAT"))
        .and_then(|l| {
            let counters = l.strip_prefix('[')?.split(']').next()?;
            counters.split(':').next()?.parse().ok()
        })
        .unwrap_or_else(|| panic!("no jump to CNI-HOSTPORT-DNAT in {chain}: {listing}"))
}

/// A published port through an uplink of the test's own, with the plugin list podman writes
/// (portmap keeps its DNAT rules for what xbr does not serve), with the firewall plugin only,
/// and with xbr-cni alone after the bridge (nothing but xbr can serve the port).
#[rstest::rstest]
#[case::after_bridge(
    "a_published_port_is_served_by_xbr_and_unpublished_on_del::after_bridge",
    false,
    false
)]
#[case::after_firewall(
    "a_published_port_is_served_by_xbr_and_unpublished_on_del::after_firewall",
    false,
    true
)]
#[case::after_portmap_and_firewall(
    "a_published_port_is_served_by_xbr_and_unpublished_on_del::after_portmap_and_firewall",
    true,
    true
)]
fn a_published_port_is_served_by_xbr_and_unpublished_on_del(
    #[case] test: &str,
    #[case] with_portmap: bool,
    #[case] with_firewall: bool,
) {
    if !needs_plugins(test) {
        return;
    }
    let fixture = Fixture::new("10.203.0.0/24", |root| {
        let mut plugins = Vec::new();
        if with_portmap {
            plugins.push(json!({ "type": "portmap", "capabilities": { "portMappings": true } }));
        }
        if with_firewall {
            plugins.push(json!({ "type": "firewall" }));
        }
        plugins.push(xbr_cni_plugin(root, &["up0"]));
        plugins
    });
    // The uplink: up0 10.204.0.1/24 in the host, eth0 10.204.0.2/24 in the outside namespace.
    let outside_name = format!("{}out", fixture.host);
    let outside = fixture.namespaces.create(&outside_name);
    ip_in(
        &fixture.host,
        &[
            "link",
            "add",
            "up0",
            "type",
            "veth",
            "peer",
            "name",
            "eth0",
            "netns",
            &outside_name,
        ],
    );
    ip_in(
        &fixture.host,
        &["addr", "add", "10.204.0.1/24", "dev", "up0"],
    );
    ip_in(&fixture.host, &["link", "set", "up0", "up"]);
    ip_in(
        &outside_name,
        &["addr", "add", "10.204.0.2/24", "dev", "eth0"],
    );
    ip_in(&outside_name, &["link", "set", "eth0", "up"]);
    let host = NetNs::open(&fixture.host).unwrap();

    let a = fixture.container_with(
        "a",
        json!([{ "hostPort": 18080, "containerPort": 80, "protocol": "tcp" }]),
    );
    let (_, _, ip_a) = fixture.add(&a);
    let ns_a = Fixture::netns_of(&a);
    let _server = tcp_echo_server(&ns_a, ip_a, 80);
    let status = fixture.pins.status();
    let bridge = &status["bridges"][0];
    assert_eq!(bridge["uplinks"], json!(["up0"]), "{status}");
    assert_eq!(
        bridge["published"][0]["spec"],
        format!("18080:{ip_a}:80/tcp"),
        "{status}"
    );

    let published = SocketAddr::from((Ipv4Addr::new(10, 204, 0, 1), 18080));
    // With portmap, its DNAT counter witnesses what the kernel path translated; it counts:
    // the host's own client (no socket hooks) takes portmap's DNAT in OUTPUT.
    let prerouting = with_portmap.then(|| {
        let output_before = portmap_dnat_packets(&fixture.host, "OUTPUT");
        exchange(&host, published, 100).expect("the host's own client through portmap");
        assert!(portmap_dnat_packets(&fixture.host, "OUTPUT") > output_before);
        portmap_dnat_packets(&fixture.host, "PREROUTING")
    });

    let nat_in = fixture.verdict("nat_in");
    let nat_out = fixture.verdict("nat_out");
    for round in 0..20 {
        exchange(&outside, published, 1000)
            .unwrap_or_else(|e| panic!("connection {round} from outside to {published}: {e}"));
    }
    assert!(
        fixture.verdict("nat_in") >= nat_in + 20 * 3,
        "xbr's NAT took the connections in ({nat_in} -> {}); what xbr leaves to the kernel \
         path: {}",
        fixture.verdict("nat_in"),
        fixture.pins.status()["bridges"][0]["published"]
    );
    assert!(fixture.verdict("nat_out") >= nat_out + 20 * 3);
    if let Some(prerouting) = prerouting {
        assert_eq!(
            portmap_dnat_packets(&fixture.host, "PREROUTING"),
            prerouting,
            "outside connections reached portmap's DNAT"
        );
    }

    // portmap 1.1.1's own CHECK fails on an IPv4-only container (it looks for an IPv6 DNAT
    // chain it never made): xbr-cni's CHECK is the one this test is about.
    if with_portmap {
        fixture.network.check_plugin("xbr-cni", &a).expect("CHECK");
    } else {
        fixture.network.check(&a).expect("CHECK");
    }
    fixture.network.del(&a).expect("DEL");
    let status = fixture.pins.status();
    let left: Vec<&Value> = status["bridges"]
        .as_array()
        .into_iter()
        .flatten()
        .flat_map(|b| b["published"].as_array().into_iter().flatten())
        .collect();
    assert!(left.is_empty(), "published ports left after DEL: {status}");
    assert!(
        exchange(&outside, published, 10).is_err(),
        "{published} still answers after DEL"
    );
    fixture.network.del(&a).expect("DEL twice");
    fixture.detach();
    assert_eq!(fixture.pins_left(), Vec::<String>::new(), "pins left");
}

/// Servers answering each connection with their container's name, one thread for all.
struct NameServers {
    stop: Arc<AtomicBool>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl NameServers {
    fn start(containers: &[(NetNs, Ipv4Addr, String)], port: u16) -> NameServers {
        let listeners: Vec<(TcpListener, String)> = containers
            .iter()
            .map(|(netns, ip, name)| {
                let listener = netns
                    .run(|| TcpListener::bind((*ip, port)))
                    .unwrap()
                    .unwrap_or_else(|e| panic!("bind {ip}:{port} in {}: {e}", netns.name()));
                listener.set_nonblocking(true).unwrap();
                (listener, name.clone())
            })
            .collect();
        let stop = Arc::new(AtomicBool::new(false));
        let stopped = stop.clone();
        let thread = std::thread::spawn(move || {
            while !stopped.load(Ordering::Relaxed) {
                let mut served = false;
                for (listener, name) in &listeners {
                    if let Ok((mut stream, _)) = listener.accept() {
                        let _ = stream.set_nonblocking(false);
                        let _ = stream.write_all(name.as_bytes());
                        served = true;
                    }
                }
                if !served {
                    std::thread::sleep(Duration::from_millis(2));
                }
            }
        });
        NameServers {
            stop,
            thread: Some(thread),
        }
    }
}

impl Drop for NameServers {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

fn name_at(client: &NetNs, to: SocketAddr) -> std::io::Result<String> {
    let mut stream = client
        .run(|| TcpStream::connect_timeout(&to, Duration::from_secs(3)))
        .unwrap()?;
    stream.set_read_timeout(Some(Duration::from_secs(3)))?;
    let mut name = String::new();
    stream.read_to_string(&mut name)?;
    Ok(name)
}

const PARALLEL: usize = 200;

/// Fails naming how many of the parallel `what` failed, and the first failure.
fn all_succeeded<T, E: std::fmt::Display>(runs: &[Result<T, E>], what: &str) {
    let failures: Vec<String> = runs
        .iter()
        .filter_map(|r| r.as_ref().err().map(ToString::to_string))
        .collect();
    assert!(
        failures.is_empty(),
        "{} of {PARALLEL} parallel {what} failed; the first: {}",
        failures.len(),
        failures[0]
    );
}

#[test]
fn two_hundred_parallel_adds_and_dels() {
    if !needs_plugins("two_hundred_parallel_adds_and_dels") {
        return;
    }
    let fixture = Fixture::new("10.205.0.0/16", |root| vec![xbr_cni_plugin(root, &[])]);
    let witness = BridgeForwardCounter::install(&fixture.host);
    let containers: Vec<Attachment> = (0..PARALLEL)
        .map(|i| fixture.container(&format!("c{i}")))
        .collect();

    let all_started = std::time::Instant::now();
    let runs: Vec<_> = std::thread::scope(|scope| {
        let handles: Vec<_> = containers
            .iter()
            .map(|c| scope.spawn(|| fixture.network.add(c)))
            .collect();
        handles.into_iter().map(|h| h.join().unwrap()).collect()
    });
    let all_added = all_started.elapsed();
    all_succeeded(&runs, "ADDs");
    let runs: Vec<_> = runs.into_iter().map(Result::unwrap).collect();
    let xbr_cni: Vec<Duration> = runs
        .iter()
        .map(|r| r.call("xbr-cni").unwrap().elapsed)
        .collect();
    let to_fast_path: Vec<Duration> = runs
        .iter()
        .map(|r| r.call("xbr-cni").unwrap().finished())
        .collect();
    let (median, p99) = median_p99(&xbr_cni);
    let (chain_median, chain_p99) = median_p99(&to_fast_path);
    let (reached_median, _) = median_p99(
        &runs
            .iter()
            .map(|r| r.call("xbr-cni").unwrap().started)
            .collect::<Vec<_>>(),
    );
    eprintln!(
        "{PARALLEL} parallel ADDs: xbr-cni ADD median {median:?}, p99 {p99:?}; \
         chain ADD start to endpoint on the fast path (xbr-cni returned) median \
         {chain_median:?}, p99 {chain_p99:?}; xbr-cni started {reached_median:?} (median) \
         into its chain; all {PARALLEL} chains done {all_added:?} after the first started"
    );

    let endpoints_of: Vec<(String, String, Ipv4Addr)> = runs
        .iter()
        .map(|r| endpoint_of(r.result.as_ref().unwrap(), "eth0"))
        .collect();
    let endpoints = fixture.endpoints();
    assert_eq!(endpoints.len(), PARALLEL, "endpoints after the ADDs");
    for (veth, mac, _) in &endpoints_of {
        assert_eq!(
            endpoints.get(veth).map(|m| m.to_ascii_lowercase()),
            Some(mac.to_ascii_lowercase()),
            "{veth}"
        );
    }

    let servers: Vec<(NetNs, Ipv4Addr, String)> = containers
        .iter()
        .zip(&endpoints_of)
        .map(|(c, (_, _, ip))| (Fixture::netns_of(c), *ip, c.container_id.clone()))
        .collect();
    let _servers = NameServers::start(&servers, 7000);

    // A peer ADDed afterwards reaches a sample, each container answering with its own name.
    let peer = fixture.container("peer");
    let started = std::time::Instant::now();
    let peer_run = fixture.network.add(&peer).expect("ADD the peer");
    let peer_to_fast_path = peer_run.call("xbr-cni").unwrap().finished();
    let ns_peer = Fixture::netns_of(&peer);
    let before = witness.read();
    let counters_before = fixture.port_counters();
    let sample: Vec<usize> = (0..20).map(|i| i * PARALLEL / 20 + i % 7).collect();
    for &i in &sample {
        let (ns, ip, name) = &servers[i];
        assert_ping(ns_peer.name(), *ip);
        let answer = name_at(&ns_peer, SocketAddr::from((*ip, 7000)))
            .unwrap_or_else(|e| panic!("TCP from the peer to {ip} ({}): {e}", ns.name()));
        assert_eq!(
            &answer, name,
            "the connection to {ip} reached another container"
        );
    }
    eprintln!(
        "the peer's ADD with {PARALLEL} endpoints on the bridge: xbr-cni {:?}, on the fast path \
         {peer_to_fast_path:?} after the chain started; 20 containers answered within {:?}",
        peer_run.call("xbr-cni").unwrap().elapsed,
        started.elapsed()
    );
    assert_eq!(
        witness.read().ipv4_unicast,
        before.ipv4_unicast,
        "unicast IPv4 crossed the bridge"
    );
    let counters = fixture.port_counters();
    for &i in &sample {
        let veth = &endpoints_of[i].0;
        assert!(
            counters[veth].1 > counters_before[veth].1,
            "{veth}: nothing delivered on the fast path"
        );
    }
    drop(_servers);
    fixture.network.del(&peer).expect("DEL the peer");

    let dels: Vec<_> = std::thread::scope(|scope| {
        let handles: Vec<_> = containers
            .iter()
            .map(|c| scope.spawn(|| fixture.network.del(c)))
            .collect();
        handles.into_iter().map(|h| h.join().unwrap()).collect()
    });
    all_succeeded(&dels, "DELs");
    let del_times: Vec<Duration> = dels
        .iter()
        .map(|r| r.as_ref().unwrap().call("xbr-cni").unwrap().elapsed)
        .collect();
    let (del_median, del_p99) = median_p99(&del_times);
    eprintln!("{PARALLEL} parallel DELs: xbr-cni DEL median {del_median:?}, p99 {del_p99:?}");
    assert_eq!(fixture.endpoints().len(), 0, "endpoints after the DELs");
    assert_eq!(
        fixture.bridge_ports(),
        Vec::<String>::new(),
        "veths left on {BRIDGE}"
    );
    let leases: Vec<_> = std::fs::read_dir(fixture.state.join("ipam").join(fixture.network.name()))
        .into_iter()
        .flatten()
        .flatten()
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .filter(|n| n.parse::<Ipv4Addr>().is_ok())
        .collect();
    assert!(leases.is_empty(), "host-local leases left: {leases:?}");
    fixture.detach();
    assert_eq!(fixture.pins_left(), Vec::<String>::new(), "pins left");
}

#[test]
fn check_fails_off_the_fast_path_and_gc_and_status_answer() {
    if !needs_plugins("check_fails_off_the_fast_path_and_gc_and_status_answer") {
        return;
    }
    let fixture = Fixture::new("10.206.0.0/24", |root| vec![xbr_cni_plugin(root, &[])]);
    let a = fixture.container("a");
    let b = fixture.container("b");
    let (veth_a, _, _) = fixture.add(&a);
    let (veth_b, _, _) = fixture.add(&b);

    // Detached behind the runtime's back: CHECK says so, as a CNI error.
    fixture.pins.xbr_ok(&["detach", BRIDGE]);
    let failure = fixture
        .network
        .check(&a)
        .expect_err("CHECK of a detached endpoint");
    assert_eq!(failure.plugin, "xbr-cni", "{failure}");
    assert_eq!(failure.exit_code, Some(1), "{failure}");
    let error = failure
        .error()
        .unwrap_or_else(|| panic!("no error JSON: {failure}"));
    assert!(
        error["code"].as_u64().is_some() && error["msg"].is_string(),
        "{error}"
    );
    assert_eq!(error["cniVersion"], "1.0.0", "{error}");

    // The next ADD attaches the bridge again, with every container on it.
    let c = fixture.container("c");
    let (veth_c, _, _) = fixture.add(&c);
    let mut want = vec![veth_a.clone(), veth_b.clone(), veth_c.clone()];
    want.sort();
    assert_eq!(
        fixture.endpoints().into_keys().collect::<Vec<_>>(),
        want,
        "after re-attaching"
    );
    fixture
        .network
        .check(&a)
        .expect("CHECK a after the ADD of c");

    // Errors are CNI errors: ADD without prevResult (xbr-cni first in a list).
    let alone = fixture
        .network
        .exec(
            "xbr-cni",
            "ADD",
            &json!({ "cniVersion": "1.0.0", "name": "x", "type": "xbr-cni", "socketHooks": false, "pinRoot": fixture.pins.path }),
            Some(&a),
        )
        .expect_err("ADD without prevResult");
    assert_eq!(alone.exit_code, Some(1), "{alone}");
    assert!(alone.code().is_some(), "{alone}");

    // GC and STATUS (CNI 1.1.0, which the bridge plugin here predates: xbr-cni's entry alone).
    let v110 = Network::new(
        conflist(
            fixture.network.name(),
            "1.1.0",
            vec![xbr_cni_plugin(&fixture.pins.path, &[])],
        ),
        &fixture.network.cni_path,
        &fixture.host,
        &fixture.state.join("cache110"),
    );
    v110.call_alone("xbr-cni", "STATUS", json!({}))
        .expect("STATUS");
    // b's container goes without a DEL; GC with a and c still valid forgets its port.
    fixture
        .namespaces
        .delete(b.netns.file_name().unwrap().to_str().unwrap());
    xbr_tests::witness::wait_for("b's veth to go", Duration::from_secs(10), || {
        !fixture.bridge_ports().contains(&veth_b)
    });
    let valid = json!({ "cni.dev/valid-attachments": [
        { "containerID": a.container_id, "ifname": "eth0" },
        { "containerID": c.container_id, "ifname": "eth0" },
    ]});
    // Until a reconcile, xbr still holds b's records (status lists a "(gone)" port).
    assert_eq!(fixture.endpoints().len(), 3, "{:?}", fixture.endpoints());
    v110.call_alone("xbr-cni", "GC", valid).expect("GC");
    let mut want = vec![veth_a, veth_c];
    want.sort();
    assert_eq!(
        fixture.endpoints().into_keys().collect::<Vec<_>>(),
        want,
        "after GC"
    );
    fixture.network.forget(&b);

    fixture.network.del(&a).expect("DEL a");
    fixture.network.del(&c).expect("DEL c");
    assert!(fixture.endpoints().is_empty(), "{:?}", fixture.endpoints());
    fixture.detach();
    assert_eq!(fixture.pins_left(), Vec::<String>::new(), "pins left");
}

/// A hook removed behind xbr's back (`tc filter del`, in clsact mode where no event says
/// so to anyone): CHECK reports the container off the fast path, and the next ADD on the
/// bridge puts the hook back.
#[test]
fn a_hook_removed_behind_xbrs_back_fails_check_until_the_next_add() {
    let test = "a_hook_removed_behind_xbrs_back_fails_check_until_the_next_add";
    if !needs_plugins(test) {
        return;
    }
    let fixture = Fixture::new("10.207.0.0/24", |root| {
        let mut plugin = xbr_cni_plugin(root, &[]);
        plugin["mode"] = json!("clsact");
        vec![plugin]
    });
    let a = fixture.container("a");
    let (veth_a, _, _) = fixture.add(&a);
    fixture.network.check(&a).expect("CHECK after ADD");
    assert_eq!(tc_programs(&fixture.host, &veth_a), ["port_ingress"]);

    let removed = std::process::Command::new("nsenter")
        .arg(format!("--net=/run/netns/{}", fixture.host))
        .args(["tc", "filter", "del", "dev", &veth_a, "ingress"])
        .status()
        .expect("run tc");
    assert!(removed.success(), "tc filter del dev {veth_a} ingress");
    assert!(tc_programs(&fixture.host, &veth_a).is_empty());
    let failure = fixture
        .network
        .check(&a)
        .expect_err("CHECK with the hook removed");
    assert_eq!(failure.plugin, "xbr-cni", "{failure}");
    assert_eq!(failure.code(), Some(101), "{failure}");

    let b = fixture.container("b");
    fixture.add(&b);
    assert_eq!(tc_programs(&fixture.host, &veth_a), ["port_ingress"]);
    fixture.network.check(&a).expect("CHECK after the next ADD");
}
