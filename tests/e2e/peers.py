"""Real network peers for the end-to-end tests of outbound delivery, all on loopback.

- `DnsServer`: an authoritative-style DNS server (UDP and TCP, dnslib's server classes) whose
  in-memory zone a test edits while it runs: MX, A, AAAA, CNAME and TXT records, names that
  answer SERVFAIL or never answer, NXDOMAIN and NODATA with an SOA, and a log of every query.
- `SmtpPeer`: a receiving SMTP server (aiosmtpd) bound to any 127.0.0.x address that records
  every transaction and can misbehave on demand: temporary and permanent failures, a dropped
  connection during DATA, no ESMTP, STARTTLS with a self-signed or CA-signed certificate, and
  a chosen set of EHLO extensions.
- `reserve_port` / `free_port`: one port free on several loopback addresses at once, since
  outbound delivery uses one remote port for every host (as port 25 is in real life).
- `CertAuthority` and `self_signed`: certificates for those peers (trustme, cryptography).
"""

import asyncio
import collections
import datetime
import ipaddress
import re
import shutil
import socket
import ssl
import struct
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

from aiosmtpd.smtp import SMTP
from dnslib import AAAA, CNAME, DNSHeader, DNSRecord, EDNS0, MX, QTYPE, RCODE, RR, SOA, TXT, A
from dnslib.server import DNSHandler, DNSServer

# ---------------------------------------------------------------------------------------------
# Ports and sockets


def listen_on(host, port, backlog=128):
    """A TCP socket bound to host:port (0: any free port) and listening."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind((host, port))
        sock.listen(backlog)
    except OSError:
        sock.close()
        raise
    return sock


def reserve_port(hosts, attempts=50):
    """Binds and listens on one TCP port on every address in `hosts`.

    Returns (port, [listening sockets in the order of hosts]). The sockets are already
    listening, so no other process can take the port before the servers use them.
    """
    hosts = list(hosts)
    if not hosts:
        raise ValueError("no hosts")
    last_error = None
    for _ in range(attempts):
        first = listen_on(hosts[0], 0)
        port = first.getsockname()[1]
        sockets = [first]
        try:
            for host in hosts[1:]:
                sockets.append(listen_on(host, port))
        except OSError as error:
            last_error = error
            for sock in sockets:
                sock.close()
            continue
        return port, sockets
    raise RuntimeError(f"no port free on all of {hosts} after {attempts} attempts: {last_error}")


def free_port(hosts=("127.0.0.1",), attempts=50):
    """A TCP port that was free on every address in `hosts` a moment ago.

    For servers that bind by themselves (Postfix); prefer `reserve_port` where the sockets can
    be handed over, since another process may take a port between this call and its use.
    """
    port, sockets = reserve_port(hosts, attempts)
    for sock in sockets:
        sock.close()
    return port


# ---------------------------------------------------------------------------------------------
# Certificates


@dataclass(frozen=True)
class CertFiles:
    """A certificate chain and its private key as PEM files."""

    cert_file: Path
    key_file: Path
    hostnames: tuple
    ca_file: Path = None  # the CA that signed it; None for a self-signed certificate

    def server_context(self):
        context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        context.load_cert_chain(str(self.cert_file), str(self.key_file))
        return context


class CertAuthority:
    """A test certificate authority (trustme). Put `ca_file` where a client needs its roots."""

    def __init__(self, directory):
        import trustme

        self.directory = Path(directory)
        self.directory.mkdir(parents=True, exist_ok=True)
        self._ca = trustme.CA(organization_name="Postilion test CA")
        self.ca_file = self.directory / "ca.pem"
        self._ca.cert_pem.write_to_path(str(self.ca_file))
        self._issued = 0

    def issue(self, *hostnames):
        """A certificate for `hostnames` (names or IP addresses), signed by this CA."""
        if not hostnames:
            raise ValueError("at least one host name")
        cert = self._ca.issue_cert(*hostnames)
        self._issued += 1
        stem = self.directory / f"{self._issued}-{_file_safe(hostnames[0])}"
        cert_file, key_file = stem.with_suffix(".crt"), stem.with_suffix(".key")
        with open(cert_file, "wb") as out:
            for blob in cert.cert_chain_pems:
                out.write(blob.bytes())
        cert.private_key_pem.write_to_path(str(key_file))
        return CertFiles(cert_file, key_file, tuple(hostnames), self.ca_file)

    def client_context(self, check_hostname=True):
        """A client SSLContext that trusts only this CA."""
        context = ssl.create_default_context(cafile=str(self.ca_file))
        context.check_hostname = check_hostname
        return context


def self_signed(directory, *hostnames, days=30):
    """A self-signed certificate (EC P-256) for `hostnames`, written under `directory`."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    if not hostnames:
        raise ValueError("at least one host name")
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, hostnames[0])])
    alt_names = []
    for host in hostnames:
        try:
            alt_names.append(x509.IPAddress(ipaddress.ip_address(host)))
        except ValueError:
            alt_names.append(x509.DNSName(host))
    now = datetime.datetime.now(datetime.timezone.utc)
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(days=1))
        .not_valid_after(now + datetime.timedelta(days=days))
        .add_extension(x509.SubjectAlternativeName(alt_names), critical=False)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .sign(key, hashes.SHA256())
    )
    stem = directory / f"self-signed-{_file_safe(hostnames[0])}"
    cert_file, key_file = stem.with_suffix(".crt"), stem.with_suffix(".key")
    cert_file.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_file.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
        )
    )
    return CertFiles(cert_file, key_file, tuple(hostnames), None)


