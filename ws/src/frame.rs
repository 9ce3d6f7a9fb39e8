//! RFC 6455 framing, sans IO: an incremental parser for client frames and the encoders for
//! server frames.
//!
//! [`FrameParser::step`] takes whatever bytes the socket produced, at any boundary, and
//! returns how many it consumed plus at most one [`Item`]. Binary payload is unmasked in
//! place and reported as a range of the caller's buffer, so it can be forwarded to the VM
//! without another copy and without waiting for the end of the message: RFB is a byte stream
//! and message boundaries carry no meaning for it. Control frames (at most 125 bytes) are
//! gathered inside the parser, so they too may arrive split across reads.

use std::ops::Range;

use super::mask::unmask;

pub const OP_CONTINUATION: u8 = 0x0;
pub const OP_TEXT: u8 = 0x1;
pub const OP_BINARY: u8 = 0x2;
pub const OP_CLOSE: u8 = 0x8;
pub const OP_PING: u8 = 0x9;
pub const OP_PONG: u8 = 0xA;

/// Longest control-frame payload (§5.5).
pub const MAX_CONTROL_PAYLOAD: usize = 125;
/// Longest server frame header: 2 bytes plus a 64-bit length; server frames are unmasked.
pub const MAX_SERVER_HEADER: usize = 10;

/// A violation that ends the connection, with the close code the RFC prescribes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ProtocolError {
    pub code: u16,
    pub reason: &'static str,
}

impl std::fmt::Display for ProtocolError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}: {}", self.code, self.reason)
    }
}

impl std::error::Error for ProtocolError {}

const fn perr(code: u16, reason: &'static str) -> ProtocolError {
    ProtocolError { code, reason }
}

pub const E_RSV: ProtocolError = perr(1002, "reserved bits set");
pub const E_OPCODE: ProtocolError = perr(1002, "reserved opcode");
pub const E_UNMASKED: ProtocolError = perr(1002, "unmasked client frame");
pub const E_CONTROL_FRAGMENTED: ProtocolError = perr(1002, "fragmented control frame");
pub const E_CONTROL_TOO_LONG: ProtocolError = perr(1002, "control frame longer than 125 bytes");
pub const E_LENGTH_MSB: ProtocolError = perr(1002, "64-bit length with the top bit set");
pub const E_UNEXPECTED_CONTINUATION: ProtocolError = perr(1002, "continuation without a message");
pub const E_EXPECTED_CONTINUATION: ProtocolError =
    perr(1002, "new message inside a fragmented one");
pub const E_CLOSE_ONE_BYTE: ProtocolError = perr(1002, "close payload of one byte");
pub const E_CLOSE_CODE: ProtocolError = perr(1002, "invalid close code");
pub const E_CLOSE_UTF8: ProtocolError = perr(1007, "close reason is not UTF-8");
pub const E_TEXT: ProtocolError = perr(1003, "text frames are not supported");
pub const E_TOO_BIG: ProtocolError = perr(1009, "message too big");

/// A control frame payload, copied out of the parser (at most 125 bytes).
#[derive(Clone, Copy)]
pub struct ControlPayload {
    buf: [u8; MAX_CONTROL_PAYLOAD],
    len: u8,
}

impl ControlPayload {
    pub fn as_slice(&self) -> &[u8] {
        &self.buf[..self.len as usize]
    }
}

impl std::fmt::Debug for ControlPayload {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "ControlPayload({:?})", self.as_slice())
    }
}

/// A validated close frame from the client.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Close {
    /// `None` when the frame had no payload (reported as 1005 locally, never sent).
    pub code: Option<u16>,
}

#[derive(Debug)]
pub enum Item {
    /// Unmasked binary payload, at this range of the buffer passed to `step`.
    Data(Range<usize>),
    Ping(ControlPayload),
    Pong(ControlPayload),
    Close(Close),
}

