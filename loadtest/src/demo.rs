//! `vncgate-loadtest demo`: the gateway in front of a synthetic desktop, one command, no
//! Redis.
//!
//! The synthetic desktop ([`crate::fakevm`]) runs in this process on a loopback port; the
//! gateway is the real, shipped `vncgate` binary, started as a child with a static route
//! `demo` to that port and only that address allowed upstream. The shipped binary carries no
//! load-test code (ARCHITECTURE.md), so the demo lives here and runs it as it is. Its stdout
//! lines are passed through, and the demo adds the URL to open; SIGTERM and SIGINT are passed
//! to the gateway, which drains and exits, and the demo exits with its status.

use std::ffi::OsString;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{ExitStatus, Stdio};

use tokio::io::{AsyncBufReadExt as _, BufReader};
use tokio::process::{Child, Command};
use tokio::signal::unix::{SignalKind, signal};

use crate::fakevm;

/// What the demo runs.
pub struct Config {
    /// The `vncgate` binary; `None` looks next to this executable, then on `PATH`.
    pub gateway: Option<PathBuf>,
    /// Flags for `vncgate serve` (`--listen`, `--admin`, `--workers`...).
    pub serve_args: Vec<OsString>,
}

/// Finds the gateway binary: the one given, else `vncgate` beside this executable (cargo
/// builds both into `target/<profile>/`), else `vncgate` on `PATH`.
pub fn find_gateway(given: Option<&Path>) -> Result<PathBuf, String> {
    if let Some(p) = given {
        return if p.is_file() {
            Ok(p.to_owned())
        } else {
            Err(format!("--gateway {}: no such file", p.display()))
        };
    }
    let beside = std::env::current_exe()
        .ok()
        .and_then(|exe| exe.parent().map(|d| d.join("vncgate")));
    let on_path = std::env::var_os("PATH")
        .into_iter()
        .flat_map(|p| std::env::split_paths(&p).collect::<Vec<_>>())
        .map(|d| d.join("vncgate"));
    beside
        .into_iter()
        .chain(on_path)
        .find(|p| p.is_file())
        .ok_or_else(|| {
            "cannot find the vncgate binary next to this one or on PATH: build it with \
             `cargo build --release -p vncgate`, or pass --gateway PATH"
                .to_owned()
        })
}

/// Runs the demo until the gateway exits; returns the gateway's exit status.
pub async fn run(cfg: Config) -> Result<ExitStatus, String> {
    let gateway = find_gateway(cfg.gateway.as_deref())?;
    let vm: SocketAddr = fakevm::spawn_background(fakevm::Config {
        name: "vncgate demo desktop".into(),
        ..Default::default()
    })
    .map_err(|e| format!("cannot start the synthetic desktop: {e}"))?;
    tracing::info!(%vm, gateway = %gateway.display(), "synthetic desktop up; starting the gateway");
    let mut child = Command::new(&gateway)
        .arg("serve")
        .arg("--route")
        .arg(format!("demo={vm}"))
        .arg("--allow-upstream")
        .arg(format!("{}/32", vm.ip()))
        .args(&cfg.serve_args)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        // Its own process group: a terminal's Ctrl-C reaches the gateway once, through
        // `forward`, not twice (a second signal makes it exit without draining).
        .process_group(0)
        .kill_on_drop(true)
        .spawn()
        .map_err(|e| format!("cannot start {}: {e}", gateway.display()))?;
    let stdout = child.stdout.take().expect("stdout is piped");
    let mut lines = BufReader::new(stdout).lines();
    let mut term = signal(SignalKind::terminate()).map_err(|e| e.to_string())?;
    let mut int = signal(SignalKind::interrupt()).map_err(|e| e.to_string())?;
    let mut stdout_open = true;
    loop {
        tokio::select! {
            line = lines.next_line(), if stdout_open => match line {
                Ok(Some(line)) => {
                    println!("{line}");
                    if let Some(url) = listening_url(&line) {
                        announce(url);
                    }
                }
                // The gateway closed its stdout: keep waiting for it to exit.
                Ok(None) | Err(_) => stdout_open = false,
            },
            _ = term.recv() => forward(&child, rustix::process::Signal::TERM),
            _ = int.recv() => forward(&child, rustix::process::Signal::INT),
            status = child.wait() => return status.map_err(|e| e.to_string()),
        }
    }
}

/// `vncgate: listening on ws://ADDR/PREFIX/` -> `ws://ADDR/PREFIX/`.
fn listening_url(line: &str) -> Option<&str> {
    line.strip_prefix("vncgate: listening on ")
}

fn announce(url: &str) {
    println!("vncgate: demo desktop at {url}demo");
    // noVNC's own page takes the parts, and `encrypt=1` for wss://.
    let (rest, encrypt) = match url.strip_prefix("wss://") {
        Some(r) => (Some(r), " encrypt=1"),
        None => (url.strip_prefix("ws://"), ""),
    };
    if let Some((host_port, path)) = rest.and_then(|r| r.split_once('/'))
        && let Some((host, port)) = host_port.rsplit_once(':')
    {
        println!(
            "vncgate: open noVNC with host={host} port={port} path={path}demo{encrypt} (see README: Seeing the demo desktop)"
        );
    }
}

fn forward(child: &Child, sig: rustix::process::Signal) {
    let Some(pid) = child
        .id()
        .and_then(|id| rustix::process::Pid::from_raw(id as i32))
    else {
        return;
    };
    if let Err(e) = rustix::process::kill_process(pid, sig) {
        tracing::warn!(error = %e, "cannot signal the gateway");
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_the_gateways_listening_line() {
        assert_eq!(
            listening_url("vncgate: listening on ws://127.0.0.1:8080/vnc/"),
            Some("ws://127.0.0.1:8080/vnc/")
        );
        assert_eq!(listening_url("vncgate: admin on http://x"), None);
    }

    #[test]
    fn a_missing_gateway_is_named() {
        let e = find_gateway(Some(Path::new("/nonexistent/vncgate"))).unwrap_err();
        assert!(e.contains("/nonexistent/vncgate"), "{e}");
    }
}
