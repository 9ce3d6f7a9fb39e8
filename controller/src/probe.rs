//! The readiness probe's I/O: connect, read the banner with a deadline, classify.
//!
//! Blocking std sockets on purpose: one probe is one connection and a few reads, and the
//! same function serves the CLI and (later) the reconciler's worker threads.

use std::fmt;
use std::io::{self, Read};
use std::net::{SocketAddr, TcpStream, ToSocketAddrs};
use std::time::{Duration, Instant};

use vncgate_rfb::banner::{BANNER_LEN, BannerError, RfbVersion, parse_banner};

/// What a probe found. Everything but `Ready` means "do not publish a route yet".
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ProbeOutcome {
    /// An RFB server answered with this version.
    Ready {
        addr: SocketAddr,
        version: RfbVersion,
    },
    /// Nothing listens on the port (the VNC server is not started, or the VM is down).
    Refused { addr: SocketAddr },
    /// No banner within the deadline. `seen` holds any bytes that did arrive.
    Timeout { seen: Vec<u8> },
    /// Something that is not an RFB server answered.
    NotRfb { addr: SocketAddr, seen: Vec<u8> },
    /// The peer closed before sending a full banner.
    Closed { addr: SocketAddr, seen: Vec<u8> },
    /// Name resolution or another I/O failure.
    Error { detail: String },
}

impl ProbeOutcome {
    pub fn is_ready(&self) -> bool {
        matches!(self, ProbeOutcome::Ready { .. })
    }

    /// Short stable name: `ready`, `refused`, `timeout`, `not-rfb`, `closed`, `error`.
    pub fn status(&self) -> &'static str {
        match self {
            ProbeOutcome::Ready { .. } => "ready",
            ProbeOutcome::Refused { .. } => "refused",
            ProbeOutcome::Timeout { .. } => "timeout",
            ProbeOutcome::NotRfb { .. } => "not-rfb",
            ProbeOutcome::Closed { .. } => "closed",
            ProbeOutcome::Error { .. } => "error",
        }
    }

    /// Bytes received, where that matters for the diagnosis.
    pub fn seen(&self) -> Option<&[u8]> {
        match self {
            ProbeOutcome::Timeout { seen }
            | ProbeOutcome::NotRfb { seen, .. }
            | ProbeOutcome::Closed { seen, .. } => Some(seen),
            _ => None,
        }
    }

    /// One JSON object (no trailing newline).
    pub fn to_json(&self, target: &str, elapsed: Duration) -> String {
        let (addr, version, detail) = match self {
            ProbeOutcome::Ready { addr, version } => (Some(*addr), Some(version.to_string()), None),
            ProbeOutcome::Refused { addr }
            | ProbeOutcome::NotRfb { addr, .. }
            | ProbeOutcome::Closed { addr, .. } => (Some(*addr), None, None),
            ProbeOutcome::Error { detail } => (None, None, Some(detail.as_str())),
            ProbeOutcome::Timeout { .. } => (None, None, None),
        };
        let line = ProbeJson {
            vnc: target,
            status: self.status(),
            ready: self.is_ready(),
            // Milliseconds to the microsecond: enough to read, short to print.
            elapsed_ms: (elapsed.as_secs_f64() * 1e6).round() / 1e3,
            addr,
            version,
            detail,
            seen: self.seen().map(escape),
        };
        serde_json::to_string(&line).expect("plain fields serialize")
    }
}

/// The `--json` line, in this field order.
#[derive(serde::Serialize)]
struct ProbeJson<'a> {
    vnc: &'a str,
    status: &'static str,
    ready: bool,
    elapsed_ms: f64,
    #[serde(skip_serializing_if = "Option::is_none")]
    addr: Option<SocketAddr>,
    #[serde(skip_serializing_if = "Option::is_none")]
    version: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    detail: Option<&'a str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    seen: Option<String>,
}

/// Bytes as printable ASCII with `\n`, `\xNN` escapes: safe for a terminal and a log line.
pub fn escape(bytes: &[u8]) -> String {
    bytes.escape_ascii().to_string()
}

impl fmt::Display for ProbeOutcome {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            ProbeOutcome::Ready { addr, version } => {
                write!(f, "ready: {addr} speaks RFB {version}")
            }
            ProbeOutcome::Refused { addr } => write!(f, "refused: nothing listens on {addr}"),
            ProbeOutcome::Timeout { seen } if seen.is_empty() => {
                write!(f, "timeout: no RFB banner before the deadline")
            }
            ProbeOutcome::Timeout { seen } => write!(
                f,
                "timeout: incomplete banner before the deadline, saw \"{}\"",
                escape(seen)
            ),
            ProbeOutcome::NotRfb { addr, seen } => {
                write!(f, "not-rfb: {addr} sent \"{}\"", escape(seen))
            }
            ProbeOutcome::Closed { addr, seen } => write!(
                f,
                "closed: {addr} hung up after \"{}\" without a full banner",
                escape(seen)
            ),
            ProbeOutcome::Error { detail } => write!(f, "error: {detail}"),
        }
    }
}

