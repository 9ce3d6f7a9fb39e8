//! One client connection from accept to close: read the upgrade request, ask
//! [`crate::admission`] for its fate (with the route lookup's answer), carry the decision out
//! (refuse, or answer 101 and close at once, or dial the VM and relay), close by name. The
//! connection passes admission, then the relay, once each.
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

use super::client::{Client, HandshakeError, TlsConn};
use super::relay::{End, Relay};
use super::signal::Signal;
use super::worker::Worker;
use crate::admission::{self, Decision, Refusal};
use crate::close::{self, Blame, CloseCause};
use crate::metrics as m;
use crate::route::{Role, RouteSource};
use crate::sys;
use vncgate_ws::frame::ControlFrame;
use vncgate_ws::handshake::{self, Parsed, PlainRequest, Reject};

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
    // Non-blocking since the accept (`sys::accept`), as the relay's own syscalls need.
    let _ = stream.set_nodelay(true);
    // One deadline for a PROXY header, the TLS handshake and the upgrade request together.
    let deadline = Instant::now() + w.limits.handshake_timeout;
    let peer = match &w.proxy {
        None => peer,
        Some(trusted) => {
            let within = w.limits.handshake_timeout;
            match super::proxy_header::read(&stream, peer, trusted, within).await {
                Some(client) => client,
                None => return,
            }
        }
    };
    let client = match &w.tls {
        None => Client::Plain(&stream),
        Some(cfg) => {
            match start_tls(&stream, peer, cfg.clone(), deadline, w.tls_accepts_plain).await {
                Started::Tls(t) => Client::Tls(t),
                Started::Plain => Client::Plain(&stream),
                Started::Ended => return,
            }
        }
    };
    let stream = &client;
    let dynamic = w.dynamic();
    let mut head = Vec::new();
    let read = monoio::time::timeout_at(
        deadline.into(),
        read_head(stream, &mut head, &dynamic.handshake),
    )
    .await;
    let req = match read {
        Ok(Ok(Parsed::Upgrade(req))) => req,
        Ok(Ok(Parsed::Plain(p))) => return serve_file(&w, stream, peer, &p).await,
        Ok(Ok(Parsed::Partial)) => unreachable!("read_head reads until the head is complete"),
        Ok(Err(HeadError::Reject(r))) => {
            return refuse(stream, peer, None, Refusal::from_reject(r)).await;
        }
        Ok(Err(HeadError::Io(e))) => {
            metrics::counter!(m::HANDSHAKE_REJECTED, "status" => "none", "reason" => admission::CLIENT_GONE, "blame" => Blame::Browser.as_str())
                .increment(1);
            tracing::debug!(%peer, error = %e, "client left during the handshake");
            return;
        }
        Err(_) => return refuse(stream, peer, None, admission::HANDSHAKE_TIMEOUT).await,
    };
    // Bytes the client sent right behind its request (rare): kept, and the head's buffer
    // released, so an established session holds no handshake memory.
    let early = head[req.consumed..].to_vec();
    drop(head);
    let session_id =
        match crate::websockify::session_of(w.session_from, &req.session_id, req.token.as_ref()) {
            Ok(id) => id,
            Err(r) => return refuse(stream, peer, None, r).await,
        };
    let ask = match admission::ask(&session_id, req.token.as_ref()) {
        Ok(a) => a,
        Err(r) => {
            let named = (r != admission::INVALID_SESSION_ID).then_some(&*session_id);
            return refuse(stream, peer, named, r).await;
        }
    };
    let id = ask.session_id.as_str();
    let lookup = w.lookup(id).await;
    if let Err(e) = &lookup {
        tracing::warn!(session = %id, error = %e, "route lookup failed");
    }
    let gate = admission::Gate {
        draining: w.draining.get(),
        sessions: w.session_count(),
        max_sessions: w.limits.max_sessions_per_worker,
        default_max_viewers: w.limits.max_viewers,
        policy: &dynamic.policy,
        now: SystemTime::now(),
    };
    let route = match &lookup {
        Ok(r) => Ok(r.as_deref()),
        Err(e) => Err(*e),
    };
    let decision = admission::decide(&ask, route, &gate);
    if let Decision::Refuse(r) = decision {
        // A token file names no session: what was not found is the token.
        let r = if r == admission::UNKNOWN_SESSION
            && w.session_from == crate::websockify::SessionFrom::Tokens
        {
            crate::websockify::UNKNOWN_TOKEN
        } else {
            r
        };
        return refuse(stream, peer, Some(id), r).await;
    }

    // The upgrade. From here on, failures are close codes.
    let ok = handshake::switching_protocols(&req.accept, req.protocol);
    drop(req);
    let view_only = matches!(&decision, Decision::Admit(a) if a.role == Role::ViewOnly);
    let ctl = w.register(id);
    if let (true, Ok(Some(r))) = (view_only, &lookup) {
        ctl.view_token.set(r.view_token_digest);
    }
    // Held until the session is unregistered: the slot counts against the viewer limit.
    let mut viewer = None;
    // For the log only, never the close reason: operators need to know which VM.
    let upstream = match &decision {
        Decision::Admit(a) => Some(a.upstream),
        _ => None,
    };
    let next = match decision {
        Decision::Refuse(_) => unreachable!("refused above"),
        Decision::Close(cause) => {
            if cause == close::UPSTREAM_FORBIDDEN {
                // A poisoned or mistaken route: never dialed, and loud in the log (the VM
                // address stays out of the close reason).
                if let Ok(Some(r)) = &lookup {
                    tracing::error!(session = %id, upstream = %r.upstream, "route upstream outside --allow-upstream; refusing to dial");
                }
            }
            Next::Close(cause)
        }
        Decision::Admit(admit) => {
            ctl.expires
                .set(admit.expires_in.map(|left| Instant::now() + left));
            match w.viewers().try_join(id, admit.viewer_limit) {
                None => {
                    tracing::info!(session = %id, limit = admit.viewer_limit, "viewer limit reached");
                    Next::Close(close::TOO_MANY_VIEWERS)
                }
                Some(slot) => {
                    viewer = Some(slot);
                    Next::Relay(admit.upstream, admit.record)
                }
            }
        }
    };
    // An admitted session's VM is dialed while the 101 goes out, so its first bytes are
    // on their way when the browser reads the 101; a browser gone before the 101 stops
    // the dial.
    let gone = Signal::new();
    let send_101 = async {
        let sent = stream.write_all(&ok).await;
        if sent.is_err() {
            gone.fire(());
        }
        sent
    };
    let (sent, dialed) = match next {
        Next::Close(cause) => (send_101.await, Err(cause)),
        Next::Relay(vm, record) => {
            let dial = async {
                monoio::select! {
                    r = connect_upstream(&w, vm, id) => r.map(|conn| (conn, vm, record)),
                    c = ctl.kill.wait() => Err(c),
                    _ = gone.wait() => Err(close::INTERNAL),
                }
            };
            monoio::join!(send_101, dial)
        }
    };
    if let Err(e) = sent {
        tracing::debug!(session = %id, %peer, error = %e, "client left before the 101");
        w.unregister(&ctl);
        return;
    }
    if view_only {
        metrics::counter!(m::VIEW_ONLY_SESSIONS).increment(1);
    }
    metrics::counter!(m::SESSIONS_OPENED).increment(1);
    let started = Instant::now();
    let (end, to_browser, to_vm, close_sent) = match dialed {
        Err(cause) => close_before_relay(stream, cause).await,
        Ok((conn, vm, record)) => {
            // Started once the VM answered: the file holds the session from its first byte.
            let rec = w
                .recordings()
                .filter(|r| r.wanted(record))
                .and_then(|r| r.start(id));
            let relay = Relay::new(&w, id, stream, &conn, vm)
                .view_only(view_only)
                .with_recorder(rec);
            let (end, deadline) = relay.run(&ctl.kill, &ctl.expires, &early).await;
            let close_sent = relay.finish(end, deadline).await;
            (end, relay.to_browser.get(), relay.to_vm.get(), close_sent)
        }
    };
    w.unregister(&ctl);
    drop(viewer);
    let (code, cause, blame) = match end {
        End::Cause(c) => (c.code, c.name, c.blame),
        End::ClientClose(code) => (code.unwrap_or(1005), close::BROWSER_CLOSE, Blame::Browser),
        End::ClientGone(_) => (1006, close::BROWSER_GONE, Blame::Browser),
    };
    let code_label = match end {
        End::ClientClose(c) => close::browser_code_label(c),
        _ => code.to_string(),
    };
    metrics::counter!(m::SESSIONS_CLOSED, "code" => code_label, "cause" => cause, "blame" => blame.as_str())
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
        upstream = upstream.map(tracing::field::display),
        view_only,
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

