//! The probe against real sockets: the fake VM, a server that speaks something else, one
//! that says nothing, and a port nobody listens on.

use std::io::Write;
use std::net::{SocketAddr, TcpListener};
use std::process::Command;
use std::time::Duration;

use vncgate_controller::probe::{Depth, ProbeOutcome, probe, probe_to};
use vncgate_loadtest::fakevm;
use vncgate_rfb::banner::RfbVersion;

/// Generous: only bounds a broken test. Outcomes are asserted, never durations.
const LONG: Duration = Duration::from_secs(10);
/// For the cases that must run into the deadline.
const SHORT: Duration = Duration::from_millis(300);

/// A TCP server that answers every connection with `reply` and then holds it open.
fn server_sending(reply: &'static [u8]) -> SocketAddr {
    let l = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = l.local_addr().unwrap();
    std::thread::spawn(move || {
        let mut held = Vec::new();
        for mut s in l.incoming().flatten() {
            let _ = s.write_all(reply);
            held.push(s);
        }
    });
    addr
}

fn closed_port() -> SocketAddr {
    TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
}

#[test]
fn ready_against_the_fake_vm() {
    let addr = fakevm::spawn_background(fakevm::Config::default()).unwrap();
    assert_eq!(
        probe(&addr.to_string(), LONG),
        ProbeOutcome::Ready {
            addr,
            version: RfbVersion { major: 3, minor: 8 }
        }
    );
}

#[test]
fn not_rfb_shows_what_it_saw() {
    let addr = server_sending(b"HTTP/1.1 400 Bad Request\r\n\r\n");
    let out = probe(&addr.to_string(), LONG);
    assert_eq!(out.status(), "not-rfb");
    // The first wrong byte is enough; the probe does not wait for more.
    assert!(b"HTTP/1.1 400".starts_with(out.seen().unwrap()), "{out}");
}

#[test]
fn silent_server_times_out() {
    let addr = server_sending(b"");
    assert_eq!(
        probe(&addr.to_string(), SHORT),
        ProbeOutcome::Timeout { seen: vec![] }
    );
}

#[test]
fn partial_banner_times_out_with_the_bytes() {
    let addr = server_sending(b"RFB 003");
    assert_eq!(
        probe(&addr.to_string(), SHORT),
        ProbeOutcome::Timeout {
            seen: b"RFB 003".to_vec()
        }
    );
}

#[test]
fn closed_port_is_refused() {
    let addr = closed_port();
    assert_eq!(
        probe(&addr.to_string(), LONG),
        ProbeOutcome::Refused { addr }
    );
}

#[test]
fn unresolvable_is_an_error() {
    assert_eq!(probe("no-port-given", LONG).status(), "error");
}

const BIN: &str = env!("CARGO_BIN_EXE_vncgate-controller");

