//! `cargo xtask build`: the `xbr` binary, with its eBPF object built in by bridge-user's
//! build script (aya-build), and beside it the chained CNI plugin `xbr-cni`.

use std::path::PathBuf;

use anyhow::bail;

use crate::{cmd, setup};

pub fn run() -> anyhow::Result<PathBuf> {
    setup::run()?;
    let binary = release_binary()?;
    println!("xbr is at {}", binary.display());
    println!(
        "xbr-cni (the CNI plugin) is at {}",
        binary.with_file_name("xbr-cni").display()
    );
    Ok(binary)
}

/// Builds target/release/xbr (and xbr-cni beside it) and returns xbr's path.
pub fn release_binary() -> anyhow::Result<PathBuf> {
    println!(
        "building xbr (release; bridge-user's build script prints `Compiling` warnings for the eBPF crate)"
    );
    cmd::run(
        cmd::cargo().args(["build", "--release", "-p", "bridge-user"]),
        "building the xbr binary",
    )?;
    let binary = cmd::target_dir().join("release/xbr");
    for built in [&binary, &binary.with_file_name("xbr-cni")] {
        if !built.is_file() {
            bail!(
                "cargo built bridge-user but {} is not there",
                built.display()
            );
        }
    }
    Ok(binary)
}

/// Builds the lab's flood generator, target/release/syn-flood (crate xbr-tests), which
/// `cargo xtask bench` runs for its SYN-flood workload; returns its path.
pub fn flood_binary() -> anyhow::Result<PathBuf> {
    cmd::run(
        cmd::cargo().args([
            "build",
            "--release",
            "-p",
            "xbr-tests",
            "--bin",
            "syn-flood",
        ]),
        "building the syn-flood binary",
    )?;
    let binary = cmd::target_dir().join("release/syn-flood");
    if !binary.is_file() {
        bail!(
            "cargo built xbr-tests but {} is not there",
            binary.display()
        );
    }
    Ok(binary)
}

/// Builds target/release/xtask, whose `bench-client` verb is the bench's host client
/// (optimized like the servers it measures, whatever profile runs the bench); returns its path.
pub fn xtask_binary() -> anyhow::Result<PathBuf> {
    cmd::run(
        cmd::cargo().args(["build", "--release", "-p", "xtask"]),
        "building the xtask binary",
    )?;
    let binary = cmd::target_dir().join("release/xtask");
    if !binary.is_file() {
        bail!("cargo built xtask but {} is not there", binary.display());
    }
    Ok(binary)
}
