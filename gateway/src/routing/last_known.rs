//! The process-wide last-known copy of every route the gateway has served, for a Redis
//! outage.
//!
//! Worker caches are per worker (no locks on the hit path), so a live session's route is
//! known only to the worker that looked it up, and a reconnect that the kernel hands to
//! another worker during an outage would find nothing. The control thread, which answers
//! every worker's lookups, keeps a copy of each route it found here; a worker whose own
//! cache misses while Redis cannot answer takes the route from this copy (a `stale`
//! answer, as its own cache's would be).
//!
//! Entries leave exactly as they leave the worker caches: a route event drops its id, a
//! resubscription (events may have been missed) drops them all, a lookup that finds no
//! route or an unusable one drops that id, and a full table is pruned. Read only on a
//! worker's miss while Redis is down, written only by the control thread: the lock is off
//! every hot path.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{SystemTime, UNIX_EPOCH};

use crate::route::Route;

/// At most this many routes are held (each a few hundred bytes): as many as a worker's
/// cache holds.
pub(super) const MAX_ENTRIES: usize = super::cache::MAX_ENTRIES;

struct Known {
    route: Arc<Route>,
    /// When it was last found, as a count of the routes remembered before it.
    seen: u64,
}

struct Inner {
    routes: HashMap<String, Known>,
    /// Counts invalidations, so that a lookup's answer that raced one is not kept.
    epoch: u64,
    remembered: u64,
}

pub(super) struct LastKnown {
    inner: Mutex<Inner>,
    max: usize,
}

impl LastKnown {
    pub(super) fn new(max: usize) -> Self {
        Self {
            inner: Mutex::new(Inner {
                routes: HashMap::new(),
                epoch: 0,
                remembered: 0,
            }),
            max,
        }
    }

    fn lock(&self) -> MutexGuard<'_, Inner> {
        self.inner.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// The invalidation count, taken before a lookup is sent to Redis.
    pub(super) fn epoch(&self) -> u64 {
        self.lock().epoch
    }

    /// Keeps `route` for `session`, unless an invalidation came since `epoch` (the answer
    /// may predate it; the next lookup brings the current one).
    pub(super) fn remember(&self, session: &str, route: Arc<Route>, epoch: u64) {
        let mut g = self.lock();
        if g.epoch != epoch {
            return;
        }
        if g.routes.len() >= self.max && !g.routes.contains_key(session) {
            prune(&mut g.routes, self.max);
        }
        g.remembered += 1;
        let seen = g.remembered;
        g.routes.insert(session.to_owned(), Known { route, seen });
    }

    /// The last route found for `session`, however old.
    pub(super) fn get(&self, session: &str) -> Option<Arc<Route>> {
        self.lock().routes.get(session).map(|k| k.route.clone())
    }

    /// Drops `session`'s route because a lookup found it gone (or unusable). Not an
    /// invalidation: lookups of other sessions in flight stay good, so a flood of unknown
    /// ids cannot keep real routes from being remembered.
    pub(super) fn drop_missing(&self, session: &str) {
        self.lock().routes.remove(session);
    }

    /// Drops `session`'s route on an event: it changed, or is gone.
    pub(super) fn forget(&self, session: &str) {
        let mut g = self.lock();
        g.epoch += 1;
        g.routes.remove(session);
    }

    /// Drops every route: events may have been missed.
    pub(super) fn clear(&self) {
        let mut g = self.lock();
        g.epoch += 1;
        g.routes.clear();
    }

    #[cfg(test)]
    fn len(&self) -> usize {
        self.lock().routes.len()
    }
}

/// Makes room in a full table: routes past their own expiry go first (they admit no one),
/// then the older half by when they were last found.
fn prune(routes: &mut HashMap<String, Known>, max: usize) {
    let now = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs());
    routes.retain(|_, k| k.route.expires_at.is_none_or(|at| at > now));
    if routes.len() < max {
        return;
    }
    let keep = max / 2;
    if keep == 0 {
        routes.clear();
        return;
    }
    let mut seen: Vec<u64> = routes.values().map(|k| k.seen).collect();
    let cut = seen.len() - keep;
    let (_, oldest_kept, _) = seen.select_nth_unstable(cut);
    let oldest_kept = *oldest_kept;
    routes.retain(|_, k| k.seen >= oldest_kept);
}

#[cfg(test)]
mod tests {
    use super::*;

    fn route(port: u16, expires_at: Option<u64>) -> Arc<Route> {
        Arc::new(Route {
            upstream: ([10, 0, 0, 1], port).into(),
            token_digest: None,
            view_token_digest: None,
            expires_at,
            max_viewers: None,
            record: false,
        })
    }

    #[test]
    fn keeps_what_was_found_until_an_event_drops_it() {
        let k = LastKnown::new(10);
        k.remember("a", route(1, None), k.epoch());
        k.remember("b", route(2, None), k.epoch());
        assert_eq!(k.get("a").unwrap().upstream.port(), 1);
        k.forget("a");
        assert!(k.get("a").is_none());
        assert_eq!(k.get("b").unwrap().upstream.port(), 2);
        k.clear();
        assert!(k.get("b").is_none());
    }

    #[test]
    fn an_answer_that_raced_an_invalidation_is_not_kept() {
        let k = LastKnown::new(10);
        let before = k.epoch();
        // The route was deleted while its lookup was in flight.
        k.forget("a");
        k.remember("a", route(1, None), before);
        assert!(k.get("a").is_none());
        k.remember("a", route(2, None), k.epoch());
        assert_eq!(k.get("a").unwrap().upstream.port(), 2);
    }

    #[test]
    fn lookups_that_find_nothing_do_not_hold_back_other_answers() {
        let k = LastKnown::new(10);
        k.remember("gone", route(1, None), k.epoch());
        let before = k.epoch();
        k.drop_missing("gone");
        k.drop_missing("never-was");
        k.remember("a", route(2, None), before);
        assert!(k.get("gone").is_none());
        assert_eq!(k.get("a").unwrap().upstream.port(), 2);
    }

    #[test]
    fn a_full_table_drops_expired_routes_then_the_older_half() {
        let k = LastKnown::new(4);
        k.remember("old", route(1, None), k.epoch());
        k.remember("expired", route(2, Some(1)), k.epoch());
        k.remember("mid", route(3, None), k.epoch());
        k.remember("new", route(4, None), k.epoch());
        // Only the expired one goes: there is room again.
        k.remember("newer", route(5, None), k.epoch());
        assert_eq!(k.len(), 4);
        assert!(k.get("expired").is_none());
        assert!(k.get("old").is_some());
        // Full of live routes: the two found last stay, then the one added.
        k.remember("newest", route(6, None), k.epoch());
        assert_eq!(k.len(), 3);
        for gone in ["old", "mid"] {
            assert!(k.get(gone).is_none(), "{gone}");
        }
        for kept in ["new", "newer", "newest"] {
            assert!(k.get(kept).is_some(), "{kept}");
        }
        // Rewriting a held id never prunes.
        k.remember("new", route(7, None), k.epoch());
        assert_eq!(k.get("new").unwrap().upstream.port(), 7);
    }
}
