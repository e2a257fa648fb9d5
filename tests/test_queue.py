"""Tests for L{mailrelay.queue}: scheduling, retries, bounces, durability ordering, restart.

A real L{Spool} on C{tmp_path}, with its thread work run synchronously; time is a C{Clock};
the router and the delivery backends are fakes answering from a script.
"""

from __future__ import annotations

import email
import email.policy
import json
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import pytest
from twisted.internet.defer import CancelledError, Deferred, fail, succeed
from twisted.internet.task import Clock
from twisted.logger import capturedLogs, formatEvent, globalLogPublisher
from twisted.python.failure import Failure
from zope.interface import implementer

from mailrelay.cleanup.intake import Intake
from mailrelay.cleanup.stamping import ConfiguredStamper, DefaultStamper
from mailrelay.envelope import BOUNCED, DELIVERED, PENDING, ClientInfo, Envelope, Recipient
from mailrelay.errors import CorruptEntry, SpoolError
from mailrelay.interfaces import (
    ConfiguredPlugin,
    DeliveryStatus,
    IHeaderStamper,
    RecipientResult,
    Route,
    RouteOptions,
    StampContext,
    StampResult,
)
from mailrelay.queue import QueueManager, QueuePolicy, backoff
from mailrelay.queue import scheduler as schedulerModule
from mailrelay.queue.attempt import Calls
from mailrelay.queue.observers import Observers
from mailrelay.queue.outcome import POSTMASTER_SOURCE
from mailrelay.spool import Spool, isQueueID, newQueueID
from mailrelay.testing import RecordingObserver

HOST = "relay.test"
START = 1_700_000_000.0
MESSAGE = (
    b"Received: from client.example.org by relay.test\r\n"
    b"From: Sender <sender@example.org>\r\n"
    b"Subject: test message\r\n"
    b"\r\n"
    b"body line\r\n"
)


# --- helpers -----------------------------------------------------------------------------------


def syncDeferToThread(f: Callable[..., Any], *args: Any) -> Deferred[Any]:
    try:
        return succeed(f(*args))
    except BaseException:
        return fail()


def resultOf(d: Deferred[Any]) -> Any:
    results: list[Any] = []
    d.addBoth(results.append)
    assert results, "Deferred has not fired"
    if isinstance(results[0], Failure):
        results[0].raiseException()
    return results[0]


def result(address: str, kind: str) -> RecipientResult:
    """What an SMTP server (mx.<domain>) answered for C{address}: as the SMTP backend's, with
    the Remote-MTA and the C{relay=} of the server that answered."""
    domain = address.rpartition("@")[2]
    remote, relay = f"dns; mx.{domain}", f"mx.{domain}[192.0.2.1]:25"
    if kind == "2":
        return RecipientResult(
            address, DeliveryStatus.DELIVERED, "2.0.0", "smtp; 250 2.0.0 Ok", remote, relay=relay
        )
    if kind == "4":
        return RecipientResult(
            address,
            DeliveryStatus.TRANSIENT,
            "4.2.0",
            "smtp; 451 4.2.0 try later",
            remote,
            relay=relay,
        )
    return RecipientResult(
        address,
        DeliveryStatus.PERMANENT,
        "5.1.1",
        "smtp; 550 5.1.1 user unknown",
        remote,
        relay=relay,
    )


@dataclass
class Call:
    queueID: str
    sender: str
    addresses: list[str]
    route: Route
    path: Path
    message: bytes
    isBounce: bool

    @property
    def nexthop(self) -> str:
        return self.route.nexthop


class FakeBackend:
    """Answers from C{script}: address -> list of C{"2"}, C{"4"}, C{"5"}; each call takes the
    first, the last one repeats.  Unscripted addresses are delivered.  With C{hold}, answers
    wait in C{held} until released."""

    def __init__(self) -> None:
        self.script: dict[str, list[str]] = {}
        self.calls: list[Call] = []
        self.hold = False
        self.held: list[tuple[Deferred[Any], list[RecipientResult]]] = []

    def answer(self, address: str) -> RecipientResult:
        seq = self.script.setdefault(address, ["2"])
        kind = seq.pop(0) if len(seq) > 1 else seq[0]
        return result(address, kind)

    def deliver(self, envelope: Envelope, recipients: Any, route: Route, messagePath: Path) -> Any:
        self.calls.append(
            Call(
                envelope.queueID or "",
                envelope.sender,
                [r.address for r in recipients],
                route,
                messagePath,
                messagePath.read_bytes(),
                envelope.isBounce,
            )
        )
        results = [self.answer(r.address) for r in recipients]
        if self.hold:
            d: Deferred[Any] = Deferred()
            self.held.append((d, results))
            return d
        return succeed(results)

    def release(self, count: int | None = None) -> None:
        held = self.held[:count] if count is not None else list(self.held)
        del self.held[: len(held)]
        for d, results in held:
            d.callback(results)

    def addressesDelivered(self) -> list[str]:
        return [a for call in self.calls for a in call.addresses]

    def bounces(self) -> list[Call]:
        return [call for call in self.calls if call.isBounce]


class FakeRouter:
    """Routes to backend C{"smtp"}, next hop the recipient's domain, unless C{routes} (domain
    -> Route or exception) says otherwise."""

    def __init__(self) -> None:
        self.routes: dict[str, Any] = {}

    def route(self, envelope: Envelope, recipient: Recipient) -> Any:
        decision = self.routes.get(recipient.domain)
        if isinstance(decision, Exception):
            raise decision
        if decision is not None:
            return decision
        return Route("smtp", recipient.domain)


@pytest.fixture
def clock() -> Clock:
    c = Clock()
    c.advance(START)
    return c


@pytest.fixture
def spool(tmp_path: Path, clock: Clock) -> Any:
    s = Spool(tmp_path / "spool", reactor=clock, deferToThread=syncDeferToThread)
    s.start()
    yield s
    s.stop()


@pytest.fixture
def backend() -> FakeBackend:
    return FakeBackend()


@pytest.fixture
def router() -> FakeRouter:
    return FakeRouter()


@pytest.fixture
def events() -> Any:
    captured: list[dict[str, Any]] = []

    def observer(event: dict[str, Any]) -> None:
        if event.get("log_namespace") == "mailrelay.queue":
            captured.append(event)

    globalLogPublisher.addObserver(observer)
    yield captured
    globalLogPublisher.removeObserver(observer)


def texts(events: list[dict[str, Any]], queueID: str | None = None) -> list[str]:
    return [
        formatEvent(e) for e in events if queueID is None or e.get("queueID") == queueID
    ]


def queueMessage(
    spool: Spool,
    clock: Clock,
    recipients: list[str | Recipient],
    sender: str = "sender@example.org",
    message: bytes = MESSAGE,
    **kw: Any,
) -> str:
    queueID = newQueueID()
    writer = spool.openMessage(queueID)
    writer.write(message)
    envelope = Envelope(
        sender=sender,
        recipients=[r if isinstance(r, Recipient) else Recipient(r, r) for r in recipients],
        queueID=queueID,
        client=ClientInfo("192.0.2.1", 4321, helo="client.example.org", esmtp=True),
        arrival=clock.seconds(),
        messageSize=len(message),
        **kw,
    )
    resultOf(writer.commit(envelope))
    return queueID


def stored(spool: Spool, queueID: str) -> dict[str, Any]:
    path = spool.messagePath(queueID).with_suffix(".json")
    return json.loads(path.read_bytes())


def makeManager(
    spool: Spool,
    router: FakeRouter,
    backends: dict[str, Any],
    clock: Clock,
    timeouts: dict[str, float] | None = None,
    stampers: list[Any] | None = None,
    **policy: Any,
) -> QueueManager:
    """A queue manager whose notifications go through an intake with the default stamper
    (or C{stampers})."""

    def makeIntake(enqueue: Callable[[str], None]) -> Intake:
        configured = [
            ConfiguredStamper(type(s).__name__, s, 30.0)
            for s in ([DefaultStamper()] if stampers is None else stampers)
        ]
        return Intake(spool, configured, clock, HOST, notify=enqueue)

    return QueueManager(
        spool, router, backends, clock, hostname=HOST, makeIntake=makeIntake,
        policy=QueuePolicy(**policy), timeouts=timeouts,
    )


def schedulerTimers(clock: Clock) -> list[Any]:
    """The timers of C{clock} but the queue manager's periodic look into the spool."""
    return [c for c in clock.getDelayedCalls() if c.func.__name__ != "_lookAgain"]


def parse(message: bytes) -> email.message.EmailMessage:
    return email.message_from_bytes(  # type: ignore[return-value]
        message, policy=email.policy.default
    )


def recipientBlocks(message: bytes) -> list[Any]:
    report = parse(message)
    status = next(p for p in report.walk() if p.get_content_type() == "message/delivery-status")
    return status.get_payload()[1:]


# --- delivery, retry, bounce -------------------------------------------------------------------


def test_deliveredEntryRemoved(
    spool: Spool, router: FakeRouter, backend: FakeBackend, clock: Clock, events: Any
) -> None:
    qm = makeManager(spool, router, {"smtp": backend}, clock)
    qm.startService()
    queueID = queueMessage(spool, clock, ["a@example.com", "b@example.com"])
    qm.enqueue(queueID)
    assert len(backend.calls) == 1  # one group: same backend and next hop
    call = backend.calls[0]
    assert call.addresses == ["a@example.com", "b@example.com"]
    assert call.nexthop == "example.com"
    assert call.path == spool.messagePath(queueID)
    assert call.message == MESSAGE
    assert spool.queueIDs() == []
    assert qm.activeCount == 0 and qm.scheduledCount == 0
    lines = texts(events, queueID)
    assert any(
        "to=<a@example.com>, relay=mx.example.com[192.0.2.1]:25" in t and "status=sent" in t
        for t in lines
    )
    assert lines[-1] == f"{queueID}: removed"
    resultOf(qm.stopService())


def test_recipientsOfOneRouteAreDeliveredFiftyAtATime(
    spool: Spool, router: FakeRouter, backend: FakeBackend, clock: Clock
) -> None:
    """120 recipients of one next hop: three deliveries of 50, 50 and 20 (Postfix's
    default_destination_recipient_limit), each recipient in one of them once."""
    qm = makeManager(spool, router, {"smtp": backend}, clock)
    qm.startService()
    recipients = [f"r{i}@example.com" for i in range(120)]
    queueID = queueMessage(spool, clock, list(recipients))
    qm.enqueue(queueID)
    assert [len(call.addresses) for call in backend.calls] == [50, 50, 20]
    assert [a for call in backend.calls for a in call.addresses] == recipients
    assert spool.queueIDs() == []
    resultOf(qm.stopService())


def test_backoffFunction() -> None:
    """The delay before the next attempt is the message's age in the queue, at least
    minBackoff and at most maxBackoff (Postfix's qmgr), not a count of attempts."""
    policy = QueuePolicy()
    ages = [0, 1, 299, 300, 301, 1234.5, 3999, 4000, 4001, 10 * 86400]
    assert [backoff(policy, age) for age in ages] == [
        300, 300, 300, 300, 301, 1234.5, 3999, 4000, 4000, 4000]


def test_transientRetriedOnBackoffSchedule(
    spool: Spool, router: FakeRouter, backend: FakeBackend, clock: Clock
) -> None:
    backend.script["a@example.com"] = ["4"] * 6 + ["2"]
    qm = makeManager(spool, router, {"smtp": backend}, clock)
    qm.startService()
    queueID = queueMessage(spool, clock, ["a@example.com"])
    qm.enqueue(queueID)
    assert len(backend.calls) == 1
    data = stored(spool, queueID)
    assert data["attempts"] == 1
    assert data["nextAttempt"] == START + 300
    rcpt = data["recipients"][0]
    assert (rcpt["state"], rcpt["attempts"], rcpt["status"]) == (PENDING, 1, "4.2.0")
    assert rcpt["lastResult"] == "smtp; 451 4.2.0 try later"
    assert rcpt["remoteMTA"] == "dns; mx.example.com"

    # Each delay is the message's age, clamped to [300, 4000]: 300 after the first attempt
    # (age 0), 300 after the second (age 300), then 600 (600), 1200, 2400, 4000 (4800).
    for n, interval in enumerate([300, 300, 600, 1200, 2400, 4000], start=2):
        clock.advance(interval - 1)
        assert len(backend.calls) == n - 1, f"attempt {n} too early"
        clock.advance(1)
        assert len(backend.calls) == n, f"attempt {n} not made after {interval}s"
    assert spool.queueIDs() == []
    assert backend.bounces() == []
    assert schedulerTimers(clock) == []
    resultOf(qm.stopService())


def test_deliveriesAndNotificationsAreToldAtOnce(
    spool: Spool, router: FakeRouter, backend: FakeBackend, clock: Clock, monkeypatch: Any
) -> None:
    """Each recipient's result (mailrelay_deliveries) and each notification queued
    (mailrelay_dsns) is told at once to whom L{metrics.tellCounts} names -- in the delivery
    process, the relay, which keeps those counts if the process is killed before its next
    snapshot (sent once a second) -- each before its line is logged."""
    from mailrelay import metrics

    told: list[tuple[str, dict[str, str], int]] = []
    logged: list[str] = []
    monkeypatch.setattr(metrics, "_tell", None)
    metrics.tellCounts(lambda metric, labels: told.append((metric.name, labels, len(logged))))
    observer = lambda event: logged.append(formatEvent(event))  # noqa: E731
    globalLogPublisher.addObserver(observer)
    try:
        backend.script["a@example.com"] = ["5"]
        qm = makeManager(spool, router, {"smtp": backend}, clock)
        qm.startService()
        queueID = queueMessage(spool, clock, ["a@example.com", "b@example.com"])
        qm.enqueue(queueID)
        resultOf(qm.stopService())
    finally:
        globalLogPublisher.removeObserver(observer)
    assert sorted((name, sorted(labels.items())) for name, labels, _ in told) == [
        ("mailrelay_deliveries", [("backend", "smtp"), ("status", "bounced")]),
        ("mailrelay_deliveries", [("backend", "smtp"), ("status", "sent")]),
        ("mailrelay_deliveries", [("backend", "smtp"), ("status", "sent")]),  # (the bounce)
        ("mailrelay_dsns", [("action", "failed")]),
    ]
    # Each told before its status line: the i-th with i such lines logged before it.
    befores = [before for name, _, before in told if name == "mailrelay_deliveries"]
    statusLines = [sum(", status=" in t for t in logged[:before]) for before in befores]
    assert statusLines == list(range(len(befores))), logged


