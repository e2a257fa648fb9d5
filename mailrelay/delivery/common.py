"""What the delivery backends share: results for a whole group (L{resultsForAll}), the
per-next-hop concurrency limit (L{PerDestination}), quitting connections in the background
(L{Quitter}), the base of the SMTP and LMTP backends (L{ClientBackend}), the conversion of a
message to 7 bits for a next hop or backend that cannot take it as it is (L{convertTo7Bit}),
and the checks of the options the relay builds the built-in backends' plugins with
(L{builtinOptions})."""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Callable, Iterable
from typing import Any

from twisted.internet import defer
from twisted.internet.defer import Deferred, DeferredSemaphore, inlineCallbacks
from twisted.internet.threads import deferToThreadPool
from twisted.logger import Logger
from twisted.python.failure import Failure

from mailrelay.address import serverName
from mailrelay.delivery import mime
from mailrelay.errors import DeliveryNotStarted
from mailrelay.interfaces import (
    PLATFORM_TRUST_STORE,
    DeliveryStatus,
    RecipientResult,
    Route,
    flatSemaphore,
)
from mailrelay.smtp.clientsettings import ClientSettings

__all__ = [
    "BUILTIN_BACKENDS",
    "resultsForAll",
    "PerDestination",
    "aboutSecurity",
    "Quitter",
    "ClientBackend",
    "builtinOptions",
    "convertTo7Bit",
    "removeWhenFired",
    "withTextLineEnds",
]

log = Logger()

#: The names of the built-in backends, as routes name them, and of their plugins (the
#: dropin's; each module's C{build} makes the backend).
BUILTIN_BACKENDS = ("smtp", "lmtp", "maildir", "discard")


def builtinOptions(
    backend: str, options: dict[str, Any], allowed: Iterable[str]
) -> dict[str, Any]:
    """C{options} of the built-in C{backend}'s plugin, checked: the relay builds them from
    C{[delivery]} and C{[dns]} (L{mailrelay.app.backends}); C{settings}, when allowed, is
    required and must be a L{ClientSettings}.

    @raise ValueError: an unknown option, or no usable C{settings}.
    """
    allowed = tuple(allowed)
    unknown = sorted(set(options) - set(allowed))
    if unknown:
        raise ValueError(
            f"the built-in {backend} backend has no option {unknown[0]!r} "
            f"(its options: {', '.join(allowed) or 'none'})"
        )
    if "settings" in allowed and not isinstance(options.get("settings"), ClientSettings):
        raise ValueError(
            f"the built-in {backend} backend needs its client settings (option 'settings', "
            f"a ClientSettings), not {options.get('settings')!r}"
        )
    return options


def firstDeferred(results: Iterable[Any]) -> Any:
    """The first of C{results} that is a deferral (C{TRANSIENT}), or C{None}."""
    return next((r for r in results if r.status is DeliveryStatus.TRANSIENT), None)


def withDeferredReplaced(results: list[Any], again: list[Any]) -> list[Any]:
    """C{results} with its deferrals (C{TRANSIENT}) replaced, in order, by C{again}: the
    results of those recipients sent again."""
    merged = list(results)
    deferred = [i for i, r in enumerate(results) if r.status is DeliveryStatus.TRANSIENT]
    for i, result in zip(deferred, again, strict=True):
        merged[i] = result
    return merged


def resultsForAll(
    recipients: Iterable[Any],
    status: DeliveryStatus,
    code: str,
    diagnostic: str,
    remoteMTA: str | None = None,
    command: str | None = None,
    reason: str | None = None,
    remoteAddress: str | None = None,
    relay: str | None = None,
) -> list[RecipientResult]:
    """The same result for each of C{recipients} (L{mailrelay.envelope.Recipient}s);
    C{command}: the one whose reply C{diagnostic} is (L{RecipientResult.command});
    C{reason}, C{remoteAddress}, C{relay}: those of L{RecipientResult}."""
    return [
        RecipientResult(
            address=r.address, status=status, code=code, diagnostic=diagnostic,
            remoteMTA=remoteMTA, command=command, reason=reason,
            remoteAddress=remoteAddress, relay=relay,
        )
        for r in recipients
    ]


