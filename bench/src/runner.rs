//! The run: start the targets, find the proxies, then for each repetition start each proxy
//! in turn (direct, vncgate, vncgate-tls, websocat, websockify, direct, ...) on a fresh
//! process, take every measurement (those of `--points`), and kill it. The idle point gets a
//! fresh process of its own per session count (`--idle 1000,10000`: two more starts), so
//! that each count is "what do N idle sessions cost a new process", not what is left of the
//! previous count.
//! The table, the JSON and the charts are written at the end. Interleaving spreads the noise
//! of a shared machine over all proxies instead of charging one of them with a bad minute.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use serde_json::json;

use crate::measure;
use crate::plot;
use crate::point::{Point, UPGRADES50_CONNECTORS};
use crate::proxy::{self, Kind, Running};
use crate::report::{self, Header, ProxyResult, Run};
use crate::{conn, targets, tls};

#[derive(Debug, Clone)]
pub struct Config {
    pub vncgate: PathBuf,
    pub workers: usize,
    pub vncgate_args: Vec<String>,
    pub reps: usize,
    pub secs: f64,
    /// Idle sessions held for the memory figures, one measurement per count (empty when
    /// `Idle` is not among the points).
    pub idle: Vec<usize>,
    pub conns: usize,
    pub connectors: usize,
    pub only: Vec<Kind>,
    /// Measurement points to take, in `Point::ALL` order; `idle` is empty when `Idle` is
    /// not among them.
    pub points: Vec<Point>,
    /// Offered rate of the `upgrades50` point's paced phase, cycles per second over all
    /// its connectors; 0 skips the phase. With `paced_from`, the rate used when that
    /// proxy's own rate cannot be measured.
    pub paced_rate: f64,
    /// The proxy whose closed-loop rate sets the paced phase's rate: measured once, by a
    /// closed loop against it before the repetitions (see [`calibrate`]).
    pub paced_from: Option<Kind>,
    pub out: PathBuf,
}

/// The paced phase's rate when `--paced-rate` names a proxy whose rate cannot be measured.
pub const FALLBACK_PACED_RATE: f64 = 5000.0;

/// How the paced phase's rate was set from a proxy's closed loop: its rate (rounded down to
/// a whole cycle per second), or why it could not be measured.
#[derive(Debug, Clone)]
pub struct Calibration {
    pub kind: Kind,
    pub rate: Result<f64, String>,
}

/// Pause between measurements, so sockets of the last one are torn down (and websockify's
/// per-connection workers have exited) before the next one starts.
pub const SETTLE: Duration = Duration::from_millis(300);

