"""The MAIL stage: what is checked before a transaction starts, in order.

  1. sender binding: an authenticated user may only use the MAIL FROM addresses
     C{[auth.senders]} gives it (553 5.7.1);
  2. message rates: per client address and per authenticated user, counted by the listener's
     limits (450 4.7.1);
  3. free space: the spool must have room for the size the client announced (452 4.3.1).

Each is a check of its own, answering a L{Verdict} (C{CONTINUE} to go on); the first other
verdict decides, and when all continue the sender is accepted.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from twisted.internet.defer import Deferred, succeed
from twisted.logger import Logger

from mailrelay.envelope import ClientInfo, Envelope
from mailrelay.interfaces import ACCEPT, CONTINUE, Reply, Verdict, VerdictKind
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


@dataclass(frozen=True)
class SenderPolicy:
    """The MAIL-stage checks of one listener.

    @ivar senders: user name to the MAIL FROM patterns the user may use (see
        L{senderAllowed}); users not listed may use any sender.
    @ivar limits: the listener's limits (C{checkMail(address, user)} returning a Deferred
        firing with a refusal, which has C{reply} and C{reason}, or C{None}), or C{None}.
    @ivar hasFreeSpace: whether the spool has room for so many octets.
    """

    senders: Mapping[str, Sequence[str]] = field(default_factory=dict)
    limits: Any = None
    hasFreeSpace: Callable[[int], bool] = _everything

    def check(self, client: ClientInfo, envelope: Envelope) -> Deferred[Verdict]:
        """Judge the MAIL command of C{client} that made C{envelope}."""
        verdict = self.checkBinding(client, envelope)
        if verdict.kind is not VerdictKind.CONTINUE:
            return succeed(verdict)

        def rated(verdict: Verdict) -> Verdict:
            if verdict.kind is not VerdictKind.CONTINUE:
                return verdict
            verdict = self.checkSpace(envelope)
            return ACCEPT if verdict.kind is VerdictKind.CONTINUE else verdict

        if self.limits is None:
            return succeed(rated(CONTINUE))
        return self.checkRates(client, envelope).addCallback(rated)

    def checkBinding(self, client: ClientInfo, envelope: Envelope) -> Verdict:
        """553 5.7.1 when an authenticated user may not use the sender address."""
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

    def checkRates(self, client: ClientInfo, envelope: Envelope) -> Deferred[Verdict]:
        """Count the message against the listener's rates: 450 4.7.1 beyond one."""

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

    def checkSpace(self, envelope: Envelope) -> Verdict:
        """452 4.3.1 when the spool has no room for the announced size."""
        return CONTINUE if self.hasFreeSpace(envelope.size or 0) else NO_SPACE_VERDICT
