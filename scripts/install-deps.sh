#!/usr/bin/env bash
# Installs the Debian packages disco needs to build and run (idempotent).
#   libhwloc-dev, libudev-dev, pkg-config: hwlocality links hwloc statically
#   hwloc-nox: lstopo/hwloc-annotate, to inspect or export topologies
#   cpio: scripts/fetch-linux-guest.sh builds the Linux guests' initramfs
#   tmux: tests/api.rs runs `disco top` in a real terminal
set -euo pipefail
packages=(libhwloc-dev libudev-dev pkg-config hwloc-nox cpio xz-utils zstd tmux)
missing=()
for p in "${packages[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
if [ ${#missing[@]} -eq 0 ]; then
  echo "install-deps: all packages present (${packages[*]})"
  exit 0
fi
sudo=""
[ "$(id -u)" -eq 0 ] || sudo="sudo"
echo "install-deps: installing ${missing[*]}"
$sudo apt-get update -qq
DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq --no-install-recommends "${missing[@]}"
