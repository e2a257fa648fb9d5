"""Tests for the ESMTP/LMTP delivery client: the sans-IO session (L{mailrelay.smtp.client}, with
L{mailrelay.smtp.wire}) and its Twisted driver (L{mailrelay.delivery.connection}).

Most tests drive L{connectSMTP} over a C{StringTransport} with a C{task.Clock}: the test plays
the server byte for byte.  The dot-stuffing property test uses our own sans-IO server session
as the receiver, one test runs the client against the real server protocol of
L{mailrelay.testing.ServerHarness}, and the end-to-end tests talk to an aiosmtpd server on
127.0.0.1 over the real reactor (trial-style test cases, which pytest runs fine).
"""

from __future__ import annotations

import base64
import os
import shutil
import ssl
import tempfile
from pathlib import Path
from unittest import mock

import pytest
from hypothesis import given
from hypothesis import settings as hsettings
from hypothesis import strategies as st
from twisted.internet.address import IPv4Address
from twisted.internet.defer import Deferred, fail, succeed
from twisted.internet.error import ConnectionDone, ConnectionLost, ConnectionRefusedError
from twisted.internet.task import Clock
from twisted.internet.testing import StringTransport
from twisted.python.failure import Failure

from mailrelay.delivery import protocol as clientProtocol
from mailrelay.delivery.connection import connectSMTP
from mailrelay.delivery.tls import clientTLSOptions
from mailrelay.envelope import ClientInfo, Envelope, Recipient
from mailrelay.interfaces import ACCEPT, DeliveryStatus
from mailrelay.smtp import wire
from mailrelay.smtp.clientsettings import ClientSettings, ClientTimeouts
from mailrelay.smtp.errors import BareNewlineError, ProtocolError, SMTPConnectError
from mailrelay.smtp.replies import Reply
from mailrelay.smtp.server import (
    BodyData,
    CheckMail,
    CheckRecipient,
    EndOfData,
    ServerSession,
    SessionSettings,
    StartData,
)
from mailrelay.smtp.wire import DotStuffer, ReplyParser
from mailrelay.testing import ServerHarness

HOST = "mx.test"
PEER = IPv4Address("TCP", "192.0.2.25", 25)
DELIVERED, TRANSIENT, PERMANENT = (
    DeliveryStatus.DELIVERED, DeliveryStatus.TRANSIENT, DeliveryStatus.PERMANENT)
MESSAGE = b"Subject: hello\r\n\r\n.leading dot\r\nbody\r\n"


# Helpers ------------------------------------------------------------------------------------


def resultOf(d: Deferred):
    box: list = []
    d.addBoth(box.append)
    assert box, "the Deferred has not fired"
    if isinstance(box[0], Failure):
        box[0].raiseException()
    return box[0]


def failureOf(d: Deferred, kind=SMTPConnectError):
    box: list = []
    d.addBoth(box.append)
    assert box, "the Deferred has not fired"
    assert isinstance(box[0], Failure), f"expected a failure, got {box[0]!r}"
    assert box[0].check(kind), box[0]
    return box[0].value


class TLSStringTransport(StringTransport):
    """A C{StringTransport} that records C{startTLS}; the test completes the handshake."""

    tlsOptions = None

    def startTLS(self, options):
        self.tlsOptions = options


class FakeEndpoint:
    def __init__(self, failWith=None, hold=False):
        self.failWith = failWith
        self.hold = hold
        self.protocol = None
        self.transport = None

    def connect(self, factory):
        if self.failWith is not None:
            return fail(self.failWith)
        if self.hold:
            return Deferred()
        self.protocol = factory.buildProtocol(PEER)
        self.transport = TLSStringTransport(peerAddress=PEER)
        self.protocol.makeConnection(self.transport)
        return succeed(self.protocol)


class Peer:
    """The server end of one client connection, played by the test."""

    def __init__(self, settings: ClientSettings | None = None, endpoint=None):
        self.clock = Clock()
        self.settings = settings or ClientSettings("client.test", tls="none")
        self.endpoint = endpoint or FakeEndpoint()
        self.ready = connectSMTP(self.clock, self.endpoint, self.settings, tlsHostname=HOST)
        self._read = 0

    @property
    def transport(self) -> TLSStringTransport:
        return self.endpoint.transport

    @property
    def protocol(self):
        return self.endpoint.protocol

    def say(self, data: bytes) -> None:
        self.protocol.dataReceived(data)

    def heard(self) -> bytes:
        value = self.transport.value()
        new, self._read = value[self._read :], len(value)
        return new

    def pump(self) -> None:
        """Let the client stream the body (a pull producer) to the end."""
        while self.transport.producer is not None:
            self.transport.producer.resumeProducing()

    def lose(self, reason=ConnectionDone) -> None:
        self.protocol.connectionLost(Failure(reason()))

    @property
    def aborted(self) -> bool:
        return self.transport.disconnecting


def ehloReply(extensions, name=HOST) -> bytes:
    lines = [name, *extensions]
    return b"".join(
        f"250{' ' if i == len(lines) - 1 else '-'}{line}\r\n".encode()
        for i, line in enumerate(lines)
    )


def connected(extensions=("PIPELINING", "SIZE 10000000", "8BITMIME", "ENHANCEDSTATUSCODES"),
              settings: ClientSettings | None = None):
    peer = Peer(settings)
    peer.say(b"220 mx.test ESMTP\r\n")
    assert peer.heard() == (b"LHLO" if peer.settings.lmtp else b"EHLO") + b" client.test\r\n"
    peer.say(ehloReply(extensions))
    return peer, resultOf(peer.ready)


def envelope(*addresses, **kw) -> Envelope:
    recipients = [Recipient(address=a) for a in addresses]
    return Envelope(sender="sender@example.org", recipients=recipients, queueID="Q1", **kw)


@pytest.fixture
def message(tmp_path) -> Path:
    path = tmp_path / "message"
    path.write_bytes(MESSAGE)
    return path


def send(conn, env: Envelope, path: Path) -> Deferred:
    return conn.send(env, env.recipients, path)


# Reply parser and dot-stuffer units ---------------------------------------------------------


def test_replyParserMultiLineAndEnhancedCodes():
    parser = ReplyParser()
    parser.feed(b"250-mx.test\r\n250-SIZE 100\r\n250 PIPELINING\r\n550-5.1.1 no such\r\n5")
    first = parser.next()
    assert (first.code, first.enhanced, first.text) == (250, "", "mx.test\nSIZE 100\nPIPELINING")
    assert parser.next() is None and parser.hasData
    parser.feed(b"50 5.1.1 user\r\n250\r\n")
    second = parser.next()
    assert (second.code, second.enhanced, second.text) == (550, "5.1.1", "no such\nuser")
    assert wire.replyDiagnostic(second) == "smtp; 550 5.1.1 no such user"
    third = parser.next()
    assert (third.code, third.text) == (250, "")
    assert not parser.hasData
    # An enhanced code of another class than the reply is just text.
    parser.feed(b"450 5.1.1 odd\r\n")
    assert parser.next().enhanced == ""


def test_replyParserTakesTheLastLinesCodeWhenTheLinesDisagree():
    """RFC 5321 4.2.1 wants one code on every line of a reply; a server that changes it
    within one is answered by its last line, as Postfix's smtp_chat_resp does.  (A protocol
    error instead made a 250-/251 answer to the end of data a deferral, and the message
    was sent again: found by a bug hunt.)"""
    parser = ReplyParser()
    parser.feed(b"250-2.0.0 ok\r\n251 2.0.0 ok too\r\n250-fine\r\n554 5.7.1 but no\r\n")
    first, second = parser.next(), parser.next()
    assert (first.code, first.enhanced, first.text) == (251, "2.0.0", "ok\nok too")
    assert (second.code, second.enhanced, second.text) == (554, "", "fine\n5.7.1 but no")


def test_replyParserTakesABareLFForALineEnd():
    """A reply line may end in a bare LF (and CRs before its line end are dropped), as
    Postfix's smtp_get() reads replies ("liberal in what we accept", smtp_stream.c): a next
    hop answering its end of data "250 ok<LF>" has the message; a protocol error instead
    deferred it, and it was sent again at every retry (found by a bug hunt)."""
    parser = ReplyParser()
    parser.feed(b"220 mx.test\n250-mx.test\n250 PIPELINING\r\n250 2.0.0 ok\r\r\n")
    replies = [parser.next(), parser.next(), parser.next()]
    assert [(r.code, r.enhanced, r.text) for r in replies] == [
        (220, "", "mx.test"), (250, "", "mx.test\nPIPELINING"), (250, "2.0.0", "ok")]
    assert parser.next() is None and not parser.hasData


def test_replyParserCutsAnOverlongReplyInsteadOfRefusingIt():
    """A reply line longer than MAX_REPLY_LINE octets keeps its first ones, the rest is read
    and dropped; a reply of more than MAX_REPLY_LINES lines keeps its first ones: as
    Postfix's smtp_chat_resp() cuts them (smtp_get() with SMTP_GET_FLAG_SKIP, "response
    longer than ...: truncated").  A protocol error instead deferred a message whose end
    of data was answered so, and it was sent again at every retry (found by a bug hunt)."""
    parser = ReplyParser()
    for _ in range(3):  # the long line comes in pieces, none with its line end
        parser.feed(b"250-" + b"x" * wire.MAX_REPLY_LINE)
        assert parser.next() is None
    parser.feed(b"y" * 10 + b"\r\n" + b"250-more\r\n" * (wire.MAX_REPLY_LINES + 5))
    parser.feed(b"250 2.0.0 last\r\n221 bye\r\n")
    first = parser.next()
    lines = first.text.split("\n")
    assert first.code == 250 and len(lines) == wire.MAX_REPLY_LINES
    assert lines[0] == "x" * (wire.MAX_REPLY_LINE - 4) and lines[1:] == ["more"] * (
        wire.MAX_REPLY_LINES - 1)
    assert (parser.next().code, parser.next()) == (221, None)
    assert not parser.hasData


def test_replyParserSaysWhatItCutOfEachReply():
    """After a reply it cut, L{ReplyParser.cut} says what (for the log: Postfix's
    smtp_chat_resp() warns "response longer than N"); C{None} after a reply it kept whole."""
    parser = ReplyParser()
    parser.feed(b"250 ok\r\n")
    assert parser.next().code == 250 and parser.cut is None
    parser.feed(b"250-" + b"x" * (wire.MAX_REPLY_LINE + 1) + b"\r\n250 ok\r\n")
    parser.next()
    assert parser.cut == f"a line longer than {wire.MAX_REPLY_LINE} octets"
    parser.feed(b"250-more\r\n" * wire.MAX_REPLY_LINES + b"250 ok\r\n")
    parser.next()
    assert parser.cut == f"more than {wire.MAX_REPLY_LINES} lines"
    parser.feed(b"250-" + b"x" * (wire.MAX_REPLY_LINE + 1) + b"\r\n"
                + b"250-more\r\n" * wire.MAX_REPLY_LINES + b"250 ok\r\n221 bye\r\n")
    parser.next()
    assert parser.cut == (f"a line longer than {wire.MAX_REPLY_LINE} octets, "
                          f"more than {wire.MAX_REPLY_LINES} lines")
    assert (parser.next().code, parser.cut) == (221, None)