def aboutSecurity(error: Any) -> bool:
    """Whether C{error} (an L{SMTPConnectError <mailrelay.smtp.errors.SMTPConnectError>}) is
    about TLS, AUTH or the source address, the settings of one delivery, not about reaching
    the server: the next hop is not counted unreachable for it (other routes' deliveries to
    it, with their own settings, would be suspended for one route's fault)."""
    return (bool(error.tlsFailure) or error.withoutRequiredTLS or error.sourceUnbound
            or error.code.startswith(("4.7.", "5.7.")))


#: A next hop and the source addresses (IPv4, IPv6) deliveries to it are made from.
_Destination = tuple[str, "str | None", "str | None"]


def _destination(nexthop: str, settings: Any) -> _Destination:
    """The key of C{nexthop} reached from the source addresses of C{settings} (a
    L{ClientSettings}, or C{None}: the system's choice)."""
    return (
        nexthop,
        getattr(settings, "sourceAddress", None),
        getattr(settings, "sourceAddress6", None),
    )


class PerDestination:
    """Runs deliveries with at most C{limit} at once per next hop, and makes their Deferreds
    never fail (an unexpected error is logged and counts as a transient failure of every
    recipient; a cancellation by the caller passes through).

    A next hop that no server of could be talked to (L{unreachable}: refused, timed out, no
    greeting, or lost or timed out in the transaction...) C{limit} times in a row -- a
    cohort of deliveries -- is I{suspended} for C{suspendTime} seconds, as Postfix's queue
    manager declares a destination dead for C{$minimal_backoff_time}: the deliveries to it
    waiting for a slot or starting meanwhile are deferred at once ("delivery temporarily
    suspended: " and the reason), instead of each waiting for its own time-out and holding
    the queue's active window for mail to other next hops.  A delivery that reached a server
    (L{reached}) ends the count.

    A delivery with its next hop's slot then takes one of C{places} (the queue's places of
    the deliveries in flight at once over every backend, C{[queue] delivery_limit}), when
    given: a next hop at its limit holds none of them while its deliveries wait.

    A next hop is suspended from the source addresses of the deliveries that failed to
    reach it (their L{ClientSettings} C{sourceAddress} and C{sourceAddress6}), not from
    others: a route connecting from an address of its own may be blocked where another is
    not, and Postfix's qmgr keeps dead destinations per transport, a bind address of its own
    (C{smtp_bind_address} in master.cf) being a transport of its own.  The concurrency limit
    stays per next hop, whatever the source address.

    @ivar places: the places of every backend's deliveries (their C{run(f, *args)}), or
        C{None}.
    @ivar semaphores: the semaphores of the next hops with deliveries running or waiting
        (forgotten when a next hop goes idle, so the mapping stays small).
    """

    def __init__(
        self, limit: int, what: str, clock: Any = None, suspendTime: float = 300.0
    ) -> None:
        """
        @param clock: provides C{seconds()} (the reactor); C{None}: never suspend.
        @param suspendTime: seconds a next hop stays suspended (the queue's C{min_backoff}).
        """
        if limit < 1:
            raise ValueError("the concurrency limit must be at least 1")
        self.limit = limit
        self.what = what
        self.clock = clock
        self.suspendTime = suspendTime
        self.places: Any = None
        self.semaphores: dict[str, DeferredSemaphore] = {}
        #: (Next hop, source addresses) -> (failures in a row, the last one's time, its
        #: result).
        self._failures: dict[_Destination, tuple[int, float, RecipientResult]] = {}

    def unreachable(self, nexthop: str, result: RecipientResult, settings: Any = None) -> None:
        """No server of C{nexthop} could be talked to from the source addresses of
        C{settings} (C{None}: the system's choice); C{result} (transient) says why."""
        if self.clock is None:
            return
        now = self.clock.seconds()
        if len(self._failures) > 10000:  # (next hops never tried again: forget them)
            self._failures = {
                k: v for k, v in self._failures.items() if now - v[1] < self.suspendTime
            }
        key = _destination(nexthop, settings)
        count = self._count(key, now) + 1
        self._failures[key] = (count, now, result)
        if count == self.limit:
            sources = " and ".join(a for a in key[1:] if a is not None)
            log.warn(
                "{what} delivery to {nexthop}{source} temporarily suspended for {seconds:g}s "
                "after {count} failure(s) in a row: {diagnostic}",
                what=self.what,
                nexthop=nexthop,
                source=f" from {sources}" if sources else "",
                seconds=self.suspendTime,
                count=count,
                diagnostic=result.diagnostic,
            )

    def reached(self, nexthop: str, settings: Any = None) -> None:
        """A delivery to C{nexthop} from the source addresses of C{settings} reached a
        server: it is not suspended from them."""
        self._failures.pop(_destination(nexthop, settings), None)

    def resume(self, nexthop: str | None = None) -> None:
        """Suspend C{nexthop} (or, with C{None}, every next hop) no more, from any source
        address, and start its counts again (the operator flushed a message for it, or the
        whole queue)."""
        if nexthop is None:
            self._failures.clear()
        else:
            for key in [k for k in self._failures if k[0] == nexthop]:
                del self._failures[key]

    def _count(self, key: _Destination, now: float) -> int:
        """The failures in a row of the next hop and source addresses C{key} that still
        count (none once its suspension, or the time it would have lasted, is over: then it
        is tried again)."""
        count, last, why = self._failures.get(key, (0, 0.0, None))
        if last > now and why is not None:
            # Counted before a step back of the clock: the time runs from now (it ran
            # until the clock reached the last failure again).
            self._failures[key] = (count, now, why)
            last = now
        return count if now - last < self.suspendTime else 0

    def _suspended(
        self, nexthop: str, recipients: list[Any], settings: Any = None
    ) -> list[RecipientResult] | None:
        """The results of a delivery to C{nexthop} while it is suspended, else C{None}: what
        the failure that suspended it said, as Postfix's qmgr defers a dead queue's entries
        with its saved DSN (qmgr_queue_throttle(), dsn_copy(), qmgr_defer_todo()) -- its
        status, its Remote-MTA (only where a server answered), its diagnostic (a server's
        reply stays of type smtp: the DSN's Diagnostic-Code) and the command its reply
        answered -- with its reason after C{"delivery temporarily suspended: "}
        (qmgr_deliver.c), a server's reply as C{"host H said: <reply>"}, H its name and the
        address it spoke from (smtp_proto.c: C{name[address]})."""
        key = _destination(nexthop, settings)
        if self.clock is None or self._count(key, self.clock.seconds()) < self.limit:
            return None
        why = self._failures[key][2]
        kind, sep, text = why.diagnostic.partition(";")
        if not sep or " " in kind.strip():  # (no diagnostic type: the whole is the text)
            text = why.diagnostic
        text = text.strip()
        host = serverName(why.remoteMTA, why.remoteAddress)
        if host and sep and kind.strip().lower() == "smtp":
            text = f"host {host} said: {text}"
        return resultsForAll(
            recipients,
            DeliveryStatus.TRANSIENT,
            why.code,
            why.diagnostic,
            why.remoteMTA,
            why.command,
            f"delivery temporarily suspended: {text}",
            why.remoteAddress,
        )

    def run(
        self,
        nexthop: str,
        envelope: Any,
        recipients: list[Any],
        f: Callable[..., Deferred],
        *args: Any,
        started: Callable[[], None] | None = None,
        settings: Any = None,
    ) -> Deferred:
        """Run C{f(*args)} when a slot for C{nexthop} is free (at once with the results of
        a suspended next hop, when it is or becomes suspended: see L{unreachable}).

        @param started: called when the delivery begins, with its slot and its place among
            the queue's (the queue's delivery timeout runs from then).
        @param settings: the delivery's client settings, whose source addresses it is
            suspended from (L{unreachable})."""
        suspended = self._suspended(nexthop, recipients, settings)
        if suspended is not None:
            return defer.succeed(suspended)
        semaphore = self.semaphores.get(nexthop)
        if semaphore is None:
            semaphore = self.semaphores[nexthop] = flatSemaphore(self.limit)

        slotted: list[bool] = []

        def begin() -> Deferred:
            if started is not None:
                started()
            late = self._suspended(nexthop, recipients, settings)
            return defer.succeed(late) if late is not None else f(*args)

        def start() -> Deferred:
            slotted.append(True)
            if self.places is None or self._suspended(nexthop, recipients, settings) is not None:
                return begin()
            return self.places.run(begin)

        d = semaphore.run(start)

        def forget(result: Any) -> Any:
            if (
                semaphore.tokens == semaphore.limit
                and not semaphore.waiting
                and self.semaphores.get(nexthop) is semaphore
            ):
                del self.semaphores[nexthop]
            return result

        def unexpected(failure: Failure) -> Any:
            if failure.check(defer.CancelledError):
                # The caller cancelled (its time-out, the stop): let it know, and whether
                # the delivery had started.
                if not slotted and not failure.check(DeliveryNotStarted):
                    return Failure(DeliveryNotStarted())
                return failure
            log.failure(
                "{queueID}: {what} delivery to {nexthop} failed unexpectedly",
                failure,
                queueID=envelope.queueID,
                what=self.what,
                nexthop=nexthop,
            )
            return resultsForAll(
                recipients,
                DeliveryStatus.TRANSIENT,
                "4.3.0",
                f"X-mailrelay; internal error: {failure.getErrorMessage()}",
            )

        d.addErrback(unexpected)
        d.addBoth(forget)
        return d


