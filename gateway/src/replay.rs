//! `vncgate replay FILE --listen ADDR [--speed X]`: serves a recording (see
//! [`crate::recording`]) to noVNC viewers, so an auditor watches a session in an ordinary
//! noVNC.
//!
//! Each viewer gets a WebSocket (any path; the handshake and framing are `vncgate-ws`'s) and
//! an RFB session of its own from the start of the recording. The recorded server stream is
//! walked through its handshake ([`plan`]: ProtocolVersion, the security the recorded
//! session negotiated, SecurityResult, ServerInit); the viewer gets a handshake of its own
//! with security type None (`vncgate-rfb`'s server role, so the auditor needs no VNC
//! password) and the recorded ServerInit, then every recorded message after ServerInit, at
//! the recorded pace (times `--speed`; `0` or `max`: as fast as the viewer takes them).
//! The viewer's input is read and dropped (pings are answered).
//!
//! The recorded messages are sent as they were: the pixel format and encodings are the
//! recorded viewer's. A viewer that asks for another pixel format than the recording's
//! ServerInit (a noVNC with non-default settings; noVNC's defaults are what a recording of
//! noVNC holds) would draw wrong colours: it is told in the log, and the bytes still go out.
//!
//! When the recording ends, the connection stays open showing the last frame, until the
//! viewer leaves. A recording cut short (no end record) plays to its last whole record.
//!
//! Not thread-per-core: a replay serves a few auditors, one thread per viewer (and one
//! for its input).

use std::io::{self, Read as _, Write as _};
use std::net::{TcpListener, TcpStream};
use std::ops::Range;
use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use vncgate_rfb::{
    ClientMsg, ClientMsgDecoder, PixelFormat, SECURITY_NONE, SECURITY_VNC_AUTH, ServerHandshake,
    ServerInit, ServerSecurity, parse_version,
};
use vncgate_ws::frame::{
    ControlFrame, FrameParser, Item, MAX_SERVER_HEADER, OP_BINARY, OP_PONG, encode_header,
};
use vncgate_ws::handshake::{self, HandshakeConfig, Parsed};

use crate::recording::{self, Kind};

/// How fast to play: a multiplier of the recorded pace, or as fast as possible.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Speed {
    Times(f64),
    Max,
}

impl std::str::FromStr for Speed {
    type Err = String;

    fn from_str(s: &str) -> Result<Speed, String> {
        if s == "max" {
            return Ok(Speed::Max);
        }
        match s.parse::<f64>() {
            Ok(0.0) => Ok(Speed::Max),
            Ok(x) if x.is_finite() && x > 0.0 => Ok(Speed::Times(x)),
            _ => Err(format!(
                "--speed '{s}': a positive multiplier (1 = recorded pace), or 0 / max"
            )),
        }
    }
}

/// Why a recording cannot be replayed (beyond a format error).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum PlanError {
    Format(recording::FormatError),
    /// The recorded server stream ends before its handshake does (the session never got
    /// to ServerInit).
    NoHandshake,
    /// The recorded server did not speak RFB.
    BadVersion,
    /// The recorded server refused the connection (no security types, or a failed
    /// SecurityResult).
    Refused,
    /// The recorded session negotiated a security type whose stream cannot be followed
    /// (anything but None and VNC Authentication: those encrypt or reframe it).
    Security(u8),
    /// A malformed ServerInit.
    ServerInit(String),
}

impl std::fmt::Display for PlanError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            PlanError::Format(e) => e.fmt(f),
            PlanError::NoHandshake => {
                f.write_str("the recording ends before the RFB handshake completed")
            }
            PlanError::BadVersion => f.write_str("the recorded server did not send an RFB version"),
            PlanError::Refused => f.write_str("the recorded server refused the session"),
            PlanError::Security(t) => write!(
                f,
                "the recorded session used RFB security type {t}, which cannot be replayed (only None and VNC Authentication can)"
            ),
            PlanError::ServerInit(e) => write!(f, "the recorded ServerInit is malformed: {e}"),
        }
    }
}

