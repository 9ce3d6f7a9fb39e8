//! The routing bench (`vncgate-bench-routing`, `bench/routing.sh`): WebSocket upgrades per
//! second through vncgate when its routes come from Redis, with a warm route cache and with
//! none (`--route-cache-ttl 0`), as a ratio to static routes from a routes file, all in one
//! run, against the same in-process echo upstream.
//!
//! Every point is a fresh gateway process with the same workers and flags. `--ids` session
//! ids route to the echo server, in the routes file and in Redis alike; each connection asks
//! for one of them at random, upgrades and closes (`measure::upgrades_over`). Before the
//! timed window every point gets the same warm-up, enough upgrades to every id that each
//! worker has almost surely seen each one (`touches_per_id`); the warm-cache point then
//! repeats that pass until one causes no Redis lookup at all, so its window starts with
//! every id in every worker's cache. During the window, the Redis server's keyspace
//! counters (`INFO stats`) give the lookups per upgrade: about 1 cold, about 0 warm.
//!
//! The bench starts its own `redis-server` on a free loopback port (no persistence), writes
//! the routes with the gateway's schema crate, and kills it by pid at the end. The order of
//! the three configurations rotates from one repetition to the next; the table shows medians.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use plotters::style::RGBColor;
use serde_json::{Value, json};
use vncgate_schema::testing::{Options, RedisServer};
use vncgate_schema::{RedisUrl, RouteRecord, Timeouts};

use crate::conn::{self, Target};
use crate::measure;
use crate::plot::{self, Figure, Group, Panel, Scale};
use crate::proxy::{self, Kind, Running};
use crate::report::{self, Run};
use crate::runner::{self, SETTLE};
use crate::targets;

/// Where the gateway's routes come from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Routing {
    /// `--routes-file` with every id.
    Static,
    /// `--redis`, default cache TTL, measured once every id is cached on every worker.
    RedisWarm,
    /// `--redis --route-cache-ttl 0`: a Redis lookup per upgrade.
    RedisCold,
}

impl Routing {
    pub const ALL: [Routing; 3] = [Routing::Static, Routing::RedisWarm, Routing::RedisCold];

    pub fn name(self) -> &'static str {
        match self {
            Routing::Static => "static",
            Routing::RedisWarm => "redis-warm",
            Routing::RedisCold => "redis-cold",
        }
    }

    pub fn parse(s: &str) -> Option<Routing> {
        Routing::ALL.into_iter().find(|r| r.name() == s)
    }

    fn label(self, ids: usize) -> String {
        match self {
            Routing::Static => format!("static routes file ({ids} ids)"),
            Routing::RedisWarm => "Redis, warm cache (default TTL)".into(),
            Routing::RedisCold => "Redis, cold (`--route-cache-ttl 0`)".into(),
        }
    }

    fn uses_redis(self) -> bool {
        self != Routing::Static
    }
}

#[derive(Debug, Clone)]
pub struct Config {
    pub vncgate: PathBuf,
    /// `redis-server` to start; `None`: the one on `PATH`, else `/usr/bin/redis-server`.
    pub redis_server: Option<PathBuf>,
    pub workers: usize,
    pub vncgate_args: Vec<String>,
    pub reps: usize,
    pub secs: f64,
    /// Session ids routed (all to the echo server).
    pub ids: usize,
    pub connectors: usize,
    /// One 16-byte echo per session before the close.
    pub with_echo: bool,
    /// The configurations to run, in `Routing::ALL` order.
    pub only: Vec<Routing>,
    pub out: PathBuf,
}

/// Longest a warm-up pass may take.
const WARMUP_DEADLINE: Duration = Duration::from_secs(60);
/// Warm-up passes the warm-cache point may add until one causes no Redis lookup.
const MAX_CHECK_PASSES: usize = 4;
/// The gateway's default `--route-cache-ttl`: a timed window longer than this is no longer
/// all warm.
const DEFAULT_CACHE_TTL_S: f64 = 30.0;

