#!/usr/bin/env bash
# Container suite: builds rmem's images from deploy/container/Containerfile
# (with no registry: the build stage runs in an image made by
# deploy/container/builder-image.sh, the runtime images are FROM scratch),
# checks that they carry RDMA support (rdma-core, every verbs provider and
# its libraries; a server run with --rdma, no device present, stops with
# rmem's no-device error), starts deploy/container/compose.yaml (etcd, three
# coordinator replicas, three memory servers with file-backed pools, an agent
# running the verifying demo workload), kills the leading coordinator and
# stops and restarts one server in the middle of the workload, checks that
# every page read back was correct, and tears everything down.
#
#   bash tests/container/run.sh [--prebuilt]
#
# --prebuilt packages the binaries of tests/build-release.sh (built here if
# they are not, on the host's toolchain and Debian release) through the
# Containerfile's PREBUILT argument instead of compiling the workspace again
# in the build stage: the full test suite uses it, having built and tested
# those binaries already. Without it the build stage compiles, as an
# operator's build does.
#
# Prints "N passed, M failed" and exits non-zero on any failure. Needs root,
# a running Docker engine, docker-compose and /dev/userfaultfd.
set -euo pipefail
REPO=$(cd "$(dirname "$0")/../.." && pwd)
cd "$REPO"

say() { printf 'container-suite: %s\n' "$*" >&2; }
die() { printf 'container-suite: error: %s\n' "$*" >&2; exit 1; }

passed=0
failed=0
ok() { passed=$((passed + 1)); printf 'ok     %s\n' "$1"; }
bad() { failed=$((failed + 1)); printf 'FAILED %s\n' "$1"; [ -z "${2:-}" ] || printf '       %s\n' "$2"; }

docker info >/dev/null 2>&1 || die "no Docker engine answers (is dockerd running?)"
if ! command -v docker-compose >/dev/null; then
  say "installing docker-compose"
  apt-get update -qq >/dev/null
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq docker-compose >/dev/null
fi
[ -c /dev/userfaultfd ] || die "/dev/userfaultfd is missing (Linux 6.1 or later); the agent container needs it"
command -v python3 >/dev/null || die "python3 is needed to read the daemons' JSON"

builder=$(bash deploy/container/builder-image.sh)

work=$(mktemp -d)
project="rmemci$$"
export RMEM_TAG="ci-$$"
export RMEM_BUILDER="$builder"
export RMEM_CLUSTER_TOKEN_FILE="$work/cluster-token"
# Rounds of about a second each, so a restart lands in the middle of one.
export RMEM_AGENT_ARGS="--repeat 0 --size 48MiB --budget 4MiB --ops 100000 --fault-timeout 60s --json"
head -c 24 /dev/urandom | base64 >"$RMEM_CLUSTER_TOKEN_FILE"
chmod 0644 "$RMEM_CLUSTER_TOKEN_FILE" # read by the daemons' user, 65532

dc() { docker-compose -p "$project" -f deploy/container/compose.yaml "$@"; }
cleanup() {
  dc logs --no-color >"$REPO/target/container-logs.txt" 2>&1 || true
  dc down -v --remove-orphans >/dev/null 2>&1 || true
  for role in server coordinator agent etcd; do docker rmi "rmem-$role:$RMEM_TAG" >/dev/null 2>&1 || true; done
  # Build-stage layers of earlier runs: kept a week as a cache, then dropped.
  docker image prune -f --filter until=168h >/dev/null 2>&1 || true
  rm -rf "$work" "$REPO/target/container-bins"
}
mkdir -p target
trap cleanup EXIT

t0=$(date +%s)
if [ "${1:-}" = --prebuilt ]; then
  say "building the images from tests/build-release.sh's binaries"
  bash tests/build-release.sh
  rm -rf target/container-bins
  mkdir -p target/container-bins
  for b in rmem-server rmem-coordinator rmem-agent rmemctl; do
    cp "target/release/$b" target/container-bins/
  done
  export RMEM_PREBUILT=target/container-bins
else
  say "building the images (the build stage compiles the workspace: a few minutes)"
fi
if dc build >"$REPO/target/container-build.txt" 2>&1; then
  ok "images build from the Containerfile with no registry ($(($(date +%s) - t0)) s)"
