"""SMTP smuggling and STARTTLS command injection against the real binary.

Every fake end of data is sent in one write together with the commands of a second message,
on a listener that rejects bare line endings (the default) and on one that normalizes them.
In no case may a second message appear in any Maildir, and the first message is stored (or
refused) exactly as README.md says: "the end of data is the exact bytes CRLF . CRLF and
nothing else".
"""

import base64
import itertools
import signal
import subprocess
import time

import pytest
from conftest import BINARY, RawClient, Server, render_config

SENDER = "a@example.org"
FIRST = b"Subject: first\r\n\r\nhello"

# Fake ends made of bare CR or LF: the default listener answers 521 5.5.2 and closes; the
# normalizing one turns every bare CR or LF into CRLF and keeps the "." line as content.
BARE = [
    b"\n.\n",
    b"\r.\r",
    b"\r\n.\n",
    b"\n.\r\n",
    b"\r.\r\n",
    b"\r\n.\r",
    b"\n.\r",
    b"\r\n.\r\r\n",
    b"\r\n.\n\r\n",
]

# Fake ends without a bare CR or LF: NUL or white space around (or instead of) the dot. They
# are ordinary lines on every listener; a leading "." followed by anything is unstuffed
# (RFC 5321 section 4.5.2).
BLANK = [
    b"\r\n\x00.\r\n",
    b"\r\n.\x00\r\n",
    b"\r\n .\r\n",
    b"\r\n. \r\n",
    b"\r\n\t.\r\n",
    b"\r\n.\t\r\n",
    b"\r\n \r\n",
    b"\r\n\x00\r\n",
    b"\r\n..\r\n",
]

LISTENERS = [
    {"name": "smtp", "address": "127.0.0.1:0", "tls": "starttls"},
    {"name": "legacy", "address": "127.0.0.1:0", "tls": "none", "bare_line_endings": "normalize"},
]

_names = itertools.count()


def unique(prefix):
    return f"{prefix}{next(_names)}"


@pytest.fixture(scope="module")
def shared(tmp_path_factory):
    """One server for the whole module; every test uses mailboxes of its own."""
    base = tmp_path_factory.mktemp("smuggling")
    config = base / "config.toml"
    config.write_text(
        render_config(
            base / "data",
            LISTENERS,
            {"spool": {"free_space_reserve": 0}, "dns": {"nameservers": ["127.0.0.1:9"]}},
        )
    )
    server = Server(base / "data", config).start()
    yield server
    server.stop(signal.SIGKILL, timeout=10)


def second_message(style, rcpt):
    """The smuggled second transaction; with DATA it ends with the real end of data."""
    commands = f"MAIL FROM:<spoof@bank.example>\r\nRCPT TO:<{rcpt}>\r\n".encode()
    content = b"Subject: smuggled\r\n\r\nx\r\n"
    if style == "data":
        return commands + b"DATA\r\n" + content + b".\r\n"
    # The chunk ends with CRLF; the ".\r\n" after it ends the real DATA.
    return commands + f"BDAT {len(content)} LAST\r\n".encode() + content + b".\r\n"


def normalized(fake_end):
    """What a normalizing listener stores for a fake end: each bare CR or LF becomes CRLF, and
    the "." line next to a bare line ending stays as content (a lone "." is never unstuffed)."""
    out, i = b"", 0
    while i < len(fake_end):
        if fake_end[i : i + 2] == b"\r\n":
            out, i = out + b"\r\n", i + 2
        elif fake_end[i : i + 1] in (b"\r", b"\n"):
            out, i = out + b"\r\n", i + 1
        else:
            out, i = out + fake_end[i : i + 1], i + 1
    return out


def unstuffed(fake_end):
    """What any listener stores for a fake end without bare CR or LF."""
    assert fake_end.startswith(b"\r\n") and fake_end.endswith(b"\r\n")
    line = fake_end[2:-2]
    if line.startswith(b".") and len(line) > 1:
        line = line[1:]
    return b"\r\n" + line + b"\r\n"


def expected_content(fake_end, style, rcpt):
    stored_end = unstuffed(fake_end) if fake_end in BLANK else normalized(fake_end)
    # The real end of data (CRLF "." CRLF) takes the last three octets of the payload.
    return FIRST + stored_end + second_message(style, rcpt)[: -len(b".\r\n")]