/// Upgrades per id in a warm-up pass so that, with connections spread over `workers` at
/// random, every (id, worker) pair is reached with probability at least 1 - 1/1000 summed
/// over all pairs: (1 - 1/w)^m <= 1 / (1000 * ids * w).
pub fn touches_per_id(workers: usize, ids: usize) -> usize {
    if workers <= 1 {
        return 1;
    }
    let w = workers as f64;
    let m = (1000.0 * ids.max(1) as f64 * w).ln() / -(1.0 - 1.0 / w).ln();
    (m.ceil() as usize).clamp(1, 2000)
}

/// The session ids of a run.
pub fn session_ids(n: usize) -> Vec<String> {
    (0..n).map(|i| format!("bench-{i:04}")).collect()
}

/// The routes file of the static point: every id to `upstream`, no token.
pub fn routes_toml(ids: &[String], upstream: SocketAddr) -> String {
    ids.iter()
        .map(|id| format!("[[route]]\nsession = \"{id}\"\nupstream = \"{upstream}\"\n\n"))
        .collect()
}

/// Every figure of one configuration over the run.
struct Outcome {
    routing: Routing,
    skipped: Option<String>,
    runs: Vec<Run>,
    errors: Vec<String>,
}

impl Outcome {
    fn median(&self, id: &str) -> Option<f64> {
        report::median_of(
            self.runs
                .iter()
                .filter_map(|r| r.get(id).copied())
                .collect(),
        )
    }
}

pub fn run(cfg: &Config) -> Result<(), String> {
    let logs = cfg.out.join("logs");
    std::fs::create_dir_all(&logs).map_err(|e| format!("{}: {e}", logs.display()))?;
    for e in std::fs::read_dir(&logs).into_iter().flatten().flatten() {
        let name = e.file_name();
        let name = name.to_string_lossy();
        if name.starts_with("routing-") && name.ends_with(".log") {
            let _ = std::fs::remove_file(e.path());
        }
    }
    if cfg.secs + 1.0 >= DEFAULT_CACHE_TTL_S {
        eprintln!(
            "note: --secs {} is close to the default route cache TTL ({DEFAULT_CACHE_TTL_S} s): the warm point will not stay warm",
            cfg.secs
        );
    }
    let load_start = runner::loadavg();
    let settings = proxy::Settings {
        vncgate: cfg.vncgate.clone(),
        workers: cfg.workers,
        vncgate_args: cfg.vncgate_args.clone(),
        out: cfg.out.clone(),
        tls: None,
    };
    let exe = proxy::locate(Kind::Vncgate, &settings)?.unwrap_or_else(|| cfg.vncgate.clone());
    let tg = targets::start().map_err(|e| format!("targets: {e}"))?;
    eprintln!("target: echo {}", tg.echo);
    let ids = session_ids(cfg.ids);

    let mut outcomes: Vec<Outcome> = cfg
        .only
        .iter()
        .map(|&routing| Outcome {
            routing,
            skipped: None,
            runs: Vec::new(),
            errors: Vec::new(),
        })
        .collect();
    let mut redis = None;
    if outcomes.iter().any(|o| o.routing.uses_redis()) {
        let started = redis_support(&exe).and_then(|()| {
            let server = locate_redis_server(cfg.redis_server.as_deref())?;
            let mut r = Redis::start(&server, &cfg.out)?;
            r.put_routes(&ids, tg.echo)?;
            eprintln!(
                "redis: {} at {}, {} routes written",
                server.display(),
                r.url,
                ids.len()
            );
            Ok(r)
        });
        match started {
            Ok(r) => redis = Some(r),
            Err(why) => {
                eprintln!("skip the Redis points: {why}");
                for o in outcomes.iter_mut().filter(|o| o.routing.uses_redis()) {
                    o.skipped = Some(why.clone());
                }
            }
        }
    }
    let routes_file = cfg.out.join("routing-routes.toml");
    std::fs::write(&routes_file, routes_toml(&ids, tg.echo))
        .map_err(|e| format!("{}: {e}", routes_file.display()))?;

    let mut seed = conn::random_seed();
    let active: Vec<usize> = (0..outcomes.len())
        .filter(|&i| outcomes[i].skipped.is_none())
        .collect();
    for rep in 0..cfg.reps {
        // Rotate the order: each configuration runs first, second and third in turn.
        for j in 0..active.len() {
            let o = &mut outcomes[active[(j + rep) % active.len()]];
            let name = o.routing.name();
            eprintln!("rep {}/{} {name}", rep + 1, cfg.reps);
            seed = seed.wrapping_add(0x1_0000_0001);
            let args = gateway_args(o.routing, &routes_file, redis.as_ref().map(|r| &r.url));
            let log = format!("routing-{name}");
            let mut notes = Vec::new();
            let r = proxy::start_vncgate(&exe, &settings, &args, &log, rep + 1)
                .map_err(|e| {
                    format!(
                        "did not start: {e} (its output: {}/logs/)",
                        cfg.out.display()
                    )
                })
                .and_then(|p| {
                    measure_point(cfg, o.routing, p, &ids, redis.as_mut(), seed, &mut notes)
                });
            match r {
                Ok(run) => o.runs.push(run),
                Err(e) => {
                    eprintln!("  FAILED: {e}");
                    notes.push(e);
                }
            }
            o.errors
                .extend(notes.into_iter().map(|e| format!("rep {}: {e}", rep + 1)));
            std::thread::sleep(SETTLE);
        }
    }
    drop(redis);

    let js = json_record(cfg, (load_start, runner::loadavg()), &outcomes);
    let md = markdown(&js, &outcomes, cfg.ids);
    let md_path = cfg.out.join("routing.md");
    let js_path = cfg.out.join("routing.json");
    std::fs::write(&md_path, &md).map_err(|e| format!("{}: {e}", md_path.display()))?;
    let js_text = serde_json::to_string_pretty(&js).map_err(|e| e.to_string())?;
    std::fs::write(&js_path, js_text + "\n").map_err(|e| format!("{}: {e}", js_path.display()))?;
    println!("{md}");
    eprintln!("wrote {} and {}", md_path.display(), js_path.display());
    let svg_path = cfg.out.join("routing.svg");
    match figure(&js).map(|f| plot::render(&f)) {
        Some(Ok(svg)) => match std::fs::write(&svg_path, svg) {
            Ok(()) => eprintln!("wrote {}", svg_path.display()),
            Err(e) => eprintln!("chart: {}: {e}", svg_path.display()),
        },
        Some(Err(e)) => eprintln!("chart: {e}"),
        None => {
            let _ = std::fs::remove_file(&svg_path);
        }
    }
    Ok(())
}

