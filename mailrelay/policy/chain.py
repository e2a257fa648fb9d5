"""Relay control and the recipient validator chain.

Relay control is not a plugin: it runs first and cannot be configured away, so a mistake in the
plugin list never opens the relay.  A recipient passes it when the client may relay (it is in a
relay network), or when the recipient's domain is an accepted (local) domain and the address
carries no sender-specified routing (Postfix's C{allow_untrusted_routing = no}).  The validators
then run in order; the first verdict other than CONTINUE decides, and a validator that fails or
is too slow defers the recipient (451 4.3.0): a failing plugin never accepts.
"""

from __future__ import annotations

import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from ipaddress import IPv4Network, IPv6Network, ip_address
from typing import Any

from twisted.internet.defer import Deferred, TimeoutError, maybeDeferred, succeed
from twisted.logger import Logger

from mailrelay.address import Mailbox
from mailrelay.envelope import ClientInfo, Envelope, Recipient
from mailrelay.interfaces import CONTINUE, IRecipientValidator, Verdict, VerdictKind
from mailrelay.metrics import timePlugin
from mailrelay.smtp import replies as R

log = Logger()

RELAY_DENIED = Verdict(VerdictKind.REJECT, R.RELAY_DENIED)
VALIDATOR_FAILED = Verdict(VerdictKind.DEFER, R.VALIDATOR_FAILED)


class RelayControl:
    """Decides who may relay, and which domains are ours.

    @param networks: the client networks allowed to relay to any domain.
    @param acceptDomains: canonical (normalised) domains we accept mail for from anyone.
    @param hostname: this relay's host name; C{postmaster@hostname} is always accepted
        (RFC 5321 4.5.1).
    """

    def __init__(
        self,
        networks: Iterable[IPv4Network | IPv6Network],
        acceptDomains: Iterable[str],
        hostname: str,
    ) -> None:
        self.networks = tuple(networks)
        self.acceptDomains = frozenset(acceptDomains)
        self.hostname = hostname.lower().rstrip(".")

    def isRelayClient(self, host: str) -> bool:
        """Is the client at C{host} (an IP address as text) in a relay network?"""
        try:
            addr = ip_address(host.split("%", 1)[0])
        except ValueError:
            return False
        if addr.version == 6 and addr.ipv4_mapped is not None:
            addr = addr.ipv4_mapped
        return any(addr.version == net.version and addr in net for net in self.networks)

    def check(self, client: ClientInfo, mailbox: Mailbox) -> Verdict:
        """CONTINUE when the recipient passes relay control, else 554 5.7.1."""
        if client.relayAllowed:
            return CONTINUE
        if mailbox.hasRouting:
            # user%other@ours, other!user@ours, "user@other"@ours: the next hop might route
            # it elsewhere, so only trusted clients may use it.
            return RELAY_DENIED
        if mailbox.localPart.lower() == "postmaster" and mailbox.domain == self.hostname:
            return CONTINUE
        if mailbox.domain in self.acceptDomains:
            return CONTINUE
        return RELAY_DENIED


@dataclass(frozen=True)
class ConfiguredValidator:
    name: str
    validator: Any  # provides IRecipientValidator
    timeout: float


class RecipientPolicy:
    """Relay control, then the validator chain, for one RCPT."""

    def __init__(
        self, relay: RelayControl, validators: Sequence[ConfiguredValidator], clock: Any
    ) -> None:
        for v in validators:
            if not IRecipientValidator.providedBy(v.validator):
                raise TypeError(f"{v.name} does not provide IRecipientValidator")
        self.relay = relay
        self.validators = tuple(validators)
        self.clock = clock

    def check(
        self, client: ClientInfo, envelope: Envelope, recipient: Recipient, mailbox: Mailbox
    ) -> Deferred[Verdict]:
        verdict = self.relay.check(client, mailbox)
        if verdict.kind is not VerdictKind.CONTINUE or not self.validators:
            return succeed(verdict)
        return self._next(0, client, envelope, recipient)

    def _next(
        self, index: int, client: ClientInfo, envelope: Envelope, recipient: Recipient
    ) -> Deferred[Verdict]:
        if index >= len(self.validators):
            return succeed(CONTINUE)
        configured = self.validators[index]
        started = time.perf_counter()
        d = maybeDeferred(configured.validator.validateRecipient, client, envelope, recipient)
        timePlugin("recipient_validator", configured.name, d, started)
        d.addTimeout(configured.timeout, self.clock)

        def decided(verdict: object) -> Verdict | Deferred[Verdict]:
            if not isinstance(verdict, Verdict):
                log.error(
                    "recipient validator {validator} returned {result!r}, not a Verdict; deferring",
                    validator=configured.name,
                    result=verdict,
                )
                return VALIDATOR_FAILED
            if verdict.kind is VerdictKind.CONTINUE:
                return self._next(index + 1, client, envelope, recipient)
            return verdict

        def failed(failure: Any) -> Verdict:
            if failure.check(TimeoutError):
                log.warn(
                    "recipient validator {validator} timed out after {timeout}s for {recipient};"
                    " deferring",
                    validator=configured.name,
                    timeout=configured.timeout,
                    recipient=recipient.address,
                )
            else:
                log.failure(
                    "recipient validator {validator} failed for {recipient}; deferring",
                    failure,
                    validator=configured.name,
                    recipient=recipient.address,
                )
            return VALIDATOR_FAILED

        d.addCallbacks(decided, failed)
        return d
