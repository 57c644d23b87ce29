#!/usr/bin/env python3
"""Client of bench/idle.sh: holds many idle SMTP connections open against a server, measures
the server's memory with and without them, and times fresh sessions while they are held.

1. Baseline: --probes complete sessions (connect, 220, EHLO, MAIL, RCPT, DATA, a 1 KiB
   message, QUIT), one after another, timed; then the server's memory.
2. Opens --connections connections, spread over the --sources addresses (each socket is bound
   to one before connecting), at most --in-flight of them being set up at a time (below the
   server's listen backlog), and waits for each greeting: the server's memory with every
   connection greeted.
3. Sends EHLO on each and waits for its reply: the memory again. The connections are now
   idle, as a client that said EHLO and waits.
4. Holds them --hold seconds without a byte sent (the server's CPU time over that span), then
   runs --probes sessions again from 127.0.0.1, timed, and checks that no held connection was
   closed or sent anything.
5. Closes everything; the memory once more.

Memory is VmRSS (and RssAnon) from /proc/PID/status, Pss from /proc/PID/smaps_rollup, the
kernel's own peak VmHWM, the descriptor count, and the kernel's TCP buffer memory from
/proc/net/sockstat (pages; both ends of every loopback connection are in this kernel).
Every wait has a deadline; the result is one JSON object on standard output, progress on
standard error.
"""

import argparse
import json
import os
import selectors
import socket
import statistics
import sys
import time


def log(message):
    print(f"idle: {message}", file=sys.stderr, flush=True)


def memory(pid):
    result = {}
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            key, _, value = line.partition(":")
            if key in ("VmRSS", "RssAnon", "RssFile", "VmHWM", "Threads"):
                result[key] = int(value.split()[0])
    with open(f"/proc/{pid}/smaps_rollup") as f:
        for line in f:
            if line.startswith("Pss:"):
                result["Pss"] = int(line.split()[1])
    result["fds"] = len(os.listdir(f"/proc/{pid}/fd"))
    with open("/proc/net/sockstat") as f:
        for line in f:
            if line.startswith("TCP:"):
                fields = line.split()[1:]
                stats = dict(zip(fields[::2], (int(v) for v in fields[1::2])))
                result["tcp_inuse"] = stats.get("inuse", 0)
                result["tcp_mem_pages"] = stats.get("mem", 0)
    return result


def cpu_seconds(pid):
    """User and system CPU time of the process (all its threads), in seconds."""
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    ticks = os.sysconf("SC_CLK_TCK")
    return int(fields[11]) / ticks, int(fields[12]) / ticks


class Reader:
    """Reads SMTP replies from a blocking socket with a timeout."""

    def __init__(self, sock):
        self.sock = sock
        self.buffer = b""

    def reply(self):
        lines = []
        while True:
            while b"\r\n" not in self.buffer:
                chunk = self.sock.recv(65536)
                if not chunk:
                    raise ConnectionError(f"closed after {lines!r}")
                self.buffer += chunk
            line, self.buffer = self.buffer.split(b"\r\n", 1)
            lines.append(line)
            if len(line) < 4 or line[3:4] != b"-":
                return int(line[:3]), lines


def probe(address, recipient, message):
    """One complete session, lock-step. Returns (seconds to the greeting, seconds in all,
    seconds from the final "." to its reply)."""
    started = time.perf_counter()
    with socket.create_connection(address, timeout=10) as sock:
        # Every command in its own segment at once, as an SMTP client sends them.
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        reader = Reader(sock)

        def expect(code, command=None):
            if command is not None:
                sock.sendall(command)
            got, lines = reader.reply()
            if got != code:
                raise RuntimeError(f"expected {code}, got {lines!r}")

        expect(220)
        greeted = time.perf_counter()
        expect(250, b"EHLO probe.bench.test\r\n")
        expect(250, b"MAIL FROM:<probe@bench.test>\r\n")
        expect(250, f"RCPT TO:<{recipient}>\r\n".encode())
        expect(354, b"DATA\r\n")
        sock.sendall(message)
        end_of_data = time.perf_counter()
        expect(250, b".\r\n")
        stored = time.perf_counter()
        expect(221, b"QUIT\r\n")
    finished = time.perf_counter()
    return greeted - started, finished - started, stored - end_of_data


