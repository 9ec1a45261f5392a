#!/usr/bin/env bash
# Variables set here are read by the scripts that source this file.
# shellcheck disable=SC2034
# Shared by run.sh, test.sh and bench.sh: dependency set-up (deps.sh), the kernel build,
# accelerator choice, and QEMU's exit-status convention. Source it; it defines functions
# only (and PANDA_ROOT).

# shellcheck source=scripts/deps.sh
. "$(dirname "${BASH_SOURCE[0]}")/deps.sh"

PANDA_TARGET=x86_64-unknown-none
PANDA_KERNEL="$PANDA_ROOT/target/$PANDA_TARGET/release/panda-kernel"

# QEMU exit statuses produced by the kernel through isa-debug-exit ((v << 1) | 1).
PANDA_QEMU_SUCCESS=33
PANDA_QEMU_FAILURE=35
PANDA_QEMU_PROGRAM_FAILED=37
PANDA_QEMU_PROGRAM_KILLED=39

panda_usage_error() { printf 'panda: %s (see --help)\n' "$*" >&2; exit 64; }

panda_build_kernel() {
    [ -f "$PANDA_KERNEL" ] ||
        echo "panda: building the kernel and user programs (cargo build --release; the first build takes a minute or two)" >&2
    (cd "$PANDA_ROOT" && cargo build --quiet --release -p panda-kernel --target "$PANDA_TARGET") ||
        panda_die "kernel build failed"
}

# User programs (user/programs) packed into the initrd, and the data files beside them.
PANDA_USER_BIN="$PANDA_ROOT/target/$PANDA_TARGET/release"
# Every [[bin]] of user/programs is packed: adding a program needs only its [[bin]].
mapfile -t PANDA_PROGRAMS < <(awk '/^\[\[bin\]\]/ { bin = 1; next } bin && /^name *=/ { gsub(/"/, "", $3); print $3; bin = 0 }' \
    "$PANDA_ROOT/user/programs/Cargo.toml")
PANDA_INITRD="$PANDA_ROOT/build/initrd.tar"

panda_build_user() {
    (cd "$PANDA_ROOT" && cargo build --quiet --release -p panda-programs --target "$PANDA_TARGET") ||
        panda_die "user programs build failed"
}

