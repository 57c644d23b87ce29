"""Outbound delivery: the real binary relays to real SMTP peers (aiosmtpd) on 127.0.0.x,
finding them through a real DNS server on loopback, and bounces what cannot be delivered.

Every test points postilion's resolver at the test DNS server and its remote port at the
peers' shared port, so no traffic leaves the loopback interface.
"""

import contextlib
import email
import email.policy
import smtplib
import socket
import threading
import time


SENDER = "alice@localhost"


def relay(start_server, dns, port, outbound=None, delivery=None, **sections):
    """A postilion that relays for loopback clients, resolving through `dns`."""
    out = {"port": port, "connect_timeout": "2s", "command_timeout": "10s"}
    out.update(outbound or {})
    deliv = {"retry_initial": "1s", "retry_max": "1s"}
    deliv.update(delivery or {})
    return start_server(
        listeners=[{"name": "smtp", "address": "127.0.0.1:0", "tls": "starttls"}],
        relay={"networks": ["127.0.0.0/8"]},
        dns={"nameservers": [f"127.0.0.1:{dns.address[1]}"], "cache_size": 0, "timeout": "1s", "attempts": 1},
        outbound=out,
        delivery=deliv,
        **sections,
    )


def send(server, recipients, body=b"Subject: test\r\n\r\nHello.\r\n", sender=SENDER, **kwargs):
    with smtplib.SMTP("127.0.0.1", server.port(), timeout=20) as client:
        client.ehlo("client.test")
        client.sendmail(sender, recipients, body, **kwargs)


def original_part(delivered: bytes) -> bytes:
    """What follows the first Received field postilion added (its own trace lines)."""
    head, _, rest = delivered.partition(b"Received: ")
    # The Received field runs until the first line that does not start with whitespace.
    lines = rest.split(b"\r\n")
    index = 1
    while lines[index][:1] in (b" ", b"\t"):
        index += 1
    return b"\r\n".join(lines[index:])


def bounces(server, mailbox="alice", count=1):
    """The notices that arrived in a local mailbox, parsed."""
    raw = server.wait_for_messages(mailbox, count)
    return [email.message_from_bytes(data, policy=email.policy.default) for data in raw]


def report_fields(notice):
    """The per-message and per-recipient field blocks of a delivery-status part
    (message/delivery-status, or message/global-delivery-status for RFC 6533 notices)."""
    assert notice.get_content_type() == "multipart/report"
    assert notice.get_param("report-type") == "delivery-status"
    kinds = ("message/delivery-status", "message/global-delivery-status")
    status = next(part for part in notice.walk() if part.get_content_type() in kinds)
    # Parsed by hand from the part's bytes: email reads the global variant as one message.
    text = status.as_bytes().decode("utf-8").replace("\r\n", "\n")
    blocks = []
    for chunk in text.split("\n\n")[1:]:
        fields = {}
        last = None
        for line in chunk.strip("\n").split("\n"):
            if not line:
                continue
            if line[:1] in (" ", "\t"):
                fields[last] += " " + line.strip()
            else:
                last, _, value = line.partition(":")
                fields[last] = value.strip()
        if fields:
            blocks.append(fields)
    return blocks[0], blocks[1:]


def mx(dns, domain, *hosts):
    """MX records for `domain`: hosts are (preference, name, address)."""
    for preference, name, address in hosts:
        dns.add(domain, "MX", (preference, name))
        if address:
            dns.add(name, "AAAA" if ":" in address else "A", address)


