"""mailrelay.testing.QueueHarness: the relay's queue manager in memory, for tests of delivery
backends and routers."""

from __future__ import annotations

import email
import re
from pathlib import Path
from typing import Any

import pytest
from twisted.internet.defer import Deferred, succeed
from twisted.logger import capturedLogs
from zope.interface import implementer

from mailrelay.delivery import resultsForAll
from mailrelay.envelope import PENDING, Envelope, Recipient
from mailrelay.errors import PermanentFailure
from mailrelay.interfaces import (
    DeliveryStatus,
    IDeliveryBackend,
    IHeaderStamper,
    IRouter,
    MessageRefused,
    RecipientResult,
    Route,
    StampContext,
    StampResult,
)
from mailrelay.queue import QueueManager
from mailrelay.route.table import RouteRule
from mailrelay.testing import MemorySpool, QueueHarness


@implementer(IDeliveryBackend)
class Webhook:
    """A site backend under test: answers each recipient from C{answers} (address -> status
    and code; delivered by default), or holds its answer when C{hold} is set."""

    def __init__(self) -> None:
        self.calls: list[tuple[Envelope, list[str], Route, bytes]] = []
        self.answers: dict[str, tuple[DeliveryStatus, str]] = {}
        self.hold = False
        self.held: list[Deferred[list[RecipientResult]]] = []

    def deliver(self, envelope: Envelope, recipients: Any, route: Route, path: Path) -> Any:
        self.calls.append((envelope, [r.address for r in recipients], route, path.read_bytes()))
        if self.hold:
            d: Deferred[list[RecipientResult]] = Deferred()
            self.held.append(d)
            return d
        results = []
        for r in recipients:
            status, code = self.answers.get(r.address, (DeliveryStatus.DELIVERED, "2.0.0"))
            diagnostic = f"X-webhook; {code}"
            results.append(RecipientResult(r.address, status, code, diagnostic))
        return succeed(results)


def test_delivered_and_removed(tmp_path: Path) -> None:
    hook = Webhook()
    h = QueueHarness(tmp_path, {"webhook": hook}, routes=[RouteRule("hooks.example", "webhook")])
    assert isinstance(h.queue, QueueManager) and isinstance(h.spool, MemorySpool)
    assert h.queue.running
    queueID = h.submit("alice@example.org", ["bob@hooks.example", "carol@hooks.example"],
                       b"Subject: hi\r\n\r\nhello\r\n")
    [(envelope, addresses, route, message)] = hook.calls
    assert envelope.queueID == queueID and envelope.sender == "alice@example.org"
    assert addresses == ["bob@hooks.example", "carol@hooks.example"]
    assert route == Route("webhook", "webhook")
    # The message as spooled: stamped by the intake like any message.
    assert message.startswith(f"Received: by relay.test (mailrelay) id {queueID}; ".encode())
    assert re.search(rb"\r\nSubject: hi\r\nMessage-Id: <\d{14}\." + queueID.encode()
                     + rb"@relay\.test>\r\nDate: [^\r\n]+\r\n\r\nhello\r\n\Z", message)
    assert h.queued() == [] and h.envelope(queueID) is None
    assert [env.queueID for env, _ in h.spooled] == [queueID] and h.notifications() == []
    h.stop()
    assert not h.queue.running


def test_transient_failure_is_retried_on_the_clock(tmp_path: Path) -> None:
    hook = Webhook()
    hook.answers["bob@hooks.example"] = (DeliveryStatus.TRANSIENT, "4.2.0")
    h = QueueHarness(tmp_path, {"webhook": hook}, routes=[RouteRule("*", "webhook")],
                     minBackoff=60, maxBackoff=600)
    queueID = h.submit("alice@example.org", ["bob@hooks.example"])
    envelope = h.envelope(queueID)
    assert envelope is not None
    [r] = envelope.recipients
    assert (r.state, r.attempts, r.status) == (PENDING, 1, "4.2.0")
    assert r.lastResult == "X-webhook; 4.2.0"
    assert envelope.nextAttempt == h.clock.seconds() + 60
    h.clock.advance(59)
    assert len(hook.calls) == 1
    del hook.answers["bob@hooks.example"]
    h.clock.advance(1)
    assert len(hook.calls) == 2 and h.queued() == []
    h.stop()


