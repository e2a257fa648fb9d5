"""The delivery side of a L{Config}: the spool, and the queue manager with its backends and
the intake its notifications enter the spool through (in the relay's process, or in the
delivery process)."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from twisted.application.service import Service
from twisted.internet.defer import Deferred, DeferredList

from mailrelay.app.backends import makeBackends, makeRouter
from mailrelay.app.clocksteps import clockStepsOf
from mailrelay.app.services import BackendsService, OrderedMultiService, SpoolService
from mailrelay.config import Config
from mailrelay.config.plugins import HookPlugins
from mailrelay.errors import ConfigError
from mailrelay.interfaces import IIntake, ISpool
from mailrelay.spool import REMOVAL_SYNC_DELAY, Spool


def makeSpool(
    config: Config,
    reactor: Any,
    parent: Any,
    recover: bool = True,
    owner: tuple[int, int] | None = None,
) -> Spool:
    """The spool of C{config}, started (and stopped) by a L{SpoolService} under C{parent};
    with C{owner}, given to that user and started as that user (L{SpoolService})."""
    spool = Spool(
        config.spoolDirectory,
        reactor=reactor,
        minFreeSpace=config.minFreeSpace,
        syncMethod=config.spoolSync,
        recover=recover,
        removalSyncDelay=REMOVAL_SYNC_DELAY,
    )
    SpoolService(spool, owner, sweep=reactor if recover else None).setServiceParent(parent)
    return spool


def makeDelivery(
    config: Config, reactor: Any, spool: ISpool, build: Any, hooks: HookPlugins | None = None
) -> tuple[list[Any], Any]:
    """The delivery side over C{spool}: the backends' service and the queue manager (to be
    started in that order), and the queue manager.

    The queue manager's notifications enter C{spool} through an intake of their own, with
    the configured header stampers and message filters (so site plugins see them too), which
    tells the queue manager (and the queue observers) of each one committed.

    @param hooks: the plugins of the delivery side's hooks (message filters, queue and
        delivery observers), built (L{mailrelay.config.plugins.buildHooks}).
    @raise ConfigError: a route, a backend plugin or a header stamper plugin is refused.
    """
    from mailrelay.app.listeners import makeIntake as makeListenerIntake
    from mailrelay.queue import QueueManager
    from mailrelay.queue.lock import QueueLock
    from mailrelay.route.table import RoutingTable

    try:
        router = RoutingTable.fromConfig(config)
    except ValueError as e:
        raise ConfigError(str(e), file=config.source or "(embedded default)", key="routes") from e
    backends = makeBackends(config, reactor, build)
    router = makeRouter(config, reactor, build, router)
    hooks = hooks or HookPlugins()
    intake = makeListenerIntake(config, reactor, build, spool, None, hooks)

    def makeIntake(enqueue: Callable[[str], None]) -> IIntake:
        intake.notify = enqueue
        return intake

    queue = QueueManager(
        spool,
        router,
        backends,
        reactor,
        hostname=config.hostname,
        makeIntake=makeIntake,
        policy=config.queue,
        # A site backend's [[backends]] timeout; the built-in ones keep the policy's bound.
        timeouts={spec.name: spec.timeout for spec in config.backends},
        lock=QueueLock(config.spoolDirectory, reactor),
        observers=hooks.observers(reactor),
    )
    clockStepsOf(reactor).observe(queue)
    return [BackendsService(backends), queue], queue


class InlineDelivery(Service):
    """The queue manager and the backends in the relay's own process (C{[queue] process =
    "inline"}), replaceable by a reload; with C{hold}, nothing is delivered."""

    def __init__(self, services: list[Any], queue: Any, hold: bool) -> None:
        self.setName("delivery")
        self._current = self._group(services)
        self.queue = queue
        self.hold = hold
        self._retiring: list[Deferred[None]] = []

    @staticmethod
    def _group(services: list[Any]) -> OrderedMultiService:
        group = OrderedMultiService()
        for service in services:
            service.setServiceParent(group)
        return group

    def startService(self) -> None:
        super().startService()
        if not self.hold:
            self._current.startService()

    def enqueue(self, queueID: str) -> None:
        if not self.hold:
            self.queue.enqueue(queueID)

    def rescan(self) -> None:
        """Schedule the spool's entries nobody told the queue manager of."""
        if not self.hold:
            self.queue.rescan()

    def state(self) -> str:
        """C{"up"} (the queue manager runs), C{"held"} (C{[queue] hold}) or C{"down"}."""
        if self.hold:
            return "held"
        return "up" if self.running and self.queue.running else "down"

    def reload(self, services: list[Any], queue: Any, hold: bool) -> None:
        """Deliver with C{services} from now on: the new queue manager starts at once and
        begins delivering when the old one, stopping meanwhile, has recorded its deliveries
        and released the queue lock."""
        old = self._current
        self._current, self.queue, self.hold = self._group(services), queue, hold
        if self.running and not hold:
            self._current.startService()
        if old.running:
            d = old.stopService()
            self._retiring.append(d)
            d.addBoth(lambda _: self._retiring.remove(d))

    def stopService(self) -> Deferred[None]:
        super().stopService()
        stopping = list(self._retiring)
        if self._current.running:
            stopping.append(self._current.stopService())
        return DeferredList(stopping, consumeErrors=True).addCallback(lambda _: None)
