//! A two-node Docker Swarm on one machine, for tests (and the benchmark) of xbr on Docker's
//! VXLAN overlay networks.
//!
//! Each node is a network namespace of its own, `xbrsw-TAG-n1` and `xbrsw-TAG-n2`, joined by
//! an underlay veth pair (10.250.0.1/24 <-> 10.250.0.2/24: private to the two namespaces, so
//! parallel labs can all use these addresses). Each node runs its own containerd and dockerd,
//! started with `nsenter --net=/run/netns/NODE` (so /sys and the mount namespace stay the
//! host's) and, for dockerd, `unshare --uts` so `docker node ls` shows distinct hostnames.
//! Everything a lab makes is named from its tag: namespaces, /run/xbrsw-TAG and
//! /var/lib/xbrsw-TAG, the cgroup parents /xbrsw-TAG-nN, the hostnames.
//!
//! Node 1 is the swarm's only manager, node 2 a worker. The image is busybox-static, brought
//! in with `docker import` (no registry). This kernel has no IPVS, so service VIPs
//! (`--endpoint-mode vip`) and the ingress routing mesh (`-p` on a service) do not work: the
//! lab only runs plain containers on attachable overlay networks.
//!
//! `SwarmLab::up` returns `Err` when Docker cannot run here (packages not installable, a
//! daemon that will not start): tests report that as skipped. Anything failing after that is
//! a broken lab and panics, naming the step; either way the lab's `Drop` tears down whatever
//! was made, and only the processes the lab started (checked by their command line) are
//! signalled.
//!
//! A test process killed before its `Drop` ran leaves its lab up; `swarm-lab down --state
//! /run/xbrsw-TAG/state.json` removes it.
//!
//! No `MachineLock` (docker_support.rs): that lock keeps two daemons from fighting over the
//! root namespace's iptables chains, and a lab's daemons only touch the iptables and sysctls
//! of their own node namespaces. What they share with the rest of the machine is
//! /usr/bin/docker, /etc/docker/key.json (read only once it exists) and the cgroup tree
//! (below cgroup parents of their own). Taking the lock would also serialize labs that can
//! run side by side. Note that `Dockerd::start` refuses to start while any dockerd runs, a
//! lab's included: cargo runs test binaries one after another, so within the suite a lab and
//! a docker_support daemon never meet.

use serde_json::{Value, json};
use std::{
    fs::{self, File},
    net::Ipv4Addr,
    os::unix::process::CommandExt as _,
    path::{Path, PathBuf},
    process::{Child, Command, Output, Stdio},
    time::{Duration, Instant},
};

use crate::lab_support::run;
use xbr::netns::NetNs;

const DOCKER: &str = "/usr/bin/docker";
const DOCKERD: &str = "/usr/sbin/dockerd";
const CONTAINERD: &str = "/usr/bin/containerd";
const BUSYBOX: &str = "/bin/busybox";
/// For the daemons and the helpers run in namespaces: never a shim from /usr/local/bin (on
/// these machines `docker` there belongs to another service).
const SYSTEM_PATH: &str = "/usr/sbin:/usr/bin:/sbin:/bin";
/// The image every node imports; each node has its own data root, so one name serves all labs.
pub const IMAGE: &str = "xbr-swarm-box:1";
/// busybox applets the image links to /bin.
const APPLETS: &[&str] = &[
    "sh", "sleep", "ping", "httpd", "wget", "nc", "ip", "cat", "ls", "echo", "mkdir", "hostname",
    "ifconfig", "route", "ps", "timeout",
];
const UNDERLAY_IPS: [Ipv4Addr; 2] = [Ipv4Addr::new(10, 250, 0, 1), Ipv4Addr::new(10, 250, 0, 2)];
/// Subnets the swarm allocates itself (the ingress network): away from the underlay.
const SWARM_POOL: &str = "10.252.0.0/16";
/// Every lab's names start with these; `from_state` refuses paths and names that do not.
const PREFIX: &str = "xbrsw-";
const RUN_ROOT: &str = "/run";
const LIB_ROOT: &str = "/var/lib";
/// Upper bound for one docker command (a swarm join may take a few seconds).
const DOCKER_TIMEOUT: &str = "120";

/// One node: a network namespace with a containerd and a dockerd of its own.
#[derive(Debug)]
pub struct Node {
    number: u8,
    netns: String,
    underlay_ip: Ipv4Addr,
    /// Sockets, exec root, pidfile, logs, the CLI's config: /run/xbrsw-TAG/nN.
    run_dir: PathBuf,
    /// containerd's root and dockerd's data root: /var/lib/xbrsw-TAG/nN.
    lib_dir: PathBuf,
    cgroup_parent: String,
    containerd_pid: Option<i32>,
    dockerd_pid: Option<i32>,
}

