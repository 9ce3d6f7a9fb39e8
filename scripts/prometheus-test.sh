#!/usr/bin/env bash
# The Prometheus rules and a real Prometheus against a real gateway:
#   1. promtool checks config/prometheus/*.yml and runs the rules' unit tests;
#   2. every metric the rules use is one the gateway defines (gateway/src/metrics.rs);
#   3. a real Prometheus scrapes `vncgate-loadtest demo` (the gateway in front of a synthetic desktop) while the swarm runs sessions through it,
#      loads the rules (all healthy), and answers queries on the gateway's series and on a
#      recording rule.
# Installs Debian's prometheus (for promtool and the server) when missing.
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
cd "$root"
target="${CARGO_TARGET_DIR:-target}"

if ! command -v prometheus >/dev/null 2>&1 || ! command -v promtool >/dev/null 2>&1; then
  if [ "$(id -u)" = 0 ]; then
    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq prometheus >/dev/null
  else
    echo "prometheus is missing and this user cannot install it (apt-get install prometheus)" >&2
    exit 1
  fi
fi

rules=config/prometheus/vncgate.rules.yml
promtool check rules "$rules"
promtool check config config/prometheus/prometheus.example.yml
promtool test rules config/prometheus/vncgate.rules.test.yml

missing=0
for m in $(grep -o 'vncgate_[a-z_]*' "$rules" | sort -u); do
  if ! grep -q "\"$m\"" gateway/src/metrics.rs; then
    echo "rules use $m, which gateway/src/metrics.rs does not define" >&2
    missing=1
  fi
done
[ "$missing" = 0 ] || exit 1

cargo build -q -p vncgate -p vncgate-loadtest
work=$(mktemp -d)
pids=()
cleanup() {
  for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done
  wait 2>/dev/null || true
  rm -rf "$work"
}
trap cleanup EXIT

"$target/debug/vncgate-loadtest" demo --gateway "$target/debug/vncgate" --listen 127.0.0.1:0 --admin 127.0.0.1:0 --drain-timeout 1 >"$work/gw.out" 2>"$work/gw.log" &
pids+=($!)
for _ in $(seq 100); do grep -q 'admin on' "$work/gw.out" 2>/dev/null && break; sleep 0.1; done
admin=$(sed -n 's/^vncgate: admin on http:\/\/\(.*\)$/\1/p' "$work/gw.out")
demo=$(sed -n 's/^vncgate: demo desktop at \(.*\)$/\1/p' "$work/gw.out")
[ -n "$admin" ] && [ -n "$demo" ] || { echo "the gateway did not start" >&2; cat "$work/gw.log" >&2; exit 1; }

prom_port=$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])')
cat >"$work/prometheus.yml" <<EOF
global:
  scrape_interval: 1s
  evaluation_interval: 1s
rule_files:
  - $root/$rules
scrape_configs:
  - job_name: vncgate
    static_configs:
      - targets: ["$admin"]
EOF
prometheus --config.file="$work/prometheus.yml" --storage.tsdb.path="$work/data" \
  --web.listen-address="127.0.0.1:$prom_port" >"$work/prom.log" 2>&1 &
pids+=($!)

query() { curl -s --get "http://127.0.0.1:$prom_port/api/v1/query" --data-urlencode "query=$1"; }
# Waits until a query returns a sample whose value satisfies the python expression on v.
expect() {
  local q=$1 cond=$2
  for _ in $(seq 60); do
    if query "$q" | python3 -c "
import json, sys
r = json.load(sys.stdin)['data']['result']
sys.exit(0 if r and all((lambda v: $cond)(float(x['value'][1])) for x in r) else 1)" 2>/dev/null; then
      echo "prometheus: $q -> ok"
      return 0
    fi
    sleep 0.5
  done
  echo "prometheus: $q never satisfied '$cond'; last answer: $(query "$q")" >&2
  tail -20 "$work/prom.log" >&2
  return 1
}

swarm() {
  "$target/debug/vncgate-loadtest" swarm --url "$demo" --sessions "$1" --duration 2 --json 2>/dev/null \
    | tail -1 | grep -q "\"sessions_ok\":$1," || { echo "the swarm's sessions failed" >&2; exit 1; }
}
expect 'up{job="vncgate"}' 'v == 1'
expect 'vncgate_io_driver' 'v == 1'
# Two waves of sessions, scraped in between, so that rates have something to see.
swarm 2
expect 'sum(vncgate_sessions_opened_total)' 'v >= 2'
swarm 3
expect 'sum(vncgate_sessions_opened_total)' 'v >= 5'
expect 'sum(vncgate_relayed_bytes_total{direction="vm_to_browser"})' 'v > 100000'
expect 'sum(vncgate:sessions_opened:rate5m)' 'v > 0'
curl -s "http://127.0.0.1:$prom_port/api/v1/rules" | python3 -c "
import json, sys
groups = json.load(sys.stdin)['data']['groups']
rules = [r for g in groups for r in g['rules']]
bad = [r['name'] for r in rules if r.get('health') != 'ok']
assert len(rules) >= 12 and not bad, (len(rules), bad)
print(f'prometheus: {len(rules)} rules loaded, all healthy')"
echo "prometheus-test: ok"
