//! Session recording (`--record DIR`) against the real binary: the file holds exactly the
//! bytes the browser received, on the splice path (tee) and on the copy path (TLS), and the
//! browser's input with `--record-input`; the per-session and per-directory caps and a full
//! disk (a real tmpfs, in a private mount namespace) end the recording, counted and logged,
//! never the session.

mod common;

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::thread;
use std::time::Duration;

use common::{Gw, RawWs, frame};
use vncgate::recording::{self, EndReason, Kind};

/// A VM that, per connection, writes `script` (bytes, then a pause), then reads until the
/// gateway closes, keeping what it read.
fn scripted_vm(script: Vec<(Vec<u8>, Duration)>) -> (SocketAddr, Arc<Mutex<Vec<u8>>>) {
    let l = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = l.local_addr().unwrap();
    let got = Arc::new(Mutex::new(Vec::new()));
    let got2 = got.clone();
    thread::spawn(move || {
        for s in l.incoming() {
            let Ok(mut s) = s else { continue };
            let script = script.clone();
            let got = got2.clone();
            thread::spawn(move || {
                let mut r = s.try_clone().unwrap();
                let reader = thread::spawn(move || {
                    let mut buf = [0u8; 65536];
                    while let Ok(n) = r.read(&mut buf) {
                        if n == 0 {
                            break;
                        }
                        got.lock().unwrap().extend_from_slice(&buf[..n]);
                    }
                });
                for (b, pause) in script {
                    if s.write_all(&b).is_err() {
                        return;
                    }
                    thread::sleep(pause);
                }
                let _ = reader.join();
            });
        }
    });
    (addr, got)
}

fn pattern(n: usize, seed: u8) -> Vec<u8> {
    (0..n).map(|i| ((i % 251) as u8) ^ seed).collect()
}

/// Small writes (the copy path), a burst (the splice path), small writes again.
fn mixed_script() -> (Vec<(Vec<u8>, Duration)>, Vec<u8>) {
    let mut script = Vec::new();
    for i in 0..5 {
        script.push((pattern(700 + i * 100, i as u8), Duration::from_millis(20)));
    }
    script.push((pattern(6 << 20, 7), Duration::from_millis(50)));
    for i in 0..5 {
        script.push((pattern(300, 20 + i), Duration::from_millis(20)));
    }
    let all = script.iter().flat_map(|(b, _)| b.clone()).collect();
    (script, all)
}

