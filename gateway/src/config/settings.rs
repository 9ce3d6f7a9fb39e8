//! The one merge: [`Layer`]s of optional values, each over the one before (defaults < file
//! < environment < flags; lists add up), then validated into [`Settings`], the one struct
//! the server reads. Every error names the flag or key at fault; nothing starts on a config
//! that would misbehave later.
//!
//! Each default is written once, by the type that owns it: [`Limits::default`], the
//! handshake's [`HandshakeConfig::default`], [`RedisSettings::DEFAULTS`], and
//! [`TcpCongestion`]'s; [`Layer::defaults`] reads them.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::str::FromStr;
use std::time::Duration;

use clap::ValueEnum;
use serde::Deserialize;
use vncgate_ws::handshake::HandshakeConfig;

use super::cli::ServeArgs;
use super::file;
use crate::policy::{UpstreamPolicy, parse_cidr};
use crate::proxy::TrustedProxies;
use crate::route::{self, Route, StaticRoutes};
use crate::routing::RedisSettings;

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum IoDriver {
    /// io_uring, falling back to epoll when io_uring cannot be set up.
    Auto,
    Uring,
    Epoll,
}

/// When worker threads are bound to CPUs (`--pin-workers`).
///
/// A thread-per-core gateway wants each worker on a core of its own: left to the
/// scheduler, a worker and the threads it trades messages with settle into whichever
/// placement they happen to start in, and one connection's round trip moves between levels
/// from run to run. But pinning only fits when the workers own the CPUs they would be
/// pinned to, hence `auto`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum PinWorkers {
    /// When there is exactly one worker per CPU this process may run on (its affinity
    /// mask, the container's cpuset): each worker gets its own. Not with fewer workers
    /// (`--workers` kept cores for something else) or more (they would share), nor in a
    /// container whose CPU quota is smaller than its cpuset (the default worker count
    /// follows the quota).
    Auto,
    /// Worker i on the i-th CPU this process may run on, wrapping round.
    Always,
    /// The scheduler places the workers.
    Never,
}

impl PinWorkers {
    pub fn as_str(self) -> &'static str {
        match self {
            PinWorkers::Auto => "auto",
            PinWorkers::Always => "always",
            PinWorkers::Never => "never",
        }
    }

    /// The CPU each worker is bound to, given the CPUs this process may run on (ascending),
    /// or `None` for none bound.
    pub fn plan(self, workers: usize, cpus: &[usize]) -> Option<Vec<usize>> {
        let pin = match self {
            PinWorkers::Never => false,
            PinWorkers::Always => true,
            PinWorkers::Auto => workers == cpus.len(),
        };
        (pin && !cpus.is_empty()).then(|| (0..workers).map(|i| cpus[i % cpus.len()]).collect())
    }
}

impl FromStr for PinWorkers {
    type Err = String;

    /// `auto`, `always` or `never`; `true` and `false` (the config file's first form) mean
    /// `always` and `never`.
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "true" => Ok(PinWorkers::Always),
            "false" => Ok(PinWorkers::Never),
            _ => <PinWorkers as ValueEnum>::from_str(s, false)
                .map_err(|_| format!("'{s}' is not one of auto, always, never")),
        }
    }
}

impl<'de> Deserialize<'de> for PinWorkers {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        #[derive(Deserialize)]
        #[serde(untagged)]
        enum Spelled {
            Bool(bool),
            Word(String),
        }
        match Spelled::deserialize(d)? {
            Spelled::Bool(true) => Ok(PinWorkers::Always),
            Spelled::Bool(false) => Ok(PinWorkers::Never),
            Spelled::Word(w) => w.parse().map_err(serde::de::Error::custom),
        }
    }
}

/// Which sessions `--record DIR` records.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum RecordScope {
    /// Every session.
    All,
    /// Only the sessions of routes whose `record` field is true.
    Routes,
}

impl RecordScope {
    pub fn as_str(self) -> &'static str {
        match self {
            RecordScope::All => "all",
            RecordScope::Routes => "routes",
        }
    }
}

impl FromStr for RecordScope {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, String> {
        <RecordScope as ValueEnum>::from_str(s, false)
            .map_err(|_| format!("'{s}' is not one of all, routes"))
    }
}

/// Session recording (`--record DIR`), see `server::record`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RecordSettings {
    pub dir: PathBuf,
    pub scope: RecordScope,
    /// Record the browser's input too (it holds the VNC password response and keystrokes).
    pub input: bool,
    pub max_session_bytes: u64,
    pub max_dir_bytes: u64,
}

impl RecordSettings {
    /// 4 GiB per session: hours of an ordinary desktop, minutes of full-screen video.
    pub const DEFAULT_MAX_SESSION_BYTES: u64 = 4 << 30;
    /// 64 GiB for the directory.
    pub const DEFAULT_MAX_DIR_BYTES: u64 = 64 << 30;
}

impl FromStr for IoDriver {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, String> {
        <IoDriver as ValueEnum>::from_str(s, false)
            .map_err(|_| format!("'{s}' is not one of auto, uring, epoll"))
    }
}

/// A value a layer can carry, and how the environment spells it.
pub trait LayerValue: Sized {
    fn parse_env(s: &str) -> Result<Self, String>;
}

macro_rules! from_str_values {
    ($($t:ty),*) => {$(
        impl LayerValue for $t {
            fn parse_env(s: &str) -> Result<Self, String> {
                s.parse().map_err(|e| format!("'{s}': {e}"))
            }
        }
    )*};
}
from_str_values!(
    String,
    PathBuf,
    usize,
    u64,
    u32,
    bool,
    IoDriver,
    PinWorkers,
    RecordScope
);

impl LayerValue for Duration {
    fn parse_env(s: &str) -> Result<Self, String> {
        parse_secs(s)
    }
}

