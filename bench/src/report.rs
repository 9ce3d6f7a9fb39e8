//! Turns per-repetition figures into the markdown table and the JSON record: medians per
//! proxy, and each median's ratio to the direct-TCP median of the same run; with both
//! vncgate and vncgate-tls in the run, also vncgate-tls's ratio to vncgate (what `wss://`
//! costs over `ws://`); and a note on each proxy that did not keep up with the paced phase
//! of the `upgrades50` point.

use std::collections::BTreeMap;

use serde_json::{Value, json};

use crate::point::{Point, UPGRADES50_CONNECTORS};
use crate::proxy::Kind;

/// One row of the table.
pub struct Metric {
    pub id: &'static str,
    pub label: String,
    pub decimals: usize,
    /// Whether a ratio to direct means anything (not for proxy-only costs).
    pub has_ratio: bool,
    /// The measurement point that produces it (rows of points not taken are left out).
    pub point: Point,
}

/// Metric ids of the idle point at `n` held sessions: (RSS, PSS) per session,
/// `idle_rss_kib_N` and `idle_pss_kib_N`. Ids are `&'static str` (a [`Run`] is keyed by
/// them); each distinct `n` is allocated once per process.
pub fn idle_ids(n: usize) -> (&'static str, &'static str) {
    use std::collections::HashMap;
    use std::sync::{Mutex, OnceLock};
    static IDS: OnceLock<Mutex<HashMap<usize, (&'static str, &'static str)>>> = OnceLock::new();
    let mut ids = IDS.get_or_init(Default::default).lock().unwrap();
    *ids.entry(n).or_insert_with(|| {
        (
            String::leak(format!("idle_rss_kib_{n}")),
            String::leak(format!("idle_pss_kib_{n}")),
        )
    })
}