def check_stored(server, victim, smuggled, content):
    """Exactly one message for the victim, our trace fields in front of the content as sent,
    nothing for the smuggled recipient."""
    [message] = server.wait_for_messages(victim, 1)
    server.wait_until_queue_empty()
    assert server.messages(victim) == [message], "exactly one message"
    assert server.messages(smuggled) == [], "no smuggled message"
    assert message.endswith(content), (message, content)
    trace = message[: len(message) - len(content)]
    assert trace.startswith(f"Return-Path: <{SENDER}>\r\nDelivered-To: {victim}@localhost\r\nReceived: ".encode()), trace
    assert trace.count(b"Received:") == 1 and trace.endswith(b" +0000\r\n"), trace


def check_refused(server, raw, victim, smuggled):
    code, lines = raw.reply()
    assert code == 521 and lines[0].startswith("521 5.5.2"), lines
    assert raw.closed(), "the connection is closed after 521"
    # The session is over once the server closed it: anything it had accepted would be in
    # the queue or delivered by the time the queue is empty.
    server.wait_until_queue_empty()
    assert server.messages(victim) == [] and server.messages(smuggled) == []
    assert not server.maildir(smuggled).exists()


CASES = [(fake, listener) for fake in BARE + BLANK for listener in ("smtp", "legacy")]
CASE_IDS = [f"{listener}-{fake!r}" for fake, listener in CASES]


@pytest.mark.parametrize("style", ["data", "bdat"])
@pytest.mark.parametrize(("fake_end", "listener"), CASES, ids=CASE_IDS)
def test_fake_end_of_data_after_354(shared, fake_end, listener, style):
    victim, smuggled = unique("victim"), unique("smuggled")
    raw = RawClient(shared.port(listener))
    raw.expect(220)
    raw.command("EHLO attacker.example", 250)
    raw.send(f"MAIL FROM:<{SENDER}>\r\nRCPT TO:<{victim}@localhost>\r\nDATA\r\n")
    raw.expect(250)
    raw.expect(250)
    raw.expect(354)
    raw.send(FIRST + fake_end + second_message(style, f"{smuggled}@localhost"))
    if listener == "smtp" and fake_end in BARE:
        check_refused(shared, raw, victim, smuggled)
        return
    raw.expect(250)
    # Had the second transaction been read as commands, its replies would come before 221.
    raw.command("QUIT", 221)
    check_stored(shared, victim, smuggled, expected_content(fake_end, style, f"{smuggled}@localhost"))


@pytest.mark.parametrize(("fake_end", "listener"), CASES, ids=CASE_IDS)
def test_fake_end_of_data_in_one_pipelined_write(shared, fake_end, listener):
    """The whole session, fake end and second message included, in a single write."""
    victim, smuggled = unique("victim"), unique("smuggled")
    raw = RawClient(shared.port(listener))
    raw.expect(220)
    raw.send(
        f"EHLO attacker.example\r\nMAIL FROM:<{SENDER}>\r\nRCPT TO:<{victim}@localhost>\r\nDATA\r\n".encode()
        + FIRST
        + fake_end
        + second_message("data", f"{smuggled}@localhost")
        + b"QUIT\r\n"
    )
    for code in (250, 250, 250, 354):
        raw.expect(code)
    if listener == "smtp" and fake_end in BARE:
        check_refused(shared, raw, victim, smuggled)
        return
    raw.expect(250)
    raw.expect(221)
    assert raw.closed()
    check_stored(shared, victim, smuggled, expected_content(fake_end, "data", f"{smuggled}@localhost"))


@pytest.mark.parametrize("listener", ["smtp", "legacy"])
@pytest.mark.parametrize("fake_end", [b"\r\n.\r\n"] + BARE, ids=lambda f: repr(f))
def test_bdat_content_is_stored_as_sent(shared, fake_end, listener):
    """BDAT is length-framed: an end-of-data sequence and commands inside a chunk are content,
    bare line endings included, on both listeners."""
    victim, smuggled = unique("victim"), unique("smuggled")
    content = FIRST + fake_end + second_message("data", f"{smuggled}@localhost")
    raw = RawClient(shared.port(listener))
    raw.expect(220)
    raw.send(
        f"EHLO attacker.example\r\nMAIL FROM:<{SENDER}>\r\nRCPT TO:<{victim}@localhost>\r\n"
        f"BDAT {len(content)} LAST\r\n".encode()
        + content
        + b"QUIT\r\n"
    )
    for code in (250, 250, 250, 250, 221):
        raw.expect(code)
    check_stored(shared, victim, smuggled, content)


