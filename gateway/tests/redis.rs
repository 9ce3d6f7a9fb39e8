//! Routes from a real Redis: the gateway binary with `--redis`, routes written with the
//! `vncgate route` commands, against standalone Redis, a 3-master Cluster and a Sentinel.

mod common;

use std::io::{Read as _, Write as _};
use std::process::Command;
use std::time::{Duration, Instant};

use common::*;
use vncgate_schema::testing::{RedisCluster, RedisServer, Sentinel};

fn add(redis: &str, session: &str, upstream: std::net::SocketAddr, extra: &[&str]) {
    let up = upstream.to_string();
    let mut args = vec![
        "add",
        "--redis",
        redis,
        "--session",
        session,
        "--upstream",
        &up,
        "--allow-upstream",
        "127.0.0.0/8",
    ];
    args.extend_from_slice(extra);
    let (code, out, err) = route(&args);
    assert_eq!(code, 0, "route add failed: {out}{err}");
}

fn del(redis: &str, session: &str, extra: &[&str]) {
    let mut args = vec!["del", "--redis", redis, "--session", session];
    args.extend_from_slice(extra);
    let (code, out, err) = route(&args);
    assert_eq!(code, 0, "route del failed: {out}{err}");
}

fn gateway(redis: &str, extra: &[&str]) -> Gw {
    let mut args = vec!["--redis", redis, "--allow-upstream", "127.0.0.0/8"];
    args.extend_from_slice(extra);
    Gw::start("auto", &args)
}

/// A metric's value from `/metrics` (0 when absent).
fn metric(gw: &Gw, series: &str) -> f64 {
    let (_, body) = gw.admin_get("/metrics");
    body.lines()
        .find_map(|l| l.strip_prefix(series)?.trim().parse().ok())
        .unwrap_or(0.0)
}

/// The status and head of the answer to an upgrade request (not waiting for the end of a
/// 101's stream).
fn status(gw: &Gw, session: &str) -> (u16, String) {
    let mut s = std::net::TcpStream::connect(gw.addr).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    s.write_all(upgrade_request(&format!("/vnc/{session}"), "").as_bytes())
        .unwrap();
    let mut head = Vec::new();
    let mut byte = [0u8; 1];
    while !head.ends_with(b"\r\n\r\n") && matches!(s.read(&mut byte), Ok(1)) {
        head.push(byte[0]);
    }
    let head = String::from_utf8_lossy(&head).into_owned();
    (status_of(&head), head)
}

fn echo_once(ws: &mut RawWs, data: &[u8]) {
    ws.send(&frame(0x82, data));
    assert_eq!(ws.read_data(data.len()), data);
}

/// Waits for the close frame: (code, reason, time it took).
fn close_of(ws: &mut RawWs) -> (Option<u16>, String, Duration) {
    let t = Instant::now();
    let (_, close) = ws.until_close();
    let close = close.expect("a close frame");
    (close.close_code(), close.close_reason(), t.elapsed())
}

#[test]
fn routes_come_from_redis_through_the_worker_cache() {
    let r = RedisServer::start();
    let echo = echo_server();
    add(&r.url(), "s1", echo.addr, &[]);
    let gw = gateway(&r.url(), &["--workers", "1"]);
    for i in 0..3u8 {
        let mut ws = RawWs::connect(gw.addr, "/vnc/s1", "");
        echo_once(&mut ws, &[i; 7]);
    }
    assert_eq!(
        metric(&gw, "vncgate_route_cache_total{result=\"miss\"}"),
        1.0
    );
    assert_eq!(
        metric(&gw, "vncgate_route_cache_total{result=\"hit\"}"),
        2.0
    );
    assert_eq!(metric(&gw, "vncgate_redis_up"), 1.0);
    assert_eq!(gw.admin_get("/readyz").0, 200);
    // Tokens are checked against the stored digest.
    add(&r.url(), "s2", echo.addr, &["--token", "sesame"]);
    assert_eq!(status(&gw, "s2").0, 401);
    assert_eq!(status(&gw, "s2?token=wrong").0, 403);
    let mut ws = RawWs::connect(gw.addr, "/vnc/s2?token=sesame", "");
    echo_once(&mut ws, b"authorized");
}

