#!/usr/bin/env bash
# Accepting mail side by side: the same loads against Postilion, a private Postfix and
# Postfix's smtp-sink (which stores nothing: the protocol ceiling), alternating, a few rounds.
# Postilion and Postfix both keep a durable queue (fsync before every 250) and deliver to
# Maildirs while they accept; the run waits until every accepted message is in its Maildir.
# Reports accepted msg/s (loadgen), end-of-data latency, CPU seconds per 1000 messages
# (cgroup accounting), peak RSS and PSS, medians over the rounds, and the ratios against the
# targets. Method and caveats: bench/README.md; figures: BENCHMARKS.md.
#
# Usage: bench/compare.sh [data-dir-parent]   (default: target/, on the disk; never tmpfs)
#
# Settings (environment):
#   COMPARE_ROUNDS=3        rounds; each runs every load against every server once
#   COMPARE_LOADS="1024:50:20000 1024:1:3000 102400:10:3000"
#                           loads as size:sessions:messages (pipelining, one recipient)
#   COMPARE_SERVERS="postilion postfix smtp-sink"
#                           the order rotates each round, so each goes first in turn
#   COMPARE_DELIVERY_TIMEOUT=300  seconds to wait, after the load, for the Maildirs to fill
#   COMPARE_POSTFIX_MAIN_CF=      extra main.cf lines for Postfix, for experiments only
#   COMPARE_QUIET=25        before each run, wait until the machine is less than this % busy
#   COMPARE_QUIET_WAIT=120  ... for at most this many seconds; 0 does not wait
#   COMPARE_KEEP=0          1: keep the work directory (configs, logs, Maildirs, results)
#   POSTILION_BIN, LOADGEN_BIN, TLS_SINK_BIN   use these instead of building target/release
set -euo pipefail
cd "$(dirname "$0")/.."
repo=$PWD
. bench/lib.sh

rounds=${COMPARE_ROUNDS:-3}
loads=${COMPARE_LOADS:-1024:50:20000 1024:1:3000 102400:10:3000}
servers=${COMPARE_SERVERS:-postilion postfix smtp-sink}
delivery_timeout=${COMPARE_DELIVERY_TIMEOUT:-300}
quiet=${COMPARE_QUIET:-25}
quiet_wait=${COMPARE_QUIET_WAIT:-120}
keep=${COMPARE_KEEP:-0}
domain=bench.test
recipient=user@$domain
# Postilion's default limits.message_size (25 MiB); Postfix gets the same.
message_size=26214400

bench_need_root "Postfix instance, smtp-sink, cgroups"
bench_install_postfix
bench_cgroup_root
bench_workdir "$repo" compare "${1:-}"
results=$work/results.tsv
: >"$results"
nobody_uid=$(id -u nobody)
nobody_gid=$(id -g nobody)

cg= harness= server_pid= watch_pid= postfix_etc=
stop_server() {
  if [ -n "$server_pid" ]; then kill -TERM "$server_pid" 2>/dev/null || true; wait "$server_pid" 2>/dev/null || true; server_pid=; fi
  bench_stop_postfix
}
stop_watch() {
  if [ -n "$watch_pid" ]; then kill -TERM "$watch_pid" 2>/dev/null || true; wait "$watch_pid" 2>/dev/null || true; watch_pid=; fi
}
cleanup() {
  stop_server; stop_watch; bench_remove_cgroup "$cg"; bench_remove_cgroup "$harness"
  if [ "$keep" = 1 ]; then echo "work directory kept: $work" >&2; else rm -rf "$work"; fi
}
trap cleanup EXIT

# CPU readings, and the write counters of the disk under the work directory.
cpu_now() { python3 "$repo/bench/watch.py" cpu "$cg" "$harness" "$work"; }

# Postilion as in bench/accept.sh, on its defaults (durable spool, 4 delivery workers, Maildir
# delivery, 25 MiB messages), apart from: a plaintext listener on a free port, the local
# domain, a per-address connection limit above the load's sessions, and user = "nobody", so
# that it runs unprivileged as Postfix's daemons do. Sets port and maildirs.
start_postilion() { # run-dir
  local run=$1
  bench_postilion_config "$run/postilion.toml" "$run/data" "$domain" nobody
  ( echo "$BASHPID" >"$cg/cgroup.procs"; exec "$postilion" serve --config "$run/postilion.toml" ) \
    >"$run/stdout" 2>"$run/log" &
  server_pid=$!
  for _ in $(seq 100); do grep -q "^data directory" "$run/stdout" 2>/dev/null && break; sleep 0.1; done
  port=$(sed -n 's/^listening on 127.0.0.1:\([0-9]*\).*/\1/p' "$run/stdout")
  [ -n "$port" ] || { cat "$run/log" >&2; bench_die "postilion did not start"; }
  maildirs="$run/data/maildir/*/new"
}

