//! The kernel's connection tracking table, read over ctnetlink (NETLINK_NETFILTER) in the
//! calling thread's network namespace: the same dump `conntrack -L -f ipv4` asks for, without
//! running `conntrack`.
//!
//! The socket work (`ipv4_connections`) is kept apart from the parsing (`parse_dump`), a pure
//! function over the bytes of one netlink datagram.

use std::io;
use std::net::Ipv4Addr;
use std::os::fd::{AsRawFd as _, OwnedFd};

/// One direction of a tracked connection, as conntrack names it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Tuple {
    pub source: Ipv4Addr,
    pub destination: Ipv4Addr,
    pub source_port: u16,
    pub destination_port: u16,
}

/// A connection conntrack holds: its protocol (IPPROTO_TCP or IPPROTO_UDP), the tuple of the
/// packet that opened it, and the tuple its replies are expected to carry (they differ under NAT).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Tracked {
    pub protocol: u8,
    pub original: Tuple,
    pub reply: Tuple,
}

/// Every IPv4 TCP and UDP connection the kernel's conntrack holds in this namespace.
///
/// A kernel without conntrack (nfnetlink or ctnetlink absent: EPROTONOSUPPORT, EOPNOTSUPP,
/// ENOENT, or EINVAL, which nfnetlink answers for a subsystem that is not registered) tracks
/// nothing, so the list is empty; any other failure is an error.
pub fn ipv4_connections() -> io::Result<Vec<Tracked>> {
    let socket = match open_socket() {
        Ok(socket) => socket,
        Err(error) if is_absent(error.raw_os_error()) => return Ok(Vec::new()),
        Err(error) => return Err(context("cannot open a NETLINK_NETFILTER socket", error)),
    };
    send_all(&socket, &dump_request(SEQUENCE))
        .map_err(|error| context("cannot send the conntrack dump request", error))?;
    let mut connections = Vec::new();
    let mut buffer = vec![0u8; RECEIVE_BUFFER];
    loop {
        let length = receive(&socket, &mut buffer)
            .map_err(|error| context("cannot read the conntrack dump", error))?;
        match parse_dump(&buffer[..length]) {
            Ok(batch) => {
                connections.extend(batch.connections);
                if batch.done {
                    return Ok(connections);
                }
            }
            Err(DumpError::Kernel(errno)) if is_absent(Some(errno)) => return Ok(Vec::new()),
            Err(DumpError::Kernel(errno)) => {
                return Err(context(
                    "the kernel refused the conntrack dump",
                    io::Error::from_raw_os_error(errno),
                ));
            }
            Err(DumpError::Malformed(what)) => {
                return Err(io::Error::new(
                    io::ErrorKind::InvalidData,
                    format!("malformed conntrack dump from the kernel: {what}"),
                ));
            }
        }
    }
}

// Netlink and nfnetlink constants (linux/netlink.h, linux/netfilter/nfnetlink*.h).
const NLMSG_HEADER: usize = 16;
const NLMSG_NOOP: u16 = 1;
const NLMSG_ERROR: u16 = 2;
const NLMSG_DONE: u16 = 3;
const NLMSG_OVERRUN: u16 = 4;
const NLM_F_REQUEST: u16 = 0x1;
const NLM_F_DUMP: u16 = 0x300;
const NFNL_SUBSYS_CTNETLINK: u16 = 1;
const IPCTNL_MSG_CT_NEW: u16 = 0;
const IPCTNL_MSG_CT_GET: u16 = 1;
const NFNETLINK_V0: u8 = 0;
const NFGENMSG: usize = 4;
const AF_INET: u8 = libc::AF_INET as u8;

