//! Independent witnesses of what xbr did, read with the kernel's own tools (nft, tc,
//! bpftool) rather than through xbr, plus a runner for the real `xbr` binary.

use std::{
    net::{Ipv4Addr, SocketAddr, TcpListener, TcpStream, UdpSocket},
    path::{Path, PathBuf},
    process::{Command, Output},
    time::Duration,
};

use std::io::{Read as _, Write as _};

use aya::programs::{SchedClassifier, TcAttachType};
use xbr::netns::NetNs;

/// Counts frames the bridge forwards between its ports (nftables, bridge family, forward
/// hook): frames that xbr redirects never reach that hook.
pub struct BridgeForwardCounter {
    netns: String,
}

/// Frames the bridge forwarded, by kind.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Forwarded {
    /// Unicast IPv4: what xbr takes off the bridge.
    pub ipv4_unicast: u64,
    /// ARP (requests are broadcast, replies unicast): what must stay on the bridge.
    pub arp: u64,
}

const TABLE: &str = "xbr_witness";

impl BridgeForwardCounter {
    pub fn install(netns: &str) -> BridgeForwardCounter {
        let rules = format!(
            "table bridge {TABLE} {{\n chain forward {{\n  type filter hook forward priority 0; policy accept;\n  \
             ether type ip ether daddr & 01:00:00:00:00:00 == 00:00:00:00:00:00 counter comment \"ipv4_unicast\"\n  \
             ether type arp counter comment \"arp\"\n }}\n}}\n"
        );
        nft(netns, &["-f", "-"], Some(&rules));
        BridgeForwardCounter {
            netns: netns.to_owned(),
        }
    }

    pub fn read(&self) -> Forwarded {
        let listing = nft(&self.netns, &["-j", "list", "table", "bridge", TABLE], None);
        let json: serde_json::Value = serde_json::from_str(&listing).expect("nft -j prints JSON");
        let mut forwarded = Forwarded::default();
        for item in json["nftables"].as_array().expect("nftables array") {
            let Some(expr) = item["rule"]["expr"].as_array() else {
                continue;
            };
            let packets = expr
                .iter()
                .find_map(|e| e["counter"]["packets"].as_u64())
                .expect("rule has a counter");
            match item["rule"]["comment"].as_str() {
                Some("ipv4_unicast") => forwarded.ipv4_unicast = packets,
                Some("arp") => forwarded.arp = packets,
                other => panic!("unexpected witness rule {other:?}"),
            }
        }
        forwarded
    }
}

/// The packet count of the first counter in `nft -j list table ...` output.
pub fn first_counter(listing: &[u8]) -> u64 {
    let json: serde_json::Value = serde_json::from_slice(listing).expect("nft -j prints JSON");
    json["nftables"]
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(|item| item["rule"]["expr"].as_array())
        .flatten()
        .find_map(|expr| expr["counter"]["packets"].as_u64())
        .expect("the witness rule has a counter")
}

/// The MACs `xbr status --json` lists behind the first bridge's port `port` as containers on
/// other hosts (`bridges[0].ports[].remote_endpoints[].mac`), lower case.
pub fn remote_endpoint_macs(status: &serde_json::Value, port: &str) -> Vec<String> {
    status["bridges"][0]["ports"]
        .as_array()
        .into_iter()
        .flatten()
        .filter(|entry| entry["name"] == port)
        .filter_map(|entry| entry["remote_endpoints"].as_array())
        .flatten()
        .filter_map(|remote| remote["mac"].as_str().map(str::to_lowercase))
        .collect()
}

/// `nft ARGS...` in `netns` (`stdin` fed to it: `-f -`); panics when nft fails.
pub fn nft(netns: &str, args: &[&str], stdin: Option<&str>) -> String {
    let mut command = Command::new("ip");
    command.args(["netns", "exec", netns, "nft"]).args(args);
    let output = run_with_stdin(command, stdin);
    assert!(
        output.status.success(),
        "nft {} in {netns} failed: {}",
        args.join(" "),
        String::from_utf8_lossy(&output.stderr)
    );
    String::from_utf8_lossy(&output.stdout).into_owned()
}

