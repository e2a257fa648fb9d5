"""The Twisted side of the ESMTP server: a thin Protocol driving L{ServerSession}.

The protocol moves bytes, runs the timers, and answers the session's questions with the
policies (the site's chains at connect, HELO and DATA, L{mailrelay.policy.sender.SenderPolicy}
at MAIL, relay control and recipient validators at RCPT), the intake
(L{mailrelay.interfaces.IIntake}: the message's way into the spool) and, for AUTH, the
L{mailrelay.receive.auth.AuthPolicy}.  It pauses reading while a question is pending, so a
client pipelining ahead cannot make us buffer without bound.

TLS: on L{StartTLS} the protocol writes the 220 reply in plaintext and calls
C{transport.startTLS}; on an implicit TLS listener the factory is wrapped in a
C{TLSMemoryBIOFactory}, and so it is by Twisted's C{ssl:} endpoint (whatever the listener's
C{tls_mode}): a session on such a transport is on implicit TLS from the first byte.  Either
way the transport calls L{SMTPServerProtocol.handshakeCompleted} (C{IHandshakeListener}),
which records the TLS version and cipher in C{client.tls}.

Backpressure: the protocol is the streaming producer of its own transport, so a client that
pipelines commands and does not read the replies makes the transport's write buffer full,
which pauses the reading of further commands until the replies are sent; a session whose
output stays blocked past the idle timeout is closed (aborted: nothing can be sent to it).
Reading is paused for that and for a pending question independently.

Abuse limits (L{mailrelay.receive.limits.ListenerLimits}): a new connection is counted first;
one over a limit gets a 421 instead of the greeting.  The greeting waits C{greetPause} seconds
when set (input before it is early talk: 554, see L{mailrelay.smtp.server}).  The session ends
with 421 after C{maxSessionTime} seconds whatever the client does, and in DATA (or a BDAT
chunk) a client must keep up C{minDataRate} bytes per second on average: each chunk received
extends its deadline by C{len(chunk) / minDataRate} seconds, never beyond C{dataTimeout} from
now (Postfix's C{smtpd_min_data_rate}).
"""

from __future__ import annotations

import socket
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from twisted.internet.defer import CancelledError, Deferred, gatherResults, succeed
from twisted.internet.interfaces import IAddress, IHandshakeListener, IPushProducer, IReactorTime
from twisted.internet.protocol import Factory, Protocol
from twisted.logger import Logger
from twisted.protocols.tls import TLSMemoryBIOProtocol
from twisted.python.failure import Failure
from zope.interface import implementer

from mailrelay.address import hostPort, unmappedAddress
from mailrelay.envelope import ClientInfo, Envelope
from mailrelay.interfaces import IIntake, Verdict, VerdictKind
from mailrelay.metrics import CONNECTIONS, REFUSALS, SESSIONS, child, replyClass
from mailrelay.policy.chain import RecipientPolicy
from mailrelay.policy.hooks import SessionHooks
from mailrelay.receive.proxy import isUnattributed
from mailrelay.receive.tls import describeTLS
from mailrelay.smtp import replies as R
from mailrelay.smtp.replies import Reply
from mailrelay.smtp.server import (
    AbortData,
    Authenticate,
    BodyData,
    CheckHelo,
    CheckMail,
    CheckRecipient,
    Close,
    Closing,
    EndOfData,
    ExtensionCommand,
    HeloWithSpaces,
    Pause,
    Refused,
    ServerSession,
    SessionSettings,
    StartData,
    StartTLS,
    SyncError,
)
from mailrelay.smtp.wire import setNoDelay, writeNow

if TYPE_CHECKING:  # pragma: no cover
    from mailrelay.receive.auth import AuthPolicy
    from mailrelay.receive.limits import ListenerLimits
    from mailrelay.receive.listener import ListenerSettings

log = Logger()

#: The verdict on a MAIL or RCPT command whose check failed unexpectedly.
QUESTION_FAILED = Verdict(
    VerdictKind.DEFER, Reply(451, "4.3.0", "Error: local error, try again later")
)
#: The address a client on a UNIX-domain socket is known by (as Postfix's smtpd knows it).
LOCAL_CLIENT_ADDRESS = "127.0.0.1"



@dataclass
class ListenerContext:
    """Everything the sessions of one listener share (made by
    L{mailrelay.receive.listener.buildListenerFactory}).

    @ivar settings: the listener's L{mailrelay.receive.listener.ListenerSettings} (timeouts,
        TLS, its name).
    @ivar session: the L{SessionSettings} of its sans-IO sessions.
    @ivar policy: the L{RecipientPolicy} (relay control, recipient validators).
    @ivar intake: the L{mailrelay.interfaces.IIntake} messages go into the spool through.
    @ivar clock: an C{IReactorTime}.
    @ivar auth: the L{mailrelay.receive.auth.AuthPolicy} checking AUTH, or C{None} (no AUTH).
    @ivar limits: the listener's L{mailrelay.receive.limits.ListenerLimits}, or C{None}.
    @ivar resolver: an C{IResolver} for reverse lookups, or C{None} to skip them.
    @ivar sessions: the relay's L{Sessions}, for a graceful stop, or C{None}.
    @ivar hooks: the listener's L{SessionHooks}: the chains of the connect, HELO and DATA
        hooks, and its MAIL stage (C{hooks.sender}, a L{mailrelay.policy.sender.SenderPolicy}:
        the built-in sender validators, then the site's).
    """

    settings: ListenerSettings
    session: SessionSettings
    policy: RecipientPolicy
    intake: IIntake
    clock: IReactorTime
    auth: AuthPolicy | None = None
    limits: ListenerLimits | None = None
    resolver: Any = None
    sessions: Sessions | None = None
    hooks: SessionHooks = field(default_factory=SessionHooks)


