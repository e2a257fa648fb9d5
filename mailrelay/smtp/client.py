"""The ESMTP/LMTP client that delivers messages to the next hop.

Two layers, as on the server side:

  - L{ClientSession} is a sans-IO state machine.  It takes the bytes the server sent and the
    driver's notices (connection made, TLS handshake done, body sent, timer expired, connection
    lost) and returns a list of events: bytes to write (L{Write}), timer changes (L{SetTimer}),
    requests (L{StartTLS}, L{SendBody}, L{Close}) and outcomes (L{Ready}, L{ConnectFailed},
    L{TransactionDone}).  It never touches a socket, a clock or the disk.  L{ReplyParser} (strict
    reply parsing) and L{DotStuffer} (chunk-wise dot-stuffing) are its pure helpers.
  - L{SMTPClientProtocol} drives it with Twisted; L{connectSMTP} connects an endpoint and fires
    with a ready L{SMTPConnection}, the object delivery backends use.

Choices worth knowing (see also L{SMTPConnection.send}):

  - Message bodies are streamed from the spool file in L{CHUNK_SIZE} pieces through a pull
    producer, so memory stays bounded whatever the message size.  Dot-stuffing is exact across
    chunk boundaries.  A spool file holding a bare CR or LF is corrupt: it is never sent (nor
    silently "repaired"); the connection is aborted before the final dot, so the server drops
    the partial message, and the accepted recipients fail TRANSIENT 4.3.0 with a diagnostic
    saying so.
  - With PIPELINING, MAIL, every RCPT and DATA go out in one write (RFC 2920).  If DATA is
    answered 354 although no recipient was accepted, the client does not send the RFC 2920
    "empty message" (a lone "."): it aborts the connection, which cannot deliver anything.
  - STARTTLS: bytes the server sends after its 220 reply, before the handshake, abort the
    connection (response injection, CVE-2011-0411).  After the handshake the earlier EHLO
    extensions are forgotten and EHLO is sent again.  With C{tls="may"} a server that does not
    offer STARTTLS, or refuses it, is used in plaintext; a failed handshake is an error
    (L{SMTPConnectError} 4.7.5, transient) and is not retried in plaintext here.
  - Credentials are never sent on a connection without TLS unless
    L{ClientSettings.authWithoutTLS} is set.
"""

from __future__ import annotations

import base64
import os
import re
from collections import deque
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, BinaryIO, Sequence

from OpenSSL import SSL
from twisted.internet import error as ierror
from twisted.internet.abstract import isIPAddress, isIPv6Address
from twisted.internet.defer import CancelledError, Deferred, succeed
from twisted.internet.interfaces import (
    IHandshakeListener,
    IOpenSSLClientConnectionCreator,
    IPullProducer,
)
from twisted.internet.protocol import Factory, Protocol
from twisted.internet.ssl import (
    Certificate,
    CertificateOptions,
    optionsForClientTLS,
    platformTrust,
    trustRootFromCertificates,
)
from twisted.logger import Logger
from twisted.python.failure import Failure
from zope.interface import implementer

from mailrelay.address import xtextEncode
from mailrelay.envelope import Envelope, Recipient
from mailrelay.interfaces import TLS_POLICIES, DeliveryStatus, RecipientResult
from mailrelay.smtp.replies import Reply

log = Logger()

#: Bytes read from the message file per write while sending a body.
CHUNK_SIZE = 65536
#: A reply line longer than this (no CRLF within it) is a protocol error.
MAX_REPLY_LINE = 65536
#: A multi-line reply with more lines than this is a protocol error.
MAX_REPLY_LINES = 1000
#: Diagnostics are cut to this many characters.
MAX_DIAGNOSTIC = 1000

_ENHANCED = re.compile(r"([245])\.(\d{1,3})\.(\d{1,3})(?= |$)")
_REPLY_LINE = re.compile(rb"([2-5][0-9][0-9])([ -]?)(.*)", re.DOTALL)


# Settings -----------------------------------------------------------------------------------


@dataclass(frozen=True)
class ClientTimeouts:
    """Seconds to wait at each step; the defaults are those of RFC 5321 section 4.5.3.2.

    C{starttls} covers the reply to STARTTLS and the TLS handshake; C{dataBlock} is the longest
    the connection may refuse to take more body data; C{dataDone} is the wait for the reply (for
    LMTP: each reply) after the final dot.
    """

    connect: float = 30
    greeting: float = 300
    ehlo: float = 300
    starttls: float = 120
    auth: float = 120
    mail: float = 300
    rcpt: float = 300
    dataInit: float = 120
    dataBlock: float = 180
    dataDone: float = 600
    rset: float = 20
    quit: float = 300


@dataclass(frozen=True)
class ClientSettings:
    """How to talk to one next hop.

    @ivar heloName: the name sent in EHLO/HELO/LHLO.
    @ivar lmtp: speak LMTP (RFC 2033): LHLO (no HELO fallback) and, after the final dot, one
        reply per accepted recipient.
    @ivar tls: C{"none"}: never STARTTLS.  C{"may"}: STARTTLS when offered, without certificate
        verification; plaintext when not offered or refused.  C{"required"}: STARTTLS must be
        offered and succeed, with the certificate chain and host name verified, else
        L{SMTPConnectError} 4.7.5.  C{"implicit"}: the caller's endpoint is TLS-wrapped (see
        L{clientTLSOptions}); verified like C{"required"}.
    @ivar caFile: a PEM bundle of trusted CA certificates, or C{None} for the platform's.
    @ivar username: authenticate (AUTH PLAIN, else LOGIN) with these credentials.
    @ivar authWithoutTLS: allow sending credentials on a connection without TLS.
    """

    heloName: str
    lmtp: bool = False
    tls: str = "may"
    caFile: str | None = None
    username: str | None = None
    password: str | None = field(default=None, repr=False)
    authWithoutTLS: bool = False
    timeouts: ClientTimeouts = ClientTimeouts()

    def __post_init__(self) -> None:
        if self.tls not in TLS_POLICIES:
            raise ValueError(f"tls must be one of {', '.join(TLS_POLICIES)}, not {self.tls!r}")
        if self.username is not None and self.password is None:
            raise ValueError("a username needs a password")
        if not self.heloName or any(c.isspace() for c in self.heloName):
            raise ValueError(f"bad heloName {self.heloName!r}")


class SMTPConnectError(Exception):
    """Connecting, the greeting, EHLO/HELO/LHLO, STARTTLS or AUTH failed.

    @ivar code: the RFC 3463 status: C{"4.4.1"} (connection refused, timed out, host not found),
        C{"4.4.2"} (connection lost or timed out later, protocol error), C{"4.7.5"} (TLS
        required but unavailable, handshake or verification failed), C{"4.7.0"} (STARTTLS
        response injection, credentials withheld, no usable AUTH mechanism), C{"5.7.8"}
        (credentials rejected) or the status of the server's reply.
    @ivar diagnostic: RFC 3464 Diagnostic-Code form: C{"smtp; 554 5.7.1 go away"} for a reply,
        C{"X-mailrelay; connection refused by mx.example.org"} otherwise.
    @ivar permanent: C{True} for a 5xx greeting, EHLO and HELO, or AUTH reply.
    @ivar remoteMTA: RFC 3464 Remote-MTA form (C{"dns; mx.example.org"}).
    """

    def __init__(self, code: str, diagnostic: str, permanent: bool = False,
                 remoteMTA: str | None = None) -> None:
        super().__init__(diagnostic)
        if permanent != code.startswith("5."):
            raise ValueError(f"permanent={permanent} does not match status {code}")
        self.code = code
        self.diagnostic = diagnostic
        self.permanent = permanent
        self.remoteMTA = remoteMTA

    def resultsFor(self, recipients: Sequence[Recipient]) -> list[RecipientResult]:
        """One L{RecipientResult} per recipient saying this error happened."""
        status = DeliveryStatus.PERMANENT if self.permanent else DeliveryStatus.TRANSIENT
        return [RecipientResult(r.address, status, self.code, self.diagnostic, self.remoteMTA)
                for r in recipients]

    def __repr__(self) -> str:
        return f"SMTPConnectError({self.code!r}, {self.diagnostic!r}, permanent={self.permanent})"