/// A container the lab started, as `docker inspect` describes it on its overlay network.
#[derive(Clone, Debug)]
pub struct Container {
    pub id: String,
    pub ip: Ipv4Addr,
    pub mac: String,
    /// The container's network namespace (NetworkSettings.SandboxKey).
    pub sandbox_key: PathBuf,
}

/// The two-node swarm; torn down on drop (panics included) unless `keep` was called.
#[derive(Debug)]
pub struct SwarmLab {
    tag: String,
    run_dir: PathBuf,
    lib_dir: PathBuf,
    nodes: [Node; 2],
    armed: bool,
}

impl SwarmLab {
    /// Builds the lab named by `tag` (letters, digits and `-`; unique among the labs that
    /// run at the same time, e.g. `lab_support::unique_name`): two nodes, containerd and
    /// dockerd in each, a swarm of the two, the busybox image on both. `Err` says why the lab
    /// cannot be built here (Docker cannot run, or a lab of this tag is up); a later step
    /// that fails panics, naming it. Either way, what was made is removed.
    pub fn up(tag: &str) -> Result<SwarmLab, String> {
        check_tag(tag)?;
        crate::docker_support::ensure_installed()?;
        for program in [CONTAINERD, "/usr/bin/nsenter", "/usr/bin/unshare"] {
            if !Path::new(program).exists() {
                return Err(format!("{program} is missing"));
            }
        }
        let mut lab = SwarmLab::named(tag);
        // Never adopt (and later remove) what an earlier lab of this tag left behind.
        for node in &lab.nodes {
            if NetNs::exists(&node.netns) {
                return Err(format!(
                    "namespace {} already exists: a lab tagged {tag} is up; take it down first",
                    node.netns
                ));
            }
        }
        if lab.run_dir.exists() || lab.lib_dir.exists() {
            return Err(format!(
                "{} or {} already exists: a lab tagged {tag} is up; take it down first",
                lab.run_dir.display(),
                lab.lib_dir.display()
            ));
        }
        lab.armed = true;
        // From here on, dropping `lab` removes whatever was made.
        lab.make_underlay();
        let image = lab.make_image_tar();
        let started = lab.start_daemons();
        // The pids are known now: a process that dies hard leaves the means to clean up.
        lab.save_state();
        started?;
        for node in &lab.nodes {
            node.docker(&[
                "import",
                "-c",
                r#"CMD ["/bin/sh"]"#,
                image.to_str().unwrap(),
                IMAGE,
            ]);
        }
        lab.form_swarm();
        Ok(lab)
    }

    /// The lab's names and paths, nothing made yet (so nothing to tear down).
    fn named(tag: &str) -> SwarmLab {
        let run_dir = Path::new(RUN_ROOT).join(format!("{PREFIX}{tag}"));
        let lib_dir = Path::new(LIB_ROOT).join(format!("{PREFIX}{tag}"));
        let node = |number: u8| Node {
            number,
            netns: format!("{PREFIX}{tag}-n{number}"),
            underlay_ip: UNDERLAY_IPS[usize::from(number - 1)],
            run_dir: run_dir.join(format!("n{number}")),
            lib_dir: lib_dir.join(format!("n{number}")),
            cgroup_parent: format!("/{PREFIX}{tag}-n{number}"),
            containerd_pid: None,
            dockerd_pid: None,
        };
        SwarmLab {
            tag: tag.to_owned(),
            nodes: [node(1), node(2)],
            run_dir,
            lib_dir,
            armed: false,
        }
    }

    pub fn tag(&self) -> &str {
        &self.tag
    }

    /// Node 1 (the manager) or 2 (the worker).
    pub fn node(&self, n: u8) -> &Node {
        assert!(n == 1 || n == 2, "the lab has nodes 1 and 2, not {n}");
        &self.nodes[usize::from(n - 1)]
    }

