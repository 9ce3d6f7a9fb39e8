//! Where sessions go: the route record, the [`RouteSource`] trait, and the static sources.
//!
//! A route maps a session id to the VM's RFB address, the digest of the session's token (and
//! of a view-only token, whose viewers the gateway lets watch but not act) and an optional
//! expiry. The Redis source (per-worker cache, pub/sub invalidation) plugs in
//! behind the same trait. The static source here serves `--route ID=HOST:PORT` flags (no
//! token: for development and benchmarks) and a routes file with tokens.

use std::collections::HashMap;
use std::net::{SocketAddr, ToSocketAddrs as _};
use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use serde::Deserialize;

use vncgate_schema::check_session_id;

use crate::token::{Token, TokenDigest, parse_digest_hex};

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Route {
    pub upstream: SocketAddr,
    /// SHA-256 of the session token; `None` admits any client (development routes).
    pub token_digest: Option<TokenDigest>,
    /// SHA-256 of the view-only token: its viewers get the desktop, and the relay drops their
    /// input (`server::view_only`). Only with `token_digest`.
    pub view_token_digest: Option<TokenDigest>,
    /// When the session ends, as seconds since the Unix epoch.
    pub expires_at: Option<u64>,
    /// Concurrent connections allowed; `None` takes `--max-viewers`, `Some(0)` is unlimited.
    pub max_viewers: Option<u32>,
    /// Record this route's sessions (with `--record DIR`; see `server::record`).
    pub record: bool,
}

/// What an admitted client may do.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Role {
    /// Everything: the full token, or a route without one.
    Full,
    /// Watch only: the view-only token. The relay filters the client's RFB stream.
    ViewOnly,
}

/// Why a client may not use a route, decided before the upgrade.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Denied {
    /// 401: the route needs a token and none was presented.
    MissingToken,
    /// 403: the token does not match.
    BadToken,
}

impl From<vncgate_schema::RouteRecord> for Route {
    fn from(r: vncgate_schema::RouteRecord) -> Self {
        Route {
            upstream: r.upstream,
            token_digest: r.token_sha256,
            view_token_digest: r.view_token_sha256,
            expires_at: r.expires_at,
            max_viewers: r.max_viewers,
            record: r.record,
        }
    }
}

impl Route {
    /// The role the presented token gives. Both digests are compared, each in constant
    /// time and both always, so the time taken says neither whether nor which one matched.
    /// A view token on a route without a full token (which writers refuse) still gives only
    /// a view; every other client of such a route acts, as on any route without a token.
    pub fn authorize(&self, token: Option<&Token>) -> Result<Role, Denied> {
        let view = match (&self.view_token_digest, token) {
            (Some(d), Some(t)) => t.matches_digest(d),
            _ => false,
        };
        let full = match (&self.token_digest, token) {
            (Some(d), Some(t)) => t.matches_digest(d),
            _ => false,
        };
        match (&self.token_digest, token) {
            _ if full => Ok(Role::Full),
            _ if view => Ok(Role::ViewOnly),
            (None, _) => Ok(Role::Full),
            (Some(_), None) => Err(Denied::MissingToken),
            (Some(_), Some(_)) => Err(Denied::BadToken),
        }
    }

    /// Time left before expiry at `now`: `None` for no expiry, zero once expired.
    pub fn time_left(&self, now: SystemTime) -> Option<Duration> {
        let at = UNIX_EPOCH + Duration::from_secs(self.expires_at?);
        Some(at.duration_since(now).unwrap_or(Duration::ZERO))
    }
}

/// A lookup that could not be answered (the source is down): 503 before the upgrade.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error("route source unavailable: {0}")]
pub struct Unavailable(pub &'static str);

/// Whether a route source that can fail (Redis) answers now: read by `/readyz`, and by
/// workers to fail uncached lookups at once instead of waiting out a deadline.
#[derive(Debug)]
pub struct SourceHealth {
    name: &'static str,
    up: AtomicBool,
    why: Mutex<String>,
}

impl SourceHealth {
    pub fn new(name: &'static str) -> Self {
        Self {
            name,
            up: AtomicBool::new(false),
            why: Mutex::new("not connected yet".into()),
        }
    }

    pub fn name(&self) -> &'static str {
        self.name
    }

    pub fn is_up(&self) -> bool {
        self.up.load(Ordering::Acquire)
    }

    /// Marks the source up; returns whether it was down.
    pub fn set_up(&self) -> bool {
        !self.up.swap(true, Ordering::AcqRel)
    }

    /// Marks the source down with a reason; returns whether it was up.
    pub fn set_down(&self, why: String) -> bool {
        *self.why.lock().unwrap_or_else(|p| p.into_inner()) = why;
        self.up.swap(false, Ordering::AcqRel)
    }

    /// Why the source is down (the last failure).
    pub fn why(&self) -> String {
        self.why.lock().unwrap_or_else(|p| p.into_inner()).clone()
    }
}

/// A change to a route that live sessions must follow.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum RouteChange {
    /// The route is gone: its sessions close with 4006 (revoked) or 4005 (expired).
    Removed { session: String, expired: bool },
    /// The route was rewritten: its sessions take up the new expiry.
    Changed { session: String },
}

