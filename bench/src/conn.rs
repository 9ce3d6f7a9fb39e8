//! One client connection over a blocking socket: raw TCP for the direct baseline, or the
//! `ws` core over TCP for the proxies, or over rustls for `wss://` (`vncgate-tls`). All
//! expose the same two calls (read payload, send payload), so every measurement runs
//! unchanged against every proxy.
//!
//! TLS is a variant of [`Stream`], not a different client: the plaintext path does what it
//! did before (the same syscalls, the same buffers), plus one branch on the variant per
//! call.

use std::io::{self, BufReader, Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::sync::Arc;
use std::time::Duration;

use rustls::{ClientConnection, StreamOwned};
use rustls_pki_types::ServerName;

use crate::tls::ClientTls;
use crate::ws;

/// Where a route is reached: a TCP address, plus the WebSocket path for proxies.
#[derive(Debug, Clone)]
pub struct Target {
    pub addr: SocketAddr,
    /// `None`: plain TCP (direct). `Some(path)`: WebSocket upgrade to `path`.
    pub ws_path: Option<String>,
    /// `Some`: TLS first (`wss://` with a path), server name = the address's IP.
    pub tls: Option<Arc<ClientTls>>,
}

impl Target {
    /// A plain TCP target (direct) or, with a path, a `ws://` one.
    pub fn plain(addr: SocketAddr, ws_path: Option<&str>) -> Target {
        Target {
            addr,
            ws_path: ws_path.map(str::to_owned),
            tls: None,
        }
    }

    /// The target's URL, for the load tool's idle mode (`ws://` or `wss://`).
    pub fn url(&self) -> Option<String> {
        let scheme = if self.tls.is_some() { "wss" } else { "ws" };
        Some(format!(
            "{scheme}://{}{}",
            self.addr,
            self.ws_path.as_ref()?
        ))
    }
}

/// Bounds every blocking call, so a stuck proxy costs seconds, not the run.
pub const IO_TIMEOUT: Duration = Duration::from_secs(5);
const CONNECT_TIMEOUT: Duration = Duration::from_secs(3);

pub struct Conn {
    stream: Stream,
    ws: Option<WsState>,
}

/// The byte stream under the WebSocket framing.
enum Stream {
    Tcp(TcpStream),
    /// Boxed: rustls' connection state is a few hundred bytes inline (its buffers are on
    /// the heap either way), which the plaintext variant should not carry.
    Tls(Box<StreamOwned<ClientConnection, TlsSock>>),
}

impl Stream {
    fn tcp(&self) -> &TcpStream {
        match self {
            Stream::Tcp(s) => s,
            Stream::Tls(s) => s.get_ref().0.get_ref(),
        }
    }
}

/// Bytes read from the socket at once under rustls. rustls asks its transport for about
/// 4 KiB per read (its deframer's read size), so straight over the socket a TLS client would
/// make some 60 `read(2)` calls where the plaintext one makes one 256 KiB read, and that
/// client cost, on the cores the gateway shares, would be charged to TLS. A browser's TLS
/// stack reads in bulk too. 64 KiB: four full records, and under malloc's mmap threshold, so
/// the upgrades point's connections do not each map and unmap it.
const TLS_READ_BUF: usize = 64 * 1024;

/// The socket under rustls: reads through a [`TLS_READ_BUF`] buffer, writes straight.
struct TlsSock(BufReader<TcpStream>);

impl Read for TlsSock {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        self.0.read(buf)
    }
}

impl Write for TlsSock {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        self.0.get_mut().write(buf)
    }

    fn flush(&mut self) -> io::Result<()> {
        self.0.get_mut().flush()
    }
}

impl Read for Stream {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        match self {
            Stream::Tcp(s) => s.read(buf),
            Stream::Tls(s) => s.read(buf),
        }
    }
}

