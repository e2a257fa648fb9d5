"""The listeners of a L{Config}: recipient policy, stampers, AUTH, abuse limits and TLS built
into one factory (chain) per endpoint, the services that listen on them, and the graceful
end of the sessions."""

from __future__ import annotations

import os
import re
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from typing import Any

from twisted.application.service import Service
from twisted.internet import endpoints
from twisted.internet.defer import Deferred
from twisted.internet.protocol import Factory
from twisted.logger import Logger

from mailrelay.address import hostPort
from mailrelay.builtin.canonical import SenderCanonical
from mailrelay.cleanup.intake import Intake
from mailrelay.cleanup.stamping import ConfiguredStamper
from mailrelay.config import Config, ListenerConfig
from mailrelay.config.checks import postmasterRoutedByOwnMX
from mailrelay.config.plugins import HookPlugins
from mailrelay.config.values import resolveProcessCount, systemdSocketProblem
from mailrelay.delivery.maildir import MaildirUsers, needsUsers
from mailrelay.endpoints import socketKey
from mailrelay.envelope import Envelope
from mailrelay.errors import ConfigError
from mailrelay.interfaces import IHeaderStamper, IRateLimiter, ISpool, threadHandOff
from mailrelay.policy.chain import RecipientPolicy, RelayControl
from mailrelay.receive.limits import ConnectionCount, MemoryRateLimiter
from mailrelay.receive.listener import (
    buildListenerFactory,
    wrapListenerFactory,
)
from mailrelay.receive.protocol import Sessions
from mailrelay.route import RoutingTable

log = Logger()

#: The listen backlog of a listener whose endpoint sets none (C{backlog=}): Twisted's own
#: default of 50 overflows when a few hundred clients connect at once, and each dropped SYN
#: costs its client a retransmission (a second or more).  The kernel caps it at
#: C{net.core.somaxconn} (4096 since Linux 5.4), as it does Postfix's (which asks for its
#: process limit, 100 by default, with 100 C{smtpd} processes accepting beside it).
DEFAULT_BACKLOG = 1024
#: The endpoint types whose listeners take a C{backlog=} (Twisted's C{tcp}, C{tcp6}, C{ssl},
#: C{unix}).
_BACKLOG_TYPES = frozenset({"tcp", "tcp6", "ssl", "unix"})
_EXPLICIT_BACKLOG = re.compile(r"(?:^|(?<!\\):)backlog=")


def withDefaultBacklog(description: str, backlog: int = DEFAULT_BACKLOG) -> str:
    """The endpoint C{description} with C{backlog=} set to C{backlog} when it sets none and
    its type takes one; any other description unchanged.

    >>> withDefaultBacklog("tcp:25:interface=192.0.2.1")
    'tcp:backlog=1024:25:interface=192.0.2.1'
    """
    kind, colon, rest = description.partition(":")
    if not colon or kind not in _BACKLOG_TYPES or _EXPLICIT_BACKLOG.search(description):
        return description
    return f"{kind}:backlog={backlog}:{rest}"


@dataclass
class _Carried:
    """What a reload keeps: counters that must not restart from zero, resolvers."""

    limiter: Any = None
    limiterSpec: Any = None
    throttle: Any = None
    throttleWindow: float | None = None
    #: by socket (L{socketKey}), else by endpoint
    counts: dict[Any, Any] = field(default_factory=dict)
    #: The AUTH password file's checker of the configuration (L{makeAuthPolicy}), or
    #: C{None}: the relay hands its users to the acceptor processes it starts.
    passwords: Any = None
    resolvers: dict[Any, Any] = field(default_factory=dict)

    def copy(self) -> _Carried:
        """A copy, the same counters in it, for a configuration to be built on
        (L{makeListeners} changes it): the relay's is replaced by it only once that
        configuration runs, so that a reload refused forgets nothing.

        The resolvers are shared, not copied: they are a cache by name servers, and one made
        for a reload refused is kept for the next (the system's has a timer on the reactor;
        one left behind by each refused reload would add up)."""
        return replace(self, counts=dict(self.counts))


class SessionsService(Service):
    """Stops the SMTP sessions gracefully once the listeners have stopped: idle sessions get
    C{421 4.3.2 Service shutting down} at once; a session with a message in hand may finish
    it within the drain time, and gets its 250 only once the message is durable."""

    name = "sessions"  # type: ignore[assignment]  # Twisted types Service.name as None

    def __init__(self, sessions: Sessions, clock: Any, drainTime: float) -> None:
        self.sessions = sessions
        self.clock = clock
        self.drainTime = drainTime

    def stopService(self) -> Deferred[None]:
        super().stopService()
        return self.sessions.drain(self.clock, self.drainTime)