def shuttingDown(hostname: str) -> Reply:
    """The reply of a stopping relay (RFC 5321 3.8: a 421 may come at any time)."""
    return Reply(421, "4.3.2", f"{hostname} Service shutting down")


class Sessions:
    """The open sessions of all of a relay's listeners, for a graceful stop: the listeners
    stop first, then L{drain} closes idle sessions at once and lets those with a message in
    hand finish it.

    @ivar live: the L{SMTPServerProtocol}s connected now.
    @ivar shuttingDown: L{drain} has begun: a session starting now is refused with 421.
    """

    def __init__(self) -> None:
        self.live: set[SMTPServerProtocol] = set()
        self.shuttingDown = False
        self._whenEmpty: list[Deferred[None]] = []
        self._whenGone: list[tuple[set[SMTPServerProtocol], Deferred[None]]] = []

    def add(self, protocol: SMTPServerProtocol) -> None:
        self.live.add(protocol)

    def whenGone(self) -> Deferred[None]:
        """A Deferred firing once every session open now has ended (those of a previous
        configuration, at a reload)."""
        if not self.live:
            return succeed(None)
        d: Deferred[None] = Deferred()
        self._whenGone.append((set(self.live), d))
        return d

    def discard(self, protocol: SMTPServerProtocol) -> None:
        self.live.discard(protocol)
        for watched, gone in list(self._whenGone):
            watched.discard(protocol)
            if not watched:
                self._whenGone.remove((watched, gone))
                gone.callback(None)
        if not self.live:
            waiting, self._whenEmpty = self._whenEmpty, []
            for d in waiting:
                d.callback(None)

    def drain(self, clock: Any, drainTime: float) -> Deferred[None]:
        """Close every session as soon as it has no message in hand; after C{drainTime}
        seconds abandon the messages still being received, and a few seconds later drop
        connections still open (a client that does not read its 421).  Fires when no session
        is left."""
        self.shuttingDown = True
        for protocol in list(self.live):
            protocol.shutdown()
        if not self.live:
            return succeed(None)
        log.info(
            "relay stopping: {count} session(s) open; messages in progress have {drain:g}s "
            "to finish",
            count=len(self.live),
            drain=drainTime,
        )
        done: Deferred[None] = Deferred()
        self._whenEmpty.append(done)

        def cutShort() -> None:
            for protocol in list(self.live):
                protocol.cutShort()
            timers.append(clock.callLater(_ABORT_AFTER, abort))

        def abort() -> None:
            for protocol in list(self.live):
                if protocol.session is None or not protocol.session.waiting:
                    protocol.transport.abortConnection()

        timers = [clock.callLater(drainTime, cutShort)]

        def finished(result: None) -> None:
            for timer in timers:
                if timer.active():
                    timer.cancel()
            return result

        return done.addCallback(finished)


#: What L{SMTPServerProtocol._askNow} returns for an answer still to come.
_LATER = object()
#: Seconds after the drain time when connections still open are aborted.
_ABORT_AFTER = 5.0
#: Seconds a TLS connection the relay closes has before it is cut off: for an implicit-TLS
#: client refused at connect, to finish its handshake and get the 421 over TLS (RFC 8314);
#: then for our close_notify to go out.  Twisted's TLS waits for the client's close_notify
#: before it closes, which a client that says nothing more never sends: it held the
#: connection (and its slot) until idle_timeout.  Postfix closes after a one-way shutdown.
_TLS_CLOSE_GRACE = 5.0
#: The session's questions (L{SMTPServerProtocol._handle} asks the answer of any other event
#: it does not know); by exact type, for a dispatch without a chain of isinstance calls.
_QUESTIONS = frozenset({
    CheckMail, CheckRecipient, CheckHelo, StartData, EndOfData, ExtensionCommand, Authenticate,
})
#: Seconds a client whose message was answered while the relay stops has to say QUIT.
_QUIT_GRACE = 1.0


