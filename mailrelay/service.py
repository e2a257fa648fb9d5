"""Wiring: from a L{Config} to the running services (spool, listeners)."""

from __future__ import annotations

from typing import Any

from twisted.application.service import MultiService, Service
from twisted.internet import endpoints
from twisted.logger import Logger

from mailrelay.config import Config
from mailrelay.errors import ConfigError
from mailrelay.interfaces import (
    IDeliveryBackend,
    IHeaderStamper,
    IRecipientValidator,
    PluginContext,
)
from mailrelay.plugins import availablePlugins, buildPlugin
from mailrelay.policy import ConfiguredValidator, RecipientPolicy, RelayControl
from mailrelay.smtp.protocol import ListenerContext, SMTPServerFactory
from mailrelay.smtp.server import SessionSettings
from mailrelay.spool import Spool, SpoolError
from mailrelay.stamping import ConfiguredStamper

log = Logger()


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


class ListenerService(Service):
    """Listens on one endpoint; a failure to listen stops start-up with a clear message."""

    def __init__(self, reactor: Any, description: str, factory: Any, role: str = "") -> None:
        self.reactor = reactor
        self.description = description
        self.factory = factory
        self.role = role
        self.port: Any = None

    def privilegedStartService(self) -> None:
        endpoint = endpoints.serverFromString(self.reactor, self.description)
        d = endpoint.listen(self.factory)
        result: list[Any] = []
        d.addBoth(result.append)
        if not result:  # pragma: no cover - every stream endpoint we know listens at once
            raise SystemExit(f"mailrelay: error: listener {self.description} did not start")
        outcome = result[0]
        if hasattr(outcome, "getErrorMessage"):
            raise SystemExit(
                f"mailrelay: error: cannot listen on {self.description}: {outcome.getErrorMessage()}"
            )
        self.port = outcome
        host = self.port.getHost()
        log.info(
            "listening on {host}:{port} ({endpoint}{role})",
            host=getattr(host, "host", host),
            port=getattr(host, "port", ""),
            endpoint=self.description,
            role=f"; {self.role}" if self.role else "",
        )
        super().privilegedStartService()

    def stopService(self) -> Any:
        super().stopService()
        if self.port is not None:
            port, self.port = self.port, None
            return port.stopListening()
        return None


class RelayService(MultiService):
    """The whole relay.  If start-up fails, what already started (the spool's threads) is
    stopped, so that the process can exit instead of hanging on live threads."""

    def privilegedStartService(self) -> None:
        try:
            super().privilegedStartService()
        except BaseException:
            for child in self:
                if isinstance(child, SpoolService):
                    child.spool.stop()
            raise


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
    from mailrelay.route import MXResolver, makeResolver
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
    from mailrelay.route import RoutingTable

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
        ),
        # A site backend's [[backends]] timeout; the built-in ones keep the policy's bound.
        timeouts={spec.name: spec.timeout for spec in config.backends},
    )
    return [BackendsService(backends), queue], queue


def makeRelayService(
    config: Config, reactor: Any, overrides: dict[str, Any] | None = None
) -> MultiService:
    """Build the whole relay from a checked configuration.

    @param overrides: the command-line options the configuration was loaded with; the
        delivery process loads the same configuration with them.
    @raise ConfigError: a plugin is unknown or refuses its options.
    """
    top = RelayService()
    build = pluginBuilder(config, reactor)

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

    spool = makeSpool(config, reactor, top)

    # Routes and backends are built here in every mode, so that their errors stop start-up.
    deliveryServices, queue = makeDelivery(config, reactor, spool, build)
    if config.queue.hold:
        log.warn("queue.hold is set: mail is accepted and spooled, nothing is delivered")
        onQueued = None
    elif config.queue.process == "inline":
        # Children stop in reverse order: listeners, then the queue, then the backends,
        # then the spool.
        for service in deliveryServices:
            service.setServiceParent(top)
        onQueued = queue.enqueue
    else:
        from mailrelay.qmgrprocess import DeliveryProcessService

        process = DeliveryProcessService(reactor, config.source, overrides or {})
        process.setServiceParent(top)
        onQueued = process.enqueue

    resolver = None
    if config.reverseDNS:
        from mailrelay.route import makeResolver

        # The same servers as delivery uses: [dns] nameservers, or the system's.
        resolver = makeResolver(list(config.nameservers) or None, reactor=reactor)

    authPolicy = makeAuthPolicy(config, reactor, build)
    from mailrelay.limits import LIMITER_TIMEOUT, ListenerLimits, MemoryRateLimiter

    # One limiter for all listeners (their keys differ): in memory, or a site's shared one.
    if config.rateLimiter is not None:
        from mailrelay.interfaces import IRateLimiter

        limiter: Any = build(config.rateLimiter, IRateLimiter)
        limiterTimeout = config.rateLimiter.timeout
        log.info("limits: counters kept by plugin {plugin}", plugin=config.rateLimiter.plugin)
    else:
        limiter = MemoryRateLimiter(reactor)
        limiterTimeout = LIMITER_TIMEOUT
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
        )
        factory: Any = SMTPServerFactory(ctx)
        if listener.tls_mode == "implicit":
            from twisted.protocols.tls import TLSMemoryBIOFactory

            assert tlsOptions is not None
            factory = TLSMemoryBIOFactory(tlsOptions, False, factory)
        if listener.proxy_protocol:
            from mailrelay.proxy import ProxyProtocolFactory

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
        ListenerService(reactor, listener.endpoint, factory, role).setServiceParent(top)
    return top


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
    from mailrelay.tls import TLSConfigError, loadServerTLS

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
    from mailrelay.tls import SNIServerOptions

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


def makeAuthPolicy(config: Config, reactor: Any, build: Any = None) -> Any:
    """The L{mailrelay.auth.AuthPolicy} all AUTH listeners share (one throttle for all), or
    C{None} without C{[auth]}.

    @param build: builds a plugin from a L{mailrelay.config.PluginSpec} and an interface
        (for a site checker, C{[auth.checker]}).
    @raise ConfigError: the site checker is unknown, refuses its options, or does not check
        user names and passwords.
    """
    if config.auth is None:
        return None
    from mailrelay.auth import AuthPolicy, MemoryAuthThrottle, PasswordFileChecker, makePortal

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
    return AuthPolicy(
        portal=makePortal([checker]),
        throttle=MemoryAuthThrottle(reactor, window=a.failureWindow),
        throttleAfter=a.throttleAfter,
        failureDelay=a.failureDelay,
        maxFailures=a.maxFailures,
        senders=dict(a.senders),
        mechanisms=a.mechanisms,
        timeout=timeout,
    )
