//! Controllers sharing one Redis: host leases, the placement stream, and per-host commands.
//! Redis's own primitives do the coordination: a key with a TTL per host, one stream read
//! through one consumer group, and a stream per host.
//!
//! | key | type | what |
//! |---|---|---|
//! | `vncgate:lease:<host>` | string | the host's lease: its current epoch; expires unless renewed |
//! | `vncgate:lease-epoch:<host>` | string (counter) | the host's last epoch; every acquisition takes the next |
//! | `vncgate:placement` | stream, group `placers` | placement requests: `session` = id; a controller with a free VM slot reads one |
//! | `vncgate:host-commands:<host>` | stream | what other controllers ask of the host that owns a session: `op` (`stop`, `refresh`), `session` |
//!
//! Every key names one slot (single-key commands, or a script over one key), so the same
//! operations run on a standalone Redis, behind Sentinel, and on a Cluster.

use redis::{RedisResult, Value};

use crate::store::Conn;

pub const LEASE_KEY_PREFIX: &str = "vncgate:lease:";
pub const LEASE_EPOCH_KEY_PREFIX: &str = "vncgate:lease-epoch:";
pub const PLACEMENT_STREAM: &str = "vncgate:placement";
pub const PLACEMENT_GROUP: &str = "placers";
pub const HOST_COMMANDS_PREFIX: &str = "vncgate:host-commands:";
/// Entries kept in the placement stream and in each host's command stream (approximate
/// trimming: old entries are acknowledged or obsolete long before).
const STREAM_MAXLEN: u64 = 10_000;

pub fn lease_key(host: &str) -> String {
    format!("{LEASE_KEY_PREFIX}{host}")
}

fn epoch_key(host: &str) -> String {
    format!("{LEASE_EPOCH_KEY_PREFIX}{host}")
}

pub fn host_commands_key(host: &str) -> String {
    format!("{HOST_COMMANDS_PREFIX}{host}")
}

/// Takes a new lease for `host`: the next epoch, written as the lease's value with `ttl_ms`.
/// A lease the host held before (a restart) is replaced: records placed under the old epoch
/// no longer accept the host's writes until it adopts them.
pub async fn acquire_lease(c: &mut Conn, host: &str, ttl_ms: u64) -> RedisResult<u64> {
    let epoch: u64 = redis::cmd("INCR")
        .arg(epoch_key(host))
        .query_async(c)
        .await?;
    redis::cmd("SET")
        .arg(lease_key(host))
        .arg(epoch)
        .arg("PX")
        .arg(ttl_ms)
        .query_async::<()>(c)
        .await?;
    Ok(epoch)
}

/// Extends the lease if it is still `epoch`'s; `false` when it expired or was replaced
/// (the host has lost it and must act as a host without sessions).
pub async fn renew_lease(c: &mut Conn, host: &str, epoch: u64, ttl_ms: u64) -> RedisResult<bool> {
    const RENEW: &str = r#"
if redis.call('GET', KEYS[1]) == ARGV[1] then
  redis.call('PEXPIRE', KEYS[1], ARGV[2])
  return 1
end
return 0
"#;
    let done: i64 = redis::cmd("EVAL")
        .arg(RENEW)
        .arg(1)
        .arg(lease_key(host))
        .arg(epoch.to_string())
        .arg(ttl_ms)
        .query_async(c)
        .await?;
    Ok(done == 1)
}

/// Gives the lease up (a clean shutdown), if it is still `epoch`'s.
pub async fn release_lease(c: &mut Conn, host: &str, epoch: u64) -> RedisResult<()> {
    const RELEASE: &str = r#"
if redis.call('GET', KEYS[1]) == ARGV[1] then redis.call('DEL', KEYS[1]) end
return 1
"#;
    redis::cmd("EVAL")
        .arg(RELEASE)
        .arg(1)
        .arg(lease_key(host))
        .arg(epoch.to_string())
        .query_async::<()>(c)
        .await
}

