"""Wiring: from a L{Config} to the running services (spool, listeners)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from twisted.application.service import MultiService, Service
from twisted.internet import endpoints
from twisted.internet.defer import Deferred, DeferredList, maybeDeferred, succeed
from twisted.internet.protocol import Factory
from twisted.logger import Logger

from mailrelay.app.plugins import availablePlugins, buildPlugin
from mailrelay.cleanup.stamping import ConfiguredStamper
from mailrelay.config import Config, loadConfig, readConfigFile
from mailrelay.errors import ConfigError
from mailrelay.interfaces import (
    IDeliveryBackend,
    IHeaderStamper,
    IRecipientValidator,
    PluginContext,
)
from mailrelay.policy.chain import ConfiguredValidator, RecipientPolicy, RelayControl
from mailrelay.receive.protocol import ListenerContext, Sessions, SMTPServerFactory
from mailrelay.smtp.server import SessionSettings
from mailrelay.spool import Spool, SpoolError

log = Logger()


class OrderedMultiService(MultiService):
    """A L{MultiService} that stops its children one at a time, the last added first, each
    once the one before has finished stopping (Twisted's own stops them all at once): the
    listeners stop before the sessions drain, the queue manager has recorded its deliveries
    before the backends close, and the spool closes last.

    Before the first child stops, every child with a C{beginShutdown} method is told that
    the whole service is stopping.
    """

    def stopService(self) -> Deferred[None]:
        Service.stopService(self)
        children = list(self)[::-1]
        for child in children:
            begin = getattr(child, "beginShutdown", None)
            if callable(begin):
                begin()
        d: Deferred[Any] = succeed(None)
        for child in children:
            d.addCallback(lambda _, child=child: maybeDeferred(child.stopService))
            d.addErrback(
                lambda f, child=child: log.failure(
                    "stopping {service} failed", f, service=child.name or repr(child)
                )
            )
        return d.addCallback(lambda _: None)


class SpoolService(Service):
    """Starts the spool (crash recovery, thread pool) before the listeners, stops it after."""

    name = "spool"

    def __init__(self, spool: Spool) -> None:
        self.spool = spool

    def privilegedStartService(self) -> None:
        try:
            ids = self.spool.start()
        except SpoolError as e:
            raise SystemExit(f"mailrelay: error: {e}") from e
        log.info("spool {path}: {count} queued entries", path=str(self.spool.directory), count=len(ids))
        super().privilegedStartService()

    def stopService(self) -> Any:
        super().stopService()
        self.spool.stop()


class SessionsService(Service):
    """Stops the SMTP sessions gracefully once the listeners have stopped: idle sessions get
    C{421 4.3.2 Service shutting down} at once; a session with a message in hand may finish
    it within the drain time, and gets its 250 only once the message is durable."""

    name = "sessions"

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
    """

    def __init__(self, reactor: Any, description: str, factory: Any, role: str = "") -> None:
        self.reactor = reactor
        self.description = description
        self._switch = _SwitchFactory(factory)
        self.role = role
        self.port: Any = None

    @property
    def factory(self) -> Any:
        return self._switch.current

    def switch(self, factory: Any, role: str) -> None:
        """New connections are built by C{factory} from now on (a reload)."""
        self._switch.switch(factory)
        self.role = role

    def listen(self) -> None:
        """Start listening.  @raise ListenError: naming the endpoint and the reason."""
        endpoint = endpoints.serverFromString(self.reactor, self.description)
        d = endpoint.listen(self._switch)
        result: list[Any] = []
        d.addBoth(result.append)
        if not result:  # pragma: no cover - every stream endpoint we know listens at once
            raise ListenError(f"listener {self.description} did not start")
        outcome = result[0]
        if hasattr(outcome, "getErrorMessage"):
            raise ListenError(f"cannot listen on {self.description}: {outcome.getErrorMessage()}")
        self.port = outcome
        host = self.port.getHost()
        log.info(
            "listening on {host}:{port} ({endpoint}{role})",
            host=getattr(host, "host", host),
            port=getattr(host, "port", ""),
            endpoint=self.description,
            role=f"; {self.role}" if self.role else "",
        )

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


class BackendsService(Service):
    """Closes the delivery backends (quits cached connections) after the queue has stopped."""

    name = "backends"

    def __init__(self, backends: dict[str, Any]) -> None:
        self.backends = backends

    def stopService(self) -> Any:
        super().stopService()
        from twisted.internet.defer import DeferredList, maybeDeferred

        closing = [
            maybeDeferred(backend.close)
            for backend in self.backends.values()
            if callable(getattr(backend, "close", None))
        ]
        return DeferredList(closing, consumeErrors=True)


def makeBackends(config: Config, reactor: Any, build: Any) -> dict[str, Any]:
    """The built-in delivery backends, configured, and the site backends (plugins).  Each
    route's options are applied by its backend at delivery time, over these defaults."""
    import dataclasses

    from mailrelay.delivery.discard import DiscardBackend
    from mailrelay.delivery.lmtp import LMTPBackend
    from mailrelay.delivery.maildir import MaildirBackend
    from mailrelay.delivery.smtp import SMTPBackend
    from mailrelay.route.table import MXResolver, makeResolver
    from mailrelay.smtp.client import ClientSettings, ClientTimeouts

    source = config.source or "(embedded default)"
    delivery = config.delivery
    try:
        base = ClientSettings(
            heloName=delivery.heloName or config.hostname,
            tls=delivery.tls,
            caFile=delivery.caFile,
            timeouts=ClientTimeouts(**delivery.timeouts),
        )
        lmtpBase = dataclasses.replace(base, lmtp=True, tls="none", caFile=None)
        resolver = makeResolver(list(config.nameservers) or None, reactor=reactor)
        backends: dict[str, Any] = {
            "smtp": SMTPBackend(
                reactor,
                MXResolver(resolver, reactor),
                base,
                destinationConcurrency=delivery.destinationConcurrency,
                connectionCacheTime=delivery.connectionCacheTime,
            ),
            "lmtp": LMTPBackend(
                reactor,
                lmtpBase,
                concurrency=delivery.destinationConcurrency,
            ),
            "maildir": MaildirBackend(reactor, hostname=config.hostname),
            "discard": DiscardBackend(),
        }
    except ValueError as e:
        raise ConfigError(str(e), file=source, key="delivery") from e
    for spec in config.backends:
        backends[spec.name] = build(spec, IDeliveryBackend)
    return backends


def makeSpool(config: Config, reactor: Any, parent: Any, recover: bool = True) -> Spool:
    """The spool of C{config}, started (and stopped) by a L{SpoolService} under C{parent}."""
    spool = Spool(
        config.spoolDirectory,
        reactor=reactor,
        minFreeSpace=config.minFreeSpace,
        syncMethod=config.spoolSync,
        recover=recover,
    )
    SpoolService(spool).setServiceParent(parent)
    return spool


def pluginBuilder(config: Config, reactor: Any) -> Any:
    """C{build(spec, interface)}: builds the plugin a configuration entry names; a
    L{ConfigError} names the file and the entry's key."""
    context = PluginContext(hostname=config.hostname, configDir=config.configDir, reactor=reactor)
    available = availablePlugins()

    def build(spec: Any, interface: Any) -> Any:
        try:
            return buildPlugin(available, spec.plugin, interface, spec.options, context)
        except ConfigError as e:
            raise e.within(file=config.source or "(embedded default)", key=spec.key) from e

    return build


def makeDelivery(config: Config, reactor: Any, spool: Any, build: Any) -> tuple[list[Any], Any]:
    """The delivery side over C{spool}: the backends' service and the queue manager (to be
    started in that order), and the queue manager.

    @raise ConfigError: a route or a backend plugin is refused.
    """
    from mailrelay.queue import QueueManager, QueuePolicy
    from mailrelay.queue.lock import QueueLock
    from mailrelay.route.table import RoutingTable

    try:
        router = RoutingTable.fromConfig(config)
    except ValueError as e:
        raise ConfigError(str(e), file=config.source or "(embedded default)", key="routes") from e
    backends = makeBackends(config, reactor, build)
    q = config.queue
    queue = QueueManager(
        spool,
        router,
        backends,
        reactor,
        hostname=config.hostname,
        policy=QueuePolicy(
            minBackoff=q.minBackoff,
            maxBackoff=q.maxBackoff,
            maxLifetime=q.maxLifetime,
            bounceLifetime=q.bounceLifetime,
            delayWarning=q.delayWarning,
            activeLimit=q.activeLimit,
            postmaster=q.postmaster,
            stopTimeout=config.drainTime,
        ),
        # A site backend's [[backends]] timeout; the built-in ones keep the policy's bound.
        timeouts={spec.name: spec.timeout for spec in config.backends},
        lock=QueueLock(config.spoolDirectory, reactor),
    )
    return [BackendsService(backends), queue], queue


class InlineDelivery(Service):
    """The queue manager and the backends in the relay's own process (C{[queue] process =
    "inline"}), replaceable by a reload; with C{hold}, nothing is delivered."""

    name = "delivery"

    def __init__(self, services: list[Any], queue: Any, hold: bool) -> None:
        self._current = self._group(services)
        self.queue = queue
        self.hold = hold
        self._retiring: list[Deferred[None]] = []

    @staticmethod
    def _group(services: list[Any]) -> OrderedMultiService:
        group = OrderedMultiService()
        for service in services:
            service.setServiceParent(group)
        return group

    def startService(self) -> None:
        super().startService()
        if not self.hold:
            self._current.startService()

    def enqueue(self, queueID: str) -> None:
        if not self.hold:
            self.queue.enqueue(queueID)

    def reload(self, services: list[Any], queue: Any, hold: bool) -> None:
        """Deliver with C{services} from now on: the new queue manager starts at once and
        begins delivering when the old one, stopping meanwhile, has recorded its deliveries
        and released the queue lock."""
        old = self._current
        self._current, self.queue, self.hold = self._group(services), queue, hold
        if self.running and not hold:
            self._current.startService()
        if old.running:
            d = old.stopService()
            self._retiring.append(d)
            d.addBoth(lambda _: self._retiring.remove(d))

    def stopService(self) -> Deferred[None]:
        super().stopService()
        stopping = list(self._retiring)
        if self._current.running:
            stopping.append(self._current.stopService())
        return DeferredList(stopping, consumeErrors=True).addCallback(lambda _: None)


#: Settings a reload cannot change: the running relay keeps them until it is restarted.
_RESTART_ONLY = (
    ("spoolDirectory", "spool.directory"),
    ("spoolSync", "spool.sync"),
)


@dataclass
class _Carried:
    """What a reload keeps: counters that must not restart from zero, resolvers."""

    limiter: Any = None
    limiterSpec: Any = None
    throttle: Any = None
    throttleWindow: float | None = None
    counts: dict[str, Any] = field(default_factory=dict)
    resolvers: dict[Any, Any] = field(default_factory=dict)


@dataclass
class _Plan:
    """A configuration built and checked, ready to run."""

    config: Config
    configText: bytes | None
    #: C{(endpoint, factory, role)} of each listener, in the configuration's order.
    listeners: list[tuple[str, Any, str]]
    #: The delivery side's services and queue manager (built in every mode: this checks the
    #: routes and backends).
    delivery: tuple[list[Any], Any]


class RelayService(OrderedMultiService):
    """The whole relay: the spool, the delivery side, the sessions and the listeners, started
    in that order and stopped in the reverse one (see L{OrderedMultiService}).

    L{reload} (on SIGHUP) re-reads the configuration file, builds and checks everything,
    and only then replaces what runs; if anything is wrong the relay keeps running as it was.
    """

    def __init__(
        self,
        reactor: Any,
        configPath: str | None = None,
        overrides: dict[str, Any] | None = None,
    ) -> None:
        super().__init__()
        self.reactor = reactor
        self.configPath = configPath
        self.overrides = dict(overrides or {})
        self.sessions = Sessions()
        self.carried = _Carried()
        self.config: Config | None = None
        self.spool: Spool | None = None
        self.delivery: Any = None
        self.listeners: dict[str, ListenerService] = {}
        self._sessionsService: SessionsService | None = None

    def privilegedStartService(self) -> None:
        # If start-up fails, what already started (the spool's threads) is stopped, so that
        # the process can exit instead of hanging on live threads.
        try:
            super().privilegedStartService()
        except BaseException:
            if self.spool is not None:
                self.spool.stop()
            raise

    def enqueue(self, queueID: str) -> None:
        """A message was committed: hand it to the delivery side."""
        if self.delivery is not None:
            self.delivery.enqueue(queueID)

    def plan(self, config: Config, configText: bytes | None) -> _Plan:
        """Build everything C{config} describes, without touching what runs.

        @raise ConfigError: a plugin, certificate, password file, route or backend is refused.
        """
        assert self.spool is not None
        build = pluginBuilder(config, self.reactor)
        delivery = makeDelivery(config, self.reactor, self.spool, build)
        listeners = makeListeners(
            config, self.reactor, build, self.carried, self.spool, self.sessions, self.enqueue
        )
        return _Plan(config, configText, listeners, delivery)

    def build(self, plan: _Plan) -> None:
        """Add the services of the first configuration."""
        config = self.config = plan.config
        assert self.spool is not None
        if config.queue.hold:
            log.warn("queue.hold is set: mail is accepted and spooled, nothing is delivered")
        services, queue = plan.delivery
        if config.queue.process == "inline":
            self.delivery = InlineDelivery(services, queue, config.queue.hold)
        else:
            from mailrelay.app.deliveryprocess import DeliveryProcessService

            self.delivery = DeliveryProcessService(
                self.reactor,
                config.source,
                self.overrides,
                configText=plan.configText,
                drainTime=config.drainTime,
                hold=config.queue.hold,
            )
        self.delivery.setServiceParent(self)
        self._sessionsService = SessionsService(self.sessions, self.reactor, config.drainTime)
        self._sessionsService.setServiceParent(self)
        for endpoint, factory, role in plan.listeners:
            listener = ListenerService(self.reactor, endpoint, factory, role)
            listener.setServiceParent(self)
            self.listeners[endpoint] = listener

    def reload(self) -> bool:
        """Re-read the configuration file and run on it, or log why not and keep running on
        the one in use.  Returns whether the new configuration is in use."""
        if not self.running:
            return False
        source = self.configPath or "(embedded default)"
        try:
            text = readConfigFile(self.configPath) if self.configPath is not None else None
            config = loadConfig(self.configPath, self.overrides, text=text)
            self._checkReloadable(config)
            plan = self.plan(config, text)
            added = self._listenNew(plan)
        except (ConfigError, ListenError) as e:
            log.error(
                "configuration not reloaded (still running on the previous one): {error}",
                error=str(e),
            )
            return False
        except Exception:
            log.failure("configuration not reloaded (still running on the previous one)")
            return False
        self._swap(plan, added)
        log.info("configuration reloaded from {source}", source=source)
        return True

    def _checkReloadable(self, config: Config) -> None:
        old = self.config
        assert old is not None
        for attribute, key in _RESTART_ONLY:
            if getattr(config, attribute) != getattr(old, attribute):
                raise ConfigError(
                    f"changed from {getattr(old, attribute)} to {getattr(config, attribute)}: "
                    "a restart is needed for this setting",
                    file=config.source or "(embedded default)",
                    key=key,
                )
        if config.queue.process != old.queue.process:
            raise ConfigError(
                f"changed from {old.queue.process!r} to {config.queue.process!r}: a restart is "
                "needed for this setting",
                file=config.source or "(embedded default)",
                key="queue.process",
            )

    def _listenNew(self, plan: _Plan) -> list[ListenerService]:
        """Listen on the endpoints the new configuration adds; if one cannot be listened
        on, close those just opened and raise L{ListenError}."""
        added: list[ListenerService] = []
        for endpoint, factory, role in plan.listeners:
            if endpoint in self.listeners:
                continue
            listener = ListenerService(self.reactor, endpoint, factory, role)
            try:
                listener.listen()
            except ListenError:
                for opened in added:
                    opened.stopService()
                raise
            added.append(listener)
        return added

    def _swap(self, plan: _Plan, added: list[ListenerService]) -> None:
        config = plan.config
        assert self.spool is not None
        self.config = config
        self.spool.minFreeSpace = config.minFreeSpace
        wanted = {endpoint: (factory, role) for endpoint, factory, role in plan.listeners}
        for endpoint, listener in list(self.listeners.items()):
            if endpoint in wanted:
                listener.switch(*wanted[endpoint])
            else:
                del self.listeners[endpoint]
                listener.disownServiceParent()  # stops listening; its sessions carry on
                log.info("listener {endpoint} removed", endpoint=endpoint)
        for listener in added:
            listener.setServiceParent(self)  # already listening: startService only
            self.listeners[listener.description] = listener
        assert self._sessionsService is not None
        self._sessionsService.drainTime = config.drainTime
        services, queue = plan.delivery
        if config.queue.process == "inline":
            self.delivery.reload(services, queue, config.queue.hold)
        else:
            self.delivery.reload(plan.configText, self.overrides, config.drainTime, config.queue.hold)


def makeRelayService(
    config: Config,
    reactor: Any,
    overrides: dict[str, Any] | None = None,
    configText: bytes | None = None,
) -> RelayService:
    """Build the whole relay from a checked configuration.

    @param overrides: the command-line options the configuration was loaded with; the
        delivery process loads the same configuration with them, and so does a reload.
    @param configText: the bytes of the configuration file C{config} was loaded from (the
        delivery process gets them rather than reading the file, which may have changed).
    @raise ConfigError: a plugin is unknown or refuses its options.
    """
    top = RelayService(reactor, config.source, overrides)
    top.spool = makeSpool(config, reactor, top)
    top.build(top.plan(config, configText))
    return top


def makeListeners(
    config: Config,
    reactor: Any,
    build: Any,
    carried: _Carried,
    spool: Any,
    sessions: Sessions,
    onQueued: Any,
) -> list[tuple[str, Any, str]]:
    """The C{(endpoint, factory, role)} of every listener of C{config}, their plugins built
    and certificates loaded.  Counters in C{carried} (rate limits, AUTH failures, connections
    per listener) are reused, so that a reload does not reset them.

    @raise ConfigError: a plugin is unknown or refuses its options, a certificate is refused.
    """
    validators = [
        ConfiguredValidator(spec.plugin, build(spec, IRecipientValidator), spec.timeout)
        for spec in config.recipientValidators
    ]
    stampers = [
        ConfiguredStamper(spec.plugin, build(spec, IHeaderStamper), spec.timeout)
        for spec in config.headerStampers
    ]
    relay = RelayControl(config.relayNetworks, config.acceptDomains, config.hostname)
    policy = RecipientPolicy(relay, validators, reactor)

    resolver = None
    if config.reverseDNS:
        from mailrelay.route.table import makeResolver

        # The same servers as delivery uses: [dns] nameservers, or the system's.
        resolver = carried.resolvers.get(config.nameservers)
        if resolver is None:
            resolver = makeResolver(list(config.nameservers) or None, reactor=reactor)
            carried.resolvers[config.nameservers] = resolver

    authPolicy = makeAuthPolicy(config, reactor, build, carried)
    from mailrelay.receive.limits import (
        LIMITER_TIMEOUT,
        ConnectionCount,
        ListenerLimits,
        MemoryRateLimiter,
    )

    # One limiter for all listeners (their keys differ): in memory, or a site's shared one.
    if config.rateLimiter is not None:
        from mailrelay.interfaces import IRateLimiter

        if carried.limiterSpec == config.rateLimiter:
            limiter: Any = carried.limiter
        else:
            limiter = build(config.rateLimiter, IRateLimiter)
            log.info("limits: counters kept by plugin {plugin}", plugin=config.rateLimiter.plugin)
        limiterTimeout = config.rateLimiter.timeout
    else:
        limiter = carried.limiter if carried.limiterSpec is None else None
        if not isinstance(limiter, MemoryRateLimiter):
            limiter = MemoryRateLimiter(reactor)
        limiterTimeout = LIMITER_TIMEOUT
    carried.limiter, carried.limiterSpec = limiter, config.rateLimiter
    result = []
    for listener in config.listeners:
        tls = loadListenerTLS(config, listener)
        tlsOptions = None
        if tls is not None:
            tlsOptions = tls.options
            if listener.tls_certificates:
                tlsOptions = loadListenerSNI(config, listener, tls)
        settings = SessionSettings(
            hostname=config.hostname,
            maxMessageSize=config.maxMessageSize,
            maxRecipients=config.maxRecipients,
            maxErrors=config.maxErrors,
            bareNewline=listener.bare_newline,
            nulBytes=listener.nul_bytes,
            starttls=listener.tls_mode == "starttls",
            authMechanisms=authPolicy.mechanisms if listener.auth and authPolicy else (),
            authWithoutTLS=listener.auth_without_tls,
            requireAuth=listener.mode != "relay",
            rejectUnauthPipelining=listener.reject_unauth_pipelining,
            rejectPregreet=listener.reject_unauth_pipelining or listener.greet_pause > 0,
        )
        count = carried.counts.setdefault(listener.endpoint, ConnectionCount())
        limits = ListenerLimits(
            hostname=config.hostname,
            listener=listener.endpoint,
            limiter=limiter,
            clock=reactor,
            timeout=limiterTimeout,
            maxConnections=listener.max_connections,
            maxConnectionsPerClient=listener.max_connections_per_client,
            connectionRateLimit=listener.connection_rate_limit,
            messageRateLimit=listener.message_rate_limit,
            userMessageRateLimit=listener.user_message_rate_limit,
            rateWindow=listener.rate_window,
            ipv6PrefixLength=listener.ipv6_prefix_length,
            exceptions=(
                config.relayNetworks
                if listener.limit_exceptions is None
                else listener.limit_exceptions
            ),
            count=count,
        )
        ctx = ListenerContext(
            settings=settings,
            policy=policy,
            spool=spool,
            stampers=stampers,
            clock=reactor,
            listenerName=listener.endpoint,
            listenerOptions={
                "add_message_id": listener.add_message_id,
                "add_date": listener.add_date,
                "bare_newline": listener.bare_newline,
                "mode": listener.mode,
                "tls_mode": listener.tls_mode,
            },
            idleTimeout=config.idleTimeout,
            dataTimeout=config.dataTimeout,
            maxHops=config.maxHops,
            resolver=resolver,
            onQueued=onQueued,
            tlsOptions=tlsOptions,
            implicitTLS=listener.tls_mode == "implicit",
            auth=authPolicy if listener.auth else None,
            limits=limits,
            greetPause=listener.greet_pause,
            maxSessionTime=listener.max_session_time,
            minDataRate=listener.min_data_rate,
            sessions=sessions,
        )
        factory: Any = SMTPServerFactory(ctx)
        if listener.tls_mode == "implicit":
            from twisted.protocols.tls import TLSMemoryBIOFactory

            assert tlsOptions is not None
            factory = TLSMemoryBIOFactory(tlsOptions, False, factory)
        if listener.proxy_protocol:
            from mailrelay.receive.proxy import ProxyProtocolFactory

            factory = ProxyProtocolFactory(
                factory, listener.proxy_networks, reactor, listenerName=listener.endpoint
            )
        role = listener.mode
        if listener.tls_mode != "none":
            role += ", STARTTLS" if listener.tls_mode == "starttls" else ", implicit TLS"
            if listener.tls_certificates:
                role += f" (+{len(listener.tls_certificates)} SNI)"
        if listener.auth:
            role += ", AUTH"
        if listener.proxy_protocol:
            role += ", PROXY from " + " ".join(str(n) for n in listener.proxy_networks)
        result.append((listener.endpoint, factory, role))
    return result


def loadListenerTLS(
    config: Config,
    listener: Any,
    certificate: str | None = None,
    key: str | None = None,
    what: str = "certificate",
) -> Any:
    """The listener's L{mailrelay.tls.ServerTLS} (its certificate loaded again: the
    configuration checked it), or C{None} without TLS; warnings (an expired certificate) are
    logged.  With C{certificate} and C{key}, that certificate (an SNI one) instead."""
    if certificate is None:
        if listener.tls_certificate is None:
            return None
        certificate = listener.tls_certificate
        key = listener.tls_key or listener.tls_certificate
    from mailrelay.receive.tls import TLSConfigError, loadServerTLS

    try:
        tls = loadServerTLS(
            certificate,
            key or certificate,
            minVersion=listener.tls_min_version,
            ciphers=listener.tls_ciphers,
        )
    except TLSConfigError as e:  # the file changed since the configuration was checked
        raise ConfigError(str(e), file=config.source, key="listeners") from e
    for warning in tls.warnings:
        log.warn("listener {endpoint}: {warning}", endpoint=listener.endpoint, warning=warning)
    log.info(
        "listener {endpoint}: {what} {subject}, valid until {notAfter}",
        endpoint=listener.endpoint,
        what=what,
        subject=tls.subject,
        notAfter=tls.notAfter.strftime("%Y-%m-%d"),
    )
    return tls


def loadListenerSNI(config: Config, listener: Any, default: Any) -> Any:
    """The listener's L{mailrelay.tls.SNIServerOptions}: C{default} (its L{ServerTLS}) and the
    certificates of C{tls_certificates} by server name."""
    from mailrelay.receive.tls import SNIServerOptions

    byName = {}
    for entry in listener.tls_certificates:
        tls = loadListenerTLS(
            config,
            listener,
            certificate=entry.certificate,
            key=entry.key,
            what=f"certificate for {entry.server_name}",
        )
        byName[entry.server_name] = tls.options
    return SNIServerOptions(default.options, byName)


def makeAuthPolicy(config: Config, reactor: Any, build: Any = None, carried: Any = None) -> Any:
    """The L{mailrelay.auth.AuthPolicy} all AUTH listeners share (one throttle for all), or
    C{None} without C{[auth]}.

    @param build: builds a plugin from a L{mailrelay.config.PluginSpec} and an interface
        (for a site checker, C{[auth.checker]}).
    @param carried: what a reload keeps: the throttle (its failure counts) is reused when its
        window is unchanged.
    @raise ConfigError: the site checker is unknown, refuses its options, or does not check
        user names and passwords.
    """
    if config.auth is None:
        return None
    from mailrelay.receive.auth import (
        AuthPolicy,
        MemoryAuthThrottle,
        PasswordFileChecker,
        makePortal,
    )

    a = config.auth
    timeout = 30.0
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
        log.info("AUTH: users checked by plugin {plugin}", plugin=a.checker.plugin)
    else:
        assert a.passwordFile is not None
        checker = PasswordFileChecker(a.passwordFile, users=a.users)
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
        throttleAfter=a.throttleAfter,
        failureDelay=a.failureDelay,
        maxFailures=a.maxFailures,
        senders=dict(a.senders),
        mechanisms=a.mechanisms,
        timeout=timeout,
    )
