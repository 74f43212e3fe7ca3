//! xbr on a real Docker host (run as root): a dockerd of the test's own with Docker's real
//! iptables setup, containers with `-p`, a client in an outside namespace behind a veth uplink.
//! With `xbr attach --follow`, published ports and east-west traffic take the fast path (xbr's
//! counters grow, Docker's DNAT and FORWARD counters stay flat); enable_icc=false, network
//! isolation, DOCKER-USER rules and a native nftables table block exactly what they block
//! without xbr, and only that falls back to the kernel path; `detach` gives
//! the traffic back to Docker. Ends with requests/s and connections/s for xbr, iptables DNAT
//! and docker-proxy. Skipped, with the reason printed, only where Docker cannot run.

use std::{
    net::{Ipv4Addr, SocketAddr, SocketAddrV4},
    time::{Duration, Instant},
};

use serde_json::Value;
use xbr_tests::docker_support::{
    Dockerd, INDEX_HTML, InsertedRule, NftTable, OUTSIDE_IP, Outside, Rate, TcpEcho,
    UPLINK_HOST_IP, UdpEcho, Xbr, connection_rate, dnat_packets, http_get, request_rate,
    tcp_exchange, udp_exchange,
};

const ECHO_PORT: u16 = 9000;
const UDP_PORT: u16 = 9001;
const BLOCKED_PORT: u16 = 9002;
const HTTP_PORT: u16 = 8080;
const SHORT: Duration = Duration::from_secs(1);
/// How long a follower may take to react to Docker or the firewall: an upper bound for a
/// loaded machine, not a speed target.
const LONG: Duration = Duration::from_secs(10);
/// The benchmark: rounds of each path (XBR_BENCH_ROUNDS overrides), each measurement bounded
/// in count and time.
const BENCH_ROUNDS: usize = 3;
const BENCH_CONNECTIONS: u64 = 2000;
const BENCH_REQUESTS: u64 = 20000;
const BENCH_LIMIT: Duration = Duration::from_secs(1);
/// The host's end of the second outside link, which xbr does not hook.
const KERNEL_SIDE_HOST_IP: Ipv4Addr = Ipv4Addr::new(10, 216, 0, 1);

/// Host ports for this process, below the ephemeral range.
struct HostPorts {
    http: u16,
    echo: u16,
    udp: u16,
    icc: u16,
    late: u16,
}

impl HostPorts {
    fn new() -> HostPorts {
        let base = 20000 + (std::process::id() % 1000) as u16 * 8;
        HostPorts {
            http: base,
            echo: base + 1,
            udp: base + 2,
            icc: base + 3,
            late: base + 4,
        }
    }
}