/// One call's result: bytes consumed from the front of the buffer, and what they made.
#[derive(Debug)]
pub struct Step {
    pub consumed: usize,
    pub item: Option<Item>,
}

#[derive(Debug, Clone, Copy)]
enum State {
    /// Gathering header bytes into `hdr`.
    Header,
    /// Inside a payload: `remaining` bytes to go, `offset` done (for the mask phase).
    Payload {
        opcode: u8,
        fin: bool,
        remaining: u64,
        offset: u64,
        mask: [u8; 4],
    },
}

/// Incremental parser of client-to-server frames. Holds about 160 bytes of state.
#[derive(Debug)]
pub struct FrameParser {
    state: State,
    hdr: [u8; 14],
    hdr_len: u8,
    ctrl: [u8; MAX_CONTROL_PAYLOAD],
    ctrl_len: u8,
    /// A fragmented data message is open (its first frame had FIN clear).
    in_message: bool,
    /// Payload bytes of the current message so far, for the size cap.
    message_len: u64,
    max_message: u64,
}

impl FrameParser {
    /// `max_message`: the largest message (all fragments together) accepted; more is 1009.
    pub fn new(max_message: u64) -> Self {
        Self {
            state: State::Header,
            hdr: [0; 14],
            hdr_len: 0,
            ctrl: [0; MAX_CONTROL_PAYLOAD],
            ctrl_len: 0,
            in_message: false,
            message_len: 0,
            max_message,
        }
    }

    /// Consumes bytes from the front of `buf`. Consumes at least one byte whenever `buf` is
    /// non-empty, so a caller loops `while !buf.is_empty()` without stalling.
    pub fn step(&mut self, buf: &mut [u8]) -> Result<Step, ProtocolError> {
        let mut pos = 0;
        if let State::Header = self.state {
            pos = self.take_header(buf)?;
            if let State::Header = self.state {
                return Ok(Step {
                    consumed: pos,
                    item: None,
                });
            }
        }
        let State::Payload {
            opcode,
            fin,
            remaining,
            offset,
            mask,
        } = self.state
        else {
            unreachable!("header completed above")
        };
        let n = (buf.len() - pos).min(usize::try_from(remaining).unwrap_or(usize::MAX));
        let chunk = &mut buf[pos..pos + n];
        unmask(chunk, mask, (offset % 4) as usize);
        let left = remaining - n as u64;
        self.state = State::Payload {
            opcode,
            fin,
            remaining: left,
            offset: offset + n as u64,
            mask,
        };
        if opcode < 0x8 {
            if left == 0 {
                self.state = State::Header;
                if fin {
                    self.in_message = false;
                    self.message_len = 0;
                }
            }
            let item = (n > 0).then_some(Item::Data(pos..pos + n));
            return Ok(Step {
                consumed: pos + n,
                item,
            });
        }
        let at = self.ctrl_len as usize;
        self.ctrl[at..at + n].copy_from_slice(chunk);
        self.ctrl_len += n as u8;
        let item = if left == 0 {
            self.state = State::Header;
            Some(self.finish_control(opcode)?)
        } else {
            None
        };
        Ok(Step {
            consumed: pos + n,
            item,
        })
    }

