"""The relay's own addresses: where its listeners listen, and the proxy or NAT addresses in
front of it, so that an MX host that is the relay itself is known by its address, whatever
its name (Postfix's C{smtp_find_self}, with C{own_inet_addr_list} and
C{proxy_inet_addr_list}).

A listener bound to one address (C{"tcp:25:interface=192.0.2.1"}) owns that address and
port; one bound to every address (C{"tcp:25"}, C{"tcp6:25:interface=\\:\\:"}) owns the port
on each address of this host (L{localAddresses}; every loopback address too).  A listener
on a socket systemd passed (C{"systemd:domain=INET:index=0"}) owns where that socket is
bound (L{passedSocketAddresses}).  A UNIX socket owns none.
"""

from __future__ import annotations

import ipaddress
import json
import os
import socket
from collections.abc import Callable, Iterable
from pathlib import Path

from mailrelay.address import clientIP
from mailrelay.endpoints import listeningSocket, passedSockets, systemdArguments

__all__ = [
    "PASSED_SOCKETS",
    "OwnAddresses",
    "exportPassedSockets",
    "listenAddress",
    "localAddresses",
    "passedSocketAddresses",
]

#: The environment variable in which the relay tells its children (the delivery process,
#: which systemd passed no socket) where the sockets systemd passed it are bound
#: (L{exportPassedSockets}): JSON, C{[[index, name, address, port, family], ...]}.
PASSED_SOCKETS = "MAILRELAY_PASSED_SOCKETS"

#: The port a proxy interface receives mail on (Postfix's C{proxy_interfaces} are SMTP's).
SMTP_PORT = 25

def _normal(address: str) -> str | None:
    """C{address} in its normal form (C{"2001:db8::1"}), an IPv4-mapped IPv6 address
    (C{"::ffff:192.0.2.1"}) as the IPv4 address it maps (a connection to it goes there:
    L{clientIP}), or C{None}: not an IP address."""
    ip = clientIP(address)
    return None if ip is None else str(ip)


def _boundAddress(fd: int) -> tuple[str, int, int] | None:
    """Where the socket C{fd} is bound (its C{getsockname}): C{(address, port, family)},
    C{address} C{""} for every address; C{None} for one that is not a TCP/IP socket."""
    try:
        sock = socket.socket(fileno=os.dup(fd))
    except OSError:
        return None
    with sock:
        if sock.family not in (socket.AF_INET, socket.AF_INET6):
            return None
        try:
            name = sock.getsockname()
        except OSError:
            return None
        family = 6 if sock.family == socket.AF_INET6 else 4
    address = _normal(str(name[0]).partition("%")[0])
    if address is None:
        return None
    return ("" if ipaddress.ip_address(address).is_unspecified else address), name[1], family


def passedSocketAddresses() -> list[tuple[int, str, str, int, int]]:
    """Where the sockets systemd passed the relay are bound: C{(index, name, address, port,
    family)} for each TCP/IP one (L{_boundAddress}), its C{name} C{""} when it has none.
    What the relay put in the environment (L{exportPassedSockets}) when it did: a child of
    the relay's holds none of the sockets (one forked from it has the relay's list of them,
    their numbers now other descriptors); else read from the sockets passed."""
    exported = os.environ.get(PASSED_SOCKETS)
    if exported is not None:
        try:
            return [(int(i), str(n), str(a), int(p), int(f))
                    for i, n, a, p, f in json.loads(exported)]
        except (TypeError, ValueError):
            return []
    return _readPassedSockets()


def _readPassedSockets() -> list[tuple[int, str, str, int, int]]:
    """L{passedSocketAddresses}, read from the sockets systemd passed this process."""
    passed = passedSockets()
    names = {fd: name for name, fd in passed.inheritedNamedDescriptors().items()}
    found = []
    for index, fd in enumerate(passed.inheritedDescriptors()):
        where = _boundAddress(fd)
        if where is not None:
            found.append((index, names.get(fd, ""), *where))
    return found


def exportPassedSockets() -> None:
    """Put where the sockets systemd passed this process are bound (L{passedSocketAddresses})
    in the environment its children inherit (L{PASSED_SOCKETS}): the delivery process knows
    the relay by the addresses of those listeners too.  Without such sockets, it is removed
    (not the relay's word)."""
    if passedSockets().inheritedDescriptors():
        os.environ[PASSED_SOCKETS] = json.dumps(_readPassedSockets())
    else:
        os.environ.pop(PASSED_SOCKETS, None)


