//! xbr-cni under a real runtime (run as root): podman 4.3 with its CNI backend, pointed at the
//! test's own files only (containers.conf through CONTAINERS_CONF, `--network-config-dir`,
//! storage under `--root`), runs two containers on a network whose plugin list ends in xbr-cni.
//! Their traffic takes the fast path (xbr's counters grow, an nftables counter on the bridge
//! stays flat), a published port works (from the host through portmap, from outside through
//! the uplink through xbr's NAT), and `podman stop`/`rm`/`restart`/`network reload`
//! leave exactly the live containers as endpoints; `podman network rm` leaves no xbr state.

use std::{
    collections::BTreeSet,
    io::{Read as _, Write as _},
    net::{Ipv4Addr, SocketAddr, TcpStream},
    path::{Path, PathBuf},
    process::{Command, Output},
    time::Duration,
};

use serde_json::{Value, json};
use xbr::netns::NetNs;
use xbr_tests::{
    cni_driver::{SYSTEM_PLUGIN_DIR, SYSTEM_PLUGINS, TempDir, verdict_total, xbr_cni_binary},
    lab_support::unique_name,
    skip::skip,
    witness::{first_counter, tcp_echo, xbr, xbr_quietly},
};

const TEST: &str = "podman_containers_take_the_fast_path_through_their_lifecycle";
const IMAGE: &str = "localhost/xbr-cni-test-bb:latest";
const HTTP_PORT: u16 = 8000;
/// The same server on a port nobody publishes: east-west traffic to it takes the fast path
/// both ways. (Replies from HTTP_PORT do not: portmap DNATs connections to it, and the
/// kernel's conntrack must translate a hairpin connection's replies back, so frames from a
/// DNAT target's port stay on the kernel path.)
const EAST_WEST_PORT: u16 = 8001;

/// The CNI plugins' skeleton chains in the root namespace's iptables, which they leave
/// behind after the last DEL (the recipe's cleanup); removed only when the test made them.
const FILTER_JUMP: &str =
    "FORWARD -m comment --comment \"CNI firewall plugin rules\" -j CNI-FORWARD";
const NAT_JUMPS: [&str; 3] = [
    "PREROUTING -m addrtype --dst-type LOCAL -j CNI-HOSTPORT-DNAT",
    "OUTPUT -m addrtype --dst-type LOCAL -j CNI-HOSTPORT-DNAT",
    "POSTROUTING -m comment --comment \"CNI portfwd requiring masquerade\" -j CNI-HOSTPORT-MASQ",
];

fn cni_chains_present() -> bool {
    let run = |table: &str| {
        Command::new("iptables-save")
            .args(["-t", table])
            .output()
            .map(|o| String::from_utf8_lossy(&o.stdout).contains(":CNI-"))
            .unwrap_or(false)
    };
    run("filter") || run("nat")
}

/// Removes the skeleton chains, unless some container's rules still use them.
fn remove_cni_skeleton() {
    let listing = |table: &str| {
        Command::new("iptables-save")
            .args(["-t", table])
            .output()
            .map(|o| String::from_utf8_lossy(&o.stdout).into_owned())
            .unwrap_or_default()
    };
    let in_use = |text: &str| {
        text.lines()
            .any(|l| l.starts_with("-A CNI-") && (l.contains("-j CNI-DN-") || l.contains("-d ")))
    };
    let iptables = |args: &str| {
        let _ = Command::new("sh")
            .arg("-c")
            .arg(format!("iptables {args} 2>/dev/null"))
            .status();
    };
    if !in_use(&listing("filter")) {
        iptables(&format!("-D {FILTER_JUMP}"));
        for chain in ["CNI-FORWARD", "CNI-ADMIN"] {
            iptables(&format!("-F {chain}"));
            iptables(&format!("-X {chain}"));
        }
    }
    if !in_use(&listing("nat")) {
        for jump in NAT_JUMPS {
            iptables(&format!("-t nat -D {jump}"));
        }
        for chain in [
            "CNI-HOSTPORT-DNAT",
            "CNI-HOSTPORT-MASQ",
            "CNI-HOSTPORT-SETMARK",
        ] {
            iptables(&format!("-t nat -F {chain}"));
            iptables(&format!("-t nat -X {chain}"));
        }
    }
}

