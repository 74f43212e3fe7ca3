//! Docker Swarm's overlay path across two nodes (run as root), in the lab of
//! `swarm_support`: two node namespaces joined by an underlay veth, a dockerd of the lab's own
//! in each, an attachable overlay network, a container on each node. Checks that traffic
//! crosses the overlay and that Docker built what xbr relies on: per node an overlay
//! namespace with bridge `br0` and `vxlan0` (VNI, UDP port 4789), and static fdb entries for
//! the remote containers' MACs pointing at the remote node's underlay address, gone again
//! when the remote container is.
//!
//! Not covered here: this kernel has no IPVS, so swarm services' virtual IPs
//! (`--endpoint-mode vip`, the default) and the ingress routing mesh (`-p` on a service) do
//! not work; only plain containers on attachable networks are used.
//! Skipped, with the reason printed, only where Docker cannot run.

use std::{
    path::{Path, PathBuf},
    time::{Duration, Instant},
};

use aya::programs::{SchedClassifier, tc::TcAttachType};
use serde_json::Value;
use xbr_tests::{
    lab_support::unique_name,
    skip::skip,
    swarm_support::{Node, SwarmLab, in_netns_path},
    witness::{
        Follower, first_counter, remote_endpoint_macs, scrape_metrics, without_root_cgroup,
        xbr_binary,
    },
};

const NETWORK: &str = "xbrov";
const SUBNET: &str = "10.251.0.0/24";
const PAGE: &str = "served by c2 on node 2 across the overlay\n";

/// Starts busybox httpd in `container` on `node`, serving PAGE as /index.html.
fn serve_page(node: &Node, container: &str) {
    node.docker(&[
        "exec",
        container,
        "sh",
        "-c",
        &format!(
            "printf '{}' >/www/index.html && httpd -p 80 -h /www",
            PAGE.escape_default()
        ),
    ]);
}

/// Retries `attempt` until it returns `Ok` or `limit` passes; the last failure explains.
fn eventually<T>(what: &str, limit: Duration, mut attempt: impl FnMut() -> Result<T, String>) -> T {
    let started = Instant::now();
    loop {
        match attempt() {
            Ok(value) => return value,
            Err(why) if started.elapsed() > limit => {
                panic!("{what} did not happen within {limit:?}: {why}")
            }
            Err(_) => std::thread::sleep(Duration::from_millis(250)),
        }
    }
}

/// stdout of a host program in the namespace at `path`; `Err` with stderr when it fails.
fn in_netns(path: &Path, program: &str, args: &[&str]) -> Result<String, String> {
    let out = in_netns_path(path, program, args);
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    if out.status.success() {
        Ok(stdout)
    } else {
        Err(format!(
            "`{program} {}` in {}: {}{stdout}",
            args.join(" "),
            path.display(),
            String::from_utf8_lossy(&out.stderr)
        ))
    }
}

