//! Bounds-checked access to the frame. The verifier only accepts a packet access that is
//! checked against data_end right before it, so every access goes through `ptr_at` (or
//! `ptr_at_mut`). The same code reads tc (skb) and XDP frames.

use aya_ebpf::programs::{TcContext, XdpContext};

/// A frame a program sees: tc's skb or XDP's buffer.
pub trait Frame {
    fn start(&self) -> usize;
    fn end(&self) -> usize;
    /// The frame's whole length (an skb's may go beyond `end`, into paged data).
    fn frame_len(&self) -> usize;
}

impl Frame for TcContext {
    #[inline(always)]
    fn start(&self) -> usize {
        self.data()
    }
    #[inline(always)]
    fn end(&self) -> usize {
        self.data_end()
    }
    #[inline(always)]
    fn frame_len(&self) -> usize {
        self.len() as usize
    }
}

impl Frame for XdpContext {
    #[inline(always)]
    fn start(&self) -> usize {
        self.data()
    }
    #[inline(always)]
    fn end(&self) -> usize {
        self.data_end()
    }
    #[inline(always)]
    fn frame_len(&self) -> usize {
        self.data_end() - self.data()
    }
}

#[inline(always)]
pub fn ptr_at<T>(ctx: &impl Frame, offset: usize) -> Option<*const T> {
    ptr_at_mut(ctx, offset).map(|p| p as *const T)
}

#[inline(always)]
pub fn ptr_at_mut<T>(ctx: &impl Frame, offset: usize) -> Option<*mut T> {
    let start = ctx.start();
    let end = ctx.end();
    if start + offset + core::mem::size_of::<T>() > end {
        return None;
    }
    Some((start + offset) as *mut T)
}
