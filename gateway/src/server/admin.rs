//! The admin listener: `/metrics` (Prometheus text), `/healthz` (the process runs) and
//! `/readyz` (every worker accepts, no drain is under way, and Redis answers where routes
//! come from Redis). It runs on its own plain
//! thread with blocking sockets: it serves a scraper every few seconds, not users, and
//! keeps the workers' runtimes free of anything but sessions.

use std::io::{Read as _, Write as _};
use std::net::{TcpListener, TcpStream};
use std::os::fd::AsFd as _;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use metrics_exporter_prometheus::PrometheusHandle;
use nix::poll::{PollFd, PollFlags, PollTimeout, poll};

use super::Shared;
use vncgate_ws::handshake::status_text;

pub fn spawn(
    listener: TcpListener,
    shared: Arc<Shared>,
    prom: Option<PrometheusHandle>,
) -> std::io::Result<()> {
    std::thread::Builder::new()
        .name("vncgate-admin".into())
        .spawn(move || {
            // After a restart handover the successor serves the same socket: stop
            // accepting (its queue is the successor's), looking at least every 200 ms.
            let _ = listener.set_nonblocking(true);
            while shared.drain_mode() != Some(super::DrainMode::Handover) {
                match listener.accept() {
                    Ok((s, _)) => {
                        let _ = s.set_nonblocking(false);
                        if let Err(e) = handle(s, &shared, prom.as_ref()) {
                            tracing::debug!(error = %e, "admin request failed");
                        }
                    }
                    Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                        let mut fds = [PollFd::new(listener.as_fd(), PollFlags::POLLIN)];
                        let _ = poll(&mut fds, PollTimeout::from(200u8));
                    }
                    Err(e) => {
                        tracing::warn!(error = %e, "admin accept failed");
                        std::thread::sleep(Duration::from_millis(50));
                    }
                }
            }
        })?;
    Ok(())
}

fn handle(
    mut s: TcpStream,
    shared: &Shared,
    prom: Option<&PrometheusHandle>,
) -> std::io::Result<()> {
    s.set_read_timeout(Some(Duration::from_secs(2)))?;
    s.set_write_timeout(Some(Duration::from_secs(5)))?;
    let mut buf = vec![0u8; 8192];
    let mut len = 0;
    let path = loop {
        let n = s.read(&mut buf[len..])?;
        if n == 0 {
            return Ok(());
        }
        len += n;
        let mut headers = [httparse::EMPTY_HEADER; 32];
        let mut req = httparse::Request::new(&mut headers);
        match req.parse(&buf[..len]) {
            Ok(httparse::Status::Complete(_)) => break req.path.unwrap_or("/").to_owned(),
            Ok(httparse::Status::Partial) if len < buf.len() => continue,
            _ => return respond(&mut s, 400, "text/plain", b"bad request\n"),
        }
    };
    let not_ready = not_ready(shared);
    match path.split('?').next().unwrap_or("") {
        "/healthz" | "/live" => respond(&mut s, 200, "text/plain", b"ok\n"),
        "/readyz" | "/ready" => match not_ready {
            None => respond(&mut s, 200, "text/plain", b"ready\n"),
            Some(why) => respond(&mut s, 503, "text/plain", format!("{why}\n").as_bytes()),
        },
        "/metrics" => match prom {
            Some(p) => {
                let body = crate::metrics::render(p);
                respond(&mut s, 200, "text/plain; version=0.0.4", body.as_bytes())
            }
            None => respond(
                &mut s,
                503,
                "text/plain",
                b"metrics recorder not installed\n",
            ),
        },
        _ => respond(&mut s, 404, "text/plain", b"not found\n"),
    }
}

/// Why `/readyz` says 503, if it does. Workers count while they accept (see
/// `server::Accepting`): one still starting or one that died makes the gateway not ready.
pub(super) fn not_ready(shared: &Shared) -> Option<String> {
    let live = shared.ready_workers.load(Ordering::Acquire);
    if shared.draining.load(Ordering::Relaxed) {
        Some("draining".to_owned())
    } else if live < shared.workers {
        Some(format!("{live} of {} workers accepting", shared.workers))
    } else {
        shared
            .route_health
            .as_ref()
            .filter(|h| !h.is_up())
            .map(|h| format!("{} unavailable: {}", h.name(), h.why()))
    }
}

fn respond(s: &mut TcpStream, status: u16, ctype: &str, body: &[u8]) -> std::io::Result<()> {
    let head = format!(
        "HTTP/1.1 {status} {}\r\nContent-Type: {ctype}\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
        status_text(status),
        body.len()
    );
    s.write_all(head.as_bytes())?;
    s.write_all(body)?;
    s.flush()
}
