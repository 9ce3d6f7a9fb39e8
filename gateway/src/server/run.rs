//! Startup, as the binary runs it: raise the descriptor limit, install the metrics recorder,
//! wire the route source (the static routes, or Redis through the control-plane thread),
//! start the workers, print the machine-readable lines, turn SIGTERM and SIGINT into a drain
//! and SIGHUP into a reload, and wait for the workers.

use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use signal_hook::consts::{SIGHUP, SIGINT, SIGTERM};

use crate::config::Settings;
use crate::live::{Dynamic, Live};
use crate::metrics as m;

/// Installs a log filter, or says why it cannot.
pub type SetLogFilter = Box<dyn Fn(&str) -> Result<(), String> + Send>;

/// How a SIGHUP re-reads the configuration.
pub struct Reloader {
    /// The settings again, from the same command line: the config file, the routes file
    /// and the environment are read anew.
    pub settings: Box<dyn Fn() -> Result<Settings, String> + Send>,
    /// Installs a new log filter (validated already); `None` when it cannot change (the
    /// `VNCGATE_LOG` environment variable fixed it).
    pub log_filter: Option<SetLogFilter>,
}

/// Runs a gateway on `settings` until it has drained.
pub fn run(settings: Settings, reloader: Reloader) -> Result<(), String> {
    // A gateway holds two descriptors per idle session, four while it sends (each socket,
    // and its second handle for send ops): the soft limit goes up to the hard one.
    match rlimit::increase_nofile_limit(u64::MAX) {
        Ok(n) => tracing::debug!(nofile = n, "descriptor limit raised"),
        Err(e) => tracing::warn!(error = %e, "cannot raise the descriptor limit"),
    }
    let prom = crate::metrics::install(settings.workers)?;
    // Before anything is announced: a SIGHUP's default action would end the process.
    let mut signals = signal_hook::iterator::Signals::new([SIGTERM, SIGINT, SIGHUP])
        .map_err(|e| format!("cannot install signal handlers: {e}"))?;
    // websockify's way takes any path: the line shows the root.
    let prefix = if settings.handshake.any_path {
        "/".to_owned()
    } else {
        settings.handshake.path_prefix.clone()
    };
    let live = Arc::new(Live::new(Dynamic::of(&settings)));
    let current = settings.clone();
    let running = match settings.redis.clone() {
        None => {
            if settings.routes.is_empty() {
                tracing::warn!(
                    "no routes and no --redis: every upgrade will get 404 (give --route, --routes-file or --redis)"
                );
            }
            crate::server::start_with(
                settings,
                Some(prom),
                crate::server::Hooks {
                    live: Some(live.clone()),
                    ..Default::default()
                },
                // The static routes are the workers' own (see `crate::live`).
                |_| crate::route::StaticRoutes::default(),
            )?
        }
        Some(redis) => {
            let viewers = Arc::new(crate::server::viewers::Viewers::default());
            tracing::info!(redis = %redis.url, cache_ttl = ?redis.cache_ttl, "routes from redis");
            let wait = (redis.timeout * 4).max(std::time::Duration::from_secs(2));
            let control =
                crate::routing::spawn(redis, settings.workers, viewers.clone(), live.clone())?;
            if !control.wait_connected(wait) {
                let h = control.health();
                tracing::warn!(error = %h.why(), up = h.is_up(), "starting before redis answered and the route events subscription started: uncached lookups fail with 503 until then");
            }
            let hooks = crate::server::Hooks {
                viewers,
                route_health: Some(control.health()),
                live: Some(live.clone()),
            };
            crate::server::start_with(settings, Some(prom), hooks, move |i| {
                crate::routing::RedisRoutes::new(
                    i,
                    control.clone(),
                    crate::route::StaticRoutes::default(),
                )
            })?
        }
    };
    // Machine-readable lines on stdout, so scripts and tests can use port 0.
    let scheme = if running.tls { "wss" } else { "ws" };
    println!(
        "vncgate: listening on {scheme}://{}{prefix}",
        running.local_addr
    );
    if let Some(a) = running.admin_addr {
        println!("vncgate: admin on http://{a}");
    }
    crate::server::notify::ready();
    let shared = running.shared();
    let certs = running.certs.clone();
    let token_source = current
        .token_source
        .clone()
        .map(|s| (s, current.token_stamp.clone()));
    let (exit_after, exit_when_idle) = (current.exit_after, current.exit_when_idle);
    // SIGHUP and the token file's watcher reload through the same state, one at a time.
    let state = Arc::new(Mutex::new((current, reloader)));
    if let Some((source, loaded)) = token_source {
        let (state, live) = (state.clone(), live.clone());
        std::thread::Builder::new()
            .name("vncgate-token-watch".into())
            .spawn(move || watch_tokens(&source, loaded, &state, &live))
            .map_err(|e| e.to_string())?;
    }
    if exit_after.is_some() || exit_when_idle.is_some() {
        let shared = shared.clone();
        std::thread::Builder::new()
            .name("vncgate-exit-timer".into())
            .spawn(move || exit_timer(&shared, exit_after, exit_when_idle))
            .map_err(|e| e.to_string())?;
    }
    std::thread::Builder::new()
        .name("vncgate-signals".into())
        .spawn(move || {
            let mut seen = 0;
            for sig in signals.forever() {
                if sig == SIGHUP {
                    if let Some(c) = &certs {
                        let _ = c.reload("sighup");
                    }
                    let mut st = state.lock().unwrap_or_else(|p| p.into_inner());
                    let (current, reloader) = &mut *st;
                    if let Some(new) = reload(current, reloader, &live) {
                        *current = new;
                    }
                    continue;
                }
                seen += 1;
                if seen > 1 {
                    tracing::warn!(sig, "second signal: exiting now");
                    std::process::exit(130);
                }
                tracing::info!(
                    sig,
                    "drain requested: no new sessions; open ones close after the drain timeout"
                );
                shared.drain();
            }
        })
        .map_err(|e| e.to_string())?;
    running.join();
    tracing::info!("all workers drained; exiting");
    Ok(())
}