/// The `vncgate serve` arguments that make the routing of a point.
fn gateway_args(routing: Routing, routes_file: &Path, redis_url: Option<&String>) -> Vec<String> {
    let mut a: Vec<String> = match (routing, redis_url) {
        (Routing::Static, _) | (_, None) => {
            vec!["--routes-file".into(), routes_file.display().to_string()]
        }
        (Routing::RedisWarm, Some(url)) => vec!["--redis".into(), url.clone()],
        (Routing::RedisCold, Some(url)) => vec![
            "--redis".into(),
            url.clone(),
            "--route-cache-ttl".into(),
            "0".into(),
        ],
    };
    a.extend(["--allow-upstream".into(), "127.0.0.1/32".into()]);
    a
}

/// One point against a started gateway: warm-up, then the timed upgrades; the gateway is
/// stopped either way. Problems that leave the figure usable go to `notes`.
fn measure_point(
    cfg: &Config,
    routing: Routing,
    mut p: Running,
    ids: &[String],
    mut redis: Option<&mut Redis>,
    seed: u64,
    notes: &mut Vec<String>,
) -> Result<Run, String> {
    let addr = p.echo.addr;
    let targets: Vec<Target> = ids
        .iter()
        .map(|id| Target::plain(addr, Some(&format!("/vnc/{id}"))))
        .collect();
    let times = touches_per_id(cfg.workers, ids.len());
    let pass = |seed| measure::touch_all(&targets, times, cfg.connectors, WARMUP_DEADLINE, seed);
    let r = (|| {
        let mut run = Run::new();
        // The same warm-up for every configuration. A gateway whose Redis connection is
        // not up yet answers 503 for a moment; that is a failure here, not in the window.
        let (ok, failed, last) = pass(seed);
        if ok == 0 {
            return Err(format!(
                "warm-up: no upgrade succeeded ({failed} failed; last: {last})"
            ));
        }
        if failed > 0 {
            eprintln!(
                "  warm-up: {failed} of {} upgrades failed (last: {last})",
                ok + failed
            );
        }
        let redis_in_use = if routing.uses_redis() {
            redis.as_deref_mut()
        } else {
            None
        };
        if let (Routing::RedisWarm, Some(r)) = (routing, redis_in_use) {
            let mut passes = 1;
            loop {
                let before = r.lookups()?;
                let (_, failed, last) = pass(seed ^ passes as u64);
                let misses = r.lookups()? - before;
                passes += 1;
                if misses == 0 && failed == 0 {
                    eprintln!(
                        "  warm: {passes} passes of {times} upgrades per id, the last without a Redis lookup"
                    );
                    break;
                }
                if passes > MAX_CHECK_PASSES {
                    notes.push(format!(
                        "warm-up pass {passes} still caused {misses} Redis lookups ({failed} failed, last: {last}): the cache is not all warm"
                    ));
                    break;
                }
            }
            run.insert("warmup_passes", passes as f64);
        }
        p.check_alive()?;
        std::thread::sleep(SETTLE);
        let before = match routing.uses_redis() {
            true => redis.as_deref_mut().map(Redis::lookups).transpose()?,
            false => None,
        };
        let u = measure::upgrades_over(
            &targets,
            cfg.connectors,
            cfg.secs,
            seed ^ 0xabcd,
            cfg.with_echo,
        )?;
        run.insert("upgrades_s", u.rate);
        run.insert("failures", u.failures as f64);
        let mut line = format!("  upgrades: {:.0}/s ({} failed)", u.rate, u.failures);
        if let (Some(before), Some(r)) = (before, redis.as_deref_mut()) {
            let per = (r.lookups()? - before) as f64 / (u.ok + u.failures) as f64;
            run.insert("lookups_per_upgrade", per);
            line.push_str(&format!(", {per:.3} Redis lookups per upgrade"));
        }
        eprintln!("{line}");
        if u.failures > 0 {
            notes.push(format!("{} upgrades failed in the window", u.failures));
        }
        p.check_alive()?;
        Ok(run)
    })();
    p.stop();
    r
}

