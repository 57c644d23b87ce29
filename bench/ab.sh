#!/usr/bin/env bash
# Two builds (or two configurations) of Postilion, A and B, at one load, in alternating pairs:
# the median of B's rate over A's tells a change of a few percent from this machine's noise,
# which moves single runs by 20% and more. Each run: a fresh server and data directory,
# loadgen with pipelining, the accepted messages per second; delivery to the Maildir runs
# meanwhile, as in compare.sh. The first of each pair alternates, so neither build always
# follows the other. Method and caveats: bench/README.md.
#
# Usage: bench/ab.sh A-binary B-binary [pairs]   (default 8 pairs)
#
# Settings (environment):
#   AB_LOAD="1024:50:20000"   size:sessions:messages
#   AB_CONFIG_A=, AB_CONFIG_B= extra TOML tables appended to A's or B's configuration, each
#                             starting with a [table] header (to compare settings with one
#                             binary, pass it as both A and B)
#   AB_KEEP=0                 1: keep the work directory
#   LOADGEN_BIN               use this loadgen instead of building target/release
set -euo pipefail
cd "$(dirname "$0")/.."
repo=$PWD
. bench/lib.sh

[ $# -ge 2 ] || bench_die "usage: bench/ab.sh A-binary B-binary [pairs]"
binary_a=$(realpath "$1") binary_b=$(realpath "$2") pairs=${3:-8}
IFS=: read -r size sessions messages <<<"${AB_LOAD:-1024:50:20000}"
keep=${AB_KEEP:-0}
loadgen=${LOADGEN_BIN:-}
if [ -z "$loadgen" ]; then
  cargo build --release -q -p loadgen
  loadgen=$repo/target/release/loadgen
fi
# Runs are kept until the end: deleting thousands of Maildir files makes creating files
# slower for a minute on a journal-less ext4 (bench/README.md), which would slow the next run.
mkdir -p "$repo/target"
work=$(mktemp -d "$repo/target/bench-ab.XXXXXX")
server_pid= finished=
cleanup() {
  if [ -n "$server_pid" ]; then kill "$server_pid" 2>/dev/null || true; wait "$server_pid" 2>/dev/null || true; fi
  # After a failure the logs are worth keeping.
  if [ "$keep" = 1 ] || [ -z "$finished" ]; then echo "work directory kept: $work" >&2; else rm -rf "$work"; fi
}
trap cleanup EXIT

run_once() { # label binary extra-toml; sets rate (msg/s)
  local label=$1 binary=$2 extra=$3
  local run
  run=$(mktemp -d "$work/$label.XXXXXX")
  bench_postilion_config "$run/postilion.toml" "$run/data" bench.test "" "$extra"
  "$binary" serve --config "$run/postilion.toml" >"$run/stdout" 2>"$run/log" &
  server_pid=$!
  for _ in $(seq 100); do grep -q "^data directory" "$run/stdout" 2>/dev/null && break; sleep 0.1; done
  local port
  port=$(sed -n 's/^listening on 127.0.0.1:\([0-9]*\).*/\1/p' "$run/stdout")
  [ -n "$port" ] || { cat "$run/log" >&2; bench_die "$label did not start"; }
  sleep 0.5 # let start-up work settle
  "$loadgen" --server "127.0.0.1:$port" --sessions "$sessions" --messages "$messages" --size "$size" \
    --pipelining --to user@bench.test >"$run/loadgen.out" 2>&1 || { cat "$run/loadgen.out" >&2; bench_die "loadgen failed"; }
  kill -TERM "$server_pid" 2>/dev/null || bench_die "$label: the server died during the run (log: $run/log)"
  wait "$server_pid" 2>/dev/null || true; server_pid=
  grep -q "^errors: *0$" "$run/loadgen.out" || { cat "$run/loadgen.out" >&2; bench_die "$label: loadgen saw errors"; }
  rate=$(sed -n 's/^throughput: *\([0-9.]*\).*/\1/p' "$run/loadgen.out")
  [ -n "$rate" ] || bench_die "$label: no throughput in $run/loadgen.out"
}

echo "A: $binary_a${AB_CONFIG_A:+ + AB_CONFIG_A}"
echo "B: $binary_b${AB_CONFIG_B:+ + AB_CONFIG_B}"
echo "load: $size octets, $sessions sessions, $messages messages; $pairs pairs"
results=$work/results
: >"$results"
for pair in $(seq "$pairs"); do
  if [ $((pair % 2)) = 1 ]; then
    run_once a "$binary_a" "${AB_CONFIG_A:-}"; a=$rate
    run_once b "$binary_b" "${AB_CONFIG_B:-}"; b=$rate
  else
    run_once b "$binary_b" "${AB_CONFIG_B:-}"; b=$rate
    run_once a "$binary_a" "${AB_CONFIG_A:-}"; a=$rate
  fi
  echo "$a $b" | tee -a "$results" | awk '{printf "pair: A %.0f msg/s, B %.0f msg/s, B/A %.3f\n", $1, $2, $2 / $1}'
done
python3 - "$results" <<'PY'
import statistics, sys
rows = [tuple(map(float, line.split())) for line in open(sys.argv[1]) if line.strip()]
ratios = [b / a for a, b in rows]
print(f"median: A {statistics.median(a for a, _ in rows):.0f} msg/s, B {statistics.median(b for _, b in rows):.0f} msg/s; "
      f"B/A median {statistics.median(ratios):.3f} (min {min(ratios):.3f}, max {max(ratios):.3f}); "
      f"B faster in {sum(r > 1 for r in ratios)} of {len(ratios)} pairs")
PY
finished=1
