"""The C{lmtp} backend: hands messages to a mail store over LMTP (RFC 2033).

The route's next hop is C{"unix:/path/to/socket"}, C{"host:port"}, C{"[host]:port"} or
C{"[2001:db8::1]:port"} (see L{parseLMTPNexthop <mailrelay.route.nexthop.parseLMTPNexthop>}:
the port is required, LMTP has no standard port).  Host names are resolved by the reactor's
name resolver (C{HostnameEndpoint}), without MX lookup.  Each delivery opens a connection
(at most C{concurrency} at once per next hop), sends the message, takes the per-recipient
replies LMTP gives after DATA, and quits.

A connection failure defers every recipient (transient; a 5xx greeting too: a store that
refuses connections is a problem to fix, not a reason to bounce).  A bad next hop defers
every recipient with 4.3.5 (system incorrectly configured).

A route with C{tls = "may"} falls back to plaintext as the C{smtp} backend does (see
L{mailrelay.delivery.smtp}): after a TLS failure (the handshake, or the session lost in the
transaction), a message queued for at least C{plaintextFallbackAge} seconds goes to the same
server at once without TLS; a younger one is deferred; never with credentials.
"""

from __future__ import annotations

import dataclasses
import ipaddress
from collections.abc import Callable
from pathlib import Path
from typing import Any

from twisted.internet.defer import Deferred, inlineCallbacks
from twisted.internet.endpoints import (
    HostnameEndpoint,
    TCP4ClientEndpoint,
    TCP6ClientEndpoint,
    UNIXClientEndpoint,
    wrapClientTLS,
)
from twisted.logger import Logger
from zope.interface import implementer

from mailrelay.delivery.common import (
    ClientBackend,
    PerDestination,
    Quitter,
    aboutSecurity,
    builtinOptions,
    firstDeferred,
    resultsForAll,
)
from mailrelay.delivery.connection import connectSMTP
from mailrelay.delivery.tls import clientTLSOptions
from mailrelay.interfaces import DeliveryStatus, IDeliveryBackend, PluginContext, Route
from mailrelay.route.nexthop import parseLMTPNexthop
from mailrelay.smtp.clientsettings import ClientSettings
from mailrelay.smtp.errors import SMTPConnectError

log = Logger()

__all__ = ["LMTPBackend", "build"]


