#!/usr/bin/env bash
# Build the little.cloud guest kernel (uncompressed ELF vmlinux) from
# Debian's linux-source-6.1, cached by a key over everything that shapes it.
#
# usage: guest-kernel/build.sh [--profile default|nested|auto] [--print-path]
#
#   --profile   default: clean kernel for hardware KVM.
#               nested:  adds patches/nested/*.patch and config/nested.config
#                        for nested KVM hosts that emulate guest kernel mode
#                        (module kvm_pvm); see README.md.
#               auto (default): nested if /sys/module/kvm_pvm exists, else
#                        default. LITTLE_KERNEL_PROFILE overrides.
#   --print-path  print only the vmlinux path on stdout (building if needed).
#
# Cache: ${LITTLE_KERNEL_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/little-cloud/kernel}
#   <profile>-<key16>/vmlinux, config   finished builds (never modified)
#   tree-<profile>/                     extracted, patched source kept for
#                                       incremental rebuilds
#   build-<profile>.log                 output of the last configure + make
# Repo: target/guest-kernel/vmlinux -> cached vmlinux, target/guest-kernel/profile.
set -euo pipefail

SCRIPT_DIR=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
REPO_ROOT=$(cd "$SCRIPT_DIR/.." && pwd)
SRC_PKG=linux-source-6.1
SRC_TARBALL=/usr/src/linux-source-6.1.tar.xz
SRC_DIRNAME=linux-source-6.1
BUILD_PKGS=(linux-source-6.1 bc flex bison libelf-dev libssl-dev)

log() { printf 'guest-kernel: %s\n' "$*" >&2; }
die() { log "error: $*"; exit 1; }

usage() {
	sed -n '5,15p' "${BASH_SOURCE[0]}" | sed 's/^# \{0,1\}//' >&2
	exit "${1:-2}"
}

profile=${LITTLE_KERNEL_PROFILE:-}
print_path=0
while [[ $# -gt 0 ]]; do
	case $1 in
	--profile)
		[[ $# -ge 2 ]] || usage
		# LITTLE_KERNEL_PROFILE overrides the auto choice, not an explicit one.
		profile=$2
		shift 2
		;;
	--profile=*) profile=${1#--profile=}; shift ;;
	--print-path) print_path=1; shift ;;
	-h | --help) usage 0 ;;
	*) log "unknown argument: $1"; usage ;;
	esac
done
profile=${profile:-auto}
if [[ $profile == auto ]]; then
	profile=${LITTLE_KERNEL_PROFILE:-}
	if [[ -z $profile || $profile == auto ]]; then
		if [[ -e /sys/module/kvm_pvm ]]; then profile=nested; else profile=default; fi
	fi
fi
case $profile in
default | nested) ;;
*) die "unknown profile '$profile' (default, nested or auto)" ;;
esac

# --- Build dependencies -------------------------------------------------
missing=()
for pkg in "${BUILD_PKGS[@]}"; do
	if ! dpkg-query -W -f='${Status}' "$pkg" 2>/dev/null | grep -q 'install ok installed'; then
		missing+=("$pkg")
	fi
done
for tool in make gcc patch sha256sum flock; do
	command -v "$tool" >/dev/null || die "'$tool' is required"