class Quitter:
    """Ends client connections in the background (QUIT, or abort when a connection cannot be
    used any more), and lets a backend wait for those still quitting when it closes."""

    def __init__(self, reactor: Any) -> None:
        self.reactor = reactor
        self.quitting: set[Deferred] = set()

    def quit(self, connection: Any) -> None:
        if not connection.usable:
            try:
                connection.abort()
            except Exception:
                log.failure(
                    "aborting {remoteMTA}", remoteMTA=getattr(connection, "remoteMTA", None)
                )
            return
        d = defer.maybeDeferred(connection.quit)
        self.quitting.add(d)

        def done(result: Any) -> None:
            self.quitting.discard(d)
            if isinstance(result, Failure):
                log.debug(
                    "QUIT to {remoteMTA} failed: {error}",
                    remoteMTA=getattr(connection, "remoteMTA", None),
                    error=result.getErrorMessage(),
                )
                try:
                    connection.abort()
                except Exception:
                    pass

        d.addBoth(done)

    def wait(self, timeout: float) -> Deferred:
        """Fires (never failing) when every connection has quit, or after C{timeout} seconds
        (those left are then cancelled, which aborts them)."""
        pending = list(self.quitting)
        if not pending:
            return defer.succeed(None)
        done = defer.DeferredList(pending, consumeErrors=True)
        timer = self.reactor.callLater(timeout, done.cancel)

        def finish(_: Any) -> None:
            if timer.active():
                timer.cancel()

        done.addBoth(finish)
        return done