def test_anOverlongReplyIsLoggedOnceNamingTheHost():
    """A reply the client cut is logged once (two long lines in it: one warning), naming
    the server, its address and port, as Postfix's "host[addr]:port: response longer than
    N: start..." (it was not logged at all); the session goes on."""
    from twisted.logger import LogLevel, capturedLogs, formatEvent

    peer = Peer()
    long = b"x" * (wire.MAX_REPLY_LINE + 10)
    with capturedLogs() as events:
        peer.say(b"220-" + long + b"\r\n220-" + long + b"\r\n220 ready\r\n")
    assert peer.heard() == b"EHLO client.test\r\n"
    cut = [e for e in events if "cut" in formatEvent(e)]
    assert len(cut) == 1, [formatEvent(e) for e in events]
    assert cut[0]["log_level"] == LogLevel.warn
    assert formatEvent(cut[0]) == (
        f"{HOST}[{PEER.host}]:{PEER.port}: reply cut (a line longer than "
        f"{wire.MAX_REPLY_LINE} octets): 220 xxxxxxxxxxxxxxxxxxxxxxxxxx...")
    with capturedLogs() as events:
        peer.say(b"250 mx.test\r\n")
    assert not [e for e in events if "cut" in formatEvent(e)] and resultOf(peer.ready).usable


@pytest.mark.parametrize("data", [
    b"hello\r\n",
    b"250x\r\n",
    b"2501 a\r\n",
    b"150 too low\r\n",
    b"250 bare\nLF\r\n",
    b"250 bare \r CR\r\n",
])
def test_replyParserRejectsMalformed(data):
    parser = ReplyParser()
    parser.feed(data)
    with pytest.raises(ProtocolError):
        while parser.next() is not None:
            pass


def stuffAll(content: bytes, size: int, check: bool = True) -> bytes:
    stuffer = DotStuffer(checkLineEnds=check)
    out = [stuffer.feed(content[i : i + size]) for i in range(0, len(content), size)]
    return b"".join(out) + stuffer.finish()


def stuffUnchecked(content: bytes, size: int) -> bytes:
    return stuffAll(content, size, check=False)


@pytest.mark.parametrize("content,wire", [
    (b"", b".\r\n"),
    (b"a\r\n", b"a\r\n.\r\n"),
    (b"a", b"a\r\n.\r\n"),
    (b".", b"..\r\n.\r\n"),
    (b".\r\n", b"..\r\n.\r\n"),
    (b"..\r\n.x\r\nx.\r\n.", b"...\r\n..x\r\nx.\r\n..\r\n.\r\n"),
    (b"a\r\n.\r\n.\r\n", b"a\r\n..\r\n..\r\n.\r\n"),
])
def test_dotStufferEdgeCases(content, wire):
    """Checking or not (the spool's files), the same wire format for CRLF content, whatever
    the chunk sizes (a line starting at a boundary, a boundary between CR and LF)."""
    for size in (1, 2, 3, 64):
        assert stuffAll(content, size) == wire
        assert stuffUnchecked(content, size) == wire


@pytest.mark.parametrize("content", [b"a\nb\r\n", b"a\rb\r\n", b"a\r", b"a\r\r\n", b"\n"])
def test_dotStufferRefusesBareNewlines(content):
    for size in (1, 2, 64):
        with pytest.raises(BareNewlineError):
            stuffAll(content, size)


@pytest.mark.parametrize("content,wire", [
    (b"a\nb\r\n", b"a\nb\r\n.\r\n"),
    (b"a\n.\n", b"a\n..\n\r\n.\r\n"),  # the dot after a bare LF is doubled too
    (b"a\n", b"a\n\r\n.\r\n"),  # ends in a bare LF: not a line end for the terminator
    (b"a\r", b"a\r\r\n.\r\n"),
])
def test_dotStufferWithoutChecksSendsBareNewlinesStuffed(content, wire):
    """A damaged file (bare LF) is sent as it is, but no line after any LF starts with a
    lone dot: no next hop can see the end of the data inside it."""
    for size in (1, 2, 64):
        assert stuffUnchecked(content, size) == wire


def test_settingsValidation():
    with pytest.raises(ValueError):
        ClientSettings("client.test", tls="sometimes")
    with pytest.raises(ValueError):
        ClientSettings("client.test", username="u")
    assert ClientSettings("c").timeouts == ClientTimeouts()


# Connection set-up ----------------------------------------------------------------------------


def test_ehloFallsBackToHelo(message):
    peer = Peer()
    peer.say(b"220 mx.test ESMTP\r\n")
    assert peer.heard() == b"EHLO client.test\r\n"
    peer.say(b"502 5.5.1 EHLO not implemented\r\n")
    assert peer.heard() == b"HELO client.test\r\n"
    peer.say(b"250 mx.test\r\n")
    conn = resultOf(peer.ready)
    assert conn.extensions == {} and conn.usable and not conn.tls
    assert conn.remoteMTA == "dns; mx.test"
    assert conn.address == peer.transport.getPeer().host  # (the server's address)
    # No extensions: no parameters, one command at a time.
    d = send(conn, envelope("a@example.org", body="8BITMIME", envid="x"), message)
    assert peer.heard() == b"MAIL FROM:<sender@example.org>\r\n"
    assert not d.called  # waiting for the reply to MAIL before RCPT


@pytest.mark.parametrize("refusal", [b"450 4.7.1 try HELO\r\n", b"451 later\r\n",
                                     b"454 4.7.0 no ESMTP now\r\n", b"354 what\r\n"])
def test_ehloRefusedTransientlyFallsBackToHelo(refusal):
    """Any reply to EHLO but 2xx and 421 means no ESMTP, as Postfix's smtp_helo() (it
    clears SMTP_FEATURE_ESMTP): HELO is sent, and the session goes on without extensions."""
    peer = Peer()
    peer.say(b"220 mx.test ESMTP\r\n")
    assert peer.heard() == b"EHLO client.test\r\n"
    peer.say(refusal)
    assert peer.heard() == b"HELO client.test\r\n"
    peer.say(b"250 mx.test\r\n")
    conn = resultOf(peer.ready)
    assert conn.extensions == {} and conn.usable


def test_ehlo421IsNotRetriedWithHelo():
    """421 to EHLO: the server closes the channel (RFC 5321 section 3.8); no HELO (Postfix:
    "host refused to talk to me"), a transient failure."""
    peer = Peer()
    peer.say(b"220 mx.test ESMTP\r\n")
    assert peer.heard() == b"EHLO client.test\r\n"
    peer.say(b"421 4.3.2 closing\r\n")
    error = failureOf(peer.ready)
    assert not error.permanent and error.code == "4.3.2"
    assert b"HELO" not in peer.heard()


def test_heloRefusedIsPermanent():
    peer = Peer()
    peer.say(b"220 mx.test ESMTP\r\n500 no\r\n501 no HELO either\r\n")
    error = failureOf(peer.ready)
    assert error.permanent and error.code == "5.0.0" and error.refusedSetup
    assert error.diagnostic == "smtp; 501 no HELO either"
    assert peer.heard().endswith(b"QUIT\r\n")


def test_lhloHasNoHeloFallback():
    peer = Peer(ClientSettings("client.test", tls="none", lmtp=True))
    peer.say(b"220 lmtp ready\r\n")
    assert peer.heard() == b"LHLO client.test\r\n"
    peer.say(b"500 5.5.1 what\r\n")
    error = failureOf(peer.ready)
    assert error.permanent and error.code == "5.5.1" and error.refusedSetup
    assert b"HELO" not in peer.heard()


@pytest.mark.parametrize("greeting,code,permanent", [
    (b"554 5.7.1 go away\r\n", "5.7.1", True),
    (b"554 go away\r\n", "5.0.0", True),
    (b"421 4.3.2 busy\r\n", "4.3.2", False),
])
def test_greetingRefused(greeting, code, permanent):
    peer = Peer()
    peer.say(greeting)
    error = failureOf(peer.ready)
    assert (error.code, error.permanent, error.remoteMTA) == (code, permanent, "dns; mx.test")
    assert not error.refusedSetup  # (a 5xx greeting is retried: Postfix's smtp_skip_5xx_greeting)
    assert error.diagnostic == "smtp; " + greeting.decode().strip()
    assert peer.heard() == b"QUIT\r\n" and peer.transport.disconnecting
    assert error.resultsFor([Recipient("a@example.org")])[0].code == code


def test_connectionRefused():
    peer = Peer(endpoint=FakeEndpoint(failWith=ConnectionRefusedError()))
    error = failureOf(peer.ready)
    assert (error.code, error.permanent) == ("4.4.1", False)
    assert error.diagnostic == "X-mailrelay; connection refused by mx.test"


def test_a_source_address_that_cannot_be_bound_defers_4_4_0():
    """A [delivery] source_address the host no longer has (removed after start-up) defers
    the delivery with 4.4.0, naming the address: mail is not sent from another address,
    as Postfix's smtp_bind_address_enforce = yes ("4.4.0 server configuration error")."""
    from twisted.internet.error import ConnectBindError

    endpoint = FakeEndpoint(failWith=ConnectBindError(99, "Cannot assign requested address"))
    endpoint._bindAddress = ("192.0.2.100", 0)  # (as TCP4ClientEndpoint keeps it)
    peer = Peer(ClientSettings("client.test", sourceAddress="192.0.2.100"), endpoint=endpoint)
    error = failureOf(peer.ready)
    assert (error.code, error.permanent) == ("4.4.0", False)
    assert error.diagnostic == (
        "X-mailrelay; cannot connect to mx.test from source address 192.0.2.100 (server "
        "configuration error): Couldn't bind: 99: Cannot assign requested address."
    )


def test_a_connection_failure_is_logged_by_the_caller_only():
    """connectSMTP logs nothing of a failure to connect: the backend that asked logs it
    once, naming the message, the host, its address and port (a refused connection was
    logged twice, once here without any of them)."""
    from twisted.logger import capturedLogs

    with capturedLogs() as events:
        refused = Peer(endpoint=FakeEndpoint(failWith=ConnectionRefusedError()))
        failureOf(refused.ready)
        held = Peer(ClientSettings("client.test", timeouts=ClientTimeouts(connect=5)),
                    endpoint=FakeEndpoint(hold=True))
        held.clock.advance(6)
        assert "timed out" in failureOf(held.ready).diagnostic
    assert events == []


def test_noRemoteMTAWhenNoServerAnswered():
    """A connection refused, timed out, or lost or timed out before the greeting: no server
    said a word, so the results name no Remote-MTA (RFC 3464 section 2.3.5 names the MTA that
    gave the status; Postfix's dsb_simple() for connect and I/O errors leaves it out).  A
    server that answered (a refused greeting) is named."""
    errors = [failureOf(Peer(endpoint=FakeEndpoint(failWith=ConnectionRefusedError())).ready)]
    peer = Peer(ClientSettings("client.test", timeouts=ClientTimeouts(connect=5)),
                endpoint=FakeEndpoint(hold=True))
    peer.clock.advance(5)
    errors.append(failureOf(peer.ready))
    peer = Peer(ClientSettings("client.test", timeouts=ClientTimeouts(greeting=5)))
    peer.clock.advance(5)
    errors.append(failureOf(peer.ready))
    peer = Peer()
    peer.lose()
    errors.append(failureOf(peer.ready))
    for error in errors:
        assert error.remoteMTA is None, error.diagnostic
        assert error.resultsFor([Recipient("a@example.org")])[0].remoteMTA is None
    peer = Peer()
    peer.say(b"554 5.7.1 go away\r\n")
    assert failureOf(peer.ready).remoteMTA == "dns; mx.test"


