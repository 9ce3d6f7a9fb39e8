//! The readiness probe's I/O: connect, read the banner with a deadline, classify; with
//! [`Depth::Desktop`], go on through the RFB handshake to ServerInit (a non-empty framebuffer
//! proves there is a desktop, not just something that says `RFB 003.008`).
//!
//! Blocking std sockets on purpose: one probe is one connection and a few reads, and the
//! same function serves the CLI and (later) the reconciler's worker threads.

use std::fmt;
use std::io::{self, Read, Write};
use std::net::{SocketAddr, TcpStream, ToSocketAddrs};
use std::time::{Duration, Instant};

use vncgate_rfb::banner::{BANNER_LEN, BannerError, RfbVersion, parse_banner};

/// What a probe found. Everything but `Ready` means "do not publish a route yet".
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ProbeOutcome {
    /// An RFB server answered with this version (a banner-only probe).
    Ready {
        addr: SocketAddr,
        version: RfbVersion,
    },
    /// The handshake reached ServerInit with a framebuffer of this size: a desktop.
    Desktop {
        addr: SocketAddr,
        version: RfbVersion,
        width: u16,
        height: u16,
        name: String,
    },
    /// A banner, then the handshake failed (authentication, security types, an empty
    /// framebuffer, a server that closed or stalled before ServerInit).
    Handshake {
        addr: SocketAddr,
        version: RfbVersion,
        error: String,
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
        matches!(
            self,
            ProbeOutcome::Ready { .. } | ProbeOutcome::Desktop { .. }
        )
    }

    /// Short stable name: `ready`, `desktop`, `handshake`, `refused`, `timeout`, `not-rfb`,
    /// `closed`, `error`.
    pub fn status(&self) -> &'static str {
        match self {
            ProbeOutcome::Ready { .. } => "ready",
            ProbeOutcome::Desktop { .. } => "desktop",
            ProbeOutcome::Handshake { .. } => "handshake",
            ProbeOutcome::Refused { .. } => "refused",
            ProbeOutcome::Timeout { .. } => "timeout",
            ProbeOutcome::NotRfb { .. } => "not-rfb",
            ProbeOutcome::Closed { .. } => "closed",
            ProbeOutcome::Error { .. } => "error",
        }
    }

    /// The readiness check that failed, as the metric label names it (`vnc_refused`,
    /// `vnc_timeout`, `vnc_no_banner`, `vnc_handshake`, `vnc_error`); `None` when ready.
    pub fn failed_check(&self) -> Option<&'static str> {
        Some(match self {
            ProbeOutcome::Ready { .. } | ProbeOutcome::Desktop { .. } => return None,
            ProbeOutcome::Refused { .. } => "vnc_refused",
            ProbeOutcome::Timeout { seen } if seen.is_empty() => "vnc_timeout",
            ProbeOutcome::Timeout { .. }
            | ProbeOutcome::NotRfb { .. }
            | ProbeOutcome::Closed { .. } => "vnc_no_banner",
            ProbeOutcome::Handshake { .. } => "vnc_handshake",
            ProbeOutcome::Error { .. } => "vnc_error",
        })
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
        let mut desktop = None;
        let (addr, version, detail) = match self {
            ProbeOutcome::Ready { addr, version } => (Some(*addr), Some(version.to_string()), None),
            ProbeOutcome::Desktop {
                addr,
                version,
                width,
                height,
                name,
            } => {
                desktop = Some(DesktopJson {
                    width: *width,
                    height: *height,
                    name,
                });
                (Some(*addr), Some(version.to_string()), None)
            }
            ProbeOutcome::Handshake {
                addr,
                version,
                error,
            } => (Some(*addr), Some(version.to_string()), Some(error.as_str())),
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
            desktop,
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
    desktop: Option<DesktopJson<'a>>,
    #[serde(skip_serializing_if = "Option::is_none")]
    seen: Option<String>,
}