class _ReadTimer:
    """The time a client has to send: its next command (C{idleTimeout}) or, in DATA, the rest
    of its message (C{dataTimeout}; with C{minDataRate}, a deadline that each chunk received
    moves C{len(chunk) / minDataRate} seconds later, never beyond C{dataTimeout} from now).
    One C{IDelayedCall}, restarted as data comes.

    @ivar lastReceived: when the client last sent something.
    """

    def __init__(self, settings: ListenerSettings, clock: Any, expired: Callable[[], None]) -> None:
        self.settings = settings
        self.clock = clock
        self.expired = expired
        self.lastReceived = 0.0
        #: In DATA with C{minDataRate}: when the client's time runs out.
        self.dataDeadline: float | None = None
        self._call: Any = None
        #: The time C{_call} was set for (when it differs now, the clock was stepped and
        #: the call moved with it: L{mailrelay.app.clocksteps}).
        self._callTime = 0.0

    def received(self, size: int, inData: bool) -> None:
        """The client sent C{size} octets (C{inData}: of a message)."""
        self.lastReceived = self.clock.seconds()
        if inData and self.dataDeadline is not None:
            self.dataDeadline += size / self.settings.minDataRate

    def extend(self, seconds: float) -> None:
        """The client's DATA deadline moves C{seconds} later (a wait that was not its own)."""
        if self.dataDeadline is not None:
            self.dataDeadline += seconds

    def start(self, inData: bool) -> None:
        """(Re)start the time: waiting for a command, or for the rest of a message."""
        settings = self.settings
        if not inData:
            self.dataDeadline = None
            timeout = settings.idleTimeout
        elif settings.minDataRate > 0:
            now = self.clock.seconds()
            latest = now + settings.dataTimeout
            if self.dataDeadline is not None and self._call is not None and self._call.active():
                # The deadline moves as the pending call moved: with a step of the clock
                # (a step forward put it in the past: a timeout at the next block).
                self.dataDeadline += self._call.getTime() - self._callTime
            if self.dataDeadline is None or self.dataDeadline > latest:
                self.dataDeadline = latest
            timeout = max(self.dataDeadline - now, 0.0)
        else:
            timeout = settings.dataTimeout
        if self._call is not None and self._call.active():
            self._call.reset(timeout)
        else:
            self.after(timeout, self._expired)
        self._callTime = self._call.getTime()

    def after(self, seconds: float, call: Callable[[], object]) -> None:
        """Call C{call} in C{seconds} instead (the time of a closing connection)."""
        self.stop()
        self._call = self.clock.callLater(seconds, call)

    def stop(self) -> None:
        _cancel(self._call)
        self._call = None

    def waitingFor(self, inData: bool) -> str:
        """What the client was too slow to send, for the log."""
        if not inData:
            return "waiting for a command"
        if self.clock.seconds() - self.lastReceived < self.settings.dataTimeout:
            return f"in DATA (less than min_data_rate = {self.settings.minDataRate} bytes/s)"
        return "in DATA"

    def _expired(self) -> None:
        self._call = None
        self.expired()


