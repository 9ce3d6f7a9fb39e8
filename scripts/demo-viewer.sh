#!/usr/bin/env bash
# Serves a noVNC page for the demo on http://127.0.0.1:${VIEWER_PORT:-8000}/.
# Usage: scripts/demo-viewer.sh [ws://127.0.0.1:8080/vnc/demo]
set -euo pipefail
here=$(cd "$(dirname "$0")/.." && pwd)
url=${1:-ws://127.0.0.1:8080/vnc/demo}
port=${VIEWER_PORT:-8000}
dir="$here/target/novnc-viewer"
mkdir -p "$dir"
if [ ! -f "$dir/node_modules/@novnc/novnc/core/rfb.js" ]; then
  (cd "$dir" && npm install --no-audit --no-fund --silent @novnc/novnc@1.7.0)
fi
cp "$here/config/demo/viewer.html" "$dir/index.html"
enc=$(python3 -c 'import sys,urllib.parse;print(urllib.parse.quote(sys.argv[1],safe=""))' "$url")
echo "open http://127.0.0.1:$port/?url=$enc"
cd "$dir" && exec python3 -m http.server "$port" --bind 127.0.0.1
