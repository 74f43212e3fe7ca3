//! The uplink in XDP mode (opt-in, `xbr attach --uplink-mode xdp`): connections to published
//! ports are translated by the same NAT decisions as the tc program (`nat`) and redirected
//! into the container's bridge port, whose veth hands the frame to the container. Every
//! other frame, and every frame NAT does not translate, is passed on unchanged: the tc
//! program and the kernel see it next (and count its verdict; this program counts only what
//! it delivers, as `nat_in_xdp`).
//!
//! The redirect is asked for before the frame changes (`Rewriter::redirect_to`): a frame is
//! rewritten only once its redirect is certain, so a frame passed on is always the frame that
//! arrived, never a translated one the kernel would mistake for its own.
//!
//! XDP has no checksum state, so the checksums are updated here with RFC 1624 arithmetic on
//! the bytes. That is right only for frames that carry full checksums (from a physical NIC):
//! a CHECKSUM_PARTIAL frame (a veth sender with tx offload) looks the same and would be
//! corrupted. Hence XDP mode is opt-in, for uplinks whose frames come with full checksums.

use aya_ebpf::{
    bindings::xdp_action::{XDP_PASS, XDP_REDIRECT},
    helpers::bpf_redirect,
    programs::XdpContext,
};
use bridge_common::{IPPROTO_UDP, Verdict};

use crate::{
    counters::{count_delivered, count_verdict},
    frame::ptr_at_mut,
    nat::{
        self, ETH_DST, ETH_SRC, IP_CHECK, IP_TTL, L4_PORTS_END, MAC_LEN, Nat, Rewrite, Rewriter,
    },
};

/// The flags of the redirect: 0, always, in xbr. The packet tests set one bpf_redirect
/// refuses (any other value), to drive the path of a refused redirect, which no kernel takes
/// with flags 0. A load-time constant, like `REDIRECT_PEER`.
#[unsafe(no_mangle)]
static XDP_REDIRECT_FLAGS: u64 = 0;

#[inline(always)]
pub fn receive(ctx: &XdpContext) -> u32 {
    // SAFETY: the kernel's xdp_md for this run, valid while the program runs; the verifier
    // allows reading its ingress_ifindex.
    let uplink = unsafe { (*ctx.ctx).ingress_ifindex };
    // Passed frames are not counted here: the tc program sees them next, unchanged, and
    // counts their verdict.
    let Ok(segment) = nat::parse(ctx) else {
        return XDP_PASS;
    };
    match nat::inbound(ctx, &segment, uplink) {
        Nat::NotOurs | Nat::Pass(_) => XDP_PASS,
        // The redirect was asked for (`redirect_to`) and granted before the rewrite.
        Nat::Redirect(port) | Nat::Egress(port) | Nat::EgressNeigh(port) => {
            count_verdict(Verdict::NatInXdp);
            count_delivered(ctx, port);
            XDP_REDIRECT
        }
    }
}

/// Adds `new - old` (16-bit big-endian words) to a ones'-complement sum.
#[inline(always)]
fn replace(sum: u32, old: u16, new: u16) -> u32 {
    sum + u32::from(!old) + u32::from(new)
}

#[inline(always)]
fn word(bytes: &[u8], at: usize) -> u16 {
    u16::from_be_bytes([bytes[at], bytes[at + 1]])
}

/// RFC 1624 eqn. 3: HC' = ~(~HC + ~m + m'), for the words of `old` -> `new`.
#[inline(always)]
fn update(check: u16, old: &[u8; 4], new: &[u8; 4], old_word: u16, new_word: u16) -> u16 {
    let mut sum = u32::from(!check);
    sum = replace(sum, word(old, 0), word(new, 0));
    sum = replace(sum, word(old, 2), word(new, 2));
    sum = replace(sum, old_word, new_word);
    sum = (sum & 0xffff) + (sum >> 16);
    sum = (sum & 0xffff) + (sum >> 16);
    !(sum as u16)
}

impl Rewriter for XdpContext {
    /// Out of the container's bridge port (a veth): the kernel delivers it to the container's
    /// end when that end has NAPI (an XDP program, or GRO on). bpf_redirect only records the
    /// target; its action becomes the program's. It returns XDP_REDIRECT for flags 0 on every
    /// kernel we know, anything else (XDP_ABORTED, for flags it does not take) leaves the
    /// frame unchanged for tc.
    #[inline(always)]
    fn redirect_to(&self, ifindex: u32) -> bool {
        // SAFETY: a reference to a static is valid and aligned; volatile, so that the compiler
        // does not fold in the default and the loader's value is read.
        let flags = unsafe { core::ptr::read_volatile(&XDP_REDIRECT_FLAGS) };
        // SAFETY: a BPF helper that takes only integers.
        let action = unsafe { bpf_redirect(ifindex, flags) } as u32;
        action == XDP_REDIRECT
    }

    #[inline(always)]
    fn rewrite(&self, r: &Rewrite) -> bool {
        // One bounds check for the headers up to the ports, one for the L4 checksum; and the
        // rewrite's offsets checked too, all before the first write.
        let Some(headers) = ptr_at_mut::<[u8; L4_PORTS_END]>(self, 0) else {
            return false;
        };
        let Some(l4_check) = ptr_at_mut::<[u8; 2]>(self, r.l4_check) else {
            return false;
        };
        if r.ip_at + 4 > L4_PORTS_END || r.port_at + 2 > L4_PORTS_END {
            return false;
        }
        // SAFETY: ptr_at_mut checked that both lie within the frame, which this program may
        // write; they do not overlap (the checksum lies after the ports) and nothing else
        // refers to the frame while they live.
        let (headers, l4_check) = unsafe { (&mut *headers, &mut *l4_check) };

        // IP header: the address and the TTL (the TTL shares its word with the protocol).
        let ip_check = word(headers, IP_CHECK);
        let old_ttl = u16::from_be_bytes([r.ttl, r.proto]);
        let new_ttl = u16::from_be_bytes([r.ttl - 1, r.proto]);
        let ip_check = update(ip_check, &r.old_ip, &r.new_ip, old_ttl, new_ttl);
        // L4: the address through the pseudo-header, and the port. A UDP checksum of 0 means
        // "none" and stays 0; a computed 0 is sent as 0xffff (RFC 768).
        let check = u16::from_be_bytes(*l4_check);
        let no_checksum = r.proto == IPPROTO_UDP && check == 0;
        if !no_checksum {
            let old_port = u16::from_be_bytes(r.old_port);
            let new_port = u16::from_be_bytes(r.new_port);
            let mut check = update(check, &r.old_ip, &r.new_ip, old_port, new_port);
            if r.proto == IPPROTO_UDP && check == 0 {
                check = 0xffff;
            }
            *l4_check = check.to_be_bytes();
        }
        headers[IP_CHECK..IP_CHECK + 2].copy_from_slice(&ip_check.to_be_bytes());
        headers[IP_TTL] = r.ttl - 1;
        headers[r.ip_at..r.ip_at + 4].copy_from_slice(&r.new_ip);
        headers[r.port_at..r.port_at + 2].copy_from_slice(&r.new_port);
        headers[ETH_DST..ETH_DST + MAC_LEN].copy_from_slice(&r.eth_dst);
        headers[ETH_SRC..ETH_SRC + MAC_LEN].copy_from_slice(&r.eth_src);
        true
    }
}
