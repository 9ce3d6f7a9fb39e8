//! `vncgate-loadtest`: flags in, library calls out. See the library docs for what each
//! subcommand does.

#![forbid(unsafe_code)]

use std::io::IsTerminal;
use std::process::ExitCode;
use std::time::Duration;

use clap::{Args, Parser, Subcommand};
use tracing_subscriber::EnvFilter;
use vncgate_loadtest::dial::{self, Tls};
use vncgate_loadtest::fakevm::{self, Payload, UpdateArea};
use vncgate_loadtest::{idle, swarm};

#[derive(Parser)]
#[command(
    name = "vncgate-loadtest",
    version,
    about = "Fake VNC VM and RFB-over-WebSocket load generator"
)]
struct Cli {
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Serve synthetic RFB 3.8 desktops (a fake VM).
    Fakevm(FakevmArgs),
    /// Run N simulated noVNC clients against an RFB-over-WebSocket URL and report.
    Swarm(SwarmArgs),
    /// Open and hold N idle RFB-over-WebSocket sessions; report how many were held and
    /// (with --pid) what they cost that process in PSS.
    Idle(IdleArgs),
    /// Session-level load: create sessions on a controller, wait for ready, view each
    /// through the gateway to its first framebuffer, hold, close, delete; report
    /// create-to-ready and create-to-first-framebuffer percentiles and failures by reason.
    Sessions(SessionsArgs),
    /// Run the vncgate gateway in front of a synthetic desktop (route `demo`, no Redis) and
    /// print the URL to open. Flags after the demo's own go to `vncgate serve`.
    Demo(DemoArgs),
}

#[derive(Args)]
struct SessionsArgs {
    /// The controller's API, e.g. http://127.0.0.1:8000
    #[arg(long, value_name = "URL")]
    controller: String,
    /// The gateway, e.g. ws://127.0.0.1:8080 (or wss://); each viewer opens the session's
    /// ws_path on it with its token.
    #[arg(long, value_name = "WS_URL")]
    gateway: String,
    /// Sessions to run in all.
    #[arg(long, default_value_t = 10)]
    sessions: usize,
    /// Sessions in flight at once.
    #[arg(long, default_value_t = 1)]
    concurrency: usize,
    /// Seconds each viewer stays open after its first framebuffer update.
    #[arg(long, default_value_t = 1.0)]
    hold: f64,
    /// Seconds a session may take to become ready.
    #[arg(long, default_value_t = 60.0)]
    ready_timeout: f64,
    /// The sessions' user_id and provider.
    #[arg(long, default_value = "vncgate-loadtest")]
    user_id: String,
    #[arg(long, default_value = "loadtest")]
    provider: String,
    #[command(flatten)]
    tls: TlsArgs,
    /// Print one JSON object (last line) instead of the table; no progress line.
    #[arg(long)]
    json: bool,
    /// Exit 1 when any session failed.
    #[arg(long)]
    fail_on_error: bool,
}

#[derive(Args)]
struct DemoArgs {
    /// The vncgate binary [default: `vncgate` next to this one, then on PATH].
    #[arg(long, value_name = "PATH")]
    gateway: Option<std::path::PathBuf>,
    /// Flags for `vncgate serve`, e.g. `--listen 127.0.0.1:8080 --admin 127.0.0.1:9090`.
    #[arg(
        trailing_var_arg = true,
        allow_hyphen_values = true,
        value_name = "SERVE_FLAGS"
    )]
    serve: Vec<std::ffi::OsString>,
}

/// Certificate verification for wss:// URLs.
#[derive(Args)]
struct TlsArgs {
    /// For wss://: trust only the certificates in this PEM file (a private CA or a
    /// self-signed server certificate) instead of the bundled webpki roots.
    #[arg(long, value_name = "FILE", conflicts_with = "insecure")]
    ca: Option<std::path::PathBuf>,
    /// For wss://: do not verify the server's certificate at all. Lab use only: anyone on
    /// the path can impersonate the server.
    #[arg(long)]
    insecure: bool,
}