/// Every row of the table, in order; `idle` lists the idle point's session counts, and
/// `paced_rate` is the offered rate of the `upgrades50` point's paced phase (`None`: not
/// run, no rows).
pub fn metrics(
    conns: usize,
    connectors: usize,
    idle: &[usize],
    paced_rate: Option<f64>,
) -> Vec<Metric> {
    let m = |id: &'static str, label: String, decimals, has_ratio| Metric {
        id,
        label,
        decimals,
        has_ratio,
        point: point_of(id),
    };
    [
        m(
            "tput_1_mbs",
            "VM→browser throughput, 1 conn (MB/s)".into(),
            1,
            true,
        ),
        m(
            "tput_n_mbs",
            format!("VM→browser throughput, {conns} conns, aggregate (MB/s)"),
            1,
            true,
        ),
        m(
            "tput_n_min_mbs",
            format!("VM→browser, {conns} conns, slowest connection (MB/s)"),
            1,
            true,
        ),
        m(
            "tput_n_max_mbs",
            format!("VM→browser, {conns} conns, fastest connection (MB/s)"),
            1,
            true,
        ),
        m(
            "jain_n",
            format!("Jain fairness index, {conns} conns"),
            3,
            true,
        ),
        m(
            "cpu_s_per_gb",
            "Proxy CPU-seconds per GB relayed".into(),
            2,
            false,
        ),
        m(
            "rt_1_rate",
            "16 B round trips, 1 conn (per s)".into(),
            0,
            true,
        ),
        m(
            "rt_1_p50_us",
            "16 B round trip p50, 1 conn (µs)".into(),
            1,
            true,
        ),
        m(
            "rt_1_p99_us",
            "16 B round trip p99, 1 conn (µs)".into(),
            1,
            true,
        ),
        m(
            "rt_n_rate",
            format!("16 B round trips, {conns} conns (per s)"),
            0,
            true,
        ),
        m(
            "rt_n_p50_us",
            format!("16 B round trip p50, {conns} conns (µs)"),
            1,
            true,
        ),
        m(
            "rt_n_p99_us",
            format!("16 B round trip p99, {conns} conns (µs)"),
            1,
            true,
        ),
        m(
            "upgrades_s",
            format!("Upgrades per second, {connectors} connectors"),
            0,
            true,
        ),
        m(
            "sessions_s",
            format!("Upgrade + one 16 B echo per second, {connectors} connectors"),
            0,
            true,
        ),
        m(
            "up50_rate",
            format!(
                "Upgrade + first VM byte + close handshake per second, {UPGRADES50_CONNECTORS} connectors"
            ),
            0,
            true,
        ),
        m(
            "up50_handshake_p50_us",
            format!("Connect to 101 p50, {UPGRADES50_CONNECTORS} connectors (µs)"),
            0,
            true,
        ),
        m(
            "up50_handshake_p99_us",
            format!("Connect to 101 p99, {UPGRADES50_CONNECTORS} connectors (µs)"),
            0,
            true,
        ),
        m(
            "up50_first_byte_p50_us",
            format!("Connect to first VM byte p50, {UPGRADES50_CONNECTORS} connectors (µs)"),
            0,
            true,
        ),
        m(
            "up50_first_byte_p99_us",
            format!("Connect to first VM byte p99, {UPGRADES50_CONNECTORS} connectors (µs)"),
            0,
            true,
        ),
        m(
            "up50_close_p50_us",
            format!("Close frame to the proxy's close frame p50, {UPGRADES50_CONNECTORS} connectors (µs)"),
            0,
            true,
        ),
        m(
            "up50_close_p99_us",
            format!("Close frame to the proxy's close frame p99, {UPGRADES50_CONNECTORS} connectors (µs)"),
            0,
            true,
        ),
    ]
    .into_iter()
    .chain(paced_rate.into_iter().flat_map(|rate| {
        let paced = format!("{UPGRADES50_CONNECTORS} connectors paced at {rate}/s");
        [
            m(
                "up50_paced_rate",
                format!("Upgrade + first VM byte + close handshake per second, {paced}"),
                0,
                true,
            ),
            m(
                "up50_paced_handshake_p50_us",
                format!("Connect to 101 p50, {paced} (µs)"),
                0,
                true,
            ),
            m(
                "up50_paced_handshake_p99_us",
                format!("Connect to 101 p99, {paced} (µs)"),
                0,
                true,
            ),
            m(
                "up50_paced_first_byte_p50_us",
                format!("Connect to first VM byte p50, {paced} (µs)"),
                0,
                true,
            ),
            m(
                "up50_paced_first_byte_p99_us",
                format!("Connect to first VM byte p99, {paced} (µs)"),
                0,
                true,
            ),
            m(
                "up50_paced_close_p50_us",
                format!("Close frame to the proxy's close frame p50, {paced} (µs)"),
                0,
                true,
            ),
            m(
                "up50_paced_close_p99_us",
                format!("Close frame to the proxy's close frame p99, {paced} (µs)"),
                0,
                true,
            ),
        ]
    }))
    .chain(idle.iter().flat_map(|&n| {
        let (rss, pss) = idle_ids(n);
        [
            m(
                rss,
                format!("RSS per idle session, {n} held (KiB)"),
                1,
                false,
            ),
            m(
                pss,
                format!("PSS per idle session, {n} held (KiB)"),
                1,
                false,
            ),
        ]
    }))
    .collect()
}

/// The point whose measurement yields metric `id` (ids are prefixed by what they measure).
fn point_of(id: &str) -> Point {
    if id.starts_with("idle_") {
        Point::Idle
    } else if id.starts_with("rt_") {
        Point::Rt
    } else if id == "upgrades_s" || id == "sessions_s" {
        Point::Upgrades
    } else if id.starts_with("up50_") {
        Point::Upgrades50
    } else {
        // tput_*, jain_n, cpu_s_per_gb
        Point::Tput
    }
}

/// Figures of one proxy in one repetition, by metric id.
pub type Run = BTreeMap<&'static str, f64>;

/// Everything one proxy produced over the run.
pub struct ProxyResult {
    pub kind: Kind,
    /// Why the proxy was not run at all, if it was not.
    pub skipped: Option<String>,
    pub runs: Vec<Run>,
    /// Failures of single measurements, as printed during the run.
    pub errors: Vec<String>,
}

impl ProxyResult {
    pub fn median(&self, id: &str) -> Option<f64> {
        median_of(
            self.runs
                .iter()
                .filter_map(|r| r.get(id).copied())
                .collect(),
        )
    }
}

/// The median of `v` (the mean of the middle two for an even count); `None` when empty.
pub fn median_of(mut v: Vec<f64>) -> Option<f64> {
    if v.is_empty() {
        return None;
    }
    v.sort_by(f64::total_cmp);
    let mid = v.len() / 2;
    Some(if v.len() % 2 == 1 {
        v[mid]
    } else {
        (v[mid - 1] + v[mid]) / 2.0
    })
}

