//! Map keys and values shared by the datapath (`bridge-ebpf`) and the control plane
//! (`bridge-user`). Every type is `#[repr(C)]` with explicit padding, so both sides agree on bytes.
#![no_std]

#[cfg(feature = "lab")]
pub mod lab;
pub mod memory;

/// The hand-kept part of the pinned layout's stamp (`xbr::pins::layout_stamp`): bump it when
/// the meaning of a pinned map or record changes without its definition or size changing
/// (a field reused, a flag's bit moved). Sizes, map types and the map set are stamped
/// automatically from the compiled object.
pub const PIN_LAYOUT_REVISION: u32 = 1;

/// How many bridge ports one attached bridge can hold: all of them, since a Linux bridge has
/// at most 1024 ports (`BR_MAX_PORTS`).
pub const MAX_PORTS: u32 = 1024;
/// How many endpoints (container MACs) one attached bridge can hold: one per port at most.
pub const MAX_ENDPOINTS: u32 = MAX_PORTS;
/// How many published ports one attached bridge can hold.
pub const MAX_PUBLISHED: u32 = 4096;
/// How many uplinks one attached bridge can have.
pub const MAX_UPLINKS: u32 = 64;
/// How many east-west hold-backs (netfilter rules' packet patterns) one bridge can have.
pub const MAX_HOLDS: u32 = 4096;
/// How many clients (or client prefixes) of published ports the policy can hold back, per
/// bridge.
pub const MAX_CLIENT_HOLDS: u32 = 4096;

/// The names of the datapath's programs: the entry functions of `bridge-ebpf` (which must be
/// spelled the same: an attribute macro names the program after its function), the pins the
/// control plane gives them, and what the tests load. The packet tests check that the object
/// holds each of them.
pub mod programs {
    /// tc ingress of a bridge port (`#[classifier] fn port_ingress`).
    pub const PORT: &str = "port_ingress";
    /// tc ingress of an uplink (`#[classifier] fn uplink_ingress`).
    pub const UPLINK: &str = "uplink_ingress";
    /// XDP on an uplink, in uplink XDP mode (`#[xdp] fn uplink_xdp`).
    pub const UPLINK_XDP: &str = "uplink_xdp";
    /// The socket programs (`#[cgroup_sock_addr(..)] fn socket_*`), attached to a cgroup:
    /// published ports for clients on the host, translated when they connect or send.
    pub const SOCKET_CONNECT4: &str = "socket_connect4";
    pub const SOCKET_SENDMSG4: &str = "socket_sendmsg4";
    pub const SOCKET_RECVMSG4: &str = "socket_recvmsg4";
    pub const SOCKET_GETPEERNAME4: &str = "socket_getpeername4";
    pub const SOCKET_CONNECT6: &str = "socket_connect6";
    pub const SOCKET_SENDMSG6: &str = "socket_sendmsg6";
    pub const SOCKET_RECVMSG6: &str = "socket_recvmsg6";
    pub const SOCKET_GETPEERNAME6: &str = "socket_getpeername6";
    pub const SOCKET: [&str; 8] = [
        SOCKET_CONNECT4,
        SOCKET_SENDMSG4,
        SOCKET_RECVMSG4,
        SOCKET_GETPEERNAME4,
        SOCKET_CONNECT6,
        SOCKET_SENDMSG6,
        SOCKET_RECVMSG6,
        SOCKET_GETPEERNAME6,
    ];
    /// Every program of the object.
    pub const ALL: [&str; 11] = [
        PORT,
        UPLINK,
        UPLINK_XDP,
        SOCKET_CONNECT4,
        SOCKET_SENDMSG4,
        SOCKET_RECVMSG4,
        SOCKET_GETPEERNAME4,
        SOCKET_CONNECT6,
        SOCKET_SENDMSG6,
        SOCKET_RECVMSG6,
        SOCKET_GETPEERNAME6,
    ];
}

