//! The relays under test, each started as a child process on a free loopback port in front
//! of the in-process targets, with stdout/stderr captured under the output folder, and
//! killed by pid when its turn is over. `Direct` starts nothing: it is the ceiling.

use std::fs::{File, OpenOptions};
use std::io::Write;
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use crate::conn::Target;
use crate::targets::Targets;

/// How long a proxy gets to start listening (websockify is a Python start-up).
const START_DEADLINE: Duration = Duration::from_secs(10);

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    Direct,
    Vncgate,
    Websocat,
    Websockify,
}

impl Kind {
    pub const ALL: [Kind; 4] = [
        Kind::Direct,
        Kind::Vncgate,
        Kind::Websocat,
        Kind::Websockify,
    ];

    pub fn name(self) -> &'static str {
        match self {
            Kind::Direct => "direct",
            Kind::Vncgate => "vncgate",
            Kind::Websocat => "websocat",
            Kind::Websockify => "websockify",
        }
    }

    pub fn parse(s: &str) -> Option<Kind> {
        Kind::ALL.into_iter().find(|k| k.name() == s)
    }
}

/// Settings the proxies need.
#[derive(Debug, Clone)]
pub struct Settings {
    pub vncgate: PathBuf,
    pub workers: usize,
    /// Extra arguments appended to `vncgate serve` (e.g. `--io-driver=epoll`).
    pub vncgate_args: Vec<String>,
    pub out: PathBuf,
}

/// Finds the executable for `kind`, or says why the proxy is skipped.
pub fn locate(kind: Kind, s: &Settings) -> Result<Option<PathBuf>, String> {
    match kind {
        Kind::Direct => Ok(None),
        Kind::Vncgate => {
            if s.vncgate.is_file() {
                Ok(Some(s.vncgate.clone()))
            } else {
                Err(format!(
                    "binary {} not found (cargo build --release -p vncgate, or pass --vncgate PATH)",
                    s.vncgate.display()
                ))
            }
        }
        Kind::Websocat => which("websocat")
            .or_else(|| home_bin(".cargo/bin/websocat"))
            .map(Some)
            .ok_or_else(|| "websocat not on PATH (cargo install websocat --locked)".to_owned()),
        Kind::Websockify => which("websockify")
            .map(Some)
            .ok_or_else(|| "websockify not on PATH (pip install websockify)".to_owned()),
    }
}

/// The first `name` on `PATH`.
pub fn which(name: &str) -> Option<PathBuf> {
    std::env::var_os("PATH").and_then(|p| {
        std::env::split_paths(&p)
            .map(|d| d.join(name))
            .find(|f| f.is_file())
    })
}

fn home_bin(rel: &str) -> Option<PathBuf> {
    let p = Path::new(&std::env::var_os("HOME")?).join(rel);
    p.is_file().then_some(p)
}

/// A started proxy (or the direct baseline) and where its routes are reached.
pub struct Running {
    pub kind: Kind,
    pub bulk: Target,
    pub echo: Target,
    /// The route to the idle point's fake VM, when [`Targets::idle`] was given.
    pub idle: Option<Target>,
    children: Vec<Child>,
}

impl Running {
    /// Root pids of the proxy processes (empty for direct).
    pub fn pids(&self) -> Vec<u32> {
        self.children.iter().map(Child::id).collect()
    }

    /// Err when a proxy process has exited under the bench.
    pub fn check_alive(&mut self) -> Result<(), String> {
        for c in &mut self.children {
            if let Ok(Some(st)) = c.try_wait() {
                return Err(format!(
                    "{} (pid {}) exited: {st}",
                    self.kind.name(),
                    c.id()
                ));
            }
        }
        Ok(())
    }

