#!/usr/bin/env bash
# Installs the bin-proxy agent on the machine it runs on (as root), or removes
# it. Safe to run again: every step either rewrites its file whole or leaves
# existing operator data alone.
#
#   1. copies the executable to PREFIX/bin/bin-proxy atomically (temp name in
#      the same directory, chmod 0755, mv over the old one);
#   2. creates /etc/bin-proxy (0755) and, only when there is no manifest yet,
#      writes a starter one with `bin-proxy init` (an existing manifest is never
#      touched; `bin-proxy init` refuses to overwrite one anyway);
#   3. installs /etc/logrotate.d/bin-proxy for /var/log/bin-proxy.log (weekly,
#      8 kept, compressed, copytruncate because cron appends to it with >>);
#   4. schedules the agent every minute:
#      - normally by writing /etc/cron.d/bin-proxy (cron.d format, with the user
#        field): a comment header, PATH, and exactly one job line
#          * * * * * root PREFIX/bin/bin-proxy >> /var/log/bin-proxy.log 2>&1
#        The file is rewritten on every install, never appended to.
#      - when the system has no /etc/cron.d (e.g. Alpine's busybox crond) and no
#        --root was given, by adding the line
#          * * * * * PREFIX/bin/bin-proxy >> /var/log/bin-proxy.log 2>&1
#        to root's crontab (crontab -l / crontab -), unless that exact line is
#        already there.
#
#      - with --systemd (hosts without cron), instead of 3 and 4:
#        /etc/systemd/system/bin-proxy.service (Type=oneshot, one run; the log
#        goes to the journal: journalctl -u bin-proxy) and bin-proxy.timer
#        (every minute, RandomizedDelaySec=50s with FixedRandomDelay: a
#        fixed per-host offset that spreads a fleet over the minute),
#        enabled and started (`systemctl enable --now bin-proxy.timer`; under
#        --root only the timers.target.wants link is made). A cron.d file an
#        earlier install wrote is removed, so the agent is scheduled once.
#
# --uninstall removes the executable, the cron.d file (and that exact line from
# root's crontab, if present), the logrotate snippet and the systemd units
# (stopping the timer first). It keeps /etc/bin-proxy: the manifest and the
# agent's state there are the operator's data.
#
# Usage: scripts/install.sh [--binary PATH] [--prefix DIR] [--root DIR] [--api URL] [--systemd] [--uninstall]
#   --binary PATH  the bin-proxy executable to install. Default: the first that
#                  exists of dist/bin-proxy-$(uname -m)-linux-musl and
#                  target/release/bin-proxy (relative to the repository).
#   --prefix DIR   installation prefix; the agent goes to PREFIX/bin. Default: /usr/local.
#   --root DIR     install into DIR instead of / (every path is prefixed with it;
#                  root privileges are then not required). Always uses cron.d.
#   --api URL      bin-manager's API base, written into a new starter manifest.
#   --systemd      schedule with a systemd timer instead of cron.
#   --uninstall    remove instead of install.
set -euo pipefail
set -E
trap 'echo "install.sh: failed at line $LINENO: $BASH_COMMAND (exit $?)" >&2' ERR
umask 022

me=install.sh
repo=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)

die() {
    printf '%s: %s\n' "$me" "$*" >&2
    exit 1
}
usage() {
    sed -n '/^# Usage:/,/^[^#]/{/^#/s/^# \{0,1\}//p;}' "${BASH_SOURCE[0]}"
}

binary='' prefix=/usr/local root='' api='' uninstall=0 root_given=0 systemd=0
while [ $# -gt 0 ]; do
    opt=$1
    case $opt in
        --binary=* | --prefix=* | --root=* | --api=*)
            set -- "${opt%%=*}" "${opt#*=}" "${@:2}"
            continue
            ;;
        --binary | --prefix | --root | --api)
            [ $# -ge 2 ] || die "$opt needs a value (see --help)"
            case $opt in
                --binary) binary=$2 ;;
                --prefix) prefix=$2 ;;
                --root) root=$2 root_given=1 ;;
                --api) api=$2 ;;
            esac
            shift 2
            ;;
        --uninstall) uninstall=1 && shift ;;
        --systemd) systemd=1 && shift ;;
        -h | --help) usage && exit 0 ;;
        *) die "unknown argument: $opt (see --help)" ;;
    esac
done

