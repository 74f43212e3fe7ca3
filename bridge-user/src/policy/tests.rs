//! The policy reader over real rulesets: `testdata/*.json` and `*.save` are what this
//! machine's nft and iptables-nft-save print for the `*.nft` and `*.iptables` sources beside
//! them (`testdata/capture.sh` makes them again).

use std::net::{IpAddr, Ipv4Addr};

use super::{
    eval::{Hold, Pattern},
    model::{Family, Layer3, Origin},
    read::ruleset_from,
    *,
};

pub(super) fn fixture(name: &str) -> String {
    let path = format!("{}/src/policy/testdata/{name}", env!("CARGO_MANIFEST_DIR"));
    std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("reading {path}: {e}"))
}

/// The firewall of a fixture, br_netfilter on for both families.
pub(super) fn firewall(name: &str) -> Firewall {
    let save = std::fs::read_to_string(format!(
        "{}/src/policy/testdata/{name}.save",
        env!("CARGO_MANIFEST_DIR")
    ))
    .ok();
    Firewall {
        ruleset: ruleset_from(&fixture(&format!("{name}.json")), |_, _| save.clone())
            .expect("fixture parses"),
        bridged_ipv4: true,
        bridged_ipv6: true,
    }
}

fn ports() -> Vec<String> {
    ["veth-a", "veth-b", "veth-c"].map(str::to_owned).to_vec()
}

fn east_west_on(firewall: &Firewall, bridge: &str) -> Vec<Hold> {
    let ports = ports();
    east_west(
        firewall,
        &Bridge {
            name: bridge,
            ports: &ports,
            own_ipv4: None,
        },
    )
}

fn patterns(holds: &[Hold]) -> Vec<Pattern> {
    holds.iter().flat_map(|h| h.patterns.clone()).collect()
}

/// Whether a hold-back takes a whole family (or all) of east-west traffic in the datapath,
/// which keys east-west hold-backs on hosts, not prefixes.
fn wide(holds: &[Hold]) -> bool {
    patterns(holds).iter().any(|p| {
        Pattern {
            source_prefix: None,
            destination_prefix: None,
            ..*p
        } == Pattern {
            layer3: p.layer3,
            ..Pattern::default()
        }
    })
}

fn v4(address: &str) -> Option<IpAddr> {
    Some(IpAddr::V4(address.parse().unwrap()))
}

fn tcp_published(host_port: u16, container: &str, container_port: u16) -> Published<'static> {
    Published {
        bridge: "br-test",
        uplinks: Box::leak(Box::new(["eth0".to_owned()])),
        port_name: Some("veth-b"),
        protocol: 6,
        host_ip: None,
        host_port,
        container_ip: container.parse::<Ipv4Addr>().unwrap(),
        container_port,
    }
}

#[test]
fn the_issue_rules_hold_back_exactly_what_they_drop() {
    let firewall = firewall("issue-rules");
    let holds = east_west_on(&firewall, "br0");
    assert!(!wide(&holds), "{holds:#?}");
    assert_eq!(
        patterns(&holds),
        vec![
            Pattern {
                layer3: Some(Layer3::V4),
                source: v4("10.0.0.2"),
                destination: v4("10.0.0.4"),
                protocol: Some(17),
                destination_port: Some(7000),
                ..Pattern::default()
            },
            // The inet rule sees bridged IPv4 frames through br_netfilter.
            Pattern {
                layer3: Some(Layer3::V4),
                destination: v4("10.0.0.3"),
                protocol: Some(6),
                destination_port: Some(8000),
                ..Pattern::default()
            },
        ]
    );
    assert_eq!(
        holds[0].to_string(),
        "`table bridge admin` chain forward rule `ip saddr 10.0.0.2 ip daddr 10.0.0.4 udp dport \
         7000 drop` drops it on the kernel path (forward hook)"
    );

    let without_br_netfilter = Firewall {
        bridged_ipv4: false,
        bridged_ipv6: false,
        ..firewall.clone()
    };
    assert_eq!(
        patterns(&east_west_on(&without_br_netfilter, "br0")).len(),
        1,
        "without br_netfilter, bridged frames never meet the inet table"
    );

    let mut dropped = tcp_published(8000, "10.0.0.3", 8000);
    dropped.bridge = "br0";
    let hold = published(&firewall, &dropped)
        .whole
        .expect("the inet rule drops it after DNAT");
    assert_eq!(hold.rule.table, "admin");
    let mut other = tcp_published(8001, "10.0.0.5", 80);
    other.bridge = "br0";
    let other = published(&firewall, &other);
    assert_eq!(other.whole, None, "{other:#?}");
    // The same rule drops the replies to a client at 10.0.0.3:8000, were there one.
    assert_eq!(
        other
            .clients
            .iter()
            .map(|(client, _)| *client)
            .collect::<Vec<_>>(),
        vec![Client {
            address: Some(("10.0.0.3".parse().unwrap(), 32)),
            port: Some(8000)
        }]
    );
}

