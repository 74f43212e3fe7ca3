//! Container to container on one bridge: a unicast IP frame for a known endpoint MAC goes
//! straight into the destination container; everything else takes the bridge unchanged.

use aya_ebpf::{bindings::TC_ACT_OK, programs::TcContext};
// Pruned by the verifier unless the loader turns eBPF logging on (AYA_LOG_LEVEL).
use aya_log_ebpf::debug;
use bridge_common::{Endpoint, EndpointKey, Verdict};
use network_types::{
    eth::{EthHdr, EtherType},
    ip::{Ipv4Hdr, Ipv6Hdr},
};

use crate::{
    counters::{count_delivered, count_sent, count_verdict},
    deliver, egress,
    frame::ptr_at,
    maps::{ENDPOINTS, PORTS},
    nat::{self, Nat},
    policy,
};

enum Decision {
    /// Into the container behind this bridge port.
    Redirect(u32),
    /// Out of this VXLAN port, to a container on another host.
    Tunnel(u32),
    /// A reply on a NATed connection, translated: out of this uplink.
    Uplink(u32),
    /// A frame of an outbound flow, translated: out of this uplink (`resolve_neigh`: with the
    /// next hop's neighbour resolved by the kernel).
    Egress {
        uplink: u32,
        resolve_neigh: bool,
    },
    Pass(Verdict),
}

impl Decision {
    fn from_nat(nat: Nat) -> Decision {
        match nat {
            Nat::Redirect(uplink) => Decision::Uplink(uplink),
            Nat::Egress(uplink) => Decision::Egress {
                uplink,
                resolve_neigh: false,
            },
            Nat::EgressNeigh(uplink) => Decision::Egress {
                uplink,
                resolve_neigh: true,
            },
            Nat::Pass(verdict) => Decision::Pass(verdict),
            Nat::NotOurs => Decision::Pass(Verdict::UnknownDestination),
        }
    }
}

#[inline(always)]
pub fn forward(ctx: &TcContext) -> i32 {
    // SAFETY: the kernel's __sk_buff for this run, valid while the program runs; the verifier
    // allows reading its ifindex.
    let ingress_port = unsafe { (*ctx.skb.skb).ifindex };
    let decision = match decide(ctx, ingress_port) {
        // Not for a container here: maybe a reply to a client of a published port, a frame
        // of an outbound flow, or the first frame of a new one.
        Decision::Pass(Verdict::UnknownDestination) => match nat::parse(ctx) {
            Ok(segment) => match nat::outbound(ctx, &segment, ingress_port) {
                Nat::NotOurs => Decision::from_nat(egress::open(ctx, &segment, ingress_port)),
                nat => Decision::from_nat(nat),
            },
            Err(_) => Decision::Pass(Verdict::UnknownDestination),
        },
        decision => decision,
    };
    match decision {
        Decision::Pass(verdict) => {
            debug!(
                ctx,
                "port {}: to the bridge, verdict {}", ingress_port, verdict as u32
            );
            count_verdict(verdict);
            count_sent(ctx, ingress_port, false);
            TC_ACT_OK as i32
        }
        Decision::Redirect(port) => {
            debug!(ctx, "port {}: fast path to port {}", ingress_port, port);
            count_verdict(Verdict::Redirected);
            count_sent(ctx, ingress_port, true);
            count_delivered(ctx, port);
            deliver::into_container(ctx, port)
        }
        Decision::Tunnel(port) => {
            debug!(
                ctx,
                "port {}: fast path out of tunnel {}", ingress_port, port
            );
            count_verdict(Verdict::Redirected);
            count_sent(ctx, ingress_port, true);
            count_delivered(ctx, port);
            deliver::out_of(port)
        }
        Decision::Uplink(uplink) => {
            debug!(
                ctx,
                "port {}: NATed reply out of uplink {}", ingress_port, uplink
            );
            count_verdict(Verdict::NatOut);
            count_sent(ctx, ingress_port, true);
            deliver::out_of(uplink)
        }
        Decision::Egress {
            uplink,
            resolve_neigh,
        } => {
            debug!(
                ctx,
                "port {}: egress out of uplink {}", ingress_port, uplink
            );
            count_verdict(Verdict::EgressOut);
            count_sent(ctx, ingress_port, true);
            if resolve_neigh {
                deliver::out_of_resolving(uplink)
            } else {
                deliver::out_of(uplink)
            }
        }
    }
}

