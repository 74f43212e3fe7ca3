//! Where a fast-path frame goes: into a container (through its bridge port's veth peer), or
//! out of an uplink.

use aya_ebpf::helpers::{bpf_redirect, bpf_redirect_peer};

/// Set by the loader: 1 where the kernel has bpf_redirect_peer (5.10+), 0 for plain
/// bpf_redirect. A load-time constant, so the verifier prunes the helper the kernel lacks.
#[unsafe(no_mangle)]
static REDIRECT_PEER: u8 = 1;

/// Into the container behind bridge port `port`: straight into its ingress with
/// bpf_redirect_peer, else out of the port (the veth hands it to the peer).
#[inline(always)]
pub fn into_container(port: u32) -> i32 {
    let redirect_peer = unsafe { core::ptr::read_volatile(&REDIRECT_PEER) };
    if redirect_peer != 0 {
        unsafe { bpf_redirect_peer(port, 0) as i32 }
    } else {
        unsafe { bpf_redirect(port, 0) as i32 }
    }
}

/// Out of `ifindex` (its egress).
#[inline(always)]
pub fn out_of(ifindex: u32) -> i32 {
    unsafe { bpf_redirect(ifindex, 0) as i32 }
}