# Pure helpers ---------------------------------------------------------------------------------


class ProtocolError(Exception):
    """The server broke the protocol (malformed reply, reply out of place)."""


class ReplyParser:
    """Parses server replies strictly.

    Every line is C{code SP text CRLF} or C{code "-" text CRLF} (text may be empty); all the
    lines of one reply carry the same code; the last has no C{"-"}.  A bare CR or LF, a line
    longer than L{MAX_REPLY_LINE} or a reply longer than L{MAX_REPLY_LINES} raises
    L{ProtocolError}.  Replies are returned as L{Reply}: the enhanced status code (RFC 2034),
    when the first line starts with one of the reply's class, is taken out of every line.
    """

    def __init__(self) -> None:
        self._buf = b""
        self._lines: list[bytes] = []
        self._code = b""

    @property
    def hasData(self) -> bool:
        """C{True} when bytes are buffered that are not part of a reply returned yet."""
        return bool(self._buf or self._lines)

    def feed(self, data: bytes) -> None:
        self._buf += data

    def next(self) -> Reply | None:
        """The next complete reply, or C{None} until more bytes arrive.

        @raise ProtocolError: malformed input.
        """
        while True:
            end = self._buf.find(b"\r\n")
            if end < 0:
                if b"\n" in self._buf:
                    raise ProtocolError("bare LF in reply")
                if len(self._buf) > MAX_REPLY_LINE:
                    raise ProtocolError(f"reply line longer than {MAX_REPLY_LINE} octets")
                return None
            line, self._buf = self._buf[:end], self._buf[end + 2 :]
            match = _REPLY_LINE.fullmatch(line)
            if match is None or (not match.group(2) and match.group(3)):
                raise ProtocolError(f"malformed reply line {_show(line)}")
            code, sep, text = match.groups()
            if b"\r" in text or b"\n" in text:
                raise ProtocolError(f"bare CR or LF in reply line {_show(line)}")
            if self._lines and code != self._code:
                raise ProtocolError(
                    f"reply code changed from {self._code.decode()} to {code.decode()} "
                    "within a multi-line reply")
            self._code = code
            self._lines.append(text)
            if len(self._lines) > MAX_REPLY_LINES:
                raise ProtocolError(f"reply longer than {MAX_REPLY_LINES} lines")
            if sep == b"-":
                continue
            lines, self._lines = self._lines, []
            return _makeReply(int(code), [t.decode("utf-8", "replace") for t in lines])


def _makeReply(code: int, lines: list[str]) -> Reply:
    enhanced = ""
    match = _ENHANCED.match(lines[0])
    if match and match.group(1) == str(code)[0]:
        enhanced = match.group(0)
        lines = [line[len(enhanced):].lstrip(" ") if line.startswith(enhanced) else line
                 for line in lines]
    return Reply(code, enhanced, "\n".join(lines))


def _show(data: bytes) -> str:
    text = repr(data[:80])[1:]
    return text + ("..." if len(data) > 80 else "")


class BareNewlineError(Exception):
    """The message content holds a CR not followed by LF, or an LF not preceded by CR."""


class DotStuffer:
    """Turns message content, fed in chunks of any size, into DATA wire format.

    A C{"."} starting any line is doubled (RFC 5321 4.5.2), also when the line starts exactly at
    a chunk boundary or the chunk boundary falls between its CR and LF.  A trailing CR is held
    back until the next chunk shows whether an LF follows.  L{finish} returns the terminator:
    C{".\\r\\n"} after content ending in CRLF (and for empty content), else C{"\\r\\n.\\r\\n"}.
    Each call is a few C{bytes} methods over the whole chunk, never a loop over lines.
    """

    def __init__(self) -> None:
        self._atLineStart = True
        self._carry = b""

    def feed(self, chunk: bytes) -> bytes:
        """Stuff one chunk.  @raise BareNewlineError: a bare CR or LF."""
        if self._carry:
            chunk = self._carry + chunk
            self._carry = b""
        if chunk.endswith(b"\r"):
            self._carry = b"\r"
            chunk = chunk[:-1]
        if not chunk:
            return b""
        lf = chunk.count(b"\n")
        if chunk.count(b"\r") != lf or chunk.count(b"\r\n") != lf:
            raise BareNewlineError()
        if self._atLineStart and chunk.startswith(b"."):
            chunk = b"." + chunk
        if b"\r\n." in chunk:
            chunk = chunk.replace(b"\r\n.", b"\r\n..")
        self._atLineStart = chunk.endswith(b"\r\n")
        return chunk

    def finish(self) -> bytes:
        """The end-of-data marker.  @raise BareNewlineError: the content ended in a bare CR."""
        if self._carry:
            raise BareNewlineError()
        return b".\r\n" if self._atLineStart else b"\r\n.\r\n"


def _noDelay(transport: Any) -> None:
    """Turn Nagle's algorithm off: a command or the final dot written while the previous
    segment is unacknowledged would otherwise wait for the peer's delayed ACK (up to 40 ms on
    Linux) -- measured as the largest cost per message in the benchmark."""
    setNoDelay = getattr(transport, "setTcpNoDelay", None)
    if setNoDelay is None:
        handle = getattr(transport, "transport", None)  # TLS wraps the TCP transport
        setNoDelay = getattr(handle, "setTcpNoDelay", None)
    if setNoDelay is not None:
        try:
            setNoDelay(True)
        except OSError:  # pragma: no cover - not a TCP socket
            pass


def _printable(text: str) -> str:
    return "".join(c if " " <= c <= "~" else "?" for c in text)


def replyDiagnostic(reply: Reply) -> str:
    """The RFC 3464 Diagnostic-Code of a reply: C{"smtp; 550 5.1.1 user unknown"}."""
    text = " ".join(line.strip() for line in reply.text.split("\n") if line.strip())
    head = f"{reply.code} {reply.enhanced}" if reply.enhanced else str(reply.code)
    return _printable(f"smtp; {head} {text}".rstrip())[:MAX_DIAGNOSTIC]


def _statusOf(reply: Reply) -> tuple[DeliveryStatus, str]:
    """The delivery status and RFC 3463 code a 2xx, 4xx or 5xx reply means."""
    cls = str(reply.code)[0]
    status = {"2": DeliveryStatus.DELIVERED, "4": DeliveryStatus.TRANSIENT,
              "5": DeliveryStatus.PERMANENT}[cls]
    code = reply.enhanced if reply.enhanced.startswith(cls + ".") else f"{cls}.0.0"
    return status, code


def _utf8AddrXtext(text: str) -> str:
    """RFC 6533 utf-8-addr-xtext: ASCII only, other characters as C{\\x{HEX}}."""
    return "".join(c if 0x21 <= ord(c) <= 0x7E and c not in "+=\\" else f"\\x{{{ord(c):X}}}"
                   for c in text)


