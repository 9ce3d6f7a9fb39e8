//! `vncgate-controller golden snapshot DIR`: boots the golden image once, and saves the
//! golden snapshot only when the VM is a desktop: its VNC port completes an RFB handshake to
//! ServerInit and its agent answers HTTP. The check the original image never had: a snapshot
//! without a VNC server is refused here, naming the port, instead of being found an hour into
//! production.
//!
//! The save: pause, migrate to a file (`snapshot/state`), quit; the disk the VM booted on, an
//! overlay of the image's root filesystem, is kept frozen as `snapshot/disk.qcow2`, the
//! backing file of every session's overlay. The snapshot is written beside and renamed into
//! place, so a failed save leaves the previous snapshot (or none), never half of one.

use std::path::PathBuf;
use std::time::{Duration, Instant};

use super::{Accel, Golden, Layout, MachineSpec, Snapshot, qmp::Qmp, spawn_qemu, tail_logs};
use crate::probe::{self, Depth, ProbeOutcome};

#[derive(Debug, Clone)]
pub struct Options {
    pub qemu: PathBuf,
    /// Overrides of the image's memory and vCPUs, and of the CPU model (every restore uses
    /// what the snapshot has).
    pub memory_mib: Option<u32>,
    pub cpu: Option<String>,
    pub vcpus: Option<u32>,
    /// How long the cold boot may take to reach a desktop.
    pub boot_timeout: Duration,
    /// Extra kernel arguments for this boot (kept in the snapshot).
    pub extra_cmdline: Option<String>,
    /// Save even when the VNC port never answers (for the test of what a session from such a
    /// snapshot does); recorded as `vnc_checked: false`.
    pub allow_missing_vnc: bool,
}

/// Where the cold boot stands, one line per check.
#[derive(Debug, Default)]
struct Seen {
    vnc: Option<ProbeOutcome>,
    agent: Option<String>,
}

impl Seen {
    fn vnc_ready(&self) -> bool {
        self.vnc.as_ref().is_some_and(ProbeOutcome::is_ready)
    }

    fn agent_answers(&self) -> bool {
        self.agent.as_ref().is_some_and(|a| a.starts_with("HTTP"))
    }
}

/// Asks the agent's `/health` for any HTTP answer (before its per-VM data it is 503
/// `waiting`: the agent runs, which is what the golden image must show).
async fn agent_answer(http: &reqwest::Client, port: u16) -> String {
    match http
        .get(format!("http://127.0.0.1:{port}/health"))
        .timeout(Duration::from_secs(2))
        .send()
        .await
    {
        Ok(r) => {
            let status = r.status().as_u16();
            let body = r.text().await.unwrap_or_default();
            format!("HTTP {status} {}", body.trim())
        }
        Err(e) if e.is_connect() => "connection refused".into(),
        Err(e) if e.is_timeout() => "no answer within 2 s".into(),
        Err(e) => format!("{e}"),
    }
}

