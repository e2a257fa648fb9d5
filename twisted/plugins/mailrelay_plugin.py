"""The mailrelay dropin: the C{twistd mailrelay} command and the built-in plugins.

Everything here is cheap to import: C{ServiceMaker} imports L{mailrelay.app.tap} only when the
command runs, and the built-in plugins import their implementations only when built.
"""

from twisted.application.service import ServiceMaker

from mailrelay.interfaces import IHeaderStamper, MailRelayPlugin
from mailrelay.policy.validators import acceptedDomainsPlugin, recipientMapPlugin, regexPlugin

mailrelay = ServiceMaker(
    "mailrelay",
    "mailrelay.app.tap",
    "A durable, pluggable SMTP relay (smarthost).",
    "mailrelay",
)

defaultStamper = MailRelayPlugin(
    name="default",
    provides=IHeaderStamper,
    description="Received:, and Message-Id:/Date: when missing",
    factory="mailrelay.cleanup.stamping:buildDefaultStamper",
)

__all__ = [
    "mailrelay",
    "defaultStamper",
    "acceptedDomainsPlugin",
    "recipientMapPlugin",
    "regexPlugin",
]
