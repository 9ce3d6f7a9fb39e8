//! The HTTP/1.1 upgrade request (RFC 6455 §4.2.1) and the responses to it, sans IO.
//!
//! [`parse_request`] takes the bytes read so far and either asks for more, rejects the
//! request with the precise HTTP status, or yields an [`UpgradeRequest`]: the path segment
//! naming the session, the token exactly as presented (from the offered subprotocols,
//! `Authorization: Bearer`, or `?token=`, in that order) with where it came from, the
//! selected subprotocol and the `Sec-WebSocket-Accept` value. Nothing here touches a socket
//! or a clock, and nothing here decides what a session id or a token means: the gateway's
//! admission checks both.

use base64::Engine as _;
use base64::engine::general_purpose::STANDARD as B64;
use sha1::{Digest as _, Sha1};

/// The GUID of RFC 6455 §1.3, appended to the key before hashing.
const WS_GUID: &[u8] = b"258EAFA5-E914-47DA-95CA-C5AB0DC85B11";

/// Headers beyond this many get 431: noVNC sends about a dozen, browsers a few more.
pub const MAX_HEADERS: usize = 48;

/// The subprotocol prefix under which a browser may carry its token, so that the token stays
/// out of URLs and access logs (`new WebSocket(url, ["binary", "vncgate.token.<T>"])`).
pub const TOKEN_PROTOCOL_PREFIX: &str = "vncgate.token.";

/// What the handshake parser needs to know about this gateway.
#[derive(Debug, Clone)]
pub struct HandshakeConfig {
    /// Path prefix in front of the session id, with leading and trailing slash: `/vnc/`.
    pub path_prefix: String,
    /// Allowed `Origin` values (exact, case-insensitive). Empty allows any origin.
    pub allowed_origins: Vec<String>,
    /// The most header bytes (request line included) read before answering 431.
    pub max_header_bytes: usize,
    /// Accept an upgrade on any path (websockify's way): the path does not name the
    /// session, and [`UpgradeRequest::session_id`] is the whole path, query removed.
    pub any_path: bool,
    /// Yield a GET or HEAD that is not a WebSocket upgrade as [`Parsed::Plain`] (the
    /// gateway serves files for it) instead of refusing it with 426.
    pub plain_requests: bool,
}

impl Default for HandshakeConfig {
    fn default() -> Self {
        Self {
            path_prefix: "/vnc/".into(),
            allowed_origins: Vec::new(),
            max_header_bytes: 8192,
            any_path: false,
            plain_requests: false,
        }
    }
}

/// The subprotocol the gateway answers with. Current noVNC offers none (no header is sent
/// back); older noVNC and websockify clients offer `binary`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Subprotocol {
    None,
    Binary,
}

/// Where a client put its token.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TokenSource {
    /// `Sec-WebSocket-Protocol: vncgate.token.<T>`: out of URLs and access logs.
    Subprotocol,
    /// `Authorization: Bearer <T>`.
    Bearer,
    /// `?token=<T>`, as websockify and noVNC's `path` carry it.
    Query,
}

impl TokenSource {
    pub fn as_str(self) -> &'static str {
        match self {
            TokenSource::Subprotocol => "subprotocol",
            TokenSource::Bearer => "bearer",
            TokenSource::Query => "query",
        }
    }
}

/// A token as the client presented it: bytes only, unvalidated. `Debug` never prints them,
/// so a request cannot leak its token into a log line.
#[derive(Clone, PartialEq, Eq)]
pub struct PresentedToken {
    pub source: TokenSource,
    bytes: Vec<u8>,
}

impl PresentedToken {
    pub fn new(source: TokenSource, bytes: &[u8]) -> Self {
        Self {
            source,
            bytes: bytes.to_vec(),
        }
    }

    pub fn bytes(&self) -> &[u8] {
        &self.bytes
    }
}

impl std::fmt::Debug for PresentedToken {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "PresentedToken({}, {} bytes, <redacted>)",
            self.source.as_str(),
            self.bytes.len()
        )
    }
}

/// A valid upgrade request.
#[derive(Debug)]
pub struct UpgradeRequest {
    /// The path segment after the prefix: non-empty, without `/`. Whether it is a valid
    /// session id is the application's rule. With [`HandshakeConfig::any_path`], the
    /// whole path without its query.
    pub session_id: String,
    /// The token, if the client presented one.
    pub token: Option<PresentedToken>,
    /// Which subprotocol to answer with.
    pub protocol: Subprotocol,
    /// The `Sec-WebSocket-Accept` value for the client's key.
    pub accept: String,
    /// Bytes of the buffer that belonged to the request; anything after them is early
    /// WebSocket data from the client.
    pub consumed: usize,
}