#[test]
fn docker_default_rules_accelerate_what_docker_allows() {
    let firewall = firewall("docker-default");
    let filter = firewall
        .ruleset
        .tables
        .iter()
        .find(|t| t.name == "filter")
        .unwrap();
    assert_eq!(
        filter.origin,
        Origin::IptablesNft,
        "tables with xtables extensions are read from iptables-save"
    );
    let holds = east_west_on(&firewall, "br-test");
    assert!(!wide(&holds), "{holds:#?}");
    // Only Docker's self-hairpin masquerades: a container to itself, which xbr never
    // accelerates anyway (same port).
    for pattern in patterns(&holds) {
        assert_eq!(pattern.source, pattern.destination, "{holds:#?}");
    }
    assert_eq!(
        published(&firewall, &tcp_published(18090, "172.18.0.3", 8000)),
        PublishedHolds::default(),
        "Docker's own DNAT is the translation xbr makes; its DOCKER chain accepts"
    );
    let not_docker = published(&firewall, &tcp_published(18091, "172.18.0.3", 8001))
        .whole
        .expect("FORWARD's policy drops what Docker did not publish");
    assert_eq!(not_docker.why, Why::PolicyDrops);
    let wrong_target = published(&firewall, &tcp_published(18090, "172.18.0.3", 9999))
        .whole
        .expect("Docker DNATs 18090 elsewhere");
    assert!(
        matches!(wrong_target.why, Why::Translates(_)),
        "{wrong_target:?}"
    );
}

#[test]
fn hairpin_nat_holds_back_the_replies_conntrack_must_translate() {
    let holds = east_west_on(&firewall("docker-hairpin"), "br-test");
    let patterns = patterns(&holds);
    for (source, protocol, port) in [("172.18.0.3", 6, 8000), ("172.18.0.4", 17, 80)] {
        let reply = Pattern {
            layer3: Some(Layer3::V4),
            source: v4(source),
            protocol: Some(protocol),
            source_port: Some(port),
            ..Pattern::default()
        };
        assert!(
            patterns.contains(&reply),
            "{reply:?} missing from {patterns:#?}"
        );
    }
    assert!(!wide(&holds), "{holds:#?}");
    // With the userland proxy on (the default) Docker DNATs nothing that comes in on the
    // bridge, so no reply is held back.
    let default = east_west_on(&firewall("docker-default"), "br-test");
    assert!(
        !default
            .iter()
            .any(|h| matches!(h.why, Why::Translates(Translation::Destination { .. }))),
        "{default:#?}"
    );
}

#[test]
fn a_firewalld_zone_lets_bridged_ipv4_through() {
    let holds = east_west_on(&firewall("firewalld-like"), "br0");
    assert!(
        holds
            .iter()
            .flat_map(|h| &h.patterns)
            .all(|p| p.layer3 == Some(Layer3::V6)),
        "only firewalld's IPv6 reject of special prefixes can reach east-west: {holds:#?}"
    );
    assert!(!holds.is_empty());
}

#[test]
fn hold_backs_are_as_narrow_as_the_rules() {
    let firewall = firewall("shapes");
    let holds = east_west_on(&firewall, "br0");
    let netdev: Vec<Hold> = holds
        .iter()
        .filter(|h| h.rule.family == Family::Netdev)
        .cloned()
        .collect();
    assert_eq!(
        netdev.len(),
        2,
        "nft does not say a netdev chain's device: it may be a port's, for both families"
    );
    assert!(
        wide(&netdev),
        "an Ethernet match cannot be narrowed: {netdev:?}"
    );

    let others: Vec<&Hold> = holds
        .iter()
        .filter(|h| h.rule.family != Family::Netdev)
        .collect();
    let find = |text: &str| {
        others
            .iter()
            .find(|h| h.rule.text.as_deref().is_some_and(|t| t.contains(text)))
            .unwrap_or_else(|| panic!("no hold by `{text}` in {others:#?}"))
    };
    let marked = find("meta mark set");
    assert_eq!(
        marked.patterns.len(),
        4,
        "2 addresses x 2 ports: {marked:?}"
    );
    assert!(matches!(marked.why, Why::Changes(_)));
    let low_ports = find("tcp dport < 3");
    assert_eq!(
        low_ports
            .patterns
            .iter()
            .map(|p| p.destination_port)
            .collect::<Vec<_>>(),
        vec![Some(0), Some(1), Some(2)]
    );
    let v6 = find("ip6 daddr fd00::1");
    assert_eq!(v6.patterns[0].layer3, Some(Layer3::V6));
    assert!(
        !others.iter().any(|h| h
            .rule
            .text
            .as_deref()
            .is_some_and(|t| t.contains("counter") || t.contains("log"))),
        "counters and logs change nothing"
    );
    // The DNAT toward a container: its requests and its replies.
    let all = patterns(&holds);
    assert!(all.contains(&Pattern {
        layer3: Some(Layer3::V4),
        destination: v4("10.0.0.1"),
        protocol: Some(6),
        destination_port: Some(18090),
        ..Pattern::default()
    }));
    assert!(all.contains(&Pattern {
        layer3: Some(Layer3::V4),
        source: v4("10.0.0.3"),
        protocol: Some(6),
        source_port: Some(8000),
        ..Pattern::default()
    }));
}

