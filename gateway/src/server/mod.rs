//! The runtime adapter around the sans-IO core: worker threads with their runtimes and
//! listeners ([`worker`], [`listener`]), the per-connection flow ([`session`]), the splice
//! relay ([`relay`]), per-worker pools ([`pool`]), task-local signals ([`signal`]) and the
//! admin endpoint ([`admin`]).

pub mod admin;
pub mod balance;
pub mod client;
pub mod handover;
pub mod listener;
pub mod mailbox;
pub mod notify;
pub mod pool;
pub mod proxy_header;
pub mod record;
pub mod relay;
mod run;
pub mod session;
pub mod signal;
pub mod sock;
pub mod view_only;
pub mod viewers;
pub mod worker;

use std::net::SocketAddr;
use std::os::fd::{AsRawFd as _, RawFd};
use std::rc::Rc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
use std::thread::JoinHandle;

use metrics_exporter_prometheus::PrometheusHandle;

use crate::config::{IoDriver, PinWorkers, Settings};
use crate::fault;
use crate::metrics as m;
use crate::route::{RouteSource, SourceHealth};
use worker::Worker;

pub use run::{Reloader, SetLogFilter, run};

/// How a drain treats the listening sockets.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DrainMode {
    /// SIGTERM: answer what is queued (503), then take the sockets out of LISTEN, so the
    /// kernel queues nothing more to a process that will not accept it.
    Close,
    /// A successor holds the same sockets: stop accepting and close our descriptors only.
    /// Shutting the sockets down would end the successor's listeners and reset what is
    /// queued on them, and the successor accepts what is queued.
    Handover,
}

/// Where the process stands between serving and draining; a handover offer in flight
/// decides the drain's mode, so a SIGTERM meanwhile never shuts down sockets that a
/// successor may already hold.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Lifecycle {
    Serving,
    /// Listening sockets sent to a successor that has not confirmed yet; `drain_asked`: a
    /// signal came meanwhile.
    Offering {
        drain_asked: bool,
    },
    Draining(DrainMode),
}

/// State shared by all workers: only flags, read or written rarely.
#[derive(Debug)]
pub struct Shared {
    pub draining: AtomicBool,
    lifecycle: Mutex<Lifecycle>,
    pub ready_workers: AtomicUsize,
    pub workers: usize,
    /// Each worker's load and inbox, for evening out connections (see [`balance`]).
    pub lanes: Vec<balance::Lane>,
    /// Live connections per session, for viewer limits (see [`viewers`]).
    pub viewers: Arc<viewers::Viewers>,
    /// The health of a route source that can fail (Redis), for `/readyz`.
    pub route_health: Option<Arc<SourceHealth>>,
    /// The settings a SIGHUP reloads (see [`crate::live`]).
    pub live: Arc<crate::live::Live>,
    /// `--record DIR` (see [`record`]).
    pub recordings: Option<Arc<record::Recordings>>,
}

#[cfg(test)]
impl Shared {
    /// A `Shared` for unit tests: no lanes, nothing live.
    pub(crate) fn for_tests(workers: usize) -> Shared {
        Shared {
            draining: AtomicBool::new(false),
            lifecycle: Mutex::new(Lifecycle::Serving),
            ready_workers: AtomicUsize::new(0),
            workers,
            lanes: Vec::new(),
            viewers: Arc::default(),
            route_health: None,
            live: Arc::new(crate::live::Live::new(crate::live::Dynamic {
                handshake: Default::default(),
                policy: crate::policy::UpstreamPolicy::new(Vec::new()),
                routes: Default::default(),
            })),
            recordings: None,
        }
    }
}

/// What the route source shares with the rest of the process.
#[derive(Debug, Clone, Default)]
pub struct Hooks {
    pub viewers: Arc<viewers::Viewers>,
    pub route_health: Option<Arc<SourceHealth>>,
    /// The reloadable settings, when the route source reads them too (Redis's recheck
    /// skips static routes); made from the settings otherwise.
    pub live: Option<Arc<crate::live::Live>>,
}

