//! `socket-client`: the host's client of a published port, for the socket-hook tests. A test
//! starts it inside its own cgroup (see `cgroup_support::TestCgroup::spawn`); it enters
//! network namespace NETNS, does the socket work and prints what it saw as JSON, one line.
//!
//! socket-client --netns NETNS tcp --to ADDR [--connections N] [--bytes B] [--timeout-ms T]
//!     N connections one after another, each echoing B bytes (verified).
//! socket-client --netns NETNS tcp-hold --to ADDR [--bytes B]
//!     One connection: echoes B bytes, prints a line, waits for a line on stdin, echoes B
//!     more bytes on the same connection and prints a second line.
//! socket-client --netns NETNS udp --to ADDR[,ADDR...] [--count N] [--connected] [--parallel]
//!     N datagrams to each ADDR, each answered `TAG|PAYLOAD` by a server; one socket for every
//!     destination, or (--parallel) one socket and one thread per destination.

use std::{
    io::{BufRead as _, Read as _, Write as _},
    net::{Shutdown, SocketAddr, TcpStream, UdpSocket},
    os::fd::AsRawFd as _,
    process::ExitCode,
    time::{Duration, Instant},
};

use serde_json::{Value, json};

fn main() -> ExitCode {
    match run() {
        Ok(()) => ExitCode::SUCCESS,
        Err(error) => {
            eprintln!("socket-client: {error}");
            ExitCode::FAILURE
        }
    }
}

struct Options {
    to: Vec<SocketAddr>,
    connections: usize,
    bytes: usize,
    timeout: Duration,
    count: usize,
    connected: bool,
    parallel: bool,
}

fn run() -> Result<(), String> {
    let mut args = std::env::args().skip(1);
    let mut netns = None;
    let mut op = None;
    let mut options = Options {
        to: Vec::new(),
        connections: 1,
        bytes: 1000,
        timeout: Duration::from_secs(2),
        count: 10,
        connected: false,
        parallel: false,
    };
    while let Some(arg) = args.next() {
        let mut value = || args.next().ok_or(format!("{arg} needs a value"));
        let number = |text: String| {
            text.parse::<usize>()
                .map_err(|e| format!("{arg} {text}: {e}"))
        };
        match arg.as_str() {
            "--netns" => netns = Some(value()?),
            "--to" => {
                for address in value()?.split(',') {
                    options.to.push(
                        address
                            .parse()
                            .map_err(|e| format!("--to {address}: {e}"))?,
                    );
                }
            }
            "--connections" => options.connections = number(value()?)?,
            "--bytes" => options.bytes = number(value()?)?,
            "--timeout-ms" => options.timeout = Duration::from_millis(number(value()?)? as u64),
            "--count" => options.count = number(value()?)?,
            "--connected" => options.connected = true,
            "--parallel" => options.parallel = true,
            "tcp" | "tcp-hold" | "udp" if op.is_none() => op = Some(arg),
            other => return Err(format!("unknown argument {other}")),
        }
    }
    if options.to.is_empty() {
        return Err("--to is required".to_owned());
    }
    if let Some(netns) = netns {
        enter_netns(&netns)?;
    }
    match op.as_deref() {
        Some("tcp") => print(&tcp(&options)),
        Some("tcp-hold") => tcp_hold(&options),
        Some("udp") => print(&udp(&options)),
        _ => return Err("say tcp, tcp-hold or udp".to_owned()),
    }
    Ok(())
}

fn print(value: &Value) {
    let mut stdout = std::io::stdout().lock();
    let _ = writeln!(stdout, "{value}");
    let _ = stdout.flush();
}

/// Enters network namespace `name` (as `ip netns add` made it); before any thread starts.
fn enter_netns(name: &str) -> Result<(), String> {
    let file = std::fs::File::open(format!("/run/netns/{name}"))
        .map_err(|e| format!("opening namespace {name}: {e}"))?;
    // SAFETY: setns(2) on a namespace file this process opened.
    if unsafe { libc::setns(file.as_raw_fd(), libc::CLONE_NEWNET) } != 0 {
        return Err(format!(
            "entering namespace {name}: {}",
            std::io::Error::last_os_error()
        ));
    }
    Ok(())
}

