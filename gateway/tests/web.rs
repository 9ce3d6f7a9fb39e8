//! `--web DIR` on the real binary: files with their content types (GET and HEAD),
//! `index.html` for a directory and no listing, every way of naming something outside DIR
//! refused with its status (dot segments, encoded ones, encoded separators, overlong UTF-8,
//! NUL, symlinks out of DIR), refusals counted by name, and WebSocket upgrades on the same
//! port still relayed.

mod common;

use std::path::{Path, PathBuf};
use std::process::Command;

use common::{BIN, Gw, RawWs, echo_server, frame, http_exchange, status_of};

fn tempdir(tag: &str) -> PathBuf {
    let d = std::env::temp_dir().join(format!("vncgate-web-{tag}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    std::fs::create_dir_all(&d).unwrap();
    d
}

/// A web root `d/web` shaped like noVNC's, with a secret beside it and symlinks out of it.
fn site(d: &Path) -> PathBuf {
    let root = d.join("web");
    for dir in [
        "app/styles",
        "app/images",
        "app/sounds",
        "bare",
        "docs",
        "vendor",
    ] {
        std::fs::create_dir_all(root.join(dir)).unwrap();
    }
    let files: &[(&str, &[u8])] = &[
        ("index.html", b"<!doctype html><title>index</title>"),
        ("vnc.html", b"<!doctype html><title>noVNC</title>"),
        ("app/ui.js", b"export default 1;\n"),
        ("app/styles/base.css", b"body { margin: 0 }\n"),
        (
            "app/images/icon.svg",
            b"<svg xmlns=\"http://www.w3.org/2000/svg\"/>",
        ),
        ("app/images/icon.png", b"\x89PNG\r\n\x1a\n"),
        ("app/sounds/bell.oga", b"OggS"),
        ("favicon.ico", b"\0\0\x01\0"),
        ("package.json", b"{\"name\":\"novnc\"}"),
        ("vendor/mod.wasm", b"\0asm\x01\0\0\0"),
        ("app/ui.js.map", b"{\"version\":3}"),
        ("docs/index.html", b"<title>docs</title>"),
        ("bare/readme.txt", b"listed nowhere"),
    ];
    for (f, body) in files {
        std::fs::write(root.join(f), body).unwrap();
    }
    std::fs::write(d.join("secret.txt"), b"outside the root").unwrap();
    std::os::unix::fs::symlink("../secret.txt", root.join("leak")).unwrap();
    std::os::unix::fs::symlink(d, root.join("up")).unwrap();
    // A symlink that stays inside is an ordinary file.
    std::os::unix::fs::symlink("vnc.html", root.join("inside.html")).unwrap();
    root
}

fn get(gw: &Gw, method: &str, target: &str) -> String {
    http_exchange(
        gw.addr,
        format!("{method} {target} HTTP/1.1\r\nHost: gw\r\n\r\n").as_bytes(),
    )
}

fn header<'a>(resp: &'a str, name: &str) -> Option<&'a str> {
    let head = resp.split("\r\n\r\n").next()?;
    head.lines().skip(1).find_map(|l| {
        let (k, v) = l.split_once(':')?;
        k.eq_ignore_ascii_case(name).then(|| v.trim())
    })
}

fn body(resp: &str) -> &str {
    resp.split_once("\r\n\r\n").map_or("", |(_, b)| b)
}

fn start(root: &Path, upstream: std::net::SocketAddr) -> Gw {
    Gw::with_route(
        "auto",
        "s1",
        upstream,
        &["--workers", "1", "--web", root.to_str().unwrap()],
    )
}

