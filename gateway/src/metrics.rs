//! Metric names (one place, so dashboards and alert rules have one source) and the
//! Prometheus recorder. Hot-path byte counts are summed per worker and flushed once a
//! second, so relaying never touches a shared cache line per chunk.
//!
//! Every metric has a HELP line ([`DESCRIPTIONS`]), and every counter and histogram exists
//! from the start ([`zero_series`]), labelled series included where the label set is fixed:
//! the sets come from where the labels are defined (the close table, the refusals, the
//! Redis ops), so that `rate()` and `absent()` see a series before its first event. Process
//! metrics (`process_*`: memory, descriptors, CPU) are collected on each scrape.

use std::sync::LazyLock;

use metrics::{Label, Unit};
use metrics_exporter_prometheus::{PrometheusBuilder, PrometheusHandle};

use crate::admission;
use crate::close;

/// TCP connections accepted, by worker.
pub const CONNECTIONS_ACCEPTED: &str = "vncgate_connections_accepted_total";
/// Connections accepted by one worker and handed to a less-loaded one.
pub const CONNECTIONS_HANDED_OFF: &str = "vncgate_connections_handed_off_total";
/// Connections each worker holds now (handshaking or relaying), by worker.
pub const WORKER_CONNECTIONS: &str = "vncgate_worker_connections";
/// Upgrade requests answered with an HTTP error, by `status` and `reason`.
pub const HANDSHAKE_REJECTED: &str = "vncgate_handshake_rejected_total";
/// Plain GETs and HEADs answered from `--web DIR` (200 or a directory's 301); refusals
/// are in [`HANDSHAKE_REJECTED`] under their `web_*` reasons.
pub const WEB_RESPONSES: &str = "vncgate_web_responses_total";
/// Upgrades completed (101 sent).
pub const SESSIONS_OPENED: &str = "vncgate_sessions_opened_total";
/// Sessions currently relaying or connecting upstream.
pub const SESSIONS_ACTIVE: &str = "vncgate_sessions_active";
/// Sessions ended, by close `code`, `cause` (the close table's name) and `blame`.
pub const SESSIONS_CLOSED: &str = "vncgate_sessions_closed_total";
/// Payload bytes relayed, by `direction` (`vm_to_browser`, `browser_to_vm`).
pub const RELAYED_BYTES: &str = "vncgate_relayed_bytes_total";
/// Time to establish the upstream connection, retries included.
pub const UPSTREAM_CONNECT_SECONDS: &str = "vncgate_upstream_connect_seconds";
/// Upstream dial attempts that failed and were retried inside the boot window.
pub const UPSTREAM_RETRIES: &str = "vncgate_upstream_connect_retries_total";
/// 1 for the I/O driver each worker runs (`driver` = `io_uring` or `epoll`).
pub const IO_DRIVER: &str = "vncgate_io_driver";
/// Pipes currently lent to sessions with data in flight, plus idle pooled pipes.
pub const PIPES_LENT: &str = "vncgate_pipes_lent";
pub const PIPES_POOLED: &str = "vncgate_pipes_pooled";
/// Pipes that got less than the asked capacity (the per-user pipe quota refused).
pub const PIPE_SIZE_FALLBACK: &str = "vncgate_pipe_size_fallback_total";
/// Connections on a `--proxy-protocol` listener by what their PROXY header did, by
/// `result`: `proxied` (the header named the client), `local` (v2 LOCAL or v1 UNKNOWN: the
/// connection's own address stands), and the refusals `untrusted` (the peer is not a
/// `--trusted-proxy`), `missing`, `invalid`, `too_long`, `timeout`, `client_gone`.
pub const PROXY_HEADERS: &str = "vncgate_proxy_headers_total";
/// Restart handovers, by `side` (`gave`: this gateway's sockets went to a successor;
/// `took`: this gateway started on a predecessor's) and `result` (`ok`, `refused`,
/// `abandoned`).
pub const HANDOVERS: &str = "vncgate_handovers_total";
/// The `result` values of [`PROXY_HEADERS`].
pub const PROXY_RESULTS: [&str; 8] = [
    "proxied",
    "local",
    "untrusted",
    "missing",
    "invalid",
    "too_long",
    "timeout",
    "client_gone",
];
/// The (`side`, `result`) pairs of [`HANDOVERS`].
pub const HANDOVER_LABELS: [(&str, &str); 5] = [
    ("took", "ok"),
    ("took", "refused"),
    ("gave", "ok"),
    ("gave", "refused"),
    ("gave", "abandoned"),
];
/// 1 while draining after SIGTERM.
pub const DRAINING: &str = "vncgate_draining";
/// 1 while the Redis route source answers (`--redis`), else 0.
pub const REDIS_UP: &str = "vncgate_redis_up";
/// Redis failures, by `op` (`connect`, `ping`, `lookup`, `lookup_timeout`, `subscribe`,
/// `subscription_lost`, `recheck`).
pub const REDIS_ERRORS: &str = "vncgate_redis_errors_total";
/// Route lookups by the per-worker cache, by `result`: `hit`, `negative_hit`, `miss`
/// (asked Redis), `stale` (Redis down or failing; a cached route served past its TTL),
/// `unavailable` (nothing cached and Redis down: 503).
pub const ROUTE_CACHE: &str = "vncgate_route_cache_total";
/// Time of one Redis route lookup on the control thread.
pub const ROUTE_LOOKUP_SECONDS: &str = "vncgate_route_lookup_seconds";
/// Route records in Redis that could not be used, by `error`.
pub const ROUTE_RECORDS_INVALID: &str = "vncgate_route_records_invalid_total";
/// Route events received, by `op`: `put`, `del`, `invalid`, `resubscribe`, `recheck_gone`.
pub const ROUTE_EVENTS: &str = "vncgate_route_events_total";
/// View-only viewers admitted (the route's view token).
pub const VIEW_ONLY_SESSIONS: &str = "vncgate_view_only_sessions_total";
/// Messages of view-only viewers dropped before the VM, by `kind` (the RFB message kinds
/// that act: [`VIEW_ONLY_DROPPED_KINDS`]).
pub const VIEW_ONLY_DROPPED: &str = "vncgate_view_only_dropped_total";

