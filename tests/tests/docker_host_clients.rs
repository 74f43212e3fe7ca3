//! Clients on a real Docker host of the host's own published ports (run as root), with
//! Docker's `--userland-proxy` on and off: with `xbr attach --follow --cgroup DIR`, a process
//! in DIR that connects to a published port (127.0.0.1 for `-p 127.0.0.1:PORT:80`, any local
//! address for `-p PORT:80`) is served with its socket pointed at the container at connect(),
//! so docker-proxy accepts nothing (ss names the owner of every socket of the connection) and
//! Docker's DNAT rule counts nothing; xbr counts it. The same client outside DIR is served the
//! kernel's way, by docker-proxy or the DNAT rule. Skipped, with the reason printed, only
//! where Docker cannot run or no cgroup v2 hierarchy is mounted.

use std::{
    io::Write as _,
    net::{Ipv4Addr, SocketAddr},
    path::PathBuf,
    process::{Child, Command, Stdio},
    time::Duration,
};

use xbr_tests::{
    docker_support::{Dockerd, INDEX_HTML, Outside, Xbr, dnat_packets, run},
    witness::wait_for,
};

/// The default network's gateway: the bridge's address (docker_support's BRIDGE_ADDRESS), an
/// address of the host the all-addresses port is published on.
const GATEWAY: Ipv4Addr = Ipv4Addr::new(10, 213, 0, 1);
const HTTP_PORT: u16 = 80;
/// How long a follower may take to publish Docker's ports: a bound, not a target.
const LONG: Duration = Duration::from_secs(10);
const BUSYBOX: &str = "/bin/busybox";

/// A cgroup v2 directory of the test's own: removed on drop, after moving anything still in
/// it (only the test's own children ever join it) back to the root.
struct TestCgroup {
    path: PathBuf,
    root: PathBuf,
}

impl TestCgroup {
    fn create(tag: &str) -> Result<TestCgroup, String> {
        let root = xbr::datapath::cgroup2_root()
            .ok_or("no cgroup v2 hierarchy is mounted (socket hooks need one)")?;
        let path = root.join(format!("xbr-test-hostclients-{tag}"));
        std::fs::create_dir(&path)
            .map_err(|e| format!("cannot create the cgroup {}: {e}", path.display()))?;
        Ok(TestCgroup { path, root })
    }

    fn path(&self) -> &str {
        self.path.to_str().expect("UTF-8 cgroup path")
    }
}

