//! A swarm of simulated noVNC clients speaking RFB over WebSocket.
//!
//! Each session: TCP connect (and TLS for `wss://`, see [`crate::dial`]) and WebSocket upgrade
//! (no subprotocol unless asked, like current noVNC), the RFB 3.8 handshake, then busy or idle behaviour (see [`client`]). Sessions start
//! spread over the ramp-up, all stop at the end of the run, and everything folds into a
//! [`Report`]. Works against any RFB-over-WebSocket endpoint: the vncgate gateway,
//! websockify, or a test bridge.
//!
//! At the end of the run every session closes with the close handshake (RFC 6455 7.1.2):
//! 1000, then it reads on until the server's close frame. Dropping the socket instead
//! would reset it while frames are still in flight (a socket closed with unread data sends
//! RST), and a gateway writing to it would see a vanished browser (1006) rather than a
//! close.
//!
//! The protocol is in [`client`] (sans-IO); this file is the tokio/tungstenite edge, and
//! [`progress`] the text a terminal shows while it runs.

pub mod client;
pub mod progress;
pub mod report;

use std::collections::BTreeMap;
use std::io::Write as _;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use futures_util::stream::{SplitSink, SplitStream};
use futures_util::{SinkExt, StreamExt};
use tokio::time::{Instant, sleep_until, timeout, timeout_at};
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::tungstenite::handshake::client::Request;
use tokio_tungstenite::tungstenite::protocol::CloseFrame;
use tokio_tungstenite::tungstenite::protocol::frame::coding::CloseCode;
use tracing::debug;

use crate::dial::{
    ABNORMAL, Dialer, SetupError, Tls, Ws, closed_by_server, upgrade_request,
    ws_stream_error_kind as stream_error_kind,
};
use client::{ClientConfig, SimClient};
pub use report::{Report, SessionOutcome};

/// Swarm settings.
#[derive(Debug, Clone)]
pub struct Config {
    /// `ws://host:port/path?query` (or `wss://`) of the RFB-over-WebSocket endpoint.
    pub url: String,
    pub sessions: usize,
    /// The whole run, ramp-up included; every session stops at its end.
    pub duration: Duration,
    /// Session starts are spread evenly over this.
    pub ramp_up: Duration,
    /// Share of sessions (0..=1) that park after their first update.
    pub idle_fraction: f64,
    /// Input events per second per busy session; 0 sends none.
    pub input_rate: f64,
    pub password: Option<String>,
    /// `Sec-WebSocket-Protocol` to offer (e.g. `binary`); `None` offers none.
    pub subprotocol: Option<String>,
    /// Limit on TCP connect + WebSocket upgrade per session.
    pub connect_timeout: Duration,
    /// How `wss://` servers are authenticated (unused for `ws://`).
    pub tls: Tls,
    /// Redraw a progress line on stderr (`\r`) every [`PROGRESS_EVERY`]: for a terminal.
    pub progress: bool,
    /// Print a line on stderr for each failed session (the first few of each kind, see
    /// [`progress::failure_line`]), with its close code and reason.
    pub print_failures: bool,
}

/// How often the progress line is redrawn.
pub const PROGRESS_EVERY: Duration = Duration::from_millis(250);

/// How long a session waits for the server's close frame after sending its own at the end
/// of the run (or after a protocol error) before it gives up (`close_timeout`).
pub const CLOSE_GRACE: Duration = Duration::from_secs(2);

impl Default for Config {
    fn default() -> Config {
        Config {
            url: String::new(),
            sessions: 10,
            duration: Duration::from_secs(10),
            ramp_up: Duration::ZERO,
            idle_fraction: 0.0,
            input_rate: 10.0,
            password: None,
            subprotocol: None,
            connect_timeout: Duration::from_secs(10),
            tls: Tls::default(),
            progress: false,
            print_failures: false,
        }
    }
}

/// Whether session `i` of `n` is idle: idle ones are spread evenly, not bunched at the start.
pub fn is_idle(i: usize, fraction: f64) -> bool {
    ((i + 1) as f64 * fraction).floor() > (i as f64 * fraction).floor()
}

