"""What the built-in plugins need to know of a client's address: the address as an
C{ipaddress} object (an IPv4-mapped IPv6 address as the IPv4 one: L{clientIP}, from
L{mailrelay.address}) and whether a plugin's options exempt the client."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from mailrelay.address import IPAddress, clientIP
from mailrelay.config.schema import Key
from mailrelay.config.values import IPNetwork, boolean, networks

__all__ = ["EXEMPT_NETWORKS", "EXEMPT_RELAY_CLIENTS", "IPAddress", "clientIP", "isExempt"]

#: The option listing networks a plugin leaves alone.
EXEMPT_NETWORKS = Key(
    "exempt_networks", networks, "Client networks the plugin leaves alone.", default=[]
)
#: The option leaving alone the clients that may relay (relay networks, authenticated).
EXEMPT_RELAY_CLIENTS = Key(
    "exempt_relay_clients",
    boolean,
    "Leave alone the clients in [relay] networks and those authenticated.",
    default=True,
)


def isExempt(client: Any, ip: IPAddress, exemptRelay: bool, exempt: Sequence[IPNetwork]) -> bool:
    """Whether C{client} (a L{mailrelay.envelope.ClientInfo}) at C{ip} is left alone: it may
    relay (in a relay network, or authenticated) and C{exemptRelay}, or it is in one of the
    C{exempt} networks."""
    if exemptRelay and (client.relayAllowed or client.authUser):
        return True
    return any(ip.version == net.version and ip in net for net in exempt)