/// Err with the reason when the gateway has no Redis routing (built before it landed).
fn redis_support(exe: &Path) -> Result<(), String> {
    let out = Command::new(exe)
        .args(["serve", "--help"])
        .output()
        .map_err(|e| format!("{} serve --help: {e}", exe.display()))?;
    let help = String::from_utf8_lossy(&out.stdout);
    for flag in ["--redis ", "--route-cache-ttl "] {
        if !help.contains(flag) {
            return Err(format!(
                "{} has no {} flag (built before Redis routing?)",
                exe.display(),
                flag.trim()
            ));
        }
    }
    Ok(())
}

fn locate_redis_server(given: Option<&Path>) -> Result<PathBuf, String> {
    let found = match given {
        Some(p) => p.is_file().then(|| p.to_owned()),
        None => proxy::which("redis-server")
            .or_else(|| Some(PathBuf::from("/usr/bin/redis-server")).filter(|p| p.is_file())),
    };
    found.ok_or_else(|| {
        "redis-server not found (apt-get install redis-server, or pass --redis-server PATH)".into()
    })
}

/// The bench's own `redis-server` (the managed one of `vncgate_schema::testing`, without
/// persistence, its output in the bench's logs), with a connection to it; stopped when
/// dropped.
struct Redis {
    /// Held for its `Drop`, which stops the server.
    _server: RedisServer,
    url: String,
    rt: tokio::runtime::Runtime,
    conn: vncgate_schema::Conn,
}

