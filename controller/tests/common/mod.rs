//! What the controller's integration tests share: child processes killed when dropped,
//! scratch directories, a controller on a Redis, the session API, and a viewer through the
//! gateway to ServerInit.

#![allow(dead_code)]

use std::io::{BufRead as _, BufReader};
use std::net::TcpStream;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use serde_json::Value;
use vncgate_schema::testing::RedisServer;

pub const CONTROLLER: &str = env!("CARGO_BIN_EXE_vncgate-controller");

/// A binary of another package of the workspace, built beside this one.
pub fn sibling(name: &str) -> PathBuf {
    let p = PathBuf::from(CONTROLLER).with_file_name(name);
    assert!(
        p.is_file(),
        "{} is missing: build the workspace (cargo build --workspace) first",
        p.display()
    );
    p
}

/// A child process killed (by pid) when dropped, with the first stdout line that starts
/// with `prefix` parsed out.
pub struct Proc {
    pub child: Child,
    pub found: String,
    /// The lines before the one found.
    pub before: Vec<String>,
}

impl Proc {
    pub fn start(cmd: Command, prefix: &str) -> Proc {
        Self::start_logging(cmd, prefix, Stdio::inherit())
    }

    pub fn start_logging(mut cmd: Command, prefix: &str, stderr: Stdio) -> Proc {
        let mut child = cmd
            .stdout(Stdio::piped())
            .stderr(stderr)
            .spawn()
            .expect("starts");
        let mut out = BufReader::new(child.stdout.take().unwrap());
        let mut line = String::new();
        let mut before = Vec::new();
        for _ in 0..20 {
            line.clear();
            if out.read_line(&mut line).unwrap() == 0 {
                break;
            }
            if let Some(rest) = line.trim().strip_prefix(prefix) {
                let found = rest.to_owned();
                // Keep draining stdout so the child never blocks on a full pipe.
                std::thread::spawn(move || for _ in out.lines() {});
                return Proc {
                    child,
                    found,
                    before,
                };
            }
            before.push(line.trim().to_owned());
        }
        let _ = child.kill();
        let _ = child.wait();
        panic!("no '{prefix}' line from {cmd:?}");
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A fresh directory under the temp dir, and the nanoseconds that name it apart.
pub fn scratch(tag: &str) -> (PathBuf, u32) {
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .subsec_nanos();
    let dir = std::env::temp_dir().join(format!(
        "vncgate-ctl-{tag}-{}-{nanos:09}",
        std::process::id()
    ));
    std::fs::create_dir_all(&dir).unwrap();
    (dir, nanos)
}

/// A controller on `redis` with VMs under `work`, logging to `work/controller.log`.
pub fn start_controller(redis: &RedisServer, work: &std::path::Path, extra: &[&str]) -> Proc {
    start_controller_on(&redis.url(), work, extra)
}

/// [`start_controller`] on a Redis URL (standalone, Sentinel or Cluster).
pub fn start_controller_on(url: &str, work: &std::path::Path, extra: &[&str]) -> Proc {
    let mut c = Command::new(CONTROLLER);
    c.args(["--listen", "127.0.0.1:0", "--redis", url, "--work-dir"])
        .arg(work)
        .args(extra);
    let log = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(work.join("controller.log"))
        .unwrap();
    Proc::start_logging(c, "vncgate-controller: listening on ", Stdio::from(log))
}

/// One HTTP/1.1 request; returns (status, JSON body).
pub fn http(base: &str, method: &str, path: &str, body: Option<&str>) -> (u16, Value) {
    vncgate_loadtest::http::json(base, method, path, body.unwrap_or("")).unwrap()
}

/// The session once it reached `state` (or a terminal one), as `wait` answers it.
pub fn wait_for(api: &str, id: &str, state: &str) -> Value {
    let (st, v) = http(
        api,
        "GET",
        &format!("/api/sessions/{id}/wait?state={state}&timeout=30"),
        None,
    );
    assert_eq!(st, 200, "{v}");
    v
}

pub fn create(api: &str) -> Value {
    let (st, v) = http(
        api,
        "POST",
        "/api/sessions",
        Some(r#"{"user_id":"u1","provider":"github"}"#),
    );
    assert_eq!(st, 201, "{v}");
    v
}

/// A viewer through the gateway: the upgrade with `?token=`, then the RFB handshake to
/// ServerInit over binary frames. Returns the socket and the ServerInit.
pub fn view(
    gateway: &str,
    ws_path: &str,
    token: &str,
) -> (tungstenite::WebSocket<TcpStream>, vncgate_rfb::ServerInit) {
    let url = format!("ws://{gateway}{ws_path}?token={token}");
    let s = TcpStream::connect(gateway).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    let (mut ws, _) = tungstenite::client(url.as_str(), s).expect("upgrade");
    let mut hs = vncgate_rfb::ClientHandshake::new(None, true);
    let mut pending = Vec::new();
    while !hs.is_done() {
        match ws.read().expect("a frame") {
            tungstenite::Message::Binary(b) => pending.extend_from_slice(&b),
            tungstenite::Message::Close(c) => panic!("closed during the handshake: {c:?}"),
            _ => continue,
        }
        let used = hs.receive(&pending).expect("RFB handshake");
        pending.drain(..used);
        let out = hs.take_output();
        if !out.is_empty() {
            ws.send(tungstenite::Message::Binary(out.into())).unwrap();
        }
    }
    let init = hs.server_init().unwrap().clone();
    (ws, init)
}

/// Reads until the close frame; returns its code and reason.
pub fn close_of(ws: &mut tungstenite::WebSocket<TcpStream>) -> (u16, String) {
    let deadline = Instant::now() + Duration::from_secs(15);
    while Instant::now() < deadline {
        match ws.read() {
            Ok(tungstenite::Message::Close(Some(f))) => {
                return (f.code.into(), f.reason.to_string());
            }
            Ok(tungstenite::Message::Close(None)) => return (1005, String::new()),
            Ok(_) => {}
            Err(e) => panic!("no close frame: {e}"),
        }
    }
    panic!("no close frame within 15 s");
}

/// `vncgate serve` on `redis`, one worker, loopback upstreams allowed.
pub fn start_gateway(redis: &RedisServer) -> Proc {
    start_gateway_on(&redis.url())
}

/// [`start_gateway`] on a Redis URL.
pub fn start_gateway_on(url: &str) -> Proc {
    let mut g = Command::new(sibling("vncgate"));
    g.args([
        "serve",
        "--listen",
        "127.0.0.1:0",
        "--redis",
        url,
        "--allow-upstream",
        "127.0.0.0/8",
        "--workers",
        "1",
    ]);
    Proc::start(g, "vncgate: listening on ws://")
}

/// The commands MONITOR saw that wrote `key` (anything but its deletion).
pub fn route_writes(watched: &vncgate_schema::testing::Monitor, key: &str) -> Vec<String> {
    watched
        .seen()
        .iter()
        // The key as an argument of its own: session keys carry it inside their hash tag.
        .filter(|(_, l)| {
            l.contains(&format!("\"{key}\"")) && !l.contains("\"DEL\"") && !l.contains("\"ZREM\"")
        })
        .map(|(_, l)| l.clone())
        .collect()
}

/// Ends the VM processes of the process backend under `work` (they outlive a stopped
/// controller by design): every process whose command line names `work` or one of the
/// session directories in it (`s-...`). Only this test's own processes match: the paths are
/// its scratch directories, the ids random.
pub fn kill_vms_in(work: &std::path::Path) {
    let ids: Vec<String> = std::fs::read_dir(work)
        .map(|d| {
            d.flatten()
                .map(|e| e.file_name().to_string_lossy().into_owned())
                .filter(|n| n.starts_with("s-"))
                .collect()
        })
        .unwrap_or_default();
    let work = work.display().to_string();
    let Ok(procs) = std::fs::read_dir("/proc") else {
        return;
    };
    for p in procs.flatten() {
        let Ok(pid) = p.file_name().to_string_lossy().parse::<u32>() else {
            continue;
        };
        let cmdline = std::fs::read(format!("/proc/{pid}/cmdline")).unwrap_or_default();
        let cmdline = String::from_utf8_lossy(&cmdline);
        if cmdline.contains(&work) || ids.iter().any(|id| cmdline.contains(id.as_str())) {
            let _ = Command::new("kill").args(["-9", &pid.to_string()]).status();
        }
    }
}

/// Runs [`kill_vms_in`] on its directories when dropped (also when a test fails).
pub struct VmsOf(pub Vec<PathBuf>);

impl Drop for VmsOf {
    fn drop(&mut self) {
        for w in &self.0 {
            kill_vms_in(w);
        }
    }
}
