//! The `firecracker` backend against the real Firecracker binary (v1.12.1, fetched by
//! scripts/firecracker-fetch.sh; `VNCGATE_FIRECRACKER` names another). Without it these
//! tests fail, never skip.
//!
//! The guest is a 102-byte x86-64 program (its source is beside [`GUEST_CODE`]) that
//! Firecracker boots as an ELF "kernel": it prints a line on the serial console, then
//! polls the i8042 until Ctrl-Alt-Del arrives, prints another line and resets the machine
//! through the i8042, as a Linux guest booted with `reboot=k` does, which ends
//! Firecracker. So a clone that answers Ctrl-Alt-Del ran guest code after its restore.
//!
//! Taps and bridges live in a network namespace each test creates and deletes; nothing is
//! sent anywhere. `boots_a_real_guest_from_a_golden_snapshot` needs a real kernel, rootfs
//! and hardware KVM: it is `#[ignore]`d (see controller/FIRECRACKER.md). The two
//! `vncgate-controller` tests run the binary with its Firecracker flags.

use std::net::{Ipv4Addr, SocketAddr};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use serde_json::json;
use vncgate_controller::backend::firecracker::api::{ApiClient, NetworkInterface};
use vncgate_controller::backend::firecracker::guest::{self, Document};
use vncgate_controller::backend::firecracker::{
    ColdBoot, FirecrackerBackend, FirecrackerConfig, GoldenSnapshot, JailerConfig,
};
use vncgate_controller::backend::{Backend, VmAddrs, VmData};

const BIN: &str = env!("CARGO_BIN_EXE_vncgate-controller");

/// The guest, assembled from (GNU as, `.intel_syntax noprefix`, linked at 0x1000000):
///
/// ```text
/// _start: lea rsi, [rip + up]; call print
/// poll:   in al, 0x64; test al, 1; jnz key; pause; jmp poll   # i8042 output buffer full?
/// key:    lea rsi, [rip + cad]; call print
///         mov al, 0xfe; out 0x64, al                           # i8042 CPU reset
/// halt:   hlt; jmp halt
/// print:  mov dx, 0x3f8
/// 1:      lodsb; test al, al; jz 2f; out dx, al; jmp 1b        # COM1, a byte at a time
/// 2:      ret
/// up:     .asciz "vncgate-guest: up\n"
/// cad:    .asciz "vncgate-guest: ctrl-alt-del\n"
/// ```
const GUEST_CODE: &str = "488d352f000000e81d000000e464a8017504f390ebf6488d352c000000e807000000b0fee664f4ebfd66baf803ac84c07403eeebf8c3766e63676174652d67756573743a2075700a00766e63676174652d67756573743a206374726c2d616c742d64656c0a00";
const UP: &str = "vncgate-guest: up";
const CAD: &str = "vncgate-guest: ctrl-alt-del";

/// Sends `req` and parses its answer as JSON.
async fn json_of(req: reqwest::RequestBuilder) -> serde_json::Value {
    req.send().await.unwrap().json().await.unwrap()
}

/// How long a stop waits for the guest to power off before it kills Firecracker. A stop that
/// returns before it ran out is one the guest ended itself (it resets on Ctrl-Alt-Del);
/// the kill would have come only after all of it.
const STOP_GRACE: Duration = Duration::from_secs(20);

/// Stops `vm` and checks the guest powered itself off (the stop returned within the grace).
async fn stopped_by_the_guest(b: &FirecrackerBackend, vm: &vncgate_controller::backend::Vm) {
    let t = Instant::now();
    b.stop(vm).await.unwrap();
    assert!(
        t.elapsed() < STOP_GRACE,
        "stop took {:?}: the guest did not power off on Ctrl-Alt-Del and was killed",
        t.elapsed()
    );
}

/// An ELF64 executable with one PT_LOAD segment (headers and code) at 16 MiB, entry at the
/// code: what Firecracker's kernel loader takes.
fn guest_elf() -> Vec<u8> {
    let code = hex::decode(GUEST_CODE).unwrap();
    const LOAD: u64 = 0x100_0000;
    let (eh, ph) = (64u16, 56u16);
    let off = u64::from(eh + ph);
    let len = off + code.len() as u64;
    let mut e = b"\x7fELF\x02\x01\x01\0\0\0\0\0\0\0\0\0".to_vec();
    e.extend(2u16.to_le_bytes()); // ET_EXEC
    e.extend(0x3eu16.to_le_bytes()); // x86-64
    e.extend(1u32.to_le_bytes());
    e.extend((LOAD + off).to_le_bytes()); // entry
    e.extend(u64::from(eh).to_le_bytes()); // program headers
    e.extend(0u64.to_le_bytes()); // no section headers
    e.extend(0u32.to_le_bytes());
    for h in [eh, ph, 1, 0, 0, 0] {
        e.extend(h.to_le_bytes());
    }
    e.extend(1u32.to_le_bytes()); // PT_LOAD
    e.extend(5u32.to_le_bytes()); // R+X
    for v in [0, LOAD, LOAD, len, len, 0x1000] {
        e.extend(u64::to_le_bytes(v));
    }
    e.extend(code);
    e
}

