//! vncgate: a thread-per-core VNC-over-WebSocket gateway.
//!
//! A browser running noVNC opens `ws(s)://gateway/vnc/<session>`; the gateway performs the
//! RFC 6455 upgrade itself, authenticates the session, looks up its route, dials the VM's
//! VNC port and relays RFB both ways. The WebSocket protocol core (handshake parsing and
//! responses, the frame parser, frame encoders, unmasking) is its own crate, `vncgate-ws`,
//! sans IO, and the route schema is `vncgate-schema`'s; ARCHITECTURE.md at the repository
//! root says how the crates fit. The map of this one:
//!
//! - [`admission`]: whether a parsed upgrade becomes a session, as a pure decision (HTTP
//!   refusal with its blame, an immediate close with its cause, or an admission).
//! - [`live`]: the settings a SIGHUP reloads (static routes, upstream and origin policy),
//!   published to the workers by generation.
//! - [`deadlines`]: a session's expiry, duration, idle and keepalive deadlines, sans IO.
//! - [`token`]: session tokens, held as SHA-256 digests and compared in constant time.
//! - [`route`]: the [`route::RouteSource`] trait and the static sources (flags, routes file).
//! - [`route_table`]: a route table written from the same process (the controller's embedded
//!   default), its changes delivered to every worker as Redis events are.
//! - [`route_admin`]: `vncgate route add|del|list`, route management in Redis.
//! - [`routing`]: routes from Redis: the control-plane thread and the per-worker cache.
//! - [`policy`]: the upstream CIDR allowlist that keeps the gateway from being an open proxy.
//! - [`proxy`]: the PROXY protocol (v1, v2) header from trusted balancers, sans IO.
//! - [`close`]: every way a session ends: close code, reason, who is to blame, metric label.
//! - [`config`]: flags and the config file, merged and validated.
//! - [`sys`]: the one module with `unsafe`: splice, pipes, non-blocking send/recv, and
//!   descriptor passing (`SCM_RIGHTS`) for the restart handover.
//! - [`server`]: the runtime adapter: workers (one monoio runtime each, io_uring or epoll),
//!   listeners, sessions, the splice relay, the admin endpoint, drain, and the restart
//!   handover of the listening sockets to a successor process.
//! - [`tls`]: `wss://`: the certificate store (reloaded on SIGHUP and on change) and the
//!   rustls configuration; [`server::client`] drives rustls over a worker's socket.
//! - [`recording`]: the session recording file format (versioned header, timed records),
//!   sans IO; [`server::record`] writes it (`--record DIR`, tee(2) on the splice path).
//! - [`replay`]: `vncgate replay FILE`: serves a recording to noVNC at its recorded pace.
//! - [`web`]: `--web DIR`, static files (noVNC's page) for plain GETs on the public port,
//!   with every path that could leave DIR refused before the filesystem is touched.
//! - [`websockify`]: `vncgate websockify`, websockify's command line as gateway settings:
//!   `TARGET_ADDR` or a token file as routes, and its options vncgate lacks refused by name.
//! - [`metrics`]: metric names and the Prometheus recorder.
//! - [`fault`]: the test-only hook that makes a supervised task panic on purpose.

#![deny(unsafe_code)]

pub mod admission;
pub mod close;
pub mod config;
pub mod deadlines;
pub mod fault;
pub mod live;
pub mod metrics;
pub mod policy;
pub mod proxy;
pub mod recording;
pub mod replay;
pub mod route;
pub mod route_admin;
pub mod route_table;
pub mod routing;
pub mod server;
pub mod sys;
pub mod tls;
pub mod token;
pub mod web;
pub mod websockify;
