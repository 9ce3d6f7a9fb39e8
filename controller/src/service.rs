//! The session service: creates sessions, boots their VMs, decides readiness, keeps probing
//! ready ones (the reconciler), and carries out every transition's effects. Transitions are
//! [`crate::lifecycle::apply`]'s; the record is persisted whole, by compare-and-set, and
//! re-read and re-decided on a conflict, so an API call and the reconciler never undo each
//! other. The route is written only when a session becomes `ready` and withdrawn on every way
//! out of it.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use rand::RngCore as _;
use vncgate_schema::session::{SessionRecord, SessionState, Transition, unix_now_ms};
use vncgate_schema::store::Created;
use vncgate_schema::{RouteRecord, SCHEMA_VERSION};

use crate::backend::{Backend, Vm, VmData};
use crate::capacity::Capacity;
use crate::cluster::Lease;
use crate::credentials::{KeyRing, Sealed};
use crate::lifecycle::{self, Effects, Event};
use crate::metrics as m;
use crate::readiness;
use crate::store::{Store, StoreError};

/// How the service runs sessions.
#[derive(Debug, Clone)]
pub struct Config {
    /// How long a VM has to become ready before its session fails.
    pub boot_timeout: Duration,
    /// Deadline of one readiness check (agent and VNC port, at once).
    pub probe_timeout: Duration,
    /// How often ready sessions are probed, and expiries reaped.
    pub reconcile_interval: Duration,
    /// A session's lifetime when the request names none, and the longest allowed.
    pub default_ttl: Duration,
    pub max_ttl: Duration,
    /// Where VMs reach this controller (their agent posts credentials there).
    pub controller_url: String,
    /// Viewers per session written into routes (`None`: the gateway's default).
    pub max_viewers: Option<u32>,
    /// How long a withdrawn route's VM keeps running, so that gateways close live viewers
    /// with the withdrawal's code before the VM's end reaches them.
    pub withdraw_grace: Duration,
    /// VMs this host runs at most (`None`: no limit); sessions beyond it wait in `pending`.
    pub max_vms: Option<usize>,
    /// How long a session waits for a VM slot before it fails with reason `capacity`.
    pub placement_timeout: Duration,
    /// This host's name (`--host-id`), written into the sessions it places.
    pub host_id: String,
}

impl Default for Config {
    fn default() -> Self {
        Self {
            boot_timeout: Duration::from_secs(60),
            probe_timeout: Duration::from_secs(2),
            reconcile_interval: Duration::from_secs(2),
            default_ttl: Duration::from_secs(3600),
            max_ttl: Duration::from_secs(24 * 3600),
            controller_url: "http://127.0.0.1:8000".into(),
            max_viewers: None,
            withdraw_grace: Duration::from_secs(1),
            max_vms: None,
            placement_timeout: Duration::from_secs(60),
            host_id: "local".into(),
        }
    }
}

/// A request the service refuses, or could not carry out.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ServiceError {
    /// The request is malformed (400), with what is wrong.
    BadRequest(String),
    NotFound,
    /// The session's state does not allow this (409).
    Conflict(String),
    /// The store cannot be reached (503).
    Unavailable(String),
}

impl std::fmt::Display for ServiceError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            ServiceError::BadRequest(e) => write!(f, "bad request: {e}"),
            ServiceError::NotFound => f.write_str("unknown session"),
            ServiceError::Conflict(e) => write!(f, "conflict: {e}"),
            ServiceError::Unavailable(e) => write!(f, "unavailable: {e}"),
        }
    }
}

impl From<StoreError> for ServiceError {
    fn from(e: StoreError) -> Self {
        match e {
            StoreError::Unavailable(e) | StoreError::Invalid(e) => ServiceError::Unavailable(e),
            StoreError::Conflict => ServiceError::Unavailable("too many concurrent writes".into()),
            StoreError::Fenced => ServiceError::Conflict(
                "this controller no longer owns the session (its host lease was lost)".into(),
            ),
        }
    }
}

/// What `POST /api/sessions` asks for.
#[derive(Debug, Clone)]
pub struct CreateRequest {
    pub user_id: String,
    pub provider: String,
    pub ttl: Option<Duration>,
}

/// A created session: its record, and the viewer token, which exists in plaintext only in
/// this answer (`None` for a replay of an idempotent create: it was returned the first
/// time and only its digest is kept).
#[derive(Debug, Clone)]
pub struct CreatedSession {
    pub record: SessionRecord,
    pub token: Option<String>,
    pub replayed: bool,
}

pub struct Service<B: Backend> {
    store: Store,
    backend: B,
    cfg: Config,
    http: reqwest::Client,
    /// The VMs this process runs or adopted, by session.
    vms: Mutex<HashMap<String, Vm>>,
    /// Woken on every write, for `wait`.
    changed: tokio::sync::Notify,
    /// Key-encryption keys of the credentials store; the newest seals.
    keys: KeyRing,
    /// SHA-256 of the admin token that reads credentials (`--admin-token-file`).
    admin_token_sha256: Option<[u8; 32]>,
    /// VM slots (`--max-vms`).
    capacity: Capacity,
    /// This host's lease when controllers share a Redis: sessions are placed by pull
    /// ([`crate::placement`]) and owner writes are fenced. `None` on the in-memory store.
    lease: Option<Arc<Lease>>,
}

