//! The chart: two panels of grouped bars, throughput relative to `limit` and cost relative to
//! `docker-like`, each bar a median with its min-max as a whisker, drawn as SVG by plotters.

use std::path::Path;

use plotters::coord::Shift;
use plotters::coord::ranged1d::{DefaultFormatting, KeyPointHint};
use plotters::prelude::*;
use plotters::style::text_anchor::{HPos, Pos, VPos};

use super::report::Report;
use super::workloads::Workload;
use super::worlds::Config;

const SIZE: (u32, u32) = (1200, 920);
/// Ratios above this are drawn cut off (their labels still say the value).
const Y_CAP: f64 = 3.0;
const TARGET: RGBColor = RGBColor(0xd6, 0x27, 0x28);
const COLORS: [RGBColor; 4] = [
    RGBColor(0x9a, 0x9a, 0x9a), // limit
    RGBColor(0x4c, 0x78, 0xa8), // bridge
    RGBColor(0xf5, 0x85, 0x18), // docker-like
    RGBColor(0x54, 0xa2, 0x4b), // xbr
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

/// One group of bars: one workload metric, one bar per configuration.
struct Group {
    label: String,
    bars: Vec<Option<Bar>>,
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
    endpoints: usize,
    workload: Workload,
    metric: &str,
    reference: Config,
) -> Option<Group> {
    let reference = report.find(endpoints, workload, metric, reference)?.median;
    if reference <= 0.0 {
        return None;
    }
    let bars = Config::ALL
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
    Some(Group { label, bars })
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
        group(report, label, endpoints, workload, metric, Config::Limit)
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
            endpoints,
            workload,
            metric,
            Config::DockerLike,
        )
    })
    .collect();

    let root = SVGBackend::new(path, SIZE).into_drawing_area();
    root.fill(&WHITE)?;
    let machine = &report.machine;
    let title = format!(
        "xbr east-west: medians of {} round{}, whiskers min-max",
        report.settings.rounds,
        if report.settings.rounds == 1 { "" } else { "s" }
    );
    let root = root.titled(&title, ("sans-serif", 22))?;
    let (legend, root) = root.split_vertically(26);
    draw_legend(&legend)?;
    let height = root.dim_in_pixel().1 as i32;
    let (panels, footer) = root.split_vertically(height - 28);
    let half = panels.dim_in_pixel().1 as i32 / 2;
    let (top, bottom) = panels.split_vertically(half);
    panel(
        &top,
        "Throughput relative to limit (higher is better)",
        "x limit",
        &throughput,
        Some((0.95, throughput.len())),
    )?;
    panel(
        &bottom,
        "Cost relative to docker-like (lower is better)",
        "x docker-like",
        &cost,
        Some((0.6, 4)),
    )?;
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

/// One legend for both panels: a colour per configuration, and the targets.
fn draw_legend(area: &DrawingArea<SVGBackend, Shift>) -> anyhow::Result<()> {
    let width = area.dim_in_pixel().0 as i32;
    let step = 120;
    let target_width = 420;
    let mut x = (width - step * Config::ALL.len() as i32 - target_width) / 2;
    for (config, color) in Config::ALL.iter().zip(COLORS) {
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
        "target: xbr >= 0.95x limit; xbr CPU/packet <= 0.6x docker-like",
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
    target: Option<(f64, usize)>,
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

    let slot = 0.8 / Config::ALL.len() as f64;
    let value_style =
        TextStyle::from(("sans-serif", 10).into_font()).pos(Pos::new(HPos::Center, VPos::Bottom));
    for (index, color) in COLORS.into_iter().enumerate() {
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
    // A target line spans the groups it applies to: the first GROUPS.
    if let Some((y, target_groups)) = target {
        let end = target_groups.min(count) as f64;
        chart.draw_series(std::iter::once(PathElement::new(
            vec![(0.0, y), (end, y)],
            TARGET.stroke_width(1),
        )))?;
    }
    Ok(())
}
