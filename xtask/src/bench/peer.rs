//! The two ends of the published-port workloads, as threads of the bench itself placed like
//! iperf3 and sockperf (in a world's namespace, pinned to a CPU, at nice -20): an echo server
//! in the container, and a client outside that counts connections or requests per second.
//!
//! A request is 64 bytes and its response the same bytes. A request whose first byte is
//! `CLOSE_AFTER` is the connection's last: the server answers and closes, as an HTTP/1.0
//! server does. The server closing first keeps TIME_WAIT on its side, so the client's ports
//! are free again at once and a run of tens of thousands of connections never runs out.
//! A first request starting with `STREAM` turns the connection into a sink: the server reads
//! until the client shuts down its side, then answers with the byte count (8 bytes, LE).
//!
//! The host-client workloads run the client as a process of its own (`cargo xtask
//! bench-client`, this module's `client`): it must join a cgroup, which a thread cannot.

use std::fs::File;
use std::io::{self, Read as _, Write as _};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::os::fd::AsRawFd as _;
use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use anyhow::Context as _;
use serde_json::{Value, json};

use crate::cmd::Interrupt;

pub const REQUEST_BYTES: usize = 64;
const CLOSE_AFTER: u8 = b'C';
const KEEP_OPEN: u8 = b'K';
const STREAM: u8 = b'S';
/// What a stream client writes at a time.
const STREAM_CHUNK: usize = 128 * 1024;
/// How long one connect or one response may take before the exchange counts as failed.
const EXCHANGE_TIMEOUT: Duration = Duration::from_secs(1);
/// How often an idle server looks whether it should stop.
const STOP_POLL_MS: i32 = 100;

/// Moves the calling thread into NETNS (network namespaces are per thread), onto CPU, and
/// to nice -20 (also per thread on Linux).
fn enter(netns: &str, cpu: Option<usize>) -> anyhow::Result<()> {
    let path = Path::new("/run/netns").join(netns);
    let file = File::open(&path).with_context(|| format!("opening {}", path.display()))?;
    // SAFETY: setns with a namespace file descriptor; affects this thread only.
    if unsafe { libc::setns(file.as_raw_fd(), libc::CLONE_NEWNET) } != 0 {
        return Err(io::Error::last_os_error()).with_context(|| format!("entering {netns}"));
    }
    if let Some(cpu) = cpu {
        // SAFETY: a zeroed cpu_set_t is the empty set; CPU_SET stays within it.
        let pinned = unsafe {
            let mut set: libc::cpu_set_t = std::mem::zeroed();
            libc::CPU_SET(cpu, &mut set);
            libc::sched_setaffinity(0, std::mem::size_of::<libc::cpu_set_t>(), &set)
        };
        if pinned != 0 {
            return Err(io::Error::last_os_error())
                .with_context(|| format!("pinning to CPU {cpu}"));
        }
    }
    // SAFETY: plain system calls on this thread's id.
    let niced = unsafe { libc::setpriority(libc::PRIO_PROCESS, libc::gettid() as u32, -20) };
    if niced != 0 {
        return Err(io::Error::last_os_error()).context("setting nice -20");
    }
    Ok(())
}

/// The echo server: ACCEPTORS threads, each serving one connection at a time (one for
/// clients that make one at a time). Dropping it stops the threads and closes its socket.
pub struct EchoServer {
    stop: Arc<AtomicBool>,
    threads: Vec<JoinHandle<()>>,
}

impl EchoServer {
    /// Listens on ADDRESS in NETNS before it returns.
    pub fn start(
        netns: &str,
        address: SocketAddr,
        cpu: Option<usize>,
        acceptors: usize,
    ) -> anyhow::Result<Self> {
        let stop = Arc::new(AtomicBool::new(false));
        let mut server = EchoServer {
            stop: stop.clone(),
            threads: Vec::new(),
        };
        // The first thread binds and hands back a copy of its socket; the others accept on
        // copies of that.
        let mut shared: Option<TcpListener> = None;
        for index in 0..acceptors.max(1) {
            let copy = shared
                .as_ref()
                .map(TcpListener::try_clone)
                .transpose()
                .context("sharing the echo server's socket")?;
            let (listening, bound) = std::sync::mpsc::channel();
            let thread = {
                let (netns, stop) = (netns.to_owned(), stop.clone());
                std::thread::Builder::new()
                    .name(format!("echo {netns} {index}"))
                    .spawn(move || {
                        let listener = enter(&netns, cpu).and_then(|()| match copy {
                            Some(listener) => Ok(listener),
                            None => TcpListener::bind(address)
                                .with_context(|| format!("binding {address}")),
                        });
                        match listener {
                            Ok(listener) => {
                                let _ = listening.send(listener.try_clone().map_err(Into::into));
                                serve(&listener, &stop);
                            }
                            Err(error) => {
                                let _ = listening.send(Err(error));
                            }
                        }
                    })
                    .context("starting the echo server's thread")?
            };
            server.threads.push(thread);
            let listener = bound
                .recv()
                .context("the echo server's thread ended before it listened")?
                .with_context(|| format!("starting the echo server on {address} in {netns}"))?;
            shared.get_or_insert(listener);
        }
        Ok(server)
    }
}

