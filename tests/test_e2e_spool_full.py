"""End-to-end: the real relay's spool failing under it -- on a small file system of its
own (a tmpfs mounted for the test, as root) that fills up, then is freed; or changed by
hand: what clients are told, what the log says, and that nothing accepted is lost or
delivered twice once the spool is usable again, with no restart.

Mounting needs root: those tests skip, saying so, when not run as root (CI runs them as
root).  Every file system mounted is unmounted in teardown.
"""

from __future__ import annotations

import errno
import json
import os
import shutil
import signal
import smtplib
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.harness import RelayProcess
from tests.test_e2e_operating import (  # noqa: F401 - fixtures
    nobodyDirectory,
    nobodyRuntime,
    privilegedPort,
    startAs,
    waitListening,
)
from tests.test_e2e_outbound import (  # noqa: F401 - fixtures
    config,
    dns,
    nexthop,
    relay,
    smtpRoute,
)

MAILRELAY = str(Path(sys.executable).with_name("mailrelay"))


@pytest.fixture
def smallDisk(tmp_path: Path) -> Iterator[Callable[..., Path]]:
    """C{smallDisk(size="4m", inodes=None)}: a directory with a tmpfs of C{size} (and of
    C{inodes} inodes) mounted on it."""
    if os.geteuid() != 0:
        if os.environ.get("CI") == "true":
            pytest.fail("CI runs as root: the spool's small file system must be mounted")
        pytest.skip("needs root, to mount a small file system (tmpfs) for the spool")
    mounted: list[Path] = []

    def mount(size: str = "4m", inodes: int | None = None) -> Path:
        where = tmp_path / f"disk{len(mounted)}"
        where.mkdir()
        options = f"size={size},mode=0755" + (f",nr_inodes={inodes}" if inodes else "")
        subprocess.run(["mount", "-t", "tmpfs", "-o", options, "tmpfs", str(where)],
                       check=True, capture_output=True)
        mounted.append(where)
        return where

    yield mount
    for where in reversed(mounted):
        # Lazily: a relay that failed to stop may still hold it (its own teardown kills it).
        subprocess.run(["umount", "-l", str(where)], check=False, capture_output=True)


def fill(disk: Path) -> Path:
    """Write a file on C{disk} until its file system is full (ENOSPC); its path."""
    path = disk / "filler"
    chunk = b"\0" * 65536
    with open(path, "ab", buffering=0) as f:
        for _ in range(1 << 16):  # (bounded: 4 GiB)
            try:
                f.write(chunk)
            except OSError as e:
                assert e.errno == errno.ENOSPC, e
                return path
    raise AssertionError(f"{disk} never filled up")


def useUpInodes(disk: Path) -> list[Path]:
    """Make empty files on C{disk} until its file system has no inode left; their paths."""
    made: list[Path] = []
    for n in range(100000):
        path = disk / f"inode{n}"
        try:
            path.touch()
        except OSError as e:
            assert e.errno == errno.ENOSPC, e
            return made
        made.append(path)
    raise AssertionError(f"{disk} never ran out of inodes")


def isNotification(received: Any) -> bool:
    """Whether the next hop's C{received} is from the null sender (aiosmtpd says C{<>})."""
    return received.mailFrom in ("", "<>")


def flush(spool: Path) -> str:
    p = subprocess.run([MAILRELAY, "--spool", str(spool), "queue", "flush"],
                       capture_output=True, text=True, timeout=60)
    assert p.returncode == 0, (p.stdout, p.stderr)
    return p.stdout


