//! Planning what the policy reader says: east-west hold-backs become `HOLDS` keys (or, when a
//! rule could touch all of it, no endpoints at all), a published port's hold-backs become its
//! flags and `CLIENT_HOLDS` keys. Pure, like the rest of the plan.

use std::{
    collections::BTreeMap,
    net::{IpAddr, Ipv4Addr},
};

use bridge_common::{
    ClientHoldKey, ClientPrefix, HoldKey, IPPROTO_TCP, IPPROTO_UDP, MAX_CLIENT_HOLDS, MAX_HOLDS,
    PublishedKey, PublishedPort,
};

use crate::policy::{self, Firewall, Pattern, ReadError, model::Layer3};

/// Transport protocols with ports that the datapath does not read: a hold-back on their
/// ports holds back the whole protocol.
const OTHER_PORT_PROTOCOLS: [u8; 3] = [132, 33, 136]; // SCTP, DCCP, UDP-Lite
/// A published port with more held clients than this is held whole.
const MAX_CLIENTS_PER_PORT: usize = 256;

/// What the kernel path's own rules say, as read now.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Policy {
    /// The namespace's netfilter state, or why it cannot be read (then nothing may take the
    /// fast path: xbr cannot tell what the rules would drop).
    pub firewall: std::result::Result<Firewall, ReadError>,
    /// Docker's `enable_icc=false` on the bridge's network: no east-west traffic at all.
    pub icc_off: Option<String>,
    /// Container MACs that stay off the fast path, each with why (an overlay network's load
    /// balancer endpoint).
    pub held_endpoints: BTreeMap<[u8; 6], String>,
}

impl Policy {
    /// Whether there are rules to honour (or the ruleset cannot be read).
    pub fn has_rules(&self) -> bool {
        self.firewall
            .as_ref()
            .map_or(true, |firewall| !firewall.ruleset.tables.is_empty())
    }
}

impl Default for Policy {
    /// No rules: everything the datapath understands may take the fast path.
    fn default() -> Policy {
        Policy {
            firewall: Ok(Firewall::default()),
            icc_off: None,
            held_endpoints: BTreeMap::new(),
        }
    }
}

/// East-west frames the policy keeps on the kernel path.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct EastWest {
    /// Why no east-west frame may take the fast path, when none may.
    pub off: Option<String>,
    /// Otherwise the frames held back, as `HOLDS` keys, each with its reason.
    pub holds: BTreeMap<HoldKey, String>,
    /// The same hold-backs as people read them: (packets, reason).
    pub held: Vec<(String, String)>,
}

/// `own_ipv4`: the containers' IPv4 addresses, when the datapath checks that each container
/// sends from its own and receives at its own (`Endpoint::CHECK_IPV4`).
pub fn east_west(
    policy: &Policy,
    bridge: &str,
    ports: &[String],
    own_ipv4: Option<&[Ipv4Addr]>,
) -> EastWest {
    if let Some(reason) = &policy.icc_off {
        return EastWest::off(reason.clone());
    }
    let firewall = match &policy.firewall {
        Ok(firewall) => firewall,
        Err(why) => return EastWest::off(unreadable(why)),
    };
    let mut plan = EastWest::default();
    let bridge = policy::Bridge {
        name: bridge,
        ports,
        own_ipv4,
    };
    // A rule that holds back all of one family's traffic: both families -> none at all.
    let mut family_wide = [None, None];
    for hold in policy::east_west(firewall, &bridge) {
        let reason = hold.to_string();
        for pattern in &hold.patterns {
            // From a container's own address to the same address: no frame between two
            // ports is that, when the datapath checks the addresses (Docker's self-hairpin
            // MASQUERADE rules are such patterns).
            let to_itself = pattern.source.is_some() && pattern.source == pattern.destination;
            if own_ipv4.is_some() && to_itself && pattern.source.is_some_and(|a| a.is_ipv4()) {
                continue;
            }
            plan.held.push((pattern.to_string(), reason.clone()));
            for key in hold_keys(pattern) {
                if key.shape == 0 {
                    family_wide[usize::from(key.family == 6)].get_or_insert(reason.clone());
                }
                plan.holds.entry(key).or_insert_with(|| reason.clone());
            }
        }
    }
    if let [Some(reason), Some(_)] = family_wide {
        return EastWest::off(reason);
    }
    if plan.holds.len() > MAX_HOLDS as usize {
        return EastWest::off(format!(
            "the rules make {} hold-backs, more than the datapath's {MAX_HOLDS}",
            plan.holds.len()
        ));
    }
    plan
}

