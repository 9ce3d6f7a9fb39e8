//! The charts, drawn from the JSON record alone, so that `--plot-only` redraws any past run
//! exactly as the run itself did:
//!
//! - `X.svg` (X.json's stem): each proxy's median as a ratio to the direct-TCP median of the
//!   same run, for every figure where higher is better (throughput, Jain index, round-trip
//!   rates, upgrade rates), as horizontal bars grouped by metric; direct TCP is the dashed
//!   line at 1.0.
//! - `X-memory.svg`: the proxies' own costs, which have no ratio: memory per idle session
//!   (RSS and PSS, KiB, log scale) and CPU-seconds per GB relayed; and the `upgrades50`
//!   latencies, closed loop and paced, with a line under the title for each proxy that did
//!   not keep up with the paced rate.
//!
//! SVG only: text is written as `<text>` elements that the viewer renders, so no font files
//! or system libraries are involved; plotters' built-in estimate of text sizes only sizes
//! the margins, which leave slack for it. Every bar carries its value as text, and a proxy
//! that ran but has no figure for a metric shows "no figure" where its bar would be.

use std::ops::Range;
use std::path::{Path, PathBuf};

use plotters::coord::Shift;
use plotters::coord::ranged1d::{DefaultFormatting, KeyPointHint};
use plotters::prelude::*;
use plotters::style::text_anchor::{HPos, Pos, VPos};
use serde_json::Value;

/// The proxies drawn as bars, in order, with their colours. Direct is the reference.
const SERIES: [(&str, RGBColor); 5] = [
    ("vncgate", RGBColor(0x2b, 0x6c, 0xb0)),
    // vncgate over TLS: a darker shade of vncgate's blue, next to it.
    ("vncgate-tls", RGBColor(0x1a, 0x36, 0x5d)),
    // vncgate recording every session: a lighter shade of the same blue.
    ("vncgate-record", RGBColor(0x7f, 0xb2, 0xe5)),
    ("websocat", RGBColor(0xdd, 0x84, 0x52)),
    ("websockify", RGBColor(0x55, 0xa8, 0x68)),
];

/// The groups of the ratio chart, top to bottom: metric id and short label, where `{n}`
/// stands for `--conns`.
const RATIO_ROWS: [(&str, &str); 9] = [
    ("tput_1_mbs", "Throughput, 1 conn"),
    ("tput_n_mbs", "Throughput, {n} conns"),
    ("tput_n_min_mbs", "Slowest of {n} conns"),
    ("jain_n", "Jain fairness, {n} conns"),
    ("rt_1_rate", "16 B round trips/s, 1 conn"),
    ("rt_n_rate", "16 B round trips/s, {n} conns"),
    ("upgrades_s", "Upgrades/s"),
    ("sessions_s", "Upgrade + 16 B echo/s"),
    ("up50_rate", "Upgrade + first VM byte/s, 50 connectors"),
];

/// The latency panel of the cost chart: the `upgrades50` point's percentiles in its closed
/// loop (each proxy at its own saturation) and its paced p99s (every proxy at the same
/// offered rate), where `{paced}` stands for "paced at R/s".
const UPGRADE_LATENCY_ROWS: [(&str, &str); 6] = [
    ("up50_handshake_p50_us", "Connect to 101, p50, closed loop"),
    ("up50_handshake_p99_us", "Connect to 101, p99, closed loop"),
    (
        "up50_paced_handshake_p99_us",
        "Connect to 101, p99, {paced}",
    ),
    (
        "up50_first_byte_p50_us",
        "Connect to first VM byte, p50, closed loop",
    ),
    (
        "up50_first_byte_p99_us",
        "Connect to first VM byte, p99, closed loop",
    ),
    (
        "up50_paced_first_byte_p99_us",
        "Connect to first VM byte, p99, {paced}",
    ),
];

const FONT: &str = "sans-serif";
const WIDTH: u32 = 1000;
/// Thickness of one bar and the space between groups, in pixels.
const BAR_PX: u32 = 22;
const GROUP_GAP_PX: u32 = 20;
/// Room under a panel's bars for tick labels and the axis description.
const X_AXIS_PX: u32 = 52;
const CAPTION_PX: u32 = 30;
/// Shown where a proxy that ran has no figure: the measurement failed.
const MISSING: &str = "no figure (failed, see the notes)";
const GREY: RGBColor = RGBColor(0x55, 0x55, 0x55);
const LIGHT: RGBColor = RGBColor(0xdd, 0xdd, 0xdd);

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Scale {
    Linear,
    /// Base 10, from the decade below the smallest value; values <= 0 get no bar.
    Log,
}

/// One group of bars: a metric, and one value per series (`None`: no figure).
#[derive(Debug, Clone, PartialEq)]
pub struct Group {
    pub label: String,
    pub values: Vec<Option<f64>>,
}

