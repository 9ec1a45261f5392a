#!/usr/bin/env bash
# Builds Panda and boots it in QEMU, streaming the serial console; exits with the
# guest's status. See --help.
set -euo pipefail
# shellcheck source=scripts/lib.sh
. "$(dirname "${BASH_SOURCE[0]}")/lib.sh"

usage() {
    cat <<'TXT'
usage: scripts/run.sh [options] [-- extra qemu args]

  -smp N              CPUs (1..512, default 4)
  -m SIZE             guest memory, e.g. 512M or 2G (default 512M)
  --accel kvm|tcg     force an accelerator (default: KVM only where it really works)
  --cpu MODEL         QEMU CPU model (default max under TCG, host under KVM; e.g. max,-x2apic)
  --boot pvh|limine   PVH (QEMU -kernel, default) or a Limine ISO from LIMINE_DIR
  --firmware bios|uefi  firmware for --boot limine (default bios; uefi uses Debian's OVMF)
  --gdb[=PORT]        start paused with a gdb stub on localhost:PORT (default 1234)
                      and print the gdb command to paste
  --debug             build the kernel and programs with full debug info and no
                      optimisation (cargo profile debug-kernel), for gdb's info locals
  --add PATH          put this file in the initrd too, under its own name (repeatable:
                      programs init spawns, data files)
  --init PATH         run this static ELF as the first process (packed into the initrd
                      as `init`, beside the usual programs)
  --cmdline "..."     extra kernel command-line tokens (test, crash=..., log=debug)
  --args "WORDS"      arguments for the first program (its argv after its path):
                      appended to the kernel command line after a lone `--`;
                      words are split at spaces (no quoting)
  --timeout SECONDS   stop the guest after this long (exit 3)
  --as-hardware       end the run as on a real machine: no isa-debug-exit device, no
                      `qemu.exit` word, resets reboot the guest (no -no-reboot). The
                      kernel powers off (QEMU exits; status 0 whatever the outcome:
                      its last lines say), or halts or resets as the command line
                      says (`halt`, `reboot`)
  --no-serial         no serial port (-serial none): the console is on the screen only
  -h, --help          this text

Environment: QEMU (the qemu-system-x86_64 to use), LIMINE_DIR (Limine's binaries),
PANDA_PREBUILT_KERNEL and PANDA_PREBUILT_INITRD (boot these files, build nothing).

Exit status: 0 guest success, 1 guest failure, 2 guest reset without reporting
(a triple fault), 3 time-out, 4 the first program exited non-zero, 5 the kernel
ended the first program, 64 bad usage (e.g. a CPU model QEMU does not know), 69 a
set-up error (a tool missing, a build failed, QEMU itself failed: its message).
TXT
}

smp=4 mem=512M accel=auto boot=pvh firmware=bios gdb=0 init="" cmdline="" timeout_s="" adds=()
init_args="" have_args=0
as_hardware=0 serial=stdio
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
        --debug) panda_use_profile debug-kernel; shift ;;
        --init) [ $# -ge 2 ] || panda_usage_error "--init needs a path"; init=$2; shift 2 ;;
        --add) [ $# -ge 2 ] || panda_usage_error "--add needs a path"; adds+=("$2"); shift 2 ;;
        --cmdline) [ $# -ge 2 ] || panda_usage_error "--cmdline needs a value"; cmdline="$cmdline $2"; shift 2 ;;
        --args) [ $# -ge 2 ] || panda_usage_error "--args needs a value"; init_args="$init_args $2"; have_args=1; shift 2 ;;
        --timeout) [ $# -ge 2 ] || panda_usage_error "--timeout needs seconds"; timeout_s=$2; shift 2 ;;
        --as-hardware) as_hardware=1; shift ;;
        --no-serial) serial=none; shift ;;
        -h|--help) usage; exit 0 ;;
        --) shift; extra=("$@"); break ;;
        *) panda_usage_error "unknown option: $1" ;;
    esac
done

if ! [[ "$smp" =~ ^[0-9]+$ ]] || [ "$smp" -lt 1 ] || [ "$smp" -gt 512 ]; then
    panda_usage_error "-smp must be a whole number from 1 to 512, not '$smp'"
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
# The first program's arguments follow a lone `--` (the kernel reads only the words
# before it). The boot protocols hand the kernel at most 255 bytes of command line.
if [ "$have_args" = 1 ]; then
    read -r -a words <<<"$cmdline"
    for w in "${words[@]}"; do
        [ "$w" != "--" ] || panda_usage_error "give the first program's arguments either with --args or after -- in --cmdline, not both"
    done
    cmdline="$cmdline -- ${init_args# }"
