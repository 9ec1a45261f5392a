#!/usr/bin/env bash
# Builds Panda and boots it in QEMU, streaming the serial console; exits with the
# guest's status. See --help.
set -euo pipefail
# shellcheck source=scripts/lib.sh
. "$(dirname "${BASH_SOURCE[0]}")/lib.sh"

usage() {
    cat <<'TXT'
usage: scripts/run.sh [options] [-- extra qemu args]

  -smp N              CPUs (1..255, default 4)
  -m SIZE             guest memory, e.g. 512M or 2G (default 512M)
  --accel kvm|tcg     force an accelerator (default: KVM only where it really works)
  --cpu MODEL         QEMU CPU model (default max under TCG, host under KVM; e.g. max,-x2apic)
  --boot pvh|limine   PVH (QEMU -kernel, default) or a Limine ISO from LIMINE_DIR
  --firmware bios|uefi  firmware for --boot limine (default bios; uefi uses Debian's OVMF)
  --gdb[=PORT]        start paused with a gdb stub on localhost:PORT (default 1234)
                      and print the gdb command to paste
  --add PATH          put this file in the initrd too, under its own name (repeatable:
                      programs init spawns, data files)
  --init PATH         run this static ELF as the first process (packed into the initrd
                      as `init`, beside the usual programs)
  --cmdline "..."     extra kernel command-line tokens (test, crash=..., log=debug)
  --timeout SECONDS   stop the guest after this long (exit 3)
  -h, --help          this text

Environment: QEMU (the qemu-system-x86_64 to use), LIMINE_DIR (Limine's binaries),
PANDA_PREBUILT_KERNEL and PANDA_PREBUILT_INITRD (boot these files, build nothing).

Exit status: 0 guest success, 1 guest failure, 2 guest ended without reporting
(triple fault, QEMU error), 3 time-out, 64 bad usage.
TXT
}

smp=4 mem=512M accel=auto boot=pvh firmware=bios gdb=0 init="" cmdline="" timeout_s="" adds=()
extra=()
while [ $# -gt 0 ]; do
    case "$1" in
        -smp|--smp) [ $# -ge 2 ] || panda_usage_error "$1 needs a value"; smp=$2; shift 2 ;;
        -m|--memory) [ $# -ge 2 ] || panda_usage_error "$1 needs a value"; mem=$2; shift 2 ;;
        --accel) [ $# -ge 2 ] || panda_usage_error "--accel needs kvm or tcg"; accel=$2; shift 2 ;;
        --cpu) [ $# -ge 2 ] || panda_usage_error "--cpu needs a model"; PANDA_CPU_MODEL=$2; shift 2 ;;
        --boot) [ $# -ge 2 ] || panda_usage_error "--boot needs pvh or limine"; boot=$2; shift 2 ;;
        --firmware) [ $# -ge 2 ] || panda_usage_error "--firmware needs bios or uefi"; firmware=$2; shift 2 ;;
        --gdb) gdb=1234; shift ;;
        --gdb=*) gdb=${1#--gdb=}; shift ;;
        --init) [ $# -ge 2 ] || panda_usage_error "--init needs a path"; init=$2; shift 2 ;;
        --add) [ $# -ge 2 ] || panda_usage_error "--add needs a path"; adds+=("$2"); shift 2 ;;
        --cmdline) [ $# -ge 2 ] || panda_usage_error "--cmdline needs a value"; cmdline="$cmdline $2"; shift 2 ;;
        --timeout) [ $# -ge 2 ] || panda_usage_error "--timeout needs seconds"; timeout_s=$2; shift 2 ;;
        -h|--help) usage; exit 0 ;;
        --) shift; extra=("$@"); break ;;
        *) panda_usage_error "unknown option: $1" ;;
    esac
done

if ! [[ "$smp" =~ ^[0-9]+$ ]] || [ "$smp" -lt 1 ] || [ "$smp" -gt 255 ]; then
    panda_usage_error "-smp must be a whole number from 1 to 255, not '$smp'"
