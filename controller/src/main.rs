//! `vncgate-controller`: flags in, library calls out.

#![forbid(unsafe_code)]

use std::process::ExitCode;
use std::time::{Duration, Instant};

use clap::{Parser, Subcommand};
use vncgate_controller::probe;

#[derive(Parser)]
#[command(name = "vncgate-controller", version, about = "vncgate control plane")]
struct Cli {
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Check that a VNC port answers with an RFB banner. Exits 0 when ready, 1 otherwise.
    Probe {
        /// host:port of the VM's VNC server.
        #[arg(long)]
        vnc: String,
        /// Deadline for connect + banner, in milliseconds.
        #[arg(long, default_value_t = 2000)]
        timeout_ms: u64,
        /// Print one JSON object instead of a sentence.
        #[arg(long)]
        json: bool,
    },
}

fn main() -> ExitCode {
    match Cli::parse().cmd {
        Cmd::Probe {
            vnc,
            timeout_ms,
            json,
        } => {
            let started = Instant::now();
            let outcome = probe::probe(&vnc, Duration::from_millis(timeout_ms));
            if json {
                println!("{}", outcome.to_json(&vnc, started.elapsed()));
            } else {
                println!("{vnc}: {outcome}");
            }
            if outcome.is_ready() {
                ExitCode::SUCCESS
            } else {
                ExitCode::FAILURE
            }
        }
    }
}
