//! Every viewer gets its share: 50 sessions streaming at once through a gateway with two
//! workers, each session's bytes over a counted window, against direct TCP to the same
//! source in the same test run.
//!
//! The load is shaped like the one that exposed the starvation (issue 16): a source that
//! writes 64 KiB at a time as fast as the socket takes it, viewers that arrive one after
//! another while the earlier ones already stream (so the machine is saturated when the late
//! ones start, and the gateway hands some of them between workers), each reading as fast as
//! it can, on a two-thread asynchronous client. The starvation this load exposed was the
//! host's congestion control (BBR, pacing each flow at its own estimate, which collapses to
//! a few MB/s for a flow whose reader starts late); the gateway now sends with CUBIC. The
//! crawl is a matter of chance: with `--tcp-congestion system` this test failed in 1 of 10
//! runs here (slowest/mean 0.034) and passed at 0.50-0.79 in the others, against 0.83-0.89
//! in every run with the default. So it is a guard against starved sessions of any cause
//! (a hand-off, a scheduling or a pacing bug), not a proof that none can happen.
//!
//! The bound is relative, never a wall-clock figure: the slowest session must move at least
//! a quarter of the mean session's bytes, or as large a share as direct TCP to the same
//! source gives its own slowest stream in the same run, whichever is lower (the bound is one
//! direct TCP meets: when the test's client starves a stream of its own, direct shows it).
//!
//! The same load through `wss://` (one worker, thread-per-viewer rustls clients) exposed a
//! second starvation, in the gateway's scheduling: under TLS the worker is busy encrypting
//! and the sockets are always ready, and a session's yield put it back at the front of
//! monoio's run queue (see `server::signal::Turns`), so a few sessions took nearly all of
//! the throughput; the slowest of 50 moved 0.3-1 MB/s (slowest/mean about 0.02) in most
//! runs here, against 12-18 MB/s now.
//!
//! It runs alone (`.config/nextest.toml` gives it every test thread): the figures mean
//! nothing while other tests share the two cores.

mod common;

use std::io::Write;
use std::net::{SocketAddr, TcpListener};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::thread;
use std::time::{Duration, Instant};

use common::{Gw, upgrade_request};

const STREAMS: usize = 50;
/// The slowest session's share of the mean session's bytes, at least, when direct TCP meets
/// it. Through the gateway this measured 0.83-0.86 here (and fell to 0.02-0.03 when
/// starving); direct TCP with the same client ranged 0.02-0.69, since at 6 GB/s the
/// client's own two threads are the bottleneck and a late task can wait behind the others.
/// In a run where that happens, direct TCP's own slowest/mean is the bound instead: the
/// client, not the gateway, set the floor (seen in CI: direct 0.022 and the gateway 0.040,
/// their slowest streams 2.4 and 2.7 MB/s). The gateway that starved handed-off sessions
/// measured 0.005 against direct's 0.37, which either bound catches.
const BOUND: f64 = 0.25;
/// Between one viewer's arrival and the next.
const ARRIVAL_GAP: Duration = Duration::from_millis(20);
/// After the last arrival, before counting.
const WARM_UP: Duration = Duration::from_millis(500);
const WINDOW: Duration = Duration::from_secs(3);

/// Bytes each stream received in the window (WebSocket frame headers included: at most 10
/// bytes per frame of up to 1 MiB).
///
/// The viewers are tasks of one two-thread tokio runtime, as an asynchronous client runs
/// them: one that arrives while the others stream waits its turn behind them before its
/// first read, so its socket fills and its sender meets a closed window at once. That late
/// first read is what set off the starvation; thread-per-viewer clients rarely show it.
fn per_stream_bytes(addr: SocketAddr, ws_path: Option<&str>) -> Vec<u64> {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(async move {
        let window = Arc::new(std::sync::OnceLock::<(Instant, Instant)>::new());
        // Streams opened (and upgraded) so far; the window starts once all are.
        let arrived = Arc::new(AtomicUsize::new(0));
        let mut readers = Vec::new();
        for i in 0..STREAMS {
            tokio::time::sleep(ARRIVAL_GAP).await;
            let (window, arrived) = (window.clone(), arrived.clone());
            let path = ws_path.map(str::to_owned);
            readers.push(tokio::spawn(async move {
                let mut s = tokio::net::TcpStream::connect(addr).await.expect("connect");
                s.set_nodelay(true).unwrap();
                let mut buf = vec![0u8; 64 << 10];
                if let Some(path) = path {
                    s.write_all(upgrade_request(&path, "").as_bytes())
                        .await
                        .unwrap();
                    let mut head = Vec::new();
                    let mut b = [0u8; 1];
                    while !head.ends_with(b"\r\n\r\n") {
                        s.read_exact(&mut b).await.expect("upgrade answer");
                        head.push(b[0]);
                    }
                    assert!(head.starts_with(b"HTTP/1.1 101"), "stream {i}: no upgrade");
                }
                arrived.fetch_add(1, Ordering::SeqCst);
                // Read from the start, as a viewer does; count only inside the window.
                let mut counted = 0u64;
                loop {
                    let n = s.read(&mut buf).await.expect("stream read");
                    assert!(n > 0, "stream {i}: closed mid-stream");
                    if tally(&window, n, &mut counted) {
                        return counted;
                    }
                }
            }));
        }
        open_window(&arrived, &window);
        let mut out = Vec::new();
        for r in readers {
            out.push(r.await.unwrap());
        }
        out
    })
}

