"""The test kit for plugin authors (mailrelay.testing): buildPlugin through real discovery,
FakeResolver, FakeNexthop under the real SMTP and LMTP backends, QueueHarness with recording
observers, and the context factories."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
from twisted.internet.defer import Deferred, TimeoutError
from twisted.logger import capturedLogs, formatEvent
from twisted.names.error import DomainError
from zope.interface import implementer

from mailrelay.config.plugins import PluginEntry
from mailrelay.delivery.lmtp import LMTPBackend
from mailrelay.delivery.smtp import SMTPBackend
from mailrelay.errors import ConfigError
from mailrelay.interfaces import (
    BOUNCED,
    DEFERRED,
    DELIVERED,
    FilterResult,
    IDeliveryObserver,
    IRecipientValidator,
    Reply,
    Route,

)
from mailrelay.route import MXResolver
from mailrelay.route.table import RouteRule
from mailrelay.smtp.clientsettings import ClientSettings
from mailrelay.testing import (
    FakeNexthop,
    FakeResolver,
    QueueHarness,
    RecordingObserver,
    buildPlugin,
    makeClient,
    makeDeliveryEvent,
    makeEnvelope,
    makeFilterContext,
    makePluginContext,
    makeStampContext,
)


def result(d: Deferred[Any]) -> Any:
    box: list[Any] = []
    d.addBoth(box.append)
    assert box, "not fired"
    return box[0]


# -- buildPlugin


def test_build_plugin_finds_builds_and_verifies(tmp_path: Path) -> None:
    plugin = buildPlugin("accepted-domains", {"domains": ["example.org"]}, tmp_path)
    assert IRecipientValidator.providedBy(plugin)
    verdict = plugin.validateRecipient(makeClient(), makeEnvelope(), makeEnvelope().recipients[0])
    assert verdict.kind.value == "accept"


def test_build_plugin_refuses_as_the_relay_would(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="unknown plugin 'no-such'; installed plugins: "):
        buildPlugin("no-such", {}, tmp_path)
    with pytest.raises(ConfigError, match="plugin 'regex' provides IRecipientValidator, not"):
        buildPlugin("regex", {}, tmp_path, interface=IDeliveryObserver)
    with pytest.raises(ConfigError, match="domains"):
        buildPlugin("accepted-domains", {"domain": ["x"]}, tmp_path)


# -- the contexts


def test_plugin_context_has_a_clock_a_resolver_and_a_thread_hand_off(tmp_path: Path) -> None:
    context = makePluginContext(tmp_path)
    assert context.reactor.seconds() == 1_800_000_000
    assert isinstance(context.resolver, FakeResolver)
    assert result(context.deferToThread(lambda: 7)) == 7
    assert context.configDir == tmp_path


def test_filter_context_reads_the_message_with_earlier_fields() -> None:
    context = makeFilterContext(b"Subject: x\r\n\r\nbody\r\n", client=None)
    assert context.client is None and context.envelope.queueID
    context.addFields([b"X-A: 1\r\n"], [b"X-Z: 1\r\n"])
    assert result(context.read()) == b"X-A: 1\r\nSubject: x\r\nX-Z: 1\r\n\r\nbody\r\n"
    assert context.size == len(result(context.read()))


def test_stamp_context_and_delivery_event_factories() -> None:
    stamp = makeStampContext([("Subject", b"Subject: x\r\n")])
    assert stamp.hasHeader("subject") and stamp.client is not None
    event = makeDeliveryEvent(DEFERRED)
    assert event.result.code == "4.4.1" and event.nextAttempt is not None
    assert makeDeliveryEvent(BOUNCED).result.code.startswith("5.")


# -- FakeResolver


def test_fake_resolver_answers_nxdomain_nodata_and_failures() -> None:
    resolver = FakeResolver(
        {"example.org": {"MX": [(10, "mx.example.org")], "TXT": [("v=spf1 ", "-all")]},
         "192.0.2.1": {"PTR": ["host.example.org"]}}
    )
    answers, _, _ = result(resolver.lookupMailExchange("EXAMPLE.org."))
    assert [(a.payload.preference, str(a.payload.name)) for a in answers] == [(10, "mx.example.org")]
    answers, _, _ = result(resolver.lookupText("example.org"))
    assert answers[0].payload.data == [b"v=spf1 ", b"-all"]
    answers, _, _ = result(resolver.lookupPointer("1.2.0.192.in-addr.arpa"))
    assert str(answers[0].payload.name) == "host.example.org"
    assert result(resolver.lookupAddress("example.org")) == ([], [], [])
    assert result(resolver.lookupAddress("nowhere.example")).check(DomainError)
    resolver.fail("example.org", "TXT")
    assert result(resolver.lookupText("example.org")).check(TimeoutError)
    assert resolver.queries[0] == ("example.org", "MX")


def test_fake_resolver_answers_later_on_its_clock(tmp_path: Path) -> None:
    clock = makePluginContext(tmp_path).reactor
    resolver = FakeResolver({"a.test": {"A": ["192.0.2.9"]}}, clock=clock, delay=2)
    d = resolver.lookupAddress("a.test")
    assert not d.called
    clock.advance(2)
    assert result(d)[0][0].payload.dottedQuad() == "192.0.2.9"


# -- FakeNexthop under the relay's own backends


def message(tmp_path: Path) -> Path:
    path = tmp_path / "m.eml"
    path.write_bytes(b"Subject: x\r\n\r\nhello\r\n.dot line\r\n")
    return path


def smtpBackend(hop: FakeNexthop) -> SMTPBackend:
    """The relay's SMTP backend, connecting through C{hop}."""
    settings = ClientSettings(heloName="relay.test", tls="none")
    resolver = MXResolver(FakeResolver(), hop.reactor)
    return SMTPBackend(hop.reactor, resolver, settings, connectionCacheTime=0)