/// Why a credentials call was refused: each with its status.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum CredentialsError {
    /// 400.
    BadRequest(String),
    /// 401: no token, or one nobody issued.
    Unauthorized(String),
    /// 403: a valid token of another session.
    Forbidden(String),
    /// 404.
    NotFound(String),
    /// 409: the session's state does not take credentials, or others are stored.
    Conflict(String),
    /// 503.
    Unavailable(String),
}

impl From<ServiceError> for CredentialsError {
    fn from(e: ServiceError) -> Self {
        match e {
            ServiceError::BadRequest(r) => CredentialsError::BadRequest(r),
            ServiceError::NotFound => CredentialsError::NotFound("unknown session".into()),
            ServiceError::Conflict(r) => CredentialsError::Conflict(r),
            ServiceError::Unavailable(r) => CredentialsError::Unavailable(r),
        }
    }
}

impl From<StoreError> for CredentialsError {
    fn from(e: StoreError) -> Self {
        ServiceError::from(e).into()
    }
}

/// What a store of credentials did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Stored {
    /// Sealed and written; the session is `completed`.
    New,
    /// The same credentials were stored before: nothing changed.
    Again,
}

/// Credentials as an admin reads them.
#[derive(Debug, Clone, PartialEq)]
pub struct Opened {
    pub session_id: String,
    pub provider: String,
    pub credentials: serde_json::Value,
    pub stored_at: u64,
    pub kid: String,
}

/// A fresh 256-bit token, hex.
pub(crate) fn random_token() -> String {
    random_hex(32)
}

fn random_hex(bytes: usize) -> String {
    let mut b = vec![0u8; bytes];
    rand::rng().fill_bytes(&mut b);
    hex::encode(b)
}

fn check_field(name: &str, v: &str) -> Result<(), ServiceError> {
    if v.is_empty() || v.len() > 256 || v.chars().any(char::is_control) {
        return Err(ServiceError::BadRequest(format!(
            "{name} must be 1-256 characters without control characters"
        )));
    }
    Ok(())
}

impl<B: Backend> Service<B> {
    pub fn new(
        store: Store,
        backend: B,
        cfg: Config,
        keys: KeyRing,
        admin_token_sha256: Option<[u8; 32]>,
        lease: Option<Arc<Lease>>,
    ) -> Arc<Self> {
        Arc::new(Self {
            lease,
            store,
            backend,
            http: reqwest::Client::new(),
            vms: Mutex::default(),
            changed: tokio::sync::Notify::new(),
            keys,
            admin_token_sha256,
            capacity: Capacity::new(cfg.max_vms),
            cfg,
        })
    }

    /// `POST /api/auth/credentials/store` from a VM's agent: authenticated by the agent
    /// token only that VM was given; a VM stores for its own session only; sealed before it
    /// is written; the session moves to `completed`. Checks in this order: 401 (no or unknown
    /// token), 404 (unknown session), 403 (another session's token), 409 (state).
    pub async fn store_credentials(
        self: &Arc<Self>,
        agent_token: Option<&str>,
        session_id: &str,
        provider: &str,
        credentials: &serde_json::Value,
    ) -> Result<Stored, CredentialsError> {
        let token = agent_token.ok_or_else(|| {
            CredentialsError::Unauthorized("agent token required (Authorization: Bearer)".into())
        })?;
        let digest = vncgate_schema::record::token_digest(token.as_bytes());
        let owner = self
            .store
            .agent_token_session(&digest)
            .await?
            .ok_or_else(|| CredentialsError::Unauthorized("unknown agent token".into()))?;
        if vncgate_schema::check_session_id(session_id).is_err() {
            return Err(CredentialsError::NotFound("unknown session".into()));
        }
        let rec = self
            .store
            .get(session_id)
            .await?
            .ok_or_else(|| CredentialsError::NotFound("unknown session".into()))?;
        if owner != rec.id {
            tracing::warn!(session = %rec.id, token_of = %owner, "an agent tried to store credentials for another session");
            return Err(CredentialsError::Forbidden(
                "this agent's token belongs to another session".into(),
            ));
        }
        check_field("provider", provider).map_err(CredentialsError::from)?;
        let plaintext = serde_json::to_vec(credentials).expect("a JSON value serializes");
        match rec.state {
            SessionState::Ready => {}
            SessionState::Completed => {
                let same = match self.store.credentials(&rec.id).await? {
                    Some(sealed) => serde_json::from_str::<Sealed>(&sealed)
                        .ok()
                        .and_then(|s| self.keys.open(&rec.id, &s).ok())
                        .is_some_and(|p| p == plaintext),
                    None => false,
                };
                return if same {
                    Ok(Stored::Again)
                } else {
                    Err(CredentialsError::Conflict(
                        "other credentials are stored for this session".into(),
                    ))
                };
            }
            other => {
                return Err(CredentialsError::Conflict(format!(
                    "a {other} session does not accept credentials"
                )));
            }
        }
        let sealed = self.keys.seal(&rec.id, provider, &plaintext, unix_now_ms());
        let json = serde_json::to_string(&sealed).expect("a sealed record serializes");
        self.store.put_credentials(&rec, &json).await?;
        match self
            .transition(&rec.id, Event::CredentialsStored, None)
            .await
        {
            Ok(_) => {
                tracing::info!(session = %rec.id, provider, kid = %sealed.kid, "credentials stored; session completed");
                Ok(Stored::New)
            }
            Err(TransitionError::Refused(r)) => Err(CredentialsError::Conflict(r.to_string())),
            Err(TransitionError::Service(e)) => Err(e.into()),
        }
    }

