//! East-west traffic through a real lab of namespaces (run as root): after `xbr attach`,
//! container-to-container TCP and UDP work between every pair and unicast IPv4 no longer
//! crosses the bridge (an nftables bridge-family counter says so, not xbr); ARP still does.
//! After `xbr detach` nothing of xbr is left and traffic crosses the bridge again.

use std::net::Ipv4Addr;

use xbr::{lab::LabSpec, netns::NetNs};
use xbr_tests::{
    lab_support::{LabBuilder, assert_ping, ip_in, unique_name},
    witness::{
        BridgeForwardCounter, PinRoot, tc_ingress_filters, tc_programs, tc_qdiscs, tcp_echo,
        udp_echo, xbr, xbr_ok,
    },
};

const PORTS: [&str; 3] = ["veth-a", "veth-b", "veth-c"];

struct Containers {
    spec: LabSpec,
}

impl Containers {
    fn ns(&self, name: &str) -> NetNs {
        NetNs::open(&self.spec.container_netns(name)).unwrap()
    }

    fn ip(&self, name: &str) -> Ipv4Addr {
        self.spec.container(name).unwrap().address.addr
    }

    fn names(&self) -> Vec<String> {
        self.spec
            .containers
            .iter()
            .map(|c| c.name.clone())
            .collect()
    }

    /// Every ordered pair of distinct containers.
    fn pairs(&self) -> Vec<(String, String)> {
        let names = self.names();
        let mut pairs = Vec::new();
        for from in &names {
            for to in &names {
                if from != to {
                    pairs.push((from.clone(), to.clone()));
                }
            }
        }
        pairs
    }

    fn forget_neighbours(&self) {
        for name in self.names() {
            ip_in(
                &self.spec.container_netns(&name),
                &["neigh", "flush", "all"],
            );
        }
    }
}

fn fast_path_between_every_pair(mode: &str) {
    let lab = LabBuilder::three_containers().up();
    let spec = lab.spec().clone();
    let host = spec.host_netns();
    let containers = Containers { spec: spec.clone() };
    let bridge = BridgeForwardCounter::install(&host);
    let pins = PinRoot::new(&host);

    // The plain bridge first: the witness must see it carry IPv4, or it proves nothing later.
    for (from, to) in containers.pairs() {
        assert_ping(&spec.container_netns(&from), containers.ip(&to));
    }
    let before = bridge.read();
    tcp_echo(
        &containers.ns("a"),
        &containers.ns("b"),
        containers.ip("b"),
        64 * 1024,
    );
    assert!(
        bridge.read().ipv4_unicast > before.ipv4_unicast,
        "the plain bridge should forward IPv4"
    );

    pins.xbr_ok(&["attach", "br0", "--mode", mode]);
    for port in PORTS {
        assert_eq!(
            tc_programs(&host, port),
            vec!["port_ingress"],
            "{mode}: one xbr program on {port}"
        );
    }

    // Fresh neighbour caches: ARP must still go through the bridge while attached.
    containers.forget_neighbours();
    let before = bridge.read();
    for (from, to) in containers.pairs() {
        tcp_echo(
            &containers.ns(&from),
            &containers.ns(&to),
            containers.ip(&to),
            256 * 1024,
        );
        let answers = udp_echo(
            &containers.ns(&from),
            &containers.ns(&to),
            containers.ip(&to),
            50,
        );
        assert_eq!(answers, 50, "{mode}: UDP {from} -> {to} lost datagrams");
    }
    let during = bridge.read();
    assert_eq!(
        during.ipv4_unicast, before.ipv4_unicast,
        "{mode}: unicast IPv4 between containers crossed the bridge while attached"
    );
    assert!(
        during.arp > before.arp,
        "{mode}: ARP should still cross the bridge ({before:?} -> {during:?})"
    );

    let stats: serde_json::Value =
        serde_json::from_str(&pins.xbr_ok(&["stats", "br0", "--json"])).unwrap();
    let endpoints = stats["endpoints"].as_array().unwrap();
    assert_eq!(endpoints.len(), 3, "{stats}");
    for endpoint in endpoints {
        assert!(
            endpoint["fast_path_packets"].as_u64().unwrap() > 100,
            "{mode}: {endpoint}"
        );
        assert!(
            endpoint["fast_path_bytes"].as_u64().unwrap() > 256 * 1024,
            "{mode}: {endpoint}"
        );
        assert!(
            endpoint["delivered_packets"].as_u64().unwrap() > 100,
            "{mode}: {endpoint}"
        );
        assert!(endpoint["bridge_packets"].is_u64(), "{mode}: {endpoint}");
    }

    pins.xbr_ok(&["detach", "br0"]);
    for port in PORTS {
        assert!(
            tc_programs(&host, port).is_empty(),
            "{mode}: a program is left on {port}"
        );
        assert!(
            tc_ingress_filters(&host, port).trim().is_empty(),
            "{mode}: a filter is left on {port}"
        );
        assert!(
            !tc_qdiscs(&host, port).contains("clsact"),
            "{mode}: a clsact qdisc is left on {port}"
        );
    }
    assert!(
        !pins.path.exists(),
        "{mode}: pins left at {}",
        pins.path.display()
    );

    let before = bridge.read();
    tcp_echo(
        &containers.ns("b"),
        &containers.ns("c"),
        containers.ip("c"),
        64 * 1024,
    );
    assert!(
        bridge.read().ipv4_unicast > before.ipv4_unicast,
        "{mode}: after detach IPv4 takes the bridge again"
    );
}