/// An I/O error as the tests read it: `kind` (`ConnectionRefused`, `TimedOut`...), errno and
/// message.
fn error_json(error: &std::io::Error) -> Value {
    json!({
        "kind": format!("{:?}", error.kind()),
        "errno": error.raw_os_error(),
        "message": error.to_string(),
    })
}

fn pattern(bytes: usize, seed: usize) -> Vec<u8> {
    (0..bytes).map(|i| ((i * 7 + seed) % 251) as u8).collect()
}

/// Sends `bytes` bytes on `stream` (a thread writes while this one reads) and reads the
/// same back; `half_close` ends the writing side after them.
fn echo(stream: &TcpStream, bytes: usize, seed: usize, half_close: bool) -> std::io::Result<()> {
    let sent = pattern(bytes, seed);
    let writer = {
        let mut stream = stream.try_clone()?;
        let sent = sent.clone();
        std::thread::spawn(move || {
            stream.write_all(&sent)?;
            if half_close {
                stream.shutdown(Shutdown::Write)?;
            }
            Ok::<(), std::io::Error>(())
        })
    };
    let mut received = vec![0u8; bytes];
    let mut reader = stream;
    let read = reader.read_exact(&mut received);
    writer.join().expect("writer thread")?;
    read?;
    if half_close {
        let mut rest = Vec::new();
        reader.read_to_end(&mut rest)?;
        if !rest.is_empty() {
            return Err(std::io::Error::other(format!(
                "{} bytes past the echo",
                rest.len()
            )));
        }
    }
    if received != sent {
        let at = received.iter().zip(&sent).position(|(a, b)| a != b);
        return Err(std::io::Error::other(format!(
            "the echo differs from what was sent at byte {at:?}"
        )));
    }
    Ok(())
}

fn tcp(options: &Options) -> Value {
    let to = options.to[0];
    let (mut connected, mut verified) = (0usize, 0u64);
    let (mut peer, mut local) = (None, None);
    let mut error = Value::Null;
    for i in 0..options.connections {
        let started = Instant::now();
        let failed = |stage: &str, e: &std::io::Error| {
            json!({ "at": i, "stage": stage, "after_ms": started.elapsed().as_millis() as u64,
                    "io": error_json(e) })
        };
        let stream = match TcpStream::connect_timeout(&to, options.timeout) {
            Ok(stream) => stream,
            Err(e) => {
                error = failed("connect", &e);
                break;
            }
        };
        connected += 1;
        if i == 0 {
            peer = stream.peer_addr().ok().map(|a| a.to_string());
            local = stream.local_addr().ok().map(|a| a.to_string());
        }
        let _ = stream.set_read_timeout(Some(Duration::from_secs(10)));
        if let Err(e) = echo(&stream, options.bytes, i, true) {
            error = failed("echo", &e);
            break;
        }
        verified += options.bytes as u64;
    }
    json!({ "connected": connected, "verified_bytes": verified, "peer": peer, "local": local,
            "error": error })
}

fn tcp_hold(options: &Options) {
    let to = options.to[0];
    let stream = match TcpStream::connect_timeout(&to, options.timeout) {
        Ok(stream) => stream,
        Err(error) => return print(&json!({ "error": error_json(&error) })),
    };
    let _ = stream.set_read_timeout(Some(Duration::from_secs(10)));
    let first = echo(&stream, options.bytes, 1, false);
    print(&json!({
        "peer": stream.peer_addr().ok().map(|a| a.to_string()),
        "local": stream.local_addr().ok().map(|a| a.to_string()),
        "error": first.err().map(|e| error_json(&e)),
    }));
    let mut line = String::new();
    let _ = std::io::stdin().lock().read_line(&mut line);
    let second = echo(&stream, options.bytes, 2, true);
    print(&json!({
        "peer": stream.peer_addr().ok().map(|a| a.to_string()),
        "error": second.err().map(|e| error_json(&e)),
    }));
}

