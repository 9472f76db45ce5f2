#!/usr/bin/env bash
# Unpacks a second, newer QEMU beside the system's into DIR (default target/qemu-next), for the
# tests that run a vm VNF on it and move one live from the system's QEMU to it (a host's agent
# runs it with --qemu). Nothing is installed system-wide: the packages are downloaded and
# unpacked into DIR.
#
# On Debian 12 (bookworm), whose QEMU is 7.2, the newer one is bookworm-backports' (10.0),
# built against bookworm's libraries. On other releases nothing is known to pair with their
# QEMU: the script says so and unpacks nothing (those tests then say they were skipped).
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
  echo "qemu-next: no second QEMU version is known for ${PRETTY_NAME:-this system} (Debian 12's bookworm-backports is used there); the tests that need one are skipped"
  exit 0
fi

SUDO=""
if [ "$(id -u)" -ne 0 ]; then
  command -v sudo >/dev/null || { echo "qemu-next: need root (or sudo) to read bookworm-backports' package list" >&2; exit 1; }
  SUDO=sudo
fi

PACKAGES=(qemu-system-x86 qemu-system-common qemu-system-data)
LIST=/etc/apt/sources.list.d/telvirt-qemu-next.list
# Only this user may write here (the packages are unpacked from it).
work="$(mktemp -d)"
cleanup() {
  $SUDO rm -f "$LIST"
  $SUDO env DEBIAN_FRONTEND=noninteractive apt-get update -q >/dev/null 2>&1 || true
  rm -rf "$work"
}
trap cleanup EXIT

# The list is added for the download only, and removed (with its package lists) after.
echo "deb http://deb.debian.org/debian bookworm-backports main" | $SUDO tee "$LIST" >/dev/null
$SUDO env DEBIAN_FRONTEND=noninteractive apt-get update -q
# Downloaded as this user into its own directory (apt's sandbox user cannot write there).
(cd "$work" && apt-get download -q -o APT::Sandbox::User="$(id -un)" \
  "${PACKAGES[@]/%//bookworm-backports}")

rm -rf "$DIR"
mkdir -p "$DIR"
for pkg in "${PACKAGES[@]}"; do
  debs=("$work/${pkg}_"*.deb)
  [ -f "${debs[0]}" ] || { echo "qemu-next: $pkg was not downloaded" >&2; exit 1; }
  dpkg-deb -x "${debs[0]}" "$DIR"
done
"$BIN" --version | head -1 | sed "s|^|qemu-next: |; s|$| in $DIR|"
