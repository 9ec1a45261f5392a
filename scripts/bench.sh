#!/usr/bin/env bash
# Demand-zero page-fault throughput per core: boots Panda (each --variants entry: with
# and without its zeroed pools; and, with --baseline linux, Debian's Linux kernel with a
# busybox initramfs) once per CPU count, idle-CPU count, mode and worker kind, on the
# same QEMU CPU model, runs faultbench (user/programs/src/bench_core.rs, the same source
# on both), and writes DIR/results.json, DIR/results.tsv, a table on stdout and plots
# (SVG and PNG). See docs/BENCHMARKS.md and --help.
set -euo pipefail
# shellcheck source=scripts/lib.sh
. "$(dirname "${BASH_SOURCE[0]}")/lib.sh"

usage() {
    cat <<'TXT'
usage: scripts/bench.sh [--cpus LIST] [--idle-cpus LIST] [--mode LIST] [--workers LIST]
                        [--variants LIST] [--seconds N] [--repeat N] [--warmup-ms N]
                        [--chunk-mib N] [--burst N] [--gap-ms N] [--memory SIZE]
                        [--accel kvm|tcg] [--cpu MODEL] [--baseline linux]
                        [--linux VERSION] [--out DIR]

  --cpus LIST       worker counts (one worker per CPU; default 1,2,4,8)
  --idle-cpus LIST  CPUs booted beyond the workers, left idle (default 0): a run
                    boots with -smp workers+idle
  --mode LIST       heap, buffer, stack, bursty (default heap)
  --workers LIST    threads, processes (default processes)
  --variants LIST   Panda with its zeroed pools (prezero) and/or without them
                    (noprezero: booted with mm.prezero=off) (default prezero)
  --seconds N       measured time per run, after the warm-up (default 5)
  --repeat N        boots per configuration; the report takes the median run (default 1)
  --warmup-ms N     warm-up per worker before measuring (default 500)
  --chunk-mib N     heap/buffer chunk per round (default 64)
  --burst N         bursty: faults per burst (default 64)
  --gap-ms N        bursty: idle time after each burst, a multiple of 5 up to 75
                    (default 10)
  --memory SIZE     guest memory, the same for every run (default 2G)
  --accel kvm|tcg   accelerator (default: KVM only where it really works)
  --cpu MODEL       QEMU CPU model for both kernels (default: max,-erms,-fsrm under
                    TCG, where the string-store zeroing of ERMS is emulated very
                    slowly; host under KVM)
  --baseline linux  also run each configuration on Linux (Debian's kernel, same QEMU)
  --linux VERSION   which Debian kernel: newest (default: the newest linux-image-amd64
                    apt can fetch, bookworm-backports' 6.12 on bookworm), or a version
                    prefix such as 6.1 or 6.12
  --out DIR         where results go (default build/bench/DATE)
  -h, --help        this text

Exit status: 0 if every run succeeded, 1 if any failed (the results of those that
finished are kept), 64 for bad usage.
TXT
}

cpus=1,2,4,8 modes=heap workers=processes seconds=5 repeat=1 warmup_ms=500 chunk_mib=64 mem=2G
accel=auto baseline="" out="" idle_cpus=0 variants=prezero burst=64 gap_ms=10 cpu_model="" linux_want=newest
need() { [ "$2" -ge 2 ] || panda_usage_error "$1 needs a value"; }
while [ $# -gt 0 ]; do
    case "$1" in
        --cpus) need "$1" $#; cpus=$2; shift 2 ;;
        --mode|--modes) need "$1" $#; modes=$2; shift 2 ;;
        --workers) need "$1" $#; workers=$2; shift 2 ;;
        --idle-cpus) need "$1" $#; idle_cpus=$2; shift 2 ;;
        --variants) need "$1" $#; variants=$2; shift 2 ;;
        --burst) need "$1" $#; burst=$2; shift 2 ;;
        --gap-ms) need "$1" $#; gap_ms=$2; shift 2 ;;
        --cpu) need "$1" $#; cpu_model=$2; shift 2 ;;
        --linux) need "$1" $#; linux_want=$2; shift 2 ;;
        --seconds) need "$1" $#; seconds=$2; shift 2 ;;
        --repeat) need "$1" $#; repeat=$2; shift 2 ;;
        --warmup-ms) need "$1" $#; warmup_ms=$2; shift 2 ;;
        --chunk-mib) need "$1" $#; chunk_mib=$2; shift 2 ;;
        --memory) need "$1" $#; mem=$2; shift 2 ;;
        --accel) need "$1" $#; accel=$2; shift 2 ;;
        --baseline) need "$1" $#; baseline=$2; shift 2 ;;
        --out) need "$1" $#; out=$2; shift 2 ;;
        -h|--help) usage; exit 0 ;;
        *) panda_usage_error "unknown option: $1" ;;
    esac