/// The share of the offered rate a proxy must complete in the paced phase to count as
/// keeping up: below it, the schedule ran ahead of the proxy and the backlog grew for the
/// whole window.
pub const KEEP_UP: f64 = 0.95;

/// Whether one repetition's paced phase kept up with `offered` cycles per second: it
/// completed at least [`KEEP_UP`] of them, and none failed. `None` when the repetition has
/// no paced figure (not run, or failed outright: its error is in the notes).
pub fn kept_up(run: &Run, offered: f64) -> Option<bool> {
    let rate = *run.get("up50_paced_rate")?;
    let failures = run.get("up50_paced_failures").copied().unwrap_or(0.0);
    Some(rate >= KEEP_UP * offered && failures == 0.0)
}

/// A proxy that did not keep up with the paced phase in some repetitions: its paced
/// latencies include a backlog that grew over the window, so they are not latencies at
/// the offered rate.
#[derive(Debug, Clone, PartialEq)]
pub struct Shortfall {
    /// Median completed cycles per second over the repetitions with a paced figure.
    pub achieved: f64,
    /// Repetitions that fell short, of those with a paced figure.
    pub behind: usize,
    pub of: usize,
}

/// `r`'s [`Shortfall`] at `offered` cycles per second, or `None` when every repetition
/// with a paced figure kept up (or none has one).
pub fn paced_shortfall(r: &ProxyResult, offered: f64) -> Option<Shortfall> {
    let verdicts: Vec<bool> = r
        .runs
        .iter()
        .filter_map(|run| kept_up(run, offered))
        .collect();
    let behind = verdicts.iter().filter(|&&ok| !ok).count();
    if behind == 0 {
        return None;
    }
    Some(Shortfall {
        achieved: r.median("up50_paced_rate")?,
        behind,
        of: verdicts.len(),
    })
}

/// Context printed above the table and stored in the JSON.
pub struct Header {
    pub date: String,
    pub nproc: usize,
    pub kernel: String,
    pub cpu: String,
    /// `/proc/loadavg` when the run started and when it ended: other work on the box.
    pub load: (String, String),
    pub settings: Value,
    pub settings_line: String,
    /// Offered rate of the `upgrades50` point's paced phase, when it ran: proxies that did
    /// not keep up with it get a note under the table and `up50_paced_kept_up: false`.
    pub paced_rate: Option<f64>,
    /// The proxy whose closed-loop rate the paced phase offered, when it was set that way:
    /// each other proxy's paced p99s are then set beside that proxy's closed-loop ones,
    /// both at that rate.
    pub paced_from: Option<Kind>,
}

/// vncgate-tls's median over vncgate's for metric `id` (every metric, costs included: CPU
/// per GB and memory per session compare as well as rates); `None` unless both ran and have
/// a figure.
pub fn tls_over_plain(results: &[ProxyResult], id: &str) -> Option<f64> {
    let median = |k| {
        results
            .iter()
            .find(|r| r.kind == k && r.skipped.is_none())
            .and_then(|r| r.median(id))
    };
    match (median(Kind::VncgateTls)?, median(Kind::Vncgate)?) {
        (_, 0.0) => None,
        (tls, plain) => Some(tls / plain),
    }
}

/// Whether the table gets the "TLS / plain" column: both vncgate and vncgate-tls ran.
fn has_tls_pair(results: &[ProxyResult]) -> bool {
    [Kind::Vncgate, Kind::VncgateTls]
        .iter()
        .all(|&k| results.iter().any(|r| r.kind == k && r.skipped.is_none()))
}