def test_permanentFailureBouncesBeforeUpdate(
    spool: Spool, router: FakeRouter, backend: FakeBackend, clock: Clock, monkeypatch: Any
) -> None:
    router.routes["example.org"] = Route("hold", "example.org")
    bounceBackend = FakeBackend()
    bounceBackend.hold = True
    seenAtUpdate: list[tuple[str | None, list[str]]] = []
    realUpdate = spool.updateEnvelope

    def updateEnvelope(envelope: Envelope) -> Deferred[None]:
        seenAtUpdate.append((envelope.queueID, spool.queueIDs()))
        return realUpdate(envelope)

    monkeypatch.setattr(spool, "updateEnvelope", updateEnvelope)
    backend.script["a@example.com"] = ["5"]
    qm = makeManager(spool, router, {"smtp": backend, "hold": bounceBackend}, clock)
    qm.startService()
    queueID = queueMessage(
        spool, clock, [Recipient("a@example.com", "A@example.com", orcpt="rfc822;A@example.com")],
        envid="ENV-1",
    )
    qm.enqueue(queueID)

    # The bounce is committed (and being delivered) before the original's update.
    assert seenAtUpdate[0][0] == queueID
    [dsnID] = [i for i in seenAtUpdate[0][1] if i != queueID]
    assert spool.queueIDs() == [dsnID]  # the original is gone
    bounce = spool.loadEnvelope(dsnID)
    assert bounce.sender == ""
    assert bounce.isBounce
    assert [r.address for r in bounce.recipients] == ["sender@example.org"]
    assert bounce.client is not None and bounce.client.address == "127.0.0.1"
    [call] = bounceBackend.calls
    assert call.queueID == dsnID and call.addresses == ["sender@example.org"]
    report = parse(call.message)
    assert report["Subject"] == "Undelivered Mail Returned to Sender"
    [block] = recipientBlocks(call.message)
    assert block["Final-Recipient"] == "rfc822; a@example.com"
    assert block["Original-Recipient"] == "rfc822; A@example.com"
    assert block["Action"] == "failed"
    assert block["Status"] == "5.1.1"
    assert block["Diagnostic-Code"] == "smtp; 550 5.1.1 user unknown"
    assert block["Remote-MTA"] == "dns; mx.example.com"
    bounceBackend.release()
    assert spool.queueIDs() == []
    resultOf(qm.stopService())


@implementer(IHeaderStamper)
class SiteStamper:
    def __init__(self) -> None:
        self.contexts: list[StampContext] = []

    def stamp(self, context: StampContext) -> StampResult:
        self.contexts.append(context)
        return StampResult(append=[f"X-Site: {context.envelope.queueID}\r\n".encode()])


def test_notificationsEnterThroughTheIntake(
    spool: Spool, router: FakeRouter, backend: FakeBackend, clock: Clock, events: Any
) -> None:
    """A bounce is stamped like any message: the default stamper's Received:, Message-Id:
    and Date: (the forms of mail received by SMTP), then the site's stampers; the intake
    logs its from=<> line and hands it to the queue manager."""
    from mailrelay.smtp.wire import formatDate

    site = SiteStamper()
    backend.script["a@example.com"] = ["5"]
    qm = makeManager(spool, router, {"smtp": backend}, clock, stampers=[DefaultStamper(), site])
    qm.startService()
    queueID = queueMessage(spool, clock, ["a@example.com"])
    with capturedLogs() as intakeEvents:
        qm.enqueue(queueID)
    original, bounce = backend.calls
    dsnID = bounce.queueID
    assert bounce.isBounce and dsnID != queueID and spool.queueIDs() == []
    [context] = site.contexts
    assert context.client is None and context.envelope.isBounce
    assert context.envelope.queueID == dsnID
    stamp = time.strftime("%Y%m%d%H%M%S", time.gmtime(clock.seconds()))
    assert bounce.message.startswith(
        f"Received: by {HOST} (mailrelay) id {dsnID}; {formatDate(clock.seconds())}\r\n"
        f"From: MAILER-DAEMON@{HOST} (Mail Delivery System)\r\n".encode()
    )
    head = bounce.message.split(b"\r\n\r\n", 1)[0]
    assert head.endswith(
        f"\r\nMessage-Id: <{stamp}.{dsnID}@{HOST}>\r\nDate: {formatDate(clock.seconds())}"
        f"\r\nX-Site: {dsnID}".encode()
    )
    assert head.count(b"\r\nMessage-Id:") == 1 and head.count(b"\r\nDate:") == 1
    lines = [formatEvent(e) for e in intakeEvents]
    # No client=: the relay made it, no client sent it.
    assert f"{dsnID}: from=<> nrcpt=1 size={len(bounce.message)} " \
        f"result=250 2.0.0 Ok: queued as {dsnID}" in lines
    assert f"{queueID}: sender non-delivery notification: {dsnID}" in texts(events)
    resultOf(qm.stopService())


@implementer(IHeaderStamper)
class FlakyStamper:
    """A stamper that fails its first C{failures} times (as one whose database is gone, or
    the spool's disk full, would refuse the message), then stamps nothing."""

    def __init__(self, failures: int) -> None:
        self.failures = failures

    def stamp(self, context: StampContext) -> StampResult:
        if self.failures:
            self.failures -= 1
            raise RuntimeError("the stamper's database is gone")
        return StampResult()


def test_notificationRefusedByAStamperIsOwedAgain(
    spool: Spool, router: FakeRouter, backend: FakeBackend, clock: Clock, events: Any
) -> None:
    """A stamper that fails refuses the bounce as it would any message: the recipient stays
    queued and the bounce is owed again at the next attempt."""

    backend.script["a@example.com"] = ["5"]
    qm = makeManager(spool, router, {"smtp": backend}, clock, stampers=[FlakyStamper(1)])
    qm.startService()
    queueID = queueMessage(spool, clock, ["a@example.com"])
    with capturedLogs():
        qm.enqueue(queueID)
    assert spool.queueIDs() == [queueID] and backend.bounces() == []
    assert stored(spool, queueID)["recipients"][0]["state"] == PENDING
    assert any(
        "queueing the failed notification to <sender@example.org> failed: 451 4.3.0" in t
        for t in texts(events, queueID)
    )
    clock.advance(300)
    [bounce] = backend.bounces()
    assert spool.queueIDs() == []
    resultOf(qm.stopService())


def test_mixedRecipientsStatePersisted(
    spool: Spool, router: FakeRouter, backend: FakeBackend, clock: Clock
) -> None:
    router.routes["example.org"] = Route("hold", "example.org")
    bounces = FakeBackend()
    bounces.hold = True
    backend.script.update({"b@example.net": ["4"], "c@example.com": ["5"]})
    qm = makeManager(spool, router, {"smtp": backend, "hold": bounces}, clock)
    qm.startService()
    queueID = queueMessage(spool, clock, ["a@example.com", "b@example.net", "c@example.com"])
    clock.advance(10)
    qm.enqueue(queueID)
    assert sorted(c.nexthop for c in backend.calls) == ["example.com", "example.net"]
    data = stored(spool, queueID)
    assert data["attempts"] == 1
    assert data["nextAttempt"] == START + 10 + 300
    a, b, c = data["recipients"]
    assert (a["state"], a["status"], a["finalTime"]) == (DELIVERED, "2.0.0", START + 10)
    assert (b["state"], b["status"], b["finalTime"], b["attempts"]) == (PENDING, "4.2.0", None, 1)
    assert (c["state"], c["status"]) == (BOUNCED, "5.1.1")
    assert c["lastResult"] == "smtp; 550 5.1.1 user unknown"
    [call] = bounces.calls
    blocks = recipientBlocks(call.message)
    assert [blk["Final-Recipient"] for blk in blocks] == ["rfc822; c@example.com"]

    # The next attempt only goes to b.
    backend.script["b@example.net"] = ["2"]
    clock.advance(300)
    assert backend.calls[-1].addresses == ["b@example.net"]
    assert spool.queueIDs() == [call.queueID]  # only the held bounce is left
    bounces.release()
    resultOf(qm.stopService())


def test_expiryBouncesWithTheLastReasonsStatus(
    spool: Spool, router: FakeRouter, backend: FakeBackend, clock: Clock, events: Any
) -> None:
    """A message past its lifetime is returned with the status and diagnostic of the last
    attempt (Postfix's qmgr returns the defer log, adefer_flush() in qmgr_active.c: its
    recorded reasons, not a status of its own); the text says it expired."""
    backend.script["a@example.com"] = ["4"]
    qm = makeManager(spool, router, {"smtp": backend}, clock, maxLifetime=1000)
    qm.startService()
    queueID = queueMessage(spool, clock, ["a@example.com"])
    qm.enqueue(queueID)
    clock.advance(300)  # t=300
    clock.advance(600)  # t=900
    assert stored(spool, queueID)["recipients"][0]["state"] == PENDING
    clock.advance(1200)  # t=2100 > 1000: last attempt, then bounced
    assert [c.addresses for c in backend.calls[:4]] == [["a@example.com"]] * 4
    [bounce] = backend.bounces()
    [block] = recipientBlocks(bounce.message)
    assert block["Action"] == "failed"
    assert block["Status"] == "4.2.0"
    assert block["Diagnostic-Code"] == "smtp; 451 4.2.0 try later"
    text = parse(bounce.message).get_body(("plain",))
    assert text is not None
    # (With the host of the last attempt, its Remote-MTA, as Postfix's defer log says it.)
    assert ("<a@example.com>: message expired after 35 minutes in the queue; the last "
            "attempt: host mx.example.com said: 451 4.2.0 try later"
            ) in " ".join(text.get_content().split())
    assert spool.queueIDs() == []
    assert any("status=bounced (message expired" in t for t in texts(events, queueID))
    resultOf(qm.stopService())


def test_anAttemptExactlyAtTheLifetimeBounces(
    spool: Spool, router: FakeRouter, backend: FakeBackend, clock: Clock, events: Any
) -> None:
    """An attempt that fails at exactly the message's arrival plus its lifetime is its last:
    the recipient bounces (with its last reason's status), as Postfix's qmgr gives up when C{event_time() >=
    create_time + maximal_queue_lifetime} (qmgr_active.c); the attempt before it does not."""
    backend.script["a@example.com"] = ["4"]
    qm = makeManager(spool, router, {"smtp": backend}, clock, maxLifetime=900)
    qm.startService()
    queueID = queueMessage(spool, clock, ["a@example.com"])
    arrival = stored(spool, queueID)["arrival"]
    qm.enqueue(queueID)
    clock.advance(300)  # t=300
    assert stored(spool, queueID)["recipients"][0]["state"] == PENDING
    clock.advance(600)  # t=900: exactly the lifetime
    assert clock.seconds() - arrival == 900
    assert [c.addresses for c in backend.calls if not c.isBounce] == [["a@example.com"]] * 3
    [bounce] = backend.bounces()
    [block] = recipientBlocks(bounce.message)
    assert (block["Action"], block["Status"]) == ("failed", "4.2.0")
    assert spool.queueIDs() == []
    assert any("status=bounced (message expired after 900s" in t for t in texts(events, queueID))
    resultOf(qm.stopService())


def test_notifyNeverNoBounce(
    spool: Spool, router: FakeRouter, backend: FakeBackend, clock: Clock
) -> None:
    backend.script["a@example.com"] = ["5"]
    qm = makeManager(spool, router, {"smtp": backend}, clock)
    qm.startService()
    queueID = queueMessage(spool, clock, [Recipient("a@example.com", notify=("NEVER",))])
    qm.enqueue(queueID)
    assert spool.queueIDs() == []
    assert backend.bounces() == []
    assert len(backend.calls) == 1
    resultOf(qm.stopService())


def test_notifySuccessOnlyNoBounce(
    spool: Spool, router: FakeRouter, backend: FakeBackend, clock: Clock
) -> None:
    backend.script["a@example.com"] = ["5"]
    qm = makeManager(spool, router, {"smtp": backend}, clock)
    qm.startService()
    qm.enqueue(queueMessage(spool, clock, [Recipient("a@example.com", notify=("SUCCESS",))]))
    assert backend.bounces() == []
    assert spool.queueIDs() == []
    resultOf(qm.stopService())


def test_successNotification(
    spool: Spool, router: FakeRouter, backend: FakeBackend, clock: Clock
) -> None:
    qm = makeManager(spool, router, {"smtp": backend}, clock)
    qm.startService()
    qm.enqueue(
        queueMessage(
            spool,
            clock,
            [Recipient("a@example.com", notify=("SUCCESS", "FAILURE")), Recipient("b@example.com")],
        )
    )
    [dsn] = backend.bounces()
    assert parse(dsn.message)["Subject"] == "Successful Mail Delivery Report"
    [block] = recipientBlocks(dsn.message)
    assert (block["Final-Recipient"], block["Action"], block["Status"]) == (
        "rfc822; a@example.com",
        "relayed",
        "2.0.0",
    )
    assert spool.queueIDs() == []
    resultOf(qm.stopService())


