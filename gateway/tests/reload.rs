//! SIGHUP reloads against the real binary: the routes file, `allow_upstream`,
//! `allow_origins` and `log_level` from the config file take effect for new connections, a
//! removed route closes its live sessions with 4006, a reload that fails validation keeps
//! every setting and says why, and a setting that needs a restart is named and kept.

mod common;

use std::path::PathBuf;
use std::process::Command;
use std::time::Duration;

use common::{Gw, RawWs, echo_server, eventually, http_exchange, status_of, upgrade_request};

struct Files {
    dir: PathBuf,
    config: PathBuf,
    routes: PathBuf,
}

impl Files {
    fn new(tag: &str) -> Files {
        let dir = std::env::temp_dir().join(format!("vncgate-reload-{tag}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        Files {
            config: dir.join("gateway.toml"),
            routes: dir.join("routes.toml"),
            dir,
        }
    }

    /// Writes the config (with `extra` lines) and the routes file, each in one rename.
    fn write(&self, extra: &str, routes: &[(&str, std::net::SocketAddr)]) {
        let config = format!("routes_file = \"{}\"\n{extra}\n", self.routes.display());
        let mut r = String::new();
        for (id, up) in routes {
            r.push_str(&format!(
                "[[route]]\nsession = \"{id}\"\nupstream = \"{up}\"\n"
            ));
        }
        for (path, text) in [(&self.config, config), (&self.routes, r)] {
            let tmp = path.with_extension("tmp");
            std::fs::write(&tmp, text).unwrap();
            std::fs::rename(&tmp, path).unwrap();
        }
    }

    fn start(&self, env_log: Option<&str>) -> Gw {
        let mut cmd = Command::new(common::BIN);
        cmd.args([
            "serve",
            "--listen",
            "127.0.0.1:0",
            "--admin",
            "127.0.0.1:0",
            "--workers",
            "2",
            "--config",
            self.config.to_str().unwrap(),
        ]);
        match env_log {
            Some(v) => cmd.env("VNCGATE_LOG", v),
            None => cmd.env_remove("VNCGATE_LOG"),
        };
        Gw::spawn(&mut cmd).expect("gateway starts")
    }
}

impl Drop for Files {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

fn origin(o: &str) -> String {
    format!("Origin: {o}\r\n")
}

fn upgrade_status(gw: &Gw, session: &str, extra: &str) -> u16 {
    let r = http_exchange(
        gw.addr,
        upgrade_request(&format!("/vnc/{session}"), extra).as_bytes(),
    );
    status_of(&r)
}

fn reloads(gw: &Gw, result: &str) -> f64 {
    let m = gw.admin_get("/metrics").1;
    let series = format!("vncgate_config_reload_total{{result=\"{result}\"}}");
    m.lines()
        .find_map(|l| {
            l.strip_prefix(series.as_str())
                .and_then(|v| v.trim().parse().ok())
        })
        .unwrap_or(0.0)
}

/// Waits for the `n`-th occurrence of `needle` in the log.
fn wait_count(gw: &Gw, needle: &str, n: usize) -> bool {
    eventually(Duration::from_secs(10), || {
        gw.log().matches(needle).count() >= n
    })
}

#[test]
fn sighup_applies_routes_upstreams_and_origins_and_revokes_removed_routes() {
    let f = Files::new("apply");
    let (e1, e2) = (echo_server(), echo_server());
    let allow = "allow_upstream = [\"127.0.0.1\"]\nallow_origins = [\"http://good.example\"]";
    f.write(allow, &[("a", e1.addr), ("b", e2.addr)]);
    let gw = f.start(Some("info"));
    let mut live_b = RawWs::connect(gw.addr, "/vnc/b", &origin("http://good.example"));
    live_b.send(&common::frame(0x82, b"ping-b"));
    assert_eq!(live_b.read_data(6), b"ping-b");
    assert_eq!(
        upgrade_status(&gw, "c", &origin("http://good.example")),
        404
    );
    assert_eq!(
        upgrade_status(&gw, "a", &origin("http://other.example")),
        403
    );

    // b removed, c added, the other origin allowed instead.
    let allow2 = "allow_upstream = [\"127.0.0.1\"]\nallow_origins = [\"http://other.example\"]";
    f.write(allow2, &[("a", e1.addr), ("c", e1.addr)]);
    gw.signal(libc::SIGHUP);
    assert!(
        wait_count(&gw, "SIGHUP: configuration reloaded", 1),
        "{}",
        gw.log()
    );
    // The live session of the removed route is revoked, by name.
    let (_, close) = live_b.until_close();
    let close = close.expect("a close frame");
    assert_eq!(close.close_code(), Some(4006), "{}", close.close_reason());
    // New connections see the new routes and origins.
    let mut c = RawWs::connect(gw.addr, "/vnc/c", &origin("http://other.example"));
    c.send(&common::frame(0x82, b"hello-c"));
    assert_eq!(c.read_data(7), b"hello-c");
    assert_eq!(
        upgrade_status(&gw, "b", &origin("http://other.example")),
        404
    );
    assert_eq!(
        upgrade_status(&gw, "a", &origin("http://good.example")),
        403
    );
    assert_eq!(reloads(&gw, "ok"), 1.0);
    assert_eq!(reloads(&gw, "failed"), 0.0);
}

#[test]
fn a_sighup_that_fails_validation_keeps_every_setting_and_says_why() {
    let f = Files::new("fail");
    let e = echo_server();
    let allow = "allow_upstream = [\"127.0.0.1\"]";
    f.write(allow, &[("a", e.addr)]);
    let gw = f.start(Some("info"));
    let mut live = RawWs::connect(gw.addr, "/vnc/a", "");

    // A route outside allow_upstream: refused, by name.
    let outside: std::net::SocketAddr = "10.9.8.7:5900".parse().unwrap();
    f.write(allow, &[("a", e.addr), ("x", outside)]);
    gw.signal(libc::SIGHUP);
    assert!(wait_count(&gw, "SIGHUP: reload failed", 1), "{}", gw.log());
    assert!(
        gw.log().contains("outside --allow-upstream"),
        "{}",
        gw.log()
    );
    // A config file that is not TOML: refused, by name.
    std::fs::write(&f.config, "allow_upstream = [\n").unwrap();
    gw.signal(libc::SIGHUP);
    assert!(wait_count(&gw, "SIGHUP: reload failed", 2), "{}", gw.log());
    assert!(gw.log().contains("gateway.toml"), "{}", gw.log());
    // A log filter that does not parse: refused, by name.
    f.write(
        &format!("{allow}\nlog_level = \"info,=[\""),
        &[("a", e.addr)],
    );
    gw.signal(libc::SIGHUP);
    assert!(wait_count(&gw, "SIGHUP: reload failed", 3), "{}", gw.log());
    assert!(gw.log().contains("--log-level"), "{}", gw.log());
    assert_eq!(reloads(&gw, "failed"), 3.0);
    assert_eq!(reloads(&gw, "ok"), 0.0);

    // Everything as before: the old route serves, the rejected one does not exist, and the
    // live session never noticed.
    assert_eq!(upgrade_status(&gw, "x", ""), 404);
    let mut again = RawWs::connect(gw.addr, "/vnc/a", "");
    again.send(&common::frame(0x82, b"again"));
    assert_eq!(again.read_data(5), b"again");
    live.send(&common::frame(0x82, b"live"));
    assert_eq!(live.read_data(4), b"live");
}

#[test]
fn sighup_changes_the_log_level_and_names_settings_that_need_a_restart() {
    let f = Files::new("log");
    let e = echo_server();
    let allow = "allow_upstream = [\"127.0.0.1\"]";
    f.write(&format!("{allow}\nlog_level = \"warn\""), &[("a", e.addr)]);
    let gw = f.start(None);
    f.write(
        &format!("{allow}\nlog_level = \"info\"\ndrain_timeout = 7"),
        &[("a", e.addr)],
    );
    gw.signal(libc::SIGHUP);
    // The reload line itself is at info: it shows only if the new filter is in force.
    assert!(
        wait_count(&gw, "SIGHUP: configuration reloaded", 1),
        "{}",
        gw.log()
    );
    // Before it, at warn, the startup line (info, written before the listening line) was
    // filtered out: stderr is one ordered stream, so it would be above the reload line.
    assert!(!gw.log().contains("gateway started"), "{}", gw.log());
    assert!(
        gw.log().contains("takes effect only at a restart"),
        "{}",
        gw.log()
    );
    assert!(
        gw.log().contains("setting=\"drain_timeout\""),
        "{}",
        gw.log()
    );
    let mut s = RawWs::connect(gw.addr, "/vnc/a", "");
    s.send(&common::frame(0x88, &1000u16.to_be_bytes()));
    let _ = s.until_close();
    assert!(wait_count(&gw, "session closed", 1), "{}", gw.log());
}
