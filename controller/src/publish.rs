//! Publishing a session's route once its VM is ready, and withdrawing it.
//!
//! "Ready" is decided by [`probe::probe_to`]: the VM's VNC port answers with an RFB
//! `ProtocolVersion` banner, or with [`probe::Depth::Desktop`] completes the handshake to a
//! non-empty ServerInit. Until then nothing is written, so a gateway never routes a
//! browser to a VM whose VNC server has not started (the close-1006 case this project
//! exists to end). Routes are written through the shared schema
//! ([`vncgate_schema::store`]), exactly as the gateway's `vncgate route add` writes them.

use std::time::{Duration, Instant};

use vncgate_schema::store;
use vncgate_schema::{RedisUrl, RemovalReason, RouteRecord, record};

use crate::probe::{self, ProbeOutcome};

/// A route to publish when its VM is ready.
#[derive(Debug, Clone)]
pub struct Publish {
    pub session: String,
    /// HOST:PORT of the VM's VNC server.
    pub vnc: String,
    pub token: Option<String>,
    pub ttl: Option<Duration>,
    pub max_viewers: Option<u32>,
    /// How long to wait for readiness.
    pub wait: Duration,
    /// Deadline of one probe.
    pub probe_timeout: Duration,
    /// How far each probe goes.
    pub depth: probe::Depth,
}

/// What publishing ended with.
#[derive(Debug)]
pub enum Published {
    /// The VM was ready; this record was written and announced.
    Route(RouteRecord),
    /// The VM never became ready within the wait; nothing was written. The last probe says
    /// why.
    NotReady(ProbeOutcome),
}

fn runtime() -> Result<tokio::runtime::Runtime, String> {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(|e| format!("cannot start a runtime: {e}"))
}

/// Probes the VM until it is ready (every 250 ms, up to `p.wait`), then writes the route.
/// Checks everything it can before probing: a bad session id or token is an error at once.
pub fn publish_when_ready(url: &RedisUrl, p: &Publish) -> Result<Published, String> {
    vncgate_schema::check_session_id(&p.session)?;
    let token_sha256 = p
        .token
        .as_ref()
        .map(|t| record::checked_token_digest(t.as_bytes()))
        .transpose()
        .map_err(|e| format!("--token: {e}"))?;
    let rt = runtime()?;
    // Reachable Redis first: a session should not wait out its VM's boot to learn that.
    let mut conn = rt.block_on(url.connect_for_command())?;
    let deadline = Instant::now() + p.wait;
    let upstream = loop {
        match probe::probe_to(&p.vnc, p.probe_timeout, &p.depth) {
            ProbeOutcome::Ready { addr, .. } => break addr,
            other if Instant::now() >= deadline => return Ok(Published::NotReady(other)),
            _ => std::thread::sleep(Duration::from_millis(250)),
        }
    };
    record::check_upstream(&upstream).map_err(|e| format!("--vnc: {e}"))?;
    let now = vncgate_schema::unix_now();
    let rec = RouteRecord {
        upstream,
        token_sha256,
        view_token_sha256: None,
        expires_at: p
            .ttl
            .map(|d| record::expires_after(d.max(Duration::from_secs(1)))),
        max_viewers: p.max_viewers,
        created_at: now,
        writer: Some("vncgate-controller".into()),
        record: false,
    };
    rt.block_on(store::put_route(&mut conn, &p.session, &rec))
        .map_err(|e| format!("cannot write the route: {e}"))?;
    Ok(Published::Route(rec))
}

/// Deletes a route; gateways close its sessions (4006, or 4005 for `Expired`). Returns
/// whether there was one.
pub fn withdraw(url: &RedisUrl, session: &str, reason: RemovalReason) -> Result<bool, String> {
    vncgate_schema::check_session_id(session)?;
    let rt = runtime()?;
    rt.block_on(async {
        let mut c = url.connect_for_command().await?;
        store::delete_route(&mut c, session, reason)
            .await
            .map_err(|e| format!("cannot delete the route: {e}"))
    })
}
