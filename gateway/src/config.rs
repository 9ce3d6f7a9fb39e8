//! Command-line flags and the TOML config file, merged (flags win) and validated into
//! [`Settings`], the one struct the server reads. Every error names the flag or key at
//! fault; nothing starts on a config that would misbehave later.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use clap::{Args, Parser, Subcommand, ValueEnum};
use serde::Deserialize;

use crate::policy::{UpstreamPolicy, parse_cidr};
use crate::route::{self, Route, StaticRoutes};
use crate::routing::RedisSettings;
use vncgate_ws::handshake::HandshakeConfig;

#[derive(Debug, Parser)]
#[command(name = "vncgate", version, about = "VNC-over-WebSocket gateway")]
pub struct Cli {
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Run the gateway.
    Serve(Box<ServeArgs>),
    /// Manage routes in Redis (for deployments without the controller).
    #[command(subcommand)]
    Route(RouteCommand),
}

#[derive(Debug, Subcommand)]
pub enum RouteCommand {
    /// Write a route (create or replace) and announce it to the gateways.
    Add(RouteAddArgs),
    /// Delete a route; gateways close its live sessions with 4006 "session revoked".
    Del(RouteDelArgs),
    /// List the routes.
    List(RouteListArgs),
}

#[derive(Debug, Clone, Args)]
pub struct RedisArg {
    /// Redis URL: redis://HOST:PORT[/DB], redis+sentinel://H:P[,H:P...]/SERVICE or
    /// redis+cluster://H:P[,H:P...].
    #[arg(long, value_name = "URL", env = "VNCGATE_REDIS")]
    pub redis: String,
}

#[derive(Debug, Clone, Args)]
pub struct RouteAddArgs {
    #[command(flatten)]
    pub redis: RedisArg,
    /// Session id (the last path segment the browser opens).
    #[arg(long)]
    pub session: String,
    /// The VM's VNC address, HOST:PORT (a name is resolved now; the route holds the address).
    #[arg(long, value_name = "HOST:PORT")]
    pub upstream: String,
    /// The session token clients must present (stored as its SHA-256 only).
    #[arg(long, conflicts_with = "token_sha256")]
    pub token: Option<String>,
    /// The token's SHA-256 in hex, when the token itself should never reach this host.
    #[arg(long, value_name = "HEX")]
    pub token_sha256: Option<String>,
    /// Seconds until the route expires; live sessions then close with 4005.
    #[arg(long, value_parser = parse_secs)]
    pub ttl: Option<Duration>,
    /// Concurrent connections allowed for this session (0: unlimited) [default: the
    /// gateway's --max-viewers].
    #[arg(long)]
    pub max_viewers: Option<u32>,
    /// CIDR the gateways may dial (repeatable); the upstream must fall inside. Also read
    /// from --config and VNCGATE_ALLOW_UPSTREAM (comma-separated).
    #[arg(
        long = "allow-upstream",
        value_name = "CIDR",
        env = "VNCGATE_ALLOW_UPSTREAM",
        value_delimiter = ','
    )]
    pub allow_upstream: Vec<String>,
    /// The gateway's TOML config, for its allow_upstream.
    #[arg(long, value_name = "FILE")]
    pub config: Option<PathBuf>,
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, ValueEnum)]
pub enum DelReason {
    /// Live sessions close with 4006 "session revoked".
    #[default]
    Revoked,
    /// Live sessions close with 4005 "session expired".
    Expired,
}

#[derive(Debug, Clone, Args)]
pub struct RouteDelArgs {
    #[command(flatten)]
    pub redis: RedisArg,
    #[arg(long)]
    pub session: String,
    /// What live sessions are told.
    #[arg(long, value_enum, default_value = "revoked")]
    pub reason: DelReason,
}

