"""Relay control and the recipient validator chain.

Relay control is not a plugin: it runs first and cannot be configured away, so a mistake in the
plugin list never opens the relay.  A recipient passes it when the client may relay (it is in a
relay network), or when the recipient's domain is an accepted (local) domain and the address
carries no sender-specified routing (Postfix's C{allow_untrusted_routing = no}).  The validators
then run in order (a L{mailrelay.policy.runner.PolicyChain}); the first verdict other than
CONTINUE decides, and a validator that fails or is too slow defers the recipient (451 4.3.0): a
failing plugin never accepts.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from functools import lru_cache
from ipaddress import IPv4Network, IPv6Network
from typing import Any

from twisted.internet.defer import Deferred, succeed
from twisted.logger import Logger

from mailrelay.address import Mailbox, clientIP
from mailrelay.envelope import ClientInfo, Envelope, Recipient
from mailrelay.interfaces import CONTINUE, IRecipientValidator, Verdict, VerdictKind
from mailrelay.policy.runner import ConfiguredPlugin, PolicyChain
from mailrelay.smtp import replies as R

log = Logger()

#: The client addresses whose decisions (relay client, limit exception) are remembered.
ADDRESS_CACHE_SIZE = 4096

RELAY_DENIED = Verdict(VerdictKind.REJECT, R.RELAY_DENIED)
NO_POSTMASTER = Verdict(VerdictKind.REJECT, R.NO_POSTMASTER)
VALIDATOR_FAILED = Verdict(VerdictKind.DEFER, R.VALIDATOR_FAILED)


class RelayControl:
    """Decides who may relay, and which domains are ours.

    @param networks: the client networks allowed to relay to any domain.
    @param acceptDomains: canonical (normalised) domains we accept mail for from anyone.
    @param hostname: this relay's host name; C{postmaster@hostname} is always accepted
        (RFC 5321 4.5.1)...
    @param postmasterDeliverable: ...unless it has nowhere to go (C{False}: no C{[queue]
        postmaster}, and nothing routes C{hostname} but its MX lookup, normally this relay;
        or a function of the sender, C{None} when not known, saying so for that sender's
        mail, which a sender route may take elsewhere): then it is refused
        (L{NO_POSTMASTER}), rather than accepted and bounced as a loop.
    """

    def __init__(
        self,
        networks: Iterable[IPv4Network | IPv6Network],
        acceptDomains: Iterable[str],
        hostname: str,
        postmasterDeliverable: bool | Callable[[str | None], bool] = True,
    ) -> None:
        self.postmasterDeliverable = postmasterDeliverable
        self.networks = tuple(networks)
        self.acceptDomains = frozenset(acceptDomains)
        self.hostname = hostname.lower().rstrip(".")
        # Decided once per address for the life of this configuration (a reload builds a
        # new RelayControl), not parsed again at every connection.
        self.isRelayClient = lru_cache(maxsize=ADDRESS_CACHE_SIZE)(  # type: ignore[method-assign]
            self._isRelayClient
        )

    def isRelayClient(self, host: str) -> bool:
        """Is the client at C{host} (an IP address as text) in a relay network?"""
        return self._isRelayClient(host)

    def _isRelayClient(self, host: str) -> bool:
        addr = clientIP(host)
        if addr is None:
            return False
        return any(addr.version == net.version and addr in net for net in self.networks)

    def isPostmaster(self, mailbox: Mailbox) -> bool:
        """Whether C{mailbox} is C{postmaster@hostname} (the rule of L{check} that asks
        for the sender)."""
        return mailbox.localPart.lower() == "postmaster" and mailbox.domain == self.hostname

    def check(self, client: ClientInfo, mailbox: Mailbox, sender: str | None = None) -> Verdict:
        """CONTINUE when the recipient passes relay control, else 554 5.7.1 (or 550 5.1.1
        for a postmaster with nowhere to go from C{sender}, the envelope's)."""
        isPostmaster = self.isPostmaster(mailbox)
        deliverable = self.postmasterDeliverable
        if isPostmaster and not (deliverable(sender) if callable(deliverable) else deliverable):
            return NO_POSTMASTER
        if client.relayAllowed:
            return CONTINUE
        if mailbox.hasRouting:
            # user%other@ours, other!user@ours, "user@other"@ours: the next hop might route
            # it elsewhere, so only trusted clients may use it.
            return RELAY_DENIED
        if isPostmaster:
            return CONTINUE
        if mailbox.domain in self.acceptDomains:
            return CONTINUE
        return RELAY_DENIED


#: One recipient validator of the chain (a L{ConfiguredPlugin}: name, validator, timeout).
ConfiguredValidator = ConfiguredPlugin


class RecipientPolicy:
    """Relay control, then the validator chain (a L{PolicyChain} of the C{rcpt} hook), for
    one RCPT."""

    def __init__(
        self,
        relay: RelayControl,
        validators: Sequence[ConfiguredPlugin],
        clock: Any,
        mailboxes: Any = None,
        deliverySender: Callable[[Envelope], Deferred[str]] | None = None,
    ) -> None:
        """
        @param mailboxes: asked last, about each recipient the validators did not refuse:
            C{mailboxes.check(recipient)} returns C{None} (not its business) or a Deferred
            firing with L{CONTINUE} or the refusal (the maildir routes' users:
            L{mailrelay.delivery.maildir.MaildirUsers}); or C{None}.
        @param deliverySender: the envelope sender the delivery will route the message by,
            from its envelope at RCPT (the sender as the message filters will rewrite it:
            C{sender-canonical}), as a Deferred, asked for the rule of postmaster mail only
            (L{RelayControl.postmasterDeliverable}); C{None}: the sender as given.
        @raise TypeError: a validator does not provide L{IRecipientValidator}.
        """
        for v in validators:
            if not IRecipientValidator.providedBy(v.plugin):
                raise TypeError(f"{v.name} does not provide IRecipientValidator")
        self.relay = relay
        self.validators = PolicyChain(
            "rcpt", "validateRecipient", validators, clock, VALIDATOR_FAILED
        )
        self.clock = clock
        self.mailboxes = mailboxes
        self.deliverySender = deliverySender

    def check(
        self, client: ClientInfo, envelope: Envelope, recipient: Recipient, mailbox: Mailbox
    ) -> Deferred[Verdict]:
        if self.deliverySender is not None and self.relay.isPostmaster(mailbox):
            d = self.deliverySender(envelope)
            return d.addCallback(
                lambda sender: self._check(client, envelope, recipient, mailbox, sender))
        return self._check(client, envelope, recipient, mailbox, envelope.sender)

    def _check(self, client: ClientInfo, envelope: Envelope, recipient: Recipient,
               mailbox: Mailbox, sender: str) -> Deferred[Verdict]:
        """L{check}, C{sender} the one the delivery will route by."""
        verdict = self.relay.check(client, mailbox, sender)
        if verdict.kind is not VerdictKind.CONTINUE:
            return succeed(verdict)
        if self.validators:
            d = self.validators.run(client, envelope, recipient, subject=recipient.address)
        else:
            d = succeed(verdict)
        if self.mailboxes is None:
            return d
        return d.addCallback(self._checkMailbox, recipient)

    def _checkMailbox(self, verdict: Verdict, recipient: Recipient) -> Any:
        """After the validators: the recipient's mailbox, unless they refused it."""
        if verdict.kind not in (VerdictKind.CONTINUE, VerdictKind.ACCEPT):
            return verdict
        d = self.mailboxes.check(recipient)
        if d is None:
            return verdict
        return d.addCallback(lambda known: verdict if known.kind is VerdictKind.CONTINUE else known)