impl Shared {
    /// Starts a drain (SIGTERM): stop accepting, close sessions with 1001 after the drain
    /// timeout. During a handover offer it waits for the offer's outcome.
    pub fn drain(&self) {
        let mut l = self.lifecycle.lock().unwrap_or_else(|p| p.into_inner());
        match *l {
            Lifecycle::Serving => self.start_drain(&mut l, DrainMode::Close),
            Lifecycle::Offering { .. } => *l = Lifecycle::Offering { drain_asked: true },
            Lifecycle::Draining(_) => {}
        }
    }

    fn start_drain(&self, l: &mut Lifecycle, mode: DrainMode) {
        *l = Lifecycle::Draining(mode);
        self.draining.store(true, Ordering::SeqCst);
        metrics::gauge!(m::DRAINING).set(1.0);
    }

    /// The drain's mode, once one started.
    pub fn drain_mode(&self) -> Option<DrainMode> {
        match *self.lifecycle.lock().unwrap_or_else(|p| p.into_inner()) {
            Lifecycle::Draining(m) => Some(m),
            _ => None,
        }
    }

    /// Reserves the listening sockets for a successor; false once a drain started (the
    /// sockets are, or are about to be, out of LISTEN) or another offer is in flight.
    pub fn offer_handover(&self) -> bool {
        let mut l = self.lifecycle.lock().unwrap_or_else(|p| p.into_inner());
        if *l == Lifecycle::Serving {
            *l = Lifecycle::Offering { drain_asked: false };
            true
        } else {
            false
        }
    }

    /// The offer's outcome: taken over (drain, keeping the sockets open for the successor)
    /// or not (serve on, or drain as a signal asked meanwhile).
    pub fn end_offer(&self, taken: bool) {
        let mut l = self.lifecycle.lock().unwrap_or_else(|p| p.into_inner());
        let Lifecycle::Offering { drain_asked } = *l else {
            return;
        };
        if taken {
            self.start_drain(&mut l, DrainMode::Handover);
        } else if drain_asked {
            self.start_drain(&mut l, DrainMode::Close);
        } else {
            *l = Lifecycle::Serving;
        }
    }
}

/// The I/O driver the workers run.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DriverKind {
    IoUring,
    Epoll,
}

impl DriverKind {
    pub fn as_str(self) -> &'static str {
        match self {
            DriverKind::IoUring => "io_uring",
            DriverKind::Epoll => "epoll",
        }
    }
}

/// Builds the ring a worker would run, and drops it: a smaller ring than the workers' could
/// be set up where theirs cannot.
fn probe_io_uring() -> std::io::Result<()> {
    uring_runtime().map(drop)
}

/// Chooses the driver. Probing builds a real io_uring instance, which is what fails under
/// seccomp filters or `kernel.io_uring_disabled`; the choice is explicit per runtime, so
/// monoio's own environment-variable detection never comes into play.
pub fn select_driver(choice: IoDriver) -> Result<DriverKind, String> {
    match choice {
        IoDriver::Epoll => Ok(DriverKind::Epoll),
        IoDriver::Uring => probe_io_uring()
            .map(|()| DriverKind::IoUring)
            .map_err(|e| format!("--io-driver uring: io_uring cannot be set up here: {e}")),
        IoDriver::Auto => match probe_io_uring() {
            Ok(()) => Ok(DriverKind::IoUring),
            Err(e) => {
                tracing::warn!(error = %e, "io_uring cannot be set up; falling back to epoll");
                Ok(DriverKind::Epoll)
            }
        },
    }
}

/// The exit status of a gateway whose worker or control task died (`EX_SOFTWARE`).
pub const EXIT_TASK_DIED: i32 = 70;

/// A started gateway.
pub struct Running {
    pub local_addr: SocketAddr,
    pub admin_addr: Option<SocketAddr>,
    pub driver: DriverKind,
    /// The public listener speaks `wss://`.
    pub tls: bool,
    /// Its certificates, for SIGHUP.
    pub certs: Option<Arc<crate::tls::Certs>>,
    shared: Arc<Shared>,
    threads: Vec<JoinHandle<()>>,
}

