//! `--vm-data-mmds`: the per-VM data from Firecracker's MMDS (V2). Every 500 ms the agent
//! takes a session token (`PUT /latest/api/token`) and reads the whole document (`GET /`,
//! `Accept: application/json`); the backend `PUT`s `{"vncgate": VmData, "network":
//! GuestNet}` before it resumes a clone, and the golden VM's store is empty.
//!
//! When the document carries `network`, the agent moves the interface to it (MAC, address,
//! default route) with `ip` before it takes the data: a clone wakes with the golden VM's
//! address and MAC, and the controller reaches it only at its own. The document's shape and
//! the command lines are pure, in `vncgate_controller::backend::firecracker::guest`.
//!
//! Why a fresh token and a fresh connection on every poll: the guest is snapshotted while
//! it polls, and its clones talk to another Firecracker process, which knows neither the
//! golden VM's token nor its TCP connection (MMDS's TCP stack lives in the VMM).

use std::net::Ipv4Addr;
use std::sync::Arc;
use std::time::Duration;

use serde::Serialize;
use vncgate_controller::backend::firecracker::GuestNet;
use vncgate_controller::backend::firecracker::guest::{self, Document};

use crate::Agent;

/// What the agent did to the interface for the document's `network`, as `/health` shows it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct NetReport {
    pub iface: String,
    /// The network asked for.
    #[serde(flatten)]
    pub spec: GuestNet,
    /// The `ip` command lines that ran, in order.
    pub commands: Vec<String>,
    /// What failed (the first failure stops the rest); empty when all applied.
    pub errors: Vec<String>,
}

/// Runs `ip ARGS`; its stderr is the error.
pub fn run_ip(args: &[String]) -> Result<(), String> {
    let out = std::process::Command::new("ip")
        .args(args)
        .output()
        .map_err(|e| format!("cannot run ip: {e}"))?;
    if out.status.success() {
        return Ok(());
    }
    Err(String::from_utf8_lossy(&out.stderr).trim().to_owned())
}

/// Runs `commands` in order through `run`, stopping at the first failure.
pub fn apply(
    iface: &str,
    spec: &GuestNet,
    commands: Vec<Vec<String>>,
    mut run: impl FnMut(&[String]) -> Result<(), String>,
) -> NetReport {
    let mut report = NetReport {
        iface: iface.into(),
        spec: spec.clone(),
        commands: Vec::new(),
        errors: Vec::new(),
    };
    for c in commands {
        let line = format!("ip {}", c.join(" "));
        match run(&c) {
            Ok(()) => report.commands.push(line),
            Err(e) => {
                report.errors.push(format!("{line}: {e}"));
                break;
            }
        }
    }
    report
}

/// The MMDS address to route on the interface: the URL's host when it is link-local (as
/// Firecracker's is); any other (a test's loopback server) needs no route.
pub fn route_target(url: &str) -> Option<Ipv4Addr> {
    let u = reqwest::Url::parse(url).ok()?;
    u.host_str()?
        .parse::<Ipv4Addr>()
        .ok()
        .filter(Ipv4Addr::is_link_local)
}

/// One token and one read of the whole document.
async fn fetch(http: &reqwest::Client, base: &str) -> Result<serde_json::Value, String> {
    let base = base.trim_end_matches('/');
    let r = http
        .put(format!("{base}/latest/api/token"))
        .header("X-metadata-token-ttl-seconds", "60")
        .send()
        .await
        .map_err(|e| format!("PUT /latest/api/token: {e}"))?;
    let status = r.status().as_u16();
    let token = r.text().await.unwrap_or_default();
    if status != 200 {
        return Err(format!("PUT /latest/api/token: {status} {}", token.trim()));
    }
    let r = http
        .get(format!("{base}/"))
        .header("X-metadata-token", token.trim())
        .header("Accept", "application/json")
        .send()
        .await
        .map_err(|e| format!("GET /: {e}"))?;
    let status = r.status().as_u16();
    let body = r.bytes().await.map_err(|e| format!("GET /: {e}"))?;
    if status != 200 {
        return Err(format!(
            "GET /: {status} {}",
            String::from_utf8_lossy(&body).trim()
        ));
    }
    serde_json::from_slice(&body).map_err(|e| {
        format!(
            "GET /: the body is not JSON ({e}): {}",
            String::from_utf8_lossy(&body)
        )
    })
}

