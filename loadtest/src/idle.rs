//! Idle scale: open and hold many RFB-over-WebSocket sessions, and say what they cost the
//! process that serves them.
//!
//! Each session connects (from the next `--sources` address, round-robin, when given; TLS
//! for `wss://`), upgrades, and completes the RFB 3.8 handshake through ServerInit. Then it
//! **requests nothing**: no SetPixelFormat, no SetEncodings, no FramebufferUpdateRequest, so
//! the server never sends an update. That is the cheapest state a relay can hold a session
//! in, with both legs connected (the handshake went through to the VM and back). A held
//! session still reads its socket, so pings are answered and a server that closes it is
//! noticed.
//!
//! Connects are ramped with at most `concurrency` sessions opening at once; each has
//! `connect_timeout` for TCP + TLS + upgrade + RFB handshake, and the whole ramp has
//! `deadline`. After the ramp the sessions are held for `hold`, then (when a pid is given)
//! that process's PSS is read from `/proc/PID/smaps_rollup`, the sessions still open are
//! counted as held, and all are closed (close frame 1000).
//!
//! [`open`] and [`Sessions`] are the building blocks for callers that measure something else
//! while the sessions are held (the bench measures a process tree); [`run`] is the
//! `vncgate-loadtest idle` command.

use std::collections::BTreeMap;
use std::fmt;
use std::net::IpAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::time::Duration;

use futures_util::{SinkExt, StreamExt};
use serde::Serialize;
use tokio::sync::{Semaphore, watch};
use tokio::task::JoinSet;
use tokio::time::{Instant, sleep, timeout, timeout_at};
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::tungstenite::handshake::client::Request;
use tokio_tungstenite::tungstenite::protocol::frame::coding::CloseCode;
use tokio_tungstenite::tungstenite::protocol::{CloseFrame, WebSocketConfig};
use tracing::debug;

use crate::dial::{
    ABNORMAL, Dialer, SetupError, Tls, Ws, closed_by_server, upgrade_request, ws_stream_error_kind,
};
use vncgate_rfb::ClientHandshake;

/// Settings of an idle run.
#[derive(Debug, Clone)]
pub struct Config {
    /// `ws://` or `wss://` URL of the RFB-over-WebSocket endpoint.
    pub url: String,
    pub sessions: usize,
    /// Local addresses to connect from, round-robin; empty lets the kernel choose.
    pub sources: Vec<IpAddr>,
    /// Most sessions opening at the same time.
    pub concurrency: usize,
    /// Per session: TCP + TLS + upgrade + RFB handshake through ServerInit.
    pub connect_timeout: Duration,
    /// The whole ramp: sessions not open by then count as failed.
    pub deadline: Duration,
    /// How long the sessions are held after the ramp, before the sample.
    pub hold: Duration,
    /// Process whose PSS is read before the ramp and at the end of the hold.
    pub pid: Option<u32>,
    /// Stop starting sessions once this many failed (a target that cannot take more).
    pub max_failures: Option<usize>,
    pub password: Option<String>,
    /// `Sec-WebSocket-Protocol` to offer; none by default, like noVNC.
    pub subprotocol: Option<String>,
    pub tls: Tls,
    /// Draw a progress bar on stderr during the ramp.
    pub progress: bool,
}

impl Default for Config {
    fn default() -> Config {
        Config {
            url: String::new(),
            sessions: 1000,
            sources: Vec::new(),
            concurrency: 256,
            connect_timeout: Duration::from_secs(10),
            deadline: Duration::from_secs(300),
            hold: Duration::from_secs(1),
            pid: None,
            max_failures: None,
            password: None,
            subprotocol: None,
            tls: Tls::default(),
            progress: false,
        }
    }
}

/// WebSocket buffers of a held session: small, since an idle session receives a few dozen
/// bytes (tungstenite's default is 128 KiB each way, 2.5 GiB of address space at 10k).
fn ws_config() -> WebSocketConfig {
    WebSocketConfig::default()
        .read_buffer_size(4096)
        .write_buffer_size(0)
}

