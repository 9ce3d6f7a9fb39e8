//! What a swarm run measured: per-session outcomes folded into one report, printed as a table
//! or as one JSON line.

use std::collections::BTreeMap;
use std::fmt;
use std::time::Duration;

use serde::Serialize;

use crate::stats::Percentiles;

/// How one simulated client's run went.
#[derive(Debug, Default, Clone)]
pub struct SessionOutcome {
    /// The session's number in the run (0-based).
    pub index: usize,
    /// From its start (after the ramp-up offset) to its end: success, or the failure.
    pub lasted: Duration,
    pub idle: bool,
    /// TCP connect + WebSocket upgrade.
    pub connect: Option<Duration>,
    /// WebSocket open to ServerInit received.
    pub handshake: Option<Duration>,
    pub updates: u64,
    /// WebSocket payload bytes received.
    pub bytes: u64,
    pub inputs_sent: u64,
    pub rtts: Vec<Duration>,
    pub probes_lost: u64,
    /// Why the session ended before the run did: a close code ("1006", "4001") or an error
    /// kind ("connect_refused", "http_404", "rfb_auth_failed").
    pub error: Option<String>,
    /// The error's full text, for the report's examples.
    pub error_detail: Option<String>,
}

/// The result of a swarm run. With `--json` this is the last line on stdout.
#[derive(Debug, Clone, Serialize)]
pub struct Report {
    /// Sessions started.
    pub sessions: usize,
    /// Sessions that completed the RFB handshake and received at least one update.
    pub sessions_ok: usize,
    /// Sessions that completed the RFB handshake.
    pub sessions_handshake_ok: usize,
    /// Sessions that parked after their first update.
    pub sessions_idle: usize,
    /// Length of the measurement window in seconds.
    pub duration_s: f64,
    pub connect_ms: Option<Percentiles>,
    pub handshake_ms: Option<Percentiles>,
    /// ClientCutText -> ServerCutText echo round trips.
    pub rtt_ms: Option<Percentiles>,
    pub updates: u64,
    pub updates_per_sec: f64,
    pub bytes: u64,
    pub bytes_per_sec: f64,
    pub inputs_sent: u64,
    pub rtt_probes_lost: u64,
    /// Close code or error kind -> sessions that ended that way before the run did.
    pub errors: BTreeMap<String, u64>,
    /// One full error message per kind in `errors`.
    pub error_examples: BTreeMap<String, String>,
}

fn ms(d: &Duration) -> f64 {
    d.as_secs_f64() * 1000.0
}

impl Report {
    /// Folds per-session outcomes over a window of `window`.
    pub fn from_outcomes(outcomes: &[SessionOutcome], window: Duration) -> Report {
        let secs = window.as_secs_f64().max(1e-9);
        let mut connect: Vec<f64> = outcomes
            .iter()
            .filter_map(|o| o.connect.as_ref())
            .map(ms)
            .collect();
        let mut handshake: Vec<f64> = outcomes
            .iter()
            .filter_map(|o| o.handshake.as_ref())
            .map(ms)
            .collect();
        let mut rtt: Vec<f64> = outcomes
            .iter()
            .flat_map(|o| o.rtts.iter())
            .map(ms)
            .collect();
        let mut errors = BTreeMap::new();
        let mut error_examples = BTreeMap::new();
        for o in outcomes {
            if let Some(e) = &o.error {
                *errors.entry(e.clone()).or_insert(0) += 1;
                if let Some(d) = &o.error_detail {
                    error_examples.entry(e.clone()).or_insert_with(|| d.clone());
                }
            }
        }
        let updates = outcomes.iter().map(|o| o.updates).sum();
        let bytes = outcomes.iter().map(|o| o.bytes).sum();
        Report {
            sessions: outcomes.len(),
            sessions_ok: outcomes
                .iter()
                .filter(|o| o.handshake.is_some() && o.updates > 0)
                .count(),
            sessions_handshake_ok: outcomes.iter().filter(|o| o.handshake.is_some()).count(),
            sessions_idle: outcomes.iter().filter(|o| o.idle).count(),
            duration_s: window.as_secs_f64(),
            connect_ms: Percentiles::of(&mut connect),
            handshake_ms: Percentiles::of(&mut handshake),
            rtt_ms: Percentiles::of(&mut rtt),
            updates,
            updates_per_sec: updates as f64 / secs,
            bytes,
            bytes_per_sec: bytes as f64 / secs,
            inputs_sent: outcomes.iter().map(|o| o.inputs_sent).sum(),
            rtt_probes_lost: outcomes.iter().map(|o| o.probes_lost).sum(),
            errors,
            error_examples,
        }
    }