impl Redis {
    fn start(exe: &Path, out: &Path) -> Result<Redis, String> {
        let log = out.join("logs").join("routing-redis.log");
        let server = RedisServer::launch(Options {
            exe: exe.to_owned(),
            persistent: false,
            log: Some(log.clone()),
            extra: Vec::new(),
        })
        .map_err(|e| format!("{e} (its output: {})", log.display()))?;
        let url = server.url();
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .map_err(|e| format!("tokio runtime: {e}"))?;
        let parsed: RedisUrl = url.parse()?;
        let t = Timeouts {
            connect: Duration::from_millis(500),
            response: Duration::from_secs(2),
        };
        let conn = rt
            .block_on(parsed.connect(t))
            .map_err(|e| format!("connect to the bench's redis-server at {url}: {e}"))?;
        Ok(Redis {
            _server: server,
            url,
            rt,
            conn,
        })
    }

    /// Writes every id's route to `upstream`, as the controller would.
    fn put_routes(&mut self, ids: &[String], upstream: SocketAddr) -> Result<(), String> {
        let conn = &mut self.conn;
        self.rt.block_on(async {
            for id in ids {
                let rec = RouteRecord {
                    upstream,
                    token_sha256: None,
                    view_token_sha256: None,
                    expires_at: None,
                    max_viewers: None,
                    created_at: vncgate_schema::unix_now(),
                    writer: Some("vncgate-bench".into()),
                    record: false,
                };
                vncgate_schema::store::put_route(conn, id, &rec)
                    .await
                    .map_err(|e| format!("put route {id}: {e}"))?;
            }
            Ok(())
        })
    }

    /// Key lookups the server has answered so far (keyspace hits + misses).
    fn lookups(&mut self) -> Result<u64, String> {
        let conn = &mut self.conn;
        let info: String = self
            .rt
            .block_on(redis::cmd("INFO").arg("stats").query_async(conn))
            .map_err(|e| format!("redis INFO: {e}"))?;
        keyspace_lookups(&info).ok_or_else(|| "redis INFO stats has no keyspace counters".into())
    }
}

/// `keyspace_hits + keyspace_misses` from the text of `INFO stats`.
pub fn keyspace_lookups(info: &str) -> Option<u64> {
    let field = |name: &str| {
        info.lines().find_map(|l| {
            l.trim()
                .strip_prefix(name)?
                .strip_prefix(':')?
                .parse::<u64>()
                .ok()
        })
    };
    Some(field("keyspace_hits")? + field("keyspace_misses")?)
}

fn json_record(cfg: &Config, load: (String, String), outcomes: &[Outcome]) -> Value {
    let (nproc, kernel, cpu) = runner::machine();
    let base = outcomes
        .iter()
        .find(|o| o.routing == Routing::Static)
        .and_then(|o| o.median("upgrades_s"));
    let mut configs = serde_json::Map::new();
    for o in outcomes {
        let median: serde_json::Map<String, Value> =
            ["upgrades_s", "lookups_per_upgrade", "failures"]
                .into_iter()
                .filter_map(|id| Some((id.to_owned(), json!(o.median(id)?))))
                .collect();
        let ratio = match (o.median("upgrades_s"), base) {
            (Some(v), Some(b)) if b > 0.0 => Some(v / b),
            _ => None,
        };
        configs.insert(
            o.routing.name().into(),
            json!({
                "label": o.routing.label(cfg.ids),
                "skipped": o.skipped,
                "errors": o.errors,
                "runs": o.runs,
                "median": median,
                "ratio_to_static": ratio,
            }),
        );
    }
    json!({
        "date": report::utc_now(),
        "machine": { "nproc": nproc, "kernel": kernel, "cpu": cpu },
        "loadavg": { "start": load.0, "end": load.1 },
        "settings": {
            "reps": cfg.reps,
            "secs": cfg.secs,
            "ids": cfg.ids,
            "connectors": cfg.connectors,
            "with_echo": cfg.with_echo,
            "warmup_upgrades_per_id": touches_per_id(cfg.workers, cfg.ids),
            "vncgate_workers": cfg.workers,
            "vncgate_args": cfg.vncgate_args,
            "vncgate": cfg.vncgate,
        },
        "configs": configs,
    })
}