def _orcpt(recipient: Recipient, utf8: bool) -> str:
    """The ORCPT parameter value to relay for C{recipient} (RFC 3461 4.2, RFC 6533)."""
    if recipient.orcpt:
        kind, _, value = recipient.orcpt.partition(";")
    else:
        kind, value = "rfc822", recipient.address
    if kind.lower() == "utf-8":
        # Kept as received (utf-8-addr-xtext or, with SMTPUTF8, utf-8-addr-unitext).
        return f"utf-8;{value}" if value.isascii() or utf8 else f"utf-8;{_utf8AddrXtext(value)}"
    if kind.lower() == "rfc822" and not value.isascii():
        return f"utf-8;{_utf8AddrXtext(value)}"
    return f"{kind};{xtextEncode(value)}"


def _asciiName(name: str) -> bytes:
    """A host name for EHLO/HELO/LHLO: IDNA A-labels when it is not ASCII."""
    return name.encode("ascii") if name.isascii() else name.encode("idna")


def _parseExtensions(reply: Reply) -> dict[str, str]:
    extensions: dict[str, str] = {}
    legacyAuth: list[str] = []
    for line in reply.text.split("\n")[1:]:
        keyword, _, params = line.strip().partition(" ")
        keyword = keyword.upper()
        if not keyword:
            continue
        if keyword.startswith("AUTH="):  # pre-RFC 4954 servers
            legacyAuth += [keyword[5:], params.strip()]
            continue
        extensions[keyword] = params.strip()
    if "AUTH" not in extensions and legacyAuth:
        extensions["AUTH"] = " ".join(p for p in legacyAuth if p)
    return extensions


# Events ---------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Write:
    """Write these bytes to the server."""

    data: bytes


@dataclass(frozen=True, slots=True)
class SetTimer:
    """(Re)start the step timer: call L{ClientSession.timedOut} after C{seconds}; C{None}
    cancels it."""

    seconds: float | None


@dataclass(frozen=True, slots=True)
class StartTLS:
    """Start the TLS handshake now; call L{ClientSession.tlsStarted} when it completes."""


@dataclass(frozen=True, slots=True)
class Ready:
    """The connection is set up (greeting, EHLO, TLS, AUTH) and idle."""


@dataclass(frozen=True, slots=True)
class ConnectFailed:
    """Setting up the connection failed."""

    error: SMTPConnectError


@dataclass(frozen=True, slots=True)
class SendBody:
    """DATA was accepted: stream the message body (L{DotStuffer}), write the terminator, then
    call L{ClientSession.bodySent} (or L{ClientSession.bodyFailed}).  Restart the timer with
    the same delay after each write."""


@dataclass(frozen=True, slots=True)
class TransactionDone:
    """The transaction ended; one result per recipient, in order."""

    results: list[RecipientResult]


@dataclass(frozen=True, slots=True)
class Close:
    """Close the connection: after the writes before this event, or at once (C{abort})."""

    abort: bool


# The session ----------------------------------------------------------------------------------

_GREETING, _EHLO, _HELO, _STARTTLS, _HANDSHAKE = "greeting", "ehlo", "helo", "starttls", "handshake"
_AUTH, _AUTH_USER, _AUTH_PASS = "auth", "auth-user", "auth-pass"
_IDLE, _RSET, _TRANSACTION, _BODY, _QUIT, _CLOSED = (
    "idle", "rset", "transaction", "body", "quit", "closed")
_CONNECTING = frozenset({_GREETING, _EHLO, _HELO, _STARTTLS, _HANDSHAKE, _AUTH, _AUTH_USER,
                         _AUTH_PASS})
_MAIL, _RCPT, _DATA, _DOT = "mail", "rcpt", "data", "dot"

#: step -> (ClientTimeouts field, "while ..." text)
_STEPS = {
    _GREETING: ("greeting", "receiving the initial server greeting"),
    _EHLO: ("ehlo", "sending EHLO"),
    _HELO: ("ehlo", "sending HELO"),
    _STARTTLS: ("starttls", "sending STARTTLS"),
    _HANDSHAKE: ("starttls", "performing the TLS handshake"),
    _AUTH: ("auth", "authenticating"),
    _AUTH_USER: ("auth", "authenticating"),
    _AUTH_PASS: ("auth", "authenticating"),
    _IDLE: ("quit", "idle"),
    _RSET: ("rset", "sending RSET"),
    _MAIL: ("mail", "sending MAIL FROM"),
    _RCPT: ("rcpt", "sending RCPT TO"),
    _DATA: ("dataInit", "sending DATA"),
    _BODY: ("dataBlock", "sending the message body"),
    _DOT: ("dataDone", "sending end of data -- message may be sent more than once"),
    _QUIT: ("quit", "sending QUIT"),
    _CLOSED: ("quit", "closed"),
}


@dataclass
class _Transaction:
    envelope: Envelope
    recipients: list[Recipient]
    size: int
    results: list[RecipientResult | None] = field(default_factory=list)
    accepted: list[int] = field(default_factory=list)
    pipelined: bool = False
    mailOK: bool = False


