"""Where a server endpoint description listens, read from its text alone: the socket a
C{tcp:}, C{tcp6:}, C{unix:} or C{ssl:} endpoint binds (L{listeningSocket}: an C{ssl:} one's
files are not read), the arguments of a C{systemd:} one (L{systemdArguments}) and the
sockets systemd passed this process (L{passedSockets}).

A value module: it imports only the values (L{mailrelay.errors}) and Twisted, so that the
stages (the relay's own addresses, L{mailrelay.route.ownaddr}) and the configuration's
checks (L{mailrelay.config.values}) read endpoints the same way.
"""

from __future__ import annotations

import socket
from dataclasses import dataclass
from typing import Any

from mailrelay.errors import describeValue

__all__ = [
    "ListeningSocket",
    "listeningSocket",
    "passedSockets",
    "rereadPassedSockets",
    "socketKey",
    "sslArguments",
    "systemdArguments",
]


def sslArguments(text: str) -> dict[str, Any]:
    """The arguments of the C{ssl:} endpoint C{text} by name, as Twisted's parser binds
    them (its files not read).

    @raise TypeError: an argument it does not take.
    """
    import inspect

    from twisted.internet.endpoints import _parse, _parseSSL

    args, kwargs = _parse(text)
    return dict(inspect.signature(_parseSSL).bind(None, *args[1:], **kwargs).arguments)


@dataclass(frozen=True)
class ListeningSocket:
    """The socket a server endpoint listens on, as far as its description says.

    @ivar family: C{socket.AF_UNIX}, C{AF_INET} or C{AF_INET6} (an IPv6 interface on a
        C{tcp:} endpoint too).
    @ivar address: the UNIX socket's path, or the interface (C{""}: every address).
    @ivar port: the TCP port (0: chosen at start); 0 for a UNIX socket.
    @ivar tls: TLS from the first byte (an C{ssl:} endpoint).
    """

    family: int
    address: str
    port: int = 0
    tls: bool = False

    @property
    def everyAddress(self) -> bool:
        """A TCP port on every address of its family."""
        return self.family != socket.AF_UNIX and self.address in ("", "0.0.0.0", "::")


def listeningSocket(endpoint: str) -> ListeningSocket | None:
    """The socket the server endpoint C{endpoint} listens on: a UNIX or TCP one (plain or
    C{ssl:}, whose certificate and key files are not read); C{None} for any other kind (a
    systemd socket, ...) and for a description that does not parse."""
    from twisted.internet import endpoints

    if endpoint.startswith("ssl:"):  # (its port and interface, without reading its files)
        try:
            given = sslArguments(endpoint)
            port = int(given["port"])
        except Exception:  # (refused, with the reason, by checkEndpoint)
            return None
        interface = str(given.get("interface", ""))
        family = socket.AF_INET6 if ":" in interface else socket.AF_INET
        return ListeningSocket(family, interface, port, tls=True)
    try:
        server = endpoints.serverFromString(None, endpoint)
    except Exception:  # (refused, with the reason, by checkEndpoint)
        return None
    if isinstance(server, endpoints.UNIXServerEndpoint):
        return ListeningSocket(socket.AF_UNIX, server._address)
    if not isinstance(server, (endpoints.TCP4ServerEndpoint, endpoints.TCP6ServerEndpoint)):
        return None
    interface = server._interface
    six = isinstance(server, endpoints.TCP6ServerEndpoint) or ":" in interface
    return ListeningSocket(socket.AF_INET6 if six else socket.AF_INET, interface, server._port)


def socketKey(endpoint: str) -> tuple[int, str, int] | None:
    """What identifies the socket C{endpoint} listens on (family, address or path, port),
    whatever its spelling and whether it is C{ssl:}; C{None} when it is not known or not
    fixed (a port chosen at start, a systemd socket)."""
    sock = listeningSocket(endpoint)
    if sock is None or (sock.port == 0 and sock.family != socket.AF_UNIX):
        return None
    return (sock.family, "" if sock.everyAddress else sock.address, sock.port)


def systemdArguments(arguments: str) -> dict[str, str]:
    """The arguments of a C{systemd:} endpoint by name, as Twisted's parser takes them:
    C{domain}, then C{index} or C{name}, by name or in that order.

    @raise ValueError: an argument it does not take.
    """
    given: dict[str, str] = {}
    for position, part in enumerate(arguments.split(":") if arguments else []):
        key, equals, value = part.partition("=")
        if not equals:
            key, value = ("domain", "index")[position] if position < 2 else "", part
        if key not in ("domain", "index", "name"):
            raise ValueError(
                f"unknown argument {describeValue(key or part)} (domain=, index= or name=)"
            )
        given[key] = value
    return given


def passedSockets() -> Any:
    """The sockets systemd passed this process (a L{twisted.python.systemd.ListenFDs}), as
    the parser of C{systemd:} endpoints holds them: it reads them when it is imported, and
    removes C{LISTEN_PID} and C{LISTEN_FDS} from the environment."""
    from twisted.internet.endpoints import _SystemdParser

    return _SystemdParser._sddaemon


def rereadPassedSockets() -> None:
    """Make L{passedSockets} what this process's own environment passes it
    (C{LISTEN_PID}, C{LISTEN_FDS}: nothing but for systemd's own process).  For a child
    forked from the relay (L{mailrelay.app.forkserver}): it inherits the relay's list, read
    when Twisted's endpoints were imported, whose numbers are other files in the child
    (its pipes, its control socket)."""
    import sys

    if "twisted.internet.endpoints" not in sys.modules:
        return  # (read when first imported, from this process's environment)
    from twisted.internet.endpoints import _SystemdParser
    from twisted.python.systemd import ListenFDs

    _SystemdParser._sddaemon = ListenFDs.fromEnvironment()
