//! `vncgate-controller`: flags in, library calls out.

#![forbid(unsafe_code)]

use std::process::ExitCode;
use std::time::{Duration, Instant};

use clap::{Parser, Subcommand, ValueEnum};
use vncgate_controller::backend::firecracker as fc;
use vncgate_controller::backend::qemu as golden;
use vncgate_controller::publish::{self, Publish, Published};
use vncgate_controller::{probe, server};
use vncgate_schema::{RedisUrl, RemovalReason};

#[derive(Parser)]
#[command(
    name = "vncgate-controller",
    version,
    about = "vncgate control plane: sessions whose ready means a desktop",
    args_conflicts_with_subcommands = true
)]
struct Cli {
    #[command(subcommand)]
    cmd: Option<Cmd>,
    #[command(flatten)]
    serve: ServeArgs,
}

/// Without a subcommand: run the controller.
#[derive(clap::Args)]
struct ServeArgs {
    /// Address of the session API.
    #[arg(long, default_value = "127.0.0.1:8000")]
    listen: String,
    /// Keep sessions and routes in Redis (redis://, redis+sentinel://, redis+cluster://);
    /// without it they live in this process's memory.
    #[arg(long, value_name = "URL", env = "VNCGATE_REDIS")]
    redis: Option<String>,
    /// Where VMs run.
    #[arg(long, value_enum, default_value = "process")]
    backend: server::BackendKind,
    /// Seconds a VM has to become ready (agent healthy and VNC port a desktop).
    #[arg(long, default_value_t = 60.0, value_name = "SECS")]
    boot_timeout: f64,
    /// The process backend's VNC server, a shell command with {port} (default: the
    /// synthetic desktop, vncgate-loadtest fakevm). '/bin/sleep 600' reproduces a VM whose
    /// VNC server never starts.
    #[arg(long, value_name = "CMD")]
    process_vnc: Option<String>,
    /// Where the backend puts each VM's directory (its overlay, sockets and logs for qemu).
    #[arg(long, value_name = "DIR", default_value = "/tmp/vncgate-process")]
    work_dir: std::path::PathBuf,
    /// The golden directory for --backend qemu: the image and snapshot that
    /// config/golden/build.sh DIR made.
    #[arg(long, value_name = "DIR")]
    golden: Option<std::path::PathBuf>,
    /// The QEMU binary.
    #[arg(long, value_name = "PATH", default_value = "qemu-system-x86_64")]
    qemu: std::path::PathBuf,
    /// This host's name, written into the sessions it places (`host` in the session JSON)
    /// [default: the machine's hostname].
    #[arg(long, value_name = "NAME", env = "VNCGATE_HOST_ID")]
    host_id: Option<String>,
    /// VMs this host runs at most; sessions beyond it wait in `pending` (with their
    /// queue_position) and fail with reason `capacity` after --placement-timeout.
    #[arg(long, value_name = "N")]
    max_vms: Option<usize>,
    /// Seconds a session waits for a VM slot before it fails with reason `capacity`.
    #[arg(long, default_value_t = 60.0, value_name = "SECS")]
    placement_timeout: f64,
    /// With --redis: seconds this host's lease lives unless renewed (every third of it).
    /// When it lapses (the host died, or lost Redis), other controllers mark its sessions
    /// `vm_stopped`/`failed` with reason `host lost` and withdraw their routes.
    #[arg(long, default_value_t = 10.0, value_name = "SECS")]
    lease_ttl: f64,
    /// Viewers per session written into routes [default: the gateway's --max-viewers].
    #[arg(long)]
    max_viewers: Option<u32>,
    #[command(flatten)]
    keys: KeyArgs,
    /// A file holding the admin token (at least 16 characters) that reads credentials
    /// (GET /api/sessions/{id}/credentials); without it, reading is off.
    #[arg(long, value_name = "FILE")]
    admin_token_file: Option<std::path::PathBuf>,
    /// Run the gateway in this process on ADDR, fed by the in-memory store: the embedded
    /// default, one command, no Redis (not with --redis).
    #[arg(long, value_name = "ADDR")]
    gateway_listen: Option<String>,
    /// Admin listener: /healthz, /readyz (the store answers), /metrics.
    #[arg(long, value_name = "ADDR")]
    admin: Option<String>,
    /// Largest credentials body, in bytes; above it, 413.
    #[arg(long, default_value_t = 64 * 1024)]
    max_credentials_bytes: usize,
    /// Log format.
    #[arg(long, value_enum, default_value = "text")]
    log_format: LogFormat,
    #[command(flatten)]
    firecracker: FirecrackerArgs,
}