/// Counts IPv4 unicast frames between the test's containers that a bridge forwards between
/// its ports (nftables, bridge family, forward hook, in the root namespace where podman made
/// the bridge; by subnet, since this kernel's nft has no `meta ibrname`).
struct BridgeWitness {
    table: String,
}

impl BridgeWitness {
    fn install(subnet: &str) -> BridgeWitness {
        let table = unique_name("xbrpodman");
        let rules = format!(
            "table bridge {table} {{\n chain forward {{\n  type filter hook forward priority 0; policy accept;\n  \
             ether daddr & 01:00:00:00:00:00 == 00:00:00:00:00:00 ip saddr {subnet} ip daddr {subnet} counter\n }}\n}}\n"
        );
        let mut child = Command::new("nft")
            .args(["-f", "-"])
            .stdin(std::process::Stdio::piped())
            .spawn()
            .expect("run nft");
        child
            .stdin
            .take()
            .unwrap()
            .write_all(rules.as_bytes())
            .unwrap();
        assert!(child.wait().unwrap().success(), "nft rejected {rules}");
        BridgeWitness { table }
    }

    fn read(&self) -> u64 {
        let output = Command::new("nft")
            .args(["-j", "list", "table", "bridge", &self.table])
            .output()
            .expect("run nft");
        first_counter(&output.stdout)
    }
}

impl Drop for BridgeWitness {
    fn drop(&mut self) {
        let _ = Command::new("nft")
            .args(["delete", "table", "bridge", &self.table])
            .output();
    }
}

/// podman with the test's own configuration, storage and CNI network; on drop everything it
/// made goes: containers, network (conflist and bridge), image and storage, xbr's pins, the
/// plugins' iptables skeleton if the test made it, and the files.
struct Podman {
    dir: TempDir,
    network: String,
    bridge: String,
    subnet: String,
    /// The uplink (in the root namespace) and its peer's namespace, where outside clients are.
    uplink: String,
    uplink_address: Ipv4Addr,
    outside: NetNs,
    pin_root: PathBuf,
    containers: std::sync::Mutex<Vec<String>>,
    chains_before: bool,
}

impl Podman {
    fn conf_path(&self) -> PathBuf {
        self.dir.join("containers.conf")
    }

    fn command(&self, args: &[&str]) -> Command {
        let mut command = Command::new("podman");
        command
            .env("CONTAINERS_CONF", self.conf_path())
            .arg("--root")
            .arg(self.dir.join("root"))
            .arg("--runroot")
            .arg(self.dir.join("runroot"))
            .arg("--tmpdir")
            .arg(self.dir.join("tmp"))
            .args(["--storage-driver", "vfs", "--cgroup-manager", "cgroupfs"])
            .arg("--network-config-dir")
            .arg(self.dir.join("net"))
            .args(args);
        command
    }

    fn run(&self, args: &[&str]) -> Output {
        self.command(args).output().expect("run podman")
    }

    fn ok(&self, args: &[&str]) -> String {
        let output = self.run(args);
        assert!(
            output.status.success(),
            "`podman {}` failed: {}",
            args.join(" "),
            String::from_utf8_lossy(&output.stderr)
        );
        String::from_utf8_lossy(&output.stdout).trim().to_owned()
    }

    /// `xbr --pin-root ROOT ARGS...` (podman's bridge is in the root namespace).
    fn xbr_ok(&self, args: &[&str]) -> String {
        let mut full = vec!["--pin-root", self.pin_root.to_str().unwrap()];
        full.extend_from_slice(args);
        let (code, stdout, stderr) = xbr(&full);
        assert_eq!(code, 0, "`xbr {}` failed: {stderr}", full.join(" "));
        stdout
    }

