"""Fixtures that start the real `postilion` binary on free loopback ports.

Every server a test starts is stopped when the test ends, pass or fail.
"""

import os
import re
import signal
import socket
import ssl
import subprocess
import threading
import time
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
BINARY = Path(os.environ.get("POSTILION_BIN", REPO / "target" / "debug" / "postilion"))

LISTENING = re.compile(r"^listening on (\S+) \((\S+), (\S+)\)$")


def toml_value(value):
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, float)):
        return str(value)
    if isinstance(value, str):
        return '"' + value.replace("\\", "\\\\").replace('"', '\\"') + '"'
    if isinstance(value, list):
        return "[" + ", ".join(toml_value(v) for v in value) + "]"
    if isinstance(value, dict):
        return "{ " + ", ".join(f"{toml_value(k)} = {toml_value(v)}" for k, v in value.items()) + " }"
    raise TypeError(value)


def render_config(data_dir, listeners, sections):
    lines = [f"data_dir = {toml_value(str(data_dir))}", 'hostname = "mx.test"']
    # Top-level keys (user = ...) come before the first table.
    for key, value in sections.items():
        if not isinstance(value, dict):
            lines.append(f"{key} = {toml_value(value)}")
    sections = {key: value for key, value in sections.items() if isinstance(value, dict)}
    for listener in listeners:
        lines.append("[[listeners]]")
        for key, value in listener.items():
            lines.append(f"{key} = {toml_value(value)}")
    for section, values in sections.items():
        lines.append(f"[{section}]")
        for key, value in values.items():
            lines.append(f"{key} = {toml_value(value)}")
    return "\n".join(lines) + "\n"


DEFAULT_LISTENERS = [
    {"name": "smtp", "address": "127.0.0.1:0", "tls": "starttls"},
    {"name": "smtps", "address": "127.0.0.1:0", "tls": "implicit"},
    {"name": "legacy", "address": "127.0.0.1:0", "tls": "none", "bare_line_endings": "normalize"},
]