    /// The two node namespaces, joined by veth `underlay1` <-> `underlay2`.
    fn make_underlay(&self) {
        for node in &self.nodes {
            NetNs::create(&node.netns)
                .unwrap_or_else(|e| panic!("underlay: create namespace {}: {e}", node.netns));
        }
        let [one, two] = &self.nodes;
        run(
            "ip",
            &[
                "link",
                "add",
                "underlay1",
                "netns",
                &one.netns,
                "type",
                "veth",
                "peer",
                "name",
                "underlay2",
                "netns",
                &two.netns,
            ],
        );
        for node in &self.nodes {
            let device = format!("underlay{}", node.number);
            let address = format!("{}/24", node.underlay_ip);
            run("ip", &["-n", &node.netns, "link", "set", "lo", "up"]);
            run(
                "ip",
                &["-n", &node.netns, "addr", "add", &address, "dev", &device],
            );
            run("ip", &["-n", &node.netns, "link", "set", &device, "up"]);
        }
    }

    /// A rootfs of /bin/busybox and its applets, as a tarball for `docker import`.
    fn make_image_tar(&self) -> PathBuf {
        let scratch = self.run_dir.join("image");
        let rootfs = scratch.join("rootfs");
        for dir in ["bin", "etc", "tmp", "www", "proc", "sys", "dev"] {
            fs::create_dir_all(rootfs.join(dir))
                .unwrap_or_else(|e| panic!("image: create {}/{dir}: {e}", rootfs.display()));
        }
        fs::copy(BUSYBOX, rootfs.join("bin/busybox"))
            .unwrap_or_else(|e| panic!("image: copy {BUSYBOX}: {e}"));
        for applet in APPLETS {
            std::os::unix::fs::symlink("busybox", rootfs.join("bin").join(applet))
                .unwrap_or_else(|e| panic!("image: link applet {applet}: {e}"));
        }
        run("chmod", &["1777", rootfs.join("tmp").to_str().unwrap()]);
        let tar = scratch.join("busybox.tar");
        run(
            "tar",
            &[
                "--numeric-owner",
                "-C",
                rootfs.to_str().unwrap(),
                "-cf",
                tar.to_str().unwrap(),
                ".",
            ],
        );
        tar
    }

    /// containerd and dockerd in both nodes, the two nodes at the same time (each waits
    /// seconds for its daemons).
    fn start_daemons(&mut self) -> Result<(), String> {
        std::thread::scope(|scope| {
            let starting: Vec<_> = self
                .nodes
                .iter_mut()
                .map(|node| scope.spawn(move || node.start()))
                .collect();
            // Join both before answering, so both pids are recorded for the teardown.
            let results: Vec<Result<(), String>> = starting
                .into_iter()
                .map(|thread| thread.join().unwrap_or_else(|_| Err("panicked".to_owned())))
                .collect();
            results.into_iter().collect()
        })
    }

    /// `swarm init` on node 1, node 2 joins as a worker; waits until both are Ready.
    fn form_swarm(&self) {
        let [one, two] = &self.nodes;
        let manager = format!("{}:2377", one.underlay_ip);
        one.docker(&[
            "swarm",
            "init",
            "--advertise-addr",
            &one.underlay_ip.to_string(),
            "--listen-addr",
            &manager,
            "--default-addr-pool",
            SWARM_POOL,
        ]);
        let token = one.docker(&["swarm", "join-token", "-q", "worker"]);
        two.docker(&[
            "swarm",
            "join",
            "--token",
            &token,
            "--advertise-addr",
            &two.underlay_ip.to_string(),
            "--listen-addr",
            &format!("{}:2377", two.underlay_ip),
            &manager,
        ]);
        let started = Instant::now();
        loop {
            let statuses = one.docker(&["node", "ls", "--format", "{{.Status}}"]);
            if statuses.lines().filter(|s| *s == "Ready").count() == 2 {
                return;
            }
            assert!(
                started.elapsed() < Duration::from_secs(30),
                "swarm: node 2 did not become Ready within 30 s: {statuses}"
            );
            std::thread::sleep(Duration::from_millis(200));
        }
    }

    /// `docker network create -d overlay --attachable --subnet SUBNET NAME` on the manager;
    /// returns the network's id.
    pub fn create_overlay(&self, name: &str, subnet: &str) -> String {
        self.node(1).docker(&[
            "network",
            "create",
            "-d",
            "overlay",
            "--attachable",
            "--subnet",
            subnet,
            name,
        ])
    }