    /// Endpoint MACs (lowercase) under the test's pin root (only its bridge is attached
    /// there), from `xbr status --json`.
    fn endpoint_macs(&self) -> BTreeSet<String> {
        let status: Value = serde_json::from_str(&self.xbr_ok(&["status", "--json"])).unwrap();
        status["bridges"]
            .as_array()
            .into_iter()
            .flatten()
            .flat_map(|b| b["ports"].as_array().cloned().unwrap_or_default())
            .filter_map(|p| p["endpoint_mac"].as_str().map(str::to_ascii_lowercase))
            .collect()
    }

    /// Fast-path packets sent and delivered over all endpoints, from `xbr stats --json`.
    fn fast_path_totals(&self) -> (u64, u64) {
        let stats: Value = serde_json::from_str(&self.xbr_ok(&["stats", "--json"])).unwrap();
        stats["endpoints"]
            .as_array()
            .into_iter()
            .flatten()
            .fold((0, 0), |(fast, delivered), e| {
                (
                    fast + e["fast_path_packets"].as_u64().unwrap_or(0),
                    delivered + e["delivered_packets"].as_u64().unwrap_or(0),
                )
            })
    }

    /// Runs container `name`: an HTTP server answering its own name on HTTP_PORT (published)
    /// and EAST_WEST_PORT.
    fn start(&self, name: &str, host_port: u16) {
        self.containers.lock().unwrap().push(name.to_owned());
        let publish = format!("{host_port}:{HTTP_PORT}");
        let script = format!(
            "mkdir -p /w && echo {name} > /w/index.html && httpd -p {EAST_WEST_PORT} -h /w \
             && exec httpd -f -p {HTTP_PORT} -h /w"
        );
        self.ok(&[
            "run",
            "-d",
            "--name",
            name,
            "--cap-add",
            "NET_RAW",
            "--network",
            &self.network,
            "-p",
            &publish,
            IMAGE,
            "sh",
            "-c",
            &script,
        ]);
    }

    fn inspect(&self, name: &str, field: &str) -> String {
        self.ok(&[
            "inspect",
            "-f",
            &format!("{{{{.NetworkSettings.Networks.{}.{field}}}}}", self.network),
            name,
        ])
    }

    fn ip(&self, name: &str) -> Ipv4Addr {
        self.inspect(name, "IPAddress")
            .parse()
            .expect("an IPv4 address")
    }

    fn mac(&self, name: &str) -> String {
        self.inspect(name, "MacAddress").to_ascii_lowercase()
    }

    /// The container's network namespace, as a name under /run/netns.
    fn netns(&self, name: &str) -> NetNs {
        let key = self.ok(&["inspect", "-f", "{{.NetworkSettings.SandboxKey}}", name]);
        let netns = Path::new(&key).file_name().unwrap().to_str().unwrap();
        NetNs::open(netns).unwrap_or_else(|e| panic!("{name}'s namespace {key}: {e}"))
    }

    /// What `wget` in container `from` gets from `to`'s HTTP server on EAST_WEST_PORT.
    fn http_from(&self, from: &str, to: Ipv4Addr) -> String {
        // busybox 1.35's `wget -T` crashes: `timeout` bounds it instead.
        self.ok(&[
            "exec",
            from,
            "timeout",
            "5",
            "wget",
            "-q",
            "-O",
            "-",
            &format!("http://{to}:{EAST_WEST_PORT}/index.html"),
        ])
    }

    /// What xbr's policy leaves to the kernel path, from `xbr status --json`.
    fn held(&self) -> String {
        let status: Value = serde_json::from_str(&self.xbr_ok(&["status", "--json"])).unwrap();
        status["bridges"]
            .as_array()
            .into_iter()
            .flatten()
            .map(|b| b["policy"]["east_west_held"].to_string())
            .collect::<Vec<_>>()
            .join("; ")
    }

    /// A restarted container may come back with its old address and a new MAC: its peers'
    /// neighbour entries (the host's too) would take seconds to notice, on any bridge.
    fn forget_neighbours(&self, containers: &[&str]) {
        for name in containers {
            let netns = self.netns(name);
            let _ = Command::new("ip")
                .args(["-n", netns.name(), "neigh", "flush", "all"])
                .output();
        }
        let _ = Command::new("ip")
            .args(["neigh", "flush", "dev", &self.bridge])
            .output();
    }

