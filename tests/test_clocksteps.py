"""mailrelay.app.clocksteps: a step of the wall clock moves the reactor's pending calls (and
the queue's schedule) by as much, so that each fires after the delay it was given."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from twisted.internet.defer import Deferred
from twisted.internet.task import Clock
from twisted.logger import capturedLogs

from mailrelay.app.clocksteps import ClockSteps, clockStepsOf
from mailrelay.interfaces import DeliveryStatus
from mailrelay.route.table import RouteRule
from mailrelay.testing import QueueHarness
from tests.harness import fired as firedWith
from tests.test_queueharness import Webhook

DAY = 86400.0


class Stepping:
    """A C{Clock} (the wall clock) and a monotonic clock that advance together, and a
    L{ClockSteps} on them; L{step} moves the wall clock alone, as C{date -s} does."""

    def __init__(self, clock: Clock | None = None) -> None:
        if clock is None:
            clock = Clock()
            clock.advance(1_800_000_000)
        self.clock = clock
        self.mono = 1000.0
        self.steps = ClockSteps(clock, monotonic=lambda: self.mono)

    def advance(self, seconds: float) -> None:
        """Time passes: both clocks advance, the check runs before the calls, as in the
        reactor's turn."""
        self.mono += seconds
        self.clock.rightNow += seconds
        self.steps.check()
        self.clock.advance(0)

    def step(self, seconds: float) -> float:
        self.clock.rightNow += seconds
        return self.steps.check()


def test_a_step_back_moves_the_calls_back() -> None:
    s = Stepping()
    fired: list[str] = []
    s.clock.callLater(30, fired.append, "timeout")
    s.clock.callLater(300, fired.append, "retry")
    s.advance(10)
    with capturedLogs() as events:
        assert s.step(-3 * 3600) == -3 * 3600
    [event] = [e for e in events if e.get("log_namespace") == "mailrelay.app.clocksteps"]
    assert event["log_level"].name == "warn"
    assert event["direction"] == "back" and event["step"] == "3:00:00" and event["count"] == 2
    s.advance(19)
    assert fired == []
    s.advance(1)
    assert fired == ["timeout"]
    s.advance(270)
    assert fired == ["timeout", "retry"]


def test_a_step_forward_moves_the_calls_forward() -> None:
    s = Stepping()
    fired: list[str] = []
    s.clock.callLater(30, fired.append, "timeout")
    assert s.step(2 * DAY) == 2 * DAY
    s.advance(29)
    assert fired == []  # not fired at once, as timed out
    s.advance(1)
    assert fired == ["timeout"]


def test_drift_below_the_tolerance_is_no_step() -> None:
    s = Stepping()
    fired: list[str] = []
    s.clock.callLater(30, fired.append, "timeout")
    for _ in range(30):
        s.mono += 1.0
        s.clock.rightNow += 1.0005  # NTP slewing at most 500 ppm
        assert s.steps.check() == 0.0
    s.clock.advance(0)
    assert fired == ["timeout"]


def test_clockStepsOf_is_one_per_reactor() -> None:
    clock = Clock()
    assert clockStepsOf(clock) is clockStepsOf(clock)
    assert clockStepsOf(Clock()) is not clockStepsOf(clock)


def deferred(tmp_path: Path, **policy: float) -> tuple[Stepping, Webhook, QueueHarness, str]:
    """A queue whose one message was deferred once, its clock followed by a L{Stepping}."""
    hook = Webhook()
    hook.answers["bob@hooks.example"] = (DeliveryStatus.TRANSIENT, "4.2.0")
    h = QueueHarness(tmp_path, {"webhook": hook}, routes=[RouteRule("*", "webhook")],
                     minBackoff=300, maxBackoff=4000, **policy)
    s = Stepping(h.clock)
    s.steps.observe(h.queue)
    queueID = h.submit("alice@example.org", ["bob@hooks.example"])
    assert len(hook.calls) == 1
    return s, hook, h, queueID


def test_the_queue_retries_on_time_after_a_step_back(tmp_path: Path) -> None:
    s, hook, h, queueID = deferred(tmp_path)
    s.advance(100)
    s.step(-3 * 3600)
    s.advance(199)
    assert len(hook.calls) == 1
    del hook.answers["bob@hooks.example"]
    s.advance(1)  # 300 seconds after the deferral, not three hours more
    assert len(hook.calls) == 2 and h.queued() == []
    h.stop()


def test_mail_does_not_expire_at_a_step_forward(tmp_path: Path) -> None:
    s, hook, h, queueID = deferred(tmp_path, maxLifetime=5 * DAY)
    arrival = h.envelope(queueID).arrival
    s.step(6 * DAY)  # a clock days behind, corrected: the message is 0 seconds old
    s.advance(299)
    assert len(hook.calls) == 1  # not at once either
    s.advance(1)
    assert len(hook.calls) == 2 and h.notifications() == []  # deferred again, not bounced
    envelope = h.envelope(queueID)
    assert envelope.arrival == arrival + 6 * DAY  # its age kept, on the corrected clock
    assert envelope.nextAttempt == h.clock.seconds() + 300
    h.stop()