/// How often the token file's watcher and the exit timer look.
const WATCH_INTERVAL: Duration = Duration::from_secs(1);

/// Rereads the token file (or directory) when it changes, through the SIGHUP reload: the
/// routes it makes are the static routes, so a token removed closes its sessions with
/// 4006, and a file that does not parse keeps the tokens in force (logged and counted as
/// a failed reload) until the next change. `seen` is the source as it was stamped before
/// the running settings read it; each reload stamps it again before rereading.
fn watch_tokens(
    source: &std::path::Path,
    mut seen: crate::websockify::SourceStamp,
    state: &Mutex<(Settings, Reloader)>,
    live: &Live,
) {
    loop {
        std::thread::sleep(WATCH_INTERVAL);
        let now = crate::websockify::source_stamp(source);
        if now == seen {
            continue;
        }
        seen = now;
        tracing::info!(source = %source.display(), "token file changed; rereading it");
        let mut st = state.lock().unwrap_or_else(|p| p.into_inner());
        let (current, reloader) = &mut *st;
        if let Some(new) = reload(current, reloader, live) {
            *current = new;
        }
    }
}

/// websockify's `--timeout` (stop `after` the start) and `--idle-timeout` (stop once no
/// client has been connected for `idle`): both drain as SIGTERM does, and the process exits
/// when the drain is over.
fn exit_timer(shared: &crate::server::Shared, after: Option<Duration>, idle: Option<Duration>) {
    let start = Instant::now();
    let mut idle_since = start;
    loop {
        std::thread::sleep(WATCH_INTERVAL.min(Duration::from_millis(200)));
        let now = Instant::now();
        // Connections held by any worker, handshaking or relaying.
        let conns: usize = shared
            .lanes
            .iter()
            .map(|l| l.conns.load(Ordering::Relaxed))
            .sum();
        if conns > 0 {
            idle_since = now;
        }
        let why = if after.is_some_and(|a| now - start >= a) {
            "--timeout"
        } else if idle.is_some_and(|i| now - idle_since >= i) {
            "--idle-timeout"
        } else {
            continue;
        };
        tracing::info!(option = why, "listener exit: draining");
        shared.drain();
        return;
    }
}