/// A recording ready to serve: the recorded ServerInit and the messages after it.
#[derive(Debug)]
pub struct Plan {
    pub session: String,
    pub init: ServerInit,
    /// The recorded server stream after ServerInit.
    stream: Vec<u8>,
    /// Each chunk as the VM sent it: microseconds since the first one, and its bytes in
    /// `stream`.
    chunks: Vec<(u64, Range<usize>)>,
    pub end: Option<recording::EndReason>,
}

impl Plan {
    /// Microseconds from ServerInit to the last message.
    pub fn duration_micros(&self) -> u64 {
        self.chunks.last().map_or(0, |c| c.0)
    }

    pub fn bytes(&self) -> usize {
        self.stream.len()
    }
}

/// Reads a big-endian u32 at `at`.
fn u32_at(b: &[u8], at: usize) -> Option<u32> {
    Some(u32::from_be_bytes(b.get(at..at + 4)?.try_into().ok()?))
}

/// Walks the recorded server stream (`server`) through the handshake: returns the
/// ServerInit and where the messages after it start. `client`, when input was recorded,
/// says which security type the recorded viewer chose; without it, a server that offered
/// several types is read as having run the one its next bytes fit (a SecurityResult of 0
/// right away is None; otherwise VNC Authentication's 16-byte challenge).
pub fn walk_handshake(
    server: &[u8],
    client: Option<&[u8]>,
) -> Result<(ServerInit, usize), PlanError> {
    let short = PlanError::NoHandshake;
    let v: &[u8; 12] = server.first_chunk().ok_or(short.clone())?;
    let (major, minor) = parse_version(v).map_err(|_| PlanError::BadVersion)?;
    if major != 3 {
        return Err(PlanError::BadVersion);
    }
    let mut at = 12;
    let chosen = if minor >= 7 {
        let n = *server.get(at).ok_or(short.clone())? as usize;
        if n == 0 {
            return Err(PlanError::Refused);
        }
        let types = server.get(at + 1..at + 1 + n).ok_or(short.clone())?;
        at += 1 + n;
        let picked = client.and_then(|c| c.get(12).copied());
        match (picked, types) {
            (Some(t), _) => t,
            (None, [t]) => *t,
            (None, _) if types.contains(&SECURITY_NONE) && u32_at(server, at) == Some(0) => {
                SECURITY_NONE
            }
            (None, _) if types.contains(&SECURITY_VNC_AUTH) => SECURITY_VNC_AUTH,
            (None, _) => return Err(PlanError::Security(types[0])),
        }
    } else {
        let t = u32_at(server, at).ok_or(short.clone())?;
        at += 4;
        if t == 0 {
            return Err(PlanError::Refused);
        }
        u8::try_from(t).map_err(|_| PlanError::Security(0))?
    };
    match chosen {
        SECURITY_NONE => {
            if minor >= 8 {
                if u32_at(server, at).ok_or(short.clone())? != 0 {
                    return Err(PlanError::Refused);
                }
                at += 4;
            }
        }
        SECURITY_VNC_AUTH => {
            at += 16;
            if u32_at(server, at).ok_or(short.clone())? != 0 {
                return Err(PlanError::Refused);
            }
            at += 4;
        }
        t => return Err(PlanError::Security(t)),
    }
    match ServerInit::decode(&server[at.min(server.len())..]) {
        Ok(Some((init, used))) => Ok((init, at + used)),
        Ok(None) => Err(short),
        Err(e) => Err(PlanError::ServerInit(e.to_string())),
    }
}

/// Checks a recording and prepares it for serving.
pub fn plan(file: &[u8]) -> Result<Plan, PlanError> {
    let p = recording::parse(file).map_err(PlanError::Format)?;
    let mut server = Vec::new();
    let mut times = Vec::new();
    let mut client = Vec::new();
    for r in &p.records {
        match r.kind {
            Kind::VmToBrowser => {
                times.push((r.micros, server.len()..server.len() + r.payload.len()));
                server.extend_from_slice(r.payload);
            }
            Kind::BrowserToVm => client.extend_from_slice(r.payload),
            Kind::End => {}
        }
    }
    let (init, start) = walk_handshake(&server, p.header.input_included().then_some(&client[..]))?;
    let stream = server.split_off(start);
    let mut chunks = Vec::new();
    let mut base = None;
    for (t, r) in times {
        if r.end <= start {
            continue;
        }
        let b = *base.get_or_insert(t);
        chunks.push((t - b, r.start.max(start) - start..r.end - start));
    }
    Ok(Plan {
        session: p.header.session,
        init,
        stream,
        chunks,
        end: p.end,
    })
}

