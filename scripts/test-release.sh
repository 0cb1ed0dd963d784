#!/usr/bin/env bash
# Runs the release artifacts in dist/ (scripts/build-release.sh) where users
# run them, each against a real bin-manager on 127.0.0.1:
#   1. the aarch64 agent, under qemu-aarch64-static, installs and upgrades a
#      binary (and gets the aarch64 build, not the generic one);
#   2. the x86_64 agent installs and upgrades inside an empty chroot holding
#      only itself, its manifest and the target directory (no libc, no /etc,
#      no shell) — the minimal-container case;
#   3. the x86_64 agent as PID 1 of a container: a PID namespace (unshare)
#      and an empty root holding the agent, its manifest and a static app;
#      it upgrades the app, restarts it with "signal:HUP:/run/app.pid",
#      reaps a hook's orphan, and exits 0 on SIGTERM;
#   4. the agent built without TLS says so (--version, https:// URLs);
#   5. HTTPS end to end through a real nginx terminating TLS with a CA and
#      certificate made here by openssl: trusted via SSL_CERT_FILE, refused
#      with a clear error without it.
# Prints one line per check and "release: N passed, M failed" at the end.
set -euo pipefail
set -E
trap 'echo "test-release.sh: failed at line $LINENO: $BASH_COMMAND (exit $?)" >&2' ERR
cd "$(dirname "$0")/.."

passed=0 failed=0
ok() { passed=$((passed + 1)); echo "ok   $*"; }
bad() { failed=$((failed + 1)); echo "FAIL $*"; }
check() { # description, command...
    local what=$1; shift
    if "$@"; then ok "$what"; else bad "$what"; fi
}
same_file() { cmp -s "$1" "$2"; }
log_has() { grep -q -- "$2" "$1"; }

X86=dist/bin-proxy-x86_64-linux-musl
ARM=dist/bin-proxy-aarch64-linux-musl
MGR=dist/bin-manager-x86_64-linux-musl
for f in "$X86" "$ARM" "$MGR"; do
    [ -x "$f" ] || { echo "test-release: $f missing; run scripts/build-release.sh" >&2; exit 1; }
done

W=$(mktemp -d /tmp/bin-proxy-release.XXXXXX)
pids=()
cleanup() {
    for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done
    [ -f "$W/nginx/nginx.pid" ] && kill "$(cat "$W/nginx/nginx.pid")" 2>/dev/null || true
    # Bounded: whatever has not exited 5 s after SIGTERM is killed.
    for p in "${pids[@]}"; do
        for _ in $(seq 50); do kill -0 "$p" 2>/dev/null || break; sleep 0.1; done
        kill -9 "$p" 2>/dev/null || true
    done
    wait 2>/dev/null || true
    rm -rf "$W"
}
trap cleanup EXIT

# A bin-manager on a free port serving $W/bins; sets API and ADDR.
start_manager() {
    mkdir -p "$W/bins/aarch64"
    "$MGR" --quiet --bin-dir "$W/bins" --state-file "$W/state.json" --listen 127.0.0.1:0 2> "$W/manager.log" &
    pids+=($!)
    for _ in $(seq 100); do grep -q "listening on" "$W/manager.log" && break; sleep 0.1; done
    ADDR=$(grep -o '127.0.0.1:[0-9]*' "$W/manager.log" | head -1)
    API="http://$ADDR/api/v1"
}
publish() { # name, content, [subdir]
    local dir="$W/bins${3:+/$3}"
    printf '%s' "$2" > "$dir/.$1.new" && mv "$dir/.$1.new" "$dir/$1"
}
manifest() { # file, path of the managed binary
    printf '{"node":{"name":"release-test"},"binaries":[{"name":"app","hash":"","path":"%s","restart":"none"}]}\n' "$2" > "$1"
}

start_manager
publish app "generic build 1"
publish app "arm build 1" aarch64

