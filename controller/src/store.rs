//! Where sessions and routes live: Redis through the shared schema (`--redis`), or this
//! process's memory (the embedded default). One type, two variants, the same operations and
//! the same compare-and-set semantics, so the service cannot tell them apart.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use vncgate_schema::session::{SessionRecord, idempotency_key};
use vncgate_schema::store::{self as schema_store, Created, Fence, SessionWriteError};
use vncgate_schema::{Conn, RemovalReason, RouteRecord};

/// A store operation that failed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum StoreError {
    /// Redis could not be reached or answered with an error: retry later (503).
    Unavailable(String),
    /// The record changed since it was read (or the id is taken): read again, decide again.
    Conflict,
    /// The key holds something that is not a usable record (written by a newer version?).
    Invalid(String),
    /// A write as the session's owner was refused: the record no longer names this host's
    /// lease (the session was taken over, or this host lost its lease).
    Fenced,
}

impl std::fmt::Display for StoreError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            StoreError::Unavailable(e) => write!(f, "store unavailable: {e}"),
            StoreError::Conflict => f.write_str("written by someone else in between"),
            StoreError::Invalid(e) => write!(f, "unusable record: {e}"),
            StoreError::Fenced => {
                f.write_str("refused: this host no longer holds the session's lease")
            }
        }
    }
}

impl std::error::Error for StoreError {}

impl From<SessionWriteError> for StoreError {
    fn from(e: SessionWriteError) -> Self {
        match e {
            SessionWriteError::Redis(e) => StoreError::Unavailable(e.to_string()),
            SessionWriteError::Conflict(_) => StoreError::Conflict,
            SessionWriteError::Record { error, .. } => StoreError::Invalid(error.to_string()),
            SessionWriteError::Fenced(_) => StoreError::Fenced,
        }
    }
}

fn unavailable(e: impl std::fmt::Display) -> StoreError {
    StoreError::Unavailable(e.to_string())
}

#[derive(Default)]
struct Memory {
    /// The embedded gateway's table, which every route write also goes to.
    gateway: Option<vncgate::route_table::RouteTable>,
    sessions: HashMap<String, SessionRecord>,
    /// Creation order, for listing.
    order: Vec<String>,
    idempotency: HashMap<String, String>,
    routes: HashMap<String, RouteRecord>,
    agent_tokens: HashMap<[u8; 32], String>,
    credentials: HashMap<String, String>,
}

#[derive(Clone)]
enum Backing {
    Memory(Arc<Mutex<Memory>>),
    Redis(Conn),
}

/// Sessions and routes, in Redis or in this process.
#[derive(Clone)]
pub struct Store {
    inner: Backing,
}

impl Store {
    pub fn memory() -> Store {
        Store {
            inner: Backing::Memory(Arc::default()),
        }
    }

    /// In memory, feeding an embedded gateway's route table.
    pub fn memory_with_gateway(table: vncgate::route_table::RouteTable) -> Store {
        Store {
            inner: Backing::Memory(Arc::new(Mutex::new(Memory {
                gateway: Some(table),
                ..Memory::default()
            }))),
        }
    }

    pub fn redis(conn: Conn) -> Store {
        Store {
            inner: Backing::Redis(conn),
        }
    }

