//! RFC 6455, client role, without I/O: the upgrade request, the check of the `101` answer,
//! masked frames out, and an incremental decoder for server frames that counts payload
//! bytes without copying them. `conn.rs` drives this over a blocking socket.
//!
//! Deliberately minimal: no subprotocol, no extensions, no answers to pings (the brief of a
//! benchmark client is to count bytes, not to be a good citizen over long sessions).

use base64::Engine as _;
use base64::engine::general_purpose::STANDARD as B64;
use sha1::{Digest, Sha1};

/// RFC 6455 section 1.3: appended to the key before hashing.
const GUID: &str = "258EAFA5-E914-47DA-95CA-C5AB0DC85B11";

/// Longest response head we accept before giving up on the server.
const MAX_HEAD: usize = 8192;

pub const OP_CONT: u8 = 0x0;
pub const OP_TEXT: u8 = 0x1;
pub const OP_BINARY: u8 = 0x2;
pub const OP_CLOSE: u8 = 0x8;

/// A fresh `Sec-WebSocket-Key`: 16 random bytes, base64 (section 4.1).
pub fn new_key(random: [u8; 16]) -> String {
    B64.encode(random)
}

/// The `Sec-WebSocket-Accept` value a server must answer for `key` (section 4.2.2).
pub fn accept_for(key: &str) -> String {
    let mut h = Sha1::new();
    h.update(key.as_bytes());
    h.update(GUID.as_bytes());
    B64.encode(h.finalize())
}

/// The GET upgrade request (section 4.1), with no subprotocol and no extension offered.
pub fn upgrade_request(host: &str, path: &str, key: &str) -> String {
    format!(
        "GET {path} HTTP/1.1\r\nHost: {host}\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\
         Sec-WebSocket-Key: {key}\r\nSec-WebSocket-Version: 13\r\n\r\n"
    )
}

#[derive(Debug, PartialEq, Eq)]
pub enum HandshakeError {
    /// The status line was not `101`; carries the status line.
    Status(String),
    MissingAccept,
    BadAccept,
    TooLong,
}

impl std::fmt::Display for HandshakeError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            HandshakeError::Status(s) => write!(f, "server answered {s:?}, not 101"),
            HandshakeError::MissingAccept => f.write_str("101 without Sec-WebSocket-Accept"),
            HandshakeError::BadAccept => f.write_str("wrong Sec-WebSocket-Accept"),
            HandshakeError::TooLong => write!(f, "response head longer than {MAX_HEAD} bytes"),
        }
    }
}

/// Checks the server's answer to the upgrade. `Ok(None)`: the head is not complete yet;
/// `Ok(Some(n))`: a valid `101` whose head is `buf[..n]` (bytes after it are frames).
pub fn check_response(buf: &[u8], key: &str) -> Result<Option<usize>, HandshakeError> {
    let Some(end) = buf.windows(4).position(|w| w == b"\r\n\r\n") else {
        return if buf.len() > MAX_HEAD {
            Err(HandshakeError::TooLong)
        } else {
            Ok(None)
        };
    };
    let head = String::from_utf8_lossy(&buf[..end]);
    let mut lines = head.split("\r\n");
    let status = lines.next().unwrap_or("");
    let mut parts = status.split_ascii_whitespace();
    if !parts.next().is_some_and(|v| v.starts_with("HTTP/1.")) || parts.next() != Some("101") {
        return Err(HandshakeError::Status(status.to_owned()));
    }
    let want = accept_for(key);
    for line in lines {
        if let Some((name, value)) = line.split_once(':')
            && name.trim().eq_ignore_ascii_case("sec-websocket-accept")
        {
            return if value.trim() == want {
                Ok(Some(end + 4))
            } else {
                Err(HandshakeError::BadAccept)
            };
        }
    }
    Err(HandshakeError::MissingAccept)
}