impl TlsArgs {
    fn tls(&self, url: &str) -> Tls {
        match (&self.ca, self.insecure) {
            (_, true) => {
                if url.starts_with("wss:") {
                    eprintln!("vncgate-loadtest: --insecure: server certificates are NOT verified");
                }
                Tls::Insecure
            }
            (Some(path), false) => Tls::CaFile(path.clone()),
            (None, false) => Tls::WebPkiRoots,
        }
    }
}

#[derive(Args)]
struct FakevmArgs {
    /// Address to listen on (repeatable), e.g. 127.0.0.1:5900; port 0 picks a free one and
    /// `listening ADDR` on stdout says which.
    #[arg(long, required = true)]
    listen: Vec<String>,
    #[arg(long, default_value_t = 1024, value_parser = clap::value_parser!(u16).range(1..))]
    width: u16,
    #[arg(long, default_value_t = 768, value_parser = clap::value_parser!(u16).range(1..))]
    height: u16,
    /// Most framebuffer updates per second per session (0: unpaced).
    #[arg(long, default_value_t = 30)]
    fps: u32,
    /// Shape of the update content.
    #[arg(long, value_enum, default_value_t = Payload::Raw)]
    payload: Payload,
    /// Screen share one incremental update repaints: a fraction (0.1: a full-width band a
    /// tenth of the height), a size (256x64) or `full`.
    #[arg(long, default_value = "0.1")]
    update_area: UpdateArea,
    /// Offer VNC Authentication with this password instead of None.
    #[arg(long)]
    password: Option<String>,
    /// Desktop name sent in ServerInit.
    #[arg(long, default_value = "vncgate fakevm")]
    name: String,
}

#[derive(Args)]
struct SwarmArgs {
    /// RFB-over-WebSocket endpoint, e.g. ws://127.0.0.1:8080/vnc/s1?token=t (or wss://)
    #[arg(long)]
    url: String,
    /// Number of simulated clients.
    #[arg(long, default_value_t = 10)]
    sessions: usize,
    /// Length of the whole run in seconds (ramp-up included).
    #[arg(long, default_value_t = 10.0)]
    duration: f64,
    /// Spread session starts over this many seconds.
    #[arg(long, default_value_t = 0.0)]
    ramp_up: f64,
    /// Share of sessions that park after their first update (0..=1).
    #[arg(long, default_value_t = 0.0)]
    idle_fraction: f64,
    /// Input events per second per busy session.
    #[arg(long, default_value_t = 10.0)]
    input_rate: f64,
    /// VNC password, used when the server offers VNC Authentication.
    #[arg(long)]
    password: Option<String>,
    /// WebSocket subprotocol to offer (e.g. `binary`); none by default, like noVNC.
    #[arg(long)]
    subprotocol: Option<String>,
    /// Seconds allowed for TCP connect + WebSocket upgrade.
    #[arg(long, default_value_t = 10.0)]
    connect_timeout: f64,
    #[command(flatten)]
    tls: TlsArgs,
    /// Print the report as one JSON object (the last line on stdout); no progress line and
    /// no per-failure lines.
    #[arg(long)]
    json: bool,
    /// Exit 1 when any session failed (the report is printed all the same).
    #[arg(long)]
    fail_on_error: bool,
}

