//! Counting what the datapath decided: one counter per verdict, and per-port packet and
//! byte counters that `xbr stats` sums over CPUs.

use aya_ebpf::programs::TcContext;
use bridge_common::{PortStats, Verdict};

use crate::{
    frame::Frame,
    maps::{PORT_STATS, VERDICTS},
};

#[inline(always)]
pub fn count_verdict(verdict: Verdict) {
    if let Some(counter) = VERDICTS.get_ptr_mut(verdict as u32) {
        // SAFETY: a per-CPU array's value, valid for the whole program run; no other program
        // runs on this CPU meanwhile, so nothing else writes it.
        unsafe { *counter += 1 };
    }
}

/// A frame sent by the container on `port`, fast path or not.
#[inline(always)]
pub fn count_sent(ctx: &TcContext, port: u32, fast_path: bool) {
    let Some(stats) = PORT_STATS.get_ptr_mut(port) else {
        return;
    };
    // SAFETY: a per-CPU hash map's value, valid for the whole program run (the map frees
    // entries after an RCU grace period) and written by no other program meanwhile on this CPU.
    let stats: &mut PortStats = unsafe { &mut *stats };
    let bytes = u64::from(ctx.len());
    if fast_path {
        stats.fast_path_packets += 1;
        stats.fast_path_bytes += bytes;
    } else {
        stats.bridge_packets += 1;
        stats.bridge_bytes += bytes;
    }
}

/// A frame the fast path delivered to the container on `port`.
#[inline(always)]
pub fn count_delivered(ctx: &impl Frame, port: u32) {
    if let Some(stats) = PORT_STATS.get_ptr_mut(port) {
        // SAFETY: as in `count_sent`: this CPU's value, valid for the program run.
        let stats: &mut PortStats = unsafe { &mut *stats };
        stats.delivered_packets += 1;
        stats.delivered_bytes += ctx.frame_len() as u64;
    }
}
