"""Unit tests of the operator's queue commands: the queue manager's hold, release, flush,
delete and bounce (L{mailrelay.queue.manager}), L{QueueControl}'s views, the AMP commands
over iosim (L{mailrelay.queue.commands}), the control socket's guards
(L{mailrelay.app.control}), the C{mailrelay} command's output and how it finds the socket
(L{mailrelay.app.cli}), and C{check -n}'s effective configuration."""

from __future__ import annotations

import io
import os
import socket
import struct
import sys
import tomllib
from pathlib import Path
from typing import Any

import pytest
from twisted.internet.defer import Deferred, succeed
from twisted.internet.testing import StringTransport
from twisted.protocols import amp
from twisted.python.failure import Failure
from twisted.test import iosim
from zope.interface import implementer

from mailrelay.delivery.common import PerDestination, resultsForAll
from mailrelay.envelope import Envelope
from mailrelay.errors import EntryGone
from mailrelay.interfaces import DeliveryStatus, IDeliveryBackend, RecipientResult, Route
from mailrelay.queue.commands import (
    JSON,
    ControlLocator,
    QueueBounce,
    QueueDelete,
    QueueFlush,
    QueueHold,
    QueueList,
    QueueShow,
    QueueStatus,
    QuietAMP,
    makeCommand,
)
from mailrelay.queue.control import (
    BadRequest,
    NotPermitted,
    QueueControl,
    QueueUnavailable,
    UnknownEntry,
    entryInfo,
)
from mailrelay.queue.manager import RETURNED_STATUS
from mailrelay.route.table import RouteRule
from mailrelay.testing import QueueHarness
from tests.test_queue import resultOf

# -- a queue with a backend the test drives -----------------------------------------------------


@implementer(IDeliveryBackend)
class Hop:
    """Answers each delivery with C{answer} (4xx by default: the next hop is down), or holds
    it in C{pending} while C{hold} is set."""

    def __init__(self) -> None:
        self.calls: list[list[str]] = []
        self.answer = DeliveryStatus.TRANSIENT
        self.hold = False
        self.pending: list[tuple[Deferred[list[RecipientResult]], list[str]]] = []

    def results(self, addresses: list[str]) -> list[RecipientResult]:
        code = {DeliveryStatus.DELIVERED: "2.0.0", DeliveryStatus.TRANSIENT: "4.4.1"}
        return [
            RecipientResult(a, self.answer, code.get(self.answer, "5.1.1"), "X-hop; answer")
            for a in addresses
        ]

    def deliver(self, envelope: Envelope, recipients: Any, route: Route, path: Path) -> Any:
        addresses = [r.address for r in recipients]
        self.calls.append(addresses)
        if self.hold:
            d: Deferred[list[RecipientResult]] = Deferred()
            self.pending.append((d, addresses))
            return d
        return succeed(self.results(addresses))

    def finish(self) -> None:
        pending, self.pending = self.pending, []
        for d, addresses in pending:
            d.callback(self.results(addresses))


def harness(tmp_path: Path, hop: Hop, **options: Any) -> QueueHarness:
    routes = [RouteRule("example.org", "hop"), RouteRule("example.net", "hop")]
    return QueueHarness(tmp_path / "spool", {"hop": hop}, routes=routes, **options)


def control(h: QueueHarness) -> QueueControl:
    return QueueControl(h.spool, h.queue, h.clock)


def result(d: Any) -> Any:
    """What the Deferred (or coroutine) C{d} fired with; raise its failure."""
    return resultOf(d if isinstance(d, Deferred) else Deferred.fromCoroutine(d))


def one(h: QueueHarness, command: Any) -> dict[str, Any]:
    """The single result of a command on one entry."""
    [item] = result(command)["results"]
    return item


# -- hold and release ---------------------------------------------------------------------------


def test_hold_is_stored_survives_restart_and_release_delivers(tmp_path: Path) -> None:
    hop = Hop()
    h = harness(tmp_path, hop, minBackoff=60, maxBackoff=60)
    queueID = h.submit("alice@example.com", ["bob@example.org"])
    assert len(hop.calls) == 1  # refused: deferred
    c = control(h)
    item = one(h, c.hold([queueID]))
    assert item == {"queue_id": queueID, "ok": True, "changed": True, "result": "placed on hold"}
    assert h.envelope(queueID).held is True
    assert one(h, c.hold([queueID]))["result"] == "already on hold"
    h.clock.advance(600)
    assert len(hop.calls) == 1  # held: never attempted

    # A new queue manager on what the spool holds (a restart) leaves it alone too.
    h.stop()
    restarted = harness(tmp_path, hop, start=False, minBackoff=60, maxBackoff=60)
    restarted.spool.committed.update(h.spool.committed)
    restarted.queue.startService()
    restarted.clock.advance(600)
    assert len(hop.calls) == 1
    c = control(restarted)
    listed = result(c.entries())["entries"]
    assert [e["queue_name"] for e in listed] == ["hold"]

    hop.answer = DeliveryStatus.DELIVERED
    hop.hold = True
    assert one(restarted, c.release([queueID]))["result"] == "released"
    assert "held" not in restarted.spool.loadEnvelope(queueID).toDict()
    # Its next attempt's time has long passed: attempted at once.
    assert len(hop.calls) == 2
    hop.finish()
    assert restarted.queued() == []


def test_release_waits_for_the_next_attempt_time(tmp_path: Path) -> None:
    hop = Hop()
    h = harness(tmp_path, hop, minBackoff=600, maxBackoff=600)
    queueID = h.submit("alice@example.com", ["bob@example.org"])
    c = control(h)
    one(h, c.hold([queueID]))
    assert one(h, c.release([queueID]))["result"] == "released"
    assert one(h, c.release([queueID]))["result"] == "not on hold"
    h.clock.advance(599)
    assert len(hop.calls) == 1
    h.clock.advance(1)
    assert len(hop.calls) == 2


def test_hold_during_an_attempt_is_recorded_with_it(tmp_path: Path) -> None:
    hop = Hop()
    hop.hold = True
    h = harness(tmp_path, hop, minBackoff=60, maxBackoff=60)
    queueID = h.submit("alice@example.com", ["bob@example.org"])
    c = control(h)
    assert [e["queue_name"] for e in result(c.entries())["entries"]] == ["active"]
    item = one(h, c.hold([queueID]))
    assert item["result"] == "placed on hold (its delivery attempt in progress ends first)"
    assert h.envelope(queueID).held is True  # stored at once
    hop.finish()  # 4xx: recorded, still held
    envelope = h.envelope(queueID)
    assert envelope.held and envelope.attempts == 1
    h.clock.advance(3600)
    assert len(hop.calls) == 1


def test_commands_on_many_entries(tmp_path: Path) -> None:
    hop = Hop()
    h = harness(tmp_path, hop, minBackoff=600, maxBackoff=600)
    ids = [h.submit("alice@example.com", [f"u{i}@example.org"]) for i in range(3)]
    c = control(h)
    done = result(c.hold([], all_entries=True))
    assert done["count"] == 3 and [r["queue_id"] for r in done["results"]] == ids
    with pytest.raises(BadRequest, match="give queue ids or --all, not both"):
        result(c.hold(ids, all_entries=True))
    with pytest.raises(BadRequest, match="give one or more queue ids, or --all"):
        result(c.release())
    done = result(c.release(all_entries=True))
    assert done["count"] == 3
    unknown = result(c.hold([ids[0], "01K1HDPTVQRF0000ZZZZ", "nonsense"]))
    assert [(r["ok"], r["result"]) for r in unknown["results"]] == [
        (True, "placed on hold"),
        (False, "no such queue entry"),
        (False, "not a queue id: 'nonsense'"),
    ]
    assert unknown["count"] == 1


@pytest.mark.parametrize("command", ["hold", "release", "flush", "bounce"])
def test_commands_on_a_damaged_entry_move_it_aside(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, command: str
) -> None:
    """An entry whose envelope is damaged (queue list shows it as corrupt): a command on it
    says so in one line and moves it to the spool's corrupt/, as its next attempt would;
    it logged a critical traceback ('the operator's command failed') and left it there."""
    from twisted.logger import LogLevel, capturedLogs

    from mailrelay.errors import CorruptEntry

    hop = Hop()
    h = harness(tmp_path, hop, minBackoff=600, maxBackoff=600)
    queueID = h.submit("alice@example.com", ["bob@example.org"])  # deferred
    load = h.spool.loadEnvelope

    def damaged(wanted: str) -> Envelope:
        if wanted == queueID:
            raise CorruptEntry(f"envelope {wanted}.json is not a valid envelope: bad JSON",
                               queueID=wanted)
        return load(wanted)

    monkeypatch.setattr(h.spool, "loadEnvelope", damaged)
    with capturedLogs() as events:
        item = one(h, getattr(control(h), command)([queueID]))
    assert not item["ok"] and not item["changed"], item
    assert item["result"].startswith(f"damaged: envelope {queueID}.json is not a valid envelope")
    assert "moved to the spool's corrupt/" in item["result"], item
    assert not any(e["log_level"] >= LogLevel.critical for e in events), events
    assert queueID in h.spool.quarantined and queueID not in h.spool.committed


# -- flush ------------------------------------------------------------------------------------


def test_flush_ignores_the_next_attempt_time_but_not_a_hold(tmp_path: Path) -> None:
    hop = Hop()
    h = harness(tmp_path, hop, minBackoff=3600, maxBackoff=3600)
    org = h.submit("alice@example.com", ["bob@example.org"])
    net = h.submit("alice@example.com", ["carol@example.net"])
    held = h.submit("alice@example.com", ["dave@example.org"])
    c = control(h)
    one(h, c.hold([held]))
    assert len(hop.calls) == 3
    done = result(c.flush(domain="Example.NET"))
    assert [(r["queue_id"], r["result"]) for r in done["results"]] == [
        (net, "scheduled for delivery now")
    ]
    assert hop.calls[-1] == ["carol@example.net"]
    assert one(h, c.flush([held]))["result"] == "on hold (release it first)"
    done = result(c.flush())
    assert done == {"results": [], "count": 2}  # org and net, not the one on hold
    assert sorted(map(tuple, hop.calls[-2:])) == [("bob@example.org",), ("carol@example.net",)]
    assert h.envelope(org).attempts == 2 and h.envelope(held).attempts == 1
    with pytest.raises(BadRequest):
        result(c.flush([org], domain="example.org"))


