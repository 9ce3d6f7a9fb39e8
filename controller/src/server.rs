//! `vncgate-controller --listen ADDR ...`: the store (Redis, or memory), the backend, the
//! service with its reconciler, and the API, until SIGTERM or SIGINT. VMs keep running when
//! the controller stops; the next one adopts them.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use crate::backend::Backend;
use crate::backend::firecracker::{
    FirecrackerBackend, FirecrackerConfig, GoldenSnapshot, JailerConfig,
};
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
    /// With Redis: this host's lease TTL (`--lease-ttl`).
    pub lease_ttl: Duration,
    /// This host's name in the sessions it places.
    pub host_id: String,
    /// `--backend firecracker`.
    pub firecracker: FirecrackerSettings,
}

/// The `firecracker` backend's flags, as given; [`FirecrackerSettings::config`] checks them.
#[derive(Debug, Clone, Default)]
pub struct FirecrackerSettings {
    /// `--firecracker`: a path, or a bare name looked up on `PATH`.
    pub binary: PathBuf,
    /// `--jailer`, with `--jailer-uid`, `--jailer-gid` and `--jailer-chroot-base`.
    pub jailer: Option<PathBuf>,
    pub jailer_uid: Option<u32>,
    pub jailer_gid: Option<u32>,
    pub jailer_chroot_base: PathBuf,
    /// `--fc-vmstate`, `--fc-memory`: the golden snapshot's two files.
    pub vmstate: Option<PathBuf>,
    pub memory: Option<PathBuf>,
    /// `--fc-drive`: files the snapshot opens (its drives), linked into each jail.
    pub drives: Vec<PathBuf>,
    /// `--fc-bridge`, `--fc-subnet`, `--fc-netns` [default: the backend's].
    pub bridge: Option<String>,
    pub subnet: Option<String>,
    pub netns: Option<String>,
}

/// `name` when it is a path; else the first executable file of that name on `PATH`.
fn find_binary(name: &Path, flag: &str) -> Result<PathBuf, String> {
    if name.components().count() != 1 || name.is_absolute() {
        return Ok(name.to_owned());
    }
    std::env::var_os("PATH")
        .into_iter()
        .flat_map(|p| std::env::split_paths(&p).collect::<Vec<_>>())
        .map(|dir| dir.join(name))
        .find(|p| p.is_file())
        .ok_or_else(|| {
            format!(
                "{flag}: no {} on PATH; give its path (scripts/firecracker-fetch.sh puts v1.12.1 in target/firecracker/)",
                name.display()
            )
        })
}

impl FirecrackerSettings {
    /// The backend's configuration; a missing or malformed flag is an error naming it.
    pub fn config(&self, work_dir: &Path) -> Result<FirecrackerConfig, String> {
        let need = |v: &Option<PathBuf>, flag: &str| {
            v.clone().ok_or_else(|| {
                format!("--backend firecracker needs {flag} FILE (the golden snapshot's {}; `vncgate-controller golden firecracker-snapshot` makes it)", if flag == "--fc-vmstate" { "VM state" } else { "guest memory" })
            })
        };
        let golden = GoldenSnapshot {
            vmstate: need(&self.vmstate, "--fc-vmstate")?,
            memory: need(&self.memory, "--fc-memory")?,
            files: self.drives.clone(),
        };
        let binary = find_binary(&self.binary, "--firecracker")?;
        let mut cfg = FirecrackerConfig::new(binary, golden, work_dir.to_owned());
        if let Some(j) = &self.jailer {
            let (Some(uid), Some(gid)) = (self.jailer_uid, self.jailer_gid) else {
                return Err(
                    "--jailer needs --jailer-uid and --jailer-gid (the user Firecracker runs as)"
                        .into(),
                );
            };
            cfg.jailer = Some(JailerConfig {
                binary: find_binary(j, "--jailer")?,
                uid,
                gid,
                chroot_base: self.jailer_chroot_base.clone(),
            });
        } else if self.jailer_uid.is_some() || self.jailer_gid.is_some() {
            return Err("--jailer-uid and --jailer-gid take effect with --jailer PATH only".into());
        }
        if let Some(b) = &self.bridge {
            cfg.bridge = b.clone();
        }
        if let Some(s) = &self.subnet {
            cfg.subnet = s.parse().map_err(|e| format!("--fc-subnet: {e}"))?;
        }
        cfg.netns = self.netns.clone();
        Ok(cfg)
    }
}

