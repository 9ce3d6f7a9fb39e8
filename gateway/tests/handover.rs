//! Restarts that refuse nothing (`--handover-socket`) and drains spread over a window
//! (`--drain-spread`), against the real binary over real sockets.

mod common;

use std::collections::BTreeMap;
use std::io::{Read as _, Write as _};
use std::net::{SocketAddr, TcpStream};
use std::os::unix::fs::PermissionsExt as _;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use common::*;

fn socket_path(name: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("vncgate-handover-{name}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    dir.join("handover.sock")
}

/// One connection attempt, a full WebSocket upgrade: what it got.
fn attempt(addr: SocketAddr) -> &'static str {
    let mut s = match TcpStream::connect(addr) {
        Ok(s) => s,
        Err(e) if e.kind() == std::io::ErrorKind::ConnectionRefused => return "refused",
        Err(e) if e.kind() == std::io::ErrorKind::ConnectionReset => return "reset",
        Err(_) => return "connect failed",
    };
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    if s.write_all(upgrade_request("/vnc/s", "").as_bytes())
        .is_err()
    {
        return "reset";
    }
    let mut head = Vec::new();
    let mut buf = [0u8; 1024];
    while !head.windows(4).any(|w| w == b"\r\n\r\n") {
        match s.read(&mut buf) {
            Ok(0) => return "closed without an answer",
            Ok(n) => head.extend_from_slice(&buf[..n]),
            Err(e) if e.kind() == std::io::ErrorKind::ConnectionReset => return "reset",
            Err(_) => return "no answer",
        }
    }
    let text = String::from_utf8_lossy(&head);
    if text.starts_with("HTTP/1.1 101 ") {
        "101"
    } else if text.starts_with("HTTP/1.1 503 ") && text.contains("Retry-After") {
        "503"
    } else {
        "other status"
    }
}

/// Clients connecting one attempt after another on `threads` threads, counting outcomes.
/// Each thread rests [`PACE`] between attempts, so that a fast build cannot spend the whole
/// bound while the old gateway drains, before any attempt reaches the successor alone.
const PACE: Duration = Duration::from_millis(3);

struct Load {
    stop: Arc<AtomicBool>,
    total: Arc<AtomicU64>,
    seen: Arc<Mutex<BTreeMap<&'static str, u64>>>,
    threads: Vec<std::thread::JoinHandle<()>>,
}

impl Load {
    fn start(addr: SocketAddr, threads: usize, bound: u64) -> Load {
        let stop = Arc::new(AtomicBool::new(false));
        let total = Arc::new(AtomicU64::new(0));
        let seen = Arc::new(Mutex::new(BTreeMap::new()));
        let threads = (0..threads)
            .map(|_| {
                let (stop, total, seen) = (stop.clone(), total.clone(), seen.clone());
                std::thread::spawn(move || {
                    while !stop.load(Ordering::SeqCst) && total.load(Ordering::SeqCst) < bound {
                        let got = attempt(addr);
                        *seen.lock().unwrap().entry(got).or_default() += 1;
                        total.fetch_add(1, Ordering::SeqCst);
                        std::thread::sleep(PACE);
                    }
                })
            })
            .collect();
        Load {
            stop,
            total,
            seen,
            threads,
        }
    }

    fn wait_for(&self, n: u64) {
        assert!(
            eventually(Duration::from_secs(60), || self
                .total
                .load(Ordering::SeqCst)
                >= n),
            "attempts stalled at {}: {:?}",
            self.total.load(Ordering::SeqCst),
            self.seen.lock().unwrap()
        );
    }

    fn finish(self) -> BTreeMap<&'static str, u64> {
        self.stop.store(true, Ordering::SeqCst);
        for t in self.threads {
            t.join().unwrap();
        }
        self.seen.lock().unwrap().clone()
    }
}

