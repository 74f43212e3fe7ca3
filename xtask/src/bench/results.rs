//! The bench's results as data: every raw sample, and medians with min-max per configuration
//! with their ratios against `docker-like` and `limit` (east-west), `dnat` and
//! `docker-proxy` (published ports), `host-limit`, `host-proxy` and `host-dnat` (host
//! clients of a published port), `egress-docker-like` and `egress-limit` (egress), or
//! `overlay-docker-like` and `overlay-limit` (across nodes). Written out and rendered by
//! report.rs, drawn by chart.rs.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};
use serde_json::Value;

use super::Settings;
use super::host::Machine;
use super::workloads::{Better, Workload};
use super::worlds::Config;

/// One run of one workload in one configuration.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct Sample {
    pub round: u32,
    pub endpoints: usize,
    pub config: String,
    pub workload: String,
    pub metrics: BTreeMap<String, f64>,
    pub details: Value,
}

/// One metric of one workload in one configuration, over all rounds.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct Summary {
    pub endpoints: usize,
    pub workload: String,
    pub metric: String,
    pub unit: String,
    pub better: String,
    pub config: String,
    pub samples: usize,
    pub median: f64,
    pub min: f64,
    pub max: f64,
    /// Median over docker-like's median (and limit's) for the same workload and metric (for
    /// egress: over egress-docker-like's and egress-limit's; across nodes, over
    /// overlay-docker-like's and overlay-limit's).
    pub vs_docker_like: Option<f64>,
    pub vs_limit: Option<f64>,
    /// The same over dnat's and docker-proxy's, for the published-port workloads (for the
    /// host clients: over host-limit's in vs_limit, host-dnat's, host-proxy's).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub vs_dnat: Option<f64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub vs_docker_proxy: Option<f64>,
}

impl Summary {
    /// This row's median over REFERENCE's, for one of the references of its section.
    pub fn ratio_to(&self, reference: Config) -> Option<f64> {
        match reference {
            Config::DockerLike | Config::EgressDocker | Config::OverlayDocker => {
                self.vs_docker_like
            }
            Config::Limit | Config::HostLimit | Config::EgressLimit | Config::OverlayLimit => {
                self.vs_limit
            }
            Config::Dnat | Config::HostDnat => self.vs_dnat,
            Config::DockerProxy | Config::HostProxy => self.vs_docker_proxy,
            _ => None,
        }
    }

    fn set_ratio(&mut self, reference: Config, ratio: Option<f64>) {
        match reference {
            Config::DockerLike | Config::EgressDocker | Config::OverlayDocker => {
                self.vs_docker_like = ratio
            }
            Config::Limit | Config::HostLimit | Config::EgressLimit | Config::OverlayLimit => {
                self.vs_limit = ratio
            }
            Config::Dnat | Config::HostDnat => self.vs_dnat = ratio,
            Config::DockerProxy | Config::HostProxy => self.vs_docker_proxy = ratio,
            _ => {}
        }
    }
}

/// The field of a summary row (in bench.json) that holds its ratio to REFERENCE.
#[cfg(test)]
pub fn ratio_field(reference: Config) -> &'static str {
    match reference {
        Config::DockerLike | Config::EgressDocker | Config::OverlayDocker => "vs_docker_like",
        Config::Dnat | Config::HostDnat => "vs_dnat",
        Config::DockerProxy | Config::HostProxy => "vs_docker_proxy",
        _ => "vs_limit",
    }
}

/// The configurations every row of a workload is compared with.
pub fn references(workload: Workload) -> &'static [Config] {
    if workload.is_published() {
        &[Config::Dnat, Config::DockerProxy]
    } else if workload.is_host() {
        &[Config::HostLimit, Config::HostProxy, Config::HostDnat]
    } else if workload.is_egress() {
        &[Config::EgressDocker, Config::EgressLimit]
    } else if workload.is_overlay() {
        &[Config::OverlayDocker, Config::OverlayLimit]
    } else {
        &[Config::DockerLike, Config::Limit]
    }
}

/// The configurations a workload runs in.
pub fn configs(workload: Workload) -> &'static [Config] {
    if workload.is_published() {
        &Config::PUBLISHED
    } else if workload.is_host() {
        &Config::HOST
    } else if workload.is_egress() {
        &Config::EGRESS
    } else if workload.is_overlay() {
        &Config::OVERLAY
    } else {
        &Config::EAST_WEST
    }
}

#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct ConfigDescription {
    pub name: String,
    pub description: String,
}

#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct Report {
    pub command: String,
    /// What the measured xbr binary was built from.
    #[serde(default)]
    pub xbr_source: Option<String>,
    pub machine: Machine,
    pub settings: Settings,
    pub configurations: Vec<ConfigDescription>,
    pub notes: Vec<String>,
    pub started_unix: u64,
    pub wall_seconds: f64,
    pub samples: Vec<Sample>,
    pub summary: Vec<Summary>,
    /// ns per run of xbr's tc program, from the kernel's BPF run-time statistics.
    pub xbr_program: Option<Value>,
    /// `xbr stats --json` after the base rounds: what took the fast path.
    pub xbr_stats: Option<Value>,
    /// Kernel memory of one attachment, computed (absent in reports from before it).
    #[serde(default)]
    pub memory: Vec<super::memory::MemoryRow>,
    /// ... and as the kernel reported it for the bench's attachment.
    #[serde(default)]
    pub memory_measured: Vec<super::memory::Measured>,
}

