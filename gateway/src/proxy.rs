//! The PROXY protocol (HAProxy's, v1 text and v2 binary) as an L4 balancer in front of the
//! gateway sends it: which peers may send a header ([`TrustedProxies`]) and what the bytes
//! at the start of a connection say ([`parse`]), sans IO. The parsing itself is the `ppp`
//! crate's; this module decides what the gateway makes of it: how much of the stream is
//! header, the client address it names (if any), and a named refusal otherwise.
//! `server::proxy_header` is the socket side.

use std::net::{IpAddr, SocketAddr};

use ipnet::IpNet;
use ppp::PartialResult as _;
use ppp::{v1, v2};

/// The peers allowed to name the client address (`--trusted-proxy`).
#[derive(Debug, Clone)]
pub struct TrustedProxies {
    nets: Vec<IpNet>,
}

impl TrustedProxies {
    pub fn new(nets: Vec<IpNet>) -> Self {
        Self { nets }
    }

    pub fn trusts(&self, ip: IpAddr) -> bool {
        // An IPv4 peer on a dual-stack listener shows as IPv4-mapped IPv6.
        let ip = ip.to_canonical();
        self.nets.iter().any(|n| n.contains(&ip))
    }

    pub fn nets(&self) -> &[IpNet] {
        &self.nets
    }
}

/// The largest header accepted. A v1 header is at most 107 bytes (the spec's own bound); a
/// v2 header is 16 bytes plus its declared length, which TLVs make variable: balancers send
/// a few dozen bytes of them, and 4 KiB bounds what one connection can make the gateway
/// hold before it has said anything.
pub const MAX_HEADER: usize = 4096;

/// What the bytes so far make of the header.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Step {
    /// Every byte so far belongs to the header, and more are needed.
    Partial,
    /// A whole header of `len` bytes (what follows is the client's own stream). `client`
    /// is the address it names, or `None` where it names none (v2 `LOCAL`, a balancer's
    /// own health check; v1 `UNKNOWN`; v2 unspecified or unix families): the connection's
    /// own address then stands, as the spec says.
    Done {
        len: usize,
        client: Option<SocketAddr>,
    },
}

/// Why a trusted peer's connection is refused: `reason` is the metric label (a fixed set),
/// `detail` what the log line says.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Refusal {
    pub reason: &'static str,
    pub detail: String,
}

impl Refusal {
    fn new(reason: &'static str, detail: impl Into<String>) -> Self {
        Self {
            reason,
            detail: detail.into(),
        }
    }
}

const V1_START: &[u8] = b"PROXY ";

/// `a` and `b` agree on their common length.
fn agree(a: &[u8], b: &[u8]) -> bool {
    let n = a.len().min(b.len());
    a[..n] == b[..n]
}

/// Reads the header at the start of `buf` (the connection's first bytes, possibly more).
pub fn parse(buf: &[u8]) -> Result<Step, Refusal> {
    if buf.is_empty() {
        return Ok(Step::Partial);
    }
    if agree(buf, v2::PROTOCOL_PREFIX) {
        parse_v2(buf)
    } else if agree(buf, V1_START) {
        parse_v1(buf)
    } else {
        Err(Refusal::new(
            "missing",
            "the connection does not start with a PROXY header (v1 or v2)",
        ))
    }
}

fn parse_v2(buf: &[u8]) -> Result<Step, Refusal> {
    // Bytes 14-15 declare the length of what follows the 16-byte fixed part.
    if buf.len() >= 16 {
        let declared = 16 + usize::from(u16::from_be_bytes([buf[14], buf[15]]));
        if declared > MAX_HEADER {
            return Err(Refusal::new(
                "too_long",
                format!("v2 header declares {declared} bytes, more than the {MAX_HEADER} accepted"),
            ));
        }
    }
    match v2::Header::try_from(buf) {
        Ok(h) => {
            let client = match (h.command, h.addresses) {
                (v2::Command::Local, _) => None,
                (v2::Command::Proxy, v2::Addresses::IPv4(a)) => {
                    Some(SocketAddr::new(a.source_address.into(), a.source_port))
                }
                (v2::Command::Proxy, v2::Addresses::IPv6(a)) => {
                    Some(SocketAddr::new(a.source_address.into(), a.source_port))
                }
                (v2::Command::Proxy, _) => None,
            };
            Ok(Step::Done {
                len: h.len(),
                client,
            })
        }
        Err(e) if e.is_incomplete() => Ok(Step::Partial),
        Err(e) => Err(Refusal::new("invalid", format!("v2 header: {e}"))),
    }
}

/// The longest v1 line, CRLF included (the spec's bound).
const V1_MAX: usize = 107;