/// A panel of horizontal grouped bars, ready to draw.
#[derive(Debug, Clone)]
pub struct Panel {
    /// Caption above the panel; empty for none.
    pub title: String,
    pub x_desc: String,
    pub series: Vec<(&'static str, RGBColor)>,
    /// Top to bottom; only groups with at least one figure.
    pub groups: Vec<Group>,
    pub scale: Scale,
    /// A dashed vertical line and its legend text (direct TCP at 1.0 on the ratio chart).
    pub reference: Option<(f64, String)>,
    /// The text at the end of each bar.
    pub value_fmt: fn(f64) -> String,
}

/// Title and context lines of one SVG, and the panels stacked under them.
#[derive(Debug, Clone)]
pub struct Figure {
    pub title: String,
    pub context: Vec<String>,
    pub panels: Vec<Panel>,
}

/// Reads a results JSON and writes its charts beside it (`--plot-only`); returns the
/// paths written. An error if the file is unreadable or holds nothing to chart.
pub fn plot_file(json: &Path) -> Result<Vec<PathBuf>, String> {
    let text = std::fs::read_to_string(json).map_err(|e| format!("{}: {e}", json.display()))?;
    let js: Value =
        serde_json::from_str(&text).map_err(|e| format!("{}: not JSON: {e}", json.display()))?;
    if !js["proxies"].is_object() {
        return Err(format!(
            "{}: no \"proxies\" object: not a vncgate-bench results file",
            json.display()
        ));
    }
    let paths = write_charts(&js, json)?;
    if paths.is_empty() {
        return Err(format!(
            "{}: nothing to chart (no ratio to direct, no memory or CPU figure)",
            json.display()
        ));
    }
    Ok(paths)
}

/// Writes the charts of the record `js` next to `json_path` (its stem + `.svg` and
/// `-memory.svg`) and returns the paths written. A chart with nothing to show is not
/// written, and an older file of that name is removed so that it cannot pass for this run's.
pub fn write_charts(js: &Value, json_path: &Path) -> Result<Vec<PathBuf>, String> {
    let dir = json_path.parent().unwrap_or(Path::new("."));
    let stem = json_path
        .file_stem()
        .map_or_else(|| "results".into(), |s| s.to_string_lossy().into_owned());
    let mut written = Vec::new();
    for (fig, name) in [
        (ratio_figure(js), format!("{stem}.svg")),
        (cost_figure(js), format!("{stem}-memory.svg")),
    ] {
        let path = dir.join(name);
        match fig {
            Some(fig) => {
                let svg = render(&fig)?;
                std::fs::write(&path, svg).map_err(|e| format!("{}: {e}", path.display()))?;
                written.push(path);
            }
            None => match std::fs::remove_file(&path) {
                Ok(()) => eprintln!("removed {}: nothing to chart this time", path.display()),
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
                Err(e) => return Err(format!("{}: {e}", path.display())),
            },
        }
    }
    Ok(written)
}

/// The ratio chart of the record, or `None` when no proxy has a ratio (direct not run).
pub fn ratio_figure(js: &Value) -> Option<Figure> {
    let series = series_of(js);
    let n = js["settings"]["conns"]
        .as_u64()
        .map_or_else(|| "N".to_owned(), |n| n.to_string());
    let rows: Vec<(&str, String)> = RATIO_ROWS
        .iter()
        .map(|&(id, label)| (id, label.replace("{n}", &n)))
        .collect();
    let groups = groups_of(js, &series, "ratio_to_direct", &rows);
    if groups.is_empty() {
        return None;
    }
    Some(Figure {
        title: "vncgate-bench: each relay as a ratio to direct TCP (higher is better)".into(),
        context: context_lines(js),
        panels: vec![Panel {
            title: String::new(),
            x_desc: "proxy median ÷ direct TCP median from the same run".into(),
            series,
            groups,
            scale: Scale::Linear,
            reference: Some((1.0, "direct TCP = 1.0".into())),
            value_fmt: |v| format!("{v:.2}x"),
        }],
    })
}

/// The cost chart of the record (memory per idle session, CPU per GB), or `None` when
/// neither was measured.
pub fn cost_figure(js: &Value) -> Option<Figure> {
    let series = series_of(js);
    // `settings.idle` is a list of counts (`--idle 1000,10000`), or one number in records
    // from before lists, whose rows are `idle_rss_kib` / `idle_pss_kib`.
    let counts: Vec<u64> = match &js["settings"]["idle"] {
        Value::Array(v) => v.iter().filter_map(Value::as_u64).collect(),
        v => v.as_u64().into_iter().collect(),
    };
    let mut rows: Vec<(String, String)> = vec![
        ("idle_rss_kib".into(), "RSS per idle session".into()),
        ("idle_pss_kib".into(), "PSS per idle session".into()),
    ];
    for n in &counts {
        rows.push((
            format!("idle_rss_kib_{n}"),
            format!("RSS per idle session, {n} held"),
        ));
        rows.push((
            format!("idle_pss_kib_{n}"),
            format!("PSS per idle session, {n} held"),
        ));
    }
    let rows: Vec<(&str, String)> = rows
        .iter()
        .map(|(id, l)| (id.as_str(), l.clone()))
        .collect();
    let held: Vec<String> = counts.iter().map(u64::to_string).collect();
    let memory = Panel {
        title: format!("Memory per idle session ({} held)", held.join(", ")),
        x_desc: "KiB per session, growth of the proxy's process tree (log scale)".into(),
        groups: groups_of(js, &series, "median", &rows),
        series: series.clone(),
        scale: Scale::Log,
        reference: None,
        value_fmt: |v| format!("{v:.1} KiB"),
    };
    let cpu = Panel {
        title: "Proxy CPU time per GB relayed (both throughput points)".into(),
        x_desc: "CPU-seconds (user + system) per GB".into(),
        groups: groups_of(
            js,
            &series,
            "median",
            &[("cpu_s_per_gb", "CPU-seconds per GB".into())],
        ),
        series: series.clone(),
        scale: Scale::Linear,
        reference: None,
        value_fmt: |v| format!("{v:.2} s/GB"),
    };
    let paced_rate = js["settings"]["upgrades50_paced_rate"].as_f64();
    let paced = paced_rate.map_or_else(|| "paced".to_owned(), |r| format!("paced at {r}/s"));
    let rows: Vec<(&str, String)> = UPGRADE_LATENCY_ROWS
        .iter()
        .map(|&(id, label)| (id, label.replace("{paced}", &paced)))
        .collect();
    let connectors = js["settings"]["upgrades50_connectors"]
        .as_u64()
        .unwrap_or(50);
    let behind = behind_lines(js, &series, &paced);
    let latency = Panel {
        title: format!("Upgrades with {connectors} concurrent connectors: latency"),
        x_desc: "µs from connect, paced: from when due (log scale; direct TCP in the table)".into(),
        groups: groups_of(js, &series, "median", &rows),
        series,
        scale: Scale::Log,
        reference: None,
        value_fmt: |v| format!("{v:.0} µs"),
    };
    let panels: Vec<Panel> = [memory, cpu, latency]
        .into_iter()
        .filter(|p| !p.groups.is_empty())
        .collect();
    if panels.is_empty() {
        return None;
    }
    let mut context = context_lines(js);
    context.extend(behind);
    Some(Figure {
        title: "vncgate-bench: the relays' own costs and upgrade latency (lower is better)".into(),
        context,
        panels,
    })
}

/// One line per drawn proxy whose record says it did not keep up with the paced phase
/// (`up50_paced_kept_up: false`), so that its paced bars are not read as latency at the
/// offered rate. `paced` is "paced at R/s".
fn behind_lines(js: &Value, series: &[(&str, RGBColor)], paced: &str) -> Vec<String> {
    series
        .iter()
        .filter(|(name, _)| js["proxies"][*name]["up50_paced_kept_up"] == Value::Bool(false))
        .map(|(name, _)| {
            let done = js["proxies"][*name]["median"]["up50_paced_rate"]
                .as_f64()
                .map_or_else(String::new, |r| format!(" ({r:.0}/s completed)"));
            format!(
                "{paced}: {name} did not keep up{done}; its paced latencies include its backlog"
            )
        })
        .collect()
}

/// The proxies of the record drawn as bars: those present and not skipped, in `SERIES`
/// order.
fn series_of(js: &Value) -> Vec<(&'static str, RGBColor)> {
    SERIES
        .into_iter()
        .filter(|(name, _)| {
            js["proxies"]
                .get(*name)
                .is_some_and(|p| p["skipped"].is_null())
        })
        .collect()
}

/// One group per row (metric id, label) from `proxies.P.<table>.<id>`, leaving out rows
/// with no figure for any series.
fn groups_of(
    js: &Value,
    series: &[(&str, RGBColor)],
    table: &str,
    rows: &[(&str, String)],
) -> Vec<Group> {
    rows.iter()
        .map(|(id, label)| Group {
            label: label.clone(),
            values: series
                .iter()
                .map(|(name, _)| {
                    js["proxies"][*name][table][*id]
                        .as_f64()
                        .filter(|v| v.is_finite())
                })
                .collect(),
        })
        .filter(|g| g.values.iter().any(Option::is_some))
        .collect()
}

/// When and where: date, machine, kernel and load; then how (repetitions, window, vncgate
/// settings, points). Reads `date`, `machine`, `loadavg` and `settings` (`reps`, `secs`,
/// `vncgate_workers`, `vncgate_args`, `points`) of a record; what is missing is left out.
pub fn context_lines(js: &Value) -> Vec<String> {
    let s = |v: &Value| v.as_str().map(str::to_owned);
    let first = |v: &Value| {
        v.as_str()
            .and_then(|l| l.split_whitespace().next())
            .map(str::to_owned)
    };
    let m = &js["machine"];
    let mut line1 = Vec::new();
    line1.extend(s(&js["date"]));
    if let Some(n) = m["nproc"].as_u64() {
        line1.push(match s(&m["cpu"]) {
            Some(cpu) => format!("{n} CPUs ({cpu})"),
            None => format!("{n} CPUs"),
        });
    }
    if let Some(k) = s(&m["kernel"]) {
        line1.push(format!("Linux {k}"));
    }
    if let (Some(a), Some(b)) = (first(&js["loadavg"]["start"]), first(&js["loadavg"]["end"])) {
        line1.push(format!("load average {a} at start, {b} at end"));
    }
    let st = &js["settings"];
    let mut line2 = Vec::new();
    if let (Some(r), Some(secs)) = (st["reps"].as_u64(), st["secs"].as_f64()) {
        line2.push(if r == 1 {
            format!("one repetition, {secs} s per point")
        } else {
            format!("medians of {r} interleaved repetitions, {secs} s per point")
        });
    }
    if let Some(w) = st["vncgate_workers"].as_u64() {
        let mut v = format!("vncgate --workers {w}");
        for a in st["vncgate_args"].as_array().into_iter().flatten() {
            if let Some(a) = a.as_str() {
                v.push(' ');
                v.push_str(a);
            }
        }
        line2.push(v);
    }
    if let Some(p) = st["points"].as_array()
        && p.len() < crate::point::Point::ALL.len()
    {
        let names: Vec<&str> = p.iter().filter_map(Value::as_str).collect();
        line2.push(format!("points: {}", names.join(", ")));
    }
    [line1, line2]
        .into_iter()
        .filter(|l| !l.is_empty())
        .map(|l| l.join(" · "))
        .collect()
}

/// A "nice" tick step (1, 2 or 5 times a power of ten) close to `raw`, not below it.
pub fn nice_step(raw: f64) -> f64 {
    if !(raw.is_finite() && raw > 0.0) {
        return 1.0;
    }
    let mag = 10f64.powf(raw.log10().floor());
    let f = raw / mag;
    let m = if f <= 1.0 + 1e-9 {
        1.0
    } else if f <= 2.0 + 1e-9 {
        2.0
    } else if f <= 5.0 + 1e-9 {
        5.0
    } else {
        10.0
    };
    m * mag
}

/// The drawn x axis of a panel: the range in axis units (log10 of the value for a log
/// scale), where bars start, and the ticks with their labels.
#[derive(Debug, Clone, PartialEq)]
pub struct Axis {
    pub lo: f64,
    pub hi: f64,
    pub ticks: Vec<(f64, String)>,
}

impl Axis {
    /// Fits `values` (and a reference line) with room to the right of the longest bar for
    /// its value text.
    pub fn fit(scale: Scale, values: &[f64], reference: Option<f64>) -> Axis {
        match scale {
            Scale::Linear => {
                let max = values
                    .iter()
                    .copied()
                    .chain(reference)
                    .fold(0.0f64, f64::max);
                let max = if max > 0.0 { max } else { 1.0 };
                let hi = max * 1.2;
                let step = nice_step(hi / 8.0);
                let decimals = if step >= 1.0 {
                    0
                } else {
                    (-step.log10()).ceil() as usize
                };
                let ticks = (0..)
                    .map(|i| i as f64 * step)
                    .take_while(|t| *t <= hi + step * 1e-9)
                    .map(|t| (t, format!("{t:.decimals$}")))
                    .collect();
                Axis { lo: 0.0, hi, ticks }
            }
            Scale::Log => {
                let logs: Vec<f64> = values
                    .iter()
                    .filter(|v| **v > 0.0)
                    .map(|v| v.log10())
                    .collect();
                let (min, max) = logs
                    .iter()
                    .fold((f64::INFINITY, f64::NEG_INFINITY), |(a, b), &l| {
                        (a.min(l), b.max(l))
                    });
                let (min, max) = if logs.is_empty() {
                    (0.0, 1.0)
                } else {
                    (min, max)
                };
                // Start a decade below the smallest value, so even it gets a visible bar.
                let mut lo = min.floor();
                if min - lo < 0.15 {
                    lo -= 1.0;
                }
                let hi = max + 0.25 * (max - lo).max(1.0);
                let ticks = (lo as i32..=hi.floor() as i32)
                    .map(|k| {
                        let label = if k >= 0 {
                            format!("{}", 10u64.pow(k as u32))
                        } else {
                            format!("{:.*}", (-k) as usize, 10f64.powi(k))
                        };
                        (f64::from(k), label)
                    })
                    .collect();
                Axis { lo, hi, ticks }
            }
        }
    }

