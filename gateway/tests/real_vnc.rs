//! The load generator's swarm through the gateway binary against a real VNC server: TigerVNC's
//! Xvnc (Debian: tigervnc-standalone-server) with a solid background and an xterm, on a free
//! display and a free loopback port. scripts/test.sh installs Xvnc, xterm and xsetroot; when
//! they are missing these tests fail and say so (they never skip).

mod common;

use std::process::Child;
use std::thread;
use std::time::Duration;

use common::{Gw, Xvnc, stop_child};
use vncgate_loadtest::swarm;

const WIDTH: u64 = 800;
const HEIGHT: u64 = 600;

/// Xvnc (sessions always shared) with a solid background and an xterm; everything is
/// stopped on drop.
struct Desktop {
    xterm: Child,
    x: Xvnc,
}

impl Desktop {
    fn start() -> Desktop {
        let x = Xvnc::start(&format!("{WIDTH}x{HEIGHT}"), &["-AlwaysShared"]);
        // The swarm's key events type letters into it (no Enter, so nothing is run).
        let mut xterm = common::xterm(&x.display)
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
            .spawn()
            .expect("spawn xterm");
        thread::sleep(Duration::from_millis(300));
        assert!(matches!(xterm.try_wait(), Ok(None)), "xterm exited at once");
        Desktop { xterm, x }
    }

    fn alive(&mut self) -> bool {
        self.x.alive()
    }
}

impl Drop for Desktop {
    fn drop(&mut self) {
        stop_child(&mut self.xterm);
    }
}

fn swarm_against_xvnc(driver: &str, subprotocol: Option<&str>) {
    let mut desk = Desktop::start();
    let gw = Gw::start(
        driver,
        &[
            "--route",
            &format!("xvnc=127.0.0.1:{}", desk.x.port),
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
