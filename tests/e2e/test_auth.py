"""Submission and access control against the real binary: SMTP AUTH with clients nobody here
wrote (smtplib, swaks, scramp for SCRAM-SHA-256), listener roles, the relay policy against
every trick in the book, sender ownership, brute-force throttling and per-account rates."""

import base64
import shutil
import smtplib
import socket
import sqlite3
import subprocess
import time

import pytest
from scramp import ScramClient

from conftest import BINARY, RawClient, add_user, no_verify

PASSWORD = "correct horse battery staple"

LISTENERS = [
    {"name": "mta", "address": "127.0.0.1:0", "role": "mta"},
    {"name": "submission", "address": "127.0.0.1:0", "role": "submission"},
    {"name": "submissions", "address": "127.0.0.1:0", "role": "submissions"},
]


@pytest.fixture
def auth_server(start_server, tmp_path):
    """A server with the three listener roles and one account, alice@localhost."""

    def start(abuse=None, auth=None, **sections):
        data = tmp_path / f"auth-data{len(list(tmp_path.glob('auth-data*')))}"
        add_user(data, "alice@localhost", PASSWORD, "--sender", "alice@localhost", "--sender", "@example.org")
        extra = {"abuse": abuse} if abuse else {}
        if auth:
            extra["auth"] = auth
        return start_server(listeners=LISTENERS, data_dir=data, **extra, **sections)

    return start


def submission(server, host="127.0.0.1", source=None):
    client = smtplib.SMTP(host, server.port("submission"), timeout=30, source_address=source)
    client.ehlo("client.test")
    return client


def test_submission_needs_tls_for_plain_and_login_then_accepts_both(auth_server):
    server = auth_server()
    client = submission(server)
    # Before TLS only mechanisms that do not send the password in the clear are offered.
    assert client.esmtp_features["auth"].split() == ["SCRAM-SHA-256"]
    assert client.docmd("AUTH PLAIN " + base64.b64encode(b"\0alice@localhost\0" + PASSWORD.encode()).decode()) == (
        538,
        b"5.7.11 Encryption required for requested authentication mechanism",
    )
    assert client.mail("alice@localhost") == (530, b"5.7.0 Authentication required")
    client.starttls(context=no_verify())
    client.ehlo("client.test")
    assert client.esmtp_features["auth"].split() == ["PLAIN", "LOGIN", "SCRAM-SHA-256"]
    client.user, client.password = "alice@localhost", PASSWORD
    assert client.auth("PLAIN", client.auth_plain)[0] == 235
    assert client.docmd("AUTH LOGIN")[0] == 503, "AUTH twice"
    assert client.sendmail("alice@localhost", ["bob@localhost"], b"Subject: sub\r\n\r\nbody\r\n") == {}
    client.quit()
    # LOGIN on a fresh connection.
    client = submission(server)
    client.starttls(context=no_verify())
    client.ehlo("client.test")
    client.user, client.password = "alice@localhost", PASSWORD
    assert client.auth("LOGIN", client.auth_login, initial_response_ok=False)[0] == 235
    client.quit()
    [message] = server.wait_for_messages("bob", 1)
    assert b"with ESMTPSA id" in message
    # RFC 6409 section 8: the missing Date and Message-ID were added.
    assert b"\r\nDate: " in message and b"\r\nMessage-ID: <" in message


def test_smtp_ssl_on_submissions(auth_server):
    server = auth_server()
    with smtplib.SMTP_SSL("127.0.0.1", server.port("submissions"), context=no_verify(), timeout=30) as client:
        client.ehlo("client.test")
        assert "PLAIN" in client.esmtp_features["auth"]
        client.login("alice@localhost", PASSWORD)
        date = "Date: Tue, 1 Dec 2026 10:00:00 +0000\r\nMessage-ID: <kept@client.test>\r\n"
        client.sendmail("alice@localhost", ["carol@localhost"], (date + "Subject: ssl\r\n\r\nx\r\n").encode())
    [message] = server.wait_for_messages("carol", 1)
    assert message.count(b"Message-ID:") == 1 and b"<kept@client.test>" in message
    assert message.count(b"\r\nDate:") == 1


