//! The control-plane thread: one tokio runtime on one thread, holding the Redis connection,
//! the event subscription and the health flag. Workers talk to it through channels only.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use futures_util::StreamExt as _;
use futures_util::future::BoxFuture;
use tokio::sync::{Notify, mpsc};
use tokio::task::JoinSet;
use vncgate_schema::store::{self, Conn};
use vncgate_schema::{EVENTS_CHANNEL, EventOp, RemovalReason, RouteEvent, Timeouts};

use super::last_known::{self, LastKnown};
use super::{Answer, RedisSettings, ToWorker};
use crate::fault;
use crate::live::Live;
use crate::metrics as m;
use crate::route::{Route, RouteChange, SourceHealth, Unavailable};
use crate::server::mailbox::Mailbox;
use crate::server::viewers::Viewers;

/// The `op` labels of `vncgate_redis_errors_total`: every Redis failure this thread counts.
pub const REDIS_ERROR_OPS: &[&str] = &[
    "connect",
    "ping",
    "lookup",
    "lookup_timeout",
    "subscribe",
    "subscription_lost",
    "recheck",
];

/// The `op` labels of `vncgate_route_events_total`.
pub const ROUTE_EVENT_OPS: &[&str] = &["put", "del", "invalid", "resubscribe", "recheck_gone"];

pub(super) struct Request {
    session: String,
    worker: usize,
    id: u64,
}

/// The workers' handle on the control thread.
pub struct Control {
    requests: mpsc::UnboundedSender<Request>,
    health: Arc<SourceHealth>,
    subscribed: Arc<AtomicBool>,
    mailboxes: Vec<Arc<Mailbox<ToWorker>>>,
    last_known: Arc<LastKnown>,
    pub(super) settings: RedisSettings,
}

impl Control {
    pub fn health(&self) -> Arc<SourceHealth> {
        self.health.clone()
    }

    pub(super) fn is_up(&self) -> bool {
        self.health.is_up()
    }

    /// Waits up to `within` for the first connection and subscription, so that a gateway
    /// whose Redis is fine neither answers its first upgrades with 503 nor has its first
    /// cache entries dropped by the subscription's initial flush. Returns whether both
    /// happened; a gateway starts either way (and heals when Redis comes).
    pub fn wait_connected(&self, within: Duration) -> bool {
        let deadline = Instant::now() + within;
        let ready = || self.health.is_up() && self.subscribed.load(Ordering::Acquire);
        while !ready() && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(5));
        }
        ready()
    }

    /// Sends lookup `id` of worker `worker`; the answer arrives in that worker's mailbox.
    /// False when the control thread is gone.
    pub(super) fn ask(&self, worker: usize, id: u64, session: &str) -> bool {
        self.requests
            .send(Request {
                session: session.to_owned(),
                worker,
                id,
            })
            .is_ok()
    }

    /// The last route found for `session` by any worker's lookup, for a miss while Redis
    /// cannot answer.
    pub(super) fn last_known(&self, session: &str) -> Option<Arc<Route>> {
        self.last_known.get(session)
    }

    /// Worker `index`'s mailbox.
    pub(super) fn mailbox(&self, index: usize) -> Arc<Mailbox<ToWorker>> {
        self.mailboxes[index].clone()
    }
}

/// What the control thread's tasks share.
struct State {
    settings: RedisSettings,
    timeouts: Timeouts,
    conn: Mutex<Option<Conn>>,
    health: Arc<SourceHealth>,
    /// A lookup saw the connection fail: check it now rather than at the next ping.
    suspect: Notify,
    /// The subscription (re)started: check live sessions now.
    recheck: Notify,
    to_workers: Vec<Arc<Mailbox<ToWorker>>>,
    subscribed: Arc<AtomicBool>,
    viewers: Arc<Viewers>,
    /// The static routes served alongside Redis (reloadable), never rechecked against it.
    fixed: Arc<Live>,
    /// Every route found, for workers whose own cache lacks it during an outage; `None`
    /// where worker caches are off (`--route-cache-ttl 0`), as it serves what they would.
    last_known: Option<Arc<LastKnown>>,
}

