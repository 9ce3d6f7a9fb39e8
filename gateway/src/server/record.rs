//! Session recording (`--record DIR`): each recorded session's VM-to-browser stream, and
//! with `--record-input` the browser's, into one file per session in the format of
//! [`crate::recording`].
//!
//! The relay never waits for a recording. Each recording has a writer thread, a head pipe
//! and a ring of data pipes:
//!
//! - the **data pipes** get the payload. On the splice path the relay `tee(2)`s the relay
//!   pipe's contents into an empty data pipe (page references: the bytes still never enter
//!   user space); on the copy path, where the bytes are in user space anyway (small reads,
//!   TLS), it `write(2)`s them. When no data pipe is empty (the writer is behind), a splice
//!   is teed into a scratch pipe and copied through user space into the room the ring has
//!   left, until the writer catches up.
//! - the **head pipe** gets each record's head (kind, time, length, and which data pipe),
//!   written after the payload is in its data pipe, so a payload that did not fit is never
//!   announced.
//!
//! The writer thread reads a head, `splice(2)`s that many bytes from the data pipe it names
//! into the file (kernel to page cache), and so on; writeback stalls land on it, not on a
//! worker. Every write end is non-blocking. When the whole ring (8 relay pipes' worth) is
//! full, the writer has fallen too far behind: the recording ends (`lagged`), the session
//! goes on. When the file cannot be written (`ENOSPC`, `EDQUOT`: `disk_full`; anything
//! else: `write_error`), the writer truncates the file back to its last whole record,
//! appends an end record if it can, and closes its pipe ends, so the relay's next write
//! fails and the relay stops recording. Caps (`--record-max-session-bytes`,
//! `--record-max-dir-bytes`) are checked by the relay before each record, a record being
//! all or nothing. Every recording ends once, counted in `vncgate_recordings_total{result}`
//! and logged with the session id; so does a session that could not be recorded at all
//! (the directory full, the file not created).
//!
//! A session that is not recorded carries no [`Recorder`]: its relay pays one branch per
//! read.

use std::fs::File;
use std::io::{self, Read as _, Seek as _, Write as _};
use std::os::fd::{AsRawFd as _, OwnedFd};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicU8, AtomicU64, Ordering};
use std::time::{Instant, SystemTime, UNIX_EPOCH};

use crate::config::RecordSettings;
use crate::metrics as m;
use crate::recording::{self, EndReason, FLAG_INPUT, Header, Kind, RECORD_HEAD};
use crate::sys;

/// The file name suffix of a recording.
pub const SUFFIX: &str = ".vncrec";

/// Head pipe size: 4681 heads of 14 bytes, merged into 16 pages.
const HEAD_PIPE: usize = 64 << 10;

/// Data pipes per recording, each of the relay pipe's size: how far (in relay pipes' worth,
/// 8 MiB by default) the writer may fall behind before the recording ends as `lagged`.
/// Pipe pages are allocated only while they hold data.
const DATA_PIPES: usize = 8;

/// A head in the head pipe: the file's record head, then the data pipe holding the payload.
const PIPE_HEAD: usize = RECORD_HEAD + 1;

/// Room held back under both caps for the end record (its head and the longest reason).
const END_ROOM: u64 = (RECORD_HEAD + 11) as u64;

/// The recording directory, shared by all workers: where files go, what is recorded, and the
/// bytes the directory holds (for its cap).
#[derive(Debug)]
pub struct Recordings {
    cfg: RecordSettings,
    /// Data pipe capacity asked for: the relay pipe's, so one tee of a full relay pipe fits
    /// an empty data pipe.
    pipe_size: usize,
    /// Bytes of recordings in the directory: scanned at start (and again when a new
    /// recording would find the directory full, in case files were removed), then counted
    /// as records are admitted.
    used: AtomicU64,
    /// Tells apart two recordings of one session started in the same microsecond.
    seq: AtomicU64,
    /// Writer threads still running, for a drain to wait on.
    writers: AtomicU64,
}

