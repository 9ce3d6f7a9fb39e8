//! The WebSocket protocol core (RFC 6455), free of sockets and runtimes: the upgrade
//! handshake ([`handshake`]), the frame parser and encoders ([`frame`]) and unmasking
//! ([`mask`]). The runtime adapters in [`crate::server`] drive these over real sockets;
//! the fuzz targets and benchmarks drive them over byte slices.

pub mod frame;
pub mod handshake;
pub mod mask;
