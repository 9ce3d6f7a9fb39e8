//! `vncgate-controller --listen ADDR ...`: the store (Redis, or memory), the backend, the
//! service with its reconciler, and the API, until SIGTERM or SIGINT. VMs keep running when
//! the controller stops; the next one adopts them.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use crate::backend::process::{ProcessBackend, ProcessConfig};
use crate::service::{Config, Service};
use crate::store::Store;

/// Which VM backend.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum BackendKind {
    Process,
    Qemu,
    Firecracker,
}

/// What `vncgate-controller` runs with.
#[derive(Debug, Clone)]
pub struct Settings {
    pub listen: String,
    pub redis: Option<String>,
    pub backend: BackendKind,
    pub boot_timeout: Duration,
    pub process_vnc: Option<String>,
    pub work_dir: PathBuf,
    pub max_viewers: Option<u32>,
}

/// Runs the controller until a signal.
pub async fn run(s: Settings) -> Result<(), String> {
    let listener = tokio::net::TcpListener::bind(&s.listen)
        .await
        .map_err(|e| format!("--listen {}: {e}", s.listen))?;
    let addr: SocketAddr = listener.local_addr().map_err(|e| e.to_string())?;
    let store = match &s.redis {
        None => Store::memory(),
        Some(url) => {
            let url: vncgate_schema::RedisUrl = url.parse().map_err(|e| format!("--redis: {e}"))?;
            Store::redis(url.connect_for_command().await?)
        }
    };
    let backend = match s.backend {
        BackendKind::Process => ProcessBackend::new(ProcessConfig::beside_this_binary(
            s.process_vnc.clone(),
            s.work_dir.clone(),
        ))?,
        other => {
            return Err(format!(
                "--backend {}: not built yet (the QEMU and Firecracker backends are issue 11); use --backend process",
                match other {
                    BackendKind::Qemu => "qemu",
                    _ => "firecracker",
                }
            ));
        }
    };
    let cfg = Config {
        boot_timeout: s.boot_timeout,
        controller_url: format!("http://{addr}"),
        max_viewers: s.max_viewers,
        ..Config::default()
    };
    let svc = Service::new(store.clone(), backend, cfg);
    svc.adopt_all()
        .await
        .map_err(|e| format!("adopting VMs: {e}"))?;
    tokio::spawn(svc.clone().reconcile_forever());
    println!("vncgate-controller: listening on http://{addr}");
    tracing::info!(%addr, store = store.name(), backend = "process", boot_timeout = ?s.boot_timeout, "controller up");
    axum::serve(listener, crate::api::router(svc))
        .with_graceful_shutdown(async {
            let mut term =
                tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
                    .expect("a SIGTERM handler");
            tokio::select! {
                _ = term.recv() => {}
                _ = tokio::signal::ctrl_c() => {}
            }
            tracing::info!("stopping; VMs keep running and are adopted by the next controller");
        })
        .await
        .map_err(|e| e.to_string())
}
