"""A private Postfix instance for interoperability tests, started and stopped by the test.

Every instance has its own config_directory, queue_directory, data_directory, syslog_name and
log file (`maillog_file`), listens only on the loopback address and port it is given
(master.cf, no chroot), does no DNS lookups, and is started with `postfix -c DIR start` and
stopped with `postfix -c DIR stop` (as root). Several may run at once. Its files are kept in
the test's directory once it stops (see `Postfix.__init__` for where they are meanwhile).

Modes, combinable:
- `virtual_domains=["example.test"]`: receives mail for those domains into Maildirs, one per
  mailbox in `mailboxes` (alice, bob, carol, dave, erin, postmaster by default):
  `<maildir_root>/<domain>/<local part>/new/`; other local parts go to the `catch_all`
  mailbox if one is named, else they are refused with 550 5.1.1.
- `relayhost=("127.0.0.1", port)`: relays all other mail there (`relayhost = [ip]:port`),
  with `smtp_tls_security_level` (e.g. "encrypt") and an optional `smtp_tls_ca_file`.
- `smtpd_tls=`: STARTTLS on its SMTP server with a CertFiles, a CertAuthority (a certificate
  for `myhostname` is issued) or True (self-signed).
"""

import os
import pty
import pwd
import re
import select
import shutil
import signal
import subprocess
import tempfile
import time
from pathlib import Path

from peers import CertAuthority, CertFiles, free_port, self_signed

POSTFIX = Path("/usr/sbin/postfix")
POSTQUEUE = Path("/usr/sbin/postqueue")

# Every service Postfix needs; "n" in the chroot column: nothing runs chrooted.
MASTER_SERVICES = """\
pickup     unix  n       -       n       60      1       pickup
cleanup    unix  n       -       n       -       0       cleanup
qmgr       unix  n       -       n       300     1       qmgr
tlsmgr     unix  -       -       n       1000?   1       tlsmgr
rewrite    unix  -       -       n       -       -       trivial-rewrite
bounce     unix  -       -       n       -       0       bounce
defer      unix  -       -       n       -       0       bounce
trace      unix  -       -       n       -       0       bounce
verify     unix  -       -       n       -       1       verify
flush      unix  n       -       n       1000?   0       flush
proxymap   unix  -       -       n       -       -       proxymap
proxywrite unix  -       -       n       -       1       proxymap
smtp       unix  -       -       n       -       -       smtp
relay      unix  -       -       n       -       -       smtp
showq      unix  n       -       n       -       -       showq
error      unix  -       -       n       -       -       error
retry      unix  -       -       n       -       -       error
discard    unix  -       -       n       -       -       discard
local      unix  -       n       n       -       -       local
virtual    unix  -       n       n       -       -       virtual
lmtp       unix  -       -       n       -       -       lmtp
anvil      unix  -       -       n       -       1       anvil
scache     unix  -       -       n       -       1       scache
postlog    unix-dgram n  -       n       -       1       postlogd
"""


def unavailable_reason():
    """Why a Postfix instance cannot be started here, or None."""
    if not POSTFIX.exists():
        return "postfix is not installed (scripts/install-test-deps installs it)"
    if os.geteuid() != 0:
        return "a private Postfix instance needs root"
    return None


def run_with_tty(argv, timeout=60, env=None):
    """Runs a command with a pseudo-terminal as stdout and stderr; returns (code, output).

    Postfix commands print their errors only when stderr is a terminal (otherwise they go to
    syslog, which a test machine may not have)."""
    master, slave = pty.openpty()
    try:
        proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=slave, stderr=slave, env=env)
    except BaseException:
        os.close(master)
        os.close(slave)
        raise
    os.close(slave)
    output = bytearray()
    deadline = time.monotonic() + timeout
    try:
        while True:
            ready, _, _ = select.select([master], [], [], 0.05)
            if ready:
                try:
                    chunk = os.read(master, 65536)
                except OSError:  # EIO: every holder of the terminal closed it
                    chunk = b""
                if chunk:
                    output += chunk
                    continue
            if proc.poll() is not None:
                # The daemon started by "postfix start" may keep the terminal open: read what
                # is there, without waiting for an end of file.
                while select.select([master], [], [], 0)[0]:
                    try:
                        chunk = os.read(master, 65536)
                    except OSError:
                        break
                    if not chunk:
                        break
                    output += chunk
                break
            if time.monotonic() > deadline:
                proc.kill()
                proc.wait(10)
                raise TimeoutError(f"{argv} did not finish in {timeout}s: {output.decode(errors='replace')}")
    finally:
        os.close(master)
    return proc.returncode, output.decode("utf-8", "replace").replace("\r\n", "\n")


class PostfixError(RuntimeError):
    pass


