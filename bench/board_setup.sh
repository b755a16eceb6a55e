#!/usr/bin/env bash
# Host setup for `python -m bench board` on a Debian 12 (bookworm) host, as root:
#   1. bookworm-backports in the apt sources (same mirror as the host's own Debian source),
#   2. qemu-user-static (10.x: bookworm's own 7.2 crashes inside ONNX Runtime) and debootstrap
#      from bookworm-backports,
#   3. binfmt_misc mounted and qemu-aarch64 registered with the F (fix-binary) flag, so an
#      arm64 root runs with no qemu binary inside it.
# Each step says what it does and is skipped when already done. Usage: bash bench/board_setup.sh
set -euo pipefail

say() { echo "board setup: $*"; }

if [ "$(id -u)" != 0 ]; then
    echo "board setup: run as root (apt-get, mount and binfmt_misc need it)" >&2
    exit 1
fi
. /etc/os-release
if [ "${VERSION_CODENAME:-}" != bookworm ]; then
    echo "board setup: written for Debian bookworm, this is ${PRETTY_NAME:-unknown}" >&2
    exit 1
fi

if ! grep -rqs "bookworm-backports" /etc/apt/sources.list /etc/apt/sources.list.d/; then
    mirror=$(awk '/^URIs:/ {print $2; exit}' /etc/apt/sources.list.d/debian.sources 2>/dev/null || true)
    if [ -z "$mirror" ]; then
        mirror=$(awk '/^deb / && $3 == "bookworm" {print $2; exit}' /etc/apt/sources.list 2>/dev/null || true)
    fi
    if [ -z "$mirror" ]; then
        echo "board setup: found no Debian mirror in the apt sources to add bookworm-backports from" >&2
        exit 1
    fi
    say "adding bookworm-backports ($mirror) to /etc/apt/sources.list.d/bookworm-backports.sources"
    cat > /etc/apt/sources.list.d/bookworm-backports.sources <<SOURCES
Types: deb
URIs: $mirror
Suites: bookworm-backports
Components: main
Signed-By: /usr/share/keyrings/debian-archive-keyring.gpg
SOURCES
    apt-get update -q
fi

major=$( (qemu-aarch64 --version 2>/dev/null || true) | sed -n 's/.*version \([0-9]*\)\..*/\1/p')
if [ -z "$major" ] || [ "$major" -lt 10 ] || ! command -v debootstrap >/dev/null; then
    say "apt-get install -t bookworm-backports qemu-user-static debootstrap"
    [ -n "$(ls /var/lib/apt/lists/*backports* 2>/dev/null)" ] || apt-get update -q
    DEBIAN_FRONTEND=noninteractive apt-get install -y -q -t bookworm-backports \
        qemu-user-static debootstrap
fi

if [ ! -e /proc/sys/fs/binfmt_misc/register ]; then
    say "mount -t binfmt_misc binfmt_misc /proc/sys/fs/binfmt_misc"
    mount -t binfmt_misc binfmt_misc /proc/sys/fs/binfmt_misc
fi
entry=/proc/sys/fs/binfmt_misc/qemu-aarch64
if [ -e "$entry" ] && ! grep -q '^flags:.*F' "$entry"; then
    say "re-registering qemu-aarch64: its entry lacks the F flag"
    echo -1 > "$entry"
fi
if [ ! -e "$entry" ]; then
    say "registering qemu-aarch64 (/usr/lib/binfmt.d/qemu-aarch64.conf, flags POF)"
    cat /usr/lib/binfmt.d/qemu-aarch64.conf > /proc/sys/fs/binfmt_misc/register
fi
say "ready: $(qemu-aarch64 --version | head -1); binfmt $(grep '^flags' "$entry")"
