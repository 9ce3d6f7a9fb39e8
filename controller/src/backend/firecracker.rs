//! The `firecracker` backend: each VM is a Firecracker process that loads the golden
//! snapshot (a paused VM whose desktop and agent were already up), with its own tap on the
//! host's bridge. See `controller/FIRECRACKER.md` for the whole picture and what was
//! verified against which Firecracker.
//!
//! A VM's life, and why in this order:
//!
//! 1. [`Backend::start`] claims a slot (`work_dir/<n>/`, created with `mkdir`, so two starts
//!    never share one), makes tap `<tap_prefix><n>` on the bridge, runs Firecracker (under
//!    the jailer, or in a network namespace, when configured) with `--api-sock`, and
//!    `PUT /snapshot/load`s the golden snapshot with `network_overrides` pointing the
//!    snapshot's interface at this tap and `resume_vm: false`. The VM stays **paused**.
//! 2. [`Backend::push_data`] `PUT /mmds`s the per-VM data (`{"vncgate": VmData, "network":
//!    GuestNet}`) and only then resumes the VM (`PATCH /vm {"state": "Resumed"}`): the guest's
//!    first instruction after the restore runs with its data already in MMDS, so the agent
//!    never sees a VM without it, and never needs to tell "not yet" from "never".
//! 3. [`Backend::stop`] sends Ctrl-Alt-Del to a running guest (a Linux guest booted with
//!    `reboot=k` then ends Firecracker itself), kills what is left after `stop_grace`, and
//!    removes the tap, the jail and the slot directory; each step tolerates what is gone.
//!
//! Every clone wakes with the golden VM's address and MAC. The guest applies `network` from
//! MMDS (address, gateway, MAC) before it serves; the controller reaches it at that address.
//! The handle (`handle.json` in the slot directory, and in the session record) names the
//! process by pid and start time, the socket, the tap and the addresses, so a restarted
//! controller adopts the VM.

pub mod api;
pub mod golden;
pub mod guest;
pub mod http;
pub mod net;

use std::collections::HashSet;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};

pub use api::ApiClient;
pub use net::{GuestNet, Subnet};

use super::host::{Proc, spawn};
use super::{Backend, BackendError, Vm, VmAddrs, VmData};

/// The jailer, when Firecracker runs jailed: chrooted under `chroot_base/firecracker/<id>/root`
/// as `uid:gid`, the golden snapshot's files hard-linked in at their own absolute paths (so
/// the paths inside the snapshot hold inside the jail too).
#[derive(Debug, Clone)]
pub struct JailerConfig {
    pub binary: PathBuf,
    pub uid: u32,
    pub gid: u32,
    pub chroot_base: PathBuf,
}

/// The golden snapshot every VM is a clone of (`PUT /snapshot/create` of a paused VM:
/// [`FirecrackerBackend::boot_golden`] makes one).
#[derive(Debug, Clone)]
pub struct GoldenSnapshot {
    /// The VM state file (`snapshot_path`).
    pub vmstate: PathBuf,
    /// The guest memory file (`mem_file_path`), mapped private by each clone.
    pub memory: PathBuf,
    /// Other files the snapshot opens (its drives), at the paths it was taken with. Shared
    /// by every clone: make them read-only drives (the guest keeps its writes in memory).
    pub files: Vec<PathBuf>,
}

/// How the golden VM boots cold.
#[derive(Debug, Clone)]
pub struct ColdBoot {
    /// An uncompressed ELF kernel (vmlinux).
    pub kernel: PathBuf,
    /// The root filesystem image, attached read-only as `rootfs`.
    pub rootfs: Option<PathBuf>,
    /// Kernel command line; the golden address (`ip=`) is appended.
    pub boot_args: String,
}

impl ColdBoot {
    /// The command line most Firecracker guests want: serial console, reboot by keyboard
    /// controller (so Ctrl-Alt-Del ends Firecracker), no PCI.
    pub const DEFAULT_BOOT_ARGS: &str = "console=ttyS0 reboot=k panic=1 pci=off";
}