/// Why a request was refused, with the status it gets. Each variant is the client's fault
/// (the browser's, in vncgate's blame terms); the reason goes in the body and the log.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Reject {
    /// 400: malformed request, a request with a body, or a required WebSocket header is
    /// missing or wrong.
    BadRequest(&'static str),
    /// 405: not a GET.
    MethodNotAllowed,
    /// 426: not a WebSocket upgrade, or a `Sec-WebSocket-Version` other than 13 (§4.4).
    UpgradeRequired(&'static str),
    /// 431: the request head exceeds the configured limit or header count.
    HeadersTooLarge,
    /// 404: the path is not under the session prefix.
    NotFound,
    /// 403: `Origin` not in the allowlist.
    Forbidden(&'static str),
}

impl std::fmt::Display for Reject {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "{} {}: {}",
            self.status(),
            status_text(self.status()),
            self.reason()
        )
    }
}

impl std::error::Error for Reject {}

impl Reject {
    pub fn status(&self) -> u16 {
        match self {
            Reject::BadRequest(_) => 400,
            Reject::MethodNotAllowed => 405,
            Reject::UpgradeRequired(_) => 426,
            Reject::HeadersTooLarge => 431,
            Reject::NotFound => 404,
            Reject::Forbidden(_) => 403,
        }
    }

    /// Short reason for the body, the log line and the metric label.
    pub fn reason(&self) -> &'static str {
        match self {
            Reject::BadRequest(r) | Reject::UpgradeRequired(r) | Reject::Forbidden(r) => r,
            Reject::MethodNotAllowed => "method not allowed",
            Reject::HeadersTooLarge => "request header fields too large",
            Reject::NotFound => "not found",
        }
    }

    /// Headers the response carries besides the defaults: what to upgrade to (426, §4.4),
    /// which method is allowed (405).
    pub fn extra_headers(&self) -> &'static str {
        match self {
            Reject::UpgradeRequired(_) => {
                "Upgrade: websocket\r\nConnection: Upgrade\r\nSec-WebSocket-Version: 13\r\n"
            }
            Reject::MethodNotAllowed => "Allow: GET\r\n",
            _ => "",
        }
    }

    /// The full HTTP response for this rejection.
    pub fn response(&self) -> Vec<u8> {
        error_response(self.status(), self.reason(), self.extra_headers())
    }
}

/// The outcome of feeding the bytes read so far to [`parse_request`].
#[derive(Debug)]
pub enum Parsed {
    /// The head is incomplete and still under the size limit: read more.
    Partial,
    Upgrade(UpgradeRequest),
    /// A GET or HEAD without `Upgrade: websocket`, under
    /// [`HandshakeConfig::plain_requests`] only.
    Plain(PlainRequest),
}

/// A plain HTTP GET or HEAD (a browser loading a page), checked for its form only: what
/// the target names is the application's business.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PlainRequest {
    /// HEAD: the answer carries the headers only.
    pub head: bool,
    /// The request target as sent (origin form: it starts with `/`), query included.
    pub target: String,
    /// Bytes of the buffer that belonged to the request.
    pub consumed: usize,
}

