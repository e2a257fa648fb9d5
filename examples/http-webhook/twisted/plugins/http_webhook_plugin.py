"""mailrelay dropin: the C{http-webhook} delivery backend (an example site plugin).

It only names the plugin (scans stay cheap); C{http_webhook} is imported when a
C{[[backends]]} table uses it.  No C{__init__.py} in C{twisted/} or C{twisted/plugins/}.
"""

from __future__ import annotations

from mailrelay.interfaces import IDeliveryBackend
from mailrelay.plugins import MailRelayPlugin

httpWebhook = MailRelayPlugin(
    name="http-webhook",
    provides=IDeliveryBackend,
    description="Each message POSTed to an HTTP(S) web hook",
    factory="http_webhook:build",
)
