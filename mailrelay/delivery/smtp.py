"""The C{smtp} backend: relays to the next hop's MX hosts (or a smarthost) over SMTP.

For each delivery the backend

  1. waits for one of the next hop's C{destinationConcurrency} slots (a
     C{DeferredSemaphore} per next hop: at most that many simultaneous connections to it),
     unless the next hop is suspended: as many deliveries in a row that reached none of its
     servers suspend it for C{plaintextFallbackAge} (the queue's C{min_backoff}), its
     deliveries deferred at once meanwhile (L{PerDestination}); then for one of the queue's
     places of the deliveries in flight at once over every destination (C{[queue]
     delivery_limit});
  2. reuses an idle connection to the same next hop with the same settings if one is
     cached (see below); the recipients its server defers go on to step 3 (every one of
     them: afresh, the same server too, as a cached connection may have gone stale; some:
     to the next hop's other addresses, as Postfix's smtp_reuse_session() drops the reused
     address from the list);
  3. otherwise resolves the next hop with L{MXResolver} and tries its hosts in order: a
     connection failure (refused, time-out, 4xx or 5xx greeting, TLS or AUTH trouble: an
     C{SMTPConnectError}) moves on to the next host with every recipient; a transaction moves
     on with the recipients it deferred (a 4xx to their RCPT; all of them after a 4xx to MAIL
     or DATA, a 421, a lost connection), those delivered or refused (5xx) being done.  That
     is Postfix's C{smtp_rcpt_fail} and C{smtp_bulk_fail}: a soft-failed recipient is kept
     for the next server (C{SMTP_RCPT_KEEP}) unless this one is the last
     (C{SMTP_MISC_FLAG_FINAL_SERVER}); what the last host said is what is recorded.  A host
     of the relay's name or at its own address (C{ownAddresses}: dropped with the less
     preferred before any connection, Postfix's smtp_find_self), or one that answers EHLO
     with the relay's own name, is the relay itself: the best MX, a loop
     (5.4.6); a backup, the end of the list (RFC 5321 section 5.1: no less preferred host is
     tried).

When no host accepts the recipients left, each gets the most relevant error as a transient
failure: what the last server that answered said if one did, else the last connection error
that carried a server reply, else the last connection error.  DNS failures (a L{TransientFailure
<mailrelay.errors.TransientFailure>} or L{PermanentFailure <mailrelay.errors.PermanentFailure>}
from the resolver) give every recipient that failure; a permanent one (NXDOMAIN, null MX) stays
permanent only when the next hop is the recipients' own domain: a configured next hop or
smarthost that does not exist is the operator's mistake, and its mail is kept (transient).

Each delivery's L{ClientSettings} are the backend's defaults with the options of the
delivery's L{Route <mailrelay.interfaces.Route>} applied (TLS policy, CA file, AUTH): the
route the router chose, so that two routes to the same next hop (a C{[[routes]]} entry and
the smarthost) keep their own settings.  A TLS requirement that cannot be met defers the
recipients (4.7.4 when STARTTLS is not offered, as Postfix; the server's reply and status when
it refuses STARTTLS, as Postfix -- a 5xx returns them when it is the last host to try, as a
refused HELO; 4.7.5 otherwise; with the reason);
there is never a fallback to weaker settings.

Under C{tls = "may"} (opportunistic: nothing is verified) a TLS failure -- a STARTTLS
handshake that fails or times out, or a TLS session lost or timed out before the
transaction ended -- is followed at once by the same address without TLS, for the recipients
left, when the message has been queued for at least C{plaintextFallbackAge} seconds (the
queue's C{min_backoff}); a younger message is deferred, so that a passing TLS trouble does
not put new mail in the clear, and its retry falls back.  Never with a user name to log in
with (the password would go in the clear).  That is Postfix's C{may} level
(C{PLAINTEXT_FALLBACK_OK_AFTER_STARTTLS_FAILURE} and C{..._AFTER_TLS_SESSION_FAILURE}, which
also wait for C{$minimal_backoff_time}).  The plaintext connection is cached under
C{tls = "none"}, never reused for a delivery that asks for TLS.

B{Fallback relays} (Postfix's C{smtp_fallback_relay}, smtp_connect.c): when the route's
next hop did not take every recipient for temporary reasons -- its hosts refused, timed out,
deferred (4xx), failed TLS where another host may be tried, its DNS lookup failed for now,
or it is suspended -- the recipients still deferred are tried at the fallback relays, in
order, in the same delivery, each a next hop of its own (its own slot, cache key, suspension
and MX lookup).  A 5xx from the destination is final; so are a domain that does not exist
and a null MX.  A delivery to the recipients' own domain's MX hosts uses the backend's
C{fallbackRelay} (C{[delivery] fallback_relay}); any other (a smarthost, a sender route, a
route's next hop: a relay host) only its route's own (L{RouteOptions.fallbackRelay
<mailrelay.interfaces.RouteOptions>}).  As Postfix, the next hop's last host is then not the
final server (a 5xx to HELO from it moves on), a relay that is an MX host of the destination
(or to which its mail loops) does not use the fallbacks (Postfix 2.2's i_am_mx), and a
refusal by the last fallback relay that would return the mail defers it (4.3.5, "fallback
relay configuration problem").  Each fallback relay is connected to with the route's
settings and the policy of its own name (Postfix looks up C{smtp_tls_policy_maps} by it),
raised to C{tls = "required"} when the destination's MTA-STS policy or DANE records made
TLS mandatory for its hosts: the mail never leaves with less than the destination demands.

Connections that are still usable after a delivery stay open for C{connectionCacheTime}
seconds and carry the next delivery to the same next hop I{with the same settings} (several
messages share one connection; for one DANE verified, the settings asked for, before DANE
raised them: L{SMTPBackend._release}); then they are sent QUIT.  L{SMTPBackend.close} quits them
all (call it when the service stops).
"""

from __future__ import annotations

import dataclasses
import ipaddress
from collections.abc import Callable, Container, Sequence
from dataclasses import dataclass, field, replace
from functools import partial
from pathlib import Path
from typing import Any

from twisted.internet import defer
from twisted.internet.defer import Deferred, inlineCallbacks
from twisted.internet.endpoints import TCP4ClientEndpoint, TCP6ClientEndpoint, wrapClientTLS
from twisted.logger import Logger
from zope.interface import implementer

from mailrelay.address import clientIP
from mailrelay.delivery.common import (
    ClientBackend,
    PerDestination,
    Quitter,
    aboutSecurity,
    builtinOptions,
    firstDeferred,
    resultsForAll,
    withDeferredReplaced,
)
from mailrelay.delivery.connection import connectSMTP
from mailrelay.delivery.tls import clientTLSOptions, describeTLSFailure, verifiedClientTLS
from mailrelay.errors import (
    DeliveryFailure,
    DeliveryNotStarted,
    PermanentFailure,
    TransientFailure,
)
from mailrelay.interfaces import (
    DeliveryStatus,
    IDeliveryBackend,
    PluginContext,
    RecipientResult,
    Route,
)
from mailrelay.route.mtasts import MTASTS
from mailrelay.route.mx import MXHost, MXResolver, makeResolver, remoteNameservers
from mailrelay.route.nexthop import parseSMTPNexthop
from mailrelay.route.ownaddr import OwnAddresses
from mailrelay.smtp.client import needsSMTPUTF8
from mailrelay.smtp.clientsettings import ClientSettings
from mailrelay.smtp.errors import SMTPConnectError

