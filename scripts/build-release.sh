#!/usr/bin/env bash
# Builds the release artifacts into dist/: bin-proxy and bin-manager for
# x86_64 and aarch64 Linux, statically linked against musl, plus the agent
# without TLS (plain HTTP only, for the smallest hosts). Fails unless every
# binary is static (no PT_INTERP, no NEEDED) and the agent fits its size
# budgets. Installs what it needs first. Dockerfile.build runs this same
# script, so the two cannot drift apart.
#
# std is rebuilt from source without its `backtrace` feature: the symbolizer
# it brings (gimli, addr2line, miniz, ~210 KiB) is dead weight in a
# panic=abort program, and dropping it is what keeps the agent far inside
# its budgets. That needs -Zbuild-std, which stable cargo accepts with
# RUSTC_BOOTSTRAP=1; the compiler itself is the stable one. Panic messages
# are still printed.
#
# Usage: scripts/build-release.sh [--quick]   (--quick: x86_64 only)
set -euo pipefail
cd "$(dirname "$0")/.."

targets=(x86_64-unknown-linux-musl aarch64-unknown-linux-musl)
[ "${1:-}" = "--quick" ] && targets=(x86_64-unknown-linux-musl)

# Size budgets of the agent (PRODUCT.md §8), bytes.
BUDGET_TLS=$((1536 * 1024))   # 1.5 MiB
BUDGET_NOTLS=$((700 * 1024))  # 700 KiB

scripts/setup.sh --release

export RUSTC_BOOTSTRAP=1
build_std=(-Zbuild-std=std,panic_abort -Zbuild-std-features=)

rm -rf dist && mkdir -p dist
for target in "${targets[@]}"; do
    arch=${target%%-*}
    echo "build-release: $target"
    cargo build --release --locked --target "$target" "${build_std[@]}" --bins
    cargo build --release --locked --target "$target" "${build_std[@]}" --bin bin-proxy \
        --no-default-features --target-dir target/notls
    cp "target/$target/release/bin-proxy" "dist/bin-proxy-$arch-linux-musl"
    cp "target/$target/release/bin-manager" "dist/bin-manager-$arch-linux-musl"
    cp "target/notls/$target/release/bin-proxy" "dist/bin-proxy-notls-$arch-linux-musl"
done

status=0
for f in dist/*; do
    if readelf -lW "$f" | grep -q "Requesting program interpreter" || readelf -dW "$f" | grep -q "(NEEDED)"; then
        echo "build-release: $f is not statically linked" >&2
        status=1
    fi
done

printf '\n%-36s %10s %8s\n' "artifact" "bytes" "KiB"
for f in dist/*; do
    printf '%-36s %10d %8d\n' "${f#dist/}" "$(stat -c %s "$f")" "$(( $(stat -c %s "$f") / 1024 ))"
done
for target in "${targets[@]}"; do
    arch=${target%%-*}
    for pair in "bin-proxy-$arch-linux-musl:$BUDGET_TLS" "bin-proxy-notls-$arch-linux-musl:$BUDGET_NOTLS"; do
        f=dist/${pair%%:*}; budget=${pair##*:}
        if [ "$(stat -c %s "$f")" -gt "$budget" ]; then
            echo "build-release: ${f#dist/} is $(stat -c %s "$f") bytes, over its budget of $budget" >&2
            status=1
        fi
    done
done
(cd dist && sha256sum -- * > SHA256SUMS)
echo "build-release: wrote dist/ ($(ls dist | wc -l) files)"
exit $status
