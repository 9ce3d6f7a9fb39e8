//! `vncgate-bench`: flags in, `runner::run` does the rest.
#![forbid(unsafe_code)]

use std::path::PathBuf;
use std::process::ExitCode;

use clap::Parser;
use vncgate_bench::proxy::Kind;
use vncgate_bench::runner::{self, Config};

/// Benchmark WebSocket-to-TCP relays against direct TCP on loopback; prints a markdown
/// table and writes results.md and results.json.
#[derive(Parser, Debug)]
#[command(name = "vncgate-bench", version)]
struct Args {
    /// Path of the vncgate binary.
    #[arg(long, default_value = "target/release/vncgate")]
    vncgate: PathBuf,
    /// Worker threads for vncgate (`--workers`) [default: one per core].
    #[arg(long)]
    workers: Option<usize>,
    /// Extra argument for `vncgate serve` (repeatable), e.g. `--vncgate-arg=--io-driver=epoll`.
    #[arg(long = "vncgate-arg", value_name = "ARG", allow_hyphen_values = true)]
    vncgate_args: Vec<String>,
    /// Repetitions, interleaved across proxies; the table shows medians.
    #[arg(long, default_value_t = 3)]
    reps: usize,
    /// Seconds per timed point (throughput, round trips, upgrades).
    #[arg(long, default_value_t = 3.0)]
    secs: f64,
    /// Idle sessions held for the memory figure (0 skips it).
    #[arg(long, default_value_t = 1000)]
    idle: usize,
    /// Connections for the many-connection throughput and round-trip points.
    #[arg(long, default_value_t = 50)]
    conns: usize,
    /// Concurrent connector threads for the upgrade rate.
    #[arg(long, default_value_t = 4)]
    connectors: usize,
    /// Comma-separated subset of direct,vncgate,websocat,websockify.
    #[arg(
        long,
        value_delimiter = ',',
        default_value = "direct,vncgate,websocat,websockify"
    )]
    only: Vec<String>,
    /// Output folder for results.md, results.json and the proxies' logs.
    #[arg(long, default_value = concat!(env!("CARGO_MANIFEST_DIR"), "/out"))]
    out: PathBuf,
}

fn main() -> ExitCode {
    let a = Args::parse();
    let mut only = Vec::new();
    for name in &a.only {
        match Kind::parse(name.trim()) {
            Some(k) => only.push(k),
            None => {
                eprintln!("--only: unknown proxy {name:?} (direct, vncgate, websocat, websockify)");
                return ExitCode::from(2);
            }
        }
    }
    if a.reps == 0
        || a.secs.is_nan()
        || !(0.1..=600.0).contains(&a.secs)
        || a.conns == 0
        || a.connectors == 0
    {
        eprintln!("--reps, --conns and --connectors must be at least 1, --secs within 0.1..600");
        return ExitCode::from(2);
    }
    let cfg = Config {
        vncgate: a.vncgate,
        workers: a
            .workers
            .unwrap_or_else(|| std::thread::available_parallelism().map_or(1, |n| n.get())),
        vncgate_args: a.vncgate_args,
        reps: a.reps,
        secs: a.secs,
        idle: a.idle,
        conns: a.conns,
        connectors: a.connectors,
        only,
        out: a.out,
    };
    match runner::run(&cfg) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("vncgate-bench: {e}");
            ExitCode::FAILURE
        }
    }
}
