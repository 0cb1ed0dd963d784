#!/usr/bin/env bash
# Crash consistency, provoked: upgrade a multi-MiB binary again and again and
# kill -9 the agent at a random moment each time. After every kill the managed
# file must be the complete old or the complete new build, the manifest must
# parse, and the next (unkilled) run must converge: exit 0, the published
# build in place and recorded, no temp files. The restart command sleeps a
# little so that kills also land between the swap and the commit, where the
# journal (state file "pending") is what lets the next run finish the job.
#
# Usage: scripts/killloop.sh [ITERATIONS]   (default 200; scripts/test.sh runs 40)
# Uses dist/ (scripts/build-release.sh) when present, else target/release.
set -euo pipefail
set -E
trap 'echo "killloop.sh: failed at line $LINENO: $BASH_COMMAND (exit $?)" >&2' ERR
cd "$(dirname "$0")/.."
iterations=${1:-200}

agent=dist/bin-proxy-x86_64-linux-musl manager=dist/bin-manager-x86_64-linux-musl
if [ ! -x "$agent" ] || [ ! -x "$manager" ]; then
    cargo build --release --quiet
    agent=${CARGO_TARGET_DIR:-target}/release/bin-proxy manager=${CARGO_TARGET_DIR:-target}/release/bin-manager
fi

W=$(mktemp -d /tmp/bin-proxy-killloop.XXXXXX)
trap 'kill $MPID 2>/dev/null || true; rm -rf "$W"' EXIT
mkdir -p "$W/bins" "$W/opt"
head -c $((4 << 20)) /dev/urandom > "$W/build-a"
head -c $((4 << 20)) /dev/urandom > "$W/build-b"
A=$(md5sum < "$W/build-a" | cut -d' ' -f1)
B=$(md5sum < "$W/build-b" | cut -d' ' -f1)
cp "$W/build-a" "$W/opt/app"

"$manager" --quiet --bin-dir "$W/bins" --state-file "$W/state.json" --listen 127.0.0.1:0 2> "$W/manager.log" &
MPID=$!
for _ in $(seq 100); do grep -q "listening on" "$W/manager.log" && break; sleep 0.1; done
API="http://$(grep -o '127.0.0.1:[0-9]*' "$W/manager.log" | head -1)/api/v1"
cat > "$W/m.json" <<JSON
{
  "node": { "name": "killloop" },
  "binaries": [
    { "name": "app", "hash": "$A", "path": "$W/opt/app", "restart": "/bin/sleep 0.1" }
  ]
}
JSON
run() { "$agent" --quiet --config "$W/m.json" --api "$API" "$@"; }
fail() { echo "killloop: iteration $i: $*" >&2; exit 1; }

killed=0 finished=0
for i in $(seq "$iterations"); do
    # Publish the other build (atomic mv, as an operator would).
    if [ $((i % 2)) = 1 ]; then want=$B src=build-b; else want=$A src=build-a; fi
    cp "$W/$src" "$W/bins/.app.new" && mv "$W/bins/.app.new" "$W/bins/app"

    # Start a run and kill it after 0–400 ms.
    "$agent" --quiet --config "$W/m.json" --api "$API" 2>> "$W/killed.log" &
    pid=$! # the agent itself, not a subshell: kill -9 must hit it
    sleep "0.$(printf '%03d' $((RANDOM % 400)))"
    if kill -9 "$pid" 2>/dev/null; then killed=$((killed + 1)); else finished=$((finished + 1)); fi
    wait "$pid" 2>/dev/null || true

    have=$(md5sum < "$W/opt/app" | cut -d' ' -f1)
    [ "$have" = "$A" ] || [ "$have" = "$B" ] || fail "app is neither build after the kill (md5 $have)"
    run check > /dev/null 2>&1 || [ $? = 1 ] || fail "the manifest does not parse after the kill"

    # The next run converges.
    "$agent" --config "$W/m.json" --api "$API" 2> "$W/converge.log" || fail "the run after the kill failed: $(cat "$W/converge.log")"
    have=$(md5sum < "$W/opt/app" | cut -d' ' -f1)
    [ "$have" = "$want" ] || fail "did not converge: app is $have, published $want"
    grep -q "\"hash\": \"$want\"" "$W/m.json" || fail "the manifest does not record $want: $(cat "$W/m.json" "$W/converge.log")"
    cat "$W/converge.log" >> "$W/converge-all.log"
    leftovers=$(find "$W/opt" -name '*bin-proxy-tmp*')
    [ -z "$leftovers" ] || fail "temp files left: $leftovers"
done
resumed=$(grep -c "interrupted after swapping" "$W/converge-all.log" || true)
before=$(grep -c "interrupted before its swap" "$W/converge-all.log" || true)
echo "killloop: $iterations iterations: $killed killed mid-run ($resumed after the swap, finished by the next run's journal check; $before before it), $finished finished before the kill; every check passed"
echo "killloop: $iterations passed, 0 failed"
