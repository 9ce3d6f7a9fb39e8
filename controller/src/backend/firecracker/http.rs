//! HTTP/1.1 as Firecracker's API speaks it, without IO: a request is bytes from
//! [`encode_request`], a response is parsed from whatever bytes have arrived by
//! [`parse_response`]. Firecracker's server (micro_http) always answers with a
//! `Content-Length` body or none (204), never chunked, so that is all this reads; anything
//! else is refused rather than guessed at.

/// The most header bytes taken before the blank line; micro_http's are a few hundred.
const MAX_HEAD: usize = 16 * 1024;
/// The most body bytes taken: above Firecracker's largest answer (the MMDS store, 51200 bytes
/// by default, `--mmds-size-limit` raises it).
const MAX_BODY: usize = 8 * 1024 * 1024;

/// One request, whole. The client opens a connection per call and says `Connection: close`;
/// micro_http answers `keep-alive` regardless (v1.12.1), so the response is complete at its
/// `Content-Length`, never at the server's EOF, and the client then drops the connection.
pub fn encode_request(method: &str, path: &str, body: Option<&[u8]>) -> Vec<u8> {
    let mut out = format!("{method} {path} HTTP/1.1\r\nHost: localhost\r\nAccept: application/json\r\nConnection: close\r\n").into_bytes();
    if let Some(body) = body {
        out.extend_from_slice(
            format!(
                "Content-Type: application/json\r\nContent-Length: {}\r\n",
                body.len()
            )
            .as_bytes(),
        );
    }
    out.extend_from_slice(b"\r\n");
    if let Some(body) = body {
        out.extend_from_slice(body);
    }
    out
}

/// A parsed response: the status and the body.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Response {
    pub status: u16,
    pub body: Vec<u8>,
}

/// Why bytes are not a response Firecracker would send.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ParseError(pub String);

impl std::fmt::Display for ParseError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

fn bad(what: impl Into<String>) -> ParseError {
    ParseError(what.into())
}

