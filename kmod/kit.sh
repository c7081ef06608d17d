#!/usr/bin/env bash
# rmem's kernel build kit: everything needed to build rmem.ko for Debian's
# stock sid kernel (Rust, DEVICE_PRIVATE) and to boot that kernel under QEMU.
#
#   kmod/kit.sh [all|chroot|kernel|tree|module|env] [--refresh]
#
#   chroot  debootstrap a Debian sid chroot with the compilers the kernel was
#           built with (rustc, bindgen, gcc-16, ...).
#   kernel  download the kernel's packages (vmlinuz, modules, headers, source)
#           and unpack them; the kernel release is read from the archive.
#   tree    unpack the source with Debian's .config and prepare it for
#           out-of-tree Rust modules (make prepare modules_prepare), because
#           Debian's headers package lacks the Rust build outputs.
#   module  build kmod/ against that tree: target/kmod/<release>/rmem.ko,
#           and the kernel's own mm selftests the VM suite runs attached
#           (ksm_functional_tests, cow, mlock2-tests; static, from the same
#           source): target/kmod/<release>/selftests/
#   env     print KREL, VMLINUZ, MODULES_DIR, KDIR, KO, SELFTESTS as shell
#           assignments
#   all     every step above (the default); finished steps are skipped.
#
# Everything heavy lives in a cache outside the repo, keyed by versions, so a
# second run reuses it and a fresh machine rebuilds it on its own:
#   $RMEM_KIT_CACHE (default /var/cache/rmem-kit)
#     chroot-<suite>-<package-list hash>/         the build chroot
#     chroot-.../build/linux-<release>/            the prepared tree (in the chroot)
#     kernel-<release>/                            vmlinuz, modules, headers
# --refresh throws the chroot away first (use it when the archive moved on and
# the chroot's rustc no longer matches the kernel's).
#
# Needs root (debootstrap, chroot) and debootstrap on the host.
set -euo pipefail

