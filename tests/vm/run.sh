#!/usr/bin/env bash
# rmem's VM test suite: boots Debian's stock kernel (with Rust and
# device-private memory) under QEMU, loads rmem.ko into it and runs the
# kernel-module suite (rmem-vmtest) inside the guest against a real
# rmem-server on the guest's loopback.
#
#   bash tests/vm/run.sh [kmod]
#
# Builds what it needs: the kernel kit (kmod/kit.sh, cached outside the repo),
# rmem.ko, the release binaries, and an initramfs with busybox. Prints
# "N passed, M failed" and exits non-zero on any failure. KVM is used when it
# works; otherwise TCG (about 3 s to boot, everything an order slower).
# RMEM_VM_KEEP=1 keeps target/vm/ for a look at the guest's console log.
set -euo pipefail
cd "$(dirname "$0")/../.."
REPO=$PWD
suite=${1:-kmod}
case $suite in
  kmod) ;;
  *) echo "tests/vm/run.sh: unknown suite '$suite' (known: kmod)" >&2; exit 2 ;;
esac

say() { printf 'vm: %s\n' "$*" >&2; }
die() { printf 'vm: error: %s\n' "$*" >&2; exit 1; }

[ "$(id -u)" -eq 0 ] || die "needs root (the kernel kit uses debootstrap and chroot)"
need=()
command -v qemu-system-x86_64 >/dev/null || need+=(qemu-system-x86)
command -v debootstrap >/dev/null || need+=(debootstrap)
[ -x /bin/busybox ] || need+=(busybox-static)
command -v cpio >/dev/null || need+=(cpio)
if [ ${#need[@]} -gt 0 ]; then
  say "installing ${need[*]}"
  apt-get update -qq >/dev/null
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${need[@]}" >/dev/null
fi

bash kmod/kit.sh module
eval "$(bash kmod/kit.sh env)"
[ -f "$KO" ] || die "no $KO"

say "building the guest's binaries (release)"
cargo build --release --quiet -p rmem-server -p rmem-agent -p rmemctl -p rmem-tests --bins

out=$REPO/target/vm
rm -rf "$out"
mkdir -p "$out/root"/{bin,sbin,dev,proc,sys,tmp,lib,lib64,etc,rmem}
root=$out/root
cp /bin/busybox "$root/bin/busybox"
for b in rmem-server rmem-agent rmemctl rmem-vmtest; do
  cp "target/release/$b" "$root/bin/$b"
done
cp "$KO" "$root/rmem/rmem.ko"
# The binaries link glibc dynamically: bring the libraries they load.
for lib in $(ldd target/release/rmem-server target/release/rmem-agent target/release/rmemctl target/release/rmem-vmtest |
  awk '/=>/ { print $3 } /ld-linux/ { print $1 }' | sort -u); do
  mkdir -p "$root$(dirname "$lib")"
  cp -L "$lib" "$root$lib"
done
cat >"$root/init" <<'EOF'
#!/bin/busybox sh
/bin/busybox --install -s /bin
mount -t proc proc /proc
mount -t sysfs sys /sys
mount -t devtmpfs dev /dev
ip link set lo up
echo "guest: $(uname -r), $(nproc) cpus, $(grep MemTotal /proc/meminfo)"
cd /tmp
/bin/rmem-vmtest --module /rmem/rmem.ko
echo "RMEM-VM-EXIT $?"
poweroff -f
EOF
chmod +x "$root/init"
(cd "$root" && find . | cpio -o -H newc --quiet | gzip -1) >"$out/initrd.gz"

accel=(-accel tcg -cpu max)
if [ -w /dev/kvm ] && [ "${RMEM_VM_KVM:-try}" != no ]; then
  # Nested KVM is known to die in the decompressor on this machine kind: try
  # a short boot first and fall back to TCG.
  if timeout 20 qemu-system-x86_64 -accel kvm -cpu host -m 256 -nographic -no-reboot \
    -kernel "$VMLINUZ" -append "console=ttyS0 panic=-1 rdinit=/bin/true" 2>&1 |
    grep -q "Run /bin/true"; then
    accel=(-accel kvm -cpu host)
  fi
fi
say "booting $KREL (${accel[1]}), suite $suite"
set +e
timeout "${RMEM_VM_TIMEOUT:-900}" qemu-system-x86_64 "${accel[@]}" -smp 2 -m 2048 \
  -nographic -no-reboot -kernel "$VMLINUZ" -initrd "$out/initrd.gz" \
  -append "console=ttyS0 panic=-1 quiet loglevel=4 rdinit=/init" >"$out/console.log" 2>&1
qrc=$?
set -e
tr -d '\r' <"$out/console.log" | grep -v '^\s*$' | sed 's/^/  guest| /' >&2 || true
code=$(tr -d '\r' <"$out/console.log" | sed -n 's/^RMEM-VM-EXIT \([0-9]*\).*/\1/p' | tail -1)
summary=$(tr -d '\r' <"$out/console.log" | grep -E '^[0-9]+ passed, [0-9]+ failed' | tail -1)
if [ -z "$code" ]; then
  echo "0 passed, 1 failed (the guest did not finish: qemu exit $qrc; see target/vm/console.log)"
  exit 1
fi
echo "${summary:-0 passed, 1 failed (no summary line)}"
[ "$code" -eq 0 ]
