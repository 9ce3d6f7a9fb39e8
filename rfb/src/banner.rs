//! Is there an RFB server on the port? The server's banner, checked over bytes.
//!
//! An RFB server speaks first: twelve bytes, `RFB xxx.yyy\n` (RFC 6143 section 7.1.1). A VM
//! counts as ready for VNC only once those bytes arrive. A listening socket alone is not
//! enough: a VNC server that is still starting, a port forwarder with no backend, or a
//! different service on the port would all accept the connection.

use std::fmt;

/// Length of an RFB ProtocolVersion message.
pub const BANNER_LEN: usize = 12;

/// A ProtocolVersion as announced by the server, e.g. 3.8.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub struct RfbVersion {
    pub major: u16,
    pub minor: u16,
}

impl fmt::Display for RfbVersion {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}.{}", self.major, self.minor)
    }
}

/// Why bytes are not (yet) an RFB banner.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum BannerError {
    /// Fewer than 12 bytes, and those so far fit the pattern: read more.
    Incomplete { have: usize },
    /// Bytes that cannot start an RFB banner: something else listens on the port.
    NotRfb,
    /// More than 12 bytes before the client has said anything: not an RFB server (which
    /// waits for the client's ProtocolVersion after its own).
    TooLong { have: usize },
}

impl fmt::Display for BannerError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            BannerError::Incomplete { have } => {
                write!(f, "incomplete banner ({have} of {BANNER_LEN} bytes)")
            }
            BannerError::NotRfb => write!(f, "not an RFB banner"),
            BannerError::TooLong { have } => {
                write!(f, "{have} bytes where an RFB banner has {BANNER_LEN}")
            }
        }
    }
}

impl std::error::Error for BannerError {}

/// The banner, position by position: `R F B ' ' d d d . d d d \n`.
fn fits(i: usize, b: u8) -> bool {
    match i {
        0 => b == b'R',
        1 => b == b'F',
        2 => b == b'B',
        3 => b == b' ',
        7 => b == b'.',
        11 => b == b'\n',
        _ => b.is_ascii_digit(),
    }
}

/// Parses the server's first bytes. Needs exactly 12; a shorter prefix that still fits gives
/// `Incomplete`, so a caller can reject garbage as soon as the first wrong byte arrives instead
/// of waiting out its deadline.
pub fn parse_banner(bytes: &[u8]) -> Result<RfbVersion, BannerError> {
    if bytes
        .iter()
        .take(BANNER_LEN)
        .enumerate()
        .any(|(i, &b)| !fits(i, b))
    {
        return Err(BannerError::NotRfb);
    }
    match bytes.len() {
        n if n < BANNER_LEN => Err(BannerError::Incomplete { have: n }),
        BANNER_LEN => {
            let num = |s: &[u8]| {
                s.iter()
                    .fold(0u16, |acc, &d| acc * 10 + u16::from(d - b'0'))
            };
            Ok(RfbVersion {
                major: num(&bytes[4..7]),
                minor: num(&bytes[8..11]),
            })
        }
        n => Err(BannerError::TooLong { have: n }),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn accepts_rfb_versions() {
        for (banner, major, minor) in [
            (&b"RFB 003.008\n"[..], 3, 8),
            (b"RFB 003.003\n", 3, 3),
            (b"RFB 003.007\n", 3, 7),
            (b"RFB 003.889\n", 3, 889), // Apple Remote Desktop
            (b"RFB 004.001\n", 4, 1),   // RealVNC 4
        ] {
            assert_eq!(parse_banner(banner), Ok(RfbVersion { major, minor }));
        }
        assert_eq!(RfbVersion { major: 3, minor: 8 }.to_string(), "3.8");
    }

    #[test]
    fn every_prefix_is_incomplete() {
        let banner = b"RFB 003.008\n";
        for n in 0..12 {
            assert_eq!(
                parse_banner(&banner[..n]),
                Err(BannerError::Incomplete { have: n })
            );
        }
    }

    #[test]
    fn rejects_garbage_early() {
        for bad in [
            &b"HTTP/1.1 400 Bad Request\r\n"[..],
            b"SSH-2.0-OpenSSH_9.2\r\n",
            b"H",
            b"RFB-",
            b"RFB 003.00x\n",
            b"RFB 003,008\n",
            b"RFB 003.008\r",
            b"rfb 003.008\n",
            b"\0\0\0\0",
        ] {
            assert_eq!(
                parse_banner(bad),
                Err(BannerError::NotRfb),
                "{:?}",
                bad.escape_ascii().to_string()
            );
        }
    }

    #[test]
    fn wants_exactly_twelve_bytes() {
        assert_eq!(
            parse_banner(b"RFB 003.008\n\x01\x01"),
            Err(BannerError::TooLong { have: 14 })
        );
    }
}