    pub fn name(&self) -> &'static str {
        match &self.inner {
            Backing::Memory(_) => "memory",
            Backing::Redis(_) => "redis",
        }
    }

    fn mem(m: &Arc<Mutex<Memory>>) -> std::sync::MutexGuard<'_, Memory> {
        m.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Writes a new session; with an idempotency key seen before, returns the session it
    /// created instead.
    pub async fn create(
        &self,
        rec: &SessionRecord,
        idempotency: Option<&str>,
    ) -> Result<Created, StoreError> {
        match &self.inner {
            Backing::Redis(c) => {
                let mut c = c.clone();
                let created = schema_store::create_session(&mut c, rec, idempotency).await?;
                if created == Created::New {
                    schema_store::put_agent_token(&mut c, rec)
                        .await
                        .map_err(unavailable)?;
                }
                Ok(created)
            }
            Backing::Memory(m) => {
                let mut m = Self::mem(m);
                if let Some(k) = idempotency {
                    let k = idempotency_key(k);
                    if let Some(id) = m.idempotency.get(&k) {
                        return Ok(Created::Existing(Box::new(m.sessions[id].clone())));
                    }
                    m.idempotency.insert(k, rec.id.clone());
                }
                if m.sessions.contains_key(&rec.id) {
                    return Err(StoreError::Conflict);
                }
                m.sessions.insert(rec.id.clone(), rec.clone());
                m.order.push(rec.id.clone());
                m.agent_tokens
                    .insert(rec.agent_token_sha256, rec.id.clone());
                Ok(Created::New)
            }
        }
    }

    pub async fn get(&self, id: &str) -> Result<Option<SessionRecord>, StoreError> {
        match &self.inner {
            Backing::Redis(c) => match schema_store::get_session(&mut c.clone(), id)
                .await
                .map_err(unavailable)?
            {
                None => Ok(None),
                Some(Ok(r)) => Ok(Some(r)),
                Some(Err(e)) => Err(StoreError::Invalid(e.to_string())),
            },
            Backing::Memory(m) => Ok(Self::mem(m).sessions.get(id).cloned()),
        }
    }

    /// Replaces `rec` if its revision is still the stored one; returns the record as
    /// written (revision incremented).
    pub async fn update(&self, rec: &SessionRecord) -> Result<SessionRecord, StoreError> {
        self.update_as(rec, None).await
    }

    /// [`Store::update`], as the session's owner when `fence` is given: refused
    /// ([`StoreError::Fenced`]) unless the stored record still names that host and epoch.
    pub async fn update_as(
        &self,
        rec: &SessionRecord,
        fence: Option<&Fence>,
    ) -> Result<SessionRecord, StoreError> {
        let mut next = rec.clone();
        match &self.inner {
            Backing::Redis(c) => {
                let mut c = c.clone();
                next.rev = match fence {
                    Some(f) => schema_store::update_session_fenced(&mut c, rec, f).await?,
                    None => schema_store::update_session(&mut c, rec).await?,
                };
            }
            Backing::Memory(m) => {
                let mut m = Self::mem(m);
                match m.sessions.get(&rec.id) {
                    Some(cur) if cur.rev == rec.rev => {}
                    _ => return Err(StoreError::Conflict),
                }
                next.rev = rec.rev + 1;
                m.sessions.insert(rec.id.clone(), next.clone());
            }
        }
        Ok(next)
    }

    /// Every session kept, oldest first.
    pub async fn list(&self) -> Result<Vec<SessionRecord>, StoreError> {
        match &self.inner {
            Backing::Redis(c) => {
                let all = schema_store::list_sessions(&mut c.clone())
                    .await
                    .map_err(unavailable)?;
                Ok(all
                    .into_iter()
                    .filter_map(|(id, r)| match r {
                        Ok(r) => Some(r),
                        Err(e) => {
                            tracing::warn!(session = %id, error = %e, "unusable session record skipped");
                            None
                        }
                    })
                    .collect())
            }
            Backing::Memory(m) => {
                let m = Self::mem(m);
                Ok(m.order
                    .iter()
                    .filter_map(|id| m.sessions.get(id).cloned())
                    .collect())
            }
        }
    }

    /// [`Store::update_as`] and the session's route in one atomic write: a reader never
    /// sees the session `ready` before its route exists.
    pub async fn update_with_route(
        &self,
        rec: &SessionRecord,
        fence: Option<&Fence>,
        route: &RouteRecord,
    ) -> Result<SessionRecord, StoreError> {
        match &self.inner {
            Backing::Redis(c) => {
                let mut next = rec.clone();
                next.rev =
                    schema_store::update_session_with_route(&mut c.clone(), rec, fence, route)
                        .await?;
                Ok(next)
            }
            Backing::Memory(m) => {
                let mut guard = Self::mem(m);
                match guard.sessions.get(&rec.id) {
                    Some(cur) if cur.rev == rec.rev => {}
                    _ => return Err(StoreError::Conflict),
                }
                let mut next = rec.clone();
                next.rev = rec.rev + 1;
                guard.sessions.insert(rec.id.clone(), next.clone());
                if let Some(g) = &guard.gateway {
                    g.put(&rec.id, vncgate::route::Route::from(route.clone()));
                }
                guard.routes.insert(rec.id.clone(), route.clone());
                Ok(next)
            }
        }
    }

    /// Publishes a session's route as its owner: with `fence`, only while the stored
    /// session is `ready` and names that host and epoch, in one atomic step.
    pub async fn put_route_as(
        &self,
        id: &str,
        route: &RouteRecord,
        fence: Option<&Fence>,
    ) -> Result<(), StoreError> {
        match (&self.inner, fence) {
            (Backing::Redis(c), Some(f)) => {
                match schema_store::put_route_fenced(&mut c.clone(), id, route, f).await {
                    Ok(true) => Ok(()),
                    Ok(false) => Err(StoreError::Fenced),
                    Err(e) => Err(unavailable(e)),
                }
            }
            _ => self.put_route(id, route).await,
        }
    }

    /// The Redis connection, for the coordination of controllers sharing it.
    pub fn redis_conn(&self) -> Option<Conn> {
        match &self.inner {
            Backing::Redis(c) => Some(c.clone()),
            Backing::Memory(_) => None,
        }
    }

    /// Indexes the agent token of a record whose token was issued after its creation (a
    /// session placed by another controller than the one that created it).
    pub async fn put_agent_token(&self, rec: &SessionRecord) -> Result<(), StoreError> {
        match &self.inner {
            Backing::Redis(c) => schema_store::put_agent_token(&mut c.clone(), rec)
                .await
                .map_err(unavailable),
            Backing::Memory(m) => {
                Self::mem(m)
                    .agent_tokens
                    .insert(rec.agent_token_sha256, rec.id.clone());
                Ok(())
            }
        }
    }

    /// Publishes a session's route (gateways on Redis hear of it at once).
    pub async fn put_route(&self, id: &str, route: &RouteRecord) -> Result<(), StoreError> {
        match &self.inner {
            Backing::Redis(c) => schema_store::put_route(&mut c.clone(), id, route)
                .await
                .map_err(unavailable),
            Backing::Memory(m) => {
                let mut m = Self::mem(m);
                if let Some(g) = &m.gateway {
                    g.put(id, vncgate::route::Route::from(route.clone()));
                }
                m.routes.insert(id.to_owned(), route.clone());
                Ok(())
            }
        }
    }

    /// Withdraws a session's route; live viewers are told `reason`.
    pub async fn delete_route(&self, id: &str, reason: RemovalReason) -> Result<(), StoreError> {
        match &self.inner {
            Backing::Redis(c) => schema_store::delete_route(&mut c.clone(), id, reason)
                .await
                .map(drop)
                .map_err(unavailable),
            Backing::Memory(m) => {
                let mut m = Self::mem(m);
                if let Some(g) = &m.gateway {
                    g.remove(id, reason == RemovalReason::Expired);
                }
                m.routes.remove(id);
                Ok(())
            }
        }
    }

    /// The route a session has now (the in-memory store's answer for an embedded gateway,
    /// Redis's for anyone).
    pub async fn route(&self, id: &str) -> Result<Option<RouteRecord>, StoreError> {
        match &self.inner {
            Backing::Redis(c) => match schema_store::get_route(&mut c.clone(), id)
                .await
                .map_err(unavailable)?
            {
                None => Ok(None),
                Some(Ok(r)) => Ok(Some(r)),
                Some(Err(e)) => Err(StoreError::Invalid(e.to_string())),
            },
            Backing::Memory(m) => Ok(Self::mem(m).routes.get(id).cloned()),
        }
    }

    /// The session whose agent holds the token with this digest.
    pub async fn agent_token_session(
        &self,
        digest: &[u8; 32],
    ) -> Result<Option<String>, StoreError> {
        match &self.inner {
            Backing::Redis(c) => schema_store::agent_token_session(&mut c.clone(), digest)
                .await
                .map_err(unavailable),
            Backing::Memory(m) => Ok(Self::mem(m).agent_tokens.get(digest).cloned()),
        }
    }

    /// A session's sealed credentials (JSON), if stored.
    pub async fn credentials(&self, id: &str) -> Result<Option<String>, StoreError> {
        match &self.inner {
            Backing::Redis(c) => schema_store::get_credentials(&mut c.clone(), id)
                .await
                .map_err(unavailable),
            Backing::Memory(m) => Ok(Self::mem(m).credentials.get(id).cloned()),
        }
    }

    pub async fn put_credentials(
        &self,
        rec: &SessionRecord,
        sealed: &str,
    ) -> Result<(), StoreError> {
        match &self.inner {
            Backing::Redis(c) => schema_store::put_credentials(&mut c.clone(), rec, sealed)
                .await
                .map_err(unavailable),
            Backing::Memory(m) => {
                Self::mem(m)
                    .credentials
                    .insert(rec.id.clone(), sealed.to_owned());
                Ok(())
            }
        }
    }

    /// Replaces sealed credentials if they are still `old`; returns whether it did.
    pub async fn replace_credentials(
        &self,
        id: &str,
        old: &str,
        new: &str,
    ) -> Result<bool, StoreError> {
        match &self.inner {
            Backing::Redis(c) => schema_store::replace_credentials(&mut c.clone(), id, old, new)
                .await
                .map_err(unavailable),
            Backing::Memory(m) => {
                let mut m = Self::mem(m);
                match m.credentials.get_mut(id) {
                    Some(cur) if cur == old => {
                        *cur = new.to_owned();
                        Ok(true)
                    }
                    _ => Ok(false),
                }
            }
        }
    }

    pub async fn delete_credentials(&self, id: &str) -> Result<bool, StoreError> {
        match &self.inner {
            Backing::Redis(c) => schema_store::delete_credentials(&mut c.clone(), id)
                .await
                .map_err(unavailable),
            Backing::Memory(m) => Ok(Self::mem(m).credentials.remove(id).is_some()),
        }
    }

    /// Whether the store answers now (Redis: a PING), for `/readyz`.
    pub async fn ping(&self) -> Result<(), StoreError> {
        match &self.inner {
            Backing::Redis(c) => redis_ping(&mut c.clone()).await,
            Backing::Memory(_) => Ok(()),
        }
    }
}

async fn redis_ping(c: &mut Conn) -> Result<(), StoreError> {
    use redis::aio::ConnectionLike as _;
    c.req_packed_command(&redis::cmd("PING"))
        .await
        .map(drop)
        .map_err(unavailable)
}