def test_relays_to_the_best_mx_in_one_transaction_byte_exact(start_server, dns, smtp_peers):
    peers = smtp_peers(2)
    mx(dns, "example.test", (20, "mx2.example.test", "127.0.0.3"), (10, "mx1.example.test", "127.0.0.2"))
    server = relay(start_server, dns, peers.port)
    body = b"Subject: relay\r\nFrom: alice@localhost\r\n\r\n.leading dot\r\nline two\r\n"
    send(server, ["bob@example.test", "carol@example.test"], body)
    [message] = peers.by_host("127.0.0.2").wait_for(1)
    assert message.rcpt_tos == ["bob@example.test", "carol@example.test"]
    assert message.mail_from == SENDER
    assert message.tls, "opportunistic STARTTLS was offered and must be used"
    assert original_part(message.data) == body
    assert peers.by_host("127.0.0.3").messages == []
    server.wait_until_queue_empty()
    log = server.wait_for_log("result=\"delivered\"")
    assert "result=\"delivered\"" in log and "TLSv1.3" in log


def test_backup_mx_when_the_primary_refuses_connections(start_server, dns, smtp_peers):
    peers = smtp_peers(["127.0.0.3"])
    # Nothing listens on 127.0.0.2 at that port: connection refused.
    mx(dns, "example.test", (10, "mx1.example.test", "127.0.0.2"), (20, "mx2.example.test", "127.0.0.3"))
    server = relay(start_server, dns, peers.port)
    send(server, ["bob@example.test"])
    peers[0].wait_for(1)
    server.wait_until_queue_empty()


def test_no_mx_uses_the_domains_own_address(start_server, dns, smtp_peers):
    peers = smtp_peers(1)
    dns.add("plain.test", "A", "127.0.0.2")
    server = relay(start_server, dns, peers.port)
    send(server, ["bob@plain.test"])
    [message] = peers[0].wait_for(1)
    assert message.rcpt_tos == ["bob@plain.test"]
    assert dns.queried("plain.test", "MX"), "the MX must be asked for first"


def test_mx_through_a_cname(start_server, dns, smtp_peers):
    peers = smtp_peers(1)
    dns.add("alias.test", "MX", (10, "mail.alias.test"))
    dns.add("mail.alias.test", "CNAME", "real.alias.test")
    dns.add("real.alias.test", "A", "127.0.0.2")
    server = relay(start_server, dns, peers.port)
    send(server, ["bob@alias.test"])
    peers[0].wait_for(1)


def test_null_mx_bounces_at_once_with_5_1_10(start_server, dns, smtp_peers):
    dns.add("nomail.test", "MX", (0, "."))
    server = relay(start_server, dns, 25)
    send(server, ["bob@nomail.test"])
    [notice] = bounces(server)
    assert notice["From"].addresses[0].username == "MAILER-DAEMON"
    assert notice["Auto-Submitted"] == "auto-replied"
    message_fields, recipients = report_fields(notice)
    assert message_fields["Reporting-MTA"] == "dns; mx.test"
    [recipient] = recipients
    assert recipient["Final-Recipient"] == "rfc822; bob@nomail.test"
    assert recipient["Action"] == "failed"
    assert recipient["Status"] == "5.1.10"
    server.wait_until_queue_empty()
    # The bounce came from the null sender.
    delivered = server.messages("alice")[0]
    assert delivered.startswith(b"Return-Path: <>\r\n")


def test_nxdomain_bounces_and_servfail_defers(start_server, dns, smtp_peers):
    peers = smtp_peers(1)
    dns.servfail("flaky.test")
    server = relay(start_server, dns, peers.port)
    send(server, ["bob@missing.test"])
    [notice] = bounces(server)
    _, [recipient] = report_fields(notice)
    assert recipient["Status"] == "5.1.2"
    send(server, ["bob@flaky.test"])
    time.sleep(2.5)
    assert server.queued() == 1, "a SERVFAIL must defer, not bounce"
    assert "deferred" in server.wait_for_log("deferred")
    dns.servfail("flaky.test", False)
    dns.add("flaky.test", "A", "127.0.0.2")
    peers[0].wait_for(1)
    server.wait_until_queue_empty()
    assert len(server.messages("alice")) == 1, "no second bounce"


