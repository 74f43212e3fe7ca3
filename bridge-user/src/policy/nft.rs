//! Reading nftables' own view of the ruleset: `nft -j list ruleset`, decoded object by object
//! with the `nftables` crate's typed schema, into the policy model. An object the schema cannot
//! decode (a newer nft's statement, say) becomes a rule that may match anything and change
//! it, so it holds back whatever reaches it instead of being skipped.

use std::{collections::HashMap, net::IpAddr};

use nftables::{
    expr::{
        BinaryOperation, Expression, FibFlag, FibResult, MetaKey, NamedExpression, Payload, SetItem,
    },
    schema::{NfListObject, NfObject, SetFlag},
    stmt::{Operator, Statement as NftStatement},
    types::{NfChainPolicy, NfChainType, NfFamily, NfHook},
};

use super::model::{
    Addresses, BaseChain, Chain, ChainType, Choice, Condition, ConntrackState, Family, Hook,
    Layer3, Name, Origin, Ports, Rule, Ruleset, Statement, Table,
};

/// Decodes the output of `nft -j list ruleset`; also names the tables whose rules use
/// xtables extensions (iptables-nft's), whose details only iptables-save prints.
pub fn parse(json: &str) -> Result<(Ruleset, Vec<(Family, String)>), String> {
    let document: serde_json::Value = serde_json::from_str(json)
        .map_err(|e| format!("nft printed JSON that does not parse: {e}"))?;
    let objects = document
        .get("nftables")
        .and_then(|objects| objects.as_array())
        .ok_or("nft's JSON has no `nftables` array")?;
    let mut reader = Reader::default();
    for object in objects {
        match serde_json::from_value::<NfObject<'static>>(object.clone()) {
            Ok(NfObject::ListObject(object)) => reader.add(object),
            Ok(NfObject::CmdObject(_)) => {}
            Err(error) => reader.add_undecodable(object, &error.to_string()),
        }
    }
    let with_xtables = reader.with_xtables.clone();
    Ok((reader.finish(), with_xtables))
}

/// Table key: family and name.
type TableKey = (Family, String);

#[derive(Default)]
struct Reader {
    tables: Vec<Table>,
    /// Named sets whose elements are fixed, per table: name -> elements.
    sets: HashMap<TableKey, HashMap<String, Vec<Expression<'static>>>>,
    /// Rules as listed, decoded once every set is known.
    rules: Vec<(TableKey, String, nftables::schema::Rule<'static>)>,
    /// Rules the schema could not decode: (table, chain, why).
    undecodable: Vec<(TableKey, String, String)>,
    with_xtables: Vec<TableKey>,
}

impl Reader {
    fn add(&mut self, object: NfListObject<'static>) {
        match object {
            NfListObject::Table(table) => self.tables.push(Table {
                family: family(table.family),
                name: table.name.into_owned(),
                origin: Origin::Nftables,
                chains: Vec::new(),
            }),
            NfListObject::Chain(chain) => {
                let key = (family(chain.family), chain.table.into_owned());
                let base = match (chain.hook, chain._type) {
                    (Some(hook_of_chain), chain_type) => Some(BaseChain {
                        hook: hook(hook_of_chain),
                        priority: chain.prio.unwrap_or(0),
                        chain_type: match chain_type {
                            Some(NfChainType::NAT) => ChainType::Nat,
                            Some(NfChainType::Route) => ChainType::Route,
                            _ => ChainType::Filter,
                        },
                        policy_drops: chain.policy == Some(NfChainPolicy::Drop),
                        devices: chain.dev.map(|dev| vec![dev.into_owned()]),
                    }),
                    (None, _) => None,
                };
                if let Some(table) = self.table_mut(&key) {
                    table.chains.push(Chain {
                        name: chain.name.into_owned(),
                        base,
                        rules: Vec::new(),
                    });
                }
            }
            NfListObject::Set(set) => {
                // A set the datapath or a timeout can change is read as unknown.
                let changing = set.flags.as_ref().is_some_and(|flags| {
                    flags.contains(&SetFlag::Dynamic) || flags.contains(&SetFlag::Timeout)
                }) || set.timeout.is_some();
                if !changing {
                    let key = (family(set.family), set.table.into_owned());
                    let elements = set.elem.map(|e| e.into_owned()).unwrap_or_default();
                    self.sets
                        .entry(key)
                        .or_default()
                        .insert(set.name.into_owned(), elements);
                }
            }
            NfListObject::Rule(rule) => {
                let key = (family(rule.family), rule.table.to_string());
                let chain = rule.chain.to_string();
                let xtables = rule.expr.iter().any(|s| matches!(s, NftStatement::XT(_)));
                if xtables && !self.with_xtables.contains(&key) {
                    self.with_xtables.push(key.clone());
                }
                self.rules.push((key, chain, rule));
            }
            _ => {}
        }
    }

