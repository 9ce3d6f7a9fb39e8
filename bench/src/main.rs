//! `vncgate-bench`: flags in, `runner::run` does the rest (or `plot::plot_file` alone with
//! `--plot-only`).
#![forbid(unsafe_code)]

use std::path::PathBuf;
use std::process::ExitCode;

use clap::Parser;
use vncgate_bench::cli::RunArgs;
use vncgate_bench::plot;
use vncgate_bench::point::Point;
use vncgate_bench::proxy::Kind;
use vncgate_bench::runner::{self, Config};

/// Benchmark WebSocket-to-TCP relays against direct TCP on loopback; prints a markdown
/// table and writes results.md, results.json and the charts results.svg and
/// results-memory.svg.
#[derive(Parser, Debug)]
// A flag given twice takes the last value (scripts put their defaults first; `scaling.sh`
// relies on it); repeatable flags (`--vncgate-arg`) still collect every value.
#[command(name = "vncgate-bench", version, args_override_self = true)]
struct Args {
    #[command(flatten)]
    run: RunArgs,
    /// Idle sessions held for the memory figures: one count or a comma-separated list
    /// (`1000,10000`), each measured on a fresh proxy process (0 skips it).
    #[arg(long, value_delimiter = ',', default_value = "1000")]
    idle: Vec<usize>,
    /// Connections for the many-connection throughput and round-trip points.
    #[arg(long, default_value_t = 50)]
    conns: usize,
    /// Comma-separated subset of direct,vncgate,vncgate-tls,vncgate-record,websocat,websockify
    /// (vncgate-tls: vncgate serving wss:// with a certificate made for the run;
    /// vncgate-record: vncgate recording every session, --record, not run by default).
    #[arg(
        long,
        value_delimiter = ',',
        default_value = "direct,vncgate,vncgate-tls,websocat,websockify"
    )]
    only: Vec<String>,
    /// Comma-separated measurement points to take: idle (memory per idle session), tput
    /// (throughput 1 and N conns, Jain, CPU per GB), rt (16 B round trips), upgrades
    /// (upgrades and upgrade+echo per second), upgrades50 (50 connectors: upgrade to the
    /// first VM byte and a clean close, rate and latency), or all.
    #[arg(long, value_delimiter = ',', default_value = "all")]
    points: Vec<String>,
    /// Offered rate of the upgrades50 point's paced phase, upgrades per second over its 50
    /// connectors together: after the closed loop (each proxy at its own saturation), the
    /// same connectors start cycles on a fixed schedule, and each latency counts from when
    /// its cycle was due, so every proxy is compared at the same load. A proxy name instead
    /// of a number (`websocat`) paces every proxy at that proxy's own closed-loop rate,
    /// measured by one closed loop against it before the repetitions, and sets each
    /// proxy's paced p99s beside that proxy's closed-loop ones under the table; if it is not
    /// in the run or its calibration fails, the phase runs at 5000/s and the table says
    /// why. A proxy that completes less than 95% of the offered rate, or fails any cycle,
    /// is named under the table as not keeping up. 0 skips the paced phase.
    #[arg(long, value_name = "PER_SEC|PROXY", default_value = "5000", value_parser = parse_paced_rate)]
    paced_rate: PacedRate,
    /// Draw the charts from an existing results JSON and exit, running nothing: X.json
    /// gives X.svg and X-memory.svg beside it. Other flags are ignored.
    #[arg(long, value_name = "JSON")]
    plot_only: Option<PathBuf>,
    /// Internal: serve a fake VM on 127.0.0.1:<free port> until killed (the idle point's
    /// upstream, run as a child process of the bench).
    #[arg(long = "serve-fakevm", hide = true)]
    serve_fakevm: bool,
}

