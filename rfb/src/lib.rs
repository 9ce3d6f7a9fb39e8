//! vncgate-rfb: RFB 3.8 (RFC 6143) for both roles, without I/O.
//!
//! Everything here works on byte slices: encoders append to a `Vec<u8>`, decoders take what
//! has arrived so far and either produce a message or say they need more. No function in this
//! crate reads a clock, a socket or a random number generator (the VNC auth challenge is
//! handed in), so every path is tested byte-for-byte and split at every byte boundary. The
//! controller's readiness probe, the load tester's clients and its synthetic desktop are the
//! I/O around it, and so is the gateway's view-only filter.
//!
//! | module | owns |
//! |---|---|
//! | [`banner`] | the server's first 12 bytes, checked byte by byte (the readiness probe's test) |
//! | [`pixel`] | the 16-byte `PIXEL_FORMAT` and pixel packing |
//! | [`auth`] | VNC Authentication (security type 2): the DES challenge/response |
//! | [`handshake`] | ProtocolVersion, security, ClientInit/ServerInit for both roles |
//! | [`client_msg`] | client-to-server messages, their incremental decoder, and the sizer of every client message type known ([`client_msg::message_len`]) |
//! | [`server_msg`] | server-to-client messages and their streaming decoder |
//! | [`view_only`] | the client's stream followed without buffering, passing what does not act on the desktop (the gateway's view-only filter) |
//!
//! Dependencies: `des` (for VNC Authentication, feature `vnc-auth`, on by default) and the
//! standard library. Without `vnc-auth` the crate has no `auth`, and the handshakes follow a
//! VNC-auth exchange's shape but cannot compute or check its DES response: the gateway, which
//! only follows handshakes (view-only, replay), links no DES.

#![forbid(unsafe_code)]

#[cfg(feature = "vnc-auth")]
pub mod auth;
pub mod banner;
pub mod client_msg;
pub mod handshake;
pub mod pixel;
pub mod server_msg;
pub mod view_only;

use std::fmt;

pub use client_msg::{ClientMsg, ClientMsgDecoder, UpdateRequest};
pub use handshake::{ClientHandshake, ServerHandshake, ServerInit, ServerSecurity};
pub use pixel::PixelFormat;
pub use server_msg::{Rect, ServerEvent, ServerMsgDecoder};
pub use view_only::{ViewOnlyError, ViewOnlyFilter};

/// The only ProtocolVersion either role here sends (RFC 6143 section 7.1.1).
pub const VERSION_3_8: &[u8; 12] = b"RFB 003.008\n";

/// Security type None (RFC 6143 section 7.2.1).
pub const SECURITY_NONE: u8 = 1;
/// Security type VNC Authentication (RFC 6143 section 7.2.2).
pub const SECURITY_VNC_AUTH: u8 = 2;

/// The Raw encoding (RFC 6143 section 7.7.1), the one every client and server must support.
pub const ENCODING_RAW: i32 = 0;

/// Largest name, failure reason or cut text accepted from a peer. Bounds per-session memory
/// against a peer that announces a 4 GiB string.
pub const MAX_STRING: usize = 1 << 20;

/// A protocol failure, named by what the peer did wrong (or what we do not support).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum RfbError {
    /// The peer's 12-byte ProtocolVersion is not of the form `RFB xxx.yyy\n` (peer's fault:
    /// probably not an RFB endpoint at all).
    BadVersion([u8; 12]),
    /// A well-formed ProtocolVersion, but older than 3.8 (which is all we speak).
    UnsupportedVersion { major: u16, minor: u16 },
    /// The server offered security types, none of which we can do.
    NoSupportedSecurity(Vec<u8>),
    /// The server offers only VNC Authentication and no password was configured.
    PasswordRequired,
    /// The server refused the connection before security (zero security types + reason).
    ConnectionFailed(String),
    /// The client picked a security type the server did not offer.
    BadSecurityChoice(u8),
    /// SecurityResult said failed; carries the server's reason.
    AuthFailed(String),
    /// A message type this role does not know.
    UnknownMessageType(u8),
    /// A known message type with a sub-type this role does not know (QEMU's 255).
    UnknownSubtype { kind: u8, subtype: u8 },
    /// A message whose fields make no sense (an unknown operation code).
    Malformed(&'static str),
    /// A rectangle in an encoding we never asked for.
    UnsupportedEncoding(i32),
    /// A pixel format this implementation cannot produce or parse.
    UnsupportedPixelFormat(PixelFormat),
    /// A length field larger than [`MAX_STRING`].
    TooLarge { what: &'static str, len: usize },
}

impl fmt::Display for RfbError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            RfbError::BadVersion(b) => write!(f, "not an RFB banner: \"{}\"", b.escape_ascii()),
            RfbError::UnsupportedVersion { major, minor } => {
                write!(f, "unsupported RFB version {major}.{minor} (need 3.8)")
            }
            RfbError::NoSupportedSecurity(types) => {
                write!(f, "no supported security type among {types:?}")
            }
            RfbError::PasswordRequired => write!(f, "server requires VNC authentication"),
            RfbError::ConnectionFailed(r) => write!(f, "server refused connection: {r}"),
            RfbError::BadSecurityChoice(t) => write!(f, "client chose unoffered security type {t}"),
            RfbError::AuthFailed(r) => write!(f, "authentication failed: {r}"),
            RfbError::UnknownMessageType(t) => write!(f, "unknown message type {t}"),
            RfbError::UnknownSubtype { kind, subtype } => {
                write!(f, "unknown sub-type {subtype} of message type {kind}")
            }
            RfbError::Malformed(why) => write!(f, "malformed message: {why}"),
            RfbError::UnsupportedEncoding(e) => write!(f, "unsupported encoding {e}"),
            RfbError::UnsupportedPixelFormat(pf) => write!(f, "unsupported pixel format {pf:?}"),
            RfbError::TooLarge { what, len } => write!(f, "{what} too large: {len} bytes"),
        }
    }
}

