#!/usr/bin/env bash
# Agent-side benchmarks: the release bin-proxy against the shell workflow it
# replaces (scripts/bench/baseline-agent.sh: bash + curl + jq + md5sum), both
# talking to one bin-manager on 127.0.0.1. Prints Markdown tables:
#
#   1. idle run over 1, 10, 50 up-to-date binaries (hyperfine; -N for
#      bin-proxy, shell mode for the script), and the idle run over 50
#      binaries against the goal of issue 16 (>= 200x the script, one
#      request on the wire, counted in bin-manager's access log);
#   2. upgrade of one large binary (fresh random bytes): bin-proxy (its state
#      knowing the old file, and cold: state removed) vs the
#      script vs `curl -o f && md5sum f` vs `md5sum f` alone, with the target
#      directory on disk (/var/tmp) and on tmpfs (/dev/shm);
#   3. peak RSS (/usr/bin/time -v) downloading 1 GiB and 64 MiB, and curl's;
#   4. sizes of dist/* against curl + jq and the shared libraries they load.
#
# Usage: scripts/bench/agent.sh [--smoke]
#   --smoke: one run per row, 8 MiB files instead of 256 MiB / 1 GiB, so that
#   scripts/test.sh can run it in seconds to keep it working.
# Installs hyperfine and time (Debian packages) when missing; builds dist/ with
# scripts/build-release.sh --quick when the release binaries are missing.
# BENCH_DIST=DIR measures the release binaries in DIR instead of dist/ (e.g. a
# build of another commit); the output names the agent's sha256 and warns when
# it is older than the sources.
set -euo pipefail
set -E
trap 'echo "agent.sh: failed at line $LINENO: $BASH_COMMAND (exit $?)" >&2' ERR
cd "$(dirname "$0")/../.."

SMOKE=0
case "${1:-}" in
    --smoke) SMOKE=1 ;;
    "") ;;
    *) echo "usage: $0 [--smoke]" >&2; exit 2 ;;
esac

if ((SMOKE)); then
    IDLE_RUNS=1 IDLE_WARMUP=0 UP_RUNS=1 UP_WARMUP=0
    UP_MIB=8 RSS_BIG_MIB=8 RSS_SMALL_MIB=4
else
    IDLE_RUNS=20 IDLE_WARMUP=3 UP_RUNS=9 UP_WARMUP=1
    UP_MIB=256 RSS_BIG_MIB=1024 RSS_SMALL_MIB=64
fi
IDLE_COUNTS=(1 10 50)

say() { echo "agent.sh: $(date +%T) $*" >&2; }

need() { # command debian-package
    command -v "$1" >/dev/null && return 0
    say "installing $2"
    apt-get install -y -qq "$2" >/dev/null || { apt-get update -qq && apt-get install -y -qq "$2" >/dev/null; }
}
need hyperfine hyperfine
need nginx nginx
need curl curl
need jq jq
need flock util-linux
[[ -x /usr/bin/time ]] || need /usr/bin/time time

DIST=${BENCH_DIST:-dist}
if [[ ! -x $DIST/bin-proxy-x86_64-linux-musl || ! -x $DIST/bin-manager-x86_64-linux-musl ]]; then
    [[ $DIST == dist ]] || { say "no release build in $DIST"; exit 2; }
    say "dist/ has no x86_64 release build; running scripts/build-release.sh --quick"
    scripts/build-release.sh --quick >&2
fi

D=$(mktemp -d /var/tmp/bin-proxy-bench.XXXXXX) # on disk
S=$(mktemp -d /dev/shm/bin-proxy-bench.XXXXXX) # tmpfs
PIDS=()
cleanup() {
    local p
    for p in "${PIDS[@]}"; do kill "$p" 2>/dev/null || true; done
    for p in "${PIDS[@]}"; do wait "$p" 2>/dev/null || true; done
    rm -rf -- "$D" "$S"
}
trap cleanup EXIT
trap 'exit 130' INT
trap 'exit 143' TERM

