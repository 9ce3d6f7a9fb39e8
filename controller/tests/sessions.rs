//! The controller end to end, with a real Redis, the `process` backend (the synthetic
//! desktop and `vncgate-agent` as real processes) and a real `vncgate serve` gateway on the
//! same Redis: create, wait for ready, view through the gateway with the viewer token to
//! ServerInit, delete and see the viewer closed with 4006; the seed's failure (a VM whose VNC
//! server never starts) with Redis watched the whole time; a VNC server that dies under a
//! live viewer.

mod common;

use std::io::{Read as _, Write as _};
use std::net::TcpStream;
use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use common::*;
use serde_json::Value;
use vncgate_schema::testing::RedisServer;

struct Setup {
    redis: RedisServer,
    controller: Proc,
    gateway: Proc,
    work: PathBuf,
}

impl Setup {
    fn new(extra: &[&str]) -> Setup {
        let redis = RedisServer::start();
        let (work, _) = scratch("test");
        let controller = start_controller(&redis, &work, extra);
        let gateway = start_gateway(&redis);
        Setup {
            redis,
            controller,
            gateway,
            work,
        }
    }

    /// Whether Redis holds a route for `id`.
    fn route_exists(&self, id: &str) -> bool {
        self.redis
            .cli(&["EXISTS", &format!("vncgate:route:{id}")])
            .trim()
            == "1"
    }

    /// Everything the controllers of this test logged.
    fn log(&self) -> String {
        std::fs::read_to_string(self.work.join("controller.log")).unwrap_or_default()
    }

    fn api(&self) -> &str {
        &self.controller.found
    }

    /// `host:port` of the gateway.
    fn gateway(&self) -> &str {
        self.gateway.found.split('/').next().unwrap()
    }
}

impl Drop for Setup {
    /// The VMs outlive a stopped controller by design (the next one adopts them): end the
    /// ones this test started, by the pids their session records name, each checked to be
    /// this test's (its command line names the session or this test's work directory).
    fn drop(&mut self) {
        self.kill_vms();
        let _ = std::fs::remove_dir_all(&self.work);
    }
}

impl Setup {
    fn kill_vms(&self) {
        let work = self.work.display().to_string();
        let keys = self
            .redis
            .cli(&["--scan", "--pattern", "vncgate:session:*"]);
        for key in keys.split_whitespace() {
            let Ok(rec) = serde_json::from_str::<Value>(&self.redis.cli(&["GET", key])) else {
                continue;
            };
            let id = rec["id"].as_str().unwrap_or("-").to_owned();
            for p in ["vnc", "agent"] {
                let Some(pid) = rec["vm"][p]["pid"].as_u64().filter(|&p| p > 1) else {
                    continue;
                };
                let cmdline = std::fs::read(format!("/proc/{pid}/cmdline")).unwrap_or_default();
                let cmdline = String::from_utf8_lossy(&cmdline);
                if cmdline.contains(&id) || cmdline.contains(&work) {
                    let _ = Command::new("kill").args(["-9", &pid.to_string()]).status();
                }
            }
        }
    }
}

#[test]
fn create_ready_view_through_the_gateway_delete_closes_4006() {
    let s = Setup::new(&[]);
    let created = create(s.api());
    let id = created["id"].as_str().unwrap().to_owned();
    let token = created["token"].as_str().unwrap().to_owned();
    assert_eq!(created["ws_path"], format!("/vnc/{id}"));
    assert_eq!(created["state"], "pending");

    let ready = wait_for(s.api(), &id, "ready");
    assert_eq!(ready["state"], "ready", "{ready}");
    assert!(ready.get("token").is_none(), "the token is returned once");
    let states: Vec<&str> = ready["history"]
        .as_array()
        .unwrap()
        .iter()
        .map(|t| t["state"].as_str().unwrap())
        .collect();
    assert_eq!(states, ["pending", "booting", "ready"]);
    assert_eq!(ready["probes"]["agent"]["healthy"], true);
    assert_eq!(ready["probes"]["vnc"]["probe"]["status"], "desktop");
    assert_eq!(ready["probes"]["vnc"]["probe"]["desktop"]["width"], 1024);
    // The agent reported its identity; the process backend's "VM" is the host, so it
    // changed nothing, and says so.
    assert_eq!(ready["identity"]["applied"], false, "{ready}");
    assert_eq!(ready["identity"]["rng_reseeded"], false);
    assert_eq!(ready["identity"]["errors"], serde_json::json!([]));

    // Redis holds the token's digest only, never the token.
    let dump = s
        .redis
        .cli(&["GET", &format!("vncgate:session:{{vncgate:route:{id}}}")]);
    assert!(!dump.contains(&token), "the token is in the session record");
    let route = s.redis.cli(&["HGETALL", &format!("vncgate:route:{id}")]);
    assert!(
        !route.contains(&token) && route.contains("vncgate-controller"),
        "{route}"
    );

    // A viewer through the gateway reaches the desktop; a wrong token does not.
    let (mut ws, init) = view(s.gateway(), &format!("/vnc/{id}"), &token);
    assert_eq!((init.width, init.height), (1024, 768));
    let bad = tungstenite::client(
        format!("ws://{}/vnc/{id}?token=wrong", s.gateway()).as_str(),
        TcpStream::connect(s.gateway()).unwrap(),
    );
    assert!(bad.is_err(), "a wrong token was upgraded");

    // Listing finds it by state and by user.
    let (_, l) = http(s.api(), "GET", "/api/sessions?state=ready&user_id=u1", None);
    assert!(
        l["sessions"]
            .as_array()
            .unwrap()
            .iter()
            .any(|v| v["id"] == id.as_str())
    );

    let (st, del) = http(s.api(), "DELETE", &format!("/api/sessions/{id}"), None);
    assert_eq!(st, 202, "{del}");
    assert_eq!(del["state"], "deleted");
    let (code, reason) = close_of(&mut ws);
    assert_eq!((code, reason.as_str()), (4006, "session revoked"));
    assert!(!s.route_exists(&id), "the route is still there");
}

