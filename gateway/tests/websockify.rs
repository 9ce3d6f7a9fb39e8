//! `vncgate websockify`: websockify's command line on the real binary. `TARGET_ADDR` on any
//! path, token files (a file, a directory, `--target-config`) with their rereads, a token
//! the file lacks, every websockify option vncgate refuses (by name, with its equivalent),
//! the hints for websockify's positional arguments given to `vncgate` and `vncgate serve`,
//! `--cert` with key and certificate in one PEM, and plain and TLS on one port unless
//! `--ssl-only`.

mod common;

use std::net::{SocketAddr, TcpStream};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::Arc;
use std::time::Duration;

use common::{
    BIN, Gw, RawWs, echo_server, eventually, frame, http_exchange, say_and_close, silent_server,
    status_of, upgrade_request,
};
use rcgen::{BasicConstraints, CertificateParams, IsCa, Issuer, KeyPair};
use rustls::pki_types::ServerName;
use rustls::{ClientConfig, ClientConnection, RootCertStore, StreamOwned};

fn tempdir(tag: &str) -> PathBuf {
    let d = std::env::temp_dir().join(format!("vncgate-wsk-{tag}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    std::fs::create_dir_all(&d).unwrap();
    d
}

/// `vncgate websockify ARGS` on one worker with an admin port, up and listening.
fn websockify(args: &[&str]) -> Gw {
    Gw::spawn(
        Command::new(BIN)
            .args(["websockify", "--workers", "1", "--admin", "127.0.0.1:0"])
            .args(args),
    )
    .expect("vncgate websockify starts")
}

/// Runs `vncgate ARGS` to its exit: (status, stderr).
fn run(args: &[&str]) -> (i32, String) {
    let out = Command::new(BIN).args(args).output().unwrap();
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

/// An echo round trip through a raw WebSocket.
fn echoes(ws: &mut RawWs, payload: &[u8]) {
    ws.send(&frame(0x82, payload));
    assert_eq!(ws.read_data(payload.len()), payload);
}

/// What an upstream that says its name and closes delivers: (data, close code).
fn greeting(addr: SocketAddr, path: &str) -> (Vec<u8>, Option<u16>) {
    let mut ws = RawWs::connect(addr, path, "");
    let (data, close) = ws.until_close();
    (data, close.and_then(|c| c.close_code()))
}

#[test]
fn target_addr_takes_every_path() {
    let echo = echo_server();
    let target = echo.addr.to_string();
    let gw = websockify(&["127.0.0.1:0", &target]);
    // noVNC's default path, the root, anything.
    for path in [
        "/websockify",
        "/",
        "/a/b/c?x=1",
        "/vnc/whatever",
        "/websockify?token=x",
    ] {
        let mut ws = RawWs::connect(gw.addr, path, "");
        echoes(&mut ws, path.as_bytes());
    }
    assert!(gw.log().contains("session=websockify"), "{}", gw.log());
}

#[test]
fn a_bare_port_binds_every_interface_as_websockify_does() {
    // Bound on 0.0.0.0, reached here on loopback (the only address tests use).
    let port = common::closed_port().port().to_string();
    let echo = echo_server();
    let gw = websockify(&[&port, &echo.addr.to_string()]);
    assert_eq!(gw.addr.ip().to_string(), "0.0.0.0");
    let lo: SocketAddr = format!("127.0.0.1:{port}").parse().unwrap();
    let mut ws = RawWs::connect(lo, "/websockify", "");
    echoes(&mut ws, b"any interface");
}

const T1: &str = "first-token-4f9c2a";
const T2: &str = "second-token-b81e07";
const T3: &str = "third-token-0c55d3";

/// Three VMs that say their names (`one`, `two`, `three`) and close.
fn three_vms() -> (SocketAddr, SocketAddr, SocketAddr) {
    (
        say_and_close(b"one".to_vec()),
        say_and_close(b"two".to_vec()),
        say_and_close(b"three".to_vec()),
    )
}

#[test]
fn a_token_file_routes_by_token_and_is_reread_when_it_changes() {
    let d = tempdir("file");
    let (one, two, three) = three_vms();
    let (quiet, _) = silent_server();
    const LIVE: &str = "live-token-93ad11";
    let file = d.join("tokens");
    std::fs::write(
        &file,
        format!("# websockify's TokenFile\n{T1}: {one}\n\n{T2}: {two}\n{LIVE}: {quiet}\n"),
    )
    .unwrap();
    let gw = websockify(&[
        "--token-plugin",
        "TokenFile",
        "--token-source",
        file.to_str().unwrap(),
        "127.0.0.1:0",
    ]);
    let a = gw.addr;
    assert_eq!(
        greeting(a, &format!("/websockify?token={T1}")),
        (b"one".to_vec(), Some(4003))
    );
    assert_eq!(
        greeting(a, &format!("/any?token={T2}")),
        (b"two".to_vec(), Some(4003))
    );
    // A token the file lacks: refused by name, the token never echoed.
    let r = http_exchange(
        a,
        upgrade_request(&format!("/websockify?token={T3}"), "").as_bytes(),
    );
    assert_eq!(status_of(&r), 404, "{r}");
    assert!(
        r.ends_with("token not found in the token file\n") && !r.contains(T3),
        "{r}"
    );
    let r = http_exchange(a, upgrade_request("/websockify", "").as_bytes());
    assert_eq!(status_of(&r), 401, "{r}");
    // A live session of a token about to be removed.
    let mut live = RawWs::connect(a, &format!("/websockify?token={LIVE}"), "");
    // Rewritten: T1 gone, T3 added, LIVE gone.
    std::fs::write(&file, format!("{T2}: {two}\n{T3}: {three}\n")).unwrap();
    assert!(
        eventually(Duration::from_secs(10), || {
            status_of(&http_exchange(
                a,
                upgrade_request(&format!("/?token={T3}"), "").as_bytes(),
            )) == 101
        }),
        "the new token never worked: {}",
        gw.log()
    );
    assert_eq!(
        greeting(a, &format!("/?token={T3}")),
        (b"three".to_vec(), Some(4003))
    );
    let r = http_exchange(a, upgrade_request(&format!("/?token={T1}"), "").as_bytes());
    assert_eq!(status_of(&r), 404, "{r}");
    let (_, close) = live.until_close();
    assert_eq!(close.and_then(|c| c.close_code()), Some(4006));
    // A file that does not parse keeps the tokens in force.
    std::fs::write(&file, "this is not a token line\n").unwrap();
    assert!(
        gw.wait_log("reload failed", Duration::from_secs(10)),
        "{}",
        gw.log()
    );
    assert_eq!(
        greeting(a, &format!("/?token={T2}")),
        (b"two".to_vec(), Some(4003))
    );
    // Tokens are secrets: the log names sessions by digest only.
    let log = gw.log();
    for t in [T1, T2, T3, LIVE] {
        assert!(!log.contains(t), "token {t} in the log:\n{log}");
    }
    assert!(log.contains("session=tok-"), "{log}");
}

#[test]
fn a_token_directory_is_read_whole_and_files_added_later_count() {
    let d = tempdir("dir");
    let (one, two, three) = three_vms();
    std::fs::write(d.join("vm1"), format!("{T1}: {one}\n")).unwrap();
    std::fs::write(d.join("vm2.conf"), format!("{T2}: {two}\n")).unwrap();
    let gw = websockify(&[
        "--token-plugin",
        "TokenFile",
        "--token-source",
        d.to_str().unwrap(),
        "127.0.0.1:0",
    ]);
    assert_eq!(
        greeting(gw.addr, &format!("/websockify?token={T1}")).0,
        b"one"
    );
    assert_eq!(
        greeting(gw.addr, &format!("/websockify?token={T2}")).0,
        b"two"
    );
    std::fs::write(d.join("vm3"), format!("{T3}: {three}\n")).unwrap();
    let path = format!("/websockify?token={T3}");
    assert!(
        eventually(Duration::from_secs(10), || {
            status_of(&http_exchange(
                gw.addr,
                upgrade_request(&path, "").as_bytes(),
            )) == 101
        }),
        "{}",
        gw.log()
    );
    assert_eq!(greeting(gw.addr, &path).0, b"three");
    std::fs::remove_file(d.join("vm1")).unwrap();
    let path = format!("/websockify?token={T1}");
    assert!(eventually(Duration::from_secs(10), || {
        status_of(&http_exchange(
            gw.addr,
            upgrade_request(&path, "").as_bytes(),
        )) == 404
    }));
}

#[test]
fn target_config_is_the_old_name_of_a_token_file() {
    let d = tempdir("alias");
    let one = say_and_close(b"one".to_vec());
    let file = d.join("targets");
    std::fs::write(&file, format!("{T1}: {one}\n")).unwrap();
    let gw = websockify(&["--target-config", file.to_str().unwrap(), "127.0.0.1:0"]);
    assert_eq!(
        greeting(gw.addr, &format!("/websockify?token={T1}")).0,
        b"one"
    );
    let (code, err) = run(&[
        "websockify",
        "--target-config",
        file.to_str().unwrap(),
        "--token-plugin",
        "TokenFile",
        "--token-source",
        file.to_str().unwrap(),
        "127.0.0.1:0",
    ]);
    assert_eq!(code, 2);
    assert!(
        err.contains("--target-config FILE is the old spelling"),
        "{err}"
    );
}

#[test]
fn websockify_options_vncgate_lacks_are_refused_by_name_with_the_equivalent() {
    for (flag, takes_value, instead) in vncgate::websockify::REFUSED {
        let mut args = vec!["websockify", *flag];
        if *takes_value {
            args.push("VALUE");
        }
        args.extend(["127.0.0.1:0", "127.0.0.1:5900"]);
        let (code, err) = run(&args);
        assert_eq!(code, 2, "{flag}: {err}");
        assert!(
            err.contains(&format!("does not support websockify's {flag}: {instead}")),
            "{flag}: {err}"
        );
    }
    // The same as --flag=VALUE.
    let (code, err) = run(&[
        "websockify",
        "--log-file=/tmp/wsk.log",
        "6080",
        "127.0.0.1:5900",
    ]);
    assert_eq!(code, 2);
    assert!(
        err.contains("does not support websockify's --log-file"),
        "{err}"
    );
    // Token plugins other than the token file.
    for plugin in [
        "TokenRedis",
        "JWTTokenApi",
        "websockify.token_plugins.JSONTokenApi",
    ] {
        let (code, err) = run(&[
            "websockify",
            "--token-plugin",
            plugin,
            "--token-source",
            "x",
            "127.0.0.1:0",
        ]);
        assert_eq!(code, 2);
        assert!(
            err.contains(&format!(
                "--token-plugin {plugin}: vncgate reads websockify's TokenFile only"
            )),
            "{err}"
        );
    }
    let (code, err) = run(&["websockify", "--ssl-only", "127.0.0.1:0", "127.0.0.1:1"]);
    assert_eq!(code, 2);
    assert!(err.contains("--ssl-only"), "{err}");
}

/// The line after the hint's line break that starts with `vncgate`, as words.
fn hinted(err: &str, starts: &str) -> Vec<String> {
    let line = err
        .lines()
        .map(str::trim)
        .find(|l| l.starts_with(starts))
        .unwrap_or_else(|| panic!("no '{starts}' line in: {err}"));
    line.split_whitespace().skip(1).map(String::from).collect()
}

#[test]
fn websockify_positional_arguments_get_the_line_that_runs_them() {
    let echo = echo_server();
    let listen = common::closed_port().to_string();
    let target = echo.addr.to_string();
    // `vncgate SOURCE TARGET`: the websockify line, which then works as meant.
    let (code, err) = run(&[&listen, &target]);
    assert_eq!(code, 2);
    let words = hinted(&err, "vncgate websockify");
    assert_eq!(words, ["websockify", listen.as_str(), target.as_str()]);
    let gw = Gw::spawn(Command::new(BIN).args(&words).args([
        "--workers",
        "1",
        "--admin",
        "127.0.0.1:0",
    ]))
    .unwrap();
    echoes(&mut RawWs::connect(gw.addr, "/websockify", ""), b"as meant");
    drop(gw);
    // With websockify's flags before them, the same.
    let (code, err) = run(&["--heartbeat", "5", &listen, &target]);
    assert_eq!(code, 2);
    assert_eq!(
        hinted(&err, "vncgate websockify"),
        [
            "websockify",
            "--heartbeat",
            "5",
            listen.as_str(),
            target.as_str()
        ]
    );
    // `vncgate serve SOURCE TARGET`: the serve flags, and the websockify line.
    let (code, err) = run(&["serve", &listen, &target]);
    assert_eq!(code, 2);
    let words = hinted(&err, "vncgate serve");
    assert_eq!(
        words,
        [
            "serve",
            "--listen",
            listen.as_str(),
            "--route",
            &format!("vnc={target}"),
            "--allow-upstream",
            "127.0.0.1/32"
        ]
    );
    let gw = Gw::spawn(Command::new(BIN).args(&words).args([
        "--workers",
        "1",
        "--admin",
        "127.0.0.1:0",
    ]))
    .unwrap();
    echoes(&mut RawWs::connect(gw.addr, "/vnc/vnc", ""), b"as meant");
    assert_eq!(
        hinted(&err, "vncgate websockify"),
        ["websockify", listen.as_str(), target.as_str()]
    );
    // A mistyped command is not websockify's: clap's own error stays.
    let (code, err) = run(&["srve", "--listen", "127.0.0.1:1"]);
    assert_eq!(code, 2);
    assert!(err.contains("unrecognized subcommand 'srve'"), "{err}");
    // websockify's words with an option vncgate lacks: that option is named.
    let (code, err) = run(&["--daemon", &listen, &target]);
    assert_eq!(code, 2);
    assert!(
        err.contains("does not support websockify's --daemon"),
        "{err}"
    );
    // `serve --listen PORT`: refused with both addresses it could mean.
    let (code, err) = run(&["serve", "--listen", "16080"]);
    assert_eq!(code, 2);
    assert!(
        err.contains("--listen 127.0.0.1:16080 (this host only) or --listen 0.0.0.0:16080"),
        "{err}"
    );
}

/// A CA and a leaf for 127.0.0.1; writes the leaf's certificate and key into one PEM, as
/// websockify's `--cert` alone takes them.
fn combined_pem(dir: &Path) -> (PathBuf, RootCertStore) {
    let mut ca = CertificateParams::new(Vec::<String>::new()).unwrap();
    ca.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    let ca_key = KeyPair::generate().unwrap();
    let ca_cert = ca.self_signed(&ca_key).unwrap();
    let leaf_key = KeyPair::generate().unwrap();
    let leaf = CertificateParams::new(vec!["127.0.0.1".to_owned()])
        .unwrap()
        .signed_by(&leaf_key, &Issuer::from_params(&ca, &ca_key))
        .unwrap();
    let pem = dir.join("self.pem");
    std::fs::write(&pem, format!("{}{}", leaf_key.serialize_pem(), leaf.pem())).unwrap();
    let mut roots = RootCertStore::empty();
    roots.add(ca_cert.der().clone()).unwrap();
    (pem, roots)
}

fn wss_echo(addr: SocketAddr, roots: &RootCertStore, payload: &[u8]) {
    let cfg = Arc::new(
        ClientConfig::builder_with_provider(Arc::new(rustls::crypto::ring::default_provider()))
            .with_safe_default_protocol_versions()
            .unwrap()
            .with_root_certificates(roots.clone())
            .with_no_client_auth(),
    );
    let tcp = TcpStream::connect(addr).unwrap();
    tcp.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    let conn = ClientConnection::new(cfg, ServerName::try_from("127.0.0.1").unwrap()).unwrap();
    let s = StreamOwned::new(conn, tcp);
    let (mut ws, resp) = tungstenite::client("wss://127.0.0.1/websockify", s).unwrap();
    assert_eq!(resp.status(), 101);
    ws.send(tungstenite::Message::binary(payload.to_vec()))
        .unwrap();
    let mut got = Vec::new();
    while got.len() < payload.len() {
        match ws.read().unwrap() {
            tungstenite::Message::Binary(b) => got.extend_from_slice(&b),
            tungstenite::Message::Ping(_) | tungstenite::Message::Pong(_) => {}
            m => panic!("unexpected {m:?}"),
        }
    }
    assert_eq!(got, payload);
}

#[test]
fn cert_alone_holds_the_key_and_one_port_serves_plain_and_tls_unless_ssl_only() {
    let d = tempdir("cert");
    let (pem, roots) = combined_pem(&d);
    let echo = echo_server();
    let target = echo.addr.to_string();
    let gw = websockify(&["--cert", pem.to_str().unwrap(), "127.0.0.1:0", &target]);
    wss_echo(gw.addr, &roots, b"over tls");
    echoes(&mut RawWs::connect(gw.addr, "/websockify", ""), b"in plain");
    drop(gw);
    let gw = websockify(&[
        "--cert",
        pem.to_str().unwrap(),
        "--ssl-only",
        "127.0.0.1:0",
        &target,
    ]);
    wss_echo(gw.addr, &roots, b"over tls");
    let r = http_exchange(gw.addr, upgrade_request("/websockify", "").as_bytes());
    assert_eq!(status_of(&r), 400, "{r}");
    assert!(r.contains("connect with wss://"), "{r}");
}

#[test]
fn heartbeat_is_the_keepalive_ping() {
    let (quiet, _) = silent_server();
    let gw = websockify(&["--heartbeat", "0.2", "127.0.0.1:0", &quiet.to_string()]);
    let mut ws = RawWs::connect(gw.addr, "/websockify", "");
    let f = ws.next_frame().expect("a frame");
    assert_eq!(f.opcode, 9, "a ping: {f:?}");
}

#[test]
fn idle_timeout_exits_once_no_client_is_connected_and_timeout_after_the_start() {
    let (quiet, _) = silent_server();
    let target = quiet.to_string();
    let mut gw = websockify(&["--idle-timeout", "1", "127.0.0.1:0", &target]);
    // While a client is connected the server stays: the exit comes only after it left.
    let ws = RawWs::connect(gw.addr, "/websockify", "");
    assert_eq!(
        gw.wait_exit(Duration::from_millis(2500)),
        None,
        "{}",
        gw.log()
    );
    drop(ws);
    assert_eq!(
        gw.wait_exit(Duration::from_secs(20)),
        Some(0),
        "{}",
        gw.log()
    );
    assert!(
        gw.log().contains("option=\"--idle-timeout\""),
        "{}",
        gw.log()
    );
    let mut gw = websockify(&["--timeout", "0.5", "127.0.0.1:0", &target]);
    assert_eq!(
        gw.wait_exit(Duration::from_secs(20)),
        Some(0),
        "{}",
        gw.log()
    );
    assert!(gw.log().contains("option=\"--timeout\""), "{}", gw.log());
}

#[test]
fn record_dir_records_each_session() {
    let echo = echo_server();
    let target = echo.addr.to_string();
    let dir = tempdir("record");
    let rec = dir.join("rec");
    std::fs::create_dir_all(&rec).unwrap();
    let gw = websockify(&["--record", rec.to_str().unwrap(), "127.0.0.1:0", &target]);
    let mut ws = RawWs::connect(gw.addr, "/websockify", "");
    echoes(&mut ws, b"recorded through websockify");
    drop(ws);
    let files = || -> Vec<PathBuf> {
        std::fs::read_dir(&rec)
            .unwrap()
            .map(|e| e.unwrap().path())
            .filter(|p| p.extension().is_some_and(|x| x == "vncrec"))
            .collect()
    };
    assert!(
        eventually(Duration::from_secs(10), || files().len() == 1),
        "one recording per session: {:?}\n{}",
        files(),
        gw.log()
    );
    // The file exists from the session's start; its bytes are whole once the
    // writer says the recording ended (after the browser's close).
    assert!(
        eventually(Duration::from_secs(10), || gw
            .log()
            .contains("recording ended")),
        "the recording ends with the session\n{}",
        gw.log()
    );
    let bytes = std::fs::read(&files()[0]).unwrap();
    let found = bytes
        .windows(b"recorded through websockify".len())
        .any(|w| w == b"recorded through websockify");
    assert!(found, "the echoed bytes are in the recording");
    let _ = std::fs::remove_dir_all(&dir);
}