def test_scram_sha_256_with_an_independent_client(auth_server):
    server = auth_server()
    client = submission(server)
    # SCRAM never sends the password, so it is offered without TLS.
    scram = ScramClient(["SCRAM-SHA-256"], "alice@localhost", PASSWORD)
    first = scram.get_client_first()
    code, challenge = client.docmd("AUTH SCRAM-SHA-256 " + base64.b64encode(first.encode()).decode())
    assert code == 334
    scram.set_server_first(base64.b64decode(challenge).decode())
    code, challenge = client.docmd(base64.b64encode(scram.get_client_final().encode()).decode())
    assert code == 334
    scram.set_server_final(base64.b64decode(challenge).decode())  # checks the server's signature
    assert client.docmd("")[0] == 235
    assert client.sendmail("alice@localhost", ["dave@localhost"], b"Subject: scram\r\n\r\nx\r\n") == {}
    client.quit()
    # A wrong password fails at the proof.
    client = submission(server)
    scram = ScramClient(["SCRAM-SHA-256"], "alice@localhost", "wrong")
    code, challenge = client.docmd("AUTH SCRAM-SHA-256 " + base64.b64encode(scram.get_client_first().encode()).decode())
    scram.set_server_first(base64.b64decode(challenge).decode())
    code, reply = client.docmd(base64.b64encode(scram.get_client_final().encode()).decode())
    assert (code, reply) == (535, b"5.7.8 Authentication credentials invalid")


@pytest.mark.skipif(shutil.which("swaks") is None, reason="swaks is installed by scripts/install-test-deps")
@pytest.mark.parametrize("mechanism", ["PLAIN", "LOGIN"])
def test_swaks_authenticates(auth_server, mechanism):
    server = auth_server()
    for listener, tls in (("submission", "--tls"), ("submissions", "--tlsc")):
        result = subprocess.run(
            ["swaks", "--server", f"127.0.0.1:{server.port(listener)}", tls, "--auth", mechanism,
             "--auth-user", "alice@localhost", "--auth-password", PASSWORD,
             "--from", "alice@localhost", "--to", "erin@localhost", "--timeout", "20"],
            capture_output=True, text=True, timeout=60,
        )
        assert result.returncode == 0, result.stdout + result.stderr
        assert "235 2.7.0 Authentication successful" in result.stdout
    assert len(server.wait_for_messages("erin", 2)) == 2


def test_exchange_errors(auth_server):
    server = auth_server()
    raw = RawClient(server.port("submissions"), tls=True)
    raw.expect(220)
    raw.command("EHLO client.test", 250)
    raw.send(b"AUTH LOGIN\r\n")
    assert raw.expect(334)[0] == "334 VXNlcm5hbWU6"
    raw.send(b"*\r\n")
    assert raw.expect(501)[0] == "501 5.0.0 Authentication cancelled"
    raw.send(b"AUTH PLAIN not*base64\r\n")
    assert raw.expect(501)[0] == "501 5.5.2 Invalid base64 data"
    raw.send(b"AUTH GSSAPI\r\n")
    assert raw.expect(504)[0].startswith("504 5.5.4")
    raw.send(b"AUTH PLAIN " + base64.b64encode(b"\0alice@localhost\0" + PASSWORD.encode()) + b"\r\n")
    raw.expect(235)
    raw.command("MAIL FROM:<alice@localhost>", 250)
    raw.send(b"AUTH PLAIN =\r\n")
    assert raw.expect(503)[0].startswith("503 5.5.1")
    raw.close()


def test_brute_force_is_slowed_then_cut_off_while_others_are_served(auth_server):
    server = auth_server(
        abuse={"auth_free_failures": 1, "auth_failures_before_ban": 4, "auth_max_delay": "2s", "auth_ban": "60s"}
    )
    attacker = smtplib.SMTP_SSL("127.0.0.1", server.port("submissions"), context=no_verify(), timeout=30)
    attacker.ehlo("attacker.test")
    took = []
    for guess in range(3):
        started = time.monotonic()
        code, _ = attacker.docmd("AUTH PLAIN " + base64.b64encode(f"\0alice@localhost\0guess{guess}".encode()).decode())
        took.append(time.monotonic() - started)
        assert code == 535
    # No delay for the free failure, then 1s, then 2s (the cap); took[0] is the cost of a
    # check itself.
    assert took[0] < 0.9 and 0.8 <= took[1] - took[0] < 1.7 and 1.8 <= took[2] - took[0] < 2.7, took
    code, reply = attacker.docmd("AUTH PLAIN " + base64.b64encode(b"\0alice@localhost\0guess3").decode())
    assert (code, reply) == (421, b"4.7.0 Too many failed authentication attempts, try again later")
    attacker.close()
    # The address is banned: 421 at connect.
    with socket.create_connection(("127.0.0.1", server.port("submissions")), timeout=10) as banned:
        assert banned.recv(200).startswith(b"421 4.7.0")
    # Another address is still served and can log in (the account is only slowed).
    with smtplib.SMTP_SSL(
        "127.0.0.1", server.port("submissions"), context=no_verify(), timeout=30, source_address=("127.0.0.2", 0)
    ) as other:
        other.ehlo("other.test")
        other.login("alice@localhost", PASSWORD)
    assert "too many failed logins" in server.wait_for_log("too many failed logins")