def probes(args, address, message, label):
    greeting, total, data = [], [], []
    for _ in range(args.probes):
        g, t, d = probe(address, args.to, message)
        greeting.append(g)
        total.append(t)
        data.append(d)
    result = {
        "greeting_ms_median": 1000 * statistics.median(greeting),
        "greeting_ms_max": 1000 * max(greeting),
        "session_ms_median": 1000 * statistics.median(total),
        "session_ms_max": 1000 * max(total),
        "end_of_data_ms_median": 1000 * statistics.median(data),
        "end_of_data_ms_max": 1000 * max(data),
    }
    log(
        f"{label}: {args.probes} sessions, greeting median {result['greeting_ms_median']:.2f} ms "
        f"(max {result['greeting_ms_max']:.2f}), whole session median {result['session_ms_median']:.2f} ms "
        f"(max {result['session_ms_max']:.2f})"
    )
    return result


def build_message(size):
    head = (
        "From: <probe@bench.test>\r\nTo: <user@bench.test>\r\nSubject: probe\r\n"
        "Message-ID: <probe@bench.test>\r\n\r\n"
    ).encode()
    body = b""
    while len(head) + len(body) < size:
        body += b"x" * 70 + b"\r\n"
    return head + body[: max(0, size - len(head) - 2)] + b"\r\n"


class Held:
    """One held connection and where it is in the greeting and EHLO exchange."""

    __slots__ = ("sock", "buffer", "state")

    def __init__(self, sock):
        self.sock = sock
        self.buffer = b""
        self.state = "connecting"


def open_connections(args, address, deadline):
    """Opens --connections sockets and waits for each greeting. Returns the Held list."""
    selector = selectors.DefaultSelector()
    held = []
    pending = 0
    failures = {}
    sources = args.sources.split(",")
    while len(held) < args.connections or pending:
        if time.monotonic() > deadline:
            raise TimeoutError(f"opening: {len(held)} started, {pending} not greeted yet")
        while pending < args.in_flight and len(held) < args.connections:
            sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            sock.bind((sources[len(held) % len(sources)], 0))
            sock.setblocking(False)
            sock.connect_ex(address)
            conn = Held(sock)
            held.append(conn)
            selector.register(sock, selectors.EVENT_READ, conn)
            pending += 1
        for key, _ in selector.select(timeout=1):
            conn = key.data
            try:
                chunk = conn.sock.recv(4096)
            except (BlockingIOError, InterruptedError):
                continue
            except OSError as error:
                chunk = b""
                failures[error.strerror] = failures.get(error.strerror, 0) + 1
            if not chunk:
                raise ConnectionError(f"connection {held.index(conn)} closed before its greeting ({failures})")
            conn.buffer += chunk
            if conn.buffer.endswith(b"\r\n"):
                if not conn.buffer.startswith(b"220 "):
                    raise RuntimeError(f"unexpected greeting {conn.buffer!r}")
                conn.buffer = b""
                conn.state = "greeted"
                selector.unregister(conn.sock)
                pending -= 1
    selector.close()
    return held


def send_ehlo(held, deadline):
    """EHLO on every connection, at most a window of them waiting at a time."""
    selector = selectors.DefaultSelector()
    index = 0
    waiting = 0
    window = 500
    while index < len(held) or waiting:
        if time.monotonic() > deadline:
            raise TimeoutError(f"EHLO: {index} sent, {waiting} without a reply")
        while waiting < window and index < len(held):
            conn = held[index]
            index += 1
            conn.sock.send(b"EHLO idle.bench.test\r\n")
            conn.state = "ehlo"
            selector.register(conn.sock, selectors.EVENT_READ, conn)
            waiting += 1
        for key, _ in selector.select(timeout=1):
            conn = key.data
            try:
                chunk = conn.sock.recv(4096)
            except (BlockingIOError, InterruptedError):
                continue
            if not chunk:
                raise ConnectionError("a connection closed during EHLO")
            conn.buffer += chunk
            last = conn.buffer.rstrip(b"\r\n").rsplit(b"\r\n", 1)[-1]
            if conn.buffer.endswith(b"\r\n") and last[3:4] == b" ":
                if not last.startswith(b"250"):
                    raise RuntimeError(f"unexpected EHLO reply {conn.buffer!r}")
                conn.buffer = b""
                conn.state = "idle"
                selector.unregister(conn.sock)
                waiting -= 1
    selector.close()