#[test]
fn a_rewritten_route_reaches_workers_that_cached_it() {
    let r = RedisServer::start();
    let (a, b) = (
        say_and_close(b"AAAA".to_vec()),
        say_and_close(b"BBBB".to_vec()),
    );
    add(&r.url(), "s", a, &[]);
    let gw = gateway(&r.url(), &["--workers", "1", "--route-cache-ttl", "600"]);
    let mut ws = RawWs::connect(gw.addr, "/vnc/s", "");
    assert_eq!(ws.read_data(4), b"AAAA");
    add(&r.url(), "s", b, &[]);
    // The put event drops the cached entry; the next upgrade reads the new route.
    let switched = eventually(Duration::from_secs(2), || {
        let mut ws = RawWs::connect(gw.addr, "/vnc/s", "");
        ws.until_close().0 == b"BBBB"
    });
    assert!(switched, "the cached route was never invalidated");
}

#[test]
fn unknown_sessions_get_404_until_their_route_is_published() {
    let r = RedisServer::start();
    let echo = echo_server();
    let gw = gateway(&r.url(), &["--workers", "1", "--route-negative-ttl", "600"]);
    assert_eq!(status(&gw, "later").0, 404);
    assert_eq!(status(&gw, "later").0, 404);
    assert_eq!(
        metric(&gw, "vncgate_route_cache_total{result=\"negative_hit\"}"),
        1.0
    );
    add(&r.url(), "later", echo.addr, &[]);
    let found = eventually(Duration::from_secs(2), || status(&gw, "later").0 == 101);
    assert!(
        found,
        "a published route stayed hidden behind the negative cache"
    );
}

#[test]
fn deleting_a_route_closes_its_live_sessions_within_a_second() {
    let r = RedisServer::start();
    let echo = echo_server();
    add(&r.url(), "gone", echo.addr, &[]);
    add(&r.url(), "kept", echo.addr, &[]);
    add(&r.url(), "over", echo.addr, &[]);
    let gw = gateway(&r.url(), &["--workers", "2"]);
    let mut sessions: Vec<RawWs> = (0..4)
        .map(|_| RawWs::connect(gw.addr, "/vnc/gone", ""))
        .collect();
    let mut kept = RawWs::connect(gw.addr, "/vnc/kept", "");
    let mut over = RawWs::connect(gw.addr, "/vnc/over", "");
    for ws in &mut sessions {
        echo_once(ws, b"live");
    }
    let t = Instant::now();
    del(&r.url(), "gone", &[]);
    for ws in &mut sessions {
        let (code, reason, _) = close_of(ws);
        assert_eq!(code, Some(4006));
        assert_eq!(reason, "session revoked");
    }
    let took = t.elapsed();
    eprintln!(
        "route del to 4 close frames on 2 workers: {took:?} (the command's own run included)"
    );
    assert!(took < Duration::from_secs(1), "revocation took {took:?}");
    assert_eq!(status(&gw, "gone").0, 404);
    // Other sessions are untouched.
    echo_once(&mut kept, b"still here");
    // A deletion for expiry says so.
    del(&r.url(), "over", &["--reason", "expired"]);
    let (code, reason, _) = close_of(&mut over);
    assert_eq!((code, reason.as_str()), (Some(4005), "session expired"));
    assert!(gw.log().contains("session=gone"), "{}", gw.log());
}

#[test]
fn a_route_deleted_without_an_event_still_ends_its_sessions() {
    let r = RedisServer::start();
    let echo = echo_server();
    add(&r.url(), "quiet", echo.addr, &[]);
    let gw = gateway(&r.url(), &[]);
    let mut ws = RawWs::connect(gw.addr, "/vnc/quiet", "");
    echo_once(&mut ws, b"x");
    // A plain DEL publishes nothing; the periodic check of live sessions finds it.
    r.cli(&["DEL", "vncgate:route:quiet"]);
    let (code, reason, took) = close_of(&mut ws);
    assert_eq!((code, reason.as_str()), (Some(4006), "session revoked"));
    assert!(took < Duration::from_secs(10), "took {took:?}");
}

