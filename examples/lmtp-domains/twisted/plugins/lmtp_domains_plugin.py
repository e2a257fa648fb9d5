"""mailrelay dropin: the C{lmtp-domains} router (an example site plugin).

Twisted imports this module whenever it scans for plugins, so it only names the plugin: the
router's module, C{lmtp_domains}, is imported when the configuration uses it.

There is deliberately no C{__init__.py} in C{twisted/} or C{twisted/plugins/}: this
directory extends Twisted's C{twisted.plugins} package instead of replacing it.
"""

from __future__ import annotations

from mailrelay.interfaces import IRouter
from mailrelay.plugins import MailRelayPlugin

lmtpDomains = MailRelayPlugin(
    name="lmtp-domains",
    provides=IRouter,
    description="Some recipient domains routed to an LMTP server, as a file says",
    factory="lmtp_domains:build",
)
