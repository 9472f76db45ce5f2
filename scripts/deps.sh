#!/usr/bin/env bash
# Installs what telvirt needs from Debian's packages, only what is missing.
# Usage: scripts/deps.sh            (as root, or with sudo available)
set -euo pipefail

PACKAGES=(
  qemu-system-x86   # the vm runtime
  busybox-static    # the default guest's initramfs
  cpio zstd xz-utils kmod  # building the guest image
  clang lld         # example VNFs in C, compiled to wasm32
  rt-tests          # cyclictest, the reference for `telvirt latency timer`
  iperf3 iputils-ping iproute2 ethtool  # real traffic through chains, network namespaces
  protobuf-compiler libprotobuf-dev  # protoc and its well-known types, for the etcd client's build
  etcd-server       # the etcd cluster store's tests start a real etcd
  tcpdump           # the data plane's VXLAN tests check that tcpdump decodes the tunnel traffic
  keepalived        # the VRRP baseline of `telvirt bench failover`
  nftables          # tests that cut the path between two hosts of a pair
  curl              # the demo scrapes /metrics as Prometheus would
  chromium chromium-driver  # the web console's tests drive a headless browser
)

missing=()
for pkg in "${PACKAGES[@]}"; do
  dpkg-query -W -f='${Status}' "$pkg" 2>/dev/null | grep -q "install ok installed" || missing+=("$pkg")
done

if ((${#missing[@]})); then
  echo "deps: installing ${missing[*]}"
  SUDO=""
  if [ "$(id -u)" -ne 0 ]; then
    command -v sudo >/dev/null || { echo "deps: need root (or sudo) to install: ${missing[*]}" >&2; exit 1; }
    SUDO=sudo
  fi
  $SUDO env DEBIAN_FRONTEND=noninteractive apt-get update -q
  $SUDO env DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends "${missing[@]}"
fi

command -v cargo >/dev/null || {
  echo "deps: cargo is missing; install the Rust toolchain (1.95 or newer) first" >&2
  exit 1
}
need="1.95"
have="$(rustc --version | awk '{print $2}')"
if [ "$(printf '%s\n%s\n' "$need" "$have" | sort -V | head -1)" != "$need" ]; then
  echo "deps: rustc $have is older than $need" >&2
  exit 1
fi
echo "deps: all present"