#[test]
fn docker_overlay_path_across_nodes() {
    const TEST: &str = "docker_overlay_path_across_nodes";
    let started = Instant::now();
    let lab = match SwarmLab::up(&unique_name("sw")) {
        Ok(lab) => lab,
        Err(reason) => {
            skip(TEST, &reason);
            return;
        }
    };
    eprintln!(
        "lab {} up in {:.1} s",
        lab.tag(),
        started.elapsed().as_secs_f64()
    );
    let network = lab.create_overlay(NETWORK, SUBNET);
    let c1 = lab.run_container(1, "c1", NETWORK);
    let c2 = lab.run_container(2, "c2", NETWORK);
    let (node1, node2) = (lab.node(1), lab.node(2));
    eprintln!(
        "c1 {} {} on node 1, c2 {} {} on node 2",
        c1.ip, c1.mac, c2.ip, c2.mac
    );

    // Ping c1 -> c2 across the nodes; the first tries may wait for the peers' gossip.
    let c2_ip = c2.ip.to_string();
    eventually("ping c1 -> c2", Duration::from_secs(15), || {
        match node1.docker_status(&["exec", "c1", "ping", "-c", "1", "-W", "1", &c2_ip]) {
            (0, _, _) => Ok(()),
            (code, stdout, stderr) => Err(format!("exit {code}: {stdout}{stderr}")),
        }
    });
    node1.docker(&["exec", "c1", "ping", "-c", "3", "-W", "2", &c2_ip]);

    // HTTP from c1 to busybox httpd in c2. busybox 1.35's `wget -T` segfaults: timeout(1).
    serve_page(node2, "c2");
    let url = format!("http://{c2_ip}/index.html");
    let page = node1.docker(&["exec", "c1", "timeout", "10", "wget", "-q", "-O", "-", &url]);
    assert_eq!(page, PAGE.trim_end(), "c1's wget of {url}");
    // The same from the host's busybox in c1's namespace, as the benchmark's tools run.
    let page = in_netns(
        &c1.sandbox_key,
        "timeout",
        &["10", "busybox", "wget", "-q", "-O", "-", &url],
    )
    .unwrap_or_else(|e| panic!("host wget in c1's namespace: {e}"));
    assert_eq!(page, PAGE, "host busybox wget of {url} in c1's namespace");

    // What Docker built in node 1's overlay namespace.
    let overlay = node1.overlay_netns(&network);
    let link = |device: &str| {
        in_netns(&overlay, "ip", &["-d", "link", "show", device])
            .unwrap_or_else(|e| panic!("node 1's overlay namespace has no {device}: {e}"))
    };
    let br0 = link("br0");
    assert!(br0.contains("bridge"), "br0 is not a bridge: {br0}");
    let vxlan0 = link("vxlan0");
    for expected in ["vxlan id", "dstport 4789"] {
        assert!(
            vxlan0.contains(expected),
            "vxlan0 lacks `{expected}`: {vxlan0}"
        );
    }
    let remote = format!("dst {}", node2.underlay_ip());
    eventually("c2's fdb entry on node 1", Duration::from_secs(10), || {
        let fdb = in_netns(&overlay, "bridge", &["fdb", "show", "dev", "vxlan0"])?;
        fdb.lines()
            .find(|line| {
                line.contains(&c2.mac) && line.contains(&remote) && line.contains("permanent")
            })
            .map(|_| ())
            .ok_or_else(|| format!("no `{} {remote} ... permanent` in:\n{fdb}", c2.mac))
    });

    // A container that goes away takes its fdb entry on the other node with it.
    lab.stop_container(2, "c2");
    eventually(
        "c2's fdb entry on node 1 gone",
        Duration::from_secs(15),
        || {
            let fdb = in_netns(&overlay, "bridge", &["fdb", "show", "dev", "vxlan0"])?;
            match fdb.lines().find(|line| line.contains(&c2.mac)) {
                Some(line) => Err(format!("still there: {line}")),
                None => Ok(()),
            }
        },
    );

    let stopping = Instant::now();
    lab.down();
    eprintln!("lab down in {:.1} s", stopping.elapsed().as_secs_f64());
}

/// An nftables counter of the unicast IPv4 frames bridge `br0` forwards in an overlay
/// namespace (given by path): frames xbr redirects never reach the bridge's forward hook.
struct OverlayWitness {
    netns: PathBuf,
}

impl OverlayWitness {
    fn install(netns: &Path) -> OverlayWitness {
        let nft = |args: &[&str]| {
            in_netns(netns, "nft", args).unwrap_or_else(|e| panic!("installing the witness: {e}"))
        };
        nft(&["add", "table", "bridge", "xbr_witness"]);
        nft(&[
            "add chain bridge xbr_witness forward { type filter hook forward priority 0; policy accept; }",
        ]);
        nft(&[
            "add rule bridge xbr_witness forward ether type ip ether daddr & 01:00:00:00:00:00 == 00:00:00:00:00:00 counter",
        ]);
        OverlayWitness {
            netns: netns.to_owned(),
        }
    }

    fn ipv4_unicast(&self) -> u64 {
        let listing = in_netns(
            &self.netns,
            "nft",
            &["-j", "list", "table", "bridge", "xbr_witness"],
        )
        .unwrap_or_else(|e| panic!("reading the witness: {e}"));
        first_counter(listing.as_bytes())
    }
}

/// A pin root of this test's own, removed on drop (after the lab, whose namespaces take the
/// hooks with their devices: declare it before the lab).
struct Pins {
    path: PathBuf,
}

impl Drop for Pins {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.path);
    }
}

/// A program of the test's own in a namespace given by path, killed by pid on drop.
struct Background(std::process::Child);

