#!/usr/bin/env bash
# Upgrades per second through vncgate by route source, in one run: a static routes file,
# Redis with a warm route cache, Redis with none (--route-cache-ttl 0), each as a ratio to
# static. Builds vncgate and the bench in release mode, then runs vncgate-bench-routing with
# all arguments passed on. It starts its own redis-server (from PATH, or
# /usr/bin/redis-server: apt-get install redis-server) on a free loopback port and kills it
# at the end.
#
#   bench/routing.sh                               # 3 reps, 3 s per point, 64 ids, 4 connectors
#   bench/routing.sh --reps 1 --secs 2             # quick look
#   bench/routing.sh --workers 2 --only static,redis-cold --with-echo
#
# Output: the table on stdout and in bench/out/routing.md, every figure in
# bench/out/routing.json, the chart bench/out/routing.svg, logs in bench/out/logs/routing-*.
set -euo pipefail
cd "$(dirname "$0")/.."
target="${CARGO_TARGET_DIR:-target}"

nice -n 10 cargo build --release -p vncgate -p vncgate-bench
"$target/release/vncgate-bench-routing" --vncgate "$target/release/vncgate" "$@"