class _SwitchFactory(Factory):
    """The factory a listening port keeps across reloads: each connection is built by the
    factory (chain) of the configuration current when it arrives; connections made before a
    reload keep theirs, and with it the settings they started with."""

    noisy = False

    def __init__(self, current: Any) -> None:
        self.current = current

    def switch(self, factory: Any) -> None:
        old, self.current = self.current, factory
        factory.doStart()
        old.doStop()

    def startFactory(self) -> None:
        self.current.doStart()

    def stopFactory(self) -> None:
        self.current.doStop()

    def buildProtocol(self, addr: Any) -> Any:
        return self.current.buildProtocol(addr)

    def logPrefix(self) -> str:
        prefix = getattr(self.current, "logPrefix", None)
        return prefix() if callable(prefix) else self.current.__class__.__name__


class ListenError(Exception):
    """A listener could not listen; the message names its endpoint."""


class ListenerService(Service):
    """Listens on one endpoint; a failure to listen stops start-up with a clear message.

    @ivar factory: the factory (chain) that builds the connections accepted now.
    @ivar where: where the endpoint is set, for the messages (C{/etc/mailrelay.toml:
        listeners[0].endpoint}, C{--listen}), or C{""}.
    """

    def __init__(
        self, reactor: Any, description: str, factory: Any, role: str = "", where: str = ""
    ) -> None:
        self.reactor = reactor
        self.description = description
        self._switch = _SwitchFactory(factory)
        self.role = role
        self.where = where
        self.port: Any = None

    @property
    def factory(self) -> Any:
        return self._switch.current

    def switch(self, factory: Any, role: str) -> None:
        """New connections are built by C{factory} from now on (a reload)."""
        self._switch.switch(factory)
        self.role = role

    def listen(self) -> None:
        """Start listening.  @raise ListenError: naming where the endpoint is set, the
        endpoint and the reason."""
        try:
            endpoint = endpoints.serverFromString(
                self.reactor, withDefaultBacklog(self.description)
            )
            if isinstance(endpoint, endpoints.SSL4ServerEndpoint):
                # A plain socket: the TLS layer is the factory's (wrapListenerFactory).
                endpoint = endpoints.TCP4ServerEndpoint(
                    self.reactor, endpoint._port, endpoint._backlog, endpoint._interface
                )
            problem = None
            if isinstance(endpoint, endpoints.UNIXServerEndpoint):
                problem = socketDirectoryProblem(endpoint._address)
            if problem is None:
                d = endpoint.listen(self._switch)
        except Exception as e:  # (what the parser raises: a systemd: socket not passed...)
            reason = None
            if self.description.startswith("systemd:"):
                reason = systemdSocketProblem(self.description)
            raise self._cannot(reason or f"{e.__class__.__name__}: {e}") from e
        if problem is not None:
            raise self._cannot(problem)
        result: list[Any] = []
        d.addBoth(result.append)
        if not result:  # pragma: no cover - every stream endpoint we know listens at once
            raise ListenError(f"listener {self.description} did not start")
        outcome = result[0]
        if hasattr(outcome, "getErrorMessage"):
            raise self._cannot(outcome.getErrorMessage())
        self.port = outcome
        host = self.port.getHost()
        log.info(
            "listening on {address} ({endpoint}{role})",
            address=hostPort(str(getattr(host, "host", host)), getattr(host, "port", "")),
            host=getattr(host, "host", host),
            port=getattr(host, "port", ""),
            endpoint=self.description,
            role=f"; {self.role}" if self.role else "",
        )

    def _cannot(self, reason: str) -> ListenError:
        where = f"{self.where}: " if self.where else ""
        return ListenError(f"{where}cannot listen on {self.description}: {reason}")

    def respell(self, description: str) -> None:
        """Serve the socket listened on under C{description}, another spelling of it (a
        reload): with the listen backlog it says (C{listen(2)} again on the socket), and a
        UNIX socket's file mode."""
        endpoint = endpoints.serverFromString(self.reactor, withDefaultBacklog(description))
        self.description = description
        sock = getattr(self.port, "socket", None)
        backlog = getattr(endpoint, "_backlog", None)
        if sock is not None and backlog:
            sock.listen(backlog)
        if isinstance(endpoint, endpoints.UNIXServerEndpoint):
            os.chmod(endpoint._address, endpoint._mode)

    def privilegedStartService(self) -> None:
        try:
            if self.port is None:  # (a listener added by a reload listens already)
                self.listen()
        except ListenError as e:
            raise SystemExit(f"mailrelay: error: {e}") from None
        super().privilegedStartService()

    def stopService(self) -> Any:
        super().stopService()
        if self.port is not None:
            port, self.port = self.port, None
            return port.stopListening()
        return None


