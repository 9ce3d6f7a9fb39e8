//! The vncgate control plane: sessions whose `ready` means a desktop, on VMs from a backend
//! (local processes, QEMU from a golden snapshot), with their routes published for the
//! gateways and their credentials sealed (see DESIGN.md, "Controller").
//!
//! | module | owns |
//! |---|---|
//! | [`api`] | the session API over HTTP (axum): thin handlers, one error-to-status map |
//! | [`backend`] | the VM backend trait (start from golden, push per-VM data, alive, stop, adopt); the `process`, `qemu` and `firecracker` backends, their golden snapshots |
//! | [`capacity`] | VM slots on this host (`--max-vms`): a line of pending sessions with positions, `capacity` failures after the placement timeout |
//! | [`cluster`] | this host's lease when controllers share a Redis: epoch, renewal, the fence of owner writes |
//! | [`placement`] | many controllers, no scheduler: placement by pull from a Redis stream, takeover of a lost host's sessions, per-host commands |
//! | [`credentials`] | credentials at rest: envelope encryption (AES-256-GCM data keys wrapped by named KEKs), rewrap |
//! | [`lifecycle`] | a session's state machine, pure: event in, new record and effects (route, VM) out |
//! | [`metrics`] | metric names, help texts, the Prometheus recorder (every series at zero from the start) |
//! | [`probe`] | connect to a VM's VNC port, read the banner under a deadline (checked by `vncgate_rfb::banner`), name the outcome |
//! | [`readiness`] | readiness that means a desktop: agent `/health` 200 and the VNC port through ServerInit |
//! | [`server`] | `vncgate-controller --listen`: store, backend, service, reconciler, API, until a signal |
//! | [`service`] | sessions: create, boot, readiness, reconciler, effects of each transition |
//! | [`store`] | sessions and routes in Redis (the shared schema) or in memory |
//! | [`publish`] | publish a session's route in Redis once its VM is ready; withdraw it |
//!
//! The binary (`src/main.rs`) parses flags and calls [`probe::probe`] and [`publish`].

#![forbid(unsafe_code)]

pub mod api;
pub mod backend;
pub mod capacity;
pub mod cluster;
pub mod credentials;
pub mod lifecycle;
pub mod metrics;
pub mod placement;
pub mod probe;
pub mod publish;
pub mod readiness;
pub mod server;
pub mod service;
pub mod store;
