"""The C{smtp} backend: relays to the next hop's MX hosts (or a smarthost) over SMTP.

For each delivery the backend

  1. waits for one of the next hop's C{destinationConcurrency} slots (a
     C{DeferredSemaphore} per next hop: at most that many simultaneous connections to it);
  2. reuses an idle connection to the same next hop if one is cached (see below);
  3. otherwise resolves the next hop with L{MXResolver} and tries its hosts in order: a
     connection failure (refused, time-out, 4xx or 5xx greeting, TLS or AUTH trouble: an
     C{SMTPConnectError}) moves on to the next host, as does a transaction in which I{every}
     recipient got a transient result (4xx to MAIL, DATA or every RCPT, 421, connection lost):
     Postfix's "try the next MX on connection failure or 4xx".

When no host accepts, every recipient gets the most relevant error as a transient failure:
the last transaction's results if there was one, else the last connection error that carried
a server reply, else the last connection error.  DNS failures (L{DeliveryFailure}) give every
recipient that failure; a permanent one (NXDOMAIN, null MX) stays permanent only when the
next hop is the recipients' own domain: a configured next hop or smarthost that does not
exist is the operator's mistake, and its mail is kept (transient).

Connections that are still usable after a delivery stay open for C{connectionCacheTime}
seconds and carry the next delivery to the same next hop (several messages share one
connection); then they are sent QUIT.  L{SMTPBackend.close} quits them all (call it when the
service stops).

Per-route settings: L{IDeliveryBackend.deliver} only gets the next hop, so route options
(C{transport}, C{tls}, C{username}, C{password}, C{password_file}, C{ca_file},
C{auth_without_tls}) are
turned into a L{ClientSettings} per next hop at configuration time: see
L{settingsWithOptions} and L{routeSettingsLookup}.
"""

from __future__ import annotations

import dataclasses
import ipaddress
from pathlib import Path
from typing import Any, Callable, Iterable, Mapping

from twisted.internet import defer
from twisted.internet.defer import Deferred, inlineCallbacks
from twisted.internet.endpoints import TCP4ClientEndpoint, TCP6ClientEndpoint, wrapClientTLS
from twisted.logger import Logger
from zope.interface import implementer

from mailrelay.delivery import ClientBackend, PerDestination, Quitter, resultsForAll
from mailrelay.interfaces import DeliveryStatus, IDeliveryBackend, RecipientResult
from mailrelay.route import DeliveryFailure, MXHost, parseNexthop
from mailrelay.smtp import client as smtpClient
from mailrelay.smtp.client import ClientSettings, SMTPConnectError

log = Logger()

__all__ = [
    "ROUTE_OPTIONS",
    "SMTPBackend",
    "routeSettingsLookup",
    "settingsWithOptions",
]

#: The route options L{settingsWithOptions} understands (C{port} is folded into the next hop
#: by the routing table).
ROUTE_OPTIONS = (
    "transport",
    "tls",
    "username",
    "password",
    "password_file",
    "ca_file",
    "auth_without_tls",
    "port",
)
TLS_POLICIES = ("none", "may", "required", "implicit")