@implementer(IHandshakeListener, IPushProducer)
class SMTPServerProtocol(Protocol):
    """One inbound SMTP connection."""

    #: A TCP transport (C{abortConnection}, C{startTLS}, C{registerProducer}, ...).
    transport: Any

    def __init__(self, context: ListenerContext) -> None:
        self.context = context
        self.session: ServerSession | None = None
        #: The time the client has to send (L{_ReadTimer}).
        self._timer = _ReadTimer(context.settings, context.clock, self._timedOut)
        #: The message being received (an L{mailrelay.interfaces.IIncomingMessage}).
        self._message: Any = None
        #: Why reading is paused: C{"session"} (a question pending, or before the greeting),
        #: C{"output"} (the transport's write buffer is full).
        self._pausedFor: set[str] = set()
        self._lookup: Deferred | None = None
        #: A TLS handshake is under way (implicit TLS, or after STARTTLS) and not finished.
        #: (Set at L{connectionMade} too on a transport that is TLS, as an C{ssl:} endpoint's.)
        self._handshaking = context.settings.tlsMode == "implicit"
        #: The limits' bookkeeping of this connection (L{mailrelay.receive.limits.Admission}).
        self._admission: Any = None
        self._greetTimer: Any = None
        self._deadline: Any = None
        #: The session time limit passed while a question was pending: close once answered.
        self._deadlinePassed = False
        #: The relay is stopping: close (421) as soon as no message is in hand.
        self._shuttingDown = False
        #: After a message answered while stopping: the 421 unless QUIT comes first.
        self._quitTimer: Any = None
        #: When the header stampers were called, while they have not answered.
        self._stampingSince: float | None = None
        #: The connect hook's chain at work (before the greeting).
        self._connectCheck: Deferred[Any] | None = None
        #: The last reply sent (when the relay closes the session, how it ended: L{_outcome}).
        self._lastReply: Reply | None = None
        #: During a L{Pause} (past the soft error limit): the events to carry out after it,
        #: and its timer.
        self._afterPause: list[object] | None = None
        self._pauseTimer: Any = None

    # Connection life cycle ------------------------------------------------------------------

    def connectionMade(self) -> None:
        if isinstance(self.transport, TLSMemoryBIOProtocol):
            # TLS from the first byte: an implicit TLS listener, or one on an ssl: endpoint,
            # whose TLS is the endpoint's.  The greeting waits for the handshake, which must
            # be read meanwhile (see pauseProducing).
            self._handshaking = True
        setNoDelay(self.transport)  # replies go out at once, not after the client's delayed ACK
        self.transport.registerProducer(self, True)
        ctx = self.context
        peer = self.transport.getPeer()
        host: str | None = getattr(peer, "host", None)
        # A UNIX-domain socket's client is local: as Postfix's smtpd (smtpd_peer.c,
        # smtpd_peer_assume_local_client), localhost [127.0.0.1], for relay control, the
        # limits, the logs and Received: alike.
        local = host is None
        # An IPv4 client of a listener on [::] (or proxied as ::ffff:a.b.c.d) is known by its
        # IPv4 address everywhere, as Postfix's smtpd knows it.
        address = LOCAL_CLIENT_ADDRESS if host is None else unmappedAddress(host)
        client = ClientInfo(
            address=address,
            port=getattr(peer, "port", 0),
            rdns="localhost" if local else None,
            # (A client a load balancer forwarded without naming it is not the balancer.)
            relayAllowed=ctx.policy.relay.isRelayClient(address) and not isUnattributed(peer),
            listener=ctx.settings.name,
        )
        self.session = ServerSession(ctx.session, client, awaitingGreeting=True)
        self._timer.lastReceived = ctx.clock.seconds()
        child(CONNECTIONS, client.listener).inc()
        if ctx.sessions is not None:
            ctx.sessions.add(self)
            if ctx.sessions.shuttingDown:  # accepted (or PROXY header read) as the stop began
                self._handle(self.session.closeWith(shuttingDown(ctx.session.hostname)))
                return
        _logConnect(client)
        if ctx.settings.maxSessionTime > 0:
            self._deadline = ctx.clock.callLater(ctx.settings.maxSessionTime, self._sessionExpired)
        if ctx.resolver is not None and not local:
            from mailrelay.receive.rdns import reverseLookup

            self._lookup = reverseLookup(
                ctx.resolver, client.address, ctx.settings.reverseLookupTimeout, ctx.clock
            )
            self._lookup.addCallback(self._gotReverseName)
        self._resetTimer()
        if ctx.limits is None:
            self._admitted(None)
            return
        self._admission = ctx.limits.admit(client.address)
        d = self._admission.check()
        d.addCallback(self._admitted)

        def failed(failure: Failure) -> None:
            # (A bug: the limiter's own failures are logged and not applied already.)  The
            # session goes on, as when a limit cannot be checked; it must not hang ungreeted.
            log.failure("checking the limits of {client}", failure, client=host)
            self._admitted(None)

        d.addErrback(failed)

    def _admitted(self, refusal: Any) -> None:
        """The limits answered: greet (now or after C{greetPause}), or refuse with 421."""
        session = self.session
        if session is None or session.closed:
            return
        if refusal is not None:
            log.warn(
                "connection from {client} on {listener} refused: {reason}",
                client=session.client.address,
                listener=self.context.settings.name,
                reason=refusal.reason,
            )
            self._handle(session.closeWith(refusal.reply))
            return
        if self.context.hooks.connect is not None:
            self._checkConnect()
        elif self.context.settings.greetPause > 0:
            pause = self.context.settings.greetPause
            self._greetTimer = self.context.clock.callLater(pause, self._greet)
        else:
            self._greet()

    def _checkConnect(self) -> None:
        """Run the connect hook (once the reverse lookup has answered) and wait C{greetPause}
        meanwhile; greet (or refuse) when both are done."""
        chain = self.context.hooks.connect
        assert chain is not None and self.session is not None
        client = self.session.client
        waits = [self._afterLookup(lambda: chain.run(client, subject=client.address))]
        if self.context.settings.greetPause > 0:
            paused: Deferred[None] = Deferred()
            self._greetTimer = self.context.clock.callLater(
                self.context.settings.greetPause, paused.callback, None
            )
            waits.append(paused)
        check: Deferred[Any] = gatherResults(waits, consumeErrors=True)
        self._connectCheck = check
        check.addCallback(lambda results: self._greet(results[0]))

        def failed(failure: Failure) -> None:
            if not failure.check(CancelledError):  # (cancelled: the client left)
                log.failure("checking the client {client}", failure, client=client.address)

        check.addErrback(failed)

    def _greet(self, verdict: Verdict | None = None) -> None:
        self._greetTimer = None
        self._connectCheck = None
        session = self.session
        if session is None or session.closed:
            return
        self._resume()  # input kept until the greeting (without rejectPregreet)
        refusal = None if verdict is None else _greetingRefusal(verdict, session.settings.hostname)
        self._handle(session.greeting(refusal))
        self._resetTimer()

    def _sessionExpired(self) -> None:
        self._deadline = None
        session = self.session
        if session is None or session.closed:
            return
        if session.waiting:
            # Never cut a question short (a message being committed to the spool would be
            # queued after the client was told 421): close when it is answered.
            self._deadlinePassed = True
            return
        log.info(
            "session time limit of {limit:g}s exceeded by {client}, closing",
            limit=self.context.settings.maxSessionTime,
            client=session.client.address,
        )
        host = self.context.session.hostname
        self._handle(
            session.closeWith(Reply(421, "4.4.2", f"{host} Error: session time limit exceeded"))
        )

    def shutdown(self, messageDone: bool = False) -> None:
        """The relay is stopping: say 421 and close now, or, while the client has a message
        in hand, once its end is answered (250 only once it is durable).  After that answer
        the client has a moment to say QUIT (and get its 221) before the 421; any other
        command gets the 421 at once.

        @param messageDone: the answer to the end of a message was just sent.
        """
        self._shuttingDown = True
        session = self.session
        if session is None or session.closed or session.inMessage:
            return
        if messageDone:
            _cancel(self._quitTimer)
            self._quitTimer = self.context.clock.callLater(_QUIT_GRACE, self._closeForShutdown)
        elif self._quitTimer is None:
            self._closeForShutdown()

    def _closeForShutdown(self) -> None:
        _cancel(self._quitTimer)
        self._quitTimer = None
        session = self.session
        if session is None or session.closed:
            return
        log.info("relay stopping: closing the session of {client}", client=session.client.address)
        self._handle(session.closeWith(shuttingDown(self.context.session.hostname)))

    def cutShort(self) -> None:
        """The drain time is over: abandon a message still being received (421), unless its
        commit to the spool is under way (then close when it is answered)."""
        self._shuttingDown = True
        session = self.session
        if session is None or session.closed:
            self.transport.abortConnection()
            return
        if session.waiting and not session.inData:
            return  # the answer to the end of data is coming; shutdown() runs then
        log.info(
            "relay stopping: drain time over, message from {client} abandoned",
            client=session.client.address,
        )
        self._handle(session.closeWith(shuttingDown(self.context.session.hostname)))

    def _gotReverseName(self, name: str | None) -> None:
        self._lookup = None
        if self.session is not None:
            self.session.client.rdns = name

    def dataReceived(self, data: bytes) -> None:
        session = self.session
        if session is None:
            return
        inData = session.inData
        inMessage = session.inMessage
        if self._shuttingDown and not inMessage and data[:4].upper() != b"QUIT":
            self._closeForShutdown()  # a stopping relay takes no new command but QUIT
            return
        self._handle(session.dataReceived(data))
        if self._shuttingDown:
            self.shutdown(messageDone=inMessage and not session.inMessage)
        if session.awaitingGreeting and not session.closed:
            self._pause()  # read no more before the greeting
        self._timer.received(len(data), inData)
        self._resetTimer()

    def handshakeCompleted(self) -> None:
        """C{IHandshakeListener}: the TLS handshake is done; the session starts afresh."""
        self._handshaking = False
        session = self.session
        if session is None:
            return
        description = describeTLS(self.transport.getHandle())
        log.info(
            "TLS established with {client}: {tls}",
            client=session.client.address,
            tls=description,
        )
        self._handle(session.tlsStarted(description))
        self._resetTimer()

    def connectionLost(self, reason: Failure | None = None) -> None:
        if self.context.sessions is not None:
            self.context.sessions.discard(self)
        self._timer.stop()
        for timer in (self._greetTimer, self._deadline, self._quitTimer, self._pauseTimer):
            _cancel(timer)
        self._greetTimer = self._deadline = self._pauseTimer = None
        self._afterPause = None  # (nothing more is sent; a message it held is dropped below)
        if self._connectCheck is not None:
            self._connectCheck.cancel()
        if self._admission is not None:
            self._admission.release()
        if self._lookup is not None:
            self._lookup.cancel()
        session = self.session
        if session is None:
            return
        wasOpen = not session.closed
        how = " (client closed the connection)" if wasOpen else ""
        if self._handshaking and reason is not None and wasOpen:
            # (Not when the relay closed it: a refusal, its own timeout.)
            log.info(
                "TLS handshake with {client} failed: {error}",
                client=session.client.address,
                error=reason.getErrorMessage(),
            )
            how = " (TLS handshake failed)"
        self._handle(session.connectionLost())
        # (A message whose end a pause held back was never answered: it goes too.)
        self._abortMessage()
        _logDisconnect(session, how)
        child(SESSIONS, _outcome(self._lastReply, wasOpen)).inc()

    # Timers ---------------------------------------------------------------------------------

    def _resetTimer(self) -> None:
        session = self.session
        if session is None or session.closed:
            return
        if session.inData and self._stampingSince is not None:
            self._timer.stop()  # reading is paused; the stampers' timeout bounds the wait
            return
        if session.waiting:
            # The client waits for our answer (a check, the AUTH failure delay, the commit),
            # not we for its command: each question has its own time limit, and the answer
            # starts the client's time again (_answer).
            self._timer.stop()
            return
        self._timer.start(session.inData)

    def _timedOut(self) -> None:
        if self.session is None:
            return
        if "output" in self._pausedFor:
            log.info(
                "timeout with output blocked (client not reading replies) from {client}, closing",
                client=self.session.client.address,
            )
            self.transport.abortConnection()
            return
        if self._handshaking:
            log.info("timeout in the TLS handshake with {client}",
                     client=self.session.client.address)
        else:
            what = self._timer.waitingFor(self.session.inData)
            log.info("timeout {what} from {client}", what=what,
                     client=self.session.client.address)
        self._handle(self.session.timedOut())

    # Events ---------------------------------------------------------------------------------

    def _handle(self, events: list[object]) -> None:
        """Carry out the session's events.  Answers available at once are fed back in a loop,
        not by recursion, so a long pipelined batch does not deepen the stack."""
        session = self.session
        if self._afterPause is not None:
            self._afterPause.extend(events)  # (in order, after those the pause holds)
            return
        while events:
            out: list[bytes] = []
            question = None
            for index, event in enumerate(events):
                # (The commonest events by their exact type first, without isinstance: a
                # reply at every command, a question at most; then the general chain.)
                kind = type(event)
                if kind is Reply:
                    out.append(event.toBytes())  # type: ignore[attr-defined]
                    self._lastReply = event  # type: ignore[assignment]
                    continue
                if kind in _QUESTIONS:
                    question = event
                    continue
                if isinstance(event, Pause):
                    self._flush(out)
                    self._startPause(event.seconds, events[index + 1 :])
                    return
                if isinstance(event, BodyData):
                    if self._message is not None:
                        started = self._message.write(event.data)
                        if started is not None:
                            self._stampingStarted(started)
                elif isinstance(event, Reply):
                    out.append(event.toBytes())
                    self._lastReply = event
                elif isinstance(event, Close):
                    self._flush(out)
                    self._timer.stop()
                    self.transport.unregisterProducer()
                    self.transport.loseConnection()
                    # A client that reads nothing would hold it with our unsent replies; over
                    # TLS, one that never finishes the handshake or never answers our
                    # close_notify (see _TLS_CLOSE_GRACE).
                    grace = self.context.settings.idleTimeout
                    if self._handshaking or (session is not None and session.client.tls):
                        grace = min(grace, _TLS_CLOSE_GRACE)
                    self._timer.after(grace, self.transport.abortConnection)
                elif isinstance(event, StartTLS):
                    self._flush(out)
                    self._startTLS(event)
                elif isinstance(event, AbortData):
                    self._abortMessage()
                elif isinstance(event, Closing):
                    log.info(
                        "{reason} from {client}{detail}, closing",
                        reason=event.reason,
                        client=session.client.address,  # type: ignore[union-attr]
                        detail=event.detail,
                    )
                elif isinstance(event, SyncError):
                    _logSyncError(session.client, event)  # type: ignore[union-attr]
                elif isinstance(event, Refused):
                    _logRefusal(session.client, event)  # type: ignore[union-attr]
                elif isinstance(event, HeloWithSpaces):
                    log.info(
                        "{client}: {verb} argument with spaces accepted: {helo!r}",
                        client=session.client.address,  # type: ignore[union-attr]
                        verb=event.verb,
                        helo=event.name,
                    )
                else:
                    question = event
            self._flush(out)
            if question is None or session is None:
                return
            answer = self._askNow(question)
            if answer is _LATER or session.closed:
                return
            events = session.answer(answer)

    def _startPause(self, seconds: float, rest: list[object]) -> None:
        """Carry out C{rest} in C{seconds}, reading nothing meanwhile (Postfix's
        smtpd_error_sleep_time, without blocking the other sessions)."""
        self._afterPause = rest
        self._pause("errors")
        self._pauseTimer = self.context.clock.callLater(seconds, self._endPause)

    def _endPause(self) -> None:
        events, self._afterPause, self._pauseTimer = self._afterPause or [], None, None
        self._resume("errors")
        self._handle(events)
        self._resetTimer()

    def _askNow(self, question: object) -> object:
        """The answer to C{question} when it is there at once; else read no more until it
        comes (then L{_answer}) and return L{_LATER}."""
        box: list[object] = []
        d = self._ask(question).addCallback(box.append)
        if box:
            return box[0]
        self._pause()
        d.addCallback(lambda _: self._answer(box[0], question))
        return _LATER

    def _flush(self, out: list[bytes]) -> None:
        if out:
            writeNow(self.transport, b"".join(out))
            out.clear()

    def _ask(self, question: object) -> Deferred:
        d: Deferred[Any]
        if isinstance(question, CheckMail):
            envelope = question.envelope
            client = envelope.client or self.session.client  # type: ignore[union-attr]
            sender = self.context.hooks.sender
            assert sender is not None  # (set for every listener: SessionHooks.forListener)
            d = sender.check(client, envelope)
        elif isinstance(question, CheckRecipient):
            assert self.session is not None
            d = self.context.policy.check(
                self.session.client, question.envelope, question.recipient, question.mailbox
            )
        elif isinstance(question, StartData):
            d = self._afterLookup(self._startData, question.envelope)
        elif isinstance(question, CheckHelo):
            assert self.session is not None and self.context.hooks.helo is not None
            client = self.session.client
            d = self.context.hooks.helo.run(client, question.name, subject=client.address)
        elif isinstance(question, ExtensionCommand):
            assert self.session is not None
            d = question.extension.command(
                self.session.client, question.envelope, question.verb, question.argument
            )
        elif isinstance(question, EndOfData):
            d = self._endOfData(question)
        elif isinstance(question, Authenticate):
            session, ctx = self.session, self.context
            assert session is not None and ctx.auth is not None  # asked only when offered
            d = ctx.auth.authenticate(
                question, session.client.address, ctx.clock, ctx.settings.ipv6PrefixLength,
                lambda: session.closed,
            )
        else:  # pragma: no cover - a new question type without a handler
            raise TypeError(f"unknown session event {question!r}")
        return d.addErrback(self._questionFailed, question)

    def _questionFailed(self, failure: Failure, question: object) -> Reply | Verdict:
        log.failure("error handling {question}", failure, question=type(question).__name__)
        if isinstance(question, (CheckMail, CheckRecipient, CheckHelo)):
            return QUESTION_FAILED
        return R.LOCAL_ERROR

    def _answer(self, result: object, question: object = None) -> None:
        session = self.session
        self._resume()
        if isinstance(question, EndOfData) and isinstance(result, Reply) and result.isPositive:
            self._checkClientStayed(session, question, result)
        if session is None or session.closed:
            return
        inMessage = session.inMessage
        self._handle(session.answer(result))
        self._resetTimer()
        if self._shuttingDown:
            self.shutdown(messageDone=inMessage and not session.inMessage)
        if self._deadlinePassed and not session.closed and not session.waiting:
            self._sessionExpired()

    def _checkClientStayed(
        self, session: ServerSession | None, question: EndOfData, reply: Reply
    ) -> None:
        """Log a client that left before C{reply}, the 250 to its message, could be sent:
        it never saw it, and will likely send the message again (a duplicate; RFC 1047).
        Its connection was lost already, or (reading is paused while the message is
        committed, so no end of file was read) the client has closed its side: a look
        at the socket, without taking anything from it."""
        if session is None or session.closed or _peerClosed(self.transport):
            client = question.envelope.client or (session.client if session else None)
            log.warn(
                "{queueID}: the client {client} closed the connection before the reply to its "
                "message was sent ({reply}): it probably never saw it, and may send it again "
                "(a duplicate)",
                queueID=question.envelope.queueID,
                client=client.address if client is not None else "unknown",
                reply=str(reply),
            )

    def _pause(self, reason: str = "session") -> None:
        if not self._pausedFor:
            self.transport.pauseProducing()
        self._pausedFor.add(reason)

    def _resume(self, reason: str = "session") -> None:
        if reason in self._pausedFor:
            self._pausedFor.discard(reason)
            if not self._pausedFor:
                self.transport.resumeProducing()

    def pauseProducing(self) -> None:
        """C{IPushProducer}: the transport's write buffer is full (the client is not reading
        its replies): read no more commands until it is drained.

        Not during a TLS handshake: the TLS layer holds the greeting back until the handshake
        is done, and the handshake needs reading.
        """
        if not self._handshaking:
            self._pause("output")

    def resumeProducing(self) -> None:
        """C{IPushProducer}: the transport's write buffer is drained: read on."""
        self._resume("output")

    def stopProducing(self) -> None:
        """C{IPushProducer}: the connection is going away (L{connectionLost} follows)."""

    # Answers --------------------------------------------------------------------------------

    def _startTLS(self, event: StartTLS) -> None:
        session = self.session
        assert session is not None
        if event.discarded:
            log.warn(
                "{client}: {count} bytes sent after STARTTLS, before the TLS handshake, "
                "discarded (command injection?)",
                client=session.client.address,
                count=event.discarded,
            )
        self._handshaking = True
        try:
            self.transport.startTLS(self.context.settings.tlsOptions)
        except Exception:
            log.failure("cannot start TLS with {client}", client=session.client.address)
            self._timer.stop()
            self.transport.abortConnection()

    def _afterLookup(self, f: Any, *args: Any) -> Deferred[Any]:
        """C{f(*args)} once the client's reverse lookup has answered (it has a timeout of its
        own), so that a client faster than the DNS still gets its name in C{Received:}."""
        if self._lookup is None:
            result = f(*args)
            return result if isinstance(result, Deferred) else succeed(result)

        def then(_: object) -> Any:
            session = self.session
            return None if session is None or session.closed else f(*args)

        return self._lookup.addCallback(then)

    def _startData(self, envelope: Envelope) -> Reply | None | Deferred[Reply | None]:
        ctx = self.context
        client = envelope.client or self.session.client  # type: ignore[union-attr]
        if ctx.hooks.data is None:
            return self._openMessage(envelope, client)
        d = ctx.hooks.data.run(client, envelope, subject=f"<{envelope.sender}>")

        def judged(verdict: Verdict) -> Reply | None:
            session = self.session
            if session is None or session.closed:
                return None
            if verdict.kind in (VerdictKind.CONTINUE, VerdictKind.ACCEPT):
                return self._openMessage(envelope, client)
            return verdict.reply or Reply(421, "4.7.0", "Error: closing connection")

        return d.addCallback(judged)

    def _openMessage(self, envelope: Envelope, client: ClientInfo) -> Reply | None:
        ctx = self.context
        opened = ctx.intake.open(envelope, client, ctx.settings.listenerOptions)
        if isinstance(opened, Reply):
            return opened
        self._message = opened
        return None

    def _stampingStarted(self, started: Deferred[None]) -> None:
        """A stamper answers later: read no more meanwhile (what the session has already read
        is held by the intake), and stop the DATA clock until it has answered."""
        self._stampingSince = self.context.clock.seconds()
        self._timer.stop()
        self._pause("stamping")
        started.addCallback(self._stampingEnded)

    def _stampingEnded(self, result: object) -> object:
        since, self._stampingSince = self._stampingSince, None
        session = self.session
        if since is None or "stamping" not in self._pausedFor:
            return result
        self._resume("stamping")
        if session is None or session.closed or session.waiting:
            return result  # the end of data waits for the stampers: its answer resets the timer
        self._timer.extend(self.context.clock.seconds() - since)
        self._resetTimer()
        return result

    def _abortMessage(self) -> None:
        message, self._message = self._message, None
        if message is not None:
            message.abort()

    def _endOfData(self, question: EndOfData) -> Deferred:
        message, self._message = self._message, None
        if message is None:  # pragma: no cover - the session asks only after StartData
            return succeed(question.error or R.LOCAL_ERROR)
        return message.finish(question.error, question.size)


