//! What the binary's log tells an operator: an upstream failure names the VM's address
//! (while the close reason the browser gets never does), and a gateway with nothing to
//! route says so at startup.

mod common;

use std::io::{Read as _, Write as _};
use std::net::{SocketAddr, TcpListener};
use std::time::Duration;

use common::*;

/// An upstream that sends a banner, then resets the connection (RST, not FIN).
fn say_and_reset() -> SocketAddr {
    let l = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = l.local_addr().unwrap();
    std::thread::spawn(move || {
        for s in l.incoming() {
            let Ok(mut s) = s else { continue };
            let _ = s.write_all(b"RFB 003.008\n");
            // Wait for the browser's reply through the gateway, so the banner is relayed
            // before the reset.
            let mut buf = [0u8; 12];
            let _ = s.read_exact(&mut buf);
            socket2::SockRef::from(&s)
                .set_linger(Some(Duration::ZERO))
                .unwrap();
        }
    });
    addr
}

/// Whether a log line is about `session` (the field is quoted where it was logged as text).
fn names(line: &str, session: &str) -> bool {
    line.contains(&format!("session={session} "))
        || line.contains(&format!("session=\"{session}\""))
}

/// Connects to `session`, expects a close with `code` and `reason`, and returns the
/// gateway's log line for that session's end. The reason must not carry the address.
fn close_and_log(gw: &Gw, session: &str, upstream: SocketAddr, code: u16, reason: &str) -> String {
    let mut ws = RawWs::connect(gw.addr, &format!("/vnc/{session}"), "");
    if code != 4000 {
        assert_eq!(ws.read_data(12), b"RFB 003.008\n");
        ws.send(&frame(0x82, b"RFB 003.008\n"));
    }
    let (_, close) = ws.until_close();
    let close = close.expect("a close frame");
    assert_eq!(close.close_code(), Some(code));
    // Answer it and leave, so the gateway's close handshake ends now.
    ws.send(&frame(0x88, &close.payload[..2]));
    drop(ws);
    let said = close.close_reason();
    assert_eq!(said, reason);
    for leak in [
        upstream.to_string(),
        upstream.ip().to_string(),
        upstream.port().to_string(),
    ] {
        assert!(
            !said.contains(&leak),
            "the close reason {said:?} names the VM"
        );
    }
    let ended =
        |l: &&str| l.contains("session closed") && l.contains(&format!("session={session} "));
    // The gateway logs the end just after sending the close.
    eventually(Duration::from_secs(5), || {
        gw.log().lines().any(|l| ended(&l))
    });
    let log = gw.log();
    let line = log
        .lines()
        .find(ended)
        .unwrap_or_else(|| panic!("no end logged for {session}:\n{log}"))
        .to_owned();
    assert!(
        line.contains(&format!("upstream={upstream}")),
        "the end of {session} does not name its VM: {line}"
    );
    line
}

/// The log line holding `message` for `session`, with the VM's address in it.
fn assert_failure_names_vm(gw: &Gw, message: &str, session: &str, upstream: SocketAddr) {
    let log = gw.log();
    let line = log
        .lines()
        .find(|l| l.contains(message) && names(l, session))
        .unwrap_or_else(|| panic!("no {message:?} line for {session}:\n{log}"));
    assert!(
        line.contains(&format!("upstream={upstream}")),
        "{message:?} does not name the VM: {line}"
    );
}

#[test]
fn upstream_failures_name_the_vm_in_the_log_but_not_to_the_browser() {
    let refused = closed_port();
    let closes = say_and_close(b"RFB 003.008\n".to_vec());
    let resets = say_and_reset();
    let routes = [
        format!("refused={refused}"),
        format!("closes={closes}"),
        format!("resets={resets}"),
    ];
    let gw = Gw::start(
        "auto",
        &[
            "--route",
            &routes[0],
            "--route",
            &routes[1],
            "--route",
            &routes[2],
            "--allow-upstream",
            "127.0.0.1",
            "--connect-retry-window",
            "0",
        ],
    );

    let line = close_and_log(&gw, "refused", refused, 4000, "vm vnc port refused");
    assert!(line.contains("upstream_refused"), "{line}");
    assert_failure_names_vm(&gw, "upstream connect failed", "refused", refused);

    let line = close_and_log(&gw, "closes", closes, 4003, "upstream closed");
    assert!(line.contains("upstream_closed"), "{line}");

    let line = close_and_log(&gw, "resets", resets, 4004, "upstream connection error");
    assert!(line.contains("upstream_error"), "{line}");
    // Tests run the gateway at debug level, where the read's own error is logged.
    assert_failure_names_vm(&gw, "upstream read failed", "resets", resets);
}

#[test]
fn a_gateway_with_nothing_to_route_warns_at_startup() {
    let warning = "every upgrade will get 404";
    let empty = Gw::start("auto", &[]);
    assert!(
        empty.wait_log(warning, Duration::from_secs(5)),
        "{}",
        empty.log()
    );
    let line = empty
        .log()
        .lines()
        .find(|l| l.contains(warning))
        .unwrap()
        .to_owned();
    assert!(line.contains("WARN"), "{line}");
    // And it means it.
    let resp = http_exchange(empty.addr, upgrade_request("/vnc/any", "").as_bytes());
    assert_eq!(status_of(&resp), 404, "{resp}");

    // A gateway with a route says nothing of the kind; its start line comes after the
    // place the warning would be.
    let echo = echo_server();
    let routed = Gw::with_route("auto", "s", echo.addr, &[]);
    assert!(routed.wait_log("gateway started", Duration::from_secs(5)));
    assert!(!routed.log().contains(warning), "{}", routed.log());
}
