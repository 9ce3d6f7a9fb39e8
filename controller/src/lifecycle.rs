//! A session's life as one state machine, pure: [`apply`] takes a record, an event and the
//! time, and returns the record with the transition made (and written into its history) plus
//! what must happen outside (publish or withdraw the route, stop the VM), or a named refusal.
//! The service persists the record as a whole and carries the effects out; nothing here does
//! I/O.
//!
//! ```text
//! pending -> booting -> ready -> completed
//!    \          \         \----> vm_stopped{reason}
//!     \----------\-------------> failed{reason}
//! any non-terminal state ------> expired | deleted
//! ```
//!
//! The route exists exactly while the session is `ready`: it is published on the way in and
//! withdrawn on every way out (with 4006 for a deletion or a lost VM, 4005 for an expiry).

use vncgate_schema::RemovalReason;
use vncgate_schema::session::{SessionRecord, SessionState, Transition};

/// Something that happened to a session.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Event {
    /// The backend started creating the VM.
    BootStarted,
    /// Both readiness checks passed: the agent is healthy and the VNC port is a desktop.
    Ready,
    /// The VM never became ready, or could not be created.
    BootFailed(String),
    /// A ready session's VM, agent or VNC server went away.
    VmLost(String),
    /// The agent stored the session's credentials.
    CredentialsStored,
    /// `expires_at` passed.
    Expired,
    /// Someone deleted the session.
    Deleted,
}

impl Event {
    pub fn name(&self) -> &'static str {
        match self {
            Event::BootStarted => "boot_started",
            Event::Ready => "ready",
            Event::BootFailed(_) => "boot_failed",
            Event::VmLost(_) => "vm_lost",
            Event::CredentialsStored => "credentials_stored",
            Event::Expired => "expired",
            Event::Deleted => "deleted",
        }
    }
}

/// What the caller must do after persisting the new record.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Effects {
    /// Write the session's route (it just became ready).
    pub publish_route: bool,
    /// Delete the route, telling live viewers this.
    pub withdraw_route: Option<RemovalReason>,
    /// Stop what is left of the VM.
    pub stop_vm: bool,
}

/// An event the session's state does not accept.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Refused {
    pub state: SessionState,
    pub event: &'static str,
}

impl std::fmt::Display for Refused {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "a {} session does not accept {}", self.state, self.event)
    }
}

impl std::error::Error for Refused {}

/// The outcome of an accepted event.
#[derive(Debug, Clone, PartialEq)]
pub struct Applied {
    pub record: SessionRecord,
    pub effects: Effects,
    /// The event changed nothing (a repeated store of credentials, a second delete): the
    /// caller need not write the record.
    pub unchanged: bool,
}

