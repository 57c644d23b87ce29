"""kill -9 at random moments under load: every message that got a 250 is delivered."""

import random
import re
import smtplib
import threading
import time

TOKEN = re.compile(rb"X-Token: (\S+)")


def client_loop(port, name, stop, acknowledged, lock):
    n = 0
    while not stop.is_set():
        try:
            with smtplib.SMTP("127.0.0.1", port, timeout=10) as client:
                client.ehlo(name)
                while not stop.is_set():
                    n += 1
                    token = f"{name}-{n}"
                    body = f"Subject: crash test\r\nX-Token: {token}\r\n\r\n".encode() + (b"x" * 76 + b"\r\n") * random.randint(1, 250)
                    client.sendmail("load@example.org", [f"crash{n % 3}@localhost"], body)
                    with lock:
                        acknowledged.add(token)
        except (OSError, smtplib.SMTPException):
            time.sleep(0.05)


def delivered_tokens(server):
    counts = {}
    for mailbox in ("crash0", "crash1", "crash2"):
        for message in server.messages(mailbox):
            match = TOKEN.search(message)
            assert match, message[:200]
            token = match.group(1).decode()
            counts[token] = counts.get(token, 0) + 1
    return counts


def test_kill9_under_load_loses_nothing(start_server, capsys):
    random.seed()
    server = start_server(delivery={"retry_initial": "1s"})
    acknowledged = set()
    lock = threading.Lock()
    rounds = 6
    for round_number in range(rounds):
        stop = threading.Event()
        clients = [
            threading.Thread(target=client_loop, args=(server.port(), f"r{round_number}c{i}", stop, acknowledged, lock))
            for i in range(8)
        ]
        for client in clients:
            client.start()
        time.sleep(random.uniform(0.3, 2.0))
        # Every other round kills right after load stops, while deliveries are in flight.
        if round_number % 2:
            stop.set()
            time.sleep(random.uniform(0.0, 0.05))
        server.kill9()
        stop.set()
        for client in clients:
            client.join(30)
        server.start()
    server.wait_until_queue_empty(timeout=120)
    counts = delivered_tokens(server)
    missing = sorted(acknowledged - counts.keys())
    duplicates = sum(c - 1 for c in counts.values() if c > 1)
    unacknowledged = len(counts.keys() - acknowledged)
    report = (
        f"crash test: {rounds} kill -9 rounds, {len(acknowledged)} messages acknowledged with 250, "
        f"{len(missing)} missing, {duplicates} duplicate deliveries, "
        f"{unacknowledged} delivered without a 250 reaching the client"
    )
    with capsys.disabled():
        print(f"\n{report}")
    assert len(acknowledged) > 100, report
    assert not missing, f"{report}: {missing[:10]}"
