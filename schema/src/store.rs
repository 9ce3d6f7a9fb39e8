//! Connections to the Redis a [`RedisUrl`] names, and the schema's operations on them.
//!
//! Writes to one route touch one key, so they are atomic in a Cluster too (a `MULTI` on
//! one slot); the index and the event follow as separate commands. Readers never depend on
//! the index: it serves listing only.

use std::collections::HashMap;
use std::time::Duration;

use redis::aio::{
    ConnectionLike, ConnectionManager, ConnectionManagerConfig, MultiplexedConnection, PubSub,
};
use redis::cluster_async::ClusterConnection;
use redis::sentinel::{SentinelClient, SentinelNodeConnectionInfo, SentinelServerType};
use redis::{AsyncConnectionConfig, Client, Cmd, ErrorKind, Pipeline, RedisError, RedisFuture};
use redis::{RedisResult, Value};

use crate::record::{RecordError, RouteRecord};
use crate::session::{
    IDEMPOTENCY_TTL_SECS, SESSION_INDEX_KEY, SessionRecord, SessionRecordError, agent_token_key,
    credentials_key, idempotency_key, session_key,
};
use crate::url::{RedisUrl, Target};
use crate::{
    EVENTS_CHANNEL, EXPIRY_GRACE_SECS, ROUTE_INDEX_KEY, RemovalReason, RouteEvent, route_key,
};

/// How long to wait for a connection and for each reply.
#[derive(Debug, Clone, Copy)]
pub struct Timeouts {
    pub connect: Duration,
    pub response: Duration,
}

impl Default for Timeouts {
    fn default() -> Self {
        Self {
            connect: Duration::from_secs(2),
            response: Duration::from_secs(2),
        }
    }
}

/// A multiplexed connection to a standalone (or Sentinel-resolved) server, or a Cluster
/// connection that follows the slot map. Cheap to clone; clones share the connection.
#[derive(Clone)]
pub enum Conn {
    Single(MultiplexedConnection),
    Cluster(ClusterConnection),
    /// A standalone server's connection that reconnects by itself after a failure (a
    /// long-lived process: the controller); each command fails while it is down.
    Managed(ConnectionManager),
    /// Behind Sentinel, for a long-lived process: a command that fails for the connection
    /// (dropped, refused, or `READONLY` from a master demoted by a failover) drops it, and
    /// the next command asks the Sentinels for the master again.
    Resolving(std::sync::Arc<Resolving>),
}

/// See [`Conn::Resolving`].
pub struct Resolving {
    url: RedisUrl,
    timeouts: Timeouts,
    current: tokio::sync::Mutex<Option<MultiplexedConnection>>,
}

impl Resolving {
    async fn conn(&self) -> RedisResult<MultiplexedConnection> {
        let mut cur = self.current.lock().await;
        if let Some(c) = cur.as_ref() {
            return Ok(c.clone());
        }
        let Conn::Single(c) = self.url.connect(self.timeouts).await? else {
            return Err(RedisError::from((
                ErrorKind::Client,
                "not a single-master target",
            )));
        };
        *cur = Some(c.clone());
        Ok(c)
    }

    /// Forgets the connection after an error that says it is no longer the master's.
    async fn check<T>(&self, r: RedisResult<T>) -> RedisResult<T> {
        if let Err(e) = &r
            && (e.is_io_error()
                || e.is_connection_dropped()
                || e.is_timeout()
                || e.code() == Some("READONLY"))
        {
            *self.current.lock().await = None;
        }
        r
    }
}

impl ConnectionLike for Conn {
    fn req_packed_command<'a>(&'a mut self, cmd: &'a Cmd) -> RedisFuture<'a, Value> {
        match self {
            Conn::Single(c) => c.req_packed_command(cmd),
            Conn::Cluster(c) => c.req_packed_command(cmd),
            Conn::Managed(c) => c.req_packed_command(cmd),
            Conn::Resolving(r) => Box::pin(async move {
                let r = r.clone();
                let mut c = r.conn().await?;
                let out = c.req_packed_command(cmd).await;
                r.check(out).await
            }),
        }
    }

    fn req_packed_commands<'a>(
        &'a mut self,
        cmd: &'a Pipeline,
        offset: usize,
        count: usize,
    ) -> RedisFuture<'a, Vec<Value>> {
        match self {
            Conn::Single(c) => c.req_packed_commands(cmd, offset, count),
            Conn::Cluster(c) => c.req_packed_commands(cmd, offset, count),
            Conn::Managed(c) => c.req_packed_commands(cmd, offset, count),
            Conn::Resolving(r) => Box::pin(async move {
                let r = r.clone();
                let mut c = r.conn().await?;
                let out = c.req_packed_commands(cmd, offset, count).await;
                r.check(out).await
            }),
        }
    }

    fn get_db(&self) -> i64 {
        match self {
            Conn::Single(c) => c.get_db(),
            Conn::Cluster(c) => c.get_db(),
            Conn::Managed(c) => c.get_db(),
            Conn::Resolving(_) => 0,
        }
    }
}