/// A source of routes, queried once per upgrade by a worker. Implementations are used from
/// one worker thread each, so the future need not be `Send`.
pub trait RouteSource: 'static {
    fn lookup(
        &self,
        session_id: &str,
    ) -> impl std::future::Future<Output = Result<Option<Arc<Route>>, Unavailable>>;

    /// Route changes since the last call, for the worker to apply to its live sessions
    /// (called when the source's bell rings, and every housekeeping tick). Immutable
    /// sources have none.
    fn changes(&self) -> Vec<RouteChange> {
        Vec::new()
    }

    /// The receiving end of a bell the source rings from another thread when it has news
    /// (answers, changes); taken once by the worker, which then calls [`Self::changes`].
    fn bell(&self) -> Option<std::os::unix::net::UnixStream> {
        None
    }
}

/// An immutable in-memory table, shared read-only by all workers.
#[derive(Debug, Clone, Default)]
pub struct StaticRoutes {
    routes: Arc<HashMap<String, Arc<Route>>>,
}

impl StaticRoutes {
    pub fn new(routes: HashMap<String, Route>) -> Self {
        Self {
            routes: Arc::new(routes.into_iter().map(|(k, v)| (k, Arc::new(v))).collect()),
        }
    }

    pub fn len(&self) -> usize {
        self.routes.len()
    }

    pub fn is_empty(&self) -> bool {
        self.routes.is_empty()
    }

    pub fn iter(&self) -> impl Iterator<Item = (&String, &Arc<Route>)> {
        self.routes.iter()
    }

    pub fn get(&self, session_id: &str) -> Option<&Arc<Route>> {
        self.routes.get(session_id)
    }
}

impl RouteSource for StaticRoutes {
    async fn lookup(&self, session_id: &str) -> Result<Option<Arc<Route>>, Unavailable> {
        Ok(self.routes.get(session_id).cloned())
    }
}

/// Resolves `HOST:PORT` once, at load time (workers never resolve names).
pub fn resolve(addr: &str) -> Result<SocketAddr, String> {
    addr.to_socket_addrs()
        .map_err(|e| format!("cannot resolve '{addr}': {e}"))?
        .next()
        .ok_or_else(|| format!("'{addr}' resolves to no address"))
}

/// Parses a `--route ID=HOST:PORT` flag.
pub fn parse_route_flag(s: &str) -> Result<(String, Route), String> {
    let (id, addr) = s
        .split_once('=')
        .ok_or_else(|| format!("route '{s}' is not ID=HOST:PORT"))?;
    check_session_id(id)?;
    Ok((
        id.to_owned(),
        Route {
            upstream: resolve(addr)?,
            token_digest: None,
            view_token_digest: None,
            expires_at: None,
            max_viewers: None,
            record: false,
        },
    ))
}

/// One entry of a routes file.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct FileRoute {
    session: String,
    upstream: String,
    /// Hex SHA-256 of the token (preferred: the file then holds no secret).
    token_sha256: Option<String>,
    /// The token itself (development convenience; hashed on load).
    token: Option<String>,
    /// Hex SHA-256 of the view-only token (its viewers watch; their input is dropped).
    view_token_sha256: Option<String>,
    /// The view-only token itself (hashed on load).
    view_token: Option<String>,
    /// Unix seconds.
    expires_at: Option<u64>,
    /// Concurrent connections allowed (0: unlimited).
    max_viewers: Option<u32>,
    /// Record the sessions (needs `--record DIR`).
    #[serde(default)]
    record: bool,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RoutesFile {
    #[serde(default)]
    route: Vec<FileRoute>,
}

/// Loads a TOML routes file:
///
/// ```toml
/// [[route]]
/// session = "abc"
/// upstream = "10.0.0.5:6080"
/// token_sha256 = "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad"
/// view_token_sha256 = "..." # optional: a second token for view-only viewers
/// expires_at = 1767225600
/// ```
pub fn load_routes_file(path: &Path) -> Result<Vec<(String, Route)>, String> {
    let text = std::fs::read_to_string(path)
        .map_err(|e| format!("cannot read routes file {}: {e}", path.display()))?;
    parse_routes_file(&text).map_err(|e| format!("routes file {}: {e}", path.display()))
}

