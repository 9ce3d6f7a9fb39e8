//! The synthetic RFB server: the demo's VM, the tests' upstream and a load-test target.
//!
//! RFB 3.8 with security None (or VNC Authentication when a password is set), a 32 bpp
//! true-colour ServerInit, Raw updates of a moving picture at most `fps` per second per
//! session, and every ClientCutText echoed straight back as ServerCutText so input round
//! trips can be timed through a gateway.
//!
//! The protocol lives in [`session`] (sans-IO) and [`paint`] (the picture); this file is the
//! tokio edge: accept, one task per connection, read/write/timer loop.
//!
//! From another crate's tests:
//!
//! ```no_run
//! let addr = vncgate_loadtest::fakevm::spawn_background(Default::default()).unwrap();
//! // connect an RFB client (or a gateway route) to `addr`
//! # let _ = addr;
//! ```

pub mod paint;
pub mod session;

use std::fmt;
use std::io;
use std::net::{Ipv4Addr, SocketAddr};
use std::str::FromStr;
use std::sync::Arc;
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tracing::{info, warn};

use session::VmSession;
use vncgate_rfb::RfbError;

/// Shape of the pixel data in updates.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, clap::ValueEnum)]
pub enum Payload {
    /// Sliding colour bars with a ripple: a visibly animated desktop.
    #[default]
    Raw,
    /// Flat colour plus a grid: what a compressing transport squeezes to almost nothing.
    Compressible,
    /// Random bytes: the worst case for any compression on the path.
    Incompressible,
}

/// How much of the screen one incremental update repaints.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum UpdateArea {
    /// A full-width band this fraction of the screen tall (0 < f <= 1; 1 is the full screen).
    Fraction(f64),
    /// A rectangle of this size (clamped to the screen) moving across it.
    Size { width: u16, height: u16 },
}

impl Default for UpdateArea {
    /// A tenth of the screen: at 1024x768x4 that is about 300 KiB per update, enough to load
    /// a path without making every frame the 3 MiB a full screen would be.
    fn default() -> UpdateArea {
        UpdateArea::Fraction(0.1)
    }
}

impl UpdateArea {
    /// The (width, height) of the changed rectangle on a `w` x `h` screen, never empty.
    pub fn band_size(&self, w: u16, h: u16) -> (u16, u16) {
        match *self {
            UpdateArea::Fraction(f) => {
                let bh = (f64::from(h) * f).round().clamp(1.0, f64::from(h.max(1)));
                (w, bh as u16)
            }
            UpdateArea::Size { width, height } => (width.clamp(1, w), height.clamp(1, h)),
        }
    }
}

impl FromStr for UpdateArea {
    type Err = String;

    /// `0.1` (fraction), `256x64` (size) or `full`.
    fn from_str(s: &str) -> Result<UpdateArea, String> {
        if s == "full" {
            return Ok(UpdateArea::Fraction(1.0));
        }
        if let Some((w, h)) = s.split_once('x') {
            let parse = |v: &str| v.parse::<u16>().ok().filter(|&n| n > 0);
            return match (parse(w), parse(h)) {
                (Some(width), Some(height)) => Ok(UpdateArea::Size { width, height }),
                _ => Err(format!("bad size {s:?}: want WIDTHxHEIGHT, e.g. 256x64")),
            };
        }
        match s.parse::<f64>() {
            Ok(f) if f > 0.0 && f <= 1.0 => Ok(UpdateArea::Fraction(f)),
            _ => Err(format!(
                "bad update area {s:?}: want a fraction in (0, 1], WIDTHxHEIGHT or full"
            )),
        }
    }
}

impl fmt::Display for UpdateArea {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            UpdateArea::Fraction(x) => write!(f, "{x}"),
            UpdateArea::Size { width, height } => write!(f, "{width}x{height}"),
        }
    }
}