    fn add_undecodable(&mut self, object: &serde_json::Value, error: &str) {
        let Some(rule) = object.get("rule") else {
            return;
        };
        let text = |field: &str| rule.get(field).and_then(|v| v.as_str()).unwrap_or_default();
        let family = match text("family") {
            "ip" => Family::Ip,
            "ip6" => Family::Ip6,
            "inet" => Family::Inet,
            "bridge" => Family::Bridge,
            "netdev" => Family::Netdev,
            _ => Family::Arp,
        };
        self.undecodable.push((
            (family, text("table").to_owned()),
            text("chain").to_owned(),
            format!("a rule xbr cannot decode ({error})"),
        ));
    }

    fn table_mut(&mut self, key: &TableKey) -> Option<&mut Table> {
        self.tables
            .iter_mut()
            .find(|table| table.family == key.0 && table.name == key.1)
    }

    fn finish(mut self) -> Ruleset {
        let rules = std::mem::take(&mut self.rules);
        for (key, chain, rule) in rules {
            let sets = self.sets.get(&key).cloned().unwrap_or_default();
            let decoded = decode_rule(&rule, &sets);
            self.push_rules(&key, &chain, decoded);
        }
        for (key, chain, why) in std::mem::take(&mut self.undecodable) {
            let rule = Rule {
                conditions: vec![Condition::Unknown(why.clone())],
                statements: vec![Statement::Changes(why.clone())],
                text: why,
                handle: None,
            };
            self.push_rules(&key, &chain, vec![rule]);
        }
        Ruleset {
            tables: self.tables,
        }
    }