impl Drop for EchoServer {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        for thread in self.threads.drain(..) {
            let _ = thread.join();
        }
    }
}

fn serve(listener: &TcpListener, stop: &AtomicBool) {
    // Several acceptors may wake for one connection: the others must not block in accept()
    // (they would outlive the stop). Accepted sockets are blocking all the same (accept4
    // without SOCK_NONBLOCK).
    if listener.set_nonblocking(true).is_err() {
        return;
    }
    while !stop.load(Ordering::Relaxed) {
        let mut ready = libc::pollfd {
            fd: listener.as_raw_fd(),
            events: libc::POLLIN,
            revents: 0,
        };
        // SAFETY: one valid pollfd.
        if unsafe { libc::poll(&mut ready, 1, STOP_POLL_MS) } <= 0 {
            continue;
        }
        if let Ok((stream, _)) = listener.accept() {
            // A client that vanished mid-connection costs at most the read timeout.
            let _ = echo(stream);
        }
    }
}

fn echo(mut stream: TcpStream) -> io::Result<()> {
    stream.set_nodelay(true)?;
    stream.set_read_timeout(Some(EXCHANGE_TIMEOUT))?;
    let mut request = [0u8; REQUEST_BYTES];
    loop {
        stream.read_exact(&mut request)?;
        if request[0] == STREAM {
            return sink(stream);
        }
        stream.write_all(&request)?;
        if request[0] == CLOSE_AFTER {
            return Ok(());
        }
    }
}

/// Reads (and drops) everything until the client's end of the stream, then says how much.
fn sink(mut stream: TcpStream) -> io::Result<()> {
    let mut buffer = vec![0u8; STREAM_CHUNK];
    let mut received: u64 = 0;
    loop {
        match stream.read(&mut buffer)? {
            0 => break,
            n => received += n as u64,
        }
    }
    stream.write_all(&received.to_le_bytes())
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum RateKind {
    /// New connections: connect, one request, its response, the server's close.
    Connections,
    /// Requests one after another on one connection.
    Requests,
}

/// What one rate run counted.
#[derive(Debug)]
pub struct Rate {
    pub completed: u64,
    pub failed: u64,
    pub seconds: f64,
    pub first_error: Option<String>,
}

impl Rate {
    pub fn per_second(&self) -> f64 {
        self.completed as f64 / self.seconds
    }

    pub fn as_json(&self) -> Value {
        json!({
            "completed": self.completed,
            "failed": self.failed,
            "seconds": self.seconds,
            "first_error": self.first_error,
            "request_bytes": REQUEST_BYTES,
        })
    }
}

/// Runs the client in NETNS on CPU against TO for SECONDS, in a thread of its own.
pub fn measure_rate(
    kind: RateKind,
    netns: &str,
    cpu: Option<usize>,
    to: SocketAddr,
    seconds: u32,
    interrupt: &Interrupt,
) -> anyhow::Result<Rate> {
    let (netns, stop) = (netns.to_owned(), interrupt.clone());
    let client = std::thread::Builder::new()
        .name(format!("rate {netns}"))
        .spawn(move || -> anyhow::Result<Rate> {
            enter(&netns, cpu)?;
            let window = Duration::from_secs(u64::from(seconds));
            Ok(match kind {
                RateKind::Connections => count(window, &stop, |serial| one_connection(to, serial)),
                RateKind::Requests => {
                    let mut stream = connect(to).with_context(|| format!("connecting to {to}"))?;
                    count(window, &stop, |serial| {
                        request(&mut stream, KEEP_OPEN, serial)
                    })
                }
            })
        })
        .context("starting the rate client's thread")?;
    let rate = client
        .join()
        .map_err(|_| anyhow::anyhow!("the rate client's thread panicked"))??;
    interrupt.check()?;
    Ok(rate)
}

/// What the host-client process measures (`cargo xtask bench-client`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum ClientKind {
    /// New connections, PARALLEL at a time: connect, one request, its response, the close.
    Connections,
    /// Requests one after another on one connection.
    Requests,
    /// One connection streaming to the server's sink.
    Stream,
}

