//! The six measurements. Each one is bounded in time (a fixed window plus socket timeouts)
//! and in connection count, and returns `Err(reason)` rather than a figure it cannot trust.
//! The idle one uses the load tool's idle mode (`vncgate_loadtest::idle`) rather than the
//! blocking client of the others: thousands of sessions, from several source addresses.
//!
//! Timed windows share one shape: connections are opened first (handshakes excluded), the
//! worker threads start, traffic runs for a warm-up (which drains what the kernel and the
//! proxy buffered while connecting), then bytes or round trips are counted over `secs`.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::thread;
use std::time::{Duration, Instant};

use crate::conn::{Conn, Read1, Target};
use crate::procfs;

/// Client read buffer for bulk: large, so the client makes few syscalls per MB.
const BULK_BUF: usize = 256 * 1024;
/// Payload of one round trip.
const RT_PAYLOAD: [u8; 16] = *b"vncgate-bench-16";

/// Warm-up before a counted window: a tenth of it, at least 200 ms.
fn warmup(secs: f64) -> Duration {
    Duration::from_secs_f64((secs / 10.0).max(0.2))
}

/// Opens `n` connections to `t`, sequentially.
fn open_all(t: &Target, n: usize, seed: u64) -> Result<Vec<Conn>, String> {
    (0..n)
        .map(|i| {
            Conn::open(t, seed.wrapping_add(i as u64 * 0x9e37_79b9))
                .map_err(|e| format!("connection {i} of {n}: {e}"))
        })
        .collect()
}

/// Start of the counted window and its end.
struct Window {
    t0: Instant,
    end: Instant,
}

impl Window {
    /// Leaves 50 ms for the workers to spawn, then the warm-up.
    fn new(secs: f64) -> Window {
        let t0 = Instant::now() + Duration::from_millis(50) + warmup(secs);
        Window {
            t0,
            end: t0 + Duration::from_secs_f64(secs),
        }
    }

    fn sleep_until(t: Instant) {
        let now = Instant::now();
        if t > now {
            thread::sleep(t - now);
        }
    }
}

pub struct Throughput {
    /// Aggregate payload rate, 10^6 bytes per second.
    pub mb_s: f64,
    /// Jain's index over per-connection bytes: 1 = perfectly even, 1/n = one takes all.
    pub jain: f64,
    /// The slowest and the fastest connection, 10^6 bytes per second: a frozen desktop
    /// next to fluid ones shows here even when the aggregate and Jain look fine.
    pub min_mb_s: f64,
    pub max_mb_s: f64,
    pub bytes: u64,
    /// Proxy CPU seconds over the window (`None` for direct).
    pub cpu_s: Option<f64>,
}