#[derive(Debug, Clone, Args)]
pub struct RouteListArgs {
    #[command(flatten)]
    pub redis: RedisArg,
    /// One JSON object per line instead of a table.
    #[arg(long)]
    pub json: bool,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum IoDriver {
    /// io_uring, falling back to epoll when io_uring cannot be set up.
    Auto,
    Uring,
    Epoll,
}

#[derive(Debug, Clone, Default, Args)]
pub struct ServeArgs {
    /// Address to accept WebSocket clients on [default: 127.0.0.1:8080].
    #[arg(long, value_name = "ADDR")]
    pub listen: Option<String>,
    /// A static route without a token (repeatable): the relay answers at /vnc/ID.
    #[arg(long = "route", value_name = "ID=HOST:PORT")]
    pub routes: Vec<String>,
    /// A TOML file of routes with tokens and expiry.
    #[arg(long, value_name = "FILE")]
    pub routes_file: Option<PathBuf>,
    /// CIDR (or address) the gateway may dial (repeatable). Nothing else is ever dialed.
    #[arg(long = "allow-upstream", value_name = "CIDR")]
    pub allow_upstream: Vec<String>,
    /// Worker threads, each with its own runtime and listener [default: one per core].
    #[arg(long)]
    pub workers: Option<usize>,
    /// I/O driver [default: auto].
    #[arg(long, value_enum)]
    pub io_driver: Option<IoDriver>,
    /// TOML config file; flags given on the command line win over it.
    #[arg(long, value_name = "FILE")]
    pub config: Option<PathBuf>,
    /// Admin listener for /metrics, /healthz and /readyz.
    #[arg(long, value_name = "ADDR")]
    pub admin: Option<String>,
    /// URL path prefix in front of the session id [default: /vnc/].
    #[arg(long)]
    pub path_prefix: Option<String>,
    /// Allowed Origin (repeatable); none given allows any origin.
    #[arg(long = "allow-origin", value_name = "ORIGIN")]
    pub allow_origins: Vec<String>,
    /// Share the port with a live gateway already bound to it (the restart handover).
    /// Without it, a second gateway on the same port refuses to start.
    #[arg(long)]
    pub share_port: bool,
    /// Sessions per worker before new upgrades get 503 [default: 25000].
    #[arg(long)]
    pub max_sessions_per_worker: Option<usize>,
    /// Largest browser-to-VM message in bytes, all fragments together [default: 16 MiB].
    #[arg(long)]
    pub max_message: Option<u64>,
    /// Seconds a client has to send its upgrade request [default: 10].
    #[arg(long, value_parser = parse_secs)]
    pub handshake_timeout: Option<Duration>,
    /// Seconds per upstream connect attempt [default: 3].
    #[arg(long, value_parser = parse_secs)]
    pub connect_timeout: Option<Duration>,
    /// Seconds to keep retrying a refusing upstream (a booting VM), with backoff [default: 2].
    #[arg(long, value_parser = parse_secs)]
    pub connect_retry_window: Option<Duration>,
    /// Seconds without traffic either way before closing with 4007; 0 disables [default: 3600].
    #[arg(long, value_parser = parse_secs)]
    pub idle_timeout: Option<Duration>,
    /// Longest session in seconds, then 4011; 0 disables [default: 0].
    #[arg(long, value_parser = parse_secs)]
    pub max_session_duration: Option<Duration>,
    /// Seconds between keepalive pings; 0 disables [default: 20].
    #[arg(long, value_parser = parse_secs)]
    pub keepalive_interval: Option<Duration>,
    /// Seconds to wait for a pong before closing with 4008 [default: 20].
    #[arg(long, value_parser = parse_secs)]
    pub keepalive_timeout: Option<Duration>,
    /// Seconds a SIGTERM drain waits for sessions before closing them with 1001 [default: 30].
    #[arg(long, value_parser = parse_secs)]
    pub drain_timeout: Option<Duration>,
    /// Capacity of each relay pipe in bytes [default: 1 MiB].
    #[arg(long)]
    pub pipe_size: Option<usize>,
    /// TCP congestion control of the gateway's sockets, both legs (a name from
    /// net.ipv4.tcp_available_congestion_control, or `system` for the host's default)
    /// [default: cubic]. BBR paces every flow at its own bandwidth estimate; on the fast
    /// local legs of a gateway that estimate collapses for flows whose peer reads late, and
    /// those sessions crawl (see the README, "Congestion control").
    #[arg(long, value_name = "NAME")]
    pub tcp_congestion: Option<String>,
    /// Read routes from Redis (after the static ones): redis://HOST:PORT[/DB],
    /// redis+sentinel://H:P[,H:P...]/SERVICE or redis+cluster://H:P[,H:P...].
    #[arg(long, value_name = "URL", env = "VNCGATE_REDIS")]
    pub redis: Option<String>,
    /// Seconds a worker serves a Redis route from its cache; 0 disables the cache [default: 30].
    #[arg(long, value_parser = parse_secs)]
    pub route_cache_ttl: Option<Duration>,
    /// Seconds an unknown session is remembered as unknown; 0 disables [default: 1].
    #[arg(long, value_parser = parse_secs)]
    pub route_negative_ttl: Option<Duration>,
    /// Deadline of one Redis lookup or connection attempt, in seconds [default: 0.5].
    #[arg(long, value_parser = parse_secs)]
    pub redis_timeout: Option<Duration>,
    /// Concurrent connections per session where the route does not say; 0 = unlimited
    /// [default: 0]. Over the limit, the upgrade closes with 4009 "too many viewers".
    #[arg(long)]
    pub max_viewers: Option<u32>,
    /// Log format.
    #[arg(long, value_enum, default_value = "text")]
    pub log_format: LogFormat,
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, ValueEnum)]
pub enum LogFormat {
    #[default]
    Text,
    Json,
}

