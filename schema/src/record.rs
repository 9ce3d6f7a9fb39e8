//! The route record: one Redis hash per session at `vncgate:route:<session>`.
//!
//! | field | required | value |
//! |---|---|---|
//! | `v` | yes | schema version, `1` |
//! | `upstream` | yes | the VM's RFB address, `IP:PORT` (an address, never a name: gateways do not resolve) |
//! | `token_sha256` | no | 64 hex digits, SHA-256 of the session token; absent admits any client |
//! | `view_token_sha256` | no | 64 hex digits, SHA-256 of a second token whose viewers may watch but not act (view-only); only with `token_sha256`, and never equal to it |
//! | `expires_at` | no | Unix seconds; live sessions close with 4005 then |
//! | `max_viewers` | no | concurrent connections allowed; `0` = unlimited; absent = the gateway's `--max-viewers` |
//! | `created_at` | yes | Unix seconds of the write |
//! | `writer` | no | who wrote it (`vncgate route add`, `vncgate-controller`), for operators |
//!
//! Readers ignore fields they do not know (a later version 1 writer may add some) and
//! refuse a record whose `v` is newer than theirs. A field added that way must fail closed
//! for the readers that ignore it: `view_token_sha256` does, since a gateway that predates it
//! compares a view token against `token_sha256` alone and refuses it (403).

use std::collections::HashMap;
use std::net::SocketAddr;

use crate::SCHEMA_VERSION;

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RouteRecord {
    pub upstream: SocketAddr,
    pub token_sha256: Option<[u8; 32]>,
    /// The view-only token's digest: its viewers see the desktop, the gateway drops their
    /// input.
    pub view_token_sha256: Option<[u8; 32]>,
    pub expires_at: Option<u64>,
    pub max_viewers: Option<u32>,
    pub created_at: u64,
    pub writer: Option<String>,
    /// Record this route's sessions (the gateway's `--record DIR`). Written as `record =
    /// 1` only when true; a record without the field is not recorded.
    pub record: bool,
}

/// A hash at a route key that is not a usable record.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum RecordError {
    #[error("route record has no '{0}' field")]
    Missing(&'static str),
    #[error("route record field '{field}' is invalid: {why}")]
    Invalid { field: &'static str, why: String },
    #[error("route record is schema version {0}, newer than this reader's {SCHEMA_VERSION}")]
    NewerVersion(u32),
}

impl RecordError {
    /// A short metric label.
    pub fn label(&self) -> &'static str {
        match self {
            RecordError::Missing(_) => "missing_field",
            RecordError::Invalid { .. } => "invalid_field",
            RecordError::NewerVersion(_) => "newer_version",
        }
    }
}

fn invalid(field: &'static str, why: impl Into<String>) -> RecordError {
    RecordError::Invalid {
        field,
        why: why.into(),
    }
}

/// Longest session token, in bytes: long enough for any JWT a platform would mint.
pub const MAX_TOKEN_LEN: usize = 4096;

/// Checks a session token: 1-4096 printable ASCII characters without spaces or commas (it
/// rides in a URL query, a subprotocol token or a header).
pub fn check_token(raw: &[u8]) -> Result<(), &'static str> {
    if raw.is_empty() || raw.len() > MAX_TOKEN_LEN {
        return Err("token empty or too long");
    }
    if !raw.iter().all(|b| b.is_ascii_graphic() && *b != b',') {
        return Err("token has invalid characters");
    }
    Ok(())
}

/// The digest a record stores for a token (`token_sha256`).
pub fn token_digest(raw: &[u8]) -> [u8; 32] {
    use sha2::Digest as _;
    sha2::Sha256::digest(raw).into()
}

/// The digest to store for a token a writer was given, once the token is checked.
pub fn checked_token_digest(raw: &[u8]) -> Result<[u8; 32], &'static str> {
    check_token(raw)?;
    Ok(token_digest(raw))
}

