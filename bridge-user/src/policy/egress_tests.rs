//! The egress class over Docker's, the CNI plugins' and hand-written rulesets: what holds
//! containers' outbound connections on the kernel path, and what is xbr's own translation.

use std::net::Ipv4Addr;

use super::{
    model::{Family, Origin, Ruleset},
    read::ruleset_from,
    tests::firewall,
    *,
};
use crate::plan::{self, Policy};

/// The uplink's address, the one xbr translates containers' addresses to.
const UPLINK_ADDRESS: &str = "192.0.2.10";

fn egress_on(bridge: &'static str, subnet: &str) -> Egress<'static> {
    let (address, len) = subnet.split_once('/').unwrap();
    let subnets = vec![(address.parse::<Ipv4Addr>().unwrap(), len.parse().unwrap())];
    Egress {
        bridge,
        ports: Box::leak(Box::new(["veth-a".to_owned(), "veth-b".to_owned()])),
        subnets: subnets.leak(),
        uplinks: Box::leak(Box::new(["eth0".to_owned()])),
        uplink_addresses: vec![UPLINK_ADDRESS.parse().unwrap()].leak(),
    }
}

fn docker0() -> Egress<'static> {
    egress_on("docker0", "172.17.0.0/16")
}

fn iptables(save: &str) -> Firewall {
    Firewall {
        ruleset: Ruleset {
            tables: xtables::parse(save, Family::Ip, Origin::IptablesNft),
        },
        bridged_ipv4: true,
        bridged_ipv6: true,
    }
}

fn nft(json: &str) -> Firewall {
    Firewall {
        ruleset: ruleset_from(json, |_, _| None).unwrap(),
        bridged_ipv4: true,
        bridged_ipv6: true,
    }
}

/// What the plan says: why egress is held, if it is.
fn held(firewall: &Firewall, egress: &Egress) -> Option<String> {
    let policy = Policy {
        firewall: Ok(firewall.clone()),
        icc_off: None,
        ..Policy::default()
    };
    let reason = plan::egress(&policy, egress);
    assert_eq!(
        reason.is_some(),
        !super::egress(firewall, egress).is_empty(),
        "the plan holds egress exactly when the reader finds a hold-back"
    );
    reason
}

/// Docker 20.10's rules with the default network (docker0, 172.17.0.0/16) and one published
/// port, as iptables-save prints them; `{user}` goes before DOCKER-USER's RETURN, `{nat}`
/// before the network's MASQUERADE, `{tables}` after the nat table.
const DOCKER0_RULES: &str = "\
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
-A FORWARD -o docker0 -m conntrack --ctstate RELATED,ESTABLISHED -j ACCEPT
-A FORWARD -o docker0 -j DOCKER
-A FORWARD -i docker0 ! -o docker0 -j ACCEPT
-A FORWARD -i docker0 -o docker0 -j ACCEPT
-A DOCKER -d 172.17.0.2/32 ! -i docker0 -o docker0 -p tcp -m tcp --dport 80 -j ACCEPT
-A DOCKER-ISOLATION-STAGE-1 -i docker0 ! -o docker0 -j DOCKER-ISOLATION-STAGE-2
-A DOCKER-ISOLATION-STAGE-1 -j RETURN
-A DOCKER-ISOLATION-STAGE-2 -o docker0 -j DROP
-A DOCKER-ISOLATION-STAGE-2 -j RETURN
{user}-A DOCKER-USER -j RETURN
COMMIT
*nat
:PREROUTING ACCEPT [0:0]
:INPUT ACCEPT [0:0]
:OUTPUT ACCEPT [0:0]
:POSTROUTING ACCEPT [0:0]
:DOCKER - [0:0]
-A PREROUTING -m addrtype --dst-type LOCAL -j DOCKER
-A OUTPUT ! -d 127.0.0.0/8 -m addrtype --dst-type LOCAL -j DOCKER
{nat}-A POSTROUTING -s 172.17.0.0/16 ! -o docker0 -j MASQUERADE
-A POSTROUTING -s 172.17.0.2/32 -d 172.17.0.2/32 -p tcp -m tcp --dport 80 -j MASQUERADE
-A DOCKER -i docker0 -j RETURN
-A DOCKER ! -i docker0 -p tcp -m tcp --dport 8080 -j DNAT --to-destination 172.17.0.2:80
COMMIT
{tables}";

