//! View-only links against a real desktop: TigerVNC's Xvnc with an xterm running a shell in
//! a directory of the test's own, and RFB clients (vncgate-rfb's client role over a raw
//! WebSocket) through the gateway binary. Keys typed through the view token must not reach
//! the shell (a typed `touch` creates no file) while the same keys through the full token
//! do; the view-only viewer still gets framebuffer updates; its ClientInit cannot take the
//! desktop from others; and what the gateway cannot follow closes it with 4012-4014.
//!
//! Xvnc runs without `-AlwaysShared`, so a client asking for an exclusive session disconnects
//! the others (TigerVNC's default `DisconnectClients`): the shared-flag test shows that with a
//! full viewer first. scripts/test.sh installs Xvnc, xterm and xsetroot; when they are
//! missing these tests fail and say so (they never skip).

mod common;

use std::io::Read as _;
use std::net::TcpStream;
use std::path::PathBuf;
use std::process::Child;
use std::time::Duration;

use common::{Gw, RawWs, SFrame, Xvnc, eventually, frame, route, stop_child};
use vncgate_rfb::{ClientHandshake, ServerEvent, ServerMsgDecoder};
use vncgate_schema::testing::RedisServer;

const FULL: &str = "full-token-1";
const VIEW: &str = "view-token-1";

/// Xvnc (exclusive sessions allowed) with an xterm whose shell runs in `dir`.
struct Desktop {
    xterm: Child,
    x: Xvnc,
    dir: PathBuf,
}

