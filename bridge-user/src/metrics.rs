//! Prometheus metrics of a follower (`--metrics ADDR`): per-endpoint datapath counters, the
//! verdicts, and the NAT connection tables (use, size, replacements, fallbacks), read from the
//! pinned maps at each scrape; and the follower's own reconcile count, duration and errors.
//! Served as text format at /metrics by a small HTTP server on its own thread.

use std::{
    net::SocketAddr,
    path::PathBuf,
    sync::{Arc, Mutex},
    time::Duration,
};

use prometheus_client::{
    collector::Collector,
    encoding::{DescriptorEncoder, EncodeMetric as _},
    metrics::{
        counter::ConstCounter, counter::Counter, family::Family, gauge::ConstGauge,
        histogram::Histogram,
    },
    registry::Registry,
};

use bridge_common::{NatEvent, Verdict};

use crate::{
    datapath::Pinned,
    error::{Error, Result},
    hooks::Drift,
    observe::format_mac,
};

#[derive(Debug)]
pub struct FollowMetrics {
    reconciles: Counter,
    errors: Counter,
    retries: Counter,
    /// Hooks put right, by what was wrong (`hooks::Drift::name`).
    repairs: Family<Vec<(String, String)>, Counter>,
    duration: Histogram,
}

impl Default for FollowMetrics {
    fn default() -> Self {
        FollowMetrics {
            reconciles: Counter::default(),
            errors: Counter::default(),
            retries: Counter::default(),
            repairs: Family::default(),
            // 100 µs to ~3 s.
            duration: Histogram::new(prometheus_client::metrics::histogram::exponential_buckets(
                0.0001, 2.0, 15,
            )),
        }
    }
}

impl FollowMetrics {
    pub fn reconciled(&self, took: Duration) {
        self.reconciles.inc();
        self.duration.observe(took.as_secs_f64());
    }

    pub fn error(&self) {
        self.errors.inc();
    }

    pub fn retry(&self) {
        self.retries.inc();
    }

    pub fn repaired(&self, drift: Drift) {
        self.repairs
            .get_or_create(&vec![("problem".to_owned(), drift.name().to_owned())])
            .inc();
    }
}

/// An attachment whose pinned counters are served: its pins, the namespace it lives in
/// (`None`: the server's own), and the labels its series carry (`bridge`, and `network` for
/// a Docker network).
#[derive(Clone, Debug)]
pub struct Watched {
    pub labels: Labels,
    pub root: PathBuf,
    pub bridge: String,
    pub netns: Option<PathBuf>,
}

impl Watched {
    /// Its attachment now; `None` when it was detached meanwhile (or its namespace is gone).
    fn snapshot(&self) -> Option<crate::datapath::Attachment> {
        let read = || {
            Pinned::open(&self.root, &self.bridge)
                .and_then(|p| p.snapshot())
                .ok()
        };
        match &self.netns {
            Some(path) => crate::netns::run_in_path(path, read).ok().flatten(),
            None => read(),
        }
    }
}

/// The attachments a server reports; a follower of many networks adds and removes its own.
pub type WatchList = Arc<Mutex<Vec<Watched>>>;

/// Reads the pinned counters of every watched attachment at scrape time.
#[derive(Debug)]
struct DatapathCollector {
    watched: WatchList,
}

pub type Labels = Vec<(String, String)>;

/// A per-port counter series: name, help, and which counter of `PortStats` it shows.
type Series = (
    &'static str,
    &'static str,
    fn(&bridge_common::PortStats) -> u64,
);

