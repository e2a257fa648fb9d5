"""The SMTP session's hooks through the relay's own listener (ServerHarness): connect, HELO,
MAIL, RCPT, DATA, the message filters, the queue observers and ESMTP extensions; one plugin
object serving several hooks; notes carried to the envelope."""

from __future__ import annotations

import re
from typing import Any

import pytest
from twisted.internet.defer import Deferred, fail, succeed
from twisted.logger import capturedLogs, formatEvent
from zope.interface import implementer

from mailrelay.config.plugins import PluginEntry
from mailrelay.interfaces import (
    ACCEPT,
    CONTINUE,
    FilterResult,
    IConnectionPolicy,
    IDataPolicy,
    IESMTPExtension,
    IMessageFilter,
    IQueueObserver,
    ISenderValidator,
    Reply,
    Verdict,
)
from mailrelay.receive.extensions import ExtensionAdapter, checkExtensions
from mailrelay.testing import FakeResolver, RecordingObserver, ServerHarness

MESSAGE = b"Subject: hooks\r\n\r\nHello.\r\n.\r\n"


def transaction(h: ServerHarness, rcpt: str = "bob@example.org") -> list[bytes]:
    return h.send(b"MAIL FROM:<alice@example.com>\r\n") + h.send(b"RCPT TO:<%s>\r\n" % rcpt.encode())


def mailed(h: ServerHarness, message: bytes = MESSAGE) -> list[bytes]:
    """Greet, send one message, return the replies to its end of data."""
    h.send(b"EHLO x\r\n")
    transaction(h)
    h.send(b"DATA\r\n")
    return h.send(message)


@implementer(IConnectionPolicy)
class Gate:
    """A connection policy answering C{connect} at connect and C{helo(name)} at HELO."""

    def __init__(self, connect: Any = CONTINUE, helo: Any = None) -> None:
        self.connect = connect
        self.helo = helo or (lambda name: CONTINUE)
        self.clients: list[Any] = []

    def checkConnect(self, client: Any) -> Any:
        self.clients.append((client.address, client.rdns))
        client.notes["gate"] = {"seen": client.address}
        return self.connect() if callable(self.connect) else self.connect

    def checkHelo(self, client: Any, name: str) -> Any:
        return self.helo(name)


# -- connect


def test_a_rejected_client_gets_554_and_503_until_quit() -> None:
    gate = Gate(Verdict.reject("Error: listed at bl.test", 550, "5.7.1"))
    with capturedLogs() as events:
        h = ServerHarness(plugins=[gate], peer="192.0.2.7")
        assert h.replies() == [b"554 5.7.1 Error: listed at bl.test"]
        assert h.send(b"EHLO x\r\n") == [b"503 5.5.1 Error: no SMTP service here, send QUIT"]
        assert h.send(b"MAIL FROM:<a@b.c>\r\n")[0].startswith(b"503 ")
        assert not h.closed
        assert h.send(b"QUIT\r\n") == [b"221 2.0.0 Bye"]
    assert h.closed
    assert (
        "NOQUEUE: reject: CONNECT from unknown[192.0.2.7]: 554 5.7.1 Error: listed at bl.test; "
        "proto=SMTP"
    ) in [formatEvent(e) for e in events]


def test_a_521_closes_at_once() -> None:
    h = ServerHarness(plugins=[Gate(Verdict.reject("Error: no mail here", 521, "5.3.2"))])
    assert h.replies() == [b"521 5.3.2 Error: no mail here"] and h.closed


@pytest.mark.parametrize(
    "answer",
    [
        Verdict.defer("Error: try later"),
        Verdict.disconnect("Error: try later"),
        lambda: 1 / 0,
        lambda: "yes",
    ],
)
def test_a_deferring_or_failing_connect_plugin_gets_421_and_close(answer: Any) -> None:
    with capturedLogs():
        h = ServerHarness(plugins=[Gate(answer)])
    (reply,) = h.replies()
    assert reply.startswith(b"421 4.") and b"relay.test" in reply and h.closed


