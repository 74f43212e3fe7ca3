//! A CNI runtime without a runtime: runs a conflist's plugins the way libcni does (name and
//! cniVersion injected, prevResult threaded through ADD, the ADD result cached and replayed to
//! DEL in reverse order and to CHECK, runtimeConfig only for the capabilities a plugin declares).
//! Plugins run inside the test's "host" namespace; each call's wall time is recorded.

use std::{
    fmt,
    io::Write as _,
    path::{Path, PathBuf},
    process::{Command, Stdio},
    time::{Duration, Instant},
};

use serde_json::{Value, json};

/// The plugins from containernetworking-plugins a chain may use, found in /usr/lib/cni.
pub const SYSTEM_PLUGINS: [&str; 5] = ["bridge", "host-local", "portmap", "firewall", "loopback"];
/// Where Debian's containernetworking-plugins puts them.
pub const SYSTEM_PLUGIN_DIR: &str = "/usr/lib/cni";

/// The `xbr-cni` binary built beside these tests (`cargo build -p bridge-user` builds it next
/// to `xbr`). `XBR_CNI` overrides the path.
pub fn xbr_cni_binary() -> PathBuf {
    crate::witness::built_binary("xbr-cni", "XBR_CNI")
}

/// Whether containernetworking-plugins is installed (`cargo xtask setup` installs it).
pub fn system_plugins_installed() -> bool {
    SYSTEM_PLUGINS
        .iter()
        .all(|p| Path::new(SYSTEM_PLUGIN_DIR).join(p).exists())
}

/// A directory of a test's own under the system's temp dir, removed with all it holds on drop.
pub struct TempDir {
    pub path: PathBuf,
}

impl TempDir {
    pub fn new(prefix: &str) -> TempDir {
        let path = std::env::temp_dir().join(crate::lab_support::unique_name(prefix));
        std::fs::create_dir_all(&path)
            .unwrap_or_else(|e| panic!("create temp dir {}: {e}", path.display()));
        TempDir { path }
    }

    pub fn join(&self, name: &str) -> PathBuf {
        self.path.join(name)
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.path);
    }
}

/// A CNI_PATH of the test's own: symlinks to the system plugins and to the built `xbr-cni`.
pub struct CniPath {
    dir: TempDir,
}

impl CniPath {
    pub fn new() -> CniPath {
        let dir = TempDir::new("xbrcnibin");
        for plugin in SYSTEM_PLUGINS {
            std::os::unix::fs::symlink(Path::new(SYSTEM_PLUGIN_DIR).join(plugin), dir.join(plugin))
                .unwrap_or_else(|e| panic!("symlink {plugin}: {e}"));
        }
        std::os::unix::fs::symlink(xbr_cni_binary(), dir.join("xbr-cni")).expect("symlink xbr-cni");
        CniPath { dir }
    }

    pub fn dir(&self) -> &Path {
        &self.dir.path
    }
}

impl Default for CniPath {
    fn default() -> CniPath {
        CniPath::new()
    }
}

/// The `bridge` plugin on `bridge` (created in the host namespace), containers' gateway at the
/// bridge, IPs from `subnet` through host-local keeping its leases under `ipam_dir`.
pub fn bridge_plugin(bridge: &str, subnet: &str, ipam_dir: &Path) -> Value {
    json!({
        "type": "bridge",
        "bridge": bridge,
        "isGateway": true,
        "ipMasq": false,
        "hairpinMode": true,
        "ipam": {
            "type": "host-local",
            "dataDir": ipam_dir,
            "routes": [{ "dst": "0.0.0.0/0" }],
            "ranges": [[{ "subnet": subnet }]],
        },
    })
}

/// xbr-cni's entry: never the machine's root cgroup (`socketHooks: false`), pins under `pin_root`.
pub fn xbr_cni_plugin(pin_root: &Path, uplinks: &[&str]) -> Value {
    let mut plugin = json!({
        "type": "xbr-cni",
        "capabilities": { "portMappings": true },
        "pinRoot": pin_root,
        "socketHooks": false,
    });
    if !uplinks.is_empty() {
        plugin["uplinks"] = json!(uplinks);
    }
    plugin
}

