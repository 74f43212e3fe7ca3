//! xbr's kernel programs. Each entry point reads as the packet's journey; the work lives in
//! one module per concern.
#![no_std]
#![no_main]

mod counters;
mod deliver;
mod east_west;
mod egress;
mod frame;
mod maps;
mod nat;
mod policy;
mod socket;
mod uplink;
mod uplink_xdp;

use aya_ebpf::{
    macros::{cgroup_sock_addr, classifier, xdp},
    programs::{SockAddrContext, TcContext, XdpContext},
};
use socket::{Call, PROCEED};

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

// Published ports for the host's own clients (attached to a cgroup): the socket is pointed
// at the container when it connects or sends, and shown what it dialled when it reads.

#[cgroup_sock_addr(connect4)]
pub fn socket_connect4(ctx: SockAddrContext) -> i32 {
    socket::translate_v4(&ctx, Call::Connect);
    PROCEED
}

#[cgroup_sock_addr(sendmsg4)]
pub fn socket_sendmsg4(ctx: SockAddrContext) -> i32 {
    socket::translate_v4(&ctx, Call::Send);
    PROCEED
}

#[cgroup_sock_addr(recvmsg4)]
pub fn socket_recvmsg4(ctx: SockAddrContext) -> i32 {
    socket::restore_v4(&ctx);
    PROCEED
}

#[cgroup_sock_addr(getpeername4)]
pub fn socket_getpeername4(ctx: SockAddrContext) -> i32 {
    socket::restore_v4(&ctx);
    PROCEED
}

#[cgroup_sock_addr(connect6)]
pub fn socket_connect6(ctx: SockAddrContext) -> i32 {
    socket::translate_v6(&ctx, Call::Connect);
    PROCEED
}

#[cgroup_sock_addr(sendmsg6)]
pub fn socket_sendmsg6(ctx: SockAddrContext) -> i32 {
    socket::translate_v6(&ctx, Call::Send);
    PROCEED
}

#[cgroup_sock_addr(recvmsg6)]
pub fn socket_recvmsg6(ctx: SockAddrContext) -> i32 {
    socket::restore_v6(&ctx);
    PROCEED
}

#[cgroup_sock_addr(getpeername6)]
pub fn socket_getpeername6(ctx: SockAddrContext) -> i32 {
    socket::restore_v6(&ctx);
    PROCEED
}

#[cfg(not(test))]
#[panic_handler]
fn panic(_info: &core::panic::PanicInfo) -> ! {
    loop {}
}
