"""Header stampers that answer later, fail or time out: L{HeaderProcessor}, L{runStampers}
and the server protocol over a C{StringTransport} with a C{Clock}."""

from __future__ import annotations

from typing import Any

import pytest
from twisted.internet.defer import Deferred, succeed
from twisted.internet.task import Clock
from twisted.logger import capturedLogs, formatEvent
from zope.interface import implementer

from mailrelay.interfaces import IHeaderStamper, StampResult
from mailrelay.stamping import ConfiguredStamper, HeaderProcessor, StampingFailed
from mailrelay.testing import ServerHarness

STAMPING_FAILED = b"451 4.3.0 Error: temporary failure processing the message, try again later"
MESSAGE = b"Subject: hi\r\n\r\n" + b"body line\r\n" * 50


@implementer(IHeaderStamper)
class Later:
    """Answers with a Deferred the test fires (or raises once, with C{raiseOnce})."""

    def __init__(self, raiseOnce: bool = False) -> None:
        self.calls: list[Deferred[StampResult]] = []
        self.raiseOnce = raiseOnce

    def stamp(self, context: Any) -> Any:
        if self.raiseOnce:
            self.raiseOnce = False
            raise RuntimeError("stamper broke")
        d: Deferred[StampResult] = Deferred()
        self.calls.append(d)
        return d

    def answer(self) -> None:
        self.calls.pop(0).callback(StampResult(append=[b"X-Later: 1\r\n"]))


def harness(stamper: Later, **kw: Any) -> ServerHarness:
    h = ServerHarness(stampers=[ConfiguredStamper("later", stamper, kw.pop("timeout", 10.0))], **kw)
    h.replies()
    h.send(b"EHLO client.example\r\nMAIL FROM:<a@example.com>\r\nRCPT TO:<b@example.org>\r\nDATA\r\n")
    return h


def test_processor_holds_the_body_until_the_stamp_answers() -> None:
    out: list[bytes] = []
    answer: Deferred[StampResult] = Deferred()
    proc = HeaderProcessor(out.append, lambda headers: answer)
    proc.write(b"Subject: x\r\n\r\nfirst\r\n")
    proc.write(b"second\r\n")
    assert out == [] and proc.stamping
    done = proc.finish()
    assert not done.called
    answer.callback(StampResult(prepend=[b"Received: r\r\n"], append=[b"X-A: 1\r\n"]))
    assert done.called and not proc.stamping
    assert b"".join(out) == b"Received: r\r\nSubject: x\r\nX-A: 1\r\n\r\nfirst\r\nsecond\r\n"
    proc.write(b"late\r\n")  # after stamping, straight through
    assert out[-1] == b"late\r\n"


def test_processor_after_a_failed_or_abandoned_stamp_writes_nothing() -> None:
    out: list[bytes] = []
    answer: Deferred[StampResult] = Deferred()
    proc = HeaderProcessor(out.append, lambda headers: answer)
    proc.write(b"Subject: x\r\n\r\nbody\r\n")
    answer.errback(StampingFailed("header stamper x failed"))
    proc.write(b"more\r\n")
    failures: list[Any] = []
    proc.finish().addErrback(failures.append)
    assert out == [] and failures[0].check(StampingFailed)
    # Abandoned while stamping: the stamp is cancelled, nothing is written, nothing is left
    # unhandled.
    cancelled: list[Any] = []
    pending: Deferred[StampResult] = Deferred(lambda d: cancelled.append(d))
    proc = HeaderProcessor(out.append, lambda headers: pending)
    proc.write(b"Subject: x\r\n\r\n")
    proc.abort()
    assert cancelled == [pending] and out == []


def test_deferred_stamp_pauses_reading_and_stores_the_field() -> None:
    stamper = Later()
    h = harness(stamper)
    assert h.send(MESSAGE[:20]) == []
    assert h.transport.producerState == "paused"
    assert h.send(MESSAGE[20:] + b".\r\nQUIT\r\n") == []
    stamper.answer()
    lines = h.replies()
    assert lines[0].startswith(b"250 2.0.0 Ok: queued as ") and lines[1] == b"221 2.0.0 Bye"
    ((_, message),) = h.spool.committed.values()
    assert message == b"Subject: hi\r\nX-Later: 1\r\n\r\n" + b"body line\r\n" * 50


def test_stamping_does_not_count_against_the_data_timeout() -> None:
    stamper = Later()
    h = harness(stamper, dataTimeout=5, timeout=60)
    h.send(b"Subject: hi\r\n\r\n")
    h.clock.advance(30)  # longer than the DATA time-out: the stamper's own bounds the wait
    assert not h.closed
    stamper.answer()
    assert h.transport.producerState == "producing"
    h.clock.advance(4)
    assert h.send(b"body\r\n.\r\n")[0].startswith(b"250 ")