impl Running {
    pub fn shared(&self) -> Arc<Shared> {
        self.shared.clone()
    }

    /// Waits for every worker to finish (after a drain). A worker that dies exits the
    /// process from its own thread (see `supervised`), so this returns only after a
    /// drain; a thread that still ended in a panic is treated the same way.
    pub fn join(self) {
        for (index, t) in self.threads.into_iter().enumerate() {
            if let Err(p) = t.join() {
                worker_died(index, Some(fault::panic_message(&*p)));
            }
        }
        // The drained sessions' recordings get their last records and end records.
        if let Some(r) = &self.shared.recordings {
            r.wait_writers(std::time::Duration::from_secs(10));
        }
    }
}

/// Runs worker `index`'s runtime (`body`) and makes its death loud. monoio does not catch
/// a task's panic: it unwinds out of `block_on`, so a panic in any of the worker's tasks
/// (a session, the housekeeping, the accept loop) ends up here. Its sessions are gone and
/// its listener with them, while the kernel would keep handing it connections through
/// `SO_REUSEPORT`: the process exits non-zero for systemd to restart it. A worker ends
/// normally only after its drain.
fn supervised(index: usize, shared: &Shared, body: impl FnOnce()) {
    match std::panic::catch_unwind(std::panic::AssertUnwindSafe(body)) {
        Ok(()) if shared.draining.load(Ordering::Relaxed) => {}
        Ok(()) => worker_died(index, None),
        // The runtime is left undropped: it was unwound through mid-poll.
        Err(p) => worker_died(index, Some(fault::panic_message(&*p))),
    }
}

fn worker_died(index: usize, panic: Option<&str>) -> ! {
    match panic {
        Some(p) => tracing::error!(worker = index, panic = p, "worker panicked; exiting"),
        None => tracing::error!(worker = index, "worker stopped without a drain; exiting"),
    }
    std::process::exit(EXIT_TASK_DIED)
}

/// Counts a worker in [`Shared::ready_workers`] while it accepts: from its listener's
/// registration until the listener closes in a drain, or until the worker dies (the guard
/// drops as the panic unwinds the worker's main future), so `/readyz` counts live workers,
/// not started ones.
struct Accepting<'a>(&'a AtomicUsize);

impl<'a> Accepting<'a> {
    fn new(count: &'a AtomicUsize) -> Self {
        count.fetch_add(1, Ordering::Release);
        Self(count)
    }
}

impl Drop for Accepting<'_> {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::Release);
    }
}

/// Binds the listeners and starts the workers with the static routes only (each worker
/// reads them from [`crate::live`], so a reload reaches them).
pub fn start(settings: Settings, prom: Option<PrometheusHandle>) -> Result<Running, String> {
    start_with(settings, prom, Hooks::default(), |_| {
        crate::route::StaticRoutes::default()
    })
}

