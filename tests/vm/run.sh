#!/usr/bin/env bash
# rmem's VM test suites: boot Debian's stock kernel (with Rust and
# device-private memory) under QEMU and run a suite inside.
#
#   bash tests/vm/run.sh [kmod|rdma]
#
#   kmod  one guest: loads rmem.ko and runs the kernel-module suite
#         (rmem-vmtest) against a real rmem-server on the guest's loopback.
#   rdma  three guests on a private Ethernet segment (a multicast socket on
#         the host's loopback: nothing leaves this machine), each with a
#         soft-RoCE device (rxe0); guest 3 runs the driver
#         (rmem-vmtest-rdma --role driver), guests 1 to 3 its command daemons.
#         Guest 1 is 10.0.0.1 (coordinator, memory server A), guest 2 is
#         10.0.0.2 (memory server B), guest 3 is 10.0.0.3 (agent, driver).
#
# Builds what it needs: the kernel kit (kmod/kit.sh, cached outside the repo),
# rmem.ko (kmod only), the release binaries, and an initramfs with busybox.
# Prints "N passed, M failed" and exits non-zero on any failure. KVM is used
# when it works; otherwise TCG (about 3 s to boot, everything an order slower).
#
# RMEM_VM_KEEP=1 keeps target/vm/ (target/vm-rdma/) for a look at the
# guests' console logs. Also:
#   RMEM_VM_TIMEOUT=S   how long a guest may run (default 900 s)
#   RMEM_VM_BOOT_TIMEOUT=S  how long the kmod guest may take to reach /init
#                       before it is booted again, once (default 240 s)
#   RMEM_VM_KVM=no      do not try KVM
#   RMEM_VM_MEM=MiB     memory of each rdma guest (default 768)
#   RMEM_VM_ONLY=W1,W2  kmod: run only the cases whose name holds one of the words
set -euo pipefail
cd "$(dirname "$0")/../.."
REPO=$PWD
suite=${1:-kmod}
case $suite in
  kmod | rdma) ;;
  *) echo "tests/vm/run.sh: unknown suite '$suite' (known: kmod, rdma)" >&2; exit 2 ;;
esac

say() { printf 'vm: %s\n' "$*" >&2; }
die() { printf 'vm: error: %s\n' "$*" >&2; exit 1; }

# --- Shared steps ------------------------------------------------------------

