//! A client for Firecracker's API on its unix socket: one connection per call, the bytes
//! from [`super::http`], and every failure as a [`BackendError`] that names the call
//! (`firecracker PUT /snapshot/load: 400 Load snapshot error: ...`), with Firecracker's
//! `fault_message` verbatim.

use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::Deserialize;
use serde_json::{Value, json};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::UnixStream;

use super::http;
use crate::backend::BackendError;

/// Firecracker's API at one socket.
#[derive(Debug, Clone)]
pub struct ApiClient {
    socket: PathBuf,
    /// For each call as a whole (connect, write, read): a snapshot of a large guest is
    /// written within the call, so callers that create one raise it.
    timeout: Duration,
}

/// `GET /`: who the process is and what its VM is doing.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
pub struct InstanceInfo {
    pub id: String,
    /// `Not started`, `Running` or `Paused`.
    pub state: String,
    pub vmm_version: String,
}

/// A network interface's configuration before boot.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NetworkInterface<'a> {
    pub iface_id: &'a str,
    pub host_dev_name: &'a str,
    pub guest_mac: &'a str,
}

impl ApiClient {
    pub fn new(socket: impl Into<PathBuf>, timeout: Duration) -> Self {
        Self {
            socket: socket.into(),
            timeout,
        }
    }

    pub fn socket(&self) -> &Path {
        &self.socket
    }

    /// The same socket with another timeout.
    pub fn with_timeout(&self, timeout: Duration) -> Self {
        Self {
            socket: self.socket.clone(),
            timeout,
        }
    }

    /// One call: the status and body of a 2xx answer; anything else is an error naming the
    /// call, with Firecracker's `fault_message` when it sent one.
    pub async fn call(
        &self,
        method: &str,
        path: &str,
        body: Option<&Value>,
    ) -> Result<http::Response, BackendError> {
        let what = format!("firecracker {method} {path}");
        let body = body.map(|b| serde_json::to_vec(b).expect("JSON serializes"));
        let request = http::encode_request(method, path, body.as_deref());
        let exchange = async {
            let mut stream = UnixStream::connect(&self.socket).await.map_err(|e| {
                BackendError(format!(
                    "{what}: cannot connect to {}: {e}",
                    self.socket.display()
                ))
            })?;
            stream
                .write_all(&request)
                .await
                .map_err(|e| BackendError(format!("{what}: writing the request: {e}")))?;
            let mut buf = Vec::with_capacity(512);
            loop {
                let mut chunk = [0u8; 4096];
                let n = stream
                    .read(&mut chunk)
                    .await
                    .map_err(|e| BackendError(format!("{what}: reading the response: {e}")))?;
                buf.extend_from_slice(&chunk[..n]);
                match http::parse_response(&buf, n == 0) {
                    Ok(Some(r)) => return Ok(r),
                    Ok(None) => {}
                    Err(e) => return Err(BackendError(format!("{what}: bad response: {e}"))),
                }
            }
        };
        let response = tokio::time::timeout(self.timeout, exchange)
            .await
            .map_err(|_| BackendError(format!("{what}: no answer in {:?}", self.timeout)))??;
        if (200..300).contains(&response.status) {
            return Ok(response);
        }
        let fault = serde_json::from_slice::<Value>(&response.body)
            .ok()
            .and_then(|v| v.get("fault_message")?.as_str().map(str::to_owned))
            .unwrap_or_else(|| String::from_utf8_lossy(&response.body).into_owned());
        Err(BackendError(format!("{what}: {} {fault}", response.status)))
    }

    async fn put(&self, path: &str, body: Value) -> Result<(), BackendError> {
        self.call("PUT", path, Some(&body)).await.map(drop)
    }

    async fn get_json<T: serde::de::DeserializeOwned>(
        &self,
        path: &str,
    ) -> Result<T, BackendError> {
        let r = self.call("GET", path, None).await?;
        serde_json::from_slice(&r.body).map_err(|e| {
            BackendError(format!(
                "firecracker GET {path}: unexpected body ({e}): {}",
                String::from_utf8_lossy(&r.body)
            ))
        })
    }

    /// `GET /`.
    pub async fn describe(&self) -> Result<InstanceInfo, BackendError> {
        self.get_json("/").await
    }

    /// `GET /machine-config`, as Firecracker reports it.
    pub async fn get_machine_config(&self) -> Result<Value, BackendError> {
        self.get_json("/machine-config").await
    }

    /// `GET /vm/config`: the whole configuration, also after a snapshot load.
    pub async fn get_vm_config(&self) -> Result<Value, BackendError> {
        self.get_json("/vm/config").await
    }