/// The `kind` labels of [`VIEW_ONLY_DROPPED`]: every client message kind that acts.
pub fn view_only_dropped_kinds() -> impl Iterator<Item = &'static str> {
    vncgate_rfb::client_msg::MsgKind::ALL
        .into_iter()
        .filter(|k| k.acts())
        .map(|k| k.name())
}

/// 1, labelled with the gateway's `version` and `commit` (`unknown` when built outside git).
pub const BUILD_INFO: &str = "vncgate_build_info";

/// The `direction` labels of [`RELAYED_BYTES`].
pub const DIRECTIONS: [&str; 2] = ["vm_to_browser", "browser_to_vm"];

/// The commit the binary was built from (`build.rs`).
pub const COMMIT: &str = env!("VNCGATE_COMMIT");

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    Counter,
    Gauge,
    Histogram,
}

/// Every metric the gateway exposes: its kind, unit and HELP text.
pub const DESCRIPTIONS: &[(&str, Kind, Option<Unit>, &str)] = &[
    (
        PROXY_HEADERS,
        Kind::Counter,
        None,
        "Connections on a --proxy-protocol listener by what their PROXY header did: proxied, local, or the refusal.",
    ),
    (
        HANDOVERS,
        Kind::Counter,
        None,
        "Restart handovers of the listening sockets, by side (gave, took) and result.",
    ),
    (
        CONFIG_RELOADS,
        Kind::Counter,
        None,
        "Configuration reloads (SIGHUP, certificate files changing), by result; a failed one keeps the old settings.",
    ),
    (
        TLS_HANDSHAKES,
        Kind::Counter,
        None,
        "TLS handshakes on the public listener (--tls-cert), by result.",
    ),
    (
        RECORDINGS,
        Kind::Counter,
        None,
        "Session recordings (--record) by how they ended: complete, session_cap, dir_cap, disk_full, write_error, lagged. The session goes on in every case.",
    ),
    (
        RECORDED_BYTES,
        Kind::Counter,
        Some(Unit::Bytes),
        "Bytes written to session recording files.",
    ),
    (
        CONNECTIONS_ACCEPTED,
        Kind::Counter,
        None,
        "TCP connections accepted, by worker.",
    ),
    (
        CONNECTIONS_HANDED_OFF,
        Kind::Counter,
        None,
        "Connections accepted by one worker and handed to a less-loaded one.",
    ),
    (
        WORKER_CONNECTIONS,
        Kind::Gauge,
        None,
        "Connections each worker holds now (handshaking or relaying).",
    ),
    (
        HANDSHAKE_REJECTED,
        Kind::Counter,
        None,
        "Upgrade requests refused before the 101, by HTTP status, reason and blame (status none: the client left).",
    ),
    (
        SESSIONS_OPENED,
        Kind::Counter,
        None,
        "Upgrades completed (101 sent).",
    ),
    (
        WEB_RESPONSES,
        Kind::Counter,
        None,
        "Plain GET and HEAD requests answered from --web DIR (a file, or a directory's redirect); refusals count in vncgate_handshake_rejected_total.",
    ),
    (
        SESSIONS_ACTIVE,
        Kind::Gauge,
        None,
        "Sessions currently relaying or connecting upstream.",
    ),
    (
        SESSIONS_CLOSED,
        Kind::Counter,
        None,
        "Sessions ended, by close code, cause and blame (browser, vm, gateway, policy).",
    ),
    (
        RELAYED_BYTES,
        Kind::Counter,
        Some(Unit::Bytes),
        "Payload bytes relayed, by direction.",
    ),
    (
        UPSTREAM_CONNECT_SECONDS,
        Kind::Histogram,
        Some(Unit::Seconds),
        "Time to establish the upstream (VM) connection, retries included.",
    ),
    (
        UPSTREAM_RETRIES,
        Kind::Counter,
        None,
        "Upstream dial attempts that failed and were retried inside the retry window, by cause.",
    ),
    (
        IO_DRIVER,
        Kind::Gauge,
        None,
        "1 for the I/O driver each worker runs (io_uring or epoll).",
    ),
    (
        PIPES_LENT,
        Kind::Gauge,
        None,
        "Splice pipes lent to sessions with data in flight, by worker.",
    ),
    (
        PIPES_POOLED,
        Kind::Gauge,
        None,
        "Idle splice pipes pooled, by worker.",
    ),
    (
        PIPE_SIZE_FALLBACK,
        Kind::Counter,
        None,
        "Pipes that got less than the asked capacity (the per-user pipe quota refused).",
    ),
    (
        DRAINING,
        Kind::Gauge,
        None,
        "1 while draining after SIGTERM, else 0.",
    ),
    (
        REDIS_UP,
        Kind::Gauge,
        None,
        "1 while the Redis route source answers, else 0 (only with --redis).",
    ),
    (
        REDIS_ERRORS,
        Kind::Counter,
        None,
        "Redis failures, by operation.",
    ),
    (
        ROUTE_CACHE,
        Kind::Counter,
        None,
        "Route lookups by the per-worker cache, by result (hit, negative_hit, miss, stale, unavailable).",
    ),
    (
        ROUTE_LOOKUP_SECONDS,
        Kind::Histogram,
        Some(Unit::Seconds),
        "Time of one Redis route lookup on the control thread.",
    ),
    (
        ROUTE_RECORDS_INVALID,
        Kind::Counter,
        None,
        "Route records in Redis that could not be used, by error.",
    ),
    (
        ROUTE_EVENTS,
        Kind::Counter,
        None,
        "Route events received, by operation.",
    ),
    (
        VIEW_ONLY_SESSIONS,
        Kind::Counter,
        None,
        "View-only viewers admitted (the route's view token).",
    ),
    (
        VIEW_ONLY_DROPPED,
        Kind::Counter,
        None,
        "Messages of view-only viewers dropped before the VM (input, clipboard, desktop size, power), by RFB message kind.",
    ),
    (
        BUILD_INFO,
        Kind::Gauge,
        None,
        "1, labelled with the gateway's version and the commit it was built from.",
    ),
];