/// IP protocol numbers of the published-port path.
pub const IPPROTO_TCP: u8 = 6;
pub const IPPROTO_UDP: u8 = 17;

/// Endpoints map key: a destination MAC address.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct EndpointKey {
    pub mac: [u8; 6],
}

/// Endpoints map value: where a frame for that MAC goes.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Endpoint {
    /// Host-side ifindex of the bridge port the MAC lives behind; the datapath redirects into
    /// that port's veth peer.
    pub ifindex: u32,
    /// `Endpoint::CHECK_IPV4`, `Endpoint::REMOTE`.
    pub flags: u32,
    /// The container's IPv4 address (all zero: none known).
    pub ipv4: [u8; 4],
}

impl Endpoint {
    /// Netfilter rules exist, and the policy decided assuming containers use their own IPv4
    /// addresses: an IPv4 frame takes the fast path only from the sender's `ipv4` to the
    /// receiver's. Others take the bridge, where the rules see them.
    pub const CHECK_IPV4: u32 = 1;
    /// A container on another host: `ifindex` is the VXLAN bridge port whose own forwarding
    /// table sends to that host, and frames go out of it (not into a veth peer).
    pub const REMOTE: u32 = 2;
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
    /// Too short for its Ethernet or IP header, or an IP header that does not parse; on an
    /// uplink, also an IPv4 TCP or UDP header cut short.
    Malformed = 6,
    /// Source MAC is not the endpoint learned on the port the frame came in on (spoofed,
    /// moved, or a port the bridge does not forward from): the bridge decides.
    UnknownSource = 7,
    /// The endpoint entry names a port that no longer holds that MAC (the control plane is
    /// catching up with a change): the bridge decides.
    StaleEndpoint = 8,
    /// Arrived on an uplink for a published port: DNATed and delivered into the container.
    NatIn = 9,
    /// A container's reply on a NATed connection: SNATed and sent out of the uplink.
    NatOut = 10,
    /// For a published port, but not translated: TTL about to expire, a TCP segment of a
    /// connection the fast path did not see start (or whose state expired or was replaced),
    /// or a new connection whose reply tuple another connection holds. On an uplink, also
    /// every IPv4 TCP/UDP fragment and every IPv4 header with options, published port or not:
    /// NAT does not read their ports, so cannot tell.
    NatNotTranslated = 11,
    /// For a published port, but there was no room to track the new connection: the kernel
    /// path takes it.
    NatTableFull = 12,
    /// Arrived on an uplink in XDP mode for a published port: DNATed by the XDP program and
    /// redirected into the container's port (`nat_in` counts what the tc program delivers).
    NatInXdp = 13,
    /// A netfilter rule on the kernel path could drop, reject, translate or change it (or the
    /// frame is one whose ports cannot be read while such rules exist): the kernel path
    /// takes it, so that the rule applies.
    HeldByPolicy = 14,
    /// Arrived on an uplink, and no published port or inbound NATed connection matches it
    /// (the host's own traffic, another bridge's published ports, anything that is not IPv4
    /// TCP or UDP): the kernel path takes it.
    NotPublished = 15,
    /// A container's frame of an outbound flow (egress NAT): source-NATed to an uplink's
    /// address and sent out of that uplink.
    EgressOut = 16,
    /// Arrived on an uplink, a reply of an outbound flow: translated back and delivered into
    /// the container.
    EgressIn = 17,
    /// The first frame of a new outbound flow that the kernel path takes (and with it the
    /// whole flow): TTL about to expire, no free source port, no room to track it, or a flow
    /// the kernel's conntrack already holds.
    EgressKernel = 18,
}

// `ALL` lists each verdict at its own index (so `COUNT` is how many there are).
const _: () = {
    let mut i = 0;
    while i < Verdict::ALL.len() {
        assert!(Verdict::ALL[i] as u32 == i as u32);
        i += 1;
    }
};