impl Collector for DatapathCollector {
    fn encode(&self, mut encoder: DescriptorEncoder) -> std::result::Result<(), std::fmt::Error> {
        let watched = self.watched.lock().expect("watch list").clone();
        // Detached meanwhile: nothing to report for it.
        let attachments: Vec<(Labels, crate::datapath::Attachment)> = watched
            .iter()
            .filter_map(|w| Some((w.labels.clone(), w.snapshot()?)))
            .collect();
        let series: [Series; 5] = [
            (
                "xbr_fast_path_packets",
                "Frames a container sent that took the fast path",
                |s| s.fast_path_packets,
            ),
            (
                "xbr_fast_path_bytes",
                "Bytes a container sent that took the fast path",
                |s| s.fast_path_bytes,
            ),
            (
                "xbr_bridge_packets",
                "Frames a container sent that were handed to the bridge",
                |s| s.bridge_packets,
            ),
            (
                "xbr_bridge_bytes",
                "Bytes a container sent that were handed to the bridge",
                |s| s.bridge_bytes,
            ),
            (
                "xbr_delivered_packets",
                "Frames the fast path delivered to a container",
                |s| s.delivered_packets,
            ),
        ];
        // A port's name, read in its namespace while the snapshot is taken would be better;
        // the ifindex stands in where the name is not this namespace's.
        let port_names: Vec<std::collections::BTreeMap<u32, String>> = watched
            .iter()
            .zip(&attachments)
            .map(|(w, (_, attachment))| {
                let ifindexes: Vec<u32> = attachment.stats.keys().copied().collect();
                let names = move || {
                    ifindexes
                        .iter()
                        .map(|i| {
                            let name = nix::net::if_::if_indextoname(*i)
                                .map(|n| n.to_string_lossy().into_owned())
                                .unwrap_or_else(|_| i.to_string());
                            (*i, name)
                        })
                        .collect()
                };
                match &w.netns {
                    Some(path) => crate::netns::run_in_path(path, names).unwrap_or_default(),
                    None => names(),
                }
            })
            .collect();
        for (name, help, value) in series {
            let counter_type = ConstCounter::new(0u64).metric_type();
            let mut family = encoder.encode_descriptor(name, help, None, counter_type)?;
            for ((base, attachment), names) in attachments.iter().zip(&port_names) {
                for (ifindex, stats) in &attachment.stats {
                    let mac = attachment
                        .ports
                        .get(ifindex)
                        .map(|record| format_mac(&record.endpoint_mac))
                        .unwrap_or_default();
                    let mut labels = base.clone();
                    labels.push((
                        "port".to_owned(),
                        names.get(ifindex).cloned().unwrap_or_default(),
                    ));
                    labels.push(("mac".to_owned(), mac));
                    ConstCounter::new(value(stats)).encode(family.encode_family(&labels)?)?;
                }
            }
        }
        let with = |base: &Labels, extra: &[(&str, String)]| -> Labels {
            let mut labels = base.clone();
            labels.extend(extra.iter().map(|(k, v)| ((*k).to_owned(), v.clone())));
            labels
        };
        let counter_type = ConstCounter::new(0u64).metric_type();
        let gauge_type = ConstGauge::new(0i64).metric_type();

        let mut family = encoder.encode_descriptor(
            "xbr_verdicts",
            "Frames the datapath decided, by verdict (xbr stats lists them)",
            None,
            counter_type,
        )?;
        for (base, attachment) in &attachments {
            for (verdict, count) in &attachment.verdicts {
                let labels = with(base, &[("verdict", verdict.name().to_owned())]);
                ConstCounter::new(*count).encode(family.encode_family(&labels)?)?;
            }
        }

        let tables = |nat: &crate::publish::NatState| {
            [
                ("established", nat.established, nat.established_capacity),
                ("transient", nat.transient, nat.transient_capacity),
            ]
        };
        let mut family = encoder.encode_descriptor(
            "xbr_nat_connections",
            "NATed connections now: established, or transient (not established, or closing)",
            None,
            gauge_type,
        )?;
        for (base, attachment) in &attachments {
            for (table, now, _) in tables(&attachment.nat) {
                let labels = with(base, &[("table", table.to_owned())]);
                ConstGauge::new(now as i64).encode(family.encode_family(&labels)?)?;
            }
        }
        let mut family = encoder.encode_descriptor(
            "xbr_nat_capacity_connections",
            "How many connections each NAT table holds",
            None,
            gauge_type,
        )?;
        for (base, attachment) in &attachments {
            for (table, _, capacity) in tables(&attachment.nat) {
                let labels = with(base, &[("table", table.to_owned())]);
                ConstGauge::new(capacity as i64).encode(family.encode_family(&labels)?)?;
            }
        }
        let mut family = encoder.encode_descriptor(
            "xbr_nat_transient_expired_entries",
            "Transient entries past their lifetime, ignored and waiting for reuse",
            None,
            gauge_type,
        )?;
        for (base, attachment) in &attachments {
            ConstGauge::new(attachment.nat.transient_expired as i64)
                .encode(family.encode_family(base)?)?;
        }
        let mut family = encoder.encode_descriptor(
            "xbr_nat_connection_events",
            "What happened to NATed connections: opened, established, established_table_full \
             (stayed transient), closed (FIN both ways), reset",
            None,
            counter_type,
        )?;
        for (base, attachment) in &attachments {
            for (event, count) in &attachment.nat.events {
                if matches!(
                    event,
                    NatEvent::TransientAdded
                        | NatEvent::TransientRemoved
                        | NatEvent::TransientSwept
                ) {
                    continue;
                }
                let labels = with(base, &[("event", event.name().to_owned())]);
                ConstCounter::new(*count).encode(family.encode_family(&labels)?)?;
            }
        }
        let mut family = encoder.encode_descriptor(
            "xbr_nat_replaced",
            "Transient connections (never established, or closing) replaced to make room for \
             new ones: what a flood cost",
            None,
            counter_type,
        )?;
        for (base, attachment) in &attachments {
            ConstCounter::new(attachment.nat.replaced).encode(family.encode_family(base)?)?;
        }
        let mut family = encoder.encode_descriptor(
            "xbr_nat_fallbacks",
            "New connections to published ports left to the kernel path for want of room",
            None,
            counter_type,
        )?;
        for (base, attachment) in &attachments {
            let fallbacks = attachment
                .verdicts
                .iter()
                .find(|(verdict, _)| *verdict == Verdict::NatTableFull)
                .map_or(0, |(_, count)| *count);
            ConstCounter::new(fallbacks).encode(family.encode_family(base)?)?;
        }
        if attachments.iter().any(|(_, a)| a.socket_hooks.is_some()) {
            let mut family = encoder.encode_descriptor(
                "xbr_host_clients",
                "What the socket hooks did with the host's own clients of a published port: \
                 connects and datagrams sent straight to the container, or left to the kernel \
                 path (held by a rule, or no container)",
                None,
                counter_type,
            )?;
            for (base, attachment) in &attachments {
                if attachment.socket_hooks.is_none() {
                    continue;
                }
                for published in &attachment.published {
                    let counts = &published.host_clients;
                    for (outcome, count) in [
                        ("connect", counts.connects),
                        ("datagram", counts.datagrams),
                        ("kernel_path", counts.kernel_path),
                    ] {
                        let labels = with(
                            base,
                            &[
                                ("published", published.spec.to_string()),
                                ("outcome", outcome.to_owned()),
                            ],
                        );
                        ConstCounter::new(count).encode(family.encode_family(&labels)?)?;
                    }
                }
            }
        }
        Ok(())
    }
}

