#!/usr/bin/env bash
# Coverage-guided fuzzing with cargo-fuzz (libFuzzer) of what bin-proxy reads
# from outside: the manifest parser (target `manifest`: no panic, and an
# accepted manifest round-trips through to_json) and the server-answer
# decoding (target `answer`: unwrap_answer, bin_info, the registry's
# Node::from_json; no panic). Runs each target in fuzz/ for SECONDS (default
# 60), starting from the corpora in fuzz/corpus/ (libFuzzer adds what it finds
# there; only the seed-* files are committed). Exits non-zero, naming the
# saved input, if a target crashes.
#
# CI does not run this: cargo-fuzz needs a nightly toolchain. What CI runs is
# the stable, deterministic smoke over the same seeds and checks,
# tests/fuzz_smoke.rs, part of `cargo test`.
#
# Installs what it needs first (a nightly toolchain, cargo-fuzz), once.
# Usage: scripts/fuzz.sh [SECONDS]
set -euo pipefail
set -E
trap 'echo "fuzz.sh: failed at line $LINENO: $BASH_COMMAND (exit $?)" >&2' ERR
cd "$(dirname "$0")/.."

secs=${1:-60}
if ! [[ $secs =~ ^[1-9][0-9]*$ ]]; then
    echo "usage: $0 [SECONDS]   (seconds per target, default 60)" >&2
    exit 2
fi
targets=(manifest answer)

step() { printf '\n==> %s\n' "$*"; }

if ! command -v rustup >/dev/null; then
    echo "error: cargo-fuzz needs a nightly toolchain, and there is no rustup to install one" >&2
    exit 1
fi
if ! rustup toolchain list | grep -q '^nightly'; then
    step "installing a nightly toolchain (cargo-fuzz needs one)"
    if ! rustup toolchain install nightly --profile minimal; then
        echo "error: cargo-fuzz needs a nightly toolchain and 'rustup toolchain install nightly' failed;" >&2
        echo "       install one by hand, or rely on the stable smoke: cargo test --test fuzz_smoke" >&2
        exit 1
    fi
fi
if ! cargo fuzz --version >/dev/null 2>&1; then
    step "installing cargo-fuzz"
    cargo install cargo-fuzz --locked
fi

# Release build with debug assertions and overflow checks, AddressSanitizer.
flags=(--release --debug-assertions)

step "building the fuzz targets"
cargo +nightly fuzz build "${flags[@]}"

logs=fuzz/target/logs
mkdir -p "$logs"
crashed=()
for target in "${targets[@]}"; do
    step "fuzzing $target for ${secs}s"
    log="$logs/$target.log"
    # libFuzzer's progress goes to the log (thousands of lines); the summary
    # or, on a crash, the panic and the saved input are shown.
    # -timeout: an input that takes this long is a hang, saved like a crash.
    if cargo +nightly fuzz run "${flags[@]}" "$target" -- \
        -max_total_time="$secs" -timeout=10 -print_final_stats=1 >"$log" 2>&1; then
        grep -E '^(Done|stat::(number_of_executed_units|new_units_added|peak_rss_mb))' "$log" || true
        echo "$target: no crash in ${secs}s ($(find "fuzz/corpus/$target" -type f | wc -l) inputs in its corpus; log: $log)"
    else
        # The panic (or libFuzzer's reason: timeout, out of memory, ...),
        # then cargo-fuzz's summary: the input's path and bytes, the command
        # that reproduces it.
        grep -m1 -A3 -E "panicked at|==ERROR: (libFuzzer|AddressSanitizer)" "$log" || true
        if grep -q '^Failing input:' "$log"; then
            sed -n '/^Failing input:/,/^Error:/p' "$log"
        else
            tail -n 40 "$log"
        fi
        artifact=$(sed -n 's/.*Test unit written to \(.*\)$/\1/p' "$log" | tail -n 1)
        crashed+=("$target: ${artifact:-no input saved; see $log}")
    fi
done

if ((${#crashed[@]})); then
    step "crashes found"
    for c in "${crashed[@]}"; do
        echo "  $c"
    done
    echo "Reproduce with: cargo +nightly fuzz run ${flags[*]} TARGET ARTIFACT"
    echo "Keep a fixed input as a regression seed: fuzz/corpus/TARGET/seed-crash-NAME"
    exit 1
fi
step "no crash in ${targets[*]} (${secs}s each)"
