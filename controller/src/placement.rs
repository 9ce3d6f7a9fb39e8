//! Many controllers on one Redis, with no scheduler: placement by pull, ownership by lease,
//! and the host that comes back (see `vncgate_schema::hosts` for the keys).
//!
//! - **Placement by pull.** `POST /api/sessions` on any controller writes the session
//!   (`pending`, no host) and adds a request to the placement stream. Every controller reads
//!   the stream through one consumer group, and only while it has a free VM slot
//!   (`--max-vms`): a full host simply stops reading. The reader claims the session by
//!   compare-and-set (host and lease epoch written into it, a fresh agent token issued),
//!   boots the VM and acknowledges the request once the boot ended either way.
//! - **Nobody claims it.** A session still unplaced after `--placement-timeout` fails with
//!   reason `capacity`, marked by whichever controller notices first.
//! - **A host dies** (its lease key expires) or comes back under a new epoch: any controller
//!   marks its sessions `vm_stopped` (ready) or `failed` (booting) with reason `host lost`,
//!   which withdraws their routes (viewers get 4006), and takes its unacknowledged requests:
//!   one not yet claimed goes back into the stream, one claimed is failed by name.
//! - **DELETE and keepalive** reach the owner through its command stream: `stop` stops the
//!   VM of a session that ended elsewhere, `refresh` rewrites a route after a keepalive.
//! - **The host itself**, when its lease is found gone, stops every VM it holds (others
//!   have taken, or will take, their sessions) and carries on under a new epoch. Restarted
//!   while its old lease still lives, it adopts its sessions under the new epoch.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use vncgate_schema::hosts::{self, Entry};
use vncgate_schema::session::{SessionState, unix_now_ms};
use vncgate_schema::store::Conn;

use crate::backend::Backend;
use crate::cluster::{Lease, Renewal};
use crate::lifecycle::Event;
use crate::metrics as m;
use crate::service::Service;
use crate::store::StoreError;

/// How often an idle host looks at the placement stream and at its commands.
const POLL: Duration = Duration::from_millis(100);

fn redis_of<B: Backend>(svc: &Service<B>) -> Option<Conn> {
    svc.store().redis_conn()
}

impl<B: Backend> Service<B> {
    /// Queues a new session for whichever host has room; a request that cannot be queued
    /// fails the session by name at once.
    pub(crate) async fn request_placement(self: &Arc<Self>, id: &str) {
        let Some(mut c) = redis_of(self) else { return };
        if let Err(e) = hosts::enqueue_placement(&mut c, id).await {
            tracing::error!(session = %id, error = %e, "cannot queue the placement request");
            let _ = self
                .transition_pub(
                    id,
                    Event::BootFailed(format!("placement request not queued: {e}")),
                )
                .await;
        }
    }

    /// Asks `host` (another controller) to do `op` for `id`.
    pub(crate) async fn tell_host(&self, host: &str, op: &str, id: &str) {
        let Some(mut c) = redis_of(self) else { return };
        if let Err(e) = hosts::send_host_command(&mut c, host, op, id).await {
            tracing::warn!(session = %id, host, op, error = %e, "cannot reach the owning host");
        }
    }

    /// Before adopting VMs after a restart: `previous` is the epoch this host held, if
    /// that lease was still live; its sessions move to the new epoch.
    pub async fn carry_over(self: &Arc<Self>, previous: Option<u64>) -> Result<(), String> {
        let lease = self.lease().cloned().ok_or("no lease")?;
        if let Some(old) = previous {
            self.adopt_epoch(old, lease.epoch()).await?;
        }
        Ok(())
    }

    /// Starts the loops of a controller sharing a Redis (after its VMs are adopted).
    pub async fn start_placement(self: &Arc<Self>) {
        let Some(lease) = self.lease().cloned() else {
            return;
        };
        self.requeue_own_leftovers(&lease).await;
        tokio::spawn(self.clone().keep_lease(lease.clone()));
        tokio::spawn(self.clone().place_forever(lease.clone()));
        tokio::spawn(self.clone().janitor_forever(lease.clone()));
        tokio::spawn(self.clone().commands_forever(lease));
    }

