#!/usr/bin/env bash
# Builds vncgate and the bench, installs the comparison proxies when missing, runs the
# bench (all arguments are passed on to it) and says where the table went.
#
#   bench/run.sh                      # full run: 3 reps, 3 s per point, 1000 idle sessions
#   bench/run.sh --reps 1 --secs 1 --idle 200 --only direct,websocat
#   bench/run.sh --points idle --idle 1000,10000     # memory per idle session at 1k and 10k
set -euo pipefail
cd "$(dirname "$0")/.."
target="${CARGO_TARGET_DIR:-target}"

if ! nice -n 10 cargo build --release -p vncgate -p vncgate-bench; then
    echo "run.sh: building vncgate failed; building the bench alone (vncgate will be skipped if it has no binary)" >&2
    nice -n 10 cargo build --release -p vncgate-bench
fi

if ! command -v websocat >/dev/null 2>&1 && [ ! -x "$HOME/.cargo/bin/websocat" ]; then
    echo "run.sh: installing websocat (a few minutes)" >&2
    nice -n 10 timeout 1200 cargo install websocat --locked || echo "run.sh: websocat install failed; it will be skipped" >&2
fi
if ! command -v websockify >/dev/null 2>&1; then
    echo "run.sh: installing websockify" >&2
    timeout 300 python3 -m pip install --quiet websockify || echo "run.sh: websockify install failed; it will be skipped" >&2
fi

"$target/release/vncgate-bench" --vncgate "$target/release/vncgate" "$@"
# Where the bench wrote (its last --out, as the bench takes the last value of a flag).
out=bench/out
prev=
for a in "$@"; do
    case "$prev" in --out) out="$a" ;; esac
    case "$a" in --out=*) out="${a#--out=}" ;; esac
    prev="$a"
done
echo "run.sh: table in $out/results.md, raw figures in $out/results.json, proxy logs in $out/logs/" >&2