def test_a_slow_connect_plugin_times_out_into_421() -> None:
    slow: Deferred[Verdict] = Deferred()
    entry = PluginEntry.serving("slow-gate", Gate(slow), timeout=5)
    with capturedLogs() as events:
        h = ServerHarness(plugins=[entry])
        assert h.replies() == []
        h.clock.advance(5)
    assert h.replies()[0].startswith(b"421 4.3.0 relay.test Error: temporary failure") and h.closed
    assert any("connect plugin slow-gate did not answer within 5s" in formatEvent(e) for e in events)


def test_the_greeting_waits_for_the_reverse_lookup_and_greet_pause() -> None:
    resolver = FakeResolver({"192.0.2.7": {"PTR": ["mail.example.net"]},
                             "mail.example.net": {"A": ["192.0.2.7"]}})
    gate = Gate()
    h = ServerHarness(plugins=[gate], resolver=resolver, peer="192.0.2.7", greetPause=2)
    assert gate.clients == [("192.0.2.7", "mail.example.net")]
    assert h.replies() == []
    h.clock.advance(2)
    assert h.replies() == [b"220 relay.test ESMTP mailrelay"]


def test_without_connect_plugins_nothing_waits() -> None:
    h = ServerHarness(plugins=[RecordingObserver()])
    assert h.replies() == [b"220 relay.test ESMTP mailrelay"]
    assert not h.context.session.checkHelo


def test_a_client_that_leaves_during_the_connect_check_cancels_it() -> None:
    cancelled: list[bool] = []
    h = ServerHarness(plugins=[Gate(Deferred(lambda d: cancelled.append(True)))])
    h.loseConnection()
    assert cancelled == [True]


# -- HELO


def test_helo_rejected_leaves_the_client_ungreeted() -> None:
    gate = Gate(helo=lambda name: Verdict.reject("Error: bad HELO", 550, "5.7.1")
                if name == "localhost" else CONTINUE)
    h = ServerHarness(plugins=[gate])
    h.replies()
    with capturedLogs() as events:
        assert h.send(b"EHLO localhost\r\n") == [b"550 5.7.1 Error: bad HELO"]
    assert "NOQUEUE: reject: EHLO from unknown[127.0.0.1]: 550 5.7.1" in formatEvent(events[0])
    assert h.send(b"MAIL FROM:<a@example.com>\r\n") == [b"503 5.5.1 Error: send HELO/EHLO first"]
    assert h.send(b"EHLO client.example\r\n")[-1] == b"250 SMTPUTF8"
    assert h.protocol.session.client.helo == "client.example"  # type: ignore[union-attr]


def test_helo_answered_later_keeps_pipelined_commands_in_order() -> None:
    later: Deferred[Verdict] = Deferred()
    h = ServerHarness(plugins=[Gate(helo=lambda name: later)])
    h.replies()
    assert h.send(b"EHLO client.example\r\n") == []
    later.callback(ACCEPT)
    assert h.replies()[0] == b"250-relay.test"


# -- MAIL, RCPT, DATA


@implementer(ISenderValidator)
class Senders:
    def __init__(self, answer: Any) -> None:
        self.answer = answer

    def validateSender(self, client: Any, envelope: Any) -> Any:
        return self.answer(envelope) if callable(self.answer) else self.answer


def test_a_site_sender_validator_runs_after_the_built_in_checks() -> None:
    h = ServerHarness(plugins=[Senders(Verdict.reject("Error: no such sender", 550, "5.1.8"))])
    h.send(b"EHLO x\r\n")
    assert h.send(b"MAIL FROM:<a@example.com>\r\n") == [b"550 5.1.8 Error: no such sender"]
    with capturedLogs():
        h = ServerHarness(plugins=[Senders(lambda e: fail(RuntimeError("down")))])
        h.send(b"EHLO x\r\n")
        assert h.send(b"MAIL FROM:<a@example.com>\r\n")[0].startswith(b"451 4.3.0")


@implementer(IDataPolicy)
class Greylist:
    """Defers the first DATA of each triplet."""

    def __init__(self) -> None:
        self.seen: set[tuple[str, str, str]] = set()

    def checkData(self, client: Any, envelope: Any) -> Verdict:
        triplets = {(client.address, envelope.sender, r.address) for r in envelope.recipients}
        if triplets <= self.seen:
            return CONTINUE
        self.seen |= triplets
        return Verdict.defer("Greylisted, try again later", 451, "4.7.1")


