"""Wiring: from a L{Config} to the running services (spool, listeners)."""

from __future__ import annotations

from typing import Any

from twisted.application.service import MultiService, Service
from twisted.internet import endpoints
from twisted.logger import Logger

from mailrelay.config import Config
from mailrelay.errors import ConfigError
from mailrelay.interfaces import IHeaderStamper, IRecipientValidator, PluginContext
from mailrelay.plugins import availablePlugins, buildPlugin
from mailrelay.policy import ConfiguredValidator, RecipientPolicy, RelayControl
from mailrelay.smtp.protocol import ListenerContext, SMTPServerFactory
from mailrelay.smtp.server import SessionSettings
from mailrelay.spool import Spool, SpoolError

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

    def __init__(self, reactor: Any, description: str, factory: SMTPServerFactory) -> None:
        self.reactor = reactor
        self.description = description
        self.factory = factory
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
            "listening on {host}:{port} ({endpoint})",
            host=getattr(host, "host", host),
            port=getattr(host, "port", ""),
            endpoint=self.description,
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


def makeRelayService(config: Config, reactor: Any) -> MultiService:
    """Build the whole relay from a checked configuration.

    @raise ConfigError: a plugin is unknown or refuses its options.
    """
    top = RelayService()
    context = PluginContext(hostname=config.hostname, configDir=config.configDir, reactor=reactor)
    available = availablePlugins()

    def build(spec: Any, interface: Any) -> Any:
        try:
            return buildPlugin(available, spec.plugin, interface, spec.options, context)
        except ConfigError as e:
            raise e.within(file=config.source or "(embedded default)", key=spec.key) from e

    validators = [
        ConfiguredValidator(spec.plugin, build(spec, IRecipientValidator), spec.timeout)
        for spec in config.recipientValidators
    ]
    stampers = [build(spec, IHeaderStamper) for spec in config.headerStampers]
    relay = RelayControl(config.relayNetworks, config.acceptDomains, config.hostname)
    policy = RecipientPolicy(relay, validators, reactor)

    spool = Spool(config.spoolDirectory, reactor=reactor, minFreeSpace=config.minFreeSpace)
    SpoolService(spool).setServiceParent(top)

    resolver = None
    if config.reverseDNS:
        from twisted.names import client

        resolver = client.createResolver()

    for listener in config.listeners:
        settings = SessionSettings(
            hostname=config.hostname,
            maxMessageSize=config.maxMessageSize,
            maxRecipients=config.maxRecipients,
            maxErrors=config.maxErrors,
            bareNewline=listener.bare_newline,
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
            },
            idleTimeout=config.idleTimeout,
            dataTimeout=config.dataTimeout,
            maxHops=config.maxHops,
            resolver=resolver,
        )
        ListenerService(reactor, listener.endpoint, SMTPServerFactory(ctx)).setServiceParent(top)
    return top
