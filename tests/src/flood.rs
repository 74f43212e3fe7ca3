//! A flood of spoofed packets from inside a lab: TCP SYNs (or UDP datagrams) to a published
//! port, each from another source address in a subnet nobody in the lab owns, so nobody ever
//! answers. Sent as raw Ethernet frames (AF_PACKET) from an interface in a namespace the
//! caller made, at a fixed rate or as fast as one thread can. The tests use it as a library;
//! `cargo xtask bench` runs it as the `syn-flood` binary.

use std::{
    io,
    net::{Ipv4Addr, SocketAddrV4},
    os::fd::{AsRawFd as _, FromRawFd as _, OwnedFd},
    sync::{
        Arc,
        atomic::{AtomicBool, AtomicU64, Ordering},
    },
    thread::JoinHandle,
    time::{Duration, Instant},
};

/// What to send.
#[derive(Clone, Debug)]
pub struct FloodSpec {
    /// The namespace and interface to send from (the frames leave it as if the sources were
    /// behind it).
    pub netns: String,
    pub device: String,
    /// The MAC the frames go to: the host's uplink.
    pub dst_mac: [u8; 6],
    /// The published port.
    pub dst: SocketAddrV4,
    /// Sources are drawn from this /16 (addresses and ports at random).
    pub sources: Ipv4Addr,
    pub proto: FloodProto,
    /// Packets per second; 0: as fast as one thread sends.
    pub rate: u64,
    /// Stop after this many packets (None: until stopped).
    pub count: Option<u64>,
    /// Seed of the sources, so that a run can be repeated.
    pub seed: u64,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum FloodProto {
    TcpSyn,
    Udp,
}

/// A flood running on a thread of its own; stopped (and its socket closed) on `finish` or
/// drop.
pub struct Flood {
    stop: Arc<AtomicBool>,
    sent: Arc<AtomicU64>,
    thread: Option<JoinHandle<io::Result<()>>>,
}

impl Flood {
    /// Starts sending; returns once the socket is open in the namespace.
    pub fn start(spec: FloodSpec) -> io::Result<Flood> {
        let stop = Arc::new(AtomicBool::new(false));
        let sent = Arc::new(AtomicU64::new(0));
        let (ready, opened) = std::sync::mpsc::channel();
        let thread = {
            let (stop, sent) = (stop.clone(), sent.clone());
            std::thread::Builder::new()
                .name(format!("flood {}", spec.netns))
                .spawn(move || {
                    let socket = open_socket(&spec);
                    let socket = match socket {
                        Ok(socket) => {
                            let _ = ready.send(Ok(()));
                            socket
                        }
                        Err(error) => {
                            let _ =
                                ready.send(Err(io::Error::new(error.kind(), error.to_string())));
                            return Err(error);
                        }
                    };
                    send_loop(&socket, &spec, &stop, &sent)
                })?
        };
        let flood = Flood {
            stop,
            sent,
            thread: Some(thread),
        };
        opened.recv().map_err(|_| {
            io::Error::other("the flood's thread ended before it opened its socket")
        })??;
        Ok(flood)
    }

    /// Packets sent so far.
    pub fn sent(&self) -> u64 {
        self.sent.load(Ordering::Relaxed)
    }

    /// Whether it sent its `count` (or failed).
    pub fn is_done(&self) -> bool {
        self.thread.as_ref().is_none_or(|t| t.is_finished())
    }

    /// Stops the flood now; returns how many packets it sent.
    pub fn finish(self) -> io::Result<u64> {
        self.stop.store(true, Ordering::Relaxed);
        self.wait()
    }