impl Drop for Background {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// `xbr -n NODE --pin-root PINS ARGS...` with the node's Docker as DOCKER_HOST.
fn xbr_on(node: &Node, pins: &Pins, args: &[&str]) -> (i32, String, String) {
    let mut full = vec![
        "-n",
        node.netns_name(),
        "--pin-root",
        pins.path.to_str().expect("UTF-8 pin root"),
    ];
    full.extend_from_slice(args);
    let output = std::process::Command::new(xbr_binary())
        .env("DOCKER_HOST", node.docker_host())
        .args(without_root_cgroup(&full))
        .output()
        .expect("run xbr");
    (
        output.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&output.stdout).into_owned(),
        String::from_utf8_lossy(&output.stderr).into_owned(),
    )
}

fn xbr_on_ok(node: &Node, pins: &Pins, args: &[&str]) -> String {
    let (code, stdout, stderr) = xbr_on(node, pins, args);
    assert_eq!(code, 0, "`xbr {}` failed: {stderr}", args.join(" "));
    stdout
}

/// The vxlan0 row of `xbr stats NETWORK --json` on `node`.
fn vxlan0_stats(node: &Node, pins: &Pins) -> Value {
    let stats: Value = serde_json::from_str(&xbr_on_ok(node, pins, &["stats", NETWORK, "--json"]))
        .expect("stats --json");
    stats["endpoints"]
        .as_array()
        .into_iter()
        .flatten()
        .find(|row| row["port"] == "vxlan0")
        .cloned()
        .unwrap_or_else(|| panic!("no vxlan0 row in {stats}"))
}

/// The MACs `xbr status NETWORK --json` lists behind vxlan0 on `node`.
fn remote_macs(node: &Node, pins: &Pins) -> Vec<String> {
    let status: Value =
        serde_json::from_str(&xbr_on_ok(node, pins, &["status", NETWORK, "--json"]))
            .expect("status --json");
    remote_endpoint_macs(&status, "vxlan0")
}

/// Names of the tc (tcx) programs on `port` in the namespace at `netns`.
fn tcx_programs(netns: &Path, port: &str) -> Vec<String> {
    let (netns, port) = (netns.to_owned(), port.to_owned());
    std::thread::spawn(move || {
        xbr::netns::enter_path(&netns).expect("enter the overlay namespace");
        match SchedClassifier::query_tcx(&port, TcAttachType::Ingress) {
            Ok((_, programs)) => programs
                .iter()
                .map(|p| p.name_as_str().unwrap_or("?").to_owned())
                .collect(),
            Err(_) => Vec::new(),
        }
    })
    .join()
    .expect("query thread")
}