/// Live counters for the progress line (failures are counted as sessions end, from their
/// outcomes).
#[derive(Debug, Default)]
struct Counters {
    /// Sessions with an open WebSocket.
    open: AtomicU64,
    /// Sessions that received their first update.
    ok: AtomicU64,
    /// WebSocket payload bytes received so far, all sessions.
    bytes: AtomicU64,
}

/// Runs the swarm to the end of `cfg.duration` and reports.
pub async fn run(cfg: Config) -> Result<Report, SetupError> {
    let (request, secure) = upgrade_request(&cfg.url, cfg.subprotocol.as_deref())?;
    if cfg.duration.is_zero() || cfg.ramp_up >= cfg.duration {
        return Err(SetupError::BadSetting(
            "duration must be positive and longer than the ramp-up".into(),
        ));
    }
    if !(0.0..=1.0).contains(&cfg.idle_fraction) {
        return Err(SetupError::BadSetting(
            "idle fraction must be in 0..=1".into(),
        ));
    }
    if !(cfg.input_rate >= 0.0 && cfg.input_rate.is_finite()) {
        return Err(SetupError::BadSetting("input rate must be >= 0".into()));
    }
    // disable_nagle: input events and probes are small and latency-sensitive.
    let dialer =
        Arc::new(Dialer::new(secure, &cfg.tls, None, true).map_err(SetupError::BadSetting)?);
    crate::limits::raise_nofile();

    let cfg = Arc::new(cfg);
    let counters = Arc::new(Counters::default());
    let start = Instant::now();
    let deadline = start + cfg.duration;
    let mut tasks = tokio::task::JoinSet::new();
    for i in 0..cfg.sessions {
        let offset = if cfg.sessions > 1 {
            cfg.ramp_up.mul_f64(i as f64 / cfg.sessions as f64)
        } else {
            Duration::ZERO
        };
        tasks.spawn(session(
            i,
            Arc::clone(&cfg),
            request.clone(),
            Arc::clone(&dialer),
            start + offset,
            deadline,
            Arc::clone(&counters),
        ));
    }

    let mut outcomes = Vec::with_capacity(cfg.sessions);
    let mut failures: BTreeMap<String, u64> = BTreeMap::new();
    let mut drawn = false;
    let (mut last_bytes, mut last_at) = (0u64, start);
    // Sessions stop themselves at the deadline (and close within CLOSE_GRACE); this guard
    // only catches a wedged one.
    let guard = deadline + CLOSE_GRACE + Duration::from_secs(3);
    let mut tick = tokio::time::interval(PROGRESS_EVERY);
    loop {
        tokio::select! {
            joined = tasks.join_next() => {
                let o = match joined {
                    Some(Ok(o)) => o,
                    Some(Err(e)) => SessionOutcome {
                        error: Some("internal_panic".into()),
                        error_detail: Some(e.to_string()),
                        ..Default::default()
                    },
                    None => break,
                };
                if let Some(kind) = &o.error {
                    let seen = failures.entry(kind.clone()).or_insert(0);
                    *seen += 1;
                    let detail = o.error_detail.as_deref().unwrap_or("");
                    let text = progress::failure_line(o.index, o.lasted, kind, detail, *seen);
                    if let (true, Some(text)) = (cfg.print_failures, text) {
                        // Over the progress line, which the next tick redraws below it.
                        let clear = if drawn { "\r\x1b[K" } else { "" };
                        eprintln!("{clear}vncgate-loadtest: swarm: {text}");
                    }
                }
                outcomes.push(o);
            }
            _ = tick.tick(), if cfg.progress => {
                let now = Instant::now();
                let bytes = counters.bytes.load(Ordering::Relaxed);
                let dt = (now - last_at).as_secs_f64();
                let snap = progress::Snapshot {
                    elapsed: now - start,
                    duration: cfg.duration,
                    up: counters.open.load(Ordering::Relaxed),
                    target: cfg.sessions,
                    ok: counters.ok.load(Ordering::Relaxed),
                    failures: failures.clone(),
                    mb_s: if dt > 0.0 { (bytes - last_bytes) as f64 / dt / 1e6 } else { 0.0 },
                };
                (last_bytes, last_at) = (bytes, now);
                let mut err = std::io::stderr().lock();
                let _ = write!(err, "\r\x1b[K{}", progress::line(&snap));
                let _ = err.flush();
                drawn = true;
            }
            _ = sleep_until(guard) => {
                let stuck = tasks.len();
                tasks.abort_all();
                outcomes.extend((0..stuck).map(|_| SessionOutcome {
                    error: Some("stuck".into()),
                    error_detail: Some("session did not stop at the deadline".into()),
                    ..Default::default()
                }));
                break;
            }
        }
    }
    if drawn {
        eprint!("\r\x1b[K");
    }
    Ok(Report::from_outcomes(&outcomes, cfg.duration))
}