/// `cargo xtask bench-client`: the host-client workloads' client, run by the bench (in a
/// namespace, on a CPU, and for xbr in a cgroup) as a process of its own. Prints its count as
/// JSON on stdout.
#[derive(clap::Args, Debug)]
pub struct ClientArgs {
    #[arg(long, value_enum)]
    kind: ClientKind,
    #[arg(long, value_name = "ADDR")]
    to: SocketAddr,
    #[arg(long, value_name = "SECONDS")]
    seconds: u32,
    /// Connections at a time (threads), for `--kind connections`.
    #[arg(long, value_name = "N", default_value_t = 1)]
    parallel: usize,
}

/// What a host-client run counted: exchanges (connections or requests; the stream is one),
/// and for the stream the bytes the server said it received.
#[derive(Debug, serde::Serialize, serde::Deserialize)]
pub struct ClientReport {
    pub completed: u64,
    pub failed: u64,
    pub seconds: f64,
    pub first_error: Option<String>,
    pub bytes: u64,
}

pub fn client(args: ClientArgs) -> anyhow::Result<()> {
    let window = Duration::from_secs(u64::from(args.seconds));
    let interrupt = Interrupt::default();
    let report = match args.kind {
        ClientKind::Connections => {
            let to = args.to;
            let threads: Vec<JoinHandle<Rate>> = (0..args.parallel.max(1))
                .map(|index| {
                    let interrupt = interrupt.clone();
                    std::thread::spawn(move || {
                        // Serials differ between threads, so every response differs.
                        let base = (index as u64) << 48;
                        count(window, &interrupt, |serial| {
                            one_connection(to, base + serial)
                        })
                    })
                })
                .collect();
            let mut report = ClientReport {
                completed: 0,
                failed: 0,
                seconds: 0.0,
                first_error: None,
                bytes: 0,
            };
            for thread in threads {
                let rate = thread
                    .join()
                    .map_err(|_| anyhow::anyhow!("a connections thread panicked"))?;
                report.completed += rate.completed;
                report.failed += rate.failed;
                report.seconds = report.seconds.max(rate.seconds);
                report.first_error = report.first_error.or(rate.first_error);
            }
            report.bytes = report.completed * REQUEST_BYTES as u64;
            report
        }
        ClientKind::Requests => {
            let mut stream =
                connect(args.to).with_context(|| format!("connecting to {}", args.to))?;
            let rate = count(window, &interrupt, |serial| {
                request(&mut stream, KEEP_OPEN, serial)
            });
            ClientReport {
                bytes: rate.completed * REQUEST_BYTES as u64,
                completed: rate.completed,
                failed: rate.failed,
                seconds: rate.seconds,
                first_error: rate.first_error,
            }
        }
        ClientKind::Stream => stream(args.to, window)?,
    };
    println!("{}", serde_json::to_string(&report)?);
    Ok(())
}

/// One connection: the `STREAM` request, then as much as it takes for WINDOW, then the
/// server's count, which must be every byte sent.
fn stream(to: SocketAddr, window: Duration) -> anyhow::Result<ClientReport> {
    let mut stream = connect(to).with_context(|| format!("connecting to {to}"))?;
    let mut header = [0x5au8; REQUEST_BYTES];
    header[0] = STREAM;
    stream.write_all(&header)?;
    let chunk = vec![0xa5u8; STREAM_CHUNK];
    let started = Instant::now();
    let mut sent: u64 = 0;
    while started.elapsed() < window {
        stream
            .write_all(&chunk)
            .with_context(|| format!("streaming to {to}"))?;
        sent += chunk.len() as u64;
    }
    stream.shutdown(std::net::Shutdown::Write)?;
    stream.set_read_timeout(Some(Duration::from_secs(10)))?;
    let mut count = [0u8; 8];
    stream
        .read_exact(&mut count)
        .with_context(|| format!("reading the stream's count from {to}"))?;
    // Received when the server had it all: the client's writes end in its socket buffer.
    let seconds = started.elapsed().as_secs_f64();
    let received = u64::from_le_bytes(count);
    anyhow::ensure!(
        received == sent,
        "the server received {received} of the {sent} bytes streamed to {to}"
    );
    Ok(ClientReport {
        completed: 1,
        failed: 0,
        seconds,
        first_error: None,
        bytes: received,
    })
}