def test_successNotificationThatCannotBeQueuedIsOwedWithoutDeliveringAgain(
    spool: Spool, router: FakeRouter, backend: FakeBackend, clock: Clock, events: Any
) -> None:
    """A success notification (NOTIFY=SUCCESS) the spool cannot take (a full disk: here a
    stamper that fails) is owed, not lost: the recipient stays delivered (never sent again),
    the entry stays queued and the notification is queued at its next attempt, as Postfix's
    sent() defers a recipient whose trace record fails (global/sent.c) -- but without a
    second delivery."""

    qm = makeManager(spool, router, {"smtp": backend}, clock, stampers=[FlakyStamper(2)])
    qm.startService()
    queueID = queueMessage(
        spool, clock, [Recipient("a@example.com", notify=("SUCCESS",)), Recipient("b@example.com")]
    )
    with capturedLogs():
        qm.enqueue(queueID)
    assert sorted(backend.addressesDelivered()) == ["a@example.com", "b@example.com"]
    assert backend.bounces() == [] and spool.queueIDs() == [queueID]
    recipients = stored(spool, queueID)["recipients"]
    assert [r["state"] for r in recipients] == [DELIVERED, DELIVERED]
    assert recipients[0]["noticeOwed"] == "relayed" and "noticeOwed" not in recipients[1]
    assert any(
        "delivery status notification to <sender@example.org> not queued; owed for "
        "<a@example.com>, queued at the next attempt (the message is not delivered again)" in t
        for t in texts(events, queueID)
    )
    with capturedLogs():
        clock.advance(300)  # the spool still refuses: owed again, nothing delivered again
    assert backend.bounces() == [] and spool.queueIDs() == [queueID]
    assert len(backend.calls) == 1
    clock.advance(600)
    [dsn] = backend.bounces()
    assert parse(dsn.message)["Subject"] == "Successful Mail Delivery Report"
    [block] = recipientBlocks(dsn.message)
    assert (block["Final-Recipient"], block["Action"]) == ("rfc822; a@example.com", "relayed")
    assert len(backend.calls) == 2 and spool.queueIDs() == []
    resultOf(qm.stopService())


def test_nullSenderFailureDiscarded(
    spool: Spool, router: FakeRouter, backend: FakeBackend, clock: Clock, events: Any
) -> None:
    backend.script["a@example.com"] = ["5"]
    qm = makeManager(spool, router, {"smtp": backend}, clock)
    qm.startService()
    queueID = queueMessage(spool, clock, ["a@example.com"], sender="")
    qm.enqueue(queueID)
    assert spool.queueIDs() == []
    assert len(backend.calls) == 1
    assert any("undeliverable bounce discarded" in t for t in texts(events, queueID))
    resultOf(qm.stopService())


def test_failedBounceGoesToPostmasterOnce(
    spool: Spool, router: FakeRouter, backend: FakeBackend, clock: Clock, events: Any
) -> None:
    backend.script["a@example.com"] = ["5"]
    backend.script["postmaster@relay.test"] = ["5"]
    qm = makeManager(spool, router, {"smtp": backend}, clock, postmaster="postmaster@relay.test")
    qm.startService()
    queueID = queueMessage(spool, clock, ["a@example.com"], sender="", isBounce=True)
    qm.enqueue(queueID)
    # The bounce failed -> one notice to the postmaster, which failed too -> dropped.
    assert [c.addresses for c in backend.calls] == [["a@example.com"], ["postmaster@relay.test"]]
    notice = backend.calls[1]
    assert notice.sender == "" and notice.isBounce
    report = parse(notice.message)
    assert report["To"].addresses[0].addr_spec == "postmaster@relay.test"
    [block] = recipientBlocks(notice.message)
    assert block["Final-Recipient"] == "rfc822; a@example.com"
    assert spool.queueIDs() == []
    noticeLines = texts(events, notice.queueID)
    assert any("undeliverable postmaster notification discarded" in t for t in noticeLines)
    expected = f"postmaster non-delivery notification: {notice.queueID}"
    assert any(expected in t for t in texts(events, queueID))
    resultOf(qm.stopService())


def test_postmasterNoticeMarked(
    spool: Spool, router: FakeRouter, backend: FakeBackend, clock: Clock
) -> None:
    router.routes["relay.test"] = Route("hold", "relay.test")
    hold = FakeBackend()
    hold.hold = True
    backend.script["a@example.com"] = ["5"]
    backends = {"smtp": backend, "hold": hold}
    qm = makeManager(spool, router, backends, clock, postmaster="postmaster@relay.test")
    qm.startService()
    qm.enqueue(queueMessage(spool, clock, ["a@example.com"], sender=""))
    [noticeID] = spool.queueIDs()
    notice = spool.loadEnvelope(noticeID)
    assert notice.client is not None and notice.client.listener == POSTMASTER_SOURCE
    hold.release()
    resultOf(qm.stopService())


def test_delayWarningSentOnce(
    spool: Spool, router: FakeRouter, backend: FakeBackend, clock: Clock
) -> None:
    backend.script["a@example.com"] = ["4"]
    backend.script["b@example.com"] = ["4"]
    qm = makeManager(spool, router, {"smtp": backend}, clock, delayWarning=500)
    qm.startService()
    queueID = queueMessage(
        spool, clock, ["a@example.com", Recipient("b@example.com", notify=("FAILURE",))]
    )
    qm.enqueue(queueID)
    clock.advance(300)
    assert backend.bounces() == []
    assert stored(spool, queueID)["delayWarned"] is False
    clock.advance(600)  # t=900 >= 500
    [warning] = backend.bounces()
    assert stored(spool, queueID)["delayWarned"] is True
    report = parse(warning.message)
    assert report["Subject"] == "Delayed Mail (still being retried)"
    [block] = recipientBlocks(warning.message)  # b did not ask for delay notices
    assert block["Final-Recipient"] == "rfc822; a@example.com"
    assert block["Action"] == "delayed"
    assert block["Status"] == "4.2.0"
    assert block["Will-Retry-Until"]
    clock.advance(1200)
    clock.advance(2400)
    assert len(backend.bounces()) == 1
    assert len(spool.queueIDs()) == 1
    resultOf(qm.stopService())


# --- restart, window, shutdown -----------------------------------------------------------------


def test_restartResumesPendingOnly(
    spool: Spool, router: FakeRouter, backend: FakeBackend, clock: Clock
) -> None:
    backend.script["b@example.com"] = ["4", "2"]
    qm = makeManager(spool, router, {"smtp": backend}, clock)
    qm.startService()
    queueID = queueMessage(spool, clock, ["a@example.com", "b@example.com"])
    qm.enqueue(queueID)
    resultOf(qm.stopService())
    assert clock.getDelayedCalls() == []
    assert backend.addressesDelivered() == ["a@example.com", "b@example.com"]

    fresh = FakeBackend()
    qm2 = makeManager(spool, router, {"smtp": fresh}, clock)
    clock.advance(100)
    qm2.startService()
    assert fresh.calls == []  # loaded, found not due yet, rescheduled
    assert qm2.scheduledCount == 1 and qm2.activeCount == 0
    assert qm2.snapshot()["scheduled"] == [(START + 300, queueID)]
    clock.advance(200)
    assert fresh.addressesDelivered() == ["b@example.com"]
    assert spool.queueIDs() == []
    resultOf(qm2.stopService())


def test_restartAfterTheClockSteppedBackDoesNotWaitForTheStep(
    spool: Spool, router: FakeRouter, backend: FakeBackend, clock: Clock
) -> None:
    """A next attempt stored further than max_backoff ahead was decided on a clock since
    stepped back (while the relay was down: a clock ahead corrected at boot): it is made at
    once, not when the clock reaches it again."""
    backend.script["b@example.com"] = ["4"]
    qm = makeManager(spool, router, {"smtp": backend}, clock, maxBackoff=4000)
    qm.startService()
    queueID = queueMessage(spool, clock, ["b@example.com"])
    qm.enqueue(queueID)
    resultOf(qm.stopService())
    assert spool.loadEnvelope(queueID).nextAttempt == START + 300

    clock.rightNow -= 3 * 3600
    fresh = FakeBackend()
    qm2 = makeManager(spool, router, {"smtp": fresh}, clock, maxBackoff=4000)
    with capturedLogs() as events:
        qm2.startService()
    assert fresh.addressesDelivered() == ["b@example.com"]
    assert spool.queueIDs() == []
    [text] = [formatEvent(e) for e in events if "beyond max_backoff" in formatEvent(e)]
    assert text == (
        f"{queueID}: its next attempt was due in 3:05:00, beyond max_backoff (4000s): the "
        "clock was stepped back since (or max_backoff lowered); attempted now"
    )
    resultOf(qm2.stopService())


def test_restartDeliversEverythingCommitted(
    spool: Spool, router: FakeRouter, backend: FakeBackend, clock: Clock
) -> None:
    ids = [queueMessage(spool, clock, [f"r{i}@example.com"]) for i in range(3)]
    qm = makeManager(spool, router, {"smtp": backend}, clock)
    qm.startService()
    assert [c.queueID for c in backend.calls] == ids  # in arrival order
    assert spool.queueIDs() == []
    resultOf(qm.stopService())


def test_activeWindowBounded(
    spool: Spool, router: FakeRouter, backend: FakeBackend, clock: Clock
) -> None:
    backend.hold = True
    ids = [queueMessage(spool, clock, [f"r{i}@example.com"]) for i in range(50)]
    qm = makeManager(spool, router, {"smtp": backend}, clock, activeLimit=5)
    qm.startService()
    maxInFlight = 0
    while backend.held:
        maxInFlight = max(maxInFlight, len(backend.held))
        assert qm.activeCount == len(backend.held) <= 5
        assert qm.activeCount + qm.scheduledCount == len(spool.queueIDs())
        backend.release(2)
    assert maxInFlight == 5
    assert sorted(c.queueID for c in backend.calls) == ids
    assert spool.queueIDs() == []
    assert qm.activeCount == qm.scheduledCount == 0
    resultOf(qm.stopService())


def test_newEntryWaitsForRoomInWindow(
    spool: Spool, router: FakeRouter, backend: FakeBackend, clock: Clock
) -> None:
    backend.hold = True
    qm = makeManager(spool, router, {"smtp": backend}, clock, activeLimit=1)
    qm.startService()
    first = queueMessage(spool, clock, ["a@example.com"])
    qm.enqueue(first)
    second = queueMessage(spool, clock, ["b@example.com"])
    qm.enqueue(second)
    assert qm.snapshot()["active"] == [first]
    assert qm.scheduledCount == 1
    backend.release()
    assert qm.snapshot()["active"] == [second]
    backend.release()
    assert spool.queueIDs() == []
    resultOf(qm.stopService())


def test_newMailAndRetriesTakeTurnsInTheWindow(
    spool: Spool, router: FakeRouter, backend: FakeBackend, clock: Clock
) -> None:
    """While retries due (here, what the start found) wait for room in the active window,
    new mail gets every other free place, as Postfix's queue manager round-robins its
    incoming and deferred queues: a wave of retries due at once (for a slow destination)
    does not keep new mail out until it is all done.  It used to wait behind them all."""
    backend.hold = True
    old = [queueMessage(spool, clock, [f"r{i}@example.com"]) for i in range(4)]
    qm = makeManager(spool, router, {"smtp": backend}, clock, activeLimit=1)
    qm.startService()
    new = [queueMessage(spool, clock, [f"n{i}@example.com"]) for i in range(2)]
    for queueID in new:
        qm.enqueue(queueID)
    order = [qm.snapshot()["active"][0]]
    while backend.held:
        backend.release()
        order += qm.snapshot()["active"]
    assert order == [old[0], new[0], old[1], new[1], old[2], old[3]]
    resultOf(qm.stopService())


def test_startupLoadsInBatches(
    spool: Spool, router: FakeRouter, backend: FakeBackend, clock: Clock, monkeypatch: Any
) -> None:
    monkeypatch.setattr(schedulerModule, "_LOADS_PER_TURN", 4)
    ids = [
        queueMessage(spool, clock, [f"r{i}@example.com"], nextAttempt=START + 1000)
        for i in range(10)
    ]
    loads: list[str] = []
    realLoad = spool.loadEnvelope

    def loadEnvelope(queueID: str) -> Envelope:
        loads.append(queueID)
        return realLoad(queueID)

    monkeypatch.setattr(spool, "loadEnvelope", loadEnvelope)
    qm = makeManager(spool, router, {"smtp": backend}, clock)
    qm.startService()
    assert loads == ids[:4]  # the rest in later reactor turns
    assert [c.getTime() for c in schedulerTimers(clock)] == [START]
    clock.advance(0)  # (a Clock runs the turns it schedules at once)
    assert loads == ids
    assert backend.calls == []
    assert qm.scheduledCount == 10
    clock.advance(1000)
    assert sorted(c.queueID for c in backend.calls) == ids
    resultOf(qm.stopService())


def test_stopWaitsForInFlight(
    spool: Spool, router: FakeRouter, backend: FakeBackend, clock: Clock
) -> None:
    backend.hold = True
    qm = makeManager(spool, router, {"smtp": backend}, clock)
    qm.startService()
    queueID = queueMessage(spool, clock, ["a@example.com"])
    other = queueMessage(spool, clock, ["b@example.com"])
    qm.enqueue(queueID)
    stopped = qm.stopService()
    assert not stopped.called
    qm.enqueue(other)  # after stop: ignored, the next start finds it
    backend.release()
    assert stopped.called
    assert spool.queueIDs() == [other]
    assert len(backend.calls) == 1
    assert clock.getDelayedCalls() == []