impl State {
    fn conn(&self) -> Option<Conn> {
        self.conn.lock().unwrap_or_else(|p| p.into_inner()).clone()
    }

    fn set_conn(&self, c: Option<Conn>) {
        *self.conn.lock().unwrap_or_else(|p| p.into_inner()) = c;
    }

    /// Passes `msg` to every worker, and applies it to the last-known routes first (a
    /// worker that learns of a change never finds the old route there afterwards).
    fn broadcast(&self, msg: ToWorker) {
        if let Some(k) = &self.last_known {
            match &msg {
                ToWorker::Answer { .. } => {}
                ToWorker::Flush => k.clear(),
                ToWorker::Change(
                    RouteChange::Changed { session } | RouteChange::Removed { session, .. },
                ) => k.forget(session),
            }
        }
        for mb in &self.to_workers {
            mb.post(msg.clone());
        }
    }

    fn mark_down(&self, why: String) {
        metrics::gauge!(m::REDIS_UP).set(0.0);
        if self.health.set_down(why.clone()) {
            tracing::warn!(redis = %self.settings.url, error = %why, "redis unavailable: uncached lookups fail with 503 until it returns");
        }
    }

    fn mark_up(&self) {
        metrics::gauge!(m::REDIS_UP).set(1.0);
        if self.health.set_up() {
            tracing::info!(redis = %self.settings.url, "redis connected");
        }
    }
}

/// Starts the control thread for `workers` workers. `fixed` holds the static routes served
/// alongside Redis (never rechecked against it).
pub fn spawn(
    settings: RedisSettings,
    workers: usize,
    viewers: Arc<Viewers>,
    fixed: Arc<Live>,
) -> Result<Arc<Control>, String> {
    let (requests, rx) = mpsc::unbounded_channel();
    let mailboxes = (0..workers)
        .map(|_| Mailbox::new().map(Arc::new))
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| format!("cannot create worker mailboxes: {e}"))?;
    let health = Arc::new(SourceHealth::new("redis"));
    let subscribed = Arc::new(AtomicBool::new(false));
    let last_known = Arc::new(LastKnown::new(last_known::MAX_ENTRIES));
    metrics::gauge!(m::REDIS_UP).set(0.0);
    let state = Arc::new(State {
        timeouts: Timeouts {
            connect: settings.timeout.max(Duration::from_millis(200)),
            response: settings.timeout,
        },
        settings: settings.clone(),
        conn: Mutex::new(None),
        health: health.clone(),
        suspect: Notify::new(),
        recheck: Notify::new(),
        to_workers: mailboxes.clone(),
        subscribed: subscribed.clone(),
        viewers,
        fixed,
        last_known: (!settings.cache_ttl.is_zero()).then(|| last_known.clone()),
    });
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(|e| format!("cannot build the redis control runtime: {e}"))?;
    // Held by the control thread, so that the lookups channel never closes: every worker's
    // handle drops as a drain ends, and `serve_lookups` must not take that for a failure.
    let keep_open = requests.clone();
    std::thread::Builder::new()
        .name("vncgate-redis".into())
        .spawn(move || {
            let run = std::panic::AssertUnwindSafe(|| rt.block_on(supervise(state, rx)));
            let _keep_open = keep_open;
            // Without this thread no revocation arrives and no route is found: a gateway
            // that would go on half-working exits instead, loudly, for its supervisor to
            // restart.
            let why = match std::panic::catch_unwind(run) {
                Ok(()) => "the redis control thread stopped".to_owned(),
                Err(p) => fault::panic_message(&*p).to_owned(),
            };
            tracing::error!(panic = %why, "the redis control thread failed; exiting");
            std::process::exit(crate::server::EXIT_TASK_DIED);
        })
        .map_err(|e| format!("cannot start the redis control thread: {e}"))?;
    Ok(Arc::new(Control {
        requests,
        health,
        subscribed,
        mailboxes,
        last_known,
        settings,
    }))
}