/// VM -> browser: `n` connections to the bulk route, each reading as fast as it can.
///
/// The connections are opened all at once, one thread each, as viewers arriving together
/// do: a proxy that spreads or moves connections between its threads at accept time gets
/// the burst it meets in production, not a polite sequence.
pub fn throughput(
    t: &Target,
    n: usize,
    secs: f64,
    proxy_pids: &[u32],
    seed: u64,
) -> Result<Throughput, String> {
    // All opened, then the window is set, then everyone reads.
    let opened = Arc::new(std::sync::Barrier::new(n + 1));
    let w = Arc::new(std::sync::OnceLock::<Window>::new());
    let go = Arc::new(std::sync::Barrier::new(n + 1));
    let workers: Vec<_> = (0..n)
        .map(|i| {
            let (w, opened, go, t) = (w.clone(), opened.clone(), go.clone(), t.clone());
            thread::spawn(move || -> Result<u64, String> {
                let conn = Conn::open(&t, seed.wrapping_add(i as u64 * 0x9e37_79b9))
                    .map_err(|e| format!("connection {i} of {n}: {e}"));
                opened.wait();
                go.wait();
                let mut c = conn?;
                let w = w.get().expect("set before go");
                let mut buf = vec![0u8; BULK_BUF];
                let mut counted = 0u64;
                loop {
                    let r = c.read_payload(&mut buf);
                    let now = Instant::now();
                    if now >= w.end {
                        return Ok(counted);
                    }
                    match r {
                        Ok(Read1::Payload(b)) if now >= w.t0 => counted += b,
                        Ok(Read1::Payload(_)) => {}
                        Ok(Read1::Closed) => return Err("proxy closed a bulk stream".into()),
                        Err(e) => return Err(format!("bulk read: {e}")),
                    }
                }
            })
        })
        .collect();
    opened.wait();
    let _ = w.set(Window::new(secs));
    go.wait();
    let w = w.get().expect("just set");
    Window::sleep_until(w.t0);
    let cpu0 = procfs::cpu_seconds(proxy_pids);
    Window::sleep_until(w.end);
    let cpu1 = procfs::cpu_seconds(proxy_pids);
    let per_conn = join_all(workers)?;
    let bytes: u64 = per_conn.iter().sum();
    let rate = |b: u64| b as f64 / secs / 1e6;
    Ok(Throughput {
        mb_s: rate(bytes),
        jain: jain(&per_conn),
        min_mb_s: rate(per_conn.iter().copied().min().unwrap_or(0)),
        max_mb_s: rate(per_conn.iter().copied().max().unwrap_or(0)),
        bytes,
        cpu_s: (!proxy_pids.is_empty()).then_some(cpu1 - cpu0),
    })
}

fn jain(x: &[u64]) -> f64 {
    let sum: f64 = x.iter().map(|&v| v as f64).sum();
    let sq: f64 = x.iter().map(|&v| (v as f64) * (v as f64)).sum();
    if sq == 0.0 {
        0.0
    } else {
        sum * sum / (x.len() as f64 * sq)
    }
}

fn join_all<T>(workers: Vec<thread::JoinHandle<Result<T, String>>>) -> Result<Vec<T>, String> {
    let mut out = Vec::with_capacity(workers.len());
    let mut first_err = None;
    for h in workers {
        match h.join() {
            Ok(Ok(v)) => out.push(v),
            Ok(Err(e)) => {
                first_err.get_or_insert(e);
            }
            Err(_) => {
                first_err.get_or_insert("worker panicked".to_owned());
            }
        }
    }
    match first_err {
        Some(e) => Err(e),
        None => Ok(out),
    }
}

pub struct RoundTrips {
    /// Completed round trips per second, all connections together.
    pub rate: f64,
    pub p50_us: f64,
    pub p99_us: f64,
    /// Mean and worst round trip: a mean far above p50 means rare long stalls.
    pub mean_us: f64,
    pub max_us: f64,
}

/// `n` connections to the echo route, each in lockstep: send 16 bytes, wait for 16 back.
pub fn round_trips(t: &Target, n: usize, secs: f64, seed: u64) -> Result<RoundTrips, String> {
    let conns = open_all(t, n, seed)?;
    let w = Arc::new(Window::new(secs));
    let workers: Vec<_> = conns
        .into_iter()
        .map(|mut c| {
            let w = w.clone();
            thread::spawn(move || -> Result<Vec<u32>, String> {
                let mut buf = vec![0u8; 4096];
                // Nanoseconds per counted round trip; u32 holds up to 4.2 s.
                let mut lat = Vec::with_capacity(1 << 16);
                loop {
                    let start = Instant::now();
                    if start >= w.end {
                        return Ok(lat);
                    }
                    c.send_payload(&RT_PAYLOAD)
                        .and_then(|()| c.read_exact_payload(RT_PAYLOAD.len() as u64, &mut buf))
                        .map_err(|e| format!("round trip: {e}"))?;
                    if start >= w.t0 {
                        let done = Instant::now();
                        if done <= w.end {
                            lat.push((done - start).as_nanos().min(u32::MAX as u128) as u32);
                        }
                    }
                }
            })
        })
        .collect();
    let mut lat: Vec<u32> = join_all(workers)?.into_iter().flatten().collect();
    if lat.is_empty() {
        return Err("no round trip completed in the window".into());
    }
    lat.sort_unstable();
    let pct = |p: f64| lat[((lat.len() - 1) as f64 * p).round() as usize] as f64 / 1e3;
    Ok(RoundTrips {
        rate: lat.len() as f64 / secs,
        p50_us: pct(0.50),
        p99_us: pct(0.99),
        mean_us: lat.iter().map(|&v| v as f64).sum::<f64>() / lat.len() as f64 / 1e3,
        max_us: lat[lat.len() - 1] as f64 / 1e3,
    })
}

