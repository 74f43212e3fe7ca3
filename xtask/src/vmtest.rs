//! `cargo xtask vmtest`: the kernel-facing tests on the kernels users run, each a Debian kernel
//! booted in QEMU with the host's root as a read-only 9p share; a kernel x suite matrix at the end.

mod debian;
mod guest;
mod initramfs;
mod modules;
mod qemu;
mod report;
#[cfg(test)]
mod selftest;

use std::io::Write as _;
use std::net::Ipv4Addr;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context as _, bail};

use self::debian::{Kernel, Spec};
use self::guest::{Feature, GuestPlan, Suite};
use self::initramfs::Archive;
use self::modules::ModuleIndex;
pub use self::qemu::Accel;
use self::qemu::{Machine, Vm};
use self::report::{Console, Event, Row};
use crate::lab::{self, BridgeSpec, ContainerSpec, Ipv4Cidr, LabSpec, MacAddr};
use crate::{build, cmd, setup};

/// The default matrix: bullseye's 5.10, bookworm's 6.1 and 6.12, the newest backport.
pub const DEFAULT_KERNELS: [&str; 4] = ["5.10", "6.1", "6.12", "newest"];

/// What mounting the host's root over 9p takes; insmod-ed from the initramfs.
const BOOT_MODULES: [&str; 3] = ["virtio_pci", "9pnet_virtio", "9p"];

/// What the suites use, loaded with the host's modprobe from the kernel's own tree; the
/// kernel's autoloader (pointed at the same modprobe) brings in whatever else they touch.
/// Names a kernel does not have (nft_counter became part of nf_tables in 5.x) are left out.
const TEST_MODULES: [&str; 11] = [
    "veth",
    "bridge",
    // The overlay suite's VXLAN ports (Docker's overlay networks).
    "vxlan",
    "sch_ingress",
    "cls_bpf",
    "nf_tables",
    "nft_counter",
    // The egress suite's kernel-path masquerade, and conntrack for xbr to read.
    "nf_conntrack_netlink",
    "nf_nat",
    "nft_chain_nat",
    "nft_masq",
];

const CPUS: u32 = 2;
const MEMORY_MIB: u32 = 2048;
/// From QEMU's start to the first suite, with room for a slow TCG boot. Suite timeouts are
/// about 15 times what a suite takes on TCG here: a hung guest costs at most BOOT_ALLOWANCE
/// plus their sum (33 minutes), which keeps CI's two kernels inside its 90 minutes.
const BOOT_ALLOWANCE: Duration = Duration::from_secs(180);

pub struct Options {
    pub kernels: Vec<String>,
    /// Only the suites with these names; all when empty.
    pub suites: Vec<String>,
    pub accel: Accel,
}

pub fn run(options: Options) -> anyhow::Result<()> {
    let started = Instant::now();
    setup::run()?;
    let specs: Vec<String> = if options.kernels.is_empty() {
        DEFAULT_KERNELS.map(String::from).to_vec()
    } else {
        options.kernels.clone()
    };
    // A mistyped SPEC should fail before minutes of building.
    for spec in &specs {
        Spec::parse(spec)?;
    }
    let vmtest_dir = cmd::target_dir().join("vmtest");
    for dir in [cmd::workspace_root(), cmd::target_dir()] {
        if let Some(tmpfs) = guest::TMPFS_DIRS
            .iter()
            .find(|tmpfs| dir.starts_with(tmpfs))
        {
            bail!(
                "{} is under {tmpfs}, which the VM covers with its own tmpfs; move the workspace \
                 (or CARGO_TARGET_DIR) elsewhere",
                dir.display()
            );
        }
    }
    let binaries = Binaries::build()?;
    let mut suites = default_suites(&binaries, &vmtest_dir)?;
    if !options.suites.is_empty() {
        for wanted in &options.suites {
            if !suites.iter().any(|suite| suite.name == *wanted) {
                let names: Vec<&str> = suites.iter().map(|s| s.name.as_str()).collect();
                bail!(
                    "no suite named {wanted}; the suites are {}",
                    names.join(", ")
                );
            }
        }
        suites.retain(|suite| options.suites.contains(&suite.name));
    }
    let mut runner = Runner::new(
        vmtest_dir,
        options.accel,
        Some(binaries.xbr.clone()),
        suites,
    );
    let rows = runner.run_matrix(&specs);
    println!(
        "\nvmtest: kernel x suite matrix ({}, {:.0} s in all)\n{}",
        runner.accel_name(),
        started.elapsed().as_secs_f64(),
        report::matrix(&rows, &runner.suite_names())
    );
    // One plain closing line with every kernel's suites counted (CI reads the last line); a
    // kernel whose VM failed as a whole counts as one failure.
    let count = |wanted: fn(&report::Outcome) -> bool| -> usize {
        rows.iter()
            .map(|row| row.suites.iter().filter(|(_, o)| wanted(o)).count())
            .sum()
    };
    let vm_failures = rows.iter().filter(|row| row.failure.is_some()).count();
    println!(
        "vmtest: {} passed, {} failed, {} skipped",
        count(|o| matches!(o, report::Outcome::Pass)),
        count(|o| matches!(o, report::Outcome::Fail(_))) + vm_failures,
        count(|o| matches!(o, report::Outcome::Skip(_)))
    );
    verdict(&rows)
}