    /// `GET /api/sessions/{id}/credentials` for the platform's backend, with the admin
    /// token; `delete` removes them once read.
    pub async fn read_credentials(
        &self,
        admin_token: Option<&str>,
        id: &str,
        delete: bool,
    ) -> Result<Opened, CredentialsError> {
        let Some(want) = self.admin_token_sha256 else {
            return Err(CredentialsError::Unauthorized(
                "reading credentials is off: the controller has no --admin-token-file".into(),
            ));
        };
        let token = admin_token.ok_or_else(|| {
            CredentialsError::Unauthorized("admin token required (Authorization: Bearer)".into())
        })?;
        let got = vncgate_schema::record::token_digest(token.as_bytes());
        if !bool::from(subtle::ConstantTimeEq::ct_eq(&got[..], &want[..])) {
            return Err(CredentialsError::Unauthorized("invalid admin token".into()));
        }
        let rec = self.get(id).await?;
        let sealed = self.store.credentials(&rec.id).await?.ok_or_else(|| {
            CredentialsError::NotFound("no credentials stored for this session".into())
        })?;
        let sealed: Sealed = serde_json::from_str(&sealed).map_err(|e| {
            CredentialsError::Unavailable(format!("unusable credentials record: {e}"))
        })?;
        let plain = self
            .keys
            .open(&rec.id, &sealed)
            .map_err(|e| CredentialsError::Unavailable(e.to_string()))?;
        let credentials = serde_json::from_slice(&plain)
            .map_err(|e| CredentialsError::Unavailable(format!("credentials are not JSON: {e}")))?;
        if delete {
            self.store.delete_credentials(&rec.id).await?;
            tracing::info!(session = %rec.id, "credentials read and deleted");
        }
        Ok(Opened {
            session_id: rec.id,
            provider: sealed.provider,
            credentials,
            stored_at: sealed.stored_at,
            kid: sealed.kid,
        })
    }

    pub fn store(&self) -> &Store {
        &self.store
    }

    /// A pending session's 1-based position in the line for a VM slot.
    pub fn queue_position(&self, id: &str) -> Option<usize> {
        self.capacity.position(id)
    }

    pub fn backend(&self) -> &B {
        &self.backend
    }

    fn vm(&self, id: &str) -> Option<Vm> {
        self.vms
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .get(id)
            .cloned()
    }

    fn set_vm(&self, id: &str, vm: Option<Vm>) {
        let mut m = self.vms.lock().unwrap_or_else(|p| p.into_inner());
        match vm {
            Some(vm) => m.insert(id.to_owned(), vm),
            None => m.remove(id),
        };
    }

    /// Creates a session (pending) and starts booting its VM in the background.
    pub async fn create(
        self: &Arc<Self>,
        req: CreateRequest,
        idempotency: Option<&str>,
    ) -> Result<CreatedSession, ServiceError> {
        check_field("user_id", &req.user_id)?;
        check_field("provider", &req.provider)?;
        if let Some(k) = idempotency {
            check_field("Idempotency-Key", k)?;
        }
        let ttl = req.ttl.unwrap_or(self.cfg.default_ttl);
        if ttl.is_zero() || ttl > self.cfg.max_ttl {
            return Err(ServiceError::BadRequest(format!(
                "ttl_secs must be 1..={}",
                self.cfg.max_ttl.as_secs()
            )));
        }
        let now = unix_now_ms();
        let token = random_hex(32);
        let agent_token = random_hex(32);
        let rec = SessionRecord {
            v: SCHEMA_VERSION,
            id: format!("s-{}", random_hex(12)),
            user_id: req.user_id,
            provider: req.provider,
            state: SessionState::Pending,
            reason: None,
            created_at: now,
            expires_at: now + ttl.as_millis() as u64,
            token_sha256: vncgate_schema::record::token_digest(token.as_bytes()),
            agent_token_sha256: vncgate_schema::record::token_digest(agent_token.as_bytes()),
            backend: self.backend.name().into(),
            // Sharing a Redis, the host that claims the placement request names itself.
            host: self.lease.is_none().then(|| self.cfg.host_id.clone()),
            lease: None,
            vm: None,
            history: vec![Transition {
                at: now,
                state: SessionState::Pending,
                reason: None,
            }],
            probes: None,
            rev: 0,
        };
        match self.store.create(&rec, idempotency).await? {
            Created::Existing(existing) => Ok(CreatedSession {
                record: *existing,
                token: None,
                replayed: true,
            }),
            Created::New => {
                tracing::info!(session = %rec.id, user = %rec.user_id, backend = self.backend.name(), "session created");
                metrics::counter!(m::SESSIONS_CREATED).increment(1);
                self.changed.notify_waiters();
                if self.lease.is_some() {
                    self.request_placement(&rec.id).await;
                } else {
                    let svc = self.clone();
                    let (id, provider) = (rec.id.clone(), rec.provider.clone());
                    tokio::spawn(async move { svc.boot(&id, provider, agent_token).await });
                }
                Ok(CreatedSession {
                    record: rec,
                    token: Some(token),
                    replayed: false,
                })
            }
        }
    }