/// What an upgraded session does once the 101 is out.
enum Next {
    /// Closed with this cause before any relaying.
    Close(CloseCause),
    /// Relayed to this VM; the route asks for the session to be recorded.
    Relay(SocketAddr, bool),
}

/// One connection attempt to the VM, from a non-blocking socket with `TCP_NODELAY`
/// (as the relay needs it). Connected inline when the VM's SYN-ACK came back within
/// connect(2), as it does on loopback and a local bridge, so the VM starts on its first
/// bytes without the session waiting a turn of the runtime; otherwise the runtime waits
/// for the socket to become writable.
async fn dial(addr: SocketAddr) -> io::Result<TcpStream> {
    let (sock, done) = sys::start_connect(addr)?;
    let fd = sock.as_raw_fd();
    let done = done || sys::connect_finished(fd)?;
    let stream = TcpStream::from_std(sock)?;
    if !done {
        stream.writable(false).await?;
        sys::connect_result(fd)?;
    }
    Ok(stream)
}

/// How a connection to the TLS port goes on.
enum Started<'a> {
    /// Boxed as the session keeps it (`Client::Tls`).
    Tls(Box<TlsConn<'a>>),
    /// Not TLS, and the port serves plain too.
    Plain,
    /// Answered or gone.
    Ended,
}

