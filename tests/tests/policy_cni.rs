//! The CNI plugins' rules, judged by what the kernel path does with each class (run as root).
//! Each test builds its own lab with an uplink, gives its host namespace what a CNI host has
//! (FORWARD policy DROP as dockerd leaves it, br_netfilter's bridge-nf-call-iptables on) and
//! installs, with the real `iptables` (nf_tables backend), the rules the `firewall` plugin
//! writes for containers a and b (none for c) and the ones `portmap` writes for host port
//! 18081 -> b:8000. Every probe runs on the plain kernel path first, then with xbr attached:
//! xbr must deliver exactly what the kernel delivers, take the fast path where no rule could
//! change a class's fate (`redirected` / `nat_in` grow) and hold back the rest
//! (`held_by_policy` grows, `xbr status` names the rule).

use std::{
    net::{Ipv4Addr, SocketAddr, UdpSocket},
    process::Command,
    time::{Duration, Instant},
};

use serde_json::Value;
use xbr::{lab::LabSpec, netns::NetNs};
use xbr_tests::{
    lab_support::LabBuilder,
    skip::skip,
    traffic::{exchange, tcp_echo_server},
    witness::{PinRoot, force_receive_buffer},
};

const HOST: Ipv4Addr = Ipv4Addr::new(10, 78, 0, 1);
const A: Ipv4Addr = Ipv4Addr::new(10, 77, 0, 2);
const B: Ipv4Addr = Ipv4Addr::new(10, 77, 0, 3);
const C: Ipv4Addr = Ipv4Addr::new(10, 77, 0, 4);
const HOST_PORT: u16 = 18081;
const PUBLISHED: &str = "18081:10.77.0.3:8000";
const DATAGRAMS: usize = 20;

/// What the firewall plugin (containernetworking-plugins 1.1.1) writes for a and b, in the
/// order it writes it: `iptables` arguments after the tool's name.
fn firewall_plugin_rules() -> Vec<Vec<String>> {
    let mut rules = vec!["-N CNI-FORWARD", "-N CNI-ADMIN", "-P FORWARD DROP"]
        .into_iter()
        .map(split)
        .collect::<Vec<_>>();
    rules.push(with_comment(
        "-A FORWARD -m comment --comment",
        "CNI firewall plugin rules",
        "-j CNI-FORWARD",
    ));
    rules.push(with_comment(
        "-A CNI-FORWARD -m comment --comment",
        "CNI firewall plugin admin overrides",
        "-j CNI-ADMIN",
    ));
    for container in [A, B] {
        rules.push(split(&format!(
            "-A CNI-FORWARD -d {container}/32 -m conntrack --ctstate RELATED,ESTABLISHED -j \
             ACCEPT"
        )));
        rules.push(split(&format!(
            "-A CNI-FORWARD -s {container}/32 -j ACCEPT"
        )));
    }
    rules
}

/// What portmap writes for `hostPort 18081 -> b:8000/tcp` on a bridge 10.77.0.0/24.
fn portmap_rules() -> Vec<Vec<String>> {
    let mut rules: Vec<Vec<String>> = [
        "-t nat -N CNI-HOSTPORT-DNAT",
        "-t nat -N CNI-HOSTPORT-MASQ",
        "-t nat -N CNI-HOSTPORT-SETMARK",
        "-t nat -N CNI-DN-xbrtest",
        "-t nat -A PREROUTING -m addrtype --dst-type LOCAL -j CNI-HOSTPORT-DNAT",
        "-t nat -A OUTPUT -m addrtype --dst-type LOCAL -j CNI-HOSTPORT-DNAT",
        "-t nat -A CNI-HOSTPORT-MASQ -m mark --mark 0x2000/0x2000 -j MASQUERADE",
        "-t nat -A CNI-DN-xbrtest -s 10.77.0.0/24 -p tcp -m tcp --dport 18081 -j \
         CNI-HOSTPORT-SETMARK",
        "-t nat -A CNI-DN-xbrtest -s 127.0.0.1/32 -p tcp -m tcp --dport 18081 -j \
         CNI-HOSTPORT-SETMARK",
        "-t nat -A CNI-DN-xbrtest -p tcp -m tcp --dport 18081 -j DNAT --to-destination \
         10.77.0.3:8000",
    ]
    .into_iter()
    .map(split)
    .collect();
    rules.push(with_comment(
        "-t nat -A POSTROUTING -m comment --comment",
        "CNI portfwd requiring masquerade",
        "-j CNI-HOSTPORT-MASQ",
    ));
    rules.push(with_comment(
        "-t nat -A CNI-HOSTPORT-SETMARK -m comment --comment",
        "CNI portfwd masquerade mark",
        "-j MARK --set-xmark 0x2000/0x2000",
    ));
    rules.push(with_comment(
        "-t nat -A CNI-HOSTPORT-DNAT -p tcp -m comment --comment",
        "dnat name: \"xbrnet\" id: \"xbrtest\"",
        "-m multiport --dports 18081 -j CNI-DN-xbrtest",
    ));
    rules
}