def test_flushes_do_not_push_the_next_attempt_away(tmp_path: Path) -> None:
    """The next attempt is the message's age after this one, between min_backoff and
    max_backoff (Postfix's qmgr), however many attempts a flush made: three flushes of a
    young message leave its next attempt min_backoff away, not doubled three times."""
    hop = Hop()
    h = harness(tmp_path, hop, minBackoff=30, maxBackoff=4000)
    queueID = h.submit("alice@example.com", ["bob@example.org"])
    arrival = h.envelope(queueID).arrival
    c = control(h)
    for flushes in range(1, 4):
        h.clock.advance(1)
        one(h, c.flush([queueID]))
        assert h.envelope(queueID).attempts == flushes + 1
        assert h.envelope(queueID).nextAttempt == h.clock.seconds() + 30
    # Left alone, it is retried min_backoff after the last flush; from then on its age (more
    # than min_backoff) is the delay.
    for age in (33, 66):
        h.clock.advance(arrival + age - h.clock.seconds() - 1)
        assert len(hop.calls) == age // 33 + 3, f"retried before {age}s"
        h.clock.advance(1)
        assert len(hop.calls) == age // 33 + 4, f"not retried at {age}s"
        assert h.envelope(queueID).nextAttempt == arrival + 2 * age


@implementer(IDeliveryBackend)
class DeadHops:
    """Delivers through a real L{PerDestination} that suspends a next hop after one failure
    to reach it: a next hop in C{down} is unreachable, any other takes the mail."""

    def __init__(self, clock: Any) -> None:
        self.per = PerDestination(1, "test", clock, suspendTime=3600)
        self.down: set[str] = set()
        self.reached: list[str] = []
        #: The next hops it tried to reach, reached or not.
        self.tried: list[str] = []

    def deliver(self, envelope: Envelope, recipients: Any, route: Route, path: Path) -> Any:
        return self.per.run(route.nexthop, envelope, list(recipients), self._reach,
                            route.nexthop, list(recipients))

    def _reach(self, nexthop: str, recipients: list[Any]) -> Any:
        self.tried.append(nexthop)
        if nexthop in self.down:
            why = RecipientResult("", DeliveryStatus.TRANSIENT, "4.4.1", "X-hop; refused")
            self.per.unreachable(nexthop, why)
            return succeed(resultsForAll(recipients, why.status, why.code, why.diagnostic))
        self.per.reached(nexthop)
        self.reached.append(nexthop)
        return succeed(resultsForAll(recipients, DeliveryStatus.DELIVERED, "2.0.0", "250 ok"))

    def resumeSuspended(self, nexthop: str | None = None) -> None:
        self.per.resume(nexthop)


def deadHopsQueue(tmp_path: Path, routes: list[RouteRule]) -> tuple[QueueHarness, DeadHops]:
    """A running queue whose C{routes} go to the backend "hop", a L{DeadHops}; a first
    retry an hour away."""
    h = QueueHarness(tmp_path / "spool", {}, routes=routes, start=False,
                     minBackoff=3600, maxBackoff=3600)
    hop = DeadHops(h.clock)
    h.queue.deliverer.backends["hop"] = hop
    h.queue.startService()
    return h, hop


def test_flush_of_one_entry_resumes_only_its_own_suspended_next_hops(tmp_path: Path) -> None:
    """Flushing one entry (postqueue -i) tries its own suspended next hops again, not every
    one: Postfix's flush server marks only that queue file (UNTHROTTLE_AFTER), and qmgr
    unthrottles the queues its recipients resolve to (qmgr_message.c, QMGR_FLUSH_EACH); only
    postqueue -f and -s send QMGR_REQ_FLUSH_DEAD, which revives every dead destination."""
    h, hop = deadHopsQueue(tmp_path, [RouteRule("example.org", "hop", "a.example"),
                                      RouteRule("example.net", "hop", "b.example")])
    hop.down = {"a.example", "b.example"}
    org = h.submit("alice@example.com", ["bob@example.org"])
    net = h.submit("alice@example.com", ["carol@example.net"])
    hop.down = set()  # both come back up; both are still suspended
    c = control(h)
    assert one(h, c.flush([org]))["result"] == "scheduled for delivery now"
    assert hop.reached == ["a.example"] and org not in h.queued()
    later = h.submit("alice@example.com", ["dave@example.net"])
    assert hop.reached == ["a.example"]
    # (The failure's diagnostic, the reason after "delivery temporarily suspended: ", as
    # postqueue -j's delay_reason says it.)
    assert h.envelope(later).recipients[0].lastResult == "X-hop; refused"
    assert entryInfo(later, h.envelope(later), False)["recipients"][0]["delay_reason"] == (
        "delivery temporarily suspended: refused")
    assert net in h.queued()
    # A whole flush revives every suspended next hop, as postqueue -f does.
    assert result(c.flush()) == {"results": [], "count": 2}
    assert sorted(hop.reached) == ["a.example", "b.example", "b.example"]


def test_a_whole_flush_tries_a_dead_next_hop_again_once_not_once_per_message(
    tmp_path: Path,
) -> None:
    """A flush of the whole queue (postqueue -f) or of a domain (-s) revives every
    suspended next hop once, before its messages are tried (Postfix: mail_flush_deferred()
    and flush_send_path()'s UNTHROTTLE_BEFORE send one QMGR_REQ_FLUSH_DEAD), not once per
    message as the flush of one entry (-i) does: the first delivery that fails to reach it
    suspends it again, and its other messages are deferred at once.  Otherwise 50,000
    messages deferred to a dead next hop are each tried again, a retry storm of 50,000
    connections, or of 50,000 connect time-outs."""
    h, hop = deadHopsQueue(tmp_path, [RouteRule("example.org", "hop", "a.example")])
    hop.down = {"a.example"}
    ids = [h.submit("alice@example.com", [f"u{i}@example.org"]) for i in range(5)]
    assert hop.tried == ["a.example"]  # the first one suspended it
    c = control(h)
    assert result(c.flush()) == {"results": [], "count": 5}
    assert hop.tried == ["a.example"] * 2
    assert result(c.flush(domain="example.org"))["count"] == 5
    assert hop.tried == ["a.example"] * 3
    assert all(h.envelope(q).attempts == 3 for q in ids)
    assert all(h.envelope(q).recipients[0].reason is not None for q in ids[1:])
    # The flush of one entry still tries its own next hops again.
    one(h, c.flush([ids[0]]))
    assert hop.tried == ["a.example"] * 4


def test_flush_of_an_entry_being_delivered(tmp_path: Path) -> None:
    hop = Hop()
    hop.hold = True
    h = harness(tmp_path, hop)
    queueID = h.submit("alice@example.com", ["bob@example.org"])
    assert one(h, control(h).flush([queueID]))["result"] == "being delivered now"


# -- delete -----------------------------------------------------------------------------------


def test_delete_now_and_after_an_attempt(tmp_path: Path) -> None:
    hop = Hop()
    h = harness(tmp_path, hop, minBackoff=60, maxBackoff=60)
    idle = h.submit("alice@example.com", ["bob@example.org"])
    c = control(h)
    assert one(h, c.delete([idle]))["result"] == "deleted"
    assert h.queued() == []
    h.clock.advance(600)
    assert len(hop.calls) == 1 and h.notifications() == []

    hop.hold = True
    busy = h.submit("alice@example.com", ["carol@example.org"])
    item = one(h, c.delete([busy]))
    assert item["result"] == "deleted when its delivery attempt in progress ends"
    assert h.queued() == [busy]
    hop.finish()
    assert h.queued() == []


def test_delete_all_deferred(tmp_path: Path) -> None:
    hop = Hop()
    h = harness(tmp_path, hop, minBackoff=60, maxBackoff=60)
    deferred = h.submit("alice@example.com", ["bob@example.org"])
    held = h.submit("alice@example.com", ["carol@example.org"])
    c = control(h)
    one(h, c.hold([held]))
    done = result(c.delete(all_deferred=True))
    assert [r["queue_id"] for r in done["results"]] == [deferred]
    assert h.queued() == [held]


# -- bounce -----------------------------------------------------------------------------------


def test_bounce_returns_the_message_with_a_dsn(tmp_path: Path) -> None:
    hop = Hop()
    h = harness(tmp_path, hop, minBackoff=60, maxBackoff=60)
    queueID = h.submit("alice@example.com", ["bob@example.org", "carol@example.org"])
    c = control(h)
    one(h, c.hold([queueID]))  # a message on hold can be returned too
    assert one(h, c.bounce([queueID]))["result"] == "returned to the sender"
    assert h.queued() == [n.queueID for n, _ in h.notifications()]
    [(dsn, message)] = h.notifications()
    assert [r.address for r in dsn.recipients] == ["alice@example.com"]
    assert b"Action: failed" in message and f"Status: {RETURNED_STATUS}".encode() in message
    assert b"returned to the sender by the mail system's operator" in message


def test_bounce_after_an_attempt_in_progress(tmp_path: Path) -> None:
    hop = Hop()
    hop.hold = True
    h = harness(tmp_path, hop, minBackoff=60, maxBackoff=60)
    queueID = h.submit("alice@example.com", ["bob@example.org"])
    item = one(h, control(h).bounce([queueID]))
    assert item["result"] == "returned to the sender when its delivery attempt in progress ends"
    assert h.notifications() == []
    hop.finish()  # 4xx; then returned
    assert len(h.notifications()) == 1 and queueID not in h.queued()


def test_bounce_of_a_bounce_is_discarded_without_postmaster(tmp_path: Path) -> None:
    hop = Hop()
    h = harness(tmp_path, hop)
    queueID = h.submit("", ["alice@example.org"])
    assert one(h, control(h).bounce([queueID]))["result"] == "returned to the sender"
    assert h.queued() == [] and h.notifications() == []


# -- on a real spool whose batches wait --------------------------------------------------------


class SpoolThreads:
    """The spool's C{deferToThread}: its batches run when the test says (L{runAll})."""

    def __init__(self) -> None:
        self.calls: list[tuple[Any, tuple[Any, ...], Deferred[Any]]] = []

    def __call__(self, f: Any, *args: Any) -> Deferred[Any]:
        d: Deferred[Any] = Deferred()
        self.calls.append((f, args, d))
        return d

    def runAll(self) -> None:
        while self.calls:
            f, args, d = self.calls.pop(0)
            d.callback(f(*args))


