//! Docker end to end, egress (run as root, with a Docker daemon of the test's own): a
//! container on Docker's default network reaches a server in an outside namespace through
//! xbr's source NAT while Docker's MASQUERADE rule counts nothing; a container on an
//! `--internal` network still cannot reach out, and `xbr status` says why egress stays the
//! kernel's there.

use std::net::SocketAddr;

use xbr_tests::{
    docker_support::{Dockerd, OUTSIDE_IP, Outside, UPLINK_HOST_IP, Xbr, rule_packets},
    traffic::{seen_as, who_are_you_server},
};

const WHO_PORT: u16 = 7000;

/// Packets Docker's MASQUERADE rule for `subnet` counted.
fn masquerade_packets(subnet: &str) -> u64 {
    rule_packets("nat", "POSTROUTING", &["MASQUERADE", subnet])
        .unwrap_or_else(|| panic!("Docker has no MASQUERADE rule for {subnet}"))
}

#[test]
fn docker_containers_reach_out_through_xbr_and_internal_networks_stay_closed() {
    let docker = match Dockerd::start() {
        Ok(docker) => docker,
        Err(reason) => {
            xbr_tests::skip::skip(
                "docker_containers_reach_out_through_xbr_and_internal_networks_stay_closed",
                &reason,
            );
            return;
        }
    };
    let tag = docker.tag.clone();
    let image = docker.import_busybox();
    let outside = Outside::create(&tag);
    who_are_you_server(&outside.netns, OUTSIDE_IP, WHO_PORT);
    let server = SocketAddr::from((OUTSIDE_IP, WHO_PORT));
    let bridge = docker.bridge.clone();
    let internal_network = format!("xbr{tag}-internal");
    let internal_id = docker.cli(&["network", "create", "--internal", &internal_network]);
    let internal_bridge = format!("br-{}", &internal_id[..12]);
    docker.run_container("client", &[&image, "sleep", "3600"]);
    docker.run_container(
        "closed",
        &["--network", &internal_network, &image, "sleep", "3600"],
    );
    let client = docker.netns("client");
    let closed = docker.netns("closed");
    let subnet = "10.213.0.0/24";

    // Docker's own path first: masqueraded by its rule.
    let before = masquerade_packets(subnet);
    let (seen, _) = seen_as(&client.netns, server).expect("Docker's path reaches out");
    assert_eq!(seen.ip(), UPLINK_HOST_IP);
    assert!(
        masquerade_packets(subnet) > before,
        "Docker's rule masqueraded it"
    );

    // xbr attached: Docker's network asks for masquerading, xbr does it.
    let mut xbr = Xbr::new(&docker);
    xbr.attach(&bridge, &["--uplink", &outside.uplink]);
    let status = xbr.bridge_status(&bridge);
    assert_eq!(status["egress"]["accelerated"], true, "{status}");
    let before = masquerade_packets(subnet);
    for round in 0..50 {
        let (seen, local) = seen_as(&client.netns, server)
            .unwrap_or_else(|e| panic!("connection {round} through xbr: {e}"));
        // The uplink's address; the container's own port, unless a flow to the server
        // held it (then one of xbr's, outside the local port range).
        assert_eq!(seen.ip(), UPLINK_HOST_IP, "connection {round}");
        assert!(
            seen.port() == local.port() || !(32768..=60999).contains(&seen.port()),
            "connection {round} from {local} seen as {seen}"
        );
    }
    assert_eq!(
        masquerade_packets(subnet),
        before,
        "Docker's MASQUERADE rule saw none of xbr's connections"
    );
    let stats = xbr.stats(&bridge);
    let out = stats["verdicts"][0]["egress_out"].as_u64().unwrap();
    assert!(out >= 50 * 3, "{stats}");
    assert!(
        stats["nat"][0]["egress_opened"].as_u64().unwrap() >= 50,
        "{stats}"
    );

    // The internal network: no way out, with xbr or without.
    xbr.attach(&internal_bridge, &["--uplink", &outside.uplink]);
    let status = xbr.bridge_status(&internal_bridge);
    assert_eq!(status["egress"]["accelerated"], false, "{status}");
    assert!(
        status["egress"]["reason"]
            .as_str()
            .unwrap()
            .contains("is internal"),
        "{status}"
    );
    assert!(
        seen_as(&closed.netns, server).is_err(),
        "a container on an internal network reached out"
    );
    let stats = xbr.stats(&internal_bridge);
    assert_eq!(stats["verdicts"][0]["egress_out"], 0, "{stats}");
}
