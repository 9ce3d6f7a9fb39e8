//! PROXY protocol v1 and v2 on the public listener (`--proxy-protocol`), byte by byte over
//! real sockets against the real binary: honoured from a trusted proxy (the logged peer is
//! the header's client), refused from anyone else, and refused when malformed.

mod common;

use std::io::{Read as _, Write as _};
use std::net::{Ipv6Addr, SocketAddr, TcpStream};
use std::time::Duration;

use common::*;

const V2_SIG: &[u8] = b"\r\n\r\n\0\r\nQUIT\n";

fn v2(command: u8, family: u8, addresses: &[u8]) -> Vec<u8> {
    let mut h = V2_SIG.to_vec();
    h.push(0x20 | command);
    h.push(family);
    h.extend((addresses.len() as u16).to_be_bytes());
    h.extend_from_slice(addresses);
    h
}

fn v2_tcp4(src: [u8; 4], sport: u16) -> Vec<u8> {
    let mut a = src.to_vec();
    a.extend([10, 0, 0, 1]);
    a.extend(sport.to_be_bytes());
    a.extend(443u16.to_be_bytes());
    v2(1, 0x11, &a)
}

fn v2_tcp6(src: Ipv6Addr, sport: u16) -> Vec<u8> {
    let mut a = src.octets().to_vec();
    a.extend("2001:db8::1".parse::<Ipv6Addr>().unwrap().octets());
    a.extend(sport.to_be_bytes());
    a.extend(443u16.to_be_bytes());
    v2(1, 0x21, &a)
}

fn gateway(trusted: &str, extra: &[&str]) -> (Gw, Echo) {
    let echo = echo_server();
    let mut args = vec!["--proxy-protocol", "--trusted-proxy", trusted];
    args.extend_from_slice(extra);
    let gw = Gw::with_route("auto", "s", echo.addr, &args);
    (gw, echo)
}

/// Sends `pieces` one write each (the first pieces of a header arrive before the rest),
/// then reads the response head: the status line, or what came instead.
fn exchange(addr: SocketAddr, pieces: &[&[u8]]) -> (TcpStream, String) {
    let mut s = TcpStream::connect(addr).unwrap();
    s.set_nodelay(true).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    for (i, p) in pieces.iter().enumerate() {
        s.write_all(p).unwrap();
        if i + 1 < pieces.len() {
            // Separate segments, so that the gateway sees the header cut in pieces.
            std::thread::sleep(Duration::from_millis(30));
        }
    }
    let mut got = Vec::new();
    let mut buf = [0u8; 1024];
    while !got.windows(4).any(|w| w == b"\r\n\r\n") {
        match s.read(&mut buf) {
            Ok(0) => break,
            Ok(n) => got.extend_from_slice(&buf[..n]),
            Err(e) => return (s, format!("error: {e}")),
        }
    }
    (s, String::from_utf8_lossy(&got).into_owned())
}

/// An upgrade behind `header`, sent whole or cut; the session's log line names `peer`.
fn honoured(gw: &Gw, pieces: &[&[u8]], peer: &str) {
    let (s, head) = exchange(gw.addr, pieces);
    assert!(head.starts_with("HTTP/1.1 101 "), "{head:?}");
    drop(s);
    let needle = format!("peer={peer} ");
    assert!(
        gw.wait_log(&needle, Duration::from_secs(10)),
        "the session is logged with {needle}:\n{}",
        gw.log()
    );
}

fn metric(gw: &Gw, result: &str) -> u64 {
    let (_, body) = gw.admin_get("/metrics");
    let key = format!("vncgate_proxy_headers_total{{result=\"{result}\"}} ");
    body.lines()
        .find_map(|l| l.strip_prefix(&key))
        .map_or(0, |v| v.trim().parse().unwrap())
}

fn request() -> Vec<u8> {
    upgrade_request("/vnc/s", "").into_bytes()
}

#[test]
fn v1_tcp4_and_tcp6_from_a_trusted_proxy_name_the_client() {
    let (gw, _echo) = gateway("127.0.0.1", &[]);
    let req = request();
    let h4 = b"PROXY TCP4 198.51.100.7 10.0.0.1 40000 443\r\n";
    // Header and request in one write: the request's bytes behind the header are kept.
    let whole = [&h4[..], &req[..]].concat();
    honoured(&gw, &[&whole], "198.51.100.7:40000");
    // The header cut in the middle of a field, then the rest with the request.
    let h6 = b"PROXY TCP6 2001:db8::7 2001:db8::1 40001 443\r\n";
    let rest = [&h6[20..], &req[..]].concat();
    honoured(&gw, &[&h6[..20], &rest], "[2001:db8::7]:40001");
    // Cut after the header's separator, a cut the parser must not take for a bad field.
    let h = b"PROXY TCP4 203.0.113.9 10.0.0.1 40002 443\r\n";
    let at = h.len() - 5;
    honoured(&gw, &[&h[..at], &h[at..], &req[..]], "203.0.113.9:40002");
    assert_eq!(metric(&gw, "proxied"), 3);
}