/// Starts the workers with a route source built per worker by `make_routes` (each worker
/// owns its source: a cache, a channel to a control thread...).
pub fn start_with<S, F>(
    settings: Settings,
    prom: Option<PrometheusHandle>,
    hooks: Hooks,
    make_routes: F,
) -> Result<Running, String>
where
    S: RouteSource,
    F: Fn(usize) -> S + Send + Sync + 'static,
{
    let driver = select_driver(settings.io_driver)?;
    let congestion = resolve_congestion(&settings.tcp_congestion)?;
    let acquired = handover::acquire(&settings, congestion.as_deref())?;
    let local_addr = acquired.listeners[0]
        .local_addr()
        .map_err(|e| format!("listener address: {e}"))?;
    // Copies of every listening descriptor for the handover server, taken before the
    // workers own them: a successor must get all of them (see [`handover`]).
    let offered = match &settings.handover_socket {
        Some(_) => Some(
            acquired
                .listeners
                .iter()
                .map(std::net::TcpListener::try_clone)
                .collect::<Result<Vec<_>, _>>()
                .map_err(|e| format!("cannot copy a listening descriptor: {e}"))?,
        ),
        None => None,
    };
    let shared = Arc::new(Shared {
        draining: AtomicBool::new(false),
        lifecycle: Mutex::new(Lifecycle::Serving),
        ready_workers: AtomicUsize::new(0),
        workers: settings.workers,
        lanes: (0..settings.workers)
            .map(|_| balance::Lane::new())
            .collect::<Result<_, _>>()
            .map_err(|e| format!("cannot create worker lanes: {e}"))?,
        viewers: hooks.viewers,
        route_health: hooks.route_health,
        live: hooks.live.unwrap_or_else(|| {
            Arc::new(crate::live::Live::new(crate::live::Dynamic::of(&settings)))
        }),
        recordings: settings
            .record
            .as_ref()
            .map(|r| record::Recordings::open(r, settings.limits.pipe_size))
            .transpose()?,
    });
    let mut offered_admin = None;
    let admin_addr = match settings.admin {
        Some(a) => {
            let l = match acquired.admin {
                Some(l) => l,
                None => std::net::TcpListener::bind(a)
                    .map_err(|e| format!("cannot bind admin {a}: {e}"))?,
            };
            let addr = l.local_addr().map_err(|e| e.to_string())?;
            if offered.is_some() {
                offered_admin = Some(l.try_clone().map_err(|e| e.to_string())?);
            }
            admin::spawn(l, shared.clone(), prom).map_err(|e| e.to_string())?;
            Some(addr)
        }
        None => None,
    };
    let certs = match &settings.tls {
        Some(f) => {
            let certs = crate::tls::Certs::open(f.cert.clone(), f.key.clone())?;
            certs
                .watch()
                .map_err(|e| format!("cannot start the certificate watcher: {e}"))?;
            Some(certs)
        }
        None => None,
    };
    let tls = certs.as_ref().map(|c| c.server_config()).transpose()?;
    let listeners = handover::spread(acquired.listeners, settings.workers);
    let settings = Arc::new(settings);
    let make_routes = Arc::new(make_routes);
    let cpus = worker_cpus(settings.pin_workers, settings.workers)?;
    let mut threads = Vec::new();
    // The driver each worker runs: the chosen one, or epoll for a worker whose ring could
    // not be built under `auto`.
    let ran_on: Arc<Vec<OnceLock<DriverKind>>> =
        Arc::new((0..settings.workers).map(|_| OnceLock::new()).collect());
    let auto = settings.io_driver == IoDriver::Auto;
    for (index, l) in listeners.into_iter().enumerate() {
        let cpu = cpus.as_ref().and_then(|c| c.get(index).copied());
        let ran_on2 = ran_on.clone();
        let settings = settings.clone();
        let shared2 = shared.clone();
        let shared3 = shared.clone();
        let make_routes = make_routes.clone();
        let congestion = congestion.clone();
        let tls = tls.clone();
        let t = std::thread::Builder::new()
            .name(format!("vncgate-w{index}"))
            .spawn(move || {
                if let Some(cpu) = cpu {
                    match pin_current_thread(cpu) {
                        Ok(()) => tracing::info!(worker = index, cpu, "worker pinned"),
                        Err(e) => tracing::warn!(worker = index, cpu, error = %e, "cannot pin the worker; it runs unpinned"),
                    }
                }
                let run = move || {
                    let w = Rc::new(
                        Worker::new(
                            index,
                            make_routes(index),
                            &settings,
                            congestion.clone(),
                            tls.clone(),
                            shared2.clone(),
                        )
                        .with_proxy(settings.proxy_protocol.clone()),
                    );
                    worker_main(w, l, shared2)
                };
                let r = match (driver == DriverKind::IoUring).then(uring_runtime) {
                    Some(Ok(mut rt)) => {
                        ran_on2[index].set(DriverKind::IoUring).ok();
                        supervised(index, &shared3, || rt.block_on(run()));
                        Ok(())
                    }
                    Some(Err(e)) if !auto => Err(e),
                    uring => {
                        // The probe's ring was built, this one not (memory ran short in
                        // between): `auto` promises epoll where io_uring cannot be set up.
                        if let Some(Err(e)) = uring {
                            tracing::warn!(worker = index, error = %e, "io_uring cannot be set up for this worker; it runs on epoll");
                        }
                        ran_on2[index].set(DriverKind::Epoll).ok();
                        monoio::RuntimeBuilder::<monoio::LegacyDriver>::new()
                            .enable_timer()
                            .build()
                            .map(|mut rt| supervised(index, &shared3, || rt.block_on(run())))
                    }
                };
                if let Err(e) = r {
                    tracing::error!(worker = index, error = %e, "worker runtime failed to start");
                    std::process::exit(1);
                }
            })
            .map_err(|e| format!("cannot spawn worker: {e}"))?;
        threads.push(t);
    }
    // Report started only once every worker accepts, so that "listening" (and /readyz)
    // are true when said.
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    while shared.ready_workers.load(Ordering::Acquire) < settings.workers {
        if std::time::Instant::now() > deadline {
            return Err("workers did not start within 10 s".into());
        }
        std::thread::sleep(std::time::Duration::from_millis(1));
    }
    // Only now, with every worker accepting on the inherited sockets, may the old
    // gateway stop accepting: the queues never go unread.
    if let Some(p) = acquired.predecessor {
        p.release();
    }
    if let (Some(path), Some(listeners)) = (&settings.handover_socket, offered) {
        let offer = handover::Offer {
            listen: local_addr,
            listeners,
            admin: offered_admin,
        };
        if let Err(e) = handover::serve(path, offer, shared.clone()) {
            tracing::error!(error = %e, "cannot serve handovers: a restart will not take these sockets over");
        }
    }
    let mut on_epoll = 0;
    for (i, ran) in ran_on.iter().enumerate() {
        let driver = ran.get().copied().unwrap_or(driver);
        on_epoll += usize::from(driver == DriverKind::Epoll);
        metrics::gauge!(m::IO_DRIVER, "driver" => driver.as_str(), "worker" => i.to_string())
            .set(1.0);
    }
    tracing::info!(
        listen = %local_addr,
        workers = settings.workers,
        driver = driver.as_str(),
        workers_on_epoll = on_epoll,
        tcp_congestion = congestion.as_deref().unwrap_or("system"),
        routes = settings.routes.len(),
        "gateway started"
    );
    fault::gateway_started();
    Ok(Running {
        local_addr,
        admin_addr,
        driver,
        tls: tls.is_some(),
        certs,
        shared,
        threads,
    })
}