def test_stopGivesUpAfterTimeout(
    spool: Spool, router: FakeRouter, backend: FakeBackend, clock: Clock, events: Any
) -> None:
    """After the drain time, a delivery still running is cut short: its recipients are
    recorded as deferred (interrupted), not lost, and a late answer is ignored."""
    backend.hold = True
    qm = makeManager(spool, router, {"smtp": backend}, clock, stopTimeout=5)
    qm.startService()
    queueID = queueMessage(spool, clock, ["a@example.com"])
    qm.enqueue(queueID)
    stopped = qm.stopService()
    clock.advance(4.9)
    assert not stopped.called
    clock.advance(0.1)
    assert stopped.called and qm.activeCount == 0
    assert spool.queueIDs() == [queueID]  # not lost
    [r] = stored(spool, queueID)["recipients"]
    assert (r["state"], r["status"]) == (PENDING, "4.3.0")
    assert r["lastResult"] == (
        "X-mailrelay; delivery via smtp:example.com interrupted: the relay was stopping (the "
        "next hop may have received the message)"
    )
    backend.release()  # too late: ignored
    assert stored(spool, queueID)["recipients"][0]["state"] == PENDING
    assert any("interrupted: the relay is stopping" in t for t in texts(events, queueID))
    # Due at the next start, as Postfix's qmgr takes its active queue again at once: not a
    # back-off for an attempt the stop, not the next hop, cut short.
    assert stored(spool, queueID)["nextAttempt"] <= clock.seconds()


def test_boundCallFiresWhateverTheCallDoes() -> None:
    """L{Calls.bound}: a time-out or an interruption ends the call even when the Deferred
    ignores its cancellation; a late result is dropped."""
    clock = Clock()
    calls = Calls(clock)
    later: list[Deferred[Any]] = []

    async def deaf() -> str:
        """A call that shrugs its cancellation off and goes on waiting."""
        first: Deferred[str] = Deferred()
        try:
            return await first
        except CancelledError:
            later.append(Deferred())
            return await later[-1]

    bounded = calls.bound(Deferred.fromCoroutine(deaf()), 10, lambda result, timeout: (
        _ for _ in ()).throw(TimeoutError(f"after {timeout}")))
    assert len(calls) == 1
    clock.advance(10)
    assert len(later) == 1  # it was cancelled, and ignored it
    with pytest.raises(TimeoutError, match="after 10"):
        resultOf(bounded)
    later[0].callback("late")
    assert len(calls) == 0
    interrupted = calls.bound(Deferred.fromCoroutine(deaf()), 0)  # no time limit
    clock.advance(1000)
    assert not interrupted.called
    calls.interrupt()
    assert calls.interrupted and len(later) == 2
    with pytest.raises(CancelledError):
        resultOf(interrupted)
    later[1].callback("late")
    calls.reset()
    assert not calls.interrupted
    fine = calls.bound(succeed("now"), 10)
    assert resultOf(fine) == "now" and len(calls) == 0 and not clock.getDelayedCalls()


# --- failures ----------------------------------------------------------------------------------


def failingUpdates(spool: Spool, monkeypatch: Any, failures: list[Exception]) -> None:
    """C{spool}'s envelope updates fail with the errors in C{failures} (taken in turn),
    then work."""
    realUpdate = spool.updateEnvelope

    def updateEnvelope(envelope: Envelope) -> Deferred[None]:
        if failures:
            return fail(failures.pop())
        return realUpdate(envelope)

    monkeypatch.setattr(spool, "updateEnvelope", updateEnvelope)


def test_updateFailureKeepsEntryAndRetries(
    spool: Spool,
    router: FakeRouter,
    backend: FakeBackend,
    clock: Clock,
    monkeypatch: Any,
    events: Any,
) -> None:
    failingUpdates(spool, monkeypatch, [SpoolError("disk on fire")])
    backend.script["a@example.com"] = ["4", "2"]
    qm = makeManager(spool, router, {"smtp": backend}, clock)
    qm.startService()
    queueID = queueMessage(spool, clock, ["a@example.com"])
    qm.enqueue(queueID)
    assert spool.queueIDs() == [queueID]
    assert stored(spool, queueID)["attempts"] == 0  # the update did not happen
    expected = "saving the delivery state failed: disk on fire"
    assert any(expected in t for t in texts(events, queueID))
    assert qm.scheduledCount == 1
    clock.advance(300)
    assert len(backend.calls) == 2
    assert spool.queueIDs() == []
    resultOf(qm.stopService())


def deliverOneDeferOne(
    spool: Spool, router: FakeRouter, backend: FakeBackend, clock: Clock, later: list[str]
) -> tuple[QueueManager, str]:
    """A started queue manager's first attempt of a message to C{ok@example.com}
    (delivered) and C{later@example.com} (answered as C{later} says, in turn)."""
    backend.script["ok@example.com"] = ["2"]
    backend.script["later@example.com"] = later
    qm = makeManager(spool, router, {"smtp": backend}, clock)
    qm.startService()
    queueID = queueMessage(spool, clock, ["ok@example.com", "later@example.com"])
    qm.enqueue(queueID)
    assert sorted(backend.calls[0].addresses) == ["later@example.com", "ok@example.com"]
    return qm, queueID


def test_aRecipientDeliveredIsNotSentAgainWhileTheStateCannotBeSaved(
    spool: Spool,
    router: FakeRouter,
    backend: FakeBackend,
    clock: Clock,
    monkeypatch: Any,
    events: Any,
) -> None:
    """One recipient delivered, one deferred, and the spool cannot save that (its disk is
    full): the next attempts send the deferred one only, as long as the relay runs; the
    state is saved once the spool takes it.  Every attempt sent both again (eight copies to
    the delivered recipient in 24 s with min_backoff = 3)."""
    full = [SpoolError("writing ... failed: No space left on device") for _ in range(2)]
    failingUpdates(spool, monkeypatch, full)
    qm, queueID = deliverOneDeferOne(spool, router, backend, clock, ["4", "4", "2"])
    assert any("saving the delivery state failed" in t and "kept in memory" in t
               for t in texts(events, queueID)), texts(events, queueID)
    clock.advance(300)
    assert backend.calls[-1].addresses == ["later@example.com"]  # not ok@ again
    assert not full  # (both attempts' saves failed; the next works)
    clock.advance(600)
    assert backend.calls[-1].addresses == ["later@example.com"]
    assert spool.queueIDs() == [] and len(backend.calls) == 3
    resultOf(qm.stopService())


def test_theStateNotSavedIsSavedAtTheStop(
    spool: Spool,
    router: FakeRouter,
    backend: FakeBackend,
    clock: Clock,
    monkeypatch: Any,
    events: Any,
) -> None:
    """One recipient delivered, one deferred, and the spool cannot save that (its disk is
    full); space returns before the next attempt, and the relay is stopped or reloaded (a
    new queue manager takes over): the stop saves the state kept in memory, so that the next
    manager does not send the message again to the recipient delivered.  It was forgotten,
    and the next manager delivered it a second time, with nothing logged at the stop."""
    failingUpdates(spool, monkeypatch, [SpoolError("writing ... failed: No space left")])
    qm, queueID = deliverOneDeferOne(spool, router, backend, clock, ["4"])
    resultOf(qm.stopService())
    assert [r["state"] for r in stored(spool, queueID)["recipients"]] == [DELIVERED, PENDING]
    assert any("delivery state saved at the stop" in t for t in texts(events, queueID))
    following = makeManager(spool, router, {"smtp": backend}, clock)
    following.startService()
    clock.advance(300)
    assert backend.calls[-1].addresses == ["later@example.com"]  # not ok@ again
    resultOf(following.stopService())


def test_theStateStillNotSavedAtTheStopIsLogged(
    spool: Spool,
    router: FakeRouter,
    backend: FakeBackend,
    clock: Clock,
    monkeypatch: Any,
    events: Any,
) -> None:
    """The spool still refuses the state at the stop: the log says which recipients the
    next start delivers to again, as it cannot know they were (Postfix's delivery agents
    say as much, in a fatal error, when they cannot mark a recipient done)."""
    full = [SpoolError("writing ... failed: No space left") for _ in range(2)]
    failingUpdates(spool, monkeypatch, full)
    qm, queueID = deliverOneDeferOne(spool, router, backend, clock, ["4"])
    resultOf(qm.stopService())
    assert not full
    assert [r["state"] for r in stored(spool, queueID)["recipients"]] == [PENDING, PENDING]
    lines = texts(events, queueID)
    assert any(
        "saving the delivery state failed at the stop too: writing ... failed: No space left"
        in t and "<ok@example.com>" in t and "may be delivered twice" in t
        and "later@example.com" not in t
        for t in lines
    ), lines


def test_aDeferralNotSavedAtTheStopSaysNothingIsRepeated(
    spool: Spool, router: FakeRouter, backend: FakeBackend, clock: Clock, monkeypatch: Any,
    events: Any,
) -> None:
    """Only a deferral kept in memory (the spool full at its attempt and at the stop): the
    log says no recipient will be repeated, not "may be delivered twice:" with none."""
    full = [SpoolError("No space left") for _ in range(2)]
    failingUpdates(spool, monkeypatch, full)
    backend.script["later@example.com"] = ["4"]
    qm = makeManager(spool, router, {"smtp": backend}, clock)
    qm.startService()
    queueID = queueMessage(spool, clock, ["later@example.com"])
    qm.enqueue(queueID)
    resultOf(qm.stopService())
    (line,) = [t for t in texts(events, queueID) if "at the stop too" in t]
    assert "twice" not in line and "no recipient was done since it was last saved" in line


def test_aRemovalNotDoneIsDoneAtTheStop(
    spool: Spool, router: FakeRouter, backend: FakeBackend, clock: Clock, monkeypatch: Any
) -> None:
    """Every recipient delivered, and the spool can neither remove the entry nor save its
    state (a file system gone read-only): the stop tries the removal again, and the next
    manager does not deliver the message a second time."""
    failingUpdates(spool, monkeypatch, [SpoolError("Read-only file system")])
    realRemove = spool.remove
    removals = [SpoolError("Read-only file system")]

    def remove(queueID: str) -> Deferred[None]:
        return fail(removals.pop()) if removals else realRemove(queueID)

    monkeypatch.setattr(spool, "remove", remove)
    qm = makeManager(spool, router, {"smtp": backend}, clock)
    qm.startService()
    queueID = queueMessage(spool, clock, ["ok@example.com"])
    qm.enqueue(queueID)
    assert len(backend.calls) == 1 and spool.queueIDs() == [queueID]
    resultOf(qm.stopService())
    assert spool.queueIDs() == []
    following = makeManager(spool, router, {"smtp": backend}, clock)
    following.startService()
    clock.advance(300)
    assert len(backend.calls) == 1
    resultOf(following.stopService())


def test_rescanFindsEntriesNobodyAnnounced(
    spool: Spool, router: FakeRouter, backend: FakeBackend, clock: Clock, events: Any
) -> None:
    """An acceptor process killed after its commit, before telling the relay: the entry is
    in the spool, and nobody enqueues it -- it waited for a restart or a flush (days, and
    the client, which got no 250, sent it again meanwhile).  rescan() schedules the entries
    the queue manager does not know, and only those."""
    qm = makeManager(spool, router, {"smtp": backend}, clock)
    qm.startService()
    known = queueMessage(spool, clock, ["known@example.com"])
    backend.script["known@example.com"] = ["4"]
    qm.enqueue(known)  # deferred: scheduled for later
    stranded = queueMessage(spool, clock, ["stranded@example.com"])  # never enqueued
    assert [c.addresses for c in backend.calls] == [["known@example.com"]]
    assert qm.rescan() == 1
    assert [c.addresses for c in backend.calls] == [["known@example.com"],
                                                    ["stranded@example.com"]]
    assert spool.queueIDs() == [known] and stranded not in spool.queueIDs()
    assert any("not known" in t for t in texts(events))
    resultOf(qm.stopService())


def test_periodicRescanTakesEntriesNobodyAnnounced(
    spool: Spool, router: FakeRouter, backend: FakeBackend, clock: Clock, events: Any
) -> None:
    """A notification lost with no event to trigger a rescan (an acceptor process of a
    relay killed with C{kill -9} commits after the new relay's delivery process scanned the
    spool, and nobody can tell it): the queue manager looks into the spool every
    C{rescanInterval} seconds (300 by default, as Postfix's qmgr wakes up), and takes an
    entry still unknown at a second look a few seconds later -- never one whose commit is in
    flight (its client may be told to retry) or whose notification is on its way."""
    qm = makeManager(spool, router, {"smtp": backend}, clock)
    qm.startService()
    known = queueMessage(spool, clock, ["known@example.com"])
    backend.script["known@example.com"] = ["4"] * 10
    qm.enqueue(known)  # deferred: scheduled for later

    def others() -> list[list[str]]:
        return [c.addresses for c in backend.calls if c.addresses != ["known@example.com"]]

    stranded = queueMessage(spool, clock, ["stranded@example.com"])  # never enqueued
    clock.advance(299)
    assert others() == []
    late = queueMessage(spool, clock, ["late@example.com"])  # its notification is on its way
    clock.advance(1)  # the first look: both unknown
    assert others() == []
    qm.enqueue(late)  # arrives between the two looks
    assert others() == [["late@example.com"]]
    later = queueMessage(spool, clock, ["later@example.com"])  # never enqueued either
    clock.advance(5)  # the second look: only the stranded one is still unknown
    assert others() == [["late@example.com"], ["stranded@example.com"]]
    assert spool.queueIDs() == [known, later]
    assert any("not known" in t for t in texts(events, stranded))
    clock.advance(299)  # what the second look saw first waits for the next regular look
    assert others() == [["late@example.com"], ["stranded@example.com"]]
    clock.advance(1)
    assert others() == [["late@example.com"], ["stranded@example.com"], ["later@example.com"]]
    clock.advance(900)  # more looks take nothing twice (the known one is only retried)
    assert others() == [["late@example.com"], ["stranded@example.com"], ["later@example.com"]]
    assert spool.queueIDs() == [known]
    resultOf(qm.stopService())
    assert clock.getDelayedCalls() == []


