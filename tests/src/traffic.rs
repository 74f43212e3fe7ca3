//! Traffic for the published-port tests: a TCP echo server in a namespace, and one
//! connection's exchange with it from another.

use std::{
    io::{Read as _, Write as _},
    net::{Ipv4Addr, SocketAddr, TcpListener, TcpStream},
    time::Duration,
};

use xbr::netns::NetNs;

/// A TCP echo server in a namespace; dropping it closes its socket, so the namespace can go.
pub struct EchoServer {
    stop: std::sync::Arc<std::sync::atomic::AtomicBool>,
    acceptor: Option<std::thread::JoinHandle<()>>,
}

impl Drop for EchoServer {
    fn drop(&mut self) {
        self.stop.store(true, std::sync::atomic::Ordering::Relaxed);
        if let Some(acceptor) = self.acceptor.take() {
            let _ = acceptor.join();
        }
    }
}

pub fn tcp_echo_server(ns: &NetNs, address: Ipv4Addr, port: u16) -> EchoServer {
    use std::sync::{
        Arc,
        atomic::{AtomicBool, Ordering},
    };
    let listener = ns
        .run(|| TcpListener::bind((address, port)))
        .unwrap()
        .expect("bind the echo server");
    listener.set_nonblocking(true).unwrap();
    let stop = Arc::new(AtomicBool::new(false));
    let stopped = stop.clone();
    let acceptor = std::thread::spawn(move || {
        while !stopped.load(Ordering::Relaxed) {
            let Ok((mut stream, _)) = listener.accept() else {
                std::thread::sleep(Duration::from_millis(5));
                continue;
            };
            let _ = stream.set_nonblocking(false);
            let _ = stream.set_read_timeout(Some(Duration::from_secs(5)));
            std::thread::spawn(move || {
                let mut buffer = vec![0u8; 64 * 1024];
                while let Ok(n) = stream.read(&mut buffer) {
                    if n == 0 || stream.write_all(&buffer[..n]).is_err() {
                        break;
                    }
                }
            });
        }
    });
    EchoServer {
        stop,
        acceptor: Some(acceptor),
    }
}

/// One connection: send `bytes`, read them back, close. Err when the connection fails.
pub fn exchange(client: &NetNs, to: SocketAddr, bytes: usize) -> std::io::Result<()> {
    let mut stream = client
        .run(|| TcpStream::connect_timeout(&to, Duration::from_secs(2)))
        .unwrap()?;
    stream.set_read_timeout(Some(Duration::from_secs(5)))?;
    let sent: Vec<u8> = (0..bytes).map(|i| (i * 7 % 251) as u8).collect();
    let writer = {
        let mut stream = stream.try_clone()?;
        let sent = sent.clone();
        std::thread::spawn(move || {
            let _ = stream.write_all(&sent);
            let _ = stream.shutdown(std::net::Shutdown::Write);
        })
    };
    let mut received = Vec::new();
    stream.read_to_end(&mut received)?;
    writer.join().unwrap();
    if received != sent {
        return Err(std::io::Error::other(format!(
            "echo returned {} of {bytes} bytes, or other bytes",
            received.len()
        )));
    }
    Ok(())
}

/// A server in `ns` that answers every TCP connection and every datagram on `address:port`
/// with the client's address as it sees it ("10.78.0.1:61234", then a space and the datagram
/// for UDP): what a source NAT made of the client. Runs until the test process ends (its
/// sockets go with the namespace's last user).
pub fn who_are_you_server(ns: &NetNs, address: Ipv4Addr, port: u16) {
    let (listener, socket) = ns
        .run(|| {
            (
                TcpListener::bind((address, port)).expect("bind TCP"),
                std::net::UdpSocket::bind((address, port)).expect("bind UDP"),
            )
        })
        .unwrap();
    std::thread::spawn(move || {
        for stream in listener.incoming() {
            let Ok(mut stream) = stream else { return };
            let peer = stream.peer_addr().unwrap();
            let _ = stream.write_all(peer.to_string().as_bytes());
        }
    });
    std::thread::spawn(move || {
        let mut buffer = [0u8; 2048];
        while let Ok((n, from)) = socket.recv_from(&mut buffer) {
            let mut answer = from.to_string().into_bytes();
            answer.push(b' ');
            answer.extend_from_slice(&buffer[..n]);
            let _ = socket.send_to(&answer, from);
        }
    });
}

/// Connects from `client` to a `who_are_you_server` at `to`: where the server saw the
/// connection come from, and the client's own address (what a source NAT changed).
pub fn seen_as(client: &NetNs, to: SocketAddr) -> std::io::Result<(SocketAddr, SocketAddr)> {
    let mut stream = client
        .run(|| TcpStream::connect_timeout(&to, Duration::from_secs(2)))
        .unwrap()?;
    let local = stream.local_addr()?;
    stream.set_read_timeout(Some(Duration::from_secs(3)))?;
    let mut answer = String::new();
    stream.read_to_string(&mut answer)?;
    let seen = answer
        .parse()
        .map_err(|e| std::io::Error::other(format!("answer {answer:?}: {e}")))?;
    Ok((seen, local))
}