    fn push_rules(&mut self, key: &TableKey, chain: &str, rules: Vec<Rule>) {
        if let Some(chain) = self
            .table_mut(key)
            .and_then(|table| table.chains.iter_mut().find(|c| c.name == chain))
        {
            chain.rules.extend(rules);
        }
    }
}

fn family(family: NfFamily) -> Family {
    match family {
        NfFamily::IP => Family::Ip,
        NfFamily::IP6 => Family::Ip6,
        NfFamily::INet => Family::Inet,
        NfFamily::ARP => Family::Arp,
        NfFamily::Bridge => Family::Bridge,
        NfFamily::NetDev => Family::Netdev,
    }
}

fn hook(hook: NfHook) -> Hook {
    match hook {
        NfHook::Ingress => Hook::Ingress,
        NfHook::Prerouting => Hook::Prerouting,
        NfHook::Forward => Hook::Forward,
        NfHook::Input => Hook::Input,
        NfHook::Output => Hook::Output,
        NfHook::Postrouting => Hook::Postrouting,
        NfHook::Egress => Hook::Egress,
    }
}

type Sets = HashMap<String, Vec<Expression<'static>>>;

/// One nftables rule as model rules: one, or one per element of a verdict map.
fn decode_rule(rule: &nftables::schema::Rule<'static>, sets: &Sets) -> Vec<Rule> {
    let text = rule
        .expr
        .iter()
        .map(render_statement)
        .collect::<Vec<_>>()
        .join(" ");
    let mut conditions = Vec::new();
    let mut statements = Vec::new();
    for statement in rule.expr.iter() {
        match statement {
            NftStatement::Match(m) => {
                conditions.extend(condition(&m.left, operator(&m.op), &m.right, sets))
            }
            NftStatement::VerdictMap(map) => {
                // A packet takes at most one element's verdict: one rule per element.
                let Some(elements) = map_elements(&map.data) else {
                    statements.push(Statement::Changes("a verdict map xbr cannot read".into()));
                    continue;
                };
                return elements
                    .into_iter()
                    .map(|(value, verdict)| {
                        let mut element_conditions = conditions.clone();
                        element_conditions.extend(condition(&map.key, "==", &value, sets));
                        let mut element_statements = statements.clone();
                        element_statements.push(verdict);
                        Rule {
                            conditions: element_conditions,
                            statements: element_statements,
                            text: text.clone(),
                            handle: rule.handle.map(u64::from),
                        }
                    })
                    .collect();
            }
            NftStatement::Limit(_) => conditions.push(Condition::Unknown("limit".into())),
            NftStatement::Quota(_) => conditions.push(Condition::Unknown("quota".into())),
            NftStatement::CTCount(_) => conditions.push(Condition::Unknown("ct count".into())),
            other => statements.push(decode_statement(other)),
        }
    }
    vec![Rule {
        conditions,
        statements,
        text,
        handle: rule.handle.map(u64::from),
    }]
}

fn decode_statement(statement: &NftStatement<'static>) -> Statement {
    match statement {
        NftStatement::Accept(_) => Statement::Accept,
        NftStatement::Drop(_) => Statement::Drop,
        NftStatement::Reject(_) => Statement::Reject,
        NftStatement::Queue(_) => Statement::Queue,
        NftStatement::Continue(_) => Statement::Continue,
        NftStatement::Return(_) => Statement::Return,
        NftStatement::Jump(target) => Statement::Jump(target.target.to_string()),
        NftStatement::Goto(target) => Statement::Goto(target.target.to_string()),
        NftStatement::Counter(_) | NftStatement::Log(_) | NftStatement::Flow(_) => {
            Statement::Observes
        }
        NftStatement::DNAT(nat) => {
            let nat = nat.as_ref();
            Statement::Dnat {
                to: nat
                    .and_then(|nat| nat.addr.as_ref())
                    .and_then(|addr| literal_text(addr)?.parse().ok()),
                port: nat
                    .and_then(|nat| nat.port.as_ref())
                    .and_then(|port| match port {
                        Expression::Number(n) => u16::try_from(*n).ok(),
                        _ => None,
                    }),
            }
        }
        NftStatement::SNAT(nat) => {
            let to = nat
                .as_ref()
                .filter(|nat| nat.port.is_none() && no_flags(nat))
                .and_then(|nat| nat.addr.as_ref())
                .and_then(|addr| literal_text(addr)?.parse().ok());
            Statement::Snat {
                kind: "snat".into(),
                masquerade: false,
                to,
                plain: to.is_some(),
            }
        }
        NftStatement::Masquerade(nat) => Statement::Snat {
            kind: "masquerade".into(),
            masquerade: true,
            to: None,
            plain: nat
                .as_ref()
                .is_none_or(|nat| nat.addr.is_none() && nat.port.is_none() && no_flags(nat)),
        },
        NftStatement::Redirect(_) => Statement::OtherNat("redirect".into()),
        NftStatement::XT(Some(xt)) => {
            let name = xt.get("name").and_then(|n| n.as_str()).unwrap_or("?");
            match name {
                "LOG" | "NFLOG" | "TRACE" => Statement::Observes,
                _ => Statement::Changes(format!("xtables target {name}")),
            }
        }
        other => Statement::Changes(render_statement(other)),
    }
}

/// The JSON spelling of an operator (the crate's variant names for `<` and `>` are swapped).
fn operator(op: &Operator) -> &'static str {
    match serde_json::to_value(op)
        .ok()
        .as_ref()
        .and_then(|v| v.as_str())
    {
        Some("==") | Some("in") => "==",
        Some("!=") => "!=",
        Some("<") => "<",
        Some(">") => ">",
        Some("<=") => "<=",
        Some(">=") => ">=",
        _ => "?",
    }
}