type Sink = SplitSink<Ws, Message>;
type Source = SplitStream<Ws>;

async fn session(
    index: usize,
    cfg: Arc<Config>,
    request: Request,
    dialer: Arc<Dialer>,
    start_at: Instant,
    deadline: Instant,
    counters: Arc<Counters>,
) -> SessionOutcome {
    let busy = !is_idle(index, cfg.idle_fraction);
    let mut outcome = SessionOutcome {
        index,
        idle: !busy,
        ..Default::default()
    };
    sleep_until(start_at).await;
    let t0 = Instant::now();
    let fail = |outcome: &mut SessionOutcome, kind: String, detail: String| {
        debug!(session = index, kind, detail, "session failed");
        outcome.error = Some(kind);
        outcome.error_detail = Some(detail);
        outcome.lasted = t0.elapsed();
    };

    let limit = t0
        + cfg
            .connect_timeout
            .min(deadline.saturating_duration_since(t0));
    let ws = match timeout_at(limit, dialer.connect(request, None)).await {
        Ok(Ok((ws, _response))) => ws,
        Ok(Err(e)) => {
            fail(&mut outcome, e.kind(), e.to_string());
            return outcome;
        }
        Err(_) => {
            fail(
                &mut outcome,
                "connect_timeout".into(),
                "connect + upgrade did not finish in time".into(),
            );
            return outcome;
        }
    };
    let opened = Instant::now();
    outcome.connect = Some(opened - t0);
    counters.open.fetch_add(1, Ordering::Relaxed);

    let (mut sink, mut stream) = ws.split();
    let input_interval =
        (busy && cfg.input_rate > 0.0).then(|| Duration::from_secs_f64(1.0 / cfg.input_rate));
    let mut client = SimClient::new(ClientConfig {
        id: index,
        password: cfg.password.as_ref().map(|p| p.as_bytes().to_vec()),
        busy,
        input_interval,
    });
    let far = deadline + Duration::from_secs(3600);
    let mut counted_ok = false;
    let result: Result<(), (String, String)> = loop {
        let out = client.take_output();
        if !out.is_empty() {
            match timeout_at(deadline, sink.send(Message::binary(out))).await {
                Ok(Ok(())) => {}
                Ok(Err(e)) => break Err((stream_error_kind(&e), e.to_string())),
                Err(_) => break Ok(()),
            }
        }
        if !counted_ok && client.stats().updates > 0 {
            counted_ok = true;
            counters.ok.fetch_add(1, Ordering::Relaxed);
        }
        let wake = client.poll_timeout().map_or(far, Instant::from_std);
        let event = tokio::select! {
            _ = sleep_until(deadline) => break Ok(()),
            _ = sleep_until(wake) => None,
            msg = stream.next() => Some(msg),
        };
        let Some(msg) = event else {
            client.handle_timeout(std::time::Instant::now());
            continue;
        };
        match msg {
            Some(Ok(Message::Binary(b))) => {
                outcome.bytes += b.len() as u64;
                counters.bytes.fetch_add(b.len() as u64, Ordering::Relaxed);
                if let Err(e) = client.receive(&b, std::time::Instant::now()) {
                    // The server broke RFB: say so in the close frame (RFC 6455 7.4.1, 1002).
                    let _ =
                        close_handshake(&mut sink, &mut stream, CloseCode::Protocol, "rfb error")
                            .await;
                    break Err((e.kind().into(), e.to_string()));
                }
            }
            Some(Ok(Message::Text(_))) => {
                break Err(("ws_text_frame".into(), "server sent a text frame".into()));
            }
            Some(Ok(Message::Close(frame))) => {
                // tungstenite has queued the reply to the server's close; send it before the
                // socket goes, so the server's side of the handshake completes too.
                let _ = timeout(CLOSE_GRACE, sink.close()).await;
                break Err(closed_by_server(frame, ""));
            }
            // Ping/pong: tungstenite answers pings itself.
            Some(Ok(_)) => {}
            Some(Err(e)) => break Err((stream_error_kind(&e), e.to_string())),
            None => {
                break Err((ABNORMAL.into(), "stream ended without a close frame".into()));
            }
        }
    };
    let result = match result {
        // End of run: a clean close, the server's close frame awaited.
        Ok(()) => {
            close_handshake(&mut sink, &mut stream, CloseCode::Normal, "load test over").await
        }
        Err(e) => Err(e),
    };
    if let Err((kind, detail)) = result {
        fail(&mut outcome, kind, detail);
    }
    counters.open.fetch_sub(1, Ordering::Relaxed);
    if outcome.error.is_none() {
        outcome.lasted = t0.elapsed();
    }

    let s = client.stats();
    outcome.handshake = s
        .handshake_done
        .map(|t| t.saturating_duration_since(opened.into_std()));
    outcome.updates = s.updates;
    outcome.inputs_sent = s.inputs_sent;
    outcome.rtts = s.rtts.clone();
    outcome.probes_lost = s.probes_lost;
    outcome
}

