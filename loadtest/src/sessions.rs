//! `vncgate-loadtest sessions`: the session-level load test. Each of `concurrency` workers
//! takes sessions until `sessions` were started, and for each: creates it on the controller
//! (`POST /api/sessions`), waits for `ready` (the API's wait), opens a viewer through the
//! gateway at the session's `ws_path` with its token, completes the RFB handshake and waits
//! for the first framebuffer update, holds the viewer for `hold`, closes it cleanly (1000),
//! and deletes the session. It reports create-to-ready and create-to-first-framebuffer
//! percentiles, failures by reason, and sessions per second; as a table or one JSON line.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::sync::Mutex;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use futures_util::{SinkExt, StreamExt};
use serde_json::{Value, json};
use tokio::time::{Instant, timeout, timeout_at};
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::tungstenite::protocol::CloseFrame;
use tokio_tungstenite::tungstenite::protocol::frame::coding::CloseCode;

use crate::dial::{Dialer, Tls, upgrade_request, ws_stream_error_kind};
use crate::stats::Percentiles;
use crate::swarm::client::{ClientConfig, SimClient};

#[derive(Debug, Clone)]
pub struct Config {
    /// The controller's API, `http://host:port`.
    pub controller: String,
    /// The gateway, `ws://host:port` or `wss://host:port`.
    pub gateway: String,
    pub sessions: usize,
    pub concurrency: usize,
    /// How long each viewer stays open after its first update.
    pub hold: Duration,
    /// How long a session may take to become ready.
    pub ready_timeout: Duration,
    pub tls: Tls,
    pub user_id: String,
    pub provider: String,
    /// A live progress line on stderr.
    pub progress: bool,
}

/// What one session's run came to.
#[derive(Debug, Default)]
struct Outcome {
    ready_ms: Option<f64>,
    first_fb_ms: Option<f64>,
    /// The failure's name (`create_503`, `state_failed`, `connect_refused`, `closed_4006`...).
    failure: Option<String>,
    /// The first reasons given, per failure name, for the report.
    detail: Option<String>,
}

#[derive(Debug)]
pub struct Report {
    pub sessions: usize,
    pub ready: usize,
    pub viewed: usize,
    pub failed: usize,
    pub failures: BTreeMap<String, usize>,
    /// One example reason per failure name.
    pub examples: BTreeMap<String, String>,
    pub create_to_ready: Option<Percentiles>,
    pub create_to_first_fb: Option<Percentiles>,
    pub elapsed: Duration,
    pub concurrency: usize,
}

impl Report {
    pub fn sessions_per_s(&self) -> f64 {
        self.viewed as f64 / self.elapsed.as_secs_f64().max(1e-9)
    }

    pub fn to_json_line(&self) -> String {
        json!({
            "run": "sessions",
            "sessions": self.sessions,
            "concurrency": self.concurrency,
            "ready": self.ready,
            "viewed": self.viewed,
            "failed": self.failed,
            "failures": self.failures,
            "failure_examples": self.examples,
            "create_to_ready_ms": self.create_to_ready,
            "create_to_first_framebuffer_ms": self.create_to_first_fb,
            "sessions_per_s": self.sessions_per_s(),
            "elapsed_s": self.elapsed.as_secs_f64(),
        })
        .to_string()
    }
}

impl std::fmt::Display for Report {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        writeln!(
            f,
            "sessions: {} started, {} ready, {} viewed to their first framebuffer, {} failed, in {:.1} s ({:.2} sessions/s, {} at a time)",
            self.sessions,
            self.ready,
            self.viewed,
            self.failed,
            self.elapsed.as_secs_f64(),
            self.sessions_per_s(),
            self.concurrency
        )?;
        writeln!(
            f,
            "{:<28} {:>9} {:>9} {:>9} {:>9} {:>6}",
            "ms", "p50", "p90", "p99", "max", "n"
        )?;
        for (name, p) in [
            ("create to ready", &self.create_to_ready),
            ("create to first framebuffer", &self.create_to_first_fb),
        ] {
            match p {
                Some(p) => writeln!(
                    f,
                    "{name:<28} {:>9.1} {:>9.1} {:>9.1} {:>9.1} {:>6}",
                    p.p50, p.p90, p.p99, p.max, p.n
                )?,
                None => writeln!(f, "{name:<28} {:>9}", "none measured")?,
            }
        }
        for (name, n) in &self.failures {
            writeln!(
                f,
                "failed: {name}: {n} ({})",
                self.examples.get(name).map(String::as_str).unwrap_or("")
            )?;
        }
        Ok(())
    }
}

