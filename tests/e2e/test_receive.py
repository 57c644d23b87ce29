"""Receiving and local delivery, driven by Python's smtplib and raw sockets."""

import os
import re
import smtplib
import stat
import subprocess
import time

import pytest
from pathlib import Path
from conftest import RawClient, client_tls_context

QUEUED = re.compile(r"Ok: queued as ([0-9A-Z]{13})")


def split_message(raw):
    header, _, body = raw.partition(b"\r\n\r\n")
    return header.decode("utf-8", "replace"), body


def queue_id(reply_text):
    match = QUEUED.search(reply_text if isinstance(reply_text, str) else reply_text.decode())
    assert match, reply_text
    return match.group(1)


def test_smtplib_plain_delivery_is_byte_exact(server):
    body = b"Subject: hello\r\nFrom: a@example.org\r\n\r\nline one\r\n.leading dot\r\n\r\nlast line\r\n"
    with smtplib.SMTP("127.0.0.1", server.port()) as client:
        code, _ = client.ehlo("client.example")
        assert code == 250
        assert client.has_extn("pipelining") and client.has_extn("chunking") and client.has_extn("starttls")
        assert client.esmtp_features["size"] == str(25 * 1024 * 1024)
        client.mail("alice@example.org")
        client.rcpt("bob@localhost")
        code, reply = client.data(body)
        assert code == 250
        qid = queue_id(reply)
    [message] = server.wait_for_messages("bob", 1)
    header, delivered_body = split_message(message)
    assert header.startswith("Return-Path: <alice@example.org>\r\nDelivered-To: bob@localhost\r\nReceived: from client.example")
    assert f"with ESMTP id {qid}" in header
    assert "for <bob@localhost>" in header
    assert "127.0.0.1" in header
    # The stored message is the received one with our trace fields in front.
    assert message.endswith(body)
    assert delivered_body == b"line one\r\n.leading dot\r\n\r\nlast line\r\n"
    assert server.messages("bob") == [message], "exactly once"


def test_each_recipient_gets_its_copy_and_unknown_users_are_refused(start_server):
    server = start_server(local={"mailboxes": ["alice", "bob", "carol"]})
    with smtplib.SMTP("127.0.0.1", server.port()) as client:
        client.ehlo("c.example")
        client.mail("sender@example.org")
        assert client.rcpt("alice@localhost")[0] == 250
        assert client.rcpt("Bob@LOCALHOST")[0] == 250
        code, text = client.rcpt("nobody@localhost")
        assert (code, text[:5]) == (550, b"5.1.1")
        code, text = client.rcpt("someone@example.com")
        assert (code, text[:5]) == (554, b"5.7.1")
        assert client.rcpt("<Postmaster>")[0] == 250
        assert client.rcpt("postmaster@localhost")[0] == 250
        assert client.data(b"Subject: x\r\n\r\nhi\r\n")[0] == 250
    assert len(server.wait_for_messages("alice", 1)) == 1
    assert b"Delivered-To: Bob@localhost" in server.wait_for_messages("bob", 1)[0]
    # <Postmaster> and postmaster@localhost reach the same mailbox once.
    assert len(server.wait_for_messages("postmaster", 1)) == 1
    server.wait_until_queue_empty()
    assert len(server.messages("postmaster")) == 1
    assert not server.maildir("nobody").exists()


def test_aliases_and_plus_addressing(start_server):
    server = start_server(
        local={"mailboxes": ["alice", "bob"], "aliases": {"team": ["alice", "bob"], "boss": ["alice"]}}
    )
    with smtplib.SMTP("127.0.0.1", server.port()) as client:
        client.sendmail("s@example.org", ["team@localhost"], b"Subject: team\r\n\r\nto the team\r\n")
        client.sendmail("s@example.org", ["alice+lists@localhost"], b"Subject: plus\r\n\r\nplus\r\n")
        client.sendmail("s@example.org", ["boss@localhost", "alice@localhost"], b"Subject: dup\r\n\r\nonce\r\n")
    alice = server.wait_for_messages("alice", 3)
    bob = server.wait_for_messages("bob", 1)
    assert any(b"Subject: team" in m for m in bob)
    assert sum(b"Subject: team" in m for m in alice) == 1
    plus = [m for m in alice if b"Subject: plus" in m]
    assert len(plus) == 1 and b"Delivered-To: alice+lists@localhost\r\n" in plus[0]
    server.wait_until_queue_empty()
    assert sum(b"Subject: dup" in m for m in server.messages("alice")) == 1, "one copy per mailbox"


