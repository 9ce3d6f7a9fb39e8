//! The command line: `vncgate serve`, `vncgate route add|del|list`, as clap definitions. A
//! flag that is not given is `None`, so that the layers below it (environment, file,
//! defaults) show through: see [`super::settings`].

use std::path::PathBuf;
use std::time::Duration;

use clap::{Args, Parser, Subcommand, ValueEnum};

use super::settings::{IoDriver, PinWorkers, parse_secs};

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
    /// Run the gateway on websockify's command line: `vncgate websockify [--web DIR]
    /// [--cert FILE [--key FILE]] [--ssl-only] [--token-plugin TokenFile --token-source
    /// FILE_OR_DIR] SOURCE_ADDR [TARGET_ADDR]`. websockify's options vncgate lacks are
    /// refused by name with the vncgate equivalent.
    Websockify(Box<WebsockifyArgs>),
    /// Manage routes in Redis (for deployments without the controller).
    #[command(subcommand)]
    Route(RouteCommand),
    /// Serve a session recording (--record) to noVNC viewers at its recorded pace.
    Replay(ReplayArgs),
}

#[derive(Debug, Clone, Args)]
pub struct ReplayArgs {
    /// The recording (a .vncrec file from --record DIR).
    #[arg(value_name = "FILE")]
    pub file: PathBuf,
    /// Address to serve WebSocket viewers on (any path).
    #[arg(long, value_name = "ADDR")]
    pub listen: String,
    /// Playback speed: a multiplier of the recorded pace, or 0 / max for as fast as the
    /// viewer takes it.
    #[arg(long, default_value = "1")]
    pub speed: crate::replay::Speed,
}

