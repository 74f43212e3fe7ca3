//! The chart: panels of grouped bars - east-west throughput relative to `limit` and cost
//! relative to `docker-like`, published-port rates relative to `dnat`, and (when measured)
//! egress rates relative to `egress-limit` and overlay rates relative to `overlay-limit` -
//! each bar a median with its min-max as a whisker, drawn as SVG by plotters.

use std::path::Path;

use plotters::coord::Shift;
use plotters::coord::ranged1d::{DefaultFormatting, KeyPointHint};
use plotters::prelude::*;
use plotters::style::text_anchor::{HPos, Pos, VPos};

use super::results::Report;
use super::workloads::Workload;
use super::worlds::Config;

const SIZE: (u32, u32) = (1200, 1300);
/// Ratios above this are drawn cut off (their labels still say the value).
const Y_CAP: f64 = 3.0;
const TARGET: RGBColor = RGBColor(0xd6, 0x27, 0x28);
const EAST_WEST_COLORS: [RGBColor; 4] = [
    RGBColor(0x9a, 0x9a, 0x9a), // limit
    RGBColor(0x4c, 0x78, 0xa8), // bridge
    RGBColor(0xf5, 0x85, 0x18), // docker-like
    RGBColor(0x54, 0xa2, 0x4b), // xbr
];
const EGRESS_COLORS: [RGBColor; 3] = [
    RGBColor(0x9a, 0x9a, 0x9a), // egress-limit
    RGBColor(0xf5, 0x85, 0x18), // egress-docker-like
    RGBColor(0x54, 0xa2, 0x4b), // egress-xbr
];
/// The egress panel and its legend, below the others when the report has egress rows.
const EGRESS_HEIGHT: u32 = 420;
const OVERLAY_COLORS: [RGBColor; 3] = EGRESS_COLORS;
/// The overlay panel and its legend, at the bottom when the report has overlay rows.
const OVERLAY_HEIGHT: u32 = 420;
const PUBLISHED_COLORS: [RGBColor; 4] = [
    RGBColor(0xf5, 0x85, 0x18), // dnat
    RGBColor(0xb2, 0x79, 0xa2), // docker-proxy
    RGBColor(0x54, 0xa2, 0x4b), // xbr-nat
    RGBColor(0x2e, 0x6b, 0x2a), // xbr-nat-xdp
];

/// The x axis: one unit per group, a tick (and label) at each group's middle.
struct GroupAxis {
    count: usize,
}

impl Ranged for GroupAxis {
    type FormatOption = DefaultFormatting;
    type ValueType = f64;

    fn map(&self, value: &f64, limit: (i32, i32)) -> i32 {
        let fraction = value / self.count as f64;
        limit.0 + (f64::from(limit.1 - limit.0) * fraction).round() as i32
    }

    fn key_points<Hint: KeyPointHint>(&self, _hint: Hint) -> Vec<f64> {
        (0..self.count).map(|index| index as f64 + 0.5).collect()
    }

    fn range(&self) -> std::ops::Range<f64> {
        0.0..self.count as f64
    }
}

/// One group of bars: one workload metric, one bar per configuration; a target line over it
/// where the issue sets one.
struct Group {
    label: String,
    bars: Vec<Option<Bar>>,
    target: Option<f64>,
}

/// Median, min and max over the reference configuration's median.
struct Bar {
    value: f64,
    low: f64,
    high: f64,
}

fn group(
    report: &Report,
    label: String,
    (endpoints, workload, metric): (usize, Workload, &str),
    configs: &[Config],
    reference: Config,
) -> Option<Group> {
    let reference = report.find(endpoints, workload, metric, reference)?.median;
    if reference <= 0.0 {
        return None;
    }
    let bars = configs
        .iter()
        .map(|config| {
            report
                .find(endpoints, workload, metric, *config)
                .map(|row| Bar {
                    value: row.median / reference,
                    low: row.min / reference,
                    high: row.max / reference,
                })
        })
        .collect();
    Some(Group {
        label,
        bars,
        target: None,
    })
}

