#!/bin/sh
# Lays out a runtime root filesystem for rmem's images (used by the
# Containerfile's build stage):
#
#   bundle.sh OUT BINARY...
#
#   OUT/root/usr/local/bin/   the binaries
#   OUT/root/<lib paths>      every shared library they link, and the loader,
#                             at the paths the binaries look for them
#   OUT/root/etc/             passwd and group with root and rmem (65532)
#   OUT/root/tmp/             world-writable, sticky
#   OUT/state/                empty; becomes /var/lib/rmem, owned by rmem
#
# so the images can be FROM scratch.
set -eu
out=$1
shift
mkdir -p "$out/root/usr/local/bin" "$out/root/etc/rmem" "$out/root/tmp" "$out/state"
chmod 1777 "$out/root/tmp"
for bin in "$@"; do
  cp "$bin" "$out/root/usr/local/bin/"
  # Lines are "name => /path (addr)" or "/path (addr)"; vdso has no path.
  ldd "$bin" | awk '{ for (i = 1; i <= NF; i++) if ($i ~ /^\//) print $i }' |
    while read -r lib; do
      mkdir -p "$out/root$(dirname "$lib")"
      cp -L "$lib" "$out/root$lib"
    done
done
cat >"$out/root/etc/passwd" <<'PASSWD'
root:x:0:0:root:/root:/sbin/nologin
rmem:x:65532:65532:rmem:/var/lib/rmem:/sbin/nologin
PASSWD
cat >"$out/root/etc/group" <<'GROUP'
root:x:0:
rmem:x:65532:
GROUP