/// Runs EXCHANGE again and again for WINDOW; a failed requests connection ends the run.
fn count(
    window: Duration,
    interrupt: &Interrupt,
    mut exchange: impl FnMut(u64) -> io::Result<()>,
) -> Rate {
    let started = Instant::now();
    let (mut completed, mut failed, mut first_error) = (0, 0, None);
    while started.elapsed() < window && interrupt.check().is_ok() {
        match exchange(completed + failed) {
            Ok(()) => completed += 1,
            Err(error) => {
                failed += 1;
                first_error.get_or_insert_with(|| error.to_string());
            }
        }
    }
    Rate {
        completed,
        failed,
        seconds: started.elapsed().as_secs_f64(),
        first_error,
    }
}

fn connect(to: SocketAddr) -> io::Result<TcpStream> {
    let stream = TcpStream::connect_timeout(&to, EXCHANGE_TIMEOUT)?;
    stream.set_nodelay(true)?;
    stream.set_read_timeout(Some(EXCHANGE_TIMEOUT))?;
    Ok(stream)
}

/// Connect, one request and its response, then wait for the server's close: a connection
/// counts once it is over.
fn one_connection(to: SocketAddr, serial: u64) -> io::Result<()> {
    let mut stream = connect(to)?;
    request(&mut stream, CLOSE_AFTER, serial)?;
    let mut after = [0u8; 1];
    match stream.read(&mut after)? {
        0 => Ok(()),
        _ => Err(io::Error::other("the server sent more than the response")),
    }
}

/// One request, numbered SERIAL so that every response differs, and its echo.
fn request(stream: &mut TcpStream, first: u8, serial: u64) -> io::Result<()> {
    let mut sent = [0x5au8; REQUEST_BYTES];
    sent[0] = first;
    sent[1..9].copy_from_slice(&serial.to_le_bytes());
    stream.write_all(&sent)?;
    let mut received = [0u8; REQUEST_BYTES];
    stream.read_exact(&mut received)?;
    if received != sent {
        return Err(io::Error::other("the response is not the request's bytes"));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Both kinds against a server on loopback, in this process's own namespace: every
    /// exchange completes and is counted.
    #[test]
    fn counts_connections_and_requests_on_loopback() {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let address = listener.local_addr().unwrap();
        let stop = Arc::new(AtomicBool::new(false));
        let server = {
            let stop = stop.clone();
            std::thread::spawn(move || serve(&listener, &stop))
        };
        let interrupt = Interrupt::default();
        let window = Duration::from_millis(200);
        let connections = count(window, &interrupt, |serial| one_connection(address, serial));
        let mut stream = connect(address).unwrap();
        let requests = count(window, &interrupt, |serial| {
            request(&mut stream, KEEP_OPEN, serial)
        });
        drop(stream);
        stop.store(true, Ordering::Relaxed);
        server.join().unwrap();
        for rate in [&connections, &requests] {
            assert!(rate.completed > 10, "{rate:?}");
            assert_eq!(rate.failed, 0, "{rate:?}");
            assert!(rate.per_second() > 0.0);
        }
    }

    /// A server that answers with other bytes fails every exchange.
    #[test]
    fn a_wrong_response_is_a_failure() {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let address = listener.local_addr().unwrap();
        let server = std::thread::spawn(move || {
            let (mut stream, _) = listener.accept().unwrap();
            let mut request = [0u8; REQUEST_BYTES];
            stream.read_exact(&mut request).unwrap();
            request[REQUEST_BYTES - 1] ^= 1;
            stream.write_all(&request).unwrap();
        });
        let error = one_connection(address, 7).unwrap_err();
        assert!(
            error.to_string().contains("not the request's bytes"),
            "{error}"
        );
        server.join().unwrap();
    }
}