# Installs the host packages the suite needs and lacks.
install_host_packages() {
  local need=()
  command -v qemu-system-x86_64 >/dev/null || need+=(qemu-system-x86)
  command -v debootstrap >/dev/null || need+=(debootstrap)
  [ -x /bin/busybox ] || need+=(busybox-static)
  command -v cpio >/dev/null || need+=(cpio)
  # Both guests load modules of the stock kernel (xz) and make networks (ip).
  command -v xz >/dev/null || need+=(xz-utils)
  [ -x /usr/sbin/ip ] || need+=(iproute2)
  if [ "$suite" = rdma ]; then
    command -v rdma >/dev/null || need+=(iproute2)
    [ -e /usr/lib/x86_64-linux-gnu/libibverbs.so.1 ] || need+=(rdma-core)
    [ -e /etc/libibverbs.d/rxe.driver ] || need+=(ibverbs-providers)
    command -v ibv_devinfo >/dev/null || need+=(ibverbs-utils)
    command -v ib_read_lat >/dev/null || need+=(perftest)
    # Building with the `rdma` feature (as tests/run.sh installs them).
    [ -e /usr/include/infiniband/verbs.h ] || need+=(libibverbs-dev)
    [ -e /usr/include/rdma/rdma_cma.h ] || need+=(librdmacm-dev)
    ls /usr/lib/llvm-*/lib/libclang.so* >/dev/null 2>&1 || need+=(libclang-dev)
    command -v pkg-config >/dev/null || need+=(pkg-config)
  fi
  if [ ${#need[@]} -gt 0 ]; then
    say "installing ${need[*]}"
    apt-get update -qq >/dev/null
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${need[@]}" >/dev/null
  fi
}

# Starts an initramfs tree at $1: busybox and the directories /init needs.
new_root() {
  rm -rf "$1"
  mkdir -p "$1"/{bin,sbin,dev,proc,sys,tmp,lib,lib64,etc,rmem}
  cp /bin/busybox "$1/bin/busybox"
}

# Copies into root $1 the shared libraries the programs $2... load (ldd),
# each at its own path.
add_libs() {
  local root=$1 lib
  shift
  for lib in $(ldd "$@" | awk '/=>/ { print $3 } /ld-linux/ { print $1 }' | sort -u); do
    mkdir -p "$root$(dirname "$lib")"
    cp -L "$lib" "$root$lib"
  done
}

# Decompresses module $1 (a name) and, before it, every module it depends
# on, from $MODULES_DIR into $2/rmem/modules, appending each name to
# $2/rmem/modules/order once. A dependency with no module file is built into
# the kernel; a module asked for by name must exist.
add_module() {
  local name=$1 root=$2 file deps dep
  grep -qx "$name" "$root/rmem/modules/order" 2>/dev/null && return
  file=$(find "$MODULES_DIR/kernel" \( -name "$name.ko" -o -name "$name.ko.*" \) | head -1)
  if [ -z "$file" ]; then
    file=$(find "$MODULES_DIR/kernel" \( -name "${name//_/-}.ko" -o -name "${name//_/-}.ko.*" \) | head -1)
  fi
  [ -n "$file" ] || return 1
  case $file in
    *.ko) cp "$file" "$root/rmem/modules/$name.ko" ;;
    *.ko.xz) xz -dc "$file" >"$root/rmem/modules/$name.ko" ;;
    *.ko.zst) zstd -qdc "$file" >"$root/rmem/modules/$name.ko" ;;
    *.ko.gz) gzip -dc "$file" >"$root/rmem/modules/$name.ko" ;;
    *) die "$file: unknown module compression" ;;
  esac
  deps=$(grep -a -o 'depends=[A-Za-z0-9_,-]*' "$root/rmem/modules/$name.ko" | head -1 | cut -d= -f2 | tr ',' ' ')
  for dep in $deps; do
    add_module "$dep" "$root" || say "module $dep (needed by $name) has no file: taken as built in"
  done
  echo "$name" >>"$root/rmem/modules/order"
}

# Packs root $1 into the gzipped cpio archive $2.
pack_initrd() {
  (cd "$1" && find . | cpio -o -H newc --quiet | gzip -1) >"$2"
}

# Sets accel=(...) to KVM when a guest boots under it, else to TCG.
choose_accel() {
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
}

# Prints console log $1 without carriage returns, the firmware's terminal
# escapes or blank lines, each line prefixed with $2.
show_console() {
  tr -d '\r' <"$1" | sed 's/\x1b\[[0-9;?]*[A-Za-z]//g; s/\x1bc//g' | grep -v '^\s*$' | sed "s/^/$2/" >&2 || true
}

# Prints the suite's summary from console log $1 and returns the driver's
# exit code; $2 says why when the guest did not finish.
console_result() {
  local log=$1 why=$2 code summary
  code=$(tr -d '\r' <"$log" | sed -n 's/^RMEM-VM-EXIT \([0-9]*\).*/\1/p' | tail -1)
  summary=$(tr -d '\r' <"$log" | grep -E '^[0-9]+ passed, [0-9]+ failed' | tail -1 || true)
  if [ -z "$code" ]; then
    echo "0 passed, 1 failed (the guest did not finish: $why; see ${log#"$REPO"/})"
    return 1
  fi
  echo "${summary:-0 passed, 1 failed (no summary line)}"
  [ "$code" -eq 0 ]
}

# --- kmod: one guest, rmem.ko ------------------------------------------------

# The kernel modules the kmod guest loads (besides rmem.ko), for the chaos
# case's network namespaces.
KMOD_NET_MODULES="veth bridge"