/// The `firecracker` backend (controller/FIRECRACKER.md).
#[derive(clap::Args)]
#[command(next_help_heading = "Firecracker backend (--backend firecracker)")]
struct FirecrackerArgs {
    /// The firecracker binary (v1.12.1: scripts/firecracker-fetch.sh); a bare name is looked
    /// up on PATH.
    #[arg(long, value_name = "PATH", default_value = "firecracker")]
    firecracker: std::path::PathBuf,
    /// Run each VM under this jailer (with --jailer-uid and --jailer-gid).
    #[arg(long, value_name = "PATH")]
    jailer: Option<std::path::PathBuf>,
    /// The user the jailer runs Firecracker as.
    #[arg(long, value_name = "UID")]
    jailer_uid: Option<u32>,
    /// The group the jailer runs Firecracker as.
    #[arg(long, value_name = "GID")]
    jailer_gid: Option<u32>,
    /// The jailer's --chroot-base-dir.
    #[arg(long, value_name = "DIR", default_value = "/srv/jailer")]
    jailer_chroot_base: std::path::PathBuf,
    /// The golden snapshot's VM state file (`golden firecracker-snapshot` writes it).
    #[arg(long, value_name = "FILE")]
    fc_vmstate: Option<std::path::PathBuf>,
    /// The golden snapshot's guest memory file.
    #[arg(long, value_name = "FILE")]
    fc_memory: Option<std::path::PathBuf>,
    /// A file the snapshot opens (its root drive), at the path it was taken with; linked
    /// into each jail. Repeatable.
    #[arg(long = "fc-drive", value_name = "FILE")]
    fc_drives: Vec<std::path::PathBuf>,
    /// The host bridge the VMs' taps join, created when absent [default: vncgatefc0].
    #[arg(long, value_name = "NAME")]
    fc_bridge: Option<String>,
    /// The VMs' subnet: the host is .1, VM n is .n+2, the golden VM the last address
    /// [default: 172.30.0.0/24].
    #[arg(long, value_name = "CIDR")]
    fc_subnet: Option<String>,
    /// A network namespace (ip netns add) for the bridge, the taps and Firecracker.
    #[arg(long, value_name = "NAME")]
    fc_netns: Option<String>,
}

impl FirecrackerArgs {
    fn settings(self) -> server::FirecrackerSettings {
        server::FirecrackerSettings {
            binary: self.firecracker,
            jailer: self.jailer,
            jailer_uid: self.jailer_uid,
            jailer_gid: self.jailer_gid,
            jailer_chroot_base: self.jailer_chroot_base,
            vmstate: self.fc_vmstate,
            memory: self.fc_memory,
            drives: self.fc_drives,
            bridge: self.fc_bridge,
            subnet: self.fc_subnet,
            netns: self.fc_netns,
        }
    }
}

/// The credentials store's keys.
#[derive(clap::Args)]
struct KeyArgs {
    /// A key-encryption key, ID=FILE with 64 hex digits in the file (openssl rand -hex 32);
    /// repeatable: all are read, the last given seals. Without one, an ephemeral key.
    #[arg(long = "credentials-key", value_name = "ID=FILE")]
    credentials_keys: Vec<String>,
}

#[derive(Clone, Copy, ValueEnum)]
enum LogFormat {
    Text,
    Json,
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
        #[command(flatten)]
        depth: DepthArgs,
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
        #[command(flatten)]
        depth: DepthArgs,
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
    /// The credentials store's keys.
    #[command(subcommand)]
    Keys(KeysCmd),
    /// Print the API's OpenAPI 3 document (committed as controller/openapi.json).
    Openapi,
    /// The golden snapshot of the qemu (and firecracker) backend.
    #[command(subcommand)]
    Golden(GoldenCmd),
}

