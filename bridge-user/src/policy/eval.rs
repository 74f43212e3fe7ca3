//! Walking the ruleset the way the kernel would for the packets of one traffic class at one
//! hook: which rules they meet, and which of those could change their fate (drop, reject,
//! queue, translate, mark, ...). The walk is conservative: where it cannot tell whether a
//! rule matches, it assumes the rule may match some packets; an accept ends the walk only
//! when it takes every packet of the class.

use std::net::IpAddr;

use super::model::{
    Addresses, Chain, ChainType, Condition, ConntrackState, Family, Hook, Layer3, Name, Ports,
    Rule, RuleRef, Ruleset, Statement, Table,
};

/// Jumps nest at most this deep before the walk gives up (and holds the class back).
const MAX_DEPTH: usize = 16;
/// A rule whose values would make more hold-back patterns than this is held back more
/// widely instead: the datapath looks patterns up by hash, one per packet shape.
const MAX_PATTERNS: usize = 256;

/// Whether a rule matches the packets of a class: none, some, or every one of them.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Tri {
    Never,
    Maybe,
    Always,
}

impl Tri {
    fn and(self, other: Tri) -> Tri {
        match (self, other) {
            (Tri::Never, _) | (_, Tri::Never) => Tri::Never,
            (Tri::Always, Tri::Always) => Tri::Always,
            _ => Tri::Maybe,
        }
    }

    fn of_count(hits: usize, of: usize) -> Tri {
        match hits {
            0 => Tri::Never,
            n if n == of => Tri::Always,
            _ => Tri::Maybe,
        }
    }
}

/// The values a field takes for the packets of a class; `None`: any value.
pub type Field<T> = Option<Vec<T>>;

/// The packets of one traffic class at one hook, field by field.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Packets {
    pub layer3: Field<Layer3>,
    /// The empty name where the hook has no such interface (no input interface in
    /// postrouting, for one).
    pub in_interface: Field<String>,
    pub out_interface: Field<String>,
    pub in_bridge_port: Field<String>,
    pub out_bridge_port: Field<String>,
    pub source: Field<IpAddr>,
    /// Addresses the source is known not to be (when `source` is any).
    pub source_is_not: Vec<IpAddr>,
    pub destination: Field<IpAddr>,
    pub protocol: Field<u8>,
    pub source_port: Field<u16>,
    pub destination_port: Field<u16>,
    pub conntrack: Field<ConntrackState>,
    pub dnat: Field<bool>,
    pub local_destination: Field<bool>,
    /// Whether the source is one of the host's own addresses.
    pub local_source: Field<bool>,
}

/// One hook that a traffic class passes on the kernel path.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Traversal {
    pub hook: Hook,
    /// Table families whose base chains at `hook` see these packets.
    pub families: Vec<Family>,
    /// For netdev hooks: the devices the packets pass.
    pub devices: Option<Vec<String>>,
    pub packets: Packets,
    /// Connections' first packets pass here too, so nat chains see them.
    pub first_packets: bool,
    /// A destination NAT to this address and port is the translation xbr makes itself.
    pub own_dnat: Option<(IpAddr, u16)>,
}

/// Which packets a hold-back covers; `None` fields match any value.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Pattern {
    pub layer3: Option<Layer3>,
    pub source: Option<IpAddr>,
    pub destination: Option<IpAddr>,
    /// A prefix the source is in, where the rule names a prefix rather than a host (`source`
    /// is then `None`): kept for published ports' clients, which the datapath can look up by
    /// prefix.
    pub source_prefix: Option<(IpAddr, u8)>,
    pub destination_prefix: Option<(IpAddr, u8)>,
    pub protocol: Option<u8>,
    pub source_port: Option<u16>,
    pub destination_port: Option<u16>,
}

/// Why a rule holds packets back.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Why {
    Drops,
    Rejects,
    Queues,
    /// A translation conntrack would keep: xbr would deliver the packets untranslated.
    Translates(Translation),
    Changes(String),
    /// The chain's policy drops what no rule accepted.
    PolicyDrops,
    /// The walk could not follow the rules (a jump to a chain it does not know, or too deep).
    CannotFollow(String),
}

/// What a NAT rule translates.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Translation {
    /// The destination, to this address and port where the rule says them plainly.
    Destination {
        to: Option<IpAddr>,
        port: Option<u16>,
    },
    /// The source (snat, masquerade), or to the host itself (redirect).
    Other(String),
}