/// How one session ended, or that it was still held at the sample.
#[derive(Debug)]
enum Outcome {
    Held,
    Failed { kind: String, detail: String },
}

/// Shared between the ramp and the session tasks.
struct Shared {
    /// Sessions whose opening is over (open or failed).
    settled: AtomicUsize,
    /// Sessions open now.
    open: AtomicUsize,
    failed: AtomicUsize,
    /// Set when the caller has sampled: a session lost after this still counts as held.
    sampled: AtomicBool,
}

/// Sessions opened by [`open`], held until [`Sessions::close`] (or drop, which aborts them
/// without close frames).
pub struct Sessions {
    tasks: JoinSet<Outcome>,
    shared: Arc<Shared>,
    stop: watch::Sender<bool>,
    /// Outcomes of sessions never started (deadline, too many failures).
    not_started: Vec<(String, String)>,
    requested: usize,
    ramp: Duration,
    nofile: Option<u64>,
}

/// What the sessions did, from the ramp to the close.
#[derive(Debug, Clone, Default)]
pub struct Tally {
    /// Sessions that were open when [`Sessions::sample`] was called.
    pub held: usize,
    /// Error kind (close code, `connect_refused`, `tls_unknown_issuer`, `connect_timeout`,
    /// `deadline_not_started`, ...) -> sessions that failed or were lost that way.
    pub errors: BTreeMap<String, u64>,
    /// One full message per kind in `errors`.
    pub error_examples: BTreeMap<String, String>,
}

impl Tally {
    pub fn failed(&self) -> u64 {
        self.errors.values().sum()
    }

    fn add(&mut self, kind: String, detail: String) {
        *self.errors.entry(kind.clone()).or_insert(0) += 1;
        self.error_examples.entry(kind).or_insert(detail);
    }

    /// `3 connect_timeout, 1 1006` (most frequent first), with one example.
    pub fn summary(&self) -> String {
        let mut kinds: Vec<_> = self.errors.iter().collect();
        kinds.sort_by(|a, b| b.1.cmp(a.1).then(a.0.cmp(b.0)));
        let list: Vec<String> = kinds.iter().map(|(k, n)| format!("{n} {k}")).collect();
        match kinds.first() {
            Some((k, _)) => format!(
                "{} (e.g. {})",
                list.join(", "),
                self.error_examples.get(*k).map_or("", String::as_str)
            ),
            None => "none".into(),
        }
    }
}

impl Sessions {
    /// Sessions open right now.
    pub fn open_now(&self) -> usize {
        self.shared.open.load(Ordering::Acquire)
    }

    /// Sessions requested.
    pub fn requested(&self) -> usize {
        self.requested
    }

    /// How long the ramp took.
    pub fn ramp(&self) -> Duration {
        self.ramp
    }

    /// The open-file limit in force after raising it (`None`: unknown).
    pub fn nofile_limit(&self) -> Option<u64> {
        self.nofile
    }

    /// Marks the moment of measurement: returns the sessions open now, which is the `held`
    /// figure of the [`Tally`]; sessions lost after this still count as held.
    pub fn sample(&self) -> usize {
        self.shared.sampled.store(true, Ordering::Release);
        self.open_now()
    }

    /// Closes every session (close frame 1000, at most a second each, all in parallel) and
    /// tallies them. Call [`Sessions::sample`] first; without it `held` is the count now.
    pub async fn close(mut self) -> Tally {
        let held_at_sample = self.sample();
        let _ = self.stop.send(true);
        let mut tally = Tally::default();
        for (kind, detail) in std::mem::take(&mut self.not_started) {
            tally.add(kind, detail);
        }
        let guard = Instant::now() + Duration::from_secs(5);
        loop {
            match timeout_at(guard, self.tasks.join_next()).await {
                Ok(Some(Ok(Outcome::Held))) => tally.held += 1,
                Ok(Some(Ok(Outcome::Failed { kind, detail }))) => tally.add(kind, detail),
                Ok(Some(Err(e))) => tally.add("internal_panic".into(), e.to_string()),
                Ok(None) => break,
                Err(_) => {
                    // Still closing after the guard: they were held; abort the stragglers.
                    tally.held += self.tasks.len();
                    self.tasks.abort_all();
                    break;
                }
            }
        }
        debug!(held_at_sample, held = tally.held, "idle sessions closed");
        tally
    }
}

