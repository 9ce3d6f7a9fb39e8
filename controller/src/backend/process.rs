//! The `process` backend, the embedded default: a "VM" is two local processes on free
//! loopback ports, a VNC server and `vncgate-agent`, in a directory of their own.
//!
//! The VNC server is the synthetic desktop (`vncgate-loadtest fakevm`, found beside this
//! binary) or any command given as `--process-vnc 'CMD {port}'` (Xvnc, x11vnc...);
//! `--process-vnc '/bin/sleep 600'` is the seed's failure, a VM whose agent is healthy and
//! whose VNC server never starts. Each process runs in its own process group, so a
//! controller that is killed leaves them running, and the next one adopts them by their
//! pids and start times (a pid the kernel reused is not adopted). The per-VM data goes into
//! `vm-data.json` in the VM's directory, written whole by rename; the agent reads it from
//! there.

use std::net::{Ipv4Addr, SocketAddr};
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::{Deserialize, Serialize};

use super::host::{Proc, free_port, running_in, spawn};
use super::{Backend, BackendError, Vm, VmAddrs, VmData};

/// How the backend starts its processes.
#[derive(Debug, Clone)]
pub struct ProcessConfig {
    /// A shell command with `{port}` for the VNC server; `None`: the synthetic desktop.
    pub vnc_command: Option<String>,
    /// The agent binary.
    pub agent: PathBuf,
    /// The synthetic desktop's binary (`vncgate-loadtest`), for the default VNC server.
    pub desktop: PathBuf,
    /// Where each VM's directory goes.
    pub work_dir: PathBuf,
}

impl ProcessConfig {
    /// Binaries beside this executable (cargo builds them into one directory), VMs under
    /// `work_dir`.
    pub fn beside_this_binary(vnc_command: Option<String>, work_dir: PathBuf) -> Self {
        let dir = std::env::current_exe()
            .ok()
            .and_then(|e| e.parent().map(Path::to_path_buf))
            .unwrap_or_default();
        Self {
            vnc_command,
            agent: dir.join("vncgate-agent"),
            desktop: dir.join("vncgate-loadtest"),
            work_dir,
        }
    }
}

pub struct ProcessBackend {
    cfg: ProcessConfig,
}

/// What a process VM is persisted as.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
struct Handle {
    dir: PathBuf,
    vnc: Proc,
    agent: Proc,
    addrs: VmAddrs,
}

impl ProcessBackend {
    pub fn new(cfg: ProcessConfig) -> Result<Self, String> {
        if !cfg.agent.is_file() {
            return Err(format!(
                "the process backend needs vncgate-agent at {} (cargo build -p vncgate-controller)",
                cfg.agent.display()
            ));
        }
        if cfg.vnc_command.is_none() && !cfg.desktop.is_file() {
            return Err(format!(
                "the process backend's synthetic desktop needs vncgate-loadtest at {} (cargo build -p vncgate-loadtest), or give --process-vnc 'CMD {{port}}'",
                cfg.desktop.display()
            ));
        }
        std::fs::create_dir_all(&cfg.work_dir)
            .map_err(|e| format!("--work-dir {}: {e}", cfg.work_dir.display()))?;
        Ok(Self { cfg })
    }
}

impl Backend for ProcessBackend {
    fn name(&self) -> &'static str {
        "process"
    }

    async fn start(&self, session: &str) -> Result<Vm, BackendError> {
        let dir = self.cfg.work_dir.join(session);
        std::fs::create_dir_all(&dir)
            .map_err(|e| BackendError(format!("VM directory {}: {e}", dir.display())))?;
        let (vnc_port, agent_port) = (free_port()?, free_port()?);
        let vnc = match &self.cfg.vnc_command {
            Some(cmd) => {
                let line = cmd.replace("{port}", &vnc_port.to_string());
                spawn(
                    &dir,
                    "vnc",
                    Path::new("/bin/sh"),
                    &["-c".into(), format!("exec {line}")],
                )?
            }
            None => spawn(
                &dir,
                "vnc",
                &self.cfg.desktop,
                &[
                    "fakevm".into(),
                    "--listen".into(),
                    format!("127.0.0.1:{vnc_port}"),
                    "--name".into(),
                    format!("vncgate session {session}"),
                ],
            )?,
        };
        let agent = match spawn(
            &dir,
            "agent",
            &self.cfg.agent,
            &[
                "--listen".into(),
                format!("127.0.0.1:{agent_port}"),
                "--vm-data".into(),
                dir.join("vm-data.json").display().to_string(),
                "--credentials-file".into(),
                dir.join("credentials.json").display().to_string(),
            ],
        ) {
            Ok(a) => a,
            Err(e) => {
                vnc.signal(rustix::process::Signal::KILL);
                return Err(e);
            }
        };
        let addrs = VmAddrs {
            agent: SocketAddr::from((Ipv4Addr::LOCALHOST, agent_port)),
            vnc: SocketAddr::from((Ipv4Addr::LOCALHOST, vnc_port)),
        };
        let handle = Handle {
            dir,
            vnc,
            agent,
            addrs,
        };
        let value = serde_json::to_value(&handle).expect("a handle serializes");
        // Beside the VM too, so a controller that lost the session record finds the orphan.
        if let Err(e) = std::fs::write(handle.dir.join("handle.json"), value.to_string()) {
            tracing::warn!(session, error = %e, "cannot write the VM's handle.json");
        }
        Ok(Vm {
            addrs,
            handle: value,
            vnc_password: None,
            guest_vnc_port: None,
        })
    }

    async fn push_data(&self, vm: &Vm, data: &VmData) -> Result<(), BackendError> {
        let h: Handle = serde_json::from_value(vm.handle.clone())
            .map_err(|e| BackendError(format!("not a process VM handle: {e}")))?;
        let tmp = h.dir.join("vm-data.json.tmp");
        let body = serde_json::to_vec(data).expect("vm data serializes");
        std::fs::write(&tmp, body)
            .and_then(|()| std::fs::rename(&tmp, h.dir.join("vm-data.json")))
            .map_err(|e| BackendError(format!("writing vm-data.json in {}: {e}", h.dir.display())))
    }

    async fn alive(&self, vm: &Vm) -> bool {
        serde_json::from_value::<Handle>(vm.handle.clone())
            .is_ok_and(|h| h.vnc.alive() && h.agent.alive())
    }

    async fn stop(&self, vm: &Vm) -> Result<(), BackendError> {
        let h: Handle = serde_json::from_value(vm.handle.clone())
            .map_err(|e| BackendError(format!("not a process VM handle: {e}")))?;
        for p in [h.vnc, h.agent] {
            p.signal(rustix::process::Signal::TERM);
        }
        for _ in 0..40 {
            if !h.vnc.alive() && !h.agent.alive() {
                break;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        for p in [h.vnc, h.agent] {
            p.signal(rustix::process::Signal::KILL);
        }
        let _ = std::fs::remove_dir_all(&h.dir);
        Ok(())
    }

    async fn running(&self) -> Vec<Vm> {
        running_in(self, &self.cfg.work_dir).await
    }

    async fn adopt(&self, handle: &serde_json::Value) -> Option<Vm> {
        let h: Handle = serde_json::from_value(handle.clone()).ok()?;
        (h.vnc.alive() || h.agent.alive()).then(|| Vm {
            addrs: h.addrs,
            handle: handle.clone(),
            vnc_password: None,
            guest_vnc_port: None,
        })
    }
}
