"""The PROXY protocol (versions 1 and 2, as HAProxy defines it) on listeners behind a TCP
load balancer, accepted only from trusted proxies.

A load balancer that speaks it starts each connection with a header giving the real client's
address; L{ProxyProtocolFactory} wraps a listener's factory so that the SMTP protocol (and TLS
on an implicit TLS listener) only starts once the header is read, and sees that address in
C{transport.getPeer()}: relay control, the limits, the logs and C{Received:} all use it.

Twisted ships a wrapper (C{twisted.protocols.haproxy}, the C{haproxy:} endpoint), but it trusts
every peer, and its parsers are private, refuse a header split across two reads and take any
text for a v1 address.  This module has its own small parser (L{parseProxyHeader}, sans-IO)
and a wrapper that:

  - closes, with a log line and without a word to the peer, a connection whose peer is not in
    the trusted networks (C{proxy_networks}): anyone else could claim any client address;
  - closes a connection whose header is invalid, or not complete within C{timeout} seconds;
  - uses the connection's own addresses for v2 C{LOCAL} headers (the load balancer's own
    connection: a health check), and for v1 C{UNKNOWN} headers, address families other
    than TCP over IPv4/IPv6 and a source of all zeros (C{0.0.0.0}, C{::}: no host's
    address) (a health check, or a client the load balancer cannot name):
    these are accepted, as the PROXY protocol says, but as a client whose address is not
    known (L{isUnattributed}): relay control never lets it relay for being the load
    balancer (Postfix refuses such headers, which "would sidestep address-based access
    control");
  - passes C{handshakeCompleted} on (C{IHandshakeListener}), so STARTTLS works behind it.

An IPv4-mapped IPv6 address in a header (C{::ffff:192.0.2.7}) is taken as the IPv4 one, as
Postfix's haproxy_srvr.c converts it (C{normalize_v4mapped_sockaddr}); the log lines name
an IPv4 proxy on a listener on C{[::]} by its IPv4 address too.
"""

from __future__ import annotations

import ipaddress
import struct
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from twisted.internet.address import IPv4Address, IPv6Address
from twisted.internet.interfaces import IHandshakeListener
from twisted.internet.protocol import Protocol, connectionDone
from twisted.logger import Logger
from twisted.protocols.policies import ProtocolWrapper, WrappingFactory
from twisted.python.failure import Failure
from zope.interface import directlyProvides, implementer, providedBy

from mailrelay.address import clientIP, hostPort, unmappedAddress

log = Logger()

#: The first 12 bytes of a version 2 header.
V2_SIGNATURE = b"\r\n\r\n\x00\r\nQUIT\n"
#: A version 1 header is one line of at most 107 bytes, CRLF included.
V1_MAX_LENGTH = 107
#: Seconds a trusted peer has to send the whole header (Postfix's
#: C{smtpd_upstream_proxy_timeout}).
DEFAULT_PROXY_TIMEOUT = 5.0

_V1_PREFIX = b"PROXY "
_V2_TCP = {0x11: (4, IPv4Address), 0x21: (16, IPv6Address)}


class ProxyHeaderError(ValueError):
    """The data is not a valid PROXY protocol header; the message says why."""


@dataclass(frozen=True)
class ProxyHeader:
    """A parsed PROXY header.

    @ivar version: 1 or 2.
    @ivar source: the client's C{(address, port)}, the address in canonical text form, or
        C{None} when the header gives none (v2 C{LOCAL}, v1 C{UNKNOWN}, other families, the
        unspecified address): the connection's own peer is then used.
    @ivar destination: the address the client connected to, or C{None}.
    @ivar noSource: when C{source} is C{None}, why, for the log: C{"LOCAL"} (the proxy's own
        connection), C{"UNKNOWN"} (v1), C{"family 0x31"} (v2, another address family) or
        C{"unspecified address 0.0.0.0"}.
    """

    version: int
    source: tuple[str, int] | None
    destination: tuple[str, int] | None
    noSource: str = ""


