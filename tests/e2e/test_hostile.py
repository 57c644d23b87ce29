"""Hostile and broken input against the real binary: each gets a correct reply and nothing
else, memory stays bounded, and the server keeps serving other clients meanwhile.

SMTP smuggling and STARTTLS injection are in test_smuggling.py.
"""

import itertools
import os
import re
import resource
import select
import smtplib
import socket
import threading
import time

import pytest
from conftest import RawClient, client_tls_context

# Idle connections held open by test_many_idle_connections; both this process and the server
# need a descriptor for each.
IDLE_CONNECTIONS = int(os.environ.get("POSTILION_IDLE_CONNECTIONS", "200"))

_names = itertools.count()


def unique(prefix):
    return f"{prefix}{next(_names)}"


def open_transaction(port, rcpt="victim@localhost"):
    raw = RawClient(port)
    raw.expect(220)
    raw.command("EHLO attacker.example", 250)
    raw.send(f"MAIL FROM:<a@example.org>\r\nRCPT TO:<{rcpt}>\r\nDATA\r\n")
    raw.expect(250)
    raw.expect(250)
    raw.expect(354)
    return raw


def served(server, listener="smtp"):
    """Another client gets a complete session, and its message is delivered."""
    mailbox = unique("bystander")
    with smtplib.SMTP("127.0.0.1", server.port(listener), timeout=20) as client:
        client.sendmail("b@example.org", [f"{mailbox}@localhost"], b"Subject: bystander\r\n\r\nx\r\n")
    server.wait_for_messages(mailbox, 1)


def read_until_closed(sock, timeout):
    """Everything the server sends until it closes; None if it is still open after timeout."""
    data = b""
    deadline = time.time() + timeout
    while time.time() < deadline:
        sock.settimeout(max(0.01, deadline - time.time()))
        try:
            chunk = sock.recv(65536)
        except (ConnectionResetError, BrokenPipeError):
            return data
        except TimeoutError:
            return None
        if not chunk:
            return data
        data += chunk
    return None


def test_overlong_command_line(server):
    raw = RawClient(server.port())
    raw.expect(220)
    raw.command("EHLO c", 250)
    assert raw.command("NOOP " + "x" * 600, 500)[0] == "500 5.5.2 Line too long"
    raw.command("NOOP", 250)


# ---------------------------------------------------------------------------------------------
# Slow and idle clients


def test_dribbling_client_is_cut_off_by_the_command_timeout(start_server):
    server = start_server(timeouts={"command": "3s"})
    raw = RawClient(server.port())
    raw.expect(220)
    line = b"EHLO slow.example\r\n"
    started = time.time()
    answer = b""
    sent = 0
    # One byte a second, for at most 7 seconds (the line would take 19).
    while time.time() - started < 7 and sent < len(line):
        try:
            raw.sock.sendall(line[sent : sent + 1])
        except OSError:
            break
        sent += 1
        if sent == 2:
            served(server)
        readable, _, _ = select.select([raw.sock], [], [], 1.0)
        if readable:
            chunk = raw.sock.recv(1000)
            answer += chunk
            if not chunk or answer.endswith(b"\r\n"):
                break
    elapsed = time.time() - started
    assert answer.startswith(b"421 4.4.2"), f"{sent} bytes in {elapsed:.1f}s, one a second, and the answer is {answer!r}"
    assert elapsed < 6.5
    assert read_until_closed(raw.sock, 5) is not None


