//! `vncgate-agent`: runs inside the VM. Serves `GET /health` on `--listen`, healthy (200)
//! only once it has its per-VM data (session id, agent token, controller URL) from
//! `--vm-data`; before that it answers 503 and says what it waits for, so a controller never
//! counts a VM that was not given its identity as ready.
//!
//! Posting the credentials file to the controller's store comes with the store
//! (issue 10, item 4); `--credentials-file` is accepted now so backends pass it already.

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
    if let Some(c) = &args.credentials_file {
        tracing::info!(file = %c.display(), "credentials file (posting comes with the controller's store)");
    }
    tokio::spawn(watch_vm_data(agent.clone(), args.vm_data.clone()));
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
