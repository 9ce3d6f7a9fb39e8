//! The `qemu` backend: a real VM per session, restored from the golden snapshot.
//!
//! The golden directory (`config/golden/build.sh DIR`) holds the image (`golden.json`: kernel,
//! initrd, root filesystem, command line) and, under `snapshot/`, the golden snapshot that
//! [`snapshot::snapshot`] took of it: the VM booted once until its VNC server completed an RFB
//! handshake and its agent answered, then saved by migration to a file (`state`) with its
//! disk frozen as an overlay (`disk.qcow2`, backed by the image). Each session's VM is that
//! snapshot restored (`-incoming`) on its own copy-on-write overlay of the frozen disk, with
//! its two guest ports forwarded to free loopback ports (QEMU user networking: nothing of the
//! VM is reachable from anywhere but this host's loopback) and a virtio-serial channel on
//! which the controller pushes the per-VM data and reads back the agent's identity report.
//!
//! The device layout is [`Layout::args`], one function for the golden boot and every
//! restore: migration requires the same devices on both sides. KVM is used when the host has
//! hardware virtualization, TCG otherwise; the snapshot records which, and restores use it.

pub mod qmp;
pub mod snapshot;

use std::net::{Ipv4Addr, SocketAddr};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};

use super::host::{Proc, free_port, running_in, spawn};
use super::{Backend, BackendError, Vm, VmAddrs, VmData};

/// The name of the virtio-serial port the agent reads its VM data from.
pub const DATA_PORT: &str = "org.vncgate.vm-data";

/// The image, as `config/golden/build.sh` describes it in `golden.json`.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Image {
    pub version: u32,
    pub kernel: PathBuf,
    pub initrd: Option<PathBuf>,
    pub rootfs: PathBuf,
    pub cmdline: String,
    pub machine: String,
    pub memory_mib: u32,
    pub vcpus: u32,
    pub vnc_port: u16,
    pub agent_port: u16,
}

/// The golden snapshot, as [`snapshot::snapshot`] wrote it in `snapshot/snapshot.json`.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Snapshot {
    pub version: u32,
    /// The migration stream.
    pub state: PathBuf,
    /// The frozen disk overlay (backed by the image's root filesystem).
    pub disk: PathBuf,
    /// The VM it was taken of; every restore must be the same machine.
    #[serde(flatten)]
    pub machine: MachineSpec,
    /// Whether the save waited for the VNC port's RFB handshake (`false` only with
    /// `--allow-missing-vnc`, for the test of what a session from such a snapshot does).
    pub vnc_checked: bool,
    pub boot_ms: u64,
    pub save_ms: u64,
    pub saved_at_ms: u64,
    /// The image's root filesystem as it was when the snapshot was taken: the frozen disk
    /// is a delta on it, so a rebuilt image under an old snapshot is a corrupt disk.
    pub base: FileStamp,
}

/// A file's size and modification time, to tell that it did not change.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct FileStamp {
    pub size: u64,
    pub mtime_ns: i128,
}

impl FileStamp {
    pub fn of(path: &Path) -> Result<Self, String> {
        let m = std::fs::metadata(path).map_err(|e| format!("{}: {e}", path.display()))?;
        let mtime_ns = m
            .modified()
            .ok()
            .and_then(|t| t.duration_since(std::time::UNIX_EPOCH).ok())
            .map_or(0, |d| d.as_nanos() as i128);
        Ok(Self {
            size: m.len(),
            mtime_ns,
        })
    }
}

/// What a VM is, beyond its devices: accelerator, CPU model, memory, vCPUs, and the kernel
/// command line it booted with. A restore must use the snapshot's exactly (a migration
/// stream loaded into another CPU model "succeeds" and the guest hangs).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct MachineSpec {
    pub accel: Accel,
    pub cpu: String,
    pub memory_mib: u32,
    pub vcpus: u32,
    pub cmdline: String,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Accel {
    Kvm,
    Tcg,
}

impl Accel {
    /// KVM when `/dev/kvm` opens and the CPU has hardware virtualization (a nested host
    /// whose /dev/kvm cannot run stock guests lacks the flag), TCG otherwise.
    pub fn detect() -> Self {
        let kvm = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .open("/dev/kvm")
            .is_ok();
        let flags = std::fs::read_to_string("/proc/cpuinfo").unwrap_or_default();
        let hw = flags
            .lines()
            .filter(|l| l.starts_with("flags"))
            .any(|l| l.split_whitespace().any(|f| f == "vmx" || f == "svm"));
        if kvm && hw { Accel::Kvm } else { Accel::Tcg }
    }