/// A network configuration list of `plugins`.
pub fn conflist(name: &str, version: &str, plugins: Vec<Value>) -> Value {
    json!({ "cniVersion": version, "name": name, "plugins": plugins })
}

/// What the runtime knows about one container's attachment to the network.
#[derive(Clone, Debug)]
pub struct Attachment {
    pub container_id: String,
    /// CNI_NETNS: the container's namespace, e.g. /run/netns/NAME.
    pub netns: PathBuf,
    pub ifname: String,
    /// CNI_ARGS.
    pub args: String,
    /// Capability arguments (`{"portMappings": [...]}`): a plugin gets those it declares.
    pub capability_args: Value,
}

impl Attachment {
    /// eth0 of the container in namespace `netns` (as `ip netns add` names it).
    pub fn new(container_id: &str, netns: &str) -> Attachment {
        Attachment {
            container_id: container_id.to_owned(),
            netns: PathBuf::from(format!("/run/netns/{netns}")),
            ifname: "eth0".to_owned(),
            args: "IgnoreUnknown=1".to_owned(),
            capability_args: json!({}),
        }
    }

    pub fn with_port_mappings(mut self, mappings: Value) -> Attachment {
        self.capability_args["portMappings"] = mappings;
        self
    }
}

/// One plugin's run within a chain call.
#[derive(Clone, Debug)]
pub struct PluginCall {
    pub plugin: String,
    pub command: String,
    /// When the plugin started, since the chain call started.
    pub started: Duration,
    /// The plugin's wall time (including the `nsenter` in front of it, about a millisecond).
    pub elapsed: Duration,
}

impl PluginCall {
    /// Since the chain call started, when the plugin returned.
    pub fn finished(&self) -> Duration {
        self.started + self.elapsed
    }
}

/// A chain call that succeeded.
#[derive(Clone, Debug)]
pub struct ChainRun {
    /// ADD: the last plugin's result (the one cached); otherwise None.
    pub result: Option<Value>,
    pub calls: Vec<PluginCall>,
    pub elapsed: Duration,
}

impl ChainRun {
    /// The call of plugin `plugin` (its type), if it ran.
    pub fn call(&self, plugin: &str) -> Option<&PluginCall> {
        self.calls.iter().find(|c| c.plugin == plugin)
    }
}

/// A plugin that failed: what it said (a CNI error object on stdout), and its stderr.
#[derive(Clone, Debug)]
pub struct CniFailure {
    pub plugin: String,
    pub command: String,
    pub exit_code: Option<i32>,
    pub stdout: String,
    pub stderr: String,
    /// The input the plugin got.
    pub input: String,
}

impl CniFailure {
    /// The error object the plugin printed, if it printed one.
    pub fn error(&self) -> Option<Value> {
        serde_json::from_str(self.stdout.trim()).ok()
    }

    pub fn code(&self) -> Option<u64> {
        self.error().and_then(|e| e["code"].as_u64())
    }
}

impl fmt::Display for CniFailure {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "plugin {} failed on {} (exit {:?}): stdout {:?}, stderr {:?}; input {}",
            self.plugin,
            self.command,
            self.exit_code,
            self.stdout.trim(),
            self.stderr.trim(),
            self.input
        )
    }
}

impl std::error::Error for CniFailure {}

/// A network: a conflist, the plugins' CNI_PATH, the namespace they run in and the result cache.
pub struct Network {
    pub conflist: Value,
    pub cni_path: PathBuf,
    /// Name of the namespace (under /run/netns) the plugins run in: the containers' "host".
    pub host_netns: String,
    cache: PathBuf,
}