else
  tail -30 "$REPO/target/container-build.txt"
  bad "images build" "see target/container-build.txt"
  echo "$passed passed, $failed failed"
  exit 1
fi

# Each runtime image: small, not root, with a gRPC health check where the
# daemon serves gRPC.
for role in server coordinator agent etcd; do
  img="rmem-$role:$RMEM_TAG"
  size=$(docker image inspect -f '{{.Size}}' "$img")
  user=$(docker image inspect -f '{{.Config.User}}' "$img")
  health=$(docker image inspect -f '{{if .Config.Healthcheck}}{{join .Config.Healthcheck.Test " "}}{{end}}' "$img")
  if [ "$size" -lt $((64 << 20)) ] && [ "$user" = "65532:65532" ]; then
    ok "$img: $((size >> 20)) MiB, runs as $user"
  else
    bad "$img is small and not root" "size $size, user '$user'"
  fi
  case "$role" in
  server | coordinator)
    case "$health" in
    *"rmemctl --endpoint 127.0.0.1:74"*" health") ok "$img: health check through grpc.health.v1" ;;
    *) bad "$img has a gRPC health check" "got '$health'" ;;
    esac
    ;;
  etcd)
    case "$health" in
    *"etcdctl --endpoints http://127.0.0.1:2379 endpoint health") ok "$img: Debian's etcd, health check through etcdctl" ;;
    *) bad "$img has an etcdctl health check" "got '$health'" ;;
    esac
    ;;
  esac
done

# RDMA support (the images are built with the rdma features): rdma-core's
# libraries, the verbs providers libibverbs dlopens and their .driver files
# are in the image, every provider's libraries resolve in it, and a server
# asked for RDMA gets as far as looking for a device.
simg="rmem-server:$RMEM_TAG"
cid=$(docker create "$simg")
docker export "$cid" | tar -t | sed 's,^\./,,' >"$work/server-files.txt"
docker rm -v "$cid" >/dev/null # and its anonymous /var/lib/rmem volume
has_file() { grep -Eq "$1" "$work/server-files.txt"; }
providers=$(grep -E '/libibverbs/lib[^/]+-rdmav[0-9]+\.so$' "$work/server-files.txt" || true)
if has_file '(^|/)libibverbs\.so\.1$' && has_file '/libibverbs/librxe-rdmav[0-9]+\.so$' &&
  has_file '^etc/libibverbs\.d/rxe\.driver$'; then
  ok "$simg carries libibverbs, $(grep -c . <<<"$providers") verbs providers (rxe among them) and their .driver files"
else
  bad "$simg carries libibverbs, the rxe provider and rxe.driver" \
    "$(grep -E 'ibverbs|rdma' "$work/server-files.txt" | tr '\n' ' ')"
fi
# The image's own loader lists what each file links ("not found" for a
# library missing from the image).
in_image() { # IMAGE ARGS...
  docker run --rm --network none --entrypoint /lib64/ld-linux-x86-64.so.2 "$@" 2>&1
}
for role in server agent; do
  links=$(in_image "rmem-$role:$RMEM_TAG" --list "/usr/local/bin/rmem-$role") || true
  if grep -q 'libibverbs\.so\.1 => /' <<<"$links" && ! grep -q 'not found' <<<"$links"; then
    ok "rmem-$role is built with RDMA: it links libibverbs, and every library it links is in its image"
  else
    bad "rmem-$role links libibverbs and finds its libraries" "$(tr '\n' ' ' <<<"$links")"
  fi
done
unresolved=
for p in $providers; do
  plist=$(in_image "$simg" --list "/$p") && ! grep -q 'not found' <<<"$plist" ||
    unresolved="$unresolved $p: $(grep 'not found' <<<"$plist" | tr '\n' ' ')"
done
if [ -n "$providers" ] && [ -z "$unresolved" ]; then
  ok "every verbs provider's libraries are in $simg"
else
  bad "every verbs provider's libraries are in $simg" "${unresolved:-no providers}"