    /// Moves header bytes into `hdr`; on a complete header, validates it and enters
    /// `Payload`. Returns how many bytes of `buf` it took.
    fn take_header(&mut self, buf: &[u8]) -> Result<usize, ProtocolError> {
        let mut taken = 0;
        loop {
            let have = self.hdr_len as usize;
            let need = if have < 2 {
                2
            } else {
                2 + match self.hdr[1] & 0x7f {
                    126 => 2,
                    127 => 8,
                    _ => 0,
                } + 4
            };
            if have >= need {
                break;
            }
            let n = (need - have).min(buf.len() - taken);
            if n == 0 {
                return Ok(taken);
            }
            self.hdr[have..have + n].copy_from_slice(&buf[taken..taken + n]);
            self.hdr_len += n as u8;
            taken += n;
            if have < 2 && self.hdr_len >= 2 {
                self.check_first_two()?;
            }
        }
        let h = &self.hdr;
        let fin = h[0] & 0x80 != 0;
        let opcode = h[0] & 0x0f;
        let (len, mask_at) = match h[1] & 0x7f {
            126 => (u16::from_be_bytes([h[2], h[3]]) as u64, 4),
            127 => {
                let l = u64::from_be_bytes(h[2..10].try_into().expect("8 bytes"));
                if l >> 63 != 0 {
                    return Err(E_LENGTH_MSB);
                }
                (l, 10)
            }
            l => (l as u64, 2),
        };
        let mask = [h[mask_at], h[mask_at + 1], h[mask_at + 2], h[mask_at + 3]];
        if opcode < 0x8 {
            match (opcode, self.in_message) {
                (OP_CONTINUATION, false) => return Err(E_UNEXPECTED_CONTINUATION),
                (OP_TEXT | OP_BINARY, true) => return Err(E_EXPECTED_CONTINUATION),
                (OP_TEXT, false) => return Err(E_TEXT),
                _ => {}
            }
            self.message_len = self.message_len.saturating_add(len);
            if self.message_len > self.max_message {
                return Err(E_TOO_BIG);
            }
            self.in_message = !fin;
        } else {
            self.ctrl_len = 0;
        }
        self.hdr_len = 0;
        self.state = State::Payload {
            opcode,
            fin,
            remaining: len,
            offset: 0,
            mask,
        };
        Ok(taken)
    }

    /// Checks what the first two header bytes alone can tell, before waiting for the rest,
    /// so garbage is refused at once rather than after an extended length arrives.
    fn check_first_two(&self) -> Result<(), ProtocolError> {
        let (b0, b1) = (self.hdr[0], self.hdr[1]);
        if b0 & 0x70 != 0 {
            return Err(E_RSV);
        }
        let opcode = b0 & 0x0f;
        if !matches!(
            opcode,
            OP_CONTINUATION | OP_TEXT | OP_BINARY | OP_CLOSE | OP_PING | OP_PONG
        ) {
            return Err(E_OPCODE);
        }
        if b1 & 0x80 == 0 {
            return Err(E_UNMASKED);
        }
        if opcode >= 0x8 {
            if b0 & 0x80 == 0 {
                return Err(E_CONTROL_FRAGMENTED);
            }
            if (b1 & 0x7f) as usize > MAX_CONTROL_PAYLOAD {
                return Err(E_CONTROL_TOO_LONG);
            }
        }
        Ok(())
    }

    fn finish_control(&mut self, opcode: u8) -> Result<Item, ProtocolError> {
        let payload = ControlPayload {
            buf: self.ctrl,
            len: self.ctrl_len,
        };
        self.ctrl_len = 0;
        Ok(match opcode {
            OP_PING => Item::Ping(payload),
            OP_PONG => Item::Pong(payload),
            _ => Item::Close(parse_close(payload.as_slice())?),
        })
    }
}

/// Validates a close payload (§5.5.1, §7.4): empty, or a code of two bytes plus UTF-8.
pub fn parse_close(p: &[u8]) -> Result<Close, ProtocolError> {
    match p.len() {
        0 => Ok(Close { code: None }),
        1 => Err(E_CLOSE_ONE_BYTE),
        _ => {
            let code = u16::from_be_bytes([p[0], p[1]]);
            if !is_valid_received_code(code) {
                return Err(E_CLOSE_CODE);
            }
            std::str::from_utf8(&p[2..]).map_err(|_| E_CLOSE_UTF8)?;
            Ok(Close { code: Some(code) })
        }
    }
}

