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
#   OUT/state/                becomes /var/lib/rmem, owned by rmem: empty but
#                             for pki/ and etcd-pki/, where volumes of member
#                             certificates and of etcd's own CA mount (a new
#                             volume takes its owner)
#
# When a binary links libibverbs (the rdma features), also what libibverbs
# loads at run time, which ldd does not show:
#
#   OUT/root/<libdir>/libibverbs/   every verbs provider (the user-space
#                                   driver of each kind of RDMA NIC) and the
#                                   libraries they link
#   OUT/root/etc/libibverbs.d/      the providers' .driver files, which tell
#                                   libibverbs which providers to load
#
# so the images can be FROM scratch.
set -eu
out=$1
shift
mkdir -p "$out/root/usr/local/bin" "$out/root/etc/rmem" "$out/root/tmp" "$out/state/pki" "$out/state/etcd-pki"
chmod 1777 "$out/root/tmp"

# Copies every library FILE links to its path under OUT/root.
copy_libs() {
  # Lines are "name => /path (addr)" or "/path (addr)"; vdso has no path.
  ldd "$1" | awk '{ for (i = 1; i <= NF; i++) if ($i ~ /^\//) print $i }' |
    while read -r lib; do
      mkdir -p "$out/root$(dirname "$lib")"
      cp -L "$lib" "$out/root$lib"
    done
}

verbs=
for bin in "$@"; do
  cp "$bin" "$out/root/usr/local/bin/"
  copy_libs "$bin"
  lib=$(ldd "$bin" | awk '$1 == "libibverbs.so.1" && $3 ~ /^\// { print $3 }')
  [ -z "$lib" ] || verbs=$lib
done

if [ -n "$verbs" ]; then
  # libibverbs dlopens lib<name>-rdmav<N>.so, for each name the .driver
  # files list, from the libibverbs directory beside its real file (the
  # path it was built with; ldd may name it through the /lib symlink).
  providers=$(dirname "$(readlink -f "$verbs")")/libibverbs
  found=
  for p in "$providers"/lib*-rdmav*.so; do
    [ -e "$p" ] || continue
    found=1
    mkdir -p "$out/root$providers"
    cp -L "$p" "$out/root$p"
    copy_libs "$p"
  done
  [ -n "$found" ] || {
    echo "bundle.sh: the binaries link libibverbs but $providers has no providers (install ibverbs-providers)" >&2
    exit 1
  }
  mkdir -p "$out/root/etc/libibverbs.d"
  found=
  for d in /etc/libibverbs.d/*.driver; do
    if [ -e "$d" ]; then
      found=1
      cp -L "$d" "$out/root/etc/libibverbs.d/"
    fi
  done
  [ -n "$found" ] || {
    echo "bundle.sh: no /etc/libibverbs.d/*.driver files (install ibverbs-providers)" >&2
    exit 1
  }
fi

cat >"$out/root/etc/passwd" <<'PASSWD'
root:x:0:0:root:/root:/sbin/nologin
rmem:x:65532:65532:rmem:/var/lib/rmem:/sbin/nologin
PASSWD
cat >"$out/root/etc/group" <<'GROUP'
root:x:0:
rmem:x:65532:
GROUP