# A private Postfix instance (bench/lib.sh) that accepts mail for $domain as virtual
# mailboxes, Maildirs delivered by Postfix's "virtual" agent as nobody; the same message size
# limit as Postilion. Sets port and maildirs.
start_postfix() { # run-dir
  local run=$1
  port=$(bench_free_port 127.0.0.1)
  mkdir -p "$run/postfix/mail"
  chown "$nobody_uid:$nobody_gid" "$run/postfix/mail"
  bench_postfix_config "$run/postfix" "$port" "mx.$domain" "\
message_size_limit = $message_size
virtual_mailbox_domains = $domain
virtual_mailbox_base = $run/postfix/mail
virtual_mailbox_maps = texthash:$run/postfix/etc/mailboxes
virtual_uid_maps = static:$nobody_uid
virtual_gid_maps = static:$nobody_gid
${COMPARE_POSTFIX_MAIN_CF:-}"
  # The mailbox the load sends to; a trailing slash makes it a Maildir. (The virtual agent
  # does not allow regular expression substitution, so every mailbox is listed.) Any other
  # recipient is refused at RCPT.
  printf '%s %s/\n' "$recipient" "${recipient%@*}" >"$run/postfix/etc/mailboxes"
  bench_start_postfix "$run/postfix" "$cg"
  maildirs="$run/postfix/mail/*/new"
}

# smtp-sink answers every command at once and throws the messages away (no -c: no counter
# writes). It offers PIPELINING.
start_smtp-sink() { # run-dir
  local run=$1
  port=$(bench_free_port 127.0.0.1)
  ( echo "$BASHPID" >"$cg/cgroup.procs"; exec smtp-sink -u nobody "127.0.0.1:$port" 1024 ) \
    >"$run/stdout" 2>"$run/log" &
  server_pid=$!
  bench_wait_listening "$port" || bench_die "smtp-sink did not start"
  maildirs=
}

# One measured run: fresh directories and server, the load, then the wait for delivery;
# appends a line to $results.
run_once() { # round server size sessions messages
  local round=$1 server=$2 size=$3 sessions=$4 messages=$5
  bench_wait_for_quiet "$quiet" "$quiet_wait"
  local run=$work/$round-$server-$size-$sessions
  mkdir -p "$run"
  chmod 0711 "$run"
  cg=$cgroup_root/postilion-compare-bench-$$-$round-$server-$size-$sessions
  harness=$cg-harness
  mkdir "$cg" "$harness"
  "start_$server" "$run"
  sleep 1 # let start-up work settle before the CPU reading

  # The watcher counts the Maildir files until they reach the number in $run/target; it
  # starts with every message and is lowered to loadgen's acceptances if some failed.
  [ -n "$maildirs" ] && echo "$messages" >"$run/target"
  ( echo "$BASHPID" >"$harness/cgroup.procs"
    exec python3 "$repo/bench/watch.py" store --cgroup "$cg" --harness "$harness" --maildirs "$maildirs" \
      --target-file "$run/target" --done "$run/done.json" --out "$run/watch.json" --disk-path "$work" ) &
  watch_pid=$!

  local cpu0 cpu1 t0 t1 load status=ok at_end=0
  cpu0=$(cpu_now)
  t0=$EPOCHREALTIME
  load=$( ( echo "$BASHPID" >"$harness/cgroup.procs"
    exec "$loadgen" --server "127.0.0.1:$port" --sessions "$sessions" --messages "$messages" \
      --size "$size" --to "$recipient" --pipelining --json ) 2>"$run/loadgen.err") || status=loadgen-failed
  t1=$EPOCHREALTIME
  cpu1=$(cpu_now)
  local accepted
  accepted=$(python3 -c 'import json, sys; print(json.loads(sys.argv[1] or "{}").get("ok", 0))' "$load")
  if [ -n "$maildirs" ]; then
    at_end=$(python3 "$repo/bench/watch.py" count "$maildirs")
    [ "$accepted" -lt "$messages" ] && echo "$accepted" >"$run/target"
    local deadline=$((SECONDS + delivery_timeout))
    until [ -s "$run/done.json" ]; do
      if [ "$SECONDS" -ge "$deadline" ]; then status=delivery-timeout; break; fi
      if [ "$server" = postilion ] && ! kill -0 "$server_pid" 2>/dev/null; then status=server-exited; break; fi
      sleep 0.05
    done
  fi
  # Peak RSS of the Postilion process as the kernel counted it (VmHWM): a cross-check of the
  # sampled figure.
  local hwm=0
  if [ "$server" = postilion ]; then hwm=$(awk '/^VmHWM:/ {print $2}' "/proc/$server_pid/status" 2>/dev/null || echo 0); fi
  # Late duplicates would show in the final count; give the server a moment.
  sleep 1
  local left=
  if [ "$server" = postfix ]; then
    left=$(find "$run/postfix/spool/"{maildrop,incoming,active,deferred,hold} -type f 2>/dev/null | wc -l)
  fi
  stop_server
  stop_watch
  bench_remove_cgroup "$cg"; bench_remove_cgroup "$harness"; cg= harness=

  local problems=
  case $server in
    postilion) problems=$(bench_log_problems postilion "$run/log") ;;
    postfix) problems=$(bench_log_problems postfix "$run/postfix/maillog") ;;
  esac
  if [ -n "$problems" ]; then
    echo "round $round $server ${size}x$sessions: $(echo "$problems" | wc -l) warning/error log lines, first ones:" >&2
    head -5 <<<"$problems" >&2
  fi
  [ "$status" = ok ] || { echo "round $round $server ${size}x$sessions: $status; loadgen said:" >&2; tail -3 "$run/loadgen.err" >&2; }
  python3 - "$round" "$server" "$size" "$sessions" "$messages" "$status" "$t0" "$t1" "$cpu0" "$cpu1" \
    "$load" "$run" "$hwm" "$(echo -n "$problems" | grep -c . || true)" "${left:-}" "$at_end" \
    "$( [ -n "$maildirs" ] && echo 1 || echo 0)" "$(nproc)" >>"$results" <<'PY'
