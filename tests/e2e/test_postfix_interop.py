"""Interoperability with a real Postfix: Postfix relays to postilion over STARTTLS.

Postfix (a private instance, see postfix.py) gets a message from smtplib and relays it to
postilion's STARTTLS listener with `smtp_tls_security_level = encrypt`. What "byte-exact"
means here: Postfix puts its own Received field in front of the message and changes nothing
else (no header rewriting, no MIME conversion, postilion advertises 8BITMIME); postilion puts
Return-Path, Delivered-To and its Received field in front. So the delivered file is exactly
those four fields followed by the submitted bytes, CRLF line endings and all, and the tests
assert precisely that.

The fixtures are checked here too: Postfix receiving into virtual Maildirs over STARTTLS (the
destination outbound delivery will be tested against), the SMTP peers with Postfix as their
client, and the DNS server with dnslib's client.
"""

import re
import smtplib
import socket

import pytest
from dnslib import DNSRecord


def header_fields(block):
    """Splits a header block (CRLF line endings) into (name, field bytes incl. folding)."""
    assert block.endswith(b"\r\n"), block
    fields = []
    for line in block[:-2].split(b"\r\n"):
        if line[:1] in (b" ", b"\t"):
            assert fields, f"continuation line first: {line!r}"
            name, raw = fields[-1]
            fields[-1] = (name, raw + b"\r\n" + line)
        else:
            name, colon, _ = line.partition(b":")
            assert colon, f"not a header field: {line!r}"
            fields.append((name.decode(), line))
    return [(name, raw + b"\r\n") for name, raw in fields]


def split_delivered(delivered, original):
    """Checks that `delivered` is trace fields + `original`; returns the trace fields."""
    assert delivered.endswith(original), (
        f"the submitted message is not a suffix of the delivered one:\n{delivered!r}\n---\n{original!r}"
    )
    return header_fields(delivered[: len(delivered) - len(original)])


def submit(relay, sender, recipients, message, mail_options=()):
    with smtplib.SMTP(relay.host, relay.port, local_hostname="client.test", timeout=30) as client:
        refused = client.sendmail(sender, recipients, message, mail_options=list(mail_options))
    assert refused == {}


def relay_to(server, start_postfix, **options):
    """A Postfix instance relaying everything to postilion's STARTTLS listener, TLS required."""
    host, port = server.listeners["smtp"]
    return start_postfix(relayhost=(host, port), smtp_tls_security_level="encrypt", **options)


def check_relay_trace(fields, postfix, recipient, sender, single_recipient=True):
    """The four trace fields in front of a message Postfix relayed to postilion."""
    names = [name for name, _ in fields]
    assert names == ["Return-Path", "Delivered-To", "Received", "Received"], fields
    assert fields[0][1] == f"Return-Path: <{sender}>\r\n".encode()
    assert fields[1][1] == f"Delivered-To: {recipient}\r\n".encode()
    ours, theirs = fields[2][1].decode(), fields[3][1].decode()
    # postilion's: Postfix's EHLO name, the TLS Postfix negotiated, ESMTPS (RFC 3848).
    assert ours.startswith(f"Received: from {postfix.myhostname} (unknown [127.0.0.1])\r\n\tby mx.test\r\n"), ours
    tls = re.search(r"\(using (TLSv1\.[23]) with cipher (\S+)\)", ours)
    assert tls, ours
    ids = re.search(r"\r\n\twith ESMTPS id ([0-9A-Z]{13})(\r\n\tfor <([^>]*)>)?;\r\n", ours)
    assert ids, ours
    # A "for" clause only with a single recipient (RFC 5321 section 7.2).
    assert ids.group(3) == (recipient if single_recipient else None), ours
    # Postfix's: from our smtplib client, no TLS on that hop.
    assert theirs.startswith("Received: from client.test (unknown [127.0.0.1])\r\n"), theirs
    assert f"by {postfix.myhostname} (Postfix) with ESMTP id " in theirs, theirs
    return tls.group(1), ids.group(1)


def postfix_delivery(postfix, recipient, port):
    """Waits for Postfix's log line that `recipient` was sent to postilion; returns
    (Postfix queue id, postilion queue id)."""
    match = postfix.wait_for_log(
        rf"(\w+): to=<{re.escape(recipient)}>, relay=127\.0\.0\.1\[127\.0\.0\.1\]:{port}, .*"
        rf"status=sent \(250 2\.0\.0 [^)]*queued as ([0-9A-Z]{{13}})\)"
    )
    return match.group(1), match.group(2)


