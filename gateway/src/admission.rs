//! Admission: whether a parsed upgrade request becomes a relayed session, as pure functions.
//!
//! A connection's fate before the relay is decided here, from the request, the route lookup's
//! answer and a snapshot of the worker ([`Gate`]), without sockets or awaits: an HTTP
//! refusal with its status, reason and blame; an upgrade that closes at once with a named
//! cause (the session expired, the route points outside the upstream policy); or an admission
//! with what the relay needs. `server::session` carries the decision out; the tests below
//! pin every branch.
//!
//! The order of the checks is what a client learns first: a malformed session id or token
//! (400) before any lookup; then the route (404 unknown, 503 source down); the token (401,
//! 403); the gateway's own state (503 draining, 503 at capacity); and only then, after the
//! 101 so that the browser sees the reason, expiry and upstream policy. The viewer limit is
//! the one check that claims something shared between workers (a slot, under an atomic
//! counter), so the decision names the limit and the session claims the slot.

use std::net::SocketAddr;
use std::time::{Duration, SystemTime};

use vncgate_ws::handshake::{PresentedToken, Reject, error_response};

use crate::close::{self, Blame, CloseCause};
use crate::policy::UpstreamPolicy;
use crate::route::{Denied, Role, Route, Unavailable};
use crate::token::Token;

/// An upgrade refused before the 101: an HTTP status, the reason in its body and its log
/// line, its metric label (`name`: one of a fixed set, see [`refusals`]), extra response
/// headers, and whose fault it is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Refusal {
    pub status: u16,
    pub name: &'static str,
    pub reason: &'static str,
    pub headers: &'static str,
    pub blame: Blame,
}

impl Refusal {
    pub const fn new(status: u16, name: &'static str, reason: &'static str, blame: Blame) -> Self {
        Self {
            status,
            name,
            reason,
            headers: "",
            blame,
        }
    }

    const fn with_headers(mut self, headers: &'static str) -> Self {
        self.headers = headers;
        self
    }

    /// The whole HTTP response.
    pub fn response(&self) -> Vec<u8> {
        error_response(self.status, self.reason, self.headers)
    }

    /// A refusal by the protocol core (malformed request, wrong headers, origin): always
    /// the client's doing. The metric label names the kind of rejection; its detail ("duplicate
    /// Host header") stays in the body and the log.
    pub fn from_reject(r: Reject) -> Self {
        let name = match r {
            Reject::BadRequest(_) => "bad_request",
            Reject::MethodNotAllowed => "method_not_allowed",
            Reject::UpgradeRequired(_) => "upgrade_required",
            Reject::HeadersTooLarge => "headers_too_large",
            Reject::NotFound => "path_not_found",
            Reject::Forbidden(_) => "origin_not_allowed",
        };
        Refusal::new(r.status(), name, r.reason(), Blame::Browser).with_headers(r.extra_headers())
    }
}

pub const HANDSHAKE_TIMEOUT: Refusal = Refusal::new(
    408,
    "handshake_timeout",
    "upgrade request not received in time",
    Blame::Browser,
);
/// Plain HTTP on a `wss://` listener (`--tls-cert`), answered in plain text.
pub const TLS_REQUIRED: Refusal = Refusal::new(
    400,
    "tls_required",
    "this port speaks TLS: connect with wss:// (https://)",
    Blame::Browser,
);
pub const INVALID_SESSION_ID: Refusal = Refusal::new(
    400,
    "invalid_session_id",
    "invalid session id",
    Blame::Browser,
);
pub const UNKNOWN_SESSION: Refusal =
    Refusal::new(404, "unknown_session", "unknown session", Blame::Browser);
pub const TOKEN_REQUIRED: Refusal =
    Refusal::new(401, "token_required", "token required", Blame::Browser)
        .with_headers("WWW-Authenticate: Bearer realm=\"vncgate\"\r\n");
pub const INVALID_TOKEN: Refusal =
    Refusal::new(403, "invalid_token", "invalid token", Blame::Browser);
pub const DRAINING: Refusal = Refusal::new(503, "draining", "gateway draining", Blame::Policy)
    .with_headers("Retry-After: 1\r\n");