#[test]
fn the_vmap_branch_of_another_interface_is_not_taken() {
    let firewall = firewall("shapes");
    let holds = east_west_on(&firewall, "br1");
    assert!(
        !holds.iter().any(
            |h| h.rule.text.as_deref().is_some_and(|t| t.contains("vmap"))
                && h.rule.family == Family::Inet
        ),
        "on br1 neither vmap branch (eth9, br0) applies: {holds:#?}"
    );
}

#[test]
fn legacy_rules_are_read_from_iptables_save() {
    let save = "*filter\n:INPUT ACCEPT [0:0]\n:FORWARD ACCEPT [0:0]\n:OUTPUT ACCEPT [0:0]\n\
                -A FORWARD -s 10.0.0.2/32 -p udp -m multiport --dports 7000,7100:7101 -m comment \
                --comment \"no games\" -j REJECT --reject-with icmp-port-unreachable\n\
                -A FORWARD -m physdev --physdev-in veth-z -j DROP\nCOMMIT\n";
    let firewall = Firewall {
        ruleset: model::Ruleset {
            tables: xtables::parse(save, Family::Ip, Origin::IptablesLegacy),
        },
        bridged_ipv4: true,
        bridged_ipv6: false,
    };
    let holds = east_west_on(&firewall, "br0");
    assert_eq!(
        holds.len(),
        1,
        "the physdev rule names a port that is not this bridge's: {holds:#?}"
    );
    assert_eq!(
        holds[0]
            .patterns
            .iter()
            .map(|p| p.destination_port)
            .collect::<Vec<_>>(),
        vec![Some(7000), Some(7100), Some(7101)]
    );
    assert!(
        holds[0]
            .to_string()
            .starts_with("iptables-legacy `table ip filter` chain FORWARD")
    );
}

#[test]
fn a_rule_that_cannot_be_decoded_holds_back_what_it_may_reach() {
    let json = r#"{"nftables": [
        {"table": {"family": "bridge", "name": "t", "handle": 1}},
        {"chain": {"family": "bridge", "table": "t", "name": "c", "handle": 1, "type": "filter",
                   "hook": "forward", "prio": 0, "policy": "accept"}},
        {"rule": {"family": "bridge", "table": "t", "chain": "c", "handle": 2,
                  "expr": [{"some-future-statement": {"x": 1}}]}}
    ]}"#;
    let firewall = Firewall {
        ruleset: ruleset_from(json, |_, _| None).unwrap(),
        bridged_ipv4: false,
        bridged_ipv6: false,
    };
    let holds = east_west_on(&firewall, "br0");
    assert_eq!(holds.len(), 2, "one per family: {holds:#?}");
    assert!(wide(&holds));
    assert!(
        holds[0].to_string().contains("cannot decode"),
        "{}",
        holds[0]
    );
}

#[test]
fn policy_drop_without_an_accept_holds_everything() {
    let json = r#"{"nftables": [
        {"table": {"family": "inet", "name": "t", "handle": 1}},
        {"chain": {"family": "inet", "table": "t", "name": "fw", "handle": 1, "type": "filter",
                   "hook": "forward", "prio": 0, "policy": "drop"}},
        {"rule": {"family": "inet", "table": "t", "chain": "fw", "handle": 2,
                  "expr": [{"match": {"op": "==", "left": {"meta": {"key": "iifname"}},
                                      "right": "eth0"}}, {"accept": null}]}}
    ]}"#;
    let firewall = Firewall {
        ruleset: ruleset_from(json, |_, _| None).unwrap(),
        bridged_ipv4: true,
        bridged_ipv6: false,
    };
    let holds = east_west_on(&firewall, "br0");
    assert_eq!(holds.len(), 1, "{holds:#?}");
    assert_eq!(holds[0].why, Why::PolicyDrops);
    assert_eq!(
        holds[0].patterns,
        vec![Pattern {
            layer3: Some(Layer3::V4),
            ..Pattern::default()
        }]
    );
}

/// The filter table of Docker 20.10 with the default network (bridge xbrt9) and an icc=false
/// network, as iptables-save prints it.
const DOCKER_RULES: &str = "\
# Generated by iptables-save v1.8.9 (nf_tables)
*filter
:INPUT ACCEPT [0:0]
:FORWARD DROP [0:0]
:OUTPUT ACCEPT [0:0]
:DOCKER - [0:0]
:DOCKER-ISOLATION-STAGE-1 - [0:0]
:DOCKER-ISOLATION-STAGE-2 - [0:0]
:DOCKER-USER - [0:0]
-A FORWARD -j DOCKER-USER
-A FORWARD -j DOCKER-ISOLATION-STAGE-1
-A FORWARD -o br-efbf71399e03 -m conntrack --ctstate RELATED,ESTABLISHED -j ACCEPT
-A FORWARD -o br-efbf71399e03 -j DOCKER
-A FORWARD -i br-efbf71399e03 ! -o br-efbf71399e03 -j ACCEPT
-A FORWARD -o xbrt9 -m conntrack --ctstate RELATED,ESTABLISHED -j ACCEPT
-A FORWARD -o xbrt9 -j DOCKER
-A FORWARD -i xbrt9 ! -o xbrt9 -j ACCEPT
-A FORWARD -i xbrt9 -o xbrt9 -j ACCEPT
-A FORWARD -i br-efbf71399e03 -o br-efbf71399e03 -j DROP
-A DOCKER -d 10.213.0.2/32 ! -i xbrt9 -o xbrt9 -p tcp -m tcp --dport 8080 -j ACCEPT
-A DOCKER-ISOLATION-STAGE-1 -i br-efbf71399e03 ! -o br-efbf71399e03 -j DOCKER-ISOLATION-STAGE-2
-A DOCKER-ISOLATION-STAGE-1 -i xbrt9 ! -o xbrt9 -j DOCKER-ISOLATION-STAGE-2
-A DOCKER-ISOLATION-STAGE-1 -j RETURN
-A DOCKER-ISOLATION-STAGE-2 -o br-efbf71399e03 -j DROP
-A DOCKER-ISOLATION-STAGE-2 -o xbrt9 -j DROP
-A DOCKER-ISOLATION-STAGE-2 -j RETURN
-A DOCKER-USER -j RETURN
COMMIT
";

