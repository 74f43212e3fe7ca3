//! The netfilter ruleset of one namespace as xbr reasons about it: tables, their base chains
//! by hook and priority, and rules reduced to the conditions and statements that can decide a
//! packet's fate. Both readers (nftables' JSON and iptables-save) produce this model.

use std::{fmt, net::IpAddr};

#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Family {
    Ip,
    Ip6,
    Inet,
    Bridge,
    Netdev,
    Arp,
}

impl Family {
    pub fn name(self) -> &'static str {
        match self {
            Family::Ip => "ip",
            Family::Ip6 => "ip6",
            Family::Inet => "inet",
            Family::Bridge => "bridge",
            Family::Netdev => "netdev",
            Family::Arp => "arp",
        }
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Hook {
    Prerouting,
    Input,
    Forward,
    Output,
    Postrouting,
    Ingress,
    Egress,
}

impl Hook {
    pub fn name(self) -> &'static str {
        match self {
            Hook::Prerouting => "prerouting",
            Hook::Input => "input",
            Hook::Forward => "forward",
            Hook::Output => "output",
            Hook::Postrouting => "postrouting",
            Hook::Ingress => "ingress",
            Hook::Egress => "egress",
        }
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ChainType {
    Filter,
    /// Consulted for the first packet of a connection only (conntrack applies the result to
    /// the rest).
    Nat,
    Route,
}

/// Which tool's view of a table xbr read.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Origin {
    /// `nft -j list ruleset`.
    Nftables,
    /// `iptables-save` / `ip6tables-save` of the nf_tables backend: tables whose rules use
    /// xtables extensions, which nft's JSON shows only by name.
    IptablesNft,
    /// `iptables-legacy-save` / `ip6tables-legacy-save`.
    IptablesLegacy,
}

impl Origin {
    pub fn name(self) -> &'static str {
        match self {
            Origin::Nftables => "nftables",
            Origin::IptablesNft => "iptables",
            Origin::IptablesLegacy => "iptables-legacy",
        }
    }
}

#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Ruleset {
    pub tables: Vec<Table>,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Table {
    pub family: Family,
    pub name: String,
    pub origin: Origin,
    pub chains: Vec<Chain>,
}

