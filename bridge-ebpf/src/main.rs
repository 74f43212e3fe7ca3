//! xbr's kernel programs. Each entry point reads as the packet's journey; the work lives in
//! one module per concern.
#![no_std]
#![no_main]

mod counters;
mod east_west;
mod frame;
mod maps;

use aya_ebpf::{macros::classifier, programs::TcContext};

/// tc ingress of a bridge port: a frame a container just sent.
#[classifier]
pub fn port_ingress(ctx: TcContext) -> i32 {
    east_west::forward(&ctx)
}

#[cfg(not(test))]
#[panic_handler]
fn panic(_info: &core::panic::PanicInfo) -> ! {
    loop {}
}