pub fn draw(report: &Report, path: &Path) -> anyhow::Result<()> {
    let base = report.settings.endpoints;
    let scale = report.settings.scale_endpoints;
    let throughput: Vec<Group> = [
        (
            "TCP 1 stream".to_owned(),
            base,
            Workload::TcpOneStream,
            "gbit_per_s",
        ),
        (
            "TCP 2 streams".to_owned(),
            base,
            Workload::TcpTwoStreams,
            "gbit_per_s",
        ),
        ("UDP 64 B pps".to_owned(), base, Workload::UdpPps, "kpps"),
        (
            "UDP 64 B sent pps".to_owned(),
            base,
            Workload::UdpPps,
            "sent_kpps",
        ),
        (
            format!("UDP 64 B pps, {scale} endp."),
            scale,
            Workload::UdpPps,
            "kpps",
        ),
        (
            "TCP round trips/s".to_owned(),
            base,
            Workload::SockperfTcp,
            "k_round_trips_per_s",
        ),
        (
            "UDP round trips/s".to_owned(),
            base,
            Workload::SockperfUdp,
            "k_round_trips_per_s",
        ),
    ]
    .into_iter()
    .filter_map(|(label, endpoints, workload, metric)| {
        group(
            report,
            label,
            (endpoints, workload, metric),
            &Config::EAST_WEST,
            Config::Limit,
        )
    })
    .map(|group| Group {
        target: Some(0.95),
        ..group
    })
    .collect();
    let cost: Vec<Group> = [
        (
            "CPU/packet, machine".to_owned(),
            base,
            Workload::CpuPerPacket,
            "ns_per_packet",
        ),
        (
            "CPU/packet, tasks".to_owned(),
            base,
            Workload::CpuPerPacket,
            "task_ns_per_packet",
        ),
        (
            format!("CPU/packet, machine, {scale}"),
            scale,
            Workload::CpuPerPacket,
            "ns_per_packet",
        ),
        (
            format!("CPU/packet, tasks, {scale}"),
            scale,
            Workload::CpuPerPacket,
            "task_ns_per_packet",
        ),
        (
            "TCP RTT p50".to_owned(),
            base,
            Workload::SockperfTcp,
            "p50_rtt_us",
        ),
        (
            "TCP RTT p99".to_owned(),
            base,
            Workload::SockperfTcp,
            "p99_rtt_us",
        ),
        (
            "UDP RTT p50".to_owned(),
            base,
            Workload::SockperfUdp,
            "p50_rtt_us",
        ),
        (
            "UDP RTT p99".to_owned(),
            base,
            Workload::SockperfUdp,
            "p99_rtt_us",
        ),
    ]
    .into_iter()
    .filter_map(|(label, endpoints, workload, metric)| {
        group(
            report,
            label,
            (endpoints, workload, metric),
            &Config::EAST_WEST,
            Config::DockerLike,
        )
        .map(|group| Group {
            target: (workload == Workload::CpuPerPacket).then_some(0.6),
            ..group
        })
    })
    .collect();
    let published = published_groups(report, base);
    let egress = egress_groups(report, base);
    let overlay = overlay_groups(report, base);
    let mut size = SIZE;
    if !egress.is_empty() {
        size.1 += EGRESS_HEIGHT;
    }
    if !overlay.is_empty() {
        size.1 += OVERLAY_HEIGHT;
    }

    let root = SVGBackend::new(path, size).into_drawing_area();
    root.fill(&WHITE)?;
    let machine = &report.machine;
    let title = format!(
        "xbr east-west, published ports{}{}: medians of {} round{}, whiskers min-max",
        if egress.is_empty() { "" } else { ", egress" },
        if overlay.is_empty() {
            ""
        } else {
            ", across nodes"
        },
        report.settings.rounds,
        if report.settings.rounds == 1 { "" } else { "s" }
    );
    let root = root.titled(&title, ("sans-serif", 22))?;
    let (legend, root) = root.split_vertically(26);
    draw_legend(
        &legend,
        &Config::EAST_WEST,
        &EAST_WEST_COLORS,
        "target: xbr >= 0.95x limit; xbr CPU/packet <= 0.6x docker-like",
    )?;
    let height = root.dim_in_pixel().1 as i32;
    let (panels, footer) = root.split_vertically(height - 28);
    let (panels, overlay_area) = if overlay.is_empty() {
        (panels, None)
    } else {
        let height = panels.dim_in_pixel().1 as i32;
        let (panels, overlay_area) = panels.split_vertically(height - OVERLAY_HEIGHT as i32);
        (panels, Some(overlay_area))
    };
    let (panels, egress_area) = if egress.is_empty() {
        (panels, None)
    } else {
        let height = panels.dim_in_pixel().1 as i32;
        let (panels, egress_area) = panels.split_vertically(height - EGRESS_HEIGHT as i32);
        (panels, Some(egress_area))
    };
    let third = panels.dim_in_pixel().1 as i32 / 3;
    let (top, rest) = panels.split_vertically(third);
    let (middle, bottom) = rest.split_vertically(third);
    panel(
        &top,
        "East-west throughput relative to limit (higher is better)",
        "x limit",
        &throughput,
        &EAST_WEST_COLORS,
    )?;
    panel(
        &middle,
        "East-west cost relative to docker-like (lower is better)",
        "x docker-like",
        &cost,
        &EAST_WEST_COLORS,
    )?;
    let (legend, bottom) = bottom.split_vertically(26);
    draw_legend(
        &legend,
        &Config::PUBLISHED,
        &PUBLISHED_COLORS,
        "target: xbr > dnat on connections/s; >= 3x docker-proxy on requests/s",
    )?;
    panel(
        &bottom,
        "Published port, from outside to a container, relative to dnat (higher is better)",
        "x dnat",
        &published,
        &PUBLISHED_COLORS,
    )?;
    if let Some(area) = egress_area {
        let (legend, area) = area.split_vertically(26);
        draw_legend(
            &legend,
            &Config::EGRESS,
            &EGRESS_COLORS,
            "target: egress-xbr >= 0.9x limit; >= 1.3x docker-like conn/s",
        )?;
        panel(
            &area,
            "Egress, from a container to a server outside, relative to egress-limit (higher is \
             better)",
            "x egress-limit",
            &egress,
            &EGRESS_COLORS,
        )?;
    }
    if let Some(area) = overlay_area {
        let (legend, area) = area.split_vertically(26);
        draw_legend(
            &legend,
            &Config::OVERLAY,
            &OVERLAY_COLORS,
            "target: overlay-xbr >= 0.9x limit; >= 1.3x docker-like rr, UDP",
        )?;
        panel(
            &area,
            "Across nodes (overlay), container to container over VXLAN, relative to \
             overlay-limit (higher is better)",
            "x overlay-limit",
            &overlay,
            &OVERLAY_COLORS,
        )?;
    }
    let footer_text = format!(
        "{} CPUs ({}), kernel {}, {}; {} s per run; {} endpoints per bridge unless noted; `{}`",
        machine.nproc,
        machine.cpu_model,
        machine.kernel,
        machine.os,
        report.settings.seconds,
        base,
        report.command
    );
    footer.draw(&Text::new(
        footer_text,
        (12, 6),
        ("sans-serif", 12).into_font().color(&BLACK.mix(0.7)),
    ))?;
    root.present()?;
    Ok(())
}

