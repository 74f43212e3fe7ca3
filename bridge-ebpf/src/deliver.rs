//! Where a fast-path frame goes: into a container (through its bridge port's veth peer), or
//! out of an uplink.

use aya_ebpf::{
    helpers::{bpf_redirect, bpf_redirect_neigh, bpf_redirect_peer},
    programs::TcContext,
};

/// `PACKET_HOST`: the frame is for the device that receives it.
const PACKET_HOST: u32 = 0;

/// Set by the loader: 1 where the kernel has bpf_redirect_peer (5.10+), 0 for plain
/// bpf_redirect. A load-time constant, so the verifier prunes the helper the kernel lacks.
#[unsafe(no_mangle)]
static REDIRECT_PEER: u8 = 1;

/// Into the container behind bridge port `port`: straight into its ingress with
/// bpf_redirect_peer, else out of the port (the veth hands it to the peer).
#[inline(always)]
pub fn into_container(ctx: &TcContext, port: u32) -> i32 {
    // The frame arrived on the sending port addressed to another MAC, so the kernel marked it
    // PACKET_OTHERHOST. Kernels before "bpf: Scrub packet on bpf_redirect_peer" (5.10, for
    // one) deliver it into the container with that mark, and the container's IP stack drops
    // it; the frame is for the container now.
    let _ = ctx.change_type(PACKET_HOST);
    // SAFETY: a reference to a static is valid and aligned; volatile, so that the compiler
    // does not fold in the default and the loader's value is read.
    let redirect_peer = unsafe { core::ptr::read_volatile(&REDIRECT_PEER) };
    if redirect_peer != 0 {
        // SAFETY: a BPF helper that takes only integers (the loader checked that this kernel
        // has it, else REDIRECT_PEER is 0 and the verifier prunes this branch).
        unsafe { bpf_redirect_peer(port, 0) as i32 }
    } else {
        // SAFETY: a BPF helper that takes only integers.
        unsafe { bpf_redirect(port, 0) as i32 }
    }
}

/// Out of `ifindex` (its egress).
#[inline(always)]
pub fn out_of(ifindex: u32) -> i32 {
    // SAFETY: a BPF helper that takes only integers.
    unsafe { bpf_redirect(ifindex, 0) as i32 }
}

/// Out of `ifindex`, with the next hop's neighbour resolved by the kernel (its route lookup
/// and neighbour table fill in the MACs; an unresolved neighbour is resolved, the frame
/// queued meanwhile).
#[inline(always)]
pub fn out_of_resolving(ifindex: u32) -> i32 {
    // SAFETY: a BPF helper given no parameters (null, length 0): the kernel routes by the
    // frame's destination.
    unsafe { bpf_redirect_neigh(ifindex, core::ptr::null_mut(), 0, 0) as i32 }
}
