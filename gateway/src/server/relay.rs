//! The relay between one browser and one VM, after the upgrade.
//!
//! VM -> browser carries the bulk (framebuffer updates). Server frames are unmasked, so the
//! payload never needs to enter user space. Small writes from the VM (a cut-text echo, an
//! incremental update of a few rectangles) are cheapest copied: one `recv` into a pooled
//! buffer that keeps headroom for the frame header, and one `send` of header and payload
//! together. When a read fills the buffer, the VM is streaming, and the relay switches to
//! splicing until the VM's socket runs dry: `splice(2)` moves what the VM sent into a pipe,
//! the 2-10 byte frame header goes out with `MSG_MORE`, and a second `splice(2)` moves the
//! pipe into the browser's socket. One frame carries what one splice moved (at most the pipe
//! capacity, 1 MiB by default, well under noVNC's 40 MiB receive limit). The syscalls are
//! issued directly once the runtime reports readiness (an io_uring poll, or epoll): the
//! kernel runs io_uring's own splice on io-wq worker threads, which measured slower.
//!
//! Browser -> VM frames are masked: a read buffer is lent from the worker's pool, the
//! incremental parser unmasks payload in place, payload ranges are compacted to the front
//! and written to the VM. The buffer goes back to the pool after the write, so an idle
//! session holds no buffer and no pipe.
//!
//! The copied writes (small frames to the browser, payload to the VM) go through the
//! runtime: on io_uring a send op, which the worker submits together with every other
//! session's in one `io_uring_enter`. Each send wakes the peer's reader, and on a busy
//! machine the kernel often switches to the woken task when the waker returns to user
//! space; a `send(2)` per message paid that switch per message, the batch pays it once per
//! batch (measured with 50 sessions of 16-byte round trips: 1.2-1.3x the rate of direct
//! sends, see the README). A worker with one or two sessions has nothing to batch and sends
//! directly ([`DIRECT_SEND_SESSIONS`]). The ops own their buffers, so they write through a second
//! descriptor of each socket (`dup`), owned by the relay: the session's own streams stay
//! shared by reference for readiness and the rare control frames.
//!
//! A recorded session (`--record`, see [`super::record`]) hands each read to its recorder
//! before the bytes go on: the splice path tees the relay pipe, the copy path writes what
//! it has in user space, neither waiting. An unrecorded session pays one branch per read.
//!
//! Backpressure is end to end: a frame must be fully written to the browser before the next
//! splice from the VM, so a slow browser leaves the VM's data in the VM's socket (and TCP
//! window); a slow VM stops reads from the browser the same way. Per-session memory in user
//! space is this struct plus the task; in flight at most one pipe and one buffer.

use std::cell::{Cell, RefCell};
use std::io;
use std::net::SocketAddr;
use std::os::fd::{AsRawFd, RawFd};
use std::rc::Rc;
use std::time::{Duration, Instant};

use monoio::buf::IoBuf;
use monoio::io::AsyncWriteRent;
use monoio::net::TcpStream;

use super::client::Client;
use super::record::Recorder;
use super::signal::{Nudge, Signal, WriteGate};
use super::view_only::ViewOnly;
use super::worker::Worker;
use crate::close::{self, CloseCause};
use crate::deadlines::{Deadlines, Next};
use crate::route::RouteSource;
use crate::sys::{self, Pipe};
use vncgate_ws::frame::{
    ControlFrame, ControlPayload, FrameParser, Item, MAX_SERVER_HEADER, OP_BINARY, OP_PING,
    OP_PONG, encode_header,
};

/// How a relayed session ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum End {
    /// The gateway closes with this cause (VM gone, timers, protocol error, drain...).
    Cause(CloseCause),
    /// The browser sent a close frame (with this code, if any); it is echoed.
    ClientClose(Option<u16>),
    /// The browser's connection ended without a close frame.
    ClientGone(&'static str),
}

/// The frame being written to the browser: header bytes left, payload bytes in the pipe.
/// Kept outside the relay futures so that a cancelled future leaves it consistent and the
/// closing path can finish the frame before its close frame.
#[derive(Default)]
struct Outbound {
    /// Splice path: the header, then `in_pipe` payload bytes in `pipe`.
    pipe: Option<Pipe>,
    hdr: [u8; MAX_SERVER_HEADER],
    hdr_len: u8,
    hdr_off: u8,
    in_pipe: usize,
    /// Copy path: a whole frame (header in the headroom, then payload) at `off..end`.
    /// While a send op holds the buffer it is `None`; if that op was abandoned (see
    /// [`Relay::run`]), how much of the frame left is unknown.
    buf: Option<Box<[u8]>>,
    off: usize,
    end: usize,
}

