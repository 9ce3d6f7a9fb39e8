//! Startup, as the binary runs it: raise the descriptor limit, install the metrics recorder,
//! wire the route source (the static routes, or Redis through the control-plane thread),
//! start the workers, print the machine-readable lines, turn SIGTERM and SIGINT into a drain,
//! and wait for the workers.

use signal_hook::consts::{SIGINT, SIGTERM};

use crate::config::Settings;

/// Runs a gateway on `settings` until it has drained.
pub fn run(settings: Settings) -> Result<(), String> {
    // A gateway holds two descriptors per idle session, four while it sends (each socket,
    // and its second handle for send ops): the soft limit goes up to the hard one.
    match rlimit::increase_nofile_limit(u64::MAX) {
        Ok(n) => tracing::debug!(nofile = n, "descriptor limit raised"),
        Err(e) => tracing::warn!(error = %e, "cannot raise the descriptor limit"),
    }
    let prom = crate::metrics::install()?;
    let prefix = settings.handshake.path_prefix.clone();
    let running = match settings.redis.clone() {
        None => crate::server::start(settings, Some(prom))?,
        Some(redis) => {
            let viewers = std::sync::Arc::new(crate::server::viewers::Viewers::default());
            let fixed = settings.routes.clone();
            tracing::info!(redis = %redis.url, cache_ttl = ?redis.cache_ttl, "routes from redis");
            let wait = (redis.timeout * 4).max(std::time::Duration::from_secs(2));
            let control =
                crate::routing::spawn(redis, settings.workers, viewers.clone(), fixed.clone())?;
            if !control.wait_connected(wait) {
                let h = control.health();
                tracing::warn!(error = %h.why(), up = h.is_up(), "starting before redis answered and the route events subscription started: uncached lookups fail with 503 until then");
            }
            let hooks = crate::server::Hooks {
                viewers,
                route_health: Some(control.health()),
            };
            crate::server::start_with(settings, Some(prom), hooks, move |i| {
                crate::routing::RedisRoutes::new(i, control.clone(), fixed.clone())
            })?
        }
    };
    // Machine-readable lines on stdout, so scripts and tests can use port 0.
    println!("vncgate: listening on ws://{}{prefix}", running.local_addr);
    if let Some(a) = running.admin_addr {
        println!("vncgate: admin on http://{a}");
    }
    crate::server::notify::ready();
    let shared = running.shared();
    let mut signals = signal_hook::iterator::Signals::new([SIGTERM, SIGINT])
        .map_err(|e| format!("cannot install signal handlers: {e}"))?;
    std::thread::Builder::new()
        .name("vncgate-signals".into())
        .spawn(move || {
            let mut seen = 0;
            for sig in signals.forever() {
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