def socketDirectoryProblem(path: str) -> str | None:
    """Why a UNIX socket cannot be made at C{path} because of its directory (it does not
    exist, or is not a directory), for a message, else C{None}.  Twisted would try its lock
    file there first and fail with an error naming only that file
    (C{[Errno 2] No such file or directory: '10062' -> b'/run/x/smtp.sock.lock'})."""
    if path.startswith("\0"):  # (an abstract socket: no directory)
        return None
    directory = os.path.dirname(os.path.abspath(path))
    if os.path.isdir(directory):
        return None
    problem = "is not a directory" if os.path.exists(directory) else "does not exist"
    return (f"the socket's directory {directory} {problem}: create it (the relay makes its "
            "socket and a lock file beside it there), or name a socket in an existing "
            "directory")


def makeListeners(
    config: Config,
    reactor: Any,
    build: Any,
    carried: _Carried,
    spool: ISpool,
    sessions: Sessions,
    onQueued: Any,
    hooks: HookPlugins,
    quiet: bool = False,
) -> list[tuple[str, Any, str]]:
    """The C{(endpoint, factory, role)} of every listener of C{config}, their plugins built
    (their certificates are those the configuration loaded: logged here, unless C{quiet}:
    in an acceptor process, the relay has logged them).  Counters in
    C{carried} (rate limits, AUTH failures, connections per listener) are reused, so that a
    reload does not reset them.

    @param onQueued: called with the queue id of each message once it is durable.
    @param hooks: the plugins of the relay's hooks, built (L{buildHooks}).
    @raise ConfigError: a plugin is unknown or refuses its options, or ESMTP extensions
        clash.
    """
    intake = makeIntake(config, reactor, build, spool, onQueued, hooks)
    policy = makeRecipientPolicy(config, reactor, hooks)
    try:
        sessionHooks = hooks.sessionHooks(reactor)
    except ValueError as e:
        raise ConfigError(str(e), file=config.source or "(embedded default)", key="plugins") from e
    resolver = _reverseResolver(config, reactor, carried)
    authPolicy = makeAuthPolicy(config, reactor, build, carried)
    limiter = _rateLimiter(config, reactor, build, carried)
    result = []
    for listener in config.listeners:
        settings = listener.settings
        if not quiet:
            logCertificates(listener)
        factory = buildListenerFactory(
            settings,
            policy=policy,
            intake=intake,
            clock=reactor,
            auth=authPolicy,
            limiter=limiter,
            resolver=resolver,
            sessions=sessions,
            # (By socket: a reload spelling the endpoint anew keeps the socket and its count.)
            connectionCount=carried.counts.setdefault(
                socketKey(settings.name) or settings.name, ConnectionCount()),
            hooks=sessionHooks,
        )
        factory = wrapListenerFactory(settings, factory, reactor)
        result.append((settings.name, factory, _role(listener)))
    return result


def makeIntake(
    config: Config,
    reactor: Any,
    build: Any,
    spool: ISpool,
    notify: Callable[[str], object] | None = None,
    hooks: HookPlugins | None = None,
) -> Intake:
    """The intake of C{config} over C{spool}: its header stampers built, its host name and
    hop limit, the message filters and queue observers of C{hooks}.  The listeners share
    one; the queue manager has its own for the notifications it makes
    (L{mailrelay.interfaces.IIntake.submit}).

    @param notify: called with the queue id of each message once it is durable, or C{None}.
    @raise ConfigError: a stamper plugin is unknown or refuses its options.
    """
    stampers = makeStampers(config, build)
    hooks = hooks or HookPlugins()
    observers = hooks.observers(reactor)
    return Intake(
        spool,
        stampers,
        reactor,
        config.hostname,
        config.maxHops,
        notify,
        filters=hooks.filterChain(reactor),
        observe=observers.messageQueued if observers.queued else None,
        deferToThread=build.context.deferToThread if hasattr(build, "context") else None,
        dropHeaders=config.dropHeaders,
        postmaster=config.queue.postmaster,
        maxHeaderSize=config.maxHeaderSize,
    )