    /// The CPU model a golden VM gets by default: the host's under KVM; under TCG `qemu64`,
    /// the plainest x86-64 (measured on this kind of machine: cold boot 22 s against 28 s
    /// with `max`, whose extra features TCG emulates slowly).
    pub fn default_cpu(self) -> &'static str {
        match self {
            Accel::Kvm => "host",
            Accel::Tcg => "qemu64",
        }
    }

    fn as_str(self) -> &'static str {
        match self {
            Accel::Kvm => "kvm",
            Accel::Tcg => "tcg",
        }
    }
}

/// The golden directory, read and checked.
#[derive(Debug, Clone)]
pub struct Golden {
    pub dir: PathBuf,
    pub image: Image,
}

impl Golden {
    pub fn open(dir: &Path) -> Result<Self, String> {
        let dir =
            std::fs::canonicalize(dir).map_err(|e| format!("--golden {}: {e}", dir.display()))?;
        let manifest = dir.join("golden.json");
        let text = std::fs::read_to_string(&manifest).map_err(|e| {
            format!(
                "{}: {e} (build the image with config/golden/build.sh {})",
                manifest.display(),
                dir.display()
            )
        })?;
        let image: Image = serde_json::from_str(&text)
            .map_err(|e| format!("{}: not a golden manifest: {e}", manifest.display()))?;
        if image.version != 1 {
            return Err(format!(
                "{}: manifest version {} (this controller reads 1)",
                manifest.display(),
                image.version
            ));
        }
        for f in [
            Some(&image.kernel),
            image.initrd.as_ref(),
            Some(&image.rootfs),
        ]
        .into_iter()
        .flatten()
        {
            if !dir.join(f).is_file() {
                return Err(format!(
                    "{}: names {}, which is missing",
                    manifest.display(),
                    f.display()
                ));
            }
        }
        Ok(Self { dir, image })
    }

    pub fn snapshot_dir(&self) -> PathBuf {
        self.dir.join("snapshot")
    }

    /// The golden snapshot, checked to be whole.
    pub fn snapshot(&self) -> Result<Snapshot, String> {
        let dir = self.snapshot_dir();
        let path = dir.join("snapshot.json");
        let text = std::fs::read_to_string(&path).map_err(|e| {
            format!(
                "{}: {e} (take it with vncgate-controller golden snapshot {})",
                path.display(),
                self.dir.display()
            )
        })?;
        let mut s: Snapshot = serde_json::from_str(&text)
            .map_err(|e| format!("{}: not a snapshot manifest: {e}", path.display()))?;
        s.state = dir.join(&s.state);
        s.disk = dir.join(&s.disk);
        for f in [&s.state, &s.disk] {
            if !f.is_file() {
                return Err(format!(
                    "{}: names {}, which is missing",
                    path.display(),
                    f.display()
                ));
            }
        }
        Ok(s)
    }
}

/// Where one VM's pieces are: its directory and the host side of its devices.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Layout {
    pub dir: PathBuf,
    pub disk: PathBuf,
    pub vnc: u16,
    pub agent: u16,
}

impl Layout {
    fn qmp(&self) -> PathBuf {
        self.dir.join("qmp.sock")
    }

    fn data(&self) -> PathBuf {
        self.dir.join("vm-data.sock")
    }