/// A restart under continuous connection attempts: a new gateway with another worker
/// count takes the sockets over, the old one drains its live session with 1001 and exits
/// 0, and every attempt, before, during and after, is upgraded: nothing refused, reset or
/// answered 503.
fn restart_refuses_nothing(driver: &str, old_workers: &str, new_workers: &str) {
    // At least this many attempts in all, a fifth of them after the old gateway exited,
    // and never more than the cap.
    const ATTEMPTS: u64 = 3000;
    // Each attempt leaves a TIME_WAIT port behind on the client side: the cap keeps the
    // two restart tests together well inside the ephemeral port range.
    const CAP: u64 = 12_000;
    let echo = echo_server();
    let path = socket_path(&format!("restart-{driver}-{old_workers}-{new_workers}"));
    let p = path.to_str().unwrap();
    let mut old = Gw::with_route(
        driver,
        "s",
        echo.addr,
        &[
            "--workers",
            old_workers,
            "--handover-socket",
            p,
            "--drain-timeout",
            "0.5",
            "--drain-spread",
            "0.5",
        ],
    );
    let mode = std::fs::metadata(&path).unwrap().permissions().mode() & 0o777;
    assert_eq!(mode, 0o600, "the handover socket is the owner's only");
    let mut live = RawWs::connect(old.addr, "/vnc/s", "");
    let load = Load::start(old.addr, 6, CAP);
    load.wait_for(ATTEMPTS / 5);
    let route = format!("s={}", echo.addr);
    let addr = old.addr.to_string();
    let new = Gw::spawn(std::process::Command::new(BIN).args([
        "serve",
        "--listen",
        &addr,
        "--admin",
        "127.0.0.1:0",
        "--io-driver",
        driver,
        "--workers",
        new_workers,
        "--route",
        &route,
        "--allow-upstream",
        "127.0.0.1",
        "--handover-socket",
        p,
    ]))
    .expect("the successor starts on the inherited sockets");
    let at_handover = load.total.load(Ordering::SeqCst);
    assert_eq!(new.addr, old.addr);
    assert_eq!(
        new.admin, old.admin,
        "the admin listener is handed over too"
    );
    assert!(
        old.wait_log("handed over to the successor", Duration::from_secs(10)),
        "{}",
        old.log()
    );
    assert!(
        new.log()
            .contains("took over the running gateway's listening sockets")
    );
    // The old gateway's session ends with 1001 at its drain deadline; then it exits 0.
    let (_, close) = live.until_close();
    assert_eq!(close.and_then(|f| f.close_code()), Some(1001));
    assert_eq!(
        old.wait_exit(Duration::from_secs(20)),
        Some(0),
        "{}",
        old.log()
    );
    let at_exit = load.total.load(Ordering::SeqCst);
    load.wait_for(ATTEMPTS.max(at_exit + ATTEMPTS / 5).min(CAP));
    let seen = load.finish();
    let total: u64 = seen.values().sum();
    println!(
        "restart {old_workers} -> {new_workers} workers ({driver}): {total} attempts, {at_handover} before the successor, {} while the old one drained, {} after it exited: {seen:?}",
        at_exit - at_handover,
        total - at_exit
    );
    let warnings = |g: &Gw| {
        g.log()
            .lines()
            .filter(|l| l.contains("WARN") || l.contains("ERROR"))
            .map(String::from)
            .collect::<Vec<_>>()
            .join("\n")
    };
    assert_eq!(
        seen.get("101").copied(),
        Some(total),
        "every attempt upgraded: {seen:?}\nold:\n{}\nnew:\n{}",
        warnings(&old),
        warnings(&new)
    );
    assert!(at_exit > at_handover, "attempts ran during the drain");
    assert!(total > at_exit, "attempts ran after the old gateway exited");
    // The successor serves handovers in its turn, at the same path.
    assert_eq!(
        std::fs::metadata(&path).unwrap().permissions().mode() & 0o777,
        0o600
    );
    let (st, _) = new.admin_get("/readyz");
    assert_eq!(st, 200);
}

#[test]
fn restart_to_fewer_workers_refuses_nothing() {
    restart_refuses_nothing("auto", "3", "2");
}