    /// The report as one line of JSON.
    pub fn to_json_line(&self) -> String {
        serde_json::to_string(self).expect("report serializes")
    }
}

impl fmt::Display for Report {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        writeln!(
            f,
            "sessions      {} (ok {}, handshake ok {}, idle {}) over {:.1} s",
            self.sessions,
            self.sessions_ok,
            self.sessions_handshake_ok,
            self.sessions_idle,
            self.duration_s
        )?;
        writeln!(
            f,
            "{:<13} {:>9} {:>9} {:>9} {:>9} {:>8}",
            "latency ms", "p50", "p90", "p99", "max", "n"
        )?;
        for (name, p) in [
            ("connect", &self.connect_ms),
            ("rfb handshake", &self.handshake_ms),
            ("input rtt", &self.rtt_ms),
        ] {
            match p {
                Some(p) => writeln!(
                    f,
                    "{name:<13} {:>9.2} {:>9.2} {:>9.2} {:>9.2} {:>8}",
                    p.p50, p.p90, p.p99, p.max, p.n
                )?,
                None => writeln!(f, "{name:<13} {:>9}", "-")?,
            }
        }
        writeln!(
            f,
            "updates       {} ({:.1}/s)\nbytes         {} ({:.2} MiB/s)\ninputs sent   {} (rtt probes lost {})",
            self.updates,
            self.updates_per_sec,
            self.bytes,
            self.bytes_per_sec / (1024.0 * 1024.0),
            self.inputs_sent,
            self.rtt_probes_lost
        )?;
        if self.errors.is_empty() {
            write!(f, "errors        none")
        } else {
            write!(f, "errors")?;
            for (kind, n) in &self.errors {
                write!(f, "\n  {kind:<24} {n:>6}")?;
                if let Some(example) = self.error_examples.get(kind) {
                    write!(f, "  e.g. {example}")?;
                }
            }
            Ok(())
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn folds_outcomes() {
        let ok = SessionOutcome {
            connect: Some(Duration::from_millis(2)),
            handshake: Some(Duration::from_millis(1)),
            updates: 10,
            bytes: 1000,
            rtts: vec![Duration::from_millis(4)],
            ..Default::default()
        };
        let refused = SessionOutcome {
            error: Some("connect_refused".into()),
            error_detail: Some("Connection refused".into()),
            ..Default::default()
        };
        let idle_no_update = SessionOutcome {
            idle: true,
            connect: Some(Duration::from_millis(3)),
            handshake: Some(Duration::from_millis(1)),
            error: Some("4001".into()),
            ..Default::default()
        };
        let r = Report::from_outcomes(&[ok, refused, idle_no_update], Duration::from_secs(2));
        assert_eq!(r.sessions, 3);
        assert_eq!(r.sessions_ok, 1);
        assert_eq!(r.sessions_handshake_ok, 2);
        assert_eq!(r.sessions_idle, 1);
        assert_eq!(r.updates_per_sec, 5.0);
        assert_eq!(r.bytes_per_sec, 500.0);
        assert_eq!(r.connect_ms.unwrap().n, 2);
        assert_eq!(r.rtt_ms.unwrap().p50, 4.0);
        assert_eq!(r.errors.get("4001"), Some(&1));
        assert_eq!(r.errors.get("connect_refused"), Some(&1));

        let v: serde_json::Value = serde_json::from_str(&r.to_json_line()).unwrap();
        assert_eq!(v["sessions_ok"], 1);
        assert_eq!(v["errors"]["connect_refused"], 1);
        assert_eq!(v["connect_ms"]["p50"], 2.0);
        assert!(!r.to_json_line().contains('\n'));
        assert!(r.to_string().contains("connect_refused"));
    }
}
