#!/usr/bin/env bash
# The main job: set everything up, then boot the demo microVM: the guest
# kernel with the little.cloud agent as PID 1 running the demo entrypoint.
source "$(dirname "$0")/common.sh"
"$REPO/scripts/setup.sh"
echo "demo: booting the microVM (on a nested, emulated KVM host this takes ~15 s)" >&2
exec "$TARGET/release/vmm" \
	--kernel "$TARGET/guest-kernel/vmlinux" \
	--initrd "$TARGET/little/demo.cpio" \
	--mem 128 "$@"
