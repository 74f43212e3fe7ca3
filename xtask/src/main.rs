//! Developer tasks for xbr, run as `cargo xtask <verb>`: install the prerequisites, build the
//! `xbr` binary, run the test suite, and show the fast path at work in a lab of namespaces.

mod build;
mod cmd;
mod demo;
mod setup;
mod test;

use std::path::PathBuf;

use clap::{Parser, Subcommand};

#[derive(Parser)]
#[command(name = "cargo xtask", about = "Developer tasks for xbr")]
struct Cli {
    #[command(subcommand)]
    verb: Verb,
}

#[derive(Subcommand)]
enum Verb {
    /// Install what building and testing xbr needs on Debian 12; only what is missing.
    Setup,
    /// Set up, then build the release binary (target/release/xbr).
    Build,
    /// Set up, then run the whole test suite as root (`cargo test --workspace --release`, without
    /// the BPF-only bridge-ebpf).
    #[command(after_help = "Everything after `--` goes to cargo test, e.g.\n  \
                            cargo xtask test -- lab -- --nocapture   (the tests named *lab*, with output)")]
    Test {
        /// Extra arguments for cargo test.
        #[arg(last = true, value_name = "CARGO_TEST_ARGS")]
        args: Vec<String>,
    },
    /// Set up, build, then show traffic on a lab bridge before and after `xbr attach` (root).
    Demo {
        /// The lab topology to build; its first two containers exchange the traffic.
        #[arg(long, value_name = "FILE")]
        lab: Option<PathBuf>,
        /// How long each iperf3 TCP run lasts.
        #[arg(long, value_name = "SECONDS", default_value_t = 3)]
        seconds: u32,
    },
}

fn main() {
    let cli = Cli::parse();
    let result = match cli.verb {
        Verb::Setup => setup::run(),
        Verb::Build => build::run().map(|_| ()),
        Verb::Test { args } => test::run(&args),
        Verb::Demo { lab, seconds } => demo::run(demo::Options {
            lab: lab.unwrap_or_else(|| cmd::workspace_root().join("examples/lab.toml")),
            seconds,
        }),
    };
    if let Err(error) = result {
        eprintln!("xtask: {error:#}");
        std::process::exit(1);
    }
}
