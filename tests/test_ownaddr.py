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


def test_listen_address_of_a_socket_systemd_passed(monkeypatch: pytest.MonkeyPatch) -> None:
    """A listener on a socket systemd passed (socket activation) listens where that socket
    is bound (its getsockname), found by index or by name: an MX host there is the relay
    (Postfix's smtp_find_self, whose own_inet_addr_list is where it listens).  Before, such
    a listener gave no address: only the EHLO check found the relay, once connected to
    itself.  The delivery process, which systemd passed nothing, has the relay's word for
    it (L{exportPassedSockets}, in its environment)."""
    import os
    import socket

    from twisted.internet.endpoints import _SystemdParser
    from twisted.python.systemd import ListenFDs

    from mailrelay.route import ownaddr

    bound = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    bound.bind(("127.0.0.1", 0))
    bound.listen()
    every = socket.socket(socket.AF_INET6, socket.SOCK_STREAM)
    every.bind(("::", 0))
    every.listen()
    unix = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        port, sixPort = bound.getsockname()[1], every.getsockname()[1]
        passed = ListenFDs([bound.fileno(), every.fileno(), unix.fileno()],
                           ["smtp", "submission", "control"])
        monkeypatch.setattr(_SystemdParser, "_sddaemon", passed)
        monkeypatch.setenv(ownaddr.PASSED_SOCKETS, "[]")  # (restored after the test)
        monkeypatch.delenv(ownaddr.PASSED_SOCKETS)
        expected = {
            "systemd:domain=INET:index=0": ("127.0.0.1", port, 4),
            "systemd:domain=INET:name=smtp": ("127.0.0.1", port, 4),
            "systemd:domain=INET6:index=1": ("", sixPort, 6),
            "systemd:domain=INET6:name=submission": ("", sixPort, 6),
            "systemd:domain=UNIX:index=2": None,
            "systemd:domain=INET:index=3": None,  # (not passed: the configuration says)
            "systemd:domain=INET:name=other": None,
        }
        assert {d: listenAddress(d) for d in expected} == expected
        own = OwnAddresses(["systemd:domain=INET:name=smtp"], local=lambda: LOCAL)
        assert ("127.0.0.1", port) in own and ("127.0.0.2", port) not in own
        # The delivery process: no socket passed (or, forked, the relay's descriptor
        # numbers, now its own pipes), the relay's word in its environment.
        ownaddr.exportPassedSockets()
        for other in (ListenFDs([]), ListenFDs([0, 1, 2], ["a", "b", "c"])):
            monkeypatch.setattr(_SystemdParser, "_sddaemon", other)
            assert {d: listenAddress(d) for d in expected} == expected
        monkeypatch.setattr(_SystemdParser, "_sddaemon", ListenFDs([]))
        ownaddr.exportPassedSockets()  # (a process systemd passed nothing: not its word)
        assert ownaddr.PASSED_SOCKETS not in os.environ
        assert listenAddress("systemd:domain=INET:index=0") is None
    finally:
        for s in (bound, every, unix):
            s.close()


def test_an_ipv4_mapped_address_is_the_ipv4_address_it_maps() -> None:
    """An MX host's AAAA record may hold an IPv4-mapped address (C{::ffff:192.0.2.5}): a
    connection to it goes to the IPv4 address (the kernel connects a dual-stack socket
    there, RFC 4291 section 2.5.5.2), so it is the relay's when the IPv4 address is.
    (Postfix's smtp_find_self compares an AAAA record with IPv6 addresses only, and leaves
    this to its EHLO check, once connected to itself.)"""
    one = OwnAddresses(["tcp:25:interface=192.0.2.5"])
    assert ("::ffff:192.0.2.5", 25) in one and ("::FFFF:c000:205", 25) in one
    assert ("::ffff:192.0.2.6", 25) not in one and ("::ffff:192.0.2.5", 26) not in one
    every = OwnAddresses(["tcp:25"], proxyInterfaces=["198.51.100.7"], local=lambda: LOCAL)
    assert ("::ffff:192.0.2.5", 25) in every and ("::ffff:127.0.0.9", 25) in every
    assert ("::ffff:198.51.100.7", 25) in every
    assert ("::ffff:192.0.2.6", 25) not in every
    # (An IPv4-compatible or other IPv6 address stays IPv6.)
    assert ("::192.0.2.5", 25) not in every