pub const AT_CAPACITY: Refusal =
    Refusal::new(503, "at_capacity", "gateway at capacity", Blame::Policy)
        .with_headers("Retry-After: 1\r\n");

/// The route source could not answer ("redis unavailable", "redis lookup timed out",
/// "route record invalid"...): the gateway's side of the failure.
pub fn source_unavailable(e: Unavailable) -> Refusal {
    Refusal::new(503, "routes_unavailable", e.0, Blame::Gateway).with_headers("Retry-After: 1\r\n")
}

/// A token with characters or a length no token has ("token has invalid characters").
fn malformed_token(reason: &'static str) -> Refusal {
    Refusal::new(400, "malformed_token", reason, Blame::Browser)
}

/// The metric label of a client that left during the handshake: counted with the refusals
/// (status `none`), though nothing is answered.
pub const CLIENT_GONE: &str = "client_gone";

/// Every refusal the gateway can answer, by metric label (`status`, `name`, `blame`), so that
/// each is registered at zero from the start. A refusal added above and not here fails
/// `every_refusal_is_in_the_registered_set`.
pub fn refusals() -> Vec<Refusal> {
    let mut all = vec![
        HANDSHAKE_TIMEOUT,
        INVALID_SESSION_ID,
        malformed_token(""),
        UNKNOWN_SESSION,
        source_unavailable(Unavailable("")),
        TOKEN_REQUIRED,
        INVALID_TOKEN,
        DRAINING,
        AT_CAPACITY,
        TLS_REQUIRED,
        crate::websockify::UNKNOWN_TOKEN,
    ];
    all.extend(crate::web::refusals());
    all.extend(
        [
            Reject::BadRequest(""),
            Reject::MethodNotAllowed,
            Reject::UpgradeRequired(""),
            Reject::HeadersTooLarge,
            Reject::NotFound,
            Reject::Forbidden(""),
        ]
        .map(Refusal::from_reject),
    );
    all
}

/// What the request asks for, checked before anything is looked up.
#[derive(Debug)]
pub struct Ask {
    pub session_id: String,
    /// The presented token, hashed; its plaintext stays with the request.
    pub token: Option<Token>,
}

/// Checks the session id (the schema's rule, the same one the controller writes with) and
/// the token's syntax, and hashes the token.
pub fn ask(session_id: &str, token: Option<&PresentedToken>) -> Result<Ask, Refusal> {
    vncgate_schema::check_session_id(session_id).map_err(|_| INVALID_SESSION_ID)?;
    let token = token
        .map(Token::presented)
        .transpose()
        .map_err(malformed_token)?;
    Ok(Ask {
        session_id: session_id.to_owned(),
        token,
    })
}

/// The worker's state at the moment of the decision.
#[derive(Debug, Clone, Copy)]
pub struct Gate<'a> {
    pub draining: bool,
    /// Sessions this worker holds now, and how many it may.
    pub sessions: usize,
    pub max_sessions: usize,
    /// Viewers per session where the route does not say (0: unlimited).
    pub default_max_viewers: u32,
    pub policy: &'a UpstreamPolicy,
    pub now: SystemTime,
}

/// A session let in: what the relay needs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Admit {
    pub upstream: SocketAddr,
    /// The session's viewer limit (0: unlimited), for the slot the session claims.
    pub viewer_limit: u32,
    /// Time left before the route expires; `None` without expiry.
    pub expires_in: Option<Duration>,
    /// Full, or view-only (the view token): the relay then filters the browser's input.
    pub role: Role,
    /// The route asks for its sessions to be recorded.
    pub record: bool,
}

/// What happens to the connection.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Decision {
    /// Answer with this HTTP error and close.
    Refuse(Refusal),
    /// Complete the upgrade, then close at once with this cause.
    Close(CloseCause),
    Admit(Admit),
}