#[test]
fn docker_user_rules_hold_back_the_classes_they_can_match() {
    let ports = ["veth-x1".to_owned(), "veth-x2".to_owned()];
    let uplinks = ["eth0".to_owned()];
    let published_port = Published {
        bridge: "xbrt9",
        uplinks: &uplinks,
        port_name: Some("veth-x2"),
        protocol: 6,
        host_ip: None,
        host_port: 18080,
        container_ip: "10.213.0.2".parse().unwrap(),
        container_port: 8080,
    };
    for (rule, east_west_held, published_held) in [
        ("", false, false),
        ("-A DOCKER-USER -j DROP", true, true),
        (
            "-A DOCKER-USER -i eth0 -p tcp -m tcp --dport 8080 -j DROP",
            false,
            true,
        ),
        ("-A DOCKER-USER ! -i xbrt9 -j DROP", false, true),
        ("-A DOCKER-USER -i xbrt9 -o xbrt9 -j DROP", true, false),
        // Logging changes nothing about where packets go.
        ("-A DOCKER-USER -o xbrt+ -j LOG", false, false),
        ("-A DOCKER-USER -i br-efbf71399e03 -j DROP", false, false),
        ("-A DOCKER-USER -o br-efbf71399e03 -j DROP", false, false),
        (
            "-A DOCKER-USER -m comment --comment \"allow all\" -j RETURN",
            false,
            false,
        ),
        ("-A DOCKER-USER -s 10.0.0.0/8 -j RETURN", false, false),
        // After the final RETURN: never reached.
        (
            "-A DOCKER-USER -j RETURN\n-A DOCKER-USER -j DROP",
            false,
            false,
        ),
    ] {
        let save = DOCKER_RULES.replace(
            "-A DOCKER-USER -j RETURN",
            &format!("{rule}\n-A DOCKER-USER -j RETURN"),
        );
        let firewall = Firewall {
            ruleset: model::Ruleset {
                tables: xtables::parse(&save, Family::Ip, Origin::IptablesNft),
            },
            bridged_ipv4: true,
            bridged_ipv6: true,
        };
        let east_west = east_west(
            &firewall,
            &Bridge {
                name: "xbrt9",
                ports: &ports,
                own_ipv4: None,
            },
        );
        let published = published(&firewall, &published_port);
        assert_eq!(
            (!east_west.is_empty(), published.whole.is_some()),
            (east_west_held, published_held),
            "{rule}: {east_west:#?} {published:#?}"
        );
        if let Some(hold) = east_west.first().or(published.whole.as_ref())
            && !rule.is_empty()
        {
            let text = rule
                .lines()
                .last()
                .unwrap()
                .trim_start_matches("-A DOCKER-USER ");
            assert!(
                hold.to_string().contains(text),
                "the reason names the rule: {hold}"
            );
        }
    }
    // enable_icc=false: Docker drops the other network's east-west traffic in FORWARD.
    let firewall = Firewall {
        ruleset: model::Ruleset {
            tables: xtables::parse(DOCKER_RULES, Family::Ip, Origin::IptablesNft),
        },
        bridged_ipv4: true,
        bridged_ipv6: true,
    };
    let icc_off = east_west(
        &firewall,
        &Bridge {
            name: "br-efbf71399e03",
            ports: &ports,
            own_ipv4: None,
        },
    );
    assert!(
        icc_off.iter().any(|h| h
            .to_string()
            .contains("-i br-efbf71399e03 -o br-efbf71399e03 -j DROP")),
        "{icc_off:#?}"
    );
    // Without br_netfilter, iptables never sees bridged frames.
    let without = Firewall {
        bridged_ipv4: false,
        bridged_ipv6: false,
        ..firewall
    };
    assert!(
        east_west(
            &without,
            &Bridge {
                name: "br-efbf71399e03",
                ports: &ports,
                own_ipv4: None,
            }
        )
        .is_empty()
    );
}

