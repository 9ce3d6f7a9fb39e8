//! What a VM host can do, as one trait: create a VM from the golden source, push its per-VM
//! data after start, say where its agent and VNC ports are, tell whether it still runs, stop
//! it, and adopt it again after the controller restarted. `process` (here), `qemu` and
//! `firecracker` (issue 11) are three implementations of it, not three paths through the
//! service.

pub mod firecracker;
mod host;
pub mod process;
pub mod qemu;

use std::net::SocketAddr;

use serde::{Deserialize, Serialize};

/// What a VM learns about itself after start (the `process` backend writes it to a file the
/// agent reads; QEMU's fw_cfg and Firecracker's MMDS carry the same JSON). The agent token
/// is in plaintext here and nowhere else: the session record keeps its SHA-256.
#[derive(Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct VmData {
    pub session_id: String,
    /// The session's provider, which the agent's credentials post names.
    pub provider: String,
    pub agent_token: String,
    /// Where the agent posts credentials (`{controller_url}/api/auth/credentials/store`).
    pub controller_url: String,
    /// The controller's clock when the data was written (Unix ms): a restored clone's clock
    /// is the snapshot's until the agent sets it from this.
    pub issued_at_ms: u64,
    /// 32 bytes (hex) from the controller's kernel RNG, drawn for this VM alone: the agent
    /// reseeds the guest's RNG with them, so clones of one snapshot diverge.
    #[serde(default)]
    pub entropy: String,
}

impl VmData {
    /// Fresh entropy for one VM, hex.
    pub fn fresh_entropy() -> String {
        hex::encode(rand::random::<[u8; 32]>())
    }
}

impl std::fmt::Debug for VmData {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("VmData")
            .field("session_id", &self.session_id)
            .field("agent_token", &"<redacted>")
            .field("entropy", &"<redacted>")
            .field("controller_url", &self.controller_url)
            .finish()
    }
}

/// Where a VM's two ports are, from the controller's side.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct VmAddrs {
    pub agent: SocketAddr,
    pub vnc: SocketAddr,
}

/// A VM the backend runs: its addresses, and the handle it is persisted as (in the session
/// record), from which [`Backend::adopt`] finds it again.
#[derive(Debug, Clone, PartialEq)]
pub struct Vm {
    pub addrs: VmAddrs,
    pub handle: serde_json::Value,
    /// The VNC password the backend set, when the VNC server asks for one.
    pub vnc_password: Option<String>,
    /// The VNC port inside the guest, when the controller reaches it through a forward on
    /// another port (QEMU's user networking): failures name both.
    pub guest_vnc_port: Option<u16>,
}

/// A backend failure, with what it was doing.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BackendError(pub String);

impl std::fmt::Display for BackendError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for BackendError {}

/// A VM host.
pub trait Backend: Send + Sync + 'static {
    fn name(&self) -> &'static str;

    /// Whether its VMs are clones of one snapshot (sharing its clock, RNG state and machine
    /// id until the agent applies the per-VM identity): then readiness requires the agent's
    /// report that it did.
    fn clones(&self) -> bool {
        false
    }

    /// Creates and starts a VM for `session` from the golden source.
    fn start(&self, session: &str) -> impl Future<Output = Result<Vm, BackendError>> + Send;

    /// Hands the VM its per-VM data (agent token, session id, controller URL, clock).
    fn push_data(
        &self,
        vm: &Vm,
        data: &VmData,
    ) -> impl Future<Output = Result<(), BackendError>> + Send;

    /// Whether the VM (as a whole: its processes, its hypervisor) still runs.
    fn alive(&self, vm: &Vm) -> impl Future<Output = bool> + Send;

    /// Stops the VM and removes what it left; stopping a stopped VM is not an error.
    fn stop(&self, vm: &Vm) -> impl Future<Output = Result<(), BackendError>> + Send;

    /// The VM a persisted handle names, when it still runs (after a controller restart).
    fn adopt(&self, handle: &serde_json::Value) -> impl Future<Output = Option<Vm>> + Send;

    /// Every VM this backend finds running on its host, whether a session knows it or not
    /// (after a restart, those no session owns are orphans, and are stopped).
    fn running(&self) -> impl Future<Output = Vec<Vm>> + Send;
}