def makeStampers(config: Config, build: Any) -> list[ConfiguredStamper]:
    """The configured header stampers, built, each with its timeout.

    @raise ConfigError: a stamper plugin is unknown or refuses its options.
    """
    return [
        ConfiguredStamper(spec.plugin, build(spec, IHeaderStamper), spec.timeout)
        for spec in config.headerStampers
    ]


def makeRecipientPolicy(config: Config, reactor: Any, hooks: HookPlugins) -> RecipientPolicy:
    """Relay control and the recipient validators (those of C{[[recipient_validators]]},
    then the C{[[plugins]]} serving C{rcpt}), shared by all listeners."""
    byOwnMX = postmasterRoutedByOwnMX(config)
    relay = RelayControl(config.relayNetworks, config.acceptDomains, config.hostname,
                         postmasterDeliverable=True if byOwnMX is None
                         else lambda sender: not byOwnMX(sender))
    return RecipientPolicy(
        relay, hooks.serving("rcpt"), reactor, mailboxes=_maildirUsers(config, reactor),
        deliverySender=_deliverySender(hooks, threadHandOff(reactor)),
    )


def _deliverySender(
    hooks: HookPlugins, deferToThread: Callable[..., Deferred[Any]]
) -> Callable[[Envelope], Deferred[str]] | None:
    """The envelope sender the delivery will route a message by, from its envelope at RCPT:
    MAIL FROM as the C{sender-canonical} entries among the message filters will rewrite it
    at the end of data, in their order, each by its table as it is now (its file read again
    in the thread pool, C{deferToThread}, if it changed: L{SenderCanonical.envelopeSender});
    C{None}: none rewrites the envelope sender.  Other filters may rewrite it too
    (C{FilterResult.sender}), but cannot be asked before."""
    rewriters = [c.plugin for c in hooks.serving("message")
                 if isinstance(c.plugin, SenderCanonical) and "envelope_sender" in c.plugin.classes]
    if not rewriters:
        return None

    def rewritten(sender: str, smtputf8: bool) -> tuple[str, list[tuple[str, str]]]:
        problems = []
        for rewriter in rewriters:
            sender, problem = rewriter.envelopeSender(sender, smtputf8)
            if problem is not None:
                problems.append((rewriter.table.path, problem))
        return sender, problems

    def said(answer: tuple[str, list[tuple[str, str]]]) -> str:
        sender, problems = answer
        for path, problem in problems:  # (of the map, said once: no message has a queue id yet)
            log.error("sender-canonical: the map {path} changed but cannot be used, kept the "
                      "one read before: {problem}", path=path, problem=problem)
        return sender

    def deliverySender(envelope: Envelope) -> Deferred[str]:
        d = deferToThread(rewritten, envelope.sender, bool(envelope.smtputf8))
        return d.addCallback(said)

    return deliverySender


def _maildirUsers(config: Config, reactor: Any) -> MaildirUsers | None:
    """The RCPT-time check of the maildir routes' users, when a route needs one and the
    routing table alone decides (with C{[[routers]]}, a router may send any recipient
    elsewhere: its maildir users are then only checked at delivery, logged)."""
    if not needsUsers(config.routes, config.createMailboxes):
        return None
    if config.routers:
        log.info(
            "maildir users are checked at delivery only, not at RCPT: [[routers]] may route "
            "their recipients elsewhere (a recipient validator can refuse unknown users)"
        )
        return None
    return MaildirUsers(
        RoutingTable.fromConfig(config), reactor, delimiters=config.recipientDelimiter
    )


def _reverseResolver(config: Config, reactor: Any, carried: _Carried) -> Any:
    """The resolver of the reverse lookups (the servers delivery uses: C{[dns] nameservers},
    or the system's), or C{None} when they are off."""
    if not config.reverseDNS:
        return None
    from mailrelay.route import makeResolver

    resolver = carried.resolvers.get(config.nameservers)
    if resolver is None:
        resolver = makeResolver(list(config.nameservers) or None, reactor=reactor)
        carried.resolvers[config.nameservers] = resolver
    return resolver


def _rateLimiter(config: Config, reactor: Any, build: Any, carried: _Carried) -> Any:
    """One limiter for all listeners (their keys differ), in memory or a site's shared one
    (C{[rate_limiter]})."""
    if config.rateLimiter is not None:
        if carried.limiterSpec == config.rateLimiter:
            limiter: Any = carried.limiter
        else:
            limiter = build(config.rateLimiter, IRateLimiter)
            log.info("limits: counters kept by plugin {plugin}", plugin=config.rateLimiter.plugin)
    else:
        # In memory (or, in an acceptor process, the relay's: RelayCounters).
        limiter = carried.limiter if carried.limiterSpec is None else None
        if limiter is None:
            limiter = MemoryRateLimiter(reactor)
    carried.limiter, carried.limiterSpec = limiter, config.rateLimiter
    return limiter