def test_noRemoteMTAWhenTheConnectionBreaks(tmp_path):
    """A connection lost or timed out once the server has spoken, in the set-up or in a
    transaction: the recipients' status is ours (4.4.2), not the server's, so it names no
    Remote-MTA, as Postfix's smtp_stream_except() reports it with dsb_simple() (no mta).
    The recipients the server answered before keep it."""
    settings = ClientSettings("client.test", tls="none", timeouts=TIMEOUTS)
    errors = []
    for breaks in ("lost", "timed out"):
        peer = Peer(settings)
        peer.say(b"220 mx.test ESMTP\r\n")
        peer.lose() if breaks == "lost" else peer.clock.advance(12)
        errors.append(failureOf(peer.ready))
    for error in errors:
        assert error.remoteMTA is None, error.diagnostic
        assert error.resultsFor([Recipient("a@example.org")])[0].remoteMTA is None
    for breaks in ("lost", "timed out"):
        peer, conn = connected(settings=settings)
        (tmp_path / "m").write_bytes(MESSAGE)
        d = send(conn, envelope("a@example.org", "b@example.org"), tmp_path / "m")
        peer.say(b"250 ok\r\n250 ok\r\n550 5.1.1 no\r\n354 go\r\n")
        peer.pump()
        peer.lose(ConnectionLost) if breaks == "lost" else peer.clock.advance(19)
        a, b = resultOf(d)
        assert (a.code, a.remoteMTA) == ("4.4.2", None), a.diagnostic
        assert (b.code, b.remoteMTA) == ("5.1.1", "dns; mx.test")


def test_connectTimeout():
    peer = Peer(ClientSettings("client.test", timeouts=ClientTimeouts(connect=5)),
                endpoint=FakeEndpoint(hold=True))
    peer.clock.advance(4.9)
    assert not peer.ready.called
    peer.clock.advance(0.2)
    error = failureOf(peer.ready)
    assert error.code == "4.4.1" and "timed out" in error.diagnostic
    assert not peer.clock.getDelayedCalls()


def test_cancelWhileWaitingForGreeting():
    from twisted.internet.defer import CancelledError

    peer = Peer()
    peer.ready.cancel()
    failureOf(peer.ready, CancelledError)
    assert peer.transport.disconnecting
    peer.lose()  # the late connectionLost does not fire it again


def test_cancelWhileConnecting():
    from twisted.internet.defer import CancelledError

    peer = Peer(endpoint=FakeEndpoint(hold=True))
    peer.ready.cancel()
    failureOf(peer.ready, CancelledError)
    assert not peer.clock.getDelayedCalls()


def test_implicitTLSHandshakeFailure():
    from service_identity import VerificationError

    peer = Peer(ClientSettings("client.test", tls="implicit"))
    peer.protocol.connectionLost(Failure(VerificationError(errors=["bad name"])))
    error = failureOf(peer.ready)
    assert (error.code, error.permanent) == ("4.7.5", False)
    assert "TLS handshake with mx.test[192.0.2.25] failed: certificate host name mismatch" in (
        error.diagnostic)


def test_implicitTLSNoStarttls():
    peer = Peer(ClientSettings("client.test", tls="implicit"))
    peer.protocol.handshakeCompleted()
    peer.say(b"220 hi\r\n" + ehloReply(["STARTTLS", "PIPELINING"]))
    conn = resultOf(peer.ready)
    assert conn.tls and peer.heard() == b"EHLO client.test\r\n"


@pytest.mark.parametrize("data", [b"hello there\r\n", b"220-a\r\n221 b\r\n", b"x" * 70000])
def test_malformedGreetingAborts(data):
    peer = Peer()
    peer.say(data)
    error = failureOf(peer.ready)
    assert error.code == "4.4.2" and not error.permanent
    assert error.diagnostic.startswith("X-mailrelay; protocol error: ")
    assert peer.transport.disconnecting


def test_connectionLostDuringEhlo():
    peer = Peer()
    peer.say(b"220 hi\r\n")
    peer.lose()
    error = failureOf(peer.ready)
    assert error.code == "4.4.2"
    assert error.diagnostic == (
        "X-mailrelay; lost connection with mx.test[192.0.2.25] while sending EHLO")


def test_an_lmtp_socket_is_named_by_its_path():
    """A UNIX socket next hop is named by its path in diagnostics and as the relay the log
    names ('cannot connect to localhost', 'relay=localhost' before), as Postfix writes
    'relay=host[/path]'."""
    from twisted.internet.endpoints import UNIXClientEndpoint
    from twisted.internet.error import ConnectError

    class Missing(UNIXClientEndpoint):
        def connect(self, factory):
            return fail(ConnectError(string="2: No such file or directory"))

    clock = Clock()
    settings = ClientSettings("client.test", tls="none", lmtp=True)
    d = connectSMTP(clock, Missing(clock, "/run/dovecot/lmtp"), settings, tlsHostname="localhost")
    error = failureOf(d)
    assert "cannot connect to /run/dovecot/lmtp: " in error.diagnostic, error.diagnostic

    from twisted.internet.address import UNIXAddress

    class Socket(FakeEndpoint):
        def connect(self, factory):
            self.protocol = factory.buildProtocol(None)
            self.transport = TLSStringTransport(peerAddress=UNIXAddress("/run/dovecot/lmtp"))
            self.protocol.makeConnection(self.transport)
            return succeed(self.protocol)

    peer = Peer(settings, endpoint=Socket())
    peer.say(b"220 hi\r\n")
    peer.say(ehloReply(["PIPELINING"]))
    conn = resultOf(peer.ready)
    assert conn.relay == f"{HOST}[/run/dovecot/lmtp]"


def test_a_server_answering_ehlo_with_our_own_name_is_a_loop():
    """A server that replies to EHLO (or HELO) with the name the relay gives is the relay
    itself (it is its own MX, or a smarthost pointing back): the connection fails 5.4.6
    'loops back to myself', as Postfix's smtp does (smtp_proto.c); the backend makes it
    transient unless the host is the best MX.  Not for LMTP (a local server shares the
    host's name)."""
    for reply, loops in [(b"250-client.test\r\n250 PIPELINING\r\n", True),
                         (b"250 CLIENT.TEST.\r\n", True),
                         (b"250-mx.test\r\n250 PIPELINING\r\n", False)]:
        peer = Peer()
        peer.say(b"220 hi\r\n")
        peer.say(reply)
        if loops:
            error = failureOf(peer.ready)
            assert (error.code, error.permanent) == ("5.4.6", True), error
            assert error.loop and "replied to EHLO with my own hostname client.test" in (
                error.diagnostic), error.diagnostic
        else:
            assert resultOf(peer.ready).usable
    peer = Peer(ClientSettings("client.test", tls="none", lmtp=True))
    peer.say(b"220 hi\r\n250 client.test\r\n")
    assert resultOf(peer.ready).usable


# STARTTLS -------------------------------------------------------------------------------------


def test_starttlsResponseInjectionAborts():
    peer = Peer(ClientSettings("client.test", tls="may"))
    peer.say(b"220 hi\r\n" + ehloReply(["STARTTLS", "PIPELINING"]))
    assert peer.heard() == b"EHLO client.test\r\nSTARTTLS\r\n"
    peer.say(b"220 go ahead\r\n250 injected\r\n")
    error = failureOf(peer.ready)
    assert (error.code, error.permanent) == ("4.7.0", False)
    assert "response injection after STARTTLS" in error.diagnostic
    assert peer.transport.tlsOptions is None and peer.transport.disconnecting
    assert peer.heard() == b""


def test_starttlsPartialInjectionAborts():
    peer = Peer(ClientSettings("client.test", tls="may"))
    peer.say(b"220 hi\r\n" + ehloReply(["STARTTLS"]))
    peer.say(b"220 go ahead\r\n2")
    assert failureOf(peer.ready).code == "4.7.0"


def test_requiredTLSNotOffered(message):
    peer = Peer(ClientSettings("client.test", tls="required"))
    peer.say(b"220 hi\r\n" + ehloReply(["PIPELINING", "AUTH PLAIN"]))
    error = failureOf(peer.ready)
    # Postfix's "TLS is required, but was not offered by host": 4.7.4 (RFC 3463 X.7.4,
    # security features not supported), not 4.7.5 (cryptographic failure).
    assert (error.code, error.permanent) == ("4.7.4", False)
    assert "does not offer STARTTLS" in error.diagnostic
    assert peer.heard() == b"EHLO client.test\r\nQUIT\r\n"


@pytest.mark.parametrize("reply, code, permanent", [
    (b"454 4.7.0 TLS not available", "4.7.0", False),
    (b"454 TLS not available", "4.0.0", False),
    (b"554 5.7.0 no TLS for you", "5.7.0", True),
])
def test_requiredTLSRefused(reply, code, permanent):
    """TLS required and STARTTLS refused: the server's reply and status are passed on, as
    Postfix's smtp_site_fail(state, host, resp, "TLS is required, but host %s refused to
    start TLS: %s") does (smtp_proto.c): its Remote-MTA, its status (a 5xx is final at the
    last server, as a refused HELO), the command it answered."""
    peer = Peer(ClientSettings("client.test", tls="required"))
    peer.say(b"220 hi\r\n" + ehloReply(["STARTTLS"]) + reply + b"\r\n")
    error = failureOf(peer.ready)
    assert (error.code, error.permanent, error.refusedSetup) == (code, permanent, permanent)
    assert error.diagnostic == "smtp; " + reply.decode()
    assert (error.command, error.remoteMTA) == ("STARTTLS", "dns; mx.test")
    assert error.described == f"smtp; {reply.decode()} (in reply to STARTTLS command)"
    assert error.withoutRequiredTLS and not error.tlsFailure
    assert peer.heard() == b"EHLO client.test\r\nSTARTTLS\r\nQUIT\r\n"


def test_mayTLSNotOfferedOrRefusedGoesPlain():
    peer = Peer(ClientSettings("client.test", tls="may"))
    peer.say(b"220 hi\r\n" + ehloReply(["PIPELINING"]))
    conn = resultOf(peer.ready)
    assert conn.usable and not conn.tls
    peer = Peer(ClientSettings("client.test", tls="may"))
    peer.say(b"220 hi\r\n" + ehloReply(["STARTTLS"]) + b"454 4.7.0 not now\r\n")
    conn = resultOf(peer.ready)
    assert conn.usable and not conn.tls


def test_starttlsThenEhloAgain():
    peer = Peer(ClientSettings("client.test", tls="required"))
    peer.say(b"220 hi\r\n" + ehloReply(["STARTTLS", "SIZE 10"]))
    peer.heard()
    peer.say(b"220 2.0.0 go ahead\r\n")
    options = peer.transport.tlsOptions
    # "required" verifies: Twisted's verifying client options, the names checked by the relay.
    assert type(options).__name__ == "_VerifiedClientTLS"
    assert peer.heard() == b""
    peer.protocol.handshakeCompleted()
    assert peer.heard() == b"EHLO client.test\r\n"
    peer.say(ehloReply(["PIPELINING", "SIZE 20"]))
    conn = resultOf(peer.ready)
    assert conn.tls
    assert conn.extensions == {"PIPELINING": "", "SIZE": "20"}  # the first EHLO is forgotten


def test_mayTLSDoesNotVerify():
    peer = Peer(ClientSettings("client.test", tls="may"))
    peer.say(b"220 hi\r\n" + ehloReply(["STARTTLS"]) + b"220 go\r\n")
    assert type(peer.transport.tlsOptions).__name__ == "_UnverifiedClientTLS"


class FakeTLSHandle:
    def get_protocol_version_name(self) -> str:
        return "TLSv1.3"

    def get_cipher_name(self) -> str:
        return "TLS_AES_256_GCM_SHA384"