    /// Where a value lies on the axis, or `None` if it cannot be drawn (<= 0 on a log scale).
    pub fn pos(&self, scale: Scale, v: f64) -> Option<f64> {
        match scale {
            Scale::Linear => Some(v.max(0.0)),
            Scale::Log => (v > 0.0).then(|| v.log10().max(self.lo)),
        }
    }
}

/// A linear f64 axis whose ticks are exactly the given points: the chosen ticks on x, the
/// group centres on y (plotters' own f64 axis picks its ticks itself). Labels come from the
/// mesh's formatters.
struct Keyed {
    range: Range<f64>,
    keys: Vec<f64>,
}

impl Ranged for Keyed {
    type FormatOption = DefaultFormatting;
    type ValueType = f64;

    fn map(&self, v: &f64, limit: (i32, i32)) -> i32 {
        let span = self.range.end - self.range.start;
        let t = if span > 0.0 {
            (v - self.range.start) / span
        } else {
            0.0
        };
        limit.0 + (f64::from(limit.1 - limit.0) * t).round() as i32
    }

    fn key_points<H: KeyPointHint>(&self, hint: H) -> Vec<f64> {
        // No light (minor) lines; the bold points are the keys.
        if hint.weight().allow_light_points() {
            Vec::new()
        } else {
            self.keys.clone()
        }
    }