    pub async fn get(&self, id: &str) -> Result<SessionRecord, ServiceError> {
        if vncgate_schema::check_session_id(id).is_err() {
            return Err(ServiceError::NotFound);
        }
        self.store.get(id).await?.ok_or(ServiceError::NotFound)
    }

    pub async fn list(
        &self,
        state: Option<SessionState>,
        user_id: Option<&str>,
    ) -> Result<Vec<SessionRecord>, ServiceError> {
        Ok(self
            .store
            .list()
            .await?
            .into_iter()
            .filter(|r| state.is_none_or(|s| r.state == s))
            .filter(|r| user_id.is_none_or(|u| r.user_id == u))
            .collect())
    }

    /// Waits until the session is in `state` or a terminal one, or `timeout` passes; returns
    /// the record as it is then.
    pub async fn wait(
        &self,
        id: &str,
        state: SessionState,
        timeout: Duration,
    ) -> Result<SessionRecord, ServiceError> {
        let deadline = Instant::now() + timeout;
        loop {
            // Registered before the read, so a write in between is not missed.
            let notified = self.changed.notified();
            let rec = self.get(id).await?;
            if rec.state == state || rec.state.is_terminal() {
                return Ok(rec);
            }
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return Ok(rec);
            }
            // Another controller may write the record (Redis): look again at least every
            // quarter second.
            let _ = tokio::time::timeout(left.min(Duration::from_millis(250)), notified).await;
        }
    }

    /// Moves `expires_at` to `ttl` from now (and the route's expiry with it).
    pub async fn keepalive(
        self: &Arc<Self>,
        id: &str,
        ttl: Option<Duration>,
    ) -> Result<SessionRecord, ServiceError> {
        let ttl = ttl.unwrap_or(self.cfg.default_ttl);
        if ttl.is_zero() || ttl > self.cfg.max_ttl {
            return Err(ServiceError::BadRequest(format!(
                "ttl_secs must be 1..={}",
                self.cfg.max_ttl.as_secs()
            )));
        }
        let written = self
            .modify(id, |rec| {
                if rec.state.is_terminal() {
                    return Err(ServiceError::Conflict(format!(
                        "a {} session cannot be kept alive",
                        rec.state
                    )));
                }
                rec.expires_at = unix_now_ms() + ttl.as_millis() as u64;
                Ok(())
            })
            .await?;
        if written.state == SessionState::Ready {
            if self.owns(&written) {
                self.publish_route(&written).await;
            } else if let Some(host) = &written.host {
                // The route's upstream is known to the VM's host: it rewrites the route.
                self.tell_host(host, "refresh", &written.id).await;
            }
        }
        Ok(written)
    }

    /// Reads the session, changes it with `f`, and writes it back by compare-and-set,
    /// reading and changing again when someone wrote in between. Not for state
    /// transitions, which go through [`Self::transition`].
    async fn modify(
        &self,
        id: &str,
        f: impl FnMut(&mut SessionRecord) -> Result<(), ServiceError>,
    ) -> Result<SessionRecord, ServiceError> {
        self.modify_as(id, false, f).await
    }

    /// [`Self::modify`]; `as_owner`: a write about this host's VM, fenced by its lease.
    async fn modify_as(
        &self,
        id: &str,
        as_owner: bool,
        mut f: impl FnMut(&mut SessionRecord) -> Result<(), ServiceError>,
    ) -> Result<SessionRecord, ServiceError> {
        if as_owner {
            self.check_own_lease(id)?;
        }
        loop {
            let mut rec = self.get(id).await?;
            f(&mut rec)?;
            let fence = self.fence_for(&rec, as_owner)?;
            match self.store.update_as(&rec, fence.as_ref()).await {
                Ok(written) => {
                    self.changed.notify_waiters();
                    return Ok(written);
                }
                Err(StoreError::Conflict) => continue,
                Err(StoreError::Fenced) => {
                    metrics::counter!(m::FENCED_WRITES, "write" => "record").increment(1);
                    tracing::error!(session = %id, host = %self.cfg.host_id, "write refused: the record no longer names this host's lease");
                    return Err(StoreError::Fenced.into());
                }
                Err(e) => return Err(e.into()),
            }
        }
    }

    /// Deletes a session: withdraws its route (viewers get 4006) and stops its VM.
    pub async fn delete(self: &Arc<Self>, id: &str) -> Result<SessionRecord, ServiceError> {
        self.get(id).await?;
        self.transition(id, Event::Deleted, None)
            .await
            .map_err(Into::into)
    }

    /// Applies `event` to the stored session (re-reading on a conflict), writes it, and
    /// carries out its effects. `probes` replaces the last probe results in the same write.
    async fn transition(
        self: &Arc<Self>,
        id: &str,
        event: Event,
        probes: Option<serde_json::Value>,
    ) -> Result<SessionRecord, TransitionError> {
        // What this host's VM did is the owner's to write; what the API or the clock
        // decides (delete, expiry, credentials) anyone may.
        let as_owner = matches!(
            event,
            Event::BootStarted | Event::Ready | Event::BootFailed(_) | Event::VmLost(_)
        );
        if as_owner {
            self.check_own_lease(id).map_err(TransitionError::Service)?;
        }
        loop {
            let rec = self.get(id).await.map_err(TransitionError::Service)?;
            let applied =
                lifecycle::apply(&rec, &event, unix_now_ms()).map_err(TransitionError::Refused)?;
            if applied.unchanged {
                return Ok(rec);
            }
            let mut next = applied.record;
            if probes.is_some() {
                next.probes = probes.clone();
            }
            let fence = self
                .fence_for(&rec, as_owner)
                .map_err(TransitionError::Service)?;
            // `ready` and its route in one write: nobody reads the session ready while the
            // gateways would still answer 404.
            let route = applied
                .effects
                .publish_route
                .then(|| self.route_for(&next))
                .flatten();
            let write = match &route {
                Some(r) => self.store.update_with_route(&next, fence.as_ref(), r).await,
                None => self.store.update_as(&next, fence.as_ref()).await,
            };
            let mut effects = applied.effects;
            if route.is_some() {
                effects.publish_route = false;
            }
            match write {
                Ok(written) => {
                    tracing::info!(session = %id, from = %rec.state, to = %written.state, reason = written.reason.as_deref().unwrap_or(""), "session transition");
                    if let Some(r) = &route {
                        tracing::info!(session = %id, upstream = %r.upstream, "route published");
                    }
                    self.effects(&written, effects).await;
                    self.changed.notify_waiters();
                    return Ok(written);
                }
                Err(StoreError::Conflict) => continue,
                Err(StoreError::Fenced) => {
                    metrics::counter!(m::FENCED_WRITES, "write" => "record").increment(1);
                    tracing::error!(session = %id, event = event.name(), host = %self.cfg.host_id, "transition refused: the record no longer names this host's lease");
                    return Err(TransitionError::Service(StoreError::Fenced.into()));
                }
                Err(e) => return Err(TransitionError::Service(e.into())),
            }
        }
    }

    /// Writes the probe results into the record (a write of its own: the record's story
    /// stays current while the session boots).
    async fn record_probes(&self, id: &str, probes: serde_json::Value) {
        let written = self
            .modify_as(id, true, |rec| {
                rec.probes = Some(probes.clone());
                Ok(())
            })
            .await;
        if let Err(e) = written {
            tracing::warn!(session = %id, error = %e, "cannot record probe results");
        }
    }

    async fn effects(self: &Arc<Self>, rec: &SessionRecord, fx: Effects) {
        if fx.stop_vm && !self.owns(rec) {
            // Another host runs the VM: the route goes from here, the VM there.
            self.withdraw(&rec.id, fx.withdraw_route).await;
            if let Some(host) = &rec.host {
                self.tell_host(host, "stop", &rec.id).await;
            }
            return;
        }
        if fx.stop_vm && fx.withdraw_route.is_some() {
            // Live viewers hear the withdrawal from their gateway (4006, 4005) before the
            // VM goes: stopping it at once would close them with 4003 "upstream closed".
            self.withdraw(&rec.id, fx.withdraw_route).await;
            let (svc, later) = (self.clone(), rec.clone());
            let grace = self.cfg.withdraw_grace;
            tokio::spawn(async move {
                tokio::time::sleep(grace).await;
                svc.stop_vm(&later).await;
            });
            return;
        }
        self.withdraw(&rec.id, fx.withdraw_route).await;
        self.publish_if(rec, fx).await;
        if fx.stop_vm {
            self.stop_vm(rec).await;
        }
    }

    async fn withdraw(&self, id: &str, reason: Option<vncgate_schema::RemovalReason>) {
        if let Some(reason) = reason
            && let Err(e) = self.store.delete_route(id, reason).await
        {
            tracing::error!(session = %id, error = %e, "cannot withdraw the route");
        }
    }

    async fn publish_if(&self, rec: &SessionRecord, fx: Effects) {
        if fx.publish_route {
            self.publish_route(rec).await;
        }
    }

    pub(crate) async fn stop_vm(&self, rec: &SessionRecord) {
        let vm = match self.vm(&rec.id) {
            Some(vm) => Some(vm),
            None => match &rec.vm {
                Some(h) if self.owns(rec) => self.backend.adopt(h).await,
                _ => None,
            },
        };
        if let Some(vm) = vm {
            if let Err(e) = self.backend.stop(&vm).await {
                tracing::warn!(session = %rec.id, error = %e, "cannot stop the VM");
            }
            tracing::info!(session = %rec.id, "vm stopped");
        }
        self.set_vm(&rec.id, None);
        self.capacity.release(&rec.id);
    }

    /// The route of a session whose VM runs here.
    fn route_for(&self, rec: &SessionRecord) -> Option<RouteRecord> {
        let vm = self.vm(&rec.id)?;
        Some(RouteRecord {
            upstream: vm.addrs.vnc,
            token_sha256: Some(rec.token_sha256),
            view_token_sha256: None,
            expires_at: Some(rec.expires_at.div_ceil(1000)),
            max_viewers: self.cfg.max_viewers,
            created_at: vncgate_schema::unix_now(),
            writer: Some("vncgate-controller".into()),
            record: false,
        })
    }

    pub(crate) async fn publish_route(&self, rec: &SessionRecord) {
        let Some(route) = self.route_for(rec) else {
            tracing::error!(session = %rec.id, "ready without a VM: no route written");
            return;
        };
        let fence = match self.fence_for(rec, true) {
            Ok(f) => f,
            Err(e) => {
                tracing::error!(session = %rec.id, error = %e, "route not published");
                return;
            }
        };
        match self
            .store
            .put_route_as(&rec.id, &route, fence.as_ref())
            .await
        {
            Ok(()) => {
                tracing::info!(session = %rec.id, upstream = %route.upstream, "route published")
            }
            Err(StoreError::Fenced) => {
                metrics::counter!(m::FENCED_WRITES, "write" => "route").increment(1);
                tracing::error!(session = %rec.id, host = %self.cfg.host_id, "route write refused: this host no longer owns the session");
            }
            Err(e) => tracing::error!(session = %rec.id, error = %e, "cannot publish the route"),
        }
    }

    /// Boots the session's VM and waits for readiness: `ready`, or `failed` naming the
    /// check that did not pass.
    async fn boot(self: Arc<Self>, id: &str, provider: String, agent_token: String) {
        match self.capacity.acquire(id, self.cfg.placement_timeout).await {
            Ok(true) => {}
            Ok(false) => return,
            Err(no) => {
                tracing::warn!(session = %id, reason = %no, "no VM slot");
                metrics::counter!(m::CAPACITY_FAILURES).increment(1);
                let _ = self
                    .transition(id, Event::BootFailed(no.to_string()), None)
                    .await;
                return;
            }
        }
        self.boot_vm(id, provider, agent_token).await;
    }

    /// Boots the VM of a session holding a slot here.
    pub(crate) async fn boot_vm(self: &Arc<Self>, id: &str, provider: String, agent_token: String) {
        if let Err(e) = self.transition(id, Event::BootStarted, None).await {
            tracing::warn!(session = %id, error = ?e, "boot not started");
            self.capacity.release(id);
            return;
        }
        let vm = match self.backend.start(id).await {
            Ok(vm) => vm,
            Err(e) => {
                self.capacity.release(id);
                let _ = self
                    .transition(
                        id,
                        Event::BootFailed(format!("vm did not start: {e}")),
                        None,
                    )
                    .await;
                return;
            }
        };
        self.set_vm(id, Some(vm.clone()));
        if let Err(e) = self.save_vm_handle(id, &vm).await {
            tracing::warn!(session = %id, error = %e, "cannot save the VM handle");
        }
        let data = VmData {
            session_id: id.to_owned(),
            provider,
            agent_token,
            controller_url: self.cfg.controller_url.clone(),
            issued_at_ms: unix_now_ms(),
            entropy: VmData::fresh_entropy(),
        };
        if let Err(e) = self.backend.push_data(&vm, &data).await {
            let _ = self
                .transition(
                    id,
                    Event::BootFailed(format!("per-VM data not delivered: {e}")),
                    None,
                )
                .await;
            return;
        }
        self.await_ready(id, &vm).await;
    }

    async fn save_vm_handle(&self, id: &str, vm: &Vm) -> Result<(), ServiceError> {
        self.modify_as(id, true, |rec| {
            rec.vm = Some(vm.handle.clone());
            Ok(())
        })
        .await
        .map(drop)
    }

    /// Probes with backoff (10 ms doubling to 1 s: a process VM is up in tens of ms, a real
    /// one in seconds) until ready or `--boot-timeout`.
    async fn await_ready(self: &Arc<Self>, id: &str, vm: &Vm) {
        let started = Instant::now();
        let mut backoff = Duration::from_millis(10);
        loop {
            let report = readiness::check(
                &self.http,
                vm,
                self.cfg.probe_timeout,
                self.backend.clones(),
            )
            .await;
            let probes = serde_json::to_value(&report).expect("a report serializes");
            if report.ready() {
                match self.transition(id, Event::Ready, Some(probes)).await {
                    Ok(rec) => {
                        let ms = started.elapsed().as_millis();
                        metrics::histogram!(m::CREATE_TO_READY_SECONDS)
                            .record(unix_now_ms().saturating_sub(rec.created_at) as f64 / 1000.0);
                        tracing::info!(session = %id, state = %rec.state, boot_ms = ms as u64, "ready: agent healthy and the VNC port is a desktop");
                    }
                    Err(e) => {
                        tracing::info!(session = %id, error = ?e, "became ready, but the session moved on")
                    }
                }
                return;
            }
            let waited = started.elapsed();
            if waited >= self.cfg.boot_timeout {
                let reason = format!("{} (for {} s)", report.describe(), waited.as_secs());
                tracing::warn!(session = %id, check = report.failed_check().unwrap_or(""), reason, "boot timed out");
                metrics::counter!(m::READINESS_FAILURES, "check" => report.failed_check().unwrap_or("vm"))
                    .increment(1);
                let _ = self
                    .transition(id, Event::BootFailed(reason), Some(probes))
                    .await;
                return;
            }
            self.record_probes(id, probes).await;
            // The session may have been deleted or expired meanwhile. A store that does
            // not answer is no answer: the boot goes on, and the timeout still applies.
            match self.get(id).await {
                Ok(r) if r.state == SessionState::Booting => {}
                Err(ServiceError::Unavailable(e)) => {
                    tracing::warn!(session = %id, error = %e, "cannot read the booting session; probing on");
                }
                _ => return,
            }
            tokio::time::sleep(backoff.min(self.cfg.boot_timeout.saturating_sub(waited))).await;
            backoff = (backoff * 2).min(Duration::from_secs(1));
        }
    }

    /// One pass of the reconciler: expire what is due, probe what is ready, mark what lost
    /// its VM.
    pub async fn reconcile_once(self: &Arc<Self>) -> Result<(), ServiceError> {
        let now = unix_now_ms();
        let all = self.store.list().await?;
        for st in SessionState::ALL {
            let n = all.iter().filter(|r| r.state == st).count();
            metrics::gauge!(m::SESSIONS, "state" => st.as_str()).set(n as f64);
        }
        metrics::gauge!(m::VM_SLOTS, "state" => "in_use").set(self.capacity.in_use() as f64);
        metrics::gauge!(m::VM_SLOTS, "state" => "waiting").set(self.capacity.waiting() as f64);
        if let Some(max) = self.capacity.max() {
            metrics::gauge!(m::VM_SLOTS, "state" => "max").set(max as f64);
        }
        for rec in all {
            if rec.state.is_terminal() {
                continue;
            }
            if rec.expires_at <= now {
                metrics::counter!(m::RECONCILER_ACTIONS, "kind" => "expired").increment(1);
                let _ = self.transition(&rec.id, Event::Expired, None).await;
                continue;
            }
            if rec.state != SessionState::Ready {
                continue;
            }
            let Some(vm) = self.vm(&rec.id) else {
                continue;
            };
            // The probes first: their failure names the part that went (the VNC server,
            // the agent, both), which "not running" would not.
            let report = readiness::check(
                &self.http,
                &vm,
                self.cfg.probe_timeout,
                self.backend.clones(),
            )
            .await;
            let lost = if !report.ready() {
                Some(report.describe())
            } else if !self.backend.alive(&vm).await {
                Some("the VM's processes are not all running".to_owned())
            } else {
                None
            };
            if let Some(reason) = lost {
                let probes = serde_json::to_value(&report).expect("a report serializes");
                tracing::warn!(session = %rec.id, check = report.failed_check().unwrap_or("vm"), reason, "ready session lost its desktop");
                metrics::counter!(m::RECONCILER_ACTIONS, "kind" => "vm_lost").increment(1);
                metrics::counter!(m::READINESS_FAILURES, "check" => report.failed_check().unwrap_or("vm"))
                    .increment(1);
                let _ = self
                    .transition(&rec.id, Event::VmLost(reason), Some(probes))
                    .await;
            }
        }
        Ok(())
    }

    /// After a restart: adopt the VMs of live sessions that still run; mark the others.
    pub async fn adopt_all(self: &Arc<Self>) -> Result<(), ServiceError> {
        let all: Vec<SessionRecord> = self
            .store
            .list()
            .await?
            .into_iter()
            .filter(|r| self.owns(r))
            .collect();
        // Orphans: VMs running on this host that no live session of this host names.
        let owned: Vec<&serde_json::Value> = all
            .iter()
            .filter(|r| !r.state.is_terminal() && r.backend == self.backend.name())
            .filter_map(|r| r.vm.as_ref())
            .collect();
        for vm in self.backend.running().await {
            if !owned.contains(&&vm.handle) {
                tracing::warn!(vnc = %vm.addrs.vnc, agent = %vm.addrs.agent, "an orphaned VM (no live session names it): stopping it");
                metrics::counter!(m::RECONCILER_ACTIONS, "kind" => "orphan_stopped").increment(1);
                if let Err(e) = self.backend.stop(&vm).await {
                    tracing::warn!(error = %e, "cannot stop the orphaned VM");
                }
            }
        }
        for rec in all {
            if rec.state.is_terminal() || rec.backend != self.backend.name() {
                continue;
            }
            let vm = match &rec.vm {
                Some(h) => self.backend.adopt(h).await,
                None => None,
            };
            match (rec.state, vm) {
                (SessionState::Ready, Some(vm)) => {
                    tracing::info!(session = %rec.id, "adopted a running VM");
                    metrics::counter!(m::RECONCILER_ACTIONS, "kind" => "adopted").increment(1);
                    self.capacity.hold(&rec.id);
                    self.set_vm(&rec.id, Some(vm));
                }
                (SessionState::Ready, None) => {
                    metrics::counter!(m::RECONCILER_ACTIONS, "kind" => "adoption_lost")
                        .increment(1);
                    let _ = self
                        .transition(
                            &rec.id,
                            Event::VmLost("the VM was gone when the controller restarted".into()),
                            None,
                        )
                        .await;
                }
                (_, Some(vm)) => {
                    // Booting when the controller died: go on waiting for readiness.
                    tracing::info!(session = %rec.id, "adopted a booting VM");
                    self.capacity.hold(&rec.id);
                    self.set_vm(&rec.id, Some(vm.clone()));
                    let svc = self.clone();
                    let id = rec.id.clone();
                    tokio::spawn(async move { svc.await_ready(&id, &vm).await });
                }
                (_, None) => {
                    let _ = self
                        .transition(
                            &rec.id,
                            Event::BootFailed(
                                "the controller restarted during the boot and the VM was gone"
                                    .into(),
                            ),
                            None,
                        )
                        .await;
                }
            }
        }
        Ok(())
    }

    /// Runs the reconciler until the process ends.
    pub async fn reconcile_forever(self: Arc<Self>) {
        loop {
            if let Err(e) = self.reconcile_once().await {
                tracing::warn!(error = %e, "reconciler pass failed");
            }
            tokio::time::sleep(self.cfg.reconcile_interval).await;
        }
    }
}

