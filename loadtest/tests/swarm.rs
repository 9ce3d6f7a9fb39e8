//! The swarm against the fake VM through a test-only WebSocket-to-TCP bridge.

mod common;

use std::time::Duration;

use common::{BridgeMode, bridge, dead_addr, self_signed, tls_bridge};
use vncgate_loadtest::dial::Tls;
use vncgate_loadtest::fakevm;
use vncgate_loadtest::swarm::{self, Report};

fn vm(password: Option<&str>) -> std::net::SocketAddr {
    fakevm::spawn_background(fakevm::Config {
        width: 160,
        height: 120,
        fps: 30,
        password: password.map(Into::into),
        ..Default::default()
    })
    .unwrap()
}

fn cfg(url: String, sessions: usize, secs: f64) -> swarm::Config {
    swarm::Config {
        url,
        sessions,
        duration: Duration::from_secs_f64(secs),
        input_rate: 20.0,
        ..Default::default()
    }
}

async fn run(cfg: swarm::Config) -> Report {
    swarm::run(cfg).await.unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn all_sessions_ok_through_a_bridge() {
    let b = bridge(BridgeMode::Relay(vm(None))).await;
    let r = run(swarm::Config {
        ramp_up: Duration::from_millis(300),
        idle_fraction: 0.34,
        ..cfg(b.url(), 6, 2.5)
    })
    .await;
    assert!(r.errors.is_empty(), "{r}");
    assert_eq!(r.sessions, 6);
    assert_eq!(r.sessions_ok, 6, "{r}");
    assert_eq!(r.sessions_idle, 2);
    assert_eq!(r.connect_ms.unwrap().n, 6);
    assert_eq!(r.handshake_ms.unwrap().n, 6);
    assert!(
        r.rtt_ms.is_some(),
        "busy sessions time their cut-text probes: {r}"
    );
    assert!(r.updates > 6, "busy sessions keep receiving updates: {r}");
    assert!(r.bytes > 0);
    // Like current noVNC: no subprotocol offered unless asked.
    assert!(b.offered.lock().unwrap().iter().all(Option::is_none));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn vnc_auth_and_binary_subprotocol() {
    let b = bridge(BridgeMode::Relay(vm(Some("pw")))).await;
    let r = run(swarm::Config {
        password: Some("pw".into()),
        subprotocol: Some("binary".into()),
        ..cfg(b.url(), 2, 1.5)
    })
    .await;
    assert!(r.errors.is_empty(), "{r}");
    assert_eq!(r.sessions_ok, 2);
    let offered = b.offered.lock().unwrap().clone();
    assert_eq!(offered, vec![Some("binary".to_owned()); 2]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn wrong_password_is_named() {
    let b = bridge(BridgeMode::Relay(vm(Some("pw")))).await;
    let r = run(swarm::Config {
        password: Some("nope".into()),
        ..cfg(b.url(), 2, 5.0)
    })
    .await;
    assert_eq!(r.sessions_ok, 0);
    assert_eq!(r.errors.get("rfb_auth_failed"), Some(&2), "{r}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn close_codes_are_grouped() {
    let b = bridge(BridgeMode::Close(4001, "vm vnc port refused")).await;
    let r = run(cfg(b.url(), 3, 5.0)).await;
    assert_eq!(r.sessions_ok, 0);
    assert_eq!(r.errors.get("4001"), Some(&3), "{r}");
    assert!(r.error_examples["4001"].contains("vm vnc port refused"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connect_errors_are_grouped() {
    let r = run(cfg(format!("ws://{}/vnc/x", dead_addr()), 2, 5.0)).await;
    assert_eq!(r.sessions_ok, 0);
    assert_eq!(r.errors.get("connect_refused"), Some(&2), "{r}");
    assert!(r.connect_ms.is_none());
}

#[tokio::test]
async fn bad_settings_fail_before_starting() {
    for url in ["http://127.0.0.1:1/", "ftp://127.0.0.1:1/", "not a url"] {
        assert!(swarm::run(cfg(url.into(), 1, 1.0)).await.is_err(), "{url}");
    }
    // A CA file that cannot be read is a bad setting, named, before anything starts.
    let missing_ca = swarm::Config {
        tls: Tls::CaFile("/nonexistent/vncgate-ca.pem".into()),
        ..cfg("wss://127.0.0.1:1/".into(), 1, 1.0)
    };
    let e = swarm::run(missing_ca).await.unwrap_err().to_string();
    assert!(e.contains("/nonexistent/vncgate-ca.pem"), "{e}");
    let ramp_past_the_end = swarm::Config {
        ramp_up: Duration::from_secs(2),
        ..cfg("ws://127.0.0.1:1/".into(), 1, 1.0)
    };
    assert!(swarm::run(ramp_past_the_end).await.is_err());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn wss_with_a_private_ca() {
    let cert = self_signed();
    let ca = cert.write_pem("swarm-ca");
    let b = tls_bridge(BridgeMode::Relay(vm(None)), &cert).await;
    assert!(b.url().starts_with("wss://127.0.0.1:"));
    let r = run(swarm::Config {
        tls: Tls::CaFile(ca.clone()),
        ..cfg(b.url(), 3, 1.5)
    })
    .await;
    let _ = std::fs::remove_file(&ca);
    assert!(r.errors.is_empty(), "{r}");
    assert_eq!(r.sessions_ok, 3, "{r}");
    assert!(r.updates > 0, "{r}");
    assert!(r.rtt_ms.is_some(), "input round trips through TLS: {r}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn wss_insecure_skips_verification() {
    let cert = self_signed();
    let b = tls_bridge(BridgeMode::Relay(vm(None)), &cert).await;
    let r = run(swarm::Config {
        tls: Tls::Insecure,
        ..cfg(b.url(), 2, 1.5)
    })
    .await;
    assert!(r.errors.is_empty(), "{r}");
    assert_eq!(r.sessions_ok, 2, "{r}");
    assert!(r.updates > 0, "{r}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn wss_untrusted_certificate_is_a_named_tls_error() {
    let cert = self_signed();
    let b = tls_bridge(BridgeMode::Relay(vm(None)), &cert).await;
    // The bundled webpki roots do not know a fresh self-signed certificate...
    let r = run(cfg(b.url(), 2, 3.0)).await;
    assert_eq!(r.sessions_ok, 0, "{r}");
    assert_eq!(r.errors.get("tls_unknown_issuer"), Some(&2), "{r}");
    let example = &r.error_examples["tls_unknown_issuer"];
    assert!(
        example.contains("TLS handshake failed") && example.contains("certificate"),
        "{example}"
    );
    assert!(r.connect_ms.is_none());
    // ...nor does a CA file holding another certificate.
    let other = self_signed().write_pem("swarm-other-ca");
    let r = run(swarm::Config {
        tls: Tls::CaFile(other.clone()),
        ..cfg(b.url(), 1, 3.0)
    })
    .await;
    let _ = std::fs::remove_file(&other);
    assert_eq!(r.sessions_ok, 0, "{r}");
    // (rcgen gives both the same subject name, so webpki finds the other certificate and
    // reports a bad signature rather than an unknown issuer.)
    assert!(
        r.errors.len() == 1 && r.errors.keys().all(|k| k.starts_with("tls_")),
        "{r}"
    );
    // A plain ws:// server behind a wss:// URL: a TLS error too, not a hang.
    let plain = bridge(BridgeMode::Relay(vm(None))).await;
    let url = plain.url().replacen("ws://", "wss://", 1);
    let r = run(swarm::Config {
        tls: Tls::Insecure,
        ..cfg(url, 1, 3.0)
    })
    .await;
    assert_eq!(r.sessions_ok, 0, "{r}");
    assert!(
        r.errors.keys().all(|k| k.starts_with("tls_")),
        "plain server behind wss: {r}"
    );
}
