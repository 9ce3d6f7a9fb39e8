//! Live connections per session, across all workers of the process: the viewer limit, and
//! the list of session ids the Redis control thread re-checks after missed events.
//!
//! One lock per session open and close: an upgrade already costs tens of microseconds,
//! the lock well under one. The limit holds per gateway process; behind a balancer with
//! several gateways, a session pinned to one gateway (the usual consistent hashing on the
//! path) keeps it exact.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

#[derive(Debug, Default)]
pub struct Viewers {
    live: Mutex<HashMap<String, u32>>,
}

/// One counted connection; dropping it uncounts it.
#[derive(Debug)]
pub struct ViewerSlot {
    viewers: Arc<Viewers>,
    session: String,
}

impl Viewers {
    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<String, u32>> {
        // A panic elsewhere while holding the lock leaves a consistent map (one insert or
        // one decrement), so a poisoned lock is still usable.
        self.live.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Counts a connection to `session` unless it already has `limit` (0: no limit).
    pub fn try_join(self: &Arc<Self>, session: &str, limit: u32) -> Option<ViewerSlot> {
        let mut live = self.lock();
        let n = live.entry(session.to_owned()).or_insert(0);
        if limit != 0 && *n >= limit {
            return None;
        }
        *n += 1;
        Some(ViewerSlot {
            viewers: self.clone(),
            session: session.to_owned(),
        })
    }

    pub fn count(&self, session: &str) -> u32 {
        self.lock().get(session).copied().unwrap_or(0)
    }

    /// Every session id with a live connection.
    pub fn sessions(&self) -> Vec<String> {
        self.lock().keys().cloned().collect()
    }
}

impl Drop for ViewerSlot {
    fn drop(&mut self) {
        let mut live = self.viewers.lock();
        if let Some(n) = live.get_mut(&self.session) {
            *n -= 1;
            if *n == 0 {
                live.remove(&self.session);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn limit_counts_and_releases() {
        let v = Arc::new(Viewers::default());
        let a = v.try_join("s", 2).unwrap();
        let b = v.try_join("s", 2).unwrap();
        assert!(v.try_join("s", 2).is_none());
        assert!(v.try_join("other", 2).is_some());
        assert_eq!(v.count("s"), 2);
        drop(a);
        let c = v.try_join("s", 2).unwrap();
        drop((b, c));
        assert_eq!(v.count("s"), 0);
        assert!(v.sessions().is_empty());
        let many: Vec<_> = (0..100).map(|_| v.try_join("s", 0).unwrap()).collect();
        assert_eq!(v.count("s"), 100);
        drop(many);
    }
}