impl Write for Stream {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        match self {
            Stream::Tcp(s) => s.write(buf),
            Stream::Tls(s) => s.write(buf),
        }
    }

    fn write_all(&mut self, buf: &[u8]) -> io::Result<()> {
        match self {
            Stream::Tcp(s) => s.write_all(buf),
            // One record for the whole buffer (a frame), then flushed to the socket.
            Stream::Tls(s) => s.write_all(buf).and_then(|()| s.flush()),
        }
    }

    fn flush(&mut self) -> io::Result<()> {
        match self {
            Stream::Tcp(s) => s.flush(),
            Stream::Tls(s) => s.flush(),
        }
    }
}

/// What was negotiated on a TLS connection, for the record of a run.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TlsInfo {
    /// E.g. `TLSv1_3`.
    pub version: String,
    /// E.g. `TLS13_AES_256_GCM_SHA384`.
    pub cipher_suite: String,
    /// E.g. `X25519`.
    pub key_exchange: String,
    /// Whether the handshake was a full one (`Full`) or a resumption.
    pub handshake: String,
}

impl std::fmt::Display for TlsInfo {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "{}, {}, {}, {} handshake",
            self.version, self.cipher_suite, self.key_exchange, self.handshake
        )
    }
}

struct WsState {
    dec: ws::FrameDecoder,
    rng: Rng,
    /// Data payload that arrived with the handshake answer, reported by the next read.
    carried: u64,
    out: Vec<u8>,
}

impl WsState {
    /// One masked client frame of `op` carrying `payload`, encoded into `out` (its old
    /// contents replaced) with a fresh mask; returns the bytes to write.
    fn frame(&mut self, op: u8, payload: &[u8]) -> &[u8] {
        self.out.clear();
        let mask = self.rng.next_u64().to_le_bytes();
        ws::encode_masked(op, payload, mask[..4].try_into().unwrap(), &mut self.out);
        &self.out
    }
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
        let tcp = TcpStream::connect_timeout(&t.addr, CONNECT_TIMEOUT)?;
        tcp.set_nodelay(true)?;
        tcp.set_read_timeout(Some(IO_TIMEOUT))?;
        tcp.set_write_timeout(Some(IO_TIMEOUT))?;
        let stream = match &t.tls {
            None => Stream::Tcp(tcp),
            Some(tls) => Stream::Tls(Box::new(handshake(tls, t.addr, tcp)?)),
        };
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

    /// What the TLS handshake negotiated; `None` for plaintext.
    pub fn tls_info(&self) -> Option<TlsInfo> {
        let Stream::Tls(s) = &self.stream else {
            return None;
        };
        let c = &s.conn;
        let name = |o: Option<String>| o.unwrap_or_else(|| "?".to_owned());
        Some(TlsInfo {
            version: name(c.protocol_version().map(|v| format!("{v:?}"))),
            cipher_suite: name(
                c.negotiated_cipher_suite()
                    .map(|s| format!("{:?}", s.suite())),
            ),
            key_exchange: name(
                c.negotiated_key_exchange_group()
                    .map(|g| format!("{:?}", g.name())),
            ),
            handshake: name(c.handshake_kind().map(|k| format!("{k:?}"))),
        })
    }

    /// One `read(2)` into `buf` (for TLS: what rustls decrypted from one or more reads);
    /// counts the data payload in it.
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
            Some(ws) => self.stream.write_all(ws.frame(ws::OP_BINARY, payload)),
        }
    }

    /// The client's end of the connection.
    pub fn local_addr(&self) -> io::Result<SocketAddr> {
        self.stream.tcp().local_addr()
    }

    /// Closes politely enough for a benchmark: a close frame (status 1000) for WebSocket,
    /// for TLS a close_notify alert, then FIN. The bench does not wait for the peer's close
    /// frame.
    pub fn close(mut self) {
        if let Some(ws) = &mut self.ws {
            let _ = self
                .stream
                .write_all(ws.frame(ws::OP_CLOSE, &1000u16.to_be_bytes()));
        }
        if let Stream::Tls(s) = &mut self.stream {
            s.conn.send_close_notify();
            let _ = s.flush();
        }
        let _ = self.stream.tcp().shutdown(std::net::Shutdown::Write);
    }
}

