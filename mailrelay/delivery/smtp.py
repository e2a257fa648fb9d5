"""The C{smtp} backend: relays to the next hop's MX hosts (or a smarthost) over SMTP.

For each delivery the backend

  1. waits for one of the next hop's C{destinationConcurrency} slots (a
     C{DeferredSemaphore} per next hop: at most that many simultaneous connections to it);
  2. reuses an idle connection to the same next hop with the same settings if one is
     cached (see below);
  3. otherwise resolves the next hop with L{MXResolver} and tries its hosts in order: a
     connection failure (refused, time-out, 4xx or 5xx greeting, TLS or AUTH trouble: an
     C{SMTPConnectError}) moves on to the next host, as does a transaction in which I{every}
     recipient got a transient result (4xx to MAIL, DATA or every RCPT, 421, connection lost):
     Postfix's "try the next MX on connection failure or 4xx".

When no host accepts, every recipient gets the most relevant error as a transient failure:
the last transaction's results if there was one, else the last connection error that carried
a server reply, else the last connection error.  DNS failures (a L{TransientFailure
<mailrelay.errors.TransientFailure>} or L{PermanentFailure <mailrelay.errors.PermanentFailure>}
from the resolver) give every recipient that failure; a permanent one (NXDOMAIN, null MX) stays
permanent only when the next hop is the recipients' own domain: a configured next hop or
smarthost that does not exist is the operator's mistake, and its mail is kept (transient).

Each delivery's L{ClientSettings} are the backend's defaults with the options of the
delivery's L{Route <mailrelay.interfaces.Route>} applied (TLS policy, CA file, AUTH): the
route the router chose, so that two routes to the same next hop (a C{[[routes]]} entry and
the smarthost) keep their own settings.  A TLS requirement that cannot be met defers the
recipients (4.7.5, with the reason); there is never a fallback to weaker settings.

Connections that are still usable after a delivery stay open for C{connectionCacheTime}
seconds and carry the next delivery to the same next hop I{with the same settings} (several
messages share one connection); then they are sent QUIT.  L{SMTPBackend.close} quits them
all (call it when the service stops).
"""

from __future__ import annotations

import ipaddress
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from twisted.internet import defer
from twisted.internet.defer import Deferred, inlineCallbacks
from twisted.internet.endpoints import TCP4ClientEndpoint, TCP6ClientEndpoint, wrapClientTLS
from twisted.logger import Logger
from zope.interface import implementer

from mailrelay.delivery.common import (
    ClientBackend,
    PerDestination,
    Quitter,
    builtinOptions,
    resultsForAll,
)
from mailrelay.delivery.connection import connectSMTP
from mailrelay.delivery.tls import clientTLSOptions
from mailrelay.errors import DeliveryFailure, PermanentFailure
from mailrelay.interfaces import DeliveryStatus, IDeliveryBackend, PluginContext, RecipientResult
from mailrelay.route.mx import MXHost, MXResolver, makeResolver
from mailrelay.route.nexthop import parseSMTPNexthop
from mailrelay.smtp.clientsettings import ClientSettings
from mailrelay.smtp.errors import SMTPConnectError

log = Logger()

__all__ = ["SMTPBackend", "build"]


def _remoteMTA(name: str) -> str:
    """The RFC 3464 Remote-MTA of a host name or address (C{"dns; [192.0.2.1]"})."""
    try:
        ipaddress.ip_address(name)
    except ValueError:
        return f"dns; {name}"
    return f"dns; [{name}]"


def _allTransient(results: list[RecipientResult]) -> bool:
    return bool(results) and all(r.status is DeliveryStatus.TRANSIENT for r in results)


def _transientCode(code: str) -> str:
    return "4" + code[1:] if code[:1] in ("4", "5") else "4.4.0"


