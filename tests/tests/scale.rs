//! Scale (run as root): 1000 containers on one bridge. Its own test binary, so that the
//! load of building 1000 namespaces never overlaps the timing of the other traffic tests.

use std::time::{Duration, Instant};

use xbr_tests::{
    lab_support::{ExtraContainers, LabBuilder, wait_ports_forwarding},
    witness::{Follower, PinRoot, wait_for},
};

/// 1000 containers on one bridge: attach, a reconcile without change, and the follower's
/// reconcile when one more container arrives. Prints the times (see the lifecycle note).
#[test]
fn a_thousand_endpoints() {
    let count: usize = std::env::var("XBR_SCALE_ENDPOINTS")
        .ok()
        .and_then(|n| n.parse().ok())
        .unwrap_or(1000);
    let mut spec = LabBuilder::three_containers().build();
    spec.bridge.address = Some(xbr::lab::Ipv4Cidr::new("10.77.0.1".parse().unwrap(), 16));
    spec.containers = (0..count)
        .map(|i| {
            let i = i as u32 + 2;
            xbr::lab::ContainerSpec {
                name: format!("c{i}"),
                address: xbr::lab::Ipv4Cidr::new(std::net::Ipv4Addr::from(0x0a4d_0000 | i), 16),
                mac: Some(xbr::lab::MacAddr([
                    0x02,
                    0x77,
                    0x10,
                    0,
                    (i >> 8) as u8,
                    i as u8,
                ])),
            }
        })
        .collect();
    let started = Instant::now();
    let lab = xbr::lab::LabGuard::up(spec).expect("the big lab comes up");
    eprintln!("lab of {count} containers up in {:?}", started.elapsed());
    let host = lab.spec().host_netns();
    let pins = PinRoot::new(&host);
    wait_ports_forwarding(lab.spec(), Duration::from_secs(60));

    let mode = std::env::var("XBR_SCALE_MODE").unwrap_or_else(|_| "auto".to_owned());
    let started = Instant::now();
    pins.xbr_ok(&["attach", "br0", "--mode", &mode]);
    eprintln!(
        "attach ({mode}) with {count} endpoints: {:?}",
        started.elapsed()
    );
    assert_eq!(pins.endpoints().len(), count);

    let started = Instant::now();
    let stdout = pins.xbr_ok(&["attach", "br0"]);
    eprintln!(
        "reconcile without change at {count} endpoints (a second attach): {:?}",
        started.elapsed()
    );
    assert!(stdout.contains("already attached"), "{stdout}");

    let follower = Follower::start(&host, &pins.path, "br0", &[]);
    let mut extra = ExtraContainers::new(lab.spec());
    extra.add(
        &format!("{}-more", lab.spec().name),
        "veth-more",
        "02:77:00:00:04:01",
        "10.77.200.1/16",
    );
    let took = wait_for(
        "the extra container's endpoint",
        Duration::from_secs(5),
        || pins.endpoints().contains_key("veth-more"),
    );
    eprintln!("time to fast path at {count} endpoints: {took:?}");
    let reconciles: Vec<&str> = follower
        .log()
        .lines()
        .filter(|l| l.contains("reconciled"))
        .map(|_| "")
        .collect();
    assert!(!reconciles.is_empty());
    for line in follower.log().lines().filter(|l| l.contains("reconciled")) {
        eprintln!("follower: {line}");
    }
}