suite_kmod() {
  bash kmod/kit.sh module
  eval "$(bash kmod/kit.sh env)"
  [ -f "$KO" ] || die "no $KO"

  say "building the guest's binaries (release)"
  bash tests/build-release.sh

  local out=$REPO/target/vm root b
  root=$out/root
  rm -rf "$out"
  new_root "$root"
  for b in rmem-server rmem-coordinator rmem-agent rmemctl rmem-vmtest; do
    cp "target/release/$b" "$root/bin/$b"
  done
  cp "$KO" "$root/rmem/rmem.ko"
  # The kernel's own mm selftests (static), run on attached processes.
  cp -r "$SELFTESTS" "$root/rmem/selftests"
  rm -f "$root/rmem/selftests/"*.log
  # The binaries link glibc dynamically: bring the libraries they load.
  add_libs "$root" target/release/rmem-server target/release/rmem-coordinator target/release/rmem-agent target/release/rmemctl target/release/rmem-vmtest
  # The chaos case's hosts: network namespaces joined by veth pairs to a
  # bridge, made with iproute2's ip (busybox's has no netns).
  [ -d "$MODULES_DIR/kernel" ] || die "no kernel modules in '$MODULES_DIR' (kmod/kit.sh kernel)"
  mkdir -p "$root/usr/sbin" "$root/run" "$root/var" "$root/rmem/modules"
  ln -s ../run "$root/var/run"
  cp /usr/sbin/ip "$root/usr/sbin/ip"
  add_libs "$root" /usr/sbin/ip
  for m in $KMOD_NET_MODULES; do
    add_module "$m" "$root" || die "no module $m in $MODULES_DIR"
  done
  cat >"$root/init" <<'EOF'
#!/bin/busybox sh
/bin/busybox --install -s /bin
mount -t proc proc /proc
mount -t sysfs sys /sys
mount -t devtmpfs dev /dev
export PATH=/usr/sbin:/usr/bin:/sbin:/bin
for m in $(cat /rmem/modules/order); do
  insmod "/rmem/modules/$m.ko" || echo "guest: insmod $m failed"
done
ip link set lo up
echo "guest: $(uname -r), $(nproc) cpus, $(grep MemTotal /proc/meminfo)"
cd /tmp
/bin/rmem-vmtest --module /rmem/rmem.ko
echo "RMEM-VM-EXIT $?"
poweroff -f
EOF
  chmod +x "$root/init"
  pack_initrd "$root" "$out/initrd.gz"

  choose_accel
  local qrc=0 boot
  for boot in 1 2; do
    say "booting $KREL (${accel[1]}), suite kmod"
    timeout "${RMEM_VM_TIMEOUT:-900}" qemu-system-x86_64 "${accel[@]}" -smp 2 -m 2048 \
      -nographic -no-reboot -kernel "$VMLINUZ" -initrd "$out/initrd.gz" \
      -append "console=ttyS0 panic=-1 quiet loglevel=4 rdinit=/init${RMEM_VM_ONLY:+ rmem.only=$RMEM_VM_ONLY}" </dev/null >"$out/console.log" 2>&1 &
    qemu_pids=($!)
    trap kill_guests EXIT
    if reached_init "$out/console.log" "${qemu_pids[0]}" || [ "$boot" = 2 ]; then
      wait "${qemu_pids[0]}" && qrc=0 || qrc=$?
      trap - EXIT
      break
    fi
    # Seen about once in ten TCG boots: the kernel hangs or panics before
    # /init (TCG racing the kernel's code patching), long before rmem.ko is
    # loaded. Boot again rather than fail the suite on it.
    kill_guests
    trap - EXIT
    show_console "$out/console.log" '  guest (first boot)| '
    say "the guest did not reach /init within ${RMEM_VM_BOOT_TIMEOUT:-240} s; booting it again"
  done
  show_console "$out/console.log" '  guest| '
  console_result "$out/console.log" "qemu exit $qrc"
}

# Waits until the guest whose console log is $1 (qemu pid $2) runs /init
# (its first line, "guest: RELEASE, N cpus, MemTotal ..."); false if it does not within
# RMEM_VM_BOOT_TIMEOUT seconds (240), or if qemu exited before.
reached_init() {
  local log=$1 pid=$2 waited=0
  while [ "$waited" -lt "${RMEM_VM_BOOT_TIMEOUT:-240}" ]; do
    # Not anchored: with `quiet` the line follows the firmware's terminal
    # escapes on the same console line.
    [ -f "$log" ] && grep -q 'guest: .* cpus, MemTotal' <(tr -d '\r' <"$log") && return 0
    kill -0 "$pid" 2>/dev/null || return 1
    sleep 1
    waited=$((waited + 1))
  done
  return 1
}