/// Appends one final, masked client frame (section 5.2, 5.3) to `out`.
pub fn encode_masked(opcode: u8, payload: &[u8], mask: [u8; 4], out: &mut Vec<u8>) {
    out.push(0x80 | opcode);
    let len = payload.len();
    if len < 126 {
        out.push(0x80 | len as u8);
    } else if len <= u16::MAX as usize {
        out.push(0x80 | 126);
        out.extend_from_slice(&(len as u16).to_be_bytes());
    } else {
        out.push(0x80 | 127);
        out.extend_from_slice(&(len as u64).to_be_bytes());
    }
    out.extend_from_slice(&mask);
    out.extend(payload.iter().zip(mask.iter().cycle()).map(|(b, m)| b ^ m));
}

#[derive(Debug, PartialEq, Eq)]
pub enum FrameError {
    /// Section 5.1: a client must close on a masked server frame.
    MaskedServerFrame,
    /// RSV bits set although no extension was negotiated (section 5.2).
    ReservedBits,
    ReservedOpcode(u8),
}

impl std::fmt::Display for FrameError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            FrameError::MaskedServerFrame => f.write_str("server sent a masked frame"),
            FrameError::ReservedBits => f.write_str("server frame with RSV bits set"),
            FrameError::ReservedOpcode(op) => {
                write!(f, "server frame with reserved opcode {op:#x}")
            }
        }
    }
}

/// What one `feed` found.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Fed {
    /// Payload bytes of data frames (text, binary, continuation).
    pub payload: u64,
    /// A close frame began; whatever follows it is ignored.
    pub closed: bool,
}

/// Incremental decoder of server frames. It keeps only a partial header (at most 10 bytes)
/// between calls; payload bytes are counted and skipped, never copied.
#[derive(Debug, Default)]
pub struct FrameDecoder {
    head: [u8; 10],
    head_len: usize,
    /// Payload bytes still to come in the current frame.
    remaining: u64,
    /// Whether the current frame's payload is data (counted) or control (skipped).
    data: bool,
    closed: bool,
}

