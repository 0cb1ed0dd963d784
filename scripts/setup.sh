#!/usr/bin/env bash
# Installs what building and testing bin-proxy needs on a Debian machine, and
# nothing that is already there: rustup components, then Debian packages.
# Idempotent; safe to run on every test run. Needs root for apt-get.
set -euo pipefail

# Debian packages the tests and the demo use: a real supervisord for
# restarts, curl to talk to bin-manager from the shell; strace (fault
# injection), libcap2-bin and attr (setcap/getcap, setfattr/getfattr) for
# tests/faults.rs; headless chromium (and a font) for the console's browser
# test, tests/console.rs, which installs them itself when they are missing;
# jq and python3-requests for the original project's agents
# (tests/legacy_agents.rs runs stand-ins of its shell and Python agents).
packages=(supervisor curl strace libcap2-bin attr chromium fonts-dejavu-core jq python3-requests)
# With --release: what static musl builds for both targets need, and what the
# release tests use (qemu for aarch64, nginx + openssl for HTTPS, readelf).
release=0
[ "${1:-}" = "--release" ] && release=1
if ((release)); then
    packages+=(musl-tools gcc-aarch64-linux-gnu libc6-dev-arm64-cross qemu-user-static nginx openssl binutils hyperfine wrk time jq)
fi

have_component() { rustup component list --installed 2>/dev/null | grep -q "^$1"; }
components=(rustfmt clippy)
((release)) && components+=(rust-src)
for c in "${components[@]}"; do
    have_component "$c" || rustup component add "$c"
done
if ((release)); then
    installed=$(rustup target list --installed)
    for t in x86_64-unknown-linux-musl aarch64-unknown-linux-musl; do
        grep -qx "$t" <<<"$installed" || rustup target add "$t"
    done
fi

missing=()
for p in "${packages[@]}"; do
    dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
if ((${#missing[@]})); then
    echo "setup: installing ${missing[*]}"
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -qq
    apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
    # The packages start system services; the tests run their own instances.
    if command -v service >/dev/null; then
        [ -x /etc/init.d/supervisor ] && { service supervisor stop >/dev/null 2>&1 || true; }
        [ -x /etc/init.d/nginx ] && { service nginx stop >/dev/null 2>&1 || true; }
    fi
fi