def test_a_success_notification_the_full_spool_refuses_is_sent_once_space_is_back(
    smallDisk: Any, relay: Any, nexthop: Any, dns: Any  # noqa: F811 - fixtures
) -> None:
    """NOTIFY=SUCCESS, and the spool's disk fills up while the next hop takes the message:
    the notification cannot be queued.  It is owed, not lost: once space is freed (and the
    queue flushed), the sender gets it, once, and the message is not delivered again."""
    disk = smallDisk()
    spool = disk / "spool"
    hop, port = nexthop()

    def reply(received: Any, n: int) -> str:
        if not isNotification(received):
            fill(disk)
        return "250 2.0.0 OK"

    hop.dataReply = reply
    routes = [smtpRoute("example.org", port), smtpRoute("client.test", port)]
    r: RelayProcess = relay(config(dns, routes=routes) + "[spool]\nmin_free_space = 0\n",
                            "--spool", str(spool))
    with smtplib.SMTP("127.0.0.1", r.port, timeout=15) as s:
        s.ehlo("client.test")
        assert s.mail("a@client.test")[0] == 250
        assert s.rcpt("b@example.org", ["NOTIFY=SUCCESS"])[0] == 250
        code, text = s.data(b"Subject: owed\r\n\r\nHello.\r\n")
    assert code == 250, text
    queueID = text.decode().rsplit(" ", 1)[1]
    r.waitForLog(rf"{queueID}: delivery status notification to <a@client.test> not queued; "
                 r"owed for <b@example.org>, queued at the next attempt \(the message is not "
                 r"delivered again\)")
    assert (spool / "queue" / f"{queueID}.eml").exists()
    (disk / "filler").unlink()
    flush(spool)
    [dsn] = [m for m in hop.waitFor(lambda acc: any(map(isNotification, acc)),
                                    what="the success notification") if isNotification(m)]
    assert dsn.rcptTos == ["a@client.test"] and b"Action: relayed" in dsn.content
    r.waitForLog(rf"{queueID}: removed")
    assert len(hop.to("b@example.org")) == 1 and len(hop.attempts) == 2
    assert list((spool / "queue").iterdir()) == []


def test_spool_directories_removed_by_hand_are_created_again(
    relay: Any, nexthop: Any, dns: Any  # noqa: F811 - fixtures
) -> None:
    """An operator's C{rm -rf} of the spool's C{tmp/} and C{queue/} while the relay runs:
    the next message (held in memory, or spilled to its file while it arrives) makes them
    again, is accepted and delivered, and the log says so -- not 451 for every message
    until a restart (Postfix's mail_queue_enter() makes a missing queue directory)."""
    hop, port = nexthop()
    r: RelayProcess = relay(config(dns, routes=[smtpRoute("example.org", port)]))
    r.waitForLog("queue manager started")  # (the delivery process makes them at its start)
    for name in ("tmp", "queue"):
        shutil.rmtree(r.spool / name)
    sent = {"small": b"Hello.\r\n", "big": (b"x" * 70 + b"\r\n") * 5000}
    for subject, body in sent.items():
        with smtplib.SMTP("127.0.0.1", r.port, timeout=15) as s:
            s.ehlo("client.test")
            refused = s.sendmail("a@client.test", ["b@example.org"],
                                 b"Subject: " + subject.encode() + b"\r\n\r\n" + body)
        assert refused == {}, refused
    received = hop.waitTo("b@example.org", count=2)
    assert sorted(m.content.rsplit(b"\r\n\r\n", 1)[1] for m in received) == sorted(sent.values())
    log = r.log()
    for name in ("tmp", "queue"):
        assert f"spool: directory {r.spool / name} was missing (removed by hand?); created " \
            "again" in log
    assert "451" not in log


def test_a_relay_started_with_no_inode_left_makes_its_control_socket_later(
    smallDisk: Any, relay: Any, dns: Any  # noqa: F811 - fixtures
) -> None:
    """The spool's file system has no inode left when the relay starts (filled by another
    process after the relay's last stop removed its control socket): the relay starts all
    the same, as its spool does on a full disk so that the queue is delivered, and makes its
    control socket once an inode is free, with no restart.  It refused to start."""
    disk = smallDisk(inodes=64)
    spool = disk / "spool"
    r: RelayProcess = relay(config(dns) + "[spool]\nmin_free_space = 0\n", "--spool", str(spool))
    r.waitForLog("queue manager started")  # (its signal handlers in place: a clean stop)
    r.stop()
    assert not (spool / "control.sock").exists()
    fillers = useUpInodes(disk)
    r.start()
    r.waitForLog(rf"cannot listen on the control socket {spool}/control.sock: \[Errno 28\] No "
                 r"space left on device; the relay runs without it \(the mailrelay command "
                 r"cannot reach it\) and tries again every 10 seconds")
    with smtplib.SMTP("127.0.0.1", r.port, timeout=15) as s:  # (it answers, refusing for now)
        assert s.ehlo("client.test")[0] == 250
    fillers[-1].unlink()
    r.waitForLog(rf"control socket {spool}/control.sock\n", timeout=20)
    p = subprocess.run([MAILRELAY, "--spool", str(spool), "status"], capture_output=True,
                       text=True, timeout=60)
    assert p.returncode == 0, (p.stdout, p.stderr)