fn temp_dir(tag: &str) -> PathBuf {
    let d = std::env::temp_dir().join(format!("vncgate-rec-it-{tag}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    std::fs::create_dir_all(&d).unwrap();
    d
}

/// The recordings in `dir`, oldest first by name.
fn recordings(dir: &Path) -> Vec<PathBuf> {
    let mut v: Vec<PathBuf> = std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.to_string_lossy().ends_with(".vncrec"))
        .collect();
    v.sort();
    v
}

fn stream_of(p: &recording::Parsed<'_>, kind: Kind) -> Vec<u8> {
    p.records
        .iter()
        .filter(|r| r.kind == kind)
        .flat_map(|r| r.payload.to_vec())
        .collect()
}

fn metric(gw: &Gw, series: &str) -> f64 {
    let (_, body) = gw.admin_get("/metrics");
    body.lines()
        .find_map(|l| l.strip_prefix(series)?.trim().parse().ok())
        .unwrap_or_else(|| panic!("no {series} in /metrics"))
}

fn wait_recording_ended(gw: &Gw, n: usize) {
    assert!(
        common::eventually(Duration::from_secs(10), || {
            gw.log().matches("recording ended").count() >= n
        }),
        "no 'recording ended' in the log:\n{}",
        gw.log()
    );
}

#[test]
fn splice_path_recording_holds_what_the_browser_got_and_its_input() {
    let (script, sent) = mixed_script();
    let (vm, vm_got) = scripted_vm(script);
    let dir = temp_dir("splice");
    let d = dir.to_str().unwrap();
    for driver in ["uring", "epoll"] {
        for f in recordings(&dir) {
            std::fs::remove_file(f).unwrap();
        }
        let gw = Gw::with_route(driver, "rec1", vm, &["--record", d, "--record-input"]);
        let mut ws = RawWs::connect(gw.addr, "/vnc/rec1", "");
        let input = b"client says hello, twice over".to_vec();
        ws.send(&frame(0x82, &input[..10]));
        let got = ws.read_data(sent.len());
        ws.send(&frame(0x82, &input[10..]));
        assert!(common::eventually(Duration::from_secs(5), || vm_got
            .lock()
            .unwrap()
            .ends_with(&input[10..])));
        ws.send(&frame(0x88, &1000u16.to_be_bytes()));
        let _ = ws.until_close();
        assert_eq!(got, sent, "{driver}: the browser got the stream");
        wait_recording_ended(&gw, 1);

        let files = recordings(&dir);
        assert_eq!(files.len(), 1, "{driver}: one file per session");
        let name = files[0].file_name().unwrap().to_string_lossy().into_owned();
        assert!(name.starts_with("rec1-"), "{name}");
        let bytes = std::fs::read(&files[0]).unwrap();
        let p = recording::parse(&bytes).unwrap();
        assert_eq!(p.header.session, "rec1");
        assert!(p.header.input_included());
        assert_eq!(p.end, Some(EndReason::Complete));
        assert_eq!(
            stream_of(&p, Kind::VmToBrowser),
            got,
            "{driver}: recorded = received"
        );
        assert_eq!(
            stream_of(&p, Kind::BrowserToVm),
            input,
            "{driver}: input recorded"
        );
        // Records bigger than a copy-path read (32 KiB) were teed from a relay pipe.
        assert!(
            p.records.iter().any(|r| r.payload.len() > 32 << 10),
            "{driver}: no spliced record"
        );
        assert!(
            p.records
                .iter()
                .any(|r| r.kind == Kind::VmToBrowser && r.payload.len() < 2048),
            "{driver}: no copied record"
        );
        // The VM's last write came 230 ms after its first: the times say so.
        let last = p
            .records
            .iter()
            .rfind(|r| r.kind == Kind::VmToBrowser)
            .unwrap();
        assert!(last.micros >= 200_000, "last record at {} us", last.micros);
        assert_eq!(
            metric(&gw, "vncgate_recordings_total{result=\"complete\"}"),
            1.0
        );
        assert_eq!(
            metric(&gw, "vncgate_recorded_bytes_total"),
            bytes.len() as f64
        );
        vm_got.lock().unwrap().clear();
    }
    std::fs::remove_dir_all(&dir).unwrap();
}

/// A root CA and a leaf for 127.0.0.1; returns (cert file, key file, roots).
fn pki(dir: &Path) -> (PathBuf, PathBuf, rustls::RootCertStore) {
    use rcgen::{BasicConstraints, CertificateParams, IsCa, Issuer, KeyPair};
    let mut rp = CertificateParams::new(Vec::<String>::new()).unwrap();
    rp.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    let rk = KeyPair::generate().unwrap();
    let root = rp.self_signed(&rk).unwrap();
    let lk = KeyPair::generate().unwrap();
    let leaf = CertificateParams::new(vec!["127.0.0.1".to_owned()])
        .unwrap()
        .signed_by(&lk, &Issuer::from_params(&rp, &rk))
        .unwrap();
    let (c, k) = (dir.join("leaf.crt"), dir.join("leaf.key"));
    std::fs::write(&c, leaf.pem()).unwrap();
    std::fs::write(&k, lk.serialize_pem()).unwrap();
    let mut roots = rustls::RootCertStore::empty();
    roots.add(root.der().clone()).unwrap();
    (c, k, roots)
}

#[test]
fn tls_copy_path_recording_holds_what_the_browser_got() {
    use rustls::{ClientConfig, ClientConnection, StreamOwned, pki_types::ServerName};
    let (script, sent) = mixed_script();
    let (vm, _) = scripted_vm(script);
    let dir = temp_dir("tls");
    let certs = temp_dir("tls-certs");
    let (cert, key, roots) = pki(&certs);
    let gw = Gw::with_route(
        "auto",
        "tls1",
        vm,
        &[
            "--record",
            dir.to_str().unwrap(),
            "--tls-cert",
            cert.to_str().unwrap(),
            "--tls-key",
            key.to_str().unwrap(),
        ],
    );
    let cfg =
        ClientConfig::builder_with_provider(Arc::new(rustls::crypto::ring::default_provider()))
            .with_safe_default_protocol_versions()
            .unwrap()
            .with_root_certificates(roots)
            .with_no_client_auth();
    let tcp = TcpStream::connect(gw.addr).unwrap();
    tcp.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    let conn =
        ClientConnection::new(Arc::new(cfg), ServerName::try_from("127.0.0.1").unwrap()).unwrap();
    let s = StreamOwned::new(conn, tcp);
    let (mut ws, _) = tungstenite::client("wss://127.0.0.1/vnc/tls1", s).unwrap();
    let mut got = Vec::new();
    while got.len() < sent.len() {
        if let tungstenite::Message::Binary(b) = ws.read().unwrap() {
            got.extend_from_slice(&b);
        }
    }
    ws.close(None).unwrap();
    while ws.read().is_ok() {}
    assert_eq!(got, sent);
    wait_recording_ended(&gw, 1);
    let files = recordings(&dir);
    let bytes = std::fs::read(&files[0]).unwrap();
    let p = recording::parse(&bytes).unwrap();
    assert!(!p.header.input_included());
    assert_eq!(p.end, Some(EndReason::Complete));
    assert_eq!(stream_of(&p, Kind::VmToBrowser), got);
    // Under TLS every read is copied (none bigger than the read buffer).
    assert!(p.records.iter().all(|r| r.payload.len() <= 32 << 10));
    std::fs::remove_dir_all(&dir).unwrap();
    std::fs::remove_dir_all(&certs).unwrap();
}

#[test]
fn caps_end_the_recording_never_the_session() {
    let (script, sent) = mixed_script();
    let (vm, _) = scripted_vm(script);
    let dir = temp_dir("caps");
    let d = dir.to_str().unwrap();
    // Per session: 100 kB of a 6 MB session.
    let gw = Gw::with_route(
        "auto",
        "cap1",
        vm,
        &["--record", d, "--record-max-session-bytes", "100000"],
    );
    let mut ws = RawWs::connect(gw.addr, "/vnc/cap1", "");
    let got = ws.read_data(sent.len());
    ws.send(&frame(0x88, &1000u16.to_be_bytes()));
    let _ = ws.until_close();
    assert_eq!(got, sent, "the session went on past the cap");
    wait_recording_ended(&gw, 1);
    let files = recordings(&dir);
    let bytes = std::fs::read(&files[0]).unwrap();
    assert!(bytes.len() <= 100_000 + 64, "{} bytes", bytes.len());
    let p = recording::parse(&bytes).unwrap();
    assert_eq!(p.end, Some(EndReason::SessionCap));
    let rec = stream_of(&p, Kind::VmToBrowser);
    assert!(!rec.is_empty() && got.starts_with(&rec));
    assert!(gw.log().contains("result=\"session_cap\"") || gw.log().contains("result=session_cap"));
    assert_eq!(
        metric(&gw, "vncgate_recordings_total{result=\"session_cap\"}"),
        1.0
    );
    drop(gw);

    // Per directory: what is there counts. With 20 kB of room, the small writes are
    // recorded and the first big record does not fit.
    std::fs::write(dir.join("old.vncrec"), vec![0u8; 50_000]).unwrap();
    let dir_bytes = |dir: &Path| -> u64 {
        recordings(dir)
            .iter()
            .map(|f| f.metadata().unwrap().len())
            .sum()
    };
    let cap = dir_bytes(&dir) + 20_000;
    let gw = Gw::with_route(
        "auto",
        "cap1",
        vm,
        &["--record", d, "--record-max-dir-bytes", &cap.to_string()],
    );
    let mut ws = RawWs::connect(gw.addr, "/vnc/cap1", "");
    let got = ws.read_data(sent.len());
    ws.send(&frame(0x88, &1000u16.to_be_bytes()));
    let _ = ws.until_close();
    assert_eq!(got, sent, "the session went on past the directory cap");
    wait_recording_ended(&gw, 1);
    assert!(dir_bytes(&dir) <= cap, "{} > {cap}", dir_bytes(&dir));
    let ends: Vec<_> = recordings(&dir)
        .iter()
        .filter(|f| {
            f.file_name()
                .unwrap()
                .to_string_lossy()
                .starts_with("cap1-")
        })
        .map(|f| recording::parse(&std::fs::read(f).unwrap()).unwrap().end)
        .collect();
    assert_eq!(ends.len(), 2);
    assert!(ends.contains(&Some(EndReason::SessionCap)), "{ends:?}");
    assert!(ends.contains(&Some(EndReason::DirCap)), "{ends:?}");
    assert_eq!(
        metric(&gw, "vncgate_recordings_total{result=\"dir_cap\"}"),
        1.0
    );
    drop(gw);

    // A full directory: the session goes unrecorded, and no file is made.
    let before = recordings(&dir).len();
    let full = dir_bytes(&dir).to_string();
    let gw = Gw::with_route(
        "auto",
        "cap1",
        vm,
        &["--record", d, "--record-max-dir-bytes", &full],
    );
    let mut ws = RawWs::connect(gw.addr, "/vnc/cap1", "");
    let got = ws.read_data(sent.len());
    ws.send(&frame(0x88, &1000u16.to_be_bytes()));
    let _ = ws.until_close();
    assert_eq!(got, sent, "an unrecorded session works");
    assert!(gw.log().contains("session not recorded"), "{}", gw.log());
    assert_eq!(recordings(&dir).len(), before);
    assert_eq!(
        metric(&gw, "vncgate_recordings_total{result=\"dir_cap\"}"),
        1.0
    );
    std::fs::remove_dir_all(&dir).unwrap();
}

/// A full disk for real: the gateway runs in a private mount namespace with a 256 KiB
/// tmpfs over its recording directory (needs root, which the test environment has; the
/// test says so and passes vacuously only where `unshare` is refused).
#[test]
fn a_full_disk_ends_the_recording_never_the_session() {
    let (script, sent) = mixed_script();
    let (vm, _) = scripted_vm(script);
    let dir = temp_dir("enospc");
    let d = dir.to_str().unwrap();
    let route = format!("full1={vm}");
    let shell = format!(
        "mount -t tmpfs -o size=256k vncgate-rec-test {d} && exec {} serve --listen 127.0.0.1:0 --admin 127.0.0.1:0 --workers 1 --route {route} --allow-upstream 127.0.0.1 --record {d}",
        common::BIN
    );
    let probe = std::process::Command::new("unshare")
        .args(["-m", "true"])
        .status();
    if !matches!(probe, Ok(s) if s.success()) {
        eprintln!("SKIPPED: cannot create a mount namespace here (needs root and unshare)");
        return;
    }
    let gw = Gw::spawn(std::process::Command::new("unshare").args(["-m", "sh", "-c", &shell]))
        .expect("gateway starts in its namespace");
    for round in 0..2 {
        let mut ws = RawWs::connect(gw.addr, "/vnc/full1", "");
        let got = ws.read_data(sent.len());
        ws.send(&frame(0x88, &1000u16.to_be_bytes()));
        let _ = ws.until_close();
        assert_eq!(got, sent, "round {round}: the session went on");
        if round == 0 {
            wait_recording_ended(&gw, 1);
        }
    }
    // The tmpfs as the gateway sees it.
    let inside = PathBuf::from(format!("/proc/{}/root{d}", gw.pid()));
    let files = recordings(&inside);
    assert!(!files.is_empty());
    let bytes = std::fs::read(&files[0]).unwrap();
    let p = recording::parse(&bytes).expect("a full disk leaves a readable file");
    assert!(
        matches!(p.end, Some(EndReason::DiskFull) | None),
        "{:?}",
        p.end
    );
    let rec = stream_of(&p, Kind::VmToBrowser);
    assert!(!rec.is_empty() && sent.starts_with(&rec));
    assert!(gw.log().contains("disk_full"), "{}", gw.log());
    assert!(
        metric(&gw, "vncgate_recordings_total{result=\"disk_full\"}") >= 1.0,
        "{}",
        gw.admin_get("/metrics").1
    );
    drop(gw);
    std::fs::remove_dir_all(&dir).unwrap();
}

/// `--record-scope routes`: only the routes whose `record` field is true are recorded (the
/// routes file here; Redis records carry the same field, `vncgate route add --record`).
#[test]
fn scope_routes_records_only_routes_that_ask() {
    let (vm, _) = scripted_vm(vec![(pattern(5000, 1), Duration::from_millis(10))]);
    let dir = temp_dir("scope");
    let routes = dir.join("routes.toml");
    std::fs::write(
        &routes,
        format!(
            "[[route]]\nsession = \"yes\"\nupstream = \"{vm}\"\nrecord = true\n\n[[route]]\nsession = \"no\"\nupstream = \"{vm}\"\n"
        ),
    )
    .unwrap();
    let rec = dir.join("rec");
    let gw = Gw::start(
        "auto",
        &[
            "--routes-file",
            routes.to_str().unwrap(),
            "--allow-upstream",
            "127.0.0.1",
            "--record",
            rec.to_str().unwrap(),
            "--record-scope",
            "routes",
        ],
    );
    for session in ["no", "yes"] {
        let mut ws = RawWs::connect(gw.addr, &format!("/vnc/{session}"), "");
        assert_eq!(ws.read_data(5000), pattern(5000, 1));
        ws.send(&frame(0x88, &1000u16.to_be_bytes()));
        let _ = ws.until_close();
    }
    wait_recording_ended(&gw, 1);
    let files = recordings(&rec);
    assert_eq!(files.len(), 1, "{files:?}");
    let p = recording::parse(&std::fs::read(&files[0]).unwrap())
        .unwrap()
        .header;
    assert_eq!(p.session, "yes");
    std::fs::remove_dir_all(&dir).unwrap();
}
