//! Map keys and values shared by the datapath (`bridge-ebpf`) and the control plane
//! (`bridge-user`). Every type is `#[repr(C)]` with explicit padding, so both sides agree on bytes.
#![no_std]

/// How many endpoints (container MACs) one attached bridge can hold.
pub const MAX_ENDPOINTS: u32 = 16384;
/// How many bridge ports one attached bridge can hold.
pub const MAX_PORTS: u32 = 16384;

/// Endpoints map key: a destination MAC address.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct EndpointKey {
    pub mac: [u8; 6],
}

/// Endpoints map value: where a frame for that MAC goes.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Endpoint {
    /// Host-side ifindex of the bridge port the MAC lives behind; the datapath redirects into
    /// that port's veth peer.
    pub ifindex: u32,
    pub flags: u32,
}

/// Per-port counters (per CPU; userspace sums them), keyed by the port's host-side ifindex.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct PortStats {
    /// Frames sent by the container on this port that took the fast path.
    pub fast_path_packets: u64,
    pub fast_path_bytes: u64,
    /// Frames sent by the container on this port that were handed to the bridge.
    pub bridge_packets: u64,
    pub bridge_bytes: u64,
    /// Frames the fast path delivered to the container on this port.
    pub delivered_packets: u64,
    pub delivered_bytes: u64,
}

impl PortStats {
    pub fn add(&mut self, other: &PortStats) {
        self.fast_path_packets += other.fast_path_packets;
        self.fast_path_bytes += other.fast_path_bytes;
        self.bridge_packets += other.bridge_packets;
        self.bridge_bytes += other.bridge_bytes;
        self.delivered_packets += other.delivered_packets;
        self.delivered_bytes += other.delivered_bytes;
    }
}

/// Why the datapath let a frame go the way it went; an index into the verdicts counter array.
#[repr(u32)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Verdict {
    /// Redirected straight into the destination container.
    Redirected = 0,
    /// Broadcast or multicast destination (ARP, ND, DHCP): the bridge floods it.
    NotUnicast = 1,
    /// Neither IPv4 nor IPv6 (ARP replies, LLDP, ...).
    NotIp = 2,
    /// VLAN-tagged (in the frame or in skb metadata): VLAN policy is the bridge's.
    VlanTagged = 3,
    /// Destination MAC is not a known endpoint: the bridge itself, the host, unknown.
    UnknownDestination = 4,
    /// Destination behind the port the frame came from (hairpin): the bridge decides.
    SamePort = 5,
    /// Too short for its Ethernet or IP header, or an IP header that does not parse.
    Malformed = 6,
    /// Source MAC is not the endpoint learned on the port the frame came in on (spoofed,
    /// moved, or a port the bridge does not forward from): the bridge decides.
    UnknownSource = 7,
    /// The endpoint entry names a port that no longer holds that MAC (the control plane is
    /// catching up with a change): the bridge decides.
    StaleEndpoint = 8,
}

impl Verdict {
    pub const COUNT: u32 = 9;
    pub const ALL: [Verdict; Self::COUNT as usize] = [
        Verdict::Redirected,
        Verdict::NotUnicast,
        Verdict::NotIp,
        Verdict::VlanTagged,
        Verdict::UnknownDestination,
        Verdict::SamePort,
        Verdict::Malformed,
        Verdict::UnknownSource,
        Verdict::StaleEndpoint,
    ];

    pub const fn name(self) -> &'static str {
        match self {
            Verdict::Redirected => "redirected",
            Verdict::NotUnicast => "not_unicast",
            Verdict::NotIp => "not_ip",
            Verdict::VlanTagged => "vlan_tagged",
            Verdict::UnknownDestination => "unknown_destination",
            Verdict::SamePort => "same_port",
            Verdict::Malformed => "malformed",
            Verdict::UnknownSource => "unknown_source",
            Verdict::StaleEndpoint => "stale_endpoint",
        }
    }
}

/// How the programs are hooked to the ports.
#[repr(u32)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum AttachMode {
    /// tcx links (kernel >= 6.6), pinned; removing the pin detaches.
    Tcx = 1,
    /// A direct-action cls_bpf filter on a clsact qdisc (older kernels).
    Clsact = 2,
}

/// The one record in the `BRIDGE` map: what the control plane needs to find its way back
/// to an attachment from the pins alone.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct BridgeRecord {
    pub ifindex: u32,
    /// An `AttachMode` value.
    pub attach_mode: u32,
    /// 1 when frames are moved with bpf_redirect_peer, 0 with plain bpf_redirect.
    pub redirect_peer: u32,
    pub _pad: u32,
}

/// `PORTS` map value, keyed by the port's host-side ifindex: one record per port xbr hooked.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct PortRecord {
    pub flags: u32,
    /// The cls_bpf filter's priority and handle (clsact mode), to remove exactly that filter.
    pub tc_priority: u32,
    pub tc_handle: u32,
    /// The endpoint MAC learned on this port (all zero: none). The datapath redirects to a
    /// port only when this MAC is the frame's destination, so a stale endpoint entry alone can
    /// never deliver a frame to the wrong container.
    pub endpoint_mac: [u8; 6],
    pub _pad: [u8; 2],
}

impl PortRecord {
    /// xbr created the port's clsact qdisc, so detach removes it again.
    pub const ADDED_CLSACT: u32 = 1;
}

#[cfg(feature = "user")]
mod pod {
    use super::*;
    unsafe impl aya::Pod for EndpointKey {}
    unsafe impl aya::Pod for Endpoint {}
    unsafe impl aya::Pod for PortStats {}
    unsafe impl aya::Pod for BridgeRecord {}
    unsafe impl aya::Pod for PortRecord {}
}
