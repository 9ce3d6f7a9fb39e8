//! VM slots on this host (`--max-vms`): a session takes a slot before its VM is created and
//! gives it back when the VM is stopped. Sessions beyond the limit wait in `pending`, first
//! come first served, with their position in line visible in the API, and fail with reason
//! `capacity` when no slot frees within the placement timeout.

use std::collections::{HashSet, VecDeque};
use std::sync::Mutex;
use std::time::Duration;

use tokio::sync::Notify;

#[derive(Default)]
struct Slots {
    /// Sessions holding a slot (booting, ready, or adopted after a restart).
    held: HashSet<String>,
    /// Sessions waiting, oldest first.
    line: VecDeque<String>,
}

pub struct Capacity {
    /// `None`: no limit.
    max: Option<usize>,
    slots: Mutex<Slots>,
    freed: Notify,
}

/// Why a session got no slot.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NoSlot {
    pub max: usize,
    pub waited: Duration,
    pub ahead: usize,
}

impl std::fmt::Display for NoSlot {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "capacity: no VM slot on this host within {:.0} s (--max-vms {}, all in use; {} waiting ahead)",
            self.waited.as_secs_f64(),
            self.max,
            self.ahead
        )
    }
}

impl Capacity {
    pub fn new(max: Option<usize>) -> Self {
        Self {
            max,
            slots: Mutex::default(),
            freed: Notify::new(),
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Slots> {
        self.slots.lock().expect("capacity slots")
    }

    /// Takes a slot for `id` at once (an adopted VM already runs: it holds one).
    pub fn hold(&self, id: &str) {
        self.lock().held.insert(id.to_owned());
    }

    /// Waits in line for a slot, at most `timeout`; `Ok(false)` when the session left the
    /// line meanwhile ([`Capacity::release`]: it was deleted).
    pub async fn acquire(&self, id: &str, timeout: Duration) -> Result<bool, NoSlot> {
        let Some(max) = self.max else {
            self.hold(id);
            return Ok(true);
        };
        self.lock().line.push_back(id.to_owned());
        let deadline = tokio::time::Instant::now() + timeout;
        loop {
            // Registered before the check, so a release between the check and the wait is
            // not missed.
            let freed = self.freed.notified();
            {
                let mut s = self.lock();
                if !s.line.iter().any(|x| x == id) {
                    return Ok(false);
                }
                if s.line.front().map(String::as_str) == Some(id) && s.held.len() < max {
                    s.line.pop_front();
                    s.held.insert(id.to_owned());
                    drop(s);
                    // The next in line may fit too.
                    self.freed.notify_waiters();
                    return Ok(true);
                }
            }
            if tokio::time::timeout_at(deadline, freed).await.is_err() {
                let mut s = self.lock();
                let ahead = s.line.iter().position(|x| x == id).unwrap_or(0);
                s.line.retain(|x| x != id);
                drop(s);
                self.freed.notify_waiters();
                return Err(NoSlot {
                    max,
                    waited: timeout,
                    ahead,
                });
            }
        }
    }

    /// Gives `id`'s slot back (or its place in line); a no-op when it has neither.
    pub fn release(&self, id: &str) {
        let mut s = self.lock();
        let had = s.held.remove(id);
        let before = s.line.len();
        s.line.retain(|x| x != id);
        if had || s.line.len() != before {
            drop(s);
            self.freed.notify_waiters();
        }
    }

    /// 1-based position of a waiting session.
    pub fn position(&self, id: &str) -> Option<usize> {
        self.lock().line.iter().position(|x| x == id).map(|p| p + 1)
    }

    /// Whether a slot is free for a session nobody waits ahead of (placement by pull: a
    /// host reads a request only when it can take it).
    pub fn has_free(&self) -> bool {
        let s = self.lock();
        self.max.is_none_or(|m| s.held.len() < m) && s.line.is_empty()
    }

    /// Waits until a slot is given back (or `within` passes).
    pub async fn freed(&self, within: Duration) {
        let _ = tokio::time::timeout(within, self.freed.notified()).await;
    }

    pub fn in_use(&self) -> usize {
        self.lock().held.len()
    }

    pub fn waiting(&self) -> usize {
        self.lock().line.len()
    }

    pub fn max(&self) -> Option<usize> {
        self.max
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use super::*;

    #[tokio::test(start_paused = true)]
    async fn beyond_the_limit_sessions_wait_in_order_and_take_freed_slots() {
        let c = Arc::new(Capacity::new(Some(1)));
        assert_eq!(c.acquire("a", Duration::from_secs(5)).await, Ok(true));
        let (c2, c3) = (c.clone(), c.clone());
        let b = tokio::spawn(async move { c2.acquire("b", Duration::from_secs(5)).await });
        tokio::task::yield_now().await;
        let d = tokio::spawn(async move { c3.acquire("d", Duration::from_secs(5)).await });
        tokio::task::yield_now().await;
        assert_eq!(c.position("b"), Some(1));
        assert_eq!(c.position("d"), Some(2));
        c.release("a");
        assert_eq!(b.await.unwrap(), Ok(true));
        assert_eq!(c.position("d"), Some(1));
        assert_eq!(c.in_use(), 1);
        // d never gets b's slot: it fails by name after its timeout.
        let err = d.await.unwrap().unwrap_err();
        assert_eq!(err.max, 1);
        assert!(err.to_string().starts_with("capacity: "), "{err}");
        assert_eq!(c.waiting(), 0);
    }

    #[tokio::test(start_paused = true)]
    async fn a_session_leaving_the_line_moves_the_others_up() {
        let c = Arc::new(Capacity::new(Some(1)));
        c.hold("adopted");
        let (c2, c3) = (c.clone(), c.clone());
        let b = tokio::spawn(async move { c2.acquire("b", Duration::from_secs(5)).await });
        tokio::task::yield_now().await;
        let d = tokio::spawn(async move { c3.acquire("d", Duration::from_secs(60)).await });
        tokio::task::yield_now().await;
        c.release("b");
        assert_eq!(
            b.await.unwrap(),
            Ok(false),
            "a deleted session leaves the line"
        );
        assert_eq!(c.position("d"), Some(1));
        c.release("adopted");
        assert_eq!(d.await.unwrap(), Ok(true));
    }

    #[tokio::test]
    async fn without_a_limit_every_session_gets_a_slot() {
        let c = Capacity::new(None);
        for i in 0..100 {
            assert_eq!(c.acquire(&i.to_string(), Duration::ZERO).await, Ok(true));
        }
        assert_eq!(c.in_use(), 100);
    }
}