class ClientBackend:
    """What the SMTP and LMTP backends share: each delivery's client settings are the
    backend's defaults with the options of the delivery's L{Route} applied (never looked up
    by the next hop's name), deliveries are limited per next hop (see L{PerDestination}), and
    connections are quit in the background (see L{Quitter}).  Subclasses set C{settings},
    C{_perDestination} and C{_quitter}, and define C{_deliver}."""

    settings: Any
    _perDestination: PerDestination
    _quitter: Quitter
    reactor: Any
    #: Seconds a message must have been queued before a TLS failure under C{tls = "may"} is
    #: followed by the same server without TLS (the queue's C{min_backoff}, Postfix's
    #: C{$minimal_backoff_time}).
    plaintextFallbackAge: float = 300.0

    def useDeliveryPlaces(self, places: Any) -> None:
        """Have each delivery take one of C{places} (the queue's, shared by every backend)
        once its next hop has a slot free (see L{PerDestination})."""
        self._perDestination.places = places

    def resumeSuspended(self, nexthop: str | None = None) -> None:
        """Try C{nexthop} (C{None}: every next hop) again if it is suspended after failures
        to reach it (the queue manager calls this when the operator flushes a message for
        it, or the queue: see L{PerDestination.resume})."""
        self._perDestination.resume(nexthop)

    def settingsFor(self, route: Route) -> Any:
        """The client settings of a delivery along C{route}: the backend's default
        C{settings} with C{route.options} applied.

        @raise ValueError: the options cannot be applied (the message says why).
        """
        changes = route.options.changes()
        if changes.get("caFile") == PLATFORM_TRUST_STORE:
            changes["caFile"] = None  # what ClientSettings calls the platform's trust store
        return dataclasses.replace(self.settings, **changes) if changes else self.settings

    def _plaintextOK(self, settings: Any, envelope: Any) -> bool:
        """Whether a TLS failure under C{settings} may be followed by the same address
        without TLS: C{tls = "may"} (nothing verified; REQUIRETLS makes it C{"required"}), no
        credentials to send, and the message queued for at least L{plaintextFallbackAge}
        seconds (see L{mailrelay.delivery.smtp}'s docstring)."""
        if settings.tls != "may" or settings.username is not None:
            return False
        arrival = envelope.arrival
        return arrival is not None and self.reactor.seconds() - arrival >= (
            self.plaintextFallbackAge
        )

    @inlineCallbacks
    def _sendDeferredAgain(
        self, connection: Any, envelope: Any, recipients: list, messagePath: Any, results: list
    ) -> Any:
        """Send the recipients that C{results} (of C{recipients}) deferred again over
        C{connection}: a Deferred firing with C{results}, theirs replaced by the new ones.
        (After a TLS session broke under C{tls = "may"}: see L{firstDeferred}.)"""
        deferred = [r for r, got in zip(recipients, results, strict=True)
                    if got.status is DeliveryStatus.TRANSIENT]
        again = yield self._send(connection, envelope, deferred, messagePath)
        return withDeferredReplaced(results, again)

    #: L{deliver} takes C{done} and C{started} (see there): the queue's L{Deliverer
    #: <mailrelay.queue.attempt.Deliverer>} gives them.
    reportsEarly = True
    reportsStart = True

    def deliver(
        self,
        envelope: Any,
        recipients: Any,
        route: Route,
        messagePath: Any,
        done: Callable[[list[RecipientResult]], None] | None = None,
        started: Callable[[], None] | None = None,
    ) -> Deferred:
        """Deliver to C{recipients} along C{route}; the Deferred never fails (but may be
        cancelled).

        @param started: called when the delivery begins, with its next hop's slot and its
            place among the queue's (see L{PerDestination.run}).

        @param done: called, while the delivery goes on, with the final results (delivered
            or refused) a server gave to some of the recipients before the others go on to
            the next server (the SMTP backend's next MX host), so that they are recorded
            before the delivery ends: cut short (a stop, its timeout), it would defer them
            too, and send them again.  The same results are in the Deferred's."""
        recipients = list(recipients)
        try:
            settings = self.settingsFor(route)
        except ValueError as e:
            log.error(
                "{queueID}: the options of the {what} route to {nexthop} cannot be used: "
                "{error}",
                queueID=envelope.queueID,
                what=self._perDestination.what,
                nexthop=route.nexthop,
                error=str(e),
            )
            return defer.succeed(
                resultsForAll(
                    recipients,
                    DeliveryStatus.TRANSIENT,
                    "4.3.5",
                    f"X-mailrelay; unusable options for the route to {route.nexthop}: {e}",
                )
            )
        decided = self._tlsPolicy(envelope, recipients, route.nexthop, settings)
        if isinstance(decided, list):
            return defer.succeed(decided)
        envelope, settings = decided
        return self._deliverAlong(envelope, recipients, route, settings, messagePath, done,
                                  started)

    def _deliverAlong(
        self,
        envelope: Any,
        recipients: list[Any],
        route: Route,
        settings: Any,
        messagePath: Any,
        done: Callable[[list[RecipientResult]], None] | None = None,
        started: Callable[[], None] | None = None,
    ) -> Deferred:
        """Deliver to C{recipients} along C{route} with C{settings} (the route's, with what
        the message asks of TLS applied: L{_tlsPolicy}), in a slot of its next hop
        (L{PerDestination.run}); see L{deliver}."""
        return self._perDestination.run(
            route.nexthop,
            envelope,
            recipients,
            self._deliver,
            envelope,
            recipients,
            route.nexthop,
            settings,
            messagePath,
            done,
            started=started,
            settings=settings,
        )

    def _deliver(
        self,
        envelope: Any,
        recipients: list[Any],
        nexthop: str,
        settings: Any,
        messagePath: Any,
        done: Callable[[list[RecipientResult]], None] | None = None,
    ) -> Deferred:
        raise NotImplementedError()

    def _tlsPolicy(self, envelope: Any, recipients: list, nexthop: str, settings: Any) -> Any:
        """What the message asks of TLS (RFC 8689), over the route's settings: C{(envelope,
        settings)} to deliver with, or the results of a message that cannot go this way.

          - REQUIRETLS (C{envelope.requireTLS}): the next hop must be found securely
            (L{_insecureLookup}) and the TLS policy verify the server (C{"none"} and
            C{"may"} become C{"required"}); else the message is returned with 5.7.30.  A
            local next hop (L{_localNexthop}) delivers to the mailbox: no TLS needed.
          - C{TLS-Required: No} (C{envelope.tlsRequiredNo}, noted by the intake; never with
            REQUIRETLS): the sender asks that a TLS policy not stop the delivery, so
            C{"required"} becomes C{"may"} (STARTTLS when offered, unverified) and
            C{"implicit"} stays implicit TLS, unverified (it cannot be left out: Postfix's
            C{encrypt} level, smtp_tls_policy.c) -- except on routes that log in (AUTH), whose
            credentials never go over TLS that is not verified.
        """
        if envelope.requireTLS:
            if self._localNexthop(nexthop):
                return dataclasses.replace(envelope, requireTLS=False), settings
            why = self._insecureLookup(nexthop)
            if why is not None:
                log.warn("{queueID}: REQUIRETLS message not relayed to {nexthop}: {why}; "
                         "bounced (5.7.30)", queueID=envelope.queueID, nexthop=nexthop,
                         why=why)
                return resultsForAll(
                    recipients,
                    DeliveryStatus.PERMANENT,
                    "5.7.30",
                    f"X-mailrelay; REQUIRETLS support required: {why}",
                )
            if settings.tls not in ("required", "implicit"):
                settings = dataclasses.replace(settings, tls="required")
            return envelope, settings
        if not (envelope.tlsRequiredNo and settings.verifiesTLS) or settings.username is not None:
            return envelope, settings
        # (noted by the intake from the message's header)
        implicit = settings.tls == "implicit"
        log.info(
            "{queueID}: TLS-Required: No: delivering to {nexthop} with {how}, unverified, "
            "instead of verified",
            queueID=envelope.queueID,
            nexthop=nexthop,
            how="implicit TLS" if implicit else "TLS if offered",
        )
        if implicit:
            return envelope, dataclasses.replace(settings, tlsVerify=False)
        return envelope, dataclasses.replace(settings, tls="may")

    def _localNexthop(self, nexthop: str) -> bool:
        """Whether C{nexthop} is on this host (REQUIRETLS does not apply to it)."""
        return False

    def _insecureLookup(self, nexthop: str) -> str | None:
        """Why C{nexthop} cannot be found securely enough for REQUIRETLS, or C{None}."""
        return None

    @inlineCallbacks
    def _send(self, connection: Any, envelope: Any, recipients: list, messagePath: Any) -> Any:
        """C{connection.send}, turning an (unexpected) failure into transient results; each
        result says, for the log, which server answered and over what TLS.  A message the
        next hop cannot take as it is (8-bit content without 8BITMIME, binary without
        BINARYMIME) is converted first (L{mailrelay.delivery.mime}), or bounced with 5.6.3
        when it cannot be."""
        converted: str | None = None
        try:
            prepared = yield self._prepare(connection, envelope, recipients, messagePath)
            if isinstance(prepared, list):
                return prepared
            envelope, messagePath, converted = prepared
            # The spooled file of a text message has CRLF line ends only (the intake made sure):
            # streamed with dot-stuffing only; a converted file is checked as it goes.
            checked = converted is None and envelope.body != "BINARYMIME"
            results = yield connection.send(
                envelope, recipients, messagePath, lineEndsChecked=checked
            )
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
            )  # (the relay's own failure: no Remote-MTA, Postfix's DSN_BY_LOCAL_MTA)
        finally:
            if converted is not None:
                removeFile(converted)
        relay = getattr(connection, "relay", None)
        tls = getattr(connection, "tlsDescription", None)
        return [dataclasses.replace(r, relay=relay, tls=tls) for r in results]

    @inlineCallbacks
    def _prepare(self, connection: Any, envelope: Any, recipients: list, messagePath: Any) -> Any:
        """What to send over C{connection}: C{(envelope, path, converted file or None)}, or the
        results of a message that cannot be converted for it."""
        extensions = connection.extensions
        binary = envelope.body == "BINARYMIME"
        if binary and "BINARYMIME" in extensions and "CHUNKING" in extensions:
            return envelope, messagePath, None
        if not binary and "8BITMIME" in extensions:
            return envelope, messagePath, None
        lacking = "BINARYMIME" if binary else "8BITMIME"
        remoteMTA = connection.remoteMTA or ""
        host = getattr(connection, "host", None) or remoteMTA.partition("; ")[2] or remoteMTA
        prepared = yield convertTo7Bit(self._inThread, envelope, recipients, messagePath, host,
                                       lacking)
        return prepared

    def _inThread(self, f: Callable[..., Any], *args: Any) -> Deferred:
        """C{f(*args)} in the reactor's thread pool (at once with a reactor that has none, as
        a test's clock)."""
        reactor = getattr(self, "reactor", None)
        if reactor is None or not hasattr(reactor, "getThreadPool"):
            return defer.maybeDeferred(f, *args)
        return deferToThreadPool(reactor, reactor.getThreadPool(), f, *args)

    def _quit(self, connection: Any) -> None:
        """Send QUIT (or abort a connection that cannot be used any more), in the background."""
        self._quitter.quit(connection)

    def close(self, timeout: float = 10.0) -> Deferred:
        """Wait (at most C{timeout} seconds) for connections still quitting."""
        return self._quitter.wait(timeout)

    @property
    def _semaphores(self) -> dict[str, Any]:
        return self._perDestination.semaphores