def _file_safe(text):
    return re.sub(r"[^A-Za-z0-9_.-]", "_", text)[:60]


# ---------------------------------------------------------------------------------------------
# DNS


def _norm(name):
    name = str(name).strip().lower()
    return name[:-1] if name.endswith(".") and name != "." else name


def _under(name, zone):
    return name == zone or name.endswith("." + zone)


@dataclass
class Query:
    """One query the DNS server received."""

    name: str  # lower case, without the trailing dot
    rtype: str  # "MX", "A", ...
    protocol: str  # "udp" or "tcp"
    client: tuple
    rcode: str = None  # "NOERROR", "NXDOMAIN", ...; None when not answered (timeout)
    answers: int = 0
    when: float = field(default_factory=time.time)


@dataclass
class _Record:
    rtype: str
    value: object
    ttl: int
    rdata: object


_NO_ANSWER = object()


class _Resolver:
    """dnslib resolver over the DnsServer's in-memory zone data."""

    def __init__(self, zone_data):
        self.data = zone_data

    def resolve(self, request, handler):
        return self.data.answer(request, handler)


class _Handler(DNSHandler):
    """One message per UDP datagram; any number of length-prefixed messages per TCP connection.

    A query for a name set to time out gets no answer at all (the TCP connection stays open).
    """

    def handle(self):
        owner = self.server.owner
        if self.server.socket_type == socket.SOCK_STREAM:
            self.protocol = "tcp"
            owner._track(self.request, True)
            try:
                self.request.settimeout(owner.tcp_idle_timeout)
                while True:
                    header = self._recv_exact(2)
                    if header is None:
                        return
                    (length,) = struct.unpack("!H", header)
                    data = self._recv_exact(length)
                    if data is None:
                        return
                    reply = self._reply(data)
                    if reply is not None:
                        self.request.sendall(struct.pack("!H", len(reply)) + reply)
            except OSError:
                return
            finally:
                owner._track(self.request, False)
        else:
            self.protocol = "udp"
            data, sock = self.request
            reply = self._reply(data)
            if reply is not None:
                try:
                    sock.sendto(reply, self.client_address)
                except OSError:
                    pass

    def _recv_exact(self, size):
        data = b""
        while len(data) < size:
            chunk = self.request.recv(size - len(data))
            if not chunk:
                return None
            data += chunk
        return data

    def _reply(self, data):
        try:
            request = DNSRecord.parse(data)
        except Exception:
            return None
        reply = self.server.resolver.resolve(request, self)
        if reply is _NO_ANSWER:
            return None
        packed = reply.pack()
        if self.protocol == "udp":
            limit = 512
            for rr in request.ar:
                if rr.rtype == QTYPE.OPT:
                    limit = max(512, min(rr.rclass, 4096))
            if len(packed) > limit:
                truncated = DNSRecord(
                    DNSHeader(id=request.header.id, qr=1, aa=1, ra=1, rd=request.header.rd, tc=1),
                    q=request.q,
                )
                packed = truncated.pack()
        return bytes(packed)


class _QuietLogger:
    def __getattr__(self, name):
        return lambda *args: None