def _systemdAddress(description: str) -> tuple[str, int, int] | None:
    """Where the socket systemd passed for the endpoint C{description} (C{systemd:...}, by
    C{index} or C{name}) is bound, or C{None}: not passed, or not TCP/IP."""
    try:
        given = systemdArguments(description[len("systemd:") :])
    except ValueError:
        return None
    for index, name, address, port, family in passedSocketAddresses():
        if given.get("index") == str(index) or (name and given.get("name") == name):
            return address, port, family
    return None


def listenAddress(description: str) -> tuple[str, int, int] | None:
    """Where the server endpoint C{description} listens (L{listeningSocket}, or for a
    C{systemd:} one, L{passedSocketAddresses}): C{(address, port, family)}, C{address}
    C{""} for every address of the family (4 or 6); C{None} when it is not a TCP endpoint
    (C{tcp}, C{tcp6}, C{ssl}, C{systemd}) or does not say."""
    if description.startswith("systemd:"):
        return _systemdAddress(description)
    sock = listeningSocket(description)
    if sock is None or sock.family == socket.AF_UNIX:
        return None
    if sock.everyAddress:
        return "", sock.port, 6 if sock.family == socket.AF_INET6 else 4
    address = _normal(sock.address)
    if address is None:
        return None
    return address, sock.port, ipaddress.ip_address(address).version


def _procIPv4(text: str) -> set[str]:
    """The local IPv4 addresses in C{/proc/net/fib_trie}: each C{|-- a.b.c.d} line followed
    by C{/32 host LOCAL}."""
    found: set[str] = set()
    last = None
    for line in text.splitlines():
        stripped = line.strip()
        if stripped.startswith("|--"):
            last = stripped[3:].strip()
        elif stripped.startswith("/32 host LOCAL") and last:
            found.add(last)
    return found


def _procIPv6(text: str) -> set[str]:
    """The IPv6 addresses in C{/proc/net/if_inet6} (32 hex digits first on each line)."""
    found = set()
    for line in text.splitlines():
        digits = line.split()[0] if line.split() else ""
        if len(digits) == 32:
            try:
                found.add(str(ipaddress.IPv6Address(bytes.fromhex(digits))))
            except ValueError:
                continue
    return found


def localAddresses() -> frozenset[str]:
    """The IP addresses of this host's interfaces (Linux's C{/proc}), with the loopback
    addresses; elsewhere, the loopback addresses and those of the host's name."""
    found = {"127.0.0.1", "::1"}
    read = False
    for name, parse in (("/proc/net/fib_trie", _procIPv4), ("/proc/net/if_inet6", _procIPv6)):
        try:
            found |= parse(Path(name).read_text())
            read = True
        except OSError:
            continue
    if not read:
        try:
            found |= {str(info[4][0]) for info in socket.getaddrinfo(socket.gethostname(), None)}
        except OSError:
            pass
    return frozenset(a for a in (_normal(x) for x in found) if a is not None)


class OwnAddresses:
    """The C{(address, port)} pairs that are this relay: test with C{in}."""

    def __init__(
        self,
        listeners: Iterable[str],
        proxyInterfaces: Iterable[str] = (),
        local: Callable[[], frozenset[str]] = localAddresses,
    ) -> None:
        """
        @param listeners: the listeners' endpoint descriptions.
        @param proxyInterfaces: IP addresses that receive mail for the relay on port 25 by
            way of a proxy or NAT (Postfix's C{proxy_interfaces}).
        @param local: this host's addresses, asked once when a listener listens on every
            address.
        @raise ValueError: a proxy interface that is not an IP address (the message says it).
        """
        pairs: set[tuple[str, int]] = set()
        wildcards: set[tuple[int, int]] = set()
        for description in listeners:
            where = listenAddress(description)
            if where is None:
                continue
            address, port, family = where
            if address:
                pairs.add((address, port))
            else:
                wildcards.add((port, family))
        for text in proxyInterfaces:
            proxy = _normal(text)
            if proxy is None:
                raise ValueError(f"proxy interface {text!r} is not an IP address")
            pairs.add((proxy, SMTP_PORT))
        self._pairs = frozenset(pairs)
        self._wildcards = frozenset(wildcards)
        self._local = local() if wildcards else frozenset()

    def __contains__(self, item: object) -> bool:
        if not isinstance(item, tuple) or len(item) != 2:
            return False
        address = _normal(str(item[0]))
        if address is None:
            return False
        port = item[1]
        if (address, port) in self._pairs:
            return True
        version = ipaddress.ip_address(address).version
        # An IPv6 socket bound to every address takes IPv4 connections too (dual stack).
        if not any(p == port and (f == version or f == 6) for p, f in self._wildcards):
            return False
        return address in self._local or ipaddress.ip_address(address).is_loopback

    def __repr__(self) -> str:
        return f"<OwnAddresses {sorted(self._pairs)} every address: {sorted(self._wildcards)}>"
