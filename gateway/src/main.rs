//! `vncgate`: flags in, gateway out. The library does the work; see `lib.rs` for the map.

#![forbid(unsafe_code)]

use std::process::ExitCode;

use clap::Parser as _;
use vncgate::config::{Cli, Command, LogFormat};

fn main() -> ExitCode {
    let result = match Cli::parse().command {
        Command::Serve(args) => {
            init_logging(args.log_format);
            match args.settings() {
                Ok(s) if args.detach => vncgate::server::handover::detach(&s),
                Ok(s) => vncgate::server::run(s),
                Err(e) => Err(e),
            }
        }
        Command::Route(r) => match vncgate::route_admin::run(&r) {
            Ok(vncgate::route_admin::Outcome::Done) => Ok(()),
            Ok(vncgate::route_admin::Outcome::NotFound) => return ExitCode::from(1),
            Err(e) => Err(e),
        },
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("vncgate: error: {e}");
            ExitCode::from(2)
        }
    }
}

fn init_logging(format: LogFormat) {
    let filter = tracing_subscriber::EnvFilter::try_from_env("VNCGATE_LOG")
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    let b = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()));
    match format {
        LogFormat::Text => b.init(),
        LogFormat::Json => b.json().init(),
    }
}
