//! Every way a relayed session ends, by name.
//!
//! A browser learns nothing from a failed HTTP handshake but close code 1006, so once a
//! client is authenticated every failure completes the upgrade and closes with a code and a
//! short reason from this table. Each cause carries who is to blame (the browser, the VM or
//! the gateway) and a metric label; the README publishes the table. Reasons never contain
//! the VM's address.

use vncgate_ws::frame::ProtocolError;

/// Whose fault an ending is, in pingora's terms: downstream, upstream or internal, plus the
/// endings that are nobody's fault because a rule said so.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Blame {
    Browser,
    Vm,
    /// A fault of the gateway itself (or of a dependency it could not reach): page on it.
    Gateway,
    /// A rule did its job: the session expired, was revoked, hit its viewer or duration
    /// limit, pointed outside the upstream policy; the gateway is draining or full.
    Policy,
}

impl Blame {
    pub fn as_str(self) -> &'static str {
        match self {
            Blame::Browser => "browser",
            Blame::Vm => "vm",
            Blame::Gateway => "gateway",
            Blame::Policy => "policy",
        }
    }
}

/// A close the gateway sends: code, reason for the browser, metric label, blame.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct CloseCause {
    pub code: u16,
    pub reason: &'static str,
    pub name: &'static str,
    pub blame: Blame,
}

const fn cause(code: u16, reason: &'static str, name: &'static str, blame: Blame) -> CloseCause {
    CloseCause {
        code,
        reason,
        name,
        blame,
    }
}

pub const GOING_AWAY: CloseCause = cause(1001, "gateway shutting down", "drain", Blame::Policy);
pub const INTERNAL: CloseCause = cause(1011, "gateway internal error", "internal", Blame::Gateway);

pub const UPSTREAM_REFUSED: CloseCause =
    cause(4000, "vm vnc port refused", "upstream_refused", Blame::Vm);
pub const UPSTREAM_UNREACHABLE: CloseCause =
    cause(4001, "vm unreachable", "upstream_unreachable", Blame::Vm);
pub const UPSTREAM_TIMEOUT: CloseCause =
    cause(4002, "vm connect timed out", "upstream_timeout", Blame::Vm);
pub const UPSTREAM_CLOSED: CloseCause =
    cause(4003, "upstream closed", "upstream_closed", Blame::Vm);
pub const UPSTREAM_ERROR: CloseCause = cause(
    4004,
    "upstream connection error",
    "upstream_error",
    Blame::Vm,
);
pub const SESSION_EXPIRED: CloseCause =
    cause(4005, "session expired", "session_expired", Blame::Policy);
pub const SESSION_REVOKED: CloseCause =
    cause(4006, "session revoked", "session_revoked", Blame::Policy);
pub const IDLE_TIMEOUT: CloseCause = cause(4007, "idle timeout", "idle_timeout", Blame::Browser);
pub const KEEPALIVE_TIMEOUT: CloseCause = cause(
    4008,
    "keepalive timeout",
    "keepalive_timeout",
    Blame::Browser,
);
pub const TOO_MANY_VIEWERS: CloseCause =
    cause(4009, "too many viewers", "too_many_viewers", Blame::Policy);
pub const UPSTREAM_FORBIDDEN: CloseCause = cause(
    4010,
    "vm address not allowed by gateway policy",
    "upstream_forbidden",
    Blame::Policy,
);
pub const MAX_DURATION: CloseCause = cause(
    4011,
    "session duration limit reached",
    "max_duration",
    Blame::Policy,
);

/// The published table (README, tests): every code the gateway itself may send.
pub const TABLE: &[CloseCause] = &[
    GOING_AWAY,
    INTERNAL,
    UPSTREAM_REFUSED,
    UPSTREAM_UNREACHABLE,
    UPSTREAM_TIMEOUT,
    UPSTREAM_CLOSED,
    UPSTREAM_ERROR,
    SESSION_EXPIRED,
    SESSION_REVOKED,
    IDLE_TIMEOUT,
    KEEPALIVE_TIMEOUT,
    TOO_MANY_VIEWERS,
    UPSTREAM_FORBIDDEN,
    MAX_DURATION,
];

/// A protocol violation by the browser, as a close cause (1002, 1003, 1007, 1009).
pub fn protocol(e: ProtocolError) -> CloseCause {
    let name = match e.code {
        1003 => "text_frame",
        1007 => "invalid_payload",
        1009 => "message_too_big",
        _ => "protocol_error",
    };
    cause(e.code, e.reason, name, Blame::Browser)
}

/// The cause for a failed upstream dial, from the last error seen.
pub fn connect_failure(e: &std::io::Error) -> CloseCause {
    use std::io::ErrorKind::*;
    match e.kind() {
        ConnectionRefused => UPSTREAM_REFUSED,
        TimedOut => UPSTREAM_TIMEOUT,
        HostUnreachable | NetworkUnreachable | AddrNotAvailable => UPSTREAM_UNREACHABLE,
        _ => match e.raw_os_error() {
            Some(libc::EHOSTUNREACH | libc::ENETUNREACH | libc::EHOSTDOWN) => UPSTREAM_UNREACHABLE,
            _ => UPSTREAM_ERROR,
        },
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn codes_are_unique_and_reasons_fit_a_close_frame() {
        for (i, a) in TABLE.iter().enumerate() {
            assert!(a.reason.len() <= 123, "{}", a.reason);
            assert!(
                vncgate_ws::frame::is_valid_received_code(a.code),
                "{} not sendable",
                a.code
            );
            for b in &TABLE[i + 1..] {
                assert_ne!(a.code, b.code);
                assert_ne!(a.name, b.name);
            }
        }
    }

    #[test]
    fn connect_errors_map_by_kind() {
        let refused = std::io::Error::from_raw_os_error(libc::ECONNREFUSED);
        assert_eq!(connect_failure(&refused), UPSTREAM_REFUSED);
        let unreach = std::io::Error::from_raw_os_error(libc::EHOSTUNREACH);
        assert_eq!(connect_failure(&unreach), UPSTREAM_UNREACHABLE);
        let t = std::io::Error::from(std::io::ErrorKind::TimedOut);
        assert_eq!(connect_failure(&t), UPSTREAM_TIMEOUT);
    }
}