@pytest.mark.parametrize("tls, trust", [("may", "Untrusted"), ("required", "Verified")])
def test_tlsForTheLog(tls: str, trust: str):
    """The connection says for the log which server it reached (Postfix's relay=
    host[address]:port) and over what TLS; one line says the TLS when it is established."""
    from twisted.logger import capturedLogs, formatEvent

    peer = Peer(ClientSettings("client.test", tls=tls))
    peer.say(b"220 hi\r\n" + ehloReply(["STARTTLS"]) + b"220 go\r\n")
    peer.transport.getHandle = FakeTLSHandle  # the TLS connection, once started
    with capturedLogs() as events:
        peer.protocol.handshakeCompleted()
        peer.say(ehloReply(["PIPELINING"]))
        conn = resultOf(peer.ready)
    assert conn.relay == f"{HOST}[{PEER.host}]:{PEER.port}"
    verified = "verified" if tls == "required" else "unverified"
    assert conn.tlsDescription == f"TLSv1.3 TLS_AES_256_GCM_SHA384 {verified}"
    texts = [formatEvent(e) for e in events]
    assert (f"{trust} TLS connection established to {HOST}[{PEER.host}]:{PEER.port}: "
            "TLSv1.3 with cipher TLS_AES_256_GCM_SHA384") in texts, texts


def test_tlsHandshakeFailure():
    from OpenSSL import SSL

    peer = Peer(ClientSettings("client.test", tls="required"))
    peer.say(b"220 hi\r\n" + ehloReply(["STARTTLS"]) + b"220 go\r\n")
    peer.protocol.connectionLost(
        Failure(SSL.Error([("SSL routines", "", "certificate verify failed")])))
    error = failureOf(peer.ready)
    assert (error.code, error.permanent) == ("4.7.5", False)
    assert "certificate not trusted" in error.diagnostic


def test_tlsHandshakeTimeout():
    peer = Peer(ClientSettings("client.test", tls="may", timeouts=ClientTimeouts(starttls=7)))
    peer.say(b"220 hi\r\n" + ehloReply(["STARTTLS"]) + b"220 go\r\n")
    peer.clock.advance(7)
    error = failureOf(peer.ready)
    assert error.code == "4.4.2" and "TLS handshake" in error.diagnostic


def test_tlsFailuresAreMarked():
    """The errors of a failed handshake (refused, timed out, TLS not startable) and of a TLS
    session that broke before the connection was ready say C{tlsFailure}, which lets the
    backend try again without TLS under C{tls = "may"}, as Postfix; a plaintext connection's
    loss, a server's refusal and a response injection do not."""
    from OpenSSL import SSL

    peer = Peer(ClientSettings("client.test", tls="may"))
    peer.say(b"220 hi\r\n" + ehloReply(["STARTTLS"]) + b"220 go\r\n")
    peer.protocol.connectionLost(Failure(SSL.Error([("SSL routines", "", "bad record")])))
    assert failureOf(peer.ready).tlsFailure

    peer = Peer(ClientSettings("client.test", tls="may", timeouts=ClientTimeouts(starttls=7)))
    peer.say(b"220 hi\r\n" + ehloReply(["STARTTLS"]) + b"220 go\r\n")
    peer.clock.advance(7)
    assert failureOf(peer.ready).tlsFailure

    peer = Peer(ClientSettings("client.test", tls="may", timeouts=ClientTimeouts(ehlo=5)))
    peer.say(b"220 hi\r\n" + ehloReply(["STARTTLS"]) + b"220 go\r\n")
    peer.protocol.handshakeCompleted()
    peer.lose()  # while waiting for the EHLO reply over TLS
    error = failureOf(peer.ready)
    assert (error.code, error.tlsFailure) == ("4.4.2", True), error.diagnostic
    assert "lost connection" in error.diagnostic

    peer = Peer(ClientSettings("client.test", tls="may", timeouts=ClientTimeouts(ehlo=5)))
    peer.say(b"220 hi\r\n" + ehloReply(["STARTTLS"]) + b"220 go\r\n")
    peer.protocol.handshakeCompleted()
    peer.clock.advance(5)
    error = failureOf(peer.ready)
    assert (error.code, error.tlsFailure) == ("4.4.2", True), error.diagnostic

    peer = Peer()
    peer.say(b"220 hi\r\n")
    peer.lose()
    assert not failureOf(peer.ready).tlsFailure

    peer = Peer(ClientSettings("client.test", tls="may"))
    peer.say(b"220 hi\r\n" + ehloReply(["STARTTLS"]) + b"220 go\r\nX")  # injection
    error = failureOf(peer.ready)
    assert (error.code, error.tlsFailure) == ("4.7.0", False)

    peer = tlsPeer(["AUTH PLAIN"], username="user", password="pass")
    peer.say(b"535 5.7.8 no\r\n")
    assert not failureOf(peer.ready).tlsFailure


@pytest.mark.parametrize("how", ["lost", "timeout"])
def test_tlsSessionFailureInATransaction(message, how):
    """A TLS connection lost or timed out in a transaction: its recipients are deferred
    (4.4.2) and the connection says C{tlsSessionFailed}; a plaintext one does not."""
    for tls in (True, False):
        if tls:
            peer = Peer(ClientSettings("client.test", tls="may"))
            peer.say(b"220 hi\r\n" + ehloReply(["STARTTLS"]) + b"220 go\r\n")
            peer.protocol.handshakeCompleted()
            peer.say(ehloReply(["PIPELINING"]))
            conn = resultOf(peer.ready)
        else:
            peer, conn = connected()
        assert conn.tls is tls and not conn.tlsSessionFailed and not conn.broke
        d = send(conn, envelope("a@example.org"), message)
        peer.say(b"250 ok\r\n250 ok\r\n354 go\r\n")
        peer.pump()
        if how == "lost":
            peer.lose()
        else:
            peer.clock.advance(ClientTimeouts().dataDone)
        (a,) = resultOf(d)
        assert (a.status, a.code) == (TRANSIENT, "4.4.2"), a
        assert conn.tlsSessionFailed is tls
        assert conn.broke  # (with or without TLS: the server stopped answering)


@pytest.mark.parametrize(
    "orcpt, utf8, relayed",
    [
        ("utf-8;rej\\x{FC}@x", False, "utf-8;rej\\x{FC}@x"),  # as received
        ("utf-8;rejü@x", True, "utf-8;rejü@x"),
        ("utf-8;rejü@x", False, "utf-8;rej\\x{FC}@x"),
        # unitext mixing raw UTF-8 and escapes, to a next hop without SMTPUTF8: encoded
        # once (the escape's backslash was escaped again: r\\x{5C}x{E9}j...).
        ("utf-8;r\\x{E9}jü@x", False, "utf-8;r\\x{E9}j\\x{FC}@x"),
        ("rfc822;Jörg@x", False, "utf-8;J\\x{F6}rg@x"),
    ],
)
def test_orcptRelayed(orcpt: str, utf8: bool, relayed: str) -> None:
    assert wire.orcptValue(Recipient(address="a@x", orcpt=orcpt), utf8) == relayed


# AUTH -----------------------------------------------------------------------------------------


def tlsPeer(extensions, **kw) -> Peer:
    """A peer past STARTTLS and the second EHLO (not answered yet)."""
    peer = Peer(ClientSettings("client.test", tls="required", **kw))
    peer.say(b"220 hi\r\n" + ehloReply(["STARTTLS"]) + b"220 go\r\n")
    peer.protocol.handshakeCompleted()
    assert peer.heard() == b"EHLO client.test\r\nSTARTTLS\r\nEHLO client.test\r\n"
    peer.say(ehloReply(extensions))
    return peer


def test_authPlain():
    peer = tlsPeer(["AUTH LOGIN PLAIN"], username="user", password="pass")
    assert peer.heard() == b"AUTH PLAIN " + base64.b64encode(b"\0user\0pass") + b"\r\n"
    assert not peer.ready.called
    peer.say(b"235 2.7.0 ok\r\n")
    conn = resultOf(peer.ready)
    assert conn.authenticated and conn.tls


def test_authLogin():
    peer = tlsPeer(["AUTH=LOGIN"], username="user", password="pass")
    assert peer.heard() == b"AUTH LOGIN\r\n"
    peer.say(b"334 VXNlcm5hbWU6\r\n")
    assert peer.heard() == b"dXNlcg==\r\n"
    peer.say(b"334 UGFzc3dvcmQ6\r\n")
    assert peer.heard() == b"cGFzcw==\r\n"
    peer.say(b"235 ok\r\n")
    assert resultOf(peer.ready).authenticated


@pytest.mark.parametrize("reply,code,permanent", [
    (b"535 5.7.8 bad credentials\r\n", "5.7.8", True),
    (b"535 bad credentials\r\n", "5.7.8", True),
    (b"454 4.7.0 try later\r\n", "4.7.0", False),
])
def test_authRejected(reply, code, permanent):
    peer = tlsPeer(["AUTH PLAIN"], username="user", password="pass")
    peer.heard()
    peer.say(reply)
    error = failureOf(peer.ready)
    assert (error.code, error.permanent, error.refusedSetup) == (code, permanent, False)
    assert b"pass" not in error.diagnostic.encode() and peer.heard() == b"QUIT\r\n"


def test_noAuthOverPlaintext():
    peer = Peer(ClientSettings("client.test", tls="may", username="user", password="pass"))
    peer.say(b"220 hi\r\n" + ehloReply(["AUTH PLAIN LOGIN"]))
    error = failureOf(peer.ready)
    assert error.code == "4.7.0" and "without TLS" in error.diagnostic
    assert b"AUTH" not in peer.heard()


def test_authWithoutTLSWhenAllowed():
    peer = Peer(ClientSettings("client.test", tls="none", username="u", password="p",
                               authWithoutTLS=True))
    peer.say(b"220 hi\r\n" + ehloReply(["AUTH PLAIN"]))
    assert peer.heard().endswith(b"AUTH PLAIN " + base64.b64encode(b"\0u\0p") + b"\r\n")


def test_authNotOffered():
    peer = tlsPeer(["PIPELINING"], username="user", password="pass")
    assert failureOf(peer.ready).code == "4.7.0"


# Transactions ---------------------------------------------------------------------------------


def test_pipelinedTransaction(message):
    peer, conn = connected()
    env = envelope("a@example.org", "b@example.org")
    d = send(conn, env, message)
    # One write: MAIL, every RCPT and DATA (RFC 2920).
    assert peer.transport.io.getvalue()[peer._read:] == (
        f"MAIL FROM:<sender@example.org> SIZE={len(MESSAGE)}\r\n"
        "RCPT TO:<a@example.org>\r\nRCPT TO:<b@example.org>\r\nDATA\r\n").encode()
    peer.heard()
    peer.say(b"250 2.1.0 ok\r\n250 2.1.5 ok\r\n250 2.1.5 ok\r\n")
    assert not conn.usable and peer.transport.producer is None
    peer.say(b"354 go on\r\n")
    peer.pump()
    assert peer.heard() == b"Subject: hello\r\n\r\n..leading dot\r\nbody\r\n.\r\n"
    assert not d.called
    peer.say(b"250 2.0.0 Ok: queued as X\r\n")
    results = resultOf(d)
    assert [(r.address, r.status, r.code) for r in results] == [
        ("a@example.org", DELIVERED, "2.0.0"), ("b@example.org", DELIVERED, "2.0.0")]
    assert results[0].diagnostic == "smtp; 250 2.0.0 Ok: queued as X"
    assert results[0].remoteMTA == "dns; mx.test"
    assert conn.usable
    # The next transaction needs no RSET.
    send(conn, envelope("c@example.org"), message)
    assert peer.heard().startswith(b"MAIL FROM:")


