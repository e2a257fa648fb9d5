"""One delivery attempt of one message: route, group, deliver, check.

Every C{PENDING} recipient is routed (L{IRouter.route}); recipients with the same L{Route}
(backend, next hop and options) form groups of at most L{RECIPIENTS_PER_DELIVERY}, and every
group is handed with its route to its backend at once (L{IDeliveryBackend.deliver}), at
most C{[queue] delivery_limit} in flight over every message and backend (L{DeliveryPlaces}:
the others wait for a place, however long: a delivery's timeout runs from when it has its
place).  A router's L{PermanentFailure} bounces the recipient; any
other routing failure (a L{TransientFailure} with its own code and diagnostic), an unknown
backend, a failed delivery Deferred, a delivery that outlasts the backend's timeout, a call
cut short by the stop, or a malformed answer is a transient failure, never a delivery.  The
result is one L{Outcome} per recipient; what becomes of the recipients is
L{mailrelay.queue.outcome}'s to decide.  The outcomes of each delivery that ends while
others of the attempt still run are also handed over at once (to be recorded before the
slowest delivery ends).
"""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping, Sequence
from typing import Any

from twisted.internet.defer import (
    CancelledError,
    Deferred,
    fail,
    maybeDeferred,
)
from twisted.internet.interfaces import IReactorTime
from twisted.logger import Logger
from twisted.python.failure import Failure

from mailrelay.envelope import Envelope, Recipient
from mailrelay.errors import (
    DeliveryFailure,
    DeliveryNotStarted,
    PermanentFailure,
    TransientFailure,
    notStartedDiagnostic,
    stoppedBeforeStart,
)
from mailrelay.interfaces import (
    DeliveryStatus,
    IDeliveryBackend,
    ISpool,
    RecipientResult,
    Route,
    flatSemaphore,
)
from mailrelay.metrics import DELIVERY_SECONDS, DELIVERY_WAIT_SECONDS, child, noteBlocking
from mailrelay.queue.outcome import Outcome

log = Logger(namespace="mailrelay.queue")

__all__ = [
    "RECIPIENTS_PER_DELIVERY",
    "Calls",
    "Deliverer",
    "DeliveryPlaces",
    "DeliveryTimedOut",
]

#: The most recipients of one route handed to its backend in one delivery (one SMTP or LMTP
#: transaction), as Postfix's C{default_destination_recipient_limit}: a next hop taking fewer
#: per transaction (RFC 5321 4.5.3.1.8 asks for 100 at least; 452 4.5.3 beyond) would defer
#: the others to the next attempt, one backoff later each time.
RECIPIENTS_PER_DELIVERY = 50


def _oneLine(text: str, limit: int = 500) -> str:
    """C{text} on one line (controls become spaces), at most C{limit} characters."""
    text = "".join(" " if ord(c) < 32 or ord(c) == 127 else c for c in text).strip()
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _transient(recipient: Recipient, code: str, diagnostic: str) -> RecipientResult:
    return RecipientResult(recipient.address, DeliveryStatus.TRANSIENT, code, _oneLine(diagnostic))


def _groupKey(route: Route) -> Route:
    """What recipients share one delivery by: their whole route (a L{Route} is hashable: its
    fields are strings and a frozen L{RouteOptions <mailrelay.interfaces.RouteOptions>})."""
    return route


class DeliveryTimedOut(Exception):
    """A backend did not answer a delivery within its timeout (counted from when the
    delivery had its place: see L{DeliveryPlaces}).

    @ivar timeout: the timeout, in seconds.
    """

    def __init__(self, timeout: float) -> None:
        super().__init__(f"no answer within {timeout:g}s")
        self.timeout = timeout


class _DeliveryTimer:
    """The timeout of one delivery, started once the delivery has its place (L{start}:
    the wait for one is not timed, as Postfix's queue manager never times out its wait for
    a delivery agent), then cancelling the delivery's Deferred (L{watch}) when it is over.

    @ivar expired: the timeout was over before the delivery answered.
    """

    def __init__(
        self, clock: IReactorTime, timeout: float, measure: Callable[[], float] = time.perf_counter
    ) -> None:
        self._clock = clock
        self._timeout = timeout
        self._measure = measure
        self._call: Any = None
        self._watched: Deferred[Any] | None = None
        self._over = False
        self.expired = False
        #: When the delivery had its place (C{measure}'s time), or C{None}: not yet.
        self.placedAt: float | None = None

    def watch(self, d: Deferred[Any]) -> None:
        """Cancel C{d} when the timeout is over."""
        self._watched = d

    def start(self) -> None:
        """The delivery has its place: its timeout runs from now (once: later calls, as
        each run of a pipe delivery's makes, change nothing)."""
        if self.placedAt is None and not self._over:
            self.placedAt = self._measure()
        if self._timeout > 0 and self._call is None and not self._over:
            self._call = self._clock.callLater(self._timeout, self._expire)

    def _expire(self) -> None:
        self.expired = True
        if self._watched is not None:
            self._watched.cancel()

    def stop(self) -> None:
        """The delivery has ended: the timeout no longer runs, nor starts."""
        self._over = True
        if self._call is not None and self._call.active():
            self._call.cancel()


