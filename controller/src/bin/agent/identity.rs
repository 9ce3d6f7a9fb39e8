//! Per-clone identity. Every VM restored from one snapshot wakes with the snapshot's clock,
//! the snapshot's kernel RNG state and the snapshot's machine id; two clones would draw the
//! same "random" TLS keys and session cookies. With `--apply-identity` the agent, on each
//! per-VM data it receives, sets the clock to the controller's, mixes the controller's fresh
//! entropy into the kernel pool and forces the CRNG to reseed from it (`RNDADDENTROPY` then
//! `RNDRESEEDCRNG`), and writes a new machine id drawn after the reseed. The [`Report`] says
//! what it did, and `/health` carries it: the controller does not count a cloned VM ready
//! without one that applied everything.
//!
//! The two ioctls are the only `unsafe` of the controller crate, in [`sys`].

use std::path::Path;
use std::time::{SystemTime, UNIX_EPOCH};

use serde::Serialize;

/// What the agent did with one VM data's identity, as `/health` reports it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Report {
    /// Whether the agent was asked to apply identity (`--apply-identity`, inside a VM).
    pub applied: bool,
    /// The guest's clock before and after, Unix milliseconds.
    pub clock_was_ms: u64,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub clock_set_ms: Option<u64>,
    /// Bytes of the controller's entropy mixed in, and whether the CRNG reseeded from them.
    pub entropy_bytes: usize,
    pub rng_reseeded: bool,
    /// The machine id now in `/etc/machine-id`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub machine_id: Option<String>,
    /// 16 bytes from the kernel RNG after all of the above (hex): two clones that reseeded
    /// show different samples.
    pub rng_sample: String,
    /// What failed, one line per step; empty when everything applied.
    pub errors: Vec<String>,
}

fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

fn urandom(n: usize) -> std::io::Result<Vec<u8>> {
    use std::io::Read;
    let mut buf = vec![0; n];
    std::fs::File::open("/dev/urandom")?.read_exact(&mut buf)?;
    Ok(buf)
}

/// Applies `clock_ms` and `entropy` (when `apply`), and reports. Without `apply` (the
/// `process` backend, where the "VM" is the host) nothing is changed, and the report says so.
pub fn apply(apply: bool, clock_ms: u64, entropy: &[u8], machine_id_path: &Path) -> Report {
    let mut errors = Vec::new();
    let clock_was_ms = now_ms();
    let mut report = Report {
        applied: apply,
        clock_was_ms,
        clock_set_ms: None,
        entropy_bytes: 0,
        rng_reseeded: false,
        machine_id: None,
        rng_sample: String::new(),
        errors: Vec::new(),
    };
    if apply {
        let ts = rustix::time::Timespec {
            tv_sec: (clock_ms / 1000) as i64,
            tv_nsec: ((clock_ms % 1000) * 1_000_000) as _,
        };
        match rustix::time::clock_settime(rustix::time::ClockId::Realtime, ts) {
            Ok(()) => report.clock_set_ms = Some(clock_ms),
            Err(e) => errors.push(format!("clock: clock_settime: {e}")),
        }
        match check_entropy(entropy)
            .and_then(|()| sys::add_entropy_and_reseed(entropy).map_err(|e| e.to_string()))
        {
            Ok(()) => {
                report.entropy_bytes = entropy.len();
                report.rng_reseeded = true;
            }
            Err(e) => errors.push(format!("rng: {e}")),
        }
        match urandom(16).and_then(|id| {
            let id = hex::encode(id);
            write_whole(machine_id_path, format!("{id}\n").as_bytes())?;
            Ok(id)
        }) {
            Ok(id) => report.machine_id = Some(id),
            Err(e) => errors.push(format!("machine id: {}: {e}", machine_id_path.display())),
        }
    } else {
        report.machine_id = std::fs::read_to_string(machine_id_path)
            .ok()
            .map(|s| s.trim().to_owned());
    }
    match urandom(16) {
        Ok(s) => report.rng_sample = hex::encode(s),
        Err(e) => errors.push(format!("rng sample: {e}")),
    }
    report.errors = errors;
    report
}

