"""Review of the queue manager, notifications, outbound delivery, relay policy and privilege
handling: each test either pins down behaviour that is right, or (marked xfail, strict) shows a
defect with the smallest setup that makes it visible. All traffic stays on loopback.
"""

import base64
import ctypes
import os
import shutil
import smtplib
import socket
import subprocess
import tempfile
import threading
import time
from pathlib import Path

import pytest
from scramp import ScramClient

from conftest import RawClient, add_user, no_verify
from test_outbound import bounces, relay, report_fields, send

PASSWORD = "correct horse battery staple"


def scram_login(client, user, password):
    """SCRAM-SHA-256 (offered before TLS) with an independent client; returns the final code."""
    scram = ScramClient(["SCRAM-SHA-256"], user, password)
    code, challenge = client.docmd("AUTH SCRAM-SHA-256 " + base64.b64encode(scram.get_client_first().encode()).decode())
    assert code == 334, (code, challenge)
    scram.set_server_first(base64.b64decode(challenge).decode())
    code, challenge = client.docmd(base64.b64encode(scram.get_client_final().encode()).decode())
    assert code == 334, (code, challenge)
    scram.set_server_final(base64.b64decode(challenge).decode())
    return client.docmd("")[0]


# ---------------------------------------------------------------------------------------------
# Relay policy


def test_relay_permission_from_auth_before_starttls_does_not_survive_it(start_server, tmp_path):
    data = tmp_path / "data"
    add_user(data, "alice@localhost", PASSWORD, "--sender", "*")
    server = start_server(
        listeners=[{"name": "mta", "address": "127.0.0.1:0", "role": "mta", "tls": "starttls", "auth": True}],
        data_dir=data,
    )
    with smtplib.SMTP("127.0.0.1", server.port("mta"), timeout=30) as client:
        client.ehlo("client.test")
        assert scram_login(client, "alice@localhost", PASSWORD) == 235
        assert client.mail("alice@localhost")[0] == 250
        assert client.rcpt("user@remote.test")[0] == 250, "authenticated: may relay"
        client.rset()
        client.starttls(context=no_verify())
        client.ehlo("client.test")
        # RFC 3207 section 4.2: everything learnt before TLS is forgotten, the identity too
        # (the session agrees: AUTH would be accepted again).
        assert client.mail("alice@localhost")[0] == 250
        code, reply = client.rcpt("user@remote.test")
        assert code == 554, f"relayed without authentication inside TLS: {code} {reply}"


RELAY_TRICKS_MORE = [
    "postmaster@remote.test",
    "Postmaster@[127.0.0.1]",
    "user@[127.0.0.1]",
    "@localhost:user@remote.test",
    "@localhost,@localhost:user@remote.test",
    '"user\\@remote.test"@localhost',
    '"user%remote.test"@LOCALHOST.',
    "remote.test!user@LocalHost",
    "user@remote.test.",
    "user@localhost.remote.test",
    "user@remote.test@localhost",
    "user@localhost\u3002remote.test",
]