fn split(words: &str) -> Vec<String> {
    words.split_whitespace().map(str::to_owned).collect()
}

fn with_comment(before: &str, comment: &str, after: &str) -> Vec<String> {
    let mut words = split(before);
    words.push(comment.to_owned());
    words.extend(split(after));
    words
}

/// Runs `iptables -w ARGS` in `netns` (entered with nsenter: `ip netns exec` remounts /sys).
fn iptables(netns: &str, args: &[String]) {
    let output = Command::new("nsenter")
        .arg(format!("--net=/run/netns/{netns}"))
        .arg("iptables")
        .arg("-w")
        .args(args)
        .output()
        .expect("run iptables");
    assert!(
        output.status.success(),
        "`iptables {}` in {netns} failed: {}",
        args.join(" "),
        String::from_utf8_lossy(&output.stderr)
    );
}

/// A lab whose host namespace has the CNI plugins' rules; `extra` rules after them. `None`
/// (the test is skipped) where br_netfilter is not loaded: without it bridged frames meet no
/// FORWARD chain and the case tests nothing.
struct CniLab {
    // Dropped first: xbr detaches before the lab goes.
    pins: PinRoot,
    spec: LabSpec,
    _lab: xbr::lab::LabGuard,
}

impl CniLab {
    fn up(test: &str, extra: &[&str]) -> Option<CniLab> {
        let lab = LabBuilder::three_containers().with_uplink().up();
        let spec = lab.spec().clone();
        let host = spec.host_netns();
        let switch = Command::new("nsenter")
            .arg(format!("--net=/run/netns/{host}"))
            .args(["sysctl", "-qw", "net.bridge.bridge-nf-call-iptables=1"])
            .status()
            .expect("run sysctl");
        if !switch.success() {
            skip(test, "br_netfilter is not loaded");
            return None;
        }
        for rule in firewall_plugin_rules()
            .into_iter()
            .chain(portmap_rules())
            .chain(extra.iter().map(|rule| split(rule)))
        {
            iptables(&host, &rule);
        }
        Some(CniLab {
            pins: PinRoot::new(&host),
            spec,
            _lab: lab,
        })
    }

    fn ns(&self, container: &str) -> NetNs {
        NetNs::open(&self.spec.container_netns(container)).unwrap()
    }

    fn outside(&self) -> NetNs {
        NetNs::open(&self.spec.outside_netns().expect("an uplink")).unwrap()
    }

    fn attach(&self) {
        self.pins
            .xbr_ok(&["attach", "br0", "--uplink", "uplink0", "--docker", "off"]);
    }

    fn verdict(&self, name: &str) -> u64 {
        let stats: Value =
            serde_json::from_str(&self.pins.xbr_ok(&["stats", "--json"])).expect("stats --json");
        stats["verdicts"][0][name].as_u64().unwrap_or(0)
    }

    fn bridge_status(&self) -> Value {
        self.pins.status()["bridges"][0].clone()
    }

