"""When each queue entry is next looked at, and which entries are active.

Every entry the queue manager knows of is either I{scheduled} -- only a C{(due time, queue
id)} pair in a heap -- or I{active}: its envelope loaded and its delivery attempt running.  At
most C{activeLimit} entries are active at once.  One reactor timer is armed for the earliest
due entry; when it fires, due entries are handed to the C{activate} callback while there is
room.  Rescheduling an entry pushes a new heap pair and leaves the old one stale (it is
dropped when it reaches the top), so that scheduling costs O(log n).

New mail (scheduled with C{fresh}) waits in a heap of its own, and while both heaps have due
entries the window's free places go to each in turn, as Postfix's queue manager round-robins
its incoming and deferred queues: a wave of retries falling due at once (mail for a slow
destination, more than the window holds) does not keep new mail out until it is all done.
"""

from __future__ import annotations

import heapq
import itertools
from collections.abc import Callable

from twisted.internet.defer import Deferred
from twisted.internet.interfaces import IDelayedCall, IReactorTime

__all__ = ["Scheduler"]

#: At most this many envelopes are loaded only to be found not yet due (after a restart) in
#: one reactor turn; the rest continue in the next turn, so the reactor stays responsive.
_LOADS_PER_TURN = 200


class Scheduler:
    """The heap of scheduled entries, the window of active ones, and the timer.

    @ivar enabled: whether due entries are activated (the queue manager runs and may
        deliver); while not, entries are only remembered.
    """

    def __init__(
        self, clock: IReactorTime, activeLimit: int, activate: Callable[[str, float], bool]
    ) -> None:
        """
        @param clock: provides C{seconds()} and C{callLater()} (the reactor).
        @param activeLimit: the most entries active at once.
        @param activate: called with a due entry's queue id and the time; it either makes
            the entry active (L{begin}) and returns C{True}, or returns C{False} (the entry
            was not due after all, is gone, or was rescheduled).
        """
        self.clock = clock
        self.activeLimit = activeLimit
        self.activate = activate
        self.enabled = False
        self._heap: list[tuple[float, int, str]] = []
        #: The heap of new mail (see the module docstring).
        self._fresh: list[tuple[float, int, str]] = []
        #: Whether new mail has the next free place when both heaps have due entries.
        self._freshTurn = True
        #: queue id -> sequence number of its live heap entry (others are stale).
        self._scheduled: dict[str, int] = {}
        #: queue id -> Deferred fired when its attempt is over.
        self._active: dict[str, Deferred[None]] = {}
        self._sequence = itertools.count()
        self._timer: IDelayedCall | None = None
        self._timerDue: float | None = None
        self._pumping = False
        self._pumpAgain = False

    # -- what is known ------------------------------------------------------------------------

    @property
    def activeCount(self) -> int:
        return len(self._active)

    @property
    def scheduledCount(self) -> int:
        return len(self._scheduled)

    def isActive(self, queueID: str) -> bool:
        return queueID in self._active

    def isKnown(self, queueID: str) -> bool:
        """Whether C{queueID} is scheduled or active."""
        return queueID in self._scheduled or queueID in self._active

    def activeIDs(self) -> list[str]:
        """The queue ids of the active entries, sorted."""
        return sorted(self._active)

    def attemptsInProgress(self) -> list[Deferred[None]]:
        """A Deferred per active entry, fired when its attempt is over."""
        return list(self._active.values())

    def scheduled(self) -> list[tuple[float, str]]:
        """The scheduled entries as C{(due time, queue id)}, earliest first."""
        live = sorted(
            (due, seq, queueID)
            for due, seq, queueID in self._heap + self._fresh
            if self._scheduled.get(queueID) == seq
        )
        return [(due, queueID) for due, _, queueID in live]

    # -- changes ------------------------------------------------------------------------------

    def schedule(self, queueID: str, due: float, fresh: bool = False) -> None:
        """Look at C{queueID} at C{due} (replacing when it was due before).  Call L{pump}
        for the change to take effect at once.

        @param fresh: it is new mail (see the module docstring)."""
        seq = next(self._sequence)
        self._scheduled[queueID] = seq
        heapq.heappush(self._fresh if fresh else self._heap, (due, seq, queueID))

    def isScheduled(self, queueID: str) -> bool:
        """Whether C{queueID} waits in the heap (scheduled, not active)."""
        return queueID in self._scheduled

    def unschedule(self, queueID: str) -> None:
        """Forget the scheduled C{queueID} (its heap pair becomes stale); nothing if it is
        not scheduled."""
        self._scheduled.pop(queueID, None)

    def begin(self, queueID: str) -> None:
        """C{queueID} is active from now on (called by C{activate})."""
        self._active[queueID] = Deferred()

    def finish(self, queueID: str, due: float | None) -> None:
        """The attempt of C{queueID} is over: schedule it at C{due} (C{None}: it is gone),
        and activate what is due."""
        done = self._active.pop(queueID)
        if due is not None:
            self.schedule(queueID, due)
        done.callback(None)
        self.pump()

    def shift(self, step: float) -> None:
        """The wall clock was stepped by C{step} seconds: every scheduled entry is due that
        much later (earlier when negative), so that it waits as long as it was to."""
        self._heap = self._shifted(self._heap, step)
        self._fresh = self._shifted(self._fresh, step)
        self._cancelTimer()
        self.pump()

    def _shifted(
        self, heap: list[tuple[float, int, str]], step: float
    ) -> list[tuple[float, int, str]]:
        """The live entries of C{heap}, C{step} seconds later, as a heap."""
        live = [(due + step, seq, q) for due, seq, q in heap if self._scheduled.get(q) == seq]
        heapq.heapify(live)
        return live

    def stop(self) -> None:
        """Activate nothing more; cancel the timer."""
        self.enabled = False
        self._cancelTimer()

    # -- the timer ----------------------------------------------------------------------------

    def _peekIn(self, heap: list[tuple[float, int, str]]) -> tuple[float, int, str] | None:
        """The earliest live entry of C{heap} (stale ones on top are dropped)."""
        while heap:
            due, seq, queueID = heap[0]
            if self._scheduled.get(queueID) == seq:
                return heap[0]
            heapq.heappop(heap)
        return None

    def _peek(self) -> tuple[float, int, str] | None:
        """The earliest live entry of both heaps."""
        tops = [t for t in (self._peekIn(self._heap), self._peekIn(self._fresh)) if t]
        return min(tops) if tops else None

    def _next(self, now: float) -> list[tuple[float, int, str]] | None:
        """The heap whose top entry is due now and has the next free place (new mail and
        the others in turn), or C{None} when nothing is due."""
        due = [h for h in (self._fresh, self._heap) if (t := self._peekIn(h)) and t[0] <= now]
        if len(due) == 2:
            due = [self._fresh if self._freshTurn else self._heap]
        return due[0] if due else None

    def _cancelTimer(self) -> None:
        if self._timer is not None and self._timer.active():
            self._timer.cancel()
        self._timer = None
        self._timerDue = None

    def _armTimer(self, due: float) -> None:
        if self._timer is not None and self._timer.active() and self._timerDue == due:
            return
        self._cancelTimer()
        self._timerDue = due
        self._timer = self.clock.callLater(max(0.0, due - self.clock.seconds()), self._timerFired)

    def _timerFired(self) -> None:
        self._timer = None
        self._timerDue = None
        self.pump()

    def pump(self) -> None:
        """Activate due entries while there is room; arm the timer for the next one."""
        if self._pumping:
            self._pumpAgain = True
            return
        self._pumping = True
        try:
            loads = 0
            while True:
                self._pumpAgain = False
                if not self.enabled:
                    return
                now = self.clock.seconds()
                while len(self._active) < self.activeLimit:
                    heap = self._next(now)
                    if heap is None:
                        break
                    if loads >= _LOADS_PER_TURN:
                        self._armTimer(now)  # continue in the next reactor turn
                        return
                    queueID = heapq.heappop(heap)[2]
                    self._freshTurn = heap is not self._fresh
                    del self._scheduled[queueID]
                    if not self.activate(queueID, now):
                        loads += 1
                if not self._pumpAgain:
                    break
            top = self._peek()
            if top is None or len(self._active) >= self.activeLimit:
                self._cancelTimer()
            else:
                self._armTimer(top[0])
        finally:
            self._pumping = False