impl Outbound {
    fn idle(&self) -> bool {
        self.hdr_off == self.hdr_len && self.in_pipe == 0 && self.off == self.end
    }

    /// A send of this frame was dropped in flight: nothing more can be framed after it.
    fn in_doubt(&self) -> bool {
        self.off < self.end && self.buf.is_none()
    }
}

/// What one read from the VM produced.
enum FromVm {
    /// A frame of this many payload bytes is in flight; `full` when the read filled its
    /// buffer (the VM is streaming).
    Frame { len: usize, full: bool },
    /// The VM's socket is empty.
    WouldBlock,
}

pub struct Relay<'a, S: RouteSource> {
    w: &'a Rc<Worker<S>>,
    /// The session id, for log lines.
    session: &'a str,
    /// The browser's connection: plain, or TLS (then every write to the browser is copied
    /// into rustls, and nothing is spliced).
    wire: &'a Client<'a>,
    /// Its TCP socket.
    client: &'a TcpStream,
    upstream: &'a TcpStream,
    /// The VM's address, for the log lines that name an upstream failure (never a close
    /// reason: the browser is not told where VMs live).
    vm: SocketAddr,
    cfd: RawFd,
    ufd: RawFd,
    gate: WriteGate,
    /// Second descriptors of the two sockets, for the runtime's send ops (see the module
    /// documentation), opened on first use and closed again after [`SEND_HANDLE_IDLE`]
    /// without traffic, so an idle session holds two descriptors, a busy one four. Taken
    /// for the length of one send; a send dropped in flight takes its descriptor along,
    /// which only happens when the session is ending.
    tx_client: Cell<Option<TcpStream>>,
    tx_upstream: Cell<Option<TcpStream>>,
    /// Send descriptors opened and not yet closed (in their slot or in an op), and when
    /// the timers last closed the idle ones.
    tx_open: Cell<u8>,
    tx_swept: Cell<Instant>,
    /// Tells the timers that a send descriptor opened (a new deadline to sleep to).
    timers_nudge: Nudge,
    out: RefCell<Outbound>,
    parser: RefCell<FrameParser>,
    last_activity: Cell<Instant>,
    /// Expiry, duration limit, idle and keepalive (sans IO: [`crate::deadlines`]).
    deadlines: RefCell<Deadlines>,
    pub to_browser: Cell<u64>,
    pub to_vm: Cell<u64>,
    /// Messages sent so far, counted up to [`DIRECT_FIRST_SENDS`].
    sends: Cell<u32>,
    /// A view-only viewer's filter (`server::view_only`); `None` for full viewers, whose
    /// bytes go to the VM untouched. Boxed: a full viewer's relay grows by one pointer.
    view_only: Option<Box<RefCell<ViewOnly>>>,
    /// The session's recording, if it is recorded (see [`super::record`]); `None` costs
    /// one branch per read.
    rec: Option<RefCell<Recorder>>,
}

/// Bytes a session may move in one direction before it yields to the worker's other
/// sessions; this bounds how long one busy session can delay the rest (fairness).
const RELAY_BUDGET: usize = 512 << 10;

/// The same under TLS, VM to browser: one read buffer, so a session yields after each
/// frame it encrypts. Encrypting costs about a millisecond per 512 KiB here, against
/// microseconds for a splice, so the byte budget of the plain path let a session that
/// always had data keep the worker for as long as ten sessions that drained their
/// socket (window-limited, they read ~95 KiB a turn): at 50 streams on one worker the Jain
/// index measured 0.54-0.65 in four runs of five with it, 0.98-1.0 with 64 KiB turns, and
/// 0.988-0.992 with 32 KiB turns on two workers, at the same aggregate (see the README,
/// "What the scheduling fix changed").
const TLS_RELAY_BUDGET: usize = 32 << 10;

/// A copied message up to this size goes to its send op in a buffer of its own size, and
/// the pooled read buffer goes straight back: while ops are in flight (until the worker's
/// next submission), a worker then holds memory in proportion to the bytes in flight, not
/// a whole read buffer per message. The copy costs less than the allocation it avoids
/// keeping.
const SMALL_SEND: usize = 2048;