/// Runs the TLS handshake by `deadline`, counted by result. Plain HTTP sent to the TLS
/// port gets a plain-text 400 that says to use `wss://`, unless `plain_ok` (websockify's
/// one port for both): it is then served in plain text.
async fn start_tls<'a>(
    stream: &'a TcpStream,
    peer: SocketAddr,
    cfg: std::sync::Arc<rustls::ServerConfig>,
    deadline: Instant,
    plain_ok: bool,
) -> Started<'a> {
    let tls = match TlsConn::new(stream, cfg) {
        Ok(t) => t,
        Err(e) => {
            tracing::error!(%peer, error = %e, "cannot start a TLS connection");
            return Started::Ended;
        }
    };
    let r = monoio::time::timeout_at(deadline.into(), tls.handshake()).await;
    let result = match &r {
        Ok(Ok(())) => "ok",
        Ok(Err(e)) => e.name(),
        Err(_) => "timeout",
    };
    metrics::counter!(m::TLS_HANDSHAKES, "result" => result).increment(1);
    match r {
        Ok(Ok(())) => Started::Tls(Box::new(tls)),
        // Nothing was read yet (the first byte was peeked): the plain request is intact.
        Ok(Err(HandshakeError::NotTls)) if plain_ok => Started::Plain,
        Ok(Err(HandshakeError::NotTls)) => {
            refuse(&Client::Plain(stream), peer, None, admission::TLS_REQUIRED).await;
            Started::Ended
        }
        Ok(Err(e @ HandshakeError::ClientGone(_))) => {
            tracing::debug!(%peer, error = %e, "client left during the TLS handshake");
            Started::Ended
        }
        Ok(Err(e)) => {
            tracing::info!(%peer, result, error = %e, "TLS handshake failed");
            Started::Ended
        }
        Err(_) => {
            tracing::info!(%peer, result, "TLS handshake not completed in time");
            Started::Ended
        }
    }
}