    /// After a quick restart: the sessions placed under the old epoch are still this
    /// host's; they move to the new one (each by compare-and-set) before anything else.
    async fn adopt_epoch(&self, old: u64, new: u64) -> Result<(), String> {
        let me = self.config().host_id.clone();
        let all = self.store().list().await.map_err(|e| e.to_string())?;
        let mut moved = 0;
        for rec in all {
            if rec.state.is_terminal()
                || rec.host.as_deref() != Some(me.as_str())
                || rec.lease != Some(old)
            {
                continue;
            }
            let mut next = rec.clone();
            next.lease = Some(new);
            match self.store().update(&next).await {
                Ok(_) => moved += 1,
                Err(e) => {
                    tracing::warn!(session = %rec.id, error = %e, "cannot carry the session over to the new lease epoch")
                }
            }
        }
        if moved > 0 {
            tracing::info!(
                old,
                new,
                sessions = moved,
                "sessions carried over to the new lease epoch"
            );
        }
        Ok(())
    }

    /// Requests this host read in a previous life and never acknowledged.
    async fn requeue_own_leftovers(&self, lease: &Lease) {
        let Some(mut c) = redis_of(self) else { return };
        let pending = match hosts::pending_placements(&mut c).await {
            Ok(p) => p,
            Err(e) => {
                tracing::warn!(error = %e, "cannot list unacknowledged placement requests");
                return;
            }
        };
        for (entry, consumer) in pending {
            if consumer == lease.host() {
                self.settle_orphan_request(&mut c, &entry).await;
            }
        }
    }

    /// A request whose reader is gone: an unclaimed session goes back into the stream, a
    /// claimed one is left to the host-lost marking; the old request is acknowledged.
    async fn settle_orphan_request(&self, c: &mut Conn, entry_id: &str) {
        let me = self.config().host_id.clone();
        let entry = match hosts::claim_placement(c, &me, entry_id).await {
            Ok(Some(e)) => e,
            Ok(None) => return,
            Err(e) => {
                tracing::warn!(error = %e, "cannot take over a placement request");
                return;
            }
        };
        if let Some(id) = entry.field("session")
            && let Ok(Some(rec)) = self.store().get(id).await
            && rec.state == SessionState::Pending
            && rec.host.is_none()
        {
            match hosts::enqueue_placement(c, id).await {
                Ok(_) => {
                    metrics::counter!(m::PLACEMENTS, "result" => "requeued").increment(1);
                    tracing::info!(session = %id, "placement request of a lost reader queued again");
                }
                Err(e) => {
                    tracing::warn!(session = %id, error = %e, "cannot queue the request again");
                    return;
                }
            }
        }
        let _ = hosts::ack_placement(c, entry_id).await;
    }

    /// Renews the lease; on its loss, stops every VM held here.
    async fn keep_lease(self: Arc<Self>, lease: Arc<Lease>) {
        loop {
            tokio::time::sleep(lease.interval()).await;
            if let Renewal::Lost { old, new } = lease.renew().await {
                let held = self.held_vms();
                tracing::error!(
                    host = lease.host(),
                    old,
                    new,
                    vms = held.len(),
                    "this host's lease was gone: its sessions belong to others now; stopping its VMs"
                );
                for (id, vm) in held {
                    if let Err(e) = self.backend().stop(&vm).await {
                        tracing::warn!(session = %id, error = %e, "cannot stop the VM");
                    }
                    self.forget_vm(&id);
                }
            }
        }
    }

    /// Reads placement requests while a slot is free.
    async fn place_forever(self: Arc<Self>, lease: Arc<Lease>) {
        let Some(mut c) = redis_of(&self) else { return };
        loop {
            if !self.capacity().has_free() {
                self.capacity().freed(Duration::from_secs(1)).await;
                continue;
            }
            if lease.fence().is_none() {
                tokio::time::sleep(POLL).await;
                continue;
            }
            match hosts::read_placements(&mut c, lease.host(), 1).await {
                Ok(entries) if entries.is_empty() => tokio::time::sleep(POLL).await,
                Ok(entries) => {
                    for e in entries {
                        self.take(&mut c, &lease, e).await;
                    }
                }
                Err(e) => {
                    tracing::warn!(error = %e, "cannot read placement requests");
                    if e.code() == Some("NOGROUP") {
                        // A Redis that lost its data (restarted without persistence): the
                        // stream and its group come back empty.
                        let _ = hosts::ensure_placement_group(&mut c).await;
                    }
                    tokio::time::sleep(Duration::from_millis(500)).await;
                }
            }
        }
    }

