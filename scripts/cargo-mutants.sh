#!/usr/bin/env bash
# Mutation testing of the host-tested crates (panda-abi, panda-mm, panda-sched) with
# cargo-mutants: it generates every mutant it can (operators swapped, bodies replaced
# by a default value, conditions negated), builds each in a scratch copy of the tree
# and runs the crate's host tests; a mutant the tests still pass is MISSED. Installs
# cargo-mutants if it is missing. Prints one line per crate and the missed mutants,
# closes with `N passed, M failed` (passed = caught or timed out, failed = missed) and
# exits 0 only if nothing was missed. Equivalent mutants are excluded in
# .cargo/mutants.toml, each with its reason in docs/TESTING.md.
# Not part of scripts/test.sh: it takes over an hour (see docs/TESTING.md).
set -euo pipefail
# shellcheck source=scripts/lib.sh
. "$(dirname "${BASH_SOURCE[0]}")/lib.sh"

usage() {
    cat <<'TXT'
usage: scripts/cargo-mutants.sh [--crates LIST] [--jobs N] [--timeout S] [--out DIR] [-- ARGS...]

  --crates LIST  comma-separated crates to mutate (default abi,mm,sched)
  --jobs N       mutants built and tested at once (default 1)
  --timeout S    limit per test run in seconds; a mutant that hits it is a TIMEOUT (default 120)
  --out DIR      where each crate's mutants.out goes (default build/cargo-mutants)
  -- ARGS...     passed to cargo mutants as they are (e.g. -- -F 'Region::contains')
  -h, --help     this text
TXT
}

crates=abi,mm,sched jobs=1 timeout_s=120 out="$PANDA_ROOT/build/cargo-mutants" extra=()
while [ $# -gt 0 ]; do
    case "$1" in
        --crates) [ $# -ge 2 ] || panda_usage_error "--crates needs a list"; crates=$2; shift 2 ;;
        --jobs) [ $# -ge 2 ] || panda_usage_error "--jobs needs a number"; jobs=$2; shift 2 ;;
        --timeout) [ $# -ge 2 ] || panda_usage_error "--timeout needs seconds"; timeout_s=$2; shift 2 ;;
        --out) [ $# -ge 2 ] || panda_usage_error "--out needs a directory"; out=$2; shift 2 ;;
        --) shift; extra=("$@"); break ;;
        -h|--help) usage; exit 0 ;;
        *) panda_usage_error "unknown option: $1" ;;
    esac
done
[[ "$crates" =~ ^(abi|mm|sched)(,(abi|mm|sched))*$ ]] || panda_usage_error "--crates takes abi, mm and sched"
[[ "$jobs" =~ ^[1-9][0-9]*$ ]] || panda_usage_error "--jobs must be a positive number"
[[ "$timeout_s" =~ ^[1-9][0-9]*$ ]] || panda_usage_error "--timeout must be whole seconds"

panda_ensure_rust
if ! cargo mutants --version >/dev/null 2>&1; then
    echo "panda: installing cargo-mutants (cargo install cargo-mutants --locked; a few minutes)..." >&2
    cargo install cargo-mutants --locked >/dev/null 2>&1 || panda_die "cargo install cargo-mutants failed"
fi
echo "panda: $(cargo mutants --version)" >&2
cd "$PANDA_ROOT"

# Lines in one of cargo-mutants' outcome lists (absent when empty).
count() { if [ -f "$1" ]; then grep -c . "$1" || true; else echo 0; fi; }

passed=0 failed=0 missed_all=()
for crate in ${crates//,/ }; do
    dir="$out/$crate"
    mkdir -p "$dir"
    start=$(date +%s)
    status=0
    cargo mutants -p "panda-$crate" --no-shuffle -j "$jobs" --timeout "$timeout_s" --output "$dir" \
        "${extra[@]}" >"$dir/log.txt" 2>&1 || status=$?
    seconds=$(( $(date +%s) - start ))
    # 0: all caught; 2: some missed; 3: some timed out; anything else: no result.
    case "$status" in
        0|2|3) ;;
        *) echo "FAIL panda-$crate: cargo mutants exited $status (see $dir/log.txt)"; failed=$((failed + 1)); continue ;;
    esac
    results="$dir/mutants.out"
    caught=$(count "$results/caught.txt") missed=$(count "$results/missed.txt")
    unviable=$(count "$results/unviable.txt") timeouts=$(count "$results/timeout.txt")
    viable=$((caught + missed + timeouts))
    pct=$(awk -v c="$caught" -v v="$viable" 'BEGIN { if (v) printf "%.1f", 100 * c / v; else print "-" }')
    printf 'panda-%s: %d mutants, %d viable: %d caught, %d missed, %d timeouts, %d unviable; %s%% caught (%dm%02ds)\n' \
        "$crate" $((viable + unviable)) "$viable" "$caught" "$missed" "$timeouts" "$unviable" "$pct" \
        $((seconds / 60)) $((seconds % 60))
    passed=$((passed + caught + timeouts)) failed=$((failed + missed))
    if [ "$missed" -gt 0 ]; then mapfile -t -O "${#missed_all[@]}" missed_all < "$results/missed.txt"; fi
done

for m in "${missed_all[@]}"; do echo "MISSED $m"; done
echo "$passed passed, $failed failed"
[ "$failed" = 0 ]