# Private copies: others may rebuild dist/ while this runs.
cp "$DIST/bin-proxy-x86_64-linux-musl" "$D/bin-proxy"
cp "$DIST/bin-manager-x86_64-linux-musl" "$D/bin-manager"
cp scripts/bench/baseline-agent.sh "$D/baseline-agent.sh"
BP=$D/bin-proxy
SH=$D/baseline-agent.sh
# The agent's hashes alone (examples/hashspeed.rs): the floor of an upgrade.
# The smoke run uses the debug build scripts/test.sh has already made.
if ((SMOKE)); then
    cargo build -q --example hashspeed && cp target/debug/examples/hashspeed "$D/hashspeed"
    HS_PROFILE="debug build (smoke)"
else
    cargo build -q --release --example hashspeed && cp target/release/examples/hashspeed "$D/hashspeed"
    HS_PROFILE="release profile"
fi

md5() { local h; h=$(md5sum -- "$1"); echo "${h%% *}"; }
rand() { head -c "$(($2 << 20))" /dev/urandom >"$1"; } # file MiB

start_manager() { # bindir statefile [--access-log] -> sets STARTED_API (not $(...): it would wait for the server)
    local log=$2.stderr i quiet=--quiet # not $2.log: that is the registry's own log file
    [[ ${3:-} == --access-log ]] && quiet=
    "$D/bin-manager" $quiet --bin-dir "$1" --state-file "$2" --listen 127.0.0.1:0 </dev/null >/dev/null 2>"$log" &
    PIDS+=($!)
    for ((i = 0; i < 100; i++)); do
        grep -q "listening on" "$log" && break
        sleep 0.1
    done
    grep -q "listening on" "$log" || { cat "$log" >&2; say "bin-manager did not start"; exit 1; }
    STARTED_API="$(grep -o 'http://127.0.0.1:[0-9]*' "$log" | head -1)/api/v1"
}

manifest() { # file node entries-json
    printf '{"node":{"name":"%s","cpuArch":"x86_64","osRelease":"bench","proxyVersion":"1.0.0"},"binaries":%s}\n' \
        "$2" "$3" | jq . >"$1"
}

# hyperfine one command; prints its median in seconds. mode: N (no shell) or sh.
bench() { # id mode runs warmup prepare command
    local id=$1 mode=$2 runs=$3 warmup=$4 prep=$5 cmd=$6 args
    args=(--runs "$runs" --warmup "$warmup" --export-json "$D/hf-$id.json" --style basic)
    [[ $mode == N ]] && args+=(-N)
    [[ -n $prep ]] && args+=(--prepare "$prep")
    say "hyperfine $id: $cmd"
    hyperfine "${args[@]}" "$cmd" >>"$D/hyperfine.log" 2>&1 ||
        { cat "$D/hyperfine.log" >&2; say "hyperfine $id failed"; exit 1; }
    jq -r '.results[0].median' "$D/hf-$id.json"
}
ms() { awk -v s="$1" 'BEGIN { printf "%.1f ms", s * 1000 }'; }
sec() { awk -v s="$1" 'BEGIN { printf "%.3f s", s }'; }
ratio() { awk -v a="$1" -v b="$2" 'BEGIN { printf "%.2f×", a / b }'; }
rate() { awk -v m="$1" -v s="$2" 'BEGIN { printf "%.0f MiB/s", m / s }'; }

# ---------------------------------------------------------------- machine
echo "# Agent benchmarks$( ((SMOKE)) && echo ' (smoke: 1 run, small files; not for quoting)')"
echo
echo "Machine: $(nproc) CPU, $(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2- | sed 's/^ *//'), \
$(awk '/MemTotal/ { printf "%.0f GiB RAM", $2 / 1048576 }' /proc/meminfo), kernel $(uname -r); \
$(hyperfine --version), $(curl --version | head -1 | cut -d' ' -f1-2), $(jq --version), bash ${BASH_VERSION%%(*}. \
Everything on 127.0.0.1. Load average at the start: $(cut -d' ' -f1-3 /proc/loadavg) (anything above \
0 is other work sharing the CPUs)."
echo
echo "Agent: \`$DIST/bin-proxy-x86_64-linux-musl\` (sha256 $(sha256sum "$D/bin-proxy" | cut -c1-12), \
built $(date -u -r "$DIST/bin-proxy-x86_64-linux-musl" '+%F %H:%M UTC')); server: \`$DIST/bin-manager-x86_64-linux-musl\`."
if [[ $DIST == dist ]] && [[ -n $(find src Cargo.toml Cargo.lock -newer dist/bin-proxy-x86_64-linux-musl -print -quit 2>/dev/null) ]]; then
    echo
    echo "**Warning: dist/ is older than src/ — these numbers are for that older build. Rebuild with \
\`scripts/build-release.sh --quick\` first.**"
fi
echo