/// A match as model conditions; `Unknown` where its meaning is not one xbr models.
fn condition(
    left: &Expression<'static>,
    op: &str,
    right: &Expression<'static>,
    sets: &Sets,
) -> Vec<Condition> {
    let unknown = || {
        vec![Condition::Unknown(format!(
            "{} {op} {}",
            render(left),
            render(right)
        ))]
    };
    let negated = op == "!=";
    let Some(values) = literals(right, sets) else {
        return unknown();
    };
    // `meta mark & 0x2000 == 0x2000` (iptables-nft's `-m mark`), `meta mark 0x10`.
    let mark = match left {
        Expression::BinaryOperation(operation) => match &**operation {
            BinaryOperation::AND(
                Expression::Named(NamedExpression::Meta(meta)),
                Expression::Number(mask),
            ) if meta.key == MetaKey::Mark => Some(*mask),
            _ => return unknown(),
        },
        Expression::Named(NamedExpression::Meta(meta)) if meta.key == MetaKey::Mark => {
            Some(u32::MAX)
        }
        _ => None,
    };
    if let Some(mask) = mark {
        return match values.as_slice() {
            [Literal::Number(value)] if op == "==" || op == "!=" => vec![Condition::Mark {
                value: *value,
                mask,
                negated,
            }],
            _ => unknown(),
        };
    }
    let Expression::Named(named) = left else {
        return unknown();
    };
    let decoded = match named {
        NamedExpression::Meta(meta) => match meta.key {
            MetaKey::Iifname | MetaKey::Iif => {
                names(&values, negated, op).map(Condition::InInterface)
            }
            MetaKey::Oifname | MetaKey::Oif => {
                names(&values, negated, op).map(Condition::OutInterface)
            }
            MetaKey::L4proto => protocols(&values, negated, op).map(Condition::Protocol),
            MetaKey::Nfproto | MetaKey::Protocol => {
                layer3s(&values, negated, op).map(Condition::Layer3)
            }
            _ => None,
        }
        .map(|c| vec![c]),
        NamedExpression::Payload(Payload::PayloadField(field)) => {
            payload(&field.protocol, &field.field, &values, negated, op)
        }
        NamedExpression::CT(ct) => match &*ct.key {
            "state" => states(&values, negated, op).map(|c| vec![Condition::ConntrackState(c)]),
            "status" if values == [Literal::Text("dnat".into())] && op != "<" && op != ">" => {
                Some(vec![Condition::ConntrackDnat(!negated)])
            }
            _ => None,
        },
        NamedExpression::Fib(fib)
            if fib.result == FibResult::Type
                && fib.flags.len() == 1
                && values == [Literal::Text("local".into())] =>
        {
            if fib.flags.contains(&FibFlag::Daddr) {
                Some(vec![Condition::LocalDestination(!negated)])
            } else if fib.flags.contains(&FibFlag::Saddr) {
                Some(vec![Condition::LocalSource(!negated)])
            } else {
                None
            }
        }
        _ => None,
    };
    decoded.unwrap_or_else(unknown)
}

/// A payload match: addresses, protocols and ports become conditions; any other field of
/// a known header still says which layer 3 or protocol the packet has.
fn payload(
    protocol: &str,
    field: &str,
    values: &[Literal],
    negated: bool,
    op: &str,
) -> Option<Vec<Condition>> {
    let transport = match protocol {
        "tcp" => Some(6),
        "udp" => Some(17),
        "sctp" => Some(132),
        "dccp" => Some(33),
        "udplite" => Some(136),
        _ => None,
    };
    let mut conditions = Vec::new();
    match protocol {
        "ip" => conditions.push(Condition::Layer3(Choice::is(Layer3::V4))),
        "ip6" => conditions.push(Condition::Layer3(Choice::is(Layer3::V6))),
        "vlan" | "arp" => conditions.push(Condition::Layer3(Choice::is(Layer3::Other))),
        _ => {}
    }
    if let Some(proto) = transport {
        conditions.push(Condition::Protocol(Choice::is(proto)));
    }
    let decoded = match (protocol, field) {
        ("ip" | "ip6", "saddr") => addresses(values, negated, op).map(Condition::Source),
        ("ip" | "ip6", "daddr") => addresses(values, negated, op).map(Condition::Destination),
        ("ip", "protocol") | ("ip6", "nexthdr") => {
            protocols(values, negated, op).map(Condition::Protocol)
        }
        ("ether", "type") => layer3s(values, negated, op).map(Condition::Layer3),
        (_, "sport") if transport.is_some() || protocol == "th" => {
            ports(values, negated, op).map(Condition::SourcePort)
        }
        (_, "dport") if transport.is_some() || protocol == "th" => {
            ports(values, negated, op).map(Condition::DestinationPort)
        }
        _ => {
            conditions.push(Condition::Unknown(format!("{protocol} {field} {op} ...")));
            return Some(conditions);
        }
    };
    conditions.push(decoded?);
    Some(conditions)
}

/// A right-hand side value, flattened: sets and lists become several literals.
#[derive(Clone, Debug, PartialEq, Eq)]
enum Literal {
    Text(String),
    Number(u32),
    Prefix(String, u32),
    Range(Box<Literal>, Box<Literal>),
}

