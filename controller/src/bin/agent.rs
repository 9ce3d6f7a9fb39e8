//! `vncgate-agent`: runs inside the VM. Serves `GET /health` on `--listen`, healthy (200)
//! only once it has its per-VM data (session id, agent token, controller URL) from
//! `--vm-data`; before that it answers 503 and says what it waits for, so a controller never
//! counts a VM that was not given its identity as ready.
//!
//! It watches `--credentials-file` (the browser session's login writes it): whenever it
//! appears or changes and holds a JSON object, the agent posts it to the controller's
//! `POST /api/auth/credentials/store` with its agent token, retrying with backoff (0.5 s
//! doubling to 10 s) while the controller cannot take it, and logs every attempt's status.
//! A 404 is logged as "controller has no credentials endpoint", never swallowed.

#![forbid(unsafe_code)]

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use axum::Json;
use axum::extract::State;
use axum::http::StatusCode;
use axum::routing::get;
use clap::Parser;
use tokio::sync::RwLock;
use vncgate_controller::backend::VmData;

#[derive(Parser)]
#[command(name = "vncgate-agent", version, about = "vncgate's agent inside a VM")]
struct Args {
    /// Address for /health.
    #[arg(long, default_value = "0.0.0.0:8080")]
    listen: String,
    /// The per-VM data (JSON: session_id, agent_token, controller_url), read until it
    /// appears and again whenever it changes.
    #[arg(long, value_name = "FILE", env = "VNCGATE_AGENT_VM_DATA")]
    vm_data: PathBuf,
    /// The file the browser session's login writes credentials to.
    #[arg(long, value_name = "FILE")]
    credentials_file: Option<PathBuf>,
}

#[derive(Default)]
struct Agent {
    data: RwLock<Option<VmData>>,
    /// Why there is no data yet (missing, unreadable, malformed), for /health.
    waiting: RwLock<String>,
}

async fn health(State(a): State<Arc<Agent>>) -> (StatusCode, Json<serde_json::Value>) {
    match &*a.data.read().await {
        Some(d) => (
            StatusCode::OK,
            Json(serde_json::json!({"status": "ok", "session_id": d.session_id})),
        ),
        None => (
            StatusCode::SERVICE_UNAVAILABLE,
            Json(serde_json::json!({"status": "waiting", "reason": *a.waiting.read().await})),
        ),
    }
}