impl Network {
    /// `cache` holds the ADD results (a directory the test removes).
    pub fn new(conflist: Value, cni_path: &Path, host_netns: &str, cache: &Path) -> Network {
        std::fs::create_dir_all(cache).expect("create the result cache");
        Network {
            conflist,
            cni_path: cni_path.to_owned(),
            host_netns: host_netns.to_owned(),
            cache: cache.to_owned(),
        }
    }

    pub fn name(&self) -> &str {
        self.conflist["name"].as_str().expect("conflist has a name")
    }

    pub fn version(&self) -> &str {
        self.conflist["cniVersion"]
            .as_str()
            .expect("conflist has a cniVersion")
    }

    fn plugins(&self) -> &[Value] {
        self.conflist["plugins"]
            .as_array()
            .expect("conflist has plugins")
    }

    fn cache_file(&self, attachment: &Attachment) -> PathBuf {
        self.cache.join(format!(
            "{}-{}-{}.json",
            self.name(),
            attachment.container_id,
            attachment.ifname
        ))
    }

    /// The cached ADD result of `attachment`, as DEL and CHECK will replay it.
    pub fn cached_result(&self, attachment: &Attachment) -> Option<Value> {
        let text = std::fs::read_to_string(self.cache_file(attachment)).ok()?;
        serde_json::from_str(&text).ok()
    }

    /// Caches `result` as `attachment`'s ADD result (a runtime whose DEL is retried).
    pub fn remember(&self, attachment: &Attachment, result: &Value) {
        std::fs::write(self.cache_file(attachment), result.to_string())
            .expect("cache the ADD result");
    }

    /// Forgets `attachment`'s cached result (a runtime that lost its cache: DEL without
    /// prevResult).
    pub fn forget(&self, attachment: &Attachment) {
        let _ = std::fs::remove_file(self.cache_file(attachment));
    }

    /// Plugin `index`'s configuration as libcni hands it over.
    fn plugin_config(&self, index: usize, prev: Option<&Value>, attachment: &Attachment) -> Value {
        let mut config = self.plugins()[index].clone();
        config["name"] = json!(self.name());
        config["cniVersion"] = json!(self.version());
        if let Some(prev) = prev {
            config["prevResult"] = prev.clone();
        }
        let declared = config["capabilities"]
            .as_object()
            .cloned()
            .unwrap_or_default();
        let mut runtime = serde_json::Map::new();
        for (capability, value) in attachment.capability_args.as_object().into_iter().flatten() {
            if declared.get(capability) == Some(&Value::Bool(true)) {
                runtime.insert(capability.clone(), value.clone());
            }
        }
        if !runtime.is_empty() {
            config["runtimeConfig"] = Value::Object(runtime);
        }
        config
    }

    fn find_plugin(&self, plugin: &str) -> PathBuf {
        let path = self.cni_path.join(plugin);
        assert!(
            path.exists(),
            "plugin {plugin} not found in CNI_PATH {}",
            self.cni_path.display()
        );
        path
    }

    /// Runs one plugin with `command` and `config` on stdin, inside the host namespace (through
    /// `nsenter --net`, which keeps the mount namespace: bpffs pins stay visible).
    pub fn exec(
        &self,
        plugin: &str,
        command: &str,
        config: &Value,
        attachment: Option<&Attachment>,
    ) -> Result<(Value, Duration), Box<CniFailure>> {
        let binary = self.find_plugin(plugin);
        let input = config.to_string();
        let mut process = Command::new("nsenter");
        process
            .arg(format!("--net=/run/netns/{}", self.host_netns))
            .arg(&binary)
            .env("CNI_COMMAND", command)
            .env("CNI_PATH", &self.cni_path)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        match attachment {
            Some(a) => {
                process
                    .env("CNI_CONTAINERID", &a.container_id)
                    .env("CNI_NETNS", &a.netns)
                    .env("CNI_IFNAME", &a.ifname)
                    .env("CNI_ARGS", &a.args);
            }
            // VERSION, GC, STATUS: as libcni, dummies for what has no container.
            None => {
                process
                    .env("CNI_CONTAINERID", "")
                    .env("CNI_NETNS", "")
                    .env("CNI_IFNAME", "")
                    .env("CNI_ARGS", "");
            }
        }
        let started = Instant::now();
        let mut child = process
            .spawn()
            .unwrap_or_else(|e| panic!("spawn nsenter for plugin {plugin}: {e}"));
        let mut stdin = child.stdin.take().expect("plugin stdin");
        let _ = stdin.write_all(input.as_bytes());
        drop(stdin);
        let output = child.wait_with_output().expect("wait for the plugin");
        let elapsed = started.elapsed();
        let stdout = String::from_utf8_lossy(&output.stdout).into_owned();
        let failure = || CniFailure {
            plugin: plugin.to_owned(),
            command: command.to_owned(),
            exit_code: output.status.code(),
            stdout: stdout.clone(),
            stderr: String::from_utf8_lossy(&output.stderr).into_owned(),
            input: input.clone(),
        };
        if !output.status.success() {
            return Err(Box::new(failure()));
        }
        let value = if stdout.trim().is_empty() {
            Value::Null
        } else {
            serde_json::from_str(stdout.trim()).map_err(|_| Box::new(failure()))?
        };
        Ok((value, elapsed))
    }