def test_fake_end_split_across_bdat_chunks(shared):
    """CRLF "." CRLF spread over two chunks, the smuggled commands in the second."""
    victim, smuggled = unique("victim"), unique("smuggled")
    first = FIRST + b"\r\n."
    second = b"\r\n" + second_message("data", f"{smuggled}@localhost")
    raw = RawClient(shared.port())
    raw.expect(220)
    raw.send(
        f"EHLO attacker.example\r\nMAIL FROM:<{SENDER}>\r\nRCPT TO:<{victim}@localhost>\r\n"
        f"BDAT {len(first)}\r\n".encode()
        + first
        + f"BDAT {len(second)} LAST\r\n".encode()
        + second
        + b"QUIT\r\n"
    )
    for code in (250, 250, 250, 250, 250, 221):
        raw.expect(code)
    check_stored(shared, victim, smuggled, first + second)


def closed_within(raw, timeout):
    """Reads until the server closes the connection; False if it is still open after timeout."""
    deadline = time.time() + timeout
    while time.time() < deadline:
        raw.sock.settimeout(max(0.01, deadline - time.time()))
        try:
            if raw.sock.recv(65536) == b"":
                return True
        except (ConnectionResetError, BrokenPipeError):
            return True
        except TimeoutError:
            return False
    return False


def served(server, listener="smtp"):
    """Another client gets a complete session meanwhile."""
    import smtplib

    mailbox = unique("bystander")
    with smtplib.SMTP("127.0.0.1", server.port(listener), timeout=20) as client:
        client.sendmail(SENDER, [f"{mailbox}@localhost"], b"Subject: bystander\r\n\r\nx\r\n")
    server.wait_for_messages(mailbox, 1)


# ---------------------------------------------------------------------------------------------
# STARTTLS command injection (CVE-2011-0411 and relatives): whatever arrives with the
# STARTTLS command is discarded, and the EHLO and transaction are forgotten (RFC 3207 4.2).

ACCOUNT = "alice@localhost"
PASSWORD = "correct horse battery staple"
AUTH_PLAIN = "AUTH PLAIN " + base64.b64encode(f"\0{ACCOUNT}\0{PASSWORD}".encode()).decode()

INJECTIONS = {
    "mail-rcpt": b"MAIL FROM:<injected@evil.example>\r\nRCPT TO:<{injected}@localhost>\r\n",
    "ehlo": b"EHLO injected.example\r\n",
    "transaction": b"EHLO injected.example\r\nMAIL FROM:<injected@evil.example>\r\nRCPT TO:<{injected}@localhost>\r\n"
    b"DATA\r\nSubject: injected\r\n\r\nx\r\n.\r\nQUIT\r\n",
    "partial-line": b"MAIL FROM:<inj",
    "bdat": b"MAIL FROM:<injected@evil.example>\r\nRCPT TO:<{injected}@localhost>\r\nBDAT 5 LAST\r\nhello",
    # Valid credentials: read after the handshake, they would authenticate the session.
    "auth": b"EHLO injected.example\r\n" + AUTH_PLAIN.encode() + b"\r\n",
    "auth-transaction": b"EHLO injected.example\r\n" + AUTH_PLAIN.encode() + b"\r\nMAIL FROM:<a@example.org>\r\n"
    b"RCPT TO:<{injected}@localhost>\r\nDATA\r\nSubject: injected\r\n\r\nx\r\n.\r\n",
}


