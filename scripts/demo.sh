#!/usr/bin/env bash
# The main job: set everything up, start the little.cloud daemon, deploy the
# bundled example image (busybox httpd, built offline by
# image-tools/test-images/build.sh) and serve it. The app scales to zero
# after 1 s idle; each request then restores an instance from its snapshot.
#
#   scripts/demo.sh          # serve until Ctrl-C
#   scripts/demo.sh --once   # deploy, one request from zero, stop
source "$(dirname "$0")/common.sh"
"$REPO/scripts/setup.sh"
HOME_DIR=${LITTLE_HOME:-$TARGET/little/home}
PORT=${DEMO_PORT:-8080}
LITTLE="$TARGET/release/little --home $HOME_DIR"
mkdir -p "$HOME_DIR"
$LITTLE serve --kernel "$TARGET/guest-kernel/vmlinux" --metrics 127.0.0.1:9464 2>"$HOME_DIR/daemon.log" &
DAEMON=$!
trap 'kill $DAEMON 2>/dev/null; wait $DAEMON 2>/dev/null' EXIT
for _ in $(seq 100); do $LITTLE ps >/dev/null 2>&1 && break; sleep 0.1; done
echo "demo: deploying the busybox httpd image (first boot + snapshot; ~15 s on a nested, emulated KVM host)" >&2
# The app file holds the settings; --listen overrides its address (and
# --image its image path, for a target folder of another name).
IMAGE=()
[ "$TARGET" = "$REPO/target" ] || IMAGE=(--image "$TARGET/test-images/httpd.oci")
$LITTLE deploy -f "$REPO/examples/hello/little.toml" --listen "127.0.0.1:$PORT" "${IMAGE[@]}"
echo "demo: one request from zero instances:" >&2
curl -sS -w 'demo: HTTP %{http_code}, first byte after %{time_starttransfer} s\n' "http://127.0.0.1:$PORT/"
$LITTLE ps
[ "${1:-}" = "--once" ] && exit 0
cat >&2 <<MSG
demo: serving http://127.0.0.1:$PORT/  (idle instances stop after 1 s; the next request restores one)
demo:   curl http://127.0.0.1:$PORT/
demo:   $LITTLE ps          # instances, age, connections, memory
demo:   curl -s http://127.0.0.1:9464/metrics
demo: Ctrl-C stops the daemon.
MSG
wait $DAEMON