#[test]
fn files_are_served_with_their_content_types_and_head_has_no_body() {
    let d = tempdir("types");
    let root = site(&d);
    let echo = echo_server();
    let gw = start(&root, echo.addr);
    for (path, file, ctype) in [
        ("/vnc.html", "vnc.html", "text/html; charset=utf-8"),
        ("/app/ui.js", "app/ui.js", "text/javascript; charset=utf-8"),
        (
            "/app/styles/base.css",
            "app/styles/base.css",
            "text/css; charset=utf-8",
        ),
        (
            "/app/images/icon.svg",
            "app/images/icon.svg",
            "image/svg+xml",
        ),
        ("/app/images/icon.png", "app/images/icon.png", "image/png"),
        ("/app/sounds/bell.oga", "app/sounds/bell.oga", "audio/ogg"),
        ("/favicon.ico", "favicon.ico", "image/x-icon"),
        ("/package.json", "package.json", "application/json"),
        ("/vendor/mod.wasm", "vendor/mod.wasm", "application/wasm"),
        ("/app/ui.js.map", "app/ui.js.map", "application/json"),
        (
            "/vnc.html?autoconnect=true&path=websockify",
            "vnc.html",
            "text/html; charset=utf-8",
        ),
        ("/inside.html", "vnc.html", "text/html; charset=utf-8"),
        ("/app%2Fui.js", "", ""),
    ] {
        let r = get(&gw, "GET", path);
        if file.is_empty() {
            // An encoded slash is not a path separator here.
            assert_eq!(status_of(&r), 400, "{path}: {r}");
            continue;
        }
        let want = std::fs::read(root.join(file)).unwrap();
        assert_eq!(status_of(&r), 200, "{path}: {r}");
        assert_eq!(header(&r, "content-type"), Some(ctype), "{path}");
        assert_eq!(
            header(&r, "content-length"),
            Some(want.len().to_string().as_str()),
            "{path}"
        );
        assert_eq!(
            header(&r, "x-content-type-options"),
            Some("nosniff"),
            "{path}"
        );
        assert_eq!(
            body(&r).as_bytes(),
            String::from_utf8_lossy(&want).as_bytes(),
            "{path}"
        );
        let h = get(&gw, "HEAD", path);
        assert_eq!(status_of(&h), 200, "{path}");
        assert_eq!(header(&h, "content-length"), header(&r, "content-length"));
        assert_eq!(body(&h), "", "HEAD {path}");
    }
    // Other methods on a plain path: 405.
    assert_eq!(status_of(&get(&gw, "POST", "/vnc.html")), 405);
}

#[test]
fn directories_answer_with_index_html_and_are_never_listed() {
    let d = tempdir("dirs");
    let root = site(&d);
    let echo = echo_server();
    let gw = start(&root, echo.addr);
    let r = get(&gw, "GET", "/");
    assert_eq!(
        (status_of(&r), body(&r)),
        (200, "<!doctype html><title>index</title>")
    );
    // Without the trailing slash: a redirect to it (relative links then resolve inside).
    let r = get(&gw, "GET", "/docs");
    assert_eq!(status_of(&r), 301, "{r}");
    assert_eq!(header(&r, "location"), Some("/docs/"));
    // The redirect names a path of this host, whatever the request's slashes.
    assert_eq!(
        header(&get(&gw, "GET", "//docs"), "location"),
        Some("/docs/")
    );
    assert_eq!(body(&get(&gw, "GET", "/docs/")), "<title>docs</title>");
    let r = get(&gw, "GET", "/bare/");
    assert_eq!(status_of(&r), 403, "{r}");
    assert_eq!(body(&r), "directory without index.html (no listings)\n");
    assert!(!r.contains("readme.txt"));
    let r = get(&gw, "GET", "/nope.html");
    assert_eq!((status_of(&r), body(&r)), (404, "file not found\n"));
}