/// Bytes of `*.vncrec` files in `dir`.
fn scan(dir: &Path) -> io::Result<u64> {
    let mut total = 0;
    for e in std::fs::read_dir(dir)? {
        let e = e?;
        if e.file_name().to_string_lossy().ends_with(SUFFIX) {
            total += e.metadata().map_or(0, |m| m.len());
        }
    }
    Ok(total)
}

impl Recordings {
    /// Opens (creates) the directory and measures what it holds.
    pub fn open(cfg: &RecordSettings, pipe_size: usize) -> Result<Arc<Recordings>, String> {
        let dir = &cfg.dir;
        std::fs::create_dir_all(dir)
            .map_err(|e| format!("--record {}: cannot create: {e}", dir.display()))?;
        let used =
            scan(dir).map_err(|e| format!("--record {}: cannot read: {e}", dir.display()))?;
        tracing::info!(dir = %dir.display(), used_bytes = used, max_dir_bytes = cfg.max_dir_bytes, scope = cfg.scope.as_str(), input = cfg.input, "recording sessions");
        Ok(Arc::new(Recordings {
            cfg: cfg.clone(),
            pipe_size,
            used: AtomicU64::new(used),
            seq: AtomicU64::new(0),
            writers: AtomicU64::new(0),
        }))
    }

    /// Whether a session of a route with this `record` field is recorded.
    pub fn wanted(&self, route_record: bool) -> bool {
        route_record || self.cfg.scope == crate::config::RecordScope::All
    }

    pub fn dir(&self) -> &Path {
        &self.cfg.dir
    }

    /// Waits (up to `within`) for the writers of ended sessions to finish their files.
    pub fn wait_writers(&self, within: std::time::Duration) {
        let deadline = Instant::now() + within;
        while self.writers.load(Ordering::Acquire) > 0 {
            if Instant::now() > deadline {
                tracing::warn!(
                    writers = self.writers.load(Ordering::Acquire),
                    "recordings still being written at exit: their files end without an end record"
                );
                return;
            }
            std::thread::sleep(std::time::Duration::from_millis(10));
        }
    }

    /// Bytes counted against the directory cap.
    pub fn used(&self) -> u64 {
        self.used.load(Ordering::Relaxed)
    }

    /// Reserves `n` bytes under the directory cap.
    fn reserve(&self, n: u64) -> bool {
        let before = self.used.fetch_add(n, Ordering::Relaxed);
        if before + n > self.cfg.max_dir_bytes {
            self.used.fetch_sub(n, Ordering::Relaxed);
            return false;
        }
        true
    }

    fn release(&self, n: u64) {
        self.used.fetch_sub(n, Ordering::Relaxed);
    }

    /// Starts recording `session`; `None` when it cannot (counted and logged: the session
    /// goes on unrecorded).
    pub fn start(self: &Arc<Self>, session: &str) -> Option<Recorder> {
        match self.try_start(session) {
            Ok(r) => Some(r),
            Err((reason, why)) => {
                metrics::counter!(m::RECORDINGS, "result" => reason.as_str()).increment(1);
                tracing::warn!(session, result = reason.as_str(), error = %why, "session not recorded");
                None
            }
        }
    }

    fn try_start(self: &Arc<Self>, session: &str) -> Result<Recorder, (EndReason, String)> {
        let now = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .unwrap_or_default();
        let header = Header {
            flags: if self.cfg.input { FLAG_INPUT } else { 0 },
            start_unix_micros: now.as_micros() as u64,
            session: session.to_owned(),
        }
        .encode();
        let hl = header.len() as u64 + END_ROOM;
        if !self.reserve(hl) {
            // Files may have been removed since the last look.
            if let Ok(u) = scan(&self.cfg.dir) {
                self.used.store(u, Ordering::Relaxed);
            }
            if !self.reserve(hl) {
                return Err((
                    EndReason::DirCap,
                    format!(
                        "{} holds {} bytes of recordings, --record-max-dir-bytes is {}",
                        self.cfg.dir.display(),
                        self.used(),
                        self.cfg.max_dir_bytes
                    ),
                ));
            }
        }
        let r = self.create(session, now, &header);
        if r.is_err() {
            self.release(hl);
        }
        r
    }