@implementer(IDeliveryBackend)
class LMTPBackend(ClientBackend):
    """Delivers over LMTP (see the module docstring)."""

    def __init__(
        self,
        reactor: Any,
        settings: ClientSettings,
        *,
        concurrency: int = 20,
        connect: Callable[..., Deferred] | None = None,
        plaintextFallbackAge: float = 300.0,
    ) -> None:
        """
        @param reactor: provides C{IReactorTCP}, C{IReactorUNIX} and C{IReactorTime}.
        @param settings: the default client settings, which each route's options override
            (C{lmtp} is forced on; C{tls="none"} is usual for a local store).
        @param concurrency: the most simultaneous connections to one next hop.
        @param connect: the connecting function, C{connectSMTP} by default (for tests).
        @param plaintextFallbackAge: seconds a message must have been queued before a TLS
            failure under C{tls = "may"} is followed by plaintext (the queue's
            C{min_backoff}; see the module's docstring).
        """
        self.reactor = reactor
        self.plaintextFallbackAge = plaintextFallbackAge
        self.settings = settings
        self.concurrency = concurrency
        self._connect = connect
        self._perDestination = PerDestination(
            concurrency, "LMTP", reactor, suspendTime=plaintextFallbackAge
        )
        self._quitter = Quitter(reactor)

    def settingsFor(self, route: Route) -> ClientSettings:
        """The client settings of a delivery along C{route}, with C{lmtp=True}.

        @raise ValueError: the route sets a source address (a router's route: C{[[routes]]}
            refuses one), which LMTP connections are not bound to: the delivery is deferred
            rather than made from the system's choice of address.
        """
        refused = route.options.refusedBy("lmtp")
        if refused is not None:
            raise ValueError(refused)
        settings = super().settingsFor(route)
        return settings if settings.lmtp else dataclasses.replace(settings, lmtp=True)

    def _localNexthop(self, nexthop: str) -> bool:
        """A UNIX socket is on this host: REQUIRETLS does not apply to it (as to a maildir,
        the message reaches the mailbox without crossing a network)."""
        try:
            return bool(parseLMTPNexthop(nexthop).path)  # ("" for a TCP server)
        except ValueError:
            return False

    def _endpoint(self, nexthop: str, settings: ClientSettings) -> tuple[Any, str, str]:
        """The endpoint, TLS host name and Remote-MTA for C{nexthop}."""
        parsed = parseLMTPNexthop(nexthop)
        host, port = parsed.host, parsed.port
        timeout = settings.timeouts.connect
        if parsed.path:
            return (
                UNIXClientEndpoint(self.reactor, parsed.path, timeout=timeout),
                "localhost",
                f"X-unix; {parsed.path}",
            )
        try:
            version: int = ipaddress.ip_address(host).version
        except ValueError:
            version = 0
        if version == 4:
            endpoint: Any = TCP4ClientEndpoint(self.reactor, host, port, timeout=timeout)
            remoteMTA = f"dns; [{host}]"
        elif version == 6:
            endpoint = TCP6ClientEndpoint(self.reactor, host, port, timeout=timeout)
            remoteMTA = f"dns; [{host}]"
        else:
            endpoint = HostnameEndpoint(self.reactor, host.encode("idna"), port, timeout=timeout)
            remoteMTA = f"dns; {host}"
        if settings.tls == "implicit":
            endpoint = wrapClientTLS(clientTLSOptions(settings, host), endpoint)
        return endpoint, host, remoteMTA

    @inlineCallbacks
    def _deliver(
        self,
        envelope: Any,
        recipients: list,
        nexthop: str,
        settings: ClientSettings,
        messagePath: Path,
        done: Any = None,
    ) -> Any:
        # (One server: no result is final before the delivery's end, nothing for done.)
        queueID = envelope.queueID
        try:
            endpoint, tlsHostname, remoteMTA = self._endpoint(nexthop, settings)
        except ValueError as e:
            log.error("{queueID}: bad LMTP next hop: {error}", queueID=queueID, error=str(e))
            return resultsForAll(recipients, DeliveryStatus.TRANSIENT, "4.3.5", f"X-mailrelay; {e}")
        try:
            try:
                connection = yield self._connectTo(endpoint, settings, tlsHostname, remoteMTA)
            except SMTPConnectError as e:
                if not (e.tlsFailure and self._plaintextOK(settings, envelope)):
                    raise
                settings = self._withoutTLS(envelope, nexthop, settings, e.diagnostic)
                connection = yield self._connectTo(endpoint, settings, tlsHostname, remoteMTA)
        except SMTPConnectError as e:
            _logConnectFailure(queueID, nexthop, e)
            if e.refusedSetup:  # (the only server to try: returned, as by Postfix's lmtp)
                return e.resultsFor(recipients)
            if envelope.requireTLS and e.withoutRequiredTLS:
                return resultsForAll(
                    recipients,
                    DeliveryStatus.PERMANENT,
                    "5.7.30",
                    f"{e.diagnostic} (REQUIRETLS support required)",
                    e.remoteMTA,
                    remoteAddress=e.remoteAddress,
                    relay=e.relay,
                )
            results = resultsForAll(
                recipients,
                DeliveryStatus.TRANSIENT,
                "4" + e.code[1:],
                e.diagnostic,
                e.remoteMTA,
                remoteAddress=e.remoteAddress,
                relay=e.relay,
            )
            if not aboutSecurity(e):
                self._perDestination.unreachable(nexthop, results[0], settings)
            return results
        results = yield self._send(connection, envelope, recipients, messagePath)
        stalled = firstDeferred(results) if connection.broke else None
        if stalled is not None and not connection.tlsSessionFailed:
            self._perDestination.unreachable(nexthop, stalled, settings)
        else:
            self._perDestination.reached(nexthop, settings)
        self._quit(connection)
        if connection.tlsSessionFailed and self._plaintextOK(settings, envelope):
            results = yield self._sendPlaintext(
                envelope, recipients, nexthop, settings, messagePath, results
            )
        return results

    def _connectTo(
        self, endpoint: Any, settings: ClientSettings, tlsHostname: str, remoteMTA: str
    ) -> Deferred:
        connect = self._connect if self._connect is not None else connectSMTP
        return connect(
            self.reactor, endpoint, settings, tlsHostname=tlsHostname, remoteMTA=remoteMTA
        )

    def _withoutTLS(
        self, envelope: Any, nexthop: str, settings: ClientSettings, diagnostic: str
    ) -> ClientSettings:
        """Log that C{nexthop} is tried again without TLS after C{diagnostic}; the settings
        to do it with."""
        log.info(
            '{queueID}: {diagnostic}; trying LMTP server {nexthop} again without TLS (tls = "may")',
            queueID=envelope.queueID,
            diagnostic=diagnostic.removeprefix("X-mailrelay; "),
            nexthop=nexthop,
        )
        return dataclasses.replace(settings, tls="none")

    @inlineCallbacks
    def _sendPlaintext(
        self,
        envelope: Any,
        recipients: list,
        nexthop: str,
        settings: ClientSettings,
        messagePath: Path,
        results: list,
    ) -> Any:
        """The TLS session broke in the transaction that gave C{results}: send the recipients
        it deferred again over a new connection without TLS; C{results} with theirs replaced
        (unchanged when that connection fails)."""
        first = firstDeferred(results)
        if first is None:
            return results
        plain = self._withoutTLS(envelope, nexthop, settings, first.diagnostic)
        endpoint, tlsHostname, remoteMTA = self._endpoint(nexthop, plain)
        try:
            connection = yield self._connectTo(endpoint, plain, tlsHostname, remoteMTA)
        except SMTPConnectError as e:
            _logConnectFailure(envelope.queueID, nexthop, e)
            return results
        merged = yield self._sendDeferredAgain(connection, envelope, recipients, messagePath,
                                               results)
        self._quit(connection)
        return merged


def _logConnectFailure(queueID: str, nexthop: str, error: SMTPConnectError) -> None:
    log.warn(
        "{queueID}: cannot connect to LMTP server {nexthop}: {code} {diagnostic}",
        queueID=queueID,
        nexthop=nexthop,
        code=error.code,
        diagnostic=error.diagnostic,
    )


def build(options: dict[str, Any], context: PluginContext) -> LMTPBackend:
    """The C{lmtp} plugin's factory: the LMTP backend of the relay.

    @param options: C{settings}, the relay's default L{ClientSettings} (of C{[delivery]}),
        which LMTP uses without TLS and with the platform's trust store unless a route says
        otherwise (a local store); C{concurrency} and C{plaintext_fallback_age} (see
        L{LMTPBackend}).
    @param context: its C{reactor} connects and times.
    """
    options = builtinOptions("lmtp", options, ("settings", "concurrency", "plaintext_fallback_age"))
    settings = dataclasses.replace(options["settings"], lmtp=True, tls="none", caFile=None)
    return LMTPBackend(
        context.reactor,
        settings,
        concurrency=options.get("concurrency", 20),
        plaintextFallbackAge=options.get("plaintext_fallback_age", 300.0),
    )
