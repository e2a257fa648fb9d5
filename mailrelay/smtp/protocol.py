"""The Twisted side of the ESMTP server: a thin Protocol driving L{ServerSession}.

The protocol moves bytes, runs the timers, and answers the session's questions with the policy
(relay control and recipient validators), the header stampers and the spool.  It pauses reading
while a question is pending, so a client pipelining ahead cannot make us buffer without bound.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Sequence

from twisted.internet.defer import Deferred, succeed
from twisted.internet.interfaces import IAddress
from twisted.internet.protocol import Factory, Protocol
from twisted.logger import Logger
from twisted.python.failure import Failure

from mailrelay.envelope import ClientInfo, Envelope
from mailrelay.interfaces import ACCEPT, StampContext, Verdict, VerdictKind
from mailrelay.policy import RecipientPolicy
from mailrelay.smtp import replies as R
from mailrelay.smtp.replies import Reply
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
from mailrelay.stamping import HeaderProcessor, runStampers

log = Logger()

NO_SPACE_VERDICT = Verdict(VerdictKind.DEFER, R.NO_SPACE)


@dataclass
class ListenerContext:
    """Everything the sessions of one listener share.

    @ivar spool: a L{mailrelay.spool.Spool}.
    @ivar stampers: the configured L{IHeaderStamper} providers, in order.
    @ivar resolver: an C{IResolver} for reverse lookups, or C{None} to skip them.
    """

    settings: SessionSettings
    policy: RecipientPolicy
    spool: Any
    stampers: Sequence[Any]
    clock: Any
    listenerName: str = ""
    listenerOptions: dict[str, Any] = field(default_factory=dict)
    idleTimeout: float = 300.0
    dataTimeout: float = 300.0
    maxHops: int = 50
    resolver: Any = None
    reverseLookupTimeout: float = 10.0
    #: Called with the queue id of each message once it is durably queued (the queue manager
    #: picks it up without rescanning the spool).
    onQueued: Any = None


class SMTPServerProtocol(Protocol):
    """One inbound SMTP connection."""

    def __init__(self, context: ListenerContext) -> None:
        self.context = context
        self.session: ServerSession | None = None
        self._timer: Any = None
        self._writer: Any = None
        self._headers: HeaderProcessor | None = None
        self._paused = False
        self._lookup: Deferred | None = None

    # Connection life cycle ------------------------------------------------------------------

    def connectionMade(self) -> None:
        ctx = self.context
        peer = self.transport.getPeer()
        host = getattr(peer, "host", str(peer))
        client = ClientInfo(
            address=host,
            port=getattr(peer, "port", 0),
            relayAllowed=ctx.policy.relay.isRelayClient(host),
            listener=ctx.listenerName,
        )
        self.session = ServerSession(ctx.settings, client)
        log.info(
            "connect from {client}:{port} on {listener} relay={relay}",
            client=client.address,
            port=client.port,
            listener=ctx.listenerName,
            relay=client.relayAllowed,
        )
        if ctx.resolver is not None:
            from mailrelay.rdns import reverseLookup

            self._lookup = reverseLookup(
                ctx.resolver, client.address, ctx.reverseLookupTimeout, ctx.clock
            )
            self._lookup.addCallback(self._gotReverseName)
        self._handle(self.session.greeting())
        self._resetTimer()

    def _gotReverseName(self, name: str | None) -> None:
        self._lookup = None
        if self.session is not None:
            self.session.client.rdns = name

    def dataReceived(self, data: bytes) -> None:
        if self.session is None:
            return
        self._handle(self.session.dataReceived(data))
        self._resetTimer()

    def connectionLost(self, reason: Failure = None) -> None:  # type: ignore[assignment]
        self._cancelTimer()
        if self._lookup is not None:
            self._lookup.cancel()
        session = self.session
        if session is None:
            return
        wasOpen = not session.closed
        self._handle(session.connectionLost())
        log.info(
            "disconnect from {client} messages={messages} errors={errors}{how}",
            client=session.client.address,
            messages=session.messages,
            errors=session.errors,
            how=" (client closed the connection)" if wasOpen else "",
        )

    # Timers ---------------------------------------------------------------------------------

    def _resetTimer(self) -> None:
        session = self.session
        if session is None or session.closed:
            return
        timeout = self.context.dataTimeout if session.inData else self.context.idleTimeout
        if self._timer is not None and self._timer.active():
            self._timer.reset(timeout)
        else:
            self._timer = self.context.clock.callLater(timeout, self._timedOut)

    def _cancelTimer(self) -> None:
        if self._timer is not None and self._timer.active():
            self._timer.cancel()
        self._timer = None

    def _timedOut(self) -> None:
        self._timer = None
        if self.session is None:
            return
        log.info(
            "timeout {what} from {client}",
            what="in DATA" if self.session.inData else "waiting for a command",
            client=self.session.client.address,
        )
        self._handle(self.session.timedOut())

    # Events ---------------------------------------------------------------------------------

    def _handle(self, events: list[object]) -> None:
        """Carry out the session's events.  Answers available at once are fed back in a loop,
        not by recursion, so a long pipelined batch does not deepen the stack."""
        session = self.session
        while events:
            out: list[bytes] = []
            question = None
            for event in events:
                if isinstance(event, BodyData):
                    if self._headers is not None:
                        self._headers.write(event.data)
                elif isinstance(event, Reply):
                    out.append(event.toBytes())
                elif isinstance(event, Close):
                    self._flush(out)
                    self._cancelTimer()
                    self.transport.loseConnection()
                elif isinstance(event, AbortData):
                    self._abortMessage()
                else:
                    question = event
            self._flush(out)
            if question is None or session is None:
                return
            d = self._ask(question)
            box: list[object] = []
            d.addCallback(box.append)
            if not box:
                self._pause()
                d.addCallback(lambda _: self._answer(box[0]))
                return
            if session.closed:
                return
            events = session.answer(box[0])

    def _flush(self, out: list[bytes]) -> None:
        if out:
            self.transport.write(b"".join(out))
            out.clear()

    def _ask(self, question: object) -> Deferred:
        if isinstance(question, CheckMail):
            d = self._checkMail(question.envelope)
        elif isinstance(question, CheckRecipient):
            assert self.session is not None
            d = self.context.policy.check(
                self.session.client, question.envelope, question.recipient, question.mailbox
            )
        elif isinstance(question, StartData):
            d = succeed(self._startData(question.envelope))
        elif isinstance(question, EndOfData):
            d = self._endOfData(question)
        else:  # pragma: no cover - a new question type without a handler
            raise TypeError(f"unknown session event {question!r}")
        return d.addErrback(self._questionFailed, question)

    def _questionFailed(self, failure: Failure, question: object) -> Reply | Verdict:
        log.failure("error handling {question}", failure, question=type(question).__name__)
        if isinstance(question, (CheckMail, CheckRecipient)):
            return Verdict(VerdictKind.DEFER, Reply(451, "4.3.0", "Error: local error, try again later"))
        return R.LOCAL_ERROR

    def _answer(self, result: object) -> None:
        session = self.session
        self._resume()
        if session is None or session.closed:
            return
        self._handle(session.answer(result))
        self._resetTimer()

    def _pause(self) -> None:
        if not self._paused:
            self._paused = True
            self.transport.pauseProducing()

    def _resume(self) -> None:
        if self._paused:
            self._paused = False
            self.transport.resumeProducing()

    # Answers --------------------------------------------------------------------------------

    def _checkMail(self, envelope: Envelope) -> Deferred:
        needed = envelope.size or 0
        return succeed(ACCEPT if self.context.spool.hasFreeSpace(needed) else NO_SPACE_VERDICT)

    def _startData(self, envelope: Envelope) -> Reply | None:
        from mailrelay.spool import SpoolError, newQueueID

        queueID = newQueueID()
        try:
            self._writer = self.context.spool.openMessage(queueID)
        except SpoolError as e:
            log.error("cannot create queue file: {error}", error=str(e))
            return R.LOCAL_ERROR
        envelope.queueID = queueID
        now = self.context.clock.seconds()

        def stamp(headers: list[tuple[str, bytes]]) -> Any:
            context = StampContext(
                hostname=self.context.settings.hostname,
                client=envelope.client or self.session.client,  # type: ignore[union-attr]
                envelope=envelope,
                headers=headers,
                listenerOptions=self.context.listenerOptions,
                now=now,
            )
            return runStampers(self.context.stampers, context)

        self._headers = HeaderProcessor(self._writer.write, stamp)
        return None

    def _abortMessage(self) -> None:
        if self._writer is not None:
            log.info("{queueID}: message not completed, dropped", queueID=self._writer.queueID)
            self._writer.abort()
        self._writer = None
        self._headers = None

    def _endOfData(self, question: EndOfData) -> Deferred:
        envelope = question.envelope
        writer, headers = self._writer, self._headers
        self._writer = self._headers = None
        error = question.error
        if error is None and headers is not None:
            try:
                headers.finish()
            except Exception:
                log.failure("{queueID}: header stamping failed", queueID=envelope.queueID)
                error = R.LOCAL_ERROR
            else:
                hops = headers.count("Received")
                if hops > self.context.maxHops:
                    error = R.TOO_MANY_HOPS
        if error is not None or writer is None:
            if writer is not None:
                writer.abort()
            reply = error or R.LOCAL_ERROR
            self._logResult(envelope, question.size, reply)
            return succeed(reply)
        envelope.arrival = self.context.clock.seconds()
        envelope.messageSize = writer.size
        commit = writer.commit(envelope)

        def committed(_: object) -> Reply:
            reply = Reply(250, "2.0.0", f"Ok: queued as {envelope.queueID}")
            self._logResult(envelope, writer.size, reply)
            if self.context.onQueued is not None:
                try:
                    self.context.onQueued(envelope.queueID)
                except Exception:
                    log.failure("{queueID}: queue manager refused the new entry", queueID=envelope.queueID)
            return reply

        def failed(failure: Failure) -> Reply:
            log.error(
                "{queueID}: spool commit failed: {error}",
                queueID=envelope.queueID,
                error=failure.getErrorMessage(),
            )
            self._logResult(envelope, writer.size, R.LOCAL_ERROR)
            return R.LOCAL_ERROR

        commit.addCallbacks(committed, failed)
        return commit

    def _logResult(self, envelope: Envelope, size: int, reply: Reply) -> None:
        log.info(
            "{queueID}: from=<{sender}> nrcpt={nrcpt} size={size} client={client} result={result}",
            queueID=envelope.queueID,
            sender=envelope.sender,
            nrcpt=len(envelope.recipients),
            size=size,
            client=envelope.client.address if envelope.client else "",
            result=str(reply),
            accepted=reply.isPositive,
        )


class SMTPServerFactory(Factory):
    """Builds L{SMTPServerProtocol}s for one listener."""

    protocol = SMTPServerProtocol

    def __init__(self, context: ListenerContext) -> None:
        self.context = context

    def buildProtocol(self, addr: IAddress) -> SMTPServerProtocol:
        p = SMTPServerProtocol(self.context)
        p.factory = self
        return p