    fn create(
        self: &Arc<Self>,
        session: &str,
        now: std::time::Duration,
        header: &[u8],
    ) -> Result<Recorder, (EndReason, String)> {
        let seq = self.seq.fetch_add(1, Ordering::Relaxed);
        // Session id and start time (and a sequence number for two in one microsecond);
        // never the token.
        let name = format!(
            "{session}-{}.{:06}-{seq}{SUFFIX}",
            now.as_secs(),
            now.subsec_micros()
        );
        let path = self.cfg.dir.join(name);
        let io_err = |what: &str, e: io::Error| (reason_of(&e), format!("{what}: {e}"));
        let mut file = std::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .open(&path)
            .map_err(|e| io_err(&format!("cannot create {}", path.display()), e))?;
        if let Err(e) = file.write_all(header) {
            let _ = std::fs::remove_file(&path);
            return Err(io_err(&format!("cannot write {}", path.display()), e));
        }
        let pipes = (|| -> io::Result<_> {
            let mut reads = Vec::with_capacity(DATA_PIPES);
            let mut writes = Vec::with_capacity(DATA_PIPES);
            let mut smallest = usize::MAX;
            for _ in 0..DATA_PIPES {
                let (r, w, cap) = sys::recording_pipe(self.pipe_size)?;
                smallest = smallest.min(cap);
                reads.push(r);
                writes.push(w);
            }
            let (hr, hw, _) = sys::recording_pipe(HEAD_PIPE)?;
            Ok((reads, writes, hr, hw, smallest))
        })();
        let (data_r, data_w, head_r, head_w, granted) = match pipes {
            Ok(p) => p,
            Err(e) => {
                let _ = std::fs::remove_file(&path);
                return Err((
                    EndReason::WriteError,
                    format!("cannot create a recording pipe: {e}"),
                ));
            }
        };
        if granted < self.pipe_size {
            // The per-user pipe quota (fs.pipe-user-pages-soft) refused the size: a spliced
            // frame bigger than this pipe ends the recording as lagged.
            tracing::warn!(
                session,
                granted,
                asked = self.pipe_size,
                "recording pipes smaller than the relay pipe (fs.pipe-user-pages-soft?)"
            );
        }
        let queued: Arc<[AtomicU64]> = (0..DATA_PIPES).map(|_| AtomicU64::new(0)).collect();
        let link = Arc::new(Link::default());
        let t0 = Instant::now();
        let writer = Writer {
            session: session.into(),
            path: path.clone(),
            file,
            heads: File::from(head_r),
            data: data_r,
            queued: queued.clone(),
            written: header.len() as u64,
            link: link.clone(),
            dirs: self.clone(),
            t0,
        };
        self.writers.fetch_add(1, Ordering::AcqRel);
        let spawned = std::thread::Builder::new()
            .name("vncgate-rec".into())
            .spawn(move || writer.run());
        if let Err(e) = spawned {
            self.writers.fetch_sub(1, Ordering::AcqRel);
            let _ = std::fs::remove_file(&path);
            return Err((
                EndReason::WriteError,
                format!("cannot start the writer thread: {e}"),
            ));
        }
        tracing::info!(session, file = %path.display(), input = self.cfg.input, "recording session");
        Ok(Recorder {
            pipes: Some((head_w, data_w)),
            queued,
            cur: 0,
            scratch: None,
            t0,
            input: self.cfg.input,
            left: self
                .cfg
                .max_session_bytes
                .saturating_sub(header.len() as u64 + END_ROOM),
            dirs: self.clone(),
            link,
        })
    }
}

/// How a failed write names the end of a recording.
fn reason_of(e: &io::Error) -> EndReason {
    match e.raw_os_error() {
        Some(libc::ENOSPC | libc::EDQUOT) => EndReason::DiskFull,
        _ => EndReason::WriteError,
    }
}

/// What the relay and the writer tell each other: the first to end the recording names why.
#[derive(Debug, Default)]
struct Link {
    /// 0 while recording; else 1 + the index of the reason in [`EndReason::ALL`].
    ended: AtomicU8,
}

