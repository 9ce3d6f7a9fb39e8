//! Idle scale mode against the fake VM through the test-only WebSocket-to-TCP bridge (plain
//! and TLS).

mod common;

use std::collections::BTreeSet;
use std::net::IpAddr;
use std::time::{Duration, Instant};

use common::{BridgeMode, bridge, dead_addr, self_signed, tls_bridge};
use vncgate_loadtest::dial::{Tls, parse_sources};
use vncgate_loadtest::{fakevm, idle};

fn vm() -> std::net::SocketAddr {
    fakevm::spawn_background(fakevm::Config {
        width: 64,
        height: 48,
        ..Default::default()
    })
    .unwrap()
}

fn cfg(url: String, sessions: usize) -> idle::Config {
    idle::Config {
        url,
        sessions,
        connect_timeout: Duration::from_secs(10),
        deadline: Duration::from_secs(30),
        hold: Duration::from_millis(300),
        ..Default::default()
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn holds_200_sessions_from_two_sources() {
    let b = bridge(BridgeMode::Relay(vm())).await;
    let sources = parse_sources("127.0.0.1-127.0.0.2").unwrap();
    let r = idle::run(&idle::Config {
        sources: sources.clone(),
        concurrency: 64,
        pid: Some(std::process::id()),
        ..cfg(b.url(), 200)
    })
    .await
    .unwrap();
    assert_eq!(r.held, 200, "{r}");
    assert_eq!(r.failed, 0, "{r}");
    assert!(r.errors.is_empty(), "{r}");
    assert_eq!(r.sources, 2);
    assert!(r.pss_before_kib.is_some_and(|v| v > 0), "{r}");
    assert!(r.pss_after_kib.is_some_and(|v| v > 0), "{r}");
    assert!(r.pss_per_session_kib.is_some_and(f64::is_finite), "{r}");
    assert!(r.elapsed_s >= r.hold_s && r.ramp_s < 30.0, "{r}");
    // Round-robin over the sources: both show up as client addresses, 100 each.
    let peers = b.peers.lock().unwrap().clone();
    let used: BTreeSet<IpAddr> = peers.iter().map(|p| p.ip()).collect();
    assert_eq!(used, sources.into_iter().collect());
    let from_second = peers
        .iter()
        .filter(|p| p.ip() == used.last().copied().unwrap());
    assert_eq!(from_second.count(), 100);

    let v: serde_json::Value = serde_json::from_str(&r.to_json_line()).unwrap();
    assert_eq!(v["held"], 200);
    assert_eq!(v["errors"], serde_json::json!({}));
    assert!(v["pss_per_session_kib"].is_number());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn holds_sessions_over_wss() {
    let cert = self_signed();
    let b = tls_bridge(BridgeMode::Relay(vm()), &cert).await;
    let ca = cert.write_pem("idle-ca");
    let r = idle::run(&idle::Config {
        tls: Tls::CaFile(ca.clone()),
        ..cfg(b.url(), 20)
    })
    .await
    .unwrap();
    let _ = std::fs::remove_file(&ca);
    assert_eq!(r.held, 20, "{r}");
    // Without --pid there is no PSS figure, and the JSON says null rather than 0.
    assert!(r.pss_per_session_kib.is_none());
    let v: serde_json::Value = serde_json::from_str(&r.to_json_line()).unwrap();
    assert!(v["pss_before_kib"].is_null());

    let r = idle::run(&cfg(b.url(), 3)).await.unwrap();
    assert_eq!(r.held, 0, "{r}");
    assert_eq!(r.errors.get("tls_unknown_issuer"), Some(&3), "{r}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn failures_are_counted_by_kind_and_bounded_in_time() {
    let t0 = Instant::now();
    let r = idle::run(&cfg(format!("ws://{}/vnc/x", dead_addr()), 10))
        .await
        .unwrap();
    assert_eq!(r.held, 0);
    assert_eq!(r.failed, 10);
    assert_eq!(r.errors.get("connect_refused"), Some(&10), "{r}");

    // A server that closes every session: the close code is the kind.
    let b = bridge(BridgeMode::Close(4001, "vm vnc port refused")).await;
    let r = idle::run(&cfg(b.url(), 5)).await.unwrap();
    assert_eq!(r.errors.get("4001"), Some(&5), "{r}");

    // A server that accepts TCP and never answers: the connect timeout ends each session,
    // and once two have failed no more are started (one at a time, so exactly two).
    let mute = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let r = idle::run(&idle::Config {
        concurrency: 1,
        connect_timeout: Duration::from_millis(300),
        max_failures: Some(2),
        ..cfg(format!("ws://{}/vnc/x", mute.local_addr().unwrap()), 6)
    })
    .await
    .unwrap();
    assert_eq!(r.held, 0);
    assert_eq!(r.errors.get("connect_timeout"), Some(&2), "{r}");
    assert_eq!(r.errors.get("not_started_after_failures"), Some(&4), "{r}");
    assert!(t0.elapsed() < Duration::from_secs(10));
}

#[tokio::test]
async fn bad_settings_fail_before_starting() {
    for url in ["http://127.0.0.1:1/", "not a url"] {
        assert!(idle::run(&cfg(url.into(), 1)).await.is_err(), "{url}");
    }
    let zero = idle::Config {
        concurrency: 0,
        ..cfg("ws://127.0.0.1:1/".into(), 1)
    };
    assert!(idle::run(&zero).await.is_err());
}

/// A `--pid` whose memory cannot be read fails the run before any session opens, rather
/// than reporting a figure it never measured.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_unreadable_pid_is_refused_before_the_ramp() {
    let b = bridge(BridgeMode::Relay(vm())).await;
    let e = idle::run(&idle::Config {
        pid: Some(u32::MAX),
        ..cfg(b.url(), 5)
    })
    .await
    .unwrap_err();
    assert!(
        e.to_string().contains(&format!("--pid {}", u32::MAX)),
        "{e}"
    );
    assert!(b.peers.lock().unwrap().is_empty(), "sessions opened anyway");
}
