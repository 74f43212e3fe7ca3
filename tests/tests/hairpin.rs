//! Flows the kernel translates keep their translation (run as root): in a lab whose host
//! namespace DNATs connections from the bridge's own containers to another container on the
//! bridge (a hairpin through the gateway, a service address as kube-proxy makes them), written
//! with nftables and with iptables, the client still talks to the address it dialled and the
//! server sees the client, with xbr attached as without; the server's other east-west traffic
//! keeps working, and traffic between other containers keeps the fast path.

use std::{
    io::{Read as _, Write as _},
    net::{Ipv4Addr, SocketAddr, TcpListener, TcpStream},
    process::Command,
    sync::{
        Arc,
        atomic::{AtomicBool, Ordering},
    },
    time::Duration,
};

use rstest::rstest;
use xbr::netns::NetNs;
use xbr_tests::{
    lab_support::LabBuilder,
    witness::{Follower, PinRoot, nft, wait_for},
};

const GATEWAY: Ipv4Addr = Ipv4Addr::new(10, 77, 0, 1);
const SERVICE: Ipv4Addr = Ipv4Addr::new(10, 96, 0, 10);
const A: Ipv4Addr = Ipv4Addr::new(10, 77, 0, 2);
const B: Ipv4Addr = Ipv4Addr::new(10, 77, 0, 3);
const C: Ipv4Addr = Ipv4Addr::new(10, 77, 0, 4);
const SERVER_PORT: u16 = 8000;

