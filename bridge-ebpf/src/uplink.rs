//! The uplink: frames from outside. Connections to published ports are translated and
//! delivered into their container; every other frame goes on to the kernel (or to the next
//! program on the uplink) untouched, with its verdict counted.

use aya_ebpf::{bindings::TC_ACT_UNSPEC, programs::TcContext};
use bridge_common::Verdict;

use crate::{
    counters::{count_delivered, count_verdict},
    deliver,
    nat::{self, Nat},
};

#[inline(always)]
pub fn receive(ctx: &TcContext) -> i32 {
    // SAFETY: the kernel's __sk_buff for this run, valid while the program runs; the verifier
    // allows reading its ifindex.
    let uplink = unsafe { (*ctx.skb.skb).ifindex };
    // TC_ACT_UNSPEC, not OK: other programs on a shared uplink (another bridge's) still run.
    let segment = match nat::parse(ctx) {
        Ok(segment) => segment,
        Err(verdict) => return pass(verdict),
    };
    match nat::inbound(ctx, &segment, uplink) {
        Nat::NotOurs => pass(Verdict::NotPublished),
        Nat::Pass(verdict) => pass(verdict),
        Nat::Redirect(port) => {
            count_verdict(Verdict::NatIn);
            count_delivered(ctx, port);
            deliver::into_container(ctx, port)
        }
        // A reply of an outbound flow (never `EgressNeigh`: that is toward an uplink).
        Nat::Egress(port) | Nat::EgressNeigh(port) => {
            count_verdict(Verdict::EgressIn);
            count_delivered(ctx, port);
            deliver::into_container(ctx, port)
        }
    }
}

/// On to the kernel path (and any next program), untouched.
#[inline(always)]
fn pass(verdict: Verdict) -> i32 {
    count_verdict(verdict);
    TC_ACT_UNSPEC
}
