//! The lab builder and named namespaces against the kernel (run as root). Every test works in
//! namespaces of its own, named uniquely, and removes them on every path.

use std::collections::BTreeSet;
use std::panic::{AssertUnwindSafe, catch_unwind};

use xbr::lab::{self, LabError, LabGuard};
use xbr::netns::{self, NetNs, NetNsError};
use xbr_tests::lab_support::{
    DownOnDrop, LabBuilder, assert_ping, ip_in, netns_list, unique_name, wait_settled,
};

/// Deletes a bare namespace on drop.
struct NetnsCleanup(String);

impl Drop for NetnsCleanup {
    fn drop(&mut self) {
        let _ = NetNs::delete(&self.0);
    }
}

fn root_links() -> BTreeSet<String> {
    let listing = std::process::Command::new("ip")
        .args(["-o", "link", "show"])
        .output()
        .unwrap();
    String::from_utf8_lossy(&listing.stdout)
        .lines()
        .filter_map(|line| line.split(": ").nth(1))
        .map(|name| name.split('@').next().unwrap_or(name).to_owned())
        .collect()
}

/// Links, IPv4 addresses and routes of every lab namespace: what a second `up` must not touch.
fn snapshot(spec: &lab::LabSpec) -> Vec<String> {
    spec.namespaces()
        .iter()
        .flat_map(|netns| {
            [
                ip_in(netns, &["-o", "link", "show"]),
                ip_in(netns, &["-o", "-4", "addr", "show"]),
                ip_in(netns, &["-4", "route", "show", "table", "all"]),
            ]
        })
        .collect()
}

#[test]
fn netns_is_visible_to_iproute2_and_enterable() {
    let name = unique_name("n");
    let _cleanup = NetnsCleanup(name.clone());
    let netns = NetNs::create(&name).expect("create a namespace");
    assert!(NetNs::exists(&name));
    assert!(
        netns_list().contains(&name),
        "`ip netns list` should show {name}"
    );
    let exec = std::process::Command::new("ip")
        .args(["netns", "exec", &name, "true"])
        .status()
        .unwrap();
    assert!(exec.success(), "`ip netns exec {name} true` should work");

    assert_eq!(NetNs::create(&name).expect("create is idempotent"), netns);
    let inside = netns.run(netns::current_inode).unwrap().unwrap();
    assert_ne!(
        inside,
        netns::current_inode().unwrap(),
        "run() must leave the caller's namespace"
    );
    assert_eq!(inside, netns.inode().unwrap());
    assert_eq!(NetNs::open(&name).unwrap().run(|| 7).unwrap(), 7);

    NetNs::delete(&name).expect("delete the namespace");
    assert!(!NetNs::exists(&name));
    assert!(!netns_list().contains(&name));
    assert!(matches!(
        NetNs::open(&name),
        Err(NetNsError::NotFound { .. })
    ));
    NetNs::delete(&name).expect("deleting an absent namespace is fine");
}

#[test]
fn netns_run_passes_panics_through() {
    let name = unique_name("n");
    let _cleanup = NetnsCleanup(name.clone());
    let netns = NetNs::create(&name).unwrap();
    let caught = catch_unwind(AssertUnwindSafe(|| netns.run(|| panic!("inside {name}"))));
    let payload = caught.expect_err("the panic should reach the caller");
    let message = payload
        .downcast_ref::<String>()
        .cloned()
        .unwrap_or_default();
    assert!(
        message.starts_with("inside "),
        "panic payload should be kept, got {message:?}"
    );
}

#[test]
fn up_builds_a_bridge_whose_containers_reach_each_other() {
    let roots_before = root_links();
    let lab = LabBuilder::three_containers().up();
    let spec = lab.spec();

    let listed = netns_list();
    for netns in spec.namespaces() {
        assert!(
            listed.contains(&netns),
            "`ip netns list` should show {netns}"
        );
    }
    let ports = ip_in(&spec.host_netns(), &["-o", "link", "show", "master", "br0"]);
    for container in &spec.containers {
        let port = lab::LabSpec::port_name(&container.name);
        assert!(
            ports.contains(&format!(": {port}@")),
            "{port} should be a port of br0: {ports}"
        );
        let netns = spec.container_netns(&container.name);
        let eth0 = ip_in(&netns, &["-o", "link", "show", "eth0"]);
        let mac = container.mac.unwrap().to_string();
        assert!(
            eth0.contains(&mac) && eth0.contains("UP"),
            "eth0 in {netns} should be up with {mac}: {eth0}"
        );
        let route = ip_in(&netns, &["-4", "route", "show", "default"]);
        assert!(
            route.contains("via 10.77.0.1"),
            "{netns} should route via the bridge: {route}"
        );
    }

    for from in &spec.containers {
        let netns = spec.container_netns(&from.name);
        assert_ping(&netns, spec.bridge.address.unwrap().addr);
        for to in spec.containers.iter().filter(|to| to.name != from.name) {
            assert_ping(&netns, to.address.addr);
        }
    }

    let new_in_root: Vec<_> = root_links().difference(&roots_before).cloned().collect();
    for name in ["br0", "veth-a", "veth-b", "veth-c", "eth0"] {
        assert!(
            !new_in_root.iter().any(|link| link == name),
            "{name} appeared in the root namespace"
        );
    }
}