/// The in-memory store (one host): sessions beyond `--max-vms` wait in a line, with their
/// positions in the API, and take freed slots in order.
#[test]
fn beyond_max_vms_sessions_wait_in_line_then_take_a_freed_slot_or_fail_with_capacity() {
    let (work, _) = scratch("line");
    let _vms = common::VmsOf(vec![work.clone()]);
    let mut c = Command::new(CONTROLLER);
    c.args([
        "--listen",
        "127.0.0.1:0",
        "--max-vms",
        "1",
        "--placement-timeout",
        "6",
        "--host-id",
        "host-a",
        "--work-dir",
    ])
    .arg(&work);
    let log = std::fs::File::create(work.join("controller.log")).unwrap();
    let ctl = Proc::start_logging(c, "vncgate-controller: listening on ", Stdio::from(log));
    let api = ctl.found.as_str();
    let a = create(api);
    let a_id = a["id"].as_str().unwrap().to_owned();
    assert_eq!(wait_for(api, &a_id, "ready")["state"], "ready");
    let b = create(api);
    let c = create(api);
    let (b_id, c_id) = (b["id"].as_str().unwrap(), c["id"].as_str().unwrap());
    // Both wait in pending, in the order they came, with their places in line.
    let get = |id: &str| http(api, "GET", &format!("/api/sessions/{id}"), None).1;
    let until = Instant::now() + Duration::from_secs(5);
    while get(c_id)["queue_position"] != 2 && Instant::now() < until {
        std::thread::sleep(Duration::from_millis(20));
    }
    let (bv, cv) = (get(b_id), get(c_id));
    assert_eq!(
        (bv["state"].as_str(), bv["queue_position"].as_u64()),
        (Some("pending"), Some(1)),
        "{bv}"
    );
    assert_eq!(
        (cv["state"].as_str(), cv["queue_position"].as_u64()),
        (Some("pending"), Some(2)),
        "{cv}"
    );
    // Placed on this host, and named by its --host-id.
    assert_eq!(
        (bv["host"].as_str(), cv["host"].as_str()),
        (Some("host-a"), Some("host-a"))
    );
    // A's end frees its slot: B boots in it, C moves up and then fails by name.
    let (st, _) = http(api, "DELETE", &format!("/api/sessions/{a_id}"), None);
    assert_eq!(st, 202);
    assert_eq!(wait_for(api, b_id, "ready")["state"], "ready");
    let end = wait_for(api, c_id, "ready");
    assert_eq!(end["state"], "failed", "{end}");
    let reason = end["reason"].as_str().unwrap();
    assert!(reason.starts_with("capacity: no VM slot"), "{reason}");
    assert!(reason.contains("--max-vms 1"), "{reason}");
    assert!(end.get("queue_position").is_none(), "{end}");
}

/// On Redis, placement is by pull: a full host reads no request, so sessions beyond its
/// `--max-vms` stay `pending` with no host; a freed slot takes the next request, and one
/// nobody takes fails with reason `capacity` after the placement timeout.
#[test]
fn on_redis_a_full_host_takes_no_request_and_unplaced_sessions_fail_with_capacity() {
    let s = Setup::new(&[
        "--max-vms",
        "1",
        "--placement-timeout",
        "6",
        "--host-id",
        "host-a",
    ]);
    let a = create(s.api());
    let a_id = a["id"].as_str().unwrap().to_owned();
    let ready = wait_for(s.api(), &a_id, "ready");
    assert_eq!(
        (ready["state"].as_str(), ready["host"].as_str()),
        (Some("ready"), Some("host-a"))
    );
    let b = create(s.api());
    let b_id = b["id"].as_str().unwrap().to_owned();
    let get = |id: &str| http(s.api(), "GET", &format!("/api/sessions/{id}"), None).1;
    // Not taken while the host is full (well past a poll of the stream).
    std::thread::sleep(Duration::from_millis(800));
    let bv = get(&b_id);
    assert_eq!(bv["state"], "pending", "{bv}");
    assert!(bv.get("host").is_none(), "not placed yet: {bv}");
    // A's end frees the slot: B is placed here and boots.
    let (st, _) = http(s.api(), "DELETE", &format!("/api/sessions/{a_id}"), None);
    assert_eq!(st, 202);
    let bv = wait_for(s.api(), &b_id, "ready");
    assert_eq!(
        (bv["state"].as_str(), bv["host"].as_str()),
        (Some("ready"), Some("host-a")),
        "{bv}"
    );
    // C finds the host full for good: it fails by name.
    let c = create(s.api());
    let c_id = c["id"].as_str().unwrap();
    let end = wait_for(s.api(), c_id, "ready");
    assert_eq!(end["state"], "failed", "{end}");
    let reason = end["reason"].as_str().unwrap();
    assert!(
        reason.starts_with("capacity: no host had a free VM slot within 6 s"),
        "{reason}"
    );
}

