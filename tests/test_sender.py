"""The MAIL stage's checks (L{mailrelay.policy.sender}): sender binding, message rates, free
space, in that order."""

from __future__ import annotations

from typing import Any

from twisted.internet.defer import Deferred, succeed
from twisted.internet.task import Clock
from twisted.logger import capturedLogs, formatEvent

from mailrelay.envelope import ClientInfo, Envelope
from mailrelay.interfaces import ACCEPT, CONTINUE, Verdict, VerdictKind
from mailrelay.policy.sender import NO_SPACE_VERDICT, SenderPolicy, senderAllowed
from mailrelay.receive.limits import ListenerLimits, MemoryRateLimiter


def test_senderAllowed() -> None:
    assert senderAllowed(["@example.org"], "x@EXAMPLE.org")
    assert not senderAllowed(["@example.org"], "x@sub.example.org")
    assert senderAllowed(["a@Example.com"], "a@example.com")
    assert not senderAllowed(["a@example.com"], "b@example.com")
    assert not senderAllowed(["a@example.com"], "no-domain")
    assert senderAllowed([], "")


def verdictOf(d: Deferred[Verdict]) -> Verdict:
    box: list[Any] = []
    d.addBoth(box.append)
    (verdict,) = box
    assert isinstance(verdict, Verdict)
    return verdict


def mail(
    sender: str, user: str | None = None, size: int | None = None
) -> tuple[ClientInfo, Envelope]:
    client = ClientInfo("192.0.2.9", authUser=user)
    return client, Envelope(sender=sender, client=client, size=size)


class Limits:
    """Refuses every MAIL with a 450, counting the calls."""

    def __init__(self) -> None:
        self.calls: list[tuple[str, str | None]] = []

    def checkMail(self, address: str, user: str | None) -> Deferred[Any]:
        self.calls.append((address, user))

        class Refusal:
            reply = Verdict.defer("Error: too much mail", 450, "4.7.1").reply
            reason = "message rate 3 in 60s is over the limit of 2"

        return succeed(Refusal())


def test_nothing_configured_accepts() -> None:
    assert verdictOf(SenderPolicy().check(*mail("a@example.com", size=10**12))) is ACCEPT


def test_binding_refuses_first_and_nothing_else_is_counted() -> None:
    limits = Limits()
    policy = SenderPolicy(senders={"alice": ("@example.org",)}, limits=limits)
    with capturedLogs() as events:
        verdict = verdictOf(policy.check(*mail("mallory@example.net", "alice")))
    assert verdict.kind is VerdictKind.REJECT and verdict.reply is not None
    assert str(verdict.reply) == (
        "553 5.7.1 <mallory@example.net>: Sender address rejected: not owned by user alice"
    )
    assert limits.calls == []
    assert formatEvent(events[0]) == (
        "192.0.2.9: sasl_username=alice may not send as <mallory@example.net>"
    )
    # Users not listed, and clients not authenticated, may use any sender.
    assert policy.checkBinding(*mail("x@example.net", "bob")) is CONTINUE
    assert policy.checkBinding(*mail("x@example.net")) is CONTINUE


def test_rates_come_before_the_space_check() -> None:
    limits = Limits()
    asked: list[int] = []
    policy = SenderPolicy(limits=limits, hasFreeSpace=lambda n: asked.append(n) or False)
    with capturedLogs() as events:
        verdict = verdictOf(policy.check(*mail("a@example.com", "alice", size=5)))
    assert verdict.kind is VerdictKind.DEFER and verdict.reply is not None
    assert verdict.reply.code == 450 and asked == [] and limits.calls == [("192.0.2.9", "alice")]
    assert "MAIL FROM:<a@example.com> refused: message rate 3" in formatEvent(events[0])


def test_free_space_for_the_announced_size() -> None:
    asked: list[int] = []

    def hasFreeSpace(needed: int) -> bool:
        asked.append(needed)
        return needed < 100

    limits = ListenerLimits("relay.test", "test", MemoryRateLimiter(Clock()), Clock())
    policy = SenderPolicy(limits=limits, hasFreeSpace=hasFreeSpace)
    assert verdictOf(policy.check(*mail("a@example.com", size=99))) is ACCEPT
    assert verdictOf(policy.check(*mail("a@example.com", size=100))) is NO_SPACE_VERDICT
    assert verdictOf(policy.check(*mail("a@example.com"))) is ACCEPT
    assert asked == [99, 100, 0]