fn timed_out(what: &'static str) -> RedisError {
    RedisError::from((ErrorKind::Io, what))
}

async fn within<T>(
    d: Duration,
    what: &'static str,
    f: impl Future<Output = RedisResult<T>>,
) -> RedisResult<T> {
    tokio::time::timeout(d, f)
        .await
        .unwrap_or_else(|_| Err(timed_out(what)))
}

impl RedisUrl {
    /// The client of the server commands go to: the server itself, or the master the
    /// Sentinels name now (asked again on every call, so a failover is followed).
    async fn master_client(&self, t: Timeouts) -> RedisResult<Client> {
        match &self.target {
            Target::Standalone(info) => Client::open(info.clone()),
            Target::Sentinel {
                sentinels,
                service,
                master,
            } => {
                let mut sc = SentinelClient::build(
                    sentinels.clone(),
                    service.clone(),
                    Some(
                        SentinelNodeConnectionInfo::default()
                            .set_redis_connection_info(master.clone()),
                    ),
                    SentinelServerType::Master,
                )?;
                within(t.connect * 2, "sentinel did not answer in time", async {
                    sc.async_get_client().await
                })
                .await
            }
            Target::Cluster(_) => Err(RedisError::from((
                ErrorKind::Client,
                "a cluster has no single master",
            ))),
        }
    }

    /// Opens a connection for commands.
    pub async fn connect(&self, t: Timeouts) -> RedisResult<Conn> {
        match &self.target {
            Target::Cluster(nodes) => {
                let client = redis::cluster::ClusterClient::builder(nodes.clone())
                    .connection_timeout(t.connect)
                    .response_timeout(t.response)
                    .retries(2)
                    .build()?;
                within(t.connect * 2, "cluster did not answer in time", async {
                    client.get_async_connection().await
                })
                .await
                .map(Conn::Cluster)
            }
            _ => {
                let client = self.master_client(t).await?;
                let cfg = AsyncConnectionConfig::new()
                    .set_connection_timeout(Some(t.connect))
                    .set_response_timeout(Some(t.response));
                within(t.connect * 2, "redis did not answer in time", async {
                    client
                        .get_multiplexed_async_connection_with_config(&cfg)
                        .await
                })
                .await
                .map(Conn::Single)
            }
        }
    }

    /// A connection for a long-lived process that must outlive Redis restarts, network
    /// cuts and failovers: on a standalone server it reconnects by itself (with backoff)
    /// after a failure; behind Sentinel a failed connection is dropped and the next command
    /// asks the Sentinels for the master again; a Cluster connection follows the nodes.
    pub async fn connect_lasting(&self, t: Timeouts) -> Result<Conn, String> {
        let named = |e: RedisError| format!("cannot reach Redis at {self}: {e}");
        match &self.target {
            Target::Standalone(_) => {
                let client = self.master_client(t).await.map_err(named)?;
                let cfg = ConnectionManagerConfig::new()
                    .set_connection_timeout(Some(t.connect))
                    .set_response_timeout(Some(t.response))
                    .set_number_of_retries(3)
                    .set_max_delay(Duration::from_secs(1));
                within(t.connect * 4, "redis did not answer in time", async {
                    ConnectionManager::new_with_config(client, cfg).await
                })
                .await
                .map(Conn::Managed)
                .map_err(named)
            }
            Target::Sentinel { .. } => {
                let r = Resolving {
                    url: self.clone(),
                    timeouts: t,
                    current: tokio::sync::Mutex::new(None),
                };
                r.conn().await.map_err(named)?;
                Ok(Conn::Resolving(std::sync::Arc::new(r)))
            }
            Target::Cluster(_) => self.connect(t).await.map_err(named),
        }
    }

    /// Opens a connection for a one-shot command (the `route` commands, the controller),
    /// with an error that names the Redis it could not reach (password redacted).
    pub async fn connect_for_command(&self) -> Result<Conn, String> {
        self.connect(Timeouts::default())
            .await
            .map_err(|e| format!("cannot reach Redis at {self}: {e}"))
    }

    /// Opens a subscriber connection. In a Cluster any node will do: `PUBLISH` reaches
    /// the subscribers of every node; the nodes are tried in turn.
    pub async fn pubsub(&self, t: Timeouts) -> RedisResult<PubSub> {
        let clients = match &self.target {
            Target::Cluster(nodes) => nodes
                .iter()
                .map(|n| Client::open(n.clone()))
                .collect::<RedisResult<Vec<_>>>()?,
            _ => vec![self.master_client(t).await?],
        };
        let mut last = None;
        for c in clients {
            match within(
                t.connect,
                "redis did not answer in time",
                c.get_async_pubsub(),
            )
            .await
            {
                Ok(p) => return Ok(p),
                Err(e) => last = Some(e),
            }
        }
        Err(last.unwrap_or_else(|| timed_out("no node to subscribe to")))
    }
}

