#!/usr/bin/env bash
# The product, for real, on this machine: bin-manager on 127.0.0.1 serving a
# temp binDir, a real supervisord running a sample service, and bin-proxy
# installing, upgrading and restarting it. Everything lives in one temp dir
# and is stopped at the end (also when a step fails or the demo is
# interrupted). Needs no terminal; every wait is bounded, and each step checks
# what it shows, so scripts/test.sh runs it end to end. Usage: scripts/demo.sh
set -euo pipefail
set -E
trap 'echo "demo.sh: failed at line $LINENO: $BASH_COMMAND (exit $?)" >&2' ERR
cd "$(dirname "$0")/.."
scripts/setup.sh >/dev/null

say() { printf '\n\033[1m==> %s\033[0m\n' "$*"; }

say "building bin-proxy and bin-manager (release)"
cargo build --release --quiet
BIN=${CARGO_TARGET_DIR:-$PWD/target}/release
# expect WHAT COMMAND...: the demo stops, naming WHAT, unless COMMAND succeeds.
expect() {
    local what=$1
    shift
    "$@" || { echo "demo.sh: expected $what, but it is not so" >&2; exit 1; }
}

D=$(mktemp -d /tmp/bin-proxy-demo.XXXXXX)
# Stops what the demo started, each by its own pid, waiting (bounded) for it
# to exit before the directory goes.
stop_pid() {
    local pid=$1
    kill "$pid" 2>/dev/null || return 0
    for _ in $(seq 50); do kill -0 "$pid" 2>/dev/null || return 0; sleep 0.1; done
    kill -9 "$pid" 2>/dev/null || true
}
cleanup() {
    if [ -n "${MANAGER_PID:-}" ]; then stop_pid "$MANAGER_PID"; fi
    if [ -f "$D/supervisord.pid" ]; then stop_pid "$(cat "$D/supervisord.pid")"; fi
    rm -rf "$D"
}
trap cleanup EXIT
trap 'exit 130' INT TERM
mkdir -p "$D/bins" "$D/opt" "$D/etc"

# A sample program: build N prints its version and keeps running.
build() {
    printf '#!/bin/sh\nwhile true; do echo "hello from build %s"; sleep 5; done\n' "$1"
}

say "publishing build 1 (an atomic mv into binDir is all publishing takes)"
build 1 > "$D/bins/.hello.tmp" && chmod 755 "$D/bins/.hello.tmp" && mv "$D/bins/.hello.tmp" "$D/bins/hello"

say "starting bin-manager on 127.0.0.1 (free port)"
"$BIN/bin-manager" --bin-dir "$D/bins" --state-file "$D/state.json" --listen 127.0.0.1:0 \
    --admin-token demo-admin 2> "$D/manager.log" &
MANAGER_PID=$!
for _ in $(seq 50); do grep -q "listening on" "$D/manager.log" && break; sleep 0.1; done
ADDR=$(grep -o 'http://127.0.0.1:[0-9]*' "$D/manager.log" | head -1 || true)
expect "bin-manager to log the address it listens on ($D/manager.log)" test -n "$ADDR"
API="$ADDR/api/v1"
head -1 "$D/manager.log"

say "starting a real supervisord with program 'hello' at $D/opt/hello"
cat > "$D/supervisord.conf" <<CONF
[unix_http_server]
file=$D/supervisor.sock
[supervisord]
logfile=$D/supervisord.log
pidfile=$D/supervisord.pid
childlogdir=$D
[rpcinterface:supervisor]
supervisor.rpcinterface_factory = supervisor.rpcinterface:make_main_rpcinterface
[supervisorctl]
serverurl=unix://$D/supervisor.sock
[program:hello]
command=$D/opt/hello
autostart=false
startsecs=1
stopasgroup=true
killasgroup=true
CONF
supervisord -c "$D/supervisord.conf"
export BIN_PROXY_SUPERVISORCTL="supervisorctl -c $D/supervisord.conf"
# status exits 3 while a program is stopped: what matters is that it lists it.
sv_lists_hello() { { supervisorctl -c "$D/supervisord.conf" status 2>&1 || true; } | grep -q '^hello '; }
for _ in $(seq 50); do sv_lists_hello && break; sleep 0.2; done
expect "supervisord to answer on $D/supervisor.sock" sv_lists_hello

say "writing the agent's manifest ($D/etc/bin-manifests.json)"
"$BIN/bin-proxy" init --config "$D/etc/bin-manifests.json" --api "$API"
cat > "$D/etc/bin-manifests.json" <<JSON
{
  "manager": { "api": "$API" },
  "node": { "name": "demo-node" },
  "binaries": [
    { "name": "hello", "version": "latest", "hash": "", "path": "$D/opt/hello" }
  ]
}
JSON
cat "$D/etc/bin-manifests.json"

say "bin-proxy run 1: registers the node, installs build 1, starts it under supervisord"
"$BIN/bin-proxy" --config "$D/etc/bin-manifests.json"
expect "build 1 at $D/opt/hello" grep -q "build 1" "$D/opt/hello"

say "bin-proxy run 2: nothing to do (one summary line)"
"$BIN/bin-proxy" --config "$D/etc/bin-manifests.json"

say "publishing build 2 over HTTP (PUT with the admin token)"
build 2 | curl -sS --max-time 10 -X PUT -H "Authorization: Bearer demo-admin" --data-binary @- "$API/bins/hello"
echo

say "bin-proxy check: what a run would change"
"$BIN/bin-proxy" check --config "$D/etc/bin-manifests.json"

say "bin-proxy run 3: downloads, verifies, swaps, restarts, confirms RUNNING, reports"
"$BIN/bin-proxy" --config "$D/etc/bin-manifests.json"
expect "build 2 at $D/opt/hello" grep -q "build 2" "$D/opt/hello"
expect "build 1 kept as $D/opt/hello.bak" grep -q "build 1" "$D/opt/hello.bak"

say "the upgraded file and its backup"
ls -l "$D/opt"
echo "--- $D/opt/hello"; cat "$D/opt/hello"
supervisorctl -c "$D/supervisord.conf" status hello
expect "hello RUNNING under supervisord" sh -c "supervisorctl -c '$D/supervisord.conf' status hello | grep -q RUNNING"

say "bin-proxy status"
"$BIN/bin-proxy" status --config "$D/etc/bin-manifests.json"

say "the fleet as bin-manager sees it (GET /api/v1/nodes)"
curl -sS --max-time 10 "$API/nodes" | tee "$D/nodes.json"
echo
expect "the fleet view to list demo-node" grep -q demo-node "$D/nodes.json"

say "bin-manager's access log"
tail -n 8 "$D/manager.log"

say "done; stopping bin-manager and supervisord, removing $D"
