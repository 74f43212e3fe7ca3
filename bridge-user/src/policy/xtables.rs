//! Reading iptables' view of its tables: the output of `iptables-save` (legacy xtables, or
//! the nf_tables backend's tables whose rules use xtables extensions, which nft's JSON shows
//! by name only), into the policy model. Matches and targets xbr models become conditions and
//! statements; any other match may match, any other target may change the packet.

use std::net::IpAddr;

use super::{
    model::{
        Addresses, BaseChain, Chain, ChainType, Choice, Condition, ConntrackState, Family, Hook,
        Name, Origin, Ports, Rule, Statement, Table,
    },
    nft::protocol_number,
};

/// Every table of one `iptables-save` (`family` Ip) or `ip6tables-save` (Ip6) output.
pub fn parse(save: &str, family: Family, origin: Origin) -> Vec<Table> {
    let mut tables: Vec<Table> = Vec::new();
    for line in save.lines().map(str::trim) {
        if let Some(name) = line.strip_prefix('*') {
            tables.push(Table {
                family,
                name: name.to_owned(),
                origin,
                chains: Vec::new(),
            });
            continue;
        }
        let Some(table) = tables.last_mut() else {
            continue;
        };
        if let Some(chain) = line.strip_prefix(':') {
            let mut fields = chain.split_whitespace();
            if let (Some(name), Some(policy)) = (fields.next(), fields.next()) {
                let base =
                    builtin_hook(&table.name, name).map(|(hook, priority, chain_type)| BaseChain {
                        hook,
                        priority,
                        chain_type,
                        policy_drops: policy == "DROP",
                        devices: None,
                    });
                table.chains.push(Chain {
                    name: name.to_owned(),
                    base,
                    rules: Vec::new(),
                });
            }
        } else if line.starts_with("-A ") {
            let chain_names: Vec<String> = table.chains.iter().map(|c| c.name.clone()).collect();
            if let Some((chain, rule)) = parse_rule(line, &chain_names)
                && let Some(chain) = table.chains.iter_mut().find(|c| c.name == chain)
            {
                chain.rules.push(rule);
            }
        }
    }
    tables
}

/// Where iptables hooks its built-in chains, at which priority, of which type.
fn builtin_hook(table: &str, chain: &str) -> Option<(Hook, i32, ChainType)> {
    let hook = match chain {
        "PREROUTING" => Hook::Prerouting,
        "INPUT" => Hook::Input,
        "FORWARD" => Hook::Forward,
        "OUTPUT" => Hook::Output,
        "POSTROUTING" => Hook::Postrouting,
        _ => return None,
    };
    Some(match table {
        "raw" => (hook, -300, ChainType::Filter),
        "mangle" if hook == Hook::Output => (hook, -150, ChainType::Route),
        "mangle" => (hook, -150, ChainType::Filter),
        "nat" if matches!(hook, Hook::Prerouting | Hook::Output) => (hook, -100, ChainType::Nat),
        "nat" => (hook, 100, ChainType::Nat),
        "security" => (hook, 50, ChainType::Filter),
        _ => (hook, 0, ChainType::Filter),
    })
}

/// One `-A CHAIN ...` line: the chain and the rule.
fn parse_rule(line: &str, chains: &[String]) -> Option<(String, Rule)> {
    let words = split_words(line);
    let chain = words.get(1)?.clone();
    let text = line
        .strip_prefix("-A ")
        .and_then(|rest| rest.strip_prefix(chain.as_str()))
        .unwrap_or(line)
        .trim()
        .to_owned();
    let mut rule = Rule {
        conditions: Vec::new(),
        statements: Vec::new(),
        text,
        handle: None,
    };
    let mut words = words[2..].iter().map(String::as_str).peekable();
    let mut negated = false;
    let mut module = "";
    while let Some(word) = words.next() {
        match word {
            "!" => {
                negated = true;
                continue;
            }
            "-i" | "--in-interface" => rule
                .conditions
                .push(Condition::InInterface(name(words.next()?, negated))),
            "-o" | "--out-interface" => rule
                .conditions
                .push(Condition::OutInterface(name(words.next()?, negated))),
            "-s" | "--source" => {
                rule.conditions
                    .push(addresses(words.next()?, negated, Condition::Source))
            }
            "-d" | "--destination" => {
                rule.conditions
                    .push(addresses(words.next()?, negated, Condition::Destination))
            }
            "-p" | "--protocol" => {
                let value = words.next()?;
                if value != "all" {
                    rule.conditions.push(match protocol_number(value) {
                        Some(number) => Condition::Protocol(Choice::one_of(vec![number], negated)),
                        None => Condition::Unknown(format!("-p {value}")),
                    });
                }
            }
            "-m" | "--match" => module = words.next()?,
            "-f" | "--fragment" => rule.conditions.push(Condition::Unknown("-f".into())),
            "-j" | "--jump" | "-g" | "--goto" => {
                let target = words.next()?;
                let options: Vec<&str> = words.collect();
                rule.statements
                    .push(target_statement(word, target, &options, chains));
                return Some((chain, rule));
            }
            option if option.starts_with("--") => {
                let mut values = Vec::new();
                while let Some(value) = words.next_if(|w| !w.starts_with('-') && *w != "!") {
                    values.push(value);
                }
                if let Some(condition) = module_condition(module, option, &values, negated) {
                    rule.conditions.push(condition);
                }
            }
            other => rule.conditions.push(Condition::Unknown(other.to_owned())),
        }
        negated = false;
    }
    Some((chain, rule))
}

