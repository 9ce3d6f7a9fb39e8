//! A worker: one thread, one monoio runtime, one `SO_REUSEPORT` listener, and the sessions
//! it accepted. Nothing here is shared with other workers except the read-only route table,
//! the drain flag and the viewer counts; pools, counters and the session registry are
//! thread-local.

use std::cell::{Cell, RefCell};
use std::collections::HashMap;
use std::rc::Rc;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant, SystemTime};

use super::Shared;
use super::mailbox::Bell;
use super::pool::{BufPool, PipePool};
use super::signal::{Signal, Turns};
use super::viewers::Viewers;
use crate::close::{self, CloseCause};
use crate::config::{Limits, Settings};
use crate::live::Dynamic;
use crate::metrics as m;
use crate::route::{Route, RouteChange, RouteSource, Unavailable};

/// A live session's handle, by which the worker can end it (drain, revocation) or move its
/// expiry (a rewritten route).
pub struct SessionCtl {
    pub session_id: String,
    pub kill: Signal<CloseCause>,
    /// When the route expires; the relay re-reads it whenever its timer fires.
    pub expires: Cell<Option<Instant>>,
    /// For a view-only viewer, the view token's digest it was admitted with: a rewrite of
    /// the route that drops or changes the view token revokes it.
    pub view_token: Cell<Option<crate::token::TokenDigest>>,
    /// When a drain closes it with 1001 (its point in the `--drain-spread` window).
    close_at: Cell<Option<Instant>>,
    key: u64,
}

/// Keeps a connection counted in its worker's lane (see `server::balance`).
pub struct ConnGuard<'a>(&'a std::sync::atomic::AtomicUsize);

impl Drop for ConnGuard<'_> {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::Relaxed);
    }
}

/// Bytes relayed by this worker since the last flush to the metrics registry.
#[derive(Default)]
pub struct Stats {
    pub to_browser: Cell<u64>,
    pub to_vm: Cell<u64>,
}

pub struct Worker<S> {
    pub index: usize,
    pub routes: S,
    /// The reloadable settings as this worker last took them, with their generation (see
    /// [`crate::live`]).
    seen: RefCell<(u64, Arc<Dynamic>)>,
    pub limits: Limits,
    /// Congestion control for upstream sockets (the accepted ones take the listener's).
    pub congestion: Option<Arc<str>>,
    /// `wss://`: the rustls configuration every browser connection starts with.
    pub tls: Option<Arc<rustls::ServerConfig>>,
    pub pipes: PipePool,
    pub bufs: BufPool,
    pub stats: Stats,
    /// How tasks that could go on give the others a turn (see [`Turns`]).
    pub turns: Turns,
    /// Set once this worker has seen the drain flag: no new upgrades.
    pub draining: Cell<bool>,
    /// Fired to stop the accept loop.
    pub stop_accepting: Signal<()>,
    /// Set once the accept loop has ended: until then a connection may still be accepted
    /// (a wake-up that came with the stop), and the drain is not over.
    pub accept_ended: Cell<bool>,
    /// `--proxy-protocol`: the peers whose PROXY header names the client.
    pub proxy: Option<crate::proxy::TrustedProxies>,
    /// How an upgrade names its route (`serve`: the path; `websockify`: target or token).
    pub session_from: crate::websockify::SessionFrom,
    /// Plain HTTP on the TLS port is served, not refused (websockify without --ssl-only).
    pub tls_accepts_plain: bool,
    /// `--web DIR`: this worker's view of it, with its own file cache.
    pub web: Option<crate::web::Site>,
    sessions: RefCell<HashMap<u64, Rc<SessionCtl>>>,
    next_key: Cell<u64>,
    shared: Arc<Shared>,
}

