//! Metric names (one place, so dashboards and alert rules have one source) and the
//! Prometheus recorder. Hot-path byte counts are summed per worker and flushed once a
//! second, so relaying never touches a shared cache line per chunk.

use metrics_exporter_prometheus::{PrometheusBuilder, PrometheusHandle};

/// TCP connections accepted, by worker.
pub const CONNECTIONS_ACCEPTED: &str = "vncgate_connections_accepted_total";
/// Connections accepted by one worker and handed to a less-loaded one.
pub const CONNECTIONS_HANDED_OFF: &str = "vncgate_connections_handed_off_total";
/// Connections each worker holds now (handshaking or relaying), by worker.
pub const WORKER_CONNECTIONS: &str = "vncgate_worker_connections";
/// Upgrade requests answered with an HTTP error, by `status` and `reason`.
pub const HANDSHAKE_REJECTED: &str = "vncgate_handshake_rejected_total";
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

/// Installs the global Prometheus recorder and returns the handle that renders it.
///
/// Histogram samples (connect times, lookup times) queue up inside the recorder until they
/// are folded into their buckets, which a scrape does; a gateway nobody scrapes would queue
/// them forever (about 13 bytes per session). A small thread folds them every 5 seconds.
pub fn install() -> Result<PrometheusHandle, String> {
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
