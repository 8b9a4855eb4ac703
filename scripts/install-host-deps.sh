#!/usr/bin/env bash
# Installs what Hangar and its tests need on a Debian 12 host. Used by both README commands
# and by CI. Safe to run again: apt skips what is installed.
set -euo pipefail

packages=(
  runsc            # the gvisor driver
  qemu-system-x86  # the vm driver's VMM (qemu-system-x86_64 -M microvm)
  crun             # the container driver
  e2fsprogs        # mkfs.ext4 for session volumes
  erofs-utils      # mkfs.erofs for the vm driver's read-only image disks
  util-linux       # mount, losetup, unshare, nsenter
  iproute2         # network namespaces (tests)
  nftables         # egress rules (doctor)
  busybox-static   # the example and test root filesystems
  curl             # the tests' HTTP client
  ca-certificates  # TLS the egress proxy originates for injected secrets
  openssl          # the tests' certificates for TLS the egress proxy originates
  procps           # ps, for checking that nothing is left behind
  buildah          # builds OCI images from Dockerfiles (and the tests' images)
  debootstrap      # `hangar images bootstrap debian:bookworm`
  python3          # the tests' clients (the openai SDK)
  python3-venv     # a venv for the tests' Python packages
  chromium         # the dashboard tests' headless browser (driven by Playwright)
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

# The vm driver's guest kernel: Debian's cloud kernel, unpacked (never installed on the host)
# into /var/lib/hangar/vm/kernels/<uname>/{vmlinuz,modules/}, with `current` pointing at it.
# The host has no kmod, so the .deb is only unpacked; hangar reads module dependencies itself.
kernels=/var/lib/hangar/vm/kernels
kernel_meta=linux-image-cloud-amd64
if [ ! -e "$kernels/current/vmlinuz" ]; then
  if [ "$(id -u)" -ne 0 ]; then
    echo "install-host-deps: need root to fetch the guest kernel into $kernels" >&2
    exit 1
  fi
  # Work beside the final directory so the moves below are renames on one filesystem.
  mkdir -p "$kernels"
  work=$(mktemp -d "$kernels/.fetch.XXXXXX")
  trap 'rm -rf "$work"' EXIT
  updated=no
  if ! apt-cache show "$kernel_meta" >/dev/null 2>&1; then
    apt-get update -qq
    updated=yes
  fi
  while :; do
    # The meta package only names the versioned image package it depends on.
    kernel_pkg=$(apt-cache depends "$kernel_meta" 2>/dev/null |
      sed -n 's/^ *Depends: \(linux-image-[0-9][^ ]*\)$/\1/p' | head -n 1)
    if [ -z "$kernel_pkg" ]; then
      echo "install-host-deps: cannot find the kernel package $kernel_meta depends on" >&2
      exit 1
    fi
    # apt-get download writes into the current directory. As root it notes that the download
    # is unsandboxed, which is harmless for a file that is only unpacked: its output is shown
    # on failure only.
    if (cd "$work" && apt-get download -q "$kernel_pkg") >"$work/download.log" 2>&1; then
      break
    fi
    if [ "$updated" = no ]; then
      # A stale package list names a version the archive no longer has.
      apt-get update -qq
      updated=yes
      continue
    fi
    cat "$work/download.log" >&2
    echo "install-host-deps: apt-get download $kernel_pkg failed" >&2
    exit 1
  done
  echo "install-host-deps: fetched the guest kernel $kernel_pkg" >&2
  release=${kernel_pkg#linux-image-}
  dpkg-deb -x "$work"/"$kernel_pkg"_*.deb "$work/deb"
  if [ ! -f "$work/deb/boot/vmlinuz-$release" ] || [ ! -d "$work/deb/lib/modules/$release" ]; then
    echo "install-host-deps: $kernel_pkg has no boot/vmlinuz-$release or lib/modules/$release" >&2
    exit 1
  fi
  # Assemble, then rename into place: a half-copied kernel is never visible under its name.
  mkdir "$work/$release"
  mv "$work/deb/boot/vmlinuz-$release" "$work/$release/vmlinuz"
  mv "$work/deb/lib/modules/$release" "$work/$release/modules"
  rm -rf "$kernels/$release"
  mv -T "$work/$release" "$kernels/$release"
  ln -sfn "$release" "$work/current"
  mv -T "$work/current" "$kernels/current"
  rm -rf "$work"
  trap - EXIT
fi