impl EastWest {
    fn off(reason: String) -> EastWest {
        EastWest {
            off: Some(reason),
            ..EastWest::default()
        }
    }
}

fn unreadable(why: &ReadError) -> String {
    format!("the netfilter ruleset cannot be read ({why}), so xbr cannot tell what it drops")
}

/// A pattern as `HOLDS` keys: one per family (and protocol, where ports are named without
/// one). Ports are kept for TCP and UDP only, the protocols whose ports the datapath reads.
pub fn hold_keys(pattern: &Pattern) -> Vec<HoldKey> {
    let families: Vec<u8> = match (pattern.layer3, pattern.source.or(pattern.destination)) {
        (Some(Layer3::V4), _) | (None, Some(IpAddr::V4(_))) => vec![4],
        (Some(Layer3::V6), _) | (None, Some(IpAddr::V6(_))) => vec![6],
        (Some(Layer3::Other), _) => vec![],
        (None, None) => vec![4, 6],
    };
    let has_ports = pattern.source_port.is_some() || pattern.destination_port.is_some();
    let protocols: Vec<(Option<u8>, bool)> = match pattern.protocol {
        Some(protocol @ (IPPROTO_TCP | IPPROTO_UDP)) => vec![(Some(protocol), true)],
        Some(protocol) => vec![(Some(protocol), false)],
        None if has_ports => [IPPROTO_TCP, IPPROTO_UDP]
            .into_iter()
            .map(|p| (Some(p), true))
            .chain(OTHER_PORT_PROTOCOLS.into_iter().map(|p| (Some(p), false)))
            .collect(),
        None => vec![(None, false)],
    };
    let mut keys = Vec::new();
    for family in families {
        for (protocol, with_ports) in &protocols {
            let mut key = HoldKey {
                family,
                ..HoldKey::default()
            };
            if let Some(protocol) = protocol {
                key.shape |= HoldKey::PROTOCOL;
                key.protocol = *protocol;
            }
            let address = |address: Option<IpAddr>| -> Option<Option<[u8; 16]>> {
                match (address, family) {
                    (None, _) => Some(None),
                    (Some(IpAddr::V4(a)), 4) => {
                        let mut wide = [0; 16];
                        wide[..4].copy_from_slice(&a.octets());
                        Some(Some(wide))
                    }
                    (Some(IpAddr::V6(a)), 6) => Some(Some(a.octets())),
                    // An address of the other family: no frame of this family matches.
                    _ => None,
                }
            };
            let (Some(source), Some(destination)) =
                (address(pattern.source), address(pattern.destination))
            else {
                continue;
            };
            if let Some(source) = source {
                key.shape |= HoldKey::SOURCE;
                key.source = source;
            }
            if let Some(destination) = destination {
                key.shape |= HoldKey::DESTINATION;
                key.destination = destination;
            }
            if *with_ports {
                if let Some(port) = pattern.source_port {
                    key.shape |= HoldKey::SOURCE_PORT;
                    key.source_port = port.to_be_bytes();
                }
                if let Some(port) = pattern.destination_port {
                    key.shape |= HoldKey::DESTINATION_PORT;
                    key.destination_port = port.to_be_bytes();
                }
            }
            keys.push(key);
        }
    }
    keys
}

/// The bits of `HOLD_SHAPES` for `keys`: per family (0: IPv4, 1: IPv6), one per shape.
pub fn hold_shapes<'a>(keys: impl IntoIterator<Item = &'a HoldKey>) -> [u32; 2] {
    let mut shapes = [0; 2];
    for key in keys {
        shapes[usize::from(key.family == 6)] |= 1 << key.shape;
    }
    shapes
}