#[derive(Subcommand)]
enum GoldenCmd {
    /// Boot the golden image in DIR once and save the golden snapshot into DIR/snapshot, only
    /// when the guest's VNC port completes an RFB handshake to ServerInit and its agent
    /// answers HTTP; otherwise refuse, naming the port, and exit 1.
    Snapshot {
        /// The golden directory (golden.json and the image, from config/golden/build.sh).
        dir: std::path::PathBuf,
        /// The QEMU binary.
        #[arg(long, value_name = "PATH", default_value = "qemu-system-x86_64")]
        qemu: std::path::PathBuf,
        /// Memory per VM in MiB [default: the image's]; every restore uses the snapshot's.
        #[arg(long)]
        memory_mib: Option<u32>,
        /// vCPUs per VM [default: the image's].
        #[arg(long)]
        vcpus: Option<u32>,
        /// QEMU's CPU model [default: host under KVM, qemu64 under TCG].
        #[arg(long)]
        cpu: Option<String>,
        /// Seconds the cold boot has to reach a desktop.
        #[arg(long, default_value_t = 180.0, value_name = "SECS")]
        boot_timeout: f64,
        /// Extra kernel arguments for this boot (e.g. systemd.mask=vncgate-vnc.service).
        #[arg(long, value_name = "ARGS")]
        extra_cmdline: Option<String>,
        /// Save even though the VNC port never answers: a snapshot like the one that broke
        /// production, for testing that sessions from it fail by name. Recorded in
        /// snapshot.json (vnc_checked: false) and warned about by every controller using it.
        #[arg(long)]
        allow_missing_vnc: bool,
    },
    /// Boot a Firecracker golden VM cold (an uncompressed kernel, a raw ext4 rootfs whose
    /// agent runs with --vm-data-mmds) and save its snapshot to --fc-vmstate and --fc-memory,
    /// only when its agent answers HTTP and its VNC port completes an RFB handshake to
    /// ServerInit; otherwise refuse, naming the port, and exit 1. Give `--backend
    /// firecracker` the same --fc-* flags (and --fc-drive ROOTFS).
    FirecrackerSnapshot {
        /// The guest kernel, an uncompressed ELF (vmlinux).
        #[arg(long, value_name = "FILE")]
        kernel: std::path::PathBuf,
        /// The root filesystem image (raw ext4), attached read-only; every clone opens it at
        /// this path.
        #[arg(long, value_name = "FILE")]
        rootfs: Option<std::path::PathBuf>,
        /// The kernel command line; the golden address (ip=...) is appended, and
        /// Firecracker adds root=/dev/vda ro for the rootfs.
        #[arg(long, value_name = "ARGS", default_value = fc::ColdBoot::DEFAULT_BOOT_ARGS)]
        boot_args: String,
        /// vCPUs of the golden VM (every clone has the snapshot's).
        #[arg(long, default_value_t = 2)]
        vcpus: u8,
        /// Memory of the golden VM in MiB (every clone has the snapshot's).
        #[arg(long, default_value_t = 1024)]
        memory_mib: u32,
        /// Seconds the cold boot has to reach a desktop.
        #[arg(long, default_value_t = 180.0, value_name = "SECS")]
        boot_timeout: f64,
        /// Save even though the VNC port never answers (for tests of a broken image).
        #[arg(long)]
        allow_missing_vnc: bool,
        /// Where the golden VM's directory (console, log, socket) goes while it runs.
        #[arg(long, value_name = "DIR", default_value = "/tmp/vncgate-process")]
        work_dir: std::path::PathBuf,
        #[command(flatten)]
        firecracker: Box<FirecrackerArgs>,
    },
}

/// How far the probe goes.
#[derive(clap::Args)]
struct DepthArgs {
    /// Go on through the RFB handshake to ServerInit: ready means a non-empty framebuffer,
    /// not just a banner (security None, or VNC authentication with --vnc-password-file).
    #[arg(long)]
    desktop: bool,
    /// The VNC password (first line of the file), for --desktop against a server that asks
    /// for VNC authentication.
    #[arg(long, value_name = "FILE", requires = "desktop")]
    vnc_password_file: Option<std::path::PathBuf>,
}

impl DepthArgs {
    fn depth(&self) -> Result<probe::Depth, String> {
        if !self.desktop {
            return Ok(probe::Depth::Banner);
        }
        let password = match &self.vnc_password_file {
            None => None,
            Some(p) => {
                let text = std::fs::read_to_string(p)
                    .map_err(|e| format!("--vnc-password-file {}: {e}", p.display()))?;
                Some(text.lines().next().unwrap_or_default().as_bytes().to_vec())
            }
        };
        Ok(probe::Depth::Desktop { password })
    }
}