#[test]
fn another_networks_masquerade_does_not_touch_containers_that_use_their_own_addresses() {
    let save = "*nat\n:PREROUTING ACCEPT [0:0]\n:INPUT ACCEPT [0:0]\n:OUTPUT ACCEPT [0:0]\n\
                :POSTROUTING ACCEPT [0:0]\n\
                -A POSTROUTING -s 10.214.1.0/24 ! -o br-other -j MASQUERADE\nCOMMIT\n";
    let firewall = Firewall {
        ruleset: model::Ruleset {
            tables: xtables::parse(save, Family::Ip, Origin::IptablesNft),
        },
        bridged_ipv4: true,
        bridged_ipv6: true,
    };
    let ports = ports();
    let own = ["10.213.0.2".parse().unwrap(), "10.213.0.3".parse().unwrap()];
    let checked = east_west(
        &firewall,
        &Bridge {
            name: "br-test",
            ports: &ports,
            own_ipv4: Some(&own),
        },
    );
    assert!(checked.is_empty(), "{checked:#?}");
    // Were any source address possible, a container sending from 10.214.1.x would be
    // masqueraded on the kernel path.
    let unchecked = east_west_on(&firewall, "br-test");
    assert!(wide(&unchecked), "{unchecked:#?}");
}

#[test]
fn a_masquerade_for_another_subnet_holds_back_only_those_clients_of_a_published_port() {
    let save = "*nat\n:PREROUTING ACCEPT [0:0]\n:INPUT ACCEPT [0:0]\n:OUTPUT ACCEPT [0:0]\n\
                :POSTROUTING ACCEPT [0:0]\n\
                -A POSTROUTING -s 10.214.1.0/24 ! -o br-other -j MASQUERADE\nCOMMIT\n";
    let firewall = Firewall {
        ruleset: model::Ruleset {
            tables: xtables::parse(save, Family::Ip, Origin::IptablesNft),
        },
        bridged_ipv4: true,
        bridged_ipv6: true,
    };
    let holds = published(&firewall, &tcp_published(18090, "172.18.0.3", 8000));
    assert_eq!(holds.whole, None, "{holds:#?}");
    assert_eq!(
        holds.clients.iter().map(|(c, _)| *c).collect::<Vec<_>>(),
        vec![Client {
            address: Some(("10.214.1.0".parse().unwrap(), 24)),
            port: None
        }]
    );
}

#[test]
fn dockers_own_rules_leave_the_host_clients_of_its_published_ports_to_the_socket_hooks() {
    // Docker's nat OUTPUT DNAT (with --userland-proxy=false, and with the proxy for addresses
    // other than loopback) is the translation the socket hooks make themselves.
    for fixture in ["docker-hairpin", "docker-default"] {
        let firewall = firewall(fixture);
        let held = host_clients(&firewall, &tcp_published(18090, "172.18.0.3", 8000));
        assert_eq!(held, None, "{fixture}: {held:#?}");
    }
}

#[test]
fn a_rule_on_the_way_to_the_hosts_port_holds_back_its_host_clients() {
    let with = |rules: &str| {
        let save = format!(
            "*filter\n:INPUT ACCEPT [0:0]\n:FORWARD ACCEPT [0:0]\n:OUTPUT ACCEPT [0:0]\n\
             {rules}COMMIT\n*nat\n:PREROUTING ACCEPT [0:0]\n:INPUT ACCEPT [0:0]\n\
             :OUTPUT ACCEPT [0:0]\n:POSTROUTING ACCEPT [0:0]\n:DOCKER - [0:0]\n\
             -A OUTPUT -m addrtype --dst-type LOCAL -j DOCKER\n\
             -A DOCKER -p tcp -m tcp --dport 18090 -j DNAT --to-destination 172.18.0.3:8000\n\
             COMMIT\n"
        );
        Firewall {
            ruleset: model::Ruleset {
                tables: xtables::parse(&save, Family::Ip, Origin::IptablesNft),
            },
            bridged_ipv4: true,
            bridged_ipv6: true,
        }
    };
    let published = tcp_published(18090, "172.18.0.3", 8000);
    assert_eq!(host_clients(&with(""), &published), None);
    for rule in [
        // What docker-proxy's clients meet over loopback.
        "-A INPUT -i lo -p tcp -m tcp --dport 18090 -j DROP\n",
        // Before Docker's DNAT, on the host port.
        "-A OUTPUT -p tcp -m tcp --dport 18090 -j REJECT\n",
    ] {
        let held = host_clients(&with(rule), &published)
            .unwrap_or_else(|| panic!("{rule} holds back the host's clients"));
        assert!(
            held.to_string().contains(
                rule.trim_end()
                    .split_once(' ')
                    .unwrap()
                    .1
                    .split_once(' ')
                    .unwrap()
                    .1
            ),
            "the reason names the rule: {held}"
        );
    }
    // Another protocol's rule does not. (Another port's could: a reply to a client whose own
    // port it names.)
    let other = "-A OUTPUT -p udp -m udp --dport 18090 -j REJECT\n";
    assert_eq!(host_clients(&with(other), &published), None);
}

/// The CNI plugins' containers in `cni-plugins` and `cni-admin`.
const CNI_A: &str = "10.252.0.9";
const CNI_B: &str = "10.252.0.10";
/// A container on the same bridge that the firewall plugin wrote no rule for.
const CNI_C: &str = "10.252.0.11";

fn cni_east_west(firewall: &Firewall, containers: &[&str]) -> Vec<Hold> {
    let ports = ports();
    let own: Vec<Ipv4Addr> = containers.iter().map(|a| a.parse().unwrap()).collect();
    east_west(
        firewall,
        &Bridge {
            name: "barcni0",
            ports: &ports,
            own_ipv4: Some(&own),
        },
    )
}

