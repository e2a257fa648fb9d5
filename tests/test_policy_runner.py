"""The one policy chain runner (L{mailrelay.policy.runner.PolicyChain}) of every verdict hook:
order, the first decision, timeouts and failures that defer, never accept."""

from __future__ import annotations

from typing import Any

import pytest
from twisted.internet.defer import Deferred, fail, succeed
from twisted.internet.task import Clock
from twisted.logger import capturedLogs, formatEvent

from mailrelay.envelope import ClientInfo, Envelope, Recipient
from mailrelay.interfaces import ACCEPT, CONTINUE, Reply, Verdict, VerdictKind
from mailrelay.policy.runner import ConfiguredPlugin, PolicyChain
from mailrelay.policy.sender import SenderPolicy

FAILED = Verdict.defer("Error: temporary failure, try again later")


class Plugin:
    """Answers C{answer} (a value, or a callable of the arguments), recording each call."""

    def __init__(self, name: str, answer: Any = CONTINUE) -> None:
        self.name = name
        self.answer = answer
        self.calls: list[tuple[Any, ...]] = []

    def judge(self, *args: Any) -> Any:
        self.calls.append(args)
        return self.answer(*args) if callable(self.answer) else self.answer


def chain(*plugins: Plugin, timeout: float | None = 5, clock: Clock | None = None) -> PolicyChain:
    configured = [ConfiguredPlugin(p.name, p, timeout) for p in plugins]
    return PolicyChain("test", "judge", configured, clock or Clock(), FAILED)


def result(d: Deferred[Verdict]) -> Any:
    box: list[Any] = []
    d.addBoth(box.append)
    assert box, "the chain has not answered"
    return box[0]


def test_an_empty_chain_continues_at_once() -> None:
    assert result(chain().run("x")) is CONTINUE


def test_plugins_run_in_order_and_the_first_decision_wins() -> None:
    a, b, c = Plugin("a"), Plugin("b", Verdict.reject("no")), Plugin("c", ACCEPT)
    verdict = result(chain(a, b, c).run("x", 1))
    assert verdict.kind is VerdictKind.REJECT
    assert str(verdict.reply) == "550 5.7.1 no"
    assert a.calls == [("x", 1)] and b.calls == [("x", 1)] and c.calls == []


def test_accept_ends_the_chain() -> None:
    a, b = Plugin("a", ACCEPT), Plugin("b", Verdict.reject())
    assert result(chain(a, b).run()) is ACCEPT and b.calls == []


def test_answers_given_at_once_set_no_timer() -> None:
    clock = Clock()
    result(chain(Plugin("a"), Plugin("b"), clock=clock).run())
    assert clock.getDelayedCalls() == []


def test_a_later_answer_goes_on_with_the_next_plugin() -> None:
    clock = Clock()
    waiting: Deferred[Verdict] = Deferred()
    a, b = Plugin("a", waiting), Plugin("b", Verdict.defer("later"))
    d = chain(a, b, clock=clock).run("x")
    assert not d.called and b.calls == [] and len(clock.getDelayedCalls()) == 1
    waiting.callback(CONTINUE)
    assert result(d).kind is VerdictKind.DEFER and b.calls == [("x",)]
    assert clock.getDelayedCalls() == []


def test_a_slow_plugin_defers_after_its_timeout_and_is_cancelled() -> None:
    clock = Clock()
    cancelled: list[bool] = []
    slow = Plugin("slow", Deferred(lambda d: cancelled.append(True)))
    after = Plugin("after", ACCEPT)
    with capturedLogs() as events:
        d = chain(slow, after, timeout=3, clock=clock).run(subject="bob@example.org")
        clock.advance(2.9)
        assert not d.called
        clock.advance(0.2)
    assert result(d) is FAILED and cancelled == [True] and after.calls == []
    assert [formatEvent(e) for e in events] == [
        "test plugin slow did not answer within 3s for bob@example.org; deferring"
    ]


