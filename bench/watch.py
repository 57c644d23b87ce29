#!/usr/bin/env python3
"""Helper of the benchmark scripts: CPU readings from cgroups, memory sampling of the server
under test, and knowing when a run is complete.

`watch.py --messages M ...` (bench/relay.sh) reads the running counters that `smtp-sink -c`
(or bench/loadgen's tls-sink, in the same format) writes to its standard output: one
"sess=N quit=N mesg=N" record per event, each ended by a carriage return. Then:

- when `mesg` first reaches --messages, writes the wall-clock time and the relay's CPU time
  (from its cgroup) to the --done file, atomically;
- meanwhile samples, every --interval seconds, the processes in the relay's cgroup: the sum
  of their resident set sizes (VmRSS) and of their proportional set sizes (Pss, which
  splits pages shared between processes), keeping the peak of each sum;
- at the end of its input (the sink was stopped) writes the final counters and the peaks to
  the --out file as JSON.

`watch.py store ...` (bench/compare.sh) samples memory the same way and counts the files in
the Maildir `new/` directories matching --maildirs; when the count first reaches the number
in --target-file (which the script may lower once it knows how many messages were accepted),
it writes the time, the count and the CPU readings to the --done file. On SIGTERM it writes
the peaks and the last count to --out and exits.

`watch.py count GLOB` prints the number of files in the directories matching GLOB.

CPU readings (at --done, and from `cpu RELAY_CGROUP HARNESS_CGROUP [PATH]`, which the scripts
use just before the load starts) give the CPU time of the server's cgroup and of the
harness's (loadgen, the sink, this watcher), in nanoseconds, and the busy time of the whole
machine from /proc/stat, so that CPU used by anything else during a run can be reported;
with a path (`--disk-path` in store mode), also the write counters of the disk holding it
(/proc/diskstats: the whole machine's writes to that disk).
"""

import argparse
import glob
import json
import os
import re
import signal
import sys
import threading
import time

RECORD = re.compile(rb"sess=(\d+) quit=(\d+) mesg=(\d+)")


def cgroup_cpu(cgroup):
    """CPU time charged to the cgroup so far, also for processes that have exited: cgroup v1
    cpuacct (usage in nanoseconds, the user/system split from cpuacct.usage_user/_sys) or
    cgroup v2 cpu.stat (microseconds)."""
    if os.path.exists(os.path.join(cgroup, "cpuacct.usage")):

        def read(name):
            with open(os.path.join(cgroup, name)) as f:
                return int(f.read().strip())

        return {
            "total_ns": read("cpuacct.usage"),
            "user_ns": read("cpuacct.usage_user"),
            "system_ns": read("cpuacct.usage_sys"),
        }
    stat = {}
    with open(os.path.join(cgroup, "cpu.stat")) as f:
        for line in f:
            key, value = line.split()
            stat[key] = int(value)
    return {
        "total_ns": stat["usage_usec"] * 1000,
        "user_ns": stat["user_usec"] * 1000,
        "system_ns": stat["system_usec"] * 1000,
    }


def machine_busy_ns():
    """CPU time the whole machine spent busy (all CPUs), from the first line of /proc/stat,
    leaving out niced work, which yields to ours: user, system, irq, softirq and steal."""
    with open("/proc/stat") as f:
        fields = [int(v) for v in f.readline().split()[1:9]]
    # user nice system idle iowait irq softirq steal (guest time is already in user and nice)
    busy = fields[0] + fields[2] + sum(fields[5:8])
    return busy * 1_000_000_000 // os.sysconf("SC_CLK_TCK")


def disk_writes(path):
    """Write counters of the block device holding path, from /proc/diskstats (the whole
    machine's writes to it): sectors of 512 octets written, write requests completed, and
    flush requests completed (0 on kernels that do not count them)."""
    device = os.stat(path).st_dev
    with open("/proc/diskstats") as f:
        for line in f:
            fields = line.split()
            if (int(fields[0]), int(fields[1])) == (os.major(device), os.minor(device)):
                return {
                    "sectors_written": int(fields[9]),
                    "writes": int(fields[7]),
                    "flushes": int(fields[18]) if len(fields) > 18 else 0,
                }
    return None


def readings(relay_cgroup, harness_cgroup, disk_path=None):
    result = {
        "relay": cgroup_cpu(relay_cgroup),
        "harness": cgroup_cpu(harness_cgroup),
        "machine_busy_ns": machine_busy_ns(),
    }
    if disk_path:
        result["disk"] = disk_writes(disk_path)
    return result


def memory_of(pid):
    """(VmRSS, Pss) of a process in KiB; zeros if it has gone."""
    rss = pss = 0
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    rss = int(line.split()[1])
                    break
        with open(f"/proc/{pid}/smaps_rollup") as f:
            for line in f:
                if line.startswith("Pss:"):
                    pss = int(line.split()[1])
                    break
    except (OSError, ValueError, IndexError):
        pass
    return rss, pss