/// The congestion control to set on the gateway's sockets, tried on a probe socket first:
/// one the kernel lacks or refuses stops an explicit choice at startup with the reason, and
/// turns the default into the host's own with a warning.
fn resolve_congestion(
    c: &crate::config::TcpCongestion,
) -> Result<Option<std::sync::Arc<str>>, String> {
    let Some(name) = &c.name else {
        return Ok(None);
    };
    let probe = socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::STREAM, None)
        .map_err(|e| format!("cannot create a socket: {e}"))?;
    match probe.set_tcp_congestion(name.as_bytes()) {
        Ok(()) => Ok(Some(name.as_str().into())),
        Err(e) => {
            let why = match e.raw_os_error() {
                Some(libc::ENOENT) => "the kernel has no such algorithm (net.ipv4.tcp_available_congestion_control lists those it has; a module may need loading)".to_owned(),
                Some(libc::EPERM) => "an unprivileged process may only choose those in net.ipv4.tcp_allowed_congestion_control".to_owned(),
                _ => e.to_string(),
            };
            if c.explicit {
                Err(format!("--tcp-congestion {name}: {why}"))
            } else {
                tracing::warn!(tcp_congestion = %name, reason = %why, "default congestion control unavailable; using the host's");
                Ok(None)
            }
        }
    }
}

