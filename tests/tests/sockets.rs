//! Socket hooks (run as root): a client on the host, in the lab's host namespace and in the
//! test's own cgroup, reaches published ports at 127.0.0.1, the host's own addresses and
//! [::1], pointed at the container when it connects or sends. The witness that the socket
//! hooks did it, and nothing else: the same client outside the cgroup is refused (nothing
//! listens on the host port, no NAT rule exists, no uplink is hooked), the container sees the
//! client come from the bridge's own address (a direct connection, not a NAT'd one), and
//! bpftool lists the programs on the cgroup. Every client runs as a child process that joins
//! the test's cgroup before exec; the test process never joins it.

use std::{
    collections::BTreeSet,
    io::{BufRead as _, BufReader, Read as _, Write as _},
    net::{Ipv4Addr, SocketAddr, TcpListener, UdpSocket},
    process::{Command, Stdio},
    sync::{
        Arc, Mutex,
        atomic::{AtomicBool, Ordering},
    },
    time::{Duration, Instant},
};

use serde_json::Value;
use xbr::{lab::LabGuard, netns::NetNs};
use xbr_tests::{
    cgroup_support::{TestCgroup, wait_output},
    lab_support::{ExtraContainers, LabBuilder},
    skip::skip,
    witness::PinRoot,
};

const GATEWAY: Ipv4Addr = Ipv4Addr::new(10, 77, 0, 1);
const CONTAINER_A: Ipv4Addr = Ipv4Addr::new(10, 77, 0, 2);
const CONTAINER_B: Ipv4Addr = Ipv4Addr::new(10, 77, 0, 3);

/// Whether this machine can run socket-hook tests; if not, `test` is reported skipped.
fn socket_hooks_here(test: &str) -> bool {
    let features = xbr::features::detect();
    if !features.socket_hooks {
        skip(
            test,
            &format!(
                "kernel {} cannot name a socket's network namespace (SO_NETNS_COOKIE, 5.14+): \
                 kernel.socket_hooks is false",
                features.kernel
            ),
        );
        return false;
    }
    if xbr::datapath::cgroup2_root().is_none() {
        skip(test, "no cgroup v2 hierarchy is mounted");
        return false;
    }
    true
}

/// A test's world: the usual lab with an uplink, a cgroup of its own, and xbr attached to br0
/// with the socket hooks on that cgroup. Fields drop in order: detach, then the clients
/// killed and the cgroup removed, then the lab.
struct HostLab {
    pins: PinRoot,
    cgroup: TestCgroup,
    lab: LabGuard,
}

impl HostLab {
    /// The lab, xbr attached with `extra` arguments and socket hooks on the test's cgroup.
    fn up(extra: &[&str]) -> HostLab {
        let lab = LabBuilder::three_containers().with_uplink().up();
        let cgroup = TestCgroup::new().expect("cgroup v2 is mounted (checked by the test)");
        let pins = PinRoot::new(&lab.spec().host_netns());
        let mut attach = vec!["attach", "br0", "--cgroup", cgroup.arg()];
        attach.extend_from_slice(extra);
        pins.xbr_ok(&attach);
        HostLab { pins, cgroup, lab }
    }

    fn host(&self) -> String {
        self.lab.spec().host_netns()
    }

    fn netns(&self, container: &str) -> NetNs {
        NetNs::open(&self.lab.spec().container_netns(container)).unwrap()
    }

    /// `socket-client --netns NETNS ARGS...` run in the test's cgroup.
    fn client_in(&self, netns: &str, args: &[&str]) -> Value {
        let output = self
            .cgroup
            .run(client_command(netns, args), Duration::from_secs(60));
        client_result(netns, args, output)
    }

    /// The same, in the lab's host namespace.
    fn client(&self, args: &[&str]) -> Value {
        self.client_in(&self.host(), args)
    }

    /// `host_clients` of the published port `spec` (as status shows it, `8080:10.77.0.2:80/tcp`).
    fn host_clients(&self, spec: &str) -> HostClients {
        let status = self.pins.status();
        let published = status["bridges"][0]["published"]
            .as_array()
            .into_iter()
            .flatten()
            .find(|p| p["spec"] == spec)
            .unwrap_or_else(|| panic!("{spec} is not published: {status}"));
        let count = |name: &str| {
            published["host_clients"][name]
                .as_u64()
                .unwrap_or_else(|| panic!("no host_clients.{name} for {spec}: {published}"))
        };
        HostClients {
            connects: count("connects"),
            datagrams: count("datagrams"),
            kernel_path: count("kernel_path"),
        }
    }

    fn socket_hooks(&self) -> Value {
        self.pins.status()["bridges"][0]["socket_hooks"].clone()
    }
}

#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
struct HostClients {
    connects: u64,
    datagrams: u64,
    kernel_path: u64,
}

fn client_command(netns: &str, args: &[&str]) -> Command {
    let mut command = Command::new(env!("CARGO_BIN_EXE_socket-client"));
    command
        .args(["--netns", netns])
        .args(args)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    command
}

