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
/// A view-only viewer sent a message the gateway cannot size (an unknown type or sub-type, a
/// length its kind does not allow): nothing after it could be told from input, so the
/// viewer is closed rather than anything passed (`server::view_only`).
pub const VIEW_ONLY_UNSIZABLE: CloseCause = cause(
    4012,
    "view-only: message the gateway cannot size",
    "view_only_unsizable",
    Blame::Browser,
);
/// A view-only viewer chose a security type other than None and VNC Authentication, whose
/// messages the gateway cannot follow.
pub const VIEW_ONLY_SECURITY: CloseCause = cause(
    4013,
    "view-only: security type not followable (use None or VNC auth)",
    "view_only_security",
    Blame::Policy,
);
/// A view-only viewer speaks an RFB version other than 3.7 and 3.8 (3.3: the server picks
/// the security type, which the gateway does not see from the browser's side).
pub const VIEW_ONLY_VERSION: CloseCause = cause(
    4014,
    "view-only: RFB version not followable (need 3.7 or 3.8)",
    "view_only_version",
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
    VIEW_ONLY_UNSIZABLE,
    VIEW_ONLY_SECURITY,
    VIEW_ONLY_VERSION,
];

/// The metric names of the browser's protocol violations, by the close code the frame parser
/// gives them; any other code counts as 1002's.
pub const PROTOCOL: &[(u16, &str)] = &[
    (1002, "protocol_error"),
    (1003, "text_frame"),
    (1007, "invalid_payload"),
    (1009, "message_too_big"),
];

/// A protocol violation by the browser, as a close cause (1002, 1003, 1007, 1009).
pub fn protocol(e: ProtocolError) -> CloseCause {
    let name = PROTOCOL
        .iter()
        .find(|(code, _)| *code == e.code)
        .map_or(PROTOCOL[0].1, |(_, name)| name);
    cause(e.code, e.reason, name, Blame::Browser)
}

/// The metric names of the endings the browser chose: its own close (its code echoed), and
/// a connection that went away without one (1006).
pub const BROWSER_CLOSE: &str = "browser_close";
pub const BROWSER_GONE: &str = "browser_gone";

/// The `code` label of a close the browser sent: RFC 6455's codes as they are (1005 for a
/// close without a code); the application range (3000-4999) is the browser's to pick, so it
/// counts as `other` and the label stays a fixed set.
pub fn browser_code_label(code: Option<u16>) -> String {
    match code.unwrap_or(1005) {
        c @ 1000..=1014 => c.to_string(),
        _ => "other".into(),
    }
}

/// The causes a failed upstream dial can have ([`connect_failure`]), so the retry counter's
/// series exist from the start.
pub const CONNECT_FAILURES: &[CloseCause] = &[
    UPSTREAM_REFUSED,
    UPSTREAM_UNREACHABLE,
    UPSTREAM_TIMEOUT,
    UPSTREAM_ERROR,
];

/// Every (`code`, `cause`, `blame`) a session's ending is counted under, registered at zero
/// from the start: the table, the protocol violations, the browser's own endings.
pub fn metric_labels() -> Vec<(String, &'static str, Blame)> {
    let mut all: Vec<_> = TABLE
        .iter()
        .map(|c| (c.code.to_string(), c.name, c.blame))
        .collect();
    all.extend(
        PROTOCOL
            .iter()
            .map(|(code, name)| (code.to_string(), *name, Blame::Browser)),
    );
    let mut browser: Vec<String> = (0..=u16::MAX)
        .filter(|c| vncgate_ws::frame::is_valid_received_code(*c))
        .map(|c| browser_code_label(Some(c)))
        .chain([browser_code_label(None)])
        .collect();
    browser.sort();
    browser.dedup();
    all.extend(
        browser
            .into_iter()
            .map(|code| (code, BROWSER_CLOSE, Blame::Browser)),
    );
    all.push(("1006".into(), BROWSER_GONE, Blame::Browser));
    all
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
    fn every_ending_is_in_the_registered_labels() {
        let labels = metric_labels();
        let has = |code: String, name: &str, blame: Blame| {
            assert!(
                labels.contains(&(code.clone(), name, blame)),
                "{code} {name} {blame:?} not registered"
            )
        };
        for c in TABLE {
            has(c.code.to_string(), c.name, c.blame);
        }
        use vncgate_ws::frame::*;
        for e in [
            E_RSV,
            E_OPCODE,
            E_UNMASKED,
            E_CONTROL_FRAGMENTED,
            E_CONTROL_TOO_LONG,
            E_LENGTH_MSB,
            E_UNEXPECTED_CONTINUATION,
            E_CLOSE_ONE_BYTE,
            E_CLOSE_CODE,
            E_CLOSE_UTF8,
            E_TEXT,
            E_TOO_BIG,
        ] {
            let c = protocol(e);
            has(c.code.to_string(), c.name, c.blame);
        }
        // Any code a browser may send, and none.
        for code in (0..=u16::MAX).filter(|c| is_valid_received_code(*c)) {
            has(
                browser_code_label(Some(code)),
                BROWSER_CLOSE,
                Blame::Browser,
            );
        }
        has(browser_code_label(None), BROWSER_CLOSE, Blame::Browser);
        assert_eq!(browser_code_label(Some(4321)), "other");
        assert_eq!(browser_code_label(Some(1000)), "1000");
        // A fixed, small set: no label value a browser can multiply.
        assert!(labels.len() < 50, "{}", labels.len());
        let mut unique = labels.clone();
        unique.sort_by(|a, b| (&a.0, a.1).cmp(&(&b.0, b.1)));
        unique.dedup();
        assert_eq!(unique.len(), labels.len());
    }

    #[test]
    fn every_connect_failure_is_a_registered_retry_cause() {
        use std::io::{Error, ErrorKind};
        let mut errors: Vec<Error> = [
            libc::ECONNREFUSED,
            libc::EHOSTUNREACH,
            libc::ENETUNREACH,
            libc::EHOSTDOWN,
            libc::ECONNRESET,
            libc::EADDRNOTAVAIL,
            libc::ETIMEDOUT,
        ]
        .into_iter()
        .map(Error::from_raw_os_error)
        .collect();
        errors.push(ErrorKind::TimedOut.into());
        errors.push(Error::other("x"));
        for e in &errors {
            assert!(CONNECT_FAILURES.contains(&connect_failure(e)), "{e}");
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