def tls_established(postfix, port):
    return re.findall(
        rf"(Untrusted|Anonymous|Trusted|Verified) TLS connection established to "
        rf"127\.0\.0\.1\[127\.0\.0\.1\]:{port}: (TLSv1\.[23]) with cipher (\S+)",
        postfix.log(),
    )


ORIGINAL = (
    b"From: Alice Example <alice@example.org>\r\n"
    b"To: Bob <bob@localhost>\r\n"
    b"Subject: relayed by Postfix,\r\n"
    b"\tfolded onto a second line\r\n"
    b"Date: Mon, 2 Mar 2026 10:00:00 +0000\r\n"
    b"Message-ID: <interop-1@example.org>\r\n"
    b"X-Spacing:   three spaces, trailing space \r\n"
    b"MIME-Version: 1.0\r\n"
    b"Content-Type: text/plain; charset=us-ascii\r\n"
    b"\r\n"
    b"First line.\r\n"
    b".A line that starts with a dot\r\n"
    b".\r\n"
    b"..\r\n"
    b"\r\n"
    b"\tindented with a tab, trailing spaces   \r\n"
    b"From the start of a line\r\n" + b"x" * 990 + b"\r\n"
    b"Last line.\r\n"
)


def test_postfix_relays_to_postilion_with_starttls(server, start_postfix):
    postfix = relay_to(server, start_postfix)
    port = server.port("smtp")
    submit(postfix, "alice@example.org", ["bob@localhost"], ORIGINAL)

    [delivered] = server.wait_for_messages("bob", 1, timeout=60)
    fields = split_delivered(delivered, ORIGINAL)
    version, postilion_id = check_relay_trace(fields, postfix, "bob@localhost", "alice@example.org")

    postfix_id, queued_as = postfix_delivery(postfix, "bob@localhost", port)
    assert queued_as == postilion_id
    assert f"by {postfix.myhostname} (Postfix) with ESMTP id {postfix_id}" in fields[3][1].decode()
    # Postfix required TLS and says it had it, with the version postilion recorded.
    sessions = tls_established(postfix, port)
    assert len(sessions) == 1, postfix.log()
    assert sessions[0][1] == version
    assert server.messages("bob") == [delivered], "exactly once"


def test_8bit_body_relayed_unchanged(server, start_postfix):
    # The SMTP client's side of the dialogue is logged for peers in debug_peer_list.
    postfix = relay_to(server, start_postfix, main_cf={"debug_peer_list": "127.0.0.1", "debug_peer_level": "2"})
    port = server.port("smtp")
    original = (
        b"From: alice@example.org\r\n"
        b"To: carol@localhost\r\n"
        b"Subject: 8-bit body\r\n"
        b"MIME-Version: 1.0\r\n"
        b"Content-Type: text/plain; charset=utf-8\r\n"
        b"Content-Transfer-Encoding: 8bit\r\n"
        b"\r\n"
        + "Grüße aus Köln, ça va ? Ελληνικά, 日本語, emoji 📬.\r\n".encode()
        + b"Octets that are not UTF-8: " + bytes(range(0x80, 0x100)) + b"\r\n"
        + b".\xc3\xa9 dot then 8-bit\r\n"
    )
    submit(postfix, "alice@example.org", ["carol@localhost"], original, mail_options=["BODY=8BITMIME"])

    [delivered] = server.wait_for_messages("carol", 1, timeout=60)
    fields = split_delivered(delivered, original)
    check_relay_trace(fields, postfix, "carol@localhost", "alice@example.org")
    assert b"X-MIME-Autoconverted" not in delivered
    postfix_delivery(postfix, "carol@localhost", port)
    # Postfix passed BODY=8BITMIME on, over TLS, to postilion (which advertises 8BITMIME).
    log = postfix.log()
    assert re.search(
        rf"> 127\.0\.0\.1\[127\.0\.0\.1\]:{port}: MAIL FROM:<alice@example\.org> SIZE=\d+ BODY=8BITMIME", log
    ), log[-6000:]
    assert len(tls_established(postfix, port)) == 1


