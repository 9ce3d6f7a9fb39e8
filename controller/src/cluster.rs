//! This host's lease, when controllers share one Redis (`--redis`): a key with a TTL
//! (`--lease-ttl`), renewed every third of it, whose value is the host's epoch. Sessions the
//! host places carry the epoch, and the host's writes as their owner are refused unless the
//! stored record still names it (see `vncgate_schema::store::Fence`): a host that lost its
//! lease, or whose sessions were taken over, cannot write their story or bring back their
//! routes.
//!
//! The host also fences itself: it treats its lease as valid only until the last renewal it
//! sent plus the TTL less a fifth (the Redis key lives at least TTL past the renewal's
//! arrival), so once the key may have expired this host has already stopped writing as an
//! owner. A renewal answered "not yours" means the lease is gone for good: the host stops
//! the VMs it held (others take their sessions over) and takes a new epoch.

use std::sync::Mutex;
use std::time::{Duration, Instant};

use vncgate_schema::hosts;
use vncgate_schema::store::{Conn, Fence};

use crate::metrics as m;

pub struct Lease {
    conn: Conn,
    host: String,
    ttl: Duration,
    state: Mutex<State>,
}

struct State {
    epoch: u64,
    /// Until when this host may write as the owner of its sessions.
    valid_until: Instant,
}

/// What a renewal found.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Renewal {
    Renewed,
    /// The lease expired or was replaced: the host lost every session of that epoch. The
    /// host has a new epoch now.
    Lost {
        old: u64,
        new: u64,
    },
    /// Redis did not answer: the lease holds until its local deadline.
    Failed,
}

impl Lease {
    /// Takes a new epoch for `host`. Returns the lease and the epoch the host held before
    /// when that lease is still live (a quick restart: its sessions are still this host's
    /// to adopt).
    pub async fn acquire(
        mut conn: Conn,
        host: &str,
        ttl: Duration,
    ) -> Result<(Lease, Option<u64>), String> {
        let redis = |e: redis::RedisError| format!("redis: {e}");
        let before = hosts::lease_of(&mut conn, host).await.map_err(redis)?;
        let sent = Instant::now();
        let epoch = hosts::acquire_lease(&mut conn, host, ttl.as_millis() as u64)
            .await
            .map_err(redis)?;
        hosts::ensure_placement_group(&mut conn)
            .await
            .map_err(redis)?;
        metrics::gauge!(m::LEASE_EPOCH).set(epoch as f64);
        tracing::info!(host, epoch, ttl_secs = ttl.as_secs_f64(), previous = ?before, "host lease taken");
        Ok((
            Lease {
                conn,
                host: host.to_owned(),
                ttl,
                state: Mutex::new(State {
                    epoch,
                    valid_until: sent + Self::margin(ttl),
                }),
            },
            before,
        ))
    }

    /// How long after sending a renewal the host still trusts its lease.
    fn margin(ttl: Duration) -> Duration {
        ttl - ttl / 5
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    pub fn host(&self) -> &str {
        &self.host
    }

    pub fn epoch(&self) -> u64 {
        self.lock().epoch
    }

    /// How often to renew.
    pub fn interval(&self) -> Duration {
        self.ttl / 3
    }

    pub fn ttl(&self) -> Duration {
        self.ttl
    }

    /// The fence for a write as owner, while the lease is valid here; `None` once it may
    /// have expired in Redis (no owner write goes out then).
    pub fn fence(&self) -> Option<Fence> {
        let s = self.lock();
        (Instant::now() < s.valid_until).then(|| Fence {
            host: self.host.clone(),
            epoch: s.epoch,
        })
    }

    /// One renewal.
    pub async fn renew(&self) -> Renewal {
        let epoch = self.epoch();
        let ttl_ms = self.ttl.as_millis() as u64;
        let sent = Instant::now();
        let mut c = self.conn.clone();
        match hosts::renew_lease(&mut c, &self.host, epoch, ttl_ms).await {
            Ok(true) => {
                self.lock().valid_until = sent + Self::margin(self.ttl);
                Renewal::Renewed
            }
            Ok(false) => {
                metrics::counter!(m::LEASE_LOST).increment(1);
                match hosts::acquire_lease(&mut c, &self.host, ttl_ms).await {
                    Ok(new) => {
                        let mut s = self.lock();
                        s.epoch = new;
                        s.valid_until = sent + Self::margin(self.ttl);
                        metrics::gauge!(m::LEASE_EPOCH).set(new as f64);
                        Renewal::Lost { old: epoch, new }
                    }
                    Err(e) => {
                        tracing::warn!(host = %self.host, error = %e, "lease lost, and a new one could not be taken yet");
                        // Nothing valid until a new epoch is taken.
                        self.lock().valid_until = sent;
                        Renewal::Lost {
                            old: epoch,
                            new: epoch,
                        }
                    }
                }
            }
            Err(e) => {
                metrics::counter!(m::LEASE_RENEWAL_FAILURES).increment(1);
                tracing::warn!(host = %self.host, error = %e, "lease renewal failed; the lease holds until its deadline");
                Renewal::Failed
            }
        }
    }
}