# Recipients that try to relay through a local domain, or are remote in disguise.
RELAY_TRICKS = [
    "user%remote.test@localhost",
    '"user%remote.test"@localhost',
    '"user@remote.test"@localhost',
    "remote.test!user@localhost",
    "@a.test,@b.test:user@remote.test",
    "user@remote.test.",
    "user@REMOTE.TEST",
    "user@[192.0.2.1]",
    "user@[IPv6:2001:db8::1]",
    "user@xn--bcher-kva.example",
]


def rcpt_replies(client, recipients, options=()):
    replies = {}
    for recipient in recipients:
        code, reply = client.docmd(f"RCPT TO:<{recipient}>", " ".join(options)) if options else client.docmd(f"RCPT TO:<{recipient}>")
        replies[recipient] = (code, reply.decode())
    return replies


def test_relay_table(auth_server):
    server = auth_server()
    # The MTA listener, unauthenticated: every trick is a relay attempt.
    with smtplib.SMTP("127.0.0.1", server.port("mta"), timeout=30) as client:
        client.ehlo("client.test")
        assert client.mail("someone@remote.test")[0] == 250
        replies = rcpt_replies(client, RELAY_TRICKS)
        assert all(reply == (554, "5.7.1 Relay access denied") for reply in replies.values()), replies
        assert client.rcpt("bob@localhost")[0] == 250, "local mail is still taken"
        assert client.rcpt("Bob@LOCALHOST.")[0] == 250
        client.rset()
        # UTF-8 domains need SMTPUTF8 and are remote too.
        assert client.mail("someone@remote.test", ["SMTPUTF8"])[0] == 250
        assert client.rcpt("user@b\u00fccher.example")[0] == 554
    # Submission without AUTH: nothing at all.
    for listener in ("submission", "submissions"):
        if listener == "submissions":
            client = smtplib.SMTP_SSL("127.0.0.1", server.port(listener), context=no_verify(), timeout=30)
        else:
            client = smtplib.SMTP("127.0.0.1", server.port(listener), timeout=30)
        client.ehlo("client.test")
        assert client.mail("alice@localhost") == (530, b"5.7.0 Authentication required")
        client.close()
    # Authenticated, on both submission roles: remote domains relay; routing tricks inside a
    # local domain are refused as unknown users rather than honoured.
    for listener in ("submission", "submissions"):
        if listener == "submissions":
            client = smtplib.SMTP_SSL("127.0.0.1", server.port(listener), context=no_verify(), timeout=30)
            client.ehlo("client.test")
        else:
            client = smtplib.SMTP("127.0.0.1", server.port(listener), timeout=30)
            client.ehlo("client.test")
            client.starttls(context=no_verify())
            client.ehlo("client.test")
        client.login("alice@localhost", PASSWORD)
        assert client.mail("alice@localhost")[0] == 250
        replies = rcpt_replies(client, RELAY_TRICKS)
        for recipient, reply in replies.items():
            local_routing = recipient.endswith("@localhost")
            expected = 550 if local_routing else 250
            assert reply[0] == expected, (listener, recipient, reply)
        client.rset()
        client.quit()


def test_trusted_networks_may_relay_without_auth(start_server, tmp_path):
    server = start_server(listeners=LISTENERS[:1], relay={"networks": ["127.0.0.2/32"]})
    with smtplib.SMTP("127.0.0.1", server.port("mta"), timeout=30) as client:
        client.ehlo("client.test")
        client.mail("a@remote.test")
        assert client.rcpt("user@remote.test")[0] == 554, "loopback is not trusted by default"
    with smtplib.SMTP("127.0.0.1", server.port("mta"), timeout=30, source_address=("127.0.0.2", 0)) as client:
        client.ehlo("client.test")
        client.mail("a@remote.test")
        assert client.rcpt("user@remote.test")[0] == 250
        assert client.rcpt("user%other.test@localhost")[0] == 550, "routing tricks are never honoured"