/// Reads the VM data whenever the file changes (by modification time and size).
async fn watch_vm_data(a: Arc<Agent>, path: PathBuf) {
    let mut seen = None;
    loop {
        let stamp = std::fs::metadata(&path)
            .ok()
            .map(|m| (m.modified().ok(), m.len()));
        if stamp != seen {
            seen = stamp;
            match std::fs::read(&path) {
                Err(e) => {
                    *a.waiting.write().await = format!("no vm data at {}: {e}", path.display());
                }
                Ok(bytes) => match serde_json::from_slice::<VmData>(&bytes) {
                    Ok(d) if d.agent_token.is_empty() || d.session_id.is_empty() => {
                        *a.waiting.write().await =
                            format!("vm data at {} lacks a session id or token", path.display());
                    }
                    Ok(d) => {
                        tracing::info!(session = %d.session_id, controller = %d.controller_url, "vm data loaded");
                        *a.data.write().await = Some(d);
                    }
                    Err(e) => {
                        tracing::warn!(error = %e, "vm data is not valid JSON of the schema");
                        *a.waiting.write().await =
                            format!("vm data at {} is malformed: {e}", path.display());
                    }
                },
            }
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// What one post attempt should lead to.
enum Posted {
    Done,
    Retry,
    /// A refusal that repeating will not change (401, 403, 409, 400, 413): wait for the file
    /// to change.
    GiveUp,
}

async fn post_once(http: &reqwest::Client, d: &VmData, credentials: &serde_json::Value) -> Posted {
    let url = format!(
        "{}/api/auth/credentials/store",
        d.controller_url.trim_end_matches('/')
    );
    let body = serde_json::json!({
        "sessionId": d.session_id,
        "provider": d.provider,
        "credentials": credentials,
    });
    let r = http
        .post(&url)
        .bearer_auth(&d.agent_token)
        .json(&body)
        .timeout(Duration::from_secs(10))
        .send()
        .await;
    match r {
        Err(e) => {
            tracing::warn!(session = %d.session_id, %url, error = %e, "credentials post failed; retrying");
            Posted::Retry
        }
        Ok(r) => {
            let status = r.status().as_u16();
            let text = r.text().await.unwrap_or_default();
            match status {
                200 | 201 => {
                    tracing::info!(session = %d.session_id, status, "credentials stored by the controller");
                    Posted::Done
                }
                // Our controller's 404 for a session it does not know says so; any other 404
                // is a controller without the endpoint (the seed's failure).
                404 if !text.contains("unknown session") => {
                    tracing::error!(session = %d.session_id, %url, status, "controller has no credentials endpoint; retrying");
                    Posted::Retry
                }
                500..=599 => {
                    tracing::warn!(session = %d.session_id, status, body = %text, "controller could not store the credentials; retrying");
                    Posted::Retry
                }
                _ => {
                    tracing::error!(session = %d.session_id, status, body = %text, "controller refused the credentials");
                    Posted::GiveUp
                }
            }
        }
    }
}

/// Posts the credentials file whenever it appears or changes.
async fn watch_credentials(a: Arc<Agent>, path: PathBuf) {
    let http = reqwest::Client::new();
    let mut seen = None;
    loop {
        tokio::time::sleep(Duration::from_millis(200)).await;
        let stamp = std::fs::metadata(&path)
            .ok()
            .map(|m| (m.modified().ok(), m.len()));
        if stamp.is_none() || stamp == seen {
            continue;
        }
        let Some(data) = a.data.read().await.clone() else {
            continue;
        };
        let Ok(bytes) = std::fs::read(&path) else {
            continue;
        };
        let credentials = match serde_json::from_slice::<serde_json::Value>(&bytes) {
            Ok(v @ serde_json::Value::Object(_)) => v,
            // Perhaps half written: look again at the next change.
            _ => {
                tracing::warn!(file = %path.display(), "credentials file is not a JSON object (yet)");
                seen = stamp;
                continue;
            }
        };
        seen = stamp;
        let mut backoff = Duration::from_millis(500);
        let mut attempt = 1u32;
        loop {
            tracing::info!(session = %data.session_id, attempt, "posting credentials");
            match post_once(&http, &data, &credentials).await {
                Posted::Done | Posted::GiveUp => break,
                Posted::Retry => {}
            }
            // A newer file replaces what is being retried.
            let now = std::fs::metadata(&path)
                .ok()
                .map(|m| (m.modified().ok(), m.len()));
            if now != seen {
                break;
            }
            tokio::time::sleep(backoff).await;
            backoff = (backoff * 2).min(Duration::from_secs(10));
            attempt += 1;
        }
    }
}

#[tokio::main(flavor = "current_thread")]
async fn main() -> std::process::ExitCode {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_env("VNCGATE_LOG")
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info")),
        )
        .with_writer(std::io::stderr)
        .init();
    let args = Args::parse();
    let agent = Arc::new(Agent {
        waiting: RwLock::new("vm data not read yet".into()),
        ..Agent::default()
    });
    let listener = match tokio::net::TcpListener::bind(&args.listen).await {
        Ok(l) => l,
        Err(e) => {
            eprintln!("vncgate-agent: --listen {}: {e}", args.listen);
            return std::process::ExitCode::from(2);
        }
    };
    tokio::spawn(watch_vm_data(agent.clone(), args.vm_data.clone()));
    if let Some(c) = &args.credentials_file {
        tokio::spawn(watch_credentials(agent.clone(), c.clone()));
    }
    let app = axum::Router::new()
        .route("/health", get(health))
        .with_state(agent);
    match axum::serve(listener, app).await {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("vncgate-agent: {e}");
            std::process::ExitCode::FAILURE
        }
    }
}