/// Err (so a non-zero exit) when any kernel failed.
pub fn verdict(rows: &[Row]) -> anyhow::Result<()> {
    let failed: Vec<String> = rows
        .iter()
        .filter(|row| !row.passed())
        .map(|row| row.label.clone())
        .collect();
    if !failed.is_empty() {
        bail!(
            "the kernel matrix failed on {} of {} kernels: {}",
            failed.len(),
            rows.len(),
            failed.join(", ")
        );
    }
    Ok(())
}

/// The programs the suites run, built on the host.
struct Binaries {
    xbr: PathBuf,
    packet: PathBuf,
    policy_packet: PathBuf,
    nat_packet: PathBuf,
    egress_packet: PathBuf,
    egress: PathBuf,
    overlay: PathBuf,
    east_west: PathBuf,
    published: PathBuf,
    sockets: PathBuf,
    writers: PathBuf,
}

impl Binaries {
    fn build() -> anyhow::Result<Binaries> {
        let xbr = build::release_binary()?;
        println!("vmtest: building the test binaries (release)");
        let mut command = cmd::cargo();
        command
            .args([
                "test",
                "--release",
                "--no-run",
                "-p",
                "xbr-tests",
                "--message-format=json",
            ])
            .stderr(Stdio::inherit());
        let stdout = cmd::output_bytes(&mut command, "building the test binaries")?;
        let stdout = String::from_utf8_lossy(&stdout);
        let find = |name: &str| test_executable(&stdout, name);
        Ok(Binaries {
            xbr,
            packet: find("packet")?,
            policy_packet: find("policy_packet")?,
            nat_packet: find("nat_packet")?,
            egress_packet: find("egress_packet")?,
            egress: find("egress")?,
            overlay: find("overlay")?,
            east_west: find("east_west")?,
            published: find("published")?,
            sockets: find("sockets")?,
            writers: find("writers")?,
        })
    }
}

/// The executable cargo built for the integration test NAME, from its JSON messages.
fn test_executable(messages: &str, name: &str) -> anyhow::Result<PathBuf> {
    messages
        .lines()
        .filter_map(|line| serde_json::from_str::<serde_json::Value>(line).ok())
        .filter(|message| message["reason"] == "compiler-artifact")
        .filter(|message| message["target"]["name"] == name && message["profile"]["test"] == true)
        .find_map(|message| message["executable"].as_str().map(PathBuf::from))
        .with_context(|| format!("cargo built no test executable named {name} in xbr-tests"))
}

/// The lab the auto-attach suite builds: br0 with containers a and b.
fn auto_attach_lab() -> LabSpec {
    let address = |host: u8| Ipv4Cidr::new(Ipv4Addr::new(10, 77, 0, host), 24);
    let container = |name: &str, host: u8| ContainerSpec {
        name: name.to_owned(),
        address: address(host),
        mac: Some(MacAddr([0x02, 0x77, 0, 0, 0, host])),
    };
    LabSpec {
        name: "vmt".to_owned(),
        bridge: BridgeSpec {
            name: "br0".to_owned(),
            address: Some(address(1)),
        },
        containers: vec![container("a", 2), container("b", 3)],
        uplink: None,
    }
}