/// Parses and validates an upgrade request from the bytes read so far.
pub fn parse_request(buf: &[u8], cfg: &HandshakeConfig) -> Result<Parsed, Reject> {
    let mut headers = [httparse::EMPTY_HEADER; MAX_HEADERS];
    let mut req = httparse::Request::new(&mut headers);
    let consumed = match req.parse(buf) {
        Ok(httparse::Status::Complete(n)) => n,
        Ok(httparse::Status::Partial) => {
            return if buf.len() >= cfg.max_header_bytes {
                Err(Reject::HeadersTooLarge)
            } else {
                Ok(Parsed::Partial)
            };
        }
        Err(httparse::Error::TooManyHeaders) => return Err(Reject::HeadersTooLarge),
        Err(_) => return Err(Reject::BadRequest("malformed HTTP request")),
    };
    if consumed > cfg.max_header_bytes {
        return Err(Reject::HeadersTooLarge);
    }
    // httparse guarantees these are set on Complete.
    let method = req.method.unwrap_or("");
    let path = req.path.unwrap_or("");
    if cfg.plain_requests
        && (method == "GET" || method == "HEAD")
        && !req
            .headers
            .iter()
            .any(|h| h.name.eq_ignore_ascii_case("upgrade") && list_contains(h.value, b"websocket"))
    {
        return plain(&req, path, method == "HEAD", consumed).map(Parsed::Plain);
    }
    if method != "GET" {
        return Err(Reject::MethodNotAllowed);
    }
    if req.version != Some(1) {
        return Err(Reject::BadRequest("HTTP/1.1 required"));
    }
    let (path_only, query) = match path.split_once('?') {
        Some((p, q)) => (p, Some(q)),
        None => (path, None),
    };
    let session_id = if cfg.any_path {
        path_only
    } else {
        let id = path_only
            .strip_prefix(cfg.path_prefix.as_str())
            .ok_or(Reject::NotFound)?;
        if id.is_empty() || id.contains('/') {
            return Err(Reject::NotFound);
        }
        id
    };

    let mut host: Option<&[u8]> = None;
    let mut upgrade = false;
    let mut connection_upgrade = false;
    let mut key: Option<&[u8]> = None;
    let mut version: Option<&[u8]> = None;
    let mut origin: Option<&[u8]> = None;
    let mut offered_binary = false;
    let mut offered_any = false;
    let mut token: Option<&[u8]> = None;
    let mut bearer: Option<&[u8]> = None;
    for h in req.headers.iter() {
        let name = h.name;
        let value = h.value;
        if name.eq_ignore_ascii_case("host") {
            if host.is_some() {
                return Err(Reject::BadRequest("duplicate Host header"));
            }
            host = Some(trim(value));
        } else if name.eq_ignore_ascii_case("content-length") {
            // An upgrade carries no body (RFC 6455 §4.1 sends none): bytes after the head
            // would otherwise reach the VM as if they were WebSocket data.
            if trim(value) != b"0" {
                return Err(Reject::BadRequest("an upgrade request has no body"));
            }
        } else if name.eq_ignore_ascii_case("transfer-encoding") {
            return Err(Reject::BadRequest("an upgrade request has no body"));
        } else if name.eq_ignore_ascii_case("upgrade") {
            upgrade |= list_contains(value, b"websocket");
        } else if name.eq_ignore_ascii_case("connection") {
            connection_upgrade |= list_contains(value, b"upgrade");
        } else if name.eq_ignore_ascii_case("sec-websocket-key") {
            if key.is_some() {
                return Err(Reject::BadRequest("duplicate Sec-WebSocket-Key"));
            }
            key = Some(trim(value));
        } else if name.eq_ignore_ascii_case("sec-websocket-version") {
            if version.is_some() {
                return Err(Reject::BadRequest("duplicate Sec-WebSocket-Version"));
            }
            version = Some(trim(value));
        } else if name.eq_ignore_ascii_case("origin") {
            if origin.is_some() {
                return Err(Reject::BadRequest("duplicate Origin header"));
            }
            origin = Some(trim(value));
        } else if name.eq_ignore_ascii_case("sec-websocket-protocol") {
            for p in value
                .split(|&b| b == b',')
                .map(trim)
                .filter(|p| !p.is_empty())
            {
                offered_any = true;
                if p == b"binary" {
                    offered_binary = true;
                } else if let Some(t) = p.strip_prefix(TOKEN_PROTOCOL_PREFIX.as_bytes()) {
                    token = Some(t);
                }
            }
        } else if name.eq_ignore_ascii_case("authorization") {
            let v = trim(value);
            if v.len() > 7 && v[..7].eq_ignore_ascii_case(b"bearer ") {
                bearer = Some(trim(&v[7..]));
            }
        }
    }

    if !upgrade {
        return Err(Reject::UpgradeRequired("not a WebSocket upgrade"));
    }
    if !connection_upgrade {
        return Err(Reject::BadRequest("Connection header lacks upgrade"));
    }
    match host {
        None | Some(b"") => return Err(Reject::BadRequest("missing Host header")),
        Some(h) if !valid_host(h) => return Err(Reject::BadRequest("invalid Host header")),
        Some(_) => {}
    }
    match version {
        Some(b"13") => {}
        _ => return Err(Reject::UpgradeRequired("Sec-WebSocket-Version 13 required")),
    }
    let key = key.ok_or(Reject::BadRequest("missing Sec-WebSocket-Key"))?;
    match B64.decode(key) {
        Ok(raw) if raw.len() == 16 => {}
        _ => {
            return Err(Reject::BadRequest(
                "Sec-WebSocket-Key is not 16 bytes of base64",
            ));
        }
    }
    if !cfg.allowed_origins.is_empty()
        && let Some(o) = origin
        && !cfg
            .allowed_origins
            .iter()
            .any(|a| a.as_bytes().eq_ignore_ascii_case(o))
    {
        return Err(Reject::Forbidden("origin not allowed"));
    }
    // A client that offered subprotocols fails the connection unless one is selected
    // (RFC 6455 §4.1 step 6 as browsers apply it): refuse clearly instead of a silent 1006.
    let protocol = if offered_binary {
        Subprotocol::Binary
    } else if offered_any {
        return Err(Reject::BadRequest(
            "no supported subprotocol offered (vncgate speaks binary)",
        ));
    } else {
        Subprotocol::None
    };
    let token = match (token, bearer) {
        (Some(t), _) => Some(PresentedToken::new(TokenSource::Subprotocol, t)),
        (None, Some(t)) => Some(PresentedToken::new(TokenSource::Bearer, t)),
        (None, None) => query
            .and_then(query_token)
            .map(|t| PresentedToken::new(TokenSource::Query, t)),
    };
    Ok(Parsed::Upgrade(UpgradeRequest {
        session_id: session_id.to_owned(),
        token,
        protocol,
        accept: accept_key(key),
        consumed,
    }))
}