/// What portmap's DNAT to 10.252.0.9:8000 holds back of east-west traffic: the replies of
/// hairpin connections, which conntrack must translate.
fn portmap_hairpin_replies() -> Pattern {
    Pattern {
        layer3: Some(Layer3::V4),
        source: v4(CNI_A),
        protocol: Some(6),
        source_port: Some(8000),
        ..Pattern::default()
    }
}

#[test]
fn the_cni_firewall_plugin_leaves_east_west_between_its_containers_accelerated() {
    // FORWARD drops by policy; `-s A -j ACCEPT` and `-s B -j ACCEPT` take every frame the
    // two containers send to each other (the datapath checks they send from their own
    // addresses), whatever its conntrack state: nothing is left for the policy to drop.
    let firewall = firewall("cni-plugins");
    let holds = cni_east_west(&firewall, &[CNI_A, CNI_B]);
    assert!(!wide(&holds), "{holds:#?}");
    assert_eq!(patterns(&holds), vec![portmap_hairpin_replies()]);
    // portmap's MASQUERADE of marked connections never meets an east-west frame: only the
    // SETMARK rules, which hold back what they match, set that mark.
    assert!(
        !holds.iter().any(|h| h.to_string().contains("MASQUERADE")),
        "{holds:#?}"
    );
}

#[test]
fn the_cni_firewall_plugin_holds_back_what_a_container_without_its_rules_sends() {
    // The kernel drops C -> A unless it replies to a connection A opened (`-d A ctstate
    // RELATED,ESTABLISHED -j ACCEPT`); either way the frames from C are the kernel's. And so
    // are the frames to C: conntrack must see A's SYN for C's SYN-ACK to be established.
    let firewall = firewall("cni-plugins");
    let holds = cni_east_west(&firewall, &[CNI_A, CNI_B, CNI_C]);
    assert!(!wide(&holds), "{holds:#?}");
    assert_eq!(
        patterns(&holds),
        vec![
            Pattern {
                layer3: Some(Layer3::V4),
                source: v4(CNI_C),
                ..Pattern::default()
            },
            Pattern {
                layer3: Some(Layer3::V4),
                destination: v4(CNI_C),
                ..Pattern::default()
            },
            portmap_hairpin_replies(),
        ]
    );
    assert_eq!(
        holds[0].to_string(),
        "iptables `table ip filter` chain FORWARD policy drop drops it (no rule accepts it) on \
         the kernel path (forward hook)"
    );
    // Where the datapath cannot tell who sent a frame, any source might be one no rule
    // accepts.
    assert!(wide(&east_west_on(&firewall, "barcni0")));
}

#[test]
fn a_conntrack_state_accept_alone_leaves_the_policy_to_decide_new_connections() {
    // Without the `-s A -j ACCEPT` rules, `-d A ctstate RELATED,ESTABLISHED -j ACCEPT`
    // accepts only replies; a connection's first packet falls to the policy drop.
    let save = fixture("cni-plugins.save")
        .lines()
        .filter(|line| !line.starts_with("-A CNI-FORWARD -s "))
        .map(|line| format!("{line}\n"))
        .collect::<String>();
    let firewall = Firewall {
        ruleset: model::Ruleset {
            tables: xtables::parse(&save, Family::Ip, Origin::IptablesNft),
        },
        bridged_ipv4: true,
        bridged_ipv6: false,
    };
    let holds = cni_east_west(&firewall, &[CNI_A, CNI_B]);
    assert!(wide(&holds), "{holds:#?}");
}

#[test]
fn an_admin_override_in_cni_admin_holds_back_the_frames_it_drops() {
    // A -> B, and (as the ruleset decides by conntrack state) B -> A, so that conntrack sees
    // both directions of what is held.
    let firewall = firewall("cni-admin");
    let holds = cni_east_west(&firewall, &[CNI_A, CNI_B]);
    assert!(!wide(&holds), "{holds:#?}");
    assert_eq!(
        patterns(&holds),
        vec![
            Pattern {
                layer3: Some(Layer3::V4),
                source: v4(CNI_A),
                destination: v4(CNI_B),
                ..Pattern::default()
            },
            Pattern {
                layer3: Some(Layer3::V4),
                source: v4(CNI_B),
                destination: v4(CNI_A),
                ..Pattern::default()
            },
            portmap_hairpin_replies(),
        ]
    );
    assert_eq!(
        holds[0].to_string(),
        "iptables `table ip filter` chain CNI-ADMIN rule `-s 10.252.0.9/32 -d 10.252.0.10/32 \
         -j DROP` drops it on the kernel path (forward hook)"
    );
}

