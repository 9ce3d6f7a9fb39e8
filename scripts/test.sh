#!/usr/bin/env bash
# Runs every test of the workspace, installing what the tests need first.
#   scripts/test.sh          everything: format, lints, unit + integration tests, fuzz smoke
#   FUZZ_SECONDS=0 ...       skip the fuzz smoke run
set -euo pipefail
cd "$(dirname "$0")/.."

step() { printf '\n==> %s\n' "$*"; }

step "toolchain"
cargo --version
if ! cargo nextest --version >/dev/null 2>&1; then
  cargo install cargo-nextest --locked
fi

step "redis-server (the Redis routing tests start their own, standalone, Cluster, Sentinel)"
if ! command -v redis-server >/dev/null 2>&1 || ! command -v redis-cli >/dev/null 2>&1; then
  if [ "$(id -u)" = 0 ]; then
    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq redis-server >/dev/null
  else
    sudo apt-get update -qq && sudo DEBIAN_FRONTEND=noninteractive apt-get install -y -qq redis-server >/dev/null
  fi
  # The packaged service is not needed: tests run their own servers on free ports.
  (systemctl disable --now redis-server >/dev/null 2>&1 || true)
fi
redis-server --version

step "prometheus and promtool (gateway/tests/metrics.rs runs promtool check metrics; scripts/prometheus-test.sh runs both)"
if ! command -v prometheus >/dev/null 2>&1 || ! command -v promtool >/dev/null 2>&1; then
  if [ "$(id -u)" = 0 ]; then
    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq prometheus >/dev/null
  else
    sudo apt-get update -qq && sudo DEBIAN_FRONTEND=noninteractive apt-get install -y -qq prometheus >/dev/null
  fi
  # The packaged service is not needed: the tests run their own Prometheus on a free port.
  (systemctl disable --now prometheus >/dev/null 2>&1 || true)
fi
promtool --version | head -1

step "Xvnc, xterm, xsetroot (the real-VNC-server tests: gateway/tests/real_vnc.rs, browser test)"
if ! command -v Xvnc >/dev/null 2>&1 || ! command -v xterm >/dev/null 2>&1 \
  || ! command -v xsetroot >/dev/null 2>&1 || ! dpkg -s xfonts-base >/dev/null 2>&1; then
  # xfonts-base: xterm's default font, only a Recommends of xterm.
  xpkgs="tigervnc-standalone-server xterm x11-xserver-utils xfonts-base"
  if [ "$(id -u)" = 0 ]; then
    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq $xpkgs >/dev/null
  else
    sudo apt-get update -qq && sudo DEBIAN_FRONTEND=noninteractive apt-get install -y -qq $xpkgs >/dev/null
  fi
fi
command -v Xvnc >/dev/null && command -v xterm >/dev/null && command -v xsetroot >/dev/null
Xvnc -version 2>&1 | awk 'NF && !shown { print; shown = 1 }'

step "QEMU and debootstrap (the qemu backend's tests boot real VMs from the golden image)"
if ! command -v qemu-system-x86_64 >/dev/null 2>&1 || ! command -v debootstrap >/dev/null 2>&1 \
  || ! command -v zstd >/dev/null 2>&1 || ! command -v mkfs.ext4 >/dev/null 2>&1; then
  # qemu-utils from the same release as qemu-system-x86: a newer qemu-utils (a backport)
  # breaks qemu-system-common of the release, so it is taken back to the release's.
  qpkgs="qemu-system-x86 qemu-utils/bookworm debootstrap e2fsprogs zstd binutils"
  sudo_=""; [ "$(id -u)" = 0 ] || sudo_=sudo
  $sudo_ apt-get update -qq
  $sudo_ env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends \
    --allow-downgrades $qpkgs >/dev/null
fi
qemu-system-x86_64 --version | head -1

step "Firecracker and jailer (the firecracker backend's tests run the real binary)"
scripts/firecracker-fetch.sh

step "format"
cargo fmt --all -- --check

step "clippy (its incompatible_msrv lint holds the standard library to rust-version, 1.88)"
cargo clippy --workspace --all-targets -- -D warnings

step "structure: the crates' dependency rules (ARCHITECTURE.md)"
scripts/structure.sh

step "build"
cargo build --workspace --all-targets
# The gateway on its own, without feature unification: it links vncgate-rfb without DES.
cargo build -p vncgate
cargo test -q -p vncgate-rfb --no-default-features --lib

step "golden image: config/golden/build.sh (its Debian base from the cache when there is one), then its snapshot"
# The image takes the agent just built; its snapshot is taken by the controller just built.
VNCGATE_AGENT="$PWD/target/debug/vncgate-agent" VNCGATE_CONTROLLER="$PWD/target/debug/vncgate-controller" \
  config/golden/build.sh target/golden
export VNCGATE_GOLDEN="$PWD/target/golden"

step "tests (unit and integration, io_uring and epoll)"
cargo nextest run --workspace --no-fail-fast

step "doc tests"
cargo test --workspace --doc

step "noVNC in headless Chromium through the gateway"
scripts/browser-test.sh

step "Prometheus: the rules' unit tests, and a real Prometheus scraping a real gateway"
scripts/prometheus-test.sh

step "Autobahn|Testsuite fuzzingclient, compared with the expected results"
scripts/autobahn.sh

step "instruction counts of the WebSocket core against the committed baseline (callgrind)"
bench/instructions.sh --compare bench/results/instructions-baseline.json

fuzz_seconds=${FUZZ_SECONDS:-15}
if [ "$fuzz_seconds" != "0" ] && [ -x ws/fuzz/smoke.sh ]; then
  step "fuzz smoke (${fuzz_seconds}s per target)"
  ws/fuzz/smoke.sh "$fuzz_seconds"
fi