/// Writes (creates or replaces) a route, indexes it and announces it.
pub async fn put_route(c: &mut Conn, session: &str, rec: &RouteRecord) -> RedisResult<()> {
    let key = route_key(session);
    let (set, absent) = rec.to_fields();
    let mut p = redis::pipe();
    p.atomic();
    p.hset_multiple(&key, &set).ignore();
    if !absent.is_empty() {
        p.hdel(&key, &absent).ignore();
    }
    match rec.expires_at {
        Some(at) => p
            .cmd("EXPIREAT")
            .arg(&key)
            .arg(at + EXPIRY_GRACE_SECS)
            .ignore(),
        None => p.cmd("PERSIST").arg(&key).ignore(),
    };
    p.query_async::<()>(c).await?;
    index_and_announce(c, session, rec).await
}

/// Reads a route: `None` when there is none, `Some(Err)` when the hash is not a record.
pub async fn get_route(
    c: &mut Conn,
    session: &str,
) -> RedisResult<Option<Result<RouteRecord, RecordError>>> {
    let fields: HashMap<String, String> = redis::cmd("HGETALL")
        .arg(route_key(session))
        .query_async(c)
        .await?;
    Ok((!fields.is_empty()).then(|| RouteRecord::from_fields(&fields)))
}

/// Whether a route key exists.
pub async fn route_exists(c: &mut Conn, session: &str) -> RedisResult<bool> {
    redis::cmd("EXISTS")
        .arg(route_key(session))
        .query_async(c)
        .await
}

/// Deletes a route and announces it (also when there was none: a cache somewhere may still
/// hold it). Returns whether a route was deleted.
pub async fn delete_route(c: &mut Conn, session: &str, reason: RemovalReason) -> RedisResult<bool> {
    let n: u64 = redis::cmd("DEL")
        .arg(route_key(session))
        .query_async(c)
        .await?;
    redis::cmd("ZREM")
        .arg(ROUTE_INDEX_KEY)
        .arg(session)
        .query_async::<()>(c)
        .await?;
    publish(c, &RouteEvent::del(session, reason)).await?;
    Ok(n > 0)
}

/// Publishes an event; returns how many subscribers got it (in a Cluster, those of the
/// node that took the command).
pub async fn publish(c: &mut Conn, event: &RouteEvent) -> RedisResult<u64> {
    redis::cmd("PUBLISH")
        .arg(EVENTS_CHANNEL)
        .arg(event.encode())
        .query_async(c)
        .await
}

/// Every route in the index, sorted by id, after pruning index entries whose keys Redis
/// has expired. Records that do not parse are listed with their error.
pub async fn list_routes(
    c: &mut Conn,
) -> RedisResult<Vec<(String, Result<RouteRecord, RecordError>)>> {
    let horizon = crate::unix_now().saturating_sub(EXPIRY_GRACE_SECS);
    redis::cmd("ZREMRANGEBYSCORE")
        .arg(ROUTE_INDEX_KEY)
        .arg("-inf")
        .arg(format!("({horizon}"))
        .query_async::<()>(c)
        .await?;
    let mut ids: Vec<String> = redis::cmd("ZRANGE")
        .arg(ROUTE_INDEX_KEY)
        .arg(0)
        .arg(-1)
        .query_async(c)
        .await?;
    ids.sort();
    let mut out = Vec::with_capacity(ids.len());
    for id in ids {
        match get_route(c, &id).await? {
            Some(r) => out.push((id, r)),
            None => {
                // Deleted behind the index's back (a plain DEL): tidy the index.
                redis::cmd("ZREM")
                    .arg(ROUTE_INDEX_KEY)
                    .arg(&id)
                    .query_async::<()>(c)
                    .await?;
            }
        }
    }
    Ok(out)
}

/// What [`create_session`] did.
#[derive(Debug, Clone, PartialEq)]
pub enum Created {
    /// The record was written.
    New,
    /// The idempotency key was seen before: this is the session it created.
    Existing(Box<SessionRecord>),
}

/// A write that could not be done as asked.
#[derive(Debug, thiserror::Error)]
pub enum SessionWriteError {
    #[error(transparent)]
    Redis(#[from] RedisError),
    /// The id exists already (a create), or the record changed since it was read (an
    /// update): read it again and decide again.
    #[error("session {0} was written by someone else in between")]
    Conflict(String),
    #[error("session {id}: {error}")]
    Record {
        id: String,
        error: SessionRecordError,
    },
    /// A write as the session's owner whose lease epoch is no longer the record's (the
    /// session was taken over, or the writer's lease was renewed under a new epoch).
    #[error("session {0}: the writer no longer owns it (its lease epoch is not the record's)")]
    Fenced(String),
}

/// Who writes as a session's owner: its host and lease epoch. A fenced write succeeds only
/// while the stored record names this host with this epoch.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Fence {
    pub host: String,
    pub epoch: u64,
}

