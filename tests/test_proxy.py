"""The PROXY protocol: the header parser (v1, v2), and the wrapper on a C{StringTransport}
with a C{Clock}: trusted networks, time-out, the client's address seen by the SMTP server."""

from __future__ import annotations

import ipaddress
import struct

import pytest
from hypothesis import given
from hypothesis import strategies as st
from twisted.internet.address import IPv4Address, IPv6Address
from twisted.internet.interfaces import IHandshakeListener
from twisted.internet.protocol import Factory, Protocol
from twisted.internet.task import Clock
from twisted.internet.testing import StringTransport
from twisted.logger import capturedLogs, formatEvent
from zope.interface import implementer

from mailrelay.address import unmappedAddress
from mailrelay.receive.proxy import (
    V2_SIGNATURE,
    ProxyHeader,
    ProxyHeaderError,
    ProxyProtocolFactory,
    isTrusted,
    isUnattributed,
    parseProxyHeader,
)
from mailrelay.testing import ServerHarness

NETS = (ipaddress.ip_network("10.0.0.0/8"), ipaddress.ip_network("2001:db8:1::/48"))


def v2(command: int = 1, family: int = 0x11, body: bytes = b"") -> bytes:
    return V2_SIGNATURE + bytes([0x20 | command, family]) + struct.pack("!H", len(body)) + body


def v2tcp(src: str, sport: int, dst: str, dport: int, extra: bytes = b"") -> bytes:
    s, d = ipaddress.ip_address(src), ipaddress.ip_address(dst)
    family = 0x11 if s.version == 4 else 0x21
    return v2(1, family, s.packed + d.packed + struct.pack("!HH", sport, dport) + extra)


# The parser ----------------------------------------------------------------------------------------


def test_v1() -> None:
    data = b"PROXY TCP4 192.0.2.1 198.51.100.2 40000 25\r\nEHLO x\r\n"
    header, used = parseProxyHeader(data)
    assert header == ProxyHeader(1, ("192.0.2.1", 40000), ("198.51.100.2", 25))
    assert data[used:] == b"EHLO x\r\n"
    header, _ = parseProxyHeader(b"PROXY TCP6 2001:DB8::0:1 2001:db8::2 1 65535\r\n")
    assert header.source == ("2001:db8::1", 1)  # canonical text
    assert parseProxyHeader(b"PROXY UNKNOWN\r\n") == (ProxyHeader(1, None, None, "UNKNOWN"), 15)
    assert parseProxyHeader(b"PROXY UNKNOWN ffff::1 ffff::2 1 2\r\nx")[1] == 35


def test_v2() -> None:
    data = v2tcp("192.0.2.1", 40000, "198.51.100.2", 25) + b"EHLO x\r\n"
    header, used = parseProxyHeader(data)
    assert header == ProxyHeader(2, ("192.0.2.1", 40000), ("198.51.100.2", 25))
    assert data[used:] == b"EHLO x\r\n"
    header, _ = parseProxyHeader(v2tcp("2001:db8::1", 5, "::ffff:192.0.2.9", 6, extra=b"\x04\x00\x01x"))
    # (An IPv4-mapped address as IPv4, as Postfix's haproxy_srvr.c converts it.)
    assert header.source == ("2001:db8::1", 5) and header.destination == ("192.0.2.9", 6)
    # LOCAL (health checks), UNSPEC, UNIX and UDP: no client address.
    for data, why in ((v2(0, 0x00), "LOCAL"), (v2(0, 0x11, b"\0" * 12), "LOCAL"), (v2(1, 0x00), "family 0x00"),
                      (v2(1, 0x31, b"\0" * 216), "family 0x31"), (v2(1, 0x12, b"\0" * 12), "family 0x12")):
        assert parseProxyHeader(data) == (ProxyHeader(2, None, None, why), len(data))


@pytest.mark.parametrize(
    ("data", "why"),
    [
        (v2tcp("0.0.0.0", 0, "0.0.0.0", 0), "unspecified address 0.0.0.0"),
        (v2tcp("::", 0, "::", 0), "unspecified address ::"),
        (v2tcp("::ffff:0.0.0.0", 0, "::", 0), "unspecified address 0.0.0.0"),
        (b"PROXY TCP4 0.0.0.0 0.0.0.0 0 0\r\n", "unspecified address 0.0.0.0"),
        (b"PROXY TCP6 :: :: 0 0\r\n", "unspecified address ::"),
    ],
)
def test_unspecifiedSourceNamesNoClient(data: bytes, why: str) -> None:
    """A source of all zeros (0.0.0.0, ::) is no host's address (RFC 1122 3.2.1.3, RFC 4291
    2.5.2): no connection comes from it, so a PROXY command giving it names no client, like
    the UNSPEC family (PROXY protocol 2.2): it was taken as the client 0.0.0.0:0."""
    header, used = parseProxyHeader(data)
    assert (header.source, header.noSource, used) == (None, why, len(data))
    assert header.destination is None
    header, _ = parseProxyHeader(v2tcp("192.0.2.1", 1, "0.0.0.0", 0))
    assert header == ProxyHeader(2, ("192.0.2.1", 1), None)


