//! The controller's metrics: names, help texts, and the Prometheus recorder. Every counter
//! is registered at zero for each of its known labels when the recorder is installed, so a
//! fresh controller exposes the whole set (`rate()` and `absent()` alerts see them at once).

use metrics_exporter_prometheus::{Matcher, PrometheusBuilder, PrometheusHandle};
use vncgate_schema::session::SessionState;

/// Sessions by `state`, as of the reconciler's last pass.
pub const SESSIONS: &str = "vncgate_controller_sessions";
/// Seconds from create to `ready`.
pub const CREATE_TO_READY_SECONDS: &str = "vncgate_controller_create_to_ready_seconds";
/// Readiness failures by `check` (`agent`, `vnc_refused`, `vnc_timeout`, `vnc_no_banner`,
/// `vnc_handshake`, `vnc_error`, `vm`): at a boot timeout, or a ready session lost.
pub const READINESS_FAILURES: &str = "vncgate_controller_readiness_failures_total";
/// What the reconciler did, by `kind`.
pub const RECONCILER_ACTIONS: &str = "vncgate_controller_reconciler_actions_total";
/// Credentials posts by `outcome` (`stored`, `repeated`, or the refusal's status).
pub const CREDENTIALS: &str = "vncgate_controller_credentials_total";
/// Sessions created, and failed to boot (`failed`), by outcome.
pub const SESSIONS_CREATED: &str = "vncgate_controller_sessions_created_total";

/// VM slots on this host by `state`: `in_use` (booting, ready, adopted), `waiting` (pending
/// sessions in line), `max` (`--max-vms`, absent without one).
pub const VM_SLOTS: &str = "vncgate_controller_vm_slots";
/// Sessions that failed with reason `capacity`: no slot within the placement timeout.
pub const CAPACITY_FAILURES: &str = "vncgate_controller_capacity_failures_total";

/// This host's lease epoch (controllers sharing a Redis).
pub const LEASE_EPOCH: &str = "vncgate_controller_lease_epoch";
/// Times this host found its lease gone (expired, or replaced) and took a new epoch.
pub const LEASE_LOST: &str = "vncgate_controller_lease_lost_total";
/// Lease renewals Redis did not answer.
pub const LEASE_RENEWAL_FAILURES: &str = "vncgate_controller_lease_renewal_failures_total";
/// Writes as a session's owner refused because this host no longer holds its lease, by
/// `write` (`record`, `route`).
pub const FENCED_WRITES: &str = "vncgate_controller_fenced_writes_total";
/// Sessions of another host whose lease was gone, marked `host lost` by this controller.
pub const HOSTS_LOST_SESSIONS: &str = "vncgate_controller_host_lost_sessions_total";
/// Placement requests this host read from the stream, by `result`: `placed` (claimed, VM
/// booting here), `obsolete` (the session was deleted, failed or placed meanwhile),
/// `requeued` (a dead host's unclaimed request, put back), `unreadable`.
pub const PLACEMENTS: &str = "vncgate_controller_placements_total";
pub const PLACEMENT_RESULTS: [&str; 4] = ["placed", "obsolete", "requeued", "unreadable"];
pub const FENCED_KINDS: [&str; 2] = ["record", "route"];

pub const CHECKS: [&str; 7] = [
    "agent",
    "vnc_refused",
    "vnc_timeout",
    "vnc_no_banner",
    "vnc_handshake",
    "vnc_error",
    "vm",
];
pub const RECONCILER_KINDS: [&str; 5] = [
    "expired",
    "vm_lost",
    "adopted",
    "adoption_lost",
    "orphan_stopped",
];
pub const CREDENTIALS_OUTCOMES: [&str; 9] = [
    "stored", "repeated", "400", "401", "403", "404", "409", "413", "415",
];