/// Probes `target` (`host:port`) within `timeout` in total (resolution excluded, connect and
/// banner included). Tries each resolved address until one connects.
pub fn probe(target: &str, timeout: Duration) -> ProbeOutcome {
    let deadline = Instant::now() + timeout;
    let addrs: Vec<SocketAddr> = match target.to_socket_addrs() {
        Ok(a) => a.collect(),
        Err(e) => {
            return ProbeOutcome::Error {
                detail: format!("cannot resolve {target}: {e}"),
            };
        }
    };
    let mut last = ProbeOutcome::Error {
        detail: format!("{target} resolved to no address"),
    };
    for addr in addrs {
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            return ProbeOutcome::Timeout { seen: Vec::new() };
        }
        match TcpStream::connect_timeout(&addr, left) {
            Ok(stream) => return read_banner(stream, addr, deadline),
            Err(e) if e.kind() == io::ErrorKind::ConnectionRefused => {
                last = ProbeOutcome::Refused { addr };
            }
            Err(e) if is_timeout(&e) => last = ProbeOutcome::Timeout { seen: Vec::new() },
            Err(e) => {
                last = ProbeOutcome::Error {
                    detail: format!("connect {addr}: {e}"),
                };
            }
        }
    }
    last
}

fn is_timeout(e: &io::Error) -> bool {
    matches!(
        e.kind(),
        io::ErrorKind::TimedOut | io::ErrorKind::WouldBlock
    )
}

fn read_banner(mut stream: TcpStream, addr: SocketAddr, deadline: Instant) -> ProbeOutcome {
    let mut seen = Vec::with_capacity(BANNER_LEN);
    let mut buf = [0u8; BANNER_LEN];
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            return ProbeOutcome::Timeout { seen };
        }
        if let Err(e) = stream.set_read_timeout(Some(left)) {
            return ProbeOutcome::Error {
                detail: format!("set read timeout: {e}"),
            };
        }
        // Read only what the banner still needs: an RFB server sends 12 bytes and waits, so
        // anything past that is itself evidence of a different protocol, but we do not need it.
        let want = BANNER_LEN - seen.len();
        match stream.read(&mut buf[..want]) {
            Ok(0) => return ProbeOutcome::Closed { addr, seen },
            Ok(n) => seen.extend_from_slice(&buf[..n]),
            Err(e) if is_timeout(&e) => return ProbeOutcome::Timeout { seen },
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(e) => {
                return ProbeOutcome::Error {
                    detail: format!("read from {addr}: {e}"),
                };
            }
        }
        match parse_banner(&seen) {
            Ok(version) => return ProbeOutcome::Ready { addr, version },
            Err(BannerError::Incomplete { .. }) => {}
            Err(BannerError::NotRfb | BannerError::TooLong { .. }) => {
                return ProbeOutcome::NotRfb { addr, seen };
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn json_and_display() {
        let addr: SocketAddr = "127.0.0.1:6080".parse().unwrap();
        let o = ProbeOutcome::NotRfb {
            addr,
            seen: b"HTTP/1.1 \"4\x00".to_vec(),
        };
        assert_eq!(
            o.to_string(),
            r#"not-rfb: 127.0.0.1:6080 sent "HTTP/1.1 \"4\x00""#
        );
        assert_eq!(
            o.to_json("vm:6080", Duration::from_millis(2)),
            r#"{"vnc":"vm:6080","status":"not-rfb","ready":false,"elapsed_ms":2.0,"addr":"127.0.0.1:6080","seen":"HTTP/1.1 \\\"4\\x00"}"#
        );
        let ready = ProbeOutcome::Ready {
            addr,
            version: RfbVersion { major: 3, minor: 8 },
        };
        assert_eq!(
            ready.to_json("vm:6080", Duration::from_micros(1500)),
            r#"{"vnc":"vm:6080","status":"ready","ready":true,"elapsed_ms":1.5,"addr":"127.0.0.1:6080","version":"3.8"}"#
        );
        let err = ProbeOutcome::Error {
            detail: "a\nb \"c\"".into(),
        };
        let v: serde_json::Value =
            serde_json::from_str(&err.to_json("vm:6080", Duration::ZERO)).unwrap();
        assert_eq!(v["detail"], "a\nb \"c\"");
    }
}