/// The config file: the same settings as the flags, in snake_case.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FileConfig {
    pub listen: Option<String>,
    #[serde(default)]
    pub routes: Vec<String>,
    pub routes_file: Option<PathBuf>,
    #[serde(default)]
    pub allow_upstream: Vec<String>,
    pub workers: Option<usize>,
    pub io_driver: Option<IoDriver>,
    pub admin: Option<String>,
    pub path_prefix: Option<String>,
    #[serde(default)]
    pub allow_origins: Vec<String>,
    pub share_port: Option<bool>,
    pub max_sessions_per_worker: Option<usize>,
    pub max_message: Option<u64>,
    pub handshake_timeout: Option<f64>,
    pub connect_timeout: Option<f64>,
    pub connect_retry_window: Option<f64>,
    pub idle_timeout: Option<f64>,
    pub max_session_duration: Option<f64>,
    pub keepalive_interval: Option<f64>,
    pub keepalive_timeout: Option<f64>,
    pub drain_timeout: Option<f64>,
    pub pipe_size: Option<usize>,
    pub tcp_congestion: Option<String>,
    pub max_header_bytes: Option<usize>,
    pub redis: Option<String>,
    pub route_cache_ttl: Option<f64>,
    pub route_negative_ttl: Option<f64>,
    pub redis_timeout: Option<f64>,
    pub max_viewers: Option<u32>,
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

/// The congestion control the gateway sets on its sockets.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TcpCongestion {
    /// `None`: leave the host's default.
    pub name: Option<String>,
    /// Asked for by flag or file (an unavailable one is then an error at startup), rather
    /// than the default (which falls back to the host's with a warning).
    pub explicit: bool,
}

/// Without a choice: loss-based CUBIC, Linux's own default, which needs no pacing.
pub const DEFAULT_TCP_CONGESTION: &str = "cubic";

impl TcpCongestion {
    fn parse(flag: Option<&str>) -> Result<TcpCongestion, String> {
        let Some(v) = flag else {
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
            pipe_size: 1 << 20,
            max_idle_pipes: 32,
            read_buffer: 32 << 10,
            max_viewers: 0,
        }
    }
}

/// Everything the server needs, validated.
#[derive(Debug, Clone)]
pub struct Settings {
    pub listen: SocketAddr,
    pub workers: usize,
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
}

pub fn parse_secs(s: &str) -> Result<Duration, String> {
    let v: f64 = s
        .parse()
        .map_err(|_| format!("'{s}' is not a number of seconds"))?;
    secs(v)
}