fn parse_v1(buf: &[u8]) -> Result<Step, Refusal> {
    // The line is parsed once whole: `ppp` reads a line cut after a separator (`... 35646 `)
    // as a bad field rather than a partial one.
    let window = &buf[..buf.len().min(V1_MAX)];
    let Some(end) = window.windows(2).position(|w| w == b"\r\n") else {
        return if buf.len() >= V1_MAX {
            Err(Refusal::new(
                "too_long",
                "no CRLF in the first 107 bytes of a v1 header",
            ))
        } else {
            Ok(Step::Partial)
        };
    };
    match v1::Header::try_from(&buf[..end + 2]) {
        Ok(h) => {
            let client = match h.addresses {
                v1::Addresses::Tcp4(a) => {
                    Some(SocketAddr::new(a.source_address.into(), a.source_port))
                }
                v1::Addresses::Tcp6(a) => {
                    Some(SocketAddr::new(a.source_address.into(), a.source_port))
                }
                v1::Addresses::Unknown => None,
            };
            Ok(Step::Done {
                len: h.header.len(),
                client,
            })
        }
        Err(v1::BinaryParseError::Parse(v1::ParseError::HeaderTooLong)) => {
            Err(Refusal::new("too_long", "v1 header longer than 107 bytes"))
        }
        Err(e) if e.is_incomplete() => Ok(Step::Partial),
        Err(e) => Err(Refusal::new("invalid", format!("v1 header: {e}"))),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const HTTP: &[u8] = b"GET /vnc/s HTTP/1.1\r\nHost: gw\r\n\r\n";

    fn v2_tcp4(cmd: u8) -> Vec<u8> {
        let mut h = v2::PROTOCOL_PREFIX.to_vec();
        h.extend([0x20 | cmd, 0x11, 0, 12]);
        h.extend([203, 0, 113, 7, 10, 0, 0, 1]);
        h.extend(51000u16.to_be_bytes());
        h.extend(443u16.to_be_bytes());
        h
    }

    /// Each header, fed as it could arrive (cut at every byte), is partial until whole,
    /// and then says its exact length even with the request behind it.
    fn whole_at_every_split(header: &[u8], client: Option<SocketAddr>) {
        for cut in 0..header.len() {
            assert_eq!(parse(&header[..cut]), Ok(Step::Partial), "cut at {cut}");
        }
        let mut with_request = header.to_vec();
        with_request.extend_from_slice(HTTP);
        for buf in [header, &with_request[..]] {
            assert_eq!(
                parse(buf),
                Ok(Step::Done {
                    len: header.len(),
                    client
                })
            );
        }
    }

    #[test]
    fn v1_tcp4_tcp6_and_unknown() {
        whole_at_every_split(
            b"PROXY TCP4 198.51.100.22 10.0.0.1 35646 443\r\n",
            Some("198.51.100.22:35646".parse().unwrap()),
        );
        whole_at_every_split(
            b"PROXY TCP6 2001:db8::7 2001:db8::1 4000 443\r\n",
            Some("[2001:db8::7]:4000".parse().unwrap()),
        );
        whole_at_every_split(b"PROXY UNKNOWN\r\n", None);
    }

    #[test]
    fn v2_proxy_tcp6_and_local() {
        whole_at_every_split(&v2_tcp4(1), Some("203.0.113.7:51000".parse().unwrap()));
        let mut h = v2::PROTOCOL_PREFIX.to_vec();
        h.extend([0x21, 0x21, 0, 36]);
        h.extend(
            "2001:db8::9"
                .parse::<std::net::Ipv6Addr>()
                .unwrap()
                .octets(),
        );
        h.extend(
            "2001:db8::1"
                .parse::<std::net::Ipv6Addr>()
                .unwrap()
                .octets(),
        );
        h.extend(1234u16.to_be_bytes());
        h.extend(443u16.to_be_bytes());
        whole_at_every_split(&h, Some("[2001:db8::9]:1234".parse().unwrap()));
        // LOCAL (a balancer's health check) names no client, whatever the address block.
        whole_at_every_split(&v2_tcp4(0), None);
        // A TLV after the addresses is part of the header.
        let mut t = v2_tcp4(1);
        t[15] += 4;
        t.extend([0x04, 0, 1, 0xaa]);
        whole_at_every_split(&t, Some("203.0.113.7:51000".parse().unwrap()));
    }

    #[test]
    fn no_header_bad_header_and_too_long_are_refused_by_name() {
        assert_eq!(parse(HTTP).unwrap_err().reason, "missing");
        assert_eq!(parse(b"\x16\x03\x01").unwrap_err().reason, "missing");
        assert_eq!(
            parse(b"PROXY TCP4 1.2.3.4 nonsense 1 2\r\n")
                .unwrap_err()
                .reason,
            "invalid"
        );
        assert_eq!(
            parse(b"PROXY TCP5 1.2.3.4 5.6.7.8 1 2\r\n")
                .unwrap_err()
                .reason,
            "invalid"
        );
        let mut long = b"PROXY TCP4 ".to_vec();
        long.resize(200, b'1');
        assert_eq!(parse(&long).unwrap_err().reason, "too_long");
        let mut bad_version = v2_tcp4(1);
        bad_version[12] = 0x31;
        assert_eq!(parse(&bad_version).unwrap_err().reason, "invalid");
        let mut bad_command = v2_tcp4(1);
        bad_command[12] = 0x2f;
        assert_eq!(parse(&bad_command).unwrap_err().reason, "invalid");
        let mut huge = v2::PROTOCOL_PREFIX.to_vec();
        huge.extend([0x21, 0x11, 0xff, 0xff]);
        assert_eq!(parse(&huge).unwrap_err().reason, "too_long");
    }

    #[test]
    fn trust_by_cidr_including_mapped_v4() {
        let t = TrustedProxies::new(vec![
            "10.0.0.0/8".parse().unwrap(),
            "2001:db8::/32".parse().unwrap(),
        ]);
        assert!(t.trusts("10.9.8.7".parse().unwrap()));
        assert!(t.trusts("::ffff:10.9.8.7".parse().unwrap()));
        assert!(t.trusts("2001:db8::5".parse().unwrap()));
        assert!(!t.trusts("11.0.0.1".parse().unwrap()));
        assert!(!t.trusts("::1".parse().unwrap()));
    }
}