fn client_result(netns: &str, args: &[&str], output: std::process::Output) -> Value {
    let stdout = String::from_utf8_lossy(&output.stdout);
    assert!(
        output.status.success(),
        "socket-client {} in {netns} failed ({}): {}{stdout}",
        args.join(" "),
        output.status,
        String::from_utf8_lossy(&output.stderr)
    );
    let line = stdout.lines().last().unwrap_or_default();
    serde_json::from_str(line)
        .unwrap_or_else(|e| panic!("socket-client printed no JSON ({e}): {stdout}"))
}

/// `socket-client` in `netns` outside the test's cgroup: the socket hooks never see it.
fn client_outside_cgroup(netns: &str, args: &[&str]) -> Value {
    let child = client_command(netns, args)
        .spawn()
        .expect("start socket-client");
    client_result(netns, args, wait_output(child, Duration::from_secs(60)))
}

/// Asserts a `tcp` client result made all `connections` and verified every byte.
fn assert_served(result: &Value, connections: u64, what: &str) {
    assert!(
        result["error"].is_null() && result["connected"] == connections,
        "{what}: want {connections} connections, every echo verified: {result}"
    );
}

/// Asserts a `tcp` client result was refused at its first connect, at once.
fn assert_refused(result: &Value, what: &str) {
    assert_eq!(
        result["connected"], 0,
        "{what}: nothing should have accepted: {result}"
    );
    assert_eq!(
        result["error"]["io"]["kind"], "ConnectionRefused",
        "{what}: want connection refused: {result}"
    );
}

fn ip_of(address: &Value) -> Ipv4Addr {
    let address: SocketAddr = address
        .as_str()
        .and_then(|a| a.parse().ok())
        .unwrap_or_else(|| panic!("not a socket address: {address}"));
    match address {
        SocketAddr::V4(a) => *a.ip(),
        SocketAddr::V6(a) => a
            .ip()
            .to_ipv4_mapped()
            .unwrap_or_else(|| panic!("not an IPv4 or mapped address: {a}")),
    }
}

/// A TCP echo server in a container that records where each connection came from.
struct TcpServer {
    peers: Arc<Mutex<Vec<SocketAddr>>>,
    stop: Arc<AtomicBool>,
    acceptor: Option<std::thread::JoinHandle<()>>,
}

impl TcpServer {
    fn start(ns: &NetNs, address: Ipv4Addr, port: u16) -> TcpServer {
        let listener = ns
            .run(|| TcpListener::bind((address, port)))
            .unwrap()
            .unwrap_or_else(|e| panic!("bind {address}:{port} in {}: {e}", ns.name()));
        listener.set_nonblocking(true).unwrap();
        let peers = Arc::new(Mutex::new(Vec::new()));
        let stop = Arc::new(AtomicBool::new(false));
        let acceptor = {
            let (peers, stop) = (peers.clone(), stop.clone());
            std::thread::spawn(move || {
                while !stop.load(Ordering::Relaxed) {
                    let Ok((mut stream, peer)) = listener.accept() else {
                        std::thread::sleep(Duration::from_millis(1));
                        continue;
                    };
                    peers.lock().unwrap().push(peer);
                    let _ = stream.set_nonblocking(false);
                    // Long enough for a test to detach xbr in the middle of a connection.
                    let _ = stream.set_read_timeout(Some(Duration::from_secs(30)));
                    std::thread::spawn(move || {
                        let mut buffer = vec![0u8; 256 * 1024];
                        while let Ok(n) = stream.read(&mut buffer) {
                            if n == 0 || stream.write_all(&buffer[..n]).is_err() {
                                break;
                            }
                        }
                    });
                }
            })
        };
        TcpServer {
            peers,
            stop,
            acceptor: Some(acceptor),
        }
    }

    fn peers(&self) -> Vec<SocketAddr> {
        self.peers.lock().unwrap().clone()
    }

    fn peer_ips(&self) -> BTreeSet<std::net::IpAddr> {
        self.peers().iter().map(SocketAddr::ip).collect()
    }
}

impl Drop for TcpServer {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(acceptor) = self.acceptor.take() {
            let _ = acceptor.join();
        }
    }
}

