#!/usr/bin/env bash
# The competitor in scripts/bench/agent.sh: the original bin-proxy workflow
# (cron runs a bash script with curl, jq and md5sum) written the way a
# careful operator would write it today. Same protocol, same manifest and
# environment as bin-proxy, so the two can be timed against one server:
#
#   BIN_MANAGER_API   API base (else manager.api, else http://127.0.0.1:8081/api/v1)
#   BIN_DOWNLOAD_URL  download base (else manager.downloadUrl, else API/download)
#   BIN_MANAGER_TOKEN bearer token for the API (optional, never printed)
#
# Usage: baseline-agent.sh [MANIFEST]   (else $BIN_PROXY_CONFIG, else
#        /etc/bin-proxy/bin-manifests.json). Exit 0: nothing failed (or another
#        run holds the lock); 1: a binary failed; 2: unreadable manifest.
#
# What it does per run: flock, keepalive GET (POST the registration on 404),
# then per binary (one failing never stops the others): GET bins/NAME, compare,
# download into a mktemp file beside the target, md5 check, PATH.bak, keep the
# mode, mv into place, supervisorctl restart, POST the new hash, rewrite the
# manifest atomically. What it does not do, unlike bin-proxy: fsync, sha256,
# restart confirmation, rollback, quarantine, detect a file changed on disk
# while the manifest hash still equals the published one.
set -uo pipefail

VERSION=1.0.0
MANIFEST=${1:-${BIN_PROXY_CONFIG:-/etc/bin-proxy/bin-manifests.json}}
API_TIMEOUT=30
DOWNLOAD_TIMEOUT=1800
MAX_SIZE=2G
export TZ=UTC

log() { printf '%(%Y-%m-%dT%H:%M:%SZ)T %s\n' -1 "$*" >&2; }

