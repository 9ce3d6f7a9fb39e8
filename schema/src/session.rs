//! The session record: one JSON string per browser-VM session at
//! `vncgate:session:{vncgate:route:<id>}` (the route key as the Cluster hash tag),
//! written by the controller, read by the controller's API (of any host) and by operators.
//!
//! The route (`vncgate:route:<id>`) is what gateways read; the session is the whole story:
//! its state, every transition with its time and reason, the last probe results, the VM's
//! handle for re-adoption after a restart. A record carries a revision (`rev`), and
//! [`crate::store::update_session`] replaces it only if nobody else wrote in between, so two
//! controllers (or a reconciler and an API call) never lose each other's transitions.
//!
//! | field | value |
//! |---|---|
//! | `v` | schema version, `1`; readers refuse newer records by name |
//! | `id`, `user_id`, `provider` | as created |
//! | `state` | `pending`, `booting`, `ready`, `completed`, `failed`, `vm_stopped`, `expired`, `deleted` |
//! | `reason` | why the session is `failed` or `vm_stopped` (or was deleted), else absent |
//! | `created_at`, `expires_at` | Unix milliseconds |
//! | `token_sha256` | SHA-256 of the viewer token, hex (the token itself is returned once, never stored) |
//! | `agent_token_sha256` | SHA-256 of the VM agent's token, hex |
//! | `backend`, `vm` | the backend's name and its handle of the VM (JSON, backend-defined) |
//! | `host`, `lease` | the owning controller's `--host-id` and its lease epoch, once placed |
//! | `history` | `[{"at": ms, "state": ..., "reason": ...}]`, oldest first |
//! | `probes` | the last probe results (JSON, the controller's shape) |
//! | `rev` | revision, incremented by every write |

use serde::{Deserialize, Serialize};

use crate::SCHEMA_VERSION;

/// Prefix of the session key.
pub const SESSION_KEY_PREFIX: &str = "vncgate:session:";
/// Sorted set of session ids by creation time (ms), for listing.
pub const SESSION_INDEX_KEY: &str = "vncgate:sessions";
/// Prefix of the idempotency keys: `vncgate:idempotency:<sha256 of the key, hex>` -> id.
pub const IDEMPOTENCY_KEY_PREFIX: &str = "vncgate:idempotency:";
/// How long an `Idempotency-Key` is remembered, in seconds.
pub const IDEMPOTENCY_TTL_SECS: u64 = 24 * 3600;
/// How long a session record outlives its `expires_at`, in seconds (its story stays
/// readable for a day after the session ended).
pub const SESSION_RETENTION_SECS: u64 = 24 * 3600;

/// Prefix of the sealed credentials of a session (JSON; the controller's envelope format).
pub const CREDENTIALS_KEY_PREFIX: &str = "vncgate:credentials:";
/// Prefix of the agent-token index: `vncgate:agent-token:<sha256 hex>` -> session id.
pub const AGENT_TOKEN_KEY_PREFIX: &str = "vncgate:agent-token:";

/// A session's keys carry the session's route key as their Redis Cluster hash tag, so the
/// session record, its credentials and its route (`vncgate:route:<id>`, whose format gateways
/// and platforms rely on) land in one slot: a script can check the record's owner and write
/// the route atomically (see [`crate::store::put_route_fenced`]).
fn tag(id: &str) -> String {
    format!("{{{}}}", crate::route_key(id))
}

pub fn credentials_key(id: &str) -> String {
    format!("{CREDENTIALS_KEY_PREFIX}{}", tag(id))
}

pub fn agent_token_key(digest: &[u8; 32]) -> String {
    format!("{AGENT_TOKEN_KEY_PREFIX}{}", hex::encode(digest))
}

pub fn session_key(id: &str) -> String {
    format!("{SESSION_KEY_PREFIX}{}", tag(id))
}

pub fn idempotency_key(key: &str) -> String {
    format!(
        "{IDEMPOTENCY_KEY_PREFIX}{}",
        hex::encode(crate::record::token_digest(key.as_bytes()))
    )
}

/// A session's state. `completed`, `failed`, `vm_stopped`, `expired` and `deleted` are
/// terminal: no VM runs and no route exists once a session is in one.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum SessionState {
    Pending,
    Booting,
    Ready,
    Completed,
    Failed,
    VmStopped,
    Expired,
    Deleted,
}

impl SessionState {
    pub const ALL: [SessionState; 8] = [
        SessionState::Pending,
        SessionState::Booting,
        SessionState::Ready,
        SessionState::Completed,
        SessionState::Failed,
        SessionState::VmStopped,
        SessionState::Expired,
        SessionState::Deleted,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            SessionState::Pending => "pending",
            SessionState::Booting => "booting",
            SessionState::Ready => "ready",
            SessionState::Completed => "completed",
            SessionState::Failed => "failed",
            SessionState::VmStopped => "vm_stopped",
            SessionState::Expired => "expired",
            SessionState::Deleted => "deleted",
        }
    }

    pub fn is_terminal(self) -> bool {
        !matches!(
            self,
            SessionState::Pending | SessionState::Booting | SessionState::Ready
        )
    }
}