/// The controller's entropy must be enough to matter (16 bytes; it sends 32).
fn check_entropy(entropy: &[u8]) -> Result<(), String> {
    if entropy.len() < 16 {
        return Err(format!(
            "the vm data carries {} bytes of entropy, at least 16 are needed",
            entropy.len()
        ));
    }
    Ok(())
}

/// Writes `bytes` to `path` by rename, so a reader never sees half of it.
fn write_whole(path: &Path, bytes: &[u8]) -> std::io::Result<()> {
    let tmp = path.with_extension("vncgate-tmp");
    std::fs::write(&tmp, bytes)?;
    std::fs::rename(&tmp, path)
}

#[allow(unsafe_code)]
mod sys {
    use std::os::fd::AsRawFd;

    /// `_IOW('R', 0x03, int[2])`
    const RNDADDENTROPY: libc::c_ulong = 0x4008_5203;
    /// `_IO('R', 0x07)`
    const RNDRESEEDCRNG: libc::c_ulong = 0x5207;

    /// Mixes `entropy` into the input pool, credited at 8 bits a byte (the controller drew it
    /// from its own kernel's RNG for this VM alone), then forces the CRNG to reseed.
    pub fn add_entropy_and_reseed(entropy: &[u8]) -> std::io::Result<()> {
        let random = std::fs::OpenOptions::new()
            .write(true)
            .open("/dev/random")?;
        // struct rand_pool_info { int entropy_count; int buf_size; __u32 buf[]; }
        let mut info: Vec<u8> = Vec::with_capacity(8 + entropy.len());
        info.extend_from_slice(&((entropy.len() * 8) as libc::c_int).to_ne_bytes());
        info.extend_from_slice(&(entropy.len() as libc::c_int).to_ne_bytes());
        info.extend_from_slice(entropy);
        // Keep the buffer u32-aligned for the kernel's `__u32 buf[]` (and padded to it).
        let words: Vec<u32> = info
            .chunks(4)
            .map(|c| {
                let mut w = [0u8; 4];
                w[..c.len()].copy_from_slice(c);
                u32::from_ne_bytes(w)
            })
            .collect();
        // SAFETY: `words` is a live, aligned rand_pool_info whose buf_size matches the bytes
        // that follow the header; the kernel only reads it.
        if unsafe { libc::ioctl(random.as_raw_fd(), RNDADDENTROPY as _, words.as_ptr()) } != 0 {
            return Err(std::io::Error::other(format!(
                "RNDADDENTROPY: {}",
                std::io::Error::last_os_error()
            )));
        }
        // SAFETY: RNDRESEEDCRNG takes no argument.
        if unsafe { libc::ioctl(random.as_raw_fd(), RNDRESEEDCRNG as _) } != 0 {
            return Err(std::io::Error::other(format!(
                "RNDRESEEDCRNG: {}",
                std::io::Error::last_os_error()
            )));
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn without_apply_nothing_changes_and_the_report_says_so() {
        let dir = std::env::temp_dir().join(format!("vncgate-identity-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let id = dir.join("machine-id");
        std::fs::write(&id, "0123456789abcdef0123456789abcdef\n").unwrap();
        let r = apply(false, 1, &[7; 32], &id);
        assert!(!r.applied);
        assert_eq!(r.clock_set_ms, None);
        assert!(!r.rng_reseeded);
        assert_eq!(
            r.machine_id.as_deref(),
            Some("0123456789abcdef0123456789abcdef")
        );
        assert_eq!(r.rng_sample.len(), 32);
        assert!(r.errors.is_empty(), "{:?}", r.errors);
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn too_little_entropy_is_refused_before_any_ioctl() {
        assert_eq!(
            check_entropy(&[1; 4]).unwrap_err(),
            "the vm data carries 4 bytes of entropy, at least 16 are needed"
        );
        assert_eq!(check_entropy(&[1; 16]), Ok(()));
    }
}