fi
[[ "$mem" =~ ^[0-9]+[MG]?$ ]] || panda_usage_error "-m must look like 512M or 2G, not '$mem'"
mem_mib=${mem%[MG]}; [[ "$mem" == *G ]] && mem_mib=$((mem_mib * 1024))
[ "$mem_mib" -ge 64 ] || panda_usage_error "-m must be at least 64M (the kernel's heap, tables and one program), not '$mem'"
case "$accel" in auto|kvm|tcg) ;; *) panda_usage_error "--accel must be kvm or tcg, not '$accel'" ;; esac
case "$boot" in pvh|limine) ;; *) panda_usage_error "--boot must be pvh or limine, not '$boot'" ;; esac
case "$firmware" in bios|uefi) ;; *) panda_usage_error "--firmware must be bios or uefi, not '$firmware'" ;; esac
[ "$firmware" = bios ] || [ "$boot" = limine ] ||
    panda_usage_error "--firmware $firmware needs --boot limine (PVH boots without firmware)"
if [ "$gdb" != 0 ]; then
    if ! [[ "$gdb" =~ ^[0-9]+$ ]] || [ "$gdb" -lt 1 ] || [ "$gdb" -gt 65535 ]; then
        panda_usage_error "--gdb=PORT needs a port number from 1 to 65535, not '$gdb'"
    fi
    if command -v ss >/dev/null 2>&1 && ss -ltn "sport = :$gdb" 2>/dev/null | grep -q LISTEN; then
        panda_usage_error "port $gdb is busy (another --gdb run?): choose one with --gdb=PORT"
    fi
fi
if [ -n "$timeout_s" ] && ! [[ "$timeout_s" =~ ^[0-9]+$ ]]; then
    panda_usage_error "--timeout must be whole seconds, not '$timeout_s'"
fi
for a in "${adds[@]}"; do
    [ -f "$a" ] || panda_usage_error "--add $a: no such file"
done
if [ -n "$init" ]; then
    [ -f "$init" ] || panda_usage_error "--init $init: no such file"
    [ "$(head -c 4 "$init" | od -An -c | tr -d ' ')" = '177ELF' ] ||
        panda_usage_error "--init $init: not an ELF file"
fi

# Find Limine before building anything, so a missing install fails fast.
if [ "$boot" = limine ]; then
    limine_src=""
    for dir in "${LIMINE_DIR:-}" /usr/share/limine /usr/local/share/limine; do
        if [ -n "$dir" ] && [ -f "$dir/limine-bios.sys" ] && [ -f "$dir/limine-bios-cd.bin" ] &&
           [ -f "$dir/limine-uefi-cd.bin" ] && [ -f "$dir/BOOTX64.EFI" ]; then
            limine_src=$dir; break
        fi
    done
    [ -n "$limine_src" ] || panda_die "Limine binaries not found: set LIMINE_DIR to a Limine binary release (a vN.x-binary branch of the limine repository: limine-bios.sys, limine-bios-cd.bin, limine-uefi-cd.bin, BOOTX64.EFI and limine or limine.c) or install Limine system-wide"
fi