pub struct Upgrades {
    /// Completed upgrades (direct: connect + one echo) per second.
    pub rate: f64,
    /// Completed upgrades, and failed attempts.
    pub ok: u64,
    pub failures: u64,
}

/// `connectors` threads, each in a loop for `secs`: open (upgrade), close. With
/// `with_echo` (always for direct) one 16-byte round trip runs before the close, so the
/// figure counts sessions that reached the upstream, not just handshakes: a proxy that dials
/// the upstream only after the `101` (or only on first data) gains nothing from it.
pub fn upgrades(
    t: &Target,
    connectors: usize,
    secs: f64,
    seed: u64,
    with_echo: bool,
) -> Result<Upgrades, String> {
    upgrades_over(std::slice::from_ref(t), connectors, secs, seed, with_echo)
}

/// [`upgrades`] over several routes of one proxy: each connection goes to one of `targets`
/// picked at random, so consecutive upgrades ask for different paths (session ids).
pub fn upgrades_over(
    targets: &[Target],
    connectors: usize,
    secs: f64,
    seed: u64,
    with_echo: bool,
) -> Result<Upgrades, String> {
    if targets.is_empty() {
        return Err("no target to upgrade to".into());
    }
    let tally = Arc::new(Tally::default());
    let start = Instant::now();
    let end = start + Duration::from_secs_f64(secs);
    let workers: Vec<_> = (0..connectors)
        .map(|i| {
            let (targets, tally) = (targets.to_vec(), tally.clone());
            thread::spawn(move || {
                let mut seed = seed.wrapping_add(i as u64) | 1;
                let mut buf = [0u8; 512];
                while Instant::now() < end {
                    seed = seed.wrapping_mul(6_364_136_223_846_793_005).wrapping_add(1);
                    // The high bits of the LCG: its low bits have short periods.
                    let t = &targets[(seed >> 33) as usize % targets.len()];
                    tally.record(open_close(t, seed, with_echo, &mut buf));
                }
            })
        })
        .collect();
    // A connector that panicked stopped counting: its point is wrong, not slower.
    let panicked = join_connectors(workers);
    if panicked > 0 {
        return Err(format!(
            "{panicked} of {connectors} connector threads panicked"
        ));
    }
    let elapsed = start.elapsed().as_secs_f64();
    let (ok, failures) = tally.counts();
    if ok == 0 {
        return Err(format!(
            "no upgrade succeeded ({failures} failed; last: {})",
            tally.last_err()
        ));
    }
    if failures > 0 {
        eprintln!(
            "    upgrades: {failures} failed (last: {})",
            tally.last_err()
        );
    }
    Ok(Upgrades {
        rate: ok as f64 / elapsed,
        ok,
        failures,
    })
}

