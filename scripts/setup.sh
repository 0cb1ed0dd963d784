#!/usr/bin/env bash
# Installs what building and testing bin-proxy needs on a Debian machine, and
# nothing that is already there: rustup components, then Debian packages.
# Idempotent; safe to run on every test run. Needs root for apt-get.
set -euo pipefail

# Debian packages the tests and the demo use: a real supervisord for
# restarts, curl to talk to bin-manager from the shell.
packages=(supervisor curl)

have_component() { rustup component list --installed 2>/dev/null | grep -q "^$1"; }
for c in rustfmt clippy; do
    have_component "$c" || rustup component add "$c"
done

missing=()
for p in "${packages[@]}"; do
    dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
if ((${#missing[@]})); then
    echo "setup: installing ${missing[*]}"
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -qq
    apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
    # The package starts a system supervisord; the tests run their own.
    if command -v service >/dev/null && [ -x /etc/init.d/supervisor ]; then
        service supervisor stop >/dev/null 2>&1 || true
    fi
fi
