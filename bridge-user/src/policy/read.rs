//! Reading the whole netfilter ruleset of the current network namespace, whoever wrote it:
//! every nftables table of every family (iptables-nft, firewalld, Docker and native rules
//! alike), the details of iptables-nft's extension rules, and the legacy xtables where they
//! are in use; plus br_netfilter's switches, which decide whether bridged frames meet the
//! ip and ip6 hooks at all. Read-only: nothing here changes the ruleset.

use std::process::Command;

use super::{
    model::{Family, Origin, Ruleset},
    nft, xtables,
};

/// br_netfilter's switches: whether bridged IPv4 / IPv6 frames meet the ip / ip6 hooks.
const BRIDGE_NF_CALL_IPTABLES: &str = "/proc/sys/net/bridge/bridge-nf-call-iptables";
const BRIDGE_NF_CALL_IP6TABLES: &str = "/proc/sys/net/bridge/bridge-nf-call-ip6tables";
/// The legacy xtables tables in use in this namespace (empty when none ever was).
const LEGACY_IPV4_TABLES: &str = "/proc/net/ip_tables_names";
const LEGACY_IPV6_TABLES: &str = "/proc/net/ip6_tables_names";

/// The netfilter state of one namespace, as far as xbr's classes are concerned.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Firewall {
    pub ruleset: Ruleset,
    /// br_netfilter hands bridged IPv4 frames to the ip hooks (bridge-nf-call-iptables).
    pub bridged_ipv4: bool,
    /// ... and bridged IPv6 frames to the ip6 hooks (bridge-nf-call-ip6tables).
    pub bridged_ipv6: bool,
}

/// Why the ruleset cannot be read. Kept in the plan and shown by `status`, so it is plain
/// data (Clone, Eq): an I/O error is kept as its kind and text.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum ReadError {
    #[error("{tool} is not installed (install the nftables and iptables packages)")]
    NotInstalled { tool: String },
    #[error("cannot run {tool}: {reason}")]
    CannotRun {
        tool: String,
        kind: std::io::ErrorKind,
        reason: String,
    },
    #[error("`{command}` failed: {stderr}")]
    Failed { command: String, stderr: String },
    /// nft's JSON does not parse as a ruleset.
    #[error("{0}")]
    Ruleset(String),
}

/// Reads the firewall of the calling thread's network namespace. An error says why it
/// cannot be read; then nothing can be accelerated.
pub fn read() -> Result<Firewall, ReadError> {
    let json = run("nft", &["-j", "list", "ruleset"])?;
    let mut ruleset = ruleset_from(&json, iptables_nft_save)?;
    for (names, family, tool) in [
        (LEGACY_IPV4_TABLES, Family::Ip, "iptables-legacy-save"),
        (LEGACY_IPV6_TABLES, Family::Ip6, "ip6tables-legacy-save"),
    ] {
        if legacy_in_use(names) {
            let save = run(tool, &[])?;
            ruleset
                .tables
                .extend(xtables::parse(&save, family, Origin::IptablesLegacy));
        }
    }
    Ok(Firewall {
        ruleset,
        bridged_ipv4: switch_on(BRIDGE_NF_CALL_IPTABLES),
        bridged_ipv6: switch_on(BRIDGE_NF_CALL_IP6TABLES),
    })
}

/// The ruleset in nft's JSON, with each table whose rules use xtables extensions read from
/// `xtables_save` (iptables-save's output for that table) instead, where it has it: nft's
/// JSON names an extension but not its options (which ports, which DNAT target).
pub(super) fn ruleset_from(
    json: &str,
    xtables_save: impl Fn(Family, &str) -> Option<String>,
) -> Result<Ruleset, ReadError> {
    let (mut ruleset, with_xtables) = nft::parse(json).map_err(ReadError::Ruleset)?;
    for (family, name) in with_xtables {
        let Some(save) = xtables_save(family, &name) else {
            continue;
        };
        let read = xtables::parse(&save, family, Origin::IptablesNft)
            .into_iter()
            .find(|t| t.name == name && !t.chains.is_empty());
        if let Some(table) = read {
            ruleset
                .tables
                .retain(|t| !(t.family == family && t.name == name));
            ruleset.tables.push(table);
        }
    }
    Ok(ruleset)
}

/// One table as the nf_tables backend's iptables-save prints it; `None` when it cannot
/// (then nft's JSON stands, where each extension may match or change anything).
fn iptables_nft_save(family: Family, table: &str) -> Option<String> {
    let tool = match family {
        Family::Ip => "iptables-nft-save",
        Family::Ip6 => "ip6tables-nft-save",
        _ => return None,
    };
    run(tool, &["-t", table]).ok()
}

fn run(tool: &str, args: &[&str]) -> Result<String, ReadError> {
    let output = Command::new(tool)
        .args(args)
        .output()
        .map_err(|e| match e.kind() {
            std::io::ErrorKind::NotFound => ReadError::NotInstalled {
                tool: tool.to_owned(),
            },
            kind => ReadError::CannotRun {
                tool: tool.to_owned(),
                kind,
                reason: e.to_string(),
            },
        })?;
    if !output.status.success() {
        return Err(ReadError::Failed {
            command: format!("{tool} {}", args.join(" ")),
            stderr: String::from_utf8_lossy(&output.stderr).trim().to_owned(),
        });
    }
    Ok(String::from_utf8_lossy(&output.stdout).into_owned())
}

/// What the ruleset's readers see that sends no nftables event: the legacy xtables rules
/// (where legacy tables are in use) and br_netfilter's switches. Compared, not parsed.
pub(super) fn unevented_state() -> String {
    let mut state = format!(
        "{} {}",
        switch_on(BRIDGE_NF_CALL_IPTABLES),
        switch_on(BRIDGE_NF_CALL_IP6TABLES)
    );
    for (names, tool) in [
        (LEGACY_IPV4_TABLES, "iptables-legacy-save"),
        (LEGACY_IPV6_TABLES, "ip6tables-legacy-save"),
    ] {
        if legacy_in_use(names) {
            // iptables-save stamps its output with the time: leave those comment lines out.
            let save = run(tool, &[]).unwrap_or_else(|why| why.to_string());
            state.extend(save.lines().filter(|line| !line.starts_with('#')));
        }
    }
    state
}

fn legacy_in_use(names: &str) -> bool {
    std::fs::read_to_string(names).is_ok_and(|names| !names.trim().is_empty())
}

/// A br_netfilter switch: off where br_netfilter is not loaded; on where it cannot be read
/// (the safe side: the rules then apply).
fn switch_on(path: &str) -> bool {
    match std::fs::read_to_string(path) {
        Ok(value) => value.trim() != "0",
        Err(e) => e.kind() != std::io::ErrorKind::NotFound,
    }
}