class ClientSession:
    """One SMTP/LMTP client connection (sans-IO).

    @ivar extensions: the EHLO keywords (upper case) and their parameters.
    @ivar tls: the connection is encrypted.
    @ivar authenticated: AUTH succeeded.
    @ivar state: the current step (C{"idle"} when a transaction may start).
    """

    def __init__(self, settings: ClientSettings, remoteMTA: str | None = None) -> None:
        self.settings = settings
        self.remoteMTA = remoteMTA
        self.host = "the server"
        self.extensions: dict[str, str] = {}
        self.tls = False
        self.authenticated = False
        self.state = _GREETING
        self._parser = ReplyParser()
        self._out: list[object] = []
        self._transaction: _Transaction | None = None
        self._expect: deque[tuple[str, int]] = deque()
        self._needRset = False

    # Driver API -------------------------------------------------------------------------------

    @property
    def idle(self) -> bool:
        return self.state == _IDLE

    @property
    def closed(self) -> bool:
        return self.state == _CLOSED

    @property
    def step(self) -> str:
        """What the session is doing or waiting for (a key of the step table)."""
        if self.state == _TRANSACTION and self._expect:
            return self._expect[0][0]
        return self.state

    def waitingFor(self) -> str:
        """Human words for L{step}: C{"sending RCPT TO"}."""
        what = _STEPS[self.step][1]
        return what.replace("EHLO", "LHLO") if self.settings.lmtp else what

    def connectionMade(self, host: str) -> list[object]:
        """The connection is up; C{host} names the server in diagnostics
        (C{"mx.example.org[192.0.2.1]"})."""
        self._out = []
        self.host = host
        self._wait(_GREETING)
        return self._out

    def dataReceived(self, data: bytes) -> list[object]:
        self._out = []
        if self.state == _CLOSED:
            return self._out
        self._parser.feed(data)
        try:
            while self.state not in (_CLOSED, _HANDSHAKE):
                reply = self._parser.next()
                if reply is None:
                    break
                self._onReply(reply)
            if self.state == _HANDSHAKE and self._parser.hasData:
                self._injection()
        except ProtocolError as e:
            self._protocolError(str(e))
        return self._out

    def tlsStarted(self) -> list[object]:
        """The TLS handshake completed (after STARTTLS, or for implicit TLS)."""
        self._out = []
        if self.state == _HANDSHAKE:
            self.tls = True
            self.extensions = {}
            self._sendHello()
        elif self.settings.tls == "implicit" and self.state != _CLOSED:
            self.tls = True
        return self._out

    def tlsFailed(self, why: str) -> list[object]:
        """TLS could not be started at all (bad CA file ...)."""
        self._out = []
        if self.state in _CONNECTING:
            self._connectFailed("4.7.5", f"X-mailrelay; cannot start TLS with {self.host}: {why}")
        return self._out

    def send(self, envelope: Envelope, recipients: Sequence[Recipient], size: int) -> list[object]:
        """Start a transaction for C{recipients}; C{size} is the message file's size.  Always
        ends in one L{TransactionDone}, maybe at once."""
        self._out = []
        recipients = list(recipients)
        if not recipients:
            self._out.append(TransactionDone([]))
            return self._out
        if self.state != _IDLE:
            if self.state == _CLOSED:
                diag = f"X-mailrelay; connection with {self.host} is closed"
            else:
                diag = f"X-mailrelay; connection with {self.host} is busy ({self.waitingFor()})"
            self._out.append(TransactionDone(
                [self._result(r, DeliveryStatus.TRANSIENT, "4.4.2", diag) for r in recipients]))
            return self._out
        limitText = self.extensions.get("SIZE", "")
        limit = int(limitText) if limitText.isdigit() else 0
        refusal = None
        if limit and size > limit:
            refusal = ("5.3.4", f"X-mailrelay; message size {size} exceeds the size limit "
                                f"{limit} of {self.host}")
        elif envelope.smtputf8 and "SMTPUTF8" not in self.extensions:
            refusal = ("5.6.7", f"X-mailrelay; the message needs SMTPUTF8, which {self.host} "
                                "does not support")
        if refusal is not None:
            self._out.append(TransactionDone(
                [self._result(r, DeliveryStatus.PERMANENT, *refusal) for r in recipients]))
            return self._out
        self._transaction = _Transaction(envelope, recipients, size, [None] * len(recipients))
        if self._needRset:
            self._write(b"RSET\r\n")
            self._wait(_RSET)
        else:
            self._startMail()
        return self._out

    def bodySent(self) -> list[object]:
        """The whole body and the terminating line have been written."""
        self._out = []
        t = self._transaction
        if self.state != _BODY or t is None:
            return self._out
        self.state = _TRANSACTION
        count = len(t.accepted) if self.settings.lmtp else 1
        self._expect.extend((_DOT, k) for k in range(count))
        self._armTimer()
        return self._out

    def bodyFailed(self, code: str, diagnostic: str) -> list[object]:
        """The body could not be sent (unreadable or corrupt file): abort the transaction."""
        self._out = []
        if self.state == _BODY:
            self._failPending(code, diagnostic)
            self._finish(close="abort")
        return self._out

    def timedOut(self) -> list[object]:
        """The timer of the current step expired."""
        self._out = []
        if self.state == _QUIT:
            self._close(abort=True)
        elif self.state not in (_CLOSED, _IDLE):
            self._fail("4.4.2", f"X-mailrelay; conversation with {self.host} timed out while "
                                f"{self.waitingFor()}")
        return self._out

    def quit(self) -> list[object]:
        """Say goodbye (when idle) or abort (when busy)."""
        self._out = []
        if self.state == _IDLE:
            self._write(b"QUIT\r\n")
            self._wait(_QUIT)
        elif self.state not in (_CLOSED, _QUIT):
            self._fail("4.4.2", f"X-mailrelay; connection with {self.host} closed by us while "
                                f"{self.waitingFor()}")
        return self._out

    def abort(self) -> list[object]:
        """Close at once; a transaction in progress fails (transient)."""
        self._out = []
        if self.state != _CLOSED:
            self._fail("4.4.2", f"X-mailrelay; connection with {self.host} aborted while "
                                f"{self.waitingFor()}")
        return self._out

    def connectionLost(self, why: str = "connection lost") -> list[object]:
        """The connection is gone; C{why} says how (for TLS failures: which verification
        failed)."""
        self._out = []
        state = self.state
        if state == _CLOSED:
            return self._out
        if state == _HANDSHAKE or (state == _GREETING and self.settings.tls == "implicit"
                                   and not self.tls):
            self._connectFailed("4.7.5", f"X-mailrelay; TLS handshake with {self.host} failed: "
                                         f"{why}", close=False)
        elif state in _CONNECTING:
            self._connectFailed("4.4.2", f"X-mailrelay; lost connection with {self.host} while "
                                         f"{self.waitingFor()}", close=False)
        elif self._transaction is not None:
            self._failPending("4.4.2", f"X-mailrelay; lost connection with {self.host} while "
                                       f"{self.waitingFor()}")
            self._finish(close="lost")
        self._setClosed()
        return self._out

    # Internals --------------------------------------------------------------------------------

    def _write(self, data: bytes) -> None:
        self._out.append(Write(data))

    def _wait(self, state: str) -> None:
        self.state = state
        self._armTimer()

    def _armTimer(self) -> None:
        name = _STEPS[self.step][0]
        self._out.append(SetTimer(getattr(self.settings.timeouts, name)))

    def _setClosed(self) -> None:
        if self.state != _CLOSED:
            self.state = _CLOSED
            self._out.append(SetTimer(None))
        self._expect.clear()

    def _close(self, abort: bool) -> None:
        self._setClosed()
        self._out.append(Close(abort))

    def _result(self, recipient: Recipient, status: DeliveryStatus, code: str,
                diagnostic: str) -> RecipientResult:
        # NOTIFY went with the RCPT when the peer offers DSN: a success notice is then the
        # peer's to send (RFC 3461 5.2.2), not ours.
        relayed = (status is DeliveryStatus.DELIVERED and recipient.notify is not None
                   and "DSN" in self.extensions)
        return RecipientResult(recipient.address, status, code, diagnostic[:MAX_DIAGNOSTIC],
                               self.remoteMTA, dsnRelayed=relayed)

    def _fromReply(self, recipient: Recipient, reply: Reply) -> RecipientResult:
        status, code = _statusOf(reply)
        return self._result(recipient, status, code, replyDiagnostic(reply))

    def _fail(self, code: str, diagnostic: str) -> None:
        """Give up on the connection: report, then abort it."""
        if self.state in _CONNECTING:
            self._connectFailed(code, diagnostic)
        elif self._transaction is not None:
            self._failPending(code, diagnostic)
            self._finish(close="abort")
        else:
            self._close(abort=True)

    def _protocolError(self, detail: str) -> None:
        self._fail("4.4.2", f"X-mailrelay; protocol error: {detail} (from {self.host} while "
                            f"{self.waitingFor()})")

    def _injection(self) -> None:
        self._connectFailed("4.7.0", f"X-mailrelay; response injection after STARTTLS from "
                                     f"{self.host}")

    def _onReply(self, reply: Reply) -> None:
        getattr(self, "_reply_" + self.state.replace("-", "_"))(reply)

    # Connection set-up ------------------------------------------------------------------------

    def _connectFailed(self, code: str, diagnostic: str, permanent: bool = False,
                       quit: bool = False, close: bool = True) -> None:
        error = SMTPConnectError(code, _printable(diagnostic)[:MAX_DIAGNOSTIC], permanent,
                                 self.remoteMTA)
        self._out.append(ConnectFailed(error))
        if close:
            if quit:
                self._write(b"QUIT\r\n")
            self._close(abort=not quit)
        else:
            self._setClosed()

    def _connectFailedReply(self, reply: Reply, permanentCode: str | None = None) -> None:
        if reply.code // 100 not in (4, 5):
            self._protocolError(f"unexpected reply {replyDiagnostic(reply)[6:]}")
            return
        _status, code = _statusOf(reply)
        permanent = reply.code >= 500
        if permanent and permanentCode and not reply.enhanced.startswith("5."):
            code = permanentCode
        self._connectFailed(code, replyDiagnostic(reply), permanent=permanent, quit=True)

    def _reply_greeting(self, reply: Reply) -> None:
        if reply.code == 220:
            if self.settings.tls == "implicit":
                self.tls = True  # only the TLS layer can have delivered it
            self._sendHello()
        else:
            self._connectFailedReply(reply)

    def _sendHello(self) -> None:
        verb = b"LHLO" if self.settings.lmtp else b"EHLO"
        self._write(verb + b" " + _asciiName(self.settings.heloName) + b"\r\n")
        self._wait(_EHLO)

    def _reply_ehlo(self, reply: Reply) -> None:
        if reply.code // 100 == 2:
            self.extensions = _parseExtensions(reply)
            self._afterHello()
        elif reply.code // 100 == 5 and not self.settings.lmtp:
            self._write(b"HELO " + _asciiName(self.settings.heloName) + b"\r\n")
            self._wait(_HELO)
        else:
            self._connectFailedReply(reply)

    def _reply_helo(self, reply: Reply) -> None:
        if reply.code // 100 == 2:
            self.extensions = {}
            self._afterHello()
        else:
            self._connectFailedReply(reply)

    def _afterHello(self) -> None:
        if not self.tls and self.settings.tls in ("may", "required"):
            if "STARTTLS" in self.extensions:
                self._write(b"STARTTLS\r\n")
                self._wait(_STARTTLS)
                return
            if self.settings.tls == "required":
                self._connectFailed("4.7.5", f"X-mailrelay; TLS is required, but {self.host} "
                                             "does not offer STARTTLS", quit=True)
                return
        self._afterTLS()

    def _reply_starttls(self, reply: Reply) -> None:
        if reply.code == 220:
            if self._parser.hasData:
                self._injection()
                return
            self.state = _HANDSHAKE
            self._armTimer()
            self._out.append(StartTLS())
        elif reply.code // 100 not in (4, 5):
            self._protocolError(f"unexpected reply to STARTTLS {replyDiagnostic(reply)[6:]}")
        elif self.settings.tls == "required":
            self._connectFailed("4.7.5", f"X-mailrelay; TLS is required, but {self.host} "
                                         f"refused STARTTLS: {replyDiagnostic(reply)}", quit=True)
        else:
            self._afterTLS()  # "may": carry on without TLS

    def _afterTLS(self) -> None:
        settings = self.settings
        if settings.username is None:
            self._ready()
            return
        if not self.tls and not settings.authWithoutTLS:
            self._connectFailed("4.7.0", f"X-mailrelay; not sending credentials to {self.host} "
                                         "on a connection without TLS", quit=True)
            return
        if "AUTH" not in self.extensions:
            self._connectFailed("4.7.0", f"X-mailrelay; credentials configured, but {self.host} "
                                         "does not offer AUTH", quit=True)
            return
        mechanisms = self.extensions["AUTH"].upper().split()
        user = settings.username.encode("utf-8")
        password = (settings.password or "").encode("utf-8")
        if "PLAIN" in mechanisms:
            token = base64.b64encode(b"\0" + user + b"\0" + password)
            self._write(b"AUTH PLAIN " + token + b"\r\n")
            self._wait(_AUTH)
        elif "LOGIN" in mechanisms:
            self._write(b"AUTH LOGIN\r\n")
            self._wait(_AUTH_USER)
        else:
            self._connectFailed("4.7.0", f"X-mailrelay; no AUTH mechanism in common with "
                                         f"{self.host} (it offers {' '.join(mechanisms)})",
                                quit=True)

    def _reply_auth(self, reply: Reply) -> None:
        if reply.code // 100 == 2:
            self.authenticated = True
            self._ready()
        elif reply.code // 100 == 3:
            self._protocolError(f"unexpected challenge {replyDiagnostic(reply)[6:]}")
        else:
            self._connectFailedReply(reply, permanentCode="5.7.8")

    def _authStep(self, reply: Reply, secret: str, nextState: str) -> None:
        if reply.code == 334:
            self._write(base64.b64encode(secret.encode("utf-8")) + b"\r\n")
            self._wait(nextState)
        elif reply.code // 100 in (4, 5):
            self._connectFailedReply(reply, permanentCode="5.7.8")
        else:
            self._protocolError(f"unexpected reply to AUTH LOGIN {replyDiagnostic(reply)[6:]}")

    def _reply_auth_user(self, reply: Reply) -> None:
        self._authStep(reply, self.settings.username or "", _AUTH_PASS)

    def _reply_auth_pass(self, reply: Reply) -> None:
        self._authStep(reply, self.settings.password or "", _AUTH)

    def _ready(self) -> None:
        self.state = _IDLE
        self._out.append(SetTimer(None))
        self._out.append(Ready())

    # Idle and QUIT ----------------------------------------------------------------------------

    def _reply_idle(self, reply: Reply) -> None:
        if reply.code == 421:  # the server is closing (idle timeout, shutdown)
            self._close(abort=False)
        else:
            self._protocolError(f"unexpected reply while idle {replyDiagnostic(reply)[6:]}")

    def _reply_quit(self, reply: Reply) -> None:
        self._close(abort=False)

    # Transactions -----------------------------------------------------------------------------

    def _mailCommand(self, t: _Transaction) -> bytes:
        ext, envelope = self.extensions, t.envelope
        params = []
        if "SIZE" in ext:
            params.append(f"SIZE={t.size}")
        if envelope.body == "8BITMIME" and "8BITMIME" in ext:
            params.append("BODY=8BITMIME")
        if envelope.smtputf8:
            params.append("SMTPUTF8")
        if "DSN" in ext:
            if envelope.ret:
                params.append(f"RET={envelope.ret}")
            if envelope.envid:
                params.append(f"ENVID={xtextEncode(envelope.envid)}")
        line = f"MAIL FROM:<{envelope.sender}>" + "".join(" " + p for p in params)
        return line.encode("utf-8") + b"\r\n"

    def _rcptCommand(self, t: _Transaction, recipient: Recipient) -> bytes:
        params = []
        if "DSN" in self.extensions:
            if recipient.notify:
                params.append("NOTIFY=" + ",".join(recipient.notify))
            params.append("ORCPT=" + _orcpt(recipient, t.envelope.smtputf8))
        line = f"RCPT TO:<{recipient.address}>" + "".join(" " + p for p in params)
        return line.encode("utf-8") + b"\r\n"

    def _startMail(self) -> None:
        t = self._transaction
        assert t is not None
        t.pipelined = "PIPELINING" in self.extensions
        self.state = _TRANSACTION
        if t.pipelined:
            commands = [self._mailCommand(t)]
            commands += [self._rcptCommand(t, r) for r in t.recipients]
            commands.append(b"DATA\r\n")
            self._write(b"".join(commands))
            self._expect.append((_MAIL, 0))
            self._expect.extend((_RCPT, i) for i in range(len(t.recipients)))
            self._expect.append((_DATA, 0))
        else:
            self._write(self._mailCommand(t))
            self._expect.append((_MAIL, 0))
        self._armTimer()

    def _reply_rset(self, reply: Reply) -> None:
        if reply.code // 100 == 2:
            self._needRset = False
            self._startMail()
            return
        code = reply.enhanced if reply.enhanced.startswith("4.") else "4.0.0"
        self._failPending(code, f"X-mailrelay; RSET refused: {replyDiagnostic(reply)}")
        self._write(b"QUIT\r\n")
        self._finish(close="quit")

    def _reply_transaction(self, reply: Reply) -> None:
        t = self._transaction
        assert t is not None
        if reply.code == 421:
            # The server is going away: this reply answers everything still outstanding.
            for i, r in enumerate(t.recipients):
                if t.results[i] is None:
                    t.results[i] = self._fromReply(r, reply)
            self._finish(close="close")
            return
        if not self._expect:  # pragma: no cover - defensive
            raise ProtocolError(f"unexpected reply {replyDiagnostic(reply)[6:]}")
        kind, index = self._expect.popleft()
        getattr(self, "_on_" + kind)(t, reply, index)
        if self.state == _TRANSACTION and self._expect:
            self._armTimer()

    def _unexpected(self, what: str, reply: Reply) -> None:
        self._protocolError(f"unexpected reply to {what} {replyDiagnostic(reply)[6:]}")

    def _on_mail(self, t: _Transaction, reply: Reply, _index: int) -> None:
        cls = reply.code // 100
        if cls == 2:
            t.mailOK = True
            if not t.pipelined:
                self._write(self._rcptCommand(t, t.recipients[0]))
                self._expect.append((_RCPT, 0))
        elif cls in (4, 5):
            t.results = [self._fromReply(r, reply) for r in t.recipients]
            if not t.pipelined:
                self._finish()
        else:
            self._unexpected("MAIL", reply)

    def _on_rcpt(self, t: _Transaction, reply: Reply, index: int) -> None:
        cls = reply.code // 100
        if cls not in (2, 4, 5):
            self._unexpected("RCPT", reply)
            return
        if t.mailOK:
            if cls == 2:
                t.accepted.append(index)
            else:
                t.results[index] = self._fromReply(t.recipients[index], reply)
        if t.pipelined:
            return
        if index + 1 < len(t.recipients):
            self._write(self._rcptCommand(t, t.recipients[index + 1]))
            self._expect.append((_RCPT, index + 1))
        elif t.accepted:
            self._write(b"DATA\r\n")
            self._expect.append((_DATA, 0))
        else:
            self._needRset = True
            self._finish()

    def _on_data(self, t: _Transaction, reply: Reply, _index: int) -> None:
        cls = reply.code // 100
        if reply.code == 354:
            if t.mailOK and t.accepted:
                self.state = _BODY
                self._armTimer()
                self._out.append(SendBody())
            else:
                # Pipelined DATA accepted with no valid recipient: sending even an empty
                # message could deliver something; closing the connection cannot.
                self._finish(close="abort")
        elif cls in (4, 5):
            for i in t.accepted:
                t.results[i] = self._fromReply(t.recipients[i], reply)
            self._needRset = t.mailOK
            self._finish()
        else:
            self._unexpected("DATA", reply)

    def _reply_body(self, reply: Reply) -> None:
        # The server answered before the end of the message: it refuses it.
        t = self._transaction
        assert t is not None
        if reply.code // 100 in (4, 5):
            for i in t.accepted:
                t.results[i] = self._fromReply(t.recipients[i], reply)
            self._finish(close="abort")
        else:
            self._unexpected("the message body", reply)

    def _on_dot(self, t: _Transaction, reply: Reply, index: int) -> None:
        if reply.code // 100 not in (2, 4, 5):
            self._unexpected("end of data", reply)
            return
        targets = [t.accepted[index]] if self.settings.lmtp else t.accepted
        for i in targets:
            t.results[i] = self._fromReply(t.recipients[i], reply)
        if not self._expect:
            self._needRset = False
            self._finish()

    def _failPending(self, code: str, diagnostic: str) -> None:
        t = self._transaction
        if t is None:
            return
        for i, r in enumerate(t.recipients):
            if t.results[i] is None:
                t.results[i] = self._result(r, DeliveryStatus.TRANSIENT, code, diagnostic)

    def _finish(self, close: str | None = None) -> None:
        """End the transaction.  C{close}: C{None} (stay open), C{"abort"}, C{"close"} (after
        pending writes), C{"quit"} (same, after a QUIT already written), C{"lost"} (already
        gone)."""
        t = self._transaction
        assert t is not None
        self._transaction = None
        self._expect.clear()
        self._failPending("4.4.2", f"X-mailrelay; internal error with {self.host}")  # defensive
        results = [r for r in t.results if r is not None]
        if close is None:
            self.state = _IDLE
            self._out.append(SetTimer(None))
        elif close == "lost":
            self._setClosed()
        else:
            self._close(abort=close == "abort")
        self._out.append(TransactionDone(results))


