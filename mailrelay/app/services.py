"""Services the relay and the delivery process share: a stop in order, the spool's and the
delivery backends' lifetimes."""

from __future__ import annotations

from typing import Any

from twisted.application.service import MultiService, Service
from twisted.internet.defer import Deferred, maybeDeferred, succeed
from twisted.logger import Logger
from twisted.python.failure import Failure

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
            d.addCallback(_stopChild, child)
            d.addErrback(_stopFailed, child)
        return d.addCallback(lambda _: None)


def _stopChild(_: object, child: Any) -> Deferred[Any]:
    return maybeDeferred(child.stopService)


def _stopFailed(failure: Failure, child: Any) -> None:
    log.failure("stopping {service} failed", failure, service=child.name or repr(child))


class SpoolService(Service):
    """Starts the spool (crash recovery, thread pool) before the listeners, stops it after.

    With an C{owner} (twistd's C{--uid}/C{--gid}), the spool is given to that user while the
    relay is still root (L{Spool.prepareFor}), and started after twistd has dropped
    privileges, as that user, so that nothing in it belongs to root.

    @ivar owner: C{(uid, gid)} of the user the relay runs as, or C{None}.
    """

    name = "spool"  # type: ignore[assignment]  # (Service declares None)

    def __init__(self, spool: Spool, owner: tuple[int, int] | None = None) -> None:
        self.spool = spool
        self.owner = owner

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
