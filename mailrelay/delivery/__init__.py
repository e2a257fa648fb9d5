"""Delivery backends: where a message goes once it is routed.

Each backend provides L{mailrelay.interfaces.IDeliveryBackend}; the queue groups the pending
recipients of a message by L{Route <mailrelay.interfaces.Route>} (backend, next hop and
options) and calls the backend's C{deliver} once per group, with that route.  The built-in
backends, by the name a route uses:

  - C{"smtp"}: L{mailrelay.delivery.smtp.SMTPBackend}, to MX hosts or a smarthost;
  - C{"lmtp"}: L{mailrelay.delivery.lmtp.LMTPBackend}, to a local mail store (TCP or UNIX);
  - C{"maildir"}: L{mailrelay.delivery.maildir.MaildirBackend}, files in a Maildir;
  - C{"discard"}: L{mailrelay.delivery.discard.DiscardBackend}, for load tests.

L{mailrelay.delivery.common} holds what they share.  This package does not import the
backends' modules (nor the reactor) itself: import the backend's module when building it.

The package may import the values (L{mailrelay.interfaces}, L{mailrelay.envelope},
L{mailrelay.errors}, L{mailrelay.address}), L{mailrelay.smtp} and L{mailrelay.route}.
"""

from mailrelay.delivery.common import (
    BUILTIN_BACKENDS,
    ClientBackend,
    PerDestination,
    Quitter,
    resultsForAll,
)

__all__ = ["BUILTIN_BACKENDS", "resultsForAll", "PerDestination", "Quitter", "ClientBackend"]