#[test]
fn a_kube_forward_style_drop_holds_back_what_it_may_drop() {
    // A network-policy chain jumped from CNI-ADMIN that drops what its set of allowed
    // sources does not name: the walk cannot read `-m set`, so it may drop anything the
    // jump reaches (traffic to B), and only that.
    let save = fixture("cni-plugins.save")
        .replace(
            ":CNI-ADMIN - [0:0]\n",
            ":CNI-ADMIN - [0:0]\n:KUBE-NWPLCY-B - [0:0]\n",
        )
        .replace(
            "COMMIT\n*nat",
            "-A CNI-ADMIN -d 10.252.0.10/32 -j KUBE-NWPLCY-B\n\
             -A KUBE-NWPLCY-B -m set ! --match-set allowed-b src -j DROP\nCOMMIT\n*nat",
        );
    let firewall = Firewall {
        ruleset: model::Ruleset {
            tables: xtables::parse(&save, Family::Ip, Origin::IptablesNft),
        },
        bridged_ipv4: true,
        bridged_ipv6: false,
    };
    let holds = cni_east_west(&firewall, &[CNI_A, CNI_B]);
    assert_eq!(
        patterns(&holds),
        vec![
            Pattern {
                layer3: Some(Layer3::V4),
                destination: v4(CNI_B),
                ..Pattern::default()
            },
            Pattern {
                layer3: Some(Layer3::V4),
                source: v4(CNI_B),
                ..Pattern::default()
            },
            portmap_hairpin_replies(),
        ],
        "{holds:#?}"
    );
    assert!(
        holds[0].to_string().contains("KUBE-NWPLCY-B"),
        "{}",
        holds[0]
    );
}

/// `cni-plugins` where the forward policy accepts (or an admin accepts new connections to
/// the published container: under FORWARD DROP alone the kernel drops them).
fn cni_forward_accepting() -> Firewall {
    let mut firewall = firewall("cni-plugins");
    for table in &mut firewall.ruleset.tables {
        for chain in &mut table.chains {
            if let Some(base) = &mut chain.base {
                base.policy_drops = false;
            }
        }
    }
    firewall
}

#[test]
fn portmaps_dnat_to_the_ports_own_target_does_not_hold_it() {
    let firewall = cni_forward_accepting();
    let holds = published(&firewall, &tcp_published(18081, CNI_A, 8000));
    assert_eq!(holds.whole, None, "{holds:#?}");
    // Its hairpin and localhost clients are marked for masquerade on the kernel path; a
    // client on an uplink that claims one of those addresses is the kernel's.
    assert_eq!(
        holds.clients.iter().map(|(c, _)| *c).collect::<Vec<_>>(),
        vec![
            Client {
                address: Some(("10.252.0.0".parse().unwrap(), 24)),
                port: None
            },
            Client {
                address: Some(("127.0.0.1".parse().unwrap(), 32)),
                port: None
            },
        ]
    );
    assert!(
        holds.clients[0]
            .1
            .to_string()
            .contains("CNI-HOSTPORT-SETMARK"),
        "{}",
        holds.clients[0].1
    );
    // The host's own clients: the kernel path marks those from 10.252.0.0/24 and 127.0.0.1
    // and masquerades them; the socket hooks would not.
    let host = host_clients(&firewall, &tcp_published(18081, CNI_A, 8000));
    assert!(host.is_some_and(|hold| hold.to_string().contains("MARK")));
}

#[test]
fn portmaps_dnat_to_another_target_holds_the_port() {
    let firewall = cni_forward_accepting();
    let holds = published(&firewall, &tcp_published(18081, CNI_B, 8000));
    let whole = holds.whole.expect("held whole");
    assert_eq!(
        whole.why,
        Why::Translates(Translation::Destination {
            to: v4(CNI_A),
            port: Some(8000)
        })
    );
}

#[test]
fn under_the_forward_drop_the_firewall_plugin_leaves_a_published_port_to_the_kernel() {
    // The firewall plugin accepts what its containers send and the replies they get, never a
    // new connection to them from outside: with FORWARD's policy drop the kernel drops it,
    // so xbr must not open it.
    let firewall = firewall("cni-plugins");
    let holds = published(&firewall, &tcp_published(18081, CNI_A, 8000));
    let whole = holds.whole.expect("held whole");
    assert_eq!(whole.why, Why::PolicyDrops);
    assert_eq!(whole.rule.chain, "FORWARD");
    // An admin override that accepts new connections to the port lets it through.
    let save = fixture("cni-plugins.save").replace(
        "COMMIT\n*nat",
        "-A CNI-ADMIN -d 10.252.0.9/32 -p tcp -m tcp --dport 8000 -m conntrack --ctstate NEW \
         -j ACCEPT\nCOMMIT\n*nat",
    );
    let firewall = Firewall {
        ruleset: model::Ruleset {
            tables: xtables::parse(&save, Family::Ip, Origin::IptablesNft),
        },
        bridged_ipv4: true,
        bridged_ipv6: false,
    };
    let holds = published(&firewall, &tcp_published(18081, CNI_A, 8000));
    assert_eq!(holds.whole, None, "{holds:#?}");
}

