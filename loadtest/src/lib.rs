//! Load-test tooling for vncgate: a synthetic RFB server and a swarm of RFB-over-WebSocket
//! clients. The RFB protocol itself (both roles, sans IO) is the `vncgate-rfb` crate.
//!
//! | module | owns |
//! |---|---|
//! | [`demo`] | `vncgate-loadtest demo`: the shipped `vncgate` binary in front of a synthetic desktop, one command |
//! | [`http`] | a one-request HTTP/1.1 client for JSON APIs, exact statuses and headers |
//! | [`fakevm`] | the synthetic RFB server: the demo's VM, the tests' upstream, a load-test target |
//! | [`swarm`] | N simulated noVNC clients over WebSocket and the report they produce |
//! | [`sessions`] | the session-level load test: create on a controller, ready, view through the gateway to the first framebuffer, hold, delete; percentiles and failures by reason |
//! | [`idle`] | many RFB-over-WebSocket sessions opened and held idle, and what they cost the server |
//! | [`dial`] | opening one WebSocket: source address, TLS for `wss://` (rustls, ring), upgrade; error names |
//! | [`stats`] | percentiles and the report's number formatting |
//! | [`procmem`] | a process's RSS and PSS from `/proc/PID/smaps_rollup` |
//! | [`limits`] | raising `RLIMIT_NOFILE` so thousands of sockets fit |
//!
//! The binary (`src/main.rs`) only parses flags and calls [`fakevm::run`], [`swarm::run`],
//! [`idle::run`] or [`demo::run`].
//!
//! No `unsafe` here: raising the file-descriptor limit goes through the `rlimit` crate.

#![forbid(unsafe_code)]

pub mod demo;
pub mod dial;
pub mod fakevm;
pub mod http;
pub mod idle;
pub mod limits;
pub mod procmem;
pub mod sessions;
pub mod stats;
pub mod swarm;