def test_stamper_timeout_is_451_and_the_session_goes_on() -> None:
    stamper = Later()
    h = harness(stamper, timeout=7)
    with capturedLogs() as events:
        h.send(b"Subject: hi\r\n\r\n")
        h.clock.advance(7)
        assert h.transport.producerState == "producing"
        assert h.send(b"body\r\n.\r\n") == [STAMPING_FAILED]
    assert h.spool.committed == {}
    texts = [formatEvent(e) for e in events]
    assert any("header stamper later gave no answer in 7s" in t for t in texts), texts
    assert h.send(b"RSET\r\n") == [b"250 2.0.0 Ok"]


def test_stamper_that_raises_is_451_logged_once_with_its_name() -> None:
    stamper = Later(raiseOnce=True)
    h = harness(stamper)
    with capturedLogs() as events:
        assert h.send(MESSAGE + b".\r\n") == [STAMPING_FAILED]
    failures = [e for e in events if "log_failure" in e]
    assert len(failures) == 1 and failures[0]["stamper"] == "later"
    assert "stamper broke" in failures[0]["log_failure"].getErrorMessage()
    assert h.spool.committed == {}
    # The next message on the same connection is stamped normally.
    h.send(b"MAIL FROM:<a@example.com>\r\nRCPT TO:<b@example.org>\r\nDATA\r\n")
    h.send(MESSAGE + b".\r\n")
    stamper.answer()
    assert h.replies()[0].startswith(b"250 2.0.0 Ok: queued as ")


def test_connection_lost_while_stamping_cancels_it() -> None:
    stamper = Later()
    h = harness(stamper)
    h.send(b"Subject: hi\r\n\r\nbody\r\n")
    (pending,) = stamper.calls
    with capturedLogs() as events:
        h.loseConnection()
    assert pending.called  # cancelled
    assert h.spool.committed == {}
    assert not any("log_failure" in e for e in events)


def test_synchronous_stampers_do_not_pause() -> None:
    @implementer(IHeaderStamper)
    class Now:
        def stamp(self, context: Any) -> Any:
            return succeed(StampResult(append=[b"X-Now: 1\r\n"]))

    h = ServerHarness(stampers=[Now()])
    h.send(b"EHLO c\r\nMAIL FROM:<a@example.com>\r\nRCPT TO:<b@example.org>\r\nDATA\r\nSubject: x\r\n\r\n")
    assert h.transport.producerState == "producing"
    assert h.send(b".\r\n")[-1].startswith(b"250 ")


def test_clock_is_unused_by_synchronous_stampers() -> None:
    clock = Clock()
    from mailrelay.stamping import DefaultStamper, runStampers
    from tests.test_stamping import context

    result = runStampers([ConfiguredStamper("default", DefaultStamper(), 1)], context(), clock)
    assert isinstance(result, StampResult) and clock.getDelayedCalls() == []


def test_message_refused_while_stamping_cancels_it_and_reads_on() -> None:
    """A message refused at its end (here for a NUL in its body) while a stamper has not
    answered: the stamping is abandoned at once, so the session reads the next command
    without waiting for the stamper, and nothing is logged about a stamping that no longer
    matters.  (Over TCP the refusal cannot be read while the stampers work, reading being
    paused; a transport that delivers what it already has after a pause would show it.)"""
    stamper = Later()
    h = harness(stamper, timeout=30)
    h.send(b"Subject: hi\r\n\r\n")
    (pending,) = stamper.calls
    with capturedLogs() as events:
        assert h.send(b"a NUL \0 here\r\n.\r\n") == [b"550 5.6.0 Error: message contains NUL characters"]
        assert pending.called  # cancelled
        assert h.transport.producerState == "producing"
        assert h.send(b"RSET\r\n") == [b"250 2.0.0 Ok"]
        h.clock.advance(30)
    assert h.spool.committed == {}
    texts = [formatEvent(e) for e in events]
    assert not any("stamper" in t or "ignored" in t for t in texts), texts


class Blocks(Later):
    """Holds the reactor for 30 ms, then answers (at once, or with a Deferred)."""

    def __init__(self, later: bool) -> None:
        super().__init__()
        self.later = later

    def stamp(self, context: Any) -> Any:
        import time

        time.sleep(0.03)
        return super().stamp(context) if self.later else StampResult(prepend=[b"X-Late: 1\r\n"])


@pytest.mark.parametrize("later", [False, True], ids=["answer", "deferred"])
def test_a_stamper_that_blocks_past_its_timeout_is_not_believed(later: bool) -> None:
    """A stamper whose call holds the reactor longer than its timeout (its timer cannot
    fire) and then answers was believed, while a Deferred answering after the timeout is
    not: the message is now refused with 451 as for a timeout, logged with how long the
    call held the reactor; a Deferred it returned is cancelled."""
    stamper = Blocks(later)
    h = harness(stamper, timeout=0.01)
    with capturedLogs() as events:
        h.send(b"Subject: hi\r\n\r\n")
        assert h.send(b"body\r\n.\r\n") == [STAMPING_FAILED]
    assert h.spool.committed == {}
    assert all(d.called for d in stamper.calls)
    texts = [formatEvent(e) for e in events]
    assert any("header stamper later gave no answer in 0.01s; the message is refused with 451 "
               "(its call held the reactor for 0.0" in t for t in texts), texts