# panda_pack_initrd OUT [INIT [EXTRA...]]: a ustar archive of the user programs (debug
# info stripped) and user/files/*; INIT, if not empty, replaces the init program, and
# each EXTRA file is added under its own name (programs init may spawn, data files).
panda_pack_initrd() {
    local out=$1 init=${2:-} stage="$PANDA_ROOT/build/initrd-root" p
    shift 2 2>/dev/null || shift $#
    command -v objcopy >/dev/null 2>&1 || panda_apt_install binutils || panda_die "objcopy (binutils) is missing"
    rm -rf "$stage"; mkdir -p "$stage" "$(dirname "$out")"
    for p in "${PANDA_PROGRAMS[@]}"; do
        objcopy --strip-debug "$PANDA_USER_BIN/$p" "$stage/$p" || panda_die "cannot strip $p"
    done
    if [ -n "$init" ]; then cp "$init" "$stage/init" || panda_die "cannot copy $init"; fi
    for p in "$@"; do cp "$p" "$stage/$(basename "$p")" || panda_die "cannot copy $p"; done
    cp "$PANDA_ROOT"/user/files/* "$stage/"
    # Hostile executables the kernel must refuse (user tests spawn them): utest with a
    # writable+executable code segment, cut short, moved into the kernel half, and
    # with its entry point moved into the data segment.
    local src="$stage/utest" phoff
    phoff=$(od -An -t u8 -j 32 -N 8 "$src" | tr -d ' ')
    cp "$src" "$stage/bad-wx.elf"
    printf '\x07' | dd of="$stage/bad-wx.elf" bs=1 seek=$((phoff + 4)) conv=notrunc status=none
    head -c 200 "$src" > "$stage/bad-truncated.elf"
    cp "$src" "$stage/bad-kernel-half.elf"
    printf '\x00\x00\x00\x00\x00\x80\xff\xff' | dd of="$stage/bad-kernel-half.elf" bs=1 seek=$((phoff + 16)) conv=notrunc status=none
    cp "$src" "$stage/bad-entry.elf"
    printf '\x00\x00\x00\x00\x01\x00\x00\x00' | dd of="$stage/bad-entry.elf" bs=1 seek=24 conv=notrunc status=none
    (cd "$stage" && tar --format=ustar --owner=0 --group=0 --numeric-owner -cf "$out" -- *) ||
        panda_die "cannot pack the initrd"
}

# Whether KVM really works here: a usable /dev/kvm AND a CPU that advertises vmx/svm.
# /dev/kvm alone is not proof (seen: it opens, the CPU has no vmx/svm, guests hang).
panda_kvm_reason() {
    if [ ! -e /dev/kvm ]; then echo "no /dev/kvm"; return 1; fi
    if [ ! -r /dev/kvm ] || [ ! -w /dev/kvm ]; then echo "/dev/kvm not read/writable"; return 1; fi
    if ! grep -qwE 'vmx|svm' /proc/cpuinfo 2>/dev/null; then
        echo "/dev/kvm present but the CPU shows no vmx/svm flag"; return 1
    fi
    echo "/dev/kvm usable and the CPU has vmx/svm"
}

# Sets PANDA_ACCEL_ARGS for "auto", "kvm" or "tcg" and prints a one-line notice.
panda_choose_accel() {
    local want=$1 reason
    if reason=$(panda_kvm_reason); then
        if [ "$want" = tcg ]; then
            PANDA_ACCEL=tcg; echo "panda: accel tcg (forced; KVM would work: $reason)" >&2
        else
            PANDA_ACCEL=kvm; echo "panda: accel kvm ($reason)" >&2
        fi
    else
        [ "$want" = kvm ] && panda_die "--accel kvm: KVM is not usable here ($reason)"
        PANDA_ACCEL=tcg
        if [ "$want" = tcg ]; then echo "panda: accel tcg (forced)" >&2
        else echo "panda: accel tcg ($reason)" >&2; fi
    fi
    if [ "$PANDA_ACCEL" = kvm ]; then
        # Some hosts abort `-cpu host` on MSR 0x10a (arch-capabilities): start a paused
        # guest once, tell its monitor to quit, and fall back if it failed.
        local cpu=${PANDA_CPU_MODEL:-host}
        if [ "$cpu" = host ] && ! printf 'quit\n' | timeout 10 "${QEMU:-qemu-system-x86_64}" -accel kvm -cpu host -machine q35 \
                -display none -S -monitor stdio -serial none -nodefaults >/dev/null 2>&1; then
            cpu=host,-arch-capabilities
        fi
        PANDA_ACCEL_ARGS=(-accel kvm -cpu "$cpu")
    else
        PANDA_ACCEL_ARGS=(-accel tcg -cpu "${PANDA_CPU_MODEL:-max}")
    fi
}

# Maps a QEMU exit status to the script's: 0 success, 1 guest failure, 2 no report,
# 3 time-out. Prints one line for anything but success.
panda_map_status() {
    local status=$1 timeout_s=${2:-}
    case "$status" in
        "$PANDA_QEMU_SUCCESS") return 0 ;;
        "$PANDA_QEMU_FAILURE") echo "panda: guest reported failure" >&2; return 1 ;;
        "$PANDA_QEMU_PROGRAM_FAILED") echo "panda: the first program exited with a non-zero status (the kernel's line above gives it)" >&2; return 4 ;;
        "$PANDA_QEMU_PROGRAM_KILLED") echo "panda: the kernel ended the first program (the kernel's line above says why)" >&2; return 5 ;;
        124) echo "panda: guest timed out after ${timeout_s}s" >&2; return 3 ;;
        *) echo "panda: guest ended without reporting (QEMU status $status): triple fault or QEMU error" >&2; return 2 ;;
    esac
}
