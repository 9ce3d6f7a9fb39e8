//! vncgate-ws: the WebSocket protocol core of vncgate (RFC 6455), free of sockets, runtimes
//! and clocks, in quinn-proto's and rustls's manner. The gateway's runtime adapters drive it
//! over real sockets; the fuzz targets (`ws/fuzz`) and the benchmarks (`ws/benches`) drive it
//! over byte slices. The map:
//!
//! - [`handshake`]: the HTTP/1.1 upgrade request, parsed and validated into an
//!   [`handshake::UpgradeRequest`] (the session path segment, the token bytes as presented
//!   and where they came from, the subprotocol, the accept key) or a [`handshake::Reject`]
//!   with its precise status; the 101 and error responses. What a token or a session id
//!   means is the application's business, not this crate's.
//! - [`frame`]: the incremental client-frame parser (payload unmasked in place and reported as
//!   a range of the caller's buffer) and the server-frame encoders.
//! - [`mask`]: unmasking, a machine word at a time.
//!
//! Dependencies: httparse, sha1, base64 and nothing else.

#![forbid(unsafe_code)]

pub mod frame;
pub mod handshake;
pub mod mask;