pub struct UpgradeLatency {
    /// Completed cycles (connect, upgrade, first VM byte, close handshake) per second.
    pub rate: f64,
    /// Connect to the `101` (TLS handshake included for `wss://`), µs; `None` for direct,
    /// which has no upgrade. Paced: from the cycle's due time (see [`Pace`]).
    pub handshake_p50_us: Option<f64>,
    pub handshake_p99_us: Option<f64>,
    /// Connect to the first payload byte from the VM (direct: from the VM itself), µs.
    pub first_byte_p50_us: f64,
    pub first_byte_p99_us: f64,
    /// The close handshake alone: the client's close frame sent to the proxy's close frame
    /// read (direct: the close request to the VM's end of stream), µs. Never counts from the
    /// due time: a paced cycle's lateness is already in its other figures. In a closed loop
    /// this is where a connector waits when it is not waiting in the handshake, so it shows
    /// where each proxy's queue forms.
    pub close_p50_us: f64,
    pub close_p99_us: f64,
    pub ok: u64,
    pub failures: u64,
}

/// When the connectors of [`upgrades_first_byte`] start their cycles.
///
/// A closed loop measures each proxy at its own saturation: every connector starts again as
/// soon as its last cycle ends, so the percentiles are queueing at that proxy's limit, and a
/// proxy whose close is quicker puts more connectors back into the handshake at once and
/// gets a worse handshake p99 at a higher rate. A slow cycle also delays the connector's
/// next one, so the cycles that would have queued behind it are never measured
/// (coordinated omission). Paced, every proxy gets the same offered load, and each cycle's
/// latency runs from when it was due, not from when it started: a proxy that falls behind
/// pays for its backlog in every cycle after it.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Pace {
    /// Each connector starts its next cycle as soon as the last one ends.
    Closed,
    /// Cycles are due at this many per second over all connectors together (open loop);
    /// latencies count from the due time, so lateness is included.
    Offered(f64),
}

impl Pace {
    /// When cycle `k` of connector `i` of `connectors` is due, after the schedule's origin:
    /// `(k * connectors + i) / rate`. The connectors take turns, so the whole schedule is
    /// one cycle every `1 / rate`, and each connector has `connectors / rate` for a cycle
    /// before its next is due. `None` for the closed loop, which has no schedule.
    pub fn due(self, connectors: usize, i: usize, k: u64) -> Option<Duration> {
        match self {
            Pace::Closed => None,
            Pace::Offered(rate) => Some(Duration::from_secs_f64(
                (k * connectors as u64 + i as u64) as f64 / rate,
            )),
        }
    }
}

