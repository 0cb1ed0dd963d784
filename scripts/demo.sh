#!/usr/bin/env bash
# The product, for real, on this machine: bin-manager on 127.0.0.1 serving a
# temp binDir, a real supervisord running a sample service, and bin-proxy
# installing, upgrading and restarting it. Everything lives in one temp dir
# and is stopped at the end. Usage: scripts/demo.sh
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup.sh >/dev/null

say() { printf '\n\033[1m==> %s\033[0m\n' "$*"; }

say "building bin-proxy and bin-manager (release)"
cargo build --release --quiet
BIN=$PWD/target/release

D=$(mktemp -d /tmp/bin-proxy-demo.XXXXXX)
cleanup() {
    [ -n "${MANAGER_PID:-}" ] && kill "$MANAGER_PID" 2>/dev/null || true
    [ -f "$D/supervisord.pid" ] && kill "$(cat "$D/supervisord.pid")" 2>/dev/null || true
    sleep 0.3
    rm -rf "$D"
}
trap cleanup EXIT
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
ADDR=$(grep -o 'http://127.0.0.1:[0-9]*' "$D/manager.log" | head -1)
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
CONF
supervisord -c "$D/supervisord.conf"
export BIN_PROXY_SUPERVISORCTL="supervisorctl -c $D/supervisord.conf"
for _ in $(seq 50); do [ -S "$D/supervisor.sock" ] && break; sleep 0.1; done

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
"$BIN/bin-proxy" --config "$D/etc/bin-manifests.json" || true

say "bin-proxy run 2: nothing to do (one summary line)"
"$BIN/bin-proxy" --config "$D/etc/bin-manifests.json"

say "publishing build 2 over HTTP (PUT with the admin token)"
build 2 | curl -sS -X PUT -H "Authorization: Bearer demo-admin" --data-binary @- "$API/bins/hello"
echo

say "bin-proxy check: what a run would change"
"$BIN/bin-proxy" check --config "$D/etc/bin-manifests.json"

say "bin-proxy run 3: downloads, verifies, swaps, restarts, confirms RUNNING, reports"
"$BIN/bin-proxy" --config "$D/etc/bin-manifests.json"

say "the upgraded file and its backup"
ls -l "$D/opt"
echo "--- $D/opt/hello"; cat "$D/opt/hello"
supervisorctl -c "$D/supervisord.conf" status hello

say "bin-proxy status"
"$BIN/bin-proxy" status --config "$D/etc/bin-manifests.json"

say "the fleet as bin-manager sees it (GET /api/v1/nodes)"
curl -sS "$API/nodes"
echo

say "bin-manager's access log"
tail -n 8 "$D/manager.log"

say "done; stopping bin-manager and supervisord, removing $D"