fi
# No RDMA device exists here: with --rdma and a specific listen address the
# server opens its device at start, so it must stop with rmem's error saying
# so (not a loader error, nor "no RDMA support" from a TCP-only build).
# Locked memory plays no part before a device opens, and an engine may not be
# allowed to raise it (--ulimit memlock=-1), so the default limit stays.
rdma_out=$(timeout 120 docker run --rm --name "$project-rdma" --network none \
  "$simg" --rdma --listen 127.0.0.1:7480 --grpc 127.0.0.1:7481 --capacity 16MiB 2>&1) && rdma_code=0 || rdma_code=$?
docker rm -f "$project-rdma" >/dev/null 2>&1 || true
if [ "$rdma_code" = 1 ] &&
  grep -Eq 'cannot open an RDMA device for 127\.0\.0\.1: no (RDMA device found|active RDMA port)' <<<"$rdma_out"; then
  ok "rmem-server --rdma in a container without RDMA devices: $(grep -Eo 'no RDMA device found|no active RDMA port[^(]*' <<<"$rdma_out" | head -1)"
else
  bad "rmem-server --rdma fails with rmem's no-device error" \
    "exit $rdma_code: $(tail -3 <<<"$rdma_out" | tr '\n' ' ')"
fi

say "starting the cluster"
if ! dc up -d >"$work/up.txt" 2>&1; then
  cat "$work/up.txt"
  bad "the compose cluster starts" "docker-compose up failed"
  echo "$passed passed, $failed failed"
  exit 1
fi

health_of() { docker inspect -f '{{.State.Health.Status}}' "$(dc ps -q "$1")" 2>/dev/null; }
wait_for() { # SECONDS DESCRIPTION COMMAND...
  local limit=$1 what=$2
  shift 2
  local end=$(($(date +%s) + limit))
  local r=0
  until "$@" || { r=$?; [ "$r" -eq 2 ]; }; do
    if [ "$(date +%s)" -ge "$end" ]; then
      say "timed out after ${limit}s waiting for $what"
      return 1
    fi
    sleep 1
  done
  # 2: the condition gave up (what it waited on is gone).
  [ "$r" -ne 2 ]
}
server_healthy() { [ "$(health_of "$1")" = healthy ]; }
all_healthy() {
  for s in etcd coordinator-1 coordinator-2 coordinator-3 server-1 server-2 server-3; do
    [ "$(health_of "$s")" = healthy ] || return 1
  done
}
coordinators=coordinator-1:7470,coordinator-2:7470,coordinator-3:7470
# rmemctl from the first replica's container (or another while it is down),
# given every replica: it finds the leader.
ctl_from=coordinator-1
# As the lab PKI's admin (the pki volume; servers' statistics are for admins).
ctl() {
  dc exec -T "$ctl_from" rmemctl --endpoint "$coordinators" --token-file /run/secrets/cluster-token \
    --tls-cert /var/lib/rmem/pki/admin-admin.pem --tls-key /var/lib/rmem/pki/admin-admin.key "$@"
}
status_field() { # FIELD: from rmemctl status
  ctl status --output json 2>/dev/null | python3 -c 'import json,sys; v=json.load(sys.stdin).get(sys.argv[1]); print(json.dumps(v) if isinstance(v, list) else v)' "$1"
}

if wait_for 120 "every daemon to be healthy" all_healthy; then
  ok "etcd, three coordinator replicas and three servers report healthy"
else
  bad "etcd, three coordinator replicas and three servers report healthy" "$(dc ps 2>&1 | tail -9)"
fi