/// `connectors` threads at once, each in a loop: connect, WebSocket upgrade (direct: none),
/// read until the first payload byte from the upstream (the banner server's RFB version,
/// sent on accept), close handshake (close frame, the proxy's close frame, FIN; direct: FIN,
/// the server's FIN). Cycles that start after the warm-up and end inside the window are
/// counted and timed: the rate, and percentiles of connect to `101` and of connect to the
/// first VM byte (which includes the proxy's dial to the VM). A cycle that fails anywhere,
/// the close included, counts as a failure and not in the figures.
///
/// With [`Pace::Offered`] a connector sleeps until its next cycle is due (the schedule
/// starts with the warm-up), or starts at once if it is late; the time it was late is
/// added to both latencies. That includes the client's own wake-up delay, tens of µs and
/// the same for every proxy. A proxy that keeps up starts each cycle when it is due, so
/// counting by start is counting by due time; one that cannot take the offered rate shows
/// the rate it managed, and latencies that include its backlog, growing over the window.
pub fn upgrades_first_byte(
    t: &Target,
    connectors: usize,
    secs: f64,
    seed: u64,
    pace: Pace,
) -> Result<UpgradeLatency, String> {
    if let Pace::Offered(rate) = pace
        && !(rate.is_finite() && rate > 0.0)
    {
        return Err(format!("offered rate {rate} is not a positive rate"));
    }
    let w = Arc::new(Window::new(secs));
    let tally = Arc::new(Tally::default());
    let workers: Vec<_> = (0..connectors)
        .map(|i| {
            let (t, w, tally) = (t.clone(), w.clone(), tally.clone());
            thread::spawn(move || {
                let mut seed = seed.wrapping_add(i as u64 * 0x9e37_79b9) | 1;
                let mut buf = vec![0u8; 4096];
                // Nanoseconds; u64, because a paced proxy that falls behind can be seconds
                // late.
                let (mut hs, mut fb, mut cl) =
                    (Vec::<u64>::new(), Vec::<u64>::new(), Vec::<u64>::new());
                let origin = w.t0 - warmup(secs);
                Window::sleep_until(origin);
                for k in 0.. {
                    // How late the cycle starts: paced latencies count from its due time.
                    let late = match pace.due(connectors, i, k) {
                        None => Duration::ZERO,
                        Some(d) => {
                            let due = origin + d;
                            Window::sleep_until(due);
                            Instant::now().saturating_duration_since(due)
                        }
                    };
                    let start = Instant::now();
                    if start >= w.end {
                        break;
                    }
                    seed = seed.wrapping_mul(6_364_136_223_846_793_005).wrapping_add(1);
                    let r = first_byte_cycle(&t, seed, &mut buf);
                    let done = Instant::now();
                    // Counted by when the cycle ran, not when it was due: a proxy that is
                    // more than the warm-up behind runs no cycle due inside the window
                    // before the window ends, and would show no figure at all.
                    let counted = start >= w.t0 && done <= w.end;
                    match r {
                        Ok((h, f, c)) if counted => {
                            let ns = |d: Duration| (d + late).as_nanos() as u64;
                            hs.extend(h.map(ns));
                            fb.push(ns(f));
                            cl.push(c.as_nanos() as u64);
                            tally.record(Ok(()));
                        }
                        Ok(_) => {}
                        Err(e) if counted => tally.record(Err(e)),
                        Err(_) => {}
                    }
                }
                (hs, fb, cl)
            })
        })
        .collect();
    let mut hs = Vec::new();
    let mut fb = Vec::new();
    let mut cl = Vec::new();
    let mut panicked = 0;
    for h in workers {
        match h.join() {
            Ok((h, f, c)) => {
                hs.extend(h);
                fb.extend(f);
                cl.extend(c);
            }
            Err(_) => panicked += 1,
        }
    }
    if panicked > 0 {
        return Err(format!(
            "{panicked} of {connectors} connector threads panicked"
        ));
    }
    let (ok, failures) = tally.counts();
    if ok == 0 {
        return Err(format!(
            "no upgrade reached the first VM byte and closed cleanly ({failures} failed; last: {})",
            tally.last_err()
        ));
    }
    if failures > 0 {
        eprintln!(
            "    upgrades x{connectors}: {failures} failed (last: {})",
            tally.last_err()
        );
    }
    let (hs50, hs99) = percentiles_us(&mut hs);
    let (fb50, fb99) = percentiles_us(&mut fb);
    let (cl50, cl99) = percentiles_us(&mut cl);
    Ok(UpgradeLatency {
        rate: ok as f64 / secs,
        handshake_p50_us: hs50,
        handshake_p99_us: hs99,
        first_byte_p50_us: fb50.unwrap_or(0.0),
        first_byte_p99_us: fb99.unwrap_or(0.0),
        close_p50_us: cl50.unwrap_or(0.0),
        close_p99_us: cl99.unwrap_or(0.0),
        ok,
        failures,
    })
}

/// p50 and p99 of nanosecond samples, in µs (nearest rank); `None` without samples.
fn percentiles_us(v: &mut [u64]) -> (Option<f64>, Option<f64>) {
    if v.is_empty() {
        return (None, None);
    }
    v.sort_unstable();
    let pct = |p: f64| v[((v.len() - 1) as f64 * p).round() as usize] as f64 / 1e3;
    (Some(pct(0.50)), Some(pct(0.99)))
}

/// One cycle of [`upgrades_first_byte`]: (connect to 101, `None` for direct; connect to the
/// first VM byte).
fn first_byte_cycle(
    t: &Target,
    seed: u64,
    buf: &mut [u8],
) -> std::io::Result<(Option<Duration>, Duration, Duration)> {
    let start = Instant::now();
    let mut c = Conn::open(t, seed)?;
    let upgraded = t.ws_path.as_ref().map(|_| start.elapsed());
    first_payload(&mut c, buf)?;
    let first = start.elapsed();
    let closing = Instant::now();
    c.close_handshake(buf)?;
    Ok((upgraded, first, closing.elapsed()))
}