def test_permanent_failure_bounces_through_the_backends(tmp_path: Path) -> None:
    """The bounce is spooled (stamped, Message-Id included) and routed like any message."""
    hook, mailboxes = Webhook(), Webhook()
    hook.answers["bob@hooks.example"] = (DeliveryStatus.PERMANENT, "5.1.1")
    h = QueueHarness(tmp_path, {"webhook": hook, "local": mailboxes},
                     routes=[RouteRule("hooks.example", "webhook"),
                             RouteRule("example.org", "local")])
    queueID = h.submit("alice@example.org", ["bob@hooks.example"])
    [(dsn, message)] = h.notifications()
    assert dsn.isBounce and dsn.sender == "" and dsn.queueID != queueID
    assert [r.address for r in dsn.recipients] == ["alice@example.org"]
    report = email.message_from_bytes(message)
    assert report.get_content_type() == "multipart/report"
    assert re.fullmatch(rf"<\d{{14}}\.{dsn.queueID}@relay\.test>", report["Message-Id"])
    [(delivered, addresses, route, _)] = mailboxes.calls
    assert delivered.queueID == dsn.queueID and addresses == ["alice@example.org"]
    assert h.queued() == []
    h.stop()


def test_site_stampers_see_notifications(tmp_path: Path) -> None:
    @implementer(IHeaderStamper)
    class Tag:
        def stamp(self, context: StampContext) -> StampResult:
            return StampResult(append=[f"X-Tag: {context.envelope.queueID}\r\n".encode()])

    hook = Webhook()
    hook.answers["bob@hooks.example"] = (DeliveryStatus.PERMANENT, "5.1.1")
    h = QueueHarness(tmp_path, {"webhook": hook}, routes=[RouteRule("*", "webhook")],
                     stampers=[Tag()])
    h.submit("alice@example.org", ["bob@hooks.example"])
    [(dsn, message)] = h.notifications()
    assert f"\r\nX-Tag: {dsn.queueID}\r\n\r\n".encode() in message
    assert b"Message-Id:" not in message.split(b"\r\n\r\n", 1)[0]  # no default stamper
    h.stop()


def test_a_router_under_test(tmp_path: Path) -> None:
    @implementer(IRouter)
    class ByLocalPart:
        def route(self, envelope: Envelope, recipient: Recipient) -> Route:
            if recipient.address.startswith("gone@"):
                raise PermanentFailure(code="5.1.2", diagnostic="X-router; no such route")
            return Route("webhook", recipient.address.split("@")[0])

    hook = Webhook()
    h = QueueHarness(tmp_path, {"webhook": hook}, router=ByLocalPart(),
                     postmaster="postmaster@relay.test")
    queueID = h.submit("alice@example.org", ["a@x.example", "b@x.example", "gone@x.example"])
    # One delivery per route; the bounce about gone@ goes by the router too.
    assert [(c[0].queueID, c[1], c[2].nexthop) for c in hook.calls[:2]] == [
        (queueID, ["a@x.example"], "a"),
        (queueID, ["b@x.example"], "b"),
    ]
    [(dsn, message)] = h.notifications()
    assert [r.address for r in dsn.recipients] == ["alice@example.org"]
    assert b"Final-Recipient: rfc822; gone@x.example\r\n" in message
    assert b"Status: 5.1.2\r\n" in message
    assert [(c[0].queueID, c[1]) for c in hook.calls[2:]] == [(dsn.queueID, ["alice@example.org"])]
    assert h.envelope(queueID) is None
    h.stop()


