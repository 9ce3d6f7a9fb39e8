//! A client's byte stream to the server, followed message by message, passing on only what
//! does not act on the desktop: the gateway's view-only filter, without I/O.
//!
//! The filter sees one direction, client to server (the gateway splices the server's answers
//! and never reads them), and that is enough in RFB 3.7 and 3.8: the client's own bytes say
//! which security type it chose, so the filter knows that 16 bytes of VNC Authentication
//! response follow type 2, and nothing follows type 1. In 3.3 the server alone picks the type
//! and tells only the client, so whether a response follows cannot be seen from this side:
//! 3.3 is refused, and so is every version other than 3.7 and 3.8 (RFC 6143 7.1.1 says to
//! treat unknown versions as 3.3). A security type other than None and VNC Authentication
//! brings its own messages (VeNCrypt's TLS, Tight's tunnels) that cannot be followed either,
//! and is refused the same way.
//!
//! After ClientInit, whose shared flag is forced to 1 (a view-only viewer asking for an
//! exclusive session would otherwise disconnect everyone else), each message is sized by
//! [`crate::client_msg::message_len`] from its first few bytes and then passed or skipped
//! whole, piece by piece as its bytes arrive: nothing is buffered but the first bytes of the
//! message being sized, so a read split anywhere, even inside a header, changes nothing. What
//! passes is [`MsgKind::acts`]'s complement: pixel format, encodings, update requests,
//! continuous updates and fences. Input, clipboard, desktop size, power (xvp) and QEMU's
//! messages are dropped and counted by kind. A message that cannot be sized ends the stream:
//! nothing after it could be framed.

use crate::client_msg::{MAX_SIZING_BYTES, MsgKind, message_len};
use crate::{RfbError, SECURITY_NONE, SECURITY_VNC_AUTH, parse_version};

/// Why a view-only stream cannot be followed any further.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ViewOnlyError {
    /// The client's ProtocolVersion is not 3.7 or 3.8 (or not RFB at all): the security
    /// handshake cannot be followed from the client's side.
    Version([u8; 12]),
    /// The client chose a security type other than None (1) and VNC Authentication (2).
    Security(u8),
    /// A message whose length cannot be known: an unknown type or sub-type, a length beyond
    /// what its kind allows.
    Unsizable(RfbError),
}

impl std::fmt::Display for ViewOnlyError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            ViewOnlyError::Version(v) => {
                write!(
                    f,
                    "client version \"{}\" is not 3.7 or 3.8",
                    v.escape_ascii()
                )
            }
            ViewOnlyError::Security(t) => write!(f, "client chose security type {t}"),
            ViewOnlyError::Unsizable(e) => write!(f, "cannot size client message: {e}"),
        }
    }
}

impl std::error::Error for ViewOnlyError {}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum State {
    /// The client's 12-byte ProtocolVersion, `head_len` bytes of it seen.
    Version,
    /// The security type the client chose (one byte).
    Security,
    /// VNC Authentication's response, this many bytes left.
    AuthResponse { left: u8 },
    /// ClientInit's shared flag (one byte).
    ClientInit,
    /// The first `head_len` bytes of a message, not enough yet to size it.
    Head,
    /// The rest of a sized message, passed or skipped.
    Body { left: u64, pass: bool },
}

/// The filter for one view-only viewer's stream, from its first byte (ProtocolVersion).
#[derive(Debug)]
pub struct ViewOnlyFilter {
    state: State,
    /// The version, or the first bytes of the message being sized.
    head: [u8; 12],
    head_len: u8,
    /// Messages dropped since the last [`ViewOnlyFilter::take_dropped`], by kind (indexed
    /// as [`MsgKind::ALL`]).
    dropped: [u32; MsgKind::ALL.len()],
    /// Whether ClientInit asked for an exclusive session (and was made shared).
    asked_exclusive: bool,
    failed: Option<ViewOnlyError>,
}

impl Default for ViewOnlyFilter {
    fn default() -> Self {
        ViewOnlyFilter::new()
    }
}