impl<B: Backend> Service<B> {
    /// Whether this host runs the session's VM (its record names this host, and, sharing a
    /// Redis, this host's current lease epoch).
    pub(crate) fn owns(&self, rec: &SessionRecord) -> bool {
        rec.host.as_deref() == Some(self.cfg.host_id.as_str())
            && self
                .lease
                .as_ref()
                .is_none_or(|l| rec.lease == Some(l.epoch()))
    }

    /// The fence of a write: `None` for a write anyone may make, or on the in-memory
    /// store; the lease's for a write as owner, refused here already when this host's
    /// lease may have lapsed.
    fn fence_for(
        &self,
        rec: &SessionRecord,
        as_owner: bool,
    ) -> Result<Option<vncgate_schema::store::Fence>, ServiceError> {
        let Some(lease) = &self.lease else {
            return Ok(None);
        };
        if !as_owner || rec.host.is_none() {
            // Anyone's write, or one about a session no host has placed yet (its request
            // failed, or nobody took it).
            return Ok(None);
        }
        if rec.host.as_deref() != Some(self.cfg.host_id.as_str()) {
            metrics::counter!(m::FENCED_WRITES, "write" => "record").increment(1);
            tracing::error!(session = %rec.id, owner = rec.host.as_deref().unwrap_or(""), "write refused: another host owns the session now");
            return Err(StoreError::Fenced.into());
        }
        lease
            .fence()
            .map(Some)
            .ok_or_else(|| self.lease_lapsed(&rec.id))
    }