echo "== aarch64 agent under qemu-aarch64-static"
A="$W/arm"; mkdir -p "$A/opt"; manifest "$A/m.json" "$A/opt/app"
check "aarch64: fresh install exits 0" qemu-aarch64-static "$ARM" --config "$A/m.json" --api "$API" 2> "$A/log1"
check "aarch64: got the aarch64 build" grep -qx "arm build 1" "$A/opt/app"
publish app "arm build 2" aarch64
check "aarch64: upgrade exits 0" qemu-aarch64-static "$ARM" --config "$A/m.json" --api "$API" 2> "$A/log2"
check "aarch64: new bytes in place" grep -qx "arm build 2" "$A/opt/app"
check "aarch64: old bytes kept as .bak" grep -qx "arm build 1" "$A/opt/app.bak"
check "aarch64: log says upgraded" log_has "$A/log2" "app: upgraded"
check "aarch64: manifest records the new hash" grep -q "$(printf 'arm build 2' | md5sum | cut -d' ' -f1)" "$A/m.json"

echo "== aarch64 bin-manager under qemu-aarch64-static"
Q="$W/armmgr"; mkdir -p "$Q/bins" "$Q/opt"; manifest "$Q/m.json" "$Q/opt/app"
printf 'served by the aarch64 manager\n' > "$Q/bins/app"
qemu-aarch64-static dist/bin-manager-aarch64-linux-musl --quiet --bin-dir "$Q/bins" \
    --state-file "$Q/state.json" --listen 127.0.0.1:0 2> "$Q/manager.log" &
pids+=($!)
for _ in $(seq 100); do grep -q "listening on" "$Q/manager.log" && break; sleep 0.1; done
QAPI="http://$(grep -o '127.0.0.1:[0-9]*' "$Q/manager.log" | head -1)"
check "aarch64 manager: answers /healthz" test "$(curl -fsS --max-time 10 "$QAPI/healthz")" = ok
# Its event loop (epoll_event is laid out differently on aarch64) hands both
# requests to a worker and takes the kept-alive connection back in between.
check "aarch64 manager: two requests on one kept-alive connection" sh -c \
    "curl -fsS --max-time 10 -w '%{num_connects} ' -o /dev/null -o /dev/null '$QAPI/api/v1/bins/app' '$QAPI/api/v1/download/app' | grep -qx '1 0 '"
check "aarch64 manager: the x86_64 agent installs from it" "$X86" --config "$Q/m.json" --api "$QAPI/api/v1" 2> "$Q/agent.log"
check "aarch64 manager: served bytes in place" grep -qx "served by the aarch64 manager" "$Q/opt/app"

echo "== x86_64 agent in an empty chroot"
R="$W/chroot"; mkdir -p "$R/opt"; cp "$X86" "$R/bin-proxy"; manifest "$R/m.json" "/opt/app"
publish app "generic build 2"
check "chroot: nothing but the agent, its manifest and /opt" test "$(ls -A "$R" | tr '\n' ' ')" = "bin-proxy m.json opt "
check "chroot: fresh install exits 0" chroot "$R" /bin-proxy --config /m.json --api "$API" 2> "$W/chroot1.log"
check "chroot: installed" grep -qx "generic build 2" "$R/opt/app"
publish app "generic build 3"
check "chroot: upgrade exits 0" chroot "$R" /bin-proxy --config /m.json --api "$API" 2> "$W/chroot2.log"
check "chroot: upgraded, backup kept" sh -c "grep -qx 'generic build 3' '$R/opt/app' && grep -qx 'generic build 2' '$R/opt/app.bak'"
check "chroot: mode 0755" test "$(stat -c %a "$R/opt/app")" = 755
check "chroot: no temp files left" test -z "$(find "$R" -name '*bin-proxy-tmp*')"
check "chroot: idle run exits 0" chroot "$R" /bin-proxy --config /m.json --api "$API" 2> "$W/chroot3.log"
check "chroot: idle run logs one line" test "$(wc -l < "$W/chroot3.log")" -eq 1

