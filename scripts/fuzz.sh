#!/usr/bin/env bash
# Fuzzing that runs: builds every fuzz target with libFuzzer on the pinned
# stable toolchain (no cargo-fuzz, no nightly), then runs each for SECONDS
# (default 10) on a scratch copy of its committed corpus fuzz/corpus/<target>/.
# A crash, leak, timeout or out-of-memory fails the step, naming the target
# and the input, which is kept under fuzz/artifacts/<target>/ (git-ignored).
#
#   scripts/fuzz.sh [SECONDS]
#   fuzz/target/x86_64-unknown-linux-gnu/release/<target> INPUT   # reproduce
source "$(dirname "$0")/common.sh"
SECONDS_PER_TARGET=${1:-10}
# Per input: a run over this many seconds is a timeout (a hang); a process
# over this many MiB is out of memory.
INPUT_TIMEOUT=10
RSS_LIMIT_MB=2048
HOST_TRIPLE=x86_64-unknown-linux-gnu

if ! [[ $SECONDS_PER_TARGET =~ ^[1-9][0-9]*$ ]]; then
	echo "usage: scripts/fuzz.sh [SECONDS per target]" >&2
	exit 2
fi

cd "$REPO/fuzz"
# The instrumentation libFuzzer needs, as cargo-fuzz sets it. With an explicit
# --target, RUSTFLAGS reach the target's crates but not build scripts or
# proc macros. The fuzz workspace has its own target folder: these flags
# must not invalidate the project's builds.
export RUSTFLAGS="--cfg fuzzing -Cpasses=sancov-module \
-Cllvm-args=-sanitizer-coverage-level=4 \
-Cllvm-args=-sanitizer-coverage-inline-8bit-counters \
-Cllvm-args=-sanitizer-coverage-pc-table \
-Cllvm-args=-sanitizer-coverage-trace-compares \
-Cdebug-assertions -Coverflow-checks"
export CARGO_TARGET_DIR="$REPO/fuzz/target"
BIN="$CARGO_TARGET_DIR/$HOST_TRIPLE/release"

targets=()
for source in fuzz_targets/*.rs; do
	target=$(basename "$source" .rs)
	if [ -z "$(ls -A "corpus/$target" 2>/dev/null)" ]; then
		echo "fuzz: $target has no committed corpus in fuzz/corpus/$target/" >&2
		exit 1
	fi
	targets+=("$target")
done

cargo build --locked --release --bins --target "$HOST_TRIPLE"

scratch=$(mktemp -d)
trap 'rm -rf "$scratch"' EXIT

# Runs one target on a copy of its corpus (libFuzzer adds what it finds to
# the corpus folder); its exit status lands in $scratch/<target>/rc.
run_target() {
	local target=$1 dir="$scratch/$1" rc=0
	mkdir -p "$dir/artifacts"
	cp -R "$REPO/fuzz/corpus/$target" "$dir/corpus"
	"$BIN/$target" -max_total_time="$SECONDS_PER_TARGET" \
		-timeout="$INPUT_TIMEOUT" -rss_limit_mb="$RSS_LIMIT_MB" \
		-artifact_prefix="$dir/artifacts/" -print_final_stats=1 \
		"$dir/corpus" >"$dir/log" 2>&1 || rc=$?
	echo "$rc" >"$dir/rc"
}

# One target per core at a time.
jobs_max=$(nproc)
for target in "${targets[@]}"; do
	while [ "$(jobs -rp | wc -l)" -ge "$jobs_max" ]; do
		wait -n || true
	done
	echo "fuzz: $target for ${SECONDS_PER_TARGET}s on $(ls "corpus/$target" | wc -l) inputs"
	run_target "$target" &
done
wait

failed=()
for target in "${targets[@]}"; do
	dir="$scratch/$target"
	if [ "$(cat "$dir/rc")" -eq 0 ]; then
		runs=$(sed -n 's/^stat::number_of_executed_units: *//p' "$dir/log")
		echo "fuzz: $target: ${runs:-?} runs, no failure"
		continue
	fi
	failed+=("$target")
	tail -n 40 "$dir/log" >&2
	kept="$REPO/fuzz/artifacts/$target"
	found=0
	for artifact in "$dir/artifacts"/*; do
		[ -e "$artifact" ] || continue
		mkdir -p "$kept"
		cp "$artifact" "$kept/"
		found=1
		echo "fuzz: $target failed on fuzz/artifacts/$target/$(basename "$artifact")" >&2
		echo "fuzz: reproduce: $BIN/$target fuzz/artifacts/$target/$(basename "$artifact")" >&2
	done
	if [ "$found" -eq 0 ]; then
		echo "fuzz: $target failed without leaving an input (its log is above)" >&2
	fi
done

if [ ${#failed[@]} -gt 0 ]; then
	echo "fuzz: failed: ${failed[*]}" >&2
	exit 1
fi
echo "fuzz: ${#targets[@]} targets ran ${SECONDS_PER_TARGET}s each without a failure"