    /// Before a write about this host's VM: refused at once, without asking Redis, when
    /// this host's lease may have lapsed (its sessions may be another's by now).
    fn check_own_lease(&self, id: &str) -> Result<(), ServiceError> {
        match &self.lease {
            Some(l) if l.fence().is_none() => Err(self.lease_lapsed(id)),
            _ => Ok(()),
        }
    }

    /// An owner write refused because this host's lease may have lapsed: counted, logged.
    fn lease_lapsed(&self, id: &str) -> ServiceError {
        metrics::counter!(m::FENCED_WRITES, "write" => "record").increment(1);
        tracing::error!(session = %id, host = %self.cfg.host_id, "write refused: this host's lease may have lapsed");
        StoreError::Fenced.into()
    }

    pub(crate) fn lease(&self) -> Option<&Arc<Lease>> {
        self.lease.as_ref()
    }

    pub(crate) fn config(&self) -> &Config {
        &self.cfg
    }

    pub(crate) fn capacity(&self) -> &Capacity {
        &self.capacity
    }

    pub(crate) fn notify_changed(&self) {
        self.changed.notify_waiters();
    }

    pub(crate) fn held_vms(&self) -> Vec<(String, Vm)> {
        self.vms
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .iter()
            .map(|(k, v)| (k.clone(), v.clone()))
            .collect()
    }

