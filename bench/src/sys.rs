//! The only module with `unsafe`: three libc calls that std does not offer.
//!
//! Invariant: every call passes plain integers or a pointer to a local, initialised
//! `rlimit` that outlives the call; no memory is shared with the kernel afterwards.
#![allow(unsafe_code)]

/// Raises this process's soft `RLIMIT_NOFILE` to the hard limit (children inherit it, so the
/// proxies can hold as many sessions as the bench opens). Returns the new soft limit.
pub fn raise_nofile() -> std::io::Result<u64> {
    let mut lim = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: `lim` is a valid, writable rlimit for the duration of the call.
    if unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim) } != 0 {
        return Err(std::io::Error::last_os_error());
    }
    if lim.rlim_cur < lim.rlim_max {
        lim.rlim_cur = lim.rlim_max;
        // SAFETY: `lim` is a valid rlimit for the duration of the call.
        if unsafe { libc::setrlimit(libc::RLIMIT_NOFILE, &lim) } != 0 {
            return Err(std::io::Error::last_os_error());
        }
    }
    Ok(lim.rlim_cur)
}

/// Kernel clock ticks per second, the unit of `utime`/`stime` in `/proc/PID/stat`.
pub fn clock_ticks() -> u64 {
    // SAFETY: sysconf takes and returns integers.
    let t = unsafe { libc::sysconf(libc::_SC_CLK_TCK) };
    if t > 0 { t as u64 } else { 100 }
}

/// Sends SIGKILL to one process by pid (used for the descendants of a proxy the bench
/// started, e.g. websockify's per-connection workers; the proxy itself goes through
/// `Child::kill`).
pub fn kill(pid: u32) {
    // SAFETY: kill takes integers; a stale pid yields ESRCH, which we ignore.
    unsafe {
        libc::kill(pid as libc::pid_t, libc::SIGKILL);
    }
}