    /// QEMU's command line for this VM: the same devices for the golden boot and for every
    /// restore (`incoming`: the migration stream to restore from).
    pub fn args(&self, golden: &Golden, m: &MachineSpec, incoming: Option<&Path>) -> Vec<String> {
        let img = &golden.image;
        let machine = if img.machine == "microvm" {
            "microvm,x-option-roms=off,rtc=on,isa-serial=on".to_owned()
        } else {
            img.machine.clone()
        };
        // microvm's devices are virtio-mmio (`-device`); a PC machine's are PCI.
        let dev = |name: &str| {
            if img.machine == "microvm" {
                format!("{name}-device")
            } else {
                format!("{name}-pci")
            }
        };
        let mut a: Vec<String> = ["-M", &machine, "-accel", m.accel.as_str(), "-cpu", &m.cpu]
            .iter()
            .map(|s| s.to_string())
            .collect();
        let mut push = |xs: &[&str]| a.extend(xs.iter().map(|s| s.to_string()));
        push(&[
            "-m",
            &m.memory_mib.to_string(),
            "-smp",
            &m.vcpus.to_string(),
        ]);
        push(&["-nodefaults", "-no-user-config", "-display", "none"]);
        push(&[
            "-kernel",
            &golden.dir.join(&img.kernel).display().to_string(),
        ]);
        if let Some(initrd) = &img.initrd {
            push(&["-initrd", &golden.dir.join(initrd).display().to_string()]);
        }
        push(&["-append", &m.cmdline]);
        push(&[
            "-drive",
            &format!("id=root,file={},format=qcow2,if=none", self.disk.display()),
            "-device",
            &format!("{},drive=root", dev("virtio-blk")),
        ]);
        push(&[
            "-netdev",
            &format!(
                "user,id=net0,hostfwd=tcp:127.0.0.1:{}-:{},hostfwd=tcp:127.0.0.1:{}-:{}",
                self.vnc, img.vnc_port, self.agent, img.agent_port
            ),
            "-device",
            &format!("{},netdev=net0", dev("virtio-net")),
        ]);
        push(&[
            "-device",
            &dev("virtio-serial"),
            "-chardev",
            &format!(
                "socket,id=vmdata,path={},server=on,wait=off",
                self.data().display()
            ),
            "-device",
            &format!("virtserialport,chardev=vmdata,name={DATA_PORT}"),
        ]);
        push(&["-device", &dev("virtio-rng")]);
        push(&[
            "-serial",
            &format!("file:{}", self.dir.join("console.log").display()),
        ]);
        push(&[
            "-qmp",
            &format!("unix:{},server=on,wait=off", self.qmp().display()),
        ]);
        if let Some(state) = incoming {
            push(&["-incoming", &format!("exec:cat '{}'", state.display())]);
        }
        a
    }

    pub fn addrs(&self) -> VmAddrs {
        VmAddrs {
            agent: SocketAddr::from((Ipv4Addr::LOCALHOST, self.agent)),
            vnc: SocketAddr::from((Ipv4Addr::LOCALHOST, self.vnc)),
        }
    }

    /// A fresh layout in `dir`: free loopback ports for the two forwards.
    pub fn fresh(dir: PathBuf, disk: PathBuf) -> Result<Self, BackendError> {
        Ok(Self {
            dir,
            disk,
            vnc: free_port()?,
            agent: free_port()?,
        })
    }
}

/// Creates `overlay`, a qcow2 whose backing file is `base` (copy on write).
pub fn create_overlay(base: &Path, overlay: &Path) -> Result<(), String> {
    let out = std::process::Command::new("qemu-img")
        .args(["create", "-q", "-f", "qcow2", "-F", "qcow2", "-b"])
        .arg(base)
        .arg(overlay)
        .output()
        .map_err(|e| format!("qemu-img (qemu-utils): {e}"))?;
    if !out.status.success() {
        return Err(format!(
            "qemu-img create {}: {}",
            overlay.display(),
            String::from_utf8_lossy(&out.stderr).trim()
        ));
    }
    Ok(())
}

/// Starts QEMU with `args` in `layout.dir` (its own process group, output in `qemu.log`).
pub(crate) fn spawn_qemu(
    qemu: &Path,
    layout: &Layout,
    args: &[String],
) -> Result<Proc, BackendError> {
    spawn(&layout.dir, "qemu", qemu, args)
}

/// The last lines of a VM's QEMU log and console, for an error that must say why.
pub fn tail_logs(dir: &Path) -> String {
    let mut out = String::new();
    for f in ["qemu.log", "console.log"] {
        if let Ok(text) = std::fs::read_to_string(dir.join(f)) {
            let lines: Vec<&str> = text.lines().filter(|l| !l.trim().is_empty()).collect();
            let tail = lines[lines.len().saturating_sub(5)..].join(" | ");
            if !tail.is_empty() {
                out.push_str(&format!(" [{f}: {tail}]"));
            }
        }
    }
    out
}

#[derive(Debug, Clone)]
pub struct QemuConfig {
    pub golden: PathBuf,
    pub work_dir: PathBuf,
    /// `qemu-system-x86_64`, or a path.
    pub qemu: PathBuf,
    /// How long a restore may take to reach `running`.
    pub restore_timeout: Duration,
}

pub struct QemuBackend {
    cfg: QemuConfig,
    golden: Golden,
    snapshot: Snapshot,
}

/// What a QEMU VM is persisted as.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
struct Handle {
    backend: String,
    layout: Layout,
    qemu: Proc,
}