def test_pipelinedMixedRecipients(message):
    peer, conn = connected()
    d = send(conn, envelope("a@example.org", "b@example.org", "c@example.org"), message)
    peer.heard()
    peer.say(b"250 2.1.0 ok\r\n250 2.1.5 ok\r\n450 mailbox busy\r\n550 5.1.1 no such user\r\n"
             b"354 go\r\n")
    peer.pump()
    peer.say(b"250 2.0.0 queued\r\n")
    a, b, c = resultOf(d)
    assert (a.status, a.code) == (DELIVERED, "2.0.0")
    assert (b.status, b.code, b.diagnostic) == (TRANSIENT, "4.0.0", "smtp; 450 mailbox busy")
    assert (c.status, c.code, c.diagnostic) == (PERMANENT, "5.1.1", "smtp; 550 5.1.1 no such user")


def test_unpipelinedOneCommandAtATime(message):
    peer, conn = connected(extensions=["SIZE 0"])
    d = send(conn, envelope("a@example.org", "b@example.org"), message)
    assert peer.heard() == f"MAIL FROM:<sender@example.org> SIZE={len(MESSAGE)}\r\n".encode()
    peer.say(b"250 ok\r\n")
    assert peer.heard() == b"RCPT TO:<a@example.org>\r\n"
    peer.say(b"550 5.1.1 unknown\r\n")
    assert peer.heard() == b"RCPT TO:<b@example.org>\r\n"
    peer.say(b"250 ok\r\n")
    assert peer.heard() == b"DATA\r\n"
    peer.say(b"354 go\r\n")
    peer.pump()
    peer.heard()
    peer.say(b"250 ok\r\n")
    a, b = resultOf(d)
    assert (a.status, a.code, b.status) == (PERMANENT, "5.1.1", DELIVERED)


def test_noRecipientAcceptedThenRset(message):
    peer, conn = connected(extensions=[])
    d = send(conn, envelope("a@example.org"), message)
    peer.say(b"250 ok\r\n")
    peer.heard()
    peer.say(b"550 5.1.1 unknown\r\n")
    assert peer.heard() == b""  # no DATA
    (a,) = resultOf(d)
    assert a.status is PERMANENT and conn.usable
    d = send(conn, envelope("b@example.org"), message)
    assert peer.heard() == b"RSET\r\n"
    peer.say(b"250 ok\r\n")
    assert peer.heard() == b"MAIL FROM:<sender@example.org>\r\n"


def test_rsetRefused(message):
    peer, conn = connected(extensions=[])
    d = send(conn, envelope("a@example.org"), message)
    peer.say(b"250 ok\r\n550 no\r\n")
    resultOf(d)
    d = send(conn, envelope("b@example.org"), message)
    peer.heard()
    peer.say(b"502 5.5.1 no RSET\r\n")
    (b,) = resultOf(d)
    assert b.status is TRANSIENT and b.code == "4.0.0" and "RSET" in b.diagnostic
    assert peer.heard() == b"QUIT\r\n" and not conn.usable


def test_pipelinedNoValidRecipientButDataAccepted(message):
    peer, conn = connected()
    d = send(conn, envelope("a@example.org", "b@example.org"), message)
    peer.heard()
    peer.say(b"250 ok\r\n550 5.1.1 no\r\n450 4.2.1 later\r\n354 go ahead anyway\r\n")
    a, b = resultOf(d)
    assert (a.status, b.status) == (PERMANENT, TRANSIENT)
    # Nothing is sent, not even an empty message: the connection is aborted.
    assert peer.heard() == b"" and peer.aborted and not conn.usable


@pytest.mark.parametrize("pipelined", [True, False])
def test_mailRefused(message, pipelined):
    peer, conn = connected(extensions=["PIPELINING"] if pipelined else [])
    d = send(conn, envelope("a@example.org", "b@example.org"), message)
    peer.heard()
    if pipelined:
        peer.say(b"451 4.3.0 local problem\r\n503 5.5.1 need MAIL\r\n503 5.5.1 need MAIL\r\n"
                 b"503 5.5.1 need MAIL\r\n")
    else:
        peer.say(b"451 4.3.0 local problem\r\n")
        assert peer.heard() == b""
    results = resultOf(d)
    assert [(r.status, r.code) for r in results] == [(TRANSIENT, "4.3.0")] * 2
    assert results[0].diagnostic == "smtp; 451 4.3.0 local problem"
    assert conn.usable
    send(conn, envelope("a@example.org"), message)
    assert peer.heard().startswith(b"MAIL")  # nothing to reset


def test_dataRefused(message):
    peer, conn = connected()
    d = send(conn, envelope("a@example.org", "b@example.org"), message)
    peer.heard()
    peer.say(b"250 ok\r\n250 ok\r\n550 5.1.1 no\r\n554 5.7.1 not today\r\n")
    a, b = resultOf(d)
    assert (a.status, a.code, a.diagnostic) == (PERMANENT, "5.7.1", "smtp; 554 5.7.1 not today")
    assert (b.status, b.code) == (PERMANENT, "5.1.1")
    send(conn, envelope("a@example.org"), message)
    assert peer.heard() == b"RSET\r\n"


@pytest.mark.parametrize(
    ("extensions", "script", "waiting"),
    [
        # Unpipelined: each reply is the last one expected, where the session named its step
        # by a key its table did not have (KeyError: 'transaction' out of the reply's
        # handler and again out of connectionLost: the delivery never ended).
        ([], [b"250 ok\r\n", b"250 ok\r\n", b"250 ok\r\n"], "sending DATA"),
        ([], [b"354 huh\r\n"], "sending MAIL FROM"),
        ([], [b"250 ok\r\n", b"250 ok\r\n", b"354 go\r\n", b"354 again\r\n"],
         "sending end of data"),
        # Pipelined, the last reply of the group unexpected.
        (["PIPELINING"], [b"250 ok\r\n250 ok\r\n250 ok\r\n"], "sending DATA"),
        # The last BDAT chunk (here the only one) answered 354.
        (["CHUNKING"], [b"250 ok\r\n", b"250 ok\r\n", b"354 what\r\n"],
         "sending end of data"),
    ],
)
def test_unexpectedReplyIsAProtocolError(message, extensions, script, waiting):
    """A reply of the wrong kind at any step (250 to DATA, 354 to MAIL or to the end of
    data) fails the attempt at once with a transient protocol error naming the step, and the
    connection is closed: no exception, nothing left waiting."""
    peer, conn = connected(extensions=extensions)
    d = send(conn, envelope("a@example.org"), message)
    for reply in script:
        peer.say(reply)
        peer.pump()
    (a,) = resultOf(d)
    assert (a.status, a.code) == (TRANSIENT, "4.4.2"), a
    assert "protocol error: unexpected reply to " in a.diagnostic, a.diagnostic
    assert f"while {waiting}" in a.diagnostic, a.diagnostic
    assert peer.aborted and not conn.usable
    peer.lose()  # the connection's end: nothing more to fail


@pytest.mark.parametrize("reply, status, code", [
    (b"452 4.3.1 insufficient system storage\r\n", TRANSIENT, "4.3.1"),
    # Lines whose codes disagree: the last line's, as Postfix's smtp_chat_resp.
    (b"250-2.0.0 ok\r\n251 2.0.0 queued\r\n", DELIVERED, "2.0.0"),
])
def test_finalDotReply(message, reply, status, code):
    peer, conn = connected()
    d = send(conn, envelope("a@example.org"), message)
    peer.say(b"250 ok\r\n250 ok\r\n354 go\r\n")
    peer.pump()
    peer.say(reply)
    (a,) = resultOf(d)
    assert (a.status, a.code) == (status, code)
    assert conn.usable


def test_lmtpRepliesPerRecipient(message):
    peer, conn = connected(settings=ClientSettings("client.test", tls="none", lmtp=True))
    d = send(conn, envelope("a@example.org", "b@example.org", "c@example.org"), message)
    peer.heard()
    peer.say(b"250 ok\r\n250 ok\r\n550 5.1.1 unknown\r\n250 ok\r\n354 go\r\n")
    peer.pump()
    assert peer.heard().endswith(b"\r\n.\r\n")
    peer.say(b"250 2.0.0 delivered to a\r\n")
    assert not d.called
    peer.say(b"452 4.2.2 c is over quota\r\n")
    a, b, c = resultOf(d)
    assert (a.status, a.diagnostic) == (DELIVERED, "smtp; 250 2.0.0 delivered to a")
    assert (b.status, b.code) == (PERMANENT, "5.1.1")
    assert (c.status, c.code) == (TRANSIENT, "4.2.2")
    # An LMTP server is the mailbox: a success notice says "delivered", not "relayed".
    assert (a.final, b.final, c.final) == (True, False, False)


def test_sizeLimitRefusesWithoutMail(message):
    peer, conn = connected(extensions=["PIPELINING", f"SIZE {len(MESSAGE) - 1}"])
    d = send(conn, envelope("a@example.org", "b@example.org"), message)
    results = resultOf(d)
    assert [(r.status, r.code) for r in results] == [(PERMANENT, "5.3.4")] * 2
    assert "exceeds the size limit" in results[0].diagnostic
    assert peer.heard() == b"" and conn.usable


def test_noRemoteMTAForTheRelaysOwnVerdicts(message):
    """What the relay decides itself of a server it talked to -- the message over its SIZE
    limit, TLS required but not offered, credentials withheld or no AUTH to use, a server
    that is the relay itself -- names no Remote-MTA: Postfix reports these with
    DSN_BY_LOCAL_MTA (smtp_proto.c: 5.3.4, 4.7.4, 4.7.0, 5.4.6), as the status is not the
    server's (RFC 3464 section 2.3.5)."""
    peer, conn = connected(extensions=["PIPELINING", f"SIZE {len(MESSAGE) - 1}"])
    (a,) = resultOf(send(conn, envelope("a@example.org"), message))
    assert (a.code, a.remoteMTA) == ("5.3.4", None)
    errors = []
    peer = Peer(ClientSettings("client.test", tls="required"))
    peer.say(b"220 hi\r\n" + ehloReply(["PIPELINING"]))
    errors.append(failureOf(peer.ready))
    peer = Peer(ClientSettings("client.test", tls="may", username="user", password="pass"))
    peer.say(b"220 hi\r\n" + ehloReply(["AUTH PLAIN LOGIN"]))
    errors.append(failureOf(peer.ready))
    errors.append(failureOf(tlsPeer(["PIPELINING"], username="user", password="pass").ready))
    peer = Peer()
    peer.say(b"220 hi\r\n250 client.test\r\n")
    errors.append(failureOf(peer.ready))
    assert [e.code for e in errors] == ["4.7.4", "4.7.0", "4.7.0", "5.4.6"]
    for error in errors:
        assert error.remoteMTA is None, error.diagnostic


def test_smtputf8(message):
    peer, conn = connected()
    env = envelope("a@example.org", smtputf8=True)  # (its header section not known)
    (a,) = resultOf(send(conn, env, message))
    assert (a.status, a.code) == (PERMANENT, "5.6.7") and peer.heard() == b""
    # SMTPUTF8 asked, but nothing of the message is UTF-8 (addresses ASCII, the intake saw
    # no UTF-8 header field): sent without it, as Postfix does (DELIVERY_REQUIRES_SMTPUTF8);
    # it was bounced 5.6.7 (found by a bug hunt).
    peer, conn = connected()
    env = envelope("a@example.org", smtputf8=True, utf8Header=False)
    send(conn, env, message)
    wire = peer.heard()
    assert wire.startswith(b"MAIL FROM:<sender@example.org> SIZE=") and b"SMTPUTF8" not in wire
    for env in (envelope("a@example.org", smtputf8=True, utf8Header=True),
                Envelope(sender="jøran@example.org", recipients=[Recipient("a@example.org")],
                         smtputf8=True, utf8Header=False),
                Envelope(sender="a@example.org", recipients=[Recipient("dørte@example.org")],
                         smtputf8=True, utf8Header=False)):
        peer, conn = connected()
        (a,) = resultOf(send(conn, env, message))
        assert (a.status, a.code) == (PERMANENT, "5.6.7"), env
    peer, conn = connected(extensions=["SMTPUTF8"])
    env = Envelope(sender="jøran@example.org", recipients=[Recipient("dørte@example.org")],
                   smtputf8=True)
    send(conn, env, message)
    assert peer.heard() == "MAIL FROM:<jøran@example.org> SMTPUTF8\r\n".encode()