/// Fake-VM settings, shared by every session on a listener.
#[derive(Debug, Clone)]
pub struct Config {
    /// Framebuffer width in pixels (at least 1).
    pub width: u16,
    /// Framebuffer height in pixels (at least 1).
    pub height: u16,
    /// Most updates per second per session; 0 means unpaced.
    pub fps: u32,
    pub payload: Payload,
    pub update_area: UpdateArea,
    /// When set, offer only VNC Authentication with this password (first 8 bytes count).
    pub password: Option<String>,
    /// Desktop name in ServerInit.
    pub name: String,
}

impl Default for Config {
    fn default() -> Config {
        Config {
            width: 1024,
            height: 768,
            fps: 30,
            payload: Payload::Raw,
            update_area: UpdateArea::default(),
            password: None,
            name: "vncgate fakevm".into(),
        }
    }
}

/// Output is produced in chunks of about this size: big enough for few syscalls, small
/// enough that a full-screen update never sits whole in memory.
const WRITE_CHUNK: usize = 64 * 1024;

/// Stop reading while this much non-update output (cut-text echoes) waits to be written.
const MAX_BACKLOG: usize = 1 << 20;

/// How long a failing session may take to deliver its last words (a SecurityResult reason).
const FAREWELL_TIMEOUT: Duration = Duration::from_secs(1);

/// Serves RFB on `listener` forever, one task per connection.
pub async fn serve(listener: TcpListener, cfg: Config) -> io::Result<()> {
    let cfg = Arc::new(cfg);
    let local = listener.local_addr()?;
    info!(%local, width = cfg.width, height = cfg.height, fps = cfg.fps,
          auth = cfg.password.is_some(), "fakevm listening");
    let mut next_id = 0u64;
    loop {
        match listener.accept().await {
            Ok((stream, peer)) => {
                next_id += 1;
                let cfg = Arc::clone(&cfg);
                tokio::spawn(connection(stream, peer, local, next_id, cfg));
            }
            Err(e) => {
                // Usually EMFILE: back off instead of spinning on a full descriptor table.
                warn!(%local, error = %e, "accept failed");
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        }
    }
}

/// Binds every address, prints `listening ADDR` on stdout for each (so `:0` is usable from
/// scripts), and serves until Ctrl-C.
pub async fn run(listen: &[SocketAddr], cfg: Config) -> io::Result<()> {
    crate::limits::raise_nofile();
    let mut tasks = tokio::task::JoinSet::new();
    for addr in listen {
        let listener = TcpListener::bind(addr).await?;
        println!("listening {}", listener.local_addr()?);
        tasks.spawn(serve(listener, cfg.clone()));
    }
    tokio::select! {
        _ = tokio::signal::ctrl_c() => {
            info!("interrupted, exiting");
            Ok(())
        }
        Some(res) = tasks.join_next() => match res {
            Ok(r) => r,
            Err(e) => Err(io::Error::other(e)),
        },
    }
}

/// Starts a fake VM on `127.0.0.1:<free port>` on a background thread with its own tokio
/// runtime, and returns the bound address. The thread lives until the process exits; meant
/// for tests in other crates.
pub fn spawn_background(cfg: Config) -> io::Result<SocketAddr> {
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .thread_name("fakevm")
        .enable_all()
        .build()?;
    let std_listener = std::net::TcpListener::bind((Ipv4Addr::LOCALHOST, 0))?;
    std_listener.set_nonblocking(true)?;
    let addr = std_listener.local_addr()?;
    let listener = {
        let _guard = runtime.enter();
        TcpListener::from_std(std_listener)?
    };
    std::thread::Builder::new()
        .name("fakevm-main".into())
        .spawn(move || {
            if let Err(e) = runtime.block_on(serve(listener, cfg)) {
                warn!(error = %e, "background fakevm stopped");
            }
        })?;
    Ok(addr)
}

/// Why a session ended early.
#[derive(Debug)]
enum SessionEnd {
    Io(io::Error),
    /// The client broke the protocol or asked for something unsupported.
    Client(RfbError),
}

impl fmt::Display for SessionEnd {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            SessionEnd::Io(e) => write!(f, "i/o: {e}"),
            SessionEnd::Client(e) => write!(f, "client: {e}"),
        }
    }
}