    fn verdict(&self, name: &str) -> u64 {
        let stats: Value = serde_json::from_str(&self.xbr_ok(&["stats", "--json"])).unwrap();
        verdict_total(&stats, name)
    }

    /// Published ports xbr leaves to the kernel path, and why.
    fn published_held(&self) -> String {
        let status: Value = serde_json::from_str(&self.xbr_ok(&["status", "--json"])).unwrap();
        status["bridges"]
            .as_array()
            .into_iter()
            .flatten()
            .flat_map(|b| b["published"].as_array().cloned().unwrap_or_default())
            .map(|p| format!("{} held={} {}", p["spec"], p["held"], p["not_accelerated"]))
            .collect::<Vec<_>>()
            .join("; ")
    }

    fn live_macs(&self) -> BTreeSet<String> {
        let running = self.ok(&["ps", "--format", "{{.Names}}"]);
        running.lines().map(|name| self.mac(name)).collect()
    }
}

impl Drop for Podman {
    fn drop(&mut self) {
        let containers = self.containers.lock().unwrap().clone();
        if !containers.is_empty() {
            let mut args = vec!["rm", "-f", "-i", "-t", "0"];
            args.extend(containers.iter().map(String::as_str));
            let _ = self.run(&args);
        }
        let _ = self.run(&["network", "rm", "-f", &self.network]);
        let _ = self.run(&["rmi", "-f", IMAGE]);
        for link in [&self.bridge, &self.uplink] {
            let _ = Command::new("ip").args(["link", "del", link]).output();
        }
        let _ = NetNs::delete(self.outside.name());
        xbr_quietly(&[
            "--pin-root",
            self.pin_root.to_str().unwrap_or_default(),
            "detach",
            &self.bridge,
        ]);
        let _ = std::fs::remove_dir_all(&self.pin_root);
        if !self.chains_before {
            remove_cni_skeleton();
        }
        // libcni's result cache is the machine's; the network's entries go with it.
        for entry in std::fs::read_dir("/var/lib/cni/results")
            .into_iter()
            .flatten()
            .flatten()
        {
            if entry
                .file_name()
                .to_string_lossy()
                .starts_with(&format!("{}-", self.network))
            {
                let _ = std::fs::remove_file(entry.path());
            }
        }
        // Mounts podman may have left under its root (a container's shm) before the files go.
        let root = self.dir.path.to_string_lossy().into_owned();
        if let Ok(mounts) = std::fs::read_to_string("/proc/self/mounts") {
            for target in mounts.lines().filter_map(|l| l.split(' ').nth(1)) {
                if target.starts_with(&root) {
                    let _ = Command::new("umount").args(["-l", target]).output();
                }
            }
        }
    }
}

/// Whether podman can run here; the reason when not.
fn podman_usable() -> Result<(), String> {
    let version = Command::new("podman").arg("--version").output();
    match version {
        Ok(output) if output.status.success() => {}
        Ok(output) => {
            return Err(format!(
                "podman --version failed: {}",
                String::from_utf8_lossy(&output.stderr)
            ));
        }
        Err(e) => {
            return Err(format!(
                "podman is not installed ({e}); `cargo xtask setup` installs it"
            ));
        }
    }
    for plugin in SYSTEM_PLUGINS {
        if !Path::new(SYSTEM_PLUGIN_DIR).join(plugin).exists() {
            return Err(format!(
                "{SYSTEM_PLUGIN_DIR}/{plugin} missing (containernetworking-plugins)"
            ));
        }
    }
    if !Path::new("/bin/busybox").exists() {
        return Err("/bin/busybox missing (busybox-static)".to_owned());
    }
    Ok(())
}

/// The hard limit `resource` has here (capped at podman's default): without
/// CAP_SYS_RESOURCE, runc cannot raise a container's limit past it.
fn hard_limit(resource: libc::__rlimit_resource_t) -> u64 {
    let mut limit = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit writes the struct it is given.
    unsafe { libc::getrlimit(resource, &mut limit) };
    limit.rlim_max.min(1 << 20)
}

