//! The upstreams the proxies relay to. In-process on 127.0.0.1:0: a bulk source (stands in
//! for a VM sending framebuffer updates), an echo server (for round trips) and a banner
//! server (a VNC server's first move: its RFB version at once, for the time to the first VM
//! byte), blocking
//! thread per connection (from a pool): up to a few thousand connections, simple and
//! predictable. In a child process: the fake VM of the idle point ([`FakeVm`]).

use std::io::{self, BufRead, BufReader, Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, mpsc};
use std::thread;
use std::time::Duration;

/// What the banner server sends as soon as a connection is accepted: RFB 3.8's
/// ProtocolVersion, as every VNC server does before anything else (RFC 6143 7.1.1).
pub const BANNER: &[u8; 12] = b"RFB 003.008\n";

/// What a direct client of the banner server sends to end its cycle: the server closes
/// first, as a proxy does after the WebSocket close handshake (see
/// [`crate::conn::Conn::close_handshake`]).
pub const CLOSE_REQUEST: u8 = b'q';

/// The bulk source writes this many bytes per `write` call.
const PATTERN: usize = 64 * 1024;
/// Handler threads only need a small stack: one syscall loop over a heap buffer.
const HANDLER_STACK: usize = 64 * 1024;

#[derive(Debug, Clone, Copy)]
pub struct Targets {
    pub bulk: SocketAddr,
    pub echo: SocketAddr,
    /// The fake VM of the idle point, when a proxy should get a route to it (`idle`).
    pub idle: Option<SocketAddr>,
    /// The banner server, when a proxy should get a route to it (`banner`: the
    /// `upgrades50` point).
    pub banner: Option<SocketAddr>,
}

/// Starts the in-process servers; they run until the process exits.
pub fn start() -> io::Result<Targets> {
    Ok(Targets {
        bulk: serve("bulk-source", bulk)?,
        echo: serve("echo", echo)?,
        idle: None,
        banner: Some(serve("banner", banner)?),
    })
}

/// The hidden flag that makes `vncgate-bench` serve a fake VM instead of benchmarking.
pub const SERVE_FAKEVM_FLAG: &str = "--serve-fakevm";

/// The idle point's upstream: vncgate-loadtest's fake VM (RFB 3.8), run by this binary
/// re-executed with [`SERVE_FAKEVM_FLAG`]. A child process because of the open-file limit:
/// at 10 000 idle sessions the bench holds 10 000 client sockets and the VM 10 000 upstream
/// ones, which would not fit one process under a hard limit of 20 000. Async (one task per
/// session), so 10 000 sessions cost it no threads. Killed when dropped.
pub struct FakeVm {
    pub addr: SocketAddr,
    child: Child,
}

impl FakeVm {
    /// Starts it on 127.0.0.1:<free port>; its stderr goes to `OUT/logs/fakevm.stderr.log`.
    pub fn start(out: &Path) -> Result<FakeVm, String> {
        let exe = std::env::current_exe().map_err(|e| format!("own executable: {e}"))?;
        let log = out.join("logs").join("fakevm.stderr.log");
        let stderr = std::fs::File::create(&log).map_err(|e| format!("{}: {e}", log.display()))?;
        let mut child = Command::new(&exe)
            .arg(SERVE_FAKEVM_FLAG)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(stderr)
            .spawn()
            .map_err(|e| format!("cannot start {} {SERVE_FAKEVM_FLAG}: {e}", exe.display()))?;
        // It prints `listening ADDR` once bound; wait for it, but not forever.
        let stdout = child.stdout.take().expect("piped");
        let (tx, rx) = mpsc::channel();
        thread::spawn(move || {
            let mut line = String::new();
            let _ = BufReader::new(stdout).read_line(&mut line);
            let _ = tx.send(line);
        });
        let line = rx.recv_timeout(Duration::from_secs(10)).unwrap_or_default();
        let addr = line
            .trim()
            .strip_prefix("listening ")
            .and_then(|a| a.parse().ok());
        match addr {
            Some(addr) => Ok(FakeVm { addr, child }),
            None => {
                let _ = child.kill();
                let _ = child.wait();
                Err(format!(
                    "fake VM did not start (printed {:?}; see {})",
                    line.trim(),
                    log.display()
                ))
            }
        }
    }
}