pub fn run(cfg: &Config) -> Result<(), String> {
    let logs = cfg.out.join("logs");
    std::fs::create_dir_all(&logs).map_err(|e| format!("{}: {e}", logs.display()))?;
    // Logs are appended per repetition; a new run starts them afresh.
    for e in std::fs::read_dir(&logs).into_iter().flatten().flatten() {
        if e.path().extension().is_some_and(|x| x == "log") {
            let _ = std::fs::remove_file(e.path());
        }
    }
    let nofile = vncgate_loadtest::limits::raise_nofile()
        .ok_or("cannot read or raise RLIMIT_NOFILE (see the warning above)")?;
    // The client side of the idle sessions, plus slack (their upstream side is in the fake
    // VM's process).
    let max_idle = cfg.idle.iter().copied().max().unwrap_or(0);
    let need = max_idle as u64 + 256;
    if nofile < need {
        return Err(format!(
            "open-file limit {nofile} is below {need} needed for --idle {max_idle}; lower --idle or raise the hard limit"
        ));
    }
    let load_start = loadavg();
    let mut tg = targets::start().map_err(|e| format!("targets: {e}"))?;
    eprintln!("targets: bulk source {}, echo {}", tg.bulk, tg.echo);
    if let Some(b) = tg.banner {
        eprintln!("targets: banner (RFB version on accept) {b}");
    }
    // Direct always has the banner server (its upgrade cycles end there); proxies get the
    // route only where its point runs (websocat and websockify pay a process per route).
    let tg_direct = tg;
    if !cfg.points.contains(&Point::Upgrades50) {
        tg.banner = None;
    }
    let idle_wanted = cfg.points.contains(&Point::Idle)
        && !cfg.idle.is_empty()
        && cfg.only.iter().any(|&k| k != Kind::Direct);
    let fakevm = if idle_wanted {
        let vm = targets::FakeVm::start(&cfg.out).map_err(|e| format!("idle point: {e}"))?;
        eprintln!("targets: fake VM (idle sessions) {}", vm.addr);
        Some(vm)
    } else {
        None
    };
    let tg_idle = targets::Targets {
        idle: fakevm.as_ref().map(|vm| vm.addr),
        banner: None,
        ..tg
    };
    let other_points = cfg.points.iter().any(|&p| p != Point::Idle);

    // One certificate for the whole run, made before any proxy starts (so no repetition
    // pays for it): OUT/tls/cert.pem and key.pem.
    let tls_cert = cfg.only.contains(&Kind::VncgateTls).then(|| {
        let dir = cfg.out.join("tls");
        let cert = tls::generate(&dir).map(Arc::new);
        if let Ok(c) = &cert {
            eprintln!(
                "tls: certificate {} and key {}",
                c.cert_pem.display(),
                c.key_pem.display()
            );
        }
        cert
    });
    let settings = proxy::Settings {
        vncgate: cfg.vncgate.clone(),
        workers: cfg.workers,
        vncgate_args: cfg.vncgate_args.clone(),
        out: cfg.out.clone(),
        tls: tls_cert,
    };
    // What vncgate-tls negotiated, from a probe connection to each fresh process.
    let mut tls_seen: Option<String> = None;
    let mut results: Vec<ProxyResult> = Vec::new();
    let mut exes = Vec::new();
    for &kind in &Kind::ALL {
        if !cfg.only.contains(&kind) {
            continue;
        }
        let mut r = ProxyResult {
            kind,
            skipped: None,
            runs: Vec::new(),
            errors: Vec::new(),
        };
        match proxy::locate(kind, &settings) {
            Ok(exe) => exes.push(exe),
            Err(why) => {
                eprintln!("skip {}: {why}", kind.name());
                r.skipped = Some(why);
                exes.push(None);
            }
        }
        results.push(r);
    }

    let mut seed = conn::random_seed();
    let calibration = cfg
        .paced_from
        .filter(|_| cfg.points.contains(&Point::Upgrades50) && cfg.paced_rate > 0.0)
        .map(|kind| {
            let located = results
                .iter()
                .zip(&exes)
                .find(|(r, _)| r.kind == kind)
                .map(|(r, exe)| match &r.skipped {
                    Some(why) => Err(format!("{} skipped: {why}", kind.name())),
                    None => Ok(exe.as_deref()),
                })
                .unwrap_or_else(|| Err(format!("{} is not in --only", kind.name())));
            let rate = located.and_then(|exe| calibrate(kind, exe, &settings, tg, cfg.secs, seed));
            match &rate {
                Ok(r) => eprintln!("paced rate: {r}/s, {}'s closed-loop rate", kind.name()),
                Err(e) => eprintln!(
                    "paced rate: {FALLBACK_PACED_RATE}/s, as {}'s closed-loop rate is not known: {e}",
                    kind.name()
                ),
            }
            std::thread::sleep(SETTLE);
            Calibration { kind, rate }
        });
    let mut cfg = cfg.clone();
    if let Some(Calibration { rate: Ok(r), .. }) = &calibration {
        cfg.paced_rate = *r;
    }
    let cfg = &cfg;
    for rep in 1..=cfg.reps {
        for (r, exe) in results.iter_mut().zip(&exes) {
            if r.skipped.is_some() {
                continue;
            }
            seed = seed.wrapping_add(0x1_0000_0001);
            let mut run = Run::new();
            let mut errors = Vec::new();
            let did_not_start = |e: String, errors: &mut Vec<String>, name: &str| {
                let e = format!("{e} (its output: {}/logs/)", cfg.out.display());
                eprintln!("  {name} did not start: {e}");
                errors.push(format!("did not start: {e}"));
            };
            if idle_wanted && r.kind != Kind::Direct {
                for &n in &cfg.idle {
                    eprintln!("rep {rep}/{} {} idle {n}", cfg.reps, r.kind.name());
                    match proxy::start(r.kind, exe.as_deref(), &settings, tg_idle, rep) {
                        Ok(running) => measure_idle(running, n, nofile, &mut run, &mut errors),
                        Err(e) => did_not_start(e, &mut errors, r.kind.name()),
                    }
                    std::thread::sleep(SETTLE);
                }
            }
            if other_points {
                eprintln!("rep {rep}/{} {}", cfg.reps, r.kind.name());
                let tg = if r.kind == Kind::Direct {
                    tg_direct
                } else {
                    tg
                };
                match proxy::start(r.kind, exe.as_deref(), &settings, tg, rep) {
                    Ok(running) => {
                        if let Some(info) = probe_tls(&running, seed) {
                            match &tls_seen {
                                Some(seen) if *seen != info => {
                                    errors.push(format!("negotiated {info}, before: {seen}"));
                                }
                                Some(_) => {}
                                None => {
                                    eprintln!("  tls: {info}");
                                    tls_seen = Some(info);
                                }
                            }
                        }
                        let (more, errs) = measure_one(cfg, running, seed);
                        run.extend(more);
                        errors.extend(errs);
                    }
                    Err(e) => did_not_start(e, &mut errors, r.kind.name()),
                }
                std::thread::sleep(SETTLE);
            }
            r.runs.push(run);
            r.errors
                .extend(errors.into_iter().map(|e| format!("rep {rep}: {e}")));
        }
    }
    drop(fakevm);

    let mut metrics = report::metrics(cfg.conns, cfg.connectors, &cfg.idle, paced_rate(cfg));
    metrics.retain(|m| cfg.points.contains(&m.point));
    let header = header(
        cfg,
        (load_start, loadavg()),
        tls_seen.as_deref(),
        calibration.as_ref(),
    );
    let md = report::markdown(&header, &metrics, &results);
    let js = report::json(&header, &metrics, &results);
    let md_path = cfg.out.join("results.md");
    let js_path = cfg.out.join("results.json");
    std::fs::write(&md_path, &md).map_err(|e| format!("{}: {e}", md_path.display()))?;
    let js_text = serde_json::to_string_pretty(&js).map_err(|e| e.to_string())?;
    std::fs::write(&js_path, js_text + "\n").map_err(|e| format!("{}: {e}", js_path.display()))?;
    println!("{md}");
    eprintln!("wrote {} and {}", md_path.display(), js_path.display());
    // The charts are drawn from the JSON just written, as `--plot-only` would; a chart
    // that fails is reported but does not fail a run whose figures are already saved.
    match plot::write_charts(&js, &js_path) {
        Ok(paths) => {
            for p in paths {
                eprintln!("wrote {}", p.display());
            }
        }
        Err(e) => eprintln!("charts: {e}"),
    }
    Ok(())
}

