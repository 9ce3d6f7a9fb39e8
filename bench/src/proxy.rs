//! The relays under test, each started as a child process on a free loopback port in front
//! of the in-process targets, with stdout/stderr captured under the output folder, and
//! killed by pid when its turn is over. `Direct` starts nothing: it is the ceiling.
//! `VncgateTls` is the same vncgate binary serving `wss://` (`--tls-cert`, `--tls-key`) with
//! the run's generated certificate; its targets carry the client's TLS configuration.

use std::fs::{File, OpenOptions};
use std::io::Write;
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use crate::conn::Target;
use crate::targets::Targets;
use crate::tls::BenchCert;

/// How long a proxy gets to start listening (websockify is a Python start-up).
const START_DEADLINE: Duration = Duration::from_secs(10);

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    Direct,
    Vncgate,
    /// vncgate serving `wss://`: the same binary and flags as `Vncgate`, plus the
    /// certificate; the client speaks TLS to it.
    VncgateTls,
    /// vncgate recording every session (`--record DIR` under the output folder, removed
    /// when the process stops): the cost of recording, next to `Vncgate`. Not in the
    /// default selection (it writes gigabytes).
    VncgateRecord,
    Websocat,
    Websockify,
}

impl Kind {
    /// In the order a repetition runs them and the table shows them: `VncgateTls` next to
    /// `Vncgate`, so the two compare at a glance.
    pub const ALL: [Kind; 6] = [
        Kind::Direct,
        Kind::Vncgate,
        Kind::VncgateTls,
        Kind::VncgateRecord,
        Kind::Websocat,
        Kind::Websockify,
    ];

    pub fn name(self) -> &'static str {
        match self {
            Kind::Direct => "direct",
            Kind::Vncgate => "vncgate",
            Kind::VncgateTls => "vncgate-tls",
            Kind::VncgateRecord => "vncgate-record",
            Kind::Websocat => "websocat",
            Kind::Websockify => "websockify",
        }
    }

    pub fn parse(s: &str) -> Option<Kind> {
        Kind::ALL.into_iter().find(|k| k.name() == s)
    }

    /// Parses the items of `--only` (already split at commas): proxy names, trimmed, empty
    /// items ignored. The result is in [`Kind::ALL`] order without duplicates; an unknown
    /// name or an empty selection is an error that names the valid ones.
    pub fn parse_list<S: AsRef<str>>(items: &[S]) -> Result<Vec<Kind>, String> {
        let names = || Kind::ALL.map(Kind::name).join(", ");
        let mut chosen = Vec::new();
        for item in items {
            let item = item.as_ref().trim();
            if item.is_empty() {
                continue;
            }
            match Kind::parse(item) {
                Some(k) => chosen.push(k),
                None => return Err(format!("unknown proxy {item:?} ({})", names())),
            }
        }
        let kinds: Vec<Kind> = Kind::ALL
            .into_iter()
            .filter(|k| chosen.contains(k))
            .collect();
        if kinds.is_empty() {
            return Err(format!("no proxy selected ({})", names()));
        }
        Ok(kinds)
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
    /// The run's certificate for `VncgateTls` (`Err`: why none could be made; `None`: not
    /// asked for).
    pub tls: Option<Result<Arc<BenchCert>, String>>,
}