#[test]
fn restart_to_more_workers_refuses_nothing_on_epoll() {
    restart_refuses_nothing("epoll", "1", "3");
}

/// A successor configured for another address is refused clearly, and the running
/// gateway serves on as if nothing had happened.
#[test]
fn a_successor_on_another_address_is_refused_and_the_old_one_serves_on() {
    let echo = echo_server();
    let path = socket_path("mismatch");
    let p = path.to_str().unwrap();
    let old = Gw::with_route("auto", "s", echo.addr, &["--handover-socket", p]);
    let elsewhere = closed_port().to_string();
    let err = Gw::spawn(std::process::Command::new(BIN).args([
        "serve",
        "--listen",
        &elsewhere,
        "--route",
        &format!("s={}", echo.addr),
        "--allow-upstream",
        "127.0.0.1",
        "--handover-socket",
        p,
    ]))
    .err()
    .expect("the successor refuses to start");
    assert!(
        err.contains("refusing to take its sockets over") && err.contains(&old.addr.to_string()),
        "{err}"
    );
    assert!(
        old.wait_log("handover abandoned", Duration::from_secs(10)),
        "{}",
        old.log()
    );
    let (st, _) = old.admin_get("/readyz");
    assert_eq!(st, 200, "the old gateway is not draining");
    assert_eq!(attempt(old.addr), "101");
}

/// With a stale socket file and no gateway behind it, a gateway binds as usual.
#[test]
fn a_stale_handover_socket_means_bind_as_usual() {
    let echo = echo_server();
    let path = socket_path("stale");
    drop(std::os::unix::net::UnixListener::bind(&path).unwrap());
    assert!(path.exists());
    let gw = Gw::with_route(
        "auto",
        "s",
        echo.addr,
        &["--handover-socket", path.to_str().unwrap()],
    );
    assert!(gw.log().contains("no running gateway to take over from"));
    assert_eq!(attempt(gw.addr), "101");
}

/// A drain closes its sessions with 1001 spread over `--drain-spread`, not as one burst:
/// the closes are counted per tenth of the window as the browsers see them.
#[test]
fn drain_closes_are_spread_over_the_window() {
    const SESSIONS: usize = 40;
    let (vm, _) = silent_server();
    let mut gw = Gw::with_route(
        "auto",
        "s",
        vm,
        &["--drain-timeout", "0.2", "--drain-spread", "2"],
    );
    let clients: Vec<_> = (0..SESSIONS)
        .map(|_| {
            let mut ws = RawWs::connect(gw.addr, "/vnc/s", "");
            std::thread::spawn(move || {
                let (_, close) = ws.until_close();
                (close.and_then(|f| f.close_code()), Instant::now())
            })
        })
        .collect();
    assert!(eventually(Duration::from_secs(10), || gw
        .admin_get("/metrics")
        .1
        .contains(&format!("vncgate_sessions_active {SESSIONS}"))));
    gw.signal(15);
    let closes: Vec<_> = clients.into_iter().map(|c| c.join().unwrap()).collect();
    assert!(
        closes.iter().all(|(code, _)| *code == Some(1001)),
        "{closes:?}"
    );
    let first = closes.iter().map(|c| c.1).min().unwrap();
    let offsets: Vec<f64> = closes.iter().map(|c| (c.1 - first).as_secs_f64()).collect();
    let mut tenths = [0usize; 12];
    for o in &offsets {
        tenths[((o / 0.2) as usize).min(11)] += 1;
    }
    println!("closes per 0.2 s after the first (window 2 s): {tenths:?}");
    let span = offsets.iter().cloned().fold(0.0, f64::max);
    assert!(
        span >= 0.5,
        "closes spread over at least a quarter of the window: {tenths:?}"
    );
    assert!(
        tenths.iter().all(|&n| n <= SESSIONS / 2),
        "no burst holds half the sessions: {tenths:?}"
    );
    assert_eq!(gw.wait_exit(Duration::from_secs(10)), Some(0));
}

