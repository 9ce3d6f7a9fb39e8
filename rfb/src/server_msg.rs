//! Server-to-client messages (RFC 6143 section 7.6) and a streaming decoder for them.
//!
//! A FramebufferUpdate can be megabytes, so the decoder does not wait for a whole one: it
//! yields the update header, each rectangle header, then the rectangle's Raw pixel bytes in
//! whatever pieces have arrived, then an end marker. A client that only counts bytes (the
//! swarm) therefore holds one read's worth of memory per session, not one screen's worth.

use crate::{ENCODING_RAW, MAX_STRING, PixelFormat, RfbError, be16, be32};

/// A rectangle header inside a FramebufferUpdate (RFC 6143 7.6.1).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Rect {
    pub x: u16,
    pub y: u16,
    pub width: u16,
    pub height: u16,
    pub encoding: i32,
}

impl Rect {
    /// Appends the 12-byte rectangle header.
    pub fn encode(&self, out: &mut Vec<u8>) {
        for v in [self.x, self.y, self.width, self.height] {
            out.extend_from_slice(&v.to_be_bytes());
        }
        out.extend_from_slice(&self.encoding.to_be_bytes());
    }
}

/// Appends a FramebufferUpdate header announcing `rects` rectangles (type 0).
pub fn encode_update_header(rects: u16, out: &mut Vec<u8>) {
    out.extend_from_slice(&[0, 0]);
    out.extend_from_slice(&rects.to_be_bytes());
}

/// Appends SetColourMapEntries (type 1); colours are 16-bit (r, g, b).
pub fn encode_colour_map(first: u16, colours: &[[u16; 3]], out: &mut Vec<u8>) {
    out.extend_from_slice(&[1, 0]);
    out.extend_from_slice(&first.to_be_bytes());
    out.extend_from_slice(&(colours.len() as u16).to_be_bytes());
    for c in colours {
        for v in c {
            out.extend_from_slice(&v.to_be_bytes());
        }
    }
}

/// Appends Bell (type 2).
pub fn encode_bell(out: &mut Vec<u8>) {
    out.push(2);
}

/// Appends ServerCutText (type 3).
pub fn encode_cut_text(text: &[u8], out: &mut Vec<u8>) {
    out.extend_from_slice(&[3, 0, 0, 0]);
    out.extend_from_slice(&(text.len() as u32).to_be_bytes());
    out.extend_from_slice(text);
}

