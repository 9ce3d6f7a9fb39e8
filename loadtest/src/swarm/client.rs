//! One simulated noVNC client as a state machine: server bytes in, client bytes out, time
//! passed in. The WebSocket edge in [`super`] carries the bytes.
//!
//! Like noVNC it sends SetPixelFormat (32 bpp RGBX), SetEncodings and a full
//! FramebufferUpdateRequest after ServerInit. Only Raw is advertised, so any RFB server must
//! answer with Raw, which is the heaviest case for the path under test. Then:
//!
//! * busy: an incremental request after each complete update, and input at a fixed rate:
//!   pointer moves, key presses, and every fifth tick a ClientCutText probe
//!   (`vncgate-rtt <client> <seq>`) whose ServerCutText echo times the input round trip;
//! * idle: after the first update, nothing (a parked tab).

use std::collections::VecDeque;
use std::time::{Duration, Instant};

use vncgate_rfb::{
    ClientHandshake, ClientMsg, ENCODING_RAW, PixelFormat, RfbError, ServerEvent, ServerMsgDecoder,
    UpdateRequest,
};

/// Outstanding round-trip probes kept per client; older ones count as lost.
const MAX_PROBES: usize = 32;

const PROBE_PREFIX: &[u8] = b"vncgate-rtt ";

/// What one simulated client does.
#[derive(Debug, Clone)]
pub struct ClientConfig {
    /// Client number, written into probes so echoes are attributable.
    pub id: usize,
    pub password: Option<Vec<u8>>,
    /// Busy clients keep requesting updates and send input; idle ones park.
    pub busy: bool,
    /// Time between input events for busy clients; `None` sends none.
    pub input_interval: Option<Duration>,
}

/// Counters and samples gathered while running.
#[derive(Debug, Default, Clone)]
pub struct ClientStats {
    /// When ServerInit arrived.
    pub handshake_done: Option<Instant>,
    /// Complete FramebufferUpdates received.
    pub updates: u64,
    /// Raw pixel bytes received.
    pub pixel_bytes: u64,
    /// Input events sent (pointer, key, cut text).
    pub inputs_sent: u64,
    /// Probe round trips.
    pub rtts: Vec<Duration>,
    /// Probes given up on (too many outstanding, or overtaken by a later echo).
    pub probes_lost: u64,
}

#[derive(Debug)]
pub struct SimClient {
    cfg: ClientConfig,
    handshake: ClientHandshake,
    hs_buf: Vec<u8>,
    /// Present once ServerInit has been received.
    decoder: Option<ServerMsgDecoder>,
    screen: (u16, u16),
    out: Vec<u8>,
    next_input: Option<Instant>,
    tick: u64,
    next_seq: u64,
    probes: VecDeque<(u64, Instant)>,
    stats: ClientStats,
}

impl SimClient {
    pub fn new(cfg: ClientConfig) -> SimClient {
        let handshake = ClientHandshake::new(cfg.password.as_deref(), true);
        SimClient {
            cfg,
            handshake,
            hs_buf: Vec::new(),
            decoder: None,
            screen: (0, 0),
            out: Vec::new(),
            next_input: None,
            tick: 0,
            next_seq: 0,
            probes: VecDeque::new(),
            stats: ClientStats::default(),
        }
    }

    pub fn stats(&self) -> &ClientStats {
        &self.stats
    }

    /// Bytes to send to the server.
    pub fn take_output(&mut self) -> Vec<u8> {
        std::mem::take(&mut self.out)
    }

    /// Consumes server bytes as they arrived. An error means the server broke the protocol
    /// (or refused us); the session is over.
    pub fn receive(&mut self, input: &[u8], now: Instant) -> Result<(), RfbError> {
        let mut input = input;
        if self.decoder.is_none() {
            self.hs_buf.extend_from_slice(input);
            let used = self.handshake.receive(&self.hs_buf)?;
            self.out.extend(self.handshake.take_output());
            if !self.handshake.is_done() {
                self.hs_buf.drain(..used);
                return Ok(());
            }
            self.start(now);
            let rest = std::mem::take(&mut self.hs_buf);
            self.decoder
                .as_mut()
                .expect("set by start")
                .feed(&rest[used..]);
            input = &[];
        }
        let Some(decoder) = self.decoder.as_mut() else {
            return Ok(());
        };
        decoder.feed(input);
        while let Some(ev) = decoder.next_event()? {
            match ev {
                ServerEvent::Pixels(p) => self.stats.pixel_bytes += p.len() as u64,
                ServerEvent::UpdateEnd => {
                    self.stats.updates += 1;
                    if self.cfg.busy {
                        request(&mut self.out, self.screen, true);
                    }
                }
                ServerEvent::CutText(text) => {
                    match_probe(text, self.cfg.id, &mut self.probes, &mut self.stats, now)
                }
                _ => {}
            }
        }
        Ok(())
    }

    /// After ServerInit: what noVNC sends on connect.
    fn start(&mut self, now: Instant) {
        let init = self.handshake.server_init().expect("handshake done");
        self.screen = (init.width, init.height);
        self.stats.handshake_done = Some(now);
        let pf = PixelFormat::RGBX_LE;
        ClientMsg::SetPixelFormat(pf).encode(&mut self.out);
        ClientMsg::SetEncodings(vec![ENCODING_RAW]).encode(&mut self.out);
        request(&mut self.out, self.screen, false);
        self.decoder = Some(ServerMsgDecoder::new(&pf));
        if self.cfg.busy && self.cfg.input_interval.is_some() {
            self.next_input = Some(now);
        }
    }

    /// When [`SimClient::handle_timeout`] has work (the next input event).
    pub fn poll_timeout(&self) -> Option<Instant> {
        self.next_input
    }