# ---------------------------------------------------------------- publish
mkdir -p "$D/bins" "$D/bins-old" "$D/idle"
say "publishing test builds"
for ((i = 1; i <= 50; i++)); do
    n=$(printf 'idle%02d' "$i")
    head -c 65536 /dev/urandom >"$D/bins/$n"
    cp "$D/bins/$n" "$D/idle/$n"
done
(cd "$D/idle" && md5sum idle*) >"$D/idle.md5"
rand "$D/bins/big" "$UP_MIB"             # the new build
rand "$D/old-big" "$UP_MIB"              # the old one, installed before each run
ln "$D/old-big" "$D/bins-old/big"        # what the old server publishes
rand "$D/bins/rss-big" "$RSS_BIG_MIB"
rand "$D/bins/rss-small" "$RSS_SMALL_MIB"
start_manager "$D/bins" "$D/state.json"
API=$STARTED_API
start_manager "$D/bins-old" "$D/state-old.json"
API_OLD=$STARTED_API
export BIN_MANAGER_API=$API
unset BIN_DOWNLOAD_URL BIN_MANAGER_TOKEN BIN_PROXY_CONFIG
NEW=$(md5 "$D/bins/big")
OLD=$(md5 "$D/old-big")
# Warm the server's hash cache (and the page cache) for every build.
curl -fsS "$API/bins" >/dev/null
for n in big rss-big rss-small; do curl -fsS "$API/bins/$n" >/dev/null; done
curl -fsS "$API_OLD/bins/big" >/dev/null

# ---------------------------------------------------------------- 1. idle
echo "## Idle run (every binary up to date)"
echo
echo "One cron run when nothing changed (bin-proxy: one \`POST check\`, answered 304; the script: \
keepalive + one \`GET bins/NAME\` per binary), 64 KiB \
files already installed and recorded. Each tool has its own copy of the same manifest (and \
is registered already); bin-proxy has its state file from the previous run, the script \
trusts the recorded hash (no md5sum). Runs: $IDLE_RUNS, warm-up: $IDLE_WARMUP; bin-proxy \
\`hyperfine -N\`, the script in hyperfine's shell mode (shell spawn subtracted)."
echo
echo "| binaries | bin-proxy (median) | baseline-agent.sh (median) | script / bin-proxy |"
echo "|---:|---:|---:|---:|"
for n in "${IDLE_COUNTS[@]}"; do
    entries=$(head -n "$n" "$D/idle.md5" | jq -Rsc --arg d "$D/idle/" '[split("\n")[] | select(. != "") | split("  ")
        | {name: .[1], version: "latest", hash: .[0], path: ($d + .[1]), restart: "none"}]')
    manifest "$D/idle-$n-bp.json" "bench-bp-$n" "$entries"
    manifest "$D/idle-$n-sh.json" "bench-sh-$n" "$entries"
    # First runs (skipped by --smoke): register, build bin-proxy's state.
    if ((!SMOKE)); then
        "$BP" --quiet --config "$D/idle-$n-bp.json"
        bash "$SH" "$D/idle-$n-sh.json" 2>/dev/null
    fi
    t_bp=$(bench "idle-$n-bp" N "$IDLE_RUNS" "$IDLE_WARMUP" "" "$BP --config $D/idle-$n-bp.json")
    t_sh=$(bench "idle-$n-sh" sh "$IDLE_RUNS" "$IDLE_WARMUP" "" "bash $SH $D/idle-$n-sh.json")
    echo "| $n | $(ms "$t_bp") | $(ms "$t_sh") | **$(ratio "$t_sh" "$t_bp")** |"