/// The image: a static busybox with the applets the test uses, imported without a registry.
fn import_image(podman: &Podman) {
    let rootfs = podman.dir.join("rootfs");
    for dir in ["bin", "tmp", "proc", "sys", "dev", "etc"] {
        std::fs::create_dir_all(rootfs.join(dir)).unwrap();
    }
    std::fs::copy("/bin/busybox", rootfs.join("bin/busybox")).expect("copy busybox");
    for applet in [
        "sh", "sleep", "ping", "httpd", "wget", "nc", "ip", "cat", "ls", "mkdir", "echo", "timeout",
    ] {
        std::os::unix::fs::symlink("busybox", rootfs.join("bin").join(applet)).unwrap();
    }
    let tar = podman.dir.join("image.tar");
    let status = Command::new("tar")
        .arg("-C")
        .arg(&rootfs)
        .arg("-cf")
        .arg(&tar)
        .arg(".")
        .status()
        .unwrap();
    assert!(status.success(), "tar of the image's rootfs");
    podman.ok(&[
        "import",
        "--change",
        "CMD [\"/bin/sh\"]",
        "--change",
        "ENV PATH=/bin",
        tar.to_str().unwrap(),
        IMAGE,
    ]);
}

fn setup(test_name: &str) -> Podman {
    let dir = TempDir::new("xbrpodman");
    let suffix = test_name.trim_start_matches("xbrpodman");
    let bridge = format!("xbrpm{suffix}");
    assert!(bridge.len() <= 15, "bridge name {bridge} too long");
    let network = format!("xbrpodman{suffix}");
    let pin_root = PathBuf::from(format!("/sys/fs/bpf/{}", unique_name("xbrtest")));
    for sub in ["net", "plugins", "root", "runroot", "tmp", "ipam"] {
        std::fs::create_dir_all(dir.join(sub)).unwrap();
    }
    for plugin in SYSTEM_PLUGINS {
        std::os::unix::fs::symlink(
            Path::new(SYSTEM_PLUGIN_DIR).join(plugin),
            dir.join("plugins").join(plugin),
        )
        .unwrap();
    }
    std::fs::copy(xbr_cni_binary(), dir.join("plugins/xbr-cni")).expect("copy xbr-cni");
    let nofile = hard_limit(libc::RLIMIT_NOFILE);
    // The recipe's value: the hard limit itself is refused for nproc.
    let nproc = hard_limit(libc::RLIMIT_NPROC).min(32768);
    let conf = format!(
        "[containers]\n\
         # no CAP_SYS_RESOURCE here: limits above the hard ones fail in runc\n\
         default_ulimits = [\"nofile={nofile}:{nofile}\", \"nproc={nproc}:{nproc}\"]\n\
         [network]\n\
         network_backend = \"cni\"\n\
         cni_plugin_dirs = [\"{plugins}\"]\n\
         network_config_dir = \"{net}\"\n\
         [engine]\n\
         events_logger = \"none\"\n\
         cgroup_manager = \"cgroupfs\"\n",
        plugins = dir.join("plugins").display(),
        net = dir.join("net").display(),
    );
    std::fs::write(dir.join("containers.conf"), conf).unwrap();
    // A subnet of the test's own: away from podman's 10.88/16 and Docker's 172.17/16.
    let third = 100 + std::process::id() % 100;
    let subnet = format!("10.251.{third}.0/24");
    // The uplink: a veth of the test's own, its peer in an "outside" namespace.
    let uplink = format!("xbrup{suffix}");
    assert!(uplink.len() <= 15, "uplink name {uplink} too long");
    let uplink_address = Ipv4Addr::new(10, 252, third as u8, 1);
    let outside = NetNs::create(&format!("xbrpmout{suffix}")).expect("the outside namespace");

    let conflist = json!({
        "cniVersion": "1.0.0",
        "name": network,
        "plugins": [
            {
                "type": "bridge",
                "bridge": bridge,
                "isGateway": true,
                "ipMasq": true,
                "hairpinMode": true,
                "ipam": {
                    "type": "host-local",
                    "dataDir": dir.join("ipam"),
                    "routes": [{ "dst": "0.0.0.0/0" }],
                    "ranges": [[{ "subnet": subnet }]],
                },
            },
            { "type": "portmap", "capabilities": { "portMappings": true } },
            { "type": "firewall" },
            {
                "type": "xbr-cni",
                "capabilities": { "portMappings": true },
                "pinRoot": pin_root,
                "socketHooks": false,
                "uplinks": [uplink],
            },
        ],
    });
    std::fs::write(
        dir.join("net").join(format!("{network}.conflist")),
        serde_json::to_string_pretty(&conflist).unwrap(),
    )
    .unwrap();
    let podman = Podman {
        dir,
        network,
        bridge,
        subnet,
        uplink,
        uplink_address,
        outside,
        pin_root,
        containers: Default::default(),
        chains_before: cni_chains_present(),
    };
    let ip = |args: &[&str]| {
        let output = Command::new("ip").args(args).output().expect("run ip");
        assert!(
            output.status.success(),
            "ip {}: {}",
            args.join(" "),
            String::from_utf8_lossy(&output.stderr)
        );
    };
    ip(&[
        "link",
        "add",
        &podman.uplink,
        "type",
        "veth",
        "peer",
        "name",
        "eth0",
        "netns",
        podman.outside.name(),
    ]);
    ip(&[
        "addr",
        "add",
        &format!("{uplink_address}/24"),
        "dev",
        &podman.uplink,
    ]);
    ip(&["link", "set", &podman.uplink, "up"]);
    ip(&[
        "-n",
        podman.outside.name(),
        "addr",
        "add",
        &format!("10.252.{third}.2/24"),
        "dev",
        "eth0",
    ]);
    ip(&["-n", podman.outside.name(), "link", "set", "eth0", "up"]);
    podman
}

