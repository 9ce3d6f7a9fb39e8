#!/usr/bin/env bash
# Cold-boots a golden image with the QEMU device layout the controller's backend uses, on free
# host ports in a fresh temp dir, and waits until the guest really answers: an RFB banner on
# the VNC port and any HTTP response from the agent.
#
#   config/golden/boot.sh [--keep] [--timeout SECONDS] [--append ARGS] DIR
#
# Prints key=value lines (ports, seconds to each port, RSS of QEMU). Without --keep QEMU is
# killed (by pid) and the temp dir removed at the end; with --keep both stay and the pid and
# dir are printed. On failure QEMU is killed either way and the tail of the guest console is
# shown. --append adds kernel arguments for diagnosis, e.g.
# `--append systemd.journald.forward_to_console=1` puts the guest's journal on the console.
set -euo pipefail

keep=0
timeout=120
extra_append=
dir=
while [ $# -gt 0 ]; do
	case "$1" in
	--keep) keep=1 ;;
	--timeout) timeout=$2; shift ;;
	--append) extra_append=$2; shift ;;
	-*) echo "usage: $0 [--keep] [--timeout SECONDS] [--append ARGS] DIR" >&2; exit 2 ;;
	*) dir=$1 ;;
	esac
	shift
done
[ -n "$dir" ] || { echo "usage: $0 [--keep] [--timeout SECONDS] [--append ARGS] DIR" >&2; exit 2; }
dir=$(cd "$dir" && pwd)
# The system python: a pyenv shim costs 150 ms of a core per call, taken from the guest.
py=/usr/bin/python3
[ -x "$py" ] || py=$(command -v python3 || true)
[ -n "$py" ] || { echo "boot.sh: missing tool 'python3'" >&2; exit 1; }
for t in qemu-system-x86_64 qemu-img curl; do
	command -v "$t" >/dev/null || { echo "boot.sh: missing tool '$t'" >&2; exit 1; }
done
[ -f "$dir/golden.json" ] || { echo "boot.sh: no $dir/golden.json" >&2; exit 1; }

field() { "$py" -c 'import json,sys; v=json.load(open(sys.argv[1]))[sys.argv[2]]; print("" if v is None else v)' "$dir/golden.json" "$1"; }
kernel=$dir/$(field kernel)
initrd=$(field initrd)
rootfs=$dir/$(field rootfs)
cmdline=$(field cmdline)
[ -z "$extra_append" ] || cmdline+=" $extra_append"
machine=$(field machine)
mem=$(field memory_mib)
vcpus=$(field vcpus)
[ "$machine" = microvm ] || { echo "boot.sh: only the microvm layout is scripted here (golden.json says $machine)" >&2; exit 1; }

