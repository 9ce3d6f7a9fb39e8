//! Three controllers and two gateways on one Redis (standalone and Cluster), process
//! backend: placement by pull (none over a host's `--max-vms`), every session viewable
//! through either gateway, a controller SIGKILLed under open viewers (its sessions become
//! `vm_stopped` with reason `host lost`, their viewers hear 4006 within the lease TTL and a
//! few seconds), placement going on on the survivors, never two owners for a session, and
//! the killed host restarted: it stops its leftover VMs and cannot bring their routes back.

mod common;

use std::collections::{HashMap, HashSet};
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use common::{
    CONTROLLER, Proc, VmsOf, close_of, create, http, scratch, start_controller_on,
    start_gateway_on, view, wait_for,
};
use serde_json::Value;

const MAX_VMS: usize = 16;
const LEASE_TTL: &str = "2";

fn controller(redis: &str, host: &str, work: &std::path::Path) -> Proc {
    let max = MAX_VMS.to_string();
    start_controller_on(
        redis,
        work,
        &[
            "--host-id",
            host,
            "--max-vms",
            &max,
            "--lease-ttl",
            LEASE_TTL,
        ],
    )
}

fn gateway(redis: &str) -> Proc {
    start_gateway_on(redis)
}

fn addr_of(gw: &Proc) -> String {
    gw.found.split('/').next().unwrap().to_owned()
}

fn sessions(api: &str) -> Vec<Value> {
    let (st, v) = http(api, "GET", "/api/sessions", None);
    assert_eq!(st, 200, "{v}");
    v["sessions"].as_array().unwrap().clone()
}

/// Live VM directories under a host's work dir (the process backend keeps one per VM).
fn vm_dirs(work: &std::path::Path) -> usize {
    std::fs::read_dir(work)
        .unwrap()
        .flatten()
        .filter(|e| e.path().is_dir() && e.file_name().to_string_lossy().starts_with("s-"))
        .count()
}