#[derive(Subcommand)]
enum KeysCmd {
    /// Move every stored credentials record to the newest key (the last --credentials-key);
    /// only data keys are re-sealed, credentials are never decrypted. The old key can be
    /// dropped afterwards.
    Rewrap {
        #[arg(long, env = "VNCGATE_REDIS")]
        redis: String,
        #[command(flatten)]
        keys: KeyArgs,
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

/// Logs to stderr, filtered by `VNCGATE_LOG` (default `info`).
fn log_to_stderr(format: LogFormat) {
    let filter = tracing_subscriber::EnvFilter::try_from_env("VNCGATE_LOG")
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    let b = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    match format {
        LogFormat::Text => b.init(),
        LogFormat::Json => b.json().init(),
    }
}

/// A flag's seconds as a duration, or the error naming the flag.
fn secs(flag: &str, v: f64) -> Result<Duration, String> {
    Duration::try_from_secs_f64(v).map_err(|_| format!("{flag}: {v} is not a number of seconds"))
}

/// A current-thread runtime for a subcommand.
fn runtime() -> Result<tokio::runtime::Runtime, String> {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(|e| format!("cannot start a runtime: {e}"))
}

fn serve(a: ServeArgs) -> ExitCode {
    log_to_stderr(a.log_format);
    let boot_timeout = match secs("--boot-timeout", a.boot_timeout) {
        Ok(d) => d,
        Err(e) => return fail(e),
    };
    let placement_timeout = match secs("--placement-timeout", a.placement_timeout) {
        Ok(d) => d,
        Err(e) => return fail(e),
    };
    let lease_ttl = match secs("--lease-ttl", a.lease_ttl) {
        Ok(d) if d >= Duration::from_millis(300) => d,
        Ok(_) => {
            return fail(
                "--lease-ttl must be at least 0.3 s (renewals go every third of it)".into(),
            );
        }
        Err(e) => return fail(e),
    };
    let host_id = match a.host_id.clone().map_or_else(server::default_host_id, Ok) {
        Ok(h) => h,
        Err(e) => return fail(e),
    };
    if let Err(e) = server::check_host_id(&host_id) {
        return fail(e);
    }
    if a.max_vms == Some(0) {
        return fail(
            "--max-vms 0 would run no VM at all; give at least 1, or leave it out for no limit"
                .into(),
        );
    }
    let settings = server::Settings {
        listen: a.listen,
        redis: a.redis,
        backend: a.backend,
        boot_timeout,
        process_vnc: a.process_vnc,
        work_dir: a.work_dir,
        max_viewers: a.max_viewers,
        credentials_keys: a.keys.credentials_keys,
        admin_token_file: a.admin_token_file,
        max_credentials_bytes: a.max_credentials_bytes,
        admin: a.admin,
        gateway_listen: a.gateway_listen,
        golden: a.golden,
        qemu: a.qemu,
        max_vms: a.max_vms,
        placement_timeout,
        lease_ttl,
        host_id,
        firecracker: a.firecracker.settings(),
    };
    let rt = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => return fail(format!("cannot start a runtime: {e}")),
    };
    match rt.block_on(server::run(settings)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => fail(e),
    }
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let Some(cmd) = cli.cmd else {
        return serve(cli.serve);
    };
    match cmd {
        Cmd::Probe {
            vnc,
            timeout_ms,
            depth,
            json,
        } => {
            let depth = match depth.depth() {
                Ok(d) => d,
                Err(e) => return fail(e),
            };
            let started = Instant::now();
            let outcome = probe::probe_to(&vnc, Duration::from_millis(timeout_ms), &depth);
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
            depth,
            json,
        } => {
            let depth = match depth.depth() {
                Ok(d) => d,
                Err(e) => return fail(e),
            };
            let url = match redis_url(&redis) {
                Ok(u) => u,
                Err(e) => return fail(e),
            };
            let wait = match secs("--wait", wait) {
                Ok(d) => d,
                Err(e) => return fail(e),
            };
            let p = Publish {
                session: session.clone(),
                vnc: vnc.clone(),
                token,
                ttl: ttl.map(Duration::from_secs),
                max_viewers,
                wait,
                probe_timeout: Duration::from_secs(2),
                depth,
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
        Cmd::Golden(GoldenCmd::Snapshot {
            dir,
            qemu,
            memory_mib,
            vcpus,
            cpu,
            boot_timeout,
            extra_cmdline,
            allow_missing_vnc,
        }) => {
            log_to_stderr(LogFormat::Text);
            let boot_timeout = match secs("--boot-timeout", boot_timeout) {
                Ok(d) => d,
                Err(e) => return fail(e),
            };
            let golden = match golden::Golden::open(&dir) {
                Ok(g) => g,
                Err(e) => return fail(e),
            };
            let opts = golden::snapshot::Options {
                qemu,
                memory_mib,
                vcpus,
                cpu,
                boot_timeout,
                extra_cmdline,
                allow_missing_vnc,
            };
            let rt = match runtime() {
                Ok(rt) => rt,
                Err(e) => return fail(e),
            };
            match rt.block_on(golden::snapshot::snapshot(&golden, &opts)) {
                Ok(s) => {
                    println!(
                        "golden snapshot saved in {}: boot to desktop {:.1} s, save {:.1} s, {:?} cpu {}, {} MiB, {} vCPU{}",
                        golden.snapshot_dir().display(),
                        s.boot_ms as f64 / 1000.0,
                        s.save_ms as f64 / 1000.0,
                        s.machine.accel,
                        s.machine.cpu,
                        s.machine.memory_mib,
                        s.machine.vcpus,
                        if s.vnc_checked {
                            ""
                        } else {
                            " (VNC NOT CHECKED: --allow-missing-vnc)"
                        }
                    );
                    ExitCode::SUCCESS
                }
                Err(e) => {
                    eprintln!("vncgate-controller: golden snapshot: {e}");
                    ExitCode::FAILURE
                }
            }
        }
        Cmd::Golden(GoldenCmd::FirecrackerSnapshot {
            kernel,
            rootfs,
            boot_args,
            vcpus,
            memory_mib,
            boot_timeout,
            allow_missing_vnc,
            work_dir,
            firecracker,
        }) => {
            log_to_stderr(LogFormat::Text);
            let boot_timeout = match secs("--boot-timeout", boot_timeout) {
                Ok(d) => d,
                Err(e) => return fail(e),
            };
            let mut settings = (*firecracker).settings();
            // The clones open the rootfs at this path: it is one of the snapshot's files.
            settings.drives.extend(rootfs.clone());
            let mut cfg = match settings.config(&work_dir) {
                Ok(c) => c,
                Err(e) => {
                    return fail(e.replace(
                        "--backend firecracker needs",
                        "golden firecracker-snapshot needs",
                    ));
                }
            };
            cfg.cold_boot = Some(fc::ColdBoot {
                kernel,
                rootfs,
                boot_args,
            });
            (cfg.vcpus, cfg.memory_mib) = (vcpus, memory_mib);
            let rt = match runtime() {
                Ok(rt) => rt,
                Err(e) => return fail(e),
            };
            match rt.block_on(fc::golden::snapshot(cfg, boot_timeout, allow_missing_vnc)) {
                Ok(m) => {
                    println!(
                        "golden snapshot saved: {} and {}: boot to desktop {:.1} s, save {:.1} s, {memory_mib} MiB, {vcpus} vCPU{}",
                        m.vmstate.display(),
                        m.memory.display(),
                        m.boot_ms as f64 / 1000.0,
                        m.save_ms as f64 / 1000.0,
                        if m.vnc_checked {
                            ""
                        } else {
                            " (VNC NOT CHECKED: --allow-missing-vnc)"
                        }
                    );
                    ExitCode::SUCCESS
                }
                Err(e) => {
                    eprintln!("vncgate-controller: golden firecracker-snapshot: {e}");
                    ExitCode::FAILURE
                }
            }
        }
        Cmd::Openapi => {
            println!("{}", vncgate_controller::api::openapi_json());
            ExitCode::SUCCESS
        }
        Cmd::Keys(KeysCmd::Rewrap { redis, keys }) => {
            let rt = match runtime() {
                Ok(rt) => rt,
                Err(e) => return fail(e),
            };
            match rt.block_on(server::rewrap(&redis, &keys.credentials_keys)) {
                Ok((moved, current)) => {
                    println!("rewrapped {moved} records; {current} already under the newest key");
                    ExitCode::SUCCESS
                }
                Err(e) => fail(e),
            }
        }
    }
}
