"""The site's plugins of the SMTP session's hooks, as the listeners use them: the chains of the
connect, HELO and DATA hooks, the site's sender validators (each listener runs them after its
built-in ones: L{mailrelay.policy.sender.SenderPolicy}) and the ESMTP extensions.

The recipient validators are L{mailrelay.policy.chain.RecipientPolicy}'s, the message
filters the intake's (L{mailrelay.cleanup.intake}), both chains of the same runner
(L{mailrelay.policy.runner.PolicyChain}).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, replace
from typing import Any

from mailrelay.interfaces import Verdict
from mailrelay.policy.runner import ConfiguredPlugin, PolicyChain
from mailrelay.policy.sender import SenderPolicy

__all__ = [
    "CONNECT_CHECK_FAILED",
    "DATA_CHECK_FAILED",
    "HELO_CHECK_FAILED",
    "SessionHooks",
    "makeSessionHooks",
]

#: The answer of the connect hook when a plugin fails (sent as a 421 greeting).
CONNECT_CHECK_FAILED = Verdict.defer(
    "Error: temporary failure checking the client, try again later"
)
#: The answer to HELO/EHLO when a plugin of the helo hook fails.
HELO_CHECK_FAILED = Verdict.defer("Error: temporary failure checking HELO, try again later")
#: The answer to DATA when a plugin of the data hook fails.
DATA_CHECK_FAILED = Verdict.defer(
    "Error: temporary failure checking the message, try again later"
)


@dataclass(frozen=True)
class SessionHooks:
    """The site's plugins of the session's hooks, shared by a relay's listeners.

    @ivar connect: the chain of L{IConnectionPolicy.checkConnect
        <mailrelay.interfaces.IConnectionPolicy.checkConnect>}, or C{None} (the greeting then
        waits for nothing but the limits and C{greet_pause}).
    @ivar helo: the chain of C{checkHelo}, or C{None} (no question at HELO/EHLO).
    @ivar data: the chain of L{IDataPolicy.checkData <mailrelay.interfaces.IDataPolicy>}, or
        C{None}.
    @ivar senders: the site's sender validators, in order (after each listener's built-in
        ones).
    @ivar extensions: the ESMTP extensions, as the sessions call them (see
        L{mailrelay.receive.extensions.ExtensionAdapter}), in order.
    @ivar sender: one listener's MAIL stage (its built-in sender validators, then
        C{senders}: L{mailrelay.policy.sender.SenderPolicy}), set by the listener's builder
        (L{forListener}); C{None} in the relay's shared hooks.
    """

    connect: PolicyChain | None = None
    helo: PolicyChain | None = None
    data: PolicyChain | None = None
    senders: tuple[ConfiguredPlugin, ...] = ()
    extensions: tuple[Any, ...] = ()
    sender: SenderPolicy | None = None

    def forListener(
        self, senders: Mapping[str, Sequence[str]], limits: Any, hasFreeSpace: Any, clock: Any
    ) -> SessionHooks:
        """These hooks for one listener: with its MAIL stage (see L{SenderPolicy}: the users'
        sender bindings, its limits, the spool's free space, then the site's validators)."""
        sender = SenderPolicy(senders, limits, hasFreeSpace, self.senders, clock)
        return replace(self, sender=sender)


def makeSessionHooks(
    clock: Any,
    *,
    connect: Sequence[ConfiguredPlugin] = (),
    helo: Sequence[ConfiguredPlugin] = (),
    senders: Sequence[ConfiguredPlugin] = (),
    data: Sequence[ConfiguredPlugin] = (),
    extensions: Sequence[Any] = (),
) -> SessionHooks:
    """The L{SessionHooks} of these plugins (a hook without plugins has no chain).

    @raise TypeError: a plugin lacks its hook's method.
    @raise ValueError: a bad timeout.
    """

    def chain(hook: str, method: str, plugins: Sequence[ConfiguredPlugin], failed: Verdict) -> Any:
        return PolicyChain(hook, method, plugins, clock, failed) if plugins else None

    return SessionHooks(
        connect=chain("connect", "checkConnect", connect, CONNECT_CHECK_FAILED),
        helo=chain("helo", "checkHelo", helo, HELO_CHECK_FAILED),
        data=chain("data", "checkData", data, DATA_CHECK_FAILED),
        senders=tuple(senders),
        extensions=tuple(extensions),
    )
