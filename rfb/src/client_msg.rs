//! Client-to-server messages (RFC 6143 section 7.5) and an incremental decoder for them,
//! and [`message_len`]: the length of any client message this crate can size, from as few of
//! its first bytes as that takes, for a reader that follows the stream without buffering it
//! (the gateway's view-only filter).

use crate::{MAX_STRING, PixelFormat, RfbError, be16, be32};

/// The client-to-server message types [`message_len`] can size: RFC 6143's own, and the
/// extensions of the community protocol specification (rfbproto) that noVNC and TigerVNC
/// send.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum MsgKind {
    /// 0: the pixel format the client wants.
    SetPixelFormat,
    /// 2: the encodings the client accepts (and pseudo-encodings: the extensions it knows).
    SetEncodings,
    /// 3: asks for an update of a region.
    FramebufferUpdateRequest,
    /// 4: a key pressed or released.
    KeyEvent,
    /// 5: pointer movement and buttons.
    PointerEvent,
    /// 6: clipboard text, classic (Latin-1) or extended (negative length: caps, requests,
    /// zlib-compressed formats).
    ClientCutText,
    /// 150: EnableContinuousUpdates (the server then sends updates unasked).
    EnableContinuousUpdates,
    /// 248: ClientFence (synchronisation with the server's stream).
    ClientFence,
    /// 250: xvp (shut down, reboot or reset the machine).
    Xvp,
    /// 251: SetDesktopSize (resizes the remote desktop).
    SetDesktopSize,
    /// 253: gii (General Input Interface: device creation and valuator events).
    Gii,
    /// 255: QEMU client messages (extended key events, audio).
    Qemu,
}

impl MsgKind {
    /// The kind of a message type byte; `None` for types no size is known of.
    pub fn of(kind: u8) -> Option<MsgKind> {
        Some(match kind {
            0 => MsgKind::SetPixelFormat,
            2 => MsgKind::SetEncodings,
            3 => MsgKind::FramebufferUpdateRequest,
            4 => MsgKind::KeyEvent,
            5 => MsgKind::PointerEvent,
            6 => MsgKind::ClientCutText,
            150 => MsgKind::EnableContinuousUpdates,
            248 => MsgKind::ClientFence,
            250 => MsgKind::Xvp,
            251 => MsgKind::SetDesktopSize,
            253 => MsgKind::Gii,
            255 => MsgKind::Qemu,
            _ => return None,
        })
    }

    /// A short stable name, for metric labels.
    pub fn name(self) -> &'static str {
        match self {
            MsgKind::SetPixelFormat => "set_pixel_format",
            MsgKind::SetEncodings => "set_encodings",
            MsgKind::FramebufferUpdateRequest => "framebuffer_update_request",
            MsgKind::KeyEvent => "key_event",
            MsgKind::PointerEvent => "pointer_event",
            MsgKind::ClientCutText => "client_cut_text",
            MsgKind::EnableContinuousUpdates => "enable_continuous_updates",
            MsgKind::ClientFence => "client_fence",
            MsgKind::Xvp => "xvp",
            MsgKind::SetDesktopSize => "set_desktop_size",
            MsgKind::Gii => "gii",
            MsgKind::Qemu => "qemu",
        }
    }

    /// Whether a message of this kind acts on the desktop or the machine (input, clipboard,
    /// desktop size, power, QEMU's key events and audio), rather than only shaping what the
    /// server sends back: what a view-only viewer may not send.
    pub fn acts(self) -> bool {
        !matches!(
            self,
            MsgKind::SetPixelFormat
                | MsgKind::SetEncodings
                | MsgKind::FramebufferUpdateRequest
                | MsgKind::EnableContinuousUpdates
                | MsgKind::ClientFence
        )
    }

    /// Every kind, in type-byte order (and in declaration order: `kind as usize` indexes
    /// this).
    pub const ALL: [MsgKind; 12] = [
        MsgKind::SetPixelFormat,
        MsgKind::SetEncodings,
        MsgKind::FramebufferUpdateRequest,
        MsgKind::KeyEvent,
        MsgKind::PointerEvent,
        MsgKind::ClientCutText,
        MsgKind::EnableContinuousUpdates,
        MsgKind::ClientFence,
        MsgKind::Xvp,
        MsgKind::SetDesktopSize,
        MsgKind::Gii,
        MsgKind::Qemu,
    ];
}