REPO=$(cd "$(dirname "$0")/.." && pwd)
CACHE=${RMEM_KIT_CACHE:-/var/cache/rmem-kit}
SUITE=${RMEM_KIT_SUITE:-sid}
MIRROR=${RMEM_KIT_MIRROR:-http://deb.debian.org/debian}
PACKAGES="rustc rust-src bindgen libclang-dev gcc-16 gcc make flex bison bc
libelf-dev libssl-dev python3 cpio kmod xz-utils dwarves ca-certificates"
APT_OPTS=(-o Acquire::Check-Valid-Until=false -o Acquire::Languages=none -o APT::Sandbox::User=root)

say() { printf 'kit: %s\n' "$*" >&2; }
die() { printf 'kit: error: %s\n' "$*" >&2; exit 1; }

[ "$(id -u)" -eq 0 ] || die "needs root (debootstrap and chroot)"

pkghash=$(printf '%s' "$SUITE $PACKAGES" | sha256sum | cut -c1-12)
CHROOT="$CACHE/chroot-$SUITE-$pkghash"

# Runs a command in the chroot, with /proc and /dev mounted in a private
# mount namespace: the mounts vanish with the command, so nothing is left
# mounted and concurrent runs (two checkouts, CI) do not unmount each other's.
in_chroot() {
  unshare --mount --propagation private -- /bin/sh -c '
    root=$1; shift
    mount -t proc proc "$root/proc" && mount --bind /dev "$root/dev" &&
      exec chroot "$root" /usr/bin/env -i PATH=/usr/sbin:/usr/bin:/sbin:/bin HOME=/root LANG=C.UTF-8 "$@"
  ' in_chroot "$CHROOT" "$@"
}

step_chroot() {
  if [ -e "$CHROOT/.rmem-kit-done" ]; then return; fi
  command -v debootstrap >/dev/null || die "debootstrap not found (apt-get install debootstrap)"
  say "creating the $SUITE build chroot in $CHROOT (a few minutes; cached afterwards)"
  rm -rf "$CHROOT"
  mkdir -p "$CACHE"
  debootstrap --variant=minbase "$SUITE" "$CHROOT" "$MIRROR" >"$CACHE/debootstrap.log" 2>&1 ||
    die "debootstrap failed; see $CACHE/debootstrap.log"
  echo "deb $MIRROR $SUITE main" >"$CHROOT/etc/apt/sources.list"
  in_chroot apt-get "${APT_OPTS[@]}" -qq update
  # shellcheck disable=SC2086
  DEBIAN_FRONTEND=noninteractive in_chroot apt-get "${APT_OPTS[@]}" -y -qq \
    --no-install-recommends install $PACKAGES >"$CACHE/chroot-install.log" 2>&1 ||
    die "installing the compilers failed; see $CACHE/chroot-install.log"
  in_chroot apt-get clean
  touch "$CHROOT/.rmem-kit-done"
}

# The kernel release the archive's linux-headers-amd64 points at, e.g. 7.2.13+deb14-amd64.
kernel_release() {
  if [ -s "$CHROOT/.rmem-kit-krel" ]; then cat "$CHROOT/.rmem-kit-krel"; return; fi
  local dep
  dep=$(in_chroot apt-cache depends linux-headers-amd64 | sed -n 's/.*Depends: linux-headers-\(.*-amd64\)$/\1/p' | head -1)
  [ -n "$dep" ] || die "cannot tell the kernel release from linux-headers-amd64"
  echo "$dep" >"$CHROOT/.rmem-kit-krel"
  echo "$dep"
}

step_kernel() {
  local krel kdir
  krel=$(kernel_release)
  kdir="$CACHE/kernel-$krel"
  if [ -e "$kdir/.done" ]; then return; fi
  say "downloading kernel $krel (image, modules, headers, source)"
  rm -rf "$kdir"
  mkdir -p "$kdir/debs" "$kdir/root"
  local srcver=${krel%%.*}.$(echo "$krel" | cut -d. -f2)
  local image
  # Newer Debian kernels ship the vmlinuz in linux-binary-*, older in linux-image-*.
  for p in "linux-binary-$krel" "linux-image-$krel" "linux-image-$krel-unsigned"; do
    if in_chroot apt-cache show "$p" >/dev/null 2>&1; then image=$p; break; fi
  done
  [ -n "${image:-}" ] || die "no image package for $krel"
  local pkgs=("$image" "linux-headers-$krel" "linux-source-$srcver")
  if in_chroot apt-cache show "linux-modules-$krel" >/dev/null 2>&1; then pkgs+=("linux-modules-$krel"); fi
  # linux-headers-<release> depends on a -common headers package holding most of the tree.
  local common
  common=$(in_chroot apt-cache depends "linux-headers-$krel" | sed -n 's/.*Depends: \(linux-headers-.*-common\)$/\1/p' | head -1)
  [ -n "$common" ] && pkgs+=("$common")
  mkdir -p "$CHROOT/build/debs"
  rm -f "$CHROOT"/build/debs/*.deb
  in_chroot sh -c "cd /build/debs && apt-get -o Acquire::Check-Valid-Until=false -o APT::Sandbox::User=root -qq download ${pkgs[*]}" ||
    die "downloading ${pkgs[*]} failed"
  mv "$CHROOT"/build/debs/*.deb "$kdir/debs/"
  for d in "$kdir"/debs/*.deb; do
    case $(basename "$d") in
      linux-source-*) ;;
      *) dpkg-deb -x "$d" "$kdir/root" ;;
    esac
  done
  local vmlinuz
  # /boot/vmlinuz-<release> in older packages, /usr/lib/modules/<release>/vmlinuz in newer.
  vmlinuz=$(find "$kdir/root" \( -name "vmlinuz-$krel" -o -path "*/modules/$krel/vmlinuz" \) | head -1)
  [ -n "$vmlinuz" ] || die "no vmlinuz-$krel in $image"
  ln -sf "${vmlinuz#"$kdir"/}" "$kdir/vmlinuz"
  touch "$kdir/.done"
}

step_tree() {
  local krel tree kdir cfg
  krel=$(kernel_release)
  kdir="$CACHE/kernel-$krel"
  tree="$CHROOT/build/linux-$krel"
  if [ -e "$tree/.rmem-kit-done" ]; then return; fi
  cfg=$(find "$kdir/root" -path "*linux-headers-$krel/.config" | head -1)
  [ -n "$cfg" ] || die "no .config in linux-headers-$krel"
  # The module must be built by exactly the rustc the kernel was built with.
  local want have
  want=$(sed -n 's/^CONFIG_RUSTC_VERSION_TEXT="\(.*\)"$/\1/p' "$cfg")
  have=$(in_chroot rustc --version)
  [ -n "$want" ] || die "kernel $krel was not built with Rust (no CONFIG_RUSTC_VERSION_TEXT)"
  if [ "$want" != "$have" ]; then
    die "kernel $krel was built by '$want' but the chroot has '$have'; run kmod/kit.sh --refresh (the archive moved on) or pin the packages"
  fi
  for opt in CONFIG_RUST CONFIG_DEVICE_PRIVATE CONFIG_MMU_NOTIFIER; do
    grep -q "^$opt=y" "$cfg" || die "kernel $krel lacks $opt=y"
  done
  say "preparing the kernel tree for Rust modules in $tree (about 2 minutes on 2 cores)"
  rm -rf "$tree"
  mkdir -p "$tree"
  local tarball
  tarball=$(find "$kdir/debs" -name 'linux-source-*.deb' | head -1)
  dpkg-deb --fsys-tarfile "$tarball" | tar -x -C "$kdir" --wildcards '*.tar.xz'
  tar -xf "$(find "$kdir/usr/src" -name 'linux-source-*.tar.xz' | head -1)" -C "$tree" --strip-components=1
  rm -rf "$kdir/usr"
  cp "$cfg" "$tree/.config"
  local symvers
  symvers=$(find "$kdir/root" -path "*linux-headers-$krel/Module.symvers" | head -1)
  in_chroot make -C "/build/linux-$krel" -s $(make_vars "$krel") olddefconfig >/dev/null
  in_chroot make -C "/build/linux-$krel" -s -j"$(nproc)" $(make_vars "$krel") prepare modules_prepare \
    >"$CACHE/prepare-$krel.log" 2>&1 || die "make prepare failed; see $CACHE/prepare-$krel.log"
  cp "$symvers" "$tree/Module.symvers"
  touch "$tree/.rmem-kit-done"
}

make_vars() {
  local gccver
  gccver=$(sed -n 's/^CONFIG_CC_VERSION_TEXT="x86_64-linux-gnu-gcc-\([0-9]*\).*/\1/p' "$CHROOT/build/linux-$1/.config" 2>/dev/null || true)
  gccver=${gccver:-16}
  echo "CROSS_COMPILE=x86_64-linux-gnu- CC=x86_64-linux-gnu-gcc-$gccver HOSTCC=gcc-$gccver KERNELRELEASE=$1"
}

step_module() {
  local krel out build
  krel=$(kernel_release)
  out="$REPO/target/kmod/$krel"
  # A build directory of our own: two checkouts may build at once.
  build="build/rmem-kmod-$$"
  say "building rmem.ko for $krel"
  rm -rf "${CHROOT:?}/$build"
  mkdir -p "$CHROOT/$build" "$out"
  cp -r "$REPO"/kmod/. "$CHROOT/$build/"
  if ! in_chroot make -C "/$build" KDIR="/build/linux-$krel" $(make_vars "$krel") >"$out/build.log" 2>&1; then
    rm -rf "${CHROOT:?}/$build"
    cat "$out/build.log" >&2
    die "building rmem.ko failed"
  fi
  if grep -qE '^warning|: warning:' "$out/build.log"; then
    rm -rf "${CHROOT:?}/$build"
    cat "$out/build.log" >&2
    die "rmem.ko builds with warnings"
  fi
  cp "$CHROOT/$build/rmem.ko" "$out/rmem.ko"
  rm -rf "${CHROOT:?}/$build"
  say "built $out/rmem.ko"
  step_selftests "$krel" "$out/selftests"
}

# The kernel's own mm selftests the VM suite runs on attached processes,
# built static from the kernel's source tree into $2 (skipped when there).
# Their Makefile needs the whole kselftest framework and probes for
# liburing; each test is one file with vm_util.c and hugepage_settings.c,
# and an empty local_config.h turns the liburing parts off.
SELFTESTS="ksm_functional_tests cow mlock2-tests"
step_selftests() {
  local krel=$1 out=$2 t tree="/build/linux-$1" tmp="build/rmem-selftests-$$"
  local missing=0
  for t in $SELFTESTS; do [ -x "$out/$t" ] || missing=1; done
  [ "$missing" = 1 ] || return 0
  say "building the kernel's mm selftests ($SELFTESTS)"
  mkdir -p "$out" "$CHROOT/$tmp"
  : >"$CHROOT/$tmp/local_config.h"
  for t in $SELFTESTS; do
    if ! in_chroot sh -c "cd $tree && gcc -static -O2 -I /$tmp -I tools/testing/selftests \
        -I tools/include/uapi -I tools/include -o /$tmp/$t \
        tools/testing/selftests/mm/$t.c tools/testing/selftests/mm/vm_util.c \
        tools/testing/selftests/mm/hugepage_settings.c" >"$out/build-$t.log" 2>&1; then
      rm -rf "${CHROOT:?}/$tmp"
      cat "$out/build-$t.log" >&2
      die "building the selftest $t failed"
    fi
    cp "$CHROOT/$tmp/$t" "$out/$t"
  done
  rm -rf "${CHROOT:?}/$tmp"
}

step_env() {
  local krel
  krel=$(kernel_release)
  echo "KREL=$krel"
  echo "VMLINUZ=$CACHE/kernel-$krel/vmlinuz"
  local mods
  mods=$(find "$CACHE/kernel-$krel/root" -maxdepth 4 -type d -path "*/modules/$krel" | head -1)
  echo "MODULES_DIR=$mods"
  echo "KDIR=$CHROOT/build/linux-$krel"
  echo "KO=$REPO/target/kmod/$krel/rmem.ko"
  echo "SELFTESTS=$REPO/target/kmod/$krel/selftests"
}

what=all
for a in "$@"; do
  case $a in
    --refresh) rm -rf "$CHROOT" ;;
    all | chroot | kernel | tree | module | env) what=$a ;;
    -h | --help) sed -n '2,/^set -euo/p' "$0" | sed '$d; s/^# \{0,1\}//'; exit 0 ;;
    *) die "unknown argument '$a' (see --help)" ;;
  esac
done

case $what in
  chroot) step_chroot ;;
  kernel) step_chroot; step_kernel ;;
  tree) step_chroot; step_kernel; step_tree ;;
  module) step_chroot; step_kernel; step_tree; step_module ;;
  env) step_env ;;
  all) step_chroot; step_kernel; step_tree; step_module; step_env ;;
esac