    fn range(&self) -> Range<f64> {
        self.range.clone()
    }
}

fn panel_height(p: &Panel) -> u32 {
    let caption = if p.title.is_empty() { 0 } else { CAPTION_PX };
    let n = p.groups.len() as u32;
    let k = p.series.len().max(1) as u32;
    caption + X_AXIS_PX + 16 + n * (k * BAR_PX + GROUP_GAP_PX)
}

fn header_height(f: &Figure) -> u32 {
    // Title, one line per context line, the legend row.
    40 + 20 * f.context.len() as u32 + 34
}

fn err<E: std::fmt::Display>(e: E) -> String {
    format!("drawing: {e}")
}

/// Draws a figure into an SVG document.
pub fn render(f: &Figure) -> Result<String, String> {
    let height = header_height(f) + f.panels.iter().map(panel_height).sum::<u32>();
    let mut svg = String::new();
    {
        let root = SVGBackend::with_string(&mut svg, (WIDTH, height)).into_drawing_area();
        root.fill(&WHITE).map_err(err)?;
        let (header, mut rest) = root.split_vertically(header_height(f));
        draw_header(&header, f)?;
        // One label width for all panels, so that their axes line up.
        let longest = f
            .panels
            .iter()
            .flat_map(|p| &p.groups)
            .map(|g| g.label.chars().count())
            .max()
            .unwrap_or(0);
        let label_px = (longest as u32 * 8 + 24).max(120);
        for p in &f.panels {
            let (area, below) = rest.split_vertically(panel_height(p));
            draw_panel(&area, p, label_px)?;
            rest = below;
        }
        root.present().map_err(err)?;
    }
    Ok(svg)
}

/// Title, context lines and the legend: one swatch per series, and the reference line.
fn draw_header<DB: DrawingBackend>(
    area: &DrawingArea<DB, Shift>,
    f: &Figure,
) -> Result<(), String> {
    let left = Pos::new(HPos::Left, VPos::Center);
    let title = TextStyle::from((FONT, 24, FontStyle::Bold).into_font()).pos(left);
    area.draw(&Text::new(f.title.as_str(), (16, 20), title))
        .map_err(err)?;
    let ctx = TextStyle::from((FONT, 16).into_font())
        .color(&GREY)
        .pos(left);
    let mut y = 44;
    for line in &f.context {
        area.draw(&Text::new(line.as_str(), (16, y), ctx.clone()))
            .map_err(err)?;
        y += 20;
    }
    y += 10;
    let label = TextStyle::from((FONT, 17).into_font()).pos(left);
    let mut x = 16;
    if let Some(p) = f.panels.first() {
        for (name, color) in &p.series {
            area.draw(&Rectangle::new(
                [(x, y - 8), (x + 16, y + 8)],
                color.filled(),
            ))
            .map_err(err)?;
            area.draw(&Text::new(*name, (x + 22, y), label.clone()))
                .map_err(err)?;
            let (w, _) = area.estimate_text_size(name, &label).map_err(err)?;
            x += 22 + w as i32 + 28;
        }
    }
    for (_, text) in f.panels.iter().filter_map(|p| p.reference.as_ref()) {
        for d in 0..3 {
            let x0 = x + d * 11;
            area.draw(&PathElement::new(
                vec![(x0, y), (x0 + 7, y)],
                BLACK.stroke_width(2),
            ))
            .map_err(err)?;
        }
        area.draw(&Text::new(text.as_str(), (x + 40, y), label.clone()))
            .map_err(err)?;
        let (w, _) = area.estimate_text_size(text, &label).map_err(err)?;
        x += 40 + w as i32 + 28;
    }
    Ok(())
}

/// One panel: groups top to bottom on the y axis (group i centred at n-1-i), one bar per
/// series inside each, the value at the end of each bar on a white patch (so that the
/// reference line never runs through it), `label_px` wide group labels on the left.
fn draw_panel<DB: DrawingBackend>(
    area: &DrawingArea<DB, Shift>,
    p: &Panel,
    label_px: u32,
) -> Result<(), String> {
    let n = p.groups.len();
    let k = p.series.len().max(1);
    let values: Vec<f64> = p
        .groups
        .iter()
        .flat_map(|g| g.values.iter().flatten().copied())
        .collect();
    let axis = Axis::fit(p.scale, &values, p.reference.as_ref().map(|r| r.0));

    let mut builder = ChartBuilder::on(area);
    builder
        .margin_left(12)
        .margin_right(24)
        .margin_top(8)
        .margin_bottom(8)
        .x_label_area_size(X_AXIS_PX)
        .y_label_area_size(label_px);
    if !p.title.is_empty() {
        builder.caption(p.title.as_str(), (FONT, 20, FontStyle::Bold));
    }
    let tick_at: Vec<f64> = axis.ticks.iter().map(|t| t.0).collect();
    let centres: Vec<f64> = (0..n).map(|i| i as f64).collect();
    let mut chart = builder
        .build_cartesian_2d(
            Keyed {
                range: axis.lo..axis.hi,
                keys: tick_at,
            },
            Keyed {
                range: -0.5..n as f64 - 0.5,
                keys: centres,
            },
        )
        .map_err(err)?;

    let group_label = |y: &f64| {
        let i = y.round() as isize;
        if (0..n as isize).contains(&i) {
            p.groups[n - 1 - i as usize].label.clone()
        } else {
            String::new()
        }
    };
    let tick_label = |x: &f64| {
        axis.ticks
            .iter()
            .find(|t| (t.0 - x).abs() < 1e-9)
            .map(|t| t.1.clone())
            .unwrap_or_default()
    };
    chart
        .configure_mesh()
        .disable_y_mesh()
        .bold_line_style(LIGHT)
        .x_labels(axis.ticks.len())
        .y_labels(n.max(1))
        .x_label_formatter(&tick_label)
        .y_label_formatter(&group_label)
        .x_desc(p.x_desc.as_str())
        .label_style((FONT, 16))
        .axis_desc_style((FONT, 16))
        .draw()
        .map_err(err)?;

    let band = 0.84;
    let h = band / k as f64;
    let value_style = TextStyle::from((FONT, 15).into_font())
        .color(&BLACK)
        .pos(Pos::new(HPos::Left, VPos::Center));
    let missing_style = TextStyle::from((FONT, 15, FontStyle::Italic).into_font())
        .color(&GREY)
        .pos(Pos::new(HPos::Left, VPos::Center));
    // Bars, then the reference line over them, then the values over both.
    let mut texts = Vec::new();
    for (i, g) in p.groups.iter().enumerate() {
        let centre = (n - 1 - i) as f64;
        for (j, ((_, color), v)) in p.series.iter().zip(&g.values).enumerate() {
            let top = centre + band / 2.0 - j as f64 * h;
            let bottom = top - h * 0.86;
            let mid = (top + bottom) / 2.0;
            let end = v.and_then(|v| axis.pos(p.scale, v));
            if let Some(end) = end {
                chart
                    .draw_series(std::iter::once(Rectangle::new(
                        [(axis.lo, bottom), (end, top)],
                        color.filled(),
                    )))
                    .map_err(err)?;
            }
            texts.push(match (v, end) {
                (Some(v), Some(end)) => (end, mid, (p.value_fmt)(*v), &value_style),
                (Some(v), None) => (axis.lo, mid, (p.value_fmt)(*v), &value_style),
                (None, _) => (axis.lo, mid, MISSING.to_owned(), &missing_style),
            });
        }
    }
    if let Some((x, _)) = &p.reference {
        chart
            .draw_series(DashedLineSeries::new(
                vec![(*x, -0.5), (*x, n as f64 - 0.5)],
                8,
                5,
                BLACK.stroke_width(2),
            ))
            .map_err(err)?;
    }
    for (x, y, text, style) in texts {
        let (w, th) = area.estimate_text_size(&text, style).map_err(err)?;
        let (w, half) = (w as i32, th as i32 / 2 + 2);
        chart
            .draw_series(std::iter::once(
                EmptyElement::at((x, y))
                    + Rectangle::new([(4, -half), (w + 10, half)], WHITE.filled())
                    + Text::new(text, (6, 0), style.clone()),
            ))
            .map_err(err)?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn record() -> Value {
        json!({
            "date": "2026-11-29T03:00:25Z",
            "machine": {"nproc": 2, "kernel": "6.1.0", "cpu": "Test CPU"},
            "loadavg": {"start": "0.50 0.40 0.30", "end": "1.50 1.00 0.80"},
            "settings": {"reps": 3, "secs": 3.0, "conns": 50, "idle": 1000,
                         "vncgate_workers": 2, "vncgate_args": ["--io-driver=epoll"]},
            "proxies": {
                "direct": {"skipped": null, "median": {"tput_1_mbs": 1000.0},
                           "ratio_to_direct": {"tput_1_mbs": 1.0}},
                "vncgate": {"skipped": null,
                            "median": {"tput_1_mbs": 1150.0, "idle_rss_kib": 4.7,
                                       "idle_pss_kib": 4.6, "cpu_s_per_gb": 0.27},
                            "ratio_to_direct": {"tput_1_mbs": 1.15, "upgrades_s": 0.95}},
                "websocat": {"skipped": "websocat not found", "median": {},
                             "ratio_to_direct": {}},
                "websockify": {"skipped": null,
                               "median": {"tput_1_mbs": 500.0, "cpu_s_per_gb": 1.06},
                               "ratio_to_direct": {"tput_1_mbs": 0.5}}
            }
        })
    }

    #[test]
    fn ratio_groups_skip_empty_rows_and_skipped_proxies() {
        let f = ratio_figure(&record()).unwrap();
        let p = &f.panels[0];
        let names: Vec<&str> = p.series.iter().map(|s| s.0).collect();
        assert_eq!(names, ["vncgate", "websockify"]);
        assert_eq!(
            p.groups,
            vec![
                Group {
                    label: "Throughput, 1 conn".into(),
                    values: vec![Some(1.15), Some(0.5)]
                },
                Group {
                    label: "Upgrades/s".into(),
                    values: vec![Some(0.95), None]
                },
            ]
        );
        assert_eq!(p.reference.as_ref().map(|r| r.0), Some(1.0));
        assert!(f.context[0].contains("2026-11-29T03:00:25Z"));
        assert!(f.context[0].contains("2 CPUs (Test CPU)"));
        assert!(f.context[0].contains("load average 0.50 at start, 1.50 at end"));
        assert!(f.context[1].contains("vncgate --workers 2 --io-driver=epoll"));
    }

    #[test]
    fn cost_figure_has_memory_and_cpu_panels() {
        let f = cost_figure(&record()).unwrap();
        assert_eq!(f.panels.len(), 2);
        assert_eq!(f.panels[0].scale, Scale::Log);
        assert_eq!(
            f.panels[0].groups[1],
            Group {
                label: "PSS per idle session".into(),
                values: vec![Some(4.6), None]
            }
        );
        assert_eq!(f.panels[1].groups[0].values, vec![Some(0.27), Some(1.06)]);
    }

    #[test]
    fn memory_rows_per_idle_count() {
        let mut js = record();
        js["settings"]["idle"] = json!([1000, 10000]);
        js["proxies"]["vncgate"]["median"] = json!({
            "idle_rss_kib_1000": 5.0, "idle_pss_kib_1000": 4.9,
            "idle_pss_kib_10000": 4.5,
        });
        js["proxies"]["websockify"]["median"] = json!({"idle_pss_kib_1000": 3500.0});
        let f = cost_figure(&js).unwrap();
        let p = &f.panels[0];
        assert_eq!(p.title, "Memory per idle session (1000, 10000 held)");
        let labels: Vec<&str> = p.groups.iter().map(|g| g.label.as_str()).collect();
        assert_eq!(
            labels,
            [
                "RSS per idle session, 1000 held",
                "PSS per idle session, 1000 held",
                "PSS per idle session, 10000 held",
            ]
        );
        assert_eq!(p.groups[1].values, vec![Some(4.9), Some(3500.0)]);
        assert_eq!(p.groups[2].values, vec![Some(4.5), None]);
    }

    #[test]
    fn upgrades50_has_a_ratio_bar_and_a_latency_panel() {
        let mut js = record();
        js["settings"]["upgrades50_connectors"] = json!(50);
        js["proxies"]["vncgate"]["ratio_to_direct"]["up50_rate"] = json!(0.6);
        js["proxies"]["websockify"]["ratio_to_direct"]["up50_rate"] = json!(0.02);
        js["proxies"]["vncgate"]["median"]["up50_handshake_p50_us"] = json!(800.0);
        js["proxies"]["vncgate"]["median"]["up50_first_byte_p99_us"] = json!(4000.0);
        js["proxies"]["websockify"]["median"]["up50_first_byte_p99_us"] = json!(90000.0);
        let f = ratio_figure(&js).unwrap();
        let up = f.panels[0]
            .groups
            .iter()
            .find(|g| g.label == "Upgrade + first VM byte/s, 50 connectors")
            .unwrap();
        assert_eq!(up.values, vec![Some(0.6), Some(0.02)]);

        let f = cost_figure(&js).unwrap();
        let lat = f
            .panels
            .iter()
            .find(|p| p.title == "Upgrades with 50 concurrent connectors: latency")
            .unwrap();
        assert_eq!(lat.scale, Scale::Log);
        // Rows without a figure for any proxy are left out.
        assert_eq!(
            lat.groups,
            vec![
                Group {
                    label: "Connect to 101, p50, closed loop".into(),
                    values: vec![Some(800.0), None]
                },
                Group {
                    label: "Connect to first VM byte, p99, closed loop".into(),
                    values: vec![Some(4000.0), Some(90000.0)]
                },
            ]
        );
        let svg = render(&f).unwrap();
        assert!(
            svg.contains("Connect to first VM byte, p99, closed loop"),
            "{svg}"
        );
        assert!(svg.contains("90000 µs"));
    }

    #[test]
    fn latency_panel_shows_closed_and_paced_p99s_and_names_who_fell_behind() {
        let mut js = record();
        js["settings"]["upgrades50_paced_rate"] = json!(5000.0);
        let v = &mut js["proxies"]["vncgate"];
        v["median"]["up50_handshake_p99_us"] = json!(6100.0);
        v["median"]["up50_paced_handshake_p99_us"] = json!(920.0);
        v["median"]["up50_paced_first_byte_p99_us"] = json!(1360.0);
        v["up50_paced_kept_up"] = json!(true);
        let w = &mut js["proxies"]["websockify"];
        w["median"]["up50_paced_rate"] = json!(812.0);
        w["median"]["up50_paced_first_byte_p99_us"] = json!(2.1e6);
        w["up50_paced_kept_up"] = json!(false);
        let f = cost_figure(&js).unwrap();
        let lat = f.panels.last().unwrap();
        assert_eq!(
            lat.groups,
            vec![
                Group {
                    label: "Connect to 101, p99, closed loop".into(),
                    values: vec![Some(6100.0), None]
                },
                Group {
                    label: "Connect to 101, p99, paced at 5000/s".into(),
                    values: vec![Some(920.0), None]
                },
                Group {
                    label: "Connect to first VM byte, p99, paced at 5000/s".into(),
                    values: vec![Some(1360.0), Some(2.1e6)]
                },
            ]
        );
        let behind: Vec<&String> = f.context.iter().filter(|l| l.contains("keep up")).collect();
        assert_eq!(
            behind,
            [
                "paced at 5000/s: websockify did not keep up (812/s completed); its paced latencies include its backlog"
            ]
        );
        let svg = render(&f).unwrap();
        assert!(svg.contains("websockify did not keep up"), "{svg}");
        assert!(svg.contains("2100000 µs"));
        // A record from before the paced phase: no such line, rows as they were.
        assert!(
            !cost_figure(&record())
                .unwrap()
                .context
                .iter()
                .any(|l| l.contains("keep up"))
        );
    }

    #[test]
    fn no_direct_means_no_ratio_chart() {
        let mut js = record();
        for p in ["vncgate", "websockify"] {
            js["proxies"][p]["ratio_to_direct"] = json!({});
        }
        assert!(ratio_figure(&js).is_none());
        js["proxies"]["vncgate"]["median"] = json!({});
        js["proxies"]["websockify"]["median"] = json!({});
        assert!(cost_figure(&js).is_none());
    }

    #[test]
    fn nice_steps() {
        assert_eq!(nice_step(0.23), 0.5);
        assert_eq!(nice_step(0.2), 0.2);
        assert_eq!(nice_step(3.0), 5.0);
        assert_eq!(nice_step(7.0), 10.0);
        assert_eq!(nice_step(120.0), 200.0);
        assert_eq!(nice_step(0.0), 1.0);
    }

    #[test]
    fn linear_axis_covers_values_and_reference_with_room() {
        let a = Axis::fit(Scale::Linear, &[0.5, 1.15], Some(1.0));
        assert_eq!(a.lo, 0.0);
        assert!(a.hi >= 1.15 * 1.2 - 1e-9);
        let labels: Vec<&str> = a.ticks.iter().map(|t| t.1.as_str()).collect();
        assert_eq!(labels, ["0.0", "0.2", "0.4", "0.6", "0.8", "1.0", "1.2"]);
        let a = Axis::fit(Scale::Linear, &[0.2], Some(1.0));
        assert!(a.ticks.iter().any(|t| t.1 == "1.0"));
    }

    #[test]
    fn log_axis_starts_a_decade_below_and_labels_decades() {
        let a = Axis::fit(Scale::Log, &[4.7, 132.5], None);
        assert_eq!(a.lo, 0.0);
        assert!(a.hi > 132.5f64.log10());
        let labels: Vec<&str> = a.ticks.iter().map(|t| t.1.as_str()).collect();
        assert_eq!(labels, ["1", "10", "100"]);
        // A value right on a decade still gets a bar.
        let a = Axis::fit(Scale::Log, &[10.0, 0.5], None);
        assert_eq!(a.lo, -1.0);
        assert_eq!(a.ticks[0].1, "0.1");
        assert_eq!(a.pos(Scale::Log, 0.0), None);
        assert_eq!(a.pos(Scale::Log, 10.0), Some(1.0));
    }

    #[test]
    fn renders_svg_with_labels_values_and_legend() {
        let svg = render(&ratio_figure(&record()).unwrap()).unwrap();
        assert!(svg.starts_with("<svg"));
        for text in [
            "Throughput, 1 conn",
            "Upgrades/s",
            "1.15x",
            "0.50x",
            "0.95x",
            MISSING,
            "vncgate",
            "websockify",
            "direct TCP = 1.0",
            "2026-11-29T03:00:25Z",
        ] {
            assert!(svg.contains(text), "{text} missing");
        }
        assert!(!svg.contains(">websocat<"), "skipped proxy in legend");
        let svg = render(&cost_figure(&record()).unwrap()).unwrap();
        for text in ["4.6 KiB", "0.27 s/GB", "1.06 s/GB", "PSS per idle session"] {
            assert!(svg.contains(text), "{text} missing");
        }
    }

    #[test]
    fn plot_file_writes_beside_the_json_and_removes_stale_charts() {
        let dir = std::env::temp_dir().join(format!("vncgate-bench-plot-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let json_path = dir.join("run1.json");
        std::fs::write(&json_path, record().to_string()).unwrap();
        let paths = plot_file(&json_path).unwrap();
        assert_eq!(paths, [dir.join("run1.svg"), dir.join("run1-memory.svg")]);
        // A record without costs: the old memory chart goes.
        let mut js = record();
        for p in ["vncgate", "websockify"] {
            js["proxies"][p]["median"] = json!({});
        }
        std::fs::write(&json_path, js.to_string()).unwrap();
        assert_eq!(plot_file(&json_path).unwrap(), [dir.join("run1.svg")]);
        assert!(!dir.join("run1-memory.svg").exists());
        std::fs::write(&json_path, "{}").unwrap();
        assert!(plot_file(&json_path).is_err());
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
