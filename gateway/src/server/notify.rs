//! systemd's readiness protocol (`sd_notify(3)`), the two messages the gateway sends: once
//! it serves, `READY=1` with `MAINPID=` (its own pid), so that a gateway started by
//! `ExecReload` (see `config/systemd/vncgate.service`) becomes the unit's main process in
//! place of the one it took over from. Nothing is sent without `$NOTIFY_SOCKET`.

use std::os::linux::net::SocketAddrExt as _;
use std::os::unix::net::{SocketAddr, UnixDatagram};

/// Sends `state` to `$NOTIFY_SOCKET`, if set; failures are logged, never fatal.
pub fn notify(state: &str) {
    let Some(target) = std::env::var_os("NOTIFY_SOCKET") else {
        return;
    };
    let target = target.to_string_lossy().into_owned();
    let sent = (|| {
        // A leading '@' names an abstract socket.
        let addr = match target.strip_prefix('@') {
            Some(name) => SocketAddr::from_abstract_name(name.as_bytes())?,
            None => SocketAddr::from_pathname(&target)?,
        };
        let sock = UnixDatagram::unbound()?;
        sock.send_to_addr(state.as_bytes(), &addr)
    })();
    if let Err(e) = sent {
        tracing::warn!(notify_socket = %target, error = %e, "cannot notify systemd");
    }
}

/// Tells systemd this process serves, and is the unit's main process from now on.
pub fn ready() {
    notify(&format!("READY=1\nMAINPID={}\n", std::process::id()));
}
