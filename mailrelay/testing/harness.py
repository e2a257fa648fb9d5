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

The listener is built by the relay's own builder
(L{mailrelay.receive.listener.buildListenerFactory}); its settings are the keyword arguments
named as the fields of L{mailrelay.receive.listener.ListenerSettings}
(C{ServerHarness(tlsMode="starttls", greetPause=1, maxMessageSize=1000)}).
"""

from __future__ import annotations

import copy
import dataclasses
import difflib
from collections.abc import Sequence
from ipaddress import ip_network
from typing import Any

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
from mailrelay.receive.auth import AuthPolicy, AuthSettings, MemoryAuthThrottle, makePortal
from mailrelay.receive.limits import MemoryRateLimiter
from mailrelay.receive.listener import ListenerSettings, buildListenerFactory
from mailrelay.receive.protocol import SMTPServerProtocol
from mailrelay.spool.memory import MemorySpool
from mailrelay.testing.plugins import hookPlugins


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


#: Keyword arguments ServerHarness took before it was built like the relay's listeners, and
#: what to write instead (for the error message).
_RENAMED = {
    "settings": "the ListenerSettings fields themselves (hostname=..., maxMessageSize=...)",
    "tls": "tlsMode='starttls'",
    "implicitTLS": "tlsMode='implicit'",
    "requireAuth": "mode='submission'",
    "listenerOptions": "addMessageID=... and addDate=...",
    "relayNetworks": "relay={'networks': [...]}",
    "acceptDomains": "relay={'acceptDomains': [...]}",
    "validatorTimeout": "validators=[ConfiguredValidator(name, validator, timeout)]",
    "stamperTimeout": "stampers=[ConfiguredStamper(name, stamper, timeout)]",
    "maxHops": "harness.intake.maxHops = ...",
    "authTimeout": "auth={'timeout': ...}",
    **{name: f"auth={{{name!r}: ...}}" for name in (
        "senders", "throttleAfter", "failureDelay", "maxFailures", "throttle"
    )},
}
#: The keys of C{limits} that are named differently in L{ListenerSettings}.
_LIMITS_KEYS = {"exceptions": "limitExceptions", "timeout": "limiterTimeout"}


def _unknown(name: str, known: Sequence[str]) -> TypeError:
    hint = _RENAMED.get(name)
    if hint is None:
        close = difflib.get_close_matches(name, known, 1)
        hint = f"{close[0]}=..." if close else "a ListenerSettings field"
    return TypeError(f"ServerHarness() got an unexpected keyword argument {name!r}; use {hint}")


def _listenerSettings(settings: dict[str, Any], limits: dict[str, Any] | None) -> ListenerSettings:
    """The harness's L{ListenerSettings}: C{settings} (field names; by default host name
    C{relay.test}, listener C{test}, and a stand-in for TLS options when C{tlsMode} wants
    them) and C{limits} (L{ListenerLimits} keyword arguments).

    @raise TypeError: an unknown name, saying what to use instead.
    """
    known = [f.name for f in dataclasses.fields(ListenerSettings)]
    values = {"hostname": "relay.test", "name": "test", **settings}
    for key, value in (limits or {}).items():
        values[_LIMITS_KEYS.get(key, key)] = value
    for name in values:
        if name not in known:
            raise _unknown(name, known)
    if values.get("tlsMode", "none") != "none":
        values.setdefault("tlsOptions", object())
    return ListenerSettings(**values)


class ServerHarness:
    """One SMTP server connection over a C{StringTransport}, built like the relay's
    listeners (L{mailrelay.receive.listener.buildListenerFactory}).

    @ivar transport: the C{StringTransport}; C{transport.value()} holds what the server sent.
    @ivar clock: the C{Clock} driving timeouts and validator time-outs.
    @ivar spool: the L{MemorySpool}.
    @ivar intake: the L{mailrelay.cleanup.intake.Intake} in front of it.
    @ivar checker: the L{MemoryChecker} behind AUTH when C{users} was given.
    @ivar throttle: the L{MemoryAuthThrottle} of AUTH failures (on C{clock}).
    @ivar limits: the L{mailrelay.receive.limits.ListenerLimits} when C{limits} was given,
        else C{None}.
    @ivar limiter: the L{IRateLimiter} behind them.
    @ivar context: the listener's L{mailrelay.receive.protocol.ListenerContext}.
    @ivar hooks: the L{mailrelay.config.plugins.HookPlugins} of C{plugins} (and
        C{validators}).

    @param validators: L{IRecipientValidator} providers (each may answer within 30 seconds of
        the clock) or L{ConfiguredValidator}s.
    @param plugins: plugins of the hooks of C{[[plugins]]} (connect, helo, esmtp, mail,
        rcpt, data, message, queue): objects, each serving every hook it provides and
        answering within 30 seconds, or C{PluginEntry.serving(name, plugin, timeout, hooks)}
        (L{mailrelay.config.plugins.PluginEntry}), in configuration order; the recipient
        validators among them run after C{validators}.
    @param users: user name to password: the listener offers AUTH, checked by a
        L{MemoryChecker}.
    @param auth: more AUTH settings: L{AuthSettings} fields (C{senders}, C{throttleAfter},
        C{failureDelay}, C{maxFailures}, C{mechanisms}), the L{AuthPolicy}'s C{timeout} and
        C{throttle}.
    @param relay: relay control: C{networks} (default loopback) and C{acceptDomains}.
    @param stampers: L{IHeaderStamper} providers (each may answer within 30 seconds of the
        clock) or L{ConfiguredStamper}s; by default the L{DefaultStamper}.
    @param spool: a L{MemorySpool} (one is made by default).
    @param limiter: the L{IRateLimiter} the limits count through (by default a
        L{MemoryRateLimiter} on the clock).
    @param limits: the listener's limits (keyword arguments of
        L{mailrelay.receive.limits.ListenerLimits}); without, no limits are applied.
    @param sessions: a L{mailrelay.receive.protocol.Sessions}, to test a graceful stop.
    @param resolver: an C{IResolver} (a L{mailrelay.testing.FakeResolver}) for the client's
        reverse lookup (C{client.rdns}), which the connect hook waits for; by default none.
    @param peer: the client's address.
    @param connect: make the connection now (else call C{protocol.makeConnection}).
    @param settings: the listener's settings: L{ListenerSettings} field names, e.g.
        C{tlsMode="starttls"} (complete the simulated handshake with L{completeHandshake}),
        C{mode="submission"}, C{greetPause=1}, C{maxMessageSize=1000}.
    """

    def __init__(
        self,
        *,
        validators: Sequence[Any] = (),
        plugins: Sequence[Any] = (),
        users: dict[str, str] | None = None,
        auth: dict[str, Any] | None = None,
        relay: dict[str, Any] | None = None,
        stampers: Sequence[Any] | None = None,
        spool: MemorySpool | None = None,
        limiter: Any = None,
        limits: dict[str, Any] | None = None,
        sessions: Any = None,
        resolver: Any = None,
        peer: str = "127.0.0.1",
        connect: bool = True,
        **settings: Any,
    ) -> None:
        self.clock = Clock()
        self.clock.advance(1_800_000_000)
        self.spool = spool or MemorySpool()
        settings.setdefault("auth", users is not None)
        listener = _listenerSettings(settings, limits)
        authPolicy = self._auth(users, dict(auth or {}))
        configured = [
            s if isinstance(s, ConfiguredStamper) else ConfiguredStamper(type(s).__name__, s, 30.0)
            for s in ([DefaultStamper()] if stampers is None else stampers)
        ]
        control, checks = self._policy(validators, dict(relay or {}), listener.hostname)
        self.hooks = hookPlugins(plugins, checks)
        observers = self.hooks.observers(self.clock)
        self.intake = Intake(
            self.spool,
            configured,
            self.clock,
            listener.hostname,
            filters=self.hooks.filterChain(self.clock),
            observe=observers.messageQueued if observers.queued else None,
        )
        self.limiter = limiter or MemoryRateLimiter(self.clock)
        self.factory = buildListenerFactory(
            listener,
            policy=RecipientPolicy(control, self.hooks.serving("rcpt"), self.clock),
            hooks=self.hooks.sessionHooks(self.clock),
            intake=self.intake,
            clock=self.clock,
            auth=authPolicy,
            limiter=self.limiter if limits is not None else None,
            sessions=sessions,
            resolver=resolver,
        )
        self.context = self.factory.context
        self.limits = self.context.limits
        self._open(peer, connect)

    def _auth(self, users: dict[str, str] | None, options: dict[str, Any]) -> AuthPolicy | None:
        self.throttle = options.pop("throttle", None) or MemoryAuthThrottle(self.clock)
        self.checker: MemoryChecker | None = None
        if users is None:
            return None
        self.checker = MemoryChecker(users)
        timeout = {"timeout": options.pop("timeout")} if "timeout" in options else {}
        portal = makePortal([self.checker])
        return AuthPolicy(portal, self.throttle, AuthSettings(**options), **timeout)

    def _policy(
        self, validators: Sequence[Any], relay: dict[str, Any], hostname: str
    ) -> tuple[RelayControl, list[ConfiguredValidator]]:
        networks = relay.pop("networks", ("127.0.0.0/8", "::1/128"))
        control = RelayControl(
            [ip_network(n) for n in networks], relay.pop("acceptDomains", ()), hostname, **relay
        )
        configured = [
            v if isinstance(v, ConfiguredValidator) else ConfiguredValidator(f"validator{i}", v, 30)
            for i, v in enumerate(validators)
        ]
        return control, configured

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

    def another(self, peer: str = "127.0.0.1", connect: bool = True) -> ServerHarness:
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
