//! `vncgate`: flags in, gateway out. The library does the work; see `lib.rs` for the map.

#![forbid(unsafe_code)]

use std::process::ExitCode;

use clap::Parser as _;
use signal_hook::consts::{SIGINT, SIGTERM};
use vncgate::config::{Cli, Command, LogFormat};

fn main() -> ExitCode {
    let cli = Cli::parse();
    let cmd = match &cli.command {
        Command::Serve(args) => {
            init_logging(args.log_format);
            &cli.command
        }
        Command::Route(r) => {
            return match vncgate::route_admin::run(r) {
                Ok(vncgate::route_admin::Outcome::Done) => ExitCode::SUCCESS,
                Ok(vncgate::route_admin::Outcome::NotFound) => ExitCode::from(1),
                Err(e) => {
                    eprintln!("vncgate: error: {e}");
                    ExitCode::from(2)
                }
            };
        }
    };
    match run(cmd) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("vncgate: error: {e}");
            ExitCode::from(2)
        }
    }
}

fn init_logging(format: LogFormat) {
    let filter = tracing_subscriber::EnvFilter::try_from_env("VNCGATE_LOG")
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    let b = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()));
    match format {
        LogFormat::Text => b.init(),
        LogFormat::Json => b.json().init(),
    }
}

fn run(cmd: &Command) -> Result<(), String> {
    let settings = match cmd {
        Command::Serve(a) => a.settings(vec![])?,
        Command::Route(_) => unreachable!("handled in main"),
    };
    // A gateway holds two descriptors per idle session, four while it sends (each socket,
    // and its second handle for send ops): the soft limit goes up to the hard one.
    match rlimit::increase_nofile_limit(u64::MAX) {
        Ok(n) => tracing::debug!(nofile = n, "descriptor limit raised"),
        Err(e) => tracing::warn!(error = %e, "cannot raise the descriptor limit"),
    }
    let prom = vncgate::metrics::install()?;
    let prefix = settings.handshake.path_prefix.clone();
    let running = match settings.redis.clone() {
        None => vncgate::server::start(settings, Some(prom))?,
        Some(redis) => {
            let viewers = std::sync::Arc::new(vncgate::server::viewers::Viewers::default());
            let fixed = settings.routes.clone();
            tracing::info!(redis = %redis.url, cache_ttl = ?redis.cache_ttl, "routes from redis");
            let wait = (redis.timeout * 4).max(std::time::Duration::from_secs(2));
            let control =
                vncgate::routing::spawn(redis, settings.workers, viewers.clone(), fixed.clone())?;
            if !control.wait_connected(wait) {
                let h = control.health();
                tracing::warn!(error = %h.why(), up = h.is_up(), "starting before redis answered and the route events subscription started: uncached lookups fail with 503 until then");
            }
            let hooks = vncgate::server::Hooks {
                viewers,
                route_health: Some(control.health()),
            };
            vncgate::server::start_with(settings, Some(prom), hooks, move |i| {
                vncgate::routing::RedisRoutes::new(i, control.clone(), fixed.clone())
            })?
        }
    };
    // Machine-readable lines on stdout, so scripts and tests can use port 0.
    println!("vncgate: listening on ws://{}{prefix}", running.local_addr);
    if let Some(a) = running.admin_addr {
        println!("vncgate: admin on http://{a}");
    }
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