def test_outsiders_cannot_relay_through_catch_all_aliases_pipelining_bdat_or_resets(start_server, dns, smtp_peers):
    """Catch-all and aliases configured, loopback untrusted: no form of a remote recipient is
    taken, pipelined, after RSET, after a refused STARTTLS-less AUTH, or with BDAT; nothing
    reaches a peer except the alias's own configured forward."""
    peers = smtp_peers(1)
    dns.add("remote.test", "A", "127.0.0.2")
    server = start_server(
        listeners=[{"name": "mta", "address": "127.0.0.1:0", "tls": "starttls"}],
        dns={"nameservers": [f"127.0.0.1:{dns.address[1]}"], "cache_size": 0},
        outbound={"port": peers.port},
        local={"mailboxes": ["alice", "bob"], "catch_all": "bob", "aliases": {"team": ["alice", "fwd@remote.test"]}},
    )
    raw = RawClient(server.port("mta"))
    raw.expect(220)
    raw.command("EHLO client.test", 250)
    raw.command("MAIL FROM:<someone@remote.test>", 250)
    refused = {}
    for recipient in RELAY_TRICKS_MORE:
        raw.send(f"RCPT TO:<{recipient}>\r\n")
        code, lines = raw.reply()
        if code < 500:
            refused[recipient] = lines
    assert refused == {}, refused
    # Pipelined group: remote, local, remote, then BDAT with content.
    raw.send(
        "RSET\r\nMAIL FROM:<someone@remote.test>\r\nRCPT TO:<x@remote.test>\r\n"
        "RCPT TO:<whoever@localhost>\r\nRCPT TO:<y@REMOTE.test>\r\nBDAT 20 LAST\r\n"
        "Subject: b\r\n\r\nbdat\r\n"
    )
    codes = [raw.reply()[0] for _ in range(6)]
    assert codes == [250, 250, 554, 250, 554, 250], codes
    raw.command("AUTH PLAIN AGFsaWNlAHg=", 502)
    raw.command("MAIL FROM:<someone@remote.test>", 250)
    raw.command("RCPT TO:<z@remote.test>", 554)
    raw.command("RCPT TO:<team@localhost>", 250)
    raw.command("DATA", 354)
    raw.send("Subject: team\r\n\r\nx\r\n.\r\n")
    raw.expect(250)
    raw.command("QUIT", 221)
    raw.close()
    [forwarded] = peers[0].wait_for(1)
    assert forwarded.rcpt_tos == ["fwd@remote.test"]
    server.wait_until_queue_empty()
    time.sleep(0.5)
    assert len(peers[0].transactions) == 1, "only the configured forward went out"
    assert len(server.messages("bob")) == 1, "the catch-all got the BDAT message"


# ---------------------------------------------------------------------------------------------
# Outbound: MX resolution, routes, TLS policy, timeouts


def test_temporary_failure_of_the_best_mx_is_not_turned_into_a_bounce(start_server, dns, smtp_peers):
    dns.add("example.test", "MX", (10, "mx1.example.test"))
    dns.add("example.test", "MX", (20, "gone.example.test"))  # stale record: NXDOMAIN
    dns.servfail("mx1.example.test")
    server = relay(start_server, dns, 25)
    send(server, ["bob@example.test"])
    deadline = time.time() + 6
    while time.time() < deadline and not server.messages("alice"):
        time.sleep(0.1)
    assert server.messages("alice") == [], "bounced although the best MX may answer later"
    assert server.queued() == 1


def test_verify_policy_is_not_bypassed_by_a_pooled_connection(start_server, dns, smtp_peers, tls_ca):
    peers = smtp_peers(1, hostnames=["mx.good.test"], certificate=tls_ca.issue("mx.good.test"))
    dns.add("good.test", "MX", (10, "mx.good.test"))
    dns.add("mx.good.test", "A", "127.0.0.2")
    dns.add("other.test", "MX", (10, "mx.other.test"))
    dns.add("mx.other.test", "A", "127.0.0.2")  # same address, name not in the certificate
    server = relay(
        start_server,
        dns,
        peers.port,
        outbound={"tls": "verify", "ca_file": str(tls_ca.ca_file), "idle_timeout": "60s"},
    )
    send(server, ["bob@good.test"])
    peers[0].wait_for(1)
    send(server, ["carol@other.test"])
    time.sleep(3)
    delivered = [m.rcpt_tos for m in peers[0].messages]
    assert delivered == [["bob@good.test"]], f"mx.other.test's certificate was never checked: {delivered}"


def test_verify_policy_refuses_a_name_mismatch_on_a_fresh_connection(start_server, dns, smtp_peers, tls_ca):
    """The control for the test above: without a pooled connection the mismatch defers."""
    peers = smtp_peers(1, hostnames=["mx.good.test"], certificate=tls_ca.issue("mx.good.test"))
    dns.add("other.test", "MX", (10, "mx.other.test"))
    dns.add("mx.other.test", "A", "127.0.0.2")
    server = relay(start_server, dns, peers.port, outbound={"tls": "verify", "ca_file": str(tls_ca.ca_file)})
    send(server, ["carol@other.test"])
    time.sleep(3)
    assert peers[0].messages == []
    assert server.queued() == 1
    assert "4.7.4" in server.wait_for_log("4.7.4")