/// Polls MMDS forever: routes it first, applies `network` whenever it differs from what was
/// applied (a failure is retried at every poll), and takes `vncgate` whenever the document
/// changes.
pub async fn watch(a: Arc<Agent>, url: String, iface: String) {
    let from = format!("MMDS at {url}");
    let http = match reqwest::Client::builder()
        .no_proxy()
        .pool_max_idle_per_host(0)
        .timeout(Duration::from_secs(1))
        .build()
    {
        Ok(h) => h,
        Err(e) => {
            a.waiting(format!("{from}: no HTTP client: {e}"));
            return;
        }
    };
    let mmds = route_target(&url);
    let mut routed = mmds.is_none();
    let mut applied: Option<GuestNet> = None;
    let mut seen: Option<serde_json::Value> = None;
    let mut last_error = String::new();
    loop {
        if !routed && let Some(m) = mmds {
            let cmd = guest::mmds_route(&iface, m);
            match run_ip(&cmd) {
                Ok(()) => routed = true,
                Err(e) => a.waiting(format!("no route to {from}: ip {}: {e}", cmd.join(" "))),
            }
        }
        match fetch(&http, &url).await {
            Err(e) => {
                let why = format!("no vm data from {from}: {e}");
                if why != last_error {
                    tracing::info!(reason = %why, "waiting for MMDS");
                    last_error.clone_from(&why);
                }
                a.waiting(why);
            }
            Ok(value) => {
                let body = serde_json::to_vec(&value).expect("JSON serializes");
                match Document::parse(&body) {
                    Err(e) => a.waiting(format!("vm data from {from}: {e}")),
                    Ok(doc) => {
                        if let Some(n) = &doc.network
                            && applied.as_ref() != Some(n)
                        {
                            let r =
                                apply(&iface, n, guest::network_commands(&iface, n, mmds), run_ip);
                            if r.errors.is_empty() {
                                tracing::info!(iface, ip = %n.ip, mac = n.mac, "network applied");
                                applied = Some(n.clone());
                            } else if r.errors.join("; ") != last_error {
                                tracing::error!(iface, errors = ?r.errors, "network not applied; retrying");
                                last_error = r.errors.join("; ");
                            }
                            a.network(r);
                        }
                        if seen.as_ref() != Some(&value) {
                            match &doc.vm_data {
                                Some(d) => {
                                    let _ = a.accept(d, &from);
                                }
                                None => a.waiting(format!("{from} has no vncgate data yet")),
                            }
                            seen = Some(value);
                        }
                    }
                }
            }
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spec() -> GuestNet {
        GuestNet {
            ip: Ipv4Addr::new(172, 30, 0, 3),
            prefix: 24,
            gateway: Ipv4Addr::new(172, 30, 0, 1),
            mac: "06:00:ac:1e:00:03".into(),
        }
    }

    #[test]
    fn the_first_failure_stops_the_rest_and_is_reported() {
        let cmds = guest::network_commands("eth0", &spec(), Some(guest::MMDS_ADDR));
        let mut ran = Vec::new();
        let r = apply("eth0", &spec(), cmds, |c| {
            ran.push(c.join(" "));
            if c[1] == "flush" {
                Err("RTNETLINK answers: Operation not permitted".into())
            } else {
                Ok(())
            }
        });
        assert_eq!(ran.len(), 2);
        assert_eq!(
            r.commands,
            ["ip link set dev eth0 address 06:00:ac:1e:00:03"]
        );
        assert_eq!(
            r.errors,
            ["ip addr flush dev eth0: RTNETLINK answers: Operation not permitted"]
        );
        let all = apply(
            "eth0",
            &spec(),
            guest::network_commands("eth0", &spec(), None),
            |_| Ok(()),
        );
        assert_eq!((all.commands.len(), all.errors.len()), (5, 0));
        assert_eq!(
            serde_json::to_value(&all).unwrap()["ip"],
            serde_json::json!("172.30.0.3")
        );
    }

    #[test]
    fn only_a_link_local_mmds_gets_a_route() {
        assert_eq!(
            route_target("http://169.254.169.254"),
            Some(guest::MMDS_ADDR)
        );
        assert_eq!(
            route_target("http://169.254.170.2:80/"),
            Some(Ipv4Addr::new(169, 254, 170, 2))
        );
        assert_eq!(route_target("http://127.0.0.1:9000"), None);
        assert_eq!(route_target("http://mmds.local"), None);
        assert_eq!(route_target("not a url"), None);
    }
}