@pytest.mark.parametrize(
    ("answer", "problem"),
    [
        (lambda: 1 / 0, None),
        (lambda: fail(RuntimeError("down")), None),
        ("yes", "answered 'yes', not a Verdict"),
        (None, "answered None, not a Verdict"),
        (Verdict(VerdictKind.REJECT, Reply(451, "4.3.0", "x")), "answered reject with the reply"),
        (Verdict(VerdictKind.DEFER, Reply(250, "2.0.0", "ok")), "answered defer with the reply"),
        (Verdict(VerdictKind.REJECT), "answered reject without a reply"),
        (Verdict(VerdictKind.DISCONNECT, Reply(554, "5.0.0", "x")), "answered disconnect"),
    ],
)
def test_a_failing_or_misbehaving_plugin_defers_never_accepts(answer: Any, problem: str) -> None:
    bad, after = Plugin("bad", answer), Plugin("after", ACCEPT)
    with capturedLogs() as events:
        assert result(chain(bad, after).run(subject="s")) is FAILED
    assert after.calls == []
    (event,) = events
    text = formatEvent(event)
    if problem is None:
        assert text == "test plugin bad failed for s; deferring" and event.get("log_failure")
    else:
        assert text.startswith(f"test plugin bad {problem}") and text.endswith("for s; deferring")


def test_a_disconnect_without_a_reply_is_well_formed() -> None:
    verdict = Verdict(VerdictKind.DISCONNECT)
    assert result(chain(Plugin("a", verdict)).run()) is verdict


def test_notes_that_are_not_json_defer_naming_the_plugin() -> None:
    client = ClientInfo("192.0.2.1")

    def note(client: ClientInfo, envelope: Envelope) -> Verdict:
        envelope.notes["when"] = object()
        return CONTINUE

    with capturedLogs() as events:
        verdict = result(chain(Plugin("noter", note)).run(client, Envelope(), subject="c"))
    assert verdict is FAILED
    assert "test plugin noter left Envelope notes that are not JSON" in formatEvent(events[0])
    client.notes["ok"] = {"n": 1}
    assert result(chain(Plugin("fine")).run(client, Envelope())) is CONTINUE


def _clear(client: ClientInfo, envelope: Envelope, recipient: Recipient) -> Verdict:
    envelope.recipients.clear()
    return CONTINUE


def _hijack(client: ClientInfo, envelope: Envelope, recipient: Recipient) -> Verdict:
    recipient.address = "hijack@evil.test"
    return CONTINUE


def _openRelay(client: ClientInfo, envelope: Envelope, recipient: Recipient) -> Verdict:
    client.relayAllowed = True
    return CONTINUE


def _sender(client: ClientInfo, envelope: Envelope, recipient: Recipient) -> Any:
    envelope.sender = "ceo@example.com"
    d: Deferred = Deferred()
    clock.callLater(1, d.callback, CONTINUE)
    return d


clock = Clock()


@pytest.mark.parametrize(
    "plugin, what",
    [
        (_clear, "the Envelope's recipients"),
        (_hijack, "the Recipient's address"),
        (_openRelay, "the ClientInfo's relayAllowed"),
        (_sender, "the Envelope's sender"),  # (answering later)
    ],
)
def test_a_plugin_changing_the_envelope_defers_and_the_change_is_undone(plugin: Any,
                                                                        what: str) -> None:
    """A site plugin may change notes only: one that changes the sender, the recipients, a
    recipient's address or the client's relay permission defers the stage (logged naming
    it) and its change is undone.  Clearing the recipients at DATA got the message queued
    with none and dropped after its 250; changing a recipient's address after the relay
    check delivered it elsewhere; setting relayAllowed made an open relay."""
    client = ClientInfo("192.0.2.1")
    first = Recipient("bob@example.net")
    envelope = Envelope(sender="alice@example.org", recipients=[first])
    recipient = Recipient("carol@example.net")
    with capturedLogs() as events:
        d = chain(Plugin("meddler", plugin), clock=clock).run(client, envelope, recipient,
                                                              subject="r")
        clock.advance(1)
        verdict = result(d)
    assert verdict is FAILED
    text = formatEvent(events[0])
    assert f"test plugin meddler changed {what} (only notes may change)" in text, text
    assert envelope.sender == "alice@example.org" and envelope.recipients == [first]
    assert first.address == "bob@example.net" and recipient.address == "carol@example.net"
    assert client.relayAllowed is False


def test_a_plugin_without_the_method_or_with_a_bad_timeout_is_refused() -> None:
    with pytest.raises(TypeError, match="test plugin 'x' has no method judge"):
        PolicyChain("test", "judge", [ConfiguredPlugin("x", object())], Clock(), FAILED)
    with pytest.raises(ValueError, match="the timeout of test plugin 'a' must be > 0, not 0"):
        chain(Plugin("a"), timeout=0)