def test_route_keys_are_matched_case_insensitively(start_server, dns, smtp_peers):
    routed = smtp_peers(["127.0.0.3"])
    mx_host = smtp_peers(["127.0.0.2"], port=routed.port)
    dns.add("partner.test", "MX", (10, "mx.partner.test"))
    dns.add("mx.partner.test", "A", "127.0.0.2")
    server = relay(start_server, dns, routed.port, outbound={"routes": {"Partner.Test": {"host": "127.0.0.3"}}})
    send(server, ["bob@partner.test"])
    deadline = time.time() + 10
    while time.time() < deadline and not (routed[0].messages or mx_host[0].messages):
        time.sleep(0.05)
    assert mx_host[0].messages == [], "the route was bypassed"
    assert len(routed[0].messages) == 1


@pytest.mark.parametrize(
    "helo_name",
    [
        None,
        "out.mx.test",
    ],
)
def test_own_hostname_as_mx_is_detected(start_server, dns, helo_name):
    from peers import free_port

    port = free_port()
    dns.add("example.test", "MX", (10, "mx.test"))  # our hostname (conftest sets mx.test)
    dns.add("mx.test", "A", "127.0.0.1")
    server = start_server(
        listeners=[{"name": "smtp", "address": f"127.0.0.1:{port}", "tls": "none"}],
        relay={"networks": ["127.0.0.0/8"]},
        dns={"nameservers": [f"127.0.0.1:{dns.address[1]}"], "cache_size": 0, "timeout": "1s", "attempts": 1},
        outbound={"port": port, "idle_timeout": 0, **({"helo_name": helo_name} if helo_name else {})},
        delivery={"retry_initial": "1s", "retry_max": "1s"},
    )
    send(server, ["bob@example.test"])
    deadline = time.time() + 5
    while time.time() < deadline and "loops back to myself" not in server.log():
        time.sleep(0.05)
    assert "loops back to myself" in server.log(), "not recognised as a loop"
    assert server.log().count(" relayed ") == 0, "relayed to itself"


class RawPeer:
    """A minimal SMTP server (no PIPELINING, no STARTTLS). It reads message data at a steady,
    slow rate: never idle for more than `pause` seconds, so no wait for a single write ever
    lasts long, but a large message takes a while. `mail_reply` answers MAIL instead of 250
    (a 421 closes the connection after it)."""

    def __init__(self, host="127.0.0.2", port=0, chunk=32 << 10, pause=0.03, mail_reply=None):
        self.chunk, self.pause, self.mail_reply = chunk, pause, mail_reply
        self.mails = 0
        self.sock = socket.socket()
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 32 << 10)
        self.sock.bind((host, port))
        self.sock.listen(8)
        self.sock.settimeout(0.5)
        self.port = self.sock.getsockname()[1]
        self.delivered = []
        self.partial = 0
        self.stopping = False
        self.thread = threading.Thread(target=self._serve, daemon=True)
        self.thread.start()

    def _serve(self):
        while not self.stopping:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                continue
            threading.Thread(target=self._session, args=(conn,), daemon=True).start()

    def _session(self, conn):
        conn.settimeout(30)
        buffer = b""

        def line():
            nonlocal buffer
            while b"\r\n" not in buffer:
                data = conn.recv(4096)
                if not data:
                    raise ConnectionError
                buffer += data
            text, buffer = buffer.split(b"\r\n", 1)
            return text.decode("ascii", "replace")

        try:
            conn.sendall(b"220 slow.test ESMTP\r\n")
            while not self.stopping:
                verb = line()[:4].upper()
                if verb == "EHLO":
                    conn.sendall(b"250-slow.test\r\n250 SIZE 100000000\r\n")
                elif verb == "DATA":
                    conn.sendall(b"354 go ahead\r\n")
                    data = buffer
                    while not data.endswith(b"\r\n.\r\n"):
                        time.sleep(self.pause)
                        chunk = conn.recv(self.chunk)
                        if not chunk:
                            self.partial += 1
                            return
                        data += chunk
                    buffer = b""
                    self.delivered.append(len(data))
                    conn.sendall(b"250 2.0.0 queued\r\n")
                elif verb == "MAIL" and self.mail_reply:
                    self.mails += 1
                    conn.sendall(self.mail_reply.encode() + b"\r\n")
                    if self.mail_reply.startswith("421"):
                        return
                elif verb == "QUIT":
                    conn.sendall(b"221 bye\r\n")
                    return
                else:
                    conn.sendall(b"250 ok\r\n")
        except (OSError, ConnectionError):
            self.partial += 1
        finally:
            conn.close()

    def stop(self):
        self.stopping = True
        self.sock.close()
        self.thread.join(5)