/// Close codes a peer may send (§7.4.1 and IANA's registry): 1000-1003, 1007-1014 and the
/// 3000-4999 application range. 1004-1006 and 1015 are reserved and never sent on the wire.
pub fn is_valid_received_code(code: u16) -> bool {
    matches!(code, 1000..=1003 | 1007..=1014 | 3000..=4999)
}

/// Writes a server frame header (FIN set, unmasked) for a payload of `len` bytes into
/// `out`, returning its length (2, 4 or 10).
#[inline]
pub fn encode_header(out: &mut [u8; MAX_SERVER_HEADER], opcode: u8, len: u64) -> usize {
    out[0] = 0x80 | opcode;
    if len < 126 {
        out[1] = len as u8;
        2
    } else if len <= u16::MAX as u64 {
        out[1] = 126;
        out[2..4].copy_from_slice(&(len as u16).to_be_bytes());
        4
    } else {
        out[1] = 127;
        out[2..10].copy_from_slice(&len.to_be_bytes());
        10
    }
}

/// Appends a masked client frame (the browser's side of §5.2) with first byte `b0` (FIN,
/// RSV and opcode) to `out`. The gateway never sends these; tests, benchmarks, fuzzing and
/// load tools that play the browser do.
pub fn encode_client_frame(out: &mut Vec<u8>, b0: u8, payload: &[u8], mask: [u8; 4]) {
    out.push(b0);
    match payload.len() {
        n if n < 126 => out.push(0x80 | n as u8),
        n if n <= 0xffff => {
            out.push(0x80 | 126);
            out.extend_from_slice(&(n as u16).to_be_bytes());
        }
        n => {
            out.push(0x80 | 127);
            out.extend_from_slice(&(n as u64).to_be_bytes());
        }
    }
    out.extend_from_slice(&mask);
    let start = out.len();
    out.extend_from_slice(payload);
    unmask(&mut out[start..], mask, 0);
}

/// A complete server control frame (at most 127 bytes), built without allocating.
#[derive(Clone, Copy)]
pub struct ControlFrame {
    buf: [u8; 2 + MAX_CONTROL_PAYLOAD],
    len: u8,
}

impl ControlFrame {
    pub fn as_bytes(&self) -> &[u8] {
        &self.buf[..self.len as usize]
    }

    /// A ping or pong carrying `payload` (truncated to 125 bytes).
    pub fn new(opcode: u8, payload: &[u8]) -> Self {
        let n = payload.len().min(MAX_CONTROL_PAYLOAD);
        let mut buf = [0u8; 2 + MAX_CONTROL_PAYLOAD];
        buf[0] = 0x80 | opcode;
        buf[1] = n as u8;
        buf[2..2 + n].copy_from_slice(&payload[..n]);
        Self {
            buf,
            len: 2 + n as u8,
        }
    }