/// The embedded gateway: `vncgate serve` on `listen` with 127.0.0.0/8 allowed upstream (the
/// process backend's VMs), routes from `table`. Its metrics go to this process's recorder.
/// Its workers are left to the scheduler: they share the host with this process's own
/// threads and with the VMs it runs, the case `--pin-workers=never` is for.
fn start_gateway(
    listen: &str,
    table: &vncgate::route_table::RouteTable,
    workers: usize,
) -> Result<std::net::SocketAddr, String> {
    let args = vncgate::config::ServeArgs {
        listen: Some(listen.to_owned()),
        allow_upstream: vec!["127.0.0.0/8".into()],
        workers: Some(workers),
        pin_workers: Some(vncgate::config::PinWorkers::Never),
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

/// The machine's hostname, the default `--host-id`.
pub fn default_host_id() -> Result<String, String> {
    let name = std::fs::read_to_string("/proc/sys/kernel/hostname")
        .map_err(|e| format!("--host-id not given and the hostname is unreadable: {e}"))?;
    Ok(name.trim().to_owned())
}

/// A host id is 1-64 characters of letters, digits, `.`, `_` and `-`.
pub fn check_host_id(id: &str) -> Result<(), String> {
    let ok = (1..=64).contains(&id.len())
        && id
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'-'));
    if ok {
        Ok(())
    } else {
        Err(format!(
            "--host-id {id:?}: use 1-64 letters, digits, '.', '_' or '-'"
        ))
    }
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
            Store::redis(
                url.connect_lasting(vncgate_schema::Timeouts::default())
                    .await?,
            )
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
                return Err(
                    "--backend qemu needs --golden DIR (built by config/golden/build.sh DIR)"
                        .into(),
                );
            };
            let b = QemuBackend::new(QemuConfig {
                golden,
                work_dir: s.work_dir.clone(),
                qemu: s.qemu.clone(),
                restore_timeout: Duration::from_secs(30),
            })?;
            serve_with(s, listener, addr, store, gateway, b).await
        }
        BackendKind::Firecracker => {
            let cfg = s.firecracker.config(&s.work_dir)?;
            if addr.ip().is_loopback() {
                tracing::warn!(%addr, "the controller listens on loopback, which no Firecracker guest reaches: agents cannot post credentials (use --listen 0.0.0.0:PORT; guests are given the bridge's address)");
            }
            let b = FirecrackerBackend::new(cfg)?;
            serve_with(s, listener, addr, store, gateway, b).await
        }
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
    // Before anything counts: series set earlier would be lost.
    let prom = crate::metrics::install()?;
    let (lease, previous) = match store.redis_conn() {
        Some(conn) => {
            let (l, prev) = crate::cluster::Lease::acquire(conn, &s.host_id, s.lease_ttl).await?;
            (Some(std::sync::Arc::new(l)), prev)
        }
        None => (None, None),
    };
    let cfg = Config {
        boot_timeout: s.boot_timeout,
        controller_url: format!("http://{addr}"),
        max_viewers: s.max_viewers,
        max_vms: s.max_vms,
        placement_timeout: s.placement_timeout,
        host_id: s.host_id.clone(),
        ..Config::default()
    };
    let keys = key_ring(&s.credentials_keys, s.redis.is_some())?;
    let admin_sha256 = admin_token(&s.admin_token_file)?;
    let clustered = lease.is_some();
    let svc = Service::new(store.clone(), backend, cfg, keys, admin_sha256, lease);
    if clustered {
        svc.carry_over(previous).await?;
    }
    svc.adopt_all()
        .await
        .map_err(|e| format!("adopting VMs: {e}"))?;
    svc.start_placement().await;
    tokio::spawn(svc.clone().reconcile_forever());
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
    tracing::info!(%addr, host = %s.host_id, store = store.name(), backend = backend_name, boot_timeout = ?s.boot_timeout, "controller up");
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

