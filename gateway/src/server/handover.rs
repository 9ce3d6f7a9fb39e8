//! Restarts that refuse nothing: a new gateway takes over the old one's listening sockets,
//! passed over a unix socket (`--handover-socket`) with `SCM_RIGHTS`, as HAProxy and
//! pingora do.
//!
//! The sockets are the same kernel objects in both processes, so their queues are shared:
//! a connection the kernel queued before the handover is accepted by whichever process
//! looks first, and none is ever queued where nobody reads. The order is what makes it
//! refuse nothing:
//!
//! 1. the new gateway connects to the socket and asks; the old one answers with its
//!    listen address and every listening descriptor it has (all of them: closing one
//!    `SO_REUSEPORT` listener resets the connections queued on it, so the successor must
//!    keep each, whatever its own worker count), and its admin listener;
//! 2. the new gateway checks they listen on its own `--listen` address (refusing clearly
//!    otherwise: the old one then serves on as if nothing happened), starts its workers on
//!    them, and only once every worker accepts, says `go`;
//! 3. the old gateway stops accepting, closes its own descriptors without shutting the
//!    sockets down (that would end the successor's listeners too; see
//!    [`super::DrainMode`]), says `bye`, and drains its sessions as on SIGTERM;
//! 4. the new gateway then serves handovers on the same path for its own successor.
//!
//! The exchange, in lines: `vncgate-handover 1` / `offer ADDR COUNT ADMIN` (ADMIN an
//! address or `-`) then the descriptors, one byte per message with up to
//! [`sys::MAX_FDS_PER_MESSAGE`] attached (listeners first, the admin one last), or
//! `refuse REASON` / `go` / `bye`.

use std::io::{self, Read as _, Write as _};
use std::net::{SocketAddr, TcpListener};
use std::os::fd::{AsFd as _, BorrowedFd, OwnedFd};
use std::os::unix::fs::{MetadataExt as _, PermissionsExt as _};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use super::Shared;
use super::listener;
use crate::config::Settings;
use crate::metrics as m;
use crate::sys;

const HELLO: &str = "vncgate-handover 1";

/// How long either side waits for the other's next line. The successor's `go` comes after
/// its workers start (at most 10 s, see `start_with`).
const PATIENCE: Duration = Duration::from_secs(30);

/// The listening sockets a gateway starts on, and the predecessor to release once its
/// workers accept on them.
pub struct Acquired {
    pub listeners: Vec<TcpListener>,
    pub admin: Option<TcpListener>,
    pub predecessor: Option<Predecessor>,
}

/// The old gateway, waiting for `go`.
pub struct Predecessor {
    conn: UnixStream,
    path: PathBuf,
}