def test_a_data_policy_sees_every_recipient_and_may_defer() -> None:
    h = ServerHarness(plugins=[Greylist()])
    h.send(b"EHLO x\r\n")
    transaction(h)
    assert h.send(b"DATA\r\n") == [b"451 4.7.1 Greylisted, try again later"]
    assert h.send(b"RCPT TO:<bob@example.org>\r\n") == [b"503 5.5.1 Error: need MAIL command"]
    transaction(h)
    assert h.send(b"DATA\r\n") == [b"354 End data with <CR><LF>.<CR><LF>"]
    assert h.send(MESSAGE)[0].startswith(b"250 2.0.0 Ok: queued as ")


def test_a_data_policy_disconnecting_closes() -> None:
    @implementer(IDataPolicy)
    class Bye:
        def checkData(self, client: Any, envelope: Any) -> Verdict:
            return Verdict.disconnect("Error: enough")

    h = ServerHarness(plugins=[Bye()])
    h.send(b"EHLO x\r\n")
    transaction(h)
    assert h.send(b"DATA\r\n") == [b"421 4.7.0 Error: enough"] and h.closed


# -- the end of data: message filters, queue observers


@implementer(IMessageFilter)
class Tagger:
    """Adds a field naming the words it found; refuses a message that says "virus"."""

    def filterMessage(self, context: Any) -> Deferred[Any]:
        def judge(message: bytes) -> Any:
            if b"virus" in message:
                return Verdict.reject("Error: infected", 554, "5.7.1")
            context.envelope.notes["tagger"] = len(message)
            return FilterResult(prepend=(b"X-Tagged: yes\r\n",))

        return context.read().addCallback(judge)


def test_a_message_filter_adds_fields_and_notes_before_the_250() -> None:
    observer = RecordingObserver()
    h = ServerHarness(plugins=[Tagger(), observer])
    reply = mailed(h)[0]
    assert reply.startswith(b"250 2.0.0 Ok: queued as ")
    [(envelope, message)] = h.spool.committed.values()
    assert message.startswith(b"X-Tagged: yes\r\nReceived: from x")
    assert envelope.notes["tagger"] == len(message) - len(b"X-Tagged: yes\r\n")
    assert [e.queueID for e in observer.queued] == [envelope.queueID]


def test_a_message_filter_refusing_keeps_nothing() -> None:
    observer = RecordingObserver()
    h = ServerHarness(plugins=[Tagger(), observer])
    assert mailed(h, b"Subject: x\r\n\r\nvirus\r\n.\r\n") == [b"554 5.7.1 Error: infected"]
    assert h.spool.committed == {} and observer.queued == []


def test_a_message_filter_disconnecting_closes_after_its_421() -> None:
    @implementer(IMessageFilter)
    class Bye:
        def filterMessage(self, context: Any) -> Verdict:
            return Verdict.disconnect("Error: enough")

    h = ServerHarness(plugins=[Bye()])
    assert mailed(h) == [b"421 4.7.0 Error: enough"] and h.closed


def test_a_failing_queue_observer_never_changes_the_answer() -> None:
    @implementer(IQueueObserver)
    class Broken:
        def messageQueued(self, envelope: Any) -> Any:
            raise RuntimeError("webhook down")

    @implementer(IQueueObserver)
    class Slow:
        def messageQueued(self, envelope: Any) -> Any:
            return Deferred()

    with capturedLogs() as events:
        h = ServerHarness(plugins=[Broken(), PluginEntry.serving("slow", Slow(), 2)])
        assert mailed(h)[0].startswith(b"250 ")
        h.clock.advance(2)
    texts = [formatEvent(e) for e in events]
    assert any("observer Broken failed in messageQueued()" in t for t in texts)
    assert any("observer slow did not finish messageQueued() within 2s" in t for t in texts)


# -- one object, several hooks; notes


