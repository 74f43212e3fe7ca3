//! Walking the ruleset the way the kernel would for the packets of one traffic class at one
//! hook: which rules they meet, and which of those could change their fate (drop, reject,
//! queue, translate, mark, ...). The walk is conservative: where it cannot tell whether a
//! rule matches, it assumes the rule may match some packets; an accept ends the walk only
//! when it takes every packet of the class.

use std::net::IpAddr;

use super::model::{
    Addresses, Chain, ChainType, Choice, Condition, ConntrackState, Family, Hook, Layer3, Name,
    Ports, Rule, RuleRef, Ruleset, Statement, Table,
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

/// An address prefix: the address and the length of its network part in bits.
pub type Prefix = (IpAddr, u8);

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
    /// Where `source` is any: prefixes the source is in (one of them; empty: anywhere)...
    pub source_within: Vec<Prefix>,
    /// ... and prefixes it is known not to be in.
    pub source_outside: Vec<Prefix>,
    pub destination: Field<IpAddr>,
    /// Where `destination` is any: prefixes the destination is in (one of them; empty:
    /// anywhere), and prefixes it is known not to be in.
    pub destination_within: Vec<Prefix>,
    pub destination_outside: Vec<Prefix>,
    pub protocol: Field<u8>,
    pub source_port: Field<u16>,
    pub destination_port: Field<u16>,
    pub conntrack: Field<ConntrackState>,
    pub dnat: Field<bool>,
    pub local_destination: Field<bool>,
    /// Whether the source is one of the host's own addresses.
    pub local_source: Field<bool>,
    /// The packet mark (`meta mark`, `-m mark`).
    pub mark: Field<u32>,
}

impl Packets {
    /// Whether no packet is left: some field has no value at all.
    fn is_empty(&self) -> bool {
        fn none<T>(field: &Field<T>) -> bool {
            field.as_ref().is_some_and(Vec::is_empty)
        }
        none(&self.layer3)
            || none(&self.in_interface)
            || none(&self.out_interface)
            || none(&self.in_bridge_port)
            || none(&self.out_bridge_port)
            || none(&self.source)
            || none(&self.destination)
            || none(&self.protocol)
            || none(&self.source_port)
            || none(&self.destination_port)
            || none(&self.conntrack)
            || none(&self.dnat)
            || none(&self.local_destination)
            || none(&self.local_source)
            || none(&self.mark)
    }
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
    /// A source NAT that is the translation xbr makes itself: a masquerade, or an snat to
    /// one of these addresses (either only changing the address, as the kernel does by
    /// default).
    pub own_snat: Option<Vec<IpAddr>>,
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

impl Pattern {
    /// The same packets' other direction: the replies (or the requests) of their connections.
    pub fn reversed(&self) -> Pattern {
        Pattern {
            layer3: self.layer3,
            source: self.destination,
            destination: self.source,
            source_prefix: self.destination_prefix,
            destination_prefix: self.source_prefix,
            protocol: self.protocol,
            source_port: self.destination_port,
            destination_port: self.source_port,
        }
    }
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
    holds_and_state(ruleset, traversal).0
}

/// `holds`, and whether a rule there decides the class's packets by conntrack state (`ct
/// state`, `ct status`) for some of them and not others: then the kernel path decides packets
/// by what conntrack saw of their connection's other direction.
pub fn holds_and_state(ruleset: &Ruleset, traversal: &Traversal) -> (Vec<Hold>, bool) {
    let mut holds = Vec::new();
    let mut by_state = false;
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
                by_state: &mut by_state,
            };
            let end = walk.chain(chain, traversal.packets.clone(), &mut Vec::new(), 0);
            if let End::Returns(left) = end
                && base.policy_drops
            {
                walk.hold(&[], &left, chain, None, Why::PolicyDrops);
            }
        }
    }
    (holds, by_state)
}

#[derive(Clone, Debug, PartialEq, Eq)]
enum End {
    /// Every packet that entered the chain got a final verdict there.
    Ends,
    /// Some packets come back out (returned, or fell off the end): at most these.
    Returns(Box<Packets>),
}