#[cfg(test)]
mod tests {
    use super::*;

    fn flags() -> FirecrackerSettings {
        FirecrackerSettings {
            binary: "/opt/fc/firecracker".into(),
            jailer_chroot_base: "/srv/jailer".into(),
            vmstate: Some("/g/golden.vmstate".into()),
            memory: Some("/g/golden.mem".into()),
            ..FirecrackerSettings::default()
        }
    }

    #[test]
    fn firecracker_flags_become_the_backends_config() {
        let mut f = flags();
        f.drives = vec!["/g/rootfs.ext4".into()];
        f.subnet = Some("10.8.0.0/16".into());
        f.bridge = Some("fcbr0".into());
        f.netns = Some("vms".into());
        f.jailer = Some("/opt/fc/jailer".into());
        (f.jailer_uid, f.jailer_gid) = (Some(123), Some(456));
        let c = f.config(Path::new("/w")).unwrap();
        assert_eq!(c.firecracker, Path::new("/opt/fc/firecracker"));
        assert_eq!(c.golden.vmstate, Path::new("/g/golden.vmstate"));
        assert_eq!(c.golden.files, [PathBuf::from("/g/rootfs.ext4")]);
        assert_eq!(c.subnet.to_string(), "10.8.0.0/16");
        assert_eq!(
            (c.bridge.as_str(), c.netns.as_deref()),
            ("fcbr0", Some("vms"))
        );
        let j = c.jailer.unwrap();
        assert_eq!(
            (j.uid, j.gid, j.chroot_base),
            (123, 456, "/srv/jailer".into())
        );
        assert_eq!(c.work_dir, Path::new("/w"));
        // The rest are the backend's defaults.
        let d = flags().config(Path::new("/w")).unwrap();
        assert_eq!(
            (d.bridge.as_str(), d.subnet.to_string()),
            ("vncgatefc0", "172.30.0.0/24".into())
        );
        assert!(d.jailer.is_none() && d.netns.is_none());
    }

    #[test]
    fn missing_or_malformed_firecracker_flags_are_named() {
        let e = |f: FirecrackerSettings| f.config(Path::new("/w")).unwrap_err();
        let mut f = flags();
        f.vmstate = None;
        assert!(e(f).starts_with("--backend firecracker needs --fc-vmstate FILE"));
        let mut f = flags();
        f.memory = None;
        assert!(e(f).starts_with("--backend firecracker needs --fc-memory FILE"));
        let mut f = flags();
        f.subnet = Some("172.30.0.0/8".into());
        assert_eq!(e(f), "--fc-subnet: prefix /8: use /16 to /29");
        let mut f = flags();
        f.jailer = Some("/opt/fc/jailer".into());
        f.jailer_uid = Some(1);
        assert!(e(f).starts_with("--jailer needs --jailer-uid and --jailer-gid"));
        let mut f = flags();
        f.jailer_gid = Some(1);
        assert!(e(f).contains("with --jailer PATH only"));
        let mut f = flags();
        f.binary = "vncgate-no-such-firecracker".into();
        assert!(e(f).starts_with("--firecracker: no vncgate-no-such-firecracker on PATH"));
    }

    #[test]
    fn a_bare_binary_name_is_looked_up_on_path() {
        // `sh` is on every PATH these tests run with.
        let sh = find_binary(Path::new("sh"), "--firecracker").unwrap();
        assert!(sh.is_absolute() && sh.ends_with("sh"), "{}", sh.display());
        assert_eq!(
            find_binary(Path::new("./fc"), "--firecracker").unwrap(),
            Path::new("./fc")
        );
    }
}
