//! What an operator scrapes from `/metrics`, checked on the real binary: a HELP line on every
//! family, every counter and histogram present at zero before any traffic (labelled series of
//! fixed sets included), `vncgate_build_info`, process metrics, `promtool check metrics`
//! clean; events counted under the registered series and adding none; and every query of
//! the Grafana dashboard (`config/grafana/vncgate.json`) names only metrics a gateway exposes.

mod common;

use std::collections::{BTreeMap, BTreeSet};
use std::io::Write as _;
use std::process::{Command, Stdio};
use std::time::Duration;

use common::*;
use vncgate_schema::testing::RedisServer;

type Labels = BTreeMap<String, String>;

/// A parsed text exposition.
#[derive(Default)]
struct Exposition {
    help: BTreeMap<String, String>,
    types: BTreeMap<String, String>,
    samples: Vec<(String, Labels, f64)>,
}

/// `k="v",k2="v2"` (with the format's escapes) into a map.
fn parse_labels(s: &str) -> Labels {
    let mut out = Labels::new();
    let mut rest = s;
    while let Some((key, after)) = rest.split_once("=\"") {
        let mut value = String::new();
        let mut chars = after.char_indices();
        let mut end = after.len();
        while let Some((i, c)) = chars.next() {
            match c {
                '\\' => match chars.next() {
                    Some((_, 'n')) => value.push('\n'),
                    Some((_, c)) => value.push(c),
                    None => {}
                },
                '"' => {
                    end = i + 1;
                    break;
                }
                c => value.push(c),
            }
        }
        out.insert(key.trim_start_matches(',').trim().to_owned(), value);
        rest = &after[end..];
    }
    out
}

fn parse(body: &str) -> Exposition {
    let mut e = Exposition::default();
    for line in body.lines().filter(|l| !l.trim().is_empty()) {
        if let Some(rest) = line.strip_prefix("# HELP ") {
            let (name, help) = rest.split_once(' ').unwrap_or((rest, ""));
            e.help.insert(name.to_owned(), help.to_owned());
        } else if let Some(rest) = line.strip_prefix("# TYPE ") {
            let (name, kind) = rest.split_once(' ').expect("TYPE name kind");
            e.types.insert(name.to_owned(), kind.to_owned());
        } else if !line.starts_with('#') {
            let (series, value) = line.rsplit_once(' ').expect("series value");
            let (name, labels) = match series.split_once('{') {
                Some((n, l)) => (n, parse_labels(l.strip_suffix('}').expect("closing brace"))),
                None => (series, Labels::new()),
            };
            let v = match value {
                "+Inf" => f64::INFINITY,
                "-Inf" => f64::NEG_INFINITY,
                v => v.parse().unwrap_or_else(|_| panic!("value of {line}")),
            };
            e.samples.push((name.to_owned(), labels, v));
        }
    }
    e
}

impl Exposition {
    /// The family a sample belongs to: a histogram's `_bucket`, `_sum` and `_count` are its.
    fn family<'a>(&self, sample: &'a str) -> &'a str {
        for suffix in ["_bucket", "_sum", "_count"] {
            if let Some(base) = sample.strip_suffix(suffix)
                && self.types.get(base).is_some_and(|t| t == "histogram")
            {
                return base;
            }
        }
        sample
    }

    /// Whether a name a query uses is exposed: a family, or a histogram's sample name.
    fn exposes(&self, name: &str) -> bool {
        let family = self.family(name);
        self.types.contains_key(family)
            && self.samples.iter().any(|(n, ..)| self.family(n) == family)
    }

    fn value(&self, name: &str, labels: &[(&str, &str)]) -> Option<f64> {
        let want: Labels = labels
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        self.samples
            .iter()
            .find(|(n, l, _)| n == name && *l == want)
            .map(|(.., v)| *v)
    }

    /// The series of one family, as text, for before/after comparisons.
    fn series_of(&self, name: &str) -> BTreeSet<String> {
        self.samples
            .iter()
            .filter(|(n, ..)| n == name)
            .map(|(n, l, _)| format!("{n}{l:?}"))
            .collect()
    }
}

fn scrape(gw: &Gw) -> (String, Exposition) {
    let (status, body) = gw.admin_get("/metrics");
    assert_eq!(status, 200, "{body}");
    let e = parse(&body);
    (body, e)
}