    /// Runs `sleep 100000` in container `name` (hostname `name`) on node `node`, attached to
    /// `network` (a name); waits until it runs and describes it.
    pub fn run_container(&self, node: u8, name: &str, network: &str) -> Container {
        let docker = self.node(node);
        docker.docker(&[
            "run",
            "-d",
            "--network",
            network,
            "--name",
            name,
            "--hostname",
            name,
            IMAGE,
            "sleep",
            "100000",
        ]);
        let inspected: Value = serde_json::from_str(&docker.docker(&["inspect", name]))
            .unwrap_or_else(|e| panic!("docker inspect {name}: not JSON: {e}"));
        let container = &inspected[0];
        let settings = &container["NetworkSettings"];
        let on_network = &settings["Networks"][network];
        let text = |value: &Value, what: &str| {
            value
                .as_str()
                .filter(|s| !s.is_empty())
                .unwrap_or_else(|| panic!("docker inspect {name} on node {node}: no {what}"))
                .to_owned()
        };
        let ip = text(&on_network["IPAddress"], "IPAddress on the network");
        Container {
            id: text(&container["Id"], "Id"),
            ip: ip
                .parse()
                .unwrap_or_else(|_| panic!("container {name} has address `{ip}`")),
            mac: text(&on_network["MacAddress"], "MacAddress on the network"),
            sandbox_key: PathBuf::from(text(&settings["SandboxKey"], "SandboxKey")),
        }
    }

    /// Stops and removes container `name` on node `node` (`docker rm -f`): its endpoint
    /// leaves the overlay network.
    pub fn stop_container(&self, node: u8, name: &str) {
        self.node(node).docker(&["rm", "-f", name]);
    }

    /// Leaves the lab up when this value goes away (for `swarm-lab up`); `state` has what
    /// `down_from_state` needs to remove it later.
    pub fn keep(mut self) {
        self.armed = false;
    }

    /// Tears the lab down now (what dropping it does).
    pub fn down(self) {}

    /// What `down_from_state` needs, and what a user of the lab wants to know: per node its
    /// namespace, underlay address, docker host, exec root, dirs, cgroup parent and the pids
    /// of its daemons.
    pub fn state(&self) -> Value {
        let nodes: Vec<Value> = self
            .nodes
            .iter()
            .map(|node| {
                json!({
                    "node": node.number,
                    "netns": node.netns,
                    "underlay_ip": node.underlay_ip.to_string(),
                    "docker_host": node.docker_host(),
                    "exec_root": node.exec_root(),
                    "run_dir": node.run_dir,
                    "lib_dir": node.lib_dir,
                    "cgroup_parent": node.cgroup_parent,
                    "containerd_pid": node.containerd_pid,
                    "dockerd_pid": node.dockerd_pid,
                })
            })
            .collect();
        json!({
            "tag": self.tag,
            "run_dir": self.run_dir,
            "lib_dir": self.lib_dir,
            "nodes": nodes,
        })
    }

    /// `<run dir>/state.json`: `swarm-lab down --state` on it removes the lab of a process
    /// that died before its `Drop` ran.
    pub fn state_file(&self) -> PathBuf {
        self.run_dir.join("state.json")
    }

    fn save_state(&self) {
        let text = serde_json::to_string_pretty(&self.state()).expect("JSON");
        if let Err(e) = fs::write(self.state_file(), text + "\n") {
            eprintln!(
                "swarm lab {}: write {}: {e}",
                self.tag,
                self.state_file().display()
            );
        }
    }

    /// Tears down exactly the lab `state` (from `state`) names; the daemons' pids are only
    /// signalled while their command lines still name the lab's paths.
    pub fn down_from_state(state: &Value) -> Result<(), String> {
        SwarmLab::from_state(state)?.down();
        Ok(())
    }

    fn from_state(state: &Value) -> Result<SwarmLab, String> {
        let text = |value: &Value, key: &str| -> Result<String, String> {
            value[key]
                .as_str()
                .map(str::to_owned)
                .ok_or_else(|| format!("state: no `{key}`"))
        };
        let tag = text(state, "tag")?;
        check_tag(&tag)?;
        // The names the tag gives are the only ones this code ever removes.
        let mut lab = SwarmLab::named(&tag);
        let saved_nodes = state["nodes"]
            .as_array()
            .filter(|nodes| nodes.len() == 2)
            .ok_or("state: `nodes` is not a list of two")?;
        for (node, saved) in lab.nodes.iter_mut().zip(saved_nodes) {
            for (key, ours) in [
                ("netns", node.netns.clone()),
                ("run_dir", node.run_dir.display().to_string()),
                ("lib_dir", node.lib_dir.display().to_string()),
                ("cgroup_parent", node.cgroup_parent.clone()),
            ] {
                let found = text(saved, key)?;
                if found != ours {
                    return Err(format!(
                        "state: node {} has {key} `{found}` where lab {tag} has `{ours}`; \
                         refusing to remove it",
                        node.number
                    ));
                }
            }
            let pid = |key: &str| saved[key].as_i64().and_then(|p| i32::try_from(p).ok());
            node.containerd_pid = pid("containerd_pid");
            node.dockerd_pid = pid("dockerd_pid");
        }
        lab.armed = true;
        Ok(lab)
    }