def test_a_slow_but_steady_reader_gets_a_large_message(start_server, dns):
    peer = RawPeer()
    try:
        dns.add("slow.test", "A", "127.0.0.2")
        server = relay(start_server, dns, peer.port, outbound={"data_block_timeout": "2s"})
        body = b"Subject: large\r\n\r\n" + (b"y" * 998 + b"\r\n") * 8000  # 8 MB
        send(server, ["bob@slow.test"], body)
        deadline = time.time() + 45
        while time.time() < deadline and not peer.delivered:
            time.sleep(0.2)
        assert peer.delivered, f"never delivered; {peer.partial} attempts cut off mid-message"
    finally:
        peer.stop()


def test_a_421_to_mail_moves_on_to_the_next_mx(start_server, dns, smtp_peers):
    closing = RawPeer(mail_reply="421 4.3.2 Shutting down")
    try:
        backup = smtp_peers(["127.0.0.3"], port=closing.port)
        dns.add("example.test", "MX", (10, "mx1.example.test"))
        dns.add("mx1.example.test", "A", "127.0.0.2")
        dns.add("example.test", "MX", (20, "mx2.example.test"))
        dns.add("mx2.example.test", "A", "127.0.0.3")
        server = relay(start_server, dns, closing.port, delivery={"retry_initial": "30s", "retry_max": "30s"})
        send(server, ["bob@example.test"])
        deadline = time.time() + 8
        while time.time() < deadline and not backup[0].messages:
            time.sleep(0.05)
        assert closing.mails >= 1, "the best MX was tried first"
        assert len(backup[0].messages) == 1, "the backup MX was not tried in the same attempt"
    finally:
        closing.stop()


def test_a_451_to_mail_moves_on_to_the_next_mx(start_server, dns, smtp_peers):
    """The control: any other 4xx to MAIL does move on."""
    busy = RawPeer(mail_reply="451 4.3.0 Busy")
    try:
        backup = smtp_peers(["127.0.0.3"], port=busy.port)
        dns.add("example.test", "MX", (10, "mx1.example.test"))
        dns.add("mx1.example.test", "A", "127.0.0.2")
        dns.add("example.test", "MX", (20, "mx2.example.test"))
        dns.add("mx2.example.test", "A", "127.0.0.3")
        server = relay(start_server, dns, busy.port, delivery={"retry_initial": "30s", "retry_max": "30s"})
        send(server, ["bob@example.test"])
        backup[0].wait_for(1, timeout=8)
        assert busy.mails >= 1
    finally:
        busy.stop()


# ---------------------------------------------------------------------------------------------
# Queue manager and notifications


@pytest.fixture
def small_disk(tmp_path):
    mount_point = tmp_path / "disk"
    mount_point.mkdir()
    sudo = [] if os.geteuid() == 0 else ["sudo", "-n"]
    mounted = subprocess.run([*sudo, "mount", "-t", "tmpfs", "-o", "size=16m,mode=0700", "tmpfs", str(mount_point)])
    if mounted.returncode != 0:
        pytest.skip("cannot mount a tmpfs")
    try:
        yield mount_point
    finally:
        subprocess.run([*sudo, "umount", "-l", str(mount_point)], check=False)