/// A UDP server in a container: answers each datagram `TAG|DATAGRAM` to its source, and
/// records the sources.
struct UdpServer {
    peers: Arc<Mutex<Vec<SocketAddr>>>,
    stop: Arc<AtomicBool>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl UdpServer {
    fn start(ns: &NetNs, address: Ipv4Addr, port: u16, tag: &str) -> UdpServer {
        let socket = ns
            .run(|| UdpSocket::bind((address, port)))
            .unwrap()
            .unwrap_or_else(|e| panic!("bind UDP {address}:{port} in {}: {e}", ns.name()));
        socket
            .set_read_timeout(Some(Duration::from_millis(50)))
            .unwrap();
        let peers = Arc::new(Mutex::new(Vec::new()));
        let stop = Arc::new(AtomicBool::new(false));
        let tag = tag.to_owned();
        let thread = {
            let (peers, stop) = (peers.clone(), stop.clone());
            std::thread::spawn(move || {
                let mut buffer = [0u8; 2048];
                while !stop.load(Ordering::Relaxed) {
                    let Ok((n, from)) = socket.recv_from(&mut buffer) else {
                        continue;
                    };
                    peers.lock().unwrap().push(from);
                    let mut reply = format!("{tag}|").into_bytes();
                    reply.extend_from_slice(&buffer[..n]);
                    let _ = socket.send_to(&reply, from);
                }
            })
        };
        UdpServer {
            peers,
            stop,
            thread: Some(thread),
        }
    }

    fn peer_ips(&self) -> BTreeSet<std::net::IpAddr> {
        self.peers
            .lock()
            .unwrap()
            .iter()
            .map(SocketAddr::ip)
            .collect()
    }
}

impl Drop for UdpServer {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

/// Asserts one destination's `udp` result: every datagram answered by `server`, every
/// answer from the address that was dialled (`from`).
fn assert_udp(result: &Value, count: u64, server: &str, from: &str) {
    let what = &result["to"];
    assert!(
        result["send_error"].is_null() && result["connect_error"].is_null(),
        "{what}: sending failed: {result}"
    );
    assert_eq!(result["sent"], count, "{what}: {result}");
    assert_eq!(
        result["replies"], count,
        "{what}: every datagram answered: {result}"
    );
    assert_eq!(result["mismatched"], 0, "{what}: {result}");
    assert_eq!(
        result["servers"],
        serde_json::json!([server]),
        "{what}: answered by the one container it was published for: {result}"
    );
    assert_eq!(
        result["sources"],
        serde_json::json!([from]),
        "{what}: recvfrom shows the dialled address: {result}"
    );
}

/// Names of the programs attached to cgroup `path`, as bpftool lists them.
fn cgroup_programs(path: &str) -> Vec<String> {
    let output = Command::new("bpftool")
        .args(["-j", "cgroup", "show", path])
        .output()
        .expect("run bpftool");
    assert!(
        output.status.success(),
        "bpftool cgroup show {path}: {}",
        String::from_utf8_lossy(&output.stderr)
    );
    // An empty cgroup: bpftool prints nothing, or [].
    let listing: Value = serde_json::from_slice(&output.stdout).unwrap_or(Value::Null);
    let mut names: Vec<String> = listing
        .as_array()
        .into_iter()
        .flatten()
        .map(|p| p["name"].as_str().unwrap_or("?").to_owned())
        .collect();
    names.sort();
    names
}

/// (link id, attach type) of every bpf link on the cgroup with id `cgroup_id`.
fn cgroup_links(cgroup_id: u64) -> Vec<(u64, String)> {
    let output = Command::new("bpftool")
        .args(["-j", "link", "show"])
        .output()
        .expect("run bpftool");
    let links: Value = serde_json::from_slice(&output.stdout).expect("bpftool -j prints JSON");
    links
        .as_array()
        .into_iter()
        .flatten()
        .filter(|l| l["type"] == "cgroup" && l["cgroup_id"] == cgroup_id)
        .map(|l| {
            (
                l["id"].as_u64().unwrap(),
                l["attach_type"].as_str().unwrap_or("?").to_owned(),
            )
        })
        .collect()
}

fn socket_program_names() -> Vec<String> {
    let mut names: Vec<String> = bridge_common::programs::SOCKET
        .iter()
        .map(|n| n.to_string())
        .collect();
    names.sort();
    names
}

#[test]
fn host_clients_reach_published_ports_straight_through_the_socket_hooks() {
    if !socket_hooks_here("host_clients_reach_published_ports_straight_through_the_socket_hooks") {
        return;
    }
    let world = HostLab::up(&[]);
    world.pins.xbr_ok(&["publish", "br0", "8080:10.77.0.2:80"]);
    let server = TcpServer::start(&world.netns("a"), CONTAINER_A, 80);
    let spec = "8080:10.77.0.2:80/tcp";
    assert_eq!(
        cgroup_programs(world.cgroup.arg()),
        socket_program_names(),
        "bpftool lists the eight socket programs on the test's cgroup"
    );

    // The witness: outside the cgroup the same client finds nothing on the host port.
    let host = world.host();
    for to in ["127.0.0.1:8080", "10.78.0.1:8080"] {
        assert_refused(
            &client_outside_cgroup(&host, &["tcp", "--to", to]),
            &format!("{to} from outside the cgroup"),
        );
    }
    assert_eq!(world.host_clients(spec), HostClients::default());

    let mut connects = 0;
    for (to, connections) in [
        ("127.0.0.1:8080", 200u64),
        // The uplink's address and the bridge's own: addresses of the host namespace.
        ("10.78.0.1:8080", 20),
        ("10.77.0.1:8080", 20),
    ] {
        let count = connections.to_string();
        let result = world.client(&["tcp", "--to", to, "--connections", &count]);
        assert_served(&result, connections, to);
        assert_eq!(
            result["peer"], to,
            "getpeername shows the dialled address: {result}"
        );
        assert_eq!(
            ip_of(&result["local"]),
            GATEWAY,
            "{to}: the socket went straight to the container, from the bridge's address: {result}"
        );
        connects += connections;
        assert_eq!(
            world.host_clients(spec).connects,
            connects,
            "status counts every connect to {to}"
        );
    }

    // One large transfer, every byte echoed and compared.
    let result = world.client(&[
        "tcp",
        "--to",
        "127.0.0.1:8080",
        "--bytes",
        &(64 << 20).to_string(),
    ]);
    assert_served(&result, 1, "64 MiB through 127.0.0.1:8080");
    assert_eq!(result["verified_bytes"], 64 << 20);
    connects += 1;

    let counted = world.host_clients(spec);
    assert_eq!(
        counted,
        HostClients {
            connects,
            datagrams: 0,
            kernel_path: 0
        }
    );
    let peers = server.peers();
    assert_eq!(
        peers.len() as u64,
        connects,
        "the container accepted every connection"
    );
    assert_eq!(
        server.peer_ips(),
        BTreeSet::from([GATEWAY.into()]),
        "the container saw every client come from the bridge's address, untranslated"
    );
}

#[test]
fn a_port_published_on_one_host_address_serves_that_address_alone() {
    if !socket_hooks_here("a_port_published_on_one_host_address_serves_that_address_alone") {
        return;
    }
    let world = HostLab::up(&[]);
    world
        .pins
        .xbr_ok(&["publish", "br0", "127.0.0.1:8080:10.77.0.2:80"]);
    let server = TcpServer::start(&world.netns("a"), CONTAINER_A, 80);
    let spec = "127.0.0.1:8080:10.77.0.2:80/tcp";

    let result = world.client(&["tcp", "--to", "127.0.0.1:8080", "--connections", "5"]);
    assert_served(&result, 5, "127.0.0.1:8080");
    assert_eq!(result["peer"], "127.0.0.1:8080");
    for to in [
        "10.78.0.1:8080",
        "10.77.0.1:8080",
        "127.0.0.2:8080",
        "[::1]:8080",
    ] {
        assert_refused(
            &world.client(&["tcp", "--to", to]),
            &format!("{to} (the port is published on 127.0.0.1 only)"),
        );
    }
    assert_eq!(
        world.host_clients(spec),
        HostClients {
            connects: 5,
            ..HostClients::default()
        },
        "only the connects to 127.0.0.1 were translated"
    );
    assert_eq!(server.peers().len(), 5);
    assert_eq!(server.peer_ips(), BTreeSet::from([GATEWAY.into()]));
}

#[test]
fn udp_replies_show_the_dialled_address_to_each_socket() {
    if !socket_hooks_here("udp_replies_show_the_dialled_address_to_each_socket") {
        return;
    }
    let world = HostLab::up(&[]);
    world
        .pins
        .xbr_ok(&["publish", "br0", "5353:10.77.0.2:53/udp"]);
    world
        .pins
        .xbr_ok(&["publish", "br0", "5354:10.77.0.3:53/udp"]);
    let server_a = UdpServer::start(&world.netns("a"), CONTAINER_A, 53, "a");
    let server_b = UdpServer::start(&world.netns("b"), CONTAINER_B, 53, "b");
    let (spec_a, spec_b) = ("5353:10.77.0.2:53/udp", "5354:10.77.0.3:53/udp");

    // Unconnected: sendto/recvfrom, each datagram translated on its way out.
    let result = world.client(&["udp", "--to", "127.0.0.1:5353", "--count", "20"]);
    assert_udp(&result["results"][0], 20, "a", "127.0.0.1:5353");
    assert_eq!(world.host_clients(spec_a).datagrams, 20);

    // Connected: translated once, at connect(); getpeername shows what was dialled.
    let result = world.client(&[
        "udp",
        "--to",
        "127.0.0.1:5354",
        "--count",
        "20",
        "--connected",
    ]);
    assert_udp(&result["results"][0], 20, "b", "127.0.0.1:5354");
    assert_eq!(result["results"][0]["peer"], "127.0.0.1:5354", "{result}");
    assert_eq!(
        world.host_clients(spec_b),
        HostClients {
            connects: 1,
            ..HostClients::default()
        }
    );

    // Two sockets at once, each to its own port: each sees only its own answers, each from
    // the address it dialled.
    let result = world.client(&[
        "udp",
        "--to",
        "127.0.0.1:5353,127.0.0.1:5354",
        "--count",
        "200",
        "--parallel",
    ]);
    assert_udp(&result["results"][0], 200, "a", "127.0.0.1:5353");
    assert_udp(&result["results"][1], 200, "b", "127.0.0.1:5354");

    // One socket taking turns between the two ports (and two addresses of the host): each
    // answer still shows the address its question went to.
    let result = world.client(&[
        "udp",
        "--to",
        "127.0.0.1:5353,10.78.0.1:5354",
        "--count",
        "50",
    ]);
    assert_udp(&result["results"][0], 50, "a", "127.0.0.1:5353");
    assert_udp(&result["results"][1], 50, "b", "10.78.0.1:5354");

    assert_eq!(world.host_clients(spec_a).datagrams, 20 + 200 + 50);
    assert_eq!(world.host_clients(spec_b).datagrams, 200 + 50);
    for server in [&server_a, &server_b] {
        assert_eq!(
            server.peer_ips(),
            BTreeSet::from([GATEWAY.into()]),
            "the containers saw the host's sockets from the bridge's address"
        );
    }
}

#[test]
fn dual_stack_ipv6_sockets_reach_published_ports_at_loopback_and_mapped_addresses() {
    if !socket_hooks_here(
        "dual_stack_ipv6_sockets_reach_published_ports_at_loopback_and_mapped_addresses",
    ) {
        return;
    }
    let world = HostLab::up(&[]);
    world.pins.xbr_ok(&["publish", "br0", "8080:10.77.0.2:80"]);
    world
        .pins
        .xbr_ok(&["publish", "br0", "5353:10.77.0.2:53/udp"]);
    let tcp_server = TcpServer::start(&world.netns("a"), CONTAINER_A, 80);
    let udp_server = UdpServer::start(&world.netns("a"), CONTAINER_A, 53, "a");

    for to in ["[::1]:8080", "[::ffff:127.0.0.1]:8080"] {
        let result = world.client(&["tcp", "--to", to, "--connections", "3"]);
        assert_served(&result, 3, to);
        assert_eq!(
            result["peer"], to,
            "getpeername of the IPv6 socket shows what it dialled: {result}"
        );
    }
    assert_eq!(world.host_clients("8080:10.77.0.2:80/tcp").connects, 6);

    let result = world.client(&["udp", "--to", "[::1]:5353", "--count", "10", "--connected"]);
    assert_udp(&result["results"][0], 10, "a", "[::1]:5353");
    assert_eq!(result["results"][0]["peer"], "[::1]:5353", "{result}");
    let result = world.client(&["udp", "--to", "[::ffff:127.0.0.1]:5353", "--count", "10"]);
    assert_udp(&result["results"][0], 10, "a", "[::ffff:127.0.0.1]:5353");

    assert_eq!(
        world.host_clients("5353:10.77.0.2:53/udp"),
        HostClients {
            connects: 1,
            datagrams: 10,
            kernel_path: 0
        }
    );

    // An unconnected IPv6 socket's datagram to [::1] cannot be pointed at an IPv4-mapped
    // address (the kernel refuses that rewrite in sendmsg with ENOTSUPP): it must go its own
    // way, to [::1], with the send succeeding as it would without xbr. Nothing listens on
    // [::1]:5353, so no answer comes.
    let result = world.client(&["udp", "--to", "[::1]:5353", "--count", "3"]);
    let result = &result["results"][0];
    assert!(
        result["send_error"].is_null() && result["sent"] == 3,
        "sendto [::1]:5353 must not fail: {result}"
    );
    assert_eq!(result["replies"], 0, "{result}");
    assert_eq!(
        world.host_clients("5353:10.77.0.2:53/udp"),
        HostClients {
            connects: 1,
            datagrams: 10,
            kernel_path: 3
        },
        "the three datagrams were left to the kernel path"
    );

    assert_eq!(tcp_server.peer_ips(), BTreeSet::from([GATEWAY.into()]));
    assert_eq!(udp_server.peer_ips(), BTreeSet::from([GATEWAY.into()]));
}

#[test]
fn sockets_of_other_namespaces_are_not_translated() {
    if !socket_hooks_here("sockets_of_other_namespaces_are_not_translated") {
        return;
    }
    // With the uplink hooked, the outside's connections to the published port take xbr's
    // tc path, which a socket-hook translation would have bypassed.
    let world = HostLab::up(&["--uplink", "uplink0"]);
    world.pins.xbr_ok(&["publish", "br0", "8080:10.77.0.2:80"]);
    let spec = "8080:10.77.0.2:80/tcp";
    let server = TcpServer::start(&world.netns("a"), CONTAINER_A, 80);
    // A second lab, same addresses, no xbr: a server where a wrong translation of its host
    // namespace's sockets would lead.
    let other = LabBuilder::three_containers().up();
    let other_server = TcpServer::start(
        &NetNs::open(&other.spec().container_netns("a")).unwrap(),
        CONTAINER_A,
        80,
    );

    // Sockets of other namespaces in the cgroup are the kernel path's decision: their
    // 127.0.0.1 is their own, and what they may reach is decided there, never by the hooks.
    let other_host = other.spec().host_netns();
    assert_refused(
        &world.client_in(&other_host, &["tcp", "--to", "127.0.0.1:8080"]),
        "127.0.0.1:8080 from another bridge's host namespace",
    );
    let container_b = world.lab.spec().container_netns("b");
    assert_refused(
        &world.client_in(&container_b, &["tcp", "--to", "127.0.0.1:8080"]),
        "127.0.0.1:8080 from a container",
    );
    assert!(
        other_server.peers().is_empty() && server.peers().is_empty(),
        "no container accepted a connection"
    );
    // The outside reaches the host's address over the uplink: served by the tc path, and the
    // container sees the outside client itself, not the bridge's address.
    let outside = world.lab.spec().outside_netns().unwrap();
    let result = world.client_in(
        &outside,
        &["tcp", "--to", "10.78.0.1:8080", "--connections", "3"],
    );
    assert_served(&result, 3, "10.78.0.1:8080 from the outside");
    assert_eq!(
        server.peer_ips(),
        BTreeSet::from([Ipv4Addr::new(10, 78, 0, 2).into()]),
        "the outside's connections were not translated at its sockets"
    );
    assert_eq!(
        world.host_clients(spec),
        HostClients::default(),
        "the socket hooks touched none of these"
    );

    // The control: the host's own socket in the same cgroup is translated.
    let result = world.client(&["tcp", "--to", "127.0.0.1:8080"]);
    assert_served(&result, 1, "127.0.0.1:8080 from the host");
    assert_eq!(world.host_clients(spec).connects, 1);
    assert!(server.peer_ips().contains(&GATEWAY.into()));
}

#[test]
fn a_published_port_whose_container_is_gone_is_refused_at_once() {
    if !socket_hooks_here("a_published_port_whose_container_is_gone_is_refused_at_once") {
        return;
    }
    let world = HostLab::up(&[]);
    let mut extra = ExtraContainers::new(world.lab.spec());
    let web = format!("{}-web", world.lab.spec().name);
    extra.add(&web, "veth-web", "02:77:00:00:05:01", "10.77.0.50/24");
    let server = TcpServer::start(
        &NetNs::open(&web).unwrap(),
        Ipv4Addr::new(10, 77, 0, 50),
        80,
    );
    world
        .pins
        .xbr_ok(&["attach", "br0", "--cgroup", world.cgroup.arg()]);
    world.pins.xbr_ok(&["publish", "br0", "8080:10.77.0.50:80"]);
    let spec = "8080:10.77.0.50:80/tcp";
    assert_served(
        &world.client(&["tcp", "--to", "127.0.0.1:8080"]),
        1,
        "127.0.0.1:8080 while the container runs",
    );

    drop(server);
    extra.remove_now(&web, "veth-web");
    // The reconcile sees the container gone: the published port has no port to go to.
    world
        .pins
        .xbr_ok(&["attach", "br0", "--cgroup", world.cgroup.arg()]);
    let status = world.pins.status();
    let published = &status["bridges"][0]["published"][0];
    assert!(
        published["container_port_ifindex"].as_u64().unwrap_or(0) == 0,
        "the published port has no container now: {status}"
    );

    // Left to the kernel path: nothing listens on the host port, so refused, and at once
    // (a translation to the vanished address would wait on ARP for seconds).
    let started = Instant::now();
    let result = world.client(&["tcp", "--to", "127.0.0.1:8080", "--timeout-ms", "4000"]);
    assert_refused(&result, "127.0.0.1:8080 with the container gone");
    let took = result["error"]["after_ms"].as_u64().unwrap();
    assert!(took < 1000, "refused after {took} ms: {result}");
    assert!(started.elapsed() < Duration::from_secs(4));
    assert_eq!(
        world.host_clients(spec),
        HostClients {
            connects: 1,
            datagrams: 0,
            kernel_path: 1
        }
    );
}

/// Reads `socket-client tcp-hold` lines on a thread, so a silent client fails the test.
fn next_line(lines: &std::sync::mpsc::Receiver<String>, what: &str) -> Value {
    let line = lines
        .recv_timeout(Duration::from_secs(20))
        .unwrap_or_else(|e| panic!("socket-client said nothing {what}: {e}"));
    serde_json::from_str(&line).unwrap_or_else(|e| panic!("{what}: not JSON ({e}): {line}"))
}

#[test]
fn an_established_connection_outlives_detach() {
    if !socket_hooks_here("an_established_connection_outlives_detach") {
        return;
    }
    let world = HostLab::up(&[]);
    world.pins.xbr_ok(&["publish", "br0", "8080:10.77.0.2:80"]);
    let server = TcpServer::start(&world.netns("a"), CONTAINER_A, 80);
    let mut command = client_command(
        &world.host(),
        &["tcp-hold", "--to", "127.0.0.1:8080", "--bytes", "1048576"],
    );
    command.stdin(Stdio::piped());
    let mut child = world.cgroup.spawn(command);
    let mut stdin = child.stdin.take().unwrap();
    let stdout = BufReader::new(child.stdout.take().unwrap());
    let (send, lines) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        for line in stdout.lines().map_while(Result::ok) {
            let _ = send.send(line);
        }
    });