def test_periodicRescanLeavesHeldAndVanishedEntries(
    spool: Spool, router: FakeRouter, backend: FakeBackend, clock: Clock
) -> None:
    """An entry on hold stays held; one seen once and gone at the second look (a commit
    undone after its directory fsync failed) is not scheduled."""
    held = queueMessage(spool, clock, ["held@example.com"], held=True)
    qm = makeManager(spool, router, {"smtp": backend}, clock, rescanInterval=60.0)
    qm.startService()
    assert backend.calls == [] and qm.scheduledCount == 0
    undone = queueMessage(spool, clock, ["undone@example.com"])
    clock.advance(60)
    resultOf(spool.remove(undone))
    clock.advance(5)
    assert backend.calls == [] and qm.scheduledCount == 0 and spool.queueIDs() == [held]
    clock.advance(120)
    assert backend.calls == []
    resultOf(qm.stopService())


def test_removeFailureRetried(
    spool: Spool, router: FakeRouter, backend: FakeBackend, clock: Clock, monkeypatch: Any
) -> None:
    realRemove = spool.remove
    failures = [SpoolError("EIO")]

    def remove(queueID: str) -> Deferred[None]:
        if failures:
            return fail(failures.pop())
        return realRemove(queueID)

    monkeypatch.setattr(spool, "remove", remove)
    qm = makeManager(spool, router, {"smtp": backend}, clock)
    qm.startService()
    queueID = queueMessage(spool, clock, ["a@example.com"])
    qm.enqueue(queueID)
    assert spool.queueIDs() == [queueID]
    assert stored(spool, queueID)["recipients"][0]["state"] == DELIVERED
    clock.advance(300)
    assert len(backend.calls) == 1  # nothing pending: only the removal is repeated
    assert spool.queueIDs() == []
    resultOf(qm.stopService())


def test_bounceCommitFailureKeepsRecipientPending(
    spool: Spool, router: FakeRouter, backend: FakeBackend, clock: Clock, monkeypatch: Any,
    events: Any,
) -> None:
    queueID = queueMessage(spool, clock, ["a@example.com"])
    realOpen = spool.openMessage
    failures = [SpoolError("no space")]

    def openMessage(queueID: str | None = None) -> Any:
        if failures:
            raise failures.pop()
        return realOpen(queueID)

    monkeypatch.setattr(spool, "openMessage", openMessage)
    backend.script["a@example.com"] = ["5"]
    qm = makeManager(spool, router, {"smtp": backend}, clock)
    qm.startService()
    assert spool.queueIDs() == [queueID]
    rcpt = stored(spool, queueID)["recipients"][0]
    assert rcpt["state"] == PENDING and rcpt["status"] == "5.1.1"
    (line,) = [t for t in texts(events, queueID) if "to=<a@example.com>" in t]
    assert "status=deferred (" in line and line.endswith("; the bounce could not be queued, will retry)")
    clock.advance(300)  # fails permanently again; the bounce is queued this time
    assert len(backend.bounces()) == 1
    assert "status=bounced (" in [t for t in texts(events, queueID) if "to=<a@example.com>" in t][1]
    assert spool.queueIDs() == []
    resultOf(qm.stopService())


def test_unknownBackendIsTransient(
    spool: Spool, router: FakeRouter, backend: FakeBackend, clock: Clock, events: Any
) -> None:
    router.routes["example.net"] = Route("nosuch", "example.net")
    qm = makeManager(spool, router, {"smtp": backend}, clock)
    qm.startService()
    queueID = queueMessage(spool, clock, ["a@example.com", "b@example.net"])
    qm.enqueue(queueID)
    a, b = stored(spool, queueID)["recipients"]
    assert a["state"] == DELIVERED
    assert (b["state"], b["status"]) == (PENDING, "4.3.5")
    assert "unknown delivery backend" in b["lastResult"]
    errors = [e for e in events if e["log_level"].name == "error" and e.get("queueID") == queueID]
    assert errors and "nosuch" in formatEvent(errors[0])
    resultOf(qm.stopService())


def test_routerFailureIsTransient(
    spool: Spool, router: FakeRouter, backend: FakeBackend, clock: Clock
) -> None:
    router.routes["example.net"] = RuntimeError("map unavailable")
    qm = makeManager(spool, router, {"smtp": backend}, clock)
    qm.startService()
    queueID = queueMessage(spool, clock, ["b@example.net"])
    qm.enqueue(queueID)
    [b] = stored(spool, queueID)["recipients"]
    assert (b["state"], b["status"]) == (PENDING, "4.3.0")
    assert b["lastResult"].startswith("X-mailrelay; routing failed: ")
    assert "map unavailable" in b["lastResult"]
    assert backend.calls == []
    del router.routes["example.net"]
    clock.advance(300)
    assert spool.queueIDs() == []
    resultOf(qm.stopService())


class BrokenBackend:
    def __init__(self, answer: Callable[[list[Recipient]], Any]) -> None:
        self.answer = answer

    def deliver(self, envelope: Envelope, recipients: Any, route: Route, messagePath: Path) -> Any:
        return self.answer(list(recipients))


@pytest.mark.parametrize(
    "answer",
    [
        lambda rs: fail(RuntimeError("backend crashed")),
        lambda rs: (_ for _ in ()).throw(RuntimeError("raised synchronously")),
        lambda rs: succeed([result(rs[0].address, "2")]),  # one result for two recipients
        lambda rs: succeed([result(r.address, "2") for r in reversed(rs)]),  # out of order
        lambda rs: succeed(["delivered", "delivered"]),
    ],
    ids=["failed", "raised", "short", "reordered", "notResults"],
)
def test_badBackendAnswerIsTransient(
    spool: Spool, router: FakeRouter, clock: Clock, answer: Any
) -> None:
    qm = makeManager(spool, router, {"smtp": BrokenBackend(answer)}, clock)
    qm.startService()
    queueID = queueMessage(spool, clock, ["a@example.com", "b@example.com"])
    qm.enqueue(queueID)
    for r in stored(spool, queueID)["recipients"]:
        assert (r["state"], r["status"]) == (PENDING, "4.3.0")
    resultOf(qm.stopService())


def test_deliveryTimeout(
    spool: Spool, router: FakeRouter, backend: FakeBackend, clock: Clock
) -> None:
    backend.hold = True
    qm = makeManager(spool, router, {"smtp": backend}, clock, deliveryTimeout=60)
    qm.startService()
    queueID = queueMessage(spool, clock, ["a@example.com"])
    qm.enqueue(queueID)
    clock.advance(60)
    assert qm.activeCount == 0
    [r] = stored(spool, queueID)["recipients"]
    assert (r["state"], r["status"]) == (PENDING, "4.4.2")
    # (A backend that did not answer may have delivered: the log says so, as Postfix's "--
    # message may be sent more than once".)
    assert r["lastResult"] == (
        "X-mailrelay; delivery via smtp:example.com timed out after 60s (the next hop may "
        "have received the message: it may be sent more than once)"
    )
    backend.release()  # a late answer is ignored
    assert stored(spool, queueID)["recipients"][0]["state"] == PENDING
    resultOf(qm.stopService())


def test_deliveryLimit_deliveriesOverItWaitTheirTurn(
    spool: Spool, router: FakeRouter, backend: FakeBackend, clock: Clock
) -> None:
    """At most C{deliveryLimit} deliveries are in flight at once, over every message and
    destination (Postfix's default_process_limit); the others wait for a place, first come
    first served, and are delivered in the same attempt, not deferred."""
    backend.hold = True
    qm = makeManager(spool, router, {"smtp": backend}, clock, deliveryLimit=2)
    qm.startService()
    first = queueMessage(spool, clock, ["a@one.example", "b@two.example", "c@three.example"])
    second = queueMessage(spool, clock, ["d@four.example"])
    qm.enqueue(first)
    qm.enqueue(second)
    assert [c.nexthop for c in backend.calls] == ["one.example", "two.example"]
    assert qm.deliverer.places.waiting == 2
    backend.release(1)
    assert [c.nexthop for c in backend.calls][2:] == ["three.example"]
    backend.release()
    assert [c.nexthop for c in backend.calls][3:] == ["four.example"]
    backend.release()
    assert spool.queueIDs() == [] and backend.held == []
    assert sorted(backend.addressesDelivered()) == [
        "a@one.example", "b@two.example", "c@three.example", "d@four.example"
    ]
    assert qm.deliverer.places.running == 0
    resultOf(qm.stopService())


def test_deliveryLimit_placesInUseAndDeliveriesWaitingAreGauges(
    spool: Spool, router: FakeRouter, backend: FakeBackend, clock: Clock
) -> None:
    """The metrics collector of the queue managers serves the places of C{[queue]
    delivery_limit} in use and the deliveries waiting for one, as they are at the scrape."""
    from mailrelay import metrics

    collector = metrics._QueueStates()

    def gauges() -> dict[str, float]:
        return {s.name: s.value for family in collector.collect() for s in family.samples
                if s.name.startswith(("mailrelay_delivery_places", "mailrelay_deliveries"))}

    backend.hold = True
    qm = makeManager(spool, router, {"smtp": backend}, clock, deliveryLimit=2)
    collector.add(qm)
    assert {f.name for f in collector.describe()} >= {
        "mailrelay_delivery_places_in_use", "mailrelay_deliveries_waiting"}
    qm.startService()
    assert gauges() == {"mailrelay_delivery_places_in_use": 0,
                        "mailrelay_deliveries_waiting": 0}
    qm.enqueue(queueMessage(spool, clock, ["a@one.example", "b@two.example", "c@three.example"]))
    assert gauges() == {"mailrelay_delivery_places_in_use": 2,
                        "mailrelay_deliveries_waiting": 1}
    backend.release(1)
    assert gauges() == {"mailrelay_delivery_places_in_use": 2,
                        "mailrelay_deliveries_waiting": 0}
    backend.release()
    assert gauges() == {"mailrelay_delivery_places_in_use": 0,
                        "mailrelay_deliveries_waiting": 0}
    resultOf(qm.stopService())


def test_deliveryLimit_theTimeoutRunsFromTheDeliverysPlace(
    spool: Spool, router: FakeRouter, backend: FakeBackend, clock: Clock, events: Any
) -> None:
    """The wait for a place is not part of a delivery's timeout (as Postfix's queue manager
    never times out its wait for a delivery agent): a delivery waiting far longer than its
    timeout is neither deferred nor cut short once it starts; its timeout runs from when it
    gets its place."""
    slow = FakeBackend()
    slow.hold = backend.hold = True
    router.routes["one.example"] = Route("slow", "one.example")
    qm = makeManager(
        spool,
        router,
        {"smtp": backend, "slow": slow},
        clock,
        timeouts={"slow": 600},
        deliveryLimit=1,
        deliveryTimeout=60,
    )
    qm.startService()
    queueID = queueMessage(spool, clock, ["a@one.example", "b@two.example"])
    qm.enqueue(queueID)
    assert (len(slow.calls), len(backend.calls)) == (1, 0)
    clock.advance(500)  # (the smtp delivery waited 500s for its place: not deferred)
    assert qm.activeCount == 1 and backend.calls == []
    slow.release()
    assert [c.nexthop for c in backend.calls] == ["two.example"]
    clock.advance(59)  # 559s after the attempt began, 59s after it got its place
    assert qm.activeCount == 1
    backend.release()
    assert spool.queueIDs() == []
    assert not any("status=deferred" in t for t in texts(events, queueID))
    assert qm.deliverer.places.running == 0
    # Once it has its place, its timeout does run.
    other = queueMessage(spool, clock, ["c@three.example"])
    qm.enqueue(other)
    clock.advance(60)
    [r] = stored(spool, other)["recipients"]
    assert (r["state"], r["status"]) == (PENDING, "4.4.2")
    backend.release()
    resultOf(qm.stopService())


def test_deliveryLimit_aDeliveryWaitingAtTheEndOfTheDrainNeverStarted(
    spool: Spool, router: FakeRouter, backend: FakeBackend, clock: Clock, events: Any
) -> None:
    """A delivery still waiting for a place when the stop's drain time is over is deferred
    as not started (its backend never called), the one running as interrupted."""
    backend.hold = True
    qm = makeManager(spool, router, {"smtp": backend}, clock, deliveryLimit=1, stopTimeout=5)
    qm.startService()
    queueID = queueMessage(spool, clock, ["a@one.example", "b@two.example"])
    qm.enqueue(queueID)
    stopped = qm.stopService()
    clock.advance(5)
    assert stopped.called and len(backend.calls) == 1
    ran, waited = stored(spool, queueID)["recipients"]
    assert "interrupted: the relay was stopping (the next hop may" in ran["lastResult"]
    assert (waited["state"], waited["status"]) == (PENDING, "4.3.0")
    assert waited["lastResult"] == (
        "X-mailrelay; delivery via smtp:two.example not started: the relay was stopping"
    )
    assert any("smtp:two.example not started (it waited" in t for t in texts(events, queueID))