/// The process metrics (`process_resident_memory_bytes`, `process_open_fds`,
/// `process_cpu_seconds_total`...), read from /proc on each scrape.
static PROCESS: LazyLock<metrics_process::Collector> =
    LazyLock::new(metrics_process::Collector::default);

/// Gives every metric its HELP line (and the process metrics theirs).
pub fn describe() {
    for &(name, kind, unit, help) in DESCRIPTIONS {
        match (kind, unit) {
            (Kind::Counter, Some(u)) => metrics::describe_counter!(name, u, help),
            (Kind::Counter, None) => metrics::describe_counter!(name, help),
            (Kind::Gauge, Some(u)) => metrics::describe_gauge!(name, u, help),
            (Kind::Gauge, None) => metrics::describe_gauge!(name, help),
            (Kind::Histogram, Some(u)) => metrics::describe_histogram!(name, u, help),
            (Kind::Histogram, None) => metrics::describe_histogram!(name, help),
        }
    }
    PROCESS.describe();
}

/// One series registered at zero at startup.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Series {
    pub name: &'static str,
    pub labels: Vec<(&'static str, String)>,
}

fn series(name: &'static str, labels: &[(&'static str, &str)]) -> Series {
    Series {
        name,
        labels: labels.iter().map(|(k, v)| (*k, v.to_string())).collect(),
    }
}

