#!/usr/bin/env bash
# Autobahn|Testsuite fuzzingclient (cases 1-7, 9, 10) against vncgate in front of a TCP echo
# server, compared with gateway/tests/autobahn/expected.json; any difference fails.
#   scripts/autobahn.sh            run and compare
#   scripts/autobahn.sh --write    run and record the results as the new expectations
# autobahntestsuite 0.8.2 needs Python 2.7 (pyenv's 2.7.18 on these machines).
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
cd "$root"
py2=${PYTHON2:-}
for c in "$py2" "$HOME/.pyenv/versions/2.7.18/bin/python2.7" python2.7; do
  if [ -n "$c" ] && command -v "$c" >/dev/null 2>&1; then py2=$(command -v "$c"); break; fi
done
if [ -z "$py2" ]; then echo "autobahn: Python 2.7 not found (set PYTHON2)" >&2; exit 1; fi
dir="$root/target/autobahn"
site="$dir/site"
if [ ! -x "$site/bin/wstest" ]; then
  rm -rf "$site"
  "$py2" -m pip install -q --disable-pip-version-check --target "$site" autobahntestsuite==0.8.2 2>&1 | grep -v DEPRECATION || true
  # --target skips the namespace-package .pth files; make zope importable directly.
  touch "$site/zope/__init__.py"
fi
cargo build -q --release -p vncgate
port_echo=$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])')
port_gw=$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])')
run="$dir/run"
rm -rf "$run" && mkdir -p "$run"
python3 gateway/tests/autobahn/echo.py "$port_echo" > "$run/echo.log" 2>&1 &
echo_pid=$!
# Messages up to Autobahn's 16 MiB cases; one worker keeps the run deterministic.
target/release/vncgate serve --listen "127.0.0.1:$port_gw" --route "echo=127.0.0.1:$port_echo" \
  --allow-upstream 127.0.0.1 --workers 1 --max-message 20000000 > "$run/gateway.out" 2> "$run/gateway.log" &
gw_pid=$!
trap 'kill $gw_pid $echo_pid 2>/dev/null || true' EXIT
for _ in $(seq 100); do grep -q "listening on" "$run/gateway.out" && break; sleep 0.1; done
sed "s/PORT/$port_gw/" gateway/tests/autobahn/fuzzingclient.json > "$run/fuzzingclient.json"
(cd "$run" && PYTHONPATH="$site" timeout 1200 "$py2" "$site/bin/wstest" -m fuzzingclient -s fuzzingclient.json > wstest.log 2>&1) \
  || { tail -20 "$run/wstest.log"; exit 1; }
python3 gateway/tests/autobahn/compare.py "$run/reports/index.json" gateway/tests/autobahn/expected.json "$@"