def test_multiple_recipients_in_one_transaction(server, start_postfix):
    postfix = relay_to(server, start_postfix)
    port = server.port("smtp")
    recipients = ["alice@localhost", "bob@localhost", "carol@localhost"]
    original = (
        b"From: sender@example.org\r\n"
        b"To: alice@localhost, bob@localhost\r\n"
        b"Cc: carol@localhost\r\n"
        b"Subject: three recipients\r\n"
        b"\r\n"
        b"One transaction, three mailboxes.\r\n"
    )
    submit(postfix, "sender@example.org", recipients, original)

    postilion_ids, postfix_ids = set(), set()
    for recipient in recipients:
        mailbox = recipient.split("@")[0]
        [delivered] = server.wait_for_messages(mailbox, 1, timeout=60)
        fields = split_delivered(delivered, original)
        _, postilion_id = check_relay_trace(fields, postfix, recipient, "sender@example.org", single_recipient=False)
        postilion_ids.add(postilion_id)
        postfix_id, queued_as = postfix_delivery(postfix, recipient, port)
        assert queued_as == postilion_id
        postfix_ids.add(postfix_id)
    # One message in each queue: Postfix sent the three recipients in one transaction, in one
    # TLS session, and postilion queued them as one message.
    assert len(postilion_ids) == 1 and len(postfix_ids) == 1
    assert len(tls_established(postfix, port)) == 1
    server.wait_until_queue_empty()


# ---------------------------------------------------------------------------------------------
# Postilion relays to Postfix.


def test_postilion_relays_to_postfix_found_by_mx_with_verified_starttls(start_server, start_postfix, dns, tls_ca):
    """Postilion finds Postfix as the MX of example.test through the test DNS server, checks
    its certificate against the test CA (tls = "verify") and relays two recipients in one
    transaction; Postfix stores the message unchanged after the trace fields."""
    from peers import reserve_port

    port, sockets = reserve_port(["127.0.0.27"])
    for sock in sockets:
        sock.close()
    postfix = start_postfix(
        host="127.0.0.27", port=port, virtual_domains=["example.test"], smtpd_tls=tls_ca, myhostname="mx.example.test"
    )
    dns.add("example.test", "MX", (10, "mx.example.test"))
    dns.add("mx.example.test", "A", "127.0.0.27")
    server = start_server(
        listeners=[{"name": "smtp", "address": "127.0.0.1:0", "tls": "starttls"}],
        relay={"networks": ["127.0.0.0/8"]},
        dns={"nameservers": [f"127.0.0.1:{dns.address[1]}"], "cache_size": 0},
        outbound={"port": postfix.port, "tls": "verify", "ca_file": str(tls_ca.ca_file)},
    )
    original = (
        "From: alice@localhost\r\nTo: bob@example.test\r\nSubject: caf\u00e9 via Postilion\r\n"
        "MIME-Version: 1.0\r\nContent-Type: text/plain; charset=utf-8\r\nContent-Transfer-Encoding: 8bit\r\n"
        "\r\n.leading dot\r\nna\u00efve 8-bit line\r\n"
    ).encode()
    with smtplib.SMTP("127.0.0.1", server.port(), local_hostname="client.test", timeout=30) as client:
        refused = client.sendmail("alice@localhost", ["alice@example.test", "bob@example.test"], original, ["BODY=8BITMIME"])
    assert refused == {}
    [delivered] = postfix.wait_for_maildir(1, user="bob")
    assert len(postfix.wait_for_maildir(1, user="alice")) == 1
    assert delivered.endswith(original.replace(b"\r\n", b"\n")), "byte-exact after the trace fields"
    head = delivered[: len(delivered) - len(original.replace(b"\r\n", b"\n"))].decode()
    assert head.startswith("Return-Path: <alice@localhost>\n")
    # Postfix's Received names postilion's EHLO and TLS; postilion's own follows it.
    assert "Received: from mx.test" in head and "(using TLSv1." in head
    assert "by mx.test" in head
    log = postfix.log()
    assert re.search(r"TLS connection established from unknown\[127\.0\.0\.1\]: TLSv1\.[23]", log)
    # One connection, one transaction, both recipients.
    assert len(re.findall(r"connect from unknown\[127\.0\.0\.1\]", log)) == 1
    server.wait_until_queue_empty()
    relayed = server.wait_for_log('result="delivered"', count=2)
    assert relayed.count('result="delivered"') == 2 and "TLSv1." in relayed


# ---------------------------------------------------------------------------------------------
# The fixtures themselves.


