#!/usr/bin/env bash
# Builds examples/hello into an OCI image layout at $1 with buildah: a busybox root
# filesystem (from the host's busybox-static), the agent's files, and its entrypoint.
set -euo pipefail
out=${1:?usage: make-example-image.sh OUT_DIR}
here=$(cd "$(dirname "$0")/.." && pwd)
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
busybox=$(command -v busybox)

root=$work/rootfs
mkdir -p "$root"/{bin,etc,tmp,root,home/agent,www}
cp "$busybox" "$root/bin/busybox"
for applet in $("$busybox" --list); do [ "$applet" = busybox ] || ln -s busybox "$root/bin/$applet"; done
printf 'root:x:0:0:root:/root:/bin/sh\nagent:x:1000:1000:agent:/home/agent:/bin/sh\n' > "$root/etc/passwd"
printf 'root:x:0:\nagent:x:1000:\n' > "$root/etc/group"
chmod 1777 "$root/tmp"
chown 1000:1000 "$root/home/agent"
cp -r "$here/examples/hello/www/." "$root/www/"
tar -C "$root" -cf "$work/rootfs.tar" .

export BUILDAH_ISOLATION=chroot
b() { buildah --storage-driver vfs --root "$work/storage" --runroot "$work/run" "$@"; }
c=$(b from scratch)
b add "$c" "$work/rootfs.tar" / >/dev/null
b config --entrypoint '["/bin/httpd", "-f", "-p", "127.0.0.1:8088", "-h", "/www"]' \
  --workingdir /home/agent --user agent --env GREETING=hello "$c"
b commit -q "$c" hangar-example-hello:latest >/dev/null
rm -rf "$out"
b push -q hangar-example-hello:latest "oci:$out"
chmod -R u+w "$work" 2>/dev/null || true
echo "$out"
