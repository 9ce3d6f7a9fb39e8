//! Route publishing against a real Redis: nothing is written until the VM's VNC port sends
//! an RFB banner; withdrawing deletes and announces.

use std::io::Write;
use std::net::TcpListener;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use vncgate_schema::testing::RedisServer;

const BIN: &str = env!("CARGO_BIN_EXE_vncgate-controller");

fn run(args: &[&str]) -> (i32, String, String) {
    let out = Command::new(BIN).args(args).output().unwrap();
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

#[test]
fn a_route_is_published_only_once_the_vnc_server_answers() {
    let r = RedisServer::start();
    let watched = r.monitor();
    let port = free_port();
    let vnc = format!("127.0.0.1:{port}");
    let child = Command::new(BIN)
        .args([
            "publish",
            "--redis",
            &r.url(),
            "--session",
            "boot1",
            "--vnc",
            &vnc,
            "--wait",
            "20",
            "--json",
            "--token",
            "t0k",
            "--ttl",
            "600",
        ])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    // The VM is still booting: its VNC port refuses for a while (the publisher probes it
    // several times meanwhile). Then the VNC server starts.
    std::thread::sleep(Duration::from_millis(1200));
    let l = TcpListener::bind(&vnc).unwrap();
    let vnc_up = Instant::now();
    std::thread::spawn(move || {
        let mut held = Vec::new();
        for mut s in l.incoming().flatten() {
            let _ = s.write_all(b"RFB 003.008\n");
            held.push(s);
        }
    });
    let out = child.wait_with_output().unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert_eq!(
        out.status.code(),
        Some(0),
        "{stdout}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(stdout.contains("\"published\":true"), "{stdout}");
    // Over the whole run, nothing touched the route's key before the VNC server was up, and
    // the write came after it.
    let touching: Vec<(Instant, String)> = watched
        .seen()
        .iter()
        .filter(|(_, l)| l.contains("vncgate:route:boot1"))
        .cloned()
        .collect();
    assert!(!touching.is_empty(), "MONITOR saw no write of the route");
    for (at, line) in &touching {
        assert!(
            *at >= vnc_up,
            "written before the VNC server was up: {line}"
        );
    }
    let fields = r.cli(&["HGETALL", "vncgate:route:boot1"]);
    assert!(fields.contains(&vnc), "{fields}");
    assert!(fields.contains("vncgate-controller"), "{fields}");
    // The token is stored as its digest only.
    assert!(!fields.contains("t0k"), "{fields}");
    assert!(fields.contains("token_sha256"), "{fields}");

    let (code, out, err) = run(&["withdraw", "--redis", &r.url(), "--session", "boot1"]);
    assert_eq!(code, 0, "{out}{err}");
    assert!(r.cli(&["EXISTS", "vncgate:route:boot1"]).contains('0'));
    let (code, _, _) = run(&["withdraw", "--redis", &r.url(), "--session", "boot1"]);
    assert_eq!(code, 1);
}

#[test]
fn a_vm_that_never_gets_ready_publishes_nothing() {
    let r = RedisServer::start();
    let vnc = format!("127.0.0.1:{}", free_port());
    let (code, out, err) = run(&[
        "publish",
        "--redis",
        &r.url(),
        "--session",
        "dead",
        "--vnc",
        &vnc,
        "--wait",
        "1",
        "--json",
    ]);
    assert_eq!(code, 1, "{out}{err}");
    assert!(out.contains("\"published\":false"), "{out}");
    assert!(out.contains("\"status\":\"refused\""), "{out}");
    assert!(r.cli(&["KEYS", "*"]).trim().is_empty());
}

#[test]
fn errors_are_named_before_waiting() {
    let closed = format!("redis://127.0.0.1:{}", free_port());
    for (args, says) in [
        (
            vec![
                "publish",
                "--redis",
                "nope",
                "--session",
                "a",
                "--vnc",
                "127.0.0.1:1",
            ],
            "not a Redis URL",
        ),
        (
            vec![
                "publish",
                "--redis",
                &closed,
                "--session",
                "a",
                "--vnc",
                "127.0.0.1:1",
            ],
            "cannot reach Redis",
        ),
        (
            vec![
                "publish",
                "--redis",
                &closed,
                "--session",
                "a b",
                "--vnc",
                "127.0.0.1:1",
            ],
            "session id",
        ),
    ] {
        let (code, out, err) = run(&args);
        assert_eq!(code, 2, "{args:?}: {out}{err}");
        assert!(err.contains(says), "{args:?}: {err}");
    }
}