/// The published-port groups, relative to dnat; the targets drawn over them are xbr ahead of
/// dnat on connections/s and 3x docker-proxy (as a multiple of dnat) on requests/s.
fn published_groups(report: &Report, endpoints: usize) -> Vec<Group> {
    [
        (
            "connections/s",
            Workload::TcpConnections,
            "connections_per_s",
        ),
        ("requests/s", Workload::TcpRequests, "requests_per_s"),
        (
            "connections/s, SYN flood",
            Workload::TcpConnectionsFlooded,
            "connections_per_s",
        ),
    ]
    .into_iter()
    .filter_map(|(label, workload, metric)| {
        let group = group(
            report,
            label.to_owned(),
            (endpoints, workload, metric),
            &Config::PUBLISHED,
            Config::Dnat,
        )?;
        let target = match workload {
            Workload::TcpRequests => {
                let median = |config| {
                    report
                        .find(endpoints, workload, metric, config)
                        .map(|r| r.median)
                };
                median(Config::DockerProxy)
                    .zip(median(Config::Dnat))
                    .map(|(proxy, dnat)| 3.0 * proxy / dnat)
            }
            _ => Some(1.0),
        };
        Some(Group { target, ..group })
    })
    .collect()
}

/// The egress groups, relative to egress-limit; the target drawn over them is 0.9x the limit,
/// and on connections/s 1.3x egress-docker-like where that is higher.
fn egress_groups(report: &Report, endpoints: usize) -> Vec<Group> {
    let rows = [
        (
            "connections/s",
            Workload::EgressConnections,
            "connections_per_s",
        ),
        ("round trips/s", Workload::EgressRr, "k_round_trips_per_s"),
        ("TCP stream", Workload::EgressStream, "gbit_per_s"),
        ("UDP 64 B pps", Workload::EgressUdp64, "kpps"),
        ("UDP 64 B sent pps", Workload::EgressUdp64, "sent_kpps"),
    ];
    limit_groups(
        report,
        endpoints,
        &rows,
        (&Config::EGRESS, Config::EgressLimit, Config::EgressDocker),
        &[Workload::EgressConnections],
    )
}