def test_smtp_backend_delivers_to_the_fake_next_hop(tmp_path: Path) -> None:
    hop = FakeNexthop()
    hop.refuse("gone@example.org", Reply(550, "5.1.1", "Error: no such user"))
    backend = smtpBackend(hop)
    envelope = makeEnvelope("a@example.com", ["bob@example.org", "gone@example.org"])
    d = backend.deliver(envelope, envelope.recipients, Route("smtp", "[192.0.2.5]:2525"),
                        message(tmp_path))
    hop.pump()
    ok, gone = result(d)
    assert (ok.status.value, gone.status.value) == ("delivered", "permanent")
    assert gone.diagnostic == "smtp; 550 5.1.1 Error: no such user"
    [received] = hop.messages
    assert (received.sender, received.recipients) == ("a@example.com", ["bob@example.org"])
    assert received.data == b"Subject: x\r\n\r\nhello\r\n.dot line\r\n"
    assert received.client.helo == "relay.test" and hop.connections == [("192.0.2.5", 2525)]


def test_lmtp_backend_gets_one_reply_per_recipient(tmp_path: Path) -> None:
    hop = FakeNexthop(lmtp=True)
    hop.refuse("full@example.org", Reply(452, "4.2.2", "Error: mailbox full"))
    backend = LMTPBackend(hop.reactor, ClientSettings(heloName="relay.test", tls="none", lmtp=True))
    envelope = makeEnvelope("a@example.com", ["bob@example.org", "full@example.org"])
    d = backend.deliver(envelope, envelope.recipients, Route("lmtp", "unix:/run/lmtp"),
                        message(tmp_path))
    hop.pump()
    ok, full = result(d)
    assert (ok.status.value, full.status.value) == ("delivered", "transient")
    assert [m.recipients for m in hop.messages] == [["bob@example.org"]]
    assert hop.connections == ["/run/lmtp"]


def test_a_refused_connection_is_transient(tmp_path: Path) -> None:
    hop = FakeNexthop()
    hop.refuseConnections = True
    backend = smtpBackend(hop)
    envelope = makeEnvelope()
    d = backend.deliver(envelope, envelope.recipients, Route("smtp", "[192.0.2.5]"),
                        message(tmp_path))
    hop.pump()
    assert result(d)[0].status.value == "transient" and hop.messages == []


# -- QueueHarness with observers


def test_queue_harness_tells_the_observers(tmp_path: Path) -> None:
    hop = FakeNexthop()
    hop.refuse("gone@example.org", Reply(550, "5.1.1", "Error: no such user"))
    hop.refuse("later@example.org", Reply(450, "4.2.1", "Error: try later"))
    backend = smtpBackend(hop)
    observer = RecordingObserver()
    h = QueueHarness(
        tmp_path,
        {"smtp": backend},
        routes=[RouteRule("example.org", "smtp", "[192.0.2.5]:25")],
        plugins=[observer],
        clock=hop.reactor,
        minBackoff=60,
    )
    queueID = h.submit("a@example.com", ["bob@example.org", "gone@example.org",
                                         "later@example.org"])
    hop.pump()
    events = [e for e in observer.events if e.envelope.queueID == queueID]
    assert [(e.recipient.address, e.outcome) for e in events] == [
        ("bob@example.org", DELIVERED), ("gone@example.org", BOUNCED),
        ("later@example.org", DEFERRED),
    ]
    later = events[2]
    assert later.envelope.queueID == queueID and later.attempts == 1
    assert later.nextAttempt == hop.reactor.seconds() + 60
    assert later.result.diagnostic == "smtp; 450 4.2.1 Error: try later"
    # The bounce went into the spool: the queue observer saw it (and the original).
    assert [e.isBounce for e in observer.queued] == [False, True]


def test_a_failing_delivery_observer_changes_nothing(tmp_path: Path) -> None:
    @implementer(IDeliveryObserver)
    class Broken:
        def deliveryAttempted(self, event: Any) -> Any:
            raise RuntimeError("webhook down")

    from mailrelay.delivery.discard import DiscardBackend

    with capturedLogs() as events:
        h = QueueHarness(tmp_path, {"discard": DiscardBackend()},
                         routes=[RouteRule("*", "discard")], plugins=[Broken()])
        h.submit("a@example.com", ["b@example.org"])
    assert h.queued() == []
    assert any("observer Broken failed in deliveryAttempted()" in formatEvent(e) for e in events)


def test_queue_harness_passes_notifications_through_the_message_filters(tmp_path: Path) -> None:
    from mailrelay.delivery.discard import DiscardBackend
    from mailrelay.interfaces import IMessageFilter

    @implementer(IMessageFilter)
    class Signer:
        def filterMessage(self, context: Any) -> FilterResult:
            return FilterResult(prepend=(b"X-Signed: 1\r\n",))

    class Bouncing(DiscardBackend):
        def deliver(self, envelope: Any, recipients: Any, route: Any, path: Any) -> Any:
            from mailrelay.delivery import resultsForAll
            from mailrelay.interfaces import DeliveryStatus

            return resultsForAll(recipients, DeliveryStatus.PERMANENT, "5.1.1", "x; no")

    h = QueueHarness(tmp_path, {"smtp": Bouncing()},
                     plugins=[PluginEntry.serving("signer", Signer())])
    h.submit("a@example.com", ["b@example.org"])
    [(_, bounce)] = h.notifications()
    assert bounce.startswith(b"X-Signed: 1\r\nReceived: by relay.test")
