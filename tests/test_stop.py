"""Unit tests of the graceful stop: services stopped in order, sessions drained, the queue
manager's drain time and queue lock (no reactor: Clock, StringTransport, Deferreds)."""

from __future__ import annotations

import errno
import os
from pathlib import Path
from typing import Any

import pytest
from twisted.application.service import Service
from twisted.internet.defer import Deferred, succeed
from twisted.internet.task import Clock

from mailrelay.app.services import OrderedMultiService
from mailrelay.queue.lock import QueueLock
from mailrelay.receive.protocol import Sessions
from mailrelay.testing import ServerHarness


class Recorded(Service):
    def __init__(self, name: str, log: list[str]) -> None:
        self.name = name
        self.log = log
        self.stopping: Deferred[None] = Deferred()

    def beginShutdown(self) -> None:
        self.log.append(f"begin {self.name}")

    def stopService(self) -> Deferred[None]:
        super().stopService()
        self.log.append(f"stop {self.name}")
        return self.stopping


def test_children_stop_one_after_the_other_last_first() -> None:
    log: list[str] = []
    top = OrderedMultiService()
    children = [Recorded(name, log) for name in ("spool", "delivery", "listeners")]
    for child in children:
        child.setServiceParent(top)
    top.startService()
    done: list[Any] = []
    top.stopService().addCallback(done.append)
    assert log == ["begin listeners", "begin delivery", "begin spool", "stop listeners"]
    children[2].stopping.callback(None)
    assert log[-1] == "stop delivery" and not done
    children[1].stopping.errback(RuntimeError("a failing stop does not stop the others"))
    assert log[-1] == "stop spool" and not done
    children[0].stopping.callback(None)
    assert done == [None]


def _inData(h: ServerHarness) -> None:
    for line in (b"EHLO x.test", b"MAIL FROM:<a@example.com>", b"RCPT TO:<b@example.org>",
                 b"DATA"):
        h.send(line + b"\r\n")


def test_idle_sessions_get_421_a_message_in_hand_is_finished() -> None:
    sessions = Sessions()
    busy = ServerHarness(sessions=sessions)
    clock = busy.clock
    idle = busy.another()
    assert len(sessions.live) == 2
    _inData(busy)
    busy.send(b"Subject: x\r\n\r\nhalf\r\n")
    drained = sessions.drain(clock, 30)
    assert idle.replies()[-1] == b"421 4.3.2 relay.test Service shutting down"
    assert idle.transport.disconnecting
    idle.protocol.connectionLost(None)
    assert not drained.called and not busy.transport.disconnecting
    assert busy.send(b"the rest\r\n.\r\n")[-1].startswith(b"250 2.0.0 Ok: queued as ")
    assert len(busy.spool.committed) == 1
    assert busy.send(b"QUIT\r\n") == [b"221 2.0.0 Bye"]
    busy.protocol.connectionLost(None)
    assert drained.called


def test_a_command_after_the_message_gets_421() -> None:
    sessions = Sessions()
    h = ServerHarness(sessions=sessions)
    _inData(h)
    sessions.drain(h.clock, 30)
    h.send(b"Subject: x\r\n\r\nbody\r\n.\r\n")
    assert h.send(b"MAIL FROM:<c@example.com>\r\n") == [
        b"421 4.3.2 relay.test Service shutting down"]
    # Nothing said after the 250: the 421 comes a moment later.
    h2 = ServerHarness(sessions=Sessions())
    _inData(h2)
    h2.context.sessions.drain(h2.clock, 30)
    h2.send(b"Subject: x\r\n\r\nbody\r\n.\r\n")
    h2.clock.advance(1)
    assert h2.replies()[-1] == b"421 4.3.2 relay.test Service shutting down"


def test_drain_time_cuts_an_unfinished_message() -> None:
    sessions = Sessions()
    h = ServerHarness(sessions=sessions)
    _inData(h)
    h.send(b"Subject: x\r\n\r\nstill typing\r\n")
    drained = sessions.drain(h.clock, 30)
    h.clock.advance(29)
    assert not h.transport.disconnecting
    h.clock.advance(1)
    assert h.replies()[-1] == b"421 4.3.2 relay.test Service shutting down"
    assert h.spool.committed == {}
    h.protocol.connectionLost(None)
    assert drained.called


def test_session_starting_while_draining_is_refused() -> None:
    sessions = Sessions()
    first = ServerHarness(sessions=sessions)
    sessions.drain(first.clock, 30)
    late = first.another()
    assert late.replies() == [b"421 4.3.2 relay.test Service shutting down"]