def test_8bit_and_binary_bodies_are_byte_exact(server):
    eight_bit = "Subject: 8bit\r\n\r\nGrüße, ½ € ✓\r\n".encode()
    with smtplib.SMTP("127.0.0.1", server.port()) as client:
        client.ehlo("c")
        client.sendmail("a@example.org", ["eight@localhost"], eight_bit, mail_options=["BODY=8BITMIME"])
    assert server.wait_for_messages("eight", 1)[0].endswith(eight_bit)

    binary = b"Subject: bin\r\n\r\n" + bytes(range(256)) + b"\n.\n\r.\r\x00end"
    raw = RawClient(server.port())
    raw.expect(220)
    raw.command("EHLO c", 250)
    raw.send(f"MAIL FROM:<a@example.org> BODY=BINARYMIME\r\nRCPT TO:<bin@localhost>\r\nBDAT {len(binary)} LAST\r\n".encode() + binary)
    raw.expect(250)
    raw.expect(250)
    qid = queue_id(raw.expect(250)[0])
    raw.command("QUIT", 221)
    [message] = server.wait_for_messages("bin", 1)
    assert message.endswith(binary)
    assert f"id {qid}".encode() in message


def test_starttls_with_smtplib(server):
    with smtplib.SMTP("127.0.0.1", server.port()) as client:
        client.ehlo("c")
        client.starttls(context=client_tls_context())
        client.ehlo("c")
        assert not client.has_extn("starttls"), "never offered again"
        client.sendmail("a@example.org", ["tls@localhost"], b"Subject: tls\r\n\r\nsecret\r\n")
    [message] = server.wait_for_messages("tls", 1)
    assert b"with ESMTPS id" in message
    assert b"(using TLSv1.3 with cipher" in message


def test_implicit_tls_with_smtplib(server):
    with smtplib.SMTP_SSL("127.0.0.1", server.port("smtps"), context=client_tls_context()) as client:
        client.ehlo("c")
        assert not client.has_extn("starttls")
        client.sendmail("a@example.org", ["implicit@localhost"], b"Subject: 465\r\n\r\nhi\r\n")
    assert b"with ESMTPS id" in server.wait_for_messages("implicit", 1)[0]


@pytest.mark.filterwarnings("ignore::DeprecationWarning")
def test_only_tls_1_2_and_1_3_are_offered(server):
    import socket
    import ssl

    for version, name in [(ssl.TLSVersion.TLSv1_2, "TLSv1.2"), (ssl.TLSVersion.TLSv1_3, "TLSv1.3")]:
        context = client_tls_context()
        context.minimum_version = context.maximum_version = version
        with socket.create_connection(("127.0.0.1", server.port("smtps")), timeout=10) as sock:
            with context.wrap_socket(sock, server_hostname="mx.test") as tls:
                assert tls.version() == name
                assert tls.recv(100).startswith(b"220 ")
    # A client limited to TLS 1.0/1.1 gets no session. (The local OpenSSL may refuse these
    # versions by itself too; openssl s_client below asks the server directly.)
    result = subprocess.run(
        ["openssl", "s_client", "-connect", f"127.0.0.1:{server.port('smtps')}", "-tls1_1", "-cipher", "ALL:@SECLEVEL=0"],
        input="", capture_output=True, text=True, timeout=30,
    )
    assert result.returncode != 0, result.stdout
    assert "no peer certificate available" in result.stdout, result.stdout
    assert "Cipher    : 0000" in result.stdout, result.stdout
    # The server is still serving.
    with smtplib.SMTP_SSL("127.0.0.1", server.port("smtps"), context=client_tls_context()) as client:
        assert client.noop()[0] == 250