@implementer(IConnectionPolicy, IDataPolicy, IQueueObserver)
class Counter:
    """Notes the connection at connect, counts its transactions at DATA, and sees the notes
    stored with the message."""

    def __init__(self) -> None:
        self.queued: list[Any] = []

    def checkConnect(self, client: Any) -> Verdict:
        client.notes["counter"] = {"data": 0}
        return CONTINUE

    def checkHelo(self, client: Any, name: str) -> Verdict:
        return CONTINUE

    def checkData(self, client: Any, envelope: Any) -> Verdict:
        client.notes["counter"]["data"] += 1
        envelope.notes["counter"] = client.notes["counter"]["data"]
        return CONTINUE

    def messageQueued(self, envelope: Any) -> None:
        self.queued.append((envelope.client.notes["counter"]["data"], envelope.notes["counter"]))


def test_one_object_serves_several_hooks_and_its_notes_are_stored() -> None:
    counter = Counter()
    h = ServerHarness(plugins=[counter])
    h.send(b"EHLO x\r\n")
    for _ in range(2):
        transaction(h)
        h.send(b"DATA\r\n")
        assert h.send(MESSAGE)[0].startswith(b"250 ")
    assert counter.queued == [(1, 1), (2, 2)]
    stored = [envelope for envelope, _ in h.spool.committed.values()]
    assert [e.notes for e in stored] == [{"counter": 1}, {"counter": 2}]
    assert [e.client.notes for e in stored] == [{"counter": {"data": 1}}, {"counter": {"data": 2}}]


def test_hooks_restrict_what_an_entry_serves() -> None:
    counter = Counter()
    h = ServerHarness(plugins=[PluginEntry.serving("counter", counter, 30, ["queue"])])
    assert h.hooks.serving("connect") == () and len(h.hooks.serving("queue")) == 1
    with pytest.raises(ValueError, match='"mail": the plugin does not provide ISenderValidator'):
        PluginEntry.serving("counter", counter, 30, ["mail"])
    with pytest.raises(ValueError, match="serves none of the hooks"):
        PluginEntry.serving("nothing", object())


# -- ESMTP extensions


@implementer(IESMTPExtension)
class Priority:
    """MT-PRIORITY (RFC 6710), offered to clients with TLS-less names ending .example."""

    keyword = "MT-PRIORITY"
    mailParameters = ("MT-PRIORITY",)
    rcptParameters = ("X-FLAVOUR",)
    verbs = ("XPRIO",)

    def ehloLine(self, client: Any) -> str | None:
        return "MT-PRIORITY MIXER" if client.helo.endswith(".example") else None

    def mailParameter(self, client: Any, envelope: Any, name: str, value: str | None) -> Any:
        if value is None or not value.lstrip("-").isdigit() or not -9 <= int(value) <= 9:
            raise ValueError("a priority is -9 to 9")
        if int(value) > 5:
            return Reply(550, "5.7.1", "Error: not that urgent")
        return int(value)

    def rcptParameter(
        self, client: Any, envelope: Any, recipient: Any, name: str, value: str | None
    ) -> Any:
        return {"flavour": value, "for": recipient.address}

    def command(self, client: Any, envelope: Any, verb: str, argument: str) -> Any:
        if argument == "bye":
            return Reply(421, "4.7.0", "Error: bye")
        current = envelope.parameters.get("MT-PRIORITY") if envelope else None
        return succeed(Reply(250, "2.0.0", f"priority {current}"))


def test_an_extension_is_offered_per_client_and_owns_its_parameters() -> None:
    h = ServerHarness(plugins=[Priority()])
    assert h.send(b"EHLO client.example\r\n")[-2:] == [b"250-SMTPUTF8", b"250 MT-PRIORITY MIXER"]
    assert h.send(b"MAIL FROM:<a@example.com> MT-PRIORITY=3\r\n") == [b"250 2.1.0 Ok"]
    assert h.send(b"XPRIO\r\n") == [b"250 2.0.0 priority 3"]
    assert h.send(b"RCPT TO:<bob@example.org> X-FLAVOUR=mint\r\n") == [b"250 2.1.5 Ok"]
    h.send(b"DATA\r\n")
    assert h.send(MESSAGE)[0].startswith(b"250 ")
    [(envelope, _)] = h.spool.committed.values()
    assert envelope.parameters == {"MT-PRIORITY": 3}
    assert envelope.recipients[0].parameters == {
        "X-FLAVOUR": {"flavour": "mint", "for": "bob@example.org"}
    }