def still_open(held):
    """Held connections the server has neither closed nor written to."""
    selector = selectors.DefaultSelector()
    for conn in held:
        selector.register(conn.sock, selectors.EVENT_READ, conn)
    events = selector.select(timeout=0)
    selector.close()
    return len(held) - len(events)


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--server", required=True, help="host:port")
    parser.add_argument("--pid", type=int, required=True, help="the server's process")
    parser.add_argument("--connections", type=int, default=10000)
    parser.add_argument("--sources", default="127.0.0.2,127.0.0.3,127.0.0.4,127.0.0.5")
    # Below the server's listen backlog: connections beyond it overflow the accept queue and,
    # with SYN cookies, can be left half-open (the client thinks it is connected, the server
    # never sees it) while the client waits for a greeting that never comes.
    parser.add_argument("--in-flight", type=int, default=100)
    parser.add_argument("--probes", type=int, default=20)
    parser.add_argument("--hold", type=float, default=10)
    parser.add_argument("--to", default="user@bench.test")
    parser.add_argument("--timeout", type=float, default=180, help="for opening, and for EHLO")
    args = parser.parse_args()
    host, port = args.server.rsplit(":", 1)
    address = (host, int(port))
    message = build_message(1024)
    result = {"connections": args.connections, "sources": args.sources.split(","), "probes": args.probes}

    result["probes_before"] = probes(args, address, message, "before")
    time.sleep(1)
    result["memory_before"] = memory(args.pid)
    log(f"server before: {result['memory_before']}")

    started = time.monotonic()
    held = open_connections(args, address, started + args.timeout)
    result["open_seconds"] = time.monotonic() - started
    time.sleep(1)
    result["memory_greeted"] = memory(args.pid)
    log(f"{len(held)} greeted in {result['open_seconds']:.1f} s; server: {result['memory_greeted']}")

    started = time.monotonic()
    send_ehlo(held, started + args.timeout)
    result["ehlo_seconds"] = time.monotonic() - started
    time.sleep(1)
    result["memory_idle"] = memory(args.pid)
    log(f"EHLO on all in {result['ehlo_seconds']:.1f} s; server: {result['memory_idle']}")

    cpu0 = cpu_seconds(args.pid)
    time.sleep(args.hold)
    cpu1 = cpu_seconds(args.pid)
    result["hold_seconds"] = args.hold
    result["idle_cpu_seconds"] = {"user": cpu1[0] - cpu0[0], "system": cpu1[1] - cpu0[1]}
    log(f"held {args.hold:.0f} s: server CPU {result['idle_cpu_seconds']}")

    result["probes_during"] = probes(args, address, message, f"with {len(held)} held")
    result["still_open"] = still_open(held)
    result["memory_during"] = memory(args.pid)
    log(f"{result['still_open']} of {len(held)} held connections still open and silent")

    for conn in held:
        conn.sock.close()
    time.sleep(2)
    result["memory_after"] = memory(args.pid)
    log(f"closed; server: {result['memory_after']}")

    before = result["memory_before"]
    for phase in ("greeted", "idle", "during"):
        m = result[f"memory_{phase}"]
        result[f"rss_per_connection_kib_{phase}"] = (m["VmRSS"] - before["VmRSS"]) / args.connections
        result[f"pss_per_connection_kib_{phase}"] = (m["Pss"] - before["Pss"]) / args.connections
        result[f"kernel_tcp_per_connection_kib_{phase}"] = (
            (m["tcp_mem_pages"] - before["tcp_mem_pages"]) * os.sysconf("SC_PAGE_SIZE") / 1024 / args.connections
        )
    print(json.dumps(result))


if __name__ == "__main__":
    main()