/// Reads, checks and serves `file` on `listen` until the process is stopped.
pub fn run(file: &Path, listen: &str, speed: Speed) -> Result<(), String> {
    let bytes = std::fs::read(file).map_err(|e| format!("cannot read {}: {e}", file.display()))?;
    let plan = Arc::new(plan(&bytes).map_err(|e| format!("{}: {e}", file.display()))?);
    drop(bytes);
    let addr = crate::route::resolve(listen).map_err(|e| format!("--listen: {e}"))?;
    let l = TcpListener::bind(addr).map_err(|e| format!("cannot bind {addr}: {e}"))?;
    let local = l.local_addr().map_err(|e| e.to_string())?;
    tracing::info!(
        file = %file.display(),
        session = %plan.session,
        width = plan.init.width,
        height = plan.init.height,
        bytes = plan.bytes(),
        secs = plan.duration_micros() as f64 / 1e6,
        ended = plan.end.map_or("cut off (no end record)", |r| r.as_str()),
        listen = %local,
        "replaying; open it in noVNC at ws://{local}/ (any path)"
    );
    for conn in l.incoming() {
        let Ok(s) = conn else { continue };
        let plan = plan.clone();
        let _ = std::thread::Builder::new()
            .name("vncgate-replay".into())
            .spawn(move || {
                let peer = s.peer_addr().ok();
                if let Err(e) = serve(s, &plan, speed) {
                    tracing::info!(peer = ?peer, error = %e, "viewer left");
                }
            });
    }
    Ok(())
}

/// One viewer, from the upgrade to its leaving.
fn serve(mut s: TcpStream, plan: &Plan, speed: Speed) -> io::Result<()> {
    let _ = s.set_nodelay(true);
    s.set_read_timeout(Some(Duration::from_secs(10)))?;
    // Any path: noVNC's default `websockify`, or whatever the auditor typed.
    let cfg = HandshakeConfig {
        any_path: true,
        ..HandshakeConfig::default()
    };
    let mut head = Vec::new();
    let mut buf = vec![0u8; 64 << 10];
    let req = loop {
        let n = s.read(&mut buf)?;
        if n == 0 {
            return Err(io::ErrorKind::UnexpectedEof.into());
        }
        head.extend_from_slice(&buf[..n]);
        match handshake::parse_request(&head, &cfg) {
            Ok(Parsed::Partial) => continue,
            Ok(Parsed::Upgrade(u)) => break u,
            // Not asked for (`plain_requests` is off): the parser answers 426 itself.
            Ok(Parsed::Plain(_)) => {
                s.write_all(b"HTTP/1.1 426 Upgrade Required\r\nConnection: close\r\nContent-Length: 0\r\n\r\n")?;
                return Err(io::Error::other("a plain request, not an upgrade"));
            }
            Err(r) => {
                s.write_all(&r.response())?;
                return Err(io::Error::other(format!("upgrade refused: {}", r.reason())));
            }
        }
    };
    s.write_all(&handshake::switching_protocols(&req.accept, req.protocol))?;
    s.set_read_timeout(None)?;
    // Bytes right behind the request head.
    let mut early = head[req.consumed..].to_vec();

    let mut parser = FrameParser::new(16 << 20);
    let mut hs = ServerHandshake::new(ServerSecurity::None, plan.init.clone());
    send_binary(&mut s, &hs.take_output())?;
    let mut rfb_in: Vec<u8> = Vec::new();
    while !hs.is_done() {
        if early.is_empty() {
            let n = s.read(&mut buf)?;
            if n == 0 {
                return Err(io::ErrorKind::UnexpectedEof.into());
            }
            early.extend_from_slice(&buf[..n]);
        }
        let mut chunk = std::mem::take(&mut early);
        let (data, closed) = deframe(&mut parser, &mut chunk, &mut s)?;
        if closed {
            return Ok(());
        }
        rfb_in.extend_from_slice(&data);
        let used = hs.receive(&rfb_in).map_err(|e| {
            let out = hs.take_output();
            let _ = send_binary(&mut s, &out);
            let _ = s.write_all(ControlFrame::close(Some(1002), "rfb handshake failed").as_bytes());
            io::Error::other(format!("rfb handshake: {e}"))
        })?;
        rfb_in.drain(..used);
        send_binary(&mut s, &hs.take_output())?;
    }
    tracing::info!(peer = ?s.peer_addr().ok(), session = %plan.session, "viewer connected; replaying");

    let gone = Arc::new(AtomicBool::new(false));
    let w = Arc::new(Mutex::new(s.try_clone()?));
    let reader = {
        let (gone, w) = (gone.clone(), w.clone());
        let recorded = plan.init.pixel_format;
        std::thread::Builder::new()
            .name("vncgate-replay-in".into())
            .spawn(move || {
                viewer_input(s, parser, rfb_in, &w, recorded);
                gone.store(true, Ordering::Release);
            })?
    };
    let start = Instant::now();
    for (t, r) in &plan.chunks {
        if gone.load(Ordering::Acquire) {
            break;
        }
        if let Speed::Times(x) = speed {
            let at = start + Duration::from_micros((*t as f64 / x) as u64);
            let now = Instant::now();
            if at > now {
                std::thread::sleep(at - now);
            }
        }
        let mut w = w.lock().unwrap_or_else(|p| p.into_inner());
        if send_binary(&mut w, &plan.stream[r.clone()]).is_err() {
            break;
        }
    }
    tracing::info!(session = %plan.session, "recording played to its end; the viewer keeps the last frame");
    let _ = reader.join();
    Ok(())
}