    let first = next_line(&lines, "after its first 1 MiB");
    assert!(first["error"].is_null(), "first echo: {first}");
    assert_eq!(first["peer"], "127.0.0.1:8080", "{first}");
    assert_eq!(server.peer_ips(), BTreeSet::from([GATEWAY.into()]));

    world.pins.xbr_ok(&["detach", "br0"]);
    assert_eq!(
        cgroup_programs(world.cgroup.arg()),
        Vec::<String>::new(),
        "bpftool lists no program on the cgroup after detach"
    );
    assert!(
        cgroup_links(world.cgroup.id()).is_empty(),
        "no link on the cgroup after detach"
    );

    stdin.write_all(b"go on\n").unwrap();
    let second = next_line(&lines, "after detach");
    assert!(
        second["error"].is_null(),
        "the established connection carries 1 MiB more both ways after detach: {second}"
    );
    let status = wait_output(child, Duration::from_secs(20)).status;
    assert!(status.success(), "socket-client tcp-hold: {status}");
    assert_eq!(server.peers().len(), 1, "one connection, kept");

    // New connections find the hooks gone.
    assert_refused(
        &world.client(&["tcp", "--to", "127.0.0.1:8080"]),
        "127.0.0.1:8080 after detach",
    );
}

#[test]
fn socket_hooks_detached_behind_xbrs_back_are_put_back() {
    if !socket_hooks_here("socket_hooks_detached_behind_xbrs_back_are_put_back") {
        return;
    }
    let world = HostLab::up(&[]);
    world.pins.xbr_ok(&["publish", "br0", "8080:10.77.0.2:80"]);
    let _server = TcpServer::start(&world.netns("a"), CONTAINER_A, 80);
    assert_served(
        &world.client(&["tcp", "--to", "127.0.0.1:8080"]),
        1,
        "127.0.0.1:8080 before",
    );
    let links = cgroup_links(world.cgroup.id());
    assert_eq!(links.len(), 8, "eight links on the cgroup: {links:?}");
    let (connect4, _) = links
        .iter()
        .find(|(_, attach_type)| attach_type == "cgroup_inet4_connect")
        .unwrap_or_else(|| panic!("no connect4 link on the cgroup: {links:?}"));
    let output = Command::new("bpftool")
        .args(["link", "detach", "id", &connect4.to_string()])
        .output()
        .unwrap();
    assert!(
        output.status.success(),
        "bpftool link detach id {connect4}: {}",
        String::from_utf8_lossy(&output.stderr)
    );

    let hooks = world.socket_hooks();
    assert_eq!(
        hooks["missing"],
        serde_json::json!(["socket_connect4"]),
        "{hooks}"
    );
    assert_eq!(hooks["attached"].as_array().unwrap().len(), 7, "{hooks}");
    assert_eq!(cgroup_programs(world.cgroup.arg()).len(), 7);
    assert_refused(
        &world.client(&["tcp", "--to", "127.0.0.1:8080"]),
        "127.0.0.1:8080 without the connect4 hook",
    );

    world
        .pins
        .xbr_ok(&["attach", "br0", "--cgroup", world.cgroup.arg()]);
    let hooks = world.socket_hooks();
    assert_eq!(hooks["missing"], serde_json::json!([]), "{hooks}");
    assert_eq!(hooks["attached"].as_array().unwrap().len(), 8, "{hooks}");
    assert_eq!(hooks["cgroup_id"], world.cgroup.id(), "{hooks}");
    assert_eq!(cgroup_programs(world.cgroup.arg()), socket_program_names());
    assert_served(
        &world.client(&["tcp", "--to", "127.0.0.1:8080"]),
        1,
        "127.0.0.1:8080 after the reconcile",
    );
}