impl QemuBackend {
    pub fn new(cfg: QemuConfig) -> Result<Self, String> {
        let golden = Golden::open(&cfg.golden)?;
        let snapshot = golden.snapshot()?;
        if snapshot.machine.accel != Accel::detect() {
            return Err(format!(
                "the golden snapshot in {} was taken under {:?}, this host runs {:?}: take it again here",
                golden.snapshot_dir().display(),
                snapshot.machine.accel,
                Accel::detect()
            ));
        }
        if !snapshot.vnc_checked {
            tracing::warn!(golden = %golden.dir.display(), "the golden snapshot was saved WITHOUT checking its VNC port (--allow-missing-vnc): sessions from it will fail their readiness if nothing listens on the guest's VNC port");
        }
        std::fs::create_dir_all(&cfg.work_dir)
            .map_err(|e| format!("--work-dir {}: {e}", cfg.work_dir.display()))?;
        Ok(Self {
            cfg,
            golden,
            snapshot,
        })
    }

    pub fn snapshot(&self) -> &Snapshot {
        &self.snapshot
    }

    fn handle(vm: &Vm) -> Result<Handle, BackendError> {
        serde_json::from_value(vm.handle.clone())
            .map_err(|e| BackendError(format!("not a qemu VM handle: {e}")))
    }

    async fn restore(&self, layout: &Layout) -> Result<Proc, BackendError> {
        create_overlay(&self.snapshot.disk, &layout.disk).map_err(BackendError)?;
        let args = layout.args(
            &self.golden,
            &self.snapshot.machine,
            Some(&self.snapshot.state),
        );
        let qemu = spawn_qemu(&self.cfg.qemu, layout, &args)?;
        let started = Instant::now();
        match self.resume(layout, started).await {
            Ok(()) => {
                tracing::debug!(dir = %layout.dir.display(), ms = started.elapsed().as_millis() as u64, "VM restored");
                Ok(qemu)
            }
            Err(e) => {
                qemu.signal(rustix::process::Signal::KILL);
                Err(e)
            }
        }
    }

    /// Waits for the incoming migration to land and the VM to run.
    async fn resume(&self, layout: &Layout, started: Instant) -> Result<(), BackendError> {
        let mut qmp = qmp::Qmp::connect(&layout.qmp(), self.cfg.restore_timeout)
            .await
            .map_err(|e| BackendError(format!("restore: {e}{}", tail_logs(&layout.dir))))?;
        loop {
            match qmp.status().await {
                Ok(s) if s == "running" => break,
                // The golden VM was paused for its save, so the restored one arrives paused.
                Ok(s) if s == "paused" => {
                    qmp.execute("cont", None)
                        .await
                        .map_err(|e| BackendError(format!("restore: {e}")))?;
                }
                Ok(_) if started.elapsed() < self.cfg.restore_timeout => {
                    tokio::time::sleep(Duration::from_millis(10)).await
                }
                Ok(s) => {
                    return Err(BackendError(format!(
                        "restore: the VM is {s}, not running, after {:?}{}",
                        self.cfg.restore_timeout,
                        tail_logs(&layout.dir)
                    )));
                }
                Err(e) => {
                    return Err(BackendError(format!(
                        "restore: {e}{}",
                        tail_logs(&layout.dir)
                    )));
                }
            }
        }
        Ok(())
    }
}

/// The controller's URL as the guest reaches it: QEMU user networking maps the host's
/// loopback to 10.0.2.2.
pub fn guest_controller_url(url: &str) -> String {
    for lo in ["127.0.0.1", "localhost", "[::1]"] {
        for scheme in ["http://", "https://"] {
            let from = format!("{scheme}{lo}");
            if let Some(rest) = url.strip_prefix(&from)
                && (rest.is_empty() || rest.starts_with(':') || rest.starts_with('/'))
            {
                return format!("{scheme}10.0.2.2{rest}");
            }
        }
    }
    url.to_owned()
}