#[test]
fn every_way_out_of_the_web_directory_is_refused() {
    let d = tempdir("escape");
    let root = site(&d);
    let echo = echo_server();
    let gw = start(&root, echo.addr);
    let dots = "'.' or '..' segment in the path\n";
    for (target, status, why) in [
        ("/../secret.txt", 400, dots),
        ("/app/../../secret.txt", 400, dots),
        ("/./vnc.html", 400, dots),
        ("/%2e%2e/secret.txt", 400, dots),
        ("/%2E%2E/secret.txt", 400, dots),
        ("/.%2e/secret.txt", 400, dots),
        ("/..%2fsecret.txt", 400, "encoded '/' or '\\' in the path\n"),
        (
            "/%2e%2e%2fsecret.txt",
            400,
            "encoded '/' or '\\' in the path\n",
        ),
        ("/..%5csecret.txt", 400, "encoded '/' or '\\' in the path\n"),
        ("/%c0%ae%c0%ae/secret.txt", 400, "path is not UTF-8\n"),
        ("/%e0%80%ae%e0%80%ae/secret.txt", 400, "path is not UTF-8\n"),
        ("/%c0%af", 400, "path is not UTF-8\n"),
        ("/vnc.html%00.png", 400, "NUL in the path\n"),
        ("/%", 400, "malformed percent-encoding in the path\n"),
        ("/%g0", 400, "malformed percent-encoding in the path\n"),
        ("/leak", 403, "path leads outside the web directory\n"),
        (
            "/up/secret.txt",
            403,
            "path leads outside the web directory\n",
        ),
        ("/up/web/vnc.html", 200, ""),
        // Decoded once: `%252e` is a file named `%2e`, which does not exist.
        ("/%252e%252e/secret.txt", 404, "file not found\n"),
    ] {
        let r = get(&gw, "GET", target);
        assert_eq!(status_of(&r), status, "{target}: {r}");
        if !why.is_empty() {
            assert_eq!(body(&r), why, "{target}");
        }
        assert!(
            !r.contains("outside the root"),
            "{target} leaked the secret: {r}"
        );
    }
    // A request target that is not a path at all.
    let r = get(&gw, "GET", "http://gw/../secret.txt");
    assert_eq!(status_of(&r), 400, "{r}");
    let r = get(&gw, "GET", "*");
    assert_eq!(status_of(&r), 400, "{r}");
    // Counted by name with the other refusals, and the files served are counted too.
    let (_, metrics) = gw.admin_get("/metrics");
    for reason in [
        "web_dot_segment",
        "web_bad_path",
        "web_outside_root",
        "web_not_found",
    ] {
        let line = metrics
            .lines()
            .find(|l| {
                l.starts_with("vncgate_handshake_rejected_total{")
                    && l.contains(&format!("reason=\"{reason}\""))
            })
            .unwrap_or_else(|| panic!("no series for {reason}"));
        let n: f64 = line.rsplit(' ').next().unwrap().parse().unwrap();
        assert!(n >= 1.0, "{line}");
    }
    assert!(
        metrics
            .lines()
            .any(|l| l.starts_with("vncgate_web_responses_total ") && !l.ends_with(" 0")),
        "{metrics}"
    );
}

#[test]
fn a_file_over_the_limit_is_refused_by_name() {
    let d = tempdir("big");
    let root = site(&d);
    let f = std::fs::File::create(root.join("big.bin")).unwrap();
    f.set_len(vncgate::web::MAX_FILE + 1).unwrap();
    let echo = echo_server();
    let gw = start(&root, echo.addr);
    let r = get(&gw, "GET", "/big.bin");
    assert_eq!(status_of(&r), 403, "{r}");
    assert_eq!(body(&r), "file larger than the gateway serves (16 MiB)\n");
}

#[test]
fn upgrades_on_the_same_port_still_reach_the_relay() {
    let d = tempdir("relay");
    let root = site(&d);
    let echo = echo_server();
    let gw = start(&root, echo.addr);
    assert_eq!(status_of(&get(&gw, "GET", "/vnc.html")), 200);
    let mut ws = RawWs::connect(gw.addr, "/vnc/s1", "");
    ws.send(&frame(0x82, b"still a relay"));
    assert_eq!(ws.read_data(13), b"still a relay");
    // Admin endpoints are the admin port's, as before.
    assert_eq!(gw.admin_get("/healthz").0, 200);
    assert_eq!(status_of(&get(&gw, "GET", "/healthz")), 404);
    // The same with websockify's command line: files and any-path upgrades on one port.
    let gw = Gw::spawn(Command::new(BIN).args([
        "websockify",
        "--workers",
        "1",
        "--admin",
        "127.0.0.1:0",
        "--web",
        root.to_str().unwrap(),
        "127.0.0.1:0",
        &echo.addr.to_string(),
    ]))
    .unwrap();
    assert_eq!(
        body(&get(&gw, "GET", "/vnc.html")),
        "<!doctype html><title>noVNC</title>"
    );
    let mut ws = RawWs::connect(gw.addr, "/websockify", "");
    ws.send(&frame(0x82, b"websockify"));
    assert_eq!(ws.read_data(10), b"websockify");
}

#[test]
fn without_web_plain_gets_are_refused_as_before() {
    let echo = echo_server();
    let gw = Gw::with_route("auto", "s1", echo.addr, &["--workers", "1"]);
    assert_eq!(status_of(&get(&gw, "GET", "/vnc.html")), 404);
    assert_eq!(status_of(&get(&gw, "GET", "/vnc/s1")), 426);
    let (code, err) = {
        let o = Command::new(BIN)
            .args(["serve", "--web", "/nonexistent-vncgate-web"])
            .output()
            .unwrap();
        (
            o.status.code(),
            String::from_utf8_lossy(&o.stderr).into_owned(),
        )
    };
    assert_eq!(code, Some(2));
    assert!(err.contains("--web /nonexistent-vncgate-web"), "{err}");
}
