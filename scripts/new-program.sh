#!/usr/bin/env bash
# Writes a new Panda user program (a Rust crate outside the Panda tree) into DIR: its
# Cargo.toml (panda-rt as a path dependency on this checkout), .cargo/config.toml (the
# target and link settings every Panda program needs), rust-toolchain.toml and a
# src/main.rs that spawns a helper, runs threads, uses a buffer and brk. Then:
#   cd DIR && cargo build --release
#   scripts/run.sh --add DIR/target/x86_64-unknown-none/release/NAME --cmdline init=NAME
# See docs/PROGRAMS.md.
set -euo pipefail
cd "$(dirname "$0")/.."
# shellcheck source=scripts/lib.sh
. scripts/lib.sh

if [ "${1:-}" = -h ] || [ "${1:-}" = --help ]; then
    sed -n '2,8p' "$0" | sed 's/^# \{0,1\}//'; echo "usage: scripts/new-program.sh NAME DIR"; exit 0
fi
[ $# = 2 ] || panda_usage_error "usage: scripts/new-program.sh NAME DIR"
name=$1 dir=$2
[[ "$name" =~ ^[a-z][a-z0-9_-]{0,30}$ ]] ||
    panda_usage_error "NAME must be a lower-case crate name of at most 31 characters (it is also the initrd file name), not '$name'"
[ ! -e "$dir" ] || [ -z "$(ls -A "$dir" 2>/dev/null)" ] || panda_usage_error "$dir exists and is not empty"
mkdir -p "$dir/src" "$dir/.cargo"
for f in Cargo.toml .cargo/config.toml src/main.rs; do
    sed -e "s|PANDA_ROOT|$PANDA_ROOT|g" -e "s|NAME|$name|g" "user/template/$f" > "$dir/$f"
done
cp rust-toolchain.toml "$dir/"
echo "panda: wrote $dir (build: cd $dir && cargo build --release)"