class Calls:
    """The router and backend calls in flight, each bounded by a timeout, and all cut short
    at once when the stop's drain time is over (L{interrupt}).

    @ivar interrupted: L{interrupt} was called (until L{reset}).
    """

    def __init__(self, clock: IReactorTime) -> None:
        #: What times the calls (the reactor).
        self.clock = clock
        self._calls: set[Deferred[Any]] = set()
        self.interrupted = False

    def __len__(self) -> int:
        return len(self._calls)

    def bound(self, d: Deferred[Any], timeout: float, onTimeoutCancel: Any = None) -> Deferred[Any]:
        """A Deferred of C{d}'s result that fails after C{timeout} seconds (0: none) with
        C{TimeoutError} (or what C{onTimeoutCancel} raises), or with C{CancelledError} when
        L{interrupt} is called, whether or not C{d} honours its cancellation (C{d} is
        cancelled, and a late result of it ignored)."""

        def cancel(_: Deferred[Any]) -> None:
            d.cancel()

        outer: Deferred[Any] = Deferred(cancel)

        def relay(result: Any) -> None:
            self._calls.discard(outer)
            if not outer.called:
                if isinstance(result, Failure):
                    outer.errback(result)
                else:
                    outer.callback(result)

        # (d.called says nothing: a Deferred waiting for another one is "called".)
        d.addBoth(relay)
        if not outer.called:
            self._calls.add(outer)
            if timeout > 0:
                outer.addTimeout(timeout, self.clock, onTimeoutCancel=onTimeoutCancel)
        return outer

    def interrupt(self) -> None:
        """Cut every call in flight short (they fail with C{CancelledError})."""
        self.interrupted = True
        for call in list(self._calls):
            call.cancel()

    def reset(self) -> None:
        """A new start: calls are no longer cut short."""
        self.interrupted = False


class DeliveryPlaces:
    """The places of the deliveries in flight at once, over every destination and backend
    (C{[queue] delivery_limit}): Postfix's C{default_process_limit}, at most that many
    delivery agents, each with one connection or command.  A delivery over the limit waits,
    first come first served, for one to end; it is not deferred.

    The smtp, lmtp and pipe backends take their place themselves (L{Deliverer}), once their
    next hop (or command) has a place of its own free, so that deliveries waiting for a busy
    destination do not hold places that deliveries to other destinations could use (as
    Postfix's queue manager hands a delivery agent only to a destination below its
    concurrency limit).  A delivery's timeout runs from when it has its place, never while
    it waits for one (nor for its next hop's).

    @ivar limit: the most deliveries in flight at once.
    """

    def __init__(self, limit: int) -> None:
        """@raise ValueError: C{limit} is below 1."""
        if limit < 1:
            raise ValueError(f"the delivery limit must be at least 1, not {limit!r}")
        self.limit = limit
        self._semaphore = flatSemaphore(limit)
        #: L{interrupt} was called (the stop; until L{reset}): no delivery starts.
        self.interrupted = False

    @property
    def running(self) -> int:
        """Deliveries holding a place."""
        return self.limit - self._semaphore.tokens

    @property
    def waiting(self) -> int:
        """Deliveries waiting for a place."""
        return len(self._semaphore.waiting)

    def interrupt(self) -> None:
        """The queue manager is stopping: the deliveries waiting for a place, and those
        asking for one from now on, fail with L{DeliveryNotStarted} (none starts during the
        stop's drain, nor when those running are cut short at its end, giving their places
        back)."""
        self.interrupted = True
        for waiting in list(self._semaphore.waiting):
            waiting.cancel()

    def reset(self) -> None:
        """A new start: deliveries start again."""
        self.interrupted = False

    def run(self, f: Callable[..., Any], *args: Any) -> Deferred[Any]:
        """C{f(*args)}'s result once a place is free; the place is given back when that
        result comes, or when the Deferred is cancelled (the delivery abandoned: its time-out
        or the stop; C{f}'s Deferred is cancelled too, and a late result of it ignored).
        Cancelled while waiting, or L{interrupted}, it fails with L{DeliveryNotStarted}
        (C{f} is never called)."""
        if self.interrupted:
            return fail(DeliveryNotStarted())
        acquired = self._semaphore.acquire()
        running: list[Deferred[Any]] = []
        held = [False]

        def cancel(_: Deferred[Any]) -> None:
            (running[0] if running else acquired).cancel()

        outer: Deferred[Any] = Deferred(cancel)

        def giveBack(result: Any) -> Any:
            if held[0]:
                held[0] = False
                self._semaphore.release()
            return result

        def relay(result: Any) -> None:
            if not outer.called:
                if isinstance(result, Failure):
                    outer.errback(result)
                else:
                    outer.callback(result)

        def start(_: Any) -> None:
            held[0] = True
            running.append(maybeDeferred(f, *args))
            running[0].addBoth(relay)

        def notStarted(failure: Failure) -> None:
            failure.trap(CancelledError)
            relay(Failure(DeliveryNotStarted()))

        acquired.addCallbacks(start, notStarted)
        outer.addBoth(giveBack)
        return outer