// Attribute types; the two top bits of nla_type are flags, not part of the type.
const NLA_HEADER: usize = 4;
const NLA_F_NESTED: u16 = 0x8000;
const NLA_F_NET_BYTEORDER: u16 = 0x4000;
const NLA_TYPE_MASK: u16 = !(NLA_F_NESTED | NLA_F_NET_BYTEORDER);
const CTA_TUPLE_ORIG: u16 = 1;
const CTA_TUPLE_REPLY: u16 = 2;
const CTA_TUPLE_IP: u16 = 1;
const CTA_TUPLE_PROTO: u16 = 2;
const CTA_IP_V4_SRC: u16 = 1;
const CTA_IP_V4_DST: u16 = 2;
const CTA_PROTO_NUM: u16 = 1;
const CTA_PROTO_SRC_PORT: u16 = 2;
const CTA_PROTO_DST_PORT: u16 = 3;

const IPPROTO_TCP: u8 = libc::IPPROTO_TCP as u8;
const IPPROTO_UDP: u8 = libc::IPPROTO_UDP as u8;

/// The request's sequence number; the socket is ours alone, so one is enough.
const SEQUENCE: u32 = 1;
/// Larger than any datagram of a dump (the kernel fills at most 32 KiB per skb); a larger one
/// would be reported truncated rather than misread.
const RECEIVE_BUFFER: usize = 64 * 1024;

/// What one datagram of a dump held.
#[derive(Debug, Default, PartialEq, Eq)]
struct Batch {
    /// Its IPv4 TCP and UDP entries, in the kernel's order.
    connections: Vec<Tracked>,
    /// Whether it ended the dump (NLMSG_DONE).
    done: bool,
}

#[derive(Debug, PartialEq, Eq)]
enum DumpError {
    /// The kernel answered with this errno (positive), in NLMSG_ERROR or NLMSG_DONE.
    Kernel(i32),
    /// The bytes are not a well-formed netlink datagram.
    Malformed(String),
}

/// Whether `errno` says conntrack is not there to ask (no nfnetlink, no ctnetlink: a 5.10
/// kernel whose nf_conntrack module is not loaded answers the dump with EINVAL, since
/// nfnetlink has no such subsystem; the request itself is the one every kernel takes).
fn is_absent(errno: Option<i32>) -> bool {
    matches!(
        errno,
        Some(libc::EOPNOTSUPP | libc::ENOENT | libc::EPROTONOSUPPORT | libc::EINVAL)
    )
}

fn context(doing: &str, error: io::Error) -> io::Error {
    io::Error::new(error.kind(), format!("{doing}: {error}"))
}

/// The dump request: nlmsghdr, then struct nfgenmsg { AF_INET, NFNETLINK_V0, res_id 0 }.
fn dump_request(sequence: u32) -> Vec<u8> {
    let length = (NLMSG_HEADER + NFGENMSG) as u32;
    let mut request = Vec::with_capacity(length as usize);
    request.extend_from_slice(&length.to_ne_bytes());
    request.extend_from_slice(&(NFNL_SUBSYS_CTNETLINK << 8 | IPCTNL_MSG_CT_GET).to_ne_bytes());
    request.extend_from_slice(&(NLM_F_REQUEST | NLM_F_DUMP).to_ne_bytes());
    request.extend_from_slice(&sequence.to_ne_bytes());
    request.extend_from_slice(&0u32.to_ne_bytes());
    request.extend_from_slice(&[AF_INET, NFNETLINK_V0, 0, 0]);
    request
}

