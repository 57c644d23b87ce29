#!/usr/bin/env bash
# Many idle connections: holds IDLE_CONNECTIONS (10000) idle SMTP sessions open against one
# Postilion, measures its resident memory per connection, and times fresh sessions while they
# are held. Bounded (every wait has a deadline) and cleaned up at the end. Method:
# bench/README.md; figures: BENCHMARKS.md.
#
# Usage: bench/idle.sh [data-dir-parent]   (default: target/)
#
# Settings (environment):
#   IDLE_CONNECTIONS=10000   connections held
#   IDLE_SOURCES="127.0.0.2 127.0.0.3 127.0.0.4 127.0.0.5"
#                            client addresses the held connections are spread over (each
#                            gets connections / sources, under limits.connections_per_ip)
#   IDLE_PROBES=20           timed sessions before and while the connections are held
#   IDLE_HOLD=10             seconds the connections are held without traffic (idle CPU)
#   IDLE_KEEP=0              1: keep the work directory
#   POSTILION_BIN            use this instead of building target/release
set -euo pipefail
cd "$(dirname "$0")/.."
repo=$PWD
. bench/lib.sh

connections=${IDLE_CONNECTIONS:-10000}
sources=${IDLE_SOURCES:-127.0.0.2 127.0.0.3 127.0.0.4 127.0.0.5}
probes=${IDLE_PROBES:-20}
hold=${IDLE_HOLD:-10}
keep=${IDLE_KEEP:-0}
domain=bench.test

bench_need_root "raises the descriptor limit, runs the server as nobody"
# The server and the client (each a process of its own) need a descriptor per connection and
# some more: raise the soft limit, and the hard one if it is lower (that needs
# CAP_SYS_RESOURCE, which a container may not grant).
need=$((connections + 1024))
if [ "$(ulimit -Hn)" != unlimited ] && [ "$(ulimit -Hn)" -lt "$need" ]; then
  ulimit -Hn "$need" 2>/dev/null || bench_die "the descriptor limit is $(ulimit -Hn) and cannot be raised to $need"
fi
[ "$(ulimit -n)" != unlimited ] && [ "$(ulimit -n)" -lt "$need" ] && ulimit -n "$need"

bench_workdir "$repo" idle "${1:-}"

server_pid=
cleanup() {
  if [ -n "$server_pid" ]; then kill -TERM "$server_pid" 2>/dev/null || true; wait "$server_pid" 2>/dev/null || true; fi
  if [ "$keep" = 1 ]; then echo "work directory kept: $work" >&2; else rm -rf "$work"; fi
}
trap cleanup EXIT

n_sources=$(wc -w <<<"$sources")
per_ip=$(( (connections + n_sources - 1) / n_sources + 10 ))
# Defaults but for: a plaintext listener, the local domain, and the connection limits raised
# just enough for the held connections and the probes (limits.connections defaults to 1000,
# connections_per_ip to 50).
cat >"$work/postilion.toml" <<TOML
data_dir = "$work/data"
hostname = "mx.$domain"
user = "nobody"
[[listeners]]
address = "127.0.0.1:0"
tls = "none"
[limits]
connections = $((connections + 100))
connections_per_ip = $per_ip
[local]
domains = ["$domain"]
TOML
"$postilion" serve --config "$work/postilion.toml" >"$work/stdout" 2>"$work/log" &
server_pid=$!
for _ in $(seq 100); do grep -q "^data directory" "$work/stdout" 2>/dev/null && break; sleep 0.1; done
port=$(sed -n 's/^listening on 127.0.0.1:\([0-9]*\).*/\1/p' "$work/stdout")
[ -n "$port" ] || { cat "$work/log" >&2; bench_die "postilion did not start"; }

echo "idle: postilion $postilion_version, $connections connections from $sources (limits.connections" \
  "$((connections + 100)), connections_per_ip $per_ip), descriptor limit $(ulimit -n)" >&2
# The client runs under its own deadlines; timeout(1) bounds it once more.
timeout 900 python3 "$repo/bench/idle.py" --server "127.0.0.1:$port" --pid "$server_pid" \
  --connections "$connections" --sources "$(tr ' ' ',' <<<"$sources" | sed 's/,*$//')" --probes "$probes" \
  --hold "$hold" --to "user@$domain" >"$work/result.json"
delivered=$(python3 "$repo/bench/watch.py" count "$work/data/maildir/*/new")
kill -TERM "$server_pid"; wait "$server_pid" 2>/dev/null || true; server_pid=
problems=$(bench_log_problems postilion "$work/log")

python3 - "$work/result.json" "$delivered" "$((2 * probes))" "$(echo -n "$problems" | grep -c . || true)" <<'PY'
import json, sys
r = json.load(open(sys.argv[1]))
delivered, expected, problems = int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4])
n = r["connections"]
print(f"{n} idle connections from {len(r['sources'])} addresses, opened and greeted in {r['open_seconds']:.1f} s, "
      f"EHLO on all in {r['ehlo_seconds']:.1f} s; {r['still_open']} still open and silent after the probes")
print()
print("| server memory | RSS MiB | RssAnon MiB | PSS MiB | descriptors | threads | kernel TCP memory MiB (both ends) |")
print("|---|---|---|---|---|---|---|")
for phase, name in (("before", f"before (after {r['probes']} sessions)"), ("greeted", f"{n} greeted"),
                    ("idle", f"{n} after EHLO"), ("during", f"{n} after EHLO, after the probes"),
                    ("after", "all closed")):
    m = r[f"memory_{phase}"]
    print(f"| {name} | {m['VmRSS'] / 1024:.1f} | {m['RssAnon'] / 1024:.1f} | {m['Pss'] / 1024:.1f} | {m['fds']} "
          f"| {m['Threads']} | {m['tcp_mem_pages'] * 4 / 1024:.1f} |")
print()
for phase, name in (("greeted", "greeted"), ("idle", "after EHLO"), ("during", "after the probes")):
    print(f"per connection, {name}: RSS {r[f'rss_per_connection_kib_{phase}']:.1f} KiB, "
          f"PSS {r[f'pss_per_connection_kib_{phase}']:.1f} KiB, kernel TCP buffers "
          f"{r[f'kernel_tcp_per_connection_kib_{phase}']:.1f} KiB (target: RSS < 64 KiB: "
          f"{'met' if r[f'rss_per_connection_kib_{phase}'] < 64 else 'NOT met'})")
print(f"peak RSS (VmHWM) {r['memory_during']['VmHWM'] / 1024:.1f} MiB")
cpu = r["idle_cpu_seconds"]
print(f"server CPU while {n} connections were held {r['hold_seconds']:.0f} s without traffic: "
      f"{cpu['user']:.2f} s user, {cpu['system']:.2f} s system")
print()
print("| fresh session (ms) | connect to 220, median | max | whole session, median | max | end of data to 250, median | max |")
print("|---|---|---|---|---|---|---|")
for phase, name in (("before", "no connections held"), ("during", f"{n} held")):
    p = r[f"probes_{phase}"]
    print(f"| {name} | {p['greeting_ms_median']:.2f} | {p['greeting_ms_max']:.2f} | {p['session_ms_median']:.2f} "
          f"| {p['session_ms_max']:.2f} | {p['end_of_data_ms_median']:.2f} | {p['end_of_data_ms_max']:.2f} |")
print()
print(f"probe messages in Maildirs: {delivered} of {expected}; warning/error log lines: {problems}")
PY
[ -z "$problems" ] || { echo "first warning/error lines:" >&2; head -5 <<<"$problems" >&2; }
