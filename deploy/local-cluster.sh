#!/usr/bin/env bash
# A whole rmem cluster as local processes on loopback, to try things by hand.
#
#   deploy/local-cluster.sh up [--servers N] [--coordinators C] [--port P] [--dir DIR] [--agent-size SIZE]
#   deploy/local-cluster.sh status
#   deploy/local-cluster.sh down
#
# `up` builds the release binaries if needed and starts a coordinator on
# 127.0.0.1:P (default 17470), N memory servers (default 3, 256 MiB each)
# that join it, and one agent running the verifying demo workload in a loop
# (a region of SIZE, default 64MiB, with a 1 MiB local budget) on capacity
# placed by the coordinator. It prints the coordinator endpoint (127.0.0.1:17470).
#
# With --coordinators C (2..5) it starts a local etcd (Debian's etcd-server:
# client port P+90, peer port P+91, data in DIR/etcd) and C coordinator
# replicas against it on 127.0.0.1:P..P+C-1, one of which leads, and prints
# every coordinator endpoint on one line, comma-separated: members, rmemctl
# and the demo take that list and follow the leader.
#
# Every connection is mutual TLS: `up` makes a lab CA and a certificate for
# each member in DIR/pki (with `rmemctl pki init --keep`: kept across runs),
# and writes DIR/env, shell exports to source:
#
#   . DIR/env
#   rmemctl status                  # as the admin local-admin
#   rmem-agent demo                 # as the agent local-you, on the cluster
#
# Every member is also given the CA's CRL, DIR/pki/crl.pem: `rmemctl pki
# revoke --dir DIR/pki --role agent --name local-you` cuts that agent off
# within seconds.
#
# Every daemon serves Prometheus metrics over the same mutual TLS (the
# coordinators on P+50.., the servers on P+60.., the agent on P+80), for
# the monitor certificate DIR/pki/monitor-local-prometheus.pem; `up` writes
# DIR/prometheus.yml, a scrape configuration for them with the alerting
# rules of deploy/monitoring (prometheus --config.file DIR/prometheus.yml).
#
# Logs, pids and the coordinator's state live in DIR (default
# ${TMPDIR:-/tmp}/rmem-local-cluster); `down` stops everything (SIGTERM, so
# the agent frees its pages and the servers leave the cluster) and keeps the
# logs.
set -euo pipefail
here="$(cd "$(dirname "$0")/.." && pwd)"
dir="${RMEM_LOCAL_DIR:-${TMPDIR:-/tmp}/rmem-local-cluster}"
servers=3
coordinators=1
port=17470
agent_size=64MiB

die() { echo "local-cluster: $*" >&2; exit 1; }

cmd="${1:-}"
[ -n "$cmd" ] || die "usage: $0 up [--servers N] [--coordinators C] [--port P] [--dir DIR] | status | down"
shift
while [ $# -gt 0 ]; do
  case "$1" in
    --servers) servers="${2:?--servers needs a number}"; shift 2 ;;
    --coordinators) coordinators="${2:?--coordinators needs a number}"; shift 2 ;;
    --port) port="${2:?--port needs a number}"; shift 2 ;;
    --dir) dir="${2:?--dir needs a path}"; shift 2 ;;
    --agent-size) agent_size="${2:?--agent-size needs a size}"; shift 2 ;;
    -h|--help) sed -n '2,/^set -euo/{/^set/d;s/^# \{0,1\}//;p}' "$0"; exit 0 ;;
    *) die "unknown argument: $1" ;;
  esac
done
[[ "$servers" =~ ^[1-9][0-9]*$ ]] || die "--servers must be a positive number"
# Ports: coordinators P.., servers' data and gRPC P+10..P+49, metrics of
# coordinators P+50.., of servers P+60.., of the agent P+80, etcd P+90.
[ "$servers" -le 19 ] || die "--servers: at most 19"
[[ "$coordinators" =~ ^[1-5]$ ]] || die "--coordinators must be 1..5"
[[ "$port" =~ ^[0-9]+$ ]] && [ "$port" -gt 0 ] && [ "$port" -lt 65000 ] || die "--port must be 1..64999"

# RMEM_BIN_DIR: use these binaries instead of building target/release.
bin="${RMEM_BIN_DIR:-$here/target/release}"
# The coordinator endpoints (of several replicas, comma-separated): what
# `up` printed, or the single default.
endpoint="127.0.0.1:$port"
if [ "$cmd" != up ] && [ -f "$dir/endpoint" ]; then
  endpoint=$(cat "$dir/endpoint")
fi