impl Conn {
    /// The clean close, waited for: for WebSocket a close frame (status 1000), then reads
    /// (payload still in flight is dropped) until the server's close frame, then (for TLS
    /// close_notify and) FIN; for direct TCP, one byte ([`CLOSE_REQUEST`](crate::targets::CLOSE_REQUEST)) and then the
    /// server's FIN, then ours. An error when the peer ends the connection without its close
    /// frame. Unlike [`Conn::close`], the peer has seen a complete close handshake when this
    /// returns, so a proxy counts a browser that closed, not one that vanished.
    ///
    /// Either way the server sends the first FIN, so TIME-WAIT stays on its side, as
    /// RFC 6455 §7.1.1 has it for WebSocket. A direct client sending the first FIN would
    /// hold every port it used for a minute; past about 14,000 cycles per second to one
    /// address, connect(2) then waits for a port (the first-byte p99 was 60 ms), and the
    /// baseline measured the port range, not the path.
    pub fn close_handshake(mut self, buf: &mut [u8]) -> io::Result<()> {
        let Some(ws) = &mut self.ws else {
            self.stream.write_all(&[crate::targets::CLOSE_REQUEST])?;
            while self.stream.read(buf)? > 0 {}
            self.stream.tcp().shutdown(std::net::Shutdown::Write)?;
            return Ok(());
        };
        self.stream
            .write_all(ws.frame(ws::OP_CLOSE, &1000u16.to_be_bytes()))?;
        loop {
            let n = self.stream.read(buf)?;
            if n == 0 {
                return Err(io::Error::new(
                    io::ErrorKind::UnexpectedEof,
                    "the proxy ended the connection without a close frame",
                ));
            }
            if ws.dec.feed(&buf[..n]).map_err(proto)?.closed {
                break;
            }
        }
        if let Stream::Tls(s) = &mut self.stream {
            s.conn.send_close_notify();
            let _ = s.flush();
        }
        let _ = self.stream.tcp().shutdown(std::net::Shutdown::Write);
        Ok(())
    }
}

