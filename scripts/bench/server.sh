#!/usr/bin/env bash
# Server-side benchmarks of bin-manager (the release build in dist/), all on
# 127.0.0.1, printed as Markdown tables with the machine at the top:
#
#   1. wrk (2 threads, --latency) at 100 and 1,000 connections against
#      GET /api/v1/keepalive?node=n1 and GET /api/v1/bins/app: bin-manager
#      (--quiet) vs our own nginx serving the same JSON bodies as static files;
#      plus bin-manager with its access log, and with --workers 64 (both
#      requests are answered on bin-manager's event loops, so the worker count
#      should not matter). The "new conns / request" column (TCP passive opens
#      per request, from /proc/net/snmp) and the listen-queue overflows
#      (/proc/net/netstat) show whether connections were kept alive. Both
#      counters are system-wide.
#   2. Download throughput of a 256 MiB file (curl, 5 runs each, median MB/s
#      where MB = 10^6 bytes), bin-manager vs nginx with sendfile.
#   3. The fleet simulation (examples/fleet.rs): 10,000 nodes x 50 binaries
#      checking in over a minute with a per-node splay, a new connection per
#      request, two rounds (first check-in with registrations, then steady
#      state), with the server's CPU, peak RSS, thread states and what the
#      registry wrote.
#   4. A bad build in a staged rollout (steps 1,10,50,100): how many nodes
#      ever received it before the health gate paused it, and how long that
#      took.
#
# Usage: scripts/bench/server.sh [--smoke] [--only rps|download|fleet|rollout]
#   --smoke: ~2 s per wrk row, no extra rows, a 32 MiB download and
#            200 nodes x 50 over 10 s; for scripts/test.sh (< 40 s).
#   --only:  run one of the numbered parts (rps = 1, download = 2, ...).
# Installs wrk and nginx (Debian packages) when missing; builds dist/ with
# scripts/build-release.sh --quick when the release bin-manager is missing.
set -euo pipefail
set -E
trap 'echo "server.sh: failed at line $LINENO: $BASH_COMMAND (exit $?)" >&2' ERR
cd "$(dirname "$0")/../.."

smoke=0; only=""
usage="usage: $0 [--smoke] [--only rps|download|fleet|rollout]"
while (($#)); do
    case "$1" in
        --smoke) smoke=1 ;;
        --only)
            case "${2:-}" in
                rps|download|fleet|rollout) only=$2; shift ;;
                *) echo "$0: --only needs one of rps, download, fleet, rollout (got '${2:-}')" >&2; exit 2 ;;
            esac ;;
        -h|--help) sed -n '2,26p' "$0"; exit 0 ;;
        *) echo "$usage" >&2; exit 2 ;;
    esac
    shift
done
want() { [ -z "$only" ] || [ "$only" = "$1" ]; }

if ((smoke)); then
    dur=2s; dl_mib=32; fleet_nodes=200; fleet_window=5; fleet_rounds=2; extra_rows=0
else
    dur=10s; dl_mib=256; fleet_nodes=10000; fleet_window=60; fleet_rounds=2; extra_rows=1
fi
fleet_bins=50; fleet_threads=64; dl_runs=5

say() { printf '[%3d s] %s\n' "$SECONDS" "$*" >&2; }