/// Checks a plain GET or HEAD for what every HTTP/1.1 request needs (RFC 9112): a valid
/// Host, no body (a GET's body would be read as the next request), an origin-form target.
fn plain(
    req: &httparse::Request<'_, '_>,
    target: &str,
    head: bool,
    consumed: usize,
) -> Result<PlainRequest, Reject> {
    let mut host: Option<&[u8]> = None;
    for h in req.headers.iter() {
        if h.name.eq_ignore_ascii_case("host") {
            if host.is_some() {
                return Err(Reject::BadRequest("duplicate Host header"));
            }
            host = Some(trim(h.value));
        } else if (h.name.eq_ignore_ascii_case("content-length") && trim(h.value) != b"0")
            || h.name.eq_ignore_ascii_case("transfer-encoding")
        {
            return Err(Reject::BadRequest("a GET request has no body"));
        }
    }
    match (req.version, host) {
        // HTTP/1.0 needs no Host; HTTP/1.1 does (RFC 9112 §3.2).
        (Some(0), None) => {}
        (Some(1), None | Some(b"")) => return Err(Reject::BadRequest("missing Host header")),
        (Some(0 | 1), Some(h)) if !valid_host(h) => {
            return Err(Reject::BadRequest("invalid Host header"));
        }
        (Some(0 | 1), _) => {}
        _ => return Err(Reject::BadRequest("HTTP/1.1 required")),
    }
    if !target.starts_with('/') {
        return Err(Reject::BadRequest("request target is not a path"));
    }
    Ok(PlainRequest {
        head,
        target: target.to_owned(),
        consumed,
    })
}

/// `Sec-WebSocket-Accept` for a client key (RFC 6455 §4.2.2 item 5.4).
pub fn accept_key(key: &[u8]) -> String {
    let mut sha = Sha1::new();
    sha.update(key);
    sha.update(WS_GUID);
    B64.encode(sha.finalize())
}

/// The 101 response.
pub fn switching_protocols(accept: &str, protocol: Subprotocol) -> Vec<u8> {
    let mut out = Vec::with_capacity(160);
    out.extend_from_slice(
        b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\nSec-WebSocket-Accept: ",
    );
    out.extend_from_slice(accept.as_bytes());
    out.extend_from_slice(b"\r\n");
    if protocol == Subprotocol::Binary {
        out.extend_from_slice(b"Sec-WebSocket-Protocol: binary\r\n");
    }
    out.extend_from_slice(b"\r\n");
    out
}

/// A complete non-101 response with a one-line plain-text body, closing the connection.
pub fn error_response(status: u16, reason: &str, extra_headers: &str) -> Vec<u8> {
    let body = format!("{reason}\n");
    format!(
        "HTTP/1.1 {status} {}\r\nContent-Type: text/plain; charset=utf-8\r\nContent-Length: {}\r\nConnection: close\r\nCache-Control: no-store\r\n{extra_headers}\r\n{body}",
        status_text(status),
        body.len()
    )
    .into_bytes()
}