impl Link {
    /// Sets the reason unless one is set; returns the one that stands.
    fn end(&self, r: EndReason) -> EndReason {
        let i = EndReason::ALL.iter().position(|&x| x == r).unwrap_or(0) as u8 + 1;
        match self
            .ended
            .compare_exchange(0, i, Ordering::AcqRel, Ordering::Acquire)
        {
            Ok(_) => r,
            Err(old) => EndReason::ALL[old as usize - 1],
        }
    }

    fn get(&self) -> Option<EndReason> {
        match self.ended.load(Ordering::Acquire) {
            0 => None,
            i => Some(EndReason::ALL[i as usize - 1]),
        }
    }
}

/// A session's recording, as the relay holds it. Dropped, it ends the recording as
/// `complete` (unless it had already ended).
pub struct Recorder {
    /// The head pipe's and the data pipes' write ends; `None` once the recording ended.
    pipes: Option<(OwnedFd, Vec<OwnedFd>)>,
    /// Bytes in each data pipe: added here, taken off by the writer. An empty pipe takes a
    /// whole relay pipe's tee.
    queued: Arc<[AtomicU64]>,
    /// The data pipe written last.
    cur: usize,
    /// For a splice while no data pipe is empty: a pipe to tee into and a buffer to read
    /// it into (made on first need).
    scratch: Option<(sys::Pipe, Vec<u8>)>,
    t0: Instant,
    input: bool,
    /// Bytes the session cap still allows.
    left: u64,
    dirs: Arc<Recordings>,
    link: Arc<Link>,
}

impl Recorder {
    fn micros(&self) -> u64 {
        self.t0.elapsed().as_micros() as u64
    }

    /// Whether a record of `n` payload bytes may be written (caps, and a writer that has
    /// not failed); ends the recording if not.
    fn admit(&mut self, n: usize) -> bool {
        if self.pipes.is_none() {
            return false;
        }
        if self.link.get().is_some() {
            self.stop(EndReason::WriteError);
            return false;
        }
        let cost = (RECORD_HEAD + n) as u64;
        if cost > self.left {
            self.stop(EndReason::SessionCap);
            return false;
        }
        if !self.dirs.reserve(cost) {
            self.stop(EndReason::DirCap);
            return false;
        }
        self.left -= cost;
        true
    }

    /// Ends the recording from the relay's side: names why (unless the writer already
    /// did) and closes the pipes, so the writer finishes the file.
    fn stop(&mut self, why: EndReason) {
        self.link.end(why);
        self.pipes = None;
    }

    /// A failed pipe write: full (the writer is behind), or closed by a writer that failed
    /// (which named the reason).
    fn pipe_failed(&mut self, e: Option<io::Error>) {
        let why = match e {
            Some(e) if e.kind() != io::ErrorKind::WouldBlock => EndReason::WriteError,
            _ => EndReason::Lagged,
        };
        self.stop(why);
    }

    /// Announces `n` bytes just put in data pipe `pipe`.
    fn head(&mut self, kind: Kind, pipe: usize, n: usize) -> bool {
        self.queued[pipe].fetch_add(n as u64, Ordering::Release);
        let mut h = [0u8; PIPE_HEAD];
        h[..RECORD_HEAD].copy_from_slice(&recording::record_head(kind, self.micros(), n as u32));
        h[RECORD_HEAD] = pipe as u8;
        let Some((heads, _)) = &self.pipes else {
            return false;
        };
        // Under PIPE_BUF: written whole or not at all.
        match sys::write(heads.as_raw_fd(), &h) {
            Ok(PIPE_HEAD) => true,
            Ok(_) => {
                self.pipe_failed(None);
                false
            }
            Err(e) => {
                self.pipe_failed(Some(e));
                false
            }
        }
    }

    /// The splice path: the `n` bytes at the front of the relay pipe (`pipe_read`), about
    /// to go to the browser, are teed into an empty data pipe. With none empty (the writer
    /// is behind), they are teed into a scratch pipe and copied through user space into the
    /// room the data pipes have left: a copy only while the writer catches up.
    pub fn tee(&mut self, pipe_read: std::os::fd::RawFd, n: usize) {
        if !self.admit(n) {
            return;
        }
        let empty = (0..DATA_PIPES)
            .map(|k| (self.cur + k) % DATA_PIPES)
            .find(|&i| self.queued[i].load(Ordering::Acquire) == 0);
        let Some(i) = empty else {
            return self.tee_through_user_space(pipe_read, n);
        };
        let Some((_, data)) = &self.pipes else { return };
        match sys::tee(pipe_read, data[i].as_raw_fd(), n) {
            Ok(m) => {
                self.cur = i;
                // Less than all only when the pipe was granted less room than the relay's.
                if self.head(Kind::VmToBrowser, i, m) && m < n {
                    self.pipe_failed(None);
                }
            }
            Err(e) => self.pipe_failed(Some(e)),
        }
    }

