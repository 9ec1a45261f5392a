#!/usr/bin/env bash
# Soak test: boots the system-call fuzzer (user/programs/src/bin/fuzz.rs) as init again
# and again, for N minutes per CPU count, and reports every kernel panic, hang, leaked
# frame or fuzzer violation with the seed and the command that reproduces it.
# See docs/TESTING.md and --help.
set -euo pipefail
# shellcheck source=scripts/lib.sh
. "$(dirname "${BASH_SOURCE[0]}")/lib.sh"

usage() {
    cat <<'TXT'
usage: scripts/soak.sh [--minutes N] [--smp LIST] [--seed S] [--boot-seconds N]
                       [--big-floods] [--nested] [--cmdline WORDS] [--accel kvm|tcg]
                       [--out DIR]

  --minutes N         fuzzing time per CPU count, in minutes (default 10)
  --smp LIST          CPU counts, comma-separated (default 2,8)
  --seed S            seed of the first boot (decimal or 0x hex, 1..0xffffffff); the
                      next boots use S+1, S+2, ... (default: a random seed per boot)
  --boot-seconds N    fuzzing time per boot (default 300; the last boot of a CPU count
                      may be shorter)
  --big-floods        thread-flood children start up to 100000 threads, not 2000
                      (exhausts the kernel heap)
  --nested            a quarter of the fuzzer's children are full fuzzers of their own
                      (1 s each; fuzz's argument bit 57)
  --cmdline WORDS     more kernel command-line words for every boot, e.g.
                      "mm.poison=on" (frames checked for writes while free)
  --accel kvm|tcg     accelerator (default: KVM only where it really works)
  --out DIR           logs and results.tsv (default build/soak/DATE)
  -h, --help          this text

Each boot runs `scripts/run.sh -smp N --cmdline "init=fuzz init.arg=ARG"` with a
time-out well above its duration: a time-out is reported as a hang.

Exit status: 0 if every boot passed, 1 if any failed, 64 for bad usage.
TXT
}

minutes=10 smps=2,8 seed="" boot_seconds=300 accel=auto out="" big=0 nested=0 extra=""
need() { [ "$2" -ge 2 ] || panda_usage_error "$1 needs a value"; }
while [ $# -gt 0 ]; do
    case "$1" in
        --minutes) need "$1" $#; minutes=$2; shift 2 ;;
        --smp|-smp) need "$1" $#; smps=$2; shift 2 ;;
        --seed) need "$1" $#; seed=$2; shift 2 ;;
        --boot-seconds) need "$1" $#; boot_seconds=$2; shift 2 ;;
        --big-floods) big=1; shift ;;
        --nested) nested=1; shift ;;
        --cmdline) need "$1" $#; extra=" $2"; shift 2 ;;
        --accel) need "$1" $#; accel=$2; shift 2 ;;
        --out) need "$1" $#; out=$2; shift 2 ;;
        -h|--help) usage; exit 0 ;;
        *) panda_usage_error "unknown option: $1" ;;
    esac
done

{ [[ "$minutes" =~ ^[1-9][0-9]*$ ]] && [ "$minutes" -le 100000 ]; } ||
    panda_usage_error "--minutes must be a whole number from 1, not '$minutes'"
[[ "$smps" =~ ^[1-9][0-9]*(,[1-9][0-9]*)*$ ]] || panda_usage_error "--smp must be a comma-separated list of CPU counts, not '$smps'"
IFS=, read -r -a smp_list <<<"$smps"
for n in "${smp_list[@]}"; do [ "$n" -le 255 ] || panda_usage_error "--smp: $n is more than 255"; done
{ [[ "$boot_seconds" =~ ^[1-9][0-9]*$ ]] && [ "$boot_seconds" -le 3600 ]; } ||
    panda_usage_error "--boot-seconds must be a whole number from 1 to 3600, not '$boot_seconds'"
if [ -n "$seed" ]; then
    { [[ "$seed" =~ ^(0x[0-9a-fA-F]{1,8}|[0-9]{1,10})$ ]] && [ $((seed)) -ge 1 ] && [ $((seed)) -le 4294967295 ]; } ||
        panda_usage_error "--seed must be 1..0xffffffff (decimal or 0x hex), not '$seed'"
    seed=$((seed))
fi
case "$accel" in auto|kvm|tcg) ;; *) panda_usage_error "--accel must be kvm or tcg, not '$accel'" ;; esac
[ -n "$out" ] || out="$PANDA_ROOT/build/soak/$(date +%Y%m%d-%H%M%S)"
mkdir -p "$out" || panda_die "cannot create $out"
out=$(cd "$out" && pwd)

panda_ensure_rust
panda_ensure_qemu
panda_build_kernel
panda_build_user
panda_pack_initrd "$PANDA_INITRD"
# Every boot runs this build, whatever happens to the tree meanwhile.
mkdir -p "$out/build"
cp "$PANDA_KERNEL" "$out/build/panda-kernel"
cp "$PANDA_INITRD" "$out/build/initrd.tar"
export PANDA_PREBUILT_KERNEL="$out/build/panda-kernel" PANDA_PREBUILT_INITRD="$out/build/initrd.tar"
accel_args=()
[ "$accel" = auto ] || accel_args=(--accel "$accel")

results="$out/results.tsv"
printf 'smp\tboot\tseed\tseconds\tstatus\tcalls\tchildren\tverdict\tlog\n' >"$results"
total_calls=0 total_children=0 total_seconds=0 boots=0 failed=0 seeds=() failures=()

