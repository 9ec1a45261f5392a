#!/usr/bin/env bash
# Demand-zero page-fault throughput per core: boots Panda (and, with --baseline linux,
# Debian's Linux kernel with a busybox initramfs) once per CPU count, mode and worker
# kind, runs faultbench (user/programs/src/bench_core.rs, the same source on both), and
# writes DIR/results.json, DIR/results.tsv, a table on stdout and plots (SVG and PNG).
# See docs/BENCHMARKS.md and --help.
set -euo pipefail
# shellcheck source=scripts/lib.sh
. "$(dirname "${BASH_SOURCE[0]}")/lib.sh"

usage() {
    cat <<'TXT'
usage: scripts/bench.sh [--cpus LIST] [--mode LIST] [--workers LIST] [--seconds N]
                        [--repeat N] [--warmup-ms N] [--chunk-mib N] [--memory SIZE]
                        [--accel kvm|tcg] [--baseline linux] [--out DIR]

  --cpus LIST       CPU counts; each run boots with -smp equal to the worker count
                    (default 1,2,4,8)
  --mode LIST       heap, buffer, stack (default heap)
  --workers LIST    threads, processes (default processes)
  --seconds N       measured time per run, after the warm-up (default 5)
  --repeat N        boots per configuration; the report takes the median run (default 1)
  --warmup-ms N     warm-up per worker before measuring (default 500)
  --chunk-mib N     heap/buffer chunk per round (default 64)
  --memory SIZE     guest memory, the same for every run (default 2G)
  --accel kvm|tcg   accelerator (default: KVM only where it really works)
  --baseline linux  also run each configuration on Linux (Debian's kernel, same QEMU)
  --out DIR         where results go (default build/bench/DATE)
  -h, --help        this text

Exit status: 0 if every run succeeded, 1 if any failed (the results of those that
finished are kept), 64 for bad usage.
TXT
}

cpus=1,2,4,8 modes=heap workers=processes seconds=5 repeat=1 warmup_ms=500 chunk_mib=64 mem=2G
accel=auto baseline="" out=""
need() { [ "$2" -ge 2 ] || panda_usage_error "$1 needs a value"; }
while [ $# -gt 0 ]; do
    case "$1" in
        --cpus) need "$1" $#; cpus=$2; shift 2 ;;
        --mode|--modes) need "$1" $#; modes=$2; shift 2 ;;
        --workers) need "$1" $#; workers=$2; shift 2 ;;
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
    case "$m" in heap|buffer|stack) ;; *) panda_usage_error "--mode must list heap, buffer or stack, not '$m'" ;; esac
done
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
panda_choose_accel "$accel"
accel_line="accel: $PANDA_ACCEL (${PANDA_ACCEL_ARGS[*]})"