/// The host's current lease epoch; `None` when it has none (expired, released, never).
pub async fn lease_of(c: &mut Conn, host: &str) -> RedisResult<Option<u64>> {
    let v: Option<String> = redis::cmd("GET")
        .arg(lease_key(host))
        .query_async(c)
        .await?;
    Ok(v.and_then(|s| s.parse().ok()))
}

/// Creates the placement stream and its consumer group if they are missing.
pub async fn ensure_placement_group(c: &mut Conn) -> RedisResult<()> {
    let r: RedisResult<()> = redis::cmd("XGROUP")
        .arg("CREATE")
        .arg(PLACEMENT_STREAM)
        .arg(PLACEMENT_GROUP)
        .arg("0")
        .arg("MKSTREAM")
        .query_async(c)
        .await;
    match r {
        Err(e) if e.code() == Some("BUSYGROUP") => Ok(()),
        r => r,
    }
}

/// Asks for a session to be placed by whichever controller has room.
pub async fn enqueue_placement(c: &mut Conn, session: &str) -> RedisResult<String> {
    redis::cmd("XADD")
        .arg(PLACEMENT_STREAM)
        .arg("MAXLEN")
        .arg("~")
        .arg(STREAM_MAXLEN)
        .arg("*")
        .arg("session")
        .arg(session)
        .query_async(c)
        .await
}

/// A stream entry: its id and its fields.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Entry {
    pub id: String,
    pub fields: Vec<(String, String)>,
}

impl Entry {
    pub fn field(&self, name: &str) -> Option<&str> {
        self.fields
            .iter()
            .find(|(k, _)| k == name)
            .map(|(_, v)| v.as_str())
    }
}

fn text(v: &Value) -> Option<String> {
    match v {
        Value::BulkString(b) => Some(String::from_utf8_lossy(b).into_owned()),
        Value::SimpleString(s) => Some(s.clone()),
        Value::Int(i) => Some(i.to_string()),
        _ => None,
    }
}

fn entry(v: &Value) -> Option<Entry> {
    let Value::Array(parts) = v else { return None };
    let id = text(parts.first()?)?;
    let mut fields = Vec::new();
    if let Some(Value::Array(kv)) = parts.get(1) {
        for pair in kv.chunks(2) {
            if let [k, v] = pair
                && let (Some(k), Some(v)) = (text(k), text(v))
            {
                fields.push((k, v));
            }
        }
    }
    Some(Entry { id, fields })
}

/// The entries of an `XCLAIM`, `XRANGE` or `XREVRANGE` reply: a list of entries.
fn entry_list(v: &Value) -> Vec<Entry> {
    match v {
        Value::Array(es) => es.iter().filter_map(entry).collect(),
        _ => Vec::new(),
    }
}

/// The entries of an `XREAD` or `XREADGROUP` reply: nil, `[[stream, entries]...]` (RESP2)
/// or `{stream: entries}` (RESP3).
fn stream_reply(v: &Value) -> Vec<Entry> {
    match v {
        Value::Array(streams) => streams
            .iter()
            .flat_map(|s| match s {
                Value::Array(p) => p.get(1).map(entry_list).unwrap_or_default(),
                _ => Vec::new(),
            })
            .collect(),
        Value::Map(m) => m.iter().flat_map(|(_, es)| entry_list(es)).collect(),
        _ => Vec::new(),
    }
}

/// Reads at most `count` new placement requests as `consumer` (no blocking: callers poll, so
/// a shared multiplexed connection never waits behind a blocked read).
pub async fn read_placements(
    c: &mut Conn,
    consumer: &str,
    count: usize,
) -> RedisResult<Vec<Entry>> {
    let v: Value = redis::cmd("XREADGROUP")
        .arg("GROUP")
        .arg(PLACEMENT_GROUP)
        .arg(consumer)
        .arg("COUNT")
        .arg(count)
        .arg("STREAMS")
        .arg(PLACEMENT_STREAM)
        .arg(">")
        .query_async(c)
        .await?;
    Ok(stream_reply(&v))
}