def _peerClosed(transport: Any) -> bool:
    """Whether the peer of C{transport} (TCP or UNIX, under TLS too) has closed its side
    (or reset the connection): its socket reads end of file now, without waiting; what
    it holds stays unread (C{MSG_PEEK})."""
    lower = getattr(transport, "transport", None)  # (TLS from the first byte: its TCP)
    sock = getattr(lower if isinstance(transport, TLSMemoryBIOProtocol) else transport,
                   "socket", None)
    if sock is None:
        return False
    try:
        return sock.recv(1, socket.MSG_PEEK | socket.MSG_DONTWAIT) == b""
    except BlockingIOError:
        return False  # nothing to read: still there
    except OSError:
        return True  # reset, or closed


def _greetingRefusal(verdict: Verdict, hostname: str) -> Reply | None:
    """The reply replacing the greeting for a connect hook's C{verdict}, or C{None} to greet:
    a rejection is a 554 (or the plugin's 521, RFC 7504), anything else refusing a 421."""
    if verdict.kind in (VerdictKind.CONTINUE, VerdictKind.ACCEPT):
        return None
    reply = verdict.reply
    text = reply.text if reply is not None else "Error: closing connection"
    enhanced = reply.enhanced if reply is not None else "4.7.0"
    if verdict.kind is VerdictKind.REJECT:
        return Reply(521 if reply is not None and reply.code == 521 else 554, enhanced, text)
    return Reply(421, enhanced if enhanced.startswith("4.") else "4.7.0", f"{hostname} {text}")