def test_temporary_failure_is_retried_until_accepted(start_server, dns, smtp_peers):
    peers = smtp_peers(1)
    peers[0].temp_fail(count=2, at="rcpt")
    dns.add("example.test", "A", "127.0.0.2")
    server = relay(start_server, dns, peers.port)
    send(server, ["bob@example.test"])
    peers[0].wait_for(1, timeout=30)
    server.wait_until_queue_empty()
    assert len(peers[0].transactions) == 3
    assert server.messages("alice") == [], "no bounce for a message that got through"


def test_permanent_rejection_bounces_with_the_remote_diagnostic(start_server, dns, smtp_peers):
    peers = smtp_peers(1)
    peers[0].reject_recipient("nobody@example.test")
    dns.add("example.test", "MX", (10, "mx1.example.test"))
    dns.add("mx1.example.test", "A", "127.0.0.2")
    server = relay(start_server, dns, peers.port)
    body = b"Subject: half\r\nMessage-ID: <half@client.test>\r\n\r\nbody\r\n"
    send(server, ["bob@example.test", "nobody@example.test"], body)
    [message] = peers[0].wait_for(1)
    assert message.rcpt_tos == ["bob@example.test"]
    [notice] = bounces(server)
    _, [recipient] = report_fields(notice)
    assert recipient["Final-Recipient"] == "rfc822; nobody@example.test"
    assert recipient["Status"] == "5.1.1"
    assert recipient["Remote-MTA"] == "dns; mx1.example.test"
    assert recipient["Diagnostic-Code"].startswith("smtp; 550 5.1.1")
    returned = next(part for part in notice.walk() if part.get_content_type() == "message/rfc822")
    assert returned.get_payload()[0]["Message-ID"] == "<half@client.test>"
    server.wait_until_queue_empty()


def test_connection_dropped_in_data_is_retried(start_server, dns, smtp_peers):
    peers = smtp_peers(1)
    peers[0].drop_during_data(count=1)
    dns.add("example.test", "A", "127.0.0.2")
    server = relay(start_server, dns, peers.port)
    send(server, ["bob@example.test"])
    peers[0].wait_for(1, timeout=30)
    server.wait_until_queue_empty()
    assert any(t.dropped for t in peers[0].transactions)
    assert server.messages("alice") == []


def test_peer_without_esmtp_gets_helo_and_no_parameters(start_server, dns, smtp_peers):
    peers = smtp_peers(1, esmtp=False, starttls=False)
    dns.add("old.test", "A", "127.0.0.2")
    server = relay(start_server, dns, peers.port)
    send(server, ["bob@old.test"])
    [message] = peers[0].wait_for(1)
    assert not message.esmtp
    assert message.mail_options == []
    assert not message.tls


def test_tls_policies(start_server, dns, smtp_peers, tls_ca):
    plain = smtp_peers(["127.0.0.2"], starttls=False)
    verified = smtp_peers(["127.0.0.3"], port=plain.port, hostnames=["mx.secure.test"], certificate=tls_ca)
    self_signed = smtp_peers(["127.0.0.4"], port=plain.port, hostnames=["mx.selfsigned.test"])
    dns.add("plain.test", "A", "127.0.0.2")
    dns.add("secure.test", "MX", (10, "mx.secure.test"))
    dns.add("mx.secure.test", "A", "127.0.0.3")
    dns.add("selfsigned.test", "MX", (10, "mx.selfsigned.test"))
    dns.add("mx.selfsigned.test", "A", "127.0.0.4")
    routes = {
        "plain.test": {"host": "plain.test", "tls": "require"},
        "secure.test": {"host": "secure.test", "mx": True, "tls": "verify"},
        "selfsigned.test": {"host": "selfsigned.test", "mx": True, "tls": "verify"},
    }
    server = relay(start_server, dns, plain.port, outbound={"ca_file": str(tls_ca.ca_file), "routes": routes})
    send(server, ["bob@plain.test", "bob@secure.test", "bob@selfsigned.test"])
    [message] = verified[0].wait_for(1)
    assert message.tls
    time.sleep(2.5)
    assert plain[0].messages == [], "TLS required: no plaintext delivery"
    assert self_signed[0].messages == [], "verify: an untrusted certificate is refused"
    assert server.queued() == 1, "both are deferred, not bounced"
    log = server.wait_for_log("4.7.4")
    assert "4.7.4" in log
    # Opportunistic (the default) delivers to the plaintext peer.
    other = relay(start_server, dns, plain.port)
    send(other, ["carol@plain.test"])
    [message] = plain[0].wait_for(1)
    assert not message.tls


