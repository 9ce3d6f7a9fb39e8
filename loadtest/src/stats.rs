//! Latency percentiles for the swarm report.

use serde::Serialize;

/// Nearest-rank percentiles of a set of samples, in milliseconds.
#[derive(Debug, Clone, Copy, PartialEq, Serialize)]
pub struct Percentiles {
    pub p50: f64,
    pub p90: f64,
    pub p99: f64,
    pub max: f64,
    /// How many samples these come from.
    pub n: usize,
}

impl Percentiles {
    /// `None` for no samples (reported as JSON `null`, not as a fake zero).
    pub fn of(samples: &mut [f64]) -> Option<Percentiles> {
        if samples.is_empty() {
            return None;
        }
        samples.sort_by(f64::total_cmp);
        let n = samples.len();
        // Nearest rank: the smallest sample with at least p% of samples at or below it.
        let rank = |p: f64| samples[((p * n as f64).ceil() as usize).clamp(1, n) - 1];
        Some(Percentiles {
            p50: rank(0.50),
            p90: rank(0.90),
            p99: rank(0.99),
            max: samples[n - 1],
            n,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn nearest_rank() {
        assert_eq!(Percentiles::of(&mut []), None);
        let mut one = [7.0];
        let p = Percentiles::of(&mut one).unwrap();
        assert_eq!((p.p50, p.p90, p.p99, p.max, p.n), (7.0, 7.0, 7.0, 7.0, 1));
        let mut hundred: Vec<f64> = (1..=100).rev().map(f64::from).collect();
        let p = Percentiles::of(&mut hundred).unwrap();
        assert_eq!((p.p50, p.p90, p.p99, p.max), (50.0, 90.0, 99.0, 100.0));
    }
}