pub fn markdown(h: &Header, metrics: &[Metric], results: &[ProxyResult]) -> String {
    let direct = results.iter().find(|r| r.kind == Kind::Direct);
    let tls_pair = has_tls_pair(results);
    let mut s = String::new();
    s.push_str("# vncgate-bench results\n\n");
    s.push_str(&format!(
        "{} · {} CPUs ({}) · Linux {} · load average {} at start, {} at end\n\n{}\n\n",
        h.date, h.nproc, h.cpu, h.kernel, h.load.0, h.load.1, h.settings_line
    ));
    s.push_str("| metric |");
    let mut rule = String::from("|---|");
    for r in results {
        if r.kind == Kind::Direct {
            s.push_str(" direct |");
            rule.push_str("---:|");
        } else {
            s.push_str(&format!(" {} | ratio |", r.kind.name()));
            rule.push_str("---:|---:|");
        }
        if r.kind == Kind::VncgateTls && tls_pair {
            s.push_str(" TLS / plain |");
            rule.push_str("---:|");
        }
    }
    s.push('\n');
    s.push_str(&rule);
    s.push('\n');
    for m in metrics {
        s.push_str(&format!("| {} |", m.label));
        let base = direct.and_then(|d| d.median(m.id));
        for r in results {
            let v = r.median(m.id);
            s.push_str(&format!(" {} |", fmt(v, m.decimals)));
            if r.kind != Kind::Direct {
                let ratio = match (m.has_ratio, v, base) {
                    (true, Some(v), Some(b)) if b != 0.0 => format!("{:.2}x", v / b),
                    _ => "—".to_owned(),
                };
                s.push_str(&format!(" {ratio} |"));
            }
            if r.kind == Kind::VncgateTls && tls_pair {
                let x = tls_over_plain(results, m.id);
                s.push_str(&format!(
                    " {} |",
                    x.map_or("—".to_owned(), |x| format!("{x:.2}x"))
                ));
            }
        }
        s.push('\n');
    }
    s.push('\n');
    if let Some(rate) = h.paced_rate {
        for r in results {
            let Some(f) = paced_shortfall(r, rate) else {
                continue;
            };
            s.push_str(&format!(
                "- {} did not keep up with the paced {rate}/s: it completed {:.0}/s (median), \
                 below {:.0}% of the offered rate or with failures in {} of {} repetitions, \
                 so its paced latencies include its growing backlog.\n",
                r.kind.name(),
                f.achieved,
                KEEP_UP * 100.0,
                f.behind,
                f.of
            ));
        }
    }
    if let (Some(rate), Some(by)) = (h.paced_rate, h.paced_from) {
        s.push_str(&at_matched_rate(rate, by, results));
    }
    for r in results {
        if let Some(why) = &r.skipped {
            s.push_str(&format!("- {} skipped: {why}\n", r.kind.name()));
        }
        for e in &r.errors {
            s.push_str(&format!("- {} error: {e}\n", r.kind.name()));
        }
    }
    s
}

/// The notes that set each proxy's p99s paced at `by`'s closed-loop rate (`rate`) beside
/// `by`'s own p99s in its closed loop: both are latencies at that rate, one on a schedule,
/// one at saturation. A proxy without both figures gets no note.
fn at_matched_rate(rate: f64, by: Kind, results: &[ProxyResult]) -> String {
    let Some(reference) = results.iter().find(|r| r.kind == by && r.skipped.is_none()) else {
        return String::new();
    };
    let us = |r: &ProxyResult, id: &str| r.median(id).map(|v| format!("{v:.0} µs"));
    let (Some(ref_hs), Some(ref_fb)) = (
        us(reference, "up50_handshake_p99_us"),
        us(reference, "up50_first_byte_p99_us"),
    ) else {
        return String::new();
    };
    let mut s = String::new();
    for r in results {
        if r.kind == by || r.kind == Kind::Direct || r.skipped.is_some() {
            continue;
        }
        let (Some(hs), Some(fb)) = (
            us(r, "up50_paced_handshake_p99_us"),
            us(r, "up50_paced_first_byte_p99_us"),
        ) else {
            continue;
        };
        s.push_str(&format!(
            "- At {by}'s closed-loop rate ({rate}/s): {name} paced, connect to 101 p99 {hs} and \
             to the first VM byte p99 {fb}; {by} in its own closed loop, {ref_hs} and {ref_fb}.\n",
            by = by.name(),
            name = r.kind.name(),
        ));
    }
    s
}

fn fmt(v: Option<f64>, decimals: usize) -> String {
    match v {
        Some(v) => format!("{v:.decimals$}"),
        None => "—".to_owned(),
    }
}

