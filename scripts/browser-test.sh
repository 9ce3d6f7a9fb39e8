#!/usr/bin/env bash
# noVNC in headless Chromium through the gateway, against the synthetic desktop and a real VNC
# server (Xvnc with an xterm). Installs Debian's chromium, Xvnc, xterm, xsetroot, novnc (the
# page `vncgate websockify --web /usr/share/novnc` serves) and the npm packages if missing
# (never a downloaded browser), then runs gateway/tests/browser.
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
cd "$root"
need=()
command -v chromium >/dev/null 2>&1 || need+=(chromium)
command -v Xvnc >/dev/null 2>&1 || need+=(tigervnc-standalone-server)
command -v xterm >/dev/null 2>&1 || need+=(xterm)
command -v xsetroot >/dev/null 2>&1 || need+=(x11-xserver-utils)
# xterm's default font; only a Recommends of xterm.
dpkg -s xfonts-base >/dev/null 2>&1 || need+=(xfonts-base)
[ -f /usr/share/novnc/vnc.html ] || need+=(novnc)
if [ ${#need[@]} -gt 0 ]; then
  if [ "$(id -u)" = 0 ]; then
    apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${need[@]}" >/dev/null
  else
    echo "missing: ${need[*]} and this user cannot install them (apt-get install ${need[*]})" >&2
    exit 1
  fi
fi
target=${CARGO_TARGET_DIR:-target}
case "$target" in /*) ;; *) target="$root/$target" ;; esac
dir="$target/browser-test"
mkdir -p "$dir"
if [ ! -f "$dir/node_modules/playwright-core/package.json" ] || [ ! -f "$dir/node_modules/@novnc/novnc/core/rfb.js" ]; then
  (cd "$dir" && npm install --no-audit --no-fund --silent @novnc/novnc@1.7.0 playwright-core@1.65.1)
fi
cp config/demo/viewer.html "$dir/index.html"
# Every browser test file, each a node --test file of its own (one at a time: they share
# the two cores and start their own gateways), and harness.mjs, the helpers they import
# (copied with them, never run itself: only *.test.mjs are).
cp gateway/tests/browser/*.mjs "$dir/"
cargo build -q -p vncgate -p vncgate-loadtest -p vncgate-controller
VNCGATE_BIN="$target/debug/vncgate" DEMO_BIN="$target/debug/vncgate-loadtest" CONTROLLER_BIN="$target/debug/vncgate-controller" VIEWER_DIR="$dir" node --test --test-concurrency=1 "$dir"/*.test.mjs