/// What the policy says about one published port.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct PublishedPolicy {
    /// Why no connection to it may take the fast path, when none may.
    pub held: Option<String>,
    /// Otherwise the clients held back by port (and address), each with its reason...
    pub clients: BTreeMap<ClientHoldKey, String>,
    /// ...and by address prefix: (prefix data, length in bits of the client address).
    pub client_prefixes: BTreeMap<(ClientPrefix, u8), String>,
    /// Why the host's own clients of the port must not be pointed at the container by the
    /// socket hooks, when they must not.
    pub host_clients_held: Option<String>,
}

impl PublishedPolicy {
    /// Its `PublishedPort` flags (`HELD`, `CLIENT_HOLDS`).
    pub fn flags(&self) -> u8 {
        let uplink_clients = if self.held.is_some() {
            PublishedPort::HELD
        } else if !self.clients.is_empty() || !self.client_prefixes.is_empty() {
            PublishedPort::CLIENT_HOLDS
        } else {
            0
        };
        let host_clients = if self.host_clients_held.is_some() {
            PublishedPort::HOST_CLIENTS_HELD
        } else {
            0
        };
        uplink_clients | host_clients
    }
}

/// A published port on `bridge`: the container's port (by name, `None` when no container has
/// the address now) and the uplinks its clients come in on.
pub struct PublishedPlace<'a> {
    pub bridge: &'a str,
    pub port_name: Option<&'a str>,
    pub uplinks: &'a [String],
}

pub fn published(
    policy: &Policy,
    key: &PublishedKey,
    value: &PublishedPort,
    place: &PublishedPlace,
) -> PublishedPolicy {
    let firewall = match &policy.firewall {
        Ok(firewall) => firewall,
        Err(why) => {
            return PublishedPolicy {
                held: Some(unreadable(why)),
                host_clients_held: Some(unreadable(why)),
                ..PublishedPolicy::default()
            };
        }
    };
    let published = policy::Published {
        bridge: place.bridge,
        uplinks: place.uplinks,
        port_name: place.port_name,
        protocol: key.proto,
        host_ip: (key.host_ip != [0; 4]).then(|| Ipv4Addr::from(key.host_ip)),
        host_port: u16::from_be_bytes(key.host_port),
        container_ip: Ipv4Addr::from(value.container_ip),
        container_port: u16::from_be_bytes(value.container_port),
    };
    let host_clients_held = policy::host_clients(firewall, &published).map(|hold| hold.to_string());
    let holds = policy::published(firewall, &published);
    if let Some(hold) = holds.whole {
        return PublishedPolicy {
            held: Some(hold.to_string()),
            host_clients_held,
            ..PublishedPolicy::default()
        };
    }
    let mut clients = BTreeMap::new();
    let mut client_prefixes = BTreeMap::new();
    for (client, hold) in holds.clients {
        match (client.address, client.port) {
            // One address and port, or one port: the hash.
            (Some((address, 32)), Some(port)) => {
                let client_key = ClientHoldKey {
                    published: *key,
                    client_ip: address.octets(),
                    client_port: port.to_be_bytes(),
                    shape: ClientHoldKey::ADDRESS | ClientHoldKey::PORT,
                    _pad: 0,
                };
                clients
                    .entry(client_key)
                    .or_insert_with(|| hold.to_string());
            }
            (None, Some(port)) => {
                let client_key = ClientHoldKey {
                    published: *key,
                    client_port: port.to_be_bytes(),
                    shape: ClientHoldKey::PORT,
                    ..ClientHoldKey::default()
                };
                clients
                    .entry(client_key)
                    .or_insert_with(|| hold.to_string());
            }
            // An address or a prefix (with a port only for one address: a prefix holds back
            // all of its clients' ports, more than the rule, never less): the trie.
            (Some((address, len)), _) => {
                let prefix = ClientPrefix {
                    published: *key,
                    client_ip: mask(address, len),
                };
                client_prefixes
                    .entry((prefix, len))
                    .or_insert_with(|| hold.to_string());
            }
            (None, None) => unreachable!("a hold-back of every client is a whole one"),
        }
    }
    let count = clients.len() + client_prefixes.len();
    if count > MAX_CLIENTS_PER_PORT.min(MAX_CLIENT_HOLDS as usize) {
        return PublishedPolicy {
            held: Some(format!(
                "rules hold back {count} kinds of client, more than xbr tracks per port"
            )),
            host_clients_held,
            ..PublishedPolicy::default()
        };
    }
    PublishedPolicy {
        held: None,
        clients,
        client_prefixes,
        host_clients_held,
    }
}