#[test]
fn tcx_fast_path_between_every_pair() {
    fast_path_between_every_pair("tcx");
}

#[test]
fn clsact_fast_path_between_every_pair() {
    fast_path_between_every_pair("clsact");
}

#[test]
fn bad_input_gets_a_clear_error_and_changes_nothing() {
    let lab = LabBuilder::three_containers().up();
    let host = lab.spec().host_netns();
    let pins = PinRoot::new(&host);

    let (code, _, stderr) = pins.xbr(&["attach", "nosuch0"]);
    assert_eq!(code, 1);
    assert!(
        stderr.contains("bridge nosuch0 not found")
            && stderr.contains("ip -br link show type bridge"),
        "{stderr}"
    );

    let (code, _, stderr) = pins.xbr(&["attach", "veth-a"]);
    assert_eq!(code, 1);
    assert!(
        stderr.contains("veth-a is a veth device, not a bridge"),
        "{stderr}"
    );

    let (code, _, stderr) = pins.xbr(&["detach", "br0"]);
    assert_eq!(code, 1);
    assert!(stderr.contains("bridge br0 is not attached"), "{stderr}");
    assert!(
        !pins.path.exists(),
        "failed commands must not leave {}",
        pins.path.display()
    );

    let not_bpffs = std::env::temp_dir().join(unique_name("xbr-not-bpffs"));
    let (code, _, stderr) = xbr(&[
        "-n",
        &host,
        "--pin-root",
        not_bpffs.to_str().unwrap(),
        "attach",
        "br0",
    ]);
    assert_eq!(code, 1);
    assert!(stderr.contains("not on a bpf filesystem"), "{stderr}");
    assert!(
        !not_bpffs.exists(),
        "a refused pin root must not be created"
    );
    for port in PORTS {
        assert!(
            tc_programs(&host, port).is_empty(),
            "a refused attach left a program on {port}"
        );
    }

    let (code, _, stderr) = xbr(&["-n", &unique_name("nons"), "status"]);
    assert_eq!(code, 1);
    assert!(
        stderr.contains("not found") && stderr.contains("ip netns list"),
        "{stderr}"
    );

    let (code, _, stderr) = {
        let output = std::process::Command::new("setpriv")
            .args(["--reuid=65534", "--regid=65534", "--clear-groups"])
            .arg(xbr_tests::witness::xbr_binary())
            .arg("status")
            .output()
            .unwrap();
        (
            output.status.code(),
            String::from_utf8_lossy(&output.stdout).into_owned(),
            String::from_utf8_lossy(&output.stderr).into_owned(),
        )
    };
    assert_eq!(code, Some(1));
    assert!(stderr.contains("needs root"), "{stderr}");

    pins.xbr_ok(&["attach", "br0"]);
    // A second attach picks up the pinned state: no second program, and it says so.
    let stdout = pins.xbr_ok(&["attach", "br0"]);
    assert!(stdout.contains("already attached"), "{stdout}");
    for port in PORTS {
        assert_eq!(
            tc_programs(&host, port),
            vec!["port_ingress"],
            "a second attach must not add programs on {port}"
        );
    }
    let (code, _, stderr) = pins.xbr(&["attach", "br0", "--mode", "clsact"]);
    assert_eq!(code, 1);
    assert!(
        stderr.contains("attached in tcx mode") && stderr.contains("xbr detach br0"),
        "{stderr}"
    );
}

