//! `vncgate-bench-restores`: sessions restored from the golden snapshot by the `qemu`
//! backend, measured through `vncgate-controller`'s API: create-to-ready (ready: the guest's
//! VNC server through ServerInit and its agent's 200 with the identity applied) over
//! `--restores` sessions one after another (median, p95, max), then bursts of concurrent
//! restores (`--bursts`: each session's create-to-ready and the time until all are ready),
//! with the resident memory of each VM's QEMU process while the burst is up. A session that
//! does not reach ready fails its point, with its state and reason. Writes
//! bench/out/restores.md and restores.json.
#![forbid(unsafe_code)]

use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::sync::Arc;
use std::time::{Duration, Instant};

use clap::Parser;
use serde_json::json;
use vncgate_bench::controller::{Controller, quantile};

#[derive(Parser, Debug)]
#[command(name = "vncgate-bench-restores", version)]
struct Args {
    /// The controller binary.
    #[arg(long, value_name = "PATH")]
    controller: PathBuf,
    /// The golden directory (config/golden/build.sh DIR).
    #[arg(long, value_name = "DIR")]
    golden: PathBuf,
    /// Sessions restored one after another.
    #[arg(long, default_value_t = 20)]
    restores: usize,
    /// Concurrent restores, one point each (comma-separated).
    #[arg(long, value_delimiter = ',', default_value = "4,8")]
    bursts: Vec<usize>,
    /// Where to write restores.md and restores.json.
    #[arg(long, default_value = "bench/out")]
    out: PathBuf,
}

const READY_WITHIN: Duration = Duration::from_secs(180);

/// Resident memory (MiB) of each QEMU process whose command line names `work`.
fn qemu_rss_mib(work: &Path) -> Vec<f64> {
    let work = work.display().to_string();
    let mut out = Vec::new();
    for e in std::fs::read_dir("/proc").into_iter().flatten().flatten() {
        let cmd = std::fs::read(e.path().join("cmdline")).unwrap_or_default();
        let cmd = String::from_utf8_lossy(&cmd);
        if !cmd.starts_with("qemu-system") || !cmd.contains(&work) {
            continue;
        }
        let status = std::fs::read_to_string(e.path().join("status")).unwrap_or_default();
        if let Some(kb) = status
            .lines()
            .find_map(|l| l.strip_prefix("VmRSS:"))
            .and_then(|v| v.split_whitespace().next()?.parse::<f64>().ok())
        {
            out.push(kb / 1024.0);
        }
    }
    out
}

/// Waits until no VM directory is left under `work` (deleted sessions' VMs stopped).
fn settle(work: &Path) {
    let deadline = Instant::now() + Duration::from_secs(30);
    while Instant::now() < deadline {
        let left = std::fs::read_dir(work)
            .map(|d| d.flatten().filter(|e| e.path().is_dir()).count())
            .unwrap_or(0);
        if left == 0 {
            return;
        }
        std::thread::sleep(Duration::from_millis(100));
    }
}

struct Burst {
    n: usize,
    all_ready_ms: f64,
    p50_ms: f64,
    max_ms: f64,
    rss_mib: Vec<f64>,
}

fn burst(ctl: &Arc<Controller>, n: usize) -> Result<Burst, String> {
    let t0 = Instant::now();
    let ids: Vec<String> = (0..n).map(|_| ctl.create()).collect::<Result<_, _>>()?;
    let waits: Vec<_> = ids
        .iter()
        .map(|id| {
            let (ctl, id) = (ctl.clone(), id.clone());
            std::thread::spawn(move || ctl.wait_ready(&id, READY_WITHIN).map(|_| t0.elapsed()))
        })
        .collect();
    let mut lat = Vec::new();
    let mut err = None;
    for w in waits {
        match w.join().map_err(|_| "a waiter panicked".to_owned()) {
            Ok(Ok(d)) => lat.push(d),
            Ok(Err(e)) | Err(e) => err = Some(e),
        }
    }
    let rss_mib = qemu_rss_mib(&ctl.work);
    for id in &ids {
        let _ = ctl.delete(id);
    }
    settle(&ctl.work);
    if let Some(e) = err {
        return Err(e);
    }
    lat.sort_unstable();
    Ok(Burst {
        n,
        all_ready_ms: quantile(&lat, 1.0),
        p50_ms: quantile(&lat, 0.5),
        max_ms: quantile(&lat, 1.0),
        rss_mib,
    })
}