/// For a `wss://` proxy, what one connection to its echo route negotiates (TLS version,
/// cipher suite, key exchange, handshake kind); `None` for the others or when the probe
/// fails (the measurements that follow will say why).
fn probe_tls(p: &Running, seed: u64) -> Option<String> {
    p.echo.tls.as_ref()?;
    match conn::Conn::open(&p.echo, seed ^ 0x7e57) {
        Ok(c) => {
            let info = c.tls_info().map(|i| i.to_string());
            c.close();
            info
        }
        Err(e) => {
            eprintln!("  tls probe: {e}");
            None
        }
    }
}

/// The idle point at `n` sessions against a proxy started for it, which is stopped after.
/// `nofile` is the open-file limit the proxy inherited: when a single-process proxy fails
/// below `n` and 2 sockets per session do not fit in it, the error says so.
fn measure_idle(mut p: Running, n: usize, nofile: u64, run: &mut Run, errors: &mut Vec<String>) {
    let (rss_id, pss_id) = report::idle_ids(n);
    let result = match &p.idle {
        Some(t) => measure::idle_memory(t, n, &p.pids()),
        None => Err("the proxy has no idle route".into()),
    };
    match result {
        Ok(m) => {
            eprintln!(
                "  idle: {} sessions (ramp {:.1} s), {:.1} KiB RSS / {:.1} KiB PSS each",
                m.conns, m.ramp_s, m.rss_kib_per_conn, m.pss_kib_per_conn
            );
            run.insert(rss_id, m.rss_kib_per_conn);
            run.insert(pss_id, m.pss_kib_per_conn);
        }
        Err(mut e) => {
            if let Err(died) = p.check_alive() {
                e.push_str(&format!("; {died}"));
            }
            let need = 2 * n as u64 + 64;
            if p.kind != Kind::Websockify && nofile < need {
                e.push_str(&format!(
                    "; {} is one process holding 2 sockets per session (client + upstream) \
                     plus its own, and inherits an open-file limit of {nofile} (the hard \
                     limit here): {n} sessions need about {need}",
                    p.kind.name()
                ));
            }
            eprintln!("  idle memory, {n} held: FAILED: {e}");
            errors.push(format!("idle memory, {n} held: {e}"));
        }
    }
    p.stop();
}

