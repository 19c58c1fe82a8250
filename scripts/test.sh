#!/usr/bin/env bash
# Runs every test: unit tests, the tiny hand-assembled KVM guest, the vmm CLI
# error paths and the end-to-end boot of the real kernel with the agent,
# then the stateful tests (tests/tests/stateful.rs: httpd, postgres and
# redis with volumes, whose guests take minutes on an emulated guest
# kernel; a plain `cargo test` leaves them out). Arguments go to both
# `cargo test` runs. The two runs go one after the other: on a 2-core host
# with an emulated guest kernel, guests run side by side slow each other
# down more than they save.
source "$(dirname "$0")/common.sh"
cd "$REPO"
"$REPO/scripts/setup.sh"
cargo test --workspace --release "$@"
cargo test --release -p little-tests --test stateful "$@"
