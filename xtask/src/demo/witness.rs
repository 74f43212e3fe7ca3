//! The bridge's own count of what it forwarded: an nftables table of the bridge family in the
//! lab's host namespace. Its forward hook sees every frame the bridge forwards and none that
//! xbr redirects past the bridge, so it witnesses the fast path without trusting xbr.

use anyhow::{Context as _, bail};
use serde_json::Value;

use crate::cmd;

const TABLE: &str = "xbr_demo";

/// Frames the bridge forwarded, by EtherType.
#[derive(Clone, Copy, Debug, Default)]
pub struct FrameCounts {
    pub ipv4: u64,
    pub ipv6: u64,
    pub arp: u64,
}

impl FrameCounts {
    pub fn ip(&self) -> u64 {
        self.ipv4 + self.ipv6
    }

    pub fn since(&self, earlier: &FrameCounts) -> FrameCounts {
        FrameCounts {
            ipv4: self.ipv4.saturating_sub(earlier.ipv4),
            ipv6: self.ipv6.saturating_sub(earlier.ipv6),
            arp: self.arp.saturating_sub(earlier.arp),
        }
    }
}

pub struct Witness {
    netns: String,
}

impl Witness {
    /// Creates the table in NETNS, replacing one left from an earlier run.
    pub fn install(netns: &str) -> anyhow::Result<Witness> {
        let ruleset = format!(
            "add table bridge {TABLE}\n\
             delete table bridge {TABLE}\n\
             table bridge {TABLE} {{\n\
             \tchain forward {{\n\
             \t\ttype filter hook forward priority 0; policy accept;\n\
             \t\tether type ip counter\n\
             \t\tether type ip6 counter\n\
             \t\tether type arp counter\n\
             \t}}\n\
             }}\n"
        );
        let doing =
            format!("adding the nftables witness (table bridge {TABLE}) in namespace {netns}");
        cmd::run_with_input(
            cmd::in_netns(netns, "nft").args(["-f", "-"]),
            &ruleset,
            &doing,
        )?;
        Ok(Witness {
            netns: netns.to_owned(),
        })
    }

    pub fn read(&self) -> anyhow::Result<FrameCounts> {
        let doing = format!(
            "reading the bridge's frame counters (table bridge {TABLE} in {})",
            self.netns
        );
        let listing = cmd::output(
            cmd::in_netns(&self.netns, "nft").args(["-j", "list", "table", "bridge", TABLE]),
            &doing,
        )?;
        let listing: Value = serde_json::from_str(&listing)
            .with_context(|| format!("{doing}: nft -j printed no JSON"))?;
        counts(&listing).with_context(|| doing.clone())
    }
}

/// Sums each rule's counter under the EtherType its match names (`ether type ip` -> "ip").
fn counts(listing: &Value) -> anyhow::Result<FrameCounts> {
    let items = listing["nftables"]
        .as_array()
        .context("no \"nftables\" array in nft's JSON")?;
    let mut counts = FrameCounts::default();
    let mut rules = 0;
    for rule in items.iter().filter_map(|item| item.get("rule")) {
        let exprs = rule["expr"]
            .as_array()
            .map(Vec::as_slice)
            .unwrap_or_default();
        let ether_type = exprs
            .iter()
            .find_map(|expr| expr["match"]["right"].as_str());
        let packets = exprs
            .iter()
            .find_map(|expr| expr["counter"]["packets"].as_u64());
        let (Some(ether_type), Some(packets)) = (ether_type, packets) else {
            continue;
        };
        match ether_type {
            "ip" => counts.ipv4 += packets,
            "ip6" => counts.ipv6 += packets,
            "arp" => counts.arp += packets,
            _ => continue,
        }
        rules += 1;
    }
    if rules != 3 {
        bail!("expected 3 counting rules (ip, ip6, arp), found {rules}");
    }
    Ok(counts)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn counts_each_ether_type() {
        let rule = |ether_type: &str, packets: u64| {
            serde_json::json!({"rule": {"family": "bridge", "table": TABLE, "chain": "forward", "expr": [
                {"match": {"op": "==", "left": {"payload": {"protocol": "ether", "field": "type"}}, "right": ether_type}},
                {"counter": {"packets": packets, "bytes": packets * 100}}
            ]}})
        };
        let listing = serde_json::json!({"nftables": [
            {"metainfo": {"version": "1.0.6"}},
            {"table": {"family": "bridge", "name": TABLE}},
            rule("ip", 7), rule("ip6", 2), rule("arp", 4)
        ]});
        let counts = counts(&listing).unwrap();
        assert_eq!(
            (counts.ipv4, counts.ipv6, counts.arp, counts.ip()),
            (7, 2, 4, 9)
        );
    }
}