log = Logger()

__all__ = ["SMTPBackend", "build"]


def _loopDiagnostic(nexthop: str) -> str:
    """The Diagnostic-Code of mail for C{nexthop} that would come back to the relay itself
    (as Postfix: "mail for example.org loops back to myself")."""
    return f"X-mailrelay; mail for {nexthop} loops back to myself"


def _remoteMTA(name: str) -> str:
    """The RFC 3464 Remote-MTA of a host name or address (C{"dns; [192.0.2.1]"})."""
    try:
        ipaddress.ip_address(name)
    except ValueError:
        return f"dns; {name}"
    return f"dns; [{name}]"


def _allTransient(results: list[RecipientResult]) -> bool:
    return bool(results) and all(r.status is DeliveryStatus.TRANSIENT for r in results)


def _whyDeferred(results: list[RecipientResult], limit: int = 3) -> str:
    """The distinct diagnostics of the deferrals among C{results}, for the line saying that
    they are sent again in the same delivery: a transaction lost after its end of data says
    "message may be sent more than once", and the next transaction may indeed send it again
    (Postfix logs the reason before it moves on to the next server, smtp_bulk_fail)."""
    reasons = list(dict.fromkeys(
        r.diagnostic.removeprefix("X-mailrelay; ")
        for r in results if r.status is DeliveryStatus.TRANSIENT
    ))
    more = len(reasons) - limit
    return "; ".join(reasons[:limit]) + (f"; and {more} more" if more > 0 else "")


def _howMany(count: int, total: int) -> str:
    """Which recipients a line says C{count} of C{total} are: C{"every recipient"}, or
    C{"2 of 3 recipients"}."""
    return "every recipient" if count == total else f"{count} of {total} recipients"


def _enforced(policy: Any) -> bool:
    """Whether C{policy} (an L{STSPolicy <mailrelay.route.mtasts.STSPolicy>} or C{None}) is
    an MTA-STS policy in enforce mode."""
    return policy is not None and policy.mode == "enforce"


def _transientCode(code: str) -> str:
    return "4" + code[1:] if code[:1] in ("4", "5") else "4.4.0"


@dataclass
class _Tried:
    """What the hosts of one delivery said when none took the message (or the recipients
    left).

    @ivar deferred: the results of every recipient when a host deferred some (each deferred
        one with the deferral of the last host that answered it), if one did.
    @ivar connectErrors: the error of each failed connection, in order: the last is the
        last host's when no host took the message.
    """

    deferred: list[RecipientResult] | None = None
    connectErrors: list[SMTPConnectError] = field(default_factory=list)
    #: The best MX answered EHLO with our own name: the diagnostic of that loop.
    loop: str | None = None
    #: A less preferred MX answered EHLO with our own name: no host after it is tried.
    foundSelf: bool = False
    #: No server answered in this delivery: every connection that carried a transaction
    #: (the reused one included) stopped answering in it (lost or timed out, not a TLS
    #: session failure): the next hop counts as not reached.  One that answered ends it,
    #: as Postfix's SMTP_MISC_FLAG_COMPLETE_SESSION: no later failure throttles.
    broke: bool = False
    #: A transaction's connection did not break (see C{broke}): a server was talked to.
    answered: bool = False
    #: The sessions so far (connections set up that carried a transaction, a reused one
    #: included): at C{mxSessionLimit}, no further host is tried.
    sessions: int = 0
    #: The last host did not offer the SMTPUTF8 the message needs: when it was the last to
    #: try, the recipients are returned (5.6.7).
    lacksSMTPUTF8: SMTPConnectError | None = None
    #: The DANE policy (or C{None}, or the lookup's failure) of each MX host name and port
    #: looked up in this delivery: one TLSA lookup for all of a host's addresses.
    dane: dict[tuple[str, int], Any] = field(default_factory=dict)


@dataclass
class _Hop:
    """One next hop of a delivery that goes on to fallback relays (Postfix's sites in
    smtp_connect_inet()).

    @ivar final: the last next hop to try (Postfix's C{SMTP_MISC_FLAG_FINAL_NEXTHOP}): only
        then does a refusal of its last host (a 5xx to HELO, no SMTPUTF8, no verified TLS
        for REQUIRETLS) return the mail.
    @ivar fallback: a fallback relay: such a refusal by the last one defers the mail
        (4.3.5), as Postfix's "smtp_fallback_relay configuration problem".
    @ivar relayIsMX: set when the relay is one of the next hop's MX hosts, or its mail loops
        back to the relay: no fallback relay is tried (Postfix's i_am_mx).
    @ivar tlsRequired: set when the DANE records of a host of the next hop made TLS
        mandatory: a fallback relay is tried with C{tls = "required"} too (as under the
        next hop's MTA-STS policy in enforce mode: L{SMTPBackend._toFallbacks}).
    @ivar resolved: set once the next hop's hosts were found and tried (not: it was
        suspended, or its lookup failed): whether DANE applied to them is known.
    @ivar tried: set once the next hop's delivery ran (not: it was suspended): whether
        C{relayIsMX} is known.
    """

    final: bool = True
    fallback: bool = False
    relayIsMX: bool = False
    tlsRequired: bool = False
    resolved: bool = False
    tried: bool = False


class _Idle:
    """An idle cached connection and the timer that will close it."""

    def __init__(self, connection: Any, timer: Any) -> None:
        self.connection = connection
        self.timer = timer


