#!/usr/bin/env bash
# Relayed messages per second end to end (loadgen -> relay -> receiving sink), Postilion next
# to Postfix doing the same job on the same machine, with the relay's CPU time per 1000
# messages and its peak memory. Method and caveats: bench/README.md; figures: BENCHMARKS.md.
#
# Usage: bench/relay.sh [data-dir-parent]   (default: target/, on the disk; never tmpfs)
#
# Settings (environment):
#   RELAY_ROUNDS=3          rounds; each runs every TLS mode and relay once, alternating
#   RELAY_MESSAGES=20000    messages per run in TLS mode "none"
#   RELAY_TLS_MESSAGES=10000 messages per run in TLS mode "opportunistic"
#   RELAY_SESSIONS=20       concurrent loadgen sessions
#   RELAY_SIZE=1024         message size in octets
#   RELAY_CONCURRENCY=10    connections to the sink (Postilion destination_concurrency,
#                           Postfix default_destination_concurrency_limit)
#   RELAY_TLS="none opportunistic"
#                           outbound TLS modes. none: plaintext to smtp-sink. opportunistic:
#                           Postilion tls = "opportunistic", Postfix smtp_tls_security_level
#                           = may, to bench/loadgen's tls-sink, which offers STARTTLS
#                           (smtp-sink cannot)
#   RELAY_PLAIN_SINK=smtp-sink   or tls-sink (without STARTTLS): the sink for mode "none"
#   RELAY_RELAYS="postilion postfix"
#   RELAY_TIMEOUT=600       seconds to wait for the sink to receive everything
#   RELAY_POSTFIX_MAIN_CF=  extra main.cf lines for Postfix (e.g. "smtp_tls_connection_reuse = yes"),
#                           for experiments; the defaults are what the comparison is about
#   RELAY_QUIET=25          before each run, wait until the machine is less than this % busy
#                           (over one second) ...
#   RELAY_QUIET_WAIT=120    ... for at most this many seconds; 0 does not wait
#   RELAY_KEEP=0            1: keep the work directory (configs, logs, per-run JSON)
#   POSTILION_BIN, LOADGEN_BIN, TLS_SINK_BIN   use these instead of building target/release
set -euo pipefail
cd "$(dirname "$0")/.."
repo=$PWD
. bench/lib.sh

rounds=${RELAY_ROUNDS:-3}
plain_messages=${RELAY_MESSAGES:-20000}
tls_messages=${RELAY_TLS_MESSAGES:-10000}
sessions=${RELAY_SESSIONS:-20}
size=${RELAY_SIZE:-1024}
concurrency=${RELAY_CONCURRENCY:-10}
tls_modes=${RELAY_TLS:-none opportunistic}
plain_sink=${RELAY_PLAIN_SINK:-smtp-sink}
relays=${RELAY_RELAYS:-postilion postfix}
timeout=${RELAY_TIMEOUT:-600}
keep=${RELAY_KEEP:-0}
quiet=${RELAY_QUIET:-25}
quiet_wait=${RELAY_QUIET_WAIT:-120}
sink_host=127.0.0.2
recipient=user@remote.test

bench_need_root "Postfix instance, smtp-sink, cgroups"
bench_install_postfix
command -v openssl >/dev/null || DEBIAN_FRONTEND=noninteractive apt-get install -y -qq openssl >/dev/null
bench_cgroup_root
bench_workdir "$repo" relay "${1:-}"
results=$work/results.tsv
: >"$results"
openssl req -x509 -newkey ec -pkeyopt ec_paramgen_curve:P-256 -nodes -days 2 \
  -subj /CN=sink.bench.test -keyout "$work/sink-key.pem" -out "$work/sink-cert.pem" 2>/dev/null

cg= harness= sink_pid= watch_pid= relay_pid= postfix_etc=
stop_relay() {
  if [ -n "$relay_pid" ]; then kill -TERM "$relay_pid" 2>/dev/null || true; wait "$relay_pid" 2>/dev/null || true; relay_pid=; fi
  bench_stop_postfix
}
stop_sink() {
  if [ -n "$sink_pid" ]; then kill -TERM "$sink_pid" 2>/dev/null || true; wait "$sink_pid" 2>/dev/null || true; sink_pid=; fi
  if [ -n "$watch_pid" ]; then wait "$watch_pid" 2>/dev/null || true; watch_pid=; fi
}
cleanup() {
  stop_relay; stop_sink; bench_remove_cgroup "$cg"; bench_remove_cgroup "$harness"
  if [ "$keep" = 1 ]; then echo "work directory kept: $work" >&2; else rm -rf "$work"; fi
}
trap cleanup EXIT

cpu_now() { python3 "$repo/bench/watch.py" cpu "$cg" "$harness"; }