def test_what_a_peer_cannot_take_bounces_instead_of_being_changed(start_server, dns, smtp_peers):
    peers = smtp_peers(1, smtputf8=False, eightbitmime=False, starttls=False)
    dns.add("old.test", "A", "127.0.0.2")
    server = relay(start_server, dns, peers.port)
    # 8-bit content to a peer without 8BITMIME: 5.6.3.
    send(server, ["bob@old.test"], "Subject: caf\u00e9\r\n\r\ncaf\u00e9\r\n".encode(), mail_options=["BODY=8BITMIME"])
    # Declared 8BITMIME but 7-bit after all: sent as is, without BODY=.
    send(server, ["carol@old.test"], b"Subject: plain\r\n\r\nplain\r\n", mail_options=["BODY=8BITMIME"])
    [message] = peers[0].wait_for(1)
    assert message.rcpt_tos == ["carol@old.test"]
    assert message.mail_param("BODY") is None
    [notice] = bounces(server)
    _, [recipient] = report_fields(notice)
    assert recipient["Status"] == "5.6.3"
    # SMTPUTF8 to a peer without it: 5.6.7.
    with smtplib.SMTP("127.0.0.1", server.port(), timeout=20) as client:
        client.ehlo("client.test")
        client.sendmail(SENDER, ["d\u00e9lia@old.test"], "Subject: x\r\n\r\nx\r\n".encode(), mail_options=["SMTPUTF8"])
    notices = bounces(server, count=2)
    # Maildir names do not sort by arrival: find the notice by what it reports.
    [recipient] = [r for notice in notices for r in report_fields(notice)[1] if r["Status"] != "5.6.3"]
    assert recipient["Status"] == "5.6.7"
    assert recipient["Final-Recipient"] == "utf-8; d\u00e9lia@old.test"


def test_a_host_that_cannot_take_the_size_is_skipped(start_server, dns, smtp_peers):
    peers = smtp_peers(2)
    peers.by_host("127.0.0.2").size_limit = 1000
    mx(dns, "example.test", (10, "mx1.example.test", "127.0.0.2"), (20, "mx2.example.test", "127.0.0.3"))
    server = relay(start_server, dns, peers.port)
    send(server, ["bob@example.test"], b"Subject: big\r\n\r\n" + (b"x" * 76 + b"\r\n") * 40)
    [message] = peers.by_host("127.0.0.3").wait_for(1)
    assert int(message.mail_param("SIZE")) > 1000


def test_connections_are_reused_for_the_next_message(start_server, dns, smtp_peers):
    peers = smtp_peers(1)
    dns.add("example.test", "A", "127.0.0.2")
    server = relay(start_server, dns, peers.port, outbound={"idle_timeout": "10s"})
    for n in range(3):
        send(server, [f"user{n}@example.test"])
        peers[0].wait_for(n + 1)
    assert peers[0].connections == 1
    assert len(peers[0].greetings) == 2, "one EHLO before and one after STARTTLS"


def test_dsn_parameters_go_to_a_peer_with_dsn(start_server, dns, smtp_peers):
    peers = smtp_peers(1, dsn=True)
    dns.add("example.test", "A", "127.0.0.2")
    server = relay(start_server, dns, peers.port)
    send(
        server,
        ["bob@example.test"],
        mail_options=["RET=HDRS", "ENVID=env+2Did"],
        rcpt_options=["NOTIFY=SUCCESS,FAILURE", "ORCPT=rfc822;bob@example.test"],
    )
    [message] = peers[0].wait_for(1)
    assert message.mail_param("RET") == "HDRS"
    # xtext: "+2D" is "-"; the decoded value needs no escaping on the way out.
    assert message.mail_param("ENVID") == "env-id"
    assert message.rcpt_param("bob@example.test", "NOTIFY") == "SUCCESS,FAILURE"
    assert message.rcpt_param("bob@example.test", "ORCPT") == "rfc822;bob@example.test"
    server.wait_until_queue_empty()
    time.sleep(0.5)
    assert server.messages("alice") == [], "the peer took over notifications"


