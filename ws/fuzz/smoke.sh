#!/usr/bin/env bash
# Smoke-fuzzes the WebSocket core: builds every cargo-fuzz target and runs each for
# SECONDS (default 20) on a temporary copy of its committed seeds, so runs never add files
# to the repository. Exits non-zero if any target crashes, fails an assertion, times out
# or leaks; the crashing input is left in ws/fuzz/artifacts/<target>/.
#
#   ws/fuzz/smoke.sh [SECONDS]
#
# Environment:
#   CARGO_TARGET_DIR   build directory (default: ws/fuzz/target)
#   FUZZ_TARGETS       space-separated subset of targets (default: all)
#   FUZZ_SANITIZER     address (default) or none (faster, for long runs of safe code)
#   FUZZ_ARGS          extra libFuzzer flags, e.g. "-max_len=8192"
#
# Works on stable Rust: cargo-fuzz needs nightly-only rustc flags, which RUSTC_BOOTSTRAP=1
# unlocks on a stable toolchain.
set -euo pipefail

secs="${1:-20}"
case "$secs" in '' | *[!0-9]*) echo "usage: $0 [SECONDS]" >&2; exit 2 ;; esac

fuzz_dir="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
crate_dir="$(dirname "$fuzz_dir")"
targets="${FUZZ_TARGETS:-handshake frames unmask}"
sanitizer="${FUZZ_SANITIZER:-address}"
target_dir="${CARGO_TARGET_DIR:-$fuzz_dir/target}"
export RUSTC_BOOTSTRAP="${RUSTC_BOOTSTRAP:-1}"

if ! cargo fuzz --version >/dev/null 2>&1; then
    echo "== installing cargo-fuzz"
    cargo install cargo-fuzz --locked
fi

cd "$crate_dir"
fuzz=(cargo fuzz)
build_flags=(--sanitizer "$sanitizer" --target-dir "$target_dir")

echo "== building fuzz targets ($(cargo fuzz --version), $(rustc --version), sanitizer $sanitizer)"
t0=$SECONDS
"${fuzz[@]}" build "${build_flags[@]}"
echo "== built in $((SECONDS - t0)) s"

work="$(mktemp -d "${TMPDIR:-/tmp}/vncgate-fuzz.XXXXXX")"
trap 'rm -rf "$work"' EXIT

failed=()
summary=()
for t in $targets; do
    mkdir -p "$work/$t/corpus" "$fuzz_dir/artifacts/$t"
    cp "$fuzz_dir/corpus/$t/"seed-* "$work/$t/corpus/"
    log="$work/$t/log"
    echo "== fuzzing $t for ${secs} s ($(ls "$work/$t/corpus" | wc -l) seeds)"
    rc=0
    # shellcheck disable=SC2086 # FUZZ_ARGS is a list of flags
    "${fuzz[@]}" run "${build_flags[@]}" "$t" "$work/$t/corpus" -- \
        -max_total_time="$secs" -timeout=10 -rss_limit_mb=2048 -max_len=4096 \
        -print_final_stats=1 -artifact_prefix="$fuzz_dir/artifacts/$t/" ${FUZZ_ARGS:-} \
        >"$log" 2>&1 || rc=$?
    # The INITED line, the periodic pulses, the final DONE line and the final stats.
    grep -E '^#[0-9]+\s+(INITED|DONE|pulse)|^stat::|^Done [0-9]+ runs' "$log" || true
    done_line="$(grep -E '^#[0-9]+\s+DONE' "$log" | tail -n 1 || true)"
    if [ "$rc" -ne 0 ]; then
        echo "!! $t FAILED (exit $rc); log tail:"
        tail -n 60 "$log"
        failed+=("$t")
        summary+=("$t: FAILED (exit $rc)")
    else
        summary+=("$t: ok  ${done_line:-no DONE line}")
    fi
done

echo "== summary (${secs} s per target)"
printf '  %s\n' "${summary[@]}"
if [ "${#failed[@]}" -ne 0 ]; then
    echo "== crashes in: ${failed[*]} (inputs in $fuzz_dir/artifacts/)" >&2
    exit 1
fi