/// Opens `cfg.sessions` sessions (ramp bounded by `cfg.deadline`) and returns them held.
/// Raises `RLIMIT_NOFILE` to the hard limit first.
pub async fn open(cfg: &Config) -> Result<Sessions, SetupError> {
    let (request, secure) = upgrade_request(&cfg.url, cfg.subprotocol.as_deref())?;
    if cfg.concurrency == 0 {
        return Err(SetupError::BadSetting(
            "concurrency must be at least 1".into(),
        ));
    }
    if cfg.connect_timeout.is_zero() || cfg.deadline.is_zero() {
        return Err(SetupError::BadSetting(
            "connect timeout and deadline must be positive".into(),
        ));
    }
    let dialer = Arc::new(
        Dialer::new(secure, &cfg.tls, Some(ws_config()), true).map_err(SetupError::BadSetting)?,
    );
    let nofile = crate::limits::raise_nofile();
    if let Some(limit) = nofile
        && (limit as usize) < cfg.sessions + 64
    {
        tracing::warn!(
            limit,
            sessions = cfg.sessions,
            "open-file limit is below one descriptor per session; expect emfile errors"
        );
    }

    let shared = Arc::new(Shared {
        settled: AtomicUsize::new(0),
        open: AtomicUsize::new(0),
        failed: AtomicUsize::new(0),
        sampled: AtomicBool::new(false),
    });
    let (stop, stop_rx) = watch::channel(false);
    let password: Option<Arc<[u8]>> = cfg.password.as_ref().map(|p| p.as_bytes().into());
    let sem = Arc::new(Semaphore::new(cfg.concurrency));
    let start = Instant::now();
    let deadline = start + cfg.deadline;
    let bar = cfg.progress.then(|| progress_bar(cfg.sessions));
    let mut tasks = JoinSet::new();
    let mut not_started = Vec::new();
    for i in 0..cfg.sessions {
        let permit = match timeout_at(deadline, Arc::clone(&sem).acquire_owned()).await {
            Ok(Ok(p)) => Some(p),
            _ => None,
        };
        let too_many = cfg
            .max_failures
            .is_some_and(|m| shared.failed.load(Ordering::Acquire) >= m);
        let Some(permit) = permit.filter(|_| !too_many && Instant::now() < deadline) else {
            let (kind, detail) = if too_many {
                (
                    "not_started_after_failures",
                    format!(
                        "not started: {} sessions had failed already",
                        shared.failed.load(Ordering::Acquire)
                    ),
                )
            } else {
                (
                    "deadline_not_started",
                    format!("not started within the {:?} deadline", cfg.deadline),
                )
            };
            not_started.extend((i..cfg.sessions).map(|_| (kind.to_owned(), detail.clone())));
            break;
        };
        if let Some(bar) = &bar {
            bar.set_position(shared.settled.load(Ordering::Relaxed) as u64);
            bar.set_message(format!(
                "open {} failed {}",
                shared.open.load(Ordering::Relaxed),
                shared.failed.load(Ordering::Relaxed)
            ));
        }
        let source = (!cfg.sources.is_empty()).then(|| cfg.sources[i % cfg.sources.len()]);
        let limit = (Instant::now() + cfg.connect_timeout).min(deadline);
        let ctx = SessionCtx {
            index: i,
            request: request.clone(),
            source,
            password: password.clone(),
            dialer: Arc::clone(&dialer),
            shared: Arc::clone(&shared),
            stop: stop_rx.clone(),
            limit,
            at_deadline: limit == deadline,
        };
        tasks.spawn(session(ctx, permit));
    }
    // Every started session settles by its own limit (at the latest the deadline).
    let spawned = tasks.len();
    let guard = deadline + Duration::from_secs(2);
    while shared.settled.load(Ordering::Acquire) < spawned && Instant::now() < guard {
        if let Some(bar) = &bar {
            bar.set_position(shared.settled.load(Ordering::Relaxed) as u64);
        }
        sleep(Duration::from_millis(10)).await;
    }
    if let Some(bar) = bar {
        bar.finish_and_clear();
    }
    Ok(Sessions {
        tasks,
        shared,
        stop,
        not_started,
        requested: cfg.sessions,
        ramp: start.elapsed(),
        nofile,
    })
}