/// Every counter and histogram series that exists before its first event, for a gateway of
/// `workers` workers, plus the gauges that have a meaningful zero.
pub fn zero_series(workers: usize) -> Vec<Series> {
    let mut all = vec![
        series(CONNECTIONS_HANDED_OFF, &[]),
        series(SESSIONS_OPENED, &[]),
        series(WEB_RESPONSES, &[]),
        series(SESSIONS_ACTIVE, &[]),
        series(UPSTREAM_CONNECT_SECONDS, &[]),
        series(PIPE_SIZE_FALLBACK, &[]),
        series(DRAINING, &[]),
        series(ROUTE_LOOKUP_SECONDS, &[]),
        series(VIEW_ONLY_SESSIONS, &[]),
    ];
    for kind in view_only_dropped_kinds() {
        all.push(series(VIEW_ONLY_DROPPED, &[("kind", kind)]));
    }
    for w in 0..workers {
        let w = w.to_string();
        for name in [
            CONNECTIONS_ACCEPTED,
            WORKER_CONNECTIONS,
            PIPES_LENT,
            PIPES_POOLED,
        ] {
            all.push(series(name, &[("worker", &w)]));
        }
    }
    for r in admission::refusals() {
        let status = r.status.to_string();
        all.push(series(
            HANDSHAKE_REJECTED,
            &[
                ("status", &status),
                ("reason", r.name),
                ("blame", r.blame.as_str()),
            ],
        ));
    }
    all.push(series(
        HANDSHAKE_REJECTED,
        &[
            ("status", "none"),
            ("reason", admission::CLIENT_GONE),
            ("blame", close::Blame::Browser.as_str()),
        ],
    ));
    for (code, cause, blame) in close::metric_labels() {
        all.push(series(
            SESSIONS_CLOSED,
            &[("code", &code), ("cause", cause), ("blame", blame.as_str())],
        ));
    }
    for d in DIRECTIONS {
        all.push(series(RELAYED_BYTES, &[("direction", d)]));
    }
    for c in close::CONNECT_FAILURES {
        all.push(series(UPSTREAM_RETRIES, &[("cause", c.name)]));
    }
    for r in crate::routing::CACHE_RESULTS {
        all.push(series(ROUTE_CACHE, &[("result", r)]));
    }
    for op in crate::routing::REDIS_ERROR_OPS {
        all.push(series(REDIS_ERRORS, &[("op", op)]));
    }
    for op in crate::routing::ROUTE_EVENT_OPS {
        all.push(series(ROUTE_EVENTS, &[("op", op)]));
    }
    for r in PROXY_RESULTS {
        all.push(series(PROXY_HEADERS, &[("result", r)]));
    }
    for (side, result) in HANDOVER_LABELS {
        all.push(series(HANDOVERS, &[("side", side), ("result", result)]));
    }
    for r in RELOAD_RESULTS {
        all.push(series(CONFIG_RELOADS, &[("result", r)]));
    }
    for r in crate::server::client::HANDSHAKE_RESULTS {
        all.push(series(TLS_HANDSHAKES, &[("result", r)]));
    }
    for r in crate::recording::EndReason::ALL {
        all.push(series(RECORDINGS, &[("result", r.as_str())]));
    }
    all.push(series(RECORDED_BYTES, &[]));
    use vncgate_schema::RecordError;
    for e in [
        RecordError::Missing(""),
        RecordError::Invalid {
            field: "",
            why: String::new(),
        },
        RecordError::NewerVersion(0),
    ] {
        all.push(series(ROUTE_RECORDS_INVALID, &[("error", e.label())]));
    }
    all
}

fn kind_of(name: &str) -> Option<Kind> {
    DESCRIPTIONS
        .iter()
        .find(|(n, ..)| *n == name)
        .map(|&(_, kind, ..)| kind)
}