fn markdown(js: &Value, outcomes: &[Outcome], ids: usize) -> String {
    let st = &js["settings"];
    let mut s = String::from("# vncgate-bench: upgrades per second by route source\n\n");
    for line in plot::context_lines(js) {
        s.push_str(&line);
        s.push_str("  \n");
    }
    s.push_str(&format!(
        "\nEach point: a fresh gateway, {} connector threads for {} s, each connection {} one of {ids} \
         session ids at random, then closes; after the same warm-up ({} upgrades per id). The \
         order of the configurations rotates from one repetition to the next. Ratio = median / \
         static median from this run. Redis lookups = keyspace hits + misses of the bench's \
         redis-server during the window, per upgrade attempted.\n\n",
        st["connectors"],
        st["secs"],
        if st["with_echo"] == true {
            "upgrades, sends one 16 B echo to"
        } else {
            "upgrades to"
        },
        st["warmup_upgrades_per_id"],
    ));
    s.push_str("| routing | upgrades/s | ratio to static | Redis lookups per upgrade | each repetition |\n");
    s.push_str("|---|---:|---:|---:|---|\n");
    for o in outcomes {
        let c = &js["configs"][o.routing.name()];
        let each: Vec<String> = o
            .runs
            .iter()
            .filter_map(|r| r.get("upgrades_s"))
            .map(|v| format!("{v:.0}"))
            .collect();
        let cell = |v: Option<f64>, f: fn(f64) -> String| v.map_or_else(|| "—".to_owned(), f);
        s.push_str(&format!(
            "| {} | {} | {} | {} | {} |\n",
            o.routing.label(ids),
            cell(o.median("upgrades_s"), |v| format!("{v:.0}")),
            cell(c["ratio_to_static"].as_f64(), |v| format!("{v:.2}x")),
            cell(o.median("lookups_per_upgrade"), |v| format!("{v:.3}")),
            if each.is_empty() {
                "—".to_owned()
            } else {
                each.join(", ")
            },
        ));
    }
    s.push('\n');
    for o in outcomes {
        if let Some(why) = &o.skipped {
            s.push_str(&format!("- {} skipped: {why}\n", o.routing.name()));
        }
        for e in &o.errors {
            s.push_str(&format!("- {}: {e}\n", o.routing.name()));
        }
    }
    s
}

