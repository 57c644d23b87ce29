"""Graceful shutdown: a message in DATA may finish; idle sessions get 421."""

import signal
import time

from conftest import RawClient


def test_sigterm_lets_data_finish_and_421s_idle_sessions(start_server):
    server = start_server(timeouts={"shutdown_grace": "10s"})
    idle = RawClient(server.port())
    idle.expect(220)
    idle.command("EHLO idle", 250)
    busy = RawClient(server.port())
    busy.expect(220)
    busy.command("EHLO busy", 250)
    busy.command("MAIL FROM:<a@example.org>", 250)
    busy.command("RCPT TO:<late@localhost>", 250)
    busy.command("DATA", 354)
    busy.send("Subject: in flight\r\n\r\nfirst half\r\n")
    server.proc.send_signal(signal.SIGTERM)
    assert idle.expect(421)[0] == "421 4.3.2 Service shutting down, closing connection"
    assert idle.closed()
    time.sleep(0.5)
    busy.send("second half\r\n.\r\n")
    assert busy.expect(250)[0].startswith("250 2.0.0 Ok: queued as")
    assert busy.expect(421)[0].startswith("421 4.3.2")
    assert server.proc.wait(30) == 0
    # The accepted message survives the restart and is delivered.
    server.start()
    [message] = server.wait_for_messages("late", 1)
    assert message.endswith(b"first half\r\nsecond half\r\n")


def test_grace_period_is_bounded(start_server):
    server = start_server(timeouts={"shutdown_grace": "1s"})
    slow = RawClient(server.port())
    slow.expect(220)
    slow.command("EHLO slow", 250)
    slow.command("MAIL FROM:<a@example.org>", 250)
    slow.command("RCPT TO:<slow@localhost>", 250)
    slow.command("DATA", 354)
    slow.send("Subject: never finished\r\n")
    started = time.time()
    server.proc.send_signal(signal.SIGTERM)
    assert slow.expect(421)[0].startswith("421 4.3.2")
    assert server.proc.wait(30) == 0
    assert time.time() - started < 10