    /// `PUT /machine-config` (pre-boot).
    pub async fn machine_config(&self, vcpus: u8, memory_mib: u32) -> Result<(), BackendError> {
        self.put(
            "/machine-config",
            json!({ "vcpu_count": vcpus, "mem_size_mib": memory_mib }),
        )
        .await
    }

    /// `PUT /boot-source` (pre-boot): an uncompressed ELF kernel (vmlinux).
    pub async fn boot_source(&self, kernel: &Path, boot_args: &str) -> Result<(), BackendError> {
        self.put(
            "/boot-source",
            json!({ "kernel_image_path": kernel, "boot_args": boot_args }),
        )
        .await
    }

    /// `PUT /drives/{id}` (pre-boot).
    pub async fn drive(
        &self,
        id: &str,
        path: &Path,
        root: bool,
        read_only: bool,
    ) -> Result<(), BackendError> {
        self.put(
            &format!("/drives/{id}"),
            json!({ "drive_id": id, "path_on_host": path, "is_root_device": root, "is_read_only": read_only }),
        )
        .await
    }

    /// `PUT /network-interfaces/{id}` (pre-boot): the tap must exist.
    pub async fn network_interface(&self, n: &NetworkInterface<'_>) -> Result<(), BackendError> {
        self.put(
            &format!("/network-interfaces/{}", n.iface_id),
            json!({ "iface_id": n.iface_id, "host_dev_name": n.host_dev_name, "guest_mac": n.guest_mac }),
        )
        .await
    }

    /// `PUT /mmds/config` (pre-boot): MMDS V2 (session tokens) on these interfaces, at
    /// Firecracker's default address 169.254.169.254.
    pub async fn mmds_config(&self, ifaces: &[&str]) -> Result<(), BackendError> {
        self.put(
            "/mmds/config",
            json!({ "version": "V2", "network_interfaces": ifaces }),
        )
        .await
    }

    /// `PUT /mmds`: replaces the whole store.
    pub async fn put_mmds(&self, data: &Value) -> Result<(), BackendError> {
        self.put("/mmds", data.clone()).await
    }

    /// `GET /mmds`: the whole store.
    pub async fn get_mmds(&self) -> Result<Value, BackendError> {
        self.get_json("/mmds").await
    }

    /// `PUT /actions {InstanceStart}`: boots what was configured.
    pub async fn instance_start(&self) -> Result<(), BackendError> {
        self.put("/actions", json!({ "action_type": "InstanceStart" }))
            .await
    }

    /// `PUT /actions {SendCtrlAltDel}`: the guest sees Ctrl-Alt-Del on its i8042; a Linux
    /// guest booted with `reboot=k` reboots, which ends Firecracker.
    pub async fn send_ctrl_alt_del(&self) -> Result<(), BackendError> {
        self.put("/actions", json!({ "action_type": "SendCtrlAltDel" }))
            .await
    }

    /// `PATCH /vm {Paused}`.
    pub async fn pause(&self) -> Result<(), BackendError> {
        self.call("PATCH", "/vm", Some(&json!({ "state": "Paused" })))
            .await
            .map(drop)
    }

    /// `PATCH /vm {Resumed}`.
    pub async fn resume(&self) -> Result<(), BackendError> {
        self.call("PATCH", "/vm", Some(&json!({ "state": "Resumed" })))
            .await
            .map(drop)
    }

    /// `PUT /snapshot/create`, a full snapshot of a paused VM.
    pub async fn snapshot_create(&self, vmstate: &Path, memory: &Path) -> Result<(), BackendError> {
        self.put(
            "/snapshot/create",
            json!({ "snapshot_type": "Full", "snapshot_path": vmstate, "mem_file_path": memory }),
        )
        .await
    }

    /// `PUT /snapshot/load` into a fresh process, left paused (`resume_vm: false`), with
    /// each `(iface_id, tap)` in `network_overrides` (Firecracker >= 1.12): the clone opens
    /// its own tap, not the golden VM's.
    pub async fn snapshot_load(
        &self,
        vmstate: &Path,
        memory: &Path,
        network_overrides: &[(&str, &str)],
    ) -> Result<(), BackendError> {
        let overrides: Vec<Value> = network_overrides
            .iter()
            .map(|(iface, tap)| json!({ "iface_id": iface, "host_dev_name": tap }))
            .collect();
        let mut body = json!({
            "snapshot_path": vmstate,
            "mem_backend": { "backend_type": "File", "backend_path": memory },
            "resume_vm": false,
        });
        // Absent rather than empty: Firecracker before 1.12 refuses the unknown field.
        if !overrides.is_empty() {
            body["network_overrides"] = Value::Array(overrides);
        }
        self.put("/snapshot/load", body).await
    }
}