    fn tee_through_user_space(&mut self, pipe_read: std::os::fd::RawFd, n: usize) {
        if self.scratch.is_none() {
            match sys::Pipe::new(self.dirs.pipe_size) {
                Ok(p) => self.scratch = Some((p, Vec::new())),
                Err(e) => return self.pipe_failed(Some(e)),
            }
        }
        let Some((pipe, buf)) = &mut self.scratch else {
            return;
        };
        let mut r = match sys::tee(pipe_read, pipe.write_fd(), n) {
            Ok(m) if m == n => Ok(()),
            Ok(_) => Err(None),
            Err(e) => Err(Some(e)),
        };
        buf.resize(n, 0);
        let mut got = 0;
        while r.is_ok() && got < n {
            match sys::read(pipe.read_fd(), &mut buf[got..n]) {
                Ok(0) => r = Err(None),
                Ok(k) => got += k,
                Err(e) => r = Err(Some(e)),
            }
        }
        if let Err(e) = r {
            // The scratch pipe may hold a part: it is not reused.
            self.scratch = None;
            return self.pipe_failed(e);
        }
        let bytes = std::mem::take(buf);
        self.put(Kind::VmToBrowser, &bytes[..n]);
        if let Some((_, b)) = &mut self.scratch {
            *b = bytes;
        }
    }

    /// The copy path: bytes from the VM, in user space, about to go to the browser.
    pub fn vm_bytes(&mut self, b: &[u8]) {
        self.copied(Kind::VmToBrowser, b);
    }

    /// The browser's payload, deframed and unmasked, about to go to the VM (only with
    /// `--record-input`).
    pub fn browser_bytes(&mut self, b: &[u8]) {
        if self.input {
            self.copied(Kind::BrowserToVm, b);
        }
    }

    /// Writes `b` into the data pipes, from the current one on, as one record per pipe
    /// it lands in.
    fn copied(&mut self, kind: Kind, b: &[u8]) {
        if !b.is_empty() && self.admit(b.len()) {
            self.put(kind, b);
        }
    }