    /// Containers, swarm, daemons, mounts, cgroups, namespaces, dirs; never panics.
    fn teardown(&mut self) {
        // Containers first, while the managers still answer.
        for node in self.nodes.iter().filter(|node| node.answers()) {
            let ids = node.docker_status(&["ps", "-aq"]).1;
            for id in ids.split_whitespace() {
                node.docker_status(&["rm", "-f", id]);
            }
        }
        // The worker leaves, then the (only) manager.
        for node in self.nodes.iter().rev().filter(|node| node.answers()) {
            node.docker_status(&["swarm", "leave", "--force"]);
        }
        for node in &mut self.nodes {
            node.stop_daemons();
            unmount_below(&node.run_dir);
            unmount_below(&node.lib_dir);
            for cgroup in cgroup_dirs(&node.cgroup_parent) {
                remove_cgroup(&cgroup);
            }
            if let Err(e) = NetNs::delete(&node.netns) {
                eprintln!("swarm lab {}: {e}", self.tag);
            }
        }
        unmount_below(&self.run_dir);
        unmount_below(&self.lib_dir);
        for dir in [&self.run_dir, &self.lib_dir] {
            if let Err(e) = fs::remove_dir_all(dir)
                && e.kind() != std::io::ErrorKind::NotFound
            {
                eprintln!("swarm lab {}: remove {}: {e}", self.tag, dir.display());
            }
        }
    }
}

impl Drop for SwarmLab {
    fn drop(&mut self) {
        if self.armed {
            self.armed = false;
            self.teardown();
        }
    }
}

impl Node {
    pub fn number(&self) -> u8 {
        self.number
    }

    pub fn netns_name(&self) -> &str {
        &self.netns
    }

    /// /run/netns/NAME, for `in_netns_path`.
    pub fn netns_path(&self) -> PathBuf {
        Path::new("/run/netns").join(&self.netns)
    }

    pub fn underlay_ip(&self) -> Ipv4Addr {
        self.underlay_ip
    }

    fn socket(&self) -> PathBuf {
        self.run_dir.join("docker.sock")
    }

    /// `unix://...` of this node's dockerd.
    pub fn docker_host(&self) -> String {
        format!("unix://{}", self.socket().display())
    }

    /// dockerd's exec root: its namespaces are under `netns/`.
    pub fn exec_root(&self) -> PathBuf {
        self.run_dir.join("exec")
    }

    fn containerd_socket(&self) -> PathBuf {
        self.run_dir.join("containerd/containerd.sock")
    }

    fn containerd_config(&self) -> PathBuf {
        self.run_dir.join("containerd.toml")
    }

    /// `docker ARGS...` against this node (with a CLI config of the lab's own); returns
    /// exit code, stdout and stderr.
    pub fn docker_status(&self, args: &[&str]) -> (i32, String, String) {
        let out = Command::new("timeout")
            .args([DOCKER_TIMEOUT, DOCKER, "-H", &self.docker_host()])
            .args(args)
            .env("DOCKER_CONFIG", self.run_dir.join("cli"))
            .output()
            .unwrap_or_else(|e| panic!("cannot run {DOCKER}: {e}"));
        (
            out.status.code().unwrap_or(-1),
            String::from_utf8_lossy(&out.stdout).into_owned(),
            String::from_utf8_lossy(&out.stderr).into_owned(),
        )
    }

    /// `docker ARGS...` against this node; panics with stderr unless it succeeds. Returns
    /// stdout, trimmed.
    pub fn docker(&self, args: &[&str]) -> String {
        let (code, stdout, stderr) = self.docker_status(args);
        assert_eq!(
            code,
            0,
            "node {}: `docker {}` failed: {}",
            self.number,
            args.join(" "),
            stderr.trim()
        );
        stdout.trim().to_owned()
    }