/// Waits for `done`; on time-out, panics with `explain()` (the follower's log, the status).
fn wait_for(
    what: &str,
    limit: Duration,
    mut done: impl FnMut() -> bool,
    explain: impl Fn() -> String,
) {
    let started = Instant::now();
    while !done() {
        assert!(
            started.elapsed() < limit,
            "{what} did not happen within {limit:?}:\n{}",
            explain()
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

fn at(ip: Ipv4Addr, port: u16) -> SocketAddr {
    SocketAddr::V4(SocketAddrV4::new(ip, port))
}

/// Packets of Docker's FORWARD rule that accepts traffic between the ports of `bridge`.
fn east_west_accept_packets(bridge: &str) -> u64 {
    let listing = xbr_tests::docker_support::run("iptables", &["-L", "FORWARD", "-v", "-x", "-n"]);
    listing
        .lines()
        .map(|line| line.split_whitespace().collect::<Vec<_>>())
        .find(|f| f.len() > 6 && f[2] == "ACCEPT" && f[5] == bridge && f[6] == bridge)
        .and_then(|f| f[0].parse().ok())
        .unwrap_or_else(|| panic!("no FORWARD accept between the ports of {bridge}:\n{listing}"))
}

/// The `published` entry of `spec` in a bridge's status.
fn published_entry<'a>(status: &'a Value, spec: &str) -> Option<&'a Value> {
    status["published"]
        .as_array()?
        .iter()
        .find(|p| p["spec"] == spec)
}

fn spec(host_port: u16, ip: Ipv4Addr, port: u16, proto: &str) -> String {
    format!("{host_port}:{ip}:{port}/{proto}")
}

#[test]
fn docker_host_end_to_end() {
    let docker = match Dockerd::start() {
        Ok(docker) => docker,
        Err(reason) => {
            xbr_tests::skip::skip("docker_host_end_to_end", &reason);
            return;
        }
    };
    let started = Instant::now();
    let tag = docker.tag.clone();
    let image = docker.import_busybox();
    let outside = Outside::create(&tag);
    let ports = HostPorts::new();
    let bridge = docker.bridge.clone();
    let icc_bridge = format!("xbri{tag}");
    let icc_network = format!("xbr{tag}-noicc");
    let plain_network = format!("xbr{tag}-plain");
    let icc_off = "com.docker.network.bridge.enable_icc=false".to_owned();
    let icc_name = format!("com.docker.network.bridge.name={icc_bridge}");
    docker.cli(&[
        "network",
        "create",
        "-o",
        &icc_off,
        "-o",
        &icc_name,
        &icc_network,
    ]);
    let plain_id = docker.cli(&["network", "create", &plain_network]);
    let plain_bridge = format!("br-{}", &plain_id[..12]);

    // The default network: a serves HTTP (busybox httpd) and echoes; b is its peer.
    let p = |host: u16, container: u16, proto: &str| format!("{host}:{container}/{proto}");
    docker.run_container(
        "web",
        &[
            "-p",
            &p(ports.http, HTTP_PORT, "tcp"),
            "-p",
            &p(ports.echo, ECHO_PORT, "tcp"),
            "-p",
            &p(ports.udp, UDP_PORT, "udp"),
            &image,
            "httpd",
            "-f",
            "-p",
            &HTTP_PORT.to_string(),
            "-h",
            "/www",
        ],
    );
    docker.run_container("peer", &[&image, "sleep", "3600"]);
    // The icc=false network: c (published) and d.
    docker.run_container(
        "noicc1",
        &[
            "--network",
            &icc_network,
            "-p",
            &p(ports.icc, ECHO_PORT, "tcp"),
            &image,
            "sleep",
            "3600",
        ],
    );
    docker.run_container(
        "noicc2",
        &["--network", &icc_network, &image, "sleep", "3600"],
    );
    // Another network: e.
    docker.run_container(
        "other",
        &["--network", &plain_network, &image, "sleep", "3600"],
    );

    let ip = |name: &str| docker.container_ip(name);
    let (a_ip, b_ip, c_ip, d_ip, e_ip) = (
        ip("web"),
        ip("peer"),
        ip("noicc1"),
        ip("noicc2"),
        ip("other"),
    );
    let (a, b, c, d, e) = (
        docker.netns("web"),
        docker.netns("peer"),
        docker.netns("noicc1"),
        docker.netns("noicc2"),
        docker.netns("other"),
    );
    let _servers = (
        TcpEcho::start(&a.netns, a_ip, ECHO_PORT),
        UdpEcho::start(&a.netns, a_ip, UDP_PORT),
        TcpEcho::start(&b.netns, b_ip, ECHO_PORT),
        TcpEcho::start(&b.netns, b_ip, BLOCKED_PORT),
        TcpEcho::start(&c.netns, c_ip, ECHO_PORT),
        TcpEcho::start(&d.netns, d_ip, ECHO_PORT),
        TcpEcho::start(&e.netns, e_ip, ECHO_PORT),
    );
    let out = Some(&outside.netns);
    let published = |port: u16| at(UPLINK_HOST_IP, port);
    let payload = [7u8; 100];

    // 1. Docker's own path, before xbr: the reference for what must work and what must not.
    let dnat_before = dnat_packets(ports.echo);
    tcp_exchange(out, published(ports.echo), &payload, LONG)
        .expect("the published port works on Docker's path");
    assert!(
        dnat_packets(ports.echo) > dnat_before,
        "Docker's DNAT served it"
    );
    assert_eq!(
        http_get(out, published(ports.http)).expect("GET through the published port"),
        INDEX_HTML
    );
    tcp_exchange(Some(&a.netns), at(b_ip, ECHO_PORT), &payload, LONG).expect("a reaches b");
    assert!(
        tcp_exchange(Some(&c.netns), at(d_ip, ECHO_PORT), &payload, SHORT).is_err(),
        "icc=false: c must not reach d on Docker's path either"
    );
    assert!(
        tcp_exchange(Some(&a.netns), at(e_ip, ECHO_PORT), &payload, SHORT).is_err(),
        "separate networks: a must not reach e on Docker's path either"
    );

    // 2. Attach: followers on the default and the icc=false bridges, a plain attach on the
    //    third network's bridge.
    let mut xbr = Xbr::new(&docker);
    let mut follower = xbr.follow(&bridge, &outside.uplink);
    let mut icc_follower = xbr.follow(&icc_bridge, &outside.uplink);
    let attached = xbr.attach(&plain_bridge, &["--uplink", &outside.uplink]);
    eprintln!("xbr attach {plain_bridge}:\n{attached}");
    assert!(
        attached.contains(&format!("Docker network {plain_network}")),
        "{attached}"
    );
    let explain = || {
        format!(
            "follower of {bridge}:\n{}\nfollower of {icc_bridge}:\n{}\nxbr status:\n{}",
            follower.log(),
            icc_follower.log(),
            xbr.run(&["status"]).1
        )
    };
    let wanted = [
        spec(ports.http, a_ip, HTTP_PORT, "tcp"),
        spec(ports.echo, a_ip, ECHO_PORT, "tcp"),
        spec(ports.udp, a_ip, UDP_PORT, "udp"),
    ];
    wait_for(
        "Docker's published ports in xbr",
        LONG,
        || {
            let now = xbr.published(&bridge);
            wanted.iter().all(|w| now.contains(w))
        },
        explain,
    );
    let status = xbr.bridge_status(&bridge);
    assert_eq!(status["docker"]["network"], "bridge", "{status:#}");
    assert_eq!(status["policy"]["east_west"], Value::Null, "{status:#}");
    assert_eq!(
        status["policy"]["east_west_held"],
        serde_json::json!([]),
        "Docker's own rules hold nothing back: {status:#}"
    );
    // No port is held back; only clients claiming another Docker network's addresses are
    // (that network's MASQUERADE would translate them on Docker's path).
    assert!(
        status["published"]
            .as_array()
            .is_some_and(|p| p.iter().all(|p| {
                p["held"] == false
                    && p["not_accelerated"].as_array().is_some_and(|held| {
                        held.iter().all(|h| {
                            h["class"]
                                .as_str()
                                .is_some_and(|c| c.contains("for clients 10.214."))
                        })
                    })
            })),
        "{status:#}"
    );

    // 3. Published ports through xbr: xbr's counter grows, Docker's DNAT counter does not.
    let (dnat_echo, dnat_http, nat_in) = (
        dnat_packets(ports.echo),
        dnat_packets(ports.http),
        xbr.nat_in(&bridge),
    );
    for i in 0..100 {
        tcp_exchange(out, published(ports.echo), &payload, LONG)
            .unwrap_or_else(|e| panic!("connection {i} through xbr: {e}\n{}", follower.log()));
    }
    assert_eq!(
        http_get(out, published(ports.http)).expect("GET through xbr"),
        INDEX_HTML
    );
    assert_eq!(
        udp_exchange(out, published(ports.udp), 20),
        20,
        "UDP through the published port"
    );
    assert!(
        xbr.nat_in(&bridge) >= nat_in + 100,
        "the connections took xbr's NAT"
    );
    assert_eq!(
        (dnat_packets(ports.echo), dnat_packets(ports.http)),
        (dnat_echo, dnat_http),
        "Docker's DNAT rules saw none of them"
    );
    // The icc=false network's published port is accelerated too.
    let (dnat_icc, icc_nat_in) = (dnat_packets(ports.icc), xbr.nat_in(&icc_bridge));
    wait_for(
        "c's published port in xbr",
        LONG,
        || {
            xbr.published(&icc_bridge)
                .contains(&spec(ports.icc, c_ip, ECHO_PORT, "tcp"))
        },
        explain,
    );
    tcp_exchange(out, published(ports.icc), &payload, LONG).expect("c's published port");
    assert!(
        xbr.nat_in(&icc_bridge) > icc_nat_in,
        "c's published port took xbr's NAT: {:#}\n{:#}\n{}",
        xbr.stats(&icc_bridge),
        xbr.bridge_status(&icc_bridge),
        explain()
    );
    assert_eq!(dnat_packets(ports.icc), dnat_icc);

    // 4. East-west through xbr: delivered by the fast path, never seen by FORWARD.
    // Docker's `-A FORWARD -i BRIDGE -o BRIDGE -j ACCEPT`: every new east-west connection on
    // the kernel path (br_netfilter) passes it.
    let east_west_accepts = || east_west_accept_packets(&bridge);
    let (forwarded, delivered) = (east_west_accepts(), xbr.delivered(&bridge));
    for _ in 0..20 {
        tcp_exchange(Some(&a.netns), at(b_ip, ECHO_PORT), &payload, LONG).expect("a reaches b");
    }
    assert!(
        xbr.delivered(&bridge) > delivered,
        "east-west took the fast path"
    );
    assert_eq!(
        east_west_accepts(),
        forwarded,
        "no east-west frame met FORWARD"
    );

    // 5. icc=false and separate networks stay as Docker made them.
    let icc_status = xbr.bridge_status(&icc_bridge);
    assert!(
        icc_status["policy"]["east_west"]
            .as_str()
            .is_some_and(|r| r.contains("enable_icc=false")),
        "status says why east-west is not accelerated: {icc_status:#}"
    );
    assert!(
        icc_status["ports"]
            .as_array()
            .unwrap()
            .iter()
            .all(|p| p["endpoint_mac"].is_null()),
        "no endpoints on the icc=false bridge: {icc_status:#}"
    );
    assert!(
        tcp_exchange(Some(&c.netns), at(d_ip, ECHO_PORT), &payload, SHORT).is_err(),
        "icc=false: c must not reach d with xbr attached"
    );
    assert!(
        tcp_exchange(Some(&a.netns), at(e_ip, ECHO_PORT), &payload, SHORT).is_err()
            && tcp_exchange(Some(&e.netns), at(a_ip, ECHO_PORT), &payload, SHORT).is_err(),
        "separate networks: a and e must not reach each other with xbr attached"
    );

    // 6. DOCKER-USER rules: the class they can match falls back, and what they drop stays
    //    dropped.
    {
        let uplink_rule = [
            "-i",
            outside.uplink.as_str(),
            "-p",
            "tcp",
            "-m",
            "tcp",
            "--dport",
            "9000",
            "-j",
            "DROP",
        ];
        let _drop_published = InsertedRule::insert("DOCKER-USER", &uplink_rule);
        let echo_spec = spec(ports.echo, a_ip, ECHO_PORT, "tcp");
        wait_for(
            "the published port the rule drops to fall back",
            LONG,
            || {
                let status = xbr.bridge_status(&bridge);
                published_entry(&status, &echo_spec).is_some_and(|p| {
                    p["held"] == true
                        && p["not_accelerated"][0]["reason"]
                            .as_str()
                            .is_some_and(|r| r.contains("DOCKER-USER"))
                })
            },
            explain,
        );
        assert!(
            tcp_exchange(out, published(ports.echo), &payload, SHORT).is_err(),
            "DOCKER-USER drops port 9000 from outside: so must xbr"
        );
        let (dnat_http, nat_in) = (dnat_packets(ports.http), xbr.nat_in(&bridge));
        assert_eq!(
            http_get(out, published(ports.http)).expect("8080 is not dropped"),
            INDEX_HTML
        );
        assert!(
            xbr.nat_in(&bridge) > nat_in && dnat_packets(ports.http) == dnat_http,
            "a port the rule cannot match stays on xbr's path"
        );
        let east_west_rule = [
            "-i",
            bridge.as_str(),
            "-o",
            bridge.as_str(),
            "-p",
            "tcp",
            "-m",
            "tcp",
            "--dport",
            "9002",
            "-j",
            "DROP",
        ];
        let _drop_east_west = InsertedRule::insert("DOCKER-USER", &east_west_rule);
        wait_for(
            "east-west to port 9002 to fall back",
            LONG,
            || {
                let status = xbr.bridge_status(&bridge);
                // The policy as read now, and the follower having applied it.
                status["policy"]["east_west_held"]
                    .as_array()
                    .is_some_and(|held| {
                        held.iter().any(|h| {
                            h["packets"].as_str().is_some_and(|p| p.ends_with(":9002"))
                                && h["reason"]
                                    .as_str()
                                    .is_some_and(|r| r.contains("DOCKER-USER"))
                        })
                    })
                    && status["policy"]["applied"] == true
            },
            explain,
        );
        let status = xbr.ok(&["status", &bridge]);
        eprintln!("xbr status {bridge} with two DOCKER-USER rules:\n{status}");
        assert!(
            status.contains("not accelerated: east-west tcp *:* -> *:9002: iptables `table ip filter` chain DOCKER-USER")
                && !status.contains("warning"),
            "{status}"
        );
        assert!(
            tcp_exchange(Some(&a.netns), at(b_ip, BLOCKED_PORT), &payload, SHORT).is_err(),
            "DOCKER-USER drops a->b port 9002: so must xbr"
        );
        let (forwarded, delivered) = (east_west_accepts(), xbr.delivered(&bridge));
        tcp_exchange(Some(&a.netns), at(b_ip, ECHO_PORT), &payload, LONG)
            .expect("a still reaches b on other ports");
        assert!(
            xbr.delivered(&bridge) > delivered && east_west_accepts() == forwarded,
            "east-west to other ports stays on the fast path"
        );
    }
    // 6b. A native nftables table (as on a host whose firewall is nft): its drop of the UDP
    //     port from outside holds back that published port only.
    {
        let udp_spec = spec(ports.udp, a_ip, UDP_PORT, "udp");
        let _native = NftTable::add(&format!(
            "table inet {} {{\n chain forward {{\n  type filter hook forward priority -5; policy accept;\n  \
             iifname \"{}\" udp dport {UDP_PORT} drop\n }}\n}}\n",
            NftTable::name(),
            outside.uplink
        ));
        wait_for(
            "the UDP port the native rule drops to fall back",
            LONG,
            || {
                let status = xbr.bridge_status(&bridge);
                published_entry(&status, &udp_spec).is_some_and(|p| p["held"] == true)
            },
            explain,
        );
        assert_eq!(
            udp_exchange(out, published(ports.udp), 5),
            0,
            "the native rule drops UDP 9001 from outside: so must xbr"
        );
        let nat_in = xbr.nat_in(&bridge);
        assert_eq!(
            http_get(out, published(ports.http)).expect("8080 is not dropped"),
            INDEX_HTML
        );
        assert!(xbr.nat_in(&bridge) > nat_in, "8080 stays on xbr's path");
    }
    wait_for(
        "the rules' removal to re-accelerate",
        LONG,
        || {
            let status = xbr.bridge_status(&bridge);
            status["policy"]["east_west"].is_null()
                && status["policy"]["east_west_held"]
                    .as_array()
                    .is_some_and(Vec::is_empty)
                && status["published"]
                    .as_array()
                    .is_some_and(|p| p.len() == 3 && p.iter().all(|p| p["held"] == false))
                && status["ports"]
                    .as_array()
                    .is_some_and(|ports| ports.iter().all(|p| p["endpoint_mac"].is_string()))
        },
        explain,
    );
    let (dnat_echo, nat_in) = (dnat_packets(ports.echo), xbr.nat_in(&bridge));
    tcp_exchange(out, published(ports.echo), &payload, LONG).expect("port 9000 again");
    assert!(xbr.nat_in(&bridge) > nat_in);
    assert_eq!(dnat_packets(ports.echo), dnat_echo);

    // 7. Docker events: a container started later is published within moments; removed, it
    //    is unpublished.
    docker.run_container(
        "late",
        &[
            "-p",
            &p(ports.late, ECHO_PORT, "tcp"),
            &image,
            "sleep",
            "3600",
        ],
    );
    let late_ip = docker.container_ip("late");
    let late = docker.netns("late");
    let late_server = TcpEcho::start(&late.netns, late_ip, ECHO_PORT);
    let late_spec = spec(ports.late, late_ip, ECHO_PORT, "tcp");
    wait_for(
        "the late container's port in xbr, pointing at its container, not held back",
        LONG,
        || {
            let status = xbr.bridge_status(&bridge);
            published_entry(&status, &late_spec)
                .is_some_and(|p| p["container_port_ifindex"].is_u64() && p["held"] == false)
        },
        explain,
    );
    let dnat_late = dnat_packets(ports.late);
    tcp_exchange(out, published(ports.late), &payload, LONG).expect("the late container");
    assert_eq!(dnat_packets(ports.late), dnat_late, "served by xbr");
    drop(late_server);
    drop(late);
    docker.cli(&["rm", "-f", "late"]);
    wait_for(
        "the late container's port to go",
        LONG,
        || !xbr.published(&bridge).contains(&late_spec),
        explain,
    );

    // 8. Requests/s and connections/s through the published port, side by side: xbr (the
    //    hooked uplink), Docker's DNAT (a second outside namespace on a link xbr does not
    //    hook) and docker-proxy (the host's own connections to 127.0.0.1). Rounds alternate
    //    the paths, so that load from elsewhere on the machine falls on all three alike.
    let kernel_side = Outside::create_named(
        &format!("xbrk{tag}"),
        &format!("xbrv{tag}"),
        KERNEL_SIDE_HOST_IP,
        Ipv4Addr::new(10, 216, 0, 2),
    );
    let paths = [
        (
            "xbr (outside ns -> hooked uplink)",
            Some(&outside.netns),
            at(UPLINK_HOST_IP, ports.echo),
        ),
        (
            "iptables DNAT (outside ns -> other link)",
            Some(&kernel_side.netns),
            at(KERNEL_SIDE_HOST_IP, ports.echo),
        ),
        (
            "docker-proxy (host -> 127.0.0.1)",
            None,
            at(Ipv4Addr::LOCALHOST, ports.echo),
        ),
    ];
    let mut results: Vec<Vec<(Rate, Rate)>> = vec![Vec::new(); paths.len()];
    let rounds = std::env::var("XBR_BENCH_ROUNDS")
        .ok()
        .and_then(|r| r.parse().ok())
        .unwrap_or(BENCH_ROUNDS)
        .clamp(1, 20);
    for _ in 0..rounds {
        for (path, (name, netns, to)) in paths.iter().enumerate() {
            let (dnat, nat_in) = (dnat_packets(ports.echo), xbr.nat_in(&bridge));
            let measured = (
                connection_rate(*netns, *to, BENCH_CONNECTIONS, BENCH_LIMIT),
                request_rate(*netns, *to, BENCH_REQUESTS, BENCH_LIMIT),
            );
            let (dnat_grew, nat_in_grew) = (
                dnat_packets(ports.echo) - dnat,
                xbr.nat_in(&bridge) - nat_in,
            );
            // Each path is the one it claims to be.
            let expected = match path {
                0 => dnat_grew == 0 && nat_in_grew > measured.0.count,
                1 => dnat_grew > measured.0.count && nat_in_grew == 0,
                _ => dnat_grew == 0 && nat_in_grew == 0,
            };
            assert!(
                expected,
                "{name}: DNAT counter +{dnat_grew}, xbr nat_in +{nat_in_grew} for {measured:?}"
            );
            results[path].push(measured);
        }
    }

    // 9. Detach: Docker's path serves again, and its DNAT counter grows again.
    xbr.ok(&["detach", &bridge]);
    assert_eq!(
        follower.wait_exit(Duration::from_secs(5)),
        Some(0),
        "the follower exits once detached: {}",
        follower.log()
    );
    let dnat_echo = dnat_packets(ports.echo);
    tcp_exchange(out, published(ports.echo), &payload, LONG).expect("Docker's path again");
    assert!(
        dnat_packets(ports.echo) > dnat_echo,
        "Docker's DNAT serves it again"
    );

    // 10. A follower stopped by SIGTERM leaves the datapath in place but gives Docker's
    //     published ports back to Docker, since nothing would keep them current.
    icc_follower.terminate();
    assert_eq!(
        icc_follower.wait_exit(Duration::from_secs(5)),
        Some(0),
        "SIGTERM is a clean stop: {}",
        icc_follower.log()
    );
    assert!(
        xbr.published(&icc_bridge).is_empty(),
        "{:#}",
        xbr.bridge_status(&icc_bridge)
    );
    let dnat_icc = dnat_packets(ports.icc);
    tcp_exchange(out, published(ports.icc), &payload, LONG).expect("c's port on Docker's path");
    assert!(
        dnat_packets(ports.icc) > dnat_icc,
        "Docker's DNAT serves c's port again"
    );

    eprintln!(
        "published port {} -> {a_ip}:{ECHO_PORT}; a 64-byte request and its echo; median \
         (min-max) of {rounds} alternating rounds:",
        ports.echo
    );
    eprintln!(
        "  {:<42} {:>22} {:>22}",
        "path", "connections/s", "requests/s"
    );
    for ((name, _, _), runs) in paths.iter().zip(&results) {
        let spread = |rates: Vec<f64>| {
            let mut rates = rates;
            rates.sort_by(f64::total_cmp);
            format!(
                "{:.0} ({:.0}-{:.0})",
                rates[rates.len() / 2],
                rates[0],
                rates[rates.len() - 1]
            )
        };
        eprintln!(
            "  {name:<42} {:>22} {:>22}",
            spread(runs.iter().map(|(c, _)| c.per_second()).collect()),
            spread(runs.iter().map(|(_, r)| r.per_second()).collect())
        );
        for (connections, requests) in runs {
            assert!(
                connections.count > 100 && connections.failed == 0 && requests.count > 100,
                "{name}: the benchmark ran without failures ({connections:?}, {requests:?})"
            );
        }
    }
    eprintln!(
        "docker end to end took {:?} (client {OUTSIDE_IP})",
        started.elapsed()
    );
}