/// Why a bridge's egress must stay on the kernel path: the first rule on the hooks it
/// skips that could change its fate, or why the ruleset cannot be read (`None`: it may take
/// the fast path). The datapath holds egress per bridge as a whole, so one reason is enough.
pub fn egress(policy: &Policy, egress: &policy::Egress) -> Option<String> {
    match &policy.firewall {
        Ok(firewall) => policy::egress(firewall, egress)
            .first()
            .map(|hold| hold.to_string()),
        Err(why) => Some(unreadable(why)),
    }
}

/// `address` with the bits past a /`len` prefix cleared, as an LPM trie keeps it.
fn mask(address: Ipv4Addr, len: u8) -> [u8; 4] {
    let bits = u32::from(address);
    let kept = if len == 0 {
        0
    } else {
        bits & (u32::MAX << (32 - u32::from(len.min(32))))
    };
    kept.to_be_bytes()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn v4(a: &str) -> Option<IpAddr> {
        Some(a.parse().unwrap())
    }

    #[test]
    fn an_exact_pattern_is_one_key() {
        let keys = hold_keys(&Pattern {
            layer3: Some(Layer3::V4),
            source: v4("10.0.0.2"),
            destination: v4("10.0.0.4"),
            protocol: Some(IPPROTO_UDP),
            destination_port: Some(7000),
            ..Pattern::default()
        });
        assert_eq!(keys.len(), 1);
        let key = keys[0];
        assert_eq!(
            key.shape,
            HoldKey::SOURCE | HoldKey::DESTINATION | HoldKey::PROTOCOL | HoldKey::DESTINATION_PORT
        );
        assert_eq!(&key.source[..4], &[10, 0, 0, 2]);
        assert_eq!(key.destination_port, 7000u16.to_be_bytes());
    }

    #[test]
    fn ports_without_a_protocol_hold_tcp_and_udp_ports_and_the_rest_whole() {
        let keys = hold_keys(&Pattern {
            layer3: Some(Layer3::V4),
            destination_port: Some(53),
            ..Pattern::default()
        });
        let shapes: Vec<(u8, u8)> = keys.iter().map(|k| (k.protocol, k.shape)).collect();
        assert_eq!(
            shapes,
            vec![
                (IPPROTO_TCP, HoldKey::PROTOCOL | HoldKey::DESTINATION_PORT),
                (IPPROTO_UDP, HoldKey::PROTOCOL | HoldKey::DESTINATION_PORT),
                (132, HoldKey::PROTOCOL),
                (33, HoldKey::PROTOCOL),
                (136, HoldKey::PROTOCOL),
            ]
        );
    }

    #[test]
    fn a_pattern_without_a_family_is_one_key_per_family() {
        let keys = hold_keys(&Pattern {
            protocol: Some(58),
            ..Pattern::default()
        });
        assert_eq!(
            keys.iter().map(|k| k.family).collect::<Vec<_>>(),
            vec![4, 6]
        );
        assert_eq!(
            hold_shapes(&keys),
            [1 << HoldKey::PROTOCOL, 1 << HoldKey::PROTOCOL]
        );
    }

    #[test]
    fn an_unreadable_ruleset_turns_everything_off() {
        let policy = Policy {
            firewall: Err(ReadError::NotInstalled {
                tool: "nft".to_owned(),
            }),
            icc_off: None,
            ..Policy::default()
        };
        let plan = east_west(&policy, "br0", &[], None);
        assert!(plan.off.unwrap().contains("nft is not installed"));
        let published = published(
            &policy,
            &PublishedKey::default(),
            &PublishedPort::default(),
            &PublishedPlace {
                bridge: "br0",
                port_name: None,
                uplinks: &[],
            },
        );
        assert_eq!(
            published.flags(),
            PublishedPort::HELD | PublishedPort::HOST_CLIENTS_HELD
        );
    }
}