fn literals(expression: &Expression<'static>, sets: &Sets) -> Option<Vec<Literal>> {
    Some(match expression {
        Expression::String(text) => match text.strip_prefix('@') {
            Some(set) => sets
                .get(set)?
                .iter()
                .map(|e| literals(e, sets))
                .collect::<Option<Vec<_>>>()?
                .concat(),
            None => vec![Literal::Text(text.to_string())],
        },
        Expression::Number(n) => vec![Literal::Number(*n)],
        Expression::List(items) => items
            .iter()
            .map(|e| literals(e, sets))
            .collect::<Option<Vec<_>>>()?
            .concat(),
        Expression::Range(range) => {
            let [first, last] = &range.range;
            vec![Literal::Range(
                Box::new(single_literal(first)?),
                Box::new(single_literal(last)?),
            )]
        }
        Expression::Named(NamedExpression::Set(items)) => items
            .iter()
            .map(|item| match item {
                SetItem::Element(e) => literals(e, sets),
                _ => None,
            })
            .collect::<Option<Vec<_>>>()?
            .concat(),
        Expression::Named(NamedExpression::Prefix(prefix)) => {
            vec![Literal::Prefix(literal_text(&prefix.addr)?, prefix.len)]
        }
        Expression::Named(NamedExpression::Elem(elem)) => literals(&elem.val, sets)?,
        _ => return None,
    })
}

fn single_literal(expression: &Expression<'static>) -> Option<Literal> {
    match expression {
        Expression::String(text) => Some(Literal::Text(text.to_string())),
        Expression::Number(n) => Some(Literal::Number(*n)),
        _ => None,
    }
}

/// A NAT statement without flags (`random`, `fully-random`, `persistent`, ...).
fn no_flags(nat: &nftables::stmt::NAT) -> bool {
    nat.flags.as_ref().is_none_or(|flags| flags.is_empty())
}

fn literal_text(expression: &Expression<'static>) -> Option<String> {
    match expression {
        Expression::String(text) => Some(text.to_string()),
        _ => None,
    }
}

/// Only equality (and set membership) can be modelled for these.
fn equality(op: &str) -> bool {
    op == "==" || op == "!="
}

fn names(values: &[Literal], negated: bool, op: &str) -> Option<Choice<Name>> {
    equality(op).then_some(())?;
    let names = values
        .iter()
        .map(|v| match v {
            Literal::Text(name) => Some(Name(name.clone())),
            _ => None,
        })
        .collect::<Option<Vec<_>>>()?;
    Some(Choice::one_of(names, negated))
}

fn protocols(values: &[Literal], negated: bool, op: &str) -> Option<Choice<u8>> {
    equality(op).then_some(())?;
    let protocols = values
        .iter()
        .map(|v| match v {
            Literal::Number(n) => u8::try_from(*n).ok(),
            Literal::Text(name) => protocol_number(name),
            _ => None,
        })
        .collect::<Option<Vec<_>>>()?;
    Some(Choice::one_of(protocols, negated))
}

/// The IP protocol numbers nft prints by name.
pub fn protocol_number(name: &str) -> Option<u8> {
    Some(match name {
        "icmp" => 1,
        "igmp" => 2,
        "tcp" => 6,
        "udp" => 17,
        "gre" => 47,
        "esp" => 50,
        "ah" => 51,
        "icmpv6" | "ipv6-icmp" => 58,
        "sctp" => 132,
        "dccp" => 33,
        "udplite" => 136,
        other => return other.parse().ok(),
    })
}

fn layer3s(values: &[Literal], negated: bool, op: &str) -> Option<Choice<Layer3>> {
    equality(op).then_some(())?;
    let values = values
        .iter()
        .map(|v| match v {
            Literal::Text(name) => Some(match name.as_str() {
                "ip" | "ipv4" => Layer3::V4,
                "ip6" | "ipv6" => Layer3::V6,
                _ => Layer3::Other,
            }),
            Literal::Number(0x0800) | Literal::Number(2) => Some(Layer3::V4),
            Literal::Number(0x86dd) | Literal::Number(10) => Some(Layer3::V6),
            Literal::Number(_) => Some(Layer3::Other),
            _ => None,
        })
        .collect::<Option<Vec<_>>>()?;
    Some(Choice::one_of(values, negated))
}

