"""Hostile and broken input against the real binary: each gets a correct reply and nothing
else, and the server keeps serving."""

import smtplib
import socket
import time

import pytest
from conftest import RawClient

SMUGGLING = [b"\n.\n", b"\r.\r", b"\r\n.\n", b"\n.\r\n", b"\r.\r\n", b"\r\n.\r", b"\n.\r"]


def open_transaction(port, rcpt="victim@localhost"):
    raw = RawClient(port)
    raw.expect(220)
    raw.command("EHLO attacker.example", 250)
    raw.send(f"MAIL FROM:<a@example.org>\r\nRCPT TO:<{rcpt}>\r\nDATA\r\n")
    raw.expect(250)
    raw.expect(250)
    raw.expect(354)
    return raw


@pytest.mark.parametrize("fake_end", SMUGGLING, ids=[repr(f) for f in SMUGGLING])
def test_smuggling_rejected_by_default(server, fake_end):
    raw = open_transaction(server.port())
    raw.send(
        b"Subject: first\r\n\r\nhello"
        + fake_end
        + b"MAIL FROM:<spoof@bank.example>\r\nRCPT TO:<smuggled@localhost>\r\nDATA\r\nSubject: smuggled\r\n\r\nx\r\n.\r\n"
    )
    code, lines = raw.reply()
    assert code == 521 and lines[0].startswith("521 5.5.2"), lines
    assert raw.closed()
    time.sleep(0.3)
    assert server.messages("victim") == [] and server.messages("smuggled") == []


@pytest.mark.parametrize("fake_end", SMUGGLING, ids=[repr(f) for f in SMUGGLING])
def test_smuggling_on_a_normalizing_listener_yields_one_message(server, fake_end):
    raw = open_transaction(server.port("legacy"))
    raw.send(
        b"Subject: first\r\n\r\nhello"
        + fake_end
        + b"MAIL FROM:<spoof@bank.example>\r\nRCPT TO:<smuggled@localhost>\r\nDATA\r\nSubject: smuggled\r\n\r\nx\r\n.\r\n"
    )
    raw.expect(250)
    raw.command("QUIT", 221)
    [message] = server.wait_for_messages("victim", 1)
    server.wait_until_queue_empty()
    assert server.messages("smuggled") == []
    assert b"MAIL FROM:<spoof@bank.example>\r\n" in message, "the fake commands are message text"
    # Normalized: every line ending in the stored message is CRLF.
    assert message.count(b"\n") == message.count(b"\r\n")


@pytest.mark.parametrize("fake_end", [b"\r\n\x00.\r\n", b"\r\n.\x00\r\n", b"\r\n .\r\n", b"\r\n. \r\n"])
def test_dot_with_nul_or_blank_is_content(server, fake_end):
    raw = open_transaction(server.port())
    raw.send(b"Subject: x\r\n\r\nhello" + fake_end + b"RSET\r\nstill body\r\n.\r\n")
    raw.expect(250)
    [message] = server.wait_for_messages("victim", 1)
    assert b"RSET\r\nstill body\r\n" in message


def test_starttls_injection_is_discarded(server):
    raw = RawClient(server.port())
    raw.expect(220)
    raw.command("EHLO c", 250)
    # Pipelined in the same packet as STARTTLS: must never be executed.
    raw.send("STARTTLS\r\nMAIL FROM:<injected@evil.example>\r\nRCPT TO:<injected@localhost>\r\n")
    raw.expect(220)
    raw.starttls()
    lines = raw.command("EHLO c", 250)
    assert not any("STARTTLS" in line for line in lines)
    # Had the injected MAIL been used, this RCPT would be accepted.
    assert raw.command("RCPT TO:<x@localhost>", 503)[0].startswith("503 5.5.1")
    raw.command("MAIL FROM:<a@example.org>", 250)
    raw.command("QUIT", 221)


def test_overlong_command_line(server):
    raw = RawClient(server.port())
    raw.expect(220)
    raw.command("EHLO c", 250)
    assert raw.command("NOOP " + "x" * 600, 500)[0] == "500 5.5.2 Line too long"
    raw.command("NOOP", 250)


def test_gigabyte_line_keeps_memory_bounded(server):
    raw = RawClient(server.port(), timeout=120)
    raw.expect(220)
    before = server.rss_kib()
    chunk = b"A" * (1 << 20)
    for _ in range(1024):
        raw.send(chunk)
    raw.send(b"\r\nNOOP\r\n")
    assert raw.reply()[1] == ["500 5.5.2 Line too long"]
    raw.expect(250)
    grown = server.rss_kib() - before
    assert grown < 16 * 1024, f"RSS grew by {grown} KiB for a 1 GiB line"
    # Others are served meanwhile and after.
    with smtplib.SMTP("127.0.0.1", server.port()) as client:
        assert client.noop()[0] == 250


def test_nul_bytes_and_bad_utf8_in_commands(server):
    raw = RawClient(server.port())
    raw.expect(220)
    raw.command("EHLO c", 250)
    raw.send(b"MAIL FROM:<a\x00b@example.org>\r\n")
    assert raw.reply()[1][0].startswith("500 5.5.2")
    raw.send(b"MAIL FROM:<\xff\xfe@example.org>\r\n")
    assert raw.reply()[1][0].startswith("500 5.5.2")
    raw.command("MAIL FROM:<a@example.org>", 250)


def test_ten_thousand_pipelined_commands(server):
    raw = RawClient(server.port())
    raw.expect(220)
    raw.command("EHLO c", 250)
    raw.send(b"NOOP\r\n" * 10000 + b"QUIT\r\n")
    for _ in range(10000):
        raw.expect(250)
    raw.expect(221)


def test_error_limit_closes_with_421(start_server):
    server = start_server(limits={"errors": 5})
    raw = RawClient(server.port())
    raw.expect(220)
    raw.send(b"GARBAGE\r\n" * 10)
    for _ in range(5):
        raw.expect(500)
    assert raw.expect(421)[0] == "421 4.7.0 Too many errors, closing connection"
    assert raw.closed()


def test_bdat_sizes(server):
    raw = RawClient(server.port())
    raw.expect(220)
    raw.command("EHLO c", 250)
    for size in ["-1", "12x", "", "99999999999999999999999"]:
        assert raw.command(f"BDAT {size}", 501)[0].startswith("501 5.5.2")
    raw.command("MAIL FROM:<a@example.org>", 250)
    raw.command("RCPT TO:<b@localhost>", 250)
    assert raw.command("BDAT 18446744073709551615", 552)[0].startswith("552 5.3.4")
    assert raw.closed()


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
    server = start_server(timeouts={"data": "1s"})
    raw = open_transaction(server.port())
    raw.send("Subject: never ends\r\n\r\nsome text\r\n")
    assert raw.expect(421)[0].startswith("421 4.4.2")
    time.sleep(0.2)
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


def test_header_injection_through_helo_is_refused(server):
    raw = RawClient(server.port())
    raw.expect(220)
    raw.send(b"EHLO evil\rX-Injected: yes\r\n")
    code, lines = raw.reply()
    assert code in (500, 501), lines
    raw.command("EHLO good.example", 250)