fn docker0_rules(user: &str, nat: &str, tables: &str) -> String {
    let line = |rule: &str| {
        if rule.is_empty() {
            String::new()
        } else {
            format!("{rule}\n")
        }
    };
    DOCKER0_RULES
        .replace("{user}", &line(user))
        .replace("{nat}", &line(nat))
        .replace("{tables}", tables)
}

#[test]
fn dockers_default_rules_leave_egress_accelerated() {
    let docker = iptables(&docker0_rules("", "", ""));
    assert_eq!(held(&docker, &docker0()), None);
    let without_br_netfilter = Firewall {
        bridged_ipv4: false,
        bridged_ipv6: false,
        ..docker.clone()
    };
    assert_eq!(held(&without_br_netfilter, &docker0()), None);
    // The fixture captured from Docker (a user-defined network br-test, 172.18.0.0/16).
    let fixture = firewall("docker-default");
    assert_eq!(held(&fixture, &egress_on("br-test", "172.18.0.0/16")), None);
    // The same rules say nothing about a bridge Docker does not know: FORWARD's policy drops
    // what it sends out.
    for firewall in [&docker, &fixture] {
        let reason = held(firewall, &egress_on("br-other", "10.9.0.0/16"))
            .expect("no rule accepts another bridge's egress");
        assert!(
            reason.contains("chain FORWARD policy drop drops it"),
            "{reason}"
        );
    }
}

#[test]
fn rules_that_could_change_egress_hold_it_and_name_themselves() {
    let mangle = "*mangle\n:PREROUTING ACCEPT [0:0]\n-A PREROUTING -i docker0 -j MARK \
                  --set-xmark 0x1/0xffffffff\nCOMMIT\n";
    for (user, nat, tables, is_held) in [
        // In DOCKER-USER: a destination dropped, replies from it too, DNS rejected.
        ("-A DOCKER-USER -d 198.51.100.7/32 -j DROP", "", "", true),
        ("-A DOCKER-USER -s 198.51.100.7/32 -j DROP", "", "", true),
        (
            "-A DOCKER-USER -i docker0 -p udp -m udp --dport 53 -j REJECT --reject-with \
             icmp-port-unreachable",
            "",
            "",
            true,
        ),
        // Within the subnet only: never egress (its destination is outside, its replies'
        // source too).
        (
            "-A DOCKER-USER -s 172.17.0.0/16 -d 172.17.0.0/16 -j DROP",
            "",
            "",
            false,
        ),
        // New connections into the bridge: replies are established, requests go out.
        (
            "-A DOCKER-USER -o docker0 -m conntrack --ctstate NEW -j DROP",
            "",
            "",
            false,
        ),
        ("-A DOCKER-USER -i br-other -j DROP", "", "", false),
        ("-A DOCKER-USER -o docker0 -j LOG", "", "", false),
        // Source NAT: to another address, with a port range or random ports, holds it; to the
        // uplink's address it is xbr's own, and another network's is not egress's.
        (
            "",
            "-A POSTROUTING -s 172.17.0.0/16 ! -o docker0 -j SNAT --to-source 203.0.113.9",
            "",
            true,
        ),
        (
            "",
            "-A POSTROUTING -o eth0 -p udp -j SNAT --to-source 192.0.2.10:1024-2047",
            "",
            true,
        ),
        (
            "",
            "-A POSTROUTING -s 172.17.0.0/16 ! -o docker0 -j MASQUERADE --random-fully",
            "",
            true,
        ),
        (
            "",
            "-A POSTROUTING -s 172.17.0.0/16 -o eth0 -j SNAT --to-source 192.0.2.10",
            "",
            false,
        ),
        (
            "",
            "-A POSTROUTING -s 10.99.0.0/16 ! -o br-other -j SNAT --to-source 203.0.113.9",
            "",
            false,
        ),
        // A mark set on what comes in from the bridge.
        ("", "", mangle, true),
    ] {
        let firewall = iptables(&docker0_rules(user, nat, tables));
        let reason = held(&firewall, &docker0());
        assert_eq!(reason.is_some(), is_held, "{user}{nat}{tables}: {reason:?}");
        if let Some(reason) = reason {
            let rule = [user, nat, tables.lines().nth(2).unwrap_or("")]
                .into_iter()
                .find(|rule| !rule.is_empty())
                .unwrap();
            let text = rule.split_once(' ').unwrap().1.split_once(' ').unwrap().1;
            assert!(reason.contains(text), "the reason names `{text}`: {reason}");
        }
    }
}