/// Upgrades (open, close) to every one of `targets` `times_each` times, spread over
/// `connectors` threads, and no longer than `deadline`: a warm-up whose point is to reach
/// every route a given number of times rather than to run for a while. Returns how many
/// succeeded and failed, and the last error.
pub fn touch_all(
    targets: &[Target],
    times_each: usize,
    connectors: usize,
    deadline: Duration,
    seed: u64,
) -> (u64, u64, String) {
    let total = targets.len() * times_each;
    let next = Arc::new(AtomicU64::new(0));
    let tally = Arc::new(Tally::default());
    let end = Instant::now() + deadline;
    let workers: Vec<_> = (0..connectors)
        .map(|i| {
            let (targets, next, tally) = (targets.to_vec(), next.clone(), tally.clone());
            thread::spawn(move || {
                let mut buf = [0u8; 512];
                loop {
                    let k = next.fetch_add(1, Ordering::Relaxed) as usize;
                    if k >= total || Instant::now() >= end {
                        return;
                    }
                    let seed = seed.wrapping_add((k * connectors + i) as u64 * 0x9e37_79b9);
                    tally.record(open_close(
                        &targets[k % targets.len()],
                        seed,
                        false,
                        &mut buf,
                    ));
                }
            })
        })
        .collect();
    let panicked = join_connectors(workers);
    let (ok, failed) = tally.counts();
    let mut last = tally.last_err();
    if panicked > 0 {
        last = format!("{panicked} connector threads panicked; last error: {last}");
    }
    (ok, failed + panicked as u64, last)
}

/// Joins connector threads; returns how many panicked.
fn join_connectors(workers: Vec<thread::JoinHandle<()>>) -> usize {
    workers
        .into_iter()
        .map(|w| w.join())
        .filter(Result::is_err)
        .count()
}

/// One session as the upgrade points count it: open (upgrade), one 16-byte echo with
/// `with_echo`, close. Direct (`t` is then the banner server): connect, its first bytes,
/// and the close it ends ([`Conn::close_handshake`]): a direct client that sent the first
/// FIN would run out of ports near 14,000 cycles per second and measure the port range.
fn open_close(t: &Target, seed: u64, with_echo: bool, buf: &mut [u8]) -> std::io::Result<()> {
    let mut c = Conn::open(t, seed)?;
    if t.ws_path.is_none() {
        first_payload(&mut c, buf)?;
        return c.close_handshake(buf);
    }
    if with_echo {
        c.send_payload(&RT_PAYLOAD)?;
        c.read_exact_payload(RT_PAYLOAD.len() as u64, buf)?;
    }
    c.close();
    Ok(())
}

/// Reads until the first payload byte arrives.
fn first_payload(c: &mut Conn, buf: &mut [u8]) -> std::io::Result<()> {
    loop {
        match c.read_payload(buf)? {
            Read1::Payload(0) => {}
            Read1::Payload(_) => return Ok(()),
            Read1::Closed => {
                return Err(std::io::Error::new(
                    std::io::ErrorKind::UnexpectedEof,
                    "closed before the first VM byte",
                ));
            }
        }
    }
}

/// Successes and failures of connector threads, and the last failure.
#[derive(Default)]
struct Tally {
    ok: AtomicU64,
    failed: AtomicU64,
    last_err: std::sync::Mutex<Option<String>>,
}

impl Tally {
    fn record(&self, r: std::io::Result<()>) {
        match r {
            Ok(()) => {
                self.ok.fetch_add(1, Ordering::Relaxed);
            }
            Err(e) => {
                self.failed.fetch_add(1, Ordering::Relaxed);
                *self.last_err.lock().unwrap() = Some(e.to_string());
                // Back off a little so a refusing proxy is not hammered in a spin.
                thread::sleep(Duration::from_millis(1));
            }
        }
    }