@dataclass
class _Tried:
    """What the hosts of one delivery said when none took the message.

    @ivar deferred: the results of the last host that deferred every recipient, if any.
    @ivar connectErrors: C{(code, diagnostic, remoteMTA)} of each failed connection.
    """

    deferred: list[RecipientResult] | None = None
    connectErrors: list[tuple[str, str, str | None]] = field(default_factory=list)


class _Idle:
    """An idle cached connection and the timer that will close it."""

    def __init__(self, connection: Any, timer: Any) -> None:
        self.connection = connection
        self.timer = timer


class _ConnectionCache:
    """Idle connections by C{(nexthop, settings)}, reused only with the same settings, each
    kept C{cacheTime} seconds and then quit."""

    def __init__(self, reactor: Any, cacheTime: float, quit: Callable[[Any], None]) -> None:
        self.reactor = reactor
        self.cacheTime = cacheTime
        self._quit = quit
        self._idle: dict[tuple[str, ClientSettings], list[_Idle]] = {}
        self._closed = False

    def take(self, key: tuple[str, ClientSettings]) -> Any:
        """An idle usable connection to C{key}'s next hop with C{key}'s settings, or C{None}."""
        idle = self._idle.get(key)
        while idle:
            entry = idle.pop()
            if entry.timer.active():
                entry.timer.cancel()
            if entry.connection.usable:
                if not idle:
                    del self._idle[key]
                return entry.connection
            self._quit(entry.connection)
        self._idle.pop(key, None)
        return None

    def release(self, key: tuple[str, ClientSettings], connection: Any) -> None:
        """Cache C{connection} for reuse by deliveries to C{key}, or quit it."""
        if self._closed or self.cacheTime <= 0 or not connection.usable:
            self._quit(connection)
            return
        entry = _Idle(connection, None)
        entry.timer = self.reactor.callLater(self.cacheTime, self._expire, key, entry)
        self._idle.setdefault(key, []).append(entry)

    def _expire(self, key: tuple[str, ClientSettings], entry: _Idle) -> None:
        idle = self._idle.get(key, [])
        if entry in idle:
            idle.remove(entry)
            if not idle:
                del self._idle[key]
        self._quit(entry.connection)

    def count(self, nexthop: str | None = None) -> int:
        """How many idle connections are cached (to C{nexthop} with any settings, or in
        all)."""
        return sum(
            len(entries)
            for (destination, _), entries in self._idle.items()
            if nexthop is None or destination == nexthop
        )

    def close(self) -> None:
        """Quit every idle connection and stop caching."""
        self._closed = True
        for key in list(self._idle):
            for entry in self._idle.pop(key):
                if entry.timer.active():
                    entry.timer.cancel()
                self._quit(entry.connection)