#[test]
fn second_up_changes_nothing() {
    let lab = LabBuilder::three_containers().with_uplink().up();
    let spec = lab.spec();
    wait_settled(spec);
    let before = snapshot(spec);
    lab::up(spec).expect("a second up on a complete lab should succeed");
    assert_eq!(
        snapshot(spec),
        before,
        "a second up must leave links, addresses and routes alone"
    );
    assert_ping(&spec.container_netns("a"), spec.containers[1].address.addr);
}

#[test]
fn down_removes_every_namespace() {
    let lab = LabBuilder::three_containers().with_uplink().up();
    let spec = lab.spec().clone();
    lab.down().expect("down should succeed");
    let listed = netns_list();
    for netns in spec.namespaces() {
        assert!(!NetNs::exists(&netns), "{netns} should be gone");
        assert!(
            !listed.contains(&netns),
            "`ip netns list` still shows {netns}"
        );
    }
    lab::down(&spec).expect("down on a removed lab is fine");
}

#[test]
fn guard_tears_the_lab_down_on_panic() {
    let spec = LabBuilder::three_containers().build();
    let _cleanup = DownOnDrop(spec.clone());
    let outcome = catch_unwind(AssertUnwindSafe(|| {
        let _lab = LabGuard::up(spec.clone()).expect("lab should come up");
        assert!(NetNs::exists(&spec.host_netns()));
        panic!("test failure inside a lab");
    }));
    assert!(outcome.is_err());
    for netns in spec.namespaces() {
        assert!(
            !NetNs::exists(&netns),
            "{netns} should be gone after the panic"
        );
    }
}

#[test]
fn uplink_joins_the_host_to_the_outside() {
    let lab = LabBuilder::three_containers().with_uplink().up();
    let spec = lab.spec();
    let uplink = spec.uplink.as_ref().unwrap();
    let outside = spec.outside_netns().unwrap();
    let host = spec.host_netns();

    assert_ping(&outside, uplink.host_address.addr);
    assert_ping(&host, uplink.outside_address.addr);
    // The host namespace answers on its uplink address for the containers too.
    assert_ping(&spec.container_netns("a"), uplink.host_address.addr);

    let uplink0 = ip_in(&host, &["-o", "link", "show", "uplink0"]);
    assert!(
        !uplink0.contains("master"),
        "uplink0 must not be a bridge port: {uplink0}"
    );
    let forwarding = std::process::Command::new("ip")
        .args([
            "netns",
            "exec",
            &host,
            "cat",
            "/proc/sys/net/ipv4/ip_forward",
        ])
        .output()
        .unwrap();
    assert_eq!(
        String::from_utf8_lossy(&forwarding.stdout).trim(),
        "1",
        "forwarding on in {host}"
    );
}

#[test]
fn failed_up_removes_only_what_it_made() {
    let spec = LabBuilder::three_containers().build();
    let _cleanup = DownOnDrop(spec.clone());
    let host = spec.host_netns();
    // A host namespace that already holds a bridge where veth-c belongs: up makes br0, veth-a
    // and veth-b, then meets the bridge veth-c and must take back all of that, but nothing older.
    NetNs::create(&host).unwrap();
    ip_in(&host, &["link", "add", "veth-c", "type", "bridge"]);

    match lab::up(&spec) {
        Err(LabError::Conflict { ifname, .. }) => assert_eq!(ifname, "veth-c"),
        other => panic!("up should refuse the bridge named veth-c, got {other:?}"),
    }
    assert!(
        NetNs::exists(&host),
        "the host namespace predates up and must stay"
    );
    for container in &spec.containers {
        let netns = spec.container_netns(&container.name);
        assert!(
            !NetNs::exists(&netns),
            "{netns} was made by the failed up and must be gone"
        );
    }
    let links = ip_in(&host, &["-o", "link", "show"]);
    for made in ["br0", "veth-a", "veth-b"] {
        assert!(
            !links.contains(&format!(": {made}")),
            "{made} should be removed: {links}"
        );
    }
    assert!(
        links.contains(": veth-c:"),
        "the older veth-c must stay: {links}"
    );
}
