#!/usr/bin/env bash
# Every benchmark, side by side with what users would otherwise run, all on
# 127.0.0.1; prints Markdown tables for BENCHMARKS.md.
#   scripts/bench/agent.sh   bin-proxy vs the bash+curl+jq+md5sum agent it
#                            replaces: idle runs, a 256 MiB upgrade, peak RSS,
#                            binary sizes
#   scripts/bench/server.sh  bin-manager vs nginx (wrk), download throughput,
#                            a 10,000-node fleet simulation
# (scripts/bench/optlevels.sh measures the release profile; it rebuilds the
# agent five times, so it is not part of this run.)
# Usage: scripts/bench.sh [--smoke]   --smoke: one short iteration of every
# row, so that scripts/test.sh keeps the benchmarks from rotting.
set -euo pipefail
set -E
trap 'echo "bench.sh: failed at line $LINENO: $BASH_COMMAND (exit $?)" >&2' ERR
cd "$(dirname "$0")/.."
[ -x dist/bin-proxy-x86_64-linux-musl ] && [ -x dist/bin-manager-x86_64-linux-musl ] || scripts/build-release.sh --quick
scripts/bench/agent.sh "$@"
scripts/bench/server.sh "$@"
