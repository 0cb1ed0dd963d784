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
# The size table in README.md must tell the truth: after a full build the
# script prints the table in the README's format and fails when a size there
# is more than 2% off (the table's own rounding is coarser than any real
# change worth telling users about); --update-readme rewrites the table.
#
# Honours CARGO_TARGET_DIR (default: target/).
#
# Usage: scripts/build-release.sh [--quick] [--update-readme]
#   --quick          x86_64 only (no README check)
#   --update-readme  write the measured sizes into README.md's table
set -euo pipefail
set -E
trap 'echo "build-release.sh: failed at line $LINENO: $BASH_COMMAND (exit $?)" >&2' ERR
cd "$(dirname "$0")/.."

targets=(x86_64-unknown-linux-musl aarch64-unknown-linux-musl)
update_readme=0
for arg in "$@"; do
    case $arg in
        --quick) targets=(x86_64-unknown-linux-musl) ;;
        --update-readme) update_readme=1 ;;
        *) echo "build-release.sh: unknown argument: $arg (usage: scripts/build-release.sh [--quick] [--update-readme])" >&2; exit 2 ;;
    esac
done
out=${CARGO_TARGET_DIR:-target}

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
        --no-default-features --target-dir "$out/notls"
    cp "$out/$target/release/bin-proxy" "dist/bin-proxy-$arch-linux-musl"
    cp "$out/$target/release/bin-manager" "dist/bin-manager-$arch-linux-musl"
    cp "$out/notls/$target/release/bin-proxy" "dist/bin-proxy-notls-$arch-linux-musl"
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

# README.md's size table, as measured: "1.19 MiB" from 1 MiB up, else "472 KiB".
human() { awk -v b="$1" 'BEGIN { if (b >= 1048576) printf "%.2f MiB", b / 1048576; else printf "%d KiB", int(b / 1024 + 0.5) }'; }
bytes_of() { awk -v n="$1" -v u="$2" 'BEGIN { printf "%d", n * (u == "MiB" ? 1048576 : 1024) }'; }
if [ ${#targets[@]} = 2 ]; then
    rows=(
        "\`bin-proxy\` (HTTPS via rustls)|bin-proxy"
        "\`bin-proxy-notls\` (plain HTTP)|bin-proxy-notls"
        "\`bin-manager\`|bin-manager"
    )
    table=''
    stale=()
    for row in "${rows[@]}"; do
        label=${row%%|*} artifact=${row##*|}
        x=$(stat -c %s "dist/$artifact-x86_64-linux-musl")
        a=$(stat -c %s "dist/$artifact-aarch64-linux-musl")
        line="| $label | $(human "$x") / $(human "$a") |"
        table+="$line"$'\n'
        # The README's line for this artifact: "| LABEL | N UNIT / N UNIT |".
        have=$(grep -F -- "| $label |" README.md || true)
        read -r n1 u1 _ n2 u2 <<<"$(sed -E 's/^.*\| ([0-9.]+ [KM]iB) \/ ([0-9.]+ [KM]iB) \|$/\1 \/ \2/' <<<"$have")"
        for pair in "${n1:-0}:${u1:-KiB}:$x" "${n2:-0}:${u2:-KiB}:$a"; do
            IFS=: read -r n u actual <<<"$pair"
            shown=$(bytes_of "$n" "$u")
            if ! awk -v s="$shown" -v a="$actual" 'BEGIN { d = s - a; if (d < 0) d = -d; exit !(d <= a * 0.02) }'; then
                stale+=("$label: README says ${n} ${u}, measured $(human "$actual")")
            fi
        done
        if ((update_readme)); then
            esc=$(sed 's/[&/\]/\\&/g' <<<"$line")
            sed -i -E "s/^\| $(sed 's/[][\.*^$/()]/\\&/g' <<<"$label") \|.*\|$/$esc/" README.md
        fi
    done
    printf '\nREADME.md size table (measured):\n%s' "$table"
    if ((${#stale[@]})) && ((!update_readme)); then
        printf 'build-release: README.md size table is stale (more than 2%% off):\n' >&2
        printf '  %s\n' "${stale[@]}" >&2
        echo "build-release: fix: scripts/build-release.sh --update-readme" >&2
        status=1
    elif ((update_readme)); then
        echo "build-release: README.md size table updated"
    fi
fi
(cd dist && sha256sum -- * > SHA256SUMS)
echo "build-release: wrote dist/ ($(ls dist | wc -l) files)"
exit $status
