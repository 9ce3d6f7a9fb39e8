//! What the proxies cost, read from `/proc`: CPU time and memory of a process and all its
//! descendants. Descendants matter because websockify forks one worker per connection;
//! vncgate and websocat are single processes and their tree is just themselves.

use std::collections::HashMap;
use std::fs;

/// Fields of `/proc/PID/stat` after the `comm` field, counted from 0 (field 3 of proc(5) is 0).
const STAT_PPID: usize = 1;
const STAT_UTIME: usize = 11;
const STAT_STIME: usize = 12;
const STAT_CUTIME: usize = 13;
const STAT_CSTIME: usize = 14;

fn stat_fields(pid: u32) -> Option<Vec<u64>> {
    let s = fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // `comm` may contain spaces and parentheses: the fields start after the last ')'.
    let rest = &s[s.rfind(')')? + 1..];
    Some(
        rest.split_ascii_whitespace()
            .map(|f| f.parse().unwrap_or(0))
            .collect(),
    )
}

/// `roots` and every process below them.
pub fn tree(roots: &[u32]) -> Vec<u32> {
    let mut children: HashMap<u32, Vec<u32>> = HashMap::new();
    if let Ok(dir) = fs::read_dir("/proc") {
        for e in dir.flatten() {
            let Some(pid) = e.file_name().to_str().and_then(|n| n.parse::<u32>().ok()) else {
                continue;
            };
            if let Some(f) = stat_fields(pid)
                && f.len() > STAT_PPID
            {
                children.entry(f[STAT_PPID] as u32).or_default().push(pid);
            }
        }
    }
    let mut out = roots.to_vec();
    let mut i = 0;
    while i < out.len() {
        if let Some(c) = children.get(&out[i]) {
            out.extend(c.iter().copied().filter(|p| !roots.contains(p)));
        }
        i += 1;
    }
    out
}

/// CPU seconds (user + system) used so far by `roots` and their descendants, including
/// descendants that already exited and were reaped (their time sits in `cutime`/`cstime`
/// of the parent).
pub fn cpu_seconds(roots: &[u32]) -> f64 {
    let ticks: u64 = tree(roots)
        .into_iter()
        .filter_map(stat_fields)
        .filter(|f| f.len() > STAT_CSTIME)
        .map(|f| f[STAT_UTIME] + f[STAT_STIME] + f[STAT_CUTIME] + f[STAT_CSTIME])
        .sum();
    ticks as f64 / rustix::param::clock_ticks_per_second() as f64
}

/// Resident and proportional set size in KiB, summed over the tree. Summed RSS counts
/// shared pages once per process (it overstates forking servers); PSS splits them.
pub use vncgate_loadtest::procmem::Memory;

/// The memory of `roots` and their descendants. A root whose memory cannot be read fails
/// the measurement (a figure of 0 KiB would be reported as a result); a descendant that
/// exited between the listing and the read is skipped.
pub fn memory(roots: &[u32]) -> Result<Memory, String> {
    let mut m = Memory::default();
    for pid in tree(roots) {
        match vncgate_loadtest::procmem::read(pid) {
            Ok(p) => {
                m.rss_kib += p.rss_kib;
                m.pss_kib += p.pss_kib;
            }
            Err(e) if roots.contains(&pid) => return Err(format!("memory of pid {pid}: {e}")),
            Err(_) => {}
        }
    }
    Ok(m)
}