fn secs(v: f64) -> Result<Duration, String> {
    Duration::try_from_secs_f64(v).map_err(|_| format!("{v} is not a valid number of seconds"))
}

fn opt_secs(
    flag: Option<Duration>,
    file: Option<f64>,
    default: Duration,
) -> Result<Duration, String> {
    match (flag, file) {
        (Some(d), _) => Ok(d),
        (None, Some(v)) => secs(v),
        (None, None) => Ok(default),
    }
}

/// Zero disables a timer.
fn timer(d: Duration) -> Option<Duration> {
    (!d.is_zero()).then_some(d)
}

pub(crate) fn read_file_config(path: &Path) -> Result<FileConfig, String> {
    let text = std::fs::read_to_string(path)
        .map_err(|e| format!("cannot read config {}: {e}", path.display()))?;
    toml::from_str(&text).map_err(|e| format!("config {}: {e}", path.display()))
}

impl ServeArgs {
    /// Merges flags over the config file over defaults, and validates the result.
    /// `extra_routes` are routes the caller adds (the demo's embedded VM).
    pub fn settings(&self, extra_routes: Vec<(String, Route)>) -> Result<Settings, String> {
        let file = match &self.config {
            Some(p) => read_file_config(p)?,
            None => FileConfig::default(),
        };
        let d = Limits::default();
        let listen_s = self
            .listen
            .clone()
            .or(file.listen.clone())
            .unwrap_or_else(|| "127.0.0.1:8080".into());
        let listen = route::resolve(&listen_s).map_err(|e| format!("--listen: {e}"))?;
        let workers = self
            .workers
            .or(file.workers)
            .unwrap_or_else(|| std::thread::available_parallelism().map_or(1, |n| n.get()));
        if workers == 0 || workers > 1024 {
            return Err(format!("--workers must be 1..=1024, got {workers}"));
        }
        let admin = match self.admin.clone().or(file.admin.clone()) {
            Some(a) => Some(route::resolve(&a).map_err(|e| format!("--admin: {e}"))?),
            None => None,
        };
        let mut path_prefix = self
            .path_prefix
            .clone()
            .or(file.path_prefix.clone())
            .unwrap_or_else(|| "/vnc/".into());
        if !path_prefix.starts_with('/') {
            return Err(format!(
                "--path-prefix must start with '/', got '{path_prefix}'"
            ));
        }
        if !path_prefix.ends_with('/') {
            path_prefix.push('/');
        }
        let allowed_origins: Vec<String> = file
            .allow_origins
            .iter()
            .chain(&self.allow_origins)
            .cloned()
            .collect();

        let nets = file
            .allow_upstream
            .iter()
            .chain(&self.allow_upstream)
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
        for s in file.routes.iter().chain(&self.routes) {
            let (id, r) = route::parse_route_flag(s).map_err(|e| format!("--route: {e}"))?;
            add(id, r)?;
        }
        if let Some(p) = self.routes_file.as_ref().or(file.routes_file.as_ref()) {
            for (id, r) in route::load_routes_file(p)? {
                add(id, r)?;
            }
        }
        for (id, r) in extra_routes {
            add(id, r)?;
        }

        let limits = Limits {
            max_sessions_per_worker: self
                .max_sessions_per_worker
                .or(file.max_sessions_per_worker)
                .unwrap_or(d.max_sessions_per_worker),
            max_message: self
                .max_message
                .or(file.max_message)
                .unwrap_or(d.max_message),
            handshake_timeout: opt_secs(
                self.handshake_timeout,
                file.handshake_timeout,
                d.handshake_timeout,
            )?,
            connect_timeout: opt_secs(
                self.connect_timeout,
                file.connect_timeout,
                d.connect_timeout,
            )?,
            connect_retry_window: opt_secs(
                self.connect_retry_window,
                file.connect_retry_window,
                d.connect_retry_window,
            )?,
            idle_timeout: timer(opt_secs(
                self.idle_timeout,
                file.idle_timeout,
                d.idle_timeout.unwrap_or_default(),
            )?),
            max_session_duration: timer(opt_secs(
                self.max_session_duration,
                file.max_session_duration,
                Duration::ZERO,
            )?),
            keepalive_interval: timer(opt_secs(
                self.keepalive_interval,
                file.keepalive_interval,
                d.keepalive_interval.unwrap_or_default(),
            )?),
            keepalive_timeout: opt_secs(
                self.keepalive_timeout,
                file.keepalive_timeout,
                d.keepalive_timeout,
            )?,
            drain_timeout: opt_secs(self.drain_timeout, file.drain_timeout, d.drain_timeout)?,
            pipe_size: self.pipe_size.or(file.pipe_size).unwrap_or(d.pipe_size),
            max_viewers: self
                .max_viewers
                .or(file.max_viewers)
                .unwrap_or(d.max_viewers),
            ..d
        };
        let redis = match self.redis.as_ref().or(file.redis.as_ref()) {
            None => None,
            Some(url) => Some(RedisSettings {
                url: url.parse().map_err(|e| format!("--redis: {e}"))?,
                cache_ttl: opt_secs(
                    self.route_cache_ttl,
                    file.route_cache_ttl,
                    Duration::from_secs(30),
                )?,
                negative_ttl: opt_secs(
                    self.route_negative_ttl,
                    file.route_negative_ttl,
                    Duration::from_secs(1),
                )?,
                timeout: opt_secs(
                    self.redis_timeout,
                    file.redis_timeout,
                    Duration::from_millis(500),
                )?,
                recheck_interval: Duration::from_secs(5),
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
        Ok(Settings {
            listen,
            workers,
            io_driver: self.io_driver.or(file.io_driver).unwrap_or(IoDriver::Auto),
            share_port: self.share_port || file.share_port.unwrap_or(false),
            admin,
            handshake: HandshakeConfig {
                path_prefix,
                allowed_origins,
                max_header_bytes: file.max_header_bytes.unwrap_or(8192),
            },
            policy,
            routes: StaticRoutes::new(table),
            limits,
            tcp_congestion: TcpCongestion::parse(
                self.tcp_congestion
                    .as_deref()
                    .or(file.tcp_congestion.as_deref()),
            )?,
            redis,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

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
        let c = |v: &[&str]| args(v).settings(vec![]).map(|s| s.tcp_congestion);
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
        .settings(vec![])
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
        .settings(vec![])
        .unwrap_err();
        assert!(e.contains("outside --allow-upstream"), "{e}");
        let e = args(&["--route", "a=127.0.0.1:5900"])
            .settings(vec![])
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
            .settings(vec![])
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
            .settings(vec![])
            .unwrap_err();
        assert!(e.contains("--redis-timeout"), "{e}");
        let e = args(&["--redis", "tcp://h:1"])
            .settings(vec![])
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
            .settings(vec![])
            .unwrap();
        assert_eq!(s.workers, 4);
        assert_eq!(s.limits.idle_timeout, None);
        assert_eq!(s.routes.len(), 1);
        std::fs::write(&p, "wrokers = 2\n").unwrap();
        let e = args(&["--config", p.to_str().unwrap()])
            .settings(vec![])
            .unwrap_err();
        assert!(e.contains("wrokers"), "{e}");
    }
}

#[cfg(test)]
mod example_tests {
    use super::*;

    /// The documented example config must stay valid (its CIDRs would refuse its own routes
    /// only if they drifted apart).
    #[test]
    fn example_config_parses() {
        let root = concat!(env!("CARGO_MANIFEST_DIR"), "/..");
        let text = std::fs::read_to_string(format!("{root}/config/gateway.example.toml")).unwrap();
        let f: FileConfig = toml::from_str(&text).unwrap();
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
        let s = a.settings(vec![]).unwrap();
        assert_eq!(s.routes.len(), 3);
        assert_eq!(s.limits.max_viewers, 0);
        assert!(s.redis.is_none(), "the example keeps Redis commented out");
    }
}