/// Registers [`zero_series`] and sets the build info.
fn register(workers: usize) {
    for s in zero_series(workers) {
        let labels: Vec<Label> = s
            .labels
            .into_iter()
            .map(|(k, v)| Label::new(k, v))
            .collect();
        match kind_of(s.name) {
            Some(Kind::Counter) => metrics::counter!(s.name, labels).increment(0),
            Some(Kind::Gauge) => metrics::gauge!(s.name, labels).increment(0.0),
            Some(Kind::Histogram) => drop(metrics::histogram!(s.name, labels)),
            None => unreachable!("{} has no description", s.name),
        }
    }
    metrics::gauge!(BUILD_INFO, "version" => env!("CARGO_PKG_VERSION"), "commit" => COMMIT)
        .set(1.0);
}

/// Renders the exposition for a scrape, with the process metrics read now.
pub fn render(handle: &PrometheusHandle) -> String {
    PROCESS.collect();
    handle.render()
}

/// Reloads (SIGHUP, or certificate files changing), by `result` (`ok`, `failed`: the old
/// settings stay).
pub const CONFIG_RELOADS: &str = "vncgate_config_reload_total";
/// The `result` values of [`CONFIG_RELOADS`].
pub const RELOAD_RESULTS: [&str; 2] = ["ok", "failed"];
/// TLS handshakes on the public listener (`--tls-cert`), by `result`: `ok`, `timeout`,
/// `client_gone`, `not_tls` (plain HTTP to the TLS port: answered 400), `incompatible` (no
/// shared version, cipher suite or ALPN protocol), `client_rejected_certificate` (the
/// client's alert says it does not trust ours), `protocol_error`.
pub const TLS_HANDSHAKES: &str = "vncgate_tls_handshakes_total";

/// Session recordings (`--record DIR`) by how they ended, `result`: `complete`,
/// `session_cap`, `dir_cap`, `disk_full`, `write_error`, `lagged` (see
/// `recording::EndReason`); a session that could not be recorded at all counts too.
pub const RECORDINGS: &str = "vncgate_recordings_total";
/// Bytes written to recording files (headers and records).
pub const RECORDED_BYTES: &str = "vncgate_recorded_bytes_total";

