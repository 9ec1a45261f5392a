#!/usr/bin/env bash
# Writes a bootable image of Panda for real machines: a hybrid BIOS+UEFI image (ISO 9660
# with an MBR and an EFI system partition, Limine's layout) that boots from a USB stick
# written with dd, a disk, or a CD. See docs/HARDWARE.md and --help.
set -euo pipefail
# shellcheck source=scripts/lib.sh
. "$(dirname "${BASH_SOURCE[0]}")/lib.sh"

usage() {
    cat <<'TXT'
usage: scripts/image.sh [--out FILE] [--cmdline "..."] [--args "WORDS"] [--init PATH]
                        [--add PATH]... [--debug]

  --out FILE        where the image goes (default build/panda.img)
  --cmdline "..."   kernel command line (e.g. "log=debug", "reboot", "halt")
  --args "WORDS"    arguments for the first program (after a lone -- on the command line)
  --init PATH       run this static ELF as the first program (packed as init)
  --add PATH        put this file into the initrd too (repeatable)
  --debug           the build with full debug info
  -h, --help        this text

Needs Limine's binary release: LIMINE_DIR, or a system-wide install (scripts/deps.sh
--limine fetches it where GitHub is reachable). Write the image to a USB stick with
  sudo dd if=build/panda.img of=/dev/sdX bs=4M conv=fsync status=progress
(sdX: the whole stick, not a partition; everything on it is lost). docs/HARDWARE.md
says what to expect on screen and serial, and which firmware settings matter.

Unlike scripts/run.sh, the image does not ask for QEMU's exit device: when the first
program exits, the kernel prints the outcome and powers the machine off (command-line
`halt` or `reboot` to choose otherwise).

Exit status: 0 written, 64 bad usage, 69 a set-up error (Limine missing, a failed build).
TXT
}

out="" cmdline="" init_args="" have_args=0 init="" adds=()
need() { [ "$2" -ge 2 ] || panda_usage_error "$1 needs a value"; }
while [ $# -gt 0 ]; do
    case "$1" in
        --out) need "$1" $#; out=$2; shift 2 ;;
        --cmdline) need "$1" $#; cmdline="$cmdline $2"; shift 2 ;;
        --args) need "$1" $#; init_args="$init_args $2"; have_args=1; shift 2 ;;
        --init) need "$1" $#; init=$2; shift 2 ;;
        --add) need "$1" $#; adds+=("$2"); shift 2 ;;
        --debug) panda_use_profile debug-kernel; shift ;;
        -h|--help) usage; exit 0 ;;
        *) panda_usage_error "unknown option: $1" ;;
    esac
done
[ -z "$init" ] || [ -f "$init" ] || panda_usage_error "--init $init: no such file"
[ "$have_args" = 0 ] || cmdline="$cmdline -- ${init_args# }"
cmdline="${cmdline# }"
[ "$(printf '%s' "$cmdline" | wc -c)" -le 255 ] ||
    panda_usage_error "the kernel command line is $(printf '%s' "$cmdline" | wc -c) bytes; at most 255 fit"
out=${out:-$PANDA_ROOT/build/panda.img}

limine_src=$(panda_find_limine)
panda_ensure_rust
panda_ensure_limine_tools
panda_build_kernel
panda_build_user
initrd=$PANDA_INITRD
if [ -n "$init" ] || [ ${#adds[@]} != 0 ]; then initrd="$PANDA_ROOT/build/initrd-image.tar"; fi
panda_pack_initrd "$initrd" "$init" "${adds[@]}"
mkdir -p "$(dirname "$out")"
panda_build_iso "$limine_src" "$PANDA_ROOT/build/image" "$PANDA_KERNEL" "$initrd" "$cmdline" "$out"
echo "panda: wrote $out ($(( $(stat -c %s "$out") / 1024 )) KiB, BIOS and UEFI); to a USB stick: sudo dd if=$out of=/dev/sdX bs=4M conv=fsync" >&2