pub fn median(values: &[f64]) -> f64 {
    let mut sorted = values.to_vec();
    sorted.sort_by(f64::total_cmp);
    let middle = sorted.len() / 2;
    if sorted.is_empty() {
        f64::NAN
    } else if sorted.len() % 2 == 1 {
        sorted[middle]
    } else {
        (sorted[middle - 1] + sorted[middle]) / 2.0
    }
}

/// Medians and ranges, in table order: endpoint count, workload, metric, configuration.
pub fn summarize(samples: &[Sample], endpoint_counts: &[usize]) -> Vec<Summary> {
    let mut summary = Vec::new();
    for &endpoints in endpoint_counts {
        for workload in Workload::ALL {
            for metric in workload.metrics() {
                let mut rows = Vec::new();
                for &config in configs(workload) {
                    let values: Vec<f64> = samples
                        .iter()
                        .filter(|s| {
                            s.endpoints == endpoints
                                && s.workload == workload.id()
                                && s.config == config.name()
                        })
                        .filter_map(|s| s.metrics.get(metric.key).copied())
                        .collect();
                    if values.is_empty() {
                        continue;
                    }
                    rows.push(Summary {
                        endpoints,
                        workload: workload.id().to_owned(),
                        metric: metric.key.to_owned(),
                        unit: metric.unit.to_owned(),
                        better: match metric.better {
                            Better::Higher => "higher",
                            Better::Lower => "lower",
                        }
                        .to_owned(),
                        config: config.name().to_owned(),
                        samples: values.len(),
                        median: median(&values),
                        min: values.iter().copied().fold(f64::INFINITY, f64::min),
                        max: values.iter().copied().fold(f64::NEG_INFINITY, f64::max),
                        vs_docker_like: None,
                        vs_limit: None,
                        vs_dnat: None,
                        vs_docker_proxy: None,
                    });
                }
                let reference = |config: Config| {
                    rows.iter()
                        .find(|row| row.config == config.name())
                        .map(|row| row.median)
                        .filter(|median| *median > 0.0)
                };
                let medians: Vec<(Config, Option<f64>)> = references(workload)
                    .iter()
                    .map(|&config| (config, reference(config)))
                    .collect();
                for row in &mut rows {
                    for &(config, median) in &medians {
                        row.set_ratio(config, median.map(|median| row.median / median));
                    }
                }
                summary.extend(rows);
            }
        }
    }
    summary
}

impl Report {
    pub fn find(
        &self,
        endpoints: usize,
        workload: Workload,
        metric: &str,
        config: Config,
    ) -> Option<&Summary> {
        self.summary.iter().find(|row| {
            row.endpoints == endpoints
                && row.workload == workload.id()
                && row.metric == metric
                && row.config == config.name()
        })
    }

    /// fast_path_packets over all packets xbr saw leave the containers, from `xbr stats`.
    pub fn fast_path_share(&self) -> Option<f64> {
        let endpoints = self.xbr_stats.as_ref()?["endpoints"].as_array()?;
        let sum = |key: &str| -> f64 {
            endpoints
                .iter()
                .filter_map(|endpoint| endpoint[key].as_f64())
                .sum()
        };
        let (fast, bridge) = (sum("fast_path_packets"), sum("bridge_packets"));
        (fast + bridge > 0.0).then(|| fast / (fast + bridge))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample(round: u32, config: Config, value: f64) -> Sample {
        Sample {
            round,
            endpoints: 10,
            config: config.name().to_owned(),
            workload: Workload::TcpOneStream.id().to_owned(),
            metrics: BTreeMap::from([("gbit_per_s".to_owned(), value)]),
            details: Value::Null,
        }
    }

    #[test]
    fn medians_of_odd_and_even_counts() {
        assert_eq!(median(&[3.0, 1.0, 2.0]), 2.0);
        assert_eq!(median(&[4.0, 1.0, 2.0, 3.0]), 2.5);
        assert!(median(&[]).is_nan());
    }

    #[test]
    fn summary_has_ranges_and_ratios() {
        let samples = vec![
            sample(1, Config::Limit, 10.0),
            sample(2, Config::Limit, 12.0),
            sample(3, Config::Limit, 11.0),
            sample(1, Config::DockerLike, 5.0),
            sample(2, Config::DockerLike, 6.0),
            sample(3, Config::DockerLike, 4.0),
            sample(1, Config::Xbr, 11.0),
        ];
        let summary = summarize(&samples, &[10]);
        assert_eq!(summary.len(), 3, "one row per configuration with samples");
        let xbr = summary.iter().find(|row| row.config == "xbr").unwrap();
        assert_eq!(xbr.vs_limit, Some(1.0));
        assert_eq!(xbr.vs_docker_like, Some(11.0 / 5.0));
        let limit = summary.iter().find(|row| row.config == "limit").unwrap();
        assert_eq!((limit.median, limit.min, limit.max), (11.0, 10.0, 12.0));
        assert_eq!(limit.better, "higher");
    }
}
