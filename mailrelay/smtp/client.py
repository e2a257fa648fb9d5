"""The ESMTP/LMTP client session that delivers messages to the next hop, sans-IO.

L{ClientSession} is a state machine.  It takes the bytes the server sent and the driver's
notices (connection made, TLS handshake done, body sent, timer expired, connection lost) and
returns a list of events: bytes to write (L{Write}), timer changes (L{SetTimer}), requests
(L{StartTLS}, L{SendBody}, L{StopBody}, L{Close}) and outcomes (L{Ready}, L{ConnectFailed},
L{TransactionDone}).  It never touches a socket, a clock or the disk.  Its pure helpers
(strict reply parsing, chunk-wise dot-stuffing) are in L{mailrelay.smtp.wire}, its settings in
L{mailrelay.smtp.clientsettings}, its errors in L{mailrelay.smtp.errors}.
L{mailrelay.delivery.protocol.SMTPClientProtocol} drives it over a connection, and
L{mailrelay.delivery.connection.connectSMTP} connects an endpoint and fires with a ready
L{mailrelay.delivery.connection.SMTPConnection}, the object delivery backends use.

Choices worth knowing (see also L{mailrelay.delivery.connection.SMTPConnection.send}):

  - A spool file holding a bare CR or LF is corrupt: it is never sent (nor silently
    "repaired"); the connection is aborted before the final dot, so the server drops the
    partial message, and the accepted recipients fail TRANSIENT 4.3.0 with a diagnostic
    saying so.
  - With PIPELINING, MAIL, every RCPT and DATA go out in one write (RFC 2920).  If DATA is
    answered 354 although no recipient was accepted, the client does not send the RFC 2920
    "empty message" (a lone "."): it aborts the connection, which cannot deliver anything.
  - CHUNKING (RFC 3030): when the server offers it, the message goes in BDAT chunks instead
    of DATA (no dot-stuffing), once the RCPT replies show a recipient accepted (MAIL and the
    RCPTs still go in one write with PIPELINING).  With PIPELINING the chunks follow each
    other without waiting for their replies; without, the whole message is one chunk.  A
    chunk refused (4xx/5xx) ends the transaction with that reply: no further chunk is sent,
    the replies still due are read, and the next transaction starts with RSET.  BINARYMIME
    content (C{BODY=BINARYMIME}) goes only to a server offering CHUNKING and BINARYMIME
    (converting it for others is the caller's: L{mailrelay.delivery.mime}).
  - STARTTLS: bytes the server sends after its 220 reply, before the handshake, abort the
    connection (response injection, CVE-2011-0411).  After the handshake the earlier EHLO
    extensions are forgotten and EHLO is sent again.  With C{tls="may"} a server that does not
    offer STARTTLS, or refuses it, is used in plaintext; a failed handshake is an error
    (L{SMTPConnectError} 4.7.5, transient) and is not retried in plaintext here.
  - A 421 that comes while no command is due (with the EHLO reply, or while idle) closes
    the connection, and is the answer the next transaction gets, as Postfix reads it as
    the reply to its next command; a 421 to STARTTLS ends the set-up, also under
    C{tls="may"} (the server is closing: RFC 5321 section 3.8).
  - Credentials are never sent on a connection without TLS unless
    L{ClientSettings.authWithoutTLS} is set.
  - REQUIRETLS (RFC 8689): a message whose envelope says C{requireTLS} goes only over TLS
    with a verified certificate to a server offering REQUIRETLS (MAIL then carries the
    REQUIRETLS parameter); otherwise it is refused at once, permanently, with 5.7.30 (the
    caller chooses the verified TLS policy and the next hops: L{mailrelay.delivery}).
"""

from __future__ import annotations

import base64
from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass, field

from mailrelay.address import xtextEncode
from mailrelay.envelope import Envelope, Recipient
from mailrelay.interfaces import DeliveryStatus, RecipientResult
from mailrelay.smtp.clientsettings import ClientSettings
from mailrelay.smtp.errors import ProtocolError, SMTPConnectError
from mailrelay.smtp.replies import Reply
from mailrelay.smtp.wire import (
    MAX_DIAGNOSTIC,
    ReplyParser,
    asciiName,
    orcptValue,
    parseExtensions,
    printable,
    replyDiagnostic,
    statusOf,
)

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
class ReplyCut:
    """The server sent a reply too long to keep whole: C{what} was cut of it (see
    L{ReplyParser <mailrelay.smtp.wire.ReplyParser>}), C{start} is its first words.  Log
    it, naming the server (Postfix's smtp_chat_resp(): "response longer than N")."""

    what: str
    start: str


