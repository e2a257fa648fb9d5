"""The relay's own addresses (L{mailrelay.route.ownaddr}): where its listeners listen, for
telling an MX host that is the relay itself by its address (Postfix's smtp_find_self)."""

from __future__ import annotations

import pytest

from mailrelay.route.ownaddr import OwnAddresses, listenAddress, localAddresses

LOCAL = frozenset({"127.0.0.1", "192.0.2.5", "::1", "2001:db8::5"})


@pytest.mark.parametrize("description,expected", [
    ("tcp:25", ("", 25, 4)),
    ("tcp:2525:interface=127.0.0.1", ("127.0.0.1", 2525, 4)),
    ("tcp:25:interface=0.0.0.0", ("", 25, 4)),
    (r"tcp6:25:interface=\:\:", ("", 25, 6)),
    (r"tcp6:port=587:interface=2001\:DB8\:\:5", ("2001:db8::5", 587, 6)),
    ("ssl:465:privateKey=key.pem:interface=192.0.2.5", ("192.0.2.5", 465, 4)),
    ("unix:/run/mailrelay.sock", None),
    ("systemd:domain=INET:index=0", None),
])
def test_listen_address(description: str, expected: tuple | None) -> None:
    assert listenAddress(description) == expected


def test_own_addresses_of_listeners_and_proxy_interfaces() -> None:
    own = OwnAddresses(["tcp:2525:interface=127.0.0.1", "tcp:25", "unix:/x"],
                       proxyInterfaces=["198.51.100.7"], local=lambda: LOCAL)
    assert ("127.0.0.1", 2525) in own
    assert ("192.0.2.5", 25) in own and ("127.0.0.1", 25) in own
    assert ("127.0.0.9", 25) in own  # (every 127/8 address is this host's)
    assert ("192.0.2.5", 2525) not in own  # not listened on
    assert ("192.0.2.6", 25) not in own  # another host
    assert ("2001:db8::5", 25) not in own  # an IPv4 listener
    assert ("198.51.100.7", 25) in own  # a proxy or NAT in front of the relay
    assert ("198.51.100.7", 2525) not in own
    six = OwnAddresses([r"tcp6:25:interface=\:\:"], local=lambda: LOCAL)
    assert ("2001:db8::5", 25) in six and ("::1", 25) in six
    assert ("192.0.2.5", 25) in six  # (an IPv6 wildcard takes IPv4 too)
    assert ("2001:DB8::5", 25) in six  # (addresses are compared normalised)
    assert ("2001:db8:0::5", 25) in six
    assert ("not an address", 25) not in six
    assert ("192.0.2.5", 25) not in OwnAddresses([])


def test_own_addresses_refuses_a_proxy_interface_that_is_not_an_address() -> None:
    with pytest.raises(ValueError, match="'mx.example' is not an IP address"):
        OwnAddresses([], proxyInterfaces=["mx.example"])


def test_local_addresses_of_this_host() -> None:
    """Read from the system: at least the loopback addresses."""
    assert "127.0.0.1" in localAddresses()
