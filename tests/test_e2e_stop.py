"""End-to-end: stopping and crashing the real C{twistd -n mailrelay} loses nothing and
delivers nothing twice.

- SIGTERM: listeners stop; idle sessions get C{421 4.3.2}; a message being received may be
  finished (250 once durable); deliveries in flight run to their end and are recorded before
  the spool closes; the restarted relay delivers none of them again.
- The drain time bounds all that: a delivery still running then is interrupted, recorded as
  deferred and retried at the next start.
- C{kill -9} of twistd: its delivery process finishes what it has in flight, records it, and
  exits (it never outlives the relay for long); a relay restarted meanwhile starts a new one,
  which waits for the spool's queue lock.
"""

from __future__ import annotations

import fcntl
import os
import re
import signal
import smtplib
import subprocess
import time
from collections import Counter
from typing import Any

from tests.conftest import deliveryPIDs


def _alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().split(") ", 1)[1][0] != "Z"
    except OSError:
        return False


def _send(port: int, subject: str) -> None:
    with smtplib.SMTP("127.0.0.1", port, timeout=20) as s:
        s.sendmail("alice@example.com", ["bob@example.org"],
                   f"Subject: {subject}\r\n\r\nbody\r\n".encode())


def _config(port: int, extra: str = "") -> str:
    return (f'drain_time = 10\n[relay]\nsmarthost = "[127.0.0.1]:{port}"\n'
            f"[dns]\nreverse_lookups = false\n{extra}")


def test_sigterm_lets_deliveries_in_flight_finish_and_records_them(relays, hop) -> None:
    """The deliveries under way at SIGTERM end normally and are recorded: the restarted
    relay sends none of them again."""
    slow, port = hop(1.5)
    r = relays(_config(port)).start()
    r.waitForLog(r"queue manager started")
    for i in range(5):
        _send(r.port, f"m{i}")
    slow.waitFor(lambda: slow.started >= 5, 20, "5 deliveries in flight")
    assert not slow.subjects  # none answered yet: all five are in flight
    assert r.stop(signal.SIGTERM, timeout=30) in (0, -signal.SIGTERM)
    log = r.log()
    assert slow.subjects == Counter({f"m{i}": 1 for i in range(5)}), log
    assert "not started" not in log and "may be sent more than once" not in log, log
    assert len(re.findall(r"status=sent", log)) == 5, log
    assert r.queued() == [], "delivered entries must be removed before the spool closes"

    r.start()
    r.waitForLog(r"queue manager started: 0 queued entries")
    time.sleep(2)
    assert slow.subjects == Counter({f"m{i}": 1 for i in range(5)})


def test_sigterm_starts_no_delivery_waiting_for_a_place(relays, hop) -> None:
    """With C{delivery_limit = 1}, one delivery runs and the other waits for its place at
    SIGTERM: the one running ends and is recorded; the one waiting is not started during
    the drain (though the place frees up), its recipient stays queued, logged so, and the
    restarted relay delivers it once."""
    slow, port = hop(1.5)
    queue = "[queue]\ndelivery_limit = 1\nmin_backoff = 1\nmax_backoff = 2\n"
    r = relays(_config(port, queue)).start()
    r.waitForLog(r"queue manager started")
    _send(r.port, "first")
    slow.waitFor(lambda: slow.started >= 1, 20, "the first delivery")
    _send(r.port, "second")
    time.sleep(0.3)  # (the second's attempt has begun: it waits for the place)
    assert slow.started == 1
    assert r.stop(signal.SIGTERM, timeout=30) in (0, -signal.SIGTERM)
    log = r.log()
    assert slow.subjects == Counter({"first": 1}), log
    assert "deliveries waiting for a place are not started; their recipients stay queued" in log
    assert re.search(r"status=deferred \(X-mailrelay; delivery via smtp:\S+ not started: the "
                     r"relay was stopping\)", log), log
    assert "may be sent more than once" not in log, log
    assert len(r.queued()) == 1  # still queued, nothing lost

    r.start()
    r.waitForLog(r"queue manager started: 1 queued entries")
    slow.waitFor(lambda: slow.subjects["second"] == 1, 20, "the second delivered")
    assert slow.subjects == Counter({"first": 1, "second": 1})


