//! Test peers and a harness that runs the real `vncgate` binary on port 0.
#![allow(dead_code)]

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{Shutdown, SocketAddr, TcpListener, TcpStream};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, mpsc};
use std::thread;
use std::time::{Duration, Instant};

pub const BIN: &str = env!("CARGO_BIN_EXE_vncgate");

/// Runs `vncgate route ...`: (exit status, stdout, stderr).
pub fn route(args: &[&str]) -> (i32, String, String) {
    let out = Command::new(BIN)
        .arg("route")
        .args(args)
        .output()
        .expect("run vncgate route");
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

/// A running gateway process, killed (by its own pid) when dropped.
pub struct Gw {
    pub child: Child,
    pub addr: SocketAddr,
    pub admin: SocketAddr,
    pub log: Arc<Mutex<String>>,
}

impl Gw {
    /// `vncgate serve` on 127.0.0.1:0 with an admin port, the given driver and extra flags.
    pub fn start(driver: &str, args: &[&str]) -> Gw {
        let mut full = vec![
            "serve",
            "--listen",
            "127.0.0.1:0",
            "--admin",
            "127.0.0.1:0",
            "--io-driver",
            driver,
        ];
        if !args.contains(&"--workers") {
            full.extend_from_slice(&["--workers", "2"]);
        }
        full.extend_from_slice(args);
        Self::spawn(Command::new(BIN).args(&full)).expect("gateway starts")
    }

    /// [`Gw::start`] with one static route, `id` to `upstream`, allowed on loopback, and
    /// `args` after it.
    pub fn with_route(
        driver: &str,
        id: &str,
        upstream: impl std::fmt::Display,
        args: &[&str],
    ) -> Gw {
        let route = format!("{id}={upstream}");
        let mut full = vec!["--route", route.as_str(), "--allow-upstream", "127.0.0.1"];
        full.extend_from_slice(args);
        Gw::start(driver, &full)
    }

    /// Spawns a prepared command and waits for its listening lines; `Err(stderr)` if it
    /// exits first.
    pub fn spawn(cmd: &mut Command) -> Result<Gw, String> {
        // Debug logs unless the test chose (or removed) the variable itself.
        if !cmd.get_envs().any(|(k, _)| k == "VNCGATE_LOG") {
            cmd.env("VNCGATE_LOG", "debug");
        }
        let mut child = cmd
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("spawn vncgate");
        let log = Arc::new(Mutex::new(String::new()));
        let stderr = child.stderr.take().unwrap();
        let log2 = log.clone();
        thread::spawn(move || {
            for line in BufReader::new(stderr).lines().map_while(Result::ok) {
                let mut l = log2.lock().unwrap();
                l.push_str(&line);
                l.push('\n');
            }
        });
        let stdout = child.stdout.take().unwrap();
        let (tx, rx) = mpsc::channel();
        thread::spawn(move || {
            for line in BufReader::new(stdout).lines().map_while(Result::ok) {
                let _ = tx.send(line);
            }
        });
        let mut addr = None;
        let mut admin = None;
        let deadline = Instant::now() + Duration::from_secs(20);
        while addr.is_none() || admin.is_none() {
            match rx.recv_timeout(Duration::from_millis(100)) {
                Ok(line) => {
                    let listening = line
                        .strip_prefix("vncgate: listening on ws://")
                        .or_else(|| line.strip_prefix("vncgate: listening on wss://"));
                    if let Some(rest) = listening {
                        addr = Some(rest.split('/').next().unwrap().parse().unwrap());
                    } else if let Some(rest) = line.strip_prefix("vncgate: admin on http://") {
                        admin = Some(rest.parse().unwrap());
                    }
                }
                Err(_) => {
                    if let Ok(Some(_)) = child.try_wait() {
                        thread::sleep(Duration::from_millis(100));
                        return Err(log.lock().unwrap().clone());
                    }
                    assert!(Instant::now() < deadline, "gateway did not start");
                }
            }
        }
        Ok(Gw {
            child,
            addr: addr.unwrap(),
            admin: admin.unwrap(),
            log,
        })
    }

    pub fn url(&self, session: &str) -> String {
        format!("ws://{}/vnc/{session}", self.addr)
    }

    pub fn log(&self) -> String {
        self.log.lock().unwrap().clone()
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Open descriptors of the gateway process.
    pub fn fd_count(&self) -> usize {
        std::fs::read_dir(format!("/proc/{}/fd", self.pid()))
            .unwrap()
            .count()
    }

    /// [`Gw::fd_count`] once start-up is over (a socket pair may open just after the
    /// listening line): two equal counts 200 ms apart.
    pub fn settled_fd_count(&self) -> usize {
        let mut n = self.fd_count();
        loop {
            thread::sleep(Duration::from_millis(200));
            let now = self.fd_count();
            if now == n {
                return n;
            }
            n = now;
        }
    }

    pub fn rss_kib(&self) -> u64 {
        let s = std::fs::read_to_string(format!("/proc/{}/status", self.pid())).unwrap();
        s.lines()
            .find_map(|l| l.strip_prefix("VmRSS:"))
            .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
            .unwrap()
    }

    /// GET on the admin listener: (status, body).
    pub fn admin_get(&self, path: &str) -> (u16, String) {
        let mut s = TcpStream::connect(self.admin).unwrap();
        write!(s, "GET {path} HTTP/1.1\r\nHost: x\r\n\r\n").unwrap();
        let mut out = String::new();
        s.read_to_string(&mut out).unwrap();
        let status = out[9..12].parse().unwrap();
        let body = out.split_once("\r\n\r\n").unwrap().1.to_string();
        (status, body)
    }

    pub fn signal(&self, sig: i32) {
        // SAFETY-free: kill(1) by the pid of the child this test started.
        Command::new("kill")
            .arg(format!("-{sig}"))
            .arg(self.pid().to_string())
            .status()
            .unwrap();
    }

    /// Waits for the process to exit; returns its status code.
    pub fn wait_exit(&mut self, within: Duration) -> Option<i32> {
        let deadline = Instant::now() + within;
        while Instant::now() < deadline {
            if let Ok(Some(st)) = self.child.try_wait() {
                return st.code();
            }
            thread::sleep(Duration::from_millis(20));
        }
        None
    }

    /// Polls `cond` against the log until it holds or `within` passes.
    pub fn wait_log(&self, needle: &str, within: Duration) -> bool {
        let deadline = Instant::now() + within;
        while Instant::now() < deadline {
            if self.log().contains(needle) {
                return true;
            }
            thread::sleep(Duration::from_millis(20));
        }
        false
    }
}

impl Drop for Gw {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A free loopback port with nothing listening on it.
pub fn closed_port() -> SocketAddr {
    let l = TcpListener::bind("127.0.0.1:0").unwrap();
    l.local_addr().unwrap()
}

/// A TCP echo server on a background thread; counts connections open right now.
pub struct Echo {
    pub addr: SocketAddr,
    pub open: Arc<AtomicU64>,
}

pub fn echo_server() -> Echo {
    let (addr, open) = counted_server(|mut s| {
        let mut buf = [0u8; 65536];
        loop {
            match s.read(&mut buf) {
                Ok(0) | Err(_) => break,
                Ok(n) => {
                    if s.write_all(&buf[..n]).is_err() {
                        break;
                    }
                }
            }
        }
    });
    Echo { addr, open }
}

/// A server on a background thread running `handle` per connection on its own thread;
/// the counter holds how many connections are open right now.
fn counted_server(handle: fn(TcpStream)) -> (SocketAddr, Arc<AtomicU64>) {
    let l = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = l.local_addr().unwrap();
    let open = Arc::new(AtomicU64::new(0));
    let open2 = open.clone();
    thread::spawn(move || {
        for s in l.incoming() {
            let Ok(s) = s else { continue };
            let open = open2.clone();
            open.fetch_add(1, Ordering::SeqCst);
            thread::spawn(move || {
                handle(s);
                open.fetch_sub(1, Ordering::SeqCst);
            });
        }
    });
    (addr, open)
}

/// An upstream that accepts, writes `data`, then closes (a VM whose VNC server exits).
pub fn say_and_close(data: Vec<u8>) -> SocketAddr {
    let l = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = l.local_addr().unwrap();
    thread::spawn(move || {
        for s in l.incoming() {
            let Ok(mut s) = s else { continue };
            let _ = s.write_all(&data);
            let _ = s.shutdown(Shutdown::Write);
            // Keep reading until the gateway closes, so our close is a clean FIN.
            let mut sink = [0u8; 4096];
            let _ = s.set_read_timeout(Some(Duration::from_secs(5)));
            while matches!(s.read(&mut sink), Ok(n) if n > 0) {}
        }
    });
    addr
}

/// An upstream that accepts and never sends anything.
pub fn silent_server() -> (SocketAddr, Arc<AtomicU64>) {
    counted_server(|mut s| {
        let mut sink = [0u8; 4096];
        while matches!(s.read(&mut sink), Ok(n) if n > 0) {}
    })
}

/// An upstream that writes a counting byte pattern (byte i = i mod 251) as fast as the
/// connection takes it; `written` counts bytes accepted by the kernel.
pub fn bulk_source(stop: Arc<AtomicBool>) -> (SocketAddr, Arc<AtomicU64>) {
    pattern_source(65536, Duration::ZERO, stop)
}

/// [`bulk_source`] in writes of at most `chunk` bytes, `pause` apart: small writes keep
/// the gateway's reads small (its copy path), big ones make it splice.
pub fn pattern_source(
    chunk: usize,
    pause: Duration,
    stop: Arc<AtomicBool>,
) -> (SocketAddr, Arc<AtomicU64>) {
    let l = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = l.local_addr().unwrap();
    let written = Arc::new(AtomicU64::new(0));
    let w2 = written.clone();
    thread::spawn(move || {
        for s in l.incoming() {
            let Ok(mut s) = s else { continue };
            let written = w2.clone();
            let stop = stop.clone();
            thread::spawn(move || {
                let mut pos: u64 = 0;
                let mut buf = vec![0u8; chunk];
                s.set_write_timeout(Some(Duration::from_millis(200)))
                    .unwrap();
                s.set_nodelay(true).unwrap();
                while !stop.load(Ordering::SeqCst) {
                    for (i, b) in buf.iter_mut().enumerate() {
                        *b = ((pos + i as u64) % 251) as u8;
                    }
                    match s.write(&buf) {
                        Ok(n) => {
                            pos += n as u64;
                            written.store(pos, Ordering::SeqCst);
                            if !pause.is_zero() {
                                thread::sleep(pause);
                            }
                        }
                        Err(e)
                            if e.kind() == std::io::ErrorKind::WouldBlock
                                || e.kind() == std::io::ErrorKind::TimedOut => {}
                        Err(_) => break,
                    }
                }
            });
        }
    });
    (addr, written)
}

/// A raw WebSocket client over a plain socket, for byte-exact and abusive traffic.
pub struct RawWs {
    pub s: TcpStream,
    pub buf: Vec<u8>,
}

pub const KEY: &str = "dGhlIHNhbXBsZSBub25jZQ==";

pub fn upgrade_request(path: &str, extra: &str) -> String {
    format!(
        "GET {path} HTTP/1.1\r\nHost: gw\r\nUpgrade: websocket\r\nConnection: Upgrade\r\nSec-WebSocket-Version: 13\r\nSec-WebSocket-Key: {KEY}\r\n{extra}\r\n"
    )
}

/// Sends raw bytes as a request and returns the whole response head and body as text.
pub fn http_exchange(addr: SocketAddr, request: &[u8]) -> String {
    let mut s = TcpStream::connect(addr).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    let _ = s.write_all(request);
    let mut out = Vec::new();
    let _ = s.read_to_end(&mut out);
    String::from_utf8_lossy(&out).into_owned()
}

pub fn status_of(resp: &str) -> u16 {
    resp.get(9..12).and_then(|s| s.parse().ok()).unwrap_or(0)
}

/// A masked client frame.
pub fn frame(b0: u8, payload: &[u8]) -> Vec<u8> {
    let mut f = Vec::new();
    vncgate_ws::frame::encode_client_frame(&mut f, b0, payload, [0x11, 0x22, 0x33, 0x44]);
    f
}

/// A server frame as the raw client sees it.
#[derive(Debug, PartialEq, Eq)]
pub struct SFrame {
    pub fin: bool,
    pub opcode: u8,
    pub payload: Vec<u8>,
}

impl SFrame {
    pub fn close_code(&self) -> Option<u16> {
        (self.opcode == 8 && self.payload.len() >= 2)
            .then(|| u16::from_be_bytes([self.payload[0], self.payload[1]]))
    }
    pub fn close_reason(&self) -> String {
        String::from_utf8_lossy(self.payload.get(2..).unwrap_or(&[])).into_owned()
    }
}

impl RawWs {
    /// Upgrades at `path` with extra header lines; panics unless 101.
    pub fn connect(addr: SocketAddr, path: &str, extra: &str) -> RawWs {
        let mut s = TcpStream::connect(addr).unwrap();
        s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
        s.write_all(upgrade_request(path, extra).as_bytes())
            .unwrap();
        let mut buf = Vec::new();
        let mut chunk = [0u8; 4096];
        while !buf.windows(4).any(|w| w == b"\r\n\r\n") {
            let n = s.read(&mut chunk).unwrap();
            assert!(
                n > 0,
                "closed during handshake: {:?}",
                String::from_utf8_lossy(&buf)
            );
            buf.extend_from_slice(&chunk[..n]);
        }
        let end = buf.windows(4).position(|w| w == b"\r\n\r\n").unwrap() + 4;
        let head = String::from_utf8_lossy(&buf[..end]).into_owned();
        assert!(head.starts_with("HTTP/1.1 101 "), "{head}");
        RawWs {
            s,
            buf: buf[end..].to_vec(),
        }
    }

    pub fn send(&mut self, bytes: &[u8]) {
        self.s.write_all(bytes).unwrap();
    }

    fn fill(&mut self, need: usize) -> bool {
        let mut chunk = [0u8; 65536];
        while self.buf.len() < need {
            match self.s.read(&mut chunk) {
                Ok(0) | Err(_) => return false,
                Ok(n) => self.buf.extend_from_slice(&chunk[..n]),
            }
        }
        true
    }

    /// Next server frame, or None at end of stream.
    pub fn next_frame(&mut self) -> Option<SFrame> {
        if !self.fill(2) {
            return None;
        }
        let (b0, b1) = (self.buf[0], self.buf[1]);
        assert_eq!(b1 & 0x80, 0, "server frames must not be masked");
        let (len, hl) = match b1 & 0x7f {
            126 => {
                self.fill(4);
                (u16::from_be_bytes([self.buf[2], self.buf[3]]) as usize, 4)
            }
            127 => {
                self.fill(10);
                (
                    u64::from_be_bytes(self.buf[2..10].try_into().unwrap()) as usize,
                    10,
                )
            }
            l => (l as usize, 2),
        };
        if !self.fill(hl + len) {
            return None;
        }
        let payload = self.buf[hl..hl + len].to_vec();
        self.buf.drain(..hl + len);
        Some(SFrame {
            fin: b0 & 0x80 != 0,
            opcode: b0 & 0x0f,
            payload,
        })
    }

    /// Reads frames until a close; returns (binary payload seen, close frame).
    pub fn until_close(&mut self) -> (Vec<u8>, Option<SFrame>) {
        let mut data = Vec::new();
        while let Some(f) = self.next_frame() {
            match f.opcode {
                2 | 0 => data.extend_from_slice(&f.payload),
                8 => return (data, Some(f)),
                _ => {}
            }
        }
        (data, None)
    }

    /// Reads binary payload until `n` bytes arrived (answering nothing).
    pub fn read_data(&mut self, n: usize) -> Vec<u8> {
        let mut data = Vec::new();
        while data.len() < n {
            let f = self.next_frame().expect("stream ended early");
            match f.opcode {
                2 | 0 => data.extend_from_slice(&f.payload),
                9 | 10 => {}
                op => panic!("unexpected opcode {op} ({})", f.close_reason()),
            }
        }
        data
    }
}

/// Waits until `f` holds or `within` passes.
pub fn eventually(within: Duration, mut f: impl FnMut() -> bool) -> bool {
    let deadline = Instant::now() + within;
    while Instant::now() < deadline {
        if f() {
            return true;
        }
        thread::sleep(Duration::from_millis(20));
    }
    f()
}

/// Checks that the X tools of the real-desktop tests run, naming the packages if not.
pub fn require_x_tools() {
    for cmd in ["Xvnc", "xsetroot", "xterm"] {
        if let Err(e) = Command::new(cmd)
            .arg("-version")
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status()
        {
            panic!(
                "{cmd} cannot be run ({e}): the real-desktop tests need Xvnc, xterm and xsetroot; \
                 scripts/test.sh installs them (apt-get install tigervnc-standalone-server xterm \
                 x11-xserver-utils xfonts-base)"
            );
        }
    }
}

/// SIGTERM to a child this test started, SIGKILL if it is still there 3 s later.
pub fn stop_child(child: &mut Child) {
    if let Ok(Some(_)) = child.try_wait() {
        return;
    }
    // SAFETY: kill(2) on the pid of a child we spawned and have not reaped.
    unsafe {
        libc::kill(child.id() as libc::pid_t, libc::SIGTERM);
    }
    if !eventually(Duration::from_secs(3), || {
        matches!(child.try_wait(), Ok(Some(_)))
    }) {
        let _ = child.kill();
    }
    let _ = child.wait();
}

/// Whether 127.0.0.1:port sends an RFB banner.
pub fn rfb_banner(port: u16) -> bool {
    let Ok(mut s) = TcpStream::connect(("127.0.0.1", port)) else {
        return false;
    };
    let _ = s.set_read_timeout(Some(Duration::from_secs(1)));
    let mut banner = [0u8; 12];
    s.read_exact(&mut banner).is_ok() && banner.starts_with(b"RFB 00")
}

/// An xterm for `display` (add its arguments), its shell a plain `/bin/sh` that reads no
/// startup file, its output discarded.
pub fn xterm(display: &str) -> Command {
    let mut c = Command::new("xterm");
    c.env("DISPLAY", display)
        .env("SHELL", "/bin/sh")
        .env("ENV", "")
        .stdout(Stdio::null())
        .stderr(Stdio::null());
    c
}

/// A real VNC server: TigerVNC's Xvnc on a free display and loopback port (security None,
/// 24-bit), its background set to `#3366cc`; stopped on drop.
pub struct Xvnc {
    child: Child,
    pub display: String,
    pub port: u16,
}

impl Xvnc {
    /// `geometry` as `WxH`; `extra` are more Xvnc options. Displays taken (socket or lock
    /// file present) are skipped; one taken between the check and Xvnc's start makes Xvnc
    /// exit, and the next is tried.
    pub fn start(geometry: &str, extra: &[&str]) -> Xvnc {
        require_x_tools();
        let first = 400 + std::process::id() % 400;
        for n in first..first + 40 {
            if std::path::Path::new(&format!("/tmp/.X11-unix/X{n}")).exists()
                || std::path::Path::new(&format!("/tmp/.X{n}-lock")).exists()
            {
                continue;
            }
            let port = closed_port().port();
            let mut child = Command::new("Xvnc")
                .args([
                    &format!(":{n}"),
                    "-rfbport",
                    &port.to_string(),
                    "-localhost",
                    "-nolisten",
                    "tcp",
                    "-SecurityTypes",
                    "None",
                    "-geometry",
                    geometry,
                    "-depth",
                    "24",
                ])
                .args(extra)
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .spawn()
                .expect("spawn Xvnc");
            let up = eventually(Duration::from_secs(10), || {
                matches!(child.try_wait(), Ok(None)) && rfb_banner(port)
            });
            if up {
                let x = Xvnc {
                    child,
                    display: format!(":{n}"),
                    port,
                };
                let st = Command::new("xsetroot")
                    .args(["-solid", "#3366cc"])
                    .env("DISPLAY", &x.display)
                    .status()
                    .expect("run xsetroot");
                assert!(st.success(), "xsetroot: {st}");
                return x;
            }
            stop_child(&mut child);
        }
        panic!("Xvnc did not start on any of 40 displays");
    }

    pub fn alive(&mut self) -> bool {
        matches!(self.child.try_wait(), Ok(None))
    }
}

impl Drop for Xvnc {
    fn drop(&mut self) {
        stop_child(&mut self.child);
    }
}
