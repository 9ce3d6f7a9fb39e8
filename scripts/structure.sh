#!/usr/bin/env bash
# The dependency rules of ARCHITECTURE.md, checked on the real dependency graph:
#   - the protocol crates (vncgate-ws, vncgate-rfb) link no Redis client, no runtime, no
#     application crate;
#   - the shipped gateway (vncgate) links no load-test code: no vncgate-loadtest, no WebSocket
#     client, no progress bars, no DES, no bundled web roots.
# Exits 1 naming the crate that broke a rule and the path that pulls it in.
set -euo pipefail
cd "$(dirname "$0")/.."

fail=0
deny() {
  local pkg=$1
  shift
  local tree found=0
  tree=$(cargo tree -q -p "$pkg" -e normal --prefix none --no-dedupe | awk '{print $1}' | sort -u)
  for bad in "$@"; do
    if grep -qx "$bad" <<<"$tree"; then
      echo "structure: $pkg depends on $bad:" >&2
      cargo tree -q -p "$pkg" -e normal -i "$bad" >&2 || true
      fail=1
      found=1
    fi
  done
  [ "$found" = 1 ] || echo "structure: $pkg: none of $* ($(wc -l <<<"$tree") crates)"
}

deny vncgate-ws redis tokio monoio vncgate-schema vncgate thiserror
deny vncgate-rfb redis tokio monoio vncgate-schema vncgate
deny vncgate vncgate-loadtest tokio-tungstenite tungstenite indicatif des webpki-roots

# The WebSocket core's direct dependencies are exactly these three.
direct=$(cargo tree -q -p vncgate-ws -e normal --depth 1 --prefix none | awk 'NR > 1 {print $1}' | sort -u | tr '\n' ' ')
if [ "$direct" != "base64 httparse sha1 " ]; then
  echo "structure: vncgate-ws depends directly on: $direct(want base64 httparse sha1)" >&2
  fail=1
fi
exit "$fail"