impl Drop for TestCgroup {
    fn drop(&mut self) {
        for _ in 0..50 {
            let procs = std::fs::read_to_string(self.path.join("cgroup.procs")).unwrap_or_default();
            for pid in procs.split_whitespace() {
                let _ = std::fs::write(self.root.join("cgroup.procs"), pid);
            }
            if std::fs::remove_dir(&self.path).is_ok() || !self.path.exists() {
                return;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        eprintln!(
            "warning: could not remove the cgroup {}",
            self.path.display()
        );
    }
}

/// `PROGRAM ARGS...`, as a child that first joins `cgroup` when given (the test process itself
/// never does).
fn client_command(cgroup: Option<&TestCgroup>, program: &str, args: &[&str]) -> Command {
    match cgroup {
        Some(cgroup) => {
            let mut command = Command::new("sh");
            command
                .arg("-c")
                .arg(format!(
                    "echo $$ > {}/cgroup.procs && exec \"$@\"",
                    cgroup.path()
                ))
                .arg("client")
                .arg(program)
                .args(args);
            command
        }
        None => {
            let mut command = Command::new(program);
            command.args(args);
            command
        }
    }
}

/// `curl http://TO/index.html` from a child (in `cgroup` when given): the body, and the peer
/// address curl reports (getpeername), or what went wrong.
fn curl(cgroup: Option<&TestCgroup>, to: SocketAddr) -> Result<(String, String), String> {
    let url = format!("http://{to}/index.html");
    let output = client_command(
        cgroup,
        "curl",
        &[
            "-s",
            "-S",
            "--max-time",
            "5",
            "-w",
            "\n%{remote_ip}:%{remote_port}",
            &url,
        ],
    )
    .output()
    .map_err(|e| format!("cannot run curl: {e}"))?;
    if !output.status.success() {
        return Err(format!(
            "curl {url} failed ({}): {}",
            output.status,
            String::from_utf8_lossy(&output.stderr).trim()
        ));
    }
    let stdout = String::from_utf8_lossy(&output.stdout).into_owned();
    let (body, peer) = stdout
        .rsplit_once('\n')
        .ok_or_else(|| format!("curl printed `{stdout}`"))?;
    Ok((body.to_owned(), peer.to_owned()))
}

/// A connection kept open while the test looks at it: `busybox nc TO` in a child (in
/// `cgroup` when given) that sends the start of a request and waits for more; killed by pid
/// on drop.
struct KeptConnection {
    child: Child,
}

impl KeptConnection {
    fn open(cgroup: Option<&TestCgroup>, to: SocketAddr) -> KeptConnection {
        let mut child = client_command(
            cgroup,
            BUSYBOX,
            &["nc", &to.ip().to_string(), &to.port().to_string()],
        )
        .stdin(Stdio::piped())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("start busybox nc");
        // The request line, but not the empty line that ends the header: httpd waits.
        child
            .stdin
            .as_mut()
            .unwrap()
            .write_all(b"GET /index.html HTTP/1.0\r\n")
            .expect("write to nc");
        KeptConnection { child }
    }

    fn pid(&self) -> u32 {
        self.child.id()
    }
}

impl Drop for KeptConnection {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// One established TCP socket of the root namespace, as `ss -tnp` shows it.
#[derive(Debug)]
struct Socket {
    local: String,
    peer: String,
    /// The `users:((...))` column: the processes holding it, with their pids.
    owners: String,
}

fn established() -> Vec<Socket> {
    run("ss", &["-tnpH", "state", "established"])
        .lines()
        .filter_map(|line| {
            let fields: Vec<&str> = line.split_whitespace().collect();
            (fields.len() >= 4).then(|| Socket {
                local: fields[2].to_owned(),
                peer: fields[3].to_owned(),
                owners: fields[4..].join(" "),
            })
        })
        .collect()
}

fn show(sockets: &[Socket]) -> String {
    sockets
        .iter()
        .map(|s| format!("  {} -> {} {}", s.local, s.peer, s.owners))
        .collect::<Vec<_>>()
        .join("\n")
}

/// Waits until the socket of `pid` is established; returns all established sockets then.
fn established_by(pid: u32) -> Vec<Socket> {
    let owner = format!("pid={pid},");
    let mut sockets = Vec::new();
    wait_for("the kept connection to be established", LONG, || {
        sockets = established();
        sockets.iter().any(|s| s.owners.contains(&owner))
    });
    sockets
}

/// The `host_clients` counters of the published port `spec`.
fn counters(xbr: &Xbr, bridge: &str, spec: &str) -> (u64, u64) {
    let status = xbr.bridge_status(bridge);
    let entry = status["published"]
        .as_array()
        .into_iter()
        .flatten()
        .find(|p| p["spec"] == spec)
        .unwrap_or_else(|| panic!("no published port {spec} in {:#}", status["published"]));
    let counts = &entry["host_clients"];
    let read = |key: &str| -> u64 {
        counts[key]
            .as_u64()
            .unwrap_or_else(|| panic!("host_clients.{key} of {spec}: {counts}"))
    };
    (read("connects"), read("kernel_path"))
}

#[test]
fn host_clients_in_the_cgroup_bypass_docker_proxy_and_dnat() {
    for userland_proxy in [true, false] {
        if let Err(reason) = in_one_mode(userland_proxy) {
            xbr_tests::skip::skip(
                "host_clients_in_the_cgroup_bypass_docker_proxy_and_dnat",
                &reason,
            );
            return;
        }
    }
}

/// One Docker mode; `Err` when Docker (or a cgroup v2 hierarchy) cannot be had here.
fn in_one_mode(userland_proxy: bool) -> Result<(), String> {
    let docker = Dockerd::start_with(userland_proxy)?;
    let tag = docker.tag.clone();
    let image = docker.import_busybox();
    // The follower's uplink: without one it would hook the machine's default-route interface.
    let outside = Outside::create(&tag);
    let cgroup = TestCgroup::create(&tag)?;
    let base = 23000 + (std::process::id() % 1000) as u16 * 4 + 2 * u16::from(userland_proxy);
    let (loopback_port, all_port) = (base, base + 1);
    let on_loopback = format!("127.0.0.1:{loopback_port}:{HTTP_PORT}/tcp");
    let on_all = format!("{all_port}:{HTTP_PORT}/tcp");
    docker.run_container(
        "web",
        &[
            "-p",
            &on_loopback,
            "-p",
            &on_all,
            &image,
            "httpd",
            "-f",
            "-p",
            &HTTP_PORT.to_string(),
            "-h",
            "/www",
        ],
    );
    let web_ip = docker.container_ip("web");
    let web = SocketAddr::from((web_ip, HTTP_PORT)).to_string();
    let loopback_spec = format!("127.0.0.1:{loopback_port}:{web_ip}:{HTTP_PORT}/tcp");
    let all_spec = format!("{all_port}:{web_ip}:{HTTP_PORT}/tcp");
    let at = |ip: Ipv4Addr, port: u16| SocketAddr::from((ip, port));

    let mut xbr = Xbr::new(&docker);
    let follower = xbr.follow_with(
        &docker.bridge,
        &["--uplink", &outside.uplink, "--cgroup", cgroup.path()],
    );
    wait_for("Docker's published ports in xbr", LONG, || {
        let published = xbr.published(&docker.bridge);
        published.contains(&loopback_spec) && published.contains(&all_spec)
    });
    let status = xbr.bridge_status(&docker.bridge);
    let hooks = &status["socket_hooks"];
    assert!(
        hooks["cgroup"].as_str() == Some(cgroup.path())
            && hooks["attached"]
                .as_array()
                .is_some_and(|programs| programs.iter().any(|p| p == "socket_connect4"))
            && hooks["missing"].as_array().is_some_and(Vec::is_empty),
        "the socket hooks are attached to {}: {hooks:#}\nfollower log:\n{}",
        cgroup.path(),
        follower.log()
    );
    let mode = format!("--userland-proxy={userland_proxy}");
    // What the kernel's path counts for a port: Docker's DNAT rule (with the proxy too: it
    // must count nothing for a translated connection either way).
    let dnat = |port: u16| dnat_packets(port);

    // In the cgroup: every way of dialling a published port from the host is served, by the
    // socket path alone.
    let dialled = [
        (&loopback_spec, at(Ipv4Addr::LOCALHOST, loopback_port)),
        (&all_spec, at(Ipv4Addr::LOCALHOST, all_port)),
        (&all_spec, at(GATEWAY, all_port)),
    ];
    for (spec, to) in dialled {
        let (connects, kernel_path) = counters(&xbr, &docker.bridge, spec);
        let dnat_before = dnat(to.port());
        let (body, peer) = curl(Some(&cgroup), to)
            .unwrap_or_else(|e| panic!("{mode}: a client in the cgroup, curl {to}: {e}"));
        assert_eq!(body, INDEX_HTML, "{mode}: curl {to} from the cgroup");
        assert_eq!(
            peer,
            to.to_string(),
            "{mode}: curl in the cgroup sees the address it dialled as its peer"
        );
        assert_eq!(
            counters(&xbr, &docker.bridge, spec),
            (connects + 1, kernel_path),
            "{mode}: curl {to} from the cgroup is one connect() xbr translated (connects, \
             kernel_path of {spec})"
        );
        assert_eq!(
            dnat(to.port()),
            dnat_before,
            "{mode}: Docker's DNAT rule for {to} counted the translated connection"
        );
    }

    // A connection kept open from the cgroup: ss shows it owned by the client and connected
    // to the container itself, and no socket of docker-proxy anywhere on its way.
    let to = at(Ipv4Addr::LOCALHOST, loopback_port);
    let (connects, _) = counters(&xbr, &docker.bridge, &loopback_spec);
    let dnat_before = dnat(loopback_port);
    {
        let kept = KeptConnection::open(Some(&cgroup), to);
        let sockets = established_by(kept.pid());
        let owner = format!("pid={},", kept.pid());
        let client: Vec<&Socket> = sockets
            .iter()
            .filter(|s| s.owners.contains(&owner))
            .collect();
        assert!(
            client.len() == 1 && client[0].peer == web,
            "{mode}: the client in the cgroup holds one socket, connected to the container \
             {web} (not to {to}):\n{}",
            show(&sockets)
        );
        let proxied: Vec<&Socket> = sockets
            .iter()
            .filter(|s| {
                s.owners.contains("\"docker-proxy\"")
                    && (s.local.ends_with(&format!(":{loopback_port}")) || s.peer == web)
            })
            .collect();
        assert!(
            proxied.is_empty(),
            "{mode}: docker-proxy holds a connection of the client in the cgroup:\n{}",
            show(&sockets)
        );
    }
    assert_eq!(
        counters(&xbr, &docker.bridge, &loopback_spec).0,
        connects + 1,
        "{mode}: the kept connection is one connect() xbr translated"
    );
    assert_eq!(
        dnat(loopback_port),
        dnat_before,
        "{mode}: Docker's DNAT rule counted the kept connection"
    );

    // Outside the cgroup, the same clients take the kernel's path, which still serves them:
    // docker-proxy holds the connection, or Docker's DNAT rule counts it.
    // (Without the proxy, Docker's DNAT serves 127.0.0.1 too: it sets route_localnet on the
    // bridge and masquerades local sources leaving through it.)
    let (to, spec) = (at(Ipv4Addr::LOCALHOST, loopback_port), &loopback_spec);
    let counted = counters(&xbr, &docker.bridge, spec);
    let dnat_before = dnat(to.port());
    let (body, _) =
        curl(None, to).unwrap_or_else(|e| panic!("{mode}: a client outside the cgroup: {e}"));
    assert_eq!(body, INDEX_HTML, "{mode}: curl {to} outside the cgroup");
    {
        let kept = KeptConnection::open(None, to);
        let sockets = established_by(kept.pid());
        let owner = format!("pid={},", kept.pid());
        let client: Vec<&Socket> = sockets
            .iter()
            .filter(|s| s.owners.contains(&owner))
            .collect();
        // With DNAT too: the socket names what it dialled, only conntrack translates.
        assert!(
            client.len() == 1 && client[0].peer == to.to_string(),
            "{mode}: the client outside the cgroup holds one socket, connected to {to}:\n{}",
            show(&sockets)
        );
        if userland_proxy {
            let proxy = |s: &&Socket| s.owners.contains("\"docker-proxy\"");
            let accepted = sockets
                .iter()
                .filter(proxy)
                .any(|s| s.local == to.to_string() && s.peer == client[0].local);
            let onward = sockets.iter().filter(proxy).any(|s| s.peer == web);
            assert!(
                accepted && onward,
                "{mode}: docker-proxy accepted the client outside the cgroup and connected to \
                 {web} for it:\n{}",
                show(&sockets)
            );
        }
    }
    assert_eq!(
        counters(&xbr, &docker.bridge, spec),
        counted,
        "{mode}: xbr counted clients outside its cgroup ({spec})"
    );
    let dnat_grew = dnat(to.port()) - dnat_before;
    if userland_proxy {
        assert_eq!(
            dnat_grew, 0,
            "{mode}: with docker-proxy, Docker's DNAT rule skips 127.0.0.1"
        );
    } else {
        assert!(
            dnat_grew >= 2,
            "{mode}: Docker's DNAT rule counted the two connections from outside the cgroup \
             (+{dnat_grew})"
        );
    }
    eprintln!(
        "{mode}: clients in {} served by xbr's socket path; outside it by {}",
        cgroup.path(),
        if userland_proxy {
            "docker-proxy"
        } else {
            "Docker's DNAT"
        }
    );
    Ok(())
}
