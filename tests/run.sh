#!/usr/bin/env bash
# The whole rmem test suite: formatting, lints, every unit and integration
# test, the multi-host suite (network namespaces), the kernel-module suite in
# a QEMU guest, the container suite (images and a compose cluster), the
# Kubernetes manifests' offline validation, and a quick benchmark run that
# keeps the benchmark harness working.
# Installs what it needs on a fresh Debian machine (root) before it starts.
# The quick benchmark turns swap on (zram, a loop-device file) for its
# kernel baselines and off again.
#
#   bash tests/run.sh
set -euo pipefail
cd "$(dirname "$0")/.."

# Each step prints how long the run has taken so far, so a slow stage shows
# in the log (the whole run has a time budget).
t_run=$(date +%s)
step() { printf '\n==> [%dm%02ds] %s\n' $((($(date +%s) - t_run) / 60)) $((($(date +%s) - t_run) % 60)) "$*" >&2; }

if ! command -v cargo >/dev/null; then
  echo "tests/run.sh: cargo not found; install a Rust toolchain (rustup) first" >&2
  exit 1
fi

# System packages: iproute2 for the multi-host suite (network namespaces),
# systemd for systemd-analyze (the units in deploy/systemd are verified).
need=()
command -v ip >/dev/null || need+=(iproute2)
command -v systemd-analyze >/dev/null || need+=(systemd)
# fonts-dejavu-core: the text of rmem-bench's plots.
[ -e /usr/share/fonts/truetype/dejavu/DejaVuSans.ttf ] || need+=(fonts-dejavu-core)
# The `rdma` feature: rdma-core's headers and libraries (rdma-sys links
# libibverbs and librdmacm), libclang for its bindgen, pkg-config to find them.
[ -e /usr/include/infiniband/verbs.h ] || need+=(libibverbs-dev)
[ -e /usr/include/rdma/rdma_cma.h ] || need+=(librdmacm-dev)
ls /usr/lib/llvm-*/lib/libclang.so* >/dev/null 2>&1 || need+=(libclang-dev)
command -v pkg-config >/dev/null || need+=(pkg-config)
# protoc: etcd-client's build compiles etcd's API (the coordinator's etcd
# backend); etcd and etcdctl: the coordinator replicas' tests run a real etcd.
command -v protoc >/dev/null || need+=(protobuf-compiler)
[ -e /usr/include/google/protobuf/descriptor.proto ] || need+=(libprotobuf-dev)
command -v etcd >/dev/null || need+=(etcd-server)
command -v etcdctl >/dev/null || need+=(etcd-client)
# afl++: the fuzz targets' smoke run (fuzz/run.sh).
command -v afl-fuzz >/dev/null || need+=(afl++)
# promtool (Debian's prometheus package): checks the daemons' /metrics and
# the alerting rules in deploy/monitoring.
command -v promtool >/dev/null || need+=(prometheus)
if [ ${#need[@]} -gt 0 ]; then
  if [ "$(id -u)" -eq 0 ] && command -v apt-get >/dev/null; then
    step "installing ${need[*]}"
    apt-get update -qq >/dev/null
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${need[@]}" >/dev/null
  else
    echo "tests/run.sh: install ${need[*]} (as root) first" >&2
    exit 1
  fi
fi

# Room for the run: the target directory, guest images, container images
# and the fuzzing build take about 30 GiB on a fresh machine; a disk that
# fills mid-run fails in some linker or writer far from the cause.
free_gib=$(( $(df -Pk . | awk 'NR==2 {print $4}') / 1024 / 1024 ))
step "disk: ${free_gib} GiB free where the run builds"
if [ "$free_gib" -lt 30 ]; then
  echo "tests/run.sh: only ${free_gib} GiB free here; the suite needs about 30 GiB (free some: old target directories, docker images)" >&2
  exit 1
fi

step "cargo fmt --check"
cargo fmt --all -- --check

step "cargo clippy --all-targets -- -D warnings (default features, then with rdma)"
cargo clippy --workspace --all-targets --quiet -- -D warnings
cargo clippy --workspace --all-targets --all-features --quiet -- -D warnings

step "cargo build --workspace --bins (with rdma)"
cargo build --workspace --bins --all-features --quiet

step "cargo test --workspace (with rdma: the host has no RDMA device, so TCP paths and codecs run here; RDMA runs in the soft-RoCE suite)"
cargo test --workspace --all-features --quiet 2>&1 | tee target/test-output.txt

step "multi-host suite: coordinator, 3 servers, 3 agents in network namespaces (root)"
if [ "$(id -u)" -ne 0 ]; then
  echo "tests/run.sh: the multi-host suite needs root (network namespaces)" >&2
  exit 1
fi
cargo test --quiet --all-features -p rmem-tests --test netns -- --ignored 2>&1 | tee -a target/test-output.txt

step "chaos suite: 6 servers and 3 looping agents in network namespaces; kill, stop, cut, drain, coordinator restart (root)"
cargo test --quiet --all-features -p rmem-tests --test chaos -- --ignored --nocapture 2>&1 | tee -a target/test-output.txt

step "failover suite: three etcd members, three coordinator replicas, servers and looping agents in network namespaces; leader killed, leader cut off, an etcd member killed, etcd away (root)"
cargo test --quiet --all-features -p rmem-tests --test failover -- --ignored --nocapture 2>&1 | tee -a target/test-output.txt


step "cargo build --release, with rdma (tests/build-release.sh: one build for the README's main job, the benchmark, the guests and the images)"
bash tests/build-release.sh

step "unit tests of the data path built optimised (a miscompile of the store's slot bookkeeping once showed only in release builds)"
cargo test --release --quiet -p rmem-server -p rmem-client -p rmem-proto --lib 2>&1 | tee -a target/test-output.txt

step "the README's main job: rmem-agent demo, default flags (fails on any wrong byte)"
./target/release/rmem-agent demo

step "kernel-module suite: Debian's stock kernel under QEMU, rmem.ko, rmem-vmtest (tests/vm/run.sh)"
bash tests/vm/run.sh kmod 2>&1 | tee target/vm-output.txt

step "soft-RoCE suite: three guests with rxe, rmem's RDMA data plane against perftest (tests/vm/run.sh rdma)"
bash tests/vm/run.sh rdma 2>&1 | tee target/vm-rdma-output.txt

step "container suite: images from deploy/container, a compose cluster on etcd with three coordinator replicas, the leader killed and a server restarted mid-workload (tests/container/run.sh --prebuilt: the images package the binaries tested above)"
bash tests/container/run.sh --prebuilt 2>&1 | tee target/container-output.txt

step "Kubernetes manifests: offline schema and reference checks (tests/k8s/validate.sh)"
bash tests/k8s/validate.sh 2>&1 | tee target/k8s-output.txt

step "monitoring kit: promtool checks the alerting rules and runs their unit tests, the dashboard's JSON and queries (deploy/monitoring/check.sh)"
bash deploy/monitoring/check.sh

step "fuzzing: every decoder a peer reaches (wire codec, server sessions, client replies, coordinator requests), 10 s each under AFL++ from fuzz/corpus (fuzz/run.sh)"
bash fuzz/run.sh --seconds 10 2>&1 | tee target/fuzz-output.txt

step "rmem-bench --quick (keeps the benchmark harness working, kernel swap baselines and plots included; figures are not judged)"
./target/release/rmem-bench --quick --plots target/bench-plots

# One closing line for CI: sum of every test binary's result line and the
# VM, container and Kubernetes suites' "N passed, M failed".
awk '/^test result:/ { for (i = 1; i <= NF; i++) { if ($(i) ~ /^passed;?$/) p += $(i-1); if ($(i) ~ /^failed;?$/) f += $(i-1) } }
     /^[0-9]+ passed, [0-9]+ failed/ { p += $1; f += $3 }
     END { printf "\nrmem: %d passed, %d failed\n", p, f }' target/test-output.txt target/vm-output.txt target/vm-rdma-output.txt \
  target/container-output.txt target/k8s-output.txt target/fuzz-output.txt
t_all=$(($(date +%s) - t_run))
printf 'rmem: the whole run took %dm%02ds\n' $((t_all / 60)) $((t_all % 60))