/// Applies `event` to `rec` at `now_ms`.
pub fn apply(rec: &SessionRecord, event: &Event, now_ms: u64) -> Result<Applied, Refused> {
    use SessionState::*;
    let from = rec.state;
    let refused = || Refused {
        state: from,
        event: event.name(),
    };
    let (to, reason) = match (from, event) {
        (Pending, Event::BootStarted) => (Booting, None),
        (Booting, Event::Ready) => (Ready, None),
        (Pending | Booting, Event::BootFailed(why)) => (Failed, Some(why.clone())),
        (Ready, Event::VmLost(why)) => (VmStopped, Some(why.clone())),
        (Ready, Event::CredentialsStored) => (Completed, None),
        // Storing the same credentials again is not an error.
        (Completed, Event::CredentialsStored) | (Deleted, Event::Deleted) => {
            return Ok(Applied {
                record: rec.clone(),
                effects: Effects::default(),
                unchanged: true,
            });
        }
        (Pending | Booting | Ready, Event::Expired) => (Expired, None),
        // A finished session can still be deleted: its VM is stopped again (idempotent in
        // the backend), and it leaves the listing of live ones.
        (_, Event::Deleted) => (Deleted, None),
        _ => return Err(refused()),
    };
    let mut record = rec.clone();
    record.state = to;
    record.reason = reason.clone();
    record.history.push(Transition {
        at: now_ms,
        state: to,
        reason,
    });
    let leaving_ready = from == Ready && to != Ready;
    let effects = Effects {
        publish_route: to == Ready,
        withdraw_route: leaving_ready.then_some(if to == Expired {
            RemovalReason::Expired
        } else {
            RemovalReason::Revoked
        }),
        // Every terminal state stops the VM; `failed` included (a VM that booted without a
        // desktop is still running).
        stop_vm: to.is_terminal() && !from.is_terminal(),
    };
    Ok(Applied {
        record,
        effects,
        unchanged: false,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use SessionState::*;

    fn rec(state: SessionState) -> SessionRecord {
        SessionRecord {
            v: 1,
            id: "s".into(),
            user_id: "u".into(),
            provider: "p".into(),
            state,
            reason: None,
            created_at: 0,
            expires_at: 60_000,
            token_sha256: [0; 32],
            agent_token_sha256: [0; 32],
            backend: "process".into(),
            host: None,
            lease: None,
            vm: None,
            history: Vec::new(),
            probes: None,
            rev: 0,
        }
    }

    fn go(from: SessionState, e: Event) -> Result<Applied, Refused> {
        apply(&rec(from), &e, 5)
    }

    #[test]
    fn the_happy_path_publishes_once_and_withdraws_on_completion() {
        let a = go(Pending, Event::BootStarted).unwrap();
        assert_eq!((a.record.state, a.effects), (Booting, Effects::default()));
        let a = apply(&a.record, &Event::Ready, 6).unwrap();
        assert_eq!(a.record.state, Ready);
        assert!(a.effects.publish_route && !a.effects.stop_vm);
        let a = apply(&a.record, &Event::CredentialsStored, 7).unwrap();
        assert_eq!(a.record.state, Completed);
        assert_eq!(a.effects.withdraw_route, Some(RemovalReason::Revoked));
        assert!(a.effects.stop_vm);
        let states: Vec<_> = a.record.history.iter().map(|t| (t.at, t.state)).collect();
        assert_eq!(states, [(5, Booting), (6, Ready), (7, Completed)]);
        // Storing again: accepted, nothing to do.
        let again = apply(&a.record, &Event::CredentialsStored, 8).unwrap();
        assert!(again.unchanged && again.effects == Effects::default());
        assert_eq!(again.record, a.record);
    }

    #[test]
    fn failures_carry_their_reason_and_stop_the_vm() {
        let a = go(
            Booting,
            Event::BootFailed("vnc port refused for 60 s".into()),
        )
        .unwrap();
        assert_eq!(a.record.state, Failed);
        assert_eq!(
            a.record.reason.as_deref(),
            Some("vnc port refused for 60 s")
        );
        assert_eq!(a.record.history[0].reason, a.record.reason);
        assert!(a.effects.stop_vm && a.effects.withdraw_route.is_none());
        let a = go(
            Ready,
            Event::VmLost("vnc port 127.0.0.1:5900 refused".into()),
        )
        .unwrap();
        assert_eq!(a.record.state, VmStopped);
        assert_eq!(a.effects.withdraw_route, Some(RemovalReason::Revoked));
        assert!(a.effects.stop_vm);
    }

    #[test]
    fn expiry_and_deletion_from_anywhere_live() {
        let a = go(Ready, Event::Expired).unwrap();
        assert_eq!(a.effects.withdraw_route, Some(RemovalReason::Expired));
        let a = go(Booting, Event::Expired).unwrap();
        assert!(a.effects.withdraw_route.is_none() && a.effects.stop_vm);
        let a = go(Ready, Event::Deleted).unwrap();
        assert_eq!(a.effects.withdraw_route, Some(RemovalReason::Revoked));
        // A failed session can be deleted; its VM is already stopped.
        let a = go(Failed, Event::Deleted).unwrap();
        assert_eq!(a.record.state, Deleted);
        assert!(!a.effects.stop_vm);
        assert!(go(Deleted, Event::Deleted).unwrap().unchanged);
    }

    #[test]
    fn everything_else_is_refused_by_name() {
        let refused = [
            (Pending, Event::Ready),
            (Ready, Event::BootStarted),
            (Booting, Event::CredentialsStored),
            (Pending, Event::VmLost("x".into())),
            (Completed, Event::Expired),
            (Failed, Event::Ready),
            (Expired, Event::CredentialsStored),
        ];
        for (from, e) in refused {
            let r = go(from, e.clone()).unwrap_err();
            assert_eq!(r.state, from);
            assert!(r.to_string().contains(e.name()), "{r}");
        }
    }

    #[test]
    fn the_route_exists_exactly_while_ready() {
        // Over every accepted transition: published on the way into ready, withdrawn on
        // every way out, never otherwise.
        let events = [
            Event::BootStarted,
            Event::Ready,
            Event::BootFailed("x".into()),
            Event::VmLost("x".into()),
            Event::CredentialsStored,
            Event::Expired,
            Event::Deleted,
        ];
        for from in SessionState::ALL {
            for e in &events {
                let Ok(a) = go(from, e.clone()) else { continue };
                let to = a.record.state;
                assert_eq!(
                    a.effects.publish_route,
                    to == Ready && from != Ready,
                    "{from} {e:?}"
                );
                assert_eq!(
                    a.effects.withdraw_route.is_some(),
                    from == Ready && to != Ready,
                    "{from} {e:?}"
                );
                assert_eq!(a.effects.stop_vm, to.is_terminal() && !from.is_terminal());
            }
        }
    }
}
