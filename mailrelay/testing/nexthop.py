"""A next hop in memory, for tests of delivery backends that speak SMTP or LMTP: L{FakeNexthop}.

    hop = FakeNexthop()                                 # FakeNexthop(lmtp=True) for LMTP
    hop.refuse("gone@example.org", Reply(550, "5.1.1", "no such user"))
    backend = buildMyBackend(..., reactor=hop.reactor)  # connects through hop.reactor
    d = backend.deliver(envelope, envelope.recipients, route, path)
    hop.pump()                                          # the whole dialogue, in memory
    [message] = hop.messages                            # sender, recipients, data

The server is the relay's own sans-IO ESMTP engine (L{mailrelay.smtp.server.ServerSession};
for LMTP, with C{LHLO} and one reply per recipient after the data), driven by a small
protocol that accepts every sender, accepts or refuses each recipient as the test says, and
records each message.  C{hop.reactor} is a C{MemoryReactorClock}: every C{connectTCP} or
C{connectUNIX} made through it, to any address, reaches the server (unless L{refuseConnections}
is set), and its clock is the one to give the backend and the test's other parts
(C{QueueHarness(..., clock=hop.reactor)}).  Bytes move only when L{pump} is called.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from twisted.internet.address import IPv4Address, UNIXAddress
from twisted.internet.error import ConnectionRefusedError
from twisted.internet.protocol import Protocol
from twisted.internet.testing import MemoryReactorClock
from twisted.test.iosim import FakeTransport, IOPump, connect

from mailrelay.envelope import ClientInfo, Envelope
from mailrelay.interfaces import ACCEPT, Reply, Verdict, VerdictKind
from mailrelay.smtp import replies as R
from mailrelay.smtp.server import (
    AbortData,
    BodyData,
    CheckMail,
    CheckRecipient,
    Close,
    EndOfData,
    ServerSession,
    SessionSettings,
    StartData,
)

__all__ = ["FakeNexthop", "ReceivedMessage"]

#: The reply to a message accepted (SMTP), or to each recipient (LMTP).
ACCEPTED = Reply(250, "2.0.0", "Ok: queued")


@dataclass
class ReceivedMessage:
    """One message the next hop accepted.

    @ivar sender: the MAIL FROM address (C{""}: the null sender).
    @ivar recipients: the RCPT TO addresses it accepted, in order.
    @ivar data: the message as received (CRLF lines, dot-stuffing undone).
    @ivar envelope: the session's L{Envelope} (C{size}, C{body}, C{ret}, C{envid}, each
        recipient's C{notify} and C{orcpt}).
    @ivar client: who sent it (C{helo}: the name the backend gave).
    """

    sender: str
    recipients: list[str]
    data: bytes
    envelope: Envelope
    client: ClientInfo = field(repr=False, default_factory=lambda: ClientInfo(""))


class _LMTPSession(ServerSession):
    """The engine speaking LMTP (RFC 2033): C{LHLO}, and one reply per recipient at the end
    of the data."""

    def _cmd_LHLO(self, arg: str) -> None:
        self._cmd_EHLO(arg)

    def _dataEndAnswered(self, reply: Any) -> None:
        replies = reply if isinstance(reply, list) else [reply]
        self._resetTransaction()
        self.messages += 1
        for each in replies:
            self._reply(each, countError=False)


class _NexthopProtocol(Protocol):
    """Drives one session of the next hop, answering its questions at once."""

    def __init__(self, hop: FakeNexthop, lmtp: bool) -> None:
        self.hop = hop
        self.lmtp = lmtp
        self.session: ServerSession | None = None
        self.data: list[bytes] = []

    def connectionMade(self) -> None:
        kind = _LMTPSession if self.lmtp else ServerSession
        peer = self.transport.getPeer()  # type: ignore[union-attr]
        client = ClientInfo(getattr(peer, "host", "") or "unix")
        self.session = kind(SessionSettings(self.hop.hostname, maxRecipients=1000), client)
        self._handle(self.session.greeting())

    def dataReceived(self, data: bytes) -> None:
        if self.session is not None:
            self._handle(self.session.dataReceived(data))

    def connectionLost(self, reason: Any = None) -> None:
        if self.session is not None:
            self.session.connectionLost()

    def _handle(self, events: list[object]) -> None:
        session = self.session
        assert session is not None
        while events:
            question = None
            for event in events:
                if isinstance(event, Reply):
                    self.transport.write(event.toBytes())  # type: ignore[union-attr]
                elif isinstance(event, BodyData):
                    self.data.append(event.data)
                elif isinstance(event, AbortData):
                    self.data = []
                elif isinstance(event, Close):
                    self.transport.loseConnection()  # type: ignore[union-attr]
                elif isinstance(event, (CheckMail, CheckRecipient, StartData, EndOfData)):
                    question = event
            if question is None or session.closed:
                return
            events = session.answer(self._answer(question))

    def _answer(self, question: object) -> Any:
        hop = self.hop
        if isinstance(question, CheckMail):
            return ACCEPT
        if isinstance(question, CheckRecipient):
            refusal = hop.rcptReplies.get(question.recipient.address)
            if refusal is None:
                return ACCEPT
            kind = VerdictKind.REJECT if refusal.isPermanent else VerdictKind.DEFER
            return Verdict(kind, refusal)
        if isinstance(question, StartData):
            self.data = []
            return None
        assert isinstance(question, EndOfData)
        if question.error is not None:
            return question.error
        envelope = question.envelope
        recipients = [r.address for r in envelope.recipients]
        data, self.data = b"".join(self.data), []
        assert self.session is not None
        client = self.session.client
        if not self.lmtp:
            message = ReceivedMessage(envelope.sender, recipients, data, envelope, client)
            hop.messages.append(message)
            return hop.dataReply
        replies = [hop.dataReplies.get(r, ACCEPTED) for r in recipients]
        accepted = [r for r, reply in zip(recipients, replies, strict=True) if reply.isPositive]
        if accepted:
            message = ReceivedMessage(envelope.sender, accepted, data, envelope, client)
            hop.messages.append(message)
        return replies


class _Reactor(MemoryReactorClock):
    """A C{MemoryReactorClock} whose connections reach the next hop (at the next L{pump})."""

    def __init__(self, hop: FakeNexthop) -> None:
        super().__init__()
        self.hop = hop

    def connectTCP(  # type: ignore[override]
        self, host: str, port: int, factory: Any, timeout: float = 30, bindAddress: Any = None
    ) -> Any:
        connector = super().connectTCP(host, port, factory, timeout, bindAddress)
        self.callLater(0, self.hop._connect, factory, connector, IPv4Address("TCP", host, port))
        return connector

    def connectUNIX(  # type: ignore[override]
        self, address: str, factory: Any, timeout: float = 30, checkPID: bool = False
    ) -> Any:
        connector = super().connectUNIX(address, factory, timeout, checkPID)
        self.callLater(0, self.hop._connect, factory, connector, UNIXAddress(address))
        return connector


class FakeNexthop:
    """An SMTP or LMTP server in memory (see the module docstring).

    @ivar reactor: the C{MemoryReactorClock} to connect (and time) through.
    @ivar messages: the L{ReceivedMessage}s accepted, in order.
    @ivar connections: the address each connection was made to (C{("192.0.2.1", 25)}, or
        the socket's path), in order.
    @ivar rcptReplies: recipient address to the 4xx/5xx L{Reply} refusing it at RCPT.
    @ivar dataReply: the reply to the end of a message (SMTP), by default 250.
    @ivar dataReplies: for LMTP, recipient address to its reply after the data (default 250).
    @ivar refuseConnections: connections fail (connection refused).
    """

    def __init__(self, *, lmtp: bool = False, hostname: str = "nexthop.test") -> None:
        self.lmtp = lmtp
        self.hostname = hostname
        self.reactor = _Reactor(self)
        self.reactor.advance(1_800_000_000)
        self.messages: list[ReceivedMessage] = []
        self.connections: list[Any] = []
        self.rcptReplies: dict[str, Reply] = {}
        self.dataReply: Reply = ACCEPTED
        self.dataReplies: dict[str, Reply] = {}
        self.refuseConnections = False
        self._pumps: list[IOPump] = []

    def refuse(self, address: str, reply: Reply = R.NO_VALID_RCPT) -> None:
        """Refuse the recipient C{address}: at RCPT (SMTP), or after the data (LMTP)."""
        if reply.isPositive:
            raise ValueError(f"a refusal is a 4xx or 5xx reply, not {reply}")
        if self.lmtp:
            self.dataReplies[address] = reply
        else:
            self.rcptReplies[address] = reply

    def _connect(self, factory: Any, connector: Any, address: Any) -> None:
        if isinstance(address, IPv4Address):
            self.connections.append((address.host, address.port))
        else:
            name = address.name
            self.connections.append(name.decode() if isinstance(name, bytes) else name)
        if self.refuseConnections:
            factory.clientConnectionFailed(connector, ConnectionRefusedError(str(address)))
            return
        client = factory.buildProtocol(address)
        if client is None:
            return
        server = _NexthopProtocol(self, self.lmtp)
        pump = connect(
            server,
            FakeTransport(server, isServer=True, peerAddress=address),
            client,
            FakeTransport(client, isServer=False, hostAddress=address),
            greet=False,
            clock=self.reactor,
        )
        self._pumps.append(pump)

    def pump(self, rounds: int = 1000) -> None:
        """Move every byte waiting, both ways, on every connection, and run what is due now
        on the clock, until nothing moves.

        @raise AssertionError: still moving after C{rounds} rounds.
        """
        for _ in range(rounds):
            self.reactor.advance(0)
            moved = [pump.pump(advanceClock=False) for pump in self._pumps]
            self._pumps = [p for p in self._pumps if not p.clientIO.disconnected]
            now = self.reactor.seconds()
            due = any(call.getTime() <= now for call in self.reactor.getDelayedCalls())
            if not any(moved) and not due:
                return
        raise AssertionError(f"the next hop is still talking after {rounds} rounds")