class Postfix:
    """One private Postfix instance (see the module doc).

    After start(): host, port, myhostname, log_file / log() / wait_for_log(pattern),
    maildir_root / maildir(user) / messages(user) / wait_for_maildir(count, user=None),
    flush() (postqueue -f), queue() (postqueue -p), postconf(...), certificate (smtpd's).
    `main_cf` adds or overrides main.cf parameters.
    """

    _instances = 0

    def __init__(
        self,
        directory,
        *,
        host="127.0.0.25",
        port=None,
        name=None,
        myhostname="postfix.test",
        virtual_domains=(),
        mailboxes=("alice", "bob", "carol", "dave", "erin", "postmaster"),
        catch_all=None,
        relayhost=None,
        smtp_tls_security_level=None,
        smtp_tls_ca_file=None,
        smtpd_tls=None,
        mynetworks=None,
        mailbox_owner="nobody",
        fast_retry=True,
        main_cf=None,
    ):
        Postfix._instances += 1
        self.directory = Path(directory).resolve()
        self.host = host
        self.port = port
        self.name = name or f"{os.getpid()}-{Postfix._instances}"
        self.myhostname = myhostname
        self.virtual_domains = [d.lower() for d in virtual_domains]
        self.mailboxes = [m.lower() for m in mailboxes]
        self.catch_all = catch_all.lower() if catch_all else None
        self.relayhost = relayhost
        self.smtp_tls_security_level = smtp_tls_security_level
        self.smtp_tls_ca_file = smtp_tls_ca_file
        self.smtpd_tls = smtpd_tls
        self.mynetworks = mynetworks
        self.mailbox_owner = mailbox_owner
        self.fast_retry = fast_retry
        self.extra_main_cf = dict(main_cf or {})
        # Postfix daemons that no longer run as root open files by absolute path: the master's
        # lock in data_directory (as mail_owner), lookup tables (when first used), the Maildirs
        # (as `mailbox_owner`). pytest's temporary directories are private to root, so while the
        # instance runs its files live in a directory of its own under the system temporary
        # directory (mode 0711), with `directory` a symbolic link to it; when it stops they are
        # moved into `directory`, where pytest keeps them.
        self.root = self.directory
        self.certificate = None
        self.started = False
        self._master_pid = None

    @property
    def config_dir(self):
        return self.root / "etc"

    @property
    def queue_dir(self):
        return self.root / "spool"

    @property
    def data_dir(self):
        return self.root / "data"

    @property
    def log_file(self):
        return self.root / "maillog"

    @property
    def maildir_root(self):
        """The virtual Maildirs: <maildir_root>/<domain>/<local part>/{new,cur,tmp}."""
        return self.root / "maildir"

    # -- configuration

    def _main_cf(self):
        relaying = self.relayhost is not None
        params = {
            "compatibility_level": "3.6",
            "queue_directory": str(self.queue_dir),
            "data_directory": str(self.data_dir),
            "mail_owner": "postfix",
            "setgid_group": "postdrop",
            "syslog_name": f"postfix-{self.name}",
            "maillog_file": str(self.log_file),
            "maillog_file_prefixes": str(self.root),
            "myhostname": self.myhostname,
            "mydomain": self.myhostname.split(".", 1)[-1],
            "myorigin": "$myhostname",
            "mydestination": "",
            "relay_domains": "",
            "local_recipient_maps": "",
            "alias_maps": "",
            "alias_database": "",
            "biff": "no",
            "append_dot_mydomain": "no",
            # The explicit address in master.cf is where smtpd listens; this is only what
            # Postfix takes as its own addresses (loop detection applies to port 25 alone).
            "inet_interfaces": "loopback-only",
            "inet_protocols": "all" if ":" in self.host else "ipv4",
            "mynetworks": self.mynetworks if self.mynetworks is not None else ("127.0.0.0/8" if relaying else ""),
            "smtpd_relay_restrictions": "permit_mynetworks, reject_unauth_destination",
            "smtpd_banner": "$myhostname ESMTP Postfix",
            # No DNS: the client's name is not looked up; next hops are IP literals.
            "smtpd_peername_lookup": "no",
            "smtp_dns_support_level": "disabled",
            "smtp_host_lookup": "native",
            # The message is passed on as received: no header address rewriting.
            "local_header_rewrite_clients": "",
            "remote_header_rewrite_domain": "",
            "smtp_tls_loglevel": "1",
            "smtpd_tls_loglevel": "1",
        }
        if self.fast_retry:
            params.update(
                {
                    "queue_run_delay": "1s",
                    "minimal_backoff_time": "1s",
                    "maximal_backoff_time": "5s",
                    "smtp_connect_timeout": "10s",
                }
            )
        if relaying:
            host, port = self.relayhost
            params["relayhost"] = f"[{host}]:{port}"
        if self.smtp_tls_security_level:
            params["smtp_tls_security_level"] = self.smtp_tls_security_level
        if self.smtp_tls_ca_file:
            params["smtp_tls_CAfile"] = str(self.smtp_tls_ca_file)
        if self.virtual_domains:
            owner = pwd.getpwnam(self.mailbox_owner)
            params.update(
                {
                    "virtual_mailbox_domains": ", ".join(self.virtual_domains),
                    "virtual_mailbox_base": str(self.maildir_root),
                    "virtual_mailbox_maps": f"texthash:{self.config_dir / 'virtual_mailboxes'}",
                    "virtual_uid_maps": f"static:{owner.pw_uid}",
                    "virtual_gid_maps": f"static:{owner.pw_gid}",
                    "virtual_minimum_uid": str(min(owner.pw_uid, 100)),
                }
            )
        if self.certificate is not None:
            params.update(
                {
                    "smtpd_tls_security_level": "may",
                    "smtpd_tls_cert_file": str(self.certificate.cert_file),
                    "smtpd_tls_key_file": str(self.certificate.key_file),
                    "smtpd_tls_received_header": "yes",
                }
            )
        params.update(self.extra_main_cf)
        return "".join(f"{key} = {value}\n" for key, value in params.items())

    def _master_cf(self):
        listen = f"[{self.host}]:{self.port}" if ":" in self.host else f"{self.host}:{self.port}"
        return f"{listen} inet n - n - - smtpd\n" + MASTER_SERVICES

    def _virtual_mailboxes(self):
        # The virtual delivery agent refuses paths built by regular expression substitution,
        # so each mailbox is listed: <local part>@<domain> -> <domain>/<local part>/ (a
        # trailing slash means Maildir). Other local parts go to the catch-all mailbox, or are
        # refused (550 5.1.1) without one.
        lines = []
        for domain in self.virtual_domains:
            for mailbox in self.mailboxes:
                lines.append(f"{mailbox}@{domain} {domain}/{mailbox}/\n")
            if self.catch_all:
                lines.append(f"@{domain} {domain}/{self.catch_all}/\n")
        return "".join(lines)

    def _prepare(self):
        if self.directory.exists() or self.directory.is_symlink():
            raise PostfixError(f"{self.directory} exists already")
        self.directory.parent.mkdir(parents=True, exist_ok=True)
        self.root = Path(tempfile.mkdtemp(prefix=f"postfix-{self.name}-"))
        self.root.chmod(0o711)
        self.directory.symlink_to(self.root, target_is_directory=True)
        self.config_dir.mkdir()
        self.queue_dir.mkdir()
        # data_directory is created by "postfix start" (post-install create-missing).
        if self.virtual_domains:
            owner = pwd.getpwnam(self.mailbox_owner)
            self.maildir_root.mkdir()
            os.chown(self.maildir_root, owner.pw_uid, owner.pw_gid)
            (self.config_dir / "virtual_mailboxes").write_text(self._virtual_mailboxes())
        tls = self.smtpd_tls
        if isinstance(tls, CertFiles):
            self.certificate = tls
        elif isinstance(tls, CertAuthority):
            self.certificate = tls.issue(self.myhostname)
        elif tls:
            self.certificate = self_signed(self.root / "tls", self.myhostname)
        (self.config_dir / "main.cf").write_text(self._main_cf())
        (self.config_dir / "master.cf").write_text(self._master_cf())

    # -- commands

    def command(self, *args, timeout=60, check=True):
        """Runs `postfix -c DIR ARGS...`; returns its output."""
        code, output = run_with_tty([str(POSTFIX), "-c", str(self.config_dir), *args], timeout=timeout)
        if check and code != 0:
            raise PostfixError(f"postfix {' '.join(args)} exited {code}:\n{output}\n--- maillog:\n{self.log()[-4000:]}")
        return output

    def postconf(self, *args):
        return subprocess.run(
            ["/usr/sbin/postconf", "-c", str(self.config_dir), *args],
            capture_output=True,
            text=True,
            check=True,
            timeout=30,
        ).stdout

    def start(self, timeout=30, attempts=5):
        """Writes the configuration and starts the instance.

        Without a fixed port, a free one is chosen (and another one tried should it be taken
        before Postfix binds it)."""
        reason = unavailable_reason()
        if reason:
            raise PostfixError(reason)
        fixed_port = self.port is not None
        self._prepare()
        for attempt in range(attempts):
            if not fixed_port:
                self.port = free_port([self.host])
            (self.config_dir / "master.cf").write_text(self._master_cf())
            code, output = run_with_tty([str(POSTFIX), "-c", str(self.config_dir), "start"], timeout=timeout)
            if code == 0:
                break
            in_use = "Address already in use" in self.log()
            if fixed_port or not in_use or attempt == attempts - 1:
                raise PostfixError(f"postfix start exited {code}:\n{output}\n--- maillog:\n{self.log()[-4000:]}")
        # "postfix start" runs "master -w", which returns only once the master daemon has
        # initialised, listening sockets included.
        self.started = True
        self._master_pid = self._read_master_pid()
        return self

    def _read_master_pid(self):
        try:
            return int((self.queue_dir / "pid" / "master.pid").read_text().split()[0])
        except (OSError, ValueError, IndexError):
            return None

    def stop(self, timeout=30):
        """Stops the instance (`postfix stop`, which waits for the master to exit; the master's
        process group is killed should it still run), then moves its files into `directory`."""
        try:
            pid = self._read_master_pid() or self._master_pid
            if self.started or (pid and _alive(pid)):
                try:
                    self.command("stop", timeout=timeout, check=False)
                finally:
                    if pid and _alive(pid):
                        deadline = time.monotonic() + 10
                        while _alive(pid) and time.monotonic() < deadline:
                            time.sleep(0.05)
                        if _alive(pid):
                            os.killpg(pid, signal.SIGKILL)
                    self.started = False
        finally:
            self._bring_home()

    def _bring_home(self):
        """Moves the instance's files from the system temporary directory into `directory`."""
        if self.root == self.directory or not self.root.exists():
            return
        if self.directory.is_symlink():
            self.directory.unlink()
        try:
            os.rename(self.root, self.directory)
        except OSError:  # another file system: copy what can be copied (no sockets or FIFOs)
            shutil.copytree(self.root, self.directory, symlinks=True, copy_function=_copy_regular_file)
            shutil.rmtree(self.root, ignore_errors=True)
        self.root = self.directory

    def flush(self):
        """Asks the queue manager to retry deferred mail now (`postqueue -f`)."""
        code, output = run_with_tty([str(POSTQUEUE), "-c", str(self.config_dir), "-f"], timeout=30)
        if code != 0:
            raise PostfixError(f"postqueue -f exited {code}: {output}")

    def queue(self):
        """The queue listing (`postqueue -p`)."""
        return run_with_tty([str(POSTQUEUE), "-c", str(self.config_dir), "-p"], timeout=30)[1]

    # -- observations

    def log(self):
        try:
            return self.log_file.read_text(errors="replace")
        except FileNotFoundError:
            return ""

    def wait_for_log(self, pattern, timeout=30):
        """Waits until the log matches the regular expression `pattern`; returns the match."""
        regex = re.compile(pattern)
        deadline = time.monotonic() + timeout
        while True:
            match = regex.search(self.log())
            if match:
                return match
            if time.monotonic() > deadline:
                raise AssertionError(f"Postfix log has no match for {pattern!r}:\n{self.log()[-6000:]}")
            time.sleep(0.05)

    def maildir(self, user, domain=None):
        """The Maildir of `user`@`domain` (the first virtual domain by default)."""
        return self.maildir_root / (domain or self.virtual_domains[0]) / user.lower()

    def maildir_files(self, user=None, domain=None):
        """Paths of the delivered messages (new/), of one mailbox or of all, oldest first."""
        if self.maildir_root is None or not self.maildir_root.exists():
            return []
        if user is None:
            files = list(self.maildir_root.glob("*/*/new/*"))
        else:
            new = self.maildir(user, domain) / "new"
            files = list(new.iterdir()) if new.is_dir() else []
        return sorted(files, key=lambda p: (p.stat().st_mtime, p.name))

    def messages(self, user=None, domain=None):
        return [p.read_bytes() for p in self.maildir_files(user, domain)]

    def wait_for_maildir(self, count, timeout=30, user=None, domain=None):
        """Waits until at least `count` messages were delivered (to one mailbox, or to all);
        returns their contents (Postfix stores them with LF line endings)."""
        deadline = time.monotonic() + timeout
        while True:
            files = self.maildir_files(user, domain)
            if len(files) >= count:
                return [p.read_bytes() for p in files]
            if time.monotonic() > deadline:
                raise AssertionError(
                    f"expected {count} messages in the Maildir, found {len(files)}\n"
                    f"--- queue:\n{self.queue()}\n--- maillog:\n{self.log()[-6000:]}"
                )
            time.sleep(0.05)

    def describe(self):
        return f"Postfix {self.name} on {self.host}:{self.port} in {self.directory}\n--- maillog:\n{self.log()[-8000:]}"


def _copy_regular_file(source, target):
    if os.path.isfile(source) and not os.path.islink(source):
        shutil.copy2(source, target)


def _alive(pid):
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    # A zombie no longer runs.
    try:
        return Path(f"/proc/{pid}/stat").read_text().split(") ", 1)[1][0] != "Z"
    except (OSError, IndexError):
        return False