#[derive(serde::Serialize)]
struct DesktopJson<'a> {
    width: u16,
    height: u16,
    name: &'a str,
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
            ProbeOutcome::Desktop {
                addr,
                version,
                width,
                height,
                name,
            } => write!(
                f,
                "desktop: {addr} speaks RFB {version}, {width}x{height} \"{}\"",
                name.escape_debug()
            ),
            ProbeOutcome::Handshake {
                addr,
                version,
                error,
            } => write!(f, "handshake: {addr} speaks RFB {version}, then {error}"),
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

/// How far a probe goes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Depth {
    /// The 12-byte banner only.
    Banner,
    /// Through ServerInit, with security None, or VNC authentication with this password.
    Desktop { password: Option<Vec<u8>> },
}

/// Probes `target` (`host:port`) within `timeout` in total (resolution excluded, connect and
/// banner included) for the banner. Tries each resolved address until one connects.
pub fn probe(target: &str, timeout: Duration) -> ProbeOutcome {
    probe_to(target, timeout, &Depth::Banner)
}

/// [`probe`], going as deep as `depth` says within the same deadline.
pub fn probe_to(target: &str, timeout: Duration, depth: &Depth) -> ProbeOutcome {
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
            Ok(stream) => return read_banner(stream, addr, deadline, depth),
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

fn read_banner(
    mut stream: TcpStream,
    addr: SocketAddr,
    deadline: Instant,
    depth: &Depth,
) -> ProbeOutcome {
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
            Ok(version) => {
                return match depth {
                    Depth::Banner => ProbeOutcome::Ready { addr, version },
                    Depth::Desktop { password } => {
                        match handshake(&mut stream, &seen, password.as_deref(), deadline) {
                            Ok(init) if init.width == 0 || init.height == 0 => {
                                ProbeOutcome::Handshake {
                                    addr,
                                    version,
                                    error: format!(
                                        "an empty {}x{} framebuffer",
                                        init.width, init.height
                                    ),
                                }
                            }
                            Ok(init) => ProbeOutcome::Desktop {
                                addr,
                                version,
                                width: init.width,
                                height: init.height,
                                name: init.name,
                            },
                            Err(error) => ProbeOutcome::Handshake {
                                addr,
                                version,
                                error,
                            },
                        }
                    }
                };
            }
            Err(BannerError::Incomplete { .. }) => {}
            Err(BannerError::NotRfb | BannerError::TooLong { .. }) => {
                return ProbeOutcome::NotRfb { addr, seen };
            }
        }
    }
}

/// The RFB handshake after the banner (`banner`, already read), to ServerInit, by
/// `deadline`; the error says what went wrong in the server's terms.
fn handshake(
    stream: &mut TcpStream,
    banner: &[u8],
    password: Option<&[u8]>,
    deadline: Instant,
) -> Result<vncgate_rfb::ServerInit, String> {
    let mut hs = vncgate_rfb::ClientHandshake::new(password, true);
    let mut pending = banner.to_vec();
    let mut buf = [0u8; 4096];
    loop {
        let used = hs.receive(&pending).map_err(|e| e.to_string());
        // What the client owes the server goes out even after an error.
        let out = hs.take_output();
        if !out.is_empty() {
            stream
                .write_all(&out)
                .map_err(|e| format!("write during the handshake: {e}"))?;
        }
        pending.drain(..used?);
        if hs.is_done() {
            return Ok(hs.server_init().cloned().expect("done means ServerInit"));
        }
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            return Err("no ServerInit before the deadline".into());
        }
        stream
            .set_read_timeout(Some(left))
            .map_err(|e| format!("set read timeout: {e}"))?;
        match stream.read(&mut buf) {
            Ok(0) => return Err("the server closed during the handshake".into()),
            Ok(n) => pending.extend_from_slice(&buf[..n]),
            Err(e) if is_timeout(&e) => return Err("no ServerInit before the deadline".into()),
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(format!("read during the handshake: {e}")),
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