/// Parses one datagram of a ctnetlink dump: the IPv4 TCP and UDP entries it holds (other
/// families and protocols are skipped), and whether it ended the dump. Messages after
/// NLMSG_DONE are ignored.
fn parse_dump(bytes: &[u8]) -> Result<Batch, DumpError> {
    let mut batch = Batch::default();
    let mut rest = bytes;
    while !rest.is_empty() {
        if rest.len() < NLMSG_HEADER {
            return Err(malformed(format!(
                "{} trailing bytes, less than a netlink header",
                rest.len()
            )));
        }
        let length = u32::from_ne_bytes(rest[0..4].try_into().unwrap()) as usize;
        let kind = u16::from_ne_bytes(rest[4..6].try_into().unwrap());
        if length < NLMSG_HEADER || length > rest.len() {
            return Err(malformed(format!(
                "message of type {kind:#x} claims {length} bytes, {} are left",
                rest.len()
            )));
        }
        let payload = &rest[NLMSG_HEADER..length];
        match kind {
            NLMSG_NOOP => {}
            NLMSG_ERROR => {
                let errno = leading_errno(payload, "NLMSG_ERROR")?;
                // 0 is an acknowledgement, which a dump does not ask for; nothing to report.
                if errno != 0 {
                    return Err(DumpError::Kernel(errno));
                }
            }
            NLMSG_DONE => {
                // The payload, when there is one, is the dump's own result.
                if payload.len() >= 4 {
                    let errno = leading_errno(payload, "NLMSG_DONE")?;
                    if errno != 0 {
                        return Err(DumpError::Kernel(errno));
                    }
                }
                batch.done = true;
                return Ok(batch);
            }
            NLMSG_OVERRUN => return Err(malformed("the kernel reported an overrun".into())),
            kind if kind == NFNL_SUBSYS_CTNETLINK << 8 | IPCTNL_MSG_CT_NEW => {
                if let Some(tracked) = parse_entry(payload)? {
                    batch.connections.push(tracked);
                }
            }
            // Anything else (another subsystem, an expectation) is not a connection.
            _ => {}
        }
        rest = &rest[align(length).min(rest.len())..];
    }
    Ok(batch)
}

/// The errno (positive) at the start of an NLMSG_ERROR or NLMSG_DONE payload.
fn leading_errno(payload: &[u8], what: &str) -> Result<i32, DumpError> {
    let Some(bytes) = payload.get(0..4) else {
        return Err(malformed(format!(
            "{what} with a payload of {} bytes",
            payload.len()
        )));
    };
    Ok(i32::from_ne_bytes(bytes.try_into().unwrap()).saturating_neg())
}

/// One IPCTNL_MSG_CT_NEW payload: nfgenmsg, then attributes. None when it is not an IPv4 TCP
/// or UDP connection.
fn parse_entry(payload: &[u8]) -> Result<Option<Tracked>, DumpError> {
    let Some(header) = payload.get(..NFGENMSG) else {
        return Err(malformed(format!(
            "conntrack entry of {} bytes, shorter than nfgenmsg",
            payload.len()
        )));
    };
    if header[0] != AF_INET {
        return Ok(None);
    }
    let mut original = None;
    let mut reply = None;
    for attribute in attributes(&payload[NFGENMSG..]) {
        let (kind, value) = attribute?;
        match kind {
            CTA_TUPLE_ORIG => original = Some(parse_tuple(value)?),
            CTA_TUPLE_REPLY => reply = Some(parse_tuple(value)?),
            _ => {}
        }
    }
    let (Some(original), Some(reply)) = (original, reply) else {
        return Err(malformed(
            "conntrack entry without its original and reply tuples".into(),
        ));
    };
    if !matches!(original.protocol, Some(IPPROTO_TCP | IPPROTO_UDP)) {
        return Ok(None);
    }
    let protocol = original.protocol.unwrap_or_default();
    if reply.protocol != original.protocol {
        return Err(malformed(format!(
            "conntrack entry whose reply tuple's protocol {:?} is not the original's {protocol}",
            reply.protocol
        )));
    }
    Ok(Some(Tracked {
        protocol,
        original: original.complete(protocol, "original")?,
        reply: reply.complete(protocol, "reply")?,
    }))
}

/// A tuple's attributes as found; which are required depends on the protocol.
#[derive(Default)]
struct PartialTuple {
    source: Option<Ipv4Addr>,
    destination: Option<Ipv4Addr>,
    protocol: Option<u8>,
    source_port: Option<u16>,
    destination_port: Option<u16>,
}

