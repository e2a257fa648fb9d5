"""The queue's observers: plugins told when a message is queued (L{IQueueObserver}) and what
each delivery attempt made of each recipient (L{IDeliveryObserver}).

They never delay mail: L{Observers} calls them after the fact (the commit, the attempt's
record), ignores what they answer, and only watches a Deferred they return to log its failure
or its not answering within the plugin's timeout (it is then cancelled).  With no observers,
telling them costs nothing.
"""

from __future__ import annotations

from collections.abc import Sequence
from time import perf_counter
from typing import Any

from twisted.internet.defer import Deferred, TimeoutError
from twisted.internet.interfaces import IReactorTime
from twisted.logger import Logger
from twisted.python.failure import Failure

from mailrelay.envelope import Envelope
from mailrelay.interfaces import ConfiguredPlugin, DeliveryEvent
from mailrelay.metrics import noteBlocking

log = Logger(namespace="mailrelay.queue")

__all__ = ["Observers"]


class Observers:
    """The configured queue and delivery observers of one process.

    @ivar queued: the L{ConfiguredPlugin}s of the C{queue} hook (L{IQueueObserver}).
    @ivar delivered: those of the C{delivery} hook (L{IDeliveryObserver}).
    """

    def __init__(
        self,
        clock: IReactorTime,
        queued: Sequence[ConfiguredPlugin] = (),
        delivered: Sequence[ConfiguredPlugin] = (),
    ) -> None:
        self.clock = clock
        self.queued = tuple(queued)
        self.delivered = tuple(delivered)

    def __bool__(self) -> bool:
        return bool(self.queued or self.delivered)

    def messageQueued(self, envelope: Envelope) -> None:
        """Tell the queue observers that C{envelope}'s message is queued."""
        for configured in self.queued:
            self._tell(configured, "queue", "messageQueued", envelope, envelope.queueID)

    def deliveryAttempted(self, events: Sequence[DeliveryEvent]) -> None:
        """Tell the delivery observers of C{events} (one attempt's, one per recipient)."""
        for event in events:
            for configured in self.delivered:
                self._tell(
                    configured, "delivery", "deliveryAttempted", event, event.envelope.queueID
                )

    def _tell(
        self, configured: ConfiguredPlugin, hook: str, method: str, arg: Any, queueID: Any
    ) -> None:
        about = {"plugin": configured.name, "queueID": queueID, "method": method}
        started = perf_counter()
        try:
            answer = getattr(configured.plugin, method)(arg)
        except Exception:
            log.failure("{queueID}: observer {plugin} failed in {method}()", **about)
            return
        finally:
            noteBlocking(hook, configured.name, started)  # (it holds every session meanwhile)
        if not isinstance(answer, Deferred):
            return
        if configured.timeout is not None:
            answer.addTimeout(configured.timeout, self.clock)

        def failed(failure: Failure) -> None:
            if failure.check(TimeoutError):
                log.warn(
                    "{queueID}: observer {plugin} did not finish {method}() within "
                    "{timeout:g}s; cancelled",
                    timeout=configured.timeout,
                    **about,
                )
            else:
                log.failure("{queueID}: observer {plugin} failed in {method}()", failure, **about)

        answer.addErrback(failed)