/// Runs the control thread's long-running tasks and waits for the first to end. Each is
/// meant to run for the life of the process, so any ending, a panic or a return, is a
/// fault: logged with the task's name and the panic's message, then the process exits
/// non-zero so that systemd restarts it (a dead `follow_events` would stop revocation
/// silently, a dead `serve_lookups` every new session).
async fn supervise(state: Arc<State>, rx: mpsc::UnboundedReceiver<Request>) {
    let mut tasks = JoinSet::new();
    let mut names = HashMap::new();
    let [connect, events, recheck, lookups] = fault::CONTROL_TASKS;
    let mut add = |name: &'static str, task: BoxFuture<'static, ()>| {
        names.insert(tasks.spawn(injectable(name, task)).id(), name);
    };
    add(connect, Box::pin(keep_connected(state.clone())));
    add(events, Box::pin(follow_events(state.clone())));
    add(recheck, Box::pin(recheck_live_sessions(state.clone())));
    add(lookups, Box::pin(serve_lookups(state, rx)));
    let (id, panic) = match tasks.join_next_with_id().await {
        Some(Ok((id, ()))) => (id, None),
        Some(Err(e)) => (
            e.id(),
            Some(match e.try_into_panic() {
                Ok(p) => fault::panic_message(&*p).to_owned(),
                Err(e) => e.to_string(),
            }),
        ),
        None => unreachable!("the set holds four tasks"),
    };
    let task = names.get(&id).copied().unwrap_or("unknown");
    match panic {
        Some(p) => tracing::error!(task, panic = %p, "redis control task panicked; exiting"),
        None => tracing::error!(task, "redis control task ended; exiting"),
    }
    std::process::exit(crate::server::EXIT_TASK_DIED);
}

/// `task`, made to panic when the test-only hook names it (see [`crate::fault`]).
async fn injectable(name: &'static str, task: BoxFuture<'static, ()>) {
    match fault::panic_after(name) {
        None => task.await,
        Some(after) => {
            let due = async {
                while !fault::has_started() {
                    tokio::time::sleep(fault::START_POLL).await;
                }
                tokio::time::sleep(after).await;
            };
            tokio::select! {
                () = task => {}
                () = due => panic!("{}", fault::message(name)),
            }
        }
    }
}

fn backoff_next(d: Duration) -> Duration {
    (d * 2).min(Duration::from_secs(1))
}

/// Connects, pings once a second, and reconnects with backoff (100 ms doubling to 1 s)
/// whenever the connection fails.
async fn keep_connected(s: Arc<State>) {
    let mut backoff = Duration::from_millis(100);
    loop {
        let Some(mut c) = s.conn() else {
            // Up only once a command is answered: a hung Redis still accepts connections.
            let attempt = async {
                let mut c = s.settings.url.connect(s.timeouts).await?;
                redis::cmd("PING").query_async::<String>(&mut c).await?;
                Ok::<_, redis::RedisError>(c)
            };
            match tokio::time::timeout(s.timeouts.connect * 3, attempt).await {
                Ok(Ok(c)) => {
                    s.set_conn(Some(c));
                    s.mark_up();
                    backoff = Duration::from_millis(100);
                }
                failed => {
                    metrics::counter!(m::REDIS_ERRORS, "op" => "connect").increment(1);
                    s.mark_down(match failed {
                        Ok(Err(e)) => e.to_string(),
                        _ => "no answer to connect and PING in time".into(),
                    });
                    tokio::time::sleep(backoff).await;
                    backoff = backoff_next(backoff);
                }
            }
            continue;
        };
        tokio::select! {
            _ = tokio::time::sleep(Duration::from_secs(1)) => {}
            _ = s.suspect.notified() => {}
        }
        let ping = tokio::time::timeout(
            s.timeouts.response,
            redis::cmd("PING").query_async::<String>(&mut c),
        )
        .await;
        match ping {
            Ok(Ok(_)) => s.mark_up(),
            Ok(Err(e)) => {
                metrics::counter!(m::REDIS_ERRORS, "op" => "ping").increment(1);
                s.set_conn(None);
                s.mark_down(e.to_string());
            }
            Err(_) => {
                metrics::counter!(m::REDIS_ERRORS, "op" => "ping").increment(1);
                s.set_conn(None);
                s.mark_down(format!(
                    "no answer to PING within {:?}",
                    s.timeouts.response
                ));
            }
        }
    }
}

