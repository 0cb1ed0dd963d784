#!/bin/sh
# Mutation testing of the core modules against the fast unit tests
# (`cargo test --lib`). Not part of test.sh: it takes tens of minutes.
# Run it on the core before you stop; record the table in TESTING.md.
#
#   scripts/mutants.sh            # every core module, one at a time
#   scripts/mutants.sh src/hash.rs  # just one file
#
# Exclusions, each with a reason, are in .cargo/mutants.toml. Uses -j1:
# the build machines are shared.
set -eu
cd "$(dirname "$0")/.."

if ! cargo mutants --version >/dev/null 2>&1; then
    echo "mutants.sh: installing cargo-mutants" >&2
    cargo install --locked cargo-mutants
fi

if [ "$#" -gt 0 ]; then
    files="$*"
else
    files="src/agent/plan.rs src/agent/backoff.rs src/agent/state.rs src/agent/manifest.rs src/protocol.rs src/hash.rs src/log.rs src/manager/rollout/mod.rs src/manager/rollout/policy.rs"
    # The signature module, once it exists.
    for f in src/sign/*.rs; do [ -f "$f" ] && files="$files $f"; done
fi

out=${MUTANTS_OUT:-target/mutants}
mkdir -p "$out"
printf '| file | caught | missed | unviable | timeout |\n|---|---:|---:|---:|---:|\n' > "$out/table.md"
status=0
for f in $files; do
    name=$(echo "$f" | tr '/' '_')
    echo "== $f" >&2
    # --lib for every cargo call (build and test): otherwise each mutant
    # also rebuilds every integration test and example, which no mutant run
    # executes (three times slower).
    cargo mutants -j1 --file "$f" --output "$out/$name" --no-shuffle --cargo-arg=--lib >&2 || status=1
    d="$out/$name/mutants.out"
    # grep -c prints 0 (and fails) for an empty file; a missing one is 0 too.
    n() { if [ -f "$d/$1.txt" ]; then grep -c . "$d/$1.txt" || true; else echo 0; fi; }
    printf '| `%s` | %s | %s | %s | %s |\n' "$f" "$(n caught)" "$(n missed)" "$(n unviable)" "$(n timeout)" >> "$out/table.md"
    if [ -s "$d/missed.txt" ]; then
        echo "missed in $f:" >&2
        cat "$d/missed.txt" >&2
    fi
done
cat "$out/table.md"
exit $status