/// A worker with at most this many sessions sends with `send(2)` directly rather than
/// through send ops: a send op pays off when the worker's next submission carries other
/// sessions' sends too, and with one session there is nothing to batch, only the op's round
/// trip through the ring. Measured with one connection's 16-byte round trips, side by side
/// with websocat: send ops 19.1-19.9k/s against websocat's 19.9-20.2k/s, direct sends
/// 20.4-20.6k/s against 20.4-20.6k/s; the 50-connection figure did not move.
const DIRECT_SEND_SESSIONS: usize = 2;

/// A session's first this many messages are sent with `send(2)` directly whatever the
/// worker's load: they are the RFB handshake (version, security, ServerInit, each waiting
/// on the other side's answer), where nothing queues behind a message to batch with it and
/// the op's round trip through the ring is the first byte's delay; and a session that
/// sends only these (a probe, a refused login) never opens a send descriptor.
const DIRECT_FIRST_SENDS: u32 = 8;

/// A session's send descriptors are closed after this long without traffic.
const SEND_HANDLE_IDLE: Duration = Duration::from_secs(10);

fn is_would_block(e: &io::Error) -> bool {
    e.kind() == io::ErrorKind::WouldBlock
}

/// Which socket a send op writes to.
#[derive(Clone, Copy)]
enum Side {
    Browser,
    Vm,
}

impl<'a, S: RouteSource> Relay<'a, S> {
    pub fn new(
        w: &'a Rc<Worker<S>>,
        session: &'a str,
        wire: &'a Client<'a>,
        upstream: &'a TcpStream,
        vm: SocketAddr,
    ) -> Self {
        let client = wire.stream();
        Self {
            w,
            session,
            wire,
            client,
            upstream,
            vm,
            cfd: client.as_raw_fd(),
            ufd: upstream.as_raw_fd(),
            gate: WriteGate::default(),
            tx_client: Cell::new(None),
            tx_upstream: Cell::new(None),
            tx_open: Cell::new(0),
            tx_swept: Cell::new(Instant::now()),
            timers_nudge: Nudge::default(),
            out: RefCell::new(Outbound::default()),
            parser: RefCell::new(FrameParser::new(w.limits.max_message)),
            last_activity: Cell::new(Instant::now()),
            deadlines: RefCell::new(Deadlines::new(Instant::now(), &w.limits)),
            to_browser: Cell::new(0),
            to_vm: Cell::new(0),
            sends: Cell::new(0),
            view_only: None,
            rec: None,
        }
    }

    /// Makes this a view-only viewer's relay: the browser's RFB stream is filtered before
    /// the VM sees it.
    pub fn view_only(mut self, on: bool) -> Self {
        self.view_only = on.then(|| Box::new(RefCell::new(ViewOnly::new())));
        self
    }

    /// Records the session into `rec`.
    pub fn with_recorder(mut self, rec: Option<Recorder>) -> Self {
        self.rec = rec.map(RefCell::new);
        self
    }

    /// Closes the send descriptors in their slots; one inside an op in flight stays open
    /// and is looked at again at the next sweep.
    fn close_idle_send_handles(&self, now: Instant) {
        for slot in [&self.tx_client, &self.tx_upstream] {
            if slot.take().is_some() {
                self.tx_open.set(self.tx_open.get() - 1);
            }
        }
        self.tx_swept.set(now);
    }

    /// Whether the next message goes out with `send(2)` from here: this worker has too few
    /// sessions to batch sends ([`DIRECT_SEND_SESSIONS`]), or the session is still in its
    /// handshake ([`DIRECT_FIRST_SENDS`]).
    fn sends_direct(&self) -> bool {
        self.sends.get() < DIRECT_FIRST_SENDS || self.w.session_count() <= DIRECT_SEND_SESSIONS
    }

    /// What a failed write to `side` ends: the browser gone, or the VM's socket failed.
    fn write_failed(&self, side: Side, e: &io::Error) -> End {
        match side {
            Side::Browser => client_write_error(e),
            Side::Vm => {
                tracing::debug!(session = self.session, upstream = %self.vm, error = %e, "upstream write failed");
                End::Cause(close::UPSTREAM_ERROR)
            }
        }
    }

