#!/usr/bin/env bash
# Coverage-guided fuzzing of every decoder a peer can reach, with AFL++
# (Debian's afl++, installed if missing) on stable Rust: the targets of
# fuzz/ are built with rustc's SanitizerCoverage instrumentation linked to
# AFL++'s runtime (afl-compiler-rt.o), and run in AFL's persistent mode.
#
#   bash fuzz/run.sh [--seconds N | --execs N] [TARGET...]
#
# TARGET: wire, session, replies, control (default: all, one after the
# other, each on one core). --seconds N fuzzes each for N seconds (default
# 20: a smoke run, what .ci/run does); --execs N for about N executions.
# Each starts from fuzz/corpus/TARGET; AFL's state goes to
# target/fuzz/TARGET/. Prints each target's executions, paths and crashes;
# exits 1 if any input crashed or hung a target (the inputs are kept under
# target/fuzz/TARGET/default/crashes/: reproduce with
# `cargo run -p rmem-fuzz --bin rmem-fuzz-TARGET -- FILE`, then add the
# fixed input to fuzz/corpus/TARGET/).
set -euo pipefail
here=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$here"

limit=(-V 20)
targets=()
while [ $# -gt 0 ]; do
  case "$1" in
    --seconds) limit=(-V "${2:?--seconds needs a number}"); shift 2 ;;
    --execs) limit=(-E "${2:?--execs needs a number}"); shift 2 ;;
    -h|--help) sed -n '2,/^set -euo/{/^set/d;s/^# \{0,1\}//;p}' "$0"; exit 0 ;;
    wire|session|replies|control) targets+=("$1"); shift ;;
    *) echo "fuzz: unknown argument $1" >&2; exit 2 ;;
  esac
done
[ ${#targets[@]} -gt 0 ] || targets=(wire session replies control)

if ! command -v afl-fuzz >/dev/null || [ ! -f /usr/lib/afl/afl-compiler-rt.o ]; then
  echo "fuzz: installing afl++" >&2
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq afl++ >/dev/null
fi

# Instrumented release builds of the targets only: --target keeps the flags
# off build scripts and proc macros.
host=$(rustc -vV | sed -n 's/^host: //p')
export CARGO_TARGET_DIR="$here/target/afl"
RUSTFLAGS="--cfg rmem_afl -C debug-assertions -C overflow-checks \
-C passes=sancov-module -C llvm-args=-sanitizer-coverage-level=3 \
-C llvm-args=-sanitizer-coverage-trace-pc-guard \
-C llvm-args=-sanitizer-coverage-prune-blocks=0 \
-C link-arg=/usr/lib/afl/afl-compiler-rt.o" \
  cargo build --release --quiet --locked --target "$host" -p rmem-fuzz \
  $(printf -- '--bin rmem-fuzz-%s ' "${targets[@]}")

export AFL_SKIP_CPUFREQ=1 AFL_NO_UI=1 AFL_I_DONT_CARE_ABOUT_MISSING_CRASHES=1 \
  AFL_FAST_CAL=1 AFL_NO_AFFINITY=1
failed=0
passed=0
for t in "${targets[@]}"; do
  out="$here/target/fuzz/$t"
  rm -rf "$out"
  mkdir -p "$out"
  afl-fuzz -i "fuzz/corpus/$t" -o "$out" -t 2000 "${limit[@]}" -- \
    "$CARGO_TARGET_DIR/$host/release/rmem-fuzz-$t" >"$out/afl.log" 2>&1 || {
    echo "fuzz: afl-fuzz failed for $t; see $out/afl.log" >&2
    tail -20 "$out/afl.log" >&2
    failed=$((failed + 1))
    continue
  }
  stats="$out/default/fuzzer_stats"
  stat() { sed -n "s/^$1 *: *//p" "$stats"; }
  crashes=$(stat saved_crashes); crashes=${crashes:-$(stat unique_crashes)}
  hangs=$(stat saved_hangs); hangs=${hangs:-$(stat unique_hangs)}
  printf 'fuzz: %-8s %12s executions, %6s exec/s, %5s paths, %s crashes, %s hangs\n' \
    "$t" "$(stat execs_done)" "$(stat execs_per_sec)" "$(stat corpus_count)" "${crashes:-?}" "${hangs:-?}"
  if [ "${crashes:-1}" != 0 ] || [ "${hangs:-1}" != 0 ]; then
    echo "fuzz: $t: inputs in $out/default/crashes and hangs" >&2
    failed=$((failed + 1))
  else
    passed=$((passed + 1))
  fi
done
echo "$passed passed, $failed failed"
[ "$failed" -eq 0 ]