#[test]
fn the_seeds_failure_a_vnc_server_that_never_starts() {
    let s = Setup::new(&["--process-vnc", "/bin/sleep 600", "--boot-timeout", "3"]);
    let watched = s.redis.monitor();
    let created = create(s.api());
    let id = created["id"].as_str().unwrap().to_owned();
    let end = wait_for(s.api(), &id, "ready");
    assert_eq!(end["state"], "failed", "{end}");
    let reason = end["reason"].as_str().unwrap();
    assert!(reason.starts_with("vnc port 127.0.0.1:"), "{reason}");
    assert!(
        reason.contains("refused") && reason.contains("agent healthy"),
        "{reason}"
    );
    // The probe history says the same: agent up, VNC port refused.
    assert_eq!(end["probes"]["agent"]["healthy"], true);
    assert_eq!(end["probes"]["vnc"]["probe"]["status"], "refused");
    // No route was ever written for it, over the whole run.
    let key = format!("vncgate:route:{id}");
    let wrote = route_writes(&watched, &key);
    assert!(wrote.is_empty(), "route commands: {wrote:?}");
    assert!(!watched.seen().is_empty(), "MONITOR saw nothing");
}

#[test]
fn a_vnc_server_that_dies_under_a_live_viewer() {
    let s = Setup::new(&[]);
    let created = create(s.api());
    let id = created["id"].as_str().unwrap().to_owned();
    let token = created["token"].as_str().unwrap().to_owned();
    let ready = wait_for(s.api(), &id, "ready");
    assert_eq!(ready["state"], "ready");
    let (mut ws, _) = view(s.gateway(), &format!("/vnc/{id}"), &token);
    // Kill the VNC server only (the agent lives on): the seed's 8080-up, 6080-down state.
    let pid = std::fs::read_dir(&s.work)
        .unwrap()
        .flatten()
        .find(|e| e.file_name().to_string_lossy() == id)
        .map(|_| ())
        .and_then(|()| {
            let out = Command::new("pgrep")
                .args(["-f", &format!("fakevm .*vncgate session {id}")])
                .output()
                .ok()?;
            String::from_utf8(out.stdout)
                .ok()?
                .split_whitespace()
                .next()?
                .parse::<i32>()
                .ok()
        })
        .expect("the session's VNC server");
    Command::new("kill")
        .args(["-9", &pid.to_string()])
        .status()
        .unwrap();
    let (code, _) = close_of(&mut ws);
    assert!((4000..5000).contains(&code), "closed with {code}");
    let end = wait_for(s.api(), &id, "vm_stopped");
    assert_eq!(end["state"], "vm_stopped", "{end}");
    let reason = end["reason"].as_str().unwrap();
    assert!(
        reason.contains("vnc port") || reason.contains("not running"),
        "{reason}"
    );
    assert!(!s.route_exists(&id), "the route is still there");
}