    /// Writes all of `buf[off..end]` to `side` with `send(2)` from here, waiting for the
    /// socket when it is full: for a worker with too few sessions for a batch (see
    /// [`DIRECT_SEND_SESSIONS`]).
    async fn send_direct(
        &self,
        side: Side,
        buf: Box<[u8]>,
        mut off: usize,
        end: usize,
    ) -> (Result<(), End>, Box<[u8]>) {
        let (fd, stream) = match side {
            Side::Browser => (self.cfd, self.client),
            Side::Vm => (self.ufd, self.upstream),
        };
        while off < end {
            let e = match sys::send(fd, &buf[off..end], false) {
                Ok(n) => {
                    off += n;
                    continue;
                }
                Err(e) if is_would_block(&e) => match stream.writable(false).await {
                    Ok(()) => continue,
                    Err(e) => e,
                },
                Err(e) => e,
            };
            return (Err(self.write_failed(side, &e)), buf);
        }
        (Ok(()), buf)
    }

    /// Writes all of `buf[off..end]` to `side`: with `send(2)` from here when
    /// [`Relay::sends_direct`], otherwise with the runtime's send ops, through that socket's
    /// second descriptor, opened on first use (a session that never sends pays nothing for
    /// it). A small message goes to its op in a buffer of its own ([`SMALL_SEND`]) and the
    /// pooled `buf` goes straight back; a direct send holds no buffer past the call, so it
    /// copies nothing. Gives back the buffer it sent from. Dropped in flight, the count of
    /// bytes written is lost, and so is the descriptor.
    async fn send_all(
        &self,
        side: Side,
        mut buf: Box<[u8]>,
        mut off: usize,
        mut end: usize,
    ) -> (Result<(), End>, Box<[u8]>) {
        let direct = self.sends_direct();
        self.sends
            .set((self.sends.get() + 1).min(DIRECT_FIRST_SENDS));
        if direct {
            return self.send_direct(side, buf, off, end).await;
        }
        if end - off <= SMALL_SEND {
            let own: Box<[u8]> = buf[off..end].into();
            self.w.bufs.give(std::mem::replace(&mut buf, own));
            (off, end) = (0, end - off);
        }
        let (slot, stream) = match side {
            Side::Browser => (&self.tx_client, self.client),
            Side::Vm => (&self.tx_upstream, self.upstream),
        };
        let opened: io::Result<TcpStream> = slot.take().map_or_else(
            || {
                let tx = TcpStream::from_std(sys::dup_tcp(stream.as_raw_fd())?)?;
                self.tx_open.set(self.tx_open.get() + 1);
                self.timers_nudge.nudge();
                Ok(tx)
            },
            Ok,
        );
        let mut tx = match opened {
            Ok(tx) => tx,
            Err(e) => {
                tracing::error!(session = self.session, error = %e, "cannot open a send descriptor");
                return (Err(End::Cause(close::INTERNAL)), buf);
            }
        };
        let mut r = Ok(());
        while off < end {
            let (res, slice) = tx.write(buf.slice(off..end)).await;
            buf = slice.into_inner();
            let e = match res {
                Ok(0) => io::ErrorKind::WriteZero.into(),
                Ok(n) => {
                    off += n;
                    continue;
                }
                Err(e) => e,
            };
            r = Err(self.write_failed(side, &e));
            break;
        }
        slot.set(Some(tx));
        (r, buf)
    }

    /// Relays until one side ends, a timer fires or `kill` is fired. `early` holds bytes
    /// the client sent right behind its upgrade request.
    ///
    /// When the end comes from elsewhere than the VM-to-browser side, that side is not
    /// dropped mid-frame: it is told to stop and finishes the frame it is writing, for at
    /// most the keepalive timeout (a browser that takes no bytes that long is gone), so the
    /// close frame can follow a whole frame. Returns the end and the instant by which
    /// [`Relay::finish`] must be done.
    pub async fn run(
        &self,
        kill: &Signal<CloseCause>,
        expires: &Cell<Option<Instant>>,
        early: &[u8],
    ) -> (End, Instant) {
        let limit = self.w.limits.keepalive_timeout;
        let stop = Signal::new();
        let mut to_browser = std::pin::pin!(self.vm_to_browser(&stop));
        let end = monoio::select! {
            e = &mut to_browser => return (e.unwrap_or(End::Cause(close::INTERNAL)), Instant::now() + limit),
            e = self.browser_to_vm(early) => e,
            e = self.timers(expires) => e,
            c = kill.wait() => End::Cause(c),
        };
        let deadline = Instant::now() + limit;
        if matches!(end, End::ClientGone(_)) {
            return (end, deadline);
        }
        stop.fire(());
        match monoio::time::timeout_at(deadline.into(), to_browser).await {
            // The browser's socket failed while the frame was finishing.
            Ok(Some(e @ End::ClientGone(_))) => (e, deadline),
            Ok(_) => (end, deadline),
            Err(_) => {
                tracing::debug!(
                    session = self.session,
                    "the frame in flight did not finish within the keepalive timeout"
                );
                (end, deadline)
            }
        }
    }