# The Linux guest: Debian's kernel and busybox, unpacked (not installed) into a cache.
linux_kernel="" linux_initrd_base=""
if [ "$baseline" = linux ]; then
    cache="$PANDA_ROOT/build/linux-baseline"
    mkdir -p "$cache"
    if [ ! -f "$cache/vmlinuz" ] || [ ! -f "$cache/busybox" ]; then
        echo "panda: fetching Debian's linux-image-amd64 and busybox-static for the baseline..." >&2
        command -v cpio >/dev/null 2>&1 || panda_apt_install cpio >/dev/null || panda_die "cannot install cpio"
        pkg=$(apt-cache depends linux-image-amd64 2>/dev/null | sed -n 's/^ *Depends: \(linux-image-[0-9].*\)$/\1/p' | head -n1)
        [ -n "$pkg" ] || { apt-get update -qq >/dev/null 2>&1 || true; pkg=$(apt-cache depends linux-image-amd64 2>/dev/null | sed -n 's/^ *Depends: \(linux-image-[0-9].*\)$/\1/p' | head -n1); }
        [ -n "$pkg" ] || panda_die "cannot resolve linux-image-amd64 to a kernel package"
        rm -rf "$cache/debs" "$cache/x"; mkdir -p "$cache/debs" "$cache/x"
        (cd "$cache/debs" && apt-get download "$pkg" busybox-static >/dev/null 2>&1) ||
            panda_die "apt-get download $pkg busybox-static failed"
        for deb in "$cache"/debs/*.deb; do dpkg-deb -x "$deb" "$cache/x" || panda_die "cannot unpack $deb"; done
        cp "$cache"/x/boot/vmlinuz-* "$cache/vmlinuz" || panda_die "no vmlinuz in $pkg"
        cp "$cache/x/bin/busybox" "$cache/busybox" || panda_die "no busybox in busybox-static"
        echo "$pkg" > "$cache/kernel-package"
        rm -rf "$cache/debs" "$cache/x"
    fi
    command -v cpio >/dev/null 2>&1 || panda_apt_install cpio >/dev/null || panda_die "cannot install cpio"
    # The musl target links through the system C compiler driver.
    command -v cc >/dev/null 2>&1 || panda_apt_install gcc libc6-dev >/dev/null || panda_die "cannot install gcc (needed to link faultbench-linux)"
    if ! rustup target list --installed 2>/dev/null | grep -qx x86_64-unknown-linux-musl; then
        echo "panda: adding the x86_64-unknown-linux-musl target (static Linux faultbench)..." >&2
        rustup target add x86_64-unknown-linux-musl >/dev/null 2>&1 || panda_die "rustup target add x86_64-unknown-linux-musl failed"
    fi
    (cd "$PANDA_ROOT" && cargo build --quiet --release -p faultbench-linux --target x86_64-unknown-linux-musl) ||
        panda_die "faultbench-linux build failed"
    linux_kernel="$cache/vmlinuz"
    linux_initrd_base="$cache/initramfs"
    rm -rf "$linux_initrd_base"; mkdir -p "$linux_initrd_base"/{bin,proc,sys,dev}
    cp "$cache/busybox" "$linux_initrd_base/bin/busybox"
    cp "$PANDA_ROOT/target/x86_64-unknown-linux-musl/release/faultbench-linux" "$linux_initrd_base/faultbench"
    strip --strip-debug "$linux_initrd_base/faultbench" 2>/dev/null || true
fi

# Config::encode: bits 0-1 mode, 2 processes, 8-15 workers, 16-31 run/10 ms,
# 32-43 chunk MiB, 52-59 warm-up/10 ms.
encode() {
    local mode=$1 kind=$2 n=$3 m=0 p=0
    case "$mode" in heap) m=0 ;; buffer) m=1 ;; stack) m=2 ;; esac
    [ "$kind" = processes ] && p=1
    echo $(( m | p << 2 | n << 8 | (seconds * 100) << 16 | chunk_mib << 32 | (warmup_ms / 10) << 52 ))
}

runs=()
for mode in "${mode_list[@]}"; do
    for kind in "${worker_list[@]}"; do
        for n in "${cpu_list[@]}"; do
            for ((r = 1; r <= repeat; r++)); do
                runs+=("panda $mode $kind $n $r")
                [ "$baseline" = linux ] && runs+=("linux $mode $kind $n $r")
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
    echo "build: $(git -C "$PANDA_ROOT" describe --always --dirty 2>/dev/null || echo unknown)"
    echo "command: scripts/bench.sh --cpus $cpus --mode $modes --workers $workers --seconds $seconds --repeat $repeat --warmup-ms $warmup_ms --chunk-mib $chunk_mib --memory $mem${baseline:+ --baseline $baseline}"
    [ "$baseline" = linux ] && echo "linux: Debian $(cat "$PANDA_ROOT/build/linux-baseline/kernel-package"), busybox-static, mitigations=off, transparent_hugepage=never (4 KiB faults, as on Panda)"
} > "$out/meta.txt"

# One guest run: prints nothing, leaves raw/NAME.jsonl and raw/NAME.log; returns
# non-zero if the guest failed or reported no result.
run_one() {
    local os=$1 mode=$2 kind=$3 n=$4 rep=$5 name arg log status=0 limit
    name="$os-$mode-$kind-$n-r$rep"
    log="$out/raw/$name.log"
    arg=$(encode "$mode" "$kind" "$n")
    # Boot, warm-up, run, and a generous margin: with more vCPUs than host cores, TCG
    # guests slow down a lot (Linux at -smp 4 on 2 host cores logs RCU stalls).
    limit=$(( 180 + seconds * 10 + n * 30 + warmup_ms / 100 ))
    if [ "$os" = panda ]; then
        scripts/run.sh --accel "$PANDA_ACCEL" -smp "$n" -m "$mem" --timeout "$limit" \
            --cmdline "init=faultbench init.arg=$arg log=warn" >"$log" 2>&1 || status=$?
    else
        local dir="$out/raw/initramfs-$name"
        rm -rf "$dir"; cp -a "$linux_initrd_base" "$dir"
        printf '#!/bin/busybox sh\n/bin/busybox mount -t proc proc /proc\n/bin/busybox mount -t sysfs sys /sys\n/faultbench %s\necho "faultbench exit status $?"\n/bin/busybox poweroff -f\n' "$arg" > "$dir/init"
        chmod +x "$dir/init"
        (cd "$dir" && find . | cpio -o -H newc 2>/dev/null | gzip -1 > "$out/raw/$name.cpio.gz")
        rm -rf "$dir"
        timeout --foreground -k 5 "$limit" "${QEMU:-qemu-system-x86_64}" -machine q35 -m "$mem" -smp "$n" \
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
    read -r os mode kind n rep <<<"$r"
    if [ "$done_runs" -gt 0 ]; then
        left="about $(( (spent / done_runs) * (total - done_runs) / 60 + 1 )) min left"
    else
        left="first run"
    fi
    printf '[%d/%d] %-5s %-6s %-9s -smp %-3s run %d/%d (%s)\n' $((done_runs + 1)) "$total" "$os" "$mode" "$kind" "$n" "$rep" "$repeat" "$left" >&2
    t0=$(date +%s)
    if ! run_one "$os" "$mode" "$kind" "$n" "$rep"; then
        failed_runs+=("$os-$mode-$kind-$n-r$rep")
        echo "      FAILED: see ${out#"$PANDA_ROOT"/}/raw/$os-$mode-$kind-$n-r$rep.log" >&2
    fi
    spent=$(( spent + $(date +%s) - t0 )); done_runs=$((done_runs + 1))
done

"$PY" "$PANDA_ROOT/scripts/bench_report.py" "$out" || panda_die "the report failed (raw results are in $out/raw)"
if [ ${#failed_runs[@]} -gt 0 ]; then
    echo "panda: ${#failed_runs[@]} of $total runs failed: ${failed_runs[*]}" >&2
    exit 1
fi
