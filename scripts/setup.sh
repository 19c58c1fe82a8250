#!/usr/bin/env bash
# Installs what little.cloud needs on a Debian machine with KVM and builds
# everything: Debian packages, the guest kernel (cached), the workspace in
# release mode, the demo guest's initramfs and the OCI test images.
source "$(dirname "$0")/common.sh"
cd "$REPO"

install_packages
check_kvm
guest-kernel/build.sh >&2
cargo build --release --workspace --quiet
# Test images from Debian packages (cached; rebuilt when the script changes).
image-tools/test-images/build.sh "$TARGET/test-images" >&2
mkdir -p "$TARGET/little"
"$TARGET/release/little-initramfs" \
	--out "$TARGET/little/demo.cpio" \
	--agent "$TARGET/release/guest-agent" \
	--agent-config examples/demo/agent.conf \
	--busybox /bin/busybox
echo "setup: ready (kernel $(readlink -f "$TARGET/guest-kernel/vmlinux"))" >&2