def _cancel(call: Any) -> None:
    """Cancel C{call} (an C{IDelayedCall} or C{None}) unless it has run or been cancelled."""
    if call is not None and call.active():
        call.cancel()


def _outcome(lastReply: Reply | None, clientLeft: bool) -> str:
    """How a session ended, for L{SESSIONS}: from the last reply sent when the relay closed
    it, else C{"disconnected"}."""
    if clientLeft or lastReply is None:
        return "disconnected"
    if lastReply.code == 221:
        return "quit"
    if lastReply.code == 421 and lastReply.enhanced == "4.4.2":
        return "timeout"
    if lastReply.code == 421 and lastReply.enhanced == "4.3.2":
        return "shutdown"
    return "refused"


def _logConnect(client: ClientInfo) -> None:
    log.info(
        "connect from {peer} on {listener} relay={relay}",
        peer=hostPort(client.address, client.port),
        client=client.address,
        port=client.port,
        listener=client.listener,
        relay=client.relayAllowed,
    )


def _logDisconnect(session: ServerSession, how: str) -> None:
    # Address and port, as the connect line has them: what pairs the two lines of a
    # session when one address has several at once (Postfix's pair by the smtpd's pid).
    log.info(
        "disconnect from {peer} messages={messages} errors={errors}{how}",
        peer=hostPort(session.client.address, session.client.port),
        client=session.client.address,
        port=session.client.port,
        messages=session.messages,
        errors=session.errors,
        how=how,
    )