def test_backend_timeout(tmp_path: Path) -> None:
    hook = Webhook()
    hook.hold = True
    h = QueueHarness(tmp_path, {"webhook": hook}, routes=[RouteRule("*", "webhook")],
                     timeouts={"webhook": 5})
    queueID = h.submit("alice@example.org", ["bob@hooks.example"])
    h.clock.advance(5)
    envelope = h.envelope(queueID)
    assert envelope is not None
    [r] = envelope.recipients
    assert (r.state, r.status) == (PENDING, "4.4.2")
    assert r.lastResult == (
        "X-mailrelay; delivery via webhook:webhook timed out after 5s (the next hop may have "
        "received the message: it may be sent more than once)"
    )
    h.stop()


@pytest.mark.parametrize(
    ("answer", "problem"),
    [("OK", "'OK', not a list of RecipientResult"),
     (b"250 ok", "b'250 ok', not a list of RecipientResult"),
     ({"bob@hooks.example": "ok"}, "{'bob@hooks.example': 'ok'}, not a list of RecipientResult"),
     (None, "None, not a list of RecipientResult"),
     ([], "0 results for 1 recipients")],
)
def test_a_backend_answering_no_list_of_results_is_said_so(
    tmp_path: Path, answer: Any, problem: str
) -> None:
    """A backend answering a string (or bytes, a dict) is counted as not delivered, as any
    bad answer; the diagnostic said "2 results for 1 recipients" of "OK" (its letters
    taken for results), sending the site looking for a second result."""

    class Odd:
        def deliver(self, envelope: Any, recipients: Any, route: Any, path: Path) -> Any:
            return succeed(answer)

    h = QueueHarness(tmp_path, {"odd": Odd()}, routes=[RouteRule("*", "odd")])
    queueID = h.submit("alice@example.org", ["bob@hooks.example"])
    envelope = h.envelope(queueID)
    assert envelope is not None
    [r] = envelope.recipients
    assert (r.state, r.status) == (PENDING, "4.3.0")
    assert r.lastResult == f"X-mailrelay; delivery via odd:odd gave no usable result ({problem})"
    h.stop()


def test_a_backend_that_answers_its_timeouts_cancel_is_believed(tmp_path: Path) -> None:
    """A backend whose delivery was done when its timeout cancelled it, and which answers
    the cancel with that outcome (the pipe backend does: the command had exited 0, its
    output was still being read): the outcome is recorded.  It was recorded as a timeout,
    whatever the backend answered, and the message delivered again at the next attempt."""
    hook = Webhook()
    h = QueueHarness(tmp_path, {"webhook": hook}, routes=[RouteRule("*", "webhook")],
                     timeouts={"webhook": 5})

    def done(d: Deferred[Any]) -> None:
        d.callback(resultsForAll([Recipient("bob@hooks.example")], DeliveryStatus.DELIVERED,
                                 "2.0.0", "X-webhook; done"))

    def deliver(envelope: Envelope, recipients: Any, route: Route, path: Path) -> Any:
        hook.calls.append((envelope, [r.address for r in recipients], route, b""))
        return Deferred(done)

    hook.deliver = deliver  # type: ignore[method-assign]
    queueID = h.submit("alice@example.org", ["bob@hooks.example"])
    h.clock.advance(5)
    assert h.envelope(queueID) is None  # delivered, removed
    h.clock.advance(3600)
    assert len(hook.calls) == 1
    h.stop()