/// The overlay groups, relative to overlay-limit; the target drawn over them is 0.9x the
/// limit, and on round trips/s and 64-byte UDP 1.3x overlay-docker-like where that is higher.
fn overlay_groups(report: &Report, endpoints: usize) -> Vec<Group> {
    let rows = [
        ("TCP stream", Workload::OverlayStream, "gbit_per_s"),
        ("UDP 64 B pps", Workload::OverlayUdp64, "kpps"),
        ("UDP 64 B sent pps", Workload::OverlayUdp64, "sent_kpps"),
        ("round trips/s", Workload::OverlayRr, "k_round_trips_per_s"),
    ];
    limit_groups(
        report,
        endpoints,
        &rows,
        (
            &Config::OVERLAY,
            Config::OverlayLimit,
            Config::OverlayDocker,
        ),
        &[Workload::OverlayRr, Workload::OverlayUdp64],
    )
}

/// Groups of `rows` (label, workload, metric) over `configs`, relative to `limit`; the target
/// drawn is 0.9x the limit, and on `docker_targets` 1.3x `docker` where that is higher.
fn limit_groups(
    report: &Report,
    endpoints: usize,
    rows: &[(&str, Workload, &'static str)],
    (configs, limit, docker): (&[Config], Config, Config),
    docker_targets: &[Workload],
) -> Vec<Group> {
    rows.iter()
        .filter_map(|&(label, workload, metric)| {
            let group = group(
                report,
                label.to_owned(),
                (endpoints, workload, metric),
                configs,
                limit,
            )?;
            let median = |config| {
                report
                    .find(endpoints, workload, metric, config)
                    .map(|r| r.median)
            };
            let above_docker = docker_targets
                .contains(&workload)
                .then(|| median(docker).zip(median(limit)))
                .flatten()
                .map(|(docker, limit)| 1.3 * docker / limit);
            let target = Some(above_docker.map_or(0.9, |docker| docker.max(0.9)));
            Some(Group { target, ..group })
        })
        .collect()
}

/// A legend row: a colour per configuration, and the targets for the panels below.
fn draw_legend(
    area: &DrawingArea<SVGBackend, Shift>,
    configs: &[Config],
    colors: &[RGBColor],
    targets: &str,
) -> anyhow::Result<()> {
    let width = area.dim_in_pixel().0 as i32;
    let step = 130;
    let target_width = 440;
    let mut x = (width - step * configs.len() as i32 - target_width) / 2;
    for (config, color) in configs.iter().zip(colors) {
        area.draw(&Rectangle::new([(x, 6), (x + 14, 20)], color.filled()))?;
        area.draw(&Text::new(
            config.name(),
            (x + 20, 6),
            ("sans-serif", 14).into_font(),
        ))?;
        x += step;
    }
    area.draw(&PathElement::new(
        vec![(x, 13), (x + 18, 13)],
        TARGET.stroke_width(2),
    ))?;
    area.draw(&Text::new(
        targets,
        (x + 24, 6),
        ("sans-serif", 14).into_font(),
    ))?;
    Ok(())
}

fn panel(
    area: &DrawingArea<SVGBackend, Shift>,
    caption: &str,
    y_desc: &str,
    groups: &[Group],
    colors: &[RGBColor],
) -> anyhow::Result<()> {
    let count = groups.len().max(1);
    let tallest = groups
        .iter()
        .flat_map(|group| group.bars.iter().flatten())
        .map(|bar| bar.high.max(bar.value))
        .fold(1.0, f64::max);
    let y_max = (tallest * 1.15).min(Y_CAP);
    let mut chart = ChartBuilder::on(area)
        .caption(caption, ("sans-serif", 16))
        .margin(12)
        .x_label_area_size(34)
        .y_label_area_size(62)
        .build_cartesian_2d(GroupAxis { count }, 0f64..y_max)?;
    let label_of = |x: &f64| {
        groups
            .get(x.floor() as usize)
            .map(|group| group.label.clone())
            .unwrap_or_default()
    };
    chart
        .configure_mesh()
        .disable_x_mesh()
        .light_line_style(WHITE)
        .x_label_formatter(&label_of)
        .y_label_formatter(&|y| format!("{y:.1}"))
        .y_desc(y_desc)
        .label_style(("sans-serif", 12))
        .draw()?;

    let slot = 0.8 / colors.len() as f64;
    let value_style =
        TextStyle::from(("sans-serif", 10).into_font()).pos(Pos::new(HPos::Center, VPos::Bottom));
    for (index, color) in colors.iter().enumerate() {
        let bars: Vec<(f64, &Bar)> = groups
            .iter()
            .enumerate()
            .filter_map(|(position, group)| {
                let left = position as f64 + 0.1 + index as f64 * slot;
                group.bars[index].as_ref().map(|bar| (left, bar))
            })
            .collect();
        let width = slot * 0.85;
        chart.draw_series(bars.iter().map(|(left, bar)| {
            Rectangle::new(
                [(*left, 0.0), (left + width, bar.value.min(y_max))],
                color.filled(),
            )
        }))?;
        chart.draw_series(bars.iter().map(|(left, bar)| {
            let middle = left + width / 2.0;
            PathElement::new(
                vec![(middle, bar.low.min(y_max)), (middle, bar.high.min(y_max))],
                BLACK.stroke_width(1),
            )
        }))?;
        chart.draw_series(bars.iter().map(|(left, bar)| {
            let top = bar.high.max(bar.value).min(y_max * 0.93);
            Text::new(
                format!("{:.2}", bar.value),
                (left + width / 2.0, top + y_max * 0.01),
                value_style.clone(),
            )
        }))?;
    }
    // A target line across each group that has one.
    chart.draw_series(groups.iter().enumerate().filter_map(|(position, group)| {
        let y = group.target?.min(y_max);
        let left = position as f64;
        Some(PathElement::new(
            vec![(left, y), (left + 1.0, y)],
            TARGET.stroke_width(1),
        ))
    }))?;
    Ok(())
}