tmp=$(mktemp -d /tmp/vncgate-boot.XXXXXX)
read -r vnc_port agent_port < <("$py" -c '
import socket
s = [socket.socket() for _ in range(2)]
for x in s: x.bind(("127.0.0.1", 0))
print(*[x.getsockname()[1] for x in s])')
qemu-img create -q -f qcow2 -F qcow2 -b "$rootfs" "$tmp/overlay.qcow2"

initrd_args=()
[ -z "$initrd" ] || initrd_args=(-initrd "$dir/$initrd")
qemu_pid=
cleanup() {
	if [ "$keep" = 0 ]; then
		[ -z "$qemu_pid" ] || kill "$qemu_pid" 2>/dev/null || true
		[ -z "$qemu_pid" ] || wait "$qemu_pid" 2>/dev/null || true
		rm -rf "$tmp"
	fi
}
trap cleanup EXIT

start=$(date +%s.%N)
qemu-system-x86_64 -M microvm,x-option-roms=off,rtc=on,isa-serial=on -accel "${VNCGATE_ACCEL:-tcg}" -cpu "${VNCGATE_CPU:-max}" \
	-m "$mem" -smp "$vcpus" \
	-nodefaults -no-user-config -nographic \
	-kernel "$kernel" "${initrd_args[@]}" -append "$cmdline" \
	-drive id=root,file="$tmp/overlay.qcow2",format=qcow2,if=none -device virtio-blk-device,drive=root \
	-netdev user,id=net0,hostfwd=tcp:127.0.0.1:$vnc_port-:6080,hostfwd=tcp:127.0.0.1:$agent_port-:8080 \
	-device virtio-net-device,netdev=net0 \
	-device virtio-serial-device -chardev socket,id=vmdata,path="$tmp/vm-data.sock",server=on,wait=off \
	-device virtserialport,chardev=vmdata,name=org.vncgate.vm-data \
	-device virtio-rng-device \
	-serial file:"$tmp/console.log" \
	-qmp unix:"$tmp/qmp.sock",server=on,wait=off \
	</dev/null >"$tmp/qemu.log" 2>&1 &
qemu_pid=$!

since() { awk -v a="$(date +%s.%N)" -v b="$start" 'BEGIN { printf "%.1f", a - b }'; }
# hostfwd accepts TCP before anything listens in the guest, so only the server's bytes count.
# Polled cheaply for the banner; then, once, a full handshake (version, security None,
# ClientInit), which also shows the X server behind it finished starting (TigerVNC sends the
# banner only then).
rfb_banner() { timeout 2 bash -c "exec 3<>/dev/tcp/127.0.0.1/$vnc_port; head -c 11 <&3" 2>/dev/null || true; }
rfb_probe() {
	"$py" - "$vnc_port" "$@" <<-'EOF' 2>/dev/null || true
		import socket, struct, sys
		s = socket.create_connection(("127.0.0.1", int(sys.argv[1])), timeout=2)
		def take(n):
		    b = b""
		    while len(b) < n:
		        c = s.recv(n - len(b))
		        if not c: raise EOFError
		        b += c
		    return b
		if take(12) != b"RFB 003.008\n": sys.exit(1)
		s.sendall(b"RFB 003.008\n")
		types = take(take(1)[0])
		if 1 not in types: sys.exit(1)
		s.sendall(b"\x01")
		if take(4) != b"\0\0\0\0": sys.exit(1)
		s.sendall(b"\x01")
		w, h = struct.unpack(">HH", take(4))
		take(16); take(struct.unpack(">I", take(4))[0])
		if len(sys.argv) > 2:
		    # Whether anything is drawn: one raw full update, count non-black pixels.
		    s.settimeout(10)
		    s.sendall(struct.pack(">BBHHHH", 3, 0, 0, 0, w, h))
		    lit = 0
		    while True:
		        t = take(1)[0]
		        if t == 0: break
		        if t == 2: continue  # Bell
		        sys.exit(1)
		    take(1)
		    for _ in range(struct.unpack(">H", take(2))[0]):
		        x, y, rw, rh, enc = struct.unpack(">HHHHi", take(12))
		        if enc != 0: sys.exit(1)
		        px = take(rw * rh * 4)
		        lit += sum(1 for i in range(0, len(px), 4) if px[i:i + 3] != b"\0\0\0")
		    print(lit)
		else:
		    print(f"{w}x{h}")
	EOF
}
http_code() { curl -s -o /dev/null -m 2 -w '%{http_code}' "http://127.0.0.1:$agent_port/health" 2>/dev/null || true; }

vnc_s= agent_s= agent_code= fb=
while [ -z "$vnc_s" ] || [ -z "$agent_s" ]; do
	if ! kill -0 "$qemu_pid" 2>/dev/null; then
		echo "boot.sh: QEMU exited early:" >&2
		cat "$tmp/qemu.log" >&2
		tail -n 40 "$tmp/console.log" >&2 2>/dev/null || true
		keep=0
		exit 1
	fi
	if awk -v t="$timeout" -v s="$(since)" 'BEGIN { exit !(s > t) }'; then
		echo "boot.sh: not ready after ${timeout}s (vnc: ${vnc_s:-no}, agent: ${agent_s:-no}); console tail:" >&2
		tail -n 40 "$tmp/console.log" >&2 || true
		keep=0
		exit 1
	fi
	if [ -z "$vnc_s" ] && [ "$(rfb_banner)" = "RFB 003.008" ]; then
		vnc_s=$(since)
		fb=$(rfb_probe)
		[ -n "$fb" ] || { echo "boot.sh: RFB banner but the handshake (security None) failed" >&2; keep=0; exit 1; }
	fi
	if [ -z "$agent_s" ]; then
		code=$(http_code)
		if [ -n "$code" ] && [ "$code" != 000 ]; then agent_s=$(since) agent_code=$code; fi
	fi
	sleep 0.2
done
ready_s=$(since)
# The desktop (xterm) is not on the critical path; say whether it drew, not how fast.
lit=0
for _ in $(seq 30); do
	lit=$(rfb_probe pixels)
	[ "${lit:-0}" -gt 0 ] 2>/dev/null && break
	sleep 1
done
rss_kib=$(awk '/^VmRSS/ { print $2 }' "/proc/$qemu_pid/status")
echo "vnc_port=$vnc_port"
echo "agent_port=$agent_port"
echo "vnc_ready_s=$vnc_s"
echo "vnc_framebuffer=$fb"
echo "agent_ready_s=$agent_s"
echo "agent_health_code=$agent_code"
echo "ready_s=$ready_s"
echo "desktop_lit_pixels=${lit:-0}"
echo "qemu_rss_mib=$((rss_kib / 1024))"
if [ "$keep" = 1 ]; then
	echo "qemu_pid=$qemu_pid"
	echo "tmp_dir=$tmp"
fi
