use which::which;

/// Rebuild the programs when bpf-linker changes: cargo does not track the linker.
fn main() {
    let bpf_linker = which("bpf-linker").expect("bpf-linker not found; run `cargo xtask setup`");
    println!("cargo:rerun-if-changed={}", bpf_linker.to_str().unwrap());
}