def test_deliveryLimit_aDeliveryWaitingWhenTheStopBeginsDoesNotStart(
    spool: Spool, router: FakeRouter, backend: FakeBackend, clock: Clock, events: Any
) -> None:
    """Once the queue manager is stopping, a delivery waiting for a place does not start,
    even when one frees up during the drain: its recipients stay queued (deferred as not
    started, logged), while the delivery running ends and is recorded."""
    backend.hold = True
    qm = makeManager(spool, router, {"smtp": backend}, clock, deliveryLimit=1, stopTimeout=30)
    qm.startService()
    queueID = queueMessage(spool, clock, ["a@one.example", "b@two.example"])
    qm.enqueue(queueID)
    assert [c.nexthop for c in backend.calls] == ["one.example"]
    stopped = qm.stopService()
    clock.advance(1)
    backend.release()  # the place frees up during the drain
    assert stopped.called
    assert [c.nexthop for c in backend.calls] == ["one.example"]
    assert qm.deliverer.places.running == 0
    assert spool.queueIDs() == [queueID]
    ran, waited = stored(spool, queueID)["recipients"]
    assert ran["state"] == DELIVERED
    assert (waited["state"], waited["status"]) == (PENDING, "4.3.0")
    assert waited["lastResult"] == (
        "X-mailrelay; delivery via smtp:two.example not started: the relay was stopping"
    )
    assert any("smtp:two.example not started (it waited" in t for t in texts(events, queueID))
    # Due at the next start, which delivers it at once.
    assert stored(spool, queueID)["nextAttempt"] <= clock.seconds()
    backend.hold = False
    again = makeManager(spool, router, {"smtp": backend}, clock, deliveryLimit=1)
    again.startService()
    assert [c.nexthop for c in backend.calls] == ["one.example", "two.example"]
    assert spool.queueIDs() == []
    again.stopService()


class SilentBackend:
    """A site backend that never answers (and records what it was asked)."""

    def __init__(self) -> None:
        self.calls: list[tuple[list[str], Route]] = []

    def deliver(self, envelope: Envelope, recipients: Any, route: Route, messagePath: Path) -> Any:
        self.calls.append(([r.address for r in recipients], route))
        return Deferred()


def test_siteBackendTimeout(
    spool: Spool, router: FakeRouter, backend: FakeBackend, clock: Clock, events: Any
) -> None:
    """A site backend's delivery is abandoned after its own timeout ([[backends]] timeout),
    not the built-in backends' bound; its recipients are deferred, with a clear log line."""
    silent = SilentBackend()
    backend.hold = True
    router.routes["hooks.example"] = Route("webhook", "webhook")
    qm = makeManager(
        spool, router, {"smtp": backend, "webhook": silent}, clock, timeouts={"webhook": 600}
    )
    assert (qm.timeoutFor("webhook"), qm.timeoutFor("smtp")) == (600, 3600)
    qm.startService()
    queueID = queueMessage(spool, clock, ["a@hooks.example", "b@example.com"])
    qm.enqueue(queueID)
    assert silent.calls == [(["a@hooks.example"], Route("webhook", "webhook"))]
    clock.advance(599)
    assert qm.activeCount == 1 and not [t for t in texts(events, queueID) if "timeout" in t]
    clock.advance(1)
    lines = [t for t in texts(events, queueID) if "timeout" in t]
    assert lines == [
        f"{queueID}: delivery backend 'webhook' did not answer within its timeout of 600s; "
        "1 recipient(s) deferred"
    ]
    assert qm.activeCount == 1  # the smtp delivery is still running: its bound is longer
    backend.release()
    assert qm.activeCount == 0
    a, b = stored(spool, queueID)["recipients"]
    assert (a["state"], a["status"]) == (PENDING, "4.4.2")
    assert a["lastResult"] == (
        "X-mailrelay; delivery via webhook:webhook timed out after 600s (the next hop may "
        "have received the message: it may be sent more than once)"
    )
    assert b["state"] == DELIVERED
    resultOf(qm.stopService())


def test_badBackendTimeouts(spool: Spool, router: FakeRouter, clock: Clock) -> None:
    for bad in (0, -1, True, "600"):
        with pytest.raises(ValueError, match="the timeout of backend 'webhook' must be > 0"):
            makeManager(spool, router, {}, clock, timeouts={"webhook": bad})


def test_recipientsGroupedByTheWholeRoute(
    spool: Spool, router: FakeRouter, backend: FakeBackend, clock: Clock
) -> None:
    """Two routes to one next hop with different options are two deliveries, each given its
    own route; equal routes share one."""
    relay = "[relay.example]:587"
    router.routes["plain.example"] = Route("smtp", relay, RouteOptions(tls="none"))
    router.routes["tls.example"] = Route("smtp", relay, RouteOptions(tls="required"))
    router.routes["tls2.example"] = Route("smtp", relay, RouteOptions(tls="required"))
    qm = makeManager(spool, router, {"smtp": backend}, clock)
    qm.startService()
    queueID = queueMessage(
        spool, clock, ["a@plain.example", "b@tls.example", "c@tls2.example", "d@plain.example"]
    )
    qm.enqueue(queueID)
    assert sorted((c.addresses, c.route.options.tls) for c in backend.calls) == [
        (["a@plain.example", "d@plain.example"], "none"),
        (["b@tls.example", "c@tls2.example"], "required"),
    ]
    assert {c.nexthop for c in backend.calls} == {relay}
    assert spool.queueIDs() == []
    resultOf(qm.stopService())


def test_groupsDeliveredConcurrently(
    spool: Spool, router: FakeRouter, backend: FakeBackend, clock: Clock
) -> None:
    backend.hold = True
    router.routes["example.net"] = Route(
        "smtp", "[smtp.example.net]:587", RouteOptions(tls="required")
    )
    qm = makeManager(spool, router, {"smtp": backend}, clock)
    qm.startService()
    queueID = queueMessage(
        spool, clock, ["a@example.com", "b@example.net", "c@example.com", "d@example.net"]
    )
    qm.enqueue(queueID)
    assert len(backend.held) == 2
    assert sorted(c.addresses for c in backend.calls) == [
        ["a@example.com", "c@example.com"],
        ["b@example.net", "d@example.net"],
    ]
    backend.release()
    assert spool.queueIDs() == []
    resultOf(qm.stopService())


def test_entryGoneOrBogusIsDropped(
    spool: Spool, router: FakeRouter, backend: FakeBackend, clock: Clock, events: Any
) -> None:
    qm = makeManager(spool, router, {"smtp": backend}, clock)
    qm.startService()
    qm.enqueue(newQueueID())
    qm.enqueue("../etc/passwd")
    assert qm.scheduledCount == qm.activeCount == 0
    assert backend.calls == []
    resultOf(qm.stopService())


@pytest.mark.parametrize(
    "damage",
    [
        lambda json, eml: json.write_bytes(json.read_bytes()[:40]),  # truncated envelope
        lambda json, eml: json.write_bytes(b""),
        lambda json, eml: json.write_bytes(b"[1, 2]"),
        lambda json, eml: json.write_bytes(b'{"version": 1, "recipients": 7}'),
        lambda json, eml: eml.write_bytes(eml.read_bytes()[:-3]),  # truncated message
        lambda json, eml: eml.write_bytes(eml.read_bytes() + b"more\r\n"),
        lambda json, eml: eml.unlink(),
    ],
    ids=["truncated-json", "empty-json", "json-list", "bad-field", "short-eml", "long-eml", "no-eml"],
)
def test_damagedEntryQuarantinedNotRetried(
    damage: Callable[[Path, Path], Any],
    spool: Spool, router: FakeRouter, backend: FakeBackend, clock: Clock, events: Any,
) -> None:
    queueID = queueMessage(spool, clock, ["a@example.com"])
    good = queueMessage(spool, clock, ["b@example.com"])
    eml = spool.messagePath(queueID)
    damage(eml.with_suffix(".json"), eml)
    expected = sorted(p.name for p in (eml, eml.with_suffix(".json")) if p.exists())
    spoolEvents: list[dict[str, Any]] = []
    globalLogPublisher.addObserver(spoolEvents.append)
    try:
        qm = makeManager(spool, router, {"smtp": backend}, clock)
        qm.startService()
    finally:
        globalLogPublisher.removeObserver(spoolEvents.append)
    assert [c.addresses for c in backend.calls] == [["b@example.com"]]
    assert spool.queueIDs() == [] and qm.scheduledCount == qm.activeCount == 0
    assert sorted(p.name for p in (spool.directory / "corrupt").iterdir()) == expected
    about = [e for e in spoolEvents if e.get("queueID") == queueID]
    assert len(about) == 1 and about[0]["log_level"].name == "error", about
    assert "damaged queue entry" in formatEvent(about[0])
    assert not any(e.get("queueID") == good and "damaged" in formatEvent(e) for e in spoolEvents)
    clock.advance(5 * 4000)
    assert len(backend.calls) == 1  # never retried
    resultOf(qm.stopService())


def test_truncatedMessageNamesSizes(
    spool: Spool, router: FakeRouter, backend: FakeBackend, clock: Clock
) -> None:
    queueID = queueMessage(spool, clock, ["a@example.com"])
    eml = spool.messagePath(queueID)
    eml.write_bytes(MESSAGE[:10])
    with pytest.raises(CorruptEntry) as caught:
        spool.loadEnvelope(queueID)
    assert str(caught.value) == (
        f"message file {eml} has 10 octets, the envelope records {len(MESSAGE)}"
    )
    eml.unlink()
    with pytest.raises(CorruptEntry, match=r"message file .* is missing"):
        spool.loadEnvelope(queueID)
    eml.with_suffix(".json").unlink()
    with pytest.raises(SpoolError) as gone:
        spool.loadEnvelope(queueID)
    assert not isinstance(gone.value, CorruptEntry)


