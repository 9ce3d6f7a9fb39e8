#!/usr/bin/env bash
# Builds vncgate's golden VM image into DIR, then has the controller boot it, verify it and
# save the migration snapshot (`vncgate-controller golden snapshot DIR`).
#
#   config/golden/build.sh [--image-only] [--disable-vnc] DIR
#
# Phases: base (debootstrap + packages, cached as a tarball), layer (agent, units, config;
# redone every build), disk (ext4 -> rootfs.qcow2), manifest (golden.json), snapshot.
# See config/golden/README.md.
set -euo pipefail

here=$(cd "$(dirname "$0")" && pwd)
repo=$(cd "$here/../.." && pwd)

usage() {
	echo "usage: $0 [--image-only] [--disable-vnc] DIR" >&2
	exit 2
}

image_only=0
disable_vnc=0
dir=
while [ $# -gt 0 ]; do
	case "$1" in
	--image-only) image_only=1 ;;
	--disable-vnc) disable_vnc=1 ;;
	-h | --help) usage ;;
	-*) echo "build.sh: unknown option $1" >&2; usage ;;
	*) [ -z "$dir" ] || usage; dir=$1 ;;
	esac
	shift
done
[ -n "$dir" ] || usage

die() {
	echo "build.sh: error: $*" >&2
	exit 1
}