/// The packets that come back out of a chain: exactly those of one rule that returns some
/// (or of its end), or, where several do, at most those that reached the first of them
/// (later rules see fewer).
#[derive(Default)]
struct Returned {
    first: Option<Packets>,
    reached_first: Option<Packets>,
    more: bool,
}

impl Returned {
    /// `back` returned by a rule that `reached` got to.
    fn add(&mut self, back: Packets, reached: &Packets) {
        if self.first.is_some() {
            self.more = true;
        } else {
            self.first = Some(back);
            self.reached_first = Some(reached.clone());
        }
    }

    fn end(self) -> End {
        match (self.first, self.more) {
            (None, _) => End::Ends,
            (Some(back), false) => End::Returns(Box::new(back)),
            (Some(_), true) => End::Returns(Box::new(self.reached_first.unwrap_or_default())),
        }
    }
}

/// Where a rule sends the packets it matched.
#[derive(Clone, Debug, PartialEq, Eq)]
enum Next {
    /// On to the next rule.
    On,
    /// On to the next rule, after a jump whose chain kept only these of them.
    OnAs(Box<Packets>),
    /// Out of this chain.
    Leaves(End),
}

struct Walk<'a> {
    table: &'a Table,
    traversal: &'a Traversal,
    holds: &'a mut Vec<Hold>,
    /// A rule that may change a packet's fate matched on conntrack state, and some of the
    /// class's packets and not others were in that state.
    by_state: &'a mut bool,
}

impl<'a> Walk<'a> {
    /// Walks `chain` for `packets` (those that got there through the conditions in `path`).
    ///
    /// A rule that takes the packets it matches out of the chain (accept, drop, a jump to a
    /// chain that decides them all) leaves the following rules only the rest. Where the rule
    /// may match some of the class's packets and not others through one field only (`ip saddr
    /// 10.0.0.2 accept` of packets from three containers), the rest is known exactly (the other
    /// two sources), and later rules, and the chain's policy, are decided for it alone.
    fn chain(
        &mut self,
        chain: &'a Chain,
        mut packets: Packets,
        path: &mut Vec<&'a Condition>,
        depth: usize,
    ) -> End {
        let mut returned = Returned::default();
        for rule in &chain.rules {
            let matched = rule
                .conditions
                .iter()
                .map(|condition| matches(condition, &packets))
                .fold(Tri::Always, Tri::and);
            if matched == Tri::Never {
                continue;
            }
            if rule.statements.iter().any(|s| *s != Statement::Observes)
                && rule.conditions.iter().any(|condition| {
                    matches!(
                        condition,
                        Condition::ConntrackState(_) | Condition::ConntrackDnat(_)
                    ) && matches(condition, &packets) == Tri::Maybe
                })
            {
                *self.by_state = true;
            }
            let outer = path.len();
            path.extend(rule.conditions.iter());
            let next = self.statements(chain, rule, &packets, path, depth);
            path.truncate(outer);
            let end = match next {
                Next::On => continue,
                Next::OnAs(kept) => {
                    if matched == Tri::Always {
                        packets = *kept;
                    }
                    continue;
                }
                Next::Leaves(end) => end,
            };
            if let End::Returns(back) = end {
                returned.add(*back, &packets);
            }
            if matched == Tri::Always {
                return returned.end();
            }
            if let Some(rest) = without(&packets, &rule.conditions) {
                // A class described with no values at all (a published port without uplinks)
                // is walked as before; one whose last packets the rule took is done.
                let emptied = rest.is_empty() && !packets.is_empty();
                packets = rest;
                if emptied {
                    return returned.end();
                }
            }
        }
        let fell_off = packets.clone();
        returned.add(fell_off, &packets);
        returned.end()
    }

