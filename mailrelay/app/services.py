"""Services the relay and the delivery process share: a stop in order, the spool's and the
delivery backends' lifetimes."""

from __future__ import annotations

import signal
from collections.abc import Sequence
from typing import Any

from twisted.application.service import MultiService, Service
from twisted.internet.defer import Deferred, DeferredList, maybeDeferred, succeed
from twisted.internet.error import ReactorNotRunning
from twisted.internet.task import LoopingCall
from twisted.logger import Logger
from twisted.python.failure import Failure

from mailrelay.spool import Spool, SpoolError

log = Logger()


def stopReactor(reactor: Any) -> None:
    """C{reactor.stop()}, unless it is stopping already (a signal or the control socket
    got there first)."""
    try:
        reactor.stop()
    except ReactorNotRunning:
        pass


def catchStopSignals() -> list[int]:
    """Keep SIGTERM and SIGINT from ending the process (or raising C{KeyboardInterrupt})
    until L{stopOnSignals} is called, and SIGHUP (whose default action ends it too) until
    the reload handler is installed (L{mailrelay.app.tap.installReloadSignal}), first
    thing as the relay is built (before the reactor exists: see
    L{mailrelay.app.forkserver}): the list the numbers of those received meanwhile go in,
    for those two."""
    received: list[int] = []

    def keep(number: int, frame: Any = None) -> None:
        received.append(number)

    for number in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
        signal.signal(number, keep)
    return received


def stopOnSignals(reactor: Any, received: Sequence[int] = ()) -> None:
    """Make SIGTERM and SIGINT stop C{reactor} once, from now on: not only once the reactor
    runs, which installs Twisted's handlers (they call these) -- twistd builds and starts
    the relay before (its control socket, its children), and a SIGTERM meanwhile took its
    default action, killing it on the spot.  One that comes before the reactor runs stops
    it as soon as it does; so do those in C{received} (L{catchStopSignals}).

    Twisted's own handlers stop it again at a second signal -- systemd's stop and a kill, a
    whole process group signalled, a stop asked twice while a delivery drains -- and log the
    C{ReactorNotRunning} they get as critical, with a traceback.  The second is logged as
    what it is; as Twisted's, the handler records the signal for twistd's exit status."""

    def handler(name: str) -> Any:
        def handle(number: int, frame: Any = None) -> None:
            reactor._exitSignal = number  # (what Twisted's handler records)
            if stopping:
                log.info("Received {signal} again while stopping; already stopping",
                         signal=name)
                return
            stopping.append(name)
            log.info("Received {signal}, shutting down.", signal=name)
            reactor.callFromThread(stopReactor, reactor)

        return handle

    stopping: list[str] = []
    reactor.sigTerm = handler("SIGTERM")
    reactor.sigInt = handler("SIGINT")
    handlers: dict[int, Any] = {signal.SIGTERM: reactor.sigTerm, signal.SIGINT: reactor.sigInt}
    for sig, handle in handlers.items():
        signal.signal(sig, handle)
    for number in list(received):
        if number in handlers:  # (a SIGHUP is the reload handler's)
            handlers[number](number)


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
            d.addCallback(_stopChild, child)
            d.addErrback(_stopFailed, child)
        return d.addCallback(lambda _: None)


def _stopChild(_: object, child: Any) -> Deferred[Any]:
    return maybeDeferred(child.stopService)


def _stopFailed(failure: Failure, child: Any) -> None:
    log.failure("stopping {service} failed", failure, service=child.name or repr(child))


#: Seconds between two sweeps of the spool's C{tmp/} (L{SpoolService}).
SWEEP_INTERVAL = 3600.0
#: Seconds a file of C{tmp/} has not been written to before a sweep removes it.
STALE_TEMPORARY = 86400.0


class SpoolService(Service):
    """Starts the spool (crash recovery, thread pool) before the listeners, stops it after.

    With an C{owner} (twistd's C{--uid}/C{--gid}), the spool is given to that user while the
    relay is still root (L{Spool.prepareFor}), and started after twistd has dropped
    privileges, as that user, so that nothing in it belongs to root.

    With C{sweep} (the relay's own spool, which it recovers), the files that processes
    which ended left in C{tmp/} are removed every L{SWEEP_INTERVAL} seconds, once nobody has
    written to them for L{STALE_TEMPORARY} seconds, in the spool's thread
    (L{Spool.sweepInThread}).

    @ivar owner: C{(uid, gid)} of the user the relay runs as, or C{None}.
    """

    name = "spool"  # type: ignore[assignment]  # (Service declares None)

    def __init__(
        self,
        spool: Spool,
        owner: tuple[int, int] | None = None,
        sweep: Any = None,
    ) -> None:
        """
        @param sweep: the clock of the sweeps of C{tmp/} (the reactor), or C{None}: none.
        """
        self.spool = spool
        self.owner = owner
        self._sweeps = None if sweep is None else LoopingCall(self._sweep)
        if self._sweeps is not None:
            self._sweeps.clock = sweep

    def _sweep(self) -> Deferred[Any] | None:
        """Sweep C{tmp/} in the spool's thread; the next sweep is timed from the end of this
        one.  A failure is logged, and the hourly sweeps go on."""
        if not self.spool.running:
            return None
        d = self.spool.sweepInThread(STALE_TEMPORARY)
        d.addErrback(lambda f: log.failure("spool: the sweep of tmp/ failed", f))
        return d

    def privilegedStartService(self) -> None:
        if self.owner is None:
            self._start()
        else:
            try:
                self.spool.prepareFor(*self.owner)
            except SpoolError as e:
                raise SystemExit(f"mailrelay: error: {e}") from e
        super().privilegedStartService()

    def startService(self) -> None:
        if self.owner is not None:
            self._start()
        super().startService()
        if self._sweeps is not None:
            self._sweeps.start(SWEEP_INTERVAL, now=False)

    def _start(self) -> None:
        try:
            ids = self.spool.start()
        except SpoolError as e:
            raise SystemExit(f"mailrelay: error: {e}") from e
        log.info(
            "spool {path}: {count} queued entries", path=str(self.spool.directory), count=len(ids)
        )

    def stopService(self) -> Any:
        super().stopService()
        if self._sweeps is not None and self._sweeps.running:
            self._sweeps.stop()
        self.spool.stop()


