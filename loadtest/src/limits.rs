//! Process limits a load test runs into first.

use tracing::{debug, warn};

/// Raises the soft `RLIMIT_NOFILE` to the hard limit, so thousands of sessions (each one or
/// two sockets) fit; returns the limit now in force, or `None` where it cannot be read.
pub fn raise_nofile() -> Option<u64> {
    match rlimit::increase_nofile_limit(u64::MAX) {
        Ok(n) => {
            debug!(limit = n, "RLIMIT_NOFILE");
            Some(n)
        }
        Err(e) => {
            warn!(error = %e, "could not raise RLIMIT_NOFILE");
            None
        }
    }
}