def test_parameters_are_refused_as_the_extension_says() -> None:
    h = ServerHarness(plugins=[Priority()])
    h.send(b"EHLO client.example\r\n")
    assert h.send(b"MAIL FROM:<a@example.com> MT-PRIORITY=x\r\n") == [
        b"501 5.5.4 Error: bad MT-PRIORITY parameter: a priority is -9 to 9"
    ]
    assert h.send(b"MAIL FROM:<a@example.com> MT-PRIORITY=7\r\n") == [
        b"550 5.7.1 Error: not that urgent"
    ]
    assert h.send(b"XPRIO bye\r\n") == [b"421 4.7.0 Error: bye"] and h.closed


def test_an_extension_not_offered_is_unknown_to_that_client() -> None:
    h = ServerHarness(plugins=[Priority()])
    assert h.send(b"EHLO client.other\r\n")[-1] == b"250 SMTPUTF8"
    assert h.send(b"MAIL FROM:<a@example.com> MT-PRIORITY=3\r\n") == [
        b"555 5.5.4 Error: unsupported MAIL parameter MT-PRIORITY"
    ]
    assert h.send(b"XPRIO\r\n") == [b"500 5.5.2 Error: command not recognized"]
    h = ServerHarness(plugins=[Priority()], tlsMode="starttls")
    h.send(b"EHLO client.example\r\n")
    h.send(b"STARTTLS\r\n")
    h.completeHandshake()
    assert h.send(b"XPRIO\r\n") == [b"500 5.5.2 Error: command not recognized"]


def test_a_failing_extension_is_not_offered_and_its_failures_refuse() -> None:
    class Broken(Priority):
        def ehloLine(self, client: Any) -> str | None:
            raise RuntimeError("boom")

    with capturedLogs() as events:
        h = ServerHarness(plugins=[Broken()])
        assert h.send(b"EHLO client.example\r\n")[-1] == b"250 SMTPUTF8"
    assert any("ESMTP extension Broken failed giving its EHLO line" in formatEvent(e) for e in events)

    class Liar(Priority):
        def ehloLine(self, client: Any) -> str | None:
            return "SIZE 1"

    with capturedLogs() as events:
        h = ServerHarness(plugins=[Liar()])
        assert h.send(b"EHLO client.example\r\n")[-1] == b"250 SMTPUTF8"
    assert any("gave the EHLO line 'SIZE 1', not its keyword" in formatEvent(e) for e in events)

    class Opaque(Priority):
        def mailParameter(self, *args: Any) -> Any:
            return object()

    with capturedLogs() as events:
        h = ServerHarness(plugins=[Opaque()])
        h.send(b"EHLO client.example\r\n")
        assert h.send(b"MAIL FROM:<a@example.com> MT-PRIORITY=1\r\n")[0].startswith(b"451 4.3.0")
    assert any("which is not JSON" in formatEvent(e) for e in events)


@pytest.mark.parametrize("reply", [Reply(354, "", "go ahead"), Reply(334, "", "VXNlcg=="),
                                   Reply(221, "2.0.0", "Bye")])
def test_an_extension_command_answering_a_reply_that_is_not_final_is_refused(
    reply: Reply
) -> None:
    """An extension's command answers once, with 2xx, 4xx or 5xx (421 closes): a 354 or a
    334 (a reply asking the client for more, which the relay would then take as commands),
    or a 221 (the client takes the connection as closing; it is not) went to the client
    as given.  It is a bad answer: 451 4.3.0, logged naming the extension, and the session goes on."""

    class Odd(Priority):
        def command(self, client: Any, envelope: Any, verb: str, argument: str) -> Any:
            return reply

    with capturedLogs() as events:
        h = ServerHarness(plugins=[Odd()])
        h.send(b"EHLO client.example\r\n")
        assert h.send(b"XPRIO\r\n") == [
            b"451 4.3.0 Error: temporary failure, try again later"]
    assert any(f"ESMTP extension Odd answered XPRIO from 127.0.0.1 with {reply}" in formatEvent(e)
               for e in events), [formatEvent(e) for e in events]
    assert not h.closed
    assert h.send(b"MAIL FROM:<a@example.com>\r\n") == [b"250 2.1.0 Ok"]


