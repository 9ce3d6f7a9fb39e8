#!/usr/bin/env bash
# The Prometheus rules and a real Prometheus against a real gateway:
#   1. promtool checks config/prometheus/*.yml and runs the rules' unit tests;
#   2. every metric the rules use is one the gateway defines (gateway/src/metrics.rs);
#   3. a real Prometheus scrapes `vncgate-loadtest demo` (the gateway in front of a synthetic desktop) while the swarm runs sessions through it,
#      and a second gateway routing from a real Redis; it loads the rules (all healthy), and
#      answers queries on the gateways' series and on a recording rule;
#   4. every query of the Grafana dashboard (config/grafana/vncgate.json) returns series from
#      that Prometheus.
# Installs Debian's prometheus (for promtool and the server) when missing; needs redis-server.
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

free_port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }

# A second gateway, routing from a real Redis: the dashboard's Redis panels need one.
command -v redis-server >/dev/null 2>&1 || { echo "redis-server is missing (scripts/test.sh installs it)" >&2; exit 1; }
redis_port=$(free_port)
redis-server --port "$redis_port" --bind 127.0.0.1 --save "" --appendonly no >"$work/redis.log" 2>&1 &
pids+=($!)
"$target/debug/vncgate" serve --listen 127.0.0.1:0 --admin 127.0.0.1:0 --workers 2 \
  --redis "redis://127.0.0.1:$redis_port" --allow-upstream 127.0.0.0/8 >"$work/gw2.out" 2>"$work/gw2.log" &
pids+=($!)
for _ in $(seq 100); do grep -q 'admin on' "$work/gw2.out" 2>/dev/null && break; sleep 0.1; done
admin2=$(sed -n 's/^vncgate: admin on http:\/\/\(.*\)$/\1/p' "$work/gw2.out")
listen2=$(sed -n 's/^vncgate: listening on ws:\/\/\([^/]*\).*$/\1/p' "$work/gw2.out")
[ -n "$admin2" ] && [ -n "$listen2" ] || { echo "the Redis gateway did not start" >&2; cat "$work/gw2.log" >&2; exit 1; }

prom_port=$(free_port)
cat >"$work/prometheus.yml" <<EOF
global:
  scrape_interval: 1s
  evaluation_interval: 1s
rule_files:
  - $root/$rules
scrape_configs:
  - job_name: vncgate
    static_configs:
      - targets: ["$admin", "$admin2"]
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
expect 'vncgate_redis_up' 'v == 1'
# Lookups of unknown sessions through the Redis gateway (404s): misses, then negative hits.
for _ in 1 2 3; do
  curl -s -o /dev/null --max-time 5 -H 'Connection: Upgrade' -H 'Upgrade: websocket' \
    -H 'Sec-WebSocket-Version: 13' -H 'Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==' \
    "http://$listen2/vnc/nobody" || true
done
expect 'sum(vncgate_route_cache_total{result="miss"})' 'v >= 1'
expect 'sum(vncgate_handshake_rejected_total{reason="unknown_session"})' 'v >= 3'

# Every dashboard query, as Grafana would send it (all gateways, a 1m rate window),
# returns at least one series.
python3 - "$prom_port" config/grafana/vncgate.json <<'PY'
import json, sys, time, urllib.parse, urllib.request
port, path = sys.argv[1], sys.argv[2]
dash = json.load(open(path))
def exprs(panels):
    for p in panels:
        for t in p.get("targets", []):
            yield p["title"], t["expr"]
        yield from exprs(p.get("panels", []))
queries = list(exprs(dash["panels"]))
assert len(queries) >= 25, len(queries)
failed = []
for title, expr in queries:
    q = expr.replace("$__rate_interval", "1m").replace("$instance", ".*")
    url = f"http://127.0.0.1:{port}/api/v1/query?" + urllib.parse.urlencode({"query": q})
    for _ in range(40):
        r = json.load(urllib.request.urlopen(url))
        if r["status"] == "success" and r["data"]["result"]:
            break
        time.sleep(0.5)
    else:
        failed.append(f"{title}: {q} -> {r}")
if failed:
    print("dashboard queries with no series:\n  " + "\n  ".join(failed), file=sys.stderr)
    sys.exit(1)
print(f"prometheus: dashboard: all {len(queries)} queries return series")
PY
curl -s "http://127.0.0.1:$prom_port/api/v1/rules" | python3 -c "
import json, sys
groups = json.load(sys.stdin)['data']['groups']
rules = [r for g in groups for r in g['rules']]
bad = [r['name'] for r in rules if r.get('health') != 'ok']
assert len(rules) >= 12 and not bad, (len(rules), bad)
print(f'prometheus: {len(rules)} rules loaded, all healthy')"
echo "prometheus-test: ok"