/// Reads until the request head is complete (an upgrade, or under `--web` a plain GET or
/// HEAD), rejected, or the client leaves.
async fn read_head(
    stream: &Client<'_>,
    head: &mut Vec<u8>,
    cfg: &handshake::HandshakeConfig,
) -> Result<Parsed, HeadError> {
    loop {
        // Read into the Vec's tail (no stack buffer inside the session's future), never
        // past the limit plus one byte, to tell "at the limit" from "over".
        let have = head.len();
        let room = (cfg.max_header_bytes + 1)
            .saturating_sub(have)
            .clamp(1, 2048);
        head.resize(have + room, 0);
        let r = stream.read(&mut head[have..]).await;
        head.truncate(have + *r.as_ref().unwrap_or(&0));
        match r {
            Ok(0) => return Err(HeadError::Io(io::ErrorKind::UnexpectedEof.into())),
            Ok(_) => {}
            Err(e) => return Err(HeadError::Io(e)),
        }
        match handshake::parse_request(head, cfg) {
            Ok(Parsed::Partial) => continue,
            Ok(done) => return Ok(done),
            Err(r) => return Err(HeadError::Reject(r)),
        }
    }
}

/// Answers a plain GET or HEAD from `--web DIR`: the file, a redirect to a directory's
/// slash, or a refusal counted and logged as the upgrade refusals are. One request per
/// connection (`Connection: close`): the page's loads are a few dozen small files.
async fn serve_file<S: RouteSource>(
    w: &Rc<Worker<S>>,
    stream: &Client<'_>,
    peer: SocketAddr,
    req: &PlainRequest,
) {
    let Some(site) = &w.web else {
        // The parser yields plain requests only when a web root is set.
        return refuse(
            stream,
            peer,
            None,
            Refusal::from_reject(Reject::UpgradeRequired("not a WebSocket upgrade")),
        )
        .await;
    };
    let answer = site.answer(&req.target);
    let Some(head) = crate::web::response_head(&answer) else {
        if let crate::web::Answer::Refuse(r) = answer {
            // The path without its query: a query may carry a token.
            tracing::debug!(%peer, path = handshake::redact_target(&req.target), "web request refused");
            refuse(stream, peer, None, r).await;
        }
        return;
    };
    metrics::counter!(m::WEB_RESPONSES).increment(1);
    tracing::debug!(%peer, path = handshake::redact_target(&req.target), head = req.head, "web file served");
    let mut ok = stream.write_all(&head).await.is_ok();
    if let crate::web::Answer::File { body, .. } = &answer
        && ok
        && !req.head
    {
        ok = stream.write_all(body).await.is_ok();
    }
    if ok {
        stream.linger_close(Duration::from_secs(1)).await;
    }
}

/// Answers a refused upgrade with its HTTP error, counted and logged (with the session id
/// once the path named a valid one), then closes without resetting the response away.
async fn refuse(stream: &Client<'_>, peer: SocketAddr, session: Option<&str>, r: Refusal) {
    metrics::counter!(m::HANDSHAKE_REJECTED, "status" => r.status.to_string(), "reason" => r.name, "blame" => r.blame.as_str())
        .increment(1);
    tracing::info!(session = session.unwrap_or("-"), %peer, status = r.status, reason = r.reason, blame = r.blame.as_str(), "upgrade refused");
    if stream.write_all(&r.response()).await.is_ok() {
        stream.linger_close(Duration::from_secs(1)).await;
    }
}

/// Closes an upgraded connection that never reached the relay.
async fn close_before_relay(stream: &Client<'_>, cause: CloseCause) -> (End, u64, u64, bool) {
    let frame = ControlFrame::close(Some(cause.code), cause.reason);
    let sent = stream.write_all(frame.as_bytes()).await.is_ok();
    if sent {
        stream.linger_close(Duration::from_secs(2)).await;
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
        let err = match monoio::time::timeout(l.connect_timeout, dial(addr)).await {
            Ok(Ok(s)) => {
                metrics::histogram!(m::UPSTREAM_CONNECT_SECONDS)
                    .record(start.elapsed().as_secs_f64());
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
            tracing::warn!(session, upstream = %addr, error = %err, cause = cause.name, "upstream connect failed");
            return Err(cause);
        }
        metrics::counter!(m::UPSTREAM_RETRIES, "cause" => cause.name).increment(1);
        tracing::debug!(session, upstream = %addr, error = %err, "upstream not ready; retrying");
        monoio::time::sleep(backoff).await;
        backoff = (backoff * 2).min(Duration::from_secs(1));
    }
}