/// How the backend runs its VMs.
#[derive(Debug, Clone)]
pub struct FirecrackerConfig {
    /// The `firecracker` binary (scripts/firecracker-fetch.sh fetches v1.12.1).
    pub firecracker: PathBuf,
    /// Run each VM under the jailer; `None`: as this user, unconfined.
    pub jailer: Option<JailerConfig>,
    pub golden: GoldenSnapshot,
    /// For [`FirecrackerBackend::boot_golden`]; clones never boot.
    pub cold_boot: Option<ColdBoot>,
    /// The golden VM's shape; clones have the snapshot's.
    pub vcpus: u8,
    pub memory_mib: u32,
    /// The host bridge the taps join, created with the host's address when absent.
    pub bridge: String,
    /// The guests' subnet: host `.1`, slot `n` at `.n+2`, the golden VM at the last address.
    pub subnet: Subnet,
    /// A network namespace (`ip netns add`) for the bridge, the taps and Firecracker;
    /// `None`: the host's.
    pub netns: Option<String>,
    /// The snapshot's network interface, which each clone's tap replaces.
    pub iface_id: String,
    /// Taps are `<tap_prefix><slot>`: at most 15 bytes in all (IFNAMSIZ).
    pub tap_prefix: String,
    /// The guest's ports.
    pub vnc_port: u16,
    pub agent_port: u16,
    /// Where each VM's slot directory goes.
    pub work_dir: PathBuf,
    /// How long a running guest has to power off after Ctrl-Alt-Del before it is killed.
    pub stop_grace: Duration,
    /// The limit on one API call; snapshot create and load get four times it.
    pub api_timeout: Duration,
}

impl FirecrackerConfig {
    /// The defaults: 2 vCPUs, 2 GiB, bridge `vncgatefc0` on 172.30.0.0/24, taps
    /// `vncgate-fc-<n>`, VNC on 6080, agent on 8080, unjailed, in the host's namespace.
    pub fn new(firecracker: PathBuf, golden: GoldenSnapshot, work_dir: PathBuf) -> Self {
        Self {
            firecracker,
            jailer: None,
            golden,
            cold_boot: None,
            vcpus: 2,
            memory_mib: 2048,
            bridge: "vncgatefc0".into(),
            subnet: "172.30.0.0/24".parse().expect("a valid subnet"),
            netns: None,
            iface_id: "eth0".into(),
            tap_prefix: "vncgate-fc-".into(),
            vnc_port: 6080,
            agent_port: 8080,
            work_dir,
            stop_grace: Duration::from_secs(3),
            api_timeout: Duration::from_secs(5),
        }
    }
}

pub struct FirecrackerBackend {
    cfg: FirecrackerConfig,
    /// Slots whose start is under way: their directory exists before their handle.json
    /// does, and [`Backend::running`] must not take them for a crash's leftovers.
    starting: Mutex<HashSet<u32>>,
}

/// What a Firecracker VM is persisted as.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
struct Handle {
    session: String,
    slot: u32,
    /// The Firecracker process (the jailer and `ip netns exec` exec into it: one pid).
    proc: Proc,
    #[serde(flatten)]
    place: Place,
    guest: GuestNet,
    addrs: VmAddrs,
}

/// Where a slot's VM lives on the host: everything [`FirecrackerBackend::teardown`] removes.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
struct Place {
    dir: PathBuf,
    /// The host path of the API socket.
    api_socket: PathBuf,
    tap: String,
    netns: Option<String>,
    /// `chroot_base/firecracker/<id>`, when jailed.
    jail: Option<PathBuf>,
}

impl Place {
    /// Firecracker's own log (`--log-path`), apart from the console so neither interleaves
    /// into the other.
    fn log(&self) -> PathBuf {
        match &self.jail {
            Some(jail) => jail.join("root/firecracker.log"),
            None => self.dir.join("firecracker.log"),
        }
    }
}

/// Removes a slot from `starting` when its start ends, however it ends.
struct Starting<'a> {
    set: &'a Mutex<HashSet<u32>>,
    slot: u32,
}

impl Drop for Starting<'_> {
    fn drop(&mut self) {
        self.set.lock().expect("not poisoned").remove(&self.slot);
    }
}

fn bad_handle(e: serde_json::Error) -> BackendError {
    BackendError(format!("not a firecracker VM handle: {e}"))
}

