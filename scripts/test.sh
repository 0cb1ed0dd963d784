#!/usr/bin/env bash
# Runs every check the project has: formatting, lints, unit and integration
# tests (real bin-proxy and bin-manager executables against servers on
# 127.0.0.1), the README's demo end to end, the static release build with its
# size budgets, and the release artifacts run under qemu, in an empty chroot,
# in a PID namespace as a container's PID 1 and behind nginx with TLS.
# Installs what it needs first (scripts/setup.sh). Usage: scripts/test.sh
set -euo pipefail
set -E
cd "$(dirname "$0")/.."

current=''
step() {
    current=$*
    printf '\n==> %s\n' "$*"
}
trap 'echo "test.sh: step \"$current\" failed at line $LINENO: $BASH_COMMAND (exit $?)" >&2' ERR

step "setup"
scripts/setup.sh --release

step "cargo fmt --check"
cargo fmt --all -- --check

step "cargo clippy"
cargo clippy --workspace --all-targets -- -D warnings

step "cargo test"
cargo test --all-targets 2>&1

step "the README's demo, end to end (scripts/demo.sh, at most 5 minutes)"
timeout --kill-after=10 300 scripts/demo.sh

step "release build (static musl, x86_64 + aarch64, size budgets, README's size table)"
scripts/build-release.sh

step "release artifacts where users run them (qemu aarch64, empty chroot, container PID 1, HTTPS via nginx)"
scripts/test-release.sh

step "crash consistency: kill -9 at random moments during upgrades (40 here; scripts/killloop.sh 200 for the full run)"
scripts/killloop.sh 40

step "benchmarks, one short iteration each (so they cannot rot; numbers in BENCHMARKS.md)"
scripts/bench.sh --smoke

step "all checks passed"