import json, sys
(round_, server, size, sessions, messages, status, t0, t1, cpu0, cpu1, load, run, hwm, problems, left,
 at_end, stores, cpus) = sys.argv[1:]
messages, cpus, stores = int(messages), int(cpus), stores == "1"
t0, t1 = float(t0), float(t1)
cpu0, cpu1 = json.loads(cpu0), json.loads(cpu1)
load = json.loads(load) if load.strip() else {}
watch = json.load(open(f"{run}/watch.json"))
try:
    done = json.load(open(f"{run}/done.json"))
except OSError:
    done = None
row = {
    "round": int(round_), "server": server, "size": int(size), "sessions": int(sessions),
    "messages": messages, "status": status, "accepted": load.get("ok", 0),
    "accept_rate": load.get("messages_per_second", 0.0), "load_seconds": load.get("seconds"),
    "p50_ms": float(load.get("p50_ms", 0)), "p99_ms": float(load.get("p99_ms", 0)),
    "p999_ms": float(load.get("p999_ms", 0)), "errors": load.get("errors", 0),
    "stores": stores, "delivered_at_load_end": int(at_end) if stores else None,
    "delivered": watch["count"] if stores else None, "problems": int(problems or 0),
    "left_in_queue": int(left) if left else None,
    "peak_rss_mib": watch["peak_rss_kib"] / 1024, "peak_pss_mib": watch["peak_pss_kib"] / 1024,
    "hwm_mib": int(hwm or 0) / 1024, "processes": watch["peak_processes"],
}

def window(cpu_a, cpu_b, seconds, prefix):
    server_cpu = {k: cpu_b["relay"][k] - cpu_a["relay"][k] for k in cpu_a["relay"]}
    harness_ns = cpu_b["harness"]["total_ns"] - cpu_a["harness"]["total_ns"]
    machine_ns = cpu_b["machine_busy_ns"] - cpu_a["machine_busy_ns"]
    n = max(1, row["accepted"])
    row.update({
        f"{prefix}seconds": seconds,
        f"{prefix}cpu_per_1000": server_cpu["total_ns"] / 1e9 / n * 1000,
        f"{prefix}user_per_1000": server_cpu["user_ns"] / 1e9 / n * 1000,
        f"{prefix}system_per_1000": server_cpu["system_ns"] / 1e9 / n * 1000,
        f"{prefix}server_share": server_cpu["total_ns"] / 1e9 / seconds / cpus,
        f"{prefix}harness_share": harness_ns / 1e9 / seconds / cpus,
        # Busy CPU charged to neither: other work on the machine.
        f"{prefix}others_share": max(0, machine_ns - server_cpu["total_ns"] - harness_ns) / 1e9 / seconds / cpus,
    })
    # Everything written to the disk in the window (by anyone), per message.
    if cpu_a.get("disk") and cpu_b.get("disk"):
        row[f"{prefix}disk_kib_per_msg"] = (cpu_b["disk"]["sectors_written"] - cpu_a["disk"]["sectors_written"]) / 2 / n
        row[f"{prefix}disk_flushes_per_msg"] = (cpu_b["disk"]["flushes"] - cpu_a["disk"]["flushes"]) / n

