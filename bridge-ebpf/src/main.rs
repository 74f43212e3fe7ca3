//! xbr's kernel programs. Each entry point reads as the packet's journey; the work lives in
//! one module per concern.
#![no_std]
#![no_main]

mod counters;
mod deliver;
mod east_west;
mod frame;
mod maps;
mod nat;
mod policy;
mod uplink;
mod uplink_xdp;

use aya_ebpf::{
    macros::{classifier, xdp},
    programs::{TcContext, XdpContext},
};

/// tc ingress of a bridge port: a frame a container just sent.
#[classifier]
pub fn port_ingress(ctx: TcContext) -> i32 {
    east_west::forward(&ctx)
}

/// tc ingress of an uplink: a frame from outside, maybe for a published port.
#[classifier]
pub fn uplink_ingress(ctx: TcContext) -> i32 {
    uplink::receive(&ctx)
}

/// XDP on an uplink (opt-in): published-port connections straight into their container's
/// port; everything else passes to `uplink_ingress` and the kernel.
#[xdp]
pub fn uplink_xdp(ctx: XdpContext) -> u32 {
    uplink_xdp::receive(&ctx)
}

#[cfg(not(test))]
#[panic_handler]
fn panic(_info: &core::panic::PanicInfo) -> ! {
    loop {}
}