/// Bars of each configuration's median upgrades/s as a ratio to static (top panel) and in
/// upgrades per second (bottom); `None` when no configuration has a figure.
pub fn figure(js: &Value) -> Option<Figure> {
    const COLOR: RGBColor = RGBColor(0x2b, 0x6c, 0xb0);
    // In `Routing::ALL` order (the JSON object's keys are sorted by name).
    let configs: Vec<&Value> = Routing::ALL
        .iter()
        .filter_map(|r| js["configs"].get(r.name()))
        .collect();
    let groups = |pick: &dyn Fn(&Value) -> Option<f64>| -> Vec<Group> {
        configs
            .iter()
            .filter(|c| c["skipped"].is_null())
            .map(|c| Group {
                label: c["label"].as_str().unwrap_or("?").replace('`', ""),
                values: vec![pick(c).filter(|v| v.is_finite())],
            })
            .collect()
    };
    let ratios = groups(&|c| c["ratio_to_static"].as_f64());
    let rates = groups(&|c| c["median"]["upgrades_s"].as_f64());
    if rates.iter().all(|g| g.values[0].is_none()) {
        return None;
    }
    let panel = |title: &str, x_desc: &str, groups, reference, value_fmt| Panel {
        title: title.into(),
        x_desc: x_desc.into(),
        series: vec![("vncgate", COLOR)],
        groups,
        scale: Scale::Linear,
        reference,
        value_fmt,
    };
    let mut panels = Vec::new();
    if ratios.iter().any(|g| g.values[0].is_some()) {
        panels.push(panel(
            "Ratio to static routes (higher is better)",
            "median upgrades/s ÷ static-routes median from the same run",
            ratios,
            Some((1.0, "static routes = 1.0".into())),
            (|v| format!("{v:.2}x")) as fn(f64) -> String,
        ));
    }
    panels.push(panel(
        "Upgrades per second",
        "median WebSocket upgrades per second",
        rates,
        None,
        |v| format!("{v:.0}/s"),
    ));
    Some(Figure {
        title: "vncgate-bench: upgrades per second by route source".into(),
        context: plot::context_lines(js),
        panels,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn warm_up_reaches_every_worker_with_high_probability() {
        assert_eq!(touches_per_id(1, 64), 1);
        let m = touches_per_id(2, 64);
        assert!((17..=18).contains(&m), "{m}");
        // (1 - 1/w)^m <= 1 / (1000 * ids * w)
        for w in [2usize, 4, 16] {
            let m = touches_per_id(w, 64) as i32;
            let miss = (1.0 - 1.0 / w as f64).powi(m);
            assert!(
                miss <= 1.0 / (1000.0 * 64.0 * w as f64) * 1.0001,
                "w {w} m {m}"
            );
        }
    }

    #[test]
    fn routes_file_and_ids() {
        let ids = session_ids(2);
        assert_eq!(ids, ["bench-0000", "bench-0001"]);
        for id in &ids {
            vncgate_schema::check_session_id(id).unwrap();
        }
        let toml = routes_toml(&ids, "127.0.0.1:5900".parse().unwrap());
        assert_eq!(
            toml,
            "[[route]]\nsession = \"bench-0000\"\nupstream = \"127.0.0.1:5900\"\n\n\
             [[route]]\nsession = \"bench-0001\"\nupstream = \"127.0.0.1:5900\"\n\n"
        );
    }

    #[test]
    fn gateway_args_per_routing() {
        let f = Path::new("/tmp/r.toml");
        let url = "redis://127.0.0.1:7000".to_owned();
        assert_eq!(
            gateway_args(Routing::Static, f, Some(&url)),
            [
                "--routes-file",
                "/tmp/r.toml",
                "--allow-upstream",
                "127.0.0.1/32"
            ]
        );
        assert_eq!(
            gateway_args(Routing::RedisWarm, f, Some(&url)),
            ["--redis", &url, "--allow-upstream", "127.0.0.1/32"]
        );
        assert_eq!(
            gateway_args(Routing::RedisCold, f, Some(&url)),
            [
                "--redis",
                &url,
                "--route-cache-ttl",
                "0",
                "--allow-upstream",
                "127.0.0.1/32"
            ]
        );
        for r in Routing::ALL {
            assert_eq!(Routing::parse(r.name()), Some(r));
        }
    }

    #[test]
    fn keyspace_counters_from_info() {
        let info =
            "# Stats\r\ntotal_connections_received:3\r\nkeyspace_hits:120\r\nkeyspace_misses:7\r\n";
        assert_eq!(keyspace_lookups(info), Some(127));
        assert_eq!(keyspace_lookups("# Stats\r\n"), None);
    }

    #[test]
    fn figure_has_ratio_and_rate_panels() {
        let js = json!({
            "date": "2026-11-29T03:00:25Z",
            "settings": {"reps": 1, "secs": 2.0, "vncgate_workers": 2},
            "configs": {
                "static": {"label": "static routes file (64 ids)", "skipped": null,
                           "median": {"upgrades_s": 10000.0}, "ratio_to_static": 1.0},
                "redis-warm": {"label": "Redis, warm cache (default TTL)", "skipped": null,
                               "median": {"upgrades_s": 9800.0}, "ratio_to_static": 0.98},
                "redis-cold": {"label": "Redis, cold (`--route-cache-ttl 0`)",
                               "skipped": "no redis", "median": {}, "ratio_to_static": null}
            }
        });
        let f = figure(&js).unwrap();
        assert_eq!(f.panels.len(), 2);
        assert_eq!(f.panels[0].groups.len(), 2);
        assert_eq!(f.panels[0].groups[1].values, vec![Some(0.98)]);
        let svg = plot::render(&f).unwrap();
        for text in [
            "0.98x",
            "10000/s",
            "static routes = 1.0",
            "Redis, warm cache",
        ] {
            assert!(svg.contains(text), "{text} missing");
        }
    }
}