TEMPS=()
cleanup() { ((${#TEMPS[@]} == 0)) || rm -f -- "${TEMPS[@]}"; }
trap cleanup EXIT
trap 'exit 129' HUP
trap 'exit 130' INT
trap 'exit 143' TERM

[[ -r $MANIFEST ]] || { log "ERROR cannot read manifest $MANIFEST"; exit 2; }
[[ $MANIFEST == /* ]] || MANIFEST=$PWD/$MANIFEST

# One run at a time: a second one exits 0 at once.
exec 9>>"$MANIFEST.lock" || { log "ERROR cannot open $MANIFEST.lock"; exit 1; }
flock -n 9 || { log "INFO another run holds $MANIFEST.lock"; exit 0; }

# The whole manifest in one jq call (not one per field): a header line, then
# one line per binary, fields separated by US (0x1f, which, unlike a tab, read
# does not collapse when a field is empty).
rows=$(jq -r '
    def f: join("\u001f");
    (["H", (.manager.api // ""), (.manager.downloadUrl // ""), (.manager.tokenFile // ""),
      (.node.name // ""), (.node.cpuArch // ""), (.node.osRelease // "")] | f),
    ((.binaries // [])[] |
     ["B", .name, (.name | @uri), (.hash // ""), .path, (.downloadUrl // ""),
      (.service // .name), (.restart // "supervisor")] | f)
' "$MANIFEST") || { log "ERROR invalid manifest $MANIFEST"; exit 2; }

US=$'\x1f'
BINS=()
while IFS= read -r line; do
    case $line in
        "H$US"*) IFS=$US read -r _ M_API M_DL M_TOKENFILE NODE ARCH OSREL <<<"$line" ;;
        "B$US"*) BINS+=("$line") ;;
    esac
done <<<"$rows"

API=${BIN_MANAGER_API:-${M_API:-http://127.0.0.1:8081/api/v1}}
API=${API%/}
DL=${BIN_DOWNLOAD_URL:-${M_DL:-$API/download}}
DL=${DL%/}

# Node facts the manifest leaves empty come from the host.
[[ -n $NODE ]] || NODE=${HOSTNAME:-$(uname -n)}
[[ -n $ARCH ]] || ARCH=$(uname -m)
if [[ -z $OSREL && -r /etc/os-release ]]; then
    while IFS='=' read -r k v; do
        [[ $k == PRETTY_NAME ]] && { v=${v#\"}; OSREL=${v%\"}; }
    done </etc/os-release
fi
if [[ $NODE =~ ^[A-Za-z0-9._~-]+$ ]]; then NODE_Q=$NODE; else NODE_Q=$(jq -rn --arg n "$NODE" '$n | @uri'); fi

# The token goes in a header file so it never shows up in ps.
CURL=(curl -fsS --connect-timeout 10)
token=${BIN_MANAGER_TOKEN:-}
if [[ -z $token && -n $M_TOKENFILE && -r $M_TOKENFILE ]]; then
    token=$(<"$M_TOKENFILE")
fi
if [[ -n $token ]]; then
    hdr=$(mktemp) || exit 1
    TEMPS+=("$hdr")
    printf 'Authorization: Bearer %s\n' "$token" >"$hdr"
    CURL+=(-H "@$hdr")
fi
API_CURL=("${CURL[@]}" --max-time "$API_TIMEOUT")

# Keepalive; register on 404. A failure here is logged, the run goes on.
code=$("${API_CURL[@]}" -o /dev/null -w '%{http_code}' "$API/keepalive?node=$NODE_Q" 2>/dev/null)
if [[ $code == 404 ]]; then
    printf -v now '%(%Y-%m-%dT%H:%M:%SZ)T' -1
    if body=$(jq -c --arg name "$NODE" --arg arch "$ARCH" --arg os "$OSREL" --arg ver "$VERSION" --arg now "$now" \
        '{name: $name, cpuArch: $arch, osRelease: $os, proxyVersion: $ver,
          binaries: [(.binaries // [])[] | {name, version: (.version // "latest"), hash: (.hash // "")}],
          lastSeen: $now}' "$MANIFEST") &&
        "${API_CURL[@]}" -o /dev/null -X POST -H 'Content-Type: application/json' \
            --data-binary "$body" "$API/keepalive?node=$NODE_Q"; then
        log "INFO registered node $NODE"
    else
        log "WARN could not register node $NODE"
    fi
elif [[ $code != 2?? ]]; then
    log "WARN keepalive failed (HTTP ${code:-none})"
fi

# Writes NAME's new hash into the manifest: jq into a temp file, same mode, mv.
record() { # name hash
    local t
    t=$(mktemp "$MANIFEST.XXXXXX") || return 1
    TEMPS+=("$t")
    jq --arg n "$1" --arg h "$2" '(.binaries[] | select(.name == $n) | .hash) = $h' "$MANIFEST" >"$t" &&
        chmod --reference="$MANIFEST" "$t" &&
        mv -f "$t" "$MANIFEST"
}

report() { # name-uri hash
    "${API_CURL[@]}" -o /dev/null -X POST -H 'Content-Type: application/json' \
        --data-binary "{\"hash\":\"$2\"}" "$API/bins/$1?node=$NODE_Q"
}

upgraded=0 current=0 failed=0

process() { # one manifest line
    local _ name q rec path url service restart remote actual target dir tmp got
    IFS=$US read -r _ name q rec path url service restart <<<"$1"
    [[ $path == /* ]] || { log "ERROR $name: path must be absolute: $path"; return 1; }

    remote=$("${API_CURL[@]}" "$API/bins/$q" |
        jq -r '(.code // 200) as $c | if $c == 200 or $c == 0 then ((.data // .).hash // "") else "" end') ||
        { log "ERROR $name: cannot get the published hash"; return 1; }
    remote=${remote,,}
    [[ $remote =~ ^[0-9a-f]{32}$ ]] || { log "ERROR $name: bad published hash '$remote'"; return 1; }

    # The careful shortcut: when the manifest already records the published
    # hash and the file exists, do not md5sum it (that would read every
    # binary every minute). md5sum the file only when the hashes differ or
    # the file is missing, to avoid a download when it is already in place.
    if [[ ${rec,,} == "$remote" && -f $path ]]; then
        current=$((current + 1))
        return 0
    fi
    target=$path
    [[ -L $path ]] && target=$(readlink -f -- "$path")
    if [[ -f $target ]]; then
        actual=$(md5sum -- "$target") || { log "ERROR $name: cannot read $target"; return 1; }
        if [[ ${actual%% *} == "$remote" ]]; then
            log "INFO $name: already at ${remote:0:8}, recording it"
            report "$q" "$remote" || log "WARN $name: could not report the hash"
            record "$name" "$remote" || { log "ERROR $name: cannot rewrite $MANIFEST"; return 1; }
            current=$((current + 1))
            return 0
        fi
    fi

    [[ -n $url ]] || url=$DL/$q
    dir=${target%/*}
    [[ -d $dir ]] || { log "ERROR $name: no directory $dir"; return 1; }
    tmp=$(mktemp "$dir/.${target##*/}.new.XXXXXX") || { log "ERROR $name: cannot create a temp file in $dir"; return 1; }
    TEMPS+=("$tmp")
    log "INFO $name: downloading ${remote:0:8} from $url"
    if ! "${CURL[@]}" --max-time "$DOWNLOAD_TIMEOUT" --max-filesize "$MAX_SIZE" --retry 2 -o "$tmp" "$url"; then
        log "ERROR $name: download failed"
        rm -f -- "$tmp"
        return 1
    fi
    got=$(md5sum -- "$tmp") || { rm -f -- "$tmp"; return 1; }
    got=${got%% *}
    if [[ $got != "$remote" ]]; then
        log "ERROR $name: md5 mismatch: got $got, expected $remote"
        rm -f -- "$tmp"
        return 1
    fi
    if [[ -e $target ]]; then
        chown --reference="$target" -- "$tmp" 2>/dev/null # as root; otherwise it is ours anyway
        if ! chmod --reference="$target" -- "$tmp" ||
            ! { ln -f -- "$target" "$target.bak" 2>/dev/null || cp -p -- "$target" "$target.bak"; }; then
            log "ERROR $name: cannot keep $target.bak"
            rm -f -- "$tmp"
            return 1
        fi
    else
        chmod 0755 -- "$tmp"
    fi
    mv -f -- "$tmp" "$target" || { log "ERROR $name: cannot move the new file into place"; rm -f -- "$tmp"; return 1; }
    log "INFO $name: installed ${remote:0:8} at $target"

    local rc=0
    case $restart in
        none) ;;
        supervisor | "")
            supervisorctl restart "$service" >/dev/null || { log "ERROR $name: supervisorctl restart $service failed"; rc=1; } ;;
        *)
            local cmd
            read -ra cmd <<<"$restart"
            "${cmd[@]}" || { log "ERROR $name: '$restart' failed"; rc=1; } ;;
    esac
    report "$q" "$remote" || log "WARN $name: could not report the hash"
    record "$name" "$remote" || { log "ERROR $name: cannot rewrite $MANIFEST"; return 1; }
    upgraded=$((upgraded + 1))
    return "$rc"
}

for b in "${BINS[@]}"; do
    process "$b" || failed=$((failed + 1))
done
log "INFO ${#BINS[@]} binaries: $current up to date, $upgraded changed, $failed failed"
((failed == 0))