/// The CPU each worker is to be bound to (see [`PinWorkers`]), or `None`, said in the log
/// either way. `always` fails when the CPUs this process may use cannot be read; `auto`
/// then leaves the workers unpinned.
fn worker_cpus(when: PinWorkers, workers: usize) -> Result<Option<Vec<usize>>, String> {
    if when == PinWorkers::Never {
        tracing::info!(workers, pin_workers = when.as_str(), "workers not pinned");
        return Ok(None);
    }
    let cpus = match allowed_cpus() {
        Ok(c) => c,
        Err(e) if when == PinWorkers::Always => {
            return Err(format!(
                "--pin-workers: cannot read the CPUs this process may use: {e}"
            ));
        }
        Err(e) => {
            tracing::warn!(error = %e, "cannot read the CPUs this process may use; workers not pinned");
            return Ok(None);
        }
    };
    let plan = when.plan(workers, &cpus);
    match (&plan, when) {
        (Some(_), PinWorkers::Always) if cpus.len() < workers => tracing::warn!(
            workers,
            cpus = cpus.len(),
            "more workers than CPUs: some share one"
        ),
        (Some(_), _) => tracing::info!(
            workers,
            cpus = cpus.len(),
            pin_workers = when.as_str(),
            "workers pinned, each to a CPU of its own (--pin-workers=never leaves them to the scheduler)"
        ),
        (None, _) => tracing::info!(
            workers,
            cpus = cpus.len(),
            pin_workers = when.as_str(),
            "workers not pinned: not one worker per CPU this process may use (--pin-workers=always binds them anyway)"
        ),
    }
    Ok(plan)
}

/// The CPUs this process may run on (its affinity mask), in ascending order.
fn allowed_cpus() -> nix::Result<Vec<usize>> {
    let set = nix::sched::sched_getaffinity(nix::unistd::Pid::from_raw(0))?;
    Ok((0..nix::sched::CpuSet::count())
        .filter(|&c| set.is_set(c).unwrap_or(false))
        .collect())
}

/// Binds the calling thread to `cpu` alone.
fn pin_current_thread(cpu: usize) -> nix::Result<()> {
    let mut set = nix::sched::CpuSet::new();
    set.set(cpu)?;
    nix::sched::sched_setaffinity(nix::unistd::Pid::from_raw(0), &set)
}

/// A worker's io_uring runtime. Each ring is used by its own thread only, and completions
/// need not interrupt a worker that is busy in user space: `SINGLE_ISSUER` and
/// `COOP_TASKRUN` (kernel 6.0+) tell the kernel so and spare it inter-processor interrupts.
/// Older kernels refuse the flags; then the ring is built without them.
fn uring_runtime()
-> std::io::Result<monoio::Runtime<monoio::time::TimeDriver<monoio::IoUringDriver>>> {
    let mut tuned = io_uring::IoUring::builder();
    tuned.setup_coop_taskrun().setup_single_issuer();
    monoio::RuntimeBuilder::<monoio::IoUringDriver>::new()
        .uring_builder(tuned)
        .enable_timer()
        .with_entries(4096)
        .build()
        .or_else(|e| {
            tracing::debug!(error = %e, "io_uring setup flags refused; building a plain ring");
            monoio::RuntimeBuilder::<monoio::IoUringDriver>::new()
                .enable_timer()
                .with_entries(4096)
                .build()
        })
}