def test_many_idle_connections(start_server, capsys):
    """N idle sessions cost little memory, do not keep a new client from being served, and
    the one over limits.connections gets 421."""
    soft, _ = resource.getrlimit(resource.RLIMIT_NOFILE)
    count = max(10, min(IDLE_CONNECTIONS, soft - 100))
    server = start_server(limits={"connections": count + 1, "connections_per_ip": count + 1})
    served(server)  # warm up: worker threads, delivery, the first allocations
    time.sleep(0.3)
    baseline = server.rss_kib()
    idle = []
    try:
        for _ in range(count):
            idle.append(socket.create_connection(("127.0.0.1", server.port()), timeout=20))
        for sock in idle:
            assert sock.recv(512).startswith(b"220 ")
        # Every other one has also said EHLO (a session with a greeting stored).
        for sock in idle[::2]:
            sock.sendall(b"EHLO idle.example\r\n")
        for sock in idle[::2]:
            reply = b""
            while b"\r\n250 " not in reply:
                chunk = sock.recv(4096)
                assert chunk, reply
                reply += chunk
        time.sleep(0.3)
        with_idle = server.rss_kib()
        per_connection = (with_idle - baseline) / count
        with capsys.disabled():
            print(
                f"\nidle connections: {count}, RSS {baseline} KiB -> {with_idle} KiB, "
                f"{per_connection:.1f} KiB per idle connection"
            )
        assert per_connection < 64, f"{per_connection:.1f} KiB per idle connection"

        # The last free slot serves a new client completely...
        mailbox = unique("last-slot")
        with smtplib.SMTP("127.0.0.1", server.port(), timeout=20) as client:
            client.sendmail("b@example.org", [f"{mailbox}@localhost"], b"Subject: last slot\r\n\r\nx\r\n")
            # ...and while it is connected, the next one is over the limit.
            over = RawClient(server.port())
            assert over.expect(421)[0] == "421 4.7.0 Too many connections, try again later"
            assert over.closed()
        server.wait_for_messages(mailbox, 1)
    finally:
        for sock in idle:
            sock.close()
    time.sleep(0.3)
    served(server)


