"""Delivery backends: where a message goes once it is routed.

Each backend provides L{mailrelay.interfaces.IDeliveryBackend}; the queue groups the pending
recipients of a message by L{Route} C{(backend, nexthop)} and calls the backend's C{deliver}
once per group.  The built-in backends, by the name a route uses:

  - C{"smtp"}: L{mailrelay.delivery.smtp.SMTPBackend}, to MX hosts or a smarthost;
  - C{"lmtp"}: L{mailrelay.delivery.lmtp.LMTPBackend}, to a local mail store (TCP or UNIX);
  - C{"maildir"}: L{mailrelay.delivery.maildir.MaildirBackend}, files in a Maildir;
  - C{"discard"}: L{mailrelay.delivery.discard.DiscardBackend}, for load tests.

This package does not import its modules (nor the reactor) itself: import the backend's
module when building it.
"""

from __future__ import annotations

from typing import Any, Iterable

from mailrelay.interfaces import DeliveryStatus, RecipientResult

__all__ = ["BUILTIN_BACKENDS", "resultsForAll"]

#: The names of the built-in backends, as routes name them.
BUILTIN_BACKENDS = ("smtp", "lmtp", "maildir", "discard")


def resultsForAll(
    recipients: Iterable[Any],
    status: DeliveryStatus,
    code: str,
    diagnostic: str,
    remoteMTA: str | None = None,
) -> list[RecipientResult]:
    """The same result for each of C{recipients} (L{mailrelay.envelope.Recipient}s)."""
    return [
        RecipientResult(
            address=r.address, status=status, code=code, diagnostic=diagnostic, remoteMTA=remoteMTA
        )
        for r in recipients
    ]