/// The counting window of a run: from [`WARM_UP`] after every stream has opened, for
/// [`WINDOW`]. Called on a thread of its own (blocking), as the streams read.
fn open_window(arrived: &AtomicUsize, window: &std::sync::OnceLock<(Instant, Instant)>) {
    let deadline = Instant::now() + Duration::from_secs(20);
    while arrived.load(Ordering::SeqCst) < STREAMS {
        assert!(Instant::now() < deadline, "streams did not all open");
        thread::sleep(Duration::from_millis(5));
    }
    let t0 = Instant::now() + WARM_UP;
    let _ = window.set((t0, t0 + WINDOW));
}

/// Counts a read of `n` bytes made now if it falls inside the window; `true` once the
/// window is over (the stream's count is final).
fn tally(window: &std::sync::OnceLock<(Instant, Instant)>, n: usize, counted: &mut u64) -> bool {
    let Some(&(t0, end)) = window.get() else {
        return false;
    };
    let now = Instant::now();
    if now >= end {
        return true;
    }
    if now >= t0 {
        *counted += n as u64;
    }
    false
}

/// Slowest stream over the mean stream.
fn min_over_mean(x: &[u64]) -> f64 {
    let mean = x.iter().sum::<u64>() as f64 / x.len() as f64;
    *x.iter().min().unwrap() as f64 / mean
}

fn summary(x: &[u64]) -> String {
    let mb = |b: u64| b as f64 / WINDOW.as_secs_f64() / 1e6;
    let mut s = x.to_vec();
    s.sort_unstable();
    format!(
        "slowest {:.1} MB/s, median {:.1}, fastest {:.1}, aggregate {:.0}, slowest/mean {:.3}",
        mb(s[0]),
        mb(s[s.len() / 2]),
        mb(s[s.len() - 1]),
        mb(s.iter().sum()),
        min_over_mean(x)
    )
}

/// A VM drawing continuously: 64 KiB writes of a fixed buffer, as fast as each socket
/// takes them, one thread per connection, until `stop`. It sends with CUBIC, as the
/// gateway does by default, so that direct TCP is the same congestion control end to end
/// (with the host's BBR, direct TCP starves its own late streams here: see the README).
fn drawing_vm(stop: Arc<AtomicBool>) -> SocketAddr {
    let sock = socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::STREAM, None).unwrap();
    sock.set_reuse_address(true).unwrap();
    sock.set_tcp_congestion(b"cubic").unwrap();
    sock.bind(&SocketAddr::from(([127, 0, 0, 1], 0)).into())
        .unwrap();
    sock.listen(1024).unwrap();
    let l: TcpListener = sock.into();
    let addr = l.local_addr().unwrap();
    thread::spawn(move || {
        for s in l.incoming() {
            let Ok(mut s) = s else { continue };
            let stop = stop.clone();
            thread::spawn(move || {
                let frame = vec![0x5au8; 64 << 10];
                s.set_write_timeout(Some(Duration::from_millis(200)))
                    .unwrap();
                while !stop.load(Ordering::Relaxed) {
                    match s.write(&frame) {
                        Ok(_) => {}
                        Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {}
                        Err(_) => return,
                    }
                }
            });
        }
    });
    addr
}