    /// The namespace the overlay driver made for `network_id` on this node:
    /// `<exec-root>/netns/<epoch>-<first 10 chars of the id>`, the epoch 1 unless every local
    /// container left the network and one joined again. Docker makes it when the first local
    /// container joins; panics when it is not there.
    pub fn overlay_netns(&self, network_id: &str) -> PathBuf {
        let short = &network_id[..network_id.len().min(10)];
        let dir = self.exec_root().join("netns");
        let found: Vec<PathBuf> = fs::read_dir(&dir)
            .into_iter()
            .flatten()
            .flatten()
            .filter(|entry| {
                let name = entry.file_name();
                let name = name.to_string_lossy();
                name.split_once('-').is_some_and(|(epoch, id)| {
                    id == short && epoch.chars().all(|c| c.is_ascii_digit())
                })
            })
            .map(|entry| entry.path())
            .collect();
        match found.as_slice() {
            [one] => one.clone(),
            _ => panic!(
                "node {}: expected one overlay namespace N-{short} in {}, found {found:?}",
                self.number,
                dir.display()
            ),
        }
    }

    /// Runs `program ARGS...` (a host program) in this node's namespace.
    pub fn run_in(&self, program: &str, args: &[&str]) -> Output {
        in_netns_path(&self.netns_path(), program, args)
    }

    fn log(&self, daemon: &str) -> PathBuf {
        self.run_dir.join(format!("{daemon}.log"))
    }

    fn log_tail(&self, daemon: &str) -> String {
        let log = fs::read_to_string(self.log(daemon)).unwrap_or_default();
        let lines: Vec<&str> = log.lines().collect();
        lines[lines.len().saturating_sub(10)..].join("\n")
    }

    /// Starts containerd, then dockerd, each waited for; records their pids as soon as they
    /// run.
    fn start(&mut self) -> Result<(), String> {
        for dir in [
            self.run_dir.join("containerd"),
            self.run_dir.join("cli"),
            self.lib_dir.join("docker"),
            self.lib_dir.join("containerd"),
        ] {
            fs::create_dir_all(&dir)
                .map_err(|e| format!("node {}: create {}: {e}", self.number, dir.display()))?;
        }
        self.start_containerd()?;
        self.start_dockerd()
    }

    /// A containerd of the node's own: dockerd would otherwise adopt the system's at
    /// /run/containerd.
    fn start_containerd(&mut self) -> Result<(), String> {
        let config = format!(
            "version = 2\n\
             root = \"{lib}/containerd\"\n\
             state = \"{run}/containerd\"\n\
             disabled_plugins = [\"io.containerd.grpc.v1.cri\"]\n\
             [grpc]\n  address = \"{socket}\"\n\
             [debug]\n  address = \"{run}/containerd/debug.sock\"\n",
            lib = self.lib_dir.display(),
            run = self.run_dir.display(),
            socket = self.containerd_socket().display(),
        );
        fs::write(self.containerd_config(), config)
            .map_err(|e| format!("node {}: write containerd.toml: {e}", self.number))?;
        let mut command = Command::new("nsenter");
        command
            .arg(format!("--net={}", self.netns_path().display()))
            .arg(CONTAINERD)
            .arg("--config")
            .arg(self.containerd_config());
        let mut child = self.spawn_daemon("containerd", command)?;
        self.containerd_pid = Some(child.id() as i32);
        self.wait_for("containerd", &mut child, Duration::from_secs(20), |node| {
            node.containerd_socket().exists()
        })
    }

    fn start_dockerd(&mut self) -> Result<(), String> {
        let daemon_json = self.run_dir.join("daemon.json");
        // An empty config: never /etc/docker/daemon.json.
        fs::write(&daemon_json, "{}\n")
            .map_err(|e| format!("node {}: write daemon.json: {e}", self.number))?;
        let path = |p: PathBuf| p.to_str().unwrap().to_owned();
        let dockerd_args = [
            "--config-file".to_owned(),
            path(daemon_json),
            "--data-root".to_owned(),
            path(self.lib_dir.join("docker")),
            "--exec-root".to_owned(),
            path(self.exec_root()),
            "--pidfile".to_owned(),
            path(self.run_dir.join("dockerd.pid")),
            "-H".to_owned(),
            self.docker_host(),
            "--containerd".to_owned(),
            path(self.containerd_socket()),
            // Distinct per node, as on real hosts (the local bridge networks).
            "--default-address-pool".to_owned(),
            format!("base=10.20{}.0.0/16,size=24", self.number),
            "--cgroup-parent".to_owned(),
            self.cgroup_parent.clone(),
            "--storage-driver".to_owned(),
            "overlay2".to_owned(),
            "--log-level".to_owned(),
            "info".to_owned(),
        ];
        // unshare, sh and nsenter each exec the next: the pid spawned is dockerd's.
        let mut command = Command::new("unshare");
        command
            .args([
                "--uts",
                "--",
                "sh",
                "-c",
                r#"hostname "$1" && shift && exec nsenter "$@""#,
                "sh",
                &self.netns,
            ])
            .arg(format!("--net={}", self.netns_path().display()))
            .arg(DOCKERD)
            .args(&dockerd_args);
        let mut child = self.spawn_daemon("dockerd", command)?;
        self.dockerd_pid = Some(child.id() as i32);
        self.wait_for("dockerd", &mut child, Duration::from_secs(60), |node| {
            node.docker_status(&["version"]).0 == 0
        })
    }