fn addresses(values: &[Literal], negated: bool, op: &str) -> Option<Choice<Addresses>> {
    equality(op).then_some(())?;
    let parse = |text: &str| text.parse::<IpAddr>().ok();
    let addresses = values
        .iter()
        .map(|v| match v {
            Literal::Text(text) => parse(text).map(Addresses::host),
            Literal::Prefix(text, len) => {
                Some(Addresses::Prefix(parse(text)?, u8::try_from(*len).ok()?))
            }
            Literal::Range(first, last) => match (&**first, &**last) {
                (Literal::Text(first), Literal::Text(last)) => {
                    Some(Addresses::Range(parse(first)?, parse(last)?))
                }
                _ => None,
            },
            Literal::Number(_) => None,
        })
        .collect::<Option<Vec<_>>>()?;
    // One family per match: `ip saddr` and `ip6 saddr` never mix.
    let family = addresses.first()?.layer3();
    addresses
        .iter()
        .all(|a| a.layer3() == family)
        .then(|| Choice::one_of(addresses, negated))
}

fn ports(values: &[Literal], negated: bool, op: &str) -> Option<Choice<Ports>> {
    let port = |literal: &Literal| match literal {
        Literal::Number(n) => u16::try_from(*n).ok(),
        Literal::Text(text) => text.parse().ok(),
        _ => None,
    };
    if !equality(op) {
        // `tcp dport < 1024` and the like: one value, a range on one side.
        let [value] = values else { return None };
        let value = port(value)?;
        let range = match op {
            "<" => Ports {
                first: 0,
                last: value.checked_sub(1)?,
            },
            "<=" => Ports {
                first: 0,
                last: value,
            },
            ">" => Ports {
                first: value.checked_add(1)?,
                last: u16::MAX,
            },
            ">=" => Ports {
                first: value,
                last: u16::MAX,
            },
            _ => return None,
        };
        return Some(Choice::is(range));
    }
    let ports = values
        .iter()
        .map(|v| match v {
            Literal::Range(first, last) => Some(Ports {
                first: port(first)?,
                last: port(last)?,
            }),
            single => port(single).map(Ports::one),
        })
        .collect::<Option<Vec<_>>>()?;
    Some(Choice::one_of(ports, negated))
}

fn states(values: &[Literal], negated: bool, op: &str) -> Option<Choice<ConntrackState>> {
    equality(op).then_some(())?;
    let states = values
        .iter()
        .map(|v| match v {
            Literal::Text(name) => match name.as_str() {
                "new" => Some(ConntrackState::New),
                "established" => Some(ConntrackState::Established),
                "related" => Some(ConntrackState::Related),
                "invalid" => Some(ConntrackState::Invalid),
                "untracked" => Some(ConntrackState::Untracked),
                _ => None,
            },
            _ => None,
        })
        .collect::<Option<Vec<_>>>()?;
    Some(Choice::one_of(states, negated))
}

/// A verdict map's elements: (value, verdict). Named verdict maps are not decoded.
fn map_elements(data: &Expression<'static>) -> Option<Vec<(Expression<'static>, Statement)>> {
    let Expression::Named(NamedExpression::Set(items)) = data else {
        return None;
    };
    items
        .iter()
        .map(|item| match item {
            SetItem::Element(Expression::List(pair)) if pair.len() == 2 => {
                Some((pair[0].clone(), verdict(&pair[1])?))
            }
            SetItem::Mapping(value, verdict_expression) => {
                Some((value.clone(), verdict(verdict_expression)?))
            }
            SetItem::MappingStatement(value, statement) => {
                Some((value.clone(), decode_statement(statement)))
            }
            _ => None,
        })
        .collect()
}

fn verdict(expression: &Expression<'static>) -> Option<Statement> {
    use nftables::expr::Verdict;
    match expression {
        Expression::Verdict(v) => Some(match v {
            Verdict::Accept => Statement::Accept,
            Verdict::Drop => Statement::Drop,
            Verdict::Continue => Statement::Continue,
            Verdict::Return => Statement::Return,
            Verdict::Jump(target) => Statement::Jump(target.target.to_string()),
            Verdict::Goto(target) => Statement::Goto(target.target.to_string()),
        }),
        _ => None,
    }
}