def test_extensions_may_not_take_what_is_the_relays_or_anothers() -> None:
    class Sized(Priority):
        mailParameters = ("SIZE",)

    with pytest.raises(ValueError, match="the MAIL parameter SIZE is already the relay's"):
        checkExtensions([ExtensionAdapter("sized", Sized(), 30, None)])
    with pytest.raises(ValueError, match="the keyword MT-PRIORITY is already ESMTP extension 'a'"):
        checkExtensions(
            [ExtensionAdapter("a", Priority(), 30, None), ExtensionAdapter("b", Priority(), 30, None)]
        )

    class Mailer(Priority):
        verbs = ("MAIL",)

    with pytest.raises(ValueError, match="the command MAIL is already the relay's"):
        checkExtensions([ExtensionAdapter("m", Mailer(), 30, None)])
    with pytest.raises(ValueError, match="is not an upper-case keyword"):
        ExtensionAdapter("lower", type("L", (Priority,), {"keyword": "mt prio"})(), 30, None)



def test_an_extension_may_not_open_the_relay_or_rewrite_a_recipient() -> None:
    """Notes are all a plugin may change (docs/plugins.md): an ESMTP extension that grants the
    client the relay permission or a login, or rewrites the recipient relay control has just
    judged, has its change undone and the command deferred, as at every other hook.  (It
    relayed: relay control judges the address parsed from RCPT, the envelope kept the
    recipient the extension rewrote, and the client kept the permission.)"""

    class Opener(Priority):
        def ehloLine(self, client: Any) -> str | None:
            client.authUser = "mallory"
            return "MT-PRIORITY"

        def mailParameter(self, client: Any, envelope: Any, name: str, value: str | None) -> Any:
            client.relayAllowed = True
            return 1

        def rcptParameter(
            self, client: Any, envelope: Any, recipient: Any, name: str, value: str | None
        ) -> Any:
            recipient.address = "victim@elsewhere.example"
            return value

        def command(self, client: Any, envelope: Any, verb: str, argument: str) -> Any:
            client.relayAllowed = True
            return succeed(Reply(250, "2.0.0", "Ok"))

    class Offered(Opener):
        def ehloLine(self, client: Any) -> str | None:
            return "MT-PRIORITY"

    relay = {"acceptDomains": ["example.org"]}
    with capturedLogs() as events:
        h = ServerHarness(plugins=[Opener()], peer="192.0.2.7", relay=relay)
        assert h.send(b"EHLO client.example\r\n")[-1] == b"250 SMTPUTF8"  # not offered
        assert h.protocol.session.client.authUser is None
        h = ServerHarness(plugins=[Offered()], peer="192.0.2.7", relay=relay)
        assert h.send(b"EHLO client.example\r\n")[-1] == b"250 MT-PRIORITY"
        assert h.send(b"MAIL FROM:<a@example.com> MT-PRIORITY=1\r\n")[0].startswith(b"451 4.3.0")
        assert h.send(b"XPRIO\r\n")[0].startswith(b"451 4.3.0")
        assert h.send(b"MAIL FROM:<a@example.com>\r\n") == [b"250 2.1.0 Ok"]
        assert h.send(b"RCPT TO:<b@example.net>\r\n") == [b"554 5.7.1 Relay access denied"]
        assert h.send(b"RCPT TO:<bob@example.org> X-FLAVOUR=mint\r\n")[0].startswith(b"451 4.3.0")
        assert h.send(b"RCPT TO:<bob@example.org>\r\n") == [b"250 2.1.5 Ok"]
        h.send(b"DATA\r\n")
        assert h.send(MESSAGE)[0].startswith(b"250 ")
    [(envelope, _)] = h.spool.committed.values()
    assert [r.address for r in envelope.recipients] == ["bob@example.org"]
    assert envelope.client.relayAllowed is False and envelope.client.authUser is None
    logged = "\n".join(formatEvent(e) for e in events)
    for plugin, what in (("Opener", "giving its EHLO line to"), ("Offered", "parsing MAIL parameter MT-PRIORITY of"),
                         ("Offered", "answering XPRIO from"), ("Offered", "parsing RCPT parameter X-FLAVOUR of")):
        assert re.search(f"ESMTP extension {plugin} changed the ClientInfo's \\w+ .only notes may change. "
                         f"{what} 192.0.2.7|ESMTP extension {plugin} changed the Recipient's address "
                         f".only notes may change. {what} 192.0.2.7", logged), (plugin, what)