/// `xbr follow` on both nodes, as the package's unit starts it: the overlay network is followed in its namespace on each,
/// traffic across the nodes (ping, HTTP, a TCP stream) skips br0 on both (the nft witness
/// stays flat) while xbr's vxlan0 counters grow, a container stopped on node 2 stops being a
/// destination on node 1 within a second, and the followers' exit plus `xbr detach NETWORK`
/// leave no program and no pin.
#[test]
fn xbr_follow_accelerates_the_overlay_across_nodes() {
    const TEST: &str = "xbr_follow_accelerates_the_overlay_across_nodes";
    if !xbr::features::detect().tcx {
        skip(
            TEST,
            "the kernel has no tcx links (6.6+), which this test inspects",
        );
        return;
    }
    let pins = Pins {
        path: PathBuf::from(format!("/sys/fs/bpf/{}", unique_name("xbrsw"))),
    };
    let lab = match SwarmLab::up(&unique_name("sw")) {
        Ok(lab) => lab,
        Err(reason) => {
            skip(TEST, &reason);
            return;
        }
    };
    let network = lab.create_overlay(NETWORK, SUBNET);
    let c1 = lab.run_container(1, "c1", NETWORK);
    let c2 = lab.run_container(2, "c2", NETWORK);
    let (node1, node2) = (lab.node(1), lab.node(2));
    let overlays = [node1.overlay_netns(&network), node2.overlay_netns(&network)];

    let pin_root = pins.path.to_str().expect("UTF-8 pin root");
    // Each node runs what the package's unit runs, with XBR_OPTS set to a metrics address,
    // plus this test's namespace and pin root.
    let unit_command = unit_exec_start();
    let followers: Vec<Follower> = [node1, node2]
        .iter()
        .map(|node| {
            let host = node.docker_host();
            let mut args: Vec<&str> = vec!["-n", node.netns_name(), "--pin-root", pin_root];
            for word in &unit_command {
                match word.as_str() {
                    "$XBR_OPTS" => args.extend(["--metrics", "127.0.0.1:9477"]),
                    word => args.push(word),
                }
            }
            let follower = Follower::start_quietly(&[("DOCKER_HOST", host.as_str())], &args);
            follower.wait_for_log(
                &format!("following Docker network {NETWORK} (overlay)"),
                Duration::from_secs(20),
            );
            follower
        })
        .collect();
    for follower in &followers {
        let log = follower.log();
        assert!(
            log.contains("Docker network ingress stays on Docker's path"),
            "the ingress network is left to Docker, and said so: {log}"
        );
    }
    // The network's load balancer endpoint on node 1 stays on Docker's path, and says so.
    let status: Value =
        serde_json::from_str(&xbr_on_ok(node1, &pins, &["status", NETWORK, "--json"]))
            .expect("status --json");
    let held: Vec<&Value> = status["bridges"][0]["not_accelerated"]
        .as_array()
        .into_iter()
        .flatten()
        .filter(|entry| entry.to_string().contains("load balancer endpoint"))
        .collect();
    assert_eq!(held.len(), 1, "the load balancer is held: {status}");
    let witnesses: Vec<OverlayWitness> = overlays
        .iter()
        .map(|o| OverlayWitness::install(o))
        .collect();
    let stats_before = [vxlan0_stats(node1, &pins), vxlan0_stats(node2, &pins)];
    let forwarded_before: Vec<u64> = witnesses.iter().map(OverlayWitness::ipv4_unicast).collect();

    // Ping, HTTP and a TCP stream from c1 on node 1 to c2 on node 2.
    let c2_ip = c2.ip.to_string();
    eventually("ping c1 -> c2", Duration::from_secs(15), || {
        in_netns(&c1.sandbox_key, "ping", &["-c", "1", "-W", "1", &c2_ip]).map(|_| ())
    });
    in_netns(&c1.sandbox_key, "ping", &["-c", "5", "-i", "0.2", &c2_ip])
        .unwrap_or_else(|e| panic!("ping across nodes: {e}"));
    serve_page(node2, "c2");
    let url = format!("http://{c2_ip}/index.html");
    let page = in_netns(
        &c1.sandbox_key,
        "timeout",
        &["10", "busybox", "wget", "-q", "-O", "-", &url],
    )
    .unwrap_or_else(|e| panic!("HTTP across nodes: {e}"));
    assert_eq!(page, PAGE, "c1's GET {url}");
    let _server = Background(
        std::process::Command::new("nsenter")
            .arg(format!("--net={}", c2.sandbox_key.display()))
            .args(["iperf3", "-s", "-p", "5201"])
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .spawn()
            .expect("start iperf3 in c2"),
    );
    // iperf3 -J says "error" (and may exit 0) when the server is not listening yet.
    let received = eventually("an iperf3 stream c1 -> c2", Duration::from_secs(15), || {
        let report = in_netns(
            &c1.sandbox_key,
            "iperf3",
            &["-c", &c2_ip, "-p", "5201", "-t", "2", "-J"],
        )?;
        let report: Value = serde_json::from_str(&report).map_err(|e| e.to_string())?;
        match report["end"]["sum_received"]["bytes"].as_u64() {
            Some(bytes) if report["error"].is_null() => Ok(bytes),
            _ => Err(format!("iperf3: {}", report["error"])),
        }
    });
    assert!(received > 1 << 20, "the stream moved {received} bytes");

    // Neither bridge forwarded IPv4 between the containers; xbr carried it both ways.
    for (node, witness) in witnesses.iter().enumerate() {
        assert_eq!(
            witness.ipv4_unicast(),
            forwarded_before[node],
            "br0 on node {} forwarded unicast IPv4",
            node + 1
        );
    }
    for (index, node) in [node1, node2].into_iter().enumerate() {
        let (was, now) = (&stats_before[index], vxlan0_stats(node, &pins));
        let grew =
            |field: &str| now[field].as_u64().unwrap_or(0) - was[field].as_u64().unwrap_or(0);
        // Node 1 sends the stream out of vxlan0 and gets the ACKs; node 2 the other way.
        let (sent, got) = (grew("delivered_bytes"), grew("fast_path_bytes"));
        let (sender_side, receiver_side) = if index == 0 { (sent, got) } else { (got, sent) };
        assert!(
            sender_side >= received,
            "node {}: the stream's {received} bytes should cross vxlan0 on the fast path: {was} -> {now}",
            index + 1
        );
        assert!(
            receiver_side > 0,
            "node {}: the replies should cross vxlan0 on the fast path: {was} -> {now}",
            index + 1
        );
    }

    // One metrics endpoint per node serves every network it follows, labelled by network.
    let body = scrape_metrics(node1.netns_name());
    let vxlan0_sent: u64 = body
        .lines()
        .filter(|line| line.starts_with("xbr_delivered_packets_total{"))
        .filter(|line| line.contains(&format!("network=\"{NETWORK}\"")))
        .filter(|line| line.contains("port=\"vxlan0\""))
        .filter_map(|line| line.rsplit(' ').next()?.parse::<u64>().ok())
        .sum();
    assert!(
        vxlan0_sent > 0,
        "node 1's metrics show vxlan0's fast path on {NETWORK}:\n{body}"
    );
    assert!(
        body.contains("network=\"docker_gwbridge\""),
        "node 1's metrics list docker_gwbridge too:\n{body}"
    );

    // c2 stops: node 1 stops sending to it within a second of Docker removing its entry.
    assert!(
        remote_macs(node1, &pins).contains(&c2.mac),
        "c2 {} is a remote endpoint on node 1",
        c2.mac
    );
    lab.stop_container(2, "c2");
    let fdb_gone = Instant::now();
    eventually(
        "c2's fdb entry gone on node 1",
        Duration::from_secs(15),
        || {
            let fdb = in_netns(&overlays[0], "bridge", &["fdb", "show", "dev", "vxlan0"])?;
            match fdb.contains(&c2.mac) {
                true => Err(fdb),
                false => Ok(()),
            }
        },
    );
    eventually(
        "c2 no longer a destination on node 1",
        Duration::from_secs(1),
        || match remote_macs(node1, &pins).contains(&c2.mac) {
            true => Err(format!(
                "still listed {:?} after Docker removed it",
                fdb_gone.elapsed()
            )),
            false => Ok(()),
        },
    );

    // The followers stop (the datapath stays), then detach by network name.
    for follower in &followers {
        follower.terminate();
    }
    for mut follower in followers {
        assert_eq!(
            follower.wait_exit(Duration::from_secs(15)),
            Some(0),
            "the follower exits cleanly on SIGTERM: {}",
            follower.log()
        );
    }
    assert!(
        tcx_programs(&overlays[0], "vxlan0").contains(&"port_ingress".to_owned()),
        "the datapath stays on node 1 after the follower's exit"
    );
    // By Docker's names: the default network ("bridge": docker0), docker_gwbridge, and on
    // node 1 the overlay. Node 2's overlay left with c2 (its follower removed the datapath,
    // or Docker removed the namespace), so xbr says it has nothing there.
    for node in [node1, node2] {
        for network in ["bridge", "docker_gwbridge"] {
            xbr_on_ok(node, &pins, &["detach", network]);
        }
    }
    xbr_on_ok(node1, &pins, &["detach", NETWORK]);
    let (code, _, stderr) = xbr_on(node2, &pins, &["detach", NETWORK]);
    eprintln!("xbr detach {NETWORK} on node 2 after c2 left: exit {code}: {stderr}");
    assert!(
        code != 0 && (stderr.contains("not attached") || stderr.contains("no namespace here")),
        "node 2 has no overlay datapath left to detach: exit {code}: {stderr}"
    );
    for port in ["vxlan0", "br0"] {
        assert!(
            tcx_programs(&overlays[0], port).is_empty(),
            "a program is left on {port} in node 1's overlay namespace"
        );
    }
    let left: Vec<String> = walk(&pins.path);
    assert!(left.is_empty(), "pins left behind: {left:?}");
}

/// The arguments of the packaged unit's ExecStart (`packaging/xbr.service`), after the
/// binary, which must be /usr/sbin/xbr.
fn unit_exec_start() -> Vec<String> {
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("../packaging/xbr.service");
    let unit = std::fs::read_to_string(&path)
        .unwrap_or_else(|e| panic!("reading {}: {e}", path.display()));
    let line = unit
        .lines()
        .find_map(|line| line.strip_prefix("ExecStart="))
        .expect("the unit has an ExecStart");
    let mut words = line.split_whitespace().map(str::to_owned);
    assert_eq!(words.next().as_deref(), Some("/usr/sbin/xbr"), "{line}");
    words.collect()
}

/// Every file below `dir` (pins), as paths.
fn walk(dir: &Path) -> Vec<String> {
    let mut files = Vec::new();
    for entry in std::fs::read_dir(dir).into_iter().flatten().flatten() {
        let path = entry.path();
        if path.is_dir() {
            files.extend(walk(&path));
        } else {
            files.push(path.display().to_string());
        }
    }
    files
}