/// A statement in nft's own words, near enough for messages.
fn render_statement(statement: &NftStatement<'static>) -> String {
    match statement {
        NftStatement::Match(m) => {
            let op = match operator(&m.op) {
                "==" => String::new(),
                op => format!("{op} "),
            };
            format!("{} {op}{}", render(&m.left), render(&m.right))
        }
        NftStatement::Accept(_) => "accept".into(),
        NftStatement::Drop(_) => "drop".into(),
        NftStatement::Reject(_) => "reject".into(),
        NftStatement::Continue(_) => "continue".into(),
        NftStatement::Return(_) => "return".into(),
        NftStatement::Jump(target) => format!("jump {}", target.target),
        NftStatement::Goto(target) => format!("goto {}", target.target),
        NftStatement::Counter(_) => "counter".into(),
        NftStatement::Log(_) => "log".into(),
        NftStatement::Limit(_) => "limit".into(),
        NftStatement::Queue(_) => "queue".into(),
        NftStatement::Masquerade(_) => "masquerade".into(),
        NftStatement::Mangle(mangle) => {
            format!("{} set {}", render(&mangle.key), render(&mangle.value))
        }
        NftStatement::DNAT(Some(nat)) | NftStatement::SNAT(Some(nat)) => {
            let kind = if matches!(statement, NftStatement::DNAT(_)) {
                "dnat"
            } else {
                "snat"
            };
            let addr = nat.addr.as_ref().map(render).unwrap_or_default();
            match &nat.port {
                Some(port) => format!("{kind} to {addr}:{}", render(port)),
                None => format!("{kind} to {addr}"),
            }
        }
        NftStatement::VerdictMap(map) => {
            format!("{} vmap {}", render(&map.key), render(&map.data))
        }
        NftStatement::XT(Some(xt)) => format!(
            "xt {} {}",
            xt.get("type").and_then(|v| v.as_str()).unwrap_or("?"),
            xt.get("name").and_then(|v| v.as_str()).unwrap_or("?")
        ),
        other => serde_json::to_string(other).unwrap_or_else(|_| "?".into()),
    }
}

fn render(expression: &Expression<'static>) -> String {
    match expression {
        Expression::String(text) => text.to_string(),
        Expression::Number(n) => n.to_string(),
        Expression::Boolean(b) => b.to_string(),
        Expression::List(items) => format!(
            "{{ {} }}",
            items.iter().map(render).collect::<Vec<_>>().join(", ")
        ),
        Expression::Range(range) => {
            format!("{}-{}", render(&range.range[0]), render(&range.range[1]))
        }
        Expression::Named(NamedExpression::Set(items)) => format!(
            "{{ {} }}",
            items
                .iter()
                .map(|item| match item {
                    SetItem::Element(e) => render(e),
                    SetItem::Mapping(key, value) => format!("{} : {}", render(key), render(value)),
                    SetItem::MappingStatement(key, s) => {
                        format!("{} : {}", render(key), render_statement(s))
                    }
                })
                .collect::<Vec<_>>()
                .join(", ")
        ),
        Expression::Named(NamedExpression::Prefix(prefix)) => {
            format!("{}/{}", render(&prefix.addr), prefix.len)
        }
        Expression::Named(NamedExpression::Payload(Payload::PayloadField(field))) => {
            format!("{} {}", field.protocol, field.field)
        }
        Expression::Named(NamedExpression::Meta(meta)) => {
            let key = serde_json::to_value(meta.key)
                .ok()
                .and_then(|v| v.as_str().map(str::to_owned))
                .unwrap_or_else(|| "?".into());
            match meta.key {
                MetaKey::Iifname | MetaKey::Oifname | MetaKey::Iif | MetaKey::Oif => {
                    key.to_string()
                }
                _ => format!("meta {key}"),
            }
        }
        Expression::Named(NamedExpression::CT(ct)) => format!("ct {}", ct.key),
        Expression::Named(NamedExpression::Fib(fib)) if fib.flags.contains(&FibFlag::Saddr) => {
            "fib saddr type".into()
        }
        Expression::Named(NamedExpression::Fib(_)) => "fib daddr type".into(),
        Expression::Verdict(v) => serde_json::to_value(v)
            .ok()
            .map(|v| match v {
                serde_json::Value::Object(map) => map
                    .iter()
                    .map(|(k, v)| match v.get("target").and_then(|t| t.as_str()) {
                        Some(target) => format!("{k} {target}"),
                        None => k.clone(),
                    })
                    .collect::<Vec<_>>()
                    .join(" "),
                other => other.to_string(),
            })
            .unwrap_or_else(|| "?".into()),
        other => serde_json::to_string(other).unwrap_or_else(|_| "?".into()),
    }
}
