//! `vncgate-loadtest demo` runs the shipped gateway binary in front of the synthetic desktop:
//! the URL it prints serves an RFB desktop over WebSocket, and SIGTERM reaches the gateway,
//! which drains and exits, and the demo with it.

use std::io::{BufRead as _, BufReader, Read as _, Write as _};
use std::net::TcpStream;
use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

/// The gateway binary cargo built beside this package's (a workspace build builds both).
fn gateway_bin() -> PathBuf {
    let demo = PathBuf::from(env!("CARGO_BIN_EXE_vncgate-loadtest"));
    let gw = demo.with_file_name("vncgate");
    assert!(
        gw.is_file(),
        "{} is missing: build the workspace (cargo build --workspace) before this test",
        gw.display()
    );
    gw
}

#[test]
fn demo_serves_the_synthetic_desktop_and_stops_on_sigterm() {
    let mut child = Command::new(env!("CARGO_BIN_EXE_vncgate-loadtest"))
        .args(["demo", "--gateway"])
        .arg(gateway_bin())
        .args([
            "--listen",
            "127.0.0.1:0",
            "--workers",
            "1",
            "--drain-timeout",
            "1",
        ])
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .expect("demo starts");
    let mut out = BufReader::new(child.stdout.take().unwrap());
    let mut url = None;
    let mut seen = String::new();
    for _ in 0..10 {
        let mut line = String::new();
        if out.read_line(&mut line).unwrap() == 0 {
            break;
        }
        seen.push_str(&line);
        if let Some(u) = line.trim().strip_prefix("vncgate: demo desktop at ") {
            url = Some(u.to_owned());
            break;
        }
    }
    let url = url.unwrap_or_else(|| panic!("no demo line in: {seen}"));
    let rest = url.strip_prefix("ws://").expect("ws:// URL");
    let (addr, path) = rest.split_once('/').unwrap();
    assert_eq!(path, "vnc/demo");

    let mut s = TcpStream::connect(addr).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    write!(
        s,
        "GET /{path} HTTP/1.1\r\nHost: {addr}\r\nUpgrade: websocket\r\nConnection: Upgrade\r\nSec-WebSocket-Version: 13\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n\r\n"
    )
    .unwrap();
    // The 101, then a binary frame whose payload is the desktop's RFB banner.
    let mut got = Vec::new();
    let mut buf = [0u8; 512];
    let deadline = Instant::now() + Duration::from_secs(5);
    while !got.windows(12).any(|w| w == b"RFB 003.008\n") {
        assert!(
            Instant::now() < deadline,
            "no RFB banner: {:?}",
            String::from_utf8_lossy(&got)
        );
        let n = s.read(&mut buf).unwrap();
        assert!(n > 0, "closed: {:?}", String::from_utf8_lossy(&got));
        got.extend_from_slice(&buf[..n]);
    }
    assert!(
        got.starts_with(b"HTTP/1.1 101 "),
        "{:?}",
        String::from_utf8_lossy(&got)
    );

    // SIGTERM to the demo only: the gateway is in its own process group, so this reaches it
    // through the demo, which then exits with the gateway's (clean) status.
    let pid = rustix::process::Pid::from_raw(child.id() as i32).unwrap();
    rustix::process::kill_process(pid, rustix::process::Signal::TERM).unwrap();
    let deadline = Instant::now() + Duration::from_secs(10);
    let status = loop {
        if let Some(st) = child.try_wait().unwrap() {
            break st;
        }
        assert!(
            Instant::now() < deadline,
            "demo still running 10 s after SIGTERM"
        );
        std::thread::sleep(Duration::from_millis(50));
    };
    assert!(status.success(), "demo exited with {status}");
    // And the gateway is gone: its port refuses.
    assert!(
        TcpStream::connect(addr).is_err(),
        "the gateway still listens on {addr}"
    );
}
