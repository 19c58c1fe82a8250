#!/usr/bin/env bash
# Boot the guest kernel once under qemu microvm with a busybox initramfs and
# check that it reaches /init, prints a marker and reboots (qemu exits).
#
# usage: guest-kernel/smoke-qemu.sh [--profile P] [--smp N] [--timeout S] [--append ARGS]
#   --profile  kernel profile passed to build.sh (default: auto)
#   --smp      number of vCPUs (default 1)
#   --timeout  seconds before giving up (default 120)
#   --append   extra kernel command line arguments
# Needs qemu-system-x86 and busybox-static; /dev/kvm.
set -euo pipefail

SCRIPT_DIR=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
MARKER=LITTLE-CLOUD-SMOKE-INIT-OK

profile=auto
smp=1
timeout_s=120
extra=
while [[ $# -gt 0 ]]; do
	case $1 in
	--profile) profile=$2; shift 2 ;;
	--smp) smp=$2; shift 2 ;;
	--timeout) timeout_s=$2; shift 2 ;;
	--append) extra=$2; shift 2 ;;
	*) echo "usage: $0 [--profile P] [--smp N] [--timeout S] [--append ARGS]" >&2; exit 2 ;;
	esac
done

for tool in qemu-system-x86_64 python3; do
	command -v "$tool" >/dev/null || { echo "smoke: $tool is required" >&2; exit 1; }
done
# busybox-static installs a static /bin/busybox: the initramfs has no libc.
busybox=/bin/busybox
if ! [[ -x $busybox ]] || ldd "$busybox" >/dev/null 2>&1; then
	echo "smoke: a static $busybox is required (apt-get install busybox-static)" >&2
	exit 1
fi

vmlinux=$("$SCRIPT_DIR/build.sh" --profile "$profile" --print-path)
profile=$(cat "$SCRIPT_DIR/../target/guest-kernel/profile")

work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT

# /init: one echo (a shell builtin), one fork for uname, then reboot -f,
# which makes the kernel reset the machine (reboot=k: 0xfe to port 0x64).
# microvm has no i8042 of its own: -device i8042 adds one, and with
# -no-reboot qemu exits on that reset, as the little.cloud VMM does.
cat >"$work/init" <<EOF
#!/bin/busybox sh
echo $MARKER
/bin/busybox uname -a
/bin/busybox reboot -f
EOF

# An uncompressed newc cpio written directly, so that /dev/console exists
# (the kernel opens it before /init runs) without needing mknod rights.
python3 - "$work/initramfs.cpio" "$work/init" "$busybox" <<'EOF'
import os, sys, stat
out, init, busybox = sys.argv[1:]
ino = [100]
def entry(f, name, mode, data=b"", rdev=(0, 0)):
    ino[0] += 1
    hdr = "070701" + "".join("%08X" % v for v in (
        ino[0], mode, 0, 0, 1, 0, len(data), 0, 0, rdev[0], rdev[1], len(name) + 1, 0))
    f.write(hdr.encode() + name.encode() + b"\0")
    f.write(b"\0" * ((4 - (110 + len(name) + 1) % 4) % 4))
    f.write(data)
    f.write(b"\0" * ((4 - len(data) % 4) % 4))
with open(out, "wb") as f:
    for d in ("bin", "dev", "proc", "sys", "tmp"):
        entry(f, d, stat.S_IFDIR | 0o755)
    entry(f, "dev/console", stat.S_IFCHR | 0o600, rdev=(5, 1))
    entry(f, "init", stat.S_IFREG | 0o755, open(init, "rb").read())
    entry(f, "bin/busybox", stat.S_IFREG | 0o755, open(busybox, "rb").read())
    entry(f, "TRAILER!!!", 0)
EOF

append="console=ttyS0 reboot=k panic=-1 i8042.noaux i8042.nomux i8042.dumbkbd"
cpu=host
if [[ $profile == nested ]]; then
	# What the nested host's instruction emulator cannot run (docs/nested-kvm.md):
	# mask it in CPUID and in the kernel's view, and no hypercall PV features.
	append+=" rodata=off noxsave clearcpuid=smap,popcnt,cx16,xsave,erms,fsrm syscall_via_ud quiet"
	cpu+=",-smap,-popcnt,-cx16,-xsave,-erms,-fsrm"
	cpu+=",-kvm-pv-unhalt,-kvm-pv-ipi,-kvm-pv-sched-yield,-kvm-pv-tlb-flush"
	cpu+=",-kvm-poll-control,-kvm-asyncpf,-kvm-asyncpf-int,-kvm-steal-time"
fi
[[ -n $extra ]] && append+=" $extra"

echo "smoke: $vmlinux ($profile), smp=$smp" >&2
echo "smoke: cmdline: $append" >&2
start=$(date +%s.%N)
set +e
timeout "$timeout_s" qemu-system-x86_64 \
	-M microvm,acpi=off,x-option-roms=off,pit=on,pic=on,rtc=off \
	-enable-kvm -cpu "$cpu" -smp "$smp" -m 128 \
	-nographic -no-reboot -nodefaults -serial stdio \
	-device i8042 \
	-kernel "$vmlinux" -initrd "$work/initramfs.cpio" -append "$append" \
	</dev/null 2>&1 | while IFS= read -r line; do
	printf '[%7.2f] %s\n' "$(echo "$(date +%s.%N) - $start" | bc)" "$line"
done | tee "$work/console.log"
rc=${PIPESTATUS[0]}
set -e
total=$(echo "$(date +%s.%N) - $start" | bc)

marker_at=$(grep -m1 "] $MARKER" "$work/console.log" | sed 's/^\[ *\([0-9.]*\)\].*/\1/' || true)
if [[ -z $marker_at ]]; then
	echo "smoke: FAIL: marker not seen (qemu rc=$rc after ${total}s)" >&2
	exit 1
fi
if [[ $rc -ne 0 ]]; then
	echo "smoke: FAIL: marker at ${marker_at}s but qemu did not exit cleanly (rc=$rc, 124 = timeout)" >&2
	exit 1
fi
echo "smoke: OK: marker at ${marker_at}s, qemu exited after ${total}s" >&2
