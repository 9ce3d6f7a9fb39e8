//! The binary's command-line contract, as scripts outside the repository use it.

mod common;

use std::io::{BufRead, BufReader, Read, Write};
use std::net::TcpStream;
use std::process::{Command, Stdio};
use std::time::Duration;

use common::{BridgeMode, bridge, self_signed, tls_bridge};

const BIN: &str = env!("CARGO_BIN_EXE_vncgate-loadtest");

/// Kills the child when the test ends, pass or fail.
struct Child(std::process::Child);

impl Drop for Child {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// Starts `fakevm` on a free port; returns the process and the address it printed.
fn start_fakevm(extra: &[&str]) -> (Child, String) {
    let mut child = Command::new(BIN)
        .args(["fakevm", "--listen", "127.0.0.1:0"])
        .args(extra)
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let mut line = String::new();
    BufReader::new(child.stdout.take().unwrap())
        .read_line(&mut line)
        .unwrap();
    let addr = line.trim().strip_prefix("listening ").unwrap().to_owned();
    (Child(child), addr)
}

#[test]
fn fakevm_flags_shape_server_init() {
    let (_child, addr) = start_fakevm(&[
        "--width",
        "100",
        "--height",
        "50",
        "--fps",
        "5",
        "--payload",
        "incompressible",
        "--update-area",
        "32x16",
        "--name",
        "demo",
    ]);
    let mut s = TcpStream::connect(&addr).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(20))).unwrap();
    let mut banner = [0; 12];
    s.read_exact(&mut banner).unwrap();
    assert_eq!(&banner, b"RFB 003.008\n");
    s.write_all(b"RFB 003.008\n\x01\x01").unwrap(); // version, security None, ClientInit
    let mut rest = vec![0; 2 + 4 + 24 + 4];
    s.read_exact(&mut rest).unwrap();
    assert_eq!(rest[..6], [1, 1, 0, 0, 0, 0]);
    assert_eq!(rest[6..10], [0, 100, 0, 50]);
    assert_eq!(rest[26..], [0, 0, 0, 4, b'd', b'e', b'm', b'o']);
    // An incremental update is the configured 32x16 rectangle.
    s.write_all(&[3, 1, 0, 0, 0, 0, 0, 100, 0, 50]).unwrap();
    let mut hdr = [0; 16];
    s.read_exact(&mut hdr).unwrap();
    assert_eq!(hdr[8..12], [0, 32, 0, 16]);
}