@pytest.mark.parametrize("wrap", [lambda results: results, succeed])
def test_a_backend_that_blocks_past_its_timeout_is_believed(tmp_path: Path, wrap: Any) -> None:
    """Unlike a policy answer, a delivery's outcome reports what was done: a backend whose
    deliver() held the reactor past its timeout (its timer could not fire) and then
    answered delivered has delivered; that is recorded, once, as an outcome the backend
    gives its timeout's cancel is (above): taken for a timeout, the message would be sent
    again at the next attempt.  Only the blocking is logged."""
    import time

    hook = Webhook()
    h = QueueHarness(tmp_path, {"webhook": hook}, routes=[RouteRule("*", "webhook")],
                     timeouts={"webhook": 0.01})

    def deliver(envelope: Envelope, recipients: Any, route: Route, path: Path) -> Any:
        hook.calls.append((envelope, [r.address for r in recipients], route, b""))
        time.sleep(0.03)
        return wrap(resultsForAll(list(recipients), DeliveryStatus.DELIVERED, "2.0.0",
                                  "X-webhook; done"))

    hook.deliver = deliver  # type: ignore[method-assign]
    queueID = h.submit("alice@example.org", ["bob@hooks.example"])
    assert h.envelope(queueID) is None  # delivered, removed
    h.clock.advance(3600)
    assert len(hook.calls) == 1
    h.stop()


def test_stop_waits_for_deliveries_in_flight(tmp_path: Path) -> None:
    hook = Webhook()
    hook.hold = True
    h = QueueHarness(tmp_path, {"webhook": hook}, routes=[RouteRule("*", "webhook")])
    queueID = h.submit("alice@example.org", ["bob@hooks.example"])
    with pytest.raises(RuntimeError, match="stopping the queue manager has not answered yet"):
        h.stop()
    [d] = hook.held
    d.callback(resultsForAll([Recipient("bob@hooks.example")], DeliveryStatus.PERMANENT,
                             "5.0.0", "X-webhook; gone"))
    assert not h.queue.running and h.queued() == [h.notifications()[0][0].queueID]
    stored = h.envelope(h.notifications()[0][0].queueID)
    assert stored is not None and stored.isBounce
    assert h.envelope(queueID) is None  # bounced: removed
    assert [env.queueID for env, _ in h.spooled][0] == queueID


def test_submit_refused_and_not_started(tmp_path: Path) -> None:
    @implementer(IHeaderStamper)
    class Broken:
        def stamp(self, context: StampContext) -> StampResult:
            raise RuntimeError("down")

    hook = Webhook()
    h = QueueHarness(tmp_path, {"webhook": hook}, stampers=[Broken()], start=False)
    assert not h.queue.running
    with capturedLogs(), pytest.raises(MessageRefused) as info:
        h.submit("alice@example.org", ["bob@hooks.example"])
    assert info.value.reply.code == 451 and h.queued() == [] and h.spooled == []
    h2 = QueueHarness(tmp_path, {"webhook": hook}, routes=[RouteRule("*", "webhook")],
                      start=False)
    h2.spool.holdCommits = True
    with pytest.raises(RuntimeError, match="the intake has not answered yet"):
        h2.submit("alice@example.org", ["bob@hooks.example"])
    h2.spool.release()
    [queueID] = h2.queued()
    assert hook.calls == []  # not started: remembered, not delivered
    h2.queue.startService()
    assert [c[0].queueID for c in hook.calls] == [queueID]
    h2.stop()


def test_a_bounce_routed_to_another_backend(tmp_path: Path) -> None:
    """A recipient refused for good by one backend is bounced; the notification goes to the
    sender through the route of its own domain (another backend)."""
    from mailrelay.delivery.discard import DiscardBackend

    hook = Webhook()
    hook.answers["gone@hooks.example"] = (DeliveryStatus.PERMANENT, "5.1.1")
    h = QueueHarness(tmp_path, {"webhook": hook, "discard": DiscardBackend()},
                     routes=[RouteRule("hooks.example", "webhook"),
                             RouteRule("example.org", "discard")],
                     minBackoff=60)
    h.submit("alice@example.org", ["gone@hooks.example"])
    [(dsn, message)] = h.notifications()
    assert h.queued() == []
    h.stop()
    assert dsn.recipients[0].address == "alice@example.org"
    assert b"Status: 5.1.1\r\n" in message


def test_unknown_policy_setting(tmp_path: Path) -> None:
    with pytest.raises(TypeError):
        QueueHarness(tmp_path, {}, minimumBackoff=5)
