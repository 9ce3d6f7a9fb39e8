//! A worker's route source: its static routes, then its own cache of Redis routes, then
//! a lookup through the control thread. Single-threaded: no locks on the hit path.

use std::cell::{Cell, RefCell};
use std::collections::HashMap;
use std::future::poll_fn;
use std::sync::Arc;
use std::task::{Poll, Waker};
use std::time::{Duration, Instant};

use super::control::Control;
use super::{Answer, ToWorker};
use crate::metrics as m;
use crate::route::{Route, RouteChange, RouteSource, StaticRoutes, Unavailable};
use crate::server::mailbox::Mailbox;

/// Entries past this count are evicted (expired ones first, then all): a bound on what
/// a flood of distinct unknown ids can make a worker hold.
pub(super) const MAX_ENTRIES: usize = 100_000;

struct Cached {
    route: Option<Arc<Route>>,
    fetched: Instant,
}

/// The `result` labels of the route cache's counter, in [`Counters`]' order.
pub const RESULTS: [&str; 5] = ["hit", "negative_hit", "miss", "stale", "unavailable"];

struct Counters {
    hit: metrics::Counter,
    negative_hit: metrics::Counter,
    miss: metrics::Counter,
    stale: metrics::Counter,
    unavailable: metrics::Counter,
}

/// A lookup in flight: its answer once it came, and the task waiting for it.
#[derive(Default)]
struct Waiting {
    answer: Option<Answer>,
    waker: Option<Waker>,
}

pub struct RedisRoutes {
    index: usize,
    fixed: StaticRoutes,
    control: Arc<Control>,
    mailbox: Arc<Mailbox<ToWorker>>,
    waiting: RefCell<HashMap<u64, Waiting>>,
    next_id: Cell<u64>,
    cache: RefCell<HashMap<String, Cached>>,
    /// Changes taken from the inbox, for the worker's live sessions.
    pending: RefCell<Vec<RouteChange>>,
    /// Counts invalidations, so that an answer that raced one is used but not cached.
    epoch: Cell<u64>,
    ttl: Duration,
    negative_ttl: Duration,
    deadline: Duration,
    counters: Counters,
}

impl RedisRoutes {
    /// Worker `index`'s source; called on that worker's thread.
    pub fn new(index: usize, control: Arc<Control>, fixed: StaticRoutes) -> Self {
        let [hit, negative_hit, miss, stale, unavailable] =
            RESULTS.map(|result| metrics::counter!(m::ROUTE_CACHE, "result" => result));
        let s = &control.settings;
        Self {
            index,
            fixed,
            mailbox: control.mailbox(index),
            waiting: RefCell::new(HashMap::new()),
            next_id: Cell::new(0),
            cache: RefCell::new(HashMap::new()),
            pending: RefCell::new(Vec::new()),
            epoch: Cell::new(0),
            ttl: s.cache_ttl,
            negative_ttl: s.negative_ttl,
            // The control thread gives up at the timeout; this is a backstop against a
            // wedged control thread.
            deadline: s.timeout + Duration::from_millis(250),
            counters: Counters {
                hit,
                negative_hit,
                miss,
                stale,
                unavailable,
            },
            control,
        }
    }

    /// Applies what the control thread sent: hand answers to their lookups, drop
    /// invalidated entries, queue the changes for the worker's sessions.
    fn absorb(&self) {
        for msg in self.mailbox.take_all() {
            if let ToWorker::Answer { id, answer } = msg {
                // A lookup that gave up waiting has no slot left; its answer is dropped.
                if let Some(w) = self.waiting.borrow_mut().get_mut(&id) {
                    w.answer = Some(answer);
                    if let Some(waker) = w.waker.take() {
                        waker.wake();
                    }
                }
                continue;
            }
            self.epoch.set(self.epoch.get() + 1);
            match msg {
                ToWorker::Answer { .. } => {}
                ToWorker::Flush => self.cache.borrow_mut().clear(),
                ToWorker::Change(change) => {
                    let (RouteChange::Removed { session, .. } | RouteChange::Changed { session }) =
                        &change;
                    self.cache.borrow_mut().remove(session);
                    self.pending.borrow_mut().push(change);
                }
            }
        }
    }

