//! The vncgate control plane. For now: the VM readiness probe that decides when a session's
//! route may be published (see DESIGN.md, "Controller"), and publishing routes to Redis
//! through the schema shared with the gateway; the session API, VM backends, reconciler and
//! credentials store come later.
//!
//! | module | owns |
//! |---|---|
//! | [`probe`] | connect to a VM's VNC port, read the banner under a deadline (checked by `vncgate_rfb::banner`), name the outcome |
//! | [`publish`] | publish a session's route in Redis once its VM is ready; withdraw it |
//!
//! The binary (`src/main.rs`) parses flags and calls [`probe::probe`] and [`publish`].

#![forbid(unsafe_code)]

pub mod probe;
pub mod publish;
