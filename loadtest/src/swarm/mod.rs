//! A swarm of simulated noVNC clients speaking RFB over WebSocket.
//!
//! Each session: TCP connect (and TLS for `wss://`, see [`crate::dial`]) and WebSocket upgrade
//! (no subprotocol unless asked, like current noVNC), the RFB 3.8 handshake, then busy or idle behaviour (see [`client`]). Sessions start
//! spread over the ramp-up, all stop at the end of the run, and everything folds into a
//! [`Report`]. Works against any RFB-over-WebSocket endpoint: the vncgate gateway,
//! websockify, or a test bridge.
//!
//! The protocol is in [`client`] (sans-IO); this file is the tokio/tungstenite edge.

pub mod client;
pub mod report;

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use futures_util::{SinkExt, StreamExt};
use tokio::time::{Instant, sleep_until, timeout, timeout_at};
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::tungstenite::handshake::client::Request;
use tokio_tungstenite::tungstenite::protocol::CloseFrame;
use tokio_tungstenite::tungstenite::protocol::frame::coding::CloseCode;
use tracing::debug;

use crate::dial::{
    ABNORMAL, Dialer, SetupError, Tls, closed_by_server, upgrade_request,
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
    /// Draw a progress bar on stderr.
    pub progress: bool,
}

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
        }
    }
}

/// Whether session `i` of `n` is idle: idle ones are spread evenly, not bunched at the start.
pub fn is_idle(i: usize, fraction: f64) -> bool {
    ((i + 1) as f64 * fraction).floor() > (i as f64 * fraction).floor()
}

/// Live counters for the progress bar.
#[derive(Debug, Default)]
struct Counters {
    open: AtomicU64,
    ok: AtomicU64,
    failed: AtomicU64,
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

    let bar = cfg.progress.then(|| progress_bar(&cfg));
    let mut outcomes = Vec::with_capacity(cfg.sessions);
    // Sessions stop themselves at the deadline; this guard only catches a wedged one.
    let guard = deadline + Duration::from_secs(5);
    let mut tick = tokio::time::interval(Duration::from_millis(250));
    loop {
        tokio::select! {
            joined = tasks.join_next() => match joined {
                Some(Ok(o)) => outcomes.push(o),
                Some(Err(e)) => outcomes.push(SessionOutcome {
                    error: Some("internal_panic".into()),
                    error_detail: Some(e.to_string()),
                    ..Default::default()
                }),
                None => break,
            },
            _ = tick.tick() => {
                if let Some(bar) = &bar {
                    bar.set_position(start.elapsed().as_secs().min(cfg.duration.as_secs()));
                    bar.set_message(format!(
                        "open {} ok {} failed {}",
                        counters.open.load(Ordering::Relaxed),
                        counters.ok.load(Ordering::Relaxed),
                        counters.failed.load(Ordering::Relaxed),
                    ));
                }
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
    if let Some(bar) = bar {
        bar.finish_and_clear();
    }
    Ok(Report::from_outcomes(&outcomes, cfg.duration))
}

fn progress_bar(cfg: &Config) -> indicatif::ProgressBar {
    let bar = indicatif::ProgressBar::new(cfg.duration.as_secs());
    bar.set_style(
        indicatif::ProgressStyle::with_template("{elapsed_precise} [{bar:30}] {pos}/{len}s {msg}")
            .expect("static template")
            .progress_chars("=> "),
    );
    bar
}

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
        idle: !busy,
        ..Default::default()
    };
    sleep_until(start_at).await;
    let fail = |outcome: &mut SessionOutcome, kind: String, detail: String| {
        debug!(session = index, kind, detail, "session failed");
        counters.failed.fetch_add(1, Ordering::Relaxed);
        outcome.error = Some(kind);
        outcome.error_detail = Some(detail);
    };

    let t0 = Instant::now();
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
                if let Err(e) = client.receive(&b, std::time::Instant::now()) {
                    // The server broke RFB: say so in the close frame (RFC 6455 7.4.1, 1002).
                    let close = CloseFrame {
                        code: CloseCode::Protocol,
                        reason: "rfb error".into(),
                    };
                    let bye = sink.send(Message::Close(Some(close)));
                    let _ = timeout(Duration::from_secs(1), bye).await;
                    break Err((e.kind().into(), e.to_string()));
                }
            }
            Some(Ok(Message::Text(_))) => {
                break Err(("ws_text_frame".into(), "server sent a text frame".into()));
            }
            Some(Ok(Message::Close(frame))) => break Err(closed_by_server(frame, "")),
            // Ping/pong: tungstenite answers pings itself.
            Some(Ok(_)) => {}
            Some(Err(e)) => break Err((stream_error_kind(&e), e.to_string())),
            None => {
                break Err((ABNORMAL.into(), "stream ended without a close frame".into()));
            }
        }
    };
    match result {
        Ok(()) => {
            // End of run: close politely, but do not let a slow peer hold up the report.
            let _ = timeout(
                Duration::from_secs(1),
                sink.send(Message::Close(Some(CloseFrame {
                    code: CloseCode::Normal,
                    reason: "load test over".into(),
                }))),
            )
            .await;
        }
        Err((kind, detail)) => fail(&mut outcome, kind, detail),
    }
    counters.open.fetch_sub(1, Ordering::Relaxed);

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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn progress_bar_template_is_valid() {
        let bar = progress_bar(&Config::default());
        assert_eq!(bar.length(), Some(10));
    }

    #[test]
    fn idle_sessions_are_spread() {
        let idle: Vec<usize> = (0..10).filter(|&i| is_idle(i, 0.3)).collect();
        assert_eq!(idle.len(), 3);
        assert!((0..10).all(|i| !is_idle(i, 0.0)));
        assert!((0..10).all(|i| is_idle(i, 1.0)));
    }
}