/// Acknowledges (and deletes) a placement request that is done with: placed and booted,
/// failed by name, or obsolete.
pub async fn ack_placement(c: &mut Conn, id: &str) -> RedisResult<()> {
    redis::cmd("XACK")
        .arg(PLACEMENT_STREAM)
        .arg(PLACEMENT_GROUP)
        .arg(id)
        .query_async::<()>(c)
        .await?;
    redis::cmd("XDEL")
        .arg(PLACEMENT_STREAM)
        .arg(id)
        .query_async::<()>(c)
        .await
}

/// The placement requests read but not acknowledged: (entry id, consumer).
pub async fn pending_placements(c: &mut Conn) -> RedisResult<Vec<(String, String)>> {
    let v: Value = redis::cmd("XPENDING")
        .arg(PLACEMENT_STREAM)
        .arg(PLACEMENT_GROUP)
        .arg("-")
        .arg("+")
        .arg(1000)
        .query_async(c)
        .await?;
    let Value::Array(rows) = v else {
        return Ok(Vec::new());
    };
    Ok(rows
        .iter()
        .filter_map(|r| match r {
            Value::Array(p) => Some((text(p.first()?)?, text(p.get(1)?)?)),
            _ => None,
        })
        .collect())
}

/// Takes over a pending placement request of another consumer (one whose host lost its
/// lease); returns the entry when it was still pending.
pub async fn claim_placement(c: &mut Conn, consumer: &str, id: &str) -> RedisResult<Option<Entry>> {
    let v: Value = redis::cmd("XCLAIM")
        .arg(PLACEMENT_STREAM)
        .arg(PLACEMENT_GROUP)
        .arg(consumer)
        .arg(0)
        .arg(id)
        .query_async(c)
        .await?;
    Ok(entry_list(&v).into_iter().next())
}

/// Asks the host that owns `session` to do `op` (`stop`: its VM; `refresh`: republish its
/// route after a keepalive).
pub async fn send_host_command(
    c: &mut Conn,
    host: &str,
    op: &str,
    session: &str,
) -> RedisResult<()> {
    redis::cmd("XADD")
        .arg(host_commands_key(host))
        .arg("MAXLEN")
        .arg("~")
        .arg(STREAM_MAXLEN)
        .arg("*")
        .arg("op")
        .arg(op)
        .arg("session")
        .arg(session)
        .query_async::<()>(c)
        .await
}

/// The host's commands after entry `after` (`$`-like start: pass the id of the last one
/// seen, or `0` for all).
pub async fn read_host_commands(c: &mut Conn, host: &str, after: &str) -> RedisResult<Vec<Entry>> {
    let v: Value = redis::cmd("XREAD")
        .arg("COUNT")
        .arg(100)
        .arg("STREAMS")
        .arg(host_commands_key(host))
        .arg(after)
        .query_async(c)
        .await?;
    Ok(stream_reply(&v))
}

