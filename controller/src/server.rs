//! `vncgate-controller --listen ADDR ...`: the store (Redis, or memory), the backend, the
//! service with its reconciler, and the API, until SIGTERM or SIGINT. VMs keep running when
//! the controller stops; the next one adopts them.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use crate::backend::Backend;
use crate::backend::process::{ProcessBackend, ProcessConfig};
use crate::backend::qemu::{QemuBackend, QemuConfig};
use crate::credentials::{Kek, KeyRing, Sealed};
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
    /// `ID=FILE` key-encryption keys; the last is the newest.
    pub credentials_keys: Vec<String>,
    pub admin_token_file: Option<PathBuf>,
    pub max_credentials_bytes: usize,
    /// `/healthz`, `/readyz` and `/metrics`.
    pub admin: Option<String>,
    /// Run the gateway in this process on this address, fed by the in-memory store (the
    /// embedded default: one command, no Redis).
    pub gateway_listen: Option<String>,
    /// The golden directory (`--backend qemu`).
    pub golden: Option<PathBuf>,
    /// The QEMU binary.
    pub qemu: PathBuf,
    /// VMs at most on this host, and how long a session waits for a slot.
    pub max_vms: Option<usize>,
    pub placement_timeout: Duration,
}

/// The embedded gateway: `vncgate serve` on `listen` with 127.0.0.0/8 allowed upstream (the
/// process backend's VMs), routes from `table`. Its metrics go to this process's recorder.
fn start_gateway(
    listen: &str,
    table: &vncgate::route_table::RouteTable,
    workers: usize,
) -> Result<std::net::SocketAddr, String> {
    let args = vncgate::config::ServeArgs {
        listen: Some(listen.to_owned()),
        allow_upstream: vec!["127.0.0.0/8".into()],
        workers: Some(workers),
        ..Default::default()
    };
    let settings = args
        .settings_with_env(std::env::vars())
        .map_err(|e| format!("--gateway-listen: {e}"))?;
    let t = table.clone();
    let running = vncgate::server::start_with(
        settings,
        None,
        vncgate::server::Hooks::default(),
        move |i| t.source(i),
    )
    .map_err(|e| format!("--gateway-listen {listen}: {e}"))?;
    let addr = running.local_addr;
    std::thread::Builder::new()
        .name("vncgate-gateway".into())
        .spawn(move || running.join())
        .map_err(|e| e.to_string())?;
    Ok(addr)
}

/// The key ring from `--credentials-key` flags; without any, an ephemeral key (said loudly:
/// such records do not outlive the process).
pub fn key_ring(flags: &[String], persistent_store: bool) -> Result<KeyRing, String> {
    if flags.is_empty() {
        if persistent_store {
            tracing::warn!(
                "no --credentials-key: credentials are sealed under an ephemeral key and cannot be read after a restart"
            );
        }
        return KeyRing::new(vec![Kek::ephemeral()]);
    }
    KeyRing::new(
        flags
            .iter()
            .map(|f| Kek::from_flag(f))
            .collect::<Result<_, _>>()?,
    )
}

fn admin_token(path: &Option<PathBuf>) -> Result<Option<[u8; 32]>, String> {
    let Some(p) = path else { return Ok(None) };
    let text = std::fs::read_to_string(p)
        .map_err(|e| format!("--admin-token-file {}: {e}", p.display()))?;
    let token = text.trim();
    if token.len() < 16 {
        return Err(format!(
            "--admin-token-file {}: the token must be at least 16 characters",
            p.display()
        ));
    }
    Ok(Some(vncgate_schema::record::token_digest(token.as_bytes())))
}

/// Runs the controller until a signal.
pub async fn run(s: Settings) -> Result<(), String> {
    let listener = tokio::net::TcpListener::bind(&s.listen)
        .await
        .map_err(|e| format!("--listen {}: {e}", s.listen))?;
    let addr: SocketAddr = listener.local_addr().map_err(|e| e.to_string())?;
    let mut gateway = None;
    let store = match &s.redis {
        None if s.gateway_listen.is_some() => {
            let workers = std::thread::available_parallelism().map_or(1, |n| n.get());
            let table = vncgate::route_table::RouteTable::new(workers)
                .map_err(|e| format!("--gateway-listen: {e}"))?;
            let listen = s.gateway_listen.as_deref().expect("checked");
            gateway = Some(start_gateway(listen, &table, workers)?);
            Store::memory_with_gateway(table)
        }
        None => Store::memory(),
        Some(_) if s.gateway_listen.is_some() => {
            return Err("--gateway-listen runs the gateway on the in-memory store; with --redis, run `vncgate serve --redis URL` beside the controller".into());
        }
        Some(url) => {
            let url: vncgate_schema::RedisUrl = url.parse().map_err(|e| format!("--redis: {e}"))?;
            Store::redis(url.connect_for_command().await?)
        }
    };
    match s.backend {
        BackendKind::Process => {
            let b = ProcessBackend::new(ProcessConfig::beside_this_binary(
                s.process_vnc.clone(),
                s.work_dir.clone(),
            ))?;
            serve_with(s, listener, addr, store, gateway, b).await
        }
        BackendKind::Qemu => {
            let Some(golden) = s.golden.clone() else {
                return Err("--backend qemu needs --golden DIR (built by config/golden/build.sh DIR)".into());
            };
            let b = QemuBackend::new(QemuConfig {
                golden,
                work_dir: s.work_dir.clone(),
                qemu: s.qemu.clone(),
                restore_timeout: Duration::from_secs(30),
            })?;
            serve_with(s, listener, addr, store, gateway, b).await
        }
        BackendKind::Firecracker => Err(
            "--backend firecracker: not wired to the command line yet; use --backend qemu or process"
                .into(),
        ),
    }
}

