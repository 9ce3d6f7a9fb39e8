//! Client-to-server messages (RFC 6143 section 7.5) and an incremental decoder for them.

use crate::{MAX_STRING, PixelFormat, RfbError, be16, be32};

/// FramebufferUpdateRequest (RFC 6143 7.5.3).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct UpdateRequest {
    pub incremental: bool,
    pub x: u16,
    pub y: u16,
    pub width: u16,
    pub height: u16,
}

/// One client-to-server message.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ClientMsg {
    /// Type 0.
    SetPixelFormat(PixelFormat),
    /// Type 2: encodings in the client's order of preference.
    SetEncodings(Vec<i32>),
    /// Type 3.
    FramebufferUpdateRequest(UpdateRequest),
    /// Type 4: an X11 keysym going down or up.
    KeyEvent { down: bool, key: u32 },
    /// Type 5: button mask (bit 0 = left) and position.
    PointerEvent { buttons: u8, x: u16, y: u16 },
    /// Type 6: Latin-1 text (the classic form; the extended, negative-length form is not
    /// negotiated by anything here).
    ClientCutText(Vec<u8>),
}

impl ClientMsg {
    /// Appends the wire form.
    pub fn encode(&self, out: &mut Vec<u8>) {
        match self {
            ClientMsg::SetPixelFormat(pf) => {
                out.extend_from_slice(&[0, 0, 0, 0]);
                out.extend_from_slice(&pf.to_bytes());
            }
            ClientMsg::SetEncodings(encodings) => {
                out.extend_from_slice(&[2, 0]);
                out.extend_from_slice(&(encodings.len() as u16).to_be_bytes());
                for e in encodings {
                    out.extend_from_slice(&e.to_be_bytes());
                }
            }
            ClientMsg::FramebufferUpdateRequest(r) => {
                out.extend_from_slice(&[3, u8::from(r.incremental)]);
                for v in [r.x, r.y, r.width, r.height] {
                    out.extend_from_slice(&v.to_be_bytes());
                }
            }
            ClientMsg::KeyEvent { down, key } => {
                out.extend_from_slice(&[4, u8::from(*down), 0, 0]);
                out.extend_from_slice(&key.to_be_bytes());
            }
            ClientMsg::PointerEvent { buttons, x, y } => {
                out.extend_from_slice(&[5, *buttons]);
                out.extend_from_slice(&x.to_be_bytes());
                out.extend_from_slice(&y.to_be_bytes());
            }
            ClientMsg::ClientCutText(text) => {
                out.extend_from_slice(&[6, 0, 0, 0]);
                out.extend_from_slice(&(text.len() as u32).to_be_bytes());
                out.extend_from_slice(text);
            }
        }
    }

    /// Decodes one message at the start of `b`: the message and its length, or `None` when
    /// `b` holds only part of it.
    pub fn decode(b: &[u8]) -> Result<Option<(ClientMsg, usize)>, RfbError> {
        let Some(&kind) = b.first() else {
            return Ok(None);
        };
        let need = match kind {
            0 => 20,
            2 => {
                if b.len() < 4 {
                    return Ok(None);
                }
                4 + 4 * usize::from(be16(b, 2))
            }
            3 => 10,
            4 => 8,
            5 => 6,
            6 => {
                if b.len() < 8 {
                    return Ok(None);
                }
                let len = be32(b, 4) as usize;
                if len > MAX_STRING {
                    return Err(RfbError::TooLarge {
                        what: "client cut text",
                        len,
                    });
                }
                8 + len
            }
            other => return Err(RfbError::UnknownMessageType(other)),
        };
        if b.len() < need {
            return Ok(None);
        }
        let msg = match kind {
            0 => ClientMsg::SetPixelFormat(PixelFormat::from_bytes(
                b[4..20].try_into().expect("16 bytes"),
            )),
            2 => ClientMsg::SetEncodings(
                b[4..need]
                    .chunks_exact(4)
                    .map(|c| i32::from_be_bytes([c[0], c[1], c[2], c[3]]))
                    .collect(),
            ),
            3 => ClientMsg::FramebufferUpdateRequest(UpdateRequest {
                incremental: b[1] != 0,
                x: be16(b, 2),
                y: be16(b, 4),
                width: be16(b, 6),
                height: be16(b, 8),
            }),
            4 => ClientMsg::KeyEvent {
                down: b[1] != 0,
                key: be32(b, 4),
            },
            5 => ClientMsg::PointerEvent {
                buttons: b[1],
                x: be16(b, 2),
                y: be16(b, 4),
            },
            _ => ClientMsg::ClientCutText(b[8..need].to_vec()),
        };
        Ok(Some((msg, need)))
    }
}

