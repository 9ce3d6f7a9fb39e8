//! `vncgate-bench-routing`: WebSocket upgrades per second through vncgate with routes from
//! Redis (warm cache, and no cache) as a ratio to static routes, in one run; flags in,
//! `routing::run` does the rest.
#![forbid(unsafe_code)]

use std::path::PathBuf;
use std::process::ExitCode;

use clap::Parser;
use vncgate_bench::cli::RunArgs;
use vncgate_bench::routing::{self, Config, Routing};

/// Upgrades per second through vncgate by route source: a static routes file, Redis with a
/// warm route cache, Redis with none (`--route-cache-ttl 0`). Starts its own redis-server;
/// prints a markdown table and writes routing.md, routing.json and routing.svg.
#[derive(Parser, Debug)]
#[command(name = "vncgate-bench-routing", version, args_override_self = true)]
struct Args {
    #[command(flatten)]
    run: RunArgs,
    /// redis-server to start [default: the one on PATH, else /usr/bin/redis-server].
    #[arg(long, value_name = "PATH")]
    redis_server: Option<PathBuf>,
    /// Session ids routed; each connection asks for one at random.
    #[arg(long, default_value_t = 64)]
    ids: usize,
    /// Send one 16 B echo per session before closing (counts sessions that reached the
    /// upstream, not just handshakes).
    #[arg(long)]
    with_echo: bool,
    /// Comma-separated subset of static,redis-warm,redis-cold.
    #[arg(
        long,
        value_delimiter = ',',
        default_value = "static,redis-warm,redis-cold"
    )]
    only: Vec<String>,
}

fn main() -> ExitCode {
    let a = Args::parse();
    let mut only = Vec::new();
    for name in &a.only {
        match Routing::parse(name.trim()) {
            Some(r) => only.push(r),
            None => {
                eprintln!(
                    "--only: unknown configuration {name:?} (static, redis-warm, redis-cold)"
                );
                return ExitCode::from(2);
            }
        }
    }
    only = Routing::ALL
        .into_iter()
        .filter(|r| only.contains(r))
        .collect();
    if !a.run.in_range() || !(1..=10_000).contains(&a.ids) || only.is_empty() {
        eprintln!(
            "--reps and --connectors must be at least 1, --secs within 0.1..600, --ids within 1..10000, --only not empty"
        );
        return ExitCode::from(2);
    }
    let workers = a.run.workers();
    let cfg = Config {
        vncgate: a.run.vncgate,
        redis_server: a.redis_server,
        workers,
        vncgate_args: a.run.vncgate_args,
        reps: a.run.reps,
        secs: a.run.secs,
        ids: a.ids,
        connectors: a.run.connectors,
        with_echo: a.with_echo,
        only,
        out: a.run.out,
    };
    match routing::run(&cfg) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("vncgate-bench-routing: {e}");
            ExitCode::FAILURE
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn defaults_and_overrides() {
        let a = Args::try_parse_from(["x"]).unwrap();
        assert_eq!(
            (a.run.reps, a.run.secs, a.ids, a.run.connectors),
            (3, 3.0, 64, 4)
        );
        assert_eq!(a.only, ["static", "redis-warm", "redis-cold"]);
        let a =
            Args::try_parse_from(["x", "--reps", "1", "--only", "static", "--reps", "2"]).unwrap();
        assert_eq!(a.run.reps, 2);
        assert_eq!(a.only, ["static"]);
    }
}
