//! One fake-VM session as a state machine: bytes in, bytes out, time passed in.
//!
//! The socket loop in [`super`] feeds what it reads to [`VmSession::receive`], sleeps until
//! [`VmSession::poll_timeout`], calls [`VmSession::handle_timeout`], and writes what
//! [`VmSession::write_to`] produces. Updates are painted row by row as the socket drains, so a
//! full-screen update costs one write chunk of memory, not a whole screen.

use std::collections::VecDeque;
use std::time::{Duration, Instant};

use vncgate_rfb::server_msg::{encode_cut_text, encode_update_header};
use vncgate_rfb::{
    ClientMsg, ClientMsgDecoder, ENCODING_RAW, PixelFormat, Rect, RfbError, ServerHandshake,
    ServerInit, ServerSecurity,
};

use super::Config;
use super::paint::Painter;

/// What the session has seen, for the log line when it ends.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct SessionStats {
    pub key_events: u64,
    pub pointer_events: u64,
    pub cut_texts: u64,
    pub updates: u64,
    pub full_updates: u64,
}

/// An update being painted into the output, row by row.
#[derive(Debug)]
struct UpdateJob {
    rect: Rect,
    pf: PixelFormat,
    frame: u64,
    next_row: u16,
    header_sent: bool,
}

#[derive(Debug)]
enum Chunk {
    Bytes(Vec<u8>),
    Update(UpdateJob),
}

/// The server side of one RFB connection.
#[derive(Debug)]
pub struct VmSession {
    handshake: ServerHandshake,
    /// Handshake bytes that arrived split across reads.
    hs_buf: Vec<u8>,
    decoder: ClientMsgDecoder,
    pf: PixelFormat,
    width: u16,
    height: u16,
    band: (u16, u16),
    interval: Duration,
    next_frame: Instant,
    frame: u64,
    /// An incremental request is waiting for the next tick.
    pending: bool,
    queue: VecDeque<Chunk>,
    /// Bytes held in `Chunk::Bytes`: the socket loop stops reading while this is large, so a
    /// client that floods cut text without reading the echoes cannot grow it without bound.
    queued_bytes: usize,
    painter: Painter,
    stats: SessionStats,
}

impl VmSession {
    /// A session that has queued its ProtocolVersion. `challenge` is used only with a
    /// password; `seed` feeds the incompressible payload.
    pub fn new(cfg: &Config, challenge: [u8; 16], seed: u64, now: Instant) -> VmSession {
        let security = match &cfg.password {
            Some(pw) => ServerSecurity::VncAuth {
                password: pw.as_bytes().to_vec(),
                challenge,
            },
            None => ServerSecurity::None,
        };
        let init = ServerInit {
            width: cfg.width,
            height: cfg.height,
            pixel_format: PixelFormat::BGRX_LE,
            name: cfg.name.clone(),
        };
        let mut handshake = ServerHandshake::new(security, init);
        let mut queue = VecDeque::new();
        let first = handshake.take_output();
        let queued_bytes = first.len();
        queue.push_back(Chunk::Bytes(first));
        let interval = if cfg.fps == 0 {
            Duration::ZERO
        } else {
            Duration::from_secs(1) / cfg.fps
        };
        VmSession {
            handshake,
            hs_buf: Vec::new(),
            decoder: ClientMsgDecoder::new(),
            pf: PixelFormat::BGRX_LE,
            width: cfg.width,
            height: cfg.height,
            band: cfg.update_area.band_size(cfg.width, cfg.height),
            interval,
            next_frame: now,
            frame: 0,
            pending: false,
            queue,
            queued_bytes,
            painter: Painter::new(cfg.payload, cfg.width, cfg.height, seed),
            stats: SessionStats::default(),
        }
    }

    pub fn stats(&self) -> &SessionStats {
        &self.stats
    }

    /// The pixel format updates are sent in now.
    pub fn pixel_format(&self) -> &PixelFormat {
        &self.pf
    }

    /// Consumes client bytes. An error means close the connection, after writing what
    /// [`VmSession::write_to`] still has (it may say why).
    pub fn receive(&mut self, input: &[u8], now: Instant) -> Result<(), RfbError> {
        let mut input = input;
        if !self.handshake.is_done() {
            self.hs_buf.extend_from_slice(input);
            let used = self.handshake.receive(&self.hs_buf);
            let reply = self.handshake.take_output();
            self.push_bytes(reply);
            let used = used?;
            if !self.handshake.is_done() {
                self.hs_buf.drain(..used);
                return Ok(());
            }
            let rest = std::mem::take(&mut self.hs_buf);
            self.decoder.feed(&rest[used..]);
            input = &[];
        }
        self.decoder.feed(input);
        while let Some(msg) = self.decoder.next_msg()? {
            self.handle(msg, now)?;
        }
        Ok(())
    }