    /// Spawns a daemon logging to `<run>/<name>.log`, in a process group of its own (a
    /// Ctrl-C meant for the test does not hit it before the teardown does).
    fn spawn_daemon(&self, name: &str, mut command: Command) -> Result<Child, String> {
        let log = File::create(self.log(name))
            .map_err(|e| format!("node {}: create {name}.log: {e}", self.number))?;
        command
            .env("PATH", SYSTEM_PATH)
            .stdin(Stdio::null())
            .stdout(log.try_clone().map_err(|e| e.to_string())?)
            .stderr(log)
            .process_group(0)
            .spawn()
            .map_err(|e| format!("node {}: cannot start {name}: {e}", self.number))
    }

    /// Waits until `ready` or `limit`; `Err` with the daemon's log when it exits or never
    /// gets ready.
    fn wait_for(
        &self,
        name: &str,
        child: &mut Child,
        limit: Duration,
        ready: impl Fn(&Node) -> bool,
    ) -> Result<(), String> {
        let started = Instant::now();
        loop {
            if ready(self) {
                return Ok(());
            }
            let exited = child.try_wait().ok().flatten();
            if exited.is_some() || started.elapsed() > limit {
                return Err(format!(
                    "node {}: {name} did not come up ({}); {} ends:\n{}",
                    self.number,
                    match exited {
                        Some(status) => format!("exited with {status}"),
                        None => format!("not ready within {limit:?}"),
                    },
                    self.log(name).display(),
                    self.log_tail(name)
                ));
            }
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    /// Whether this node's dockerd runs and answers.
    fn answers(&self) -> bool {
        self.dockerd_pid.is_some_and(alive)
            && self.socket().exists()
            && Command::new("timeout")
                .args(["10", DOCKER, "-H", &self.docker_host(), "version"])
                .env("DOCKER_CONFIG", self.run_dir.join("cli"))
                .output()
                .is_ok_and(|out| out.status.success())
    }

    /// dockerd, whatever else of this node still runs (containerd shims, container
    /// processes in the node's cgroups), then containerd.
    fn stop_daemons(&mut self) {
        let marker = format!("{}/", self.run_dir.display());
        if let Some(pid) = self.dockerd_pid.take() {
            kill_ours(pid, &self.exec_root().display().to_string());
        }
        let containerd = self.containerd_pid.take();
        for pid in pids_with(&marker) {
            if Some(pid) != containerd {
                kill_ours(pid, &marker);
            }
        }
        // Container processes carry no path of ours, but these cgroups are the lab's alone.
        for cgroup in cgroup_dirs(&self.cgroup_parent) {
            for pid in cgroup_procs(&cgroup) {
                unsafe { libc::kill(pid, libc::SIGKILL) };
            }
        }
        if let Some(pid) = containerd {
            kill_ours(pid, &self.containerd_config().display().to_string());
        }
        for pid in pids_with(&marker) {
            kill_ours(pid, &marker);
        }
    }
}

/// Runs host program `program ARGS...` in the network namespace at `path` (a container's
/// SandboxKey, an overlay namespace, /run/netns/NAME) with `nsenter --net=PATH`.
pub fn in_netns_path(path: &Path, program: &str, args: &[&str]) -> Output {
    Command::new("nsenter")
        .arg(format!("--net={}", path.display()))
        .arg(program)
        .args(args)
        .env("PATH", SYSTEM_PATH)
        .output()
        .unwrap_or_else(|e| panic!("cannot run nsenter {program}: {e}"))
}

/// Tags become parts of namespace names, paths and cgroups.
fn check_tag(tag: &str) -> Result<(), String> {
    let valid = !tag.is_empty()
        && tag.len() <= 24
        && tag.chars().all(|c| c.is_ascii_alphanumeric() || c == '-');
    if valid {
        Ok(())
    } else {
        Err(format!(
            "lab tag `{tag}`: use 1 to 24 letters, digits or `-` (it names namespaces and paths)"
        ))
    }
}

/// Whether `pid` runs (a zombie does not).
fn alive(pid: i32) -> bool {
    fs::read_to_string(format!("/proc/{pid}/stat")).is_ok_and(|stat| {
        // The state follows the command name, which is in parentheses and may hold spaces.
        stat.rsplit_once(')')
            .and_then(|(_, rest)| rest.split_whitespace().next())
            .is_some_and(|state| state != "Z")
    })
}

fn cmdline(pid: i32) -> String {
    let raw = fs::read(format!("/proc/{pid}/cmdline")).unwrap_or_default();
    String::from_utf8_lossy(&raw).replace('\0', " ")
}

/// Every process but this one whose command line contains `text`.
fn pids_with(text: &str) -> Vec<i32> {
    let me = std::process::id() as i32;
    fs::read_dir("/proc")
        .into_iter()
        .flatten()
        .flatten()
        .filter_map(|entry| entry.file_name().to_str()?.parse::<i32>().ok())
        .filter(|&pid| pid != me && cmdline(pid).contains(text))
        .collect()
}

/// Stops `pid` (SIGTERM; SIGKILL after 30 s) if it is still ours: its command line contains
/// `marker`, a path only this lab uses. A pid reused by someone else is left alone.
fn kill_ours(pid: i32, marker: &str) {
    if !alive(pid) {
        reap(pid);
        return;
    }
    if !cmdline(pid).contains(marker) {
        eprintln!("swarm lab: pid {pid} is not ours (no `{marker}`); left alone");
        return;
    }
    for (signal, limit) in [
        (libc::SIGTERM, Duration::from_secs(30)),
        (libc::SIGKILL, Duration::from_secs(5)),
    ] {
        unsafe { libc::kill(pid, signal) };
        let started = Instant::now();
        while started.elapsed() < limit {
            if !alive(pid) {
                // Reaped after it died, or a child of ours would stay a zombie.
                reap(pid);
                return;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }
    eprintln!("swarm lab: pid {pid} survived SIGKILL");
}

/// Collects `pid`'s exit status if it is a child of this process (no zombie is left).
fn reap(pid: i32) {
    unsafe { libc::waitpid(pid, std::ptr::null_mut(), libc::WNOHANG) };
}

/// The cgroup directories of `parent` (`/name`): one per v1 controller, or the v2 one.
fn cgroup_dirs(parent: &str) -> Vec<PathBuf> {
    let relative = parent.trim_start_matches('/');
    let root = Path::new("/sys/fs/cgroup");
    let mut dirs: Vec<PathBuf> = fs::read_dir(root)
        .into_iter()
        .flatten()
        .flatten()
        .map(|controller| controller.path().join(relative))
        .collect();
    dirs.push(root.join(relative));
    dirs.retain(|dir| dir.is_dir());
    dirs
}

/// Pids in `cgroup` and the cgroups below it.
fn cgroup_procs(cgroup: &Path) -> Vec<i32> {
    let mut pids: Vec<i32> = fs::read_to_string(cgroup.join("cgroup.procs"))
        .unwrap_or_default()
        .lines()
        .filter_map(|line| line.trim().parse().ok())
        .collect();
    for child in fs::read_dir(cgroup).into_iter().flatten().flatten() {
        if child.path().is_dir() {
            pids.extend(cgroup_procs(&child.path()));
        }
    }
    pids
}

/// Removes an (empty) cgroup and the cgroups below it, deepest first: a cgroup directory
/// goes with rmdir, never with its files.
fn remove_cgroup(cgroup: &Path) {
    for child in fs::read_dir(cgroup).into_iter().flatten().flatten() {
        if child.path().is_dir() {
            remove_cgroup(&child.path());
        }
    }
    if let Err(e) = fs::remove_dir(cgroup) {
        eprintln!("swarm lab: remove cgroup {}: {e}", cgroup.display());
    }
}

/// Lazily unmounts whatever is still mounted under `dir` (overlay2 layers, namespace bind
/// mounts of a daemon killed hard), deepest first.
fn unmount_below(dir: &Path) {
    let mounts = fs::read_to_string("/proc/self/mountinfo").unwrap_or_default();
    let mut below: Vec<&str> = mounts
        .lines()
        .filter_map(|line| line.split_whitespace().nth(4))
        .filter(|point| Path::new(point).starts_with(dir))
        .collect();
    below.sort_by_key(|point| std::cmp::Reverse(point.len()));
    for point in below {
        if let Ok(point) = std::ffi::CString::new(point) {
            unsafe { libc::umount2(point.as_ptr(), libc::MNT_DETACH) };
        }
    }
}