    pub(crate) fn forget_vm(&self, id: &str) {
        self.set_vm(id, None);
        self.capacity.release(id);
    }

    /// Applies `event` to `rec` as read (no re-read) and writes it by compare-and-set,
    /// with its effects. `Ok(false)`: someone wrote in between (read and decide again).
    pub(crate) async fn apply_as_taker(
        self: &Arc<Self>,
        rec: &SessionRecord,
        event: Event,
    ) -> Result<bool, ServiceError> {
        let applied = lifecycle::apply(rec, &event, unix_now_ms())
            .map_err(|r| ServiceError::Conflict(r.to_string()))?;
        if applied.unchanged {
            return Ok(true);
        }
        match self.store.update(&applied.record).await {
            Ok(written) => {
                tracing::info!(session = %rec.id, from = %rec.state, to = %written.state, reason = written.reason.as_deref().unwrap_or(""), "session transition");
                self.effects(&written, applied.effects).await;
                self.changed.notify_waiters();
                Ok(true)
            }
            Err(StoreError::Conflict) => Ok(false),
            Err(e) => Err(e.into()),
        }
    }

    pub(crate) async fn transition_pub(
        self: &Arc<Self>,
        id: &str,
        event: Event,
    ) -> Result<SessionRecord, ServiceError> {
        self.transition(id, event, None).await.map_err(Into::into)
    }
}

#[derive(Debug)]
enum TransitionError {
    Refused(lifecycle::Refused),
    Service(ServiceError),
}

impl From<TransitionError> for ServiceError {
    fn from(e: TransitionError) -> Self {
        match e {
            TransitionError::Refused(r) => ServiceError::Conflict(r.to_string()),
            TransitionError::Service(e) => e,
        }
    }
}