/// Parses viewer frames in `chunk`: the data, and whether a close came (answered). Pings
/// are answered.
fn deframe(
    parser: &mut FrameParser,
    chunk: &mut [u8],
    s: &mut TcpStream,
) -> io::Result<(Vec<u8>, bool)> {
    let mut data = Vec::new();
    let mut off = 0;
    while off < chunk.len() {
        let step = parser.step(&mut chunk[off..]).map_err(|e| {
            let c = vncgate_ws::frame::ControlFrame::close(Some(e.code), e.reason);
            let _ = s.write_all(c.as_bytes());
            io::Error::other(e.reason)
        })?;
        match step.item {
            Some(Item::Data(r)) => data.extend_from_slice(&chunk[off + r.start..off + r.end]),
            Some(Item::Ping(p)) => {
                s.write_all(ControlFrame::new(OP_PONG, p.as_slice()).as_bytes())?
            }
            Some(Item::Pong(_)) | None => {}
            Some(Item::Close(c)) => {
                s.write_all(ControlFrame::close(c.code, "").as_bytes())?;
                return Ok((data, true));
            }
        }
        off += step.consumed;
    }
    Ok((data, false))
}

/// Reads and drops the viewer's input until it leaves; says once if it asked for a pixel
/// format other than the recording's.
fn viewer_input(
    mut s: TcpStream,
    mut parser: FrameParser,
    pending: Vec<u8>,
    w: &Mutex<TcpStream>,
    recorded: PixelFormat,
) {
    let mut dec = ClientMsgDecoder::new();
    dec.feed(&pending);
    let mut decoding = true;
    let mut buf = vec![0u8; 64 << 10];
    loop {
        if decoding {
            loop {
                match dec.next_msg() {
                    Ok(Some(ClientMsg::SetPixelFormat(pf))) if pf != recorded => {
                        tracing::warn!(viewer = ?pf, recording = ?recorded, "the viewer asked for another pixel format than the recording's: its colours will be wrong");
                    }
                    Ok(Some(_)) => {}
                    Ok(None) => break,
                    // An extension message the decoder does not size: input is dropped
                    // anyway, so stop looking.
                    Err(_) => {
                        decoding = false;
                        break;
                    }
                }
            }
        }
        let n = match s.read(&mut buf) {
            Ok(0) | Err(_) => return,
            Ok(n) => n,
        };
        let mut guard = w.lock().unwrap_or_else(|p| p.into_inner());
        let r = deframe(&mut parser, &mut buf[..n], &mut guard);
        drop(guard);
        match r {
            Ok((data, false)) => {
                if decoding {
                    dec.feed(&data);
                }
            }
            Ok((_, true)) | Err(_) => {
                let _ = s.shutdown(std::net::Shutdown::Both);
                return;
            }
        }
    }
}

