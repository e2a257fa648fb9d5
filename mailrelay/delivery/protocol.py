"""The delivery client on Twisted: L{SMTPClientProtocol} drives the sans-IO
L{mailrelay.smtp.client.ClientSession} over a transport (writes, timers, STARTTLS, the
body); L{mailrelay.delivery.connection.connectSMTP} builds it.

Message bodies are streamed from the spool file in L{CHUNK_SIZE} pieces through a pull
producer (L{_BodySender}), so memory stays bounded whatever the message size.  Dot-stuffing
(L{mailrelay.smtp.wire.DotStuffer}) is exact across chunk boundaries; a file holding a bare CR
or LF is not sent (see L{mailrelay.smtp.client}), unless its line ends were checked when it was
spooled (see L{mailrelay.delivery.connection.SMTPConnection.send}): then it is streamed with
dot-stuffing only.  To a server offering CHUNKING, each piece
read is one BDAT chunk (L{mailrelay.smtp.wire.BDATFramer}), sent as it is.
"""

from __future__ import annotations

import os
from collections import deque
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, BinaryIO

from twisted.internet.address import UNIXAddress
from twisted.internet.defer import Deferred, succeed
from twisted.internet.interfaces import (
    IConsumer,
    IHandshakeListener,
    IPullProducer,
    ITLSTransport,
)
from twisted.internet.protocol import Protocol
from twisted.logger import Logger
from twisted.python.failure import Failure
from zope.interface import implementer

from mailrelay.delivery.tls import clientTLSOptions, describeTLSFailure
from mailrelay.envelope import Envelope, Recipient
from mailrelay.interfaces import DeliveryStatus, RecipientResult
from mailrelay.smtp.client import (
    ClientSession,
    Close,
    ConnectFailed,
    Ready,
    ReplyCut,
    SendBody,
    SetTimer,
    StartTLS,
    StopBody,
    TransactionDone,
    Write,
)
from mailrelay.smtp.clientsettings import ClientSettings
from mailrelay.smtp.errors import BareNewlineError, SizeMismatchError
from mailrelay.smtp.wire import BDATFramer, DotStuffer, describeTLS, setNoDelay, writeNow

if TYPE_CHECKING:
    from mailrelay.delivery.connection import SMTPConnection

log = Logger()

#: Bytes read from the message file per write while sending a body.
CHUNK_SIZE = 65536


class IClientTransport(ITLSTransport, IConsumer):
    """What the client needs of its transport: a TCP connection it can abort, STARTTLS, and
    a consumer for the body's producer (TCP and TLS transports provide all three)."""


