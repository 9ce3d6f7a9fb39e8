#!/usr/bin/env bash
# Thread-per-core scaling of vncgate: aggregate throughput with 50 connections and upgrades
# per second at 1, 2, 4, 8 and 16 workers (those counts that do not exceed the number of
# cores), each beside direct TCP measured in the same run, then a markdown table.
#
#   bench/scaling.sh                                   # 1 repetition, 3 s per point
#   bench/scaling.sh --reps 3 --vncgate-arg=--io-driver=epoll
#
# Arguments are passed to every bench run after the script's own, so they override
# --reps, --secs, --conns and --connectors (not --only, --workers, --points or --out,
# which make the sweep). Everything runs on this machine, client and upstreams included:
# the connectors (default: the largest worker count tested, at least 4, the same for every
# row so that rows compare) and the 50 client threads take cores from the proxy too.
#
# Every row binds each worker to a CPU of its own (`--pin-workers=always`), as the
# gateway's default does when it has one worker per core, so that the rows differ only in
# the worker count; pass --vncgate-arg=--pin-workers=never to sweep unpinned workers.
#
# Output: the table on stdout and in bench/out/scaling/scaling.md; each run's table, JSON
# and charts in bench/out/scaling/workers-N/.
set -euo pipefail
cd "$(dirname "$0")/.."
target="${CARGO_TARGET_DIR:-target}"
out=bench/out/scaling

nice -n 10 cargo build --release -p vncgate -p vncgate-bench

cores=$(nproc)
counts=()
skipped=()
for n in 1 2 4 8 16; do
    if ((n <= cores)); then
        counts+=("$n")
    else
        skipped+=("$n")
    fi
done
connectors=${counts[-1]}
if ((connectors < 4)); then
    connectors=4
fi

pin=(--vncgate-arg=--pin-workers=always)
for a in "$@"; do
    if [[ $a == *--pin-workers* ]]; then
        pin=()
    fi
done

mkdir -p "$out"
for n in "${counts[@]}"; do
    dir="$out/workers-$n"
    # A failed run must not leave the previous sweep's figures to be read as this one's.
    rm -f "$dir/results.json"
    echo "scaling.sh: vncgate --workers $n (of ${counts[*]})" >&2
    if ! "$target/release/vncgate-bench" --vncgate "$target/release/vncgate" \
        --only direct,vncgate --workers "$n" --points tput,upgrades \
        --reps 1 --connectors "$connectors" --out "$dir" "${pin[@]}" "$@" >/dev/null; then
        echo "scaling.sh: the run with --workers $n failed; its row will be empty (see $dir/logs/)" >&2
    fi
done

if ! command -v python3 >/dev/null 2>&1; then
    echo "scaling.sh: python3 not found, no table; the figures are in $out/workers-*/results.json" >&2
    exit 1
fi
python3 - "$out" "$cores" "${skipped[*]:-}" "${counts[@]}" <<'EOF' | tee "$out/scaling.md"
import json
import sys

out, cores, skipped, counts = sys.argv[1], sys.argv[2], sys.argv[3], sys.argv[4:]


def cell(d, key, fmt):
    return fmt.format(d[key]) if isinstance(d.get(key), (int, float)) else "—"


rows, head = [], None
for n in counts:
    try:
        with open(f"{out}/workers-{n}/results.json") as f:
            js = json.load(f)
    except (OSError, ValueError):
        rows.append(f"| {n} | — | — | — | — |")
        continue
    head = head or js
    v = js.get("proxies", {}).get("vncgate", {})
    med, rat = v.get("median", {}), v.get("ratio_to_direct", {})
    rows.append(
        f"| {n} | {cell(med, 'tput_n_mbs', '{:.1f}')} | {cell(rat, 'tput_n_mbs', '{:.2f}x')} "
        f"| {cell(med, 'upgrades_s', '{:.0f}')} | {cell(rat, 'upgrades_s', '{:.2f}x')} |"
    )

conns = head["settings"]["conns"] if head else 50
connectors = head["settings"]["connectors"] if head else "?"
print("# vncgate thread-per-core scaling\n")
if head:
    m = head["machine"]
    print(f"{head['date']} · {m['nproc']} CPUs ({m['cpu']}) · Linux {m['kernel']} · "
          f"{head['settings']['reps']} repetition(s), {head['settings']['secs']} s per point. "
          f"Ratio = vncgate / direct TCP from the same run.\n")
print(f"| workers | throughput, {conns} conns (MB/s) | ratio | upgrades/s ({connectors} connectors) | ratio |")
print("|---:|---:|---:|---:|---:|")
print("\n".join(rows))
if skipped:
    print(f"\nWorkers {', '.join(skipped.split())} not run: more workers need more cores "
          f"(this machine has {cores}).")
EOF