start_postilion() { # run-dir tls-mode sink-port
  local run=$1 tls=$2 sink_port=$3
  cat >"$run/postilion.toml" <<TOML
data_dir = "$run/data"
hostname = "relay.bench.test"
user = "nobody"
[[listeners]]
address = "127.0.0.1:0"
tls = "none"
[limits]
connections_per_ip = 1000
[spool]
free_space_reserve = 0
[relay]
networks = ["127.0.0.0/8"]
[outbound]
port = $sink_port
tls = "$tls"
destination_concurrency = $concurrency
[outbound.routes."*"]
host = "$sink_host"
TOML
  # Started as root, it gives the data directory to "nobody" and runs as it (as Postfix's
  # daemons run as "postfix"). The subshell moves itself into the cgroup, then becomes the
  # server: $! is its pid.
  ( echo "$BASHPID" >"$cg/cgroup.procs"; exec "$postilion" serve --config "$run/postilion.toml" ) \
    >"$run/stdout" 2>"$run/log" &
  relay_pid=$!
  for _ in $(seq 100); do grep -q "^data directory" "$run/stdout" 2>/dev/null && break; sleep 0.1; done
  relay_port=$(sed -n 's/^listening on 127.0.0.1:\([0-9]*\).*/\1/p' "$run/stdout")
  [ -n "$relay_port" ] || { echo "relay.sh: postilion did not start:" >&2; cat "$run/log" >&2; exit 1; }
}

# A private Postfix instance (bench/lib.sh) relaying everything to the sink.
start_postfix() { # run-dir tls-mode sink-port
  local run=$1 tls=$2 sink_port=$3 level=none
  [ "$tls" = opportunistic ] && level=may
  relay_port=$(bench_free_port 127.0.0.1)
  bench_postfix_config "$run/postfix" "$relay_port" relay.bench.test "\
smtpd_relay_restrictions = permit_mynetworks, reject_unauth_destination
relayhost = [$sink_host]:$sink_port
smtp_tls_security_level = $level
default_destination_concurrency_limit = $concurrency
${RELAY_POSTFIX_MAIN_CF:-}"
  bench_start_postfix "$run/postfix" "$cg"
}

# One measured run: fresh directories, sink, relay, load; appends a line to $results.
run_once() { # round relay tls-mode
  local round=$1 relay=$2 tls=$3
  bench_wait_for_quiet "$quiet" "$quiet_wait"
  local run=$work/$round-$relay-$tls messages=$plain_messages sink=$plain_sink
  [ "$tls" = none ] || { messages=$tls_messages; sink=tls-sink-starttls; }
  mkdir -p "$run"
  chmod 0711 "$run"
  cg=$cgroup_root/postilion-relay-bench-$$-$round-$relay-$tls
  harness=$cgroup_root/postilion-relay-bench-$$-$round-$relay-$tls-harness
  mkdir "$cg" "$harness"
  local sink_port
  sink_port=$(bench_free_port "$sink_host")
  mkfifo "$run/sink.fifo"
  ( echo "$BASHPID" >"$harness/cgroup.procs"
    exec python3 "$repo/bench/watch.py" --messages "$messages" --cgroup "$cg" --harness "$harness" \
      --done "$run/done.json" --out "$run/watch.json" ) <"$run/sink.fifo" &
  watch_pid=$!
  case $sink in
    smtp-sink) ( echo "$BASHPID" >"$harness/cgroup.procs"
      exec smtp-sink -u nobody -c "$sink_host:$sink_port" 1024 ) >"$run/sink.fifo" 2>"$run/sink.err" & ;;
    tls-sink) ( echo "$BASHPID" >"$harness/cgroup.procs"
      exec "$tls_sink" --listen "$sink_host:$sink_port" ) >"$run/sink.fifo" 2>"$run/sink.err" & ;;
    tls-sink-starttls) ( echo "$BASHPID" >"$harness/cgroup.procs"
      exec "$tls_sink" --listen "$sink_host:$sink_port" --cert "$work/sink-cert.pem" --key "$work/sink-key.pem" ) \
      >"$run/sink.fifo" 2>"$run/sink.err" & ;;
    *) echo "relay.sh: unknown sink $sink" >&2; exit 1 ;;
  esac
  sink_pid=$!
  bench_wait_listening "$sink_port" || true

  "start_$relay" "$run" "$tls" "$sink_port"
  sleep 1 # let start-up work settle before the CPU reading

  local cpu0 t0 load status=ok
  cpu0=$(cpu_now)
  t0=$EPOCHREALTIME
  load=$( ( echo "$BASHPID" >"$harness/cgroup.procs"
    exec "$loadgen" --server "127.0.0.1:$relay_port" --sessions "$sessions" --messages "$messages" \
      --size "$size" --to "$recipient" --pipelining --json ) 2>"$run/loadgen.err") || status=loadgen-failed
  local deadline=$((SECONDS + timeout))
  until [ -s "$run/done.json" ]; do
    if [ "$SECONDS" -ge "$deadline" ]; then status=timeout; break; fi
    if [ "$relay" = postilion ] && ! kill -0 "$relay_pid" 2>/dev/null; then status=relay-exited; break; fi
    sleep 0.02
  done
  # Peak RSS of the Postilion process as the kernel counted it (VmHWM): a cross-check of the
  # sampled figure. Postfix's processes come and go, so only the samples are summed for it.
  local hwm=
  if [ "$relay" = postilion ]; then hwm=$(awk '/^VmHWM:/ {print $2}' "/proc/$relay_pid/status" 2>/dev/null || true); fi
  # Give the relay a moment to record the last outcomes, then look at its queue and logs.
  sleep 1
  local left=
  if [ "$relay" = postfix ]; then
    left=$(find "$run/postfix/spool/incoming" "$run/postfix/spool/active" "$run/postfix/spool/deferred" \
      -type f 2>/dev/null | wc -l)
  fi
  stop_relay
  stop_sink
  bench_remove_cgroup "$cg"; bench_remove_cgroup "$harness"; cg= harness=

  local problems
  if [ "$relay" = postilion ]; then
    problems=$(bench_log_problems postilion "$run/log")
  else
    problems=$(bench_log_problems postfix "$run/postfix/maillog")
  fi
  if [ -n "$problems" ]; then
    echo "round $round $relay tls=$tls: $(echo "$problems" | wc -l) warning/error log lines, first ones:" >&2
    head -5 <<<"$problems" >&2
  fi
  [ "$status" = ok ] || { echo "round $round $relay tls=$tls: $status; loadgen said:" >&2; tail -3 "$run/loadgen.err" >&2; }
  python3 - "$round" "$relay" "$tls" "$sink" "$status" "$t0" "$cpu0" "$load" "$run" "${hwm:-0}" \
    "$(echo -n "$problems" | grep -c . || true)" "${left:-}" "$messages" "$(nproc)" >>"$results" <<'PY'