def test_quarantineThatFailsIsRetriedLater(
    spool: Spool, router: FakeRouter, backend: FakeBackend, clock: Clock, events: Any,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    queueID = queueMessage(spool, clock, ["a@example.com"])
    eml = spool.messagePath(queueID)
    eml.with_suffix(".json").write_bytes(b"{")

    def refuse(queueID: str) -> Any:
        raise SpoolError("moving corrupt entry failed: Read-only file system")

    monkeypatch.setattr(spool, "_moveToCorrupt", refuse)
    qm = makeManager(spool, router, {"smtp": backend}, clock)
    qm.startService()
    assert any("could not be moved aside" in t and "retrying in 4000s" in t for t in texts(events, queueID))
    assert qm.scheduledCount == 1
    monkeypatch.undo()
    clock.advance(4000)
    assert spool.queueIDs() == [] and qm.scheduledCount == 0
    assert backend.calls == []
    resultOf(qm.stopService())


def test_anEnvelopeThatCannotBeReadIsTriedAgainAfterTheShortestBackoff(
    spool: Spool, router: FakeRouter, backend: FakeBackend, clock: Clock, events: Any,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """An envelope the spool cannot read for now (made unreadable by hand: EACCES; an I/O
    error; too many open files) is tried again after the shortest backoff, as the next look
    of Postfix's qmgr into its queue would, not after the longest (67 minutes for a failure
    already mended)."""
    queueID = queueMessage(spool, clock, ["a@example.com"])
    load = spool.loadEnvelope

    def unreadable(queueID: str) -> Envelope:
        raise SpoolError(f"reading envelope {queueID}.json failed: Permission denied (EACCES)")

    monkeypatch.setattr(spool, "loadEnvelope", unreadable)
    qm = makeManager(spool, router, {"smtp": backend}, clock)
    qm.startService()
    assert any(
        t == f"{queueID}: cannot load envelope: reading envelope {queueID}.json failed: "
        "Permission denied (EACCES); retrying in 300s" for t in texts(events, queueID)
    )
    monkeypatch.setattr(spool, "loadEnvelope", load)
    clock.advance(299)
    assert backend.calls == []
    clock.advance(1)
    assert backend.addressesDelivered() == ["a@example.com"] and spool.queueIDs() == []
    resultOf(qm.stopService())


def test_policyValidation() -> None:
    with pytest.raises(ValueError):
        QueuePolicy(activeLimit=0)
    with pytest.raises(ValueError):
        QueuePolicy(minBackoff=5000, maxBackoff=4000)


def test_permanentRoutingFailureBounces(
    spool: Spool, router: FakeRouter, backend: FakeBackend, clock: Clock
) -> None:
    """A router's PermanentFailure bounces at once; a TransientFailure is retried, with its
    own code and diagnostic."""
    from mailrelay.route import DeliveryFailure

    router.routes["gone.example"] = DeliveryFailure(
        permanent=True, code="5.1.2", diagnostic="X-mailrelay; no route to gone.example"
    )
    router.routes["later.example"] = DeliveryFailure(
        permanent=False, code="4.4.3", diagnostic="X-mailrelay; dns trouble"
    )
    router.routes["example.org"] = Route("hold", "example.org")
    bounces = FakeBackend()
    bounces.hold = True
    qm = makeManager(spool, router, {"smtp": backend, "hold": bounces}, clock)
    qm.startService()
    queueID = queueMessage(spool, clock, ["a@gone.example", "b@later.example"])
    qm.enqueue(queueID)
    a, b = stored(spool, queueID)["recipients"]
    assert (a["state"], a["status"]) == (BOUNCED, "5.1.2")
    assert a["lastResult"] == "X-mailrelay; no route to gone.example"
    assert (b["state"], b["status"]) == (PENDING, "4.4.3")
    assert b["lastResult"] == "X-mailrelay; dns trouble"
    [call] = bounces.calls
    assert [blk["Final-Recipient"] for blk in recipientBlocks(call.message)] == ["rfc822; a@gone.example"]
    bounces.release()
    resultOf(qm.stopService())


def test_a_backend_that_blocks_the_reactor_is_named_in_the_log(
    spool: Spool, router: FakeRouter, clock: Clock, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A site backend whose deliver() blocks before it returns holds every delivery of the
    process: the log names it (once a minute at most, then with the count since)."""
    import time

    from twisted.logger import capturedLogs, formatEvent

    from mailrelay import metrics

    monkeypatch.setattr(metrics, "BLOCKING_WARN_SECONDS", 0.01)
    monkeypatch.setattr(metrics, "_lastBlockingWarning", {})

    def slow(rs: list[Recipient]) -> Any:
        time.sleep(0.02)
        return succeed([result(r.address, "2") for r in rs])

    qm = makeManager(spool, router, {"smtp": BrokenBackend(slow)}, clock)
    qm.startService()
    with capturedLogs() as events:
        for _ in range(2):
            qm.enqueue(queueMessage(spool, clock, ["a@example.com"]))
    lines = [formatEvent(e) for e in events if "reactor" in formatEvent(e)]
    assert len(lines) == 1 and lines[0].startswith("backend plugin smtp held the reactor for")
    metrics._lastBlockingWarning[("backend", "smtp")][0] -= 61
    with capturedLogs() as events:
        qm.enqueue(queueMessage(spool, clock, ["a@example.com"]))
    assert any("(1 more since the last line)" in formatEvent(e) for e in events)
    resultOf(qm.stopService())


# --- recipients done while other deliveries of the attempt still run ---------------------------


def fastAndSlow(
    spool: Spool, router: FakeRouter, backend: FakeBackend, clock: Clock,
    recipients: list[str | Recipient] | None = None, slow: tuple[str, ...] = ("2",), **kw: Any,
) -> tuple[QueueManager, str]:
    """A message to C{a@fast.test} and C{b@slow.test} (two next hops: two deliveries, both
    held), and the delivery to fast.test answered: the one to slow.test, which will answer
    as C{slow} says (see L{FakeBackend}), still runs."""
    backend.script["b@slow.test"] = list(slow)
    backend.hold = True
    qm = makeManager(spool, router, {"smtp": backend}, clock)
    qm.startService()
    queueID = queueMessage(
        spool, clock, recipients or ["a@fast.test", "b@slow.test"], **kw
    )
    qm.enqueue(queueID)
    assert [c.nexthop for c in backend.calls] == ["fast.test", "slow.test"]
    backend.release(1)
    return qm, queueID


def sentLines(events: Any, queueID: str, address: str) -> list[str]:
    return [t for t in texts(events, queueID) if f"to=<{address}>" in t and "status=sent" in t]


def test_aRecipientDoneWhileAnotherDeliveryRunsIsRecordedAndLoggedAtOnce(
    spool: Spool, router: FakeRouter, backend: FakeBackend, clock: Clock, events: Any
) -> None:
    """A message to two next hops, one of them slow: the recipient the fast one took is
    marked done in the spool, and logged as sent, as soon as its delivery ends (as Postfix's
    delivery agents do), not when the slow one ends too; the conclusion does not log it
    again.  Both were recorded only at the end: a crash meanwhile (kill -9 of the delivery
    process) sent the message to the fast one again, with no line saying it had it."""
    qm, queueID = fastAndSlow(spool, router, backend, clock, slow=("4", "2"))
    observer = RecordingObserver()
    qm.observers = Observers(clock, delivered=[ConfiguredPlugin("recorder", observer)])
    assert len(backend.held) == 1  # slow.test still delivering
    record = stored(spool, queueID)
    assert [r["state"] for r in record["recipients"]] == [DELIVERED, PENDING]
    fast = record["recipients"][0]
    assert fast["attempts"] == 1 and fast["status"] == "2.0.0"
    assert fast["lastResult"] == "smtp; 250 2.0.0 Ok" and fast["finalTime"] == START
    assert record["attempts"] == 0  # the attempt itself is recorded at its end
    (line,) = sentLines(events, queueID, "a@fast.test")
    assert "relay=mx.fast.test[192.0.2.1]:25" in line and "attempts=1" in line

    clock.advance(5)
    backend.release()
    record = stored(spool, queueID)
    assert [r["state"] for r in record["recipients"]] == [DELIVERED, PENDING]
    assert record["attempts"] == 1 and record["recipients"][0]["finalTime"] == START
    assert len(sentLines(events, queueID, "a@fast.test")) == 1
    assert any("to=<b@slow.test>" in t and "status=deferred" in t for t in texts(events))
    # The delivery observers are told of each outcome once, with the attempt's results.
    assert observer.outcomes() == [("a@fast.test", DELIVERED), ("b@slow.test", "deferred")]
    clock.advance(300)  # the retry goes to the slow one only
    assert backend.calls[-1].addresses == ["b@slow.test"]
    backend.release()
    assert spool.queueIDs() == []
    assert len(sentLines(events, queueID, "a@fast.test")) == 1
    assert len(sentLines(events, queueID, "b@slow.test")) == 1
    resultOf(qm.stopService())


def test_aRecipientDoneEarlyIsNotSentAgainAfterACrash(
    spool: Spool, router: FakeRouter, backend: FakeBackend, clock: Clock
) -> None:
    """The delivery process dies while slow.test's delivery runs: the next queue manager
    (over the same spool) sends the message to slow.test only."""
    fastAndSlow(spool, router, backend, clock)
    backend.held.clear()  # (the crash: that answer never comes)
    backend.hold = False
    following = makeManager(spool, router, {"smtp": backend}, clock)
    following.startService()
    assert backend.calls[-1].addresses == ["b@slow.test"]
    assert backend.addressesDelivered().count("a@fast.test") == 1
    assert spool.queueIDs() == []
    resultOf(following.stopService())


def test_aSingleDeliveryWritesTheEnvelopeOnce(
    spool: Spool, router: FakeRouter, backend: FakeBackend, clock: Clock, monkeypatch: Any
) -> None:
    """One delivery (one next hop): no write before the attempt's own; two next hops
    answering at once (as the maildir and discard backends do): none either."""
    writes: list[list[str]] = []
    realUpdate = spool.updateEnvelope

    def updateEnvelope(envelope: Envelope) -> Deferred[None]:
        writes.append([r.state for r in envelope.recipients])
        return realUpdate(envelope)

    monkeypatch.setattr(spool, "updateEnvelope", updateEnvelope)
    backend.script["b@example.com"] = ["4"]
    qm = makeManager(spool, router, {"smtp": backend}, clock)
    qm.startService()
    qm.enqueue(queueMessage(spool, clock, ["a@example.com", "b@example.com"]))
    assert writes == [[DELIVERED, PENDING]]
    del writes[:]
    backend.script["b@slow.test"] = ["4"]
    qm.enqueue(queueMessage(spool, clock, ["a@fast.test", "b@slow.test"]))
    assert len(backend.calls) == 3
    assert writes == [[DELIVERED, PENDING]]
    resultOf(qm.stopService())


def noticesAbout(backend: FakeBackend, address: str) -> list[Call]:
    """The success notices C{backend} was given that report on C{address}."""
    return [
        call for call in backend.bounces()
        if f"rfc822; {address}" in [b["Final-Recipient"] for b in recipientBlocks(call.message)]
    ]


def test_aRecipientOwedASuccessNoticeIsRecordedAtOnceWithTheNoticeOwed(
    spool: Spool, router: FakeRouter, backend: FakeBackend, clock: Clock, events: Any
) -> None:
    """A recipient whose sender asked for a success notice (NOTIFY=SUCCESS) is recorded done
    and logged as soon as its delivery ends, like the others, with the notice it is owed (its
    action and the notice's queue id) in the same write, as Postfix marks it done in the
    queue file and keeps what the notice needs in its trace log; the notice is made at the
    attempt's end under that id, and the mark goes.  It waited for the attempt's end: a crash
    meanwhile sent the message to it again."""
    asked = Recipient("a@fast.test", "a@fast.test", notify=["SUCCESS"],
                      orcpt="rfc822;A@Fast.Test")
    qm, queueID = fastAndSlow(
        spool, router, backend, clock, [asked, "b@slow.test", "c@fast.test"]
    )
    record = stored(spool, queueID)
    assert [r["state"] for r in record["recipients"]] == [DELIVERED, PENDING, DELIVERED]
    owed = record["recipients"][0]
    assert owed["noticeOwed"] == "relayed" and isQueueID(owed["noticeID"])
    assert owed["lastResult"] == "smtp; 250 2.0.0 Ok" and owed["finalTime"] == START
    assert owed["remoteMTA"] == "dns; mx.fast.test" and owed["orcpt"] == "rfc822;A@Fast.Test"
    # Only a recipient owed one carries the mark: the others keep the form earlier versions
    # wrote (and read).
    assert "noticeOwed" not in record["recipients"][2] and "noticeOf" not in record
    assert len(sentLines(events, queueID, "a@fast.test")) == 1
    assert not backend.bounces()  # made at the attempt's end
    backend.release()
    (notice,) = backend.bounces()
    assert notice.queueID == owed["noticeID"]
    assert [b["Final-Recipient"] for b in recipientBlocks(notice.message)] == [
        "rfc822; a@fast.test"
    ]
    assert len(sentLines(events, queueID, "a@fast.test")) == 1
    assert queueID not in spool.queueIDs()
    backend.release()  # (the notice's delivery)
    assert spool.queueIDs() == []
    resultOf(qm.stopService())


def test_aSuccessNoticeDeferredIsStoredInTheFormEarlierVersionsRead(
    spool: Spool, router: FakeRouter, backend: FakeBackend, clock: Clock
) -> None:
    """A success notice's C{noticeOf} (which earlier relays do not read: rolled back to, they
    move the entry to corrupt/) is needed only until the marks of the message it reports on
    are found cleared: the notice's first deferral writes its envelope without it, so that a
    notice waiting in the queue for days does not keep the field."""
    asked = Recipient("a@fast.test", "a@fast.test", notify=["SUCCESS"])
    backend.script["sender@example.org"] = ["4", "2"]
    qm, queueID = fastAndSlow(spool, router, backend, clock, [asked, "b@slow.test"])
    noticeID = stored(spool, queueID)["recipients"][0]["noticeID"]
    backend.release()  # slow.test's answer: the notice is queued, its delivery starts
    assert stored(spool, noticeID)["noticeOf"] == queueID
    backend.release()  # the notice's delivery: deferred
    record = stored(spool, noticeID)
    assert record["attempts"] == 1 and "noticeOf" not in record
    clock.advance(record["nextAttempt"] - clock.seconds())
    backend.release()
    assert len(noticesAbout(backend, "a@fast.test")) == 2 and spool.queueIDs() == []
    resultOf(qm.stopService())


def test_aSuccessNoticeOwedIsMadeOnceAfterACrash(
    spool: Spool, router: FakeRouter, backend: FakeBackend, clock: Clock
) -> None:
    """The delivery process dies while slow.test's delivery runs, a success notice owed for
    the recipient fast.test took: the next queue manager sends the message to slow.test only,
    and makes the notice owed, once."""
    asked = Recipient("a@fast.test", "a@fast.test", notify=["SUCCESS"])
    fastAndSlow(spool, router, backend, clock, [asked, "b@slow.test"])
    backend.held.clear()  # (the crash: that answer never comes)
    backend.hold = False
    following = makeManager(spool, router, {"smtp": backend}, clock)
    following.startService()
    assert [c.addresses for c in backend.calls if not c.isBounce][-1] == ["b@slow.test"]
    assert backend.addressesDelivered().count("a@fast.test") == 1
    assert len(noticesAbout(backend, "a@fast.test")) == 1
    assert len(backend.bounces()) == 1
    assert spool.queueIDs() == []
    resultOf(following.stopService())


def test_aSuccessNoticeQueuedJustBeforeACrashIsNotQueuedAgain(
    spool: Spool, router: FakeRouter, backend: FakeBackend, clock: Clock, monkeypatch: Any,
    events: Any,
) -> None:
    """The delivery process dies once the success notice owed is queued, before the mark
    saying it is owed is cleared: the next queue manager does not queue it again (it is
    queued under the id the mark names), and does not deliver it until that mark is cleared
    (delivered and removed first, it would be made again)."""
    asked = Recipient("a@fast.test", "a@fast.test", notify=["SUCCESS"])
    _, queueID = fastAndSlow(spool, router, backend, clock, [asked, "b@slow.test"])
    noticeID = stored(spool, queueID)["recipients"][0]["noticeID"]
    crashed: list[Deferred[None]] = []

    def never(*args: Any) -> Deferred[None]:
        crashed.append(Deferred())
        return crashed[-1]

    monkeypatch.setattr(spool, "updateEnvelope", never)
    monkeypatch.setattr(spool, "remove", never)
    backend.release()  # slow.test's answer: the attempt ends, its notice is queued
    assert noticeID in spool.queueIDs() and crashed  # (and the record never ends)
    monkeypatch.undo()
    backend.held.clear()  # (the crash: the notice's delivery never ends)
    del backend.calls[:]
    following = makeManager(spool, router, {"smtp": backend}, clock)
    following.startService()
    # The message again (slow.test's answer was not recorded), but not the notice yet.
    assert [c.addresses for c in backend.calls] == [["b@slow.test"]]
    assert any(f"{noticeID}: waits for {queueID}" in t for t in texts(events))
    backend.release()
    assert len(noticesAbout(backend, "a@fast.test")) == 1
    assert any(f"{noticeID} (queued before" in t for t in texts(events, queueID))
    assert backend.bounces()[0].queueID == noticeID
    backend.release()  # (the notice's delivery)
    assert len(noticesAbout(backend, "a@fast.test")) == 1
    assert spool.queueIDs() == []
    resultOf(following.stopService())


def test_aHoldDuringTheAttemptKeepsTheRecipientsDoneEarly(
    spool: Spool, router: FakeRouter, backend: FakeBackend, clock: Clock
) -> None:
    """The operator holds the message while slow.test's delivery runs: the hold, stored at
    once, keeps the fast recipient done (it wrote the envelope as loaded, undoing that)."""
    qm, queueID = fastAndSlow(spool, router, backend, clock, slow=("4",))
    resultOf(Deferred.fromCoroutine(qm.hold(queueID)))
    record = stored(spool, queueID)
    assert record["held"] is True
    assert [r["state"] for r in record["recipients"]] == [DELIVERED, PENDING]
    backend.release()
    record = stored(spool, queueID)
    assert record["held"] is True and record["attempts"] == 1
    assert [r["state"] for r in record["recipients"]] == [DELIVERED, PENDING]
    resultOf(qm.stopService())


def test_aBounceByTheOperatorDuringTheAttemptLeavesTheRecipientsDoneEarly(
    spool: Spool, router: FakeRouter, backend: FakeBackend, clock: Clock
) -> None:
    """The operator returns the message to its sender while slow.test's delivery runs: at
    its end only what is still pending is returned; the fast recipient was delivered."""
    qm, queueID = fastAndSlow(spool, router, backend, clock, slow=("4",))
    resultOf(Deferred.fromCoroutine(qm.bounce(queueID)))
    backend.release()
    assert queueID not in spool.queueIDs()
    (notice,) = backend.bounces()
    blocks = recipientBlocks(notice.message)
    assert [b["Final-Recipient"] for b in blocks] == ["rfc822; b@slow.test"]
    backend.release()  # (the notification's delivery)
    resultOf(qm.stopService())


def test_anEarlyRecordTheSpoolCannotTakeIsKeptInMemory(
    spool: Spool, router: FakeRouter, backend: FakeBackend, clock: Clock, monkeypatch: Any,
    events: Any,
) -> None:
    """The spool refuses the fast recipient's early record (its disk full) and the
    attempt's final one: the state is kept in memory, and the next attempt does not send
    the message to the fast one again."""
    full = [SpoolError("No space left on device") for _ in range(2)]
    failingUpdates(spool, monkeypatch, full)
    qm, queueID = fastAndSlow(spool, router, backend, clock, slow=("4", "2"))
    assert any(
        "saving the delivery state failed: No space left on device" in t
        for t in texts(events, queueID)
    ), texts(events, queueID)
    backend.release()
    assert not full
    assert [r["state"] for r in stored(spool, queueID)["recipients"]] == [PENDING, PENDING]
    clock.advance(300)
    assert backend.calls[-1].addresses == ["b@slow.test"]
    backend.release()
    assert spool.queueIDs() == []
    assert backend.addressesDelivered().count("a@fast.test") == 1
    resultOf(qm.stopService())


def test_theStopWaitsForTheEarlyRecordAndInterruptsTheSlowDelivery(
    spool: Spool, router: FakeRouter, backend: FakeBackend, clock: Clock
) -> None:
    """The relay stops while slow.test's delivery runs past the drain time: it is
    interrupted, and the fast recipient stays done."""
    qm, queueID = fastAndSlow(spool, router, backend, clock)
    stopping = qm.stopService()
    clock.advance(qm.policy.stopTimeout)
    resultOf(stopping)
    assert [r["state"] for r in stored(spool, queueID)["recipients"]] == [DELIVERED, PENDING]


class ReportingBackend:
    """A backend that reports recipients done while its delivery goes on (as the SMTP
    backend reports those an MX host took before the others go on to the next host), each
    delivery held until the test answers it."""

    reportsEarly = True

    def __init__(self) -> None:
        self.calls: list[tuple[list[str], Any, Deferred[Any]]] = []

    def deliver(self, envelope: Envelope, recipients: list[Recipient], route: Route,
                messagePath: Any, done: Any = None) -> Deferred[Any]:
        d: Deferred[Any] = Deferred()
        self.calls.append(([r.address for r in recipients], done, d))
        return d


def test_recipientsABackendReportsDoneWhileItsDeliveryGoesOnAreRecordedAtOnce(
    spool: Spool, router: FakeRouter, clock: Clock, events: Any
) -> None:
    """A recipient the SMTP backend reports delivered while its delivery goes on (the best
    MX host took it, the others go on to the next host) is logged and recorded at once, and
    stays delivered when the stop cuts that delivery short; it is logged once, also when
    its delivery ends while another of the attempt runs.  It was recorded only with its
    delivery's end: the stop deferred it with the others, and it was sent again."""
    backend = ReportingBackend()
    qm = makeManager(spool, router, {"smtp": backend}, clock, stopTimeout=5)
    qm.startService()
    queueID = queueMessage(spool, clock, ["a@two.test", "b@two.test"])
    qm.enqueue(queueID)
    ((addresses, done, _),) = backend.calls
    assert addresses == ["a@two.test", "b@two.test"]
    done([result("a@two.test", "2")])
    assert [r["state"] for r in stored(spool, queueID)["recipients"]] == [DELIVERED, PENDING]
    assert len(sentLines(events, queueID, "a@two.test")) == 1
    stopping = qm.stopService()
    clock.advance(5)
    resultOf(stopping)
    assert [r["state"] for r in stored(spool, queueID)["recipients"]] == [DELIVERED, PENDING]
    assert len(sentLines(events, queueID, "a@two.test")) == 1
    assert any("to=<b@two.test>" in t and "interrupted" in t for t in texts(events, queueID))
    done([result("b@two.test", "2")])  # (a backend going on after the stop: too late)
    assert [r["state"] for r in stored(spool, queueID)["recipients"]] == [DELIVERED, PENDING]
    assert not sentLines(events, queueID, "b@two.test")

    # The next start tries b@two.test again at once (the stop cut its attempt short).
    backend.calls.clear()
    qm = makeManager(spool, router, {"smtp": backend}, clock)
    qm.startService()
    ((addresses, _, again),) = backend.calls
    assert addresses == ["b@two.test"]
    again.callback([result("b@two.test", "2")])
    assert queueID not in spool.queueIDs()

    # Reported, then its delivery ends while the other one (slow.test) still runs.
    backend.calls.clear()
    other = queueMessage(spool, clock, ["c@two.test", "d@two.test", "e@slow.test"])
    qm.enqueue(other)
    (_, done, first), (_, _, slow) = backend.calls[-2:]
    done([result("c@two.test", "2")])
    first.callback([result("c@two.test", "2"), result("d@two.test", "2")])
    assert [r["state"] for r in stored(spool, other)["recipients"]] == [
        DELIVERED, DELIVERED, PENDING]
    slow.callback([result("e@slow.test", "2")])
    assert other not in spool.queueIDs()
    for address in ("c@two.test", "d@two.test", "e@slow.test"):
        assert len(sentLines(events, other, address)) == 1, address
    resultOf(qm.stopService())


def test_recipientsDoneWhileTheirRecordIsWrittenGoInOneMoreRecord(
    spool: Spool, router: FakeRouter, backend: FakeBackend, clock: Clock, monkeypatch: Any
) -> None:
    """Deliveries ending while the record of an earlier one is being written are recorded
    together by one more write when it is done (one record at a time per message, so that
    a message to many next hops is not written once per next hop), and the attempt's own
    record comes after it."""
    writes: list[tuple[list[str], Deferred[None]]] = []
    realUpdate = spool.updateEnvelope

    def updateEnvelope(envelope: Envelope) -> Deferred[None]:
        d: Deferred[None] = Deferred()
        d.addCallback(lambda _: realUpdate(envelope))
        writes.append(([r.state[0] for r in envelope.recipients], d))
        return d

    monkeypatch.setattr(spool, "updateEnvelope", updateEnvelope)
    backend.hold = True
    backend.script["d@slow.test"] = ["4"]
    qm = makeManager(spool, router, {"smtp": backend}, clock)
    qm.startService()
    queueID = queueMessage(spool, clock, ["a@one.test", "b@two.test", "c@three.test",
                                          "d@slow.test"])
    qm.enqueue(queueID)
    backend.release(1)
    assert [w[0] for w in writes] == [["d", "p", "p", "p"]]
    backend.release(2)  # two.test, three.test: while the first record is being written
    assert len(writes) == 1
    writes[0][1].callback(None)
    assert [w[0] for w in writes] == [["d", "p", "p", "p"], ["d", "d", "d", "p"]]
    backend.release()  # slow.test: the attempt waits for the record in flight
    assert len(writes) == 2
    writes[1][1].callback(None)
    assert [w[0] for w in writes][2:] == [["d", "d", "d", "p"]]
    writes[2][1].callback(None)
    assert [r["state"] for r in stored(spool, queueID)["recipients"]] == [DELIVERED] * 3 + [
        PENDING
    ]
    assert stored(spool, queueID)["attempts"] == 1
    resultOf(qm.stopService())


def test_deliverySeconds_timeTheDeliveryNotItsWaitForAPlace(
    spool: Spool, router: FakeRouter, backend: FakeBackend, clock: Clock
) -> None:
    """C{mailrelay_delivery_seconds} times a delivery from when it has its place of C{[queue]
    delivery_limit} (as its timeout runs), not its wait for one, which
    C{mailrelay_delivery_wait_seconds} times (Postfix's delays=a/b/c/d keeps the wait in
    the queue manager, b, apart from the delivery's own, c and d)."""
    from mailrelay import metrics

    metrics.enable()
    assert metrics.REGISTRY is not None

    def observedSum(name: str) -> float:
        return metrics.REGISTRY.get_sample_value(f"{name}_sum", {"backend": "smtp"}) or 0.0

    before = (observedSum("mailrelay_delivery_seconds"),
              observedSum("mailrelay_delivery_wait_seconds"))
    now = [100.0]
    backend.hold = True
    qm = makeManager(spool, router, {"smtp": backend}, clock, deliveryLimit=1)
    qm.deliverer.measure = lambda: now[0]
    qm.startService()
    qm.enqueue(queueMessage(spool, clock, ["a@one.example"]))
    qm.enqueue(queueMessage(spool, clock, ["b@two.example"]))
    assert qm.deliverer.places.waiting == 1
    now[0] += 10  # the first delivery takes 10 s, the second waits them
    backend.release(1)
    now[0] += 3  # the second takes 3 s
    backend.release()
    assert spool.queueIDs() == []
    after = (observedSum("mailrelay_delivery_seconds"),
             observedSum("mailrelay_delivery_wait_seconds"))
    assert (after[0] - before[0], after[1] - before[1]) == (13.0, 10.0)
    resultOf(qm.stopService())


def test_an_observer_that_blocks_the_reactor_is_named_in_the_log(monkeypatch) -> None:
    """docs/plugins.md: a hook's call that holds the reactor is logged naming the plugin.
    The queue and delivery observers were not watched: one writing to a slow disk after
    each commit held every session of the relay, and nothing said so."""
    import time

    from twisted.logger import capturedLogs, formatEvent

    from mailrelay import metrics
    from mailrelay.interfaces import ConfiguredPlugin
    from mailrelay.testing import makeDeliveryEvent, makeEnvelope

    monkeypatch.setattr(metrics, "BLOCKING_WARN_SECONDS", 0.01)
    monkeypatch.setattr(metrics, "_lastBlockingWarning", {})

    class Slow:
        def messageQueued(self, envelope: Any) -> None:
            time.sleep(0.02)

        def deliveryAttempted(self, event: Any) -> None:
            time.sleep(0.02)

    slow = ConfiguredPlugin("site-slow", Slow(), 30)
    observers = Observers(Clock(), queued=[slow], delivered=[slow])
    with capturedLogs() as events:
        observers.messageQueued(makeEnvelope("a@example.com", ["b@example.org"]))
        observers.deliveryAttempted([makeDeliveryEvent()])
    lines = [formatEvent(e) for e in events if "reactor" in formatEvent(e)]
    assert len(lines) == 2, lines
    assert lines[0].startswith("queue plugin site-slow held the reactor for")
    assert lines[1].startswith("delivery plugin site-slow held the reactor for")


def test_aNoticeWhoseMessageCannotBeReadIsTriedAgainAfterTheShortestBackoff(
    spool: Spool, router: FakeRouter, backend: FakeBackend, clock: Clock, events: Any,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A success notice checks, before its delivery, that the message it reports on no
    longer names it (Envelope.noticeOf); that message's envelope unreadable for now (an I/O
    error, no descriptor left) makes the notice try again after the shortest backoff, as
    any envelope that cannot be read (acfe2cc), not after the longest."""
    messageID = queueMessage(spool, clock, ["b@example.com"], nextAttempt=clock.seconds() + 3000)
    noticeID = queueMessage(spool, clock, ["sender@example.org"], sender="",
                            noticeOf=messageID)
    load = spool.loadEnvelope

    def unreadable(queueID: str) -> Envelope:
        if queueID == messageID:
            raise SpoolError(f"reading envelope {queueID}.json failed: Input/output error")
        return load(queueID)

    monkeypatch.setattr(spool, "loadEnvelope", unreadable)
    qm = makeManager(spool, router, {"smtp": backend}, clock)
    qm.startService()
    assert backend.calls == []
    assert any(f"{noticeID}: cannot read the envelope of {messageID}" in t
               and "retrying in 300s" in t for t in texts(events))
    monkeypatch.setattr(spool, "loadEnvelope", load)
    clock.advance(299)
    assert backend.calls == []
    clock.advance(1)
    assert backend.addressesDelivered() == ["sender@example.org"]
    assert spool.queueIDs() == [messageID]
    resultOf(qm.stopService())
