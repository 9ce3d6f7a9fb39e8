//! `vncgate-agent`: runs inside the VM. Serves `GET /health` on `--listen`, healthy (200)
//! only once it has its per-VM data (session id, agent token, controller URL, clock,
//! entropy); before that it answers 503 and says what it waits for, so a controller never
//! counts a VM that was not given its identity as ready.
//!
//! The data comes from `--vm-data FILE` (the `process` backend writes it; reread whenever it
//! changes), from `--vm-data-port PATH`, a virtio-serial port (QEMU) on which the host
//! writes one JSON line per push and reads back one line: the identity [`identity::Report`],
//! or from `--vm-data-mmds`, Firecracker's MMDS, polled every 500 ms (see [`mmds`]); its
//! `network` is applied to `--mmds-iface` first, and `/health` reports what was done.
//! With `--apply-identity` (inside a VM restored from a shared snapshot) each push sets the
//! clock, reseeds the kernel RNG and takes a fresh machine id; `/health` carries the report.
//!
//! It watches `--credentials-file` (the browser session's login writes it): whenever it
//! appears or changes and holds a JSON object, the agent posts it to the controller's
//! `POST /api/auth/credentials/store` with its agent token, retrying with backoff (0.5 s
//! doubling to 10 s) while the controller cannot take it, and logs every attempt's status.
//! A 404 is logged as "controller has no credentials endpoint", never swallowed.

#![deny(unsafe_code)]

mod identity;
mod mmds;

use std::io::{Read, Write};
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::Json;
use axum::extract::State;
use axum::http::StatusCode;
use axum::routing::get;
use clap::Parser;
use vncgate_controller::backend::VmData;

#[derive(Parser)]
#[command(name = "vncgate-agent", version, about = "vncgate's agent inside a VM")]
#[command(group(clap::ArgGroup::new("source").required(true).args(["vm_data", "vm_data_port", "vm_data_mmds"])))]
struct Args {
    /// Address for /health.
    #[arg(long, default_value = "0.0.0.0:8080")]
    listen: String,
    /// The per-VM data (JSON: session_id, agent_token, controller_url, ...), read until it
    /// appears and again whenever it changes.
    #[arg(long, value_name = "FILE", env = "VNCGATE_AGENT_VM_DATA")]
    vm_data: Option<PathBuf>,
    /// A virtio-serial port (`/dev/virtio-ports/org.vncgate.vm-data`) on which the host
    /// writes the per-VM data as one JSON line, and reads back the identity report.
    #[arg(long, value_name = "PATH")]
    vm_data_port: Option<PathBuf>,
    /// Firecracker's MMDS (V2): poll it for `{"vncgate": ..., "network": ...}`, apply the
    /// network to --mmds-iface with `ip`, then take the data; again whenever it changes.
    #[arg(long)]
    vm_data_mmds: bool,
    /// The interface MMDS answers on, and that gets the document's network.
    #[arg(long, value_name = "NAME", default_value = "eth0")]
    mmds_iface: String,
    /// MMDS's base URL (a link-local one is routed on --mmds-iface first).
    #[arg(
        long,
        value_name = "URL",
        default_value = "http://169.254.169.254",
        hide = true
    )]
    mmds_url: String,
    /// Apply each VM data's identity: set the clock, reseed the kernel RNG with its entropy,
    /// write a fresh machine id (needs root; inside a VM only).
    #[arg(long)]
    apply_identity: bool,
    /// Where the machine id lives.
    #[arg(long, value_name = "FILE", default_value = "/etc/machine-id")]
    machine_id_file: PathBuf,
    /// The file the browser session's login writes credentials to.
    #[arg(long, value_name = "FILE")]
    credentials_file: Option<PathBuf>,
}

#[derive(Default)]
struct State_ {
    data: Option<VmData>,
    identity: Option<identity::Report>,
    /// What was done to the interface for MMDS's `network` (`--vm-data-mmds`).
    network: Option<mmds::NetReport>,
    /// Why there is no data yet (missing, unreadable, malformed), for /health.
    waiting: String,
}

struct Agent {
    state: Mutex<State_>,
    apply_identity: bool,
    machine_id_file: PathBuf,
}

impl Agent {
    fn data(&self) -> Option<VmData> {
        self.state.lock().expect("agent state").data.clone()
    }

    fn waiting(&self, why: String) {
        self.state.lock().expect("agent state").waiting = why;
    }

    fn network(&self, report: mmds::NetReport) {
        self.state.lock().expect("agent state").network = Some(report);
    }