def test_a_server_offering_smtputf8_takes_8bit_without_saying_8bitmime(message):
    """RFC 6531 section 3.1 makes a server offering SMTPUTF8 implement 8BITMIME; one that
    offers SMTPUTF8 alone is taken to have it, as Postfix's smtp does (smtp_proto.c: "offers
    SMTPUTF8 support, but not 8BITMIME"): its 8-bit mail goes as it is, declared, instead
    of converted to 7 bits or, with UTF-8 header fields, returned."""
    peer, conn = connected(extensions=["SMTPUTF8", "PIPELINING"])
    assert "8BITMIME" in conn.extensions
    env = Envelope(sender="jøran@example.org", recipients=[Recipient("a@example.org")],
                   smtputf8=True, body="8BITMIME")
    send(conn, env, message)
    assert peer.heard() == ("MAIL FROM:<jøran@example.org> BODY=8BITMIME SMTPUTF8\r\n"
                            "RCPT TO:<a@example.org>\r\nDATA\r\n").encode()
    peer, conn = connected(extensions=["PIPELINING"])
    assert "8BITMIME" not in conn.extensions


def test_dsnParametersOnlyWhenOffered(message):
    env = envelope("a@example.org", ret="HDRS", envid="id+1=x", body="8BITMIME")
    env.recipients[0].notify = ("SUCCESS", "FAILURE")
    env.recipients.append(Recipient("b@example.org", orcpt="rfc822;Original+B@example.org"))
    peer, conn = connected(extensions=["DSN", "8BITMIME", "PIPELINING"])
    send(conn, env, message)
    assert peer.heard() == (
        b"MAIL FROM:<sender@example.org> BODY=8BITMIME RET=HDRS ENVID=id+2B1+3Dx\r\n"
        b"RCPT TO:<a@example.org> NOTIFY=SUCCESS,FAILURE ORCPT=rfc822;a@example.org\r\n"
        b"RCPT TO:<b@example.org> ORCPT=rfc822;Original+2BB@example.org\r\n"
        b"DATA\r\n")
    peer, conn = connected(extensions=["PIPELINING"])
    send(conn, env, message)
    assert peer.heard() == (
        b"MAIL FROM:<sender@example.org>\r\n"
        b"RCPT TO:<a@example.org>\r\nRCPT TO:<b@example.org>\r\nDATA\r\n")


def test_nullSenderAndNoRecipients(message):
    peer, conn = connected(extensions=[])
    assert resultOf(conn.send(envelope(), [], message)) == []
    env = Envelope(sender="", recipients=[Recipient("a@example.org")])
    send(conn, env, message)
    assert peer.heard() == b"MAIL FROM:<>\r\n"


def test_unreadableMessageFile(tmp_path):
    peer, conn = connected()
    (a,) = resultOf(send(conn, envelope("a@example.org"), tmp_path / "missing"))
    assert (a.status, a.code) == (TRANSIENT, "4.3.0") and peer.heard() == b""
    assert conn.usable


def test_sendWhileBusy(message):
    peer, conn = connected()
    send(conn, envelope("a@example.org"), message)
    (a,) = resultOf(send(conn, envelope("b@example.org"), message))
    assert a.status is TRANSIENT


def test_serviceClosing421(message):
    peer, conn = connected()
    d = send(conn, envelope("a@example.org", "b@example.org"), message)
    peer.say(b"250 ok\r\n550 5.1.1 no\r\n421 4.3.2 shutting down\r\n")
    a, b = resultOf(d)
    assert (a.status, a.code) == (PERMANENT, "5.1.1")
    assert (b.status, b.code, b.diagnostic) == (TRANSIENT, "4.3.2", "smtp; 421 4.3.2 shutting down")
    assert not conn.usable and peer.transport.disconnecting


def test_idle421MakesConnectionUnusable():
    peer, conn = connected()
    peer.say(b"421 4.4.2 idle timeout\r\n")
    assert not conn.usable and peer.transport.disconnecting


def test_a421WithTheEhloReplyIsTheDeferralOfTheNextTransaction(message):
    """A 421 in the same read as the EHLO reply (a server shutting down at once) closes the
    connection; the transaction then started is deferred with the server's 421 and its
    text, as Postfix's smtp reads it as the reply to its next command ("host X said: 421
    ...", smtp_proto.c), not "connection closed", which named neither (found by a review)."""
    peer = Peer()
    peer.say(b"220 mx.test ESMTP\r\n")
    peer.heard()
    peer.say(ehloReply(["PIPELINING"]) + b"421 4.3.2 shutting down\r\n")
    conn = resultOf(peer.ready)
    assert not conn.usable and peer.transport.disconnecting
    (a,) = resultOf(send(conn, envelope("a@example.org"), message))
    assert (a.status, a.code, a.diagnostic, a.remoteMTA) == (
        TRANSIENT, "4.3.2", "smtp; 421 4.3.2 shutting down", "dns; mx.test")
    assert peer.heard() == b""  # no MAIL after the 421


def test_a421ToStarttlsWhereTlsMayBeEndsTheSetUpWithIt():
    """With C{tls = "may"}, a refused STARTTLS lets the session go on without TLS, but not a
    421: the server is closing (RFC 5321 section 3.8).  The set-up fails with its 421 and
    text, as one to EHLO does; going on, the next command met the closed connection and
    said only "lost connection"."""
    peer = Peer(ClientSettings("client.test", tls="may"))
    peer.say(b"220 mx.test ESMTP\r\n")
    peer.heard()
    peer.say(ehloReply(["STARTTLS"]))
    assert peer.heard() == b"STARTTLS\r\n"
    peer.say(b"421 4.3.2 shutting down\r\n")
    error = failureOf(peer.ready)
    assert (error.code, error.permanent, error.diagnostic, error.remoteMTA) == (
        "4.3.2", False, "smtp; 421 4.3.2 shutting down", "dns; mx.test")
    assert peer.transport.disconnecting


def test_malformedReplyDuringTransaction(message):
    peer, conn = connected()
    d = send(conn, envelope("a@example.org", "b@example.org"), message)
    peer.say(b"250 ok\r\n250-ok\r\n25x mixed\r\n")
    results = resultOf(d)
    assert [(r.status, r.code) for r in results] == [(TRANSIENT, "4.4.2")] * 2
    assert results[0].diagnostic.startswith("X-mailrelay; protocol error: ")
    assert "while sending RCPT TO" in results[0].diagnostic
    assert peer.aborted and not conn.usable


def test_connectionLostMidData(tmp_path):
    path = tmp_path / "big"
    path.write_bytes(b"line\r\n" * 100_000)
    peer, conn = connected()
    d = send(conn, envelope("a@example.org", "b@example.org"), path)
    peer.say(b"250 ok\r\n250 ok\r\n550 5.1.1 no\r\n354 go\r\n")
    peer.transport.producer.resumeProducing()  # one chunk only
    assert len(peer.heard()) < 2 * clientProtocol.CHUNK_SIZE
    peer.lose(ConnectionLost)
    a, b = resultOf(d)
    assert (a.status, a.code) == (TRANSIENT, "4.4.2")
    assert a.diagnostic == ("X-mailrelay; lost connection with mx.test[192.0.2.25] while "
                            "sending the message body")
    assert b.status is PERMANENT
    # (A real transport unregisters its producer itself when the connection is lost.)
    producer = peer.transport.producer
    assert producer.done and producer.file.closed and not conn.usable


def test_earlyReplyDuringBody(tmp_path):
    path = tmp_path / "big"
    path.write_bytes(b"line\r\n" * 100_000)
    peer, conn = connected()
    d = send(conn, envelope("a@example.org"), path)
    peer.say(b"250 ok\r\n250 ok\r\n354 go\r\n")
    peer.transport.producer.resumeProducing()
    peer.say(b"552 5.3.4 too big\r\n")
    (a,) = resultOf(d)
    assert (a.status, a.code) == (PERMANENT, "5.3.4")
    assert peer.transport.producer is None and peer.aborted


def test_bareNewlineInFileIsNotSent(tmp_path):
    path = tmp_path / "corrupt"
    path.write_bytes(b"Subject: x\r\n\r\nbad\nline\r\n")
    peer, conn = connected()
    d = send(conn, envelope("a@example.org"), path)
    peer.say(b"250 ok\r\n250 ok\r\n354 go\r\n")
    peer.heard()
    peer.pump()
    (a,) = resultOf(d)
    assert (a.status, a.code) == (TRANSIENT, "4.3.0") and "bare CR or LF" in a.diagnostic
    assert a.remoteMTA is None  # the relay's own failure (test_noRemoteMTAForTheRelays...)
    assert peer.heard() == b"" and peer.aborted  # no terminating dot: the server drops it


def test_aMessageFileTruncatedWhileSentIsNotEnded(tmp_path):
    """The message file truncated by hand (an operator's mistake, a file system failing)
    while it is sent with DATA: no terminating dot (the server drops the transaction) and a
    4.3.0 of the relay's own, as BDAT's framer refuses a size that changed; the DATA path
    sent the part left and ended it, so the next hop took a truncated message and the entry
    was removed.  (Postfix's smtp client refuses a queue file cut short: its end record is
    missing.)"""
    path = tmp_path / "message"
    lines = b"".join(b"line %06d\r\n" % n for n in range(20000))  # (several chunks)
    path.write_bytes(b"Subject: x\r\n\r\n" + lines)
    peer, conn = connected()
    d = send(conn, envelope("a@example.org"), path)
    peer.say(b"250 ok\r\n250 ok\r\n354 go\r\n")
    peer.heard()
    peer.transport.producer.resumeProducing()  # a first chunk goes
    os.truncate(path, 70000)
    peer.pump()
    (a,) = resultOf(d)
    assert (a.status, a.code) == (TRANSIENT, "4.3.0") and a.remoteMTA is None
    assert "the message file changed while it was sent" in a.diagnostic
    assert not peer.heard().endswith(b"\r\n.\r\n") and peer.aborted


def test_noRemoteMTAForTheRelaysOwnFileTroubles(tmp_path, message):
    """A message file the relay cannot send -- with a bare LF (a corrupt queue file:
    test_bareNewlineInFileIsNotSent), not there to open -- or a send on a busy connection
    fails for the relay's own reasons: the result names no Remote-MTA, as Postfix reports
    queue file troubles with DSN_BY_LOCAL_MTA (smtp_proto.c, "unreadable mail queue entry";
    RFC 3464 2.3.5)."""
    peer, conn = connected()
    (missing,) = resultOf(send(conn, envelope("a@example.org"), tmp_path / "gone"))
    first = send(conn, envelope("a@example.org"), message)
    (busy,) = resultOf(send(conn, envelope("b@example.org"), message))
    assert not first.called
    results = [missing, busy]
    assert [(r.code, r.remoteMTA) for r in results] == [("4.3.0", None)] * 2, results


