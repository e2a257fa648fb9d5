"""An in-memory mailrelay for tests, also for site plugin authors.

    from mailrelay.testing import MemorySpool, ServerHarness
    harness = ServerHarness(validators=[MyValidator()])
    harness.send(b"EHLO client.example\\r\\n")
    assert harness.replies()[-1].startswith(b"250 ")

Nothing here touches the network, the disk or the global reactor: the transport is a
C{StringTransport}, time is a C{task.Clock}, the spool keeps messages in memory.  TLS is
simulated: the transport records C{startTLS} (L{TLSStringTransport}) and the test completes
the handshake with L{ServerHarness.completeHandshake}.  For AUTH, L{MemoryChecker} holds
users and passwords in memory, and L{ServerHarness} builds the portal and throttle.

Abuse limits: give L{ServerHarness} C{limits} (the keyword arguments of
L{mailrelay.receive.limits.ListenerLimits}) and open more connections to the same listener with
L{ServerHarness.another}; the counts live in a L{mailrelay.receive.limits.MemoryRateLimiter} (or the
C{limiter} given) on the harness's clock.
"""

from __future__ import annotations

import copy
from ipaddress import ip_network
from typing import Any, Sequence

from twisted.cred.checkers import ICredentialsChecker
from twisted.cred.credentials import IUsernamePassword
from twisted.cred.error import UnauthorizedLogin
from twisted.internet.address import IPv4Address
from twisted.internet.defer import Deferred, fail, succeed
from twisted.internet.task import Clock
from twisted.internet.testing import StringTransport
from zope.interface import implementer

from mailrelay.cleanup.intake import Intake
from mailrelay.cleanup.stamping import ConfiguredStamper, DefaultStamper
from mailrelay.policy.chain import ConfiguredValidator, RecipientPolicy, RelayControl
from mailrelay.policy.sender import SenderPolicy
from mailrelay.receive.auth import AuthPolicy, MemoryAuthThrottle, makePortal
from mailrelay.receive.limits import ListenerLimits, MemoryRateLimiter
from mailrelay.receive.protocol import ListenerContext, SMTPServerFactory, SMTPServerProtocol
from mailrelay.smtp.server import SessionSettings
from mailrelay.spool.memory import MemorySpool


class FakeTLSConnection:
    """What C{getHandle()} returns once the simulated handshake is done: the two methods of
    C{OpenSSL.SSL.Connection} the server reads."""

    def __init__(self, version: str, cipher: str) -> None:
        self.version = version
        self.cipher = cipher

    def get_protocol_version_name(self) -> str:
        return self.version

    def get_cipher_name(self) -> str:
        return self.cipher


class TLSStringTransport(StringTransport):
    """A C{StringTransport} that records C{startTLS} (and what had been written before it)
    instead of doing a handshake.

    @ivar tlsOptions: the options C{startTLS} was called with, or C{None}.
    @ivar writtenBeforeTLS: C{value()} when C{startTLS} was called: what went out in plaintext.
    @ivar aborted: C{abortConnection} was called.
    """

    tlsOptions: Any = None
    writtenBeforeTLS: bytes | None = None
    handle: Any = None
    aborted = False

    def startTLS(self, options: Any) -> None:
        self.tlsOptions = options
        self.writtenBeforeTLS = self.value()

    def getHandle(self) -> Any:
        return self.handle

    def abortConnection(self) -> None:
        self.aborted = True
        self.loseConnection()


