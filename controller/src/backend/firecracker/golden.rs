//! `vncgate-controller golden firecracker-snapshot`: boots the golden VM cold
//! ([`FirecrackerBackend::boot_golden`]), waits until it is what a session needs (its agent
//! answers HTTP, any status: before its MMDS data it says `waiting`; its VNC port completes
//! an RFB handshake to ServerInit), and saves the snapshot ([`super::GoldenBoot::snapshot`]).
//!
//! The files are written beside the configured ones (`<name>.new`) and renamed over them
//! last: a running clone maps the memory file private, and overwriting it in place would
//! change the pages it has not copied yet; a rename leaves it the old inode.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use super::{FirecrackerBackend, FirecrackerConfig};
use crate::probe::{self, Depth};

/// What a saved snapshot took.
#[derive(Debug, Clone)]
pub struct Made {
    pub boot_ms: u64,
    pub save_ms: u64,
    /// False with `allow_missing_vnc` when the VNC port never completed a handshake.
    pub vnc_checked: bool,
    pub vmstate: PathBuf,
    pub memory: PathBuf,
}

fn beside(p: &Path) -> PathBuf {
    let mut name = p.file_name().unwrap_or_default().to_os_string();
    name.push(".new");
    p.with_file_name(name)
}

/// Any HTTP answer from the agent's `/health`, or what happened instead.
async fn agent_answer(http: &reqwest::Client, addr: SocketAddr) -> Result<String, String> {
    match http.get(format!("http://{addr}/health")).send().await {
        Ok(r) => Ok(format!("HTTP {}", r.status().as_u16())),
        Err(e) if e.is_connect() => Err("connection refused".into()),
        Err(e) if e.is_timeout() => Err("no answer within 2 s".into()),
        Err(e) => Err(e.to_string()),
    }
}

/// Boots, checks, saves. `Err(why)` names the port that failed and what it answered, with
/// the end of the guest's console.
pub async fn snapshot(
    mut cfg: FirecrackerConfig,
    boot_timeout: Duration,
    allow_missing_vnc: bool,
) -> Result<Made, String> {
    if cfg.netns.is_some() {
        return Err("--fc-netns: the golden VM is checked from this process's network namespace; run the whole command under `ip netns exec NS` without --fc-netns instead".into());
    }
    if cfg.cold_boot.is_none() {
        return Err("no kernel for the golden VM's cold boot (--kernel)".into());
    }
    let (vmstate, memory) = (cfg.golden.vmstate.clone(), cfg.golden.memory.clone());
    for p in [&vmstate, &memory] {
        if let Some(dir) = p.parent().filter(|d| !d.as_os_str().is_empty()) {
            std::fs::create_dir_all(dir).map_err(|e| format!("{}: {e}", dir.display()))?;
        }
    }
    cfg.golden.vmstate = beside(&vmstate);
    cfg.golden.memory = beside(&memory);
    let agent = SocketAddr::from((cfg.subnet.golden(), cfg.agent_port));
    let vnc = SocketAddr::from((cfg.subnet.golden(), cfg.vnc_port));
    let b = FirecrackerBackend::new(cfg)?;
    let http = reqwest::Client::builder()
        .no_proxy()
        .timeout(Duration::from_secs(2))
        .build()
        .map_err(|e| e.to_string())?;
    let started = Instant::now();
    tracing::info!(%agent, %vnc, "booting the golden VM");
    let golden = b.boot_golden().await.map_err(|e| e.0)?;
    let console = golden.console.clone();
    let tail = || {
        let text = std::fs::read_to_string(&console).unwrap_or_default();
        let lines: Vec<&str> = text.lines().rev().take(10).collect();
        let lines: Vec<&str> = lines.into_iter().rev().collect();
        format!(
            "; the console ({}) ends: {}",
            console.display(),
            lines.join(" | ")
        )
    };
    let mut agent_seen = Err("not asked".to_owned());
    let vnc_checked = loop {
        if agent_seen.is_err() {
            agent_seen = agent_answer(&http, agent).await;
        }
        let target = vnc.to_string();
        let outcome = tokio::task::spawn_blocking(move || {
            probe::probe_to(
                &target,
                Duration::from_secs(2),
                &Depth::Desktop { password: None },
            )
        })
        .await
        .map_err(|e| e.to_string())?;
        if agent_seen.is_ok() && outcome.is_ready() {
            break true;
        }
        if golden.api.describe().await.is_err() {
            return Err(format!("the golden VM's Firecracker ended{}", tail()));
        }
        if started.elapsed() >= boot_timeout {
            if let Err(e) = &agent_seen {
                return Err(format!(
                    "port {} (agent) did not answer HTTP within {boot_timeout:?}: {e}{}",
                    agent.port(),
                    tail()
                ));
            }
            if allow_missing_vnc {
                tracing::warn!(%vnc, "saving a golden snapshot whose VNC port never answered (--allow-missing-vnc)");
                break false;
            }
            return Err(format!(
                "port {} (VNC) did not complete an RFB handshake within {boot_timeout:?}: {outcome}{}",
                vnc.port(),
                tail()
            ));
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    };
    let boot_ms = started.elapsed().as_millis() as u64;
    let saving = Instant::now();
    golden.snapshot().await.map_err(|e| e.0)?;
    let save_ms = saving.elapsed().as_millis() as u64;
    for p in [&vmstate, &memory] {
        std::fs::rename(beside(p), p)
            .map_err(|e| format!("{} into place: {e}", beside(p).display()))?;
    }
    Ok(Made {
        boot_ms,
        save_ms,
        vnc_checked,
        vmstate,
        memory,
    })
}

#[cfg(test)]
mod tests {
    #[test]
    fn new_files_go_beside_the_old() {
        assert_eq!(
            super::beside(std::path::Path::new("/g/golden.mem")),
            std::path::Path::new("/g/golden.mem.new")
        );
    }
}