async fn worker_main<S: RouteSource>(
    w: Rc<Worker<S>>,
    listeners: Vec<std::net::TcpListener>,
    shared: Arc<Shared>,
) {
    let listeners = match listeners
        .into_iter()
        .map(monoio::net::TcpListener::from_std)
        .collect::<Result<Vec<_>, _>>()
    {
        Ok(l) => l,
        Err(e) => {
            tracing::error!(worker = w.index, error = %e, "cannot register listener");
            std::process::exit(1);
        }
    };
    let housekeeping = monoio::spawn(worker::housekeeping(w.clone()));
    if let Some(bell) = w.turns.take_bell() {
        match mailbox::Bell::new(bell) {
            Ok(bell) => {
                let w = w.clone();
                monoio::spawn(async move { signal::hand_out_turns(&w.turns, bell).await });
            }
            Err(e) => {
                tracing::warn!(worker = w.index, error = %e, "cannot register the turn bell; yields wake themselves");
            }
        }
    }
    if let Some(bell) = shared.lanes[w.index].inbox.take_bell() {
        monoio::spawn(inbox(w.clone(), bell, shared.clone()));
    }
    if let Some(bell) = w.routes.bell() {
        monoio::spawn(worker::route_news(w.clone(), bell));
    }
    let name = format!("worker{}", w.index);
    if let Some(after) = fault::panic_after(&name) {
        monoio::spawn(async move {
            while !fault::has_started() {
                monoio::time::sleep(fault::START_POLL).await;
            }
            monoio::time::sleep(after).await;
            panic!("{}", fault::message(&name));
        });
    }
    let accepting = Accepting::new(&shared.ready_workers);
    let fds: Vec<RawFd> = listeners.iter().map(|l| l.as_raw_fd()).collect();
    loop {
        // Readiness, then accept4(2) directly: a cancelled wait holds no connection, so
        // stopping can never lose one inside a cancelled accept op. A worker holds more
        // than one listener after a handover from a gateway with more workers; each
        // wake-up looks at all of them, so a busy one cannot starve the others.
        let ready = monoio::select! {
            r = futures_util::future::select_all(listeners.iter().map(|l| Box::pin(l.readable(false)))) => Some(r.0),
            _ = w.stop_accepting.wait() => None,
        };
        match ready {
            None => break,
            Some(Ok(())) => {
                for &fd in &fds {
                    accept_queued(&w, fd, &shared).await;
                }
            }
            Some(Err(e)) => {
                tracing::warn!(worker = w.index, error = %e, "listener wait failed");
                monoio::time::sleep(std::time::Duration::from_millis(50)).await;
            }
        }
    }
    if shared.drain_mode() == Some(DrainMode::Handover) {
        // The successor holds the same sockets and accepts what they queue: close only
        // our descriptors.
        drop(listeners);
        tracing::info!(worker = w.index, "listeners left to the successor");
    } else {
        // Draining: answer what the kernel already queued (503 "gateway draining", with
        // Retry-After), then leave LISTEN, so nothing more is queued to a process that
        // will not serve it and a replacement can bind the port.
        for &fd in &fds {
            accept_queued(&w, fd, &shared).await;
            if let Err(e) = crate::sys::stop_listening(fd) {
                tracing::warn!(worker = w.index, error = %e, "cannot stop listening");
            }
        }
        drop(listeners);
        tracing::info!(worker = w.index, "listener closed");
    }
    // Connections accepted up to here are counted: the drain ends when they are served.
    w.accept_ended.set(true);
    drop(accepting);
    housekeeping.await;
}

/// Most connections taken from the queue per wake-up, so a burst of connects cannot hold
/// the worker away from its sessions for long.
const ACCEPT_BATCH: usize = 64;

