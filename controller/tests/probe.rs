//! The probe against real sockets: the fake VM, a server that speaks something else, one
//! that says nothing, and a port nobody listens on.

use std::io::Write;
use std::net::{SocketAddr, TcpListener};
use std::process::Command;
use std::time::Duration;

use vncgate_controller::probe::{ProbeOutcome, probe};
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
