"""Routing: which backend, next hop and options each recipient goes to (L{table}), and MX
resolution.

May import the values (L{mailrelay.interfaces}, L{mailrelay.envelope}, L{mailrelay.errors},
L{mailrelay.address}) and L{mailrelay.smtp}.
"""

from mailrelay.route import table as _table
from mailrelay.route.table import *  # noqa: F403
from mailrelay.route.table import nexthopForDomain, parseNameserver

__all__ = [*_table.__all__, "nexthopForDomain", "parseNameserver"]