def test_idle_tls_connections_stay_small(start_server, capsys):
    count = max(10, min(IDLE_CONNECTIONS // 2, 100))
    server = start_server(limits={"connections": count + 10, "connections_per_ip": count + 10})
    context = client_tls_context()
    with context.wrap_socket(socket.create_connection(("127.0.0.1", server.port("smtps"))), server_hostname="mx.test") as warm:
        assert warm.recv(512).startswith(b"220 ")
    time.sleep(0.3)
    baseline = server.rss_kib()
    idle = []
    try:
        for _ in range(count):
            sock = context.wrap_socket(
                socket.create_connection(("127.0.0.1", server.port("smtps")), timeout=20), server_hostname="mx.test"
            )
            idle.append(sock)
            assert sock.recv(512).startswith(b"220 ")
        time.sleep(0.3)
        with_idle = server.rss_kib()
        per_connection = (with_idle - baseline) / count
        with capsys.disabled():
            print(f"\nidle TLS connections: {count}, {per_connection:.1f} KiB per idle connection")
        assert per_connection < 128, f"{per_connection:.1f} KiB per idle TLS connection"
        served(server)
    finally:
        for sock in idle:
            sock.close()


def test_idle_client_times_out(start_server):
    server = start_server(timeouts={"command": "1s"})
    raw = RawClient(server.port())
    raw.expect(220)
    raw.send("EHLO c\r\n")
    raw.expect(250)
    started = time.time()
    assert raw.expect(421)[0] == "421 4.4.2 Timeout, closing connection"
    assert time.time() - started < 5
    assert raw.closed()


def test_data_that_never_ends_times_out(start_server):
    server = start_server(timeouts={"data": "2s"})
    raw = open_transaction(server.port())
    started = time.time()
    raw.send("Subject: never ends\r\n\r\nsome text\r\n")
    before = server.rss_kib()
    served(server)
    assert raw.expect(421)[0] == "421 4.4.2 Timeout, closing connection"
    assert 1.5 < time.time() - started < 6
    assert raw.closed()
    assert server.rss_kib() - before < 8 * 1024
    server.wait_until_queue_empty()
    assert server.messages("victim") == []


def test_connection_caps(start_server):
    server = start_server(limits={"connections_per_ip": 2, "connections": 3})
    first = RawClient(server.port())
    first.expect(220)
    second = RawClient(server.port())
    second.expect(220)
    third = RawClient(server.port())
    assert third.expect(421)[0] == "421 4.7.0 Too many connections, try again later"
    assert third.closed()
    # Another address (127.0.0.2 is loopback too) still gets the last slot.
    other = socket.create_connection(("127.0.0.1", server.port()), source_address=("127.0.0.2", 0), timeout=10)
    assert other.recv(100).startswith(b"220 ")
    fourth = socket.create_connection(("127.0.0.1", server.port()), source_address=("127.0.0.3", 0), timeout=10)
    assert fourth.recv(100).startswith(b"421 4.7.0"), "total cap"
    first.command("QUIT", 221)
    first.close()
    time.sleep(0.2)
    again = RawClient(server.port())
    again.expect(220)


# ---------------------------------------------------------------------------------------------
# Overlong input


def test_gigabyte_line_keeps_memory_bounded(server, capsys):
    """A 1 GiB command line: RSS sampled as it streams, another client served halfway."""
    raw = RawClient(server.port(), timeout=120)
    raw.expect(220)
    served(server)
    before = server.rss_kib()
    peak = before
    chunk = b"A" * (1 << 20)
    answered_early = False
    for mib in range(1024):
        raw.send(chunk)
        if mib % 32 == 0:
            peak = max(peak, server.rss_kib())
            if select.select([raw.sock], [], [], 0)[0]:
                # An answer before the line ends (not what this server does): no need to go on.
                answered_early = mib >= 64
                if answered_early:
                    break
        if mib == 512:
            served(server)
    raw.send(b"\r\nNOOP\r\n")
    assert raw.reply()[1] == ["500 5.5.2 Line too long"]
    raw.expect(250)
    peak = max(peak, server.rss_kib())
    with capsys.disabled():
        print(f"\n1 GiB command line: RSS grew at most {peak - before} KiB")
    assert peak - before < 16 * 1024, f"RSS grew by {peak - before} KiB for a 1 GiB line"
    served(server)


def test_overlong_data_line_is_discarded_as_it_arrives(start_server, capsys):
    server = start_server(limits={"message_size": "64M"})
    raw = open_transaction(server.port())
    raw.send(b"Subject: long line\r\n\r\n")
    before = server.rss_kib()
    peak = before
    chunk = b"B" * (1 << 20)
    for mib in range(32):
        raw.send(chunk)
        if mib % 4 == 3:
            peak = max(peak, server.rss_kib())
    raw.send(b"\r\n.\r\n")
    assert raw.expect(550)[0].startswith("550 5.6.0")
    peak = max(peak, server.rss_kib())
    with capsys.disabled():
        print(f"\n32 MiB DATA line: RSS grew at most {peak - before} KiB")
    raw.command("NOOP", 250)
    assert peak - before < 8 * 1024, f"RSS grew by {peak - before} KiB for a 32 MiB DATA line"


def test_data_past_the_size_limit_is_not_kept(start_server, capsys):
    """64 MiB of DATA with limits.message_size = 1M: 552 5.3.4 at the end, memory bounded."""
    server = start_server(limits={"message_size": "1M"})
    raw = open_transaction(server.port())
    before = server.rss_kib()
    peak = before
    block = (b"C" * 998 + b"\r\n") * 1024  # 1000-octet lines, 1000 KiB
    for n in range(64):
        raw.send(block)
        if n % 8 == 7:
            peak = max(peak, server.rss_kib())
        if n == 32:
            served(server)
    raw.send(b".\r\n")
    assert raw.expect(552)[0].startswith("552 5.3.4")
    peak = max(peak, server.rss_kib())
    with capsys.disabled():
        print(f"\n64 MiB DATA over a 1 MiB limit: RSS grew at most {peak - before} KiB")
    assert peak - before < 8 * 1024
    raw.command("NOOP", 250)
    server.wait_until_queue_empty()
    assert server.messages("victim") == []


# ---------------------------------------------------------------------------------------------
# Garbage in commands

BAD_OCTETS = [
    b"NO\x00OP",
    b"\x00",
    b"EHLO a\x00b.example",
    b"MAIL FROM:<a\x00b@example.org>",
    b"RCPT TO:<a@localhost>\x00",
    b"DATA\x00",
    b"MAIL FROM:<\xff\xfe@example.org>",
    b"MAIL FROM:<a@b\xc0\xaf.example> SMTPUTF8",  # overlong encoding of "/"
    b"MAIL FROM:<\xed\xa0\x80@example.org> SMTPUTF8",  # a UTF-16 surrogate
    b"EHLO \xe9t\xe9.example",  # Latin-1, not UTF-8
    b"\xff\xfe\xfd",
    b"NOOP \x80",
    b"EHLO evil\rX-Injected: yes",
    b"MAIL FROM:<a@example.org>\r BODY=8BITMIME",
]


def test_nul_bytes_and_bad_utf8_in_commands(server):
    raw = RawClient(server.port())
    raw.expect(220)
    raw.command("EHLO c", 250)
    before = server.rss_kib()
    for n, line in enumerate(BAD_OCTETS):
        raw.send(line + b"\r\n")
        code, lines = raw.reply()
        assert lines[0].startswith("500 5.5.2"), (line, lines)
        if n == len(BAD_OCTETS) // 2:
            served(server)
    assert server.rss_kib() - before < 8 * 1024
    # Well-formed UTF-8 is not enough without SMTPUTF8 (RFC 6531 section 3.4).
    assert raw.command("MAIL FROM:<jösé@example.org>", 553)[0].startswith("553 5.6.7")
    # The session was not disturbed: the greeting is still known.
    raw.command("MAIL FROM:<a@example.org>", 250)
    raw.command("RCPT TO:<garbage@localhost>", 250)
    raw.command("DATA", 354)
    raw.send("Subject: after garbage\r\n\r\nok\r\n.\r\n")
    raw.expect(250)
    server.wait_for_messages("garbage", 1)


def test_ten_thousand_pipelined_commands(server):
    """10 000 commands in one write, replies left unread while another client is served:
    every reply comes back, in order."""
    commands = [
        ("MAIL FROM:<a@example.org>", 250),
        ("RCPT TO:<piped@localhost>", 250),
        ("RSET", 250),
        ("NOOP", 250),
        ("VRFY someone", 252),
        ("HELP", 214),
    ]
    sequence = [commands[i % len(commands)] for i in range(10000)] + [("QUIT", 221)]
    raw = RawClient(server.port(), timeout=60)
    raw.expect(220)
    raw.command("EHLO c", 250)
    payload = "".join(command + "\r\n" for command, _ in sequence).encode()
    before = server.rss_kib()
    sender = threading.Thread(target=raw.send, args=(payload,))
    sender.start()
    served(server)
    # The replies wait in socket buffers, not in the server's memory.
    grown = server.rss_kib() - before
    codes = [raw.reply()[0] for _ in sequence]
    sender.join(30)
    assert codes == [code for _, code in sequence]
    assert grown < 8 * 1024, f"RSS grew by {grown} KiB"
    assert raw.closed()
    assert server.messages("piped") == []


def test_error_limit_closes_with_421(start_server):
    server = start_server(limits={"errors": 5})
    raw = RawClient(server.port())
    raw.expect(220)
    raw.send(b"GARBAGE\r\n" * 10)
    for _ in range(5):
        raw.expect(500)
    assert raw.expect(421)[0] == "421 4.7.0 Too many errors, closing connection"
    assert raw.closed()


BAD_BDAT_SIZES = ["-1", "-0", "+5", "0x10", "1e3", "5.0", "12x", "", "٣", "18446744073709551616",
                  "99999999999999999999999", "5 LAST extra", "5 NOTLAST", "5 LAST LAST"]


def test_bdat_sizes(server):
    raw = RawClient(server.port())
    raw.expect(220)
    raw.command("EHLO c", 250)
    for size in BAD_BDAT_SIZES:
        lines = raw.command(f"BDAT {size}", 501)
        assert lines[0].startswith("501 5.5.2"), (size, lines)
    raw.command("MAIL FROM:<a@example.org>", 250)
    raw.command("RCPT TO:<b@localhost>", 250)
    # A syntax error did not start a chunk: the next command is read as a command.
    assert raw.command("BDAT 5 LAST extra", 501)[0].startswith("501 5.5.2")
    # 2^64-1 octets can neither be taken nor skipped: 552 and the connection is closed.
    assert raw.command("BDAT 18446744073709551615", 552)[0].startswith("552 5.3.4")
    assert raw.closed()
    served(server)
    assert server.messages("b") == []


@pytest.mark.parametrize("state", ["no-transaction", "transaction"])
def test_bdat_of_two_to_the_64_minus_one(server, state):
    raw = RawClient(server.port())
    raw.expect(220)
    raw.command("EHLO c", 250)
    if state == "transaction":
        raw.send("MAIL FROM:<a@example.org>\r\nRCPT TO:<huge@localhost>\r\n")
        raw.expect(250)
        raw.expect(250)
    raw.send(b"BDAT 18446744073709551615 LAST\r\n" + b"x" * 4096)
    assert raw.expect(552)[0].startswith("552 5.3.4")
    assert raw.closed()
    served(server)
    assert server.messages("huge") == []


def test_declared_chunks_cost_no_memory_until_sent(start_server):
    """Chunks of the largest size declared on many connections, and their data never sent:
    memory does not grow with the declarations, and the data timeout ends each session."""
    server = start_server(timeouts={"data": "2s"})
    before = server.rss_kib()
    clients = []
    for _ in range(10):
        raw = RawClient(server.port())
        raw.expect(220)
        raw.send(f"EHLO c\r\nMAIL FROM:<a@example.org>\r\nRCPT TO:<declared@localhost>\r\nBDAT {25 * 1024 * 1024} LAST\r\n")
        for _ in range(3):
            raw.expect(250)
        raw.send(b"x" * 1000)
        clients.append(raw)
    time.sleep(0.3)
    grown = server.rss_kib() - before
    assert grown < 16 * 1024, f"RSS grew by {grown} KiB for 10 declared 25 MiB chunks"
    served(server)
    for raw in clients:
        assert raw.expect(421)[0] == "421 4.4.2 Timeout, closing connection"
    assert server.messages("declared") == []


# ---------------------------------------------------------------------------------------------
# Header and log injection: CR, LF and other control characters in EHLO names and addresses
# never reach a stored header field or a log line unescaped.

# C0 controls but TAB, DEL, and the C1 controls (which UTF-8 text can carry).
RAW_CONTROL = re.compile("[\x00-\x08\x0a-\x1f\x7f-\x9f]")


def raw_controls_in_header(message):
    header = message.split(b"\r\n\r\n", 1)[0].decode("utf-8", "replace")
    return [line for line in header.split("\r\n") if RAW_CONTROL.search(line)]


def raw_controls_in_log(server):
    # The server's log thread writes lines out up to about 10 ms after they are logged.
    time.sleep(0.05)
    # split("\n"), not splitlines(): that would also split at some of the controls sought.
    return [line for line in server.log().split("\n") if RAW_CONTROL.search(line)]


EHLO_NAMES = [
    (b"a\x01b.example", 501),
    (b"a\x1b[31mb.example", 501),
    (b"a\x7fb.example", 501),
    (b"a\tb.example", 501),
    (b"a\x0bb.example", 501),
    (b"[192.0.2.1\x1b]", 501),
    (b"[tag:a\x1bb]", 501),
    (b"evil\x00x.example", 500),
    (b"evil\rX-Injected: yes", 500),
    # UTF-8 C1 controls (U+0080..U+009F) are refused like their ASCII cousins.
    (b"a\xc2\x85b.example", 500),
    (b"a\xc2\x9b31mb.example", 500),
    (b"x\xc2\x80y.example", 500),
]


def test_control_characters_in_ehlo_never_reach_a_header_or_the_log(server):
    for name, code in EHLO_NAMES:
        mailbox = unique("helo")
        raw = RawClient(server.port())
        raw.expect(220)
        raw.send(b"EHLO " + name + b"\r\n")
        got, lines = raw.reply()
        assert got == code, (name, lines)
        if code != 250:
            raw.command("EHLO good.example", 250)
        raw.command("MAIL FROM:<a@example.org>", 250)
        raw.command(f"RCPT TO:<{mailbox}@localhost>", 250)
        raw.command("DATA", 354)
        raw.send("Subject: helo\r\n\r\nx\r\n.\r\n")
        raw.expect(250)
        raw.command("QUIT", 221)
        [message] = server.wait_for_messages(mailbox, 1)
        assert raw_controls_in_header(message) == [], (name, message)
        received = re.search(rb"Received: from (\S+) ", message).group(1)
        assert received == (b"good.example" if code != 250 else received), (name, received)
    # A bare LF ends a command line: the rest is a command of its own, never a header field.
    mailbox = unique("helo")
    raw = RawClient(server.port())
    raw.expect(220)
    raw.send(b"EHLO evil.example\nX-Injected: yes\r\n")
    raw.expect(250)
    assert raw.expect(500)[0].startswith("500 5.5.1")
    raw.send(f"MAIL FROM:<a@example.org>\r\nRCPT TO:<{mailbox}@localhost>\r\nDATA\r\n")
    for code in (250, 250, 354):
        raw.expect(code)
    raw.send("Subject: helo\r\n\r\nx\r\n.\r\n")
    raw.expect(250)
    [message] = server.wait_for_messages(mailbox, 1)
    assert b"X-Injected" not in message
    server.wait_until_queue_empty()
    assert raw_controls_in_log(server) == []


def test_control_characters_in_addresses_and_dsn_parameters_are_refused(server):
    raw = RawClient(server.port())
    raw.expect(220)
    raw.command("EHLO c", 250)
    for line, reply in [
        (b'MAIL FROM:<"a\x01b"@example.org>', "501 5.1.7"),
        (b'MAIL FROM:<"a\\\x1bb"@example.org>', "501 5.1.7"),
        (b"MAIL FROM:<a\x7fb@example.org>", "501 5.1.7"),
        (b"MAIL FROM:<a@example.org> ENVID=x+0D+0AX-Injected:+20yes", "501 5.5.4"),
        (b"MAIL FROM:<a@example.org> ENVID=x+1B[31m", "501 5.5.4"),
    ]:
        raw.send(line + b"\r\n")
        assert raw.reply()[1][0].startswith(reply), line
    raw.command("MAIL FROM:<a@example.org>", 250)
    for line, reply in [
        (b'RCPT TO:<"v\x01x"@localhost>', "501 5.1.3"),
        (b"RCPT TO:<v\x1bx@localhost>", "501 5.1.3"),
        (b"RCPT TO:<v@localhost> ORCPT=rfc822;a+0D+0AX-Injected:+20yes@x", "501 5.5.4"),
        (b"RCPT TO:<v@localhost> ORCPT=utf-8;a\\x{0D}b@x", "501 5.5.4"),
        (b"RCPT TO:<v@localhost> ORCPT=utf-8;a\\x{85}b@x", "501 5.5.4"),
    ]:
        raw.send(line + b"\r\n")
        assert raw.reply()[1][0].startswith(reply), line
    raw.command("QUIT", 221)
    assert raw_controls_in_log(server) == []


def send_with_c1_controls(server):
    """A sender and a recipient tag with the C1 controls CSI (U+009B) and NEL (U+0085), both
    of which the address parser takes as UTF-8 atext; NOTIFY=SUCCESS adds a notice."""
    raw = RawClient(server.port())
    raw.expect(220)
    raw.command("EHLO c", 250)
    raw.send("MAIL FROM:<s\u009b31m\u0085@localhost> SMTPUTF8\r\n".encode())
    mail_code, _ = raw.reply()
    raw.send("RCPT TO:<ctl+\u009b31m\u0085@localhost> NOTIFY=SUCCESS\r\n".encode())
    rcpt_code, _ = raw.reply()
    if mail_code != 250 or rcpt_code != 250:
        raw.command("QUIT", 221)
        return None
    raw.command("DATA", 354)
    raw.send("Subject: controls\r\n\r\nx\r\n.\r\n")
    raw.expect(250)
    raw.command("QUIT", 221)
    [message] = server.wait_for_messages("ctl", 1)
    server.wait_until_queue_empty()
    return message


def test_c1_controls_in_addresses_never_reach_a_stored_header(server):
    message = send_with_c1_controls(server)
    if message is not None:
        assert raw_controls_in_header(message) == []


def test_c1_controls_in_addresses_never_reach_the_log(server):
    send_with_c1_controls(server)
    assert raw_controls_in_log(server) == []