/// `--serve-fakevm`: vncgate-loadtest's fake VM, printing `listening ADDR` on stdout.
fn serve_fakevm() -> ExitCode {
    use vncgate_loadtest::fakevm;
    let rt = match tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("vncgate-bench --serve-fakevm: {e}");
            return ExitCode::FAILURE;
        }
    };
    let addr = std::net::SocketAddr::from(([127, 0, 0, 1], 0));
    match rt.block_on(fakevm::run(&[addr], fakevm::Config::default())) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("vncgate-bench --serve-fakevm: {e}");
            ExitCode::FAILURE
        }
    }
}

fn main() -> ExitCode {
    let a = Args::parse();
    if a.serve_fakevm {
        return serve_fakevm();
    }
    if let Some(json) = &a.plot_only {
        return match plot::plot_file(json) {
            Ok(paths) => {
                for p in paths {
                    println!("{}", p.display());
                }
                ExitCode::SUCCESS
            }
            Err(e) => {
                eprintln!("vncgate-bench --plot-only: {e}");
                ExitCode::FAILURE
            }
        };
    }
    let mut points = match Point::parse_list(&a.points) {
        Ok(p) => p,
        Err(e) => {
            eprintln!("--points: {e}");
            return ExitCode::from(2);
        }
    };
    // `--idle 0` and a selection without `idle` mean the same: no idle sessions. Counts are
    // measured in the order given, each once.
    let mut idle: Vec<usize> = Vec::new();
    if points.contains(&Point::Idle) {
        for n in a.idle.iter().copied().filter(|&n| n > 0) {
            if !idle.contains(&n) {
                idle.push(n);
            }
        }
    }
    if idle.is_empty() {
        points.retain(|&p| p != Point::Idle);
        if points.is_empty() {
            eprintln!("--points idle with --idle 0 leaves nothing to measure");
            return ExitCode::from(2);
        }
    }
    let only = match Kind::parse_list(&a.only) {
        Ok(k) => k,
        Err(e) => {
            eprintln!("--only: {e}");
            return ExitCode::from(2);
        }
    };
    if !a.run.in_range() || a.conns == 0 {
        eprintln!("--reps, --conns and --connectors must be at least 1, --secs within 0.1..600");
        return ExitCode::from(2);
    }
    let (paced_rate, paced_from) = match a.paced_rate {
        PacedRate::Fixed(rate) => (rate, None),
        PacedRate::Of(kind) => (runner::FALLBACK_PACED_RATE, Some(kind)),
    };
    let workers = a.run.workers();
    let cfg = Config {
        vncgate: a.run.vncgate,
        workers,
        vncgate_args: a.run.vncgate_args,
        reps: a.run.reps,
        secs: a.run.secs,
        idle,
        conns: a.conns,
        connectors: a.run.connectors,
        only,
        points,
        paced_rate,
        paced_from,
        out: a.run.out,
    };
    match runner::run(&cfg) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("vncgate-bench: {e}");
            ExitCode::FAILURE
        }
    }
}

/// `--paced-rate`: a fixed rate, or the proxy whose closed-loop rate sets it.
#[derive(Debug, Clone, Copy, PartialEq)]
enum PacedRate {
    Fixed(f64),
    Of(Kind),
}