#[test]
fn socket_hooks_on_a_path_that_is_no_cgroup_are_refused() {
    if !socket_hooks_here("socket_hooks_on_a_path_that_is_no_cgroup_are_refused") {
        return;
    }
    let lab = LabBuilder::three_containers().up();
    let pins = PinRoot::new(&lab.spec().host_netns());
    for path in ["/nonexistent", "/tmp"] {
        let (code, _, stderr) = pins.xbr(&["attach", "br0", "--cgroup", path]);
        assert_eq!(code, 1, "--cgroup {path} is refused: {stderr}");
        assert!(
            stderr.contains(&format!("{path} is not a cgroup v2 directory")),
            "the error names the path and what it is not: {stderr}"
        );
        let status = pins.status();
        assert_eq!(
            status["bridges"],
            serde_json::json!([]),
            "nothing attached after --cgroup {path}: {status}"
        );
        let pinned = files_under(&pins.path);
        assert!(
            pinned.is_empty(),
            "nothing pinned after --cgroup {path}: {pinned:?}"
        );
    }
}

/// Every file (not directory) under `dir`, which may not exist.
fn files_under(dir: &std::path::Path) -> Vec<std::path::PathBuf> {
    let mut files = Vec::new();
    let mut pending = vec![dir.to_path_buf()];
    while let Some(dir) = pending.pop() {
        for entry in std::fs::read_dir(&dir).into_iter().flatten().flatten() {
            if entry.file_type().is_ok_and(|t| t.is_dir()) {
                pending.push(entry.path());
            } else {
                files.push(entry.path());
            }
        }
    }
    files
}