    /// Waits until the flood has sent its `count`; returns how many packets it sent.
    pub fn wait(mut self) -> io::Result<u64> {
        if let Some(thread) = self.thread.take() {
            thread
                .join()
                .map_err(|_| io::Error::other("the flood's thread panicked"))??;
        }
        Ok(self.sent())
    }
}

impl Drop for Flood {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

/// The MAC address of `device` in namespace `netns`.
pub fn mac_of(netns: &str, device: &str) -> io::Result<[u8; 6]> {
    let ns = xbr::netns::NetNs::open(netns).map_err(io::Error::other)?;
    let device = device.to_owned();
    ns.run(move || hardware_address(&device))
        .map_err(io::Error::other)?
}

fn hardware_address(device: &str) -> io::Result<[u8; 6]> {
    // SAFETY: a datagram socket only to ask the kernel about an interface.
    let fd = unsafe { libc::socket(libc::AF_INET, libc::SOCK_DGRAM, 0) };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: fd is a socket we own.
    let socket = unsafe { OwnedFd::from_raw_fd(fd) };
    // SAFETY: ifreq is plain data; zeroed is a valid empty request.
    let mut request: libc::ifreq = unsafe { std::mem::zeroed() };
    for (slot, byte) in request.ifr_name.iter_mut().zip(device.bytes()) {
        *slot = byte as libc::c_char;
    }
    // SAFETY: SIOCGIFHWADDR fills ifr_hwaddr of the request it is given.
    if unsafe { libc::ioctl(socket.as_raw_fd(), libc::SIOCGIFHWADDR, &mut request) } < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: the kernel filled the hwaddr member.
    let data = unsafe { request.ifr_ifru.ifru_hwaddr.sa_data };
    Ok(std::array::from_fn(|i| data[i] as u8))
}

struct Socket {
    fd: OwnedFd,
    src_mac: [u8; 6],
}

fn open_socket(spec: &FloodSpec) -> io::Result<Socket> {
    xbr::netns::enter(&spec.netns).map_err(io::Error::other)?;
    let src_mac = hardware_address(&spec.device)?;
    let name = std::ffi::CString::new(spec.device.clone()).map_err(io::Error::other)?;
    // SAFETY: a name for if_nametoindex.
    let ifindex = unsafe { libc::if_nametoindex(name.as_ptr()) };
    if ifindex == 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: a raw packet socket; protocol 0 receives nothing.
    let fd = unsafe { libc::socket(libc::AF_PACKET, libc::SOCK_RAW | libc::SOCK_CLOEXEC, 0) };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: fd is a socket we own.
    let fd = unsafe { OwnedFd::from_raw_fd(fd) };
    // SAFETY: sockaddr_ll is plain data.
    let mut address: libc::sockaddr_ll = unsafe { std::mem::zeroed() };
    address.sll_family = libc::AF_PACKET as u16;
    address.sll_ifindex = ifindex as i32;
    // SAFETY: bind with the address's own size.
    let bound = unsafe {
        libc::bind(
            fd.as_raw_fd(),
            (&address as *const libc::sockaddr_ll).cast(),
            std::mem::size_of::<libc::sockaddr_ll>() as u32,
        )
    };
    if bound < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(Socket { fd, src_mac })
}

/// xorshift64*: cheap and repeatable.
struct Random(u64);

impl Random {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }
}

fn send_loop(
    socket: &Socket,
    spec: &FloodSpec,
    stop: &AtomicBool,
    sent: &AtomicU64,
) -> io::Result<()> {
    let mut random = Random(spec.seed | 1);
    let mut frame = Vec::with_capacity(64);
    let started = Instant::now();
    let mut count = 0u64;
    while !stop.load(Ordering::Relaxed) && spec.count.is_none_or(|limit| count < limit) {
        if spec.rate > 0 {
            // Catch up with the schedule, then wait for the next millisecond of it.
            let due = (started.elapsed().as_secs_f64() * spec.rate as f64) as u64;
            if count >= due {
                std::thread::sleep(Duration::from_micros(200));
                continue;
            }
        }
        frame.clear();
        build_frame(&mut frame, socket.src_mac, spec, &mut random);
        // SAFETY: send of a buffer we own on a bound packet socket.
        let written =
            unsafe { libc::send(socket.fd.as_raw_fd(), frame.as_ptr().cast(), frame.len(), 0) };
        if written < 0 {
            let error = io::Error::last_os_error();
            // A full device queue: try again.
            if error.raw_os_error() == Some(libc::ENOBUFS) {
                std::thread::yield_now();
                continue;
            }
            return Err(error);
        }
        count += 1;
        sent.store(count, Ordering::Relaxed);
    }
    Ok(())
}

/// One frame: Ethernet, IPv4 (TTL 64, DF), then a TCP SYN (with an MSS option, as a real
/// SYN has) or a 16-byte UDP datagram; every checksum computed.
fn build_frame(frame: &mut Vec<u8>, src_mac: [u8; 6], spec: &FloodSpec, random: &mut Random) {
    let r = random.next();
    let base = spec.sources.octets();
    let src_ip = [base[0], base[1], (r >> 8) as u8, (r as u8).max(1)];
    let src_port = 1024 + ((r >> 16) as u16 % 64512);
    let dst_ip = spec.dst.ip().octets();
    frame.extend_from_slice(&spec.dst_mac);
    frame.extend_from_slice(&src_mac);
    frame.extend_from_slice(&0x0800u16.to_be_bytes());
    let l4: Vec<u8> = match spec.proto {
        FloodProto::TcpSyn => {
            let mut tcp = Vec::with_capacity(24);
            tcp.extend_from_slice(&src_port.to_be_bytes());
            tcp.extend_from_slice(&spec.dst.port().to_be_bytes());
            tcp.extend_from_slice(&((r >> 32) as u32).to_be_bytes()); // sequence
            tcp.extend_from_slice(&0u32.to_be_bytes()); // acknowledgment
            tcp.push(6 << 4); // header length: 24 bytes
            tcp.push(0x02); // SYN
            tcp.extend_from_slice(&64240u16.to_be_bytes()); // window
            tcp.extend_from_slice(&[0, 0, 0, 0]); // checksum, urgent pointer
            tcp.extend_from_slice(&[2, 4, 0x05, 0xb4]); // MSS 1460
            tcp
        }
        FloodProto::Udp => {
            let mut udp = Vec::with_capacity(24);
            udp.extend_from_slice(&src_port.to_be_bytes());
            udp.extend_from_slice(&spec.dst.port().to_be_bytes());
            udp.extend_from_slice(&24u16.to_be_bytes());
            udp.extend_from_slice(&[0, 0]);
            udp.extend_from_slice(b"spoofed datagram");
            udp
        }
    };
    let proto = match spec.proto {
        FloodProto::TcpSyn => 6u8,
        FloodProto::Udp => 17,
    };
    let total = (20 + l4.len()) as u16;
    let mut ip = [0u8; 20];
    ip[0] = 0x45;
    ip[2..4].copy_from_slice(&total.to_be_bytes());
    ip[4..6].copy_from_slice(&((r >> 48) as u16).to_be_bytes());
    ip[6] = 0x40; // DF
    ip[8] = 64;
    ip[9] = proto;
    ip[12..16].copy_from_slice(&src_ip);
    ip[16..20].copy_from_slice(&dst_ip);
    let check = checksum(&[&ip]);
    ip[10..12].copy_from_slice(&check.to_be_bytes());
    frame.extend_from_slice(&ip);
    let mut l4 = l4;
    let pseudo = {
        let mut p = [0u8; 12];
        p[0..4].copy_from_slice(&src_ip);
        p[4..8].copy_from_slice(&dst_ip);
        p[9] = proto;
        p[10..12].copy_from_slice(&(l4.len() as u16).to_be_bytes());
        p
    };
    let mut check = checksum(&[&pseudo, &l4]);
    if proto == 17 && check == 0 {
        check = 0xffff; // UDP's 0 means "no checksum"
    }
    let at = if proto == 6 { 16 } else { 6 };
    l4[at..at + 2].copy_from_slice(&check.to_be_bytes());
    frame.extend_from_slice(&l4);
}

/// The Internet checksum of the concatenated parts (each of even length but the last).
fn checksum(parts: &[&[u8]]) -> u16 {
    let mut sum: u32 = 0;
    for part in parts {
        for chunk in part.chunks(2) {
            let word = if chunk.len() == 2 {
                u16::from_be_bytes([chunk[0], chunk[1]])
            } else {
                u16::from_be_bytes([chunk[0], 0])
            };
            sum += u32::from(word);
        }
    }
    while sum > 0xffff {
        sum = (sum & 0xffff) + (sum >> 16);
    }
    !(sum as u16)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spec(proto: FloodProto) -> FloodSpec {
        FloodSpec {
            netns: String::new(),
            device: String::new(),
            dst_mac: [2, 0, 0, 0, 0, 1],
            dst: SocketAddrV4::new(Ipv4Addr::new(10, 78, 0, 1), 8080),
            sources: Ipv4Addr::new(10, 79, 0, 0),
            proto,
            rate: 0,
            count: None,
            seed: 7,
        }
    }

    /// The frames parse, with valid checksums, as what they claim to be (etherparse as the
    /// witness), and their sources stay in the /16.
    #[test]
    fn frames_are_valid_spoofed_syns_and_datagrams() {
        for proto in [FloodProto::TcpSyn, FloodProto::Udp] {
            let spec = spec(proto);
            let mut random = Random(spec.seed);
            for _ in 0..200 {
                let mut frame = Vec::new();
                build_frame(&mut frame, [2, 0, 0, 0, 0, 2], &spec, &mut random);
                let packet = etherparse::SlicedPacket::from_ethernet(&frame).unwrap();
                let Some(etherparse::NetSlice::Ipv4(ip)) = packet.net else {
                    panic!("not IPv4: {frame:02x?}");
                };
                let header = ip.header().to_header();
                assert_eq!(header.header_checksum, header.calc_header_checksum());
                assert_eq!(ip.header().source()[..2], [10, 79]);
                match (proto, packet.transport) {
                    (FloodProto::TcpSyn, Some(etherparse::TransportSlice::Tcp(tcp))) => {
                        assert!(tcp.syn() && !tcp.ack());
                        let want = tcp
                            .to_header()
                            .calc_checksum_ipv4(&header, tcp.payload())
                            .unwrap();
                        assert_eq!(tcp.checksum(), want);
                    }
                    (FloodProto::Udp, Some(etherparse::TransportSlice::Udp(udp))) => {
                        let want = udp
                            .to_header()
                            .calc_checksum_ipv4(&header, udp.payload())
                            .unwrap();
                        assert_eq!(udp.checksum(), want);
                    }
                    (proto, other) => panic!("{proto:?}: {other:?}"),
                }
            }
        }
    }
}