pub fn status_text(status: u16) -> &'static str {
    match status {
        101 => "Switching Protocols",
        200 => "OK",
        400 => "Bad Request",
        401 => "Unauthorized",
        403 => "Forbidden",
        404 => "Not Found",
        405 => "Method Not Allowed",
        408 => "Request Timeout",
        426 => "Upgrade Required",
        431 => "Request Header Fields Too Large",
        500 => "Internal Server Error",
        503 => "Service Unavailable",
        _ => "Error",
    }
}

/// Removes the query string from a request target, for logs: `?token=` must never be logged.
pub fn redact_target(target: &str) -> &str {
    target.split_once('?').map_or(target, |(p, _)| p)
}

fn query_token(query: &str) -> Option<&[u8]> {
    query
        .split('&')
        .find_map(|kv| kv.strip_prefix("token="))
        .map(str::as_bytes)
}

/// `Host = uri-host [ ":" port ]` (RFC 9112 §3.2, RFC 3986 §3.2.2): a bracketed IP literal,
/// or a reg-name / IPv4 address of unreserved, percent-encoded and sub-delim characters,
/// then optionally a colon and at most five digits. Anything else gets 400.
fn valid_host(h: &[u8]) -> bool {
    let (host_ok, port) = if let Some(rest) = h.strip_prefix(b"[") {
        let Some(end) = rest.iter().position(|&b| b == b']') else {
            return false;
        };
        let literal = &rest[..end];
        let ok = !literal.is_empty()
            && literal
                .iter()
                .all(|&b| b.is_ascii_hexdigit() || matches!(b, b':' | b'.' | b'v' | b'V'));
        match &rest[end + 1..] {
            [] => (ok, None),
            [b':', port @ ..] => (ok, Some(port)),
            _ => return false,
        }
    } else {
        let (host, port) = match h.iter().rposition(|&b| b == b':') {
            Some(i) => (&h[..i], Some(&h[i + 1..])),
            None => (h, None),
        };
        (host.iter().all(|&b| is_reg_name_byte(b)), port)
    };
    // The grammar allows an empty port (`port = *DIGIT`).
    host_ok && port.is_none_or(|p| p.len() <= 5 && p.iter().all(u8::is_ascii_digit))
}

/// unreserved / pct-encoded / sub-delims (RFC 3986 §3.2.2).
fn is_reg_name_byte(b: u8) -> bool {
    b.is_ascii_alphanumeric() || b"-._~%!$&'()*+,;=".contains(&b)
}

fn trim(v: &[u8]) -> &[u8] {
    v.trim_ascii()
}

/// Whether a comma-separated header value contains `token` (case-insensitive), as
/// `Connection: keep-alive, Upgrade` does.
fn list_contains(value: &[u8], token: &[u8]) -> bool {
    value
        .split(|&b| b == b',')
        .any(|t| trim(t).eq_ignore_ascii_case(token))
}

#[cfg(test)]
mod tests {
    use super::*;

    const NOVNC: &[u8] = b"GET /vnc/abc HTTP/1.1\r\nHost: gw:8080\r\nConnection: Upgrade\r\nPragma: no-cache\r\nUpgrade: websocket\r\nOrigin: http://localhost:8000\r\nSec-WebSocket-Version: 13\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n\r\n";

    fn cfg() -> HandshakeConfig {
        HandshakeConfig::default()
    }

    fn upgrade(buf: &[u8]) -> UpgradeRequest {
        match parse_request(buf, &cfg()).expect("valid") {
            Parsed::Upgrade(u) => u,
            other => panic!("{other:?}"),
        }
    }

    fn with_headers(extra: &str) -> Vec<u8> {
        format!(
            "GET /vnc/abc HTTP/1.1\r\nHost: gw\r\nUpgrade: websocket\r\nConnection: Upgrade\r\nSec-WebSocket-Version: 13\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n{extra}\r\n"
        )
        .into_bytes()
    }

    #[test]
    fn rfc6455_example_accept() {
        assert_eq!(
            accept_key(b"dGhlIHNhbXBsZSBub25jZQ=="),
            "s3pPLMBiTxaQ9kYGzzhZRbK+xOo="
        );
    }