/// Installs the global Prometheus recorder and returns the handle that renders it.
///
/// Histogram samples (connect times, lookup times) queue up inside the recorder until they
/// are folded into their buckets, which a scrape does; a gateway nobody scrapes would queue
/// them forever (about 13 bytes per session). A small thread folds them every 5 seconds.
///
/// `workers` is the number of worker threads, whose per-worker series are registered at zero.
pub fn install(workers: usize) -> Result<PrometheusHandle, String> {
    let handle = PrometheusBuilder::new()
        .set_buckets_for_metric(
            metrics_exporter_prometheus::Matcher::Full(UPSTREAM_CONNECT_SECONDS.into()),
            &[0.0005, 0.001, 0.005, 0.01, 0.05, 0.1, 0.5, 1.0, 5.0, 30.0],
        )
        .map_err(|e| e.to_string())?
        .set_buckets_for_metric(
            metrics_exporter_prometheus::Matcher::Full(ROUTE_LOOKUP_SECONDS.into()),
            &[
                0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.05, 0.25, 1.0,
            ],
        )
        .map_err(|e| e.to_string())?
        .install_recorder()
        .map_err(|e| format!("cannot install metrics recorder: {e}"))?;
    describe();
    register(workers);
    let upkeep = handle.clone();
    std::thread::Builder::new()
        .name("vncgate-metrics".into())
        .spawn(move || {
            loop {
                std::thread::sleep(std::time::Duration::from_secs(5));
                upkeep.run_upkeep();
            }
        })
        .map_err(|e| format!("cannot start the metrics upkeep thread: {e}"))?;
    Ok(handle)
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;
    use std::path::Path;

    use super::*;

    /// The label values that are not string literals at a metrics call, each reviewed as
    /// coming from a fixed set: (metric, label, expression) and where the set is.
    const DERIVED: &[(&str, &str, &str, &str)] = &[
        (CONFIG_RELOADS, "result", "result", "RELOAD_RESULTS"),
        (
            RECORDINGS,
            "result",
            "reason.as_str()",
            "recording::EndReason::ALL",
        ),
        (PROXY_HEADERS, "result", "result", "PROXY_RESULTS"),
        (
            TLS_HANDSHAKES,
            "result",
            "result",
            "client::HANDSHAKE_RESULTS",
        ),
        (
            HANDSHAKE_REJECTED,
            "status",
            "r.status.to_string()",
            "admission::refusals",
        ),
        (
            HANDSHAKE_REJECTED,
            "reason",
            "r.name",
            "admission::refusals",
        ),
        (
            HANDSHAKE_REJECTED,
            "reason",
            "admission::CLIENT_GONE",
            "admission",
        ),
        (
            HANDSHAKE_REJECTED,
            "blame",
            "r.blame.as_str()",
            "admission::refusals",
        ),
        (
            HANDSHAKE_REJECTED,
            "blame",
            "Blame::Browser.as_str()",
            "close::Blame",
        ),
        (
            SESSIONS_CLOSED,
            "code",
            "code_label",
            "close::metric_labels",
        ),
        (SESSIONS_CLOSED, "cause", "cause", "close::metric_labels"),
        (
            SESSIONS_CLOSED,
            "blame",
            "blame.as_str()",
            "close::metric_labels",
        ),
        (
            UPSTREAM_RETRIES,
            "cause",
            "cause.name",
            "close::CONNECT_FAILURES",
        ),
        (ROUTE_CACHE, "result", "result", "routing::CACHE_RESULTS"),
        (
            ROUTE_EVENTS,
            "op",
            "op",
            "put or del, in routing::ROUTE_EVENT_OPS",
        ),
        (
            ROUTE_RECORDS_INVALID,
            "error",
            "e.label()",
            "RecordError::label",
        ),
        (IO_DRIVER, "driver", "driver.as_str()", "server::Driver"),
        (
            VIEW_ONLY_DROPPED,
            "kind",
            "kind.name()",
            "view_only_dropped_kinds (MsgKind::acts)",
        ),
        (IO_DRIVER, "worker", "i.to_string()", "0..workers"),
        (
            CONNECTIONS_ACCEPTED,
            "worker",
            "w.index.to_string()",
            "0..workers",
        ),
        (
            WORKER_CONNECTIONS,
            "worker",
            "self.index.to_string()",
            "0..workers",
        ),
        (PIPES_LENT, "worker", "self.index.to_string()", "0..workers"),
        (
            PIPES_POOLED,
            "worker",
            "self.index.to_string()",
            "0..workers",
        ),
    ];

    /// The `pub const X: &str = "name"` lines of this file, by X.
    fn consts() -> BTreeMap<String, String> {
        include_str!("metrics.rs")
            .lines()
            .filter_map(|l| {
                let rest = l.strip_prefix("pub const ")?;
                let (ident, value) = rest.split_once(": &str = \"")?;
                Some((ident.to_owned(), value.strip_suffix("\";")?.to_owned()))
            })
            .collect()
    }

    /// Splits a macro's arguments at top-level commas.
    fn args(inner: &str) -> Vec<String> {
        let (mut depth, mut quoted, mut cur, mut out) = (0i32, false, String::new(), Vec::new());
        for ch in inner.chars() {
            match ch {
                '"' => quoted = !quoted,
                '(' | '[' if !quoted => depth += 1,
                ')' | ']' if !quoted => depth -= 1,
                ',' if !quoted && depth == 0 => {
                    out.push(std::mem::take(&mut cur).trim().to_owned());
                    continue;
                }
                _ => {}
            }
            cur.push(ch);
        }
        if !cur.trim().is_empty() {
            out.push(cur.trim().to_owned());
        }
        out
    }

    /// A metrics call: its file, the name expression, and (label, value expression) pairs.
    type Call = (String, String, Vec<(String, String)>);

    /// Every `metrics::counter!/gauge!/histogram!` call outside this file.
    fn calls() -> Vec<Call> {
        let mut files = Vec::new();
        let mut dirs = vec![Path::new(env!("CARGO_MANIFEST_DIR")).join("src")];
        while let Some(d) = dirs.pop() {
            for e in std::fs::read_dir(d).unwrap() {
                let p = e.unwrap().path();
                if p.is_dir() {
                    dirs.push(p);
                } else if p.extension().is_some_and(|x| x == "rs") && !p.ends_with("metrics.rs") {
                    files.push(p);
                }
            }
        }
        let mut out = Vec::new();
        for f in files {
            let src = std::fs::read_to_string(&f).unwrap();
            for mac in [
                "metrics::counter!(",
                "metrics::gauge!(",
                "metrics::histogram!(",
            ] {
                for (at, _) in src.match_indices(mac) {
                    let body = &src[at + mac.len()..];
                    let mut depth = 1;
                    let end = body
                        .char_indices()
                        .find(|&(_, c)| {
                            depth += match c {
                                '(' => 1,
                                ')' => -1,
                                _ => 0,
                            };
                            depth == 0
                        })
                        .unwrap()
                        .0;
                    let mut a = args(&body[..end]).into_iter();
                    let name = a.next().unwrap();
                    let labels = a
                        .map(|l| {
                            let (k, v) = l.split_once("=>").expect("label => value");
                            let v = v.split_whitespace().collect::<Vec<_>>().join(" ");
                            (k.trim().trim_matches('"').to_owned(), v)
                        })
                        .collect();
                    out.push((f.display().to_string(), name, labels));
                }
            }
        }
        out
    }

    #[test]
    fn every_metric_has_a_description() {
        let consts = consts();
        let described: Vec<&str> = DESCRIPTIONS.iter().map(|d| d.0).collect();
        for (ident, name) in &consts {
            if name.starts_with("vncgate_") {
                assert!(described.contains(&name.as_str()), "{ident} has no HELP");
            }
        }
        for (name, _, _, help) in DESCRIPTIONS {
            assert!(!help.is_empty() && !help.contains('\n'), "{name}");
        }
        let mut names = described.clone();
        names.sort();
        names.dedup();
        assert_eq!(names.len(), DESCRIPTIONS.len(), "a metric described twice");
    }

    #[test]
    fn every_zero_series_is_described_and_unique() {
        let all = zero_series(3);
        for s in &all {
            assert!(kind_of(s.name).is_some(), "{}", s.name);
        }
        for (i, a) in all.iter().enumerate() {
            assert!(!all[i + 1..].contains(a), "{a:?} twice");
        }
        // Every counter and histogram is there.
        for &(name, kind, ..) in DESCRIPTIONS {
            if kind != Kind::Gauge {
                assert!(all.iter().any(|s| s.name == name), "{name} not registered");
            }
        }
        let workers = |n| {
            zero_series(n)
                .iter()
                .filter(|s| s.name == CONNECTIONS_ACCEPTED)
                .count()
        };
        assert_eq!((workers(1), workers(3)), (1, 3));
    }

    /// The audit of label values: every label at a metrics call is a literal of the
    /// registered set, or an expression reviewed in [`DERIVED`]; no call is missed.
    #[test]
    fn every_label_the_code_emits_is_registered_or_reviewed() {
        let consts = consts();
        let zero = zero_series(2);
        let calls = calls();
        assert!(calls.len() > 30, "found {} calls", calls.len());
        for (file, name_expr, labels) in &calls {
            let ident = name_expr.strip_prefix("m::").unwrap_or(name_expr);
            let name = consts
                .get(ident)
                .unwrap_or_else(|| panic!("{file}: metric name {name_expr} is not in metrics.rs"));
            let series: Vec<_> = zero.iter().filter(|s| s.name == name).collect();
            for (label, value) in labels {
                if let Some(lit) = value.strip_prefix('"').and_then(|v| v.strip_suffix('"')) {
                    assert!(
                        series
                            .iter()
                            .any(|s| s.labels.iter().any(|(k, v)| k == label && v == lit)),
                        "{file}: {name}{{{label}=\"{lit}\"}} is emitted but not registered at zero"
                    );
                } else {
                    assert!(
                        DERIVED
                            .iter()
                            .any(|d| d.0 == name && d.1 == label && d.2 == value),
                        "{file}: {name}{{{label}={value}}}: a label value that is neither a literal nor reviewed in DERIVED (is it bounded?)"
                    );
                }
            }
            // A labelled series registered at zero has the same label names as the call.
            if let Some(s) = series.first() {
                let mut want: Vec<_> = s.labels.iter().map(|(k, _)| k.to_string()).collect();
                let mut got: Vec<_> = labels.iter().map(|(k, _)| k.clone()).collect();
                want.sort();
                got.sort();
                assert_eq!(got, want, "{file}: {name}'s label names");
            }
        }
    }
}