def test_queue_lock_is_exclusive_and_waits(tmp_path: Path) -> None:
    clock = Clock()
    first, second = QueueLock(tmp_path, clock), QueueLock(tmp_path, clock)
    got: list[Any] = []
    first.acquire().addCallback(got.append)
    assert got == [None] and first.held
    assert (tmp_path / "qmgr.lock").read_text() == f"{os.getpid()}\n"
    waiting = second.acquire()
    waiting.addCallback(lambda _: got.append("second"))
    clock.advance(1)
    assert got == [None] and not second.held
    first.release()
    clock.advance(0.2)
    assert got == [None, "second"] and second.held
    second.release()


def test_a_queue_lock_that_cannot_be_made_is_tried_again(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The lock file cannot be made (no inode left on the spool's file system, where no
    queue manager ran before: a relay run with [queue] hold = true; or made unreadable by
    hand): the queue manager waits, saying why once a minute, and takes the lock once it can,
    with no restart.  It gave up at once: the relay ran on, accepting mail and delivering
    none, until restarted."""
    from twisted.logger import LogLevel, capturedLogs, formatEvent

    clock = Clock()
    lock = QueueLock(tmp_path, clock)
    tries: list[float] = []
    tryLock = lock._tryLock

    def full() -> bool:
        tries.append(clock.seconds())
        if len(tries) <= 13:
            raise OSError(errno.ENOSPC, "No space left on device", str(lock.path))
        return tryLock()

    monkeypatch.setattr(lock, "_tryLock", full)
    got: list[Any] = []
    with capturedLogs() as events:
        lock.acquire().addBoth(got.append)
        clock.pump([5] * 12)
        assert got == [] and not lock.held
        clock.advance(5)
    assert got == [None] and lock.held and tries == [5.0 * n for n in range(14)]
    error = (LogLevel.error, f"cannot take the queue lock {lock.path}: No space left on device; "
             "the queue manager waits, trying again every 5 seconds")
    assert [(e["log_level"], formatEvent(e)) for e in events] == [
        error, error, (LogLevel.info, f"queue lock {lock.path} acquired")]
    lock.release()


def test_queue_lock_wait_can_be_cancelled(tmp_path: Path) -> None:
    clock = Clock()
    holder = QueueLock(tmp_path, clock)
    holder.acquire()
    waiter = QueueLock(tmp_path, clock)
    d = waiter.acquire()
    failures: list[Any] = []
    d.addErrback(failures.append)
    waiter.release()  # a queue manager stopped while waiting
    assert len(failures) == 1 and not clock.getDelayedCalls()
    holder.release()


def test_queue_manager_delivers_nothing_before_it_has_the_lock(tmp_path: Path) -> None:
    from mailrelay.cleanup.intake import Intake
    from mailrelay.queue import QueueManager

    clock = Clock()
    holder = QueueLock(tmp_path, clock)
    holder.acquire()

    class Spool:
        listed = 0

        def queueIDs(self) -> list[str]:
            self.listed += 1
            return []

    spool = Spool()
    queue = QueueManager(spool, None, {}, clock, hostname="relay.test",
                         makeIntake=lambda enqueue: Intake(spool, [], clock, "relay.test"),
                         lock=QueueLock(tmp_path, clock))
    queue.startService()
    queue.enqueue("01K1H5WXVST20000479F")
    clock.advance(5)
    assert spool.listed == 0 and queue.activeCount == 0
    stopped = queue.stopService()
    assert stopped.called and not clock.getDelayedCalls()
    holder.release()


def test_message_waits_for_the_reverse_lookup() -> None:
    """A client faster than the DNS gets its 354 once its name is known (the greeting does not
    wait), so that Received: always has it."""
    from twisted.names import dns

    class SlowResolver:
        def __init__(self) -> None:
            self.pending: list[Deferred[Any]] = []

        def lookupPointer(self, name: str) -> Deferred[Any]:
            d: Deferred[Any] = Deferred()
            self.pending.append(d)
            return d

        def lookupAddress(self, name: str) -> Deferred[Any]:
            answer = dns.RRHeader(name, dns.A, payload=dns.Record_A("192.0.2.8"))
            return succeed(([answer], [], []))

    resolver = SlowResolver()
    h = ServerHarness(peer="192.0.2.8", connect=False, relay={"networks": ["192.0.2.0/24"]})
    h.context.resolver = resolver
    h.protocol.makeConnection(h.transport)
    assert h.replies() == [b"220 relay.test ESMTP mailrelay"] and len(resolver.pending) == 1
    _inData(h)
    assert h.replies() == []  # no 354 yet
    ptr = dns.RRHeader("8.2.0.192.in-addr.arpa", dns.PTR, payload=dns.Record_PTR("good.test"))
    resolver.pending[0].callback(([ptr], [], []))
    assert h.replies()[-1].startswith(b"354 ")
    reply = h.send(b"Subject: x\r\n\r\nbody\r\n.\r\n")[-1]
    (message,) = h.spool.messages()
    assert reply.startswith(b"250 ") and message.startswith(b"Received: from x.test (good.test")