fn run_with_stdin(mut command: Command, stdin: Option<&str>) -> Output {
    use std::process::Stdio;
    command
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    let mut child = command.spawn().expect("spawn witness command");
    if let Some(text) = stdin {
        child
            .stdin
            .take()
            .unwrap()
            .write_all(text.as_bytes())
            .unwrap();
    }
    drop(child.stdin.take());
    child.wait_with_output().expect("wait for witness command")
}

/// tc filters on a port's ingress (clsact mode leaves its trace here).
pub fn tc_ingress_filters(netns: &str, port: &str) -> String {
    let output = Command::new("tc")
        .args(["-n", netns, "filter", "show", "dev", port, "ingress"])
        .output()
        .expect("run tc");
    String::from_utf8_lossy(&output.stdout).into_owned()
}

/// Qdiscs of a port, as `tc qdisc show` lists them.
pub fn tc_qdiscs(netns: &str, port: &str) -> String {
    let output = Command::new("tc")
        .args(["-n", netns, "qdisc", "show", "dev", port])
        .output()
        .expect("run tc");
    String::from_utf8_lossy(&output.stdout).into_owned()
}

/// Names of the BPF programs on `port`'s tc ingress, as the kernel reports them: cls_bpf
/// filters through bpftool, tcx links through BPF_PROG_QUERY (this bpftool predates tcx).
pub fn tc_programs(netns: &str, port: &str) -> Vec<String> {
    let output = Command::new("nsenter")
        .arg(format!("--net=/run/netns/{netns}"))
        .args(["bpftool", "-j", "net", "show", "dev", port])
        .output()
        .expect("run bpftool");
    assert!(
        output.status.success(),
        "bpftool net show failed: {}",
        String::from_utf8_lossy(&output.stderr)
    );
    let json: serde_json::Value =
        serde_json::from_slice(&output.stdout).expect("bpftool -j prints JSON");
    let mut names = Vec::new();
    for section in json.as_array().into_iter().flatten() {
        for entry in section["tc"].as_array().into_iter().flatten() {
            if let Some(name) = entry["name"].as_str() {
                names.push(name.to_owned());
            }
        }
    }
    let port = port.to_owned();
    let tcx = NetNs::open(netns)
        .expect("namespace exists")
        .run(move || SchedClassifier::query_tcx(&port, TcAttachType::Ingress))
        .expect("enter namespace");
    // Kernels before 6.6 have no tcx: nothing can be attached that way there.
    if let Ok((_, programs)) = tcx {
        names.extend(
            programs
                .iter()
                .map(|p| p.name_as_str().unwrap_or("?").to_owned()),
        );
    }
    names
}

/// The `xbr` binary built beside these tests (`cargo test --workspace` builds it; so does
/// `cargo build -p bridge-user`). `XBR` overrides the path.
pub fn xbr_binary() -> PathBuf {
    built_binary("xbr", "XBR")
}

/// Binary `name` of this workspace, built beside these tests (same profile); environment
/// variable `overridden_by` overrides the path.
pub fn built_binary(name: &str, overridden_by: &str) -> PathBuf {
    if let Some(path) = std::env::var_os(overridden_by) {
        return PathBuf::from(path);
    }
    let exe = std::env::current_exe().expect("test binary path");
    let profile_dir = exe
        .parent()
        .and_then(Path::parent)
        .expect("target/<profile>/deps/..");
    let binary = profile_dir.join(name);
    assert!(
        binary.exists(),
        "{} not built; run `cargo build -p bridge-user` with the same profile, or set {overridden_by}",
        binary.display()
    );
    binary
}

/// Runs `xbr ARGS...` for cleanup in a `Drop`: never panics (a panic while unwinding would
/// abort the whole test binary), ignores the outcome.
pub fn xbr_quietly(args: &[&str]) {
    let binary = std::env::var_os("XBR").map(PathBuf::from).or_else(|| {
        let exe = std::env::current_exe().ok()?;
        Some(exe.parent()?.parent()?.join("xbr"))
    });
    if let Some(binary) = binary {
        let _ = Command::new(binary).args(args).output();
    }
}

