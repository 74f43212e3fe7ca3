//! Developer tasks for xbr, run as `cargo xtask <verb>`: install the prerequisites, build the
//! `xbr` binary, run the test suite, and show the fast path at work in a lab of namespaces.

mod bench;
mod build;
mod cmd;
mod demo;
mod lab;
mod package;
mod setup;
mod test;
mod vmtest;

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
    /// Set up, then build the release binaries (target/release/xbr and the CNI plugin xbr-cni).
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
    /// Set up, build, then measure xbr against a plain bridge, Docker's netfilter path and a
    /// direct veth pair, and its published-port NAT against Docker's DNAT and docker-proxy;
    /// writes target/bench/bench.{json,svg,md} (root).
    Bench(bench::Args),
    /// The bench's host client, which the bench runs as a process of its own (in a cgroup).
    #[command(hide = true)]
    BenchClient(bench::ClientArgs),
    /// Set up, build, then run the kernel-facing tests in QEMU on Debian kernels (5.10 to the
    /// newest backport) and print a kernel x suite matrix; about a minute per kernel on TCG.
    Vmtest {
        /// A Debian kernel series (5.10, 6.1, 6.12), `newest` (the newest backport), or a path to
        /// a linux-image .deb or a vmlinuz; repeatable. Default: 5.10, 6.1, 6.12, newest.
        #[arg(long = "kernel", value_name = "SPEC")]
        kernels: Vec<String>,
        /// Run only this suite (packet, auto-attach, east-west-clsact, east-west-tcx, published);
        /// repeatable.
        #[arg(long = "suite", value_name = "NAME")]
        suites: Vec<String>,
        /// QEMU's accelerator: auto uses KVM when a kernel really boots with it here.
        #[arg(long, value_enum, default_value_t = vmtest::Accel::Auto)]
        accel: vmtest::Accel,
    },
    /// Set up, build, then make the Debian package with cargo-deb: xbr in /usr/sbin, xbr-cni in
    /// /usr/lib/cni, xbr.service (`xbr follow`), /etc/default/xbr, completions and the man page;
    /// prints the .deb's path (target/debian/xbr_*.deb).
    Package,
}

fn main() {
    let cli = Cli::parse();
    let result = match cli.verb {
        Verb::Setup => setup::run().and_then(|()| setup::packaging()),
        Verb::Build => build::run().map(|_| ()),
        Verb::Test { args } => test::run(&args),
        Verb::Demo { lab, seconds } => demo::run(demo::Options {
            lab: lab.unwrap_or_else(|| cmd::workspace_root().join("examples/lab.toml")),
            seconds,
        }),
        Verb::Bench(args) => bench::run(args),
        Verb::BenchClient(args) => bench::client(args),
        Verb::Vmtest {
            kernels,
            suites,
            accel,
        } => vmtest::run(vmtest::Options {
            kernels,
            suites,
            accel,
        }),
        Verb::Package => package::run(),
    };
    if let Err(error) = result {
        eprintln!("xtask: {error:#}");
        std::process::exit(1);
    }
}