fn default_suites(binaries: &Binaries, vmtest_dir: &Path) -> anyhow::Result<Vec<Suite>> {
    std::fs::create_dir_all(vmtest_dir)
        .with_context(|| format!("creating {}", vmtest_dir.display()))?;
    let lab_spec = auto_attach_lab();
    let lab = vmtest_dir.join("lab.toml");
    lab::write(
        &lab_spec,
        &lab,
        "Written by `cargo xtask vmtest`: the auto-attach suite's lab.",
    )?;
    let (a, b) = (&lab_spec.containers[0], &lab_spec.containers[1]);
    let tests_dir = cmd::workspace_root().join("tests");
    let program = |path: &Path| path.display().to_string();
    let east_west = |mode: &str| Suite {
        name: format!("east-west-{mode}"),
        argv: vec![
            program(&binaries.east_west),
            format!("{mode}_fast_path_between_every_pair"),
            "--exact".to_owned(),
        ],
        dir: tests_dir.clone(),
        timeout: Duration::from_secs(300),
        needs: (mode == "tcx").then_some(Feature::Tcx),
    };
    // Many writers at once, hooks removed behind xbr's back, writers killed anywhere: the lock
    // (flock on bpffs), the hook queries (tcx, cls_bpf dumps) and repairs on this kernel.
    let writers = |mode: &str| {
        // Emulated CPUs: a shorter stress run and fewer kill rounds than on the host.
        let mut argv = vec![
            "/usr/bin/env".to_owned(),
            "XBR_WRITERS_SECONDS=15".to_owned(),
            "XBR_KILL_ROUNDS=12".to_owned(),
            program(&binaries.writers),
            format!("{mode}_"),
        ];
        if mode == "clsact" {
            argv.push("a_second_writer_waits_then_names_the_holder".to_owned());
        }
        Suite {
            name: format!("writers-{mode}"),
            argv,
            dir: tests_dir.clone(),
            timeout: Duration::from_secs(300),
            needs: (mode == "tcx").then_some(Feature::Tcx),
        }
    };
    Ok(vec![
        // BPF_PROG_TEST_RUN: the verifier takes the program, verdicts and counters hold.
        Suite {
            name: "packet".to_owned(),
            argv: vec![program(&binaries.packet)],
            dir: tests_dir.clone(),
            timeout: Duration::from_secs(300),
            needs: None,
        },
        // The policy's hold-backs (HOLDS by shape, the address check, client holds in a hash
        // and an LPM trie) through this kernel's verifier and maps.
        Suite {
            name: "policy-packet".to_owned(),
            argv: vec![program(&binaries.policy_packet)],
            dir: tests_dir.clone(),
            timeout: Duration::from_secs(300),
            needs: None,
        },
        // The NAT state machine through BPF_PROG_TEST_RUN: this kernel's LRU and hash maps,
        // and its verifier on the NAT subprograms.
        Suite {
            name: "nat-packet".to_owned(),
            argv: vec![program(&binaries.nat_packet)],
            dir: tests_dir.clone(),
            timeout: Duration::from_secs(300),
            needs: None,
        },
        // Egress NAT through BPF_PROG_TEST_RUN: this kernel's FIB lookup from tc, its
        // verifier on the port allocation loop, bpf_redirect_neigh.
        Suite {
            name: "egress-packet".to_owned(),
            argv: vec![program(&binaries.egress_packet)],
            dir: tests_dir.clone(),
            timeout: Duration::from_secs(300),
            needs: None,
        },
        // Egress NAT in a lab: containers reach an outside with no route back, and the
        // kernel's own masqueraded flows stay the kernel's across attach and detach.
        Suite {
            name: "egress".to_owned(),
            argv: vec![program(&binaries.egress)],
            dir: tests_dir.clone(),
            timeout: Duration::from_secs(300),
            needs: None,
        },
        // Docker's overlay layout across two nodes (br0 + vxlan0 in an overlay namespace per
        // node): remote MACs out of vxlan0 and decapsulated frames into containers, skipping
        // br0; a removed peer stops being a destination; two overlays stay isolated.
        Suite {
            name: "overlay".to_owned(),
            argv: vec![program(&binaries.overlay)],
            dir: tests_dir.clone(),
            timeout: Duration::from_secs(300),
            needs: None,
        },
        // xbr's own choice of path on this kernel, with traffic across it.
        Suite {
            name: "auto-attach".to_owned(),
            argv: vec![
                "/bin/sh".to_owned(),
                "-c".to_owned(),
                guest::auto_attach_script(
                    &binaries.xbr,
                    &lab,
                    &lab_spec.host_netns(),
                    (
                        &lab_spec.container_netns(&a.name),
                        &b.address.addr.to_string(),
                    ),
                ),
            ],
            dir: cmd::workspace_root(),
            timeout: Duration::from_secs(180),
            needs: None,
        },
        // A lab, attach, traffic that skips the bridge (nft's witness), detach clean.
        east_west("clsact"),
        east_west("tcx"),
        // Published ports (DNAT, conntrack, the reply path) from an outside namespace.
        Suite {
            name: "published".to_owned(),
            argv: vec![program(&binaries.published)],
            dir: tests_dir.clone(),
            timeout: Duration::from_secs(300),
            needs: None,
        },
        // Published ports for host clients, translated at connect() by the socket hooks:
        // cgroup sock_addr programs, socket storage and netns cookies on this kernel.
        Suite {
            name: "sockets".to_owned(),
            argv: vec![program(&binaries.sockets)],
            dir: tests_dir.clone(),
            timeout: Duration::from_secs(300),
            needs: Some(Feature::SocketHooks),
        },
        writers("clsact"),
        writers("tcx"),
    ])
}