@pytest.mark.parametrize("bdat", [False, True])
def test_lineEndsCheckedFileIsStreamedWithoutChecks(tmp_path, bdat):
    """With lineEndsChecked (the spool's text messages) the file is not checked again: DATA
    dot-stuffs it only, BDAT sends it as it is."""
    path = tmp_path / "spooled"
    content = b"Subject: x\r\n\r\n.dot\r\nbad\nline\r\n"
    path.write_bytes(content)
    extensions = ("PIPELINING", "8BITMIME") + (("CHUNKING",) if bdat else ())
    peer, conn = connected(extensions)
    env = envelope("a@example.org")
    d = conn.send(env, env.recipients, path, lineEndsChecked=True)
    peer.heard()
    peer.say(b"250 ok\r\n250 ok\r\n" + (b"" if bdat else b"354 go\r\n"))
    if not bdat:
        peer.heard()
    peer.pump()
    if bdat:
        assert peer.heard() == b"BDAT %d LAST\r\n" % len(content) + content
    else:
        assert peer.heard() == b"Subject: x\r\n\r\n..dot\r\nbad\nline\r\n.\r\n"
    peer.say(b"250 ok\r\n")
    (a,) = resultOf(d)
    assert a.status == DELIVERED


def test_fileWithoutFinalCRLF(tmp_path):
    path = tmp_path / "m"
    path.write_bytes(b"Subject: x\r\n\r\nno end")
    peer, conn = connected()
    send(conn, envelope("a@example.org"), path)
    peer.say(b"250 ok\r\n250 ok\r\n354 go\r\n")
    peer.heard()
    peer.pump()
    assert peer.heard() == b"Subject: x\r\n\r\nno end\r\n.\r\n"


TIMEOUTS = ClientTimeouts(connect=1, greeting=11, ehlo=12, starttls=13, auth=14, mail=15,
                          rcpt=16, dataInit=17, dataBlock=18, dataDone=19, rset=20, quit=21)


@pytest.mark.parametrize("stage,seconds,replies,what", [
    ("greeting", 11, b"", "receiving the initial server greeting"),
    ("ehlo", 12, b"220 hi\r\n", "sending EHLO"),
])
def test_connectTimeouts(stage, seconds, replies, what):
    peer = Peer(ClientSettings("client.test", tls="none", timeouts=TIMEOUTS))
    peer.say(replies)
    peer.clock.advance(seconds - 0.5)
    assert not peer.ready.called
    peer.clock.advance(0.5)
    error = failureOf(peer.ready)
    assert error.code == "4.4.2" and not error.permanent
    assert error.diagnostic == (
        f"X-mailrelay; conversation with mx.test[192.0.2.25] timed out while {what}")
    assert peer.aborted


@pytest.mark.parametrize("pipelined,replies,seconds,what", [
    (False, b"", 15, "sending MAIL FROM"),
    (False, b"250 ok\r\n", 16, "sending RCPT TO"),
    (False, b"250 ok\r\n250 ok\r\n", 17, "sending DATA"),
    (True, b"", 15, "sending MAIL FROM"),
    (True, b"250 ok\r\n", 16, "sending RCPT TO"),
    (True, b"250 ok\r\n250 ok\r\n", 17, "sending DATA"),
    (True, b"250 ok\r\n250 ok\r\n354 go\r\n", 18, "sending the message body"),
    (True, b"250 ok\r\n250 ok\r\n354 go\r\n.", 19, "sending end of data"),
])
def test_transactionTimeouts(message, pipelined, replies, seconds, what):
    settings = ClientSettings("client.test", tls="none", timeouts=TIMEOUTS)
    peer, conn = connected(extensions=["PIPELINING"] if pipelined else [], settings=settings)
    d = send(conn, envelope("a@example.org"), message)
    if replies.endswith(b"."):
        peer.say(replies[:-1])
        peer.pump()
    else:
        peer.say(replies)
    peer.clock.advance(seconds - 0.5)
    assert not d.called
    peer.clock.advance(0.5)
    (a,) = resultOf(d)
    assert (a.status, a.code) == (TRANSIENT, "4.4.2")
    assert a.diagnostic.startswith(
        f"X-mailrelay; conversation with mx.test[192.0.2.25] timed out while {what}")
    assert peer.aborted and not conn.usable
    assert not peer.clock.getDelayedCalls()


def test_bodyTimerRestartsWhileDataFlows(tmp_path):
    path = tmp_path / "big"
    path.write_bytes(b"x" * 78 + b"\r\n" * 1 + b"line\r\n" * 50_000)
    settings = ClientSettings("client.test", tls="none", timeouts=TIMEOUTS)
    peer, conn = connected(settings=settings)
    d = send(conn, envelope("a@example.org"), path)
    peer.say(b"250 ok\r\n250 ok\r\n354 go\r\n")
    for _ in range(3):
        peer.clock.advance(17)
        peer.transport.producer.resumeProducing()
    assert not d.called


def test_quit():
    peer, conn = connected()
    d = conn.quit()
    assert peer.heard() == b"QUIT\r\n" and not d.called
    peer.say(b"221 2.0.0 bye\r\n")
    assert peer.transport.disconnecting and not conn.usable
    peer.lose()
    assert resultOf(d) is None
    assert resultOf(conn.quit()) is None


def test_quitTimeout():
    peer, conn = connected(settings=ClientSettings("client.test", tls="none", timeouts=TIMEOUTS))
    d = conn.quit()
    peer.clock.advance(21)
    assert peer.aborted
    peer.lose()
    assert resultOf(d) is None


def test_abortDuringTransaction(message):
    peer, conn = connected()
    d = send(conn, envelope("a@example.org"), message)
    conn.abort()
    (a,) = resultOf(d)
    assert a.status is TRANSIENT and "aborted while sending MAIL FROM" in a.diagnostic
    assert peer.aborted


# Against our own server ---------------------------------------------------------------------


def _answer(question):
    if isinstance(question, (CheckMail, CheckRecipient)):
        return ACCEPT
    if isinstance(question, StartData):
        return None
    assert isinstance(question, EndOfData)
    return question.error or Reply(250, "2.0.0", "Ok")


def deliverThroughSession(content: bytes, chunkSize: int) -> tuple[bytes, bytes, list]:
    """Send C{content} with the client to L{ServerSession}; return the body wire bytes, the
    content the session stored, and the results.  The session offers no CHUNKING, so that
    the client sends DATA (its BDAT is tested with BDATFramer and against Postfix)."""
    session = ServerSession(
        SessionSettings(hostname=HOST, chunking=False), ClientInfo(address="127.0.0.1")
    )
    stored: list[bytes] = []

    def toClient(events):
        while events:
            out, question = [], None
            for event in events:
                if isinstance(event, Reply):
                    out.append(event.toBytes())
                elif isinstance(event, BodyData):
                    stored.append(event.data)
                elif isinstance(event, (CheckMail, CheckRecipient, StartData, EndOfData)):
                    question = event
            if out:
                peer.say(b"".join(out))
            events = session.answer(_answer(question)) if question is not None else []

    with tempfile.TemporaryDirectory() as directory, \
            mock.patch.object(clientProtocol, "CHUNK_SIZE", chunkSize):
        path = Path(directory) / "message"
        path.write_bytes(content)
        peer = Peer()
        toClient(session.greeting())
        d = None
        wire = b""
        while True:
            data = peer.heard()
            if data:
                toClient(session.dataReceived(data))
                continue
            if d is None:
                d = send(resultOf(peer.ready), envelope("a@example.org"), path)
                continue
            if peer.transport.producer is None:
                break
            start = len(peer.transport.value())
            peer.pump()
            wire = peer.transport.value()[start:]
        return wire, b"".join(stored), resultOf(d)


_LINE = st.one_of(
    st.sampled_from([b"", b".", b"..", b".x", b"x.", b". ", b"...", b".\t.", b"From x"]),
    st.binary(max_size=40).map(  # no CR, LF or NUL (our server refuses NUL)
        lambda b: b.replace(b"\r", b"").replace(b"\n", b"").replace(b"\0", b"")
    ),
)


@hsettings(max_examples=150, deadline=None)
@given(lines=st.lists(_LINE, max_size=30), chunkSize=st.integers(1, 200),
       finalCRLF=st.booleans())
def test_dotStuffingRoundTrip(lines, chunkSize, finalCRLF):
    content = b"\r\n".join(lines) + (b"\r\n" if finalCRLF and lines else b"")
    wire, stored, results = deliverThroughSession(content, chunkSize)
    expected = content if content == b"" or content.endswith(b"\r\n") else content + b"\r\n"
    assert stored == expected
    assert [r.status for r in results] == [DELIVERED]
    # The wire ends with the only end-of-data marker.
    assert wire.endswith(b".\r\n")
    assert (b"\r\n" + wire).find(b"\r\n.\r\n") == len(wire) - 3
    assert stuffAll(content, chunkSize) == wire
    # Without checks (the spool's files), the same bytes.
    assert stuffUnchecked(content, chunkSize) == wire


def test_againstServerHarness(message):
    """The real server protocol (stamping, spool) as the peer, with PIPELINING."""
    harness = ServerHarness()
    peer = Peer()
    read = 0

    def shuttle():
        nonlocal read
        while True:
            progress = False
            out = harness.transport.value()
            if len(out) > read:
                peer.say(out[read:])
                read = len(out)
                progress = True
            data = peer.heard()
            if data:
                harness.protocol.dataReceived(data)
                progress = True
            if peer.transport.producer is not None:
                peer.pump()
                progress = True
            if not progress:
                return

    shuttle()
    conn = resultOf(peer.ready)
    assert "PIPELINING" in conn.extensions
    env = envelope("a@example.org", "b@example.org")
    d = send(conn, env, message)
    shuttle()
    results = resultOf(d)
    assert [r.status for r in results] == [DELIVERED, DELIVERED]
    assert results[0].diagnostic.startswith("smtp; 250 2.0.0 Ok: queued as ")
    ((stored, body),) = harness.spool.committed.values()
    assert body.startswith(b"Received: ") and b"\r\nSubject: hello\r\n" in body
    assert body.endswith(b"\r\n\r\n.leading dot\r\nbody\r\n")
    assert [r.address for r in stored.recipients] == ["a@example.org", "b@example.org"]
    d = conn.quit()
    shuttle()
    assert peer.transport.disconnecting


# End to end: aiosmtpd over the real reactor -------------------------------------------------

from aiosmtpd.controller import Controller  # noqa: E402
from twisted.internet.endpoints import TCP4ClientEndpoint  # noqa: E402
from twisted.trial import unittest as trial  # noqa: E402


class _Controller(Controller):
    """Listens on a free port (port=0) and learns which one before triggering the server."""

    def _trigger_server(self):
        self.port = self.server.sockets[0].getsockname()[1]
        super()._trigger_server()


class _Handler:
    def __init__(self):
        self.messages = []

    async def handle_RCPT(self, server, session, envelope, address, options):
        if address.startswith("unknown@"):
            return "550 5.1.1 no such user"
        envelope.rcpt_tos.append(address)
        return "250 2.1.5 OK"

    async def handle_DATA(self, server, session, envelope):
        self.messages.append((envelope.mail_from, list(envelope.rcpt_tos),
                              envelope.original_content, session.ssl is not None,
                              envelope.mail_options))
        return "250 2.0.0 queued"