impl FrameDecoder {
    pub fn feed(&mut self, mut input: &[u8]) -> Result<Fed, FrameError> {
        let mut fed = Fed {
            payload: 0,
            closed: self.closed,
        };
        while !self.closed {
            if self.remaining > 0 {
                if input.is_empty() {
                    break;
                }
                let take = self.remaining.min(input.len() as u64);
                if self.data {
                    fed.payload += take;
                }
                self.remaining -= take;
                input = &input[take as usize..];
                continue;
            }
            // Header: 2 bytes, then 0, 2 or 8 bytes of extended length.
            let need = if self.head_len < 2 {
                2
            } else {
                match self.head[1] & 0x7f {
                    126 => 4,
                    127 => 10,
                    _ => 2,
                }
            };
            if self.head_len < need {
                if input.is_empty() {
                    break;
                }
                let take = (need - self.head_len).min(input.len());
                self.head[self.head_len..self.head_len + take].copy_from_slice(&input[..take]);
                self.head_len += take;
                input = &input[take..];
                if self.head_len == 2 {
                    if self.head[1] & 0x80 != 0 {
                        return Err(FrameError::MaskedServerFrame);
                    }
                    if self.head[0] & 0x70 != 0 {
                        return Err(FrameError::ReservedBits);
                    }
                }
                // Re-evaluate `need`: the second byte may have just arrived.
                continue;
            }
            let len = match self.head[1] & 0x7f {
                126 => u16::from_be_bytes([self.head[2], self.head[3]]) as u64,
                127 => u64::from_be_bytes(self.head[2..10].try_into().expect("8 bytes")),
                n => n as u64,
            };
            let opcode = self.head[0] & 0x0f;
            self.data = match opcode {
                OP_CONT | OP_TEXT | OP_BINARY => true,
                OP_CLOSE => {
                    self.closed = true;
                    fed.closed = true;
                    false
                }
                0x9 | 0xa => false,
                other => return Err(FrameError::ReservedOpcode(other)),
            };
            self.remaining = len;
            self.head_len = 0;
        }
        Ok(fed)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn accept_matches_rfc_example() {
        // RFC 6455 section 1.3.
        assert_eq!(
            accept_for("dGhlIHNhbXBsZSBub25jZQ=="),
            "s3pPLMBiTxaQ9kYGzzhZRbK+xOo="
        );
    }

    #[test]
    fn response_checks() {
        let key = "dGhlIHNhbXBsZSBub25jZQ==";
        let ok = b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\n\
                   Connection: Upgrade\r\nsec-websocket-accept: s3pPLMBiTxaQ9kYGzzhZRbK+xOo=\r\n\r\n\x82\x00";
        assert_eq!(check_response(ok, key), Ok(Some(ok.len() - 2)));
        assert_eq!(check_response(&ok[..20], key), Ok(None));
        let bad = b"HTTP/1.1 404 Not Found\r\n\r\n";
        assert!(matches!(
            check_response(bad, key),
            Err(HandshakeError::Status(_))
        ));
        let wrong = b"HTTP/1.1 101 OK\r\nSec-WebSocket-Accept: xx\r\n\r\n";
        assert_eq!(check_response(wrong, key), Err(HandshakeError::BadAccept));
    }

    #[test]
    fn masked_frame_layout() {
        let mut out = Vec::new();
        encode_masked(OP_BINARY, b"abcd", [1, 2, 3, 4], &mut out);
        assert_eq!(
            out,
            [
                0x82,
                0x84,
                1,
                2,
                3,
                4,
                b'a' ^ 1,
                b'b' ^ 2,
                b'c' ^ 3,
                b'd' ^ 4
            ]
        );
        out.clear();
        encode_masked(OP_BINARY, &[0; 300], [0; 4], &mut out);
        assert_eq!(&out[..4], &[0x82, 0xfe, 0x01, 0x2c]);
        assert_eq!(out.len(), 4 + 4 + 300);
    }

    fn server_frame(opcode: u8, len: usize) -> Vec<u8> {
        let mut f = vec![0x80 | opcode];
        if len < 126 {
            f.push(len as u8);
        } else if len <= 0xffff {
            f.push(126);
            f.extend_from_slice(&(len as u16).to_be_bytes());
        } else {
            f.push(127);
            f.extend_from_slice(&(len as u64).to_be_bytes());
        }
        f.resize(f.len() + len, 0xab);
        f
    }

    #[test]
    fn decoder_counts_all_lengths_byte_by_byte() {
        let mut stream = Vec::new();
        stream.extend(server_frame(OP_BINARY, 5));
        stream.extend(server_frame(0x9, 3)); // ping: skipped, not counted
        stream.extend(server_frame(OP_BINARY, 300));
        stream.extend(server_frame(OP_CONT, 70_000));
        stream.extend(server_frame(OP_BINARY, 0));
        let want = 5 + 300 + 70_000;
        // Whole, and split at every byte: same count.
        let mut d = FrameDecoder::default();
        assert_eq!(d.feed(&stream).unwrap().payload, want);
        let mut d = FrameDecoder::default();
        let total: u64 = stream.chunks(1).map(|c| d.feed(c).unwrap().payload).sum();
        assert_eq!(total, want);
        let mut d = FrameDecoder::default();
        let total: u64 = stream.chunks(7).map(|c| d.feed(c).unwrap().payload).sum();
        assert_eq!(total, want);
    }

    #[test]
    fn decoder_stops_at_close_and_rejects_masked() {
        let mut stream = server_frame(OP_BINARY, 4);
        stream.extend(server_frame(OP_CLOSE, 2));
        stream.extend(server_frame(OP_BINARY, 9));
        let mut d = FrameDecoder::default();
        assert_eq!(
            d.feed(&stream).unwrap(),
            Fed {
                payload: 4,
                closed: true
            }
        );
        let mut d = FrameDecoder::default();
        assert_eq!(d.feed(&[0x82, 0x81]), Err(FrameError::MaskedServerFrame));
        let mut d = FrameDecoder::default();
        assert_eq!(d.feed(&[0x83, 0x00]), Err(FrameError::ReservedOpcode(3)));
    }
}