    /// Sends the input due at `now`.
    pub fn handle_timeout(&mut self, now: Instant) {
        let (Some(due), Some(interval)) = (self.next_input, self.cfg.input_interval) else {
            return;
        };
        if now < due {
            return;
        }
        let (w, h) = (
            u64::from(self.screen.0.max(1)),
            u64::from(self.screen.1.max(1)),
        );
        let t = self.tick;
        match t % 5 {
            0 => {
                let seq = self.next_seq;
                self.next_seq += 1;
                let text = format!("vncgate-rtt {} {seq}", self.cfg.id).into_bytes();
                ClientMsg::ClientCutText(text).encode(&mut self.out);
                if self.probes.len() == MAX_PROBES {
                    self.probes.pop_front();
                    self.stats.probes_lost += 1;
                }
                self.probes.push_back((seq, now));
            }
            2 => {
                let key = u32::from(b'a') + (t % 26) as u32;
                ClientMsg::KeyEvent { down: true, key }.encode(&mut self.out);
                ClientMsg::KeyEvent { down: false, key }.encode(&mut self.out);
            }
            _ => ClientMsg::PointerEvent {
                buttons: 0,
                x: (t * 7 % w) as u16,
                y: (t * 5 % h) as u16,
            }
            .encode(&mut self.out),
        }
        self.tick += 1;
        self.stats.inputs_sent += 1;
        // Keep the schedule, but after a stall do not fire a burst to catch up.
        let next = due + interval;
        self.next_input = Some(if next < now { now + interval } else { next });
    }
}

fn request(out: &mut Vec<u8>, (width, height): (u16, u16), incremental: bool) {
    ClientMsg::FramebufferUpdateRequest(UpdateRequest {
        incremental,
        x: 0,
        y: 0,
        width,
        height,
    })
    .encode(out);
}

/// Times a probe echo; echoes of anything else (real clipboard traffic) are ignored.
fn match_probe(
    text: &[u8],
    id: usize,
    probes: &mut VecDeque<(u64, Instant)>,
    stats: &mut ClientStats,
    now: Instant,
) {
    let Some(rest) = text.strip_prefix(PROBE_PREFIX) else {
        return;
    };
    let Ok(rest) = std::str::from_utf8(rest) else {
        return;
    };
    let mut parts = rest.split(' ');
    let (Some(Ok(who)), Some(Ok(seq))) = (
        parts.next().map(str::parse::<usize>),
        parts.next().map(str::parse::<u64>),
    ) else {
        return;
    };
    if who != id {
        return;
    }
    if let Some(i) = probes.iter().position(|&(s, _)| s == seq) {
        // Echoes come back in order, so anything older than this one is lost.
        stats.probes_lost += i as u64;
        let sent = probes[i].1;
        probes.drain(..=i);
        stats.rtts.push(now.saturating_duration_since(sent));
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::fakevm::{Config, UpdateArea, session::VmSession};

    fn pump(vm: &mut VmSession, c: &mut SimClient, now: Instant) {
        for _ in 0..20 {
            let mut to_c = Vec::new();
            while vm.has_output() {
                vm.write_to(&mut to_c, 1000);
            }
            c.receive(&to_c, now).unwrap();
            let to_vm = c.take_output();
            if to_c.is_empty() && to_vm.is_empty() {
                return;
            }
            vm.receive(&to_vm, now).unwrap();
        }
    }

    #[test]
    fn busy_client_against_fake_vm_session() {
        let vm_cfg = Config {
            width: 32,
            height: 16,
            fps: 10,
            update_area: UpdateArea::Fraction(0.5),
            password: Some("pw".into()),
            ..Config::default()
        };
        let t0 = Instant::now();
        let mut vm = VmSession::new(&vm_cfg, [3; 16], 9, t0);
        let mut c = SimClient::new(ClientConfig {
            id: 4,
            password: Some(b"pw".to_vec()),
            busy: true,
            input_interval: Some(Duration::from_millis(50)),
        });
        pump(&mut vm, &mut c, t0);
        assert_eq!(c.stats().handshake_done, Some(t0));
        assert_eq!(c.stats().updates, 1);
        assert_eq!(c.stats().pixel_bytes, 32 * 16 * 4);

        // First input tick is a probe; its echo arrives 5 ms later.
        assert_eq!(c.poll_timeout(), Some(t0));
        c.handle_timeout(t0);
        pump(&mut vm, &mut c, t0 + Duration::from_millis(5));
        assert_eq!(c.stats().rtts, vec![Duration::from_millis(5)]);

        // The incremental request waits for the fake VM's next tick.
        let t1 = t0 + Duration::from_millis(100);
        vm.handle_timeout(t1);
        pump(&mut vm, &mut c, t1);
        assert_eq!(c.stats().updates, 2);
        assert_eq!(c.stats().pixel_bytes, 32 * 16 * 4 + 32 * 8 * 4);
    }

    #[test]
    fn probe_matching() {
        let t0 = Instant::now();
        let mut probes: VecDeque<_> = [(1, t0), (2, t0), (3, t0)].into();
        let mut stats = ClientStats::default();
        let later = t0 + Duration::from_millis(3);
        match_probe(b"vncgate-rtt 9 2", 4, &mut probes, &mut stats, later);
        match_probe(b"hello", 4, &mut probes, &mut stats, later);
        assert!(stats.rtts.is_empty());
        match_probe(b"vncgate-rtt 4 2", 4, &mut probes, &mut stats, later);
        assert_eq!(stats.rtts, vec![Duration::from_millis(3)]);
        assert_eq!(stats.probes_lost, 1);
        assert_eq!(probes.len(), 1);
    }
}