def test_postfix_receives_into_virtual_maildirs_over_starttls(start_postfix, tls_ca):
    """The mode outbound delivery will be tested against: Postfix on its own loopback address,
    STARTTLS with a certificate from the test CA, mail for example.test into Maildirs."""
    postfix = start_postfix(
        host="127.0.0.26", virtual_domains=["example.test"], smtpd_tls=tls_ca, myhostname="mx.example.test"
    )
    original = b"From: sender@example.org\r\nTo: alice@example.test\r\nSubject: to Postfix\r\n\r\nHello.\r\n.dot\r\n"
    with smtplib.SMTP(postfix.host, postfix.port, local_hostname="client.test", timeout=30) as client:
        client.ehlo()
        assert client.has_extn("starttls")
        context = tls_ca.client_context(check_hostname=False)  # the chain is verified
        client.starttls(context=context)
        assert ("DNS", "mx.example.test") in client.sock.getpeercert()["subjectAltName"]
        client.ehlo()
        assert client.sendmail("sender@example.org", ["alice@example.test", "bob@example.test"], original) == {}
        # An MX for example.test only: unknown mailboxes and other domains are refused.
        client.mail("sender@example.org")
        code, reply = client.rcpt("nobody@example.test")
        assert (code, reply[:5]) == (550, b"5.1.1"), reply
        code, reply = client.rcpt("someone@elsewhere.test")
        assert (code, reply[:5]) == (554, b"5.7.1"), reply
        client.rset()

    assert len(postfix.wait_for_maildir(1, user="alice")) == 1
    [delivered] = postfix.wait_for_maildir(1, user="bob")
    # The Maildir file has LF line endings; Postfix added Return-Path, X-Original-To,
    # Delivered-To and its Received field in front of the message.
    assert delivered.endswith(original.replace(b"\r\n", b"\n"))
    head = delivered[: len(delivered) - len(original.replace(b"\r\n", b"\n"))].decode()
    assert head.startswith("Return-Path: <sender@example.org>\nX-Original-To: bob@example.test\nDelivered-To: bob@example.test\nReceived: from client.test")
    assert "with ESMTPS id" in head and "(using TLSv1." in head
    assert re.search(r"TLS connection established from unknown\[127\.0\.0\.1\]: TLSv1\.[23]", postfix.log())
    assert postfix.maildir("alice").is_dir() and not postfix.maildir("nobody").exists()


def test_smtp_peers_with_postfix_as_client(smtp_peers, start_postfix, tls_ca):
    """Postfix's SMTP client against two SMTP peers on one port: verified TLS with the test
    CA, a temporary failure then success, and what the peer recorded."""
    peers = smtp_peers(2, hostnames=["mx1.example.test", "mx2.example.test"], certificate=tls_ca)
    first, second = peers
    assert first.port == second.port and peers.hosts == ["127.0.0.2", "127.0.0.3"]
    first.temp_fail(1, at="rcpt")
    postfix = start_postfix(
        relayhost=(first.host, peers.port), smtp_tls_security_level="encrypt", smtp_tls_ca_file=tls_ca.ca_file
    )
    body = b"Subject: to a peer\r\n\r\n" + "8-bit: é\r\n".encode() + b".dot\r\n"
    submit(postfix, "alice@example.org", ["rcpt@example.test"], body, mail_options=["BODY=8BITMIME"])

    # The first transaction gets 451 at RCPT; Postfix defers the message, and retries it at
    # once when its queue is flushed.
    [refused] = first.wait_for_transactions(1)
    assert refused.rejected_rcpts == [("rcpt@example.test", "451 4.3.0 Try again later")]
    postfix.wait_for_log(r"status=deferred \(host 127\.0\.0\.2\[127\.0\.0\.2\] said: 451 4\.3\.0 Try again later")
    postfix.flush()
    [message] = first.wait_for(1, timeout=60)
    assert first.refusals == ["451 4.3.0 Try again later"]
    assert message.rcpt_tos == ["rcpt@example.test"] and message.mail_from == "alice@example.org"
    assert message.mail_param("BODY") == "8BITMIME" and message.mail_param("SIZE").isdigit()
    assert message.tls and message.tls_version in ("TLSv1.2", "TLSv1.3")
    assert message.helo == postfix.myhostname and message.esmtp
    assert message.data.endswith(body) and message.data.startswith(b"Received: ")
    assert first.connections >= 1 and second.connections == 0  # Postfix may reuse its session
    assert any(g.command == "EHLO" and g.tls for g in first.greetings)
    # The chain to the test CA was verified (Postfix does not check an IP literal's name).
    postfix.wait_for_log(rf"Trusted TLS connection established to 127\.0\.0\.2\[127\.0\.0\.2\]:{peers.port}")


