//! Published ports for clients on the host itself: a socket of the bridge's network
//! namespace that connects or sends to a published port (`127.0.0.1:8080`, the host's own
//! address, `[::1]:8080`) is pointed at the container's address and port instead, when it
//! connects (or, unconnected UDP, for each datagram it sends). Every packet of the
//! connection then goes straight between the two sockets, with no translation, no
//! docker-proxy and no hairpin NAT. Replies (`recvmsg`) and `getpeername` show the address
//! the socket dialled, from what the socket itself remembers (`SOCKET_DIALS`), so two
//! sockets never see each other's translations.
//!
//! Sockets of other namespaces (containers) are left alone: their `127.0.0.1` is their own,
//! and whether they may reach a container on another network is the kernel path's decision.

use core::ptr::{read_volatile, write_volatile};

use aya_ebpf::{helpers::generated::bpf_get_netns_cookie, programs::SockAddrContext};
use bridge_common::{
    DIALS_PER_SOCKET, Dial, IPPROTO_TCP, IPPROTO_UDP, PublishedKey, PublishedPort, SocketDials,
};

use crate::maps::{LOCAL_ADDRESSES, PUBLISHED, SOCKET_CONFIG, SOCKET_COUNTS, SOCKET_DIALS};

/// What a socket program returns to let the call go on (translated or not).
pub const PROCEED: i32 = 1;

/// Which call a translation is for (what it counts as).
#[derive(Clone, Copy, PartialEq, Eq)]
pub enum Call {
    Connect,
    Send,
}

/// `::ffff:0:0/96`, the IPv4-mapped prefix, as the third 32-bit word of an IPv6 address (in
/// memory order).
const V4_MAPPED_WORD: u32 = u32::from_ne_bytes([0, 0, 0xff, 0xff]);
/// The last 32-bit word of `::1`.
const LOOPBACK_LAST_WORD: u32 = u32::from_ne_bytes([0, 0, 0, 1]);

// The fields of `bpf_sock_addr` are read and written as whole 32-bit words (volatile, so the
// compiler cannot narrow them): older kernels refuse narrower access to some of them.
// SAFETY (of every `read_volatile`/`write_volatile` below): `ctx.sock_addr` is the context
// the kernel passed to the program, valid for its whole run, and these fields are readable
// (and `user_ip4`, `user_ip6`, `user_port` writable) in every socket-address hook.

/// A connect or send of an IPv4 socket.
#[inline(always)]
pub fn translate_v4(ctx: &SockAddrContext, call: Call) {
    let sa = ctx.sock_addr;
    // SAFETY: see above.
    let (ip, port) = unsafe {
        (
            read_volatile(&(*sa).user_ip4).to_ne_bytes(),
            port_bytes(read_volatile(&(*sa).user_port)),
        )
    };
    let Some((container_ip, container_port)) = destination(ctx, ip, port, false, call) else {
        return;
    };
    // SAFETY: see above.
    unsafe {
        write_volatile(&mut (*sa).user_ip4, u32::from_ne_bytes(container_ip));
        write_volatile(&mut (*sa).user_port, port_word(container_port));
    }
}

/// A connect or send of an IPv6 socket: `::1` and IPv4-mapped addresses only (published
/// ports are IPv4); the container is then dialled at its IPv4-mapped address.
#[inline(always)]
pub fn translate_v6(ctx: &SockAddrContext, call: Call) {
    let sa = ctx.sock_addr;
    let (words, port) = user_ip6_and_port(ctx);
    if words[0] != 0 || words[1] != 0 {
        return;
    }
    let (ip, loopback) = if words[2] == V4_MAPPED_WORD {
        (words[3].to_ne_bytes(), false)
    } else if words[2] == 0 && words[3] == LOOPBACK_LAST_WORD {
        ([127, 0, 0, 1], true)
    } else {
        return;
    };
    let Some((container_ip, container_port)) = destination(ctx, ip, port, loopback, call) else {
        return;
    };
    // SAFETY: see above.
    unsafe {
        write_volatile(&mut (*sa).user_ip6[2], V4_MAPPED_WORD);
        write_volatile(&mut (*sa).user_ip6[3], u32::from_ne_bytes(container_ip));
        write_volatile(&mut (*sa).user_port, port_word(container_port));
    }
}