# etcd is on mutual TLS with a CA of its own: the coordinators reach it
# (above: healthy, state in etcd), while plaintext, a client with no
# certificate and a client with an rmem member's certificate (the rmem CA's,
# which etcd does not trust) are refused.
etcdctl_as() { # ARGS...: etcdctl in the etcd container, at its TLS port
  # A refusal exits non-zero: what it printed is the result here.
  dc exec -T etcd /usr/local/bin/etcdctl --dial-timeout=3s --command-timeout=3s "$@" endpoint health 2>&1 || true
}
plain_out=$(etcdctl_as --endpoints=http://127.0.0.1:2379)
bare_out=$(etcdctl_as --endpoints=https://127.0.0.1:2379 --cacert=/var/lib/rmem/etcd-pki/ca.pem)
# The rmem CA's server-1 certificate (from the pki volume), copied into
# the etcd container readable by etcd's user (docker cp makes root the
# owner: -a would need a passwd database, which the image has not).
pki_dir=$(docker volume inspect -f '{{.Mountpoint}}' "${project}_pki")
mkdir -p "$work/member"
cp "$pki_dir/server-server-1.pem" "$pki_dir/server-server-1.key" "$work/member/"
chmod 0644 "$work/member/"*
docker cp "$work/member/." "$(dc ps -q etcd):/var/lib/etcd/"
member_out=$(etcdctl_as --endpoints=https://127.0.0.1:2379 --cacert=/var/lib/rmem/etcd-pki/ca.pem \
  --cert=/var/lib/etcd/server-server-1.pem --key=/var/lib/etcd/server-server-1.key)
# A refusal for the right reason: the file was read, the handshake failed.
grep -qi 'no such file' <<<"$member_out" && member_out="the member's certificate did not reach etcd"
good_out=$(etcdctl_as --endpoints=https://127.0.0.1:2379 --cacert=/var/lib/rmem/etcd-pki/ca.pem \
  --cert=/var/lib/rmem/etcd-pki/admin-etcd-health.pem --key=/var/lib/rmem/etcd-pki/admin-etcd-health.key)
if ! grep -q 'is healthy' <<<"$plain_out" && ! grep -q 'is healthy' <<<"$bare_out" &&
  grep -qi 'unhealthy\|certificate\|tls\|deadline' <<<"$member_out" && ! grep -q 'is healthy' <<<"$member_out" &&
  grep -q 'is healthy' <<<"$good_out"; then
  ok "etcd refuses plaintext, no certificate and an rmem member's certificate; its own CA's opens it"
else
  bad "etcd on mutual TLS with its own CA" \
    "plain: $(tail -1 <<<"$plain_out"); bare: $(tail -1 <<<"$bare_out"); member: $(tail -1 <<<"$member_out"); own: $(tail -1 <<<"$good_out")"
fi

replicas_seen() { [ "$(status_field replicas | python3 -c 'import json,sys; print(len(json.load(sys.stdin)))' 2>/dev/null)" = 3 ]; }
if wait_for 30 "three replicas in rmemctl status" replicas_seen && [ "$(status_field state_backend)" = etcd ]; then
  ok "the coordinators keep their state in etcd, three replicas, $(status_field leader) leads"
else
  bad "three coordinator replicas on etcd" "$(ctl status 2>&1 | tail -12)"
fi

servers_up() {
  ctl servers --output json 2>/dev/null |
    python3 -c 'import json,sys; print(sum(1 for m in json.load(sys.stdin) if m["state"] == "up"))'
}
if [ "$(servers_up)" = 3 ]; then
  ok "three servers joined the coordinator (rmemctl servers)"
else
  bad "three servers joined the coordinator" "$(ctl servers 2>&1)"
fi

# Rounds the agent has reported, and how many of them verified every byte.
rounds() { dc logs --no-color agent 2>/dev/null | grep -c '"verify_ok":' || true; }
rounds_ok() { dc logs --no-color agent 2>/dev/null | grep -c '"verify_ok":true' || true; }
used_on() { # NAME: pages the server holds
  ctl stats --output json 2>/dev/null | python3 -c '
import json, sys
for s in json.load(sys.stdin)["servers"]:
    if s["name"] == sys.argv[1]:
        print(s["used_pages"])' "$1"
}
server2_holds_pages() { [ "$(used_on server-2)" -gt 0 ] 2>/dev/null; }
agent_running() { [ "$(docker inspect -f '{{.State.Running}}' "$(dc ps -q agent)" 2>/dev/null)" = true ]; }
# True once the agent reported N rounds; stops the wait (false, with a
# line) if the agent has exited instead.
rounds_at_least() {
  [ "$(rounds)" -ge "$1" ] && return 0
  if ! agent_running; then
    say "the agent exited: $(dc logs --no-color --tail 1 agent 2>&1 | tail -1)"
    return 2
  fi
  return 1
}

if wait_for 120 "the agent's first round" rounds_at_least 1; then
  ok "the agent container runs the demo workload against the cluster"
else
  bad "the agent container runs the demo workload" "$(dc logs --no-color --tail 20 agent 2>&1)"
fi

if wait_for 60 "server-2 to hold pages" server2_holds_pages; then
  before=$(rounds)
  say "server-2 holds $(used_on server-2) pages; stopping it in the middle of round $((before + 1))"
  dc stop -t 30 server-2 >/dev/null 2>&1
  sleep 3
  dc start server-2 >/dev/null 2>&1
  if wait_for 120 "server-2 to be healthy again" server_healthy server-2; then
    ok "server-2 stopped and started again with its pool volume"
  else
    bad "server-2 restarts" "$(dc logs --no-color --tail 20 server-2 2>&1)"
  fi
  if wait_for 180 "two more rounds after the restart" rounds_at_least $((before + 2)); then
    ok "the workload carried on through the restart ($(rounds) rounds so far)"
  else
    bad "the workload carries on after the restart" "$(dc logs --no-color --tail 20 agent 2>&1)"
  fi
else
  bad "server-2 holds pages before its restart" "$(ctl stats 2>&1 | tail -12)"
fi

# The leading coordinator is killed mid-workload: another replica is elected
# within the election TTL, members follow it, the workload goes on; the
# killed one comes back as a candidate.
leader=$(status_field leader)
leader=${leader%%:*}
case "$leader" in
coordinator-[123])
  [ "$leader" != coordinator-1 ] || ctl_from=coordinator-2
  before=$(rounds)
  say "killing the leading coordinator, $leader, in the middle of round $((before + 1))"
  dc kill "$leader" >/dev/null 2>&1
  killed=$(date +%s)
  new_leader() { l=$(status_field leader); [ -n "$l" ] && [ "$l" != None ] && [ "${l%%:*}" != "$leader" ]; }
  if wait_for 60 "another replica to lead" new_leader; then
    ok "$(status_field leader) leads $(($(date +%s) - killed)) s after $leader was killed"
  else
    bad "another replica leads after the leader was killed" "$(ctl status 2>&1 | tail -12)"
  fi
  if wait_for 180 "two more rounds after the failover" rounds_at_least $((before + 2)); then
    ok "the workload carried on through the failover ($(rounds) rounds so far)"
  else
    bad "the workload carries on through the failover" "$(dc logs --no-color --tail 20 agent 2>&1)"
  fi
  dc start "$leader" >/dev/null 2>&1
  if wait_for 60 "$leader to be back as a candidate" replicas_seen; then
    ok "$leader came back as a candidate (three replicas)"
  else
    bad "the killed replica comes back" "$(ctl status 2>&1 | tail -12)"
  fi
  ;;
*) bad "rmemctl status names the leading replica" "leader '$leader'" ;;
esac

