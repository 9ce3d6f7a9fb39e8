//! One client connection over a blocking socket: raw TCP for the direct baseline, or the
//! `ws` core over TCP for the proxies. Both expose the same two calls (read payload, send
//! payload), so every measurement runs unchanged against every proxy.

use std::io::{self, Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::time::Duration;

use crate::ws;

/// Where a route is reached: a TCP address, plus the WebSocket path for proxies.
#[derive(Debug, Clone)]
pub struct Target {
    pub addr: SocketAddr,
    /// `None`: plain TCP (direct). `Some(path)`: WebSocket upgrade to `path`.
    pub ws_path: Option<String>,
}

/// Bounds every blocking call, so a stuck proxy costs seconds, not the run.
pub const IO_TIMEOUT: Duration = Duration::from_secs(5);
const CONNECT_TIMEOUT: Duration = Duration::from_secs(3);

pub struct Conn {
    stream: TcpStream,
    ws: Option<WsState>,
}

struct WsState {
    dec: ws::FrameDecoder,
    rng: Rng,
    /// Data payload that arrived with the handshake answer, reported by the next read.
    carried: u64,
    out: Vec<u8>,
}

/// What one `read` found.
pub enum Read1 {
    /// Payload bytes (possibly 0 when the read held only frame headers or control frames).
    Payload(u64),
    /// The peer closed (EOF or a close frame).
    Closed,
}

impl Conn {
    /// Connects and, for WebSocket targets, completes the upgrade.
    pub fn open(t: &Target, rng_seed: u64) -> io::Result<Conn> {
        let stream = TcpStream::connect_timeout(&t.addr, CONNECT_TIMEOUT)?;
        stream.set_nodelay(true)?;
        stream.set_read_timeout(Some(IO_TIMEOUT))?;
        stream.set_write_timeout(Some(IO_TIMEOUT))?;
        let mut c = Conn { stream, ws: None };
        if let Some(path) = &t.ws_path {
            c.upgrade(t.addr, path, Rng::new(rng_seed))?;
        }
        Ok(c)
    }

    fn upgrade(&mut self, addr: SocketAddr, path: &str, mut rng: Rng) -> io::Result<()> {
        let mut key = [0u8; 16];
        key[..8].copy_from_slice(&rng.next_u64().to_le_bytes());
        key[8..].copy_from_slice(&rng.next_u64().to_le_bytes());
        let key = ws::new_key(key);
        self.stream
            .write_all(ws::upgrade_request(&addr.to_string(), path, &key).as_bytes())?;
        let mut buf = vec![0u8; 4096];
        let mut len = 0;
        loop {
            if len == buf.len() {
                buf.resize(buf.len() * 2, 0);
            }
            let n = self.stream.read(&mut buf[len..])?;
            if n == 0 {
                return Err(io::Error::new(
                    io::ErrorKind::UnexpectedEof,
                    "closed during the upgrade",
                ));
            }
            len += n;
            match ws::check_response(&buf[..len], &key) {
                Ok(None) => continue,
                Ok(Some(head)) => {
                    let mut dec = ws::FrameDecoder::default();
                    let fed = dec.feed(&buf[head..len]).map_err(proto)?;
                    self.ws = Some(WsState {
                        dec,
                        rng,
                        carried: fed.payload,
                        out: Vec::with_capacity(64),
                    });
                    return Ok(());
                }
                Err(e) => return Err(io::Error::other(e.to_string())),
            }
        }
    }

    /// One `read(2)` into `buf`; counts the data payload in it.
    pub fn read_payload(&mut self, buf: &mut [u8]) -> io::Result<Read1> {
        if let Some(ws) = &mut self.ws
            && ws.carried > 0
        {
            return Ok(Read1::Payload(std::mem::take(&mut ws.carried)));
        }
        let n = self.stream.read(buf)?;
        if n == 0 {
            return Ok(Read1::Closed);
        }
        match &mut self.ws {
            None => Ok(Read1::Payload(n as u64)),
            Some(ws) => {
                let fed = ws.dec.feed(&buf[..n]).map_err(proto)?;
                if fed.closed && fed.payload == 0 {
                    Ok(Read1::Closed)
                } else {
                    Ok(Read1::Payload(fed.payload))
                }
            }
        }
    }

    /// Reads until `want` payload bytes arrived (they may come split across frames).
    pub fn read_exact_payload(&mut self, want: u64, buf: &mut [u8]) -> io::Result<()> {
        let mut got = 0;
        while got < want {
            match self.read_payload(buf)? {
                Read1::Payload(n) => got += n,
                Read1::Closed => {
                    return Err(io::Error::new(
                        io::ErrorKind::UnexpectedEof,
                        "peer closed mid round trip",
                    ));
                }
            }
        }
        Ok(())
    }

    /// Sends `payload` as one masked binary frame (or raw bytes for direct), in one write.
    pub fn send_payload(&mut self, payload: &[u8]) -> io::Result<()> {
        match &mut self.ws {
            None => self.stream.write_all(payload),
            Some(ws) => {
                ws.out.clear();
                let mask = ws.rng.next_u64().to_le_bytes();
                ws::encode_masked(
                    ws::OP_BINARY,
                    payload,
                    mask[..4].try_into().unwrap(),
                    &mut ws.out,
                );
                self.stream.write_all(&ws.out)
            }
        }
    }

    /// Closes politely enough for a benchmark: a close frame (status 1000) for WebSocket,
    /// then FIN. The bench does not wait for the peer's close frame.
    pub fn close(mut self) {
        if let Some(ws) = &mut self.ws {
            ws.out.clear();
            let mask = ws.rng.next_u64().to_le_bytes();
            ws::encode_masked(
                ws::OP_CLOSE,
                &1000u16.to_be_bytes(),
                mask[..4].try_into().unwrap(),
                &mut ws.out,
            );
            let _ = self.stream.write_all(&ws.out);
        }
        let _ = self.stream.shutdown(std::net::Shutdown::Write);
    }
}

fn proto(e: ws::FrameError) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidData, e.to_string())
}

/// xorshift64*: masking keys and handshake keys only need to be unpredictable to a proxy,
/// not cryptographic, and must cost nothing per frame.
pub struct Rng(u64);

impl Rng {
    pub fn new(seed: u64) -> Rng {
        Rng(seed | 1)
    }

    pub fn next_u64(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }
}

/// A per-process random seed (std's `RandomState` is seeded from the OS).
pub fn random_seed() -> u64 {
    use std::hash::{BuildHasher, Hasher};
    let mut h = std::collections::hash_map::RandomState::new().build_hasher();
    h.write_u64(
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_nanos() as u64)
            .unwrap_or(0),
    );
    h.finish()
}