/// Accepts what the listener holds: each connection is served here, or handed to a
/// less-loaded worker (see [`balance`]) unless this worker is draining.
async fn accept_queued<S: RouteSource>(w: &Rc<Worker<S>>, fd: RawFd, shared: &Arc<Shared>) {
    for _ in 0..ACCEPT_BATCH {
        let (stream, peer) = match crate::sys::accept(fd) {
            Ok(c) => c,
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => return,
            Err(e) if e.raw_os_error() == Some(libc::ECONNABORTED) => continue,
            Err(e) => {
                // EMFILE and friends: back off instead of spinning on a full table.
                tracing::warn!(worker = w.index, error = %e, "accept failed");
                monoio::time::sleep(std::time::Duration::from_millis(50)).await;
                return;
            }
        };
        metrics::counter!(m::CONNECTIONS_ACCEPTED, "worker" => w.index.to_string()).increment(1);
        let mut to = if w.draining.get() {
            w.index
        } else {
            balance::pick(&shared.lanes, w.index).unwrap_or(w.index)
        };
        shared.lanes[to].conns.fetch_add(1, Ordering::SeqCst);
        // A worker that has seen the drain returns once its lane counts nothing, and
        // serves no inbox after that: count first, then look at the flag (both SeqCst,
        // as its side sets the flag, then reads the count), so that either it sees this
        // connection or this worker sees the drain and keeps the connection.
        if to != w.index && shared.draining.load(Ordering::SeqCst) {
            shared.lanes[to].conns.fetch_sub(1, Ordering::SeqCst);
            to = w.index;
            shared.lanes[to].conns.fetch_add(1, Ordering::SeqCst);
        }
        if to != w.index {
            shared.lanes[to].inbox.post((stream, peer));
            metrics::counter!(m::CONNECTIONS_HANDED_OFF).increment(1);
            continue;
        }
        match monoio::net::TcpStream::from_std(stream) {
            Ok(stream) => {
                let fut = session::serve(w.clone(), stream, peer, false);
                tracing::trace!(bytes = std::mem::size_of_val(&fut), "session task size");
                monoio::spawn(fut);
            }
            Err(e) => {
                shared.lanes[to].conns.fetch_sub(1, Ordering::Relaxed);
                tracing::warn!(worker = w.index, %peer, error = %e, "cannot register an accepted connection");
            }
        }
    }
    // More may be queued: let the sessions run, then look again.
    w.turns.yield_now().await;
}

/// Serves connections other workers handed to this one (see [`balance`]).
async fn inbox<S: RouteSource>(
    w: Rc<Worker<S>>,
    bell: std::os::unix::net::UnixStream,
    shared: Arc<Shared>,
) {
    let bell = match mailbox::Bell::new(bell) {
        Ok(b) => b,
        Err(e) => {
            tracing::error!(worker = w.index, error = %e, "cannot register the worker's bell");
            return;
        }
    };
    loop {
        if bell.rung().await.is_err() {
            return;
        }
        for (s, peer) in shared.lanes[w.index].inbox.take_all() {
            match monoio::net::TcpStream::from_std(s) {
                Ok(stream) => {
                    monoio::spawn(session::serve(w.clone(), stream, peer, true));
                }
                Err(e) => {
                    shared.lanes[w.index].conns.fetch_sub(1, Ordering::Relaxed);
                    tracing::warn!(worker = w.index, %peer, error = %e, "cannot adopt a handed-off connection")
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn shared(workers: usize) -> Shared {
        Shared::for_tests(workers)
    }

    /// What [`supervised`] relies on: a panic in any task of a monoio runtime unwinds out
    /// of `block_on`, dropping the main future (and the worker's [`Accepting`]) on the way.
    #[test]
    fn a_worker_whose_task_panics_stops_counting_as_ready() {
        let s = Arc::new(shared(2));
        let _other = Accepting::new(&s.ready_workers);
        let s2 = s.clone();
        let died = std::thread::spawn(move || {
            let mut rt = monoio::RuntimeBuilder::<monoio::LegacyDriver>::new()
                .enable_timer()
                .build()
                .unwrap();
            std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
                rt.block_on(async {
                    let _accepting = Accepting::new(&s2.ready_workers);
                    assert_eq!(admin::not_ready(&s2), None);
                    monoio::spawn(async { panic!("a session's bug") });
                    std::future::pending::<()>().await;
                })
            }))
            .map_err(|p| fault::panic_message(&*p).to_owned())
        })
        .join()
        .unwrap();
        assert_eq!(died, Err("a session's bug".to_owned()));
        assert_eq!(s.ready_workers.load(Ordering::Acquire), 1);
        assert_eq!(
            admin::not_ready(&s).as_deref(),
            Some("1 of 2 workers accepting")
        );
    }
}
