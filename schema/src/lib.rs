//! The Redis schema of vncgate, written once and used by the gateway (reads routes, follows
//! events), the controller (publishes routes when a VM is ready) and the `vncgate route`
//! admin commands.
//!
//! - [`record`]: the route record, one Redis hash per session, and its version field.
//! - [`session`]: the session record (state, history, probes), one JSON string per session.
//! - [`event`]: route events on one pub/sub channel, JSON with a version field.
//! - [`url`]: the Redis URLs accepted (standalone, Sentinel, Cluster), with redaction.
//! - [`store`]: connections and the operations on the schema (put, get, delete, list).
//! - [`hosts`]: controllers sharing one Redis: host leases, the placement stream, per-host
//!   commands.
//!
//! # Keys
//!
//! | key | type | what |
//! |---|---|---|
//! | `vncgate:route:<session>` | hash | the route record ([`record::RouteRecord`]); the key expires [`EXPIRY_GRACE_SECS`] after `expires_at` |
//! | `vncgate:routes` | sorted set | index for listing: member = session id, score = `expires_at` (`+inf` without expiry) |
//! | `vncgate:route-events` | pub/sub channel | [`event::RouteEvent`] JSON, published after every put and delete |
//! | `vncgate:session:{vncgate:route:<id>}` | string | the session record ([`session::SessionRecord`], JSON); kept a day past `expires_at` |
//! | `vncgate:sessions` | sorted set | index for listing: member = session id, score = `created_at` (ms) |
//! | `vncgate:idempotency:<sha256>` | string | the session id an `Idempotency-Key` created; 24 h |
//! | `vncgate:agent-token:<sha256>` | string | the session whose VM agent holds that token; as long as the session |
//! | `vncgate:credentials:{vncgate:route:<id>}` | string | the session's credentials, sealed (envelope encryption, JSON); as long as the session |
//!
//! The record's `expires_at` is the truth about expiry: gateways close live sessions with
//! 4005 at that instant. The key outlives it by a grace period so that a browser arriving
//! late still gets the named close ("session expired") instead of an unknown session.

#![forbid(unsafe_code)]

pub mod event;
pub mod hosts;
pub mod record;
pub mod session;
pub mod store;
#[cfg(any(test, feature = "testing"))]
pub mod testing;
pub mod url;

pub use event::{EventOp, RemovalReason, RouteEvent};
pub use record::{RecordError, RouteRecord};
pub use store::{Conn, Timeouts};
pub use url::RedisUrl;

/// The version written into every record and event. Readers accept records up to their own
/// version and refuse newer ones by name (a newer writer may mean something they don't).
pub const SCHEMA_VERSION: u32 = 1;

/// Prefix of the per-session route hash.
pub const ROUTE_KEY_PREFIX: &str = "vncgate:route:";
/// The sorted-set index of route ids, for listing.
pub const ROUTE_INDEX_KEY: &str = "vncgate:routes";
/// The pub/sub channel of route events.
pub const EVENTS_CHANNEL: &str = "vncgate:route-events";
/// Seconds a route key outlives its `expires_at`.
pub const EXPIRY_GRACE_SECS: u64 = 60;

/// The Redis key of a session's route.
pub fn route_key(session: &str) -> String {
    format!("{ROUTE_KEY_PREFIX}{session}")
}

/// Session ids are 1-128 characters of `A-Z a-z 0-9 - _ .`: safe in a URL path, a Redis key
/// and a log line without escaping.
pub fn check_session_id(id: &str) -> Result<(), String> {
    let ok = !id.is_empty()
        && id.len() <= 128
        && id
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.'));
    if ok {
        Ok(())
    } else {
        Err(format!(
            "session id '{id}' must be 1-128 characters of A-Z a-z 0-9 - _ ."
        ))
    }
}

/// Seconds since the Unix epoch, now.
pub fn unix_now() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_and_ids() {
        assert_eq!(route_key("abc"), "vncgate:route:abc");
        assert!(check_session_id("a-b_c.9").is_ok());
        for bad in ["", "a b", "a/b", "a:b", &"x".repeat(129)] {
            assert!(check_session_id(bad).is_err(), "{bad}");
        }
    }
}