fn scale_out(redis: &str, route_exists: impl Fn(&str) -> bool) {
    let hosts = ["h1", "h2", "h3"];
    let works: Vec<_> = hosts
        .iter()
        .map(|h| scratch(&format!("cluster-{h}")).0)
        .collect();
    // Declared before the controllers: dropped after them, so no controller starts a VM
    // after the sweep.
    let _vms = VmsOf(works.clone());
    let mut ctls: Vec<Proc> = hosts
        .iter()
        .zip(&works)
        .map(|(h, w)| controller(redis, h, w))
        .collect();
    let apis: Vec<String> = ctls.iter().map(|c| c.found.clone()).collect();
    let gws = [gateway(redis), gateway(redis)];
    let gw_addrs: Vec<String> = gws.iter().map(addr_of).collect();

    // Owners seen for every session over the whole run: never two.
    let owners: Arc<Mutex<HashMap<String, HashSet<String>>>> = Arc::default();
    let stop = Arc::new(AtomicBool::new(false));
    let watcher = {
        let (owners, stop, api) = (owners.clone(), stop.clone(), apis[1].clone());
        std::thread::spawn(move || {
            while !stop.load(Ordering::SeqCst) {
                for s in sessions(&api) {
                    if let Some(h) = s["host"].as_str() {
                        owners
                            .lock()
                            .unwrap()
                            .entry(s["id"].as_str().unwrap().to_owned())
                            .or_default()
                            .insert(h.to_owned());
                    }
                }
                std::thread::sleep(Duration::from_millis(100));
            }
        })
    };

    // 30 sessions, created through the three APIs in turn.
    let created: Vec<Value> = (0..30).map(|i| create(&apis[i % 3])).collect();
    let mut on: HashMap<String, Vec<(String, String)>> = HashMap::new();
    for (i, c) in created.iter().enumerate() {
        let id = c["id"].as_str().unwrap();
        let r = wait_for(&apis[(i + 1) % 3], id, "ready");
        assert_eq!(r["state"], "ready", "{r}");
        let host = r["host"].as_str().expect("placed sessions name their host");
        on.entry(host.to_owned())
            .or_default()
            .push((id.to_owned(), c["token"].as_str().unwrap().to_owned()));
    }
    for (h, list) in &on {
        assert!(
            list.len() <= MAX_VMS,
            "{h} runs {} sessions, over --max-vms {MAX_VMS}",
            list.len()
        );
    }
    assert!(on.len() >= 3, "placed on every host: {:?}", on.keys());
    // Every session is a desktop through either gateway.
    for list in on.values() {
        for (id, token) in list {
            for g in &gw_addrs {
                let (_, init) = view(g, &format!("/vnc/{id}"), token);
                assert!(init.width > 0);
            }
        }
    }
    // Viewers open on h1's sessions, then h1 dies.
    let victims = on["h1"].clone();
    let mut viewers: Vec<_> = victims
        .iter()
        .enumerate()
        .map(|(i, (id, token))| view(&gw_addrs[i % 2], &format!("/vnc/{id}"), token).0)
        .collect();
    let killed_at = Instant::now();
    ctls[0].child.kill().unwrap();
    ctls[0].child.wait().unwrap();
    for ws in &mut viewers {
        let (code, reason) = close_of(ws);
        assert_eq!(code, 4006, "{reason}");
    }
    let heard = killed_at.elapsed();
    assert!(
        heard < Duration::from_secs(2 + 6),
        "viewers closed {heard:?} after the kill (lease TTL {LEASE_TTL} s)"
    );
    for (id, _) in &victims {
        let (_, r) = http(&apis[1], "GET", &format!("/api/sessions/{id}"), None);
        assert_eq!(r["state"], "vm_stopped", "{r}");
        assert!(
            r["reason"].as_str().unwrap().starts_with("host lost"),
            "{r}"
        );
        assert!(!route_exists(id), "{id}'s route is still there");
    }
    // Placement goes on, on the survivors, as far as their slots go.
    let on_survivors = 30 - victims.len();
    let free = 2 * MAX_VMS - on_survivors;
    assert!(free >= 3, "{free} free slots");
    for i in 0..free.min(6) {
        let c = create(&apis[1 + i % 2]);
        let r = wait_for(&apis[1 + (i + 1) % 2], c["id"].as_str().unwrap(), "ready");
        assert_eq!(r["state"], "ready", "{r}");
        assert!(matches!(r["host"].as_str(), Some("h2" | "h3")), "{r}");
    }
    // h1 comes back with its stale view: its VMs are not its sessions' any more.
    assert!(vm_dirs(&works[0]) > 0, "the killed host's VMs outlived it");
    ctls[0] = controller(redis, "h1", &works[0]);
    let until = Instant::now() + Duration::from_secs(20);
    while vm_dirs(&works[0]) > 0 && Instant::now() < until {
        std::thread::sleep(Duration::from_millis(100));
    }
    assert_eq!(
        vm_dirs(&works[0]),
        0,
        "the restarted host left its old VMs running"
    );
    // Their routes never come back.
    std::thread::sleep(Duration::from_secs(2));
    for (id, _) in &victims {
        assert!(!route_exists(id), "{id}'s route came back");
        let (_, r) = http(&ctls[0].found, "GET", &format!("/api/sessions/{id}"), None);
        assert_eq!(r["state"], "vm_stopped", "{r}");
    }
    stop.store(true, Ordering::SeqCst);
    watcher.join().unwrap();
    let twice: Vec<_> = owners
        .lock()
        .unwrap()
        .iter()
        .filter(|(_, h)| h.len() > 1)
        .map(|(id, h)| format!("{id}: {h:?}"))
        .collect();
    assert!(twice.is_empty(), "owned twice: {twice:?}");
    assert!(owners.lock().unwrap().len() >= 33);
}

#[test]
fn three_controllers_on_one_redis() {
    let r = vncgate_schema::testing::RedisServer::start();
    scale_out(&r.url(), |id| {
        r.cli(&["EXISTS", &format!("vncgate:route:{id}")]).trim() == "1"
    });
}

#[test]
fn three_controllers_on_a_redis_cluster() {
    let c = vncgate_schema::testing::RedisCluster::start();
    let url = c.url();
    scale_out(&url, |id| {
        let out = Command::new("redis-cli")
            .args(["-c", "-p", url.rsplit(':').next().unwrap(), "EXISTS"])
            .arg(format!("vncgate:route:{id}"))
            .output()
            .unwrap();
        String::from_utf8_lossy(&out.stdout).trim() == "1"
    });
}