# The acceptance window (the load), and the whole job: until the last accepted message was in
# its Maildir (for smtp-sink, which stores nothing, the same as the load).
window(cpu0, cpu1, t1 - t0, "accept_")
if not stores:
    window(cpu0, cpu1, t1 - t0, "")
elif done:
    window(cpu0, done["cpu"], done["time"] - t0, "")
    row["delivery_lag"] = max(0.0, done["time"] - t1)
    row["delivered_rate"] = row["accepted"] / (done["time"] - t0)
print(json.dumps(row))
msg = (f"round {round_} {server:9} {int(size):6} B x {int(sessions):2}: accepted {row['accepted']}/{messages} "
       f"at {row['accept_rate']:.0f} msg/s, p50 {row['p50_ms']:.2f} ms, p99 {row['p99_ms']:.2f} ms")
if stores:
    msg += f"; in Maildirs {row['delivered_at_load_end']} at the load's end, {row['delivered']} in all"
    if "delivery_lag" in row:
        msg += f" ({row['delivery_lag']:.2f} s later)"
if "cpu_per_1000" in row:
    msg += (f"; CPU {row['cpu_per_1000']:.3f} s/1000 msg; peak RSS {row['peak_rss_mib']:.1f} MiB, "
            f"PSS {row['peak_pss_mib']:.1f} MiB; CPU busy: server {row['server_share']:.0%}, "
            f"harness {row['harness_share']:.0%}, others {row['others_share']:.0%}")
print(msg, file=sys.stderr)
PY
}