done
echo

# api_requests LOG FROM: the API requests in a bin-manager access log after
# line FROM, once a marker request (GET /healthz) sent now shows that every
# earlier one is logged.
api_requests() {
    local i
    curl -fsS -o /dev/null "${API_LOG%/api/v1}/healthz"
    for ((i = 0; i < 100; i++)); do
        tail -n +"$(($2 + 1))" "$1" | grep -q 'GET /healthz' && break
        sleep 0.05
    done
    tail -n +"$(($2 + 1))" "$1" | grep -c ' /api/v1/' || true
}
echo "## Idle run, 50 binaries: one request (the goal of issue 16)"
echo
echo "The 50-binary idle run again, against a bin-manager that logs every request: bin-proxy \
asks once (\`POST check\` with its ETag, answered \`304 Not Modified\`), the script asks the \
keepalive and every \`bins/NAME\`. Requests counted in the access log for one run of each. \
Runs: $IDLE_RUNS, warm-up: $IDLE_WARMUP. Goal: bin-proxy ≥ 200× faster, 1 request."
echo
echo "| row | bin-proxy (median) | baseline-agent.sh (median) | script / bin-proxy | goal | requests: bin-proxy | requests: script |"
echo "|---|---:|---:|---:|---:|---:|---:|"
start_manager "$D/bins" "$D/state-log.json" --access-log
API_LOG=$STARTED_API
LOG=$D/state-log.json.stderr
entries=$(jq -c '.binaries' "$D/idle-50-bp.json")
manifest "$D/idle-log-bp.json" bench-log-bp "$entries"
manifest "$D/idle-log-sh.json" bench-log-sh "$entries"
# Register both and give bin-proxy its state and its check answer (not timed).
"$BP" --quiet --config "$D/idle-log-bp.json" --api "$API_LOG"
BIN_MANAGER_API=$API_LOG bash "$SH" "$D/idle-log-sh.json" 2>/dev/null
from=$(wc -l <"$LOG")
"$BP" --quiet --config "$D/idle-log-bp.json" --api "$API_LOG"
n_bp=$(api_requests "$LOG" "$from")
from=$(wc -l <"$LOG")
BIN_MANAGER_API=$API_LOG bash "$SH" "$D/idle-log-sh.json" 2>/dev/null
n_sh=$(api_requests "$LOG" "$from")
t_bp=$(bench "idle-log-bp" N "$IDLE_RUNS" "$IDLE_WARMUP" "" "$BP --config $D/idle-log-bp.json --api $API_LOG")
t_sh=$(bench "idle-log-sh" sh "$IDLE_RUNS" "$IDLE_WARMUP" "" "env BIN_MANAGER_API=$API_LOG bash $SH $D/idle-log-sh.json")
r=$(awk -v a="$t_sh" -v b="$t_bp" 'BEGIN { print (a / b >= 200) ? "met" : "**missed**" }')
echo "| idle run, 50 binaries | $(ms "$t_bp") | $(ms "$t_sh") | **$(ratio "$t_sh" "$t_bp")** | ≥ 200×: $r | $n_bp | $n_sh |"
echo
[[ $n_bp == 1 ]] || { say "an idle bin-proxy run made $n_bp requests, not 1"; exit 1; }