import json, sys
(round_, relay, tls, sink, status, t0, cpu0, load, run, hwm, problems, left, messages, cpus) = sys.argv[1:]
messages, cpus = int(messages), int(cpus)
cpu0 = json.loads(cpu0)
load = json.loads(load) if load.strip() else {}
try:
    done = json.load(open(f"{run}/done.json"))
except OSError:
    done = None
watch = json.load(open(f"{run}/watch.json"))
row = {
    "round": int(round_), "relay": relay, "tls": tls, "sink": sink, "status": status,
    "messages": messages, "accepted": load.get("ok", 0), "accept_rate": load.get("messages_per_second", 0.0),
    "sink_messages": watch["messages"], "problems": int(problems or 0),
    "left_in_queue": int(left) if left else None,
    "peak_rss_mib": watch["peak_rss_kib"] / 1024, "peak_pss_mib": watch["peak_pss_kib"] / 1024,
    "hwm_mib": int(hwm) / 1024, "processes": watch["peak_processes"],
}
if done:
    seconds = done["time"] - float(t0)
    relay_cpu = {k: done["cpu"]["relay"][k] - cpu0["relay"][k] for k in cpu0["relay"]}
    harness_ns = done["cpu"]["harness"]["total_ns"] - cpu0["harness"]["total_ns"]
    machine_ns = done["cpu"]["machine_busy_ns"] - cpu0["machine_busy_ns"]
    row.update({
        "seconds": seconds, "rate": messages / seconds,
        "cpu_per_1000": relay_cpu["total_ns"] / 1e9 / messages * 1000,
        "user_per_1000": relay_cpu["user_ns"] / 1e9 / messages * 1000,
        "system_per_1000": relay_cpu["system_ns"] / 1e9 / messages * 1000,
        "relay_cpu_share": relay_cpu["total_ns"] / 1e9 / seconds / cpus,
        "harness_cpu_share": harness_ns / 1e9 / seconds / cpus,
        # Busy CPU not charged to the relay or the harness: other work on the machine.
        "others_cpu_share": max(0, machine_ns - relay_cpu["total_ns"] - harness_ns) / 1e9 / seconds / cpus,
    })
print(json.dumps(row))
if "rate" in row:
    hwm = f", VmHWM {row['hwm_mib']:.1f} MiB" if relay == "postilion" else ""
    print(f"round {round_} {relay:9} tls={tls:13} {row['rate']:7.0f} msg/s end to end ({row['seconds']:.2f} s), "
          f"accepted {row['accept_rate']:.0f} msg/s, CPU {row['cpu_per_1000']:.3f} s/1000, "
          f"peak RSS {row['peak_rss_mib']:.1f} MiB{hwm}; CPU busy: relay {row['relay_cpu_share']:.0%}, "
          f"harness {row['harness_cpu_share']:.0%}, others {row['others_cpu_share']:.0%}", file=sys.stderr)