/// The rest of [`run`], for one backend.
async fn serve_with<B: Backend>(
    s: Settings,
    listener: tokio::net::TcpListener,
    addr: SocketAddr,
    store: Store,
    gateway: Option<SocketAddr>,
    backend: B,
) -> Result<(), String> {
    let backend_name = backend.name();
    let cfg = Config {
        boot_timeout: s.boot_timeout,
        controller_url: format!("http://{addr}"),
        max_viewers: s.max_viewers,
        max_vms: s.max_vms,
        placement_timeout: s.placement_timeout,
        ..Config::default()
    };
    let keys = key_ring(&s.credentials_keys, s.redis.is_some())?;
    let admin_sha256 = admin_token(&s.admin_token_file)?;
    let svc = Service::new(store.clone(), backend, cfg, keys, admin_sha256);
    svc.adopt_all()
        .await
        .map_err(|e| format!("adopting VMs: {e}"))?;
    tokio::spawn(svc.clone().reconcile_forever());
    let prom = crate::metrics::install()?;
    // The admin line first: a script that waits for "listening on" has both then.
    if let Some(a) = &s.admin {
        let l = tokio::net::TcpListener::bind(a)
            .await
            .map_err(|e| format!("--admin {a}: {e}"))?;
        println!(
            "vncgate-controller: admin on http://{}",
            l.local_addr().map_err(|e| e.to_string())?
        );
        tokio::spawn(admin(l, store.clone(), prom));
    }
    if let Some(g) = gateway {
        println!("vncgate-controller: gateway on ws://{g}/vnc/");
    }
    println!("vncgate-controller: listening on http://{addr}");
    if let Some(g) = gateway {
        println!(
            "vncgate-controller: try: curl -s -XPOST http://{addr}/api/sessions -H 'content-type: application/json' -d '{{\"user_id\":\"me\",\"provider\":\"demo\"}}', then open ws://{g}/vnc/<id>?token=<token> in noVNC"
        );
    }
    tracing::info!(%addr, store = store.name(), backend = backend_name, boot_timeout = ?s.boot_timeout, "controller up");
    axum::serve(listener, crate::api::router(svc, s.max_credentials_bytes))
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

/// `vncgate-controller keys rewrap`: every stored credentials record moves to the newest
/// key; only data keys are re-sealed, the credentials are never decrypted. Returns (moved,
/// already on the newest).
pub async fn rewrap(redis: &str, flags: &[String]) -> Result<(usize, usize), String> {
    if flags.is_empty() {
        return Err(
            "keys rewrap needs the keys: --credentials-key ID=FILE (old ones, then the newest)"
                .into(),
        );
    }
    let keys = key_ring(flags, true)?;
    let url: vncgate_schema::RedisUrl = redis.parse().map_err(|e| format!("--redis: {e}"))?;
    let mut c = url.connect_for_command().await?;
    let (mut moved, mut current) = (0, 0);
    for id in vncgate_schema::store::credentials_ids(&mut c)
        .await
        .map_err(|e| format!("redis: {e}"))?
    {
        let Some(old) = vncgate_schema::store::get_credentials(&mut c, &id)
            .await
            .map_err(|e| format!("redis: {e}"))?
        else {
            continue;
        };
        let sealed: Sealed = serde_json::from_str(&old)
            .map_err(|e| format!("session {id}: unusable record: {e}"))?;
        match keys
            .rewrap(&sealed)
            .map_err(|e| format!("session {id}: {e}"))?
        {
            None => current += 1,
            Some(new) => {
                let new = serde_json::to_string(&new).expect("a sealed record serializes");
                if vncgate_schema::store::replace_credentials(&mut c, &id, &old, &new)
                    .await
                    .map_err(|e| format!("redis: {e}"))?
                {
                    moved += 1;
                } else {
                    return Err(format!(
                        "session {id}: changed during the rewrap; run it again"
                    ));
                }
            }
        }
    }
    Ok((moved, current))
}

/// `/healthz` (the process serves), `/readyz` (and its store answers), `/metrics`.
async fn admin(
    l: tokio::net::TcpListener,
    store: Store,
    prom: metrics_exporter_prometheus::PrometheusHandle,
) {
    use axum::http::StatusCode;
    use axum::routing::get;
    let app = axum::Router::new()
        .route("/healthz", get(|| async { "ok\n" }))
        .route(
            "/readyz",
            get(move || {
                let store = store.clone();
                async move {
                    match store.ping().await {
                        Ok(()) => (
                            StatusCode::OK,
                            format!("ready: {} store answers\n", store.name()),
                        ),
                        Err(e) => (StatusCode::SERVICE_UNAVAILABLE, format!("not ready: {e}\n")),
                    }
                }
            }),
        )
        .route("/metrics", get(move || std::future::ready(prom.render())));
    if let Err(e) = axum::serve(l, app).await {
        tracing::error!(error = %e, "admin endpoint stopped");
    }
}