# --- rdma: three guests, soft-RoCE -------------------------------------------

# The kernel modules the rdma guests load; their dependencies are read from
# the modules themselves and loaded first.
RDMA_MODULES="virtio_net ib_core ib_uverbs udp_tunnel ip6_udp_tunnel rdma_rxe rdma_ucm"
# Userspace from the host that goes into the rdma guests.
RDMA_TOOLS="/usr/bin/rdma /usr/bin/ib_read_lat /usr/bin/ib_write_lat /usr/bin/ibv_devices /usr/bin/ibv_devinfo"
RXE_PROVIDER=/usr/lib/x86_64-linux-gnu/libibverbs/librxe-rdmav34.so
RXE_DRIVER=/etc/libibverbs.d/rxe.driver

suite_rdma() {
  # The guests need the stock kernel and its modules, not rmem.ko.
  bash kmod/kit.sh kernel
  eval "$(bash kmod/kit.sh env)"
  [ -d "$MODULES_DIR/kernel" ] || die "no kernel modules in '$MODULES_DIR' (kmod/kit.sh kernel)"

  say "building the guest's binaries (release)"
  bash tests/build-release.sh

  local out=$REPO/target/vm-rdma root b m
  root=$out/root
  rm -rf "$out"
  new_root "$root"
  mkdir -p "$root/rmem/modules" "$root/usr/bin" "$root/etc/libibverbs.d" "$(dirname "$root$RXE_PROVIDER")"
  local bins=()
  for b in rmem-server rmem-coordinator rmem-agent rmemctl rmem-vmtest-rdma; do
    # Without debug info: three guests hold the initramfs in RAM.
    strip --strip-debug -o "$root/bin/$b" "target/release/$b"
    bins+=("target/release/$b")
  done
  for b in $RDMA_TOOLS; do
    [ -x "$b" ] || die "no $b on the host"
    cp "$b" "$root$b"
  done
  [ -f "$RXE_PROVIDER" ] || die "no $RXE_PROVIDER (ibverbs-providers)"
  cp "$RXE_PROVIDER" "$root$RXE_PROVIDER"
  cp "$RXE_DRIVER" "$root$RXE_DRIVER"
  add_libs "$root" "${bins[@]}" $RDMA_TOOLS "$RXE_PROVIDER"
  for m in $RDMA_MODULES; do
    add_module "$m" "$root" || die "no module $m in $MODULES_DIR"
  done
  say "guest modules: $(tr '\n' ' ' <"$root/rmem/modules/order")"
  cat >"$root/init" <<'EOF'
#!/bin/busybox sh
/bin/busybox --install -s /bin
export PATH=/usr/sbin:/usr/bin:/sbin:/bin
mount -t proc proc /proc
mount -t sysfs sys /sys
mount -t devtmpfs dev /dev
node=$(sed -n 's/.*rmem\.node=\([0-9]*\).*/\1/p' /proc/cmdline)
fail() {
  echo "RMEM-NODE-FAIL $node: $*"
  [ "$node" = 3 ] && echo "RMEM-VM-EXIT 1"
  poweroff -f
}
[ -n "$node" ] || fail "no rmem.node= on the kernel command line"
for m in $(cat /rmem/modules/order); do
  insmod "/rmem/modules/$m.ko" || fail "insmod $m"
done
ip link set lo up
ip addr add "10.0.0.$node/24" dev eth0 || fail "no eth0"
ip link set eth0 up
rdma link add rxe0 type rxe netdev eth0 || fail "rdma link add rxe0"
echo "RMEM-NODE-READY $node at $(cut -d' ' -f1 /proc/uptime) s: $(uname -r), $(nproc) cpu, $(grep MemTotal /proc/meminfo)"
cd /tmp
if [ "$node" = 3 ]; then
  /bin/rmem-vmtest-rdma --role node --listen "10.0.0.$node:7999" 2>/tmp/node.log &
  /bin/rmem-vmtest-rdma --role driver
  echo "RMEM-VM-EXIT $?"
else
  /bin/rmem-vmtest-rdma --role node --listen "10.0.0.$node:7999"
  echo "RMEM-NODE-EXIT $node $?"
fi
poweroff -f
EOF
  chmod +x "$root/init"
  pack_initrd "$root" "$out/initrd.gz"
  say "initramfs: $(du -h "$out/initrd.gz" | cut -f1) packed, $(du -sh "$root" | cut -f1) unpacked"

  choose_accel
  # One multicast group and port per run, on loopback: concurrent runs do
  # not see each other's frames, and nothing leaves the host.
  local group port
  group=239.255.$((RANDOM % 256)).$((RANDOM % 254 + 1))
  port=$((20000 + RANDOM % 40000))
  say "booting 3 guests of $KREL (${accel[1]}), segment $group:$port on 127.0.0.1, suite rdma"
  local started n
  started=$EPOCHREALTIME
  qemu_pids=()
  trap kill_guests EXIT
  trap 'exit 130' INT TERM
  for n in 1 2 3; do
    timeout "${RMEM_VM_TIMEOUT:-900}" qemu-system-x86_64 "${accel[@]}" -smp 1 -m "${RMEM_VM_MEM:-768}" \
      -nographic -no-reboot -kernel "$VMLINUZ" -initrd "$out/initrd.gz" \
      -netdev "socket,id=n0,mcast=$group:$port,localaddr=127.0.0.1" \
      -device "virtio-net-pci,netdev=n0,mac=52:54:00:0a:00:0$n" \
      -append "console=ttyS0 panic=-1 quiet loglevel=4 rdinit=/init rmem.node=$n" \
      </dev/null >"$out/console-g$n.log" 2>&1 &
    qemu_pids[n]=$!
  done

  # Report each guest's boot-to-ready time while guest 3 runs the suite;
  # stop early when a guest could not set itself up.
  local ready=() why="" qrc=0
  while kill -0 "${qemu_pids[3]}" 2>/dev/null; do
    for n in 1 2 3; do
      if [ -z "${ready[n]:-}" ] && grep -q "RMEM-NODE-READY $n" "$out/console-g$n.log"; then
        ready[n]=1
        say "guest $n ready after $(since "$started") s"
      fi
      if grep -q "RMEM-NODE-FAIL" "$out/console-g$n.log"; then
        why="guest $n failed: $(tr -d '\r' <"$out/console-g$n.log" | sed -n 's/^RMEM-NODE-FAIL [0-9]*: //p' | head -1)"
      fi
    done
    [ -z "$why" ] || break
    sleep 1
  done
  if [ -z "$why" ]; then
    wait "${qemu_pids[3]}" || qrc=$?
    why="qemu exit $qrc"
    # Guests 1 and 2 power off when the driver tells them; give them a moment.
    for n in 1 2; do
      for _ in $(seq 30); do
        kill -0 "${qemu_pids[n]}" 2>/dev/null || break
        sleep 1
      done
    done
  fi
  kill_guests
  trap - EXIT
  say "guests ran for $(since "$started") s"
  for n in 1 2 3; do
    show_console "$out/console-g$n.log" "  g$n| "
  done
  console_result "$out/console-g3.log" "$why"
}

# Seconds since $1 (an $EPOCHREALTIME), to a tenth.
since() {
  awk -v a="$1" -v b="$EPOCHREALTIME" 'BEGIN { printf "%.1f", b - a }'
}

# Kills every guest still running (also on an error or interrupt).
kill_guests() {
  local pid
  for pid in "${qemu_pids[@]}"; do
    kill "$pid" 2>/dev/null || true
  done
  for pid in "${qemu_pids[@]}"; do
    wait "$pid" 2>/dev/null || true
  done
}

[ "$(id -u)" -eq 0 ] || die "needs root (the kernel kit uses debootstrap and chroot)"
install_host_packages
"suite_$suite"