#[test]
fn a_port_deleted_between_observe_and_attach_leaves_nothing() {
    let lab = LabBuilder::three_containers().up();
    let host = NetNs::open(&lab.spec().host_netns()).unwrap();
    let pins = PinRoot::new(host.name());
    let root = pins.path.clone();
    let result = host
        .run(|| {
            let view = xbr::netlink::run(|handle| async move {
                xbr::observe::bridge(&handle, "br0", xbr::observe::Detail::Macs).await
            })
            .unwrap()
            .unwrap();
            let plan = xbr::plan::plan(&view).unwrap();
            // The port goes away after xbr looked at the bridge.
            xbr::netlink::run(|handle| async move {
                let index = view
                    .ports
                    .iter()
                    .find(|p| p.name == "veth-c")
                    .unwrap()
                    .ifindex;
                handle.link().del(index).execute().await
            })
            .unwrap()
            .unwrap();
            let features = xbr::features::detect();
            xbr::datapath::attach(
                &plan,
                &[],
                &xbr::datapath::Choices {
                    mode: xbr::datapath::ModeChoice::Auto,
                    uplink_mode: xbr::datapath::UplinkModeChoice::Auto,
                    max_flows: None,
                    socket_hooks: &xbr::datapath::SocketHooksChoice::Off,
                },
                &features,
                &root,
            )
        })
        .unwrap();
    match result {
        Err(xbr::error::Error::PortVanished { port, .. }) => assert_eq!(port, "veth-c"),
        other => panic!("expected PortVanished for veth-c, got {other:?}"),
    }
    for port in ["veth-a", "veth-b"] {
        assert!(
            tc_programs(host.name(), port).is_empty(),
            "a failed attach left a program on {port}"
        );
    }
    assert!(
        !pins.path.exists(),
        "a failed attach left pins at {}",
        pins.path.display()
    );
}

#[test]
fn same_bridge_name_in_two_namespaces_does_not_collide() {
    let first = LabBuilder::three_containers().up();
    let second = LabBuilder::three_containers().up();
    let first_host = first.spec().host_netns();
    let second_host = second.spec().host_netns();
    let pins = PinRoot::new(&first_host);

    pins.xbr_ok(&["attach", "br0"]);
    // The way a user works from inside a namespace: nsenter, no `-n`.
    let output = std::process::Command::new("nsenter")
        .arg(format!("--net=/run/netns/{second_host}"))
        .arg(xbr_tests::witness::xbr_binary())
        .args(xbr_tests::witness::without_root_cgroup(&[
            "--pin-root",
            pins.arg(),
            "attach",
            "br0",
        ]))
        .output()
        .unwrap();
    assert!(
        output.status.success(),
        "attach in {second_host}: {}",
        String::from_utf8_lossy(&output.stderr)
    );
    let second_pins = PinRoot {
        path: pins.path.clone(),
        netns: second_host.clone(),
    };

    let status = |netns: &str| -> serde_json::Value {
        serde_json::from_str(&xbr_ok(&[
            "-n",
            netns,
            "--pin-root",
            pins.arg(),
            "status",
            "--json",
        ]))
        .unwrap()
    };
    let first_status = status(&first_host);
    let second_status = status(&second_host);
    assert_eq!(first_status["bridges"].as_array().unwrap().len(), 1);
    assert_eq!(second_status["bridges"].as_array().unwrap().len(), 1);
    assert_ne!(
        first_status["bridges"][0]["pins"],
        second_status["bridges"][0]["pins"]
    );

    pins.xbr_ok(&["detach", "br0"]);
    assert_eq!(
        tc_programs(&second_host, "veth-a"),
        vec!["port_ingress"],
        "detach in one namespace must not touch the other"
    );
    let spec = second.spec();
    let (a, b) = (
        NetNs::open(&spec.container_netns("a")).unwrap(),
        NetNs::open(&spec.container_netns("b")).unwrap(),
    );
    tcp_echo(&a, &b, spec.container("b").unwrap().address.addr, 64 * 1024);
    second_pins.xbr_ok(&["detach", "br0"]);
    assert!(!pins.path.exists());
    std::mem::forget(second_pins);
}

#[test]
fn detach_after_a_port_was_deleted() {
    let lab = LabBuilder::three_containers().up();
    let host = lab.spec().host_netns();
    let pins = PinRoot::new(&host);
    pins.xbr_ok(&["attach", "br0", "--mode", "clsact"]);
    ip_in(&host, &["link", "del", "veth-c"]);
    pins.xbr_ok(&["detach", "br0"]);
    for port in ["veth-a", "veth-b"] {
        assert!(
            tc_programs(&host, port).is_empty(),
            "a program is left on {port}"
        );
        assert!(
            !tc_qdiscs(&host, port).contains("clsact"),
            "a clsact qdisc is left on {port}"
        );
    }
    assert!(!pins.path.exists());
}
