//! The swarm through the real gateway binary (`vncgate serve`, built beside this package's
//! binary by a workspace build) to the fake VM, over `ws://` and `wss://`: when the run is
//! over, the gateway's own metrics must show every session closed by the browser with
//! 1000, and none as a browser that vanished (1006 `browser_gone`). Before the swarm did
//! the close handshake, a session dropped with frames still in flight was reset, and over
//! TLS about one in twenty showed up at the gateway as `browser connection reset`.

mod common;

use std::collections::BTreeMap;
use std::io::{BufRead as _, BufReader};
use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex, mpsc};
use std::time::{Duration, Instant};

use vncgate_loadtest::dial::Tls;
use vncgate_loadtest::{fakevm, http, swarm};

/// The gateway binary cargo built beside this package's (a workspace build builds both).
fn gateway_bin() -> PathBuf {
    let loadtest = PathBuf::from(env!("CARGO_BIN_EXE_vncgate-loadtest"));
    let gw = loadtest.with_file_name("vncgate");
    assert!(
        gw.is_file(),
        "{} is missing: build the workspace (cargo build --workspace) before this test",
        gw.display()
    );
    gw
}

/// `vncgate serve` on 127.0.0.1:0 with an admin port and one route, `desk`, to `vm`; killed
/// (by its pid) when dropped. Its stderr (the log, `session closed` lines included) is kept.
struct Gateway {
    child: Child,
    url: String,
    admin: SocketAddr,
    log: Arc<Mutex<String>>,
}

impl Gateway {
    fn start(vm: SocketAddr, extra: &[&str]) -> Gateway {
        let mut child = Command::new(gateway_bin())
            .args(["serve", "--listen", "127.0.0.1:0", "--admin", "127.0.0.1:0"])
            .args(["--workers", "2", "--allow-upstream", "127.0.0.1/32"])
            .arg("--route")
            .arg(format!("desk={vm}"))
            .args(extra)
            .env("VNCGATE_LOG", "info")
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("vncgate starts");
        let log = Arc::new(Mutex::new(String::new()));
        let (stderr, keep) = (child.stderr.take().unwrap(), Arc::clone(&log));
        std::thread::spawn(move || {
            for line in BufReader::new(stderr).lines().map_while(Result::ok) {
                let mut l = keep.lock().unwrap();
                l.push_str(&line);
                l.push('\n');
            }
        });
        let (stdout, (tx, rx)) = (child.stdout.take().unwrap(), mpsc::channel());
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines().map_while(Result::ok) {
                let _ = tx.send(line);
            }
        });
        let (mut url, mut admin) = (None, None);
        while url.is_none() || admin.is_none() {
            let line = rx
                .recv_timeout(Duration::from_secs(20))
                .unwrap_or_else(|_| panic!("gateway did not start: {}", log.lock().unwrap()));
            if let Some(u) = line.strip_prefix("vncgate: listening on ") {
                url = Some(format!("{u}desk"));
            } else if let Some(a) = line.strip_prefix("vncgate: admin on http://") {
                admin = Some(a.parse().unwrap());
            }
        }
        Gateway {
            child,
            url: url.unwrap(),
            admin: admin.unwrap(),
            log,
        }
    }

    /// `vncgate_sessions_closed_total` by `code/cause`, series at zero left out.
    fn closed(&self) -> BTreeMap<String, u64> {
        let r = http::request(&self.admin.to_string(), "GET", "/metrics", "", b"").unwrap();
        assert_eq!(r.status, 200, "{}", r.body);
        let mut out = BTreeMap::new();
        for line in r.body.lines() {
            let Some(rest) = line.strip_prefix("vncgate_sessions_closed_total{") else {
                continue;
            };
            let (labels, value) = rest.rsplit_once("} ").unwrap();
            let n: f64 = value.trim().parse().unwrap();
            if n == 0.0 {
                continue;
            }
            let label = |name: &str| {
                labels
                    .split(',')
                    .find_map(|kv| kv.strip_prefix(&format!("{name}=\"")))
                    .map(|v| v.trim_end_matches('"').to_owned())
                    .unwrap_or_default()
            };
            out.insert(format!("{}/{}", label("code"), label("cause")), n as u64);
        }
        out
    }
}

impl Drop for Gateway {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Runs `sessions` busy swarm sessions through `gw`, then waits until the gateway has
/// counted that many endings and checks that each was the browser's clean close.
fn every_session_closes_cleanly(gw: &Gateway, tls: Tls, sessions: usize) {
    let cfg = swarm::Config {
        url: gw.url.clone(),
        sessions,
        duration: Duration::from_secs(3),
        ramp_up: Duration::from_millis(500),
        input_rate: 20.0,
        tls,
        ..Default::default()
    };
    let rt = tokio::runtime::Runtime::new().unwrap();
    let report = rt.block_on(swarm::run(cfg)).unwrap();
    // Every session ended at the end of the run, with the server's close frame received
    // (how many got their first update in 3 s depends on the machine's load; not checked).
    assert!(report.errors.is_empty(), "{report}");
    assert!(
        report.sessions_handshake_ok > 0 && report.bytes > 0,
        "{report}"
    );

    // The swarm returns once every session has the gateway's close frame; the gateway counts
    // a session as it ends, so the count may trail by a moment.
    let deadline = Instant::now() + Duration::from_secs(10);
    let mut closed = gw.closed();
    while closed.values().sum::<u64>() < sessions as u64 && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(50));
        closed = gw.closed();
    }
    let log = gw.log.lock().unwrap().clone();
    let unclean: Vec<&str> = log
        .lines()
        .filter(|l| l.contains("session closed") && !l.contains("code=1000"))
        .collect();
    let want = BTreeMap::from([("1000/browser_close".to_owned(), sessions as u64)]);
    assert_eq!(closed, want, "sessions not closed with 1000: {unclean:#?}");
}

fn vm() -> SocketAddr {
    fakevm::spawn_background(fakevm::Config {
        width: 640,
        height: 480,
        fps: 30,
        ..Default::default()
    })
    .unwrap()
}

/// `ws://` then `wss://`, one after the other (the two runs would otherwise share the
/// cores, and a slow machine is not what this is about).
#[test]
fn swarm_sessions_end_with_a_clean_close_at_the_gateway() {
    let gw = Gateway::start(vm(), &[]);
    every_session_closes_cleanly(&gw, Tls::default(), 30);
    drop(gw);

    let cert = common::self_signed();
    let (cert_pem, key_pem) = (cert.write_pem("gw-cert"), cert.write_key_pem("gw-key"));
    let gw = Gateway::start(
        vm(),
        &[
            "--tls-cert",
            cert_pem.to_str().unwrap(),
            "--tls-key",
            key_pem.to_str().unwrap(),
        ],
    );
    let _ = std::fs::remove_file(&key_pem);
    assert!(gw.url.starts_with("wss://"), "{}", gw.url);
    every_session_closes_cleanly(&gw, Tls::CaFile(cert_pem.clone()), 40);
    let _ = std::fs::remove_file(&cert_pem);
}