    #[test]
    fn novnc_without_subprotocol_gets_no_protocol_header() {
        let u = upgrade(NOVNC);
        assert_eq!(u.session_id, "abc");
        assert_eq!(u.protocol, Subprotocol::None);
        assert_eq!(u.consumed, NOVNC.len());
        assert!(u.token.is_none());
        assert_eq!(
            switching_protocols(&u.accept, u.protocol),
            b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\nSec-WebSocket-Accept: s3pPLMBiTxaQ9kYGzzhZRbK+xOo=\r\n\r\n"
        );
    }

    #[test]
    fn binary_is_selected_and_token_protocol_never_echoed() {
        let req = with_headers("Sec-WebSocket-Protocol: binary, vncgate.token.s3cr3t\r\n");
        let u = upgrade(&req);
        assert_eq!(u.protocol, Subprotocol::Binary);
        let t = u.token.as_ref().unwrap();
        assert_eq!(
            (t.source, t.bytes()),
            (TokenSource::Subprotocol, &b"s3cr3t"[..])
        );
        assert!(
            !format!("{u:?}").contains("s3cr3t"),
            "Debug shows the token"
        );
        let resp = switching_protocols(&u.accept, u.protocol);
        let resp = String::from_utf8(resp).unwrap();
        assert!(resp.contains("Sec-WebSocket-Protocol: binary\r\n"));
        assert!(!resp.contains("s3cr3t"));
    }

    #[test]
    fn token_sources_in_priority_order() {
        let q = b"GET /vnc/abc?x=1&token=fromquery HTTP/1.1\r\nHost: gw\r\nUpgrade: websocket\r\nConnection: Upgrade\r\nSec-WebSocket-Version: 13\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n\r\n";
        let t = upgrade(q).token.unwrap();
        assert_eq!(
            (t.source, t.bytes()),
            (TokenSource::Query, &b"fromquery"[..])
        );
        let b = with_headers("Authorization: Bearer frombearer\r\n");
        let t = upgrade(&b).token.unwrap();
        assert_eq!(
            (t.source, t.bytes()),
            (TokenSource::Bearer, &b"frombearer"[..])
        );
        // All three: the subprotocol wins, then the bearer header, then the query.
        let all = String::from_utf8(with_headers(
            "Authorization: Bearer b\r\nSec-WebSocket-Protocol: binary, vncgate.token.p\r\n",
        ))
        .unwrap()
        .replacen("/vnc/abc", "/vnc/abc?token=q", 1);
        let t = upgrade(all.as_bytes()).token.unwrap();
        assert_eq!((t.source, t.bytes()), (TokenSource::Subprotocol, &b"p"[..]));
        let two = with_headers("Authorization: Bearer b\r\n")
            .replace_bytes("/vnc/abc", "/vnc/abc?token=q");
        assert_eq!(upgrade(&two).token.unwrap().bytes(), b"b");
    }

    #[test]
    fn the_path_segment_is_returned_as_sent() {
        // Whether `a%20b` is a session id is the gateway's rule (vncgate-schema), not the
        // protocol's: the segment comes back as it was sent.
        let req = with_headers("").replace_bytes("/vnc/abc", "/vnc/a%20b");
        assert_eq!(upgrade(&req).session_id, "a%20b");
    }

    #[test]
    fn a_request_with_a_body_is_refused() {
        for h in [
            "Content-Length: 10\r\n",
            "Content-Length: 00\r\n",
            "Content-Length: x\r\n",
            "Transfer-Encoding: chunked\r\n",
            "Transfer-Encoding: identity\r\n",
        ] {
            assert_eq!(
                reject(&with_headers(h)),
                Reject::BadRequest("an upgrade request has no body"),
                "{h:?}"
            );
        }
        // An explicit empty body is no body.
        assert_eq!(
            upgrade(&with_headers("Content-Length: 0\r\n")).session_id,
            "abc"
        );
    }

    #[test]
    fn host_must_be_a_host() {
        for ok in [
            "gw",
            "gw:8080",
            "127.0.0.1:80",
            "[::1]:8080",
            "[::1]",
            "xn--bcher-kva.example",
            "gw:",
        ] {
            let req = with_headers("").replace_bytes("Host: gw", &format!("Host: {ok}"));
            assert_eq!(upgrade(&req).session_id, "abc", "{ok}");
        }
        for bad in [
            "a b",
            "gw:80:80",
            "gw:http",
            "[::1",
            "[::1]x",
            "[]:80",
            "gw:123456",
            "a/b",
            "a@b",
        ] {
            let req = with_headers("").replace_bytes("Host: gw", &format!("Host: {bad}"));
            assert_eq!(
                reject(&req),
                Reject::BadRequest("invalid Host header"),
                "{bad}"
            );
        }
    }

