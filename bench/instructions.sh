#!/usr/bin/env bash
# Instruction counts of the WebSocket core under valgrind's callgrind: the same operations as
# the criterion micro benchmarks (ws/benches/core.rs), as instructions per operation and
# per byte. Counts hardly move on a noisy machine, so a regression of a few % shows.
#
#   bench/instructions.sh                                              # table + JSON
#   bench/instructions.sh --compare bench/results/instructions-baseline.json
#   bench/instructions.sh --compare OLD.json --threshold 2             # fail above +2 %
#
# Builds ws/benches/instructions.rs with the bench profile (release, debug = 1), runs
# each operation under callgrind twice (ITERS times and 0 times; only the function
# `cg_measured` is counted) and takes the difference over ITERS, so process start-up and
# input set-up are not counted. Installs valgrind with apt-get when it is missing and this
# runs as root. Output: the markdown table on stdout and in bench/out/instructions.md, every
# figure in bench/out/instructions.json, callgrind's files in bench/out/callgrind/.
# With --compare, the baseline's figure and the change in % per row; exits 1 when any row's
# instructions per operation grew by more than the threshold (default 5 %).
set -euo pipefail
cd "$(dirname "$0")/.."

compare=""
threshold=5
usage() {
    sed -n '2,17p' "$0" | sed 's/^# \{0,1\}//'
    exit "${1:-0}"
}
while (($#)); do
    case "$1" in
    --compare) compare="${2:?--compare needs a file}"; shift 2 ;;
    --compare=*) compare="${1#*=}"; shift ;;
    --threshold) threshold="${2:?--threshold needs a number}"; shift 2 ;;
    --threshold=*) threshold="${1#*=}"; shift ;;
    -h | --help) usage 0 ;;
    *) echo "instructions.sh: unknown argument $1" >&2; usage 2 ;;
    esac
done
if ! [[ "$threshold" =~ ^[0-9]+(\.[0-9]+)?$ ]]; then
    echo "instructions.sh: --threshold takes a percentage, such as 5 or 2.5" >&2
    exit 2
fi
if [ -n "$compare" ] && [ ! -r "$compare" ]; then
    echo "instructions.sh: cannot read $compare" >&2
    exit 2
fi
if ! command -v python3 >/dev/null 2>&1; then
    echo "instructions.sh: python3 is needed for the table and the JSON" >&2
    exit 2
fi

if ! command -v valgrind >/dev/null 2>&1; then
    if [ "$(id -u)" = 0 ]; then
        echo "instructions.sh: installing valgrind" >&2
        apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq valgrind >/dev/null
    else
        echo "instructions.sh: valgrind not found (apt-get install valgrind)" >&2
        exit 2
    fi
fi

echo "instructions.sh: building the bench binary (bench profile)" >&2
bin=$(nice -n 10 cargo bench -p vncgate-ws --bench instructions --no-run --message-format=json |
    python3 -c '
import json, sys
exe = None
for line in sys.stdin:
    try:
        m = json.loads(line)
    except ValueError:
        continue
    if m.get("reason") == "compiler-artifact" and m.get("target", {}).get("name") == "instructions" \
            and m.get("executable"):
        exe = m["executable"]
print(exe or "")
')
if [ -z "$bin" ] || [ ! -x "$bin" ]; then
    echo "instructions.sh: the build did not produce the instructions bench binary" >&2
    exit 1
fi

out=bench/out
cg="$out/callgrind"
mkdir -p "$cg"
rm -f "$cg"/*.out "$cg"/*.log "$out/instructions.json" "$out/instructions.md"

# Instructions counted inside cg_measured for operation $1 run $2 times.
count() {
    local file="$cg/$1-$2.out"
    if ! valgrind --tool=callgrind --callgrind-out-file="$file" \
        --collect-atstart=no --toggle-collect='*cg_measured*' \
        "$bin" "$1" "$2" >"$cg/$1-$2.log" 2>&1; then
        echo "instructions.sh: callgrind failed on $1 $2, see $cg/$1-$2.log" >&2
        exit 1
    fi
    local n
    n=$(sed -n 's/^\(summary\|totals\): *\([0-9]*\).*/\2/p' "$file" | head -n1)
    if [ -z "$n" ]; then
        echo "instructions.sh: no total in $file" >&2
        exit 1
    fi
    echo "$n"
}

