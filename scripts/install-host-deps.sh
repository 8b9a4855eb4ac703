#!/usr/bin/env bash
# Installs what Hangar and its tests need on a Debian 12 host. Used by both README commands
# and by CI. Safe to run again: apt skips what is installed.
set -euo pipefail

packages=(
  runsc            # the gvisor driver
  crun             # the container driver
  e2fsprogs        # mkfs.ext4 for session volumes
  util-linux       # mount, losetup, unshare, nsenter
  iproute2         # network namespaces (tests)
  nftables         # egress rules (doctor)
  busybox-static   # the example and test root filesystems
  curl             # the tests' HTTP client
  procps           # ps, for checking that nothing is left behind
  buildah          # builds OCI images from Dockerfiles (and the tests' images)
  debootstrap      # `hangar images bootstrap debian:bookworm`
  python3          # the tests' clients (the openai SDK)
  python3-venv     # a venv for the tests' Python packages
)

missing=()
for p in "${packages[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
if [ ${#missing[@]} -gt 0 ]; then
  if [ "$(id -u)" -ne 0 ]; then
    echo "install-host-deps: need root to install: ${missing[*]}" >&2
    exit 1
  fi
  echo "install-host-deps: installing ${missing[*]}" >&2
  apt-get update -qq
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${missing[@]}" >/dev/null
fi