impl Verdict {
    pub const COUNT: u32 = 19;
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
        Verdict::NatIn,
        Verdict::NatOut,
        Verdict::NatNotTranslated,
        Verdict::NatTableFull,
        Verdict::NatInXdp,
        Verdict::HeldByPolicy,
        Verdict::NotPublished,
        Verdict::EgressOut,
        Verdict::EgressIn,
        Verdict::EgressKernel,
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
            Verdict::NatIn => "nat_in",
            Verdict::NatOut => "nat_out",
            Verdict::NatNotTranslated => "nat_not_translated",
            Verdict::NatTableFull => "nat_table_full",
            Verdict::NatInXdp => "nat_in_xdp",
            Verdict::HeldByPolicy => "held_by_policy",
            Verdict::NotPublished => "not_published",
            Verdict::EgressOut => "egress_out",
            Verdict::EgressIn => "egress_in",
            Verdict::EgressKernel => "egress_kernel",
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
    /// An `UplinkMode` value; 0 (attachments made before XDP mode existed) means tc.
    pub uplink_mode: u32,
    /// Established connections the NAT tables hold once they are made (`--max-flows`).
    pub max_flows: u32,
    /// 1: `xbr attach --masquerade` asked for egress NAT (the containers' outbound flows
    /// source-NATed in the datapath), whoever owns the bridge.
    pub masquerade: u32,
    /// The cgroup the socket programs are attached to (its id, the inode of its directory on
    /// the cgroup v2 filesystem); 0: no socket hooks.
    pub socket_cgroup: u64,
}

/// How the uplinks are hooked: the tc program alone, or an XDP program in front of it.
#[repr(u32)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum UplinkMode {
    Tc = 1,
    /// XDP program `uplink_xdp` delivers what it can; the tc program takes what it passes.
    Xdp = 2,
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
    /// That container's IPv4 address (all zero: not known). Egress NAT takes outbound flows
    /// only from it: a reply goes to the port, and must go to the address's own container.
    pub endpoint_ipv4: [u8; 4],
}

impl PortRecord {
    /// xbr created the port's clsact qdisc, so detach removes it again.
    pub const ADDED_CLSACT: u32 = 1;
    /// (Uplinks in XDP mode) `uplink_xdp` is attached in native (driver) mode, its link
    /// pinned beside the tc link.
    pub const XDP_NATIVE: u32 = 2;
    /// (Uplinks in XDP mode) `uplink_xdp` is attached in generic (SKB) mode.
    pub const XDP_GENERIC: u32 = 4;
}

/// `PUBLISHED` map key: what a client connects to. `host_ip` all zero means any address
/// of the host (like `-p 8080:80`).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct PublishedKey {
    pub proto: u8,
    pub _pad: u8,
    /// Network byte order.
    pub host_port: [u8; 2],
    pub host_ip: [u8; 4],
}

/// `PUBLISHED` map value: where the connection goes. The control plane keeps the derived
/// fields (port ifindex, MACs) current as containers come and go.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct PublishedPort {
    pub container_ip: [u8; 4],
    /// Network byte order.
    pub container_port: [u8; 2],
    /// `PublishedPort::BY_DOCKER`, `HELD`, `CLIENT_HOLDS`, `HOST_CLIENTS_HELD`.
    pub flags: u8,
    pub _pad: u8,
    /// Host-side ifindex of the container's bridge port (0: container not found now, so
    /// the kernel path serves the port).
    pub ifindex: u32,
    pub container_mac: [u8; 6],
    /// The source MAC of frames delivered into the container: the bridge's, as if routed
    /// by the host.
    pub gateway_mac: [u8; 6],
}

impl PublishedPort {
    /// The entry mirrors a Docker port binding, so the Docker sync may remove it; entries
    /// without it came from `xbr publish` and are left alone. The datapath never reads it.
    pub const BY_DOCKER: u8 = 1;
    /// A netfilter rule could touch every connection to this port on the kernel path: the
    /// datapath opens none (the kernel path serves them).
    pub const HELD: u8 = 2;
    /// A rule could touch the connections of some clients: `CLIENT_HOLDS` names them.
    pub const CLIENT_HOLDS: u8 = 4;
    /// A rule could touch the host's own connections to this port on the hooks the socket
    /// hooks skip: they leave the host's clients to the kernel path.
    pub const HOST_CLIENTS_HELD: u8 = 8;