impl PartialTuple {
    fn complete(self, protocol: u8, direction: &str) -> Result<Tuple, DumpError> {
        match self {
            PartialTuple {
                source: Some(source),
                destination: Some(destination),
                source_port: Some(source_port),
                destination_port: Some(destination_port),
                ..
            } => Ok(Tuple {
                source,
                destination,
                source_port,
                destination_port,
            }),
            _ => Err(malformed(format!(
                "protocol {protocol} conntrack entry whose {direction} tuple lacks an IPv4 \
                 address or a port"
            ))),
        }
    }
}

/// A CTA_TUPLE_ORIG or CTA_TUPLE_REPLY value: CTA_TUPLE_IP and CTA_TUPLE_PROTO, both nested.
fn parse_tuple(value: &[u8]) -> Result<PartialTuple, DumpError> {
    let mut tuple = PartialTuple::default();
    for attribute in attributes(value) {
        let (kind, value) = attribute?;
        match kind {
            CTA_TUPLE_IP => {
                for attribute in attributes(value) {
                    let (kind, value) = attribute?;
                    match kind {
                        CTA_IP_V4_SRC => tuple.source = Some(ipv4(value)?),
                        CTA_IP_V4_DST => tuple.destination = Some(ipv4(value)?),
                        _ => {}
                    }
                }
            }
            CTA_TUPLE_PROTO => {
                for attribute in attributes(value) {
                    let (kind, value) = attribute?;
                    match kind {
                        CTA_PROTO_NUM => tuple.protocol = Some(fixed::<1>(value, "protocol")?[0]),
                        // Ports are big-endian whether or not NLA_F_NET_BYTEORDER says so.
                        CTA_PROTO_SRC_PORT => {
                            tuple.source_port = Some(u16::from_be_bytes(fixed(value, "port")?));
                        }
                        CTA_PROTO_DST_PORT => {
                            tuple.destination_port =
                                Some(u16::from_be_bytes(fixed(value, "port")?));
                        }
                        _ => {}
                    }
                }
            }
            _ => {}
        }
    }
    Ok(tuple)
}

fn ipv4(value: &[u8]) -> Result<Ipv4Addr, DumpError> {
    fixed::<4>(value, "IPv4 address").map(Ipv4Addr::from)
}

fn fixed<const N: usize>(value: &[u8], what: &str) -> Result<[u8; N], DumpError> {
    value.try_into().map_err(|_| {
        malformed(format!(
            "{what} attribute of {} bytes, not {N}",
            value.len()
        ))
    })
}

/// The attributes in `bytes`: (type without its flag bits, value).
fn attributes(bytes: &[u8]) -> impl Iterator<Item = Result<(u16, &[u8]), DumpError>> {
    let mut rest = bytes;
    std::iter::from_fn(move || {
        if rest.is_empty() {
            return None;
        }
        if rest.len() < NLA_HEADER {
            let error = malformed(format!(
                "{} trailing bytes in an attribute list",
                rest.len()
            ));
            rest = &[];
            return Some(Err(error));
        }
        let length = u16::from_ne_bytes([rest[0], rest[1]]) as usize;
        let kind = u16::from_ne_bytes([rest[2], rest[3]]) & NLA_TYPE_MASK;
        if length < NLA_HEADER || length > rest.len() {
            let error = malformed(format!(
                "attribute {kind} claims {length} bytes, {} are left",
                rest.len()
            ));
            rest = &[];
            return Some(Err(error));
        }
        let value = &rest[NLA_HEADER..length];
        rest = &rest[align(length).min(rest.len())..];
        Some(Ok((kind, value)))
    })
}

/// Netlink messages and attributes are padded to 4 bytes.
fn align(length: usize) -> usize {
    (length + 3) & !3
}

fn malformed(what: String) -> DumpError {
    DumpError::Malformed(what)
}