fn progress_bar(n: usize) -> indicatif::ProgressBar {
    let bar = indicatif::ProgressBar::new(n as u64);
    bar.set_style(
        indicatif::ProgressStyle::with_template("{elapsed_precise} [{bar:30}] {pos}/{len} {msg}")
            .expect("static template")
            .progress_chars("=> "),
    );
    bar
}

struct SessionCtx {
    index: usize,
    request: Request,
    source: Option<IpAddr>,
    password: Option<Arc<[u8]>>,
    dialer: Arc<Dialer>,
    shared: Arc<Shared>,
    stop: watch::Receiver<bool>,
    /// End of this session's opening: connect timeout or the ramp's deadline.
    limit: Instant,
    at_deadline: bool,
}

/// One session: open (holding a ramp permit), then hold until stopped.
async fn session(mut ctx: SessionCtx, permit: tokio::sync::OwnedSemaphorePermit) -> Outcome {
    let opened = timeout_at(
        ctx.limit,
        open_one(
            &ctx.dialer,
            ctx.request.clone(),
            ctx.source,
            ctx.password.as_deref(),
        ),
    )
    .await;
    let failure = match opened {
        Ok(Ok(ws)) => Ok(ws),
        Ok(Err(e)) => Err(e),
        Err(_) => {
            let detail = if ctx.at_deadline {
                "connect + upgrade + RFB handshake did not finish before the overall deadline"
            } else {
                "connect + upgrade + RFB handshake did not finish within the connect timeout"
            };
            Err(("connect_timeout".to_owned(), detail.to_owned()))
        }
    };
    // Counters first, permit last: the ramp checks the failure count once it has a permit.
    let mut ws = match failure {
        Ok(ws) => {
            ctx.shared.open.fetch_add(1, Ordering::AcqRel);
            ctx.shared.settled.fetch_add(1, Ordering::AcqRel);
            drop(permit);
            ws
        }
        Err((kind, detail)) => {
            debug!(
                session = ctx.index,
                kind, detail, "idle session failed to open"
            );
            ctx.shared.failed.fetch_add(1, Ordering::AcqRel);
            ctx.shared.settled.fetch_add(1, Ordering::AcqRel);
            drop(permit);
            return Outcome::Failed { kind, detail };
        }
    };

    let lost = loop {
        tokio::select! {
            () = stopped(&mut ctx.stop) => {
                let bye = ws.close(Some(CloseFrame {
                    code: CloseCode::Normal,
                    reason: "load test over".into(),
                }));
                let _ = timeout(Duration::from_secs(1), bye).await;
                ctx.shared.open.fetch_sub(1, Ordering::AcqRel);
                return Outcome::Held;
            }
            msg = ws.next() => match msg {
                // Pings are answered by tungstenite; anything else an idle client ignores.
                Some(Ok(Message::Close(frame))) => break closed_by_server(frame, " while held"),
                Some(Ok(_)) => {}
                Some(Err(e)) => break (ws_stream_error_kind(&e), format!("lost while held: {e}")),
                None => break (ABNORMAL.into(), "stream ended while held, without a close frame".into()),
            }
        }
    };
    ctx.shared.open.fetch_sub(1, Ordering::AcqRel);
    if ctx.shared.sampled.load(Ordering::Acquire) {
        debug!(
            session = ctx.index,
            kind = lost.0,
            "idle session lost after the sample"
        );
        return Outcome::Held;
    }
    debug!(
        session = ctx.index,
        kind = lost.0,
        detail = lost.1,
        "idle session lost"
    );
    Outcome::Failed {
        kind: lost.0,
        detail: lost.1,
    }
}

