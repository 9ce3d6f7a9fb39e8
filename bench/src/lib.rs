//! vncgate-bench: a side-by-side benchmark of WebSocket-to-TCP relays (vncgate, vncgate over
//! TLS, websocat, websockify) against direct TCP, all in one run on loopback.
//!
//! - `ws`: RFC 6455 client role without I/O (upgrade, masked frames, frame decoder).
//! - `conn`: one client connection over a blocking socket, raw TCP or WebSocket, over TCP
//!   or TLS.
//! - `tls`: the `vncgate-tls` proxy's certificate, made per run, and the client's rustls
//!   configuration that trusts only it.
//! - `controller`: a `vncgate-controller` child process and its session API, for the
//!   session benches (`vncgate-bench-sessions`, `vncgate-bench-restores`).
//! - `targets`: the in-process upstreams (bulk source, echo server), and the idle point's
//!   fake VM in a child process.
//! - `proxy`: the relays under test, started as child processes and killed by pid.
//! - `measure`: throughput, round trips, upgrades, idle memory; each bounded in time.
//! - `procfs`: CPU time and memory of a proxy's process tree.
//! - `point`: the measurement points a run takes (`--points`).
//! - `plot`: the SVG charts (ratios to direct; memory and CPU cost), from the JSON record.
//! - `report`: medians, ratios to direct, the markdown table and the JSON record.
//! - `runner`: the interleaved repetitions that tie it together.
//! - `routing`: the routing bench (`vncgate-bench-routing`): upgrades per second with routes
//!   from Redis, cold and warm cache, as a ratio to static routes.
#![forbid(unsafe_code)]

pub mod cli;
pub mod conn;
pub mod controller;
pub mod measure;
pub mod plot;
pub mod point;
pub mod procfs;
pub mod proxy;
pub mod report;
pub mod routing;
pub mod runner;
pub mod targets;
pub mod tls;
pub mod ws;