else:
    print(f"round {round_} {relay} tls={tls}: {status}, sink got {row['sink_messages']}", file=sys.stderr)
PY
}

echo "relay benchmark: $rounds rounds; $plain_messages messages (TLS mode none, $plain_sink) or" \
  "$tls_messages (opportunistic, tls-sink with STARTTLS) of $size octets; $sessions loadgen sessions;" \
  "1 recipient ($recipient); $concurrency connections to the sink on $sink_host; $(nproc) CPUs" >&2
echo "postilion $postilion_version; $(/usr/sbin/postconf -d -h mail_version | sed 's/^/postfix /')" >&2
for round in $(seq "$rounds"); do
  for tls in $tls_modes; do
    # Alternate which relay goes first, so neither always runs on a warmer (or more tired)
    # machine.
    order=$relays
    [ $((round % 2)) = 0 ] && order=$(echo "$relays" | tr ' ' '\n' | tac | tr '\n' ' ')
    for relay in $order; do run_once "$round" "$relay" "$tls"; done
  done
done

python3 - "$results" <<'PY'
import json, statistics, sys
rows = [json.loads(line) for line in open(sys.argv[1]) if line.strip()]

def fmt(value, digits):
    return "-" if value is None else f"{value:.{digits}f}"

def order(key):
    tls, relay = key
    return (tls != "none", tls, relay != "postilion", relay)

print("| round | relay | outbound TLS | sink | messages | relayed msg/s (end to end) | seconds "
      "| accepted msg/s (loadgen) | CPU s / 1000 msg (user + sys) | peak RSS MiB | peak PSS MiB "
      "| CPU busy: relay / harness / others | log warnings |")
print("|---|---|---|---|---|---|---|---|---|---|---|---|---|")
for r in sorted(rows, key=lambda r: (order((r["tls"], r["relay"])), r["round"])):
    cpu = (f"{r['cpu_per_1000']:.3f} ({r['user_per_1000']:.3f} + {r['system_per_1000']:.3f})"
           if "cpu_per_1000" in r else "-")
    busy = (f"{r['relay_cpu_share']:.0%} / {r['harness_cpu_share']:.0%} / {r['others_cpu_share']:.0%}"
            if "relay_cpu_share" in r else "-")
    print(f"| {r['round']} | {r['relay']} | {r['tls']} | {r['sink']} | {r['messages']} | {fmt(r.get('rate'), 0)} "
          f"| {fmt(r.get('seconds'), 2)} | {r['accept_rate']:.0f} | {cpu} | {r['peak_rss_mib']:.1f} "
          f"| {r['peak_pss_mib']:.1f} | {busy} | {r['problems']} |")

print()
print("Medians:")
print("| relay | outbound TLS | relayed msg/s | accepted msg/s | CPU s / 1000 msg | peak RSS MiB | peak PSS MiB |")
print("|---|---|---|---|---|---|---|")
medians = {}
for key in sorted({(r["tls"], r["relay"]) for r in rows}, key=order):
    done = [r for r in rows if (r["tls"], r["relay"]) == key and "rate" in r]
    if not done:
        continue
    m = {f: statistics.median(r[f] for r in done)
         for f in ("rate", "accept_rate", "cpu_per_1000", "peak_rss_mib", "peak_pss_mib")}
    medians[key] = m
    print(f"| {key[1]} | {key[0]} | {m['rate']:.0f} | {m['accept_rate']:.0f} | {m['cpu_per_1000']:.3f} "
          f"| {m['peak_rss_mib']:.1f} | {m['peak_pss_mib']:.1f} |")

print()
for tls in sorted({k[0] for k in medians}, key=lambda t: (t != "none", t)):
    a, b = medians.get((tls, "postilion")), medians.get((tls, "postfix"))
    if a and b:
        print(f"Postilion / Postfix, outbound TLS {tls}: relayed msg/s x{a['rate'] / b['rate']:.2f}, "
              f"accepted msg/s x{a['accept_rate'] / b['accept_rate']:.2f}, "
              f"CPU per message x{a['cpu_per_1000'] / b['cpu_per_1000']:.2f}, "
              f"peak RSS x{a['peak_rss_mib'] / b['peak_rss_mib']:.2f}, "
              f"peak PSS x{a['peak_pss_mib'] / b['peak_pss_mib']:.2f}")
for r in rows:
    if r["status"] != "ok" or r["sink_messages"] != r["accepted"] or r["accepted"] != r["messages"]:
        print(f"note: round {r['round']} {r['relay']} tls={r['tls']}: status {r['status']}, "
              f"loadgen got {r['accepted']} of {r['messages']} acceptances, the sink {r['sink_messages']} messages")
PY