/// The last lines of a log, for an error that says why Firecracker gave up.
fn log_tail(path: &Path) -> String {
    let text = std::fs::read_to_string(path).unwrap_or_default();
    let lines: Vec<&str> = text.lines().rev().take(5).collect();
    lines.into_iter().rev().collect::<Vec<_>>().join(" | ")
}

/// Links `file` into `root` at its own absolute path; a copy when on another filesystem.
fn link_into(root: &Path, file: &Path) -> Result<(), BackendError> {
    let abs =
        std::path::absolute(file).map_err(|e| BackendError(format!("{}: {e}", file.display())))?;
    let inside = root.join(abs.strip_prefix("/").expect("an absolute path"));
    if let Some(parent) = inside.parent() {
        std::fs::create_dir_all(parent)
            .map_err(|e| BackendError(format!("{}: {e}", parent.display())))?;
    }
    std::fs::hard_link(&abs, &inside)
        .or_else(|_| std::fs::copy(&abs, &inside).map(drop))
        .map_err(|e| {
            BackendError(format!(
                "cannot put {} into the jail at {}: {e}",
                abs.display(),
                inside.display()
            ))
        })
}

/// The controller's URL as a guest reaches it: a controller on every address
/// (`--listen 0.0.0.0:PORT`, whose URL says `0.0.0.0`) is the bridge's host address to its
/// guests. Any other URL is kept as it is (a loopback one is unreachable from a guest, which
/// `vncgate-controller` warns about at start).
pub fn guest_controller_url(url: &str, host: std::net::Ipv4Addr) -> String {
    for any in ["0.0.0.0", "[::]"] {
        for scheme in ["http://", "https://"] {
            if let Some(rest) = url.strip_prefix(&format!("{scheme}{any}"))
                && (rest.is_empty() || rest.starts_with(':') || rest.starts_with('/'))
            {
                return format!("{scheme}{host}{rest}");
            }
        }
    }
    url.to_owned()
}