running() { [ -f "$1" ] && kill -0 "$(cat "$1")" 2>/dev/null; }

# The TLS flags of member $1 (its files' stem in DIR/pki, e.g. server-mem-0).
tls() { echo --tls-ca "$dir/pki/ca.pem" --tls-crl "$dir/pki/crl.pem" --tls-cert "$dir/pki/$1.pem" --tls-key "$dir/pki/$1.key"; }
ctl() { "$bin/rmemctl" $(tls admin-local-admin) "$@"; }

stop_all() {
  local any=0 f
  # The agent first (it frees its pages), then the servers, then the
  # coordinators, then etcd.
  for f in "$dir"/pids/agent.pid "$dir"/pids/server-*.pid "$dir"/pids/coordinator*.pid "$dir"/pids/etcd.pid; do
    [ -f "$f" ] || continue
    if running "$f"; then
      kill -TERM "$(cat "$f")" 2>/dev/null || true
      for _ in $(seq 1 200); do running "$f" || break; sleep 0.1; done
      running "$f" && kill -KILL "$(cat "$f")" 2>/dev/null || true
      any=1
    fi
    rm -f "$f"
  done
  return $any
}

case "$cmd" in
  up)
    if ls "$dir"/pids/*.pid >/dev/null 2>&1; then
      die "a cluster is already up in $dir (run: $0 down)"
    fi
    mkdir -p "$dir/pids" "$dir/logs" "$dir/coordinator"
    if [ -z "${RMEM_BIN_DIR:-}" ] && { [ ! -x "$bin/rmem-coordinator" ] || [ ! -x "$bin/rmem-server" ] || [ ! -x "$bin/rmem-agent" ] || [ ! -x "$bin/rmemctl" ]; }; then
      echo "local-cluster: building release binaries..." >&2
      (cd "$here" && cargo build --release --quiet -p rmem-coordinator -p rmem-server -p rmem-agent -p rmemctl)
    fi
    trap 'echo "local-cluster: start failed; stopping what started (logs in $dir/logs)" >&2; stop_all || true' ERR

    # The lab PKI: a CA, and a certificate for every member (loopback).
    members=(--member admin:local-admin --member agent:local-agent@127.0.0.1 --member agent:local-you
      --member monitor:local-prometheus)
    for i in $(seq 0 $((coordinators - 1))); do members+=(--member "coordinator:c$i@127.0.0.1"); done
    for i in $(seq 0 $((servers - 1))); do members+=(--member "server:mem-$i@127.0.0.1"); done
    "$bin/rmemctl" pki init --dir "$dir/pki" --keep "${members[@]}" >"$dir/logs/pki.log"

    if [ "$coordinators" -eq 1 ]; then
      "$bin/rmem-coordinator" --listen "$endpoint" --state-dir "$dir/coordinator" $(tls coordinator-c0) \
        --metrics-listen "127.0.0.1:$((port + 50))" \
        --lease 3s --placement-chunk 16MiB >"$dir/logs/coordinator.log" 2>&1 &
      echo $! >"$dir/pids/coordinator.pid"
    else
      command -v etcd >/dev/null || die "--coordinators needs etcd (apt-get install etcd-server)"
      etcd_url="http://127.0.0.1:$((port + 90))"
      peer_url="http://127.0.0.1:$((port + 91))"
      etcd --name local --data-dir "$dir/etcd" \
        --listen-client-urls "$etcd_url" --advertise-client-urls "$etcd_url" \
        --listen-peer-urls "$peer_url" --initial-advertise-peer-urls "$peer_url" \
        --initial-cluster "local=$peer_url" \
        --auto-compaction-mode revision --auto-compaction-retention 1000 \
        >"$dir/logs/etcd.log" 2>&1 &
      echo $! >"$dir/pids/etcd.pid"
      endpoint=
      for i in $(seq 0 $((coordinators - 1))); do
        addr="127.0.0.1:$((port + i))"
        endpoint="${endpoint:+$endpoint,}$addr"
        "$bin/rmem-coordinator" --listen "$addr" --etcd "$etcd_url" $(tls "coordinator-c$i") \
          --metrics-listen "127.0.0.1:$((port + 50 + i))" \
          --lease 3s --placement-chunk 16MiB >"$dir/logs/coordinator-$i.log" 2>&1 &
        echo $! >"$dir/pids/coordinator-$i.pid"
      done
    fi
    echo "$endpoint" >"$dir/endpoint"
    for _ in $(seq 1 150); do
      ctl --endpoint "$endpoint" --timeout 1s status >/dev/null 2>&1 && break
      for f in "$dir"/pids/coordinator*.pid "$dir"/pids/etcd.pid; do
        [ -f "$f" ] || continue
        running "$f" || die "$(basename "$f" .pid) exited; see $dir/logs"
      done
      sleep 0.1
    done
    ctl --endpoint "$endpoint" status >/dev/null || die "the coordinator does not answer on $endpoint"

    for i in $(seq 0 $((servers - 1))); do
      data=$((port + 10 + 2 * i)); grpc=$((data + 1))
      "$bin/rmem-server" --listen "127.0.0.1:$data" --grpc "127.0.0.1:$grpc" --capacity 256MiB \
        --metrics-listen "127.0.0.1:$((port + 60 + i))" \
        --coordinator "$endpoint" $(tls "server-mem-$i") >"$dir/logs/server-$i.log" 2>&1 &
      echo $! >"$dir/pids/server-$i.pid"
    done
    up=0
    for _ in $(seq 1 150); do
      up=$(ctl --endpoint "$endpoint" status --output json | sed -n 's/.*"servers_up": \([0-9]*\).*/\1/p')
      [ "${up:-0}" -ge "$servers" ] && break
      sleep 0.1
    done
    [ "${up:-0}" -ge "$servers" ] || die "only ${up:-0} of $servers servers joined; see $dir/logs"

    "$bin/rmem-agent" $(tls agent-local-agent) demo --coordinator "$endpoint" --repeat 0 \
      --size "$agent_size" --budget 1MiB --ops 50000 --json \
      --metrics-listen "127.0.0.1:$((port + 80))" >"$dir/logs/agent.log" 2>&1 &
    echo $! >"$dir/pids/agent.pid"
    # Prometheus' view of it: every daemon's /metrics with the monitor
    # certificate, and the alerting rules.
    targets() { local first=$1 n=$2 i out=; for i in $(seq 0 $((n - 1))); do out="$out${out:+, }'127.0.0.1:$((first + i))'"; done; echo "$out"; }
    {
      echo "# Prometheus scraping the local rmem cluster in $dir (made by local-cluster.sh up)."
      echo "global: {scrape_interval: 5s, evaluation_interval: 5s}"
      echo "rule_files: ['$here/deploy/monitoring/rmem-alerts.yml']"
      echo "scrape_configs:"
      for job in "rmem-coordinator $((port + 50)) $coordinators" "rmem-server $((port + 60)) $servers" "rmem-agent $((port + 80)) 1"; do
        read -r name first n <<<"$job"
        echo "  - job_name: $name"
        echo "    scheme: https"
        echo "    tls_config: {ca_file: '$dir/pki/ca.pem', cert_file: '$dir/pki/monitor-local-prometheus.pem', key_file: '$dir/pki/monitor-local-prometheus.key'}"
        echo "    static_configs: [{targets: [$(targets "$first" "$n")]}]"
      done
    } >"$dir/prometheus.yml"
    cat >"$dir/env" <<EOF
