"""mailrelay dropin: the C{sqlite-recipients} recipient validator (an example site plugin).

Twisted imports this module whenever it scans for plugins, so it only names the plugin: the
validator's module, C{sqlite_recipients}, is imported when the configuration uses it.  Keep
dropins like this one free of any import of the reactor or of heavy modules.

There is deliberately no C{__init__.py} in C{twisted/} or C{twisted/plugins/}: this
directory extends Twisted's C{twisted.plugins} package instead of replacing it.
"""

from __future__ import annotations

from mailrelay.interfaces import IRecipientValidator
from mailrelay.plugins import MailRelayPlugin

sqliteRecipients = MailRelayPlugin(
    name="sqlite-recipients",
    provides=IRecipientValidator,
    description="Recipients looked up in an SQLite database, off the reactor thread",
    factory="sqlite_recipients:build",
)