    /// Takes one VM data (from the file, the port or MMDS): checks it, applies its identity, and
    /// returns the report, or why it was refused.
    fn accept(&self, bytes: &[u8], from: &str) -> Result<identity::Report, String> {
        let d = match serde_json::from_slice::<VmData>(bytes) {
            Ok(d) if d.agent_token.is_empty() || d.session_id.is_empty() => {
                let why = format!("vm data from {from} lacks a session id or token");
                self.waiting(why.clone());
                return Err(why);
            }
            Ok(d) => d,
            Err(e) => {
                tracing::warn!(error = %e, "vm data is not valid JSON of the schema");
                let why = format!("vm data from {from} is malformed: {e}");
                self.waiting(why.clone());
                return Err(why);
            }
        };
        let entropy = hex::decode(&d.entropy).unwrap_or_default();
        let report = identity::apply(
            self.apply_identity,
            d.issued_at_ms,
            &entropy,
            &self.machine_id_file,
        );
        if report.errors.is_empty() {
            tracing::info!(session = %d.session_id, controller = %d.controller_url, applied = report.applied, machine_id = ?report.machine_id, "vm data loaded");
        } else {
            tracing::error!(session = %d.session_id, errors = ?report.errors, "vm data loaded, identity not fully applied");
        }
        let mut st = self.state.lock().expect("agent state");
        st.data = Some(d);
        st.identity = Some(report.clone());
        Ok(report)
    }
}