/// Declares [`Layer`] from one list of its scalar settings, with the overlay and the
/// environment reader that go with it, so a setting is added in one place.
macro_rules! layer {
    ($($name:ident: $ty:ty,)*) => {
        /// One source's settings: `None` where it says nothing. The list settings (routes,
        /// allowed upstreams and origins) add up across layers instead.
        #[derive(Debug, Default, Clone)]
        pub struct Layer {
            $(pub $name: Option<$ty>,)*
            pub routes: Vec<String>,
            pub allow_upstream: Vec<String>,
            pub allow_origins: Vec<String>,
            pub trusted_proxies: Vec<String>,
        }

        impl Layer {
            /// `top` over `self`: its values win, its lists come after.
            pub fn overlay(mut self, top: Layer) -> Layer {
                $(if top.$name.is_some() {
                    self.$name = top.$name;
                })*
                self.routes.extend(top.routes);
                self.allow_upstream.extend(top.allow_upstream);
                self.allow_origins.extend(top.allow_origins);
                self.trusted_proxies.extend(top.trusted_proxies);
                self
            }

            /// The `VNCGATE_<KEY>` variables among `vars` (the file's keys, upper case);
            /// lists are comma-separated. Other variables are not looked at.
            pub fn from_env(vars: impl IntoIterator<Item = (String, String)>) -> Result<Layer, String> {
                let mut l = Layer::default();
                for (k, v) in vars {
                    let Some(key) = k.strip_prefix("VNCGATE_") else { continue };
                    let key = key.to_ascii_lowercase();
                    let list = || v.split(',').map(str::trim).filter(|s| !s.is_empty()).map(String::from);
                    match key.as_str() {
                        $(stringify!($name) => {
                            l.$name = Some(<$ty as LayerValue>::parse_env(v.trim()).map_err(|e| format!("{k}: {e}"))?);
                        })*
                        "routes" => l.routes.extend(list()),
                        "allow_upstream" => l.allow_upstream.extend(list()),
                        "allow_origins" => l.allow_origins.extend(list()),
                        "trusted_proxies" => l.trusted_proxies.extend(list()),
                        _ => {}
                    }
                }
                Ok(l)
            }
        }
    };
}

layer! {
    listen: String,
    workers: usize,
    pin_workers: PinWorkers,
    io_driver: IoDriver,
    admin: String,
    path_prefix: String,
    share_port: bool,
    routes_file: PathBuf,
    max_sessions_per_worker: usize,
    max_message: u64,
    handshake_timeout: Duration,
    connect_timeout: Duration,
    connect_retry_window: Duration,
    idle_timeout: Duration,
    max_session_duration: Duration,
    keepalive_interval: Duration,
    keepalive_timeout: Duration,
    drain_timeout: Duration,
    drain_spread: Duration,
    handover_socket: PathBuf,
    proxy_protocol: bool,
    pipe_size: usize,
    tcp_congestion: String,
    max_header_bytes: usize,
    redis: String,
    route_cache_ttl: Duration,
    route_negative_ttl: Duration,
    redis_timeout: Duration,
    max_viewers: u32,
    tls_cert: PathBuf,
    tls_key: PathBuf,
    log_level: String,
    web: PathBuf,
    record: PathBuf,
    record_scope: RecordScope,
    record_input: bool,
    record_max_session_bytes: u64,
    record_max_dir_bytes: u64,
}

/// The address a gateway listens on without `--listen`.
pub const DEFAULT_LISTEN: &str = "127.0.0.1:8080";

impl Layer {
    /// The bottom layer: every default, read from the type that owns it. What stays `None`
    /// is off unless asked for (`admin`, `redis`, `routes_file`) or resolved later
    /// (`tcp_congestion`, whose default is a fallback rather than a demand).
    pub fn defaults() -> Layer {
        let l = Limits::default();
        let h = HandshakeConfig::default();
        let r = RedisSettings::DEFAULTS;
        Layer {
            listen: Some(DEFAULT_LISTEN.into()),
            workers: Some(std::thread::available_parallelism().map_or(1, |n| n.get())),
            pin_workers: Some(PinWorkers::Auto),
            io_driver: Some(IoDriver::Auto),
            path_prefix: Some(h.path_prefix),
            share_port: Some(false),
            max_sessions_per_worker: Some(l.max_sessions_per_worker),
            max_message: Some(l.max_message),
            handshake_timeout: Some(l.handshake_timeout),
            connect_timeout: Some(l.connect_timeout),
            connect_retry_window: Some(l.connect_retry_window),
            idle_timeout: Some(l.idle_timeout.unwrap_or_default()),
            max_session_duration: Some(l.max_session_duration.unwrap_or_default()),
            keepalive_interval: Some(l.keepalive_interval.unwrap_or_default()),
            keepalive_timeout: Some(l.keepalive_timeout),
            drain_timeout: Some(l.drain_timeout),
            drain_spread: Some(l.drain_spread),
            proxy_protocol: Some(false),
            pipe_size: Some(l.pipe_size),
            max_header_bytes: Some(h.max_header_bytes),
            route_cache_ttl: Some(r.cache_ttl),
            route_negative_ttl: Some(r.negative_ttl),
            redis_timeout: Some(r.timeout),
            max_viewers: Some(l.max_viewers),
            log_level: Some("info".into()),
            record_scope: Some(RecordScope::All),
            record_input: Some(false),
            record_max_session_bytes: Some(RecordSettings::DEFAULT_MAX_SESSION_BYTES),
            record_max_dir_bytes: Some(RecordSettings::DEFAULT_MAX_DIR_BYTES),
            allow_origins: h.allowed_origins,
            ..Layer::default()
        }
    }
}