class Sampler(threading.Thread):
    def __init__(self, cgroup, interval):
        super().__init__(daemon=True)
        self.cgroup = cgroup
        self.interval = interval
        self.stop = threading.Event()
        self.peak_rss_kib = 0
        self.peak_pss_kib = 0
        self.peak_processes = 0
        self.samples = 0

    def sample(self):
        try:
            with open(os.path.join(self.cgroup, "cgroup.procs")) as f:
                pids = [int(line) for line in f if line.strip()]
        except OSError:
            return
        rss = pss = 0
        for pid in pids:
            r, p = memory_of(pid)
            rss += r
            pss += p
        self.peak_rss_kib = max(self.peak_rss_kib, rss)
        self.peak_pss_kib = max(self.peak_pss_kib, pss)
        self.peak_processes = max(self.peak_processes, len(pids))
        self.samples += 1

    def run(self):
        while not self.stop.is_set():
            self.sample()
            self.stop.wait(self.interval)


def write_atomically(path, data):
    temporary = f"{path}.tmp"
    with open(temporary, "w") as f:
        json.dump(data, f)
    os.replace(temporary, path)


def watch(args):
    sampler = Sampler(args.cgroup, args.interval)
    sampler.start()
    counters = (0, 0, 0)
    done = False
    pending = b""
    stdin = sys.stdin.buffer.raw
    while True:
        chunk = stdin.read(65536)
        if not chunk:
            break
        pending += chunk
        records = pending.split(b"\r")
        pending = records.pop()
        for record in reversed(records):
            match = RECORD.search(record)
            if match:
                counters = tuple(int(g) for g in match.groups())
                break
        if not done and counters[2] >= args.messages:
            done = True
            now = time.time()
            write_atomically(
                args.done, {"time": now, "cpu": readings(args.cgroup, args.harness), "mesg": counters[2]}
            )
    sampler.stop.set()
    sampler.join()
    match = RECORD.search(pending)
    if match:
        counters = tuple(int(g) for g in match.groups())
    write_atomically(
        args.out,
        {
            "sessions": counters[0],
            "quits": counters[1],
            "messages": counters[2],
            "peak_rss_kib": sampler.peak_rss_kib,
            "peak_pss_kib": sampler.peak_pss_kib,
            "peak_processes": sampler.peak_processes,
            "samples": sampler.samples,
        },
    )


def count_files(pattern):
    """Files in the directories matching the glob pattern (Maildir new/ directories)."""
    total = 0
    for directory in glob.glob(pattern):
        try:
            total += len(os.listdir(directory))
        except OSError:
            pass
    return total


def read_target(path):
    try:
        with open(path) as f:
            return int(f.read().strip() or 0)
    except (OSError, ValueError):
        return None


def store(args):
    """Memory sampling and Maildir counting until SIGTERM (see the module's doc)."""
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    signal.signal(signal.SIGINT, lambda *_: stop.set())
    sampler = Sampler(args.cgroup, args.interval)
    sampler.start()
    count = 0
    done = False
    while not stop.is_set():
        if not done:
            target = read_target(args.target_file)
            if target is not None:
                count = count_files(args.maildirs) if args.maildirs else 0
                if count >= target:
                    done = True
                    write_atomically(
                        args.done,
                        {
                            "time": time.time(),
                            "cpu": readings(args.cgroup, args.harness, args.disk_path),
                            "count": count,
                        },
                    )
        stop.wait(args.poll)
    sampler.stop.set()
    sampler.join()
    if args.maildirs:
        count = count_files(args.maildirs)
    write_atomically(
        args.out,
        {
            "count": count,
            "peak_rss_kib": sampler.peak_rss_kib,
            "peak_pss_kib": sampler.peak_pss_kib,
            "peak_processes": sampler.peak_processes,
            "samples": sampler.samples,
        },
    )


def main():
    if len(sys.argv) in (4, 5) and sys.argv[1] == "cpu":
        print(json.dumps(readings(*sys.argv[2:])))
        return
    if len(sys.argv) == 3 and sys.argv[1] == "count":
        print(count_files(sys.argv[2]))
        return
    if len(sys.argv) > 1 and sys.argv[1] == "store":
        parser = argparse.ArgumentParser(description="memory sampling and Maildir counting")
        parser.add_argument("--cgroup", required=True, help="the server's cgroup")
        parser.add_argument("--harness", required=True, help="the cgroup of loadgen and this")
        parser.add_argument("--maildirs", default="", help="glob of Maildir new/ directories")
        parser.add_argument("--target-file", required=True, help="holds the count to wait for")
        parser.add_argument("--done", required=True)
        parser.add_argument("--out", required=True)
        parser.add_argument("--interval", type=float, default=0.1, help="memory sampling")
        parser.add_argument("--poll", type=float, default=0.2, help="Maildir counting")
        parser.add_argument("--disk-path", help="also read the write counters of this path's disk")
        store(parser.parse_args(sys.argv[2:]))
        return
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--messages", type=int, required=True)
    parser.add_argument("--cgroup", required=True, help="the relay's cgroup")
    parser.add_argument("--harness", required=True, help="the cgroup of loadgen, the sink and this")
    parser.add_argument("--done", required=True)
    parser.add_argument("--out", required=True)
    parser.add_argument("--interval", type=float, default=0.1)
    watch(parser.parse_args())


if __name__ == "__main__":
    main()