class Server:
    """A running postilion process."""

    def __init__(self, data_dir, config_path):
        self.data_dir = Path(data_dir)
        self.config_path = config_path
        self.listeners = {}
        self.proc = None
        self.log_lines = []

    def start(self, timeout=30):
        self.listeners = {}
        self.proc = subprocess.Popen(
            [str(BINARY), "serve", "--config", str(self.config_path)],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            env={**os.environ, "POSTILION_LOG": os.environ.get("POSTILION_LOG", "info")},
        )
        threading.Thread(target=self._drain_stderr, args=(self.proc,), daemon=True).start()
        deadline = time.time() + timeout
        while time.time() < deadline:
            line = self.proc.stdout.readline()
            if not line:
                raise RuntimeError(f"postilion exited early ({self.proc.wait()}):\n" + "".join(self.log_lines[-30:]))
            line = line.strip()
            match = LISTENING.match(line)
            if match:
                host, port = match.group(1).rsplit(":", 1)
                self.listeners[match.group(2)] = (host, int(port))
            elif line.startswith("data directory"):
                threading.Thread(target=self.proc.stdout.read, daemon=True).start()
                return self
        raise RuntimeError("postilion did not start in time")

    def _drain_stderr(self, proc):
        for line in proc.stderr:
            self.log_lines.append(line)

    def port(self, name="smtp"):
        return self.listeners[name][1]

    @property
    def pid(self):
        return self.proc.pid

    def kill9(self):
        if self.proc and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGKILL)
            self.proc.wait(10)

    def stop(self, sig=signal.SIGTERM, timeout=60):
        if self.proc and self.proc.poll() is None:
            self.proc.send_signal(sig)
            try:
                return self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)
                raise
        return self.proc.returncode if self.proc else None

    def log(self):
        return "".join(self.log_lines)

    def wait_for_log(self, text, count=1, timeout=5):
        """The log once `text` is in it `count` times (or the timeout passed): the server's
        log thread writes lines out in batches, up to about 10 ms after they are logged."""
        deadline = time.time() + timeout
        while self.log().count(text) < count and time.time() < deadline:
            time.sleep(0.02)
        return self.log()

    def rss_kib(self):
        for line in Path(f"/proc/{self.pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
        raise RuntimeError("no VmRSS")

    # Maildir helpers.
    def maildir(self, mailbox):
        return self.data_dir / "maildir" / mailbox

    def messages(self, mailbox):
        new = self.maildir(mailbox) / "new"
        if not new.is_dir():
            return []
        return [p.read_bytes() for p in sorted(new.iterdir())]

    def wait_for_messages(self, mailbox, count, timeout=20):
        deadline = time.time() + timeout
        while time.time() < deadline:
            found = self.messages(mailbox)
            if len(found) >= count:
                return found
            time.sleep(0.05)
        raise AssertionError(f"{mailbox}: expected {count} messages, found {len(self.messages(mailbox))}\n{self.log()[-3000:]}")

    def queued(self):
        """Messages still in the spool (journal and database), as `postilion queue count`
        reads them while the server runs."""
        counted = subprocess.run(
            [str(BINARY), "queue", "count", "--data", str(self.data_dir)],
            capture_output=True,
            text=True,
            timeout=30,
        )
        assert counted.returncode == 0, counted.stderr
        return int(counted.stdout)

    def wait_until_queue_empty(self, timeout=30):
        deadline = time.time() + timeout
        while time.time() < deadline:
            if self.queued() == 0:
                return
            time.sleep(0.1)
        raise AssertionError(f"queue not empty after {timeout}s: {self.queued()} left")


@pytest.fixture
def start_server(tmp_path):
    """Returns a function that starts a server with extra config sections; all are stopped."""
    servers = []

    def start(listeners=None, data_dir=None, **sections):
        data = Path(data_dir) if data_dir else tmp_path / f"data{len(servers)}"
        config_path = tmp_path / f"config{len(servers)}.toml"
        sections.setdefault("spool", {}).setdefault("free_space_reserve", 0)
        # Never the machine's resolver: a test that relays names its DNS server; any other
        # lookup goes to a closed port on loopback and fails at once.
        sections.setdefault("dns", {}).setdefault("nameservers", ["127.0.0.1:9"])
        config_path.write_text(render_config(data, listeners or DEFAULT_LISTENERS, sections))
        server = Server(data, config_path)
        servers.append(server)
        return server.start()

    yield start
    for server in servers:
        try:
            server.stop(signal.SIGKILL, timeout=10)
        except Exception:
            pass


@pytest.fixture
def server(start_server):
    return start_server()


def client_tls_context():
    """Accepts the server's self-signed certificate (tests check the TLS version instead)."""
    context = ssl.create_default_context()
    context.check_hostname = False
    context.verify_mode = ssl.CERT_NONE
    return context


class RawClient:
    """A raw SMTP connection for byte-level tests."""

    def __init__(self, port, host="127.0.0.1", timeout=20, tls=False):
        self.sock = socket.create_connection((host, port), timeout=timeout)
        if tls:
            self.sock = client_tls_context().wrap_socket(self.sock, server_hostname="mx.test")
        self.buffer = b""

    def send(self, data):
        if isinstance(data, str):
            data = data.encode()
        self.sock.sendall(data)

    def line(self):
        while b"\r\n" not in self.buffer:
            chunk = self.sock.recv(65536)
            if not chunk:
                raise ConnectionError(f"closed; buffered {self.buffer!r}")
            self.buffer += chunk
        line, self.buffer = self.buffer.split(b"\r\n", 1)
        return line.decode("utf-8", "replace")

    def reply(self):
        """Reads one (possibly multi-line) reply; returns (code, [lines])."""
        lines = []
        while True:
            line = self.line()
            lines.append(line)
            if len(line) < 4 or line[3] != "-":
                return int(line[:3]), lines

    def expect(self, code):
        got, lines = self.reply()
        assert got == code, f"expected {code}, got {lines}"
        return lines

    def command(self, text, code):
        self.send(text + "\r\n")
        return self.expect(code)

    def starttls(self):
        self.sock = client_tls_context().wrap_socket(self.sock, server_hostname="mx.test")
        self.buffer = b""

    def closed(self, timeout=5):
        """True when the server closed the connection."""
        self.sock.settimeout(timeout)
        try:
            return self.sock.recv(1) == b""
        except (ConnectionResetError, ssl.SSLError):
            return True

    def close(self):
        try:
            self.sock.close()
        except OSError:
            pass


# ---------------------------------------------------------------------------------------------
# Peers for outbound delivery and interoperability tests: a DNS server, receiving SMTP servers
# and private Postfix instances (peers.py, postfix.py). Each is stopped when the test ends;
# what it saw is printed at teardown, which pytest shows when the test failed.


@pytest.fixture
def dns():
    """A DNS server on 127.0.0.1:<free port>, UDP and TCP, serving a zone the test edits:

    dns.add("example.test", "MX", (10, "mx1.example.test")); dns.add("mx1.example.test", "A",
    "127.0.0.2"); dns.servfail(name); dns.timeout(name); dns.address -> ("127.0.0.1", port);
    dns.queried("example.test", "MX") -> the queries received for it.
    """
    from peers import DnsServer

    server = DnsServer().start()
    yield server
    server.stop()
    print(server.describe())


@pytest.fixture
def tls_ca(tmp_path):
    """A test certificate authority: tls_ca.issue("mx1.example.test") -> CertFiles;
    tls_ca.ca_file is the PEM file a client trusts."""
    from peers import CertAuthority

    return CertAuthority(tmp_path / "ca")


@pytest.fixture
def smtp_peers(tmp_path):
    """Starts receiving SMTP servers that share one port on several loopback addresses.

    smtp_peers(2) -> PeerGroup of SmtpPeer on 127.0.0.2 and 127.0.0.3, same .port
    smtp_peers(["127.0.0.5"], port=group.port, starttls=False, esmtp=False)
    hostnames=[...] names the peers (EHLO, certificates); certificate= a CertFiles for all, a
    CertAuthority (each peer gets a certificate for its hostname), or None (self-signed).
    Other keywords are SmtpPeer settings.
    """
    from peers import PeerGroup, SmtpPeer, listen_on, reserve_port

    started = []

    def start(hosts=2, *, port=None, hostnames=None, certificate=None, **options):
        if isinstance(hosts, int):
            hosts = [f"127.0.0.{2 + i}" for i in range(hosts)]
        hosts = list(hosts)
        if port is None:
            port, sockets = reserve_port(hosts)
        else:
            sockets = []
            try:
                for host in hosts:
                    sockets.append(listen_on(host, port))
            except OSError:
                for sock in sockets:
                    sock.close()
                raise
        group = PeerGroup()
        for index, (host, sock) in enumerate(zip(hosts, sockets)):
            hostname = hostnames[index] if hostnames else None
            directory = tmp_path / f"peer-{host}-{port}"
            peer = SmtpPeer(host, sock=sock, hostname=hostname, certificate=certificate, directory=directory, **options)
            started.append(peer)
            group.append(peer.start())
        return group

    yield start
    for peer in started:
        try:
            peer.stop()
        finally:
            print(peer.describe())


@pytest.fixture
def start_postfix(tmp_path):
    """Returns a function that starts a private Postfix instance (postfix.Postfix keywords):

    start_postfix(relayhost=("127.0.0.1", port), smtp_tls_security_level="encrypt")
    start_postfix(virtual_domains=["example.test"], smtpd_tls=tls_ca, host="127.0.0.9", port=p)
    Every instance is stopped at teardown. Skips the test without root or Postfix.
    """
    import postfix

    reason = postfix.unavailable_reason()
    if reason:
        pytest.skip(reason)
    instances = []

    def start(**options):
        instance = postfix.Postfix(tmp_path / f"postfix{len(instances)}", **options)
        instances.append(instance)
        return instance.start()

    yield start
    for instance in instances:
        try:
            instance.stop()
        finally:
            print(instance.describe())


def no_verify():
    """A client TLS context that accepts any certificate (the servers' are self-signed)."""
    context = ssl.create_default_context()
    context.check_hostname = False
    context.verify_mode = ssl.CERT_NONE
    return context


def add_user(data_dir, name, password, *args):
    """Creates an account with `postilion user add`, the password on standard input."""
    result = subprocess.run(
        [str(BINARY), "user", "add", name, "--data", str(data_dir), *args],
        input=password + "\n",
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 0, result.stderr
    return result.stdout
