#!/usr/bin/env bash
# Variables set here are read by the scripts that source this file.
# shellcheck disable=SC2034
# Shared by run.sh, test.sh and bench.sh: dependency set-up (deps.sh), the kernel build,
# accelerator choice, and QEMU's exit-status convention. Source it; it defines functions
# only (and PANDA_ROOT).

# shellcheck source=scripts/deps.sh
. "$(dirname "${BASH_SOURCE[0]}")/deps.sh"

PANDA_TARGET=x86_64-unknown-none

# The cargo profile the kernel and programs are built with: release, or debug-kernel
# (--debug: full debug info, no optimisation; Cargo.toml). Sets the paths that follow.
panda_use_profile() {
    PANDA_PROFILE=$1
    PANDA_KERNEL="$PANDA_ROOT/target/$PANDA_TARGET/$PANDA_PROFILE/panda-kernel"
    PANDA_USER_BIN="$PANDA_ROOT/target/$PANDA_TARGET/$PANDA_PROFILE"
}
panda_use_profile release

# QEMU exit statuses produced by the kernel through isa-debug-exit ((v << 1) | 1).
PANDA_QEMU_SUCCESS=33
PANDA_QEMU_FAILURE=35
PANDA_QEMU_PROGRAM_FAILED=37
PANDA_QEMU_PROGRAM_KILLED=39

panda_usage_error() { printf 'panda: %s (see --help)\n' "$*" >&2; exit 64; }

panda_build_kernel() {
    [ -f "$PANDA_KERNEL" ] ||
        echo "panda: building the kernel and user programs (cargo build --profile $PANDA_PROFILE; the first build takes a minute or two)" >&2
    (cd "$PANDA_ROOT" && cargo build --quiet --profile "$PANDA_PROFILE" -p panda-kernel --target "$PANDA_TARGET") ||
        panda_die "kernel build failed"
}

# User programs (user/programs) packed into the initrd, and the data files beside them.
# Every [[bin]] of user/programs is packed: adding a program needs only its [[bin]].
mapfile -t PANDA_PROGRAMS < <(awk '/^\[\[bin\]\]/ { bin = 1; next } bin && /^name *=/ { gsub(/"/, "", $3); print $3; bin = 0 }' \
    "$PANDA_ROOT/user/programs/Cargo.toml")
PANDA_INITRD="$PANDA_ROOT/build/initrd.tar"

panda_build_user() {
    (cd "$PANDA_ROOT" && cargo build --quiet --profile "$PANDA_PROFILE" -p panda-programs --target "$PANDA_TARGET") ||
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

# panda_map_status STATUS [TIMEOUT_S [QEMU_SAID]]: maps a QEMU exit status to the script's: 0 success, 1 guest failure, 2 no report
# (a reset, i.e. a triple fault, or QEMU stopped by a signal), 3 time-out, 4 and 5 the
# first program's failure. (QEMU's own failure, status 1, run.sh reports itself.)
# QEMU_SAID, QEMU's own message if it printed one, tells a stop by gdb or a signal from
# a reset. Prints one line for anything but success.
panda_map_status() {
    local status=$1 timeout_s=${2:-} qemu_said=${3:-}
    case "$status" in
        "$PANDA_QEMU_SUCCESS") return 0 ;;
        "$PANDA_QEMU_FAILURE") echo "panda: guest reported failure" >&2; return 1 ;;
        "$PANDA_QEMU_PROGRAM_FAILED") echo "panda: the first program exited with a non-zero status (the kernel's line above gives it)" >&2; return 4 ;;
        "$PANDA_QEMU_PROGRAM_KILLED") echo "panda: the kernel ended the first program (the kernel's line above says why)" >&2; return 5 ;;
        124) echo "panda: guest timed out after ${timeout_s}s" >&2; return 3 ;;
        0) if [ -n "$qemu_said" ]; then echo "panda: guest ended without reporting: QEMU stopped it ($qemu_said)" >&2
           else echo "panda: guest ended without reporting: it reset (QEMU status 0 with -no-reboot), a triple fault" >&2; fi
           return 2 ;;
        *) echo "panda: guest ended without reporting (QEMU status $status)" >&2; return 2 ;;
    esac
}

# Prints the directory of Limine's binary release: LIMINE_DIR, or a system-wide
# install. Dies (69) with one line saying how to get it when there is none.
panda_find_limine() {
    local dir
    for dir in "${LIMINE_DIR:-}" "$PANDA_ROOT/build/limine-bin" /usr/share/limine /usr/local/share/limine; do
        if [ -n "$dir" ] && [ -f "$dir/limine-bios.sys" ] && [ -f "$dir/limine-bios-cd.bin" ] &&
           [ -f "$dir/limine-uefi-cd.bin" ] && [ -f "$dir/BOOTX64.EFI" ]; then
            echo "$dir"; return 0
        fi
    done
    panda_die "Limine binaries not found: set LIMINE_DIR to a Limine binary release (a vN.x-binary branch of the limine repository: limine-bios.sys, limine-bios-cd.bin, limine-uefi-cd.bin, BOOTX64.EFI and limine or limine.c; scripts/deps.sh --limine fetches one where GitHub is reachable) or install Limine system-wide"
}

# panda_build_iso LIMINE WORK KERNEL INITRD CMDLINE OUT: a hybrid BIOS+UEFI image at OUT
# (ISO 9660 with an MBR and an EFI system partition, Limine's layout): boots from a
# CD, and written with dd to a USB stick or disk it boots from that too.
panda_build_iso() {
    local limine_src=$1 work=$2 kernel=$3 initrd=$4 cmdline=$5 out=$6 root tool=""
    root="$work/iso_root"
    rm -rf "$root"; mkdir -p "$root/boot/limine" "$root/EFI/BOOT"
    cp "$kernel" "$root/boot/kernel.elf"
    cp "$initrd" "$root/boot/initrd.tar"
    cp "$limine_src/limine-bios.sys" "$limine_src/limine-bios-cd.bin" "$limine_src/limine-uefi-cd.bin" "$root/boot/limine/"
    cp "$limine_src/BOOTX64.EFI" "$root/EFI/BOOT/"
    printf 'timeout: 0\n\n/Panda\n    protocol: limine\n    kernel_path: boot():/boot/kernel.elf\n    module_path: boot():/boot/initrd.tar\n    module_cmdline: initrd\n    cmdline: %s\n' "$cmdline" \
        > "$root/boot/limine/limine.conf"
    if [ -x "$limine_src/limine" ]; then tool="$limine_src/limine"
    elif command -v limine >/dev/null 2>&1; then tool=$(command -v limine)
    elif [ -f "$limine_src/limine.c" ]; then
        cc -O2 -o "$work/limine" "$limine_src/limine.c" || panda_die "cannot compile $limine_src/limine.c"
        tool="$work/limine"
    else panda_die "the limine host tool is missing from $limine_src (need limine or limine.c)"; fi
    xorriso -as mkisofs -R -r -J -b boot/limine/limine-bios-cd.bin -no-emul-boot -boot-load-size 4 \
        -boot-info-table -hfsplus -apm-block-size 2048 --efi-boot boot/limine/limine-uefi-cd.bin \
        -efi-boot-part --efi-boot-image --protective-msdos-label "$root" -o "$out" >/dev/null 2>&1 ||
        panda_die "xorriso could not build the image"
    "$tool" bios-install "$out" >/dev/null 2>&1 || panda_die "limine bios-install failed"
}