done

[[ "$cpus" =~ ^[1-9][0-9]*(,[1-9][0-9]*)*$ ]] || panda_usage_error "--cpus must be a comma-separated list of CPU counts, not '$cpus'"
IFS=, read -r -a cpu_list <<<"$cpus"
for n in "${cpu_list[@]}"; do [ "$n" -le 255 ] || panda_usage_error "--cpus: $n is more than 255"; done
IFS=, read -r -a mode_list <<<"$modes"
for m in "${mode_list[@]}"; do
    case "$m" in heap|buffer|stack|bursty) ;; *) panda_usage_error "--mode must list heap, buffer, stack or bursty, not '$m'" ;; esac
done
[[ "$idle_cpus" =~ ^[0-9]+(,[0-9]+)*$ ]] || panda_usage_error "--idle-cpus must be a comma-separated list of CPU counts, not '$idle_cpus'"
IFS=, read -r -a idle_list <<<"$idle_cpus"
for i in "${idle_list[@]}"; do
    for n in "${cpu_list[@]}"; do [ $((n + i)) -le 255 ] || panda_usage_error "--cpus $n with --idle-cpus $i is more than 255 CPUs"; done
done
IFS=, read -r -a variant_list <<<"$variants"
for v in "${variant_list[@]}"; do
    case "$v" in prezero|noprezero) ;; *) panda_usage_error "--variants must list prezero or noprezero, not '$v'" ;; esac
done
{ [[ "$burst" =~ ^[1-9][0-9]*$ ]] && [ "$burst" -le 4095 ]; } || panda_usage_error "--burst must be 1..4095 faults"
{ [[ "$gap_ms" =~ ^[0-9]+$ ]] && [ "$gap_ms" -le 75 ] && [ $((gap_ms % 5)) = 0 ]; } || panda_usage_error "--gap-ms must be a multiple of 5 from 0 to 75"
[[ "$linux_want" =~ ^(newest|[0-9]+(\.[0-9]+)*)$ ]] || panda_usage_error "--linux must be newest or a version such as 6.1, not '$linux_want'"
[[ -z "$cpu_model" || "$cpu_model" =~ ^[A-Za-z0-9_.,=+-]+$ ]] || panda_usage_error "--cpu must be a QEMU CPU model such as max,-erms,-fsrm, not '$cpu_model'"
IFS=, read -r -a worker_list <<<"$workers"
for w in "${worker_list[@]}"; do
    case "$w" in threads|processes) ;; *) panda_usage_error "--workers must list threads or processes, not '$w'" ;; esac