def test_notify_success_to_a_peer_without_dsn_gets_a_relayed_notice(start_server, dns, smtp_peers):
    peers = smtp_peers(1)
    dns.add("example.test", "A", "127.0.0.2")
    server = relay(start_server, dns, peers.port)
    send(server, ["bob@example.test"], rcpt_options=["NOTIFY=SUCCESS"], mail_options=["ENVID=abc"])
    [message] = peers[0].wait_for(1)
    assert message.mail_options == [o for o in message.mail_options if not o.startswith(("RET", "ENVID"))]
    [notice] = bounces(server)
    message_fields, [recipient] = report_fields(notice)
    assert message_fields["Original-Envelope-Id"] == "abc"
    assert recipient["Action"] == "relayed"
    assert recipient["Status"].startswith("2.")


def test_bounce_to_a_remote_sender_uses_the_null_reverse_path(start_server, dns, smtp_peers):
    peers = smtp_peers(1)
    dns.add("sender.test", "A", "127.0.0.2")
    dns.add("nomail.test", "MX", (0, "."))
    server = relay(start_server, dns, peers.port)
    send(server, ["bob@nomail.test"], sender="someone@sender.test")
    [notice] = peers[0].wait_for(1)
    assert notice.mail_from == ""
    assert notice.rcpt_tos == ["someone@sender.test"]
    assert notice.rcpt_param("someone@sender.test", "NOTIFY") in (None, "NEVER")


def test_a_bounce_that_cannot_be_delivered_makes_no_further_bounce(start_server, dns, smtp_peers):
    dns.add("nomail.test", "MX", (0, "."))
    server = relay(start_server, dns, 25)
    send(server, ["bob@nomail.test"], sender="someone@nomail.test")
    deadline = time.time() + 10
    while time.time() < deadline and server.queued():
        time.sleep(0.1)
    assert server.queued() == 0
    server.wait_for_log("delivery status notification queued")
    time.sleep(0.1)  # a second notice, if there were one, would be logged by now
    assert server.log().count("delivery status notification queued") == 1


def test_silent_server_times_out_and_the_next_host_is_used(start_server, dns, smtp_peers):
    peers = smtp_peers(["127.0.0.3"])
    with silent_host("127.0.0.2", peers.port) as (_, held):
        mx(dns, "example.test", (10, "mx1.example.test", "127.0.0.2"), (20, "mx2.example.test", "127.0.0.3"))
        server = relay(start_server, dns, peers.port, outbound={"greeting_timeout": "1s"})
        send(server, ["bob@example.test"])
        peers[0].wait_for(1)
        assert held, "the silent host was tried first"
        assert "no reply from mx1.example.test" in server.wait_for_log("no reply from mx1.example.test")


def test_deferred_mail_survives_a_restart(start_server, dns, smtp_peers):
    peers = smtp_peers(1)
    peers[0].temp_fail(count=None, at="rcpt")
    dns.add("example.test", "A", "127.0.0.2")
    server = relay(start_server, dns, peers.port, delivery={"retry_initial": "2s", "retry_max": "2s"})
    send(server, ["bob@example.test"])
    deadline = time.time() + 10
    while not peers[0].transactions and time.time() < deadline:
        time.sleep(0.05)
    assert peers[0].transactions, "the first attempt reached the peer"
    server.kill9()
    peers[0].accept_all()
    server.start()
    peers[0].wait_for(1, timeout=30)
    server.wait_until_queue_empty()


