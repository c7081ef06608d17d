#!/usr/bin/env bash
# The optimised build every later stage of the test suite runs: the daemons,
# rmemctl, the guests' drivers and rmem-bench, with the RDMA data plane.
#
#   bash tests/build-release.sh
#
# One package set and one feature set, so that tests/run.sh (the README's
# main job, the benchmark), tests/vm/run.sh (both guest suites) and
# tests/container/run.sh --prebuilt share one build instead of three with
# different features (a feature that reaches rmem-client rebuilds every
# crate above it). Binaries land in target/release.
set -euo pipefail
cd "$(dirname "$0")/.."
exec cargo build --release --quiet \
  -p rmem-server -p rmem-coordinator -p rmem-agent -p rmemctl -p rmem-tests -p rmem-bench --bins \
  --features rmem-server/rdma,rmem-agent/rdma,rmem-tests/rdma