def settingsWithOptions(
    base: ClientSettings, options: Iterable[tuple[str, Any]], *, configDir: Path | None = None
) -> ClientSettings:
    """C{base} with route C{options} applied.

    @param options: C{(key, value)} pairs: C{transport} (an object with the attributes
        C{tls}, C{caFile}, C{username}, C{password} and C{authWithoutTLS}, such as
        L{mailrelay.config.TransportOptions}: all five are applied, C{None} included; it keeps
        the password out of C{repr(route)}), then C{tls} (C{"none"}, C{"may"}, C{"required"},
        C{"implicit"}), C{username}, C{password} or C{password_file} (read now, trailing
        newline removed, relative to C{configDir}), C{ca_file} (relative to C{configDir}),
        C{auth_without_tls} (bool).  C{port} is ignored here.
    @raise ValueError: an unknown key or a bad value (the message names the key).
    """
    changes: dict[str, Any] = {}
    opts = dict(options)
    transport = opts.pop("transport", None)
    if transport is not None:
        try:
            changes.update(
                tls=transport.tls,
                caFile=transport.caFile,
                username=transport.username,
                password=transport.password,
                authWithoutTLS=bool(transport.authWithoutTLS),
            )
        except AttributeError as e:
            raise ValueError(
                f"transport must be transport options, not {transport!r}: {e}"
            ) from None
        if changes["tls"] not in TLS_POLICIES:
            raise ValueError(
                f"tls must be one of {', '.join(TLS_POLICIES)}, not {changes['tls']!r}"
            )
    for key in opts:
        if key not in ROUTE_OPTIONS:
            raise ValueError(f"unknown route option {key!r}; known: {', '.join(ROUTE_OPTIONS)}")
    if "tls" in opts:
        if opts["tls"] not in TLS_POLICIES:
            raise ValueError(f"tls must be one of {', '.join(TLS_POLICIES)}, not {opts['tls']!r}")
        changes["tls"] = opts["tls"]
    for key in ("username", "password", "password_file", "ca_file"):
        if key in opts and (not isinstance(opts[key], str) or not opts[key]):
            raise ValueError(f"{key} must be a non-empty string, not {opts[key]!r}")
    if "password" in opts and "password_file" in opts:
        raise ValueError("give password or password_file, not both")
    if "username" in opts:
        changes["username"] = opts["username"]
    if "password" in opts:
        changes["password"] = opts["password"]
    if "password_file" in opts:
        path = Path(opts["password_file"])
        if configDir is not None and not path.is_absolute():
            path = configDir / path
        try:
            changes["password"] = path.read_text(encoding="utf-8").rstrip("\r\n")
        except OSError as e:
            raise ValueError(
                f"password_file: cannot read {str(path)!r}: {e.strerror or e}"
            ) from None
    username = changes.get("username", base.username)
    password = changes.get("password", base.password)
    if (username is None) != (password is None):
        raise ValueError("username and password (or password_file) go together")
    if "ca_file" in opts:
        path = Path(opts["ca_file"])
        if configDir is not None and not path.is_absolute():
            path = configDir / path
        changes["caFile"] = str(path)
    if "auth_without_tls" in opts:
        if not isinstance(opts["auth_without_tls"], bool):
            raise ValueError(
                f"auth_without_tls must be true or false, not {opts['auth_without_tls']!r}"
            )
        changes["authWithoutTLS"] = opts["auth_without_tls"]
    try:
        return dataclasses.replace(base, **changes) if changes else base
    except ValueError as e:  # ClientSettings.__post_init__
        raise ValueError(str(e)) from None


def routeSettingsLookup(
    table: Any, base: ClientSettings, backend: str = "smtp", *, configDir: Path | None = None
) -> Callable[[str], ClientSettings | None]:
    """A C{routeSettings} callable for L{SMTPBackend} (or L{LMTPBackend
    <mailrelay.delivery.lmtp.LMTPBackend>}) from a L{RoutingTable
    <mailrelay.route.RoutingTable>}: the settings of the rule producing each next hop.

    Every route of C{backend} with options is checked now, so bad options stop start-up.

    @raise ValueError: bad route options (the message names the route's next hop).
    """
    for route in table.routesWithOptions():
        if route.backend == backend:
            try:
                settingsWithOptions(base, route.options, configDir=configDir)
            except ValueError as e:
                raise ValueError(
                    f"route to {route.nexthop or 'the recipient domain'!r}: {e}"
                ) from None
    cache: dict[str, ClientSettings | None] = {}

    def lookup(nexthop: str) -> ClientSettings | None:
        if nexthop not in cache:
            options = table.optionsFor(backend, nexthop)
            cache[nexthop] = (
                settingsWithOptions(base, options, configDir=configDir) if options else None
            )
        return cache[nexthop]

    return lookup


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


class _Idle:
    """An idle cached connection and the timer that will close it."""

    def __init__(self, connection: Any, timer: Any) -> None:
        self.connection = connection
        self.timer = timer