const _: () = assert!(
    MAX_SIZING_BYTES <= 12,
    "the head buffer holds a message's sizing bytes"
);

impl ViewOnlyFilter {
    pub fn new() -> ViewOnlyFilter {
        ViewOnlyFilter {
            state: State::Version,
            head: [0; 12],
            head_len: 0,
            dropped: [0; MsgKind::ALL.len()],
            asked_exclusive: false,
            failed: None,
        }
    }

    /// Filters the next bytes of the stream in place: what passes is moved to the front of
    /// `buf`, in order, and its length returned (never more than `buf.len()`: the filter
    /// only removes bytes, and rewrites ClientInit's flag). On an error nothing of `buf` is
    /// to be sent, and every later call fails the same way.
    pub fn filter(&mut self, buf: &mut [u8]) -> Result<usize, ViewOnlyError> {
        if let Some(e) = &self.failed {
            return Err(e.clone());
        }
        let r = self.run(buf);
        if let Err(e) = &r {
            self.failed = Some(e.clone());
        }
        r
    }

    fn run(&mut self, buf: &mut [u8]) -> Result<usize, ViewOnlyError> {
        let (mut r, mut w) = (0usize, 0usize);
        while r < buf.len() {
            let rest = buf.len() - r;
            match self.state {
                State::Version => {
                    let have = usize::from(self.head_len);
                    let take = (12 - have).min(rest);
                    self.head[have..have + take].copy_from_slice(&buf[r..r + take]);
                    buf.copy_within(r..r + take, w);
                    (r, w) = (r + take, w + take);
                    self.head_len += take as u8;
                    if self.head_len == 12 {
                        self.head_len = 0;
                        let v = self.head;
                        match parse_version(&v) {
                            Ok((3, 7 | 8)) => self.state = State::Security,
                            _ => return Err(ViewOnlyError::Version(v)),
                        }
                    }
                }
                State::Security => {
                    let t = buf[r];
                    self.state = match t {
                        SECURITY_NONE => State::ClientInit,
                        SECURITY_VNC_AUTH => State::AuthResponse { left: 16 },
                        other => return Err(ViewOnlyError::Security(other)),
                    };
                    buf[w] = t;
                    (r, w) = (r + 1, w + 1);
                }
                State::AuthResponse { left } => {
                    let take = usize::from(left).min(rest);
                    buf.copy_within(r..r + take, w);
                    (r, w) = (r + take, w + take);
                    let left = left - take as u8;
                    self.state = if left == 0 {
                        State::ClientInit
                    } else {
                        State::AuthResponse { left }
                    };
                }
                State::ClientInit => {
                    self.asked_exclusive = buf[r] == 0;
                    buf[w] = 1;
                    (r, w) = (r + 1, w + 1);
                    self.state = State::Head;
                }
                State::Head => {
                    let b = buf[r];
                    r += 1;
                    self.head[usize::from(self.head_len)] = b;
                    self.head_len += 1;
                    let head = &self.head[..usize::from(self.head_len)];
                    let sized = message_len(head).map_err(ViewOnlyError::Unsizable)?;
                    // `message_len` refuses unknown types from the first byte on.
                    let kind = MsgKind::of(head[0]).expect("a type message_len sized");
                    let pass = !kind.acts();
                    if pass {
                        buf[w] = b;
                        w += 1;
                    }
                    if let Some((kind, len)) = sized {
                        if !pass {
                            self.dropped[kind as usize] += 1;
                        }
                        let left = len - u64::from(self.head_len);
                        self.head_len = 0;
                        self.state = if left == 0 {
                            State::Head
                        } else {
                            State::Body { left, pass }
                        };
                    }
                }
                State::Body { left, pass } => {
                    let take = left.min(rest as u64) as usize;
                    if pass {
                        buf.copy_within(r..r + take, w);
                        w += take;
                    }
                    r += take;
                    let left = left - take as u64;
                    self.state = if left == 0 {
                        State::Head
                    } else {
                        State::Body { left, pass }
                    };
                }
            }
        }
        Ok(w)
    }

