#!/usr/bin/env bash
# Accepted messages per second with durable storage (fsync on), at 1, 10 and 50 concurrent
# sessions, for 1 KiB and 100 KiB messages; then fsync-type system calls per message, counted
# by strace in a separate run (strace slows the server, so it is not timed).
#
# Usage: bench/accept.sh [data-dir-parent]   (default: a temporary directory on the disk
# holding target/; do not use tmpfs, where fsync is free)
set -euo pipefail
cd "$(dirname "$0")/.."
command -v strace >/dev/null || { apt-get install -y -qq strace >/dev/null; }
cargo build --release -q -p postilion -p loadgen
parent=${1:-$PWD/target}
work=$(mktemp -d "$parent/bench-accept.XXXXXX")
server_pid=
cleanup() { [ -n "$server_pid" ] && kill "$server_pid" 2>/dev/null; wait 2>/dev/null; rm -rf "$work"; }
trap cleanup EXIT

start_server() {
  rm -rf "$work/data"
  cat > "$work/config.toml" <<TOML
data_dir = "$work/data"
hostname = "bench.test"
[[listeners]]
address = "127.0.0.1:0"
tls = "none"
[limits]
connections_per_ip = 1000
[spool]
free_space_reserve = 0
TOML
  "$@" "$PWD/target/release/postilion" serve --config "$work/config.toml" >"$work/stdout" 2>"$work/stderr" &
  server_pid=$!
  for _ in $(seq 100); do grep -q "^data directory" "$work/stdout" 2>/dev/null && break; sleep 0.1; done
  port=$(sed -n 's/^listening on 127.0.0.1:\([0-9]*\).*/\1/p' "$work/stdout")
}

# Under strace, $server_pid is strace itself: signal the server, and strace exits with it.
stop_server() {
  target=$(pgrep -P "$server_pid" -x postilion || echo "$server_pid")
  kill -TERM "$target"; wait "$server_pid" 2>/dev/null || true; server_pid=
}

echo "| sessions | size | messages | msg/s | p50 ms | p99 ms | p999 ms |"
echo "|---|---|---|---|---|---|---|"
for size in 1024 102400; do
  for sessions in 1 10 50; do
    if [ "$size" = 1024 ]; then messages=$((sessions == 1 ? 2000 : 10000)); else messages=$((sessions == 1 ? 500 : 2000)); fi
    start_server
    out=$(target/release/loadgen --server "127.0.0.1:$port" --sessions "$sessions" --messages "$messages" --size "$size" --pipelining --json)
    stop_server
    echo "$out" | python3 -c '
import json, sys
r = json.loads(sys.stdin.read())
cells = [r["sessions"], r["size"], r["ok"], round(r["messages_per_second"]), r["p50_ms"], r["p99_ms"], r["p999_ms"]]
print("| " + " | ".join(str(c) for c in cells) + " |")'
  done
done

echo
echo "fsync-type calls per message (strace -f -y, 2000 1 KiB messages accepted and delivered):"
echo "| sessions | messages | spool (journal, queue.db) per message | Maildir and directories per message | all per message |"
echo "|---|---|---|---|---|"
for sessions in 1 10 50; do
  messages=2000
  start_server strace -f -qq -y -e trace=fsync,fdatasync -o "$work/strace"
  target/release/loadgen --server "127.0.0.1:$port" --sessions "$sessions" --messages "$messages" --size 1024 --pipelining --json >/dev/null
  # Let delivery finish before counting.
  for _ in $(seq 100); do
    n=$(find "$work/data/maildir" -type f -path '*/new/*' | wc -l)
    [ "$n" -ge "$messages" ] && break; sleep 0.2
  done
  stop_server
  # strace -y names each descriptor's file: the spool's are under spool/.
  spool=$(grep -cE 'sync\([0-9]+<[^>]*/spool/' "$work/strace" || true)
  all=$(grep -cE 'sync\(' "$work/strace" || true)
  python3 -c "m = $messages; print(f'| $sessions | {m} | {$spool / m:.2f} | {($all - $spool) / m:.2f} | {$all / m:.2f} |')"
done