#[test]
fn fakevm_rejects_bad_flags() {
    for args in [
        &["fakevm"][..],
        &["fakevm", "--listen", "127.0.0.1:0", "--payload", "jpeg"],
        &["fakevm", "--listen", "127.0.0.1:0", "--update-area", "2.5"],
        &["fakevm", "--listen", "127.0.0.1:0", "--width", "0"],
    ] {
        let out = Command::new(BIN).args(args).output().unwrap();
        assert!(!out.status.success(), "{args:?}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn swarm_json_last_line() {
    let (_child, addr) = start_fakevm(&["--width", "160", "--height", "120"]);
    let b = bridge(BridgeMode::Relay(addr.parse().unwrap())).await;
    let url = b.url();
    let out = tokio::task::spawn_blocking(move || {
        Command::new(BIN)
            .args(["swarm", "--url", &url, "--sessions", "3", "--duration", "2"])
            .args(["--input-rate", "10", "--idle-fraction", "0.3", "--json"])
            .args(["--subprotocol", "binary"])
            .output()
            .unwrap()
    })
    .await
    .unwrap();
    assert!(out.status.success());
    let stdout = String::from_utf8(out.stdout).unwrap();
    let last = stdout.lines().last().unwrap();
    let v: serde_json::Value = serde_json::from_str(last).unwrap();
    assert_eq!(v["sessions"], 3);
    assert_eq!(v["sessions_ok"], 3, "{last}");
    assert_eq!(v["errors"], serde_json::json!({}));
    for field in ["connect_ms", "handshake_ms", "rtt_ms"] {
        assert!(v[field]["p50"].is_number(), "{field} in {last}");
        assert!(v[field]["p99"].is_number(), "{field} in {last}");
    }
    assert!(v["updates_per_sec"].is_number());
    assert!(v["bytes_per_sec"].is_number());
}

/// Runs the binary with `args` off the async runtime; returns the parsed last stdout line.
async fn last_json_line(args: Vec<String>) -> serde_json::Value {
    let argv = args.clone();
    let out = tokio::task::spawn_blocking(move || Command::new(BIN).args(&argv).output().unwrap())
        .await
        .unwrap();
    let stdout = String::from_utf8(out.stdout).unwrap();
    assert!(
        out.status.success(),
        "{args:?}: {stdout} {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let last = stdout.lines().last().unwrap();
    serde_json::from_str(last).unwrap()
}

fn strings(v: &[&str]) -> Vec<String> {
    v.iter().map(|s| (*s).to_owned()).collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn swarm_over_wss_with_ca_and_insecure() {
    let (_child, addr) = start_fakevm(&["--width", "160", "--height", "120"]);
    let cert = self_signed();
    let ca = cert.write_pem("cli-ca");
    let b = tls_bridge(BridgeMode::Relay(addr.parse().unwrap()), &cert).await;
    let url = b.url();
    let base = [
        "swarm",
        "--url",
        &url,
        "--sessions",
        "2",
        "--duration",
        "1.5",
        "--json",
    ];
    let mut with_ca = strings(&base);
    with_ca.extend(["--ca".to_owned(), ca.display().to_string()]);
    let v = last_json_line(with_ca).await;
    assert_eq!(v["sessions_ok"], 2, "{v}");
    let mut insecure = strings(&base);
    insecure.push("--insecure".into());
    let v = last_json_line(insecure).await;
    assert_eq!(v["sessions_ok"], 2, "{v}");
    // Default roots: the self-signed certificate is refused, by name.
    let v = last_json_line(strings(&base)).await;
    assert_eq!(v["sessions_ok"], 0, "{v}");
    assert_eq!(v["errors"]["tls_unknown_issuer"], 2, "{v}");
    let _ = std::fs::remove_file(&ca);
    // --ca and --insecure together make no sense.
    let out = Command::new(BIN)
        .args(["swarm", "--url", &url, "--ca", "x.pem", "--insecure"])
        .output()
        .unwrap();
    assert!(!out.status.success());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn idle_json_last_line() {
    let (_child, addr) = start_fakevm(&["--width", "160", "--height", "120"]);
    let b = bridge(BridgeMode::Relay(addr.parse().unwrap())).await;
    let pid = std::process::id().to_string();
    let v = last_json_line(strings(&[
        "idle",
        "--url",
        &b.url(),
        "--sessions",
        "40",
        "--sources",
        "127.0.0.1,127.0.0.2-127.0.0.3",
        "--hold",
        "0.2",
        "--pid",
        &pid,
        "--json",
    ]))
    .await;
    assert_eq!(v["sessions"], 40, "{v}");
    assert_eq!(v["held"], 40, "{v}");
    assert_eq!(v["failed"], 0, "{v}");
    assert_eq!(v["errors"], serde_json::json!({}));
    assert_eq!(v["sources"], 3);
    for field in [
        "pss_before_kib",
        "pss_after_kib",
        "pss_per_session_kib",
        "elapsed_s",
    ] {
        assert!(v[field].is_number(), "{field} in {v}");
    }
    for bad in [
        &[
            "idle",
            "--url",
            "ws://127.0.0.1:1/",
            "--sources",
            "127.0.0.9-127.0.0.1",
        ][..],
        &["idle", "--url", "ws://127.0.0.1:1/", "--concurrency", "0"],
        &["idle", "--url", "http://127.0.0.1:1/"],
    ] {
        let out = Command::new(BIN).args(bad).output().unwrap();
        assert!(!out.status.success(), "{bad:?}");
    }
}