# nginx_api DIR NODE: an nginx on 127.0.0.1 answering /api/v1/keepalive and
# /api/v1/bins/big with bin-manager's own answers minus sha256, from static
# files (POSTs get the same file: error_page 405 =200). Sets NGINX_API.
nginx_api() {
    local dir=$1/nginx port i j user=""
    mkdir -p "$dir/api/bins"
    curl -fsS "$API/keepalive?node=$2" >"$dir/api/keepalive"
    curl -fsS "$API/bins/big" | jq -c 'del(.data.sha256)' >"$dir/api/bins/big"
    chmod -R a+rX "$dir"
    [[ $(id -u) == 0 ]] && user="user root;"
    for ((i = 0; i < 8; i++)); do
        port=$((20000 + RANDOM % 20000))
        cat >"$dir/nginx.conf" <<CONF
$user
worker_processes 1;
daemon off;
pid $dir/nginx.pid;
error_log $dir/error.log warn;
events { worker_connections 64; }
http {
    access_log off;
    client_body_temp_path $dir/body;
    proxy_temp_path $dir/proxy;
    fastcgi_temp_path $dir/fastcgi;
    uwsgi_temp_path $dir/uwsgi;
    scgi_temp_path $dir/scgi;
    server {
        listen 127.0.0.1:$port;
        location /api/v1/ { alias $dir/api/; default_type application/json; error_page 405 =200 \$uri; }
    }
}
CONF
        nginx -p "$dir" -c "$dir/nginx.conf" -e "$dir/error.log" 2>>"$dir/start.log" &
        NGINX_PID=$!
        PIDS+=("$NGINX_PID")
        NGINX_API="http://127.0.0.1:$port/api/v1"
        for ((j = 0; j < 30; j++)); do
            curl -fsS -o /dev/null "$NGINX_API/bins/big" 2>/dev/null && return 0
            sleep 0.1
        done
    done
    cat "$dir/start.log" "$dir/error.log" >&2 2>/dev/null
    say "nginx did not start"
    exit 1
}

# ---------------------------------------------------------------- 2. upgrade
echo "## Upgrade of one $UP_MIB MiB binary"
echo
echo "The server publishes a new build (random bytes); the target holds the old build \
($UP_MIB MiB too) and the manifest records the old hash. Before every run (\`--prepare\`, not \
timed): the target directory is recreated with the old build, the manifest restored, \
\`sync\`. For bin-proxy the prepare step also runs it once against a second bin-manager that \
publishes the old build, so its \`MANIFEST.state\` holds the old file's hash as after any \
earlier cron run (steady state: it does not re-read the old file); the script always md5sums \
the old file when the recorded hash differs from the published one (that cost is the \
\`md5sum\` column). \`restart: \"none\"\` for both agents. bin-proxy fsyncs the new file and \
the directory; the script and curl do not. *bin-proxy cold*: the same upgrade with \`MANIFEST.state\` \
removed before each run (first run after an install, or a touched file): it does not know the old \
file, and hashes it while the new build downloads. \`curl\` and \`md5sum\` write to / read from the \
same directory; \`md5sum f alone\` hashes the published file (page-cached). Runs: $UP_RUNS, warm-up: $UP_WARMUP."
echo
echo "| target dir | bin-proxy | bin-proxy cold | baseline-agent.sh | \`curl -s -o f URL && md5sum f\` | \`md5sum f\` alone | script / bin-proxy | script / cold | curl+md5sum / bin-proxy |"
echo "|---|---:|---:|---:|---:|---:|---:|---:|---:|"
for where in disk tmpfs; do
    if [[ $where == disk ]]; then X=$D/up-disk; else X=$S/up-tmpfs; fi
    label="$where: ${X%%/bin-proxy-bench*} ($(findmnt -no FSTYPE -T "$D"))"
    [[ $where == tmpfs ]] && label="$where: ${X%%/bin-proxy-bench*}"
    mkdir -p "$X"
    if [[ $where == disk ]]; then ln "$D/old-big" "$X/old-big"; else cp "$D/old-big" "$X/old-big"; fi
    entry=$(jq -nc --arg h "$OLD" --arg p "$X/t/big" '[{name: "big", version: "latest", hash: $h, path: $p, restart: "none"}]')
    manifest "$X/bp.json.orig" bench-up-bp "$entry"
    manifest "$X/sh.json.orig" bench-up-sh "$entry"
    cat >"$X/prep.sh" <<EOF
set -e
rm -rf "$X/t" "$X/f"; mkdir "$X/t"
cp "$X/old-big" "$X/t/big"; chmod 755 "$X/t/big"
case \$1 in
    bp) rm -f "$X/bp.json.state"; cp "$X/bp.json.orig" "$X/bp.json"
        "$BP" --quiet --config "$X/bp.json" --api "$API_OLD" ;;
    bpcold) rm -f "$X/bp.json.state"; cp "$X/bp.json.orig" "$X/bp.json" ;;
    sh) cp "$X/sh.json.orig" "$X/sh.json" ;;