/// Installs the recorder, with help texts and every known series at zero.
pub fn install() -> Result<PrometheusHandle, String> {
    let handle = PrometheusBuilder::new()
        .set_buckets_for_metric(
            Matcher::Full(CREATE_TO_READY_SECONDS.into()),
            &[0.05, 0.1, 0.25, 0.5, 1.0, 2.0, 5.0, 10.0, 30.0, 60.0, 120.0],
        )
        .map_err(|e| e.to_string())?
        .install_recorder()
        .map_err(|e| format!("cannot install the metrics recorder: {e}"))?;
    metrics::describe_gauge!(
        SESSIONS,
        "Sessions by state, as of the reconciler's last pass."
    );
    metrics::describe_histogram!(
        CREATE_TO_READY_SECONDS,
        metrics::Unit::Seconds,
        "Seconds from create to ready (agent healthy and the VNC port a desktop)."
    );
    metrics::describe_counter!(
        READINESS_FAILURES,
        "Readiness failures by the check that failed, at a boot timeout or when a ready session lost its desktop."
    );
    metrics::describe_counter!(RECONCILER_ACTIONS, "What the reconciler did, by kind.");
    metrics::describe_counter!(
        CREDENTIALS,
        "Credentials posts by outcome: stored, repeated, or the refusal's HTTP status."
    );
    metrics::describe_counter!(
        SESSIONS_CREATED,
        "Sessions created through the API (replays of an Idempotency-Key not counted)."
    );
    for st in SessionState::ALL {
        metrics::gauge!(SESSIONS, "state" => st.as_str()).set(0.0);
    }
    for c in CHECKS {
        metrics::counter!(READINESS_FAILURES, "check" => c).absolute(0);
    }
    for k in RECONCILER_KINDS {
        metrics::counter!(RECONCILER_ACTIONS, "kind" => k).absolute(0);
    }
    for o in CREDENTIALS_OUTCOMES {
        metrics::counter!(CREDENTIALS, "outcome" => o).absolute(0);
    }
    metrics::counter!(SESSIONS_CREATED).absolute(0);
    metrics::describe_gauge!(
        VM_SLOTS,
        "VM slots on this host: in_use (booting, ready, adopted), waiting (pending sessions in line), max (--max-vms)."
    );
    metrics::describe_counter!(
        CAPACITY_FAILURES,
        "Sessions failed with reason capacity: no VM slot within the placement timeout."
    );
    for st in ["in_use", "waiting"] {
        metrics::gauge!(VM_SLOTS, "state" => st).set(0.0);
    }
    metrics::counter!(CAPACITY_FAILURES).absolute(0);
    metrics::describe_gauge!(
        LEASE_EPOCH,
        "This host's lease epoch, when controllers share a Redis."
    );
    metrics::describe_counter!(
        LEASE_LOST,
        "Times this host found its lease gone and took a new epoch (its sessions of the old epoch are lost)."
    );
    metrics::describe_counter!(
        LEASE_RENEWAL_FAILURES,
        "Lease renewals Redis did not answer."
    );
    metrics::describe_counter!(
        FENCED_WRITES,
        "Writes as a session's owner refused because this host no longer holds the session's lease, by write."
    );
    metrics::describe_counter!(
        HOSTS_LOST_SESSIONS,
        "Sessions of hosts whose lease was gone, marked host lost by this controller."
    );
    metrics::describe_counter!(
        PLACEMENTS,
        "Placement requests this host read from the stream, by result."
    );
    metrics::counter!(LEASE_LOST).absolute(0);
    metrics::counter!(LEASE_RENEWAL_FAILURES).absolute(0);
    metrics::counter!(HOSTS_LOST_SESSIONS).absolute(0);
    for w in FENCED_KINDS {
        metrics::counter!(FENCED_WRITES, "write" => w).absolute(0);
    }
    for r in PLACEMENT_RESULTS {
        metrics::counter!(PLACEMENTS, "result" => r).absolute(0);
    }
    let upkeep = handle.clone();
    tokio::spawn(async move {
        loop {
            tokio::time::sleep(std::time::Duration::from_secs(5)).await;
            upkeep.run_upkeep();
        }
    });
    Ok(handle)
}
