#!/usr/bin/env bash
# Runs every check the project has: formatting, lints, unit and integration
# tests (real bin-proxy executables against servers on 127.0.0.1). Installs
# what it needs first (scripts/setup.sh). Usage: scripts/test.sh
set -euo pipefail
cd "$(dirname "$0")/.."

step() { printf '\n==> %s\n' "$*"; }

step "setup"
scripts/setup.sh

step "cargo fmt --check"
cargo fmt --all -- --check

step "cargo clippy"
cargo clippy --all-targets -- -D warnings

step "cargo test"
cargo test --all-targets 2>&1

step "all checks passed"