def _port(text: bytes) -> int:
    if not text.isdigit() or (len(text) > 1 and text.startswith(b"0")) or int(text) > 65535:
        raise ProxyHeaderError(f"bad port {text[:10]!r}")
    return int(text)


def _v1Address(text: bytes, version: int) -> str:
    try:
        address = ipaddress.ip_address(text.decode("ascii"))
    except (UnicodeDecodeError, ValueError):
        raise ProxyHeaderError(f"bad address {text[:50]!r}") from None
    if getattr(address, "scope_id", None) is not None:
        # Meaningless here (the load balancer's interface), and free text in the logs and
        # in Received:.
        raise ProxyHeaderError(f"bad address {text[:50]!r}: an IPv6 zone id is not allowed")
    if address.version != version:
        raise ProxyHeaderError(f"{text.decode('ascii')} is not an IPv{version} address")
    return unmappedAddress(str(address))


def parseProxyHeader(data: bytes) -> tuple[ProxyHeader, int] | None:
    """Parse the PROXY header at the start of C{data}.

    @return: the header and its length in bytes (what follows is the client's data), or
        C{None} when C{data} is a valid beginning that needs more bytes.
    @raise ProxyHeaderError: C{data} does not start with a valid header.
    """
    if not data:
        return None
    if data[:1] == b"\r":
        return _parseV2(data)
    if data[:1] == b"P":
        return _parseV1(data)
    raise ProxyHeaderError(f"no PROXY header: the connection starts with {data[:20]!r}")


def _parseV1(data: bytes) -> tuple[ProxyHeader, int] | None:
    if not data.startswith(_V1_PREFIX):
        if len(data) < len(_V1_PREFIX) and _V1_PREFIX.startswith(data):
            return None
        raise ProxyHeaderError(f"no PROXY header: the connection starts with {data[:20]!r}")
    end = data.find(b"\r\n", 0, V1_MAX_LENGTH)
    if end < 0:
        if len(data) >= V1_MAX_LENGTH or b"\n" in data:
            raise ProxyHeaderError(
                "a version 1 header is one line of at most 107 bytes, ending in CRLF"
            )
        return None
    line = data[:end]
    parts = line.split(b" ")
    if len(parts) < 2 or parts[0] != b"PROXY":
        raise ProxyHeaderError(f"bad version 1 header {line!r}")
    if parts[1] == b"UNKNOWN":
        return ProxyHeader(1, None, None, "UNKNOWN"), end + 2
    if parts[1] not in (b"TCP4", b"TCP6") or len(parts) != 6:
        raise ProxyHeaderError(f"bad version 1 header {line!r}")
    version = 4 if parts[1] == b"TCP4" else 6
    source = (_v1Address(parts[2], version), _port(parts[4]))
    destination = (_v1Address(parts[3], version), _port(parts[5]))
    return _proxied(1, source, destination), end + 2


def _parseV2(data: bytes) -> tuple[ProxyHeader, int] | None:
    if len(data) < 16:
        if not V2_SIGNATURE.startswith(data[:12]):
            raise ProxyHeaderError("no PROXY header: bad version 2 signature")
        return None
    if data[:12] != V2_SIGNATURE:
        raise ProxyHeaderError("no PROXY header: bad version 2 signature")
    versionCommand, family, length = struct.unpack("!BBH", data[12:16])
    if versionCommand >> 4 != 2:
        raise ProxyHeaderError(f"unsupported PROXY protocol version {versionCommand >> 4}")
    command = versionCommand & 0x0F
    if command not in (0, 1):
        raise ProxyHeaderError(f"unknown version 2 command {command}")
    total = 16 + length
    if len(data) < total:
        return None
    if command == 0:  # LOCAL: the proxy's own connection (a health check)
        return ProxyHeader(2, None, None, "LOCAL"), total
    tcp = _V2_TCP.get(family)
    if tcp is None:  # UNSPEC, UDP, UNIX: a client with no address to give
        return ProxyHeader(2, None, None, f"family 0x{family:02x}"), total
    size, _ = tcp
    if length < 2 * size + 4:
        raise ProxyHeaderError(f"version 2 address block of {length} bytes is too short")
    block = data[16 : 16 + 2 * size + 4]
    src = ipaddress.ip_address(block[:size])
    dst = ipaddress.ip_address(block[size : 2 * size])
    sport, dport = struct.unpack("!HH", block[2 * size :])
    return _proxied(
        2, (unmappedAddress(str(src)), sport), (unmappedAddress(str(dst)), dport)
    ), total