    /// [`Recorder::copied`] once admitted.
    fn put(&mut self, kind: Kind, mut b: &[u8]) {
        let mut tried = 0;
        while !b.is_empty() {
            if tried == DATA_PIPES {
                return self.pipe_failed(None);
            }
            let i = self.cur;
            let Some((_, data)) = &self.pipes else { return };
            match sys::write(data[i].as_raw_fd(), b) {
                Ok(m) => {
                    if !self.head(kind, i, m) {
                        return;
                    }
                    b = &b[m..];
                    tried = 0;
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
                Err(e) => return self.pipe_failed(Some(e)),
            }
            if !b.is_empty() {
                self.cur = (i + 1) % DATA_PIPES;
                tried += 1;
            }
        }
    }
}

impl Drop for Recorder {
    fn drop(&mut self) {
        if self.pipes.is_some() {
            self.stop(EndReason::Complete);
        }
    }
}

/// The writer thread's side of a recording.
struct Writer {
    session: Box<str>,
    path: PathBuf,
    file: File,
    heads: File,
    data: Vec<OwnedFd>,
    queued: Arc<[AtomicU64]>,
    /// Bytes in the file: its last whole record ends here.
    written: u64,
    link: Arc<Link>,
    dirs: Arc<Recordings>,
    t0: Instant,
}

/// How the copying loop stopped.
enum Stop {
    /// The relay closed the pipes at a record boundary.
    Closed,
    /// A head or payload was cut off (the relay stopped inside a record).
    Cut,
    /// The file could not be written.
    File(io::Error),
}

impl Writer {
    fn run(mut self) {
        // With a writer thread per recording, fair scheduling would hand 50 recordings 25
        // times the CPU of 2 workers: the writers take what the relay leaves instead.
        if let Err(e) = sys::lowest_thread_priority() {
            tracing::debug!(error = %e, "cannot lower the recording writer's priority");
        }
        let stop = self.copy();
        // Nothing more is read: a relay still writing gets EPIPE and stops.
        let Writer {
            session,
            path,
            mut file,
            heads,
            data,
            queued: _,
            written,
            link,
            dirs,
            t0,
        } = self;
        // A failed write is named before the pipes close: the relay, finding them closed,
        // would name its broken pipe (`write_error`) first, and a full disk would not say so.
        let failed = match &stop {
            Stop::File(e) => Some(link.end(reason_of(e))),
            Stop::Closed | Stop::Cut => None,
        };
        drop((heads, data));
        let reason = failed.unwrap_or_else(|| link.get().unwrap_or(EndReason::Complete));
        // Back to the last whole record, giving back what a failed write left.
        if let Ok(meta) = file.metadata()
            && meta.len() > written
        {
            let _ = file.set_len(written);
            dirs.release(meta.len() - written);
        }
        // The position stays where the last write left it: back to the cut.
        let _ = file.seek(io::SeekFrom::Start(written));
        let why = reason.as_str().as_bytes();
        let end =
            recording::record_head(Kind::End, t0.elapsed().as_micros() as u64, why.len() as u32);
        let mut rec = end.to_vec();
        rec.extend_from_slice(why);
        let ended = file.write_all(&rec).is_ok();
        if !ended {
            // A full disk: the file stays whole without its end record.
            let _ = file.set_len(written);
        }
        let total = if ended {
            written + rec.len() as u64
        } else {
            written
        };
        dirs.release(END_ROOM - if ended { rec.len() as u64 } else { 0 });
        metrics::counter!(m::RECORDINGS, "result" => reason.as_str()).increment(1);
        metrics::counter!(m::RECORDED_BYTES).increment(total);
        match (&stop, reason) {
            (_, EndReason::Complete) => {
                tracing::info!(session = &*session, file = %path.display(), bytes = total, result = reason.as_str(), "recording ended");
            }
            (Stop::File(e), _) => {
                tracing::warn!(session = &*session, file = %path.display(), bytes = total, result = reason.as_str(), error = %e, end_record = ended, "recording ended: cannot write the file; the session goes on");
            }
            _ => {
                tracing::warn!(session = &*session, file = %path.display(), bytes = total, result = reason.as_str(), "recording ended early; the session goes on");
            }
        }
        drop(file);
        dirs.writers.fetch_sub(1, Ordering::AcqRel);
    }

    /// Copies records until the relay closes the pipes or the file fails.
    fn copy(&mut self) -> Stop {
        let mut h = [0u8; PIPE_HEAD];
        loop {
            let mut got = 0;
            while got < PIPE_HEAD {
                match self.heads.read(&mut h[got..]) {
                    Ok(0) if got == 0 => return Stop::Closed,
                    Ok(0) => return Stop::Cut,
                    Ok(n) => got += n,
                    Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                    Err(_) => return Stop::Cut,
                }
            }
            let head: &[u8; RECORD_HEAD] = h[..RECORD_HEAD].try_into().expect("13 bytes");
            let pipe = h[RECORD_HEAD] as usize;
            let (Some((_, _, len)), Some(data)) =
                (recording::parse_record_head(head), self.data.get(pipe))
            else {
                return Stop::Cut;
            };
            if let Err(e) = self.file.write_all(head) {
                return Stop::File(e);
            }
            let mut left = len as usize;
            while left > 0 {
                match sys::splice_to_file(data.as_raw_fd(), self.file.as_raw_fd(), left) {
                    Ok(0) => return Stop::Cut,
                    Ok(n) => {
                        left -= n;
                        self.queued[pipe].fetch_sub(n as u64, Ordering::Release);
                    }
                    Err(e) => return Stop::File(e),
                }
            }
            self.written += (RECORD_HEAD + len as usize) as u64;
        }
    }
}