pub fn parse_routes_file(text: &str) -> Result<Vec<(String, Route)>, String> {
    let file: RoutesFile = toml::from_str(text).map_err(|e| e.to_string())?;
    file.route
        .into_iter()
        .map(|r| {
            check_session_id(&r.session)?;
            let digest = |hex: Option<String>, raw: Option<String>, what: &str| match (hex, raw) {
                (Some(_), Some(_)) => Err(format!(
                    "route '{}': give {what} or {what}_sha256, not both",
                    r.session
                )),
                (Some(h), None) => parse_digest_hex(&h)
                    .map(Some)
                    .map_err(|e| format!("route '{}': {what}_sha256: {e}", r.session)),
                (None, Some(t)) => vncgate_schema::record::checked_token_digest(t.as_bytes())
                    .map(Some)
                    .map_err(|e| format!("route '{}': {what}: {e}", r.session)),
                (None, None) => Ok(None),
            };
            let token_digest = digest(r.token_sha256, r.token, "token")?;
            let view_token_digest = digest(r.view_token_sha256, r.view_token, "view_token")?;
            vncgate_schema::record::check_view_token(
                token_digest.as_ref(),
                view_token_digest.as_ref(),
            )
            .map_err(|e| format!("route '{}': {e}", r.session))?;
            Ok((
                r.session,
                Route {
                    upstream: resolve(&r.upstream)?,
                    token_digest,
                    view_token_digest,
                    expires_at: r.expires_at,
                    max_viewers: r.max_viewers,
                    record: r.record,
                },
            ))
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn flag_and_file_parse() {
        let (id, r) = parse_route_flag("demo=127.0.0.1:5900").unwrap();
        assert_eq!(id, "demo");
        assert_eq!(r.upstream, "127.0.0.1:5900".parse().unwrap());
        assert!(parse_route_flag("nodelim").is_err());
        assert!(parse_route_flag("a/b=127.0.0.1:1").is_err());

        let routes = parse_routes_file(
            r#"
            [[route]]
            session = "a"
            upstream = "127.0.0.1:6080"
            token = "abc"
            expires_at = 100
            [[route]]
            session = "b"
            upstream = "127.0.0.1:6081"
            token_sha256 = "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad"
            record = true
            "#,
        )
        .unwrap();
        assert_eq!(routes[0].1.token_digest, routes[1].1.token_digest);
        assert_eq!(routes[0].1.expires_at, Some(100));
        assert!(!routes[0].1.record && routes[1].1.record);
        assert!(
            parse_routes_file("[[route]]\nsession='x'\nupstream='127.0.0.1:1'\nbogus=1").is_err()
        );
        assert!(routes[0].1.view_token_digest.is_none());
    }

    #[test]
    fn view_tokens_in_the_routes_file() {
        let head = "[[route]]\nsession='v'\nupstream='127.0.0.1:1'\n";
        let r = parse_routes_file(&format!("{head}token='full'\nview_token='watch'")).unwrap();
        assert_eq!(r[0].1.token_digest, Some(Token::digest_of(b"full")));
        assert_eq!(r[0].1.view_token_digest, Some(Token::digest_of(b"watch")));
        let hex = hex::encode(Token::digest_of(b"watch"));
        let r =
            parse_routes_file(&format!("{head}token='full'\nview_token_sha256='{hex}'")).unwrap();
        assert_eq!(r[0].1.view_token_digest, Some(Token::digest_of(b"watch")));
        for (bad, why) in [
            ("view_token='watch'", "needs a (full) token"),
            ("token='same'\nview_token='same'", "equals the full token"),
            (
                &format!("token='a'\nview_token='b'\nview_token_sha256='{hex}'") as &str,
                "give view_token or view_token_sha256",
            ),
            ("token='a'\nview_token_sha256='zz'", "view_token_sha256"),
            (
                "token='a'\nview_token='b c'",
                "view_token: token has invalid characters",
            ),
        ] {
            let e = parse_routes_file(&format!("{head}{bad}")).unwrap_err();
            assert!(e.contains(why), "{bad}: {e}");
        }
    }

    #[test]
    fn authorization_and_expiry() {
        let mut r = Route {
            upstream: "127.0.0.1:1".parse().unwrap(),
            token_digest: Some(Token::digest_of(b"t")),
            view_token_digest: None,
            expires_at: Some(1000),
            max_viewers: None,
            record: false,
        };
        let tok = |t: &[u8]| Token::from_bytes(t).unwrap();
        assert_eq!(r.authorize(None), Err(Denied::MissingToken));
        assert_eq!(r.authorize(Some(&tok(b"x"))), Err(Denied::BadToken));
        assert_eq!(r.authorize(Some(&tok(b"t"))), Ok(Role::Full));
        assert_eq!(r.authorize(Some(&tok(b"v"))), Err(Denied::BadToken));
        r.view_token_digest = Some(Token::digest_of(b"v"));
        assert_eq!(r.authorize(Some(&tok(b"v"))), Ok(Role::ViewOnly));
        assert_eq!(r.authorize(Some(&tok(b"t"))), Ok(Role::Full));
        assert_eq!(r.authorize(Some(&tok(b"x"))), Err(Denied::BadToken));
        assert_eq!(r.authorize(None), Err(Denied::MissingToken));
        // A view token on a route without a full token (writers refuse it) gives a view.
        let open = Route {
            token_digest: None,
            ..r.clone()
        };
        assert_eq!(open.authorize(Some(&tok(b"v"))), Ok(Role::ViewOnly));
        assert_eq!(open.authorize(Some(&tok(b"x"))), Ok(Role::Full));
        assert_eq!(open.authorize(None), Ok(Role::Full));
        let at = |s| UNIX_EPOCH + Duration::from_secs(s);
        assert_eq!(r.time_left(at(400)), Some(Duration::from_secs(600)));
        assert_eq!(r.time_left(at(2000)), Some(Duration::ZERO));
    }
}
