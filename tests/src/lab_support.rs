//! Labs for kernel-facing tests: names no parallel test shares, the usual three-container lab,
//! and witnesses (`ip`, `ping`) that check what xbr built without trusting xbr.

use std::net::Ipv4Addr;
use std::process::Command;
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::{Duration, Instant};

use xbr::lab::{BridgeSpec, ContainerSpec, Ipv4Cidr, LabGuard, LabSpec, MacAddr, UplinkSpec};

/// A name unique across parallel tests and test processes: `prefix`, this process's id (five
/// digits) and a counter. Short, because lab names prefix namespace names.
pub fn unique_name(prefix: &str) -> String {
    static NEXT: AtomicU32 = AtomicU32::new(0);
    let pid = std::process::id() % 100_000;
    format!("{prefix}{pid:05}{}", NEXT.fetch_add(1, Ordering::Relaxed))
}

/// The usual test lab: containers a, b and c (10.77.0.2-4/24, MACs 02:77:00:00:00:02-04) on
/// bridge br0 (10.77.0.1/24), under a unique lab name.
pub struct LabBuilder {
    spec: LabSpec,
}

impl LabBuilder {
    pub fn three_containers() -> LabBuilder {
        LabBuilder::named(&unique_name("l"))
    }

    pub fn named(name: &str) -> LabBuilder {
        let container = |name: &str, last: u8| ContainerSpec {
            name: name.to_owned(),
            address: Ipv4Cidr::new(Ipv4Addr::new(10, 77, 0, last), 24),
            mac: Some(MacAddr([0x02, 0x77, 0, 0, 0, last])),
        };
        LabBuilder {
            spec: LabSpec {
                name: name.to_owned(),
                bridge: BridgeSpec {
                    name: "br0".to_owned(),
                    address: Some(Ipv4Cidr::new(Ipv4Addr::new(10, 77, 0, 1), 24)),
                },
                containers: vec![container("a", 2), container("b", 3), container("c", 4)],
                uplink: None,
            },
        }
    }

    /// Adds the outside namespace: uplink0 10.78.0.1/24 in the host, eth0 10.78.0.2/24 outside.
    pub fn with_uplink(mut self) -> LabBuilder {
        self.spec.uplink = Some(UplinkSpec {
            host_address: Ipv4Cidr::new(Ipv4Addr::new(10, 78, 0, 1), 24),
            outside_address: Ipv4Cidr::new(Ipv4Addr::new(10, 78, 0, 2), 24),
        });
        self
    }

    pub fn build(self) -> LabSpec {
        self.spec
    }

    /// Builds the lab in the kernel; it is torn down when the guard drops.
    pub fn up(self) -> LabGuard {
        let name = self.spec.name.clone();
        LabGuard::up(self.spec).unwrap_or_else(|error| panic!("lab {name} should come up: {error}"))
    }
}

/// Deletes the lab's namespaces on drop, for tests whose lab may never have come up whole.
pub struct DownOnDrop(pub LabSpec);

impl Drop for DownOnDrop {
    fn drop(&mut self) {
        let _ = xbr::lab::down(&self.0);
    }
}