#[inline(always)]
fn decide(ctx: &TcContext, ingress_port: u32) -> Decision {
    // A tag the NIC (or veth) pulled into metadata is still a VLAN frame.
    // SAFETY: as in `forward`: the run's __sk_buff, a field the verifier allows reading.
    if unsafe { (*ctx.skb.skb).vlan_present } != 0 {
        return Decision::Pass(Verdict::VlanTagged);
    }
    let Some(eth) = ptr_at::<EthHdr>(ctx, 0) else {
        return Decision::Pass(Verdict::Malformed);
    };
    // SAFETY: ptr_at checked that the header lies within the frame's linear data.
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
    // SAFETY (each map lookup here): a hash map's value, which the kernel keeps valid for the
    // program run (entries are freed after an RCU grace period); the control plane may change
    // it meanwhile, which is why the port's record is checked as well (below).
    let Some(endpoint) = (unsafe { ENDPOINTS.get(&key) }) else {
        return Decision::Pass(Verdict::UnknownDestination);
    };
    if endpoint.ifindex == ingress_port {
        return Decision::Pass(Verdict::SamePort);
    }
    // Only frames from the container we learned on this port skip the bridge: a port the
    // bridge does not forward from has no endpoint, so its frames meet the bridge's rules.
    let source = EndpointKey { mac: eth.src_addr };
    // SAFETY: as for the endpoint above.
    let sender = match unsafe { ENDPOINTS.get(&source) } {
        Some(sender) if sender.ifindex == ingress_port => sender,
        _ => return Decision::Pass(Verdict::UnknownSource),
    };
    // The target port must still hold that MAC: endpoint and port records are written
    // separately, and either one being current is enough to stop a wrong delivery. A VXLAN
    // port holds many MACs of other hosts and no record of them: its own forwarding table
    // decides the host, so a MAC it no longer has is not sent anywhere.
    let remote = endpoint.flags & Endpoint::REMOTE != 0;
    if !remote {
        // SAFETY: as for the endpoint above.
        match unsafe { PORTS.get(&endpoint.ifindex) } {
            Some(port) if port.endpoint_mac == eth.dst_addr => {}
            _ => return Decision::Pass(Verdict::StaleEndpoint),
        }
    }
    // A netfilter rule on the bridge's path could touch it: the bridge takes it.
    let ipv4 = ether_type == EtherType::Ipv4 as u16;
    if (ipv4 && !policy::addresses_are_theirs(ctx, sender, endpoint))
        || policy::holds_back(ctx, ipv4)
    {
        return Decision::Pass(Verdict::HeldByPolicy);
    }
    if remote {
        Decision::Tunnel(endpoint.ifindex)
    } else {
        Decision::Redirect(endpoint.ifindex)
    }
}

/// The kernel's IP input drops frames whose header does not parse; such frames must meet
/// that check on the kernel path rather than be delivered by us.
#[inline(always)]
fn ipv4_header_is_sane(ctx: &TcContext) -> bool {
    let Some(ip) = ptr_at::<Ipv4Hdr>(ctx, EthHdr::LEN) else {
        return false;
    };
    // SAFETY: ptr_at checked that the header lies within the frame's linear data.
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
    // SAFETY: ptr_at checked that the header lies within the frame's linear data.
    let ip = unsafe { &*ip };
    let version = ip.vcf[0] >> 4;
    let payload_len = usize::from(u16::from_be_bytes(ip.payload_len));
    let frame_len = ctx.len() as usize;
    version == 6 && EthHdr::LEN + Ipv6Hdr::LEN + payload_len <= frame_len
}