/// Session limits and timers. `None` disables a timer.
#[derive(Debug, Clone)]
pub struct Limits {
    pub max_sessions_per_worker: usize,
    pub max_message: u64,
    pub handshake_timeout: Duration,
    pub connect_timeout: Duration,
    pub connect_retry_window: Duration,
    pub idle_timeout: Option<Duration>,
    pub max_session_duration: Option<Duration>,
    pub keepalive_interval: Option<Duration>,
    pub keepalive_timeout: Duration,
    pub drain_timeout: Duration,
    /// The window after the drain deadline over which sessions close with 1001, each at a
    /// random point, so reconnects do not return as one storm.
    pub drain_spread: Duration,
    /// Pipe capacity asked for each relay pipe. One splice moves at most this much, so it
    /// is also the largest frame sent to the browser (noVNC accepts up to 40 MiB).
    pub pipe_size: usize,
    /// Idle pipes a worker keeps for reuse; beyond that, returned pipes are closed.
    pub max_idle_pipes: usize,
    /// Browser-to-VM read buffer, lent per read from a worker pool.
    pub read_buffer: usize,
    /// Concurrent connections per session where the route does not say; 0 = unlimited.
    pub max_viewers: u32,
}

impl Default for Limits {
    fn default() -> Self {
        Self {
            max_sessions_per_worker: 25_000,
            max_message: 16 << 20,
            handshake_timeout: Duration::from_secs(10),
            connect_timeout: Duration::from_secs(3),
            connect_retry_window: Duration::from_secs(2),
            idle_timeout: Some(Duration::from_secs(3600)),
            max_session_duration: None,
            keepalive_interval: Some(Duration::from_secs(20)),
            keepalive_timeout: Duration::from_secs(20),
            drain_timeout: Duration::from_secs(30),
            drain_spread: Duration::from_secs(5),
            pipe_size: 1 << 20,
            max_idle_pipes: 32,
            read_buffer: 32 << 10,
            max_viewers: 0,
        }
    }
}

/// The congestion control the gateway sets on its sockets.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TcpCongestion {
    /// `None`: leave the host's default.
    pub name: Option<String>,
    /// Asked for by flag, environment or file (an unavailable one is then an error at
    /// startup), rather than the default (which falls back to the host's with a warning).
    pub explicit: bool,
}

/// Without a choice: loss-based CUBIC, Linux's own default, which needs no pacing.
pub const DEFAULT_TCP_CONGESTION: &str = "cubic";

impl TcpCongestion {
    fn parse(choice: Option<&str>) -> Result<TcpCongestion, String> {
        let Some(v) = choice else {
            return Ok(TcpCongestion {
                name: Some(DEFAULT_TCP_CONGESTION.into()),
                explicit: false,
            });
        };
        if v == "system" {
            return Ok(TcpCongestion {
                name: None,
                explicit: true,
            });
        }
        // TCP_CA_NAME_MAX is 16 with the terminating NUL.
        let ok = !v.is_empty()
            && v.len() < 16
            && v.bytes()
                .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'_');
        if !ok {
            return Err(format!(
                "--tcp-congestion: '{v}' is not a congestion control name (cubic, bbr, reno, ... or system)"
            ));
        }
        Ok(TcpCongestion {
            name: Some(v.into()),
            explicit: true,
        })
    }
}

/// Everything the server needs, validated.
#[derive(Debug, Clone)]
pub struct Settings {
    pub listen: SocketAddr,
    pub workers: usize,
    /// When each worker thread is bound to one CPU (`--pin-workers`).
    pub pin_workers: PinWorkers,
    pub io_driver: IoDriver,
    pub share_port: bool,
    pub admin: Option<SocketAddr>,
    pub handshake: HandshakeConfig,
    pub policy: UpstreamPolicy,
    pub routes: StaticRoutes,
    pub limits: Limits,
    pub tcp_congestion: TcpCongestion,
    /// Where routes come from besides the static ones.
    pub redis: Option<RedisSettings>,
    /// `wss://` on the public listener: the certificate and key files (`--tls-cert`,
    /// `--tls-key`), loaded when the server starts.
    pub tls: Option<TlsFiles>,
    /// The log filter (`--log-level`: a level, or `tracing` directives such as
    /// `info,vncgate::routing=debug`); `VNCGATE_LOG`, when set, overrides it.
    pub log_level: String,
    /// Where this gateway serves (and first asks for) the listening sockets of a restart.
    pub handover_socket: Option<PathBuf>,
    /// PROXY protocol on the public listener, from these addresses only.
    pub proxy_protocol: Option<TrustedProxies>,
    /// `--web DIR`, resolved: plain GETs on the public port get its files.
    pub web: Option<PathBuf>,
    /// How an upgrade names its route (`vncgate websockify` sets it).
    pub session_from: crate::websockify::SessionFrom,
    /// Under TLS, a connection whose first byte is not a TLS record is served in plain
    /// text instead of refused (websockify without `--ssl-only`: one port, both).
    pub tls_accepts_plain: bool,
    /// Drain and exit this long after start (websockify's `--timeout`).
    pub exit_after: Option<Duration>,
    /// Drain and exit once no client has been connected this long (websockify's
    /// `--idle-timeout`).
    pub exit_when_idle: Option<Duration>,
    /// The token file or directory the static routes came from, watched for changes.
    pub token_source: Option<PathBuf>,
    /// What the token source looked like just before it was read (see
    /// `websockify::source_stamp`): the watcher's first comparison is against this, so a
    /// change made while the gateway starts is not taken for the state it loaded.
    pub token_stamp: crate::websockify::SourceStamp,
    /// `--record DIR`: where sessions are recorded, and which.
    pub record: Option<RecordSettings>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TlsFiles {
    pub cert: PathBuf,
    pub key: PathBuf,
}

pub fn parse_secs(s: &str) -> Result<Duration, String> {
    let v: f64 = s
        .parse()
        .map_err(|_| format!("'{s}' is not a number of seconds"))?;
    secs(v)
}

pub(super) fn secs(v: f64) -> Result<Duration, String> {
    Duration::try_from_secs_f64(v).map_err(|_| format!("{v} is not a valid number of seconds"))
}

/// Zero disables a timer.
fn timer(d: Duration) -> Option<Duration> {
    (!d.is_zero()).then_some(d)
}

impl ServeArgs {
    /// This command line's layer: the flags given, and nothing else.
    pub fn layer(&self) -> Layer {
        Layer {
            listen: self.listen.clone(),
            workers: self.workers,
            pin_workers: self.pin_workers,
            io_driver: self.io_driver,
            admin: self.admin.clone(),
            path_prefix: self.path_prefix.clone(),
            // A switch: given or not said.
            share_port: self.share_port.then_some(true),
            routes_file: self.routes_file.clone(),
            max_sessions_per_worker: self.max_sessions_per_worker,
            max_message: self.max_message,
            handshake_timeout: self.handshake_timeout,
            connect_timeout: self.connect_timeout,
            connect_retry_window: self.connect_retry_window,
            idle_timeout: self.idle_timeout,
            max_session_duration: self.max_session_duration,
            keepalive_interval: self.keepalive_interval,
            keepalive_timeout: self.keepalive_timeout,
            drain_timeout: self.drain_timeout,
            drain_spread: self.drain_spread,
            handover_socket: self.handover_socket.clone(),
            proxy_protocol: self.proxy_protocol.then_some(true),
            pipe_size: self.pipe_size,
            tcp_congestion: self.tcp_congestion.clone(),
            max_header_bytes: None,
            redis: self.redis.clone(),
            route_cache_ttl: self.route_cache_ttl,
            route_negative_ttl: self.route_negative_ttl,
            redis_timeout: self.redis_timeout,
            max_viewers: self.max_viewers,
            tls_cert: self.tls_cert.clone(),
            tls_key: self.tls_key.clone(),
            log_level: self.log_level.clone(),
            web: self.web.clone(),
            record: self.record.clone(),
            record_scope: self.record_scope,
            record_input: self.record_input.then_some(true),
            record_max_session_bytes: self.record_max_session_bytes,
            record_max_dir_bytes: self.record_max_dir_bytes,
            routes: self.routes.clone(),
            allow_upstream: self.allow_upstream.clone(),
            allow_origins: self.allow_origins.clone(),
            trusted_proxies: self.trusted_proxies.clone(),
        }
    }