    /// ADD through the whole chain; the last result is cached (and returned).
    pub fn add(&self, attachment: &Attachment) -> Result<ChainRun, Box<CniFailure>> {
        let chain_started = Instant::now();
        let mut prev: Option<Value> = None;
        let mut calls = Vec::new();
        for (index, plugin) in self.plugins().iter().enumerate() {
            let kind = plugin["type"].as_str().expect("plugin has a type");
            let config = self.plugin_config(index, prev.as_ref(), attachment);
            let started = chain_started.elapsed();
            let (result, elapsed) = self.exec(kind, "ADD", &config, Some(attachment))?;
            calls.push(PluginCall {
                plugin: kind.to_owned(),
                command: "ADD".to_owned(),
                started,
                elapsed,
            });
            prev = Some(result);
        }
        let result = prev.expect("a chain has plugins");
        std::fs::write(self.cache_file(attachment), result.to_string())
            .expect("cache the ADD result");
        Ok(ChainRun {
            result: Some(result),
            calls,
            elapsed: chain_started.elapsed(),
        })
    }

    /// DEL through the chain in reverse order, the cached ADD result as prevResult (none when
    /// nothing is cached); the cache entry goes once every plugin succeeded.
    pub fn del(&self, attachment: &Attachment) -> Result<ChainRun, Box<CniFailure>> {
        let prev = self.cached_result(attachment);
        let order: Vec<usize> = (0..self.plugins().len()).rev().collect();
        let run = self.each("DEL", &order, prev.as_ref(), attachment)?;
        self.forget(attachment);
        Ok(run)
    }

    /// CHECK through the chain in order, the cached ADD result as prevResult.
    pub fn check(&self, attachment: &Attachment) -> Result<ChainRun, Box<CniFailure>> {
        let prev = self.cached_result(attachment);
        let order: Vec<usize> = (0..self.plugins().len()).collect();
        self.each("CHECK", &order, prev.as_ref(), attachment)
    }

    /// Where the plugin of type `plugin` stands in the list.
    fn plugin_index(&self, plugin: &str) -> usize {
        self.plugins()
            .iter()
            .position(|p| p["type"] == plugin)
            .unwrap_or_else(|| panic!("no plugin {plugin} in the list"))
    }

    /// CHECK on the plugin of type `plugin` alone, the cached ADD result as prevResult.
    pub fn check_plugin(
        &self,
        plugin: &str,
        attachment: &Attachment,
    ) -> Result<ChainRun, Box<CniFailure>> {
        let prev = self.cached_result(attachment);
        let index = self.plugin_index(plugin);
        self.each("CHECK", &[index], prev.as_ref(), attachment)
    }