@pytest.mark.parametrize(
    "data",
    [
        b"PROXY TCP4 192.0.2.1 198.51.100.2 40000 25\r\n",
        v2tcp("192.0.2.1", 40000, "198.51.100.2", 25),
        v2tcp("2001:db8::1", 1, "2001:db8::2", 2, extra=b"\x01" * 40),
    ],
)
def test_partialHeadersWaitForMore(data: bytes) -> None:
    for cut in range(len(data)):
        assert parseProxyHeader(data[:cut]) is None, cut
    assert parseProxyHeader(data) is not None


@pytest.mark.parametrize(
    "data, fragment",
    [
        (b"EHLO x\r\n", "no PROXY header"),
        (b"PROXZ", "no PROXY header"),
        (b"\r\n\r\n\x00\r\nQUIX", "bad version 2 signature"),
        (b"PROXY TCP4 192.0.2.1 198.51.100.2 40000\r\n", "bad version 1 header"),
        (b"PROXY TCP5 192.0.2.1 198.51.100.2 1 2\r\n", "bad version 1 header"),
        (b"PROXY TCP4 192.0.2.1  198.51.100.2 1 2\r\n", "bad version 1 header"),
        (b"PROXY TCP4 2001:db8::1 198.51.100.2 1 2\r\n", "is not an IPv4 address"),
        (b"PROXY TCP6 192.0.2.1 2001:db8::2 1 2\r\n", "is not an IPv6 address"),
        (b"PROXY TCP4 localhost 198.51.100.2 1 2\r\n", "bad address"),
        (b"PROXY TCP4 192.0.2.1 198.51.100.2 65536 2\r\n", "bad port"),
        (b"PROXY TCP4 192.0.2.1 198.51.100.2 025 2\r\n", "bad port"),
        (b"PROXY TCP4 192.0.2.1 198.51.100.2 -1 2\r\n", "bad port"),
        (b"PROXY TCP4 192.0.2.1 198.51.100.2 1 2\n", "at most 107 bytes"),
        (b"PROXY " + b"x" * 120, "at most 107 bytes"),
        (V2_SIGNATURE + b"\x11\x11\x00\x00", "unsupported PROXY protocol version 1"),
        (V2_SIGNATURE + b"\x22\x11\x00\x00", "unknown version 2 command 2"),
        (v2(1, 0x11, b"\0" * 11), "too short"),
        (v2(1, 0x21, b"\0" * 12), "too short"),
    ],
)
def test_badHeaders(data: bytes, fragment: str) -> None:
    with pytest.raises(ProxyHeaderError) as e:
        parseProxyHeader(data)
    assert fragment in str(e.value)


@given(
    st.ip_addresses(v=4) | st.ip_addresses(v=6),
    st.integers(0, 65535),
    st.integers(0, 65535),
    st.binary(max_size=40),
    st.booleans(),
)
def test_roundTrip(address, sport: int, dport: int, rest: bytes, version2: bool) -> None:
    # (An IPv4-mapped address comes back as IPv4; an unspecified one names no client:
    # test_unspecifiedSourceNamesNoClient.)
    shown = unmappedAddress(str(address))
    if ipaddress.ip_address(shown).is_unspecified:
        return
    other = ipaddress.ip_address("192.0.2.25" if address.version == 4 else "2001:db8::25")
    if version2:
        data = v2tcp(str(address), sport, str(other), dport)
    else:
        proto = b"TCP4" if address.version == 4 else b"TCP6"
        data = b"PROXY %s %s %s %d %d\r\n" % (proto, str(address).encode(), str(other).encode(), sport, dport)
    header, used = parseProxyHeader(data + rest)
    assert header.source == (shown, sport)
    assert header.destination == (str(other), dport)
    assert (data + rest)[used:] == rest


@given(st.binary(max_size=120))
def test_garbageNeverCrashes(data: bytes) -> None:
    try:
        result = parseProxyHeader(data)
    except ProxyHeaderError:
        return
    if result is not None:
        assert 0 < result[1] <= len(data)