# TLS ------------------------------------------------------------------------------------------


def _loadTrustRoot(caFile: str | None) -> Any:
    if caFile is None:
        return platformTrust()
    data = Path(caFile).read_bytes()
    marker = b"-----END CERTIFICATE-----"
    blocks = [b + marker for b in data.split(marker) if b"-----BEGIN CERTIFICATE-----" in b]
    if not blocks:
        raise ValueError(f"no certificate in {caFile}")
    return trustRootFromCertificates([Certificate.loadPEM(b) for b in blocks])


@implementer(IOpenSSLClientConnectionCreator)
class _UnverifiedClientTLS:
    """TLS for C{tls="may"}: encryption without certificate verification (RFC 7435
    opportunistic security), with SNI."""

    def __init__(self, hostname: str) -> None:
        self._context = CertificateOptions().getContext()
        self._sni = None if isIPAddress(hostname) or isIPv6Address(hostname) else (
            hostname.encode("idna"))

    def clientConnectionForTLS(self, tlsProtocol: Any) -> SSL.Connection:
        connection = SSL.Connection(self._context, None)
        if self._sni:
            connection.set_tlsext_host_name(self._sni)
        return connection


def clientTLSOptions(settings: ClientSettings, hostname: str) -> IOpenSSLClientConnectionCreator:
    """The TLS client options for C{hostname} under C{settings}.

    For C{tls="required"} and C{"implicit"}: verifying the chain against C{settings.caFile} (or
    the platform's trust store) and the host name (service_identity).  Otherwise: no
    verification.  For implicit TLS wrap the endpoint with it::

        endpoint = wrapClientTLS(clientTLSOptions(settings, host), TCP4ClientEndpoint(...))

    @raise OSError, ValueError: the CA file cannot be read or holds no certificate.
    """
    if settings.tls in ("required", "implicit"):
        return optionsForClientTLS(hostname, trustRoot=_loadTrustRoot(settings.caFile))
    return _UnverifiedClientTLS(hostname)


