#!/usr/bin/env bash
# Cargo's runner for the x86_64-unknown-none target (.cargo/config.toml): makes
# `cargo run --release -p panda-kernel --target x86_64-unknown-none [-- RUN.SH OPTIONS]`
# boot the kernel cargo just built, with the user programs, as scripts/run.sh does;
# `cargo run ... -p panda-programs --bin NAME` boots the usual kernel with NAME as init.
set -euo pipefail
bin=$1; shift
root="$(cd "$(dirname "$0")/.." && pwd)"
cd "$root"
# shellcheck source=scripts/lib.sh
. scripts/lib.sh
# `cargo run --profile debug-kernel ...` (the --debug build): programs of the same profile.
debug=()
case "$bin" in */debug-kernel/*) panda_use_profile debug-kernel; debug=(--debug) ;; esac
if [ "$(basename "$bin")" = panda-kernel ]; then
    panda_build_user
    initrd="$PANDA_ROOT/build/initrd-cargo.tar"
    panda_pack_initrd "$initrd" ""
    PANDA_PREBUILT_KERNEL=$bin PANDA_PREBUILT_INITRD=$initrd exec scripts/run.sh "$@"
fi
exec scripts/run.sh "${debug[@]}" --init "$bin" "$@"