impl Table {
    pub fn chain(&self, name: &str) -> Option<&Chain> {
        self.chains.iter().find(|chain| chain.name == name)
    }
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Chain {
    pub name: String,
    /// Set for a base chain (one the kernel calls from a hook); regular chains are only
    /// reached by jump or goto.
    pub base: Option<BaseChain>,
    pub rules: Vec<Rule>,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct BaseChain {
    pub hook: Hook,
    pub priority: i32,
    pub chain_type: ChainType,
    /// The chain's policy is drop: packets that fall off its end are dropped.
    pub policy_drops: bool,
    /// The devices of a netdev chain; `None` when it is not known (nft 1.0.6 does not print
    /// them in JSON), which means any device.
    pub devices: Option<Vec<String>>,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Rule {
    /// All must hold for the statements to run.
    pub conditions: Vec<Condition>,
    /// In order; a verdict ends the rule.
    pub statements: Vec<Statement>,
    /// The rule as people read it, for messages.
    pub text: String,
    /// The nftables handle, where there is one.
    pub handle: Option<u64>,
}

/// One match of a rule. `Choice` lists the values it accepts (any of them), possibly negated.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Condition {
    /// iifname / `-i`; in the bridge family the bridge port.
    InInterface(Choice<Name>),
    OutInterface(Choice<Name>),
    /// The bridge port a bridged frame came in on (`-m physdev --physdev-in`).
    InBridgePort(Choice<Name>),
    OutBridgePort(Choice<Name>),
    Layer3(Choice<Layer3>),
    Protocol(Choice<u8>),
    Source(Choice<Addresses>),
    Destination(Choice<Addresses>),
    SourcePort(Choice<Ports>),
    DestinationPort(Choice<Ports>),
    ConntrackState(Choice<ConntrackState>),
    /// `ct status dnat`: the connection's destination was translated.
    ConntrackDnat(bool),
    /// `fib daddr type local` / `-m addrtype --dst-type LOCAL` (`false`: negated).
    LocalDestination(bool),
    /// `fib saddr type local` / `-m addrtype --src-type LOCAL` (`false`: negated).
    LocalSource(bool),
    /// `meta mark & mask == value` / `-m mark --mark value/mask` (`negated`: `!=`, `!`).
    Mark {
        value: u32,
        mask: u32,
        negated: bool,
    },
    /// Anything else: it may match some packets of a class and not others.
    Unknown(String),
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Choice<T> {
    pub negated: bool,
    pub any_of: Vec<T>,
}

impl<T> Choice<T> {
    pub fn is(value: T) -> Choice<T> {
        Choice {
            negated: false,
            any_of: vec![value],
        }
    }

    pub fn one_of(values: Vec<T>, negated: bool) -> Choice<T> {
        Choice {
            negated,
            any_of: values,
        }
    }

    /// Whether `value` is accepted.
    pub fn accepts(&self, value: &T, item_matches: impl Fn(&T, &T) -> bool) -> bool {
        self.any_of.iter().any(|item| item_matches(item, value)) != self.negated
    }
}

/// An interface name; `eth*` (nft) or `eth+` (iptables) match every name with that prefix.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Name(pub String);

impl Name {
    pub fn matches(&self, name: &str) -> bool {
        match self
            .0
            .strip_suffix('*')
            .or_else(|| self.0.strip_suffix('+'))
        {
            Some(prefix) => name.starts_with(prefix),
            None => self.0 == name,
        }
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Layer3 {
    V4,
    V6,
    /// ARP, VLAN and the rest: never a frame xbr accelerates.
    Other,
}

/// An address, a prefix or a range of addresses.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Addresses {
    Prefix(IpAddr, u8),
    Range(IpAddr, IpAddr),
}

impl Addresses {
    pub fn host(address: IpAddr) -> Addresses {
        let len = if address.is_ipv4() { 32 } else { 128 };
        Addresses::Prefix(address, len)
    }

    pub fn contains(&self, address: &IpAddr) -> bool {
        match (*self, *address) {
            (Addresses::Prefix(IpAddr::V4(net), len), IpAddr::V4(a)) => {
                prefix_match(u32::from(net).into(), u32::from(a).into(), len, 32)
            }
            (Addresses::Prefix(IpAddr::V6(net), len), IpAddr::V6(a)) => {
                prefix_match(u128::from(net), u128::from(a), len, 128)
            }
            (Addresses::Range(IpAddr::V4(first), IpAddr::V4(last)), IpAddr::V4(a)) => {
                (first..=last).contains(&a)
            }
            (Addresses::Range(IpAddr::V6(first), IpAddr::V6(last)), IpAddr::V6(a)) => {
                (first..=last).contains(&a)
            }
            _ => false,
        }
    }

    /// The single address this is, if it is one.
    pub fn single(&self) -> Option<IpAddr> {
        match *self {
            Addresses::Prefix(address, 32) if address.is_ipv4() => Some(address),
            Addresses::Prefix(address, 128) => Some(address),
            Addresses::Range(first, last) if first == last => Some(first),
            _ => None,
        }
    }

    pub fn layer3(&self) -> Layer3 {
        match self {
            Addresses::Prefix(IpAddr::V4(_), _) | Addresses::Range(IpAddr::V4(_), _) => Layer3::V4,
            _ => Layer3::V6,
        }
    }
}

fn prefix_match(net: u128, address: u128, len: u8, bits: u32) -> bool {
    let len = u32::from(len).min(bits);
    if len == 0 {
        return true;
    }
    let shift = bits - len;
    (net >> shift) == (address >> shift)
}

/// A port or an inclusive range of ports.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Ports {
    pub first: u16,
    pub last: u16,
}

impl Ports {
    pub fn one(port: u16) -> Ports {
        Ports {
            first: port,
            last: port,
        }
    }

    pub fn contains(&self, port: u16) -> bool {
        (self.first..=self.last).contains(&port)
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum ConntrackState {
    New,
    Established,
    Related,
    Invalid,
    Untracked,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Statement {
    Accept,
    Drop,
    Reject,
    Queue,
    Jump(String),
    Goto(String),
    Return,
    Continue,
    /// Destination NAT, to this address and port where the rule says them plainly.
    Dnat {
        to: Option<IpAddr>,
        port: Option<u16>,
    },
    /// Source NAT (snat, masquerade): a translation the kernel keeps in conntrack.
    Snat {
        /// The target as the rule names it (`SNAT`, `masquerade`), for messages.
        kind: String,
        /// A masquerade: to the address of the interface the packet goes out of.
        masquerade: bool,
        /// The one address an snat translates to, where the rule says it plainly.
        to: Option<IpAddr>,
        /// Only the address changes, ports chosen as the kernel does by default: no port
        /// range, no `random`, `fully-random` or `persistent` flag.
        plain: bool,
    },
    /// Redirect, netmap: a translation the kernel keeps in conntrack.
    OtherNat(String),
    /// Changes the packet or state that later rules or the receiver see: marks, payload,
    /// conntrack settings, set updates, notrack, duplication.
    Changes(String),
    /// Counters, log, quota reads: see the packet, change nothing about where it goes.
    Observes,
}

impl Statement {
    /// A statement after which the rule's packets go no further in this chain.
    pub fn is_terminal(&self) -> bool {
        matches!(
            self,
            Statement::Accept
                | Statement::Drop
                | Statement::Reject
                | Statement::Queue
                | Statement::Dnat { .. }
                | Statement::Snat { .. }
                | Statement::OtherNat(_)
        )
    }
}

/// Where a rule lives, for messages: ``table bridge admin` chain forward rule `...``.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RuleRef {
    pub origin: Origin,
    pub family: Family,
    pub table: String,
    pub chain: String,
    /// `None` for a chain's policy.
    pub text: Option<String>,
}

impl fmt::Display for RuleRef {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let tool = match self.origin {
            Origin::Nftables => String::new(),
            other => format!("{} ", other.name()),
        };
        write!(
            f,
            "{tool}`table {} {}` chain {}",
            self.family.name(),
            self.table,
            self.chain
        )?;
        match &self.text {
            Some(text) => write!(f, " rule `{text}`"),
            None => write!(f, " policy drop"),
        }
    }
}