def test_a_held_or_scheduled_entry_keeps_its_age_across_a_step(tmp_path: Path) -> None:
    s, hook, h, queueID = deferred(tmp_path, maxLifetime=5 * DAY)
    s.advance(DAY)  # retried every 4000 s meanwhile
    s.step(-2 * DAY)
    s.advance(4 * DAY - 10)
    assert h.notifications() == []  # 5 days queued: not expired yet
    s.advance(4000)
    [(bounce, _)] = h.notifications()  # expired on time
    assert bounce.sender == ""
    h.stop()


def test_a_step_is_written_to_the_waiting_entries_at_the_stop(tmp_path: Path) -> None:
    """The steps not yet applied to an entry's stored times (scheduled or held since) are
    written to it at the stop: the next queue manager (a restart, a reload) reads them from
    the spool, and a message that waited through a step forward of days is not that much
    older there, bounced as too long in the queue at its next attempt."""
    s, hook, h, queueID = deferred(tmp_path, maxLifetime=5 * DAY)
    stored = h.envelope(queueID)
    s.step(6 * DAY)
    s.advance(100)
    h.stop()
    envelope = h.envelope(queueID)
    assert (envelope.arrival, envelope.nextAttempt) == (
        stored.arrival + 6 * DAY, stored.nextAttempt + 6 * DAY)


def test_a_step_while_the_attempt_is_recorded(tmp_path: Path) -> None:
    s, hook, h, queueID = deferred(tmp_path, maxLifetime=5 * DAY)
    arrival = h.envelope(queueID).arrival
    update, writes = h.spool.updateEnvelope, []

    def slowUpdate(envelope: Any) -> Deferred[None]:
        d = update(envelope)
        writes.append(Deferred())
        return d.addCallback(lambda _: writes[-1])

    h.spool.updateEnvelope = slowUpdate
    s.advance(300)  # the retry, deferred again: its record waits for the disk
    assert len(hook.calls) == 2 and len(writes) == 1
    s.step(-3 * 3600)
    writes[0].callback(None)
    s.advance(299)
    assert len(hook.calls) == 2
    del hook.answers["bob@hooks.example"]
    s.advance(1)  # 300 seconds after the second deferral
    assert len(hook.calls) == 3 and h.queued() == []
    assert hook.calls[2][0].arrival == arrival - 3 * 3600
    h.stop()


def test_a_client_in_data_is_not_timed_out_by_a_step_forward() -> None:
    """With min_data_rate, the DATA deadline was a time on the wall clock: a step forward
    put every client sending a message past it, timed out (421) at its next block."""
    from mailrelay.testing import ServerHarness

    h = ServerHarness(minDataRate=100, dataTimeout=10)
    s = Stepping(h.clock)
    h.replies()
    h.send(b"EHLO x\r\nMAIL FROM:<a@example.com>\r\nRCPT TO:<b@example.org>\r\nDATA\r\n")
    s.advance(5)
    s.step(2 * DAY)
    s.advance(4)
    h.send(b"x" * 998 + b"\r\n")
    s.advance(1)
    assert not h.closed
    [reply] = h.send(b".\r\n")
    assert reply.startswith(b"250 2.0.0 Ok: queued as ")


def test_a_step_is_forgotten_with_its_entry(tmp_path: Path) -> None:
    """An entry deleted while it waited through a step leaves no record of the step behind
    (the records of a long-running relay's deleted entries were kept until the stop)."""
    from twisted.internet.defer import Deferred

    s, hook, h, queueID = deferred(tmp_path)
    s.step(-3600)
    assert queueID in h.queue._stepped
    Deferred.fromCoroutine(h.queue.delete(queueID))
    s.advance(1)
    assert h.queued() == [] and h.queue._stepped == {}
    h.stop()


def test_the_queue_list_shows_a_waiting_entrys_times_moved_by_a_step(tmp_path: Path) -> None:
    """C{mailrelay queue list} (and show, and the shape's ages) gives a scheduled or held
    entry's arrival and next attempt with the steps of the clock its queue manager has not
    written to the spool yet (they are at its next attempt): it showed the times of before
    the step, a message six days older than it is after a step forward of six days."""
    from mailrelay.queue.control import QueueControl

    s, hook, h, queueID = deferred(tmp_path, maxLifetime=5 * DAY)
    stored = h.envelope(queueID)
    assert stored is not None and stored.arrival is not None
    s.step(6 * DAY)
    s.advance(10)
    control = QueueControl(h.spool, h.queue, h.clock)
    [entry] = firedWith(Deferred.fromCoroutine(control.entries()))["entries"]
    moved = (int(stored.arrival + 6 * DAY), int(stored.nextAttempt + 6 * DAY))
    assert (entry["arrival_time"], entry["next_attempt"]) == moved
    shown = firedWith(Deferred.fromCoroutine(control.show(queueID)))["entry"]
    assert (shown["arrival_time"], shown["next_attempt"]) == moved
    shape = firedWith(Deferred.fromCoroutine(control.summary()))
    assert shape["total"][:2] == [1, 1]  # 10 seconds old: the first column
    h.stop()