    /// Claims one request's session and boots it here.
    async fn take(self: &Arc<Self>, c: &mut Conn, lease: &Lease, e: Entry) {
        let Some(id) = e.field("session").map(str::to_owned) else {
            metrics::counter!(m::PLACEMENTS, "result" => "unreadable").increment(1);
            let _ = hosts::ack_placement(c, &e.id).await;
            return;
        };
        let agent_token = crate::service::random_token();
        let claimed = loop {
            let rec = match self.store().get(&id).await {
                Ok(Some(r)) => r,
                Ok(None) => break None,
                Err(err) => {
                    tracing::warn!(session = %id, error = %err, "cannot read the session to place");
                    // Left unacknowledged: a later pass (or another host) settles it.
                    return;
                }
            };
            if rec.state != SessionState::Pending || rec.host.is_some() {
                break None;
            }
            let Some(fence) = lease.fence() else { return };
            let mut next = rec.clone();
            next.host = Some(fence.host);
            next.lease = Some(fence.epoch);
            next.agent_token_sha256 = vncgate_schema::record::token_digest(agent_token.as_bytes());
            match self.store().update(&next).await {
                Ok(w) => break Some(w),
                Err(StoreError::Conflict) => continue,
                Err(err) => {
                    tracing::warn!(session = %id, error = %err, "cannot claim the session");
                    return;
                }
            }
        };
        let Some(rec) = claimed else {
            metrics::counter!(m::PLACEMENTS, "result" => "obsolete").increment(1);
            let _ = hosts::ack_placement(c, &e.id).await;
            return;
        };
        if let Err(err) = self.store().put_agent_token(&rec).await {
            tracing::warn!(session = %id, error = %err, "cannot index the agent token");
        }
        metrics::counter!(m::PLACEMENTS, "result" => "placed").increment(1);
        tracing::info!(session = %id, host = lease.host(), epoch = lease.epoch(), "placement request claimed");
        self.notify_changed();
        self.capacity().hold(&id);
        let (svc, mut c2, entry) = (self.clone(), c.clone(), e.id.clone());
        tokio::spawn(async move {
            svc.boot_vm(&id, rec.provider.clone(), agent_token).await;
            let _ = hosts::ack_placement(&mut c2, &entry).await;
        });
    }

    /// Marks the sessions of lost hosts, fails unplaced sessions past the placement
    /// timeout, and settles the requests of lost readers.
    async fn janitor_forever(self: Arc<Self>, lease: Arc<Lease>) {
        let every = (lease.ttl() / 2).max(Duration::from_millis(500));
        loop {
            tokio::time::sleep(every).await;
            if let Err(e) = self.janitor_once(&lease).await {
                tracing::warn!(error = %e, "janitor pass failed");
            }
        }
    }