    #[test]
    fn connection_token_list_and_case() {
        let req = b"GET /vnc/abc HTTP/1.1\r\nhost: gw\r\nupgrade: WebSocket\r\nconnection: keep-alive, Upgrade\r\nsec-websocket-version: 13\r\nsec-websocket-key: dGhlIHNhbXBsZSBub25jZQ==\r\n\r\n";
        assert_eq!(upgrade(req).session_id, "abc");
    }

    #[test]
    fn partial_until_blank_line_at_every_split() {
        for cut in 0..NOVNC.len() {
            assert!(matches!(
                parse_request(&NOVNC[..cut], &cfg()),
                Ok(Parsed::Partial)
            ));
        }
    }

    #[test]
    fn early_frame_bytes_are_not_consumed() {
        let mut buf = NOVNC.to_vec();
        buf.extend_from_slice(&[0x82, 0x80, 1, 2, 3, 4]);
        assert_eq!(upgrade(&buf).consumed, NOVNC.len());
    }

    fn reject(buf: &[u8]) -> Reject {
        match parse_request(buf, &cfg()) {
            Err(r) => r,
            Ok(p) => panic!("accepted: {p:?}"),
        }
    }

    #[test]
    fn rejections_get_precise_statuses() {
        assert_eq!(reject(b"GARBAGE\r\n\r\n").status(), 400);
        assert_eq!(
            reject(b"GET /vnc/abc HTTP/1.1\r\nHost : gw\r\n\r\n").status(),
            400,
            "whitespace before colon"
        );
        assert_eq!(
            reject(&with_headers("").replace_bytes("GET", "POST")),
            Reject::MethodNotAllowed
        );
        assert_eq!(
            reject(&with_headers("").replace_bytes("HTTP/1.1", "HTTP/1.0")).status(),
            400
        );
        assert_eq!(
            reject(&with_headers("").replace_bytes("/vnc/abc", "/other/abc")),
            Reject::NotFound
        );
        assert_eq!(
            reject(&with_headers("").replace_bytes("/vnc/abc", "/vnc/")),
            Reject::NotFound
        );
        assert_eq!(
            reject(&with_headers("").replace_bytes("Upgrade: websocket\r\n", "")).status(),
            426
        );
        assert_eq!(
            reject(&with_headers("").replace_bytes("Connection: Upgrade\r\n", "")).status(),
            400
        );
        assert_eq!(
            reject(&with_headers("").replace_bytes("Host: gw\r\n", "")).status(),
            400
        );
        assert_eq!(
            reject(&with_headers("").replace_bytes("Version: 13", "Version: 8")).status(),
            426
        );
        assert_eq!(
            reject(&with_headers("").replace_bytes("dGhlIHNhbXBsZSBub25jZQ==", "c2hvcnQ="))
                .status(),
            400
        );
        assert_eq!(
            reject(&with_headers("Sec-WebSocket-Protocol: base64\r\n")).status(),
            400
        );
    }

    #[test]
    fn duplicated_security_headers_are_refused() {
        // An empty first Host must not let a second one through; the last Origin or
        // Version must not override the first.
        let empty_first =
            with_headers("").replace_bytes("Host: gw\r\n", "Host: \r\nHost: evil\r\n");
        assert_eq!(reject(&empty_first).status(), 400);
        for dup in [
            "Origin: https://evil.example\r\nOrigin: https://app.example\r\n",
            "Sec-WebSocket-Version: 8\r\n",
        ] {
            let req = with_headers(dup);
            let r = reject(&req);
            assert_eq!(r.status(), 400, "{dup:?}: {r:?}");
        }
    }

    #[test]
    fn upgrade_required_carries_version_header() {
        let resp = Reject::UpgradeRequired("x").response();
        let resp = String::from_utf8(resp).unwrap();
        assert!(resp.starts_with("HTTP/1.1 426 Upgrade Required\r\n"));
        assert!(resp.contains("\r\nSec-WebSocket-Version: 13\r\n"));
        assert!(resp.ends_with("\r\n\r\nx\n"));
    }