@inlineCallbacks
def convertTo7Bit(
    inThread: Callable[..., Deferred],
    envelope: Any,
    recipients: list,
    messagePath: Any,
    target: str,
    lacking: str,
) -> Any:
    """The message at C{messagePath} made 7-bit (L{mime.convertFile}, run by C{inThread},
    C{callable(f, *args)} returning a Deferred) for C{target} (a next hop, a backend's
    name), which lacks C{lacking} (C{"8BITMIME"} or C{"BINARYMIME"}): a Deferred firing
    with C{(envelope, path, converted file or None)} -- the caller removes the converted
    file (L{removeWhenFired}) -- or with the results of C{recipients} when it cannot be: 5.6.3
    (L{mime.ConversionImpossible}), or 4.3.0 when a file cannot be read or written; the
    relay's own verdicts, which name no Remote-MTA (Postfix's smtp_mime_fail(),
    DSN_BY_LOCAL_MTA; RFC 3464 section 2.3.5)."""
    binary = envelope.body == "BINARYMIME"
    try:
        converted = yield _givenUpRemoved(inThread(mime.convertFile, str(messagePath), binary))
    except OSError as e:
        log.error(
            "{queueID}: cannot convert the message to 7 bits for {host}: {error}",
            queueID=envelope.queueID,
            host=target,
            error=str(e),
        )
        return resultsForAll(
            recipients,
            DeliveryStatus.TRANSIENT,
            "4.3.0",
            f"X-mailrelay; cannot convert the message to 7 bits for {target}: "
            f"{e.strerror or e}",
        )
    except mime.ConversionImpossible as e:
        log.warn(
            "{queueID}: cannot convert the message to 7 bits for {host}, which does not "
            "offer {lacking}: {reason}",
            queueID=envelope.queueID,
            host=target,
            lacking=lacking,
            reason=str(e),
        )
        return resultsForAll(
            recipients,
            DeliveryStatus.PERMANENT,
            "5.6.3",
            f"X-mailrelay; {target} does not support {lacking}, and the message cannot be "
            f"converted to 7 bits: {e}",
        )
    if converted is None:  # 7-bit already: a binary message too, which then goes as text
        return dataclasses.replace(envelope, body=None) if binary else envelope, messagePath, None
    path, parts = converted
    log.info(
        "{queueID}: conversion=7bit for {host} (no {lacking}): {parts} body part(s) "
        "encoded",
        queueID=envelope.queueID,
        host=target,
        lacking=lacking,
        parts=parts,
    )
    return dataclasses.replace(envelope, body=None), path, path


