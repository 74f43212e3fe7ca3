//! Hairpin to published ports on a real Docker host (run as root), with Docker's
//! `--userland-proxy` on (docker-proxy serves containers and the host) and off (hairpin DNAT,
//! whose replies only conntrack translates back): every way a client reaches a published port
//! works with `xbr attach --follow` exactly as it does on Docker's path alone, and the client
//! talks to the address it dialled. Skipped, with the reason printed, only where Docker cannot
//! run.

use std::{
    net::{Ipv4Addr, SocketAddr, TcpStream},
    time::Duration,
};

use xbr::netns::NetNs;
use xbr_tests::{
    docker_support::{Dockerd, Outside, TcpEcho, UPLINK_HOST_IP, Xbr, tcp_exchange},
    witness::wait_for,
};

const ECHO_PORT: u16 = 9000;
/// The default network's gateway: the bridge's address (docker_support's BRIDGE_ADDRESS).
const GATEWAY: Ipv4Addr = Ipv4Addr::new(10, 213, 0, 1);
const SHORT: Duration = Duration::from_secs(2);
/// How long a follower may take to publish Docker's ports: a bound, not a target.
const LONG: Duration = Duration::from_secs(10);

/// Whether a client in `netns` (the host when `None`) gets an echo from `to`, and sees the
/// connection's peer as `to`: Ok, or what went wrong.
fn reach(netns: Option<&NetNs>, to: SocketAddr) -> Result<(), String> {
    let payload = [9u8; 64];
    let run = || -> Result<(), String> {
        let stream = TcpStream::connect_timeout(&to, SHORT).map_err(|e| e.to_string())?;
        let peer = stream.peer_addr().map_err(|e| e.to_string())?;
        if peer != to {
            return Err(format!("connected to {peer}, not {to}"));
        }
        drop(stream);
        tcp_exchange(None, to, &payload, SHORT).map_err(|e| e.to_string())
    };
    match netns {
        Some(netns) => netns.run(run).map_err(|e| e.to_string())?,
        None => run(),
    }
}

#[test]
fn hairpin_to_published_ports_with_and_without_the_userland_proxy() {
    for userland_proxy in [true, false] {
        if let Err(reason) = hairpin(userland_proxy) {
            xbr_tests::skip::skip(
                "hairpin_to_published_ports_with_and_without_the_userland_proxy",
                &reason,
            );
            return;
        }
    }
}

/// One Docker mode; `Err` when Docker cannot run here.
fn hairpin(userland_proxy: bool) -> Result<(), String> {
    let docker = Dockerd::start_with(userland_proxy)?;
    let tag = docker.tag.clone();
    let image = docker.import_busybox();
    let outside = Outside::create(&tag);
    let host_port = 21000 + (std::process::id() % 1000) as u16 * 4 + u16::from(userland_proxy);
    let second_network = format!("xbr{tag}-second");
    docker.cli(&["network", "create", &second_network]);
    let publish = format!("{host_port}:{ECHO_PORT}/tcp");
    docker.run_container("server", &["-p", &publish, &image, "sleep", "3600"]);
    docker.run_container("client", &[&image, "sleep", "3600"]);
    docker.run_container(
        "other",
        &["--network", &second_network, &image, "sleep", "3600"],
    );
    let server_ip = docker.container_ip("server");
    let (server, client, other) = (
        docker.netns("server"),
        docker.netns("client"),
        docker.netns("other"),
    );
    let _echo = TcpEcho::start(&server.netns, server_ip, ECHO_PORT);
    let at = |ip: Ipv4Addr| SocketAddr::from((ip, host_port));
    let cases: [(&str, Option<&NetNs>, SocketAddr); 7] = [
        (
            "a container, via the gateway",
            Some(&client.netns),
            at(GATEWAY),
        ),
        (
            "a container, via the host's other address",
            Some(&client.netns),
            at(UPLINK_HOST_IP),
        ),
        (
            "the container itself, via the gateway (self-hairpin)",
            Some(&server.netns),
            at(GATEWAY),
        ),
        (
            "a container on another network, via the host's address",
            Some(&other.netns),
            at(UPLINK_HOST_IP),
        ),
        ("the host, via the gateway", None, at(GATEWAY)),
        ("the host, via 127.0.0.1", None, at(Ipv4Addr::LOCALHOST)),
        (
            "outside, via the uplink",
            Some(&outside.netns),
            at(UPLINK_HOST_IP),
        ),
    ];
    let outcomes = || -> Vec<Result<(), String>> {
        cases
            .iter()
            .map(|(_, netns, to)| reach(*netns, *to))
            .collect()
    };
    let docker_alone = outcomes();

    let mut xbr = Xbr::new(&docker);
    let follower = xbr.follow(&docker.bridge, &outside.uplink);
    let wanted = format!("{host_port}:{server_ip}:{ECHO_PORT}/tcp");
    wait_for("Docker's published port in xbr", LONG, || {
        xbr.published(&docker.bridge).contains(&wanted)
    });
    let with_xbr = outcomes();
    let report = format!("follower log:\n{}", follower.log());

    eprintln!("--userland-proxy={userland_proxy}: client -> published port {host_port}");
    eprintln!("  {:<58} {:<10} with xbr", "client", "Docker");
    for ((name, _, _), (alone, with)) in cases.iter().zip(docker_alone.iter().zip(&with_xbr)) {
        let show = |r: &Result<(), String>| match r {
            Ok(()) => "ok".to_owned(),
            Err(e) => format!("fails ({e})"),
        };
        eprintln!("  {name:<58} {:<10} {}", show(alone), show(with));
    }
    for ((name, _, _), (alone, with)) in cases.iter().zip(docker_alone.iter().zip(&with_xbr)) {
        assert_eq!(
            alone.is_ok(),
            with.is_ok(),
            "--userland-proxy={userland_proxy}: {name}: Docker alone {alone:?}, with xbr \
             {with:?}\n{report}\n{:#}",
            xbr.bridge_status(&docker.bridge)
        );
    }
    // What Docker serves it serves: the container and outside cases work in both modes.
    for case in [0, 1, 2, 6] {
        assert!(
            docker_alone[case].is_ok(),
            "--userland-proxy={userland_proxy}: {} fails on Docker's own path: {:?}",
            cases[case].0,
            docker_alone[case]
        );
    }
    // The client's direct connection to the container stays reachable, and with the proxy
    // off, the status names the DNAT whose replies take the bridge.
    reach(
        Some(&client.netns),
        SocketAddr::from((server_ip, ECHO_PORT)),
    )
    .expect("the client reaches the container directly");
    let held = xbr.bridge_status(&docker.bridge)["policy"]["east_west_held"].clone();
    if userland_proxy {
        assert_eq!(
            held,
            serde_json::json!([]),
            "nothing is hairpin-DNATed: {held:#}"
        );
    } else {
        let reply = format!("tcp {server_ip}:{ECHO_PORT} -> *:*");
        assert!(
            held.as_array().is_some_and(|held| held.iter().any(|h| {
                h["packets"] == reply.as_str()
                    && h["reason"].as_str().is_some_and(|r| r.contains("DNAT"))
            })),
            "the server's replies are held back for conntrack: {held:#}"
        );
    }
    Ok(())
}