class DnsServer:
    """A DNS server on `host`:<free port>, UDP and TCP, serving a zone the test edits live.

        dns.add("example.test", "MX", (10, "mx1.example.test"))
        dns.add("mx1.example.test", "A", "127.0.0.2")
        dns.add("null.test", "MX", (0, "."))          # null MX (RFC 7505)
        dns.servfail("broken.test"); dns.timeout("slow.test")
        resolver config: dns.address -> ("127.0.0.1", port)

    The server is authoritative for `zones` and for the top-level label of every name added.
    A name under a served zone that has no records (and nothing below it) is NXDOMAIN with the
    zone's SOA in the authority section; a name that exists without records of the asked type
    is NOERROR with no answers and the SOA (NODATA); a name outside every zone is REFUSED.
    CNAMEs are followed (up to 8) within the served data. Records carry `ttl` (default 1s, so
    edits are seen at once by a caching resolver); the SOA minimum (negative TTL) is 1s too.
    """

    def __init__(self, host="127.0.0.1", zones=("test",), ttl=1, tcp_idle_timeout=30):
        self.host = host
        self.port = None
        self.ttl = ttl
        self.tcp_idle_timeout = tcp_idle_timeout
        self._lock = threading.Lock()
        self._records = collections.defaultdict(list)
        self._zones = {_norm(z) for z in zones}
        self._servfail = set()
        self._timeout = set()
        self._queries = []
        self._servers = []
        self._threads = []
        self._connections = set()
        self._serial = 1

    # -- lifecycle

    def start(self, attempts=50):
        resolver = _Resolver(self)
        logger = _QuietLogger()
        for _ in range(attempts):
            udp = DNSServer(resolver, address=self.host, port=0, tcp=False, logger=logger, handler=_Handler)
            port = udp.server.server_address[1]
            try:
                tcp = DNSServer(resolver, address=self.host, port=port, tcp=True, logger=logger, handler=_Handler)
            except OSError:
                udp.server.server_close()
                continue
            self.port = port
            self._servers = [udp, tcp]
            break
        else:
            raise RuntimeError("no port free for both UDP and TCP")
        for server in self._servers:
            server.server.owner = self
            thread = threading.Thread(
                target=server.server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True
            )
            thread.start()
            self._threads.append(thread)
        return self

    def stop(self):
        for server, thread in zip(self._servers, self._threads):
            if thread.is_alive():
                server.server.shutdown()
        for server in self._servers:
            server.server.server_close()
        with self._lock:
            connections = list(self._connections)
        for conn in connections:
            try:
                conn.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
        for thread in self._threads:
            thread.join(5)
        self._servers = []
        self._threads = []

    def __enter__(self):
        return self.start()

    def __exit__(self, *exc):
        self.stop()

    @property
    def address(self):
        """(host, port) to put in the resolver configuration."""
        return (self.host, self.port)

    def _track(self, conn, add):
        with self._lock:
            (self._connections.add if add else self._connections.discard)(conn)

    # -- zone editing

    def add_zone(self, zone):
        with self._lock:
            self._zones.add(_norm(zone))

    def add(self, name, rtype, value, ttl=None):
        """Adds a record. Values: MX (preference, exchange); A/AAAA address string; CNAME target;
        TXT a string (split into 255-octet strings) or a list of strings."""
        name, rtype = _norm(name), rtype.upper()
        rdata = self._rdata(rtype, value)
        with self._lock:
            if not any(_under(name, zone) for zone in self._zones):
                self._zones.add(name.rsplit(".", 1)[-1])
            self._records[name].append(_Record(rtype, value, self.ttl if ttl is None else ttl, rdata))
            self._serial += 1
        return self

    def remove(self, name, rtype=None):
        """Removes a name's records of `rtype` (all of them when None)."""
        name = _norm(name)
        with self._lock:
            records = self._records.get(name, [])
            kept = [r for r in records if rtype is not None and r.rtype != rtype.upper()]
            if kept:
                self._records[name] = kept
            else:
                self._records.pop(name, None)
            self._serial += 1

    def servfail(self, name, enabled=True):
        """Every query for `name` (any type) gets SERVFAIL."""
        with self._lock:
            (self._servfail.add if enabled else self._servfail.discard)(_norm(name))

    def timeout(self, name, enabled=True):
        """Queries for `name` (any type) are never answered."""
        with self._lock:
            (self._timeout.add if enabled else self._timeout.discard)(_norm(name))

    @staticmethod
    def _rdata(rtype, value):
        if rtype == "MX":
            preference, exchange = value
            return MX(exchange, int(preference))
        if rtype == "A":
            return A(str(ipaddress.IPv4Address(value)))
        if rtype == "AAAA":
            return AAAA(str(ipaddress.IPv6Address(value)))
        if rtype == "CNAME":
            return CNAME(value)
        if rtype == "TXT":
            parts = [value] if isinstance(value, (str, bytes)) else list(value)
            strings = []
            for part in parts:
                raw = part.encode() if isinstance(part, str) else bytes(part)
                strings.extend(raw[i : i + 255] for i in range(0, max(len(raw), 1), 255))
            return TXT(strings)
        raise ValueError(f"unsupported record type {rtype}")

    # -- query log

    @property
    def queries(self):
        with self._lock:
            return list(self._queries)

    def queried(self, name=None, rtype=None):
        """The logged queries, optionally only those for `name` and/or `rtype`."""
        return [
            q
            for q in self.queries
            if (name is None or q.name == _norm(name)) and (rtype is None or q.rtype == rtype.upper())
        ]

    def clear_log(self):
        with self._lock:
            self._queries.clear()

    def describe(self):
        lines = [f"DNS server {self.host}:{self.port}, {len(self.queries)} queries:"]
        for q in self.queries:
            lines.append(f"  {q.protocol} {q.name} {q.rtype} -> {q.rcode or 'no answer'} ({q.answers} answers)")
        return "\n".join(lines)

    # -- answering

    def _zone_for(self, name):
        matches = [zone for zone in self._zones if _under(name, zone)]
        return max(matches, key=len) if matches else None

    def _exists(self, name):
        if name in self._records or name in self._zones:
            return True
        suffix = "." + name
        return any(other.endswith(suffix) for other in self._records)

    def _soa(self, zone):
        return RR(
            zone,
            QTYPE.SOA,
            rdata=SOA(f"ns.{zone}", f"hostmaster.{zone}", (self._serial, 3600, 600, 86400, 1)),
            ttl=1,
        )

    def answer(self, request, handler):
        qname = _norm(request.q.qname)
        qtype = QTYPE.get(request.q.qtype, str(request.q.qtype))
        query = Query(qname, qtype, handler.protocol, handler.client_address)
        with self._lock:
            self._queries.append(query)
            if qname in self._timeout:
                return _NO_ANSWER
            reply = request.reply(ra=1, aa=1)
            for rr in request.ar:
                if rr.rtype == QTYPE.OPT:
                    reply.add_ar(EDNS0(udp_len=1232))
                    break
            if qname in self._servfail:
                reply.header.rcode = RCODE.SERVFAIL
            else:
                self._fill(reply, qname, qtype)
            query.rcode = RCODE.get(reply.header.rcode)
            query.answers = len(reply.rr)
            return reply

    def _fill(self, reply, qname, qtype):
        current = qname
        for _ in range(9):
            zone = self._zone_for(current)
            if zone is None:
                if current == qname:
                    reply.header.rcode = RCODE.REFUSED
                return
            if not self._exists(current):
                reply.header.rcode = RCODE.NXDOMAIN
                reply.add_auth(self._soa(zone))
                return
            records = self._records.get(current, [])
            if current == zone and qtype in ("SOA", "ANY"):
                reply.add_answer(self._soa(zone))
            cname = next((r for r in records if r.rtype == "CNAME"), None)
            if cname is not None and qtype not in ("CNAME", "ANY"):
                reply.add_answer(RR(current, QTYPE.CNAME, rdata=cname.rdata, ttl=cname.ttl))
                current = _norm(cname.value)
                continue
            matching = [r for r in records if qtype == "ANY" or r.rtype == qtype]
            for record in matching:
                reply.add_answer(RR(current, getattr(QTYPE, record.rtype), rdata=record.rdata, ttl=record.ttl))
            if not reply.rr:
                reply.add_auth(self._soa(zone))
            if qtype == "MX":
                for record in matching:
                    exchange = _norm(record.value[1])
                    for extra in self._records.get(exchange, []):
                        if extra.rtype in ("A", "AAAA"):
                            reply.add_ar(RR(exchange, getattr(QTYPE, extra.rtype), rdata=extra.rdata, ttl=extra.ttl))
            return