def test_smtputf8_address_and_received_keyword(server):
    message = "Subject: ünïcödé\r\n\r\nhéllo\r\n".encode()
    with smtplib.SMTP("127.0.0.1", server.port()) as client:
        client.ehlo("c")
        assert client.has_extn("smtputf8")
        client.starttls(context=client_tls_context())
        client.ehlo("c")
        # smtplib only switches to UTF-8 commands inside sendmail(); this test sends them itself.
        client.command_encoding = "utf-8"
        code, _ = client.mail("jösé@exämple.org", ["SMTPUTF8", "BODY=8BITMIME"])
        assert code == 250
        assert client.rcpt("δοκιμή@localhost")[0] == 250
        assert client.data(message)[0] == 250
        client.rset()
        client.command_encoding = "utf-8"  # rset() puts it back to ASCII
        assert client.mail("plain@example.org")[0] == 250
        code, text = client.rcpt("δοκιμή@localhost")
        assert (code, text[:5]) == (553, b"5.6.7")
    [delivered] = server.wait_for_messages("δοκιμή", 1)
    assert b"with UTF8SMTPS id" in delivered
    assert delivered.endswith(message)


def test_dsn_parameters_are_kept_in_the_queue_and_delivery_is_retried(start_server):
    import json
    import sqlite3

    server = start_server(delivery={"retry_initial": "1s", "retry_max": "1s"})
    # A file where the Maildir should be: delivery fails temporarily and the message waits
    # in the queue, where its DSN data can be read back.
    blocker = server.data_dir / "maildir" / "dsn"
    blocker.write_bytes(b"not a directory")
    with smtplib.SMTP("127.0.0.1", server.port()) as client:
        client.ehlo("c")
        assert client.has_extn("dsn")
        assert client.mail("a@example.org", ["RET=HDRS", "ENVID=QQ+2Bid"])[0] == 250
        code, _ = client.rcpt("dsn@localhost", ["NOTIFY=SUCCESS,FAILURE", "ORCPT=rfc822;dsn+2Balias@localhost"])
        assert code == 250
        assert client.data(b"Subject: dsn\r\n\r\nx\r\n")[0] == 250
        code, text = client.mail("a@example.org", ["RET=SOMETIMES"])
        assert (code, text[:5]) == (501, b"5.5.4")
        code, text = client.mail("a@example.org", ["FOO=BAR"])
        assert (code, text[:5]) == (555, b"5.5.4")

    db = server.data_dir / "spool" / "queue.db"

    def queued_recipients():
        """(envelope, address, notify, orcpt_type, orcpt_address, status, last_error) of every
        recipient in the spool: in the recipient table, or still inline in the message row
        (pending recipients of a message not yet tried)."""
        connection = sqlite3.connect(f"file:{db}?mode=ro", uri=True, timeout=10)
        try:
            rows = connection.execute(
                "SELECT envelope, address, notify, orcpt_type, orcpt_address, status, last_error "
                "FROM message JOIN recipient ON recipient.message_id = message.id"
            ).fetchall()
            for envelope, inline in connection.execute(
                "SELECT envelope, recipients FROM message WHERE recipients IS NOT NULL"
            ):
                for r in json.loads(inline):
                    rows.append((envelope, r["address"], r["notify"], r["orcpt_type"], r["orcpt_address"], "pending", None))
            return rows
        finally:
            connection.close()

    deadline = time.time() + 20
    while True:
        rows = queued_recipients()
        if rows and rows[0][5] == "deferred" or time.time() > deadline:
            break
        time.sleep(0.1)
    [(envelope, _, notify, orcpt_type, orcpt_address, status, last_error)] = rows
    assert status == "deferred" and last_error, (status, last_error)
    envelope = json.loads(envelope)
    assert envelope["envid"] == "QQ+id" and envelope["ret"] == "HDRS", envelope
    assert (notify, orcpt_type, orcpt_address) == ("SUCCESS,FAILURE", "rfc822", "dsn+alias@localhost")
    # Once the obstacle is gone, the retry delivers it.
    blocker.unlink()
    [message] = server.wait_for_messages("dsn", 1)
    assert message.endswith(b"Subject: dsn\r\n\r\nx\r\n")
    # NOTIFY=SUCCESS: the original is gone, and a "delivered" notice for the sender waits in
    # its place (a@example.org cannot be reached from the test machine), from the null
    # sender with NOTIFY=NEVER.
    deadline = time.time() + 20
    while True:
        rows = queued_recipients()
        if len(rows) == 1 and json.loads(rows[0][0])["sender"] == "" or time.time() > deadline:
            break
        time.sleep(0.1)
    [(envelope, address, notify, *_)] = rows
    assert (json.loads(envelope)["sender"], address, notify) == ("", "a@example.org", "NEVER")