def test_drain_time_bounds_a_delivery_that_does_not_end(relays, hop) -> None:
    """A next hop that never answers cannot hold the stop beyond the drain time: the
    delivery is interrupted, recorded as deferred, and retried at the next start."""
    stuck, port = hop(3600)
    r = relays(_config(port).replace("drain_time = 10", "drain_time = 2")).start()
    r.waitForLog(r"queue manager started")
    _send(r.port, "stuck")
    stuck.waitFor(lambda: stuck.started >= 1, 20, "the delivery")
    began = time.monotonic()
    assert r.stop(signal.SIGTERM, timeout=30) in (0, -signal.SIGTERM)
    assert time.monotonic() - began < 12
    log = r.log()
    assert re.search(r"status=deferred \(X-mailrelay; delivery via smtp:\S+ interrupted: the "
                     r"relay was stopping", log), log
    assert len(r.queued()) == 1  # still queued, nothing lost

    fast, port2 = hop(0)
    r.configText = _config(port2).replace("drain_time = 10", "drain_time = 2")
    r.start()
    r.waitForLog(r"queue manager started: 1 queued entries")


def test_a_second_sigterm_to_the_relay_while_it_drains_is_no_error(relays, hop) -> None:
    """SIGTERM twice to the relay while a delivery drains (systemd's stop and a kill, a
    process group signalled): it stops once, saying so, and the second signal is no error.
    Twisted's handler stopped the reactor again and logged ReactorNotRunning as critical,
    with a traceback."""
    stuck, port = hop(3600)
    r = relays(_config(port).replace("drain_time = 10", "drain_time = 3")).start()
    r.waitForLog(r"queue manager started")
    _send(r.port, "stuck")
    stuck.waitFor(lambda: stuck.started >= 1, 20, "the delivery")
    assert r.process is not None
    r.process.send_signal(signal.SIGTERM)
    r.waitForLog(r"Received SIGTERM, shutting down")
    time.sleep(0.5)
    assert r.process.poll() is None  # still draining: the case
    assert r.stop(signal.SIGTERM, timeout=30) in (0, -signal.SIGTERM)
    log = r.log()
    assert "ReactorNotRunning" not in log and "Traceback" not in log, log
    assert "Received SIGTERM again while stopping" in log, log
    assert len(r.queued()) == 1  # the delivery deferred, still queued


def test_sigterm_during_inbound_data_finishes_the_message(relays) -> None:
    """SIGTERM while a client sends a message: it may finish it and gets its 250 (the
    message is queued), then 221 to its QUIT; an idle client gets 421 4.3.2 at once."""
    r = relays("drain_time = 10\n[dns]\nreverse_lookups = false\n[queue]\nhold = true\n").start()
    idle = r.connect()
    assert idle.readReply()[0].startswith(b"220 ")
    idle.send(b"EHLO idle.test\r\n")
    idle.readReply()
    busy = r.connect()
    busy.readReply()
    busy.send(b"EHLO busy.test\r\n")
    busy.readReply()
    for command in (b"MAIL FROM:<a@example.com>", b"RCPT TO:<b@example.org>", b"DATA"):
        busy.send(command + b"\r\n")
        busy.readReply()
    busy.send(b"Subject: half\r\n\r\nthe first half\r\n")
    r.process.send_signal(signal.SIGTERM)
    assert idle.readReply() == [b"421 4.3.2 relay.test Service shutting down"]
    idle.expectClosed()
    r.waitForLog(r"session\(s\) open; messages in progress have 10s to finish")
    busy.send(b"and the second\r\n.\r\n")
    reply = busy.readReply()
    assert reply[0].startswith(b"250 2.0.0 Ok: queued as "), reply
    busy.send(b"QUIT\r\n")
    assert busy.readReply()[0].startswith(b"221 ")
    r.process.wait(20)
    queued = r.queued()
    assert len(queued) == 1
    assert (r.spool / "queue" / f"{queued[0]}.eml").read_bytes().endswith(
        b"the first half\r\nand the second\r\n")