/// [`per_stream_bytes`] through `wss://`: one thread per viewer, each a blocking rustls
/// client (as the project's benchmark runs them) that upgrades and reads as fast as it can.
fn per_stream_bytes_tls(addr: SocketAddr, cfg: Arc<rustls::ClientConfig>, path: &str) -> Vec<u64> {
    use std::io::Read;
    let window = Arc::new(std::sync::OnceLock::<(Instant, Instant)>::new());
    let arrived = Arc::new(AtomicUsize::new(0));
    let mut readers = Vec::new();
    for i in 0..STREAMS {
        thread::sleep(ARRIVAL_GAP);
        let (window, arrived, cfg, path) = (
            window.clone(),
            arrived.clone(),
            cfg.clone(),
            path.to_owned(),
        );
        readers.push(thread::spawn(move || {
            let tcp = std::net::TcpStream::connect(addr).expect("connect");
            tcp.set_nodelay(true).unwrap();
            tcp.set_read_timeout(Some(Duration::from_secs(20))).unwrap();
            let name = rustls::pki_types::ServerName::try_from("127.0.0.1").unwrap();
            let conn = rustls::ClientConnection::new(cfg, name).unwrap();
            let mut s = rustls::StreamOwned::new(conn, tcp);
            s.write_all(upgrade_request(&path, "").as_bytes()).unwrap();
            let mut head = Vec::new();
            let mut b = [0u8; 1];
            while !head.ends_with(b"\r\n\r\n") {
                s.read_exact(&mut b).expect("upgrade answer");
                head.push(b[0]);
            }
            assert!(head.starts_with(b"HTTP/1.1 101"), "stream {i}: no upgrade");
            arrived.fetch_add(1, Ordering::SeqCst);
            let mut buf = vec![0u8; 64 << 10];
            let mut counted = 0u64;
            loop {
                let n = s.read(&mut buf).expect("stream read");
                assert!(n > 0, "stream {i}: closed mid-stream");
                if tally(&window, n, &mut counted) {
                    return counted;
                }
            }
        }));
    }
    open_window(&arrived, &window);
    readers.into_iter().map(|r| r.join().unwrap()).collect()
}

/// A self-signed certificate for 127.0.0.1 written as PEM files, and a client that trusts it.
fn tls_files(dir: &std::path::Path) -> (String, String, Arc<rustls::ClientConfig>) {
    let ck = rcgen::generate_simple_self_signed(vec!["127.0.0.1".to_owned()]).unwrap();
    std::fs::create_dir_all(dir).unwrap();
    let (cert, key) = (dir.join("cert.pem"), dir.join("key.pem"));
    std::fs::write(&cert, ck.cert.pem()).unwrap();
    std::fs::write(&key, ck.signing_key.serialize_pem()).unwrap();
    let mut roots = rustls::RootCertStore::empty();
    roots.add(ck.cert.der().clone()).unwrap();
    let cfg = rustls::ClientConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .unwrap()
    .with_root_certificates(roots)
    .with_no_client_auth();
    let path = |p: std::path::PathBuf| p.to_str().unwrap().to_owned();
    (path(cert), path(key), Arc::new(cfg))
}

#[test]
fn fifty_wss_streams_each_get_a_fair_share() {
    let stop = Arc::new(AtomicBool::new(false));
    let vm = drawing_vm(stop.clone());
    let dir = std::env::temp_dir().join(format!("vncgate-fairness-tls-{}", std::process::id()));
    let (cert, key, client) = tls_files(&dir);

    let direct = per_stream_bytes(vm, None);
    thread::sleep(Duration::from_millis(300));
    // One worker: every session shares its time, as they did when they starved.
    let gw = Gw::with_route(
        "auto",
        "bulk",
        vm,
        &["--workers", "1", "--tls-cert", &cert, "--tls-key", &key],
    );
    let through = per_stream_bytes_tls(gw.addr, client, "/vnc/bulk");
    stop.store(true, Ordering::SeqCst);
    let _ = std::fs::remove_dir_all(&dir);

    let v = min_over_mean(&through);
    let bound = BOUND.min(min_over_mean(&direct));
    let report = format!(
        "direct (plain): {}\nvncgate (wss://, one worker): {}\nbound on vncgate's slowest/mean: {bound:.3} (the lower of {BOUND} and direct's)",
        summary(&direct),
        summary(&through)
    );
    eprintln!("{report}");
    assert!(
        v >= bound,
        "a session starved through the gateway under TLS:\n{report}"
    );
}

#[test]
fn fifty_streams_each_get_a_fair_share() {
    let stop = Arc::new(AtomicBool::new(false));
    let vm = drawing_vm(stop.clone());

    let direct = per_stream_bytes(vm, None);
    thread::sleep(Duration::from_millis(300));
    let gw = Gw::with_route("auto", "bulk", vm, &["--workers", "2"]);
    let through = per_stream_bytes(gw.addr, Some("/vnc/bulk"));
    stop.store(true, Ordering::SeqCst);

    let v = min_over_mean(&through);
    let bound = BOUND.min(min_over_mean(&direct));
    let (_, metrics) = gw.admin_get("/metrics");
    let handed_off = metrics
        .lines()
        .find_map(|l| l.strip_prefix("vncgate_connections_handed_off_total "))
        .unwrap_or("0")
        .to_owned();
    let report = format!(
        "direct: {}\nvncgate: {}\nbound on vncgate's slowest/mean: {bound:.3} (the lower of {BOUND} and direct's); connections handed between workers: {handed_off}",
        summary(&direct),
        summary(&through)
    );
    eprintln!("{report}");
    assert!(
        v >= bound,
        "a session starved through the gateway:\n{report}"
    );
}