# --- prerequisites ----------------------------------------------------------
need_pkgs=()
command -v wrk >/dev/null || need_pkgs+=(wrk)
command -v nginx >/dev/null || need_pkgs+=(nginx)
command -v curl >/dev/null || need_pkgs+=(curl)
if ((${#need_pkgs[@]})); then
    say "server-bench: installing ${need_pkgs[*]}"
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -qq
    apt-get install -y -qq --no-install-recommends "${need_pkgs[@]}" >/dev/null
    # The package starts the system nginx; we run our own instance.
    if [[ " ${need_pkgs[*]} " == *" nginx "* ]] && [ -x /etc/init.d/nginx ] && command -v service >/dev/null; then
        service nginx stop >/dev/null 2>&1 || true
    fi
fi
dist_bin=dist/bin-manager-x86_64-linux-musl
[ -x "$dist_bin" ] || scripts/build-release.sh --quick >&2
# The smoke run uses the debug build that scripts/test.sh has already made
# (cargo test --all-targets); its 2,000 req/s are no strain for it.
if ((smoke)); then
    cargo build -q --example fleet
    fleet_exe=target/debug/examples/fleet
else
    cargo build -q --release --example fleet
    fleet_exe=target/release/examples/fleet
fi
say "server-bench: preparing"

# --- workspace and cleanup --------------------------------------------------
T=$(mktemp -d /tmp/bench-server.XXXXXX)
chmod 755 "$T" # nginx workers run as an unprivileged user
pids=()
cleanup() {
    local p
    for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done
    for p in "${pids[@]}"; do
        for _ in $(seq 50); do kill -0 "$p" 2>/dev/null || break; sleep 0.1; done
        kill -9 "$p" 2>/dev/null || true
    done
    rm -rf "$T"
}
trap cleanup EXIT
trap 'exit 130' INT TERM HUP
# Our own copy: a concurrent scripts/build-release.sh may replace dist/.
BM="$T/bin-manager"
cp "$dist_bin" "$BM"

# --- helpers ----------------------------------------------------------------
# netstat_get FILE SECTION FIELD: a counter from /proc/net/snmp or netstat.
netstat_get() {
    awk -v s="$2:" -v f="$3" '$1 == s { if (!h) { for (i = 2; i <= NF; i++) if ($i == f) c = i; h = 1 } else { print (c ? $c : 0); exit } }' "$1"
}
counters() { # passive opens, listen overflows, listen drops
    echo "$(netstat_get /proc/net/snmp Tcp PassiveOpens) $(netstat_get /proc/net/netstat TcpExt ListenOverflows) $(netstat_get /proc/net/netstat TcpExt ListenDrops)"
}
median() { sort -g | awk '{ v[NR] = $1 } END { if (NR == 0) print 0; else if (NR % 2) print v[(NR + 1) / 2]; else print (v[NR / 2] + v[NR / 2 + 1]) / 2 }'; }
ratio() { awk -v a="$1" -v b="$2" 'BEGIN { if (b > 0) printf "%.2f", a / b; else print "-" }'; }
fmt_ms() { awk -v u="$1" 'BEGIN { printf "%.2f ms", u / 1000 }'; }
fmt_int() { printf "%'d" "$1" 2>/dev/null || printf "%d" "$1"; }

# start_manager NAME ARGS...: sets MPID and API.
MPID=""; API=""
start_manager() {
    local name=$1; shift
    mkdir -p "$T/$name"
    "$BM" --listen 127.0.0.1:0 --bin-dir "$T/bins" --state-file "$T/$name/state.json" "$@" \
        2> "$T/$name/stderr.log" &
    MPID=$!
    pids+=("$MPID")
    API=""
    for _ in $(seq 100); do
        API=$(grep -o -m1 'listening on http://127\.0\.0\.1:[0-9]*' "$T/$name/stderr.log" 2>/dev/null | sed 's/^listening on //') || true
        [ -n "$API" ] && break
        kill -0 "$MPID" 2>/dev/null || break
        sleep 0.1
    done
    [ -n "$API" ] || { cat "$T/$name/stderr.log" >&2; say "bin-manager ($name) did not start"; exit 1; }
    API="$API/api/v1"
}
stop_pid() {
    kill "$1" 2>/dev/null || true
    for _ in $(seq 50); do kill -0 "$1" 2>/dev/null || return 0; sleep 0.1; done
    kill -9 "$1" 2>/dev/null || true
}

# --- content ----------------------------------------------------------------
mkdir -p "$T/bins" "$T/static"
head -c $((1 << 20)) /dev/urandom > "$T/bins/app"
for i in $(seq 0 $((fleet_bins - 1))); do
    head -c 4096 /dev/urandom > "$T/bins/$(printf 'fleetbin%03d' "$i")"
done
head -c $((dl_mib << 20)) /dev/urandom > "$T/bins/big"
cat > "$T/report.lua" <<'LUA'
done = function(summary, latency, requests)
  local e = summary.errors
  io.write(string.format("WRKRESULT %d %d %d %d %d %d %d %d %d %d\n",
    summary.requests, summary.duration, latency:percentile(50), latency:percentile(99),
    latency.max, e.connect, e.read, e.write, e.status, e.timeout))
end
LUA

# --- machine ----------------------------------------------------------------
cpu=$(awk -F': ' '/^model name/ { print $2; exit }' /proc/cpuinfo)
mem=$(awk '/^MemTotal/ { printf "%.0f GiB", $2 / 1048576 }' /proc/meminfo)
os=$(sed -n 's/^PRETTY_NAME="\{0,1\}\([^"]*\)"\{0,1\}$/\1/p' /etc/os-release)
echo "# bin-manager server benchmarks$( ((smoke)) && echo ' (smoke: short rows, small fleet)')"
echo
echo "* $(date -u +%Y-%m-%dT%H:%M:%SZ), $(nproc) CPU ($cpu), $mem RAM, $os, Linux $(uname -r)"
echo "* $("$BM" --version), $dist_bin ($(stat -c %s "$dist_bin") bytes, built $(date -u -d "@$(stat -c %Y "$dist_bin")" +%Y-%m-%dT%H:%M:%SZ)); $(nginx -v 2>&1 | sed 's/^nginx version: //'); wrk $(dpkg-query -W -f='${Version}' wrk 2>/dev/null || echo '?'); curl $(curl --version | awk 'NR == 1 { print $2 }')"
echo "* load average at the start: $(cut -d' ' -f1-3 /proc/loadavg) (other work on the machine adds noise)"
echo "* everything on 127.0.0.1; client and servers share the $(nproc) cores"

# The whole simulated fleet comes from 127.0.0.1: lift the per-address
# limits (new registrations a minute, worker requests at once) that would
# otherwise throttle one address registering 10,000 nodes (parts 3 and 4).
echo '{"registrationsPerMinute":0,"workersPerClient":4096}' > "$T/fleet-config.json"

if want rps || want download; then
# --- nginx ------------------------------------------------------------------
N="$T/nginx"; mkdir -p "$N"
nginx_user=""
if [ "$(id -u)" = 0 ]; then
    if id www-data >/dev/null 2>&1; then nginx_user="user www-data www-data;"; else nginx_user="user nobody nogroup;"; fi
fi
NPORT=""; NPID=""
for _ in 1 2 3 4 5 6 7 8; do
    port=$((20000 + RANDOM % 20000))
    ss -Htln "sport = :$port" | grep -q . && continue
    cat > "$N/nginx.conf" <<CONF
$nginx_user
worker_processes $(nproc);
daemon off;
pid $N/nginx.pid;
error_log $N/error.log warn;
events { worker_connections 4096; }
http {
    access_log off;
    client_body_temp_path $N/body;
    proxy_temp_path $N/proxy;
    fastcgi_temp_path $N/fastcgi;
    uwsgi_temp_path $N/uwsgi;
    scgi_temp_path $N/scgi;
    sendfile on;
    tcp_nopush on;
    keepalive_timeout 5s;
    server {
        listen 127.0.0.1:$port;
        location = /api/v1/keepalive { default_type application/json; alias $T/static/keepalive.json; }
        location = /api/v1/bins/app { default_type application/json; alias $T/static/app.json; }
        location /api/v1/download/ { default_type application/octet-stream; alias $T/bins/; }
    }
}
CONF
    nginx -p "$N" -c "$N/nginx.conf" -e "$N/error.log" 2>> "$N/start.log" &
    NPID=$!
    pids+=("$NPID")
    for _ in $(seq 50); do
        kill -0 "$NPID" 2>/dev/null || break
        [ -s "$N/nginx.pid" ] && curl -s -o /dev/null --max-time 2 "http://127.0.0.1:$port/" && { NPORT=$port; break; }
        sleep 0.1
    done
    [ -n "$NPORT" ] && break
    stop_pid "$NPID"
done
[ -n "$NPORT" ] || { cat "$N/start.log" "$N/error.log" >&2 2>/dev/null; say "nginx did not start"; exit 1; }
NGX="http://127.0.0.1:$NPORT/api/v1"

fi

if want rps; then
# --- 1. requests/s ----------------------------------------------------------
declare -A RPS P99 CPU
clk_tck=$(getconf CLK_TCK)
# cpu_ticks PID: utime+stime of a process (all its threads) and of its live
# child processes (nginx's workers).
cpu_ticks() {
    local p kids
    kids=$(cat /proc/"$1"/task/*/children 2>/dev/null || true)
    for p in "$1" $kids; do
        awk '{ sub(/^.*\) /, ""); print $12 + $13 }' "/proc/$p/stat" 2>/dev/null || echo 0
    done | awk '{ s += $1 } END { print s + 0 }'
}
rows="$T/rows.md"
: > "$rows"
# row KEY ENDPOINT-LABEL SERVER-LABEL SERVER-PID URL CONNS [WRK-ARGS...]
row() {
    local key=$1 ep=$2 srv=$3 spid=$4 url=$5 c=$6 out="$T/wrk.out" before after cpu0 cpu1
    shift 6
    say "server-bench: wrk $srv $ep, $c connections, $dur $*"
    before=$(counters)
    cpu0=$(cpu_ticks "$spid")
    wrk -t2 -c "$c" -d "$dur" --timeout 10s --latency -s "$T/report.lua" "$@" "$url" > "$out" 2>&1 || true
    cpu1=$(cpu_ticks "$spid")
    after=$(counters)
    local r
    r=$(grep -m1 '^WRKRESULT' "$out" || true)
    if [ -z "$r" ]; then
        cat "$out" >&2
        echo "| $ep | $srv | $c | wrk failed | | | | | | | |" >> "$rows"
        return
    fi
    local _w n us p50 p99 max ec er ew es et
    read -r _w n us p50 p99 max ec er ew es et <<< "$r"
    local rps opens ovf
    rps=$(awk -v n="$n" -v us="$us" 'BEGIN { printf "%.0f", n / (us / 1e6) }')
    read -r b_open b_ovf _ <<< "$before"
    read -r a_open a_ovf _ <<< "$after"
    opens=$(awk -v a="$a_open" -v b="$b_open" -v n="$n" 'BEGIN { if (n > 0) printf "%.2f", (a - b) / n; else print "-" }')
    ovf=$((a_ovf - b_ovf))
    RPS[$key]=$rps; P99[$key]=$p99
    local cpu_us
    cpu_us=$(awk -v t=$((cpu1 - cpu0)) -v hz="$clk_tck" -v n="$n" 'BEGIN { if (n > 0) printf "%.0f", t * 1e6 / hz / n; else print "-" }')
    CPU[$key]=$cpu_us
    echo "| $ep | $srv | $(fmt_int "$c") | $(fmt_int "$rps") | $(fmt_ms "$p50") | $(fmt_ms "$p99") | $(fmt_ms "$max") | $ec / $er / $ew / $et / $es | $opens | $(fmt_int "$ovf") | $cpu_us |" >> "$rows"
}

start_manager quiet --quiet
QPID=$MPID; QAPI=$API
reg='{"name":"n1","cpuArch":"x86_64","osRelease":"Debian GNU/Linux 12 (bookworm)","proxyVersion":"1.0.0","binaries":[{"name":"app","version":"latest","hash":""}],"lastSeen":""}'
curl -sf --max-time 10 -X POST -H 'Content-Type: application/json' --data "$reg" "$QAPI/keepalive?node=n1" > /dev/null
curl -sf --max-time 10 "$QAPI/keepalive?node=n1" > "$T/static/keepalive.json"
curl -sf --max-time 10 "$QAPI/bins/app" > "$T/static/app.json"
chmod 644 "$T/static/"*
cmp -s "$T/static/app.json" <(curl -sf --max-time 10 "$NGX/bins/app") || { say "nginx does not serve the same body"; exit 1; }

KA="keepalive?node=n1"
for c in 100 1000; do
    row "ka-bm-$c" "GET $KA" "bin-manager" "$QPID" "$QAPI/$KA" "$c"
    row "ka-ng-$c" "GET $KA" "nginx" "$NPID" "$NGX/$KA" "$c"
done
for c in 100 1000; do
    row "app-bm-$c" "GET bins/app" "bin-manager" "$QPID" "$QAPI/bins/app" "$c"
    row "app-ng-$c" "GET bins/app" "nginx" "$NPID" "$NGX/bins/app" "$c"
done
if ((extra_rows)); then
    # Few connections.
    row "ka-bm-30" "GET $KA" "bin-manager" "$QPID" "$QAPI/$KA" 30
    # What agents send: a new connection per request, for both servers.
    for ep in ka app; do
        if [ $ep = ka ]; then path=$KA; label="GET $KA"; else path=bins/app; label="GET bins/app"; fi
        row "$ep-bm-close" "$label, Connection: close" "bin-manager" "$QPID" "$QAPI/$path" 100 -H 'Connection: close'
        row "$ep-ng-close" "$label, Connection: close" "nginx" "$NPID" "$NGX/$path" 100 -H 'Connection: close'
    done
fi
qport=${QAPI#http://127.0.0.1:}; qport=${qport%%/*}
backlog_bm=$(ss -Hltn "sport = :$qport" | awk '{ print $3; exit }')
backlog_ng=$(ss -Hltn "sport = :$NPORT" | awk '{ print $3; exit }')

# The access log's cost: measured back to back with a --quiet row.
start_manager logged
LPID=$MPID
curl -sf --max-time 10 -X POST -H 'Content-Type: application/json' --data "$reg" "$API/keepalive?node=n1" > /dev/null
row "ka-quiet2-100" "GET $KA" "bin-manager (again, next to the access-log row)" "$QPID" "$QAPI/$KA" 100
row "ka-log-100" "GET $KA" "bin-manager with access log" "$LPID" "$API/$KA" 100
stop_pid "$LPID"
stop_pid "$QPID"
log_lines=$(wc -l < "$T/logged/stderr.log")
log_bytes=$(stat -c %s "$T/logged/stderr.log")

if ((extra_rows)); then
    start_manager w64 --quiet --workers 64
    WPID=$MPID
    curl -sf --max-time 10 -X POST -H 'Content-Type: application/json' --data "$reg" "$API/keepalive?node=n1" > /dev/null
    row "ka-w64-1000" "GET $KA" "bin-manager --workers 64" "$WPID" "$API/$KA" 1000
    row "app-w64-1000" "GET bins/app" "bin-manager --workers 64" "$WPID" "$API/bins/app" 1000
    stop_pid "$WPID"
fi

echo
echo "## Requests per second (wrk -t2 -d $dur --latency)"
echo
echo "bin-manager: $dist_bin, default workers (256) unless said, --quiet unless said; both requests are answered on its event loops (one per core). nginx: $(nproc) workers, static files, access_log off. Errors: connect / read / write / timeout / non-2xx. \"new conns / request\": TCP passive opens per request (1.00 = a new connection for every request). \"server CPU µs / request\": utime+stime of the server (nginx: master and workers) during the row, per request (kernel network work done in the client's context is not in it). A full listen queue costs seconds: a dropped SYN is retried after 1 s (before wrk's latency clock starts, so only req/s shows it), and a dropped final handshake ACK leaves the request, already sent, waiting for the server's SYN-ACK retransmission 1 s, 3 s, 7 s later (inside wrk's latency: the p99/max of seconds)."
echo
echo "| request | server | connections | req/s | p50 | p99 | max | errors c/r/w/t/status | new conns / request | listen-queue overflows | server CPU µs / request |"
echo "|---|---|---:|---:|---:|---:|---:|---|---:|---:|---:|"
cat "$rows"
echo
echo "| request | connections | bin-manager req/s | nginx req/s | bin-manager / nginx | p99 bin-manager / nginx | CPU µs / request bin-manager / nginx |"
echo "|---|---:|---:|---:|---:|---:|---:|"
for ep in ka app; do
    for c in 100 1000; do
        a=${RPS[$ep-bm-$c]:-0}; b=${RPS[$ep-ng-$c]:-0}
        label="GET $KA"; [ "$ep" = app ] && label="GET bins/app"
        echo "| $label | $(fmt_int "$c") | $(fmt_int "$a") | $(fmt_int "$b") | $(ratio "$a" "$b") | $(fmt_ms "${P99[$ep-bm-$c]:-0}") / $(fmt_ms "${P99[$ep-ng-$c]:-0}") | ${CPU[$ep-bm-$c]:-?} / ${CPU[$ep-ng-$c]:-?} |"
    done
done
if ((extra_rows)); then
    echo
    echo "With Connection: close (a new connection per request, as agents do), 100 connections:"
    echo
    echo "| request | bin-manager req/s | nginx req/s | bin-manager / nginx | p99 bin-manager / nginx | CPU µs / request bin-manager / nginx |"
    echo "|---|---:|---:|---:|---:|---:|"
    for ep in ka app; do
        label="GET $KA"; [ "$ep" = app ] && label="GET bins/app"
        a=${RPS[$ep-bm-close]:-0}; b=${RPS[$ep-ng-close]:-0}
        echo "| $label | $(fmt_int "$a") | $(fmt_int "$b") | $(ratio "$a" "$b") | $(fmt_ms "${P99[$ep-bm-close]:-0}") / $(fmt_ms "${P99[$ep-ng-close]:-0}") | ${CPU[$ep-bm-close]:-?} / ${CPU[$ep-ng-close]:-?} |"
    done
fi
echo
echo "Listen backlog (ss Send-Q): bin-manager ${backlog_bm:-?}, nginx ${backlog_ng:-?}."
echo
echo "Access log: $(ratio "${RPS[ka-log-100]:-0}" "${RPS[ka-quiet2-100]:-0}")× the req/s and $(ratio "${CPU[ka-log-100]:-0}" "${CPU[ka-quiet2-100]:-0}")× the server CPU per request of --quiet, measured back to back at 100 connections ($(fmt_int "$log_lines") lines, $(fmt_int "$log_bytes") bytes written to a file on $(df --output=fstype "$T" | tail -1))."

fi

if want download; then
# --- 2. download ------------------------------------------------------------
start_manager dl --quiet
DPID=$MPID
say "server-bench: download $dl_mib MiB x $dl_runs"
size=$((dl_mib << 20))
# Warm both (bin-manager hashes the file on first use; the page cache).
curl -sf --max-time 120 -o /dev/null "$API/download/big"
curl -sf --max-time 120 -o /dev/null "$NGX/download/big"
: > "$T/dl-bm"; : > "$T/dl-ng"
dl() { # URL OUTFILE
    local r
    r=$(curl -sf --max-time 120 -o /dev/null -w '%{speed_download} %{size_download}' "$1") || { say "download failed: $1"; exit 1; }
    [ "${r#* }" = "$size" ] || { say "short download from $1: $r"; exit 1; }
    echo "${r%% *}" >> "$2"
}
for _ in $(seq "$dl_runs"); do
    dl "$API/download/big" "$T/dl-bm"
    dl "$NGX/download/big" "$T/dl-ng"
done
stop_pid "$DPID"
mb_bm=$(median < "$T/dl-bm" | awk '{ printf "%.0f", $1 / 1e6 }')
mb_ng=$(median < "$T/dl-ng" | awk '{ printf "%.0f", $1 / 1e6 }')
all_bm=$(awk '{ printf "%s%.0f", (NR > 1 ? ", " : ""), $1 / 1e6 }' "$T/dl-bm")
all_ng=$(awk '{ printf "%s%.0f", (NR > 1 ? ", " : ""), $1 / 1e6 }' "$T/dl-ng")
echo
echo "## Download ($dl_mib MiB, curl -o /dev/null, $dl_runs runs each, alternating, page cache warm)"
echo
echo "| server | median MB/s | runs (MB/s) |"
echo "|---|---:|---|"
echo "| bin-manager | $(fmt_int "$mb_bm") | $all_bm |"
echo "| nginx (sendfile on) | $(fmt_int "$mb_ng") | $all_ng |"
echo "| ratio bin-manager / nginx | $(ratio "$mb_bm" "$mb_ng") | |"

fi

if want fleet; then
# --- 3. fleet ---------------------------------------------------------------
start_manager fleet --quiet --config "$T/fleet-config.json"
FPID=$MPID
say "server-bench: fleet $fleet_nodes nodes x $fleet_bins over $fleet_rounds x $fleet_window s"
echo
echo "## Fleet simulation"
echo
addr=${API#http://}; addr=${addr%%/*}
"$fleet_exe" --addr "$addr" \
    --nodes "$fleet_nodes" --bins "$fleet_bins" --window "$fleet_window" --rounds "$fleet_rounds" \
    --threads "$fleet_threads" --server-pid "$FPID" --state-file "$T/fleet/state.json" \
    --clk-tck "$(getconf CLK_TCK)" --grace 60 --timeout 30
S="$T/fleet/state.json"
if ! ((smoke)); then
    # Let the batched lastSeen flush (every 5 s) land before measuring the files.
    m0=$(stat -c %Y.%s "$S.log" 2>/dev/null || echo 0)
    for _ in $(seq 70); do
        [ "$(stat -c %Y.%s "$S.log" 2>/dev/null || echo 0)" != "$m0" ] && break
        sleep 0.1
    done
fi
count() { grep -c "$1" "$2" 2>/dev/null || true; }
nodes_t0=$(date +%s.%N)
nodes_size=$(curl -s --max-time 60 -o /dev/null -w '%{size_download}' "$API/nodes" || echo 0)
nodes_t=$(awk -v a="$nodes_t0" -v b="$(date +%s.%N)" 'BEGIN { printf "%.2f", b - a }')
known=$(grep -c '"registered"' "$S" 2>/dev/null || true)
echo
echo "Registry files after the run: snapshot $(fmt_int "$(stat -c %s "$S" 2>/dev/null || echo 0)") bytes ($(fmt_int "${known:-0}") nodes in it), log $(fmt_int "$(stat -c %s "$S.log" 2>/dev/null || echo 0)") bytes ($(count '"op":"node"' "$S.log") registration lines, $(count '"op":"seen"' "$S.log") batched lastSeen lines, $(count '"op":"report"' "$S.log") report lines since the last fold into the snapshot). GET /api/v1/nodes afterwards: $(fmt_int "$nodes_size") bytes in $nodes_t s. Server peak RSS after that: $(awk '/^VmHWM/ { print $2, $3 }' "/proc/$FPID/status")."
stop_pid "$FPID"

fi

if want rollout; then
# --- 4. a bad build in a staged rollout -------------------------------------
# The fleet checks in once (registrations), then a build of fleetbin000 that
# fails on every node that installs it is published in steps 1,10,50,100;
# the fleet checks in again, each node that is offered it fails and reports
# it, and the health gate must pause the rollout after maxFailures.
if ((smoke)); then max_failures=1; else max_failures=10; fi
start_manager rollout --quiet --admin-token bench-admin --config "$T/fleet-config.json"
RPID=$MPID
addr=${API#http://}; addr=${addr%%/*}
say "server-bench: rollout of a bad build over $fleet_nodes nodes"
"$fleet_exe" --addr "$addr" --nodes "$fleet_nodes" --bins "$fleet_bins" --window "$fleet_window" \
    --rounds 1 --threads "$fleet_threads" --grace 60 --timeout 30 > /dev/null
head -c 4096 /dev/urandom > "$T/bad"
bad=$(md5sum < "$T/bad" | cut -d' ' -f1)
curl -sf -X PUT -H 'Authorization: Bearer bench-admin' --data-binary @"$T/bad" \
    "$API/bins/fleetbin000?rollout=1,10,50,100&maxFailures=$max_failures&soak=600" > /dev/null
echo
echo "## A bad build in a staged rollout"
echo
echo "Steps 1,10,50,100, maxFailures=$max_failures, soak 600 s; $fleet_nodes nodes check in once over $fleet_window s after the publish."
"$fleet_exe" --addr "$addr" --nodes "$fleet_nodes" --bins "$fleet_bins" --window "$fleet_window" \
    --rounds 1 --threads "$fleet_threads" --grace 60 --timeout 30 --bad-hash "$bad" --bad-bin fleetbin000 \
    | sed -n '/^Rollout of a bad build/,$p'
stop_pid "$RPID"
fi
say "server-bench: done"
echo
echo "Load average at the end: $(cut -d' ' -f1-3 /proc/loadavg)."