fi
# The harness's status channel (see below): the kernel writes its outcome to
# isa-debug-exit only when the command line says so.
[ "$as_hardware" = 1 ] || cmdline="qemu.exit $cmdline"
cmdline="${cmdline# }"
[ "$(printf '%s' "$cmdline" | wc -c)" -le 255 ] ||
    panda_usage_error "the kernel command line (--cmdline and --args) is $(printf '%s' "$cmdline" | wc -c) bytes; at most 255 fit"
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
    limine_src=$(panda_find_limine)
fi

panda_ensure_rust
panda_ensure_qemu
# A CPU model QEMU does not know is bad usage, found in QEMU's own list (when it can be
# read; otherwise QEMU's error at start says it).
if [ -n "${PANDA_CPU_MODEL:-}" ]; then
    models=$("${QEMU:-qemu-system-x86_64}" -cpu help 2>/dev/null |
        awk '/^Available CPUs:/ { on = 1; next } on && NF == 0 { exit } on { n = $1; if (n == "x86") n = $2; print n }') || true
    if [ -n "$models" ] && ! grep -qxF -- "${PANDA_CPU_MODEL%%,*}" <<<"$models"; then
        panda_usage_error "--cpu: QEMU has no CPU model '${PANDA_CPU_MODEL%%,*}' (qemu-system-x86_64 -cpu help lists them)"
    fi
fi
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

qemu_args=(-machine q35 -m "$mem" -smp "$smp" -display none -serial "$serial" "${PANDA_ACCEL_ARGS[@]}")
if [ "$as_hardware" = 0 ]; then
    # The harness's status channel: the kernel writes its outcome to isa-debug-exit
    # (only when the command line says `qemu.exit`), and a reset ends QEMU.
    # shellcheck disable=SC2054 # the commas belong to one -device argument
    qemu_args+=(-no-reboot -device isa-debug-exit,iobase=0xf4,iosize=0x04)
fi

if [ "$boot" = pvh ]; then
    qemu_args+=(-kernel "$PANDA_KERNEL" -initrd "$initrd" -append "$cmdline")
    what="PVH"
else
    iso_dir="$PANDA_ROOT/build/limine"
    panda_build_iso "$limine_src" "$iso_dir" "$PANDA_KERNEL" "$initrd" "$cmdline" "$iso_dir/panda.iso"
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
    gdb_sh="scripts/gdb.sh $gdb"; [ "$PANDA_PROFILE" = release ] || gdb_sh="$gdb_sh --debug"
    echo "  (or: $gdb_sh; hbreak, not break: the kernel's addresses are mapped only once it runs)" >&2
fi

echo "panda: booting ${PANDA_KERNEL#"$PANDA_ROOT"/} via $what, -smp $smp, -m $mem, $PANDA_ACCEL" >&2
# The console goes through the symbolizer (crash reports gain function and file:line);
# PANDA_SYMBOLIZE=0, or no python3, passes it through untouched.
symbolize=(cat)
if [ "${PANDA_SYMBOLIZE:-1}" != 0 ] && command -v python3 >/dev/null 2>&1; then
    symbolize=(python3 "$PANDA_ROOT/scripts/symbolize.py" "$PANDA_KERNEL")
fi
# QEMU's own messages are kept apart: if QEMU itself fails (status 1: a CPU model or
# feature it does not know, memory it cannot allocate, a bad extra argument), its
# message becomes run.sh's one line; otherwise it goes into the closing line (gdb's
# kill, a signal). Warnings of a run that reports are not shown.
qemu_err=$(mktemp)
trap 'rm -f "$qemu_err"' EXIT
set +e
if [ -n "$timeout_s" ]; then
    timeout --foreground -k 5 "$timeout_s" "${QEMU:-qemu-system-x86_64}" "${qemu_args[@]}" "${extra[@]}" </dev/null 2>"$qemu_err" |
        "${symbolize[@]}"
    status=${PIPESTATUS[0]}
else
    "${QEMU:-qemu-system-x86_64}" "${qemu_args[@]}" "${extra[@]}" 2>"$qemu_err" | "${symbolize[@]}"
    status=${PIPESTATUS[0]}
fi
set -e
if [ "$as_hardware" = 1 ] && [ "$status" = 0 ]; then
    # Without -no-reboot QEMU exits 0 only when the guest powers off.
    echo "panda: the guest powered off (--as-hardware: the kernel's last lines give the outcome)" >&2
    exit 0
fi
if [ "$status" = 1 ] && [ -s "$qemu_err" ]; then
    panda_die "QEMU could not run the guest: $(grep -v '^[[:space:]]*$' "$qemu_err" | sed 's/^qemu-system-x86_64: //' | paste -sd ' ' -)"
fi
qemu_said=$(grep -v '^[[:space:]]*$' "$qemu_err" | sed 's/^qemu-system-x86_64: //' | paste -sd ' ' - || true)
panda_map_status "$status" "$timeout_s" "$qemu_said"