    /// Kills the proxy processes and whatever they forked, by pid, and reaps them.
    pub fn stop(mut self) {
        let roots = self.pids();
        for pid in crate::procfs::tree(&roots) {
            if !roots.contains(&pid)
                && let Some(p) = rustix::process::Pid::from_raw(pid as i32)
            {
                // A stale pid yields ESRCH: that process is gone already.
                let _ = rustix::process::kill_process(p, rustix::process::Signal::KILL);
            }
        }
        for c in &mut self.children {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

impl Drop for Running {
    fn drop(&mut self) {
        for c in &mut self.children {
            if let Ok(None) = c.try_wait() {
                let _ = c.kill();
                let _ = c.wait();
            }
        }
    }
}

/// Starts `kind` in front of `t`. `rep` only labels the log files.
pub fn start(
    kind: Kind,
    exe: Option<&Path>,
    s: &Settings,
    t: Targets,
    rep: usize,
) -> Result<Running, String> {
    let direct = |addr| Target {
        addr,
        ws_path: None,
    };
    let ws = |addr, path: &str| Target {
        addr,
        ws_path: Some(path.to_owned()),
    };
    let mut r = Running {
        kind,
        bulk: direct(t.bulk),
        echo: direct(t.echo),
        idle: t.idle.map(direct),
        children: Vec::new(),
    };
    let Some(exe) = exe else {
        return Ok(r);
    };
    match kind {
        Kind::Direct => {}
        Kind::Vncgate => {
            let mut routes = vec![
                "--route".to_owned(),
                format!("bulk={}", t.bulk),
                "--route".to_owned(),
                format!("echo={}", t.echo),
                "--allow-upstream".to_owned(),
                "127.0.0.1/32".to_owned(),
            ];
            if let Some(idle) = t.idle {
                routes.extend(["--route".to_owned(), format!("idle={idle}")]);
            }
            let mut r = start_vncgate(exe, s, &routes, "vncgate", rep)?;
            r.idle = t.idle.map(|_| Target {
                addr: r.echo.addr,
                ws_path: Some("/vnc/idle".to_owned()),
            });
            return Ok(r);
        }
        Kind::Websocat | Kind::Websockify => {
            // One process per upstream: neither routes by path.
            let mut addrs = Vec::new();
            let mut upstreams = vec![("bulk", t.bulk), ("echo", t.echo)];
            upstreams.extend(t.idle.map(|a| ("idle", a)));
            for (label, upstream) in upstreams {
                let port = free_port()?;
                let args: Vec<String> = if kind == Kind::Websocat {
                    vec![
                        "--binary".to_owned(),
                        format!("ws-l:127.0.0.1:{port}"),
                        format!("tcp:{upstream}"),
                    ]
                } else {
                    vec![format!("127.0.0.1:{port}"), upstream.to_string()]
                };
                let name = format!("{}-{label}", kind.name());
                r.children.push(spawn(exe, &args, &s.out, &name, rep)?);
                addrs.push(SocketAddr::from(([127, 0, 0, 1], port)));
            }
            r.bulk = ws(addrs[0], "/");
            r.echo = ws(addrs[1], "/");
            r.idle = addrs.get(2).map(|&a| ws(a, "/"));
            wait_listening(&mut r, &addrs)?;
        }
    }
    Ok(r)
}

/// Starts `vncgate serve --listen 127.0.0.1:P ROUTES... --workers N EXTRA...` on a free
/// port, where ROUTES are the arguments that say where routes come from and what may be
/// dialed (`--route`, `--routes-file`, `--redis`, `--allow-upstream`...) and EXTRA is
/// `--vncgate-arg`. Its targets are `/vnc/bulk` and `/vnc/echo` on that port; `log_name`
/// names its log files.
pub fn start_vncgate(
    exe: &Path,
    s: &Settings,
    routes: &[String],
    log_name: &str,
    rep: usize,
) -> Result<Running, String> {
    let port = free_port()?;
    let mut args = vec![
        "serve".to_owned(),
        "--listen".to_owned(),
        format!("127.0.0.1:{port}"),
    ];
    args.extend(routes.iter().cloned());
    args.extend(["--workers".to_owned(), s.workers.to_string()]);
    args.extend(s.vncgate_args.iter().cloned());
    let addr = SocketAddr::from(([127, 0, 0, 1], port));
    let ws = |path: &str| Target {
        addr,
        ws_path: Some(path.to_owned()),
    };
    let mut r = Running {
        kind: Kind::Vncgate,
        bulk: ws("/vnc/bulk"),
        echo: ws("/vnc/echo"),
        idle: None,
        children: vec![spawn(exe, &args, &s.out, log_name, rep)?],
    };
    wait_listening(&mut r, &[addr])?;
    Ok(r)
}

/// A port that was free a moment ago. The proxy binds it right after: a small race that
/// only matters if something else on the box grabs the same port in between.
pub fn free_port() -> Result<u16, String> {
    TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .map_err(|e| format!("no free port: {e}"))
}

fn log_file(out: &Path, name: &str, stream: &str, rep: usize) -> Result<File, String> {
    let path = out.join("logs").join(format!("{name}.{stream}.log"));
    let mut f = OpenOptions::new()
        .create(true)
        .append(true)
        .open(&path)
        .map_err(|e| format!("{}: {e}", path.display()))?;
    let _ = writeln!(f, "===== rep {rep} =====");
    Ok(f)
}

/// Starts `exe` with its stdout and stderr appended to `OUT/logs/NAME.{stdout,stderr}.log`.
pub fn spawn(
    exe: &Path,
    args: &[String],
    out: &Path,
    name: &str,
    rep: usize,
) -> Result<Child, String> {
    Command::new(exe)
        .args(args)
        .stdin(Stdio::null())
        .stdout(log_file(out, name, "stdout", rep)?)
        .stderr(log_file(out, name, "stderr", rep)?)
        .spawn()
        .map_err(|e| format!("cannot start {}: {e}", exe.display()))
}

/// Polls until every address accepts a TCP connection, or the proxy dies, or the deadline.
fn wait_listening(r: &mut Running, addrs: &[SocketAddr]) -> Result<(), String> {
    let deadline = Instant::now() + START_DEADLINE;
    for addr in addrs {
        loop {
            if TcpStream::connect_timeout(addr, Duration::from_millis(200)).is_ok() {
                break;
            }
            r.check_alive()?;
            if Instant::now() > deadline {
                return Err(format!(
                    "{} not listening on {addr} after {START_DEADLINE:?}",
                    r.kind.name()
                ));
            }
            std::thread::sleep(Duration::from_millis(25));
        }
    }
    Ok(())
}