/// Binds the listeners, or takes them over from a gateway serving handovers at
/// `--handover-socket`.
pub fn acquire(settings: &Settings, congestion: Option<&str>) -> Result<Acquired, String> {
    let bind = |share: bool| {
        listener::bind_group(settings.listen, settings.workers, share, congestion)
            .map_err(|e| format!("cannot listen on {}: {e}", settings.listen))
    };
    let Some(path) = &settings.handover_socket else {
        return Ok(Acquired {
            listeners: bind(settings.share_port)?,
            admin: None,
            predecessor: None,
        });
    };
    let conn = match UnixStream::connect(path) {
        Ok(c) => c,
        Err(e)
            if matches!(
                e.kind(),
                io::ErrorKind::NotFound | io::ErrorKind::ConnectionRefused
            ) =>
        {
            tracing::info!(handover_socket = %path.display(), "no running gateway to take over from; binding");
            return Ok(Acquired {
                listeners: bind(settings.share_port)?,
                admin: None,
                predecessor: None,
            });
        }
        Err(e) => {
            return Err(format!(
                "--handover-socket {}: cannot connect: {e}",
                path.display()
            ));
        }
    };
    let fail = |why: String| format!("--handover-socket {}: {why}", path.display());
    conn.set_read_timeout(Some(PATIENCE))
        .and_then(|()| conn.set_write_timeout(Some(PATIENCE)))
        .map_err(|e| fail(e.to_string()))?;
    (&conn)
        .write_all(format!("{HELLO}\n").as_bytes())
        .map_err(|e| fail(format!("cannot ask the running gateway: {e}")))?;
    let answer = read_line(&conn).map_err(|e| fail(format!("no answer: {e}")))?;
    let offer = match parse_offer(&answer) {
        Ok(o) => o,
        Err(Answer::Refused(why)) => {
            // A gateway already draining on SIGTERM has left (or is leaving) LISTEN: bind
            // beside it.
            metrics::counter!(m::HANDOVERS, "side" => "took", "result" => "refused").increment(1);
            tracing::warn!(handover_socket = %path.display(), reason = %why, "the running gateway does not hand over; binding beside it");
            return Ok(Acquired {
                listeners: bind(true)?,
                admin: None,
                predecessor: None,
            });
        }
        Err(Answer::Garbled) => return Err(fail(format!("unexpected answer {answer:?}"))),
    };
    let want = offer.count + usize::from(offer.admin.is_some());
    let mut fds: Vec<OwnedFd> = Vec::with_capacity(want);
    while fds.len() < want {
        let mut one = [0u8; 1];
        let (n, got) = sys::recv_fds(&conn, &mut one)
            .map_err(|e| fail(format!("cannot receive the listening sockets: {e}")))?;
        if n == 0 {
            return Err(fail("the running gateway left mid-handover".into()));
        }
        fds.extend(got);
    }
    if fds.len() != want {
        return Err(fail(format!(
            "expected {want} descriptors, got {}",
            fds.len()
        )));
    }
    let admin_fd = offer.admin.map(|_| fds.pop().expect("counted above"));
    if !same_listen(settings.listen, offer.listen) {
        return Err(fail(format!(
            "the running gateway listens on {}, and this one is configured for --listen {}: refusing to take its sockets over (the running gateway keeps serving); give the same --listen, or stop it first",
            offer.listen, settings.listen
        )));
    }
    let mut listeners = Vec::with_capacity(fds.len());
    for fd in fds {
        listeners.push(check_listener(fd, offer.listen).map_err(&fail)?);
    }
    for l in &listeners {
        l.set_nonblocking(true).map_err(|e| fail(e.to_string()))?;
        if let Some(cc) = congestion {
            let s = socket2::SockRef::from(l);
            if let Err(e) = s.set_tcp_congestion(cc.as_bytes()) {
                tracing::warn!(tcp_congestion = cc, error = %e, "cannot set the congestion control on an inherited listener");
            }
        }
    }
    let inherited = listeners.len();
    // More workers than sockets: the others join the group. Fewer: some workers accept on
    // several (see `spread`); none of the sockets is closed.
    if listeners.len() < settings.workers {
        listeners.extend(
            listener::bind_group(
                offer.listen,
                settings.workers - listeners.len(),
                true,
                congestion,
            )
            .map_err(|e| {
                fail(format!(
                    "cannot add listeners beside the inherited ones: {e}"
                ))
            })?,
        );
    }
    let admin = match (admin_fd, offer.admin, settings.admin) {
        (Some(fd), Some(theirs), Some(ours)) if same_listen(ours, theirs) => {
            Some(check_listener(fd, theirs).map_err(&fail)?)
        }
        _ => None,
    };
    tracing::info!(
        handover_socket = %path.display(),
        listen = %offer.listen,
        inherited,
        workers = settings.workers,
        admin = admin.is_some(),
        "took over the running gateway's listening sockets"
    );
    Ok(Acquired {
        listeners,
        admin,
        predecessor: Some(Predecessor {
            conn,
            path: path.clone(),
        }),
    })
}

/// `configured` (a `--listen` value) names `actual`: the same address, and the same port
/// unless the configured one is 0 (any port, as both gateways were told).
fn same_listen(configured: SocketAddr, actual: SocketAddr) -> bool {
    configured.ip() == actual.ip() && (configured.port() == 0 || configured.port() == actual.port())
}

/// A received descriptor as a TCP listener on `addr`, or why not.
fn check_listener(fd: OwnedFd, addr: SocketAddr) -> Result<TcpListener, String> {
    let s = socket2::Socket::from(fd);
    let local = s
        .local_addr()
        .ok()
        .and_then(|a| a.as_socket())
        .ok_or("a received descriptor is not a TCP socket")?;
    let listening = s.is_listener().unwrap_or(false);
    if !listening || s.r#type().ok() != Some(socket2::Type::STREAM) || local != addr {
        return Err(format!(
            "a received descriptor is not a TCP listener on {addr} (it is bound to {local}, listening: {listening})"
        ));
    }
    Ok(s.into())
}