def fill_completely(path):
    filler = path / "filler"
    block = b"\0" * (1 << 16)
    with open(filler, "wb", buffering=0) as out:
        try:
            while True:
                out.write(block)
        except OSError:
            pass
        for _ in range(64):  # the last partial blocks
            try:
                out.write(b"\0" * 512)
            except OSError:
                break
    return filler


def test_a_notice_that_cannot_be_stored_does_not_repeat_successful_deliveries(start_server, dns, smtp_peers, small_disk):
    peers = smtp_peers(1)
    peers[0].reject_recipient("nobody@example.test")
    dns.add("example.test", "A", "127.0.0.2")
    dns.servfail("example.test")  # the first attempt defers both recipients
    server = relay(
        start_server,
        dns,
        peers.port,
        data_dir=small_disk / "data",
        delivery={"retry_initial": "3s", "retry_max": "3s"},
    )
    body = b"Subject: half\r\n\r\n" + (b"z" * 76 + b"\r\n") * 500  # returned in full by a bounce
    send(server, ["bob@example.test", "nobody@example.test"], body)
    deadline = time.time() + 10
    while time.time() < deadline and server.log().count("delivery deferred") < 2:
        time.sleep(0.05)
    assert server.log().count("delivery deferred") >= 2
    filler = fill_completely(small_disk)
    try:
        dns.servfail("example.test", False)
        deadline = time.time() + 12
        while time.time() < deadline and len(peers[0].messages) < 2:
            time.sleep(0.1)
        assert "cannot record delivery results" in server.wait_for_log("cannot record delivery results")
        copies = [m.rcpt_tos for m in peers[0].messages]
        assert copies == [["bob@example.test"]], f"bob got {len(copies)} copies"
    finally:
        filler.unlink()


def test_notify_success_on_a_multi_member_alias_reports_expanded(start_server):
    server = start_server(
        listeners=[{"name": "smtp", "address": "127.0.0.1:0"}],
        local={"aliases": {"team": ["carol", "dave"]}},
    )
    send(server, ["team@localhost"], rcpt_options=["NOTIFY=SUCCESS"])
    server.wait_for_messages("carol", 1)
    server.wait_for_messages("dave", 1)
    [notice] = bounces(server, "alice")
    _, recipients = report_fields(notice)
    assert [(r["Final-Recipient"], r["Action"]) for r in recipients] == [("rfc822; team@localhost", "expanded")], recipients


def test_remote_recipients_differing_in_case_are_both_delivered(start_server, dns, smtp_peers):
    peers = smtp_peers(1)
    dns.add("example.test", "A", "127.0.0.2")
    server = relay(start_server, dns, peers.port)
    send(server, ["Bob@example.test", "bob@example.test"])
    [message] = peers[0].wait_for(1)
    assert sorted(message.rcpt_tos) == ["Bob@example.test", "bob@example.test"]


def test_local_delivery_is_not_held_up_by_slow_remote_hosts(start_server, dns):
    silent = socket.socket()
    silent.bind(("127.0.0.2", 0))
    silent.listen(16)  # accepts, never greets
    try:
        dns.add("slow.test", "A", "127.0.0.2")
        server = relay(
            start_server,
            dns,
            silent.getsockname()[1],
            outbound={"concurrency": 1, "greeting_timeout": "20s"},
            delivery={"workers": 1},
        )
        send(server, ["a@slow.test"])
        send(server, ["b@slow.test"])
        time.sleep(0.5)
        started = time.time()
        send(server, ["carol@localhost"])
        deadline = started + 5
        while time.time() < deadline and not server.messages("carol"):
            time.sleep(0.05)
        assert server.messages("carol"), "local delivery waited for remote hosts"
    finally:
        silent.close()


def test_aliases_work_when_a_local_domain_is_written_with_a_trailing_dot(start_server):
    server = start_server(
        listeners=[{"name": "smtp", "address": "127.0.0.1:0"}],
        local={"domains": ["localhost."], "aliases": {"team": ["carol", "dave@LocalHost."]}},
    )
    send(server, ["team@localhost"])
    server.wait_for_messages("carol", 1, timeout=5)
    server.wait_for_messages("dave", 1, timeout=5)
    assert server.messages("alice") == [], "bounced"


