//! Test peers shared by the integration tests.

#![allow(dead_code)]
// each test file uses a different subset
// tungstenite's handshake callback returns its own (large) error response type.
#![allow(clippy::result_large_err)]

use std::net::SocketAddr;
use std::sync::{Arc, Mutex};

use futures_util::{SinkExt, StreamExt};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
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
/// client offered (and echoes `binary` back when offered).
pub struct Bridge {
    pub addr: SocketAddr,
    pub offered: Arc<Mutex<Vec<Option<String>>>>,
}

impl Bridge {
    pub fn url(&self) -> String {
        format!("ws://{}/vnc/test", self.addr)
    }
}

pub async fn bridge(mode: BridgeMode) -> Bridge {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let offered = Arc::new(Mutex::new(Vec::new()));
    let seen = Arc::clone(&offered);
    tokio::spawn(async move {
        while let Ok((tcp, _)) = listener.accept().await {
            tokio::spawn(relay(tcp, mode, Arc::clone(&seen)));
        }
    });
    Bridge { addr, offered }
}

async fn relay(tcp: TcpStream, mode: BridgeMode, seen: Arc<Mutex<Vec<Option<String>>>>) {
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
                Message::Close(_) => break,
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