impl Predecessor {
    /// Tells the old gateway to stop accepting and drain, and waits until it has let go of
    /// the handover socket's path.
    pub fn release(self) {
        let done = (&self.conn)
            .write_all(b"go\n")
            .and_then(|()| read_line(&self.conn));
        match done {
            Ok(l) if l == "bye" => {
                metrics::counter!(m::HANDOVERS, "side" => "took", "result" => "ok").increment(1);
                tracing::info!(handover_socket = %self.path.display(), "the previous gateway stops accepting and drains");
            }
            Ok(l) => {
                tracing::warn!(answer = %l, "unexpected answer from the previous gateway after go")
            }
            // Serving anyway: the sockets are ours whatever happened to it.
            Err(e) => {
                tracing::warn!(error = %e, "the previous gateway did not confirm its drain")
            }
        }
    }
}

enum Answer {
    Refused(String),
    Garbled,
}

struct OfferLine {
    listen: SocketAddr,
    count: usize,
    admin: Option<SocketAddr>,
}

fn parse_offer(line: &str) -> Result<OfferLine, Answer> {
    if let Some(why) = line.strip_prefix("refuse ") {
        return Err(Answer::Refused(why.to_owned()));
    }
    let mut w = line.split(' ');
    let (Some("offer"), Some(listen), Some(count), Some(admin), None) =
        (w.next(), w.next(), w.next(), w.next(), w.next())
    else {
        return Err(Answer::Garbled);
    };
    let admin = match admin {
        "-" => None,
        a => Some(a.parse().map_err(|_| Answer::Garbled)?),
    };
    Ok(OfferLine {
        listen: listen.parse().map_err(|_| Answer::Garbled)?,
        count: count
            .parse()
            .ok()
            .filter(|&n| n > 0)
            .ok_or(Answer::Garbled)?,
        admin,
    })
}

/// One `\n`-terminated line, read a byte at a time: descriptors follow some lines, and
/// no byte past the line may be read with them.
fn read_line(conn: &UnixStream) -> io::Result<String> {
    let mut line = Vec::new();
    let mut b = [0u8; 1];
    loop {
        // read_exact retries what a signal interrupts.
        (&*conn).read_exact(&mut b)?;
        if b[0] == b'\n' {
            return String::from_utf8(line).map_err(|_| io::ErrorKind::InvalidData.into());
        }
        if line.len() >= 256 {
            return Err(io::ErrorKind::InvalidData.into());
        }
        line.push(b[0]);
    }
}

/// Assigns `listeners` to `workers`: one each, and where there are more listeners than
/// workers (inherited from a gateway with more), worker `i` takes every listener `j` with
/// `j % workers == i`, so every socket stays open and read.
pub fn spread(listeners: Vec<TcpListener>, workers: usize) -> Vec<Vec<TcpListener>> {
    let mut out: Vec<Vec<TcpListener>> = (0..workers).map(|_| Vec::new()).collect();
    for (j, l) in listeners.into_iter().enumerate() {
        out[j % workers].push(l);
    }
    out
}

/// What this gateway offers its successor: copies of every listening descriptor.
pub struct Offer {
    pub listen: SocketAddr,
    pub listeners: Vec<TcpListener>,
    pub admin: Option<TcpListener>,
}

/// Serves handover requests at `path` (mode 0600) on a thread of its own, until a
/// successor has taken the sockets.
pub fn serve(path: &Path, offer: Offer, shared: Arc<Shared>) -> Result<(), String> {
    let sock = bind_private(path)
        .map_err(|e| format!("--handover-socket {}: cannot serve: {e}", path.display()))?;
    let ino = std::fs::metadata(path).map(|m| m.ino()).ok();
    tracing::info!(handover_socket = %path.display(), listeners = offer.listeners.len(), listen = %offer.listen, "serving restart handovers");
    let path = path.to_owned();
    std::thread::Builder::new()
        .name("vncgate-handover".into())
        .spawn(move || {
            for conn in sock.incoming() {
                let conn = match conn {
                    Ok(c) => c,
                    Err(e) => {
                        tracing::warn!(error = %e, "handover accept failed");
                        std::thread::sleep(Duration::from_millis(50));
                        continue;
                    }
                };
                match give(&conn, &offer, &shared, &path, ino) {
                    Ok(true) => return,
                    Ok(false) => {}
                    Err(e) => {
                        shared.end_offer(false);
                        metrics::counter!(m::HANDOVERS, "side" => "gave", "result" => "abandoned")
                            .increment(1);
                        tracing::warn!(error = %e, "handover abandoned by the successor; serving on");
                    }
                }
            }
        })
        .map_err(|e| format!("cannot start the handover thread: {e}"))?;
    Ok(())
}

