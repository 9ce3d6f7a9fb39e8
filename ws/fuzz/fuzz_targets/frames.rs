//! The client frame parser on arbitrary bytes, fed at fuzzer-chosen read boundaries.
//!
//! Input layout: `[limit][k][k chunk-size bytes][wire...]`.
//! - `limit` picks `max_message` (the 1009 cap): 1 MiB, or a small cap to reach E_TOO_BIG;
//! - `k % 17` bytes of chunk sizes (each `1..=256`, reused cyclically) split the wire into
//!   reads, the way a socket would deliver it;
//! - the rest is the byte stream from the client.
//!
//! Invariants checked:
//! - `step` consumes `1..=len` bytes for any non-empty buffer (the caller loops on it);
//! - a `Data` range is non-empty, inside the buffer and inside the consumed bytes;
//! - differential: the wire fed at the fuzzer's boundaries, fed whole, and fed a byte at a
//!   time yields the same events (data coalesced, control items in order) and the same
//!   error;
//! - model: all three agree with a simple whole-buffer reference parser written from
//!   RFC 6455 here, so a bug shared by every split (a wrong unmask offset, a missed
//!   check) shows up too.

#![no_main]

use libfuzzer_sys::fuzz_target;
use vncgate_ws::frame::{
    self, E_CLOSE_ONE_BYTE, E_CONTROL_FRAGMENTED, E_CONTROL_TOO_LONG, E_EXPECTED_CONTINUATION,
    E_LENGTH_MSB, E_OPCODE, E_RSV, E_TEXT, E_TOO_BIG, E_UNEXPECTED_CONTINUATION, E_UNMASKED,
    FrameParser, Item, ProtocolError,
};

#[derive(Debug, Clone, PartialEq, Eq)]
enum Event {
    /// Binary payload, coalesced across steps and frames until a control item.
    Data(Vec<u8>),
    Ping(Vec<u8>),
    Pong(Vec<u8>),
    Close(Option<u16>),
}

#[derive(Debug, PartialEq, Eq)]
struct Trace {
    events: Vec<Event>,
    error: Option<ProtocolError>,
}

impl Trace {
    fn new() -> Self {
        Trace { events: Vec::new(), error: None }
    }

    fn data(&mut self, bytes: &[u8]) {
        if let Some(Event::Data(d)) = self.events.last_mut() {
            d.extend_from_slice(bytes);
        } else {
            self.events.push(Event::Data(bytes.to_vec()));
        }
    }
}

/// Feeds `wire` to one parser in reads of the given sizes (cycled), looping `step` over
/// each read as the server's connection loop does.
fn feed(wire: &[u8], max_message: u64, sizes: &mut dyn Iterator<Item = usize>) -> Trace {
    let mut p = FrameParser::new(max_message);
    let mut t = Trace::new();
    let mut read = Vec::with_capacity(wire.len());
    let mut at = 0;
    while at < wire.len() {
        let n = sizes.next().unwrap().clamp(1, wire.len() - at);
        // A fresh copy per read: step unmasks in place.
        read.clear();
        read.extend_from_slice(&wire[at..at + n]);
        at += n;
        let mut off = 0;
        while off < read.len() {
            let len = read.len() - off;
            let s = match p.step(&mut read[off..]) {
                Ok(s) => s,
                Err(e) => {
                    t.error = Some(e);
                    return t;
                }
            };
            assert!(s.consumed >= 1, "step consumed nothing of {len} bytes");
            assert!(s.consumed <= len, "step consumed {} of {len} bytes", s.consumed);
            match s.item {
                Some(Item::Data(r)) => {
                    assert!(r.start < r.end, "empty Data range {r:?}");
                    assert!(r.end <= len, "Data {r:?} outside the {len}-byte buffer");
                    assert!(r.end <= s.consumed, "Data {r:?} beyond consumed {}", s.consumed);
                    t.data(&read[off + r.start..off + r.end]);
                }
                Some(Item::Ping(c)) => t.events.push(Event::Ping(c.as_slice().to_vec())),
                Some(Item::Pong(c)) => t.events.push(Event::Pong(c.as_slice().to_vec())),
                Some(Item::Close(c)) => t.events.push(Event::Close(c.code)),
                None => {}
            }
            off += s.consumed;
        }
    }
    t
}

