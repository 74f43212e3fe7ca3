//! Builds the kernel programs (bridge-ebpf) for the BPF target and leaves the object in
//! OUT_DIR, so that one `xbr` binary carries its datapath.

use anyhow::Context as _;

fn main() -> anyhow::Result<()> {
    let manifest_dir = std::env::var("CARGO_MANIFEST_DIR").context("CARGO_MANIFEST_DIR not set")?;
    let ebpf_dir = std::path::Path::new(&manifest_dir).join("../bridge-ebpf");
    let ebpf_dir = ebpf_dir.to_str().context("non-UTF-8 path to bridge-ebpf")?;
    let package = aya_build::Package {
        name: "bridge-ebpf",
        root_dir: ebpf_dir,
        ..Default::default()
    };
    aya_build::build_ebpf([package], aya_build::Toolchain::default())
}