@implementer(ICredentialsChecker)
class MemoryChecker:
    """An C{ICredentialsChecker} with users and passwords in memory, answering at once (or,
    with C{hold}, when L{release} is called)."""

    credentialInterfaces = (IUsernamePassword,)

    def __init__(self, users: dict[str, str], hold: bool = False) -> None:
        self.users = users
        self.hold = hold
        self.held: list[tuple[Deferred, Any]] = []
        self.checked: list[str] = []

    def requestAvatarId(self, credentials: Any) -> Deferred:
        self.checked.append(credentials.username)
        if self.hold:
            d: Deferred = Deferred()
            self.held.append((d, credentials))
            return d
        return self._check(credentials)

    def _check(self, credentials: Any) -> Deferred:
        password = credentials.password
        if isinstance(password, bytes):
            password = password.decode("utf-8", "replace")
        if self.users.get(credentials.username) == password:
            return succeed(credentials.username)
        return fail(UnauthorizedLogin())

    def release(self) -> None:
        held, self.held = self.held, []
        for d, credentials in held:
            self._check(credentials).chainDeferred(d)


class ServerHarness:
    """One SMTP server connection over a C{StringTransport}.

    @ivar transport: the C{StringTransport}; C{transport.value()} holds what the server sent.
    @ivar clock: the C{Clock} driving timeouts and validator time-outs.
    @ivar spool: the L{MemorySpool}.
    @ivar checker: the L{MemoryChecker} behind AUTH when C{users} was given.
    @ivar throttle: the L{MemoryAuthThrottle} of AUTH failures (on C{clock}).
    @ivar limits: the L{ListenerLimits} when C{limits} was given, else C{None}.
    @ivar limiter: the L{IRateLimiter} behind them.

    C{stampers} are L{IHeaderStamper} providers (each may answer within C{stamperTimeout}
    seconds of the clock) or L{mailrelay.cleanup.stamping.ConfiguredStamper}s; by default the
    L{DefaultStamper}.

    With C{users} (user name to password) the listener offers AUTH; C{tls=True} gives it a
    certificate (STARTTLS offered), C{implicitTLS=True} makes it a TLS-wrapped listener; in
    both cases complete the handshake with L{completeHandshake}.
    """

    def __init__(
        self,
        *,
        settings: SessionSettings | None = None,
        validators: Sequence[Any] = (),
        validatorTimeout: float = 30.0,
        relayNetworks: Sequence[str] = ("127.0.0.0/8", "::1/128"),
        acceptDomains: Sequence[str] = (),
        peer: str = "127.0.0.1",
        stampers: Sequence[Any] | None = None,
        stamperTimeout: float = 30.0,
        spool: MemorySpool | None = None,
        listenerOptions: dict[str, Any] | None = None,
        idleTimeout: float = 300.0,
        dataTimeout: float = 300.0,
        maxHops: int = 50,
        connect: bool = True,
        tls: bool = False,
        implicitTLS: bool = False,
        users: dict[str, str] | None = None,
        authWithoutTLS: bool = False,
        requireAuth: bool = False,
        senders: dict[str, tuple[str, ...]] | None = None,
        throttleAfter: int = 3,
        failureDelay: float = 5.0,
        maxFailures: int = 10,
        throttle: Any = None,
        limits: dict[str, Any] | None = None,
        limiter: Any = None,
        greetPause: float = 0.0,
        maxSessionTime: float = 0.0,
        minDataRate: int = 0,
        rejectUnauthPipelining: bool = False,
        rejectPregreet: bool | None = None,
        authTimeout: float = 30.0,
        sessions: Any = None,
    ) -> None:
        self.clock = Clock()
        self.clock.advance(1_800_000_000)
        self.spool = spool or MemorySpool()
        self.checker: MemoryChecker | None = None
        self.throttle = throttle or MemoryAuthThrottle(self.clock)
        auth = None
        if users is not None:
            self.checker = MemoryChecker(users)
            auth = AuthPolicy(
                portal=makePortal([self.checker]),
                throttle=self.throttle,
                throttleAfter=throttleAfter,
                failureDelay=failureDelay,
                maxFailures=maxFailures,
                senders=dict(senders or {}),
                timeout=authTimeout,
            )
        if settings is None:
            settings = SessionSettings(
                hostname="relay.test",
                starttls=tls,
                authMechanisms=auth.mechanisms if auth else (),
                authWithoutTLS=authWithoutTLS,
                requireAuth=requireAuth,
                rejectUnauthPipelining=rejectUnauthPipelining,
                rejectPregreet=(
                    greetPause > 0 or rejectUnauthPipelining
                    if rejectPregreet is None
                    else rejectPregreet
                ),
            )
        relay = RelayControl([ip_network(n) for n in relayNetworks], acceptDomains, settings.hostname)
        policy = RecipientPolicy(
            relay,
            [ConfiguredValidator(f"validator{i}", v, validatorTimeout) for i, v in enumerate(validators)],
            self.clock,
        )
        self.limiter = limiter or MemoryRateLimiter(self.clock)
        self.limits = None
        if limits is not None:
            self.limits = ListenerLimits(
                hostname=settings.hostname,
                listener="test",
                limiter=self.limiter,
                clock=self.clock,
                **limits,
            )
        self.intake = Intake(
            self.spool,
            [
                s if isinstance(s, ConfiguredStamper) else ConfiguredStamper(type(s).__name__, s, stamperTimeout)
                for s in ([DefaultStamper()] if stampers is None else stampers)
            ],
            self.clock,
            settings.hostname,
            maxHops,
        )
        self.context = ListenerContext(
            settings=settings,
            policy=policy,
            sender=SenderPolicy(
                senders=auth.senders if auth is not None else {},
                limits=self.limits,
                hasFreeSpace=self.intake.hasFreeSpace,
            ),
            intake=self.intake,
            clock=self.clock,
            listenerName="test",
            listenerOptions=listenerOptions or {},
            idleTimeout=idleTimeout,
            dataTimeout=dataTimeout,
            tlsOptions=object() if tls else None,
            implicitTLS=implicitTLS,
            auth=auth,
            limits=self.limits,
            greetPause=greetPause,
            maxSessionTime=maxSessionTime,
            minDataRate=minDataRate,
            sessions=sessions,
        )
        self.factory = SMTPServerFactory(self.context)
        self._open(peer, connect)

    def _open(self, peer: str, connect: bool) -> None:
        address = IPv4Address("TCP", peer, 40000) if ":" not in peer else None
        if address is None:
            from twisted.internet.address import IPv6Address

            address = IPv6Address("TCP", peer, 40000)  # type: ignore[assignment]
        self.protocol: SMTPServerProtocol = self.factory.buildProtocol(address)
        self.transport = TLSStringTransport(peerAddress=address)
        self._read = 0
        if connect:
            self.protocol.makeConnection(self.transport)

    def another(self, peer: str = "127.0.0.1", connect: bool = True) -> "ServerHarness":
        """Another connection to the same listener (same clock, spool, limits), from
        C{peer}."""
        other = copy.copy(self)
        other._open(peer, connect)
        return other

    def send(self, data: bytes) -> list[bytes]:
        """Send C{data} as the client; return the reply lines the server sent since last time."""
        self.protocol.dataReceived(data)
        return self.replies()

    def replies(self) -> list[bytes]:
        """Reply lines (without CRLF) sent since the last call."""
        value = self.transport.value()
        new, self._read = value[self._read :], len(value)
        return new.split(b"\r\n")[:-1] if new else []

    def codes(self, lines: list[bytes]) -> list[int]:
        """The codes of the last line of each reply in C{lines}."""
        return [int(line[:3]) for line in lines if line[3:4] == b" "]

    def completeHandshake(
        self, version: str = "TLSv1.3", cipher: str = "TLS_AES_256_GCM_SHA384"
    ) -> list[bytes]:
        """Finish the simulated TLS handshake; return the reply lines sent since last time."""
        self.transport.handle = FakeTLSConnection(version, cipher)
        self.protocol.handshakeCompleted()
        return self.replies()

    @property
    def closed(self) -> bool:
        return self.transport.disconnecting

    def loseConnection(self) -> None:
        self.protocol.connectionLost(None)