class Deliverer:
    """Makes the delivery attempts of the queue manager.

    @ivar calls: the L{Calls} in flight.
    @ivar places: the L{DeliveryPlaces} every backend's deliveries share.
    """

    def __init__(
        self,
        spool: ISpool,
        router: Any,
        backends: Mapping[str, IDeliveryBackend],
        calls: Calls,
        *,
        deliveryTimeout: float,
        timeouts: Mapping[str, float] | None = None,
        deliveryLimit: int = 100,
    ) -> None:
        """
        @param router: an L{IRouter}.
        @param backends: the delivery backends by name (L{Route.backend}).  Those with a
            C{useDeliveryPlaces} method (the smtp, lmtp and pipe backends) are given the
            L{places} to take one from for each connection or command, once their next hop
            has a place free (see L{DeliveryPlaces}); for the others, each delivery takes
            its place here before the backend is called.
        @param deliveryTimeout: seconds a routing decision, or a delivery by a backend not in
            C{timeouts}, may take (0: no limit).  A delivery's time runs from when it has its
            place: its wait for one (or for its next hop's) is not counted.
        @param timeouts: seconds one delivery by the named backend may take.
        @param deliveryLimit: the most deliveries in flight at once (L{DeliveryPlaces}).
        @raise ValueError: a timeout that is not a number greater than zero, a delivery limit
            below 1.
        """
        self.spool = spool
        self.router = router
        self.backends = dict(backends)
        self.calls = calls
        #: The monotonic clock the deliveries' times are read on (the metrics).
        self.measure: Callable[[], float] = time.perf_counter
        self.places = DeliveryPlaces(deliveryLimit)
        #: The backends that take their places themselves.
        self._placing: set[str] = set()
        for name, backend in self.backends.items():
            use = getattr(backend, "useDeliveryPlaces", None)
            if callable(use):
                use(self.places)
                self._placing.add(name)
        self.deliveryTimeout = deliveryTimeout
        self.timeouts = dict(timeouts or {})
        for name, timeout in self.timeouts.items():
            if isinstance(timeout, bool) or not isinstance(timeout, (int, float)) or timeout <= 0:
                raise ValueError(f"the timeout of backend {name!r} must be > 0, not {timeout!r}")

    def _observe(self, backend: str, started: float, placed: float | None) -> None:
        """Count a delivery by C{backend} asked for at C{started} that had its place at
        C{placed} (C{None}: it answered without one) and has just answered: its wait for
        the place and, when it had one, its own time from then (which alone its timeout
        limits)."""
        ended = self.measure()
        child(DELIVERY_WAIT_SECONDS, backend).observe((ended if placed is None else placed)
                                                      - started)
        if placed is not None:
            child(DELIVERY_SECONDS, backend).observe(ended - placed)

    def timeoutFor(self, backend: str) -> float:
        """Seconds one delivery by C{backend} may take (0: no limit)."""
        return self.timeouts.get(backend, self.deliveryTimeout)

    def resumeSuspended(self, route: Route | None = None) -> None:
        """Have every backend that suspends next hops after failures to reach them (those
        with a C{resumeSuspended} method: the smtp and lmtp backends) try them again; with
        C{route}, only its backend its next hop."""
        for name, backend in self.backends.items():
            resume = getattr(backend, "resumeSuspended", None)
            if not callable(resume):
                continue
            if route is None:
                resume()
            elif name == route.backend:
                resume(route.nexthop)

    async def deliver(
        self,
        queueID: str,
        envelope: Envelope,
        pending: list[Recipient],
        ended: Callable[[list[Outcome]], None] | None = None,
        flushed: bool = False,
    ) -> list[Outcome]:
        """Route every pending recipient, deliver every group (at most
        L{RECIPIENTS_PER_DELIVERY} recipients of one route) at once; one outcome per
        recipient, in envelope order.

        @param flushed: the operator flushed the message: its next hops suspended after
            failures to reach them are tried again (L{resumeSuspended}), as Postfix's qmgr
            unthrottles the queues of a flushed message's recipients.

        @param ended: called with the outcomes of each delivery that ends while others
            still run (never with those of the last one to end, nor of a single one), and
            with those a backend reports while its delivery goes on (the SMTP backend's
            recipients an MX host took before the others go on to the next host: see
            L{ClientBackend.deliver <mailrelay.delivery.common.ClientBackend.deliver>}).
        """
        routed = [Deferred.fromCoroutine(self._route(queueID, envelope, r)) for r in pending]
        outcomes: dict[int, Outcome] = {}
        groups: dict[Any, tuple[Route, list[Recipient]]] = {}
        for r, d in zip(pending, routed, strict=True):
            route = await d
            if isinstance(route, RecipientResult):
                outcomes[id(r)] = Outcome(r, route, "none")
            else:
                groups.setdefault(_groupKey(route), (route, []))[1].append(r)
        if flushed:
            for route in {(g.backend, g.nexthop): g for g, _ in groups.values()}.values():
                self.resumeSuspended(route)
        size = RECIPIENTS_PER_DELIVERY
        deliveries = [
            Deferred.fromCoroutine(
                self._deliverGroup(
                    queueID, envelope, route, rcpts[start : start + size], ended
                )
            )
            for route, rcpts in groups.values()
            for start in range(0, len(rcpts), size)
        ]
        if ended is not None and len(deliveries) > 1:
            running = {id(d) for d in deliveries if not d.called}

            def groupEnded(groupOutcomes: list[Outcome], delivery: int) -> list[Outcome]:
                running.discard(delivery)
                if running:
                    ended(groupOutcomes)
                return groupOutcomes

            for d in deliveries:
                d.addCallback(groupEnded, id(d))
        for d in deliveries:
            for outcome in await d:
                outcomes[id(outcome.recipient)] = outcome
        return [outcomes[id(r)] for r in pending]

    async def _route(self, queueID: str, envelope: Envelope, recipient: Recipient) -> Any:
        """The recipient's L{Route}, or a transient L{RecipientResult} when routing failed."""
        try:
            route = await self.calls.bound(
                maybeDeferred(self.router.route, envelope, recipient), self.deliveryTimeout
            )
        except Exception as e:
            if not (isinstance(e, DeliveryFailure) and e.diagnostic):
                # (A router's failure or verdict, whose result carries its status and text,
                # was logged where it arose -- the chain names the router -- and the status
                # line says what became of the recipient: one line per fact, as Postfix.)
                log.warn(
                    "{queueID}: routing <{rcpt}> failed: {error}",
                    queueID=queueID,
                    rcpt=recipient.address,
                    error=repr(e),
                )
            if isinstance(e, PermanentFailure) and e.diagnostic:
                # A router's permanent verdict: no route will ever exist for this recipient;
                # bounce it rather than retry for days.
                return RecipientResult(
                    recipient.address, DeliveryStatus.PERMANENT, e.code, _oneLine(e.diagnostic)
                )
            if isinstance(e, TransientFailure) and e.diagnostic:
                return _transient(recipient, e.code, e.diagnostic)
            return _transient(recipient, "4.3.0", f"X-mailrelay; routing failed: {e}")
        if not isinstance(route, Route):
            log.error(
                "{queueID}: the router returned {route!r} for <{rcpt}>, not a Route",
                queueID=queueID,
                route=route,
                rcpt=recipient.address,
            )
            return _transient(recipient, "4.3.0", "X-mailrelay; routing failed: no route")
        return route

    async def _deliverGroup(
        self,
        queueID: str,
        envelope: Envelope,
        route: Route,
        recipients: list[Recipient],
        ended: Callable[[list[Outcome]], None] | None = None,
    ) -> list[Outcome]:
        """The outcomes of delivering C{recipients} along C{route}: the backend's results,
        or every recipient deferred when it fails, times out or is cut short -- but for
        those it reported final while it went on (C{done}, handed to C{ended} too), which
        keep what it reported."""
        backend = self.backends.get(route.backend)
        refused = route.options.refusedBy(route.backend)
        if backend is None or refused is not None:
            if backend is None:
                why = f"unknown delivery backend {route.backend!r}"
                known = "; known: " + (", ".join(sorted(self.backends)) or "none")
            else:
                # A router's route (the table refuses such a rule): deferred, never
                # delivered without the options it asked for.
                why = f"unusable options for the route to {route.nexthop}: {refused}"
                known = ""
            log.error(
                "{queueID}: {why} for {count} recipient(s){known}; deferring",
                queueID=queueID,
                why=why,
                backend=route.backend,
                count=len(recipients),
                known=known,
            )
            diagnostic = f"X-mailrelay; {why}"
            return [
                Outcome(r, _transient(r, "4.3.5", diagnostic), _logRelay(route), route.backend)
                for r in recipients
            ]
        timeout = self.timeoutFor(route.backend)
        timer = _DeliveryTimer(self.calls.clock, timeout, self.measure)
        started = self.measure()
        reported: dict[int, Outcome] = {}
        over = [False]

        def done(results: list[RecipientResult]) -> None:
            if over[0]:
                return  # (a backend going on after its delivery was abandoned: too late)
            outcomes = []
            for result in results:
                r = next((r for r in recipients if r.address == result.address
                          and id(r) not in reported), None)
                if r is not None and result.status is not DeliveryStatus.TRANSIENT:
                    reported[id(r)] = Outcome(r, result, _logRelay(route, result), route.backend)
                    outcomes.append(reported[id(r)])
            if outcomes and ended is not None:
                ended(outcomes)

        def call() -> Any:
            called = time.perf_counter()
            # (Built-in keywords, not IDeliveryBackend's: done, for the results reported
            # while the delivery goes on; started, called once it has its place.)
            options: dict[str, Any] = {}
            if getattr(backend, "reportsEarly", False):
                options["done"] = done
            if route.backend in self._placing and getattr(backend, "reportsStart", False):
                options["started"] = timer.start
            else:
                timer.start()  # (placed here, or by a backend that cannot say when)
            deliver: Any = backend.deliver
            answer = deliver(envelope, list(recipients), route, path, **options)
            noteBlocking("backend", route.backend, called)
            return answer

        try:
            path = self.spool.messagePath(queueID)
            if route.backend in self._placing:
                answer = maybeDeferred(call)
            else:
                answer = self.places.run(call)
            bounded = self.calls.bound(answer, 0)
            timer.watch(bounded)
            try:
                results = await bounded
            except Exception as e:
                # (Cut short at its timeout, the backend's error or the cancellation; a
                # backend answering its cancellation with results keeps them -- the pipe
                # backend, its command having exited: taken for a timeout, that delivery
                # would be made again at the next attempt.)
                if not timer.expired:
                    raise
                raise DeliveryTimedOut(timeout) from e
        except Exception as e:
            failed = self._failedGroup(queueID, route, recipients, timeout, e)
            return [reported.get(id(o.recipient), o) for o in failed]
        finally:
            timer.stop()
            over[0] = True
            self._observe(route.backend, started, timer.placedAt)
        problem = self._checkResults(results, recipients)
        if problem is not None:
            unusable = _deferGroup(
                recipients,
                route,
                "4.3.0",
                f"X-mailrelay; delivery via {route.backend}:{route.nexthop} gave no usable "
                f"result ({problem})",
                "{queueID}: delivery backend {backend!r} answered badly ({problem}); "
                "counting {count} recipient(s) as not delivered",
                queueID=queueID,
                backend=route.backend,
                problem=problem,
                count=len(recipients),
            )
            return [reported.get(id(o.recipient), o) for o in unusable]
        # (Some recipients of a delivery begun may not have started when the stop came:
        # a pipe backend's runs, one each; due again at the next start, as a whole group.)
        return [
            Outcome(r, result, _logRelay(route, result), route.backend,
                    stoppedBeforeStart(result))
            for r, result in zip(recipients, results, strict=True)
        ]

    def _failedGroup(
        self,
        queueID: str,
        route: Route,
        recipients: list[Recipient],
        timeout: float,
        error: Exception,
    ) -> list[Outcome]:
        """A group whose delivery timed out, was cut short by the stop, or failed: every
        recipient is deferred, with a diagnostic saying which."""
        relay = f"{route.backend}:{route.nexthop}"
        if isinstance(error, DeliveryTimedOut):
            # It was abandoned, not refused: what it did meanwhile is unknown (as Postfix's
            # "-- message may be sent more than once" when the end of data is not answered).
            return _deferGroup(
                recipients,
                route,
                "4.4.2",
                f"X-mailrelay; delivery via {relay} timed out after {timeout:g}s (the next hop "
                "may have received the message: it may be sent more than once)",
                "{queueID}: delivery backend {backend!r} did not answer within its timeout of "
                "{timeout:g}s; {count} recipient(s) deferred",
                queueID=queueID,
                backend=route.backend,
                timeout=timeout,
                count=len(recipients),
            )
        stopping = self.calls.interrupted or self.places.interrupted
        if stopping and isinstance(error, DeliveryNotStarted):
            return _deferGroup(
                recipients,
                route,
                "4.3.0",
                notStartedDiagnostic(relay),
                "{queueID}: delivery via {relay} not started (it waited for a free place): "
                "the relay is stopping",
                stopped=True,
                queueID=queueID,
                relay=relay,
            )
        if self.calls.interrupted:
            return _deferGroup(
                recipients,
                route,
                "4.3.0",
                f"X-mailrelay; delivery via {relay} interrupted: the relay was stopping (the "
                "next hop may have received the message)",
                "{queueID}: delivery via {relay} interrupted: the relay is stopping",
                stopped=True,
                queueID=queueID,
                relay=relay,
            )
        return _deferGroup(
            recipients,
            route,
            "4.3.0",
            f"X-mailrelay; delivery via {relay} failed: {error!r}",
            "{queueID}: delivery via {relay} failed: {error}",
            queueID=queueID,
            relay=relay,
            error=repr(error),
        )

    @staticmethod
    def _checkResults(answer: Any, recipients: Sequence[Recipient]) -> str | None:
        """Why the backend's C{answer} is not one L{RecipientResult} per recipient in order,
        or C{None}."""
        try:
            if isinstance(answer, (str, bytes, bytearray, dict)):
                raise TypeError("iterable, but its letters or keys are no results")
            results = list(answer)
        except TypeError:
            shown = repr(answer)
            shown = shown if len(shown) <= 60 else shown[:57] + "..."
            return f"{shown}, not a list of RecipientResult"
        if len(results) != len(recipients):
            return f"{len(results)} results for {len(recipients)} recipients"
        for r, result in zip(recipients, results, strict=True):
            if not isinstance(result, RecipientResult):
                return f"not a RecipientResult: {result!r}"
            if result.address != r.address:
                return f"result for <{result.address}> where <{r.address}> was expected"
        return None


