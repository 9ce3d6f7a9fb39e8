#!/usr/bin/env bash
# Sessions through 1 and through 3 controllers sharing one Redis (placement by pull), side by
# side in one run: vncgate-loadtest sessions creates them on the first controller, waits for
# ready, views each through the gateway to its first framebuffer, holds it, deletes it; the
# figures are sessions ready per second and create-to-ready / first-framebuffer p50 and p99.
# Process backend (fake VMs), release builds, a fresh redis-server on a free port.
#
#   bench/scaleout.sh                        # 60 sessions, 10 in flight
#   bench/scaleout.sh --sessions 120 --concurrency 20
#
# Output: a table on stdout and bench/out/scaleout.md; each run's JSON in bench/out/.
# On one machine the three controllers share its cores: the figure says what placement by
# pull costs and whether it spreads the sessions, not how far more hosts scale.
set -euo pipefail
cd "$(dirname "$0")/.."
target="${CARGO_TARGET_DIR:-target}"
sessions=60
concurrency=10
while [ $# -gt 0 ]; do
  case "$1" in
    --sessions) sessions="$2"; shift 2 ;;
    --concurrency) concurrency="$2"; shift 2 ;;
    *) echo "unknown argument: $1" >&2; exit 2 ;;
  esac
done
command -v redis-server >/dev/null || { echo "redis-server is missing (apt-get install redis-server)" >&2; exit 1; }
nice -n 10 cargo build -q --release -p vncgate -p vncgate-controller -p vncgate-loadtest
out=bench/out
mkdir -p "$out"
work=$(mktemp -d)
pids=()
# The VMs outlive their controllers by design: end this run's, found by the session ids
# of their directories and by the work directory in their command lines.
kill_vms() {
  for d in "$work"/c*/s-*; do
    [ -d "$d" ] || continue
    for p in $(pgrep -f "vncgate session $(basename "$d")"); do kill "$p" 2>/dev/null || true; done
  done
  for p in $(pgrep -f "$work/c"); do kill "$p" 2>/dev/null || true; done
}
cleanup() {
  for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done
  wait 2>/dev/null || true
  kill_vms
  rm -rf "$work"
}
trap cleanup EXIT

free_port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }

# Waits for a line matching $2 in file $1; prints what follows the match.
wait_line() {
  for _ in $(seq 1 200); do
    if grep -q "$2" "$1" 2>/dev/null; then grep -m1 "$2" "$1" | sed "s|.*$2||"; return 0; fi
    sleep 0.05
  done
  echo "no '$2' in $1:" >&2; cat "$1" >&2; return 1
}

run() {
  local n=$1
  local port; port=$(free_port)
  redis-server --port "$port" --save '' --appendonly no >"$work/redis-$n.log" 2>&1 &
  pids+=($!)
  for _ in $(seq 1 100); do redis-cli -p "$port" ping >/dev/null 2>&1 && break; sleep 0.05; done
  local url="redis://127.0.0.1:$port"
  "$target/release/vncgate" serve --listen 127.0.0.1:0 --redis "$url" --allow-upstream 127.0.0.0/8 \
    >"$work/gw-$n.out" 2>"$work/gw-$n.err" &
  pids+=($!)
  local gw; gw=$(wait_line "$work/gw-$n.out" "vncgate: listening on ")
  local api=""
  for h in $(seq 1 "$n"); do
    mkdir -p "$work/c$n-$h"
    "$target/release/vncgate-controller" --listen 127.0.0.1:0 --redis "$url" --host-id "host$h" \
      --work-dir "$work/c$n-$h" >"$work/c$n-$h.out" 2>"$work/c$n-$h.err" &
    pids+=($!)
    local a; a=$(wait_line "$work/c$n-$h.out" "vncgate-controller: listening on ")
    [ -n "$api" ] || api="$a"
  done
  "$target/release/vncgate-loadtest" sessions --controller "$api" --gateway "${gw%/vnc/}" \
    --sessions "$sessions" --concurrency "$concurrency" --json | tail -1 >"$out/scaleout-$n.json"
  # The owners stop the VMs of the deleted sessions (a command each, after the withdrawal's
  # grace): wait for them before the next run shares the machine.
  for _ in $(seq 1 100); do
    ls -d "$work"/c"$n"-*/s-* >/dev/null 2>&1 || break
    sleep 0.1
  done
  # Where the sessions ran: the placement by pull, per host.
  redis-cli -p "$port" --scan --pattern 'vncgate:session:*' | while read -r k; do
    redis-cli -p "$port" GET "$k" | python3 -c 'import json,sys; print(json.load(sys.stdin).get("host","-"))'
  done | sort | uniq -c | awk '{printf "%s=%s ", $2, $1}' >"$out/scaleout-$n.hosts"
}

run 1
run 3
python3 - "$out" "$sessions" "$concurrency" <<'PY'
import json, sys
out, sessions, conc = sys.argv[1], sys.argv[2], sys.argv[3]
rows = []
for n in (1, 3):
    r = json.load(open(f"{out}/scaleout-{n}.json"))
    hosts = open(f"{out}/scaleout-{n}.hosts").read().strip()
    rows.append((n, r, hosts))
def g(r, *path):
    for p in path:
        r = r.get(p) if isinstance(r, dict) else None
    return r
lines = [f"{sessions} sessions, {conc} in flight, process backend, one machine (the controllers share its cores)", "",
         "| controllers | ready | failed | sessions/s | create→ready p50 / p99 (ms) | create→first framebuffer p50 / p99 (ms) | sessions per host |",
         "|---:|---:|---:|---:|---:|---:|---|"]
for n, r, hosts in rows:
    def pc(key):
        v = r.get(key) or {}
        f = lambda x: f"{x:.0f}" if isinstance(x, (int, float)) else "—"
        return f"{f(v.get('p50'))} / {f(v.get('p99'))}"
    lines.append(f"| {n} | {r.get('ready')} | {r.get('failed')} | {round(r.get('sessions_per_s', 0), 2)} | {pc('create_to_ready_ms')} | {pc('create_to_first_framebuffer_ms')} | {hosts} |")
text = "\n".join(lines)
print(text)
open(f"{out}/scaleout.md", "w").write(text + "\n")
PY