/// Binds a unix listener at `path` with mode 0600 from the start: bound under a temporary
/// name in the same directory, restricted, then renamed over `path` (a predecessor's socket
/// file there is replaced; the predecessor no longer serves on it by then).
fn bind_private(path: &Path) -> io::Result<UnixListener> {
    let name = path
        .file_name()
        .ok_or_else(|| io::Error::other("not a file path"))?;
    let tmp = path.with_file_name(format!(
        ".{}.{}",
        name.to_string_lossy(),
        std::process::id()
    ));
    let _ = std::fs::remove_file(&tmp);
    let l = UnixListener::bind(&tmp)?;
    std::fs::set_permissions(&tmp, std::fs::Permissions::from_mode(0o600))?;
    std::fs::rename(&tmp, path)?;
    Ok(l)
}

/// One request: `Ok(true)` once the sockets are handed over, `Ok(false)` when refused.
fn give(
    conn: &UnixStream,
    offer: &Offer,
    shared: &Shared,
    path: &Path,
    ino: Option<u64>,
) -> io::Result<bool> {
    conn.set_read_timeout(Some(PATIENCE))?;
    conn.set_write_timeout(Some(PATIENCE))?;
    if read_line(conn)? != HELLO {
        return Err(io::Error::other("not a handover request"));
    }
    if !shared.offer_handover() {
        metrics::counter!(m::HANDOVERS, "side" => "gave", "result" => "refused").increment(1);
        tracing::info!("handover refused: this gateway is draining");
        (&*conn).write_all(b"refuse draining\n")?;
        return Ok(false);
    }
    let admin = offer
        .admin
        .as_ref()
        .and_then(|a| a.local_addr().ok())
        .map_or_else(|| "-".to_owned(), |a| a.to_string());
    (&*conn).write_all(
        format!("offer {} {} {admin}\n", offer.listen, offer.listeners.len()).as_bytes(),
    )?;
    let all: Vec<BorrowedFd<'_>> = offer
        .listeners
        .iter()
        .map(|l| l.as_fd())
        .chain(offer.admin.as_ref().map(|a| a.as_fd()))
        .collect();
    for chunk in all.chunks(sys::MAX_FDS_PER_MESSAGE) {
        sys::send_fds(conn, b"f", chunk)?;
    }
    if read_line(conn)? != "go" {
        return Err(io::Error::other("the successor did not say go"));
    }
    // From here the successor accepts on every socket: stop accepting, keep the sockets.
    shared.end_offer(true);
    // The path is the successor's next; remove it only while it is still ours.
    if ino.is_some() && std::fs::metadata(path).map(|m| m.ino()).ok() == ino {
        let _ = std::fs::remove_file(path);
    }
    (&*conn).write_all(b"bye\n")?;
    metrics::counter!(m::HANDOVERS, "side" => "gave", "result" => "ok").increment(1);
    tracing::info!(
        listeners = offer.listeners.len(),
        "listening sockets handed over to the successor; draining"
    );
    Ok(true)
}

