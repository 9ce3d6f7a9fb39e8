//! `vncgate-bench-sessions`: sessions created to `ready` per second through
//! `vncgate-controller` with the `process` backend, and the create-to-ready latency (p50,
//! p99), for each count of concurrent creators. Each creator loops for `--secs`: create,
//! wait for ready (the API's wait, no polling), delete. A session that does not reach ready
//! fails the point, with its state and reason: a figure is only printed for what was
//! measured. Writes bench/out/sessions.md and sessions.json.
#![forbid(unsafe_code)]

use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use clap::Parser;
use serde_json::json;
use vncgate_bench::controller::{Controller, quantile};

#[derive(Parser, Debug)]
#[command(name = "vncgate-bench-sessions", version)]
struct Args {
    /// The controller binary.
    #[arg(long, value_name = "PATH")]
    controller: PathBuf,
    /// Concurrent creators, one point each (comma-separated).
    #[arg(long, value_delimiter = ',', default_value = "1,20")]
    creators: Vec<usize>,
    /// Seconds each point runs.
    #[arg(long, default_value_t = 5.0)]
    secs: f64,
    /// Where to write sessions.md and sessions.json.
    #[arg(long, default_value = "bench/out")]
    out: PathBuf,
}

struct Point {
    creators: usize,
    ready: usize,
    rate: f64,
    p50_ms: f64,
    p99_ms: f64,
    max_ms: f64,
}

fn point(ctl: &Arc<Controller>, creators: usize, secs: f64) -> Result<Point, String> {
    let stop = Arc::new(AtomicBool::new(false));
    let end = Instant::now() + Duration::from_secs_f64(secs);
    let workers: Vec<_> = (0..creators)
        .map(|_| {
            let (ctl, stop) = (ctl.clone(), stop.clone());
            std::thread::spawn(move || -> Result<Vec<Duration>, String> {
                let mut lat = Vec::new();
                while Instant::now() < end && !stop.load(Ordering::Relaxed) {
                    match ctl.one(Duration::from_secs(60)) {
                        Ok(d) => lat.push(d),
                        Err(e) => {
                            stop.store(true, Ordering::Relaxed);
                            return Err(e);
                        }
                    }
                }
                Ok(lat)
            })
        })
        .collect();
    let started = Instant::now();
    let mut lat = Vec::new();
    for w in workers {
        lat.extend(
            w.join()
                .map_err(|_| "a creator thread panicked".to_owned())??,
        );
    }
    let elapsed = started.elapsed().as_secs_f64();
    if lat.is_empty() {
        return Err("no session reached ready".into());
    }
    lat.sort_unstable();
    let pct = |p: f64| quantile(&lat, p);
    Ok(Point {
        creators,
        ready: lat.len(),
        rate: lat.len() as f64 / elapsed,
        p50_ms: pct(0.5),
        p99_ms: pct(0.99),
        max_ms: pct(1.0),
    })
}

fn main() -> ExitCode {
    let a = Args::parse();
    let ctl = match Controller::start(&a.controller, "sessions", &[]) {
        Ok(c) => Arc::new(c),
        Err(e) => {
            eprintln!("vncgate-bench-sessions: {e}");
            return ExitCode::from(2);
        }
    };
    let mut points = Vec::new();
    let mut failed = false;
    for &n in &a.creators {
        eprintln!("vncgate-bench-sessions: {n} creators for {} s", a.secs);
        match point(&ctl, n, a.secs) {
            Ok(p) => points.push(p),
            Err(e) => {
                eprintln!("vncgate-bench-sessions: {n} creators: {e}");
                failed = true;
            }
        }
        // Let deleted VMs stop before the next point.
        std::thread::sleep(Duration::from_secs(2));
    }
    drop(ctl);
    let cpus = std::thread::available_parallelism().map_or(0, |n| n.get());
    let mut md = format!(
        "# vncgate-controller: sessions to ready\n\n{cpus} CPUs · process backend (synthetic desktop + vncgate-agent per session) · in-memory store · {} s per point. Each creator: create, wait for ready (agent healthy and VNC through ServerInit), delete.\n\n| creators | ready sessions | sessions/s | create-to-ready p50 ms | p99 ms | max ms |\n|---:|---:|---:|---:|---:|---:|\n",
        a.secs
    );
    for p in &points {
        md.push_str(&format!(
            "| {} | {} | {:.1} | {:.0} | {:.0} | {:.0} |\n",
            p.creators, p.ready, p.rate, p.p50_ms, p.p99_ms, p.max_ms
        ));
    }
    let js = json!({
        "cpus": cpus,
        "secs": a.secs,
        "points": points.iter().map(|p| json!({
            "creators": p.creators, "ready": p.ready, "sessions_per_s": p.rate,
            "p50_ms": p.p50_ms, "p99_ms": p.p99_ms, "max_ms": p.max_ms,
        })).collect::<Vec<_>>(),
    });
    print!("{md}");
    let _ = std::fs::create_dir_all(&a.out);
    let _ = std::fs::write(a.out.join("sessions.md"), &md);
    let _ = std::fs::write(a.out.join("sessions.json"), js.to_string());
    if failed {
        ExitCode::FAILURE
    } else {
        ExitCode::SUCCESS
    }
}