#[test]
fn an_nft_forward_drop_to_one_destination_holds_egress() {
    let ruleset = |forward: &str, postrouting: &str| {
        format!(
            r#"{{"nftables": [
            {{"table": {{"family": "inet", "name": "filter", "handle": 1}}}},
            {{"chain": {{"family": "inet", "table": "filter", "name": "forward", "handle": 1,
                       "type": "filter", "hook": "forward", "prio": 0, "policy": "accept"}}}},
            {{"rule": {{"family": "inet", "table": "filter", "chain": "forward", "handle": 2,
                      "expr": [{forward}]}}}},
            {{"table": {{"family": "ip", "name": "nat", "handle": 2}}}},
            {{"chain": {{"family": "ip", "table": "nat", "name": "postrouting", "handle": 1,
                       "type": "nat", "hook": "postrouting", "prio": 100,
                       "policy": "accept"}}}},
            {{"rule": {{"family": "ip", "table": "nat", "chain": "postrouting", "handle": 2,
                      "expr": [{{"match": {{"op": "==",
                                          "left": {{"payload": {{"protocol": "ip",
                                                                "field": "saddr"}}}},
                                          "right": {{"prefix": {{"addr": "172.17.0.0",
                                                                "len": 16}}}}}}}},
                               {{"match": {{"op": "==", "left": {{"meta": {{"key": "oifname"}}}},
                                          "right": "eth0"}}}},
                               {postrouting}]}}}}
        ]}}"#
        )
    };
    let daddr_drop = r#"{"match": {"op": "==",
                                   "left": {"payload": {"protocol": "ip", "field": "daddr"}},
                                   "right": "198.51.100.7"}}, {"drop": null}"#;
    let other_bridge_drop = r#"{"match": {"op": "==", "left": {"meta": {"key": "oifname"}},
                                          "right": "br-other"}}, {"drop": null}"#;
    let masquerade = r#"{"masquerade": null}"#;
    let reason = held(&nft(&ruleset(daddr_drop, masquerade)), &docker0())
        .expect("the kernel drops what goes to 198.51.100.7");
    assert!(
        reason.starts_with("`table inet filter` chain forward rule `")
            && reason.contains("198.51.100.7")
            && reason.contains("drops it on the kernel path (forward hook)"),
        "{reason}"
    );
    assert_eq!(
        held(&nft(&ruleset(other_bridge_drop, masquerade)), &docker0()),
        None,
        "the masquerade of the subnet is xbr's own translation"
    );
    let to_uplink = r#"{"snat": {"addr": "192.0.2.10"}}"#;
    assert_eq!(
        held(&nft(&ruleset(other_bridge_drop, to_uplink)), &docker0()),
        None
    );
    let to_another = r#"{"snat": {"addr": "203.0.113.9"}}"#;
    let reason = held(&nft(&ruleset(other_bridge_drop, to_another)), &docker0())
        .expect("xbr would translate to another address");
    assert!(
        reason.contains("`table ip nat` chain postrouting") && reason.contains("translates (snat)"),
        "{reason}"
    );
    let random = r#"{"masquerade": {"flags": ["random"]}}"#;
    assert!(held(&nft(&ruleset(other_bridge_drop, random)), &docker0()).is_some());
}