@dataclass(frozen=True, slots=True)
class SendBody:
    """DATA was accepted: stream the message body (L{DotStuffer}), write the terminator, then
    call L{ClientSession.bodySent} (or L{ClientSession.bodyFailed}).  Restart the timer with
    the same delay after each write.

    With C{bdat}: the recipients are accepted and the server offers CHUNKING: stream the body
    in BDAT chunks (L{BDATFramer <mailrelay.smtp.wire.BDATFramer>} with C{pipelined} and
    C{checkLineEnds}) and call L{ClientSession.chunkSent} for each chunk written whole
    (instead of C{bodySent}), until the last or a L{StopBody}."""

    bdat: bool = False
    pipelined: bool = False
    checkLineEnds: bool = True


@dataclass(frozen=True, slots=True)
class StopBody:
    """Stop sending the body (a BDAT chunk was refused); the transaction's end follows."""


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
_MAIL, _RCPT, _DATA, _DOT, _BDAT = "mail", "rcpt", "data", "dot", "bdat"
#: How the log names the command a reply answered, as Postfix does (C{(in reply to RCPT TO
#: command)}); the last BDAT chunk's reply is the end of data's.
_COMMAND_NAMES = {_MAIL: "MAIL FROM", _RCPT: "RCPT TO", _DATA: "DATA", _DOT: "end of DATA",
                  _BDAT: "BDAT"}

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
    _BDAT: ("dataBlock", "sending BDAT"),
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
    chunking: bool = False
    chunkRefused: bool = False



def needsSMTPUTF8(envelope: Envelope, recipients: Sequence[Recipient]) -> bool:
    """Whether an SMTPUTF8 message must go with SMTPUTF8: a UTF-8 sender or recipient, or a
    UTF-8 header field (or one not known: L{Envelope.utf8Header}).  Else a server without
    SMTPUTF8 takes it without, as Postfix sends it (DELIVERY_REQUIRES_SMTPUTF8)."""
    return (not envelope.sender.isascii() or envelope.utf8Header is not False
            or not all(r.address.isascii() for r in recipients))