@implementer(IDeliveryBackend)
class SMTPBackend(ClientBackend):
    """Delivers over SMTP to MX hosts or a fixed next hop (see the module docstring)."""

    def __init__(
        self,
        reactor: Any,
        resolver: Any,
        settings: ClientSettings,
        *,
        destinationConcurrency: int = 20,
        connectionCacheTime: float = 2.0,
        connect: Callable[..., Deferred] | None = None,
    ) -> None:
        """
        @param reactor: provides C{IReactorTCP} and C{IReactorTime}.
        @param resolver: an L{MXResolver <mailrelay.route.MXResolver>}.
        @param settings: the default client settings, which each route's options override.
        @param destinationConcurrency: the most simultaneous connections to one next hop.
        @param connectionCacheTime: seconds an idle connection is kept for reuse; 0 to quit
            after each delivery.
        @param connect: the connecting function, C{connectSMTP} by default (for tests).
        """
        if destinationConcurrency < 1:
            raise ValueError("destinationConcurrency must be at least 1")
        self.reactor = reactor
        self.resolver = resolver
        self.settings = settings
        self.destinationConcurrency = destinationConcurrency
        self.connectionCacheTime = connectionCacheTime
        self._connect = connect
        self._perDestination = PerDestination(destinationConcurrency, "SMTP")
        self._quitter = Quitter(reactor)
        self._cache = _ConnectionCache(reactor, connectionCacheTime, self._quit)

    def _connectFunction(self) -> Callable[..., Deferred]:
        return self._connect if self._connect is not None else connectSMTP

    def _endpoint(self, host: MXHost, settings: ClientSettings) -> Any:
        timeout = settings.timeouts.connect
        if host.family == 6:
            endpoint: Any = TCP6ClientEndpoint(
                self.reactor, host.address, host.port, timeout=timeout
            )
        else:
            endpoint = TCP4ClientEndpoint(self.reactor, host.address, host.port, timeout=timeout)
        if settings.tls == "implicit":
            endpoint = wrapClientTLS(clientTLSOptions(settings, host.name), endpoint)
        return endpoint

    def _connectTo(self, host: MXHost, settings: ClientSettings) -> Deferred:
        return defer.maybeDeferred(
            self._connectFunction(),
            self.reactor,
            self._endpoint(host, settings),
            settings,
            tlsHostname=host.name,
            remoteMTA=_remoteMTA(host.name),
        )

    @inlineCallbacks
    def _deliver(
        self,
        envelope: Any,
        recipients: list,
        nexthop: str,
        settings: ClientSettings,
        messagePath: Path,
    ) -> Any:
        key = (nexthop, settings)
        reusedResults = yield self._sendOnIdle(key, envelope, recipients, messagePath)
        if reusedResults is not None and not _allTransient(reusedResults):
            return reusedResults
        try:
            hosts = yield self.resolver.resolve(nexthop)
        except DeliveryFailure as e:
            return self._unresolved(e, envelope, recipients, nexthop)
        tried = _Tried()
        results = yield self._tryHosts(hosts, key, envelope, recipients, messagePath, tried)
        if results is not None:
            return results
        return self._noHostAccepted(tried, reusedResults, envelope, recipients, nexthop)

    @inlineCallbacks
    def _sendOnIdle(
        self, key: tuple[str, ClientSettings], envelope: Any, recipients: list, messagePath: Path
    ) -> Any:
        """Send over an idle cached connection to C{key}, if there is one.

        @return: a Deferred firing with the results, or C{None} without a cached connection.
        """
        cached = self._cache.take(key)
        if cached is None:
            return None
        results = yield self._send(cached, envelope, recipients, messagePath)
        self._cache.release(key, cached)
        if _allTransient(results):
            log.info(
                "{queueID}: every recipient deferred on the reused connection to {remoteMTA}; "
                "trying afresh",
                queueID=envelope.queueID,
                remoteMTA=cached.remoteMTA,
            )
        return results

    def _unresolved(
        self, failure: DeliveryFailure, envelope: Any, recipients: list, nexthop: str
    ) -> list[RecipientResult]:
        """The results of a delivery whose next hop did not resolve: C{failure} for every
        recipient, transient unless the next hop is the recipients' own domain."""
        if isinstance(failure, PermanentFailure) and not self._isRecipientDomain(
            nexthop, recipients
        ):
            failure = failure.transient()
        log.warn(
            "{queueID}: cannot deliver to {nexthop}: {code} {diagnostic}",
            queueID=envelope.queueID,
            nexthop=nexthop,
            code=failure.code,
            diagnostic=failure.diagnostic,
        )
        permanent = isinstance(failure, PermanentFailure)
        status = DeliveryStatus.PERMANENT if permanent else DeliveryStatus.TRANSIENT
        return resultsForAll(recipients, status, failure.code, failure.diagnostic)

    @inlineCallbacks
    def _tryHosts(
        self,
        hosts: list[MXHost],
        key: tuple[str, ClientSettings],
        envelope: Any,
        recipients: list,
        messagePath: Path,
        tried: _Tried,
    ) -> Any:
        """Try C{hosts} in order until one takes the message (or is the last one to answer).

        @return: a Deferred firing with the results of the host that decided, or C{None} when
            none did (C{tried} then says what went wrong).
        """
        for index, host in enumerate(hosts):
            connection = yield self._connectNoting(host, key, envelope, tried)
            if connection is None:
                continue
            results = yield self._send(connection, envelope, recipients, messagePath)
            self._cache.release(key, connection)
            if _allTransient(results) and index + 1 < len(hosts):
                log.info(
                    "{queueID}: every recipient deferred by {remoteMTA}; trying the next host",
                    queueID=envelope.queueID,
                    remoteMTA=connection.remoteMTA,
                )
                tried.deferred = results
                continue
            return results
        return None

    @inlineCallbacks
    def _connectNoting(
        self, host: MXHost, key: tuple[str, ClientSettings], envelope: Any, tried: _Tried
    ) -> Any:
        """Connect to C{host}; a failure is logged and noted in C{tried}.

        @return: a Deferred firing with the connection, or C{None} when it failed.
        """
        settings = key[1]
        try:
            try:
                return (yield self._connectTo(host, settings))
            except SMTPConnectError as e:
                if not _plaintextAfter(e, settings):
                    raise
                # Opportunistic TLS whose handshake failed: the same address again at once,
                # without TLS, as Postfix does at its "may" level (RETRY_AS_PLAINTEXT) --
                # never with credentials to send, which would then go in the clear.
                log.info(
                    "{queueID}: {diagnostic}; trying {mx}[{address}]:{port} again without "
                    'TLS (tls = "may")',
                    queueID=envelope.queueID,
                    diagnostic=e.diagnostic.removeprefix("X-mailrelay; "),
                    mx=host.name,
                    address=host.address,
                    port=host.port,
                )
                return (yield self._connectTo(host, replace(settings, tls="none")))
        except SMTPConnectError as e:
            log.info(
                "{queueID}: cannot use {mx}[{address}]:{port} for {nexthop}: "
                "{code} {diagnostic}",
                queueID=envelope.queueID,
                mx=host.name,
                address=host.address,
                port=host.port,
                nexthop=key[0],
                code=e.code,
                diagnostic=e.diagnostic,
            )
            tried.connectErrors.append((e.code, e.diagnostic, e.remoteMTA))
        except defer.CancelledError:
            raise
        except Exception as e:
            log.failure(
                "{queueID}: connecting to {mx}[{address}]:{port} failed unexpectedly",
                queueID=envelope.queueID,
                mx=host.name,
                address=host.address,
                port=host.port,
            )
            diagnostic = f"X-mailrelay; cannot connect to {host.name}: {e}"
            tried.connectErrors.append(("4.4.0", diagnostic, _remoteMTA(host.name)))
        return None

    def _noHostAccepted(
        self,
        tried: _Tried,
        reusedResults: list[RecipientResult] | None,
        envelope: Any,
        recipients: list,
        nexthop: str,
    ) -> list[RecipientResult]:
        """The results when no host took the message: what the last server that answered
        said, else the most relevant connection error, as a transient failure."""
        if tried.deferred is not None:
            # A server answered (every recipient deferred): that says more than a refusal.
            return tried.deferred
        if not tried.connectErrors:  # pragma: no cover - the resolver never returns no host
            return reusedResults or resultsForAll(
                recipients,
                DeliveryStatus.TRANSIENT,
                "4.4.4",
                f"X-mailrelay; no host to deliver to for {nexthop}",
            )
        withReply = [c for c in tried.connectErrors if c[1].startswith("smtp;")]
        code, diagnostic, remoteMTA = (withReply or tried.connectErrors)[-1]
        if envelope.requireTLS and all(c[0] == "4.7.5" for c in tried.connectErrors):
            # No host gave verified TLS: a REQUIRETLS message is returned, not retried.
            log.warn(
                "{queueID}: REQUIRETLS message not relayed: no host of {nexthop} gave "
                "verified TLS: {diagnostic}",
                queueID=envelope.queueID,
                nexthop=nexthop,
                diagnostic=diagnostic,
            )
            return resultsForAll(
                recipients,
                DeliveryStatus.PERMANENT,
                "5.7.30",
                f"{diagnostic} (REQUIRETLS support required)",
                remoteMTA,
            )
        log.warn(
            "{queueID}: no host of {nexthop} accepted the delivery: {code} {diagnostic}",
            queueID=envelope.queueID,
            nexthop=nexthop,
            code=code,
            diagnostic=diagnostic,
        )
        return resultsForAll(
            recipients, DeliveryStatus.TRANSIENT, _transientCode(code), diagnostic, remoteMTA
        )

    def _insecureLookup(self, nexthop: str) -> str | None:
        """REQUIRETLS (RFC 8689 section 4.2.1) wants the MX hosts looked up securely (DNSSEC,
        or an MTA-STS policy); this resolver validates neither, so only a next hop named
        without MX lookup (a smarthost, a bracketed route) will do."""
        try:
            parsed = parseSMTPNexthop(nexthop, strict=False)
        except ValueError:
            return None  # the delivery will say what is wrong with it
        if parsed.mxLookup:
            return (f"the MX hosts of {parsed.host} cannot be looked up securely here (no "
                    "DNSSEC validation)")
        return None

    @staticmethod
    def _isRecipientDomain(nexthop: str, recipients: list) -> bool:
        """Whether C{nexthop} is an MX lookup of the recipients' own domain."""
        try:
            parsed = parseSMTPNexthop(nexthop, strict=False)
        except ValueError:
            return False
        return parsed.mxLookup and all(r.domain == parsed.host for r in recipients)

    def idleConnections(self, nexthop: str | None = None) -> int:
        """How many idle connections are cached (to C{nexthop} with any settings, or in
        all)."""
        return self._cache.count(nexthop)

    def close(self, timeout: float = 10.0) -> Deferred:
        """Quit every idle connection and stop caching; connections still delivering are
        quit when their delivery ends.

        @param timeout: connections that have not finished QUIT after this many seconds
            are aborted.
        @return: a Deferred firing (with C{None}, never failing) when the idle connections
            are closed.
        """
        self._cache.close()
        return super().close(timeout)