#[test]
fn an_expiring_route_closes_its_sessions_with_4005() {
    let r = RedisServer::start();
    let echo = echo_server();
    add(&r.url(), "brief", echo.addr, &["--ttl", "2"]);
    let gw = gateway(&r.url(), &[]);
    let mut ws = RawWs::connect(gw.addr, "/vnc/brief", "");
    echo_once(&mut ws, b"before");
    let (code, reason, took) = close_of(&mut ws);
    assert_eq!((code, reason.as_str()), (Some(4005), "session expired"));
    assert!(took <= Duration::from_millis(3500), "expiry took {took:?}");
    // A browser arriving after expiry is told so by name (the key outlives expires_at).
    let mut late = RawWs::connect(gw.addr, "/vnc/brief", "");
    let (code, _, _) = close_of(&mut late);
    assert_eq!(code, Some(4005));
    // Extending a route moves the expiry of live sessions.
    add(&r.url(), "long", echo.addr, &["--ttl", "2"]);
    let mut ws = RawWs::connect(gw.addr, "/vnc/long", "");
    add(&r.url(), "long", echo.addr, &["--ttl", "30"]);
    std::thread::sleep(Duration::from_secs(3));
    echo_once(&mut ws, b"extended");
}

#[test]
fn the_viewer_limit_refuses_the_next_connection_with_4009() {
    let r = RedisServer::start();
    let echo = echo_server();
    add(&r.url(), "one", echo.addr, &["--max-viewers", "1"]);
    add(&r.url(), "dflt", echo.addr, &[]);
    let gw = gateway(&r.url(), &["--max-viewers", "2"]);
    let mut first = RawWs::connect(gw.addr, "/vnc/one", "");
    echo_once(&mut first, b"1");
    let mut second = RawWs::connect(gw.addr, "/vnc/one", "");
    let (code, reason, _) = close_of(&mut second);
    assert_eq!((code, reason.as_str()), (Some(4009), "too many viewers"));
    first.send(&frame(0x88, &1000u16.to_be_bytes()));
    let _ = first.until_close();
    drop(first);
    // The slot comes back once the first session has ended; until then, more refusals.
    let mut refused = 0.0;
    let admitted = eventually(Duration::from_secs(2), || {
        let mut ws = RawWs::connect(gw.addr, "/vnc/one", "");
        ws.send(&frame(0x82, b"?"));
        let f = ws.next_frame();
        refused += f
            .as_ref()
            .map_or(0.0, |f| f64::from(f.close_code() == Some(4009)));
        f.is_some_and(|f| f.opcode == 2)
    });
    assert!(admitted, "the slot was not given back");
    // Routes without the field take --max-viewers (2).
    let mut a = RawWs::connect(gw.addr, "/vnc/dflt", "");
    let mut b = RawWs::connect(gw.addr, "/vnc/dflt", "");
    echo_once(&mut a, b"a");
    echo_once(&mut b, b"b");
    let mut c = RawWs::connect(gw.addr, "/vnc/dflt", "");
    assert_eq!(close_of(&mut c).0, Some(4009));
    drop((c, second));
    let counted = eventually(Duration::from_secs(3), || {
        metric(
            &gw,
            "vncgate_sessions_closed_total{code=\"4009\",cause=\"too_many_viewers\",blame=\"policy\"}",
        ) == 2.0 + refused
    });
    assert!(counted, "refusals are counted by close code");
}

#[test]
fn a_redis_outage_keeps_live_and_cached_sessions_and_heals_by_itself() {
    let mut r = RedisServer::start();
    let echo = echo_server();
    add(&r.url(), "cached", echo.addr, &[]);
    add(&r.url(), "cold", echo.addr, &[]);
    // A lookup deadline far above what "fast" means below, so a 503 that waited it out shows.
    let gw = gateway(
        &r.url(),
        &[
            "--workers",
            "1",
            "--route-cache-ttl",
            "1",
            "--redis-timeout",
            "2",
        ],
    );
    let mut live = RawWs::connect(gw.addr, "/vnc/cached", "");
    echo_once(&mut live, b"before");

    r.kill();
    assert!(
        eventually(Duration::from_secs(5), || gw.admin_get("/readyz").0 == 503),
        "/readyz kept saying ready"
    );
    assert!(gw.admin_get("/readyz").1.contains("redis unavailable"));
    assert_eq!(metric(&gw, "vncgate_redis_up"), 0.0);
    // The live session relays on; the cached route (past its 1 s TTL) still admits.
    echo_once(&mut live, b"during");
    std::thread::sleep(Duration::from_millis(1100));
    let mut again = RawWs::connect(gw.addr, "/vnc/cached", "");
    echo_once(&mut again, b"stale but right");
    assert!(metric(&gw, "vncgate_route_cache_total{result=\"stale\"}") >= 1.0);
    // An uncached session fails fast, before the upgrade.
    let t = Instant::now();
    let (code, resp) = status(&gw, "cold");
    assert_eq!(code, 503, "{resp}");
    assert!(resp.contains("Retry-After"), "{resp}");
    assert!(
        t.elapsed() < Duration::from_millis(400),
        "{:?}",
        t.elapsed()
    );

    r.restart();
    assert!(
        eventually(Duration::from_secs(10), || gw.admin_get("/readyz").0 == 200),
        "the gateway did not reconnect"
    );
    assert_eq!(status(&gw, "cold").0, 101);
    echo_once(&mut live, b"after");
    echo_once(&mut again, b"after too");
    assert!(gw.log().contains("redis unavailable"));
    assert!(gw.log().contains("redis connected"));
}