/// RFC 6455 §5.2 client framing over the whole stream at once: the oracle. Stops at the
/// first error or at an incomplete frame (whose available data payload still counts, since
/// the gateway forwards payload as it arrives).
fn reference(wire: &[u8], max_message: u64) -> Trace {
    let mut t = Trace::new();
    let mut pos = 0;
    let mut in_message = false;
    let mut message_len: u64 = 0;
    loop {
        let rest = &wire[pos..];
        if rest.len() < 2 {
            return t;
        }
        let (b0, b1) = (rest[0], rest[1]);
        let fin = b0 & 0x80 != 0;
        let opcode = b0 & 0x0f;
        let control = opcode >= 0x8;
        let short_len = b1 & 0x7f;
        // What the first two bytes alone tell, in the parser's order.
        let early = if b0 & 0x70 != 0 {
            Some(E_RSV)
        } else if !matches!(opcode, 0x0 | 0x1 | 0x2 | 0x8 | 0x9 | 0xA) {
            Some(E_OPCODE)
        } else if b1 & 0x80 == 0 {
            Some(E_UNMASKED)
        } else if control && !fin {
            Some(E_CONTROL_FRAGMENTED)
        } else if control && short_len > 125 {
            Some(E_CONTROL_TOO_LONG)
        } else {
            None
        };
        if let Some(e) = early {
            t.error = Some(e);
            return t;
        }
        let ext = match short_len {
            126 => 2,
            127 => 8,
            _ => 0,
        };
        if rest.len() < 2 + ext + 4 {
            return t;
        }
        let len = match short_len {
            126 => u16::from_be_bytes([rest[2], rest[3]]) as u64,
            127 => {
                let l = u64::from_be_bytes(rest[2..10].try_into().unwrap());
                if l >> 63 != 0 {
                    t.error = Some(E_LENGTH_MSB);
                    return t;
                }
                l
            }
            l => l as u64,
        };
        let mask: [u8; 4] = rest[2 + ext..2 + ext + 4].try_into().unwrap();
        if !control {
            let e = match (opcode, in_message) {
                (0x0, false) => Some(E_UNEXPECTED_CONTINUATION),
                (0x1 | 0x2, true) => Some(E_EXPECTED_CONTINUATION),
                (0x1, false) => Some(E_TEXT),
                _ => None,
            };
            if let Some(e) = e {
                t.error = Some(e);
                return t;
            }
            message_len = message_len.saturating_add(len);
            if message_len > max_message {
                t.error = Some(E_TOO_BIG);
                return t;
            }
            in_message = !fin;
        }
        let body = &rest[2 + ext + 4..];
        let avail = (body.len() as u64).min(len) as usize;
        let payload: Vec<u8> =
            body[..avail].iter().enumerate().map(|(i, b)| b ^ mask[i % 4]).collect();
        if !control {
            if !payload.is_empty() {
                t.data(&payload);
            }
            if (avail as u64) < len {
                return t;
            }
            if fin {
                message_len = 0;
            }
        } else {
            if (avail as u64) < len {
                return t;
            }
            match opcode {
                0x9 => t.events.push(Event::Ping(payload)),
                0xA => t.events.push(Event::Pong(payload)),
                _ => match payload.len() {
                    0 => t.events.push(Event::Close(None)),
                    1 => {
                        t.error = Some(E_CLOSE_ONE_BYTE);
                        return t;
                    }
                    _ => {
                        let code = u16::from_be_bytes([payload[0], payload[1]]);
                        let valid = matches!(code, 1000..=1003 | 1007..=1014 | 3000..=4999);
                        if !valid {
                            t.error = Some(frame::E_CLOSE_CODE);
                            return t;
                        }
                        if std::str::from_utf8(&payload[2..]).is_err() {
                            t.error = Some(frame::E_CLOSE_UTF8);
                            return t;
                        }
                        t.events.push(Event::Close(Some(code)));
                    }
                },
            }
        }
        pos += 2 + ext + 4 + avail;
    }
}

fuzz_target!(|data: &[u8]| {
    let Some((&limit, rest)) = data.split_first() else {
        return;
    };
    let Some((&k, rest)) = rest.split_first() else {
        return;
    };
    let k = (k as usize % 17).min(rest.len());
    let (sizes, wire) = rest.split_at(k);
    let max_message = match limit {
        0..=127 => 1 << 20,
        128..=191 => 0,
        l => (l as u64 - 191) * 4, // 4..=256: small enough for short inputs to hit 1009
    };

    let fuzzer = if sizes.is_empty() {
        feed(wire, max_message, &mut std::iter::repeat(usize::MAX))
    } else {
        feed(wire, max_message, &mut sizes.iter().map(|&s| s as usize + 1).cycle())
    };
    let whole = feed(wire, max_message, &mut std::iter::repeat(usize::MAX));
    assert_eq!(fuzzer, whole, "fuzzer's read boundaries vs whole");
    let bytewise = feed(wire, max_message, &mut std::iter::repeat(1));
    assert_eq!(bytewise, whole, "byte-at-a-time vs whole");
    assert_eq!(whole, reference(wire, max_message), "parser vs reference model");
});