/// `promtool check metrics` on an exposition: it must be installed (scripts/test.sh installs
/// Debian's `prometheus`), and it must find nothing.
fn promtool_check(body: &str) {
    let mut child = Command::new("promtool")
        .args(["check", "metrics"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap_or_else(|e| {
            panic!("promtool is required (apt-get install prometheus; scripts/test.sh installs it): {e}")
        });
    child
        .stdin
        .take()
        .unwrap()
        .write_all(body.as_bytes())
        .unwrap();
    let out = child.wait_with_output().unwrap();
    let said = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        out.status.success() && said.trim().is_empty(),
        "promtool check metrics: {said}\n{body}"
    );
}

/// Every family with a HELP line that says something.
fn assert_described(e: &Exposition) {
    let families: BTreeSet<&str> = e
        .types
        .keys()
        .map(String::as_str)
        .chain(e.samples.iter().map(|(n, ..)| e.family(n)))
        .collect();
    for f in families {
        assert!(
            e.help.get(f).is_some_and(|h| !h.trim().is_empty()),
            "{f} has no HELP line"
        );
    }
}

#[test]
fn a_fresh_gateway_is_described_counted_from_zero_and_lint_clean() {
    let gw = Gw::start("auto", &["--workers", "2"]);
    let (body, e) = scrape(&gw);
    assert_described(&e);
    promtool_check(&body);

    // Every metric the gateway defines is there before any traffic but Redis's health,
    // which only a gateway with --redis has.
    for &(name, ..) in vncgate::metrics::DESCRIPTIONS {
        if name != vncgate::metrics::REDIS_UP {
            assert!(e.exposes(name), "{name} is missing from a fresh gateway");
        }
    }
    // Every zero series, counters and histograms at 0.
    for s in vncgate::metrics::zero_series(2) {
        let labels: Vec<(&str, &str)> = s.labels.iter().map(|(k, v)| (*k, v.as_str())).collect();
        let kind = e.types.get(s.name).map(String::as_str);
        let sample = match kind {
            Some("histogram") => format!("{}_count", s.name),
            _ => s.name.to_owned(),
        };
        let v = e.value(&sample, &labels);
        assert!(v.is_some(), "{sample}{labels:?} is missing");
        if kind != Some("gauge") {
            assert_eq!(v, Some(0.0), "{sample}{labels:?}");
        }
    }
    // Spelled out, so that the set above cannot quietly shrink.
    let zero = |name: &str, labels: &[(&str, &str)]| {
        assert_eq!(e.value(name, labels), Some(0.0), "{name}{labels:?}");
    };
    let browser = ("blame", "browser");
    zero(
        "vncgate_sessions_closed_total",
        &[
            ("code", "4000"),
            ("cause", "upstream_refused"),
            ("blame", "vm"),
        ],
    );
    zero(
        "vncgate_sessions_closed_total",
        &[
            ("code", "1011"),
            ("cause", "internal"),
            ("blame", "gateway"),
        ],
    );
    zero(
        "vncgate_sessions_closed_total",
        &[("code", "1006"), ("cause", "browser_gone"), browser],
    );
    zero(
        "vncgate_sessions_closed_total",
        &[("code", "other"), ("cause", "browser_close"), browser],
    );
    zero(
        "vncgate_sessions_closed_total",
        &[("code", "1009"), ("cause", "message_too_big"), browser],
    );
    zero(
        "vncgate_handshake_rejected_total",
        &[
            ("status", "503"),
            ("reason", "routes_unavailable"),
            ("blame", "gateway"),
        ],
    );
    zero(
        "vncgate_handshake_rejected_total",
        &[
            ("status", "503"),
            ("reason", "draining"),
            ("blame", "policy"),
        ],
    );
    zero(
        "vncgate_handshake_rejected_total",
        &[("status", "none"), ("reason", "client_gone"), browser],
    );
    zero(
        "vncgate_handshake_rejected_total",
        &[("status", "400"), ("reason", "bad_request"), browser],
    );
    zero("vncgate_route_cache_total", &[("result", "stale")]);
    zero("vncgate_redis_errors_total", &[("op", "lookup_timeout")]);
    zero("vncgate_route_events_total", &[("op", "del")]);
    zero(
        "vncgate_route_records_invalid_total",
        &[("error", "newer_version")],
    );
    zero(
        "vncgate_relayed_bytes_total",
        &[("direction", "vm_to_browser")],
    );
    zero(
        "vncgate_relayed_bytes_total",
        &[("direction", "browser_to_vm")],
    );
    zero(
        "vncgate_upstream_connect_retries_total",
        &[("cause", "upstream_refused")],
    );
    zero("vncgate_connections_accepted_total", &[("worker", "0")]);
    zero("vncgate_connections_accepted_total", &[("worker", "1")]);
    zero("vncgate_sessions_opened_total", &[]);
    zero("vncgate_upstream_connect_seconds_bucket", &[("le", "+Inf")]);
    zero("vncgate_route_lookup_seconds_count", &[]);
    zero("vncgate_draining", &[]);
    assert_eq!(
        e.value("vncgate_connections_accepted_total", &[("worker", "2")]),
        None
    );
    // No reason carries free text.
    for (n, l, _) in &e.samples {
        for v in l.values() {
            assert!(!v.contains(' '), "{n}{l:?}: a label value with a space");
        }
    }

    // The build: this crate's version, and the commit it was built from.
    let builds: Vec<_> = e
        .samples
        .iter()
        .filter(|(n, ..)| n == "vncgate_build_info")
        .collect();
    assert_eq!(builds.len(), 1, "{builds:?}");
    let (_, labels, v) = builds[0];
    assert_eq!(*v, 1.0);
    assert_eq!(labels["version"], env!("CARGO_PKG_VERSION"));
    let git = Command::new("git")
        .args(["rev-parse", "--short=12", "HEAD"])
        .current_dir(env!("CARGO_MANIFEST_DIR"))
        .output()
        .ok()
        .filter(|o| o.status.success())
        .map(|o| String::from_utf8(o.stdout).unwrap().trim().to_owned());
    match git {
        Some(head) => assert_eq!(labels["commit"], head),
        None => assert_eq!(labels["commit"], "unknown"),
    }

    // The process: this process's numbers, read from /proc.
    for name in [
        "process_resident_memory_bytes",
        "process_virtual_memory_bytes",
        "process_open_fds",
        "process_max_fds",
        "process_cpu_seconds_total",
        "process_start_time_seconds",
        "process_threads",
    ] {
        assert!(e.exposes(name), "{name} is missing");
    }
    assert!(e.value("process_resident_memory_bytes", &[]).unwrap() > 1e6);
    assert!(e.value("process_open_fds", &[]).unwrap() >= 3.0);
    // Two workers, the admin thread, the main thread at least.
    assert!(e.value("process_threads", &[]).unwrap() >= 4.0);
    let limits = std::fs::read_to_string(format!("/proc/{}/limits", gw.pid())).unwrap();
    let soft: f64 = limits
        .lines()
        .find(|l| l.starts_with("Max open files"))
        .and_then(|l| l.split_whitespace().nth(3)?.parse().ok())
        .unwrap();
    assert_eq!(e.value("process_max_fds", &[]), Some(soft));
}

/// A series and the value it must reach.
type Expected<'a> = (&'a str, &'a [(&'a str, &'a str)], f64);

#[test]
fn events_count_under_the_registered_series_and_add_none() {
    let echo = echo_server();
    let (s_route, down_route) = (
        format!("s={}", echo.addr),
        format!("down={}", closed_port()),
    );
    let gw = Gw::start(
        "auto",
        &[
            "--route",
            &s_route,
            "--route",
            &down_route,
            "--allow-upstream",
            "127.0.0.1",
            "--connect-retry-window",
            "0",
        ],
    );
    let (_, before) = scrape(&gw);
    let families = [
        "vncgate_handshake_rejected_total",
        "vncgate_sessions_closed_total",
        "vncgate_relayed_bytes_total",
    ];

    let refused = [
        (upgrade_request("/elsewhere/s", ""), 404),
        (upgrade_request("/vnc/nope", ""), 404),
        ("GET /vnc/s HTTP/1.1\r\nHost: gw\r\n\r\n".to_owned(), 426),
    ];
    for (req, status) in &refused {
        let resp = http_exchange(gw.addr, req.as_bytes());
        assert_eq!(status_of(&resp), *status, "{resp}");
    }
    // A client that leaves halfway through its request.
    {
        let mut c = std::net::TcpStream::connect(gw.addr).unwrap();
        c.write_all(b"GET /vnc/s HTTP/1.1\r\nHost: g").unwrap();
    }
    // A VM that refuses: 4000, the VM's fault.
    let mut ws = RawWs::connect(gw.addr, "/vnc/down", "");
    let (_, close) = ws.until_close();
    assert_eq!(close.and_then(|f| f.close_code()), Some(4000));
    // Three sessions the browser closes: with 1000, and with two application codes.
    for code in [1000u16, 4321, 3000] {
        let mut ws = RawWs::connect(gw.addr, "/vnc/s", "");
        ws.send(&frame(0x82, b"ping!"));
        assert_eq!(ws.read_data(5), b"ping!");
        ws.send(&frame(0x88, &code.to_be_bytes()));
        let (_, close) = ws.until_close();
        assert_eq!(close.and_then(|f| f.close_code()), Some(code));
    }

    let want: &[Expected] = &[
        (
            "vncgate_handshake_rejected_total",
            &[
                ("status", "404"),
                ("reason", "path_not_found"),
                ("blame", "browser"),
            ],
            1.0,
        ),
        (
            "vncgate_handshake_rejected_total",
            &[
                ("status", "404"),
                ("reason", "unknown_session"),
                ("blame", "browser"),
            ],
            1.0,
        ),
        (
            "vncgate_handshake_rejected_total",
            &[
                ("status", "426"),
                ("reason", "upgrade_required"),
                ("blame", "browser"),
            ],
            1.0,
        ),
        (
            "vncgate_sessions_closed_total",
            &[
                ("code", "1000"),
                ("cause", "browser_close"),
                ("blame", "browser"),
            ],
            1.0,
        ),
        (
            "vncgate_sessions_closed_total",
            &[
                ("code", "other"),
                ("cause", "browser_close"),
                ("blame", "browser"),
            ],
            2.0,
        ),
        (
            "vncgate_handshake_rejected_total",
            &[
                ("status", "none"),
                ("reason", "client_gone"),
                ("blame", "browser"),
            ],
            1.0,
        ),
        (
            "vncgate_sessions_closed_total",
            &[
                ("code", "4000"),
                ("cause", "upstream_refused"),
                ("blame", "vm"),
            ],
            1.0,
        ),
        ("vncgate_sessions_opened_total", &[], 4.0),
        (
            "vncgate_relayed_bytes_total",
            &[("direction", "vm_to_browser")],
            15.0,
        ),
        (
            "vncgate_relayed_bytes_total",
            &[("direction", "browser_to_vm")],
            15.0,
        ),
    ];
    // Byte counts are flushed by each worker once a second; the rest is counted at once.
    let mut last = None;
    let settled = eventually(Duration::from_secs(10), || {
        let (_, e) = scrape(&gw);
        let ok = want.iter().all(|(n, l, v)| e.value(n, l) == Some(*v));
        last = Some(e);
        ok
    });
    let after = last.unwrap();
    for (n, l, v) in want {
        assert!(settled, "{n}{l:?}: {:?}, want {v}", after.value(n, l));
    }
    // Counted under the registered series: not one new series.
    for f in families {
        assert_eq!(before.series_of(f), after.series_of(f), "{f} grew a series");
    }
}

/// The names a PromQL expression uses that look like the gateway's or a process's metrics.
fn metric_names(expr: &str) -> Vec<String> {
    let b = expr.as_bytes();
    let word = |c: u8| c.is_ascii_alphanumeric() || c == b'_' || c == b':';
    let mut out = Vec::new();
    let mut i = 0;
    while i < b.len() {
        if word(b[i]) && (i == 0 || !word(b[i - 1])) {
            let start = i;
            while i < b.len() && word(b[i]) {
                i += 1;
            }
            let w = &expr[start..i];
            if (w.starts_with("vncgate_") || w.starts_with("process_")) && !w.contains(':') {
                out.push(w.to_owned());
            }
        } else {
            i += 1;
        }
    }
    out
}

/// Every PromQL expression in the dashboard: the panels' targets (rows' nested panels
/// included) and the template variables' queries.
fn dashboard_exprs(d: &serde_json::Value) -> Vec<String> {
    fn panels(v: &serde_json::Value, out: &mut Vec<String>) {
        for p in v.as_array().into_iter().flatten() {
            for t in p["targets"].as_array().into_iter().flatten() {
                out.push(
                    t["expr"]
                        .as_str()
                        .expect("a target without expr")
                        .to_owned(),
                );
            }
            panels(&p["panels"], out);
        }
    }
    let mut out = Vec::new();
    panels(&d["panels"], &mut out);
    for v in d["templating"]["list"].as_array().into_iter().flatten() {
        if let Some(q) = v["definition"].as_str() {
            out.push(q.to_owned());
        }
    }
    out
}

#[test]
fn every_dashboard_query_uses_metrics_a_gateway_exposes() {
    let path = concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/../config/grafana/vncgate.json"
    );
    let d: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(path).unwrap()).expect("dashboard JSON");
    // Importable anywhere: the datasource is an input chosen at import.
    assert!(
        d["__inputs"]
            .as_array()
            .unwrap()
            .iter()
            .any(|i| i["name"] == "DS_PROMETHEUS" && i["pluginId"] == "prometheus")
    );
    fn datasources(v: &serde_json::Value, out: &mut Vec<String>) {
        match v {
            serde_json::Value::Object(m) => {
                if let Some(ds) = m.get("datasource") {
                    out.push(ds["uid"].as_str().unwrap_or("").to_owned());
                }
                m.values().for_each(|v| datasources(v, out));
            }
            serde_json::Value::Array(a) => a.iter().for_each(|v| datasources(v, out)),
            _ => {}
        }
    }
    let mut ds = Vec::new();
    datasources(&d, &mut ds);
    assert!(
        !ds.is_empty() && ds.iter().all(|u| u == "${DS_PROMETHEUS}"),
        "{ds:?}"
    );

    // A gateway with Redis behind it: the Redis panels' metrics exist only there.
    let redis = RedisServer::start();
    let url = redis.url();
    let gw = Gw::start(
        "auto",
        &["--redis", &url, "--allow-upstream", "127.0.0.0/8"],
    );
    assert!(
        eventually(Duration::from_secs(10), || scrape(&gw)
            .1
            .value("vncgate_redis_up", &[])
            == Some(1.0)),
        "redis_up never 1"
    );
    let (body, e) = scrape(&gw);
    assert_described(&e);
    promtool_check(&body);

    let exprs = dashboard_exprs(&d);
    assert!(exprs.len() >= 25, "{} queries", exprs.len());
    let mut used = BTreeSet::new();
    for q in &exprs {
        let names = metric_names(q);
        assert!(!names.is_empty(), "a query with no gateway metric: {q}");
        for n in names {
            assert!(
                e.exposes(&n),
                "the dashboard queries {n}, which no gateway exposes: {q}"
            );
            used.insert(e.family(&n).to_owned());
        }
    }
    // The extraction sees what it must, and an unknown name is caught.
    assert!(
        used.contains("vncgate_upstream_connect_seconds"),
        "{used:?}"
    );
    assert!(used.contains("process_resident_memory_bytes"), "{used:?}");
    assert!(!e.exposes("vncgate_sessions_closed"));
    assert!(!e.exposes("vncgate_upstream_connect_seconds_total"));
    assert_eq!(
        metric_names("sum(rate(vncgate:x[5m])) / vncgate_a_total{instance=~\"$instance\"}"),
        ["vncgate_a_total"]
    );
    // The panels the operator needs, by what they show.
    for family in [
        "vncgate_sessions_active",
        "vncgate_sessions_opened_total",
        "vncgate_sessions_closed_total",
        "vncgate_handshake_rejected_total",
        "vncgate_relayed_bytes_total",
        "vncgate_route_cache_total",
        "vncgate_redis_up",
        "vncgate_redis_errors_total",
        "vncgate_draining",
        "process_open_fds",
    ] {
        assert!(used.contains(family), "no panel shows {family}");
    }
}

#[test]
fn the_readme_names_every_refusal_reason() {
    let readme =
        std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/../README.md")).unwrap();
    let section = readme
        .split("### Statuses before the upgrade")
        .nth(1)
        .expect("the statuses section")
        .split("\n#")
        .next()
        .unwrap();
    let mut in_readme = BTreeMap::new();
    for row in section
        .lines()
        .filter(|l| l.starts_with("| ") && !l.starts_with("| status"))
    {
        let cells: Vec<&str> = row.split('|').map(str::trim).collect();
        let (status, blame, reasons) = (cells[1], cells[2], cells[3]);
        for name in reasons.split(',').map(|r| r.trim().trim_matches('`')) {
            in_readme.insert(name.to_owned(), (status.to_owned(), blame.to_owned()));
        }
    }
    let in_code: BTreeMap<String, (String, String)> = vncgate::admission::refusals()
        .iter()
        .map(|r| {
            (
                r.name.to_owned(),
                (r.status.to_string(), r.blame.as_str().to_owned()),
            )
        })
        .collect();
    assert_eq!(in_readme, in_code);
}
