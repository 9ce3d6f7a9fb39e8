//! The browser's connection, plain (`ws://`) or TLS (`wss://`, `--tls-cert`), as the session
//! and the relay use it: read, write whole buffers, close without resetting.
//!
//! Under TLS, rustls runs over the worker's non-blocking socket directly (no extra task, no
//! socket pair): ciphertext is read with `recv(2)` into rustls, decrypted in rustls's buffer,
//! and copied once into the caller's pooled buffer; outgoing frames are written whole into
//! rustls (header and payload from the same buffer with headroom, so framing adds no copy),
//! encrypted into its record queue, and sent with one `sendmsg(2)` per batch of records.
//! The records of one WebSocket frame are queued by one synchronous call, under the relay's
//! write gate, so a pong or close frame can never land inside another frame. Either side of
//! the relay may push out records the other queued: the queue is rustls's, in order.

use std::cell::RefCell;
use std::io::{self, Read as _, Write as _};
use std::os::fd::{AsRawFd as _, RawFd};
use std::sync::Arc;
use std::time::Duration;

use monoio::net::TcpStream;
use rustls::{ServerConfig, ServerConnection};

use super::sock;
use crate::sys;

/// The browser's connection.
pub enum Client<'a> {
    Plain(&'a TcpStream),
    /// Boxed: rustls's state is a kilobyte, which a plain session's task should not carry.
    Tls(Box<TlsConn<'a>>),
}

impl Client<'_> {
    /// The TCP socket underneath, for readiness.
    pub fn stream(&self) -> &TcpStream {
        match self {
            Client::Plain(s) => s,
            Client::Tls(t) => t.stream,
        }
    }

    pub fn tls(&self) -> Option<&TlsConn<'_>> {
        match self {
            Client::Plain(_) => None,
            Client::Tls(t) => Some(t),
        }
    }

    /// Reads what is there (waiting for some); `Ok(0)` is the end of the stream.
    pub async fn read(&self, buf: &mut [u8]) -> io::Result<usize> {
        match self {
            Client::Plain(s) => loop {
                match sys::recv(s.as_raw_fd(), buf) {
                    Err(e) if e.kind() == io::ErrorKind::WouldBlock => s.readable(false).await?,
                    r => return r,
                }
            },
            Client::Tls(t) => t.read(buf).await,
        }
    }

    /// Writes all of `buf`. Callers that may race another writer hold the relay's gate.
    pub async fn write_all(&self, buf: &[u8]) -> io::Result<()> {
        match self {
            Client::Plain(s) => sock::write_all(s, buf).await,
            Client::Tls(t) => t.write_all(buf).await,
        }
    }

    /// Ends the connection after the last bytes (TLS: a `close_notify` first), lingering for
    /// the peer's close so that nothing sent is reset away.
    pub async fn linger_close(&self, linger: Duration) {
        if let Client::Tls(t) = self {
            let _ = monoio::time::timeout(linger, t.close_notify()).await;
        }
        sock::linger_close(self.stream(), linger).await;
    }
}

/// Why a TLS handshake did not complete. The names are the `result` label of
/// `vncgate_tls_handshakes_total`.
#[derive(Debug)]
pub enum HandshakeError {
    /// The client closed or reset the connection.
    ClientGone(io::Error),
    /// The first bytes were not a TLS record (plain HTTP to the `wss://` port).
    NotTls,
    Tls(rustls::Error),
}

/// Every `result` of `vncgate_tls_handshakes_total`: `ok`, `timeout`, and each
/// [`HandshakeError::name`].
pub const HANDSHAKE_RESULTS: [&str; 7] = [
    "ok",
    "timeout",
    "client_gone",
    "not_tls",
    "incompatible",
    "client_rejected_certificate",
    "protocol_error",
];

impl HandshakeError {
    pub fn name(&self) -> &'static str {
        use rustls::{AlertDescription as A, Error as E};
        match self {
            HandshakeError::ClientGone(_) => "client_gone",
            HandshakeError::NotTls => "not_tls",
            HandshakeError::Tls(E::PeerIncompatible(_) | E::NoApplicationProtocol) => {
                "incompatible"
            }
            HandshakeError::Tls(E::AlertReceived(
                A::BadCertificate
                | A::UnknownCA
                | A::CertificateUnknown
                | A::CertificateExpired
                | A::UnsupportedCertificate,
            )) => "client_rejected_certificate",
            HandshakeError::Tls(E::AlertReceived(A::HandshakeFailure | A::ProtocolVersion)) => {
                "incompatible"
            }
            HandshakeError::Tls(_) => "protocol_error",
        }
    }
}

impl std::fmt::Display for HandshakeError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            HandshakeError::ClientGone(e) => write!(f, "client left during the TLS handshake: {e}"),
            HandshakeError::NotTls => {
                f.write_str("not a TLS ClientHello (plain HTTP sent to the wss:// port?)")
            }
            HandshakeError::Tls(e) => write!(f, "TLS handshake failed: {e}"),
        }
    }
}

/// rustls over one non-blocking socket.
pub struct TlsConn<'a> {
    stream: &'a TcpStream,
    fd: RawFd,
    conn: RefCell<ServerConnection>,
}

/// The socket as rustls's reader and writer: non-blocking calls, `WouldBlock` when empty
/// or full.
struct Fd(RawFd);

impl io::Read for Fd {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        sys::recv(self.0, buf)
    }
}

