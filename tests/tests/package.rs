//! The Debian package: `cargo xtask package` builds it with cargo-deb, then this test reads it
//! the way dpkg will: its control fields, exactly which files it holds, the unit it ships
//! (`systemd-analyze verify`, the ExecStart and capability lines the README documents), and an
//! install plus purge into a scratch root that leaves nothing behind. The machine's own dpkg
//! database, systemd and /etc are never touched: dpkg runs with `--root` on a scratch directory
//! and `--force-script-chrootless`, and the maintainer scripts find recording stand-ins for
//! deb-systemd-helper, deb-systemd-invoke and systemctl first on their PATH.
//!
//! An upgrade under a stream: the installed binary's follower stops, the package is installed
//! over itself, a new follower starts; not one datagram of a stream through the fast path is
//! lost. Running the unit's ExecStart against a real dockerd is the Swarm test's business.

use std::collections::BTreeSet;
use std::io::Read as _;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use xbr_tests::{
    lab_support::{LabBuilder, unique_name},
    skip::skip,
    witness::{BridgeForwardCounter, PinRoot, stream_a_to_b, tc_programs},
};

const TEST: &str = "package";
/// Building the release binaries from nothing, and `cargo install cargo-deb` on a clean machine.
const BUILD_DEADLINE: Duration = Duration::from_secs(40 * 60);

/// Every file (not directory) the package holds; dpkg-deb lists them with a leading `./`.
const EXPECTED_FILES: [&str; 10] = [
    "./etc/default/xbr",
    "./usr/lib/cni/xbr-cni",
    "./usr/lib/systemd/system/xbr.service",
    "./usr/sbin/xbr",
    "./usr/share/bash-completion/completions/xbr",
    "./usr/share/doc/xbr/changelog.Debian.gz",
    "./usr/share/doc/xbr/copyright",
    "./usr/share/fish/vendor_completions.d/xbr.fish",
    "./usr/share/man/man8/xbr.8.gz",
    "./usr/share/zsh/vendor-completions/_xbr",
];

/// The unit's lines this test and the README promise.
const EXEC_START: &str = "ExecStart=/usr/sbin/xbr follow $XBR_OPTS";
const CAPABILITIES: [&str; 2] = [
    "CapabilityBoundingSet=CAP_BPF CAP_NET_ADMIN CAP_SYS_ADMIN",
    "AmbientCapabilities=CAP_BPF CAP_NET_ADMIN CAP_SYS_ADMIN",
];

fn workspace_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("tests/ lives one level below the workspace root")
        .to_owned()
}

/// Runs a command to completion; panics, with its stderr, unless it exits 0.
fn output(command: &mut Command) -> String {
    let shown = format!("{command:?}");
    let output = command
        .stdin(Stdio::null())
        .output()
        .unwrap_or_else(|e| panic!("cannot start {shown}: {e}"));
    assert!(
        output.status.success(),
        "{shown} failed ({}):\n{}{}",
        output.status,
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );
    String::from_utf8(output.stdout).expect("UTF-8 output")
}

fn have(program: &str) -> bool {
    Command::new("sh")
        .args(["-c", &format!("command -v {program}")])
        .stdout(Stdio::null())
        .status()
        .is_ok_and(|status| status.success())
}

/// `cargo xtask package` (as `cargo run --release -p xtask -- package`: release, like the
/// suite, so its dependencies are built already), under a deadline; returns the
/// .deb's path from its output. `XBR_DEB` names an already built package instead.
fn build_package() -> PathBuf {
    if let Some(deb) = std::env::var_os("XBR_DEB") {
        return PathBuf::from(deb);
    }
    let cargo = std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into());
    let mut child = Command::new(cargo)
        .args(["run", "-q", "--release", "-p", "xtask", "--", "package"])
        .current_dir(workspace_root())
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .spawn()
        .expect("start `cargo run -p xtask -- package`");
    let mut stdout = child.stdout.take().expect("piped stdout");
    let reader = std::thread::spawn(move || {
        let mut text = String::new();
        let _ = stdout.read_to_string(&mut text);
        text
    });
    let started = Instant::now();
    let status = loop {
        if let Some(status) = child.try_wait().expect("wait for cargo") {
            break status;
        }
        if started.elapsed() > BUILD_DEADLINE {
            let _ = child.kill();
            let _ = child.wait();
            panic!("`cargo xtask package` took more than {BUILD_DEADLINE:?}");
        }
        std::thread::sleep(Duration::from_millis(200));
    };
    let text = reader.join().expect("stdout reader");
    assert!(
        status.success(),
        "`cargo xtask package` failed ({status}):\n{text}"
    );
    println!(
        "cargo xtask package took {:.0?}:\n{text}",
        started.elapsed()
    );
    let deb = text
        .lines()
        .find_map(|line| line.strip_prefix("the package is at "))
        .unwrap_or_else(|| panic!("`cargo xtask package` named no .deb:\n{text}"));
    PathBuf::from(deb.trim())
}