def test_message_unfinished_at_the_end_of_the_drain_time_is_refused(relays) -> None:
    """A client that does not finish its message within the drain time gets 421: its
    message is not acknowledged (it will send it again) and not queued."""
    r = relays("drain_time = 1\n[dns]\nreverse_lookups = false\n[queue]\nhold = true\n").start()
    c = r.connect()
    c.readReply()
    for command in (b"EHLO x.test", b"MAIL FROM:<a@example.com>", b"RCPT TO:<b@example.org>",
                    b"DATA"):
        c.send(command + b"\r\n")
        c.readReply()
    c.send(b"Subject: slow\r\n\r\nstill typing\r\n")
    r.process.send_signal(signal.SIGTERM)
    assert c.readReply() == [b"421 4.3.2 relay.test Service shutting down"]
    r.process.wait(20)
    assert r.queued() == []


def test_kill9_delivery_process_finishes_in_flight_work_and_exits(relays, hop) -> None:
    """After kill -9 of twistd, its delivery process finishes the deliveries in flight,
    records them and exits; the relay restarted at once waits for it (queue lock) and
    delivers nothing twice."""
    slow, port = hop(3)
    r = relays(_config(port)).start()
    r.waitForLog(r"queue manager started")
    child = deliveryPIDs(r)[-1]
    for i in range(3):
        _send(r.port, f"k{i}")
    slow.waitFor(lambda: slow.started >= 3, 20, "3 deliveries in flight")
    r.stop(signal.SIGKILL)
    r.start()  # at once, while the orphan is still delivering
    r.waitForLog(r"waiting for the queue lock \S+, held by process " + str(child), timeout=20)
    slow.waitFor(lambda: sum(slow.subjects.values()) >= 3, 20, "the 3 deliveries")
    deadline = time.monotonic() + 15
    while _alive(child) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not _alive(child), "the old delivery process outlived its relay"
    r.waitForLog(r"queue lock \S+ acquired", timeout=20)
    r.waitForLog(r"queue manager started: 0 queued entries", timeout=20)
    _send(r.port, "after")
    slow.waitFor(lambda: slow.subjects["after"] >= 1, 20, "the message sent after")
    assert slow.subjects == Counter({"k0": 1, "k1": 1, "k2": 1, "after": 1})
    # The orphan's log lines went to its standard error (here the same file) once the pipe
    # to its relay was broken: its deliveries are on record.
    r.waitForLog(r"(?s)(status=sent.*){4}")