def test_senders_are_checked_and_rates_limited(auth_server):
    server = auth_server(abuse={"messages_per_hour": 2, "recipients_per_hour": 3})
    with smtplib.SMTP_SSL("127.0.0.1", server.port("submissions"), context=no_verify(), timeout=30) as client:
        client.ehlo("client.test")
        client.login("alice@localhost", PASSWORD)
        code, reply = client.mail("mallory@evil.test")
        assert (code, reply) == (553, b"5.7.1 Sender address rejected: not owned by user alice@localhost")
        assert client.mail("anyone@Example.ORG")[0] == 250, "a whole domain is allowed"
        assert client.rcpt("bob@localhost")[0] == 250
        assert client.rcpt("carol@localhost")[0] == 250
        client.rset()
        assert client.mail("")[0] == 250, "the null sender"
        assert client.rcpt("dave@localhost")[0] == 250
        assert client.rcpt("erin@localhost") == (450, b"4.7.1 Rate limit exceeded, try again later")
        client.rset()
        assert client.mail("alice@localhost") == (450, b"4.7.1 Rate limit exceeded, try again later")


def test_accounts_from_the_cli_and_the_config(start_server, tmp_path):
    data = tmp_path / "cli-data"
    add_user(data, "Frank@Localhost", PASSWORD)
    listed = subprocess.run([str(BINARY), "user", "list", "--data", str(data)], capture_output=True, text=True, timeout=30)
    assert listed.stdout == "frank@localhost\tenabled\tfrank@localhost\n"
    # A configured account, with hashes made by the CLI in another data directory.
    other = tmp_path / "hash-source"
    add_user(other, "app@localhost", "app password")
    row = sqlite3.connect(other / "accounts.db").execute("SELECT password_hash, scram FROM account").fetchone()
    server = start_server(
        listeners=LISTENERS[2:],
        data_dir=data,
        abuse={"auth_free_failures": 20},
        auth={"accounts": [{"name": "app@localhost", "password_hash": row[0], "scram": row[1], "senders": ["*"]}]},
    )

    def login(user, password):
        with smtplib.SMTP_SSL("127.0.0.1", server.port("submissions"), context=no_verify(), timeout=30) as client:
            client.ehlo("client.test")
            try:
                client.login(user, password)
                return True
            except smtplib.SMTPAuthenticationError:
                return False

    assert login("frank@localhost", PASSWORD)
    assert not login("frank@localhost", "nope")
    assert login("app@localhost", "app password")
    # Changes made while the server runs apply at the next login.
    subprocess.run([str(BINARY), "user", "disable", "frank@localhost", "--data", str(data)], check=True, timeout=30, capture_output=True)
    assert not login("frank@localhost", PASSWORD)
    subprocess.run([str(BINARY), "user", "enable", "frank@localhost", "--data", str(data)], check=True, timeout=30, capture_output=True)
    assert login("frank@localhost", PASSWORD)
    subprocess.run(
        [str(BINARY), "user", "passwd", "frank@localhost", "--data", str(data)], input="new pw\n", text=True, check=True, timeout=60, capture_output=True
    )
    assert login("frank@localhost", "new pw") and not login("frank@localhost", PASSWORD)
    subprocess.run([str(BINARY), "user", "remove", "frank@localhost", "--data", str(data)], check=True, timeout=30, capture_output=True)
    assert not login("frank@localhost", "new pw")


def test_connection_rate_per_address(start_server):
    server = start_server(listeners=LISTENERS[:1], abuse={"connection_rate": 3})
    for _ in range(3):
        with socket.create_connection(("127.0.0.1", server.port("mta")), timeout=10) as sock:
            assert sock.recv(200).startswith(b"220 ")
    with socket.create_connection(("127.0.0.1", server.port("mta")), timeout=10) as sock:
        assert sock.recv(200) == b"421 4.7.0 Too many connections per minute from this address, try again later\r\n"
    # Another address has its own count.
    with socket.create_connection(("127.0.0.1", server.port("mta")), timeout=10, source_address=("127.0.0.2", 0)) as sock:
        assert sock.recv(200).startswith(b"220 ")
