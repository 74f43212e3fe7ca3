//! A Docker daemon of a test's own: installed from Debian when missing, started with its own
//! data root, exec root, pidfile, socket, address pool and a bridge the test made (so a real
//! docker0 is never touched); stopped by pid, with everything it and the test made removed on
//! drop, panics included. Plus the outside world of a published port (a namespace behind a
//! veth uplink), servers inside containers, clients, and the iptables witnesses.

use crate::witness::{Follower, xbr_binary};
use serde_json::Value;
use std::{
    fs::File,
    io::{Read as _, Write as _},
    net::{Ipv4Addr, Shutdown, SocketAddr, TcpListener, TcpStream, UdpSocket},
    os::fd::AsRawFd as _,
    path::{Path, PathBuf},
    process::{Child, Command, Output, Stdio},
    sync::{
        Arc,
        atomic::{AtomicBool, Ordering},
    },
    thread::JoinHandle,
    time::{Duration, Instant},
};

use xbr::netns::NetNs;

/// Only one test process at a time runs a Docker daemon here: each one rewrites the root
/// namespace's iptables chains, which the daemons would otherwise fight over.
const LOCK: &str = "/run/lock/xbr-docker-test.lock";
const DOCKERD: &str = "/usr/sbin/dockerd";
/// Not the `docker` first on PATH: on these machines that is a shim for another service.
const DOCKER: &str = "/usr/bin/docker";
const BUSYBOX: &str = "/bin/busybox";
/// The default network's bridge address (Docker takes its subnet from it) and the pool of
/// user networks; the outside namespace's link. Private ranges only this test uses.
pub const BRIDGE_ADDRESS: &str = "10.213.0.1/24";
const ADDRESS_POOL: &str = "base=10.214.0.0/16,size=24";
pub const UPLINK_HOST_IP: Ipv4Addr = Ipv4Addr::new(10, 215, 0, 1);
pub const OUTSIDE_IP: Ipv4Addr = Ipv4Addr::new(10, 215, 0, 2);
/// What busybox httpd serves from the image.
pub const INDEX_HTML: &str = "served by busybox httpd in an xbr test container\n";

/// Runs a command; returns its output whatever the exit status.
fn output(program: &str, args: &[&str]) -> Output {
    Command::new(program)
        .args(args)
        .output()
        .unwrap_or_else(|e| panic!("cannot run {program}: {e}"))
}