/// One HTTP call to the controller on a blocking thread.
async fn api(base: &str, method: &str, path: &str, body: &str) -> Result<(u16, Value), String> {
    let (base, method, path, body) = (
        base.to_owned(),
        method.to_owned(),
        path.to_owned(),
        body.to_owned(),
    );
    tokio::task::spawn_blocking(move || crate::http::json(&base, &method, &path, &body))
        .await
        .map_err(|e| format!("http task: {e}"))?
        .map_err(|e| e.to_string())
}

fn fail(o: &mut Outcome, name: impl Into<String>, detail: impl Into<String>) {
    o.failure = Some(name.into());
    o.detail = Some(detail.into());
}

async fn one(cfg: &Config, dialer: &Dialer, n: usize) -> Outcome {
    let mut o = Outcome::default();
    let t0 = Instant::now();
    let body = json!({"user_id": cfg.user_id, "provider": cfg.provider}).to_string();
    let created = match api(&cfg.controller, "POST", "/api/sessions", &body).await {
        Ok((201, v)) => v,
        Ok((st, v)) => {
            fail(
                &mut o,
                format!("create_{st}"),
                v["reason"].as_str().unwrap_or_default(),
            );
            return o;
        }
        Err(e) => {
            fail(&mut o, "create_io", e);
            return o;
        }
    };
    let (Some(id), Some(token), Some(path)) = (
        created["id"].as_str(),
        created["token"].as_str(),
        created["ws_path"].as_str(),
    ) else {
        fail(
            &mut o,
            "create_answer",
            format!("no id, token or ws_path in {created}"),
        );
        return o;
    };
    let wait = format!(
        "/api/sessions/{id}/wait?state=ready&timeout={}",
        cfg.ready_timeout.as_secs_f64().min(300.0)
    );
    match api(&cfg.controller, "GET", &wait, "").await {
        Ok((200, v)) if v["state"] == "ready" => {
            o.ready_ms = Some(t0.elapsed().as_secs_f64() * 1e3);
        }
        Ok((200, v)) => {
            let state = v["state"].as_str().unwrap_or("unknown");
            fail(
                &mut o,
                format!("state_{state}"),
                v["reason"].as_str().unwrap_or(state),
            );
        }
        Ok((st, v)) => fail(&mut o, format!("wait_{st}"), v.to_string()),
        Err(e) => fail(&mut o, "wait_io", e),
    }
    if o.failure.is_none() {
        view(
            cfg,
            dialer,
            n,
            &format!("{}{path}?token={token}", cfg.gateway.trim_end_matches('/')),
            t0,
            &mut o,
        )
        .await;
    }
    match api(
        &cfg.controller,
        "DELETE",
        &format!("/api/sessions/{id}"),
        "",
    )
    .await
    {
        // 409: it already ended (failed, say): nothing to delete.
        Ok((202 | 409, _)) => {}
        Ok((st, v)) if o.failure.is_none() => fail(&mut o, format!("delete_{st}"), v.to_string()),
        Err(e) if o.failure.is_none() => fail(&mut o, "delete_io", e),
        _ => {}
    }
    o
}

/// The viewer: upgrade, RFB handshake, first update, hold, clean close.
async fn view(cfg: &Config, dialer: &Dialer, n: usize, url: &str, t0: Instant, o: &mut Outcome) {
    let request = match upgrade_request(url, None) {
        Ok((r, _)) => r,
        Err(e) => return fail(o, "bad_url", e.to_string()),
    };
    let mut ws = match timeout(Duration::from_secs(10), dialer.connect(request, None)).await {
        Ok(Ok((ws, _))) => ws,
        Ok(Err(e)) => return fail(o, e.kind(), e.to_string()),
        Err(_) => return fail(o, "connect_timeout", "no upgrade within 10 s"),
    };
    let mut client = SimClient::new(ClientConfig {
        id: n,
        password: None,
        busy: false,
        input_interval: None,
    });
    let first_by = Instant::now() + Duration::from_secs(30);
    let mut hold_until: Option<Instant> = None;
    loop {
        let deadline = hold_until.unwrap_or(first_by);
        let msg = match timeout_at(deadline, ws.next()).await {
            Err(_) if hold_until.is_some() => break,
            Err(_) => {
                return fail(
                    o,
                    "first_update_timeout",
                    "no framebuffer update within 30 s",
                );
            }
            Ok(None) => {
                return fail(
                    o,
                    "closed_1006",
                    "the connection ended without a close frame",
                );
            }
            Ok(Some(Err(e))) => return fail(o, ws_stream_error_kind(&e), e.to_string()),
            Ok(Some(Ok(m))) => m,
        };
        match msg {
            Message::Binary(b) => {
                if let Err(e) = client.receive(&b, std::time::Instant::now()) {
                    return fail(o, format!("rfb_{}", e.kind()), e.to_string());
                }
                let out = client.take_output();
                if !out.is_empty()
                    && let Err(e) = ws.send(Message::Binary(out.into())).await
                {
                    return fail(o, ws_stream_error_kind(&e), e.to_string());
                }
                if hold_until.is_none() && client.stats().updates > 0 {
                    o.first_fb_ms = Some(t0.elapsed().as_secs_f64() * 1e3);
                    hold_until = Some(Instant::now() + cfg.hold);
                }
            }
            Message::Close(c) => {
                let (code, reason) = c.map_or((1005, String::new()), |f| {
                    (u16::from(f.code), f.reason.to_string())
                });
                return fail(o, format!("closed_{code}"), reason);
            }
            _ => {}
        }
    }
    // A clean close: ours, then the gateway's echo.
    let _ = ws
        .send(Message::Close(Some(CloseFrame {
            code: CloseCode::Normal,
            reason: "vncgate-loadtest sessions: done".into(),
        })))
        .await;
    let _ = timeout(Duration::from_secs(5), async {
        while let Some(Ok(m)) = ws.next().await {
            if matches!(m, Message::Close(_)) {
                break;
            }
        }
    })
    .await;
}

