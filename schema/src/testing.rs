//! Real, managed Redis servers (feature `testing`): standalone (by default with an
//! append-only file, so a restart keeps the routes, as a production Redis would), a 3-master
//! Cluster, and a Sentinel, on free loopback ports, killed when dropped. The one place that
//! starts a `redis-server`: the gateway's and the controller's integration tests use the
//! panicking constructors, the routing benchmark [`RedisServer::launch`] with its own binary
//! and log file. `scripts/test.sh` installs `redis-server`; without it the test constructors
//! panic and say so.

use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::thread;
use std::time::Duration;

fn tool(name: &'static str) -> &'static str {
    let found = Command::new(name)
        .arg("--version")
        .stdout(Stdio::null())
        .status()
        .is_ok();
    assert!(
        found,
        "{name} not found: scripts/test.sh installs it (apt-get install redis-server)"
    );
    name
}

/// A loopback port that is free now, and whose cluster bus port (+10000) is too.
pub fn free_port() -> u16 {
    for _ in 0..200 {
        let l = TcpListener::bind("127.0.0.1:0").unwrap();
        let p = l.local_addr().unwrap().port();
        if p < 55_000 && TcpListener::bind(("127.0.0.1", p + 10_000)).is_ok() {
            return p;
        }
    }
    panic!("no free port pair");
}

fn scratch_dir(tag: &str) -> PathBuf {
    let d = std::env::temp_dir().join(format!(
        "vncgate-redis-{tag}-{}-{:x}",
        std::process::id(),
        rand_u64()
    ));
    std::fs::create_dir_all(&d).unwrap();
    d
}

fn rand_u64() -> u64 {
    use std::hash::{BuildHasher, Hasher};
    let mut h = std::collections::hash_map::RandomState::new().build_hasher();
    h.write_u64(1);
    h.finish()
}

/// Sends one inline command and returns the first reply line.
pub fn command(port: u16, cmd: &str) -> Option<String> {
    let mut s = TcpStream::connect(("127.0.0.1", port)).ok()?;
    s.set_read_timeout(Some(Duration::from_secs(2))).ok()?;
    s.write_all(format!("{cmd}\r\n").as_bytes()).ok()?;
    let mut buf = [0u8; 4096];
    let n = s.read(&mut buf).ok()?;
    Some(String::from_utf8_lossy(&buf[..n]).into_owned())
}

/// How to run a managed `redis-server`.
#[derive(Debug, Clone)]
pub struct Options {
    /// The binary [default: `redis-server` on `PATH`].
    pub exe: PathBuf,
    /// An append-only file, fsynced on every write, so a restart keeps the data.
    pub persistent: bool,
    /// Where the server's output goes [default: nowhere].
    pub log: Option<PathBuf>,
    /// More `redis-server` flags.
    pub extra: Vec<String>,
}

impl Default for Options {
    fn default() -> Self {
        Self {
            exe: PathBuf::from("redis-server"),
            persistent: true,
            log: None,
            extra: Vec::new(),
        }
    }
}

/// The commands a [`RedisServer::monitor`] saw so far.
#[derive(Clone, Default)]
pub struct Monitor(std::sync::Arc<std::sync::Mutex<Vec<(std::time::Instant, String)>>>);

impl Monitor {
    /// The commands seen so far, with when.
    pub fn seen(&self) -> Vec<(std::time::Instant, String)> {
        self.0.lock().unwrap_or_else(|p| p.into_inner()).clone()
    }
}

pub struct RedisServer {
    child: Option<Child>,
    pub port: u16,
    dir: PathBuf,
    opts: Options,
}

impl RedisServer {
    pub fn start() -> RedisServer {
        Self::start_with(&[])
    }

    pub fn start_with(extra: &[&str]) -> RedisServer {
        tool("redis-server");
        Self::launch(Options {
            extra: extra.iter().map(|s| s.to_string()).collect(),
            ..Options::default()
        })
        .unwrap_or_else(|e| panic!("{e}"))
    }

    /// Starts a server on a free loopback port and waits (10 s at most) until it answers
    /// PING; the error says why not.
    pub fn launch(opts: Options) -> Result<RedisServer, String> {
        let mut r = RedisServer {
            child: None,
            port: free_port(),
            dir: scratch_dir("node"),
            opts,
        };
        r.spawn()?;
        Ok(r)
    }

    fn spawn(&mut self) -> Result<(), String> {
        let o = &self.opts;
        let persistence: &[&str] = if o.persistent {
            &["--appendonly", "yes", "--appendfsync", "always"]
        } else {
            &["--appendonly", "no"]
        };
        let (stdout, stderr) = match &o.log {
            None => (Stdio::null(), Stdio::null()),
            Some(path) => {
                let f =
                    std::fs::File::create(path).map_err(|e| format!("{}: {e}", path.display()))?;
                let g = f.try_clone().map_err(|e| e.to_string())?;
                (Stdio::from(f), Stdio::from(g))
            }
        };
        let mut child = Command::new(&o.exe)
            .args([
                "--port",
                &self.port.to_string(),
                "--bind",
                "127.0.0.1",
                "--dir",
                self.dir.to_str().unwrap(),
                "--save",
                "",
                "--protected-mode",
                "no",
            ])
            .args(persistence)
            .args(&o.extra)
            .stdout(stdout)
            .stderr(stderr)
            .spawn()
            .map_err(|e| format!("cannot start {}: {e}", o.exe.display()))?;
        let mut exited = None;
        let ok = eventually(Duration::from_secs(10), || {
            if let Ok(Some(st)) = child.try_wait() {
                exited = Some(st);
                return true;
            }
            command(self.port, "PING").is_some_and(|r| r.starts_with("+PONG"))
        });
        if let Some(st) = exited {
            return Err(format!("redis-server on port {} exited: {st}", self.port));
        }
        self.child = Some(child);
        if !ok {
            self.kill();
            return Err(format!(
                "redis-server on port {} did not answer PING within 10 s",
                self.port
            ));
        }
        Ok(())
    }

    pub fn url(&self) -> String {
        format!("redis://127.0.0.1:{}", self.port)
    }

    /// Kills the server at once (SIGKILL), as a crash would.
    pub fn kill(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// Starts it again on the same port and data directory.
    pub fn restart(&mut self) {
        self.kill();
        self.spawn().unwrap_or_else(|e| panic!("{e}"));
    }

    /// Every command this server executes from now on, each with the instant it was read
    /// here (`MONITOR`): a watch over a whole test, not a look at one moment.
    pub fn monitor(&self) -> Monitor {
        use std::io::BufRead as _;
        let mut s = TcpStream::connect(("127.0.0.1", self.port)).expect("connect for MONITOR");
        s.write_all(b"MONITOR\r\n").expect("send MONITOR");
        let mut r = std::io::BufReader::new(s);
        let mut ok = String::new();
        r.read_line(&mut ok).expect("MONITOR's answer");
        assert_eq!(ok.trim(), "+OK", "MONITOR refused");
        let seen = Monitor::default();
        let out = seen.clone();
        thread::spawn(move || {
            for line in r.lines() {
                let Ok(line) = line else { return };
                out.0
                    .lock()
                    .unwrap_or_else(|p| p.into_inner())
                    .push((std::time::Instant::now(), line));
            }
        });
        seen
    }

    pub fn cli(&self, args: &[&str]) -> String {
        let out = Command::new(tool("redis-cli"))
            .args(["-p", &self.port.to_string()])
            .args(args)
            .output()
            .expect("run redis-cli");
        String::from_utf8_lossy(&out.stdout).into_owned()
    }
}

impl Drop for RedisServer {
    fn drop(&mut self) {
        self.kill();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// A Redis Cluster of three masters on loopback.
pub struct RedisCluster {
    pub nodes: Vec<RedisServer>,
}

impl RedisCluster {
    pub fn start() -> RedisCluster {
        let nodes: Vec<RedisServer> = (0..3)
            .map(|_| {
                RedisServer::start_with(&[
                    "--cluster-enabled",
                    "yes",
                    "--cluster-node-timeout",
                    "3000",
                ])
            })
            .collect();
        let addrs: Vec<String> = nodes
            .iter()
            .map(|n| format!("127.0.0.1:{}", n.port))
            .collect();
        let out = Command::new(tool("redis-cli"))
            .args(["--cluster", "create"])
            .args(&addrs)
            .args(["--cluster-replicas", "0", "--cluster-yes"])
            .output()
            .expect("redis-cli --cluster create");
        assert!(
            out.status.success(),
            "cluster create failed: {}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        let ok = eventually(Duration::from_secs(20), || {
            nodes
                .iter()
                .all(|n| n.cli(&["cluster", "info"]).contains("cluster_state:ok"))
        });
        assert!(ok, "cluster did not become ok");
        RedisCluster { nodes }
    }

    pub fn url(&self) -> String {
        let hosts: Vec<String> = self
            .nodes
            .iter()
            .map(|n| format!("127.0.0.1:{}", n.port))
            .collect();
        format!("redis+cluster://{}", hosts.join(","))
    }
}

/// One Sentinel watching a master named `mymaster`.
pub struct Sentinel {
    child: Child,
    pub port: u16,
    dir: PathBuf,
}

impl Sentinel {
    pub fn start(master: &RedisServer) -> Sentinel {
        let port = free_port();
        let dir = scratch_dir("sentinel");
        let conf = dir.join("sentinel.conf");
        std::fs::write(
            &conf,
            format!(
                "port {port}\nbind 127.0.0.1\nprotected-mode no\ndir {}\nsentinel monitor mymaster 127.0.0.1 {} 1\nsentinel down-after-milliseconds mymaster 5000\n",
                dir.display(),
                master.port
            ),
        )
        .unwrap();
        let child = Command::new(tool("redis-server"))
            .arg(&conf)
            .arg("--sentinel")
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("start redis sentinel");
        let ok = eventually(Duration::from_secs(10), || {
            command(port, "SENTINEL get-master-addr-by-name mymaster")
                .is_some_and(|r| r.contains(&master.port.to_string()))
        });
        assert!(ok, "sentinel on {port} did not come up");
        thread::sleep(Duration::from_millis(100));
        Sentinel { child, port, dir }
    }

    pub fn url(&self) -> String {
        format!("redis+sentinel://127.0.0.1:{}/mymaster", self.port)
    }
}

impl Drop for Sentinel {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// Waits until `f` holds or `within` passes.
fn eventually(within: Duration, mut f: impl FnMut() -> bool) -> bool {
    let deadline = std::time::Instant::now() + within;
    while std::time::Instant::now() < deadline {
        if f() {
            return true;
        }
        thread::sleep(Duration::from_millis(20));
    }
    f()
}
