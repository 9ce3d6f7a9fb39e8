#!/usr/bin/env bash
# Sessions created to ready per second through vncgate-controller (process backend,
# in-memory store) and the create-to-ready p50/p99, for 1 and 20 concurrent creators.
# Builds release, then runs vncgate-bench-sessions with all arguments passed on.
#
#   bench/sessions.sh                      # 1 and 20 creators, 5 s each
#   bench/sessions.sh --creators 1,5,20 --secs 10
#
# Output: the table on stdout and in bench/out/sessions.md, the figures in sessions.json.
set -euo pipefail
cd "$(dirname "$0")/.."
target="${CARGO_TARGET_DIR:-target}"
nice -n 10 cargo build --release -p vncgate-controller -p vncgate-loadtest -p vncgate-bench
"$target/release/vncgate-bench-sessions" --controller "$target/release/vncgate-controller" "$@"
