"""Routing: which backend, next hop and options each recipient goes to: the site's routers
before the routing table (L{chain}), the table (L{table}), the one parser of each kind of
next hop (L{nexthop}), MX resolution (L{mx}), and the relay's own addresses (L{ownaddr}).

May import the values (L{mailrelay.interfaces}, L{mailrelay.envelope}, L{mailrelay.errors},
L{mailrelay.address}) and L{mailrelay.smtp}.
"""

from mailrelay.errors import DeliveryFailure, PermanentFailure, TransientFailure
from mailrelay.route import chain as _chain
from mailrelay.route import mx as _mx
from mailrelay.route import nexthop as _nexthop
from mailrelay.route import table as _table
from mailrelay.route.chain import *  # noqa: F403
from mailrelay.route.mx import *  # noqa: F403
from mailrelay.route.nexthop import *  # noqa: F403
from mailrelay.route.table import *  # noqa: F403
from mailrelay.route.table import nexthopForDomain

__all__ = [
    *_chain.__all__,
    *_mx.__all__,
    *_nexthop.__all__,
    *_table.__all__,
    "nexthopForDomain",
    "DeliveryFailure",
    "PermanentFailure",
    "TransientFailure",
]