    /// `DATAGRAMS` datagrams from `from` to `to`:7000; how many arrived.
    fn datagrams(&self, from: (&str, Ipv4Addr), to: (&str, Ipv4Addr), tag: &str) -> usize {
        let sink = self
            .ns(to.0)
            .run(|| UdpSocket::bind((to.1, 7000)))
            .unwrap()
            .expect("bind the UDP sink");
        sink.set_nonblocking(true).unwrap();
        force_receive_buffer(&sink);
        let sender = self
            .ns(from.0)
            .run(|| UdpSocket::bind((from.1, 0)))
            .unwrap()
            .expect("bind the UDP sender");
        for i in 0..DATAGRAMS {
            sender
                .send_to(format!("{tag} {i}").as_bytes(), (to.1, 7000))
                .expect("send a datagram");
            std::thread::sleep(Duration::from_millis(1));
        }
        // Until all arrived, or none has for half a second.
        let mut received = 0;
        let mut last = Instant::now();
        let mut buffer = [0u8; 512];
        while received < DATAGRAMS && last.elapsed() < Duration::from_millis(500) {
            match sink.recv(&mut buffer) {
                Ok(n) if buffer[..n].starts_with(tag.as_bytes()) => {
                    received += 1;
                    last = Instant::now();
                }
                Ok(_) => {}
                Err(_) => std::thread::sleep(Duration::from_millis(10)),
            }
        }
        received
    }

    /// Three echo connections from outside to the uplink's HOST_PORT; how many came back.
    fn connections(&self) -> usize {
        let outside = self.outside();
        let to = SocketAddr::from((HOST, HOST_PORT));
        (0..3)
            .filter(|_| exchange(&outside, to, 1000).is_ok())
            .count()
    }
}

/// `packets` is held back exactly once, for a reason that names `rule`.
fn assert_held_once(held: &[(String, String)], packets: &str, rule: &str) {
    let found: Vec<&(String, String)> = held.iter().filter(|(p, _)| p == packets).collect();
    assert_eq!(found.len(), 1, "{packets} is held once: {held:#?}");
    assert!(
        found[0].1.contains(rule),
        "the reason names `{rule}`: {}",
        found[0].1
    );
}

/// What `xbr status --json` holds back of east-west traffic: (packets, reason).
fn east_west_held(bridge: &Value) -> Vec<(String, String)> {
    assert_eq!(
        bridge["policy"]["east_west"],
        Value::Null,
        "east-west is not off as a whole: {bridge:#}"
    );
    bridge["policy"]["east_west_held"]
        .as_array()
        .into_iter()
        .flatten()
        .map(|held| {
            (
                held["packets"].as_str().unwrap_or_default().to_owned(),
                held["reason"].as_str().unwrap_or_default().to_owned(),
            )
        })
        .collect()
}

fn held_classes_include(lab: &CniLab, packets: &str) -> bool {
    east_west_held(&lab.bridge_status())
        .iter()
        .any(|(p, _)| p == packets)
}