    /// Completes the closing handshake by `deadline`: finishes the frame in flight (the
    /// browser gets every byte the VM sent), sends the close frame, and lingers for the
    /// browser's close. A frame whose send was abandoned leaves nothing to close cleanly.
    /// Returns whether the close frame went out.
    pub async fn finish(&self, end: End, deadline: Instant) -> bool {
        let frame = match end {
            End::ClientGone(_) => return false,
            End::ClientClose(code) => ControlFrame::close(code, ""),
            End::Cause(c) => ControlFrame::close(Some(c.code), c.reason),
        };
        if self.out.borrow().in_doubt() {
            return false;
        }
        let sent = monoio::time::timeout_at(deadline.into(), async {
            self.flush_inflight().await.map_err(drop)?;
            let _g = self.gate.acquire().await;
            self.wire.write_all(frame.as_bytes()).await.map_err(drop)
        })
        .await;
        let sent = matches!(sent, Ok(Ok(())));
        if sent {
            self.wire.linger_close(Duration::from_secs(2)).await;
        }
        sent
    }

    /// Relays until the session ends on this side (`Some`), or until `stop` fires and the
    /// frame in flight, if any, is written (`None`).
    async fn vm_to_browser(&self, stop: &Signal<()>) -> Option<End> {
        // Splice while reads come big, copy while they come small: the mode follows the
        // size of what the VM's socket held at the last read, not whether it ran dry (with
        // many sessions per worker, a streaming socket runs dry between readiness events).
        let mut streaming = false;
        // A short copy read emptied the socket: wait for readiness rather than spend a
        // syscall learning EAGAIN (the interactive case: small updates, echoes). While
        // streaming, reading optimistically wins, since data usually arrived meanwhile.
        let mut drained = false;
        let full_budget = if self.wire.tls().is_some() {
            TLS_RELAY_BUDGET
        } else {
            RELAY_BUDGET
        };
        let mut budget = full_budget;
        loop {
            if let Err(end) = self.flush_inflight().await {
                return Some(end);
            }
            if stop.get().is_some() {
                return None;
            }
            if drained {
                let ready = monoio::select! {
                    r = self.upstream.readable(false) => r,
                    () = stop.wait() => return None,
                };
                if ready.is_err() {
                    return Some(End::Cause(close::UPSTREAM_ERROR));
                }
            }
            let read = if streaming {
                self.splice_from_vm()
            } else {
                self.copy_from_vm()
            };
            match read {
                Ok(FromVm::Frame { len, full }) => {
                    self.to_browser.set(self.to_browser.get() + len as u64);
                    let st = &self.w.stats.to_browser;
                    st.set(st.get() + len as u64);
                    self.last_activity.set(Instant::now());
                    drained = !streaming && !full;
                    // Under TLS the payload is encrypted in user space anyway: no splice.
                    streaming = full && self.wire.tls().is_none();
                    budget = budget.saturating_sub(len);
                    if budget == 0 {
                        budget = full_budget;
                        self.w.turns.yield_now().await;
                    }
                }
                Ok(FromVm::WouldBlock) => drained = true,
                Err(end) => return Some(end),
            }
        }
    }

    /// A failed read from the VM: an empty socket, or the end of the session.
    fn vm_read_failed(&self, e: io::Error) -> Result<FromVm, End> {
        if is_would_block(&e) {
            return Ok(FromVm::WouldBlock);
        }
        tracing::debug!(session = self.session, upstream = %self.vm, error = %e, "upstream read failed");
        Err(End::Cause(close::UPSTREAM_ERROR))
    }