pub fn json(h: &Header, metrics: &[Metric], results: &[ProxyResult]) -> Value {
    let direct = results.iter().find(|r| r.kind == Kind::Direct);
    let mut proxies = serde_json::Map::new();
    for r in results {
        let mut median = serde_json::Map::new();
        let mut ratio = serde_json::Map::new();
        for m in metrics {
            if let Some(v) = r.median(m.id) {
                median.insert(m.id.into(), json!(v));
                if let (true, Some(b)) = (m.has_ratio, direct.and_then(|d| d.median(m.id)))
                    && b != 0.0
                {
                    ratio.insert(m.id.into(), json!(v / b));
                }
            }
        }
        let mut p = json!({
            "skipped": r.skipped,
            "errors": r.errors,
            "runs": r.runs,
            "median": median,
            "ratio_to_direct": ratio,
        });
        // Only for proxies with a paced figure: absent is "not measured", not "kept up".
        if let Some(rate) = h.paced_rate
            && r.runs.iter().any(|run| kept_up(run, rate).is_some())
        {
            p["up50_paced_kept_up"] = json!(paced_shortfall(r, rate).is_none());
        }
        if r.kind == Kind::VncgateTls && has_tls_pair(results) {
            let to_plain: serde_json::Map<String, Value> = metrics
                .iter()
                .filter_map(|m| Some((m.id.to_owned(), json!(tls_over_plain(results, m.id)?))))
                .collect();
            p["ratio_to_plaintext"] = Value::Object(to_plain);
        }
        proxies.insert(r.kind.name().into(), p);
    }
    json!({
        "date": h.date,
        "machine": { "nproc": h.nproc, "kernel": h.kernel, "cpu": h.cpu },
        "loadavg": { "start": h.load.0, "end": h.load.1 },
        "settings": h.settings,
        "metrics": metrics.iter().map(|m| json!({"id": m.id, "label": m.label})).collect::<Vec<_>>(),
        "proxies": proxies,
    })
}

