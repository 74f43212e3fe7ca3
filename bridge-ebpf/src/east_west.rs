//! Container to container on one bridge: a unicast IP frame for a known endpoint MAC goes
//! straight into the destination container; everything else takes the bridge unchanged.

// Pruned by the verifier unless the loader turns eBPF logging on (AYA_LOG_LEVEL).
use aya_log_ebpf::debug;
use aya_ebpf::{
    bindings::TC_ACT_OK,
    helpers::{bpf_redirect, bpf_redirect_peer},
    programs::TcContext,
};
use bridge_common::{EndpointKey, Verdict};
use network_types::{
    eth::{EthHdr, EtherType},
    ip::{Ipv4Hdr, Ipv6Hdr},
};

use crate::{
    counters::{count_delivered, count_sent, count_verdict},
    frame::ptr_at,
    maps::{ENDPOINTS, PORTS},
};

/// Set by the loader: 1 where the kernel has bpf_redirect_peer (5.10+), 0 for plain
/// bpf_redirect. A load-time constant, so the verifier prunes the helper the kernel lacks.
#[unsafe(no_mangle)]
static REDIRECT_PEER: u8 = 1;

enum Decision {
    Redirect(u32),
    Pass(Verdict),
}

#[inline(always)]
pub fn forward(ctx: &TcContext) -> i32 {
    let ingress_port = unsafe { (*ctx.skb.skb).ifindex };
    match decide(ctx, ingress_port) {
        Decision::Pass(verdict) => {
            debug!(ctx, "port {}: to the bridge, verdict {}", ingress_port, verdict as u32);
            count_verdict(verdict);
            count_sent(ctx, ingress_port, false);
            TC_ACT_OK as i32
        }
        Decision::Redirect(port) => {
            debug!(ctx, "port {}: fast path to port {}", ingress_port, port);
            count_verdict(Verdict::Redirected);
            count_sent(ctx, ingress_port, true);
            count_delivered(ctx, port);
            let redirect_peer = unsafe { core::ptr::read_volatile(&REDIRECT_PEER) };
            if redirect_peer != 0 {
                unsafe { bpf_redirect_peer(port, 0) as i32 }
            } else {
                unsafe { bpf_redirect(port, 0) as i32 }
            }
        }
    }
}

#[inline(always)]
fn decide(ctx: &TcContext, ingress_port: u32) -> Decision {
    // A tag the NIC (or veth) pulled into metadata is still a VLAN frame.
    if unsafe { (*ctx.skb.skb).vlan_present } != 0 {
        return Decision::Pass(Verdict::VlanTagged);
    }
    let Some(eth) = ptr_at::<EthHdr>(ctx, 0) else {
        return Decision::Pass(Verdict::Malformed);
    };
    let eth = unsafe { &*eth };
    // The group bit: broadcast and multicast are the bridge's to flood.
    if eth.dst_addr[0] & 1 != 0 {
        return Decision::Pass(Verdict::NotUnicast);
    }
    let ether_type = eth.ether_type;
    if ether_type == EtherType::Ipv4 as u16 {
        if !ipv4_header_is_sane(ctx) {
            return Decision::Pass(Verdict::Malformed);
        }
    } else if ether_type == EtherType::Ipv6 as u16 {
        if !ipv6_header_is_sane(ctx) {
            return Decision::Pass(Verdict::Malformed);
        }
    } else if ether_type == EtherType::Ieee8021q as u16
        || ether_type == EtherType::Ieee8021ad as u16
    {
        return Decision::Pass(Verdict::VlanTagged);
    } else {
        return Decision::Pass(Verdict::NotIp);
    }

    let key = EndpointKey { mac: eth.dst_addr };
    let Some(endpoint) = (unsafe { ENDPOINTS.get(&key) }) else {
        return Decision::Pass(Verdict::UnknownDestination);
    };
    if endpoint.ifindex == ingress_port {
        return Decision::Pass(Verdict::SamePort);
    }
    // Only frames from the container we learned on this port skip the bridge: a port the
    // bridge does not forward from has no endpoint, so its frames meet the bridge's rules.
    let source = EndpointKey { mac: eth.src_addr };
    match unsafe { ENDPOINTS.get(&source) } {
        Some(sender) if sender.ifindex == ingress_port => {}
        _ => return Decision::Pass(Verdict::UnknownSource),
    }
    // The target port must still hold that MAC: endpoint and port records are written
    // separately, and either one being current is enough to stop a wrong delivery.
    match unsafe { PORTS.get(&endpoint.ifindex) } {
        Some(port) if port.endpoint_mac == eth.dst_addr => Decision::Redirect(endpoint.ifindex),
        _ => Decision::Pass(Verdict::StaleEndpoint),
    }
}

/// The kernel's IP input drops frames whose header does not parse; such frames must meet
/// that check on the kernel path rather than be delivered by us.
#[inline(always)]
fn ipv4_header_is_sane(ctx: &TcContext) -> bool {
    let Some(ip) = ptr_at::<Ipv4Hdr>(ctx, EthHdr::LEN) else {
        return false;
    };
    let ip = unsafe { &*ip };
    let version = ip.vihl >> 4;
    let header_len = usize::from(ip.vihl & 0x0f) * 4;
    let total_len = usize::from(u16::from_be_bytes(ip.tot_len));
    let frame_len = ctx.len() as usize;
    version == 4
        && header_len >= Ipv4Hdr::LEN
        && total_len >= header_len
        && EthHdr::LEN + total_len <= frame_len
}

#[inline(always)]
fn ipv6_header_is_sane(ctx: &TcContext) -> bool {
    let Some(ip) = ptr_at::<Ipv6Hdr>(ctx, EthHdr::LEN) else {
        return false;
    };
    let ip = unsafe { &*ip };
    let version = ip.vcf[0] >> 4;
    let payload_len = usize::from(u16::from_be_bytes(ip.payload_len));
    let frame_len = ctx.len() as usize;
    version == 6 && EthHdr::LEN + Ipv6Hdr::LEN + payload_len <= frame_len
}
