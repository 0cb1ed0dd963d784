#!/usr/bin/env bash
# Measures the agent's release opt-level choices: binary size (x86_64 musl,
# with and without TLS) and download+verify time of a 256 MiB build served by
# bin-manager on 127.0.0.1, into tmpfs so that the CPU path is what is timed.
# Each variant is built the way scripts/build-release.sh builds (std rebuilt
# without its backtrace symbolizer). Prints a Markdown table.
# Usage: scripts/bench/optlevels.sh [RUNS]   (default 5 runs per variant)
set -euo pipefail
set -E
trap 'echo "optlevels.sh: failed at line $LINENO: $BASH_COMMAND (exit $?)" >&2' ERR
cd "$(dirname "$0")/../.."
runs=${1:-5}
scripts/setup.sh --release >/dev/null
command -v hyperfine >/dev/null || { apt-get install -y -qq hyperfine >/dev/null; }

target=x86_64-unknown-linux-musl
export RUSTC_BOOTSTRAP=1
build_std=(-Zbuild-std=std,panic_abort -Zbuild-std-features=)
# md5 is the agent's own (src/hash.rs) since this table was made; the
# variants once set the md5 crate to 3 as well.
hot=(--config 'profile.release.package.sha2.opt-level=3'
     --config 'profile.release.package.minreq.opt-level=3')
variants=(s z 3 s+hot3 z+hot3)

build() { # variant, extra cargo args...
    local v=$1; shift
    local base=${v%%+*} extra=()
    [[ $v == *+hot3 ]] && extra=("${hot[@]}")
    CARGO_PROFILE_RELEASE_OPT_LEVEL=$base cargo build -q --release --target "$target" \
        "${build_std[@]}" --bin bin-proxy --target-dir "target/opt-$v$1" "${extra[@]}" "${@:2}"
}

for v in "${variants[@]}"; do
    build "$v" "" 
    build "$v" "-notls" --no-default-features
done
cargo build -q --release --bin bin-manager

T=$(mktemp -d /dev/shm/bin-proxy-opt.XXXXXX)
trap 'kill $MPID 2>/dev/null; rm -rf "$T"' EXIT
mkdir -p "$T/bins" "$T/opt"
head -c $((256 << 20)) /dev/urandom > "$T/bins/big"
target/release/bin-manager --quiet --bin-dir "$T/bins" --state-file "$T/state.json" --listen 127.0.0.1:0 2> "$T/m.log" &
MPID=$!
for _ in $(seq 100); do grep -q "listening on" "$T/m.log" && break; sleep 0.1; done
API="$(grep -o 'http://127.0.0.1:[0-9]*' "$T/m.log" | head -1)/api/v1"
cat > "$T/manifest.json" <<JSON
{"node":{"name":"bench"},"binaries":[{"name":"big","hash":"","path":"$T/opt/big","restart":"none"}]}
JSON
# Warm the server's hash cache.
curl -s "$API/bins/big" >/dev/null

echo
echo "| opt-level | agent (TLS) | agent (no TLS) | download+verify 256 MiB (median) |"
echo "|---|---:|---:|---:|"
for v in "${variants[@]}"; do
    bin="target/opt-$v/$target/release/bin-proxy"
    hyperfine -N --runs "$runs" --warmup 1 --export-json "$T/h.json" \
        --prepare "sh -c 'rm -f $T/opt/big $T/opt/big.bak $T/m.json.state; cp $T/manifest.json $T/m.json'" \
        "$bin --quiet --config $T/m.json --api $API" >/dev/null
    median=$(python3 -c "import json;print('%.3f s' % json.load(open('$T/h.json'))['results'][0]['median'])")
    echo "| $v | $(stat -c %s "$bin") | $(stat -c %s "target/opt-$v-notls/$target/release/bin-proxy") | $median |"
done