/// Every measurement against one started proxy except the idle point (see
/// [`measure_idle`]); a failed measurement leaves its figures out and the next one still
/// runs, unless the proxy died.
fn measure_one(cfg: &Config, mut p: Running, seed: u64) -> (Run, Vec<String>) {
    let mut run = Run::new();
    let mut errors = Vec::new();
    let pids = p.pids();
    let secs = cfg.secs;
    let fail = |what: &str, e: String, errors: &mut Vec<String>| {
        eprintln!("  {what}: FAILED: {e}");
        errors.push(format!("{what}: {e}"));
    };

    let mut cpu = 0.0;
    let mut bytes = 0u64;
    let tput: &[_] = if cfg.points.contains(&Point::Tput) {
        &[
            (1, "tput_1_mbs", None),
            (cfg.conns, "tput_n_mbs", Some("jain_n")),
        ]
    } else {
        &[]
    };
    for &(n, id_t, id_j) in tput {
        if let Err(e) = p.check_alive() {
            fail("proxy", e, &mut errors);
            return (run, errors);
        }
        match measure::throughput(&p.bulk, n, secs, &pids, seed ^ n as u64) {
            Ok(t) => {
                eprintln!(
                    "  throughput x{n}: {:.1} MB/s, jain {:.3}, slowest {:.1} / fastest {:.1} MB/s",
                    t.mb_s, t.jain, t.min_mb_s, t.max_mb_s
                );
                run.insert(id_t, t.mb_s);
                if let Some(id) = id_j {
                    run.insert(id, t.jain);
                    run.insert("tput_n_min_mbs", t.min_mb_s);
                    run.insert("tput_n_max_mbs", t.max_mb_s);
                }
                if let Some(c) = t.cpu_s {
                    cpu += c;
                    bytes += t.bytes;
                }
            }
            Err(e) => fail(&format!("throughput x{n}"), e, &mut errors),
        }
        std::thread::sleep(SETTLE);
    }
    if !pids.is_empty() && bytes > 0 {
        let per_gb = cpu / (bytes as f64 / 1e9);
        eprintln!(
            "  cpu: {cpu:.2} s for {:.2} GB = {per_gb:.2} s/GB",
            bytes as f64 / 1e9
        );
        run.insert("cpu_s_per_gb", per_gb);
    }

    let rts = [
        (
            1,
            [
                "rt_1_rate",
                "rt_1_p50_us",
                "rt_1_p99_us",
                "rt_1_mean_us",
                "rt_1_max_us",
            ],
        ),
        (
            cfg.conns,
            [
                "rt_n_rate",
                "rt_n_p50_us",
                "rt_n_p99_us",
                "rt_n_mean_us",
                "rt_n_max_us",
            ],
        ),
    ];
    let rts: &[_] = if cfg.points.contains(&Point::Rt) {
        &rts
    } else {
        &[]
    };
    for &(n, ids) in rts {
        if let Err(e) = p.check_alive() {
            fail("proxy", e, &mut errors);
            return (run, errors);
        }
        match measure::round_trips(&p.echo, n, secs, seed ^ ((n as u64) << 8)) {
            Ok(r) => {
                eprintln!(
                    "  round trips x{n}: {:.0}/s, p50 {:.1} µs, p99 {:.1} µs, mean {:.1} µs, max {:.0} µs",
                    r.rate, r.p50_us, r.p99_us, r.mean_us, r.max_us
                );
                // Mean and max go to the JSON only; the table keeps p50 and p99.
                for (id, v) in ids
                    .into_iter()
                    .zip([r.rate, r.p50_us, r.p99_us, r.mean_us, r.max_us])
                {
                    run.insert(id, v);
                }
            }
            Err(e) => fail(&format!("round trips x{n}"), e, &mut errors),
        }
        std::thread::sleep(SETTLE);
    }

    // Direct has no handshake: its one figure (connect + one echo) serves both rows.
    let direct = pids.is_empty();
    let upgrades: &[_] = if cfg.points.contains(&Point::Upgrades) {
        &[
            (false, "upgrades_s", "upgrades"),
            (true, "sessions_s", "upgrade+echo"),
        ]
    } else {
        &[]
    };
    for &(with_echo, id, what) in upgrades {
        if direct && with_echo {
            if let Some(&v) = run.get("upgrades_s") {
                run.insert(id, v);
            }
            continue;
        }
        if let Err(e) = p.check_alive() {
            fail("proxy", e, &mut errors);
            return (run, errors);
        }
        // Direct's cycle ends at the banner server, which closes first (see
        // `measure::open_close`).
        let Some(t) = (if direct {
            p.banner.as_ref()
        } else {
            Some(&p.echo)
        }) else {
            fail(what, "direct has no banner server".into(), &mut errors);
            continue;
        };
        match measure::upgrades(t, cfg.connectors, secs, seed ^ 0xabcd, with_echo) {
            Ok(u) => {
                eprintln!("  {what}: {:.0}/s ({} failed)", u.rate, u.failures);
                run.insert(id, u.rate);
            }
            Err(e) => fail(what, e, &mut errors),
        }
        std::thread::sleep(SETTLE);
    }
    if cfg.points.contains(&Point::Upgrades50) {
        upgrades50(&mut p, seed, secs, cfg.paced_rate, &mut run, &mut errors);
    }
    if let Err(e) = p.check_alive() {
        fail("proxy", e, &mut errors);
    }
    p.stop();
    (run, errors)
}