    async fn janitor_once(self: &Arc<Self>, lease: &Lease) -> Result<(), String> {
        let Some(mut c) = redis_of(self) else {
            return Ok(());
        };
        let redis = |e: redis::RedisError| format!("redis: {e}");
        let all = self.store().list().await.map_err(|e| e.to_string())?;
        let mut leases: HashMap<String, Option<u64>> = HashMap::new();
        let now = unix_now_ms();
        let timeout = self.config().placement_timeout;
        for rec in all {
            if rec.state.is_terminal() {
                continue;
            }
            match &rec.host {
                Some(h) => {
                    let current = match leases.get(h) {
                        Some(l) => *l,
                        None => {
                            let l = hosts::lease_of(&mut c, h).await.map_err(redis)?;
                            leases.insert(h.clone(), l);
                            l
                        }
                    };
                    if current != rec.lease {
                        self.mark_host_lost(&mut c, &rec.id).await;
                    }
                }
                None if rec.state == SessionState::Pending
                    && now.saturating_sub(rec.created_at) >= timeout.as_millis() as u64 =>
                {
                    metrics::counter!(m::CAPACITY_FAILURES).increment(1);
                    let why = format!(
                        "capacity: no host had a free VM slot within {:.0} s (--placement-timeout)",
                        timeout.as_secs_f64()
                    );
                    tracing::warn!(session = %rec.id, reason = %why, "not placed");
                    let _ = self.transition_pub(&rec.id, Event::BootFailed(why)).await;
                }
                None => {}
            }
        }
        for (entry, consumer) in hosts::pending_placements(&mut c).await.map_err(redis)? {
            if consumer == lease.host() {
                continue;
            }
            let alive = match leases.get(&consumer) {
                Some(l) => l.is_some(),
                None => hosts::lease_of(&mut c, &consumer)
                    .await
                    .map_err(redis)?
                    .is_some(),
            };
            if !alive {
                self.settle_orphan_request(&mut c, &entry).await;
            }
        }
        Ok(())
    }

    /// The session's host lost the lease it was placed under: `vm_stopped` (ready) or
    /// `failed` (booting), reason `host lost`. Re-checked on every retry of the write, so a
    /// host that carried the session over to a new epoch in between keeps it.
    async fn mark_host_lost(self: &Arc<Self>, c: &mut Conn, id: &str) {
        for _ in 0..5 {
            let Ok(Some(rec)) = self.store().get(id).await else {
                return;
            };
            let Some(host) = rec.host.clone() else { return };
            if rec.state.is_terminal() {
                return;
            }
            match hosts::lease_of(c, &host).await {
                Ok(l) if l == rec.lease => return,
                Ok(_) => {}
                Err(_) => return,
            }
            let why = format!(
                "host lost: {host} no longer holds the lease (epoch {}) it placed the session under",
                rec.lease.unwrap_or(0)
            );
            let event = if rec.state == SessionState::Ready {
                Event::VmLost(why.clone())
            } else {
                Event::BootFailed(why.clone())
            };
            match self.apply_as_taker(&rec, event).await {
                Ok(true) => {
                    metrics::counter!(m::HOSTS_LOST_SESSIONS).increment(1);
                    tracing::warn!(session = %id, host = %host, reason = %why, "session of a lost host marked");
                    return;
                }
                Ok(false) => continue,
                Err(e) => {
                    tracing::warn!(session = %id, error = %e, "cannot mark the session of a lost host");
                    return;
                }
            }
        }
    }

    /// Reads the commands other controllers send this host.
    async fn commands_forever(self: Arc<Self>, lease: Arc<Lease>) {
        let Some(mut c) = redis_of(&self) else { return };
        let mut last = hosts::last_host_command(&mut c, lease.host())
            .await
            .unwrap_or_else(|_| "0-0".into());
        loop {
            tokio::time::sleep(POLL).await;
            let entries = match hosts::read_host_commands(&mut c, lease.host(), &last).await {
                Ok(e) => e,
                Err(e) => {
                    tracing::debug!(error = %e, "cannot read host commands");
                    continue;
                }
            };
            for e in entries {
                last = e.id.clone();
                let (Some(op), Some(id)) = (e.field("op"), e.field("session")) else {
                    continue;
                };
                let Ok(Some(rec)) = self.store().get(id).await else {
                    continue;
                };
                match op {
                    "stop" if rec.state.is_terminal() => {
                        tracing::info!(session = %id, "stopping the VM of a session ended elsewhere");
                        // Viewers hear the withdrawal first (see `Service::effects`).
                        tokio::time::sleep(self.config().withdraw_grace).await;
                        self.stop_vm(&rec).await;
                    }
                    "refresh" if rec.state == SessionState::Ready && self.owns(&rec) => {
                        self.publish_route(&rec).await;
                    }
                    _ => {}
                }
            }
        }
    }
}
