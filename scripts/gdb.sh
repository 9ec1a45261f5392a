#!/usr/bin/env bash
# Connects gdb to a kernel started with `scripts/run.sh --gdb[=PORT]`, with the kernel's
# symbols, and a user program's too (`--program NAME`, e.g. init or utest: its symbols
# are at their link addresses, 0x400000 on). `--debug` takes the binaries of
# `scripts/run.sh --debug` (full debug info). Extra arguments go to gdb (e.g. -batch
# -ex 'hbreak panda_kernel::kmain' -ex continue -ex bt).
# Use `hbreak` for the first breakpoint: before the kernel's page tables are up, its
# higher-half addresses are not mapped, so a software breakpoint cannot be written.
set -euo pipefail
cd "$(dirname "$0")/.."
# shellcheck source=scripts/lib.sh
. scripts/lib.sh

port=1234 program=""
while [ $# -gt 0 ]; do
    case "$1" in
        -h|--help) sed -n '2,9p' "$0" | sed 's/^# \{0,1\}//'; echo "usage: scripts/gdb.sh [PORT] [--debug] [--program NAME] [gdb arguments...]"; exit 0 ;;
        --debug) panda_use_profile debug-kernel; shift ;;
        --program) [ $# -ge 2 ] || panda_usage_error "--program needs a name"; program=$2; shift 2 ;;
        [0-9]*) port=$1; shift ;;
        *) break ;;
    esac
done
command -v gdb >/dev/null 2>&1 || panda_apt_install gdb || panda_die "gdb is missing (apt-get install gdb)"
if [ ! -f "$PANDA_KERNEL" ]; then
    if [ "$PANDA_PROFILE" = release ]; then panda_die "no kernel at $PANDA_KERNEL: run scripts/run.sh --gdb first"
    else panda_die "no kernel at $PANDA_KERNEL: run scripts/run.sh --gdb --debug first"; fi
fi
args=(-q "$PANDA_KERNEL" -ex "target remote localhost:$port")
if [ -n "$program" ]; then
    elf="$PANDA_USER_BIN/$program"
    [ -f "$elf" ] || panda_die "no user program $elf"
    args+=(-ex "add-symbol-file $elf")
fi
exec gdb "${args[@]}" "$@"