class _ConnectionCache:
    """Idle connections by C{(nexthop, settings)}, reused only with the same settings, each
    kept C{cacheTime} seconds and then quit; at most C{maxIdle} in all (the oldest is quit
    to make room), so that connections kept for reuse do not add more open files than the
    deliveries in flight at once (C{[queue] delivery_limit}) take.

    @ivar maxIdle: the most idle connections kept, or C{None}: no limit.
    """

    def __init__(self, reactor: Any, cacheTime: float, quit: Callable[[Any], None]) -> None:
        self.reactor = reactor
        self.cacheTime = cacheTime
        self.maxIdle: int | None = None
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
        if self.maxIdle is not None and self._idle and self.count() >= self.maxIdle:
            oldest = min(
                ((k, e) for k, entries in self._idle.items() for e in entries),
                key=lambda pair: pair[1].timer.getTime(),
            )
            oldest[1].timer.cancel()
            self._expire(*oldest)
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
        plaintextFallbackAge: float = 300.0,
        selfName: str | None = None,
        connect: Callable[..., Deferred] | None = None,
        mtaSTS: MTASTS | None = None,
        mxSessionLimit: int = 2,
        ownAddresses: Container[tuple[str, int]] = (),
        dane: bool = False,
        fallbackRelay: Sequence[str] = (),
    ) -> None:
        """
        @param reactor: provides C{IReactorTCP} and C{IReactorTime}.
        @param resolver: an L{MXResolver <mailrelay.route.MXResolver>}.
        @param settings: the default client settings, which each route's options override.
        @param destinationConcurrency: the most simultaneous connections to one next hop.
        @param connectionCacheTime: seconds an idle connection is kept for reuse; 0 to quit
            after each delivery.
        @param plaintextFallbackAge: seconds a message must have been queued before a TLS
            failure under C{tls = "may"} is followed by the same address without TLS (the
            queue's C{min_backoff}, as Postfix's C{$minimal_backoff_time}); also how long an
            unreachable next hop is suspended.
        @param selfName: the relay's host name: an MX host of that name is the relay itself
            (RFC 5321 5.1: it and every less preferred host are dropped; the best, a loop).
        @param ownAddresses: the C{(address, port)} pairs that are the relay
            (L{OwnAddresses <mailrelay.route.ownaddr.OwnAddresses>}): a host at one of them
            is the relay itself too, whatever its name (Postfix's C{smtp_find_self}).
        @param connect: the connecting function, C{connectSMTP} by default (for tests).
        @param mtaSTS: the MTA-STS policies (L{MTASTS}) deliveries by MX lookup follow, or
            C{None}: none are looked for.
        @param mxSessionLimit: the most SMTP sessions of one delivery, 0 for no limit
            (Postfix's C{smtp_mx_session_limit}): a session is a connection set up (greeted,
            EHLO...) that carried a transaction, a reused one included; a connection that
            failed is not one.  The recipients the last session deferred stay deferred.
        @param dane: use the DANE TLSA records of DNSSEC-secure MX hosts (L{_daneKey});
            C{resolver} must then ask a validating resolver (L{makeResolver}'s C{dnssec}).
        @param fallbackRelay: the SMTP next hops mail to the recipients' own domain's MX
            hosts goes on to when they did not take it (see the module docstring).
        @raise ValueError: a bad setting (a fallback relay that is no SMTP next hop: the
            message names it).
        """
        if destinationConcurrency < 1:
            raise ValueError("destinationConcurrency must be at least 1")
        if mxSessionLimit < 0:
            raise ValueError(f"mxSessionLimit must be 0 (no limit) or more, not {mxSessionLimit}")
        self.mxSessionLimit = mxSessionLimit
        self.fallbackRelay = self._fallbackRelays(tuple(fallbackRelay))
        self.reactor = reactor
        self.resolver = resolver
        self.settings = settings
        self.destinationConcurrency = destinationConcurrency
        self.connectionCacheTime = connectionCacheTime
        self.plaintextFallbackAge = plaintextFallbackAge
        self.selfName = selfName.lower().rstrip(".") if selfName else None
        self.ownAddresses = ownAddresses
        self._connect = connect
        self.mtaSTS = mtaSTS
        self.dane = dane
        self._perDestination = PerDestination(
            destinationConcurrency, "SMTP", reactor, suspendTime=plaintextFallbackAge
        )
        self._quitter = Quitter(reactor)
        self._cache = _ConnectionCache(reactor, connectionCacheTime, self._quit)

    @staticmethod
    def _fallbackRelays(relays: tuple[str, ...]) -> tuple[str, ...]:
        """C{relays}, each checked to be an SMTP next hop.

        @raise ValueError: one is not (the message names it)."""
        for relay in relays:
            try:
                parseSMTPNexthop(relay, what="fallback relay")
            except ValueError as e:
                raise ValueError(f"fallback relay {relay!r}: {e}") from None
        return relays

    def settingsFor(self, route: Route) -> Any:
        """The route's client settings (see L{ClientBackend.settingsFor}), its fallback
        relays checked (a router's route may carry any).

        @raise ValueError: the options cannot be used (the message says why)."""
        self._fallbackRelays(route.options.fallbackRelay or ())
        return super().settingsFor(route)

    def _fallbacksFor(self, route: Route, recipients: list) -> tuple[str, ...]:
        """The fallback relays of a delivery along C{route}: the route's own, else the
        backend's when C{route} goes to the recipients' own domain's MX hosts."""
        if route.options.fallbackRelay is not None:
            return route.options.fallbackRelay
        if self.fallbackRelay and self._isRecipientDomain(route.nexthop, recipients):
            return self.fallbackRelay
        return ()

    def _deliverAlong(
        self,
        envelope: Any,
        recipients: list,
        route: Route,
        settings: ClientSettings,
        messagePath: Path,
        done: Callable[[list[RecipientResult]], None] | None = None,
        started: Callable[[], None] | None = None,
    ) -> Deferred:
        """Deliver along C{route} (see L{ClientBackend._deliverAlong}), then to its fallback
        relays (L{_toFallbacks}) the recipients it deferred."""
        relays = self._fallbacksFor(route, recipients)
        if envelope.requireTLS:
            relays = self._securelyFound(envelope, relays)
        if not relays:
            return super()._deliverAlong(envelope, recipients, route, settings, messagePath,
                                         done, started)
        hop = _Hop(final=False)
        d = self._perDestination.run(
            route.nexthop, envelope, recipients, partial(self._deliver, hop=hop), envelope,
            recipients, route.nexthop, settings, messagePath, done, started=started,
            settings=settings,
        )
        d.addCallback(self._toFallbacks, relays, hop, envelope, recipients, route.nexthop,
                      settings, messagePath, done)
        return d

    def _securelyFound(self, envelope: Any, relays: tuple[str, ...]) -> tuple[str, ...]:
        """The fallback relays among C{relays} that can carry a REQUIRETLS message: those
        found securely enough (L{_insecureLookup}; the others are logged).  Known before
        the next hop is tried, so that without any it is the final one, and a message none
        of its hosts gave verified TLS is returned (5.7.30) rather than deferred: no later
        attempt could go elsewhere (RFC 8689 section 4.2.1)."""
        usable = []
        for relay in relays:
            why = self._insecureLookup(relay)
            if why is None:
                usable.append(relay)
            else:
                log.info("{queueID}: REQUIRETLS: fallback relay {relay} not used: {why}",
                         queueID=envelope.queueID, relay=relay, why=why)
        return tuple(usable)

    @inlineCallbacks
    def _toFallbacks(
        self,
        results: list[RecipientResult],
        relays: tuple[str, ...],
        hop: _Hop,
        envelope: Any,
        recipients: list,
        nexthop: str,
        settings: ClientSettings,
        messagePath: Path,
        done: Callable[[list[RecipientResult]], None] | None,
    ) -> Any:
        """Try the recipients C{results} deferred (those of a delivery to C{nexthop}) at
        C{relays} in order, each in a slot of its own next hop, until none is left.

        @return: a Deferred firing with C{results}, those of the recipients sent on replaced
            by what the last fallback relay tried for them said."""
        if firstDeferred(results) is None:
            return results
        if not hop.tried:  # (suspended: whether we are one of its MX hosts is not known)
            hop.relayIsMX = yield self._relayIsMX(nexthop)
        if hop.relayIsMX:
            log.info("{queueID}: this relay is an MX host of {nexthop}, or its mail loops "
                     "back here: the fallback relays are not used", queueID=envelope.queueID,
                     nexthop=nexthop)
            return results
        if settings.tls not in ("required", "implicit") and (
                yield self._demandsTLS(envelope, nexthop, hop)):
            settings = replace(settings, tls="required")
        for index, relay in enumerate(relays):
            left = [r for r, got in zip(recipients, results, strict=True)
                    if got.status is DeliveryStatus.TRANSIENT]
            if not left:
                break
            final = [r for r in results if r.status is not DeliveryStatus.TRANSIENT]
            if final and done is not None:
                done(final)
            log.info(
                "{queueID}: {which} not taken by {nexthop} ({why}); trying fallback relay "
                "{relay}",
                queueID=envelope.queueID,
                which=_howMany(len(left), len(results)),
                nexthop=nexthop, why=_whyDeferred(results), relay=relay,
            )
            decided = self._tlsPolicy(envelope, left, relay, settings)
            if isinstance(decided, list):  # (REQUIRETLS: not a relay to use; logged)
                continue
            hop = _Hop(final=index == len(relays) - 1, fallback=True)
            try:
                again = yield self._perDestination.run(
                    relay, envelope, left, partial(self._deliver, hop=hop), decided[0], left,
                    relay, decided[1], messagePath, done, settings=decided[1],
                )
            except DeliveryNotStarted:
                # (Cut short while it waited for its slot: what was done so far stands.)
                log.info("{queueID}: fallback relay {relay} not tried: the delivery was cut "
                         "short", queueID=envelope.queueID, relay=relay)
                break
            results = withDeferredReplaced(results, again)
            nexthop = relay
        return results

    @inlineCallbacks
    def _relayIsMX(self, nexthop: str) -> Any:
        """Whether this relay is one of C{nexthop}'s MX hosts (L{_withoutSelf}), for a next
        hop whose hosts were not tried: C{False} when its lookup fails for now (Postfix
        goes on to the fallback relays then)."""
        if self._mxDomain(nexthop) is None:
            return False
        try:
            hosts = yield self.resolver.resolve(nexthop, limited=False)
        except DeliveryFailure:
            return False
        kept, loop = self._withoutSelf(hosts, nexthop)
        return loop is not None or len(kept) < len(hosts)

    @inlineCallbacks
    def _demandsTLS(self, envelope: Any, nexthop: str, hop: _Hop) -> Any:
        """Whether the mail to C{nexthop} that goes on to its fallback relays must have
        verified TLS there: C{nexthop}'s MTA-STS policy is in enforce mode, or DANE made TLS
        mandatory for one of its hosts -- or might have, for hosts not tried (a suspended
        next hop, a failed lookup), when DANE is on and C{nexthop} is an MX lookup."""
        if _enforced((yield self._stsPolicy(envelope, nexthop))) or hop.tlsRequired:
            return True
        return (self.dane and not hop.resolved and not envelope.tlsRequiredNo
                and self._mxDomain(nexthop) is not None)

    def _connectFunction(self) -> Callable[..., Deferred]:
        return self._connect if self._connect is not None else connectSMTP

    def _endpoint(self, host: MXHost, settings: ClientSettings) -> Any:
        """The endpoint of a connection to C{host}: an IPv4-mapped address
        (C{::ffff:192.0.2.1}) is connected to as the IPv4 address it maps, where a
        dual-stack socket would go (as L{OwnAddresses} takes it), and so from the IPv4
        source address (C{[delivery] source_address}), never from the system's choice."""
        timeout = settings.timeouts.connect
        ip = clientIP(host.address)
        family, address = (4, str(ip)) if ip is not None and ip.version == 4 else (
            host.family, host.address)
        kind = TCP6ClientEndpoint if family == 6 else TCP4ClientEndpoint
        endpoint: Any = kind(
            self.reactor,
            address,
            host.port,
            timeout=timeout,
            bindAddress=settings.sourceFor(family),
        )
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
        done: Callable[[list[RecipientResult]], None] | None = None,
        hop: _Hop | None = None,
    ) -> Any:
        """Deliver to C{recipients} at C{nexthop}'s hosts (see the module docstring).

        @param hop: where C{nexthop} stands among the next hops of a delivery that goes on
            to fallback relays, and what it finds out for them; C{None}: the only one."""
        if hop is not None:
            hop.tried = True
        policy = yield self._stsPolicy(envelope, nexthop)
        if _enforced(policy) and settings.tls != "implicit":
            settings = dataclasses.replace(settings, tls="required")
        domain = self._mxDomain(nexthop) if envelope.requireTLS else None
        if domain is not None and not self.dane and not _enforced(policy):
            return self._notFoundSecurely(envelope, recipients, domain, policy)
        key = (nexthop, settings)
        reused = None
        if domain is None:
            # (Not an idle connection for REQUIRETLS by MX lookup: whether its host was
            # found securely, or matched an enforced policy, is not known.)
            reused = yield self._sendOnIdle(key, envelope, recipients, messagePath)
        if reused is None:
            return (yield self._deliverFresh(envelope, recipients, key, policy, messagePath,
                                             done, hop=hop))
        reusedResults, cached = reused
        if _allTransient(reusedResults):  # (a stale connection, most likely: all afresh)
            # A session when its server answered (Postfix counts a reused one).
            sessions = 0 if cached.broke else 1
            return (yield self._deliverFresh(envelope, recipients, key, policy, messagePath,
                                             done, reusedResults, sessions=sessions, hop=hop))
        self._perDestination.reached(nexthop, settings)
        if firstDeferred(reusedResults) is None:
            return reusedResults
        # Some deferred: they go on to the other hosts, as on a fresh connection (Postfix's
        # smtp_reuse_session() drops the reused address from the list; SMTP_RCPT_KEEP).
        if done is not None:
            done([r for r in reusedResults if r.status is not DeliveryStatus.TRANSIENT])
        left = [r for r, got in zip(recipients, reusedResults, strict=True)
                if got.status is DeliveryStatus.TRANSIENT]
        again = yield self._deliverFresh(envelope, left, key, policy, messagePath, done,
                                         [r for r in reusedResults
                                          if r.status is DeliveryStatus.TRANSIENT],
                                         getattr(cached, "address", None), sessions=1,
                                         answered=True, hop=hop)
        return withDeferredReplaced(reusedResults, again)

    @inlineCallbacks
    def _deliverFresh(
        self,
        envelope: Any,
        recipients: list,
        key: tuple[str, ClientSettings],
        policy: Any,
        messagePath: Path,
        done: Callable[[list[RecipientResult]], None] | None,
        reusedResults: list[RecipientResult] | None = None,
        reusedAddress: str | None = None,
        sessions: int = 0,
        answered: bool = False,
        hop: _Hop | None = None,
    ) -> Any:
        """Deliver to C{recipients} over new connections to the next hop's hosts.

        @param reusedResults: the results of C{recipients} on a reused connection, which
            deferred them all.
        @param reusedAddress: the address of the reused connection's server, which deferred
            C{recipients} when others of its transaction were done: it is not tried again;
            when it is the only host, C{reusedResults} stand.
        @param sessions: the sessions of this delivery so far (the reused connection's).
        @param answered: C{reusedResults} are a server's answer (it took others of its
            transaction): they stand unless another host does better -- a server was
            talked to, so the next hop is not unreachable, and a reply says more than a
            refusal to connect -- as when a fresh connection's server deferred them.
        @param hop: see L{_deliver}.
        """
        nexthop = key[0]
        if 0 < self.mxSessionLimit <= sessions and reusedResults is not None:
            return reusedResults
        try:
            hosts = yield self.resolver.resolve(nexthop, limited=False)
        except DeliveryFailure as e:
            return self._unresolved(e, envelope, recipients, nexthop)
        found = len(hosts)
        hosts, loop = self._withoutSelf(hosts, nexthop)
        if hop is not None and (loop is not None or len(hosts) < found):
            hop.relayIsMX = True
        if loop is not None:
            log.warn("{queueID}: {diagnostic}", queueID=envelope.queueID,
                     diagnostic=loop[2].removeprefix("X-mailrelay; "))
            return resultsForAll(recipients, *loop)
        # The relay found among all the addresses and dropped first, then the limit
        # ([delivery] mx_address_limit): Postfix's smtp_find_self(), smtp_truncate_self(),
        # then smtp_balance_inet_proto() (smtp_addr.c, smtp_domain_addr()).
        hosts = self.resolver.limit(hosts)
        if reusedAddress is not None:
            # (Only now: dropped first, a reused best MX made the relay, a backup, look
            # like the best, a loop.  As Postfix: smtp_find_self(), then
            # smtp_reuse_session().)
            hosts = [h for h in hosts if h.address != reusedAddress]
            if not hosts:
                return reusedResults
        if policy is not None:
            hosts = self._stsHosts(policy, hosts, envelope)
            if not hosts:
                diagnostic = (f"X-mailrelay; no MX host of {policy.domain} matches its MTA-STS "
                              f"policy (mx: {' '.join(policy.mx)})")
                log.warn("{queueID}: {diagnostic}; deferred", queueID=envelope.queueID,
                         diagnostic=diagnostic.removeprefix("X-mailrelay; "))
                return resultsForAll(recipients, DeliveryStatus.TRANSIENT, "4.7.5", diagnostic)
        domain = self._mxDomain(nexthop) if envelope.requireTLS else None
        if domain is not None and not _enforced(policy):
            # (Under an enforced MTA-STS policy, every host _stsHosts kept qualifies.)
            hosts = [h for h in hosts if h.secure]
            if not hosts:
                return self._notFoundSecurely(envelope, recipients, domain, policy)
        tried = _Tried(sessions=sessions)
        if answered and reusedResults is not None:
            tried.deferred, tried.answered = list(reusedResults), True
        results = yield self._tryHosts(hosts, key, envelope, recipients, messagePath, tried,
                                       done)
        if hop is not None:
            hop.resolved = True
            hop.relayIsMX = hop.relayIsMX or tried.loop is not None or tried.foundSelf
            hop.tlsRequired = hop.tlsRequired or any(
                p is not None for p in tried.dane.values())
        answer = results if results is not None else tried.deferred
        stalled = firstDeferred(answer or []) if tried.broke else None
        if stalled is not None:  # (as Postfix's smtp_stream_except: it throttles)
            self._perDestination.unreachable(nexthop, stalled, key[1])
        elif results is not None or tried.deferred is not None:
            self._perDestination.reached(nexthop, key[1])
        if results is not None:
            return results
        return self._noHostAccepted(tried, reusedResults, envelope, recipients, key, hop)

    def _stsPolicy(self, envelope: Any, nexthop: str) -> Deferred[Any]:
        """The MTA-STS policy of C{nexthop}'s domain when it is looked up by MX (not a
        smarthost, not a bracketed host) and the message does not say C{TLS-Required: No}
        (RFC 8689: the sender asks that recipients' TLS policies be ignored); else C{None}.
        """
        if self.mtaSTS is None or envelope.tlsRequiredNo:
            return defer.succeed(None)
        try:
            parsed = parseSMTPNexthop(nexthop, strict=False)
        except ValueError:
            return defer.succeed(None)  # (the resolution says what is wrong with it)
        if not parsed.mxLookup:
            return defer.succeed(None)
        return self.mtaSTS.policy(parsed.host).addCallback(
            lambda policy: None if policy is None or policy.mode == "none" else policy
        )

    def _stsHosts(self, policy: Any, hosts: list[MXHost], envelope: Any) -> list[MXHost]:
        """The MX hosts C{policy} allows: in C{enforce} mode those its patterns match; in
        C{testing} mode all, those it would refuse logged."""
        allowed = [h for h in hosts if policy.matches(h.name)]
        if policy.mode == "enforce":
            return allowed
        for name in sorted({h.name for h in hosts} - {h.name for h in allowed}):
            log.info(
                "{queueID}: MTA-STS policy of {domain} (testing): MX host {host} matches no "
                "pattern of it (mx: {mx}); enforced, it would not be used",
                queueID=envelope.queueID, domain=policy.domain, host=name,
                mx=" ".join(policy.mx),
            )
        return hosts

    @inlineCallbacks
    def _sendOnIdle(
        self, key: tuple[str, ClientSettings], envelope: Any, recipients: list, messagePath: Path
    ) -> Any:
        """Send over an idle cached connection to C{key}, if there is one.

        @return: a Deferred firing with the results and the connection, or C{None} without
            a cached connection.
        """
        cached = self._cache.take(key)
        if cached is None:
            return None
        if self._lacksSMTPUTF8(cached, envelope, recipients):  # (a host that offers it may)
            self._cache.release(key, cached)
            return None
        results = yield self._send(cached, envelope, recipients, messagePath)
        self._cache.release(key, cached)
        deferred = [r for r in results if r.status is DeliveryStatus.TRANSIENT]
        if deferred:
            log.info(
                "{queueID}: {which} deferred on the reused connection to {relay} ({why}); "
                "{how}",
                queueID=envelope.queueID,
                which=_howMany(len(deferred), len(results)),
                how=("trying afresh" if len(deferred) == len(results)
                     else "trying the other hosts"),
                relay=cached.relay,
                why=_whyDeferred(results),
                remoteMTA=cached.remoteMTA,
            )
        return results, cached

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
        done: Callable[[list[RecipientResult]], None] | None = None,
    ) -> Any:
        """Try C{hosts} in order until no recipient is left: those a host deferred go on to
        the next host (the last one's answer stands); those it delivered or refused are
        handed to C{done} first (see L{ClientBackend.deliver}).

        @return: a Deferred firing with the results of every recipient, or C{None} when no
            host was the last to answer (C{tried} then says what went wrong).
        """
        left = recipients
        for index, host in enumerate(hosts):
            best = host.preference == hosts[0].preference
            connected = yield self._connectNoting(host, key, envelope, tried, best)
            if tried.loop is not None:  # (the best MX is the relay itself)
                # Those left loop; those an earlier host delivered or refused keep that.
                looped = resultsForAll(left, DeliveryStatus.PERMANENT, "5.4.6", tried.loop)
                if tried.deferred is None:
                    return looped
                return withDeferredReplaced(tried.deferred, looped)
            if tried.foundSelf:
                # RFC 5321 section 5.1: the relay discards itself and every less preferred
                # host (which may well send the mail back here).
                log.info(
                    "{queueID}: {mx}[{address}]:{port} is this relay (MX preference "
                    "{preference} of {nexthop}): less preferred hosts are not tried",
                    queueID=envelope.queueID, mx=host.name, address=host.address,
                    port=host.port, preference=host.preference, nexthop=key[0],
                )
                tried.broke = not tried.answered
                return None
            if connected is None:
                continue
            connection, connectedKey = connected
            if self._lacksSMTPUTF8(connection, envelope, left):
                # Not a session (Postfix: at EHLO, SMTP_MISC_FAIL_SOFT_NON_FINAL): the next
                # host is tried with every recipient left; the last one's refusal is final.
                self._release(key, connectedKey, connection, envelope, host)
                log.info(
                    "{queueID}: {mx}[{address}]:{port} does not offer SMTPUTF8, which the "
                    "message needs",
                    queueID=envelope.queueID, mx=host.name, address=host.address,
                    port=host.port,
                )
                tried.lacksSMTPUTF8 = SMTPConnectError(
                    "5.6.7", f"X-mailrelay; the message needs SMTPUTF8, but no server of "
                    f"{key[0]} offers it; the last tried was {host.name}", permanent=True)
                tried.connectErrors.append(tried.lacksSMTPUTF8)
                continue
            results = yield self._send(connection, envelope, left, messagePath)
            self._release(key, connectedKey, connection, envelope, host)
            if connection.tlsSessionFailed and self._plaintextOK(connectedKey[1], envelope):
                results = yield self._sendPlaintext(
                    host, connectedKey, envelope, left, messagePath, results
                )
            broke = connection.broke and not connection.tlsSessionFailed
            tried.answered = tried.answered or not broke
            tried.sessions += 1
            merged = (list(results) if tried.deferred is None
                      else withDeferredReplaced(tried.deferred, results))
            deferred = [r for r in results if r.status is DeliveryStatus.TRANSIENT]
            if deferred and index + 1 < len(hosts) and self._sessionsLeft(tried, envelope):
                log.info(
                    "{queueID}: {which} deferred by {relay} ({why}); trying the next host",
                    queueID=envelope.queueID,
                    which=_howMany(len(deferred), len(left)),
                    why=_whyDeferred(results),
                    deferred=len(deferred),
                    recipients=len(left),
                    relay=connection.relay,
                    remoteMTA=connection.remoteMTA,
                )
                tried.deferred = merged
                final = [got for got in results if got.status is not DeliveryStatus.TRANSIENT]
                if final and done is not None:
                    done(final)
                left = [r for r, got in zip(left, results, strict=True)
                        if got.status is DeliveryStatus.TRANSIENT]
                continue
            # (A server that answered earlier in this delivery reached the next hop.)
            tried.broke = not tried.answered
            return merged
        tried.broke = not tried.answered
        return None

    def _release(self, key: tuple[str, ClientSettings],
                 connectedKey: tuple[str, ClientSettings], connection: Any, envelope: Any,
                 host: MXHost) -> None:
        """Cache C{connection}, made under C{connectedKey} for a delivery to C{key}, for the
        deliveries that would make it the same way: those to C{connectedKey}, or, when it
        is one whose TLSA records DANE applied (L{_daneKey}), those to C{key} -- the next
        hop and settings asked for, as Postfix stores a session under the next hop and the
        TLS level asked once the policy was enforced on it (smtp_reuse_session(),
        smtp_key.c; smtp_tls_connection_reuse): a delivery to C{key} applies DANE to that
        host too, and the connection was verified under its records when it connected, at
        most C{connectionCacheTime} ago.  Only when DANE raised C{"may"}: one under
        REQUIRETLS (which DANE or PKIX verify, and which reuses no connection) is quit.
        So is one made without DANE where it would have applied but for the message's
        C{TLS-Required: No}: the next messages to C{key} apply it to C{host} (Postfix keys a
        session by the TLS level enforced on it: smtp_key.c)."""
        if (envelope.tlsRequiredNo and connectedKey[1].tlsa is None
                and self._daneDomain(host, key, envelope) is not None):
            self._quit(connection)
            return
        if connectedKey[1].tlsa is not None:
            if key[1].tls != "may":
                self._quit(connection)
                return
            connectedKey = key
        self._cache.release(connectedKey, connection)

    @staticmethod
    def _lacksSMTPUTF8(connection: Any, envelope: Any, recipients: list) -> bool:
        """Whether the message needs SMTPUTF8 for C{recipients} (L{needsSMTPUTF8}: a UTF-8
        address or header field) and C{connection}'s server does not offer it."""
        return (envelope.smtputf8 and "SMTPUTF8" not in connection.extensions
                and needsSMTPUTF8(envelope, recipients))

    def _sessionsLeft(self, tried: _Tried, envelope: Any) -> bool:
        """Whether the delivery may have another session (C{mxSessionLimit}); logged when
        not."""
        if not 0 < self.mxSessionLimit <= tried.sessions:
            return True
        log.info(
            "{queueID}: MX session limit ({limit}) reached: the recipients deferred are not "
            "tried at another host in this attempt",
            queueID=envelope.queueID, limit=self.mxSessionLimit,
        )
        return False

    @inlineCallbacks
    def _connectNoting(
        self, host: MXHost, key: tuple[str, ClientSettings], envelope: Any, tried: _Tried,
        best: bool = True,
    ) -> Any:
        """Connect to C{host}; a failure is logged and noted in C{tried}.  A TLS failure under
        C{tls = "may"} is followed by the same address without TLS when L{_plaintextOK}.

        @return: a Deferred firing with the connection and the key it is cached under (the
            settings it was made with), or C{None} when it failed.
        """
        try:
            try:
                key = yield self._daneKey(host, key, envelope, tried)
                return ((yield self._connectTo(host, key[1])), key)
            except SMTPConnectError as e:
                if not (e.tlsFailure and self._plaintextOK(key[1], envelope)):
                    raise
                plainKey = self._plaintextKey(key, envelope, host, e.diagnostic)
                return ((yield self._connectTo(host, plainKey[1])), plainKey)
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
                diagnostic=e.described,
            )
            if e.loop:  # (Postfix: final at the best MX, else transient)
                diagnostic = _loopDiagnostic(key[0])
                if best:
                    tried.loop = diagnostic
                else:
                    tried.foundSelf = True
                    tried.connectErrors.append(
                        SMTPConnectError("4.4.6", diagnostic, remoteMTA=e.remoteMTA))
                return None
            tried.connectErrors.append(e)
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
            tried.connectErrors.append(
                SMTPConnectError("4.4.0", diagnostic))  # (no server answered)
        return None

    @inlineCallbacks
    def _daneKey(self, host: MXHost, key: tuple[str, ClientSettings], envelope: Any,
                 tried: _Tried) -> Any:
        """C{key} for connecting to C{host}, its settings made those of its DANE TLSA records
        (RFC 7672; Postfix's C{smtp_tls_security_level = dane}) when C{dane} is on, the
        next hop is looked up by MX, C{host} is DNSSEC-secure (L{MXHost.secure}), the
        route's TLS is C{"may"} (which DANE raises: a route's other level, and an MTA-STS
        policy's C{"required"}, stand) and the message does not say C{TLS-Required: No}
        (RFC 8689 section 4.2.2: DANE is ignored): TLS is then mandatory and the certificate
        must match them (L{MXResolver.danePolicy}; all unusable: TLS unverified).

        @raise SMTPConnectError: the TLSA lookup failed (4.7.5: this host is not used, as
            Postfix).
        """
        domain = None if envelope.tlsRequiredNo else self._daneDomain(host, key, envelope)
        if domain is None:
            return key
        if (host.name, host.port) not in tried.dane:
            try:
                found = yield self.resolver.danePolicy(host, domain)
            except TransientFailure as e:
                found = SMTPConnectError(e.code, e.diagnostic)
            tried.dane[host.name, host.port] = found
        policy = tried.dane[host.name, host.port]
        if isinstance(policy, SMTPConnectError):
            raise policy
        if policy is None or (envelope.requireTLS and not policy.records):
            return key  # (none usable: REQUIRETLS keeps PKIX, never TLS unverified)
        return (key[0], replace(key[1], tls="required", tlsa=policy))

    def _daneDomain(self, host: MXHost, key: tuple[str, ClientSettings],
                    envelope: Any) -> str | None:
        """The domain looked up by MX (C{key}'s next hop) when DANE applies to C{host} for
        a delivery to C{key} but for a C{TLS-Required: No} (L{_daneKey}), else C{None}."""
        # (REQUIRETLS made the route's level "required": PKIX, or DANE where it applies.)
        level = key[1].tls == "may" or (envelope.requireTLS and key[1].tls == "required")
        if not (self.dane and host.secure and level):
            return None
        return self._mxDomain(key[0])

    def _noHostAccepted(
        self,
        tried: _Tried,
        reusedResults: list[RecipientResult] | None,
        envelope: Any,
        recipients: list,
        key: tuple[str, ClientSettings],
        hop: _Hop | None = None,
    ) -> list[RecipientResult]:
        """The results when no host took the message (or the recipients an earlier host
        deferred): returned when the last host refused HELO with a 5xx
        (L{SMTPConnectError.refusedSetup}); else what the last server that answered said, or
        the most relevant connection error, as a transient failure.  Recipients an earlier
        host delivered or refused keep that result.  Returned only at the final next hop
        (C{hop}, L{_Hop.final}); at the last fallback relay, deferred with 4.3.5."""
        nexthop = key[0]
        last = tried.connectErrors[-1] if tried.connectErrors else None
        refusal = last if last is not None and (
            last.refusedSetup or last is tried.lacksSMTPUTF8) else None
        if refusal is not None and hop is not None and hop.fallback and hop.final:
            log.warn("{queueID}: fallback relay {nexthop} refused the mail: {diagnostic} "
                     "(a fallback_relay configuration problem)", queueID=envelope.queueID,
                     nexthop=nexthop, diagnostic=refusal.diagnostic)
            return self._configurationProblem(tried, recipients, refusal)
        if refusal is not None and (hop is None or hop.final):
            refused = tried.connectErrors[-1].resultsFor(recipients)  # (logged)
            if tried.deferred is None:
                return refused
            return [mine if r.status is DeliveryStatus.TRANSIENT else r
                    for r, mine in zip(tried.deferred, refused, strict=True)]
        if tried.deferred is not None:
            # A server answered (deferring them): that says more than a refusal.
            return tried.deferred
        if not tried.connectErrors:  # pragma: no cover - the resolver never returns no host
            return reusedResults or resultsForAll(
                recipients,
                DeliveryStatus.TRANSIENT,
                "4.4.4",
                f"X-mailrelay; no host to deliver to for {nexthop}",
            )
        withReply = [c for c in tried.connectErrors if c.diagnostic.startswith("smtp;")]
        decisive = (withReply or tried.connectErrors)[-1]
        code, diagnostic, remoteMTA = decisive.code, decisive.diagnostic, decisive.remoteMTA
        if (envelope.requireTLS and (hop is None or hop.final)
                and all(c.withoutRequiredTLS for c in tried.connectErrors)):
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
                remoteAddress=decisive.remoteAddress,
                relay=decisive.relay,
            )
        # (Each host's failure is logged as it happens, the recipients' results by the
        # queue: one line per fact, as Postfix's.)
        results = resultsForAll(
            recipients, DeliveryStatus.TRANSIENT, _transientCode(code), diagnostic, remoteMTA,
            decisive.command, remoteAddress=decisive.remoteAddress, relay=decisive.relay,
        )
        if not any(aboutSecurity(e) for e in tried.connectErrors):
            # No server of it could be talked to (not: this delivery's TLS or AUTH failed).
            self._perDestination.unreachable(nexthop, results[0], key[1])
        return results

    @staticmethod
    def _configurationProblem(tried: _Tried, recipients: list,
                              error: SMTPConnectError) -> list[RecipientResult]:
        """The results of the recipients the last fallback relay refused (C{error}):
        deferred with 4.3.5 and its diagnostic, as Postfix's smtp_connect_inet(); those an
        earlier host delivered or refused keep that result."""
        deferred = resultsForAll(recipients, DeliveryStatus.TRANSIENT, "4.3.5",
                                 error.diagnostic, error.remoteMTA, error.command,
                                 remoteAddress=error.remoteAddress, relay=error.relay)
        if tried.deferred is None:
            return deferred
        return [mine if r.status is DeliveryStatus.TRANSIENT else r
                for r, mine in zip(tried.deferred, deferred, strict=True)]

    def _insecureLookup(self, nexthop: str) -> str | None:
        """REQUIRETLS (RFC 8689 section 4.2.1) wants the MX hosts found by DNSSEC-validated
        lookups or matching the domain's MTA-STS policy (RFC 8461).  Without C{dane} and
        C{mtaSTS} neither can be, so only a next hop named without MX lookup (a smarthost, a
        bracketed route) will do; with either, the MX hosts that qualify are used (see
        L{_deliver} and L{_deliverFresh}: those found securely, those an enforced policy
        matches), and without any the message is returned (L{_notFoundSecurely})."""
        domain = self._mxDomain(nexthop)
        if domain is not None and not self.dane and self.mtaSTS is None:
            return (f"the MX hosts of {domain} cannot be looked up securely here (no "
                    "DNSSEC validation)")
        return None

    @staticmethod
    def _mxDomain(nexthop: str) -> str | None:
        """The domain C{nexthop} names when its MX hosts are looked up (not a smarthost, not
        a bracketed host), else C{None}."""
        try:
            parsed = parseSMTPNexthop(nexthop, strict=False)
        except ValueError:
            return None  # (the resolution says what is wrong with it)
        return parsed.host if parsed.mxLookup else None

    def _notFoundSecurely(
        self, envelope: Any, recipients: list, domain: str, policy: Any
    ) -> list[RecipientResult]:
        """The results of a REQUIRETLS message to C{domain} none of whose MX hosts qualify
        (RFC 8689 section 4.2.1): none found by DNSSEC-validated lookups, and no MTA-STS
        policy in enforce mode (C{policy}: the one found, C{None} for none) to match them
        against: returned, 5.7.30 -- or deferred (4.7.5) while the domain's policy cannot
        be had (L{MTASTS.unknown}): it may have one that vouches for its MX hosts."""
        if self.dane:
            why = f"no MX host of {domain} was found by DNSSEC-validated lookups"
        else:
            why = (f"the MX hosts of {domain} cannot be looked up securely here (no DNSSEC "
                   "validation)")
        unknown = None
        if self.mtaSTS is not None:
            unknown = None if policy is not None else self.mtaSTS.unknown(domain)
            why += (f", and its MTA-STS policy is in {policy.mode} mode" if policy is not None
                    else f", and its MTA-STS policy cannot be had now ({unknown})" if unknown
                    else ", and it has no MTA-STS policy")
        diagnostic = f"X-mailrelay; REQUIRETLS support required: {why}"
        if unknown is not None:
            log.warn("{queueID}: REQUIRETLS message deferred: {why}", queueID=envelope.queueID,
                     why=why)
            return resultsForAll(recipients, DeliveryStatus.TRANSIENT, "4.7.5", diagnostic)
        log.warn("{queueID}: REQUIRETLS message not relayed: {why}", queueID=envelope.queueID,
                 why=why)
        return resultsForAll(recipients, DeliveryStatus.PERMANENT, "5.7.30", diagnostic)

    def _withoutSelf(
        self, hosts: list[MXHost], nexthop: str
    ) -> tuple[list[MXHost], tuple[DeliveryStatus, str, str] | None]:
        """C{hosts} without the relay itself -- a host of its name, or at one of its own
        addresses and ports -- and every host less preferred (RFC 5321 5.1, Postfix's
        smtp_find_self); when none is left, why: the relay is the best MX (a loop, 5.4.6)
        or only a backup (4.4.4, the primary unreachable)."""
        for index, host in enumerate(hosts):
            if (self.selfName is not None and host.name.lower().rstrip(".") == self.selfName
                    or (host.address, host.port) in self.ownAddresses):
                kept = [h for h in hosts[:index] if h.preference != host.preference]
                if kept:
                    return kept, None
                if host.preference == hosts[0].preference:
                    return [], (DeliveryStatus.PERMANENT, "5.4.6", _loopDiagnostic(nexthop))
                return [], (DeliveryStatus.TRANSIENT, "4.4.4",
                            f"X-mailrelay; unable to find primary relay for {nexthop}")
        return hosts, None

    def _plaintextKey(
        self, key: tuple[str, ClientSettings], envelope: Any, host: MXHost, diagnostic: str
    ) -> tuple[str, ClientSettings]:
        """Log that C{host} is tried again without TLS after C{diagnostic}; the key of that
        connection (C{tls = "none"})."""
        log.info(
            "{queueID}: {diagnostic}; trying {mx}[{address}]:{port} again without TLS "
            '(tls = "may")',
            queueID=envelope.queueID,
            diagnostic=diagnostic.removeprefix("X-mailrelay; "),
            mx=host.name,
            address=host.address,
            port=host.port,
        )
        return (key[0], replace(key[1], tls="none"))

    @inlineCallbacks
    def _sendPlaintext(
        self,
        host: MXHost,
        key: tuple[str, ClientSettings],
        envelope: Any,
        recipients: list,
        messagePath: Path,
        results: list[RecipientResult],
    ) -> Any:
        """The TLS session with C{host} broke in the transaction that gave C{results}: send
        the recipients it deferred again, over a new connection to C{host} without TLS.

        @return: a Deferred firing with C{results}, those of the recipients sent again
            replaced by the new ones (unchanged when that connection fails).
        """
        first = firstDeferred(results)
        if first is None:
            return results
        plainKey = self._plaintextKey(key, envelope, host, first.diagnostic)
        connected = yield self._connectNoting(host, plainKey, envelope, _Tried())
        if connected is None:  # (logged)
            return results
        connection = connected[0]
        merged = yield self._sendDeferredAgain(connection, envelope, recipients, messagePath,
                                               results)
        self._cache.release(plainKey, connection)
        return merged

    @staticmethod
    def _isRecipientDomain(nexthop: str, recipients: list) -> bool:
        """Whether C{nexthop} is an MX lookup of the recipients' own domain."""
        try:
            parsed = parseSMTPNexthop(nexthop, strict=False)
        except ValueError:
            return False
        return parsed.mxLookup and all(r.domain == parsed.host for r in recipients)

    def useDeliveryPlaces(self, places: Any) -> None:
        """Take one of C{places} for each delivery (see L{ClientBackend}), and keep at most
        as many idle connections as there are places."""
        super().useDeliveryPlaces(places)
        self._cache.maxIdle = places.limit

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
        C{destination_concurrency}, C{connection_cache_time}, C{plaintext_fallback_age}
        (the queue's C{min_backoff}) and C{mx_session_limit} (see L{SMTPBackend});
        C{mx_address_limit} (L{MXResolver}'s C{maxAddresses}); C{listeners} (their
        endpoint descriptions) and C{proxy_interfaces}, the relay's own addresses
        (L{OwnAddresses}); C{dane} (L{SMTPBackend}'s; its own resolver then, of
        C{nameservers}, asking with the AD bit: L{makeResolver}); C{fallback_relay}
        (L{SMTPBackend}'s C{fallbackRelay}).
    @param context: its C{reactor} connects and times, its C{resolver} (when it has one;
        else one of C{nameservers}) looks up the MX hosts.
    """
    options = builtinOptions(
        "smtp",
        options,
        (
            "settings",
            "nameservers",
            "destination_concurrency",
            "connection_cache_time",
            "plaintext_fallback_age",
            "mx_address_limit",
            "mx_session_limit",
            "listeners",
            "proxy_interfaces",
            "mta_sts",
            "mta_sts_cache",
            "dane",
            "fallback_relay",
        ),
    )
    reactor = context.reactor
    dane = bool(options.get("dane", False))
    resolver = None if dane else context.resolver  # the relay's: [dns] nameservers, or the system's
    if resolver is None:
        # (For DANE, one that asks for and keeps the AD bit, without a cache.)
        resolver = makeResolver(list(options.get("nameservers", ())) or None, reactor=reactor,
                                dnssec=dane)
    if dane:
        where, remote = remoteNameservers(resolver)
        if remote:
            log.warn(
                "[delivery] dane = true trusts the AD bit of the answers of name servers not "
                "on this host ({where}: {servers}): an answer forged on the way to the relay "
                "would pass for DNSSEC-validated; use a validating resolver on a loopback "
                "address (RFC 4035 4.9.3)",
                where=where,
                servers=", ".join(remote),
            )
    sts = None
    if options.get("mta_sts", False):
        sts = MTASTS(resolver, reactor, options.get("mta_sts_cache"),
                     deferToThread=context.deferToThread, describeTLS=describeTLSFailure,
                     clientTLS=verifiedClientTLS)
    return SMTPBackend(
        reactor,
        MXResolver(resolver, reactor, maxAddresses=options.get("mx_address_limit", 5)),
        options["settings"],
        destinationConcurrency=options.get("destination_concurrency", 20),
        connectionCacheTime=options.get("connection_cache_time", 2.0),
        plaintextFallbackAge=options.get("plaintext_fallback_age", 300.0),
        selfName=context.hostname,
        mtaSTS=sts,
        mxSessionLimit=options.get("mx_session_limit", 2),
        ownAddresses=OwnAddresses(options.get("listeners", ()),
                                  options.get("proxy_interfaces", ())),
        dane=dane,
        fallbackRelay=options.get("fallback_relay", ()),
    )

