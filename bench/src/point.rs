//! The measurement points a run takes (`--points`), so that a sweep that only needs some
//! figures (e.g. `scaling.sh`: throughput and upgrades per worker count) does not pay for
//! the others. Each table row belongs to exactly one point.

/// One group of measurements taken against each proxy, in the order the runner takes them.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Point {
    /// RSS / PSS per idle session (`--idle` sessions held on a fresh process).
    Idle,
    /// Throughput with 1 and `--conns` connections, the Jain index of the latter, and the
    /// proxy's CPU-seconds per GB over both.
    Tput,
    /// 16 B round trips with 1 and `--conns` connections: rate and latency percentiles.
    Rt,
    /// Upgrades per second, and upgrade + one echo per second.
    Upgrades,
    /// [`UPGRADES50_CONNECTORS`] connectors in a loop: connect, upgrade, first byte from the
    /// VM (its RFB banner), close handshake; rate, and p50/p99 of connect to 101 and of
    /// connect to the first VM byte. First in a closed loop, then paced at `--paced-rate`
    /// (the same figures at an offered rate equal for every proxy).
    Upgrades50,
}

/// Concurrent connectors of the `upgrades50` point: many browsers opening at once (a class
/// starting, a dashboard of thumbnails), where the 4-connector `upgrades` point measures the
/// rate a few can drive.
pub const UPGRADES50_CONNECTORS: usize = 50;

impl Point {
    pub const ALL: [Point; 5] = [
        Point::Idle,
        Point::Tput,
        Point::Rt,
        Point::Upgrades,
        Point::Upgrades50,
    ];

    pub fn name(self) -> &'static str {
        match self {
            Point::Idle => "idle",
            Point::Tput => "tput",
            Point::Rt => "rt",
            Point::Upgrades => "upgrades",
            Point::Upgrades50 => "upgrades50",
        }
    }

    pub fn parse(s: &str) -> Option<Point> {
        Point::ALL.into_iter().find(|p| p.name() == s)
    }

    /// Parses the items of `--points` (already split at commas): point names, or `all`.
    /// The result is in the runner's order without duplicates, whatever the order given;
    /// an unknown name or an empty selection is an error that names the valid ones.
    pub fn parse_list<S: AsRef<str>>(items: &[S]) -> Result<Vec<Point>, String> {
        let mut chosen = [false; Point::ALL.len()];
        for item in items {
            let item = item.as_ref().trim();
            if item.is_empty() {
                continue;
            }
            if item == "all" {
                chosen = [true; Point::ALL.len()];
                continue;
            }
            match Point::ALL.iter().position(|p| p.name() == item) {
                Some(i) => chosen[i] = true,
                None => {
                    return Err(format!(
                        "unknown point {item:?} (all, {})",
                        Point::names().join(", ")
                    ));
                }
            }
        }
        let points: Vec<Point> = Point::ALL
            .into_iter()
            .zip(chosen)
            .filter_map(|(p, c)| c.then_some(p))
            .collect();
        if points.is_empty() {
            return Err(format!(
                "no point selected (all, {})",
                Point::names().join(", ")
            ));
        }
        Ok(points)
    }

    fn names() -> Vec<&'static str> {
        Point::ALL.iter().map(|p| p.name()).collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_round_trip() {
        for p in Point::ALL {
            assert_eq!(Point::parse(p.name()), Some(p));
        }
        assert_eq!(Point::parse("throughput"), None);
    }

    #[test]
    fn list_is_canonical_order_without_duplicates() {
        assert_eq!(
            Point::parse_list(&["upgrades", " tput", "upgrades"]).unwrap(),
            vec![Point::Tput, Point::Upgrades]
        );
        assert_eq!(
            Point::parse_list(&["rt", "idle"]).unwrap(),
            vec![Point::Idle, Point::Rt]
        );
    }

    #[test]
    fn upgrades50_is_its_own_point_beside_upgrades() {
        assert_eq!(
            Point::parse_list(&["upgrades50"]).unwrap(),
            vec![Point::Upgrades50]
        );
        assert_eq!(
            Point::parse_list(&["upgrades50", "upgrades"]).unwrap(),
            vec![Point::Upgrades, Point::Upgrades50]
        );
    }

    #[test]
    fn all_selects_everything() {
        assert_eq!(Point::parse_list(&["all"]).unwrap(), Point::ALL.to_vec());
        assert_eq!(
            Point::parse_list(&["tput", "all"]).unwrap(),
            Point::ALL.to_vec()
        );
    }

    #[test]
    fn unknown_and_empty_are_errors() {
        let e = Point::parse_list(&["tput", "latency"]).unwrap_err();
        assert!(e.contains("\"latency\"") && e.contains("upgrades"), "{e}");
        assert!(Point::parse_list::<&str>(&[]).is_err());
        assert!(Point::parse_list(&["", " "]).is_err());
    }
}
