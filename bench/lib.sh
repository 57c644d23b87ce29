# Shared by the benchmark scripts that run servers side by side (relay.sh, compare.sh,
# idle.sh): installing Postfix, the binaries under test, cgroups for CPU accounting, waiting
# for a quiet machine, and private Postfix instances. Source it; it defines functions and
# sets nothing else until they are called. Messages are prefixed with the script's name.

bench_name=${0##*/}

bench_die() { echo "$bench_name: $*" >&2; exit 1; }

bench_need_root() {
  [ "$(id -u)" -eq 0 ] || bench_die "needs root (${1:-private server instances, cgroups})"
}

# Postfix (and smtp-sink, which comes with it), installed without a system configuration
# ("No configuration" leaves no /etc/postfix/main.cf); every instance here has its own. A
# running system instance is stopped: it would compete for the CPU and the disk.
bench_install_postfix() {
  if [ ! -x /usr/sbin/postfix ] || ! command -v smtp-sink >/dev/null; then
    echo "postfix postfix/main_mailer_type select No configuration" | debconf-set-selections
    DEBIAN_FRONTEND=noninteractive apt-get update -qq >/dev/null
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends \
      -o Dpkg::Options::=--force-confdef -o Dpkg::Options::=--force-confold postfix >/dev/null
  fi
  if [ -f /etc/postfix/main.cf ] && /usr/sbin/postfix status >/dev/null 2>&1; then
    /usr/sbin/postfix stop >/dev/null 2>&1 || true
  fi
  if command -v systemctl >/dev/null 2>&1 && [ -d /run/systemd/system ]; then
    systemctl disable --now --quiet postfix.service >/dev/null 2>&1 || true
  fi
}

# Makes the run's work directory, $work, under parent (default: the repository's target/,
# on the disk), and its bin/ with the binaries under test (bench_binaries). Unprivileged
# daemons (Postfix's, Postilion as nobody) open files in it by absolute path: 0711.
bench_workdir() { # repo name [parent]
  local repo=$1 name=$2 parent=${3:-$1/target}
  work=$(mktemp -d "$parent/bench-$name.XXXXXX")
  chmod 0711 "$work"
  mkdir "$work/bin"
  chmod 0755 "$work/bin"
  bench_binaries "$repo" "$work/bin"
}

# Sets postilion, loadgen and tls_sink to the binaries under test: POSTILION_BIN, LOADGEN_BIN
# and TLS_SINK_BIN if set, else a release build of the working tree, copied into dir first,
# so that a rebuild of target/ during a long run cannot change them half-way. Also sets
# postilion_version to the commit built and whether crates/ had uncommitted changes.
bench_binaries() { # repo dir
  local repo=$1 dir=$2
  postilion=${POSTILION_BIN:-} loadgen=${LOADGEN_BIN:-} tls_sink=${TLS_SINK_BIN:-}
  if [ -z "$postilion" ] || [ -z "$loadgen" ] || [ -z "$tls_sink" ]; then
    (cd "$repo" && cargo build --release -q -p postilion -p loadgen)
    local bin
    for bin in postilion loadgen tls-sink; do cp "$repo/target/release/$bin" "$dir/$bin"; done
    postilion=${postilion:-$dir/postilion}
    loadgen=${loadgen:-$dir/loadgen}
    tls_sink=${tls_sink:-$dir/tls-sink}
  fi
  postilion_version=$(cd "$repo" && git rev-parse --short HEAD 2>/dev/null || echo unknown)
  if [ -n "$(cd "$repo" && git status --porcelain -- crates 2>/dev/null)" ]; then
    postilion_version="$postilion_version with uncommitted changes in crates/"
  fi
}

# Writes a Postilion configuration as the side-by-side benchmarks run it: its defaults (durable
# spool, Maildir delivery), a plaintext listener on a free loopback port, one local domain,
# a per-address connection limit above any load's sessions; `user` to drop to when started as
# root (empty: none); and extra TOML appended, which must start with a [table] header (it
# follows [local]). Paths with a quote or a backslash are not escaped.
bench_postilion_config() { # file data-dir domain user [extra-toml]
  local file=$1 data=$2 domain=$3 user=$4 extra=${5:-}
  {
    echo "data_dir = \"$data\""
    echo "hostname = \"mx.$domain\""
    [ -z "$user" ] || echo "user = \"$user\""
    cat <<TOML
[[listeners]]
address = "127.0.0.1:0"
tls = "none"
[limits]
connections_per_ip = 1000
[local]
domains = ["$domain"]
$extra
TOML
  } >"$file"
}

# Sets cgroup_root: CPU time is read from cgroups made for each run, which also count
# processes that exit during the run (Postfix daemons come and go). cgroup v1 cpuacct, or v2.
bench_cgroup_root() {
  if [ -f /sys/fs/cgroup/cpuacct/cpuacct.usage ]; then
    cgroup_root=/sys/fs/cgroup/cpuacct
  elif [ -f /sys/fs/cgroup/cgroup.controllers ]; then
    cgroup_root=/sys/fs/cgroup
  else
    bench_die "no cpuacct (v1) or cgroup v2 hierarchy under /sys/fs/cgroup"
  fi
}

# Removes a cgroup made for a run once its processes have gone.
bench_remove_cgroup() { # path
  [ -n "$1" ] && [ -d "$1" ] || return 0
  for _ in $(seq 50); do [ -s "$1/cgroup.procs" ] || break; sleep 0.1; done
  rmdir "$1" 2>/dev/null || echo "$bench_name: cannot remove $1 (processes left: $(tr '\n' ' ' <"$1/cgroup.procs"))" >&2
}

bench_free_port() { # host
  python3 -c 'import socket, sys
s = socket.socket(); s.bind((sys.argv[1], 0)); print(s.getsockname()[1])' "$1"
}

# Waits (at most 5 s) until something listens on the TCP port.
bench_wait_listening() { # port
  for _ in $(seq 100); do ss -Hltn "sport = :$1" | grep -q . && return 0; sleep 0.05; done
  return 1
}

# Percentage of the machine's CPU time that was busy over the next second, niced work (which
# yields to ours) left out.
bench_busy_percent() {
  python3 -c 'import time
def busy():
    f = [int(v) for v in open("/proc/stat").readline().split()[1:9]]
    return f[0] + f[2] + sum(f[5:8]), sum(f)
b0, t0 = busy(); time.sleep(1); b1, t1 = busy()
print(round(100 * (b1 - b0) / max(1, t1 - t0)))'
}

# Other work on the machine (builds, tests) distorts the figures: waits, for at most
# max-seconds (each check takes one second), for the machine to be less than percent busy.
# The scripts report the share of CPU others used during each run anyway.
bench_wait_for_quiet() { # percent max-seconds
  local quiet=$1 quiet_wait=$2 waited=0 busy
  while [ "$waited" -lt "$quiet_wait" ]; do
    busy=$(bench_busy_percent)
    [ "$busy" -lt "$quiet" ] && return 0
    [ "$waited" = 0 ] && echo "machine ${busy}% busy; waiting up to ${quiet_wait}s for it to fall below ${quiet}%" >&2
    waited=$((waited + 1))
  done
  [ "$quiet_wait" -gt 0 ] && echo "machine still ${busy}% busy; running anyway" >&2
  return 0
}

# Writes the configuration of a private Postfix instance under <dir>/etc: its own queue and
# data directories and log file (written by postlogd), smtpd listening only on
# 127.0.0.1:<port>, no DNS lookups, no reverse lookups of clients, loopback in mynetworks.
# Everything else is Postfix's default, including its durable queue (cleanup fsyncs the queue
# file before smtpd answers 250) and its in-flow control. The caller's main.cf lines come
# last. master.cf has the services a relay and a virtual-mailbox server use, none chrooted
# (the master starts a daemon only when it is needed).
bench_postfix_config() { # dir port hostname extra-main.cf-lines
  local dir=$1 port=$2 hostname=$3 extra=$4
  mkdir -p "$dir/etc" "$dir/spool"
  cat >"$dir/etc/main.cf" <<CF
compatibility_level = 3.6
queue_directory = $dir/spool
data_directory = $dir/data
mail_owner = postfix
setgid_group = postdrop
syslog_name = postfix-bench
maillog_file = $dir/maillog
maillog_file_prefixes = $dir
myhostname = $hostname
mydomain = bench.test
myorigin = \$myhostname
mydestination =
relay_domains =
local_recipient_maps =
alias_maps =
alias_database =
biff = no
append_dot_mydomain = no
inet_interfaces = loopback-only
inet_protocols = ipv4
mynetworks = 127.0.0.0/8
smtpd_peername_lookup = no
smtp_dns_support_level = disabled
$extra
CF
  cat >"$dir/etc/master.cf" <<CF
127.0.0.1:$port inet n - n - - smtpd
pickup     unix  n - n 60    1 pickup
cleanup    unix  n - n -     0 cleanup
qmgr       unix  n - n 300   1 qmgr
tlsmgr     unix  - - n 1000? 1 tlsmgr
rewrite    unix  - - n -     - trivial-rewrite
bounce     unix  - - n -     0 bounce
defer      unix  - - n -     0 bounce
trace      unix  - - n -     0 bounce
verify     unix  - - n -     1 verify
flush      unix  n - n 1000? 0 flush
proxymap   unix  - - n -     - proxymap
proxywrite unix  - - n -     1 proxymap
smtp       unix  - - n -     - smtp
relay      unix  - - n -     - smtp
virtual    unix  - n n -     - virtual
showq      unix  n - n -     - showq
error      unix  - - n -     - error
retry      unix  - - n -     - error
discard    unix  - - n -     - discard
anvil      unix  - - n -     1 anvil
scache     unix  - - n -     1 scache
tlsproxy   unix  - - n -     0 tlsproxy
postlog    unix-dgram n - n - 1 postlogd
CF
}

# Starts the instance configured in <dir>/etc inside the cgroup: "postfix start" returns
# once the master listens; the master and every daemon it starts stay in the cgroup. Sets
# postfix_etc for bench_stop_postfix.
bench_start_postfix() { # dir cgroup
  local dir=$1 cgroup=$2
  postfix_etc=$dir/etc
  if ! ( echo "$BASHPID" >"$cgroup/cgroup.procs"; exec /usr/sbin/postfix -c "$postfix_etc" start ) \
    >"$dir/start.out" 2>&1; then
    cat "$dir/start.out" "$dir/maillog" >&2 2>/dev/null
    bench_die "postfix did not start"
  fi
}

# Stops the instance started last (if any) and waits for its master to exit.
bench_stop_postfix() {
  [ -n "${postfix_etc:-}" ] || return 0
  local pid
  pid=$(head -1 "$postfix_etc/../spool/pid/master.pid" 2>/dev/null | tr -d ' ' || true)
  /usr/sbin/postfix -c "$postfix_etc" stop >/dev/null 2>&1 || true
  for _ in $(seq 100); do { [ -n "$pid" ] && kill -0 "$pid" 2>/dev/null; } || break; sleep 0.1; done
  if [ -n "$pid" ] && kill -0 "$pid" 2>/dev/null; then kill -KILL -- "-$pid" 2>/dev/null || true; fi
  postfix_etc=
}

# Warning and error lines of a server's log: Postilion's WARN/ERROR lines, Postfix's
# warning:, error:, fatal:, panic: and deferred or bounced deliveries.
bench_log_problems() { # postilion|postfix log-file
  case $1 in
    postilion) grep -E ' (WARN|ERROR) ' "$2" 2>/dev/null || true ;;
    postfix) grep -E 'warning:|error:|fatal:|panic:|status=(deferred|bounced)' "$2" 2>/dev/null || true ;;
  esac
}