def test_an_idn_domain_is_local_as_u_label_and_as_a_label(start_server):
    """local.domains lists a U-label; mail to its A-label (plain ASCII) and to the U-label
    (SMTPUTF8) both arrive in the same mailbox, and a look-alike domain is not ours."""
    server = start_server(local={"domains": ["bücher.example"]})
    with smtplib.SMTP("127.0.0.1", server.port()) as client:
        client.sendmail("a@example.org", ["anna@XN--BCHER-KVA.example"], b"Subject: a-label\r\n\r\nx\r\n")
        client.ehlo("c")
        client.command_encoding = "utf-8"  # smtplib sends UTF-8 commands only inside sendmail()
        assert client.mail("a@example.org", ["SMTPUTF8"])[0] == 250
        assert client.rcpt("anna@bücher.example")[0] == 250
        assert client.data(b"Subject: u-label\r\n\r\nx\r\n")[0] == 250
        client.command_encoding = "ascii"
        assert client.mail("a@example.org")[0] == 250
        code, text = client.rcpt("anna@bucher.example")
        assert (code, text[:5]) == (554, b"5.7.1"), text  # not ours: no relaying
    delivered = server.wait_for_messages("anna", 2)
    subjects = sorted(re.search(rb"Subject: (\S+)", raw).group(1) for raw in delivered)
    assert subjects == [b"a-label", b"u-label"]


def test_size_limits(start_server):
    server = start_server(limits={"message_size": 10000})
    with smtplib.SMTP("127.0.0.1", server.port()) as client:
        client.ehlo("c")
        assert client.esmtp_features["size"] == "10000"
        code, text = client.mail("a@example.org", ["SIZE=10001"])
        assert (code, text[:5]) == (552, b"5.3.4")
        client.mail("a@example.org")
        client.rcpt("big@localhost")
        code, text = client.data(b"Subject: big\r\n\r\n" + b"x" * 70 + b"\r\n" + (b"y" * 70 + b"\r\n") * 200)
        assert (code, text[:5]) == (552, b"5.3.4")
        client.mail("a@example.org")
        client.rcpt("big@localhost")
        assert client.data(b"Subject: small\r\n\r\nok\r\n")[0] == 250
    assert len(server.wait_for_messages("big", 1)) == 1


def test_too_many_recipients(start_server):
    server = start_server(limits={"recipients": 3})
    with smtplib.SMTP("127.0.0.1", server.port()) as client:
        client.ehlo("c")
        client.mail("a@example.org")
        for i in range(3):
            assert client.rcpt(f"u{i}@localhost")[0] == 250
        code, text = client.rcpt("u3@localhost")
        assert (code, text[:5]) == (452, b"4.5.3")
        assert client.data(b"Subject: x\r\n\r\nx\r\n")[0] == 250