def test_an_extension_command_that_blocks_past_its_timeout_is_not_believed() -> None:
    """An extension whose command held the reactor longer than its timeout (its timer could
    not fire) and then answered had its reply sent, while a Deferred answering after the
    same timeout is refused: the answer came too late either way (Postfix does not use a
    reply that comes after its timeout), so it is 451 4.3.0 too, logged as the timeout
    with how long the call held the reactor."""
    import time

    from twisted.internet.task import Clock

    from mailrelay.envelope import ClientInfo, Envelope

    class Sleepy(Priority):
        def command(self, client: Any, envelope: Any, verb: str, argument: str) -> Any:
            time.sleep(0.03)
            return Reply(250, "2.0.0", "done")

    clock = Clock()
    adapter = ExtensionAdapter("sleepy", Sleepy(), 0.01, clock)
    envelope = Envelope(sender="a@example.com")
    with capturedLogs() as events:
        d = adapter.command(ClientInfo(address="192.0.2.9"), envelope, "XPRIO", "")
    replies: list[Reply] = []
    d.addCallback(replies.append)
    assert replies == [Reply(451, "4.3.0", "Error: temporary failure, try again later")]
    assert clock.getDelayedCalls() == []
    texts = [formatEvent(e) for e in events]
    assert any(re.search(r"ESMTP extension sleepy did not answer XPRIO from 192\.0\.2\.9 within "
                         r"0\.01s \(its call held the reactor for 0\.0\d+s\)", t)
               for t in texts), texts


def test_an_extensions_command_is_timed_and_blocking_logged(
        monkeypatch: pytest.MonkeyPatch) -> None:
    """An extension's command is timed in mailrelay_plugin_seconds (hook esmtp) however it
    answers: at once, later, never (its timeout), or after holding the reactor past its
    timeout, which is logged once, as that timeout.  Holding it under the timeout is logged
    as any hook's call is."""
    import time

    from twisted.internet.defer import Deferred
    from twisted.internet.task import Clock

    from mailrelay import metrics
    from mailrelay.envelope import ClientInfo, Envelope

    later: list[Deferred[Any]] = []

    class Slow(Priority):
        def command(self, client: Any, envelope: Any, verb: str, argument: str) -> Any:
            if argument == "sleep":
                time.sleep(0.03)
                return Reply(250, "2.0.0", "done")
            if argument == "later":
                later.append(Deferred())
                return later[-1]
            return super().command(client, envelope, verb, argument)

    metrics.enable()
    monkeypatch.setattr(metrics, "BLOCKING_WARN_SECONDS", 0.02)
    timed = metrics.PLUGIN_SECONDS.labels("esmtp", "slow-command")

    def count() -> float:
        return sum(b.get() for b in timed._buckets)

    clock = Clock()
    adapter = ExtensionAdapter("slow-command", Slow(), 0.01, clock)
    client = ClientInfo(address="192.0.2.9", helo="a.example")
    envelope = Envelope(sender="a@example.com")
    replies: list[Reply] = []
    before = count()
    adapter.command(client, envelope, "XPRIO", "").addCallback(replies.append)
    assert count() == before + 1  # at once
    adapter.command(client, envelope, "XPRIO", "later").addCallback(replies.append)
    assert count() == before + 1
    later[-1].callback(Reply(250, "2.0.0", "later"))
    assert count() == before + 2  # when it answers
    adapter.command(client, envelope, "XPRIO", "later").addCallback(replies.append)
    clock.advance(0.01)
    assert count() == before + 3  # when its timeout gives it up
    with capturedLogs() as events:
        adapter.command(client, envelope, "XPRIO", "sleep").addCallback(replies.append)
    assert count() == before + 4  # after holding the reactor past its timeout
    assert [r.code for r in replies] == [250, 250, 451, 451]
    texts = [formatEvent(e) for e in events]
    assert len([t for t in texts if "slow-command" in t]) == 1, texts  # (once: the timeout)
    assert re.search(r"ESMTP extension slow-command did not answer XPRIO from 192\.0\.2\.9 "
                     r"within 0\.01s \(its call held the reactor for 0\.0\d+s\)", texts[0])
    patient = ExtensionAdapter("patient-command", Slow(), 10.0, clock)
    with capturedLogs() as events:
        patient.command(client, envelope, "XPRIO", "sleep").addCallback(replies.append)
    assert replies[-1] == Reply(250, "2.0.0", "done")
    texts = [formatEvent(e) for e in events]
    assert any(re.search(r"esmtp plugin patient-command held the reactor for 0\.0\d+s", t)
               for t in texts), texts


