//! `vncgate-controller`: flags in, library calls out.

#![forbid(unsafe_code)]

use std::process::ExitCode;
use std::time::{Duration, Instant};

use clap::{Parser, Subcommand, ValueEnum};
use vncgate_controller::probe;
use vncgate_controller::publish::{self, Publish, Published};
use vncgate_schema::{RedisUrl, RemovalReason};

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
    /// Wait until the VM's VNC port sends an RFB banner, then publish the session's route to
    /// Redis (gateways pick it up at once). Exits 0 when published, 1 when the VM never
    /// became ready (nothing is written), 2 on errors.
    Publish {
        /// Redis URL (redis://, redis+sentinel://, redis+cluster://).
        #[arg(long, env = "VNCGATE_REDIS")]
        redis: String,
        #[arg(long)]
        session: String,
        /// host:port of the VM's VNC server.
        #[arg(long)]
        vnc: String,
        /// The session token browsers will present (stored as its SHA-256).
        #[arg(long)]
        token: Option<String>,
        /// Seconds until the route expires.
        #[arg(long)]
        ttl: Option<u64>,
        /// Concurrent connections allowed (0: unlimited).
        #[arg(long)]
        max_viewers: Option<u32>,
        /// Seconds to wait for the VM to become ready.
        #[arg(long, default_value_t = 60.0)]
        wait: f64,
        /// Print one JSON object instead of a sentence.
        #[arg(long)]
        json: bool,
    },
    /// Delete a session's route; gateways close its live sessions.
    Withdraw {
        #[arg(long, env = "VNCGATE_REDIS")]
        redis: String,
        #[arg(long)]
        session: String,
        /// What live sessions are told: 4006 session revoked, or 4005 session expired.
        #[arg(long, value_enum, default_value = "revoked")]
        reason: Reason,
    },
}

#[derive(Clone, Copy, ValueEnum)]
enum Reason {
    Revoked,
    Expired,
}

fn fail(e: String) -> ExitCode {
    eprintln!("vncgate-controller: error: {e}");
    ExitCode::from(2)
}

fn redis_url(s: &str) -> Result<RedisUrl, String> {
    s.parse().map_err(|e| format!("--redis: {e}"))
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
        Cmd::Publish {
            redis,
            session,
            vnc,
            token,
            ttl,
            max_viewers,
            wait,
            json,
        } => {
            let url = match redis_url(&redis) {
                Ok(u) => u,
                Err(e) => return fail(e),
            };
            let Ok(wait) = Duration::try_from_secs_f64(wait) else {
                return fail(format!("--wait: {wait} is not a number of seconds"));
            };
            let p = Publish {
                session: session.clone(),
                vnc: vnc.clone(),
                token,
                ttl: ttl.map(Duration::from_secs),
                max_viewers,
                wait,
                probe_timeout: Duration::from_secs(2),
            };
            let started = Instant::now();
            match publish::publish_when_ready(&url, &p) {
                Err(e) => fail(e),
                Ok(Published::Route(rec)) => {
                    if json {
                        println!(
                            "{{\"session\":\"{session}\",\"published\":true,\"upstream\":\"{}\",\"waited_ms\":{:.0}}}",
                            rec.upstream,
                            started.elapsed().as_secs_f64() * 1000.0
                        );
                    } else {
                        println!(
                            "{session}: vm ready at {}; route published after {:.1} s",
                            rec.upstream,
                            started.elapsed().as_secs_f64()
                        );
                    }
                    ExitCode::SUCCESS
                }
                Ok(Published::NotReady(outcome)) => {
                    if json {
                        println!(
                            "{{\"session\":\"{session}\",\"published\":false,\"probe\":{}}}",
                            outcome.to_json(&vnc, started.elapsed())
                        );
                    } else {
                        println!("{session}: not published; {vnc}: {outcome}");
                    }
                    ExitCode::FAILURE
                }
            }
        }
        Cmd::Withdraw {
            redis,
            session,
            reason,
        } => {
            let url = match redis_url(&redis) {
                Ok(u) => u,
                Err(e) => return fail(e),
            };
            let reason = match reason {
                Reason::Revoked => RemovalReason::Revoked,
                Reason::Expired => RemovalReason::Expired,
            };
            match publish::withdraw(&url, &session, reason) {
                Ok(true) => {
                    println!("{session}: route withdrawn");
                    ExitCode::SUCCESS
                }
                Ok(false) => {
                    eprintln!("{session}: no route (the removal was announced anyway)");
                    ExitCode::FAILURE
                }
                Err(e) => fail(e),
            }
        }
    }
}