/// Decides a request whose session id and token passed [`ask`], given the route lookup's
/// answer.
pub fn decide(ask: &Ask, lookup: Result<Option<&Route>, Unavailable>, gate: &Gate) -> Decision {
    let route = match lookup {
        Ok(Some(r)) => r,
        Ok(None) => return Decision::Refuse(UNKNOWN_SESSION),
        Err(e) => return Decision::Refuse(source_unavailable(e)),
    };
    let role = match route.authorize(ask.token.as_ref()) {
        Ok(role) => role,
        Err(Denied::MissingToken) => return Decision::Refuse(TOKEN_REQUIRED),
        Err(Denied::BadToken) => return Decision::Refuse(INVALID_TOKEN),
    };
    if gate.draining {
        return Decision::Refuse(DRAINING);
    }
    if gate.sessions >= gate.max_sessions {
        return Decision::Refuse(AT_CAPACITY);
    }
    let expires_in = route.time_left(gate.now);
    if expires_in == Some(Duration::ZERO) {
        return Decision::Close(close::SESSION_EXPIRED);
    }
    if !gate.policy.allows(&route.upstream) {
        return Decision::Close(close::UPSTREAM_FORBIDDEN);
    }
    Decision::Admit(Admit {
        upstream: route.upstream,
        viewer_limit: route.max_viewers.unwrap_or(gate.default_max_viewers),
        expires_in,
        role,
        record: route.record,
    })
}

#[cfg(test)]
mod tests {
    use std::time::UNIX_EPOCH;

    use vncgate_ws::handshake::TokenSource;

    use super::*;

    fn policy() -> UpstreamPolicy {
        UpstreamPolicy::new(vec![crate::policy::parse_cidr("10.0.0.0/8").unwrap()])
    }

    fn route() -> Route {
        Route {
            upstream: "10.0.0.5:6080".parse().unwrap(),
            token_digest: Some(Token::digest_of(b"s3cr3t")),
            view_token_digest: None,
            expires_at: Some(2_000),
            max_viewers: None,
            record: false,
        }
    }