class ClientSession:
    """One SMTP/LMTP client connection (sans-IO).

    @ivar extensions: the EHLO keywords (upper case) and their parameters.
    @ivar tls: the connection is encrypted.
    @ivar tlsSessionFailed: the connection was lost or timed out while TLS was up and a
        step was under way (Postfix's "TLS session failure"): the transaction's recipients
        were deferred for it, and C{tls = "may"} may send them again without TLS.
    @ivar broke: the connection was lost or timed out while a step was under way (with or
        without TLS): the server stopped answering, as opposed to refusing.
    @ivar authenticated: AUTH succeeded.
    @ivar state: the current step (C{"idle"} when a transaction may start).
    """

    def __init__(self, settings: ClientSettings, remoteMTA: str | None = None) -> None:
        self.settings = settings
        self.remoteMTA = remoteMTA
        self.host = "the server"
        self.address: str | None = None
        self.extensions: dict[str, str] = {}
        self.tls = False
        self.tlsSessionFailed = False
        self.broke = False
        self.authenticated = False
        self.state = _GREETING
        self._parser = ReplyParser()
        self._out: list[object] = []
        self._transaction: _Transaction | None = None
        self._expect: deque[tuple[str, int]] = deque()
        #: In a transaction, the step whose reply is being handled (or was handled last):
        #: the step when no reply is expected any more.
        self._answered = _MAIL
        self._needRset = False
        #: The server has sent a reply (its greeting at least).
        self._heard = False
        #: The 421 with which the server closed the connection while no command was due
        #: (with its EHLO reply, or after a transaction): the next transaction's answer.
        self._closing: Reply | None = None

    # Driver API -------------------------------------------------------------------------------

    @property
    def idle(self) -> bool:
        return self.state == _IDLE

    @property
    def closed(self) -> bool:
        return self.state == _CLOSED

    @property
    def verifiedTLS(self) -> bool:
        """The connection is TLS with the server's certificate verified (C{tls="required"}
        or C{"implicit"}): what REQUIRETLS (RFC 8689) needs."""
        return self.tls and self.settings.verifiesTLS

    @property
    def step(self) -> str:
        """What the session is doing or waiting for (a key of the step table).  Once the
        whole message is sent (a reply to its end is due), it is the end of data, whatever
        reply comes first (pipelined BDAT chunks): the server may have the message."""
        if self.state == _TRANSACTION:
            if not self._expect:
                return self._answered
            return _DOT if self._expect[-1][0] == _DOT else self._expect[0][0]
        return self.state

    def waitingFor(self) -> str:
        """Human words for L{step}: C{"sending RCPT TO"}."""
        what = _STEPS[self.step][1]
        return what.replace("EHLO", "LHLO") if self.settings.lmtp else what

    def connectionMade(self, host: str, address: str | None = None) -> list[object]:
        """The connection is up; C{host} names the server in diagnostics
        (C{"mx.example.org[192.0.2.1]"}), C{address} is its address (C{"192.0.2.1"}),
        recorded with the statuses it gives (L{RecipientResult.remoteAddress})."""
        self._out = []
        self.host = host
        self.address = address
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
                if self._parser.cut:
                    head = (str(reply.code), reply.enhanced, reply.text[:30])
                    start = printable(" ".join(filter(None, head)))[:30]
                    self._out.append(ReplyCut(self._parser.cut, start))
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
            self.tlsSessionFailed = True
            self._connectFailed("4.7.5", f"X-mailrelay; cannot start TLS with {self.host}: {why}",
                                byServer=False)
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
            if self._closing is not None:
                # Postfix reads such a 421 as the reply to its next command (smtp_proto.c:
                # "host X said: 421 ..."): the server's status and words, not ours.
                status, code = statusOf(self._closing)
                diagnostic = replyDiagnostic(self._closing)
                self._out.append(TransactionDone(
                    [self._result(r, status, code, diagnostic) for r in recipients]))
                return self._out
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
        elif (envelope.smtputf8 and "SMTPUTF8" not in self.extensions
              and needsSMTPUTF8(envelope, recipients)):
            refusal = ("5.6.7", f"X-mailrelay; the message needs SMTPUTF8, which {self.host} "
                                "does not support")
        elif envelope.body == "BINARYMIME" and not self._binaryOK():
            refusal = ("5.6.3", f"X-mailrelay; the message is binary (BINARYMIME), which "
                                f"{self.host} does not support")
        elif envelope.requireTLS and not self.verifiedTLS:
            refusal = ("5.7.30", f"X-mailrelay; the message requires TLS (REQUIRETLS), but the "
                                 f"connection to {self.host} is not TLS with a verified "
                                 "certificate")
        elif envelope.requireTLS and "REQUIRETLS" not in self.extensions:
            refusal = ("5.7.30", f"X-mailrelay; REQUIRETLS support required, but {self.host} "
                                 "does not offer REQUIRETLS")
        if refusal is not None:
            self._out.append(TransactionDone(
                [self._result(r, DeliveryStatus.PERMANENT, *refusal, byServer=False)
                 for r in recipients]))
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
        if self.state == _BODY and t is not None and not t.chunking:
            self._awaitEnd(t)
        return self._out

    def chunkSent(self, last: bool) -> list[object]:
        """One whole BDAT chunk (command and data) has been written; C{last}: it was the
        C{LAST} one."""
        self._out = []
        t = self._transaction
        if self.state == _BODY and t is not None and t.chunking:
            if last:
                self._awaitEnd(t)
            else:
                self._expect.append((_BDAT, 0))
        return self._out

    def _awaitEnd(self, t: _Transaction) -> None:
        """The whole message is sent: wait for the reply to its end (LMTP: one per recipient
        accepted)."""
        self.state = _TRANSACTION
        count = len(t.accepted) if self.settings.lmtp else 1
        self._expect.extend((_DOT, k) for k in range(count))
        self._armTimer()

    def bodyFailed(self, code: str, diagnostic: str) -> list[object]:
        """The body could not be sent (unreadable or corrupt file): abort the transaction.
        The relay's own failure: no Remote-MTA (Postfix's DSN_BY_LOCAL_MTA)."""
        self._out = []
        if self.state == _BODY:
            self._failPending(code, diagnostic, byServer=False)
            self._finish(close="abort")
        return self._out

    def timedOut(self) -> list[object]:
        """The timer of the current step expired."""
        self._out = []
        if self.state == _QUIT:
            self._close(abort=True)
        elif self.state not in (_CLOSED, _IDLE):
            self._noteTLSFailure()
            self._fail("4.4.2", f"X-mailrelay; conversation with {self.host} timed out while "
                                f"{self.waitingFor()}", byServer=False)
        return self._out

    def quit(self) -> list[object]:
        """Say goodbye (when idle) or abort (when busy)."""
        self._out = []
        if self.state == _IDLE:
            self._write(b"QUIT\r\n")
            self._wait(_QUIT)
        elif self.state not in (_CLOSED, _QUIT):
            self._fail("4.4.2", f"X-mailrelay; connection with {self.host} closed by us while "
                                f"{self.waitingFor()}", byServer=False)
        return self._out

    def abort(self) -> list[object]:
        """Close at once; a transaction in progress fails (transient)."""
        self._out = []
        if self.state != _CLOSED:
            self._fail("4.4.2", f"X-mailrelay; connection with {self.host} aborted while "
                                f"{self.waitingFor()}", byServer=False)
        return self._out

    def connectionLost(self, why: str = "connection lost") -> list[object]:
        """The connection is gone; C{why} says how (for TLS failures: which verification
        failed)."""
        self._out = []
        state = self.state
        if state == _CLOSED:
            return self._out
        if state not in (_IDLE, _QUIT):
            self._noteTLSFailure()
        if state == _HANDSHAKE or (state == _GREETING and self.settings.tls == "implicit"
                                   and not self.tls):
            self._connectFailed("4.7.5", f"X-mailrelay; TLS handshake with {self.host} failed: "
                                         f"{why}", close=False, byServer=False)
        elif state in _CONNECTING:
            self._connectFailed("4.4.2", f"X-mailrelay; lost connection with {self.host} while "
                                         f"{self.waitingFor()}", close=False, byServer=False)
        elif self._transaction is not None:
            self._failPending("4.4.2", f"X-mailrelay; lost connection with {self.host} while "
                                       f"{self.waitingFor()}", byServer=False)
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

    def _noteTLSFailure(self) -> None:
        """The connection is lost or timed out in a step: a TLS failure if TLS was up or
        being set up (see L{tlsSessionFailed}); in any case it L{broke}."""
        self.tlsSessionFailed = self.tls or self.state == _HANDSHAKE
        self.broke = True

    def _setClosed(self) -> None:
        if self.state != _CLOSED:
            self.state = _CLOSED
            self._out.append(SetTimer(None))
        self._expect.clear()

    def _close(self, abort: bool) -> None:
        self._setClosed()
        self._out.append(Close(abort))

    def _result(self, recipient: Recipient, status: DeliveryStatus, code: str,
                diagnostic: str, command: str | None = None,
                byServer: bool = True) -> RecipientResult:
        """C{recipient}'s result; C{byServer}: the status is the server's (its reply),
        named as the Remote-MTA; else ours alone, which names none (RFC 3464 section
        2.3.5): the connection broke (lost, timed out, closed by us: Postfix's dsb_simple()
        in smtp_stream_except()), or the relay decided of the server itself (over its SIZE,
        no STARTTLS, no AUTH, a loop...: Postfix's DSN_BY_LOCAL_MTA)."""
        # NOTIFY went with the RCPT when the peer offers DSN: a success notice is then the
        # peer's to send (RFC 3461 5.2.2), not ours.  An LMTP server is the mailbox: what it
        # accepts is delivered, not relayed.
        delivered = status is DeliveryStatus.DELIVERED
        relayed = delivered and recipient.notify is not None and "DSN" in self.extensions
        return RecipientResult(recipient.address, status, code, diagnostic[:MAX_DIAGNOSTIC],
                               self.remoteMTA if byServer else None, dsnRelayed=relayed,
                               final=delivered and self.settings.lmtp, command=command,
                               remoteAddress=self.address if byServer else None)

    def _fromReply(self, recipient: Recipient, reply: Reply, kind: str) -> RecipientResult:
        """The result of C{recipient} that C{reply}, to the command of C{kind}, gives."""
        status, code = statusOf(reply)
        return self._result(recipient, status, code, replyDiagnostic(reply), _COMMAND_NAMES[kind])

    def _fail(self, code: str, diagnostic: str, byServer: bool = True) -> None:
        """Give up on the connection: report, then abort it (C{byServer}: see L{_result})."""
        if self.state in _CONNECTING:
            self._connectFailed(code, diagnostic, byServer=byServer)
        elif self._transaction is not None:
            self._failPending(code, diagnostic, byServer)
            self._finish(close="abort")
        else:
            self._close(abort=True)

    def _protocolError(self, detail: str) -> None:
        self._fail("4.4.2", f"X-mailrelay; protocol error: {detail} (from {self.host} while "
                            f"{self.waitingFor()})")

    def _injection(self) -> None:
        self._connectFailed("4.7.0", f"X-mailrelay; response injection after STARTTLS from "
                                     f"{self.host}", byServer=False)

    def _onReply(self, reply: Reply) -> None:
        self._heard = True
        getattr(self, "_reply_" + self.state.replace("-", "_"))(reply)

    # Connection set-up ------------------------------------------------------------------------

    def _connectFailed(self, code: str, diagnostic: str, permanent: bool = False,
                       quit: bool = False, close: bool = True, loop: bool = False,
                       command: str | None = None, byServer: bool = True,
                       refusedTLS: bool = False) -> None:
        # A server that never answered (refused, silent) gave no status, nor one whose
        # connection broke (byServer False: see _result): no Remote-MTA (RFC 3464 section
        # 2.3.5; Postfix's dsb_simple() for connect and I/O errors).
        remoteMTA = self.remoteMTA if self._heard and byServer else None
        error = SMTPConnectError(code, printable(diagnostic)[:MAX_DIAGNOSTIC], permanent,
                                 remoteMTA, tlsFailure=self.tlsSessionFailed, loop=loop,
                                 refusedSetup=(self.state in (_EHLO, _HELO) and not loop
                                               or refusedTLS),
                                 command=command, refusedTLS=refusedTLS,
                                 remoteAddress=self.address if remoteMTA else None)
        self._out.append(ConnectFailed(error))
        if close:
            if quit:
                self._write(b"QUIT\r\n")
            self._close(abort=not quit)
        else:
            self._setClosed()

    def _connectFailedReply(self, reply: Reply, permanentCode: str | None = None,
                            refusedTLS: bool = False) -> None:
        if reply.code // 100 not in (4, 5):
            self._protocolError(f"unexpected reply {replyDiagnostic(reply)[6:]}")
            return
        _status, code = statusOf(reply)
        permanent = reply.code >= 500
        if permanent and permanentCode and not reply.enhanced.startswith("5."):
            code = permanentCode
        self._connectFailed(code, replyDiagnostic(reply), permanent=permanent, quit=True,
                            command=self._setupCommand(), refusedTLS=refusedTLS)

    def _setupCommand(self) -> str | None:
        """The command of the connection set-up whose reply is awaited (C{None}: the
        greeting)."""
        if self.state in (_AUTH, _AUTH_USER, _AUTH_PASS):
            return "AUTH"
        if self.state == _HELO:
            return "HELO"
        if self.state == _STARTTLS:
            return "STARTTLS"
        if self.state == _EHLO:
            return "LHLO" if self.settings.lmtp else "EHLO"
        return None

    def _reply_greeting(self, reply: Reply) -> None:
        if reply.code == 220:
            if self.settings.tls == "implicit":
                self.tls = True  # only the TLS layer can have delivered it
            self._sendHello()
        else:
            self._connectFailedReply(reply)

    def _sendHello(self) -> None:
        verb = b"LHLO" if self.settings.lmtp else b"EHLO"
        self._write(verb + b" " + asciiName(self.settings.heloName) + b"\r\n")
        self._wait(_EHLO)

    def _reply_ehlo(self, reply: Reply) -> None:
        if reply.code // 100 == 2:
            if self._isSelf(reply, "EHLO"):
                return
            self.extensions = parseExtensions(reply)
            if "SMTPUTF8" in self.extensions:
                # RFC 6531 section 3.1: a server offering SMTPUTF8 implements 8BITMIME; one
                # that does not say so is taken at its word for SMTPUTF8, as by Postfix's
                # smtp ("offers SMTPUTF8 support, but not 8BITMIME", smtp_proto.c).
                self.extensions.setdefault("8BITMIME", "")
            self._afterHello()
        elif reply.code != 421 and not self.settings.lmtp:
            # Any other refusal means no ESMTP here, a 4xx too: HELO (Postfix's smtp_helo()
            # clears SMTP_FEATURE_ESMTP for any non-2xx reply but 421).
            self._write(b"HELO " + asciiName(self.settings.heloName) + b"\r\n")
            self._wait(_HELO)
        else:
            self._connectFailedReply(reply)

    def _reply_helo(self, reply: Reply) -> None:
        if reply.code // 100 == 2:
            if self._isSelf(reply, "HELO"):
                return
            self.extensions = {}
            self._afterHello()
        else:
            self._connectFailedReply(reply)

    def _isSelf(self, reply: Reply, verb: str) -> bool:
        """Whether the server answered C{verb} with our own name: it is the relay itself, a
        mail loop (Postfix's smtp: 'replied to HELO/EHLO with my own hostname').  Not for
        LMTP, whose server is commonly on this host and named as it is."""
        if self.settings.lmtp:
            return False
        words = reply.text.split("\n", 1)[0].split()
        ours = self.settings.heloName.lower().rstrip(".")
        if not words or words[0].lower().rstrip(".") != ours:
            return False
        self._connectFailed("5.4.6", f"X-mailrelay; {self.host} replied to {verb} with my own "
                                     f"hostname {self.settings.heloName}",
                            permanent=True, quit=True, loop=True, byServer=False)
        return True

    def _afterHello(self) -> None:
        if not self.tls and self.settings.tls in ("may", "required"):
            if "STARTTLS" in self.extensions:
                self._write(b"STARTTLS\r\n")
                self._wait(_STARTTLS)
                return
            if self.settings.tls == "required":
                self._connectFailed("4.7.4", f"X-mailrelay; TLS is required, but {self.host} "
                                             "does not offer STARTTLS", quit=True, byServer=False)
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
        elif reply.code == 421:
            # The server is closing the connection (RFC 5321 section 3.8), under "may" too:
            # there is no going on without TLS, and its reply says why.
            self._connectFailedReply(reply)
        elif self.settings.tls == "required":
            # The server's reply and status, as Postfix's smtp_site_fail() "TLS is required,
            # but host %s refused to start TLS" (smtp_proto.c).
            self._connectFailedReply(reply, refusedTLS=True)
        else:
            self._afterTLS()  # "may": carry on without TLS, on this connection (as Postfix)

    def _afterTLS(self) -> None:
        settings = self.settings
        if settings.username is None:
            self._ready()
            return
        if not self.tls and not settings.authWithoutTLS:
            self._connectFailed("4.7.0", f"X-mailrelay; not sending credentials to {self.host} "
                                         "on a connection without TLS", quit=True, byServer=False)
            return
        if "AUTH" not in self.extensions:
            self._connectFailed("4.7.0", f"X-mailrelay; credentials configured, but {self.host} "
                                         "does not offer AUTH", quit=True, byServer=False)
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
                                quit=True, byServer=False)

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
            self._closing = reply
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
        elif envelope.body == "BINARYMIME" and self._binaryOK():
            params.append("BODY=BINARYMIME")
        if envelope.requireTLS:
            params.append("REQUIRETLS")
        if envelope.smtputf8 and "SMTPUTF8" in ext:
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
            params.append("ORCPT=" + orcptValue(recipient, t.envelope.smtputf8))
        line = f"RCPT TO:<{recipient.address}>" + "".join(" " + p for p in params)
        return line.encode("utf-8") + b"\r\n"

    def _startMail(self) -> None:
        t = self._transaction
        assert t is not None
        t.pipelined = "PIPELINING" in self.extensions
        t.chunking = "CHUNKING" in self.extensions
        self.state = _TRANSACTION
        if t.pipelined:
            commands = [self._mailCommand(t)]
            commands += [self._rcptCommand(t, r) for r in t.recipients]
            if not t.chunking:
                commands.append(b"DATA\r\n")
            self._write(b"".join(commands))
            self._expect.append((_MAIL, 0))
            self._expect.extend((_RCPT, i) for i in range(len(t.recipients)))
            if not t.chunking:
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
            kind = self._expect[0][0] if self._expect else _DOT
            for i, r in enumerate(t.recipients):
                if t.results[i] is None:
                    t.results[i] = self._fromReply(r, reply, kind)
            self._finish(close="close")
            return
        if not self._expect:  # pragma: no cover - defensive
            raise ProtocolError(f"unexpected reply {replyDiagnostic(reply)[6:]}")
        kind, index = self._expect.popleft()
        self._answered = kind
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
            t.results = [self._fromReply(r, reply, _MAIL) for r in t.recipients]
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
                t.results[index] = self._fromReply(t.recipients[index], reply, _RCPT)
        if t.pipelined and not t.chunking:
            return  # DATA's reply decides
        if index + 1 < len(t.recipients):
            if not t.pipelined:
                self._write(self._rcptCommand(t, t.recipients[index + 1]))
                self._expect.append((_RCPT, index + 1))
        elif t.accepted and t.chunking:
            self.state = _BODY
            self._armTimer()
            self._out.append(SendBody(bdat=True, pipelined=t.pipelined,
                                      checkLineEnds=t.envelope.body != "BINARYMIME"))
        elif t.accepted:
            self._write(b"DATA\r\n")
            self._expect.append((_DATA, 0))
        else:
            self._needRset = t.mailOK
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
                t.results[i] = self._fromReply(t.recipients[i], reply, _DATA)
            self._needRset = t.mailOK
            self._finish()
        else:
            self._unexpected("DATA", reply)

    def _reply_body(self, reply: Reply) -> None:
        t = self._transaction
        assert t is not None
        if t.chunking:  # the reply to a BDAT chunk sent
            self._reply_transaction(reply)
            return
        # The server answered before the end of the message: it refuses it.
        if reply.code // 100 in (4, 5):
            for i in t.accepted:
                t.results[i] = self._fromReply(t.recipients[i], reply, _DOT)
            self._finish(close="abort")
        else:
            self._unexpected("the message body", reply)

    def _on_bdat(self, t: _Transaction, reply: Reply, _index: int) -> None:
        """The reply to a BDAT chunk other than the last."""
        cls = reply.code // 100
        if cls not in (2, 4, 5):
            self._unexpected("BDAT", reply)
            return
        if cls != 2 and not t.chunkRefused:
            # The first refusal is the transaction's answer (RFC 3030 section 4.2): no more
            # chunks; the replies still due are read, then RSET starts the next one.
            t.chunkRefused = True
            for i in t.accepted:
                t.results[i] = self._fromReply(t.recipients[i], reply, _BDAT)
            if self.state == _BODY:
                self.state = _TRANSACTION
                self._out.append(StopBody())
        self._chunksDone(t)

    def _chunksDone(self, t: _Transaction) -> None:
        """After a chunk was refused: end the transaction once no reply is due."""
        if t.chunkRefused and not self._expect and self.state == _TRANSACTION:
            self._needRset = True
            self._finish()

    def _on_dot(self, t: _Transaction, reply: Reply, index: int) -> None:
        if reply.code // 100 not in (2, 4, 5):
            self._unexpected("end of data", reply)
            return
        if t.chunkRefused:  # an earlier chunk was refused: its reply stands
            self._chunksDone(t)
            return
        targets = [t.accepted[index]] if self.settings.lmtp else t.accepted
        for i in targets:
            t.results[i] = self._fromReply(t.recipients[i], reply, _DOT)
        if not self._expect:
            self._needRset = False
            self._finish()

    def _binaryOK(self) -> bool:
        """Whether BINARYMIME content may go to this server (RFC 3030: with BDAT only)."""
        return "BINARYMIME" in self.extensions and "CHUNKING" in self.extensions

    def _failPending(self, code: str, diagnostic: str, byServer: bool = True) -> None:
        t = self._transaction
        if t is None:
            return
        for i, r in enumerate(t.recipients):
            if t.results[i] is None:
                t.results[i] = self._result(r, DeliveryStatus.TRANSIENT, code, diagnostic,
                                            byServer=byServer)

    def _finish(self, close: str | None = None) -> None:
        """End the transaction.  C{close}: C{None} (stay open), C{"abort"}, C{"close"} (after
        pending writes), C{"quit"} (same, after a QUIT already written), C{"lost"} (already
        gone)."""
        t = self._transaction
        assert t is not None
        self._transaction = None
        self._expect.clear()
        self._failPending("4.4.2", f"X-mailrelay; internal error with {self.host}",
                          byServer=False)  # defensive
        results = [r for r in t.results if r is not None]
        if close is None:
            self.state = _IDLE
            self._out.append(SetTimer(None))
        elif close == "lost":
            self._setClosed()
        else:
            self._close(abort=close == "abort")
        self._out.append(TransactionDone(results))

