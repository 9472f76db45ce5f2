#!/usr/bin/env bash
# Unpacks a second, newer QEMU beside the system's into DIR (default target/qemu-next), for the
# test that moves a vm VNF live between two QEMU versions (a host's agent runs it with --qemu).
# Nothing is installed system-wide: the packages are downloaded and unpacked into DIR.
#
# On Debian 12 (bookworm), whose QEMU is 7.2, the newer one is bookworm-backports' (10.0),
# built against bookworm's libraries. Other releases: nothing is known to pair with their
# QEMU, so the script says so and fails.
# Usage: scripts/qemu-next.sh [DIR]   (as root, or with sudo available)
set -euo pipefail

DIR="${1:-target/qemu-next}"
BIN="$DIR/usr/bin/qemu-system-x86_64"
if [ -x "$BIN" ] && "$BIN" --version >/dev/null 2>&1; then
  echo "qemu-next: $("$BIN" --version | head -1) in $DIR"
  exit 0
fi

. /etc/os-release
if [ "${VERSION_CODENAME:-}" != "bookworm" ]; then
  echo "qemu-next: no second QEMU version is known for ${PRETTY_NAME:-this system} (Debian 12's bookworm-backports is used there)" >&2
  exit 1
fi

SUDO=""
if [ "$(id -u)" -ne 0 ]; then
  command -v sudo >/dev/null || { echo "qemu-next: need root (or sudo) to read bookworm-backports' package list" >&2; exit 1; }
  SUDO=sudo
fi

LIST=/etc/apt/sources.list.d/telvirt-qemu-next.list
work="$(mktemp -d)"
cleanup() {
  $SUDO rm -f "$LIST"
  $SUDO env DEBIAN_FRONTEND=noninteractive apt-get update -q >/dev/null 2>&1 || true
  rm -rf "$work"
}
trap cleanup EXIT

# The list is added for the download only, and removed (with its package lists) after.
echo "deb http://deb.debian.org/debian bookworm-backports main" | $SUDO tee "$LIST" >/dev/null
$SUDO env DEBIAN_FRONTEND=noninteractive apt-get update -q >/dev/null
chmod 0777 "$work"
(cd "$work" && $SUDO apt-get download -q \
  qemu-system-x86/bookworm-backports \
  qemu-system-common/bookworm-backports \
  qemu-system-data/bookworm-backports)

rm -rf "$DIR"
mkdir -p "$DIR"
for deb in "$work"/*.deb; do
  dpkg-deb -x "$deb" "$DIR"
done
"$BIN" --version | head -1 | sed "s|^|qemu-next: |; s|$| in $DIR|"