/// The client's side of the close handshake (RFC 6455 7.1.2): sends a close frame with
/// `code` and `reason`, then reads, discarding data still in flight, until the server's
/// close frame, within [`CLOSE_GRACE`]. Only then may the socket go: dropped earlier, with
/// frames unread, it is reset, and the server counts a browser that vanished (1006) instead
/// of one that closed. Errors: the close could not be sent, the connection ended without the
/// server's close frame (`1006`), or none came in time (`close_timeout`).
async fn close_handshake(
    sink: &mut Sink,
    stream: &mut Source,
    code: CloseCode,
    reason: &str,
) -> Result<(), (String, String)> {
    let end = Instant::now() + CLOSE_GRACE;
    let frame = CloseFrame {
        code,
        reason: reason.to_owned().into(),
    };
    match timeout_at(end, sink.send(Message::Close(Some(frame)))).await {
        Ok(Ok(())) => {}
        Ok(Err(e)) => return Err((stream_error_kind(&e), format!("sending our close: {e}"))),
        Err(_) => return Err(close_timeout("our close frame could not be sent within")),
    }
    loop {
        match timeout_at(end, stream.next()).await {
            Err(_) => return Err(close_timeout("no close frame from the server within")),
            Ok(Some(Ok(Message::Close(_)))) => return Ok(()),
            Ok(Some(Ok(_))) => {}
            Ok(Some(Err(e))) => {
                return Err((
                    stream_error_kind(&e),
                    format!("waiting for the server's close frame: {e}"),
                ));
            }
            Ok(None) => {
                return Err((
                    ABNORMAL.into(),
                    "stream ended before the server's close frame".into(),
                ));
            }
        }
    }
}

/// `what` ends in "within": the grace period follows.
fn close_timeout(what: &str) -> (String, String) {
    (
        "close_timeout".into(),
        format!("{what} {} s", CLOSE_GRACE.as_secs_f64()),
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn idle_sessions_are_spread() {
        let idle: Vec<usize> = (0..10).filter(|&i| is_idle(i, 0.3)).collect();
        assert_eq!(idle.len(), 3);
        assert!((0..10).all(|i| !is_idle(i, 0.0)));
        assert!((0..10).all(|i| is_idle(i, 1.0)));
    }
}