/// A reply (`recvmsg`) or `getpeername` of an IPv4 socket: the container's address becomes
/// the one the socket dialled.
#[inline(always)]
pub fn restore_v4(ctx: &SockAddrContext) {
    let sa = ctx.sock_addr;
    // SAFETY: see above.
    let (ip, port) = unsafe {
        (
            read_volatile(&(*sa).user_ip4).to_ne_bytes(),
            port_bytes(read_volatile(&(*sa).user_port)),
        )
    };
    let Some(dial) = dial_of(ctx, ip, port) else {
        return;
    };
    // SAFETY: see above.
    unsafe {
        write_volatile(&mut (*sa).user_ip4, u32::from_ne_bytes(dial.dialled_ip));
        write_volatile(&mut (*sa).user_port, port_word(dial.dialled_port));
    }
}

/// As `restore_v4`, for an IPv6 socket that reached the container at its IPv4-mapped address.
#[inline(always)]
pub fn restore_v6(ctx: &SockAddrContext) {
    let sa = ctx.sock_addr;
    let (words, port) = user_ip6_and_port(ctx);
    if words[0] != 0 || words[1] != 0 || words[2] != V4_MAPPED_WORD {
        return;
    }
    let Some(dial) = dial_of(ctx, words[3].to_ne_bytes(), port) else {
        return;
    };
    let (third, last) = if dial.flags & Dial::IPV6_LOOPBACK != 0 {
        (0, LOOPBACK_LAST_WORD)
    } else {
        (V4_MAPPED_WORD, u32::from_ne_bytes(dial.dialled_ip))
    };
    // SAFETY: see above.
    unsafe {
        write_volatile(&mut (*sa).user_ip6[2], third);
        write_volatile(&mut (*sa).user_ip6[3], last);
        write_volatile(&mut (*sa).user_port, port_word(dial.dialled_port));
    }
}

/// An IPv6 socket's address (four 32-bit words, in memory order) and port.
#[inline(always)]
fn user_ip6_and_port(ctx: &SockAddrContext) -> ([u32; 4], [u8; 2]) {
    let sa = ctx.sock_addr;
    // SAFETY: see the note on `bpf_sock_addr` fields above.
    unsafe {
        (
            [
                read_volatile(&(*sa).user_ip6[0]),
                read_volatile(&(*sa).user_ip6[1]),
                read_volatile(&(*sa).user_ip6[2]),
                read_volatile(&(*sa).user_ip6[3]),
            ],
            port_bytes(read_volatile(&(*sa).user_port)),
        )
    }
}

/// The container a socket of the host that dials `ip:port` should reach instead (and the
/// dial remembered on the socket), or `None` to leave the call alone.
#[inline(always)]
fn destination(
    ctx: &SockAddrContext,
    ip: [u8; 4],
    port: [u8; 2],
    ipv6_loopback: bool,
    call: Call,
) -> Option<([u8; 4], [u8; 2])> {
    if !in_host_namespace(ctx) {
        return None;
    }
    let sa = ctx.sock_addr;
    // SAFETY: see above.
    let proto = unsafe { read_volatile(&(*sa).protocol) } as u8;
    if proto != IPPROTO_TCP && proto != IPPROTO_UDP {
        return None;
    }
    let (key, published) = published_port(proto, ip, port, ipv6_loopback)?;
    let counts = SOCKET_COUNTS.get_ptr_mut(&key);
    // A port no container serves now, or one a netfilter rule could touch on the way of the
    // host's clients to it (`HOST_CLIENTS_HELD`; the uplink clients' `HELD` is about hooks
    // these connections never pass), is the kernel path's: the call goes on as dialled. So is
    // a datagram an unconnected IPv6
    // socket sends to `[::1]`: the kernel refuses to send it to the IPv4-mapped address the
    // container would have (udpv6_sendmsg: ENOTSUPP), which would fail the send.
    if published.ifindex == 0
        || published.flags & PublishedPort::HOST_CLIENTS_HELD != 0
        || (ipv6_loopback && call == Call::Send)
    {
        if let Some(counts) = counts {
            // SAFETY: this CPU's value of a per-CPU hash entry, valid for the program run.
            unsafe { (*counts).kernel_path += 1 };
        }
        return None;
    }
    let dial = Dial {
        container_ip: published.container_ip,
        container_port: published.container_port,
        dialled_port: port,
        dialled_ip: ip,
        proto,
        flags: if ipv6_loopback {
            Dial::IPV6_LOOPBACK
        } else {
            0
        },
        _pad: [0; 2],
    };
    // Remember the dial before translating: without it, replies would show the container.
    if !remember(ctx, &dial) {
        return None;
    }
    if let Some(counts) = counts {
        // SAFETY: as above.
        unsafe {
            match call {
                Call::Connect => (*counts).connects += 1,
                Call::Send => (*counts).datagrams += 1,
            }
        }
    }
    Some((published.container_ip, published.container_port))
}