class BackendsService(Service):
    """Closes the delivery backends (quits cached connections) after the queue has stopped."""

    name = "backends"  # type: ignore[assignment]  # (Service declares None)

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


class PluginServices(Service):
    """The plugin objects that are Twisted services (C{IService}), started with the relay and
    stopped in the reverse order once the sessions (and, inline, the deliveries) are over: it
    is added before them.

    A reload starts the new configuration's services (L{startNew}) before it changes
    anything else, and is refused if one fails to start; then L{swap} runs them, and the old
    ones (but those the new configuration still uses: a plugin keeping its object with
    L{PluginContext.keep <mailrelay.interfaces.PluginContext.keep>}) are stopped when the
    sessions begun before the reload have ended, or after the drain time.
    """

    name = "plugins"  # type: ignore[assignment]  # (Service declares None)

    def __init__(self, services: Sequence[tuple[str, Any]] = ()) -> None:
        self.current = list(services)
        self._retiring: list[Deferred[None]] = []

    def privilegedStartService(self) -> None:
        super().privilegedStartService()
        _startAll(self.current, "privilegedStartService")

    def startService(self) -> None:
        super().startService()
        _startAll(self.current, "startService")

    def startNew(self, services: Sequence[tuple[str, Any]]) -> None:
        """Start those of C{services} that do not run yet, in order: a reload's, before
        anything is swapped (L{swap} then runs them).

        @raise PluginStartError: one failed to start; those started here are stopped again
            (it too), and the services that ran go on alone.
        """
        started: list[tuple[str, Any]] = []
        for name, service in services:
            if service.running:
                continue
            started.append((name, service))
            try:
                _callService(name, service, "privilegedStartService")
                _callService(name, service, "startService")
            except PluginStartError:
                _stopInOrder(started)
                raise

    def swap(
        self,
        services: Sequence[tuple[str, Any]],
        when: Deferred[None],
        clock: Any,
        drainTime: float,
    ) -> None:
        """Run C{services} (started: L{startNew}) from now on; stop the old ones not among
        them after C{when} (the old sessions' end) or C{drainTime} seconds."""
        old, self.current = self.current, list(services)
        kept = {id(service) for _, service in self.current}
        retired = [(n, s) for n, s in old if id(s) not in kept]
        if not retired:
            return
        stopping: Deferred[None] = Deferred()
        self._retiring.append(stopping)

        def stop(_: object = None) -> None:
            if timer.active():
                timer.cancel()
            if stopping in self._retiring:
                self._retiring.remove(stopping)
                _stopInOrder(retired).chainDeferred(stopping)

        timer = clock.callLater(drainTime, stop)
        when.addBoth(stop)

    def stopService(self) -> Deferred[None]:
        super().stopService()
        waiting = [*self._retiring, _stopInOrder(self.current)]
        return DeferredList(waiting, consumeErrors=True).addCallback(lambda _: None)


class PluginStartError(Exception):
    """A plugin service failed to start; the message names the plugin and says why."""


def _startAll(services: Sequence[tuple[str, Any]], method: str) -> None:
    """C{service.method()} of each of C{services}, in order; a plugin's failure to start
    stops the relay's start-up with one line naming it."""
    try:
        for name, service in services:
            _callService(name, service, method)
    except PluginStartError as e:
        raise SystemExit(f"mailrelay: error: {e}") from e


def _callService(name: str, service: Any, method: str) -> None:
    """C{service.method()}.  @raise PluginStartError: it failed (logged, with its
    traceback)."""
    try:
        getattr(service, method)()
    except Exception as e:
        log.failure("plugin {plugin}: {method} failed", plugin=name, method=method)
        raise PluginStartError(f"plugin {name!r} failed to start: {e!r}") from e


def _stopInOrder(services: Sequence[tuple[str, Any]]) -> Deferred[None]:
    """Stop C{services} in the reverse order, each once the one before has stopped; a
    failure is logged, and the next one stopped all the same."""
    d: Deferred[Any] = succeed(None)
    for name, service in reversed(services):
        d.addCallback(_stopPlugin, name, service)
    return d


def _stopPlugin(_: object, name: str, service: Any) -> Deferred[None]:
    if not service.running:
        return succeed(None)
    d: Deferred[Any] = maybeDeferred(service.stopService)

    def failed(failure: Failure) -> None:
        log.failure("plugin {plugin}: stopping failed", failure, plugin=name)

    return d.addCallbacks(lambda _: None, failed)
