//! `cargo xtask package`: the Debian package, built by cargo-deb from bridge-user's
//! `[package.metadata.deb]`: the release binaries (as `cargo xtask build` makes them), the
//! systemd unit and /etc/default/xbr from packaging/, and the shell completions and the man page,
//! generated here by the built `xbr` from its own clap definition.

use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::{Context as _, bail};

use crate::{build, cmd, setup};

/// What `xbr completions SHELL` writes, and the file bridge-user's assets name for it.
const COMPLETIONS: [(&str, &str); 3] =
    [("bash", "xbr.bash"), ("zsh", "_xbr"), ("fish", "xbr.fish")];
/// `xbr man`'s output, the man page's asset.
const MAN_PAGE: &str = "xbr.8";

pub fn run() -> anyhow::Result<()> {
    setup::run()?;
    setup::packaging()?;
    let deb = package()?;
    println!("the package is at {}", deb.display());
    println!("install it with: dpkg -i {}", deb.display());
    Ok(())
}

/// Builds the release binaries, generates the completions and the man page, runs cargo-deb
/// and returns the .deb's path. cargo-deb must be installed (`setup::cargo_deb`).
pub fn package() -> anyhow::Result<PathBuf> {
    let xbr = build::release_binary()?;
    let generated = generated_dir();
    generate(&xbr, &generated)?;
    println!("building the .deb with cargo-deb");
    let stdout = cmd::output(
        cmd::cargo().args(["deb", "-p", "bridge-user", "--no-build"]),
        "building the .deb with `cargo deb`",
    )?;
    // cargo-deb prints the archive's path as its last line of output.
    let deb = stdout
        .lines()
        .map(str::trim)
        .rfind(|line| line.ends_with(".deb"))
        .map(PathBuf::from)
        .with_context(|| format!("cargo deb printed no .deb path: {stdout:?}"))?;
    if !deb.is_file() {
        bail!("cargo deb named {} but it is not there", deb.display());
    }
    Ok(deb)
}

/// Where the generated assets go: bridge-user's `[package.metadata.deb]` names them as
/// `../target/package/*`, relative to the crate, so this is the workspace's target/ even when
/// CARGO_TARGET_DIR puts the build elsewhere.
pub fn generated_dir() -> PathBuf {
    cmd::workspace_root().join("target/package")
}

/// Runs the built `xbr` for each completion script and the man page (neither needs root).
fn generate(xbr: &Path, dir: &Path) -> anyhow::Result<()> {
    std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    let outputs = COMPLETIONS
        .iter()
        .map(|&(shell, file)| (vec!["completions", shell], file))
        .chain(std::iter::once((vec!["man"], MAN_PAGE)));
    for (args, file) in outputs {
        let text = cmd::output(
            Command::new(xbr).args(&args),
            &format!("generating {file} with `xbr {}`", args.join(" ")),
        )?;
        if text.trim().is_empty() {
            bail!("`xbr {}` printed nothing", args.join(" "));
        }
        let path = dir.join(file);
        std::fs::write(&path, text).with_context(|| format!("writing {}", path.display()))?;
        println!("generated {}", path.display());
    }
    Ok(())
}