fn http_get(to: SocketAddr) -> std::io::Result<String> {
    let mut stream = TcpStream::connect_timeout(&to, Duration::from_secs(3))?;
    stream.set_read_timeout(Some(Duration::from_secs(5)))?;
    stream.write_all(b"GET /index.html HTTP/1.0\r\nHost: localhost\r\n\r\n")?;
    let mut response = String::new();
    stream.read_to_string(&mut response)?;
    Ok(response
        .split("\r\n\r\n")
        .nth(1)
        .unwrap_or_default()
        .trim()
        .to_owned())
}

/// Traffic between the two containers (HTTP from their own processes, a TCP stream between
/// their namespaces) takes the fast path: xbr's counters grow, the bridge's stays flat.
/// Connectivity is asserted at once; a fast-path shortfall is returned, so that the lifecycle
/// checks after it still run.
fn fast_path_between(
    podman: &Podman,
    witness: &BridgeWitness,
    one: &str,
    two: &str,
    what: &str,
) -> Option<String> {
    let (ip_one, ip_two) = (podman.ip(one), podman.ip(two));
    podman.forget_neighbours(&[one, two]);
    let before = witness.read();
    let (fast_before, delivered_before) = podman.fast_path_totals();
    assert_eq!(podman.http_from(one, ip_two), two, "{what}: {one} -> {two}");
    assert_eq!(podman.http_from(two, ip_one), one, "{what}: {two} -> {one}");
    tcp_echo(&podman.netns(one), &podman.netns(two), ip_two, 128 * 1024);
    let (fast, delivered) = podman.fast_path_totals();
    let crossed = witness.read() - before;
    (fast <= fast_before + 50 || delivered <= delivered_before + 50 || crossed > 0).then(|| {
        format!(
            "{what}: fast path {fast_before} -> {fast}, delivered {delivered_before} -> \
             {delivered}, {crossed} unicast IPv4 frames crossed the bridge; xbr holds for the \
             kernel path: {}",
            podman.held()
        )
    })
}