# ---------------------------------------------------------------------------------------------
# SMTP peers


@dataclass
class Transaction:
    """One mail transaction as a peer saw it, from MAIL to its end."""

    client: tuple  # (address, port) of the client
    helo: str  # the name given in EHLO or HELO
    esmtp: bool  # EHLO (True) or HELO (False)
    tls: bool  # TLS active when MAIL was given
    tls_version: str = None
    tls_cipher: str = None
    mail_from: str = ""  # "" for the null reverse path
    mail_options: list = field(default_factory=list)  # as sent, e.g. ["SIZE=123", "BODY=8BITMIME"]
    rcpt_tos: list = field(default_factory=list)  # accepted recipients
    rcpt_options: list = field(default_factory=list)  # one list per accepted recipient
    rejected_rcpts: list = field(default_factory=list)  # (address, reply)
    data: bytes = None  # the message as received: dot-unstuffed, CRLF line endings
    reply: str = None  # the reply to the end of data; None if not reached
    dropped: bool = False  # connection closed after the data, before any reply
    accepted: bool = False
    ended: bool = False  # by the end of data, RSET, a new EHLO/HELO, QUIT or a lost connection

    def mail_param(self, keyword):
        """The value of MAIL parameter `keyword` (True when it has none), or None."""
        return _param(self.mail_options, keyword)

    def rcpt_param(self, recipient, keyword):
        return _param(self.rcpt_options[self.rcpt_tos.index(recipient)], keyword)


def _param(params, keyword):
    for param in params:
        key, eq, value = param.partition("=")
        if key.upper() == keyword.upper():
            return value if eq else True
    return None


@dataclass
class Greeting:
    command: str  # "EHLO" or "HELO"
    name: str
    tls: bool
    reply: str


class _Behaviour:
    """A reply for the first `count` times (None: always), then nothing."""

    def __init__(self, reply, count=None):
        self.reply = reply
        self.left = count

    def take(self):
        if self.left is None:
            return self.reply
        if self.left > 0:
            self.left -= 1
            return self.reply
        return None


_ADDRESS = re.compile(r"^\s*<([^<>]*)>\s*(.*)$")