    pub fn by_docker(&self) -> bool {
        self.flags & Self::BY_DOCKER != 0
    }
}

/// How many local addresses of the host (besides 127.0.0.0/8) the socket programs know.
pub const MAX_LOCAL_ADDRESSES: u32 = 1024;

/// `SOCKET_CONFIG`: what the socket programs know of the host they serve.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct SocketConfig {
    /// The network namespace of the bridge (its netns cookie): only its sockets are the
    /// host's clients. Zero: the socket programs translate nothing.
    pub host_netns_cookie: u64,
}

/// `SOCKET_COUNTS` value (per CPU, per published port): what the socket programs did with
/// the host's connections and datagrams to it.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct SocketCounts {
    /// connect() calls sent straight to the container (TCP, and connected UDP).
    pub connects: u64,
    /// Datagrams of unconnected UDP sockets sent straight to the container.
    pub datagrams: u64,
    /// connect() and send calls left to the kernel path: the port is held by a netfilter
    /// rule, or its container is gone, or the kernel cannot redirect the call (an unconnected
    /// IPv6 socket's datagram to `[::1]`).
    pub kernel_path: u64,
}

impl SocketCounts {
    pub fn add(&mut self, other: &SocketCounts) {
        self.connects += other.connects;
        self.datagrams += other.datagrams;
        self.kernel_path += other.kernel_path;
    }
}

/// One published port a socket was sent to: the container it went to instead, and the
/// address the socket dialled (what replies and `getpeername` must show).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Dial {
    pub container_ip: [u8; 4],
    /// Network byte order.
    pub container_port: [u8; 2],
    pub dialled_port: [u8; 2],
    pub dialled_ip: [u8; 4],
    pub proto: u8,
    /// `Dial::IPV6_LOOPBACK`.
    pub flags: u8,
    pub _pad: [u8; 2],
}

impl Dial {
    /// The socket dialled `::1` (an IPv6 socket): replies show `::1`, not `::ffff:127.0.0.1`.
    pub const IPV6_LOOPBACK: u8 = 1;
}

/// How many published ports one socket remembers (an unconnected UDP socket may send to
/// several); the oldest is forgotten first.
pub const DIALS_PER_SOCKET: usize = 4;

/// Per-socket storage (`SOCKET_DIALS`): the published ports the socket was sent to. It lives
/// and dies with the socket.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct SocketDials {
    pub dials: [Dial; DIALS_PER_SOCKET],
    /// The slot the next new dial takes.
    pub next: u32,
    pub _pad: u32,
}

/// `HOLDS` key: east-west frames that a netfilter rule on the kernel path could drop,
/// translate or change, so they must take the bridge. An entry fixes the fields its `shape`
/// names and leaves the others zero; the datapath looks a frame up once per shape in use.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct HoldKey {
    /// `HoldKey::SOURCE | HoldKey::PROTOCOL | ...`
    pub shape: u8,
    /// 4 or 6.
    pub family: u8,
    pub protocol: u8,
    pub _pad: u8,
    /// Network byte order; TCP and UDP only.
    pub source_port: [u8; 2],
    pub destination_port: [u8; 2],
    /// IPv4 addresses in the first four bytes.
    pub source: [u8; 16],
    pub destination: [u8; 16],
}

impl HoldKey {
    pub const SOURCE: u8 = 1;
    pub const DESTINATION: u8 = 2;
    pub const PROTOCOL: u8 = 4;
    pub const SOURCE_PORT: u8 = 8;
    pub const DESTINATION_PORT: u8 = 16;
    /// Shapes are 0..SHAPES; `HOLD_SHAPES` has a bit per shape in use.
    pub const SHAPES: u32 = 32;

