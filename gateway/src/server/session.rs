//! One client connection from accept to close: read and validate the upgrade request,
//! look up and authorize the route, answer 101, dial the VM, relay, close by name.
//!
//! Failures before the upgrade are HTTP statuses. After it, every failure is a WebSocket
//! close with a code and reason from [`crate::close`], because a browser sees only 1006
//! when a handshake fails. Each ending is logged once with the session id and counted.

use std::io;
use std::net::SocketAddr;
use std::os::fd::AsRawFd;
use std::rc::Rc;
use std::time::{Duration, Instant, SystemTime};

use monoio::net::TcpStream;

use super::relay::{End, Relay, linger_close, write_all};
use super::worker::Worker;
use crate::close::{self, Blame, CloseCause};
use crate::metrics as m;
use crate::route::{Denied, RouteSource};
use crate::sys;
use crate::ws::frame::ControlFrame;
use crate::ws::handshake::{self, Parsed, Reject, UpgradeRequest};

/// Why the upgrade request could not be read.
enum HeadError {
    Reject(Reject),
    /// The client went away or the socket failed mid-request.
    Io(io::Error),
}

/// `handed_off`: another worker accepted the connection and moved it here (see
/// `server::balance`); the ending's log line says so.
pub async fn serve<S: RouteSource>(
    w: Rc<Worker<S>>,
    stream: TcpStream,
    peer: SocketAddr,
    handed_off: bool,
) {
    let _held = w.adopt_connection();
    let fd = stream.as_raw_fd();
    if let Err(e) = sys::set_nonblocking(fd) {
        tracing::warn!(%peer, error = %e, "cannot make socket non-blocking");
        return;
    }
    let _ = stream.set_nodelay(true);
    let mut head = Vec::new();
    let read = monoio::time::timeout(
        w.limits.handshake_timeout,
        read_head(&stream, &mut head, &w.handshake),
    )
    .await;
    let req = match read {
        Ok(Ok(req)) => req,
        Ok(Err(HeadError::Reject(r))) => {
            reject(&stream, peer, None, r.status(), r.reason(), &r.response()).await;
            return;
        }
        Ok(Err(HeadError::Io(e))) => {
            metrics::counter!(m::HANDSHAKE_REJECTED, "status" => "none", "reason" => "client_gone")
                .increment(1);
            tracing::debug!(%peer, error = %e, "client left during the handshake");
            return;
        }
        Err(_) => {
            let body = handshake::error_response(408, "upgrade request not received in time", "");
            reject(&stream, peer, None, 408, "handshake timeout", &body).await;
            return;
        }
    };
    // Bytes the client sent right behind its request (rare): kept, and the head's buffer
    // released, so an established session holds no handshake memory.
    let early = head[req.consumed..].to_vec();
    drop(head);
    let id = req.session_id.clone();

    let route = match w.routes.lookup(&id).await {
        Ok(Some(r)) => r,
        Ok(None) => {
            let body = handshake::error_response(404, "unknown session", "");
            reject(&stream, peer, Some(&id), 404, "unknown session", &body).await;
            return;
        }
        Err(e) => {
            // The status line's reason and the metric label name the failure: "redis
            // unavailable", "redis lookup timed out", "route record invalid"...
            let body = handshake::error_response(503, e.0, "Retry-After: 1\r\n");
            tracing::warn!(session = %id, error = %e, "route lookup failed");
            reject(&stream, peer, Some(&id), 503, e.0, &body).await;
            return;
        }
    };
    match route.authorize(req.token.as_ref()) {
        Ok(()) => {}
        Err(Denied::MissingToken) => {
            let body = handshake::error_response(
                401,
                "token required",
                "WWW-Authenticate: Bearer realm=\"vncgate\"\r\n",
            );
            reject(&stream, peer, Some(&id), 401, "token required", &body).await;
            return;
        }
        Err(Denied::BadToken) => {
            let body = handshake::error_response(403, "invalid token", "");
            reject(&stream, peer, Some(&id), 403, "invalid token", &body).await;
            return;
        }
    }
    if w.draining.get() {
        let body = handshake::error_response(503, "gateway draining", "Retry-After: 1\r\n");
        reject(&stream, peer, Some(&id), 503, "gateway draining", &body).await;
        return;
    }
    if w.session_count() >= w.limits.max_sessions_per_worker {
        let body = handshake::error_response(503, "gateway at capacity", "Retry-After: 1\r\n");
        reject(&stream, peer, Some(&id), 503, "gateway at capacity", &body).await;
        return;
    }

    // The upgrade. From here on, failures are close codes.
    let ok = handshake::switching_protocols(&req.accept, req.protocol);
    if let Err(e) = write_all(&stream, &ok).await {
        tracing::debug!(session = %id, %peer, error = %e, "client left before the 101");
        return;
    }
    let ctl = w.register(&id);
    metrics::counter!(m::SESSIONS_OPENED).increment(1);
    let started = Instant::now();
    drop(req);

    ctl.expires.set(
        route
            .time_left(SystemTime::now())
            .map(|left| Instant::now() + left),
    );
    let viewer_limit = route.max_viewers.unwrap_or(w.limits.max_viewers);
    // Held until the session is unregistered: the slot counts against the viewer limit.
    let mut viewer = None;
    let (end, to_browser, to_vm, close_sent) = if ctl
        .expires
        .get()
        .is_some_and(|t| t <= Instant::now())
    {
        close_before_relay(&stream, close::SESSION_EXPIRED).await
    } else if !w.policy.allows(&route.upstream) {
        // A route pointing outside the allowed networks is a poisoned or mistaken route:
        // never dialed, and loud in the log (the VM address stays out of the close reason).
        tracing::error!(session = %id, upstream = %route.upstream, "route upstream outside --allow-upstream; refusing to dial");
        close_before_relay(&stream, close::UPSTREAM_FORBIDDEN).await
    } else if let Some(slot) = w.viewers().try_join(&id, viewer_limit) {
        viewer = Some(slot);
        let dial = monoio::select! {
            r = connect_upstream(&w, route.upstream, &id) => r,
            c = ctl.kill.wait() => Err(c),
        };
        match dial {
            Err(cause) => close_before_relay(&stream, cause).await,
            Ok(upstream) => {
                let relay = Relay::new(&w, &id, &stream, &upstream);
                let (end, deadline) = relay.run(&ctl.kill, &ctl.expires, &early).await;
                let close_sent = relay.finish(end, deadline).await;
                (end, relay.to_browser.get(), relay.to_vm.get(), close_sent)
            }
        }
    } else {
        tracing::info!(session = %id, limit = viewer_limit, "viewer limit reached");
        close_before_relay(&stream, close::TOO_MANY_VIEWERS).await
    };
    w.unregister(&ctl);
    drop(viewer);
    let (code, cause, blame) = match end {
        End::Cause(c) => (c.code, c.name, c.blame),
        End::ClientClose(code) => (code.unwrap_or(1005), "browser_close", Blame::Browser),
        End::ClientGone(_) => (1006, "browser_gone", Blame::Browser),
    };
    metrics::counter!(m::SESSIONS_CLOSED, "code" => code.to_string(), "cause" => cause, "blame" => blame.as_str())
        .increment(1);
    let detail = match end {
        End::Cause(c) => c.reason,
        End::ClientClose(_) => "browser closed",
        End::ClientGone(why) => why,
    };
    tracing::info!(
        session = %id,
        %peer,
        worker = w.index,
        handed_off,
        code,
        cause,
        blame = blame.as_str(),
        detail,
        secs = started.elapsed().as_secs_f64(),
        to_browser,
        to_vm,
        close_sent,
        "session closed"
    );
}