impl std::str::FromStr for SessionState {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, String> {
        SessionState::ALL
            .into_iter()
            .find(|st| st.as_str() == s)
            .ok_or_else(|| {
                let names: Vec<&str> = SessionState::ALL.iter().map(|s| s.as_str()).collect();
                format!("unknown state '{s}' (one of {})", names.join(", "))
            })
    }
}

impl std::fmt::Display for SessionState {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// One entry of a session's history.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Transition {
    /// Unix milliseconds.
    pub at: u64,
    pub state: SessionState,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct SessionRecord {
    pub v: u32,
    pub id: String,
    pub user_id: String,
    pub provider: String,
    pub state: SessionState,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
    /// Unix milliseconds.
    pub created_at: u64,
    /// Unix milliseconds.
    pub expires_at: u64,
    #[serde(with = "hex::serde")]
    pub token_sha256: [u8; 32],
    #[serde(with = "hex::serde")]
    pub agent_token_sha256: [u8; 32],
    pub backend: String,
    /// The host (controller `--host-id`) that owns the session's VM, once placed.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub host: Option<String>,
    /// The owner's lease epoch when it placed the session (controllers sharing a Redis):
    /// the owner's writes are refused unless its epoch is still this one (fencing).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub lease: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub vm: Option<serde_json::Value>,
    #[serde(default)]
    pub history: Vec<Transition>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub probes: Option<serde_json::Value>,
    #[serde(default)]
    pub rev: u64,
}

/// A string at a session key that is not a usable record.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SessionRecordError {
    #[error("session record is not valid JSON of the schema: {0}")]
    Invalid(String),
    #[error("session record is schema version {0}, newer than this reader's {SCHEMA_VERSION}")]
    NewerVersion(u32),
}

impl SessionRecord {
    pub fn encode(&self) -> String {
        serde_json::to_string(self).expect("a session record serializes")
    }

    pub fn decode(s: &str) -> Result<SessionRecord, SessionRecordError> {
        // The version first, so a newer writer's record is named as such rather than as
        // a field this reader does not know how to read.
        #[derive(Deserialize)]
        struct Version {
            v: u32,
        }
        let v: Version =
            serde_json::from_str(s).map_err(|e| SessionRecordError::Invalid(e.to_string()))?;
        if v.v > SCHEMA_VERSION {
            return Err(SessionRecordError::NewerVersion(v.v));
        }
        serde_json::from_str(s).map_err(|e| SessionRecordError::Invalid(e.to_string()))
    }

    /// Unix seconds until which the key is kept.
    pub fn retain_until_secs(&self) -> u64 {
        self.expires_at.div_ceil(1000) + SESSION_RETENTION_SECS
    }
}

/// Unix milliseconds, now.
pub fn unix_now_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}

#[cfg(test)]
mod tests {
    use super::*;

    pub(crate) fn sample() -> SessionRecord {
        SessionRecord {
            v: SCHEMA_VERSION,
            id: "s-1".into(),
            user_id: "u1".into(),
            provider: "github".into(),
            state: SessionState::Booting,
            reason: None,
            created_at: 1_000,
            expires_at: 61_000,
            token_sha256: crate::record::token_digest(b"viewer"),
            agent_token_sha256: crate::record::token_digest(b"agent"),
            backend: "process".into(),
            host: None,
            lease: None,
            vm: Some(serde_json::json!({"pid": 42})),
            history: vec![
                Transition {
                    at: 1_000,
                    state: SessionState::Pending,
                    reason: None,
                },
                Transition {
                    at: 1_005,
                    state: SessionState::Booting,
                    reason: None,
                },
            ],
            probes: None,
            rev: 3,
        }
    }

    #[test]
    fn round_trips_and_names_states() {
        let r = sample();
        let s = r.encode();
        assert!(s.contains(r#""state":"booting""#), "{s}");
        assert!(!s.contains("viewer") && !s.contains("agent\""), "{s}");
        assert_eq!(SessionRecord::decode(&s).unwrap(), r);
        for st in SessionState::ALL {
            assert_eq!(st.as_str().parse::<SessionState>().unwrap(), st);
            assert_eq!(
                serde_json::to_string(&st).unwrap(),
                format!("\"{}\"", st.as_str())
            );
        }
        assert!(
            "done"
                .parse::<SessionState>()
                .unwrap_err()
                .contains("vm_stopped")
        );
    }

    #[test]
    fn newer_and_broken_records_are_refused_by_name() {
        let mut v = serde_json::to_value(sample()).unwrap();
        v["v"] = 2.into();
        assert_eq!(
            SessionRecord::decode(&v.to_string()),
            Err(SessionRecordError::NewerVersion(2))
        );
        assert!(matches!(
            SessionRecord::decode("{\"v\":1}"),
            Err(SessionRecordError::Invalid(_))
        ));
        assert!(matches!(
            SessionRecord::decode("not json"),
            Err(SessionRecordError::Invalid(_))
        ));
    }

    #[test]
    fn idempotency_keys_are_hashed() {
        let k = idempotency_key("order-42");
        assert!(k.starts_with(IDEMPOTENCY_KEY_PREFIX) && !k.contains("order-42"));
        assert_eq!(k, idempotency_key("order-42"));
        assert_ne!(k, idempotency_key("order-43"));
    }
}