    /// Defaults < `--config` file < this process's environment < flags, validated.
    pub fn settings(&self) -> Result<Settings, String> {
        self.settings_with_env(std::env::vars())
    }

    /// [`ServeArgs::settings`] with the environment given (tests).
    pub fn settings_with_env(
        &self,
        env: impl IntoIterator<Item = (String, String)>,
    ) -> Result<Settings, String> {
        let file = match &self.config {
            Some(p) => file::read(p)?.into_layer()?,
            None => Layer::default(),
        };
        let merged = Layer::defaults()
            .overlay(file)
            .overlay(Layer::from_env(env)?)
            .overlay(self.layer());
        Settings::from_layer(merged)
    }
}

impl Settings {
    /// Validates a merged layer (one whose bottom is [`Layer::defaults`]).
    pub fn from_layer(l: Layer) -> Result<Settings, String> {
        // Set by the defaults layer, so present unless a caller skipped it.
        fn need<T>(v: Option<T>, key: &str) -> Result<T, String> {
            v.ok_or_else(|| format!("{key}: no value (the defaults layer is missing)"))
        }
        let listen_s = need(l.listen, "listen")?;
        crate::websockify::check_serve_listen(Some(&listen_s))?;
        let listen = route::resolve(&listen_s).map_err(|e| format!("--listen: {e}"))?;
        let workers = need(l.workers, "workers")?;
        if workers == 0 || workers > 1024 {
            return Err(format!("--workers must be 1..=1024, got {workers}"));
        }
        let admin = match l.admin {
            Some(a) => Some(route::resolve(&a).map_err(|e| format!("--admin: {e}"))?),
            None => None,
        };
        let mut path_prefix = need(l.path_prefix, "path_prefix")?;
        if !path_prefix.starts_with('/') {
            return Err(format!(
                "--path-prefix must start with '/', got '{path_prefix}'"
            ));
        }
        if !path_prefix.ends_with('/') {
            path_prefix.push('/');
        }

        let nets = l
            .allow_upstream
            .iter()
            .map(|c| parse_cidr(c).map_err(|e| format!("--allow-upstream: {e}")))
            .collect::<Result<Vec<_>, _>>()?;
        let policy = UpstreamPolicy::new(nets);

        let mut table: HashMap<String, Route> = HashMap::new();
        let mut add = |id: String, r: Route| -> Result<(), String> {
            if !policy.allows(&r.upstream) {
                return Err(format!(
                    "route '{id}': upstream {} is outside --allow-upstream ({})",
                    r.upstream,
                    if policy.nets().is_empty() {
                        "none given".to_string()
                    } else {
                        policy
                            .nets()
                            .iter()
                            .map(|n| n.to_string())
                            .collect::<Vec<_>>()
                            .join(", ")
                    }
                ));
            }
            if table.insert(id.clone(), r).is_some() {
                return Err(format!("route '{id}' is defined twice"));
            }
            Ok(())
        };
        for s in &l.routes {
            let (id, r) = route::parse_route_flag(s).map_err(|e| format!("--route: {e}"))?;
            add(id, r)?;
        }
        if let Some(p) = &l.routes_file {
            for (id, r) in route::load_routes_file(p)? {
                add(id, r)?;
            }
        }

        let d = Limits::default();
        let limits = Limits {
            max_sessions_per_worker: need(l.max_sessions_per_worker, "max_sessions_per_worker")?,
            max_message: need(l.max_message, "max_message")?,
            handshake_timeout: need(l.handshake_timeout, "handshake_timeout")?,
            connect_timeout: need(l.connect_timeout, "connect_timeout")?,
            connect_retry_window: need(l.connect_retry_window, "connect_retry_window")?,
            idle_timeout: timer(need(l.idle_timeout, "idle_timeout")?),
            max_session_duration: timer(need(l.max_session_duration, "max_session_duration")?),
            keepalive_interval: timer(need(l.keepalive_interval, "keepalive_interval")?),
            keepalive_timeout: need(l.keepalive_timeout, "keepalive_timeout")?,
            drain_timeout: need(l.drain_timeout, "drain_timeout")?,
            drain_spread: need(l.drain_spread, "drain_spread")?,
            pipe_size: need(l.pipe_size, "pipe_size")?,
            max_viewers: need(l.max_viewers, "max_viewers")?,
            // Not configurable: sizes of the worker's pools.
            max_idle_pipes: d.max_idle_pipes,
            read_buffer: d.read_buffer,
        };
        let redis = match l.redis {
            None => None,
            Some(url) => Some(RedisSettings {
                url: url.parse().map_err(|e| format!("--redis: {e}"))?,
                cache_ttl: need(l.route_cache_ttl, "route_cache_ttl")?,
                negative_ttl: need(l.route_negative_ttl, "route_negative_ttl")?,
                timeout: need(l.redis_timeout, "redis_timeout")?,
                recheck_interval: RedisSettings::DEFAULTS.recheck_interval,
            }),
        };
        if redis.as_ref().is_some_and(|r| r.timeout.is_zero()) {
            return Err("--redis-timeout must be positive".into());
        }
        if limits.handshake_timeout.is_zero() || limits.connect_timeout.is_zero() {
            return Err("--handshake-timeout and --connect-timeout must be positive".into());
        }
        if !(4096..=(64 << 20)).contains(&limits.pipe_size) {
            return Err(format!(
                "--pipe-size must be 4096..=67108864 bytes (noVNC takes frames up to 40 MiB), got {}",
                limits.pipe_size
            ));
        }
        if limits.max_message == 0 {
            return Err("--max-message must be positive".into());
        }
        let log_level = need(l.log_level, "log_level")?;
        tracing_subscriber::EnvFilter::try_new(&log_level)
            .map_err(|e| format!("--log-level '{log_level}': {e}"))?;
        let tls = match (l.tls_cert, l.tls_key) {
            (None, None) => None,
            (Some(cert), Some(key)) => Some(TlsFiles { cert, key }),
            (Some(_), None) => {
                return Err(
                    "--tls-cert needs --tls-key (the certificate's private key, PEM)".into(),
                );
            }
            (None, Some(_)) => {
                return Err(
                    "--tls-key needs --tls-cert (the certificate chain, PEM, leaf first)".into(),
                );
            }
        };
        let trusted = l
            .trusted_proxies
            .iter()
            .map(|c| parse_cidr(c).map_err(|e| format!("--trusted-proxy: {e}")))
            .collect::<Result<Vec<_>, _>>()?;
        let proxy_protocol = match (
            need(l.proxy_protocol, "proxy_protocol")?,
            trusted.is_empty(),
        ) {
            (true, false) => Some(TrustedProxies::new(trusted)),
            (true, true) => {
                return Err("--proxy-protocol needs at least one --trusted-proxy CIDR (the balancers allowed to name the client address)".into());
            }
            (false, false) => {
                return Err("--trusted-proxy is given but --proxy-protocol is not: turn it on, or drop the trusted proxies".into());
            }
            (false, true) => None,
        };
        let web = l.web.as_deref().map(crate::web::check_root).transpose()?;
        let record = match l.record {
            None => {
                if let Some((id, _)) = table.iter().find(|(_, r)| r.record) {
                    return Err(format!(
                        "route '{id}' has record = true, but no --record DIR says where recordings go"
                    ));
                }
                None
            }
            Some(dir) => Some(RecordSettings {
                dir,
                scope: need(l.record_scope, "record_scope")?,
                input: need(l.record_input, "record_input")?,
                max_session_bytes: need(l.record_max_session_bytes, "record_max_session_bytes")?,
                max_dir_bytes: need(l.record_max_dir_bytes, "record_max_dir_bytes")?,
            }),
        };
        if record
            .as_ref()
            .is_some_and(|r| r.max_session_bytes == 0 || r.max_dir_bytes == 0)
        {
            return Err(
                "--record-max-session-bytes and --record-max-dir-bytes must be positive".into(),
            );
        }
        Ok(Settings {
            listen,
            workers,
            pin_workers: need(l.pin_workers, "pin_workers")?,
            io_driver: need(l.io_driver, "io_driver")?,
            share_port: need(l.share_port, "share_port")?,
            admin,
            handshake: HandshakeConfig {
                path_prefix,
                allowed_origins: l.allow_origins,
                max_header_bytes: need(l.max_header_bytes, "max_header_bytes")?,
                any_path: false,
                plain_requests: web.is_some(),
            },
            policy,
            routes: StaticRoutes::new(table),
            limits,
            tcp_congestion: TcpCongestion::parse(l.tcp_congestion.as_deref())?,
            redis,
            tls,
            log_level,
            handover_socket: l.handover_socket,
            proxy_protocol,
            web,
            session_from: Default::default(),
            tls_accepts_plain: false,
            exit_after: None,
            exit_when_idle: None,
            token_source: None,
            token_stamp: Vec::new(),
            record,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::cli::{Cli, Command};
    use clap::Parser as _;

    fn no_env() -> Vec<(String, String)> {
        Vec::new()
    }

    fn args(v: &[&str]) -> ServeArgs {
        let mut full = vec!["vncgate", "serve"];
        full.extend_from_slice(v);
        match Cli::try_parse_from(full).unwrap().command {
            Command::Serve(a) => *a,
            _ => unreachable!(),
        }
    }

    #[test]
    fn tcp_congestion_choices() {
        let c = |v: &[&str]| {
            args(v)
                .settings_with_env(no_env())
                .map(|s| s.tcp_congestion)
        };
        let d = c(&[]).unwrap();
        assert_eq!((d.name.as_deref(), d.explicit), (Some("cubic"), false));
        let sys = c(&["--tcp-congestion", "system"]).unwrap();
        assert_eq!((sys.name, sys.explicit), (None, true));
        let bbr = c(&["--tcp-congestion", "bbr"]).unwrap();
        assert_eq!((bbr.name.as_deref(), bbr.explicit), (Some("bbr"), true));
        for bad in ["", "BBR", "cubic;", "a_name_far_too_long"] {
            let e = c(&["--tcp-congestion", bad]).unwrap_err();
            assert!(e.contains("--tcp-congestion"), "{bad}: {e}");
        }
    }

    #[test]
    fn pin_workers_plans() {
        use PinWorkers::*;
        let cpus = [2, 3, 5];
        assert_eq!(
            Auto.plan(3, &cpus),
            Some(vec![2, 3, 5]),
            "one worker per CPU"
        );
        assert_eq!(
            Auto.plan(2, &cpus),
            None,
            "fewer workers: cores kept for others"
        );
        assert_eq!(Auto.plan(4, &cpus), None, "more workers: they would share");
        assert_eq!(
            Always.plan(4, &cpus),
            Some(vec![2, 3, 5, 2]),
            "wrapping round"
        );
        assert_eq!(Always.plan(2, &cpus), Some(vec![2, 3]));
        assert_eq!(Never.plan(3, &cpus), None);
        assert_eq!(Always.plan(2, &[]), None, "no CPU read: nothing to bind to");
    }

    #[test]
    fn pin_workers_spellings() {
        let c = |v: &[&str], env: &[(&str, &str)]| {
            let env = env.iter().map(|(k, v)| (k.to_string(), v.to_string()));
            args(v).settings_with_env(env).map(|s| s.pin_workers)
        };
        assert_eq!(c(&[], &[]), Ok(PinWorkers::Auto));
        assert_eq!(c(&["--pin-workers"], &[]), Ok(PinWorkers::Always));
        assert_eq!(c(&["--pin-workers=never"], &[]), Ok(PinWorkers::Never));
        assert_eq!(
            c(&[], &[("VNCGATE_PIN_WORKERS", "never")]),
            Ok(PinWorkers::Never)
        );
        assert_eq!(
            c(&[], &[("VNCGATE_PIN_WORKERS", "true")]),
            Ok(PinWorkers::Always)
        );
        let e = c(&[], &[("VNCGATE_PIN_WORKERS", "sometimes")]).unwrap_err();
        assert!(
            e.contains("VNCGATE_PIN_WORKERS") && e.contains("auto, always, never"),
            "{e}"
        );
        let e = Cli::try_parse_from(["vncgate", "serve", "--pin-workers=sometimes"])
            .unwrap_err()
            .to_string();
        assert!(e.contains("sometimes"), "{e}");
        // The config file takes the words, and true / false as it first did.
        let f =
            |t: &str| toml::from_str::<super::super::file::FileConfig>(t).map(|f| f.pin_workers);
        assert_eq!(f("pin_workers = \"auto\"").unwrap(), Some(PinWorkers::Auto));
        assert_eq!(f("pin_workers = true").unwrap(), Some(PinWorkers::Always));
        assert_eq!(f("pin_workers = false").unwrap(), Some(PinWorkers::Never));
        let e = f("pin_workers = \"sometimes\"").unwrap_err().to_string();
        assert!(e.contains("auto, always, never"), "{e}");
    }

    #[test]
    fn contract_flags_parse() {
        let s = args(&[
            "--listen",
            "127.0.0.1:0",
            "--route",
            "a=127.0.0.1:5900",
            "--allow-upstream",
            "127.0.0.0/8",
            "--workers",
            "3",
            "--io-driver",
            "epoll",
        ])
        .settings_with_env(no_env())
        .unwrap();
        assert_eq!(s.workers, 3);
        assert_eq!(s.io_driver, IoDriver::Epoll);
        assert_eq!(s.routes.len(), 1);
    }

    #[test]
    fn route_outside_allowed_cidrs_is_refused_at_start() {
        let e = args(&[
            "--route",
            "a=10.0.0.1:5900",
            "--allow-upstream",
            "127.0.0.0/8",
        ])
        .settings_with_env(no_env())
        .unwrap_err();
        assert!(e.contains("outside --allow-upstream"), "{e}");
        let e = args(&["--route", "a=127.0.0.1:5900"])
            .settings_with_env(no_env())
            .unwrap_err();
        assert!(e.contains("none given"), "{e}");
    }

    #[test]
    fn redis_settings_from_file_and_flags() {
        let dir = std::env::temp_dir().join(format!("vncgate-cfg-redis-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let p = dir.join("gw.toml");
        std::fs::write(
            &p,
            "redis = \"redis+cluster://127.0.0.1:7000,127.0.0.1:7001\"\nroute_cache_ttl = 0\nredis_timeout = 0.25\nmax_viewers = 3\n",
        )
        .unwrap();
        let s = args(&["--config", p.to_str().unwrap(), "--route-negative-ttl", "5"])
            .settings_with_env(no_env())
            .unwrap();
        let r = s.redis.expect("redis from the file");
        assert!(matches!(
            r.url.target,
            vncgate_schema::url::Target::Cluster(ref n) if n.len() == 2
        ));
        assert_eq!(r.cache_ttl, Duration::ZERO);
        assert_eq!(r.negative_ttl, Duration::from_secs(5));
        assert_eq!(r.timeout, Duration::from_millis(250));
        assert_eq!(s.limits.max_viewers, 3);
        let e = args(&["--redis", "redis://h:1", "--redis-timeout", "0"])
            .settings_with_env(no_env())
            .unwrap_err();
        assert!(e.contains("--redis-timeout"), "{e}");
        let e = args(&["--redis", "tcp://h:1"])
            .settings_with_env(no_env())
            .unwrap_err();
        assert!(e.starts_with("--redis:"), "{e}");
    }

    #[test]
    fn file_then_flags() {
        let dir = std::env::temp_dir().join(format!("vncgate-cfg-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let p = dir.join("gw.toml");
        std::fs::write(
            &p,
            "workers = 2\nidle_timeout = 0\nallow_upstream = [\"127.0.0.1\"]\nroutes = [\"f=127.0.0.1:1\"]\n",
        )
        .unwrap();
        let s = args(&["--config", p.to_str().unwrap(), "--workers", "4"])
            .settings_with_env(no_env())
            .unwrap();
        assert_eq!(s.workers, 4);
        assert_eq!(s.limits.idle_timeout, None);
        assert_eq!(s.routes.len(), 1);
        std::fs::write(&p, "wrokers = 2\n").unwrap();
        let e = args(&["--config", p.to_str().unwrap()])
            .settings_with_env(no_env())
            .unwrap_err();
        assert!(e.contains("wrokers"), "{e}");
    }
    #[test]
    fn layers_defaults_file_env_flags() {
        let dir = std::env::temp_dir().join(format!("vncgate-cfg-layers-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let p = dir.join("gw.toml");
        std::fs::write(
            &p,
            "workers = 2\nidle_timeout = 5\ndrain_timeout = 7\nallow_upstream = [\"127.0.0.1\"]\n",
        )
        .unwrap();
        let env = |kv: &[(&str, &str)]| -> Vec<(String, String)> {
            kv.iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect()
        };
        let cfg = p.to_str().unwrap();
        // The file over the defaults.
        let s = args(&["--config", cfg])
            .settings_with_env(no_env())
            .unwrap();
        assert_eq!(
            (s.workers, s.limits.idle_timeout),
            (2, Some(Duration::from_secs(5)))
        );
        assert_eq!(
            s.limits.keepalive_timeout,
            Limits::default().keepalive_timeout
        );
        // The environment over the file; lists add up; unrelated VNCGATE_ names are ignored.
        let e = env(&[
            ("VNCGATE_WORKERS", "3"),
            ("VNCGATE_IDLE_TIMEOUT", "0"),
            ("VNCGATE_ALLOW_UPSTREAM", "10.0.0.0/8, 192.168.0.0/16"),
            ("VNCGATE_LOG", "debug"),
            ("VNCGATE_REDIS", "redis://127.0.0.1:6379"),
        ]);
        let s = args(&["--config", cfg])
            .settings_with_env(e.clone())
            .unwrap();
        assert_eq!((s.workers, s.limits.idle_timeout), (3, None));
        assert_eq!(s.limits.drain_timeout, Duration::from_secs(7));
        assert_eq!(s.policy.nets().len(), 3);
        assert!(s.redis.is_some());
        // Flags over the environment.
        let s = args(&["--config", cfg, "--workers", "4"])
            .settings_with_env(e)
            .unwrap();
        assert_eq!(s.workers, 4);
        // A bad value names its variable.
        let err = args(&[])
            .settings_with_env(env(&[("VNCGATE_IDLE_TIMEOUT", "soon")]))
            .unwrap_err();
        assert!(err.starts_with("VNCGATE_IDLE_TIMEOUT:"), "{err}");
        let err = args(&[])
            .settings_with_env(env(&[("VNCGATE_IO_DRIVER", "kqueue")]))
            .unwrap_err();
        assert!(
            err.contains("VNCGATE_IO_DRIVER") && err.contains("epoll"),
            "{err}"
        );
    }

    #[test]
    fn proxy_protocol_and_handover_from_every_layer() {
        let env = |kv: &[(&str, &str)]| -> Vec<(String, String)> {
            kv.iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect()
        };
        let s = args(&[
            "--proxy-protocol",
            "--trusted-proxy",
            "10.0.0.0/8",
            "--trusted-proxy",
            "::1",
            "--handover-socket",
            "/run/vncgate/handover.sock",
            "--drain-spread",
            "4",
        ])
        .settings_with_env(no_env())
        .unwrap();
        let p = s.proxy_protocol.expect("on");
        assert!(p.trusts("10.1.2.3".parse().unwrap()));
        assert!(p.trusts("::1".parse().unwrap()));
        assert!(!p.trusts("192.168.0.1".parse().unwrap()));
        assert_eq!(
            s.handover_socket.as_deref(),
            Some(std::path::Path::new("/run/vncgate/handover.sock"))
        );
        assert_eq!(s.limits.drain_spread, Duration::from_secs(4));
        let s = args(&[])
            .settings_with_env(env(&[
                ("VNCGATE_PROXY_PROTOCOL", "true"),
                ("VNCGATE_TRUSTED_PROXIES", "127.0.0.1, 10.0.0.0/8"),
                ("VNCGATE_HANDOVER_SOCKET", "/tmp/h.sock"),
                ("VNCGATE_DRAIN_SPREAD", "0"),
            ]))
            .unwrap();
        assert!(
            s.proxy_protocol
                .unwrap()
                .trusts("127.0.0.1".parse().unwrap())
        );
        assert_eq!(s.limits.drain_spread, Duration::ZERO);
        assert!(s.handover_socket.is_some());
        let dir = std::env::temp_dir().join(format!("vncgate-cfg-proxy-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let f = dir.join("gw.toml");
        std::fs::write(
            &f,
            "proxy_protocol = true\ntrusted_proxies = [\"192.0.2.0/24\"]\nhandover_socket = \"/tmp/x.sock\"\ndrain_spread = 2.5\n",
        )
        .unwrap();
        let s = args(&["--config", f.to_str().unwrap()])
            .settings_with_env(no_env())
            .unwrap();
        assert!(
            s.proxy_protocol
                .unwrap()
                .trusts("192.0.2.9".parse().unwrap())
        );
        assert_eq!(s.limits.drain_spread, Duration::from_millis(2500));
        let e = args(&["--proxy-protocol"])
            .settings_with_env(no_env())
            .unwrap_err();
        assert!(e.contains("--trusted-proxy"), "{e}");
        let e = args(&["--trusted-proxy", "10.0.0.0/8"])
            .settings_with_env(no_env())
            .unwrap_err();
        assert!(e.contains("--proxy-protocol"), "{e}");
        let e = args(&["--proxy-protocol", "--trusted-proxy", "nonsense"])
            .settings_with_env(no_env())
            .unwrap_err();
        assert!(e.starts_with("--trusted-proxy:"), "{e}");
    }

    #[test]
    fn web_root_from_every_layer_and_bare_ports_refused() {
        let dir = std::env::temp_dir().join(format!("vncgate-cfg-web-{}", std::process::id()));
        std::fs::create_dir_all(dir.join("root")).unwrap();
        let root = dir.join("root");
        let s = args(&["--web", root.to_str().unwrap()])
            .settings_with_env(no_env())
            .unwrap();
        assert_eq!(s.web, Some(std::fs::canonicalize(&root).unwrap()));
        assert!(s.handshake.plain_requests && !s.handshake.any_path);
        let f = dir.join("gw.toml");
        std::fs::write(&f, format!("web = {:?}\n", root.to_str().unwrap())).unwrap();
        let s = args(&["--config", f.to_str().unwrap()])
            .settings_with_env(no_env())
            .unwrap();
        assert!(s.web.is_some());
        let s = args(&[])
            .settings_with_env(vec![("VNCGATE_WEB".into(), root.to_str().unwrap().into())])
            .unwrap();
        assert!(s.web.is_some());
        assert!(
            !args(&[])
                .settings_with_env(no_env())
                .unwrap()
                .handshake
                .plain_requests
        );
        let e = args(&["--web", dir.join("missing").to_str().unwrap()])
            .settings_with_env(no_env())
            .unwrap_err();
        assert!(e.starts_with("--web ") && e.contains("missing"), "{e}");
        std::fs::write(dir.join("file"), "x").unwrap();
        let e = args(&["--web", dir.join("file").to_str().unwrap()])
            .settings_with_env(no_env())
            .unwrap_err();
        assert!(e.contains("not a directory"), "{e}");
        let e = args(&["--listen", "8080"])
            .settings_with_env(no_env())
            .unwrap_err();
        assert!(e.contains("--listen 127.0.0.1:8080"), "{e}");
    }

    #[test]
    fn defaults_are_the_owners_defaults() {
        let s = args(&[]).settings_with_env(no_env()).unwrap();
        let h = HandshakeConfig::default();
        assert_eq!(s.handshake.path_prefix, h.path_prefix);
        assert_eq!(s.handshake.max_header_bytes, h.max_header_bytes);
        assert_eq!(s.listen.to_string(), DEFAULT_LISTEN);
        let d = Limits::default();
        assert_eq!(s.limits.idle_timeout, d.idle_timeout);
        assert_eq!(s.limits.max_session_duration, d.max_session_duration);
        assert_eq!(s.limits.keepalive_interval, d.keepalive_interval);
        assert!(s.redis.is_none() && s.admin.is_none());
    }
}

#[cfg(test)]
mod example_tests {
    use std::path::Path;

    use super::*;

    #[test]
    fn recording_settings_layer_and_a_recorded_route_needs_a_directory() {
        let dir = std::env::temp_dir().join(format!("vncgate-rec-routes-{}", std::process::id()));
        std::fs::write(
            &dir,
            "[[route]]\nsession = \"r\"\nupstream = \"127.0.0.1:5900\"\nrecord = true\n",
        )
        .unwrap();
        let mut a = ServeArgs {
            routes_file: Some(dir.clone()),
            allow_upstream: vec!["127.0.0.1".into()],
            ..Default::default()
        };
        let e = a.settings_with_env(Vec::new()).unwrap_err();
        assert!(
            e.contains("route 'r' has record = true") && e.contains("--record"),
            "{e}"
        );
        a.record = Some("/tmp/recs".into());
        let env = vec![
            ("VNCGATE_RECORD_SCOPE".to_owned(), "routes".to_owned()),
            (
                "VNCGATE_RECORD_MAX_DIR_BYTES".to_owned(),
                "1000000".to_owned(),
            ),
        ];
        let s = a.settings_with_env(env).unwrap();
        let r = s.record.unwrap();
        assert_eq!(r.dir, PathBuf::from("/tmp/recs"));
        assert_eq!(r.scope, RecordScope::Routes);
        assert_eq!(r.max_dir_bytes, 1_000_000);
        assert_eq!(
            r.max_session_bytes,
            RecordSettings::DEFAULT_MAX_SESSION_BYTES
        );
        assert!(!r.input);
        assert!(s.routes.get("r").unwrap().record);
        a.record_max_session_bytes = Some(0);
        assert!(a.settings_with_env(Vec::new()).is_err());
        std::fs::remove_file(&dir).unwrap();
    }

    /// The documented example config must stay valid (its CIDRs would refuse its own routes
    /// only if they drifted apart).
    #[test]
    fn example_config_parses() {
        let root = concat!(env!("CARGO_MANIFEST_DIR"), "/..");
        let text = std::fs::read_to_string(format!("{root}/config/gateway.example.toml")).unwrap();
        let f: super::super::file::FileConfig = toml::from_str(&text).unwrap();
        assert_eq!(f.allow_upstream, vec!["10.0.0.0/16"]);
        let routes =
            route::load_routes_file(Path::new(&format!("{root}/config/routes.example.toml")))
                .unwrap();
        assert_eq!(routes.len(), 2);
        let mut a = ServeArgs {
            config: Some(format!("{root}/config/gateway.example.toml").into()),
            ..Default::default()
        };
        a.routes_file = Some(format!("{root}/config/routes.example.toml").into());
        let s = a.settings_with_env(Vec::new()).unwrap();
        assert_eq!(s.routes.len(), 3);
        assert_eq!(s.limits.max_viewers, 0);
        assert!(s.redis.is_none(), "the example keeps Redis commented out");
    }
}
