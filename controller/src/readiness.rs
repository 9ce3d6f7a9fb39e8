//! Readiness that means a desktop: the agent answers `GET /health` with 200 AND the VNC port
//! completes the RFB handshake to a non-empty ServerInit ([`crate::probe::Depth::Desktop`]).
//! One round of both checks is a [`Report`], kept in the session record as its last probe
//! results, so `GET /api/sessions/{id}` says which check failed and how, without SSH.

use std::time::{Duration, Instant};

use serde::Serialize;

use crate::backend::Vm;
use crate::probe::{self, Depth, ProbeOutcome};

/// The agent's answer to `GET /health`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct AgentCheck {
    pub addr: String,
    pub healthy: bool,
    /// The HTTP status, when one came back.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub status: Option<u16>,
    /// What went wrong: the connection error, or the body of a non-200 answer.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
    /// The identity report the agent gave (what it did with the clock, the RNG and the
    /// machine id), as it gave it.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub identity: Option<serde_json::Value>,
}

/// The VNC port's answer, as the probe classified it.
#[derive(Debug, Clone, Serialize)]
pub struct VncCheck {
    pub addr: String,
    /// The port inside the guest, when `addr` is a forward to it.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub guest_port: Option<u16>,
    pub ready: bool,
    /// The probe's JSON (`status`: desktop, handshake, refused, timeout, not-rfb, ...).
    pub probe: serde_json::Value,
    /// The failed check's metric label, when it failed.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub failed_check: Option<&'static str>,
    #[serde(skip)]
    pub outcome: Option<ProbeOutcome>,
}

/// One round of both checks.
#[derive(Debug, Clone, Serialize)]
pub struct Report {
    /// Unix milliseconds.
    pub at: u64,
    pub agent: AgentCheck,
    pub vnc: VncCheck,
}

impl Report {
    pub fn ready(&self) -> bool {
        self.agent.healthy && self.vnc.ready
    }

    /// The failed check's label (`agent` first), for metrics.
    pub fn failed_check(&self) -> Option<&'static str> {
        if !self.agent.healthy {
            return Some("agent");
        }
        self.vnc.failed_check
    }

    /// What is wrong, in one line naming the check, the address and the last error, e.g.
    /// `vnc port 127.0.0.1:5901: refused: nothing listens on 127.0.0.1:5901; agent healthy`.
    pub fn describe(&self) -> String {
        let agent = if self.agent.healthy {
            "agent healthy".to_owned()
        } else {
            format!(
                "agent {}: {}",
                self.agent.addr,
                self.agent.error.as_deref().unwrap_or("not healthy")
            )
        };
        let port = match self.vnc.guest_port {
            Some(g) => format!("{} (guest port {g})", self.vnc.addr),
            None => self.vnc.addr.clone(),
        };
        let vnc = match &self.vnc.outcome {
            Some(o) => format!("vnc port {port}: {o}"),
            None => format!("vnc port {port}: not probed"),
        };
        if self.vnc.ready {
            format!("{agent}; {vnc}")
        } else {
            format!("{vnc}; {agent}")
        }
    }
}

/// Checks the agent's health within `timeout`. Healthy means a 200 that carries the agent's
/// identity report, and, for a VM cloned from a snapshot (`clone`), one that says the
/// identity was applied: a clone that kept the snapshot's RNG and machine id is not ready.
pub async fn check_agent(
    http: &reqwest::Client,
    vm: &Vm,
    timeout: Duration,
    clone: bool,
) -> AgentCheck {
    let addr = vm.addrs.agent.to_string();
    let url = format!("http://{addr}/health");
    let unhealthy = |status, identity, error: String| AgentCheck {
        addr: addr.clone(),
        healthy: false,
        status,
        error: Some(error),
        identity,
    };
    match http.get(&url).timeout(timeout).send().await {
        Ok(r) => {
            let status = r.status().as_u16();
            let body = r.text().await.unwrap_or_default();
            let identity = serde_json::from_str::<serde_json::Value>(&body)
                .ok()
                .and_then(|v| v.get("identity").cloned());
            if status != 200 {
                let mut body = body.trim().to_owned();
                body.truncate(200);
                return unhealthy(
                    Some(status),
                    identity,
                    format!("/health answered {status}: {body}"),
                );
            }
            let applied = identity
                .as_ref()
                .and_then(|i| i.get("applied"))
                .and_then(serde_json::Value::as_bool);
            match applied {
                None => unhealthy(
                    Some(200),
                    identity,
                    "/health answered 200 without an identity report".into(),
                ),
                Some(false) if clone => unhealthy(
                    Some(200),
                    identity,
                    "identity not applied: the agent of a cloned VM must run with --apply-identity"
                        .into(),
                ),
                Some(_) => AgentCheck {
                    addr: addr.clone(),
                    healthy: true,
                    status: Some(200),
                    error: None,
                    identity,
                },
            }
        }
        Err(e) => unhealthy(
            None,
            None,
            if e.is_timeout() {
                format!("/health did not answer within {timeout:?}")
            } else if e.is_connect() {
                "/health: connection refused".to_owned()
            } else {
                format!("/health: {e}")
            },
        ),
    }
}

/// Probes the VNC port to ServerInit within `timeout` (on a blocking thread: one probe is
/// one connection and a few reads).
pub async fn check_vnc(vm: &Vm, timeout: Duration) -> VncCheck {
    let addr = vm.addrs.vnc.to_string();
    let depth = Depth::Desktop {
        password: vm.vnc_password.as_ref().map(|p| p.as_bytes().to_vec()),
    };
    let target = addr.clone();
    let started = Instant::now();
    let outcome = tokio::task::spawn_blocking(move || probe::probe_to(&target, timeout, &depth))
        .await
        .unwrap_or_else(|e| ProbeOutcome::Error {
            detail: format!("probe task failed: {e}"),
        });
    let probe = serde_json::from_str(&outcome.to_json(&addr, started.elapsed()))
        .expect("the probe's JSON parses");
    VncCheck {
        guest_port: vm.guest_vnc_port,
        ready: outcome.is_ready(),
        failed_check: outcome.failed_check(),
        addr,
        probe,
        outcome: Some(outcome),
    }
}

/// Both checks, at once.
pub async fn check(http: &reqwest::Client, vm: &Vm, timeout: Duration, clone: bool) -> Report {
    let (agent, vnc) = tokio::join!(
        check_agent(http, vm, timeout, clone),
        check_vnc(vm, timeout)
    );
    Report {
        at: vncgate_schema::session::unix_now_ms(),
        agent,
        vnc,
    }
}
