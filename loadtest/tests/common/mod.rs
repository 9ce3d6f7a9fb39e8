//! Test peers shared by the integration tests.

#![allow(dead_code)]
// each test file uses a different subset
// tungstenite's handshake callback returns its own (large) error response type.
#![allow(clippy::result_large_err)]

use std::net::SocketAddr;
use std::sync::{Arc, Mutex};

use futures_util::{SinkExt, StreamExt};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::tungstenite::handshake::server::{Request, Response};
use tokio_tungstenite::tungstenite::http::header::SEC_WEBSOCKET_PROTOCOL;
use tokio_tungstenite::tungstenite::protocol::CloseFrame;

/// What the bridge does with each WebSocket session.
#[derive(Clone, Copy)]
pub enum BridgeMode {
    /// Relay binary messages to and from the upstream TCP address.
    Relay(SocketAddr),
    /// Complete the upgrade, then close at once with this code and reason (what the gateway
    /// does when the VM cannot be reached).
    Close(u16, &'static str),
}

/// A tiny WebSocket-to-TCP bridge: a test peer standing in for the gateway, so the swarm can
/// be tested against the fake VM without the gateway crate. Records the subprotocol each
/// client offered (and echoes `binary` back when offered) and each client's address.
pub struct Bridge {
    pub addr: SocketAddr,
    pub offered: Arc<Mutex<Vec<Option<String>>>>,
    pub peers: Arc<Mutex<Vec<SocketAddr>>>,
    /// Whether the bridge speaks TLS (wss://).
    pub tls: bool,
}

impl Bridge {
    pub fn url(&self) -> String {
        let scheme = if self.tls { "wss" } else { "ws" };
        format!("{scheme}://{}/vnc/test", self.addr)
    }
}

pub async fn bridge(mode: BridgeMode) -> Bridge {
    serve(mode, None).await
}

/// The same bridge behind TLS, with `cert` (a self-signed certificate for 127.0.0.1 and
/// localhost, see [`self_signed`]): a small tokio-rustls acceptor in front of tungstenite's
/// `accept`.
pub async fn tls_bridge(mode: BridgeMode, cert: &SelfSigned) -> Bridge {
    serve(mode, Some(cert.acceptor())).await
}

async fn serve(mode: BridgeMode, tls: Option<tokio_rustls::TlsAcceptor>) -> Bridge {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let offered = Arc::new(Mutex::new(Vec::new()));
    let peers = Arc::new(Mutex::new(Vec::new()));
    let (seen, met) = (Arc::clone(&offered), Arc::clone(&peers));
    let secure = tls.is_some();
    tokio::spawn(async move {
        while let Ok((tcp, peer)) = listener.accept().await {
            met.lock().unwrap().push(peer);
            let seen = Arc::clone(&seen);
            match tls.clone() {
                None => {
                    tokio::spawn(relay(tcp, mode, seen));
                }
                Some(acceptor) => {
                    tokio::spawn(async move {
                        // A client that rejects our certificate aborts here.
                        if let Ok(tls) = acceptor.accept(tcp).await {
                            relay(tls, mode, seen).await;
                        }
                    });
                }
            }
        }
    });
    Bridge {
        addr,
        offered,
        peers,
        tls: secure,
    }
}

/// A self-signed server certificate and its key, made fresh by rcgen.
pub struct SelfSigned {
    pub cert_pem: String,
    pub key_pem: String,
    cert_der: rustls::pki_types::CertificateDer<'static>,
    key_der: Vec<u8>,
}

/// A self-signed certificate valid for 127.0.0.1 and localhost.
pub fn self_signed() -> SelfSigned {
    let rcgen::CertifiedKey { cert, signing_key } =
        rcgen::generate_simple_self_signed(vec!["127.0.0.1".to_owned(), "localhost".to_owned()])
            .unwrap();
    SelfSigned {
        cert_pem: cert.pem(),
        key_pem: signing_key.serialize_pem(),
        cert_der: cert.der().clone(),
        key_der: signing_key.serialize_der(),
    }
}

impl SelfSigned {
    /// Writes the certificate as PEM to a fresh file (the client's `--ca`).
    pub fn write_pem(&self, name: &str) -> std::path::PathBuf {
        let path = std::env::temp_dir().join(format!(
            "vncgate-loadtest-{}-{name}.pem",
            std::process::id()
        ));
        std::fs::write(&path, &self.cert_pem).unwrap();
        path
    }

