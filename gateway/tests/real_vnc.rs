//! The load generator's swarm through the gateway binary against a real VNC server: TigerVNC's
//! Xvnc (Debian: tigervnc-standalone-server) with a solid background and an xterm, on a free
//! display and a free loopback port. scripts/test.sh installs Xvnc, xterm and xsetroot; when
//! they are missing these tests fail and say so (they never skip).

mod common;

use std::io::Read;
use std::net::TcpStream;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::thread;
use std::time::{Duration, Instant};

use common::{Gw, closed_port};
use vncgate_loadtest::swarm;

const WIDTH: u64 = 800;
const HEIGHT: u64 = 600;

/// Panics with how to get `cmd` when it cannot be run.
fn require(cmd: &str, probe: &[&str]) {
    match Command::new(cmd)
        .args(probe)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
    {
        Ok(_) => {}
        Err(e) => panic!(
            "{cmd} cannot be run ({e}): the real-VNC-server tests need Xvnc, xterm and xsetroot; \
             scripts/test.sh installs them (apt-get install tigervnc-standalone-server xterm \
             x11-xserver-utils xfonts-base)"
        ),
    }
}

/// Sends SIGTERM to a child this test started (Xvnc then removes its socket and lock file),
/// and SIGKILL if it has not exited 3 s later.
fn stop(child: &mut Child) {
    if let Ok(Some(_)) = child.try_wait() {
        return;
    }
    // SAFETY: kill(2) on the pid of a child we spawned and have not reaped.
    unsafe {
        libc::kill(child.id() as libc::pid_t, libc::SIGTERM);
    }
    let deadline = Instant::now() + Duration::from_secs(3);
    while Instant::now() < deadline {
        if let Ok(Some(_)) = child.try_wait() {
            return;
        }
        thread::sleep(Duration::from_millis(20));
    }
    let _ = child.kill();
    let _ = child.wait();
}

/// Whether 127.0.0.1:port sends an RFB banner.
fn rfb_banner(port: u16) -> bool {
    let Ok(mut s) = TcpStream::connect(("127.0.0.1", port)) else {
        return false;
    };
    let _ = s.set_read_timeout(Some(Duration::from_secs(1)));
    let mut banner = [0u8; 12];
    s.read_exact(&mut banner).is_ok() && banner.starts_with(b"RFB 00")
}

/// Xvnc with a solid background and an xterm; everything is stopped on drop.
struct Desktop {
    xvnc: Child,
    xterm: Option<Child>,
    display: String,
    port: u16,
}

impl Desktop {
    fn start() -> Desktop {
        require("Xvnc", &["-version"]);
        require("xsetroot", &["-version"]);
        require("xterm", &["-version"]);
        // Displays taken (socket or lock file present) are skipped; one taken between the
        // check and Xvnc's start makes Xvnc exit, and the next is tried.
        let first = 400 + std::process::id() % 400;
        let mut desk = None;
        for n in first..first + 40 {
            if Path::new(&format!("/tmp/.X11-unix/X{n}")).exists()
                || Path::new(&format!("/tmp/.X{n}-lock")).exists()
            {
                continue;
            }
            let port = closed_port().port();
            let mut xvnc = Command::new("Xvnc")
                .args([
                    &format!(":{n}"),
                    "-rfbport",
                    &port.to_string(),
                    "-localhost",
                    "-nolisten",
                    "tcp",
                    "-SecurityTypes",
                    "None",
                    "-AlwaysShared",
                    "-geometry",
                    &format!("{WIDTH}x{HEIGHT}"),
                    "-depth",
                    "24",
                ])
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .spawn()
                .expect("spawn Xvnc");
            let deadline = Instant::now() + Duration::from_secs(10);
            let mut up = false;
            while Instant::now() < deadline {
                if let Ok(Some(_)) = xvnc.try_wait() {
                    break;
                }
                if rfb_banner(port) {
                    up = true;
                    break;
                }
                thread::sleep(Duration::from_millis(50));
            }
            if up {
                desk = Some(Desktop {
                    xvnc,
                    xterm: None,
                    display: format!(":{n}"),
                    port,
                });
                break;
            }
            stop(&mut xvnc);
        }
        let mut desk = desk.expect("Xvnc started on one of 40 displays");
        let st = Command::new("xsetroot")
            .args(["-solid", "#3366cc"])
            .env("DISPLAY", &desk.display)
            .status()
            .expect("run xsetroot");
        assert!(st.success(), "xsetroot: {st}");
        // The swarm's key events type letters into it (no Enter, so nothing is run).
        let xterm = Command::new("xterm")
            .args([
                "-geometry",
                "80x24+100+100",
                "-bg",
                "black",
                "-fg",
                "white",
                "+sb",
                "-e",
                "/bin/sh",
            ])
            .env("DISPLAY", &desk.display)
            .env("SHELL", "/bin/sh")
            .env("ENV", "")
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("spawn xterm");
        desk.xterm = Some(xterm);
        thread::sleep(Duration::from_millis(300));
        assert!(
            matches!(desk.xterm.as_mut().unwrap().try_wait(), Ok(None)),
            "xterm exited at once"
        );
        desk
    }

    fn alive(&mut self) -> bool {
        matches!(self.xvnc.try_wait(), Ok(None))
    }
}

impl Drop for Desktop {
    fn drop(&mut self) {
        if let Some(x) = self.xterm.as_mut() {
            stop(x);
        }
        stop(&mut self.xvnc);
    }
}

fn swarm_against_xvnc(driver: &str, subprotocol: Option<&str>) {
    let mut desk = Desktop::start();
    let gw = Gw::start(
        driver,
        &[
            "--route",
            &format!("xvnc=127.0.0.1:{}", desk.port),
            "--allow-upstream",
            "127.0.0.0/8",
        ],
    );
    let sessions = 4;
    let cfg = swarm::Config {
        url: gw.url("xvnc"),
        sessions,
        duration: Duration::from_secs(3),
        ramp_up: Duration::from_millis(300),
        input_rate: 20.0,
        subprotocol: subprotocol.map(Into::into),
        ..Default::default()
    };
    let rt = tokio::runtime::Runtime::new().unwrap();
    let r = rt.block_on(swarm::run(cfg)).unwrap();
    eprintln!("{driver}: {r}");
    assert!(
        r.errors.is_empty(),
        "{r}\n{:?}\n{}",
        r.error_examples,
        gw.log()
    );
    assert_eq!(r.sessions, sessions);
    assert_eq!(r.sessions_handshake_ok, sessions, "{r}");
    assert_eq!(r.sessions_ok, sessions, "{r}");
    // Only Raw is offered, so each session's first update is the whole screen at 32 bpp.
    let frame = WIDTH * HEIGHT * 4;
    assert!(
        r.bytes >= sessions as u64 * frame,
        "every session received a full frame: {r}"
    );
    // Pointer moves (the server draws the cursor for clients without cursor encodings) and
    // letters typed into the xterm keep the incremental updates coming.
    assert!(r.updates > sessions as u64 * 2, "updates keep coming: {r}");
    assert!(r.inputs_sent > 0, "{r}");
    assert!(desk.alive(), "Xvnc is still running");
}

#[test]
fn swarm_through_gateway_to_xvnc_uring() {
    swarm_against_xvnc("uring", None);
}

#[test]
fn swarm_through_gateway_to_xvnc_epoll_binary_subprotocol() {
    swarm_against_xvnc("epoll", Some("binary"));
}