/// Boots kernels one after the other and reads their consoles.
pub struct Runner {
    dir: PathBuf,
    /// Where each kernel's initramfs and console log go (a directory per release).
    runs: PathBuf,
    accel: Accel,
    xbr: Option<PathBuf>,
    suites: Vec<Suite>,
}

impl Runner {
    pub fn new(dir: PathBuf, accel: Accel, xbr: Option<PathBuf>, suites: Vec<Suite>) -> Runner {
        Runner {
            runs: dir.join("run"),
            dir,
            accel,
            xbr,
            suites,
        }
    }

    /// Keeps this runner's initramfs and logs apart from the matrix's (for the self-test).
    #[cfg(test)]
    pub fn with_runs_in(mut self, runs: PathBuf) -> Runner {
        self.runs = runs;
        self
    }

    fn suite_names(&self) -> Vec<String> {
        self.suites.iter().map(|suite| suite.name.clone()).collect()
    }

    fn accel_name(&self) -> &'static str {
        match self.accel {
            Accel::Kvm => "KVM",
            Accel::Tcg => "TCG",
            Accel::Auto => "accelerator not chosen",
        }
    }

    /// One row per SPEC; a kernel that cannot be fetched or booted is a failed row.
    pub fn run_matrix(&mut self, specs: &[String]) -> Vec<Row> {
        let mut rows = Vec::new();
        for spec in specs {
            let started = Instant::now();
            println!("\nvmtest {spec}: getting the kernel");
            let result = Spec::parse(spec).and_then(|parsed| {
                let mut kernel = debian::fetch(&parsed, spec, &self.dir)?;
                // A file's path makes a poor row name; its release says what it is.
                if matches!(parsed, Spec::Deb(_) | Spec::Vmlinuz(_)) {
                    kernel.label = kernel.release.clone();
                }
                Ok(kernel)
            });
            let mut row = match result {
                Ok(kernel) => self.run_kernel(&kernel),
                Err(error) => Row {
                    label: spec.clone(),
                    release: "?".to_owned(),
                    failure: Some(format!("getting the kernel: {error:#}")),
                    ..Row::default()
                },
            };
            row.wall = started.elapsed();
            println!(
                "vmtest {spec}: {} in {:.0} s",
                if row.passed() { "passed" } else { "FAILED" },
                row.wall.as_secs_f64()
            );
            rows.push(row);
        }
        rows
    }

    fn run_kernel(&mut self, kernel: &Kernel) -> Row {
        let run_dir = self.runs.join(&kernel.release);
        let log = run_dir.join("console.log");
        let row = Row {
            label: kernel.label.clone(),
            release: kernel.release.clone(),
            log: log.clone(),
            ..Row::default()
        };
        let names = self.suite_names();
        match self.boot(kernel, &run_dir, &log, Console::new(row.clone(), &names)) {
            Ok(row) => row,
            Err(error) => Row {
                failure: Some(format!("{error:#}")),
                ..row
            },
        }
    }

    fn boot(
        &mut self,
        kernel: &Kernel,
        run_dir: &Path,
        log: &Path,
        mut console: Console,
    ) -> anyhow::Result<Row> {
        std::fs::create_dir_all(run_dir)
            .with_context(|| format!("creating {}", run_dir.display()))?;
        if let Some(package) = &kernel.package {
            println!("vmtest {}: {package}", kernel.label);
        }
        let initramfs = run_dir.join("initramfs.cpio");
        self.write_initramfs(kernel, &initramfs)?;
        if self.accel == Accel::Auto {
            self.accel = qemu::choose(Accel::Auto, &kernel.vmlinuz)?;
            println!("vmtest: QEMU runs on {}", self.accel_name());
        }
        let machine = Machine {
            accel: self.accel,
            vmlinuz: &kernel.vmlinuz,
            initramfs: &initramfs,
            cmdline: "console=ttyS0 panic=-1 loglevel=4 rdinit=/init",
            cpus: CPUS,
            memory_mib: MEMORY_MIB,
        };
        let mut log_file = std::fs::File::create(log)
            .with_context(|| format!("creating the console log {}", log.display()))?;
        let limit = BOOT_ALLOWANCE
            + self
                .suites
                .iter()
                .map(|suite| suite.timeout)
                .sum::<Duration>();
        let deadline = Instant::now() + limit;
        let mut vm = Vm::start(machine.command(), &format!("booting {}", kernel.release))?;
        let label = &kernel.label;
        let mut stopped = None;
        loop {
            let Some(line) = vm.next_line(deadline) else {
                if Instant::now() >= deadline {
                    stopped = Some(format!("timed out after {} s", limit.as_secs()));
                }
                break;
            };
            let _ = writeln!(log_file, "{line}");
            match console.feed(&line) {
                Event::Nothing => {}
                Event::Progress(said) => println!("vmtest {label}: {said}"),
                Event::Alarm(alarm) => {
                    println!("vmtest {label}: {alarm}; stopping the VM");
                    // A few more seconds of console: the backtrace follows the alarm.
                    let grace = Instant::now() + Duration::from_secs(3);
                    while let Some(line) = vm.next_line(grace) {
                        let _ = writeln!(log_file, "{line}");
                        console.feed(&line);
                    }
                    stopped = Some(alarm);
                    break;
                }
                Event::Done => {
                    if !vm.wait_exit(Duration::from_secs(20)) {
                        println!("vmtest {label}: the guest did not power off; stopping it");
                    }
                    break;
                }
            }
        }
        vm.stop();
        while let Some(line) = vm.next_line(Instant::now()) {
            let _ = writeln!(log_file, "{line}");
        }
        Ok(console.finish(stopped))
    }

    fn write_initramfs(&self, kernel: &Kernel, path: &Path) -> anyhow::Result<()> {
        let busybox = std::fs::read(guest::BUSYBOX).with_context(|| {
            format!(
                "reading {} (install busybox-static: cargo xtask setup)",
                guest::BUSYBOX
            )
        })?;
        if has_interpreter(&busybox) {
            bail!(
                "{} is dynamically linked; the initramfs needs busybox-static",
                guest::BUSYBOX
            );
        }
        let mut archive = Archive::default();
        for dir in ["/bin", "/dev", "/proc", "/sys", "/modules", "/host"] {
            archive.directory(dir);
        }
        archive.char_device("/dev/console", 5, 1);
        archive.file("/bin/busybox", 0o755, &busybox);
        let mut boot_modules = Vec::new();
        let mut modprobe = None;
        if let Some(tree) = &kernel.modules {
            let index = ModuleIndex::read(&tree.dir)?;
            let plan = index.load_plan(&BOOT_MODULES)?;
            if !plan.absent.is_empty() {
                bail!(
                    "kernel {} has no {} (neither modules nor built in): it cannot mount the host's root",
                    kernel.release,
                    plan.absent.join(", ")
                );
            }
            for file in &plan.files {
                let name = file
                    .file_name()
                    .map(|name| {
                        name.to_string_lossy()
                            .split(".ko")
                            .next()
                            .unwrap_or_default()
                            .to_owned()
                    })
                    .unwrap_or_default();
                let bytes = module_bytes(&tree.dir.join(file))?;
                archive.file(&format!("/modules/{name}.ko"), 0o644, &bytes);
                boot_modules.push(format!("{name}.ko"));
            }
            let present: Vec<String> = TEST_MODULES
                .iter()
                .filter(|name| index.has(name))
                .map(|name| name.to_string())
                .collect();
            modprobe = Some((tree.base.clone(), present));
        }
        let init = guest::init_script(&GuestPlan {
            boot_modules,
            modprobe,
            xbr: self.xbr.clone(),
            suites: &self.suites,
        });
        archive.file("/init", 0o755, init.as_bytes());
        archive.write(path)
    }
}