def _proxied(
    version: int, source: tuple[str, int], destination: tuple[str, int]
) -> ProxyHeader:
    """The header of a PROXY command (v1 TCP4/TCP6, v2 PROXY over TCP): a source of all
    zeros (0.0.0.0, ::) is no host's address (RFC 1122 3.2.1.3, RFC 4291 2.5.2), so no
    connection came from it: the proxy does not know the client, as with the UNSPEC family
    (PROXY protocol 2.2), and the header names none.  A destination of all zeros is not
    known either: the connection's own is used."""
    unspecified = [ipaddress.ip_address(a).is_unspecified for a, _ in (source, destination)]
    target = None if unspecified[1] else destination
    if unspecified[0]:
        return ProxyHeader(version, None, target, f"unspecified address {source[0]}")
    return ProxyHeader(version, source, target)


def _address(host: str, port: int) -> Any:
    cls = IPv6Address if ":" in host else IPv4Address
    return cls("TCP", host, port)


class _UnattributedIPv4Address(IPv4Address):
    """The load balancer's address, standing for a client it forwarded without naming it."""


class _UnattributedIPv6Address(IPv6Address):
    """The load balancer's address, standing for a client it forwarded without naming it."""


def isUnattributed(peer: Any) -> bool:
    """Whether C{peer} (a transport's C{getPeer()}) is the address of a load balancer that
    forwarded a client without naming it (v1 C{UNKNOWN}, a v2 address family other than
    TCP): the client is not the load balancer and must not have its permissions."""
    return isinstance(peer, (_UnattributedIPv4Address, _UnattributedIPv6Address))


def isTrusted(host: Any, networks: Sequence[Any]) -> bool:
    """Is C{host} (an IP address as text) in one of C{networks}?"""
    address = clientIP(str(host))
    if address is None:
        return False
    return any(address.version == net.version and address in net for net in networks)