/// Most bytes [`message_len`] needs to see: ClientFence's length byte is its ninth.
pub const MAX_SIZING_BYTES: usize = 9;

/// Longest ClientFence payload (rfbproto: "length ... must be 64 or less").
pub const MAX_FENCE_DATA: usize = 64;

/// The whole length of the client message that `head` begins (type byte first), from as
/// many of its first bytes as that takes (at most [`MAX_SIZING_BYTES`]): `Ok(None)` while
/// more are needed. Lengths are not capped here: a reader that skips a message needs no
/// memory for it. A type or sub-type without a known size is an error, since nothing after
/// it could be framed.
pub fn message_len(head: &[u8]) -> Result<Option<(MsgKind, u64)>, RfbError> {
    let Some(&t) = head.first() else {
        return Ok(None);
    };
    let kind = MsgKind::of(t).ok_or(RfbError::UnknownMessageType(t))?;
    // Bytes of the header to see before the length is known.
    let need = match kind {
        MsgKind::SetEncodings | MsgKind::Gii | MsgKind::Qemu => 4,
        MsgKind::ClientCutText => 8,
        MsgKind::SetDesktopSize => 7,
        MsgKind::ClientFence => 9,
        _ => 1,
    };
    if head.len() < need {
        // QEMU's sub-type is known from byte 2: an unknown one fails as early as it can.
        if kind == MsgKind::Qemu && head.len() >= 2 && head[1] > 1 {
            return Err(RfbError::UnknownSubtype {
                kind: t,
                subtype: head[1],
            });
        }
        return Ok(None);
    }
    let len: u64 = match kind {
        MsgKind::SetPixelFormat => 20,
        MsgKind::SetEncodings => 4 + 4 * u64::from(be16(head, 2)),
        MsgKind::FramebufferUpdateRequest => 10,
        MsgKind::KeyEvent => 8,
        MsgKind::PointerEvent => 6,
        // A negative length is the extended clipboard's form: its magnitude is the length.
        MsgKind::ClientCutText => 8 + u64::from((be32(head, 4) as i32).unsigned_abs()),
        MsgKind::EnableContinuousUpdates => 10,
        MsgKind::ClientFence => {
            let n = usize::from(head[8]);
            if n > MAX_FENCE_DATA {
                return Err(RfbError::TooLarge {
                    what: "client fence data",
                    len: n,
                });
            }
            9 + n as u64
        }
        MsgKind::Xvp => 4,
        MsgKind::SetDesktopSize => 8 + 16 * u64::from(head[6]),
        // The length field is in the byte order bit 7 of byte 1 names (big endian if set).
        MsgKind::Gii => {
            let n = if head[1] & 0x80 != 0 {
                be16(head, 2)
            } else {
                u16::from_le_bytes([head[2], head[3]])
            };
            4 + u64::from(n)
        }
        MsgKind::Qemu => match (head[1], be16(head, 2)) {
            // Extended key event: sub-type, down flag (u16), keysym, keycode.
            (0, _) => 12,
            // Audio: enable (0) and disable (1) are bare; set format (2) carries sample
            // format, channels and frequency.
            (1, 0 | 1) => 4,
            (1, 2) => 10,
            (1, _) => return Err(RfbError::Malformed("unknown QEMU audio operation")),
            (sub, _) => {
                return Err(RfbError::UnknownSubtype {
                    kind: t,
                    subtype: sub,
                });
            }
        },
    };
    Ok(Some((kind, len)))
}

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
            // One sizing table for both readers: this decoder and the stream followers.
            0 | 2..=5 => match message_len(b)? {
                Some((_, len)) => len as usize,
                None => return Ok(None),
            },
            // The classic form only, bounded: this decoder keeps the text.
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