class SpoolQueue:
    """A queue manager over a real L{Spool} on a C{Clock}, whose batches run when the test
    says (C{threads}), delivering through a L{FakeBackend} (C{backend}); C{control} its
    L{QueueControl}."""

    def __init__(self, tmp_path: Path) -> None:
        from twisted.internet.task import Clock

        from mailrelay.spool import Spool
        from tests.test_queue import START, FakeBackend, FakeRouter, makeManager

        self.clock = Clock()
        self.clock.advance(START)
        self.threads = SpoolThreads()
        self.directory = tmp_path / "spool"
        self.spool = Spool(self.directory, reactor=self.clock, deferToThread=self.threads,
                           syncMethod="fsync")
        self.spool.start()
        self.backend = FakeBackend()
        self.manager = makeManager(self.spool, FakeRouter(), {"smtp": self.backend}, self.clock)
        self.manager.startService()
        self.control = QueueControl(self.spool, self.manager, self.clock)

    def queue(self, address: str) -> str:
        """Commit a message to C{address} and hand it to the queue manager."""
        from mailrelay.envelope import Recipient
        from tests.test_queue import MESSAGE

        writer = self.spool.openMessage()
        writer.write(MESSAGE)
        envelope = Envelope(sender="alice@example.com", recipients=[Recipient(address, address)],
                            queueID=writer.queueID, arrival=self.clock.seconds())
        d = writer.commit(envelope)
        self.threads.runAll()
        resultOf(d)
        self.manager.enqueue(writer.queueID)
        self.threads.runAll()
        return writer.queueID

    def run(self, command: str, ids: list[str]) -> dict[str, Any]:
        """The answer of the control's C{command} on C{ids}, the spool's batches run."""
        d = Deferred.fromCoroutine(getattr(self.control, command)(ids))
        self.threads.runAll()
        return resultOf(d)


# -- an entry whose removal is under way ------------------------------------------------------


@pytest.mark.parametrize("busy", [False, True], ids=["idle", "busy"])
@pytest.mark.parametrize("command", ["hold", "release", "delete", "bounce", "flush"])
def test_a_command_while_the_attempt_removes_the_entry_finds_it_gone(
    tmp_path: Path, command: str, busy: bool
) -> None:
    """Its last recipient delivered, the attempt has asked the spool to remove the entry; a
    command on it before the attempt ends finds it gone.  A hold (or release) stored its
    envelope after the removal: the update failed (a critical traceback for the operator's
    command) or, when the spool's batch in flight made both wait for the next one, brought the
    .json back without its .eml (a delivered message back as a damaged entry); a delete or
    bounce said it would be done when the attempt ends, a flush that it was being delivered."""
    from twisted.logger import LogLevel, capturedLogs

    q = SpoolQueue(tmp_path)
    q.backend.hold = True
    q.backend.script["later@example.net"] = ["4"]
    other = q.queue("later@example.net") if busy else None
    queueID = q.queue("bob@example.org")
    if command == "release":
        assert q.run("hold", [queueID])["results"][0]["result"].startswith("placed on hold")
    if busy:
        q.backend.release(1)  # deferred: its envelope update is the spool's batch in flight
    q.backend.release()  # delivered: the removal is submitted
    assert q.spool.queueIDs() == sorted(filter(None, [queueID, other]))  # not done yet
    with capturedLogs() as events:
        [item] = q.run(command, [queueID])["results"]
    assert item == {
        "queue_id": queueID, "ok": False, "changed": False, "result": "no such queue entry"
    }
    assert not any(e["log_level"] >= LogLevel.critical for e in events), events
    q.clock.advance(86400)
    q.threads.runAll()
    assert queueID not in q.spool.queueIDs()
    assert not list((q.directory / "queue").glob(f"{queueID}.*"))
    assert [call.addresses for call in q.backend.calls if call.queueID == queueID] == [
        ["bob@example.org"]
    ]
    assert q.backend.bounces() == []
    q.spool.stop()


# -- an id given more than once ----------------------------------------------------------------


def test_an_id_given_twice_is_taken_once(tmp_path: Path) -> None:
    """As postsuper -d X -d X ("Deleted: 1 message"): an id given again is not a second
    command on it.  The second ran while the first waited for the spool and found "another
    command on X is in progress": the whole command failed after its work was done, with no
    result for any id."""
    q = SpoolQueue(tmp_path)
    for address in ("bob@example.org", "carol@example.org", "dave@example.org"):
        q.backend.script[address] = ["4"]
    a, b, c = (q.queue(address) for address in ("bob@example.org", "carol@example.org",
                                                 "dave@example.org"))

    def results(answer: dict[str, Any]) -> tuple[list[tuple[str, str]], int]:
        return [(r["queue_id"], r["result"]) for r in answer["results"]], answer["count"]

    held = [(a, "placed on hold"), (b, "placed on hold")]
    assert results(q.run("hold", [a, a, b])) == (held, 2)
    assert results(q.run("release", [b, a, b])) == ([(b, "released"), (a, "released")], 2)
    assert results(q.run("bounce", [c, c])) == ([(c, "returned to the sender")], 1)
    assert results(q.run("delete", [a, b, a])) == ([(a, "deleted"), (b, "deleted")], 2)
    assert [call.queueID for call in q.backend.calls if not call.isBounce] == [a, b, c]
    assert [call.addresses for call in q.backend.bounces()] == [["alice@example.com"]]
    assert q.spool.queueIDs() == []
    q.spool.stop()


# -- when the queue manager cannot act ------------------------------------------------------


def test_commands_refused_while_the_manager_does_not_deliver(tmp_path: Path) -> None:
    hop = Hop()
    h = harness(tmp_path, hop, start=False)
    c = control(h)
    with pytest.raises(QueueUnavailable, match="the queue manager is not started"):
        result(c.hold(["01K1HDPTVQRF0000ZZZZ"]))

    class Lock:
        path = tmp_path / "qmgr.lock"

        def acquire(self) -> Deferred[None]:
            return Deferred()

        def holder(self) -> str:
            return "4242"

        def release(self) -> None:
            pass

    h.queue.lock = Lock()
    h.queue.startService()
    with pytest.raises(QueueUnavailable, match="waiting for the queue lock, held by process 4242"):
        result(c.delete(["01K1HDPTVQRF0000ZZZZ"]))
    assert result(c.status())["manager"] == "waiting for the queue lock"

    offline = QueueControl(h.spool, None, h.clock, unavailable="no queue manager runs: hold")
    with pytest.raises(QueueUnavailable, match="no queue manager runs: hold"):
        result(offline.flush())
    assert result(offline.entries()) == {"entries": [], "next": None}


# -- the views --------------------------------------------------------------------------------


def test_entries_pages_and_states(tmp_path: Path) -> None:
    hop = Hop()
    h = harness(tmp_path, hop, minBackoff=600, maxBackoff=600)
    deferred = h.submit("alice@example.com", ["bob@example.org"])
    held = h.submit("alice@example.com", ["carol@example.org"])
    hop.hold = True
    active = h.submit("", ["dave@example.org"])
    hop.hold = False
    c = control(h)
    one(h, c.hold([held]))
    first = result(c.entries(limit=2))
    assert [e["queue_id"] for e in first["entries"]] == [deferred, held]
    assert first["next"] == held
    second = result(c.entries(cursor=first["next"], limit=2))
    assert [e["queue_id"] for e in second["entries"]] == [active] and second["next"] is None
    names = {e["queue_id"]: e["queue_name"] for e in first["entries"] + second["entries"]}
    assert names == {deferred: "deferred", held: "hold", active: "active"}
    entry = first["entries"][0]
    envelope = h.envelope(deferred)
    assert entry == {
        "queue_name": "deferred",
        "queue_id": deferred,
        "arrival_time": int(envelope.arrival),
        "message_size": envelope.messageSize,
        "sender": "alice@example.com",
        "attempts": 1,
        "next_attempt": int(envelope.nextAttempt),
        "recipients": [{"address": "bob@example.org", "state": "pending", "status": "4.4.1",
                        "attempts": 1, "delay_reason": "X-hop; answer"}],
    }
    with pytest.raises(BadRequest):
        result(c.entries(limit=0))
    status = result(c.status())
    assert status["messages"] == 3 and status["recipients"] == 3
    assert status["queues"] == {"active": 1, "incoming": 0, "deferred": 1, "hold": 1,
                                "corrupt": 0}


def test_show(tmp_path: Path) -> None:
    hop = Hop()
    h = harness(tmp_path, hop)
    queueID = h.submit("alice@example.com", ["bob@example.org"],
                       b"Subject: hi\r\nX-Long: " + b"y" * 100 + b"\r\n\r\nthe body\r\n")
    c = control(h)
    shown = result(c.show(queueID))
    assert shown["entry"]["queue_id"] == queueID and shown["envelope"]["sender"] == "alice@example.com"
    assert shown["headers"].startswith("Received: ") and shown["headers"].endswith("\r\n")
    assert "Subject: hi\r\n" in shown["headers"] and "body" not in shown
    assert result(c.show(queueID, body=True))["body"] == "the body\r\n"
    with pytest.raises(UnknownEntry, match="no queue entry 01K1HDPTVQRF0000ZZZZ"):
        result(c.show("01K1HDPTVQRF0000ZZZZ"))
    with pytest.raises(UnknownEntry, match="not a queue id"):
        result(c.show("../etc/passwd"))


def test_summary_by_domain_and_age(tmp_path: Path) -> None:
    hop = Hop()
    h = harness(tmp_path, hop, minBackoff=86400, maxBackoff=86400)
    h.submit("alice@example.com", ["a@example.org", "b@example.org", "c@example.net"])
    h.clock.advance(7 * 60)  # 7 minutes later
    h.submit("bob@example.com", ["d@example.org"])
    h.clock.advance(2000 * 60)
    h.submit("", ["e@example.net"])
    c = control(h)
    summary = result(c.summary())
    assert summary["labels"] == ["T", "5", "10", "20", "40", "80", "160", "320", "640", "1280",
                                 "1280+"]
    # now: the messages are 2007, 2000 and 0 minutes old
    assert summary["total"] == [3, 1, 0, 0, 0, 0, 0, 0, 0, 0, 2]
    assert summary["rows"] == [
        ["example.net", 2, 1, 0, 0, 0, 0, 0, 0, 0, 0, 1],
        ["example.org", 2, 0, 0, 0, 0, 0, 0, 0, 0, 0, 2],
    ]
    senders = result(c.summary(senders=True))
    assert [row[0] for row in senders["rows"]] == ["example.com", "MAILER-DAEMON"]
    assert result(c.summary(states=["hold"]))["total"][0] == 0
    with pytest.raises(BadRequest, match="unknown queue 'bogus'"):
        result(c.summary(states=["bogus"]))