esac
sync
EOF
    # Register both nodes once (not timed; skipped by --smoke).
    if ((!SMOKE)); then
        bash "$X/prep.sh" bp && "$BP" --quiet --config "$X/bp.json"
        bash "$X/prep.sh" sh && bash "$SH" "$X/sh.json" 2>/dev/null
    fi
    t_bp=$(bench "up-$where-bp" N "$UP_RUNS" "$UP_WARMUP" "bash $X/prep.sh bp" "$BP --config $X/bp.json")
    [[ $(md5 "$X/t/big") == "$NEW" ]] || { say "bin-proxy did not install the new build"; exit 1; }
    t_cold=$(bench "up-$where-cold" N "$UP_RUNS" "$UP_WARMUP" "bash $X/prep.sh bpcold" "$BP --config $X/bp.json")
    [[ $(md5 "$X/t/big") == "$NEW" ]] || { say "bin-proxy (cold) did not install the new build"; exit 1; }
    t_sh=$(bench "up-$where-sh" sh "$UP_RUNS" "$UP_WARMUP" "bash $X/prep.sh sh" "bash $SH $X/sh.json")
    [[ $(md5 "$X/t/big") == "$NEW" ]] || { say "baseline-agent.sh did not install the new build"; exit 1; }
    t_curl=$(bench "up-$where-curl" sh "$UP_RUNS" "$UP_WARMUP" "bash $X/prep.sh none" \
        "curl -fsS -o $X/f $API/download/big && md5sum $X/f")
    t_md5=$(bench "up-$where-md5" N "$UP_RUNS" "$UP_WARMUP" "" "md5sum $D/bins/big")
    if [[ $where == tmpfs ]]; then
        # The same upgrade from a server that offers no sha256, as the
        # original bin-manager: its answers from nginx static files, the
        # download from bin-manager. The difference is sha256's cost.
        nginx_api "$X" bench-up-bp
        t_nosha=$(bench "up-$where-nosha" N "$UP_RUNS" "$UP_WARMUP" "bash $X/prep.sh bp" \
            "env BIN_DOWNLOAD_URL=$API/download $BP --config $X/bp.json --api $NGINX_API")
        [[ $(md5 "$X/t/big") == "$NEW" ]] || { say "bin-proxy (no sha256) did not install the new build"; exit 1; }
        t_tmpfs_bp=$t_bp t_tmpfs_md5=$t_md5
        kill "$NGINX_PID" 2>/dev/null || true
    fi
    echo "| $label | $(sec "$t_bp") ($(rate "$UP_MIB" "$t_bp")) | $(sec "$t_cold") | $(sec "$t_sh") | $(sec "$t_curl") | $(sec "$t_md5") | **$(ratio "$t_sh" "$t_bp")** | **$(ratio "$t_sh" "$t_cold")** | **$(ratio "$t_curl" "$t_bp")** |"
    rm -rf "$X"
done
echo
echo "The same tmpfs upgrade from a server that offers no sha256 (the original bin-manager's \
answers, served by nginx from static files; the download from bin-manager): $(sec "$t_nosha"), \
$(ratio "$t_nosha" "$t_tmpfs_md5") \`md5sum f\` alone, against $(sec "$t_tmpfs_bp") \
($(ratio "$t_tmpfs_bp" "$t_tmpfs_md5")) with sha256 verified: the verification costs \
$(awk -v a="$t_tmpfs_bp" -v b="$t_nosha" 'BEGIN { printf "%.3f s", a - b }') here."
echo
t_hmd5=$(bench "hash-md5" N "$UP_RUNS" "$UP_WARMUP" "" "$D/hashspeed md5 $D/bins/big")
t_hsha=$(bench "hash-sha256" N "$UP_RUNS" "$UP_WARMUP" "" "$D/hashspeed sha256 $D/bins/big")
[[ $("$D/hashspeed" md5 "$D/bins/big") == "$NEW  $D/bins/big" ]] || { say "hashspeed md5 is wrong"; exit 1; }
echo "The hashes alone, one pass over the same page-cached file (hyperfine, $UP_RUNS runs): \
\`md5sum\` $(sec "$t_md5"); the agent's own md5 (src/hash.rs, \
examples/hashspeed.rs, $HS_PROFILE) $(sec "$t_hmd5"), **$(ratio "$t_hmd5" "$t_md5") \
\`md5sum\`**; its sha256 (sha2) $(sec "$t_hsha"). The agent hashes md5 on its own thread while \
the download runs, so that md5 time is the floor of an upgrade; the rest (receiving, sha256, \
writing, and the server's sendfile, all sharing the $(nproc) cores) runs beside it."
echo