def describeTLSFailure(reason: Failure) -> str:
    """Why a TLS handshake failed, in words for logs and diagnostics."""
    value = reason.value
    try:
        from service_identity import VerificationError
    except ImportError:  # pragma: no cover
        VerificationError = ()  # type: ignore[assignment,misc]
    if isinstance(value, VerificationError):
        return f"certificate host name mismatch ({value})"
    if isinstance(value, SSL.Error):
        text = str(value)
        if "certificate verify failed" in text:
            return "certificate not trusted (certificate verify failed)"
        return f"TLS error {text}"
    if isinstance(value, (ierror.ConnectionDone, ierror.ConnectionLost)):
        return "connection closed during the handshake"
    return str(value) or type(value).__name__


# The Twisted side ---------------------------------------------------------------------------


@implementer(IPullProducer)
class _BodySender:
    """Streams the message file through a L{DotStuffer}, one chunk per C{resumeProducing}."""

    def __init__(self, protocol: "SMTPClientProtocol", file: BinaryIO, chunkSize: int) -> None:
        self.protocol = protocol
        self.file = file
        self.chunkSize = chunkSize
        self.stuffer = DotStuffer()
        self.done = False
        self.registered = False

    def start(self) -> None:
        self.registered = True
        self.protocol.transport.registerProducer(self, False)

    def resumeProducing(self) -> None:
        if self.done:
            return
        protocol = self.protocol
        try:
            chunk = self.file.read(self.chunkSize)
            data = self.stuffer.feed(chunk) if chunk else self.stuffer.finish()
        except OSError as e:
            self.stop()
            protocol._bodyFailed("4.3.0", f"X-mailrelay; cannot read the message file: "
                                          f"{e.strerror or e}")
            return
        except BareNewlineError:
            self.stop()
            protocol._bodyFailed("4.3.0", "X-mailrelay; the message file contains a bare CR "
                                          "or LF (corrupt queue file); message not sent")
            return
        if data:
            protocol.transport.write(data)
        protocol._touchTimer()
        if not chunk:
            self.stop()
            protocol._bodySent()

    def pauseProducing(self) -> None:  # pragma: no cover - pull producer
        pass

    def stopProducing(self) -> None:
        self.stop(unregister=False)

    def stop(self, unregister: bool = True) -> None:
        if self.done:
            return
        self.done = True
        self.file.close()
        if self.registered and unregister:
            self.registered = False
            try:
                self.protocol.transport.unregisterProducer()
            except RuntimeError:  # pragma: no cover - already unregistered
                pass