fn name(value: &str, negated: bool) -> Choice<Name> {
    Choice::one_of(vec![Name(value.to_owned())], negated)
}

/// `-s 10.0.0.0/8,192.0.2.1/255.255.255.255`.
fn addresses(value: &str, negated: bool, make: fn(Choice<Addresses>) -> Condition) -> Condition {
    let parsed: Option<Vec<Addresses>> = value
        .split(',')
        .map(|item| {
            let (address, mask) = item.split_once('/').unwrap_or((item, ""));
            let address: IpAddr = address.parse().ok()?;
            let full = if address.is_ipv4() { 32 } else { 128 };
            let len = match mask {
                "" => full,
                mask => match mask.parse::<u8>() {
                    Ok(len) => len,
                    Err(_) => match mask.parse::<IpAddr>().ok()? {
                        IpAddr::V4(mask) => u32::from(mask).count_ones() as u8,
                        IpAddr::V6(mask) => u128::from(mask).count_ones() as u8,
                    },
                },
            };
            Some(Addresses::Prefix(address, len))
        })
        .collect();
    match parsed {
        Some(items) => make(Choice::one_of(items, negated)),
        None => Condition::Unknown(value.to_owned()),
    }
}

/// A `-m MODULE --option VALUES` match; `None` for ones that match everything (comments).
fn module_condition(
    module: &str,
    option: &str,
    values: &[&str],
    negated: bool,
) -> Option<Condition> {
    let unknown = || {
        Some(Condition::Unknown(format!(
            "-m {module} {option} {}",
            values.join(" ")
        )))
    };
    let port_list = || -> Option<Vec<Ports>> {
        values
            .first()?
            .split(',')
            .map(|item| {
                let (first, last) = item.split_once(':').unwrap_or((item, item));
                Some(Ports {
                    first: if first.is_empty() {
                        0
                    } else {
                        first.parse().ok()?
                    },
                    last: if last.is_empty() {
                        u16::MAX
                    } else {
                        last.parse().ok()?
                    },
                })
            })
            .collect()
    };
    let states = || -> Option<Vec<ConntrackState>> {
        values
            .first()?
            .split(',')
            .map(|state| match state {
                "NEW" => Some(ConntrackState::New),
                "ESTABLISHED" => Some(ConntrackState::Established),
                "RELATED" => Some(ConntrackState::Related),
                "INVALID" => Some(ConntrackState::Invalid),
                "UNTRACKED" => Some(ConntrackState::Untracked),
                _ => None,
            })
            .collect()
    };
    let condition = match (module, option) {
        ("comment", _) => return None,
        ("tcp" | "udp" | "sctp" | "dccp", "--dport" | "--destination-port")
        | ("multiport", "--dports" | "--destination-ports") => {
            port_list().map(|ports| Condition::DestinationPort(Choice::one_of(ports, negated)))
        }
        ("tcp" | "udp" | "sctp" | "dccp", "--sport" | "--source-port")
        | ("multiport", "--sports" | "--source-ports") => {
            port_list().map(|ports| Condition::SourcePort(Choice::one_of(ports, negated)))
        }
        ("conntrack", "--ctstate") | ("state", "--state") => {
            states().map(|states| Condition::ConntrackState(Choice::one_of(states, negated)))
        }
        ("conntrack", "--ctstatus") if values == ["DNAT"] => {
            Some(Condition::ConntrackDnat(!negated))
        }
        ("addrtype", "--dst-type") if values == ["LOCAL"] => {
            Some(Condition::LocalDestination(!negated))
        }
        ("addrtype", "--src-type") if values == ["LOCAL"] => Some(Condition::LocalSource(!negated)),
        ("mark", "--mark") => values.first().and_then(|value| {
            let (value, mask) = value.split_once('/').unwrap_or((value, "0xffffffff"));
            Some(Condition::Mark {
                value: number(value)?,
                mask: number(mask)?,
                negated,
            })
        }),
        ("physdev", "--physdev-in") => values
            .first()
            .map(|port| Condition::InBridgePort(name(port, negated))),
        ("physdev", "--physdev-out") => values
            .first()
            .map(|port| Condition::OutBridgePort(name(port, negated))),
        _ => None,
    };
    condition.or_else(unknown)
}