fn send_binary(s: &mut TcpStream, payload: &[u8]) -> io::Result<()> {
    if payload.is_empty() {
        return Ok(());
    }
    let mut hdr = [0u8; MAX_SERVER_HEADER];
    let n = encode_header(&mut hdr, OP_BINARY, payload.len() as u64);
    s.write_all(&hdr[..n])?;
    s.write_all(payload)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::recording::{Header, record_head};

    fn init() -> ServerInit {
        ServerInit {
            width: 64,
            height: 48,
            pixel_format: PixelFormat::from_bytes(&[
                32, 24, 0, 1, 0, 255, 0, 255, 0, 255, 16, 8, 0, 0, 0, 0,
            ]),
            name: "desk".into(),
        }
    }

    fn file(server: &[&[u8]]) -> Vec<u8> {
        let mut f = Header {
            flags: 0,
            start_unix_micros: 0,
            session: "s".into(),
        }
        .encode();
        for (i, p) in server.iter().enumerate() {
            f.extend_from_slice(&record_head(
                Kind::VmToBrowser,
                i as u64 * 1000,
                p.len() as u32,
            ));
            f.extend_from_slice(p);
        }
        f
    }

    #[test]
    fn walks_none_and_vnc_auth_handshakes() {
        let mut si = Vec::new();
        init().encode(&mut si);
        // 3.8, None, split oddly across records, the first update in ServerInit's record.
        let mut tail = si.clone();
        tail.extend_from_slice(&[0, 0, 0, 1]);
        let f = file(&[b"RFB 003.008\n", &[1, 1], &[0, 0, 0], &[0], &tail, &[9, 9]]);
        let p = plan(&f).unwrap();
        assert_eq!(p.init, init());
        assert_eq!(p.stream, [0, 0, 0, 1, 9, 9]);
        assert_eq!(p.chunks, vec![(0, 0..4), (1000, 4..6)]);
        // 3.8, VNC auth.
        let mut auth = vec![1, 2];
        auth.extend_from_slice(&[7; 16]);
        auth.extend_from_slice(&[0, 0, 0, 0]);
        auth.extend_from_slice(&si);
        let p = plan(&file(&[b"RFB 003.008\n", &auth, &[5]])).unwrap();
        assert_eq!(p.stream, [5]);
        // Refusals by name.
        let mut failed = vec![1, 2];
        failed.extend_from_slice(&[7; 16]);
        failed.extend_from_slice(&[0, 0, 0, 1]);
        assert_eq!(
            plan(&file(&[b"RFB 003.008\n", &failed])).unwrap_err(),
            PlanError::Refused
        );
        assert_eq!(
            plan(&file(&[b"RFB 003.008\n", &[1, 19]])).unwrap_err(),
            PlanError::Security(19)
        );
        assert_eq!(
            plan(&file(&[b"RFB 003.008\n", &[1, 1]])).unwrap_err(),
            PlanError::NoHandshake
        );
        assert_eq!(
            plan(&file(&[b"HTTP/1.1 200"])).unwrap_err(),
            PlanError::BadVersion
        );
    }

    #[test]
    fn speed() {
        assert_eq!("max".parse::<Speed>(), Ok(Speed::Max));
        assert_eq!("0".parse::<Speed>(), Ok(Speed::Max));
        assert_eq!("2.5".parse::<Speed>(), Ok(Speed::Times(2.5)));
        assert!("-1".parse::<Speed>().is_err());
        assert!("fast".parse::<Speed>().is_err());
    }
}
