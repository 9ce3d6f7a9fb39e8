//! Route events, published on [`crate::EVENTS_CHANNEL`] after every write, as JSON:
//!
//! ```json
//! {"v":1,"op":"put","session":"abc"}
//! {"v":1,"op":"del","session":"abc","reason":"revoked"}
//! ```
//!
//! `put`: the route was created or changed; caches drop their entry and live sessions pick
//! up a changed expiry. `del`: the route is gone; live sessions close with 4006 "session
//! revoked" or, for `"reason":"expired"`, 4005 "session expired". Events carry no route
//! data: a reader that cares fetches the record, so a lost or reordered event can only
//! cost a lookup, never install a stale route.

use serde::{Deserialize, Serialize};

use crate::SCHEMA_VERSION;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum EventOp {
    Put,
    Del,
}

/// Why a route was deleted; decides the close code live sessions get.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum RemovalReason {
    #[default]
    Revoked,
    Expired,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RouteEvent {
    pub v: u32,
    pub op: EventOp,
    pub session: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reason: Option<RemovalReason>,
}

impl RouteEvent {
    pub fn put(session: &str) -> Self {
        Self {
            v: SCHEMA_VERSION,
            op: EventOp::Put,
            session: session.to_owned(),
            reason: None,
        }
    }

    pub fn del(session: &str, reason: RemovalReason) -> Self {
        Self {
            v: SCHEMA_VERSION,
            op: EventOp::Del,
            session: session.to_owned(),
            reason: Some(reason),
        }
    }

    pub fn encode(&self) -> String {
        serde_json::to_string(self).expect("events always serialize")
    }

    /// Parses an event; unknown fields are ignored, a newer version is refused.
    pub fn decode(text: &[u8]) -> Result<Self, String> {
        let e: RouteEvent =
            serde_json::from_slice(text).map_err(|e| format!("not a route event: {e}"))?;
        if e.v > SCHEMA_VERSION || e.v == 0 {
            return Err(format!("route event version {} not understood", e.v));
        }
        crate::check_session_id(&e.session)?;
        Ok(e)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn wire_format() {
        assert_eq!(
            RouteEvent::put("abc").encode(),
            r#"{"v":1,"op":"put","session":"abc"}"#
        );
        let d = RouteEvent::del("abc", RemovalReason::Expired);
        assert_eq!(
            d.encode(),
            r#"{"v":1,"op":"del","session":"abc","reason":"expired"}"#
        );
        assert_eq!(RouteEvent::decode(d.encode().as_bytes()).unwrap(), d);
        assert!(RouteEvent::decode(br#"{"v":1,"op":"del","session":"a","x":1}"#).is_ok());
        assert!(RouteEvent::decode(br#"{"v":2,"op":"del","session":"a"}"#).is_err());
        assert!(RouteEvent::decode(br#"{"v":1,"op":"zap","session":"a"}"#).is_err());
        assert!(RouteEvent::decode(br#"{"v":1,"op":"put","session":"a b"}"#).is_err());
        assert!(RouteEvent::decode(b"garbage").is_err());
    }
}
