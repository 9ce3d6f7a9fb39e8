#!/usr/bin/env bash
# Soak: session churn through the gateway for a long time, sampling the gateway's open
# descriptors, RSS and PSS, to show they do not grow. Not part of the test command.
#
#   scripts/soak.sh                 # one hour
#   SOAK_MINUTES=5 scripts/soak.sh  # a quick look
#
# Load: waves of `vncgate-loadtest swarm` clients (busy and idle sessions, each 15 s wave a
# different size, all closing at the end of the wave), short-lived sessions back to back
# (20 at a time, 4 s each), and a trickle of connections that drop mid-handshake, against the synthetic desktop on loopback. Every 10 s the sampler
# records the gateway's fds, RSS, PSS and live sessions. Output: bench/out/soak.csv,
# bench/out/soak.svg (the curves) and a verdict comparing the first and last tenths of the
# run after a warm-up (descriptors net of the two each live session holds).
set -euo pipefail
cd "$(dirname "$0")/.."
target="${CARGO_TARGET_DIR:-target}"
minutes="${SOAK_MINUTES:-60}"
out=bench/out
mkdir -p "$out"

nice -n 10 cargo build --release -q -p vncgate -p vncgate-loadtest
gw_bin="$target/release/vncgate"
lt_bin="$target/release/vncgate-loadtest"

free_port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }
vm_port=$(free_port)
pids=()
cleanup() { for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done; }
trap cleanup EXIT

"$lt_bin" fakevm --listen "127.0.0.1:$vm_port" --width 320 --height 240 --fps 10 >"$out/soak-fakevm.log" 2>&1 &
pids+=($!)
"$gw_bin" serve --listen 127.0.0.1:0 --admin 127.0.0.1:0 --route "soak=127.0.0.1:$vm_port" \
  --allow-upstream 127.0.0.0/8 --workers 2 >"$out/soak-gateway.out" 2>"$out/soak-gateway.log" &
