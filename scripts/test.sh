#!/usr/bin/env bash
# Runs every test: unit tests, the tiny hand-assembled KVM guest, the vmm CLI
# error paths and the end-to-end boot of the real kernel with the agent.
source "$(dirname "$0")/common.sh"
cd "$REPO"
"$REPO/scripts/setup.sh"
cargo test --workspace --release "$@"
