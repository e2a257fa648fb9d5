"""The MAIL stage: what is checked before a transaction starts, in order.

  1. sender binding: an authenticated user may only use the MAIL FROM addresses
     C{[auth.senders]} gives it (553 5.7.1);
  2. message rates: per client address and per authenticated user, counted by the listener's
     limits (450 4.7.1);
  3. free space: the spool must have room for the size the client announced (452 4.3.1);
  4. the site's sender validators (C{[[plugins]]} serving the C{mail} hook), in order.

The first three are the relay's own sender validators (L{SenderBinding}, L{MessageRates},
L{FreeSpace}: L{ISenderValidator}s), run with the site's by one L{PolicyChain}: each answers
a L{Verdict} (C{CONTINUE} to go on); the first other verdict decides, and when all continue
the sender is accepted.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from twisted.internet.defer import Deferred
from twisted.logger import Logger
from zope.interface import implementer

from mailrelay.envelope import ClientInfo, Envelope
from mailrelay.interfaces import ACCEPT, CONTINUE, ISenderValidator, Reply, Verdict, VerdictKind
from mailrelay.policy.runner import ConfiguredPlugin, PolicyChain
from mailrelay.smtp import replies as R

log = Logger()

NO_SPACE_VERDICT = Verdict(VerdictKind.DEFER, R.NO_SPACE)


def senderAllowed(patterns: Sequence[str], sender: str) -> bool:
    """May a user bound to C{patterns} use the MAIL FROM address C{sender}?

    A pattern is an address (C{"alice@example.com"}, compared with the domain
    case-insensitively and the local part exactly) or C{"@domain"} (any address in that
    domain).  The null sender (C{""}, for bounces) is always allowed.
    """
    if sender == "":
        return True
    local, at, domain = sender.rpartition("@")
    if not at:
        return False
    domain = domain.lower()
    for pattern in patterns:
        if pattern.startswith("@"):
            if pattern[1:].lower() == domain:
                return True
        else:
            pLocal, _, pDomain = pattern.rpartition("@")
            if pLocal == local and pDomain.lower() == domain:
                return True
    return False


def _everything(needed: int) -> bool:
    return True


#: The answer of the MAIL stage when a sender validator fails.
SENDER_CHECK_FAILED = Verdict.defer("Error: temporary failure checking sender, try again later")


@implementer(ISenderValidator)
@dataclass(frozen=True)
class SenderBinding:
    """Built-in sender validator: an authenticated user may only use the MAIL FROM addresses
    C{senders} gives it (553 5.7.1); users not listed may use any.

    @ivar senders: user name to the patterns it may use (see L{senderAllowed}).
    """

    senders: Mapping[str, Sequence[str]]

    def validateSender(self, client: ClientInfo, envelope: Envelope) -> Verdict:
        user = client.authUser
        patterns = self.senders.get(user) if user is not None else None
        if patterns is None or senderAllowed(patterns, envelope.sender):
            return CONTINUE
        log.warn(
            "{client}: sasl_username={user} may not send as <{sender}>",
            client=client.address,
            user=user,
            sasl_username=user,
            sender=envelope.sender,
        )
        text = f"<{envelope.sender}>: Sender address rejected: not owned by user {user}"
        return Verdict(VerdictKind.REJECT, Reply(553, "5.7.1", text))


@implementer(ISenderValidator)
@dataclass(frozen=True)
class MessageRates:
    """Built-in sender validator: counts the message against the listener's rates, per
    client address and per authenticated user (450 4.7.1 beyond one).

    @ivar limits: the listener's limits (C{checkMail(address, user)} returning a Deferred
        firing with a refusal, which has C{reply} and C{reason}, or C{None}; a store that
        fails or is slow is their own to bound, and never stops mail).
    """

    limits: Any

    def validateSender(self, client: ClientInfo, envelope: Envelope) -> Deferred[Verdict]:
        def judged(refusal: Any) -> Verdict:
            if refusal is None:
                return CONTINUE
            log.warn(
                "{client}: MAIL FROM:<{sender}> refused: {reason}",
                client=client.address,
                sender=envelope.sender,
                reason=refusal.reason,
                sasl_username=client.authUser,
            )
            return Verdict(VerdictKind.DEFER, refusal.reply)

        d: Deferred[Any] = self.limits.checkMail(client.address, client.authUser)
        return d.addCallback(judged)


@implementer(ISenderValidator)
@dataclass(frozen=True)
class FreeSpace:
    """Built-in sender validator: the spool must have room for the size the client
    announced (452 4.3.1).

    @ivar hasFreeSpace: whether the spool has room for so many octets.
    """

    hasFreeSpace: Callable[[int], bool]

    def validateSender(self, client: ClientInfo, envelope: Envelope) -> Verdict:
        return CONTINUE if self.hasFreeSpace(envelope.size or 0) else NO_SPACE_VERDICT


@dataclass(frozen=True)
class SenderPolicy:
    """The MAIL stage of one listener: a L{PolicyChain} of the C{mail} hook, the built-in
    sender validators first (L{SenderBinding} when users are bound, L{MessageRates} when
    the listener has limits, L{FreeSpace}), then the site's (C{validators}).

    @ivar senders: user name to the MAIL FROM patterns the user may use (see
        L{senderAllowed}); users not listed may use any sender.
    @ivar limits: the listener's limits (see L{MessageRates}), or C{None}.
    @ivar hasFreeSpace: whether the spool has room for so many octets.
    @ivar validators: the site's sender validators (L{ConfiguredPlugin}s), in order.
    @ivar clock: for the site validators' timeouts (needed when there are some).
    """

    senders: Mapping[str, Sequence[str]] = field(default_factory=dict)
    limits: Any = None
    hasFreeSpace: Callable[[int], bool] = _everything
    validators: Sequence[ConfiguredPlugin] = ()
    clock: Any = None
    chain: PolicyChain = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        checks: list[tuple[str, Any]] = []
        if self.senders:
            checks.append(("sender-binding", SenderBinding(self.senders)))
        if self.limits is not None:
            checks.append(("message-rates", MessageRates(self.limits)))
        checks.append(("free-space", FreeSpace(self.hasFreeSpace)))
        builtins = [ConfiguredPlugin(name, check, None, builtin=True) for name, check in checks]
        chain = PolicyChain(
            "mail", "validateSender", [*builtins, *self.validators], self.clock, SENDER_CHECK_FAILED
        )
        object.__setattr__(self, "chain", chain)

    def check(self, client: ClientInfo, envelope: Envelope) -> Deferred[Verdict]:
        """Judge the MAIL command of C{client} that made C{envelope}: C{ACCEPT} when every
        sender validator continued."""
        return self.chain.run(client, envelope, subject=f"<{envelope.sender}>").addCallback(
            _acceptContinue
        )

    def checkBinding(self, client: ClientInfo, envelope: Envelope) -> Verdict:
        """553 5.7.1 when an authenticated user may not use the sender address."""
        return SenderBinding(self.senders).validateSender(client, envelope)

    def checkSpace(self, envelope: Envelope) -> Verdict:
        """452 4.3.1 when the spool has no room for the announced size."""
        return FreeSpace(self.hasFreeSpace).validateSender(ClientInfo(""), envelope)


def _acceptContinue(verdict: Verdict) -> Verdict:
    return ACCEPT if verdict.kind is VerdictKind.CONTINUE else verdict