/// Checks a view-only token's digest against the full token's: a view token needs a full
/// token (without one every client acts, and watching only would mean nothing), and must
/// differ from it (the full token would win, and the view link would act).
pub fn check_view_token(
    full: Option<&[u8; 32]>,
    view: Option<&[u8; 32]>,
) -> Result<(), &'static str> {
    match (full, view) {
        (None, Some(_)) => Err("a view-only token needs a (full) token on the route"),
        (Some(f), Some(v)) if f == v => Err("the view-only token equals the full token"),
        _ => Ok(()),
    }
}

/// `expires_at` for a route that lives `ttl` from now, rounded up to the next second: a
/// route never ends before the time asked for.
pub fn expires_after(ttl: std::time::Duration) -> u64 {
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap_or_default();
    (now + ttl).as_secs_f64().ceil() as u64
}

/// Checks an upstream address a record may carry: a concrete unicast address and a port.
pub fn check_upstream(addr: &SocketAddr) -> Result<(), String> {
    let ip = addr.ip();
    if addr.port() == 0 {
        return Err(format!("upstream {addr} has port 0"));
    }
    if ip.is_unspecified() || ip.is_multicast() {
        return Err(format!("upstream {addr} is not a unicast address"));
    }
    if let std::net::IpAddr::V4(v4) = ip
        && v4.is_broadcast()
    {
        return Err(format!("upstream {addr} is a broadcast address"));
    }
    Ok(())
}

impl RouteRecord {
    /// The fields to write, and the optional fields this record leaves out (to delete, so
    /// an overwrite never keeps a stale token or expiry).
    pub fn to_fields(&self) -> (Vec<(&'static str, String)>, Vec<&'static str>) {
        let mut set = vec![
            ("v", SCHEMA_VERSION.to_string()),
            ("upstream", self.upstream.to_string()),
            ("created_at", self.created_at.to_string()),
        ];
        let mut absent = Vec::new();
        let mut opt = |name: &'static str, v: Option<String>| match v {
            Some(v) => set.push((name, v)),
            None => absent.push(name),
        };
        opt("token_sha256", self.token_sha256.map(hex::encode));
        opt("view_token_sha256", self.view_token_sha256.map(hex::encode));
        opt("expires_at", self.expires_at.map(|t| t.to_string()));
        opt("max_viewers", self.max_viewers.map(|n| n.to_string()));
        opt("writer", self.writer.clone());
        opt("record", self.record.then(|| "1".to_owned()));
        (set, absent)
    }