    fn each(
        &self,
        command: &str,
        order: &[usize],
        prev: Option<&Value>,
        attachment: &Attachment,
    ) -> Result<ChainRun, Box<CniFailure>> {
        let chain_started = Instant::now();
        let mut calls = Vec::new();
        for &index in order {
            let kind = self.plugins()[index]["type"]
                .as_str()
                .expect("plugin has a type");
            let config = self.plugin_config(index, prev, attachment);
            let started = chain_started.elapsed();
            let (_, elapsed) = self.exec(kind, command, &config, Some(attachment))?;
            calls.push(PluginCall {
                plugin: kind.to_owned(),
                command: command.to_owned(),
                started,
                elapsed,
            });
        }
        Ok(ChainRun {
            result: None,
            calls,
            elapsed: chain_started.elapsed(),
        })
    }

    /// Runs `command` (VERSION, GC, STATUS) on the plugin of type `plugin` alone, with its
    /// configuration from the list plus `extra` keys (e.g. GC's `cni.dev/valid-attachments`).
    pub fn call_alone(
        &self,
        plugin: &str,
        command: &str,
        extra: Value,
    ) -> Result<Value, Box<CniFailure>> {
        let index = self.plugin_index(plugin);
        let empty = Attachment::new("", "");
        let mut config = self.plugin_config(index, None, &empty);
        for (key, value) in extra.as_object().into_iter().flatten() {
            config[key] = value.clone();
        }
        self.exec(plugin, command, &config, None)
            .map(|(value, _)| value)
    }

    /// One plugin's ADD with a `prevResult` of the test's making (the chain's earlier plugins
    /// do not run); the result is cached as the chain's.
    pub fn add_alone(
        &self,
        plugin: &str,
        prev: &Value,
        attachment: &Attachment,
    ) -> Result<Value, Box<CniFailure>> {
        let index = self.plugin_index(plugin);
        let config = self.plugin_config(index, Some(prev), attachment);
        let (result, _) = self.exec(plugin, "ADD", &config, Some(attachment))?;
        std::fs::write(self.cache_file(attachment), result.to_string())
            .expect("cache the ADD result");
        Ok(result)
    }
}

/// The container's interface in a result: (host veth name, container MAC, IPv4 address).
pub fn endpoint_of(result: &Value, ifname: &str) -> (String, String, std::net::Ipv4Addr) {
    let interfaces = result["interfaces"].as_array().expect("result interfaces");
    let container = interfaces
        .iter()
        .position(|i| i["name"] == ifname && i["sandbox"].is_string())
        .unwrap_or_else(|| panic!("no {ifname} with a sandbox in {result}"));
    let mac = interfaces[container]["mac"]
        .as_str()
        .expect("container MAC")
        .to_owned();
    // The bridge plugin lists bridge, host veth, container interface.
    let veth = interfaces
        .iter()
        .take(container)
        .rfind(|i| i["sandbox"].is_null())
        .and_then(|i| i["name"].as_str())
        .expect("host veth before the container interface")
        .to_owned();
    let address = result["ips"]
        .as_array()
        .into_iter()
        .flatten()
        .filter(|ip| ip["interface"].as_u64() == Some(container as u64))
        .find_map(|ip| {
            let cidr = ip["address"].as_str()?;
            cidr.split('/').next()?.parse().ok()
        })
        .unwrap_or_else(|| panic!("no IPv4 address for {ifname} in {result}"));
    (veth, mac, address)
}

/// Verdict `name` summed over the bridges of `xbr stats --json`'s output.
pub fn verdict_total(stats: &Value, name: &str) -> u64 {
    stats["verdicts"]
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(|v| v[name].as_u64())
        .sum()
}

/// Median and 99th percentile (nearest rank) of `samples`.
pub fn median_p99(samples: &[Duration]) -> (Duration, Duration) {
    assert!(!samples.is_empty(), "no samples");
    let mut sorted = samples.to_vec();
    sorted.sort();
    let rank = |p: f64| {
        let index = ((p * sorted.len() as f64).ceil() as usize).clamp(1, sorted.len()) - 1;
        sorted[index]
    };
    (rank(0.5), rank(0.99))
}