def test_smtp_peer_behaviours(smtp_peers):
    [peer] = smtp_peers(1, starttls=False)
    peer.reject_recipient("gone@example.test")
    peer.reject_data("554 5.7.1 Rejected", count=1)
    with smtplib.SMTP(peer.host, peer.port, local_hostname="client.test", timeout=10) as client:
        client.ehlo()
        assert not client.has_extn("starttls") and client.has_extn("8bitmime") and client.has_extn("smtputf8")
        client.mail("", ["BODY=8BITMIME"])
        assert client.rcpt("gone@example.test")[0] == 550
        assert client.rcpt("here@example.test")[0] == 250
        assert client.data(b"first\r\n")[0] == 554
        assert client.sendmail("a@example.org", ["here@example.test"], b"second\r\n") == {}
        code, reply = client.mail("a@example.org", ["RET=HDRS"])
        assert code == 555, reply  # DSN is not advertised
    peer.esmtp = False
    peer.drop_during_data(1)
    with smtplib.SMTP(peer.host, peer.port, local_hostname="client.test", timeout=10) as client:
        assert client.ehlo()[0] == 502
        assert client.helo()[0] == 250
        client.mail("a@example.org")
        client.rcpt("here@example.test")
        with pytest.raises(smtplib.SMTPServerDisconnected):
            client.data(b"dropped\r\n")
    [refused, accepted, dropped] = peer.transactions
    assert refused.mail_from == "" and refused.mail_options == ["BODY=8BITMIME"]
    assert refused.rejected_rcpts == [("gone@example.test", "550 5.1.1 No such user")]
    assert refused.reply == "554 5.7.1 Rejected" and refused.data == b"first\r\n" and not refused.accepted
    assert accepted.accepted and accepted.data == b"second\r\n"
    assert dropped.dropped and dropped.data == b"dropped\r\n" and dropped.reply is None and not dropped.esmtp
    assert [m.data for m in peer.wait_for(1)] == [b"second\r\n"]
    assert peer.connections == 2


def test_dns_server_answers(dns):
    dns.add("example.test", "MX", (10, "mx1.example.test"))
    dns.add("mx1.example.test", "A", "127.0.0.2")
    dns.add("mx1.example.test", "AAAA", "::1")
    dns.add("null.test", "MX", (0, "."))
    dns.add("alias.example.test", "CNAME", "mx1.example.test")
    dns.add("text.test", "TXT", "v=spf1 -all")
    dns.servfail("broken.test")
    dns.timeout("slow.test")

    def ask(name, rtype, tcp=False, timeout=5):
        packet = DNSRecord.question(name, rtype).send(*dns.address, tcp=tcp, timeout=timeout)
        return DNSRecord.parse(packet)

    for tcp in (False, True):
        reply = ask("example.test", "MX", tcp)
        assert [(str(rr.rdata.label), rr.rdata.preference) for rr in reply.rr] == [("mx1.example.test.", 10)]
        assert [str(rr.rdata) for rr in reply.ar] == ["127.0.0.2", "::1"]
    assert [str(rr.rdata) for rr in ask("null.test", "MX").rr] == ["0 ."]
    assert [str(rr.rdata) for rr in ask("alias.example.test", "A").rr] == ["mx1.example.test.", "127.0.0.2"]
    assert [str(rr.rdata) for rr in ask("text.test", "TXT").rr] == ['"v=spf1 -all"']
    nxdomain = ask("nothing.example.test", "MX")
    assert nxdomain.header.rcode == 3 and not nxdomain.rr and nxdomain.auth[0].rtype == 6  # SOA
    nodata = ask("mx1.example.test", "MX")
    assert nodata.header.rcode == 0 and not nodata.rr and nodata.auth[0].rtype == 6
    assert ask("broken.test", "A").header.rcode == 2
    assert ask("example.org", "A").header.rcode == 5  # not served: REFUSED
    with pytest.raises(socket.timeout):
        ask("slow.test", "A", timeout=0.3)
    dns.remove("mx1.example.test", "A")
    assert [str(rr.rdata) for rr in ask("mx1.example.test", "A").rr] == []
    assert [q.protocol for q in dns.queried("example.test", "MX")] == ["udp", "tcp"]
    assert dns.queried("slow.test")[0].rcode is None