/// The CNI plugins' fixture without the firewall plugin's FORWARD policy (a network that
/// uses only bridge and portmap), with the bridge plugin's `ipMasq` chain for container
/// 10.252.0.9, its MASQUERADE replaced by `masquerade`.
fn cni_bridge_masquerade(masquerade: &str) -> Firewall {
    let chain = "CNI-4a2e8c61b9f7d3c2a1e0f9d8";
    let comment = "-m comment --comment \"name: \\\"xbrnet\\\" id: \\\"cport\\\"\"";
    let save = super::tests::fixture("cni-plugins.save")
        .replace(":FORWARD DROP", ":FORWARD ACCEPT")
        .replace(
            ":CNI-HOSTPORT-SETMARK - [0:0]\n",
            &format!(":CNI-HOSTPORT-SETMARK - [0:0]\n:{chain} - [0:0]\n"),
        );
    let (before, after) = save.rsplit_once("COMMIT").unwrap();
    let save = format!(
        "{before}-A POSTROUTING -s 10.252.0.9/32 {comment} -j {chain}\n\
         -A {chain} -d 10.252.0.0/24 {comment} -j ACCEPT\n\
         -A {chain} ! -d 224.0.0.0/4 {comment} -j {masquerade}\nCOMMIT{after}"
    );
    iptables(&save)
}

#[test]
fn the_cni_bridge_plugins_masquerade_is_xbrs_own_translation() {
    let cni = egress_on("cni0", "10.252.0.0/24");
    assert_eq!(held(&cni_bridge_masquerade("MASQUERADE"), &cni), None);
    let reason = held(&cni_bridge_masquerade("SNAT --to-source 203.0.113.9"), &cni)
        .expect("a translation to another address than the uplink's");
    assert!(
        reason.contains("chain CNI-4a2e8c61b9f7d3c2a1e0f9d8 rule `! -d 224.0.0.0/4"),
        "{reason}"
    );
}

#[test]
fn the_cni_firewall_plugin_holds_egress_of_containers_without_its_rules() {
    // Its FORWARD rules accept what 10.252.0.9 and 10.252.0.10 send; the policy drops what
    // any other address of the subnet sends, and egress is held per bridge.
    let reason = held(
        &firewall("cni-plugins"),
        &egress_on("cni0", "10.252.0.0/24"),
    )
    .expect("FORWARD's policy drops some containers' egress");
    assert!(
        reason.contains("chain FORWARD policy drop drops it"),
        "{reason}"
    );
    // Portmap's mark and masquerade rules alone hold nothing back.
    assert_eq!(
        held(
            &cni_bridge_masquerade("MASQUERADE"),
            &egress_on("cni0", "10.252.0.0/24")
        ),
        None
    );
}

#[test]
fn an_internal_network_holds_its_egress() {
    // `docker network create --internal` (Docker 20.10): no MASQUERADE, and drops of what
    // its subnet sends elsewhere and of what comes to it from elsewhere.
    let save = docker0_rules("", "", "").replace(
        "-A DOCKER-ISOLATION-STAGE-1 -i docker0",
        "-A DOCKER-ISOLATION-STAGE-1 ! -s 172.19.0.0/16 -o br-int -j DROP\n\
         -A DOCKER-ISOLATION-STAGE-1 ! -d 172.19.0.0/16 -i br-int -j DROP\n\
         -A DOCKER-ISOLATION-STAGE-1 -i docker0",
    );
    let save = save.replace(
        "-A FORWARD -i docker0 -o docker0 -j ACCEPT",
        "-A FORWARD -i docker0 -o docker0 -j ACCEPT\n-A FORWARD -i br-int -o br-int -j ACCEPT",
    );
    let firewall = iptables(&save);
    let reason = held(&firewall, &egress_on("br-int", "172.19.0.0/16"))
        .expect("Docker drops an internal network's egress");
    assert!(
        reason.contains("rule `! -d 172.19.0.0/16 -i br-int -j DROP` drops it"),
        "{reason}"
    );
    assert_eq!(
        held(&firewall, &docker0()),
        None,
        "the internal network's drops touch only its own traffic"
    );
}

#[test]
fn an_unreadable_ruleset_holds_egress() {
    let policy = Policy {
        firewall: Err(ReadError::NotInstalled {
            tool: "nft".to_owned(),
        }),
        icc_off: None,
        ..Policy::default()
    };
    let reason = plan::egress(&policy, &docker0()).expect("nothing can be told");
    assert!(
        reason.contains("cannot be read") && reason.contains("nft is not installed"),
        "{reason}"
    );
}