#[derive(Args)]
struct IdleArgs {
    /// RFB-over-WebSocket endpoint, e.g. ws://127.0.0.1:8080/vnc/s1 (or wss://)
    #[arg(long)]
    url: String,
    /// Sessions to open and hold.
    #[arg(long, default_value_t = 1000)]
    sessions: usize,
    /// Local addresses to connect from, round-robin: a list and/or IPv4 ranges, e.g.
    /// 127.0.0.1-127.0.0.16 (each source has its own ephemeral ports). Default: the
    /// kernel's choice.
    #[arg(long, value_name = "LIST", value_parser = parse_sources)]
    sources: Option<Sources>,
    /// Most sessions opening at once.
    #[arg(long, default_value_t = 256, value_parser = clap::value_parser!(u32).range(1..))]
    concurrency: u32,
    /// Seconds per session for TCP + TLS + upgrade + RFB handshake.
    #[arg(long, default_value_t = 10.0)]
    connect_timeout: f64,
    /// Seconds for the whole ramp; sessions not open by then count as failed.
    #[arg(long, default_value_t = 300.0)]
    deadline: f64,
    /// Seconds to hold the sessions after the ramp, before sampling and closing them.
    #[arg(long, default_value_t = 1.0)]
    hold: f64,
    /// Process whose PSS (/proc/PID/smaps_rollup) is read before the ramp and at the end of
    /// the hold, e.g. the gateway's.
    #[arg(long)]
    pid: Option<u32>,
    /// Stop starting sessions once this many have failed.
    #[arg(long)]
    max_failures: Option<usize>,
    /// VNC password, used when the server offers VNC Authentication.
    #[arg(long)]
    password: Option<String>,
    /// WebSocket subprotocol to offer (e.g. `binary`); none by default, like noVNC.
    #[arg(long)]
    subprotocol: Option<String>,
    #[command(flatten)]
    tls: TlsArgs,
    /// Print the report as one JSON object (the last line on stdout).
    #[arg(long)]
    json: bool,
}

/// `--sources`, parsed whole (clap would take a `Vec` for a repeated flag).
#[derive(Clone)]
struct Sources(Vec<std::net::IpAddr>);

fn parse_sources(s: &str) -> Result<Sources, String> {
    dial::parse_sources(s).map(Sources)
}

fn secs(name: &str, v: f64) -> Result<Duration, String> {
    Duration::try_from_secs_f64(v).map_err(|_| format!("--{name} must be a non-negative number"))
}

/// Prints a finished run's report (one JSON line with `--json`), or why it could not run
/// (exit status 2).
fn print_report<R: std::fmt::Display, E: std::fmt::Display>(
    run: &str,
    result: Result<R, E>,
    json: bool,
    to_json_line: fn(&R) -> String,
) -> ExitCode {
    match result {
        Ok(report) if json => println!("{}", to_json_line(&report)),
        Ok(report) => println!("{report}"),
        Err(e) => {
            eprintln!("vncgate-loadtest: {run}: {e}");
            return ExitCode::from(2);
        }
    }
    ExitCode::SUCCESS
}

/// `--fail-on-error`: a run that completed (status 0) but had failed sessions exits 1; a
/// run that could not start keeps its 2.
fn fail_on_error(code: ExitCode, failed: bool) -> ExitCode {
    if code == ExitCode::SUCCESS && failed {
        ExitCode::FAILURE
    } else {
        code
    }
}

/// Parses several `--NAME SECS` flags; the first bad one is reported (exit status 2).
fn all_secs<const N: usize>(flags: [(&str, f64); N]) -> Result<[Duration; N], ExitCode> {
    let mut out = [Duration::ZERO; N];
    for (slot, (name, v)) in out.iter_mut().zip(flags) {
        *slot = secs(name, v).map_err(|e| {
            eprintln!("vncgate-loadtest: {e}");
            ExitCode::from(2)
        })?;
    }
    Ok(out)
}

fn init_tracing(default: &str) {
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new(default));
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_ansi(std::io::stderr().is_terminal())
        .init();
}