# The local rmem cluster in $dir: source this file (. $dir/env).
# rmemctl acts as the admin local-admin, rmem-agent as the agent local-you.
export RMEM_ENDPOINT=$endpoint
export RMEM_COORDINATOR=$endpoint
export RMEM_TLS_CA=$dir/pki/ca.pem
export RMEM_TLS_CRL=$dir/pki/crl.pem
export RMEM_TLS_CERT=$dir/pki/admin-local-admin.pem
export RMEM_TLS_KEY=$dir/pki/admin-local-admin.key
export RMEM_AGENT_TLS_CERT=$dir/pki/agent-local-you.pem
export RMEM_AGENT_TLS_KEY=$dir/pki/agent-local-you.key
EOF
    trap - ERR
    echo "local-cluster: coordinator $endpoint, $servers servers, 1 agent, mutual TLS (logs in $dir/logs)" >&2
    echo "local-cluster: . $dir/env to use it (rmemctl status; rmem-agent demo)" >&2
    echo "local-cluster: metrics for the monitor certificate: prometheus --config.file $dir/prometheus.yml" >&2
    [ "$coordinators" -eq 1 ] || echo "local-cluster: $coordinators coordinator replicas on the etcd at $etcd_url" >&2
    echo "$endpoint"
    ;;
  status)
    ctl --endpoint "$endpoint" status
    ;;
  down)
    rm -f "$dir/endpoint" "$dir/env"
    if stop_all; then
      echo "local-cluster: nothing was running in $dir" >&2
    else
      echo "local-cluster: stopped (logs kept in $dir/logs)" >&2
    fi
    ;;
  *) die "unknown command: $cmd (up, status, down)" ;;
esac