class _PeerSMTP(SMTP):
    """aiosmtpd's SMTP with the peer's EHLO, MAIL and RCPT handling and behaviours.

    aiosmtpd reads DATA (a line longer than 1001 octets gets 500) and un-stuffs dots; MAIL
    and RCPT are parsed here, to accept the null reverse path, keep parameters as sent and
    refuse those of extensions the peer did not advertise.
    """

    def __init__(self, peer):
        self.peer = peer
        self._transaction = None  # the transaction in progress
        self._transaction_counted = False  # its first RCPT was seen (temp_fail at="rcpt")
        self._transaction_tempfail = None
        self._reply_pending = None  # a transaction whose end-of-data reply is being sent
        self._raw_transport = None  # the TCP transport, under TLS once STARTTLS is done
        super().__init__(
            _PeerHandler(peer),
            hostname=peer.hostname,
            ident="ESMTP test peer",
            tls_context=peer._tls_context if peer.starttls else None,
            data_size_limit=peer.size_limit or None,
            enable_SMTPUTF8=peer.smtputf8,
            decode_data=False,
            timeout=peer.idle_timeout,
            loop=peer._loop,
        )
        # aiosmtpd keeps these limits in a class attribute shared by every session.
        self.command_size_limits = collections.defaultdict(lambda: self.command_size_limit)

    def connection_made(self, transport):
        if self._raw_transport is None:
            self._raw_transport = transport
            self.peer._protocols.add(self)
        super().connection_made(transport)

    def connection_lost(self, error):
        self.peer._protocols.discard(self)
        self._end_transaction()
        pending, self._reply_pending = self._reply_pending, None
        if pending is not None:
            self.peer._finish(pending)
        super().connection_lost(error)

    async def push(self, status):
        # A message counts as received once the client was sent the reply to its data.
        try:
            await super().push(status)
        finally:
            pending, self._reply_pending = self._reply_pending, None
            if pending is not None:
                self.peer._finish(pending)

    def _set_post_data_state(self):
        super()._set_post_data_state()
        self._end_transaction()

    def _end_transaction(self):
        transaction, self._transaction = getattr(self, "_transaction", None), None
        if transaction is not None and transaction is not getattr(self, "_reply_pending", None):
            self.peer._finish(transaction)

    def _tls_facts(self):
        if self._tls_protocol is None or self.transport is None:
            return False, None, None
        ssl_object = self.transport.get_extra_info("ssl_object")
        if ssl_object is None:
            return True, None, None
        cipher = ssl_object.cipher()
        return True, ssl_object.version(), cipher[0] if cipher else None

    def _refresh_settings(self):
        peer = self.peer
        self.hostname = peer.hostname
        self.data_size_limit = peer.size_limit or None
        self.enable_SMTPUTF8 = peer.smtputf8

    def _greeting(self, command, name, reply):
        self.peer._record_greeting(Greeting(command, name, self._tls_protocol is not None, reply))

    async def _push_lines(self, code, lines):
        for i, line in enumerate(lines):
            await self.push(f"{code}{'-' if i < len(lines) - 1 else ' '}{line}")

    async def smtp_EHLO(self, hostname):
        peer = self.peer
        if not hostname:
            await self.push("501 5.5.4 Syntax: EHLO hostname")
            return
        if not peer.esmtp:
            self._greeting("EHLO", hostname, peer.ehlo_refusal)
            await self.push(peer.ehlo_refusal)
            return
        self._refresh_settings()
        self._set_rset_state()
        self.session.extended_smtp = True
        self.session.host_name = hostname
        self.command_size_limits["MAIL"] = self.command_size_limits["RCPT"] = 2048
        lines = [self.hostname]
        if peer.pipelining:
            lines.append("PIPELINING")
        if peer.size_limit:
            lines.append(f"SIZE {peer.size_limit}")
        if peer.eightbitmime:
            lines.append("8BITMIME")
        if peer.smtputf8:
            lines.append("SMTPUTF8")
        if self.tls_context is not None and self._tls_protocol is None and peer.starttls:
            lines.append("STARTTLS")
        if peer.enhancedstatuscodes:
            lines.append("ENHANCEDSTATUSCODES")
        if peer.dsn:
            lines.append("DSN")
        lines.extend(peer.extra_extensions)
        self._greeting("EHLO", hostname, "250")
        await self._push_lines(250, lines)

    async def smtp_HELO(self, hostname):
        self._refresh_settings()
        if hostname:
            self._greeting("HELO", hostname, "250")
        await super().smtp_HELO(hostname)

    async def smtp_STARTTLS(self, arg):
        if not self.peer.starttls or self.tls_context is None or self._tls_protocol is not None:
            await self.push("454 4.7.0 TLS not available")
            return
        await super().smtp_STARTTLS(arg)

    async def _refuse(self, reply):
        self.peer._record_refusal(reply)
        await self.push(reply)

    async def smtp_MAIL(self, arg):
        if await self.check_helo_needed():
            return
        peer = self.peer
        match = _ADDRESS.match(arg[5:]) if arg and arg[:5].upper() == "FROM:" else None
        if match is None:
            await self._refuse("501 5.5.4 Syntax: MAIL FROM:<address> [parameters]")
            return
        if self.envelope.mail_from is not None:
            await self._refuse("503 5.5.1 Error: nested MAIL command")
            return
        address, params = match.group(1), match.group(2).split()
        if params and not self.session.extended_smtp:
            await self._refuse("555 5.5.4 MAIL parameters need EHLO")
            return
        error = peer._check_mail_params(params)
        if error:
            await self._refuse(error)
            return
        tls, version, cipher = self._tls_facts()
        transaction = Transaction(
            client=self.session.peer,
            helo=self.session.host_name,
            esmtp=self.session.extended_smtp,
            tls=tls,
            tls_version=version,
            tls_cipher=cipher,
            mail_from=address,
            mail_options=params,
        )
        self._transaction = transaction
        self._transaction_tempfail = None
        self._transaction_counted = False
        peer._record_transaction(transaction)
        self.envelope.mail_from = address
        self.envelope.mail_options = list(params)
        self.envelope.smtp_utf8 = any(p.upper() == "SMTPUTF8" for p in params)
        await self.push("250 2.1.0 Ok")

    async def smtp_RCPT(self, arg):
        if await self.check_helo_needed():
            return
        peer = self.peer
        transaction = self._transaction
        if transaction is None:
            await self._refuse("503 5.5.1 Error: need MAIL command")
            return
        match = _ADDRESS.match(arg[3:]) if arg and arg[:3].upper() == "TO:" else None
        if match is None or not match.group(1):
            await self._refuse("501 5.5.4 Syntax: RCPT TO:<address> [parameters]")
            return
        address, params = match.group(1), match.group(2).split()
        if params and not self.session.extended_smtp:
            await self._refuse("555 5.5.4 RCPT parameters need EHLO")
            return
        error = peer._check_rcpt_params(params)
        if error:
            await self._refuse(error)
            return
        if not self._transaction_counted:
            self._transaction_counted = True
            self._transaction_tempfail = peer._take("rcpt_tempfail")
        reply = self._transaction_tempfail or peer._recipient_reply(address) or "250 2.1.5 Ok"
        if reply.startswith("2"):
            transaction.rcpt_tos.append(address)
            transaction.rcpt_options.append(params)
            self.envelope.rcpt_tos.append(address)
            self.envelope.rcpt_options.extend(params)
            await self.push(reply)
        else:
            transaction.rejected_rcpts.append((address, reply))
            await self._refuse(reply)