    /// Reads a record from the fields of its hash.
    pub fn from_fields(f: &HashMap<String, String>) -> Result<Self, RecordError> {
        let get = |name: &'static str| f.get(name).map(|s| s.trim());
        let v: u32 = get("v")
            .ok_or(RecordError::Missing("v"))?
            .parse()
            .map_err(|_| invalid("v", "not a number"))?;
        if v > SCHEMA_VERSION {
            return Err(RecordError::NewerVersion(v));
        }
        if v == 0 {
            return Err(invalid("v", "version 0 does not exist"));
        }
        let upstream: SocketAddr = get("upstream")
            .ok_or(RecordError::Missing("upstream"))?
            .parse()
            .map_err(|_| invalid("upstream", "not an IP:PORT address"))?;
        check_upstream(&upstream).map_err(|e| invalid("upstream", e))?;
        let digest = |name: &'static str| -> Result<Option<[u8; 32]>, RecordError> {
            get(name)
                .map(|h| {
                    let mut d = [0u8; 32];
                    hex::decode_to_slice(h, &mut d)
                        .map_err(|_| invalid(name, "not 64 hex digits"))?;
                    Ok(d)
                })
                .transpose()
        };
        let token_sha256 = digest("token_sha256")?;
        let view_token_sha256 = digest("view_token_sha256")?;
        check_view_token(token_sha256.as_ref(), view_token_sha256.as_ref())
            .map_err(|e| invalid("view_token_sha256", e))?;
        let num = |name: &'static str| -> Result<Option<u64>, RecordError> {
            get(name)
                .map(|s| s.parse().map_err(|_| invalid(name, "not a number")))
                .transpose()
        };
        let max_viewers = num("max_viewers")?
            .map(|n| u32::try_from(n).map_err(|_| invalid("max_viewers", "too large")))
            .transpose()?;
        Ok(RouteRecord {
            upstream,
            token_sha256,
            view_token_sha256,
            expires_at: num("expires_at")?,
            max_viewers,
            created_at: num("created_at")?.ok_or(RecordError::Missing("created_at"))?,
            writer: get("writer").map(str::to_owned),
            record: match get("record") {
                None | Some("0") | Some("false") => false,
                Some("1") | Some("true") => true,
                Some(_) => return Err(invalid("record", "not 0 or 1")),
            },
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample() -> RouteRecord {
        RouteRecord {
            upstream: "10.0.0.5:6080".parse().unwrap(),
            token_sha256: Some([7; 32]),
            view_token_sha256: Some([8; 32]),
            expires_at: Some(1_900_000_000),
            max_viewers: Some(2),
            created_at: 1_800_000_000,
            writer: Some("test".into()),
            record: true,
        }
    }

    fn as_map(set: &[(&'static str, String)]) -> HashMap<String, String> {
        set.iter()
            .map(|(k, v)| (k.to_string(), v.clone()))
            .collect()
    }

    #[test]
    fn round_trip_and_absent_fields() {
        let r = sample();
        let (set, absent) = r.to_fields();
        assert!(absent.is_empty());
        assert_eq!(RouteRecord::from_fields(&as_map(&set)).unwrap(), r);

        let bare = RouteRecord {
            token_sha256: None,
            view_token_sha256: None,
            expires_at: None,
            max_viewers: None,
            writer: None,
            record: false,
            ..r
        };
        let (set, absent) = bare.to_fields();
        assert_eq!(
            absent,
            [
                "token_sha256",
                "view_token_sha256",
                "expires_at",
                "max_viewers",
                "writer",
                "record"
            ]
        );
        assert_eq!(RouteRecord::from_fields(&as_map(&set)).unwrap(), bare);
    }

    #[test]
    fn refusals_name_the_field() {
        let (set, _) = sample().to_fields();
        let with = |k: &str, v: &str| {
            let mut m = as_map(&set);
            m.insert(k.into(), v.into());
            RouteRecord::from_fields(&m)
        };
        assert_eq!(with("v", "2"), Err(RecordError::NewerVersion(2)));
        assert!(matches!(
            with("upstream", "vm.local:6080"),
            Err(RecordError::Invalid {
                field: "upstream",
                ..
            })
        ));
        assert!(with("upstream", "0.0.0.0:6080").is_err());
        assert!(with("upstream", "10.0.0.1:0").is_err());
        assert!(with("upstream", "255.255.255.255:1").is_err());
        assert!(with("token_sha256", "abc").is_err());
        assert!(with("view_token_sha256", "abc").is_err());
        assert!(with("view_token_sha256", &"07".repeat(32)).is_err());
        // A record from before view tokens (no such field) reads as one without.
        let mut old = as_map(&set);
        old.remove("view_token_sha256");
        assert_eq!(
            RouteRecord::from_fields(&old).unwrap().view_token_sha256,
            None
        );
        // A view token without a full token is refused by name.
        let mut m = as_map(&set);
        m.remove("token_sha256");
        assert!(matches!(
            RouteRecord::from_fields(&m),
            Err(RecordError::Invalid {
                field: "view_token_sha256",
                ..
            })
        ));
        assert!(with("expires_at", "soon").is_err());
        assert!(with("max_viewers", "99999999999").is_err());
        assert!(with("record", "yes").is_err());
        assert!(with("record", "1").unwrap().record);
        // Unknown fields are a later writer's business.
        assert!(with("colour", "blue").is_ok());
        let mut m = as_map(&set);
        m.remove("upstream");
        assert_eq!(
            RouteRecord::from_fields(&m),
            Err(RecordError::Missing("upstream"))
        );
    }
}