/// Whether an ELF executable names a dynamic loader (a PT_INTERP program header).
fn has_interpreter(elf: &[u8]) -> bool {
    const PT_INTERP: u32 = 3;
    let read = |at: usize, len: usize| elf.get(at..at + len);
    let (Some(phoff), Some(phentsize), Some(phnum)) = (read(0x20, 8), read(0x36, 2), read(0x38, 2))
    else {
        return false;
    };
    let phoff = u64::from_le_bytes(phoff.try_into().unwrap()) as usize;
    let phentsize = u16::from_le_bytes(phentsize.try_into().unwrap()) as usize;
    let phnum = u16::from_le_bytes(phnum.try_into().unwrap()) as usize;
    (0..phnum).any(|i| {
        read(phoff + i * phentsize, 4)
            .is_some_and(|kind| u32::from_le_bytes(kind.try_into().unwrap()) == PT_INTERP)
    })
}

/// A module file's ELF bytes: Debian compresses modules with xz since 6.x; busybox's insmod
/// in the initramfs gets them uncompressed.
fn module_bytes(path: &Path) -> anyhow::Result<Vec<u8>> {
    let name = path.to_string_lossy();
    let decompressor = if name.ends_with(".xz") {
        "xz"
    } else if name.ends_with(".zst") {
        "zstd"
    } else if name.ends_with(".gz") {
        "gzip"
    } else {
        return std::fs::read(path).with_context(|| format!("reading {}", path.display()));
    };
    cmd::output_bytes(
        Command::new(decompressor).arg("-dc").arg(path),
        &format!("decompressing {}", path.display()),
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn test_executables_come_from_cargos_messages() {
        let messages = r#"{"reason":"compiler-artifact","target":{"name":"xbr_tests","kind":["lib"]},"profile":{"test":false},"executable":null}
{"reason":"compiler-artifact","target":{"name":"packet","kind":["test"]},"profile":{"test":true},"executable":"/w/target/release/deps/packet-1234"}
{"reason":"build-finished","success":true}"#;
        assert_eq!(
            test_executable(messages, "packet").unwrap(),
            PathBuf::from("/w/target/release/deps/packet-1234")
        );
        assert!(test_executable(messages, "east_west").is_err());
    }

    #[test]
    fn dynamic_executables_are_told_apart_from_static_ones() {
        let this_test_binary = std::fs::read(std::env::current_exe().unwrap()).unwrap();
        assert!(has_interpreter(&this_test_binary));
        assert!(!has_interpreter(b"\x7fELF"));
    }

    #[test]
    fn any_failed_kernel_fails_the_verdict() {
        let passed = Row {
            label: "6.1".into(),
            ..Row::default()
        };
        let failed = Row {
            label: "5.10".into(),
            failure: Some("kernel panic".into()),
            ..Row::default()
        };
        assert!(verdict(std::slice::from_ref(&passed)).is_ok());
        let error = verdict(&[passed, failed]).unwrap_err().to_string();
        assert!(error.contains("1 of 2 kernels: 5.10"), "{error}");
    }
}