    /// Runs a matching rule's statements for `packets`.
    fn statements(
        &mut self,
        chain: &'a Chain,
        rule: &'a Rule,
        packets: &Packets,
        path: &mut Vec<&'a Condition>,
        depth: usize,
    ) -> Next {
        for statement in &rule.statements {
            let why = match statement {
                Statement::Observes => continue,
                Statement::Changes(what) => {
                    self.hold(path, packets, chain, Some(rule), Why::Changes(what.clone()));
                    continue;
                }
                Statement::Continue => return Next::On,
                Statement::Accept => return Next::Leaves(End::Ends),
                Statement::Return => {
                    return Next::Leaves(End::Returns(Box::new(within(packets, &rule.conditions))));
                }
                Statement::Drop => Why::Drops,
                Statement::Reject => Why::Rejects,
                Statement::Queue => Why::Queues,
                Statement::Dnat { to: Some(to), port } if self.is_own_dnat(*to, *port) => {
                    return Next::Leaves(End::Ends);
                }
                Statement::Dnat { to, port } => Why::Translates(Translation::Destination {
                    to: *to,
                    port: *port,
                }),
                Statement::Snat {
                    masquerade,
                    to,
                    plain: true,
                    ..
                } if self.is_own_snat(*masquerade, *to) => {
                    return Next::Leaves(End::Ends);
                }
                Statement::Snat { kind, .. } | Statement::OtherNat(kind) => {
                    Why::Translates(Translation::Other(kind.clone()))
                }
                Statement::Jump(target) | Statement::Goto(target) => {
                    let entering = within(packets, &rule.conditions);
                    let end = self.follow(chain, rule, target, entering, path, depth);
                    return match (statement, end) {
                        // After a jump, packets that come back go on with the next rule.
                        (Statement::Jump(_), End::Returns(back)) => Next::OnAs(back),
                        // After a goto, they leave this chain too.
                        (_, end) => Next::Leaves(end),
                    };
                }
            };
            self.hold(path, packets, chain, Some(rule), why);
            return Next::Leaves(End::Ends);
        }
        Next::On
    }