impl<S: RouteSource> Worker<S> {
    pub fn new(
        index: usize,
        routes: S,
        settings: &Settings,
        congestion: Option<Arc<str>>,
        tls: Option<Arc<rustls::ServerConfig>>,
        shared: Arc<Shared>,
    ) -> Self {
        let limits = settings.limits.clone();
        Self {
            index,
            routes,
            seen: RefCell::new(shared.live.current()),
            pipes: PipePool::new(limits.pipe_size, limits.max_idle_pipes),
            bufs: BufPool::new(limits.read_buffer, 64),
            limits,
            congestion,
            tls,
            stats: Stats::default(),
            turns: Turns::new(),
            draining: Cell::new(false),
            stop_accepting: Signal::new(),
            accept_ended: Cell::new(false),
            proxy: None,
            session_from: settings.session_from,
            tls_accepts_plain: settings.tls_accepts_plain,
            web: settings.web.clone().map(crate::web::Site::new),
            sessions: RefCell::new(HashMap::new()),
            next_key: Cell::new(0),
            shared,
        }
    }

    /// Reads a PROXY header from `trusted` peers before each request.
    pub fn with_proxy(mut self, trusted: Option<crate::proxy::TrustedProxies>) -> Self {
        self.proxy = trusted;
        self
    }

    /// `--record DIR`: where sessions are recorded, if anywhere.
    pub fn recordings(&self) -> Option<&Arc<super::record::Recordings>> {
        self.shared.recordings.as_ref()
    }

    /// Takes over the count of a connection in this worker's lane (counted by whoever
    /// accepted it, at once, so that a burst of accepts sees it), until the guard drops.
    pub fn adopt_connection(&self) -> ConnGuard<'_> {
        ConnGuard(&self.shared.lanes[self.index].conns)
    }

    pub fn session_count(&self) -> usize {
        self.sessions.borrow().len()
    }

    pub fn register(&self, session_id: &str) -> Rc<SessionCtl> {
        let key = self.next_key.get();
        self.next_key.set(key + 1);
        let ctl = Rc::new(SessionCtl {
            session_id: session_id.to_owned(),
            kill: Signal::new(),
            expires: Cell::new(None),
            view_token: Cell::new(None),
            close_at: Cell::new(None),
            key,
        });
        self.sessions.borrow_mut().insert(key, ctl.clone());
        metrics::gauge!(m::SESSIONS_ACTIVE).increment(1.0);
        // A session that arrives while a drain is past its deadline ends at once.
        ctl
    }

    pub fn unregister(&self, ctl: &SessionCtl) {
        if self.sessions.borrow_mut().remove(&ctl.key).is_some() {
            metrics::gauge!(m::SESSIONS_ACTIVE).decrement(1.0);
        }
    }

    /// The drain's closes, past the drain deadline `due`: each session is given a random
    /// point in the spread window (once), and closed with 1001 when it comes.
    fn close_for_drain(&self, due: Instant, now: Instant) {
        for s in self.sessions.borrow().values() {
            let at = match s.close_at.get() {
                Some(at) => at,
                None => {
                    let at = drain_close_at(due, self.limits.drain_spread, now, fastrand::f64());
                    s.close_at.set(Some(at));
                    at
                }
            };
            if at <= now {
                s.kill.fire(close::GOING_AWAY);
            }
        }
    }

    /// This worker's live sessions of one session id.
    pub fn sessions_of(&self, session_id: &str) -> Vec<Rc<SessionCtl>> {
        self.sessions
            .borrow()
            .values()
            .filter(|s| s.session_id == session_id)
            .cloned()
            .collect()
    }

    /// The process-wide viewer counts.
    pub fn viewers(&self) -> &Arc<Viewers> {
        &self.shared.viewers
    }

    /// The reloadable settings (handshake, upstream policy, static routes), after following
    /// a reload if one was published since the last look.
    pub fn dynamic(self: &Rc<Self>) -> Arc<Dynamic> {
        if self.shared.live.generation() != self.seen.borrow().0 {
            let (g, new) = self.shared.live.current();
            let old = std::mem::replace(&mut *self.seen.borrow_mut(), (g, new.clone())).1;
            for change in old.route_changes(&new) {
                self.follow_route_change(change);
            }
        }
        self.seen.borrow().1.clone()
    }

    /// A session's route: the static routes first (reloadable), then the route source.
    pub async fn lookup(self: &Rc<Self>, session: &str) -> Result<Option<Arc<Route>>, Unavailable> {
        if let Some(r) = self.dynamic().routes.get(session) {
            return Ok(Some(r.clone()));
        }
        self.routes.lookup(session).await
    }

    /// Applies the route source's changes to live sessions: a removed route ends them, a
    /// rewritten one is looked up again for its new expiry.
    pub fn follow_route_changes(self: &Rc<Self>) {
        for change in self.routes.changes() {
            self.follow_route_change(change);
        }
    }

    fn follow_route_change(self: &Rc<Self>, change: RouteChange) {
        {
            match change {
                RouteChange::Removed { session, expired } => {
                    let cause = if expired {
                        close::SESSION_EXPIRED
                    } else {
                        close::SESSION_REVOKED
                    };
                    let live = self.sessions_of(&session);
                    for s in &live {
                        s.kill.fire(cause);
                    }
                    if !live.is_empty() {
                        tracing::info!(worker = self.index, session = %session, connections = live.len(), cause = cause.name, "route removed; closing its sessions");
                    }
                }
                RouteChange::Changed { session } => {
                    if !self.sessions_of(&session).is_empty() {
                        monoio::spawn(follow_rewrite(self.clone(), session));
                    }
                }
            }
        }
    }

    fn flush_stats(&self) {
        let b = self.stats.to_browser.replace(0);
        let v = self.stats.to_vm.replace(0);
        if b > 0 {
            metrics::counter!(m::RELAYED_BYTES, "direction" => "vm_to_browser").increment(b);
        }
        if v > 0 {
            metrics::counter!(m::RELAYED_BYTES, "direction" => "browser_to_vm").increment(v);
        }
        metrics::gauge!(m::WORKER_CONNECTIONS, "worker" => self.index.to_string())
            .set(self.shared.lanes[self.index].conns.load(Ordering::Relaxed) as f64);
        metrics::gauge!(m::PIPES_LENT, "worker" => self.index.to_string())
            .set(self.pipes.lent() as f64);
        metrics::gauge!(m::PIPES_POOLED, "worker" => self.index.to_string())
            .set(self.pipes.idle() as f64);
    }
}