#[test]
fn the_firewall_plugins_accepts_leave_east_west_fast_and_a_container_without_them_held() {
    let Some(lab) = CniLab::up(
        "the_firewall_plugins_accepts_leave_east_west_fast_and_a_container_without_them_held",
        &[],
    ) else {
        return;
    };
    // The kernel path: a's and b's frames are accepted by their own `-s X -j ACCEPT`; c's
    // by nothing, so the policy drops them, but for its replies to a connection a opened
    // (`-d a ctstate RELATED,ESTABLISHED -j ACCEPT`).
    let _server = tcp_echo_server(&lab.ns("c"), C, 9000);
    let a_c = SocketAddr::from((C, 9000));
    assert!(
        exchange(&lab.ns("a"), a_c, 1000).is_ok(),
        "the kernel path: a connects to c"
    );
    let a_b = lab.datagrams(("a", A), ("b", B), "kernel-ab");
    let b_a = lab.datagrams(("b", B), ("a", A), "kernel-ba");
    let c_a = lab.datagrams(("c", C), ("a", A), "kernel-ca");
    assert_eq!(
        (a_b, b_a, c_a),
        (DATAGRAMS, DATAGRAMS, 0),
        "the kernel path"
    );

    lab.attach();
    let held = east_west_held(&lab.bridge_status());
    assert_held_once(
        &held,
        "ipv4 10.77.0.4:* -> *:*",
        "`table ip filter` chain FORWARD policy drop",
    );
    assert!(
        !held
            .iter()
            .any(|(p, _)| p.contains("10.77.0.2:* ->") || p.contains("10.77.0.3:* ->")),
        "nothing a or b sends is held but the replies portmap's DNAT makes: {held:#?}"
    );
    // a's SYN to c takes the kernel path too, so that conntrack knows c's SYN-ACK as
    // established.
    assert!(
        held.iter().any(|(p, _)| p == "ipv4 *:* -> 10.77.0.4:*"),
        "what goes to c is held: {held:#?}"
    );

    let redirected = lab.verdict("redirected");
    let a_b = lab.datagrams(("a", A), ("b", B), "xbr-ab");
    let b_a = lab.datagrams(("b", B), ("a", A), "xbr-ba");
    let fast = lab.verdict("redirected") - redirected;
    assert_eq!((a_b, b_a), (DATAGRAMS, DATAGRAMS), "a <-> b with xbr");
    assert!(
        fast >= 2 * DATAGRAMS as u64,
        "a <-> b took the fast path: redirected +{fast}"
    );

    let held_by_policy = lab.verdict("held_by_policy");
    let c_a = lab.datagrams(("c", C), ("a", A), "xbr-ca");
    assert_eq!(c_a, 0, "c -> a is dropped with xbr too");
    let held = lab.verdict("held_by_policy") - held_by_policy;
    assert!(
        held >= DATAGRAMS as u64,
        "c -> a was held for the kernel path: held_by_policy +{held}"
    );
    let held_by_policy = lab.verdict("held_by_policy");
    assert!(
        exchange(&lab.ns("a"), a_c, 1000).is_ok(),
        "with xbr: a connects to c"
    );
    let held = lab.verdict("held_by_policy") - held_by_policy;
    assert!(held >= 4, "a <-> c was held: held_by_policy +{held}");
}

#[test]
fn an_admin_drop_in_cni_admin_holds_back_exactly_that_pair() {
    let Some(lab) = CniLab::up(
        "an_admin_drop_in_cni_admin_holds_back_exactly_that_pair",
        &[
            // c gets the plugin's rules too here, so that a -> c is a class no rule holds.
            "-A CNI-FORWARD -d 10.77.0.4/32 -m conntrack --ctstate RELATED,ESTABLISHED -j ACCEPT",
            "-A CNI-FORWARD -s 10.77.0.4/32 -j ACCEPT",
            "-A CNI-ADMIN -s 10.77.0.2/32 -d 10.77.0.3/32 -j DROP",
        ],
    ) else {
        return;
    };
    let a_b = lab.datagrams(("a", A), ("b", B), "kernel-ab");
    let b_a = lab.datagrams(("b", B), ("a", A), "kernel-ba");
    let a_c = lab.datagrams(("a", A), ("c", C), "kernel-ac");
    assert_eq!(
        (a_b, b_a, a_c),
        (0, DATAGRAMS, DATAGRAMS),
        "the kernel path"
    );

    lab.attach();
    let held = east_west_held(&lab.bridge_status());
    assert_held_once(
        &held,
        "ipv4 10.77.0.2:* -> 10.77.0.3:*",
        "chain CNI-ADMIN rule `-s 10.77.0.2/32 -d 10.77.0.3/32 -j DROP`",
    );

    let held_by_policy = lab.verdict("held_by_policy");
    let a_b = lab.datagrams(("a", A), ("b", B), "xbr-ab");
    let held = lab.verdict("held_by_policy") - held_by_policy;
    assert_eq!(a_b, 0, "a -> b is dropped with xbr too");
    assert!(held >= DATAGRAMS as u64, "held_by_policy +{held}");

    // b -> a is held too (the ruleset decides by conntrack state, so conntrack must see both
    // directions of what is held), and delivered, as on the kernel path.
    assert!(
        held_classes_include(&lab, "ipv4 10.77.0.3:* -> 10.77.0.2:*"),
        "b -> a is held"
    );
    let held_by_policy = lab.verdict("held_by_policy");
    let b_a = lab.datagrams(("b", B), ("a", A), "xbr-ba");
    let held = lab.verdict("held_by_policy") - held_by_policy;
    assert_eq!(b_a, DATAGRAMS, "b -> a with xbr");
    assert!(held >= DATAGRAMS as u64, "b -> a held_by_policy +{held}");

    // a's other traffic is not the rule's.
    let redirected = lab.verdict("redirected");
    let a_c = lab.datagrams(("a", A), ("c", C), "xbr-ac");
    let fast = lab.verdict("redirected") - redirected;
    assert_eq!(a_c, DATAGRAMS, "a -> c with xbr");
    assert!(
        fast >= DATAGRAMS as u64,
        "a -> c took the fast path: +{fast}"
    );
}