impl std::fmt::Display for Why {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Why::Drops => write!(f, "drops"),
            Why::Rejects => write!(f, "rejects"),
            Why::Queues => write!(f, "queues to userspace"),
            Why::Translates(Translation::Destination { to, port }) => {
                let to = to.map_or("?".to_owned(), |to| to.to_string());
                match port {
                    Some(port) => write!(f, "translates (DNAT to {to}:{port})"),
                    None => write!(f, "translates (DNAT to {to})"),
                }
            }
            Why::Translates(Translation::Other(kind)) => write!(f, "translates ({kind})"),
            Why::Changes(what) => write!(f, "changes ({what})"),
            Why::PolicyDrops => write!(f, "drops what no rule accepts"),
            Why::CannotFollow(what) => write!(f, "cannot be followed ({what})"),
        }
    }
}

/// Packets that must stay on the kernel path, and the rule that keeps them there.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Hold {
    /// Never empty; a whole pattern holds back every packet of the class.
    pub patterns: Vec<Pattern>,
    pub rule: RuleRef,
    pub why: Why,
    pub hook: Hook,
}

/// Every hold-back the ruleset makes for packets passing `traversal`.
pub fn holds(ruleset: &Ruleset, traversal: &Traversal) -> Vec<Hold> {
    let mut holds = Vec::new();
    for table in &ruleset.tables {
        if !traversal.families.contains(&table.family) {
            continue;
        }
        for chain in &table.chains {
            let Some(base) = &chain.base else { continue };
            if base.hook != traversal.hook
                || (base.chain_type == ChainType::Nat && !traversal.first_packets)
            {
                continue;
            }
            if let (Some(chain_devices), Some(ours)) = (&base.devices, &traversal.devices)
                && !chain_devices.iter().any(|device| ours.contains(device))
            {
                continue;
            }
            let mut walk = Walk {
                table,
                traversal,
                holds: &mut holds,
            };
            let end = walk.chain(chain, &mut Vec::new(), 0);
            if end == End::Returns && base.policy_drops {
                walk.hold(&[], chain, None, Why::PolicyDrops);
            }
        }
    }
    holds
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum End {
    /// Every packet that entered the chain got a final verdict there.
    Ends,
    /// Some packets come back out (returned, or fell off the end).
    Returns,
}

struct Walk<'a> {
    table: &'a Table,
    traversal: &'a Traversal,
    holds: &'a mut Vec<Hold>,
}

impl<'a> Walk<'a> {
    /// Walks `chain` for packets that got there through the conditions in `path`.
    fn chain(&mut self, chain: &'a Chain, path: &mut Vec<&'a Condition>, depth: usize) -> End {
        for rule in &chain.rules {
            let matched = rule
                .conditions
                .iter()
                .map(|condition| matches(condition, &self.traversal.packets))
                .fold(Tri::Always, Tri::and);
            if matched == Tri::Never {
                continue;
            }
            let outer = path.len();
            path.extend(rule.conditions.iter());
            let end = self.statements(chain, rule, path, depth);
            path.truncate(outer);
            if let Some(end) = end
                && matched == Tri::Always
            {
                return end;
            }
        }
        End::Returns
    }

    /// Runs a matching rule's statements; `Some` when the rule takes its packets out of the
    /// chain (a verdict), `None` when they go on to the next rule.
    fn statements(
        &mut self,
        chain: &'a Chain,
        rule: &'a Rule,
        path: &mut Vec<&'a Condition>,
        depth: usize,
    ) -> Option<End> {
        for statement in &rule.statements {
            let why = match statement {
                Statement::Observes => continue,
                Statement::Changes(what) => {
                    self.hold(path, chain, Some(rule), Why::Changes(what.clone()));
                    continue;
                }
                Statement::Continue => return None,
                Statement::Accept => return Some(End::Ends),
                Statement::Return => return Some(End::Returns),
                Statement::Drop => Why::Drops,
                Statement::Reject => Why::Rejects,
                Statement::Queue => Why::Queues,
                Statement::Dnat { to: Some(to), port } if self.is_own_dnat(*to, *port) => {
                    return Some(End::Ends);
                }
                Statement::Dnat { to, port } => Why::Translates(Translation::Destination {
                    to: *to,
                    port: *port,
                }),
                Statement::OtherNat(kind) => Why::Translates(Translation::Other(kind.clone())),
                Statement::Jump(target) | Statement::Goto(target) => {
                    let end = self.follow(chain, rule, target, path, depth);
                    return match (statement, end) {
                        // After a jump, packets that come back go on with the next rule.
                        (Statement::Jump(_), End::Returns) => None,
                        // After a goto, they leave this chain too.
                        (_, end) => Some(end),
                    };
                }
            };
            self.hold(path, chain, Some(rule), why);
            return Some(End::Ends);
        }
        None
    }

