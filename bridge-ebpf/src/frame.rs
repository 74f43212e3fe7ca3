//! Bounds-checked access to the frame. The verifier only accepts a packet access that is
//! checked against data_end right before it, so every read goes through `ptr_at`.

use aya_ebpf::programs::TcContext;

#[inline(always)]
pub fn ptr_at<T>(ctx: &TcContext, offset: usize) -> Option<*const T> {
    let start = ctx.data();
    let end = ctx.data_end();
    if start + offset + core::mem::size_of::<T>() > end {
        return None;
    }
    Some((start + offset) as *const T)
}