/// One metrics server for many followers (`xbr follow`): their reconcile counters, summed,
/// and the attachments they follow, each listed while its follower runs.
#[derive(Clone, Debug, Default)]
pub struct SharedMetrics {
    pub metrics: Arc<FollowMetrics>,
    pub watched: WatchList,
}

impl SharedMetrics {
    /// Lists `watched` until the returned guard is dropped.
    pub fn list(&self, watched: Watched) -> Listed {
        self.watched
            .lock()
            .expect("watch list")
            .push(watched.clone());
        Listed {
            watched: self.watched.clone(),
            entry: (watched.netns, watched.bridge),
        }
    }
}

/// An attachment listed on a shared metrics server; unlisted on drop.
pub struct Listed {
    watched: WatchList,
    entry: (Option<PathBuf>, String),
}

impl Drop for Listed {
    fn drop(&mut self) {
        let mut list = self.watched.lock().expect("watch list");
        list.retain(|w| (w.netns.as_ref(), &w.bridge) != (self.entry.0.as_ref(), &self.entry.1));
    }
}

/// Serves /metrics on `address` from a thread of its own until the process exits.
pub fn serve_metrics(
    address: SocketAddr,
    watched: WatchList,
    metrics: Arc<FollowMetrics>,
) -> Result<()> {
    let server = tiny_http::Server::http(address).map_err(|e| {
        Error::io(
            format!("serving metrics on {address}"),
            std::io::Error::other(e.to_string()),
        )
    })?;
    let mut registry = Registry::default();
    registry.register(
        "xbr_reconciles",
        "Reconciles the follower ran",
        metrics.reconciles.clone(),
    );
    registry.register(
        "xbr_reconcile_errors",
        "Reconciles or observations that failed",
        metrics.errors.clone(),
    );
    registry.register(
        "xbr_reconcile_retries",
        "Reconciles retried after a failure",
        metrics.retries.clone(),
    );
    registry.register(
        "xbr_repairs",
        "Hooks found other than recorded and put right, by problem (missing, duplicated, unrecorded)",
        metrics.repairs.clone(),
    );
    registry.register(
        "xbr_reconcile_duration_seconds",
        "How long a reconcile took",
        metrics.duration.clone(),
    );
    registry.register_collector(Box::new(DatapathCollector { watched }));
    let registry = Mutex::new(registry);
    std::thread::Builder::new()
        .name("xbr-metrics".into())
        .spawn(move || {
            for request in server.incoming_requests() {
                let response = if request.url() == "/metrics" {
                    let mut body = String::new();
                    let registry = registry.lock().expect("metrics registry");
                    match prometheus_client::encoding::text::encode(&mut body, &registry) {
                        Ok(()) => tiny_http::Response::from_string(body).with_header(
                            "Content-Type: application/openmetrics-text; version=1.0.0; charset=utf-8"
                                .parse::<tiny_http::Header>()
                                .expect("static header"),
                        ),
                        Err(_) => tiny_http::Response::from_string("encoding failed").with_status_code(500),
                    }
                } else {
                    tiny_http::Response::from_string("xbr metrics are at /metrics\n").with_status_code(404)
                };
                let _ = request.respond(response);
            }
        })
        .map_err(|e| Error::io("starting the metrics thread", e))?;
    Ok(())
}