/// What `systemctl reload` runs (config/systemd/vncgate.service): `serve --detach` starts
/// the successor, returns 0 once it has taken over, and the successor tells systemd (here
/// a datagram socket standing in for `$NOTIFY_SOCKET`) that it is the main process now.
#[test]
fn a_detached_successor_takes_over_and_reports_its_pid_to_systemd() {
    use std::io::BufRead as _;
    let echo = echo_server();
    let path = socket_path("detach");
    let p = path.to_str().unwrap();
    let notify_path = path.with_file_name("notify.sock");
    let notify = std::os::unix::net::UnixDatagram::bind(&notify_path).unwrap();
    notify
        .set_read_timeout(Some(Duration::from_secs(20)))
        .unwrap();
    let next_notice = || {
        let mut buf = [0u8; 256];
        let n = notify.recv(&mut buf).expect("a notification");
        String::from_utf8_lossy(&buf[..n]).into_owned()
    };
    let route = format!("s={}", echo.addr);
    let serve = |listen: &str| {
        let mut c = std::process::Command::new(BIN);
        c.args([
            "serve",
            "--listen",
            listen,
            "--admin",
            "127.0.0.1:0",
            "--route",
            &route,
            "--allow-upstream",
            "127.0.0.1",
            "--handover-socket",
            p,
            "--drain-timeout",
            "0.5",
        ])
        .env("NOTIFY_SOCKET", &notify_path);
        c
    };
    let mut old = Gw::spawn(&mut serve("127.0.0.1:0")).unwrap();
    assert_eq!(
        next_notice(),
        format!("READY=1\nMAINPID={}\n", old.pid()),
        "the first gateway reports ready"
    );
    let addr = old.addr.to_string();
    let mut reload = serve(&addr)
        .arg("--detach")
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    let lines = std::io::BufReader::new(reload.stdout.take().unwrap());
    let mut detached = None;
    for line in lines.lines().map_while(Result::ok) {
        if let Some(pid) = line.strip_prefix("vncgate: detached gateway pid ") {
            detached = Some(pid.parse::<u32>().unwrap());
            break;
        }
    }
    let pid = detached.expect("the reload names the new gateway");
    assert!(reload.wait().unwrap().success(), "the reload succeeds");
    assert_eq!(next_notice(), format!("READY=1\nMAINPID={pid}\n"));
    assert_eq!(
        old.wait_exit(Duration::from_secs(20)),
        Some(0),
        "{}",
        old.log()
    );
    assert_eq!(attempt(old.addr), "101", "the detached gateway serves");
    // The detached gateway is not this test's child: end it by its pid.
    std::process::Command::new("kill")
        .args(["-9", &pid.to_string()])
        .status()
        .unwrap();
}

/// Each successor serves handovers in its turn: three gateways one after another on the
/// same address and socket path, each old one exiting 0.
#[test]
fn successors_hand_over_in_their_turn() {
    let echo = echo_server();
    let path = socket_path("chain");
    let p = path.to_str().unwrap();
    let route = format!("s={}", echo.addr);
    let next = |listen: &str| {
        Gw::spawn(std::process::Command::new(BIN).args([
            "serve",
            "--listen",
            listen,
            "--admin",
            "127.0.0.1:0",
            "--workers",
            "2",
            "--route",
            &route,
            "--allow-upstream",
            "127.0.0.1",
            "--handover-socket",
            p,
            "--drain-timeout",
            "0.2",
        ]))
        .unwrap()
    };
    let mut gw = next("127.0.0.1:0");
    let addr = gw.addr.to_string();
    for _ in 0..2 {
        let mut successor = next(&addr);
        assert_eq!(successor.addr, gw.addr);
        assert_eq!(
            gw.wait_exit(Duration::from_secs(20)),
            Some(0),
            "{}",
            gw.log()
        );
        assert_eq!(attempt(successor.addr), "101");
        std::mem::swap(&mut gw, &mut successor);
    }
}