/// Whether the socket belongs to the bridge's network namespace (the host the published
/// ports are published on).
#[inline(always)]
fn in_host_namespace(ctx: &SockAddrContext) -> bool {
    let Some(config) = SOCKET_CONFIG.get(0) else {
        return false;
    };
    // SAFETY: the helper only reads the socket's namespace from the context.
    let cookie = unsafe { bpf_get_netns_cookie(ctx.sock_addr.cast()) };
    config.host_netns_cookie != 0 && cookie == config.host_netns_cookie
}

/// The published port a host socket dialling `ip:port` reaches: one published on exactly
/// that address, or one published on every address when `ip` is the host's own.
#[inline(always)]
fn published_port(
    proto: u8,
    ip: [u8; 4],
    port: [u8; 2],
    ipv6_loopback: bool,
) -> Option<(PublishedKey, PublishedPort)> {
    let mut key = PublishedKey {
        proto,
        _pad: 0,
        host_port: port,
        host_ip: ip,
    };
    // `[::1]` is not 127.0.0.1: a port published on 127.0.0.1 alone does not serve it.
    if !ipv6_loopback {
        // SAFETY: the value is copied out at once.
        if let Some(published) = unsafe { PUBLISHED.get(&key) } {
            return Some((key, *published));
        }
    }
    if !is_local(ip) {
        return None;
    }
    key.host_ip = [0; 4];
    // SAFETY: as above.
    let published = unsafe { PUBLISHED.get(&key) }?;
    Some((key, *published))
}

#[inline(always)]
fn is_local(ip: [u8; 4]) -> bool {
    // SAFETY: only whether the entry exists is read.
    ip[0] == 127 || unsafe { LOCAL_ADDRESSES.get(&ip) }.is_some()
}

/// Keeps `dial` on the socket: in the slot of the same container address if there is one,
/// else in the next slot round. False if the socket cannot have storage (no memory).
#[inline(always)]
fn remember(ctx: &SockAddrContext, dial: &Dial) -> bool {
    let mut empty = SocketDials::default();
    // SAFETY: the helper reads the socket from the context the kernel passed.
    let dials = unsafe { SOCKET_DIALS.get_or_insert_ptr_mut(ctx, Some(&mut empty)) };
    if dials.is_null() {
        return false;
    }
    // SAFETY: socket storage the kernel handed out, valid for the program run; another CPU
    // may write it at the same time (one socket used by two threads), which leaves one of the
    // two dials, never invalid memory.
    let dials = unsafe { &mut *dials };
    let mut slot = (dials.next as usize) % DIALS_PER_SOCKET;
    let mut i = 0;
    while i < DIALS_PER_SOCKET {
        let known = &dials.dials[i];
        if known.proto == dial.proto
            && known.container_ip == dial.container_ip
            && known.container_port == dial.container_port
        {
            slot = i;
            break;
        }
        i += 1;
    }
    if slot == (dials.next as usize) % DIALS_PER_SOCKET {
        dials.next = dials.next.wrapping_add(1);
    }
    if let Some(entry) = dials.dials.get_mut(slot) {
        *entry = *dial;
    }
    true
}

/// The dial this socket made to the container at `ip:port`, if it made one.
#[inline(always)]
fn dial_of(ctx: &SockAddrContext, ip: [u8; 4], port: [u8; 2]) -> Option<Dial> {
    // SAFETY: the helper reads the socket from the context; no storage is created.
    let dials = unsafe { SOCKET_DIALS.get_ptr_mut(ctx) };
    if dials.is_null() {
        return None;
    }
    let sa = ctx.sock_addr;
    // SAFETY: see the module's note on `bpf_sock_addr` fields.
    let proto = unsafe { read_volatile(&(*sa).protocol) } as u8;
    // SAFETY: socket storage, valid for the program run (see `remember`).
    let dials = unsafe { &*dials };
    let mut i = 0;
    while i < DIALS_PER_SOCKET {
        let dial = &dials.dials[i];
        if dial.proto == proto && dial.container_ip == ip && dial.container_port == port {
            return Some(*dial);
        }
        i += 1;
    }
    None
}

/// `user_port` holds the port in network byte order in its low 16 bits.
#[inline(always)]
fn port_bytes(user_port: u32) -> [u8; 2] {
    (user_port as u16).to_ne_bytes()
}

#[inline(always)]
fn port_word(port: [u8; 2]) -> u32 {
    u32::from(u16::from_ne_bytes(port))
}