def test_an_extensions_synchronous_calls_are_timed_and_blocking_past_the_timeout_logged(
        monkeypatch: pytest.MonkeyPatch) -> None:
    """ehloLine, mailParameter and rcptParameter are timed (mailrelay_plugin_seconds, hook
    esmtp); one that held the reactor past the extension's timeout is logged once, naming
    the plugin and the call, and its answer is kept (it returned: there is no later answer
    to refuse, as a Deferred's after its timeout is)."""
    import time

    from twisted.internet.task import Clock

    from mailrelay import metrics
    from mailrelay.envelope import ClientInfo, Envelope, Recipient

    class Sleepy(Priority):
        def ehloLine(self, client: Any) -> str | None:
            time.sleep(0.03)
            return "MT-PRIORITY MIXER"

        def mailParameter(self, client: Any, envelope: Any, name: str, value: Any) -> Any:
            time.sleep(0.03)
            return super().mailParameter(client, envelope, name, value)

        def rcptParameter(self, client: Any, envelope: Any, recipient: Any, name: str,
                          value: Any) -> Any:
            time.sleep(0.03)
            return super().rcptParameter(client, envelope, recipient, name, value)

    metrics.enable()
    monkeypatch.setattr(metrics, "BLOCKING_WARN_SECONDS", 0.0)  # (every call "blocks")
    timed = metrics.PLUGIN_SECONDS.labels("esmtp", "sleepy")
    before = sum(b.get() for b in timed._buckets)
    adapter = ExtensionAdapter("sleepy", Sleepy(), 0.01, Clock())
    client = ClientInfo(address="192.0.2.9", helo="a.example")
    envelope = Envelope(sender="a@example.com")
    with capturedLogs() as events:
        assert adapter.ehloLine(client) == "MT-PRIORITY MIXER"
        assert adapter.mailParameter(client, envelope, "MT-PRIORITY", "3") == 3
        assert adapter.rcptParameter(client, envelope, Recipient("b@example.com"), "X-FLAVOUR",
                                     "mint") == {"flavour": "mint", "for": "b@example.com"}
    assert sum(b.get() for b in timed._buckets) == before + 3
    texts = [formatEvent(e) for e in events]
    for call in ("ehloLine", "mailParameter MT-PRIORITY", "rcptParameter X-FLAVOUR"):
        found = [t for t in texts if re.search(
            rf"ESMTP extension sleepy held the reactor for 0\.0\d+s in {call} for 192\.0\.2\.9,"
            r" past its timeout of 0\.01s", t)]
        assert len(found) == 1, (call, texts)
    assert not any("esmtp plugin sleepy held" in t for t in texts), texts  # (once)
    # Under its timeout, a call that held the reactor is logged as any hook's is.
    patient = ExtensionAdapter("patient", Sleepy(), 10.0, Clock())
    with capturedLogs() as events:
        assert patient.ehloLine(client) == "MT-PRIORITY MIXER"
    texts = [formatEvent(e) for e in events]
    assert any(re.search(r"esmtp plugin patient held the reactor for 0\.0\d+s", t)
               for t in texts), texts
