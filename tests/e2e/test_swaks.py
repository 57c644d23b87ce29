"""Interoperability with swaks, an SMTP client nobody here wrote."""

import subprocess


def swaks(*args):
    result = subprocess.run(["swaks", "--hide-informational", *args], capture_output=True, text=True, timeout=60)
    return result.returncode, result.stdout + result.stderr


def test_swaks_plain(server):
    code, out = swaks("--server", f"127.0.0.1:{server.port()}", "--from", "swaks@example.org", "--to", "plain@localhost",
                      "--helo", "swaks.example", "--header", "Subject: swaks plain")
    assert code == 0, out
    assert "250 2.0.0 Ok: queued as" in out
    [message] = server.wait_for_messages("plain", 1)
    assert b"Received: from swaks.example" in message and b"with ESMTP id" in message
    assert b"Subject: swaks plain" in message


def test_swaks_starttls(server):
    code, out = swaks("--server", f"127.0.0.1:{server.port()}", "--tls", "--from", "swaks@example.org",
                      "--to", "starttls@localhost", "--header", "Subject: swaks tls")
    assert code == 0, out
    assert b"with ESMTPS id" in server.wait_for_messages("starttls", 1)[0]


def test_swaks_implicit_tls(server):
    code, out = swaks("--server", f"127.0.0.1:{server.port('smtps')}", "--tlsc", "--from", "swaks@example.org",
                      "--to", "tlsc@localhost")
    assert code == 0, out
    assert b"with ESMTPS id" in server.wait_for_messages("tlsc", 1)[0]


def test_swaks_pipelining_and_chunking(server):
    code, out = swaks("--server", f"127.0.0.1:{server.port()}", "--pipeline", "--from", "swaks@example.org",
                      "--to", "piped@localhost,piped2@localhost")
    assert code == 0, out
    server.wait_for_messages("piped", 1)
    server.wait_for_messages("piped2", 1)


def test_swaks_refused_relay(server):
    code, out = swaks("--server", f"127.0.0.1:{server.port()}", "--from", "swaks@example.org", "--to", "someone@example.com")
    assert code != 0
    assert "554 5.7.1 Relay access denied" in out


def test_openssl_s_client_starttls(server):
    result = subprocess.run(
        ["openssl", "s_client", "-connect", f"127.0.0.1:{server.port()}", "-starttls", "smtp", "-quiet", "-tls1_2"],
        input="EHLO openssl.example\r\nQUIT\r\n", capture_output=True, text=True, timeout=30,
    )
    assert "250-mx.test" in result.stdout, result.stdout + result.stderr
    assert "STARTTLS" not in result.stdout.split("250-mx.test", 1)[1]
    assert "221 2.0.0 Bye" in result.stdout
