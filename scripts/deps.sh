#!/usr/bin/env bash
# Installs what building and booting Panda needs, only where it is missing:
#   - the stable toolchain pinned by rust-toolchain.toml with the x86_64-unknown-none target;
#   - QEMU new enough for x2APIC under TCG (>= 8; bookworm's 7.2 is not, its backports are);
#   - with --limine: xorriso and OVMF for the Limine ISO path, and Limine's official
#     binary release (branch v8.x-binary) into build/limine-bin where GitHub is reachable;
#   - for test.sh's screen checks (with LIMINE_DIR): tesseract-ocr.
# Sourced by run.sh, test.sh and bench.sh; also runnable on its own.
# Prints one line per thing it installs; silent when everything is present.

# Set-up errors (a missing tool, a failed build) exit 69, distinct from every guest outcome.
panda_die() { printf 'panda: %s\n' "$*" >&2; exit 69; }

panda_sudo() {
    if [ "$(id -u)" = 0 ]; then "$@"
    elif command -v sudo >/dev/null 2>&1; then sudo -n "$@"
    else return 1; fi
}

panda_apt_updated=0
panda_apt_install() {
    # $1..: apt arguments (packages, optionally -t suite)
    command -v apt-get >/dev/null 2>&1 || return 1
    if [ "$panda_apt_updated" = 0 ]; then
        panda_sudo env DEBIAN_FRONTEND=noninteractive apt-get update -qq >/dev/null 2>&1 || return 1
        panda_apt_updated=1
    fi
    panda_sudo env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "$@" >/dev/null 2>&1
}

# Version of the qemu-system-x86_64 on PATH as "MAJOR", or empty.
panda_qemu_major() {
    command -v "${QEMU:-qemu-system-x86_64}" >/dev/null 2>&1 || return 0
    "${QEMU:-qemu-system-x86_64}" --version 2>/dev/null | sed -n 's/.*version \([0-9]*\)\..*/\1/p' | head -n1
}

panda_ensure_qemu() {
    local major
    major=$(panda_qemu_major)
    if [ -n "$major" ] && [ "$major" -ge 8 ]; then return 0; fi
    if [ -n "${QEMU:-}" ]; then
        panda_die "QEMU=$QEMU is missing or older than 8.0 (x2APIC under TCG needs >= 8); unset QEMU or point it to a newer build"
    fi
    echo "panda: installing QEMU (qemu-system-x86 >= 8 for x2APIC under TCG)..." >&2
    if [ -r /etc/os-release ] && grep -q '^VERSION_CODENAME=bookworm' /etc/os-release; then
        # bookworm's own QEMU is 7.2: take it from bookworm-backports.
        if ! grep -rqs 'bookworm-backports' /etc/apt/sources.list /etc/apt/sources.list.d/; then
            echo 'deb http://deb.debian.org/debian bookworm-backports main' |
                panda_sudo tee /etc/apt/sources.list.d/panda-backports.list >/dev/null ||
                panda_die "cannot add bookworm-backports to apt sources (need root or sudo)"
        fi
        panda_apt_install -t bookworm-backports qemu-system-x86 ||
            panda_die "installing qemu-system-x86 from bookworm-backports failed; install QEMU >= 8 by hand"
    else
        panda_apt_install qemu-system-x86 ||
            panda_die "cannot install qemu-system-x86 (no apt-get or no root); install QEMU >= 8 by hand"
    fi
    major=$(panda_qemu_major)
    if [ -z "$major" ] || [ "$major" -lt 8 ]; then
        panda_die "qemu-system-x86_64 is still missing or older than 8.0 after installing; install QEMU >= 8 by hand"
    fi
}

panda_ensure_rust() {
    command -v cargo >/dev/null 2>&1 || panda_die "cargo not found: install Rust with rustup (https://rustup.rs)"
    command -v rustup >/dev/null 2>&1 || panda_die "rustup not found: the x86_64-unknown-none target is added through rustup"
    # rust-toolchain.toml names the toolchain and target; this installs both if needed.
    (cd "$PANDA_ROOT" && rustup show active-toolchain >/dev/null 2>&1) || 
        (cd "$PANDA_ROOT" && rustup toolchain install >/dev/null 2>&1) ||
        panda_die "installing the toolchain named in rust-toolchain.toml failed"
    if ! (cd "$PANDA_ROOT" && rustup target list --installed 2>/dev/null | grep -qx x86_64-unknown-none); then
        echo "panda: adding the x86_64-unknown-none target..." >&2
        (cd "$PANDA_ROOT" && rustup target add x86_64-unknown-none >/dev/null 2>&1) ||
            panda_die "rustup target add x86_64-unknown-none failed"
    fi
}

panda_ensure_limine_tools() {
    if ! command -v xorriso >/dev/null 2>&1; then
        echo "panda: installing xorriso..." >&2
        panda_apt_install xorriso || panda_die "cannot install xorriso; install it by hand"
    fi
    if [ ! -r /usr/share/OVMF/OVMF_CODE_4M.fd ] && [ ! -r /usr/share/OVMF/OVMF_CODE.fd ] && [ ! -r /usr/share/ovmf/OVMF.fd ]; then
        echo "panda: installing ovmf..." >&2
        panda_apt_install ovmf || panda_die "cannot install ovmf; install it by hand"
    fi
}

# Limine's official binary release into build/limine-bin (where run.sh and image.sh
# look after LIMINE_DIR), unless one is found already. Where GitHub cannot be reached
# (machines that reach only package registries) it says so in one line and returns 1.
panda_fetch_limine() {
    local dest="$PANDA_ROOT/build/limine-bin"
    if [ -n "${LIMINE_DIR:-}" ] || [ -f "$dest/limine-bios.sys" ] || [ -f /usr/share/limine/limine-bios.sys ]; then
        return 0
    fi
    echo "panda: fetching Limine's binary release (v8.x-binary) into ${dest#"$PANDA_ROOT"/}..." >&2
    rm -rf "$dest.tmp"
    if timeout 120 git clone -q --depth 1 --branch v8.x-binary https://github.com/limine-bootloader/limine.git "$dest.tmp" >/dev/null 2>&1; then
        rm -rf "$dest"; mv "$dest.tmp" "$dest"
    else
        rm -rf "$dest.tmp"
        echo "panda: cannot fetch Limine from github.com (no route from here?): download its binary release by hand and set LIMINE_DIR" >&2
        return 1
    fi
}

# OCR for test.sh's screen checks (Debian's tesseract-ocr, with its English data).
# Returns non-zero, after one line, if it is missing and cannot be installed.
panda_ensure_tesseract() {
    command -v tesseract >/dev/null 2>&1 && return 0
    echo "panda: installing tesseract-ocr (OCR for the screen checks)..." >&2
    panda_apt_install tesseract-ocr tesseract-ocr-eng && command -v tesseract >/dev/null 2>&1
}

PANDA_ROOT=${PANDA_ROOT:-$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)}

if [ "${BASH_SOURCE[0]}" = "$0" ]; then
    set -euo pipefail
    panda_ensure_rust
    panda_ensure_qemu
    if [ "${1:-}" = "--limine" ]; then
        panda_ensure_limine_tools
        panda_fetch_limine || exit 69
    fi
    echo "panda: dependencies present (QEMU $(panda_qemu_major).x, target x86_64-unknown-none)"
fi