/// Finds the executable for `kind`, or says why the proxy is skipped.
pub fn locate(kind: Kind, s: &Settings) -> Result<Option<PathBuf>, String> {
    match kind {
        Kind::Direct => Ok(None),
        Kind::VncgateTls => match &s.tls {
            Some(Ok(_)) => locate(Kind::Vncgate, s),
            Some(Err(why)) => Err(format!("no certificate: {why}")),
            None => Err("no certificate was generated for this run".to_owned()),
        },
        Kind::VncgateRecord => locate(Kind::Vncgate, s),
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
    /// The route to the banner server (`upgrades50`), when [`Targets::banner`] was given.
    pub banner: Option<Target>,
    children: Vec<Child>,
    /// Removed once the processes are gone (`VncgateRecord`'s recordings).
    scratch: Option<PathBuf>,
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
        if let Some(d) = self.scratch.take() {
            let _ = std::fs::remove_dir_all(d);
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
    let direct = |addr| Target::plain(addr, None);
    let ws = |addr, path: &str| Target::plain(addr, Some(path));
    let mut r = Running {
        kind,
        bulk: direct(t.bulk),
        echo: direct(t.echo),
        idle: t.idle.map(direct),
        banner: t.banner.map(direct),
        children: Vec::new(),
        scratch: None,
    };
    let Some(exe) = exe else {
        return Ok(r);
    };
    match kind {
        Kind::Direct => {}
        Kind::Vncgate | Kind::VncgateTls | Kind::VncgateRecord => {
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
            if let Some(banner) = t.banner {
                routes.extend(["--route".to_owned(), format!("banner={banner}")]);
            }
            let tls = match (kind, &s.tls) {
                (Kind::VncgateTls, Some(Ok(cert))) => {
                    routes.extend([
                        "--tls-cert".to_owned(),
                        cert.cert_pem.display().to_string(),
                        "--tls-key".to_owned(),
                        cert.key_pem.display().to_string(),
                    ]);
                    Some(Arc::new(cert.client.clone()))
                }
                (Kind::VncgateTls, _) => return Err("no certificate for vncgate-tls".into()),
                _ => None,
            };
            let scratch =
                (kind == Kind::VncgateRecord).then(|| s.out.join(format!("recordings-rep{rep}")));
            if let Some(d) = &scratch {
                routes.extend(["--record".to_owned(), d.display().to_string()]);
            }
            let mut r = start_vncgate(exe, s, &routes, kind.name(), rep)?;
            r.scratch = scratch;
            r.kind = kind;
            r.idle = t
                .idle
                .map(|_| Target::plain(r.echo.addr, Some("/vnc/idle")));
            r.banner = t
                .banner
                .map(|_| Target::plain(r.echo.addr, Some("/vnc/banner")));
            for t in [&mut r.bulk, &mut r.echo]
                .into_iter()
                .chain(r.idle.as_mut())
                .chain(r.banner.as_mut())
            {
                t.tls.clone_from(&tls);
            }
            return Ok(r);
        }
        Kind::Websocat | Kind::Websockify => {
            // One process per upstream: neither routes by path.
            let mut addrs = Vec::new();
            let mut upstreams = vec![("bulk", t.bulk), ("echo", t.echo)];
            upstreams.extend(t.idle.map(|a| ("idle", a)));
            upstreams.extend(t.banner.map(|a| ("banner", a)));
            let labels: Vec<&str> = upstreams.iter().map(|u| u.0).collect();
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
            let of = |label| {
                labels
                    .iter()
                    .position(|l| *l == label)
                    .map(|i| ws(addrs[i], "/"))
            };
            r.bulk = ws(addrs[0], "/");
            r.echo = ws(addrs[1], "/");
            r.idle = of("idle");
            r.banner = of("banner");
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
    let ws = |path: &str| Target::plain(addr, Some(path));
    let mut r = Running {
        kind: Kind::Vncgate,
        bulk: ws("/vnc/bulk"),
        echo: ws("/vnc/echo"),
        idle: None,
        banner: None,
        children: vec![spawn(exe, &args, &s.out, log_name, rep)?],
        scratch: None,
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_lists_are_in_run_order_without_duplicates() {
        assert_eq!(
            Kind::parse_list(&["vncgate-tls", " direct", "vncgate-tls", ""]).unwrap(),
            [Kind::Direct, Kind::VncgateTls]
        );
        for k in Kind::ALL {
            assert_eq!(Kind::parse(k.name()), Some(k));
        }
        assert_eq!(Kind::VncgateTls.name(), "vncgate-tls");
    }

    #[test]
    fn unknown_and_empty_only_lists_are_errors() {
        let e = Kind::parse_list(&["direct", "vncgate-ssl"]).unwrap_err();
        assert!(
            e.contains("\"vncgate-ssl\"") && e.contains("vncgate-tls"),
            "{e}"
        );
        assert!(Kind::parse_list::<&str>(&[]).is_err());
        assert!(Kind::parse_list(&[" "]).is_err());
    }

    #[test]
    fn vncgate_tls_is_skipped_with_the_reason_when_it_has_no_certificate() {
        let s = |tls| Settings {
            vncgate: std::env::current_exe().unwrap(),
            workers: 1,
            vncgate_args: Vec::new(),
            out: std::env::temp_dir(),
            tls,
        };
        let e = locate(Kind::VncgateTls, &s(Some(Err("rcgen: boom".into())))).unwrap_err();
        assert_eq!(e, "no certificate: rcgen: boom");
        assert!(locate(Kind::VncgateTls, &s(None)).is_err());
        let d = std::env::temp_dir().join(format!("vncgate-bench-locate-{}", std::process::id()));
        let cert = crate::tls::generate(&d).unwrap();
        assert_eq!(
            locate(Kind::VncgateTls, &s(Some(Ok(Arc::new(cert))))).unwrap(),
            Some(std::env::current_exe().unwrap())
        );
        let _ = std::fs::remove_dir_all(&d);
    }
}