    fn handle(&mut self, msg: ClientMsg, now: Instant) -> Result<(), RfbError> {
        match msg {
            ClientMsg::SetPixelFormat(pf) => {
                pf.check_packable()?;
                self.pf = pf;
            }
            // Raw is mandatory for every client (RFC 6143 7.7.1), so whatever the list says,
            // Raw is an acceptable answer.
            ClientMsg::SetEncodings(_) => {}
            ClientMsg::FramebufferUpdateRequest(req) if !req.incremental => {
                let rect = Rect {
                    x: 0,
                    y: 0,
                    width: self.width,
                    height: self.height,
                    encoding: ENCODING_RAW,
                };
                self.push_update(rect);
                self.stats.full_updates += 1;
                // A full update answers any waiting incremental request too.
                self.pending = false;
                self.next_frame = now + self.interval;
            }
            ClientMsg::FramebufferUpdateRequest(_) => {
                self.pending = true;
                self.handle_timeout(now);
            }
            ClientMsg::KeyEvent { .. } => self.stats.key_events += 1,
            ClientMsg::PointerEvent { .. } => self.stats.pointer_events += 1,
            ClientMsg::ClientCutText(text) => {
                // Echoed at once, so a client can time input round trips through a gateway.
                let mut out = Vec::with_capacity(8 + text.len());
                encode_cut_text(&text, &mut out);
                self.push_bytes(out);
                self.stats.cut_texts += 1;
            }
        }
        Ok(())
    }

    /// When [`VmSession::handle_timeout`] has work: the next frame tick while an incremental
    /// request waits.
    pub fn poll_timeout(&self) -> Option<Instant> {
        self.pending.then_some(self.next_frame)
    }

    /// Answers a waiting incremental request if its tick has come.
    pub fn handle_timeout(&mut self, now: Instant) {
        if !self.pending || now < self.next_frame {
            return;
        }
        self.pending = false;
        self.frame += 1;
        let (bw, bh) = self.band;
        // The band walks down the screen (full-width bands) or diagonally (smaller rects),
        // so successive updates touch different pixels.
        let step = u64::from(bh.max(1));
        let y_span = u64::from(self.height - bh) + 1;
        let x_span = u64::from(self.width - bw) + 1;
        let rect = Rect {
            x: if bw == self.width {
                0
            } else {
                (self.frame * 16 % x_span) as u16
            },
            y: if bw == self.width {
                (self.frame * step % y_span) as u16
            } else {
                (self.frame * 16 % y_span) as u16
            },
            width: bw,
            height: bh,
            encoding: ENCODING_RAW,
        };
        self.push_update(rect);
        // Never bank more than one tick of credit after a stall: the rate stays at most fps.
        self.next_frame = (self.next_frame + self.interval).max(now);
    }

    fn push_update(&mut self, rect: Rect) {
        self.stats.updates += 1;
        self.queue.push_back(Chunk::Update(UpdateJob {
            rect,
            pf: self.pf,
            frame: self.frame,
            next_row: 0,
            header_sent: false,
        }));
    }

    fn push_bytes(&mut self, bytes: Vec<u8>) {
        if !bytes.is_empty() {
            self.queued_bytes += bytes.len();
            self.queue.push_back(Chunk::Bytes(bytes));
        }
    }

    /// Whether anything is waiting to be written.
    pub fn has_output(&self) -> bool {
        !self.queue.is_empty()
    }

    /// Bytes queued other than updates being painted (see `queued_bytes`).
    pub fn backlog(&self) -> usize {
        self.queued_bytes
    }