/// Waits until the kernel has finished reporting on a fresh lab: the bridge's operstate moves
/// from UNKNOWN to UP asynchronously (linkwatch may hold the event up to a second), so tests that
/// compare link states call this first. Traffic does not need it.
pub fn wait_settled(spec: &LabSpec) {
    if spec.containers.is_empty() {
        return;
    }
    let host = spec.host_netns();
    let deadline = Instant::now() + Duration::from_secs(3);
    loop {
        let bridge = ip_in(&host, &["-o", "link", "show", &spec.bridge.name]);
        if bridge.contains(" state UP ") {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "bridge {} in {host} should reach state UP: {bridge}",
            spec.bridge.name
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// Waits until every port of the lab's bridge is forwarding (carrier detection runs late on
/// a busy machine, and the bridge forwards nothing on a port before that), up to `limit`.
pub fn wait_ports_forwarding(spec: &LabSpec, limit: Duration) {
    let host = spec.host_netns();
    let deadline = Instant::now() + limit;
    loop {
        let output = Command::new("bridge")
            .args(["-n", &host, "-j", "link", "show"])
            .output()
            .expect("run bridge");
        let ports: serde_json::Value = serde_json::from_slice(&output.stdout).unwrap_or_default();
        let ports = ports.as_array().cloned().unwrap_or_default();
        let waiting = ports.iter().filter(|p| p["state"] != "forwarding").count();
        if ports.len() >= spec.containers.len() && waiting == 0 {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "{waiting} ports of {} in {host} are not forwarding after {limit:?}",
            spec.bridge.name
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// Namespace names `ip netns list` shows.
pub fn netns_list() -> Vec<String> {
    let listing = run("ip", &["netns", "list"]);
    listing
        .lines()
        .filter_map(|line| line.split_whitespace().next())
        .map(str::to_owned)
        .collect()
}

/// stdout of `ip -n NETNS ARGS...`; panics when `ip` fails.
pub fn ip_in(netns: &str, args: &[&str]) -> String {
    let mut full = vec!["-n", netns];
    full.extend_from_slice(args);
    run("ip", &full)
}

/// Whether `ping` from inside `netns` gets an answer from `addr`; a few tries, since the first
/// packets of a fresh lab may wait on ARP.
pub fn ping(netns: &str, addr: Ipv4Addr) -> bool {
    (0..3).any(|_| {
        Command::new("ip")
            .args([
                "netns",
                "exec",
                netns,
                "ping",
                "-c1",
                "-W1",
                "-q",
                &addr.to_string(),
            ])
            .output()
            .unwrap_or_else(|error| panic!("cannot run ping in {netns}: {error}"))
            .status
            .success()
    })
}

pub fn assert_ping(netns: &str, addr: Ipv4Addr) {
    assert!(
        ping(netns, addr),
        "{addr} should answer ping from namespace {netns}"
    );
}

/// Runs a command and panics with its stderr unless it succeeds; returns stdout.
pub fn run(program: &str, args: &[&str]) -> String {
    let output = Command::new(program)
        .args(args)
        .output()
        .unwrap_or_else(|error| panic!("cannot run {program} {}: {error}", args.join(" ")));
    assert!(
        output.status.success(),
        "`{program} {}` failed: {}",
        args.join(" "),
        String::from_utf8_lossy(&output.stderr)
    );
    String::from_utf8_lossy(&output.stdout).into_owned()
}

/// Containers added to (and removed from) a running lab's bridge with `ip`, one at a time,
/// the way a container runtime does; every namespace made is deleted on drop.
pub struct ExtraContainers {
    host: String,
    bridge: String,
    /// The bridge's address: the containers' default gateway, as in a lab container.
    gateway: Option<Ipv4Addr>,
    made: Vec<String>,
}

impl ExtraContainers {
    pub fn new(spec: &LabSpec) -> ExtraContainers {
        ExtraContainers {
            host: spec.host_netns(),
            bridge: spec.bridge.name.clone(),
            gateway: spec.bridge.address.map(|cidr| cidr.addr),
            made: Vec::new(),
        }
    }

    /// Adds container `netns` behind port `port` with `mac` and `address` (CIDR).
    pub fn add(&mut self, netns: &str, port: &str, mac: &str, address: &str) {
        self.add_with(netns, port, mac, address, PortOptions::default(), || {});
    }

    /// `add`, with the port made as `options` say; `before_up` runs once the container's
    /// side is configured and before its port joins the bridge (a witness installed there
    /// sees every frame the container ever receives).
    pub fn add_with(
        &mut self,
        netns: &str,
        port: &str,
        mac: &str,
        address: &str,
        options: PortOptions,
        before_up: impl FnOnce(),
    ) {
        run("ip", &["netns", "add", netns]);
        self.made.push(netns.to_owned());
        let index = options.ifindex.map(|index| index.to_string());
        let mut link_add = vec!["-n", &self.host, "link", "add", port];
        if let Some(index) = &index {
            link_add.extend(["index", index.as_str()]);
        }
        link_add.extend(["type", "veth", "peer", "name", "eth0", "netns", netns]);
        run("ip", &link_add);
        run("ip", &["-n", netns, "link", "set", "eth0", "address", mac]);
        run("ip", &["-n", netns, "addr", "add", address, "dev", "eth0"]);
        run("ip", &["-n", netns, "link", "set", "eth0", "up"]);
        run("ip", &["-n", netns, "link", "set", "lo", "up"]);
        before_up();
        run(
            "ip",
            &[
                "-n",
                &self.host,
                "link",
                "set",
                port,
                "master",
                &self.bridge,
            ],
        );
        if options.no_flood {
            run(
                "bridge",
                &["-n", &self.host, "link", "set", "dev", port, "flood", "off"],
            );
        }
        run("ip", &["-n", &self.host, "link", "set", port, "up"]);
        if let Some(gateway) = self.gateway {
            run(
                "ip",
                &[
                    "-n",
                    netns,
                    "route",
                    "add",
                    "default",
                    "via",
                    &gateway.to_string(),
                ],
            );
        }
    }

    /// The ifindex of port `port` (on the host's side).
    pub fn ifindex(&self, port: &str) -> u32 {
        ifindex_in(&self.host, port)
    }

    /// Deletes container `netns` (its veth pair goes with it).
    pub fn remove(&mut self, netns: &str) {
        run("ip", &["netns", "del", netns]);
        self.made.retain(|made| made != netns);
    }

    /// Deletes container `netns` behind `port`, the port first: the veth pair is gone when
    /// this returns (a namespace's own teardown runs later, in the kernel's workqueue), so its
    /// ifindex is free.
    pub fn remove_now(&mut self, netns: &str, port: &str) {
        run("ip", &["-n", &self.host, "link", "del", port]);
        self.remove(netns);
    }
}

/// How `ExtraContainers::add_with` makes a port.
#[derive(Clone, Copy, Debug, Default)]
pub struct PortOptions {
    /// The port's ifindex (`ip link add ... index N`); the kernel's choice when None.
    pub ifindex: Option<u32>,
    /// Unknown unicast is not flooded to the port (`bridge link set ... flood off`).
    pub no_flood: bool,
}

/// The ifindex of `device` in `netns`.
pub fn ifindex_in(netns: &str, device: &str) -> u32 {
    let listing = ip_in(netns, &["-j", "link", "show", "dev", device]);
    let links: serde_json::Value = serde_json::from_str(&listing).expect("ip -j prints JSON");
    links[0]["ifindex"]
        .as_u64()
        .unwrap_or_else(|| panic!("no ifindex for {device} in {netns}: {listing}")) as u32
}

impl Drop for ExtraContainers {
    fn drop(&mut self) {
        for netns in &self.made {
            let _ = Command::new("ip").args(["netns", "del", netns]).output();
        }
    }
}