/// Boots, checks, saves. `Ok(snapshot)` when it wrote one; `Err(why)` names the port that
/// failed and what it answered.
pub async fn snapshot(golden: &Golden, opts: &Options) -> Result<Snapshot, String> {
    let img = &golden.image;
    let accel = Accel::detect();
    let machine = MachineSpec {
        accel,
        cpu: opts
            .cpu
            .clone()
            .unwrap_or_else(|| accel.default_cpu().to_owned()),
        memory_mib: opts.memory_mib.unwrap_or(img.memory_mib),
        vcpus: opts.vcpus.unwrap_or(img.vcpus),
        cmdline: match &opts.extra_cmdline {
            Some(x) => format!("{} {x}", img.cmdline),
            None => img.cmdline.clone(),
        },
    };
    let fin = golden.snapshot_dir();
    let base_stamp = super::FileStamp::of(&golden.dir.join(&img.rootfs))?;
    let tmp = golden.dir.join("snapshot.tmp");
    let _ = std::fs::remove_dir_all(&tmp);
    std::fs::create_dir_all(&tmp).map_err(|e| format!("{}: {e}", tmp.display()))?;
    // Relative to the overlay's own directory, so the golden directory can move whole.
    let base = PathBuf::from("..").join(&img.rootfs);
    let disk = tmp.join("disk.qcow2");
    let out = std::process::Command::new("qemu-img")
        .args(["create", "-q", "-f", "qcow2", "-F", "qcow2", "-b"])
        .arg(&base)
        .arg(&disk)
        .output()
        .map_err(|e| format!("qemu-img (qemu-utils): {e}"))?;
    if !out.status.success() {
        return Err(format!(
            "qemu-img create {}: {}",
            disk.display(),
            String::from_utf8_lossy(&out.stderr).trim()
        ));
    }
    let layout = Layout::fresh(tmp.clone(), disk.clone()).map_err(|e| e.0)?;
    let args = layout.args(golden, &machine, None);
    tracing::info!(machine = ?machine, vnc = layout.vnc, agent = layout.agent, "booting the golden image");
    let qemu = spawn_qemu(&opts.qemu, &layout, &args).map_err(|e| e.0)?;
    let kill = || {
        qemu.signal(rustix::process::Signal::KILL);
    };
    let started = Instant::now();
    let http = reqwest::Client::new();
    let mut seen = Seen::default();
    let vnc_addr = format!("127.0.0.1:{}", layout.vnc);
    let needs_vnc = !opts.allow_missing_vnc;
    loop {
        if !qemu.alive() {
            return Err(format!(
                "QEMU exited during the golden boot{}",
                tail_logs(&tmp)
            ));
        }
        if !seen.vnc_ready() {
            let addr = vnc_addr.clone();
            seen.vnc = tokio::task::spawn_blocking(move || {
                probe::probe_to(
                    &addr,
                    Duration::from_secs(2),
                    &Depth::Desktop { password: None },
                )
            })
            .await
            .ok();
        }
        if !seen.agent_answers() {
            seen.agent = Some(agent_answer(&http, layout.agent).await);
        }
        if seen.agent_answers() && (seen.vnc_ready() || !needs_vnc) {
            break;
        }
        if started.elapsed() >= opts.boot_timeout {
            kill();
            let mut why = Vec::new();
            if !seen.vnc_ready() {
                why.push(format!(
                    "port {} (VNC) did not complete an RFB handshake: {}",
                    img.vnc_port,
                    seen.vnc
                        .as_ref()
                        .map(ToString::to_string)
                        .unwrap_or_else(|| "not probed".into())
                ));
            }
            if !seen.agent_answers() {
                why.push(format!(
                    "port {} (agent) did not answer HTTP: {}",
                    img.agent_port,
                    seen.agent.as_deref().unwrap_or("not asked")
                ));
            }
            let logs = tail_logs(&tmp);
            let _ = std::fs::remove_dir_all(&tmp);
            return Err(format!(
                "refusing to save the golden snapshot: after {:?}, {}{logs}",
                opts.boot_timeout,
                why.join("; ")
            ));
        }
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
    let boot_ms = started.elapsed().as_millis() as u64;
    tracing::info!(boot_ms, vnc = %seen.vnc.as_ref().map(ToString::to_string).unwrap_or_default(), agent = %seen.agent.as_deref().unwrap_or_default(), "the golden VM is a desktop; saving");
    let saved = Instant::now();
    let state = tmp.join("state");
    let save = async {
        let mut q = Qmp::connect(&layout.qmp(), Duration::from_secs(10)).await?;
        q.execute("stop", None).await?;
        // The default bandwidth cap (tens of MB/s) is for live migration over a network;
        // a file on this host takes what the disk gives.
        q.execute(
            "migrate-set-parameters",
            Some(serde_json::json!({ "max-bandwidth": 64u64 << 30 })),
        )
        .await?;
        q.execute(
            "migrate",
            Some(serde_json::json!({ "uri": format!("exec:cat > '{}'", state.display()) })),
        )
        .await?;
        q.wait_migration(Duration::from_secs(120)).await?;
        let _ = q.execute("quit", None).await;
        Ok::<(), String>(())
    };
    if let Err(e) = save.await {
        kill();
        let _ = std::fs::remove_dir_all(&tmp);
        return Err(format!("saving the golden snapshot: {e}"));
    }
    for _ in 0..100 {
        if !qemu.alive() {
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    kill();
    let save_ms = saved.elapsed().as_millis() as u64;
    let snap = Snapshot {
        version: 1,
        state: "state".into(),
        disk: "disk.qcow2".into(),
        machine,
        vnc_checked: needs_vnc,
        boot_ms,
        save_ms,
        saved_at_ms: vncgate_schema::session::unix_now_ms(),
        base: base_stamp,
    };
    for f in ["qmp.sock", "vm-data.sock"] {
        let _ = std::fs::remove_file(tmp.join(f));
    }
    std::fs::write(
        tmp.join("snapshot.json"),
        serde_json::to_vec_pretty(&snap).expect("a snapshot serializes"),
    )
    .map_err(|e| format!("{}: {e}", tmp.display()))?;
    let old = golden.dir.join("snapshot.old");
    let _ = std::fs::remove_dir_all(&old);
    if fin.exists() {
        std::fs::rename(&fin, &old).map_err(|e| format!("{}: {e}", fin.display()))?;
    }
    std::fs::rename(&tmp, &fin).map_err(|e| format!("{}: {e}", fin.display()))?;
    let _ = std::fs::remove_dir_all(&old);
    // The frozen disk must never change again: every session's overlay reads through it.
    for f in ["disk.qcow2", "state"] {
        let p = fin.join(f);
        if let Ok(m) = std::fs::metadata(&p) {
            let mut perm = m.permissions();
            perm.set_readonly(true);
            let _ = std::fs::set_permissions(&p, perm);
        }
    }
    golden.snapshot()
}