def test_smart_host_with_auth_over_verified_tls(start_server, dns, tls_ca, tmp_path):
    """Every remote domain goes to a smart host (another postilion's submission listener),
    which requires AUTH: the relay logs in with PLAIN over STARTTLS after checking the smart
    host's certificate against the test CA."""
    import subprocess

    from conftest import BINARY

    smarthost_data = tmp_path / "smarthost"
    subprocess.run(
        [str(BINARY), "user", "add", "relay@localhost", "--sender", "*", "--data", str(smarthost_data)],
        input="relay secret\n", text=True, check=True, capture_output=True, timeout=60,
    )
    cert = tls_ca.issue("smarthost.test")
    smarthost = start_server(
        listeners=[{"name": "submission", "address": "127.0.0.5:0", "role": "submission"}],
        data_dir=smarthost_data,
        tls={"certificate": str(cert.cert_file), "private_key": str(cert.key_file)},
        local={"domains": ["localhost", "remote.test"]},
    )
    dns.add("smarthost.test", "A", "127.0.0.5")
    secret = tmp_path / "relay.secret"
    secret.write_text("relay secret\n")
    secret.chmod(0o600)
    route = {
        "host": "smarthost.test",
        "port": smarthost.port("submission"),
        "tls": "verify",
        "auth_username": "relay@localhost",
        "auth_password_file": str(secret),
    }
    # No connection reuse, so that the second message logs in again.
    outbound = {"ca_file": str(tls_ca.ca_file), "routes": {"*": route}, "idle_timeout": 0}
    server = relay(start_server, dns, 25, outbound=outbound)
    send(server, ["bob@remote.test"], b"Subject: via smart host\r\n\r\nbody\r\n")
    [message] = smarthost.wait_for_messages("bob", 1)
    assert b"with ESMTPSA id" in message, "the smart host saw an authenticated, encrypted session"
    assert b"Subject: via smart host" in message
    server.wait_until_queue_empty()
    # A wrong password defers (never sends unauthenticated, never bounces at once).
    secret.write_text("wrong\n")
    send(server, ["carol@remote.test"])
    time.sleep(2.5)
    assert server.queued() == 1
    assert "4.7.8" in server.wait_for_log("4.7.8")
    assert smarthost.messages("carol") == []
    secret.write_text("relay secret\n")
    smarthost.wait_for_messages("carol", 1, timeout=30)


def test_an_alias_forwards_to_a_remote_address(start_server, dns, smtp_peers):
    peers = smtp_peers(1)
    dns.add("example.test", "A", "127.0.0.2")
    server = start_server(
        listeners=[{"name": "smtp", "address": "127.0.0.1:0"}],
        dns={"nameservers": [f"127.0.0.1:{dns.address[1]}"], "cache_size": 0},
        outbound={"port": peers.port},
        local={"aliases": {"team": ["carol", "bob@example.test"]}},
    )
    # Mail for a local alias is taken from anyone (no relay permission needed) ...
    send(server, ["team@localhost"], b"Subject: team\r\n\r\nfor the team\r\n", sender="someone@outside.test")
    [forwarded] = peers[0].wait_for(1)
    assert forwarded.rcpt_tos == ["bob@example.test"]
    assert forwarded.mail_from == "someone@outside.test"
    assert server.wait_for_messages("carol", 1)
    # ... but the forward target itself is not an open door.
    with smtplib.SMTP("127.0.0.1", server.port(), timeout=20) as client:
        client.ehlo("client.test")
        client.mail("someone@outside.test")
        assert client.rcpt("bob@example.test")[0] == 554