/// Resolves once the stop flag is set (or its sender is gone).
async fn stopped(stop: &mut watch::Receiver<bool>) {
    let _ = stop.wait_for(|stop| *stop).await;
}

/// Connect, upgrade, RFB handshake through ServerInit; nothing is sent after it.
async fn open_one(
    dialer: &Dialer,
    request: Request,
    source: Option<IpAddr>,
    password: Option<&[u8]>,
) -> Result<Ws, (String, String)> {
    let (mut ws, _response) = dialer
        .connect(request, source)
        .await
        .map_err(|e| (e.kind(), e.to_string()))?;
    let mut hs = ClientHandshake::new(password, true);
    let mut buf = Vec::new();
    loop {
        let out = hs.take_output();
        if !out.is_empty() {
            ws.send(Message::binary(out))
                .await
                .map_err(|e| (ws_stream_error_kind(&e), e.to_string()))?;
        }
        if hs.is_done() {
            return Ok(ws);
        }
        match ws.next().await {
            Some(Ok(Message::Binary(b))) => {
                buf.extend_from_slice(&b);
                let used = hs
                    .receive(&buf)
                    .map_err(|e| (e.kind().to_owned(), e.to_string()))?;
                buf.drain(..used);
            }
            Some(Ok(Message::Text(_))) => {
                return Err(("ws_text_frame".into(), "server sent a text frame".into()));
            }
            Some(Ok(Message::Close(frame))) => {
                return Err(closed_by_server(frame, " during the RFB handshake"));
            }
            Some(Ok(_)) => {}
            Some(Err(e)) => return Err((ws_stream_error_kind(&e), e.to_string())),
            None => {
                return Err((
                    ABNORMAL.into(),
                    "stream ended during the RFB handshake".into(),
                ));
            }
        }
    }
}

/// PSS of one process in KiB (see [`crate::procmem`]); `None` when it cannot be read.
pub fn pss_kib(pid: u32) -> Option<u64> {
    crate::procmem::read(pid).ok().map(|m| m.pss_kib)
}

/// The result of an idle run. With `--json` this is the last line on stdout.
#[derive(Debug, Clone, Serialize)]
pub struct Report {
    /// Sessions requested.
    pub sessions: usize,
    /// Sessions open (RFB handshake done) at the end of the hold, when PSS was sampled.
    pub held: usize,
    /// `sessions - held`: failed to open, not started, or lost before the sample.
    pub failed: usize,
    /// Error kind -> sessions; see [`Tally::errors`].
    pub errors: BTreeMap<String, u64>,
    pub error_examples: BTreeMap<String, String>,
    /// PSS of `--pid` before the ramp and at the end of the hold, in KiB (`null` without
    /// `--pid`; an unreadable `--pid` fails the run before the ramp, and one that died
    /// during the hold leaves `pss_after_kib` null).
    pub pss_before_kib: Option<u64>,
    pub pss_after_kib: Option<u64>,
    /// `(pss_after - pss_before) / held`.
    pub pss_per_session_kib: Option<f64>,
    /// The whole run: ramp, hold and close.
    pub elapsed_s: f64,
    /// The ramp alone.
    pub ramp_s: f64,
    pub hold_s: f64,
    /// Source addresses used (0: the kernel's choice).
    pub sources: usize,
    /// Our open-file limit after raising it.
    pub nofile_limit: Option<u64>,
}

impl Report {
    pub fn to_json_line(&self) -> String {
        serde_json::to_string(self).expect("report serializes")
    }
}