#[derive(Debug, Subcommand)]
pub enum RouteCommand {
    /// Write a route (create or replace) and announce it to the gateways.
    Add(Box<RouteAddArgs>),
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
    /// A second token whose viewers see the desktop but cannot act: the gateways drop their
    /// key, pointer and clipboard messages (stored as its SHA-256 only; needs --token or
    /// --token-sha256).
    #[arg(long, conflicts_with = "view_token_sha256")]
    pub view_token: Option<String>,
    /// The view-only token's SHA-256 in hex.
    #[arg(long, value_name = "HEX")]
    pub view_token_sha256: Option<String>,
    /// Seconds until the route expires; live sessions then close with 4005.
    #[arg(long, value_parser = parse_secs)]
    pub ttl: Option<Duration>,
    /// Concurrent connections allowed for this session (0: unlimited) [default: the
    /// gateway's --max-viewers].
    #[arg(long)]
    pub max_viewers: Option<u32>,
    /// Record this route's sessions (gateways started with --record DIR).
    #[arg(long)]
    pub record: bool,
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

#[derive(Debug, Clone, Default, Args)]
pub struct WebsockifyArgs {
    /// Serve files from DIR on the same port (plain HTTP GET and HEAD; noVNC's vnc.html).
    #[arg(long, value_name = "DIR")]
    pub web: Option<PathBuf>,
    /// TLS certificate (PEM, leaf first); without --key it holds the key too.
    #[arg(long, value_name = "FILE")]
    pub cert: Option<PathBuf>,
    /// Record every session into DIR, one file per session in vncgate's recording format
    /// (`vncgate replay FILE --listen ADDR` plays one back). websockify's `--record FILE`
    /// wrote a raw frame log per session at FILE.N; here the argument is a directory.
    #[arg(long, value_name = "DIR")]
    pub record: Option<PathBuf>,
    /// TLS key, when it is not in the --cert file.
    #[arg(long, value_name = "FILE", requires = "cert")]
    pub key: Option<PathBuf>,
    /// Refuse plain (non-TLS) connections; without it, one port serves both.
    #[arg(long)]
    pub ssl_only: bool,
    /// The token plugin: TokenFile (or ReadOnlyTokenFile), the only one vncgate reads.
    #[arg(long, value_name = "PLUGIN")]
    pub token_plugin: Option<String>,
    /// The token file (`token: host:port` per line) or a directory of them; reread when it
    /// changes.
    #[arg(long, value_name = "FILE_OR_DIR")]
    pub token_source: Option<PathBuf>,
    /// The old spelling of --token-plugin TokenFile --token-source FILE.
    #[arg(long, value_name = "FILE")]
    pub target_config: Option<PathBuf>,
    /// Seconds between pings to each client; 0 disables [default: 20].
    #[arg(long, value_parser = parse_secs, value_name = "SECS")]
    pub heartbeat: Option<Duration>,
    /// Exit once no client has been connected for SECS (websockify's meaning: the server's
    /// idleness, not a session's); 0 disables [default: 0].
    #[arg(long, value_parser = parse_secs, value_name = "SECS")]
    pub idle_timeout: Option<Duration>,
    /// Stop accepting SECS after start and exit once the open sessions have drained
    /// (websockify's listener timeout); 0 disables [default: 0].
    #[arg(long, value_parser = parse_secs, value_name = "SECS")]
    pub timeout: Option<Duration>,
    /// Debug logs.
    #[arg(short = 'v', long)]
    pub verbose: bool,
    /// Accepted for websockify's sake: vncgate always answers pings.
    #[arg(long, hide = true)]
    pub auto_pong: bool,
    /// Accepted for websockify's sake: vncgate never lists directories.
    #[arg(long, hide = true)]
    pub file_only: bool,
    /// vncgate's own: worker threads [default: one per core].
    #[arg(long)]
    pub workers: Option<usize>,
    /// vncgate's own: bind worker i to the i-th CPU this process may run on: auto (when
    /// there is one worker per CPU), always (the bare flag), never [default: auto].
    #[arg(long, value_enum, value_name = "WHEN", num_args = 0..=1, require_equals = true, default_missing_value = "always")]
    pub pin_workers: Option<PinWorkers>,
    /// vncgate's own: I/O driver [default: auto].
    #[arg(long, value_enum)]
    pub io_driver: Option<IoDriver>,
    /// vncgate's own: admin listener for /metrics, /healthz and /readyz.
    #[arg(long, value_name = "ADDR")]
    pub admin: Option<String>,
    /// vncgate's own: log format.
    #[arg(long, value_enum, default_value = "text")]
    pub log_format: LogFormat,
    /// Where to listen: [HOST:]PORT (a bare port binds every interface, as websockify's).
    #[arg(value_name = "SOURCE_ADDR")]
    pub source_addr: Option<String>,
    /// The VNC server, HOST:PORT (without a token file).
    #[arg(value_name = "TARGET_ADDR")]
    pub target_addr: Option<String>,
}

#[derive(Debug, Clone, Default, Args)]
pub struct ServeArgs {
    /// websockify's positional SOURCE and TARGET: refused with the flags that mean them.
    #[arg(hide = true, value_name = "ARGS")]
    pub positional: Vec<String>,
    /// Serve static files from DIR on the public port (plain HTTP GET and HEAD; noVNC's
    /// vnc.html); WebSocket upgrades on the same port still go to the relay.
    #[arg(long, value_name = "DIR")]
    pub web: Option<PathBuf>,
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
    /// Bind worker i to the i-th CPU this process may run on (its affinity mask, the
    /// container's cpuset; wrapping round when there are more workers than CPUs). auto:
    /// when there is exactly one worker per such CPU. always (the bare flag): whatever the
    /// count. never: the scheduler places them, which suits a host whose cores other busy
    /// threads share unconfined (VMs, other services) [default: auto].
    #[arg(long, value_enum, value_name = "WHEN", num_args = 0..=1, require_equals = true, default_missing_value = "always")]
    pub pin_workers: Option<PinWorkers>,
    /// I/O driver [default: auto].
    #[arg(long, value_enum)]
    pub io_driver: Option<IoDriver>,
    /// TOML config file (config/gateway.example.toml). Layers, each over the one before:
    /// defaults, this file, VNCGATE_<KEY> environment variables (VNCGATE_REDIS,
    /// VNCGATE_IDLE_TIMEOUT, ...; lists comma-separated), then flags.
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
    /// Seconds after the drain deadline over which sessions close with 1001, each at a
    /// random point, so that reconnecting browsers arrive spread out [default: 5].
    #[arg(long, value_parser = parse_secs)]
    pub drain_spread: Option<Duration>,
    /// Unix socket for restarts that refuse nothing: a gateway started with it first asks
    /// a gateway serving there for its listening sockets (and tells it to drain once its
    /// own workers accept on them), then serves the same to its own successor (mode 0600).
    /// With no gateway there, it binds as usual.
    #[arg(long, value_name = "PATH")]
    pub handover_socket: Option<PathBuf>,
    /// Start the gateway as a child process and return once it serves (after taking the
    /// sockets over from the gateway at --handover-socket, which it requires): what
    /// `ExecReload` runs, so `systemctl reload` returns when the handover is done, and fails
    /// if the new gateway does.
    #[arg(long)]
    pub detach: bool,
    /// Read a PROXY protocol header (v1 or v2) before each request on the public
    /// listener, from --trusted-proxy peers only; other peers are refused.
    #[arg(long)]
    pub proxy_protocol: bool,
    /// CIDR (or address) allowed to send PROXY headers (repeatable).
    #[arg(long = "trusted-proxy", value_name = "CIDR")]
    pub trusted_proxies: Vec<String>,
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
    #[arg(long, value_name = "URL")]
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
    /// Serve `wss://`: the certificate chain, PEM, leaf first (RSA, ECDSA or Ed25519).
    /// Reloaded on SIGHUP and when the file changes; live sessions keep their keys.
    #[arg(long, value_name = "FILE", requires = "tls_key")]
    pub tls_cert: Option<PathBuf>,
    /// The certificate's private key, PEM (PKCS#8, PKCS#1 or SEC1).
    #[arg(long, value_name = "FILE", requires = "tls_cert")]
    pub tls_key: Option<PathBuf>,
    /// Log filter: a level (error, warn, info, debug, trace) or tracing directives such as
    /// `info,vncgate::routing=debug`; reloaded on SIGHUP. VNCGATE_LOG, when set, wins
    /// [default: info].
    #[arg(long, value_name = "FILTER")]
    pub log_level: Option<String>,
    /// Log format.
    #[arg(long, value_enum, default_value = "text")]
    pub log_format: LogFormat,
    /// Record sessions into this directory, one file per session (see the README,
    /// "Recording and playback"; play one back with `vncgate replay FILE`).
    #[arg(long, value_name = "DIR")]
    pub record: Option<PathBuf>,
    /// Which sessions --record records: all, or only the routes with `record = true`
    /// [default: all].
    #[arg(long, value_enum, value_name = "SCOPE")]
    pub record_scope: Option<super::settings::RecordScope>,
    /// Record the browser's input too. It holds the VNC authentication response and every
    /// keystroke (passwords typed into the desktop): guard the files accordingly.
    #[arg(long)]
    pub record_input: bool,
    /// Bytes one session's recording may take; then it ends (the session goes on)
    /// [default: 4 GiB].
    #[arg(long, value_name = "BYTES")]
    pub record_max_session_bytes: Option<u64>,
    /// Bytes the recordings in --record DIR may take together; then recordings end, and
    /// new sessions go unrecorded [default: 64 GiB].
    #[arg(long, value_name = "BYTES")]
    pub record_max_dir_bytes: Option<u64>,
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, ValueEnum)]
pub enum LogFormat {
    #[default]
    Text,
    Json,
}