fn main() -> ExitCode {
    let a = Args::parse();
    let snap: serde_json::Value = match std::fs::read_to_string(
        a.golden.join("snapshot/snapshot.json"),
    )
    .map_err(|e| e.to_string())
    .and_then(|t| serde_json::from_str(&t).map_err(|e| e.to_string()))
    {
        Ok(v) => v,
        Err(e) => {
            eprintln!(
                "vncgate-bench-restores: {}/snapshot/snapshot.json: {e} (run config/golden/build.sh {} first)",
                a.golden.display(),
                a.golden.display()
            );
            return ExitCode::from(2);
        }
    };
    let state_mib = std::fs::metadata(a.golden.join("snapshot/state"))
        .map(|m| m.len() as f64 / 1048576.0)
        .unwrap_or(f64::NAN);
    let extra = [
        "--backend".to_owned(),
        "qemu".to_owned(),
        "--golden".to_owned(),
        a.golden.display().to_string(),
        "--boot-timeout".to_owned(),
        READY_WITHIN.as_secs().to_string(),
    ];
    let ctl = match Controller::start(&a.controller, "restores", &extra) {
        Ok(c) => Arc::new(c),
        Err(e) => {
            eprintln!("vncgate-bench-restores: {e}");
            return ExitCode::from(2);
        }
    };
    let mut failed = false;
    eprintln!(
        "vncgate-bench-restores: {} restores, one at a time",
        a.restores
    );
    let mut seq = Vec::new();
    for i in 0..a.restores {
        match ctl.one(READY_WITHIN) {
            Ok(d) => seq.push(d),
            Err(e) => {
                eprintln!("vncgate-bench-restores: restore {}: {e}", i + 1);
                failed = true;
                break;
            }
        }
        settle(&ctl.work);
    }
    let mut bursts = Vec::new();
    for &n in &a.bursts {
        eprintln!("vncgate-bench-restores: {n} restores at once");
        match burst(&ctl, n) {
            Ok(b) => bursts.push(b),
            Err(e) => {
                eprintln!("vncgate-bench-restores: burst of {n}: {e}");
                failed = true;
            }
        }
    }
    drop(ctl);
    let cpus = std::thread::available_parallelism().map_or(0, |n| n.get());
    let mut md = format!(
        "# vncgate-controller, qemu backend: restores from the golden snapshot\n\n{cpus} CPUs · {} · CPU {} · {} MiB, {} vCPU per VM · snapshot state {state_mib:.0} MiB, taken after a {:.1} s cold boot to desktop, saved in {:.1} s. Ready: the guest's Xvnc through ServerInit and the guest agent's 200 with its identity applied (clock, RNG reseed, machine id).\n\n",
        snap["accel"].as_str().unwrap_or("?"),
        snap["cpu"].as_str().unwrap_or("?"),
        snap["memory_mib"],
        snap["vcpus"],
        snap["boot_ms"].as_f64().unwrap_or(f64::NAN) / 1000.0,
        snap["save_ms"].as_f64().unwrap_or(f64::NAN) / 1000.0,
    );
    let mut sorted = seq.clone();
    sorted.sort_unstable();
    if !sorted.is_empty() {
        md.push_str(&format!(
            "| restores one at a time | create-to-ready median ms | p95 ms | min ms | max ms |\n|---:|---:|---:|---:|---:|\n| {} | {:.0} | {:.0} | {:.0} | {:.0} |\n\n",
            sorted.len(),
            quantile(&sorted, 0.5),
            quantile(&sorted, 0.95),
            quantile(&sorted, 0.0),
            quantile(&sorted, 1.0),
        ));
    }
    if !bursts.is_empty() {
        md.push_str("| restores at once | all ready after ms | per-session median ms | RSS per VM MiB (min-max) |\n|---:|---:|---:|---:|\n");
        for b in &bursts {
            let (lo, hi) = b
                .rss_mib
                .iter()
                .fold((f64::MAX, 0f64), |(l, h), &x| (l.min(x), h.max(x)));
            md.push_str(&format!(
                "| {} | {:.0} | {:.0} | {} |\n",
                b.n,
                b.all_ready_ms,
                b.p50_ms,
                if b.rss_mib.is_empty() {
                    "not read".to_owned()
                } else {
                    format!("{lo:.0}-{hi:.0} ({} VMs)", b.rss_mib.len())
                }
            ));
        }
    }
    let js = json!({
        "cpus": cpus,
        "snapshot": snap,
        "state_mib": state_mib,
        "sequential_ms": seq.iter().map(|d| d.as_secs_f64() * 1e3).collect::<Vec<_>>(),
        "bursts": bursts.iter().map(|b| json!({
            "n": b.n, "all_ready_ms": b.all_ready_ms, "p50_ms": b.p50_ms, "max_ms": b.max_ms, "rss_mib": b.rss_mib,
        })).collect::<Vec<_>>(),
    });
    print!("{md}");
    let _ = std::fs::create_dir_all(&a.out);
    let _ = std::fs::write(a.out.join("restores.md"), &md);
    let _ = std::fs::write(a.out.join("restores.json"), js.to_string());
    if failed {
        ExitCode::FAILURE
    } else {
        ExitCode::SUCCESS
    }
}