# -- the AMP commands, over iosim ---------------------------------------------------------------


def connected(locator: Any) -> tuple[amp.AMP, iosim.IOPump]:
    """An AMP client connected (in memory) to a server answering with C{locator}."""
    client, _, pump = iosim.connectedServerAndClient(
        lambda: QuietAMP(locator=locator), QuietAMP
    )
    return client, pump


def call(client: amp.AMP, pump: iosim.IOPump, command: Any, **arguments: Any) -> Any:
    """C{command}'s answer (its callbacks are added before the answer comes, as AMP
    wants: an error nobody handles by then drops the connection)."""
    answers: list[Any] = []
    client.callRemote(command, **arguments).addBoth(answers.append)
    pump.flush()
    [answer] = answers
    if isinstance(answer, Failure):
        answer.raiseException()
    return answer


def test_queue_commands_over_amp(tmp_path: Path) -> None:
    hop = Hop()
    h = harness(tmp_path, hop, minBackoff=600, maxBackoff=600)
    ids = [h.submit("alice@example.com", [f"user{i}-{'x' * 200}@example.org"]) for i in range(400)]
    client, pump = connected(ControlLocator(control(h)))
    page = call(client, pump, QueueList, cursor=None, limit=1000)["result"]
    assert [e["queue_id"] for e in page["entries"]] == ids  # far more than 64 KiB
    done = call(client, pump, QueueHold, ids=ids[:2], all_entries=False)["result"]
    assert done["count"] == 2
    status = call(client, pump, QueueStatus)["result"]
    assert status["queues"]["hold"] == 2 and status["pid"] == os.getpid()
    with pytest.raises(UnknownEntry, match="no queue entry 01K1HDPTVQRF0000ZZZZ"):
        call(client, pump, QueueShow, queueID="01K1HDPTVQRF0000ZZZZ", body=False)
    with pytest.raises(BadRequest, match="give one or more queue ids"):
        call(client, pump, QueueBounce, ids=[])
    h.stop()
    with pytest.raises(QueueUnavailable, match="the queue manager is stopped"):
        call(client, pump, QueueHold, ids=ids[:1], all_entries=False)


def test_a_command_on_every_entry_keeps_only_its_workers_in_memory() -> None:
    """A command on many entries (hold --all, release --all, delete --all-deferred on a
    queue of 50,000) runs a few at once (_CONCURRENCY) from one list of ids: it started a
    coroutine for every id up front, each waiting for its turn, 83 MiB of them for 50,000
    ids before the first was done (the delivery process grew from 55 to 174 MiB).  Also:
    once the queue manager becomes unavailable, no further id is tried."""
    import tracemalloc

    from mailrelay.queue import control as module
    from mailrelay.queue.manager import Done

    pending: list[Deferred[Done]] = []
    calls: list[str] = []

    def command(queueID: str) -> Deferred[Done]:
        calls.append(queueID)
        pending.append(Deferred())
        return pending[-1]

    c = object.__new__(QueueControl)
    ids = [f"01K1HDPTVQRF{n:04d}ZZZZ" for n in range(5000)]
    tracemalloc.start()
    try:
        before = tracemalloc.get_traced_memory()[0]
        done = Deferred.fromCoroutine(c._each(ids, command))
        started = tracemalloc.get_traced_memory()[0] - before
    finally:
        tracemalloc.stop()
    assert len(calls) == module._CONCURRENCY
    assert started < 1_000_000, f"{started} bytes for {len(ids)} ids waiting"
    while pending:
        pending.pop(0).callback(Done(True, "placed on hold"))
    out = result(done)
    assert out["count"] == len(ids) and [r["queue_id"] for r in out["results"]] == ids
    # The queue manager stops meanwhile: the commands in flight end, no other starts.
    calls.clear()
    done = Deferred.fromCoroutine(c._each(ids, command))
    pending.pop(0).errback(QueueUnavailable("the queue manager is stopped"))
    while pending:
        pending.pop(0).callback(Done(True, "placed on hold"))
    with pytest.raises(QueueUnavailable, match="stopped"):
        result(done)
    assert len(calls) == module._CONCURRENCY