/// The firewall plugin accepts what its containers send and the replies they get, never a new
/// connection to one from outside: under the FORWARD DROP the kernel drops a published
/// port's connections unless an admin accepts them.
const ACCEPT_PUBLISHED: &str =
    "-A CNI-ADMIN -d 10.77.0.3/32 -p tcp -m tcp --dport 8000 -m conntrack --ctstate NEW -j ACCEPT";

#[test]
fn portmaps_dnat_of_a_port_xbr_publishes_leaves_it_accelerated() {
    let Some(lab) = CniLab::up(
        "portmaps_dnat_of_a_port_xbr_publishes_leaves_it_accelerated",
        &[ACCEPT_PUBLISHED],
    ) else {
        return;
    };
    let _server = tcp_echo_server(&lab.ns("b"), B, 8000);
    assert_eq!(
        lab.connections(),
        3,
        "the kernel path serves portmap's port"
    );

    lab.attach();
    lab.pins.xbr_ok(&["publish", "br0", PUBLISHED]);
    let bridge = lab.bridge_status();
    let published = bridge["published"]
        .as_array()
        .into_iter()
        .flatten()
        .find(|p| p["spec"] == "18081:10.77.0.3:8000/tcp")
        .unwrap_or_else(|| panic!("the port is published: {bridge:#}"))
        .clone();
    assert_eq!(published["held"], false, "not held: {published:#}");
    // portmap marks (for masquerade) the connections of clients in the bridge's subnet and
    // of 127.0.0.1: a client on the uplink claiming one of those is the kernel's, and so are
    // the host's own clients. Nothing else.
    let classes: Vec<&str> = published["not_accelerated"]
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(|n| n["class"].as_str())
        .collect();
    assert_eq!(
        classes,
        vec![
            "published 18081:10.77.0.3:8000/tcp for clients 10.77.0.0/24",
            "published 18081:10.77.0.3:8000/tcp for clients 127.0.0.1/32",
            "published 18081:10.77.0.3:8000/tcp for clients on the host",
        ],
        "{published:#}"
    );

    let nat_in = lab.verdict("nat_in");
    assert_eq!(lab.connections(), 3, "outside reaches the port with xbr");
    let fast = lab.verdict("nat_in") - nat_in;
    assert!(
        fast >= 3 * 3,
        "the connections went through xbr's NAT: nat_in +{fast}"
    );
}

#[test]
fn without_an_accept_for_new_connections_the_published_port_stays_the_kernels() {
    let Some(lab) = CniLab::up(
        "without_an_accept_for_new_connections_the_published_port_stays_the_kernels",
        &[],
    ) else {
        return;
    };
    let _server = tcp_echo_server(&lab.ns("b"), B, 8000);
    assert_eq!(lab.connections(), 0, "the kernel path drops them");

    lab.attach();
    lab.pins.xbr_ok(&["publish", "br0", PUBLISHED]);
    let bridge = lab.bridge_status();
    let published = bridge["published"]
        .as_array()
        .into_iter()
        .flatten()
        .find(|p| p["spec"] == "18081:10.77.0.3:8000/tcp")
        .unwrap_or_else(|| panic!("the port is published: {bridge:#}"))
        .clone();
    assert_eq!(published["held"], true, "held: {published:#}");
    let reason = published["not_accelerated"][0]["reason"]
        .as_str()
        .unwrap_or_default();
    assert!(
        reason.contains("chain FORWARD policy drop"),
        "the reason names the policy: {reason}"
    );
    let nat_in = lab.verdict("nat_in");
    assert_eq!(lab.connections(), 0, "dropped with xbr too");
    assert_eq!(lab.verdict("nat_in"), nat_in, "xbr opened none of them");
}