#[test]
fn marks_are_read_from_both_tools() {
    let save = "*nat\n:POSTROUTING ACCEPT [0:0]\n\
                -A POSTROUTING -m mark --mark 0x2000/0x2000 -j MASQUERADE\n\
                -A POSTROUTING -m mark ! --mark 0x10 -j ACCEPT\nCOMMIT\n";
    let tables = xtables::parse(save, Family::Ip, Origin::IptablesNft);
    let rules = &tables[0].chains[0].rules;
    assert_eq!(
        rules[0].conditions,
        vec![model::Condition::Mark {
            value: 0x2000,
            mask: 0x2000,
            negated: false
        }]
    );
    assert_eq!(
        rules[1].conditions,
        vec![model::Condition::Mark {
            value: 0x10,
            mask: u32::MAX,
            negated: true
        }]
    );
    // nft prints iptables-nft's `-m mark` natively.
    let (ruleset, _) = nft::parse(&fixture("cni-plugins.json")).unwrap();
    let masq = ruleset
        .tables
        .iter()
        .flat_map(|t| &t.chains)
        .find(|c| c.name == "CNI-HOSTPORT-MASQ")
        .expect("the chain");
    assert_eq!(
        masq.rules[0].conditions,
        vec![model::Condition::Mark {
            value: 0x2000,
            mask: 0x2000,
            negated: false
        }]
    );
}

#[test]
fn packets_a_base_chain_returns_meet_its_policy() {
    // A return in a base chain hands the packets to the policy, even where a later rule
    // accepts all the others.
    let save = "*filter\n:INPUT ACCEPT [0:0]\n:FORWARD DROP [0:0]\n:OUTPUT ACCEPT [0:0]\n\
                -A FORWARD -s 10.252.0.9/32 -j RETURN\n-A FORWARD -j ACCEPT\nCOMMIT\n";
    let firewall = Firewall {
        ruleset: model::Ruleset {
            tables: xtables::parse(save, Family::Ip, Origin::IptablesNft),
        },
        bridged_ipv4: true,
        bridged_ipv6: false,
    };
    let holds = cni_east_west(&firewall, &[CNI_A, CNI_B]);
    assert_eq!(
        patterns(&holds),
        vec![Pattern {
            layer3: Some(Layer3::V4),
            source: v4(CNI_A),
            ..Pattern::default()
        }],
        "{holds:#?}"
    );
}

#[test]
fn the_cni_firewall_plugin_behind_dockers_forward_rules() {
    // dockerd's FORWARD chain (and its DROP policy) first, the plugin's jump after it, as on a
    // host that runs both: Docker's rules name only its own bridges.
    let cni = fixture("cni-plugins.save");
    let filter_lines = |save: &str| -> Vec<String> {
        save.lines()
            .skip_while(|line| *line != "*filter")
            .take_while(|line| *line != "COMMIT")
            .skip(1)
            .map(str::to_owned)
            .collect()
    };
    let (docker, cni) = (filter_lines(DOCKER_RULES), filter_lines(&cni));
    let (chains, rules): (Vec<String>, Vec<String>) = docker
        .into_iter()
        .chain(
            cni.into_iter()
                .filter(|line| !line.starts_with(':') || line.contains("CNI")),
        )
        .partition(|line| line.starts_with(':'));
    let save = format!(
        "*filter\n{}\n{}\nCOMMIT\n",
        chains.join("\n"),
        rules.join("\n")
    );
    let firewall = Firewall {
        ruleset: model::Ruleset {
            tables: xtables::parse(&save, Family::Ip, Origin::IptablesNft),
        },
        bridged_ipv4: true,
        bridged_ipv6: false,
    };
    let forward = firewall.ruleset.tables[0].chain("FORWARD").unwrap();
    assert_eq!(
        forward.rules.len(),
        11,
        "Docker's ten rules and the plugin's jump"
    );
    let holds = cni_east_west(&firewall, &[CNI_A, CNI_B, CNI_C]);
    assert_eq!(
        patterns(&holds),
        vec![
            Pattern {
                layer3: Some(Layer3::V4),
                source: v4(CNI_C),
                ..Pattern::default()
            },
            Pattern {
                layer3: Some(Layer3::V4),
                destination: v4(CNI_C),
                ..Pattern::default()
            },
        ],
        "{holds:#?}"
    );
}

#[test]
fn without_a_rule_that_decides_by_state_only_the_held_direction_is_held() {
    let save = "*filter\n:INPUT ACCEPT [0:0]\n:FORWARD ACCEPT [0:0]\n:OUTPUT ACCEPT [0:0]\n\
                -A FORWARD -s 10.252.0.9/32 -d 10.252.0.10/32 -j DROP\nCOMMIT\n";
    let with_state = save.replace(
        "-A FORWARD -s",
        "-A FORWARD -m conntrack --ctstate RELATED,ESTABLISHED -j ACCEPT\n-A FORWARD -s",
    );
    let held = |save: &str| {
        let firewall = Firewall {
            ruleset: model::Ruleset {
                tables: xtables::parse(save, Family::Ip, Origin::IptablesNft),
            },
            bridged_ipv4: true,
            bridged_ipv6: false,
        };
        patterns(&cni_east_west(&firewall, &[CNI_A, CNI_B]))
            .iter()
            .map(|p| (p.source, p.destination))
            .collect::<Vec<_>>()
    };
    assert_eq!(held(save), vec![(v4(CNI_A), v4(CNI_B))]);
    // Established A -> B frames are accepted on the kernel path only where conntrack saw
    // B's side of the connection.
    assert_eq!(
        held(&with_state),
        vec![(v4(CNI_A), v4(CNI_B)), (v4(CNI_B), v4(CNI_A))]
    );
}