/// Reads until the request head is complete, rejected, or the client leaves.
async fn read_head(
    stream: &TcpStream,
    head: &mut Vec<u8>,
    cfg: &handshake::HandshakeConfig,
) -> Result<UpgradeRequest, HeadError> {
    let fd = stream.as_raw_fd();
    loop {
        // Read into the Vec's tail (no stack buffer inside the session's future), never
        // past the limit plus one byte, to tell "at the limit" from "over".
        let have = head.len();
        let room = (cfg.max_header_bytes + 1)
            .saturating_sub(have)
            .clamp(1, 2048);
        head.resize(have + room, 0);
        let r = sys::recv(fd, &mut head[have..]);
        head.truncate(have + *r.as_ref().unwrap_or(&0));
        match r {
            Ok(0) => return Err(HeadError::Io(io::ErrorKind::UnexpectedEof.into())),
            Ok(_) => {}
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                stream.readable(false).await.map_err(HeadError::Io)?;
                continue;
            }
            Err(e) => return Err(HeadError::Io(e)),
        }
        match handshake::parse_request(head, cfg) {
            Ok(Parsed::Partial) => continue,
            Ok(Parsed::Upgrade(u)) => return Ok(u),
            Err(r) => return Err(HeadError::Reject(r)),
        }
    }
}