@implementer(IHandshakeListener)
class SMTPClientProtocol(Protocol):
    """Drives a L{ClientSession} over a transport.  Use L{connectSMTP}."""

    def __init__(self, reactor: Any, settings: ClientSettings, tlsHostname: str,
                 remoteMTA: str, ready: Deferred | None = None) -> None:
        self.reactor = reactor
        self.settings = settings
        self.tlsHostname = tlsHostname
        self.session = ClientSession(settings, remoteMTA)
        self.connection = SMTPConnection(self)
        self.ready = ready
        self.host = tlsHostname
        self.lost = False
        self._timer: Any = None
        self._delay: float | None = None
        self._sending: Deferred | None = None
        self._file: BinaryIO | None = None
        self._body: _BodySender | None = None
        self._queueID: str | None = None
        self._quitWaiters: list[Deferred] = []

    # Protocol ---------------------------------------------------------------------------------

    def connectionMade(self) -> None:
        _noDelay(self.transport)
        address = getattr(self.transport.getPeer(), "host", None)
        self.host = f"{self.tlsHostname}[{address}]" if address else self.tlsHostname
        self._handle(self.session.connectionMade(self.host))

    def dataReceived(self, data: bytes) -> None:
        self._handle(self.session.dataReceived(data))

    def handshakeCompleted(self) -> None:
        self._handle(self.session.tlsStarted())

    def connectionLost(self, reason: Failure = None) -> None:  # type: ignore[assignment]
        self.lost = True
        self._cancelTimer()
        if self._body is not None:
            self._body.stop(unregister=False)
            self._body = None
        why = describeTLSFailure(reason) if reason is not None else "connection lost"
        self._handle(self.session.connectionLost(why))
        self._closeFile()
        waiters, self._quitWaiters = self._quitWaiters, []
        for d in waiters:
            d.callback(None)

    # Events -----------------------------------------------------------------------------------

    def _handle(self, events: list[object]) -> None:
        queue = deque(events)
        fire: list[tuple[Deferred, Any]] = []
        while queue:
            event = queue.popleft()
            if isinstance(event, Write):
                if not self.lost:
                    self.transport.write(event.data)
            elif isinstance(event, SetTimer):
                self._setTimer(event.seconds)
            elif isinstance(event, StartTLS):
                queue.extend(self._startTLS())
            elif isinstance(event, SendBody):
                self._startBody()
            elif isinstance(event, TransactionDone):
                self._stopBody()
                self._closeFile()
                d, self._sending = self._sending, None
                if d is not None:
                    fire.append((d, event.results))
            elif isinstance(event, Ready):
                log.info("connected to {host}: tls={tls} auth={auth} extensions={extensions}",
                         host=self.host, tls=self.session.tls,
                         auth=self.session.authenticated,
                         extensions=" ".join(sorted(self.session.extensions)), queueID=None)
                if self.ready is not None and not self.ready.called:
                    fire.append((self.ready, self.connection))
            elif isinstance(event, ConnectFailed):
                error = event.error
                log.warn("connection to {host} failed: {diagnostic}", host=self.host,
                         diagnostic=error.diagnostic, code=error.code, queueID=None)
                if self.ready is not None and not self.ready.called:
                    fire.append((self.ready, Failure(error)))
            elif isinstance(event, Close):
                self._stopBody()
                self._cancelTimer()
                if not self.lost:
                    if event.abort:
                        self.transport.abortConnection()
                    else:
                        self.transport.loseConnection()
        for d, result in fire:
            if isinstance(result, Failure):
                d.errback(result)
            else:
                d.callback(result)

    def _setTimer(self, seconds: float | None) -> None:
        self._cancelTimer()
        self._delay = seconds
        if seconds is not None and not self.lost:
            self._timer = self.reactor.callLater(seconds, self._timedOut)

    def _touchTimer(self) -> None:
        if self._timer is not None and self._timer.active() and self._delay is not None:
            self._timer.reset(self._delay)

    def _cancelTimer(self) -> None:
        if self._timer is not None and self._timer.active():
            self._timer.cancel()
        self._timer = None

    def _timedOut(self) -> None:
        self._timer = None
        log.info("timeout with {host} while {what}", host=self.host,
                 what=self.session.waitingFor(), queueID=self._queueID)
        self._handle(self.session.timedOut())

    def _startTLS(self) -> list[object]:
        try:
            options = clientTLSOptions(self.settings, self.tlsHostname)
            self.transport.startTLS(options)
        except Exception as e:
            log.error("cannot start TLS with {host}: {error}", host=self.host, error=str(e),
                      queueID=None)
            return self.session.tlsFailed(str(e))
        return []

    # Body -------------------------------------------------------------------------------------

    def _startBody(self) -> None:
        assert self._file is not None
        self._body = _BodySender(self, self._file, CHUNK_SIZE)
        self._file = None
        self._body.start()

    def _stopBody(self) -> None:
        body, self._body = self._body, None
        if body is not None:
            body.stop(unregister=not self.lost)

    def _closeFile(self) -> None:
        f, self._file = self._file, None
        if f is not None:
            f.close()

    def _bodySent(self) -> None:
        self._body = None
        self._handle(self.session.bodySent())

    def _bodyFailed(self, code: str, diagnostic: str) -> None:
        self._body = None
        log.error("{queueID}: {diagnostic}", queueID=self._queueID, diagnostic=diagnostic)
        self._handle(self.session.bodyFailed(code, diagnostic))

    # Transactions -----------------------------------------------------------------------------

    def _send(self, envelope: Envelope, recipients: Sequence[Recipient],
              messagePath: Path) -> Deferred:
        recipients = list(recipients)
        if self._sending is not None:
            log.error("{queueID}: send() called while a transaction is in progress",
                      queueID=envelope.queueID)
            return succeed([RecipientResult(
                r.address, DeliveryStatus.TRANSIENT, "4.3.0",
                "X-mailrelay; internal error: connection busy", self.session.remoteMTA)
                for r in recipients])
        size = 0
        if recipients and self.session.idle:
            try:
                self._file = open(messagePath, "rb")
                size = os.fstat(self._file.fileno()).st_size
            except OSError as e:
                self._closeFile()
                log.error("{queueID}: cannot open {path}: {error}", queueID=envelope.queueID,
                          path=str(messagePath), error=str(e))
                return succeed([RecipientResult(
                    r.address, DeliveryStatus.TRANSIENT, "4.3.0",
                    f"X-mailrelay; cannot open the message file: {e.strerror or e}",
                    self.session.remoteMTA) for r in recipients])
        d: Deferred = Deferred()
        self._sending = d
        self._queueID = envelope.queueID
        self._handle(self.session.send(envelope, recipients, size))
        return d


