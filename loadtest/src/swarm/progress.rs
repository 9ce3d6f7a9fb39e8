//! The swarm's live progress line and its per-failure lines, as text: what a terminal shows
//! while a run goes on. Pure (counts in, strings out) so the layout is tested without a
//! terminal; [`super`] decides when to draw (stderr is a terminal and no `--json`).

use std::collections::BTreeMap;
use std::time::Duration;

/// Failures of one kind printed one per line; further ones are only counted (the summary
/// and the progress line have them all), so a thousand refused sessions do not scroll the
/// terminal away.
pub const FAILURE_LINES_PER_KIND: u64 = 3;

/// What the progress line shows at one moment.
#[derive(Debug, Clone, Default)]
pub struct Snapshot {
    pub elapsed: Duration,
    pub duration: Duration,
    /// Sessions with an open WebSocket now.
    pub up: u64,
    /// Sessions the run starts in all.
    pub target: usize,
    /// Sessions that received their first framebuffer update.
    pub ok: u64,
    /// Sessions that failed, by close code or error kind.
    pub failures: BTreeMap<String, u64>,
    /// WebSocket payload received per second over the last redraw interval, 10^6 B/s.
    pub mb_s: f64,
}

/// One line, without the carriage return: `3.2/10 s  up 8/10  ok 8  failed 2 (4000×2)  1.23 MB/s`.
pub fn line(s: &Snapshot) -> String {
    let failed: u64 = s.failures.values().sum();
    let mut out = format!(
        "{:.1}/{} s  up {}/{}  ok {}  failed {failed}",
        s.elapsed.as_secs_f64().min(s.duration.as_secs_f64()),
        fmt_secs(s.duration),
        s.up,
        s.target,
        s.ok,
    );
    if failed > 0 {
        let by_kind: Vec<String> = s.failures.iter().map(|(k, n)| format!("{k}×{n}")).collect();
        out.push_str(&format!(" ({})", by_kind.join(" ")));
    }
    out.push_str(&format!("  {:.2} MB/s", s.mb_s));
    out
}

/// `10` for whole seconds, `2.5` otherwise.
fn fmt_secs(d: Duration) -> String {
    let s = d.as_secs_f64();
    if s.fract() == 0.0 {
        format!("{s:.0}")
    } else {
        format!("{s:.1}")
    }
}

/// The line printed for a failed session, or `None` once [`FAILURE_LINES_PER_KIND`] of its
/// kind were printed (`seen` is how many of that kind failed so far, this one included):
/// the session, when it ended, and the error's full text, which for a close from the server
/// is its code and reason (`closed by server: 4000 vm vnc port refused`). The first one
/// past the cap says that the rest are only counted.
pub fn failure_line(
    session: usize,
    after: Duration,
    kind: &str,
    detail: &str,
    seen: u64,
) -> Option<String> {
    match seen {
        0 => None,
        n if n <= FAILURE_LINES_PER_KIND => Some(format!(
            "session {session} failed after {:.2} s: {detail} [{kind}]",
            after.as_secs_f64()
        )),
        n if n == FAILURE_LINES_PER_KIND + 1 => Some(format!(
            "more sessions failed with {kind}: counted in the summary, not printed"
        )),
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn line_shows_sessions_up_failures_by_code_and_rate() {
        let mut s = Snapshot {
            elapsed: Duration::from_millis(3240),
            duration: Duration::from_secs(10),
            up: 7,
            target: 10,
            ok: 7,
            mb_s: 1.234,
            ..Default::default()
        };
        assert_eq!(line(&s), "3.2/10 s  up 7/10  ok 7  failed 0  1.23 MB/s");
        s.failures.insert("4000".into(), 3);
        s.failures.insert("connect_refused".into(), 1);
        assert_eq!(
            line(&s),
            "3.2/10 s  up 7/10  ok 7  failed 4 (4000×3 connect_refused×1)  1.23 MB/s"
        );
        // The clock stops at the run's end while the last sessions close.
        s.elapsed = Duration::from_secs(11);
        s.duration = Duration::from_millis(2500);
        assert!(line(&s).starts_with("2.5/2.5 s "), "{}", line(&s));
    }

    #[test]
    fn failure_lines_name_code_and_reason_and_stop_after_a_few() {
        let detail = "closed by server: 4000 vm vnc port refused";
        let first = failure_line(4, Duration::from_millis(20), "4000", detail, 1).unwrap();
        assert_eq!(
            first,
            "session 4 failed after 0.02 s: closed by server: 4000 vm vnc port refused [4000]"
        );
        assert!(failure_line(5, Duration::ZERO, "4000", detail, FAILURE_LINES_PER_KIND).is_some());
        let cap = failure_line(
            6,
            Duration::ZERO,
            "4000",
            detail,
            FAILURE_LINES_PER_KIND + 1,
        );
        assert!(cap.unwrap().contains("counted in the summary"));
        assert_eq!(
            failure_line(
                7,
                Duration::ZERO,
                "4000",
                detail,
                FAILURE_LINES_PER_KIND + 2
            ),
            None
        );
    }
}