def test_the_views_of_the_whole_queue_read_it_a_chunk_at_a_time(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """status, summary and the commands on every entry that matches (release --all,
    flush --domain, delete --all-deferred) read the queue _SCAN_CHUNK envelopes at a time
    and look at each chunk before reading the next: they read every envelope of the queue
    into one list first, 50,000 of them in memory at once for a queue of 50,000 (more with
    many recipients each), where Postfix's qshape and postsuper read a file at a time."""
    from mailrelay.queue import control as module

    monkeypatch.setattr(module, "_SCAN_CHUNK", 2, raising=False)
    h = harness(tmp_path, Hop(), minBackoff=3600, maxBackoff=3600)
    ids = [h.submit("alice@example.com", [f"u{n}@example.org"]) for n in range(5)]
    c = control(h)
    loads: list[str] = []
    load = h.spool.loadEnvelope

    def counted(queueID: str) -> Envelope:
        loads.append(queueID)
        return load(queueID)

    monkeypatch.setattr(h.spool, "loadEnvelope", counted)
    seen: list[str] = []

    def looked(queueID: str, envelope: Envelope) -> bool:
        seen.append(queueID)
        assert len(loads) - len(seen) < 2, (loads, seen)
        return queueID != ids[2]

    assert result(c._matching(looked)) == [q for q in ids if q != ids[2]]
    assert seen == ids == loads
    status = result(c.status())
    assert status["messages"] == 5 and status["recipients"] == 5
    assert result(c.summary())["total"][0] == 5


def test_json_argument_round_trip() -> None:
    """A value of any size, split over AMP values of at most 64 KiB."""
    Echo = makeCommand(b"echo", "Echo.", (b"value", JSON()), errors={})

    class Locator(amp.CommandLocator):
        @Echo.responder
        def echo(self, value: Any) -> dict[str, Any]:
            return {"result": value}

    client, pump = connected(Locator())
    for value in (None, "", {"a": [1, 2.5, True]}, "é" * 100_000, ["x" * 70_000, "y"]):
        assert call(client, pump, Echo, value=value)["result"] == value
    box: dict[bytes, bytes] = {}
    JSON().toBox(b"v", box, {"v": "z" * 130_000}, None)
    assert sorted(box) == [b"v", b"v.1", b"v.2"] and all(len(p) <= 65535 for p in box.values())


# -- the control socket's guards -----------------------------------------------------------------


def test_stale_socket_is_removed_live_one_refused(tmp_path: Path) -> None:
    from mailrelay.app.control import ControlService

    path = tmp_path / "control.sock"
    listening = socket.socket(socket.AF_UNIX)
    listening.bind(str(path))
    listening.listen()
    try:
        with pytest.raises(OSError, match="another relay is running on this spool"):
            ControlService._removeStale(str(path))
    finally:
        listening.close()
    assert path.exists()  # closed, the file stays: a relay that died
    ControlService._removeStale(str(path))
    assert not path.exists()
    path.write_text("not a socket")
    with pytest.raises(OSError, match="exists and is not a socket"):
        ControlService._removeStale(str(path))


def test_socket_path_too_long(tmp_path: Path) -> None:
    from mailrelay.app.control import ControlService

    service = ControlService(relay=None, spoolDirectory=tmp_path / ("d" * 120))
    with pytest.raises(OSError, match="more than the 107 a UNIX socket's path may be"):
        service.listen()


def test_a_socket_that_cannot_be_removed_at_the_stop_is_a_warning(tmp_path: Path) -> None:
    """The spool's file system gone read-only (or an I/O error): removing the control
    socket at the stop fails.  One warning naming the socket and the error, and the stop
    goes on; it was a critical "stopping control failed" with a traceback."""
    from twisted.internet.defer import fail
    from twisted.logger import LogLevel, capturedLogs, formatEvent

    from mailrelay.app.control import ControlService

    service = ControlService(relay=None, spoolDirectory=tmp_path)

    class Port:
        def stopListening(self) -> Any:
            return fail(OSError(30, "Read-only file system", str(service.path)))

    service.port = Port()
    service.running = True
    with capturedLogs() as events:
        assert result(service.stopService()) is None
    (event,) = events
    assert event["log_level"] == LogLevel.warn
    assert formatEvent(event) == (
        f"control socket {service.path}: removing it at the stop failed: Read-only file "
        "system; the next start replaces it")


class FullDiskReactor:
    """A reactor (its clock a L{Clock}) whose C{listenUNIX} fails as on a file system with
    no inode left (ENOSPC) C{failures} times, then makes the socket's file."""

    def __init__(self, failures: int) -> None:
        from twisted.internet.task import Clock

        self.clock = Clock()
        self.failures = failures
        self.callLater = self.clock.callLater
        self.seconds = self.clock.seconds

    def listenUNIX(self, path: str, factory: Any, mode: int) -> Any:
        from twisted.internet.error import CannotListenError

        if self.failures:
            self.failures -= 1
            raise CannotListenError(None, path, OSError(28, "No space left on device"))
        Path(path).touch()

        class Port:
            def stopListening(self) -> Any:
                os.unlink(path)
                return succeed(None)

        return Port()


def test_a_control_socket_the_full_spool_has_no_room_for_is_made_once_there_is(
    tmp_path: Path,
) -> None:
    """No inode left on the spool's file system when the relay starts (another process
    filled it, the relay's own socket removed at its last stop): the relay starts all the
    same -- its queue is delivered, which frees space -- as its spool does on a full disk,
    and makes its control socket as soon as there is room, trying every 10 seconds.  It
    refused to start: what was queued waited for the operator."""
    from types import SimpleNamespace

    from twisted.logger import LogLevel, capturedLogs, formatEvent

    from mailrelay.app.control import ControlService

    reactor = FullDiskReactor(failures=2)
    service = ControlService(SimpleNamespace(reactor=reactor), tmp_path)
    with capturedLogs() as events:
        service.privilegedStartService()  # (no SystemExit)
        assert service.port is None and not service.path.exists()
        reactor.clock.advance(10)
        assert service.port is None
        reactor.clock.advance(10)
    assert service.port is not None and service.path.exists()
    assert [(e["log_level"], formatEvent(e)) for e in events] == [
        (LogLevel.error, f"cannot listen on the control socket {service.path}: [Errno 28] No "
         "space left on device; the relay runs without it (the mailrelay command cannot reach "
         "it) and tries again every 10 seconds"),
        (LogLevel.info, f"control socket {service.path}"),
    ]
    assert reactor.clock.getDelayedCalls() == []
    service.running = True
    result(service.stopService())
    assert not service.path.exists()
    # Stopped while it still has no room: it tries no more.
    reactor = FullDiskReactor(failures=1)
    service = ControlService(SimpleNamespace(reactor=reactor), tmp_path)
    with capturedLogs():
        service.privilegedStartService()
    result(service.stopService())
    assert reactor.clock.getDelayedCalls() == []


def test_peer_credentials_and_refusal(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    from mailrelay.app import control as controlModule

    a, b = socket.socketpair()

    class Handle:
        def getHandle(self) -> socket.socket:
            return a

    try:
        assert controlModule.peerCredentials(Handle()) == (os.getpid(), os.getuid(), os.getgid())
    finally:
        a.close()
        b.close()

    service = controlModule.ControlService(relay=None, spoolDirectory=tmp_path)
    monkeypatch.setattr(controlModule, "peerCredentials", lambda transport: (99, 4242, 4242))
    protocol = controlModule.ControlProtocol(service)
    transport = StringTransport()
    protocol.makeConnection(transport)
    # (Its every command is refused, saying why: test_mailq_users_may_list_the_queue_...)
    assert not transport.disconnecting and protocol.locator.may == "none"
    monkeypatch.setattr(controlModule, "peerCredentials", lambda t: (99, os.geteuid(), 0))
    allowed = controlModule.ControlProtocol(service)
    transport = StringTransport()
    allowed.makeConnection(transport)
    assert not transport.disconnecting and allowed in service.connections


class ListingRelay:
    """A relay answering each queue command with its name, with C{[spool] mailq_users}."""

    def __init__(self, mailqUsers: Any) -> None:
        from types import SimpleNamespace

        self.config = SimpleNamespace(mailqUsers=mailqUsers)
        self.asked: list[Any] = []

    def queueCommand(self, command: Any, arguments: dict[str, Any]) -> Deferred[Any]:
        self.asked.append(command)
        return succeed(command.commandName.decode())

    def status(self) -> Deferred[Any]:
        self.asked.append("status")
        return succeed({})


def test_mailq_users_may_list_the_queue_and_nothing_else(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    """Postfix's authorized_mailq_users (default static:anyone): any local user may list
    the queue (postqueue -p, mailq), while postsuper's delete and hold, and the rest, are
    root's (and the relay's user's).  [spool] mailq_users says who: None (anyone), user ids,
    or none; a user not in it is refused at connect, as every other user was."""
    from mailrelay.app import control as controlModule

    monkeypatch.setattr(controlModule, "peerCredentials", lambda t: (99, 4242, 4242))
    for users in (None, (7, 4242)):
        relay = ListingRelay(users)
        service = controlModule.ControlService(relay, tmp_path)
        client, _, pump = iosim.connectedServerAndClient(
            lambda: controlModule.ControlProtocol(service), QuietAMP)
        assert call(client, pump, QueueList, cursor=None, limit=10)["result"] == "queue-list"
        for command, arguments in (
            (QueueFlush, {"ids": [], "domain": None}), (QueueShow, {"queueID": "x", "body": False}),
            (QueueDelete, {"ids": ["x"], "all_deferred": False}),
            (QueueHold, {"ids": ["x"], "all_entries": False}), (QueueStatus, {}),
            (controlModule.Status, {}), (controlModule.Reload, {}), (controlModule.Stop, {}),
        ):
            with pytest.raises(NotPermitted, match=(
                    f"permission denied: {command.commandName.decode()} is for root and the "
                    "relay's user; other users may only list the queue")):
                call(client, pump, command, **arguments)
        assert relay.asked == [QueueList], users
    for users in ((), (7,)):
        relay = ListingRelay(users)
        service = controlModule.ControlService(relay, tmp_path)
        client, _, pump = iosim.connectedServerAndClient(
            lambda: controlModule.ControlProtocol(service), QuietAMP)
        for command, arguments in ((QueueList, {"cursor": None, "limit": 10}),
                                   (controlModule.Status, {})):
            with pytest.raises(NotPermitted, match=(
                    r"permission denied: the control socket is for root, the relay's user and "
                    r"the users of \[spool\] mailq_users")):
                call(client, pump, command, **arguments)
        assert relay.asked == [], users


def test_a_reload_that_removes_a_mailq_user_refuses_its_open_connection(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    """A connection's rights are those of the running [spool] mailq_users at each request,
    as Postfix's showq checks authorized_mailq_users at each one: a user removed by a
    reload could go on listing the queue on the connection it had opened before (and one
    added may list on its open connection)."""
    from types import SimpleNamespace

    from twisted.logger import capturedLogs, formatEvent

    from mailrelay.app import control as controlModule

    monkeypatch.setattr(controlModule, "peerCredentials", lambda t: (99, 4242, 4242))
    relay = ListingRelay((4242,))
    service = controlModule.ControlService(relay, tmp_path)
    client, _, pump = iosim.connectedServerAndClient(
        lambda: controlModule.ControlProtocol(service), QuietAMP)
    assert call(client, pump, QueueList, cursor=None, limit=10)["result"] == "queue-list"
    relay.config = SimpleNamespace(mailqUsers=(7,))  # reloaded
    with capturedLogs() as events, pytest.raises(NotPermitted, match=(
            r"permission denied: the control socket is for root, the relay's user and "
            r"the users of \[spool\] mailq_users")):
        call(client, pump, QueueList, cursor=None, limit=10)
    assert relay.asked == [QueueList]
    assert [formatEvent(e) for e in events] == [
        "control socket: request of process 99 of user 4242 refused: the user is not in "
        "[spool] mailq_users (any more)"]
    relay.config = SimpleNamespace(mailqUsers=None)  # reloaded: anyone
    assert call(client, pump, QueueList, cursor=None, limit=10)["result"] == "queue-list"

def test_other_users_list_the_queue_a_page_at_a_time(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    """A user of [spool] mailq_users lists the queue in pages of at most LIST_PAGE entries,
    as the mailrelay command asks them: a larger limit (the whole queue read, and answered,
    at once: a local user's way to take the relay's memory and time) is refused, saying
    why; root's and the relay's user's are not bounded."""
    from mailrelay.app import control as controlModule
    from mailrelay.queue.commands import LIST_PAGE

    uid = [4242]
    monkeypatch.setattr(controlModule, "peerCredentials", lambda t: (99, uid[0], uid[0]))
    relay = ListingRelay(None)
    service = controlModule.ControlService(relay, tmp_path)
    client, _, pump = iosim.connectedServerAndClient(
        lambda: controlModule.ControlProtocol(service), QuietAMP)
    assert call(client, pump, QueueList, cursor=None, limit=LIST_PAGE)["result"] == "queue-list"
    with pytest.raises(NotPermitted, match=(
            f"permission denied: other users list the queue {LIST_PAGE} entries at a time, "
            f"not {LIST_PAGE + 1}")):
        call(client, pump, QueueList, cursor=None, limit=LIST_PAGE + 1)
    assert relay.asked == [QueueList]
    uid[0] = os.geteuid()
    client, _, pump = iosim.connectedServerAndClient(
        lambda: controlModule.ControlProtocol(service), QuietAMP)
    call(client, pump, QueueList, cursor=None, limit=10 * LIST_PAGE)
    assert relay.asked == [QueueList, QueueList]


def test_other_users_hold_no_more_than_a_few_connections_and_short_requests(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    """The socket is open to every local user ([spool] mailq_users): one of them, whether
    he may list the queue or not, must not take the relay's descriptors by holding
    connections open, nor its memory by a request that never ends (AMP bounds each key and
    value, not their number).  Past L{MAX_OTHER_CONNECTIONS} of theirs at once, or
    L{MAX_OTHER_REQUEST} octets of an unfinished request, the connection is closed and
    logged; root's and the relay's user's are not counted nor bounded."""
    from twisted.internet.error import ConnectionDone
    from twisted.logger import capturedLogs

    from mailrelay.app import control as controlModule

    uid = [4242]
    monkeypatch.setattr(controlModule, "peerCredentials", lambda t: (99, uid[0], uid[0]))
    for users in (None, ()):  # (may list, or may do nothing)
        service = controlModule.ControlService(ListingRelay(users), tmp_path)
        uid[0] = 4242
        transports, protocols = [], []
        with capturedLogs() as events:
            for _ in range(controlModule.MAX_OTHER_CONNECTIONS + 1):
                transport = StringTransport()
                protocols.append(controlModule.ControlProtocol(service))
                protocols[-1].makeConnection(transport)
                transports.append(transport)
        assert [t.disconnecting for t in transports] == [False] * (
            controlModule.MAX_OTHER_CONNECTIONS) + [True], users
        assert any("too many connections" in str(e.get("log_format")) for e in events)
        uid[0] = os.geteuid()  # (the relay's user: always served)
        transport = StringTransport()
        controlModule.ControlProtocol(service).makeConnection(transport)
        assert not transport.disconnecting, users
        uid[0] = 4242
        # (One of theirs ends: room for one.)
        protocols[0].connectionLost(Failure(ConnectionDone()))
        transport = StringTransport()
        protocol = controlModule.ControlProtocol(service)
        protocol.makeConnection(transport)
        assert not transport.disconnecting, users

        # A request that never ends: many keys, none the empty one that ends a box.
        chunk = b"".join(
            struct.pack("!H", len(k)) + k + struct.pack("!H", 1000) + b"v" * 1000
            for k in (b"k%d" % i for i in range(64))
        )
        sent = 0
        with capturedLogs() as events:
            while not transport.disconnecting and sent <= 2 * controlModule.MAX_OTHER_REQUEST:
                protocol.dataReceived(chunk)
                sent += len(chunk)
        assert transport.disconnecting, users
        assert sent <= controlModule.MAX_OTHER_REQUEST + len(chunk)
        assert any("request longer than" in str(e.get("log_format")) for e in events)


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="SO_PEERCRED is Linux's")
def test_the_socket_and_the_spool_let_the_mailq_users_reach_it(tmp_path: Path) -> None:
    """The socket was mode 0600 in a spool directory of mode 0700: no other user could
    list the queue.  With mailq users, the socket is open to all (the relay tells users
    apart) and the spool directory searchable, not readable; without, it stays as it was."""
    import stat

    from twisted.internet.task import Clock
    from twisted.internet.testing import MemoryReactor

    from mailrelay.app.control import ControlService

    class BindingReactor(MemoryReactor, Clock):
        """Makes the socket's file, as the real listenUNIX does."""

        def __init__(self) -> None:
            MemoryReactor.__init__(self)
            Clock.__init__(self)

        def listenUNIX(self, address: str, *args: Any, **kwargs: Any) -> Any:
            with socket.socket(socket.AF_UNIX) as bound:
                bound.bind(address)
            return super().listenUNIX(address, *args, **kwargs)

    for users, searchable in ((None, 0o011), ((7,), 0o011), ((), 0)):
        spool = tmp_path / f"spool-{len(list(tmp_path.iterdir()))}"
        spool.mkdir(mode=0o700)
        relay = ListingRelay(users)
        relay.reactor = BindingReactor()  # type: ignore[attr-defined]
        ControlService(relay, spool).listen()
        (server,) = relay.reactor.unixServers  # type: ignore[attr-defined]
        assert server[3] == 0o666, users
        assert stat.S_IMODE(spool.stat().st_mode) == 0o700 | searchable, users


def test_delivery_process_unavailable_reasons() -> None:
    from twisted.internet.task import Clock

    from mailrelay.queue.process import DeliveryProcessService

    service = DeliveryProcessService(Clock(), None, {}, hold=True)
    with pytest.raises(QueueUnavailable, match=r"no delivery process runs: \[queue\] hold"):
        result(service.queueCommand(QueueStatus, {}))
    assert service.describe()["state"] == "off"
    service.hold = False
    with pytest.raises(QueueUnavailable, match="the delivery process is not running"):
        result(service.queueCommand(QueueStatus, {}))


# -- the mailrelay command ----------------------------------------------------------------------


def test_spool_directory_found_like_the_relay(tmp_path: Path, monkeypatch: pytest.MonkeyPatch
                                              ) -> None:
    from mailrelay.app.cli import CommandFailed, spoolDirectory

    monkeypatch.chdir(tmp_path)
    assert spoolDirectory(None, None) == tmp_path / "mailrelay-spool"
    assert spoolDirectory(None, "s") == tmp_path / "s"
    etc = tmp_path / "etc"
    etc.mkdir()
    (etc / "relay.toml").write_text('[spool]\ndirectory = "queue"\n[limits]\nrecipients = "x"\n')
    # relative to the file; an error elsewhere in it does not matter here
    assert spoolDirectory(str(etc / "relay.toml"), None) == etc / "queue"
    (etc / "bad.toml").write_text("[spool]\ndirectory = 3\n")
    with pytest.raises(CommandFailed, match="spool.directory"):
        spoolDirectory(str(etc / "bad.toml"), None)


def test_the_spool_directory_of_a_user_who_may_not_write_there(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """mailrelay (mailq) run by a user who may not write in the spool directory: the command
    finds the directory all the same (the control socket then says who may use it).  It
    said "configuration error: ... spool.directory: unusable spool directory: ... is not
    writable", as if the file were wrong."""
    from mailrelay.app.cli import spoolDirectory

    access = os.access
    monkeypatch.setattr(os, "access", lambda path, mode: not mode & os.W_OK and access(path, mode))
    monkeypatch.chdir(tmp_path)
    (tmp_path / "spool").mkdir()
    (tmp_path / "relay.toml").write_text('[spool]\ndirectory = "spool"\n')
    assert spoolDirectory(str(tmp_path / "relay.toml"), None) == tmp_path / "spool"
    assert spoolDirectory(None, None) == tmp_path / "mailrelay-spool"  # (the default)


def fakeProcess(proc: Path, pid: int, cwd: Path, *argv: str) -> None:
    """A process C{pid} in the fake C{/proc} directory C{proc}: its command line and its
    working directory."""
    (proc / str(pid)).mkdir(parents=True)
    (proc / str(pid) / "cmdline").write_bytes(b"\0".join(a.encode() for a in argv) + b"\0")
    (proc / str(pid) / "cwd").symlink_to(cwd)


def test_no_relay_on_the_spool_of_the_file_says_how_to_reach_one_on_another(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """mailrelay --config FILE when no relay answers on the file's spool directory, while a
    relay started with that file runs: started before its spool.directory was changed, it
    runs on the old one until restarted.  The command says so, naming the file and key, the
    process and how to reach it (--spool); it said only 'the relay is not running', and the
    operator could not stop it to restart it."""
    from mailrelay.app import cli

    proc = tmp_path / "proc"
    proc.mkdir()
    monkeypatch.setattr(cli, "PROC", proc)
    config = tmp_path / "relay.toml"
    config.write_text('[spool]\ndirectory = "spool-new"\n')
    spool = tmp_path / "spool-new"
    # twistd, started with a relative path in the file's directory
    fakeProcess(proc, 4321, tmp_path, "/usr/bin/python3", "/v/bin/twistd", "-n", "mailrelay",
                "--config", "relay.toml")
    reach = (f"a relay started with {config} runs (process 4321): started before "
             f"spool.directory in {config} was changed, it runs on its old spool until it is "
             "restarted: name that one with --spool (mailrelay --spool OLD-SPOOL stop)\n")

    def run(command: str) -> str:
        err = io.StringIO()
        assert cli.main(["--config", str(config), command], io.StringIO(), err) == 1
        return err.getvalue()

    for command in ("status", "reload", "stop"):
        assert run(command) == f"mailrelay: no relay runs on {spool}: it does not exist; {reach}"
    spool.mkdir()
    assert run("status") == (
        f"mailrelay: no relay runs on {spool}: it holds no spool (no relay has run on it); {reach}"
    )
    (spool / "queue").mkdir()  # a spool a relay has run on, and stopped
    assert run("status") == (
        f"mailrelay: the relay is not running (no control socket answers at "
        f"{spool}/control.sock); {reach}"
    )


def test_a_relay_simply_stopped_gets_no_hint_of_another_spool(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """mailrelay --config FILE status when no process was started with that file (the relay
    is simply stopped; other relays and other programs run): it says the relay is not
    running, and nothing of a relay on an old spool, which sent the operator looking for
    one that was not there."""
    from mailrelay.app import cli

    proc = tmp_path / "proc"
    proc.mkdir()
    monkeypatch.setattr(cli, "PROC", proc)
    config = tmp_path / "relay.toml"
    config.write_text('[spool]\ndirectory = "spool"\n')
    (tmp_path / "spool" / "queue").mkdir(parents=True)
    other = tmp_path / "other"
    other.mkdir()
    (other / "relay.toml").write_text("")
    fakeProcess(proc, 10, other, "/v/bin/twistd", "-n", "mailrelay", "--config=relay.toml")
    fakeProcess(proc, 11, tmp_path, "vi", "relay.toml")  # not a relay
    fakeProcess(proc, 12, tmp_path, "/v/bin/python", "-m", "mailrelay", "--config",
                str(config), "status")  # a command, as this one
    (proc / "self").mkdir()  # (not a process id)
    err = io.StringIO()
    assert cli.main(["--config", str(config), "status"], io.StringIO(), err) == 1
    assert err.getvalue() == (
        f"mailrelay: the relay is not running (no control socket answers at "
        f"{tmp_path}/spool/control.sock)\n")
    # The delivery process of one started with it (the relay's own is gone): a relay.
    fakeProcess(proc, 13, other, "/v/bin/python", "-m", "mailrelay.app.deliveryprocess",
                "--overrides", "{}", "--config", str(config), "--config-fd", "3")
    err = io.StringIO()
    assert cli.main(["--config", str(config), "status"], io.StringIO(), err) == 1
    assert "(process 13)" in err.getvalue()


def test_queue_list_output() -> None:
    from mailrelay.app.cli import printEntries

    out = io.StringIO()
    printEntries([], out)
    assert out.getvalue() == "Mail queue is empty\n"
    entries = [
        {"queue_name": "active", "queue_id": "01K1HDPTVQRF0000AWNA", "arrival_time": 0,
         "message_size": 1500, "sender": "", "attempts": 0, "next_attempt": None,
         "recipients": [{"address": "a@example.org", "state": "pending", "status": None,
                         "attempts": 0}]},
        {"queue_name": "hold", "queue_id": "01K1HDPTVQRF0001AWNA", "arrival_time": 0,
         "message_size": 600, "sender": "bob@example.com", "attempts": 1, "next_attempt": 60,
         "recipients": [
             {"address": "c@example.org", "state": "pending", "status": "4.4.1", "attempts": 1,
              "delay_reason": "X-mailrelay; connection refused"},
             {"address": "d@example.org", "state": "delivered", "status": "2.0.0",
              "attempts": 1, "delay_reason": "smtp; 250 ok"}]},
        {"queue_name": "corrupt", "queue_id": "01K1HDPTVQRF0002AWNA", "error": "empty"},
    ]
    out = io.StringIO()
    printEntries(entries, out)
    lines = out.getvalue().splitlines()
    assert lines[0].startswith("-Queue ID-")
    assert lines[1].startswith("01K1HDPTVQRF0000AWNA*     1500 ") and lines[1].endswith(
        "  MAILER-DAEMON")
    assert lines[2].strip() == "a@example.org"
    assert lines[4].startswith("01K1HDPTVQRF0001AWNA!      600 ")
    assert lines[5].strip() == "(X-mailrelay; connection refused)"
    assert lines[6].strip() == "c@example.org"
    assert lines[7].strip() == "d@example.org (delivered, 2.0.0)"
    assert lines[9].startswith("01K1HDPTVQRF0002AWNA?") and "(unreadable: empty)" in lines[9]
    assert lines[-1] == "-- 3 Kbytes in 3 Requests."


def test_queue_list_prints_each_page_as_it_comes() -> None:
    """C{mailrelay queue list} prints each page of the queue as it comes, as Postfix's
    showq streams C{postqueue -p}, with the total at the end: it kept every entry of every
    page in memory until the last (115 MiB for a queue of 50,000 one-recipient messages,
    growing with the queue and its recipients)."""
    from argparse import Namespace

    from mailrelay.app.cli import queueList
    from mailrelay.queue.commands import LIST_PAGE

    out = io.StringIO()

    def entry(n: int) -> dict[str, Any]:
        return {"queue_name": "deferred", "queue_id": f"01K1HDPTVQRF{n:04d}AWNA",
                "arrival_time": 0, "message_size": 1024, "sender": "a@example.com",
                "recipients": [{"address": f"r{n}@example.org", "state": "pending"}]}

    class Pages:
        def __init__(self) -> None:
            self.cursors: list[str | None] = []

        async def call(self, command: Any, cursor: str | None, limit: int) -> dict[str, Any]:
            assert limit == LIST_PAGE
            self.cursors.append(cursor)
            if cursor is None:
                return {"entries": [entry(0), entry(1)], "next": "01K1HDPTVQRF0001AWNA"}
            # The first page is out before the second is asked for.
            assert "r1@example.org" in out.getvalue()
            return {"entries": [entry(2)], "next": None}

    pages = Pages()
    done = Deferred.fromCoroutine(queueList(pages, Namespace(json=False), out, io.StringIO()))
    assert result(done) == 0
    assert pages.cursors == [None, "01K1HDPTVQRF0001AWNA"]
    lines = out.getvalue().splitlines()
    assert lines[0].startswith("-Queue ID-") and lines.count(lines[0]) == 1
    assert [line.split()[0] for line in lines if line.startswith("01K1")] == [
        "01K1HDPTVQRF0000AWNA", "01K1HDPTVQRF0001AWNA", "01K1HDPTVQRF0002AWNA"]
    assert lines[-1] == "-- 3 Kbytes in 3 Requests."


def test_queue_show_says_the_reason_of_a_suspended_next_hops_deferral(tmp_path: Path) -> None:
    """Found by a review: C{queue show} printed a recipient's diagnostic as its reason,
    where its deferral has a reason of its own ("delivery temporarily suspended: ..."), as
    the queue listing (postqueue -p, -j: delay_reason) and the log say.  It says the reason,
    the diagnostic (the notices' Diagnostic-Code) beside it; without a reason, the
    diagnostic as before."""
    from mailrelay.app.cli import printShow

    h, hop = deadHopsQueue(tmp_path, [RouteRule("example.org", "hop", "a.example")])
    hop.down = {"a.example"}
    first = h.submit("alice@example.com", ["bob@example.org"])
    later = h.submit("alice@example.com", ["carol@example.org"])
    c = control(h)

    def shown(queueID: str) -> list[str]:
        out = io.StringIO()
        printShow(result(c.show(queueID)), out)
        return [line.strip() for line in out.getvalue().splitlines()
                if line.startswith("  ") and line.split(":")[0].strip() in (
                    "reason", "diagnostic")]

    assert shown(first) == ["reason: X-hop; refused"]
    assert shown(later) == ["reason: delivery temporarily suspended: refused",
                            "diagnostic: X-hop; refused"]


def test_summary_output() -> None:
    from mailrelay.app.cli import printSummary

    out = io.StringIO()
    printSummary({"labels": ["T", "5", "1280+"], "total": [12, 2, 10],
                  "rows": [["example.org", 12, 2, 10]]}, out)
    assert out.getvalue().splitlines() == [
        "                T    5 1280+",
        "       TOTAL   12    2    10",
        " example.org   12    2    10",
    ]


# -- check -n ---------------------------------------------------------------------------------


def test_effective_configuration_loads_to_the_same(tmp_path: Path) -> None:
    from mailrelay.config import loadConfig
    from mailrelay.config.effective import effectiveConfiguration

    (tmp_path / "pw").write_text("s3cret\n")
    original = tmp_path / "relay.toml"
    original.write_text(
        'hostname = "relay.test"\n'
        "[spool]\ndirectory = \"spool\"\n"
        "[relay]\nnetworks = [\"10.0.0.0/8\"]\n"
        "[queue]\nmin_backoff = 60\npostmaster = \"postmaster@relay.test\"\n"
        "[delivery.timeouts]\nconnect = 5\n"
        "[smarthost]\nusername = \"u\"\npassword = \"hunter2\"\n"
        "[[listeners]]\nendpoint = \"tcp:2525\"\nbare_newline = \"normalize\"\n"
        "[[listeners]]\nendpoint = \"tcp:2526\"\n"
        "[[routes]]\ndomain = \"example.org\"\nbackend = \"smtp\"\nnexthop = \"[mx.test]:25\"\n"
        "tls = \"required\"\n"
        "[[recipient_validators]]\nplugin = \"regex\"\ntimeout = 5\n"
        "rules = [{pattern = \"^x\", action = \"reject\"}]\n"
    )
    text = effectiveConfiguration(original, {"smarthost": "[hub.test]:587"})
    assert "hunter2" not in text and "# password = (set in the file; not shown)" in text
    assert 'smarthost = "[hub.test]:587"  # --smarthost' in text
    assert "# min_free_space = 104857600  (default)" in text
    assert "# tls_mode: not set (default: from mode and certificate)" in text
    data = tomllib.loads(text)
    assert data["listeners"][0]["endpoint"] == "tcp:2525" and len(data["listeners"]) == 2
    assert data["delivery"]["timeouts"] == {"connect": 5}
    assert data["recipient_validators"][0]["rules"] == [{"pattern": "^x", "action": "reject"}]
    copy = tmp_path / "effective.toml"
    copy.write_text(text.replace("# password = (set in the file; not shown)",
                                 'password = "hunter2"'))
    before = loadConfig(original, {"smarthost": "[hub.test]:587"})
    after = loadConfig(copy)
    assert after.__class__(**{**vars(after), "source": before.source}) == before


def test_effective_configuration_with_tables_in_listeners_loads_back(tmp_path: Path) -> None:
    """A listener's tls_certificates (an array of tables in an array of tables) is written
    under [[listeners.tls_certificates]], after its listener, as TOML wants it (it was
    [[listeners[1].tls_certificates]], which no TOML parser reads)."""
    from mailrelay.config import loadConfig
    from mailrelay.config.effective import effectiveConfiguration
    from tests.test_config import writeCertificate

    writeCertificate(tmp_path, "a.pem", "a.key", "relay.example.com")
    writeCertificate(tmp_path, "b.pem", "b.key", "mail.example.org")
    original = tmp_path / "relay.toml"
    original.write_text(
        '[spool]\ndirectory = "spool"\n'
        '[[listeners]]\nendpoint = "tcp:2525"\n'
        '[[listeners]]\nendpoint = "tcp:2587"\ntls_certificate = "a.pem"\ntls_key = "a.key"\n'
        'tls_certificates = [{server_name = "mail.example.org", certificate = "b.pem", '
        'key = "b.key"}]\n'
    )
    text = effectiveConfiguration(original)
    data = tomllib.loads(text)
    assert "tls_certificates" not in data["listeners"][0]
    assert [c["server_name"] for c in data["listeners"][1]["tls_certificates"]] == [
        "mail.example.org"
    ]
    copy = tmp_path / "effective.toml"
    copy.write_text(text)
    before, after = loadConfig(original), loadConfig(copy)

    def certificates(config: Any) -> list[Any]:  # (TLS options compare by identity)
        return [
            (listener.settings.name, listener.certificate is not None,
             [(name, tls.subject) for name, tls in listener.sniCertificates])
            for listener in config.listeners
        ]

    assert certificates(after) == certificates(before)
    assert certificates(after)[1][2][0][0] == "mail.example.org"


def test_effective_configuration_of_the_default(tmp_path: Path,
                                                monkeypatch: pytest.MonkeyPatch) -> None:
    from mailrelay.config import loadConfig
    from mailrelay.config.effective import effectiveConfiguration

    monkeypatch.chdir(tmp_path)
    text = effectiveConfiguration(None, {"listen": ["tcp:2600"], "spool": "q"})
    assert '[[listeners]]  # --listen\nendpoint = "tcp:2600"' in text
    assert f'directory = "{tmp_path / "q"}"  # --spool' in text
    path = tmp_path / "eff.toml"
    path.write_text(text)
    assert loadConfig(path).spoolDirectory == tmp_path / "q"
    assert [listener.settings.name for listener in loadConfig(path).listeners] == ["tcp:2600"]


def test_entry_gone_meanwhile_is_left_out(tmp_path: Path) -> None:
    hop = Hop()
    h = harness(tmp_path, hop, minBackoff=600, maxBackoff=600)
    queueID = h.submit("alice@example.com", ["bob@example.org"])
    c = control(h)
    real = h.spool.loadEnvelope

    def gone(q: str) -> Envelope:
        raise EntryGone(f"no queue entry {q}")

    h.spool.loadEnvelope = gone  # type: ignore[method-assign]
    assert result(c.entries())["entries"] == []
    h.spool.loadEnvelope = real  # type: ignore[method-assign]
    assert [e["queue_id"] for e in result(c.entries())["entries"]] == [queueID]



def test_check_socket_path() -> None:
    """What mailrelay check (run as a command in test_e2e_control) and the start-up refuse."""
    from mailrelay.app.control import checkSocketPath, controlSocketPath

    checkSocketPath(controlSocketPath("/var/spool/mailrelay"))
    with pytest.raises(OSError, match="would be 120 octets long, more than the 107"):
        checkSocketPath(controlSocketPath("/" + "d" * 106))


def test_check_sample_prints_the_sample_configuration() -> None:
    """mailrelay check --sample prints the sample shipped with the package (README: the
    start of /etc/mailrelay.toml), and checks nothing."""
    import io
    from pathlib import Path

    from mailrelay.app.cli import main

    out, err = io.StringIO(), io.StringIO()
    assert main(["check", "--sample"], out, err) == 0
    sample = (Path(__file__).resolve().parent.parent / "etc" / "mailrelay.toml").read_text()
    assert out.getvalue() == sample and err.getvalue() == ""


#: A postmaster mailbox elsewhere: no warning that postmaster mail has nowhere to go.
POSTMASTER_ELSEWHERE = '[queue]\npostmaster = "postmaster@example.com"\n'


def checkedOk(config: Path) -> str:
    """What C{mailrelay check --config CONFIG} prints on stderr; it must say ok."""
    from mailrelay.app.cli import main

    out, err = io.StringIO(), io.StringIO()
    assert main(["check", "--config", str(config)], out, err) == 0
    assert out.getvalue() == f"mailrelay: configuration {config}: ok\n"
    return err.getvalue()


def test_check_says_a_systemd_listener_is_checked_for_its_syntax_only(
    tmp_path, monkeypatch
) -> None:
    """Outside socket activation (as mailrelay check runs), whether systemd will pass a
    systemd: endpoint's socket cannot be known: check says so, naming the file and key,
    rather than a bare "ok" before a start that fails."""
    from twisted.internet.endpoints import _SystemdParser
    from twisted.python.systemd import ListenFDs

    monkeypatch.setattr(_SystemdParser, "_sddaemon", ListenFDs([], ()))  # (none passed)
    config = tmp_path / "relay.toml"
    config.write_text(
        f'[spool]\ndirectory = "{tmp_path / "spool"}"\n[dns]\nnameservers = ["127.0.0.1"]\n'
        f"{POSTMASTER_ELSEWHERE}"
        '[[listeners]]\nendpoint = "tcp:2525"\n'
        '[[listeners]]\nendpoint = "systemd:domain=INET:index=0"\n'
    )
    assert checkedOk(config) == (
        f"mailrelay: warning: {config}: listeners[1].endpoint: systemd:domain=INET:index=0: "
        "only its syntax is checked (systemd passed this process no socket): the relay can "
        "listen on it only when a systemd socket unit passes it the socket\n")


def test_check_says_the_warnings_of_the_build(tmp_path) -> None:
    """As postfix check: what the relay would log as a warning while building the
    configuration (here a plugin time limit its timeout cuts) is printed, once, and in
    the JSON."""
    import io
    import json

    from mailrelay.app.cli import main

    config = tmp_path / "relay.toml"
    config.write_text(
        f'[spool]\ndirectory = "{tmp_path / "spool"}"\n[dns]\nnameservers = ["127.0.0.1"]\n'
        f"{POSTMASTER_ELSEWHERE}"
        '[[plugins]]\nplugin = "dnsbl"\nzones = ["zen.example"]\ntimeout = 5\n'
    )
    assert checkedOk(config) == (
        f"mailrelay: warning: {config}: plugins[0].query_timeout = 10s is not below the "
        "plugin's timeout of 5s: the relay cuts a slow call at 5s and fails it (4xx), so the "
        "plugin's own handling of a slow answer never acts; make query_timeout shorter\n")
    out = io.StringIO()
    assert main(["check", "--json", "--config", str(config)], out, io.StringIO()) == 0
    answer = json.loads(out.getvalue())
    assert answer["ok"] and len(answer["warnings"]) == 1
    # With an error too: the warnings first, then the error.
    config.write_text(config.read_text() + '[[plugins]]\nplugin = "no-such-plugin"\n')
    out, err = io.StringIO(), io.StringIO()
    assert main(["check", "--config", str(config)], out, err) == 1
    lines = err.getvalue().splitlines()
    assert len(lines) == 2 and lines[0].startswith("mailrelay: warning: ")
    assert lines[1].startswith("mailrelay: configuration error: ") and "no-such-plugin" in lines[1]


def test_the_start_the_status_gives_follows_a_step_of_the_clock(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """C{mailrelay status} says since when the relay runs: its wall-clock start as the
    clock is now (the time it has run, on the monotonic clock, before now), not what the
    clock said at the start, which a step since (NTP correcting it, date -s) puts off by
    the step."""
    from twisted.internet.task import Clock
    from twisted.internet.testing import MemoryReactorClock

    from mailrelay.app import control as controlModule

    class Relay:
        reactor = MemoryReactorClock()

    # (A memory reactor makes no socket file for the root's chown to the spool's owner.)
    monkeypatch.setattr(controlModule.os, "geteuid", lambda: 1000)

    Relay.reactor.advance(1_800_000_000)
    monotonic = Clock()
    service = controlModule.ControlService(relay=Relay(), spoolDirectory=tmp_path)
    service.monotonic = monotonic.seconds
    service.listen()
    Relay.reactor.rightNow += 6 * 86400  # stepped forward six days
    Relay.reactor.advance(60)
    monotonic.advance(60)
    assert service.startedAt == Relay.reactor.seconds() - 60


def test_show_prints_a_recipients_reason_diagnostic_and_notice_owed() -> None:
    """C{queue show} (postcat -q) says of a recipient what C{queue list} says of it: the
    reason of a suspended next hop's deferral (its delay_reason), and beside it the server's
    diagnostic recorded apart (92a8e92); and a success notice still owed (the marks of
    892fb5e: C{noticeOwed}, C{noticeID}), which alone keeps a message all delivered queued."""
    from mailrelay.app.cli import printShow
    from mailrelay.envelope import DELIVERED, Recipient
    from mailrelay.queue.control import entryInfo

    reason = "delivery temporarily suspended: host mx.example.org said: 421 4.4.2 busy"
    envelope = Envelope(sender="alice@example.com", arrival=1e9, attempts=1, recipients=[
        Recipient("bob@example.org", attempts=1, status="4.4.2",
                  lastResult="smtp; 421 4.4.2 busy", reason=reason),
        Recipient("carol@example.org", state=DELIVERED, attempts=1, status="2.0.0",
                  lastResult="smtp; 250 2.0.0 ok", noticeOwed="relayed", noticeID="NOTICE1")])
    shown = {"entry": entryInfo("Q1", envelope, False), "envelope": envelope.toDict(),
             "headers": "Subject: hi\r\n"}
    out = io.StringIO()
    printShow(shown, out)
    text = out.getvalue()
    bob, carol = text.split("recipient: ")[1:]
    assert shown["entry"]["recipients"][0]["delay_reason"] == reason
    assert f"  reason: {reason}\n" in bob
    assert "  diagnostic: smtp; 421 4.4.2 busy\n" in bob
    assert "notice" not in bob
    assert "  reason: smtp; 250 2.0.0 ok\n" in carol and "diagnostic" not in carol
    assert "  notice_owed: relayed (queue id NOTICE1)\n" in carol


def test_show_prints_the_message_a_success_notice_is_of() -> None:
    """C{queue show} of a success notice names the message it reports on (its C{noticeOf},
    kept until that message's marks are cleared, 892fb5e), as the recipients' marks
    (C{notice_owed}) name the notice: the two ends of the link, each shown where it is."""
    from mailrelay.app.cli import printShow
    from mailrelay.queue.control import entryInfo

    def show(envelope: Envelope) -> str:
        shown = {"entry": entryInfo("N1", envelope, False), "envelope": envelope.toDict(),
                 "headers": "Subject: Successful Mail Delivery Report\r\n"}
        out = io.StringIO()
        printShow(shown, out)
        return out.getvalue()

    from mailrelay.envelope import Recipient

    notice = Envelope(sender="", arrival=1e9, recipients=[Recipient("alice@example.com")],
                      noticeOf="ORIG1")
    text = show(notice)
    assert "\nnotice_of: ORIG1\n" in text
    assert text.index("notice_of:") < text.index("recipient: ")
    notice.noticeOf = None
    assert "notice_of" not in show(notice)


def test_show_prints_the_address_of_the_server_that_gave_a_recipients_status() -> None:
    """C{queue show} says which server gave a recipient's last status as the notices name
    it (cf0a193: C{mx.example.org[192.0.2.1]}): its Remote-MTA, and beside it the address
    the status came from (C{remoteAddress}), where one is recorded."""
    from mailrelay.app.cli import printShow
    from mailrelay.envelope import Recipient
    from mailrelay.queue.control import entryInfo

    envelope = Envelope(sender="alice@example.com", arrival=1e9, attempts=1, recipients=[
        Recipient("bob@example.org", attempts=1, status="4.4.2", remoteMTA="dns; mx.example.org",
                  lastResult="smtp; 421 4.4.2 busy", remoteAddress="192.0.2.1"),
        Recipient("carol@example.org", attempts=1, status="4.4.2", remoteMTA="dns; mx.example.org",
                  lastResult="smtp; 421 4.4.2 busy")])
    shown = {"entry": entryInfo("Q1", envelope, False), "envelope": envelope.toDict(),
             "headers": "Subject: hi\r\n"}
    out = io.StringIO()
    printShow(shown, out)
    bob, carol = out.getvalue().split("recipient: ")[1:]
    assert "  remote_mta: dns; mx.example.org\n  remote_address: 192.0.2.1\n" in bob
    assert "  remote_mta: dns; mx.example.org\n" in carol and "remote_address" not in carol


def test_a_whole_listing_lists_the_spool_directory_once(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Each page of queue list listed and sorted the whole spool directory again (70 ms a
    page at 50,000 entries: a whole listing O(n²/page)); Postfix's showq reads each queue
    directory once.  The first page takes a snapshot of the sorted ids and the next pages
    are served from it: the same pages in the same order; an entry removed meanwhile is
    skipped, one added meanwhile is not shown (never twice); a snapshot older than
    LIST_SNAPSHOT_TTL is not used."""
    from mailrelay.queue import control as module

    h = harness(tmp_path, Hop(), minBackoff=3600, maxBackoff=3600)
    ids = [h.submit("alice@example.com", [f"u{n}@example.org"]) for n in range(7)]
    c = control(h)
    listings: list[int] = []
    queueIDs = h.spool.queueIDs

    def counted() -> list[str]:
        listings.append(1)
        return queueIDs()

    monkeypatch.setattr(h.spool, "queueIDs", counted)

    def listing() -> list[str]:
        listed: list[str] = []
        cursor = None
        for _ in range(20):
            page = result(c.entries(cursor=cursor, limit=2))
            listed += [e["queue_id"] for e in page["entries"]]
            cursor = page["next"]
            if cursor is None:
                return listed
        raise AssertionError("the listing does not end")

    assert listing() == ids and len(listings) == 1
    listings.clear()
    first = result(c.entries(limit=2))
    one(h, c.delete([ids[3]]))
    added = h.submit("alice@example.com", ["late@example.org"])
    rest: list[str] = []
    cursor = first["next"]
    while cursor is not None:
        page = result(c.entries(cursor=cursor, limit=2))
        rest += [e["queue_id"] for e in page["entries"]]
        cursor = page["next"]
    assert [e["queue_id"] for e in first["entries"]] + rest == ids[:3] + ids[4:]
    assert added not in rest and len(listings) == 1
    listings.clear()
    first = result(c.entries(limit=2))
    h.clock.advance(module.LIST_SNAPSHOT_TTL + 1)
    second = result(c.entries(cursor=first["next"], limit=2))
    assert [e["queue_id"] for e in second["entries"]] == [ids[2], ids[4]]
    assert len(listings) == 2
