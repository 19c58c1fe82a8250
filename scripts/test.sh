#!/usr/bin/env bash
# Runs every test: unit tests, the tiny hand-assembled KVM guest, the vmm CLI
# error paths and the end-to-end boot of the real kernel with the agent.
# The stateful tests (tests/tests/stateful.rs: postgres, redis and httpd
# with volumes, whose guests take minutes on an emulated guest kernel) run
# beside the others, each test on its own daemon, home and ports; their
# output comes at the end. Arguments go to both `cargo test` runs.
source "$(dirname "$0")/common.sh"
cd "$REPO"
"$REPO/scripts/setup.sh"
cargo test --workspace --release --no-run
cargo test --release -p little-tests --test stateful --no-run
log="$TARGET/stateful-tests.log"
cargo test --release -p little-tests --test stateful "$@" >"$log" 2>&1 &
stateful=$!
trap 'kill "$stateful" 2>/dev/null || true' EXIT
status=0
cargo test --workspace --release "$@" || status=$?
stateful_status=0
wait "$stateful" || stateful_status=$?
trap - EXIT
echo "== tests/tests/stateful.rs (ran beside the tests above; exit status $stateful_status)"
cat "$log"
[ "$status" -eq 0 ] && [ "$stateful_status" -eq 0 ]