/// Answers a refused upgrade with its HTTP error, counted and logged (with the session id
/// once the path named one), then closes without resetting the response away.
async fn reject(
    stream: &TcpStream,
    peer: SocketAddr,
    session: Option<&str>,
    status: u16,
    reason: &'static str,
    body: &[u8],
) {
    metrics::counter!(m::HANDSHAKE_REJECTED, "status" => status.to_string(), "reason" => reason)
        .increment(1);
    tracing::info!(session = session.unwrap_or("-"), %peer, status, reason, "upgrade refused");
    if write_all(stream, body).await.is_ok() {
        linger_close(stream, Duration::from_secs(1)).await;
    }
}

/// Closes an upgraded connection that never reached the relay.
async fn close_before_relay(stream: &TcpStream, cause: CloseCause) -> (End, u64, u64, bool) {
    let frame = ControlFrame::close(Some(cause.code), cause.reason);
    let sent = write_all(stream, frame.as_bytes()).await.is_ok();
    if sent {
        linger_close(stream, Duration::from_secs(2)).await;
    }
    (End::Cause(cause), 0, 0, sent)
}

/// Dials the VM, retrying refusals and timeouts with backoff inside the retry window (a VM
/// still booting refuses its VNC port for a while).
async fn connect_upstream<S: RouteSource>(
    w: &Worker<S>,
    addr: SocketAddr,
    session: &str,
) -> Result<TcpStream, CloseCause> {
    let l = &w.limits;
    let start = Instant::now();
    let mut backoff = Duration::from_millis(50);
    loop {
        let err = match monoio::time::timeout(l.connect_timeout, TcpStream::connect_addr(addr))
            .await
        {
            Ok(Ok(s)) => {
                metrics::histogram!(m::UPSTREAM_CONNECT_SECONDS)
                    .record(start.elapsed().as_secs_f64());
                if let Err(e) = sys::set_nonblocking(s.as_raw_fd()) {
                    tracing::error!(session, error = %e, "cannot make upstream socket non-blocking");
                    return Err(close::INTERNAL);
                }
                let _ = s.set_nodelay(true);
                if let Some(cc) = &w.congestion {
                    // Set once connected: the handshake is a few packets either way, and
                    // an algorithm that was accepted by the startup probe is not refused
                    // here; should it be, the session still works on the host's default.
                    if let Err(e) = sys::set_congestion(s.as_raw_fd(), cc) {
                        tracing::debug!(session, error = %e, "cannot set the upstream's congestion control");
                    }
                }
                return Ok(s);
            }
            Ok(Err(e)) => e,
            Err(_) => io::ErrorKind::TimedOut.into(),
        };
        let cause = close::connect_failure(&err);
        if start.elapsed() + backoff > l.connect_retry_window {
            tracing::warn!(session, error = %err, cause = cause.name, "upstream connect failed");
            return Err(cause);
        }
        metrics::counter!(m::UPSTREAM_RETRIES, "cause" => cause.name).increment(1);
        tracing::debug!(session, error = %err, "upstream not ready; retrying");
        monoio::time::sleep(backoff).await;
        backoff = (backoff * 2).min(Duration::from_secs(1));
    }
}