#[test]
fn a_later_attach_that_wants_other_socket_hooks_is_refused() {
    if !socket_hooks_here("a_later_attach_that_wants_other_socket_hooks_is_refused") {
        return;
    }
    let lab = HostLab::up(&[]);
    let other = TestCgroup::new().expect("cgroup v2 is mounted (checked by the test)");
    let hooks_before = lab.socket_hooks();
    for (wanted, args) in [
        (
            "another cgroup",
            vec!["attach", "br0", "--cgroup", other.arg()],
        ),
        (
            "no socket hooks",
            vec!["attach", "br0", "--no-socket-hooks"],
        ),
    ] {
        let (code, _, stderr) = lab.pins.xbr(&args);
        assert_eq!(
            code, 1,
            "{wanted} on a bridge hooked elsewhere is refused: {stderr}"
        );
        assert!(
            stderr.contains(&format!("socket hooks on cgroup {}", lab.cgroup.arg()))
                && stderr.contains("xbr detach br0"),
            "the error names the attached cgroup and the way out: {stderr}"
        );
        assert_eq!(
            lab.socket_hooks(),
            hooks_before,
            "{wanted}: the hooks are unchanged"
        );
    }
    assert_eq!(
        cgroup_programs(other.arg()),
        Vec::<String>::new(),
        "nothing was hooked to the other cgroup"
    );
    // The same cgroup, or no choice at all, is an attach like any other.
    lab.pins
        .xbr_ok(&["attach", "br0", "--cgroup", lab.cgroup.arg()]);
    assert_eq!(lab.socket_hooks(), hooks_before);
}