fn open_socket() -> io::Result<OwnedFd> {
    let socket = crate::netlink::netfilter_socket(0)?;
    // A kernel that never answers should not hang the caller for good.
    let timeout = libc::timeval {
        tv_sec: 10,
        tv_usec: 0,
    };
    // SAFETY: the option value and its length describe `timeout`.
    let rc = unsafe {
        libc::setsockopt(
            socket.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_RCVTIMEO,
            (&timeout as *const libc::timeval).cast(),
            std::mem::size_of::<libc::timeval>() as libc::socklen_t,
        )
    };
    if rc != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(socket)
}

fn send_all(socket: &OwnedFd, message: &[u8]) -> io::Result<()> {
    // SAFETY: an all-zero sockaddr_nl (pid 0) addresses the kernel.
    let mut kernel: libc::sockaddr_nl = unsafe { std::mem::zeroed() };
    kernel.nl_family = libc::AF_NETLINK as libc::sa_family_t;
    loop {
        // SAFETY: the message and the address, with their lengths, describe memory we own.
        let sent = unsafe {
            libc::sendto(
                socket.as_raw_fd(),
                message.as_ptr().cast(),
                message.len(),
                0,
                (&kernel as *const libc::sockaddr_nl).cast(),
                std::mem::size_of::<libc::sockaddr_nl>() as libc::socklen_t,
            )
        };
        if sent >= 0 {
            // Netlink sends a datagram whole or not at all.
            return Ok(());
        }
        let error = io::Error::last_os_error();
        if error.kind() != io::ErrorKind::Interrupted {
            return Err(error);
        }
    }
}