echo "compare: $rounds rounds; loads (size:sessions:messages) $loads; servers $servers; $(nproc) CPUs" >&2
echo "postilion $postilion_version; $(/usr/sbin/postconf -d -h mail_version | sed 's/^/postfix /')" >&2
for round in $(seq "$rounds"); do
  # Rotate the servers' order each round, so that none always runs first (on a fresher
  # machine) or last.
  read -r -a order <<<"$servers"
  shift_by=$(( (round - 1) % ${#order[@]} ))
  order=("${order[@]:shift_by}" "${order[@]:0:shift_by}")
  for load in $loads; do
    IFS=: read -r size sessions messages <<<"$load"
    for server in "${order[@]}"; do run_once "$round" "$server" "$size" "$sessions" "$messages"; done
  done
done

python3 - "$results" "$postilion_version" <<'PY'
import json, statistics, sys
rows = [json.loads(line) for line in open(sys.argv[1]) if line.strip()]
SERVERS = ["postilion", "postfix", "smtp-sink"]
# (size, sessions): (minimum Postilion/Postfix, minimum Postilion/smtp-sink)
TARGETS = {(1024, 50): (4.0, 0.5), (1024, 1): (2.0, None), (102400, 10): (3.0, None)}

def fmt(value, digits):
    return "-" if value is None else f"{value:.{digits}f}"

def size_name(size):
    return f"{size // 1024} KiB" if size % 1024 == 0 else f"{size} B"

loads = []  # in the order they ran
for r in rows:
    if (r["size"], r["sessions"]) not in loads:
        loads.append((r["size"], r["sessions"]))

def order(r):
    return (loads.index((r["size"], r["sessions"])), SERVERS.index(r["server"]), r["round"])

print("| load | server | round | accepted | msg/s (loadgen) | p50 ms | p99 ms | in Maildirs at the load's end "
      "| all in Maildirs after | CPU s / 1000 msg (user + sys) | peak RSS MiB | peak PSS MiB "
      "| CPU busy: server / harness / others | log warnings |")
print("|---|---|---|---|---|---|---|---|---|---|---|---|---|---|")
for r in sorted(rows, key=order):
    cpu = (f"{r['cpu_per_1000']:.3f} ({r['user_per_1000']:.3f} + {r['system_per_1000']:.3f})"
           if "cpu_per_1000" in r else "-")
    busy = (f"{r['server_share']:.0%} / {r['harness_share']:.0%} / {r['others_share']:.0%}"
            if "server_share" in r else "-")
    at_end = "-" if not r["stores"] else f"{r['delivered_at_load_end']} ({r['delivered_at_load_end'] / max(1, r['accepted']):.0%})"
    lag = "-" if not r["stores"] else (f"+{r['delivery_lag']:.1f} s" if "delivery_lag" in r else "never")
    print(f"| {size_name(r['size'])} x {r['sessions']} | {r['server']} | {r['round']} | {r['accepted']}/{r['messages']} "
          f"| {r['accept_rate']:.0f} | {r['p50_ms']:.2f} | {r['p99_ms']:.2f} | {at_end} | {lag} | {cpu} "
          f"| {r['peak_rss_mib']:.1f} | {r['peak_pss_mib']:.1f} | {busy} | {r['problems']} |")

print()
print("Medians over the rounds:")
print()
print("| load | server | msg/s (loadgen) | p50 ms | p99 ms | delivery lag s | CPU s / 1000 msg | CPU s / 1000 msg during the load "
      "| peak RSS MiB | peak PSS MiB | disk KiB written / msg | disk flushes / msg |")
print("|---|---|---|---|---|---|---|---|---|---|---|---|")
medians = {}
for load in loads:
    for server in SERVERS:
        done = [r for r in rows if (r["size"], r["sessions"]) == load and r["server"] == server and r["status"] == "ok"]
        if not done:
            continue
        def med(field):
            values = [r[field] for r in done if r.get(field) is not None]
            return statistics.median(values) if values else None
        m = {f: med(f) for f in ("accept_rate", "p50_ms", "p99_ms", "delivery_lag", "cpu_per_1000",
                                  "accept_cpu_per_1000", "peak_rss_mib", "peak_pss_mib",
                                  "disk_kib_per_msg", "disk_flushes_per_msg")}
        medians[(load, server)] = m
        print(f"| {size_name(load[0])} x {load[1]} | {server} | {m['accept_rate']:.0f} | {m['p50_ms']:.2f} "
              f"| {m['p99_ms']:.2f} | {fmt(m['delivery_lag'], 2)} | {fmt(m['cpu_per_1000'], 3)} "
              f"| {fmt(m['accept_cpu_per_1000'], 3)} | {m['peak_rss_mib']:.1f} | {m['peak_pss_mib']:.1f} "
              f"| {fmt(m['disk_kib_per_msg'], 1)} | {fmt(m['disk_flushes_per_msg'], 2)} |")

print()
print("Ratios of the medians (msg/s), against the targets:")
print()
print("| load | Postilion / Postfix | target | Postilion / smtp-sink | target | "
      "CPU per message, Postilion / Postfix | peak PSS, Postilion / Postfix |")
print("|---|---|---|---|---|---|---|")
for load in loads:
    p, f, s = (medians.get((load, x)) for x in SERVERS)
    if not p:
        continue
    want_f, want_s = TARGETS.get(load, (None, None))
    def verdict(ratio, want):
        if want is None or ratio is None:
            return "-"
        return f">= {want:g}: {'met' if ratio >= want else 'NOT met'}"
    rf = p["accept_rate"] / f["accept_rate"] if f else None
    rs = p["accept_rate"] / s["accept_rate"] if s else None
    cpu = p["cpu_per_1000"] / f["cpu_per_1000"] if f and p["cpu_per_1000"] and f["cpu_per_1000"] else None
    pss = p["peak_pss_mib"] / f["peak_pss_mib"] if f else None
    print(f"| {size_name(load[0])} x {load[1]} | {fmt(rf, 2)} | {verdict(rf, want_f)} | {fmt(rs, 2)} "
          f"| {verdict(rs, want_s)} | {fmt(cpu, 3)} | {fmt(pss, 2)} |")

print()
print(f"postilion {sys.argv[2]}")
for r in rows:
    problems = []
    if r["status"] != "ok":
        problems.append(f"status {r['status']}")
    if r["accepted"] != r["messages"]:
        problems.append(f"loadgen got {r['accepted']} acceptances of {r['messages']}")
    if r["stores"] and r["delivered"] != r["accepted"]:
        problems.append(f"{r['delivered']} messages in Maildirs for {r['accepted']} accepted")
    if r.get("left_in_queue"):
        problems.append(f"{r['left_in_queue']} files left in Postfix's queue")
    if problems:
        print(f"note: round {r['round']} {r['server']} {r['size']} B x {r['sessions']}: " + "; ".join(problems))
PY