@pytest.fixture(scope="module")
def submission(tmp_path_factory):
    """A server with a submission-role listener (AUTH required before MAIL) and one account."""
    base = tmp_path_factory.mktemp("submission")
    result = subprocess.run(
        [str(BINARY), "user", "add", ACCOUNT, "--sender", SENDER, "--data", str(base / "data")],
        input=PASSWORD + "\n",
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 0, result.stderr
    config = base / "config.toml"
    config.write_text(
        render_config(
            base / "data",
            [{"name": "submission", "address": "127.0.0.1:0", "role": "submission"}],
            {"spool": {"free_space_reserve": 0}, "dns": {"nameservers": ["127.0.0.1:9"]}},
        )
    )
    server = Server(base / "data", config).start()
    yield server
    server.stop(signal.SIGKILL, timeout=10)


def starttls_with(server, listener, payload, ehlo_first=True):
    raw = RawClient(server.port(listener))
    raw.expect(220)
    if ehlo_first:
        raw.command("EHLO client.example", 250)
    raw.send(b"STARTTLS\r\n" + payload)
    assert raw.expect(220)[0].startswith("220 2.0.0")
    assert raw.buffer == b"", "nothing but the 220 before the handshake"
    # A plaintext reply to an injected command would break the handshake here.
    raw.starttls()
    return raw


@pytest.mark.parametrize("ehlo_first", [True, False], ids=["after-ehlo", "before-ehlo"])
@pytest.mark.parametrize("injection", sorted(INJECTIONS))
@pytest.mark.parametrize("role", ["mta", "submission"])
def test_starttls_injection_is_discarded(request, role, injection, ehlo_first):
    server = request.getfixturevalue("shared" if role == "mta" else "submission")
    listener = "smtp" if role == "mta" else "submission"
    injected = unique("injected")
    raw = starttls_with(server, listener, INJECTIONS[injection].replace(b"{injected}", injected.encode()), ehlo_first)
    # The EHLO (sent before TLS or injected) is forgotten: MAIL needs a new one.
    assert raw.command(f"MAIL FROM:<{SENDER}>", 503)[0] == "503 5.5.1 Send EHLO or HELO first"
    lines = raw.command("EHLO real.example", 250)
    assert not any("STARTTLS" in line for line in lines)
    # No injected MAIL survives: RCPT needs one first.
    assert raw.command(f"RCPT TO:<{injected}@localhost>", 503)[0] == "503 5.5.1 Need MAIL command first"
    assert raw.command("STARTTLS", 503)[0] == "503 5.5.1 TLS already active"
    keyword = b"ESMTPS"
    if role == "submission":
        # No injected AUTH survives either: the session is not authenticated.
        assert raw.command(f"MAIL FROM:<{SENDER}>", 530)[0] == "530 5.7.0 Authentication required"
        if not injection.startswith("auth"):
            # Logging in is slow in a debug build: only where the credentials were injected.
            raw.command("QUIT", 221)
            server.wait_until_queue_empty()
            assert not server.maildir(injected).exists()
            return
        assert raw.command(AUTH_PLAIN, 235)[0].startswith("235 2.7.0")
        keyword = b"ESMTPSA"
    raw.command(f"MAIL FROM:<{SENDER}>", 250)
    ok = unique("tlsok")
    raw.command(f"RCPT TO:<{ok}@localhost>", 250)
    raw.command("DATA", 354)
    raw.send("Subject: after tls\r\n\r\nbody\r\n.\r\n")
    raw.expect(250)
    raw.command("QUIT", 221)
    [message] = server.wait_for_messages(ok, 1)
    assert b"Received: from real.example " in message and b"with " + keyword + b" id" in message, message
    server.wait_until_queue_empty()
    assert server.messages(injected) == [] and not server.maildir(injected).exists()
    assert "injected@evil.example" not in server.log()


def test_plaintext_after_the_220_breaks_the_handshake_not_the_server(shared):
    """Bytes sent after the 220 (in their own packet) are read as TLS, never as commands."""
    injected = unique("injected")
    raw = RawClient(shared.port())
    raw.expect(220)
    raw.command("EHLO client.example", 250)
    raw.command("STARTTLS", 220)
    raw.send(f"MAIL FROM:<injected@evil.example>\r\nRCPT TO:<{injected}@localhost>\r\n")
    # The server may send a TLS alert before it closes; read up to the end of the stream.
    assert closed_within(raw, 10), "the handshake fails and the connection is closed"
    served(shared)
    shared.wait_until_queue_empty()
    assert not shared.maildir(injected).exists()