/// Reads one datagram into `buffer`; its length. A datagram larger than the buffer is an error
/// (MSG_TRUNC makes netlink report its real length).
fn receive(socket: &OwnedFd, buffer: &mut [u8]) -> io::Result<usize> {
    loop {
        // SAFETY: the buffer and its length describe writable memory we own.
        let received = unsafe {
            libc::recv(
                socket.as_raw_fd(),
                buffer.as_mut_ptr().cast(),
                buffer.len(),
                libc::MSG_TRUNC,
            )
        };
        if received >= 0 {
            let received = received as usize;
            if received > buffer.len() {
                return Err(io::Error::new(
                    io::ErrorKind::InvalidData,
                    format!(
                        "a datagram of {received} bytes, larger than the {} byte buffer",
                        buffer.len()
                    ),
                ));
            }
            return Ok(received);
        }
        let error = io::Error::last_os_error();
        match error.kind() {
            io::ErrorKind::Interrupted => continue,
            io::ErrorKind::WouldBlock => {
                return Err(io::Error::new(
                    io::ErrorKind::TimedOut,
                    "the kernel did not finish the dump within 10 seconds",
                ));
            }
            _ => return Err(error),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A TCP entry exactly as a 6.x kernel sends it in a dump (tuples flagged NLA_F_NESTED),
    /// with a CTA_STATUS after the tuples: 10.0.0.1:40000 -> 10.0.0.2:80, replies
    /// 10.0.0.2:80 -> 10.0.0.1:40000.
    #[rustfmt::skip]
    const TCP_ENTRY: [u8; 132] = [
            // nlmsghdr: length 132, type 0x0100 (ctnetlink, CT_NEW), flags NLM_F_MULTI,
            // sequence 1, port id 0x1234.
            132, 0, 0, 0,   0x00, 0x01,   0x02, 0x00,   1, 0, 0, 0,   0x34, 0x12, 0, 0,
            // nfgenmsg: AF_INET, NFNETLINK_V0, res_id 0.
            2, 0, 0, 0,
            // CTA_TUPLE_ORIG | NLA_F_NESTED, 52 bytes.
            52, 0, 0x01, 0x80,
                // CTA_TUPLE_IP | NLA_F_NESTED, 20 bytes.
                20, 0, 0x01, 0x80,
                    8, 0, 1, 0,   10, 0, 0, 1,     // CTA_IP_V4_SRC
                    8, 0, 2, 0,   10, 0, 0, 2,     // CTA_IP_V4_DST
                // CTA_TUPLE_PROTO | NLA_F_NESTED, 28 bytes.
                28, 0, 0x02, 0x80,
                    5, 0, 1, 0,   6, 0, 0, 0,      // CTA_PROTO_NUM: TCP, padded
                    6, 0, 2, 0,   0x9c, 0x40, 0, 0, // CTA_PROTO_SRC_PORT: 40000
                    6, 0, 3, 0,   0x00, 0x50, 0, 0, // CTA_PROTO_DST_PORT: 80
            // CTA_TUPLE_REPLY | NLA_F_NESTED, 52 bytes.
            52, 0, 0x02, 0x80,
                20, 0, 0x01, 0x80,
                    8, 0, 1, 0,   10, 0, 0, 2,
                    8, 0, 2, 0,   10, 0, 0, 1,
                28, 0, 0x02, 0x80,
                    5, 0, 1, 0,   6, 0, 0, 0,
                    6, 0, 2, 0,   0x00, 0x50, 0, 0,
                    6, 0, 3, 0,   0x9c, 0x40, 0, 0,
            // CTA_STATUS (3), 8 bytes: IPS_CONFIRMED | IPS_ASSURED | IPS_SEEN_REPLY, big-endian.
            8, 0, 3, 0,   0, 0, 0x01, 0x0e,
    ];

    /// NLMSG_DONE with its result 0, as ends every dump.
    const DONE: [u8; 20] = [
        20, 0, 0, 0, 3, 0, 2, 0, 1, 0, 0, 0, 0x34, 0x12, 0, 0, 0, 0, 0, 0,
    ];

    fn tcp_entry() -> Tracked {
        Tracked {
            protocol: 6,
            original: Tuple {
                source: Ipv4Addr::new(10, 0, 0, 1),
                destination: Ipv4Addr::new(10, 0, 0, 2),
                source_port: 40000,
                destination_port: 80,
            },
            reply: Tuple {
                source: Ipv4Addr::new(10, 0, 0, 2),
                destination: Ipv4Addr::new(10, 0, 0, 1),
                source_port: 80,
                destination_port: 40000,
            },
        }
    }

    /// An attribute: header, value, padding.
    fn attribute(kind: u16, value: &[u8]) -> Vec<u8> {
        let mut bytes = Vec::new();
        bytes.extend_from_slice(&((NLA_HEADER + value.len()) as u16).to_ne_bytes());
        bytes.extend_from_slice(&kind.to_ne_bytes());
        bytes.extend_from_slice(value);
        bytes.resize(align(bytes.len()), 0);
        bytes
    }

    /// A netlink message of `kind` with `payload`.
    fn message(kind: u16, payload: &[u8]) -> Vec<u8> {
        let mut bytes = Vec::new();
        bytes.extend_from_slice(&((NLMSG_HEADER + payload.len()) as u32).to_ne_bytes());
        bytes.extend_from_slice(&kind.to_ne_bytes());
        bytes.extend_from_slice(&2u16.to_ne_bytes());
        bytes.extend_from_slice(&1u32.to_ne_bytes());
        bytes.extend_from_slice(&0u32.to_ne_bytes());
        bytes.extend_from_slice(payload);
        bytes.resize(align(bytes.len()), 0);
        bytes
    }

    /// A CT_NEW message for `family`, with `tuples` as its attributes.
    fn entry(family: u8, tuples: &[Vec<u8>]) -> Vec<u8> {
        let mut payload = vec![family, 0, 0, 0];
        for tuple in tuples {
            payload.extend_from_slice(tuple);
        }
        message(NFNL_SUBSYS_CTNETLINK << 8 | IPCTNL_MSG_CT_NEW, &payload)
    }

    /// A tuple attribute; `nested` sets NLA_F_NESTED on it and its two parts.
    fn tuple(kind: u16, nested: bool, ip: &[Vec<u8>], proto: &[Vec<u8>]) -> Vec<u8> {
        let flag = if nested { NLA_F_NESTED } else { 0 };
        let mut body = attribute(CTA_TUPLE_IP | flag, &ip.concat());
        body.extend(attribute(CTA_TUPLE_PROTO | flag, &proto.concat()));
        attribute(kind | flag, &body)
    }

    fn error_message(errno: i32) -> Vec<u8> {
        // nlmsgerr: the error, then the request's header.
        let mut payload = (-errno).to_ne_bytes().to_vec();
        payload.extend_from_slice(&dump_request(SEQUENCE)[..NLMSG_HEADER]);
        message(NLMSG_ERROR, &payload)
    }

    #[test]
    fn the_request_is_a_ctnetlink_get_dump_for_ipv4() {
        let request = dump_request(7);
        assert_eq!(
            request,
            [
                20, 0, 0, 0, // length
                0x01, 0x01, // type: ctnetlink << 8 | IPCTNL_MSG_CT_GET
                0x01, 0x03, // flags: NLM_F_REQUEST | NLM_F_DUMP
                7, 0, 0, 0, // sequence
                0, 0, 0, 0, // port id
                2, 0, 0, 0, // nfgenmsg: AF_INET, NFNETLINK_V0, res_id 0
            ]
        );
    }

    #[test]
    fn a_nested_tcp_entry_and_done() {
        let mut bytes = TCP_ENTRY.to_vec();
        bytes.extend_from_slice(&DONE);
        assert_eq!(
            parse_dump(&bytes),
            Ok(Batch {
                connections: vec![tcp_entry()],
                done: true
            })
        );
    }

    #[test]
    fn a_datagram_without_done_leaves_the_dump_open() {
        assert_eq!(
            parse_dump(&TCP_ENTRY),
            Ok(Batch {
                connections: vec![tcp_entry()],
                done: false
            })
        );
        assert_eq!(
            parse_dump(&DONE),
            Ok(Batch {
                connections: vec![],
                done: true
            })
        );
    }

    #[test]
    fn non_tcp_udp_and_non_ipv4_entries_are_skipped() {
        let v4 = |a: [u8; 4], b: [u8; 4]| {
            vec![attribute(CTA_IP_V4_SRC, &a), attribute(CTA_IP_V4_DST, &b)]
        };
        // ICMP: CTA_PROTO_NUM 1 with CTA_PROTO_ICMP_ID/TYPE/CODE (4, 5, 6), no ports.
        let icmp = |kind| {
            tuple(
                kind,
                true,
                &v4([10, 0, 0, 1], [10, 0, 0, 2]),
                &[
                    attribute(CTA_PROTO_NUM, &[1]),
                    attribute(4, &0x1234u16.to_be_bytes()),
                    attribute(5, &[8]),
                    attribute(6, &[0]),
                ],
            )
        };
        let icmp_entry = entry(2, &[icmp(CTA_TUPLE_ORIG), icmp(CTA_TUPLE_REPLY)]);
        // An AF_INET6 entry (its tuples would be CTA_IP_V6_*; the family says enough).
        let v6_entry = entry(10, &[attribute(CTA_TUPLE_ORIG | NLA_F_NESTED, &[])]);
        // UDP, tuples without NLA_F_NESTED (older kernels), ports flagged
        // NLA_F_NET_BYTEORDER.
        let udp = |kind, from: [u8; 4], to: [u8; 4], ports: (u16, u16)| {
            tuple(
                kind,
                false,
                &v4(from, to),
                &[
                    attribute(CTA_PROTO_NUM, &[17]),
                    attribute(
                        CTA_PROTO_SRC_PORT | NLA_F_NET_BYTEORDER,
                        &ports.0.to_be_bytes(),
                    ),
                    attribute(
                        CTA_PROTO_DST_PORT | NLA_F_NET_BYTEORDER,
                        &ports.1.to_be_bytes(),
                    ),
                ],
            )
        };
        let udp_entry = entry(
            2,
            &[
                udp(CTA_TUPLE_ORIG, [192, 168, 1, 5], [8, 8, 8, 8], (5353, 53)),
                udp(CTA_TUPLE_REPLY, [8, 8, 8, 8], [203, 0, 113, 9], (53, 61000)),
            ],
        );
        let bytes = [
            icmp_entry,
            TCP_ENTRY.to_vec(),
            v6_entry,
            udp_entry,
            DONE.to_vec(),
        ]
        .concat();
        let udp = Tracked {
            protocol: 17,
            original: Tuple {
                source: Ipv4Addr::new(192, 168, 1, 5),
                destination: Ipv4Addr::new(8, 8, 8, 8),
                source_port: 5353,
                destination_port: 53,
            },
            reply: Tuple {
                source: Ipv4Addr::new(8, 8, 8, 8),
                destination: Ipv4Addr::new(203, 0, 113, 9),
                source_port: 53,
                destination_port: 61000,
            },
        };
        assert_eq!(
            parse_dump(&bytes),
            Ok(Batch {
                connections: vec![tcp_entry(), udp],
                done: true
            })
        );
    }

    #[test]
    fn the_kernel_refusing_is_its_errno() {
        assert_eq!(
            parse_dump(&error_message(libc::EPERM)),
            Err(DumpError::Kernel(libc::EPERM))
        );
        assert_eq!(
            parse_dump(&error_message(libc::EOPNOTSUPP)),
            Err(DumpError::Kernel(libc::EOPNOTSUPP))
        );
        // An acknowledgement (error 0) is no error.
        assert_eq!(parse_dump(&error_message(0)), Ok(Batch::default()));
        // A dump that failed halfway says so in NLMSG_DONE.
        let failed_done = message(NLMSG_DONE, &(-libc::ENOMEM).to_ne_bytes());
        assert_eq!(
            parse_dump(&failed_done),
            Err(DumpError::Kernel(libc::ENOMEM))
        );
        assert!(is_absent(Some(libc::EOPNOTSUPP)));
        assert!(is_absent(Some(libc::ENOENT)));
        assert!(is_absent(Some(libc::EPROTONOSUPPORT)));
        assert!(is_absent(Some(libc::EINVAL)));
        assert!(!is_absent(Some(libc::EPERM)));
        assert!(!is_absent(None));
    }

    #[test]
    fn messages_after_done_are_ignored() {
        let bytes = [DONE.to_vec(), TCP_ENTRY.to_vec()].concat();
        assert_eq!(
            parse_dump(&bytes),
            Ok(Batch {
                connections: vec![],
                done: true
            })
        );
    }

    #[test]
    fn truncated_bytes_are_malformed() {
        // The message claims more bytes than there are.
        assert!(matches!(
            parse_dump(&TCP_ENTRY[..100]),
            Err(DumpError::Malformed(_))
        ));
        // Less than a header.
        assert!(matches!(
            parse_dump(&TCP_ENTRY[..10]),
            Err(DumpError::Malformed(_))
        ));
        // An attribute claiming more than its message holds.
        let mut bad = TCP_ENTRY;
        bad[20] = 200;
        assert!(matches!(parse_dump(&bad), Err(DumpError::Malformed(_))));
        // A port of the wrong width.
        let mut bad = TCP_ENTRY;
        bad[56] = 5;
        assert!(matches!(parse_dump(&bad), Err(DumpError::Malformed(_))));
        // A TCP entry without a reply tuple.
        let mut cut = TCP_ENTRY[..72].to_vec();
        cut[0] = 72;
        assert!(matches!(parse_dump(&cut), Err(DumpError::Malformed(_))));
    }
}