/// A TCP proxy the test can cut: while cut, it drops every connection and accepts none
/// (the controller's Redis link is gone, Redis itself is fine).
struct Cuttable {
    addr: std::net::SocketAddr,
    cut: Arc<AtomicBool>,
}

impl Cuttable {
    fn to(target: std::net::SocketAddr) -> Cuttable {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = l.local_addr().unwrap();
        let cut = Arc::new(AtomicBool::new(false));
        let c2 = cut.clone();
        std::thread::spawn(move || {
            for s in l.incoming().flatten() {
                if c2.load(Ordering::SeqCst) {
                    continue;
                }
                let Ok(up) = std::net::TcpStream::connect(target) else {
                    continue;
                };
                for (mut from, mut to) in
                    [(s.try_clone().unwrap(), up.try_clone().unwrap()), (up, s)]
                {
                    let cut = c2.clone();
                    std::thread::spawn(move || {
                        use std::io::{Read as _, Write as _};
                        from.set_read_timeout(Some(Duration::from_millis(100)))
                            .unwrap();
                        let mut buf = [0u8; 16384];
                        loop {
                            if cut.load(Ordering::SeqCst) {
                                let _ = from.shutdown(std::net::Shutdown::Both);
                                let _ = to.shutdown(std::net::Shutdown::Both);
                                return;
                            }
                            match from.read(&mut buf) {
                                Ok(0) => return,
                                Ok(n) => {
                                    if to.write_all(&buf[..n]).is_err() {
                                        return;
                                    }
                                }
                                Err(e)
                                    if matches!(
                                        e.kind(),
                                        std::io::ErrorKind::WouldBlock
                                            | std::io::ErrorKind::TimedOut
                                    ) => {}
                                Err(_) => return,
                            }
                        }
                    });
                }
            }
        });
        Cuttable { addr, cut }
    }
}

