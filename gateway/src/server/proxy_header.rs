//! The socket side of the PROXY protocol (see [`crate::proxy`]): before the HTTP request
//! (and before TLS, where the client leg has it), take the header off the connection and
//! no byte more, so that what follows is the client's own stream, untouched.
//!
//! The header is peeked, not read: a peek that finds the whole header is followed by a
//! read of exactly its length, leaving the request queued in the kernel for whoever reads
//! next. Bytes of a header that is still partial are read off (every one of them is
//! header), so that waiting for the rest waits on readiness instead of re-peeking bytes
//! already seen.

use std::io;
use std::net::SocketAddr;
use std::os::fd::AsRawFd;
use std::time::Duration;

use monoio::net::TcpStream;

use super::sock;
use crate::metrics as m;
use crate::proxy::{self, Refusal, Step, TrustedProxies};
use crate::sys;

enum Fail {
    Refused(Refusal),
    Io(io::Error),
}

fn count(result: &'static str) {
    metrics::counter!(m::PROXY_HEADERS, "result" => result).increment(1);
}

/// The client address for a connection from `peer` on a PROXY listener: the header's, or
/// `peer` where the header names none (v2 LOCAL, v1 UNKNOWN). `None`: refused (a peer that
/// is not trusted, a missing, malformed or too long header, nothing within `within`),
/// already counted, logged and closed.
pub async fn read(
    stream: &TcpStream,
    peer: SocketAddr,
    trusted: &TrustedProxies,
    within: Duration,
) -> Option<SocketAddr> {
    if !trusted.trusts(peer.ip()) {
        count("untrusted");
        tracing::warn!(%peer, "connection refused: the peer is not a --trusted-proxy, and this listener takes only PROXY protocol connections");
        sock::linger_close(stream, Duration::from_secs(1)).await;
        return None;
    }
    match monoio::time::timeout(within, take(stream)).await {
        Ok(Ok(Some(client))) => {
            count("proxied");
            tracing::debug!(proxy = %peer, peer = %client, "PROXY header");
            Some(client)
        }
        Ok(Ok(None)) => {
            count("local");
            tracing::debug!(%peer, "PROXY header names no client (LOCAL or UNKNOWN); the connection's address stands");
            Some(peer)
        }
        Ok(Err(Fail::Refused(r))) => {
            count(r.reason);
            tracing::warn!(%peer, reason = r.reason, detail = %r.detail, "connection refused: no valid PROXY header from a trusted proxy");
            sock::linger_close(stream, Duration::from_secs(1)).await;
            None
        }
        Ok(Err(Fail::Io(e))) => {
            count("client_gone");
            tracing::debug!(%peer, error = %e, "proxy left before its PROXY header was complete");
            None
        }
        Err(_) => {
            count("timeout");
            tracing::warn!(%peer, secs = within.as_secs_f64(), "connection refused: no complete PROXY header within the handshake timeout");
            sock::linger_close(stream, Duration::from_secs(1)).await;
            None
        }
    }
}

/// Takes the header off the stream: `Some(client)` or `None` (it names no client).
async fn take(stream: &TcpStream) -> Result<Option<SocketAddr>, Fail> {
    let fd = stream.as_raw_fd();
    // The header's bytes read off so far, then room for a peek behind them (on the heap:
    // the session's future stays small).
    let mut buf: Vec<u8> = Vec::new();
    loop {
        let have = buf.len();
        buf.resize(proxy::MAX_HEADER, 0);
        let n = match sys::peek(fd, &mut buf[have..]) {
            Ok(0) => return Err(Fail::Io(io::ErrorKind::UnexpectedEof.into())),
            Ok(n) => n,
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                buf.truncate(have);
                stream.readable(false).await.map_err(Fail::Io)?;
                continue;
            }
            Err(e) => return Err(Fail::Io(e)),
        };
        buf.truncate(have + n);
        match proxy::parse(&buf).map_err(Fail::Refused)? {
            Step::Partial if buf.len() >= proxy::MAX_HEADER => {
                return Err(Fail::Refused(Refusal {
                    reason: "too_long",
                    detail: format!("no complete header in {} bytes", proxy::MAX_HEADER),
                }));
            }
            Step::Partial => {
                consume(fd, n).map_err(Fail::Io)?;
            }
            Step::Done { len, client } => {
                consume(fd, len - have).map_err(Fail::Io)?;
                return Ok(client);
            }
        }
    }
}

/// Reads off `n` bytes already peeked (so they are queued: the reads do not wait).
fn consume(fd: std::os::fd::RawFd, mut n: usize) -> io::Result<()> {
    let mut scratch = [0u8; 512];
    while n > 0 {
        let want = n.min(scratch.len());
        match sys::recv(fd, &mut scratch[..want])? {
            0 => return Err(io::ErrorKind::UnexpectedEof.into()),
            got => n -= got,
        }
    }
    Ok(())
}
