"""kill -9 at random moments under load: every message that got a 250 is delivered (or
bounced), duplicates are counted and reported, and the spool drains to empty.

POSTILION_CRASH_ROUNDS sets the number of kill -9 rounds (default 5; bench/crash-loop.sh runs
the long version), POSTILION_CRASH_SEED replays the random choices of an earlier run.
"""

import os
import random
import re
import smtplib
import threading
import time
from collections import Counter

ROUNDS = int(os.environ.get("POSTILION_CRASH_ROUNDS", "5"))
CLIENTS = 8
# Bounds every load loop: messages per client per round, and seconds of load per round.
MAX_MESSAGES_PER_ROUND = 2000
MAX_LOAD_SECONDS = 2.0

SENDER = "loader@localhost"
MAILBOXES = ("crash0", "crash1", "crash2")
# A file where this mailbox's Maildir would be: its deliveries fail until delivery.max_lifetime
# is over, and then the message bounces to SENDER.
BLOCKED = "blocked"
MESSAGE_ID = re.compile(rb"Message-ID: <([^@>\s]+)@load\.test>")


class Load:
    """Client threads sending messages with unique Message-IDs; remembers, per Message-ID,
    the recipients a 250 at the end of data acknowledged."""

    def __init__(self, rng):
        self.rng = rng
        self.lock = threading.Lock()
        self.acknowledged = {}

    def client(self, port, name, stop):
        rng = random.Random(self.rng.random())
        n = 0
        while not stop.is_set() and n < MAX_MESSAGES_PER_ROUND:
            try:
                with smtplib.SMTP("127.0.0.1", port, timeout=10) as client:
                    client.ehlo(name)
                    while not stop.is_set() and n < MAX_MESSAGES_PER_ROUND:
                        n += 1
                        message_id = f"{name}-{n}"
                        recipients = [f"{MAILBOXES[n % len(MAILBOXES)]}@localhost"]
                        if rng.random() < 0.1:
                            recipients.append(f"{BLOCKED}@localhost")
                        body = (
                            f"Subject: crash test\r\nMessage-ID: <{message_id}@load.test>\r\n\r\n".encode()
                            + (b"x" * 76 + b"\r\n") * rng.randint(1, 250)
                        )
                        refused = client.sendmail(SENDER, recipients, body)
                        with self.lock:
                            self.acknowledged[message_id] = [r for r in recipients if r not in refused]
            except (OSError, smtplib.SMTPException):
                time.sleep(0.05)

    def run(self, port, round_number, stop):
        threads = [
            threading.Thread(target=self.client, args=(port, f"r{round_number}c{i}", stop), daemon=True)
            for i in range(CLIENTS)
        ]
        for thread in threads:
            thread.start()
        return threads


def found_message_ids(server, mailbox):
    """Message-ID -> number of files in the mailbox that carry it (a bounce carries the
    returned message)."""
    counts = Counter()
    for message in server.messages(mailbox):
        ids = set(MESSAGE_ID.findall(message))
        assert ids, message[:300]
        counts.update(id.decode() for id in ids)
    return counts


def run_crash_loop(start_server, rounds, report):
    seed = int(os.environ.get("POSTILION_CRASH_SEED", random.randrange(1 << 32)))
    rng = random.Random(seed)
    server = start_server(delivery={"retry_initial": "1s", "retry_max": "1s", "max_lifetime": "3s"})
    blocker = server.maildir(BLOCKED)
    blocker.parent.mkdir(parents=True, exist_ok=True)
    blocker.write_bytes(b"not a directory\n")
    load = Load(rng)
    moments = Counter()
    for round_number in range(rounds):
        if rng.random() < 0.25:
            # Killed during start-up recovery, before any client connects.
            time.sleep(rng.uniform(0.0, 0.3))
            server.kill9()
            server.start()
            moments["at start-up"] += 1
        stop = threading.Event()
        threads = load.run(server.port(), round_number, stop)
        time.sleep(rng.uniform(0.3, MAX_LOAD_SECONDS))
        if rng.random() < 0.5:
            # Right after the load stops, while deliveries are in flight.
            stop.set()
            time.sleep(rng.uniform(0.0, 0.05))
            moments["after the load"] += 1
        else:
            moments["under load"] += 1
        server.kill9()
        stop.set()
        for thread in threads:
            thread.join(30)
        server.start()
    # Every failing delivery to BLOCKED is retried until max_lifetime, then bounced.
    server.wait_until_queue_empty(timeout=120)

    delivered = Counter()
    for mailbox in MAILBOXES:
        delivered.update(found_message_ids(server, mailbox))
    bounced = found_message_ids(server, SENDER.split("@")[0])
    acknowledged = load.acknowledged
    missing_deliveries = sorted(
        message_id
        for message_id, recipients in acknowledged.items()
        if any(r.split("@")[0] in MAILBOXES for r in recipients) and delivered[message_id] == 0
    )
    missing_bounces = sorted(
        message_id
        for message_id, recipients in acknowledged.items()
        if f"{BLOCKED}@localhost" in recipients and bounced[message_id] == 0
    )
    duplicate_deliveries = sum(count - 1 for count in delivered.values() if count > 1)
    duplicate_bounces = sum(count - 1 for count in bounced.values() if count > 1)
    unacknowledged = len(delivered.keys() - acknowledged.keys())
    summary = (
        f"crash loop (seed {seed}): {rounds} kill -9 rounds ({dict(moments)}), "
        f"{len(acknowledged)} messages acknowledged with 250 "
        f"({sum(1 for r in acknowledged.values() if f'{BLOCKED}@localhost' in r)} with a bouncing recipient); "
        f"{len(missing_deliveries)} deliveries and {len(missing_bounces)} bounces missing; "
        f"duplicates: {duplicate_deliveries} deliveries, {duplicate_bounces} bounces; "
        f"{unacknowledged} delivered without their 250 reaching the client; spool empty"
    )
    report(summary)
    assert len(acknowledged) > 50, summary
    assert not missing_deliveries, f"{summary}: {missing_deliveries[:10]}"
    assert not missing_bounces, f"{summary}: {missing_bounces[:10]}"
    assert server.queued() == 0
    assert blocker.is_file()
    return summary


def test_kill9_randomized_loop_loses_nothing(start_server, capsys):
    def report(summary):
        with capsys.disabled():
            print(f"\n{summary}")

    run_crash_loop(start_server, ROUNDS, report)