def test_a_queue_manager_with_no_inode_for_its_lock_starts_once_there_is(
    smallDisk: Any, relay: Any, nexthop: Any, dns: Any  # noqa: F811 - fixtures
) -> None:
    """A spool first used with [queue] hold = true (no queue manager, so no qmgr.lock yet)
    whose file system then has no inode left: the queue manager cannot make its lock file.
    It waits, saying why, and delivers the queue once an inode is free, with no restart; it
    gave up at once, and the relay ran on delivering nothing."""
    disk = smallDisk(inodes=64)
    spool = disk / "spool"
    hop, port = nexthop()
    r: RelayProcess = relay(config(dns, hold=True) + "[spool]\nmin_free_space = 0\n",
                            "--spool", str(spool))
    with smtplib.SMTP("127.0.0.1", r.port, timeout=15) as s:
        assert s.sendmail("a@client.test", ["b@example.org"], b"Subject: held\r\n\r\nHi\r\n") == {}
    r.waitForLog("queued as")
    r.stop()
    assert not (spool / "qmgr.lock").exists()
    fillers = useUpInodes(disk)
    r.configText = config(dns, routes=[smtpRoute("example.org", port)])
    r.start()
    r.waitForLog(rf"cannot take the queue lock {spool}/qmgr.lock: No space left on device; the "
                 r"queue manager waits, trying again every 5 seconds")
    assert hop.to("b@example.org") == []
    for path in fillers[-2:]:  # (one for the lock, one for the control socket)
        path.unlink()
    [delivered] = hop.waitTo("b@example.org", timeout=20)
    assert b"Subject: held" in delivered.content
    r.waitForLog("removed")


def test_an_envelope_made_unreadable_by_hand_is_tried_again_soon(
    nobodyRuntime: Any, nexthop: Any  # noqa: F811 - fixtures
) -> None:
    """The relay runs as nobody and an operator, as root, leaves a queued envelope unreadable
    for it (chmod, an editor's copy): its attempt cannot load it, and says it tries again
    after the shortest backoff (300 s, when Postfix's qmgr would look again), not the
    longest (4000 s: an hour more after the operator mended it)."""
    python, top = nobodyRuntime
    directory = nobodyDirectory(top)
    hop, hopPort = nexthop()
    hop.dataReply = lambda received, n: "451 4.3.0 try again later"
    config = directory / "mailrelay.toml"
    config.write_text("[dns]\nreverse_lookups = false\n[[routes]]\ndomain = \"example.org\"\n"
                      f"backend = \"smtp\"\nnexthop = \"[127.0.0.1]:{hopPort}\"\n")
    port = privilegedPort()
    spool = directory / "spool"
    process = startAs(python, directory, "--config", str(config), "--listen",
                      f"tcp:{port}:interface=127.0.0.1", "--spool", str(spool))
    log = directory / "relay.log"
    try:
        waitListening(port)
        with smtplib.SMTP("127.0.0.1", port, timeout=15) as s:
            assert s.sendmail("a@client.test", ["b@example.org"], b"Subject: x\r\n\r\nHi\r\n") == {}
        [envelope] = (spool / "queue").glob("*.json")
        queueID = envelope.stem
        waitFor(lambda: json.loads(envelope.read_bytes())["attempts"] == 1,
                "the first attempt deferred and recorded", log)
        envelope.chmod(0)
        flush(spool)
        waitFor(lambda: f"{queueID}: cannot load envelope: reading envelope {envelope} failed: "
                "Permission denied (EACCES); retrying in 300s" in log.read_text(),
                "the load failure", log)
    finally:
        process.send_signal(signal.SIGTERM)
        process.wait(30)


def waitFor(predicate: Callable[[], bool], what: str, log: Path, timeout: float = 15.0) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"{what}: not seen in {timeout}s:\n{log.read_text()}")
        time.sleep(0.05)


