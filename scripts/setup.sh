#!/usr/bin/env bash
# Installs what building and testing bin-proxy needs on a Debian machine, and
# nothing that is already there: rustup components, then Debian packages.
# Idempotent; safe to run on every test run. Needs root for apt-get.
#
# Usage: scripts/setup.sh [--release]
#   BIN_PROXY_SETUP_PACKAGES="p1 p2"  install exactly these Debian packages
#                                     instead of the list below (tests use it).
set -euo pipefail
set -E
trap 'echo "setup.sh: failed at line $LINENO: $BASH_COMMAND (exit $?)" >&2' ERR

# Debian packages the tests and the demo use: a real supervisord for
# restarts, curl to talk to bin-manager from the shell; strace (fault
# injection), libcap2-bin and attr (setcap/getcap, setfattr/getfattr) for
# tests/faults.rs; headless chromium (and a font) for the console's browser
# test, tests/console.rs, which installs them itself when they are missing;
# jq and python3-requests for the original project's agents
# (tests/legacy_agents.rs runs stand-ins of its shell and Python agents);
# prometheus-node-exporter (tests/metrics.rs reads the agent's textfile
# metrics through it); systemd for `systemd-analyze verify` of the units
# install.sh writes (tests/install.rs); openssl for a real TLS port
# (tests/agent_run.rs); postgresql and nginx for bin-manager's replicas
# (tests/replicas.rs); tinyproxy, a real HTTP proxy for the agent's
# http_proxy/https_proxy/no_proxy (tests/proxy.rs).
packages=(supervisor curl strace tinyproxy libcap2-bin attr chromium fonts-dejavu-core jq python3-requests prometheus-node-exporter systemd openssl postgresql nginx)
# With --release: what static musl builds for both targets need, and what the
# release tests use (qemu for aarch64, nginx + openssl for HTTPS, readelf).
release=0
[ "${1:-}" = "--release" ] && release=1
if ((release)); then
    packages+=(musl-tools gcc-aarch64-linux-gnu libc6-dev-arm64-cross qemu-user-static nginx openssl binutils hyperfine wrk time jq)
fi
if [ -n "${BIN_PROXY_SETUP_PACKAGES:-}" ]; then
    read -ra packages <<<"$BIN_PROXY_SETUP_PACKAGES"
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
    # Another apt run (a colleague's setup, unattended-upgrades) may hold
    # the locks for a while: wait for them (bounded) rather than fail.
    apt=(apt-get -qq -o DPkg::Lock::Timeout=300)
    for try in $(seq 30); do
        "${apt[@]}" update 2>"/tmp/setup-apt-update.$$" && break
        grep -q "Could not get lock" "/tmp/setup-apt-update.$$" && ((try < 30)) || {
            cat "/tmp/setup-apt-update.$$" >&2
            rm -f "/tmp/setup-apt-update.$$"
            echo "setup.sh: apt-get update failed" >&2
            exit 1
        }
        sleep 2
    done
    rm -f "/tmp/setup-apt-update.$$"
    "${apt[@]}" install -y --no-install-recommends "${missing[@]}" >/dev/null
    # The packages start system services; the tests run their own instances.
    # Only the services of packages installed just now are stopped.
    for p in "${missing[@]}"; do
        case $p in
            supervisor | nginx | prometheus-node-exporter | tinyproxy) ;;
            *) continue ;;
        esac
        if [ -x "/etc/init.d/$p" ] && command -v service >/dev/null; then
            service "$p" stop >/dev/null 2>&1 || true
        fi
    done
fi
exit 0