    fn counts(&self) -> (u64, u64) {
        (
            self.ok.load(Ordering::Relaxed),
            self.failed.load(Ordering::Relaxed),
        )
    }

    fn last_err(&self) -> String {
        self.last_err.lock().unwrap().clone().unwrap_or_default()
    }
}

pub struct IdleMemory {
    pub conns: usize,
    pub rss_kib_per_conn: f64,
    pub pss_kib_per_conn: f64,
    /// Seconds the ramp took.
    pub ramp_s: f64,
}

/// Loopback source addresses of the idle sessions, round-robin: each has its own ephemeral
/// ports, so 10 000 sessions (and the TIME_WAIT of the previous repetitions) do not run the
/// client out of ports towards the proxy's one address.
pub const IDLE_SOURCES: &str = "127.0.0.1-127.0.0.16";
/// Sessions opening at once.
const IDLE_CONCURRENCY: usize = 256;
/// Per session: TCP + upgrade + RFB handshake.
const IDLE_CONNECT_TIMEOUT: Duration = Duration::from_secs(10);
/// Let lazily freed buffers and worker bookkeeping settle before sampling.
const IDLE_SETTLE: Duration = Duration::from_millis(500);

/// The ramp's deadline for `n` sessions: a minute plus 10 ms per session (10 000: 160 s).
pub fn idle_deadline(n: usize) -> Duration {
    Duration::from_secs(60) + Duration::from_millis(10 * n as u64)
}