/// A controller whose Redis link is cut loses its lease: another marks its session `host
/// lost`, and the cut host's later writes as owner are refused (counted), never landing.
#[test]
fn a_controller_cut_off_from_redis_loses_its_lease_and_its_writes_are_refused() {
    let r = vncgate_schema::testing::RedisServer::start();
    let direct: std::net::SocketAddr = r
        .url()
        .trim_start_matches("redis://")
        .trim_end_matches('/')
        .parse()
        .unwrap();
    let proxy = Cuttable::to(direct);
    let (wa, _) = scratch("cut-a");
    let (wb, _) = scratch("cut-b");
    let _vms = VmsOf(vec![wa.clone(), wb.clone()]);
    // A's VNC server never starts: its session boots on, probing (and writing its probes).
    let mut c = Command::new(CONTROLLER);
    c.args([
        "--listen",
        "127.0.0.1:0",
        "--admin",
        "127.0.0.1:0",
        "--redis",
        &format!("redis://{}", proxy.addr),
        "--host-id",
        "cut",
        "--lease-ttl",
        LEASE_TTL,
        "--boot-timeout",
        "120",
        "--process-vnc",
        "/bin/sleep 600",
        "--work-dir",
    ])
    .arg(&wa);
    let log_a = wa.join("controller.log");
    let a = Proc::start_logging(
        c,
        "vncgate-controller: listening on ",
        Stdio::from(std::fs::File::create(&log_a).unwrap()),
    );
    let admin_a = a
        .before
        .iter()
        .find_map(|l| l.strip_prefix("vncgate-controller: admin on "))
        .expect("an admin line")
        .to_owned();
    let created = create(&a.found);
    let id = created["id"].as_str().unwrap().to_owned();
    let until = Instant::now() + Duration::from_secs(10);
    loop {
        let (_, v) = http(&a.found, "GET", &format!("/api/sessions/{id}"), None);
        if v["state"] == "booting" {
            assert_eq!(v["host"], "cut", "{v}");
            break;
        }
        assert!(Instant::now() < until, "never booting: {v}");
        std::thread::sleep(Duration::from_millis(50));
    }
    let b = controller(&r.url(), "other", &wb);
    proxy.cut.store(true, Ordering::SeqCst);
    // B marks the session once A's lease lapses.
    let end = wait_for(&b.found, &id, "ready");
    assert_eq!(end["state"], "failed", "{end}");
    assert!(
        end["reason"]
            .as_str()
            .unwrap()
            .starts_with("host lost: cut"),
        "{end}"
    );
    let story = end["history"].as_array().unwrap().len();
    // Still cut for a while: A's lease has lapsed by its own clock too, and its boot loop
    // (probing every second at most) tries to write its probes: refused here, before Redis.
    std::thread::sleep(Duration::from_secs(3));
    // The link comes back: A finds its lease gone and stops its VM; none of its writes
    // about the session lands.
    proxy.cut.store(false, Ordering::SeqCst);
    let until = Instant::now() + Duration::from_secs(15);
    let log = || std::fs::read_to_string(&log_a).unwrap_or_default();
    while !log().contains("this host's lease was gone") && Instant::now() < until {
        std::thread::sleep(Duration::from_millis(100));
    }
    assert!(log().contains("this host's lease was gone"), "{}", log());
    let fenced = || {
        let text = vncgate_loadtest::http::request(&admin_a, "GET", "/metrics", "", b"")
            .unwrap()
            .body;
        text.lines()
            .find_map(|l| {
                l.strip_prefix("vncgate_controller_fenced_writes_total{write=\"record\"} ")
            })
            .and_then(|v| v.trim().parse::<f64>().ok())
            .unwrap_or(0.0)
    };
    // Those writes were refused, and counted.
    let until = Instant::now() + Duration::from_secs(10);
    while fenced() < 1.0 && Instant::now() < until {
        std::thread::sleep(Duration::from_millis(100));
    }
    assert!(fenced() >= 1.0, "no refused write counted: {}", log());
    assert!(log().contains("write refused"), "{}", log());
    let (_, now) = http(&b.found, "GET", &format!("/api/sessions/{id}"), None);
    assert_eq!(now["state"], "failed", "{now}");
    assert_eq!(now["history"].as_array().unwrap().len(), story, "{now}");
    assert_eq!(now["reason"], end["reason"]);
    let until = Instant::now() + Duration::from_secs(10);
    while vm_dirs(&wa) > 0 && Instant::now() < until {
        std::thread::sleep(Duration::from_millis(100));
    }
    assert_eq!(vm_dirs(&wa), 0, "the cut host's VM still runs");
}

/// Behind Sentinel, as for the gateway: a controller on a `redis+sentinel://` URL places
/// sessions, and finds the master again after it restarted (its connection dropped, the next
/// command asks the Sentinel), data lost and all: placement goes on.
#[test]
fn a_controller_behind_sentinel_finds_the_master_again() {
    let mut master = vncgate_schema::testing::RedisServer::start();
    let sentinel = vncgate_schema::testing::Sentinel::start(&master);
    let (work, _) = scratch("sentinel");
    let _vms = VmsOf(vec![work.clone()]);
    let c = start_controller_on(
        &sentinel.url(),
        &work,
        &["--host-id", "s1", "--lease-ttl", LEASE_TTL],
    );
    let first = create(&c.found);
    let r = wait_for(&c.found, first["id"].as_str().unwrap(), "ready");
    assert_eq!(
        (r["state"].as_str(), r["host"].as_str()),
        (Some("ready"), Some("s1")),
        "{r}"
    );
    master.restart();
    // The first calls after the restart may fail while the connection is found dead; then
    // a session is placed and ready again.
    let until = Instant::now() + Duration::from_secs(20);
    let id = loop {
        let (st, v) = http(
            &c.found,
            "POST",
            "/api/sessions",
            Some(r#"{"user_id":"u1","provider":"github"}"#),
        );
        if st == 201 {
            break v["id"].as_str().unwrap().to_owned();
        }
        assert!(
            Instant::now() < until,
            "no session created after the restart: {st} {v}"
        );
        std::thread::sleep(Duration::from_millis(200));
    };
    let r = wait_for(&c.found, &id, "ready");
    assert_eq!(r["state"], "ready", "{r}");
}
