//! `vncgate`: flags in, gateway out. The library does the work; see `lib.rs` for the map.

#![forbid(unsafe_code)]

use std::process::ExitCode;

use clap::Parser as _;
use tracing_subscriber::EnvFilter;
use vncgate::config::{Cli, Command, LogFormat, ServeArgs, WebsockifyArgs};

fn main() -> ExitCode {
    if let Err(e) = before_clap() {
        eprintln!("vncgate: error: {e}");
        return ExitCode::from(2);
    }
    let result = match Cli::parse().command {
        Command::Serve(args) => serve(*args),
        Command::Websockify(args) => websockify(*args),
        Command::Route(r) => match vncgate::route_admin::run(&r) {
            Ok(vncgate::route_admin::Outcome::Done) => Ok(()),
            Ok(vncgate::route_admin::Outcome::NotFound) => return ExitCode::from(1),
            Err(e) => Err(e),
        },
        Command::Replay(r) => {
            init_logging(LogFormat::Text, "info");
            vncgate::replay::run(&r.file, &r.listen, r.speed)
        }
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("vncgate: error: {e}");
            ExitCode::from(2)
        }
    }
}

/// What clap cannot say well: websockify's options vncgate lacks (refused by name with the
/// equivalent), and websockify's command line given without `websockify` (answered with
/// the line that runs it).
fn before_clap() -> Result<(), String> {
    let args: Vec<std::ffi::OsString> = std::env::args_os().skip(1).collect();
    let Some(first) = args.first().and_then(|a| a.to_str()) else {
        return Ok(());
    };
    const OURS: [&str; 9] = [
        "serve",
        "websockify",
        "route",
        "help",
        "-h",
        "--help",
        "-V",
        "--version",
        "--",
    ];
    if first == "websockify" {
        return vncgate::websockify::check_refused(&args[1..]);
    }
    if OURS.contains(&first) {
        return Ok(());
    }
    // Not a command: if the words are websockify's, say how to run them (or, for an option
    // vncgate lacks, what to use instead).
    let address = |a: &std::ffi::OsString| {
        a.to_str()
            .is_some_and(vncgate::websockify::looks_like_address)
    };
    if !args.iter().any(address) {
        return Ok(());
    }
    vncgate::websockify::check_refused(&args)?;
    let as_websockify = ["vncgate".into(), "websockify".into()]
        .into_iter()
        .chain(args.iter().cloned());
    if matches!(Cli::try_parse_from(as_websockify).map(|c| c.command), Ok(Command::Websockify(w)) if w.source_addr.as_deref().is_some_and(vncgate::websockify::looks_like_address))
    {
        return Err(vncgate::websockify::hint_for_bare(&args));
    }
    Ok(())
}

fn websockify(args: WebsockifyArgs) -> Result<(), String> {
    let settings = args.settings()?;
    let log_filter = init_logging(args.log_format, &settings.log_level);
    let reloader = vncgate::server::Reloader {
        settings: Box::new(move || args.settings()),
        log_filter,
    };
    vncgate::server::run(settings, reloader)
}

fn serve(args: ServeArgs) -> Result<(), String> {
    if !args.positional.is_empty() {
        return Err(vncgate::websockify::hint_for_serve(&args.positional));
    }
    let settings = args.settings()?;
    let log_filter = init_logging(args.log_format, &settings.log_level);
    vncgate::fault::arm_from_env()?;
    if args.detach {
        return vncgate::server::handover::detach(&settings);
    }
    let reloader = vncgate::server::Reloader {
        settings: Box::new(move || args.settings()),
        log_filter,
    };
    vncgate::server::run(settings, reloader)
}

/// Installs the subscriber, and returns how to change its filter (none when `VNCGATE_LOG`
/// is set: the environment then fixes it).
fn init_logging(format: LogFormat, level: &str) -> Option<vncgate::server::SetLogFilter> {
    let from_env = EnvFilter::try_from_env("VNCGATE_LOG").ok();
    let fixed = from_env.is_some();
    let filter = from_env.unwrap_or_else(|| EnvFilter::new(level));
    let ansi = std::io::IsTerminal::is_terminal(&std::io::stderr());
    let b = tracing_subscriber::fmt()
        .with_writer(std::io::stderr)
        .with_ansi(ansi);
    // The filter goes last: reloading wraps the layers built so far.
    let set: vncgate::server::SetLogFilter = match format {
        LogFormat::Text => {
            let b = b.with_env_filter(filter).with_filter_reloading();
            let h = b.reload_handle();
            b.init();
            Box::new(move |f| {
                h.reload(EnvFilter::try_new(f).map_err(|e| e.to_string())?)
                    .map_err(|e| e.to_string())
            })
        }
        LogFormat::Json => {
            let b = b.json().with_env_filter(filter).with_filter_reloading();
            let h = b.reload_handle();
            b.init();
            Box::new(move |f| {
                h.reload(EnvFilter::try_new(f).map_err(|e| e.to_string())?)
                    .map_err(|e| e.to_string())
            })
        }
    };
    (!fixed).then_some(set)
}