#[test]
fn a_cluster_serves_two_gateways_from_one_write() {
    let cluster = RedisCluster::start();
    let echo = echo_server();
    let url = cluster.url();
    let gw1 = gateway(&url, &[]);
    let gw2 = gateway(&url, &[]);
    let ids: Vec<String> = (0..6).map(|i| format!("c{i}")).collect();
    for id in &ids {
        add(&url, id, echo.addr, &[]);
    }
    let keys_per_node: Vec<String> = cluster.nodes.iter().map(|n| n.cli(&["DBSIZE"])).collect();
    let mut sessions = Vec::new();
    for id in &ids {
        for gw in [&gw1, &gw2] {
            let mut ws = RawWs::connect(gw.addr, &format!("/vnc/{id}"), "");
            echo_once(&mut ws, id.as_bytes());
            sessions.push(ws);
        }
    }
    let (code, out, _) = route(&["list", "--redis", &url, "--json"]);
    assert_eq!(code, 0);
    assert_eq!(out.lines().count(), ids.len(), "{out}");
    // Revocation reaches both gateways, whichever node they subscribed to.
    del(&url, "c0", &[]);
    for ws in sessions.iter_mut().take(2) {
        assert_eq!(close_of(ws).0, Some(4006));
    }
    echo_once(&mut sessions[2], b"others live on");
    assert!(
        keys_per_node.iter().filter(|n| n.trim() != "0").count() >= 2,
        "routes should spread over the masters: {keys_per_node:?}"
    );
}

#[test]
fn a_sentinel_url_follows_the_master() {
    let master = RedisServer::start();
    let sentinel = Sentinel::start(&master);
    let echo = echo_server();
    add(&sentinel.url(), "viasentinel", echo.addr, &[]);
    assert!(
        master
            .cli(&["EXISTS", "vncgate:route:viasentinel"])
            .contains('1')
    );
    let gw = gateway(&sentinel.url(), &[]);
    let mut ws = RawWs::connect(gw.addr, "/vnc/viasentinel", "");
    echo_once(&mut ws, b"sentinel");
    del(&sentinel.url(), "viasentinel", &[]);
    assert_eq!(close_of(&mut ws).0, Some(4006));
}

#[test]
fn unusable_records_are_refused_by_name() {
    let r = RedisServer::start();
    let gw = gateway(&r.url(), &[]);
    r.cli(&[
        "HSET",
        "vncgate:route:bad",
        "v",
        "1",
        "upstream",
        "vm-7:6080",
        "created_at",
        "1",
    ]);
    r.cli(&[
        "HSET",
        "vncgate:route:future",
        "v",
        "9",
        "upstream",
        "127.0.0.1:1",
        "created_at",
        "1",
    ]);
    let (code, resp) = status(&gw, "bad");
    assert_eq!(code, 503, "{resp}");
    assert!(resp.starts_with("HTTP/1.1 503"), "{resp}");
    assert_eq!(status(&gw, "future").0, 503);
    assert_eq!(
        metric(
            &gw,
            "vncgate_route_records_invalid_total{error=\"invalid_field\"}"
        ),
        1.0
    );
    assert_eq!(
        metric(
            &gw,
            "vncgate_route_records_invalid_total{error=\"newer_version\"}"
        ),
        1.0
    );
    assert!(gw.log().contains("session=bad"));
    // A route outside the gateway's CIDRs is never dialed, whoever wrote it.
    let (code, _, err) = route(&[
        "add",
        "--redis",
        &r.url(),
        "--session",
        "far",
        "--upstream",
        "10.9.9.9:6080",
    ]);
    assert_eq!(code, 0, "{err}");
    assert!(err.contains("not checked"), "{err}");
    let mut ws = RawWs::connect(gw.addr, "/vnc/far", "");
    assert_eq!(close_of(&mut ws).0, Some(4010));
}