/// `YYYY-MM-DDTHH:MM:SSZ` for now, without a date crate (days-to-civil, H. Hinnant).
pub fn utc_now() -> String {
    let secs = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs() as i64)
        .unwrap_or(0);
    let (days, rem) = (secs.div_euclid(86_400), secs.rem_euclid(86_400));
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    let y = yoe + era * 400 + i64::from(m <= 2);
    format!(
        "{y:04}-{m:02}-{d:02}T{:02}:{:02}:{:02}Z",
        rem / 3600,
        rem / 60 % 60,
        rem % 60
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Each of `want` is a whole line of `md`.
    fn assert_lines(md: &str, want: &[&str]) {
        let lines: Vec<&str> = md.lines().collect();
        for w in want {
            assert!(lines.contains(w), "no line {w:?} in:\n{md}");
        }
    }

    #[test]
    fn every_point_has_rows_and_ids_map_as_the_runner_records_them() {
        let ms = metrics(50, 4, &[1000, 10000], Some(5000.0));
        for p in Point::ALL {
            assert!(ms.iter().any(|m| m.point == p), "{p:?} has no row");
        }
        let point = |id: &str| ms.iter().find(|m| m.id == id).unwrap().point;
        assert_eq!(point("tput_n_mbs"), Point::Tput);
        assert_eq!(point("jain_n"), Point::Tput);
        assert_eq!(point("cpu_s_per_gb"), Point::Tput);
        assert_eq!(point("rt_n_p99_us"), Point::Rt);
        assert_eq!(point("sessions_s"), Point::Upgrades);
        assert_eq!(point("up50_rate"), Point::Upgrades50);
        assert_eq!(point("up50_first_byte_p99_us"), Point::Upgrades50);
        assert_eq!(point("idle_pss_kib_1000"), Point::Idle);
        assert_eq!(point("idle_rss_kib_10000"), Point::Idle);
        let labels: Vec<&str> = ms
            .iter()
            .filter(|m| m.point == Point::Idle)
            .map(|m| m.label.as_str())
            .collect();
        assert_eq!(
            labels,
            [
                "RSS per idle session, 1000 held (KiB)",
                "PSS per idle session, 1000 held (KiB)",
                "RSS per idle session, 10000 held (KiB)",
                "PSS per idle session, 10000 held (KiB)",
            ]
        );
        assert_eq!(
            idle_ids(10000),
            ("idle_rss_kib_10000", "idle_pss_kib_10000")
        );
        assert!(std::ptr::eq(idle_ids(1000).0, idle_ids(1000).0));
    }

    fn result(kind: Kind, figures: &[(&'static str, f64)]) -> ProxyResult {
        ProxyResult {
            kind,
            skipped: None,
            runs: vec![figures.iter().copied().collect()],
            errors: Vec::new(),
        }
    }

    fn header() -> Header {
        Header {
            date: "2026-12-01T00:00:00Z".into(),
            nproc: 2,
            kernel: "6.1".into(),
            cpu: "test CPU".into(),
            load: ("1.00".into(), "2.00".into()),
            settings: json!({}),
            settings_line: "settings".into(),
            paced_rate: Some(5000.0),
            paced_from: None,
        }
    }

    #[test]
    fn paced_at_a_proxys_rate_sets_the_others_paced_p99s_beside_its_closed_loop_ones() {
        let ms = metrics(50, 4, &[], Some(9812.0));
        let rs = vec![
            result(Kind::Direct, &[("up50_first_byte_p99_us", 900.0)]),
            result(
                Kind::Vncgate,
                &[
                    ("up50_paced_handshake_p99_us", 2400.0),
                    ("up50_paced_first_byte_p99_us", 3300.0),
                ],
            ),
            result(
                Kind::Websocat,
                &[
                    ("up50_handshake_p99_us", 3600.0),
                    ("up50_first_byte_p99_us", 4900.0),
                    ("up50_paced_handshake_p99_us", 16000.0),
                    ("up50_paced_first_byte_p99_us", 17000.0),
                ],
            ),
            // No paced figure: no note.
            result(Kind::Websockify, &[("up50_handshake_p99_us", 90000.0)]),
        ];
        let mut h = header();
        h.paced_rate = Some(9812.0);
        let md = markdown(&h, &ms, &rs);
        assert!(
            !md.contains("closed-loop rate"),
            "no reference, no note: {md}"
        );
        h.paced_from = Some(Kind::Websocat);
        let md = markdown(&h, &ms, &rs);
        let notes: Vec<&str> = md
            .lines()
            .filter(|l| l.contains("closed-loop rate"))
            .collect();
        assert_eq!(
            notes,
            [
                "- At websocat's closed-loop rate (9812/s): vncgate paced, connect to 101 p99 2400 µs and to the first VM byte p99 3300 µs; websocat in its own closed loop, 3600 µs and 4900 µs."
            ],
            "{md}"
        );
        // The reference without its closed-loop figures: nothing to set beside.
        let rs: Vec<ProxyResult> = rs
            .into_iter()
            .map(|r| {
                if r.kind == Kind::Websocat {
                    result(Kind::Websocat, &[("up50_rate", 9812.0)])
                } else {
                    r
                }
            })
            .collect();
        assert!(!markdown(&h, &ms, &rs).contains("closed-loop rate"));
    }

    #[test]
    fn vncgate_tls_gets_a_tls_over_plaintext_column_for_every_metric() {
        let ms = metrics(50, 4, &[], Some(5000.0));
        let rs = vec![
            result(Kind::Direct, &[("tput_1_mbs", 1000.0)]),
            result(
                Kind::Vncgate,
                &[("tput_1_mbs", 800.0), ("cpu_s_per_gb", 2.0)],
            ),
            result(
                Kind::VncgateTls,
                &[("tput_1_mbs", 400.0), ("cpu_s_per_gb", 3.0)],
            ),
        ];
        let md = markdown(&header(), &ms, &rs);
        assert_lines(
            &md,
            &[
                "| metric | direct | vncgate | ratio | vncgate-tls | ratio | TLS / plain |",
                "|---|---:|---:|---:|---:|---:|---:|",
                "| VM→browser throughput, 1 conn (MB/s) | 1000.0 | 800.0 | 0.80x | 400.0 | 0.40x | 0.50x |",
                // A cost has no ratio to direct, but TLS / plaintext still compares.
                "| Proxy CPU-seconds per GB relayed | — | 2.00 | — | 3.00 | — | 1.50x |",
            ],
        );
        let js = json(&header(), &ms, &rs);
        let tls = &js["proxies"]["vncgate-tls"];
        assert_eq!(tls["ratio_to_plaintext"]["tput_1_mbs"], json!(0.5));
        assert_eq!(tls["ratio_to_plaintext"]["cpu_s_per_gb"], json!(1.5));
        assert_eq!(tls["ratio_to_direct"]["tput_1_mbs"], json!(0.4));
        assert!(js["proxies"]["vncgate"].get("ratio_to_plaintext").is_none());
    }

    #[test]
    fn upgrades50_rows_side_by_side_and_direct_has_no_handshake() {
        let mut ms = metrics(50, 4, &[], Some(5000.0));
        ms.retain(|m| m.point == Point::Upgrades50);
        let ids: Vec<&str> = ms.iter().map(|m| m.id).collect();
        assert_eq!(
            ids,
            [
                "up50_rate",
                "up50_handshake_p50_us",
                "up50_handshake_p99_us",
                "up50_first_byte_p50_us",
                "up50_first_byte_p99_us",
                "up50_close_p50_us",
                "up50_close_p99_us",
                "up50_paced_rate",
                "up50_paced_handshake_p50_us",
                "up50_paced_handshake_p99_us",
                "up50_paced_first_byte_p50_us",
                "up50_paced_first_byte_p99_us",
                "up50_paced_close_p50_us",
                "up50_paced_close_p99_us",
            ]
        );
        let rs = vec![
            result(
                Kind::Direct,
                &[
                    ("up50_rate", 20000.0),
                    ("up50_first_byte_p50_us", 500.0),
                    ("up50_first_byte_p99_us", 2000.0),
                ],
            ),
            result(
                Kind::Vncgate,
                &[
                    ("up50_rate", 10000.0),
                    ("up50_handshake_p50_us", 900.0),
                    ("up50_handshake_p99_us", 3000.0),
                    ("up50_first_byte_p50_us", 1000.0),
                    ("up50_first_byte_p99_us", 5000.0),
                ],
            ),
            result(Kind::Websocat, &[("up50_rate", 5000.0)]),
        ];
        let md = markdown(&header(), &ms, &rs);
        let lines: Vec<&str> = md.lines().collect();
        assert!(
            lines.contains(
                &"| Upgrade + first VM byte + close handshake per second, 50 connectors | 20000 | 10000 | 0.50x | 5000 | 0.25x |"
            ),
            "{md}"
        );
        // Direct has no upgrade: no handshake figure, so no ratio either.
        assert!(
            lines.contains(&"| Connect to 101 p50, 50 connectors (µs) | — | 900 | — | — | — |"),
            "{md}"
        );
        assert!(
            lines.contains(
                &"| Connect to first VM byte p99, 50 connectors (µs) | 2000 | 5000 | 2.50x | — | — |"
            ),
            "{md}"
        );
        let js = json(&header(), &ms, &rs);
        assert_eq!(
            js["proxies"]["vncgate"]["median"]["up50_handshake_p99_us"],
            json!(3000.0)
        );
        assert_eq!(
            js["proxies"]["vncgate"]["ratio_to_direct"]["up50_rate"],
            json!(0.5)
        );
        assert!(
            js["proxies"]["direct"]["median"]
                .get("up50_handshake_p50_us")
                .is_none()
        );
        assert!(
            js["metrics"]
                .as_array()
                .unwrap()
                .iter()
                .any(|m| m["id"] == "up50_first_byte_p50_us")
        );
    }

    #[test]
    fn paced_rows_side_by_side_and_a_proxy_below_95_percent_is_flagged() {
        let mut ms = metrics(50, 4, &[], Some(5000.0));
        ms.retain(|m| m.id.starts_with("up50_paced_"));
        let labels: Vec<&str> = ms.iter().map(|m| m.label.as_str()).collect();
        assert_eq!(
            labels,
            [
                "Upgrade + first VM byte + close handshake per second, 50 connectors paced at 5000/s",
                "Connect to 101 p50, 50 connectors paced at 5000/s (µs)",
                "Connect to 101 p99, 50 connectors paced at 5000/s (µs)",
                "Connect to first VM byte p50, 50 connectors paced at 5000/s (µs)",
                "Connect to first VM byte p99, 50 connectors paced at 5000/s (µs)",
                "Close frame to the proxy's close frame p50, 50 connectors paced at 5000/s (µs)",
                "Close frame to the proxy's close frame p99, 50 connectors paced at 5000/s (µs)",
            ]
        );
        let paced = |rate: f64, failures: f64, hs99: Option<f64>, fb99: f64| {
            let mut run: Run = [
                ("up50_paced_rate", rate),
                ("up50_paced_failures", failures),
                ("up50_paced_first_byte_p99_us", fb99),
            ]
            .into_iter()
            .collect();
            if let Some(h) = hs99 {
                run.insert("up50_paced_handshake_p99_us", h);
            }
            run
        };
        let with_runs = |kind, runs| ProxyResult {
            kind,
            skipped: None,
            runs,
            errors: Vec::new(),
        };
        let rs = vec![
            with_runs(Kind::Direct, vec![paced(5000.0, 0.0, None, 400.0)]),
            // 4800/s is 96% of 5000/s: kept up.
            with_runs(Kind::Vncgate, vec![paced(4800.0, 0.0, Some(900.0), 1400.0)]),
            // At the rate but with a failure: did not keep up.
            with_runs(
                Kind::Websocat,
                vec![paced(4990.0, 3.0, Some(2400.0), 3000.0)],
            ),
            // 4700/s is 94%, 900/s far below; the median of the three is 4700/s.
            with_runs(
                Kind::Websockify,
                vec![
                    paced(4700.0, 0.0, Some(9e5), 1e6),
                    paced(900.0, 0.0, Some(2e6), 2e6),
                    paced(5000.0, 0.0, Some(800.0), 1000.0),
                ],
            ),
        ];
        let md = markdown(&header(), &ms, &rs);
        assert_lines(
            &md,
            &[
                "| Connect to 101 p99, 50 connectors paced at 5000/s (µs) | — | 900 | — | 2400 | — | 900000 | — |",
                "| Connect to first VM byte p99, 50 connectors paced at 5000/s (µs) | 400 | 1400 | 3.50x | 3000 | 7.50x | 1000000 | 2500.00x |",
                "- websockify did not keep up with the paced 5000/s: it completed 4700/s (median), below 95% of the offered rate or with failures in 2 of 3 repetitions, so its paced latencies include its growing backlog.",
            ],
        );
        assert!(
            md.contains("- websocat did not keep up with the paced 5000/s: it completed 4990/s")
        );
        assert!(!md.contains("vncgate did not keep up"), "{md}");
        assert!(!md.contains("direct did not keep up"), "{md}");
        let js = json(&header(), &ms, &rs);
        for (name, kept_up) in [
            ("direct", true),
            ("vncgate", true),
            ("websocat", false),
            ("websockify", false),
        ] {
            assert_eq!(
                js["proxies"][name]["up50_paced_kept_up"],
                json!(kept_up),
                "{name}"
            );
        }
        assert_eq!(
            js["proxies"]["websockify"]["median"]["up50_paced_rate"],
            json!(4700.0)
        );
        assert_eq!(
            paced_shortfall(&rs[3], 5000.0),
            Some(Shortfall {
                achieved: 4700.0,
                behind: 2,
                of: 3
            })
        );
    }

    #[test]
    fn without_a_paced_phase_there_are_no_paced_rows_notes_or_verdicts() {
        let ms = metrics(50, 4, &[], None);
        assert!(ms.iter().all(|m| !m.id.starts_with("up50_paced_")));
        assert!(ms.iter().any(|m| m.id == "up50_rate"));
        let mut h = header();
        h.paced_rate = None;
        let rs = vec![result(Kind::Websockify, &[("up50_rate", 300.0)])];
        let md = markdown(&h, &ms, &rs);
        assert!(!md.contains("keep up"), "{md}");
        let js = json(&h, &ms, &rs);
        assert!(
            js["proxies"]["websockify"]
                .get("up50_paced_kept_up")
                .is_none()
        );
        // A paced phase that ran, but a repetition without its figures has no verdict.
        assert_eq!(kept_up(&rs[0].runs[0], 5000.0), None);
    }

    #[test]
    fn no_tls_over_plaintext_without_both_vncgates() {
        let ms = metrics(50, 4, &[], Some(5000.0));
        let mut plain = result(Kind::Vncgate, &[("tput_1_mbs", 800.0)]);
        plain.skipped = Some("binary not found".into());
        let rs = vec![
            result(Kind::Direct, &[("tput_1_mbs", 1000.0)]),
            plain,
            result(Kind::VncgateTls, &[("tput_1_mbs", 400.0)]),
        ];
        let md = markdown(&header(), &ms, &rs);
        assert!(!md.contains("TLS / plain"), "{md}");
        assert_eq!(tls_over_plain(&rs, "tput_1_mbs"), None);
        let js = json(&header(), &ms, &rs);
        assert!(
            js["proxies"]["vncgate-tls"]
                .get("ratio_to_plaintext")
                .is_none()
        );
    }
}