    /// Appends about `limit` bytes of output (or all there is) to `out`. An update row is
    /// never split, so this may append up to one row more than `limit`.
    pub fn write_to(&mut self, out: &mut Vec<u8>, limit: usize) {
        let limit = out.len().saturating_add(limit);
        while out.len() < limit {
            let Some(front) = self.queue.front_mut() else {
                return;
            };
            match front {
                Chunk::Bytes(b) => {
                    out.extend_from_slice(b);
                    self.queued_bytes -= b.len();
                    self.queue.pop_front();
                }
                Chunk::Update(job) => {
                    if !job.header_sent {
                        encode_update_header(1, out);
                        job.rect.encode(out);
                        job.header_sent = true;
                    }
                    while job.next_row < job.rect.height && out.len() < limit {
                        self.painter.paint_row(
                            &job.pf,
                            job.rect.x,
                            job.rect.width,
                            job.rect.y + job.next_row,
                            job.frame,
                            out,
                        );
                        job.next_row += 1;
                    }
                    if job.next_row == job.rect.height {
                        self.queue.pop_front();
                    }
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::fakevm::UpdateArea;
    use vncgate_rfb::{ClientHandshake, ServerEvent, ServerMsgDecoder, UpdateRequest};

    fn cfg() -> Config {
        Config {
            width: 64,
            height: 40,
            fps: 10,
            update_area: UpdateArea::Fraction(0.25),
            ..Config::default()
        }
    }

    fn drain(s: &mut VmSession) -> Vec<u8> {
        let mut out = Vec::new();
        while s.has_output() {
            s.write_to(&mut out, 100);
        }
        out
    }

    /// Runs a client handshake against the session; returns the client's decoder.
    fn connect(s: &mut VmSession, now: Instant) -> ServerMsgDecoder {
        let mut c = ClientHandshake::new(None, true);
        for _ in 0..5 {
            let to_c = drain(s);
            let used = c.receive(&to_c).unwrap();
            assert_eq!(used, to_c.len());
            s.receive(&c.take_output(), now).unwrap();
        }
        assert!(c.is_done());
        ServerMsgDecoder::new(&c.server_init().unwrap().pixel_format)
    }

    fn request(incremental: bool) -> Vec<u8> {
        let mut b = Vec::new();
        ClientMsg::FramebufferUpdateRequest(UpdateRequest {
            incremental,
            x: 0,
            y: 0,
            width: 64,
            height: 40,
        })
        .encode(&mut b);
        b
    }

    /// (rects, pixel bytes) of each complete update in `bytes`.
    fn updates(dec: &mut ServerMsgDecoder, bytes: &[u8]) -> Vec<(Vec<Rect>, usize)> {
        dec.feed(bytes);
        let mut out = Vec::new();
        let mut cur = (Vec::new(), 0);
        while let Some(ev) = dec.next_event().unwrap() {
            match ev {
                ServerEvent::Rect(r) => cur.0.push(r),
                ServerEvent::Pixels(p) => cur.1 += p.len(),
                ServerEvent::UpdateEnd => out.push(std::mem::take(&mut cur)),
                _ => {}
            }
        }
        out
    }

    #[test]
    fn full_then_paced_incremental_updates() {
        let t0 = Instant::now();
        let mut s = VmSession::new(&cfg(), [0; 16], 1, t0);
        let mut dec = connect(&mut s, t0);

        s.receive(&request(false), t0).unwrap();
        let got = updates(&mut dec, &drain(&mut s));
        assert_eq!(got.len(), 1);
        assert_eq!((got[0].0[0].width, got[0].0[0].height), (64, 40));
        assert_eq!(got[0].1, 64 * 40 * 4);

        // An incremental request right after waits for the next tick (100 ms at 10 fps).
        s.receive(&request(true), t0).unwrap();
        assert!(!s.has_output());
        assert_eq!(s.poll_timeout(), Some(t0 + Duration::from_millis(100)));
        s.handle_timeout(t0 + Duration::from_millis(99));
        assert!(!s.has_output());
        s.handle_timeout(t0 + Duration::from_millis(100));
        let got = updates(&mut dec, &drain(&mut s));
        assert_eq!(got.len(), 1);
        assert_eq!((got[0].0[0].width, got[0].0[0].height), (64, 10));
        assert_eq!(s.poll_timeout(), None);
    }

    #[test]
    fn echoes_cut_text_and_counts_input() {
        let t0 = Instant::now();
        let mut s = VmSession::new(&cfg(), [0; 16], 1, t0);
        connect(&mut s, t0);
        let mut b = Vec::new();
        ClientMsg::KeyEvent {
            down: true,
            key: 97,
        }
        .encode(&mut b);
        ClientMsg::PointerEvent {
            buttons: 0,
            x: 1,
            y: 1,
        }
        .encode(&mut b);
        ClientMsg::ClientCutText(b"ping 1".to_vec()).encode(&mut b);
        // Delivered one byte at a time.
        for byte in &b {
            s.receive(std::slice::from_ref(byte), t0).unwrap();
        }
        assert_eq!(drain(&mut s), b"\x03\0\0\0\0\0\0\x06ping 1");
        assert_eq!(s.stats().key_events, 1);
        assert_eq!(s.stats().pointer_events, 1);
        assert_eq!(s.stats().cut_texts, 1);
    }

    #[test]
    fn pixel_formats_are_honoured_or_refused() {
        let t0 = Instant::now();
        let mut s = VmSession::new(&cfg(), [0; 16], 1, t0);
        connect(&mut s, t0);
        let be = PixelFormat {
            big_endian: true,
            ..PixelFormat::BGRX_LE
        };
        let mut b = Vec::new();
        ClientMsg::SetPixelFormat(be).encode(&mut b);
        s.receive(&b, t0).unwrap();
        assert_eq!(s.pixel_format(), &be);

        let mut b = Vec::new();
        ClientMsg::SetPixelFormat(PixelFormat {
            bits_per_pixel: 24,
            ..PixelFormat::BGRX_LE
        })
        .encode(&mut b);
        assert!(matches!(
            s.receive(&b, t0),
            Err(RfbError::UnsupportedPixelFormat(_))
        ));
    }
}