#[test]
fn v2_tcp4_tcp6_and_local_from_a_trusted_proxy() {
    let (gw, _echo) = gateway("127.0.0.0/8", &[]);
    let req = request();
    let h4 = v2_tcp4([192, 0, 2, 33], 50000);
    honoured(&gw, &[&[&h4[..], &req[..]].concat()], "192.0.2.33:50000");
    let h6 = v2_tcp6("2001:db8::42".parse().unwrap(), 50001);
    // Cut inside the 16-byte fixed part, then inside the addresses.
    honoured(
        &gw,
        &[&h6[..7], &h6[7..30], &[&h6[30..], &req[..]].concat()],
        "[2001:db8::42]:50001",
    );
    // LOCAL (a balancer's health check): the connection's own address stands.
    let local = v2(0, 0x00, &[]);
    let (s, head) = exchange(gw.addr, &[&[&local[..], &req[..]].concat()]);
    assert!(head.starts_with("HTTP/1.1 101 "), "{head:?}");
    let own = s.local_addr().unwrap().to_string();
    drop(s);
    assert!(
        gw.wait_log(&format!("peer={own} "), Duration::from_secs(10)),
        "{}",
        gw.log()
    );
    assert_eq!(metric(&gw, "proxied"), 2);
    assert_eq!(metric(&gw, "local"), 1);
}

/// What a refused connection gets: nothing, then the end of the stream.
fn refused(gw: &Gw, bytes: &[u8]) {
    let (mut s, head) = exchange(gw.addr, &[bytes]);
    assert_eq!(head, "", "refused without a response");
    let mut rest = Vec::new();
    let _ = s.read_to_end(&mut rest);
    assert!(rest.is_empty());
}

#[test]
fn a_header_from_an_untrusted_peer_is_refused_and_counted() {
    let (gw, _echo) = gateway("10.0.0.0/8", &[]);
    let req = request();
    let h = b"PROXY TCP4 198.51.100.7 10.0.0.1 40000 443\r\n";
    refused(&gw, &[&h[..], &req[..]].concat());
    // A client that sends no header is no better.
    refused(&gw, &req);
    assert!(gw.wait_log("not a --trusted-proxy", Duration::from_secs(10)));
    assert!(eventually(Duration::from_secs(5), || metric(
        &gw,
        "untrusted"
    ) == 2));
    assert!(
        !gw.log().contains("198.51.100.7"),
        "the untrusted header is not believed"
    );
}

#[test]
fn malformed_missing_and_late_headers_from_a_trusted_proxy_are_refused() {
    let (gw, _echo) = gateway("127.0.0.1", &["--handshake-timeout", "0.5"]);
    let req = request();
    // No header: the request itself.
    refused(&gw, &req);
    // A v1 header with a bad address, and with an unknown protocol.
    refused(
        &gw,
        &[&b"PROXY TCP4 198.51.100.7 nonsense 1 2\r\n"[..], &req[..]].concat(),
    );
    refused(&gw, b"PROXY TCP5 198.51.100.7 10.0.0.1 1 2\r\n");
    // A v1 line with no CRLF in its first 107 bytes.
    let mut long = b"PROXY TCP4 ".to_vec();
    long.resize(150, b'1');
    refused(&gw, &long);
    // v2 with a bad version, and with a length past what is accepted.
    let mut bad = v2_tcp4([192, 0, 2, 1], 1);
    bad[12] = 0x31;
    refused(&gw, &bad);
    let mut huge = V2_SIG.to_vec();
    huge.extend([0x21, 0x11, 0xff, 0xff]);
    refused(&gw, &huge);
    // Half a header, then nothing: the handshake timeout covers the header.
    refused(&gw, b"PROXY TCP4 198.51.");
    assert!(gw.wait_log("no valid PROXY header", Duration::from_secs(5)));
    assert!(gw.wait_log("within the handshake timeout", Duration::from_secs(5)));
    assert!(eventually(Duration::from_secs(5), || {
        (
            metric(&gw, "missing"),
            metric(&gw, "invalid"),
            metric(&gw, "too_long"),
            metric(&gw, "timeout"),
        ) == (1, 3, 2, 1)
    }));
    // The listener still serves a well-formed one.
    let h = b"PROXY TCP4 198.51.100.8 10.0.0.1 40003 443\r\n";
    honoured(&gw, &[&[&h[..], &req[..]].concat()], "198.51.100.8:40003");
}
