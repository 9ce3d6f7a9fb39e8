//! `parse_request` on arbitrary bytes, under the default config and under small
//! `max_header_bytes` limits (including the limits right at the input's length).
//!
//! Invariants checked:
//! - never panics;
//! - `Partial` only while `len < max_header_bytes`;
//! - an `Upgrade` consumed `0 < consumed <= len` and `consumed <= max_header_bytes`, its
//!   head ends in a blank line, its path segment and accept key are well-formed, parsing
//!   exactly the consumed bytes gives the same upgrade (trailing early frame data changes
//!   nothing), and the head cut one byte short is `Partial`;
//! - lowering `max_header_bytes` only ever turns a result into 431;
//! - every `Reject::response()` is a complete HTTP/1.1 response with the reject's status and
//!   a `Content-Length` that matches its body.

#![no_main]

use libfuzzer_sys::fuzz_target;
use vncgate_ws::handshake::{HandshakeConfig, Parsed, Reject, Subprotocol, parse_request};

/// What an outcome looks like, minus the token digest (which `Token` does not expose).
#[derive(Debug, PartialEq, Eq)]
enum Outcome {
    Partial,
    Upgrade {
        session_id: String,
        has_token: bool,
        protocol: Subprotocol,
        accept: String,
        consumed: usize,
    },
    Reject(Reject),
}

fn run(buf: &[u8], cfg: &HandshakeConfig) -> Outcome {
    match parse_request(buf, cfg) {
        Ok(Parsed::Partial) => {
            assert!(
                buf.len() < cfg.max_header_bytes,
                "Partial at {} bytes with max_header_bytes {}",
                buf.len(),
                cfg.max_header_bytes
            );
            Outcome::Partial
        }
        Ok(Parsed::Upgrade(u)) => {
            assert!(u.consumed > 0 && u.consumed <= buf.len(), "consumed {} of {}", u.consumed, buf.len());
            assert!(u.consumed <= cfg.max_header_bytes, "consumed {} over the limit", u.consumed);
            assert!(buf[..u.consumed].ends_with(b"\n"), "head does not end in a line break");
            // The path segment: what a session id is, is the gateway's rule.
            assert!(!u.session_id.is_empty() && !u.session_id.contains('/'), "segment {:?}", u.session_id);
            // A presented token is bytes of the head, verbatim, and never shown by Debug.
            if let Some(t) = &u.token {
                let head = &buf[..u.consumed];
                assert!(
                    t.bytes().is_empty() || head.windows(t.bytes().len()).any(|w| w == t.bytes()),
                    "token not in the head"
                );
                assert!(format!("{t:?}").ends_with("<redacted>)"));
            }
            assert_eq!(u.accept.len(), 28, "accept {:?}", u.accept);
            assert!(u.accept.ends_with('='));
            Outcome::Upgrade {
                session_id: u.session_id,
                has_token: u.token.is_some(),
                protocol: u.protocol,
                accept: u.accept,
                consumed: u.consumed,
            }
        }
        Ok(Parsed::Plain(p)) => panic!("a plain request under a config that asks for none: {p:?}"),
        Err(r) => {
            check_response(&r);
            Outcome::Reject(r)
        }
    }
}

fn check_response(r: &Reject) {
    let resp = r.response();
    assert!(resp.starts_with(b"HTTP/1.1 "), "{r:?}: {:?}", String::from_utf8_lossy(&resp));
    let mut headers = [httparse::EMPTY_HEADER; 16];
    let mut parsed = httparse::Response::new(&mut headers);
    let head = match parsed.parse(&resp) {
        Ok(httparse::Status::Complete(n)) => n,
        other => panic!("{r:?}: response does not parse: {other:?}"),
    };
    assert_eq!(parsed.version, Some(1));
    assert_eq!(parsed.code, Some(r.status()));
    assert!(!parsed.reason.unwrap_or("").is_empty());
    let len = parsed
        .headers
        .iter()
        .find(|h| h.name.eq_ignore_ascii_case("content-length"))
        .map(|h| std::str::from_utf8(h.value).unwrap().parse::<usize>().unwrap())
        .expect("Content-Length");
    assert_eq!(len, resp.len() - head, "{r:?}: Content-Length does not match the body");
    assert!(
        parsed.headers.iter().any(|h| h.name.eq_ignore_ascii_case("connection")
            && h.value.eq_ignore_ascii_case(b"close")),
        "{r:?}: no Connection: close"
    );
}

fn with_max(max: usize) -> HandshakeConfig {
    HandshakeConfig {
        max_header_bytes: max,
        ..HandshakeConfig::default()
    }
}

fuzz_target!(|data: &[u8]| {
    let default = HandshakeConfig::default();
    let base = run(data, &default);

    if let Outcome::Upgrade { consumed, .. } = base {
        // The head alone parses the same: bytes after it are the client's early frames.
        assert_eq!(run(&data[..consumed], &default), base, "trailing bytes changed the outcome");
        // And the head one byte short is still incomplete.
        assert_eq!(run(&data[..consumed - 1], &default), Outcome::Partial, "prefix not Partial");
    }

    // Smaller limits, at and around the input's own length: the outcome is the default
    // one, or 431, and exactly as the limit dictates.
    for max in [0, 1, 64, 512, data.len().saturating_sub(1), data.len(), data.len() + 1] {
        if max >= default.max_header_bytes {
            continue;
        }
        let small = run(data, &with_max(max));
        match &base {
            Outcome::Partial => {
                if data.len() >= max {
                    assert_eq!(small, Outcome::Reject(Reject::HeadersTooLarge), "max {max}");
                } else {
                    assert_eq!(small, Outcome::Partial, "max {max}");
                }
            }
            Outcome::Upgrade { consumed, .. } => {
                if *consumed > max {
                    assert_eq!(small, Outcome::Reject(Reject::HeadersTooLarge), "max {max}");
                } else {
                    assert_eq!(small, base, "max {max}");
                }
            }
            Outcome::Reject(_) => {
                assert!(
                    small == base || small == Outcome::Reject(Reject::HeadersTooLarge),
                    "max {max}: {small:?} vs {base:?}"
                );
            }
        }
    }

    // An origin allowlist and a different prefix only add rejections (403, 404), never
    // change an accepted upgrade into another one.
    let strict = HandshakeConfig {
        path_prefix: "/vnc/".into(),
        allowed_origins: vec!["http://localhost:8000".into(), "https://app.example".into()],
        max_header_bytes: 8192,
        ..HandshakeConfig::default()
    };
    let s = run(data, &strict);
    if let Outcome::Upgrade { .. } = s {
        assert_eq!(s, base, "allowlist changed an accepted upgrade");
    }
    if let Outcome::Upgrade { .. } = base {
        assert!(
            s == base || s == Outcome::Reject(Reject::Forbidden("origin not allowed")),
            "allowlist: {s:?}"
        );
    }
    let root = HandshakeConfig {
        path_prefix: "/".into(),
        ..HandshakeConfig::default()
    };
    run(data, &root);
});
