//! What the backends share on the host: processes known by pid and start time (so a reused
//! pid is told apart, and a VM outlives a killed controller to be adopted), started in their
//! own process group with their output in a log; free loopback ports.

use std::net::{Ipv4Addr, TcpListener};
use std::path::Path;
use std::process::Stdio;

use serde::{Deserialize, Serialize};

use super::{Backend, BackendError, Vm};

/// A process by pid and start time (clock ticks after boot, /proc/PID/stat field 22), so a
/// reused pid is told apart.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub(crate) struct Proc {
    pub pid: u32,
    pub start: u64,
}

impl Proc {
    pub fn alive(&self) -> bool {
        proc_stat(self.pid).is_some_and(|(state, start)| start == self.start && state != 'Z')
    }

    pub fn signal(&self, sig: rustix::process::Signal) {
        if !self.alive() {
            return;
        }
        if let Some(pid) = rustix::process::Pid::from_raw(self.pid as i32) {
            // The process group: a shell's children go with it.
            let _ = rustix::process::kill_process_group(pid, sig);
        }
    }
}

/// (state, start time) from /proc/PID/stat.
pub(crate) fn proc_stat(pid: u32) -> Option<(char, u64)> {
    let s = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // Fields after the command, which may hold spaces and parentheses: state is field 3,
    // starttime field 22.
    let rest = &s[s.rfind(')')? + 2..];
    let mut f = rest.split_ascii_whitespace();
    let state = f.next()?.chars().next()?;
    let start = f.nth(18)?.parse().ok()?;
    Some((state, start))
}

/// The lowest port [`free_port`] hands out.
const FIRST_PICKED_PORT: u16 = 10_000;

/// A loopback port nothing is bound to now, for a VM process to listen on.
///
/// Picked below the kernel's ephemeral range (`net.ipv4.ip_local_port_range`) when that
/// leaves room: the port is free only until the VM's process binds it, and inside the range
/// any connect(2) or bind to port 0 on the host could take it meanwhile. That happened: an
/// agent started on such a port exited with "Address already in use", and its session
/// never got past `booting`. Without room below the range, the kernel picks.
pub(crate) fn free_port() -> Result<u16, BackendError> {
    let below = std::fs::read_to_string("/proc/sys/net/ipv4/ip_local_port_range")
        .ok()
        .and_then(|r| r.split_ascii_whitespace().next()?.parse::<u16>().ok())
        .filter(|&low| low > FIRST_PICKED_PORT);
    if let Some(low) = below {
        let span = low - FIRST_PICKED_PORT;
        let start = rand::random_range(0..span);
        let found = (0..span.min(256))
            .map(|i| FIRST_PICKED_PORT + (start + i) % span)
            .find(|&p| TcpListener::bind((Ipv4Addr::LOCALHOST, p)).is_ok());
        if let Some(p) = found {
            return Ok(p);
        }
    }
    TcpListener::bind((Ipv4Addr::LOCALHOST, 0))
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .map_err(|e| BackendError(format!("no free loopback port: {e}")))
}

/// Starts `program` in `dir`, its own process group, output to `dir/{name}.log`; reaped by a
/// task when it exits.
pub(crate) fn spawn(
    dir: &Path,
    name: &str,
    program: &Path,
    args: &[String],
) -> Result<Proc, BackendError> {
    let log = std::fs::File::create(dir.join(format!("{name}.log")))
        .map_err(|e| BackendError(format!("{name} log in {}: {e}", dir.display())))?;
    let log2 = log
        .try_clone()
        .map_err(|e| BackendError(format!("{name} log: {e}")))?;
    let mut child = tokio::process::Command::new(program)
        .args(args)
        .current_dir(dir)
        .stdin(Stdio::null())
        .stdout(log)
        .stderr(log2)
        // Its own group: it outlives a killed controller (to be adopted), and a stop
        // reaches a shell's children.
        .process_group(0)
        .spawn()
        .map_err(|e| BackendError(format!("cannot start {name} ({}): {e}", program.display())))?;
    let pid = child
        .id()
        .ok_or_else(|| BackendError(format!("{name} exited at once")))?;
    let start = proc_stat(pid)
        .map(|(_, s)| s)
        .ok_or_else(|| BackendError(format!("{name} (pid {pid}) exited at once")))?;
    // Reaped when it exits, so a dead VM process is gone from /proc, not a zombie.
    tokio::spawn(async move {
        let _ = child.wait().await;
    });
    Ok(Proc { pid, start })
}

/// The VMs of `backend` that run from the directories under `work_dir`: each directory's
/// `handle.json`, adopted by the backend (which tells its own handles and live processes);
/// a directory without a readable handle is skipped.
pub(crate) async fn running_in<B: Backend>(backend: &B, work_dir: &Path) -> Vec<Vm> {
    let Ok(dirs) = std::fs::read_dir(work_dir) else {
        return Vec::new();
    };
    let handles: Vec<serde_json::Value> = dirs
        .flatten()
        .filter_map(|d| std::fs::read_to_string(d.path().join("handle.json")).ok())
        .filter_map(|t| serde_json::from_str(&t).ok())
        .collect();
    let mut out = Vec::new();
    for h in handles {
        if let Some(vm) = backend.adopt(&h).await {
            out.push(vm);
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The ports handed out lie below the ephemeral range, where no connect(2) or bind to
    /// port 0 takes them before the VM's process binds them, and are free.
    #[test]
    fn free_ports_come_from_below_the_ephemeral_range() {
        let range = std::fs::read_to_string("/proc/sys/net/ipv4/ip_local_port_range").unwrap();
        let low: u16 = range
            .split_ascii_whitespace()
            .next()
            .unwrap()
            .parse()
            .unwrap();
        for _ in 0..20 {
            let p = free_port().unwrap();
            if low > FIRST_PICKED_PORT {
                assert!(
                    (FIRST_PICKED_PORT..low).contains(&p),
                    "{p} outside {FIRST_PICKED_PORT}..{low}"
                );
            }
            TcpListener::bind((Ipv4Addr::LOCALHOST, p)).expect("the port is free");
        }
    }
}