#[test]
fn cli_exit_codes_and_json() {
    let vm = fakevm::spawn_background(fakevm::Config::default()).unwrap();
    let out = Command::new(BIN)
        .args(["probe", "--vnc", &vm.to_string(), "--json"])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(0));
    let line = String::from_utf8(out.stdout).unwrap();
    assert!(line.starts_with(r#"{"vnc":"#), "{line}");
    assert!(line.contains(r#""status":"ready""#), "{line}");
    assert!(line.contains(r#""version":"3.8""#), "{line}");

    let garbage = server_sending(b"SSH-2.0-OpenSSH_9.2\r\n");
    let out = Command::new(BIN)
        .args(["probe", "--vnc", &garbage.to_string()])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1));
    let line = String::from_utf8(out.stdout).unwrap();
    assert!(line.contains("not-rfb"), "{line}");

    let out = Command::new(BIN)
        .args([
            "probe",
            "--vnc",
            &closed_port().to_string(),
            "--timeout-ms",
            "500",
        ])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1));
    assert!(String::from_utf8(out.stdout).unwrap().contains("refused"));
}

fn desktop(password: Option<&str>) -> Depth {
    Depth::Desktop {
        password: password.map(|p| p.as_bytes().to_vec()),
    }
}

/// A one-connection RFB server from the sans-IO server role, with a framebuffer of
/// `width`x`height`: the 0x0 case no real desktop has.
fn rfb_server(width: u16, height: u16) -> SocketAddr {
    use std::io::Read;
    use vncgate_rfb::{PixelFormat, ServerHandshake, ServerInit, ServerSecurity};
    let l = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = l.local_addr().unwrap();
    std::thread::spawn(move || {
        let (mut s, _) = l.accept().unwrap();
        let init = ServerInit {
            width,
            height,
            pixel_format: PixelFormat::BGRX_LE,
            name: "empty".into(),
        };
        let mut hs = ServerHandshake::new(ServerSecurity::None, init);
        let mut buf = [0u8; 256];
        let mut pending = Vec::new();
        loop {
            let out = hs.take_output();
            if s.write_all(&out).is_err() || hs.is_done() {
                break;
            }
            let Ok(n) = s.read(&mut buf) else { break };
            if n == 0 {
                break;
            }
            pending.extend_from_slice(&buf[..n]);
            let Ok(used) = hs.receive(&pending) else {
                break;
            };
            pending.drain(..used);
        }
        std::thread::sleep(LONG);
    });
    addr
}

#[test]
fn desktop_goes_through_server_init() {
    let addr = fakevm::spawn_background(fakevm::Config {
        width: 800,
        height: 600,
        name: "probe desktop".into(),
        ..Default::default()
    })
    .unwrap();
    let out = probe_to(&addr.to_string(), LONG, &desktop(None));
    assert_eq!(
        out,
        ProbeOutcome::Desktop {
            addr,
            version: RfbVersion { major: 3, minor: 8 },
            width: 800,
            height: 600,
            name: "probe desktop".into(),
        }
    );
    assert!(out.is_ready() && out.failed_check().is_none());
    let v: serde_json::Value = serde_json::from_str(&out.to_json("vm", Duration::ZERO)).unwrap();
    assert_eq!(v["desktop"]["width"], 800);
    assert_eq!(v["status"], "desktop");
}

#[test]
fn desktop_with_vnc_authentication() {
    let addr = fakevm::spawn_background(fakevm::Config {
        password: Some("s3cret".into()),
        ..Default::default()
    })
    .unwrap();
    let target = addr.to_string();
    assert!(matches!(
        probe_to(&target, LONG, &desktop(Some("s3cret"))),
        ProbeOutcome::Desktop {
            width: 1024,
            height: 768,
            ..
        }
    ));
    // Without the password, and with a wrong one: a banner, then a named handshake failure.
    for (pw, want) in [
        (None, "requires VNC authentication"),
        (Some("wrong"), "authentication failed"),
    ] {
        let out = probe_to(&target, LONG, &desktop(pw));
        match &out {
            ProbeOutcome::Handshake { error, .. } => {
                assert!(error.contains(want), "{pw:?}: {error}")
            }
            other => panic!("{pw:?}: {other:?}"),
        }
        assert_eq!(out.failed_check(), Some("vnc_handshake"));
        assert!(!out.is_ready());
    }
    // A banner-only probe of the same server is ready: the banner is all it checks.
    assert!(probe(&target, LONG).is_ready());
}

#[test]
fn a_banner_that_goes_nowhere_is_not_a_desktop() {
    // The banner and then silence: ready for a banner-only probe, not for a desktop one.
    let addr = server_sending(b"RFB 003.008\n");
    let out = probe_to(&addr.to_string(), SHORT, &desktop(None));
    match &out {
        ProbeOutcome::Handshake { error, .. } => assert!(error.contains("ServerInit"), "{error}"),
        other => panic!("{other:?}"),
    }
    // A handshake to an empty framebuffer.
    let out = probe_to(&rfb_server(0, 0).to_string(), LONG, &desktop(None));
    match &out {
        ProbeOutcome::Handshake { error, .. } => assert!(error.contains("0x0"), "{error}"),
        other => panic!("{other:?}"),
    }
    // Refused and silent ports name their checks.
    assert_eq!(
        probe_to(&closed_port().to_string(), LONG, &desktop(None)).failed_check(),
        Some("vnc_refused")
    );
    let silent = TcpListener::bind("127.0.0.1:0").unwrap();
    assert_eq!(
        probe_to(
            &silent.local_addr().unwrap().to_string(),
            SHORT,
            &desktop(None)
        )
        .failed_check(),
        Some("vnc_timeout")
    );
}

#[test]
fn cli_desktop_probe() {
    let vm = fakevm::spawn_background(fakevm::Config::default()).unwrap();
    let out = Command::new(BIN)
        .args(["probe", "--vnc", &vm.to_string(), "--desktop", "--json"])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(0));
    let line = String::from_utf8(out.stdout).unwrap();
    assert!(line.contains(r#""status":"desktop""#), "{line}");
    assert!(line.contains(r#""width":1024"#), "{line}");
    let banner_only = server_sending(b"RFB 003.008\n");
    let out = Command::new(BIN)
        .args([
            "probe",
            "--vnc",
            &banner_only.to_string(),
            "--desktop",
            "--timeout-ms",
            "300",
        ])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1));
}