#[test]
fn podman_containers_take_the_fast_path_through_their_lifecycle() {
    if let Err(reason) = podman_usable() {
        skip(TEST, &reason);
        return;
    }
    let podman = setup(&unique_name("xbrpodman"));
    import_image(&podman);
    let port_base = 18100 + (std::process::id() % 400) as u16 * 2;
    podman.start("xbrpm-one", port_base);
    podman.start("xbrpm-two", port_base + 1);
    let witness = BridgeWitness::install(&podman.subnet);
    let mut missed = Vec::new();

    assert_eq!(
        podman.endpoint_macs(),
        podman.live_macs(),
        "endpoints after two `podman run`"
    );
    assert_eq!(podman.live_macs().len(), 2);
    missed.extend(fast_path_between(
        &podman,
        &witness,
        "xbrpm-one",
        "xbrpm-two",
        "after run",
    ));

    // Published ports from the host: portmap's DNAT (xbr-cni has no socket hooks here).
    let localhost = |port: u16| SocketAddr::from((Ipv4Addr::LOCALHOST, port));
    assert_eq!(http_get(localhost(port_base)).unwrap(), "xbrpm-one");
    assert_eq!(http_get(localhost(port_base + 1)).unwrap(), "xbrpm-two");
    // From outside through the uplink: xbr's NAT.
    let nat_in = podman.verdict("nat_in");
    for (port, name) in [(port_base, "xbrpm-one"), (port_base + 1, "xbrpm-two")] {
        let to = SocketAddr::from((podman.uplink_address, port));
        let answer = podman
            .outside
            .run(|| http_get(to))
            .unwrap()
            .unwrap_or_else(|e| panic!("{to} from the outside namespace: {e}"));
        assert_eq!(answer, name, "{to} from outside");
    }
    let nat_in_after = podman.verdict("nat_in");
    if nat_in_after < nat_in + 2 * 3 {
        missed.push(format!(
            "published ports from outside: xbr's nat_in {nat_in} -> {nat_in_after}; xbr holds: {}",
            podman.published_held()
        ));
    }

    // `podman network reload`: DEL and ADD in the same namespace, a new host veth.
    podman.ok(&["network", "reload", "xbrpm-one"]);
    assert_eq!(
        podman.endpoint_macs(),
        podman.live_macs(),
        "after network reload"
    );
    missed.extend(fast_path_between(
        &podman,
        &witness,
        "xbrpm-one",
        "xbrpm-two",
        "after network reload",
    ));

    // `podman restart`: a new namespace, MAC and veth.
    podman.ok(&["restart", "-t", "0", "xbrpm-two"]);
    assert_eq!(podman.endpoint_macs(), podman.live_macs(), "after restart");
    missed.extend(fast_path_between(
        &podman,
        &witness,
        "xbrpm-one",
        "xbrpm-two",
        "after restart",
    ));
    assert_eq!(http_get(localhost(port_base + 1)).unwrap(), "xbrpm-two");

    podman.ok(&["stop", "-t", "0", "xbrpm-two"]);
    assert_eq!(podman.live_macs().len(), 1);
    assert_eq!(podman.endpoint_macs(), podman.live_macs(), "after stop");
    podman.ok(&["rm", "xbrpm-two"]);
    assert_eq!(podman.endpoint_macs(), podman.live_macs(), "after rm");
    podman.ok(&["rm", "-f", "-t", "0", "xbrpm-one"]);
    assert!(podman.endpoint_macs().is_empty(), "after rm -f of the last");

    podman.ok(&["network", "rm", &podman.network]);
    let (code, _, stderr) = xbr(&[
        "--pin-root",
        podman.pin_root.to_str().unwrap(),
        "detach",
        &podman.bridge,
    ]);
    assert!(
        code == 0 || stderr.contains("not attached") || stderr.contains("not found"),
        "xbr detach: {stderr}"
    );
    let status: Value = serde_json::from_str(&podman.xbr_ok(&["status", "--json"])).unwrap();
    assert_eq!(status["bridges"], json!([]), "xbr state left: {status}");
    let left: Vec<_> = std::fs::read_dir(&podman.pin_root)
        .into_iter()
        .flatten()
        .flatten()
        .map(|e| e.path())
        .collect();
    assert!(left.is_empty(), "pins left: {left:?}");
    assert!(
        missed.is_empty(),
        "traffic left xbr's fast path:\n{}",
        missed.join("\n")
    );
}