/// Answers the workers' lookups, each in its own task.
async fn serve_lookups(s: Arc<State>, mut rx: mpsc::UnboundedReceiver<Request>) {
    while let Some(req) = rx.recv().await {
        tokio::spawn(answer(s.clone(), req));
    }
}

async fn answer(s: Arc<State>, req: Request) {
    let reply = |answer: Answer| {
        s.to_workers[req.worker].post(ToWorker::Answer { id: req.id, answer });
    };
    let Some(mut c) = s.conn() else {
        reply(Err(Unavailable("redis unavailable")));
        return;
    };
    let epoch = s.last_known.as_ref().map(|k| k.epoch());
    let started = Instant::now();
    let got =
        tokio::time::timeout(s.settings.timeout, store::get_route(&mut c, &req.session)).await;
    metrics::histogram!(m::ROUTE_LOOKUP_SECONDS).record(started.elapsed().as_secs_f64());
    let answer = match got {
        Ok(Ok(None)) => {
            forget(&s, &req.session);
            Ok(None)
        }
        Ok(Ok(Some(Ok(rec)))) => {
            let route = Arc::new(Route::from(rec));
            if let (Some(k), Some(epoch)) = (&s.last_known, epoch) {
                k.remember(&req.session, route.clone(), epoch);
            }
            Ok(Some(route))
        }
        Ok(Ok(Some(Err(e)))) => {
            forget(&s, &req.session);
            metrics::counter!(m::ROUTE_RECORDS_INVALID, "error" => e.label()).increment(1);
            tracing::error!(session = %req.session, error = %e, "route record in redis is unusable");
            Err(Unavailable("route record invalid"))
        }
        Ok(Err(e)) => {
            metrics::counter!(m::REDIS_ERRORS, "op" => "lookup").increment(1);
            tracing::warn!(session = %req.session, error = %e, "route lookup failed");
            if e.is_io_error() || e.is_connection_dropped() || e.is_connection_refusal() {
                s.suspect.notify_one();
            }
            Err(Unavailable("redis lookup failed"))
        }
        Err(_) => {
            metrics::counter!(m::REDIS_ERRORS, "op" => "lookup_timeout").increment(1);
            tracing::warn!(session = %req.session, timeout = ?s.settings.timeout, "route lookup timed out");
            s.suspect.notify_one();
            Err(Unavailable("redis lookup timed out"))
        }
    };
    // The worker may have given up waiting; then it drops the answer.
    reply(answer);
}

/// Drops a route that Redis no longer holds (or holds unusable) from the last-known ones.
fn forget(s: &State, session: &str) {
    if let Some(k) = &s.last_known {
        k.drop_missing(session);
    }
}