case $prefix in
    /*) ;;
    *) die "--prefix must be an absolute path: $prefix" ;;
esac
# Refused before anything is written: the agent could never use it.
case $api in
    '' | http://?* | https://?*) ;;
    *) die "--api \"$api\" must start with http:// or https:// (e.g. http://mgr:8081/api/v1); nothing was changed" ;;
esac
while [ "${prefix%/}" != "$prefix" ]; do prefix=${prefix%/}; done
if [ "$root_given" = 1 ]; then
    [ -n "$root" ] || die "--root needs a directory"
    [ -d "$root" ] || die "--root: no such directory: $root"
    root=$(cd "$root" && pwd)
    [ "$root" = / ] && root=''
elif [ "$(id -u)" != 0 ]; then
    die "run this as root (or pass --root DIR to install into a directory)"
fi

bin_path=$prefix/bin/bin-proxy       # as cron sees it
dest=$root$bin_path                  # as this script writes it
conf_dir=$root/etc/bin-proxy
manifest=$conf_dir/bin-manifests.json
cron_file=$root/etc/cron.d/bin-proxy
logrotate_file=$root/etc/logrotate.d/bin-proxy
unit_dir=$root/etc/systemd/system
service_file=$unit_dir/bin-proxy.service
timer_file=$unit_dir/bin-proxy.timer
timer_link=$unit_dir/timers.target.wants/bin-proxy.timer
log=/var/log/bin-proxy.log
cron_job="* * * * * root $bin_path >> $log 2>&1"
crontab_line="* * * * * $bin_path >> $log 2>&1"

# Root's crontab rather than /etc/cron.d only on a real system without cron.d.
use_crontab=0
if [ "$root_given" = 0 ] && [ ! -d /etc/cron.d ]; then
    use_crontab=1
fi

tmp=''
trap '[ -z "$tmp" ] || rm -f -- "$tmp"' EXIT

# write_file DEST MODE: stdin becomes DEST, atomically (temp file beside it, mv).
write_file() {
    local dir
    dir=$(dirname -- "$1")
    mkdir -p -- "$dir"
    tmp=$(mktemp "$dir/.bin-proxy.XXXXXX")
    cat >"$tmp"
    chmod "$2" -- "$tmp"
    mv -f -- "$tmp" "$1"
    tmp=''
}

# Whether this machine runs systemd as its init (and systemctl can talk to it).
systemd_running() { [ "$root_given" = 0 ] && [ -d /run/systemd/system ] && command -v systemctl >/dev/null 2>&1; }

# Prints root's crontab (nothing when root has none); fails on any other error.
read_crontab() {
    local out err rc=0
    err=$(mktemp)
    out=$(crontab -l 2>"$err") || rc=$?
    if [ "$rc" != 0 ]; then
        if grep -qiE 'no crontab|no such file' "$err"; then
            out=''
        else
            cat "$err" >&2
            rm -f -- "$err"
            die "crontab -l failed"
        fi
    fi
    rm -f -- "$err"
    [ -z "$out" ] || printf '%s\n' "$out"
}

if [ "$uninstall" = 1 ]; then
    if [ -e "$timer_file" ] && systemd_running; then
        systemctl disable --now bin-proxy.timer >/dev/null 2>&1 || true
        echo "stopped and disabled bin-proxy.timer"
    fi
    for f in "$dest" "$cron_file" "$logrotate_file" "$timer_link" "$timer_file" "$service_file"; do
        if [ -e "$f" ] || [ -L "$f" ]; then
            rm -f -- "$f"
            echo "removed $f"
        else
            echo "already absent: $f"
        fi
    done
    if [ "$root_given" = 0 ] && command -v crontab >/dev/null 2>&1; then
        current=$(read_crontab)
        if printf '%s\n' "$current" | grep -qxF -- "$crontab_line"; then
            printf '%s\n' "$current" | { grep -vxF -- "$crontab_line" || true; } | crontab -
            echo "removed the bin-proxy line from root's crontab"
        elif [ "$use_crontab" = 1 ]; then
            echo "already absent: the bin-proxy line in root's crontab"
        fi
    fi
    if systemd_running; then systemctl daemon-reload || true; fi
    echo "kept $conf_dir (the manifest and the agent's state are yours; remove it by hand if no longer needed)"
    exit 0
fi

# ---- install ----

if [ -z "$binary" ]; then
    for c in "dist/bin-proxy-$(uname -m)-linux-musl" target/release/bin-proxy; do
        if [ -f "$repo/$c" ]; then
            binary=$repo/$c
            break
        fi
    done
    [ -n "$binary" ] || die "no bin-proxy build found (looked for $repo/dist/bin-proxy-$(uname -m)-linux-musl and $repo/target/release/bin-proxy): run scripts/build-release.sh or pass --binary PATH"
fi
[ -e "$binary" ] || die "--binary: no such file: $binary"
[ -f "$binary" ] || die "--binary: not a regular file: $binary"
# Runs it once before anything is touched: it must execute here and be the agent.
version=$("$binary" --version 2>/dev/null) || die "$binary does not run on this host (wrong architecture, or not executable?)"
case $version in
    "bin-proxy "*) ;;
    *)
        first=${version%%$'\n'*}
        die "$binary is not the bin-proxy agent (its --version says: ${first:-nothing})"
        ;;
esac

# 1. The executable.
mkdir -p -- "$(dirname -- "$dest")"
tmp=$(mktemp "$(dirname -- "$dest")/.bin-proxy.XXXXXX")
cp -- "$binary" "$tmp"
chmod 0755 -- "$tmp"
sync -- "$tmp" 2>/dev/null || true
mv -f -- "$tmp" "$dest"
tmp=''
echo "installed $dest ($version)"

# 2. The configuration directory and a starter manifest.
if [ ! -d "$conf_dir" ]; then
    mkdir -p -- "$(dirname -- "$conf_dir")"
    mkdir -m 0755 -- "$conf_dir"
    echo "created $conf_dir"
fi
if [ -e "$manifest" ] || [ -L "$manifest" ]; then
    if [ -n "$api" ]; then
        echo "kept existing manifest $manifest (--api not applied: edit manager.api there)"
    else
        echo "kept existing manifest $manifest"
    fi
else
    init_args=(init --config "$manifest")
    [ -z "$api" ] || init_args+=(--api "$api")
    if ! init_out=$("$dest" "${init_args[@]}" 2>&1); then
        printf '%s\n' "$init_out" >&2
        die "bin-proxy init failed"
    fi
    echo "wrote starter manifest $manifest (add your binaries to its \"binaries\" list)"
fi

if [ "$systemd" = 1 ]; then
    # 3+4 for systemd: a oneshot service and its timer; the journal keeps the log.
    write_file "$service_file" 0644 <<EOF
# bin-proxy agent: one run (bin-proxy.timer starts it every minute).
# Installed by bin-proxy's scripts/install.sh (rewritten on every install,
# removed by --uninstall); the manifest is /etc/bin-proxy/bin-manifests.json.
# Its log: journalctl -u bin-proxy
[Unit]
Description=bin-proxy agent: keep this host's binaries on the published builds
After=network-online.target
Wants=network-online.target

[Service]
Type=oneshot
ExecStart=$bin_path
SyslogIdentifier=bin-proxy
EOF
    echo "wrote $service_file"
    write_file "$timer_file" 0644 <<EOF
# Starts bin-proxy.service every minute, each host at its own fixed offset
# within the minute (RandomizedDelaySec with FixedRandomDelay), so that a
# fleet does not reach the server at one instant.
[Unit]
Description=Run the bin-proxy agent every minute

[Timer]
OnCalendar=minutely
RandomizedDelaySec=50s
FixedRandomDelay=true
AccuracySec=1s

[Install]
WantedBy=timers.target
EOF
    echo "wrote $timer_file"
    if systemd_running; then
        systemctl daemon-reload
        systemctl enable --now bin-proxy.timer >/dev/null 2>&1 || die "systemctl enable --now bin-proxy.timer failed (see: systemctl status bin-proxy.timer)"
        echo "enabled and started bin-proxy.timer (log: journalctl -u bin-proxy)"
    else
        mkdir -p -- "$(dirname -- "$timer_link")"
        ln -sfn /etc/systemd/system/bin-proxy.timer "$timer_link"
        echo "enabled bin-proxy.timer ($timer_link)"
    fi
    if [ -e "$cron_file" ]; then
        rm -f -- "$cron_file"
        echo "removed $cron_file (the timer schedules the agent now)"
    fi
    exit 0
fi

# 3. Log rotation.
write_file "$logrotate_file" 0644 <<EOF
# bin-proxy agent log; installed by bin-proxy's scripts/install.sh (rewritten on
# every install). cron appends to the log with >>, so it is truncated in place
# (copytruncate) rather than moved.
$log {
    weekly
    rotate 8
    compress
    missingok
    notifempty
    copytruncate
}
EOF
echo "wrote $logrotate_file"
if [ "$root_given" = 0 ] && ! command -v logrotate >/dev/null 2>&1; then
    echo "note: logrotate is not installed; $log will grow until it is" >&2
fi

# 4. The schedule.
if [ "$use_crontab" = 0 ]; then
    write_file "$cron_file" 0644 <<EOF
# bin-proxy agent: one run every minute, logging to $log.
# Installed by bin-proxy's scripts/install.sh (rewritten on every install,
# removed by --uninstall); the agent's manifest is /etc/bin-proxy/bin-manifests.json.
PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin
$cron_job
EOF
    echo "wrote $cron_file"
    if [ "$root_given" = 0 ] && command -v crontab >/dev/null 2>&1 &&
        read_crontab | grep -v '^[[:space:]]*#' | grep -qF -- "$bin_path"; then
        echo "warning: root's crontab also runs $bin_path; remove that line (crontab -e) so the agent is scheduled once" >&2
    fi
else
    command -v crontab >/dev/null 2>&1 || die "no /etc/cron.d and no crontab command: install a cron daemon first"
    current=$(read_crontab)
    if printf '%s\n' "$current" | grep -qxF -- "$crontab_line"; then
        echo "kept root's crontab (it already runs $bin_path)"
    else
        { [ -z "$current" ] || printf '%s\n' "$current"; printf '%s\n' "$crontab_line"; } | crontab -
        echo "added to root's crontab: $crontab_line"
    fi
fi