def build(options: dict[str, Any], context: PluginContext) -> SMTPBackend:
    """The C{smtp} plugin's factory: the SMTP backend of the relay.

    @param options: C{settings}, the default L{ClientSettings} (of C{[delivery]});
        C{nameservers}, the C{[dns]} name servers (none: the system's resolver);
        C{destination_concurrency} and C{connection_cache_time} (see L{SMTPBackend}).
    @param context: its C{reactor} connects and times, its C{resolver} (when it has one;
        else one of C{nameservers}) looks up the MX hosts.
    """
    options = builtinOptions(
        "smtp",
        options,
        ("settings", "nameservers", "destination_concurrency", "connection_cache_time"),
    )
    reactor = context.reactor
    resolver = context.resolver  # the relay's: [dns] nameservers, or the system's
    if resolver is None:
        resolver = makeResolver(list(options.get("nameservers", ())) or None, reactor=reactor)
    return SMTPBackend(
        reactor,
        MXResolver(resolver, reactor),
        options["settings"],
        destinationConcurrency=options.get("destination_concurrency", 20),
        connectionCacheTime=options.get("connection_cache_time", 2.0),
    )


def _plaintextAfter(error: SMTPConnectError, settings: ClientSettings) -> bool:
    """Whether a connection that failed with C{error} under C{settings} is tried again
    without TLS: its STARTTLS handshake failed (4.7.5: under C{tls = "may"} nothing is
    verified, so that is the only TLS failure there) and there are no credentials to send."""
    return error.code == "4.7.5" and settings.tls == "may" and settings.username is None