done
if [[ ${#missing[@]} -gt 0 ]]; then
	log "installing ${missing[*]}"
	sudo=()
	[[ $(id -u) -eq 0 ]] || sudo=(sudo)
	"${sudo[@]}" apt-get update >&2
	"${sudo[@]}" env DEBIAN_FRONTEND=noninteractive apt-get install -y "${missing[@]}" >&2
fi
[[ -f $SRC_TARBALL ]] || die "$SRC_TARBALL not found after installing $SRC_PKG"
src_version=$(dpkg-query -W -f='${Version}' "$SRC_PKG")

# --- Inputs and cache key -----------------------------------------------
fragments=("$SCRIPT_DIR/config/base.config")
patches=()
shopt -s nullglob
patches+=("$SCRIPT_DIR"/patches/common/*.patch)
if [[ $profile == nested ]]; then
	fragments+=("$SCRIPT_DIR/config/nested.config")
	patches+=("$SCRIPT_DIR"/patches/nested/*.patch)
fi
shopt -u nullglob

# Hash names relative to the repo (so the key does not depend on where the
# repo is checked out) followed by contents.
hash_files() {
	local f
	for f in "$@"; do
		printf '== %s\n' "${f#"$REPO_ROOT"/}"
		cat "$f"
	done
}
key=$({
	printf 'profile=%s\nsource=%s %s\n' "$profile" "$SRC_PKG" "$src_version"
	hash_files "${fragments[@]}" ${patches[@]+"${patches[@]}"} "${BASH_SOURCE[0]}"
} | sha256sum | cut -c1-16)
patch_key=$( { printf 'source=%s\n' "$src_version"; hash_files ${patches[@]+"${patches[@]}"}; } | sha256sum | cut -c1-16)

cache=${LITTLE_KERNEL_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/little-cloud/kernel}
out_dir=$cache/$profile-$key
vmlinux=$out_dir/vmlinux
tree_root=$cache/tree-$profile
tree=$tree_root/$SRC_DIRNAME
build_log=$cache/build-$profile.log
mkdir -p "$cache"

link_into_repo() {
	local dir=$REPO_ROOT/target/guest-kernel
	mkdir -p "$dir"
	ln -sfn "$vmlinux" "$dir/.vmlinux.tmp.$$"
	mv -Tf "$dir/.vmlinux.tmp.$$" "$dir/vmlinux"
	printf '%s\n' "$profile" >"$dir/.profile.tmp.$$"
	mv -f "$dir/.profile.tmp.$$" "$dir/profile"
}

finish() {
	link_into_repo
	if [[ $print_path -eq 1 ]]; then
		printf '%s\n' "$vmlinux"
	else
		log "$profile kernel: $vmlinux ($(du -h "$vmlinux" | cut -f1))"
	fi
	exit 0
}

[[ -f $vmlinux ]] && finish

# One build per profile at a time (tests may start several builds at once).
exec 9>"$cache/.lock-$profile"
flock 9
[[ -f $vmlinux ]] && finish

# --- Source tree: extract once, keep for incremental builds ---------------
# The patches applied to the tree are copied into it, so a changed patch set
# can be reverted (patch -R) instead of re-extracting and rebuilding all.
applied=$tree/.little-cloud-patches
fresh_tree() {
	log "extracting $SRC_TARBALL into $tree_root"
	rm -rf "$tree_root"
	mkdir -p "$tree_root"
	tar -xf "$SRC_TARBALL" -C "$tree_root"
	[[ -d $tree ]] || die "$SRC_TARBALL did not contain $SRC_DIRNAME/"
	mkdir -p "$applied"
}
revert_patches() {
	local p
	# shellcheck disable=SC2012 # names are ours: NNNN-name.patch
	for p in $(ls -r "$applied"); do
		patch -p1 -R -s -d "$tree" <"$applied/$p" >>"$build_log" 2>&1 || return 1
		rm -f "$applied/$p"
	done
	rm -f "$applied/.key"
}

: >"$build_log"
if [[ ! -d $applied ]]; then
	fresh_tree
elif [[ $(cat "$applied/.key" 2>/dev/null || true) != "$patch_key" ]]; then
	log "patch set changed, reverting the old one"
	revert_patches || fresh_tree
fi
if [[ ! -f $applied/.key ]]; then
	n=0
	for p in ${patches[@]+"${patches[@]}"}; do
		n=$((n + 1))
		log "applying ${p#"$SCRIPT_DIR"/}"
		if ! patch -p1 -s -N -d "$tree" <"$p" >>"$build_log" 2>&1; then
			tail -n 20 "$build_log" >&2
			rm -rf "$tree_root"
			die "patch ${p#"$SCRIPT_DIR"/} does not apply to $SRC_PKG $src_version"
		fi
		cp "$p" "$applied/$(printf '%04d' "$n")-$(basename "$p")"
	done
	printf '%s\n' "$patch_key" >"$applied/.key"
fi

# --- Configure ------------------------------------------------------------
run_make() {
	if ! make -C "$tree" "$@" >>"$build_log" 2>&1; then
		log "make $* failed; last lines of $build_log:"
		tail -n 40 "$build_log" >&2
		exit 1
	fi
}

log "configuring ($profile): tinyconfig + ${fragments[*]##*/}"
run_make tinyconfig
if ! (cd "$tree" && scripts/kconfig/merge_config.sh -m .config "${fragments[@]}") >>"$build_log" 2>&1; then
	tail -n 20 "$build_log" >&2
	die "merge_config.sh failed"
fi
run_make olddefconfig

# Every line requested by the fragments must be in the final .config; a later
# fragment overrides an earlier one. `# CONFIG_X is not set` is also met when
# CONFIG_X is absent (its dependencies are off).
lost=$(awk '
	FNR == NR {
		if (match($0, /^CONFIG_[A-Za-z0-9_]+=/)) {
			sym = substr($0, 1, RLENGTH - 1); want[sym] = $0
		} else if (match($0, /^# CONFIG_[A-Za-z0-9_]+ is not set$/)) {
			sym = $2; want[sym] = "n"
		}
		next
	}
	/^CONFIG_[A-Za-z0-9_]+=/ { eq = index($0, "="); have[substr($0, 1, eq - 1)] = $0 }
	END {
		for (sym in want) {
			if (want[sym] == "n") {
				if (sym in have && have[sym] !~ /=n$/) print "  " sym " is not set (got " have[sym] ")"
			} else if (have[sym] != want[sym]) {
				got = (sym in have) ? have[sym] : "unset"
				print "  " want[sym] " (got " got ")"
			}
		}
	}' <(cat "${fragments[@]}") "$tree/.config" | sort)
if [[ -n $lost ]]; then
	log "these requested options did not survive olddefconfig (missing dependency?):"
	printf '%s\n' "$lost" >&2
	exit 1
fi

# --- Build ---------------------------------------------------------------
log "building vmlinux with $(nproc) jobs (log: $build_log)"
start=$SECONDS
run_make -j"$(nproc)" vmlinux
log "built in $((SECONDS - start)) s"

tmp_dir=$cache/.tmp-$profile-$key.$$
rm -rf "$tmp_dir"
mkdir -p "$tmp_dir"
cp "$tree/vmlinux" "$tmp_dir/vmlinux"
cp "$tree/.config" "$tmp_dir/config"
if ! mv -T "$tmp_dir" "$out_dir" 2>/dev/null; then
	rm -rf "$tmp_dir" # someone else finished the same key first
fi
[[ -f $vmlinux ]] || die "$vmlinux missing after build"
finish