    fn follow(
        &mut self,
        chain: &'a Chain,
        rule: &'a Rule,
        target: &str,
        packets: Packets,
        path: &mut Vec<&'a Condition>,
        depth: usize,
    ) -> End {
        let why = match self.table.chain(target) {
            Some(_) if depth >= MAX_DEPTH => {
                Why::CannotFollow(format!("jumps nest deeper than {MAX_DEPTH}"))
            }
            Some(next) => return self.chain(next, packets, path, depth + 1),
            None => Why::CannotFollow(format!("no chain {target} in the table")),
        };
        self.hold(path, &packets, chain, Some(rule), why);
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

    /// Whether a plain source NAT (a masquerade, or to `to`) is the translation xbr makes.
    fn is_own_snat(&self, masquerade: bool, to: Option<IpAddr>) -> bool {
        self.traversal
            .own_snat
            .as_ref()
            .is_some_and(|own| masquerade || to.is_some_and(|to| own.contains(&to)))
    }

    /// Holds back `packets` (what reached the rule of the class's packets; earlier rules may
    /// have taken some) that match every condition of `path`.
    fn hold(
        &mut self,
        path: &[&Condition],
        packets: &Packets,
        chain: &Chain,
        rule: Option<&Rule>,
        why: Why,
    ) {
        // Packets that pass this hook are of one layer 3 only, where the class says so.
        let layer3 = match self.traversal.packets.layer3.as_deref() {
            Some([layer3]) => Some(*layer3),
            _ => None,
        };
        let mut patterns = vec![Pattern {
            layer3,
            ..Pattern::default()
        }];
        for condition in path
            .iter()
            .copied()
            .chain(&left_of(&self.traversal.packets, packets))
        {
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
        Condition::Source(choice) => addresses(
            choice,
            &packets.source,
            (&packets.source_within, &packets.source_outside),
            &packets.layer3,
        ),
        Condition::Destination(choice) => addresses(
            choice,
            &packets.destination,
            (&packets.destination_within, &packets.destination_outside),
            &packets.layer3,
        ),
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
        Condition::Mark {
            value,
            mask,
            negated,
        } => test(&packets.mark, |mark| ((mark & mask) == *value) != *negated),
        Condition::Unknown(_) => Tri::Maybe,
    }
}

/// The packets of `packets` that do not match `conditions`, where that is known exactly:
/// every condition but one matches all of them, and that one tests a field whose values
/// are listed. `None` otherwise (then the rest is taken to be all of `packets`, more).
fn without(packets: &Packets, conditions: &[Condition]) -> Option<Packets> {
    let mut deciding = conditions
        .iter()
        .filter(|condition| matches(condition, packets) != Tri::Always);
    let condition = deciding.next()?;
    if deciding.next().is_some() {
        return None;
    }
    Some(keep(packets, condition, |tri| tri != Tri::Always))
}

/// The packets of `packets` that may match every one of `conditions` (more where a condition
/// tests several fields or one whose values are not listed).
fn within(packets: &Packets, conditions: &[Condition]) -> Packets {
    conditions
        .iter()
        .fold(packets.clone(), |packets, condition| {
            keep(&packets, condition, |tri| tri != Tri::Never)
        })
}

/// `packets` with the values of the field `condition` tests filtered by `wanted` (how the
/// condition matches packets with that one value); unchanged where the values are any.
fn keep(packets: &Packets, condition: &Condition, wanted: impl Fn(Tri) -> bool) -> Packets {
    fn filter<T: Clone>(
        packets: &Packets,
        condition: &Condition,
        wanted: impl Fn(Tri) -> bool,
        field: fn(&mut Packets) -> &mut Field<T>,
    ) -> Packets {
        let mut rest = packets.clone();
        let Some(values) = field(&mut rest).clone() else {
            return rest;
        };
        let kept = values
            .into_iter()
            .filter(|value| {
                let mut one = packets.clone();
                *field(&mut one) = Some(vec![value.clone()]);
                wanted(matches(condition, &one))
            })
            .collect();
        *field(&mut rest) = Some(kept);
        rest
    }
    match condition {
        Condition::InInterface(_) => filter(packets, condition, wanted, |p| &mut p.in_interface),
        Condition::OutInterface(_) => filter(packets, condition, wanted, |p| &mut p.out_interface),
        Condition::InBridgePort(_) => filter(packets, condition, wanted, |p| &mut p.in_bridge_port),
        Condition::OutBridgePort(_) => {
            filter(packets, condition, wanted, |p| &mut p.out_bridge_port)
        }
        Condition::Layer3(_) => filter(packets, condition, wanted, |p| &mut p.layer3),
        Condition::Protocol(_) => filter(packets, condition, wanted, |p| &mut p.protocol),
        Condition::Source(_) => filter(packets, condition, wanted, |p| &mut p.source),
        Condition::Destination(_) => filter(packets, condition, wanted, |p| &mut p.destination),
        Condition::SourcePort(_) => filter(packets, condition, wanted, |p| &mut p.source_port),
        Condition::DestinationPort(_) => {
            filter(packets, condition, wanted, |p| &mut p.destination_port)
        }
        Condition::ConntrackState(_) => filter(packets, condition, wanted, |p| &mut p.conntrack),
        Condition::ConntrackDnat(_) => filter(packets, condition, wanted, |p| &mut p.dnat),
        Condition::LocalDestination(_) => {
            filter(packets, condition, wanted, |p| &mut p.local_destination)
        }
        Condition::LocalSource(_) => filter(packets, condition, wanted, |p| &mut p.local_source),
        Condition::Mark { .. } => filter(packets, condition, wanted, |p| &mut p.mark),
        Condition::Unknown(_) => packets.clone(),
    }
}

/// Where earlier rules took some of a class's packets (`class`) and left `left`: conditions
/// that name what is left, for hold-backs (addresses, protocols and ports only: what a
/// hold-back can be keyed on).
fn left_of(class: &Packets, left: &Packets) -> Vec<Condition> {
    let mut conditions = Vec::new();
    if let (Some(values), true) = (&left.source, left.source != class.source) {
        let hosts = values.iter().map(|a| Addresses::host(*a)).collect();
        conditions.push(Condition::Source(Choice::one_of(hosts, false)));
    }
    if let (Some(values), true) = (&left.destination, left.destination != class.destination) {
        let hosts = values.iter().map(|a| Addresses::host(*a)).collect();
        conditions.push(Condition::Destination(Choice::one_of(hosts, false)));
    }
    if let (Some(values), true) = (&left.protocol, left.protocol != class.protocol) {
        conditions.push(Condition::Protocol(Choice::one_of(values.clone(), false)));
    }
    if let (Some(values), true) = (&left.source_port, left.source_port != class.source_port) {
        let ports = values.iter().map(|p| Ports::one(*p)).collect();
        conditions.push(Condition::SourcePort(Choice::one_of(ports, false)));
    }
    if let (Some(values), true) = (
        &left.destination_port,
        left.destination_port != class.destination_port,
    ) {
        let ports = values.iter().map(|p| Ports::one(*p)).collect();
        conditions.push(Condition::DestinationPort(Choice::one_of(ports, false)));
    }
    conditions
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
/// Where the addresses are any, the prefixes they are known to be in (or not in) decide it.
fn addresses(
    choice: &super::model::Choice<Addresses>,
    field: &Field<IpAddr>,
    (within, outside): (&[Prefix], &[Prefix]),
    layer3: &Field<Layer3>,
) -> Tri {
    let Some(family) = choice.any_of.first().map(Addresses::layer3) else {
        return Tri::Maybe;
    };
    let right_family = test(layer3, |l3| *l3 == family);
    let right_address = match field {
        Some(_) => test(field, |address| {
            choice.any_of.iter().any(|item| item.contains(address)) != choice.negated
        }),
        None => in_prefixes(choice, within, outside),
    };
    right_family.and(right_address)
}

/// Whether `choice` accepts addresses known only to be in one of `within` (when it has
/// any) and in none of `outside`.
fn in_prefixes(
    choice: &super::model::Choice<Addresses>,
    within: &[Prefix],
    outside: &[Prefix],
) -> Tri {
    // Whether the addresses are in the choice's items: all of them, none, or some.
    let items: Vec<Span> = choice.any_of.iter().map(Span::of).collect();
    let listed = if within.is_empty() {
        // Anywhere but `outside`: in no item where every item is in an outside prefix.
        let outside: Vec<Span> = outside.iter().map(|p| Span::prefix(*p)).collect();
        let all_outside = items
            .iter()
            .all(|item| outside.iter().any(|o| o.contains(item)));
        if all_outside && !outside.is_empty() {
            Tri::Never
        } else {
            Tri::Maybe
        }
    } else {
        let each = within.iter().map(|prefix| {
            let prefix = Span::prefix(*prefix);
            if items.iter().any(|item| item.contains(&prefix)) {
                Tri::Always
            } else if items.iter().all(|item| !item.overlaps(&prefix)) {
                Tri::Never
            } else {
                Tri::Maybe
            }
        });
        each.reduce(|a, b| if a == b { a } else { Tri::Maybe })
            .unwrap_or(Tri::Maybe)
    };
    match (listed, choice.negated) {
        (Tri::Always, false) | (Tri::Never, true) => Tri::Always,
        (Tri::Never, false) | (Tri::Always, true) => Tri::Never,
        _ => Tri::Maybe,
    }
}

/// Addresses from `first` to `last`, of one layer 3 (IPv4 as the low 32 bits).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct Span {
    v4: bool,
    first: u128,
    last: u128,
}

impl Span {
    fn of(addresses: &Addresses) -> Span {
        match *addresses {
            Addresses::Prefix(address, len) => Span::prefix((address, len)),
            Addresses::Range(first, last) => Span {
                v4: first.is_ipv4(),
                first: Span::number(first),
                last: Span::number(last),
            },
        }
    }

    fn prefix((address, len): Prefix) -> Span {
        let bits: u32 = if address.is_ipv4() { 32 } else { 128 };
        let host_bits = bits - u32::from(len).min(bits);
        let hosts = if host_bits == 128 {
            u128::MAX
        } else {
            (1u128 << host_bits) - 1
        };
        let first = Span::number(address) & !hosts;
        Span {
            v4: address.is_ipv4(),
            first,
            last: first | hosts,
        }
    }

    fn number(address: IpAddr) -> u128 {
        match address {
            IpAddr::V4(a) => u32::from(a).into(),
            IpAddr::V6(a) => a.into(),
        }
    }

    fn contains(&self, other: &Span) -> bool {
        self.v4 == other.v4 && self.first <= other.first && other.last <= self.last
    }

    fn overlaps(&self, other: &Span) -> bool {
        self.v4 == other.v4 && self.first <= other.last && other.first <= self.last
    }
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