/// Tests never hook socket programs to the machine's root cgroup, which `xbr attach` and
/// `xbr follow` do by default: one without `--cgroup` gets `--no-socket-hooks`. Every test's xbr command
/// line goes through this.
pub fn without_root_cgroup<'a>(args: &[&'a str]) -> Vec<&'a str> {
    let mut args = args.to_vec();
    let chooses = |arg: &&str| {
        *arg == "--cgroup" || arg.starts_with("--cgroup=") || *arg == "--no-socket-hooks"
    };
    if let Some(at) = args
        .iter()
        .position(|arg| *arg == "attach" || *arg == "follow")
        && !args.iter().any(chooses)
    {
        args.insert(at + 1, "--no-socket-hooks");
    }
    args
}

/// Runs `xbr ARGS...`; returns (exit code, stdout, stderr).
pub fn xbr(args: &[&str]) -> (i32, String, String) {
    let output = Command::new(xbr_binary())
        .args(without_root_cgroup(args))
        .output()
        .expect("run xbr");
    (
        output.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&output.stdout).into_owned(),
        String::from_utf8_lossy(&output.stderr).into_owned(),
    )
}

/// Runs `xbr ARGS...` and panics with its stderr unless it succeeds; returns stdout.
pub fn xbr_ok(args: &[&str]) -> String {
    let (code, stdout, stderr) = xbr(args);
    assert_eq!(code, 0, "`xbr {}` failed: {stderr}", args.join(" "));
    stdout
}

/// A TCP echo exchange from namespace `client` to `server_ip` in namespace `server`: the
/// client sends `bytes` bytes and must get the same bytes back.
pub fn tcp_echo(client: &NetNs, server: &NetNs, server_ip: Ipv4Addr, bytes: usize) {
    let listener = server
        .run(|| TcpListener::bind((server_ip, 0)))
        .expect("enter server namespace")
        .expect("bind TCP listener");
    let address = listener.local_addr().unwrap();
    let echo = std::thread::spawn(move || {
        let (mut stream, _) = listener.accept().expect("accept");
        stream
            .set_read_timeout(Some(Duration::from_secs(5)))
            .unwrap();
        let mut buffer = vec![0u8; 64 * 1024];
        loop {
            let n = stream.read(&mut buffer).expect("server read");
            if n == 0 {
                break;
            }
            stream.write_all(&buffer[..n]).expect("server write");
        }
    });
    let mut stream = client
        .run(|| TcpStream::connect_timeout(&address, Duration::from_secs(5)))
        .expect("enter client namespace")
        .unwrap_or_else(|e| panic!("TCP connect to {address} from {}: {e}", client.name()));
    stream
        .set_read_timeout(Some(Duration::from_secs(5)))
        .unwrap();
    let sent: Vec<u8> = (0..bytes).map(|i| (i % 251) as u8).collect();
    let writer = {
        let mut stream = stream.try_clone().unwrap();
        let sent = sent.clone();
        std::thread::spawn(move || {
            stream.write_all(&sent).expect("client write");
            stream.shutdown(std::net::Shutdown::Write).unwrap();
        })
    };
    let mut received = Vec::new();
    stream
        .read_to_end(&mut received)
        .unwrap_or_else(|e| panic!("TCP echo from {address}: {e}"));
    writer.join().unwrap();
    echo.join().unwrap();
    assert!(
        received == sent,
        "TCP echo from {address} returned {} of {bytes} bytes, or other bytes",
        received.len()
    );
}

