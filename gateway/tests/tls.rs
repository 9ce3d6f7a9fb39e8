//! `wss://` on the public listener (`--tls-cert`, `--tls-key`), against the real binary with
//! a test CA: key types, chains, protocol versions and ALPN, plain HTTP on the TLS port,
//! certificate reload (file change and SIGHUP) seen by a new connection while an old session
//! keeps streaming, and bad certificate files refused at startup by name.

mod common;

use std::net::{SocketAddr, TcpStream};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use common::{Gw, echo_server, eventually, http_exchange, status_of, upgrade_request};
use rcgen::{BasicConstraints, CertificateParams, IsCa, Issuer, KeyPair, SignatureAlgorithm};
use rustls::pki_types::{CertificateDer, ServerName};
use rustls::{ClientConfig, ClientConnection, RootCertStore, StreamOwned};
use tungstenite::Message;

type Tls = StreamOwned<ClientConnection, TcpStream>;

/// A root CA, and leaves it signs (directly or through an intermediate).
struct Pki {
    dir: PathBuf,
    root_params: CertificateParams,
    root_key: KeyPair,
    root_der: CertificateDer<'static>,
    root_pem: String,
}

impl Pki {
    fn new(tag: &str) -> Pki {
        let dir = std::env::temp_dir().join(format!("vncgate-tls-it-{tag}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        let mut root_params = CertificateParams::new(Vec::<String>::new()).unwrap();
        root_params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        root_params.distinguished_name.push(
            rcgen::DnType::CommonName,
            format!("vncgate test root {tag}"),
        );
        let root_key = KeyPair::generate().unwrap();
        let root = root_params.self_signed(&root_key).unwrap();
        Pki {
            dir,
            root_params,
            root_key,
            root_der: root.der().clone(),
            root_pem: root.pem(),
        }
    }

    /// The root certificate as a PEM file, for clients that read one (`--ca FILE`).
    fn root_pem(&self) -> PathBuf {
        let p = self.dir.join("root.pem");
        std::fs::write(&p, &self.root_pem).unwrap();
        p
    }

    fn roots(&self) -> RootCertStore {
        let mut r = RootCertStore::empty();
        r.add(self.root_der.clone()).unwrap();
        r
    }

    /// A leaf for 127.0.0.1 with a key of `alg`, written as `name.crt` (the leaf, then
    /// the intermediate when `via_intermediate`) and `name.key`. Returns the paths and the
    /// leaf's DER.
    fn leaf(
        &self,
        name: &str,
        alg: &'static SignatureAlgorithm,
        via_intermediate: bool,
    ) -> (PathBuf, PathBuf, CertificateDer<'static>) {
        let key = KeyPair::generate_for(alg).unwrap();
        let (cert, der) = self.leaf_with_key(name, &key, via_intermediate);
        let keyf = self.dir.join(format!("{name}.key"));
        std::fs::write(&keyf, key.serialize_pem()).unwrap();
        (cert, keyf, der)
    }

    /// [`Pki::leaf`] for a given key; writes only the certificate file.
    fn leaf_with_key(
        &self,
        name: &str,
        key: &KeyPair,
        via_intermediate: bool,
    ) -> (PathBuf, CertificateDer<'static>) {
        let params = CertificateParams::new(vec!["127.0.0.1".to_owned()]).unwrap();
        let root = Issuer::from_params(&self.root_params, &self.root_key);
        let (leaf, chain_tail) = if via_intermediate {
            let mut ip = CertificateParams::new(Vec::<String>::new()).unwrap();
            ip.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
            ip.distinguished_name
                .push(rcgen::DnType::CommonName, "vncgate test intermediate");
            let ik = KeyPair::generate().unwrap();
            let inter = ip.signed_by(&ik, &root).unwrap();
            let issuer = Issuer::from_params(&ip, &ik);
            (params.signed_by(key, &issuer).unwrap(), inter.pem())
        } else {
            (params.signed_by(key, &root).unwrap(), String::new())
        };
        let cert = self.dir.join(format!("{name}.crt"));
        std::fs::write(&cert, format!("{}{chain_tail}", leaf.pem())).unwrap();
        (cert, leaf.der().clone())
    }
}

impl Drop for Pki {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

fn client_config(
    roots: RootCertStore,
    versions: &[&'static rustls::SupportedProtocolVersion],
    alpn: &[&[u8]],
) -> Arc<ClientConfig> {
    let mut c =
        ClientConfig::builder_with_provider(Arc::new(rustls::crypto::ring::default_provider()))
            .with_protocol_versions(versions)
            .unwrap()
            .with_root_certificates(roots)
            .with_no_client_auth();
    c.alpn_protocols = alpn.iter().map(|p| p.to_vec()).collect();
    Arc::new(c)
}

fn default_client(pki: &Pki) -> Arc<ClientConfig> {
    client_config(pki.roots(), rustls::ALL_VERSIONS, &[b"http/1.1"])
}

/// A TLS connection through its handshake, or the handshake's error.
fn tls_connect(addr: SocketAddr, cfg: Arc<ClientConfig>) -> Result<Tls, std::io::Error> {
    let tcp = TcpStream::connect(addr).unwrap();
    tcp.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    let name = ServerName::try_from("127.0.0.1").unwrap();
    let conn = ClientConnection::new(cfg, name).unwrap();
    let mut s = StreamOwned::new(conn, tcp);
    while s.conn.is_handshaking() {
        s.conn.complete_io(&mut s.sock)?;
    }
    Ok(s)
}

fn leaf_of(s: &Tls) -> CertificateDer<'static> {
    s.conn.peer_certificates().unwrap()[0].clone().into_owned()
}

fn ws_over(s: Tls, session: &str) -> tungstenite::WebSocket<Tls> {
    let (ws, resp) = tungstenite::client(format!("wss://127.0.0.1/vnc/{session}"), s).unwrap();
    assert_eq!(resp.status(), 101);
    ws
}

fn echo_round(ws: &mut tungstenite::WebSocket<Tls>, payload: &[u8]) {
    ws.send(Message::binary(payload.to_vec())).unwrap();
    let mut got = Vec::new();
    while got.len() < payload.len() {
        match ws.read().unwrap() {
            Message::Binary(b) => got.extend_from_slice(&b),
            Message::Ping(_) | Message::Pong(_) => {}
            m => panic!("unexpected {m:?}"),
        }
    }
    assert_eq!(got, payload);
}

fn start_tls(upstream: SocketAddr, cert: &Path, key: &Path, extra: &[&str]) -> Gw {
    let mut args = vec![
        "--tls-cert",
        cert.to_str().unwrap(),
        "--tls-key",
        key.to_str().unwrap(),
    ];
    args.extend_from_slice(extra);
    Gw::with_route("auto", "s1", upstream, &args)
}

#[test]
fn every_key_type_and_a_chain_serve_wss_and_relay_both_ways() {
    let pki = Pki::new("keys");
    let echo = echo_server();
    for (name, alg, chain) in [
        ("ecdsa", &rcgen::PKCS_ECDSA_P256_SHA256, false),
        ("ecdsa384-chain", &rcgen::PKCS_ECDSA_P384_SHA384, true),
        ("ed25519", &rcgen::PKCS_ED25519, false),
    ] {
        let (cert, key, leaf) = pki.leaf(name, alg, chain);
        let gw = start_tls(echo.addr, &cert, &key, &[]);
        let s =
            tls_connect(gw.addr, default_client(&pki)).unwrap_or_else(|e| panic!("{name}: {e}"));
        assert_eq!(leaf_of(&s), leaf, "{name}");
        assert_eq!(s.conn.alpn_protocol(), Some(&b"http/1.1"[..]), "{name}");
        let mut ws = ws_over(s, "s1");
        // Small and large messages (the large one spans many TLS records each way).
        echo_round(&mut ws, b"hello through tls");
        let big: Vec<u8> = (0..300_000u32).map(|i| (i % 251) as u8).collect();
        echo_round(&mut ws, &big);
        ws.close(None).unwrap();
        while ws.read().is_ok() {}
    }
}

#[test]
fn an_rsa_key_in_pkcs1_from_openssl_serves_wss() {
    let pki = Pki::new("rsa");
    // ring cannot generate RSA keys: openssl makes one (PKCS#8 for rcgen to sign the leaf
    // with the test root), and the gateway reads it in PKCS#1 (`RSA PRIVATE KEY`).
    let (pk8, pk1) = (pki.dir.join("rsa.p8"), pki.dir.join("rsa.key"));
    let openssl = |args: &[&str]| {
        let out = std::process::Command::new("openssl")
            .args(args)
            .output()
            .expect("openssl runs");
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
    };
    openssl(&[
        "genpkey",
        "-algorithm",
        "RSA",
        "-pkeyopt",
        "rsa_keygen_bits:2048",
        "-out",
        pk8.to_str().unwrap(),
    ]);
    openssl(&[
        "rsa",
        "-in",
        pk8.to_str().unwrap(),
        "-traditional",
        "-out",
        pk1.to_str().unwrap(),
    ]);
    assert!(
        std::fs::read_to_string(&pk1)
            .unwrap()
            .starts_with("-----BEGIN RSA PRIVATE KEY-----")
    );
    let key = KeyPair::from_pem_and_sign_algo(
        &std::fs::read_to_string(&pk8).unwrap(),
        &rcgen::PKCS_RSA_SHA256,
    )
    .unwrap();
    let (cert, der) = pki.leaf_with_key("rsa", &key, false);
    let echo = echo_server();
    let gw = start_tls(echo.addr, &cert, &pk1, &[]);
    let s = tls_connect(gw.addr, default_client(&pki)).unwrap();
    assert_eq!(leaf_of(&s), der);
    let mut ws = ws_over(s, "s1");
    echo_round(&mut ws, b"rsa");
}

#[test]
fn tls12_and_tls13_are_served_and_alpn_without_http11_is_refused() {
    let pki = Pki::new("versions");
    let (cert, key, _) = pki.leaf("leaf", &rcgen::PKCS_ECDSA_P256_SHA256, false);
    let echo = echo_server();
    let gw = start_tls(echo.addr, &cert, &key, &[]);
    for v in [&rustls::version::TLS12, &rustls::version::TLS13] {
        let s = tls_connect(gw.addr, client_config(pki.roots(), &[v], &[b"http/1.1"])).unwrap();
        assert_eq!(s.conn.protocol_version(), Some(v.version));
        let mut ws = ws_over(s, "s1");
        echo_round(&mut ws, b"v");
    }
    // No ALPN offered at all is fine (many WebSocket clients offer none).
    let s = tls_connect(
        gw.addr,
        client_config(pki.roots(), rustls::ALL_VERSIONS, &[]),
    )
    .unwrap();
    assert_eq!(s.conn.alpn_protocol(), None);
    // A client that only speaks h2 is refused during the handshake (RFC 7301 §3.2).
    let e = tls_connect(
        gw.addr,
        client_config(pki.roots(), rustls::ALL_VERSIONS, &[b"h2"]),
    )
    .map(drop)
    .expect_err("h2-only is refused");
    assert!(
        e.to_string().contains("NoApplicationProtocol")
            || e.to_string().to_lowercase().contains("application"),
        "{e}"
    );
    // TLS 1.1 and older are refused: openssl's client, asking for TLS 1.1 only, fails.
    let out = std::process::Command::new("openssl")
        .args(["s_client", "-tls1_1", "-connect", &gw.addr.to_string()])
        .stdin(std::process::Stdio::null())
        .output()
        .unwrap();
    assert!(
        !out.status.success(),
        "TLS 1.1 was accepted: {}",
        String::from_utf8_lossy(&out.stdout)
    );
    let m = metrics(&gw);
    assert!(
        counter(&m, "vncgate_tls_handshakes_total{result=\"ok\"}") >= 3.0,
        "{m}"
    );
    assert!(
        counter(&m, "vncgate_tls_handshakes_total{result=\"incompatible\"}") >= 1.0,
        "{m}"
    );
}

#[test]
fn plain_http_on_the_tls_port_gets_a_plain_400_naming_wss() {
    let pki = Pki::new("plain");
    let (cert, key, _) = pki.leaf("leaf", &rcgen::PKCS_ECDSA_P256_SHA256, false);
    let echo = echo_server();
    let gw = start_tls(echo.addr, &cert, &key, &[]);
    let resp = http_exchange(gw.addr, upgrade_request("/vnc/s1", "").as_bytes());
    assert_eq!(status_of(&resp), 400, "{resp}");
    assert!(resp.contains("wss://"), "{resp}");
    assert_eq!(
        echo.open.load(std::sync::atomic::Ordering::SeqCst),
        0,
        "nothing dialed"
    );
    // The gateway keeps serving TLS clients.
    let mut ws = ws_over(tls_connect(gw.addr, default_client(&pki)).unwrap(), "s1");
    echo_round(&mut ws, b"still serving");
    let m = metrics(&gw);
    assert_eq!(
        counter(&m, "vncgate_tls_handshakes_total{result=\"not_tls\"}"),
        1.0,
        "{m}"
    );
}

#[test]
fn a_client_that_does_not_trust_the_certificate_is_counted() {
    let pki = Pki::new("untrusted");
    let other = Pki::new("untrusted-other");
    let (cert, key, _) = pki.leaf("leaf", &rcgen::PKCS_ECDSA_P256_SHA256, false);
    let echo = echo_server();
    let gw = start_tls(echo.addr, &cert, &key, &[]);
    let e = tls_connect(gw.addr, default_client(&other))
        .map(drop)
        .expect_err("untrusted");
    assert!(e.to_string().contains("UnknownIssuer"), "{e}");
    assert!(
        eventually(Duration::from_secs(5), || {
            counter(
                &metrics(&gw),
                "vncgate_tls_handshakes_total{result=\"client_rejected_certificate\"}",
            ) == 1.0
        }),
        "{}",
        metrics(&gw)
    );
    assert!(
        gw.wait_log("TLS handshake failed", Duration::from_secs(2)),
        "{}",
        gw.log()
    );
}

/// Replaces `dst` with `src` in one rename, as deployment tools do.
fn replace(src: &Path, dst: &Path) {
    let tmp = dst.with_extension("tmp");
    std::fs::copy(src, &tmp).unwrap();
    std::fs::rename(&tmp, dst).unwrap();
}

fn reload_while_streaming(trigger: &str) {
    let pki = Pki::new(&format!("reload-{trigger}"));
    let (a_cert, a_key, a_der) = pki.leaf("a", &rcgen::PKCS_ECDSA_P256_SHA256, false);
    let (b_cert, b_key, b_der) = pki.leaf("b", &rcgen::PKCS_ED25519, false);
    let (cert, key) = (pki.dir.join("live.crt"), pki.dir.join("live.key"));
    replace(&a_cert, &cert);
    replace(&a_key, &key);
    let echo = echo_server();
    let gw = start_tls(echo.addr, &cert, &key, &[]);
    let first = tls_connect(gw.addr, default_client(&pki)).unwrap();
    assert_eq!(leaf_of(&first), a_der);
    let mut old = ws_over(first, "s1");
    echo_round(&mut old, b"before");

    // A half-written pair (the new key, the old certificate) fails and keeps serving A.
    replace(&b_key, &key);
    if trigger == "sighup" {
        gw.signal(libc::SIGHUP);
    }
    assert!(
        gw.wait_log("TLS certificate reload failed", Duration::from_secs(10)),
        "{}",
        gw.log()
    );
    let s = tls_connect(gw.addr, default_client(&pki)).unwrap();
    assert_eq!(
        leaf_of(&s),
        a_der,
        "a failed reload keeps the old certificate"
    );
    drop(s);
    // Then the certificate: B from the next connection on.
    replace(&b_cert, &cert);
    if trigger == "sighup" {
        gw.signal(libc::SIGHUP);
    }
    assert!(
        gw.wait_log("TLS certificate reloaded", Duration::from_secs(10)),
        "{}",
        gw.log()
    );
    let s = tls_connect(gw.addr, default_client(&pki)).unwrap();
    assert_eq!(
        leaf_of(&s),
        b_der,
        "a new connection sees the new certificate"
    );
    let mut new = ws_over(s, "s1");
    echo_round(&mut new, b"new session");
    // The session opened before the reload still relays, both ways, on its own keys.
    let big: Vec<u8> = (0..200_000u32).map(|i| (i % 253) as u8).collect();
    echo_round(&mut old, &big);
    let m = metrics(&gw);
    assert_eq!(
        counter(&m, "vncgate_config_reload_total{result=\"failed\"}"),
        1.0,
        "{m}"
    );
    assert!(
        counter(&m, "vncgate_config_reload_total{result=\"ok\"}") >= 1.0,
        "{m}"
    );
}

#[test]
fn certificate_files_changing_reach_new_connections_and_spare_live_sessions() {
    reload_while_streaming("file");
}

#[test]
fn sighup_reloads_the_certificate_and_spares_live_sessions() {
    reload_while_streaming("sighup");
}

#[test]
fn bad_certificate_files_stop_startup_by_name() {
    let pki = Pki::new("bad");
    let (cert, key, _) = pki.leaf("a", &rcgen::PKCS_ECDSA_P256_SHA256, false);
    let (_, other_key, _) = pki.leaf("b", &rcgen::PKCS_ECDSA_P256_SHA256, false);
    let run = |args: &[&str]| {
        let out = std::process::Command::new(common::BIN)
            .args([
                "serve",
                "--listen",
                "127.0.0.1:0",
                "--route",
                "s1=127.0.0.1:1",
                "--allow-upstream",
                "127.0.0.1",
            ])
            .args(args)
            .output()
            .unwrap();
        assert_eq!(out.status.code(), Some(2), "{args:?}");
        String::from_utf8_lossy(&out.stderr).into_owned()
    };
    let c = cert.to_str().unwrap();
    let e = run(&["--tls-cert", c, "--tls-key", other_key.to_str().unwrap()]);
    assert!(e.contains("is not the key of the certificate"), "{e}");
    let e = run(&[
        "--tls-cert",
        key.to_str().unwrap(),
        "--tls-key",
        key.to_str().unwrap(),
    ]);
    assert!(e.contains("no CERTIFICATE block"), "{e}");
    let e = run(&["--tls-cert", c, "--tls-key", "/nonexistent/k.pem"]);
    assert!(e.contains("/nonexistent/k.pem"), "{e}");
    // clap refuses one without the other.
    let out = std::process::Command::new(common::BIN)
        .args(["serve", "--tls-cert", c])
        .output()
        .unwrap();
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("--tls-key"));
}

fn metrics(gw: &Gw) -> String {
    gw.admin_get("/metrics").1
}

/// The value of one exact series line, 0 when absent.
fn counter(text: &str, series: &str) -> f64 {
    text.lines()
        .find_map(|l| l.strip_prefix(series).and_then(|v| v.trim().parse().ok()))
        .unwrap_or(0.0)
}

/// noVNC-shaped clients (the load generator's swarm: RFB handshake, update requests, input,
/// cut-text round trips) through `wss://` to a synthetic desktop, trusting the test root.
#[test]
fn the_swarm_runs_rfb_sessions_through_wss() {
    let pki = Pki::new("swarm");
    let (cert, key, _) = pki.leaf("leaf", &rcgen::PKCS_ECDSA_P256_SHA256, true);
    let vm = vncgate_loadtest::fakevm::spawn_background(vncgate_loadtest::fakevm::Config {
        width: 320,
        height: 240,
        ..Default::default()
    })
    .unwrap();
    let gw = start_tls(vm, &cert, &key, &[]);
    let cfg = vncgate_loadtest::swarm::Config {
        url: format!("wss://{}/vnc/s1", gw.addr),
        sessions: 20,
        duration: Duration::from_secs(3),
        idle_fraction: 0.25,
        input_rate: 20.0,
        tls: vncgate_loadtest::dial::Tls::CaFile(pki.root_pem()),
        ..Default::default()
    };
    let rt = tokio::runtime::Runtime::new().unwrap();
    let report = rt.block_on(vncgate_loadtest::swarm::run(cfg)).unwrap();
    assert!(report.errors.is_empty(), "{:?}", report.errors);
    assert_eq!(report.sessions_ok, 20, "{report:?}");
    assert!(report.rtt_ms.is_some(), "cut-text round trips through TLS");
    assert!(report.updates > 20, "{report:?}");
    let m = metrics(&gw);
    assert!(
        counter(&m, "vncgate_tls_handshakes_total{result=\"ok\"}") >= 20.0,
        "{m}"
    );
}