    /// Reads into a pooled buffer behind room for the header, and frames it in place.
    fn copy_from_vm(&self) -> Result<FromVm, End> {
        let mut buf = self.w.bufs.lend();
        match sys::recv(self.ufd, &mut buf[MAX_SERVER_HEADER..]) {
            Ok(0) => {
                self.w.bufs.give(buf);
                Err(End::Cause(close::UPSTREAM_CLOSED))
            }
            Ok(n) => {
                let mut hdr = [0u8; MAX_SERVER_HEADER];
                let hl = encode_header(&mut hdr, OP_BINARY, n as u64);
                let start = MAX_SERVER_HEADER - hl;
                buf[start..MAX_SERVER_HEADER].copy_from_slice(&hdr[..hl]);
                if let Some(r) = &self.rec {
                    r.borrow_mut()
                        .vm_bytes(&buf[MAX_SERVER_HEADER..MAX_SERVER_HEADER + n]);
                }
                let full = n == buf.len() - MAX_SERVER_HEADER;
                let mut o = self.out.borrow_mut();
                o.buf = Some(buf);
                o.off = start;
                o.end = MAX_SERVER_HEADER + n;
                Ok(FromVm::Frame { len: n, full })
            }
            Err(e) => {
                self.w.bufs.give(buf);
                self.vm_read_failed(e)
            }
        }
    }

    /// Splices from the VM's socket into a pipe, borrowed only now that data is flowing.
    fn splice_from_vm(&self) -> Result<FromVm, End> {
        let pipe = match self.out.borrow_mut().pipe.take() {
            Some(p) => p,
            None => self.w.pipes.lend().map_err(|e| {
                tracing::error!(error = %e, "cannot create relay pipe");
                End::Cause(close::INTERNAL)
            })?,
        };
        match sys::splice(self.ufd, pipe.write_fd(), pipe.capacity(), false) {
            Ok(0) => {
                self.w.pipes.give(pipe);
                Err(End::Cause(close::UPSTREAM_CLOSED))
            }
            Ok(n) => {
                if let Some(r) = &self.rec {
                    // Duplicated before the pipe drains to the browser.
                    r.borrow_mut().tee(pipe.read_fd(), n);
                }
                let mut o = self.out.borrow_mut();
                o.hdr_len = encode_header(&mut o.hdr, OP_BINARY, n as u64) as u8;
                o.hdr_off = 0;
                o.in_pipe = n;
                o.pipe = Some(pipe);
                Ok(FromVm::Frame { len: n, full: true })
            }
            Err(e) => {
                // Also when the VM just went quiet: give the pipe back before waiting.
                self.w.pipes.give(pipe);
                self.vm_read_failed(e)
            }
        }
    }

    /// Writes the rest of the frame in flight, if any, holding the write gate throughout.
    async fn flush_inflight(&self) -> Result<(), End> {
        if self.out.borrow().idle() {
            return Ok(());
        }
        let _g = self.gate.acquire().await;
        let copied = {
            let mut o = self.out.borrow_mut();
            let (off, end) = (o.off, o.end);
            o.buf.take().filter(|_| off < end).map(|b| (b, off, end))
        };
        if let Some((buf, off, end)) = copied {
            if let Some(tls) = self.wire.tls() {
                // The whole frame into rustls at once (see `server::client`).
                let r = tls.write_all(&buf[off..end]).await;
                self.w.bufs.give(buf);
                self.out.borrow_mut().off = end;
                return r.map_err(|e| client_write_error(&e));
            }
            // The copy path: one send op for the whole frame.
            let (r, buf) = self.send_all(Side::Browser, buf, off, end).await;
            let mut o = self.out.borrow_mut();
            if r.is_ok() {
                o.off = end;
                self.w.bufs.give(buf);
            } else {
                // Nothing more goes to this browser; the buffer is back for `Drop`.
                o.buf = Some(buf);
            }
            return r;
        }
        loop {
            let r = {
                let mut o = self.out.borrow_mut();
                if o.hdr_off < o.hdr_len {
                    let (off, len) = (o.hdr_off as usize, o.hdr_len as usize);
                    sys::send(self.cfd, &o.hdr[off..len], true).map(|n| {
                        o.hdr_off += n as u8;
                    })
                } else if o.in_pipe > 0 {
                    let rfd = o.pipe.as_ref().expect("pipe holds the payload").read_fd();
                    match sys::splice(rfd, self.cfd, o.in_pipe, false) {
                        Ok(0) => Err(io::Error::other("pipe drained early")),
                        Ok(n) => {
                            o.in_pipe -= n;
                            Ok(())
                        }
                        Err(e) => Err(e),
                    }
                } else {
                    return Ok(());
                }
            };
            match r {
                Ok(()) => {}
                Err(e) if is_would_block(&e) => {
                    if let Err(e) = self.client.writable(false).await {
                        return Err(client_write_error(&e));
                    }
                }
                Err(e) => return Err(client_write_error(&e)),
            }
        }
    }