/// Runs a command and panics with its stderr unless it succeeds; returns stdout.
pub fn run(program: &str, args: &[&str]) -> String {
    let out = output(program, args);
    assert!(
        out.status.success(),
        "`{program} {}` failed: {}",
        args.join(" "),
        String::from_utf8_lossy(&out.stderr).trim()
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// Runs a command for cleanup: never panics, ignores the outcome.
fn quietly(program: &str, args: &[&str]) -> Option<String> {
    let out = Command::new(program).args(args).output().ok()?;
    out.status
        .success()
        .then(|| String::from_utf8_lossy(&out.stdout).into_owned())
}

/// Installs Debian's docker.io (and busybox-static for the image) when missing; `Err` says
/// why Docker cannot be had on this machine.
pub fn ensure_installed() -> Result<(), String> {
    let present = || {
        [DOCKERD, DOCKER, BUSYBOX]
            .iter()
            .all(|p| Path::new(p).exists())
    };
    if present() {
        return Ok(());
    }
    let apt = |args: &[&str]| {
        Command::new("apt-get")
            .args(args)
            .env("DEBIAN_FRONTEND", "noninteractive")
            .output()
            .map_err(|e| format!("cannot run apt-get: {e}"))
    };
    let install = ["install", "-y", "-q", "docker.io", "busybox-static"];
    let first = apt(&install)?;
    if !first.status.success() {
        // The package lists may be stale or missing.
        apt(&["update", "-q"])?;
        let second = apt(&install)?;
        if !second.status.success() {
            return Err(format!(
                "`apt-get install docker.io busybox-static` failed: {}",
                String::from_utf8_lossy(&second.stderr).trim()
            ));
        }
    }
    if present() {
        Ok(())
    } else {
        Err(format!(
            "docker.io installed, but {DOCKERD}, {DOCKER} or {BUSYBOX} is missing"
        ))
    }
}

/// An exclusive lock across processes, released when dropped (or when the process dies).
/// The holder removes the lock file on drop, so nothing is left on the machine; a waiter that
/// locked a file removed meanwhile notices (the path names another inode) and tries again.
struct MachineLock {
    file: File,
}

impl MachineLock {
    fn take() -> MachineLock {
        use std::os::unix::fs::MetadataExt as _;
        loop {
            let file = File::options()
                .create(true)
                .truncate(false)
                .write(true)
                .open(LOCK)
                .unwrap_or_else(|e| panic!("cannot open {LOCK}: {e}"));
            let rc = unsafe { libc::flock(file.as_raw_fd(), libc::LOCK_EX) };
            assert_eq!(rc, 0, "flock {LOCK}: {}", std::io::Error::last_os_error());
            let locked = file.metadata().map(|m| m.ino()).ok();
            let current = std::fs::metadata(LOCK).map(|m| m.ino()).ok();
            if locked.is_some() && locked == current {
                return MachineLock { file };
            }
        }
    }
}

impl Drop for MachineLock {
    fn drop(&mut self) {
        // Unlinked while still held: the next taker creates a fresh file.
        let _ = std::fs::remove_file(LOCK);
        let _ = &self.file;
    }
}

/// The root namespace's state that Docker changes and the test puts back.
struct HostState {
    ip_forward: String,
    /// Whether the nftables tables iptables uses existed before (ip filter, ip nat).
    filter_table: bool,
    nat_table: bool,
}

impl HostState {
    fn read() -> HostState {
        HostState {
            ip_forward: std::fs::read_to_string("/proc/sys/net/ipv4/ip_forward")
                .unwrap_or_else(|_| "0".to_owned()),
            filter_table: quietly("nft", &["list", "table", "ip", "filter"]).is_some(),
            nat_table: quietly("nft", &["list", "table", "ip", "nat"]).is_some(),
        }
    }
}

/// A running dockerd of this test's own. Its default network's bridge is `bridge`.
pub struct Dockerd {
    /// Unique per test process: in every name the test gives.
    pub tag: String,
    pub bridge: String,
    pub socket: PathBuf,
    dir: PathBuf,
    child: Option<Child>,
    host: HostState,
    _lock: MachineLock,
}

impl Dockerd {
    /// Starts the daemon (with Docker's default `--userland-proxy=true`), or says why Docker
    /// cannot run here.
    pub fn start() -> Result<Dockerd, String> {
        Dockerd::start_with(true)
    }

    /// Starts the daemon with `--userland-proxy=USERLAND_PROXY` (false: published ports are
    /// served to containers and the host by hairpin DNAT instead of docker-proxy).
    pub fn start_with(userland_proxy: bool) -> Result<Dockerd, String> {
        ensure_installed()?;
        let lock = MachineLock::take();
        // Both daemons would own the root namespace's DOCKER chains.
        if quietly("pgrep", &["-x", "dockerd"]).is_some() {
            return Err(
                "another dockerd runs on this machine; a second one would fight it over \
                        the iptables DOCKER chains"
                    .to_owned(),
            );
        }
        let pid = std::process::id();
        let tag = format!("{:05}", pid % 100_000);
        let dir = std::env::temp_dir().join(format!("xbr-docker-{pid}"));
        let mut daemon = Dockerd {
            bridge: format!("xbrd{tag}"),
            socket: PathBuf::from(format!("/run/xbr-test-docker-{pid}.sock")),
            tag,
            dir,
            child: None,
            host: HostState::read(),
            _lock: lock,
        };
        // From here on, Drop cleans up whatever was made.
        std::fs::create_dir_all(&daemon.dir).expect("create the daemon's directory");
        run("ip", &["link", "add", &daemon.bridge, "type", "bridge"]);
        run(
            "ip",
            &["addr", "add", BRIDGE_ADDRESS, "dev", &daemon.bridge],
        );
        run("ip", &["link", "set", &daemon.bridge, "up"]);
        let log = File::create(daemon.log_path()).expect("create the daemon's log");
        let socket = format!("unix://{}", daemon.socket.display());
        let child = Command::new(DOCKERD)
            .args([
                "--data-root",
                daemon.dir.join("data").to_str().unwrap(),
                "--exec-root",
                daemon.dir.join("exec").to_str().unwrap(),
                "--pidfile",
                daemon.dir.join("dockerd.pid").to_str().unwrap(),
                "-H",
                &socket,
                // A bridge the test made: dockerd never creates or touches docker0.
                "--bridge",
                &daemon.bridge,
                "--default-address-pool",
                ADDRESS_POOL,
                // Docker's real netfilter setup is what xbr is tested against.
                "--iptables=true",
                &format!("--userland-proxy={userland_proxy}"),
            ])
            .stdin(Stdio::null())
            .stdout(log.try_clone().unwrap())
            .stderr(log)
            .spawn()
            .map_err(|e| format!("cannot start {DOCKERD}: {e}"))?;
        daemon.child = Some(child);
        let started = Instant::now();
        loop {
            if daemon.cli_output(&["version"]).status.success() {
                return Ok(daemon);
            }
            let exited = daemon
                .child
                .as_mut()
                .and_then(|c| c.try_wait().ok().flatten());
            if exited.is_some() || started.elapsed() > Duration::from_secs(60) {
                return Err(format!(
                    "dockerd did not come up ({}); its log ends:\n{}",
                    match exited {
                        Some(status) => format!("exited with {status}"),
                        None => "no answer within 60 s".to_owned(),
                    },
                    daemon.log_tail(20)
                ));
            }
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    fn log_path(&self) -> PathBuf {
        self.dir.join("dockerd.log")
    }

    pub fn log_tail(&self, lines: usize) -> String {
        let log = std::fs::read_to_string(self.log_path()).unwrap_or_default();
        let all: Vec<&str> = log.lines().collect();
        all[all.len().saturating_sub(lines)..].join("\n")
    }

    /// `DOCKER_HOST` for this daemon.
    pub fn docker_host(&self) -> String {
        format!("unix://{}", self.socket.display())
    }

    fn cli_output(&self, args: &[&str]) -> Output {
        Command::new(DOCKER)
            .arg("-H")
            .arg(self.docker_host())
            .args(args)
            .output()
            .unwrap_or_else(|e| panic!("cannot run {DOCKER}: {e}"))
    }

    /// `docker ARGS...` against this daemon; panics unless it succeeds. Returns stdout, trimmed.
    pub fn cli(&self, args: &[&str]) -> String {
        let out = self.cli_output(args);
        assert!(
            out.status.success(),
            "`docker {}` failed: {}",
            args.join(" "),
            String::from_utf8_lossy(&out.stderr).trim()
        );
        String::from_utf8_lossy(&out.stdout).trim().to_owned()
    }

    /// Makes an image without a registry: `docker import` of a busybox-static rootfs with an
    /// index page for httpd. Returns its name.
    pub fn import_busybox(&self) -> String {
        let rootfs = self.dir.join("rootfs");
        std::fs::create_dir_all(rootfs.join("bin")).unwrap();
        std::fs::create_dir_all(rootfs.join("www")).unwrap();
        std::fs::copy(BUSYBOX, rootfs.join("bin/busybox")).expect("copy busybox");
        for applet in ["sh", "httpd", "sleep", "nc", "cat", "ip", "ping"] {
            std::os::unix::fs::symlink("busybox", rootfs.join("bin").join(applet)).unwrap();
        }
        std::fs::write(rootfs.join("www/index.html"), INDEX_HTML).unwrap();
        let tar = self.dir.join("rootfs.tar");
        run(
            "tar",
            &[
                "-C",
                rootfs.to_str().unwrap(),
                "-cf",
                tar.to_str().unwrap(),
                ".",
            ],
        );
        let image = format!("xbr-busybox:{}", self.tag);
        self.cli(&["import", tar.to_str().unwrap(), &image]);
        image
    }

    /// `docker run -d --name NAME ARGS...`; returns the container's id.
    pub fn run_container(&self, name: &str, args: &[&str]) -> String {
        let mut full = vec!["run", "-d", "--name", name];
        full.extend_from_slice(args);
        self.cli(&full)
    }

    /// The container's address on its (only) network.
    pub fn container_ip(&self, name: &str) -> Ipv4Addr {
        let ip = self.cli(&[
            "inspect",
            "-f",
            "{{range .NetworkSettings.Networks}}{{.IPAddress}}{{end}}",
            name,
        ]);
        ip.parse()
            .unwrap_or_else(|_| panic!("container {name} has address `{ip}`"))
    }

    /// The container's network namespace, mounted as a named one for the test (`ip netns
    /// attach`); unmounted on drop (the namespace lives on with the container).
    pub fn netns(&self, container: &str) -> ContainerNetns {
        let pid = self.cli(&["inspect", "-f", "{{.State.Pid}}", container]);
        let name = format!("xbrc{}-{container}", self.tag);
        run("ip", &["netns", "attach", &name, &pid]);
        ContainerNetns {
            netns: NetNs::open(&name).expect("the attached namespace opens"),
            name,
        }
    }

    /// Stops dockerd by pid (SIGTERM, then SIGKILL), and the containerd it started.
    fn stop(&mut self) {
        let Some(mut child) = self.child.take() else {
            return;
        };
        // dockerd writes the pid of the containerd it manages here.
        let containerd_pid =
            std::fs::read_to_string(self.dir.join("exec/containerd/containerd.pid"))
                .ok()
                .and_then(|p| p.trim().parse::<i32>().ok());
        unsafe { libc::kill(child.id() as i32, libc::SIGTERM) };
        let started = Instant::now();
        while child.try_wait().ok().flatten().is_none() {
            if started.elapsed() > Duration::from_secs(30) {
                let _ = child.kill();
                let _ = child.wait();
                break;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        if let Some(pid) = containerd_pid {
            // Only if it is still the containerd of this daemon's exec root.
            let cmdline = std::fs::read(format!("/proc/{pid}/cmdline")).unwrap_or_default();
            let exec_root = self.dir.join("exec");
            if String::from_utf8_lossy(&cmdline).contains(exec_root.to_str().unwrap()) {
                unsafe { libc::kill(pid, libc::SIGKILL) };
            }
        }
    }
}

impl Drop for Dockerd {
    fn drop(&mut self) {
        let host = self.docker_host();
        if self.child.is_some() {
            if let Some(ids) = quietly(DOCKER, &["-H", &host, "ps", "-aq"]) {
                let mut args = vec!["-H", host.as_str(), "rm", "-f"];
                args.extend(ids.split_whitespace());
                if args.len() > 4 {
                    quietly(DOCKER, &args);
                }
            }
            quietly(DOCKER, &["-H", &host, "network", "prune", "-f"]);
        }
        self.stop();
        unmount_below(&self.dir);
        remove_docker_rules(&self.bridge, &self.host);
        quietly("ip", &["link", "del", &self.bridge]);
        let _ = std::fs::write("/proc/sys/net/ipv4/ip_forward", &self.host.ip_forward);
        let _ = std::fs::remove_dir_all(&self.dir);
        let _ = std::fs::remove_file(&self.socket);
    }
}

/// Lazily unmounts whatever is still mounted under `dir` (a daemon killed hard leaves its
/// overlay and namespace mounts), deepest first.
fn unmount_below(dir: &Path) {
    let mounts = std::fs::read_to_string("/proc/self/mountinfo").unwrap_or_default();
    let mut below: Vec<String> = mounts
        .lines()
        .filter_map(|line| line.split_whitespace().nth(4))
        .filter(|point| Path::new(point).starts_with(dir))
        .map(str::to_owned)
        .collect();
    below.sort_by_key(|point| std::cmp::Reverse(point.len()));
    for point in below {
        if let Ok(point) = std::ffi::CString::new(point) {
            unsafe { libc::umount2(point.as_ptr(), libc::MNT_DETACH) };
        }
    }
}

/// Docker's chains and the rules that jump to them or name its bridge, in both tables; the
/// FORWARD policy back to ACCEPT; tables that did not exist before and are empty now, gone.
/// dockerd removes a network's rules with the network but leaves the default one's behind.
fn remove_docker_rules(bridge: &str, before: &HostState) {
    let chains = [
        "DOCKER",
        "DOCKER-USER",
        "DOCKER-ISOLATION-STAGE-1",
        "DOCKER-ISOLATION-STAGE-2",
    ];
    for table in ["filter", "nat"] {
        let Some(rules) = quietly("iptables", &["-t", table, "-S"]) else {
            continue;
        };
        for rule in rules.lines() {
            let Some(rest) = rule.strip_prefix("-A ") else {
                continue;
            };
            let chain = rest.split_whitespace().next().unwrap_or("");
            let ours = chains.contains(&chain)
                || rest.contains("DOCKER")
                || rest.split_whitespace().any(|word| word == bridge);
            if ours && !chains.contains(&chain) {
                let mut args = vec!["-t", table, "-D"];
                args.extend(rest.split_whitespace());
                quietly("iptables", &args);
            }
        }
        for chain in chains {
            quietly("iptables", &["-t", table, "-F", chain]);
        }
        for chain in chains {
            quietly("iptables", &["-t", table, "-X", chain]);
        }
    }
    quietly("iptables", &["-P", "FORWARD", "ACCEPT"]);
    for (table, existed) in [("filter", before.filter_table), ("nat", before.nat_table)] {
        let empty = quietly("iptables", &["-t", table, "-S"]).is_some_and(|rules| {
            rules
                .lines()
                .all(|line| line.starts_with("-P ") && line.ends_with("ACCEPT"))
        });
        if !existed && empty {
            quietly("nft", &["delete", "table", "ip", table]);
        }
    }
}

/// A container's network namespace under a name, for `NetNs::run`.
pub struct ContainerNetns {
    pub netns: NetNs,
    name: String,
}

impl Drop for ContainerNetns {
    fn drop(&mut self) {
        quietly("ip", &["netns", "delete", &self.name]);
    }
}

/// An outside client's world: a namespace behind a veth pair, the host end (`uplink`, with
/// `host_ip`/24) in the root namespace and eth0 (`outside_ip`, default route via the host) in
/// the namespace.
pub struct Outside {
    pub netns: NetNs,
    pub uplink: String,
    pub host_ip: Ipv4Addr,
}

impl Outside {
    /// The test's main outside: namespace `xbro<tag>` behind uplink `xbru<tag>`, 10.215.0.0/24.
    pub fn create(tag: &str) -> Outside {
        Outside::create_named(
            &format!("xbro{tag}"),
            &format!("xbru{tag}"),
            UPLINK_HOST_IP,
            OUTSIDE_IP,
        )
    }

    pub fn create_named(
        name: &str,
        uplink: &str,
        host_ip: Ipv4Addr,
        outside_ip: Ipv4Addr,
    ) -> Outside {
        let outside = Outside {
            netns: NetNs::create(name).expect("create the outside namespace"),
            uplink: uplink.to_owned(),
            host_ip,
        };
        run(
            "ip",
            &[
                "link", "add", uplink, "type", "veth", "peer", "name", "eth0", "netns", name,
            ],
        );
        run(
            "ip",
            &["addr", "add", &format!("{host_ip}/24"), "dev", uplink],
        );
        run("ip", &["link", "set", uplink, "up"]);
        run(
            "ip",
            &[
                "-n",
                name,
                "addr",
                "add",
                &format!("{outside_ip}/24"),
                "dev",
                "eth0",
            ],
        );
        run("ip", &["-n", name, "link", "set", "eth0", "up"]);
        run("ip", &["-n", name, "link", "set", "lo", "up"]);
        run(
            "ip",
            &[
                "-n",
                name,
                "route",
                "add",
                "default",
                "via",
                &host_ip.to_string(),
            ],
        );
        outside
    }
}

impl Drop for Outside {
    fn drop(&mut self) {
        let _ = NetNs::delete(self.netns.name());
        quietly("ip", &["link", "del", &self.uplink]);
    }
}

/// A TCP echo server in a namespace, one connection at a time (the clients here are
/// sequential; no thread start per connection blurs a connections/s figure); stops on drop.
pub struct TcpEcho {
    listener: TcpListener,
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<()>>,
}

impl TcpEcho {
    pub fn start(netns: &NetNs, ip: Ipv4Addr, port: u16) -> TcpEcho {
        let listener = netns
            .run(|| TcpListener::bind((ip, port)))
            .expect("enter the server's namespace")
            .unwrap_or_else(|e| panic!("bind {ip}:{port} in {}: {e}", netns.name()));
        let stop = Arc::new(AtomicBool::new(false));
        let accepting = listener.try_clone().unwrap();
        let stopped = stop.clone();
        let thread = std::thread::spawn(move || {
            while let Ok((stream, _)) = accepting.accept() {
                if stopped.load(Ordering::Relaxed) {
                    break;
                }
                echo(stream);
            }
        });
        TcpEcho {
            listener,
            stop,
            thread: Some(thread),
        }
    }
}

fn echo(mut stream: TcpStream) {
    let _ = stream.set_nodelay(true);
    // A client that vanishes without closing holds the server up this long at most.
    let _ = stream.set_read_timeout(Some(Duration::from_secs(5)));
    let mut buffer = [0u8; 16 * 1024];
    while let Ok(n) = stream.read(&mut buffer) {
        if n == 0 || stream.write_all(&buffer[..n]).is_err() {
            break;
        }
    }
}

impl Drop for TcpEcho {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        // shutdown() on a listening socket wakes a blocked accept() (Linux).
        unsafe { libc::shutdown(self.listener.as_raw_fd(), libc::SHUT_RDWR) };
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

/// A UDP echo server in a namespace; stops on drop.
pub struct UdpEcho {
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<()>>,
}

impl UdpEcho {
    pub fn start(netns: &NetNs, ip: Ipv4Addr, port: u16) -> UdpEcho {
        let socket = netns
            .run(|| UdpSocket::bind((ip, port)))
            .expect("enter the server's namespace")
            .unwrap_or_else(|e| panic!("bind udp {ip}:{port} in {}: {e}", netns.name()));
        socket
            .set_read_timeout(Some(Duration::from_millis(100)))
            .unwrap();
        let stop = Arc::new(AtomicBool::new(false));
        let stopped = stop.clone();
        let thread = std::thread::spawn(move || {
            let mut buffer = [0u8; 2048];
            while !stopped.load(Ordering::Relaxed) {
                if let Ok((n, from)) = socket.recv_from(&mut buffer) {
                    let _ = socket.send_to(&buffer[..n], from);
                }
            }
        });
        UdpEcho {
            stop,
            thread: Some(thread),
        }
    }
}

impl Drop for UdpEcho {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

/// Runs `f` in `netns`, or here when `None`.
fn in_netns<T: Send>(netns: Option<&NetNs>, f: impl FnOnce() -> T + Send) -> T {
    match netns {
        Some(netns) => netns.run(f).expect("enter the client's namespace"),
        None => f(),
    }
}

/// One connection: connect, send `payload`, read it back, close. `Err` when anything fails
/// within `timeout` (a dropped SYN, a reset, a short answer).
pub fn tcp_exchange(
    netns: Option<&NetNs>,
    to: SocketAddr,
    payload: &[u8],
    timeout: Duration,
) -> std::io::Result<()> {
    in_netns(netns, || {
        let mut stream = TcpStream::connect_timeout(&to, timeout)?;
        exchange(&mut stream, payload, timeout)
    })
}

fn exchange(stream: &mut TcpStream, payload: &[u8], timeout: Duration) -> std::io::Result<()> {
    stream.set_read_timeout(Some(timeout))?;
    stream.set_nodelay(true)?;
    stream.write_all(payload)?;
    let mut back = vec![0u8; payload.len()];
    stream.read_exact(&mut back)?;
    if back != payload {
        return Err(std::io::Error::other("the echo differs from what was sent"));
    }
    Ok(())
}

/// `GET /` over HTTP/1.0; returns the body.
pub fn http_get(netns: Option<&NetNs>, to: SocketAddr) -> std::io::Result<String> {
    in_netns(netns, || {
        let mut stream = TcpStream::connect_timeout(&to, Duration::from_secs(3))?;
        stream.set_read_timeout(Some(Duration::from_secs(3)))?;
        stream.write_all(b"GET /index.html HTTP/1.0\r\n\r\n")?;
        let mut response = String::new();
        stream.read_to_string(&mut response)?;
        Ok(response
            .split_once("\r\n\r\n")
            .map(|(_, body)| body.to_owned())
            .unwrap_or(response))
    })
}

/// `count` datagrams to `to`, each awaited; returns how many came back.
pub fn udp_exchange(netns: Option<&NetNs>, to: SocketAddr, count: usize) -> usize {
    in_netns(netns, || {
        let socket = UdpSocket::bind((Ipv4Addr::UNSPECIFIED, 0)).expect("bind a UDP client");
        socket
            .set_read_timeout(Some(Duration::from_millis(500)))
            .unwrap();
        let mut answered = 0;
        let mut buffer = [0u8; 256];
        for i in 0..count {
            let payload = format!("datagram {i}");
            let _ = socket.send_to(payload.as_bytes(), to);
            if let Ok(n) = socket.recv(&mut buffer)
                && &buffer[..n] == payload.as_bytes()
            {
                answered += 1;
            }
        }
        answered
    })
}

/// A measured rate: `count` operations in `elapsed`.
#[derive(Clone, Copy, Debug)]
pub struct Rate {
    pub count: u64,
    pub failed: u64,
    pub elapsed: Duration,
}

impl Rate {
    pub fn per_second(&self) -> f64 {
        self.count as f64 / self.elapsed.as_secs_f64()
    }
}

/// Connections per second: connect, a 64-byte request, its echo, close; one after another,
/// at most `count` of them and for at most `limit`.
pub fn connection_rate(netns: Option<&NetNs>, to: SocketAddr, count: u64, limit: Duration) -> Rate {
    in_netns(netns, || {
        let payload = [0x5au8; 64];
        let started = Instant::now();
        let (mut done, mut failed) = (0, 0);
        while done < count && started.elapsed() < limit {
            match TcpStream::connect_timeout(&to, Duration::from_secs(1))
                .and_then(|mut s| exchange(&mut s, &payload, Duration::from_secs(1)))
            {
                Ok(()) => done += 1,
                Err(_) => failed += 1,
            }
        }
        Rate {
            count: done,
            failed,
            elapsed: started.elapsed(),
        }
    })
}

/// Requests per second on one connection: a 64-byte request and its echo, one after another,
/// at most `count` of them and for at most `limit`.
pub fn request_rate(netns: Option<&NetNs>, to: SocketAddr, count: u64, limit: Duration) -> Rate {
    in_netns(netns, || {
        let payload = [0xa5u8; 64];
        let mut stream =
            TcpStream::connect_timeout(&to, Duration::from_secs(2)).expect("connect for requests");
        let started = Instant::now();
        let (mut done, mut failed) = (0, 0);
        while done < count && started.elapsed() < limit {
            match exchange(&mut stream, &payload, Duration::from_secs(1)) {
                Ok(()) => done += 1,
                Err(_) => {
                    failed += 1;
                    break;
                }
            }
        }
        let _ = stream.shutdown(Shutdown::Both);
        Rate {
            count: done,
            failed,
            elapsed: started.elapsed(),
        }
    })
}

/// Packets counted by the iptables rule of `table`/`chain` whose listing line contains every
/// one of `words` (`iptables -L CHAIN -v -x -n`); `None` when no rule matches.
pub fn rule_packets(table: &str, chain: &str, words: &[&str]) -> Option<u64> {
    let listing = run("iptables", &["-t", table, "-L", chain, "-v", "-x", "-n"]);
    listing
        .lines()
        .skip(2)
        .find(|line| {
            let fields: Vec<&str> = line.split_whitespace().collect();
            words.iter().all(|word| fields.contains(word))
        })
        .and_then(|line| line.split_whitespace().next()?.parse().ok())
}

/// Packets of Docker's DNAT rule for `host_port` (nat table, DOCKER chain).
pub fn dnat_packets(host_port: u16) -> u64 {
    let port = format!("dpt:{host_port}");
    rule_packets("nat", "DOCKER", &["DNAT", &port])
        .unwrap_or_else(|| panic!("Docker has no DNAT rule for port {host_port}"))
}

/// An iptables rule the test inserted; deleted on drop.
pub struct InsertedRule {
    chain: String,
    rule: Vec<String>,
}

impl InsertedRule {
    /// `iptables -I CHAIN RULE...` (filter table).
    pub fn insert(chain: &str, rule: &[&str]) -> InsertedRule {
        let mut args = vec!["-I", chain];
        args.extend_from_slice(rule);
        run("iptables", &args);
        InsertedRule {
            chain: chain.to_owned(),
            rule: rule.iter().map(|s| (*s).to_owned()).collect(),
        }
    }
}

impl Drop for InsertedRule {
    fn drop(&mut self) {
        let mut args = vec!["-D", self.chain.as_str()];
        args.extend(self.rule.iter().map(String::as_str));
        quietly("iptables", &args);
    }
}

/// A native nftables table in this namespace, deleted on drop.
pub struct NftTable {
    family_and_name: String,
}

impl NftTable {
    /// The test process's table name, so parallel runs never share one.
    pub fn name() -> String {
        format!("xbr_test_{}", std::process::id())
    }

    /// Loads `ruleset` (one `table FAMILY NAME { ... }`) with `nft -f -`.
    pub fn add(ruleset: &str) -> NftTable {
        let mut nft = std::process::Command::new("nft")
            .args(["-f", "-"])
            .stdin(std::process::Stdio::piped())
            .spawn()
            .expect("run nft");
        use std::io::Write as _;
        nft.stdin
            .take()
            .unwrap()
            .write_all(ruleset.as_bytes())
            .unwrap();
        assert!(nft.wait().unwrap().success(), "nft -f: {ruleset}");
        let header = ruleset.split('{').next().unwrap().trim();
        NftTable {
            family_and_name: header.trim_start_matches("table").trim().to_owned(),
        }
    }
}

impl Drop for NftTable {
    fn drop(&mut self) {
        let mut args = vec!["delete", "table"];
        args.extend(self.family_and_name.split_whitespace());
        quietly("nft", &args);
    }
}

/// `xbr --pin-root ROOT attach BRIDGE --follow EXTRA...` against this Docker (DOCKER_HOST);
/// killed by pid on drop if still running.
pub fn docker_follower(
    docker_host: &str,
    pin_root: &Path,
    bridge: &str,
    extra: &[&str],
) -> Follower {
    let root = pin_root.to_str().expect("UTF-8 pin root");
    let mut args = vec!["--pin-root", root, "attach", bridge, "--follow"];
    args.extend_from_slice(extra);
    Follower::spawn(
        &[("DOCKER_HOST", docker_host)],
        &args,
        Duration::from_secs(20),
    )
}

/// `xbr` against the test's Docker and pin root; detaches what it attached on drop.
pub struct Xbr {
    root: PathBuf,
    docker_host: String,
    attached: Vec<String>,
}

impl Xbr {
    pub fn new(docker: &Dockerd) -> Xbr {
        Xbr {
            root: PathBuf::from(format!("/sys/fs/bpf/xbrdocker{}", docker.tag)),
            docker_host: docker.docker_host(),
            attached: Vec::new(),
        }
    }

    pub fn run(&self, args: &[&str]) -> (i32, String, String) {
        let output = std::process::Command::new(xbr_binary())
            .env("DOCKER_HOST", &self.docker_host)
            .arg("--pin-root")
            .arg(&self.root)
            .args(crate::witness::without_root_cgroup(args))
            .output()
            .expect("run xbr");
        (
            output.status.code().unwrap_or(-1),
            String::from_utf8_lossy(&output.stdout).into_owned(),
            String::from_utf8_lossy(&output.stderr).into_owned(),
        )
    }

    pub fn ok(&self, args: &[&str]) -> String {
        let (code, stdout, stderr) = self.run(args);
        assert_eq!(code, 0, "`xbr {}` failed: {stderr}", args.join(" "));
        stdout
    }

    /// `xbr attach BRIDGE ARGS...`, detached again on drop.
    pub fn attach(&mut self, bridge: &str, args: &[&str]) -> String {
        self.attached.push(bridge.to_owned());
        let mut full = vec!["attach", bridge];
        full.extend_from_slice(args);
        self.ok(&full)
    }

    pub fn follow(&mut self, bridge: &str, uplink: &str) -> Follower {
        self.follow_with(bridge, &["--uplink", uplink])
    }

    /// `xbr attach BRIDGE --follow EXTRA...` (e.g. `--uplink IFACE --cgroup DIR`), detached
    /// again on drop.
    pub fn follow_with(&mut self, bridge: &str, extra: &[&str]) -> Follower {
        self.attached.push(bridge.to_owned());
        docker_follower(&self.docker_host, &self.root, bridge, extra)
    }

    pub fn bridge_status(&self, bridge: &str) -> Value {
        let status: Value =
            serde_json::from_str(&self.ok(&["status", bridge, "--json"])).expect("status --json");
        status["bridges"][0].clone()
    }

    pub fn published(&self, bridge: &str) -> Vec<String> {
        self.bridge_status(bridge)["published"]
            .as_array()
            .into_iter()
            .flatten()
            .filter_map(|p| p["spec"].as_str().map(str::to_owned))
            .collect()
    }

    pub fn stats(&self, bridge: &str) -> Value {
        serde_json::from_str(&self.ok(&["stats", bridge, "--json"])).expect("stats --json")
    }

    pub fn nat_in(&self, bridge: &str) -> u64 {
        self.stats(bridge)["verdicts"][0]["nat_in"]
            .as_u64()
            .expect("nat_in counter")
    }

    /// Frames the fast path delivered into containers of `bridge`, all ports.
    pub fn delivered(&self, bridge: &str) -> u64 {
        self.stats(bridge)["endpoints"]
            .as_array()
            .into_iter()
            .flatten()
            .filter_map(|e| e["delivered_packets"].as_u64())
            .sum()
    }
}

impl Drop for Xbr {
    fn drop(&mut self) {
        for bridge in &self.attached {
            let _ = std::process::Command::new(xbr_binary())
                .arg("--pin-root")
                .arg(&self.root)
                .args(["detach", bridge])
                .output();
        }
        let _ = std::fs::remove_dir_all(&self.root);
    }
}