/// The `upgrades50` point against a started proxy: [`measure::upgrades_first_byte`] with
/// [`UPGRADES50_CONNECTORS`] connectors to its banner route, first in a closed loop, then
/// (unless `paced_rate` is 0) paced at `paced_rate` cycles per second against the same
/// process. Direct has no upgrade, so no handshake figures.
fn upgrades50(
    p: &mut Running,
    seed: u64,
    secs: f64,
    paced_rate: f64,
    run: &mut Run,
    errors: &mut Vec<String>,
) {
    let n = UPGRADES50_CONNECTORS;
    // Ids: rate, 101 p50 and p99, first byte p50 and p99, close p50 and p99, failures.
    let closed = (
        measure::Pace::Closed,
        format!("upgrades x{n}"),
        [
            "up50_rate",
            "up50_handshake_p50_us",
            "up50_handshake_p99_us",
            "up50_first_byte_p50_us",
            "up50_first_byte_p99_us",
            "up50_close_p50_us",
            "up50_close_p99_us",
            "up50_failures",
        ],
    );
    let paced = (paced_rate > 0.0).then(|| {
        (
            measure::Pace::Offered(paced_rate),
            format!("upgrades x{n} paced at {paced_rate}/s"),
            [
                "up50_paced_rate",
                "up50_paced_handshake_p50_us",
                "up50_paced_handshake_p99_us",
                "up50_paced_first_byte_p50_us",
                "up50_paced_first_byte_p99_us",
                "up50_paced_close_p50_us",
                "up50_paced_close_p99_us",
                "up50_paced_failures",
            ],
        )
    });
    for (pace, what, [rate, hs50, hs99, fb50, fb99, cl50, cl99, failures]) in
        std::iter::once(closed).chain(paced)
    {
        let fail = |e: String, errors: &mut Vec<String>| {
            eprintln!("  {what}: FAILED: {e}");
            errors.push(format!("{what}: {e}"));
        };
        if let Err(e) = p.check_alive() {
            return fail(e, errors);
        }
        let Some(t) = &p.banner else {
            return fail("the proxy has no banner route".into(), errors);
        };
        match measure::upgrades_first_byte(t, n, secs, seed ^ 0x5050, pace) {
            Ok(u) => {
                let us = |v: Option<f64>| v.map_or("—".to_owned(), |v| format!("{v:.0} µs"));
                eprintln!(
                    "  {what}: {:.0}/s ({} failed), to 101 p50 {} p99 {}, to first VM byte p50 {:.0} µs p99 {:.0} µs, close handshake p50 {:.0} µs p99 {:.0} µs",
                    u.rate,
                    u.failures,
                    us(u.handshake_p50_us),
                    us(u.handshake_p99_us),
                    u.first_byte_p50_us,
                    u.first_byte_p99_us,
                    u.close_p50_us,
                    u.close_p99_us
                );
                run.insert(rate, u.rate);
                if let (Some(p50), Some(p99)) = (u.handshake_p50_us, u.handshake_p99_us) {
                    run.insert(hs50, p50);
                    run.insert(hs99, p99);
                }
                run.insert(fb50, u.first_byte_p50_us);
                run.insert(fb99, u.first_byte_p99_us);
                run.insert(cl50, u.close_p50_us);
                run.insert(cl99, u.close_p99_us);
                // Not a table row but kept in the JSON's runs; the paced phase's failures
                // count in whether the proxy kept up (`report::kept_up`).
                run.insert(failures, u.failures as f64);
            }
            Err(e) => fail(e, errors),
        }
        std::thread::sleep(SETTLE);
    }
}