    fn follow(
        &mut self,
        chain: &'a Chain,
        rule: &'a Rule,
        target: &str,
        path: &mut Vec<&'a Condition>,
        depth: usize,
    ) -> End {
        let why = match self.table.chain(target) {
            Some(_) if depth >= MAX_DEPTH => {
                Why::CannotFollow(format!("jumps nest deeper than {MAX_DEPTH}"))
            }
            Some(next) => return self.chain(next, path, depth + 1),
            None => Why::CannotFollow(format!("no chain {target} in the table")),
        };
        self.hold(path, chain, Some(rule), why);
        End::Ends
    }

    /// Whether a DNAT to `to` (and `port`, or the packet's own) is the translation xbr makes.
    fn is_own_dnat(&self, to: IpAddr, port: Option<u16>) -> bool {
        let original_port = match self.traversal.packets.destination_port.as_deref() {
            Some([port]) => Some(*port),
            _ => None,
        };
        self.traversal
            .own_dnat
            .is_some_and(|own| own.0 == to && port.or(original_port) == Some(own.1))
    }

    fn hold(&mut self, path: &[&Condition], chain: &Chain, rule: Option<&Rule>, why: Why) {
        // Packets that pass this hook are of one layer 3 only, where the class says so.
        let layer3 = match self.traversal.packets.layer3.as_deref() {
            Some([layer3]) => Some(*layer3),
            _ => None,
        };
        let mut patterns = vec![Pattern {
            layer3,
            ..Pattern::default()
        }];
        for condition in path {
            patterns = narrow(patterns, condition);
        }
        if patterns.is_empty() {
            // The conditions contradict each other (or only match what xbr never takes).
            return;
        }
        self.holds.push(Hold {
            patterns,
            rule: RuleRef {
                origin: self.table.origin,
                family: self.table.family,
                table: self.table.name.clone(),
                chain: chain.name.clone(),
                text: rule.map(|rule| rule.text.clone()),
            },
            why,
            hook: self.traversal.hook,
        });
    }
}

/// Whether `condition` matches the packets of a class.
pub fn matches(condition: &Condition, packets: &Packets) -> Tri {
    match condition {
        Condition::InInterface(choice) => test(&packets.in_interface, |v| {
            choice.accepts(&Name(v.clone()), |item, name| item.matches(&name.0))
        }),
        Condition::OutInterface(choice) => test(&packets.out_interface, |v| {
            choice.accepts(&Name(v.clone()), |item, name| item.matches(&name.0))
        }),
        Condition::InBridgePort(choice) => test(&packets.in_bridge_port, |v| {
            choice.accepts(&Name(v.clone()), |item, name| item.matches(&name.0))
        }),
        Condition::OutBridgePort(choice) => test(&packets.out_bridge_port, |v| {
            choice.accepts(&Name(v.clone()), |item, name| item.matches(&name.0))
        }),
        Condition::Layer3(choice) => test(&packets.layer3, |v| choice.accepts(v, |a, b| a == b)),
        Condition::Protocol(choice) => {
            test(&packets.protocol, |v| choice.accepts(v, |a, b| a == b))
        }
        Condition::Source(choice) if only_excluded(choice, &packets.source_is_not) => Tri::Never,
        Condition::Source(choice) => addresses(choice, &packets.source, &packets.layer3),
        Condition::Destination(choice) => addresses(choice, &packets.destination, &packets.layer3),
        Condition::SourcePort(choice) => test(&packets.source_port, |v| {
            choice.accepts(&Ports::one(*v), |item, port| item.contains(port.first))
        }),
        Condition::DestinationPort(choice) => test(&packets.destination_port, |v| {
            choice.accepts(&Ports::one(*v), |item, port| item.contains(port.first))
        }),
        Condition::ConntrackState(choice) => {
            test(&packets.conntrack, |v| choice.accepts(v, |a, b| a == b))
        }
        Condition::ConntrackDnat(wanted) => test(&packets.dnat, |v| v == wanted),
        Condition::LocalDestination(wanted) => test(&packets.local_destination, |v| v == wanted),
        Condition::LocalSource(wanted) => test(&packets.local_source, |v| v == wanted),
        Condition::Unknown(_) => Tri::Maybe,
    }
}

fn test<T>(field: &Field<T>, accepts: impl Fn(&T) -> bool) -> Tri {
    match field {
        None => Tri::Maybe,
        Some(values) => Tri::of_count(values.iter().filter(|v| accepts(v)).count(), values.len()),
    }
}