/// SIGHUP: reads the configuration again and applies what can change without a restart
/// (static routes, `--allow-upstream`, `--allow-origin`, the log filter; certificates are
/// reloaded by the caller). Validation failing anywhere keeps every current setting, logged
/// and counted. Settings that need a restart are named in the log and keep their values.
/// Returns the settings now in force.
fn reload(current: &Settings, reloader: &Reloader, live: &Live) -> Option<Settings> {
    let failed = |e: &str| {
        metrics::counter!(m::CONFIG_RELOADS, "result" => "failed").increment(1);
        tracing::error!(error = %e, "SIGHUP: reload failed; keeping the current settings");
    };
    let new = match (reloader.settings)() {
        Ok(s) => s,
        Err(e) => {
            failed(&e);
            return None;
        }
    };
    for setting in needs_restart(current, &new) {
        tracing::warn!(
            setting,
            "SIGHUP: this setting changed but takes effect only at a restart; keeping the running value"
        );
    }
    if new.log_level != current.log_level {
        match &reloader.log_filter {
            Some(set) => {
                if let Err(e) = set(&new.log_level) {
                    failed(&format!("--log-level: {e}"));
                    return None;
                }
            }
            None => tracing::warn!(
                "SIGHUP: log_level changed, but VNCGATE_LOG is set and fixes the filter"
            ),
        }
    }
    let (_, old) = live.current();
    let next = Dynamic::of(&new);
    let changes = old.route_changes(&next);
    let added = next
        .routes
        .iter()
        .filter(|(id, _)| old.routes.get(id).is_none())
        .count();
    live.publish(next);
    metrics::counter!(m::CONFIG_RELOADS, "result" => "ok").increment(1);
    tracing::info!(
        routes = new.routes.len(),
        added,
        removed_or_changed = changes.len(),
        allow_upstream = new.policy.nets().len(),
        allow_origins = new.handshake.allowed_origins.len(),
        log_level = %new.log_level,
        "SIGHUP: configuration reloaded"
    );
    // What did not apply stays as it runs, so the next reload compares with that.
    Some(restart_bound(current, new))
}

/// The names of the settings that differ and need a restart.
fn needs_restart(a: &Settings, b: &Settings) -> Vec<&'static str> {
    let mut out = Vec::new();
    let mut check = |name, differs: bool| {
        if differs {
            out.push(name);
        }
    };
    check("listen", a.listen != b.listen);
    check("workers", a.workers != b.workers);
    check("pin_workers", a.pin_workers != b.pin_workers);
    check("io_driver", a.io_driver != b.io_driver);
    check("admin", a.admin != b.admin);
    check("share_port", a.share_port != b.share_port);
    check("tcp_congestion", a.tcp_congestion != b.tcp_congestion);
    check("tls_cert/tls_key", a.tls != b.tls);
    check("web", a.web != b.web);
    macro_rules! limits {
        ($($f:ident),*) => {$(check(stringify!($f), a.limits.$f != b.limits.$f);)*};
    }
    limits!(
        max_sessions_per_worker,
        max_message,
        handshake_timeout,
        connect_timeout,
        connect_retry_window,
        idle_timeout,
        max_session_duration,
        keepalive_interval,
        keepalive_timeout,
        drain_timeout,
        pipe_size,
        max_viewers
    );
    // The Redis settings hold a parsed URL without a comparison of its own.
    check(
        "redis",
        format!("{:?}", a.redis) != format!("{:?}", b.redis),
    );
    out
}

/// `new` with the settings that need a restart put back to their running values.
fn restart_bound(running: &Settings, new: Settings) -> Settings {
    Settings {
        listen: running.listen,
        workers: running.workers,
        pin_workers: running.pin_workers,
        io_driver: running.io_driver,
        admin: running.admin,
        share_port: running.share_port,
        tcp_congestion: running.tcp_congestion.clone(),
        tls: running.tls.clone(),
        limits: running.limits.clone(),
        redis: running.redis.clone(),
        web: running.web.clone(),
        ..new
    }
}