/// Follows the route source's news as it arrives: revocations reach sessions at once,
/// not at the next housekeeping tick.
pub async fn route_news<S: RouteSource>(w: Rc<Worker<S>>, bell: std::os::unix::net::UnixStream) {
    let bell = match Bell::new(bell) {
        Ok(b) => b,
        Err(e) => {
            tracing::error!(worker = w.index, error = %e, "cannot register the route source's bell; changes follow at housekeeping ticks");
            return;
        }
    };
    while bell.rung().await.is_ok() {
        w.follow_route_changes();
    }
}

/// A live session's route was rewritten: take up its new expiry, or end the sessions if
/// the route is gone by now.
async fn follow_rewrite<S: RouteSource>(w: Rc<Worker<S>>, session: String) {
    let route = match w.lookup(&session).await {
        Ok(r) => r,
        // Unanswerable now: the sessions keep their expiry; the next change decides.
        Err(e) => {
            tracing::warn!(worker = w.index, session = %session, error = %e, "cannot re-read a rewritten route");
            return;
        }
    };
    let live = w.sessions_of(&session);
    let Some(route) = route else {
        for s in &live {
            s.kill.fire(close::SESSION_REVOKED);
        }
        return;
    };
    // A view link withdrawn or replaced: its viewers go, the full viewers stay.
    let mut revoked = 0;
    for s in &live {
        if s.view_token
            .get()
            .is_some_and(|d| route.view_token_digest != Some(d))
        {
            s.kill.fire(close::SESSION_REVOKED);
            revoked += 1;
        }
    }
    if revoked > 0 {
        tracing::info!(worker = w.index, session = %session, connections = revoked, "view token withdrawn; closing its view-only viewers");
    }
    let at = route
        .time_left(SystemTime::now())
        .map(|left| Instant::now() + left);
    let mut earlier = false;
    for s in &live {
        earlier |= at.is_some_and(|a| s.expires.get().is_none_or(|old| a < old));
        s.expires.set(at);
    }
    // A later expiry is seen by each relay when its timer fires; an earlier one needs a
    // timer of its own.
    if let (true, Some(at)) = (earlier, at) {
        monoio::time::sleep(at.saturating_duration_since(Instant::now())).await;
        for s in w.sessions_of(&session) {
            if s.expires.get().is_some_and(|t| t <= Instant::now()) {
                s.kill.fire(close::SESSION_EXPIRED);
            }
        }
    }
}