/// What the decoder found next in the server's stream.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ServerEvent<'a> {
    /// A FramebufferUpdate begins with this many rectangles.
    UpdateBegin {
        rects: u16,
    },
    /// A rectangle header; for Raw, `width * height * bpp` bytes follow as `Pixels`.
    Rect(Rect),
    /// A piece of the current rectangle's pixel data (as much as has arrived).
    Pixels(&'a [u8]),
    /// The FramebufferUpdate is complete.
    UpdateEnd,
    ColourMap {
        first: u16,
        colours: Vec<[u16; 3]>,
    },
    Bell,
    CutText(&'a [u8]),
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum State {
    /// Between messages.
    Idle,
    /// Inside an update, `left` rectangle headers still to come.
    RectHeader { left: u16 },
    /// Inside a rectangle's pixels.
    RectData { left: u16, remaining: usize },
    /// All rectangles seen; `UpdateEnd` is due.
    EndPending,
}

impl State {
    fn after_rect(left: u16) -> State {
        if left == 0 {
            State::EndPending
        } else {
            State::RectHeader { left }
        }
    }
}

/// Buffers server bytes and yields [`ServerEvent`]s. Only Raw rectangles are understood:
/// a client using this decoder must advertise only Raw in SetEncodings.
#[derive(Debug)]
pub struct ServerMsgDecoder {
    buf: Vec<u8>,
    pos: usize,
    bytes_per_pixel: usize,
    state: State,
}

impl ServerMsgDecoder {
    /// A decoder for updates in `pf` (the ServerInit format, or whatever the client set).
    pub fn new(pf: &PixelFormat) -> ServerMsgDecoder {
        ServerMsgDecoder {
            buf: Vec::new(),
            pos: 0,
            bytes_per_pixel: pf.bytes_per_pixel(),
            state: State::Idle,
        }
    }

    /// Call after sending SetPixelFormat and before the next update request.
    pub fn set_pixel_format(&mut self, pf: &PixelFormat) {
        self.bytes_per_pixel = pf.bytes_per_pixel();
    }

    /// Appends bytes as they arrived.
    pub fn feed(&mut self, bytes: &[u8]) {
        if self.pos > 0 {
            self.buf.drain(..self.pos);
            self.pos = 0;
        }
        self.buf.extend_from_slice(bytes);
    }

    /// Bytes received but not yet decoded.
    pub fn buffered(&self) -> usize {
        self.buf.len() - self.pos
    }

    /// The next event, or `None` if more bytes are needed.
    pub fn next_event(&mut self) -> Result<Option<ServerEvent<'_>>, RfbError> {
        let start = self.pos;
        let b = &self.buf[start..];
        match self.state {
            State::Idle => {
                let Some(&kind) = b.first() else {
                    return Ok(None);
                };
                match kind {
                    0 => {
                        if b.len() < 4 {
                            return Ok(None);
                        }
                        let rects = be16(b, 2);
                        self.pos += 4;
                        self.state = State::after_rect(rects);
                        Ok(Some(ServerEvent::UpdateBegin { rects }))
                    }
                    1 => {
                        if b.len() < 6 {
                            return Ok(None);
                        }
                        let (first, n) = (be16(b, 2), usize::from(be16(b, 4)));
                        let need = 6 + 6 * n;
                        if b.len() < need {
                            return Ok(None);
                        }
                        let colours = b[6..need]
                            .chunks_exact(6)
                            .map(|c| [be16(c, 0), be16(c, 2), be16(c, 4)])
                            .collect();
                        self.pos += need;
                        Ok(Some(ServerEvent::ColourMap { first, colours }))
                    }
                    2 => {
                        self.pos += 1;
                        Ok(Some(ServerEvent::Bell))
                    }
                    3 => {
                        if b.len() < 8 {
                            return Ok(None);
                        }
                        let len = be32(b, 4) as usize;
                        if len > MAX_STRING {
                            return Err(RfbError::TooLarge {
                                what: "server cut text",
                                len,
                            });
                        }
                        if b.len() < 8 + len {
                            return Ok(None);
                        }
                        self.pos += 8 + len;
                        Ok(Some(ServerEvent::CutText(
                            &self.buf[start + 8..start + 8 + len],
                        )))
                    }
                    other => Err(RfbError::UnknownMessageType(other)),
                }
            }
            State::RectHeader { left } => {
                if b.len() < 12 {
                    return Ok(None);
                }
                let rect = Rect {
                    x: be16(b, 0),
                    y: be16(b, 2),
                    width: be16(b, 4),
                    height: be16(b, 6),
                    encoding: be32(b, 8) as i32,
                };
                if rect.encoding != ENCODING_RAW {
                    return Err(RfbError::UnsupportedEncoding(rect.encoding));
                }
                self.pos += 12;
                let remaining =
                    usize::from(rect.width) * usize::from(rect.height) * self.bytes_per_pixel;
                self.state = if remaining == 0 {
                    State::after_rect(left - 1)
                } else {
                    State::RectData {
                        left: left - 1,
                        remaining,
                    }
                };
                Ok(Some(ServerEvent::Rect(rect)))
            }
            State::RectData { left, remaining } => {
                if b.is_empty() {
                    return Ok(None);
                }
                let take = remaining.min(b.len());
                self.pos += take;
                self.state = if take == remaining {
                    State::after_rect(left)
                } else {
                    State::RectData {
                        left,
                        remaining: remaining - take,
                    }
                };
                Ok(Some(ServerEvent::Pixels(&self.buf[start..start + take])))
            }
            State::EndPending => {
                self.state = State::Idle;
                Ok(Some(ServerEvent::UpdateEnd))
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Events with the pixel pieces merged, so runs split differently compare equal.
    #[derive(Debug, PartialEq, Eq)]
    enum Owned {
        Begin(u16),
        Rect(Rect),
        Pixels(Vec<u8>),
        End,
        ColourMap(u16, Vec<[u16; 3]>),
        Bell,
        Cut(Vec<u8>),
    }

    fn drain(dec: &mut ServerMsgDecoder, out: &mut Vec<Owned>) {
        while let Some(ev) = dec.next_event().unwrap() {
            let o = match ev {
                ServerEvent::UpdateBegin { rects } => Owned::Begin(rects),
                ServerEvent::Rect(r) => Owned::Rect(r),
                ServerEvent::Pixels(p) => {
                    if let Some(Owned::Pixels(prev)) = out.last_mut() {
                        prev.extend_from_slice(p);
                        continue;
                    }
                    Owned::Pixels(p.to_vec())
                }
                ServerEvent::UpdateEnd => Owned::End,
                ServerEvent::ColourMap { first, colours } => Owned::ColourMap(first, colours),
                ServerEvent::Bell => Owned::Bell,
                ServerEvent::CutText(t) => Owned::Cut(t.to_vec()),
            };
            out.push(o);
        }
    }

    fn stream() -> (Vec<u8>, Vec<Owned>) {
        let mut s = Vec::new();
        let r1 = Rect {
            x: 1,
            y: 2,
            width: 2,
            height: 1,
            encoding: 0,
        };
        let r2 = Rect {
            x: 0,
            y: 0,
            width: 0,
            height: 5,
            encoding: 0,
        };
        encode_update_header(2, &mut s);
        r1.encode(&mut s);
        s.extend_from_slice(&[1, 2, 3, 4, 5, 6, 7, 8]);
        r2.encode(&mut s);
        encode_bell(&mut s);
        encode_cut_text(b"echo", &mut s);
        encode_update_header(0, &mut s);
        encode_colour_map(7, &[[1, 2, 0xffff]], &mut s);
        let events = vec![
            Owned::Begin(2),
            Owned::Rect(r1),
            Owned::Pixels(vec![1, 2, 3, 4, 5, 6, 7, 8]),
            Owned::Rect(r2),
            Owned::End,
            Owned::Bell,
            Owned::Cut(b"echo".to_vec()),
            Owned::Begin(0),
            Owned::End,
            Owned::ColourMap(7, vec![[1, 2, 0xffff]]),
        ];
        (s, events)
    }

    #[test]
    fn encoders_byte_for_byte() {
        let (s, _) = stream();
        #[rustfmt::skip]
        let expected: Vec<u8> = vec![
            0, 0, 0, 2,
            0, 1, 0, 2, 0, 2, 0, 1, 0, 0, 0, 0,
            1, 2, 3, 4, 5, 6, 7, 8,
            0, 0, 0, 0, 0, 0, 0, 5, 0, 0, 0, 0,
            2,
            3, 0, 0, 0, 0, 0, 0, 4, b'e', b'c', b'h', b'o',
            0, 0, 0, 0,
            1, 0, 0, 7, 0, 1, 0, 1, 0, 2, 0xff, 0xff,
        ];
        assert_eq!(s, expected);
    }

    #[test]
    fn decodes_split_at_every_byte() {
        let (s, expected) = stream();
        for split in 0..=s.len() {
            let mut dec = ServerMsgDecoder::new(&PixelFormat::BGRX_LE);
            let mut got = Vec::new();
            dec.feed(&s[..split]);
            drain(&mut dec, &mut got);
            dec.feed(&s[split..]);
            drain(&mut dec, &mut got);
            assert_eq!(got, expected, "split at {split}");
            assert_eq!(dec.buffered(), 0);
        }
        let mut dec = ServerMsgDecoder::new(&PixelFormat::BGRX_LE);
        let mut got = Vec::new();
        for byte in &s {
            dec.feed(std::slice::from_ref(byte));
            drain(&mut dec, &mut got);
        }
        assert_eq!(got, expected);
    }

    #[test]
    fn rejects_unasked_encoding_and_unknown_type() {
        let mut s = Vec::new();
        encode_update_header(1, &mut s);
        Rect {
            x: 0,
            y: 0,
            width: 1,
            height: 1,
            encoding: 16,
        }
        .encode(&mut s);
        let mut dec = ServerMsgDecoder::new(&PixelFormat::BGRX_LE);
        dec.feed(&s);
        assert!(matches!(
            dec.next_event(),
            Ok(Some(ServerEvent::UpdateBegin { rects: 1 }))
        ));
        assert_eq!(dec.next_event(), Err(RfbError::UnsupportedEncoding(16)));

        let mut dec = ServerMsgDecoder::new(&PixelFormat::BGRX_LE);
        dec.feed(&[200]);
        assert_eq!(dec.next_event(), Err(RfbError::UnknownMessageType(200)));
    }
}