#[tokio::main]
async fn main() -> ExitCode {
    let cli = Cli::parse();
    match cli.cmd {
        Cmd::Fakevm(a) => {
            init_tracing("info");
            let cfg = fakevm::Config {
                width: a.width,
                height: a.height,
                fps: a.fps,
                payload: a.payload,
                update_area: a.update_area,
                password: a.password,
                name: a.name,
            };
            let mut addrs = Vec::new();
            for l in &a.listen {
                match tokio::net::lookup_host(l).await {
                    Ok(found) => addrs.extend(found.take(1)),
                    Err(e) => {
                        eprintln!("vncgate-loadtest: cannot resolve --listen {l}: {e}");
                        return ExitCode::from(2);
                    }
                }
            }
            match fakevm::run(&addrs, cfg).await {
                Ok(()) => ExitCode::SUCCESS,
                Err(e) => {
                    eprintln!("vncgate-loadtest: fakevm: {e}");
                    ExitCode::FAILURE
                }
            }
        }
        Cmd::Swarm(a) => {
            init_tracing("warn");
            let [duration, ramp_up, connect_timeout] = match all_secs([
                ("duration", a.duration),
                ("ramp-up", a.ramp_up),
                ("connect-timeout", a.connect_timeout),
            ]) {
                Ok(d) => d,
                Err(code) => return code,
            };
            let cfg = swarm::Config {
                tls: a.tls.tls(&a.url),
                url: a.url,
                sessions: a.sessions,
                duration,
                ramp_up,
                idle_fraction: a.idle_fraction,
                input_rate: a.input_rate,
                password: a.password,
                subprotocol: a.subprotocol,
                connect_timeout,
                progress: std::io::stderr().is_terminal() && !a.json,
                print_failures: !a.json,
            };
            let result = swarm::run(cfg).await;
            let failed = matches!(&result, Ok(r) if !r.errors.is_empty());
            let code = print_report("swarm", result, a.json, swarm::Report::to_json_line);
            fail_on_error(code, failed && a.fail_on_error)
        }
        Cmd::Sessions(a) => {
            init_tracing("warn");
            let [hold, ready_timeout] =
                match all_secs([("hold", a.hold), ("ready-timeout", a.ready_timeout)]) {
                    Ok(d) => d,
                    Err(code) => return code,
                };
            let cfg = vncgate_loadtest::sessions::Config {
                tls: a.tls.tls(&a.gateway),
                controller: a.controller,
                gateway: a.gateway,
                sessions: a.sessions,
                concurrency: a.concurrency,
                hold,
                ready_timeout,
                user_id: a.user_id,
                provider: a.provider,
                progress: std::io::stderr().is_terminal() && !a.json,
            };
            let result = vncgate_loadtest::sessions::run(cfg).await;
            let failed = matches!(&result, Ok(r) if r.failed > 0);
            let code = print_report(
                "sessions",
                result,
                a.json,
                vncgate_loadtest::sessions::Report::to_json_line,
            );
            fail_on_error(code, failed && a.fail_on_error)
        }
        Cmd::Demo(a) => {
            init_tracing("info");
            let cfg = vncgate_loadtest::demo::Config {
                gateway: a.gateway,
                serve_args: a.serve,
            };
            match vncgate_loadtest::demo::run(cfg).await {
                Ok(status) if status.success() => ExitCode::SUCCESS,
                Ok(status) => {
                    ExitCode::from(status.code().map_or(1, |c| u8::try_from(c).unwrap_or(1)))
                }
                Err(e) => {
                    eprintln!("vncgate-loadtest: demo: {e}");
                    ExitCode::from(2)
                }
            }
        }
        Cmd::Idle(a) => {
            init_tracing("warn");
            let [connect_timeout, deadline, hold] = match all_secs([
                ("connect-timeout", a.connect_timeout),
                ("deadline", a.deadline),
                ("hold", a.hold),
            ]) {
                Ok(d) => d,
                Err(code) => return code,
            };
            let cfg = idle::Config {
                tls: a.tls.tls(&a.url),
                url: a.url,
                sessions: a.sessions,
                sources: a.sources.map(|s| s.0).unwrap_or_default(),
                concurrency: a.concurrency as usize,
                connect_timeout,
                deadline,
                hold,
                pid: a.pid,
                max_failures: a.max_failures,
                password: a.password,
                subprotocol: a.subprotocol,
                progress: std::io::stderr().is_terminal(),
            };
            print_report(
                "idle",
                idle::run(&cfg).await,
                a.json,
                idle::Report::to_json_line,
            )
        }
    }
}