/// `0x2000` or `8192`, as iptables-save prints marks.
fn number(text: &str) -> Option<u32> {
    match text.strip_prefix("0x") {
        Some(hex) => u32::from_str_radix(hex, 16).ok(),
        None => text.parse().ok(),
    }
}

fn target_statement(jump: &str, target: &str, options: &[&str], chains: &[String]) -> Statement {
    let option = |name: &str| {
        options
            .iter()
            .position(|o| *o == name)
            .and_then(|i| options.get(i + 1))
            .copied()
    };
    match target {
        "ACCEPT" => Statement::Accept,
        "DROP" => Statement::Drop,
        "REJECT" => Statement::Reject,
        "RETURN" => Statement::Return,
        "QUEUE" | "NFQUEUE" => Statement::Queue,
        "LOG" | "NFLOG" | "TRACE" | "ULOG" => Statement::Observes,
        "DNAT" => {
            let (to, port) = option("--to-destination")
                .map(dnat_destination)
                .unwrap_or((None, None));
            Statement::Dnat { to, port }
        }
        "SNAT" => {
            // `--to-source 192.0.2.10`; a range of addresses or ports, several `--to-source`,
            // or a flag (`--random`, `--random-fully`, `--persistent`) is not plain.
            let to = match options {
                ["--to-source", address] => address.parse().ok(),
                _ => None,
            };
            Statement::Snat {
                kind: target.to_owned(),
                masquerade: false,
                to,
                plain: to.is_some(),
            }
        }
        "MASQUERADE" => Statement::Snat {
            kind: target.to_owned(),
            masquerade: true,
            to: None,
            plain: options.is_empty(),
        },
        "REDIRECT" | "NETMAP" => Statement::OtherNat(target.to_owned()),
        chain if chains.iter().any(|c| c == chain) => {
            if matches!(jump, "-g" | "--goto") {
                Statement::Goto(chain.to_owned())
            } else {
                Statement::Jump(chain.to_owned())
            }
        }
        other => Statement::Changes(format!("target {other}")),
    }
}

/// `--to-destination 172.17.0.2:80`, `[2001:db8::2]:80`, `10.0.0.1`; a range is read as
/// unknown (`None`).
fn dnat_destination(value: &str) -> (Option<IpAddr>, Option<u16>) {
    let (address, port) = match value.strip_prefix('[') {
        Some(rest) => match rest.split_once(']') {
            Some((address, port)) => (address, port.strip_prefix(':')),
            None => (rest, None),
        },
        None => match value.split_once(':') {
            Some((address, port)) if !address.contains(':') => (address, Some(port)),
            _ => (value, None),
        },
    };
    (
        address.parse().ok(),
        port.and_then(|port| port.parse().ok()),
    )
}

/// Splits an iptables-save line into words; "quoted strings" (comments) stay one word.
fn split_words(line: &str) -> Vec<String> {
    let mut words = Vec::new();
    let mut word = String::new();
    let mut quoted = false;
    let mut chars = line.chars();
    while let Some(c) = chars.next() {
        match c {
            '\\' if quoted => word.extend(chars.next()),
            '"' => quoted = !quoted,
            c if c.is_whitespace() && !quoted => {
                if !word.is_empty() {
                    words.push(std::mem::take(&mut word));
                }
            }
            c => word.push(c),
        }
    }
    if !word.is_empty() {
        words.push(word);
    }
    words
}