echo "== x86_64 agent as a container's PID 1 (PID namespace, empty root)"
# A tiny static app, as a FROM scratch image would hold: it writes its pid
# to /run/app.pid, logs "build N started", re-executes /opt/app on SIGHUP;
# with --orphan it leaves a child behind (reparented to PID 1, the agent,
# which must reap it).
cat > "$W/app.c" <<'CEOF'
#include <signal.h>
#include <stdio.h>
#include <string.h>
#include <unistd.h>
static volatile sig_atomic_t hup;
static void on_hup(int s) { (void)s; hup = 1; }
int main(int argc, char **argv) {
    if (argc > 1 && strcmp(argv[1], "--orphan") == 0) {
        if (fork() == 0) { sleep(1); _exit(0); }
        return 0;
    }
    FILE *p = fopen("/run/app.pid.new", "w");
    if (!p) return 1;
    fprintf(p, "%d\n", (int)getpid());
    fclose(p);
    rename("/run/app.pid.new", "/run/app.pid");
    FILE *l = fopen("/app.log", "a");
    if (l) { fprintf(l, "build %d started, pid %d\n", BUILD, (int)getpid()); fclose(l); }
    signal(SIGHUP, on_hup);
    for (;;) {
        pause();
        if (hup) { execv("/opt/app", argv); _exit(3); }
    }
}
CEOF
musl-gcc -static -O2 -DBUILD=1 -o "$W/app1" "$W/app.c"
musl-gcc -static -O2 -DBUILD=2 -o "$W/app2" "$W/app.c"
K="$W/container"; mkdir -p "$K/opt" "$K/run" "$K/proc"
cp "$X86" "$K/bin-proxy"; cp "$W/app1" "$K/opt/app"; chmod 755 "$K/opt/app"
cp "$W/app1" "$W/bins/.capp.new" && mv "$W/bins/.capp.new" "$W/bins/capp"
cat > "$K/m.json" <<JSON
{"node":{"name":"container"},"binaries":[{"name":"capp","hash":"$(md5sum < "$W/app1" | cut -d' ' -f1)","path":"/opt/app",
  "restart":"signal:HUP:/run/app.pid","postUpgrade":"/opt/app --orphan","confirmSeconds":1}]}
JSON
unshare --pid --fork --mount-proc="$K/proc" chroot "$K" /bin-proxy --every 1 --config /m.json --api "$API" 2> "$W/container.log" &
UNSHARE=$!
pids+=("$UNSHARE")
AGENT=''
for _ in $(seq 100); do AGENT=$(pgrep -P "$UNSHARE" || true); [ -n "$AGENT" ] && break; sleep 0.1; done
[ -n "$AGENT" ] || { echo "test-release: the agent did not start under unshare" >&2; exit 1; }
pids+=("$AGENT") # stopped first by the cleanup, so that unshare ends too
check "container: the agent runs as PID 1 of its namespace" sh -c "grep -q '^NSpid:.*[[:space:]]1$' /proc/$AGENT/status"
nsenter --target "$AGENT" --pid --root /opt/app &
APP_NSENTER=$!
pids+=("$APP_NSENTER")
for _ in $(seq 100); do grep -q "build 1 started" "$K/app.log" 2>/dev/null && [ -s "$K/run/app.pid" ] && break; sleep 0.1; done
check "container: the app (build 1) runs in the namespace" grep -q "build 1 started" "$K/app.log"
cp "$W/app2" "$W/bins/.capp.new" && mv "$W/bins/.capp.new" "$W/bins/capp"
for _ in $(seq 300); do grep -q "capp: upgraded\|capp: .* did not come up" "$W/container.log" 2>/dev/null && break; sleep 0.1; done
check "container: upgraded (swapped, SIGHUP, alive, postUpgrade passed)" grep -q "capp: upgraded" "$W/container.log"
check "container: the app re-executed itself as build 2 on SIGHUP, same pid" sh -c \
    "grep -q \"build 2 started, pid \$(cat '$K/run/app.pid')\$\" '$K/app.log'"
check "container: the new build is in place" cmp -s "$W/app2" "$K/opt/app"
check "container: the log names the signal restart" log_has "$W/container.log" "capp: upgraded .*restarted: sent SIGHUP to pid"
zombies() { { ps -o stat= --ppid "$AGENT" || true; } | grep -c Z || true; }
for _ in $(seq 100); do [ "$(zombies)" = 0 ] && grep -q "1 up to date" "$W/container.log" && break; sleep 0.1; done
check "container: the hook's orphan was reaped (no zombie children of PID 1)" test "$(zombies)" = 0
kill -TERM "$AGENT"
rc=0
for _ in $(seq 100); do kill -0 "$UNSHARE" 2>/dev/null || break; sleep 0.1; done
wait "$UNSHARE" || rc=$?
check "container: SIGTERM ends PID 1 with exit 0" test "$rc" = 0
check "container: one line says it stopped" test "$(grep -c 'received SIGTERM: stopping' "$W/container.log")" = 1
check "container: no temp files left" test -z "$(find "$K/opt" -name '*bin-proxy-tmp*')"