suite=bookworm
mirror=${VNCGATE_DEBIAN_MIRROR:-http://deb.debian.org/debian}
cache=${VNCGATE_GOLDEN_CACHE:-/var/cache/vncgate/golden}
agent=${VNCGATE_AGENT:-$repo/target/release/vncgate-agent}
controller=${VNCGATE_CONTROLLER:-$repo/target/release/vncgate-controller}
# The guest's disk. Sparse: the qcow2 holds only what is written.
disk_mib=2048
memory_mib=512
vcpus=1

[ "$(id -u)" = 0 ] || die "must run as root (debootstrap, chroot and mkfs -d need it)"
need() {
	local t
	for t in "$@"; do
		command -v "$t" >/dev/null 2>&1 || die "missing tool '$t' (apt-get install ${pkg_of[$t]:-$t})"
	done
}
declare -A pkg_of=([debootstrap]=debootstrap [qemu-img]=qemu-utils [mkfs.ext4]=e2fsprogs
	[zstd]=zstd [sha256sum]=coreutils [strip]=binutils [chroot]=coreutils [tar]=tar
	[systemctl]=systemd [awk]=mawk [od]=coreutils [truncate]=coreutils)
need debootstrap qemu-img mkfs.ext4 zstd sha256sum strip chroot tar systemctl awk od truncate

phase_start=0
phase() {
	phase_name=$1
	phase_start=$(date +%s.%N)
	echo "==> $phase_name" >&2
}
phase_done() {
	awk -v n="$phase_name" -v a="$(date +%s.%N)" -v b="$phase_start" \
		'BEGIN { printf "==> %s done in %.1f s\n", n, a - b }' >&2
}

mkdir -p "$dir"
dir=$(cd "$dir" && pwd)
work=$(mktemp -d "$dir/.build.XXXXXX")
cleanup() {
	# A failed debootstrap can leave its /proc and /sys mounted in the chroot.
	local m
	for m in $(awk -v w="$work" 'index($2, w) == 1 { print $2 }' /proc/mounts | sort -r); do
		umount -l "$m" 2>/dev/null || true
	done
	rm -rf "$work"
}
trap cleanup EXIT

root=$work/root

# --- base: debootstrap + packages --------------------------------------------------------
# Everything here depends only on packages.txt, initramfs/ and this function's text, which
# together are the cache key; what changes per build (agent, units) is in layer_image.
build_base() {
	local root=$1
	mkdir -p "$root/etc/dpkg/dpkg.cfg.d" "$root/etc/initramfs-tools"
	# Placed before debootstrap so dpkg never unpacks docs and the kernel's postinst builds
	# the small initrd directly (neither file belongs to a package).
	cat >"$root/etc/dpkg/dpkg.cfg.d/01-vncgate-nodoc" <<-'EOF'
		path-exclude=/usr/share/doc/*
		path-include=/usr/share/doc/*/copyright
		path-exclude=/usr/share/man/*
		path-exclude=/usr/share/info/*
		path-exclude=/usr/share/locale/*
		path-exclude=/usr/share/lintian/*
	EOF
	cp -r "$here/initramfs/conf.d" "$here/initramfs/hooks" "$root/etc/initramfs-tools/"
	local pkgs
	pkgs=$(grep -v '^\s*#' "$here/packages.txt" | xargs | tr ' ' ,)
	debootstrap --variant=minbase --include="$pkgs" --components=main \
		"$suite" "$root" "$mirror" >"$work/debootstrap.log" 2>&1 || {
		tail -n 40 "$work/debootstrap.log" >&2
		[ -f "$root/debootstrap/debootstrap.log" ] && tail -n 40 "$root/debootstrap/debootstrap.log" >&2
		die "debootstrap failed (log above)"
	}
	chroot "$root" apt-get clean
	rm -rf "$root"/var/lib/apt/lists/* "$root"/var/cache/apt/*.bin "$root"/var/log/*.log \
		"$root"/var/log/apt/* "$root"/usr/share/man/* "$root"/usr/share/info/* \
		"$root"/usr/share/locale/*
	find "$root/usr/share/doc" -mindepth 1 -not -name copyright -not -type d -delete
	ls "$root"/boot/vmlinuz-* >/dev/null 2>&1 || die "no kernel in the base"
	ls "$root"/boot/initrd.img-* >/dev/null 2>&1 || die "no initrd in the base"
}

base_key=$( {
	echo "$suite $mirror"
	cat "$here/packages.txt"
	(cd "$here" && find initramfs -type f | LC_ALL=C sort | xargs sha256sum)
	declare -f build_base
} | sha256sum | cut -c1-16)
base_tar=$cache/base-$base_key.tar.zst

phase base
mkdir -p "$root"
if [ -f "$base_tar" ]; then
	echo "    cached: $base_tar" >&2
else
	echo "    no $base_tar: running debootstrap ($suite, $mirror)" >&2
	build_base "$root"
	mkdir -p "$cache"
	# Written aside and renamed: a concurrent build never reads a half-written tarball.
	tar -C "$root" --numeric-owner --xattrs -cf - . | zstd -q -T0 -3 -o "$base_tar.$$.tmp"
	mv "$base_tar.$$.tmp" "$base_tar"
	rm -rf "$root"
	mkdir -p "$root"
fi
zstd -q -dc "$base_tar" | tar -C "$root" --numeric-owner --xattrs -xf -
phase_done

# --- layer: agent, units, config ---------------------------------------------------------
phase layer
if [ ! -x "$agent" ]; then
	[ -z "${VNCGATE_AGENT:-}" ] || die "VNCGATE_AGENT=$agent is not an executable"
	need cargo
	echo "    building $agent" >&2
	(cd "$repo" && cargo build --release -p vncgate-controller --bin vncgate-agent) ||
		die "cargo build of vncgate-agent failed"
fi
# The release profile keeps debug info (70 MB); the guest needs none of it.
strip -o "$root/usr/local/bin/vncgate-agent" "$agent"
chmod 755 "$root/usr/local/bin/vncgate-agent"
cp -rT "$here/rootfs" "$root"
chown -R 0:0 "$root/etc/systemd" "$root/etc/tmpfiles.d" "$root/usr/lib/systemd/system"/vncgate-*
# Test and diagnosis hook: a tree copied over the image last (e.g. a unit drop-in).
extra=${VNCGATE_GOLDEN_EXTRA_ROOTFS:-}
if [ -n "$extra" ]; then
	[ -d "$extra" ] || die "VNCGATE_GOLDEN_EXTRA_ROOTFS=$extra is not a directory"
	echo "    layering $extra" >&2
	cp -rT "$extra" "$root"
fi
# The user the desktop (Xvnc, xterm and later the browser) runs as.
chroot "$root" useradd --uid 1000 --user-group --create-home --shell /bin/bash vncgate
# A fixed machine id: an empty one makes systemd treat every boot as a first boot (preset-all,
# firstboot). Clones restored from the snapshot share it either way.
od -An -tx1 -N16 /dev/urandom | tr -d ' \n' >"$root/etc/machine-id"
echo >>"$root/etc/machine-id"
systemctl --root="$root" enable --quiet vncgate-vnc.service vncgate-desktop.service \
	vncgate-agent.service systemd-networkd.service ||
	die "systemctl enable of the vncgate units failed"
# Nothing logs in (root is locked) and nothing here uses D-Bus, timers or fsck: masking
# them shortens the boot and keeps the guest idle between sessions.
systemctl --root="$root" mask getty.target systemd-logind.service apt-daily.timer \
	apt-daily-upgrade.timer e2scrub_all.timer e2scrub_reap.service fstrim.timer \
	systemd-networkd-wait-online.service systemd-pstore.service 2>/dev/null ||
	die "systemctl mask of the unneeded units failed"
if [ "$disable_vnc" = 1 ]; then
	echo "    --disable-vnc: masking vncgate-vnc.service" >&2
	systemctl --root="$root" disable --quiet vncgate-vnc.service || die "systemctl disable vncgate-vnc failed"
	systemctl --root="$root" mask --quiet vncgate-vnc.service || die "systemctl mask vncgate-vnc failed"
fi
kver=$(basename "$(ls "$root"/boot/vmlinuz-* | sort -V | tail -n 1)" | sed 's/^vmlinuz-//')
cp "$root/boot/vmlinuz-$kver" "$work/vmlinuz"
cp "$root/boot/initrd.img-$kver" "$work/initrd.img"
# The kernel boots from DIR, not from the disk.
rm -f "$root"/boot/vmlinuz-* "$root"/boot/initrd.img-* "$root"/boot/System.map-* \
	"$root"/vmlinuz* "$root"/initrd.img*
phase_done

# --- disk: ext4 -> qcow2 -----------------------------------------------------------------
phase disk
truncate -s "${disk_mib}M" "$work/rootfs.raw"
# Inode tables and journal are zeroed now (lazy_*_init=0) so the guest never runs
# ext4lazyinit, which would write to every VM's overlay and take CPU during boot.
mkfs.ext4 -q -F -L vncgate-root -m 0 -J size=32 -E lazy_itable_init=0,lazy_journal_init=0,root_owner=0:0 \
	-d "$root" "$work/rootfs.raw" || die "mkfs.ext4 -d failed"
qemu-img convert -f raw -O qcow2 "$work/rootfs.raw" "$work/rootfs.qcow2"
rm -f "$work/rootfs.raw"
phase_done

# --- manifest ----------------------------------------------------------------------------
phase manifest
# microvm hangs in TSC calibration about half the time without this. Under TCG the guest's
# TSC is the host's (QEMU reads it with rdtsc), so the host's frequency is the right value.
tsc_khz=${VNCGATE_TSC_KHZ:-}
if [ -z "$tsc_khz" ]; then
	mhz=$(dmesg 2>/dev/null | sed -n 's/.*tsc: Refined TSC clocksource calibration: \([0-9.]*\) MHz.*/\1/p' | tail -n 1)
	[ -n "$mhz" ] || mhz=$(dmesg 2>/dev/null | sed -n 's/.*tsc: Detected \([0-9.]*\) MHz.*/\1/p' | tail -n 1)
	[ -n "$mhz" ] || mhz=$(awk -F: '/^cpu MHz/ { gsub(/ /, "", $2); print $2; exit }' /proc/cpuinfo)
	[ -n "$mhz" ] || die "cannot read the host's TSC frequency; set VNCGATE_TSC_KHZ"
	tsc_khz=$(awk -v m="$mhz" 'BEGIN { printf "%d", m * 1000 }')
fi
cmdline="console=ttyS0 root=/dev/vda rw rootfstype=ext4 quiet systemd.show_status=0 fsck.mode=skip"
cmdline+=" tsc_early_khz=$tsc_khz net.ifnames=0 pci=off mitigations=off random.trust_cpu=on panic=-1"
recipe_sha=$( {
	cat "$0" "$here/packages.txt"
	(cd "$here" && find initramfs rootfs -type f | LC_ALL=C sort | xargs sha256sum)
	[ -z "$extra" ] || (cd "$extra" && find . -type f | LC_ALL=C sort | xargs -r sha256sum)
	sha256sum <"$root/usr/local/bin/vncgate-agent"
	echo "disable_vnc=$disable_vnc cmdline=$cmdline"
} | sha256sum | cut -d' ' -f1)
vnc_enabled=$([ "$disable_vnc" = 1 ] && echo false || echo true)
mv "$work/vmlinuz" "$work/initrd.img" "$work/rootfs.qcow2" "$dir/"
cat >"$dir/golden.json.tmp" <<EOF
{
  "version": 1,
  "kernel": "vmlinuz",
  "initrd": "initrd.img",
  "rootfs": "rootfs.qcow2",
  "cmdline": "$cmdline",
  "machine": "microvm",
  "memory_mib": $memory_mib,
  "vcpus": $vcpus,
  "vnc_port": 6080,
  "agent_port": 8080,
  "built_at": "$(date -u +%Y-%m-%dT%H:%M:%SZ)",
  "recipe_sha256": "$recipe_sha",
  "kernel_version": "$kver",
  "services": {"vnc": $vnc_enabled}
}
EOF
mv "$dir/golden.json.tmp" "$dir/golden.json"
echo "    $dir: $(du -sh --apparent-size "$dir/rootfs.qcow2" | cut -f1) rootfs.qcow2," \
	"kernel $kver, initrd $(du -h "$dir/initrd.img" | cut -f1)" >&2
phase_done

if [ "$image_only" = 1 ]; then
	echo "==> --image-only: not taking the snapshot" >&2
	exit 0
fi

# --- snapshot ----------------------------------------------------------------------------
phase snapshot
[ -x "$controller" ] || die "no controller at $controller (build it, set VNCGATE_CONTROLLER, or pass --image-only)"
"$controller" golden snapshot "$dir"
phase_done
