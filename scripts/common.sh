# Shared by the scripts in this folder: repository paths and package setup.
set -euo pipefail
REPO=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
TARGET=${CARGO_TARGET_DIR:-$REPO/target}
export CARGO_TERM_COLOR=${CARGO_TERM_COLOR:-never}

SUDO=""
[ "$(id -u)" -eq 0 ] || SUDO=sudo

# Debian packages little.cloud needs at build and test time.
PACKAGES=(busybox-static curl build-essential bc flex bison libelf-dev libssl-dev cpio linux-source-6.1 erofs-utils e2fsprogs mmdebstrap umoci skopeo docker-registry redis-tools postgresql-client postgresql-contrib openssl apache2-utils)

install_packages() {
	local missing=()
	for p in "${PACKAGES[@]}"; do
		dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
	done
	if [ ${#missing[@]} -gt 0 ]; then
		echo "setup: installing ${missing[*]}" >&2
		$SUDO apt-get update -qq
		DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq "${missing[@]}" >/dev/null
	fi
}

check_kvm() {
	if [ ! -e /dev/kvm ]; then
		echo "setup: /dev/kvm is missing: little.cloud needs KVM (bare metal, or nested virtualization enabled)" >&2
		exit 1
	fi
	if [ ! -r /dev/kvm ] || [ ! -w /dev/kvm ]; then
		echo "setup: no read/write access to /dev/kvm: run as root or join the 'kvm' group" >&2
		exit 1
	fi
}