impl Desktop {
    fn start() -> Desktop {
        let stamp = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_nanos();
        let dir =
            std::env::temp_dir().join(format!("vncgate-view-only-{}-{stamp}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let x = Xvnc::start("800x600", &[]);
        let xterm = common::xterm(&x.display)
            .args([
                "-geometry",
                "80x24+0+0",
                "+sb",
                "-e",
                "/bin/sh",
                "-c",
                "touch .ready; exec /bin/sh",
            ])
            .current_dir(&dir)
            .spawn()
            .expect("spawn xterm");
        let desk = Desktop { xterm, x, dir };
        assert!(
            eventually(Duration::from_secs(10), || desk.has(".ready")),
            "the xterm's shell started"
        );
        desk
    }

    fn upstream(&self) -> String {
        format!("127.0.0.1:{}", self.x.port)
    }

    fn has(&self, file: &str) -> bool {
        self.dir.join(file).exists()
    }
}

impl Drop for Desktop {
    fn drop(&mut self) {
        stop_child(&mut self.xterm);
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// A gateway with one static route, `desk`, from a routes file with both tokens.
fn gateway(desk: &Desktop, driver: &str) -> (Gw, PathBuf) {
    let file = desk.dir.join("routes.toml");
    std::fs::write(
        &file,
        format!(
            "[[route]]\nsession = \"desk\"\nupstream = \"{}\"\ntoken = \"{FULL}\"\nview_token = \"{VIEW}\"\n",
            desk.upstream()
        ),
    )
    .unwrap();
    let gw = Gw::start(
        driver,
        &[
            "--routes-file",
            file.to_str().unwrap(),
            "--allow-upstream",
            "127.0.0.0/8",
        ],
    );
    (gw, file)
}

/// An RFB client over a raw WebSocket: Raw encoding only, so the crate's decoder follows it.
struct Viewer {
    ws: RawWs,
    dec: ServerMsgDecoder,
}

fn key(down: bool, sym: u32) -> Vec<u8> {
    let mut m = vec![4, u8::from(down), 0, 0];
    m.extend_from_slice(&sym.to_be_bytes());
    m
}

/// Key events typing `line` and Return (printable ASCII keysyms are their codes).
fn typing(line: &str) -> Vec<u8> {
    let mut out = Vec::new();
    for sym in line.bytes().map(u32::from).chain([0xff0d]) {
        out.extend(key(true, sym));
        out.extend(key(false, sym));
    }
    out
}

fn pointer(x: u16, y: u16) -> Vec<u8> {
    let mut m = vec![5, 0];
    m.extend_from_slice(&x.to_be_bytes());
    m.extend_from_slice(&y.to_be_bytes());
    m
}

fn update_request(incremental: bool) -> Vec<u8> {
    vec![3, u8::from(incremental), 0, 0, 0, 0, 3, 32, 2, 88]
}

impl Viewer {
    /// Connects with `token` and runs the handshake through to ServerInit.
    fn connect(gw: &Gw, token: &str, shared: bool) -> Viewer {
        let mut ws = RawWs::connect(gw.addr, &format!("/vnc/desk?token={token}"), "");
        let mut hs = ClientHandshake::new(None, shared);
        let mut pending = Vec::new();
        while !hs.is_done() {
            let f = ws
                .next_frame()
                .expect("stream ended during the RFB handshake");
            assert_eq!(f.opcode, 2, "during the handshake: {}", f.close_reason());
            pending.extend_from_slice(&f.payload);
            let used = hs.receive(&pending).expect("RFB handshake");
            pending.drain(..used);
            let out = hs.take_output();
            if !out.is_empty() {
                ws.send(&frame(0x82, &out));
            }
        }
        let pf = hs.server_init().unwrap().pixel_format;
        let mut dec = ServerMsgDecoder::new(&pf);
        dec.feed(&pending);
        let mut v = Viewer { ws, dec };
        // SetEncodings: Raw only.
        v.send(&[2, 0, 0, 1, 0, 0, 0, 0]);
        v
    }

    fn send(&mut self, msgs: &[u8]) {
        self.ws.send(&frame(0x82, msgs));
    }

    /// Reads until the next FramebufferUpdate has begun; its rectangle count, or the close
    /// frame if the stream ends first.
    fn next_update(&mut self) -> Result<u16, Option<SFrame>> {
        loop {
            while let Some(ev) = self.dec.next_event().expect("server stream decodes") {
                if let ServerEvent::UpdateBegin { rects } = ev {
                    return Ok(rects);
                }
            }
            match self.ws.next_frame() {
                None => return Err(None),
                Some(f) if f.opcode == 8 => return Err(Some(f)),
                Some(f) if f.opcode == 2 || f.opcode == 0 => self.dec.feed(&f.payload),
                Some(_) => {}
            }
        }
    }

    /// Asks for a whole-screen update and waits for it: the server has processed every
    /// message this viewer sent before (it answers each client's messages in order).
    fn sync(&mut self) -> u16 {
        self.send(&update_request(false));
        self.next_update().expect("an update")
    }

    fn close_of(&mut self) -> (u16, String) {
        let f = loop {
            match self.ws.next_frame() {
                Some(f) if f.opcode == 8 => break f,
                Some(_) => {}
                None => panic!("stream ended without a close frame"),
            }
        };
        (f.close_code().unwrap(), f.close_reason())
    }
}

/// A metric's value from `/metrics` (0 when absent).
fn metric(gw: &Gw, series: &str) -> f64 {
    let (_, body) = gw.admin_get("/metrics");
    body.lines()
        .find_map(|l| l.strip_prefix(series)?.trim().parse().ok())
        .unwrap_or(0.0)
}

fn dropped(gw: &Gw, kind: &str) -> f64 {
    metric(
        gw,
        &format!("vncgate_view_only_dropped_total{{kind=\"{kind}\"}}"),
    )
}

const WITHIN: Duration = Duration::from_secs(15);

/// Types `touch FILE` through `v` until FILE exists: the xterm may not have mapped its
/// window when the first keys arrive (they are lost then). Each try moves the pointer over
/// the xterm (no window manager: the keyboard follows the pointer) and starts with Return,
/// which runs and ends whatever part of a line got through before.
fn touch_through(desk: &Desktop, v: &mut Viewer, file: &str) -> bool {
    for _ in 0..8 {
        let mut keys = pointer(200, 150);
        keys.extend(typing(""));
        keys.extend(typing(&format!("touch {file}")));
        v.send(&keys);
        if eventually(Duration::from_secs(2), || desk.has(file)) {
            return true;
        }
    }
    false
}

#[test]
fn keys_through_the_view_token_do_not_reach_the_shell_and_through_the_full_token_do() {
    let desk = Desktop::start();
    let (gw, _file) = gateway(&desk, "uring");
    let mut full = Viewer::connect(&gw, FULL, true);
    assert!(full.sync() > 0, "the full viewer gets the screen");
    assert!(
        touch_through(&desk, &mut full, "first"),
        "keys through the full token reach the shell\n{}",
        gw.log()
    );

    let mut view = Viewer::connect(&gw, VIEW, true);
    assert!(view.sync() > 0, "the view-only viewer gets the screen");
    // Everything a viewer can act with, in one frame and then one message per frame, with
    // an update request behind it: when the update arrives, Xvnc has processed all of it.
    let mut acts = typing("touch viewed");
    acts.extend(pointer(10, 10));
    acts.extend([6, 0, 0, 0, 0, 0, 0, 4]);
    acts.extend(b"boom");
    // The extended clipboard's form (negative length): a 4-byte "caps" message.
    acts.extend([6, 0, 0, 0, 0xff, 0xff, 0xff, 0xfc, 0, 0, 0, 1]);
    // QEMU extended key events (down, up) and an xvp reboot request.
    acts.extend([255, 0, 0, 1, 0, 0, 0, b'x', 0, 0, 0, 0x2d]);
    acts.extend([255, 0, 0, 0, 0, 0, 0, b'x', 0, 0, 0, 0x2d]);
    acts.extend([250, 0, 1, 3]);
    view.send(&acts);
    for m in typing("touch viewed2").chunks(8) {
        view.send(m);
    }
    assert!(view.sync() > 0);
    // The full viewer types after: by the time its file exists, a line typed before it
    // would have run.
    full.send(&typing("touch second"));
    assert!(eventually(WITHIN, || desk.has("second")), "{}", gw.log());
    assert!(
        !desk.has("viewed"),
        "a key through the view token reached the shell"
    );
    assert!(
        !desk.has("viewed2"),
        "a key through the view token reached the shell"
    );
    let typed = |s: &str| (s.len() as f64 + 1.0) * 2.0;
    assert_eq!(
        dropped(&gw, "key_event"),
        typed("touch viewed") + typed("touch viewed2")
    );
    assert_eq!(dropped(&gw, "pointer_event"), 1.0);
    assert_eq!(dropped(&gw, "client_cut_text"), 2.0);
    assert_eq!(dropped(&gw, "qemu"), 2.0);
    assert_eq!(dropped(&gw, "xvp"), 1.0);
    assert_eq!(metric(&gw, "vncgate_view_only_sessions_total"), 1.0);

    // The view-only viewer keeps receiving updates: the full viewer's typing changes the
    // screen, and an incremental request is answered with it.
    view.send(&update_request(true));
    full.send(&typing("echo watched"));
    assert!(view.next_update().expect("an incremental update") > 0);

    drop(view);
    assert!(
        gw.wait_log("view_only=true", WITHIN),
        "the session's line says it was view-only\n{}",
        gw.log()
    );
}

#[test]
fn a_view_only_viewer_asking_for_an_exclusive_session_disconnects_nobody() {
    let desk = Desktop::start();
    let (gw, _file) = gateway(&desk, "epoll");
    let mut first = Viewer::connect(&gw, FULL, true);
    assert!(first.sync() > 0);
    // Xvnc has processed the view-only viewer's ClientInit when ServerInit comes back:
    // asked exclusive and passed on as asked, the full viewer would be gone by then.
    let mut view = Viewer::connect(&gw, VIEW, false);
    assert!(view.sync() > 0);
    assert!(first.sync() > 0, "the full viewer is still connected");
    assert!(gw.wait_log("view-only viewer asked for an exclusive session", WITHIN));
    // The control: the same request through the full token does disconnect it, so the
    // desktop would have honoured the flag.
    let mut other = Viewer::connect(&gw, FULL, false);
    assert!(other.sync() > 0);
    first.send(&update_request(false));
    loop {
        match first.next_update() {
            Ok(_) => continue,
            Err(close) => {
                let code = close.and_then(|f| f.close_code());
                assert_eq!(code, Some(4003), "upstream closed: Xvnc dropped the viewer");
                break;
            }
        }
    }
}

#[test]
fn what_the_gateway_cannot_follow_closes_a_view_only_viewer_by_name() {
    let desk = Desktop::start();
    let (gw, _file) = gateway(&desk, "uring");
    // An unknown message type after the handshake: 4012.
    let mut view = Viewer::connect(&gw, VIEW, true);
    assert!(view.sync() > 0);
    view.send(&[9, 0, 0, 0]);
    assert_eq!(
        view.close_of(),
        (4012, "view-only: message the gateway cannot size".into())
    );
    // The same byte through the full token goes to Xvnc, which knows it no better: the
    // gateway does not judge full viewers' streams.
    let mut full = Viewer::connect(&gw, FULL, true);
    assert!(full.sync() > 0);
    full.send(&[9, 0, 0, 0]);
    assert_eq!(full.close_of().0, 4003);

    // A security type other than None and VNC auth: 4013.
    let banner = |ws: &mut RawWs| {
        let f = ws.next_frame().unwrap();
        assert!(f.payload.starts_with(b"RFB 003.008\n"), "{f:?}");
    };
    let mut ws = RawWs::connect(gw.addr, &format!("/vnc/desk?token={VIEW}"), "");
    banner(&mut ws);
    ws.send(&frame(0x82, b"RFB 003.008\n"));
    ws.next_frame().unwrap(); // The security types.
    ws.send(&frame(0x82, &[19]));
    let (_, close) = ws.until_close();
    assert_eq!(close.unwrap().close_code(), Some(4013));

    // RFB 3.3, where the server alone picks the security type: 4014.
    let mut ws = RawWs::connect(gw.addr, &format!("/vnc/desk?token={VIEW}"), "");
    banner(&mut ws);
    ws.send(&frame(0x82, b"RFB 003.003\n"));
    let (_, close) = ws.until_close();
    let close = close.unwrap();
    assert_eq!(close.close_code(), Some(4014), "{}", close.close_reason());

    for (code, cause) in [
        (4012, "view_only_unsizable"),
        (4013, "view_only_security"),
        (4014, "view_only_version"),
    ] {
        let series =
            format!("vncgate_sessions_closed_total{{code=\"{code}\",cause=\"{cause}\",blame=\"");
        assert!(
            eventually(WITHIN, || {
                let (_, body) = gw.admin_get("/metrics");
                body.lines()
                    .any(|l| l.starts_with(&series) && l.ends_with(" 1"))
            }),
            "{series}"
        );
    }
    assert!(
        gw.log()
            .contains("view-only viewer closed: its stream cannot be followed")
    );
}

#[test]
fn a_view_token_written_with_route_add_reaches_the_gateway_through_redis_and_withdrawn_revokes_its_viewers()
 {
    let desk = Desktop::start();
    let r = RedisServer::start();
    let url = r.url();
    let up = desk.upstream();
    let add = |extra: &[&str]| {
        let mut args = vec![
            "add",
            "--redis",
            &url,
            "--session",
            "desk",
            "--upstream",
            &up,
            "--allow-upstream",
            "127.0.0.0/8",
        ];
        args.extend_from_slice(extra);
        route(&args)
    };
    // Refused by name: a view token without a full token, or equal to it.
    let (code, _, err) = add(&["--view-token", VIEW]);
    assert_eq!(code, 2, "{err}");
    assert!(err.contains("needs a (full) token"), "{err}");
    let (code, _, err) = add(&["--token", FULL, "--view-token", FULL]);
    assert_eq!(code, 2, "{err}");
    assert!(err.contains("equals the full token"), "{err}");
    let (code, out, err) = add(&["--token", FULL, "--view-token", VIEW]);
    assert_eq!(code, 0, "{out}{err}");
    assert!(out.contains("view-only token"), "{out}");
    let (_, out, _) = route(&["list", "--redis", &url, "--json"]);
    assert!(out.contains("\"view_token\":true"), "{out}");
    assert!(
        !out.contains(&hex_digest(VIEW)),
        "list never shows the digest: {out}"
    );
    let (_, out, _) = route(&["list", "--redis", &url]);
    assert!(out.lines().next().unwrap().contains("VIEW"), "{out}");

    let gw = Gw::start(
        "epoll",
        &["--redis", &url, "--allow-upstream", "127.0.0.0/8"],
    );
    let mut view = Viewer::connect(&gw, VIEW, true);
    view.send(&typing("touch viewed"));
    assert!(view.sync() > 0);
    let mut full = Viewer::connect(&gw, FULL, true);
    assert!(touch_through(&desk, &mut full, "typed"), "{}", gw.log());
    assert!(!desk.has("viewed"));
    assert_eq!(dropped(&gw, "key_event"), 26.0);

    // Rewritten without the view token: its live viewer is revoked, the full viewer stays,
    // and the view link is refused from then on.
    let (code, out, err) = add(&["--token", FULL]);
    assert_eq!(code, 0, "{out}{err}");
    assert_eq!(view.close_of(), (4006, "session revoked".into()));
    assert!(full.sync() > 0, "the full viewer is still connected");
    assert!(
        eventually(WITHIN, || upgrade_status(
            &gw,
            &format!("/vnc/desk?token={VIEW}")
        ) == 403),
        "{}",
        gw.log()
    );
}

fn hex_digest(token: &str) -> String {
    hex::encode(vncgate_schema::record::token_digest(token.as_bytes()))
}

/// The status of the answer to an upgrade request, read up to the end of its head only.
fn upgrade_status(gw: &Gw, path: &str) -> u16 {
    use std::io::Write as _;
    let mut s = TcpStream::connect(gw.addr).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    s.write_all(common::upgrade_request(path, "").as_bytes())
        .unwrap();
    let mut head = Vec::new();
    let mut byte = [0u8; 1];
    while !head.ends_with(b"\r\n\r\n") && matches!(s.read(&mut byte), Ok(1)) {
        head.push(byte[0]);
    }
    common::status_of(&String::from_utf8_lossy(&head))
}