impl Backend for QemuBackend {
    fn name(&self) -> &'static str {
        "qemu"
    }

    fn clones(&self) -> bool {
        true
    }

    async fn start(&self, session: &str) -> Result<Vm, BackendError> {
        // Short: unix socket paths have a 108-byte limit.
        let dir = self.cfg.work_dir.join(session);
        std::fs::create_dir_all(&dir)
            .map_err(|e| BackendError(format!("VM directory {}: {e}", dir.display())))?;
        let layout = Layout::fresh(dir.clone(), dir.join("disk.qcow2"))?;
        let qemu = match self.restore(&layout).await {
            Ok(q) => q,
            Err(e) => {
                let _ = std::fs::remove_dir_all(&dir);
                return Err(e);
            }
        };
        let handle = Handle {
            backend: "qemu".into(),
            layout: layout.clone(),
            qemu,
        };
        let value = serde_json::to_value(&handle).expect("a handle serializes");
        if let Err(e) = std::fs::write(dir.join("handle.json"), value.to_string()) {
            tracing::warn!(session, error = %e, "cannot write the VM's handle.json");
        }
        Ok(Vm {
            addrs: layout.addrs(),
            handle: value,
            vnc_password: None,
            guest_vnc_port: Some(self.golden.image.vnc_port),
        })
    }

    /// Writes the data as one JSON line on the VM's virtio-serial channel and waits for the
    /// agent's answer line (its identity report), so a push that reached no agent fails here.
    async fn push_data(&self, vm: &Vm, data: &VmData) -> Result<(), BackendError> {
        let h = Self::handle(vm)?;
        let mut data = data.clone();
        data.controller_url = guest_controller_url(&data.controller_url);
        let mut line = serde_json::to_vec(&data).expect("vm data serializes");
        line.push(b'\n');
        let path = h.layout.data();
        let stream = tokio::net::UnixStream::connect(&path)
            .await
            .map_err(|e| BackendError(format!("vm data channel {}: {e}", path.display())))?;
        let (r, mut w) = stream.into_split();
        w.write_all(&line)
            .await
            .map_err(|e| BackendError(format!("vm data channel: {e}")))?;
        let mut answer = String::new();
        let timeout = Duration::from_secs(20);
        match tokio::time::timeout(timeout, BufReader::new(r).read_line(&mut answer)).await {
            Err(_) => Err(BackendError(format!(
                "the guest agent did not answer on {DATA_PORT} within {timeout:?}"
            ))),
            Ok(Err(e)) => Err(BackendError(format!("vm data channel: {e}"))),
            Ok(Ok(0)) => Err(BackendError(
                "vm data channel closed without an answer".into(),
            )),
            Ok(Ok(_)) => {
                let v: serde_json::Value = serde_json::from_str(&answer).map_err(|e| {
                    BackendError(format!("the guest agent answered not JSON ({e}): {answer}"))
                })?;
                if v["ok"].as_bool() == Some(true) {
                    tracing::info!(session = %data.session_id, identity = %v["identity"], "the guest agent took its vm data");
                    Ok(())
                } else {
                    Err(BackendError(format!(
                        "the guest agent refused its vm data: {}",
                        v["error"].as_str().unwrap_or("no reason given")
                    )))
                }
            }
        }
    }

    async fn alive(&self, vm: &Vm) -> bool {
        Self::handle(vm).is_ok_and(|h| h.qemu.alive())
    }

    async fn stop(&self, vm: &Vm) -> Result<(), BackendError> {
        let h = Self::handle(vm)?;
        if h.qemu.alive() {
            // `quit` through QMP; a signal if it does not answer.
            if let Ok(mut q) = qmp::Qmp::connect(&h.layout.qmp(), Duration::from_secs(1)).await {
                let _ = q.execute("quit", None).await;
            }
            h.qemu.signal(rustix::process::Signal::TERM);
            for _ in 0..40 {
                if !h.qemu.alive() {
                    break;
                }
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
            h.qemu.signal(rustix::process::Signal::KILL);
        }
        std::fs::remove_dir_all(&h.layout.dir)
            .or_else(|e| {
                if e.kind() == std::io::ErrorKind::NotFound {
                    Ok(())
                } else {
                    Err(e)
                }
            })
            .map_err(|e| BackendError(format!("removing {}: {e}", h.layout.dir.display())))
    }

    async fn adopt(&self, handle: &serde_json::Value) -> Option<Vm> {
        let h: Handle = serde_json::from_value(handle.clone()).ok()?;
        (h.backend == "qemu" && h.qemu.alive()).then(|| Vm {
            addrs: h.layout.addrs(),
            handle: handle.clone(),
            vnc_password: None,
            guest_vnc_port: Some(self.golden.image.vnc_port),
        })
    }

    async fn running(&self) -> Vec<Vm> {
        running_in(self, &self.cfg.work_dir).await
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_guest_reaches_a_loopback_controller_through_slirp() {
        assert_eq!(
            guest_controller_url("http://127.0.0.1:8000"),
            "http://10.0.2.2:8000"
        );
        assert_eq!(
            guest_controller_url("http://localhost:8000/x"),
            "http://10.0.2.2:8000/x"
        );
        assert_eq!(
            guest_controller_url("http://127.0.0.10:8000"),
            "http://127.0.0.10:8000"
        );
        assert_eq!(
            guest_controller_url("https://ctl.example:443"),
            "https://ctl.example:443"
        );
    }
}
