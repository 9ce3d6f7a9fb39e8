//! Where sessions go: the route record, the [`RouteSource`] trait, and the static sources.
//!
//! A route maps a session id to the VM's RFB address, the digest of the session's token and
//! an optional expiry. The Redis source (per-worker cache, pub/sub invalidation) plugs in
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
    /// When the session ends, as seconds since the Unix epoch.
    pub expires_at: Option<u64>,
    /// Concurrent connections allowed; `None` takes `--max-viewers`, `Some(0)` is unlimited.
    pub max_viewers: Option<u32>,
    /// Record this route's sessions (with `--record DIR`; see `server::record`).
    pub record: bool,
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
            expires_at: r.expires_at,
            max_viewers: r.max_viewers,
            record: r.record,
        }
    }
}

impl Route {
    pub fn authorize(&self, token: Option<&Token>) -> Result<(), Denied> {
        match (&self.token_digest, token) {
            (None, _) => Ok(()),
            (Some(_), None) => Err(Denied::MissingToken),
            (Some(d), Some(t)) if t.matches_digest(d) => Ok(()),
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
            let token_digest = match (r.token_sha256, r.token) {
                (Some(_), Some(_)) => {
                    return Err(format!(
                        "route '{}': give token or token_sha256, not both",
                        r.session
                    ));
                }
                (Some(h), None) => Some(parse_digest_hex(&h)?),
                (None, Some(t)) => Some(
                    vncgate_schema::record::checked_token_digest(t.as_bytes())
                        .map_err(|e| format!("route '{}': {e}", r.session))?,
                ),
                (None, None) => None,
            };
            Ok((
                r.session,
                Route {
                    upstream: resolve(&r.upstream)?,
                    token_digest,
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
    }

    #[test]
    fn authorization_and_expiry() {
        let r = Route {
            upstream: "127.0.0.1:1".parse().unwrap(),
            token_digest: Some(Token::digest_of(b"t")),
            expires_at: Some(1000),
            max_viewers: None,
            record: false,
        };
        assert_eq!(r.authorize(None), Err(Denied::MissingToken));
        assert_eq!(
            r.authorize(Some(&Token::from_bytes(b"x").unwrap())),
            Err(Denied::BadToken)
        );
        assert_eq!(r.authorize(Some(&Token::from_bytes(b"t").unwrap())), Ok(()));
        let at = |s| UNIX_EPOCH + Duration::from_secs(s);
        assert_eq!(r.time_left(at(400)), Some(Duration::from_secs(600)));
        assert_eq!(r.time_left(at(2000)), Some(Duration::ZERO));
    }
}