#[test]
fn bad_requests_get_json_errors_not_500s() {
    let s = Setup::new(&[]);
    let cases: &[(&str, &str, Option<&str>, u16)] = &[
        ("POST", "/api/sessions", Some("{"), 400),
        ("POST", "/api/sessions", Some(r#"{"user_id":"u"}"#), 400),
        (
            "POST",
            "/api/sessions",
            Some(r#"{"user_id":"u","provider":"p","ttl_secs":0}"#),
            400,
        ),
        (
            "POST",
            "/api/sessions",
            Some(r#"{"user_id":"","provider":"p"}"#),
            400,
        ),
        (
            "POST",
            "/api/sessions",
            Some(r#"{"user_id":"u","provider":"p","extra":1}"#),
            400,
        ),
        ("GET", "/api/sessions/nope", None, 404),
        ("GET", "/api/sessions/a%20b", None, 404),
        ("DELETE", "/api/sessions/nope", None, 404),
        ("GET", "/api/sessions?state=done", None, 400),
        ("GET", "/api/sessions/nope/wait?timeout=9999", None, 400),
        ("GET", "/api/nothing", None, 404),
    ];
    for (m, p, b, want) in cases {
        let (st, v) = http(s.api(), m, p, *b);
        assert_eq!(st, *want, "{m} {p} {b:?}: {v}");
        assert!(
            v["error"].is_string() && v["reason"].is_string(),
            "{m} {p}: {v}"
        );
    }
    // Not JSON at all: 415.
    let addr = s.api().trim_start_matches("http://");
    let mut c = TcpStream::connect(addr).unwrap();
    write!(c, "POST /api/sessions HTTP/1.1\r\nHost: x\r\nContent-Type: text/plain\r\nContent-Length: 2\r\nConnection: close\r\n\r\nhi").unwrap();
    let mut resp = String::new();
    c.read_to_string(&mut resp).unwrap();
    assert!(resp.starts_with("HTTP/1.1 415"), "{resp}");
    // An idempotent create returns the first session (without its token) and no second VM.
    let body = r#"{"user_id":"u1","provider":"github"}"#;
    let idem = |key: &str| {
        let mut c = TcpStream::connect(addr).unwrap();
        write!(c, "POST /api/sessions HTTP/1.1\r\nHost: x\r\nIdempotency-Key: {key}\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}", body.len()).unwrap();
        let mut resp = String::new();
        c.read_to_string(&mut resp).unwrap();
        let status: u16 = resp[9..12].parse().unwrap();
        let v: Value = serde_json::from_str(resp.split_once("\r\n\r\n").unwrap().1).unwrap();
        (status, v)
    };
    let (a_st, a) = idem("retry-1");
    let (b_st, b) = idem("retry-1");
    assert_eq!((a_st, b_st), (201, 200));
    assert_eq!(a["id"], b["id"]);
    assert!(a["token"].is_string() && b.get("token").is_none());
    let (_, l) = http(s.api(), "GET", "/api/sessions", None);
    assert_eq!(l["sessions"].as_array().unwrap().len(), 1);
}

#[test]
fn a_controller_killed_mid_session_adopts_its_vm_and_marks_the_lost_one() {
    let mut s = Setup::new(&[]);
    let live = create(s.api());
    let doomed = create(s.api());
    let mut ids = Vec::new();
    for c in [&live, &doomed] {
        let id = c["id"].as_str().unwrap().to_owned();
        let r = wait_for(s.api(), &id, "ready");
        assert_eq!(r["state"], "ready", "{r}");
        ids.push(id);
    }
    // SIGKILL: no goodbye. While it is down, the second session's VNC server dies.
    let _ = s.controller.child.kill();
    let _ = s.controller.child.wait();
    let out = Command::new("pgrep")
        .args(["-f", &format!("fakevm .*vncgate session {}", ids[1])])
        .output()
        .unwrap();
    let pid = String::from_utf8(out.stdout).unwrap();
    let pid = pid
        .split_whitespace()
        .next()
        .expect("the second VNC server");
    Command::new("kill").args(["-9", pid]).status().unwrap();
    // A new controller on the same Redis and work directory.
    let mut c = Command::new(CONTROLLER);
    c.args([
        "--listen",
        "127.0.0.1:0",
        "--redis",
        &s.redis.url(),
        "--work-dir",
    ])
    .arg(&s.work);
    s.controller = Proc::start(c, "vncgate-controller: listening on ");
    // The live one stays ready and viewable through the gateway.
    let (_, r) = http(s.api(), "GET", &format!("/api/sessions/{}", ids[0]), None);
    assert_eq!(r["state"], "ready", "{r}");
    let token = live["token"].as_str().unwrap();
    let (_, init) = view(s.gateway(), &format!("/vnc/{}", ids[0]), token);
    assert_eq!(init.width, 1024);
    // The other is found and marked.
    let r = wait_for(s.api(), &ids[1], "vm_stopped");
    assert_eq!(r["state"], "vm_stopped", "{r}");
    assert!(r["reason"].as_str().unwrap().contains("vnc port"), "{r}");
}

/// A file under the test's work directory holding `content`; its path.
fn file(work: &std::path::Path, name: &str, content: &str) -> String {
    let p = work.join(name);
    std::fs::write(&p, content).unwrap();
    p.display().to_string()
}

fn key_file(work: &std::path::Path, name: &str, byte: u8) -> String {
    file(work, name, &format!("{byte:02x}").repeat(32))
}

/// The agent token the controller handed this session's VM (only its VM has it).
fn agent_token(work: &std::path::Path, id: &str) -> String {
    let p = work.join(id).join("vm-data.json");
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        if let Ok(b) = std::fs::read(&p)
            && let Ok(v) = serde_json::from_slice::<Value>(&b)
        {
            return v["agent_token"].as_str().unwrap().to_owned();
        }
        assert!(Instant::now() < deadline, "no vm-data.json for {id}");
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// A request with header lines `head` (the request line, then headers); (status, JSON).
fn request(base: &str, head: &str, body: &[u8]) -> (u16, Value) {
    let (line, headers) = head.split_once("\r\n").unwrap_or((head, ""));
    let mut parts = line.split(' ');
    let (method, path) = (parts.next().unwrap(), parts.next().unwrap());
    let headers = if headers.is_empty() {
        String::new()
    } else {
        format!("{headers}\r\n")
    };
    let r = vncgate_loadtest::http::request(base, method, path, &headers, body).unwrap();
    (r.status, r.json())
}

fn store(api: &str, token: Option<&str>, ctype: &str, body: &str) -> (u16, Value) {
    let auth = token.map_or(String::new(), |t| format!("\r\nAuthorization: Bearer {t}"));
    request(
        api,
        &format!("POST /api/auth/credentials/store HTTP/1.1\r\nContent-Type: {ctype}{auth}"),
        body.as_bytes(),
    )
}

fn store_body(id: &str, secret: &str) -> String {
    format!(
        r#"{{"sessionId":"{id}","provider":"github","credentials":{{"username":"u1","password":"{secret}"}}}}"#
    )
}

/// Every value in Redis, dumped: strings, hashes, sorted sets, and DUMP of each key.
fn redis_everything(r: &RedisServer) -> String {
    let mut all = String::new();
    for key in r.cli(&["--scan"]).split_whitespace() {
        all.push_str(key);
        for cmd in [
            &["GET", key][..],
            &["HGETALL", key],
            &["ZRANGE", key, "0", "-1"],
            &["DUMP", key],
        ] {
            all.push_str(&r.cli(cmd));
        }
    }
    all
}

#[test]
fn the_agent_stores_credentials_sealed_and_the_session_completes() {
    let work = std::env::temp_dir().join(format!("vncgate-ctl-keys-{}", std::process::id()));
    std::fs::create_dir_all(&work).unwrap();
    let k1 = format!("k1={}", key_file(&work, "k1", 1));
    let admin = file(&work, "admin", "admin-token-0123456789");
    let s = Setup::new(&["--credentials-key", &k1, "--admin-token-file", &admin]);
    let created = create(s.api());
    let id = created["id"].as_str().unwrap().to_owned();
    let r = wait_for(s.api(), &id, "ready");
    assert_eq!(r["state"], "ready", "{r}");
    let token = created["token"].as_str().unwrap().to_owned();
    let (mut viewer, _) = view(s.gateway(), &format!("/vnc/{id}"), &token);
    let agent = agent_token(&s.work, &id);

    // The login inside the VM writes its credentials; the agent posts them.
    let secret = format!("hunter2-{}", std::process::id());
    std::fs::write(
        s.work.join(&id).join("credentials.json"),
        format!(r#"{{"username":"u1","password":"{secret}"}}"#),
    )
    .unwrap();
    let done = wait_for(s.api(), &id, "completed");
    assert_eq!(done["state"], "completed", "{done}");
    // Completion withdraws the route: the viewer is told by name.
    assert_eq!(close_of(&mut viewer).0, 4006);

    // The plaintext is nowhere in Redis, nor in the controller's log; the sealed record is.
    let everything = redis_everything(&s.redis);
    assert!(everything.contains(&format!("vncgate:credentials:{{vncgate:route:{id}}}")));
    assert!(!everything.contains(&secret), "plaintext in Redis");
    assert!(!everything.contains("hunter2"), "plaintext in Redis");
    assert!(!s.log().contains(&secret), "plaintext in the log");
    assert!(!s.log().contains(&token), "viewer token in the log");

    // The platform reads it back with the admin token, and may delete it on read.
    let get = |auth: &str, q: &str| {
        request(
            s.api(),
            &format!("GET /api/sessions/{id}/credentials{q} HTTP/1.1{auth}"),
            b"",
        )
    };
    assert_eq!(get("", "").0, 401);
    assert_eq!(
        get("\r\nAuthorization: Bearer wrong-token-000000", "").0,
        401
    );
    let ok = "\r\nAuthorization: Bearer admin-token-0123456789";
    let (st, v) = get(ok, "");
    assert_eq!(st, 200, "{v}");
    assert_eq!(v["credentials"]["password"], secret.as_str());
    assert_eq!(
        (v["provider"].as_str(), v["key_id"].as_str()),
        (Some("github"), Some("k1"))
    );
    // The same store again is idempotent; different ones are a conflict.
    let (st, _) = store(
        s.api(),
        Some(&agent),
        "application/json",
        &store_body(&id, &secret),
    );
    assert_eq!(st, 200);
    let (st, _) = store(
        s.api(),
        Some(&agent),
        "application/json",
        &store_body(&id, "other"),
    );
    assert_eq!(st, 409);
    let (st, _) = get(ok, "?delete=true");
    assert_eq!(st, 200);
    assert_eq!(get(ok, "").0, 404);
    let _ = std::fs::remove_dir_all(&work);
}

/// Two sessions for the credentials endpoint's refusals: A is ready, B is another VM.
struct Creds {
    s: Setup,
    a_id: String,
    a_token: String,
    b_id: String,
    b_token: String,
}

const JSON: &str = "application/json";

fn creds() -> Creds {
    let s = Setup::new(&["--max-credentials-bytes", "2048"]);
    let a = create(s.api());
    let a_id = a["id"].as_str().unwrap().to_owned();
    let r = wait_for(s.api(), &a_id, "ready");
    assert_eq!(r["state"], "ready");
    let a_token = agent_token(&s.work, &a_id);
    let b = create(s.api());
    let b_id = b["id"].as_str().unwrap().to_owned();
    let b_token = agent_token(&s.work, &b_id);
    Creds {
        s,
        a_id,
        a_token,
        b_id,
        b_token,
    }
}

impl Creds {
    /// A credentials post with `token` (JSON).
    fn post(&self, token: Option<&str>, body: &str) -> (u16, Value) {
        store(self.s.api(), token, JSON, body)
    }

    /// A's session is untouched by a refusal: still ready, nothing stored.
    fn a_untouched(&self) {
        let (_, r) = http(
            self.s.api(),
            "GET",
            &format!("/api/sessions/{}", self.a_id),
            None,
        );
        assert_eq!(r["state"], "ready", "{r}");
        let stored = self.s.redis.cli(&[
            "EXISTS",
            &format!("vncgate:credentials:{{vncgate:route:{}}}", self.a_id),
        ]);
        assert_eq!(stored.trim(), "0");
    }
}

#[test]
fn credentials_401_without_or_with_an_unknown_agent_token() {
    let c = creds();
    let body = store_body(&c.a_id, "pw");
    let (st, v) = c.post(None, &body);
    assert_eq!(st, 401, "{v}");
    let (st, v) = c.post(Some("not-a-token"), &body);
    assert_eq!(
        (st, v["reason"].as_str()),
        (401, Some("unknown agent token"))
    );
    c.a_untouched();
}

#[test]
fn credentials_415_for_a_body_that_is_not_json() {
    let c = creds();
    let (st, v) = store(
        c.s.api(),
        Some(&c.a_token),
        "text/plain",
        &store_body(&c.a_id, "pw"),
    );
    assert_eq!(st, 415, "{v}");
    c.a_untouched();
}

#[test]
fn credentials_400_for_malformed_or_incomplete_bodies_without_echoing_values() {
    let c = creds();
    let (st, v) = c.post(Some(&c.a_token), "{");
    assert_eq!(st, 400, "{v}");
    let (st, v) = c.post(Some(&c.a_token), r#"{"sessionId":"x","provider":"p"}"#);
    assert_eq!(st, 400);
    assert!(v["reason"].as_str().unwrap().contains("credentials"), "{v}");
    let (st, v) = c.post(
        Some(&c.a_token),
        &format!(
            r#"{{"sessionId":"{}","provider":"p","credentials":"secret-value-77"}}"#,
            c.a_id
        ),
    );
    assert_eq!(st, 400);
    assert!(!v.to_string().contains("secret-value-77"), "{v}");
    c.a_untouched();
}

#[test]
fn credentials_413_over_the_size_limit() {
    let c = creds();
    let big = store_body(&c.a_id, &"x".repeat(4096));
    assert_eq!(c.post(Some(&c.a_token), &big).0, 413);
    c.a_untouched();
}

#[test]
fn credentials_404_for_an_unknown_session() {
    let c = creds();
    let (st, v) = c.post(Some(&c.a_token), &store_body("s-nope", "pw"));
    assert_eq!(st, 404, "{v}");
    c.a_untouched();
}

#[test]
fn credentials_403_for_another_sessions_token() {
    let c = creds();
    let (st, v) = c.post(Some(&c.b_token), &store_body(&c.a_id, "pw"));
    assert_eq!(st, 403, "{v}");
    c.a_untouched();
}

#[test]
fn credentials_409_for_a_session_that_takes_none() {
    let c = creds();
    let (st, _) = http(
        c.s.api(),
        "DELETE",
        &format!("/api/sessions/{}", c.b_id),
        None,
    );
    assert_eq!(st, 202);
    let (st, v) = c.post(Some(&c.b_token), &store_body(&c.b_id, "pw"));
    assert_eq!(st, 409, "{v}");
    assert!(v["reason"].as_str().unwrap().contains("deleted"), "{v}");
    // And the right one still works.
    let (st, v) = c.post(Some(&c.a_token), &store_body(&c.a_id, "pw"));
    assert_eq!(st, 201, "{v}");
    let (_, r) = http(c.s.api(), "GET", &format!("/api/sessions/{}", c.a_id), None);
    assert_eq!(r["state"], "completed");
}

#[test]
fn keys_rewrap_moves_records_to_the_newest_key() {
    let work = std::env::temp_dir().join(format!("vncgate-ctl-rewrap-{}", std::process::id()));
    std::fs::create_dir_all(&work).unwrap();
    let k1 = format!("k1={}", key_file(&work, "k1", 1));
    let k2 = format!("k2={}", key_file(&work, "k2", 2));
    let admin = file(&work, "admin", "admin-token-0123456789");
    let mut s = Setup::new(&["--credentials-key", &k1, "--admin-token-file", &admin]);
    let a = create(s.api());
    let id = a["id"].as_str().unwrap().to_owned();
    let r = wait_for(s.api(), &id, "ready");
    assert_eq!(r["state"], "ready");
    let token = agent_token(&s.work, &id);
    assert_eq!(
        store(
            s.api(),
            Some(&token),
            "application/json",
            &store_body(&id, "pw-rewrap")
        )
        .0,
        201
    );
    let read = |s: &Setup| {
        request(
            s.api(),
            &format!(
                "GET /api/sessions/{id}/credentials HTTP/1.1\r\nAuthorization: Bearer admin-token-0123456789"
            ),
            b"",
        )
    };
    let sealed_before = s.redis.cli(&[
        "GET",
        &format!("vncgate:credentials:{{vncgate:route:{id}}}"),
    ]);

    // Rewrap with both keys loaded, k2 newest.
    let out = Command::new(CONTROLLER)
        .args([
            "keys",
            "rewrap",
            "--redis",
            &s.redis.url(),
            "--credentials-key",
            &k1,
            "--credentials-key",
            &k2,
        ])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(String::from_utf8_lossy(&out.stdout).contains("rewrapped 1 records"));
    let sealed_after = s.redis.cli(&[
        "GET",
        &format!("vncgate:credentials:{{vncgate:route:{id}}}"),
    ]);
    let (b, a): (Value, Value) = (
        serde_json::from_str(&sealed_before).unwrap(),
        serde_json::from_str(&sealed_after).unwrap(),
    );
    assert_eq!(
        (b["kid"].as_str(), a["kid"].as_str()),
        (Some("k1"), Some("k2"))
    );
    assert_eq!(
        a["ciphertext"], b["ciphertext"],
        "the data itself was not re-encrypted"
    );

    // A controller with only the new key reads it; the old key is no longer needed.
    let _ = s.controller.child.kill();
    let _ = s.controller.child.wait();
    s.controller = start_controller(
        &s.redis,
        &s.work,
        &["--credentials-key", &k2, "--admin-token-file", &admin],
    );
    let (st, v) = read(&s);
    assert_eq!(st, 200, "{v}");
    assert_eq!(v["credentials"]["password"], "pw-rewrap");
    // Only the old key: the record does not open, and says which key it needs.
    let _ = s.controller.child.kill();
    let _ = s.controller.child.wait();
    s.controller = start_controller(
        &s.redis,
        &s.work,
        &["--credentials-key", &k1, "--admin-token-file", &admin],
    );
    let (st, v) = read(&s);
    assert_eq!(st, 503, "{v}");
    assert!(v["reason"].as_str().unwrap().contains("k2"), "{v}");
    let _ = std::fs::remove_dir_all(&work);
}

#[test]
fn admin_endpoints_and_metrics_from_zero() {
    let s = Setup::new(&["--admin", "127.0.0.1:0"]);
    let admin = s
        .controller
        .before
        .iter()
        .find_map(|l| l.strip_prefix("vncgate-controller: admin on "))
        .expect("an admin line")
        .to_owned();
    let get = |path: &str| {
        let addr = admin.trim_start_matches("http://");
        let mut c = TcpStream::connect(addr).unwrap();
        write!(
            c,
            "GET {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n"
        )
        .unwrap();
        let mut r = String::new();
        c.read_to_string(&mut r).unwrap();
        r
    };
    assert!(get("/healthz").starts_with("HTTP/1.1 200"));
    assert!(get("/readyz").contains("redis store answers"));
    let m = get("/metrics");
    // Every family has its help line and its series before the first event.
    for name in [
        "vncgate_controller_readiness_failures_total",
        "vncgate_controller_credentials_total",
        "vncgate_controller_reconciler_actions_total",
        "vncgate_controller_sessions",
    ] {
        assert!(m.contains(&format!("# HELP {name}")), "{name}: {m}");
    }
    assert!(
        m.contains(r#"vncgate_controller_readiness_failures_total{check="vnc_refused"} 0"#),
        "{m}"
    );
    // A session to ready moves the histogram and, after a reconciler pass, the gauge.
    let c = create(s.api());
    let id = c["id"].as_str().unwrap();
    let r = wait_for(s.api(), id, "ready");
    assert_eq!(r["state"], "ready");
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let m = get("/metrics");
        if m.contains("vncgate_controller_create_to_ready_seconds_count 1")
            && m.contains(r#"vncgate_controller_sessions{state="ready"} 1"#)
        {
            break;
        }
        assert!(Instant::now() < deadline, "{m}");
        std::thread::sleep(Duration::from_millis(200));
    }
    // And Redis going away makes the controller unready, by name.
    let mut s = s;
    s.kill_vms();
    s.redis.kill();
    let r = get("/readyz");
    assert!(
        r.starts_with("HTTP/1.1 503") && r.contains("not ready"),
        "{r}"
    );
}

/// The committed OpenAPI document is the one the code generates, the server serves it, and
/// every operation in it answers (not the "no such endpoint" fallback). The other direction,
/// every served route in the document, is checked by the router itself at startup.
#[test]
fn the_openapi_document_is_committed_served_and_complete() {
    let committed = std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/openapi.json"))
        .expect("controller/openapi.json");
    let generated = vncgate_controller::api::openapi_json();
    assert_eq!(
        committed.trim(),
        generated.trim(),
        "controller/openapi.json is stale: vncgate-controller openapi > controller/openapi.json"
    );
    let s = Setup::new(&[]);
    let (st, served) = http(s.api(), "GET", "/api/openapi.json", None);
    assert_eq!(st, 200);
    let doc: Value = serde_json::from_str(&generated).unwrap();
    assert_eq!(served, doc);
    assert!(doc["openapi"].as_str().unwrap().starts_with("3."));
    let mut ops = 0;
    for (path, item) in doc["paths"].as_object().unwrap() {
        for method in item.as_object().unwrap().keys() {
            let concrete = path.replace("{id}", "s-doesnotexist");
            let (_, v) = http(s.api(), &method.to_uppercase(), &concrete, None);
            assert_ne!(
                v["reason"], "no such endpoint",
                "{method} {path} is documented but not served"
            );
            ops += 1;
        }
    }
    assert!(ops >= 10, "{ops} operations");
    // And something undocumented is the fallback.
    let (st, v) = http(s.api(), "GET", "/api/sessions/x/nothing", None);
    assert_eq!((st, v["reason"].as_str()), (404, Some("no such endpoint")));
}

/// The embedded default: one command, no Redis. The controller runs the gateway in process,
/// fed by its in-memory store: create, ready, view with the token, the agent stores the
/// credentials, the session completes and the viewer is closed with 4006.
#[test]
fn the_embedded_default_end_to_end_without_redis() {
    let (work, nanos) = scratch("embedded");
    let mut c = Command::new(CONTROLLER);
    c.args([
        "--listen",
        "127.0.0.1:0",
        "--gateway-listen",
        "127.0.0.1:0",
        "--work-dir",
    ])
    .arg(&work);
    let log = std::fs::File::create(work.join("controller.log")).unwrap();
    let ctl = Proc::start_logging(c, "vncgate-controller: listening on ", Stdio::from(log));
    let gw = ctl
        .before
        .iter()
        .find_map(|l| l.strip_prefix("vncgate-controller: gateway on ws://"))
        .expect("a gateway line")
        .split('/')
        .next()
        .unwrap()
        .to_owned();
    let api = ctl.found.clone();
    let created = create(&api);
    let id = created["id"].as_str().unwrap().to_owned();
    let token = created["token"].as_str().unwrap().to_owned();
    let r = wait_for(&api, &id, "ready");
    assert_eq!(r["state"], "ready", "{r}");
    let (mut ws, init) = view(&gw, &format!("/vnc/{id}"), &token);
    assert_eq!(init.width, 1024);
    // Keepalive moves the expiry (and the embedded gateway's).
    let (st, k) = http(
        &api,
        "POST",
        &format!("/api/sessions/{id}/keepalive"),
        Some(r#"{"ttl_secs":120}"#),
    );
    assert_eq!(st, 200, "{k}");
    let secret = format!("embedded-secret-{nanos}");
    std::fs::write(
        work.join(&id).join("credentials.json"),
        format!(r#"{{"password":"{secret}"}}"#),
    )
    .unwrap();
    let done = wait_for(&api, &id, "completed");
    assert_eq!(done["state"], "completed", "{done}");
    assert_eq!(close_of(&mut ws), (4006, "session revoked".to_owned()));
    let logged = std::fs::read_to_string(work.join("controller.log")).unwrap();
    assert!(!logged.contains(&secret) && !logged.contains(&token));
    // The completed session's VM stops a second after its route went.
    std::thread::sleep(Duration::from_millis(1500));
    assert!(
        !work.join(&id).exists(),
        "the VM's directory is still there"
    );
    drop(ctl);
    let _ = std::fs::remove_dir_all(&work);
}

/// A VM no session names any more (its record was lost while the controller was down) is an
/// orphan: the next controller finds it on the host and stops it.
#[test]
fn a_restarted_controller_stops_orphaned_vms() {
    let mut s = Setup::new(&[]);
    let c = create(s.api());
    let id = c["id"].as_str().unwrap().to_owned();
    let r = wait_for(s.api(), &id, "ready");
    assert_eq!(r["state"], "ready");
    let vm = work_vm_pids(&s, &id);
    assert_eq!(vm.len(), 2, "the VNC server and the agent");
    let _ = s.controller.child.kill();
    let _ = s.controller.child.wait();
    s.redis
        .cli(&["DEL", &format!("vncgate:session:{{vncgate:route:{id}}}")]);
    s.controller = start_controller(&s.redis, &s.work, &[]);
    let deadline = Instant::now() + Duration::from_secs(10);
    while s.work.join(&id).exists()
        || vm
            .iter()
            .any(|p| std::path::Path::new(&format!("/proc/{p}")).exists())
    {
        assert!(Instant::now() < deadline, "the orphan still runs");
        std::thread::sleep(Duration::from_millis(100));
    }
    assert!(s.log().contains("orphaned VM"), "{}", s.log());
}

/// The pids of a session's VM, from its handle.json.
fn work_vm_pids(s: &Setup, id: &str) -> Vec<u64> {
    let h: Value = serde_json::from_str(
        &std::fs::read_to_string(s.work.join(id).join("handle.json")).unwrap(),
    )
    .unwrap();
    ["vnc", "agent"]
        .iter()
        .filter_map(|p| h[p]["pid"].as_u64())
        .collect()
}

/// `vncgate-loadtest sessions` against a real controller and gateway: every session ready
/// and viewed to its first framebuffer, the figures in its last JSON line; and a run whose
/// VMs never become desktops reports each failure by name, and `--fail-on-error` exits 1.
#[test]
fn the_session_load_test_reports_what_each_session_came_to() {
    let run = |s: &Setup, extra: &[&str]| {
        let out = Command::new(sibling("vncgate-loadtest"))
            .args([
                "sessions",
                "--controller",
                &format!("http://{}", s.api()),
                "--gateway",
                &format!("ws://{}", s.gateway()),
                "--hold",
                "0.2",
                "--json",
            ])
            .args(extra)
            .output()
            .unwrap();
        let stdout = String::from_utf8_lossy(&out.stdout).to_string();
        let last: Value = serde_json::from_str(stdout.lines().last().unwrap_or(""))
            .unwrap_or_else(|e| panic!("{e}: {stdout}\n{}", String::from_utf8_lossy(&out.stderr)));
        (out.status.code(), last)
    };
    let s = Setup::new(&[]);
    let (code, r) = run(&s, &["--sessions", "6", "--concurrency", "3"]);
    assert_eq!(code, Some(0), "{r}");
    assert_eq!(
        (
            r["sessions"].as_u64(),
            r["ready"].as_u64(),
            r["viewed"].as_u64(),
            r["failed"].as_u64()
        ),
        (Some(6), Some(6), Some(6), Some(0)),
        "{r}"
    );
    assert_eq!(r["create_to_ready_ms"]["n"], 6, "{r}");
    assert_eq!(r["create_to_first_framebuffer_ms"]["n"], 6, "{r}");
    let (first_fb, ready) = (
        r["create_to_first_framebuffer_ms"]["p50"].as_f64().unwrap(),
        r["create_to_ready_ms"]["p50"].as_f64().unwrap(),
    );
    assert!(
        first_fb >= ready,
        "the first framebuffer came before ready: {r}"
    );
    // Every viewer closed cleanly and every session was deleted.
    let (_, l) = http(s.api(), "GET", "/api/sessions?state=deleted", None);
    assert_eq!(l["sessions"].as_array().unwrap().len(), 6, "{l}");
    drop(s);

    let s = Setup::new(&["--process-vnc", "/bin/sleep 600", "--boot-timeout", "1"]);
    let (code, r) = run(
        &s,
        &["--sessions", "2", "--concurrency", "2", "--fail-on-error"],
    );
    assert_eq!(code, Some(1), "{r}");
    assert_eq!(
        (r["ready"].as_u64(), r["failed"].as_u64()),
        (Some(0), Some(2)),
        "{r}"
    );
    assert_eq!(r["failures"]["state_failed"], 2, "{r}");
    assert!(
        r["failure_examples"]["state_failed"]
            .as_str()
            .unwrap()
            .contains("refused"),
        "{r}"
    );
    assert!(
        r["create_to_ready_ms"].is_null(),
        "a figure with nothing measured: {r}"
    );
}