gw_pid=$!
pids+=($gw_pid)
for _ in $(seq 100); do grep -q 'admin on' "$out/soak-gateway.out" 2>/dev/null && break; sleep 0.1; done
url=$(sed -n 's/^vncgate: listening on \(ws:\/\/[^ ]*\)$/\1/p' "$out/soak-gateway.out")soak
admin=$(sed -n 's/^vncgate: admin on \(http:\/\/[^ ]*\)$/\1/p' "$out/soak-gateway.out")
gw_addr=${url#ws://}; gw_addr=${gw_addr%%/*}
echo "soak: $minutes min against $url (gateway pid $gw_pid)" >&2

end=$(( $(date +%s) + minutes * 60 ))
echo "t_s,fds,rss_kib,pss_kib,sessions_active,sessions_opened" >"$out/soak.csv"
start=$(date +%s)
(
  while [ "$(date +%s)" -lt "$end" ]; do
    fds=$(ls "/proc/$gw_pid/fd" | wc -l)
    rss=$(awk '/^VmRSS:/{print $2}' "/proc/$gw_pid/status")
    pss=$(awk '/^Pss:/{print $2}' "/proc/$gw_pid/smaps_rollup")
    m=$(curl -s "$admin/metrics")
    active=$(awk '/^vncgate_sessions_active /{print $2}' <<<"$m")
    opened=$(awk '/^vncgate_sessions_opened_total /{print $2}' <<<"$m")
    echo "$(( $(date +%s) - start )),$fds,$rss,$pss,${active:-0},${opened:-0}" >>"$out/soak.csv"
    sleep 10
  done
) &
sampler=$!
pids+=($sampler)

# A trickle of connections that send half a request and vanish.
(
  while [ "$(date +%s)" -lt "$end" ]; do
    python3 - "$gw_addr" <<'PY' || true
import socket, sys, random
host, port = sys.argv[1].rsplit(":", 1)
for _ in range(20):
    s = socket.create_connection((host, int(port)))
    req = b"GET /vnc/soak HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\n"
    s.send(req[: random.randint(1, len(req))])
    s.close()
PY
    sleep 2
  done
) &
pids+=($!)

# Short-lived sessions: 20 at a time, 4 s each, back to back.
(
  while [ "$(date +%s)" -lt $(( end - 5 )) ]; do
    "$lt_bin" swarm --url "$url" --sessions 20 --duration 4 --input-rate 20 --json 2>/dev/null \
      | tail -1 >>"$out/soak-quick.jsonl" || true
  done
) &
pids+=($!)

wave=0
sizes=(40 10 25 60 5 30)
while [ "$(date +%s)" -lt "$end" ]; do
  n=${sizes[$((wave % ${#sizes[@]}))]}
  left=$(( end - $(date +%s) ))
  secs=$(( left < 15 ? left : 15 ))
  [ "$secs" -lt 3 ] && break
  "$lt_bin" swarm --url "$url" --sessions "$n" --duration "$secs" --ramp-up 2 \
    --idle-fraction 0.3 --input-rate 5 --json 2>/dev/null | tail -1 >>"$out/soak-waves.jsonl" || true
  wave=$((wave + 1))
done
wait "$sampler" || true

python3 - "$out/soak.csv" "$out/soak.svg" <<'PY'
import csv, sys
rows = [{k: float(v) for k, v in r.items()} for r in csv.DictReader(open(sys.argv[1]))]
if len(rows) < 4:
    sys.exit("soak: too few samples")
warm = max(1, len(rows) // 10)
body = rows[warm:]
tenth = max(1, len(body) // 10)
def mean(rs, k): return sum(r[k] for r in rs) / len(rs)
print(f"samples: {len(rows)} over {rows[-1]['t_s']/60:.1f} min; sessions opened: {int(rows[-1]['sessions_opened'])}")
verdict = True
# Each live session holds two descriptors (browser and VM); what is left is the baseline.
for r in rows:
    r["fds_base"] = r["fds"] - 2 * r["sessions_active"]
for k, slack in (("fds_base", 8), ("rss_kib", 4096), ("pss_kib", 4096)):
    a, b = mean(body[:tenth], k), mean(body[-tenth:], k)
    mx = max(r[k] for r in body)
    ok = b <= a + slack
    verdict &= ok
    print(f"{k}: first tenth {a:.0f}, last tenth {b:.0f}, max {mx:.0f} -> {'no growth' if ok else 'GROWTH'}")
# The curves, one panel per series.
W, H, P = 900, 160, 40
svg = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{W}" height="{4*H}" font-family="sans-serif" font-size="12">']
t_max = rows[-1]["t_s"] or 1
for i, (k, label) in enumerate((("fds", "open fds"), ("rss_kib", "RSS KiB"), ("pss_kib", "PSS KiB"), ("sessions_active", "live sessions"))):
    vals = [r[k] for r in rows]
    lo, hi = 0, max(vals) * 1.1 or 1
    y0 = i * H
    pts = " ".join(f"{P + (W-2*P)*r['t_s']/t_max:.1f},{y0 + H - 20 - (H-40)*(r[k]-lo)/(hi-lo):.1f}" for r in rows)
    svg.append(f'<text x="{P}" y="{y0+15}">{label} (max {max(vals):.0f}) over {t_max/60:.0f} min</text>')
    svg.append(f'<line x1="{P}" y1="{y0+H-20}" x2="{W-P}" y2="{y0+H-20}" stroke="#999"/>')
    svg.append(f'<polyline fill="none" stroke="#1f77b4" stroke-width="1.5" points="{pts}"/>')
svg.append("</svg>")
open(sys.argv[2], "w").write("\n".join(svg))
print("verdict:", "no growth" if verdict else "GROWTH (see soak.csv)")
sys.exit(0 if verdict else 1)
PY
echo "soak: samples in $out/soak.csv, curves in $out/soak.svg, waves in $out/soak-waves.jsonl and soak-quick.jsonl" >&2
