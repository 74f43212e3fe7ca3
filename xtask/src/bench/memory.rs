//! The bench's memory table: what one attachment locks in kernel memory, computed from xbr's
//! map definitions (`bridge_common::memory`, checked against the kernel's own figures by the
//! `memory` test) for a 2-CPU and a 64-CPU host, beside what the kernel reported for the
//! bench's own attachment.

use std::fmt::Write as _;

use bridge_common::memory::{Work, attachment_bytes};
use serde::{Deserialize, Serialize};

/// The CPU counts of the table: this project's machines, and a large server.
pub const CPUS: [u64; 2] = [2, 64];
/// `--max-flows` when not given, on a host with 15 GB of memory or more.
const MAX_FLOWS: u32 = 65536;

/// One workload of an attachment and its computed cost.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct MemoryRow {
    pub work: String,
    /// Bytes of map memory at each of `CPUS`.
    pub bytes: Vec<u64>,
}

/// The attachments of the table: 10 and 1000 endpoints, then a published port with no
/// connection and with 10,000.
pub fn table() -> Vec<MemoryRow> {
    let base = Work {
        cpus: 0,
        ports: 10,
        uplinks: 1,
        published: 0,
        connections: 0,
        max_flows: None,
        logging: false,
        socket_hooks: false,
        local_addresses: 0,
    };
    let published = Work {
        published: 1,
        max_flows: Some(MAX_FLOWS),
        ..base
    };
    [
        ("10 endpoints, nothing published", base),
        (
            "1000 endpoints, nothing published",
            Work {
                ports: 1000,
                ..base
            },
        ),
        ("10 endpoints, a published port, no connection", published),
        (
            "10 endpoints, a published port, 10,000 NATed connections",
            Work {
                connections: 10_000,
                ..published
            },
        ),
    ]
    .into_iter()
    .map(|(work_name, work)| MemoryRow {
        work: work_name.to_owned(),
        bytes: CPUS
            .iter()
            .map(|&cpus| attachment_bytes(&Work { cpus, ..work }))
            .collect(),
    })
    .collect()
}

/// What the kernel reported for the bench's xbr attachment (`xbr status --json`).
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct Measured {
    pub endpoints: usize,
    pub locked_bytes: u64,
    pub maps_bytes: u64,
}

fn mib(bytes: u64) -> String {
    if bytes < 1 << 20 {
        format!("{:.0} KiB", bytes as f64 / 1024.0)
    } else {
        format!("{:.1} MiB", bytes as f64 / f64::from(1 << 20))
    }
}

/// The table as Markdown (or plain text for the terminal).
pub fn render(rows: &[MemoryRow], measured: &[Measured], markdown: bool) -> String {
    let mut out = String::new();
    if rows.is_empty() {
        return out;
    }
    let headings: Vec<String> = CPUS.iter().map(|cpus| format!("{cpus} CPUs")).collect();
    if markdown {
        let _ = writeln!(
            out,
            "\n**Kernel memory of one attachment** (its maps, computed from their definitions; \
             the programs add about 56 KiB)\n\n| attachment | {} |\n| --- | ---: | ---: |",
            headings.join(" | ")
        );
    } else {
        let _ = writeln!(
            out,
            "\n== kernel memory of one attachment (maps, computed from their definitions)\n   {:<58} {:>10} {:>10}",
            "attachment", headings[0], headings[1]
        );
    }
    for row in rows {
        let bytes: Vec<String> = row.bytes.iter().map(|b| mib(*b)).collect();
        if markdown {
            let _ = writeln!(out, "| {} | {} |", row.work, bytes.join(" | "));
        } else {
            let _ = writeln!(out, "   {:<58} {:>10} {:>10}", row.work, bytes[0], bytes[1]);
        }
    }
    for seen in measured {
        let _ = writeln!(
            out,
            "{}measured here: the bench's attachment with {} endpoints locks {} ({} in maps), by the kernel's figures",
            if markdown { "\n" } else { "   " },
            seen.endpoints,
            mib(seen.locked_bytes),
            mib(seen.maps_bytes)
        );
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_table_grows_with_endpoints_cpus_and_connections() {
        let rows = table();
        eprintln!("{}", render(&rows, &[], false));
        assert_eq!(rows.len(), 4);
        for row in &rows {
            assert!(row.bytes[1] > row.bytes[0], "more CPUs cost more: {row:?}");
        }
        assert!(rows[1].bytes[0] > rows[0].bytes[0]);
        assert!(
            rows[2].bytes[0] > rows[0].bytes[0] + (8 << 20),
            "the LRU is preallocated"
        );
        assert!(rows[3].bytes[0] > rows[2].bytes[0]);
        // The target: at most 2 MB with nothing published, on 64 CPUs too.
        assert!(rows[0].bytes[1] < 2 << 20, "{:?}", rows[0]);
    }
}