    async fn browser_to_vm(&self, early: &[u8]) -> End {
        let mut early = Some(early).filter(|e| !e.is_empty());
        let mut budget = RELAY_BUDGET;
        // Browser messages are small: after a short read the socket is empty, so wait for
        // readiness first instead of spending a syscall on EAGAIN.
        let mut drained = false;
        let tls = self.wire.tls();
        loop {
            if drained && tls.is_none() && self.client.readable(false).await.is_err() {
                return End::ClientGone("browser connection error");
            }
            let mut buf = self.w.bufs.lend();
            let n = match early.take() {
                Some(e) => {
                    let n = e.len().min(buf.len());
                    buf[..n].copy_from_slice(&e[..n]);
                    n
                }
                // rustls may hold decrypted bytes the socket's readiness knows nothing
                // of: ask it, and it waits on the socket when it has none.
                None if tls.is_some() => match self.wire.read(&mut buf).await {
                    Ok(0) => {
                        self.w.bufs.give(buf);
                        return End::ClientGone(
                            "browser closed the connection without a close frame",
                        );
                    }
                    Ok(n) => n,
                    Err(e) => {
                        self.w.bufs.give(buf);
                        return match e.kind() {
                            io::ErrorKind::UnexpectedEof => End::ClientGone(
                                "browser closed the connection without a close frame",
                            ),
                            io::ErrorKind::InvalidData => End::ClientGone("browser TLS error"),
                            _ => End::ClientGone("browser connection reset"),
                        };
                    }
                },
                None => match sys::recv(self.cfd, &mut buf) {
                    Ok(0) => {
                        self.w.bufs.give(buf);
                        return End::ClientGone(
                            "browser closed the connection without a close frame",
                        );
                    }
                    Ok(n) => n,
                    Err(e) if is_would_block(&e) => {
                        // Nothing to read: hold no buffer while waiting.
                        self.w.bufs.give(buf);
                        drained = true;
                        continue;
                    }
                    Err(_) => {
                        self.w.bufs.give(buf);
                        return End::ClientGone("browser connection reset");
                    }
                },
            };
            drained = n < buf.len();
            let (r, buf) = self.forward_browser_bytes(buf, n).await;
            self.w.bufs.give(buf);
            if let Err(end) = r {
                return end;
            }
            budget = budget.saturating_sub(n);
            if budget == 0 {
                budget = RELAY_BUDGET;
                self.w.turns.yield_now().await;
            }
        }
    }

    /// Parses one read's worth of client bytes (`buf[..n]`): unmasks and forwards binary
    /// payload to the VM, answers pings, notes pongs. Payload that preceded a close or a
    /// protocol error in the same read is still delivered to the VM first. Gives the buffer
    /// back.
    async fn forward_browser_bytes(
        &self,
        mut buf: Box<[u8]>,
        n: usize,
    ) -> (Result<(), End>, Box<[u8]>) {
        let (data_end, pongs, outcome) = self.parse_browser_bytes(&mut buf[..n]);
        // A view-only viewer's payload loses what acts, in place, before anything is sent.
        let data_end = match &self.view_only {
            None => data_end,
            Some(v) => match v.borrow_mut().filter(self.session, &mut buf[..data_end]) {
                Ok(kept) => kept,
                Err(cause) => return (Err(End::Cause(cause)), buf),
            },
        };
        // The input recorded is what reaches the VM (a view-only viewer's, filtered).
        if let Some(r) = self.rec.as_ref().filter(|_| data_end > 0) {
            r.borrow_mut().browser_bytes(&buf[..data_end]);
        }
        if data_end > 0 {
            let (r, b) = self.send_all(Side::Vm, buf, 0, data_end).await;
            buf = b;
            if let Err(end) = r {
                return (Err(end), buf);
            }
            self.to_vm.set(self.to_vm.get() + data_end as u64);
            let st = &self.w.stats.to_vm;
            st.set(st.get() + data_end as u64);
            self.last_activity.set(Instant::now());
        }
        // Pings that came before a close still get their pongs; after a protocol error
        // nothing but the close frame is sent.
        if matches!(outcome, Ok(()) | Err(End::ClientClose(_))) {
            for p in &pongs {
                let pong = ControlFrame::new(OP_PONG, p.as_slice());
                if let Err(e) = self.send_control(&pong).await {
                    return (Err(client_write_error(&e)), buf);
                }
            }
        }
        (outcome, buf)
    }

