"""`postilion queue`: the queue read while the server runs, journal and database alike."""

import re
import smtplib
import subprocess
import time

from conftest import BINARY


def queue(server, command):
    done = subprocess.run(
        [str(BINARY), "queue", command, "--data", str(server.data_dir)], capture_output=True, text=True, timeout=30
    )
    assert done.returncode == 0, done.stderr
    return done.stdout


def test_queue_list_shows_waiting_mail_and_count_agrees(start_server):
    server = start_server(delivery={"retry_initial": "1h", "retry_max": "1h"})
    assert queue(server, "list") == "0 messages\n"
    # A file where the Maildir should be: delivery to "stuck" fails and waits for a retry.
    (server.data_dir / "maildir").mkdir(parents=True, exist_ok=True)
    (server.data_dir / "maildir" / "stuck").write_bytes(b"not a directory")
    with smtplib.SMTP("127.0.0.1", server.port()) as client:
        client.ehlo("c")
        client.mail("alice@example.org")
        client.rcpt("stuck@localhost")
        client.rcpt("fine@localhost")
        code, text = client.data(b"Subject: q\r\n\r\nwaiting\r\n")
        assert code == 250
    queue_id = re.search(rb"queued as ([0-9A-Z]{13})", text).group(1).decode()
    server.wait_for_messages("fine", 1)
    deadline = time.time() + 20
    while "deferred" not in (listing := queue(server, "list")) and time.time() < deadline:
        time.sleep(0.1)
    lines = listing.splitlines()
    assert lines[0].startswith(f"{queue_id}  "), listing
    assert "from <alice@example.org>" in lines[0], listing
    assert re.match(r"    <stuck@localhost>  deferred after 1 attempt, next .*: ", lines[1]), listing
    assert re.match(r"    <fine@localhost>  delivered ", lines[2]), listing
    assert lines[-1] == "1 message", listing
    assert queue(server, "count") == "1\n"
    server.stop()
    # The same with the server stopped.
    assert queue(server, "count") == "1\n"