    /// Writes this key with only `shape`'s fields kept into `out` (in place: the datapath
    /// keeps keys off its small stack).
    #[inline(always)]
    pub fn mask_into(&self, shape: u8, out: &mut HoldKey) {
        let keep = |bit: u8| shape & bit != 0;
        out.shape = shape;
        out.family = self.family;
        out.protocol = if keep(Self::PROTOCOL) {
            self.protocol
        } else {
            0
        };
        out._pad = 0;
        out.source_port = if keep(Self::SOURCE_PORT) {
            self.source_port
        } else {
            [0; 2]
        };
        out.destination_port = if keep(Self::DESTINATION_PORT) {
            self.destination_port
        } else {
            [0; 2]
        };
        out.source = if keep(Self::SOURCE) {
            self.source
        } else {
            [0; 16]
        };
        out.destination = if keep(Self::DESTINATION) {
            self.destination
        } else {
            [0; 16]
        };
    }
}

/// `CLIENT_HOLDS` key: clients of one published port (one port, or one address and port)
/// whose connections a netfilter rule could touch on the kernel path. `shape` says which
/// client fields are fixed. Clients named by address alone are in `CLIENT_PREFIX_HOLDS`.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct ClientHoldKey {
    pub published: PublishedKey,
    pub client_ip: [u8; 4],
    /// Network byte order.
    pub client_port: [u8; 2],
    /// `ClientHoldKey::ADDRESS | ClientHoldKey::PORT`.
    pub shape: u8,
    pub _pad: u8,
}

impl ClientHoldKey {
    pub const ADDRESS: u8 = 1;
    pub const PORT: u8 = 2;
}

/// `CLIENT_PREFIX_HOLDS` (longest-prefix-match) key data: a published port's clients in an
/// address prefix. The trie's prefix length counts the published key's 64 bits first.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct ClientPrefix {
    pub published: PublishedKey,
    pub client_ip: [u8; 4],
}

impl ClientPrefix {
    /// The trie prefix length of clients in a /`len` prefix.
    pub const fn prefix_len(len: u8) -> u32 {
        64 + len as u32
    }
}

/// The one `EGRESS` entry: whether and how the bridge's containers' new outbound flows are
/// source-NATed in the datapath. Written by the control plane; all zero: egress is the
/// kernel's.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct EgressConfig {
    /// 1: translate new outbound flows; 0: leave them to the kernel path.
    pub enabled: u32,
    /// The bridge: the interface the kernel path would route the container's frames from
    /// (the input interface of the FIB lookup).
    pub bridge_ifindex: u32,
    /// The containers' subnet: sources inside it are translated, destinations inside it are
    /// not outbound.
    pub subnet: [u8; 4],
    pub subnet_mask: [u8; 4],
    /// The source ports xbr gives translated flows, host byte order, inclusive...
    pub port_min: u16,
    pub port_max: u16,
    /// ... except these (inclusive; both 0: none): `ip_local_port_range`, where the host's own
    /// connections and the source ports the kernel's MASQUERADE keeps for containers live.
    pub skip_min: u16,
    pub skip_max: u16,
}

/// How many tuples `KERNEL_FLOWS` holds: flows the kernel path owns, which egress must not
/// take over.
pub const MAX_KERNEL_FLOWS: u32 = 8192;

/// `NAT_FLOWS` key: a connection as one direction sees it (source, then destination).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct FlowKey {
    pub proto: u8,
    pub _pad: [u8; 3],
    pub src_ip: [u8; 4],
    pub dst_ip: [u8; 4],
    /// Network byte order.
    pub src_port: [u8; 2],
    pub dst_port: [u8; 2],
}

