//! A Redis outage under live sessions on several workers: every reconnect of a session the
//! gateway has served is admitted by whichever worker the kernel hands it to (the
//! process-wide last-known routes), while a route revoked before the outage stays revoked.

mod common;

use std::net::SocketAddr;
use std::time::Duration;

use common::*;
use vncgate_schema::testing::RedisServer;

const WORKERS: usize = 4;
const SESSIONS: usize = 4;
const RECONNECTS: usize = 8;

/// Runs `vncgate route ...`, which must succeed.
fn route_ok(args: &[&str]) {
    let (code, out, err) = route(args);
    assert_eq!(code, 0, "vncgate route {args:?}: {out}{err}");
}

fn add(redis: &str, session: &str, upstream: SocketAddr) {
    let up = upstream.to_string();
    route_ok(&[
        "add",
        "--redis",
        redis,
        "--session",
        session,
        "--upstream",
        &up,
        "--allow-upstream",
        "127.0.0.0/8",
    ]);
}

fn fakevm() -> SocketAddr {
    vncgate_loadtest::fakevm::spawn_background(vncgate_loadtest::fakevm::Config {
        width: 32,
        height: 24,
        ..Default::default()
    })
    .unwrap()
}

/// An RFB exchange through the gateway, both ways: the VM's version banner, the client's
/// version, the VM's security types.
fn rfb_flows(ws: &mut RawWs) {
    assert_eq!(ws.read_data(12), b"RFB 003.008\n");
    ws.send(&frame(0x82, b"RFB 003.008\n"));
    // The count and the types may come in one message or several.
    let mut types = ws.read_data(1);
    while types.len() < 1 + types[0] as usize {
        types.extend(ws.read_data(1));
    }
    assert!(types[0] > 0 && types[1..].contains(&1), "{types:?}");
}

fn metric(gw: &Gw, series: &str) -> f64 {
    let (_, body) = gw.admin_get("/metrics");
    body.lines()
        .find_map(|l| l.strip_prefix(series)?.trim().parse().ok())
        .unwrap_or(0.0)
}

#[test]
fn reconnects_on_any_worker_are_admitted_while_redis_is_down() {
    let mut r = RedisServer::start();
    let url = r.url();
    let ids: Vec<String> = (0..SESSIONS).map(|i| format!("live{i}")).collect();
    for id in &ids {
        add(&url, id, fakevm());
    }
    add(&url, "revoked", fakevm());
    let workers = WORKERS.to_string();
    let gw = Gw::start(
        "auto",
        &[
            "--redis",
            &url,
            "--allow-upstream",
            "127.0.0.0/8",
            "--workers",
            &workers,
        ],
    );
    let mut live: Vec<RawWs> = ids
        .iter()
        .map(|id| {
            let mut ws = RawWs::connect(gw.addr, &format!("/vnc/{id}"), "");
            rfb_flows(&mut ws);
            ws
        })
        .collect();
    // Revoked before the outage: its session is closed by the revocation...
    let mut doomed = RawWs::connect(gw.addr, "/vnc/revoked", "");
    rfb_flows(&mut doomed);
    route_ok(&["del", "--redis", &url, "--session", "revoked"]);
    let (_, close) = doomed.until_close();
    assert_eq!(close.and_then(|c| c.close_code()), Some(4006));

    r.kill();
    assert!(
        eventually(Duration::from_secs(10), || gw.admin_get("/readyz").0 == 503),
        "the gateway never noticed that redis is gone"
    );
    let cache = |result: &str| {
        metric(
            &gw,
            &format!("vncgate_route_cache_total{{result=\"{result}\"}}"),
        )
    };
    let (hit, stale, unavailable) = (cache("hit"), cache("stale"), cache("unavailable"));
    for (id, ws) in ids.iter().zip(&mut live) {
        for attempt in 0..RECONNECTS {
            // RawWs::connect fails the test on anything but 101 (a 503 "redis unavailable"
            // from a worker that never saw the route).
            let mut again = RawWs::connect(gw.addr, &format!("/vnc/{id}"), "");
            rfb_flows(&mut again);
            eprintln!("{id}: reconnect {attempt} admitted");
        }
        // The first connection relays on through the outage: security type None, and the
        // VM's SecurityResult "ok".
        ws.send(&frame(0x82, &[1]));
        assert_eq!(ws.read_data(4), [0, 0, 0, 0]);
    }
    // The worker that looked a route up answers from its own cache; every other one from
    // the last-known copy. With four workers, some reconnects land elsewhere.
    let (hit, stale) = (cache("hit") - hit, cache("stale") - stale);
    eprintln!("reconnects answered by the worker's cache: {hit}, by the last-known copy: {stale}");
    assert_eq!((hit + stale) as usize, SESSIONS * RECONNECTS);
    assert!(stale > 0.0, "no reconnect landed on another worker");
    assert_eq!(cache("unavailable"), unavailable);
    // ...and nothing admits it during the outage.
    let resp = http_exchange(gw.addr, upgrade_request("/vnc/revoked", "").as_bytes());
    assert_eq!(status_of(&resp), 503, "{resp}");
    assert!(resp.contains("redis"), "{resp}");
    assert_eq!(cache("unavailable"), unavailable + 1.0);
}