def test_a_hostname_the_notices_cannot_use_is_refused_or_bounces_still_arrive(tmp_path, dns):
    from conftest import DEFAULT_LISTENERS, Server, render_config

    dns.add("nomail.test", "MX", (0, "."))
    data = tmp_path / "data"
    config = tmp_path / "fqdn.toml"
    sections = {
        "relay": {"networks": ["127.0.0.0/8"]},
        "dns": {"nameservers": [f"127.0.0.1:{dns.address[1]}"], "cache_size": 0},
        "spool": {"free_space_reserve": 0},
    }
    text = render_config(data, DEFAULT_LISTENERS[:1], sections)
    config.write_text(text.replace('hostname = "mx.test"', 'hostname = "mx.test."'))
    server = Server(data, config)
    try:
        server.start()
    except RuntimeError:
        return  # refused at start-up: fine
    try:
        send(server, ["bob@nomail.test"])
        server.wait_for_messages("alice", 1, timeout=5)
    finally:
        server.stop(timeout=10)


def test_delay_notice_once_then_bounce_after_lifetime(start_server, dns, smtp_peers):
    """NOTIFY=DELAY,FAILURE: one "delayed" notice, then one "failed" with 5.4.7 once the
    lifetime is over; nothing more."""
    peers = smtp_peers(1)
    peers[0].temp_fail(count=None, at="rcpt")
    dns.add("example.test", "A", "127.0.0.2")
    server = relay(
        start_server,
        dns,
        peers.port,
        delivery={"retry_initial": "1s", "retry_max": "1s", "delay_warning": "1s", "max_lifetime": "5s"},
    )
    send(server, ["bob@example.test"], rcpt_options=["NOTIFY=DELAY,FAILURE"])
    notices = bounces(server, "alice", count=2)
    actions = [report_fields(n)[1][0]["Action"] for n in notices]
    assert actions == ["delayed", "failed"], actions
    assert report_fields(notices[1])[1][0]["Status"] == "5.4.7"
    server.wait_until_queue_empty()
    time.sleep(1.5)
    assert len(server.messages("alice")) == 2


# ---------------------------------------------------------------------------------------------
# Dropping privileges


@pytest.mark.skipif(os.geteuid() != 0, reason="needs root")
def test_handing_over_the_data_directory_never_follows_a_swapped_in_symlink(start_server):
    base = Path(tempfile.mkdtemp(prefix="postilion-review-", dir="/tmp"))
    base.chmod(0o755)
    try:
        data = base / "data"
        box = data / "maildir" / "box" / "cur"
        box.mkdir(parents=True)
        victim = base / "victim"
        victim.mkdir()
        names = [f"m{i:05d}" for i in range(30000)]
        for name in names:
            (box / name).touch()
            (victim / name).touch()
        # What a process running as the service user can do to its own files: swap a
        # directory for a symbolic link in one step (renameat2 RENAME_EXCHANGE).
        link = base / "link"
        link.symlink_to(victim)
        libc = ctypes.CDLL(None, use_errno=True)
        if not hasattr(libc, "renameat2"):
            pytest.skip("no renameat2")
        won = []

        def swap():
            deadline = time.time() + 60
            while time.time() < deadline:
                if os.stat(box).st_uid == 65534:
                    at_fdcwd, rename_exchange = -100, 2
                    if libc.renameat2(at_fdcwd, bytes(link), at_fdcwd, bytes(box), rename_exchange) == 0:
                        won.append(True)
                    return

        racer = threading.Thread(target=swap, daemon=True)
        racer.start()
        try:
            start_server(
                listeners=[{"name": "smtp", "address": "127.0.0.1:0", "tls": "none"}],
                data_dir=data,
                user="65534:65534",
            )
        except RuntimeError:
            pass  # whether it starts afterwards does not matter here
        racer.join(60)
        assert won, "the data directory was never handed over"
        stolen = [name for name in names if os.lstat(victim / name).st_uid == 65534]
        assert stolen == [], f"{len(stolen)} files outside the data directory were given away"
    finally:
        shutil.rmtree(base, ignore_errors=True)