    /// The messages dropped since the last call, by kind (kinds with none left out).
    pub fn take_dropped(&mut self) -> impl Iterator<Item = (MsgKind, u32)> + use<> {
        let counts = std::mem::take(&mut self.dropped);
        MsgKind::ALL.into_iter().zip(counts).filter(|&(_, n)| n > 0)
    }

    /// Whether the client's ClientInit asked for an exclusive session (it was made shared).
    pub fn asked_exclusive(&self) -> bool {
        self.asked_exclusive
    }

    /// Whether the handshake is over and the stream carries messages.
    pub fn in_messages(&self) -> bool {
        matches!(self.state, State::Head | State::Body { .. })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// xorshift64*: a deterministic generator for the random streams and cuts below.
    struct Rng(u64);

    impl Rng {
        fn next(&mut self) -> u64 {
            self.0 ^= self.0 >> 12;
            self.0 ^= self.0 << 25;
            self.0 ^= self.0 >> 27;
            self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
        }
        fn below(&mut self, n: u64) -> u64 {
            self.next() % n
        }
        fn bytes(&mut self, n: usize) -> Vec<u8> {
            (0..n).map(|_| self.next() as u8).collect()
        }
    }

    /// One random, well-formed message of `kind`.
    fn message(kind: MsgKind, rng: &mut Rng) -> Vec<u8> {
        let mut m = Vec::new();
        match kind {
            MsgKind::SetPixelFormat => {
                m.extend_from_slice(&[0, 0, 0, 0]);
                m.extend(rng.bytes(16));
            }
            MsgKind::SetEncodings => {
                let n = rng.below(6) as u16;
                m.extend_from_slice(&[2, 0]);
                m.extend_from_slice(&n.to_be_bytes());
                m.extend(rng.bytes(4 * usize::from(n)));
            }
            MsgKind::FramebufferUpdateRequest => {
                m.push(3);
                m.extend(rng.bytes(9));
            }
            MsgKind::KeyEvent => {
                m.push(4);
                m.extend(rng.bytes(7));
            }
            MsgKind::PointerEvent => {
                m.push(5);
                m.extend(rng.bytes(5));
            }
            MsgKind::ClientCutText => {
                let n = rng.below(40) as i32;
                // The extended clipboard's negative length, or the classic positive one.
                let field = if rng.below(2) == 0 { n } else { -n };
                m.extend_from_slice(&[6, 0, 0, 0]);
                m.extend_from_slice(&field.to_be_bytes());
                m.extend(rng.bytes(n as usize));
            }
            MsgKind::EnableContinuousUpdates => {
                m.push(150);
                m.extend(rng.bytes(9));
            }
            MsgKind::ClientFence => {
                let n = rng.below(65) as u8;
                m.extend_from_slice(&[248, 0, 0, 0]);
                m.extend(rng.bytes(4));
                m.push(n);
                m.extend(rng.bytes(usize::from(n)));
            }
            MsgKind::Xvp => {
                m.extend_from_slice(&[250, 0, 1, 2]);
            }
            MsgKind::SetDesktopSize => {
                let n = rng.below(4) as u8;
                m.extend_from_slice(&[251, 0, 4, 0, 3, 0, n, 0]);
                m.extend(rng.bytes(16 * usize::from(n)));
            }
            MsgKind::Gii => {
                let n = rng.below(30) as u16;
                let big = rng.below(2) == 0;
                m.extend_from_slice(&[253, if big { 0x81 } else { 0x01 }]);
                m.extend_from_slice(&if big {
                    n.to_be_bytes()
                } else {
                    n.to_le_bytes()
                });
                m.extend(rng.bytes(usize::from(n)));
            }
            MsgKind::Qemu => match rng.below(4) {
                0 => {
                    m.extend_from_slice(&[255, 0]);
                    m.extend(rng.bytes(10));
                }
                op => {
                    m.extend_from_slice(&[255, 1, 0, op as u8 - 1]);
                    if op == 3 {
                        m.extend(rng.bytes(6));
                    }
                }
            },
        }
        m
    }

    /// A random handshake: (what the client sends, what the server must receive).
    fn handshake(rng: &mut Rng) -> (Vec<u8>, Vec<u8>) {
        let mut sent = if rng.below(2) == 0 {
            b"RFB 003.008\n".to_vec()
        } else {
            b"RFB 003.007\n".to_vec()
        };
        if rng.below(2) == 0 {
            sent.push(1);
        } else {
            sent.push(2);
            sent.extend(rng.bytes(16));
        }
        let mut expect = sent.clone();
        sent.push(rng.below(2) as u8);
        expect.push(1);
        (sent, expect)
    }

    /// Runs `stream` through a filter in the pieces `cuts` makes of it.
    fn run(stream: &[u8], cuts: &[usize]) -> (Vec<u8>, [u32; 12], ViewOnlyFilter) {
        let mut f = ViewOnlyFilter::new();
        let mut out = Vec::new();
        let mut counts = [0u32; 12];
        let mut at = 0;
        for &end in cuts.iter().chain([&stream.len()]) {
            let mut piece = stream[at..end].to_vec();
            let n = f.filter(&mut piece).unwrap();
            out.extend_from_slice(&piece[..n]);
            for (k, c) in f.take_dropped() {
                counts[k as usize] += c;
            }
            at = end;
        }
        (out, counts, f)
    }

    /// Random streams of every kind, cut at random places (one byte at a time included),
    /// against a model: the handshake with the shared flag set, then exactly the messages
    /// that do not act, and a count of each kind that does.
    #[test]
    fn random_streams_and_cuts_match_the_model() {
        let mut rng = Rng(0x9e37_79b9_7f4a_7c15);
        for round in 0..400 {
            let (mut stream, mut expect) = handshake(&mut rng);
            let mut counts = [0u32; 12];
            for _ in 0..rng.below(30) {
                let kind = MsgKind::ALL[rng.below(12) as usize];
                let m = message(kind, &mut rng);
                assert_eq!(
                    message_len(&m).unwrap().map(|(k, l)| (k, l as usize)),
                    Some((kind, m.len())),
                    "{m:?}"
                );
                stream.extend_from_slice(&m);
                if kind.acts() {
                    counts[kind as usize] += 1;
                } else {
                    expect.extend_from_slice(&m);
                }
            }
            let mut cuts: Vec<usize> = match round % 3 {
                // One byte at a time.
                0 => (1..stream.len()).collect(),
                _ => (0..rng.below(12))
                    .map(|_| rng.below(stream.len() as u64 + 1) as usize)
                    .collect(),
            };
            cuts.sort();
            let (out, got, f) = run(&stream, &cuts);
            assert_eq!(out, expect, "round {round}, cuts {cuts:?}");
            assert_eq!(got, counts, "round {round}");
            assert!(f.in_messages());
        }
    }

    #[test]
    fn every_kind_passes_or_drops_byte_for_byte() {
        let mut rng = Rng(7);
        let (hs, hs_out) = handshake(&mut rng);
        for kind in MsgKind::ALL {
            let m = message(kind, &mut rng);
            let stream = [hs.clone(), m.clone()].concat();
            for split in 0..=stream.len() {
                let (out, counts, _) = run(&stream, &[split]);
                let passes = [
                    MsgKind::SetPixelFormat,
                    MsgKind::SetEncodings,
                    MsgKind::FramebufferUpdateRequest,
                    MsgKind::EnableContinuousUpdates,
                    MsgKind::ClientFence,
                ]
                .contains(&kind);
                let want = if passes {
                    [hs_out.clone(), m.clone()].concat()
                } else {
                    hs_out.clone()
                };
                assert_eq!(out, want, "{kind:?} split {split}");
                assert_eq!(counts[kind as usize], u32::from(!passes), "{kind:?}");
            }
        }
    }

    #[test]
    fn shared_flag_is_forced() {
        let mut f = ViewOnlyFilter::new();
        let mut b = b"RFB 003.008\n\x01\x00".to_vec();
        assert_eq!(f.filter(&mut b), Ok(14));
        assert_eq!(b[13], 1);
        assert!(f.asked_exclusive());
        let mut f = ViewOnlyFilter::new();
        let mut b = b"RFB 003.008\n\x02".to_vec();
        b.extend([9u8; 16]);
        b.push(1);
        assert_eq!(f.filter(&mut b), Ok(30));
        assert!(!f.asked_exclusive());
        assert_eq!(b[29], 1);
    }

    fn after_handshake(tail: &[u8]) -> Result<usize, ViewOnlyError> {
        let mut b = b"RFB 003.008\n\x01\x01".to_vec();
        b.extend_from_slice(tail);
        ViewOnlyFilter::new().filter(&mut b)
    }

    #[test]
    fn what_cannot_be_followed_is_named_and_sticks() {
        for v in [
            &b"RFB 003.003\n"[..],
            b"RFB 003.005\n",
            b"RFB 003.889\n",
            b"RFB 004.000\n",
            b"GET / HTTP/1.",
        ] {
            let mut b = v[..12].to_vec();
            assert!(
                matches!(
                    ViewOnlyFilter::new().filter(&mut b),
                    Err(ViewOnlyError::Version(_))
                ),
                "{v:?}"
            );
        }
        for t in [0u8, 5, 16, 18, 19, 30, 255] {
            let mut b = b"RFB 003.008\n".to_vec();
            b.push(t);
            assert_eq!(
                ViewOnlyFilter::new().filter(&mut b),
                Err(ViewOnlyError::Security(t))
            );
        }
        assert_eq!(
            after_handshake(&[9]),
            Err(ViewOnlyError::Unsizable(RfbError::UnknownMessageType(9)))
        );
        assert_eq!(
            after_handshake(&[1]),
            Err(ViewOnlyError::Unsizable(RfbError::UnknownMessageType(1)))
        );
        assert_eq!(
            after_handshake(&[255, 7]),
            Err(ViewOnlyError::Unsizable(RfbError::UnknownSubtype {
                kind: 255,
                subtype: 7
            }))
        );
        assert!(matches!(
            after_handshake(&[255, 1, 0, 9]),
            Err(ViewOnlyError::Unsizable(RfbError::Malformed(_)))
        ));
        assert!(matches!(
            after_handshake(&[248, 0, 0, 0, 0, 0, 0, 0, 65]),
            Err(ViewOnlyError::Unsizable(RfbError::TooLarge { .. }))
        ));
        // A key event in front of the unknown type is not let through either: the whole
        // read is refused, and so is everything after.
        let mut f = ViewOnlyFilter::new();
        let mut b = b"RFB 003.008\n\x01\x01".to_vec();
        assert_eq!(f.filter(&mut b), Ok(14));
        let mut b = vec![4, 1, 0, 0, 0, 0, 0, 0x61, 3, 0, 0, 0, 0, 0, 0, 1, 0, 1, 77];
        assert!(f.filter(&mut b).is_err());
        let mut b = vec![3, 0, 0, 0, 0, 0, 0, 1, 0, 1];
        assert!(f.filter(&mut b).is_err());
    }

    #[test]
    fn huge_dropped_messages_need_no_memory() {
        // A 2 GiB extended clipboard message (i32::MIN) is skipped as it arrives.
        let mut f = ViewOnlyFilter::new();
        let mut b = b"RFB 003.008\n\x01\x01".to_vec();
        b.extend_from_slice(&[6, 0, 0, 0, 0x80, 0, 0, 0]);
        assert_eq!(f.filter(&mut b), Ok(14));
        let mut chunk = vec![0xaa; 1 << 16];
        for _ in 0..4 {
            assert_eq!(f.filter(&mut chunk), Ok(0));
        }
        assert_eq!(
            f.take_dropped().collect::<Vec<_>>(),
            [(MsgKind::ClientCutText, 1)]
        );
    }
}