@implementer(IDeliveryBackend)
class SMTPBackend(ClientBackend):
    """Delivers over SMTP to MX hosts or a fixed next hop (see the module docstring)."""

    def __init__(
        self,
        reactor: Any,
        resolver: Any,
        settings: ClientSettings,
        *,
        routeSettings: Mapping[str, ClientSettings]
        | Callable[[str], ClientSettings | None]
        | None = None,
        destinationConcurrency: int = 20,
        connectionCacheTime: float = 2.0,
        connect: Callable[..., Deferred] | None = None,
    ) -> None:
        """
        @param reactor: provides C{IReactorTCP} and C{IReactorTime}.
        @param resolver: an L{MXResolver <mailrelay.route.MXResolver>}.
        @param settings: the default client settings.
        @param routeSettings: settings for particular next hops: a mapping from the next hop
            string (exactly as routed), or a callable returning the settings or C{None} (see
            L{routeSettingsLookup}); the default C{settings} otherwise.
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
        self.routeSettings = routeSettings
        self.destinationConcurrency = destinationConcurrency
        self.connectionCacheTime = connectionCacheTime
        self._connect = connect
        self._perDestination = PerDestination(destinationConcurrency, "SMTP")
        self._idle: dict[str, list[_Idle]] = {}
        self._quitter = Quitter(reactor)
        self._closed = False

    # -- delivery ------------------------------------------------------------------------------


    def _connectFunction(self) -> Callable[..., Deferred]:
        return self._connect if self._connect is not None else smtpClient.connectSMTP

    def _endpoint(self, host: MXHost, settings: ClientSettings) -> Any:
        timeout = settings.timeouts.connect
        if host.family == 6:
            endpoint: Any = TCP6ClientEndpoint(
                self.reactor, host.address, host.port, timeout=timeout
            )
        else:
            endpoint = TCP4ClientEndpoint(self.reactor, host.address, host.port, timeout=timeout)
        if settings.tls == "implicit":
            endpoint = wrapClientTLS(smtpClient.clientTLSOptions(settings, host.name), endpoint)
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
    def _send(self, connection: Any, envelope: Any, recipients: list, messagePath: Path) -> Any:
        """C{connection.send}, turning an (unexpected) failure into transient results."""
        try:
            results = yield connection.send(envelope, recipients, messagePath)
        except defer.CancelledError:
            connection.abort()
            raise
        except Exception as e:
            log.failure(
                "{queueID}: sending over {remoteMTA} failed unexpectedly",
                queueID=envelope.queueID,
                remoteMTA=getattr(connection, "remoteMTA", None),
            )
            connection.abort()
            return resultsForAll(
                recipients,
                DeliveryStatus.TRANSIENT,
                "4.3.0",
                f"X-mailrelay; internal error: {e}",
                getattr(connection, "remoteMTA", None),
            )
        return list(results)

    @inlineCallbacks
    def _deliver(self, envelope: Any, recipients: list, nexthop: str, messagePath: Path) -> Any:
        queueID = envelope.queueID
        settings = self.settingsFor(nexthop)
        reusedResults: list[RecipientResult] | None = None
        freshResults: list[RecipientResult] | None = None

        cached = self._takeIdle(nexthop)
        if cached is not None:
            results = yield self._send(cached, envelope, recipients, messagePath)
            self._release(nexthop, cached)
            if not _allTransient(results):
                return results
            log.info(
                "{queueID}: every recipient deferred on the reused connection to {remoteMTA}; "
                "trying afresh",
                queueID=queueID,
                remoteMTA=cached.remoteMTA,
            )
            reusedResults = results

        try:
            hosts = yield self.resolver.resolve(nexthop)
        except DeliveryFailure as e:
            if e.permanent and not self._isRecipientDomain(nexthop, recipients):
                e = e.transient()
            log.warn(
                "{queueID}: cannot deliver to {nexthop}: {code} {diagnostic}",
                queueID=queueID,
                nexthop=nexthop,
                code=e.code,
                diagnostic=e.diagnostic,
            )
            status = DeliveryStatus.PERMANENT if e.permanent else DeliveryStatus.TRANSIENT
            return resultsForAll(recipients, status, e.code, e.diagnostic)

        connectErrors: list[tuple[str, str, str | None, bool]] = []
        for index, host in enumerate(hosts):
            try:
                connection = yield self._connectTo(host, settings)
            except SMTPConnectError as e:
                log.info(
                    "{queueID}: cannot use {mx}[{address}]:{port} for {nexthop}: {code} {diagnostic}",
                    queueID=queueID,
                    mx=host.name,
                    address=host.address,
                    port=host.port,
                    nexthop=nexthop,
                    code=e.code,
                    diagnostic=e.diagnostic,
                )
                connectErrors.append((e.code, e.diagnostic, e.remoteMTA, True))
                continue
            except defer.CancelledError:
                raise
            except Exception as e:
                log.failure(
                    "{queueID}: connecting to {mx}[{address}]:{port} failed unexpectedly",
                    queueID=queueID,
                    mx=host.name,
                    address=host.address,
                    port=host.port,
                )
                connectErrors.append(
                    (
                        "4.4.0",
                        f"X-mailrelay; cannot connect to {host.name}: {e}",
                        _remoteMTA(host.name),
                        False,
                    )
                )
                continue
            results = yield self._send(connection, envelope, recipients, messagePath)
            self._release(nexthop, connection)
            if _allTransient(results) and index + 1 < len(hosts):
                log.info(
                    "{queueID}: every recipient deferred by {remoteMTA}; trying the next host",
                    queueID=queueID,
                    remoteMTA=connection.remoteMTA,
                )
                freshResults = results
                continue
            return results

        if freshResults is not None:
            # A server answered (every recipient deferred): that says more than a refusal.
            return freshResults
        if not connectErrors:  # pragma: no cover - the resolver never returns no host
            return reusedResults or resultsForAll(
                recipients,
                DeliveryStatus.TRANSIENT,
                "4.4.4",
                f"X-mailrelay; no host to deliver to for {nexthop}",
            )
        withReply = [c for c in connectErrors if c[1].startswith("smtp;")]
        code, diagnostic, remoteMTA, _ = (withReply or connectErrors)[-1]
        log.warn(
            "{queueID}: no host of {nexthop} accepted the delivery: {code} {diagnostic}",
            queueID=queueID,
            nexthop=nexthop,
            code=code,
            diagnostic=diagnostic,
        )
        return resultsForAll(
            recipients, DeliveryStatus.TRANSIENT, _transientCode(code), diagnostic, remoteMTA
        )

    @staticmethod
    def _isRecipientDomain(nexthop: str, recipients: list) -> bool:
        """Whether C{nexthop} is an MX lookup of the recipients' own domain."""
        try:
            host, _, mxLookup = parseNexthop(nexthop)
        except ValueError:
            return False
        return mxLookup and all(r.domain == host for r in recipients)

    # -- connection cache ----------------------------------------------------------------------

    def _takeIdle(self, nexthop: str) -> Any:
        """An idle usable connection to C{nexthop}, or C{None}."""
        idle = self._idle.get(nexthop)
        while idle:
            entry = idle.pop()
            if entry.timer.active():
                entry.timer.cancel()
            if entry.connection.usable:
                if not idle:
                    del self._idle[nexthop]
                return entry.connection
            self._quit(entry.connection)
        self._idle.pop(nexthop, None)
        return None

    def _release(self, nexthop: str, connection: Any) -> None:
        """Cache C{connection} for reuse, or quit it."""
        if self._closed or self.connectionCacheTime <= 0 or not connection.usable:
            self._quit(connection)
            return
        entry = _Idle(connection, None)
        entry.timer = self.reactor.callLater(self.connectionCacheTime, self._expire, nexthop, entry)
        self._idle.setdefault(nexthop, []).append(entry)

    def _expire(self, nexthop: str, entry: _Idle) -> None:
        idle = self._idle.get(nexthop, [])
        if entry in idle:
            idle.remove(entry)
            if not idle:
                del self._idle[nexthop]
        self._quit(entry.connection)

    def _quit(self, connection: Any) -> None:
        """Send QUIT (or abort a connection that cannot be used any more), in the background."""
        self._quitter.quit(connection)

    def idleConnections(self, nexthop: str | None = None) -> int:
        """How many idle connections are cached (to C{nexthop}, or in all)."""
        if nexthop is not None:
            return len(self._idle.get(nexthop, ()))
        return sum(len(v) for v in self._idle.values())

    def close(self, timeout: float = 10.0) -> Deferred:
        """Quit every idle connection and stop caching; connections still delivering are
        quit when their delivery ends.

        @param timeout: connections that have not finished QUIT after this many seconds
            are aborted.
        @return: a Deferred firing (with C{None}, never failing) when the idle connections
            are closed.
        """
        self._closed = True
        for nexthop in list(self._idle):
            for entry in self._idle.pop(nexthop):
                if entry.timer.active():
                    entry.timer.cancel()
                self._quit(entry.connection)
        return self._quitter.wait(timeout)
