#!/usr/bin/env bash
# Makes the image the Containerfile's build stage runs in, without a registry:
# a Debian root filesystem from debootstrap (with gcc, CA certificates,
# protoc for the etcd client, and what the `rdma` features need to build: rdma-core's -dev packages, which
# bring the verbs providers, libclang for bindgen and pkg-config) plus this
# machine's Rust toolchain (cargo, rustc and the standard library, nothing
# else), imported into Docker as one layer. The Containerfile's build stage
# then installs nothing.
#
#   deploy/container/builder-image.sh            # prints the image's name
#
# Operators with a registry do not need it: pass their usual Rust image as
# the BUILDER build argument instead (e.g. --build-arg BUILDER=rust:1-bookworm).
#
# The root filesystem is cached outside the repository, keyed by suite and
# package list, under $RMEM_KIT_CACHE (default /var/cache/rmem-kit); the image
# is named after the toolchain and the cache key, so an existing image is
# reused and a new toolchain or package list makes a new one.
#
# The image trusts the certificate authorities this machine trusts (its
# /etc/ssl/certs/ca-certificates.crt), so cargo reaches crates.io through the
# same TLS-inspecting proxy, if any, as the host does.
#
# Needs root (debootstrap), debootstrap, docker and a rustup toolchain.
set -euo pipefail

CACHE=${RMEM_KIT_CACHE:-/var/cache/rmem-kit}
SUITE=${RMEM_BUILDER_SUITE:-bookworm}
MIRROR=${RMEM_KIT_MIRROR:-http://deb.debian.org/debian}
# libclang-dev: bindgen (run by rdma-sys) loads libclang and its builtin
# headers from llvm's directory, where it finds them without LIBCLANG_PATH.
# protobuf-compiler and libprotobuf-dev (its well-known types): etcd-client's
# build (the coordinator's etcd backend) runs protoc.
PACKAGES="gcc,libc6-dev,ca-certificates,pkg-config,libibverbs-dev,librdmacm-dev,libclang-dev,protobuf-compiler,libprotobuf-dev,etcd-server,etcd-client"

say() { printf 'builder-image: %s\n' "$*" >&2; }
die() { printf 'builder-image: error: %s\n' "$*" >&2; exit 1; }

[ "$(id -u)" -eq 0 ] || die "needs root (debootstrap)"
command -v docker >/dev/null || die "docker not found"
command -v rustc >/dev/null || die "rustc not found (a rustup toolchain is copied into the image)"

sysroot=$(rustc --print sysroot)
rustver=$(rustc --version | awk '{print $2}')
key=$(printf '%s' "$SUITE $PACKAGES" | sha256sum | cut -c1-12)
cabundle=/etc/ssl/certs/ca-certificates.crt
[ -r "$cabundle" ] || die "$cabundle not found (apt-get install ca-certificates)"
cakey=$(sha256sum <"$cabundle" | cut -c1-8)
image="rmem-builder:rust-$rustver-$SUITE-$key-ca$cakey"

if docker image inspect "$image" >/dev/null 2>&1; then
  echo "$image"
  exit 0
fi

rootfs="$CACHE/rootfs-$SUITE-$key"
if [ ! -e "$rootfs/.rmem-done" ]; then
  command -v debootstrap >/dev/null || die "debootstrap not found (apt-get install debootstrap)"
  say "creating a $SUITE root filesystem in $rootfs (about a minute; cached afterwards)"
  rm -rf "$rootfs"
  mkdir -p "$CACHE"
  debootstrap --variant=minbase --include="$PACKAGES" "$SUITE" "$rootfs" "$MIRROR" \
    >"$CACHE/debootstrap-$SUITE.log" 2>&1 ||
    die "debootstrap failed; see $CACHE/debootstrap-$SUITE.log"
  chroot "$rootfs" apt-get clean
  rm -rf "$rootfs"/var/lib/apt/lists/*
  touch "$rootfs/.rmem-done"
fi

say "importing $image (root filesystem + Rust $rustver from $sysroot)"
ls "$sysroot"/lib/rustlib/x86_64-unknown-linux-gnu/lib >/dev/null 2>&1 ||
  die "no x86_64-unknown-linux-gnu standard library under $sysroot"
tarball=$(mktemp "$CACHE/builder-XXXXXX.tar")
trap 'rm -f "$tarball"' EXIT
tar -C "$rootfs" --exclude=./.rmem-done --exclude=./etc/ssl/certs/ca-certificates.crt \
  -cf "$tarball" .
tar -C / -rf "$tarball" "${cabundle#/}"
# The toolchain goes to /usr/local/rust: cargo, rustc and the standard
# library, not the docs, sources or other tools.
(cd "$sysroot" && tar --transform 's,^,usr/local/rust/,' -rf "$tarball" \
  bin/cargo bin/rustc lib/*.so* lib/rustlib/x86_64-unknown-linux-gnu)
docker import \
  --change 'ENV PATH=/usr/local/rust/bin:/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin' \
  --change 'ENV CARGO_HOME=/usr/local/cargo' \
  --change 'WORKDIR /src' \
  "$tarball" "$image" >/dev/null
echo "$image"