impl fmt::Display for Report {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        writeln!(
            f,
            "sessions      {} held, {} failed of {} (ramp {:.1} s, held {:.1} s, {} source addresses)",
            self.held, self.failed, self.sessions, self.ramp_s, self.hold_s, self.sources
        )?;
        let kib = |v: Option<u64>| v.map_or("-".to_owned(), |v| format!("{v} KiB"));
        match self.pss_per_session_kib {
            Some(per) => writeln!(
                f,
                "pss           {} before, {} after: {per:.1} KiB per held session",
                kib(self.pss_before_kib),
                kib(self.pss_after_kib)
            )?,
            None => writeln!(
                f,
                "pss           {} before, {} after",
                kib(self.pss_before_kib),
                kib(self.pss_after_kib)
            )?,
        }
        if self.errors.is_empty() {
            write!(f, "errors        none")
        } else {
            write!(f, "errors")?;
            for (kind, n) in &self.errors {
                write!(f, "\n  {kind:<26} {n:>7}")?;
                if let Some(example) = self.error_examples.get(kind) {
                    write!(f, "  e.g. {example}")?;
                }
            }
            Ok(())
        }
    }
}

/// `vncgate-loadtest idle`: PSS before, ramp, hold, PSS after, close, report.
pub async fn run(cfg: &Config) -> Result<Report, SetupError> {
    let t0 = Instant::now();
    // A `--pid` whose memory cannot be read is a setting that cannot work: refused before
    // the ramp, never reported as a figure.
    let read = |pid: u32| {
        crate::procmem::read(pid)
            .map(|m| m.pss_kib)
            .map_err(|e| SetupError::BadSetting(format!("--pid {pid}: {e}")))
    };
    let before = cfg.pid.map(read).transpose()?;
    let sessions = open(cfg).await?;
    let ramp = sessions.ramp();
    let nofile = sessions.nofile_limit();
    sleep(cfg.hold).await;
    // The process may have died meanwhile: then the figure is missing (null) and says so.
    let after = match cfg.pid.map(read).transpose() {
        Ok(a) => a,
        Err(e) => {
            tracing::warn!(error = %e, "cannot read the target's memory after the hold");
            None
        }
    };
    let held = sessions.sample();
    let tally = sessions.close().await;
    let per = match (before, after) {
        (Some(b), Some(a)) if held > 0 => Some((a as f64 - b as f64) / held as f64),
        _ => None,
    };
    Ok(Report {
        sessions: cfg.sessions,
        held,
        failed: cfg.sessions - held,
        errors: tally.errors,
        error_examples: tally.error_examples,
        pss_before_kib: before,
        pss_after_kib: after,
        pss_per_session_kib: per,
        elapsed_s: t0.elapsed().as_secs_f64(),
        ramp_s: ramp.as_secs_f64(),
        hold_s: cfg.hold.as_secs_f64(),
        sources: cfg.sources.len(),
        nofile_limit: nofile,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pss_of_this_process_is_read() {
        let pss = pss_kib(std::process::id()).expect("smaps_rollup readable");
        assert!(pss > 0);
        assert_eq!(pss_kib(u32::MAX), None);
    }

    #[test]
    fn tally_summary_puts_the_most_frequent_first() {
        let mut t = Tally::default();
        t.add("1006".into(), "lost".into());
        t.add("connect_timeout".into(), "slow".into());
        t.add("connect_timeout".into(), "slower".into());
        assert_eq!(t.failed(), 3);
        assert_eq!(t.summary(), "2 connect_timeout, 1 1006 (e.g. slow)");
        assert_eq!(Tally::default().summary(), "none");
    }

    #[test]
    fn report_json_has_the_documented_fields() {
        let r = Report {
            sessions: 2,
            held: 1,
            failed: 1,
            errors: [("connect_refused".to_owned(), 1)].into(),
            error_examples: BTreeMap::new(),
            pss_before_kib: Some(1000),
            pss_after_kib: Some(1010),
            pss_per_session_kib: Some(10.0),
            elapsed_s: 1.5,
            ramp_s: 0.5,
            hold_s: 1.0,
            sources: 2,
            nofile_limit: Some(1024),
        };
        let v: serde_json::Value = serde_json::from_str(&r.to_json_line()).unwrap();
        for field in [
            "sessions",
            "held",
            "failed",
            "errors",
            "pss_before_kib",
            "pss_after_kib",
            "pss_per_session_kib",
            "elapsed_s",
        ] {
            assert!(!v[field].is_null(), "{field}");
        }
        assert!(r.to_string().contains("10.0 KiB per held session"));
    }
}
