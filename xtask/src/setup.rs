//! `cargo xtask setup`: what building and testing xbr needs on Debian 12, each prerequisite
//! checked first and installed only when missing, so that a second run takes seconds.

use std::process::Command;

use anyhow::{Context as _, bail};

use crate::cmd;

/// The eBPF build chain: bpf-linker links against this LLVM (from bookworm-security).
const BUILD_PACKAGES: [&str; 4] = [
    "llvm-22-dev",
    "libpolly-22-dev",
    "libzstd-dev",
    "zlib1g-dev",
];
/// Test witnesses and traffic tools.
const TOOL_PACKAGES: [&str; 11] = [
    // The Docker end-to-end test's own dockerd (its image is busybox-static, listed below).
    "docker.io",
    "iproute2",
    "iputils-ping",
    "nftables",
    "iperf3",
    "ethtool",
    // The bench: latency, Docker's netfilter setup, BPF program run times.
    "sockperf",
    "iptables",
    "bpftool",
    // The CNI tests: the reference plugins (bridge, host-local, portmap, firewall) in
    // /usr/lib/cni, and podman 4.3 with its CNI backend (its image is busybox-static too).
    "containernetworking-plugins",
    "podman",
];
/// `cargo xtask vmtest`: QEMU, a static busybox for the initramfs, kmod for depmod/modprobe.
const VMTEST_PACKAGES: [&str; 3] = ["qemu-system-x86", "busybox-static", "kmod"];
const LLVM_PREFIX: &str = "/usr/lib/llvm-22";
/// aya-build compiles the eBPF crate with nightly's `-Z build-std`, hence rust-src.
const NIGHTLY: &str = "nightly";

pub fn run() -> anyhow::Result<()> {
    apt_packages().context("installing Debian packages")?;
    nightly_rust_src().context("installing the nightly toolchain's rust-src")?;
    bpf_linker().context("installing bpf-linker")?;
    Ok(())
}

/// What `cargo xtask package` (and the test suite, which builds the package) needs beyond
/// `run`: cargo-deb. Not part of `run`, so that the demo and a build do not wait for it.
pub fn packaging() -> anyhow::Result<()> {
    cargo_deb().context("installing cargo-deb")
}

fn report(what: &str, state: &str) {
    println!("setup: {what:<32} {state}");
}

fn apt_packages() -> anyhow::Result<()> {
    let mut missing = Vec::new();
    for package in BUILD_PACKAGES
        .into_iter()
        .chain(TOOL_PACKAGES)
        .chain(VMTEST_PACKAGES)
    {
        let installed = package_installed(package)?;
        report(
            &format!("apt {package}"),
            if installed { "present" } else { "installing" },
        );
        if !installed {
            missing.push(package);
        }
    }
    if missing.is_empty() {
        return Ok(());
    }
    cmd::require_root(&format!("installing {} needs apt-get", missing.join(" ")))?;
    // One update, and only when something is to be installed: the package lists may be stale.
    cmd::run(
        Command::new("apt-get")
            .args(["update", "-q"])
            .env("DEBIAN_FRONTEND", "noninteractive"),
        "updating the apt package lists",
    )?;
    cmd::run(
        Command::new("apt-get")
            .args(["install", "-y", "-q"])
            .args(&missing)
            .env("DEBIAN_FRONTEND", "noninteractive"),
        &format!("installing {}", missing.join(" ")),
    )
}

fn package_installed(package: &str) -> anyhow::Result<bool> {
    let output = Command::new("dpkg-query")
        .args(["-W", "-f=${Status}", package])
        .output()
        .with_context(|| {
            format!("asking dpkg-query whether {package} is installed (is this Debian?)")
        })?;
    // dpkg-query exits 1 for a package it has never heard of: that is "not installed".
    Ok(output.status.success()
        && String::from_utf8_lossy(&output.stdout).trim() == "install ok installed")
}

fn nightly_rust_src() -> anyhow::Result<()> {
    let listing = Command::new("rustup")
        .args(["component", "list", "--installed", "--toolchain", NIGHTLY])
        .output()
        .context("running rustup (install Rust with rustup first: https://rustup.rs)")?;
    if !listing.status.success() {
        report("rust toolchain nightly + rust-src", "installing");
        return cmd::run(
            Command::new("rustup").args([
                "toolchain",
                "install",
                NIGHTLY,
                "--profile",
                "minimal",
                "--component",
                "rust-src",
            ]),
            "installing the nightly toolchain",
        );
    }
    report("rust toolchain nightly", "present");
    let has_rust_src = String::from_utf8_lossy(&listing.stdout)
        .lines()
        .any(|line| line.trim() == "rust-src");
    report(
        "rust-src (nightly)",
        if has_rust_src {
            "present"
        } else {
            "installing"
        },
    );
    if has_rust_src {
        return Ok(());
    }
    cmd::run(
        Command::new("rustup").args(["component", "add", "rust-src", "--toolchain", NIGHTLY]),
        "adding rust-src to the nightly toolchain",
    )
}

fn bpf_linker() -> anyhow::Result<()> {
    // On PATH, or where `cargo install` put it (cmd::cargo() adds that directory to PATH).
    let present = cmd::succeeds(Command::new("bpf-linker").arg("--version"))
        || cmd::succeeds(Command::new(cmd::cargo_bin_dir().join("bpf-linker")).arg("--version"));
    report(
        "bpf-linker",
        if present {
            "present"
        } else {
            "installing (about a minute)"
        },
    );
    if present {
        return Ok(());
    }
    if !std::path::Path::new(LLVM_PREFIX)
        .join("bin/llvm-config")
        .exists()
    {
        bail!("{LLVM_PREFIX}/bin/llvm-config is missing; llvm-22-dev should have installed it");
    }
    cmd::run(
        cmd::cargo()
            .args([
                "install",
                "bpf-linker",
                "--no-default-features",
                "--features",
                "llvm-22",
            ])
            .env("LLVM_PREFIX", LLVM_PREFIX),
        "building bpf-linker against LLVM 22 with `cargo install`",
    )
}

/// `cargo xtask package` builds the .deb with cargo-deb (`cargo deb`).
fn cargo_deb() -> anyhow::Result<()> {
    // cmd::cargo() puts cargo's bin directory on PATH, where `cargo install` leaves it.
    let present = cmd::succeeds(cmd::cargo().args(["deb", "--version"]));
    report(
        "cargo-deb",
        if present {
            "present"
        } else {
            "installing (a few minutes)"
        },
    );
    if present {
        return Ok(());
    }
    cmd::run(
        cmd::cargo().args(["install", "cargo-deb", "--locked", "--quiet"]),
        "installing cargo-deb with `cargo install`",
    )
}