pub async fn run(cfg: Config) -> Result<Report, String> {
    if cfg.sessions == 0 || cfg.concurrency == 0 {
        return Err("--sessions and --concurrency must be at least 1".into());
    }
    if !cfg.controller.starts_with("http://") {
        return Err(format!(
            "--controller {}: want http://HOST:PORT",
            cfg.controller
        ));
    }
    let (_, secure) = upgrade_request(&format!("{}/", cfg.gateway.trim_end_matches('/')), None)
        .map_err(|e| format!("--gateway {}: {e}", cfg.gateway))?;
    let dialer = Arc::new(Dialer::new(secure, &cfg.tls, None, true)?);
    let cfg = Arc::new(cfg);
    let next = Arc::new(AtomicUsize::new(0));
    let done = Arc::new(AtomicUsize::new(0));
    let outcomes = Arc::new(Mutex::new(Vec::new()));
    let started = Instant::now();
    let progress = cfg.progress.then(|| {
        let (cfg, done, next, outcomes) =
            (cfg.clone(), done.clone(), next.clone(), outcomes.clone());
        tokio::spawn(async move {
            loop {
                tokio::time::sleep(Duration::from_secs(1)).await;
                let failed = outcomes
                    .lock()
                    .expect("outcomes")
                    .iter()
                    .filter(|o: &&Outcome| o.failure.is_some())
                    .count();
                let d = done.load(Ordering::Relaxed);
                eprint!(
                    "\rsessions: {d}/{} done, {} active, {failed} failed, {:.0} s   ",
                    cfg.sessions,
                    next.load(Ordering::Relaxed).min(cfg.sessions) - d,
                    started.elapsed().as_secs_f64()
                );
            }
        })
    });
    let workers: Vec<_> = (0..cfg.concurrency.min(cfg.sessions))
        .map(|_| {
            let (cfg, dialer, next, done, outcomes) = (
                cfg.clone(),
                dialer.clone(),
                next.clone(),
                done.clone(),
                outcomes.clone(),
            );
            tokio::spawn(async move {
                loop {
                    let n = next.fetch_add(1, Ordering::Relaxed);
                    if n >= cfg.sessions {
                        break;
                    }
                    let o = one(&cfg, &dialer, n).await;
                    outcomes.lock().expect("outcomes").push(o);
                    done.fetch_add(1, Ordering::Relaxed);
                }
            })
        })
        .collect();
    for w in workers {
        w.await.map_err(|e| format!("a worker failed: {e}"))?;
    }
    if let Some(p) = progress {
        p.abort();
        eprintln!();
    }
    let elapsed = started.elapsed();
    let outcomes = std::mem::take(&mut *outcomes.lock().expect("outcomes"));
    let mut failures = BTreeMap::new();
    let mut examples = BTreeMap::new();
    for o in &outcomes {
        if let Some(f) = &o.failure {
            *failures.entry(f.clone()).or_insert(0) += 1;
            examples
                .entry(f.clone())
                .or_insert_with(|| o.detail.clone().unwrap_or_default());
        }
    }
    let mut ready: Vec<f64> = outcomes.iter().filter_map(|o| o.ready_ms).collect();
    let mut fb: Vec<f64> = outcomes
        .iter()
        .filter(|o| o.failure.is_none())
        .filter_map(|o| o.first_fb_ms)
        .collect();
    Ok(Report {
        sessions: outcomes.len(),
        ready: ready.len(),
        viewed: fb.len(),
        failed: outcomes.iter().filter(|o| o.failure.is_some()).count(),
        failures,
        examples,
        create_to_ready: Percentiles::of(&mut ready),
        create_to_first_fb: Percentiles::of(&mut fb),
        elapsed,
        concurrency: cfg.concurrency,
    })
}