impl Drop for FakeVm {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn serve(name: &str, handler: fn(TcpStream)) -> io::Result<SocketAddr> {
    let listener = TcpListener::bind("127.0.0.1:0")?;
    let addr = listener.local_addr()?;
    let name = name.to_owned();
    thread::Builder::new()
        .name(format!("{name}-accept"))
        .spawn(move || {
            let pool = Pool::new(name, handler);
            // Accept errors (EMFILE under load) drop one connection, not the server.
            for stream in listener.incoming().flatten() {
                pool.dispatch(stream);
            }
        })?;
    Ok(addr)
}

/// Handler threads that outlive their connection and wait for the next one. Spawning a
/// thread costs ~100 µs on this kind of VM: paid per accept, it capped the upgrade rate of
/// every proxy at the target, not at the proxy. The pool grows when no thread is free, so a
/// connection never waits for another one to end (1000 idle sessions: 1000 threads).
struct Pool {
    name: String,
    handler: fn(TcpStream),
    /// Threads that declared themselves free and are (or will soon be) waiting on `rx`.
    /// Only `dispatch` decrements it, once per stream sent, so a sent stream always has a
    /// free thread to take it.
    free: Arc<AtomicUsize>,
    tx: mpsc::Sender<TcpStream>,
    rx: Arc<Mutex<mpsc::Receiver<TcpStream>>>,
}

impl Pool {
    fn new(name: String, handler: fn(TcpStream)) -> Pool {
        let (tx, rx) = mpsc::channel();
        Pool {
            name,
            handler,
            free: Arc::new(AtomicUsize::new(0)),
            tx,
            rx: Arc::new(Mutex::new(rx)),
        }
    }

    fn dispatch(&self, stream: TcpStream) {
        if self.free.load(Ordering::Acquire) > 0 {
            self.free.fetch_sub(1, Ordering::AcqRel);
            let _ = self.tx.send(stream);
            return;
        }
        let (handler, free, rx) = (self.handler, self.free.clone(), self.rx.clone());
        // If no thread can be spawned the connection is dropped: the client sees it.
        let _ = thread::Builder::new()
            .name(self.name.clone())
            .stack_size(HANDLER_STACK)
            .spawn(move || {
                handler(stream);
                loop {
                    free.fetch_add(1, Ordering::AcqRel);
                    let next = rx
                        .lock()
                        .map_err(drop)
                        .and_then(|rx| rx.recv().map_err(drop));
                    match next {
                        Ok(s) => handler(s),
                        Err(()) => return,
                    }
                }
            });
    }
}

/// Writes a fixed 64 KiB pattern as fast as the peer takes it, until the peer goes away.
fn bulk(mut s: TcpStream) {
    let pattern: Vec<u8> = (0..PATTERN).map(|i| (i * 31 % 251) as u8).collect();
    while s.write_all(&pattern).is_ok() {}
}

/// [`BANNER`] at once, then waits for the client as a VNC server waits for its version,
/// and closes when the client closes or sends anything: a proxy sends nothing (the
/// browser's close frame ends at the proxy, which then closes), and the direct client
/// sends [`CLOSE_REQUEST`] so that, as behind a proxy, the server closes first.
fn banner(mut s: TcpStream) {
    let _ = s.set_nodelay(true);
    if s.write_all(BANNER).is_err() {
        return;
    }
    let mut buf = [0u8; 1024];
    let _ = s.read(&mut buf);
}

fn echo(mut s: TcpStream) {
    let _ = s.set_nodelay(true);
    let mut buf = vec![0u8; 16 * 1024];
    loop {
        match s.read(&mut buf) {
            Ok(0) | Err(_) => return,
            Ok(n) => {
                if s.write_all(&buf[..n]).is_err() {
                    return;
                }
            }
        }
    }
}