class EndToEndTests(trial.TestCase):
    """The client against aiosmtpd on 127.0.0.1, on the real reactor."""

    timeout = 10

    def tempPath(self, name: str) -> Path:
        # Not TestCase.mktemp(): that writes below the current directory.
        directory = tempfile.mkdtemp(prefix="mailrelay-client-")
        self.addCleanup(shutil.rmtree, directory, True)
        return Path(directory) / name

    def startServer(self, **kwargs):
        self.handler = _Handler()
        controller = _Controller(self.handler, hostname="127.0.0.1", port=0, **kwargs)
        controller.start()
        self.addCleanup(controller.stop)
        self.port = controller.port

    def makeTLS(self, hostname="mx.test"):
        import trustme

        ca = trustme.CA()
        context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        ca.issue_cert(hostname).configure_cert(context)
        caFile = self.tempPath("ca.pem")
        ca.cert_pem.write_to_path(str(caFile))
        return context, str(caFile)

    def connect(self, settings, tlsHostname="mx.test"):
        from twisted.internet import reactor

        endpoint = TCP4ClientEndpoint(reactor, "127.0.0.1", self.port, timeout=5)
        return connectSMTP(reactor, endpoint, settings, tlsHostname=tlsHostname)

    def messageFile(self) -> Path:
        path = self.tempPath("message")
        path.write_bytes(MESSAGE + b".\r\n..\r\nend\r\n")
        return path

    async def _deliver(self, settings, tlsHostname="mx.test"):
        conn = await self.connect(settings, tlsHostname)
        env = envelope("a@example.org", "unknown@example.org")
        results = await send(conn, env, self.messageFile())
        await conn.quit()
        return conn, results

    def test_plainDelivery(self):
        self.startServer()

        async def run():
            conn, results = await self._deliver(ClientSettings("client.test", tls="may"))
            self.assertFalse(conn.tls)
            self.assertEqual([r.status for r in results], [DELIVERED, PERMANENT])
            self.assertEqual(results[1].code, "5.1.1")
            ((sender, rcpts, content, tls, options),) = self.handler.messages
            self.assertEqual((sender, rcpts, tls), ("sender@example.org", ["a@example.org"], False))
            self.assertEqual(content, MESSAGE + b".\r\n..\r\nend\r\n")
            self.assertIn(f"SIZE={len(content)}", options)

        return Deferred.fromCoroutine(run())

    def test_connectionRefused(self):
        self.startServer()
        self.port = 1  # nothing listens there

        async def run():
            try:
                await self.connect(ClientSettings("client.test"))
            except SMTPConnectError as e:
                self.assertEqual(e.code, "4.4.1")
            else:
                self.fail("connected")

        return Deferred.fromCoroutine(run())

    def test_requiredTLSVerified(self):
        context, caFile = self.makeTLS("mx.test")
        self.startServer(tls_context=context, require_starttls=True)

        async def run():
            settings = ClientSettings("client.test", tls="required", caFile=caFile)
            conn, results = await self._deliver(settings)
            self.assertTrue(conn.tls)
            self.assertEqual([r.status for r in results], [DELIVERED, PERMANENT])
            ((_sender, _rcpts, content, tls, _options),) = self.handler.messages
            self.assertTrue(tls)
            self.assertEqual(content, MESSAGE + b".\r\n..\r\nend\r\n")

        return Deferred.fromCoroutine(run())

    async def _tlsFails(self, settings, tlsHostname):
        try:
            await self.connect(settings, tlsHostname)
        except SMTPConnectError as e:
            return e
        self.fail("TLS unexpectedly succeeded")

    def test_requiredTLSWrongHostName(self):
        context, caFile = self.makeTLS("mx.test")
        self.startServer(tls_context=context, require_starttls=True)

        async def run():
            settings = ClientSettings("client.test", tls="required", caFile=caFile)
            error = await self._tlsFails(settings, "other.test")
            self.assertEqual((error.code, error.permanent), ("4.7.5", False))
            self.assertIn("host name mismatch", error.diagnostic)
            self.assertEqual(self.handler.messages, [])

        return Deferred.fromCoroutine(run())

    def test_requiredTLSUntrusted(self):
        context, _caFile = self.makeTLS("mx.test")
        _otherContext, otherCA = self.makeTLS("mx.test")
        self.startServer(tls_context=context, require_starttls=True)

        async def run():
            settings = ClientSettings("client.test", tls="required", caFile=otherCA)
            error = await self._tlsFails(settings, "mx.test")
            self.assertEqual(error.code, "4.7.5")
            self.assertIn("not trusted", error.diagnostic)

        return Deferred.fromCoroutine(run())

    def test_implicitTLS(self):
        from twisted.internet import reactor
        from twisted.internet.endpoints import wrapClientTLS

        context, caFile = self.makeTLS("mx.test")
        self.startServer(ssl_context=context)
        settings = ClientSettings("client.test", tls="implicit", caFile=caFile)

        async def run():
            tcp = TCP4ClientEndpoint(reactor, "127.0.0.1", self.port, timeout=5)
            endpoint = wrapClientTLS(clientTLSOptions(settings, "mx.test"), tcp)
            conn = await connectSMTP(reactor, endpoint, settings, tlsHostname="mx.test")
            self.assertTrue(conn.tls)
            self.assertNotIn("STARTTLS", conn.extensions)
            (result,) = await send(conn, envelope("a@example.org"), self.messageFile())
            self.assertEqual(result.status, DELIVERED)
            await conn.quit()
            # (aiosmtpd sets session.ssl only after STARTTLS, so check the content only.)
            self.assertEqual(self.handler.messages[0][2], MESSAGE + b".\r\n..\r\nend\r\n")
            # The same server under another name fails verification.
            wrong = wrapClientTLS(clientTLSOptions(settings, "other.test"), tcp)
            try:
                await connectSMTP(reactor, wrong, settings, tlsHostname="other.test")
            except SMTPConnectError as e:
                self.assertEqual(e.code, "4.7.5")
                self.assertIn("host name mismatch", e.diagnostic)
            else:
                self.fail("TLS unexpectedly succeeded")

        return Deferred.fromCoroutine(run())

    def test_mayTLSWithoutVerificationAndAuth(self):
        context, _caFile = self.makeTLS("some.other.name")
        seen = []

        def authenticator(server, session, envelope, mechanism, auth_data):
            from aiosmtpd.smtp import AuthResult

            seen.append((mechanism, auth_data.login, auth_data.password))
            if auth_data.password == b"secret":
                return AuthResult(success=True)
            # (aiosmtpd 1.4.6 never answers a failure without an explicit message.)
            return AuthResult(success=False, handled=False, message="535 5.7.8 no")

        self.startServer(tls_context=context, authenticator=authenticator, auth_require_tls=True)

        async def run():
            settings = ClientSettings("client.test", tls="may", username="user", password="secret")
            conn, results = await self._deliver(settings)
            self.assertTrue(conn.tls and conn.authenticated)
            self.assertEqual(seen, [("PLAIN", b"user", b"secret")])
            bad = ClientSettings("client.test", tls="may", username="user", password="wrong")
            try:
                await self.connect(bad)
            except SMTPConnectError as e:
                self.assertEqual((e.code, e.permanent), ("5.7.8", True))
            else:
                self.fail("bad credentials accepted")

        return Deferred.fromCoroutine(run())


def test_each_result_names_the_command_its_reply_answered(message):
    """As Postfix's "(in reply to RCPT TO command)": the log says which command a refusal
    answered (operators read it first).  MAIL, RCPT, DATA and the end of data."""
    peer, conn = connected()
    d = send(conn, envelope("a@example.org", "b@example.org", "c@example.org"), message)
    peer.heard()
    peer.say(b"250 2.1.0 ok\r\n250 2.1.5 ok\r\n550 5.1.1 no such user\r\n250 ok\r\n354 go\r\n")
    peer.pump()
    peer.say(b"452 4.3.1 full\r\n")
    a, b, c = resultOf(d)
    assert (a.command, b.command, c.command) == ("end of DATA", "RCPT TO", "end of DATA")
    d = send(conn, envelope("d@example.org"), message)
    peer.heard()
    peer.say(b"553 5.7.1 sender refused\r\n550 5.1.1 no\r\n503 no\r\n")
    (r,) = resultOf(d)
    assert (r.code, r.command) == ("5.7.1", "MAIL FROM")
    peer, conn = connected(extensions=[])
    d = send(conn, envelope("a@example.org"), message)
    peer.say(b"250 ok\r\n")
    peer.heard()
    peer.say(b"250 ok\r\n")
    assert peer.heard() == b"DATA\r\n"
    peer.say(b"451 4.3.0 not now\r\n")
    (r,) = resultOf(d)
    assert r.command == "DATA"


def test_certificateVerifyErrorsAreSaidInWords():
    from twisted.python.failure import Failure

    from mailrelay.delivery.tls import CertificateVerifyError, describeTLSFailure

    expired = CertificateVerifyError(10, 0, "CN=mx.test")
    assert describeTLSFailure(Failure(expired)) == (
        "certificate verification failed (certificate has expired at depth 0: CN=mx.test)")
    unknown = CertificateVerifyError(20, 1, "CN=Some CA")
    assert describeTLSFailure(Failure(unknown)) == (
        "certificate not trusted (unable to get local issuer certificate at depth 1: "
        "CN=Some CA)")
    assert str(CertificateVerifyError(4242, 0, "CN=x")) == (
        "verification error 4242 at depth 0: CN=x")


def test_certificateNameMismatchSaysTheNames():
    import ipaddress

    from service_identity.hazmat import DNSPattern, IPAddressPattern

    from mailrelay.delivery.tls import CertificateNameMismatch

    names = [DNSPattern.from_bytes(b"*.example.org"),
             IPAddressPattern(ipaddress.ip_address("192.0.2.1"))]
    assert str(CertificateNameMismatch("mx.test", names)) == (
        "mx.test is not a name of the certificate, which names *.example.org, 192.0.2.1")
    assert str(CertificateNameMismatch("mx.test", [])) == (
        "mx.test is not a name of the certificate, which names no host (no DNS or IP address "
        "subjectAltName)")


def test_tlsLibraryErrorsAreSaidInWords():
    """OpenSSL's error list is said in its words, not as a Python list of tuples (it goes
    into the log and the Diagnostic-Code of delivery status notifications)."""
    from OpenSSL import SSL
    from twisted.python.failure import Failure

    from mailrelay.delivery.tls import describeTLSFailure

    error = SSL.Error([("SSL routines", "", "wrong version number")])
    assert describeTLSFailure(Failure(error)) == "TLS error: wrong version number"
    error = SSL.Error([("SSL routines", "", "tlsv1 alert protocol version"),
                       ("SSL routines", "", "tlsv1 alert protocol version")])
    assert describeTLSFailure(Failure(error)) == "TLS error: tlsv1 alert protocol version"
    assert describeTLSFailure(Failure(SSL.Error("odd"))) == "TLS error: odd"


def test_a_servers_status_records_the_address_it_came_from(tmp_path):
    """A result the server's reply gave records the address the reply came from beside the
    Remote-MTA (which stays the name, RFC 3464 2.3.5), for the texts that name the server
    as Postfix's do, "host mx.test[192.0.2.25] said: ..." (smtp_proto.c, session->namaddr);
    a set-up refusal too.  A status of ours (the connection broke) records neither."""
    peer, conn = connected()
    (tmp_path / "m").write_bytes(MESSAGE)
    d = send(conn, envelope("a@example.org", "b@example.org"), tmp_path / "m")
    peer.say(b"250 ok\r\n250 ok\r\n550 5.1.1 no\r\n354 go\r\n")
    peer.pump()
    peer.lose(ConnectionLost)
    a, b = resultOf(d)
    assert (b.remoteMTA, b.remoteAddress) == ("dns; mx.test", "192.0.2.25")
    assert (a.remoteMTA, a.remoteAddress) == (None, None)
    refused = Peer()
    refused.say(b"421 4.3.2 busy\r\n")
    error = failureOf(refused.ready)
    assert (error.remoteMTA, error.remoteAddress) == ("dns; mx.test", "192.0.2.25")
    (result,) = error.resultsFor([Recipient("a@example.org")])
    assert (result.remoteMTA, result.remoteAddress) == ("dns; mx.test", "192.0.2.25")
