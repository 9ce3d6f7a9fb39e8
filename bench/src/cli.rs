//! Flags shared by `vncgate-bench` and `vncgate-bench-routing`: which gateway to run and
//! how, how long and how often to measure, where the results go.

use std::path::PathBuf;

#[derive(clap::Args, Debug)]
pub struct RunArgs {
    /// Path of the vncgate binary.
    #[arg(long, default_value = "target/release/vncgate")]
    pub vncgate: PathBuf,
    /// Worker threads for vncgate (`--workers`) [default: one per core].
    #[arg(long)]
    pub workers: Option<usize>,
    /// Extra argument for `vncgate serve` (repeatable), e.g. `--vncgate-arg=--io-driver=epoll`.
    #[arg(long = "vncgate-arg", value_name = "ARG", allow_hyphen_values = true)]
    pub vncgate_args: Vec<String>,
    /// Repetitions, interleaved (in rotating order); the table shows medians.
    #[arg(long, default_value_t = 3)]
    pub reps: usize,
    /// Seconds per timed point.
    #[arg(long, default_value_t = 3.0)]
    pub secs: f64,
    /// Concurrent connector threads for the upgrade rate.
    #[arg(long, default_value_t = 4)]
    pub connectors: usize,
    /// Output folder for the table, the JSON, the charts and the logs.
    #[arg(long, default_value = concat!(env!("CARGO_MANIFEST_DIR"), "/out"))]
    pub out: PathBuf,
}

impl RunArgs {
    /// `--workers`, or one per core.
    pub fn workers(&self) -> usize {
        self.workers
            .unwrap_or_else(|| std::thread::available_parallelism().map_or(1, |n| n.get()))
    }

    /// Whether `--reps` and `--connectors` are at least 1 and `--secs` is within 0.1..600.
    pub fn in_range(&self) -> bool {
        self.reps > 0 && (0.1..=600.0).contains(&self.secs) && self.connectors > 0
    }
}