fn parse_paced_rate(s: &str) -> Result<PacedRate, String> {
    if let Ok(rate) = s.parse::<f64>() {
        return if rate.is_finite() && rate >= 0.0 {
            Ok(PacedRate::Fixed(rate))
        } else {
            Err("a rate per second must be at least 0 (0 skips the paced phase)".into())
        };
    }
    match Kind::parse(s) {
        Some(Kind::Direct) => Err("direct has no upgrade to pace others by; name a proxy".into()),
        Some(kind) => Ok(PacedRate::Of(kind)),
        None => Err(format!(
            "not a rate per second nor a proxy ({})",
            Kind::ALL
                .iter()
                .filter(|&&k| k != Kind::Direct)
                .map(|k| k.name())
                .collect::<Vec<_>>()
                .join(", ")
        )),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn later_flags_override_earlier_ones_and_repeatable_ones_collect() {
        let a = Args::try_parse_from([
            "vncgate-bench",
            "--reps",
            "1",
            "--points",
            "tput,upgrades",
            "--vncgate-arg=--io-driver=epoll",
            "--reps",
            "3",
            "--vncgate-arg",
            "--x",
        ])
        .unwrap();
        assert_eq!(a.run.reps, 3);
        assert_eq!(a.points, ["tput", "upgrades"]);
        assert_eq!(a.run.vncgate_args, ["--io-driver=epoll", "--x"]);
        assert_eq!(
            Point::parse_list(&a.points).unwrap(),
            [Point::Tput, Point::Upgrades]
        );
    }

    #[test]
    fn idle_takes_a_list_of_counts() {
        let a = Args::try_parse_from(["vncgate-bench", "--idle", "1000,10000"]).unwrap();
        assert_eq!(a.idle, [1000, 10000]);
        let a = Args::try_parse_from(["vncgate-bench"]).unwrap();
        assert_eq!(a.idle, [1000]);
        assert!(!a.serve_fakevm);
        let a = Args::try_parse_from(["vncgate-bench", vncgate_bench::targets::SERVE_FAKEVM_FLAG])
            .unwrap();
        assert!(a.serve_fakevm);
        assert!(Args::try_parse_from(["vncgate-bench", "--idle", "1k"]).is_err());
    }

    #[test]
    fn only_takes_vncgate_tls_and_defaults_to_every_proxy() {
        let a = Args::try_parse_from(["vncgate-bench", "--only", "vncgate-tls,direct,vncgate"])
            .unwrap();
        assert_eq!(
            Kind::parse_list(&a.only).unwrap(),
            [Kind::Direct, Kind::Vncgate, Kind::VncgateTls]
        );
        let a = Args::try_parse_from(["vncgate-bench"]).unwrap();
        let every_but_recording: Vec<Kind> = Kind::ALL
            .into_iter()
            .filter(|&k| k != Kind::VncgateRecord)
            .collect();
        assert_eq!(Kind::parse_list(&a.only).unwrap(), every_but_recording);
    }

    #[test]
    fn paced_rate_defaults_to_5000_and_takes_a_rate_or_a_proxy() {
        let a = Args::try_parse_from(["vncgate-bench"]).unwrap();
        assert_eq!(a.paced_rate, PacedRate::Fixed(5000.0));
        let a = Args::try_parse_from(["vncgate-bench", "--paced-rate", "websocat"]).unwrap();
        assert_eq!(a.paced_rate, PacedRate::Of(Kind::Websocat));
        let a = Args::try_parse_from(["vncgate-bench", "--paced-rate", "0"]).unwrap();
        assert_eq!(a.paced_rate, PacedRate::Fixed(0.0));
        let a = Args::try_parse_from(["vncgate-bench", "--paced-rate=2500.5"]).unwrap();
        assert_eq!(a.paced_rate, PacedRate::Fixed(2500.5));
        let a = Args::try_parse_from(["vncgate-bench", "--paced-rate", "websockify"]).unwrap();
        assert_eq!(a.paced_rate, PacedRate::Of(Kind::Websockify));
        for bad in ["fast", "-1", "inf", "direct"] {
            assert!(
                Args::try_parse_from(["vncgate-bench", "--paced-rate", bad]).is_err(),
                "{bad}"
            );
        }
    }

    #[test]
    fn defaults_take_every_point_and_plot_only_takes_a_path() {
        let a = Args::try_parse_from(["vncgate-bench"]).unwrap();
        assert_eq!(Point::parse_list(&a.points).unwrap(), Point::ALL);
        assert!(a.plot_only.is_none());
        let a = Args::try_parse_from(["vncgate-bench", "--plot-only", "out/results.json"]).unwrap();
        assert_eq!(a.plot_only, Some(PathBuf::from("out/results.json")));
    }
}
