//! The bench's results (results.rs) as files: JSON, a terminal table, Markdown with the
//! findings, and the chart (chart.rs).

use std::fmt::Write as _;
use std::path::{Path, PathBuf};

use anyhow::Context as _;

use super::results::{Report, Sample, Summary};
use super::workloads::Workload;
use super::worlds::Config;

impl Report {
    /// The terminal table: one block per section, one row per configuration.
    pub fn table(&self) -> String {
        let mut out = String::new();
        if let Some(source) = &self.xbr_source {
            let _ = writeln!(out, "\n== xbr built from {source}");
        }
        for section in self.sections() {
            let _ = writeln!(
                out,
                "\n== {}: median [min - max] of {}; ratios are of medians",
                section.title,
                self.rounds_text()
            );
            // Wide enough for the section's longest names (egress-docker-like).
            let width = section
                .rows
                .iter()
                .map(|row| row.config.len())
                .max()
                .unwrap_or(0)
                .max(12);
            let ratio_width = section
                .references
                .iter()
                .map(|config| config.name().len() + 2)
                .max()
                .unwrap_or(0)
                .max(14);
            let columns: String = section
                .references
                .iter()
                .map(|config| format!(" {:>ratio_width$}", format!("x {}", config.name())))
                .collect();
            let _ = writeln!(
                out,
                "   {:<width$} {:>10}  {:<21}{columns}",
                "config", "median", "[min - max]"
            );
            let mut heading = String::new();
            for row in section.rows {
                let title = self.row_title(row);
                if title != heading {
                    let _ = writeln!(out, "{title}");
                    heading = title;
                }
                let ratios: String = section
                    .references
                    .iter()
                    .map(|config| format!(" {:>ratio_width$}", ratio(row.ratio_to(*config))))
                    .collect();
                let _ = writeln!(
                    out,
                    "   {:<width$} {:>10}  {:<21}{ratios}",
                    row.config,
                    number(row.median),
                    format!("[{} - {}]", number(row.min), number(row.max)),
                );
            }
        }
        out.push_str(&super::memory::render(
            &self.memory,
            &self.memory_measured,
            false,
        ));
        out.push_str(&self.findings(false));
        out
    }

    /// The same as Markdown, for BENCHMARKS.md.
    pub fn markdown(&self) -> String {
        let mut out = String::new();
        if let Some(source) = &self.xbr_source {
            let _ = writeln!(out, "xbr built from {source}; `{}`.", self.command);
        }
        for section in self.sections() {
            let mut title = section.title.clone();
            title[..1].make_ascii_uppercase();
            let _ = writeln!(
                out,
                "\n**{title}** (median [min - max] of {}; ratios are of medians)\n",
                self.rounds_text()
            );
            let names: String = section
                .references
                .iter()
                .map(|config| format!(" × {} |", config.name()))
                .collect();
            let aligns = " ---: |".repeat(section.references.len());
            let _ = writeln!(
                out,
                "| workload | config | median | [min - max] |{names}\n\
                 | --- | --- | ---: | ---: |{aligns}"
            );
            let mut heading = String::new();
            for row in section.rows {
                let title = self.row_title(row);
                let shown = if title == heading {
                    String::new()
                } else {
                    title.clone()
                };
                heading = title;
                let ratios: String = section
                    .references
                    .iter()
                    .map(|config| format!(" {} |", ratio(row.ratio_to(*config))))
                    .collect();
                let _ = writeln!(
                    out,
                    "| {shown} | {} | {} | [{} - {}] |{ratios}",
                    row.config,
                    number(row.median),
                    number(row.min),
                    number(row.max),
                );
            }
        }
        let overlay = self.overlay_markdown();
        if !overlay.is_empty() {
            let _ = writeln!(
                out,
                "\n**Across nodes (overlay)**, as BENCHMARKS.md shows it\n\n{overlay}"
            );
        }
        out.push_str(&super::memory::render(
            &self.memory,
            &self.memory_measured,
            true,
        ));
        out.push('\n');
        out.push_str(&self.findings(true));
        out
    }