    /// Writes the private key as PEM (PKCS#8) to a fresh file (a server's `--tls-key`).
    pub fn write_key_pem(&self, name: &str) -> std::path::PathBuf {
        let path = std::env::temp_dir().join(format!(
            "vncgate-loadtest-{}-{name}.pem",
            std::process::id()
        ));
        std::fs::write(&path, &self.key_pem).unwrap();
        path
    }

    fn acceptor(&self) -> tokio_rustls::TlsAcceptor {
        let key = rustls::pki_types::PrivateKeyDer::Pkcs8(self.key_der.clone().into());
        let config = rustls::ServerConfig::builder_with_provider(Arc::new(
            rustls::crypto::ring::default_provider(),
        ))
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_no_client_auth()
        .with_single_cert(vec![self.cert_der.clone()], key)
        .unwrap();
        tokio_rustls::TlsAcceptor::from(Arc::new(config))
    }
}

async fn relay<S>(tcp: S, mode: BridgeMode, seen: Arc<Mutex<Vec<Option<String>>>>)
where
    S: AsyncRead + AsyncWrite + Unpin,
{
    let record = Arc::clone(&seen);
    let callback = move |req: &Request, mut resp: Response| {
        let offered = req
            .headers()
            .get(SEC_WEBSOCKET_PROTOCOL)
            .map(|v| v.to_str().unwrap().to_owned());
        if offered.as_deref() == Some("binary") {
            resp.headers_mut()
                .insert(SEC_WEBSOCKET_PROTOCOL, "binary".parse().unwrap());
        }
        record.lock().unwrap().push(offered);
        Ok(resp)
    };
    let Ok(mut ws) = tokio_tungstenite::accept_hdr_async(tcp, callback).await else {
        return;
    };
    let upstream = match mode {
        BridgeMode::Close(code, reason) => {
            let _ = ws
                .close(Some(CloseFrame {
                    code: code.into(),
                    reason: reason.into(),
                }))
                .await;
            while let Some(Ok(_)) = ws.next().await {}
            return;
        }
        BridgeMode::Relay(upstream) => upstream,
    };
    let Ok(up) = TcpStream::connect(upstream).await else {
        return;
    };
    let (mut up_rd, mut up_wr) = up.into_split();
    let (mut ws_tx, mut ws_rx) = ws.split();
    let down = async move {
        let mut buf = vec![0u8; 64 * 1024];
        loop {
            match up_rd.read(&mut buf).await {
                Ok(0) | Err(_) => break,
                Ok(n) => {
                    if ws_tx
                        .send(Message::binary(buf[..n].to_vec()))
                        .await
                        .is_err()
                    {
                        return;
                    }
                }
            }
        }
        let _ = ws_tx.close().await;
    };
    let up = async move {
        while let Some(Ok(msg)) = ws_rx.next().await {
            let data = match msg {
                Message::Binary(b) => b,
                // tungstenite queued the reply to the client's close; reading on sends it
                // and then ends the stream: the close handshake a gateway completes.
                _ => continue,
            };
            if up_wr.write_all(&data).await.is_err() {
                break;
            }
        }
        let _ = up_wr.shutdown().await;
    };
    tokio::select! {
        _ = down => {}
        _ = up => {}
    }
}

/// An address nothing listens on (bound, then released).
pub fn dead_addr() -> SocketAddr {
    let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    l.local_addr().unwrap()
}