def test_isTrusted() -> None:
    assert isTrusted("10.1.2.3", NETS)
    assert isTrusted("::ffff:10.1.2.3", NETS)
    assert isTrusted("2001:db8:1::5", NETS)
    assert not isTrusted("192.0.2.1", NETS)
    assert not isTrusted("2001:db8:2::5", NETS)
    assert not isTrusted("not an address", NETS)


# The wrapper ---------------------------------------------------------------------------------------


@implementer(IHandshakeListener)
class Recorder(Protocol):
    def __init__(self) -> None:
        self.peer = None
        self.received: list[bytes] = []
        self.handshakes = 0
        self.lost = False

    def connectionMade(self) -> None:
        self.peer = self.transport.getPeer()
        self.host = self.transport.getHost()

    def dataReceived(self, data: bytes) -> None:
        self.received.append(data)

    def handshakeCompleted(self) -> None:
        self.handshakes += 1

    def connectionLost(self, reason=None) -> None:
        self.lost = True


def wrapped(peer: str = "10.0.0.1") -> tuple[ProxyProtocolFactory, object, Recorder, StringTransport, Clock]:
    clock = Clock()
    inner = Recorder()
    factory = ProxyProtocolFactory(Factory.forProtocol(lambda: inner), NETS, clock, timeout=5, listenerName="test")
    address = (IPv6Address if ":" in peer else IPv4Address)("TCP", peer, 1234)
    protocol = factory.buildProtocol(address)
    transport = StringTransport(peerAddress=address, hostAddress=IPv4Address("TCP", "10.0.0.99", 25))
    transport.abortConnection = transport.loseConnection  # type: ignore[method-assign]
    protocol.makeConnection(transport)
    return factory, protocol, inner, transport, clock


def test_headerThenData() -> None:
    _, protocol, inner, transport, clock = wrapped()
    assert inner.peer is None
    protocol.dataReceived(b"PROXY TCP4 192.0.2.7 198.51.100.2 40000 25")
    assert inner.peer is None
    with capturedLogs() as logs:
        protocol.dataReceived(b"\r\nEHLO x\r\n")
    assert inner.peer == IPv4Address("TCP", "192.0.2.7", 40000)
    assert inner.host == IPv4Address("TCP", "198.51.100.2", 25)
    assert inner.received == [b"EHLO x\r\n"]
    assert protocol.proxyPeer == IPv4Address("TCP", "10.0.0.1", 1234)
    assert "PROXY v1 from 10.0.0.1: client 192.0.2.7:40000" in formatEvent(logs[0])
    protocol.dataReceived(b"QUIT\r\n")
    assert inner.received[-1] == b"QUIT\r\n"
    clock.advance(10)  # the header time-out was cancelled
    assert not transport.disconnecting
    protocol.handshakeCompleted()
    assert inner.handshakes == 1
    protocol.connectionLost(None)
    assert inner.lost


@pytest.mark.parametrize("header", [
    b"PROXY TCP6 ::ffff:192.0.2.7 ::ffff:198.51.100.2 40000 25\r\n",
    v2tcp("::ffff:192.0.2.7", 40000, "::ffff:198.51.100.2", 25),
])
def test_ipv4MappedAddressesAreLoggedAsIPv4(header: bytes) -> None:
    """An IPv4 client a proxy names in IPv6 form, and an IPv4 proxy on a listener on [::],
    are logged by their IPv4 addresses, as the relay knows them everywhere else (and as
    Postfix's smtpd and its PROXY reader do: sane_sockaddr_to_hostaddr), not as
    [::ffff:c000:207]:40000 from ::ffff:10.0.0.1."""
    _, protocol, _, _, _ = wrapped("::ffff:10.0.0.1")
    with capturedLogs() as logs:
        protocol.dataReceived(header)
    version = 1 if header.startswith(b"PROXY") else 2
    assert formatEvent(logs[0]) == f"PROXY v{version} from 10.0.0.1: client 192.0.2.7:40000"
    assert (logs[0]["client"], logs[0]["port"]) == ("192.0.2.7", 40000)
    # And the lines about a proxy refused, a bad header, a header that never came.
    with capturedLogs() as logs:
        _, protocol, _, _, clock = wrapped("::ffff:192.0.2.1")
        _, protocol, _, _, clock = wrapped("::ffff:10.0.0.1")
        protocol.dataReceived(b"PROXY TCP4 ")
        clock.advance(5)
        _, protocol, _, _, _ = wrapped("::ffff:10.0.0.1")
        protocol.dataReceived(b"EHLO x\r\n")
    assert [formatEvent(e).split(" ", 3)[:3] for e in logs] == [
        ["connection", "from", "192.0.2.1"], ["no", "complete", "PROXY"], ["bad", "PROXY", "header"]]
    assert [e["peer"] for e in logs] == ["192.0.2.1", "10.0.0.1", "10.0.0.1"]