    fn rounds_text(&self) -> String {
        format!(
            "{} round{}",
            self.settings.rounds,
            if self.settings.rounds == 1 { "" } else { "s" }
        )
    }

    /// East-west at each endpoint count, then the published port, then its host clients, then
    /// egress.
    fn sections(&self) -> Vec<Section<'_>> {
        let published =
            |row: &Summary| Workload::from_id(&row.workload).is_some_and(Workload::is_published);
        let host = |row: &Summary| Workload::from_id(&row.workload).is_some_and(Workload::is_host);
        let egress =
            |row: &Summary| Workload::from_id(&row.workload).is_some_and(Workload::is_egress);
        let overlay =
            |row: &Summary| Workload::from_id(&row.workload).is_some_and(Workload::is_overlay);
        let east_west =
            |row: &Summary| !published(row) && !host(row) && !egress(row) && !overlay(row);
        let mut counts: Vec<usize> = self
            .summary
            .iter()
            .filter(|row| east_west(row))
            .map(|row| row.endpoints)
            .collect();
        counts.dedup();
        let mut sections: Vec<Section> = counts
            .into_iter()
            .map(|endpoints| Section {
                title: format!("east-west, {endpoints} endpoints on each bridge"),
                references: &[Config::DockerLike, Config::Limit],
                rows: self
                    .summary
                    .iter()
                    .filter(|row| row.endpoints == endpoints && east_west(row))
                    .collect(),
            })
            .collect();
        let rows: Vec<&Summary> = self.summary.iter().filter(|row| published(row)).collect();
        if let Some(first) = rows.first() {
            sections.push(Section {
                title: format!(
                    "published port, from outside through the uplink to a container, {} \
                     endpoints on the bridge",
                    first.endpoints
                ),
                references: &[Config::Dnat, Config::DockerProxy],
                rows,
            });
        }
        let rows: Vec<&Summary> = self.summary.iter().filter(|row| host(row)).collect();
        if let Some(first) = rows.first() {
            sections.push(Section {
                title: format!(
                    "host clients of a published port, from the bridge's namespace to \
                     127.0.0.1:8080 (host-limit: to the container), {} endpoints on the bridge",
                    first.endpoints
                ),
                references: &[Config::HostLimit, Config::HostProxy, Config::HostDnat],
                rows,
            });
        }
        let rows: Vec<&Summary> = self.summary.iter().filter(|row| egress(row)).collect();
        if let Some(first) = rows.first() {
            sections.push(Section {
                title: format!(
                    "egress, from a container through the uplink to a server outside that has no \
                     route back (egress-limit: routed, no bridge, no NAT), {} endpoints on the \
                     bridge",
                    first.endpoints
                ),
                references: &[Config::EgressDocker, Config::EgressLimit],
                rows,
            });
        }
        let rows: Vec<&Summary> = self.summary.iter().filter(|row| overlay(row)).collect();
        if !rows.is_empty() {
            sections.push(Section {
                title: OVERLAY_TITLE.to_owned(),
                references: &[Config::OverlayDocker, Config::OverlayLimit],
                rows,
            });
        }
        sections
    }

    /// The overlay results as BENCHMARKS.md's "Across nodes (overlay)" table shows them: one
    /// row per workload metric, one column per world, then xbr's ratios; empty without them.
    pub fn overlay_markdown(&self) -> String {
        let endpoints = self.settings.endpoints;
        let find = |workload: Workload, metric: &str, config: Config| {
            self.find(endpoints, workload, metric, config)
        };
        if !Config::OVERLAY.iter().any(|config| {
            Workload::OVERLAY.iter().any(|workload| {
                workload
                    .metrics()
                    .iter()
                    .any(|metric| find(*workload, metric.key, *config).is_some())
            })
        }) {
            return String::new();
        }
        let mut out = String::new();
        let _ = writeln!(
            out,
            "| median of {} [min - max] | overlay-limit | overlay-docker-like | overlay-xbr | \
             xbr × docker-like | xbr × limit |\n| --- | ---: | ---: | ---: | ---: | ---: |",
            self.rounds_text()
        );
        let cell = |row: Option<&Summary>, bold: bool| {
            row.map_or_else(
                || "-".to_owned(),
                |row| {
                    let median = number(row.median);
                    let median = if bold {
                        format!("**{median}**")
                    } else {
                        median
                    };
                    format!("{median} [{} - {}]", number(row.min), number(row.max))
                },
            )
        };
        let rows: [(&str, Workload, &str); 4] = [
            (
                "TCP stream (iperf3, 1 stream), Gbit/s",
                Workload::OverlayStream,
                "gbit_per_s",
            ),
            (
                "UDP 64 B (iperf3), kpps received",
                Workload::OverlayUdp64,
                "kpps",
            ),
            (
                "UDP 64 B (iperf3), kpps sent",
                Workload::OverlayUdp64,
                "sent_kpps",
            ),
            (
                "round trips/s on one connection (sockperf ping-pong TCP), thousands",
                Workload::OverlayRr,
                "k_round_trips_per_s",
            ),
        ];
        for (label, workload, metric) in rows {
            let xbr = find(workload, metric, Config::OverlayXbr);
            let _ = writeln!(
                out,
                "| {label} | {} | {} | {} | {} | {} |",
                cell(find(workload, metric, Config::OverlayLimit), false),
                cell(find(workload, metric, Config::OverlayDocker), false),
                cell(xbr, true),
                ratio(xbr.and_then(|row| row.vs_docker_like)),
                ratio(xbr.and_then(|row| row.vs_limit)),
            );
        }
        // Latency: p50 / p99 medians side by side, as the egress table has them.
        let pair = |config: Config| {
            let p50 = find(Workload::OverlayRr, "p50_rtt_us", config);
            let p99 = find(Workload::OverlayRr, "p99_rtt_us", config);
            (p50, p99)
        };
        let (xbr50, xbr99) = pair(Config::OverlayXbr);
        if xbr50.is_some() || xbr99.is_some() {
            let medians = |config: Config| {
                let (p50, p99) = pair(config);
                let show = |row: Option<&Summary>| {
                    row.map_or_else(|| "-".to_owned(), |r| number(r.median))
                };
                format!("{} / {}", show(p50), show(p99))
            };
            let ratios = |reference: fn(&Summary) -> Option<f64>| {
                format!(
                    "{} / {}",
                    ratio(xbr50.and_then(reference)),
                    ratio(xbr99.and_then(reference))
                )
            };
            let _ = writeln!(
                out,
                "| RTT p50 / p99, µs (lower is better) | {} | {} | **{}** | {} | {} |",
                medians(Config::OverlayLimit),
                medians(Config::OverlayDocker),
                medians(Config::OverlayXbr),
                ratios(|row| row.vs_docker_like),
                ratios(|row| row.vs_limit),
            );
        }
        out
    }

    fn row_title(&self, row: &Summary) -> String {
        let workload = Workload::from_id(&row.workload).map_or_else(
            || row.workload.clone(),
            |workload| workload.label().to_owned(),
        );
        let rate = if row.workload == Workload::CpuPerPacket.id() {
            format!(
                " ({} kpps offered)",
                number(self.settings.cpu_pps as f64 / 1e3)
            )
        } else {
            String::new()
        };
        format!("{workload}{rate}, {} ({} is better)", row.unit, row.better)
    }

    /// The targets, checked (never asserted), and what xbr's own counters say.
    /// Under a SYN flood: xbr keeps >= 0.9x its own unflooded connections/s and stays ahead of
    /// dnat and docker-proxy (flooded too); what the flood cost in failed connections; and
    /// runs whose flood fell short of its rate.
    fn flood_findings(&self, bullet: &str) -> String {
        let mut out = String::new();
        let flooded = Workload::TcpConnectionsFlooded;
        let key = "connections_per_s";
        for config in [Config::XbrNat, Config::XbrNatXdp] {
            let Some(row) = self.summary.iter().find(|row| {
                row.workload == flooded.id() && row.metric == key && row.config == config.name()
            }) else {
                continue;
            };
            if let Some(own) = self.summary.iter().find(|r| {
                r.workload == Workload::TcpConnections.id()
                    && r.config == config.name()
                    && r.median > 0.0
            }) {
                let ratio = row.median / own.median;
                let verdict = if ratio >= 0.9 {
                    "met".to_owned()
                } else {
                    format!("missed by {}", percent((0.9 - ratio) / 0.9))
                };
                let _ = writeln!(
                    out,
                    "{bullet}{} under a SYN flood >= 0.9x its own unflooded connections/s: \
                     {ratio:.2}x ({verdict})",
                    config.name()
                );
            }
            for reference in [Config::Dnat, Config::DockerProxy] {
                let Some(ratio) = row.ratio_to(reference) else {
                    continue;
                };
                let verdict = if ratio >= 1.0 {
                    "met".to_owned()
                } else {
                    format!("missed by {}", percent(1.0 - ratio))
                };
                let _ = writeln!(
                    out,
                    "{bullet}{} ahead of {} under a SYN flood: {ratio:.2}x ({verdict})",
                    config.name(),
                    reference.name()
                );
            }
        }
        let samples: Vec<&Sample> = self
            .samples
            .iter()
            .filter(|sample| sample.workload == flooded.id())
            .collect();
        if samples.is_empty() {
            return out;
        }
        let mut failed = Vec::new();
        let mut short = Vec::new();
        for sample in &samples {
            let details = &sample.details;
            let count = |when: &str, what: &str| details[when][what].as_u64().unwrap_or(0);
            let lost = count("during", "failed") + count("after", "failed");
            if lost > 0 {
                failed.push(format!(
                    "{} round {}: {} of {} during, {} of {} after",
                    sample.config,
                    sample.round,
                    count("during", "failed"),
                    count("during", "failed") + count("during", "completed"),
                    count("after", "failed"),
                    count("after", "failed") + count("after", "completed"),
                ));
            }
            let rate = details["flood"]["sent_pps"].as_f64().unwrap_or(0.0);
            if rate < 0.9 * f64::from(self.settings.flood_pps) {
                short.push(format!(
                    "{} round {} ({} SYN/s)",
                    sample.config,
                    sample.round,
                    number(rate)
                ));
            }
        }
        let _ = writeln!(
            out,
            "{bullet}failed legitimate connections under the SYN flood ({} SYN/s): {}",
            number(f64::from(self.settings.flood_pps)),
            if failed.is_empty() {
                "none".to_owned()
            } else {
                failed.join("; ")
            }
        );
        if !short.is_empty() {
            let _ = writeln!(
                out,
                "{bullet}note: the flood sent less than 90% of its rate in: {}",
                short.join(", ")
            );
        }
        out
    }

    /// Egress targets: xbr >= 1.3x docker-like's connections/s, and >= 0.9x the limit on every
    /// egress workload's rate (higher-is-better metrics).
    fn egress_findings(&self, bullet: &str) -> String {
        let mut out = String::new();
        let verdict = |ratio: f64, target: f64| {
            if ratio >= target {
                "met".to_owned()
            } else {
                format!("missed by {}", percent((target - ratio) / target))
            }
        };
        for row in self.summary.iter().filter(|row| {
            row.config == Config::EgressXbr.name()
                && row.workload == Workload::EgressConnections.id()
        }) {
            let Some(ratio) = row.vs_docker_like else {
                continue;
            };
            let _ = writeln!(
                out,
                "{bullet}egress-xbr >= 1.3x egress-docker-like, {} {}: {ratio:.2}x ({})",
                row.workload,
                row.unit,
                verdict(ratio, 1.3)
            );
        }
        for row in self.summary.iter().filter(|row| {
            row.config == Config::EgressXbr.name()
                && row.better == "higher"
                && Workload::from_id(&row.workload).is_some_and(Workload::is_egress)
        }) {
            let Some(ratio) = row.vs_limit else {
                continue;
            };
            let _ = writeln!(
                out,
                "{bullet}egress-xbr >= 0.9x egress-limit, {} {}: {ratio:.2}x ({})",
                row.workload,
                row.unit,
                verdict(ratio, 0.9)
            );
        }
        // Flows xbr left to the kernel path (which, without a MASQUERADE rule, cannot reach
        // the outside) and exchanges that failed, per run: within the path check's slack, but
        // worth knowing.
        let leaks: Vec<String> = self
            .samples
            .iter()
            .filter(|sample| sample.config == Config::EgressXbr.name())
            .filter_map(|sample| {
                let path = &sample.details["path"];
                let left = path["xbr_egress_kernel"].as_u64().unwrap_or(0);
                let forwarded = path["kernel_forwarded"].as_u64().unwrap_or(0);
                let failed = sample.details["failed"].as_u64().unwrap_or(0);
                let exhausted =
                    sample.details["xbr_nat"]["events"]["egress_ports_exhausted"].as_u64();
                (left + forwarded + failed > 0).then(|| {
                    format!(
                        "{} round {}: {left} frames left to the kernel, {forwarded} forwarded by \
                         it, {failed} failed exchanges{}",
                        sample.workload,
                        sample.round,
                        exhausted.map_or_else(String::new, |n| format!(
                            ", egress_ports_exhausted {n} so far"
                        ))
                    )
                })
            })
            .collect();
        if !leaks.is_empty() {
            let _ = writeln!(
                out,
                "{bullet}note: egress-xbr runs where flows took the kernel path: {}",
                leaks.join("; ")
            );
        }
        out
    }

    /// Overlay targets: xbr >= 1.3x docker-like on round trips/s and 64-byte UDP, and >= 0.9x
    /// the limit on every overlay workload's rate (higher-is-better metrics).
    fn overlay_findings(&self, bullet: &str) -> String {
        let mut out = String::new();
        let verdict = |ratio: f64, target: f64| {
            if ratio >= target {
                "met".to_owned()
            } else {
                format!("missed by {}", percent((target - ratio) / target))
            }
        };
        let xbr_rates = || {
            self.summary.iter().filter(|row| {
                row.config == Config::OverlayXbr.name()
                    && row.better == "higher"
                    && Workload::from_id(&row.workload).is_some_and(Workload::is_overlay)
            })
        };
        for row in xbr_rates().filter(|row| {
            row.workload == Workload::OverlayRr.id() || row.workload == Workload::OverlayUdp64.id()
        }) {
            let Some(ratio) = row.vs_docker_like else {
                continue;
            };
            let _ = writeln!(
                out,
                "{bullet}overlay-xbr >= 1.3x overlay-docker-like, {} {}: {ratio:.2}x ({})",
                row.workload,
                row.unit,
                verdict(ratio, 1.3)
            );
        }
        for row in xbr_rates() {
            let Some(ratio) = row.vs_limit else {
                continue;
            };
            let _ = writeln!(
                out,
                "{bullet}overlay-xbr >= 0.9x overlay-limit, {} {}: {ratio:.2}x ({})",
                row.workload,
                row.unit,
                verdict(ratio, 0.9)
            );
        }
        out
    }

    fn findings(&self, markdown: bool) -> String {
        let bullet = if markdown { "- " } else { "   " };
        let mut out = String::new();
        let base = self.settings.endpoints;
        let _ = writeln!(
            out,
            "{}",
            if markdown {
                "**Targets** (shown, not asserted)\n"
            } else {
                "\n== targets (shown, not asserted)"
            }
        );
        for row in self.summary.iter().filter(|row| {
            row.config == Config::Xbr.name() && row.better == "higher" && row.vs_limit.is_some()
        }) {
            let ratio_to_limit = row.vs_limit.unwrap_or(f64::NAN);
            let verdict = if ratio_to_limit >= 0.95 {
                "met".to_owned()
            } else {
                format!("missed by {}", percent((0.95 - ratio_to_limit) / 0.95))
            };
            let _ = writeln!(
                out,
                "{bullet}xbr >= 0.95x limit, {} at {} endpoints: {:.2}x ({verdict})",
                self.row_title(row),
                row.endpoints,
                ratio_to_limit
            );
        }
        for row in self
            .summary
            .iter()
            .filter(|row| row.config == Config::HostXbr.name())
        {
            let Some(ratio_to_limit) = row.vs_limit else {
                continue;
            };
            let verdict = if ratio_to_limit >= 0.95 {
                "met".to_owned()
            } else {
                format!("missed by {}", percent((0.95 - ratio_to_limit) / 0.95))
            };
            let _ = writeln!(
                out,
                "{bullet}host-xbr >= 0.95x host-limit, {}: {ratio_to_limit:.2}x ({verdict})",
                self.row_title(row)
            );
        }
        for row in self.summary.iter().filter(|row| {
            row.config == Config::Xbr.name() && row.workload == Workload::CpuPerPacket.id()
        }) {
            let Some(ratio_to_docker) = row.vs_docker_like else {
                continue;
            };
            let verdict = if ratio_to_docker <= 0.6 {
                "met".to_owned()
            } else {
                format!("missed by {}", percent((ratio_to_docker - 0.6) / 0.6))
            };
            let _ = writeln!(
                out,
                "{bullet}xbr CPU per packet <= 0.6x docker-like ({}) at {} endpoints: \
                 {ratio_to_docker:.2}x ({verdict})",
                row.unit, row.endpoints
            );
        }
        // What each configuration adds to the limit's cost: the part a datapath can save.
        for row in self.summary.iter().filter(|row| {
            row.config == Config::Xbr.name() && row.workload == Workload::CpuPerPacket.id()
        }) {
            let median = |config: Config| {
                self.find(row.endpoints, Workload::CpuPerPacket, &row.metric, config)
                    .map(|row| row.median)
            };
            if let (Some(limit), Some(docker_like), Some(xbr)) = (
                median(Config::Limit),
                median(Config::DockerLike),
                median(Config::Xbr),
            ) && docker_like > limit
            {
                let removed = (1.0 - (xbr - limit) / (docker_like - limit)) * 100.0;
                let _ = writeln!(
                    out,
                    "{bullet}above the limit ({}, {} endpoints): docker-like adds {} ns per \
                     packet, xbr {} ns ({})",
                    row.unit,
                    row.endpoints,
                    number(docker_like - limit),
                    number(xbr - limit),
                    if removed > 100.0 {
                        "xbr at the limit, within noise".to_owned()
                    } else {
                        format!("{removed:.0}% of docker-like's path cost removed")
                    }
                );
            }
        }
        // Published ports: far ahead of the userland proxy, ahead of DNAT on new connections.
        let published_targets = [
            (
                Workload::TcpRequests,
                Config::DockerProxy,
                3.0,
                "far ahead of (>= 3x)",
            ),
            (Workload::TcpConnections, Config::Dnat, 1.0, "ahead of"),
        ];
        for (workload, reference, target, phrase) in published_targets {
            for config in [Config::XbrNat, Config::XbrNatXdp] {
                let Some(row) = self
                    .summary
                    .iter()
                    .find(|row| row.workload == workload.id() && row.config == config.name())
                else {
                    continue;
                };
                let Some(ratio) = row.ratio_to(reference) else {
                    continue;
                };
                let verdict = if ratio >= target {
                    "met".to_owned()
                } else {
                    format!("missed by {}", percent((target - ratio) / target))
                };
                let _ = writeln!(
                    out,
                    "{bullet}{} {phrase} {} on {}: {ratio:.2}x ({verdict})",
                    config.name(),
                    reference.name(),
                    row.unit
                );
            }
        }
        out.push_str(&self.flood_findings(bullet));
        out.push_str(&self.egress_findings(bullet));
        out.push_str(&self.overlay_findings(bullet));
        if let Some(program) = &self.xbr_program
            && let Some(ns) = program["ns_per_run"].as_f64()
        {
            let cpu = self
                .find(
                    base,
                    Workload::CpuPerPacket,
                    "task_ns_per_packet",
                    Config::Xbr,
                )
                .map(|row| {
                    format!(
                        "; compare {} ns of the bench's tasks per packet in the CPU workload",
                        number(row.median)
                    )
                })
                .unwrap_or_default();
            let _ = writeln!(
                out,
                "{bullet}xbr's tc program ran {} times at {ns:.0} ns per run (kernel BPF run-time \
                 statistics during one UDP 64 B run){cpu}",
                program["run_cnt"]
            );
        }
        if let Some(share) = self.fast_path_share() {
            let _ = writeln!(
                out,
                "{bullet}xbr's counters after the base rounds: {:.2}% of the frames from the \
                 containers took the fast path, the rest the bridge",
                share * 100.0
            );
        }
        let short: Vec<String> = self
            .samples
            .iter()
            .filter(|sample| sample.workload == Workload::CpuPerPacket.id())
            .filter_map(|sample| {
                let delivered = sample.details["delivered_pps"].as_f64()?;
                (delivered < 0.95 * f64::from(self.settings.cpu_pps)).then(|| {
                    format!(
                        "{} round {} at {} endpoints ({} pps)",
                        sample.config,
                        sample.round,
                        sample.endpoints,
                        number(delivered)
                    )
                })
            })
            .collect();
        if !short.is_empty() {
            let _ = writeln!(
                out,
                "{bullet}note: the CPU workload delivered less than 95% of the offered {} pps in: \
                 {}; its figures are per delivered packet",
                self.settings.cpu_pps,
                short.join(", ")
            );
        }
        for note in &self.notes {
            let _ = writeln!(out, "{bullet}note: {note}");
        }
        out
    }

    /// Writes bench.json (everything), bench.svg (the chart) and bench.md (the tables) into DIR.
    pub fn write(&self, dir: &Path) -> anyhow::Result<Written> {
        std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
        let written = Written {
            json: dir.join("bench.json"),
            svg: dir.join("bench.svg"),
            markdown: dir.join("bench.md"),
        };
        let json = serde_json::to_string_pretty(self).context("serializing the report")?;
        std::fs::write(&written.json, json + "\n")
            .with_context(|| format!("writing {}", written.json.display()))?;
        super::chart::draw(self, &written.svg)
            .with_context(|| format!("drawing {}", written.svg.display()))?;
        std::fs::write(&written.markdown, self.markdown())
            .with_context(|| format!("writing {}", written.markdown.display()))?;
        Ok(written)
    }
}

/// The overlay section's title.
const OVERLAY_TITLE: &str = "across nodes (overlay), from a container on one node to a container \
     on another over VXLAN (overlay-limit: the two nodes' own VXLAN devices, no bridge, no \
     container)";

/// One block of the tables.
struct Section<'a> {
    title: String,
    references: &'static [Config],
    rows: Vec<&'a Summary>,
}

pub struct Written {
    pub json: PathBuf,
    pub svg: PathBuf,
    pub markdown: PathBuf,
}

/// Three significant digits or so.
pub fn number(value: f64) -> String {
    let magnitude = value.abs();
    if magnitude >= 100.0 {
        format!("{value:.0}")
    } else if magnitude >= 10.0 {
        format!("{value:.1}")
    } else {
        format!("{value:.2}")
    }
}

/// A share as a percentage, with a decimal where it is small.
fn percent(share: f64) -> String {
    let percent = share * 100.0;
    if percent.abs() < 10.0 {
        format!("{percent:.1}%")
    } else {
        format!("{percent:.0}%")
    }
}

fn ratio(value: Option<f64>) -> String {
    value.map_or_else(|| "-".to_owned(), |value| format!("{value:.2}"))
}