/// Creates a session record (never overwrites one), indexes it, and with an idempotency key
/// remembers which session that key created. A retried create with the same key returns the
/// first session instead of writing a second one. Keys land in different Cluster slots, so
/// the steps are ordered to be safe without a transaction: the idempotency key is claimed
/// first (`SET NX`), and a second caller that lost the claim waits for the winner's record.
pub async fn create_session(
    c: &mut Conn,
    rec: &SessionRecord,
    idempotency: Option<&str>,
) -> Result<Created, SessionWriteError> {
    if let Some(k) = idempotency {
        let key = idempotency_key(k);
        let claimed: Option<String> = redis::cmd("SET")
            .arg(&key)
            .arg(&rec.id)
            .arg("NX")
            .arg("EX")
            .arg(IDEMPOTENCY_TTL_SECS)
            .query_async(c)
            .await?;
        if claimed.is_none() {
            let id: Option<String> = redis::cmd("GET").arg(&key).query_async(c).await?;
            let Some(id) = id else {
                return Err(SessionWriteError::Conflict(rec.id.clone()));
            };
            // The winner writes its record right after its claim.
            for _ in 0..50 {
                if let Some(existing) = get_session(c, &id).await? {
                    return existing
                        .map(|r| Created::Existing(Box::new(r)))
                        .map_err(|error| SessionWriteError::Record { id, error });
                }
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
            return Err(SessionWriteError::Conflict(id));
        }
    }
    let set: Option<String> = redis::cmd("SET")
        .arg(session_key(&rec.id))
        .arg(rec.encode())
        .arg("NX")
        .arg("EXAT")
        .arg(rec.retain_until_secs())
        .query_async(c)
        .await?;
    if set.is_none() {
        return Err(SessionWriteError::Conflict(rec.id.clone()));
    }
    redis::cmd("ZADD")
        .arg(SESSION_INDEX_KEY)
        .arg(rec.created_at)
        .arg(&rec.id)
        .query_async::<()>(c)
        .await?;
    Ok(Created::New)
}

/// Reads a session: `None` when there is none, `Some(Err)` when the key holds no usable
/// record.
pub async fn get_session(
    c: &mut Conn,
    id: &str,
) -> RedisResult<Option<Result<SessionRecord, SessionRecordError>>> {
    let s: Option<String> = redis::cmd("GET")
        .arg(session_key(id))
        .query_async(c)
        .await?;
    Ok(s.map(|s| SessionRecord::decode(&s)))
}

/// Replaces a session whose stored revision is `rec.rev`, writing it with `rev + 1`
/// (returned). One key, one script: atomic in a Cluster too.
pub async fn update_session(c: &mut Conn, rec: &SessionRecord) -> Result<u64, SessionWriteError> {
    cas_session(c, rec, None).await
}

/// [`update_session`] as the session's owner: refused ([`SessionWriteError::Fenced`])
/// unless the stored record names `fence`'s host and epoch.
pub async fn update_session_fenced(
    c: &mut Conn,
    rec: &SessionRecord,
    fence: &Fence,
) -> Result<u64, SessionWriteError> {
    cas_session(c, rec, Some(fence)).await
}

async fn cas_session(
    c: &mut Conn,
    rec: &SessionRecord,
    fence: Option<&Fence>,
) -> Result<u64, SessionWriteError> {
    // cjson decodes the stored record; a missing key or another rev is a conflict (0), a
    // fence that does not match the stored owner is refused (-1).
    const CAS: &str = r#"
local cur = redis.call('GET', KEYS[1])
if not cur then return 0 end
local ok, doc = pcall(cjson.decode, cur)
if not ok or tonumber(doc['rev'] or 0) ~= tonumber(ARGV[1]) then return 0 end
if ARGV[4] ~= '' then
  if doc['host'] ~= ARGV[4] or tonumber(doc['lease'] or -1) ~= tonumber(ARGV[5]) then return -1 end
end
redis.call('SET', KEYS[1], ARGV[2], 'EXAT', ARGV[3])
return 1
"#;
    let mut next = rec.clone();
    next.rev = rec.rev + 1;
    let done: i64 = redis::cmd("EVAL")
        .arg(CAS)
        .arg(1)
        .arg(session_key(&rec.id))
        .arg(rec.rev)
        .arg(next.encode())
        .arg(next.retain_until_secs())
        .arg(fence.map_or("", |f| f.host.as_str()))
        .arg(fence.map_or(0, |f| f.epoch))
        .query_async(c)
        .await?;
    match done {
        1 => Ok(next.rev),
        -1 => Err(SessionWriteError::Fenced(rec.id.clone())),
        _ => Err(SessionWriteError::Conflict(rec.id.clone())),
    }
}

/// The end of a script that writes a route record into `KEYS[2]` from the arguments
/// [`route_write_args`] appended, starting at `ARGV[i]` (the script sets `i`): the fields to
/// set (count, then name and value pairs), the fields to delete (count, then names), and the
/// expiry (Unix seconds, empty for none).
const ROUTE_WRITE: &str = r#"
local n = tonumber(ARGV[i])
i = i + 1
for _ = 1, n do
  redis.call('HSET', KEYS[2], ARGV[i], ARGV[i + 1])
  i = i + 2
end
local m = tonumber(ARGV[i])
i = i + 1
for _ = 1, m do
  redis.call('HDEL', KEYS[2], ARGV[i])
  i = i + 1
end
if ARGV[i] == '' then redis.call('PERSIST', KEYS[2]) else redis.call('EXPIREAT', KEYS[2], ARGV[i]) end
return 1
"#;

fn route_write_args(cmd: &mut Cmd, route: &RouteRecord) {
    let (set, absent) = route.to_fields();
    cmd.arg(set.len());
    for (k, v) in &set {
        cmd.arg(k).arg(v);
    }
    cmd.arg(absent.len());
    for k in &absent {
        cmd.arg(k);
    }
    cmd.arg(
        route
            .expires_at
            .map_or_else(String::new, |at| (at + EXPIRY_GRACE_SECS).to_string()),
    );
}

/// Indexes a route written by a script and announces it.
async fn index_and_announce(c: &mut Conn, session: &str, route: &RouteRecord) -> RedisResult<()> {
    let score = route
        .expires_at
        .map_or_else(|| "+inf".to_owned(), |t| t.to_string());
    redis::cmd("ZADD")
        .arg(ROUTE_INDEX_KEY)
        .arg(score)
        .arg(session)
        .query_async::<()>(c)
        .await?;
    publish(c, &RouteEvent::put(session)).await?;
    Ok(())
}

/// Replaces a session (compare-and-set on `rec.rev`, fenced like
/// [`update_session_fenced`] when `fence` is given) and writes its route in the same
/// script, so that nobody ever reads the session `ready` while gateways would still answer
/// 404 for it (the session and route keys share a Cluster slot). Then indexes and announces
/// the route like [`put_route`]. Returns the new revision.
pub async fn update_session_with_route(
    c: &mut Conn,
    rec: &SessionRecord,
    fence: Option<&Fence>,
    route: &RouteRecord,
) -> Result<u64, SessionWriteError> {
    static CAS_ROUTE: std::sync::LazyLock<String> = std::sync::LazyLock::new(|| {
        format!(
            "{}{ROUTE_WRITE}",
            r#"
local cur = redis.call('GET', KEYS[1])
if not cur then return 0 end
local ok, doc = pcall(cjson.decode, cur)
if not ok or tonumber(doc['rev'] or 0) ~= tonumber(ARGV[1]) then return 0 end
if ARGV[4] ~= '' then
  if doc['host'] ~= ARGV[4] or tonumber(doc['lease'] or -1) ~= tonumber(ARGV[5]) then return -1 end
end
redis.call('SET', KEYS[1], ARGV[2], 'EXAT', ARGV[3])
local i = 6
"#
        )
    });
    let mut next = rec.clone();
    next.rev = rec.rev + 1;
    let mut cmd = redis::cmd("EVAL");
    cmd.arg(CAS_ROUTE.as_str())
        .arg(2)
        .arg(session_key(&rec.id))
        .arg(route_key(&rec.id))
        .arg(rec.rev)
        .arg(next.encode())
        .arg(next.retain_until_secs())
        .arg(fence.map_or("", |f| f.host.as_str()))
        .arg(fence.map_or(0, |f| f.epoch));
    route_write_args(&mut cmd, route);
    let done: i64 = cmd.query_async(c).await?;
    match done {
        1 => {}
        -1 => return Err(SessionWriteError::Fenced(rec.id.clone())),
        _ => return Err(SessionWriteError::Conflict(rec.id.clone())),
    }
    index_and_announce(c, &rec.id, route).await?;
    Ok(next.rev)
}

/// Writes a session's route as its owner: in one script with the check that the stored
/// session is `ready` and names `fence`'s host and epoch (the session and route keys share
/// a Cluster slot), so a host that lost the session cannot bring its route back. Then
/// indexes and announces it like [`put_route`]. `Ok(false)`: refused by the fence.
pub async fn put_route_fenced(
    c: &mut Conn,
    session: &str,
    rec: &RouteRecord,
    fence: &Fence,
) -> RedisResult<bool> {
    static PUT: std::sync::LazyLock<String> = std::sync::LazyLock::new(|| {
        format!(
            "{}{ROUTE_WRITE}",
            r#"
local cur = redis.call('GET', KEYS[1])
if not cur then return 0 end
local ok, doc = pcall(cjson.decode, cur)
if not ok or doc['state'] ~= 'ready' or doc['host'] ~= ARGV[1] or tonumber(doc['lease'] or -1) ~= tonumber(ARGV[2]) then return 0 end
local i = 3
"#
        )
    });
    let mut cmd = redis::cmd("EVAL");
    cmd.arg(PUT.as_str())
        .arg(2)
        .arg(session_key(session))
        .arg(route_key(session))
        .arg(&fence.host)
        .arg(fence.epoch);
    route_write_args(&mut cmd, rec);
    let done: i64 = cmd.query_async(c).await?;
    if done != 1 {
        return Ok(false);
    }
    index_and_announce(c, session, rec).await?;
    Ok(true)
}

/// Every session still kept, oldest first (records that expired away are dropped from the
/// index as they are met; unusable ones are returned as errors with their id).
pub async fn list_sessions(
    c: &mut Conn,
) -> RedisResult<Vec<(String, Result<SessionRecord, SessionRecordError>)>> {
    let ids: Vec<String> = redis::cmd("ZRANGE")
        .arg(SESSION_INDEX_KEY)
        .arg(0)
        .arg(-1)
        .query_async(c)
        .await?;
    let mut out = Vec::with_capacity(ids.len());
    for id in ids {
        match get_session(c, &id).await? {
            Some(r) => out.push((id, r)),
            None => {
                redis::cmd("ZREM")
                    .arg(SESSION_INDEX_KEY)
                    .arg(&id)
                    .query_async::<()>(c)
                    .await?;
            }
        }
    }
    Ok(out)
}

/// Sets a string key until `until_secs` (Unix seconds).
async fn set_until(c: &mut Conn, key: &str, value: &str, until_secs: u64) -> RedisResult<()> {
    redis::cmd("SET")
        .arg(key)
        .arg(value)
        .arg("EXAT")
        .arg(until_secs)
        .query_async(c)
        .await
}

/// Remembers which session an agent token (its digest) belongs to, as long as the session.
pub async fn put_agent_token(c: &mut Conn, rec: &SessionRecord) -> RedisResult<()> {
    set_until(
        c,
        &agent_token_key(&rec.agent_token_sha256),
        &rec.id,
        rec.retain_until_secs(),
    )
    .await
}

/// The session an agent token belongs to.
pub async fn agent_token_session(c: &mut Conn, digest: &[u8; 32]) -> RedisResult<Option<String>> {
    redis::cmd("GET")
        .arg(agent_token_key(digest))
        .query_async(c)
        .await
}

/// Stores a session's sealed credentials (opaque JSON), as long as the session is kept.
pub async fn put_credentials(
    c: &mut Conn,
    rec: &SessionRecord,
    sealed_json: &str,
) -> RedisResult<()> {
    set_until(
        c,
        &credentials_key(&rec.id),
        sealed_json,
        rec.retain_until_secs(),
    )
    .await
}

pub async fn get_credentials(c: &mut Conn, id: &str) -> RedisResult<Option<String>> {
    redis::cmd("GET")
        .arg(credentials_key(id))
        .query_async(c)
        .await
}

/// Replaces sealed credentials only if they are still `old` (a rewrap racing a delete or
/// another rewrap loses, and says so).
pub async fn replace_credentials(
    c: &mut Conn,
    id: &str,
    old: &str,
    new: &str,
) -> RedisResult<bool> {
    const CAS: &str = r#"
if redis.call('GET', KEYS[1]) ~= ARGV[1] then return 0 end
redis.call('SET', KEYS[1], ARGV[2], 'KEEPTTL')
return 1
"#;
    let done: i64 = redis::cmd("EVAL")
        .arg(CAS)
        .arg(1)
        .arg(credentials_key(id))
        .arg(old)
        .arg(new)
        .query_async(c)
        .await?;
    Ok(done == 1)
}

pub async fn delete_credentials(c: &mut Conn, id: &str) -> RedisResult<bool> {
    let n: u64 = redis::cmd("DEL")
        .arg(credentials_key(id))
        .query_async(c)
        .await?;
    Ok(n > 0)
}

/// The ids of every session with stored credentials (for a rewrap).
pub async fn credentials_ids(c: &mut Conn) -> RedisResult<Vec<String>> {
    let mut out = Vec::new();
    for (id, _) in list_sessions(c).await? {
        if redis::cmd("EXISTS")
            .arg(credentials_key(&id))
            .query_async::<bool>(c)
            .await?
        {
            out.push(id);
        }
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use futures_util::StreamExt as _;

    use super::*;
    use crate::testing::RedisServer;
    use crate::{EventOp, ROUTE_KEY_PREFIX};

    fn record(port: u16, expires_at: Option<u64>) -> RouteRecord {
        RouteRecord {
            upstream: format!("127.0.0.1:{port}").parse().unwrap(),
            token_sha256: Some(crate::record::token_digest(b"t")),
            view_token_sha256: None,
            expires_at,
            max_viewers: Some(3),
            created_at: crate::unix_now(),
            writer: Some("test".into()),
            record: false,
        }
    }

    #[tokio::test]
    async fn put_get_list_delete_and_events() {
        let r = RedisServer::start();
        let url: RedisUrl = r.url().parse().unwrap();
        let mut c = url.connect(Timeouts::default()).await.unwrap();
        let mut sub = url.pubsub(Timeouts::default()).await.unwrap();
        sub.subscribe(EVENTS_CHANNEL).await.unwrap();
        let mut events = sub.into_on_message();

        let far = crate::unix_now() + 3600;
        put_route(&mut c, "b", &record(2, Some(far))).await.unwrap();
        put_route(&mut c, "a", &record(1, None)).await.unwrap();
        assert_eq!(
            get_route(&mut c, "a").await.unwrap(),
            Some(Ok(record(1, None)))
        );
        assert_eq!(get_route(&mut c, "zz").await.unwrap(), None);
        // The key expires a grace period after expires_at; a route without expiry persists.
        let ttl = r.cli(&["EXPIRETIME", &format!("{ROUTE_KEY_PREFIX}b")]);
        assert_eq!(ttl.trim(), (far + EXPIRY_GRACE_SECS).to_string());
        assert_eq!(
            r.cli(&["TTL", &format!("{ROUTE_KEY_PREFIX}a")]).trim(),
            "-1"
        );
        // An overwrite drops the fields the new record leaves out.
        let mut bare = record(1, None);
        bare.token_sha256 = None;
        put_route(&mut c, "a", &bare).await.unwrap();
        assert_eq!(get_route(&mut c, "a").await.unwrap(), Some(Ok(bare)));

        let ids: Vec<String> = list_routes(&mut c)
            .await
            .unwrap()
            .into_iter()
            .map(|(id, _)| id)
            .collect();
        assert_eq!(ids, ["a", "b"]);
        // A key deleted behind the index's back drops out of the listing.
        r.cli(&["DEL", &format!("{ROUTE_KEY_PREFIX}b")]);
        assert_eq!(list_routes(&mut c).await.unwrap().len(), 1);

        assert!(
            delete_route(&mut c, "a", RemovalReason::Expired)
                .await
                .unwrap()
        );
        assert!(
            !delete_route(&mut c, "a", RemovalReason::Revoked)
                .await
                .unwrap()
        );
        assert!(route_exists(&mut c, "a").await.map(|e| !e).unwrap());

        let mut got = Vec::new();
        for _ in 0..5 {
            let m = tokio::time::timeout(Duration::from_secs(5), events.next())
                .await
                .unwrap()
                .unwrap();
            got.push(RouteEvent::decode(m.get_payload_bytes()).unwrap());
        }
        let ops: Vec<(EventOp, &str)> = got.iter().map(|e| (e.op, e.session.as_str())).collect();
        assert_eq!(
            ops,
            [
                (EventOp::Put, "b"),
                (EventOp::Put, "a"),
                (EventOp::Put, "a"),
                (EventOp::Del, "a"),
                (EventOp::Del, "a")
            ]
        );
        assert_eq!(got[3].reason, Some(RemovalReason::Expired));
    }

    fn session(id: &str) -> SessionRecord {
        use crate::session::{SessionState, Transition, unix_now_ms};
        let now = unix_now_ms();
        SessionRecord {
            v: crate::SCHEMA_VERSION,
            id: id.into(),
            user_id: "u1".into(),
            provider: "p".into(),
            state: SessionState::Pending,
            reason: None,
            created_at: now,
            expires_at: now + 60_000,
            token_sha256: crate::record::token_digest(b"viewer"),
            agent_token_sha256: crate::record::token_digest(b"agent"),
            backend: "process".into(),
            host: None,
            lease: None,
            vm: None,
            history: vec![Transition {
                at: now,
                state: SessionState::Pending,
                reason: None,
            }],
            probes: None,
            rev: 0,
        }
    }

    async fn sessions_on(url: &str) {
        use crate::session::SessionState;
        let url: RedisUrl = url.parse().unwrap();
        let mut c = url.connect(Timeouts::default()).await.unwrap();
        let a = session("sa");
        assert_eq!(
            create_session(&mut c, &a, None).await.unwrap(),
            Created::New
        );
        // Never overwritten by a second create.
        assert!(matches!(
            create_session(&mut c, &a, None).await,
            Err(SessionWriteError::Conflict(_))
        ));
        let mut got = get_session(&mut c, "sa").await.unwrap().unwrap().unwrap();
        assert_eq!(got, a);
        // Compare-and-set on the revision: the first writer wins, a stale one conflicts.
        let stale = got.clone();
        got.state = SessionState::Booting;
        assert_eq!(update_session(&mut c, &got).await.unwrap(), 1);
        assert!(matches!(
            update_session(&mut c, &stale).await,
            Err(SessionWriteError::Conflict(_))
        ));
        let now = get_session(&mut c, "sa").await.unwrap().unwrap().unwrap();
        assert_eq!((now.state, now.rev), (SessionState::Booting, 1));
        // An unknown id is a conflict too: nothing to update.
        assert!(matches!(
            update_session(&mut c, &session("nobody")).await,
            Err(SessionWriteError::Conflict(_))
        ));
        // The idempotency key returns the first session, whatever the retry carries.
        let b = session("sb");
        assert_eq!(
            create_session(&mut c, &b, Some("key-1")).await.unwrap(),
            Created::New
        );
        let retry = session("sb-retry");
        assert_eq!(
            create_session(&mut c, &retry, Some("key-1")).await.unwrap(),
            Created::Existing(Box::new(b.clone()))
        );
        assert_eq!(get_session(&mut c, "sb-retry").await.unwrap(), None);
        let listed: Vec<String> = list_sessions(&mut c)
            .await
            .unwrap()
            .into_iter()
            .map(|(id, r)| {
                assert!(r.is_ok());
                id
            })
            .collect();
        assert_eq!(listed, ["sa", "sb"]);
        fenced_on(&mut c).await;
    }

    /// The owner's writes: accepted while the record names its host and epoch, refused
    /// (the record and the route untouched) once it does not.
    async fn fenced_on(c: &mut Conn) {
        use crate::session::SessionState;
        let mut rec = session("sf");
        create_session(c, &rec, None).await.unwrap();
        rec.host = Some("h1".into());
        rec.lease = Some(7);
        rec.rev = update_session(c, &rec).await.unwrap();
        let me = Fence {
            host: "h1".into(),
            epoch: 7,
        };
        let route = RouteRecord {
            upstream: "127.0.0.1:5901".parse().unwrap(),
            token_sha256: None,
            view_token_sha256: None,
            expires_at: Some(crate::unix_now() + 60),
            max_viewers: None,
            created_at: 1,
            writer: None,
            record: false,
        };
        // Not ready yet: no route, even from the owner.
        assert!(!put_route_fenced(c, "sf", &route, &me).await.unwrap());
        // Ready and routed in one write: a stale revision writes neither.
        let mut stale = rec.clone();
        stale.rev += 7;
        stale.state = SessionState::Ready;
        assert!(matches!(
            update_session_with_route(c, &stale, Some(&me), &route).await,
            Err(SessionWriteError::Conflict(_))
        ));
        assert_eq!(get_route(c, "sf").await.unwrap(), None);
        rec.state = SessionState::Ready;
        rec.rev = update_session_with_route(c, &rec, Some(&me), &route)
            .await
            .unwrap();
        assert_eq!(get_route(c, "sf").await.unwrap(), Some(Ok(route.clone())));
        assert!(put_route_fenced(c, "sf", &route, &me).await.unwrap());
        assert_eq!(get_route(c, "sf").await.unwrap(), Some(Ok(route.clone())));
        // Another host takes the session over (a plain compare-and-set): the old owner's
        // writes are refused from now on, and its route cannot come back.
        let mut taken = rec.clone();
        taken.host = Some("h2".into());
        taken.lease = Some(1);
        taken.rev = update_session(c, &taken).await.unwrap();
        delete_route(c, "sf", RemovalReason::Revoked).await.unwrap();
        let mut late = taken.clone();
        late.reason = Some("from the old owner".into());
        assert!(matches!(
            update_session_fenced(c, &late, &me).await,
            Err(SessionWriteError::Fenced(_))
        ));
        assert!(!put_route_fenced(c, "sf", &route, &me).await.unwrap());
        assert_eq!(get_route(c, "sf").await.unwrap(), None);
        // A newer epoch of the same host is another owner too.
        let h1_again = Fence {
            host: "h1".into(),
            epoch: 8,
        };
        assert!(!put_route_fenced(c, "sf", &route, &h1_again).await.unwrap());
        let now = get_session(c, "sf").await.unwrap().unwrap().unwrap();
        assert_eq!((now.host.as_deref(), now.reason), (Some("h2"), None));
    }

    #[tokio::test]
    async fn sessions_create_update_list_standalone() {
        let r = RedisServer::start();
        sessions_on(&r.url()).await;
        // Kept a day past expiry, and the idempotency key for a day, hashed.
        let rec = session("sa");
        let at: u64 = r
            .cli(&["EXPIRETIME", &crate::session::session_key("sa")])
            .trim()
            .parse()
            .unwrap();
        assert!(at >= rec.expires_at / 1000 + crate::session::SESSION_RETENTION_SECS - 5);
        let keys = r.cli(&["KEYS", "vncgate:idempotency:*"]);
        assert!(
            !keys.contains("key-1") && keys.contains("vncgate:idempotency:"),
            "{keys}"
        );
    }

    #[tokio::test]
    async fn sessions_on_a_cluster() {
        let cluster = crate::testing::RedisCluster::start();
        sessions_on(&cluster.url()).await;
    }
}