impl io::Write for Fd {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        sys::send(self.0, buf, false)
    }

    fn write_vectored(&mut self, bufs: &[io::IoSlice<'_>]) -> io::Result<usize> {
        sys::sendv(self.0, bufs)
    }

    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

fn would_block(e: &io::Error) -> bool {
    e.kind() == io::ErrorKind::WouldBlock
}

/// A TLS record's first byte for a handshake message (RFC 8446 §5.1, `handshake(22)`).
const RECORD_HANDSHAKE: u8 = 22;

impl<'a> TlsConn<'a> {
    pub fn new(stream: &'a TcpStream, cfg: Arc<ServerConfig>) -> Result<Self, rustls::Error> {
        Ok(Self {
            stream,
            fd: stream.as_raw_fd(),
            conn: RefCell::new(ServerConnection::new(cfg)?),
        })
    }

    /// Runs the handshake to completion (the caller bounds it with the handshake timeout).
    /// Plain HTTP is recognised by its first byte and left to the caller to answer in
    /// plain text.
    pub async fn handshake(&self) -> Result<(), HandshakeError> {
        let mut first = [0u8; 1];
        loop {
            match sys::peek(self.fd, &mut first) {
                Ok(0) => {
                    return Err(HandshakeError::ClientGone(
                        io::ErrorKind::UnexpectedEof.into(),
                    ));
                }
                Ok(_) => break,
                Err(e) if would_block(&e) => self
                    .stream
                    .readable(false)
                    .await
                    .map_err(HandshakeError::ClientGone)?,
                Err(e) => return Err(HandshakeError::ClientGone(e)),
            }
        }
        if first[0] != RECORD_HANDSHAKE {
            return Err(HandshakeError::NotTls);
        }
        loop {
            self.flush().await.map_err(HandshakeError::ClientGone)?;
            if !self.conn.borrow().is_handshaking() {
                return Ok(());
            }
            match self.fill().await {
                Ok(true) => {}
                Ok(false) => {
                    return Err(HandshakeError::ClientGone(
                        io::ErrorKind::UnexpectedEof.into(),
                    ));
                }
                Err(Fill::Io(e)) => return Err(HandshakeError::ClientGone(e)),
                Err(Fill::Tls(e)) => return Err(HandshakeError::Tls(e)),
            }
        }
    }

    /// Reads ciphertext from the socket (waiting for some) and processes it. `Ok(false)` at
    /// the end of the TCP stream. On a TLS error rustls has queued an alert: it is sent if
    /// the socket takes it now.
    async fn fill(&self) -> Result<bool, Fill> {
        let n = loop {
            let r = self.conn.borrow_mut().read_tls(&mut Fd(self.fd));
            match r {
                Ok(n) => break n,
                Err(e) if would_block(&e) => self.stream.readable(false).await.map_err(Fill::Io)?,
                Err(e) => return Err(Fill::Io(e)),
            }
        };
        let processed = self.conn.borrow_mut().process_new_packets();
        if let Err(e) = processed {
            self.try_flush();
            return Err(Fill::Tls(e));
        }
        Ok(n > 0)
    }

    /// Sends queued records the socket takes now, without waiting.
    fn try_flush(&self) {
        let mut c = self.conn.borrow_mut();
        while c.wants_write() {
            if c.write_tls(&mut Fd(self.fd)).is_err() {
                return;
            }
        }
    }

    /// Sends every queued record, waiting for the socket as needed.
    pub async fn flush(&self) -> io::Result<()> {
        loop {
            let r = {
                let mut c = self.conn.borrow_mut();
                if !c.wants_write() {
                    return Ok(());
                }
                c.write_tls(&mut Fd(self.fd))
            };
            match r {
                Ok(_) => {}
                Err(e) if would_block(&e) => self.stream.writable(false).await?,
                Err(e) => return Err(e),
            }
        }
    }

    /// Reads decrypted bytes (waiting for some). `Ok(0)`: the client sent `close_notify`.
    /// A TCP close without it is `UnexpectedEof` (a truncation attack or a crashed client).
    pub async fn read(&self, buf: &mut [u8]) -> io::Result<usize> {
        loop {
            let r = self.conn.borrow_mut().reader().read(buf);
            match r {
                Err(e) if would_block(&e) => {}
                r => return r,
            }
            match self.fill().await {
                // At the end, the reader says whether it was clean.
                Ok(_) => {}
                Err(Fill::Io(e)) => return Err(e),
                Err(Fill::Tls(e)) => return Err(io::Error::new(io::ErrorKind::InvalidData, e)),
            }
            // A KeyUpdate or similar needs an answer; the writer side sends what is left.
            self.try_flush();
        }
    }

    /// Encrypts all of `buf` and sends it. rustls takes at most its buffer limit of
    /// ciphertext at a time; the rest goes once the socket has taken some.
    pub async fn write_all(&self, mut buf: &[u8]) -> io::Result<()> {
        while !buf.is_empty() {
            let n = self.conn.borrow_mut().writer().write(buf)?;
            buf = &buf[n..];
            if !buf.is_empty() {
                self.flush().await?;
            }
        }
        self.flush().await
    }

    /// Sends `close_notify` (RFC 8446 §6.1) after everything queued.
    pub async fn close_notify(&self) {
        self.conn.borrow_mut().send_close_notify();
        let _ = self.flush().await;
    }
}

enum Fill {
    Io(io::Error),
    Tls(rustls::Error),
}