def _logSyncError(client: ClientInfo, event: SyncError) -> None:
    if event.after:
        log.warn(
            "improper command pipelining after {command} from {client}: {pending!r}, "
            "refused with 554",
            command=event.after,
            client=client.address,
            pending=event.pending,
        )
    else:
        log.warn(
            "{client} talked before the greeting: {pending!r}, refused with 554",
            client=client.address,
            pending=event.pending,
        )


def _logRefusal(client: ClientInfo, event: Refused) -> None:
    """Postfix's line: C{NOQUEUE: reject: RCPT from host[addr]: 554 5.7.1 ...;
    from=<s> to=<r> proto=ESMTP helo=<h>}."""
    child(REFUSALS, event.command, replyClass(event.reply.code)).inc()
    log.info(
        "NOQUEUE: reject: {command} from {host}[{client}]: {reply};{sender}{recipient} "
        "proto={proto}{helo}",
        command=event.command,
        host=client.rdns or "unknown",
        client=client.address,
        reply=str(event.reply),
        sender="" if event.sender is None else f" from=<{event.sender}>",
        recipient="" if event.recipient is None else f" to=<{event.recipient}>",
        proto="ESMTP" if client.esmtp else "SMTP",
        helo=f" helo=<{client.helo}>" if client.helo else "",
        sasl_username=client.authUser,
    )


class SMTPServerFactory(Factory):
    """Builds L{SMTPServerProtocol}s for one listener."""

    protocol = SMTPServerProtocol
    noisy = False  # the listener service logs where it listens

    def __init__(self, context: ListenerContext) -> None:
        self.context = context

    def buildProtocol(self, addr: IAddress | None) -> SMTPServerProtocol:
        p = SMTPServerProtocol(self.context)
        p.factory = self
        return p
