#!/usr/bin/env bash
# Restores from the golden snapshot through vncgate-controller's qemu backend: create-to-ready
# median and p95 over 20 restores one after another, then 4 and 8 at once with the memory of
# each VM. Needs the golden image: config/golden/build.sh DIR (default DIR: target/golden).
#
#   bench/restores.sh [--golden DIR] [--restores N] [--bursts 4,8]
#
# Output: the table on stdout and in bench/out/restores.md, the figures in restores.json.
set -euo pipefail
cd "$(dirname "$0")/.."
target="${CARGO_TARGET_DIR:-target}"
nice -n 10 cargo build --release -p vncgate-controller -p vncgate-bench
golden=target/golden
args=()
while [ $# -gt 0 ]; do
  case "$1" in
    --golden) golden=$2; shift 2 ;;
    *) args+=("$1"); shift ;;
  esac
done
"$target/release/vncgate-bench-restores" --controller "$target/release/vncgate-controller" --golden "$golden" "${args[@]}"