/// The id of the newest command, to start reading after it (`0-0` when there is none).
pub async fn last_host_command(c: &mut Conn, host: &str) -> RedisResult<String> {
    let v: Value = redis::cmd("XREVRANGE")
        .arg(host_commands_key(host))
        .arg("+")
        .arg("-")
        .arg("COUNT")
        .arg(1)
        .query_async(c)
        .await?;
    Ok(entry_list(&v)
        .into_iter()
        .next()
        .map_or_else(|| "0-0".to_owned(), |e| e.id))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testing::RedisServer;

    async fn conn(r: &RedisServer) -> Conn {
        let url: crate::RedisUrl = r.url().parse().unwrap();
        url.connect(crate::Timeouts::default()).await.unwrap()
    }

    #[tokio::test]
    async fn a_lease_is_renewed_only_by_its_epoch_and_lapses_otherwise() {
        let r = RedisServer::start();
        let mut c = conn(&r).await;
        let e1 = acquire_lease(&mut c, "h1", 10_000).await.unwrap();
        assert!(renew_lease(&mut c, "h1", e1, 10_000).await.unwrap());
        assert_eq!(lease_of(&mut c, "h1").await.unwrap(), Some(e1));
        // A restart takes the next epoch; the old one can no longer renew.
        let e2 = acquire_lease(&mut c, "h1", 10_000).await.unwrap();
        assert_eq!(e2, e1 + 1);
        assert!(!renew_lease(&mut c, "h1", e1, 10_000).await.unwrap());
        release_lease(&mut c, "h1", e1).await.unwrap();
        assert_eq!(
            lease_of(&mut c, "h1").await.unwrap(),
            Some(e2),
            "an old epoch cannot release"
        );
        // Expiry.
        let e3 = acquire_lease(&mut c, "h2", 100).await.unwrap();
        tokio::time::sleep(std::time::Duration::from_millis(250)).await;
        assert_eq!(lease_of(&mut c, "h2").await.unwrap(), None);
        assert!(!renew_lease(&mut c, "h2", e3, 100).await.unwrap());
    }

    #[tokio::test]
    async fn placement_requests_go_to_one_consumer_and_can_be_claimed_from_a_dead_one() {
        let r = RedisServer::start();
        let mut c = conn(&r).await;
        ensure_placement_group(&mut c).await.unwrap();
        ensure_placement_group(&mut c).await.unwrap();
        for s in ["s1", "s2", "s3"] {
            enqueue_placement(&mut c, s).await.unwrap();
        }
        let a = read_placements(&mut c, "a", 2).await.unwrap();
        let b = read_placements(&mut c, "b", 5).await.unwrap();
        let sessions = |es: &[Entry]| {
            es.iter()
                .map(|e| e.field("session").unwrap().to_owned())
                .collect::<Vec<_>>()
        };
        assert_eq!(sessions(&a), ["s1", "s2"]);
        assert_eq!(sessions(&b), ["s3"]);
        assert!(read_placements(&mut c, "b", 5).await.unwrap().is_empty());
        ack_placement(&mut c, &a[0].id).await.unwrap();
        let pending = pending_placements(&mut c).await.unwrap();
        assert_eq!(pending.len(), 2);
        assert!(pending.contains(&(a[1].id.clone(), "a".to_owned())));
        // "a" died: "b" claims its unacknowledged request.
        let got = claim_placement(&mut c, "b", &a[1].id)
            .await
            .unwrap()
            .unwrap();
        assert_eq!(got.field("session"), Some("s2"));
        assert!(
            pending_placements(&mut c)
                .await
                .unwrap()
                .contains(&(a[1].id.clone(), "b".to_owned()))
        );
    }

    #[tokio::test]
    async fn host_commands_are_read_in_order_after_a_point() {
        let r = RedisServer::start();
        let mut c = conn(&r).await;
        assert_eq!(last_host_command(&mut c, "h").await.unwrap(), "0-0");
        send_host_command(&mut c, "h", "stop", "s1").await.unwrap();
        let start = last_host_command(&mut c, "h").await.unwrap();
        send_host_command(&mut c, "h", "refresh", "s2")
            .await
            .unwrap();
        send_host_command(&mut c, "other", "stop", "s3")
            .await
            .unwrap();
        let all = read_host_commands(&mut c, "h", "0-0").await.unwrap();
        assert_eq!(all.len(), 2);
        let after = read_host_commands(&mut c, "h", &start).await.unwrap();
        assert_eq!(after.len(), 1);
        assert_eq!(
            (after[0].field("op"), after[0].field("session")),
            (Some("refresh"), Some("s2"))
        );
    }
}