/// Opens `n` RFB sessions through the proxy's idle route `t` (to the fake VM) with the load
/// tool's idle mode (`vncgate_loadtest::idle`): from [`IDLE_SOURCES`], at most
/// [`IDLE_CONCURRENCY`] opening at once, each through the RFB handshake to ServerInit and
/// then silent. Holds them, and charges the growth of the proxy tree's memory to them. Less
/// than `n` held is an error that says how many were, why the others failed, and what the
/// held ones cost, rather than a figure for a count that was not reached. The ramp stops
/// early once `max(50, n / 100)` sessions failed (a proxy that cannot take more).
pub fn idle_memory(t: &Target, n: usize, proxy_pids: &[u32]) -> Result<IdleMemory, String> {
    use vncgate_loadtest::{dial, idle};
    if proxy_pids.is_empty() {
        return Err("no proxy process".into());
    }
    let Some(url) = t.url() else {
        return Err("idle sessions need a WebSocket route".into());
    };
    let cfg = idle::Config {
        url,
        // `wss://`: the load tool's own rustls client, trusting the run's certificate only.
        tls: t
            .tls
            .as_ref()
            .map_or_else(dial::Tls::default, |c| dial::Tls::CaFile(c.ca_pem.clone())),
        sessions: n,
        sources: dial::parse_sources(IDLE_SOURCES)?,
        concurrency: IDLE_CONCURRENCY,
        connect_timeout: IDLE_CONNECT_TIMEOUT,
        deadline: idle_deadline(n),
        max_failures: Some((n / 100).max(50)),
        ..Default::default()
    };
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .map_err(|e| format!("tokio runtime: {e}"))?;
    let before = procfs::memory(proxy_pids)?;
    rt.block_on(async {
        let sessions = idle::open(&cfg).await.map_err(|e| e.to_string())?;
        let ramp_s = sessions.ramp().as_secs_f64();
        tokio::time::sleep(IDLE_SETTLE).await;
        let after = procfs::memory(proxy_pids)?;
        let held = sessions.sample();
        let tally = sessions.close().await;
        let per = |a: u64, b: u64| (a as f64 - b as f64) / held.max(1) as f64;
        let (rss, pss) = (
            per(after.rss_kib, before.rss_kib),
            per(after.pss_kib, before.pss_kib),
        );
        if held < n {
            let mut why = format!(
                "held {held} of {n} idle sessions after {ramp_s:.1} s; failed: {}",
                tally.summary()
            );
            if held > 0 {
                why.push_str(&format!(
                    "; the {held} held cost {pss:.1} KiB PSS ({rss:.1} KiB RSS) each"
                ));
            }
            return Err(why);
        }
        Ok(IdleMemory {
            conns: n,
            rss_kib_per_conn: rss,
            pss_kib_per_conn: pss,
            ramp_s,
        })
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn paced_schedule_takes_turns_one_cycle_every_period() {
        assert_eq!(Pace::Closed.due(50, 3, 7), None);
        let pace = Pace::Offered(1000.0);
        // Three connectors, four cycles each: one cycle due every millisecond, in turn.
        let mut due: Vec<Duration> = (0..3)
            .flat_map(|i| (0..4).map(move |k| pace.due(3, i, k).unwrap()))
            .collect();
        due.sort();
        let every_ms: Vec<Duration> = (0..12).map(Duration::from_millis).collect();
        assert_eq!(due, every_ms);
        assert_eq!(pace.due(3, 1, 2), Some(Duration::from_millis(7)));
    }

    /// The sockets of /proc/net/tcp in TIME-WAIT, as (local port, remote port).
    fn time_wait() -> Vec<(u16, u16)> {
        let port = |a: &str| u16::from_str_radix(a.rsplit(':').next().unwrap(), 16).unwrap();
        std::fs::read_to_string("/proc/net/tcp")
            .unwrap()
            .lines()
            .skip(1)
            .filter_map(|l| {
                let f: Vec<&str> = l.split_whitespace().collect();
                (f[3] == "06").then(|| (port(f[1]), port(f[2])))
            })
            .collect()
    }

    #[test]
    fn a_direct_cycle_leaves_time_wait_with_the_server_as_a_proxied_one_does() {
        let banner = crate::targets::start().unwrap().banner.unwrap();
        let t = Target::plain(banner, None);
        let mut buf = [0u8; 64];
        let mut c = Conn::open(&t, 1).unwrap();
        let mine = c.local_addr().unwrap().port();
        assert!(matches!(
            c.read_payload(&mut buf).unwrap(),
            Read1::Payload(12)
        ));
        c.close_handshake(&mut buf).unwrap();
        // The server's FIN came first: its side holds TIME-WAIT; ours went to CLOSED.
        let tw = time_wait();
        assert!(
            tw.contains(&(banner.port(), mine)),
            "server side not in TIME-WAIT: {tw:?}"
        );
        assert!(
            !tw.contains(&(mine, banner.port())),
            "the client closed first"
        );
    }

    #[test]
    fn paced_upgrades_count_no_more_cycles_than_were_due() {
        let banner = crate::targets::start().unwrap().banner.unwrap();
        let t = Target::plain(banner, None);
        let (rate, secs) = (200.0, 0.5);
        let u = upgrades_first_byte(&t, 4, secs, 1, Pace::Offered(rate)).unwrap();
        // A cycle starts no earlier than it is due, and a counted one before the window
        // ends: at most the cycles due before then (140 here, one more for rounding), where
        // a closed loop to direct TCP does thousands.
        let due_before_end = rate * (warmup(secs).as_secs_f64() + secs) + 1.0;
        assert!(
            u.ok >= 1 && u.ok as f64 <= due_before_end,
            "{} counted",
            u.ok
        );
        assert_eq!(u.failures, 0);
        assert_eq!(u.rate, u.ok as f64 / secs);
        assert_eq!(u.handshake_p50_us, None, "direct has no upgrade");
        assert!(u.first_byte_p50_us > 0.0 && u.first_byte_p50_us <= u.first_byte_p99_us);
        assert!(upgrades_first_byte(&t, 4, secs, 1, Pace::Offered(0.0)).is_err());
    }
}
