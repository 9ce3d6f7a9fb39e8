//! Routes from Redis: a control-plane thread that talks to Redis, and a per-worker cache in
//! front of it.
//!
//! ```text
//!  worker 0 ── RedisRoutes (cache) ──┐ lookups (mpsc)      ┌── commands ── Redis / Sentinel / Cluster
//!  worker 1 ── RedisRoutes (cache) ──┼──────────────────> control thread (tokio, 1 thread)
//!  worker N ── RedisRoutes (cache) ──┘ <── changes, flush ─ └── SUBSCRIBE vncgate:route-events
//! ```
//!
//! Workers never block on Redis and never run its client: a miss sends the session id to
//! the control thread and awaits the answer under a deadline, while the worker's other
//! sessions keep running. Answers and changes come back through the worker's mailbox, whose
//! bell wakes the worker's runtime (no waker crosses threads). The control thread holds one multiplexed connection (or a cluster
//! connection), a subscriber, and the health flag that `/readyz` and the workers read:
//!
//! - **Cache:** hits within `--route-cache-ttl`; unknown sessions are cached for
//!   `--route-negative-ttl` so a client retrying a dead link does not hammer Redis.
//! - **Invalidation:** every route event drops that id from every worker's cache; when the
//!   subscription (re)connects, events may have been missed, so every cache is flushed and
//!   the sessions that are live are checked against Redis.
//! - **Revocation:** a `del` event (or a route found missing on a check) ends the live
//!   sessions of that id on every worker within a housekeeping tick (100 ms): 4006 "session
//!   revoked", or 4005 "session expired" for `"reason":"expired"`. Expiry itself needs no
//!   event: each session carries its route's `expires_at` and closes with 4005 then.
//! - **Redis down:** cached routes keep working (stale entries too: a route is not wrong
//!   because Redis is unreachable), and so do routes another worker looked up (the control
//!   thread keeps a last-known copy of every route it found: `last_known.rs`), so a reconnect
//!   that lands on any worker is admitted; routes the gateway never saw fail at once with
//!   503 while the health flag is down, and the control thread reconnects with backoff by
//!   itself.

mod cache;
mod control;
mod last_known;

use std::time::Duration;

pub use cache::RedisRoutes;
pub use control::{Control, spawn};
use vncgate_schema::RedisUrl;
pub(crate) use {
    cache::RESULTS as CACHE_RESULTS, control::REDIS_ERROR_OPS, control::ROUTE_EVENT_OPS,
};

use crate::route::RouteChange;

/// Redis routing settings (flags `--redis`, `--route-cache-ttl`, `--route-negative-ttl`,
/// `--redis-timeout`).
#[derive(Debug, Clone)]
pub struct RedisSettings {
    pub url: RedisUrl,
    /// How long a found route is served from a worker's cache; zero disables the cache.
    pub cache_ttl: Duration,
    /// How long an unknown session is remembered as unknown; zero disables that.
    pub negative_ttl: Duration,
    /// Deadline of one lookup, and of one connection attempt.
    pub timeout: Duration,
    /// How often the sessions that are live are checked against Redis (a route deleted
    /// without an event, by a plain `DEL`, still ends its sessions).
    pub recheck_interval: Duration,
}

/// The defaults of [`RedisSettings`] besides the URL (flags and file override them).
#[derive(Debug, Clone, Copy)]
pub struct RedisDefaults {
    pub cache_ttl: Duration,
    pub negative_ttl: Duration,
    pub timeout: Duration,
    pub recheck_interval: Duration,
}

impl RedisSettings {
    pub const DEFAULTS: RedisDefaults = RedisDefaults {
        cache_ttl: Duration::from_secs(30),
        negative_ttl: Duration::from_secs(1),
        timeout: Duration::from_millis(500),
        recheck_interval: Duration::from_secs(5),
    };
}

/// What the control thread tells a worker (through its mailbox: see
/// [`crate::server::mailbox`]).
#[derive(Debug, Clone, PartialEq, Eq)]
enum ToWorker {
    /// The answer to the worker's lookup number `id`.
    Answer { id: u64, answer: Answer },
    /// Events may have been missed: drop every cached route.
    Flush,
    /// One route changed: drop it, and let live sessions follow.
    Change(RouteChange),
}

/// A lookup's result: the route, none, or why there is no answer.
type Answer = Result<Option<std::sync::Arc<crate::route::Route>>, crate::route::Unavailable>;