/// The TLS handshake over a connected socket, driven to its end here, so that its cost
/// falls in [`Conn::open`] (timed by the upgrades point, outside the window elsewhere) and
/// a failure says it was the handshake.
fn handshake(
    tls: &ClientTls,
    addr: SocketAddr,
    tcp: TcpStream,
) -> io::Result<StreamOwned<ClientConnection, TlsSock>> {
    let name = ServerName::IpAddress(addr.ip().into());
    let conn = ClientConnection::new(Arc::clone(&tls.config), name)
        .map_err(|e| io::Error::other(format!("TLS setup: {e}")))?;
    let sock = TlsSock(BufReader::with_capacity(TLS_READ_BUF, tcp));
    let mut s = StreamOwned::new(conn, sock);
    while s.conn.is_handshaking() {
        s.conn
            .complete_io(&mut s.sock)
            .map_err(|e| io::Error::new(e.kind(), format!("TLS handshake: {e}")))?;
    }
    Ok(s)
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::tls;
    use rustls_pki_types::pem::PemObject as _;
    use rustls_pki_types::{CertificateDer, PrivateKeyDer};
    use std::net::TcpListener;

    /// A TLS echo server on 127.0.0.1:0 with the certificate of `cert` (read from its PEM
    /// files, as vncgate reads them), answering `conns` connections one after another.
    fn tls_echo(cert: &tls::BenchCert, conns: usize) -> SocketAddr {
        let chain = CertificateDer::pem_file_iter(&cert.cert_pem)
            .unwrap()
            .collect::<Result<Vec<_>, _>>()
            .unwrap();
        let key = PrivateKeyDer::from_pem_file(&cert.key_pem).unwrap();
        let config = rustls::ServerConfig::builder_with_provider(Arc::new(
            rustls::crypto::ring::default_provider(),
        ))
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_no_client_auth()
        .with_single_cert(chain, key)
        .unwrap();
        let config = Arc::new(config);
        let l = TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = l.local_addr().unwrap();
        std::thread::spawn(move || {
            for _ in 0..conns {
                let Ok((sock, _)) = l.accept() else { return };
                let conn = rustls::ServerConnection::new(Arc::clone(&config)).unwrap();
                let mut s = StreamOwned::new(conn, sock);
                let mut buf = [0u8; 1024];
                // Echo until the client's close_notify (Ok(0)) or a failed handshake.
                while let Ok(n @ 1..) = s.read(&mut buf) {
                    if s.write_all(&buf[..n]).and_then(|()| s.flush()).is_err() {
                        break;
                    }
                }
            }
        });
        addr
    }

    #[test]
    fn tls_round_trips_and_every_handshake_is_full() {
        let d = std::env::temp_dir().join(format!("vncgate-bench-conn-tls-{}", std::process::id()));
        let cert = tls::generate(&d).unwrap();
        let addr = tls_echo(&cert, 2);
        let t = Target {
            tls: Some(Arc::new(cert.client.clone())),
            ..Target::plain(addr, None)
        };
        for seed in [1, 2] {
            let mut c = Conn::open(&t, seed).unwrap();
            let info = c.tls_info().unwrap();
            // The server issues TLS 1.3 tickets: a second handshake that resumed one would
            // say so here.
            assert_eq!(info.handshake, "Full", "{info}");
            assert_eq!(info.version, "TLSv1_3");
            let mut buf = [0u8; 64];
            for _ in 0..3 {
                c.send_payload(b"0123456789abcdef").unwrap();
                c.read_exact_payload(16, &mut buf).unwrap();
            }
            // Larger than a record and than the read buffer: every byte comes back.
            let big: Vec<u8> = (0..2 * TLS_READ_BUF + 7).map(|i| i as u8).collect();
            c.send_payload(&big).unwrap();
            c.read_exact_payload(big.len() as u64, &mut vec![0u8; 256 * 1024])
                .unwrap();
            c.close();
        }
        let _ = std::fs::remove_dir_all(&d);
    }

    #[test]
    fn a_server_with_another_certificate_fails_the_handshake_by_name() {
        let d = std::env::temp_dir().join(format!("vncgate-bench-conn-bad-{}", std::process::id()));
        let server = tls::generate(&d.join("server")).unwrap();
        let other = tls::generate(&d.join("other")).unwrap();
        let addr = tls_echo(&server, 1);
        let t = Target {
            tls: Some(Arc::new(other.client.clone())),
            ..Target::plain(addr, None)
        };
        let e = Conn::open(&t, 1).err().expect("an untrusted certificate");
        let e = e.to_string();
        // rcgen gives every self-signed certificate the same name, so the other root looks
        // like the issuer and its signature fails (BadSignature) rather than UnknownIssuer.
        assert!(
            e.starts_with("TLS handshake: invalid peer certificate: "),
            "{e}"
        );
        let _ = std::fs::remove_dir_all(&d);
    }

    #[test]
    fn urls_say_ws_or_wss() {
        let addr: SocketAddr = "127.0.0.1:8080".parse().unwrap();
        assert_eq!(Target::plain(addr, None).url(), None);
        let t = Target::plain(addr, Some("/vnc/idle"));
        assert_eq!(t.url().as_deref(), Some("ws://127.0.0.1:8080/vnc/idle"));
        let d = std::env::temp_dir().join(format!("vncgate-bench-conn-url-{}", std::process::id()));
        let cert = tls::generate(&d).unwrap();
        let t = Target {
            tls: Some(Arc::new(cert.client)),
            ..t
        };
        assert_eq!(t.url().as_deref(), Some("wss://127.0.0.1:8080/vnc/idle"));
        let _ = std::fs::remove_dir_all(&d);
    }
}