class _PeerHandler:
    def __init__(self, peer):
        self.peer = peer

    async def handle_DATA(self, server, session, envelope):
        peer = self.peer
        transaction = server._transaction
        transaction.data = bytes(envelope.original_content)
        if peer._take("drop"):
            transaction.dropped = True
            peer._finish(transaction)
            server._raw_transport.abort()
            # connection_lost() cancels this session's task; nothing is sent.
            await asyncio.sleep(30)
        reply = peer._take("data_tempfail") or peer._take("data_reject") or "250 2.0.0 Ok: queued"
        transaction.reply = reply
        transaction.accepted = reply.startswith("2")
        if not transaction.accepted:
            peer._record_refusal(reply)
        server._reply_pending = transaction
        return reply


class SmtpPeer:
    """A receiving SMTP server on `host`:`port` that records everything (see module doc).

    Settings are attributes, read when a connection starts or at each command, so a test can
    change them while the peer runs:

        esmtp (True)             False: EHLO gets `ehlo_refusal` (502 5.5.1), HELO works
        starttls (True)          offer STARTTLS, with `certificate`: a CertFiles, a CertAuthority
                                 (issues one for `hostname`) or None (self-signed)
        size_limit (10 MiB)      advertised with SIZE and enforced; 0/None: no SIZE
        eightbitmime, smtputf8, pipelining, enhancedstatuscodes (True), dsn (False)
        extra_extensions ([])    more EHLO lines, e.g. ["CHUNKING"]
        strict (True)            refuse MAIL/RCPT parameters of extensions not advertised (555)

    Behaviours: `temp_fail`, `reject_recipient`, `reject_data`, `drop_during_data`,
    `accept_all`. Records: `transactions` (every MAIL that was accepted, whatever came after),
    `messages` (transactions whose data got 250), `greetings`, `refusals`, `connections`.
    """

    def __init__(
        self,
        host="127.0.0.2",
        port=0,
        *,
        sock=None,
        hostname=None,
        certificate=None,
        directory=None,
        starttls=True,
        esmtp=True,
        size_limit=10 * 1024 * 1024,
        eightbitmime=True,
        smtputf8=True,
        pipelining=True,
        enhancedstatuscodes=True,
        dsn=False,
        extra_extensions=(),
        strict=True,
        idle_timeout=60,
    ):
        self.host = host
        self._sock = sock
        self.port = sock.getsockname()[1] if sock is not None else port
        self.hostname = hostname or "mx-" + host.replace(".", "-").replace(":", "-") + ".peer.test"
        self._own_directory = directory is None
        self.directory = Path(directory) if directory else Path(tempfile.mkdtemp(prefix="smtp-peer-"))
        self.esmtp = esmtp
        self.ehlo_refusal = "502 5.5.1 Error: command not implemented"
        self.starttls = starttls
        self.size_limit = size_limit
        self.eightbitmime = eightbitmime
        self.smtputf8 = smtputf8
        self.pipelining = pipelining
        self.enhancedstatuscodes = enhancedstatuscodes
        self.dsn = dsn
        self.extra_extensions = list(extra_extensions)
        self.strict = strict
        self.idle_timeout = idle_timeout
        self._certificate = None
        self._tls_context = None
        if isinstance(certificate, CertAuthority):
            certificate = certificate.issue(self.hostname)
        self.certificate = certificate or self_signed(self.directory, self.hostname)
        self._state = threading.Condition()
        self._behaviours = {}
        self._rejected_recipients = {}
        self._transactions = []
        self._messages = []
        self._greetings = []
        self._refusals = []
        self.connections = 0
        self._protocols = set()
        self._loop = None
        self._thread = None
        self._server = None

    # -- settings

    @property
    def certificate(self):
        return self._certificate

    @certificate.setter
    def certificate(self, cert_files):
        """The certificate STARTTLS presents (CertFiles); takes effect for new connections."""
        self._tls_context = cert_files.server_context()
        self._certificate = cert_files

    @property
    def address(self):
        return (self.host, self.port)

    def temp_fail(self, count=1, at="rcpt", reply="451 4.3.0 Try again later"):
        """The first `count` transactions (None: all) get `reply` at every RCPT ("rcpt") or at
        the end of DATA ("data"); later ones are accepted."""
        if at not in ("rcpt", "data"):
            raise ValueError("at must be 'rcpt' or 'data'")
        with self._state:
            self._behaviours[f"{at}_tempfail"] = _Behaviour(reply, count)
        return self

    def reject_recipient(self, address, reply="550 5.1.1 No such user"):
        """RCPT TO:<address> (case-insensitive) gets `reply`."""
        with self._state:
            self._rejected_recipients[address.lower()] = reply
        return self

    def reject_data(self, reply="554 5.7.1 Rejected", count=None):
        """The end of DATA gets `reply` (for the next `count` messages; None: all)."""
        with self._state:
            self._behaviours["data_reject"] = _Behaviour(reply, count)
        return self

    def drop_during_data(self, count=None):
        """After the data of the next `count` messages (None: all) arrives, the connection is
        closed (TCP abort) without a reply."""
        with self._state:
            self._behaviours["drop"] = _Behaviour(True, count)
        return self

    def accept_all(self):
        """Clears every failure behaviour."""
        with self._state:
            self._behaviours.clear()
            self._rejected_recipients.clear()
        return self

    # -- lifecycle

    def start(self, timeout=10):
        if self._sock is None:
            self._sock = listen_on(self.host, self.port)
            self.port = self._sock.getsockname()[1]
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._run_loop, name=f"smtp-peer-{self.host}", daemon=True)
        self._thread.start()
        future = asyncio.run_coroutine_threadsafe(self._serve(), self._loop)
        future.result(timeout)
        return self

    def _run_loop(self):
        asyncio.set_event_loop(self._loop)
        self._loop.run_forever()

    def _factory(self):
        with self._state:
            self.connections += 1
        return _PeerSMTP(self)

    async def _serve(self):
        self._sock.setblocking(False)
        self._server = await self._loop.create_server(self._factory, sock=self._sock)

    async def _shutdown(self):
        if self._server is not None:
            self._server.close()
        for protocol in list(self._protocols):
            if protocol._raw_transport is not None:
                protocol._raw_transport.abort()
        await asyncio.sleep(0.05)
        tasks = [t for t in asyncio.all_tasks() if t is not asyncio.current_task()]
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)

    def stop(self, timeout=10):
        if self._loop is not None and self._thread is not None and self._thread.is_alive():
            try:
                asyncio.run_coroutine_threadsafe(self._shutdown(), self._loop).result(timeout)
            finally:
                self._loop.call_soon_threadsafe(self._loop.stop)
                self._thread.join(timeout)
        if self._loop is not None and not self._loop.is_running():
            self._loop.close()
        if self._sock is not None:
            self._sock.close()
        if self._own_directory:
            shutil.rmtree(self.directory, ignore_errors=True)

    def __enter__(self):
        return self.start()

    def __exit__(self, *exc):
        self.stop()

    # -- records

    @property
    def transactions(self):
        with self._state:
            return list(self._transactions)

    @property
    def messages(self):
        """Accepted messages (Transaction objects with .data), in arrival order."""
        with self._state:
            return list(self._messages)

    @property
    def greetings(self):
        with self._state:
            return list(self._greetings)

    @property
    def refusals(self):
        """Every 4xx/5xx reply this peer sent to MAIL, RCPT or the end of DATA."""
        with self._state:
            return list(self._refusals)

    def wait_for(self, count, timeout=30):
        """Waits until at least `count` messages were accepted; returns the messages."""
        deadline = time.monotonic() + timeout
        with self._state:
            while len(self._messages) < count:
                left = deadline - time.monotonic()
                if left <= 0:
                    raise AssertionError(f"expected {count} messages\n{self._describe_locked()}")
                self._state.wait(left)
            return list(self._messages)

    def wait_for_transactions(self, count, timeout=30):
        """Waits until at least `count` transactions ended, however they ended."""
        deadline = time.monotonic() + timeout
        with self._state:
            while sum(1 for t in self._transactions if t.ended) < count:
                left = deadline - time.monotonic()
                if left <= 0:
                    raise AssertionError(f"expected {count} finished transactions\n{self._describe_locked()}")
                self._state.wait(left)
            return list(self._transactions)

    def describe(self):
        with self._state:
            return self._describe_locked()

    def _describe_locked(self):
        lines = [
            f"SMTP peer {self.hostname} at {self.host}:{self.port}: {self.connections} connections, "
            f"{len(self._transactions)} transactions, {len(self._messages)} accepted"
        ]
        for g in self._greetings:
            lines.append(f"  {g.command} {g.name} tls={g.tls} -> {g.reply}")
        for t in self._transactions:
            lines.append(
                f"  MAIL <{t.mail_from}> {' '.join(t.mail_options)} tls={t.tls} rcpt={t.rcpt_tos} "
                f"rejected={t.rejected_rcpts} size={None if t.data is None else len(t.data)} "
                f"reply={t.reply!r} dropped={t.dropped}"
            )
        for r in self._refusals:
            lines.append(f"  refused: {r}")
        return "\n".join(lines)

    # -- called from the session (event loop thread)

    def _record_greeting(self, greeting):
        with self._state:
            self._greetings.append(greeting)

    def _record_refusal(self, reply):
        with self._state:
            self._refusals.append(reply)

    def _record_transaction(self, transaction):
        with self._state:
            self._transactions.append(transaction)

    def _finish(self, transaction):
        with self._state:
            if transaction.ended:
                return
            transaction.ended = True
            if transaction.accepted:
                self._messages.append(transaction)
            self._state.notify_all()

    def _take(self, name):
        with self._state:
            behaviour = self._behaviours.get(name)
            return behaviour.take() if behaviour else None

    def _recipient_reply(self, address):
        with self._state:
            return self._rejected_recipients.get(address.lower())

    def _check_mail_params(self, params):
        for param in params:
            key, eq, value = param.partition("=")
            key = key.upper()
            if key == "SIZE":
                if not value.isdigit():
                    return "501 5.5.4 Bad SIZE parameter"
                if self.size_limit and int(value) > self.size_limit:
                    return "552 5.3.4 Message size exceeds fixed maximum message size"
                if self.strict and not self.size_limit:
                    return "555 5.5.4 SIZE not supported"
            elif key == "BODY":
                if value.upper() not in ("7BIT", "8BITMIME"):
                    return "501 5.5.4 BODY must be 7BIT or 8BITMIME"
                if self.strict and value.upper() == "8BITMIME" and not self.eightbitmime:
                    return "555 5.5.4 8BITMIME not supported"
            elif key == "SMTPUTF8":
                if eq:
                    return "501 5.5.4 SMTPUTF8 takes no value"
                if not self.smtputf8:
                    return "555 5.5.4 SMTPUTF8 not supported"
            elif key in ("RET", "ENVID") and (self.dsn or not self.strict):
                continue
            elif self.strict:
                return f"555 5.5.4 Unsupported MAIL parameter {key}"
        return None

    def _check_rcpt_params(self, params):
        for param in params:
            key = param.partition("=")[0].upper()
            if key in ("NOTIFY", "ORCPT") and (self.dsn or not self.strict):
                continue
            if self.strict:
                return f"555 5.5.4 Unsupported RCPT parameter {key}"
        return None


class PeerGroup(list):
    """SMTP peers that share one port (on different addresses)."""

    @property
    def port(self):
        return self[0].port

    @property
    def hosts(self):
        return [peer.host for peer in self]

    def by_host(self, host):
        return next(peer for peer in self if peer.host == host)

    @property
    def messages(self):
        return [message for peer in self for message in peer.messages]

    def wait_for(self, count, timeout=30):
        """Waits until the peers together accepted at least `count` messages."""
        deadline = time.monotonic() + timeout
        while True:
            messages = self.messages
            if len(messages) >= count:
                return messages
            if time.monotonic() > deadline:
                raise AssertionError(f"expected {count} messages in all\n" + "\n".join(p.describe() for p in self))
            time.sleep(0.02)