/// UDP from `client` to `server_ip` in `server`: `count` datagrams, each answered; returns
/// how many answers came back.
pub fn udp_echo(client: &NetNs, server: &NetNs, server_ip: Ipv4Addr, count: usize) -> usize {
    let server_socket = server
        .run(|| UdpSocket::bind((server_ip, 0)))
        .expect("enter server namespace")
        .expect("bind UDP socket");
    let address: SocketAddr = server_socket.local_addr().unwrap();
    server_socket
        .set_read_timeout(Some(Duration::from_secs(2)))
        .unwrap();
    let echo = std::thread::spawn(move || {
        let mut buffer = [0u8; 2048];
        let mut answered = 0;
        while answered < count {
            let Ok((n, from)) = server_socket.recv_from(&mut buffer) else {
                break;
            };
            server_socket.send_to(&buffer[..n], from).unwrap();
            answered += 1;
        }
    });
    let socket = client
        .run(|| UdpSocket::bind((Ipv4Addr::UNSPECIFIED, 0)))
        .expect("enter client namespace")
        .expect("bind UDP client");
    socket
        .set_read_timeout(Some(Duration::from_secs(2)))
        .unwrap();
    let mut answers = 0;
    let mut buffer = [0u8; 2048];
    for i in 0..count {
        let payload = format!("datagram {i} of {count}");
        socket.send_to(payload.as_bytes(), address).unwrap();
        if let Ok((n, _)) = socket.recv_from(&mut buffer)
            && &buffer[..n] == payload.as_bytes()
        {
            answers += 1;
        }
    }
    echo.join().unwrap();
    answers
}

/// An `xbr attach --follow` process this test started; killed by pid on drop if still running.
pub struct Follower {
    child: std::process::Child,
    pub stderr_path: PathBuf,
}

impl Follower {
    /// Starts `xbr -n NETNS --pin-root ROOT attach BRIDGE --follow EXTRA...` and waits until
    /// its first attach is done.
    pub fn start(netns: &str, pin_root: &Path, bridge: &str, extra: &[&str]) -> Follower {
        let root = pin_root.to_str().expect("UTF-8 pin root");
        let mut args = vec![
            "-n",
            netns,
            "--pin-root",
            root,
            "attach",
            bridge,
            "--follow",
        ];
        args.extend_from_slice(extra);
        Follower::spawn(&[], &args, Duration::from_secs(10))
    }

    /// Starts `xbr -v ARGS...` (an `attach ... --follow`) with `env` set, and waits up to
    /// `startup` until it says it follows.
    pub fn spawn(env: &[(&str, &str)], args: &[&str], startup: Duration) -> Follower {
        let follower = Follower::start_quietly(env, args);
        follower.wait_for_log("following the bridge", startup);
        follower
    }

    /// Starts `xbr -v ARGS...` and returns at once.
    pub fn start_quietly(env: &[(&str, &str)], args: &[&str]) -> Follower {
        let stderr_path = std::env::temp_dir().join(format!(
            "{}.follower.log",
            crate::lab_support::unique_name("xbr")
        ));
        let stderr = std::fs::File::create(&stderr_path).expect("follower log file");
        let child = Command::new(xbr_binary())
            .envs(env.iter().copied())
            .arg("-v")
            .args(without_root_cgroup(args))
            .stdout(std::process::Stdio::null())
            .stderr(stderr)
            .spawn()
            .expect("start the follower");
        Follower { child, stderr_path }
    }