#[test]
fn a_follower_serves_the_host_clients_counters_as_metrics() {
    if !socket_hooks_here("a_follower_serves_the_host_clients_counters_as_metrics") {
        return;
    }
    let world = HostLab::up(&[]);
    let host = world.host();
    let _follower = xbr_tests::witness::Follower::start(
        &host,
        &world.pins.path,
        "br0",
        &[
            "--cgroup",
            world.cgroup.arg(),
            "--metrics",
            "127.0.0.1:9477",
        ],
    );
    world.pins.xbr_ok(&["publish", "br0", "8080:10.77.0.2:80"]);
    let _server = TcpServer::start(&world.netns("a"), CONTAINER_A, 80);
    let result = world.client(&["tcp", "--to", "127.0.0.1:8080", "--connections", "3"]);
    assert_served(&result, 3, "127.0.0.1:8080");
    // (The scrape itself comes from the test process, outside the cgroup: never translated.)
    let body = xbr_tests::witness::scrape_metrics(&host);
    let line = "xbr_host_clients_total{bridge=\"br0\",published=\"8080:10.77.0.2:80/tcp\",outcome=\"connect\"} 3";
    assert!(body.contains(line), "{line} in {body}");
}

#[test]
fn a_rule_on_the_host_clients_way_to_the_port_leaves_them_to_the_kernel_path() {
    if !socket_hooks_here(
        "a_rule_on_the_host_clients_way_to_the_port_leaves_them_to_the_kernel_path",
    ) {
        return;
    }
    let world = HostLab::up(&[]);
    let host = world.host();
    let iptables = |args: &[&str]| {
        let status = Command::new("ip")
            .args(["netns", "exec", &host, "iptables"])
            .args(args)
            .status()
            .expect("run iptables");
        assert!(status.success(), "iptables {args:?}");
    };
    // On the kernel path this drops the host's own connections to the port. (DROP, not
    // REJECT: the QEMU guests load no reject module.)
    let rule = ["OUTPUT", "-p", "tcp", "--dport", "8080", "-j", "DROP"];
    iptables(&[&["-A"], &rule[..]].concat());
    world.pins.xbr_ok(&["publish", "br0", "8080:10.77.0.2:80"]);
    let _server = TcpServer::start(&world.netns("a"), CONTAINER_A, 80);
    let spec = "8080:10.77.0.2:80/tcp";
    let published = &world.pins.status()["bridges"][0]["published"][0];
    assert_eq!(published["host_clients_held"], true, "{published}");
    let dropped = world.client(&["tcp", "--to", "127.0.0.1:8080", "--timeout-ms", "500"]);
    assert_eq!(
        dropped["connected"], 0,
        "the rule drops it, so nothing may accept it: {dropped}"
    );
    assert_eq!(
        dropped["error"]["io"]["kind"], "TimedOut",
        "the rule dropped the SYN on the kernel path: {dropped}"
    );
    assert_eq!(
        world.host_clients(spec),
        HostClients {
            connects: 0,
            datagrams: 0,
            kernel_path: 1
        },
        "left to the kernel path, where the rule dropped it"
    );

    // Without the rule, a reconcile gives the host's clients the socket path again.
    iptables(&[&["-D"], &rule[..]].concat());
    world
        .pins
        .xbr_ok(&["attach", "br0", "--cgroup", world.cgroup.arg()]);
    let result = world.client(&["tcp", "--to", "127.0.0.1:8080"]);
    assert_served(&result, 1, "127.0.0.1:8080 once the rule is gone");
    assert_eq!(world.host_clients(spec).connects, 1);
}