/// `NAT_FLOWS` and `NAT_TRANSIENT` value: how to translate and where to send a frame of that
/// direction, and where the connection stands.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Flow {
    /// The address and port that replace the destination (inbound) or the source (outbound).
    pub new_ip: [u8; 4],
    pub new_port: [u8; 2],
    /// `Flow::INBOUND` or `Flow::OUTBOUND`, plus state flags.
    pub flags: u16,
    /// Inbound: the container's host-side port (redirect into its peer). Outbound: the uplink
    /// (redirect to its egress).
    pub ifindex: u32,
    pub eth_src: [u8; 6],
    pub eth_dst: [u8; 6],
    /// bpf_ktime_get_ns of the last frame in this direction: idle connections are retired.
    pub last_seen_ns: u64,
    /// The other direction's key, to retire both together.
    pub peer: FlowKey,
    /// bpf_ktime_get_ns when the connection was opened (or closed, for a closing one).
    pub opened_ns: u64,
    /// (TCP, reply direction, not established) The acknowledgment number that completes the
    /// handshake: the container's SYN-ACK sequence number + 1, network byte order.
    pub handshake_ack: [u8; 4],
    pub _pad: [u8; 4],
}

impl Flow {
    /// Client to container: rewrite the destination.
    pub const INBOUND: u16 = 1;
    /// Container to client: rewrite the source.
    pub const OUTBOUND: u16 = 2;
    /// A FIN went by in this direction.
    pub const FIN_SEEN: u16 = 4;
    /// (Reply direction, transient) The container answered: a SYN-ACK (TCP; its sequence
    /// number is in `handshake_ack`) or a datagram (UDP).
    pub const ANSWERED: u16 = 8;
    /// The handshake completed (TCP) or the flow became a stream (UDP). Always set in
    /// `NAT_FLOWS`; in `NAT_TRANSIENT` only while `NAT_FLOWS` was too full to take it.
    pub const ESTABLISHED: u16 = 16;
    /// (Transient) Both directions sent FIN: only the last segments are left.
    pub const CLOSING: u16 = 32;
    /// An outbound flow (egress NAT): the container opened it, the outside answers. Without
    /// it, a connection to a published port: the outside opened it.
    pub const EGRESS: u16 = 64;
    /// (Egress, outbound direction) The uplink had no neighbour entry for the next hop when
    /// the flow opened: its frames go out with bpf_redirect_neigh, which resolves it.
    pub const RESOLVE_NEIGH: u16 = 128;
    /// The flags that say which direction and kind of connection an entry is: kept through
    /// every change of state.
    pub const IDENTITY: u16 = Flow::INBOUND | Flow::OUTBOUND | Flow::EGRESS | Flow::RESOLVE_NEIGH;

    /// How long this entry may stay quiet (since `last_seen_ns`) before it is retired: the
    /// transient lifetime unless established, the established one by protocol and FIN.
    pub const fn lifetime_ns(&self, proto: u8) -> u64 {
        if self.flags & Flow::ESTABLISHED == 0 || self.flags & Flow::CLOSING != 0 {
            lifetime::TRANSIENT_NS
        } else if proto != IPPROTO_TCP {
            lifetime::UDP_STREAM_NS
        } else if self.flags & Flow::FIN_SEEN != 0 {
            lifetime::TCP_FIN_QUIET_NS
        } else {
            lifetime::TCP_ESTABLISHED_NS
        }
    }
}

/// How long NAT state lives, in nanoseconds of quiet (no frame in that direction), like the
/// kernel's conntrack timeouts. The datapath and the control plane read the same numbers.
pub mod lifetime {
    const SECOND: u64 = 1_000_000_000;
    /// A connection that is not established (a TCP handshake that did not complete, a UDP
    /// flow that is not a stream yet) or is closing (FIN both ways). Every retransmission of
    /// the handshake refreshes it (the longest pause between a SYN-ACK's retransmissions is
    /// 16 s), and a new SYN opens a connection again.
    pub const TRANSIENT_NS: u64 = 30 * SECOND;
    /// An established TCP connection, without FIN.
    pub const TCP_ESTABLISHED_NS: u64 = 24 * 3600 * SECOND;
    /// An established TCP connection after a FIN in one direction.
    pub const TCP_FIN_QUIET_NS: u64 = 60 * SECOND;
    /// An established UDP flow (nf_conntrack_udp_timeout_stream).
    pub const UDP_STREAM_NS: u64 = 120 * SECOND;
    /// A UDP flow the container answered becomes established (a stream) with the client's
    /// first datagram this long after it opened, as conntrack assures a UDP flow.
    pub const UDP_STREAM_AFTER_NS: u64 = 2 * SECOND;
}