    #[test]
    fn oversized_head_is_431() {
        let mut big = b"GET /vnc/abc HTTP/1.1\r\nHost: gw\r\nX-Pad: ".to_vec();
        big.resize(9000, b'a');
        assert_eq!(reject(&big), Reject::HeadersTooLarge);
        let many: String = (0..60).map(|i| format!("X-{i}: v\r\n")).collect();
        assert_eq!(reject(&with_headers(&many)), Reject::HeadersTooLarge);
    }

    #[test]
    fn origin_allowlist() {
        let mut c = cfg();
        c.allowed_origins = vec!["https://app.example".into()];
        let ok = with_headers("Origin: https://APP.example\r\n");
        assert!(matches!(parse_request(&ok, &c), Ok(Parsed::Upgrade(_))));
        let bad = with_headers("Origin: https://evil.example\r\n");
        assert_eq!(
            parse_request(&bad, &c).unwrap_err(),
            Reject::Forbidden("origin not allowed")
        );
        // No Origin header: a non-browser client, allowed.
        assert!(matches!(
            parse_request(&with_headers(""), &c),
            Ok(Parsed::Upgrade(_))
        ));
    }

    #[test]
    fn plain_requests_only_when_asked() {
        let get = b"GET /vnc.html?x=1 HTTP/1.1\r\nHost: gw\r\n\r\n";
        // Without files to serve: refused as before (outside the prefix: 404; inside: 426).
        assert_eq!(reject(get).status(), 404);
        assert_eq!(
            reject(b"GET /vnc/abc HTTP/1.1\r\nHost: gw\r\n\r\n").status(),
            426
        );
        let c = HandshakeConfig {
            plain_requests: true,
            ..cfg()
        };
        match parse_request(get, &c) {
            Ok(Parsed::Plain(p)) => {
                assert_eq!(
                    (p.head, p.target.as_str(), p.consumed),
                    (false, "/vnc.html?x=1", get.len())
                );
            }
            other => panic!("{other:?}"),
        }
        let head = b"HEAD / HTTP/1.0\r\n\r\n";
        assert!(matches!(
            parse_request(head, &c),
            Ok(Parsed::Plain(PlainRequest { head: true, .. }))
        ));
        for (bad, why) in [
            (&b"GET / HTTP/1.1\r\n\r\n"[..], "missing Host header"),
            (
                b"GET / HTTP/1.1\r\nHost: a b\r\n\r\n",
                "invalid Host header",
            ),
            (
                b"GET / HTTP/1.1\r\nHost: gw\r\nContent-Length: 3\r\n\r\n",
                "a GET request has no body",
            ),
            (
                b"GET * HTTP/1.1\r\nHost: gw\r\n\r\n",
                "request target is not a path",
            ),
        ] {
            assert_eq!(parse_request(bad, &c).unwrap_err(), Reject::BadRequest(why));
        }
        // An upgrade is still an upgrade, and other methods still get 405.
        assert!(matches!(parse_request(NOVNC, &c), Ok(Parsed::Upgrade(_))));
        assert_eq!(
            parse_request(b"POST / HTTP/1.1\r\nHost: gw\r\n\r\n", &c).unwrap_err(),
            Reject::MethodNotAllowed
        );
    }

    #[test]
    fn any_path_takes_the_whole_path() {
        let c = HandshakeConfig {
            any_path: true,
            ..cfg()
        };
        for (path, id) in [
            ("/websockify?token=t", "/websockify"),
            ("/", "/"),
            ("/a/b/c", "/a/b/c"),
        ] {
            let req = with_headers("").replace_bytes("/vnc/abc", path);
            match parse_request(&req, &c) {
                Ok(Parsed::Upgrade(u)) => assert_eq!(u.session_id, id),
                other => panic!("{path}: {other:?}"),
            }
        }
    }

    #[test]
    fn redacts_query() {
        assert_eq!(redact_target("/vnc/a?token=secret"), "/vnc/a");
        assert_eq!(redact_target("/vnc/a"), "/vnc/a");
    }

    trait ReplaceBytes {
        fn replace_bytes(&self, from: &str, to: &str) -> Vec<u8>;
    }
    impl ReplaceBytes for Vec<u8> {
        fn replace_bytes(&self, from: &str, to: &str) -> Vec<u8> {
            String::from_utf8(self.clone())
                .unwrap()
                .replacen(from, to, 1)
                .into_bytes()
        }
    }
}
