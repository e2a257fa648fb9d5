"""Postfix as a peer of the relay in end-to-end tests: an instance of its own (configuration,
queue, data and log in a temporary directory), its smtpd on a loopback port, started with
C{postfix -c DIR start} and stopped with C{postfix -c DIR stop} in teardown.

It accepts mail for C{postfix.test} into maildirs (the C{virtual} delivery agent, as
C{nobody}), and sends everything else, its own delivery status notifications included, to
C{relayhost} (the relay under test).  Extra C{main.cf} settings are C{postconf -e} items,
such as C{smtpd_discard_ehlo_keywords=8bitmime} for a next hop without 8BITMIME.  See
/work/shared/notes/postfix-peer.md for the facts this relies on (Debian 12, Postfix 3.7).
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import tempfile
import time
from pathlib import Path
from typing import Any

import pytest

from tests.harness import freePort, requireTool

#: The domain whose mail the peer delivers itself.
DOMAIN = "postfix.test"
#: Its host name (Reporting-MTA of its notifications, its EHLO name).
HOSTNAME = "postfix.peer.test"
NOBODY = 65534


class PostfixPeer:
    """One Postfix instance; C{port} is its smtpd's.

    @ivar directory: where everything lives (readable by Postfix's users; removed at cleanup).
    """

    def __init__(self, relayhost: str | None = None, mailboxes: tuple[str, ...] = ("bob",),
                 settings: tuple[str, ...] = ()) -> None:
        self.postfix = requireTool("postfix")
        if os.geteuid() != 0:  # pragma: no cover - CI and these machines run as root
            pytest.skip("a Postfix instance of its own needs root")
        self.directory = Path(tempfile.mkdtemp(prefix="mailrelay-postfix-"))
        self.directory.chmod(0o755)  # Postfix's users must reach their directories
        self.conf = self.directory / "conf"
        self.vmail = self.directory / "vmail"
        self.logPath = self.directory / "postfix.log"
        data = self.directory / "data"
        for d in (self.conf, self.directory / "queue", data, self.vmail):
            d.mkdir()
        shutil.chown(data, "postfix")
        os.chown(self.vmail, NOBODY, NOBODY)
        shutil.copy("/etc/postfix/main.cf.proto", self.conf / "main.cf")
        self.port = freePort()
        master = Path("/etc/postfix/master.cf").read_text()
        master = re.sub(r"^smtp(\s+inet\s)", rf"127.0.0.1:{self.port}\1", master, count=1,
                        flags=re.MULTILINE)
        (self.conf / "master.cf").write_text(master)
        maps = ", ".join(f"{m}@{DOMAIN}={m}/" for m in mailboxes)
        self.postconf(
            "setgid_group=postdrop", "mail_owner=postfix",
            f"queue_directory={self.directory / 'queue'}", f"data_directory={data}",
            "meta_directory=/etc/postfix", "manpage_directory=/usr/share/man",
            "sample_directory=/usr/share/doc/postfix/examples", "readme_directory=no",
            "html_directory=no", "sendmail_path=/usr/sbin/sendmail",
            "newaliases_path=/usr/bin/newaliases", "mailq_path=/usr/bin/mailq", "alias_maps=",
            "alias_database=", f"maillog_file={self.logPath}",
            f"maillog_file_prefixes={self.directory}", "compatibility_level=3.6",
            "inet_interfaces=127.0.0.1", "inet_protocols=ipv4", "mynetworks=127.0.0.0/8",
            "mydestination=", f"myhostname={HOSTNAME}",
            "smtpd_relay_restrictions=permit_mynetworks,reject_unauth_destination",
            f"virtual_mailbox_domains={DOMAIN}", f"virtual_mailbox_base={self.vmail}",
            f"virtual_mailbox_maps=inline:{{{maps}}}", f"virtual_uid_maps=static:{NOBODY}",
            f"virtual_gid_maps=static:{NOBODY}",
            f"relayhost={relayhost or ''}", "smtp_dns_support_level=disabled",
            "queue_run_delay=1s", "minimal_backoff_time=1s", "maximal_backoff_time=2s",
            *settings,
        )
        subprocess.run(["postconf", "-c", str(self.conf), "-F", "*/*/chroot = n"], check=True,
                       capture_output=True)
        self.started = False

    def postconf(self, *settings: str) -> None:
        subprocess.run(["postconf", "-c", str(self.conf), "-e", *settings], check=True,
                       capture_output=True)

    def start(self) -> PostfixPeer:
        done = subprocess.run([self.postfix, "-c", str(self.conf), "start"], capture_output=True,
                              stdin=subprocess.DEVNULL, timeout=60)
        if done.returncode != 0:
            raise AssertionError(f"postfix did not start ({done.returncode}):\n{self.log()}")
        self.started = True
        deadline = time.monotonic() + 15
        while "daemon started" not in self.log():
            if time.monotonic() > deadline:
                raise AssertionError(f"postfix's master did not start:\n{self.log()}")
            time.sleep(0.05)
        return self

    def log(self) -> str:
        return self.logPath.read_text(errors="replace") if self.logPath.exists() else ""

    def waitForLog(self, pattern: str, timeout: float = 20.0) -> re.Match[str]:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            m = re.search(pattern, self.log())
            if m:
                return m
            time.sleep(0.1)
        raise AssertionError(f"{pattern!r} not in Postfix's log in {timeout}s:\n{self.log()}")

    def mailbox(self, local: str) -> list[bytes]:
        """The messages delivered to C{local@postfix.test}, oldest first."""
        new = self.vmail / local / "new"
        if not new.exists():
            return []
        return [p.read_bytes() for p in sorted(new.iterdir(), key=lambda p: p.stat().st_mtime)]

    def waitMailbox(self, local: str, count: int = 1, timeout: float = 20.0) -> list[bytes]:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            found = self.mailbox(local)
            if len(found) >= count:
                return found
            time.sleep(0.1)
        raise AssertionError(f"{count} message(s) for {local}@{DOMAIN} not delivered in "
                             f"{timeout}s:\n{self.log()}")

    def queueEmpty(self) -> bool:
        out = subprocess.run(
            [shutil.which("postqueue") or "/usr/sbin/postqueue", "-c", str(self.conf), "-p"],
            capture_output=True, text=True, timeout=30,
        )
        return "Mail queue is empty" in out.stdout

    def waitForEmptyQueue(self, timeout: float = 30.0) -> None:
        deadline = time.monotonic() + timeout
        while not self.queueEmpty():
            if time.monotonic() > deadline:
                raise AssertionError(f"Postfix's queue not empty after {timeout}s:\n{self.log()}")
            time.sleep(0.2)

    def stop(self) -> None:
        if self.started:
            self.started = False
            pidFile = self.directory / "queue" / "pid" / "master.pid"
            try:
                pid = int(pidFile.read_text().split()[0])
            except (OSError, ValueError, IndexError):
                pid = None
            subprocess.run([self.postfix, "-c", str(self.conf), "stop"], capture_output=True,
                           stdin=subprocess.DEVNULL, timeout=60)
            deadline = time.monotonic() + 15
            while pid is not None and time.monotonic() < deadline:
                try:
                    os.kill(pid, 0)
                except ProcessLookupError:
                    break
                time.sleep(0.05)

    def cleanup(self) -> None:
        self.stop()
        shutil.rmtree(self.directory, ignore_errors=True)


@pytest.fixture
def postfix():
    """C{postfix(*settings, start=True, **kw)}: a L{PostfixPeer} with these C{main.cf}
    settings (started unless told not to), cleaned up in teardown."""
    peers: list[PostfixPeer] = []

    def make(*settings: str, start: bool = True, **kw: Any) -> PostfixPeer:
        peer = PostfixPeer(settings=settings, **kw)
        peers.append(peer)
        return peer.start() if start else peer

    yield make
    for peer in peers:
        peer.cleanup()