/// When a drain closes a session: at a uniformly random point (`r` in `[0, 1)`) of the
/// spread window that opens at the drain deadline `due`, so that the browsers' reconnects
/// (noVNC retries at once) arrive spread over the window rather than as one storm. A
/// session first seen inside the window (accepted just before a handover) gets a point in
/// what is left of it; past the window, now.
pub fn drain_close_at(due: Instant, spread: Duration, now: Instant, r: f64) -> Instant {
    let start = due.max(now);
    let end = due + spread;
    if start >= end {
        return start;
    }
    start + (end - start).mul_f64(r.clamp(0.0, 1.0))
}

/// The worker's housekeeping: flushes counters once a second, and runs the drain: stop
/// accepting at once, let sessions finish until the drain deadline, then close the rest
/// with 1001, spread over `--drain-spread`. Returns when draining and no connection is
/// left (sessions, and connections still in their handshake, which are answered).
pub async fn housekeeping<S: RouteSource>(w: Rc<Worker<S>>) {
    let tick = Duration::from_millis(100);
    let mut last_flush = Instant::now();
    let mut drain_started: Option<Instant> = None;
    let mut announced = false;
    loop {
        monoio::time::sleep(tick).await;
        w.follow_route_changes();
        // Follows a reload within a tick even when no connection arrives.
        let _ = w.dynamic();
        if last_flush.elapsed() >= Duration::from_secs(1) {
            w.flush_stats();
            last_flush = Instant::now();
        }
        if drain_started.is_none() && w.shared.draining.load(Ordering::Acquire) {
            drain_started = Some(Instant::now());
            let mode = w.shared.drain_mode();
            // After a handover the successor takes new connections; the few this worker
            // accepted before it stopped are still served, not refused.
            w.draining.set(mode != Some(super::DrainMode::Handover));
            w.stop_accepting.fire(());
            tracing::info!(worker = w.index, sessions = w.session_count(), mode = ?mode, "draining");
        }
        if let Some(t) = drain_started {
            let due = t + w.limits.drain_timeout;
            let now = Instant::now();
            if now >= due {
                if !announced {
                    tracing::info!(
                        worker = w.index,
                        sessions = w.session_count(),
                        spread_secs = w.limits.drain_spread.as_secs_f64(),
                        "drain deadline: closing sessions with 1001"
                    );
                    announced = true;
                }
                w.close_for_drain(due, now);
            }
            // SeqCst: see `accept_queued`, which counts a hand-off before it looks at
            // the drain flag.
            if w.accept_ended.get()
                && w.session_count() == 0
                && w.shared.lanes[w.index].conns.load(Ordering::SeqCst) == 0
            {
                w.flush_stats();
                return;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn drain_closes_fall_inside_the_spread_window() {
        let due = Instant::now();
        let spread = Duration::from_secs(10);
        assert_eq!(drain_close_at(due, spread, due, 0.0), due);
        assert_eq!(
            drain_close_at(due, spread, due, 0.5),
            due + Duration::from_secs(5)
        );
        assert_eq!(drain_close_at(due, Duration::ZERO, due, 0.7), due);
        // Seen late in the window: what is left of it.
        let late = due + Duration::from_secs(8);
        assert_eq!(
            drain_close_at(due, spread, late, 0.5),
            due + Duration::from_secs(9)
        );
        // Past the window: now.
        let after = due + Duration::from_secs(11);
        assert_eq!(drain_close_at(due, spread, after, 0.5), after);
        // Jitter spreads them: 1000 draws fill every tenth of the window.
        let mut tenths = [0u32; 10];
        for _ in 0..1000 {
            let at = drain_close_at(due, spread, due, fastrand::f64());
            tenths[((at - due).as_secs_f64()) as usize] += 1;
        }
        assert!(tenths.iter().all(|&n| n > 0), "{tenths:?}");
    }
}