/// The 1, 5 and 15 minute load averages.
pub fn loadavg() -> String {
    std::fs::read_to_string("/proc/loadavg")
        .map(|s| {
            s.split_ascii_whitespace()
                .take(3)
                .collect::<Vec<_>>()
                .join(" ")
        })
        .unwrap_or_default()
}

/// This machine: CPU count, kernel release and CPU model.
pub fn machine() -> (usize, String, String) {
    let nproc = std::thread::available_parallelism().map_or(0, |n| n.get());
    let kernel = std::fs::read_to_string("/proc/sys/kernel/osrelease")
        .map(|s| s.trim().to_owned())
        .unwrap_or_default();
    let cpu = std::fs::read_to_string("/proc/cpuinfo")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("model name"))
                .and_then(|l| l.split_once(':'))
                .map(|(_, v)| v.trim().to_owned())
        })
        .unwrap_or_else(|| "unknown CPU".into());
    (nproc, kernel, cpu)
}

/// `kind`'s closed-loop rate at the `upgrades50` point (cycles per second, rounded down),
/// from one closed loop of `secs` against a fresh process that is stopped after: the rate
/// the paced phase then offers every proxy. Not a repetition: no figure of it is kept.
fn calibrate(
    kind: Kind,
    exe: Option<&std::path::Path>,
    settings: &proxy::Settings,
    tg: targets::Targets,
    secs: f64,
    seed: u64,
) -> Result<f64, String> {
    eprintln!(
        "calibration: {} closed loop, for the paced rate",
        kind.name()
    );
    let p = proxy::start(kind, exe, settings, tg, 0)?;
    let measured = match &p.banner {
        Some(t) => measure::upgrades_first_byte(
            t,
            UPGRADES50_CONNECTORS,
            secs,
            seed ^ 0xca1b,
            measure::Pace::Closed,
        ),
        None => Err("the proxy has no banner route".into()),
    };
    p.stop();
    let u = measured?;
    if u.failures > 0 {
        return Err(format!(
            "{} of its cycles failed in the calibration",
            u.failures
        ));
    }
    Ok(u.rate.floor())
}