rows="$cg/rows.txt"
: >"$rows"
while read -r name bytes per_iter iters; do
    echo "instructions.sh: $name ($iters iterations under callgrind)" >&2
    full=$(count "$name" "$iters")
    zero=$(count "$name" 0)
    echo "$name $bytes $per_iter $iters $full $zero" >>"$rows"
done < <("$bin" --list)

python3 - "$rows" "$out" "$compare" "$threshold" "$(valgrind --version)" \
    "$(rustc --version)" <<'EOF'
import datetime
import json
import platform
import sys

rows_file, out, compare, threshold, valgrind, rustc = sys.argv[1:7]
threshold = float(threshold)

LABELS = {"handshake": "handshake parse (noVNC upgrade request)"}


def label(name):
    if name in LABELS:
        return LABELS[name]
    kind, size = name.split("-")
    size = int(size)
    size = f"{size // 1024} KiB" if size >= 1024 else f"{size} B"
    what = {"frame": "frame parse, one masked binary frame of", "unmask": "unmask"}[kind]
    return f"{what} {size}"


def cpu_model():
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


rows = []
with open(rows_file) as f:
    for line in f:
        name, nbytes, per_iter, iters, full, zero = line.split()
        nbytes, per_iter, iters, full, zero = map(int, (nbytes, per_iter, iters, full, zero))
        ops = iters * per_iter
        per_op = (full - zero) / ops
        rows.append({
            "name": name,
            "label": label(name),
            "bytes": nbytes,
            "iterations": iters,
            "ops_per_iteration": per_iter,
            "instructions_measured": full,
            "instructions_zero_iterations": zero,
            "instructions_per_op": round(per_op, 2),
            "instructions_per_byte": round(per_op / nbytes, 4),
        })

record = {
    "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"),
    "tool": "callgrind (Ir), only inside cg_measured; (ITERS run - 0 run) / operations",
    "valgrind": valgrind,
    "rustc": rustc,
    "cpu": cpu_model(),
    "kernel": platform.release(),
    "rows": rows,
}

base = {}
if compare:
    with open(compare) as f:
        base = {r["name"]: r for r in json.load(f).get("rows", [])}

head = f"{record['date']} · {record['cpu']} · {valgrind} · {rustc}"
lines = [head, ""]
cols = "| operation | bytes | instructions / op | instructions / byte |"
sep = "|---|---:|---:|---:|"
if compare:
    cols += " baseline / op | change |"
    sep += "---:|---:|"
lines += [cols, sep]
regressed = []
for r in rows:
    line = (f"| {r['label']} | {r['bytes']} | {r['instructions_per_op']:,.1f} "
            f"| {r['instructions_per_byte']:.3f} |")
    if compare:
        b = base.get(r["name"])
        if b is None or not b.get("instructions_per_op"):
            line += " — | new |"
        else:
            old = b["instructions_per_op"]
            pct = (r["instructions_per_op"] - old) / old * 100
            r["change_pct"] = round(pct, 2)
            mark = ""
            if pct > threshold:
                mark = " **regressed**"
                regressed.append(f"{r['name']} {pct:+.2f} %")
            line += f" {old:,.1f} | {pct:+.2f} %{mark} |"
    lines.append(line)
if compare:
    gone = sorted(set(base) - {r["name"] for r in rows})
    lines.append("")
    lines.append(f"Compared with {compare}: change in instructions per operation, "
                 f"a row fails above +{threshold:g} %."
                 + (f" Not measured now: {', '.join(gone)}." if gone else ""))
    record["compared_with"] = compare
    record["threshold_pct"] = threshold

lines += ["", "bytes: payload bytes per operation (the whole request for the handshake); "
          "instructions / byte = instructions / op ÷ bytes. A frame-parse operation is one "
          "`step` over one whole frame: header and in-place unmasking of its payload."]
text = "\n".join(lines) + "\n"
sys.stdout.write(text)
with open(f"{out}/instructions.md", "w") as f:
    f.write(text)
with open(f"{out}/instructions.json", "w") as f:
    json.dump(record, f, indent=2)
    f.write("\n")
if regressed:
    print(f"\ninstructions.sh: regressed by more than {threshold:g} %: " + ", ".join(regressed),
          file=sys.stderr)
    sys.exit(1)
EOF