fn firecracker_bin() -> PathBuf {
    let path = std::env::var_os("VNCGATE_FIRECRACKER")
        .map(PathBuf::from)
        .unwrap_or_else(|| {
            Path::new(env!("CARGO_MANIFEST_DIR")).join("../target/firecracker/firecracker")
        });
    assert!(
        path.is_file(),
        "no firecracker binary at {}: run scripts/firecracker-fetch.sh (or set VNCGATE_FIRECRACKER)",
        path.display()
    );
    path
}

fn jailer_bin() -> PathBuf {
    let path = firecracker_bin().with_file_name("jailer");
    assert!(
        path.is_file(),
        "no jailer beside firecracker at {}: run scripts/firecracker-fetch.sh",
        path.display()
    );
    path
}

/// A network namespace and a scratch directory of the test's own, removed on drop.
struct Scene {
    netns: String,
    dir: PathBuf,
}

impl Scene {
    fn new(name: &str) -> Self {
        let netns = format!("vncgate-fc-test-{}-{name}", std::process::id());
        let ok = Command::new("ip")
            .args(["netns", "add", &netns])
            .status()
            .unwrap();
        assert!(ok.success(), "ip netns add {netns} (these tests need root)");
        let dir = std::env::temp_dir().join(&netns);
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        std::fs::write(dir.join("guest.elf"), guest_elf()).unwrap();
        Self { netns, dir }
    }

    fn ip(&self, args: &[&str]) -> bool {
        Command::new("ip")
            .args(["-n", &self.netns])
            .args(args)
            .stderr(Stdio::null())
            .stdout(Stdio::null())
            .status()
            .unwrap()
            .success()
    }

    fn link_exists(&self, name: &str) -> bool {
        self.ip(&["link", "show", "dev", name])
    }

    fn tap(&self, name: &str) {
        assert!(self.ip(&["tuntap", "add", "dev", name, "mode", "tap"]));
    }

    /// Firecracker in the namespace, its output in `<name>.log`.
    fn firecracker(&self, name: &str) -> (tokio::process::Child, ApiClient, PathBuf) {
        let socket = self.dir.join(format!("{name}.socket"));
        let log = self.dir.join(format!("{name}.log"));
        let out = std::fs::File::create(&log).unwrap();
        // Firecracker's own log apart, so the console (stdout) is the guest's alone.
        let fc_log = self.dir.join(format!("{name}.firecracker.log"));
        std::fs::write(&fc_log, b"").unwrap();
        let child = tokio::process::Command::new("ip")
            .args(["netns", "exec", &self.netns])
            .arg(firecracker_bin())
            .arg("--api-sock")
            .arg(&socket)
            .args(["--id", name])
            .arg("--log-path")
            .arg(&fc_log)
            .stdout(out.try_clone().unwrap())
            .stderr(out)
            .kill_on_drop(true)
            .spawn()
            .unwrap();
        let api = ApiClient::new(&socket, Duration::from_secs(5));
        (child, api, log)
    }

    fn config(&self) -> FirecrackerConfig {
        let mut cfg = FirecrackerConfig::new(
            firecracker_bin(),
            GoldenSnapshot {
                vmstate: self.dir.join("golden.vmstate"),
                memory: self.dir.join("golden.mem"),
                files: vec![],
            },
            self.dir.join("vms"),
        );
        cfg.netns = Some(self.netns.clone());
        cfg.bridge = "vncgatebr0".into();
        cfg.cold_boot = Some(ColdBoot {
            kernel: self.dir.join("guest.elf"),
            rootfs: None,
            boot_args: ColdBoot::DEFAULT_BOOT_ARGS.into(),
        });
        cfg.vcpus = 1;
        cfg.memory_mib = 32;
        // Long, so a stop that returns within it was the guest's doing, not the kill.
        cfg.stop_grace = STOP_GRACE;
        cfg
    }
}

impl Drop for Scene {
    fn drop(&mut self) {
        let _ = Command::new("ip")
            .args(["netns", "delete", &self.netns])
            .status();
        if std::thread::panicking() {
            eprintln!("kept {} (logs) for the failure", self.dir.display());
        } else {
            let _ = std::fs::remove_dir_all(&self.dir);
        }
    }
}