done
{ [[ "$seconds" =~ ^[1-9][0-9]*$ ]] && [ "$seconds" -le 600 ]; } || panda_usage_error "--seconds must be a whole number from 1 to 600"
{ [[ "$repeat" =~ ^[1-9][0-9]*$ ]] && [ "$repeat" -le 50 ]; } || panda_usage_error "--repeat must be a whole number from 1 to 50"
{ [[ "$warmup_ms" =~ ^[0-9]+$ ]] && [ "$warmup_ms" -le 2550 ]; } || panda_usage_error "--warmup-ms must be 0..2550"
{ [[ "$chunk_mib" =~ ^[1-9][0-9]*$ ]] && [ "$chunk_mib" -le 4095 ]; } || panda_usage_error "--chunk-mib must be 1..4095"
[[ "$mem" =~ ^[1-9][0-9]*[MG]$ ]] || panda_usage_error "--memory must look like 2G or 1536M"
case "$accel" in auto|kvm|tcg) ;; *) panda_usage_error "--accel must be kvm or tcg, not '$accel'" ;; esac
case "$baseline" in ""|linux) ;; *) panda_usage_error "--baseline must be linux, not '$baseline'" ;; esac
[ -n "$out" ] || out="$PANDA_ROOT/build/bench/$(date +%Y%m%d-%H%M%S)"
mkdir -p "$out/raw" || panda_die "cannot create $out"
out=$(cd "$out" && pwd)

panda_ensure_rust
panda_ensure_qemu
# The report and plots: Debian's Python with matplotlib (not whatever python3 is first
# on PATH, which may lack it).
PY=/usr/bin/python3
if ! "$PY" -c 'import matplotlib' >/dev/null 2>&1; then
    echo "panda: installing python3-matplotlib (plots)..." >&2
    panda_apt_install python3 python3-matplotlib >/dev/null || panda_die "cannot install python3-matplotlib"
fi
panda_build_kernel
panda_build_user
panda_pack_initrd "$PANDA_INITRD"
# Every run boots this build, whatever happens to the tree meanwhile.
mkdir -p "$out/build"
cp "$PANDA_KERNEL" "$out/build/panda-kernel"
cp "$PANDA_INITRD" "$out/build/initrd.tar"
export PANDA_PREBUILT_KERNEL="$out/build/panda-kernel" PANDA_PREBUILT_INITRD="$out/build/initrd.tar"
echo "panda: built $(git -C "$PANDA_ROOT" describe --always --dirty 2>/dev/null || echo unknown); every run boots that build" >&2
# The CPU model both kernels get. Under TCG the default leaves out ERMS and FSRM: with
# them, Linux's clear_page uses `rep stosb`, which TCG emulates a byte at a time (about
# 6-13 us per 4 KiB against 1-2 us for other ways), so the comparison would measure an
# emulator artefact. (`max,-erms` alone hung Linux 6.1's boot under TCG.)
if [ -n "$cpu_model" ]; then PANDA_CPU_MODEL=$cpu_model; fi
panda_choose_accel "$accel"
if [ -z "$cpu_model" ]; then
    if [ "$PANDA_ACCEL" = tcg ]; then cpu_model="max,-erms,-fsrm"; else cpu_model=${PANDA_ACCEL_ARGS[3]}; fi
fi
PANDA_ACCEL_ARGS=(-accel "$PANDA_ACCEL" -cpu "$cpu_model")
accel_line="accel: $PANDA_ACCEL (${PANDA_ACCEL_ARGS[*]})"