# The value of KEY=NUMBER on the fuzzer's done line of LOG (0 if absent).
# A field of the fuzzer's closing line, or of its last progress line if the boot
# failed before the end (so a failed boot still counts the calls it made).
field() {
    local line
    line=$(grep -a 'fuzz: done' "$2" | tail -n1 || true)
    [ -n "$line" ] || line=$(grep -a 'fuzz: t=' "$2" | tail -n1 | sed 's/t=\([0-9]*\)s/seconds=\1/' || true)
    echo "$line" | grep -ao "$1=[0-9]*" | head -n1 | cut -d= -f2 || true
}

# What to show of a failed boot: a panic and its backtrace, or the fuzzer's last
# progress and complaints, then the log's last lines.
last_lines() {
    {
        if grep -aqE '^(PANIC|EXCEPTION) ' "$1"; then
            grep -a -m1 -A12 -E '^(PANIC|EXCEPTION) ' "$1"
        else
            grep -aE 'fuzz: (t=|VIOLATION|FAIL)|FAIL frames' "$1" | tail -n 5
            tail -n 3 "$1"
        fi
    } | tr -d '\000\r' | awk '!seen[$0]++' | cut -c1-300 | sed 's/^/      /'
}

echo "soak: $minutes min per CPU count at -smp $smps, boots of up to ${boot_seconds}s; logs in $out"
boot_seed=$seed
for n in "${smp_list[@]}"; do
    left=$((minutes * 60)) boot=0
    while [ "$left" -gt 0 ]; do
        boot=$((boot + 1)) boots=$((boots + 1))
        secs=$((left < boot_seconds ? left : boot_seconds))
        started=$SECONDS
        if [ -n "$boot_seed" ]; then
            s=$boot_seed; boot_seed=$(( (boot_seed % 4294967295) + 1 ))
        else
            s=0
            while [ "$s" = 0 ]; do s=$(od -An -N4 -tu4 /dev/urandom | tr -d ' '); done
        fi
        seeds+=("$(printf '0x%x' "$s")")
        arg=$(( (nested << 57) | (big << 56) | (secs << 32) | s ))
        # Boot, set-up and the closing waits take far less than this; beyond it, a hang.
        limit=$((secs + secs / 2 + 120 + 4 * n))
        log="$out/smp$n-boot$boot.log"
        cmd="scripts/run.sh -smp $n --timeout $limit --cmdline \"init=fuzz init.arg=$arg$extra\""
        [ "$accel" = auto ] || cmd="$cmd --accel $accel"
        status=0
        scripts/run.sh "${accel_args[@]}" -smp "$n" --timeout "$limit" --cmdline "init=fuzz init.arg=$arg$extra" \
            >"$log" 2>&1 </dev/null || status=$?
        # The budget is wall time: a boot that fails early leaves the rest for the next.
        spent=$((SECONDS - started)); [ "$spent" -ge 1 ] || spent=1
        left=$((left - (spent < secs ? spent : secs)))
        calls=$(field calls "$log"); children=$(field children "$log"); ran=$(field seconds "$log")
        calls=${calls:-0} children=${children:-0} ran=${ran:-0}
        verdict=ok
        if [ "$status" = 3 ]; then verdict="hang (no end within ${limit}s)"
        elif grep -aqE '^(PANIC|EXCEPTION) ' "$log"; then verdict="kernel panic"
        elif [ "$status" = 2 ]; then verdict="guest ended without reporting (a triple fault)"
        elif grep -aq 'FAIL frames_owned_once' "$log"; then verdict="frame freed twice"
        elif grep -aq 'FAIL frames_untouched_while_free' "$log"; then verdict="free frame written (mm.poison)"
        elif grep -aq 'FAIL frames_back_to_baseline' "$log"; then verdict="frames leaked"
        elif grep -aqE 'fuzz: (VIOLATION|FAIL)' "$log"; then verdict="fuzzer found a violation"
        elif [ "$status" != 0 ]; then verdict="guest failure (status $status)"
        elif ! grep -aq 'fuzz: done' "$log" || ! grep -aq '^ok frames_back_to_baseline' "$log"; then
            verdict="no closing report"
        fi
        total_calls=$((total_calls + calls)) total_children=$((total_children + children))
        total_seconds=$((total_seconds + ran))
        printf '%s\t%s\t0x%x\t%s\t%s\t%s\t%s\t%s\t%s\n' "$n" "$boot" "$s" "$secs" "$status" "$calls" \
            "$children" "$verdict" "$log" >>"$results"
        rate=$(( ran > 0 ? calls / ran : 0 ))
        if [ "$verdict" = ok ]; then
            printf 'soak: smp %s boot %s seed 0x%x %ss: ok, %s calls (%s/s), %s children\n' \
                "$n" "$boot" "$s" "$ran" "$calls" "$rate" "$children"
        else
            failed=$((failed + 1))
            failures+=("$(printf -- '-smp %s seed 0x%x: %s\n    reproduce: %s\n    log: %s\n    last lines:\n%s' \
                "$n" "$s" "$verdict" "$cmd" "$log" "$(last_lines "$log")")")
            printf 'soak: smp %s boot %s seed 0x%x: FAIL %s (%s calls; log %s)\n' "$n" "$boot" "$s" "$verdict" "$calls" "$log"
        fi
    done
done

echo
echo "== soak report"
echo "boots: $boots at -smp $smps ($failed failed)"
echo "calls: $total_calls in ${total_seconds}s of fuzzing ($(( total_seconds > 0 ? total_calls / total_seconds : 0 ))/s)"
echo "children: $total_children"
echo "seeds: ${seeds[*]}"
echo "results: $results"
for f in "${failures[@]+"${failures[@]}"}"; do echo "failed: $f"; done
[ "$failed" = 0 ]
