//! Test-only fault injection: `VNCGATE_TEST_PANIC=<task>[:<after-ms>]` makes one
//! long-running task panic `after-ms` after the gateway has started (every worker accepts:
//! the "gateway started" line), so that tests can check that the gateway notices a dead
//! task and exits rather than going on half-working (see [`crate::routing`] and
//! [`crate::server`] for the supervision itself).
//!
//! The variable is read once, at startup, and a gateway that has it set says so loudly in
//! its log. Never set it outside tests: the named task dies on purpose.
//!
//! Tasks that can be named: the Redis control thread's [`CONTROL_TASKS`], and `worker<N>`
//! (a task on worker `N`'s runtime).

use std::sync::OnceLock;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

pub const VAR: &str = "VNCGATE_TEST_PANIC";

/// The long-running tasks of the Redis control thread, by the names its log lines use.
pub const CONTROL_TASKS: [&str; 4] = [
    "keep_connected",
    "follow_events",
    "recheck_live_sessions",
    "serve_lookups",
];

#[derive(Debug, Clone, PartialEq, Eq)]
struct Armed {
    task: String,
    after: Duration,
}

static ARMED: OnceLock<Option<Armed>> = OnceLock::new();
static STARTED: AtomicBool = AtomicBool::new(false);

/// Reads [`VAR`] once; an unknown task name or a bad delay is an error (a test that
/// misspells a task must not pass because nothing panicked).
pub fn arm_from_env() -> Result<(), String> {
    let armed = match std::env::var(VAR) {
        Ok(v) => Some(parse(&v)?),
        Err(std::env::VarError::NotPresent) => None,
        Err(e) => return Err(format!("{VAR}: {e}")),
    };
    if let Some(a) = &armed {
        tracing::warn!(
            task = %a.task,
            after_ms = a.after.as_millis() as u64,
            "{VAR} is set: TEST-ONLY fault injection, this task will panic on purpose"
        );
    }
    // A second call (tests of the library) keeps the first reading.
    let _ = ARMED.set(armed);
    Ok(())
}

fn parse(v: &str) -> Result<Armed, String> {
    let (task, after) = match v.split_once(':') {
        Some((t, ms)) => {
            let ms: u64 = ms
                .parse()
                .map_err(|_| format!("{VAR}={v}: the delay must be milliseconds"))?;
            (t, Duration::from_millis(ms))
        }
        None => (v, Duration::ZERO),
    };
    let worker = task
        .strip_prefix("worker")
        .is_some_and(|n| !n.is_empty() && n.bytes().all(|b| b.is_ascii_digit()));
    if !worker && !CONTROL_TASKS.contains(&task) {
        return Err(format!(
            "{VAR}={v}: unknown task (one of {}, or worker<N>)",
            CONTROL_TASKS.join(", ")
        ));
    }
    Ok(Armed {
        task: task.to_owned(),
        after,
    })
}

/// Marks the gateway started: armed delays count from here.
pub fn gateway_started() {
    STARTED.store(true, Ordering::Release);
}

/// Whether [`gateway_started`] was called; an armed task polls it (tests only).
pub fn has_started() -> bool {
    STARTED.load(Ordering::Acquire)
}

/// How often an armed task looks whether the gateway has started.
pub const START_POLL: Duration = Duration::from_millis(10);

/// How long after the gateway's start `task` must panic: `None` unless the test hook
/// names it.
pub fn panic_after(task: &str) -> Option<Duration> {
    ARMED
        .get()?
        .as_ref()
        .filter(|a| a.task == task)
        .map(|a| a.after)
}

/// The message of an injected panic, which the supervisor's log line repeats.
pub fn message(task: &str) -> String {
    format!("{VAR}: injected panic in {task}")
}

/// A panic's message from its payload (`panic!` with a literal or with a format).
pub fn panic_message(payload: &(dyn std::any::Any + Send)) -> &str {
    payload
        .downcast_ref::<&str>()
        .copied()
        .or_else(|| payload.downcast_ref::<String>().map(String::as_str))
        .unwrap_or("(a panic without a message)")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_task_names_and_delays() {
        assert_eq!(
            parse("follow_events:250"),
            Ok(Armed {
                task: "follow_events".into(),
                after: Duration::from_millis(250)
            })
        );
        assert_eq!(parse("worker3").unwrap().after, Duration::ZERO);
        assert!(parse("worker").is_err());
        assert!(parse("workerx").is_err());
        assert!(parse("follow_event").is_err());
        assert!(parse("serve_lookups:soon").is_err());
    }

    #[test]
    fn panic_messages_come_out_of_both_payload_kinds() {
        let literal = std::panic::catch_unwind(|| panic!("plain")).unwrap_err();
        assert_eq!(panic_message(&*literal), "plain");
        let formatted = std::panic::catch_unwind(|| panic!("{}", message("x"))).unwrap_err();
        assert_eq!(
            panic_message(&*formatted),
            "VNCGATE_TEST_PANIC: injected panic in x"
        );
    }
}