def test_ipv6_and_ipv4_addresses_of_one_exchanger(start_server, dns, smtp_peers):
    """One MX host with AAAA and A records: IPv6 first by default; when nothing answers on
    IPv6, the IPv4 address is tried next."""
    peers = smtp_peers(["::1", "127.0.0.2"])
    dns.add("dual.test", "MX", (10, "mx.dual.test"))
    dns.add("mx.dual.test", "AAAA", "::1")
    dns.add("mx.dual.test", "A", "127.0.0.2")
    server = relay(start_server, dns, peers.port)
    send(server, ["bob@dual.test"])
    [message] = peers.by_host("::1").wait_for(1)
    assert peers.by_host("127.0.0.2").messages == []
    peers.by_host("::1").stop()
    send(server, ["carol@dual.test"])
    [message] = peers.by_host("127.0.0.2").wait_for(1)
    assert message.rcpt_tos == ["carol@dual.test"]


def test_a_pooled_connection_the_peer_closed_is_replaced_at_once(start_server, dns, smtp_peers):
    """The peer drops idle connections after a second; the next message still goes out at
    once on a new connection instead of waiting for a retry."""
    peers = smtp_peers(1, idle_timeout=1)
    dns.add("example.test", "A", "127.0.0.2")
    server = relay(start_server, dns, peers.port, outbound={"idle_timeout": "30s"})
    send(server, ["one@example.test"])
    peers[0].wait_for(1)
    time.sleep(2)
    send(server, ["two@example.test"])
    peers[0].wait_for(2, timeout=5)
    assert peers[0].connections == 2
    assert "delivery deferred" not in server.log()


@contextlib.contextmanager
def silent_host(address, port=0):
    """A listener on `address` that accepts connections and never greets; yields
    (port, the connections it holds), and closes them all at the end."""
    silent = socket.socket()
    silent.bind((address, port))
    silent.listen(8)
    held = []

    def accept():
        try:
            while True:
                held.append(silent.accept()[0])
        except OSError:
            pass  # closed at the end

    threading.Thread(target=accept, daemon=True).start()
    try:
        yield silent.getsockname()[1], held
    finally:
        silent.close()
        for connection in held:
            connection.close()


def wait_until_held(held):
    deadline = time.time() + 10
    while not held and time.time() < deadline:
        time.sleep(0.05)
    assert held, "the first message's delivery is waiting for the silent host's greeting"


def test_a_local_copy_does_not_wait_for_a_remote_slot(start_server, dns):
    """One remote connection in all, held by a delivery to a host that never greets: a
    message for a local mailbox and that host gets its local copy at once, its remote part
    waiting alone (the local part takes only local slots), even with a single local worker."""
    with silent_host("127.0.0.2") as (port, held):
        dns.add("stalled.test", "A", "127.0.0.2")
        server = relay(
            start_server, dns, port,
            outbound={"concurrency": 1, "greeting_timeout": "60s"},
            delivery={"workers": 1},
        )
        send(server, ["bob@stalled.test"])
        wait_until_held(held)
        send(server, ["carol@stalled.test", "local1@localhost"])
        server.wait_for_messages("local1", 1, timeout=5)
        assert len(held) == 1, "the second message's remote part is still waiting for the slot"


def test_mail_for_a_stalled_domain_holds_no_remote_slot_while_it_waits_for_its_domain(
    start_server, dns, smtp_peers
):
    """Two remote slots, one per domain: the first message for a domain whose host never
    greets holds that domain's slot and one remote slot; the second waits for the domain's
    slot without taking the other remote slot, which the next domain's mail gets at once."""
    peers = smtp_peers(1)
    with silent_host("127.0.0.9", peers.port) as (_, held):
        dns.add("stalled.test", "A", "127.0.0.9")
        dns.add("working.test", "A", "127.0.0.2")
        server = relay(
            start_server, dns, peers.port,
            outbound={"concurrency": 2, "destination_concurrency": 1, "greeting_timeout": "60s"},
        )
        send(server, ["bob@stalled.test"])
        send(server, ["carol@stalled.test"])
        wait_until_held(held)
        send(server, ["dave@working.test"])
        [message] = peers[0].wait_for(1, timeout=5)
        assert message.rcpt_tos == ["dave@working.test"]
        assert len(held) == 1, "one delivery at a time to the stalled domain"
