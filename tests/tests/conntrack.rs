//! `xbr::conntrack` reads the kernel's conntrack table (run as root): two namespaces joined by
//! a veth, an nft rule that makes the client's namespace track connections, one UDP datagram
//! and one TCP connection from client to server; the dump taken in the client's namespace
//! lists exactly those two, with their tuples.

use std::io::{Read as _, Write as _};
use std::net::{Ipv4Addr, SocketAddr, TcpListener, TcpStream, UdpSocket};
use std::process::Command;
use std::time::Duration;

use xbr::conntrack::{Tracked, Tuple};
use xbr::netns::NetNs;
use xbr_tests::{lab_support::unique_name, skip::skip};

const CLIENT_IP: Ipv4Addr = Ipv4Addr::new(10, 231, 0, 1);
const SERVER_IP: Ipv4Addr = Ipv4Addr::new(10, 231, 0, 2);
const IPPROTO_TCP: u8 = 6;
const IPPROTO_UDP: u8 = 17;

/// Namespaces this test created, deleted on drop (their veth goes with them).
struct Namespaces(Vec<NetNs>);

impl Drop for Namespaces {
    fn drop(&mut self) {
        for netns in &self.0 {
            let _ = NetNs::delete(netns.name());
        }
    }
}

/// Runs `program args...`; its stderr when it fails.
fn run(program: &str, args: &[&str]) -> Result<(), String> {
    let output = Command::new(program)
        .args(args)
        .output()
        .map_err(|error| format!("cannot run {program}: {error}"))?;
    if output.status.success() {
        Ok(())
    } else {
        Err(format!(
            "`{program} {}` failed: {}",
            args.join(" "),
            String::from_utf8_lossy(&output.stderr).trim()
        ))
    }
}

fn must(program: &str, args: &[&str]) {
    run(program, args).unwrap_or_else(|error| panic!("{error}"));
}

/// Client and server namespaces joined by a veth (eth0 on both sides), made entirely inside
/// them: the root namespace's interfaces are never touched.
fn namespace_pair() -> (Namespaces, NetNs, NetNs) {
    let client = NetNs::create(&unique_name("ctc")).expect("create the client namespace");
    let mut made = Namespaces(vec![client.clone()]);
    let server = NetNs::create(&unique_name("cts")).expect("create the server namespace");
    made.0.push(server.clone());
    let (c, s) = (client.name(), server.name());
    must(
        "ip",
        &[
            "-n", c, "link", "add", "eth0", "type", "veth", "peer", "name", "eth0", "netns", s,
        ],
    );
    for (netns, address) in [(c, CLIENT_IP), (s, SERVER_IP)] {
        must(
            "ip",
            &[
                "-n",
                netns,
                "addr",
                "add",
                &format!("{address}/24"),
                "dev",
                "eth0",
            ],
        );
        must("ip", &["-n", netns, "link", "set", "eth0", "up"]);
        must("ip", &["-n", netns, "link", "set", "lo", "up"]);
    }
    (made, client, server)
}

/// Makes conntrack track connections in `netns`: a rule matching on `ct state` registers its
/// hooks there. Err when this machine cannot (no nft, no conntrack in the kernel).
fn track_connections(netns: &NetNs) -> Result<(), String> {
    let nft = |args: &[&str]| {
        let mut full = vec!["netns", "exec", netns.name(), "nft"];
        full.extend_from_slice(args);
        run("ip", &full)
    };
    nft(&["add", "table", "ip", "t"])?;
    nft(&[
        "add",
        "chain",
        "ip",
        "t",
        "c",
        "{ type filter hook output priority 0; }",
    ])?;
    nft(&[
        "add", "rule", "ip", "t", "c", "ct", "state", "new", "counter",
    ])
}

#[test]
fn the_client_namespace_lists_its_udp_and_tcp_connections() {
    const TEST: &str = "the_client_namespace_lists_its_udp_and_tcp_connections";
    let (_namespaces, client, server) = namespace_pair();
    if let Err(reason) = track_connections(&client) {
        skip(TEST, &format!("cannot make conntrack track here: {reason}"));
        return;
    }

    let udp_server = server
        .run(|| UdpSocket::bind((SERVER_IP, 0)))
        .unwrap()
        .expect("bind the UDP server");
    udp_server
        .set_read_timeout(Some(Duration::from_secs(5)))
        .unwrap();
    let udp_server_at = udp_server.local_addr().unwrap();
    let udp_client = client
        .run(|| UdpSocket::bind((CLIENT_IP, 0)))
        .unwrap()
        .expect("bind the UDP client");
    udp_client.send_to(b"tracked?", udp_server_at).unwrap();
    let mut datagram = [0u8; 16];
    let (length, from) = udp_server
        .recv_from(&mut datagram)
        .expect("the datagram should reach the server");
    assert_eq!(&datagram[..length], b"tracked?");
    assert_eq!(from, udp_client.local_addr().unwrap());

    let tcp_listener = server
        .run(|| TcpListener::bind((SERVER_IP, 0)))
        .unwrap()
        .expect("listen on the server");
    let tcp_server_at = tcp_listener.local_addr().unwrap();
    let mut tcp_client = client
        .run(|| TcpStream::connect_timeout(&tcp_server_at, Duration::from_secs(5)))
        .unwrap()
        .expect("connect to the server");
    let (mut accepted, _) = tcp_listener.accept().expect("accept the client");
    // A round trip, so the connection is established both ways before the dump.
    tcp_client.write_all(b"ping").unwrap();
    let mut echo = [0u8; 4];
    accepted.read_exact(&mut echo).unwrap();
    accepted.write_all(&echo).unwrap();
    tcp_client.read_exact(&mut echo).unwrap();
    assert_eq!(&echo, b"ping");

    let mut listed = client
        .run(xbr::conntrack::ipv4_connections)
        .expect("enter the client namespace")
        .expect("read the conntrack table");

    let tracked = |protocol, client_at: SocketAddr, server_at: SocketAddr| {
        let (SocketAddr::V4(client_at), SocketAddr::V4(server_at)) = (client_at, server_at) else {
            panic!("IPv4 sockets have IPv4 addresses");
        };
        Tracked {
            protocol,
            original: Tuple {
                source: *client_at.ip(),
                destination: *server_at.ip(),
                source_port: client_at.port(),
                destination_port: server_at.port(),
            },
            reply: Tuple {
                source: *server_at.ip(),
                destination: *client_at.ip(),
                source_port: server_at.port(),
                destination_port: client_at.port(),
            },
        }
    };
    let mut expected = vec![
        tracked(IPPROTO_UDP, udp_client.local_addr().unwrap(), udp_server_at),
        tracked(IPPROTO_TCP, tcp_client.local_addr().unwrap(), tcp_server_at),
    ];
    let key = |t: &Tracked| (t.protocol, t.original.source_port);
    listed.sort_by_key(key);
    expected.sort_by_key(key);
    // The namespace is the test's own: nothing but these two went through it.
    assert_eq!(listed, expected);
}