    /// Waits up to `limit` until the follower's log says `what`; panics with the log if not.
    pub fn wait_for_log(&self, what: &str, limit: Duration) {
        let started = std::time::Instant::now();
        while !self.log().contains(what) {
            assert!(
                started.elapsed() < limit,
                "the follower did not say `{what}` within {limit:?}: {}",
                self.log()
            );
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    /// SIGTERM: the follower stops following, as on Ctrl-C.
    pub fn terminate(&self) {
        self.signal(libc::SIGTERM);
    }

    pub fn pid(&self) -> i32 {
        self.child.id() as i32
    }

    pub fn log(&self) -> String {
        std::fs::read_to_string(&self.stderr_path).unwrap_or_default()
    }

    pub fn signal(&self, signal: i32) {
        unsafe { libc::kill(self.pid(), signal) };
    }

    /// Waits up to `limit` for the follower to exit; returns its exit code.
    pub fn wait_exit(&mut self, limit: Duration) -> Option<i32> {
        let started = std::time::Instant::now();
        while started.elapsed() < limit {
            if let Some(status) = self.child.try_wait().expect("poll the follower") {
                return Some(status.code().unwrap_or(128 + status.signal_number()));
            }
            std::thread::sleep(Duration::from_millis(10));
        }
        None
    }
}

trait SignalNumber {
    fn signal_number(&self) -> i32;
}

impl SignalNumber for std::process::ExitStatus {
    fn signal_number(&self) -> i32 {
        use std::os::unix::process::ExitStatusExt as _;
        self.signal().unwrap_or(0)
    }
}

impl Drop for Follower {
    fn drop(&mut self) {
        if self.child.try_wait().ok().flatten().is_none() {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
        let _ = std::fs::remove_file(&self.stderr_path);
    }
}

/// Counts UDP frames to `port` arriving at `device` in `netns` (nftables netdev ingress:
/// every frame the device receives, whatever its destination MAC).
pub struct IngressCounter {
    netns: String,
}

impl IngressCounter {
    pub fn install(netns: &str, device: &str, port: u16) -> IngressCounter {
        let rules = format!(
            "table netdev xbr_ingress {{\n chain ingress {{\n  type filter hook ingress device {device} priority 0; policy accept;\n  \
             udp dport {port} counter\n }}\n}}\n"
        );
        nft(netns, &["-f", "-"], Some(&rules));
        IngressCounter {
            netns: netns.to_owned(),
        }
    }

    pub fn read(&self) -> u64 {
        let listing = nft(
            &self.netns,
            &["-j", "list", "table", "netdev", "xbr_ingress"],
            None,
        );
        let json: serde_json::Value = serde_json::from_str(&listing).expect("nft -j prints JSON");
        json["nftables"]
            .as_array()
            .expect("nftables array")
            .iter()
            .filter_map(|item| item["rule"]["expr"].as_array())
            .flatten()
            .find_map(|e| e["counter"]["packets"].as_u64())
            .expect("the rule has a counter")
    }
}

/// Counts, at `device`'s ingress in `netns` (nftables netdev ingress: every frame the device
/// receives), UDP frames to any of `ports`, split by destination MAC: addressed to `own_mac`,
/// or addressed to another MAC (a frame the namespace should never have seen).
pub struct AddressedCounter {
    netns: String,
}

/// What an `AddressedCounter` saw.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Addressed {
    pub to_me: u64,
    pub to_others: u64,
}

impl AddressedCounter {
    pub fn install(netns: &str, device: &str, own_mac: &str, ports: &[u16]) -> AddressedCounter {
        let ports = ports
            .iter()
            .map(u16::to_string)
            .collect::<Vec<_>>()
            .join(", ");
        let rules = format!(
            "table netdev xbr_addressed {{\n chain ingress {{\n  type filter hook ingress device {device} priority 0; policy accept;\n  \
             ether daddr {own_mac} udp dport {{ {ports} }} counter comment \"to_me\"\n  \
             ether daddr != {own_mac} udp dport {{ {ports} }} counter comment \"to_others\"\n }}\n}}\n"
        );
        nft(netns, &["-f", "-"], Some(&rules));
        AddressedCounter {
            netns: netns.to_owned(),
        }
    }

    pub fn read(&self) -> Addressed {
        let listing = nft(
            &self.netns,
            &["-j", "list", "table", "netdev", "xbr_addressed"],
            None,
        );
        let mut addressed = Addressed::default();
        for (comment, packets) in rule_counters(&listing) {
            match comment.as_str() {
                "to_me" => addressed.to_me = packets,
                "to_others" => addressed.to_others = packets,
                other => panic!("unexpected witness rule {other:?}"),
            }
        }
        addressed
    }
}

/// Counts UDP frames to `port` that the bridge in `netns` forwards between its ports
/// (nftables, bridge family, forward hook): one stream's frames that left the fast path.
pub struct BridgeUdpForwardCounter {
    netns: String,
    table: String,
}

impl BridgeUdpForwardCounter {
    pub fn install(netns: &str, port: u16) -> BridgeUdpForwardCounter {
        let table = format!("xbr_udp_{port}");
        let rules = format!(
            "table bridge {table} {{\n chain forward {{\n  type filter hook forward priority 0; policy accept;\n  \
             udp dport {port} counter comment \"udp\"\n }}\n}}\n"
        );
        nft(netns, &["-f", "-"], Some(&rules));
        BridgeUdpForwardCounter {
            netns: netns.to_owned(),
            table,
        }
    }

    pub fn read(&self) -> u64 {
        let listing = nft(
            &self.netns,
            &["-j", "list", "table", "bridge", &self.table],
            None,
        );
        rule_counters(&listing)
            .into_iter()
            .map(|(_, packets)| packets)
            .sum()
    }
}

/// (comment, packets) of each rule with a counter in `nft -j list table` output.
fn rule_counters(listing: &str) -> Vec<(String, u64)> {
    let json: serde_json::Value = serde_json::from_str(listing).expect("nft -j prints JSON");
    json["nftables"]
        .as_array()
        .expect("nftables array")
        .iter()
        .filter_map(|item| {
            let expr = item["rule"]["expr"].as_array()?;
            let packets = expr.iter().find_map(|e| e["counter"]["packets"].as_u64())?;
            let comment = item["rule"]["comment"].as_str().unwrap_or("").to_owned();
            Some((comment, packets))
        })
        .collect()
}

/// A steady UDP stream from `client` to `server_ip:port` in `server`, each datagram numbered;
/// `finish` stops it and returns (sent, received).
pub struct UdpStream {
    stop: std::sync::Arc<std::sync::atomic::AtomicBool>,
    sender: std::thread::JoinHandle<u64>,
    receiver: std::thread::JoinHandle<u64>,
}

impl UdpStream {
    pub fn start(
        client: &NetNs,
        server: &NetNs,
        server_ip: Ipv4Addr,
        port: u16,
        interval: Duration,
    ) -> UdpStream {
        use std::sync::atomic::{AtomicBool, Ordering};
        let socket = server
            .run(|| UdpSocket::bind((server_ip, port)))
            .expect("enter server namespace")
            .expect("bind UDP receiver");
        socket
            .set_read_timeout(Some(Duration::from_millis(200)))
            .unwrap();
        // A large receive buffer, so that a receiver starved by a busy machine does not drop:
        // the stream is judged by what the network delivered, not by the scheduler.
        force_receive_buffer(&socket);
        let stop = std::sync::Arc::new(AtomicBool::new(false));
        let receiver_stop = stop.clone();
        let receiver = std::thread::spawn(move || {
            let mut received = 0u64;
            let mut buffer = [0u8; 64];
            // After the sender stops, drain until the wire is quiet.
            loop {
                match socket.recv(&mut buffer) {
                    Ok(_) => received += 1,
                    Err(_) if receiver_stop.load(Ordering::Relaxed) => break,
                    Err(_) => {}
                }
            }
            received
        });
        let sender_socket = client
            .run(|| UdpSocket::bind((Ipv4Addr::UNSPECIFIED, 0)))
            .expect("enter client namespace")
            .expect("bind UDP sender");
        let sender_stop = stop.clone();
        let sender = std::thread::spawn(move || {
            let mut sent = 0u64;
            while !sender_stop.load(Ordering::Relaxed) {
                sender_socket
                    .send_to(&sent.to_be_bytes(), (server_ip, port))
                    .expect("send datagram");
                sent += 1;
                std::thread::sleep(interval);
            }
            sent
        });
        UdpStream {
            stop,
            sender,
            receiver,
        }
    }

    pub fn finish(self) -> (u64, u64) {
        self.stop.store(true, std::sync::atomic::Ordering::Relaxed);
        let sent = self.sender.join().expect("sender thread");
        let received = self.receiver.join().expect("receiver thread");
        (sent, received)
    }
}

/// A pin root of a test's own (parallel tests never share one) for `xbr -n NETNS`; the bridge
/// `br0` is detached and the root removed on drop, on every path.
pub struct PinRoot {
    pub path: PathBuf,
    pub netns: String,
}

impl PinRoot {
    pub fn new(netns: &str) -> PinRoot {
        let path = PathBuf::from(format!(
            "/sys/fs/bpf/{}",
            crate::lab_support::unique_name("xbrtest")
        ));
        PinRoot {
            path,
            netns: netns.to_owned(),
        }
    }

    pub fn arg(&self) -> &str {
        self.path.to_str().expect("UTF-8 pin root")
    }

    /// `-n NETNS --pin-root ROOT ARGS...`
    pub fn args<'a>(&'a self, args: &[&'a str]) -> Vec<&'a str> {
        let mut full = vec!["-n", self.netns.as_str(), "--pin-root", self.arg()];
        full.extend_from_slice(args);
        without_root_cgroup(&full)
    }

    /// `xbr -n NETNS --pin-root ROOT ARGS...` as (code, stdout, stderr).
    pub fn xbr(&self, args: &[&str]) -> (i32, String, String) {
        xbr(&self.args(args))
    }

    pub fn xbr_ok(&self, args: &[&str]) -> String {
        xbr_ok(&self.args(args))
    }

    pub fn status(&self) -> serde_json::Value {
        serde_json::from_str(&self.xbr_ok(&["status", "--json"])).expect("status --json")
    }

    /// Endpoint MAC per port name, from `xbr status --json`.
    pub fn endpoints(&self) -> std::collections::BTreeMap<String, String> {
        let status = self.status();
        let mut endpoints = std::collections::BTreeMap::new();
        for bridge in status["bridges"].as_array().into_iter().flatten() {
            for port in bridge["ports"].as_array().into_iter().flatten() {
                if let Some(mac) = port["endpoint_mac"].as_str() {
                    endpoints.insert(port["name"].as_str().unwrap().to_owned(), mac.to_owned());
                }
            }
        }
        endpoints
    }
}

impl Drop for PinRoot {
    fn drop(&mut self) {
        xbr_quietly(&self.args(&["detach", "br0"]));
        let _ = std::fs::remove_dir_all(&self.path);
    }
}

/// Polls `done` until it holds; panics naming `what` after `limit`. Returns how long it took.
pub fn wait_for(what: &str, limit: Duration, mut done: impl FnMut() -> bool) -> Duration {
    let started = std::time::Instant::now();
    while !done() {
        assert!(
            started.elapsed() < limit,
            "{what} did not happen within {limit:?}"
        );
        std::thread::sleep(Duration::from_millis(5));
    }
    started.elapsed()
}

/// Gives `socket` a 16 MB receive buffer (past the sysctl limit), so that datagrams wait in it
/// however late a receiver on a busy machine reads them: a test then judges what the network
/// delivered, not the scheduler.
pub fn force_receive_buffer(socket: &std::net::UdpSocket) {
    let size: libc::c_int = 16 << 20;
    // SAFETY: the option value and its length describe `size`.
    let rc = unsafe {
        libc::setsockopt(
            std::os::fd::AsRawFd::as_raw_fd(socket),
            libc::SOL_SOCKET,
            libc::SO_RCVBUFFORCE,
            (&size as *const libc::c_int).cast(),
            std::mem::size_of::<libc::c_int>() as libc::socklen_t,
        )
    };
    assert_eq!(rc, 0, "SO_RCVBUFFORCE: {}", std::io::Error::last_os_error());
}

/// `GET /metrics` from a follower's `--metrics 127.0.0.1:9477`, inside `netns`.
pub fn scrape_metrics(netns: &str) -> String {
    use std::io::{Read as _, Write as _};
    xbr::netns::NetNs::open(netns)
        .unwrap()
        .run(|| {
            let mut stream =
                std::net::TcpStream::connect("127.0.0.1:9477").expect("the metrics port");
            stream
                .write_all(b"GET /metrics HTTP/1.0\r\nHost: localhost\r\n\r\n")
                .unwrap();
            let mut response = String::new();
            stream.read_to_string(&mut response).unwrap();
            response
        })
        .unwrap()
}

/// A UDP stream from container a to b of a lab (a datagram a millisecond), already running
/// for 300 ms when returned.
pub fn stream_a_to_b(spec: &xbr::lab::LabSpec, port: u16) -> UdpStream {
    let ns = |name: &str| xbr::netns::NetNs::open(&spec.container_netns(name)).unwrap();
    let server_ip = spec.container("b").unwrap().address.addr;
    let stream = UdpStream::start(
        &ns("a"),
        &ns("b"),
        server_ip,
        port,
        Duration::from_millis(1),
    );
    std::thread::sleep(Duration::from_millis(300));
    stream
}