say "stopping the agent (SIGTERM ends it after the current round)"
dc stop -t 120 agent >/dev/null 2>&1
code=$(docker inspect -f '{{.State.ExitCode}}' "$(dc ps -q agent)")
total=$(rounds)
good=$(rounds_ok)
if [ "$code" = 0 ] && [ "$total" -ge 3 ] && [ "$total" = "$good" ]; then
  ok "every page read back was correct: $good of $total rounds verified, agent exited 0"
else
  bad "every page read back was correct" "exit code $code, $good of $total rounds verified"
  dc logs --no-color --tail 30 agent 2>&1 | sed 's/^/       /'
fi

all_freed() {
  ctl stats --output json 2>/dev/null |
    python3 -c 'import json,sys; s=json.load(sys.stdin)["servers"]; sys.exit(0 if len(s) == 3 and all(x["used_pages"] == 0 and not x.get("error") for x in s) else 1)'
}
if wait_for 60 "the servers to free the agent's pages" all_freed; then
  ok "the servers hold no pages once the agent is gone"
else
  bad "the servers free the agent's pages" "$(ctl stats --output json 2>&1 |
    python3 -c 'import json,sys; [print(s["name"], s.get("used_pages"), s.get("error", "")) for s in json.load(sys.stdin)["servers"]]' 2>&1)"
  dc logs --no-color agent 2>&1 | grep -i 'warn\|error' | tail -15 | sed 's/^/       /'
fi

echo "$passed passed, $failed failed"
[ "$failed" -eq 0 ]
