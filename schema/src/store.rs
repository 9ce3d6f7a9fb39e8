//! Connections to the Redis a [`RedisUrl`] names, and the schema's operations on them.
//!
//! Writes to one route touch one key, so they are atomic in a Cluster too (a `MULTI` on
//! one slot); the index and the event follow as separate commands. Readers never depend on
//! the index: it serves listing only.

use std::collections::HashMap;
use std::time::Duration;

use redis::aio::{ConnectionLike, MultiplexedConnection, PubSub};
use redis::cluster_async::ClusterConnection;
use redis::sentinel::{SentinelClient, SentinelNodeConnectionInfo, SentinelServerType};
use redis::{AsyncConnectionConfig, Client, Cmd, ErrorKind, Pipeline, RedisError, RedisFuture};
use redis::{RedisResult, Value};

use crate::record::{RecordError, RouteRecord};
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
}

impl ConnectionLike for Conn {
    fn req_packed_command<'a>(&'a mut self, cmd: &'a Cmd) -> RedisFuture<'a, Value> {
        match self {
            Conn::Single(c) => c.req_packed_command(cmd),
            Conn::Cluster(c) => c.req_packed_command(cmd),
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
        }
    }

    fn get_db(&self) -> i64 {
        match self {
            Conn::Single(c) => c.get_db(),
            Conn::Cluster(c) => c.get_db(),
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
    let score = rec
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
            expires_at,
            max_viewers: Some(3),
            created_at: crate::unix_now(),
            writer: Some("test".into()),
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
}