panda_ensure_rust
panda_ensure_qemu
[ "$boot" = limine ] && panda_ensure_limine_tools
if [ -n "${PANDA_PREBUILT_KERNEL:-}" ]; then
    # A caller (bench.sh) that built once and boots that exact build every time.
    if [ ! -f "$PANDA_PREBUILT_KERNEL" ] || [ ! -f "${PANDA_PREBUILT_INITRD:-}" ]; then
        panda_die "PANDA_PREBUILT_KERNEL/PANDA_PREBUILT_INITRD do not name files"
    fi
    PANDA_KERNEL=$PANDA_PREBUILT_KERNEL initrd=$PANDA_PREBUILT_INITRD
    if [ -n "$init" ] || [ ${#adds[@]} != 0 ]; then
        panda_usage_error "--init and --add cannot be combined with a prebuilt initrd"
    fi
else
    panda_build_kernel
    panda_build_user
    initrd=$PANDA_INITRD
    if [ -n "$init" ] || [ ${#adds[@]} != 0 ]; then initrd="$PANDA_ROOT/build/initrd-custom.tar"; fi
    panda_pack_initrd "$initrd" "$init" "${adds[@]}"
fi
panda_choose_accel "$accel"

# shellcheck disable=SC2054 # the commas belong to one -device argument
qemu_args=(-machine q35 -m "$mem" -smp "$smp" -no-reboot -display none -serial stdio
           -device isa-debug-exit,iobase=0xf4,iosize=0x04 "${PANDA_ACCEL_ARGS[@]}")
cmdline="${cmdline# }"

if [ "$boot" = pvh ]; then
    qemu_args+=(-kernel "$PANDA_KERNEL" -initrd "$initrd" -append "$cmdline")
    what="PVH"
else
    iso_dir="$PANDA_ROOT/build/limine"
    root="$iso_dir/iso_root"
    rm -rf "$root"; mkdir -p "$root/boot/limine" "$root/EFI/BOOT"
    cp "$PANDA_KERNEL" "$root/boot/kernel.elf"
    cp "$initrd" "$root/boot/initrd.tar"
    cp "$limine_src/limine-bios.sys" "$limine_src/limine-bios-cd.bin" "$limine_src/limine-uefi-cd.bin" "$root/boot/limine/"
    cp "$limine_src/BOOTX64.EFI" "$root/EFI/BOOT/"
    printf 'timeout: 0\n\n/Panda\n    protocol: limine\n    kernel_path: boot():/boot/kernel.elf\n    module_path: boot():/boot/initrd.tar\n    module_cmdline: initrd\n    cmdline: %s\n' "$cmdline" \
        > "$root/boot/limine/limine.conf"
    limine_tool=""
    if [ -x "$limine_src/limine" ]; then limine_tool="$limine_src/limine"
    elif command -v limine >/dev/null 2>&1; then limine_tool=$(command -v limine)
    elif [ -f "$limine_src/limine.c" ]; then
        cc -O2 -o "$iso_dir/limine" "$limine_src/limine.c" || panda_die "cannot compile $limine_src/limine.c"
        limine_tool="$iso_dir/limine"
    else panda_die "the limine host tool is missing from $limine_src (need limine or limine.c)"; fi
    xorriso -as mkisofs -R -r -J -b boot/limine/limine-bios-cd.bin -no-emul-boot -boot-load-size 4 \
        -boot-info-table -hfsplus -apm-block-size 2048 --efi-boot boot/limine/limine-uefi-cd.bin \
        -efi-boot-part --efi-boot-image --protective-msdos-label "$root" -o "$iso_dir/panda.iso" >/dev/null 2>&1 ||
        panda_die "xorriso could not build the ISO"
    "$limine_tool" bios-install "$iso_dir/panda.iso" >/dev/null 2>&1 || panda_die "limine bios-install failed"
    qemu_args+=(-cdrom "$iso_dir/panda.iso")
    if [ "$firmware" = uefi ]; then
        code=/usr/share/OVMF/OVMF_CODE_4M.fd vars=/usr/share/OVMF/OVMF_VARS_4M.fd
        [ -r "$code" ] || panda_die "OVMF not found at $code (apt-get install ovmf)"
        cp "$vars" "$iso_dir/ovmf_vars.fd"
        qemu_args+=(-drive "if=pflash,format=raw,readonly=on,file=$code" -drive "if=pflash,format=raw,file=$iso_dir/ovmf_vars.fd")
    fi
    what="Limine ($firmware)"
fi

if [ "$gdb" != 0 ]; then
    qemu_args+=(-gdb "tcp:localhost:$gdb" -S)
    echo "panda: paused for gdb on localhost:$gdb; in another terminal:" >&2
    echo "  gdb $PANDA_KERNEL -ex 'target remote localhost:$gdb' -ex 'hbreak panda_kernel::kmain' -ex continue" >&2
    echo "  (or: scripts/gdb.sh $gdb; hbreak, not break: the kernel's addresses are mapped only once it runs)" >&2
fi

echo "panda: booting ${PANDA_KERNEL#"$PANDA_ROOT"/} via $what, -smp $smp, -m $mem, $PANDA_ACCEL" >&2
# The console goes through the symbolizer (crash reports gain function and file:line);
# PANDA_SYMBOLIZE=0, or no python3, passes it through untouched.
symbolize=(cat)
if [ "${PANDA_SYMBOLIZE:-1}" != 0 ] && command -v python3 >/dev/null 2>&1; then
    symbolize=(python3 "$PANDA_ROOT/scripts/symbolize.py" "$PANDA_KERNEL")
fi
set +e
if [ -n "$timeout_s" ]; then
    timeout --foreground -k 5 "$timeout_s" "${QEMU:-qemu-system-x86_64}" "${qemu_args[@]}" "${extra[@]}" </dev/null |
        "${symbolize[@]}"
    status=${PIPESTATUS[0]}
else
    "${QEMU:-qemu-system-x86_64}" "${qemu_args[@]}" "${extra[@]}" | "${symbolize[@]}"
    status=${PIPESTATUS[0]}
fi
set -e
panda_map_status "$status" "$timeout_s"
