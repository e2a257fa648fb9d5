"""Tests for L{mailrelay.smtp.wire.writeNow}: a reply or command goes out in the same reactor
pass when the socket takes it, and through the transport's buffer otherwise."""

from __future__ import annotations

import socket
from collections.abc import Iterator
from types import SimpleNamespace

import pytest
from twisted.internet import tcp
from twisted.internet.protocol import Protocol
from twisted.internet.testing import MemoryReactor, StringTransport

from mailrelay.smtp.wire import writeNow


@pytest.fixture
def pair() -> Iterator[tuple[tcp.Server, socket.socket, MemoryReactor]]:
    """A Twisted TCP server transport over one end of a socket pair, and the other end."""
    ours, theirs = socket.socketpair()
    ours.setblocking(False)
    theirs.setblocking(False)
    reactor = MemoryReactor()
    port = SimpleNamespace(_realPortNumber=2)
    transport = tcp.Server(ours, Protocol(), ("127.0.0.1", 1), port, 1, reactor)
    yield transport, theirs, reactor
    ours.close()
    theirs.close()


def test_sentAtOnceWithoutWriteInterest(pair: tuple[tcp.Server, socket.socket, MemoryReactor]) -> None:
    transport, theirs, reactor = pair
    writeNow(transport, b"250 2.0.0 Ok\r\n")
    assert theirs.recv(100) == b"250 2.0.0 Ok\r\n"
    assert transport not in reactor.getWriters()
    assert not transport.dataBuffer and not transport._tempDataBuffer


def test_queuedBehindWhatIsBuffered(pair: tuple[tcp.Server, socket.socket, MemoryReactor]) -> None:
    """With bytes already waiting in the transport, the new ones go behind them, in order."""
    transport, theirs, reactor = pair
    transport.write(b"first\r\n")
    writeNow(transport, b"second\r\n")
    with pytest.raises(BlockingIOError):
        theirs.recv(100)
    assert transport in reactor.getWriters()
    transport.doWrite()
    assert theirs.recv(100) == b"first\r\nsecond\r\n"


def test_whatTheSocketDoesNotTakeIsBuffered(pair: tuple[tcp.Server, socket.socket, MemoryReactor]) -> None:
    transport, theirs, reactor = pair
    big = bytes(range(256)) * 40000  # more than a socket pair's buffers hold
    writeNow(transport, big)
    assert transport in reactor.getWriters()
    received = bytearray()
    while len(received) < len(big):
        try:
            received += theirs.recv(1 << 20)
        except BlockingIOError:
            transport.doWrite()
    assert bytes(received) == big


def test_errorsAreLeftToTheTransport(pair: tuple[tcp.Server, socket.socket, MemoryReactor]) -> None:
    """A send that fails (peer gone) goes to the buffer; the transport's next write reports
    the error as the connection being lost."""
    transport, theirs, reactor = pair
    theirs.close()
    writeNow(transport, b"221 Bye\r\n")
    assert transport in reactor.getWriters()
    assert transport.doWrite() is not None  # the error that closes the connection


def test_otherTransportsUseWrite() -> None:
    transport = StringTransport()
    writeNow(transport, b"220 ready\r\n")
    assert transport.value() == b"220 ready\r\n"


def test_tlsConnectionsUseWrite(pair: tuple[tcp.Server, socket.socket, MemoryReactor]) -> None:
    """Once TLS has started, the bytes must go through the TLS layer, never the raw socket."""
    transport, theirs, reactor = pair
    written: list[bytes] = []
    transport.TLS = True
    transport.write = written.append  # type: ignore[method-assign]
    writeNow(transport, b"250 Ok\r\n")
    assert written == [b"250 Ok\r\n"]
    with pytest.raises(BlockingIOError):
        theirs.recv(100)