async fn connection(
    mut stream: TcpStream,
    peer: SocketAddr,
    local: SocketAddr,
    id: u64,
    cfg: Arc<Config>,
) {
    // Small messages (cut-text echoes, handshake steps) must not wait for Nagle.
    let _ = stream.set_nodelay(true);
    // 16 bytes of VNC challenge, 8 of seed for the incompressible payload.
    let mut random = [0u8; 24];
    if let Err(e) = getrandom::fill(&mut random) {
        warn!(session = id, error = %e, "no randomness for the VNC challenge; closing");
        return;
    }
    let challenge: [u8; 16] = random[..16].try_into().expect("16 bytes");
    let seed = u64::from_le_bytes(random[16..].try_into().expect("8 bytes"));
    let mut session = VmSession::new(&cfg, challenge, seed, std::time::Instant::now());
    info!(session = id, %peer, %local, "rfb connection");
    let result = drive(&mut stream, &mut session).await;
    let s = session.stats();
    match result {
        Ok(()) => info!(session = id, %peer, updates = s.updates, keys = s.key_events,
                        pointers = s.pointer_events, cut_texts = s.cut_texts, "rfb closed"),
        // A client that goes away mid-write (a gateway closing the upstream) is a normal end.
        Err(SessionEnd::Io(e))
            if matches!(
                e.kind(),
                io::ErrorKind::ConnectionReset | io::ErrorKind::BrokenPipe
            ) =>
        {
            info!(session = id, %peer, updates = s.updates, keys = s.key_events,
                   pointers = s.pointer_events, cut_texts = s.cut_texts, error = %e,
                   "rfb closed by reset")
        }
        Err(e) => warn!(session = id, %peer, updates = s.updates, keys = s.key_events,
                        pointers = s.pointer_events, cut_texts = s.cut_texts, error = %e,
                        "rfb session failed"),
    }
}

/// The socket loop: read, write and the frame timer, until the client closes.
async fn drive(stream: &mut TcpStream, session: &mut VmSession) -> Result<(), SessionEnd> {
    let (mut rd, mut wr) = stream.split();
    let mut inbuf = vec![0u8; 16 * 1024];
    let mut wbuf: Vec<u8> = Vec::with_capacity(WRITE_CHUNK + 16 * 1024);
    let mut woff = 0;
    // A far-off instant for the disabled timer branch (select! builds every future).
    let far = tokio::time::Instant::now() + Duration::from_secs(86400 * 365);
    loop {
        if woff == wbuf.len() {
            wbuf.clear();
            woff = 0;
            session.write_to(&mut wbuf, WRITE_CHUNK);
        }
        let deadline = session.poll_timeout();
        let wake = deadline.map_or(far, tokio::time::Instant::from_std);
        tokio::select! {
            r = rd.read(&mut inbuf), if session.backlog() < MAX_BACKLOG => {
                let n = r.map_err(SessionEnd::Io)?;
                if n == 0 {
                    return Ok(());
                }
                if let Err(e) = session.receive(&inbuf[..n], std::time::Instant::now()) {
                    // Deliver what the session queued (a SecurityResult reason) first.
                    let mut rest = wbuf.split_off(woff);
                    while session.has_output() {
                        session.write_to(&mut rest, usize::MAX);
                    }
                    let _ = tokio::time::timeout(FAREWELL_TIMEOUT, wr.write_all(&rest)).await;
                    return Err(SessionEnd::Client(e));
                }
            }
            r = wr.write(&wbuf[woff..]), if woff < wbuf.len() => {
                woff += r.map_err(SessionEnd::Io)?;
            }
            _ = tokio::time::sleep_until(wake), if deadline.is_some() => {
                session.handle_timeout(std::time::Instant::now());
            }
        }
    }
}