#[test]
fn route_commands_fail_clearly() {
    let r = RedisServer::start();
    let closed = format!("redis://{}", closed_port());
    let cases: [(&[&str], i32, &str); 7] = [
        (
            &[
                "add",
                "--redis",
                "localhost:6379",
                "--session",
                "a",
                "--upstream",
                "127.0.0.1:1",
            ],
            2,
            "not a Redis URL",
        ),
        (
            &[
                "add",
                "--redis",
                &closed,
                "--session",
                "a",
                "--upstream",
                "127.0.0.1:1",
            ],
            2,
            "cannot reach Redis",
        ),
        (
            &[
                "add",
                "--redis",
                &r.url(),
                "--session",
                "a",
                "--upstream",
                "10.1.2.3:6080",
                "--allow-upstream",
                "192.168.0.0/16",
            ],
            2,
            "outside the allowed CIDRs",
        ),
        (
            &[
                "add",
                "--redis",
                &r.url(),
                "--session",
                "a/b",
                "--upstream",
                "127.0.0.1:1",
            ],
            2,
            "--session",
        ),
        (
            &[
                "add",
                "--redis",
                &r.url(),
                "--session",
                "a",
                "--upstream",
                "0.0.0.0:5900",
            ],
            2,
            "not a unicast address",
        ),
        (
            &["del", "--redis", &r.url(), "--session", "nosuch"],
            1,
            "no route",
        ),
        (&["list", "--redis", &closed], 2, "cannot reach Redis"),
    ];
    for (args, want, says) in cases {
        let (code, out, err) = route(args);
        assert_eq!(code, want, "{args:?}: {out}{err}");
        assert!(err.contains(says), "{args:?}: {err}");
    }
    // Nothing was written by the refused commands.
    assert!(!r.cli(&["KEYS", "*"]).contains("vncgate:route:a"));
    // And serve refuses a bad URL at start.
    let e = Gw::spawn(Command::new(BIN).args([
        "serve",
        "--listen",
        "127.0.0.1:0",
        "--admin",
        "127.0.0.1:0",
        "--redis",
        "rediss://h:1",
    ]))
    .err()
    .expect("serve must refuse the URL");
    assert!(e.contains("TLS"), "{e}");
}

#[test]
fn a_hung_redis_is_noticed_and_outlived() {
    // Redis accepts connections but answers nothing (CLIENT PAUSE): the pings notice, the
    // gateway fails uncached lookups fast and recovers when Redis answers again.
    let r = RedisServer::start();
    let echo = echo_server();
    add(&r.url(), "warm", echo.addr, &[]);
    add(&r.url(), "cold", echo.addr, &[]);
    let gw = gateway(&r.url(), &["--workers", "1", "--redis-timeout", "0.3"]);
    let mut live = RawWs::connect(gw.addr, "/vnc/warm", "");
    echo_once(&mut live, b"before");
    r.cli(&["CLIENT", "PAUSE", "5000", "ALL"]);
    assert!(
        eventually(Duration::from_secs(4), || gw.admin_get("/readyz").0 == 503),
        "a hung redis went unnoticed"
    );
    let resp = http_exchange(gw.addr, upgrade_request("/vnc/cold", "").as_bytes());
    assert_eq!(status_of(&resp), 503, "{resp}");
    assert!(resp.ends_with("\r\n\r\nredis unavailable\n"), "{resp}");
    let mut cached = RawWs::connect(gw.addr, "/vnc/warm", "");
    echo_once(&mut cached, b"cached");
    echo_once(&mut live, b"during");
    assert!(
        eventually(Duration::from_secs(15), || gw.admin_get("/readyz").0 == 200),
        "no recovery after the pause"
    );
    assert_eq!(status(&gw, "cold").0, 101);
    assert!(gw.log().contains("stopped answering PING") || gw.log().contains("subscribed"));
}