class SMTPConnection:
    """A set-up connection to a next hop, ready for transactions one at a time.

    @ivar remoteMTA: RFC 3464 Remote-MTA (C{"dns; mx.example.org"}).
    @ivar extensions: the server's EHLO keywords (upper case) to their parameters.
    @ivar tls: the connection is encrypted.
    @ivar authenticated: AUTH succeeded.
    @ivar host: the server for logs (C{"mx.example.org[192.0.2.1]"}).
    """

    def __init__(self, protocol: SMTPClientProtocol) -> None:
        self._protocol = protocol

    @property
    def remoteMTA(self) -> str:
        return self._protocol.session.remoteMTA or ""

    @property
    def extensions(self) -> dict[str, str]:
        return self._protocol.session.extensions

    @property
    def tls(self) -> bool:
        return self._protocol.session.tls

    @property
    def authenticated(self) -> bool:
        return self._protocol.session.authenticated

    @property
    def host(self) -> str:
        return self._protocol.host

    @property
    def usable(self) -> bool:
        """Open, idle and without error: it may carry another transaction."""
        return self._protocol.session.idle and not self._protocol.lost

    def send(self, envelope: Envelope, recipients: Sequence[Recipient],
             messagePath: Path) -> Deferred:
        """Deliver the message at C{messagePath} to C{recipients} in one transaction.

        Fires with one L{RecipientResult} per recipient, in order; never fails.  Refusals,
        lost connections and timeouts are TRANSIENT or PERMANENT results (transport trouble:
        TRANSIENT 4.4.2 saying what was being waited for).  Without PIPELINING commands go one
        at a time.  The file is read with L{CHUNK_SIZE} reads as the connection takes data.
        After a transaction that left state on the server, the next one starts with RSET.
        """
        return self._protocol._send(envelope, recipients, messagePath)

    def quit(self) -> Deferred:
        """Send QUIT, wait for the reply (C{quit} timeout), close.  Fires with C{None} once the
        connection is closed; never fails.  A transaction in progress is aborted."""
        protocol = self._protocol
        if protocol.lost:
            return succeed(None)
        d: Deferred = Deferred()
        protocol._quitWaiters.append(d)
        protocol._handle(protocol.session.quit())
        return d

    def abort(self) -> None:
        """Close at once; a transaction in progress ends with TRANSIENT results."""
        protocol = self._protocol
        if protocol.lost:
            return
        if protocol.session.closed:  # closing already (QUIT sent): do not wait
            protocol._cancelTimer()
            protocol.transport.abortConnection()
        else:
            protocol._handle(protocol.session.abort())


class _SMTPClientFactory(Factory):
    noisy = False  # no "Starting factory" log line per connection
    def __init__(self, reactor: Any, settings: ClientSettings, tlsHostname: str,
                 remoteMTA: str, ready: Deferred) -> None:
        self.reactor = reactor
        self.settings = settings
        self.tlsHostname = tlsHostname
        self.remoteMTA = remoteMTA
        self.ready = ready
        self.protocolInstance: SMTPClientProtocol | None = None

    def buildProtocol(self, addr: Any) -> SMTPClientProtocol:
        p = SMTPClientProtocol(self.reactor, self.settings, self.tlsHostname, self.remoteMTA,
                               self.ready)
        p.factory = self
        self.protocolInstance = p
        return p


def connectSMTP(reactor: Any, endpoint: Any, settings: ClientSettings, *, tlsHostname: str,
                remoteMTA: str | None = None) -> Deferred:
    """Connect to an SMTP or LMTP server and set the connection up.

    Reads the greeting (220), sends EHLO (HELO when EHLO gets 5xx; LHLO for LMTP), STARTTLS per
    C{settings.tls} and EHLO again, then AUTH when C{settings.username} is set.

    @param reactor: provides C{IReactorTime}; all timeouts use it.
    @param endpoint: an C{IStreamClientEndpoint}; for C{tls="implicit"} already TLS-wrapped
        (L{clientTLSOptions}).
    @param tlsHostname: the server's host name: certificate verification and SNI use it, and
        so do diagnostics.
    @param remoteMTA: RFC 3464 Remote-MTA for results; default C{"dns; " + tlsHostname}.
    @return: a Deferred firing with an L{SMTPConnection}, or failing with L{SMTPConnectError}
        (C{CancelledError} if cancelled; cancelling aborts the connection).  C{timeouts.connect}
        covers the endpoint's connect only; with implicit TLS the handshake falls under
        C{timeouts.greeting}.
    """
    remoteMTA = remoteMTA or f"dns; {tlsHostname}"
    state: dict[str, Any] = {"connecting": None, "timedOut": False, "cancelled": False}

    def cancel(d: Deferred) -> None:
        # The Deferred then fails with CancelledError.
        state["cancelled"] = True
        connecting = state["connecting"]
        protocol = factory.protocolInstance
        if protocol is not None:
            protocol.ready = None
            if not protocol.lost:
                protocol.connection.abort()
        elif connecting is not None and not connecting.called:
            connecting.cancel()

    ready: Deferred = Deferred(cancel)
    factory = _SMTPClientFactory(reactor, settings, tlsHostname, remoteMTA, ready)

    def timedOut() -> None:
        state["timedOut"] = True
        state["connecting"].cancel()

    timer = reactor.callLater(settings.timeouts.connect, timedOut)

    def connected(protocol: Any) -> None:
        if timer.active():
            timer.cancel()

    def failed(failure: Failure) -> None:
        if timer.active():
            timer.cancel()
        value = failure.value
        if state["cancelled"] or ready.called:
            return  # cancelled by our caller
        if state["timedOut"]:
            why = f"connection to {tlsHostname} timed out"
        elif isinstance(value, ierror.ConnectionRefusedError):
            why = f"connection refused by {tlsHostname}"
        elif isinstance(value, ierror.DNSLookupError):
            why = f"host {tlsHostname} not found"
        elif isinstance(value, (CancelledError, ierror.ConnectingCancelledError)):
            why = f"connecting to {tlsHostname} was cancelled"
        else:
            why = f"cannot connect to {tlsHostname}: {value}"
        log.info("{why}", why=why, host=tlsHostname, queueID=None)
        ready.errback(SMTPConnectError("4.4.1", f"X-mailrelay; {why}", remoteMTA=remoteMTA))

    connecting = endpoint.connect(factory)
    state["connecting"] = connecting
    connecting.addCallbacks(connected, failed)
    return ready