# ---------------------------------------------------------------- 3. RSS
maxrss() { # command... -> peak RSS in KiB of one run
    /usr/bin/time -v -o "$D/time.txt" "$@" >/dev/null 2>"$D/time.err" ||
        { cat "$D/time.err" "$D/time.txt" >&2; say "failed: $*"; exit 1; }
    awk -F': ' '/Maximum resident set size/ { print $2 }' "$D/time.txt"
}
echo "## Peak RSS while downloading"
echo
echo "\`/usr/bin/time -v\`, \"Maximum resident set size\"; one run each, target on disk \
(/var/tmp). For the script, the largest of its processes (bash, curl, jq, md5sum)."
echo
echo "| download | bin-proxy | curl -o f | baseline-agent.sh (largest process) |"
echo "|---|---:|---:|---:|"
mkdir -p "$D/rss"
for n in rss-small rss-big; do
    mib=$RSS_SMALL_MIB; [[ $n == rss-big ]] && mib=$RSS_BIG_MIB
    entry=$(jq -nc --arg n "$n" --arg p "$D/rss/$n" '[{name: $n, version: "latest", hash: "", path: $p, restart: "none"}]')
    manifest "$D/rss-bp.json" bench-rss-bp "$entry"
    manifest "$D/rss-sh.json" bench-rss-sh "$entry"
    rm -f "$D/rss/$n" "$D/rss-bp.json.state"
    k_bp=$(maxrss "$BP" --quiet --config "$D/rss-bp.json")
    [[ $(md5 "$D/rss/$n") == $(md5 "$D/bins/$n") ]] || { say "bin-proxy: wrong $n"; exit 1; }
    rm -f "$D/rss/$n"
    k_curl=$(maxrss curl -fsS -o "$D/rss/$n" "$API/download/$n")
    rm -f "$D/rss/$n"
    k_sh=$(maxrss bash "$SH" "$D/rss-sh.json")
    rm -f "$D/rss/$n" "$D/rss/$n.bak"
    echo "| $mib MiB | $k_bp KiB | $k_curl KiB | $k_sh KiB |"
done
echo

# ---------------------------------------------------------------- 4. sizes
echo "## Size on the host"
echo
echo "What the agent needs on a host: one static file, against the executables and \
shared libraries (resolved with \`ldd\`, symlinks followed, each counted once) that the \
script's curl and jq load. bash and coreutils are not counted."
echo
echo "| what | KiB |"
echo "|---|---:|"
kib() { awk -v b="$1" 'BEGIN { printf "%.0f", b / 1024 }'; }
for f in "$DIST"/*-linux-musl; do
    [[ -f $f ]] && echo "| \`${f#"$DIST"/}\` | $(kib "$(stat -c %s "$f")") |"
done
closure() { # executables... -> bytes of them + their shared libraries
    local e
    for e in "$@"; do
        readlink -f -- "$(command -v "$e")"
        ldd "$(command -v "$e")" | grep -o '/[^ ]*' | xargs -r readlink -f --
    done | sort -u | xargs stat -L -c %s | awk '{ s += $1 } END { print s }'
}
c_curl=$(closure curl)
c_jq=$(closure jq)
c_both=$(closure curl jq)
echo "| curl + its libraries ($(ldd "$(command -v curl)" | grep -c '/') files) | $(kib "$c_curl") |"
echo "| jq + its libraries ($(ldd "$(command -v jq)" | grep -c '/') files) | $(kib "$c_jq") |"
echo "| **curl + jq + their libraries** | **$(kib "$c_both")** |"
echo
echo "Load average at the end: $(cut -d' ' -f1-3 /proc/loadavg)."
say "done"