def _deferGroup(
    recipients: list[Recipient],
    route: Route,
    code: str,
    diagnostic: str,
    logFormat: str,
    /,
    stopped: bool = False,
    **logFields: Any,
) -> list[Outcome]:
    """Log C{logFormat} as an error and count every recipient of a group delivered along
    C{route} as deferred with C{code} and C{diagnostic} (C{stopped}: by the relay's stop,
    L{Outcome.stopped})."""
    log.error(logFormat, **logFields)
    return [
        Outcome(r, _transient(r, code, diagnostic), _logRelay(route), route.backend, stopped)
        for r in recipients
    ]


def _logRelay(route: Route, result: RecipientResult | None = None) -> str:
    """What the log's C{relay=} says of a delivery along C{route}: the server that answered
    (C{host[address]:port}, C{result.relay}); else, as Postfix's, C{none} for SMTP and LMTP
    (no server answered: the host tried is in the diagnostic), and for the others
    (maildir, discard, a pipe or site backend) their Remote-MTA, or the backend's name
    (Postfix's C{local}, C{virtual}, a pipe transport's name)."""
    if result is not None and result.relay:
        return result.relay
    if route.backend in ("smtp", "lmtp"):
        return "none"
    if result is not None and result.remoteMTA:
        return result.remoteMTA.partition(";")[2].strip() or route.backend
    return route.backend