/// Polls `done` every 10 ms until it holds or `limit` passes; whether it held.
async fn wait_until(limit: Duration, mut done: impl FnMut() -> bool) -> bool {
    let deadline = Instant::now() + limit;
    loop {
        if done() {
            return true;
        }
        if Instant::now() >= deadline {
            return false;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

impl FirecrackerBackend {
    /// Checks the binaries, makes the work directory and the bridge.
    pub fn new(cfg: FirecrackerConfig) -> Result<Self, String> {
        if !cfg.firecracker.is_file() {
            return Err(format!(
                "the firecracker backend needs the firecracker binary at {} (scripts/firecracker-fetch.sh fetches it)",
                cfg.firecracker.display()
            ));
        }
        if let Some(j) = &cfg.jailer
            && !j.binary.is_file()
        {
            return Err(format!("no jailer binary at {}", j.binary.display()));
        }
        let widest = format!("{}{}", cfg.tap_prefix, cfg.subnet.slots() - 1);
        if widest.len() > 15 {
            return Err(format!(
                "tap names like {widest} are longer than Linux's 15 bytes: shorten the tap prefix"
            ));
        }
        std::fs::create_dir_all(&cfg.work_dir)
            .map_err(|e| format!("work directory {}: {e}", cfg.work_dir.display()))?;
        net::ensure_bridge(cfg.netns.as_deref(), &cfg.bridge, &cfg.subnet)
            .map_err(|e| format!("the bridge {}: {e}", cfg.bridge))?;
        Ok(Self {
            cfg,
            starting: Mutex::new(HashSet::new()),
        })
    }

    pub fn config(&self) -> &FirecrackerConfig {
        &self.cfg
    }

    fn api(&self, socket: &Path) -> ApiClient {
        ApiClient::new(socket, self.cfg.api_timeout)
    }

    fn guest_net(&self, ip: std::net::Ipv4Addr) -> GuestNet {
        GuestNet {
            ip,
            prefix: self.cfg.subnet.prefix,
            gateway: self.cfg.subnet.host(),
            mac: net::mac_for(ip),
        }
    }

    /// Claims the lowest free slot by creating its directory.
    fn claim_slot(&self) -> Result<Starting<'_>, BackendError> {
        let mut starting = self.starting.lock().expect("not poisoned");
        for slot in 0..self.cfg.subnet.slots() {
            if starting.contains(&slot) {
                continue;
            }
            match std::fs::create_dir(self.cfg.work_dir.join(slot.to_string())) {
                Ok(()) => {
                    starting.insert(slot);
                    return Ok(Starting {
                        set: &self.starting,
                        slot,
                    });
                }
                Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => continue,
                Err(e) => {
                    return Err(BackendError(format!(
                        "cannot make a VM directory in {}: {e}",
                        self.cfg.work_dir.display()
                    )));
                }
            }
        }
        Err(BackendError(format!(
            "all {} VM slots of {} are taken",
            self.cfg.subnet.slots(),
            self.cfg.subnet
        )))
    }

    /// The Firecracker id, paths and tap of a slot (`name`: `g` for the golden VM, which is
    /// never jailed: it writes the snapshot at the host's paths).
    fn place(&self, name: &str, jailed: bool) -> (String, Place) {
        let id = format!("vncgate-fc-{name}");
        let dir = self.cfg.work_dir.join(name);
        let tap = format!("{}{name}", self.cfg.tap_prefix);
        let netns = self.cfg.netns.clone();
        let jail = self.cfg.jailer.as_ref().filter(|_| jailed).map(|j| {
            let exec_name = self
                .cfg
                .firecracker
                .file_name()
                .map(|n| n.to_string_lossy().into_owned())
                .unwrap_or_else(|| "firecracker".into());
            j.chroot_base.join(exec_name).join(&id)
        });
        let api_socket = match &jail {
            None => dir.join("firecracker.socket"),
            Some(jail) => jail.join("root/run/firecracker.socket"),
        };
        let place = Place {
            dir,
            api_socket,
            tap,
            netns,
            jail,
        };
        (id, place)
    }

    /// Makes the tap, starts Firecracker and waits for its API.
    /// `files` are linked into the jail, when `place` has one.
    async fn launch(&self, id: &str, place: &Place, files: &[&Path]) -> Result<Proc, BackendError> {
        let jailer = self.cfg.jailer.as_ref().filter(|_| place.jail.is_some());
        let owner = jailer.map(|j| (j.uid, j.gid));
        net::add_tap(place.netns.as_deref(), &place.tap, &self.cfg.bridge, owner)?;
        let fc = self.cfg.firecracker.display().to_string();
        let (program, args): (PathBuf, Vec<String>) = match (jailer, &place.jail) {
            (Some(j), Some(jail)) => {
                // A stale jail (a crash) would make the jailer's mknod fail.
                let _ = std::fs::remove_dir_all(jail);
                let root = jail.join("root");
                std::fs::create_dir_all(root.join("run"))
                    .map_err(|e| BackendError(format!("jail {}: {e}", root.display())))?;
                for f in files {
                    link_into(&root, f)?;
                }
                // Firecracker opens its log after the jailer dropped to uid:gid.
                let log = root.join("firecracker.log");
                std::fs::write(&log, b"")
                    .and_then(|()| std::os::unix::fs::chown(&log, Some(j.uid), Some(j.gid)))
                    .map_err(|e| BackendError(format!("{}: {e}", log.display())))?;
                let mut args = vec![
                    "--id".into(),
                    id.into(),
                    "--exec-file".into(),
                    fc,
                    "--uid".into(),
                    j.uid.to_string(),
                    "--gid".into(),
                    j.gid.to_string(),
                    "--chroot-base-dir".into(),
                    j.chroot_base.display().to_string(),
                ];
                if let Some(ns) = &place.netns {
                    args.extend(["--netns".into(), format!("/var/run/netns/{ns}")]);
                }
                args.extend([
                    "--".into(),
                    "--api-sock".into(),
                    "/run/firecracker.socket".into(),
                    "--log-path".into(),
                    "/firecracker.log".into(),
                ]);
                (j.binary.clone(), args)
            }
            _ => {
                let _ = std::fs::remove_file(&place.api_socket);
                std::fs::write(place.log(), b"")
                    .map_err(|e| BackendError(format!("{}: {e}", place.log().display())))?;
                let fc_args = [
                    fc,
                    "--api-sock".into(),
                    place.api_socket.display().to_string(),
                    "--id".into(),
                    id.into(),
                    "--log-path".into(),
                    place.log().display().to_string(),
                ];
                match &place.netns {
                    // `ip netns exec` execs Firecracker: the pid stays the same.
                    Some(ns) => (
                        PathBuf::from("ip"),
                        ["netns".into(), "exec".into(), ns.clone()]
                            .into_iter()
                            .chain(fc_args)
                            .collect(),
                    ),
                    None => (
                        self.cfg.firecracker.clone(),
                        fc_args.into_iter().skip(1).collect(),
                    ),
                }
            }
        };
        // The guest's serial console is Firecracker's stdout: `console.log`.
        let proc = spawn(&place.dir, "console", &program, &args)?;
        let api = self
            .api(&place.api_socket)
            .with_timeout(Duration::from_millis(500));
        let deadline = Instant::now() + Duration::from_secs(5);
        loop {
            if place.api_socket.exists() && api.describe().await.is_ok() {
                return Ok(proc);
            }
            let log = place.log();
            if !proc.alive() {
                return Err(BackendError(format!(
                    "firecracker exited before its API came up: {}",
                    log_tail(&log)
                )));
            }
            if Instant::now() >= deadline {
                proc.signal(rustix::process::Signal::KILL);
                return Err(BackendError(format!(
                    "firecracker's API socket {} did not answer in 5 s: {}",
                    place.api_socket.display(),
                    log_tail(&log)
                )));
            }
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    }

    /// Ends the process (Ctrl-Alt-Del to a running guest first) and removes the tap, the
    /// jail and the directory.
    async fn teardown(&self, proc: Option<Proc>, place: &Place) -> Result<(), BackendError> {
        if let Some(p) = proc.filter(Proc::alive) {
            let api = self
                .api(&place.api_socket)
                .with_timeout(Duration::from_secs(1));
            let running = api.describe().await.is_ok_and(|i| i.state == "Running");
            if running && api.send_ctrl_alt_del().await.is_ok() {
                wait_until(self.cfg.stop_grace, || !p.alive()).await;
            }
            p.signal(rustix::process::Signal::KILL);
            if !wait_until(Duration::from_secs(5), || !p.alive()).await {
                return Err(BackendError(format!(
                    "firecracker (pid {}) still runs 5 s after SIGKILL",
                    p.pid
                )));
            }
        }
        let tap = net::delete_link(place.netns.as_deref(), &place.tap);
        if let Some(jail) = &place.jail {
            let _ = std::fs::remove_dir_all(jail);
        }
        let _ = std::fs::remove_dir_all(&place.dir);
        tap
    }

    async fn start_in(
        &self,
        session: &str,
        slot: u32,
    ) -> Result<Handle, (BackendError, Option<Proc>)> {
        let (id, place) = self.place(&slot.to_string(), true);
        let ip = self
            .cfg
            .subnet
            .guest(slot)
            .expect("claim_slot stays within the subnet");
        let g = &self.cfg.golden;
        let mut files = vec![g.vmstate.as_path(), g.memory.as_path()];
        files.extend(g.files.iter().map(PathBuf::as_path));
        let proc = self
            .launch(&id, &place, &files)
            .await
            .map_err(|e| (e, None))?;
        self.api(&place.api_socket)
            .with_timeout(self.cfg.api_timeout * 4)
            .snapshot_load(&g.vmstate, &g.memory, &[(&self.cfg.iface_id, &place.tap)])
            .await
            .map_err(|e| (e, Some(proc)))?;
        Ok(Handle {
            session: session.into(),
            slot,
            proc,
            place,
            guest: self.guest_net(ip),
            addrs: VmAddrs {
                agent: SocketAddr::from((ip, self.cfg.agent_port)),
                vnc: SocketAddr::from((ip, self.cfg.vnc_port)),
            },
        })
    }

    /// Boots the golden VM cold (kernel and rootfs of `cold_boot`, at the subnet's golden
    /// address, MMDS on its interface) and returns it running; the caller waits for what it
    /// calls ready (its agent answering, a line on the console) and then calls
    /// [`GoldenBoot::snapshot`].
    pub async fn boot_golden(&self) -> Result<GoldenBoot<'_>, BackendError> {
        let cold = self.cfg.cold_boot.as_ref().ok_or_else(|| {
            BackendError("no cold boot configured (kernel, rootfs) for the golden VM".into())
        })?;
        let (id, place) = self.place("g", false);
        let _ = std::fs::remove_dir_all(&place.dir);
        std::fs::create_dir_all(&place.dir)
            .map_err(|e| BackendError(format!("{}: {e}", place.dir.display())))?;
        let proc = match self.launch(&id, &place, &[]).await {
            Ok(p) => p,
            Err(e) => {
                let _ = self.teardown(None, &place).await;
                return Err(e);
            }
        };
        let golden = GoldenBoot {
            backend: self,
            api: self.api(&place.api_socket),
            console: place.dir.join("console.log"),
            proc: Some(proc),
            place,
        };
        let s = &self.cfg.subnet;
        let boot_args = format!(
            "{} ip={}::{}:{}::{}:off",
            cold.boot_args,
            s.golden(),
            s.host(),
            s.netmask(),
            self.cfg.iface_id
        );
        let api = &golden.api;
        api.machine_config(self.cfg.vcpus, self.cfg.memory_mib)
            .await?;
        api.boot_source(&cold.kernel, &boot_args).await?;
        if let Some(rootfs) = &cold.rootfs {
            api.drive("rootfs", rootfs, true, true).await?;
        }
        api.network_interface(&api::NetworkInterface {
            iface_id: &self.cfg.iface_id,
            host_dev_name: &golden.place.tap,
            guest_mac: &net::mac_for(s.golden()),
        })
        .await?;
        api.mmds_config(&[&self.cfg.iface_id]).await?;
        api.instance_start().await?;
        Ok(golden)
    }
}

/// The golden VM between its cold boot and its snapshot. Dropped without
/// [`GoldenBoot::snapshot`], it is killed and its tap and directory removed.
pub struct GoldenBoot<'a> {
    backend: &'a FirecrackerBackend,
    pub api: ApiClient,
    /// The guest's serial console (Firecracker's own log is `firecracker.log` beside it).
    pub console: PathBuf,
    proc: Option<Proc>,
    place: Place,
}

impl GoldenBoot<'_> {
    /// Pauses the VM, writes the full snapshot to the configured golden paths, and ends it.
    pub async fn snapshot(mut self) -> Result<(), BackendError> {
        let g = &self.backend.cfg.golden;
        let result = async {
            self.api.pause().await?;
            self.api
                .with_timeout(self.backend.cfg.api_timeout * 4)
                .snapshot_create(&g.vmstate, &g.memory)
                .await
        }
        .await;
        let proc = self.proc.take();
        let down = self.backend.teardown(proc, &self.place).await;
        result.and(down)
    }
}