class PausingHop:
    """A next hop that answers DATA with 354, then reads nothing until told (L{resume}), so
    that the relay is in the middle of the body; it then reads to the end of data or of the
    connection.  C{ended}: whether the body came with its terminating dot."""

    def __init__(self) -> None:
        self.sock = socket.socket()
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 65536)  # (the relay stalls)
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(1)
        self.port = self.sock.getsockname()[1]
        self.inData = threading.Event()
        self.resumed = threading.Event()
        self.done = threading.Event()
        self.ended: bool | None = None
        threading.Thread(target=self._talk, daemon=True).start()

    def _talk(self) -> None:
        conn, _ = self.sock.accept()
        with conn, conn.makefile("rb") as lines:
            conn.sendall(b"220 pausing.test ESMTP\r\n")
            for line in lines:
                verb = line[:4].upper()
                if verb == b"DATA":
                    conn.sendall(b"354 go on\r\n")
                    self.inData.set()
                    self.resumed.wait(30)
                    conn.settimeout(30)
                    try:
                        self.ended = any(body == b".\r\n" for body in lines)
                    except OSError:
                        self.ended = False
                    break
                conn.sendall(b"250-pausing.test\r\n250 8BITMIME\r\n" if verb == b"EHLO"
                             else b"250 2.0.0 ok\r\n")
        self.done.set()

    def close(self) -> None:
        self.resumed.set()
        self.sock.close()


def test_a_message_file_truncated_while_it_is_sent_is_not_ended(
    relay: Any, dns: Any  # noqa: F811 - fixtures
) -> None:
    """The spool's message file truncated by hand while the relay sends it with DATA: the
    relay drops the connection without the terminating dot (the next hop discards the
    part it got) and defers, saying why; it sent what was left and the dot, and the next
    hop took a truncated message."""
    hop = PausingHop()
    try:
        r: RelayProcess = relay(config(dns, routes=[smtpRoute("example.org", hop.port)]))
        body = b"".join(b"line %07d of a big message\r\n" % n for n in range(300000))
        with smtplib.SMTP("127.0.0.1", r.port, timeout=30) as s:
            assert s.sendmail("a@client.test", ["b@example.org"],
                              b"Subject: big\r\n\r\n" + body) == {}
        assert hop.inData.wait(15)
        [message] = (r.spool / "queue").glob("*.eml")
        time.sleep(0.5)  # (the relay fills the connection's buffers, and waits)
        os.truncate(message, 1000)
        hop.resumed.set()
        assert hop.done.wait(15)
        assert hop.ended is False
        r.waitForLog(rf"{message.stem}: to=<b@example.org>, .*status=deferred \(X-mailrelay; "
                     r"the message file changed while it was sent")
    finally:
        hop.close()


def test_a_spool_out_of_inodes_refuses_mail_at_mail_from(
    smallDisk: Any, relay: Any, dns: Any  # noqa: F811 - fixtures
) -> None:
    """Octets to spare but (almost) no inode left on the spool's file system: MAIL gets
    452 4.3.1 and the log says why, as Postfix refuses at MAIL when its queue file cannot be
    made -- not 451 after the whole message, which the client sends again at each retry.
    Once inodes are freed, mail is taken again, with no restart."""
    disk = smallDisk(inodes=128)
    r: RelayProcess = relay(config(dns, hold=True) + "[spool]\nmin_free_space = 1\n",
                            "--spool", str(disk / "spool"))
    fillers = useUpInodes(disk)
    for path in fillers[-5:]:  # five free: not enough to keep
        path.unlink()

    def mail() -> tuple[int, bytes]:
        with smtplib.SMTP("127.0.0.1", r.port, timeout=15) as s:
            s.ehlo("client.test")
            return s.mail("a@client.test")

    assert mail() == (452, b"4.3.1 Error: insufficient system storage")
    # (the count, not asserted exactly: the relay may have made a file of its own since)
    r.waitForLog(rf"not enough free inodes in spool {disk}/spool: [0-5] free, fewer than 16; "
                 r"new mail is refused \(452 4.3.1\)")
    for path in fillers[-40:-5]:
        path.unlink()
    assert mail()[0] == 250
