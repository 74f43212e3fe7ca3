//! The two ends of the published-port workloads, as threads of the bench itself placed like
//! iperf3 and sockperf (in a world's namespace, pinned to a CPU, at nice -20): an echo server
//! in the container, and a client outside that counts connections or requests per second.
//!
//! A request is 64 bytes and its response the same bytes. A request whose first byte is
//! `CLOSE_AFTER` is the connection's last: the server answers and closes, as an HTTP/1.0
//! server does. The server closing first keeps TIME_WAIT on its side, so the client's ports
//! are free again at once and a run of tens of thousands of connections never runs out.

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

/// The echo server: one connection at a time, since the client makes one at a time.
/// Dropping it stops the thread and closes its socket.
pub struct EchoServer {
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<()>>,
}

impl EchoServer {
    /// Listens on ADDRESS in NETNS before it returns.
    pub fn start(netns: &str, address: SocketAddr, cpu: Option<usize>) -> anyhow::Result<Self> {
        let stop = Arc::new(AtomicBool::new(false));
        let (listening, bound) = std::sync::mpsc::channel();
        let thread = {
            let (netns, stop) = (netns.to_owned(), stop.clone());
            std::thread::Builder::new()
                .name(format!("echo {netns}"))
                .spawn(move || {
                    let listener = enter(&netns, cpu).and_then(|()| {
                        TcpListener::bind(address).with_context(|| format!("binding {address}"))
                    });
                    match listener {
                        Ok(listener) => {
                            let _ = listening.send(Ok(()));
                            serve(&listener, &stop);
                        }
                        Err(error) => {
                            let _ = listening.send(Err(error));
                        }
                    }
                })
                .context("starting the echo server's thread")?
        };
        let server = EchoServer {
            stop,
            thread: Some(thread),
        };
        bound
            .recv()
            .context("the echo server's thread ended before it listened")?
            .with_context(|| format!("starting the echo server on {address} in {netns}"))?;
        Ok(server)
    }
}

impl Drop for EchoServer {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

fn serve(listener: &TcpListener, stop: &AtomicBool) {
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
        stream.write_all(&request)?;
        if request[0] == CLOSE_AFTER {
            return Ok(());
        }
    }
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