def test_v2LocalUsesTheProxysAddress() -> None:
    _, protocol, inner, _, _ = wrapped("2001:db8:1::9")
    protocol.dataReceived(v2(0, 0x00))
    assert inner.peer == IPv6Address("TCP", "2001:db8:1::9", 1234)
    assert inner.host == IPv4Address("TCP", "10.0.0.99", 25)
    assert not isUnattributed(inner.peer)


@pytest.mark.parametrize("header", [b"PROXY UNKNOWN\r\n", v2(1, 0x31, b"\0" * 216), v2(1, 0x00),
                                    v2tcp("0.0.0.0", 0, "0.0.0.0", 0), v2tcp("::", 0, "::", 0)])
def test_clientWithoutAnAddressIsUnattributed(header: bytes) -> None:
    """The proxy's address stands for the client, marked: it is not the proxy's connection."""
    _, protocol, inner, _, _ = wrapped("2001:db8:1::9")
    with capturedLogs() as logs:
        protocol.dataReceived(header)
    assert (inner.peer.type, inner.peer.host, inner.peer.port) == ("TCP", "2001:db8:1::9", 1234)
    assert isinstance(inner.peer, IPv6Address) and isUnattributed(inner.peer)
    assert "using the proxy's, without its relay permission" in formatEvent(logs[0])
    _, protocol, inner, _, _ = wrapped("10.0.0.1")
    protocol.dataReceived(header)
    assert isinstance(inner.peer, IPv4Address) and inner.peer.host == "10.0.0.1"
    assert isUnattributed(inner.peer)


def test_untrustedPeerIsClosed() -> None:
    with capturedLogs() as logs:
        _, protocol, inner, transport, _ = wrapped("192.0.2.1")
    assert transport.disconnecting and transport.value() == b""
    text = "\n".join(formatEvent(e) for e in logs)
    assert "connection from 192.0.2.1 on test refused: not a trusted proxy (proxy_networks)" in text
    protocol.dataReceived(b"PROXY TCP4 192.0.2.7 198.51.100.2 40000 25\r\n")
    assert inner.peer is None
    protocol.connectionLost(None)
    assert not inner.lost  # never connected


def test_badHeaderIsClosed() -> None:
    _, protocol, inner, transport, _ = wrapped()
    with capturedLogs() as logs:
        protocol.dataReceived(b"EHLO x\r\n")
    assert transport.disconnecting and inner.peer is None
    assert "bad PROXY header from 10.0.0.1: no PROXY header" in formatEvent(logs[0])


def test_headerTimeout() -> None:
    _, protocol, inner, transport, clock = wrapped()
    protocol.dataReceived(b"PROXY TCP4 ")
    clock.advance(4.9)
    assert not transport.disconnecting
    with capturedLogs() as logs:
        clock.advance(0.1)
    assert transport.disconnecting and inner.peer is None
    assert "no complete PROXY header from 10.0.0.1 in 5s, closing" in formatEvent(logs[0])


def test_smtpServerSeesTheClient() -> None:
    """The SMTP protocol behind the wrapper: relay control, Received: and the envelope use
    the proxied address."""
    h = ServerHarness(relay={"networks": ("192.0.2.0/24",)}, connect=False)
    factory = ProxyProtocolFactory(h.factory, NETS, h.clock)
    protocol = factory.buildProtocol(IPv4Address("TCP", "10.0.0.1", 1234))
    transport = StringTransport(peerAddress=IPv4Address("TCP", "10.0.0.1", 1234))
    protocol.makeConnection(transport)
    protocol.dataReceived(v2tcp("192.0.2.7", 40000, "198.51.100.2", 25) + b"EHLO client.example\r\n")
    assert transport.value().startswith(b"220 relay.test ESMTP mailrelay\r\n250-relay.test\r\n")
    protocol.dataReceived(b"MAIL FROM:<a@example.com>\r\nRCPT TO:<b@example.net>\r\nDATA\r\nSubject: x\r\n\r\n.\r\n")
    assert b"250 2.0.0 Ok: queued as " in transport.value()
    ((envelope, message),) = h.spool.committed.values()
    assert envelope.client.address == "192.0.2.7" and envelope.client.port == 40000
    assert envelope.client.relayAllowed
    assert message.startswith(b"Received: from client.example (unknown [192.0.2.7])")
