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
    path::Path,
    time::{Duration, Instant},
};

use xbr_tests::{
    lab_support::unique_name,
    skip::skip,
    swarm_support::{SwarmLab, in_netns_path},
};

const NETWORK: &str = "xbrov";
const SUBNET: &str = "10.251.0.0/24";
const PAGE: &str = "served by c2 on node 2 across the overlay\n";

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
    node2.docker(&[
        "exec",
        "c2",
        "sh",
        "-c",
        &format!(
            "printf '{}' >/www/index.html && httpd -p 80 -h /www",
            PAGE.escape_default()
        ),
    ]);
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
