"""A real Postfix (3.7 on Debian) as a peer of the relay under test: its own instance, in a
directory of its own, started with C{postfix -c DIR start} and stopped in teardown (C{abort}).

The instance listens (smtpd) on a free loopback port and relays everything it accepts from
loopback to C{relayhost}; it never touches the system's Postfix (nor reads
C{/etc/postfix}).  Its log is a file (C{maillog_file}), read by L{log}.  See
/work/shared/notes/postfix-peer.md for the facts this rests on.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import tempfile
import time
from pathlib import Path

from tests.harness import freePort, requireTool

#: The services of the instance's master.cf: no chroot (the queue directory is a temporary
#: one), no local delivery but what bounces need.
_MASTER_CF = """\
{port}      inet  n       -       n       -       -       smtpd
pickup    unix  n       -       n       60      1       pickup
cleanup   unix  n       -       n       -       0       cleanup
qmgr      unix  n       -       n       300     1       qmgr
rewrite   unix  -       -       n       -       -       trivial-rewrite
bounce    unix  -       -       n       -       0       bounce
defer     unix  -       -       n       -       0       bounce
trace     unix  -       -       n       -       0       bounce
verify    unix  -       -       n       -       1       verify
flush     unix  n       -       n       1000?   0       flush
proxymap  unix  -       -       n       -       -       proxymap
smtp      unix  -       -       n       -       -       smtp
relay     unix  -       -       n       -       -       smtp
showq     unix  n       -       n       -       -       showq
error     unix  -       -       n       -       -       error
retry     unix  -       -       n       -       -       error
discard   unix  -       -       n       -       -       discard
local     unix  -       n       n       -       -       local
anvil     unix  -       -       n       -       1       anvil
scache    unix  -       -       n       -       1       scache
postlog   unix-dgram n  -       n       -       1       postlogd
"""


class PostfixPeer:
    """One Postfix instance relaying what it receives to C{relayhost}.

    @ivar port: the port its smtpd listens on (127.0.0.1).
    @ivar directory: where its configuration, queue and log live (world-traversable: the
        Postfix daemons run as the C{postfix} user).
    """

    def __init__(self, relayhost: str, settings: dict[str, str] | None = None) -> None:
        """
        @param relayhost: where it relays to, e.g. C{"[127.0.0.1]:2525"}.
        @param settings: more C{main.cf} parameters.
        """
        self.postfix = requireTool("postfix")
        self.directory = Path(tempfile.mkdtemp(prefix="mailrelay-postfix-"))
        os.chmod(self.directory, 0o755)
        self.config = self.directory / "conf"
        self.config.mkdir()
        (self.directory / "data").mkdir()
        (self.directory / "queue").mkdir()
        shutil.chown(self.directory / "data", "postfix")
        self.logPath = self.directory / "postfix.log"
        self.port = freePort()
        (self.config / "main.cf").write_text("")  # the compiled-in (Debian) defaults, then:
        (self.config / "master.cf").write_text(_MASTER_CF.format(port=self.port))
        parameters = {
            "compatibility_level": "3.6",
            "queue_directory": str(self.directory / "queue"),
            "data_directory": str(self.directory / "data"),
            "maillog_file": str(self.logPath),
            "maillog_file_prefixes": str(self.directory),
            "inet_interfaces": "127.0.0.1",
            "inet_protocols": "ipv4",
            "mynetworks": "127.0.0.0/8",
            "mydestination": "",
            "myhostname": "postfix.test",
            "relayhost": relayhost,
            "smtpd_relay_restrictions": "permit_mynetworks,reject_unauth_destination",
            "smtp_dns_support_level": "disabled",
            "smtp_host_lookup": "native",
            # The conversation with the relay in the log ("> [127.0.0.1]:PORT: DATA").
            "debug_peer_list": "127.0.0.1",
            **(settings or {}),
        }
        subprocess.run(
            [shutil.which("postconf") or "/usr/sbin/postconf", "-c", str(self.config), "-e",
             *(f"{k}={v}" for k, v in parameters.items())],
            check=True, capture_output=True, timeout=30,
        )

    def start(self, timeout: float = 30.0) -> PostfixPeer:
        out = subprocess.run([self.postfix, "-c", str(self.config), "start"],
                             capture_output=True, text=True, timeout=timeout)
        if out.returncode != 0:
            raise AssertionError(f"postfix start failed: {out.stdout}{out.stderr}\n{self.log()}")
        self.waitForLog(r"daemon started", timeout)
        return self

    def stop(self) -> None:
        subprocess.run([self.postfix, "-c", str(self.config), "abort"],
                       capture_output=True, timeout=30)
        pid = self.directory / "queue" / "pid" / "master.pid"
        deadline = time.monotonic() + 10
        while pid.exists() and time.monotonic() < deadline:
            try:
                os.kill(int(pid.read_text().split()[0]), 0)
            except (OSError, ValueError):
                break
            time.sleep(0.1)
        shutil.rmtree(self.directory, ignore_errors=True)

    def log(self) -> str:
        return self.logPath.read_text(errors="replace") if self.logPath.exists() else ""

    def waitForLog(self, pattern: str, timeout: float = 30.0) -> re.Match[str]:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            m = re.search(pattern, self.log())
            if m:
                return m
            time.sleep(0.1)
        raise AssertionError(f"{pattern!r} not in the Postfix log in {timeout}s:\n{self.log()}")

    def queueEmpty(self) -> bool:
        out = subprocess.run(
            [shutil.which("postqueue") or "/usr/sbin/postqueue", "-c", str(self.config), "-p"],
            capture_output=True, text=True, timeout=30,
        )
        return "Mail queue is empty" in out.stdout

    def waitForEmptyQueue(self, timeout: float = 30.0) -> None:
        deadline = time.monotonic() + timeout
        while not self.queueEmpty():
            if time.monotonic() > deadline:
                raise AssertionError(f"Postfix's queue not empty after {timeout}s:\n{self.log()}")
            time.sleep(0.2)