/// A server that answers every connection with the address it sees the client at, then
/// closes; stops on drop.
struct WhoAmI {
    stop: Arc<AtomicBool>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl WhoAmI {
    fn start(ns: &NetNs, address: Ipv4Addr, port: u16) -> WhoAmI {
        let listener = ns
            .run(|| TcpListener::bind((address, port)))
            .unwrap()
            .expect("bind the server");
        listener.set_nonblocking(true).unwrap();
        let stop = Arc::new(AtomicBool::new(false));
        let stopped = stop.clone();
        let thread = std::thread::spawn(move || {
            while !stopped.load(Ordering::Relaxed) {
                match listener.accept() {
                    Ok((mut stream, peer)) => {
                        let _ = stream.write_all(peer.ip().to_string().as_bytes());
                    }
                    Err(_) => std::thread::sleep(Duration::from_millis(5)),
                }
            }
        });
        WhoAmI {
            stop,
            thread: Some(thread),
        }
    }
}

impl Drop for WhoAmI {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

/// Connects from `client` to `to`: the address the client is connected to and the address
/// the server saw it at, or why not.
fn ask(client: &NetNs, to: SocketAddr) -> Result<(SocketAddr, String), String> {
    client
        .run(|| {
            let mut stream = TcpStream::connect_timeout(&to, Duration::from_secs(2))
                .map_err(|e| e.to_string())?;
            stream
                .set_read_timeout(Some(Duration::from_secs(2)))
                .map_err(|e| e.to_string())?;
            let peer = stream.peer_addr().map_err(|e| e.to_string())?;
            let mut seen = String::new();
            stream
                .read_to_string(&mut seen)
                .map_err(|e| e.to_string())?;
            if seen.is_empty() {
                return Err("no answer".to_owned());
            }
            Ok((peer, seen))
        })
        .map_err(|e| e.to_string())?
}

/// How the lab's host namespace translates: nftables or iptables (nf_tables backend).
#[derive(Clone, Copy, Debug)]
enum Tool {
    Nftables,
    Iptables,
}

fn install_dnat(host: &str, tool: Tool) {
    match tool {
        Tool::Nftables => {
            nft(
                host,
                &["-f", "-"],
                Some(&format!(
                    "table ip hairpin {{\n chain pre {{\n  type nat hook prerouting priority dstnat; policy accept;\n  \
                     ip daddr {GATEWAY} tcp dport 9090 dnat to {B}:{SERVER_PORT}\n  \
                     ip daddr {SERVICE} tcp dport 80 dnat to {B}:{SERVER_PORT}\n }}\n}}\n"
                )),
            );
        }
        Tool::Iptables => {
            for rule in [
                format!(
                    "-d {GATEWAY} -p tcp --dport 9090 -j DNAT --to-destination {B}:{SERVER_PORT}"
                ),
                format!(
                    "-d {SERVICE} -p tcp --dport 80 -j DNAT --to-destination {B}:{SERVER_PORT}"
                ),
            ] {
                let status = Command::new("nsenter")
                    .arg(format!("--net=/run/netns/{host}"))
                    .args(["iptables", "-t", "nat", "-A", "PREROUTING"])
                    .args(rule.split_whitespace())
                    .status()
                    .expect("run iptables");
                assert!(status.success(), "iptables -t nat -A PREROUTING {rule}");
            }
        }
    }
}

/// The cases every lab checks: (what, client, dialled address, whom the server must see).
fn cases(a: &NetNs) -> [(&'static str, &NetNs, SocketAddr); 2] {
    [
        (
            "a through the gateway's DNAT",
            a,
            SocketAddr::from((GATEWAY, 9090)),
        ),
        (
            "a through a service address",
            a,
            SocketAddr::from((SERVICE, 80)),
        ),
    ]
}

#[rstest]
#[case::nftables(Tool::Nftables)]
#[case::iptables(Tool::Iptables)]
fn translated_flows_keep_their_translation(#[case] tool: Tool) {
    // With an uplink the host namespace forwards IPv4, as a container host does.
    let lab = LabBuilder::three_containers().with_uplink().up();
    let spec = lab.spec();
    let host = spec.host_netns();
    let (a, b, c) = (
        NetNs::open(&spec.container_netns("a")).unwrap(),
        NetNs::open(&spec.container_netns("b")).unwrap(),
        NetNs::open(&spec.container_netns("c")).unwrap(),
    );
    let _servers = (
        WhoAmI::start(&b, B, SERVER_PORT),
        WhoAmI::start(&c, C, SERVER_PORT),
    );
    let direct_b = SocketAddr::from((B, SERVER_PORT));
    let direct_c = SocketAddr::from((C, SERVER_PORT));
    install_dnat(&host, tool);
    // The kernel path: both directions translated (br_netfilter hands the bridged reply to
    // conntrack), the server sees the client.
    for (what, client, to) in cases(&a) {
        assert_eq!(
            ask(client, to),
            Ok((to, A.to_string())),
            "{tool:?}: {what}, without xbr"
        );
    }

    let root = PinRoot::new(&host);
    root.xbr_ok(&["attach", "br0"]);
    let redirected = || -> u64 {
        let stats: serde_json::Value =
            serde_json::from_str(&root.xbr_ok(&["stats", "--json"])).expect("stats --json");
        stats["verdicts"][0]["redirected"]
            .as_u64()
            .expect("redirected")
    };
    for (what, client, to) in cases(&a) {
        for attempt in 0..5 {
            assert_eq!(
                ask(client, to),
                Ok((to, A.to_string())),
                "{tool:?}: {what}, with xbr, connection {attempt}"
            );
        }
    }
    // b's replies to a direct connection keep working (on the kernel path), and a <-> c
    // keeps the fast path.
    assert_eq!(ask(&a, direct_b), Ok((direct_b, A.to_string())));
    let before = redirected();
    for _ in 0..5 {
        assert_eq!(ask(&a, direct_c), Ok((direct_c, A.to_string())));
    }
    let after = redirected();
    assert!(
        after > before,
        "{tool:?}: a <-> c still takes the fast path: redirected {before} -> {after}"
    );
    let status = root.xbr_ok(&["status"]);
    assert!(
        status.contains(&format!("east-west tcp {B}:{SERVER_PORT} -> *:*"))
            && status.contains("DNAT"),
        "{tool:?}: status names the DNAT whose replies take the bridge:\n{status}"
    );
}

/// A DNAT added while a follower runs: the hairpin works within moments, never broken.
#[test]
fn a_dnat_added_under_a_follower_keeps_its_translation() {
    // With an uplink the host namespace forwards IPv4, as a container host does.
    let lab = LabBuilder::three_containers().with_uplink().up();
    let spec = lab.spec();
    let host = spec.host_netns();
    let (a, b) = (
        NetNs::open(&spec.container_netns("a")).unwrap(),
        NetNs::open(&spec.container_netns("b")).unwrap(),
    );
    let _server = WhoAmI::start(&b, B, SERVER_PORT);
    let root = PinRoot::new(&host);
    let _follower = Follower::start(&host, &root.path, "br0", &[]);
    install_dnat(&host, Tool::Nftables);
    let to = SocketAddr::from((GATEWAY, 9090));
    let took = wait_for(
        "the follower to hold b's replies back",
        Duration::from_secs(10),
        || {
            root.status()["bridges"][0]["policy"]["east_west_held"]
                .as_array()
                .is_some_and(|held| !held.is_empty())
                && root.status()["bridges"][0]["policy"]["applied"] == true
        },
    );
    eprintln!("a DNAT rule was honoured {took:?} after nft added it");
    for attempt in 0..5 {
        assert_eq!(
            ask(&a, to),
            Ok((to, A.to_string())),
            "with a follower, connection {attempt}"
        );
    }
}