    /// Runs the parser over `buf`: compacts the unmasked payload to the front (returns its
    /// length), collects pings, and says how the bytes ended.
    fn parse_browser_bytes(&self, buf: &mut [u8]) -> (usize, Vec<ControlPayload>, Result<(), End>) {
        let mut off = 0;
        let mut data_end = 0;
        // Every ping gets its pong, in order (answering only the last one is allowed by
        // RFC 6455 §5.5.3, but clients measuring latency count them). Rarely more than one.
        let mut pongs: Vec<ControlPayload> = Vec::new();
        let mut outcome = Ok(());
        while off < buf.len() {
            let step = self.parser.borrow_mut().step(&mut buf[off..]);
            match step {
                Err(pe) => {
                    outcome = Err(End::Cause(close::protocol(pe)));
                    break;
                }
                Ok(s) => {
                    match s.item {
                        Some(Item::Data(r)) => {
                            let len = r.len();
                            buf.copy_within(off + r.start..off + r.end, data_end);
                            data_end += len;
                        }
                        Some(Item::Ping(p)) => pongs.push(p),
                        Some(Item::Pong(_)) => self.deadlines.borrow_mut().pong(),
                        Some(Item::Close(c)) => {
                            outcome = Err(End::ClientClose(c.code));
                            break;
                        }
                        None => {}
                    }
                    off += s.consumed;
                }
            }
        }
        (data_end, pongs, outcome)
    }

    async fn send_control(&self, frame: &ControlFrame) -> io::Result<()> {
        let _g = self.gate.acquire().await;
        self.wire.write_all(frame.as_bytes()).await
    }

    /// Keepalive pings and their pong deadline, the idle timeout, the route's expiry and
    /// the session duration cap.
    async fn timers(&self, expires_at: &Cell<Option<Instant>>) -> End {
        loop {
            let now = Instant::now();
            let sweep_at = (self.tx_open.get() > 0)
                .then(|| self.last_activity.get().max(self.tx_swept.get()) + SEND_HANDLE_IDLE);
            if sweep_at.is_some_and(|t| now >= t) {
                self.close_idle_send_handles(now);
                continue;
            }
            let next =
                self.deadlines
                    .borrow()
                    .next(now, expires_at.get(), self.last_activity.get());
            let wake = match next {
                Next::Close(cause) => return End::Cause(cause),
                Next::Ping => {
                    let ping = ControlFrame::new(OP_PING, b"vncgate");
                    let limit = self.deadlines.borrow().ping_timeout();
                    match monoio::time::timeout(limit, self.send_control(&ping)).await {
                        Err(_) => return End::Cause(close::KEEPALIVE_TIMEOUT),
                        Ok(Err(e)) => return client_write_error(&e),
                        Ok(Ok(())) => self.deadlines.borrow_mut().ping_sent(now, Instant::now()),
                    }
                    continue;
                }
                Next::Wait(at) => [at, sweep_at].into_iter().flatten().min(),
            };
            match wake {
                Some(t) => monoio::select! {
                    () = monoio::time::sleep(t.saturating_duration_since(now)) => {}
                    () = self.timers_nudge.wait() => {}
                },
                None => self.timers_nudge.wait().await,
            }
        }
    }
}

fn client_write_error(e: &io::Error) -> End {
    tracing::debug!(error = %e, "browser write failed");
    End::ClientGone("browser connection reset")
}

impl<S: RouteSource> Drop for Relay<'_, S> {
    fn drop(&mut self) {
        let mut o = self.out.borrow_mut();
        if let Some(b) = o.buf.take() {
            self.w.bufs.give(b);
        }
        if let Some(p) = o.pipe.take() {
            if o.in_pipe == 0 {
                self.w.pipes.give(p);
            } else {
                self.w.pipes.forget(p);
            }
        }
    }
}