/// A scratch directory under the target dir, removed when dropped.
struct Scratch(PathBuf);

impl Scratch {
    fn new() -> Scratch {
        let exe = std::env::current_exe().expect("test binary path");
        let dir = exe
            .parent()
            .expect("target/<profile>/deps")
            .join(format!("package-test-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).expect("create the scratch directory");
        Scratch(dir)
    }
}

impl Drop for Scratch {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// Every file and symlink below `dir`, relative to it, skipping `skipped` subtrees.
fn files_below(dir: &Path, skipped: &[&Path]) -> BTreeSet<PathBuf> {
    let mut found = BTreeSet::new();
    let mut pending = vec![dir.to_owned()];
    while let Some(current) = pending.pop() {
        if skipped.iter().any(|s| current == dir.join(s)) {
            continue;
        }
        for entry in std::fs::read_dir(&current).expect("read the scratch root") {
            let entry = entry.expect("directory entry");
            let kind = entry.file_type().expect("file type");
            if kind.is_dir() {
                pending.push(entry.path());
            } else {
                found.insert(entry.path().strip_prefix(dir).unwrap().to_owned());
            }
        }
    }
    found
}

#[test]
fn package() {
    for tool in ["dpkg", "dpkg-deb", "systemd-analyze"] {
        if !have(tool) {
            skip(TEST, &format!("{tool} is not installed"));
            return;
        }
    }
    let deb = build_package();
    assert!(deb.is_file(), "{} is not there", deb.display());

    control_fields(&deb);
    contents(&deb);

    let scratch = Scratch::new();
    let extracted = scratch.0.join("extracted");
    output(Command::new("dpkg-deb").arg("-x").arg(&deb).arg(&extracted));
    let control = scratch.0.join("control");
    output(Command::new("dpkg-deb").arg("-e").arg(&deb).arg(&control));
    unit(&extracted, &scratch.0);
    generated_files(&extracted);
    maintainer_scripts(&control);

    if !is_root() {
        skip(
            &format!("{TEST} (install into a scratch root)"),
            "dpkg --root needs root to give the files their owner",
        );
        return;
    }
    install_and_purge(&deb, &scratch.0);
}

fn is_root() -> bool {
    // SAFETY: geteuid has no preconditions.
    unsafe { libc::geteuid() == 0 }
}

/// Package, Version (the changelog's newest entry), Architecture, Depends, Section.
fn control_fields(deb: &Path) {
    let field = |name: &str| {
        output(Command::new("dpkg-deb").arg("--field").arg(deb).arg(name))
            .trim()
            .to_owned()
    };
    println!(
        "{}",
        output(Command::new("dpkg-deb").arg("--info").arg(deb))
    );
    assert_eq!(field("Package"), "xbr");
    let changelog = std::fs::read_to_string(workspace_root().join("packaging/changelog"))
        .expect("packaging/changelog");
    let newest = changelog
        .lines()
        .next()
        .and_then(|line| line.split_once('(')?.1.split_once(')'))
        .map(|(version, _)| version.to_owned())
        .expect("a first changelog line `xbr (VERSION) ...`");
    assert_eq!(
        field("Version"),
        newest,
        "the package's version and packaging/changelog's newest entry differ: bump both"
    );
    assert_eq!(
        field("Version"),
        format!("{}-1", xbr_version()),
        "Version is bridge-user's version, Debian revision 1"
    );
    assert_eq!(field("Architecture"), "amd64");
    assert_eq!(field("Section"), "net");
    let depends = field("Depends");
    let names: BTreeSet<&str> = depends
        .split(',')
        .map(|d| d.split_whitespace().next().unwrap_or(""))
        .collect();
    for needed in ["libc6", "nftables", "iptables"] {
        assert!(names.contains(needed), "Depends lacks {needed}: {depends}");
    }
    assert_eq!(names.len(), 3, "unexpected Depends: {depends}");
}

/// bridge-user's version, from its manifest.
fn xbr_version() -> String {
    let manifest = std::fs::read_to_string(workspace_root().join("bridge-user/Cargo.toml"))
        .expect("bridge-user/Cargo.toml");
    manifest
        .lines()
        .find_map(|line| line.strip_prefix("version = "))
        .map(|v| v.trim_matches('"').to_owned())
        .expect("bridge-user's version")
}

/// Exactly the expected files, with their modes and owner.
fn contents(deb: &Path) {
    let listing = output(Command::new("dpkg-deb").arg("--contents").arg(deb));
    println!("{listing}");
    let mut files = BTreeSet::new();
    for line in listing.lines() {
        // -rwxr-xr-x 0/0   123 2026-12-01 06:00 ./usr/sbin/xbr
        let fields: Vec<&str> = line.split_whitespace().collect();
        let (mode, owner, path) = (fields[0], fields[1], fields[5]);
        assert!(owner == "0/0" || owner == "root/root", "{line}");
        if mode.starts_with('d') {
            continue;
        }
        let executable = path == "./usr/sbin/xbr" || path == "./usr/lib/cni/xbr-cni";
        let expected_mode = if executable {
            "-rwxr-xr-x"
        } else {
            "-rw-r--r--"
        };
        assert_eq!(mode, expected_mode, "{line}");
        files.insert(path.to_owned());
    }
    let expected: BTreeSet<String> = EXPECTED_FILES.iter().map(|f| f.to_string()).collect();
    assert_eq!(files, expected, "the package's files");
}

/// The unit: the promised lines, and `systemd-analyze verify` on it with its ExecStart pointed
/// at the extracted binary (the unit says /usr/sbin/xbr, which this machine need not have).
fn unit(extracted: &Path, scratch: &Path) {
    let text = std::fs::read_to_string(extracted.join("usr/lib/systemd/system/xbr.service"))
        .expect("the unit in the package");
    let lines: Vec<&str> = text.lines().map(str::trim).collect();
    let has = |wanted: &str| lines.contains(&wanted);
    assert!(has(EXEC_START), "the unit's ExecStart:\n{text}");
    for line in CAPABILITIES {
        assert!(has(line), "the unit lacks `{line}`:\n{text}");
    }
    for line in [
        "EnvironmentFile=-/etc/default/xbr",
        "Restart=on-failure",
        "After=docker.service network-online.target",
        "Wants=docker.service",
        "WantedBy=multi-user.target",
    ] {
        assert!(has(line), "the unit lacks `{line}`:\n{text}");
    }
    // Stopping the service leaves the datapath: nothing may detach on the way down.
    for line in &lines {
        assert!(
            !line.starts_with("ExecStop"),
            "the unit must not detach when it stops: `{line}`"
        );
    }

    let dir = scratch.join("verify");
    std::fs::create_dir_all(&dir).unwrap();
    let xbr = extracted.join("usr/sbin/xbr");
    let verified = text.replace("/usr/sbin/xbr", &xbr.to_string_lossy());
    let unit = dir.join("xbr.service");
    std::fs::write(&unit, verified).unwrap();
    let result = Command::new("systemd-analyze")
        .args(["verify", "--man=no"])
        .arg(&unit)
        .env("SYSTEMD_LOG_LEVEL", "notice")
        .stdin(Stdio::null())
        .output()
        .expect("run systemd-analyze verify");
    let stderr = String::from_utf8_lossy(&result.stderr);
    println!("systemd-analyze verify: {}\n{stderr}", result.status);
    assert!(
        result.status.success(),
        "systemd-analyze verify failed:\n{stderr}"
    );
    // Unknown keys and bad values are only warnings to verify: none may name this unit.
    let complaints: Vec<&str> = stderr
        .lines()
        .filter(|line| line.contains("xbr.service"))
        .collect();
    assert!(
        complaints.is_empty(),
        "systemd-analyze verify complains about the unit:\n{}",
        complaints.join("\n")
    );
}

/// The completions and the man page are xbr's own (generated from its clap definition), and
/// /etc/default/xbr shows the metrics example.
fn generated_files(extracted: &Path) {
    let read = |path: &str| std::fs::read_to_string(extracted.join(path)).expect(path);
    let bash = read("usr/share/bash-completion/completions/xbr");
    assert!(
        bash.contains("complete -F _xbr"),
        "bash completion:\n{bash}"
    );
    for subcommand in ["attach", "follow", "detach", "status", "completions"] {
        assert!(
            bash.contains(subcommand),
            "bash completion lacks {subcommand}"
        );
    }
    assert!(read("usr/share/zsh/vendor-completions/_xbr").starts_with("#compdef xbr"));
    assert!(read("usr/share/fish/vendor_completions.d/xbr.fish").contains("complete -c xbr"));
    let man = output(Command::new("zcat").arg(extracted.join("usr/share/man/man8/xbr.8.gz")));
    assert!(man.contains(".TH xbr 8"), "man page header:\n{man:.300}");
    assert!(man.contains("follow"), "the man page names follow");
    let default = read("etc/default/xbr");
    assert!(
        default
            .lines()
            .any(|line| line == "#XBR_OPTS=\"--metrics 127.0.0.1:9477\""),
        "/etc/default/xbr:\n{default}"
    );
}

/// /etc/default/xbr is a conffile; the unit is enabled on install, and an upgrade restarts it
/// after unpacking rather than stopping it first.
fn maintainer_scripts(control: &Path) {
    let read = |name: &str| std::fs::read_to_string(control.join(name)).unwrap_or_default();
    assert_eq!(read("conffiles").trim(), "/etc/default/xbr");
    let postinst = read("postinst");
    assert!(
        postinst.contains("deb-systemd-helper enable 'xbr.service'")
            || postinst.contains("deb-systemd-helper enable xbr.service"),
        "postinst enables the unit:\n{postinst}"
    );
    assert!(
        postinst.contains("_dh_action=restart"),
        "postinst restarts the unit on upgrade:\n{postinst}"
    );
    // Stopped only on removal, not before an upgrade (restart-after-upgrade): the old follower
    // runs until postinst restarts it on the new binary.
    let prerm = read("prerm");
    let lines: Vec<&str> = prerm.lines().collect();
    for (i, line) in lines.iter().enumerate() {
        if line.contains("stop") {
            let guard = if i > 0 { lines[i - 1] } else { "" };
            assert!(
                guard.contains(r#"[ "$1" = remove ]"#),
                "prerm stops the unit other than on removal: `{line}`\n{prerm}"
            );
        }
    }
}

/// dpkg-deb --contents' paths, without directories, as a scratch root would hold them.
fn package_files() -> BTreeSet<PathBuf> {
    EXPECTED_FILES
        .iter()
        .map(|f| PathBuf::from(f.trim_start_matches("./")))
        .collect()
}

/// Install into a scratch root and purge again: the maintainer scripts run (chrootless, with
/// stand-ins for the systemd helpers), the files land, and purge leaves nothing behind.
fn install_and_purge(deb: &Path, scratch: &Path) {
    let root = scratch.join("root");
    let admin = root.join("var/lib/dpkg");
    for dir in ["info", "updates", "triggers"] {
        std::fs::create_dir_all(admin.join(dir)).unwrap();
    }
    std::fs::write(admin.join("status"), "").unwrap();
    std::fs::write(admin.join("available"), "").unwrap();

    // Stand-ins the maintainer scripts find first on PATH: each records its arguments.
    let shims = scratch.join("shims");
    std::fs::create_dir_all(&shims).unwrap();
    let calls = scratch.join("calls");
    for name in ["deb-systemd-helper", "deb-systemd-invoke", "systemctl"] {
        let shim = shims.join(name);
        std::fs::write(
            &shim,
            format!(
                "#!/bin/sh\necho \"{name} $* DPKG_ROOT=$DPKG_ROOT\" >> '{}'\nexit 0\n",
                calls.display()
            ),
        )
        .unwrap();
        use std::os::unix::fs::PermissionsExt as _;
        std::fs::set_permissions(&shim, std::fs::Permissions::from_mode(0o755)).unwrap();
    }
    let path = format!(
        "{}:{}",
        shims.display(),
        std::env::var("PATH").unwrap_or_default()
    );
    let dpkg = |args: &[&str]| {
        let mut command = Command::new("dpkg");
        command
            .arg(format!("--root={}", root.display()))
            .arg(format!("--log={}", scratch.join("dpkg.log").display()))
            .args(["--force-script-chrootless", "--force-depends"])
            .args(args)
            .env("PATH", &path);
        output(&mut command)
    };

    dpkg(&["--install", &deb.to_string_lossy()]);
    let installed = files_below(&root, &[Path::new("var/lib/dpkg")]);
    assert_eq!(installed, package_files(), "files after install");
    let status = dpkg(&["--status", "xbr"]);
    assert!(
        status.contains("Status: install ok installed"),
        "dpkg --status xbr:\n{status}"
    );
    let recorded = std::fs::read_to_string(&calls).unwrap_or_default();
    println!("the maintainer scripts called:\n{recorded}");
    assert!(
        recorded.lines().any(|l| l.contains("deb-systemd-helper")
            && l.contains("enable")
            && l.contains("xbr.service")),
        "postinst did not enable xbr.service:\n{recorded}"
    );

    // An upgrade: the package reinstalled over itself and its follower restarted, under a
    // stream through the fast path.
    upgrade_under_a_stream(&root.join("usr/sbin/xbr"), || {
        dpkg(&["--install", &deb.to_string_lossy()]);
    });

    // Remove keeps the conffile (an admin's XBR_OPTS), purge takes it too.
    dpkg(&["--remove", "xbr"]);
    let kept = files_below(&root, &[Path::new("var/lib/dpkg")]);
    assert_eq!(
        kept,
        BTreeSet::from([PathBuf::from("etc/default/xbr")]),
        "files after remove"
    );
    dpkg(&["--purge", "xbr"]);
    let left = files_below(&root, &[Path::new("var/lib/dpkg")]);
    assert!(left.is_empty(), "files left after purge: {left:?}");
    let left_dirs: Vec<_> = std::fs::read_dir(&root)
        .unwrap()
        .map(|e| e.unwrap().file_name())
        .filter(|name| name != "var")
        .collect();
    assert!(
        left_dirs.is_empty(),
        "directories left after purge: {left_dirs:?}"
    );
    let recorded = std::fs::read_to_string(&calls).unwrap_or_default();
    assert!(
        recorded
            .lines()
            .any(|l| l.contains("deb-systemd-helper") && l.contains("purge")),
        "postrm did not purge xbr.service's enablement:\n{recorded}"
    );
}

/// A follower run from the installed binary `xbr`, killed by pid on drop.
struct InstalledFollower {
    child: std::process::Child,
    log: PathBuf,
}

impl InstalledFollower {
    fn start(xbr: &Path, host: &str, pins: &PinRoot) -> InstalledFollower {
        let log = std::env::temp_dir().join(format!("{}.log", unique_name("xbr-upgrade")));
        let child = Command::new(xbr)
            .args(["-v", "-n", host, "--pin-root", pins.arg()])
            .args(["attach", "br0", "--no-socket-hooks", "--follow"])
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(&log).expect("follower log"))
            .spawn()
            .expect("start the installed xbr");
        let follower = InstalledFollower { child, log };
        let started = Instant::now();
        while !std::fs::read_to_string(&follower.log)
            .unwrap_or_default()
            .contains("following the bridge")
        {
            assert!(
                started.elapsed() < Duration::from_secs(15),
                "the installed xbr did not start following: {}",
                std::fs::read_to_string(&follower.log).unwrap_or_default()
            );
            std::thread::sleep(Duration::from_millis(20));
        }
        follower
    }

    /// SIGTERM, as systemd stops the service, and wait for the exit.
    fn stop(mut self) {
        // SAFETY: kill(2) on the pid of a child this test started and has not reaped.
        unsafe { libc::kill(self.child.id() as i32, libc::SIGTERM) };
        let status = self.child.wait().expect("wait for the follower");
        assert!(status.success(), "the follower's exit on SIGTERM: {status}");
    }
}

impl Drop for InstalledFollower {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        let _ = std::fs::remove_file(&self.log);
    }
}

/// What an upgrade does, under a UDP stream between two lab containers: the follower (from
/// the installed binary) stops, `reinstall` puts the package's files in place again, a new
/// follower starts. Not one datagram lost, nothing crosses the bridge, one program per port.
fn upgrade_under_a_stream(xbr: &Path, reinstall: impl FnOnce()) {
    let lab = LabBuilder::three_containers().up();
    let spec = lab.spec().clone();
    let host = spec.host_netns();
    let pins = PinRoot::new(&host);
    let old = InstalledFollower::start(xbr, &host, &pins);
    let bridge = BridgeForwardCounter::install(&host);
    let stream = stream_a_to_b(&spec, 40403);

    old.stop();
    reinstall();
    let new = InstalledFollower::start(xbr, &host, &pins);
    std::thread::sleep(Duration::from_millis(300));

    let (sent, received) = stream.finish();
    println!("upgrade under a stream: sent {sent}, received {received}");
    assert!(sent > 100, "the stream sent {sent} datagrams");
    assert_eq!(sent, received, "datagrams lost across the upgrade");
    assert_eq!(
        bridge.read().ipv4_unicast,
        0,
        "the stream left the fast path during the upgrade"
    );
    for port in ["veth-a", "veth-b", "veth-c"] {
        assert_eq!(tc_programs(&host, port), vec!["port_ingress"], "{port}");
    }
    drop(new);
}