def _role(listener: ListenerConfig) -> str:
    """What the log says a listener is for: its mode, TLS, AUTH and PROXY."""
    settings = listener.settings
    role = settings.mode
    if settings.tlsMode != "none":
        role += ", STARTTLS" if settings.tlsMode == "starttls" else ", implicit TLS"
        if listener.sniCertificates:
            role += f" (+{len(listener.sniCertificates)} SNI)"
    if settings.auth:
        role += ", AUTH"
    if settings.proxyProtocol:
        role += ", PROXY from " + " ".join(str(n) for n in settings.proxyNetworks)
    return role


def logCertificates(listener: ListenerConfig) -> None:
    """Log the certificates a listener serves, as the configuration loaded them: each one's
    subject and end of validity, after its warnings (an expired certificate)."""
    endpoint = listener.settings.name
    served = [("certificate", listener.certificate)] if listener.certificate else []
    if listener.endpointCertificate is not None:  # (an ssl: endpoint's own)
        what = "certificate" if listener.certificate is None else "ssl: endpoint's certificate"
        served.append((what, listener.endpointCertificate))
    served += [(f"certificate for {name}", tls) for name, tls in listener.sniCertificates]
    for what, tls in served:
        for warning in tls.warnings:
            log.warn("listener {endpoint}: {warning}", endpoint=endpoint, warning=warning)
        log.info(
            "listener {endpoint}: {what} {subject}, valid until {notAfter}",
            endpoint=endpoint,
            what=what,
            subject=tls.subject,
            notAfter=tls.notAfter.strftime("%Y-%m-%d"),
        )


def makeAuthPolicy(config: Config, reactor: Any, build: Any = None, carried: Any = None) -> Any:
    """The L{mailrelay.receive.auth.AuthPolicy} all AUTH listeners share (one throttle for all), or
    C{None} without C{[auth]}.

    @param build: builds a plugin from a L{mailrelay.config.PluginSpec} and an interface
        (for a site checker, C{[auth.checker]}).
    @param carried: what a reload keeps: the throttle (its failure counts) is reused when its
        window is unchanged.
    @raise ConfigError: the site checker is unknown, refuses its options, or does not check
        user names and passwords.
    """
    if carried is not None:
        carried.passwords = None
    if config.auth is None:
        return None
    from mailrelay.receive.auth import (
        MAX_CONCURRENT_CHECKS,
        AuthPolicy,
        MemoryAuthThrottle,
        PasswordFileChecker,
        makePortal,
    )

    a = config.auth
    timeout = 30.0
    checkerName = None
    if a.checker is not None:
        from twisted.cred.checkers import ICredentialsChecker
        from twisted.cred.credentials import UsernamePassword

        assert build is not None, "a site checker needs the plugin builder"
        checker = build(a.checker, ICredentialsChecker)
        sample = UsernamePassword(b"user", b"password")
        if not any(i.providedBy(sample) for i in getattr(checker, "credentialInterfaces", ())):
            raise ConfigError(
                f"plugin {a.checker.plugin!r} does not check user names and passwords (its "
                "credentialInterfaces lack twisted.cred.credentials.IUsernamePassword)",
                file=config.source or "(embedded default)",
                key="auth.checker.plugin",
            )
        timeout = a.checker.timeout
        checkerName = a.checker.plugin
        log.info("AUTH: users checked by plugin {plugin}", plugin=a.checker.plugin)
    else:
        assert a.passwordFile is not None
        # Each process serving SMTP (the relay and its acceptor processes) checks with its
        # own checker: the bound of checks at once (memory and CPUs) is shared among them.
        processes = resolveProcessCount(config.processes)
        checker = PasswordFileChecker(
            a.passwordFile, users=a.users,
            concurrency=max(1, MAX_CONCURRENT_CHECKS // processes),
        )  # fmt: skip
        if carried is not None:
            carried.passwords = checker
    throttle = None
    if carried is not None and carried.throttleWindow == a.failureWindow:
        throttle = carried.throttle  # a reload does not forgive failures
    if throttle is None:
        throttle = MemoryAuthThrottle(reactor, window=a.failureWindow)
    if carried is not None:
        carried.throttle, carried.throttleWindow = throttle, a.failureWindow
    return AuthPolicy(
        portal=makePortal([checker]),
        throttle=throttle,
        settings=a,
        timeout=timeout,
        checkerName=checkerName,
    )