@implementer(IHandshakeListener)
class ProxyProtocolWrapper(ProtocolWrapper):
    """Reads the PROXY header of one connection, then connects the wrapped protocol, as whose
    transport it reports the client's address in C{getPeer} (see the module docstring)."""

    #: The connection (TCP, or TLS over it): C{getPeer}, C{abortConnection}, ...
    transport: Any

    def __init__(self, factory: ProxyProtocolFactory, wrappedProtocol: Any) -> None:
        super().__init__(factory, wrappedProtocol)
        self._buffer = b""
        self._header: ProxyHeader | None = None
        self._timer: Any = None
        self._connected = False
        self._closed = False

    def makeConnection(self, transport: Any) -> None:
        # As ProtocolWrapper, but the wrapped protocol is connected only after the header.
        directlyProvides(self, providedBy(transport))
        Protocol.makeConnection(self, transport)

    def connectionMade(self) -> None:
        factory: ProxyProtocolFactory = self.factory  # type: ignore[assignment]
        factory.registerProtocol(self)
        peer = self.transport.getPeer()
        host = peer.host if hasattr(peer, "host") else str(peer)  # (no repr of every peer)
        if not isTrusted(host, factory.networks):
            log.warn(
                "connection from {peer} on {listener} refused: not a trusted proxy "
                "(proxy_networks)",
                peer=unmappedAddress(host),
                listener=factory.listenerName,
            )
            self._close()
            return
        self._timer = factory.clock.callLater(factory.timeout, self._timedOut)

    def _proxyHost(self) -> str:
        """The proxy's address, for the log (an IPv4-mapped one as IPv4)."""
        return unmappedAddress(getattr(self.transport.getPeer(), "host", "?"))

    def _close(self) -> None:
        self._closed = True
        self._cancelTimer()
        self.transport.abortConnection()

    def _cancelTimer(self) -> None:
        if self._timer is not None and self._timer.active():
            self._timer.cancel()
        self._timer = None

    def _timedOut(self) -> None:
        self._timer = None
        log.warn(
            "no complete PROXY header from {peer} in {timeout:g}s, closing",
            peer=self._proxyHost(),
            timeout=self.factory.timeout,  # type: ignore[attr-defined]
        )
        self._close()

    def dataReceived(self, data: bytes) -> None:
        if self._connected:
            self.wrappedProtocol.dataReceived(data)
            return
        if self._closed:
            return
        self._buffer += data
        try:
            parsed = parseProxyHeader(self._buffer)
        except ProxyHeaderError as e:
            log.warn(
                "bad PROXY header from {peer}: {error}, closing",
                peer=self._proxyHost(),
                error=str(e),
            )
            self._close()
            return
        if parsed is None:
            return
        header, used = parsed
        self._cancelTimer()
        rest, self._buffer = self._buffer[used:], b""
        self._header = header
        proxy = self._proxyHost()
        if header.source is None:
            log.info(
                "PROXY v{version} from {proxy}: no client address ({why}), using the proxy's"
                "{restriction}",
                version=header.version,
                proxy=proxy,
                why=header.noSource,
                restriction="" if header.noSource == "LOCAL" else (
                    ", without its relay permission"
                ),
            )
        else:
            log.info(
                "PROXY v{version} from {proxy}: client {peer}",
                version=header.version,
                proxy=proxy,
                peer=hostPort(*header.source),
                client=header.source[0],
                port=header.source[1],
            )
        self._connected = True
        # This wrapper provides its transport's interfaces (makeConnection says so).
        self.wrappedProtocol.makeConnection(self)  # type: ignore[arg-type]
        if rest and self.wrappedProtocol is not None:
            self.wrappedProtocol.dataReceived(rest)

    def getPeer(self) -> Any:
        header = self._header
        if header is not None and header.source is not None:
            return _address(*header.source)
        peer = self.transport.getPeer()
        if header is not None and header.noSource != "LOCAL" and hasattr(peer, "host"):
            unattributed = (
                _UnattributedIPv6Address if isinstance(peer, IPv6Address)
                else _UnattributedIPv4Address
            )
            return unattributed(peer.type, peer.host, peer.port)
        return peer

    def getHost(self) -> Any:
        if self._header is not None and self._header.destination is not None:
            return _address(*self._header.destination)
        return self.transport.getHost()

    @property
    def proxyPeer(self) -> Any:
        """The load balancer's address (the connection's own peer)."""
        return self.transport.getPeer()

    def handshakeCompleted(self) -> None:
        """TLS started on the connection (STARTTLS): tell the wrapped protocol."""
        if self._connected and IHandshakeListener.providedBy(self.wrappedProtocol):
            self.wrappedProtocol.handshakeCompleted()

    def connectionLost(self, reason: Failure = connectionDone) -> None:
        self._cancelTimer()
        self.factory.unregisterProtocol(self)
        if self._connected and self.wrappedProtocol is not None:
            self.wrappedProtocol.connectionLost(reason)
        self.wrappedProtocol = None  # type: ignore[assignment]


class ProxyProtocolFactory(WrappingFactory[ProxyProtocolWrapper]):
    """Wraps a listener's factory: connections from C{networks} must start with a PROXY
    header; connections from elsewhere are closed.

    @param networks: the trusted proxies' networks (C{ipaddress} networks).
    @param clock: an C{IReactorTime} for the header time-out.
    @param timeout: seconds to wait for the complete header.
    @param listenerName: for the log.
    """

    protocol = ProxyProtocolWrapper  # type: ignore[assignment]

    def __init__(
        self,
        wrappedFactory: Any,
        networks: Sequence[Any],
        clock: Any,
        timeout: float = DEFAULT_PROXY_TIMEOUT,
        listenerName: str = "",
    ) -> None:
        super().__init__(wrappedFactory)
        self.networks = tuple(networks)
        self.clock = clock
        self.timeout = timeout
        self.listenerName = listenerName

    def logPrefix(self) -> str:
        return "PROXY"