def test_cancelling_the_chain_cancels_the_plugin_and_answers_failed() -> None:
    cancelled: list[bool] = []
    d = chain(Plugin("a", Deferred(lambda d: cancelled.append(True)))).run()
    d.cancel()
    assert cancelled == [True] and result(d) is FAILED


# The MAIL stage: the built-in sender validators, then the site's, by the same runner.


class Site:
    def __init__(self, answer: Any) -> None:
        self.answer = answer
        self.seen: list[str] = []

    def validateSender(self, client: ClientInfo, envelope: Envelope) -> Any:
        self.seen.append(envelope.sender)
        return self.answer


def mail(policy: SenderPolicy, sender: str, size: int | None = None) -> Any:
    client = ClientInfo("192.0.2.9")
    return result(policy.check(client, Envelope(sender=sender, client=client, size=size)))


def test_site_sender_validators_run_after_the_built_in_checks() -> None:
    site = Site(Verdict.reject("Error: no such sender", 550, "5.1.8"))
    policy = SenderPolicy(
        hasFreeSpace=lambda n: n < 100,
        validators=[ConfiguredPlugin("site", site, 5)],
        clock=Clock(),
    )
    assert [c.name for c in policy.chain.plugins] == ["free-space", "site"]
    assert mail(policy, "a@example.com", size=1000).reply.code == 452 and site.seen == []
    assert str(mail(policy, "a@example.com").reply) == "550 5.1.8 Error: no such sender"
    assert site.seen == ["a@example.com"]


def test_a_failing_site_sender_validator_defers_the_mail_command() -> None:
    policy = SenderPolicy(validators=[ConfiguredPlugin("site", Site(succeed("ok")), 5)], clock=Clock())
    verdict = mail(policy, "a@example.com")
    assert str(verdict.reply) == "451 4.3.0 Error: temporary failure checking sender, try again later"


def test_a_plugin_that_blocks_the_reactor_is_named_in_the_log(monkeypatch: pytest.MonkeyPatch) -> None:
    """A site plugin that does blocking work in its call (a lookup without a Deferred, a
    sleep) holds every session of the relay meanwhile; nothing said so.  The log now names
    it, with how long it held the reactor -- once a minute at most per plugin, with how many
    times since."""
    import time

    from mailrelay import metrics

    monkeypatch.setattr(metrics, "BLOCKING_WARN_SECONDS", 0.01)
    monkeypatch.setattr(metrics, "_lastBlockingWarning", {})

    def slow(*args: Any) -> Verdict:
        time.sleep(0.02)
        return CONTINUE

    c = chain(Plugin("fast"), Plugin("slow", slow))
    with capturedLogs() as events:
        for _ in range(3):
            assert result(c.run("x", subject="192.0.2.1")) == CONTINUE
    texts = [formatEvent(e) for e in events]
    (line,) = [t for t in texts if "reactor" in t]
    assert "test plugin slow held the reactor for" in line and "deferToThread" in line
    assert not any("fast" in t for t in texts)



@pytest.mark.parametrize("later", [False, True], ids=["answer", "deferred"])
def test_a_plugin_that_blocks_past_its_timeout_is_not_believed(later: bool) -> None:
    """A plugin whose call holds the reactor longer than its timeout (the timer could not
    fire meanwhile) and then answers ACCEPT was believed, while a Deferred answering after
    the timeout is ignored and the chain defers: the answer came too late either way.  It
    now defers too, logged as a timeout with how long it held the
    reactor; a Deferred it returned is cancelled."""
    import time

    cancelled: list[bool] = []

    def blocks(client: ClientInfo) -> Any:
        time.sleep(0.03)
        return Deferred(lambda d: cancelled.append(True)) if later else ACCEPT

    clock = Clock()
    slow, after = Plugin("slow", blocks), Plugin("after", ACCEPT)
    c = chain(slow, after, timeout=0.01, clock=clock)
    client = ClientInfo("192.0.2.1", 25)
    with capturedLogs() as events:
        d = c.run(client, subject="192.0.2.1")
    assert result(d) is FAILED and after.calls == []
    assert cancelled == ([True] if later else [])
    assert clock.getDelayedCalls() == []
    (line,) = [formatEvent(e) for e in events if "slow" in formatEvent(e)]
    assert line.startswith("test plugin slow did not answer within 0.01s for 192.0.2.1; "
                           "deferring (its call held the reactor for 0.0"), line