    fn gate(p: &UpstreamPolicy) -> Gate<'_> {
        Gate {
            draining: false,
            sessions: 0,
            max_sessions: 10,
            default_max_viewers: 3,
            policy: p,
            now: UNIX_EPOCH + Duration::from_secs(1_000),
        }
    }

    fn with_token(t: &[u8]) -> Ask {
        ask("s1", Some(&PresentedToken::new(TokenSource::Query, t))).unwrap()
    }

    #[test]
    fn a_good_request_is_admitted_with_what_the_relay_needs() {
        let p = policy();
        let d = decide(&with_token(b"s3cr3t"), Ok(Some(&route())), &gate(&p));
        assert_eq!(
            d,
            Decision::Admit(Admit {
                upstream: "10.0.0.5:6080".parse().unwrap(),
                viewer_limit: 3,
                expires_in: Some(Duration::from_secs(1_000)),
                role: Role::Full,
                record: false,
            })
        );
        let mut r = route();
        r.max_viewers = Some(0);
        r.expires_at = None;
        let Decision::Admit(a) = decide(&with_token(b"s3cr3t"), Ok(Some(&r)), &gate(&p)) else {
            panic!()
        };
        assert_eq!((a.viewer_limit, a.expires_in), (0, None));
    }

    #[test]
    fn the_view_token_admits_a_view_only_viewer_with_the_same_checks() {
        let p = policy();
        let g = gate(&p);
        let mut r = route();
        r.view_token_digest = Some(Token::digest_of(b"watch"));
        let role = |t: &[u8], g: &Gate| match decide(&with_token(t), Ok(Some(&r)), g) {
            Decision::Admit(a) => Ok(a.role),
            Decision::Refuse(f) => Err(f.status),
            other => panic!("{other:?}"),
        };
        assert_eq!(role(b"watch", &g), Ok(Role::ViewOnly));
        assert_eq!(role(b"s3cr3t", &g), Ok(Role::Full));
        assert_eq!(role(b"wrong", &g), Err(403));
        // The view token meets the same gateway state as the full one.
        let draining = Gate {
            draining: true,
            ..g
        };
        assert_eq!(role(b"watch", &draining), Err(503));
        r.expires_at = Some(1_000);
        assert_eq!(
            decide(&with_token(b"watch"), Ok(Some(&r)), &g),
            Decision::Close(close::SESSION_EXPIRED)
        );
    }

    #[test]
    fn ids_and_tokens_are_checked_before_any_lookup() {
        assert_eq!(ask("a%20b", None).unwrap_err(), INVALID_SESSION_ID);
        assert_eq!(ask(&"x".repeat(129), None).unwrap_err(), INVALID_SESSION_ID);
        let bad = PresentedToken::new(TokenSource::Bearer, b"a\x01b");
        let r = ask("s1", Some(&bad)).unwrap_err();
        assert_eq!((r.status, r.blame), (400, Blame::Browser));
        assert!(ask("s1", None).unwrap().token.is_none());
    }

    #[test]
    fn every_refusal_in_order_with_its_blame() {
        let p = policy();
        let g = gate(&p);
        let ok = with_token(b"s3cr3t");
        let refuse = |d: Decision| match d {
            Decision::Refuse(r) => (r.status, r.reason, r.blame),
            other => panic!("{other:?}"),
        };
        assert_eq!(
            refuse(decide(&ok, Ok(None), &g)),
            (404, "unknown session", Blame::Browser)
        );
        assert_eq!(
            refuse(decide(&ok, Err(Unavailable("redis unavailable")), &g)),
            (503, "redis unavailable", Blame::Gateway)
        );
        let none = ask("s1", None).unwrap();
        assert_eq!(
            refuse(decide(&none, Ok(Some(&route())), &g)),
            (401, "token required", Blame::Browser)
        );
        assert_eq!(
            refuse(decide(&with_token(b"wrong"), Ok(Some(&route())), &g)),
            (403, "invalid token", Blame::Browser)
        );
        // A wrong token is refused before the gateway says it is draining: nobody learns
        // the gateway's state without the session's token.
        let draining = Gate {
            draining: true,
            ..g
        };
        assert_eq!(
            refuse(decide(&with_token(b"wrong"), Ok(Some(&route())), &draining)).0,
            403
        );
        assert_eq!(
            refuse(decide(&ok, Ok(Some(&route())), &draining)),
            (503, "gateway draining", Blame::Policy)
        );
        let full = Gate { sessions: 10, ..g };
        assert_eq!(
            refuse(decide(&ok, Ok(Some(&route())), &full)),
            (503, "gateway at capacity", Blame::Policy)
        );
    }

    #[test]
    fn expiry_and_policy_close_after_the_upgrade() {
        let p = policy();
        let g = gate(&p);
        let ok = with_token(b"s3cr3t");
        let mut expired = route();
        expired.expires_at = Some(1_000);
        assert_eq!(
            decide(&ok, Ok(Some(&expired)), &g),
            Decision::Close(close::SESSION_EXPIRED)
        );
        let mut outside = route();
        outside.upstream = "192.168.1.1:6080".parse().unwrap();
        assert_eq!(
            decide(&ok, Ok(Some(&outside)), &g),
            Decision::Close(close::UPSTREAM_FORBIDDEN)
        );
        // Expired wins over the policy: the route is over whatever it points at.
        outside.expires_at = Some(10);
        assert_eq!(
            decide(&ok, Ok(Some(&outside)), &g),
            Decision::Close(close::SESSION_EXPIRED)
        );
    }

    fn label(r: &Refusal) -> (u16, &'static str, Blame) {
        (r.status, r.name, r.blame)
    }

    #[test]
    fn refusal_labels_are_snake_case_and_name_one_status() {
        let all = refusals();
        for (i, a) in all.iter().enumerate() {
            assert!(
                !a.name.is_empty() && a.name.bytes().all(|b| b.is_ascii_lowercase() || b == b'_'),
                "{}",
                a.name
            );
            for b in &all[i + 1..] {
                assert_ne!(a.name, b.name, "two refusals share a label");
            }
        }
        assert!(!all.iter().any(|r| r.name == CLIENT_GONE));
    }

    #[test]
    fn every_refusal_is_in_the_registered_set() {
        let registered: Vec<_> = refusals().iter().map(label).collect();
        let mut seen = Vec::new();
        // What `decide` and `ask` refuse.
        let p = policy();
        let g = gate(&p);
        let ok = with_token(b"s3cr3t");
        let draining = Gate {
            draining: true,
            ..g
        };
        let full = Gate { sessions: 10, ..g };
        let none = ask("s1", None).unwrap();
        for (a, lookup, gate) in [
            (&ok, Ok(None), &g),
            (&ok, Err(Unavailable("redis lookup timed out")), &g),
            (&none, Ok(Some(&route())), &g),
            (&with_token(b"wrong"), Ok(Some(&route())), &g),
            (&ok, Ok(Some(&route())), &draining),
            (&ok, Ok(Some(&route())), &full),
        ] {
            match decide(a, lookup, gate) {
                Decision::Refuse(r) => seen.push(r),
                other => panic!("{other:?}"),
            }
        }
        seen.push(ask("a b", None).unwrap_err());
        let bad = PresentedToken::new(TokenSource::Query, b"a\x01b");
        seen.push(ask("s1", Some(&bad)).unwrap_err());
        seen.push(HANDSHAKE_TIMEOUT);
        // Plain HTTP on a TLS listener (gateway/tests/tls.rs drives it through the binary).
        seen.push(TLS_REQUIRED);
        // A token the token file lacks, and the web root's refusals (gateway/tests/web.rs
        // and websockify.rs drive them through the binary; web.rs's unit tests each path).
        seen.push(crate::websockify::UNKNOWN_TOKEN);
        seen.extend(crate::web::refusals());
        // What the protocol core rejects, one request per kind of rejection.
        let cfg = vncgate_ws::handshake::HandshakeConfig {
            allowed_origins: vec!["https://ok.example".into()],
            ..Default::default()
        };
        let good = "GET /vnc/s1 HTTP/1.1\r\nHost: gw\r\nUpgrade: websocket\r\nConnection: Upgrade\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n";
        let requests = [
            "GET /vnc/s1 HTTP/1.0\r\n\r\n".to_owned(),
            "POST /vnc/s1 HTTP/1.1\r\nHost: gw\r\n\r\n".to_owned(),
            "GET /vnc/s1 HTTP/1.1\r\nHost: gw\r\n\r\n".to_owned(),
            "GET /x HTTP/1.1\r\nHost: gw\r\n\r\n".to_owned(),
            format!("{good}Origin: https://evil.example\r\n\r\n"),
            format!("{good}{}\r\n", "X-Pad: y\r\n".repeat(2000)),
        ];
        let mut kinds = Vec::new();
        for req in &requests {
            match vncgate_ws::handshake::parse_request(req.as_bytes(), &cfg) {
                Err(r) => {
                    kinds.push(r.status());
                    seen.push(Refusal::from_reject(r));
                }
                Ok(_) => panic!("accepted: {req}"),
            }
        }
        kinds.sort();
        assert_eq!(
            kinds,
            [400, 403, 404, 405, 426, 431],
            "one request per kind"
        );
        for r in &seen {
            assert!(registered.contains(&label(r)), "{r:?} is not registered");
        }
        // And nothing registered that no path above produced.
        for l in &registered {
            assert!(
                seen.iter().any(|r| label(r) == *l),
                "{l:?} registered but never refused"
            );
        }
    }

    #[test]
    fn refusals_are_complete_responses() {
        let r = String::from_utf8(TOKEN_REQUIRED.response()).unwrap();
        assert!(r.starts_with("HTTP/1.1 401 Unauthorized\r\n"), "{r}");
        assert!(
            r.contains("\r\nWWW-Authenticate: Bearer realm=\"vncgate\"\r\n"),
            "{r}"
        );
        let r = String::from_utf8(DRAINING.response()).unwrap();
        assert!(r.contains("\r\nRetry-After: 1\r\n") && r.ends_with("gateway draining\n"));
        let up = Refusal::from_reject(Reject::UpgradeRequired("x"));
        assert!(
            String::from_utf8(up.response())
                .unwrap()
                .contains("Sec-WebSocket-Version: 13")
        );
    }
}