# The Linux guest: a Debian kernel and busybox, unpacked (not installed) into a cache,
# one directory per kernel package. --linux newest takes the highest version of
# linux-image-amd64 any configured apt source offers (bookworm-backports' on bookworm,
# whose own default is older); --linux 6.1 the highest 6.1.x.
linux_kernel="" linux_initrd_base="" linux_pkg="" linux_pkg_version=""
# linux_versions: every version of linux-image-amd64 apt knows, newest first.
linux_versions() { apt-cache madison linux-image-amd64 2>/dev/null | awk -F'|' '{gsub(/ /, "", $2); print $2}' | sort -V -r -u; }
if [ "$baseline" = linux ]; then
    cache="$PANDA_ROOT/build/linux-baseline"
    mkdir -p "$cache"
    command -v apt-cache >/dev/null 2>&1 || panda_die "--baseline linux needs apt (Debian's kernel packages)"
    if [ "$linux_want" = newest ] && [ -r /etc/os-release ] && grep -q '^VERSION_CODENAME=bookworm' /etc/os-release &&
       ! grep -rqs 'bookworm-backports' /etc/apt/sources.list /etc/apt/sources.list.d/; then
        # bookworm's newest kernel is in backports (QEMU comes from there too: deps.sh).
        echo 'deb http://deb.debian.org/debian bookworm-backports main' |
            panda_sudo tee /etc/apt/sources.list.d/panda-backports.list >/dev/null ||
            panda_die "cannot add bookworm-backports to apt sources (need root or sudo)"
        panda_sudo apt-get update -qq >/dev/null 2>&1 || true
    fi
    pick_linux() {
        if [ "$linux_want" = newest ]; then linux_versions | head -n1
        else linux_versions | grep -E "^${linux_want//./\\.}([.~+-]|$)" | head -n1; fi
    }
    meta_version=$(pick_linux)
    if [ -z "$meta_version" ]; then
        panda_sudo apt-get update -qq >/dev/null 2>&1 || true
        meta_version=$(pick_linux)
    fi
    [ -n "$meta_version" ] || panda_die "--linux $linux_want: no such linux-image-amd64 version in apt (apt-cache madison linux-image-amd64 lists them)"
    # linux-image-amd64 VERSION depends on the real kernel package, e.g.
    # linux-image-6.12.95+bpo-amd64.
    linux_pkg=$(apt-cache show "linux-image-amd64=$meta_version" 2>/dev/null | sed -n 's/^Depends: \(linux-image-[0-9][^ ,]*\).*/\1/p' | head -n1)
    [ -n "$linux_pkg" ] || panda_die "cannot resolve linux-image-amd64 $meta_version to a kernel package"
    kdir="$cache/$linux_pkg"
    if [ ! -f "$kdir/vmlinuz" ] || [ ! -f "$cache/busybox" ]; then
        echo "panda: fetching Debian's $linux_pkg and busybox-static for the baseline..." >&2
        command -v cpio >/dev/null 2>&1 || panda_apt_install cpio >/dev/null || panda_die "cannot install cpio"
        rm -rf "$cache/debs" "$cache/x"; mkdir -p "$cache/debs" "$cache/x" "$kdir"
        (cd "$cache/debs" && apt-get download "$linux_pkg" busybox-static >/dev/null 2>&1) ||
            panda_die "apt-get download $linux_pkg busybox-static failed"
        for deb in "$cache"/debs/*.deb; do dpkg-deb -x "$deb" "$cache/x" || panda_die "cannot unpack $deb"; done
        cp "$cache"/x/boot/vmlinuz-* "$kdir/vmlinuz" || panda_die "no vmlinuz in $linux_pkg"
        dpkg-deb -f "$cache"/debs/"${linux_pkg}"_*.deb Version > "$kdir/version" || panda_die "cannot read the version of $linux_pkg"
        cp "$cache/x/bin/busybox" "$cache/busybox" || panda_die "no busybox in busybox-static"
        rm -rf "$cache/debs" "$cache/x"
    fi
    linux_pkg_version=$(cat "$kdir/version")
    command -v cpio >/dev/null 2>&1 || panda_apt_install cpio >/dev/null || panda_die "cannot install cpio"
    # The musl target links through the system C compiler driver.
    command -v cc >/dev/null 2>&1 || panda_apt_install gcc libc6-dev >/dev/null || panda_die "cannot install gcc (needed to link faultbench-linux)"
    if ! rustup target list --installed 2>/dev/null | grep -qx x86_64-unknown-linux-musl; then
        echo "panda: adding the x86_64-unknown-linux-musl target (static Linux faultbench)..." >&2
        rustup target add x86_64-unknown-linux-musl >/dev/null 2>&1 || panda_die "rustup target add x86_64-unknown-linux-musl failed"
    fi
    (cd "$PANDA_ROOT" && cargo build --quiet --release -p faultbench-linux --target x86_64-unknown-linux-musl) ||
        panda_die "faultbench-linux build failed"
    linux_kernel="$kdir/vmlinuz"
    linux_initrd_base="$cache/initramfs"
    rm -rf "$linux_initrd_base"; mkdir -p "$linux_initrd_base"/{bin,proc,sys,dev}
    cp "$cache/busybox" "$linux_initrd_base/bin/busybox"
    cp "$PANDA_ROOT/target/x86_64-unknown-linux-musl/release/faultbench-linux" "$linux_initrd_base/faultbench"
    strip --strip-debug "$linux_initrd_base/faultbench" 2>/dev/null || true
fi

# bench_core's Config::encode: bits 0-1 and 4 mode (heap 0, buffer 1, stack 2, bursty
# 16), 2 processes, 8-15 workers, 16-31 run/10 ms, 32-43 chunk MiB (bursty: faults per
# burst), 52-59 warm-up/10 ms, 60-63 bursty's gap/5 ms. Printed unsigned (bit 63 may
# be set, which bash's arithmetic would print as a negative number).
encode() {
    local mode=$1 kind=$2 n=$3 m=0 p=0 size=$chunk_mib gap=0
    case "$mode" in heap) m=0 ;; buffer) m=1 ;; stack) m=2 ;; bursty) m=16 size=$burst gap=$((gap_ms / 5)) ;; esac
    [ "$kind" = processes ] && p=1
    printf '%u\n' $(( m | p << 2 | n << 8 | (seconds * 100) << 16 | size << 32 | (warmup_ms / 10) << 52 | gap << 60 ))
}

# One entry per boot: OS VARIANT MODE WORKERS N IDLE REPEAT (Linux's variant is
# "default": the variants are Panda's).
runs=()
for mode in "${mode_list[@]}"; do
    for kind in "${worker_list[@]}"; do
        for n in "${cpu_list[@]}"; do
            for idle in "${idle_list[@]}"; do
                for ((r = 1; r <= repeat; r++)); do
                    for v in "${variant_list[@]}"; do runs+=("panda $v $mode $kind $n $idle $r"); done
                    [ "$baseline" = linux ] && runs+=("linux default $mode $kind $n $idle $r")
                done
            done
        done
    done
done

host_cpu=$(sed -n 's/^model name[[:space:]]*: //p' /proc/cpuinfo | head -n1)
host_cores=$(nproc)
{
    echo "date: $(date -u +%Y-%m-%dT%H:%M:%SZ)"
    echo "host: $host_cpu, $host_cores CPUs online"
    echo "qemu: $(${QEMU:-qemu-system-x86_64} --version | head -n1)"
    echo "$accel_line"
    echo "cpu model: $cpu_model (both kernels)"
    echo "host cores: $host_cores"
    echo "build: $(git -C "$PANDA_ROOT" describe --always --dirty 2>/dev/null || echo unknown)"
    echo "command: scripts/bench.sh --cpus $cpus --idle-cpus $idle_cpus --mode $modes --workers $workers --variants $variants --seconds $seconds --repeat $repeat --warmup-ms $warmup_ms --chunk-mib $chunk_mib --burst $burst --gap-ms $gap_ms --memory $mem --accel $PANDA_ACCEL --cpu $cpu_model${baseline:+ --baseline $baseline --linux $linux_want} --out $out"
    echo "variants: $variants (noprezero boots Panda with mm.prezero=off)"
    if [ "$baseline" = linux ]; then
        echo "linux: Debian $linux_pkg $linux_pkg_version, busybox-static, mitigations=off, transparent_hugepage=never (4 KiB faults, as on Panda)"
    fi
} > "$out/meta.txt"

# One guest run: prints nothing, leaves raw/NAME.jsonl and raw/NAME.log; returns
# non-zero if the guest failed or reported no result.
run_one() {
    local os=$1 variant=$2 mode=$3 kind=$4 n=$5 idle=$6 rep=$7 name arg log status=0 limit smp extra=""
    name="$os-$variant-$mode-$kind-$n-i$idle-r$rep"
    log="$out/raw/$name.log"
    arg=$(encode "$mode" "$kind" "$n")
    smp=$((n + idle))
    [ "$variant" = noprezero ] && extra=" mm.prezero=off"
    # Boot, warm-up, run, and a generous margin: with more vCPUs than host cores, TCG
    # guests slow down a lot (Linux at -smp 4 on 2 host cores logs RCU stalls).
    limit=$(( 180 + seconds * 10 + smp * 30 + warmup_ms / 100 ))
    if [ "$os" = panda ]; then
        scripts/run.sh --accel "$PANDA_ACCEL" --cpu "$cpu_model" -smp "$smp" -m "$mem" --timeout "$limit" \
            --cmdline "init=faultbench init.arg=$arg log=warn$extra" >"$log" 2>&1 || status=$?
    else
        local dir="$out/raw/initramfs-$name"
        rm -rf "$dir"; cp -a "$linux_initrd_base" "$dir"
        printf '#!/bin/busybox sh\n/bin/busybox mount -t proc proc /proc\n/bin/busybox mount -t sysfs sys /sys\n/faultbench %s\necho "faultbench exit status $?"\n/bin/busybox poweroff -f\n' "$arg" > "$dir/init"
        chmod +x "$dir/init"
        (cd "$dir" && find . | cpio -o -H newc 2>/dev/null | gzip -1 > "$out/raw/$name.cpio.gz")
        rm -rf "$dir"
        timeout --foreground -k 5 "$limit" "${QEMU:-qemu-system-x86_64}" -machine q35 -m "$mem" -smp "$smp" \
            -no-reboot -display none -serial stdio "${PANDA_ACCEL_ARGS[@]}" \
            -kernel "$linux_kernel" -initrd "$out/raw/$name.cpio.gz" \
            -append "console=ttyS0 mitigations=off transparent_hugepage=never quiet panic=-1 rdinit=/init" </dev/null >"$log" 2>&1 || status=$?
        rm -f "$out/raw/$name.cpio.gz"
        if ! grep -q 'faultbench exit status 0' "$log" && [ "$status" = 0 ]; then status=1; fi
    fi
    tr -d '\r' <"$log" | grep -E '^\{"bench":"faultbench"' >"$out/raw/$name.jsonl" || true
    if [ "$status" != 0 ] || ! grep -q '"worker":"run","ok":true' "$out/raw/$name.jsonl" ||
       [ "$(grep -c '"worker":[0-9]' "$out/raw/$name.jsonl")" != "$n" ]; then
        echo "exit $status" > "$out/raw/$name.failed"
        return 1
    fi
    rm -f "$out/raw/$name.failed"
}

total=${#runs[@]} done_runs=0 failed_runs=() spent=0
echo "panda: $total runs, $seconds s measured each; results in ${out#"$PANDA_ROOT"/}" >&2
for r in "${runs[@]}"; do
    read -r os variant mode kind n idle rep <<<"$r"
    if [ "$done_runs" -gt 0 ]; then
        left="about $(( (spent * (total - done_runs) / done_runs + 59) / 60 )) min left"
    else
        left="first run"
    fi
    printf '[%d/%d] %-5s %-9s %-6s %-9s %s workers + %s idle, run %d/%d (%s)\n' $((done_runs + 1)) "$total" "$os" "$variant" "$mode" "$kind" "$n" "$idle" "$rep" "$repeat" "$left" >&2
    t0=$(date +%s)
    name="$os-$variant-$mode-$kind-$n-i$idle-r$rep"
    if ! run_one "$os" "$variant" "$mode" "$kind" "$n" "$idle" "$rep"; then
        failed_runs+=("$name")
        echo "      FAILED: see ${out#"$PANDA_ROOT"/}/raw/$name.log" >&2
    fi
    spent=$(( spent + $(date +%s) - t0 )); done_runs=$((done_runs + 1))
done

"$PY" "$PANDA_ROOT/scripts/bench_report.py" "$out" || panda_die "the report failed (raw results are in $out/raw)"
if [ ${#failed_runs[@]} -gt 0 ]; then
    echo "panda: ${#failed_runs[@]} of $total runs failed: ${failed_runs[*]}" >&2
    exit 1
fi