@implementer(IPullProducer)
class _BodySender:
    """Streams the message file through a L{DotStuffer} (DATA), or a L{BDATFramer} when
    C{framer} is given (BDAT), one chunk per C{resumeProducing}."""

    def __init__(self, protocol: SMTPClientProtocol, file: BinaryIO, chunkSize: int,
                 framer: BDATFramer | None = None, checkLineEnds: bool = True,
                 size: int | None = None) -> None:
        """
        @param size: the file's size when the body started (DATA): a file that turns out
            shorter or longer (truncated or changed by hand) is not ended with the dot, as
            BDAT's C{framer} refuses it too.
        """
        self.protocol = protocol
        self.file = file
        self.chunkSize = chunkSize
        self.stuffer = DotStuffer(checkLineEnds=checkLineEnds)
        self.framer = framer
        self.size = size
        self.read = 0
        self.done = False
        self.registered = False

    def start(self) -> None:
        self.registered = True
        self.protocol.transport.registerProducer(self, False)

    def resumeProducing(self) -> None:
        if self.done:
            return
        protocol = self.protocol
        framer = self.framer
        chunks: list[bool] = []
        try:
            chunk = self.file.read(self.chunkSize)
            if framer is not None:
                data, chunks = framer.feed(chunk) if chunk else framer.finish()
            else:
                self.read += len(chunk)
                if self.size is not None and (self.read > self.size
                                              or not chunk and self.read != self.size):
                    raise SizeMismatchError(f"{self.read} octets read, {self.size} expected")
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
        except SizeMismatchError as e:
            self.stop()
            protocol._bodyFailed("4.3.0", f"X-mailrelay; the message file changed while it was "
                                          f"sent ({e}); message not sent")
            return
        if data:
            protocol.transport.write(data)
        protocol._touchTimer()
        for last in chunks:
            if self.done:  # the session stopped the body
                return
            protocol._chunkSent(last)
        if not chunk and not self.done:
            self.stop()
            if framer is None:
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
    """Drives a L{ClientSession} over a transport.  Use L{connectSMTP
    <mailrelay.delivery.connection.connectSMTP>}, which also gives it its L{connection}.

    @ivar connection: the L{SMTPConnection} the ready Deferred fires with.
    """

    connection: SMTPConnection
    transport: IClientTransport

    def __init__(self, reactor: Any, settings: ClientSettings, tlsHostname: str,
                 remoteMTA: str, ready: Deferred | None = None) -> None:
        self.reactor = reactor
        self.settings = settings
        self.tlsHostname = tlsHostname
        self.session = ClientSession(settings, remoteMTA)
        self.ready = ready
        self.host = tlsHostname
        #: The server as the log's C{relay=} says it: C{host[address]:port}.
        self.relay = tlsHostname
        #: The TLS of the connection, for the log (L{SMTPConnection.tlsDescription}).
        self.tlsDescription: str | None = None
        self.lost = False
        self._timer: Any = None
        self._delay: float | None = None
        self._sending: Deferred | None = None
        self._file: BinaryIO | None = None
        self._body: _BodySender | None = None
        self._queueID: str | None = None
        self._lineEndsChecked = False
        self._quitWaiters: list[Deferred] = []

    # Protocol ---------------------------------------------------------------------------------

    def connectionMade(self) -> None:
        setNoDelay(self.transport)
        peer = self.transport.getPeer()
        address = getattr(peer, "host", None)
        if address is None and isinstance(peer, UNIXAddress) and peer.name:
            # An LMTP server's socket: named by its path, as Postfix's relay=host[/path].
            name = peer.name
            address = name.decode("utf-8", "replace") if isinstance(name, bytes) else name
        self.host = f"{self.tlsHostname}[{address}]" if address else self.tlsHostname
        port = getattr(peer, "port", None)
        self.relay = f"{self.host}:{port}" if address and port else self.host
        self._handle(self.session.connectionMade(self.host, address))

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
                    writeNow(self.transport, event.data)
            elif isinstance(event, SetTimer):
                self._setTimer(event.seconds)
            elif isinstance(event, StartTLS):
                queue.extend(self._startTLS())
            elif isinstance(event, SendBody):
                self._startBody(event)
            elif isinstance(event, StopBody):
                self._stopBody()
            elif isinstance(event, TransactionDone):
                self._stopBody()
                self._closeFile()
                d, self._sending = self._sending, None
                if d is not None:
                    fire.append((d, event.results))
            elif isinstance(event, Ready):
                if self.session.tls:
                    self._logTLS()
                log.info("connected to {host}: tls={tls} auth={auth} extensions={extensions}",
                         host=self.relay, tls=self.session.tls,
                         auth=self.session.authenticated,
                         extensions=" ".join(sorted(self.session.extensions)), queueID=None)
                if self.ready is not None and not self.ready.called:
                    fire.append((self.ready, self.connection))
            elif isinstance(event, ReplyCut):
                log.warn("{host}: reply cut ({what}): {start}...", host=self.relay,
                         what=event.what, start=event.start, queueID=self._queueID)
            elif isinstance(event, ConnectFailed):
                error = event.error
                if error.remoteMTA is not None:  # (a server's status: it is named)
                    error.relay = self.relay
                log.warn("connection to {host} failed: {diagnostic}", host=self.host,
                         diagnostic=error.described, code=error.code, queueID=None)
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

    def _logTLS(self) -> None:
        """Postfix's line: C{Verified TLS connection established to mx.example.org[192.0.2.1]:25:
        TLSv1.3 with cipher TLS_AES_256_GCM_SHA384} (C{Untrusted} when the certificate is not
        checked: C{tls = "may"}, or a server whose DANE TLSA records are all unusable)."""
        getHandle = getattr(self.transport, "getHandle", None)
        described = (describeTLS(getHandle()) if getHandle is not None else None) or "TLS"
        verified = self.settings.verifiesTLS
        marker = "verified" if verified else "unverified"
        if verified and self.settings.tlsa is not None:
            marker = "dane-verified"  # (by its DANE TLSA records, RFC 7672)
        self.tlsDescription = f"{described} {marker}"
        version, _, cipher = described.partition(" ")
        log.info(
            "{trust} TLS connection established to {relay}: {version}{cipher}",
            trust="Verified" if verified else "Untrusted",
            relay=self.relay,
            version=version,
            cipher=f" with cipher {cipher}" if cipher else "",
            queueID=None,
        )

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

    def _startBody(self, event: SendBody) -> None:
        assert self._file is not None
        framer = None
        check = not self._lineEndsChecked
        size = os.fstat(self._file.fileno()).st_size
        if event.bdat:
            framer = BDATFramer(size, pipelined=event.pipelined,
                                checkLineEnds=event.checkLineEnds and check)
        self._body = _BodySender(self, self._file, CHUNK_SIZE, framer, checkLineEnds=check,
                                 size=size)
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

    def _chunkSent(self, last: bool) -> None:
        if last:
            body, self._body = self._body, None
            if body is not None:
                body.stop(unregister=not self.lost)
        self._handle(self.session.chunkSent(last))

    def _bodyFailed(self, code: str, diagnostic: str) -> None:
        self._body = None
        log.error("{queueID}: {diagnostic}", queueID=self._queueID, diagnostic=diagnostic)
        self._handle(self.session.bodyFailed(code, diagnostic))

    # Transactions -----------------------------------------------------------------------------

    def _send(self, envelope: Envelope, recipients: Sequence[Recipient],
              messagePath: Path, lineEndsChecked: bool = False) -> Deferred:
        recipients = list(recipients)
        if self._sending is not None:
            log.error("{queueID}: send() called while a transaction is in progress",
                      queueID=envelope.queueID)
            return succeed([RecipientResult(
                r.address, DeliveryStatus.TRANSIENT, "4.3.0",
                "X-mailrelay; internal error: connection busy") for r in recipients])
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
                    f"X-mailrelay; cannot open the message file: {e.strerror or e}")
                    for r in recipients])
        d: Deferred = Deferred()
        self._sending = d
        self._queueID = envelope.queueID
        self._lineEndsChecked = lineEndsChecked
        self._handle(self.session.send(envelope, recipients, size))
        return d