impl std::error::Error for RfbError {}

impl RfbError {
    /// A short stable name, for metric labels and error maps.
    pub fn kind(&self) -> &'static str {
        match self {
            RfbError::BadVersion(_) => "rfb_not_rfb",
            RfbError::UnsupportedVersion { .. } => "rfb_version",
            RfbError::NoSupportedSecurity(_) => "rfb_no_security",
            RfbError::PasswordRequired => "rfb_password_required",
            RfbError::ConnectionFailed(_) => "rfb_connection_failed",
            RfbError::BadSecurityChoice(_) => "rfb_bad_security_choice",
            RfbError::AuthFailed(_) => "rfb_auth_failed",
            RfbError::UnknownMessageType(_) => "rfb_unknown_message",
            RfbError::UnknownSubtype { .. } => "rfb_unknown_subtype",
            RfbError::Malformed(_) => "rfb_malformed",
            RfbError::UnsupportedEncoding(_) => "rfb_unsupported_encoding",
            RfbError::UnsupportedPixelFormat(_) => "rfb_unsupported_pixel_format",
            RfbError::TooLarge { .. } => "rfb_too_large",
        }
    }
}

/// Parses a ProtocolVersion message (`RFB xxx.yyy\n`) into (major, minor).
pub fn parse_version(b: &[u8; 12]) -> Result<(u16, u16), RfbError> {
    banner::parse_banner(b)
        .map(|v| (v.major, v.minor))
        .map_err(|_| RfbError::BadVersion(*b))
}

pub(crate) fn be16(b: &[u8], at: usize) -> u16 {
    u16::from_be_bytes([b[at], b[at + 1]])
}

pub(crate) fn be32(b: &[u8], at: usize) -> u32 {
    u32::from_be_bytes([b[at], b[at + 1], b[at + 2], b[at + 3]])
}

/// Reads a `u32` length followed by that many bytes at `at`; `None` when incomplete.
#[cfg_attr(not(feature = "vnc-auth"), allow(dead_code))]
pub(crate) fn length_prefixed<'a>(
    b: &'a [u8],
    at: usize,
    what: &'static str,
) -> Result<Option<(&'a [u8], usize)>, RfbError> {
    if b.len() < at + 4 {
        return Ok(None);
    }
    let len = be32(b, at) as usize;
    if len > MAX_STRING {
        return Err(RfbError::TooLarge { what, len });
    }
    let end = at + 4 + len;
    if b.len() < end {
        return Ok(None);
    }
    Ok(Some((&b[at + 4..end], end)))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn version_parses() {
        assert_eq!(parse_version(b"RFB 003.008\n"), Ok((3, 8)));
        assert_eq!(parse_version(b"RFB 003.889\n"), Ok((3, 889)));
        assert!(matches!(
            parse_version(b"HTTP/1.1 200"),
            Err(RfbError::BadVersion(_))
        ));
        assert!(matches!(
            parse_version(b"RFB 003.00x\n"),
            Err(RfbError::BadVersion(_))
        ));
        assert!(matches!(
            parse_version(b"RFB 003.008\r"),
            Err(RfbError::BadVersion(_))
        ));
    }
}