/// Waits (10 ms steps, up to 10 s) until `done`; panics naming `what` otherwise.
async fn wait_for(what: &str, mut done: impl FnMut() -> bool) {
    let deadline = Instant::now() + Duration::from_secs(10);
    while !done() {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

async fn api_up(api: &ApiClient) {
    let deadline = Instant::now() + Duration::from_secs(10);
    while api.describe().await.is_err() {
        assert!(
            Instant::now() < deadline,
            "the API at {} never answered",
            api.socket().display()
        );
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}

fn log_has(log: &Path, line: &str) -> bool {
    std::fs::read_to_string(log).is_ok_and(|t| t.contains(line))
}

fn err(r: Result<impl std::fmt::Debug, vncgate_controller::backend::BackendError>) -> String {
    r.expect_err("Firecracker should have refused").0
}

#[tokio::test]
async fn errors_name_the_call_and_carry_firecrackers_fault_message() {
    let s = Scene::new("errors");
    let (_fc, api, _) = s.firecracker("errors");
    api_up(&api).await;
    assert_eq!(
        err(api.machine_config(0, 32).await),
        "firecracker PUT /machine-config: 400 Machine config error: The number of vCPUs must be greater than 0, less than 32 and must be 1 or an even number if SMT is enabled."
    );
    assert_eq!(
        err(api.boot_source(Path::new("/nonexistent/vmlinux"), "").await),
        "firecracker PUT /boot-source: 400 Boot source error: The kernel file cannot be opened: No such file or directory (os error 2)"
    );
    assert_eq!(
        err(api.pause().await),
        "firecracker PATCH /vm: 400 The requested operation is not supported before starting the microVM."
    );
    assert_eq!(
        err(api.call("PUT", "/nope", Some(&json!({}))).await),
        "firecracker PUT /nope: 400 Invalid request method and/or path: PUT nope."
    );
    assert_eq!(
        err(api.call("PUT", "/machine-config", Some(&json!("x"))).await),
        "firecracker PUT /machine-config: 400 An error occurred when deserializing the json body of a request: invalid type: string \"x\", expected struct MachineConfig at line 1 column 3."
    );
    // Even refused pre-boot calls make a process a booting one.
    let missing = s.dir.join("missing");
    assert_eq!(
        err(api
            .snapshot_load(&missing, &missing, &[("eth0", "nope0")])
            .await),
        "firecracker PUT /snapshot/load: 400 Load snapshot error: Loading a microVM snapshot not allowed after configuring boot-specific resources."
    );
    let (_fc2, api2, _) = s.firecracker("errors2");
    api_up(&api2).await;
    let e = err(api2
        .snapshot_load(&missing, &missing, &[("eth0", "nope0")])
        .await);
    assert!(
        e.starts_with("firecracker PUT /snapshot/load: 400 Load snapshot error: "),
        "{e}"
    );
    assert!(e.contains("No such file or directory"), "{e}");
    let gone = ApiClient::new(s.dir.join("no.socket"), Duration::from_secs(1));
    let e = err(gone.describe().await);
    assert!(
        e.starts_with("firecracker GET /: cannot connect to "),
        "{e}"
    );
}

/// Every pre-boot call, InstanceStart of the test guest, pause, a full snapshot, and the
/// snapshot loaded into a second process with its interface on another tap, resumed, and
/// ended by Ctrl-Alt-Del.
#[tokio::test]
async fn boot_snapshot_and_load_with_a_network_override_in_a_second_process() {
    let s = Scene::new("api");
    s.tap("golden0");
    let (mut golden, api, glog) = s.firecracker("golden");
    api_up(&api).await;
    let info = api.describe().await.unwrap();
    assert_eq!(
        (
            info.id.as_str(),
            info.state.as_str(),
            info.vmm_version.as_str()
        ),
        ("golden", "Not started", "1.12.1")
    );

    api.machine_config(1, 32).await.unwrap();
    let mc = api.get_machine_config().await.unwrap();
    assert_eq!(
        (mc["vcpu_count"].as_u64(), mc["mem_size_mib"].as_u64()),
        (Some(1), Some(32))
    );
    api.boot_source(&s.dir.join("guest.elf"), "console=ttyS0")
        .await
        .unwrap();
    let disk = s.dir.join("disk.img");
    std::fs::write(&disk, vec![0u8; 1 << 20]).unwrap();
    api.drive("data", &disk, false, true).await.unwrap();
    let nic = NetworkInterface {
        iface_id: "eth0",
        host_dev_name: "golden0",
        guest_mac: "06:00:ac:1e:00:fe",
    };
    api.network_interface(&nic).await.unwrap();
    api.mmds_config(&["eth0"]).await.unwrap();
    assert_eq!(api.get_mmds().await.unwrap(), json!({}));
    let data = json!({ "vncgate": { "session_id": "s", "n": 1 } });
    api.put_mmds(&data).await.unwrap();
    assert_eq!(api.get_mmds().await.unwrap(), data);
    let cfg = api.get_vm_config().await.unwrap();
    assert_eq!(cfg["drives"][0]["path_on_host"], json!(disk));
    assert_eq!(cfg["mmds-config"]["version"], "V2");

    api.instance_start().await.unwrap();
    assert_eq!(api.describe().await.unwrap().state, "Running");
    wait_for("the guest's first line", || log_has(&glog, UP)).await;
    // Pre-boot only, now refused.
    assert_eq!(
        err(api.machine_config(1, 64).await),
        "firecracker PUT /machine-config: 400 The requested operation is not supported after starting the microVM."
    );
    api.pause().await.unwrap();
    assert_eq!(api.describe().await.unwrap().state, "Paused");
    let (vmstate, mem) = (s.dir.join("vmstate"), s.dir.join("mem"));
    api.with_timeout(Duration::from_secs(20))
        .snapshot_create(&vmstate, &mem)
        .await
        .unwrap();
    assert_eq!(std::fs::metadata(&mem).unwrap().len(), 32 << 20);
    golden.kill().await.unwrap();

    // Without an override a clone opens the golden VM's tap by name: with the golden tap
    // gone, Firecracker (as root) creates a fresh one of that name, on no bridge.
    assert!(s.ip(&["link", "delete", "dev", "golden0"]));
    let (_c0, api0, _) = s.firecracker("no-override");
    api_up(&api0).await;
    api0.snapshot_load(&vmstate, &mem, &[]).await.unwrap();
    assert_eq!(
        api0.get_vm_config().await.unwrap()["network-interfaces"][0]["host_dev_name"],
        "golden0"
    );
    assert!(s.link_exists("golden0"));
    assert!(!s.ip(&["link", "show", "dev", "golden0", "master", "vncgatebr0"]));

    s.tap("clone0");
    let (mut clone, capi, clog) = s.firecracker("clone");
    api_up(&capi).await;
    capi.snapshot_load(&vmstate, &mem, &[("eth0", "clone0")])
        .await
        .unwrap();
    assert_eq!(capi.describe().await.unwrap().state, "Paused");
    let ccfg = capi.get_vm_config().await.unwrap();
    assert_eq!(ccfg["network-interfaces"][0]["host_dev_name"], "clone0");
    assert_eq!(
        ccfg["network-interfaces"][0]["guest_mac"],
        "06:00:ac:1e:00:fe"
    );
    assert_eq!(ccfg["mmds-config"]["network_interfaces"], json!(["eth0"]));
    // The MMDS store is not part of a snapshot: each clone gets its own data.
    assert_eq!(capi.get_mmds().await.unwrap(), json!({}));
    // A tap serves one clone: a second load onto clone0 is refused, and the refused
    // process exits (a failed load leaves no VM to retry with).
    let (mut busy, bapi, _) = s.firecracker("busy");
    api_up(&bapi).await;
    assert_eq!(
        err(bapi
            .snapshot_load(&vmstate, &mem, &[("eth0", "clone0")])
            .await),
        "firecracker PUT /snapshot/load: 400 Load snapshot error: Failed to restore from snapshot: Failed to build microVM from snapshot: Failed to restore MMIO device: Cannot restore devices: Net: Failed to create a network device: Open tap device failed: Error while creating ifreq structure: Resource busy (os error 16). Invalid TUN/TAP Backend provided by clone0. Check our documentation on setting up the network devices."
    );
    tokio::time::timeout(Duration::from_secs(10), busy.wait())
        .await
        .expect("the refused process exits")
        .unwrap();
    capi.resume().await.unwrap();
    assert_eq!(capi.describe().await.unwrap().state, "Running");
    capi.send_ctrl_alt_del().await.unwrap();
    let status = tokio::time::timeout(Duration::from_secs(10), clone.wait())
        .await
        .expect("the clone answered Ctrl-Alt-Del")
        .unwrap();
    assert!(status.success(), "{status}");
    // The console holds the clone's line alone: it resumed where the golden VM was paused
    // and did not boot again.
    assert_eq!(std::fs::read_to_string(&clog).unwrap(), format!("{CAD}\n"));
    assert_eq!(std::fs::read_to_string(&glog).unwrap(), format!("{UP}\n"));
}

fn vm_data(session: &str) -> VmData {
    VmData {
        session_id: session.into(),
        provider: "github".into(),
        agent_token: format!("token-{session}"),
        controller_url: "http://127.0.0.1:1".into(),
        issued_at_ms: 1_700_000_000_000,
        entropy: VmData::fresh_entropy(),
    }
}

fn socket_of(vm: &vncgate_controller::backend::Vm) -> PathBuf {
    PathBuf::from(vm.handle["api_socket"].as_str().unwrap())
}

/// The golden VM's boot and snapshot, shared by the backend tests.
async fn make_golden(b: &FirecrackerBackend) {
    let golden = b.boot_golden().await.unwrap();
    let log = golden.console.clone();
    wait_for("the golden guest's first line", || log_has(&log, UP)).await;
    golden.snapshot().await.unwrap();
    assert!(b.config().golden.vmstate.is_file() && b.config().golden.memory.is_file());
}

/// What a stopped VM leaves: nothing.
fn assert_gone(s: &Scene, vm: &vncgate_controller::backend::Vm) {
    let h = &vm.handle;
    let pid = h["proc"]["pid"].as_u64().unwrap();
    let start = h["proc"]["start"].as_u64().unwrap();
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
    // After the command: state (field 3) and start time (field 22). A zombie runs nothing;
    // its parent (this test's runtime) reaps it when it next polls.
    let fields: Vec<&str> = stat
        .rsplit(')')
        .next()
        .unwrap_or("")
        .split_whitespace()
        .collect();
    let still = fields.len() > 19 && fields[0] != "Z" && fields[19] == start.to_string();
    assert!(!still, "firecracker pid {pid} still runs");
    assert!(!socket_of(vm).exists());
    assert!(!s.link_exists(h["tap"].as_str().unwrap()));
    assert!(!Path::new(h["dir"].as_str().unwrap()).exists());
}

#[tokio::test]
async fn clones_start_paused_get_their_data_then_run_stop_cleanly_and_are_adopted() {
    let s = Scene::new("backend");
    let b = FirecrackerBackend::new(s.config()).unwrap();
    assert!(s.link_exists("vncgatebr0"));
    make_golden(&b).await;
    assert!(
        !s.link_exists("vncgate-fc-g"),
        "the golden VM's tap is removed"
    );

    let (a, c) = (
        b.start("sess-a").await.unwrap(),
        b.start("sess-b").await.unwrap(),
    );
    let ip = |n| Ipv4Addr::new(172, 30, 0, n);
    assert_eq!(
        a.addrs,
        VmAddrs {
            agent: SocketAddr::from((ip(2), 8080)),
            vnc: SocketAddr::from((ip(2), 6080))
        }
    );
    assert_eq!(c.addrs.vnc, SocketAddr::from((ip(3), 6080)));
    assert_eq!(a.handle["tap"], "vncgate-fc-0");
    assert!(s.ip(&[
        "link",
        "show",
        "dev",
        "vncgate-fc-1",
        "master",
        "vncgatebr0"
    ]));
    let aapi = ApiClient::new(socket_of(&a), Duration::from_secs(5));
    // Paused until its data is in: the guest never runs without it.
    assert_eq!(aapi.describe().await.unwrap().state, "Paused");
    assert_eq!(aapi.get_mmds().await.unwrap(), json!({}));
    let vcfg = aapi.get_vm_config().await.unwrap();
    assert_eq!(
        vcfg["network-interfaces"][0]["host_dev_name"],
        "vncgate-fc-0"
    );
    assert!(b.alive(&a).await);

    let data = vm_data("sess-a");
    b.push_data(&a, &data).await.unwrap();
    assert_eq!(aapi.describe().await.unwrap().state, "Running");
    assert_eq!(
        aapi.get_mmds().await.unwrap(),
        json!({
            "vncgate": serde_json::to_value(&data).unwrap(),
            "network": { "ip": "172.30.0.2", "prefix": 24, "gateway": "172.30.0.1", "mac": "06:00:ac:1e:00:02" },
        })
    );
    // What the agent (`--vm-data-mmds`) makes of Firecracker's store: this session's data
    // and its own network.
    let doc =
        Document::parse(&serde_json::to_vec(&aapi.get_mmds().await.unwrap()).unwrap()).unwrap();
    assert_eq!(
        serde_json::from_slice::<VmData>(&doc.vm_data.unwrap()).unwrap(),
        data
    );
    let net = doc.network.unwrap();
    assert_eq!((net.ip, net.gateway), (ip(2), ip(1)));
    assert_eq!(
        guest::network_commands("eth0", &net, Some(guest::MMDS_ADDR))[2].join(" "),
        "addr add 172.30.0.2/24 dev eth0"
    );
    // Again (new data, already running): replaced, still running.
    let data2 = vm_data("sess-a");
    b.push_data(&a, &data2).await.unwrap();
    assert_eq!(
        aapi.get_mmds().await.unwrap()["vncgate"]["entropy"],
        json!(data2.entropy)
    );

    // The guest powers off on Ctrl-Alt-Del, well inside the 20 s grace.
    stopped_by_the_guest(&b, &a).await;
    assert_gone(&s, &a);
    assert!(!b.alive(&a).await);
    b.stop(&a).await.unwrap();
    assert!(b.adopt(&a.handle).await.is_none());

    // The controller restarts: a new backend finds `c` (paused, never given data).
    drop(b);
    let b2 = FirecrackerBackend::new(s.config()).unwrap();
    let found = b2.running().await;
    assert_eq!(found.len(), 1);
    assert_eq!(found[0].handle, c.handle);
    let adopted = b2.adopt(&c.handle).await.expect("adopted");
    assert_eq!(adopted.addrs, c.addrs);
    assert!(b2.alive(&adopted).await);
    b2.push_data(&adopted, &vm_data("sess-b")).await.unwrap();
    // Its slot is taken: the next VM gets slot 0 (freed by the stop), not 1.
    let d = b2.start("sess-d").await.unwrap();
    assert_eq!(d.handle["slot"], 0);
    // A paused VM is killed (no guest to ask); a running one answers.
    b2.stop(&d).await.unwrap();
    b2.stop(&adopted).await.unwrap();
    assert_gone(&s, &d);
    assert_gone(&s, &adopted);
    assert!(b2.running().await.is_empty());
}

#[tokio::test]
async fn a_dead_vm_is_not_adopted_and_its_leftovers_are_removed() {
    let s = Scene::new("dead");
    let b = FirecrackerBackend::new(s.config()).unwrap();
    make_golden(&b).await;
    let vm = b.start("sess").await.unwrap();
    let pid = vm.handle["proc"]["pid"].as_u64().unwrap() as i32;
    rustix::process::kill_process(
        rustix::process::Pid::from_raw(pid).unwrap(),
        rustix::process::Signal::KILL,
    )
    .unwrap();
    wait_for("the killed VM to be dead", || {
        !std::fs::read_to_string(format!("/proc/{pid}/stat")).is_ok_and(|s| !s.contains(") Z"))
    })
    .await;
    assert!(!b.alive(&vm).await);
    assert!(b.adopt(&vm.handle).await.is_none());
    assert!(s.link_exists("vncgate-fc-0"));
    assert!(b.running().await.is_empty());
    assert_gone(&s, &vm);
}

#[tokio::test]
async fn a_jailed_clone_loads_runs_and_leaves_no_jail() {
    let s = Scene::new("jail");
    let mut cfg = s.config();
    let base = s.dir.join("jails");
    cfg.jailer = Some(JailerConfig {
        binary: jailer_bin(),
        uid: 65534,
        gid: 65534,
        chroot_base: base.clone(),
    });
    let b = FirecrackerBackend::new(cfg).unwrap();
    make_golden(&b).await;
    let vm = b.start("sess").await.unwrap();
    let jail = base.join("firecracker/vncgate-fc-0");
    assert_eq!(vm.handle["jail"], json!(jail));
    assert!(socket_of(&vm).starts_with(jail.join("root")));
    // The jailer exec'd into Firecracker, as nobody.
    let status =
        std::fs::read_to_string(format!("/proc/{}/status", vm.handle["proc"]["pid"])).unwrap();
    assert!(
        status
            .lines()
            .any(|l| l.starts_with("Uid:") && l.contains("65534")),
        "{status}"
    );
    b.push_data(&vm, &vm_data("sess")).await.unwrap();
    let api = ApiClient::new(socket_of(&vm), Duration::from_secs(5));
    assert_eq!(api.describe().await.unwrap().state, "Running");
    stopped_by_the_guest(&b, &vm).await;
    assert_gone(&s, &vm);
    assert!(!jail.exists());
}

/// `vncgate-controller --backend firecracker` from its flags alone: a missing snapshot flag
/// is refused by name; then a session's VM is a clone of the golden snapshot made here, its
/// data and network in MMDS, resumed. The test guest has no agent, so the session fails
/// after --boot-timeout naming the agent, and the controller stops the VM, leaving nothing.
#[tokio::test]
async fn the_controller_runs_sessions_on_firecracker_from_its_flags() {
    let s = Scene::new("cli");
    let cfg = s.config();
    make_golden(&FirecrackerBackend::new(cfg.clone()).unwrap()).await;
    let fc = firecracker_bin();
    let work = s.dir.join("ctl-vms");
    let mut args: Vec<String> = [
        "--backend",
        "firecracker",
        "--listen",
        "127.0.0.1:0",
        "--boot-timeout",
        "3",
        "--firecracker",
        fc.to_str().unwrap(),
        "--fc-netns",
        &s.netns,
        "--fc-bridge",
        "vncgatebr0",
        "--work-dir",
        work.to_str().unwrap(),
        "--fc-memory",
        cfg.golden.memory.to_str().unwrap(),
    ]
    .map(str::to_owned)
    .to_vec();
    let refused = Command::new(BIN).args(&args).output().unwrap();
    assert_eq!(refused.status.code(), Some(2));
    let stderr = String::from_utf8_lossy(&refused.stderr);
    assert!(
        stderr.contains("error: --backend firecracker needs --fc-vmstate FILE"),
        "{stderr}"
    );
    args.extend([
        "--fc-vmstate".into(),
        cfg.golden.vmstate.display().to_string(),
    ]);
    let log = s.dir.join("controller.log");
    let mut ctl = tokio::process::Command::new(BIN)
        .args(&args)
        .stdout(Stdio::piped())
        .stderr(std::fs::File::create(&log).unwrap())
        .kill_on_drop(true)
        .spawn()
        .unwrap();
    let mut out = tokio::io::BufReader::new(ctl.stdout.take().unwrap());
    let api = tokio::time::timeout(Duration::from_secs(20), async {
        use tokio::io::AsyncBufReadExt;
        let mut line = String::new();
        loop {
            line.clear();
            assert!(
                out.read_line(&mut line).await.unwrap() > 0,
                "the controller exited"
            );
            if let Some(a) = line
                .trim()
                .strip_prefix("vncgate-controller: listening on ")
            {
                return a.to_owned();
            }
        }
    })
    .await
    .unwrap_or_else(|_| {
        panic!(
            "no listening line; log: {}",
            std::fs::read_to_string(&log).unwrap_or_default()
        )
    });
    let http = reqwest::Client::new();
    let created = json_of(
        http.post(format!("{api}/api/sessions"))
            .json(&json!({"user_id": "me", "provider": "demo"})),
    )
    .await;
    let id = created["id"].as_str().unwrap().to_owned();

    let handle = work.join("0/handle.json");
    wait_for("the session's VM (slot 0)", || handle.is_file()).await;
    let h: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&handle).unwrap()).unwrap();
    assert_eq!(h["session"], json!(id));
    let vapi = ApiClient::new(h["api_socket"].as_str().unwrap(), Duration::from_secs(5));
    let deadline = Instant::now() + Duration::from_secs(10);
    while vapi.describe().await.map(|i| i.state).ok().as_deref() != Some("Running") {
        assert!(Instant::now() < deadline, "the VM was never resumed");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let doc =
        Document::parse(&serde_json::to_vec(&vapi.get_mmds().await.unwrap()).unwrap()).unwrap();
    let data: VmData = serde_json::from_slice(&doc.vm_data.unwrap()).unwrap();
    assert_eq!(
        (data.session_id.as_str(), data.provider.as_str()),
        (id.as_str(), "demo")
    );
    assert_eq!(data.controller_url, api);
    assert_eq!(doc.network.unwrap().ip, Ipv4Addr::new(172, 30, 0, 2));

    let end = json_of(http.get(format!(
        "{api}/api/sessions/{id}/wait?state=ready&timeout=30"
    )))
    .await;
    assert_eq!(end["state"], "failed", "{end}");
    let reason = end["reason"].as_str().unwrap_or_default();
    assert!(reason.contains("agent 172.30.0.2:8080"), "{reason}");
    let dir = work.join("0");
    wait_for("the failed session's VM to be removed", || !dir.exists()).await;
    assert!(!s.link_exists("vncgate-fc-0"));
    ctl.kill().await.unwrap();
}

/// `vncgate-controller golden firecracker-snapshot` refuses a golden VM whose agent never
/// answers (the test guest has none), naming the port, and writes nothing; and it refuses
/// --fc-netns (run under `ip netns exec` instead), as this test does.
#[tokio::test]
async fn the_golden_command_refuses_a_vm_without_an_agent_and_writes_nothing() {
    let s = Scene::new("goldcli");
    let (vmstate, memory) = (s.dir.join("g/golden.vmstate"), s.dir.join("g/golden.mem"));
    let args = |extra: &[&str]| {
        let mut a: Vec<String> = [
            "golden",
            "firecracker-snapshot",
            "--kernel",
            s.dir.join("guest.elf").to_str().unwrap(),
            "--memory-mib",
            "32",
            "--vcpus",
            "1",
            "--boot-timeout",
            "2",
            "--firecracker",
            firecracker_bin().to_str().unwrap(),
            "--fc-bridge",
            "vncgatebr0",
            "--work-dir",
            s.dir.join("vms").to_str().unwrap(),
            "--fc-vmstate",
            vmstate.to_str().unwrap(),
            "--fc-memory",
            memory.to_str().unwrap(),
        ]
        .map(str::to_owned)
        .to_vec();
        a.extend(extra.iter().map(|e| (*e).to_owned()));
        a
    };
    let out = Command::new(BIN)
        .args(args(&["--fc-netns", &s.netns]))
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{err}");
    assert!(err.contains("--fc-netns: "), "{err}");
    let out = Command::new("ip")
        .args(["netns", "exec", &s.netns, BIN])
        .args(args(&[]))
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{err}");
    assert!(
        err.contains(
            "golden firecracker-snapshot: port 8080 (agent) did not answer HTTP within 2s"
        ),
        "{err}"
    );
    assert!(err.contains(UP), "the console's tail: {err}");
    for f in [&vmstate, &memory] {
        assert!(!f.exists(), "{}", f.display());
    }
    assert!(!std::fs::read_dir(s.dir.join("g")).unwrap().any(|_| true));
    assert!(!s.link_exists("vncgate-fc-g"));
}

/// A real guest (kernel, rootfs with the agent under `--vm-data-mmds --apply-identity` and a
/// VNC server) on a host with hardware KVM: see controller/FIRECRACKER.md for the command.
/// Never counted as run by default.
#[tokio::test]
#[ignore = "needs hardware KVM, a guest kernel and a rootfs whose agent runs with --vm-data-mmds: VNCGATE_FC_GUEST_TEST=1 VNCGATE_FC_KERNEL=... VNCGATE_FC_ROOTFS=... (controller/FIRECRACKER.md)"]
async fn boots_a_real_guest_from_a_golden_snapshot() {
    assert_eq!(
        std::env::var("VNCGATE_FC_GUEST_TEST").as_deref(),
        Ok("1"),
        "set VNCGATE_FC_GUEST_TEST=1 with VNCGATE_FC_KERNEL and VNCGATE_FC_ROOTFS to run this test"
    );
    let path = |v: &str| {
        let p = PathBuf::from(std::env::var_os(v).unwrap_or_else(|| panic!("set {v}")));
        assert!(p.is_file(), "{v}={} is not a file", p.display());
        p
    };
    let (kernel, rootfs) = (path("VNCGATE_FC_KERNEL"), path("VNCGATE_FC_ROOTFS"));
    let s = Scene::new("guest");
    let mut cfg = s.config();
    cfg.cold_boot = Some(ColdBoot {
        kernel,
        rootfs: Some(rootfs.clone()),
        boot_args: ColdBoot::DEFAULT_BOOT_ARGS.into(),
    });
    cfg.golden.files = vec![rootfs];
    cfg.vcpus = 2;
    cfg.memory_mib = 1024;
    let b = FirecrackerBackend::new(cfg).unwrap();
    // From inside the namespace only: the guest's addresses are there. Any HTTP answer's
    // JSON body (curl without -f: a 503 is an answer too).
    let health = |addr: SocketAddr| {
        let out = Command::new("ip")
            .args(["netns", "exec", &s.netns, "curl", "-s", "-m", "1"])
            .arg(format!("http://{addr}/health"))
            .output()
            .ok()?;
        serde_json::from_slice::<serde_json::Value>(&out.stdout).ok()
    };
    // Ready as the controller means it: the agent's /health is 200 (data, identity and
    // network applied) and the VNC port completes the RFB handshake to ServerInit; both
    // asked from inside the namespace.
    let desktop = |addr: SocketAddr| {
        Command::new("ip")
            .args([
                "netns",
                "exec",
                &s.netns,
                BIN,
                "probe",
                "--desktop",
                "--vnc",
            ])
            .arg(addr.to_string())
            .stdout(Stdio::null())
            .status()
            .is_ok_and(|st| st.success())
    };
    let golden = b.boot_golden().await.unwrap();
    let golden_agent = SocketAddr::from((b.config().subnet.golden(), b.config().agent_port));
    let golden_vnc = SocketAddr::from((b.config().subnet.golden(), b.config().vnc_port));
    let deadline = Instant::now() + Duration::from_secs(120);
    let waiting = loop {
        // Any answer: before its data the agent says what it waits for (503).
        if let Some(body) = health(golden_agent)
            && desktop(golden_vnc)
        {
            break body;
        }
        assert!(
            Instant::now() < deadline,
            "the golden guest's agent or VNC port never answered; console: {}",
            golden.console.display()
        );
        tokio::time::sleep(Duration::from_millis(500)).await;
    };
    assert_eq!(waiting["status"], "waiting", "{waiting}");
    assert!(
        waiting["reason"]
            .as_str()
            .unwrap_or_default()
            .contains("MMDS at http://169.254.169.254"),
        "the golden image's agent does not read MMDS (--vm-data-mmds): {waiting}"
    );
    golden.snapshot().await.unwrap();
    let vm = b.start("guest-1").await.unwrap();
    b.push_data(&vm, &vm_data("guest-1")).await.unwrap();
    let deadline = Instant::now() + Duration::from_secs(60);
    let ok = loop {
        if let Some(body) = health(vm.addrs.agent)
            && body["status"] == "ok"
            && desktop(vm.addrs.vnc)
        {
            break body;
        }
        assert!(
            Instant::now() < deadline,
            "the clone never became ready at {} (agent: {:?})",
            vm.addrs.agent,
            health(vm.addrs.agent)
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    };
    assert_eq!(ok["session_id"], "guest-1", "{ok}");
    assert_eq!(ok["identity"]["applied"], true, "{ok}");
    assert_eq!(ok["identity"]["rng_reseeded"], true, "{ok}");
    assert_eq!(ok["network"]["ip"], json!(vm.addrs.agent.ip()), "{ok}");
    assert_eq!(ok["network"]["errors"], json!([]), "{ok}");
    stopped_by_the_guest(&b, &vm).await;
    assert_gone(&s, &vm);
}