/// Whether `choice` accepts only addresses from `excluded`.
fn only_excluded(choice: &super::model::Choice<Addresses>, excluded: &[IpAddr]) -> bool {
    !choice.negated
        && !excluded.is_empty()
        && choice
            .any_of
            .iter()
            .all(|item| item.single().is_some_and(|a| excluded.contains(&a)))
}

/// An address match also says which layer 3 it is for: `ip saddr` never matches IPv6.
fn addresses(
    choice: &super::model::Choice<Addresses>,
    field: &Field<IpAddr>,
    layer3: &Field<Layer3>,
) -> Tri {
    let Some(family) = choice.any_of.first().map(Addresses::layer3) else {
        return Tri::Maybe;
    };
    let right_family = test(layer3, |l3| *l3 == family);
    let right_address = test(field, |address| {
        choice.any_of.iter().any(|item| item.contains(address)) != choice.negated
    });
    right_family.and(right_address)
}

/// The patterns `patterns` narrowed by `condition`, where it names values a hold-back can be
/// keyed on; unchanged (wider than the rule, which is safe) where it cannot.
fn narrow(patterns: Vec<Pattern>, condition: &Condition) -> Vec<Pattern> {
    let narrowed = match condition {
        Condition::Layer3(choice) if !choice.negated => {
            let values: Vec<Layer3> = choice
                .any_of
                .iter()
                .copied()
                .filter(|l3| *l3 != Layer3::Other)
                .collect();
            product(&patterns, &values, |p, l3| set(&mut p.layer3, *l3))
        }
        Condition::Source(choice) | Condition::Destination(choice) => {
            let family = choice.any_of.first().map(Addresses::layer3);
            let patterns: Vec<Pattern> = match family {
                Some(family) => product(&patterns, &[family], |p, l3| set(&mut p.layer3, *l3))
                    .unwrap_or_else(|| patterns.clone()),
                None => patterns.clone(),
            };
            let source = matches!(condition, Condition::Source(_));
            let hosts: Option<Vec<IpAddr>> = (!choice.negated)
                .then(|| choice.any_of.iter().map(Addresses::single).collect())
                .flatten();
            let prefixes: Option<Vec<(IpAddr, u8)>> = (!choice.negated)
                .then(|| {
                    choice
                        .any_of
                        .iter()
                        .map(|item| match item {
                            Addresses::Prefix(address, len) => Some((*address, *len)),
                            Addresses::Range(..) => None,
                        })
                        .collect()
                })
                .flatten();
            match (hosts, prefixes) {
                (Some(hosts), _) => product(&patterns, &hosts, |p, host| {
                    let field = if source {
                        &mut p.source
                    } else {
                        &mut p.destination
                    };
                    set(field, *host)
                }),
                (None, Some(prefixes)) => product(&patterns, &prefixes, |p, prefix| {
                    let field = if source {
                        &mut p.source_prefix
                    } else {
                        &mut p.destination_prefix
                    };
                    set(field, *prefix)
                }),
                (None, None) => Some(patterns),
            }
        }
        Condition::Protocol(choice) if !choice.negated => {
            product(&patterns, &choice.any_of, |p, proto| {
                set(&mut p.protocol, *proto)
            })
        }
        Condition::SourcePort(choice) | Condition::DestinationPort(choice) if !choice.negated => {
            let ports: Vec<u16> = choice
                .any_of
                .iter()
                .flat_map(|range| range.first..=range.last)
                .take(MAX_PATTERNS + 1)
                .collect();
            let source = matches!(condition, Condition::SourcePort(_));
            product(&patterns, &ports, |p, port| {
                set(
                    if source {
                        &mut p.source_port
                    } else {
                        &mut p.destination_port
                    },
                    *port,
                )
            })
        }
        _ => None,
    };
    narrowed.unwrap_or(patterns)
}

/// Each pattern combined with each value (`apply` says false where they contradict); `None`
/// when that would make too many patterns.
fn product<T>(
    patterns: &[Pattern],
    values: &[T],
    apply: impl Fn(&mut Pattern, &T) -> bool,
) -> Option<Vec<Pattern>> {
    if patterns.len() * values.len() > MAX_PATTERNS {
        return None;
    }
    let mut out = Vec::new();
    for pattern in patterns {
        for value in values {
            let mut narrowed = *pattern;
            if apply(&mut narrowed, value) && !out.contains(&narrowed) {
                out.push(narrowed);
            }
        }
    }
    Some(out)
}

/// Sets a pattern field; false when it already holds another value (no packet has both).
fn set<T: PartialEq + Copy>(field: &mut Option<T>, value: T) -> bool {
    match field {
        Some(current) => *current == value,
        None => {
            *field = Some(value);
            true
        }
    }
}