/// The response in `buf`, once all of it is there: `Ok(None)` asks for more bytes. `eof`
/// says no more will come (the server closed): then a response still missing bytes is an
/// error.
pub fn parse_response(buf: &[u8], eof: bool) -> Result<Option<Response>, ParseError> {
    let Some(head_len) = buf.windows(4).position(|w| w == b"\r\n\r\n") else {
        if buf.len() > MAX_HEAD {
            return Err(bad(format!("no end of headers in {MAX_HEAD} bytes")));
        }
        return if eof {
            Err(bad(format!(
                "connection closed after {} bytes, inside the headers",
                buf.len()
            )))
        } else {
            Ok(None)
        };
    };
    if head_len > MAX_HEAD {
        return Err(bad(format!("headers longer than {MAX_HEAD} bytes")));
    }
    let head = std::str::from_utf8(&buf[..head_len]).map_err(|_| bad("headers not UTF-8"))?;
    let mut lines = head.split("\r\n");
    let status_line = lines.next().unwrap_or_default();
    let mut parts = status_line.splitn(3, ' ');
    let version = parts.next().unwrap_or_default();
    if version != "HTTP/1.1" && version != "HTTP/1.0" {
        return Err(bad(format!("not an HTTP/1 status line: {status_line:?}")));
    }
    let status: u16 = parts
        .next()
        .filter(|s| s.len() == 3)
        .and_then(|s| s.parse().ok())
        .filter(|s| (100..600).contains(s))
        .ok_or_else(|| bad(format!("no status code in {status_line:?}")))?;
    let mut length = None;
    for line in lines {
        let (name, value) = line
            .split_once(':')
            .ok_or_else(|| bad(format!("header without a colon: {line:?}")))?;
        let value = value.trim();
        if name.eq_ignore_ascii_case("content-length") {
            let n: usize = value
                .parse()
                .map_err(|_| bad(format!("Content-Length {value:?}")))?;
            if length.is_some_and(|l| l != n) {
                return Err(bad("two different Content-Length headers"));
            }
            length = Some(n);
        } else if name.eq_ignore_ascii_case("transfer-encoding") {
            return Err(bad(format!("Transfer-Encoding {value:?} is not supported")));
        }
    }
    // 1xx, 204 and 304 have no body whatever the headers say (RFC 9112, section 6.3).
    let length = if status < 200 || status == 204 || status == 304 {
        0
    } else {
        length.ok_or_else(|| bad(format!("status {status} without Content-Length")))?
    };
    if length > MAX_BODY {
        return Err(bad(format!("a body of {length} bytes")));
    }
    let body_start = head_len + 4;
    let have = buf.len() - body_start;
    if have < length {
        return if eof {
            Err(bad(format!(
                "connection closed after {have} of {length} body bytes"
            )))
        } else {
            Ok(None)
        };
    }
    Ok(Some(Response {
        status,
        body: buf[body_start..body_start + length].to_vec(),
    }))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_request_with_a_body_is_these_bytes() {
        assert_eq!(
            encode_request("PUT", "/mmds", Some(br#"{"a":1}"#)),
            b"PUT /mmds HTTP/1.1\r\nHost: localhost\r\nAccept: application/json\r\nConnection: close\r\nContent-Type: application/json\r\nContent-Length: 7\r\n\r\n{\"a\":1}".to_vec()
        );
    }

    #[test]
    fn a_request_without_a_body_has_no_length() {
        assert_eq!(
            encode_request("GET", "/", None),
            b"GET / HTTP/1.1\r\nHost: localhost\r\nAccept: application/json\r\nConnection: close\r\n\r\n".to_vec()
        );
    }

    /// What Firecracker v1.12.1 sent (captured from its socket).
    const FAULT: &[u8] = b"HTTP/1.1 400 \r\nServer: Firecracker API\r\nConnection: keep-alive\r\nContent-Type: application/json\r\nContent-Length: 89\r\n\r\n{\"fault_message\":\"The requested operation is not supported before starting the microVM.\"}";

    #[test]
    fn a_response_split_at_every_byte_parses_only_when_whole() {
        for cut in 0..FAULT.len() {
            assert_eq!(
                parse_response(&FAULT[..cut], false),
                Ok(None),
                "cut at {cut}"
            );
            assert!(parse_response(&FAULT[..cut], true).is_err(), "eof at {cut}");
        }
        let r = parse_response(FAULT, false).unwrap().unwrap();
        assert_eq!(r.status, 400);
        assert_eq!(&r.body, &FAULT[FAULT.len() - 89..]);
    }

    #[test]
    fn no_content_has_no_body_and_bytes_after_it_are_not_read() {
        let r = parse_response(
            b"HTTP/1.1 204 \r\nServer: Firecracker API\r\nConnection: keep-alive\r\n\r\nHTTP/1.1",
            false,
        );
        assert_eq!(
            r,
            Ok(Some(Response {
                status: 204,
                body: vec![]
            }))
        );
    }

    #[test]
    fn refusals_name_what_is_wrong() {
        let cases: &[(&[u8], &str)] = &[
            (b"SSH-2.0-x\r\n\r\n", "not an HTTP/1 status line"),
            (b"HTTP/1.1 20 OK\r\n\r\n", "no status code"),
            (b"HTTP/1.1 200 OK\r\n\r\n", "without Content-Length"),
            (
                b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n",
                "Transfer-Encoding",
            ),
            (
                b"HTTP/1.1 200 OK\r\nContent-Length: 1\r\nContent-Length: 2\r\n\r\n",
                "two different",
            ),
            (
                b"HTTP/1.1 200 OK\r\nContent-Length: x\r\n\r\n",
                "Content-Length",
            ),
            (b"HTTP/1.1 200 OK\r\nbroken\r\n\r\n", "without a colon"),
            (
                b"HTTP/1.1 200 OK\r\nContent-Length: 99999999999\r\n\r\n",
                "a body of",
            ),
        ];
        for (bytes, want) in cases {
            let e = parse_response(bytes, false).unwrap_err();
            assert!(e.0.contains(want), "{e} should say {want}");
        }
        let endless = vec![b'a'; MAX_HEAD + 1];
        assert!(parse_response(&endless, false).is_err());
    }
}