/// `serve --detach`: starts this same command line without `--detach` as a child, and
/// returns once the child serves handovers at `--handover-socket` (a socket file that was
/// not there before: it has taken over, or bound where no gateway ran), or fails with the
/// child's exit. The child stays, in the same service cgroup under systemd, and tells
/// systemd it is the main process (see [`super::notify`]).
pub fn detach(settings: &Settings) -> Result<(), String> {
    let path = settings
        .handover_socket
        .as_ref()
        .ok_or("--detach needs --handover-socket (it waits for the new gateway to serve there)")?;
    // With the change time: a freed inode number can come back at once.
    let id = |p: &Path| {
        std::fs::metadata(p)
            .ok()
            .map(|m| (m.dev(), m.ino(), m.ctime(), m.ctime_nsec()))
    };
    let before = id(path);
    let exe = std::env::current_exe().map_err(|e| format!("cannot find this executable: {e}"))?;
    let args: Vec<std::ffi::OsString> = std::env::args_os()
        .skip(1)
        .filter(|a| a != "--detach")
        .collect();
    let mut child = std::process::Command::new(exe)
        .args(args)
        .stdin(std::process::Stdio::null())
        .spawn()
        .map_err(|e| format!("cannot start the new gateway: {e}"))?;
    // Its workers start within 10 s, and the old gateway answers within PATIENCE.
    let deadline = std::time::Instant::now() + PATIENCE * 2;
    loop {
        if let Some(st) = child.try_wait().map_err(|e| e.to_string())? {
            return Err(format!(
                "the new gateway exited ({st}) before it served; its log says why"
            ));
        }
        let now = id(path);
        if now.is_some() && now != before {
            println!("vncgate: detached gateway pid {}", child.id());
            return Ok(());
        }
        if std::time::Instant::now() > deadline {
            let _ = child.kill();
            return Err(format!(
                "the new gateway did not serve at {} within {} s; stopped it",
                path.display(),
                (PATIENCE * 2).as_secs()
            ));
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn shared() -> Shared {
        Shared::for_tests(1)
    }

    /// A signal during an offer never shuts down sockets a successor may hold: it waits
    /// for the offer's outcome; after a handover nothing turns the drain into a close.
    #[test]
    fn offers_and_signals_decide_the_drain_mode_together() {
        use super::super::DrainMode;
        let draining = |s: &Shared| s.draining.load(std::sync::atomic::Ordering::SeqCst);
        let s = shared();
        assert!(s.offer_handover());
        assert!(!s.offer_handover(), "one offer at a time");
        s.drain();
        assert_eq!((s.drain_mode(), draining(&s)), (None, false));
        s.end_offer(false);
        assert_eq!(
            s.drain_mode(),
            Some(DrainMode::Close),
            "the signal's drain, after"
        );
        assert!(draining(&s));
        let s = shared();
        assert!(s.offer_handover());
        s.end_offer(true);
        s.drain();
        assert_eq!(s.drain_mode(), Some(DrainMode::Handover));
        assert!(!s.offer_handover());
        let s = shared();
        assert!(s.offer_handover());
        s.end_offer(false);
        assert_eq!((s.drain_mode(), draining(&s)), (None, false), "serving on");
        s.drain();
        assert_eq!(s.drain_mode(), Some(DrainMode::Close));
        assert!(!s.offer_handover(), "a draining gateway offers nothing");
    }

    #[test]
    fn every_listener_is_kept_whatever_the_worker_count() {
        let group = listener::bind_group("127.0.0.1:0".parse().unwrap(), 5, false, None).unwrap();
        let fds: Vec<_> = group.iter().map(std::os::fd::AsRawFd::as_raw_fd).collect();
        let by_worker = spread(group, 2);
        assert_eq!(by_worker.iter().map(Vec::len).collect::<Vec<_>>(), [3, 2]);
        let mut kept: Vec<_> = by_worker
            .iter()
            .flatten()
            .map(std::os::fd::AsRawFd::as_raw_fd)
            .collect();
        kept.sort();
        let mut want = fds.clone();
        want.sort();
        assert_eq!(kept, want);
    }

    #[test]
    fn offers_parse_and_listen_addresses_match() {
        let o = parse_offer("offer 127.0.0.1:8080 4 127.0.0.1:9090")
            .ok()
            .unwrap();
        assert_eq!(
            (o.listen.port(), o.count, o.admin.map(|a| a.port())),
            (8080, 4, Some(9090))
        );
        assert!(
            parse_offer("offer 127.0.0.1:8080 2 -")
                .ok()
                .unwrap()
                .admin
                .is_none()
        );
        assert!(
            matches!(parse_offer("refuse draining"), Err(Answer::Refused(w)) if w == "draining")
        );
        assert!(matches!(parse_offer("offer x 1 -"), Err(Answer::Garbled)));
        assert!(matches!(
            parse_offer("offer 127.0.0.1:1 0 -"),
            Err(Answer::Garbled)
        ));
        let a: SocketAddr = "127.0.0.1:8080".parse().unwrap();
        assert!(same_listen(a, a));
        assert!(same_listen("127.0.0.1:0".parse().unwrap(), a));
        assert!(!same_listen("127.0.0.1:8081".parse().unwrap(), a));
        assert!(!same_listen("0.0.0.0:8080".parse().unwrap(), a));
    }
}