echo "== the agent without TLS"
NOTLS=dist/bin-proxy-notls-x86_64-linux-musl
check "notls: --version says it has no TLS" sh -c "'$NOTLS' --version | grep -q 'without TLS'"
T="$W/notls"; mkdir -p "$T/opt"; manifest "$T/m.json" "$T/opt/app"
if "$NOTLS" --config "$T/m.json" --api "https://127.0.0.1:1/api/v1" 2> "$T/https.log"; then
    bad "notls: an https:// API is refused"
else
    check "notls: an https:// API is refused with exit 2" test $? = 2
fi
check "notls: the refusal says the build has no TLS" grep -q "built without TLS" "$T/https.log"

echo "== HTTPS through nginx"
C="$W/ca"; mkdir -p "$C"
openssl req -x509 -newkey rsa:2048 -nodes -days 2 -subj "/CN=bin-proxy test CA" \
    -keyout "$C/ca.key" -out "$C/ca.pem" 2>/dev/null
openssl req -newkey rsa:2048 -nodes -subj "/CN=127.0.0.1" -keyout "$C/server.key" -out "$C/server.csr" 2>/dev/null
printf 'subjectAltName=IP:127.0.0.1,DNS:localhost\n' > "$C/san.ext"
openssl x509 -req -in "$C/server.csr" -CA "$C/ca.pem" -CAkey "$C/ca.key" -CAcreateserial -days 2 \
    -extfile "$C/san.ext" -out "$C/server.pem" 2>/dev/null
N="$W/nginx"; mkdir -p "$N"
nginx_up=0
for attempt in 1 2 3 4 5; do
    PORT=$((20000 + RANDOM % 20000))
    cat > "$N/nginx.conf" <<CONF
worker_processes 1;
pid $N/nginx.pid;
error_log $N/error.log;
events { worker_connections 64; }
http {
    access_log off;
    client_body_temp_path $N/body;
    proxy_temp_path $N/proxy;
    fastcgi_temp_path $N/fastcgi;
    uwsgi_temp_path $N/uwsgi;
    scgi_temp_path $N/scgi;
    server {
        listen 127.0.0.1:$PORT ssl;
        ssl_certificate $C/server.pem;
        ssl_certificate_key $C/server.key;
        location / { proxy_pass http://$ADDR; proxy_buffering off; }
    }
}
CONF
    if nginx -c "$N/nginx.conf" -p "$N" 2>> "$N/start.log"; then nginx_up=1; break; fi
done
[ $nginx_up = 1 ] || { cat "$N/start.log" "$N/error.log" >&2; bad "nginx did not start"; }
H="$W/https"; mkdir -p "$H/opt"; manifest "$H/m.json" "$H/opt/app"
if SSL_CERT_FILE=/nonexistent "$X86" --config "$H/m.json" --api "https://127.0.0.1:$PORT/api/v1" 2> "$H/untrusted.log"; then
    bad "https: an unknown CA is refused"
else
    ok "https: an unknown CA is refused (exit $?)"
fi
check "https: the refusal names the certificate problem" grep -qi "certificate\|UnknownIssuer" "$H/untrusted.log"
echo "     $(grep -m1 -i "certificate\|UnknownIssuer" "$H/untrusted.log" || true)"
check "https: nothing installed while untrusted" test ! -e "$H/opt/app"
check "https: trusted through SSL_CERT_FILE, install exits 0" \
    env SSL_CERT_FILE="$C/ca.pem" "$X86" --config "$H/m.json" --api "https://127.0.0.1:$PORT/api/v1" 2> "$H/trusted.log"
check "https: installed the published build" grep -qx "generic build 3" "$H/opt/app"
check "https: downloaded through TLS" grep -q "from https://127.0.0.1:$PORT/api/v1/download/app" "$H/trusted.log"

echo
echo "release: $passed passed, $failed failed"
if [ "$failed" -gt 0 ]; then
    for f in "$A"/log* "$W"/chroot*.log "$W"/container.log "$H"/*.log; do [ -f "$f" ] && { echo "--- $f"; cat "$f"; }; done
    exit 1
fi