/// 200 only with data, its identity applied, and (from MMDS) its network applied: a clone
/// still on the golden VM's MAC would share it with every other clone on the bridge.
async fn health(State(a): State<Arc<Agent>>) -> (StatusCode, Json<serde_json::Value>) {
    let st = a.state.lock().expect("agent state");
    let net_errors = st
        .network
        .as_ref()
        .map(|n| n.errors.join("; "))
        .unwrap_or_default();
    let (code, mut body) = match (&st.data, &st.identity) {
        (Some(d), Some(id)) if id.errors.is_empty() && net_errors.is_empty() => (
            StatusCode::OK,
            serde_json::json!({"status": "ok", "session_id": d.session_id, "identity": id}),
        ),
        (Some(d), Some(id)) if id.errors.is_empty() => (
            StatusCode::SERVICE_UNAVAILABLE,
            serde_json::json!({
                "status": "network-failed",
                "session_id": d.session_id,
                "reason": format!("network not applied: {net_errors}"),
                "identity": id,
            }),
        ),
        (Some(d), Some(id)) => (
            StatusCode::SERVICE_UNAVAILABLE,
            serde_json::json!({
                "status": "identity-failed",
                "session_id": d.session_id,
                "reason": format!("identity not applied: {}", id.errors.join("; ")),
                "identity": id,
            }),
        ),
        _ => (
            StatusCode::SERVICE_UNAVAILABLE,
            serde_json::json!({"status": "waiting", "reason": st.waiting}),
        ),
    };
    if let Some(n) = &st.network {
        body["network"] = serde_json::json!(n);
    }
    (code, Json(body))
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
                Err(e) => a.waiting(format!("no vm data at {}: {e}", path.display())),
                Ok(bytes) => {
                    let _ = a.accept(&bytes, &path.display().to_string());
                }
            }
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// Reads JSON lines from the virtio-serial port, on a thread of its own (the port is a
/// character device: blocking reads). While no host is connected a read returns 0 at once,
/// so an empty read waits 100 ms; after each line the report goes back on the port.
fn watch_vm_data_port(a: Arc<Agent>, path: PathBuf) {
    let from = path.display().to_string();
    loop {
        let mut port = match std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .open(&path)
        {
            Ok(p) => p,
            Err(e) => {
                a.waiting(format!("no vm data port at {from}: {e}"));
                std::thread::sleep(Duration::from_millis(200));
                continue;
            }
        };
        a.waiting(format!("waiting for the host on {from}"));
        let mut line = Vec::new();
        let mut buf = [0u8; 4096];
        loop {
            match port.read(&mut buf) {
                Ok(0) => {
                    line.clear();
                    std::thread::sleep(Duration::from_millis(100));
                }
                Ok(n) => {
                    line.extend_from_slice(&buf[..n]);
                    while let Some(end) = line.iter().position(|&b| b == b'\n') {
                        let one: Vec<u8> = line.drain(..=end).collect();
                        let answer = match a.accept(&one, &from) {
                            Ok(report) => serde_json::json!({"ok": true, "identity": report}),
                            Err(why) => serde_json::json!({"ok": false, "error": why}),
                        };
                        let mut out = answer.to_string().into_bytes();
                        out.push(b'\n');
                        if let Err(e) = port.write_all(&out) {
                            tracing::warn!(error = %e, "could not answer on the vm data port");
                        }
                    }
                    if line.len() > 1 << 20 {
                        tracing::warn!("vm data line over 1 MiB without a newline; dropped");
                        line.clear();
                    }
                }
                Err(e) => {
                    tracing::warn!(error = %e, port = %from, "vm data port read failed; reopening");
                    std::thread::sleep(Duration::from_millis(200));
                    break;
                }
            }
        }
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
        let Some(data) = a.data() else {
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
        state: Mutex::new(State_ {
            waiting: "vm data not read yet".into(),
            ..State_::default()
        }),
        apply_identity: args.apply_identity,
        machine_id_file: args.machine_id_file.clone(),
    });
    let listener = match tokio::net::TcpListener::bind(&args.listen).await {
        Ok(l) => l,
        Err(e) => {
            eprintln!("vncgate-agent: --listen {}: {e}", args.listen);
            return std::process::ExitCode::from(2);
        }
    };
    if let Some(file) = &args.vm_data {
        tokio::spawn(watch_vm_data(agent.clone(), file.clone()));
    }
    if let Some(port) = args.vm_data_port.clone() {
        let agent = agent.clone();
        std::thread::spawn(move || watch_vm_data_port(agent, port));
    }
    if args.vm_data_mmds {
        tokio::spawn(mmds::watch(
            agent.clone(),
            args.mmds_url.clone(),
            args.mmds_iface.clone(),
        ));
    }
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

#[cfg(test)]
mod tests {
    use super::*;
    use vncgate_controller::backend::firecracker::GuestNet;
    use vncgate_controller::backend::firecracker::guest::Document;

    fn agent() -> Arc<Agent> {
        Arc::new(Agent {
            state: Mutex::new(State_::default()),
            apply_identity: false,
            machine_id_file: "/nonexistent/machine-id".into(),
        })
    }

    /// The document as the backend writes it (`push_data`) and MMDS serves it back.
    const DOCUMENT: &[u8] = br#"{"network":{"gateway":"172.30.0.1","ip":"172.30.0.2","mac":"06:00:ac:1e:00:02","prefix":24},"vncgate":{"agent_token":"tok","controller_url":"http://172.30.0.1:8000","entropy":"","issued_at_ms":1,"provider":"github","session_id":"sess-1"}}"#;

    fn net_report(errors: &[&str]) -> mmds::NetReport {
        let spec = Document::parse(DOCUMENT).unwrap().network.unwrap();
        mmds::apply(
            "eth0",
            &spec,
            vncgate_controller::backend::firecracker::guest::network_commands("eth0", &spec, None),
            |c| match errors.first() {
                Some(e) if c[0] == "route" => Err((*e).to_owned()),
                _ => Ok(()),
            },
        )
    }

    async fn health_of(a: &Arc<Agent>) -> (u16, serde_json::Value) {
        let (code, Json(body)) = health(State(a.clone())).await;
        (code.as_u16(), body)
    }

    #[tokio::test]
    async fn mmds_data_goes_through_accept_and_health_waits_for_the_network() {
        let a = agent();
        let (code, body) = health_of(&a).await;
        assert_eq!((code, body["status"].as_str()), (503, Some("waiting")));

        let doc = Document::parse(DOCUMENT).unwrap();
        assert_eq!(
            doc.network,
            Some(GuestNet {
                ip: "172.30.0.2".parse().unwrap(),
                prefix: 24,
                gateway: "172.30.0.1".parse().unwrap(),
                mac: "06:00:ac:1e:00:02".into()
            })
        );
        a.network(net_report(&["RTNETLINK answers: Network is unreachable"]));
        a.accept(&doc.vm_data.unwrap(), "MMDS at http://169.254.169.254")
            .unwrap();
        assert_eq!(a.data().unwrap().session_id, "sess-1");
        let (code, body) = health_of(&a).await;
        assert_eq!(code, 503, "{body}");
        assert_eq!(body["status"], "network-failed");
        assert_eq!(
            body["reason"],
            "network not applied: ip route replace default via 172.30.0.1 dev eth0: RTNETLINK answers: Network is unreachable"
        );
        assert_eq!(body["network"]["commands"].as_array().unwrap().len(), 4);

        a.network(net_report(&[]));
        let (code, body) = health_of(&a).await;
        assert_eq!((code, body["status"].as_str()), (200, Some("ok")), "{body}");
        assert_eq!(body["session_id"], "sess-1");
        assert_eq!(body["network"]["mac"], "06:00:ac:1e:00:02");
        assert_eq!(body["network"]["errors"], serde_json::json!([]));
        assert_eq!(
            body["network"]["commands"][2],
            "ip addr add 172.30.0.2/24 dev eth0"
        );
    }

    #[tokio::test]
    async fn without_mmds_health_has_no_network_field() {
        let a = agent();
        a.accept(
            &Document::parse(DOCUMENT).unwrap().vm_data.unwrap(),
            "a file",
        )
        .unwrap();
        let (code, body) = health_of(&a).await;
        assert_eq!(code, 200, "{body}");
        assert!(body.get("network").is_none(), "{body}");
    }

    #[test]
    fn the_mmds_flags() {
        let a =
            Args::try_parse_from(["vncgate-agent", "--vm-data-mmds", "--apply-identity"]).unwrap();
        assert!(a.vm_data_mmds && a.apply_identity);
        assert_eq!(
            (a.mmds_iface.as_str(), a.mmds_url.as_str()),
            ("eth0", "http://169.254.169.254")
        );
        assert!(Args::try_parse_from(["vncgate-agent"]).is_err());
    }
}