/// What happened to NATed connections: indexes of the per-CPU `NAT_EVENTS` counters.
#[repr(u32)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum NatEvent {
    /// A new connection got transient state: a TCP SYN, or a datagram of a new UDP flow.
    Opened = 0,
    /// The handshake completed (the client acknowledged the container's SYN-ACK) or the UDP
    /// flow became a stream: the connection moved to the established table.
    Established = 1,
    /// It would have, but the established table was full: it stays transient (and a flood
    /// can replace it there) until there is room.
    EstablishedTableFull = 2,
    /// Both directions sent FIN: the connection moved to the transient table.
    Closed = 3,
    /// A RST ended a connection.
    Reset = 4,
    /// Entries the datapath added to `NAT_TRANSIENT`. Entries leave it by the datapath
    /// (`TransientRemoved`), by the control plane (`TransientSwept`), or replaced by the
    /// kernel's LRU to make room for new ones: replaced = added - removed - swept - present.
    TransientAdded = 5,
    TransientRemoved = 6,
    /// Entries the control plane removed from `NAT_TRANSIENT` (written by the control plane
    /// only).
    TransientSwept = 7,
    /// A container opened an outbound flow that xbr translates (egress NAT); `Opened` counts
    /// it too.
    EgressOpened = 8,
    /// A new outbound flow found no free source port for its destination: the kernel path
    /// took it.
    EgressPortsExhausted = 9,
}

impl NatEvent {
    pub const COUNT: u32 = 10;
    pub const ALL: [NatEvent; Self::COUNT as usize] = [
        NatEvent::Opened,
        NatEvent::Established,
        NatEvent::EstablishedTableFull,
        NatEvent::Closed,
        NatEvent::Reset,
        NatEvent::TransientAdded,
        NatEvent::TransientRemoved,
        NatEvent::TransientSwept,
        NatEvent::EgressOpened,
        NatEvent::EgressPortsExhausted,
    ];

    pub const fn name(self) -> &'static str {
        match self {
            NatEvent::Opened => "opened",
            NatEvent::Established => "established",
            NatEvent::EstablishedTableFull => "established_table_full",
            NatEvent::Closed => "closed",
            NatEvent::Reset => "reset",
            NatEvent::TransientAdded => "transient_added",
            NatEvent::TransientRemoved => "transient_removed",
            NatEvent::TransientSwept => "transient_swept",
            NatEvent::EgressOpened => "egress_opened",
            NatEvent::EgressPortsExhausted => "egress_ports_exhausted",
        }
    }
}

#[cfg(feature = "user")]
mod pod {
    use super::*;
    unsafe impl aya::Pod for EndpointKey {}
    unsafe impl aya::Pod for Endpoint {}
    unsafe impl aya::Pod for PortStats {}
    unsafe impl aya::Pod for BridgeRecord {}
    unsafe impl aya::Pod for PortRecord {}
    unsafe impl aya::Pod for PublishedKey {}
    unsafe impl aya::Pod for PublishedPort {}
    unsafe impl aya::Pod for FlowKey {}
    unsafe impl aya::Pod for Flow {}
    unsafe impl aya::Pod for EgressConfig {}
    unsafe impl aya::Pod for HoldKey {}
    unsafe impl aya::Pod for ClientHoldKey {}
    unsafe impl aya::Pod for ClientPrefix {}
    unsafe impl aya::Pod for SocketConfig {}
    unsafe impl aya::Pod for SocketCounts {}
}