/// What one destination's datagrams met.
#[derive(Default)]
struct UdpResult {
    sent: usize,
    send_error: Option<Value>,
    replies: usize,
    sources: std::collections::BTreeSet<String>,
    servers: std::collections::BTreeSet<String>,
    mismatched: usize,
    peer: Option<String>,
    connect_error: Option<Value>,
}

impl UdpResult {
    fn json(&self, to: SocketAddr) -> Value {
        json!({
            "to": to.to_string(), "sent": self.sent, "send_error": self.send_error,
            "replies": self.replies, "sources": self.sources, "servers": self.servers,
            "mismatched": self.mismatched, "peer": self.peer, "connect_error": self.connect_error,
        })
    }
}

fn udp_socket(to: SocketAddr) -> std::io::Result<UdpSocket> {
    let socket = match to {
        SocketAddr::V4(_) => UdpSocket::bind("0.0.0.0:0")?,
        // Dual-stack (IPV6_V6ONLY off, the default): it may reach IPv4 at mapped addresses.
        SocketAddr::V6(_) => UdpSocket::bind("[::]:0")?,
    };
    socket.set_read_timeout(Some(Duration::from_millis(500)))?;
    Ok(socket)
}

/// Datagram `i` to `to` and its answer, on `socket` (connected to `to` when `connected`).
fn udp_round(
    socket: &UdpSocket,
    to: SocketAddr,
    i: usize,
    connected: bool,
    result: &mut UdpResult,
) {
    let payload = format!("{i}@{to}");
    let sent = if connected {
        socket.send(payload.as_bytes())
    } else {
        socket.send_to(payload.as_bytes(), to)
    };
    if let Err(error) = sent {
        result.send_error.get_or_insert_with(|| error_json(&error));
        return;
    }
    result.sent += 1;
    let mut buffer = [0u8; 2048];
    let received = if connected {
        socket
            .recv(&mut buffer)
            .map(|n| (n, socket.peer_addr().ok()))
    } else {
        socket
            .recv_from(&mut buffer)
            .map(|(n, from)| (n, Some(from)))
    };
    let Ok((n, from)) = received else {
        return;
    };
    result.replies += 1;
    if let Some(from) = from {
        result.sources.insert(from.to_string());
    }
    let reply = String::from_utf8_lossy(&buffer[..n]);
    match reply.split_once('|') {
        Some((server, echoed)) if echoed == payload => {
            result.servers.insert(server.to_owned());
        }
        _ => result.mismatched += 1,
    }
}

fn udp(options: &Options) -> Value {
    let one = |to: SocketAddr, socket: &UdpSocket, result: &mut UdpResult| {
        if options.connected {
            if let Err(error) = socket.connect(to) {
                result.connect_error = Some(error_json(&error));
                return false;
            }
            result.peer = socket.peer_addr().ok().map(|a| a.to_string());
        }
        true
    };
    let mut results: Vec<UdpResult> = options.to.iter().map(|_| UdpResult::default()).collect();
    if options.parallel {
        let barrier = std::sync::Barrier::new(options.to.len());
        std::thread::scope(|scope| {
            for (to, result) in options.to.iter().zip(results.iter_mut()) {
                let barrier = &barrier;
                scope.spawn(move || {
                    let socket = udp_socket(*to).expect("a UDP socket");
                    let ready = one(*to, &socket, result);
                    barrier.wait();
                    if ready {
                        for i in 0..options.count {
                            udp_round(&socket, *to, i, options.connected, result);
                        }
                    }
                });
            }
        });
    } else {
        let socket = udp_socket(options.to[0]).expect("a UDP socket");
        if options.connected && options.to.len() > 1 {
            return json!({ "error": "a connected socket has one destination" });
        }
        if options.connected && !one(options.to[0], &socket, &mut results[0]) {
            return json!({ "results": [results[0].json(options.to[0])] });
        }
        for i in 0..options.count {
            for (to, result) in options.to.iter().zip(results.iter_mut()) {
                udp_round(&socket, *to, i, options.connected, result);
            }
        }
    }
    let results: Vec<Value> = options
        .to
        .iter()
        .zip(&results)
        .map(|(to, result)| result.json(*to))
        .collect();
    json!({ "results": results })
}