    fn remember(&self, session: &str, route: Option<Arc<Route>>) {
        let ttl = if route.is_some() {
            self.ttl
        } else {
            self.negative_ttl
        };
        if ttl.is_zero() {
            return;
        }
        let mut cache = self.cache.borrow_mut();
        if cache.len() >= MAX_ENTRIES {
            let now = Instant::now();
            let (pos, neg) = (self.ttl, self.negative_ttl);
            cache.retain(|_, c| {
                now.duration_since(c.fetched) < if c.route.is_some() { pos } else { neg }
            });
            if cache.len() >= MAX_ENTRIES {
                cache.clear();
            }
        }
        cache.insert(
            session.to_owned(),
            Cached {
                route,
                fetched: Instant::now(),
            },
        );
    }

    /// A route past its TTL, for when Redis cannot answer: this worker's cached one, or
    /// else the one another worker looked up (see [`super::last_known`]).
    fn stale(&self, session: &str) -> Option<Arc<Route>> {
        if let Some(c) = self.cache.borrow().get(session) {
            return c.route.clone();
        }
        self.control.last_known(session)
    }

    fn unavailable(
        &self,
        session: &str,
        why: Unavailable,
    ) -> Result<Option<Arc<Route>>, Unavailable> {
        match self.stale(session) {
            Some(r) => {
                self.counters.stale.increment(1);
                Ok(Some(r))
            }
            None => {
                self.counters.unavailable.increment(1);
                Err(why)
            }
        }
    }
}

impl RouteSource for RedisRoutes {
    async fn lookup(&self, session: &str) -> Result<Option<Arc<Route>>, Unavailable> {
        if let Some(r) = self.fixed.get(session) {
            return Ok(Some(r.clone()));
        }
        self.absorb();
        if let Some(c) = self.cache.borrow().get(session) {
            let age = c.fetched.elapsed();
            match &c.route {
                Some(r) if age < self.ttl => {
                    self.counters.hit.increment(1);
                    return Ok(Some(r.clone()));
                }
                None if age < self.negative_ttl => {
                    self.counters.negative_hit.increment(1);
                    return Ok(None);
                }
                _ => {}
            }
        }
        if !self.control.is_up() {
            return self.unavailable(session, Unavailable("redis unavailable"));
        }
        self.counters.miss.increment(1);
        let epoch = self.epoch.get();
        let id = self.next_id.get();
        self.next_id.set(id + 1);
        self.waiting.borrow_mut().insert(id, Waiting::default());
        let _slot = WaitSlot(&self.waiting, id);
        if !self.control.ask(self.index, id, session) {
            return self.unavailable(session, Unavailable("redis control thread stopped"));
        }
        let answer = poll_fn(|cx| {
            let mut waiting = self.waiting.borrow_mut();
            let Some(w) = waiting.get_mut(&id) else {
                return Poll::Ready(Err(Unavailable("redis lookup lost")));
            };
            match w.answer.take() {
                Some(a) => Poll::Ready(a),
                None => {
                    w.waker = Some(cx.waker().clone());
                    Poll::Pending
                }
            }
        });
        match monoio::time::timeout(self.deadline, answer).await {
            Ok(Ok(route)) => {
                if self.epoch.get() == epoch {
                    self.remember(session, route.clone());
                }
                Ok(route)
            }
            Ok(Err(why)) => self.unavailable(session, why),
            Err(_) => self.unavailable(session, Unavailable("redis lookup timed out")),
        }
    }

    fn changes(&self) -> Vec<RouteChange> {
        self.absorb();
        std::mem::take(&mut *self.pending.borrow_mut())
    }

    fn bell(&self) -> Option<std::os::unix::net::UnixStream> {
        self.mailbox.take_bell()
    }
}

/// Frees a lookup's slot however the lookup ends (answered, timed out, cancelled).
struct WaitSlot<'a>(&'a RefCell<HashMap<u64, Waiting>>, u64);

impl Drop for WaitSlot<'_> {
    fn drop(&mut self) {
        self.0.borrow_mut().remove(&self.1);
    }
}
