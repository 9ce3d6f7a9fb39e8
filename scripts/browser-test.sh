#!/usr/bin/env bash
# noVNC in headless Chromium through the gateway. Installs Debian's chromium and the npm
# packages if missing (never a downloaded browser), then runs gateway/tests/browser.
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
cd "$root"
if ! command -v chromium >/dev/null 2>&1; then
  if [ "$(id -u)" = 0 ]; then
    apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null
  else
    echo "chromium is missing and this user cannot install it (apt-get install chromium)" >&2
    exit 1
  fi
fi
dir="$root/target/browser-test"
mkdir -p "$dir"
if [ ! -f "$dir/node_modules/playwright-core/package.json" ] || [ ! -f "$dir/node_modules/@novnc/novnc/core/rfb.js" ]; then
  (cd "$dir" && npm install --no-audit --no-fund --silent @novnc/novnc@1.7.0 playwright-core@1.65.1)
fi
cp config/demo/viewer.html "$dir/index.html"
cp gateway/tests/browser/novnc.test.mjs "$dir/"
cargo build -q -p vncgate
VNCGATE_BIN="$root/target/debug/vncgate" VIEWER_DIR="$dir" node --test --test-concurrency=1 "$dir/novnc.test.mjs"