def withTextLineEnds(
    inThread: Callable[..., Deferred], envelope: Any, recipients: list, messagePath: Any,
    backend: str,
) -> Deferred:
    """The message for a backend that makes its CRLF line ends LF (a Maildir, a command): a
    C{BODY=BINARYMIME} one, whose CRLF need not be line ends, made 7-bit first
    (L{convertTo7Bit}, for C{recipients}: its binary parts base64); any other as it is,
    C{(envelope, messagePath, None)}."""
    if envelope.body == "BINARYMIME" and recipients:
        return convertTo7Bit(inThread, envelope, recipients, messagePath, backend, "BINARYMIME")
    return defer.succeed((envelope, messagePath, None))


def _givenUpRemoved(conversion: Deferred) -> Deferred:
    """C{conversion} (of L{mime.convertFile}, in a thread, which cannot be stopped) as a
    Deferred that may be cancelled: the copy the thread makes after that is removed."""
    waited: Deferred = Deferred()

    def landed(outcome: Any) -> None:
        if not waited.called:
            waited.callback(outcome)  # (a Failure goes to the errbacks)
        elif isinstance(outcome, tuple):  # cancelled meanwhile: nobody will remove it
            removeFile(outcome[0])

    conversion.addBoth(landed)
    return waited


def removeWhenFired(d: Deferred, path: str | None) -> Deferred:
    """C{d}, which removes the file at C{path} (a converted copy, L{convertTo7Bit}; none
    when C{None}) when it fires."""
    if path is not None:

        def remove(outcome: Any) -> Any:
            removeFile(path)
            return outcome

        d.addBoth(remove)
    return d


def removeFile(path: str) -> None:
    try:
        os.unlink(path)
    except OSError as e:  # pragma: no cover - a temporary file of ours
        log.warn("cannot remove {path}: {error}", path=path, error=str(e))