    /// A close frame with `code` and `reason`, the reason cut at a character boundary to
    /// fit 123 bytes. `None` sends an empty close (the answer to an empty close).
    pub fn close(code: Option<u16>, reason: &str) -> Self {
        let mut payload = [0u8; MAX_CONTROL_PAYLOAD];
        let n = match code {
            None => 0,
            Some(c) => {
                payload[..2].copy_from_slice(&c.to_be_bytes());
                let mut cut = reason.len().min(MAX_CONTROL_PAYLOAD - 2);
                while !reason.is_char_boundary(cut) {
                    cut -= 1;
                }
                payload[2..2 + cut].copy_from_slice(&reason.as_bytes()[..cut]);
                2 + cut
            }
        };
        Self::new(OP_CLOSE, &payload[..n])
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const MASK: [u8; 4] = [0x37, 0xfa, 0x21, 0x3d];

    /// A masked client frame, as a browser would send it.
    fn client_frame(b0: u8, payload: &[u8]) -> Vec<u8> {
        let mut f = Vec::new();
        encode_client_frame(&mut f, b0, payload, MASK);
        f
    }

    /// Feeds `input` in pieces of `chunk` bytes; returns the binary data and the items.
    fn run(input: &[u8], chunk: usize) -> Result<(Vec<u8>, Vec<String>), ProtocolError> {
        let mut p = FrameParser::new(1 << 20);
        let mut data = Vec::new();
        let mut items = Vec::new();
        for piece in input.chunks(chunk) {
            let mut buf = piece.to_vec();
            let mut off = 0;
            while off < buf.len() {
                let s = p.step(&mut buf[off..])?;
                assert!(s.consumed > 0, "stalled");
                match s.item {
                    Some(Item::Data(r)) => data.extend_from_slice(&buf[off + r.start..off + r.end]),
                    Some(Item::Ping(c)) => items.push(format!("ping {:?}", c.as_slice())),
                    Some(Item::Pong(c)) => items.push(format!("pong {:?}", c.as_slice())),
                    Some(Item::Close(c)) => items.push(format!("close {:?}", c.code)),
                    None => {}
                }
                off += s.consumed;
            }
        }
        Ok((data, items))
    }

    #[test]
    fn rfc_example_single_frame_masked() {
        // §5.7 example: masked "Hello" (as binary here; text is refused).
        let f = [
            0x82, 0x85, 0x37, 0xfa, 0x21, 0x3d, 0x7f, 0x9f, 0x4d, 0x51, 0x58,
        ];
        let (data, _) = run(&f, 100).unwrap();
        assert_eq!(data, b"Hello");
    }

    #[test]
    fn every_read_boundary_and_all_length_encodings() {
        for len in [0usize, 1, 125, 126, 127, 65535, 65536, 70000] {
            let payload: Vec<u8> = (0..len).map(|i| (i % 251) as u8).collect();
            let mut wire = client_frame(0x82, &payload);
            wire.extend(client_frame(0x89, b"hi"));
            for chunk in [1, 2, 3, 7, 13, 4096, usize::MAX] {
                if len > 200 && chunk < 7 {
                    continue; // byte-at-a-time on big frames adds time, not coverage
                }
                let (data, items) = run(&wire, chunk.min(wire.len())).unwrap();
                assert_eq!(data, payload, "len {len} chunk {chunk}");
                assert_eq!(items, vec!["ping [104, 105]"]);
            }
        }
    }

    #[test]
    fn fragmented_message_with_interleaved_control_frames() {
        let mut wire = client_frame(0x02, b"abc"); // binary, FIN clear
        wire.extend(client_frame(0x89, b"p1")); // ping between fragments
        wire.extend(client_frame(0x00, b"def")); // continuation
        wire.extend(client_frame(0x8A, b"")); // pong between fragments
        wire.extend(client_frame(0x80, b"g")); // final continuation
        wire.extend(client_frame(0x82, b"h")); // a new message after it
        for chunk in 1..wire.len() {
            let (data, items) = run(&wire, chunk).unwrap();
            assert_eq!(data, b"abcdefgh");
            assert_eq!(items, vec!["ping [112, 49]", "pong []"]);
        }
    }

    fn err(wire: &[u8]) -> ProtocolError {
        run(wire, wire.len().max(1)).unwrap_err()
    }

    #[test]
    fn protocol_errors_have_rfc_codes() {
        assert_eq!(err(&[0x82, 0x01, b'x']), E_UNMASKED);
        assert_eq!(err(&client_frame(0xC2, b"x")), E_RSV);
        assert_eq!(err(&client_frame(0x83, b"x")), E_OPCODE);
        assert_eq!(err(&client_frame(0x8B, b"x")), E_OPCODE);
        assert_eq!(err(&client_frame(0x09, b"x")), E_CONTROL_FRAGMENTED);
        assert_eq!(
            err(&[0x89, 0x80 | 126, 0, 126, 0, 0, 0, 0]),
            E_CONTROL_TOO_LONG
        );
        assert_eq!(err(&client_frame(0x81, b"text")), E_TEXT);
        assert_eq!(err(&client_frame(0x80, b"x")), E_UNEXPECTED_CONTINUATION);
        let mut two = client_frame(0x02, b"a");
        two.extend(client_frame(0x82, b"b"));
        assert_eq!(err(&two), E_EXPECTED_CONTINUATION);
        let mut msb = vec![0x82, 0xff];
        msb.extend_from_slice(&(1u64 << 63).to_be_bytes());
        msb.extend_from_slice(&MASK);
        assert_eq!(err(&msb), E_LENGTH_MSB);
    }

    #[test]
    fn huge_lengths_hit_the_cap_before_any_payload() {
        let mut max = vec![0x82, 0xff];
        max.extend_from_slice(&(i64::MAX as u64).to_be_bytes());
        max.extend_from_slice(&MASK);
        assert_eq!(err(&max), E_TOO_BIG);
        // The cap counts all fragments of one message.
        let mut p = FrameParser::new(10);
        let mut a = client_frame(0x02, &[0; 6]);
        assert!(p.step(&mut a).is_ok());
        let mut b = client_frame(0x80, &[0; 6]);
        assert_eq!(p.step(&mut b).unwrap_err(), E_TOO_BIG);
    }

    #[test]
    fn close_payload_validation() {
        assert_eq!(parse_close(&[]).unwrap().code, None);
        assert_eq!(parse_close(&[0x03]).unwrap_err(), E_CLOSE_ONE_BYTE);
        assert_eq!(
            parse_close(&1000u16.to_be_bytes()).unwrap().code,
            Some(1000)
        );
        for bad in [0u16, 999, 1004, 1005, 1006, 1015, 1016, 2999, 5000, 65535] {
            assert_eq!(
                parse_close(&bad.to_be_bytes()).unwrap_err(),
                E_CLOSE_CODE,
                "{bad}"
            );
        }
        let mut p = 4001u16.to_be_bytes().to_vec();
        p.extend_from_slice(&[0xce, 0xba, 0xe1, 0xbd, 0xb9]); // "κό"
        assert_eq!(parse_close(&p).unwrap().code, Some(4001));
        let mut bad = 1000u16.to_be_bytes().to_vec();
        bad.extend_from_slice(&[0xff, 0xfe]);
        assert_eq!(parse_close(&bad).unwrap_err(), E_CLOSE_UTF8);
        let (_, items) = run(&client_frame(0x88, &1001u16.to_be_bytes()), 1).unwrap();
        assert_eq!(items, vec!["close Some(1001)"]);
    }

    #[test]
    fn server_headers_byte_for_byte() {
        let enc = |len| {
            let mut h = [0u8; MAX_SERVER_HEADER];
            let n = encode_header(&mut h, OP_BINARY, len);
            h[..n].to_vec()
        };
        assert_eq!(enc(5), [0x82, 5]);
        assert_eq!(enc(126), [0x82, 126, 0, 126]);
        assert_eq!(enc(65536), [0x82, 127, 0, 0, 0, 0, 0, 1, 0, 0]);
    }

    #[test]
    fn server_control_frames() {
        assert_eq!(
            ControlFrame::new(OP_PONG, b"Hello").as_bytes(),
            &[0x8a, 0x05, 0x48, 0x65, 0x6c, 0x6c, 0x6f]
        );
        assert_eq!(
            ControlFrame::close(Some(4000), "vm vnc port refused").as_bytes()[..4],
            [0x88, 21, 0x0f, 0xa0]
        );
        assert_eq!(ControlFrame::close(None, "").as_bytes(), &[0x88, 0]);
        let long = "é".repeat(100); // 200 bytes: cut to 122, a character boundary
        let f = ControlFrame::close(Some(1000), &long);
        assert_eq!(f.as_bytes().len(), 2 + 2 + 122);
        assert!(std::str::from_utf8(&f.as_bytes()[4..]).is_ok());
    }
}