impl Drop for GoldenBoot<'_> {
    fn drop(&mut self) {
        if let Some(p) = self.proc.take() {
            p.signal(rustix::process::Signal::KILL);
            let _ = net::delete_link(self.place.netns.as_deref(), &self.place.tap);
            let _ = std::fs::remove_dir_all(&self.place.dir);
        }
    }
}

impl Backend for FirecrackerBackend {
    fn name(&self) -> &'static str {
        "firecracker"
    }

    fn clones(&self) -> bool {
        true
    }

    async fn start(&self, session: &str) -> Result<Vm, BackendError> {
        let g = &self.cfg.golden;
        for f in [&g.vmstate, &g.memory] {
            if !f.is_file() {
                return Err(BackendError(format!(
                    "no golden snapshot file at {}",
                    f.display()
                )));
            }
        }
        let claim = self.claim_slot()?;
        let handle = match self.start_in(session, claim.slot).await {
            Ok(h) => h,
            Err((e, proc)) => {
                let (_, place) = self.place(&claim.slot.to_string(), true);
                if let Err(t) = self.teardown(proc, &place).await {
                    tracing::warn!(session, error = %t, "cleaning up after a failed start");
                }
                return Err(e);
            }
        };
        let value = serde_json::to_value(&handle).expect("a handle serializes");
        // Beside the VM too, so a controller that lost the session record finds the orphan.
        if let Err(e) = std::fs::write(handle.place.dir.join("handle.json"), value.to_string()) {
            tracing::warn!(session, error = %e, "cannot write the VM's handle.json");
        }
        drop(claim);
        Ok(Vm {
            addrs: handle.addrs,
            handle: value,
            vnc_password: None,
            guest_vnc_port: None,
        })
    }

    async fn push_data(&self, vm: &Vm, data: &VmData) -> Result<(), BackendError> {
        let h: Handle = serde_json::from_value(vm.handle.clone()).map_err(bad_handle)?;
        let api = self.api(&h.place.api_socket);
        let mut data = data.clone();
        data.controller_url = guest_controller_url(&data.controller_url, h.guest.gateway);
        let mmds = serde_json::json!({ "vncgate": data, "network": h.guest });
        api.put_mmds(&mmds).await?;
        // Resumed only now, so the guest's first instruction finds its data in MMDS.
        if api.describe().await?.state == "Paused" {
            api.resume().await?;
        }
        Ok(())
    }

    async fn alive(&self, vm: &Vm) -> bool {
        let Ok(h) = serde_json::from_value::<Handle>(vm.handle.clone()) else {
            return false;
        };
        h.proc.alive()
            && self
                .api(&h.place.api_socket)
                .with_timeout(Duration::from_secs(1))
                .describe()
                .await
                .is_ok()
    }

    async fn stop(&self, vm: &Vm) -> Result<(), BackendError> {
        let h: Handle = serde_json::from_value(vm.handle.clone()).map_err(bad_handle)?;
        self.teardown(Some(h.proc), &h.place).await
    }

    async fn adopt(&self, handle: &serde_json::Value) -> Option<Vm> {
        let h: Handle = serde_json::from_value(handle.clone()).ok()?;
        h.proc.alive().then(|| Vm {
            addrs: h.addrs,
            handle: handle.clone(),
            vnc_password: None,
            guest_vnc_port: None,
        })
    }

    /// The VMs in the work directory that still run. A slot whose VM is gone (it crashed,
    /// or the controller died mid-start) is cleaned up here, so its address is free again.
    async fn running(&self) -> Vec<Vm> {
        let mut out = Vec::new();
        let Ok(dirs) = std::fs::read_dir(&self.cfg.work_dir) else {
            return out;
        };
        for d in dirs.flatten() {
            let Some(slot) = d.file_name().to_str().and_then(|n| n.parse::<u32>().ok()) else {
                continue;
            };
            if self.starting.lock().expect("not poisoned").contains(&slot) {
                continue;
            }
            let handle = std::fs::read_to_string(d.path().join("handle.json"))
                .ok()
                .and_then(|t| serde_json::from_str::<serde_json::Value>(&t).ok());
            if let Some(handle) = &handle
                && let Some(vm) = self.adopt(handle).await
            {
                out.push(vm);
                continue;
            }
            let place = match handle.and_then(|v| serde_json::from_value::<Handle>(v).ok()) {
                Some(h) => h.place,
                None => self.place(&slot.to_string(), true).1,
            };
            tracing::info!(slot, dir = %place.dir.display(), "removing a dead firecracker VM's leftovers");
            if let Err(e) = self.teardown(None, &place).await {
                tracing::warn!(slot, error = %e, "cannot remove a dead VM's tap");
            }
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_controller_on_every_address_is_the_bridge_host_to_its_guests() {
        let host = std::net::Ipv4Addr::new(172, 30, 0, 1);
        assert_eq!(
            guest_controller_url("http://0.0.0.0:8000", host),
            "http://172.30.0.1:8000"
        );
        assert_eq!(
            guest_controller_url("https://[::]:8443/x", host),
            "https://172.30.0.1:8443/x"
        );
        for kept in [
            "http://127.0.0.1:8000",
            "http://0.0.0.0.example:80",
            "https://ctl.example",
        ] {
            assert_eq!(guest_controller_url(kept, host), kept);
        }
    }
}