def test_mail_loop_is_refused(server):
    hops = b"".join(b"Received: from hop%d by somewhere; Thu, 1 Jan 1970 00:00:00 +0000\r\n" % i for i in range(101))
    with smtplib.SMTP("127.0.0.1", server.port()) as client:
        client.ehlo("c")
        client.mail("a@example.org")
        client.rcpt("loop@localhost")
        code, text = client.data(hops + b"Subject: loop\r\n\r\nx\r\n")
        assert (code, text[:5]) == (554, b"5.4.6")
        client.mail("a@example.org")
        client.rcpt("loop@localhost")
        assert client.data(hops[: -len(hops) // 101] + b"Subject: ok\r\n\r\nx\r\n")[0] == 250


def test_vrfy_expn_help_noop_rset(server):
    raw = RawClient(server.port())
    assert raw.expect(220)[0].startswith("220 mx.test ESMTP")
    raw.command("EHLO c", 250)
    assert raw.command("VRFY bob", 252)[0].startswith("252 2.5.0")
    assert raw.command("EXPN staff", 502)[0].startswith("502 5.5.1")
    assert raw.command("HELP", 214)[-1].startswith("214 2.0.0")
    raw.command("NOOP", 250)
    raw.command("MAIL FROM:<a@example.org>", 250)
    raw.command("RSET", 250)
    assert raw.command("RCPT TO:<b@localhost>", 503)[0].startswith("503 5.5.1")
    raw.command("FOO", 500)
    assert raw.command("MAIL FROM:<a@example.org", 501)[0].startswith("501 5.5.2")
    raw.command("QUIT", 221)
    assert raw.closed()


def test_rfc5321_appendix_d_session(start_server):
    server = start_server(local={"domains": ["foo.com"], "mailboxes": ["jones", "brown"]})
    raw = RawClient(server.port())
    raw.expect(220)
    lines = raw.command("EHLO bar.com", 250)
    assert lines[0] == "250-mx.test"
    raw.command("MAIL FROM:<Smith@bar.com>", 250)
    raw.command("RCPT TO:<Jones@foo.com>", 250)
    assert raw.command("RCPT TO:<Green@foo.com>", 550)[0].startswith("550 5.1.1")
    raw.command("RCPT TO:<Brown@foo.com>", 250)
    raw.command("DATA", 354)
    raw.send("Blah blah blah...\r\n...etc. etc. etc.\r\n.\r\n")
    raw.expect(250)
    raw.command("QUIT", 221)
    for mailbox in ("jones", "brown"):
        assert server.wait_for_messages(mailbox, 1)[0].endswith(b"Blah blah blah...\r\n..etc. etc. etc.\r\n")


def test_pipelining_replies_in_order_from_one_write(server):
    raw = RawClient(server.port())
    raw.expect(220)
    raw.command("EHLO c", 250)
    raw.send(
        "MAIL FROM:<a@example.org>\r\nRCPT TO:<p1@localhost>\r\nRCPT TO:<x@remote.example>\r\n"
        "RCPT TO:<p2@localhost>\r\nDATA\r\nSubject: piped\r\n\r\nbody\r\n.\r\n"
        "MAIL FROM:<>\r\nRCPT TO:<p1@localhost>\r\nBDAT 7\r\nSubjectBDAT 8 LAST\r\n: b\r\n\r\nxNOOP\r\nQUIT\r\n"
    )
    codes = [raw.reply()[0] for _ in range(12)]
    assert codes == [250, 250, 554, 250, 354, 250, 250, 250, 250, 250, 250, 221]
    server.wait_for_messages("p2", 1)
    assert len(server.wait_for_messages("p1", 2)) == 2


def test_spool_and_maildir_are_private(server):
    with smtplib.SMTP("127.0.0.1", server.port()) as client:
        client.sendmail("a@example.org", ["priv@localhost"], b"Subject: p\r\n\r\nx\r\n")
        client.sendmail("a@example.org", ["priv@localhost"], b"Subject: big\r\n\r\n" + (b"y" * 70 + b"\r\n") * 400)
    server.wait_for_messages("priv", 2)
    spool = server.data_dir / "spool"
    directories = [server.data_dir, spool, spool / "journal", spool / "segments", server.data_dir / "maildir", server.maildir("priv") / "new"]
    for path in directories:
        assert stat.S_IMODE(os.stat(path).st_mode) == 0o700, path
    files = [path for path in spool.iterdir() if path.is_file()]
    files += list((spool / "journal").iterdir()) + list((spool / "segments").iterdir())
    files += list((server.maildir("priv") / "new").iterdir())
    assert any(path.parent.name == "journal" for path in files)
    for path in files:
        assert stat.S_IMODE(os.stat(path).st_mode) == 0o600, path


def thread_niceness(pid):
    """Each thread name of process `pid` with the nice values of the threads so named."""
    niceness = {}
    for task in Path(f"/proc/{pid}/task").iterdir():
        name = (task / "comm").read_text().strip()
        # The command name is in parentheses and may contain spaces; fields follow it.
        fields = (task / "stat").read_text().rsplit(")", 1)[1].split()
        niceness.setdefault(name, set()).add(int(fields[16]))
    return niceness


SPOOL_BOOSTED = {"spool-writer", "spool-sync"}


def may_lower_nice(levels):
    """Whether a process like this one may lower its nice value by `levels` (root with
    CAP_SYS_NICE may; some containers' root may not)."""
    import subprocess
    import sys

    probe = f"import os; os.setpriority(os.PRIO_PROCESS, 0, max(os.getpriority(os.PRIO_PROCESS, 0) - {levels}, -20))"
    return subprocess.run([sys.executable, "-c", probe], capture_output=True).returncode == 0


def may_raise_nice_limit(levels):
    """Whether a process like this one may raise RLIMIT_NICE far enough for its threads to
    lower their nice value by `levels` once it is no longer root (needs CAP_SYS_RESOURCE)."""
    import subprocess
    import sys

    needed = 20 - max(os.getpriority(os.PRIO_PROCESS, 0) - levels, -20)
    probe = (
        "import resource; soft, hard = resource.getrlimit(resource.RLIMIT_NICE); "
        f"inf = resource.RLIM_INFINITY; resource.setrlimit(resource.RLIMIT_NICE, "
        f"(soft if soft == inf else max(soft, {needed}), hard if hard == inf else max(hard, {needed})))"
    )
    return subprocess.run([sys.executable, "-c", probe], capture_output=True).returncode == 0


def test_maildir_writers_run_below_and_the_spool_threads_above_the_sessions(start_server):
    """The threads that write Maildir copies run 10 nice levels below the rest of the server
    (README, Delivery), and mail still arrives through them; the spool's writer and sync
    threads, which every acknowledgement waits for, 5 above, where the system allows it."""
    server = start_server(delivery={"workers": 3})
    with smtplib.SMTP("127.0.0.1", server.port()) as client:
        client.sendmail("a@example.org", ["nice@localhost"], b"Subject: n\r\n\r\nx\r\n")
    server.wait_for_messages("nice", 1)
    niceness = thread_niceness(server.pid)
    base = os.getpriority(os.PRIO_PROCESS, 0)  # the server inherits the test's nice value
    writers = {name: nice for name, nice in niceness.items() if name.startswith("maildir-")}
    assert sorted(writers) == ["maildir-0", "maildir-1", "maildir-2"], niceness
    assert all(nice == {min(base + 10, 19)} for nice in writers.values()), niceness
    boosted = max(base - 5, -20) if may_lower_nice(5) else base
    assert {name: niceness.get(name) for name in SPOOL_BOOSTED} == {name: {boosted} for name in SPOOL_BOOSTED}, niceness
    others = {
        name: nice for name, nice in niceness.items() if not name.startswith("maildir-") and name not in SPOOL_BOOSTED
    }
    assert others and all(nice == {base} for nice in others.values()), niceness


def test_one_delivery_at_a_time_per_mailbox_delivers_every_copy_once(start_server):
    """With `delivery.mailbox_concurrency = 1`, messages whose recipients share mailboxes,
    listed in every order, from clients sending at once: each job takes its mailboxes in one
    order, so none waits for another forever, and every copy arrives exactly once."""
    import threading

    server = start_server(delivery={"workers": 2, "mailbox_concurrency": 1})
    orders = [["a", "b"], ["b", "a"], ["b", "c", "a"], ["c"], ["a"]]
    per_client = 20
    failures = []

    def send(client_number):
        try:
            with smtplib.SMTP("127.0.0.1", server.port()) as client:
                for n in range(per_client):
                    mailboxes = orders[(client_number + n) % len(orders)]
                    tag = f"{client_number}-{n}"
                    body = f"Subject: {tag}\r\nMessage-ID: <{tag}@test>\r\n\r\nx\r\n"
                    client.sendmail("s@example.org", [f"{m}@localhost" for m in mailboxes], body)
        except Exception as error:  # reported below; a thread cannot fail the test itself
            failures.append(error)

    threads = [threading.Thread(target=send, args=(number,)) for number in range(5)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert not failures, failures
    expected = {"a": set(), "b": set(), "c": set()}
    for client_number in range(5):
        for n in range(per_client):
            for mailbox in orders[(client_number + n) % len(orders)]:
                expected[mailbox].add(f"{client_number}-{n}")
    for mailbox, tags in expected.items():
        found = server.wait_for_messages(mailbox, len(tags))
        subjects = [re.search(rb"Subject: (\S+)", raw).group(1).decode() for raw in found]
        assert sorted(subjects) == sorted(tags), mailbox
    server.wait_until_queue_empty()


def test_root_binds_a_low_port_then_runs_as_the_configured_user(start_server):
    """Started as root with `user = "nobody"`: the server binds port 25, gives its data
    directory to nobody, drops privileges for good, and still receives and delivers."""
    import os
    import pwd
    import shutil
    import tempfile
    from pathlib import Path

    if os.geteuid() != 0:
        pytest.skip("needs root, as the test command runs")
    nobody = pwd.getpwnam("nobody")
    # Outside pytest's private (0700) directories, so that nobody can reach it.
    base = Path(tempfile.mkdtemp(prefix="postilion-drop-"))
    base.chmod(0o711)
    try:
        server = start_server(
            listeners=[{"name": "smtp", "address": "127.0.0.77:25"}],
            data_dir=base / "data",
            user="nobody",
        )
        status = Path(f"/proc/{server.pid}/status").read_text()
        uids = next(line for line in status.splitlines() if line.startswith("Uid:")).split()[1:]
        gids = next(line for line in status.splitlines() if line.startswith("Gid:")).split()[1:]
        assert uids == [str(nobody.pw_uid)] * 4, uids
        assert gids == [str(nobody.pw_gid)] * 4, gids
        assert server.port() == 25
        with smtplib.SMTP("127.0.0.77", 25, timeout=20) as client:
            client.sendmail("a@example.org", ["bob@localhost"], b"Subject: dropped\r\n\r\nx\r\n")
        [message] = server.wait_for_messages("bob", 1)
        assert message.endswith(b"Subject: dropped\r\n\r\nx\r\n")
        for path in [base / "data", *(base / "data").rglob("*")]:
            assert path.lstat().st_uid == nobody.pw_uid, path
        assert "privileges dropped" in server.log()
        # RLIMIT_NICE, raised before the drop, still lets the spool threads run higher; where
        # root may not raise it (no CAP_SYS_RESOURCE, as in some containers), they run at the
        # server's priority and the log says why.
        may_raise = may_raise_nice_limit(5)
        base_nice = os.getpriority(os.PRIO_PROCESS, 0)
        expected = max(base_nice - 5, -20) if may_raise else base_nice
        niceness = thread_niceness(server.pid)
        assert {name: niceness.get(name) for name in SPOOL_BOOSTED} == {name: {expected} for name in SPOOL_BOOSTED}, niceness
        assert may_raise or "the spool threads will run at the server's priority" in server.log()
    finally:
        shutil.rmtree(base, ignore_errors=True)