/// The offered rate of the `upgrades50` point's paced phase, when it runs.
fn paced_rate(cfg: &Config) -> Option<f64> {
    (cfg.points.contains(&Point::Upgrades50) && cfg.paced_rate > 0.0).then_some(cfg.paced_rate)
}

fn header(
    cfg: &Config,
    load: (String, String),
    tls: Option<&str>,
    calibration: Option<&Calibration>,
) -> Header {
    let (nproc, kernel, cpu) = machine();
    let only: Vec<&str> = cfg.only.iter().map(|k| k.name()).collect();
    let points: Vec<&str> = cfg.points.iter().map(|p| p.name()).collect();
    let points_note = if cfg.points.len() == Point::ALL.len() {
        String::new()
    } else {
        format!(" Points taken: {}.", points.join(", "))
    };
    let tls_note = match tls {
        Some(t) => format!(
            " vncgate-tls: the same vncgate with --tls-cert/--tls-key (self-signed ECDSA P-256), \
             the client on rustls with ring: {t}, no session resumption (every upgrade is a \
             full TLS handshake); TLS / plaintext = vncgate-tls / vncgate."
        ),
        None => String::new(),
    };
    let source = match calibration {
        Some(Calibration { kind, rate: Ok(_) }) => format!(
            " ({}'s own closed-loop rate, from one closed loop against it before the \
             repetitions, so the others are compared with it at the rate it manages)",
            kind.name()
        ),
        Some(Calibration { kind, rate: Err(e) }) => format!(
            " (not {}'s closed-loop rate, which could not be measured: {e})",
            kind.name()
        ),
        None => String::new(),
    };
    let paced_note = match paced_rate(cfg) {
        Some(rate) => format!(
            " Upgrades with {UPGRADES50_CONNECTORS} connectors: first a closed loop (each \
             connector starts again when its cycle ends: every proxy at its own saturation), \
             then paced at {rate}/s{source} offered to every proxy (open loop, each latency \
             from when its cycle was due, so a proxy that falls behind pays for its backlog)."
        ),
        None => String::new(),
    };
    let paced_from = calibration.map(|c| {
        json!({
            "proxy": c.kind.name(),
            "rate": c.rate.as_ref().ok(),
            "error": c.rate.as_ref().err(),
        })
    });
    Header {
        date: report::utc_now(),
        nproc,
        kernel,
        cpu,
        load,
        settings: json!({
            "reps": cfg.reps,
            "secs": cfg.secs,
            "conns": cfg.conns,
            "connectors": cfg.connectors,
            "upgrades50_connectors": UPGRADES50_CONNECTORS,
            "upgrades50_paced_rate": cfg.paced_rate,
            "upgrades50_paced_from": paced_from,
            "idle": cfg.idle,
            "idle_sources": measure::IDLE_SOURCES,
            "vncgate_workers": cfg.workers,
            "vncgate_args": cfg.vncgate_args,
            "vncgate": cfg.vncgate,
            "only": only,
            "points": points,
            "tls": tls.map(|t| json!({
                "negotiated": t,
                "certificate": "self-signed ECDSA P-256 (rcgen), made at the start of the run",
                "resumption": false,
            })),
        }),
        settings_line: format!(
            "Medians of {} interleaved repetitions, {} s per timed point; vncgate --workers {}. \
             Ratio = proxy / direct TCP from this run (higher is better for rates, lower for \
             latency). CPU and memory are the proxy's own (process tree), so they have no ratio.{}{}{}",
            cfg.reps, cfg.secs, cfg.workers, points_note, paced_note, tls_note
        ),
        paced_rate: paced_rate(cfg),
        paced_from: calibration.and_then(|c| c.rate.is_ok().then_some(c.kind)),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn config(points: Vec<Point>, paced_rate: f64) -> Config {
        Config {
            vncgate: "vncgate".into(),
            workers: 2,
            vncgate_args: Vec::new(),
            reps: 1,
            secs: 1.0,
            idle: Vec::new(),
            conns: 50,
            connectors: 4,
            only: vec![Kind::Vncgate],
            points,
            paced_rate,
            paced_from: None,
            out: "out".into(),
        }
    }

    #[test]
    fn paced_rate_0_or_no_upgrades50_skips_the_paced_phase() {
        let cfg = config(vec![Point::Upgrades50], 5000.0);
        assert_eq!(paced_rate(&cfg), Some(5000.0));
        let h = header(&cfg, Default::default(), None, None);
        assert_eq!(h.paced_rate, Some(5000.0));
        assert_eq!(h.settings["upgrades50_paced_rate"], json!(5000.0));
        assert!(
            h.settings_line.contains("paced at 5000/s"),
            "{}",
            h.settings_line
        );
        let cfg = config(vec![Point::Upgrades50], 0.0);
        assert_eq!(paced_rate(&cfg), None);
        let h = header(&cfg, Default::default(), None, None);
        assert_eq!(h.settings["upgrades50_paced_rate"], json!(0.0));
        assert!(!h.settings_line.contains("paced"), "{}", h.settings_line);
        assert_eq!(paced_rate(&config(vec![Point::Tput], 5000.0)), None);
    }

    #[test]
    fn a_calibrated_paced_rate_names_its_proxy_and_a_failed_one_says_why() {
        let cfg = config(vec![Point::Upgrades50], 9812.0);
        let ok = Calibration {
            kind: Kind::Websocat,
            rate: Ok(9812.0),
        };
        let h = header(&cfg, Default::default(), None, Some(&ok));
        assert_eq!(h.paced_from, Some(Kind::Websocat));
        assert_eq!(
            h.settings["upgrades50_paced_from"],
            json!({"proxy": "websocat", "rate": 9812.0, "error": null})
        );
        assert!(
            h.settings_line
                .contains("paced at 9812/s (websocat's own closed-loop rate"),
            "{}",
            h.settings_line
        );
        let cfg = config(vec![Point::Upgrades50], FALLBACK_PACED_RATE);
        let failed = Calibration {
            kind: Kind::Websocat,
            rate: Err("websocat skipped: websocat not on PATH".into()),
        };
        let h = header(&cfg, Default::default(), None, Some(&failed));
        assert_eq!(h.paced_from, None);
        assert_eq!(
            h.settings["upgrades50_paced_from"]["error"],
            json!("websocat skipped: websocat not on PATH")
        );
        assert!(
            h.settings_line.contains(
                "paced at 5000/s (not websocat's closed-loop rate, which could not be measured: websocat skipped"
            ),
            "{}",
            h.settings_line
        );
    }
}
