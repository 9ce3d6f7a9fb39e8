//! Supervision, against the real binary: a long-running task of the Redis control thread or
//! a worker that dies takes the process down with a non-zero status and a log line naming
//! it, rather than leaving a gateway that half works (no revocation, no lookups, a port
//! whose share of connections nobody serves). The deaths are injected with the test-only
//! `VNCGATE_TEST_PANIC=<task>:<after-ms>` hook.

mod common;

use std::process::Command;
use std::time::Duration;

use common::*;
use vncgate_schema::testing::RedisServer;

/// The status of a gateway whose task died (`EX_SOFTWARE`).
const EXIT_TASK_DIED: i32 = 70;

/// Long enough for the gateway to be up and serving first (the hook counts from the task's
/// start), short enough to keep the tests quick.
const AFTER_MS: u64 = 1500;

/// Starts `vncgate serve` with the hook set to `task`, waits for it to be up, then for it
/// to exit and for its log to hold `line`: (exit status, log).
fn serve_until_death(task: &str, args: &[&str], line: &str) -> (Option<i32>, String) {
    let mut cmd = Command::new(BIN);
    cmd.args([
        "serve",
        "--listen",
        "127.0.0.1:0",
        "--admin",
        "127.0.0.1:0",
        "--allow-upstream",
        "127.0.0.1",
    ])
    .args(args)
    .env("VNCGATE_TEST_PANIC", format!("{task}:{AFTER_MS}"));
    let mut gw = Gw::spawn(&mut cmd).unwrap_or_else(|log| panic!("died before it was up:\n{log}"));
    let code = gw.wait_exit(Duration::from_secs(30));
    // The log reader may still hold the last lines.
    gw.wait_log(line, Duration::from_secs(5));
    (code, gw.log())
}

fn assert_died_loudly(code: Option<i32>, log: &str, who: &str, line: &str, task: &str) {
    assert_eq!(code, Some(EXIT_TASK_DIED), "{log}");
    assert!(
        log.contains("TEST-ONLY fault injection"),
        "the armed hook was not announced:\n{log}"
    );
    let died = log
        .lines()
        .find(|l| l.contains(line))
        .unwrap_or_else(|| panic!("no {line:?} line:\n{log}"));
    assert!(died.contains("ERROR"), "{died}");
    assert!(died.contains(who), "the line does not name {who}: {died}");
    assert!(
        died.contains(&format!("injected panic in {task}")),
        "the line lacks the panic's message: {died}"
    );
    let started = log.find("gateway started").expect("a start line");
    assert!(
        started < log.find(died).unwrap(),
        "the task died before the gateway was up:\n{log}"
    );
}

fn control_task_death(task: &str) {
    let r = RedisServer::start();
    let line = "redis control task panicked; exiting";
    let (code, log) = serve_until_death(task, &["--redis", &r.url(), "--workers", "2"], line);
    assert_died_loudly(code, &log, &format!("task=\"{task}\""), line, task);
}

#[test]
fn a_panic_in_keep_connected_exits_the_gateway() {
    control_task_death("keep_connected");
}

#[test]
fn a_panic_in_follow_events_exits_the_gateway() {
    control_task_death("follow_events");
}

#[test]
fn a_panic_in_recheck_live_sessions_exits_the_gateway() {
    control_task_death("recheck_live_sessions");
}

#[test]
fn a_panic_in_serve_lookups_exits_the_gateway() {
    control_task_death("serve_lookups");
}

/// A worker that panics: the process exits 70 naming it.
#[test]
fn a_panic_in_a_worker_exits_the_gateway() {
    let echo = echo_server();
    let route = format!("s={}", echo.addr);
    let line = "worker panicked; exiting";
    let args = ["--workers", "2", "--route", &route];
    let (code, log) = serve_until_death("worker1", &args, line);
    assert_died_loudly(code, &log, "worker=1", line, "worker1");
}

/// Workers that end in a drain are no failure, and neither is the control thread losing
/// its last worker handle as they go: SIGTERM still exits 0.
fn drain_exits_zero(redis: Option<&RedisServer>) {
    let echo = echo_server();
    let url = redis.map(|r| r.url());
    let mut args = vec!["--drain-timeout", "1"];
    if let Some(u) = &url {
        args.extend(["--redis", u.as_str()]);
    }
    let mut gw = Gw::with_route("auto", "s", echo.addr, &args);
    let mut ws = RawWs::connect(gw.addr, "/vnc/s", "");
    ws.send(&frame(0x82, b"up"));
    assert_eq!(ws.read_data(2), b"up");
    gw.signal(15);
    let (_, close) = ws.until_close();
    assert_eq!(close.and_then(|c| c.close_code()), Some(1001));
    assert_eq!(
        gw.wait_exit(Duration::from_secs(10)),
        Some(0),
        "{}",
        gw.log()
    );
    let log = gw.log();
    assert!(log.contains("all workers drained; exiting"), "{log}");
    assert!(!log.contains("without a drain"), "{log}");
    assert!(!log.contains("task ended"), "{log}");
}

#[test]
fn workers_that_end_in_a_drain_exit_zero() {
    drain_exits_zero(None);
}

#[test]
fn a_gateway_on_redis_that_drains_exits_zero() {
    let r = RedisServer::start();
    drain_exits_zero(Some(&r));
}

#[test]
fn a_misspelt_hook_refuses_to_start() {
    let out = Command::new(BIN)
        .args(["serve", "--listen", "127.0.0.1:0"])
        .env("VNCGATE_TEST_PANIC", "follow_event:10")
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{err}");
    assert!(err.contains("unknown task"), "{err}");
}
