#!/usr/bin/env bash
# Runs the README's test command several times in a row while stress-ng
# keeps one core busy: the check that no test depends on how fast this
# host is (tests wait for events, never for a figure tuned to one machine).
# Usage: scripts/test-loaded.sh [RUNS] (default 3); prints each run's time.
source "$(dirname "$0")/common.sh"
cd "$REPO"
runs=${1:-3}
PACKAGES+=(stress-ng)
install_packages
stress-ng --cpu 1 --quiet &
hog=$!
trap 'kill "$hog" 2>/dev/null || true' EXIT
times=()
for i in $(seq 1 "$runs"); do
	start=$(date +%s)
	"$REPO/scripts/test.sh"
	times+=("$(($(date +%s) - start)) s")
	echo "test-loaded: run $i of $runs passed in ${times[-1]}" >&2
done
echo "test-loaded: $runs runs passed with one core busy: ${times[*]}" >&2