def test_queue_manager_waits_for_the_queue_lock(relays, hop) -> None:
    """While another process holds the spool's queue lock, nothing is delivered; the log
    says who holds it."""
    fast, port = hop(0)
    r = relays(_config(port))
    r.spool.mkdir(parents=True)
    fd = os.open(r.spool / "qmgr.lock", os.O_RDWR | os.O_CREAT, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        os.write(fd, f"{os.getpid()}\n".encode())
        r.start()
        r.waitForLog(rf"waiting for the queue lock \S+qmgr.lock, held by process {os.getpid()}")
        _send(r.port, "locked")
        time.sleep(1.5)
        assert not fast.subjects
    finally:
        os.close(fd)
    fast.waitFor(lambda: fast.subjects["locked"] == 1, 20, "the message")


SLOW_START = '''
import time
from pathlib import Path

from twisted.application.service import Service
from zope.interface import implementer

from mailrelay.interfaces import CONTINUE, IConnectionPolicy


@implementer(IConnectionPolicy)
class SlowStart(Service):
    """A plugin whose service takes a while to start (it opens a slow database)."""

    def checkConnect(self, client):
        return CONTINUE

    def checkHelo(self, client, name):
        return CONTINUE

    def startService(self):
        super().startService()
        Path(MARKER).write_text("")
        time.sleep(2)


def build(options, context):
    return SlowStart()
'''
SLOW_START_DROPIN = '''
from mailrelay.interfaces import IConnectionPolicy, MailRelayPlugin

slowStart = MailRelayPlugin("slow-start", IConnectionPolicy, "Starts slowly", "slowstart:build")
'''


def _startedUntilMarked(relays: Any, tmp_path: Any, module: str, source: str, dropin: str,
                        plugin: str) -> Any:
    """A relay with the site plugin C{plugin} (its C{module}'s C{source}, C{dropin}),
    started as twistd (not waited for), once the plugin has written its C{MARKER}."""
    from tests.test_e2e_hooks import sitePlugins

    marker = tmp_path / "marker"
    _, env = sitePlugins(tmp_path, module, source.replace("MARKER", repr(str(marker))), dropin)
    r = relays('[dns]\nreverse_lookups = false\n[[routes]]\ndomain = "*"\nbackend = "discard"\n'
               f'[[plugins]]\nplugin = "{plugin}"\n', env=env)
    with open(r.logPath, "ab") as log:
        r.process = subprocess.Popen(r.command(), cwd=r.directory, env=dict(os.environ, **env),
                                     stdout=log, stderr=subprocess.STDOUT,
                                     stdin=subprocess.DEVNULL)
    deadline = time.monotonic() + 30
    while not marker.exists():
        assert r.process.poll() is None and time.monotonic() < deadline, r.log()
        time.sleep(0.02)
    return r


def test_a_sigterm_during_the_start_is_a_clean_stop(relays, tmp_path) -> None:
    """Found by a review: a SIGTERM in the first instants of a start (systemd's stop just
    after a start, a restart) came before Twisted installs its handlers, as the reactor
    runs: it killed the relay on the spot, leaving its control socket (replaced at the
    next start) and the pid file.  Here it comes as twistd starts the relay's services
    (a plugin's service taking two seconds), after the control socket is made: the relay
    finishes starting, then stops as at any SIGTERM -- saying so, its children stopped,
    its socket removed, no traceback."""
    from tests.test_e2e_operating import processesMentioning

    r = _startedUntilMarked(relays, tmp_path, "slowstart", SLOW_START, SLOW_START_DROPIN,
                            "slow-start")
    assert (r.spool / "control.sock").exists()
    r.process.send_signal(signal.SIGTERM)
    assert r.process.wait(30) in (0, -signal.SIGTERM)
    log = r.log()
    assert "Received SIGTERM, shutting down." in log and "Server Shut Down." in log, log
    assert "Traceback" not in log, log
    assert not (r.spool / "control.sock").exists(), log
    deadline = time.monotonic() + 15
    while processesMentioning(str(r.directory)) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert processesMentioning(str(r.directory)) == [], log


SLOW_BUILD = '''
import time
from pathlib import Path

from zope.interface import implementer

from mailrelay.interfaces import CONTINUE, IConnectionPolicy


@implementer(IConnectionPolicy)
class SlowBuild:
    """A plugin that takes a while to build (it loads a large table)."""

    def checkConnect(self, client):
        return CONTINUE

    def checkHelo(self, client, name):
        return CONTINUE


def build(options, context):
    Path(MARKER).write_text("")
    time.sleep(2)
    return SlowBuild()
'''
SLOW_BUILD_DROPIN = '''
from mailrelay.interfaces import IConnectionPolicy, MailRelayPlugin

slowBuild = MailRelayPlugin("slow-build", IConnectionPolicy, "Builds slowly", "slowbuild:build")
'''


def test_a_sighup_while_the_relay_is_built_reloads_it_once_started(relays, tmp_path) -> None:
    """A SIGHUP while twistd builds the relay (its plugins, here one taking two seconds)
    came before the reload handler was installed: its default action killed the relay on
    the spot.  It is caught from the first instant: the relay starts, then reloads."""
    r = _startedUntilMarked(relays, tmp_path, "slowbuild", SLOW_BUILD, SLOW_BUILD_DROPIN,
                            "slow-build")
    r.process.send_signal(signal.SIGHUP)
    r.waitForLog(r"configuration reloaded from", timeout=30)
    assert r.process.poll() is None, r.log()
    assert "Traceback" not in r.log(), r.log()
