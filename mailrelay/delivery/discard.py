"""The C{discard} backend: every recipient counts as delivered, nothing is sent anywhere.

Meant for load tests of the relay itself (and for routing a domain to nowhere).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from twisted.internet.defer import Deferred, succeed
from twisted.logger import Logger
from zope.interface import implementer

from mailrelay.delivery.common import builtinOptions, resultsForAll
from mailrelay.interfaces import DeliveryStatus, IDeliveryBackend, PluginContext, Route

log = Logger()


@implementer(IDeliveryBackend)
class DiscardBackend:
    """Delivers to nowhere: each recipient gets C{2.0.0 "X-mailrelay; discarded"}."""

    def deliver(self, envelope: Any, recipients: Any, route: Route, messagePath: Path) -> Deferred:
        """Count every recipient as delivered; C{route} does not matter."""
        recipients = list(recipients)
        log.info(
            "{queueID}: discarded for {count} recipient(s): {addresses}",
            queueID=envelope.queueID,
            count=len(recipients),
            addresses=", ".join(r.address for r in recipients),
        )
        return succeed(
            resultsForAll(recipients, DeliveryStatus.DELIVERED, "2.0.0", "X-mailrelay; discarded")
        )

    def close(self) -> Deferred:
        """Nothing to close."""
        return succeed(None)


def build(options: dict[str, Any], context: PluginContext) -> DiscardBackend:
    """The C{discard} plugin's factory: no options."""
    builtinOptions("discard", options, ())
    return DiscardBackend()