/// Buffers client bytes across reads and hands out whole messages.
#[derive(Debug, Default)]
pub struct ClientMsgDecoder {
    buf: Vec<u8>,
    /// Start of the unconsumed bytes; compacted on the next `feed` rather than after every
    /// message, so a read full of small events costs one memmove, not one per event.
    pos: usize,
}

impl ClientMsgDecoder {
    pub fn new() -> ClientMsgDecoder {
        ClientMsgDecoder::default()
    }

    /// Appends bytes as they arrived from the socket.
    pub fn feed(&mut self, bytes: &[u8]) {
        if self.pos > 0 {
            self.buf.drain(..self.pos);
            self.pos = 0;
        }
        self.buf.extend_from_slice(bytes);
    }

    /// The next complete message, or `None` if more bytes are needed.
    pub fn next_msg(&mut self) -> Result<Option<ClientMsg>, RfbError> {
        match ClientMsg::decode(&self.buf[self.pos..])? {
            Some((msg, used)) => {
                self.pos += used;
                Ok(Some(msg))
            }
            None => Ok(None),
        }
    }

    /// Bytes received but not yet decoded.
    pub fn buffered(&self) -> usize {
        self.buf.len() - self.pos
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn samples() -> Vec<(ClientMsg, Vec<u8>)> {
        vec![
            (
                ClientMsg::SetPixelFormat(PixelFormat::RGBX_LE),
                vec![
                    0, 0, 0, 0, 32, 24, 0, 1, 0, 255, 0, 255, 0, 255, 0, 8, 16, 0, 0, 0,
                ],
            ),
            (
                ClientMsg::SetEncodings(vec![0, -223]),
                vec![2, 0, 0, 2, 0, 0, 0, 0, 0xff, 0xff, 0xff, 0x21],
            ),
            (
                ClientMsg::FramebufferUpdateRequest(UpdateRequest {
                    incremental: true,
                    x: 1,
                    y: 2,
                    width: 1024,
                    height: 768,
                }),
                vec![3, 1, 0, 1, 0, 2, 4, 0, 3, 0],
            ),
            (
                ClientMsg::KeyEvent {
                    down: true,
                    key: 0xff0d,
                },
                vec![4, 1, 0, 0, 0, 0, 0xff, 0x0d],
            ),
            (
                ClientMsg::PointerEvent {
                    buttons: 1,
                    x: 300,
                    y: 5,
                },
                vec![5, 1, 1, 44, 0, 5],
            ),
            (
                ClientMsg::ClientCutText(b"hi".to_vec()),
                vec![6, 0, 0, 0, 0, 0, 0, 2, b'h', b'i'],
            ),
            (ClientMsg::SetEncodings(vec![]), vec![2, 0, 0, 0]),
            (
                ClientMsg::ClientCutText(vec![]),
                vec![6, 0, 0, 0, 0, 0, 0, 0],
            ),
        ]
    }

    #[test]
    fn encode_decode_byte_for_byte() {
        for (msg, bytes) in samples() {
            let mut out = Vec::new();
            msg.encode(&mut out);
            assert_eq!(out, bytes, "{msg:?}");
            assert_eq!(
                ClientMsg::decode(&bytes),
                Ok(Some((msg.clone(), bytes.len())))
            );
            for cut in 0..bytes.len() {
                assert_eq!(
                    ClientMsg::decode(&bytes[..cut]),
                    Ok(None),
                    "{msg:?} cut {cut}"
                );
            }
        }
    }

    #[test]
    fn decoder_survives_every_split() {
        let (msgs, stream): (Vec<_>, Vec<_>) = samples().into_iter().unzip();
        let stream = stream.concat();
        for split in 0..=stream.len() {
            let mut dec = ClientMsgDecoder::new();
            let mut got = Vec::new();
            for part in [&stream[..split], &stream[split..]] {
                dec.feed(part);
                while let Some(m) = dec.next_msg().unwrap() {
                    got.push(m);
                }
            }
            assert_eq!(got, msgs, "split at {split}");
            assert_eq!(dec.buffered(), 0);
        }
        // And one byte at a time.
        let mut dec = ClientMsgDecoder::new();
        let mut got = Vec::new();
        for b in &stream {
            dec.feed(std::slice::from_ref(b));
            while let Some(m) = dec.next_msg().unwrap() {
                got.push(m);
            }
        }
        assert_eq!(got, msgs);
    }

    #[test]
    fn rejects_unknown_and_oversized() {
        assert_eq!(
            ClientMsg::decode(&[9, 0]),
            Err(RfbError::UnknownMessageType(9))
        );
        assert!(matches!(
            ClientMsg::decode(&[6, 0, 0, 0, 0xff, 0xff, 0xff, 0xff]),
            Err(RfbError::TooLarge { .. })
        ));
    }
}