/// Subscribes to route events and passes them to every worker. Each (re)subscription
/// flushes every cache and rechecks live sessions: events may have been missed meanwhile.
async fn follow_events(s: Arc<State>) {
    let mut backoff = Duration::from_millis(100);
    loop {
        let sub = async {
            let mut p = s.settings.url.pubsub(s.timeouts).await?;
            p.subscribe(EVENTS_CHANNEL).await?;
            Ok::<_, redis::RedisError>(p)
        };
        let pubsub = match tokio::time::timeout(s.timeouts.connect * 2, sub).await {
            Ok(Ok(p)) => p,
            Ok(Err(e)) => {
                metrics::counter!(m::REDIS_ERRORS, "op" => "subscribe").increment(1);
                tracing::debug!(error = %e, "cannot subscribe to route events yet");
                tokio::time::sleep(backoff).await;
                backoff = backoff_next(backoff);
                continue;
            }
            Err(_) => {
                metrics::counter!(m::REDIS_ERRORS, "op" => "subscribe").increment(1);
                tokio::time::sleep(backoff).await;
                backoff = backoff_next(backoff);
                continue;
            }
        };
        backoff = Duration::from_millis(100);
        metrics::counter!(m::ROUTE_EVENTS, "op" => "resubscribe").increment(1);
        tracing::info!(
            channel = EVENTS_CHANNEL,
            "subscribed to route events; flushing route caches"
        );
        s.broadcast(ToWorker::Flush);
        s.subscribed.store(true, Ordering::Release);
        s.recheck.notify_one();
        let (mut sink, mut stream) = pubsub.split();
        loop {
            // A subscriber only listens, so a connection that died without a FIN would go
            // unnoticed: after 5 quiet seconds, a PING must come back.
            let msg = tokio::select! {
                m = stream.next() => m,
                _ = tokio::time::sleep(Duration::from_secs(5)) => {
                    let pong = tokio::time::timeout(
                        s.timeouts.response * 2,
                        sink.ping::<redis::Value>(),
                    )
                    .await;
                    if matches!(pong, Ok(Ok(_))) {
                        continue;
                    }
                    tracing::warn!("route event subscription stopped answering PING");
                    break;
                }
            };
            let Some(msg) = msg else { break };
            let event = match RouteEvent::decode(msg.get_payload_bytes()) {
                Ok(e) => e,
                Err(e) => {
                    metrics::counter!(m::ROUTE_EVENTS, "op" => "invalid").increment(1);
                    tracing::warn!(error = %e, "ignoring a message on the route events channel");
                    continue;
                }
            };
            let change = match event.op {
                EventOp::Put => RouteChange::Changed {
                    session: event.session,
                },
                EventOp::Del => RouteChange::Removed {
                    session: event.session,
                    expired: event.reason == Some(RemovalReason::Expired),
                },
            };
            let op = match change {
                RouteChange::Changed { .. } => "put",
                RouteChange::Removed { .. } => "del",
            };
            metrics::counter!(m::ROUTE_EVENTS, "op" => op).increment(1);
            tracing::debug!(?change, "route event");
            s.broadcast(ToWorker::Change(change));
        }
        metrics::counter!(m::REDIS_ERRORS, "op" => "subscription_lost").increment(1);
        tracing::warn!("route event subscription lost; resubscribing");
        s.suspect.notify_one();
    }
}

/// Checks the routes of live sessions every `recheck_interval` and after every
/// resubscription; a route that is gone ends its sessions with 4006. This catches routes
/// deleted while events could not arrive, or deleted without an event.
async fn recheck_live_sessions(s: Arc<State>) {
    loop {
        tokio::select! {
            _ = tokio::time::sleep(s.settings.recheck_interval) => {}
            _ = s.recheck.notified() => {}
        }
        let Some(c) = s.conn() else { continue };
        let statics = s.fixed.current().1;
        let ids: Vec<String> = s
            .viewers
            .sessions()
            .into_iter()
            .filter(|id| statics.routes.get(id).is_none())
            .collect();
        let timeout = s.settings.timeout;
        let checks = ids.into_iter().map(|id| {
            let mut c = c.clone();
            async move {
                let r = tokio::time::timeout(timeout, store::route_exists(&mut c, &id)).await;
                (id, r)
            }
        });
        let results = futures_util::future::join_all(checks).await;
        for (id, r) in results {
            match r {
                Ok(Ok(false)) => {
                    tracing::info!(session = %id, "route of a live session is gone; revoking");
                    metrics::counter!(m::ROUTE_EVENTS, "op" => "recheck_gone").increment(1);
                    s.broadcast(ToWorker::Change(RouteChange::Removed {
                        session: id,
                        expired: false,
                    }));
                }
                Ok(Ok(true)) => {}
                // Unknown: keep the session; the next check decides.
                Ok(Err(_)) | Err(_) => {
                    metrics::counter!(m::REDIS_ERRORS, "op" => "recheck").increment(1);
                }
            }
        }
    }
}
