"""The queue manager: delivers what the spool holds, retries, bounces and expires it.

Like Postfix's qmgr.  L{QueueManager} is the service that composes the queue's parts and
records what they decide:

  - L{mailrelay.queue.scheduler}: when each entry is next looked at; at most
    C{activeLimit} entries are I{active} (envelope loaded, deliveries running) at once;
  - L{mailrelay.queue.attempt}: one delivery attempt (route, group, deliver with timeouts);
  - L{mailrelay.queue.outcome}: what the attempt means (a pure decision);
  - L{mailrelay.queue.notify}: the notifications it calls for, submitted to the intake
    (L{IIntake}), which tells the manager of each one committed (L{QueueManager.enqueue}).

The order is what makes it crash-safe: notifications are B{committed to the spool first},
then the envelope is durably updated, then the entry is removed when nothing is pending.  A
crash anywhere in between may repeat a delivery or a notification, but loses nothing.  When
an attempt makes several deliveries (next hops), the recipients of each one that ends while
others still run are logged as sent and recorded in the spool at once, as Postfix's delivery
agents mark each recipient done when its delivery ends: a crash while a slow next hop is
being delivered to does not send the message again to the others.  A recipient whose sender
is owed a success notice (NOTIFY=SUCCESS) is recorded so too, marked with the notice owed and
the queue id it is to have (Postfix's trace log); the notice is made at the attempt's end
from what is recorded, or, after a crash, at the next attempt, under that id: it is queued
once (L{mailrelay.queue.notify}), and delivered once the marks naming it are cleared in the
spool (a notice whose message still names it waits: L{QueueManager._noticeStillOwed}).

Everything runs on the reactor thread; the only blocking calls are the small reads of
envelopes (L{ISpool.loadEnvelope}, with a stat of the message) and of the original's header
section for notifications.  A damaged entry (L{mailrelay.errors.CorruptEntry}) is moved aside
(L{ISpool.quarantine}), never retried.

Every log event about a message carries C{queueID}, and its text starts with it, so that
grepping one id shows the message's whole life (Postfix style).

The operator's commands (L{mailrelay.queue.control}) act through the manager, never on the
files behind its back: L{QueueManager.hold}, L{QueueManager.release}, L{QueueManager.flush},
L{QueueManager.delete} and L{QueueManager.bounce}.  Each treats its entry as active while it
works (so that no attempt starts meanwhile); an entry whose attempt is in progress is held at
once (the attempt records the hold with its results), and deleted or bounced when the attempt
ends; one whose removal is under way is gone for them.  An entry on hold (L{Envelope.held},
stored in its envelope: it survives a restart) is not delivered, nor scheduled, until it is
released.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, replace
from datetime import timedelta
from typing import Any

from twisted.application.service import Service
from twisted.internet.defer import CancelledError, Deferred, DeferredList
from twisted.internet.interfaces import IReactorTime
from twisted.logger import Logger
from twisted.python.failure import Failure

from mailrelay.envelope import BOUNCED, DELIVERED, PENDING, Envelope, Recipient
from mailrelay.errors import CorruptEntry, EntryGone, SpoolError
from mailrelay.interfaces import (
    DEFERRED,
    DeliveryEvent,
    DeliveryStatus,
    IDeliveryBackend,
    IIntake,
    ISpool,
    RecipientResult,
)
from mailrelay.metrics import DELIVERIES, DELIVERY_DELAY, QUEUE_STATES, child, countNow
from mailrelay.queue.attempt import Calls, Deliverer, DeliveryTimedOut
from mailrelay.queue.notify import Notifier
from mailrelay.queue.observers import Observers
from mailrelay.queue.outcome import (
    SUCCESS_ACTIONS,
    Decision,
    Outcome,
    Transition,
    apply,
    applyTo,
    decide,
    doneEarly,
    wants,
)
from mailrelay.queue.policy import QueuePolicy
from mailrelay.queue.scheduler import Scheduler

log = Logger(namespace="mailrelay.queue")

__all__ = [
    "RETURNED_DIAGNOSTIC",
    "RETURNED_STATUS",
    "DeliveryTimedOut",
    "Done",
    "IntakeFactory",
    "QueueManager",
    "QueueUnavailable",
]

_DEFAULT_POLICY = QueuePolicy()

#: Seconds (never more than the rescan interval) between a periodic look into the spool that
#: found entries nobody told the queue manager of and the second look that takes those still
#: unknown (L{QueueManager._lookAgain}).
RESCAN_CONFIRM = 5.0

#: Makes the intake a queue manager's notifications enter the spool through, given the
#: manager's L{QueueManager.enqueue} for the intake to call with each queue id committed.
IntakeFactory = Callable[[Callable[[str], None]], IIntake]

#: The status and diagnostic recorded for the recipients of a message the operator returned
#: to its sender (L{QueueManager.bounce}), as in their notification.
RETURNED_STATUS = "5.0.0"
RETURNED_DIAGNOSTIC = "X-mailrelay; returned to the sender by the mail system's operator"


@dataclass(frozen=True)
class Done:
    """What one of the operator's commands did to one entry.

    @ivar changed: whether it changed anything (not: "already on hold").
    @ivar text: what it did, for the operator.
    """

    changed: bool
    text: str


class QueueUnavailable(Exception):
    """The queue manager cannot act on the queue now: it is not started, waits for the
    queue lock (another queue manager still delivers from the spool), or is stopping.  The
    message says which."""


class QueueManager(Service):
    """Schedules and delivers every entry of a spool.

    @ivar policy: the L{QueuePolicy}.
    @ivar intake: the L{IIntake} its notifications enter the spool through.
    """

    def __init__(
        self,
        spool: ISpool,
        router: Any,
        backends: Mapping[str, IDeliveryBackend],
        clock: IReactorTime,
        *,
        hostname: str,
        makeIntake: IntakeFactory,
        policy: QueuePolicy = _DEFAULT_POLICY,
        timeouts: Mapping[str, float] | None = None,
        lock: Any = None,
        observers: Observers | None = None,
    ) -> None:
        """
        @param spool: an L{ISpool}, started by the time L{startService} runs.
        @param router: an L{IRouter}.
        @param backends: the delivery backends by name (L{Route.backend}).
        @param clock: provides C{seconds()} and C{callLater()} (the reactor).
        @param hostname: this relay's host name, for notifications.
        @param makeIntake: called once, with L{enqueue}: the L{IIntake} over C{spool} that
            notifications enter the spool through (stamped like any message), which calls
            that C{enqueue} with the queue id of each message it commits.
        @param timeouts: seconds one delivery by the named backend may take (a site backend's
            C{[[backends]] timeout}); a backend not named gets C{policy.deliveryTimeout}.
        @param lock: a L{mailrelay.queue.lock.QueueLock} of the spool, or C{None}: nothing is
            delivered before it is held, and it is released when the manager has stopped,
            so that two queue managers never deliver from one spool at once.
        @param observers: the delivery observers, told what each attempt made of each
            recipient once it is recorded (L{Observers.deliveryAttempted}).
        @raise ValueError: a timeout that is not a number greater than zero.
        """
        self.setName("queue")
        self.spool = spool
        #: Router and backend calls in flight, cut short when the stop's drain time is over.
        self.calls = Calls(clock)
        self.deliverer = Deliverer(
            spool,
            router,
            backends,
            self.calls,
            deliveryTimeout=policy.deliveryTimeout,
            timeouts=timeouts,
            deliveryLimit=policy.deliveryLimit,
        )
        self.intake = makeIntake(self.enqueue)
        self.notifier = Notifier(spool, policy, hostname=hostname, intake=self.intake)
        self.clock = clock
        self.hostname = hostname
        self.policy = policy
        #: Enabled once the lock is held (or not needed) and the spool has been listed.
        self.scheduler = Scheduler(clock, policy.activeLimit, self._activate)
        self._stopped = False
        self.lock = lock
        self._locking: Deferred[None] | None = None
        #: Entries on hold, as far as the manager has seen them (loaded, or held by the
        #: operator): never activated.
        self._held: set[str] = set()
        #: Entries the operator flushed: their next activation ignores C{nextAttempt}; the
        #: value says whether it tries their own suspended next hops again too (the flush of
        #: entries by id), or not (a whole flush, or a domain's, revived them all once).
        self._forced: dict[str, bool] = {}
        #: The envelopes of the entries whose attempt is in progress.
        self._envelopes: dict[str, Envelope] = {}
        #: queue id -> the steps of the wall clock (seconds) since its envelope was stored
        #: and not yet applied to its times (see L{clockStepped}).
        self._stepped: dict[str, float] = {}
        #: The sum of the steps so far, and (queue id ->) its value when an attempt's
        #: conclusion began.
        self._stepTotal = 0.0
        self._concluding: dict[str, float] = {}
        #: The entries whose removal the spool was asked for, until their attempt (or
        #: command) ends: the operator's commands find them gone (L{_checkPresent}).
        self._removing: set[str] = set()
        #: The state of entries the spool could not save (its disk full...), as serialised
        #: envelopes: their next attempts start from it, not from the spool's older one, so
        #: that a recipient delivered is not sent again while this process runs.
        self._unsaved: dict[str, bytes] = {}
        #: What the operator asked for an entry while its attempt was in progress, done when
        #: the attempt ends: C{"delete"} or C{"bounce"}.
        self._afterAttempt: dict[str, str] = {}
        #: The recipients of attempts in progress recorded as done before their attempt's end
        #: (L{_deliveryEnded}): their transitions by the C{id} of their recipient.
        self._early: dict[str, dict[int, Transition]] = {}
        #: The spool update recording them in flight, to wait for before the attempt's own
        #: (L{_saveEarly}); C{_saveAgain}: recipients done since it was submitted.
        self._earlySave: dict[str, Deferred[None]] = {}
        self._saveAgain: set[str] = set()
        self.observers = observers or Observers(clock)
        #: The periodic look into the spool (L{_lookAgain}), while the manager runs.
        self._rescanCall: Any = None
        #: The entries the last periodic look found in the spool and did not know.
        self._unknown: set[str] = set()

    # -- introspection ------------------------------------------------------------------------

    @property
    def activeCount(self) -> int:
        """Messages whose delivery attempt is in progress."""
        return self.scheduler.activeCount

    @property
    def scheduledCount(self) -> int:
        """Messages waiting for their due time (or for room in the active window)."""
        return self.scheduler.scheduledCount

    def queueStates(self) -> dict[str, int]:
        """The number of messages in each state, for the metrics: C{active} (being
        delivered), C{scheduled} (waiting for their time, or for room among the active)."""
        return {"active": self.scheduler.activeCount, "scheduled": self.scheduler.scheduledCount}

    def deliveryPlaces(self) -> tuple[int, int]:
        """For the metrics: the places of C{[queue] delivery_limit} in use, and the
        deliveries waiting for one (L{DeliveryPlaces <mailrelay.queue.attempt.DeliveryPlaces>})."""
        places = self.deliverer.places
        return places.running, places.waiting

    def snapshot(self) -> dict[str, Any]:
        """The queue's state: C{running}, C{active} (sorted queue ids) and C{scheduled}
        (C{(due time, queue id)} pairs, earliest first)."""
        return {
            "running": bool(self.running),
            "active": self.scheduler.activeIDs(),
            "scheduled": self.scheduler.scheduled(),
        }

    def isActive(self, queueID: str) -> bool:
        """Whether C{queueID}'s delivery attempt (or an operator's command on it) is in
        progress."""
        return self.scheduler.isActive(queueID)

    def state(self) -> str:
        """What the manager is doing: C{"running"} (it delivers), C{"waiting for the queue
        lock"}, C{"stopped"} or C{"not started"}."""
        if self.scheduler.enabled:
            return "running"
        if self._locking is not None:
            return "waiting for the queue lock"
        return "stopped" if self._stopped else "not started"

    # -- life cycle ---------------------------------------------------------------------------

    def startService(self) -> None:
        """Take the spool's queue lock (waiting while another queue manager holds it), then
        schedule every committed spool entry, due now, in arrival order.

        Envelopes are not read here: an entry whose next attempt is in the future is found so
        when it is loaded, and then rescheduled without an attempt.
        """
        super().startService()
        self._stopped = False
        self.calls.reset()
        self.deliverer.places.reset()
        QUEUE_STATES.add(self)
        if self.lock is None:
            self._begin()
            return
        self._locking = self.lock.acquire()
        self._locking.addCallbacks(lambda _: self._begin(), self._lockFailed)

    def _lockFailed(self, failure: Failure) -> None:
        self._locking = None
        if failure.check(CancelledError):
            return  # stopped while waiting
        log.error(
            "queue manager not started: cannot take the queue lock {path}: {error}",
            path=str(self.lock.path),
            error=failure.getErrorMessage(),
        )

    def _begin(self) -> None:
        self._locking = None
        self.scheduler.enabled = True
        try:
            queueIDs = self.spool.queueIDs()
        except SpoolError as e:
            log.error("queue: cannot list the spool: {error}", error=str(e))
            queueIDs = []
        now = self.clock.seconds()
        for queueID in queueIDs:
            if not self.scheduler.isKnown(queueID):
                self.scheduler.schedule(queueID, now)
        log.info(
            "queue manager started: {count} queued entries, active limit {limit}, delivery "
            "limit {deliveryLimit}",
            count=self.scheduler.scheduledCount,
            limit=self.policy.activeLimit,
            deliveryLimit=self.policy.deliveryLimit,
        )
        self._rescanCall = self.clock.callLater(self.policy.rescanInterval, self._lookAgain)
        self.scheduler.pump()

    def stopService(self) -> Deferred[None]:
        """Start no more deliveries (those waiting for a place are deferred as not started:
        their recipients stay queued), cancel the timer, and wait for the attempts in
        progress to end and record their results.  Deliveries still running after
        C{policy.stopTimeout} seconds (the drain time) are interrupted: their recipients are
        recorded as deferred, to be retried at the next start (the next hop may have received
        the message: it may be sent twice).  Then the delivery states the spool could not
        take are saved (or the entries done with removed), so that the next queue manager,
        after a restart or a reload, does not repeat those deliveries (L{_saveUnsaved}); then
        the queue lock is released."""
        super().stopService()
        self._stopped = True
        self.scheduler.stop()
        if self._rescanCall is not None and self._rescanCall.active():
            self._rescanCall.cancel()
        self._rescanCall = None
        self._unknown = set()
        QUEUE_STATES.discard(self)
        if self._locking is not None:
            self._locking.cancel()
        # (As Postfix's master stops handing out delivery agents: a delivery waiting for a
        # place must not start during the drain, to be cut short at its end.)
        waitingForPlaces = self.deliverer.places.waiting
        if waitingForPlaces:
            log.info(
                "queue manager stopping: {count} deliveries waiting for a place are not "
                "started; their recipients stay queued",
                count=waitingForPlaces,
            )
        self.deliverer.places.interrupt()
        done: Deferred[None] = Deferred()
        inFlight = self.scheduler.attemptsInProgress()
        if not inFlight:
            self._stopped_(done)
            return done
        log.info("queue manager stopping: waiting for {count} deliveries", count=len(inFlight))
        waiting = DeferredList(inFlight, consumeErrors=True)

        def drainTimeOver() -> None:
            log.warn(
                "queue manager stopping: {count} deliveries still in progress after "
                "{timeout:g}s are interrupted; their recipients stay queued",
                count=self.scheduler.activeCount,
                timeout=self.policy.stopTimeout,
            )
            self.calls.interrupt()

        timer = self.clock.callLater(self.policy.stopTimeout, drainTimeOver)

        def finished(_: object) -> None:
            if timer.active():
                timer.cancel()
            self._stopped_(done)

        waiting.addCallback(finished)
        return done

    def _stopped_(self, done: Deferred[None]) -> None:
        """The attempts are over: save what the spool could not take, then release the
        queue lock."""

        def release(_: object) -> None:
            if self.lock is not None:
                self.lock.release()
            log.info("queue manager stopped")
            done.callback(None)

        async def save() -> None:
            await self._saveSteps()
            await self._saveUnsaved()

        saving = Deferred.fromCoroutine(save())
        saving.addErrback(lambda f: log.failure("saving the delivery states at the stop", f))
        saving.addCallback(release)

    async def _saveSteps(self) -> None:
        """Write the steps of the clock not yet applied to the stored times of the entries
        scheduled or held since (L{clockStepped}: on disk at their next attempt) to their
        envelopes: the next queue manager (after a restart, or a reload) reads its times
        from the spool, where a message that waited through a step forward of days would
        be that much older, bounced as too long in the queue at its next attempt."""
        stepped, self._stepped = self._stepped, {}
        for queueID, step in stepped.items():
            if queueID in self._unsaved:  # (its state is saved next, from memory)
                envelope = Envelope.fromJSON(self._unsaved[queueID])
                _moveTimes(envelope, step)
                self._unsaved[queueID] = envelope.toJSON()
                continue
            try:
                envelope = self.spool.loadEnvelope(queueID)
                _moveTimes(envelope, step)
                await self.spool.updateEnvelope(envelope)
            except EntryGone:
                continue
            except Exception as e:
                log.error(
                    "{queueID}: writing a step of the clock ({step:+.0f}s) to its envelope "
                    "failed at the stop: {error}; the next start takes its times as they "
                    "were written",
                    queueID=queueID, step=step, error=str(e) or repr(e),
                )

    async def _saveUnsaved(self) -> None:
        """Save the delivery states the spool could not take (C{_unsaved}), or remove the
        entries done with, for the next queue manager (after a restart, or a reload) not to
        deliver again what this one did; when the spool still refuses, log the recipients
        the next one will deliver to again."""
        for queueID, data in list(self._unsaved.items()):
            envelope = Envelope.fromJSON(data)
            envelope.queueID = queueID
            keep = bool(envelope.pendingRecipients) or _marked(envelope)
            done = "delivery state saved" if keep else "removed"
            try:
                if keep:
                    await self.spool.updateEnvelope(envelope)
                else:
                    await self.spool.remove(queueID)
            except Exception as e:
                repeated = self._doneSinceSaved(envelope)
                consequence = (
                    "the next start attempts again the recipients done since it was last "
                    "saved, which may be delivered twice: "
                    + ", ".join(f"<{a}>" for a in repeated)
                    if repeated
                    else "no recipient was done since it was last saved (its attempt count "
                    "and next attempt time are lost)"
                )
                log.error(
                    "{queueID}: saving the delivery state failed at the stop too: {error}; "
                    "{consequence}",
                    queueID=queueID,
                    error=str(e) or repr(e),
                    consequence=consequence,
                    repeated=repeated,
                )
                continue
            self._unsaved.pop(queueID, None)
            log.info("{queueID}: {done} at the stop", queueID=queueID, done=done)

    def _doneSinceSaved(self, envelope: Envelope) -> list[str]:
        """The recipients done in C{envelope} (kept in memory) but pending in the spool's
        envelope (all those done, if it cannot be read)."""
        try:
            stored = self.spool.loadEnvelope(envelope.queueID or "")
            pendingThere = {r.address for r in stored.pendingRecipients}
        except Exception:
            pendingThere = None
        return [
            r.address
            for r in envelope.recipients
            if r.state != PENDING and (pendingThere is None or r.address in pendingThere)
        ]

    def rescan(self) -> int:
        """Schedule, due now, the spool's entries this manager does not know: committed by
        a process that ended before telling (an acceptor process killed between its commit
        and its report).  Returns how many.  Entries known (scheduled, active, held) are
        left as they are."""
        if self._stopped or not self.scheduler.enabled:
            return 0  # (the start scans the spool anyway)
        unknown = self._unknownEntries()
        self._take(unknown)
        return len(unknown)

    def _lookAgain(self, confirming: bool = False) -> None:
        """The periodic look into the spool, a safety net for any notification lost (as
        Postfix's qmgr, woken up every 300 s, scans its incoming queue): an entry unknown at
        two looks in a row is scheduled, due now.  One unknown at one look only may be a
        commit in flight (its directory fsync not done: it may be undone, its client told to
        retry) or one whose notification is on its way.  When a regular look finds such
        entries, a second one (C{confirming}) follows after L{RESCAN_CONFIRM} seconds; what
        that one finds for the first time waits for the next regular look, so that a busy
        spool is looked into twice an interval at most."""
        self._rescanCall = None
        unknown = self._unknownEntries()
        stranded = [queueID for queueID in unknown if queueID in self._unknown]
        self._unknown = set(unknown).difference(stranded)
        self._take(stranded)
        confirm = bool(self._unknown) and not confirming
        interval = self.policy.rescanInterval
        delay = min(RESCAN_CONFIRM, interval) if confirm else interval
        self._rescanCall = self.clock.callLater(delay, self._lookAgain, confirm)

    def _unknownEntries(self) -> list[str]:
        """The spool's entries this manager does not know (neither scheduled, active nor
        held), sorted."""
        try:
            queueIDs = self.spool.queueIDs()
        except SpoolError as e:
            log.error("queue: cannot list the spool: {error}", error=str(e))
            return []
        isKnown, held = self.scheduler.isKnown, self._held
        return [q for q in queueIDs if not isKnown(q) and q not in held]

    def _take(self, queueIDs: list[str]) -> None:
        """Schedule C{queueIDs}, entries nobody told the manager of, due now."""
        now = self.clock.seconds()
        for queueID in queueIDs:
            log.info(
                "{queueID}: in the spool but not known (committed by a process that did not "
                "tell: it ended first, or its relay did); scheduled now",
                queueID=queueID,
            )
            self.scheduler.schedule(queueID, now, fresh=True)
        if queueIDs:
            self.scheduler.pump()

    def enqueue(self, queueID: str) -> None:
        """A new entry was committed: schedule it, due now.

        Call after each successful commit: the spool directory is only looked into at the
        start, on L{rescan} and every C{policy.rescanInterval} seconds (L{_lookAgain}).  An id
        already scheduled is looked at now (but an envelope whose C{nextAttempt} is in the
        future is only rescheduled); an id being delivered is left alone.  Before
        L{startService} the id is remembered; after L{stopService} it is ignored (the next
        start finds it in the spool).
        """
        if self.scheduler.isActive(queueID) or self._stopped:
            return
        self.scheduler.schedule(queueID, self.clock.seconds(), fresh=True)
        self.scheduler.pump()

    # -- activation ---------------------------------------------------------------------------

    def _activate(self, queueID: str, now: float) -> bool:
        """Load C{queueID} and start its attempt if it is due.  Return C{True} if an attempt
        started."""
        if queueID in self._held:
            return False  # released by the operator only
        resume = self._forced.pop(queueID, None)
        forced = resume is not None
        try:
            envelope = self.spool.loadEnvelope(queueID)
        except ValueError as e:  # not a queue id (SpoolError is no ValueError)
            log.error("{queueID}: cannot deliver: {error}", queueID=queueID, error=str(e))
            return False
        except EntryGone:
            log.info("{queueID}: no longer in the spool", queueID=queueID)
            return False
        except CorruptEntry as e:
            self._quarantine(queueID, str(e))
            return False
        except SpoolError as e:
            # (Made unreadable by hand, an I/O error, no descriptor left: tried again after
            # the shortest backoff, as the next look of Postfix's qmgr into its queue.)
            log.error(
                "{queueID}: cannot load envelope: {error}; retrying in {delay:.0f}s",
                queueID=queueID,
                error=str(e),
                delay=self.policy.minBackoff,
            )
            self.scheduler.schedule(queueID, now + self.policy.minBackoff)
            return False
        except Exception:
            log.failure("{queueID}: cannot load envelope; retrying later", queueID=queueID)
            self.scheduler.schedule(queueID, now + self.policy.maxBackoff)
            return False
        envelope = self._newest(queueID, envelope)
        if envelope.held:
            self._held.add(queueID)
            return False
        if envelope.noticeOf is not None:
            if self._noticeStillOwed(queueID, envelope.noticeOf):
                return False  # (enqueued once its message records it queued)
            # Never needed again: its next write leaves it out, in the form earlier versions
            # read (they do not know the field; see README, upgrades and rollbacks).
            envelope.noticeOf = None
        stepped = self._stepped.get(queueID, 0.0)
        nextAttempt = None if envelope.nextAttempt is None else envelope.nextAttempt + stepped
        if nextAttempt is not None and nextAttempt - now > self.policy.maxBackoff:
            # No attempt is ever planned that far ahead: the clock it was planned on was
            # ahead (since corrected, with the relay down), or max_backoff was lowered.
            log.info(
                "{queueID}: its next attempt was due in {due}, beyond max_backoff "
                "({maxBackoff:.0f}s): the clock was stepped back since (or max_backoff "
                "lowered); attempted now",
                queueID=queueID,
                due=str(timedelta(seconds=round(nextAttempt - now))),
                maxBackoff=self.policy.maxBackoff,
            )
            nextAttempt = now
        if not forced and nextAttempt is not None and nextAttempt > now:
            self.scheduler.schedule(queueID, nextAttempt)
            return False
        if stepped:
            del self._stepped[queueID]
            _moveTimes(envelope, stepped)
        log.info(
            "{queueID}: from=<{sender}>, size={size}, nrcpt={nrcpt} (queue active)",
            queueID=queueID,
            sender=envelope.sender,
            size=envelope.messageSize,
            nrcpt=len(envelope.pendingRecipients),
        )
        self.scheduler.begin(queueID)
        self._envelopes[queueID] = envelope
        attempt = Deferred.fromCoroutine(self._attempt(queueID, envelope, bool(resume)))
        attempt.addErrback(self._attemptFailed, queueID)
        attempt.addCallback(
            lambda due: Deferred.fromCoroutine(self._afterwards(queueID, envelope, due))
        )
        attempt.addCallback(lambda due: self._finish(queueID, due))
        return True

    def clockStepped(self, step: float) -> None:
        """The wall clock was stepped by C{step} seconds (L{mailrelay.app.clocksteps}):
        each entry is attempted when it was to be, and keeps its age (its arrival time moves
        by the step, for its lifetime and delay warning), as what really passed counts, not
        what the clock says.  The envelopes of the attempts in progress move now; those on
        disk (scheduled or held, or recorded before the step) when next attempted."""
        self._stepTotal += step
        for queueID, envelope in self._envelopes.items():
            if queueID not in self._concluding:
                _moveTimes(envelope, step)
        for queueID in [*self._heldOrScheduled()]:
            self._stepped[queueID] = self._stepped.get(queueID, 0.0) + step
        self.scheduler.shift(step)

    def withUnwrittenSteps(self, queueID: str, envelope: Envelope) -> Envelope:
        """Move C{envelope}, C{queueID}'s as just read from the spool, by the steps of the
        clock not yet written to it (L{clockStepped}: a scheduled or held entry's are
        written at its next attempt), so that what is shown of it (C{mailrelay queue
        list}) is its times as the queue counts them; return it."""
        step = self._stepped.get(queueID, 0.0)
        if step:
            _moveTimes(envelope, step)
        return envelope

    def _heldOrScheduled(self) -> Iterator[str]:
        yield from self._held
        for _, queueID in self.scheduler.scheduled():
            yield queueID

    def _finish(self, queueID: str, due: float | None) -> None:
        """The attempt (or command) on C{queueID} is over: schedule it at C{due} (C{None}:
        not at all), unless it is on hold."""
        self._envelopes.pop(queueID, None)
        self._removing.discard(queueID)
        self.scheduler.finish(queueID, None if queueID in self._held else due)

    async def _afterwards(self, queueID: str, envelope: Envelope, due: float | None) -> Any:
        """Do what the operator asked for while the attempt was in progress (delete, or
        return to the sender); return when to schedule the entry next."""
        action = self._afterAttempt.pop(queueID, None)
        if action is None or due is None:
            return due
        try:
            if action == "delete":
                await self._deleteNow(queueID)
                return None
            return await self._returnToSender(queueID, envelope)
        except Exception as e:
            log.error(
                "{queueID}: the operator's {action} after the delivery attempt failed: {error}",
                queueID=queueID,
                action=action,
                error=str(e) or repr(e),
            )
            return due

    def _quarantine(self, queueID: str, problem: str) -> None:
        """Move a damaged entry to the spool's C{corrupt/} (it logs that); if even that
        fails, try again later."""

        def failed(failure: Failure) -> None:
            delay = self.policy.maxBackoff
            log.error(
                "{queueID}: {problem}; it could not be moved aside ({error}), retrying in "
                "{delay:.0f}s",
                queueID=queueID,
                problem=problem,
                error=failure.getErrorMessage(),
                delay=delay,
            )
            if not self._stopped:
                self.scheduler.schedule(queueID, self.clock.seconds() + delay)
                self.scheduler.pump()

        self.spool.quarantine(queueID, problem).addErrback(failed)

    def _attemptFailed(self, failure: Failure, queueID: str) -> float:
        # A bug, not a delivery failure: keep the entry, try again later.
        log.failure(
            "{queueID}: delivery attempt failed unexpectedly; retrying later",
            failure,
            queueID=queueID,
        )
        return self.clock.seconds() + self.policy.minBackoff

    # -- one attempt --------------------------------------------------------------------------

    async def _attempt(
        self, queueID: str, envelope: Envelope, flushed: bool = False
    ) -> float | None:
        """Deliver, decide, notify, record.  Return when to schedule the entry next, or
        C{None} when it is gone from the spool.

        @param flushed: the operator flushed the entry by its id: its own suspended next
            hops are tried again (see L{flush})."""
        if envelope.arrival is None:
            envelope.arrival = self.clock.seconds()
        pending = envelope.pendingRecipients
        if not pending:
            # Finished before a crash, or by another process: only the removal is left, and
            # the success notices still owed (a crash came before they were queued).
            if _marked(envelope):
                return await self._conclude(queueID, envelope, [])
            return await self._remove(queueID)
        noticeIDs = _noticeIDs(envelope, pending, self.spool.newQueueID)

        def ended(outcomes: list[Outcome]) -> None:
            self._deliveryEnded(queueID, envelope, outcomes, noticeIDs)

        try:
            outcomes = await self.deliverer.deliver(
                queueID, envelope, pending, ended, flushed=flushed
            )
            saving = self._earlySave.get(queueID)
            if saving is not None:
                await saving
            return await self._conclude(queueID, envelope, outcomes, noticeIDs)
        finally:
            self._early.pop(queueID, None)

    def _deliveryEnded(
        self,
        queueID: str,
        envelope: Envelope,
        outcomes: list[Outcome],
        noticeIDs: dict[str, str],
    ) -> None:
        """One delivery of C{envelope}'s attempt ended while others still run, or reported
        recipients done while it goes on: log its recipients done (L{doneEarly}; once each,
        with the success notice each owes, by the attempt's C{noticeIDs}) and have the spool
        record them now (or, when a record of earlier ones is in flight, right after it)."""
        now = self.clock.seconds()
        early = self._early.setdefault(queueID, {})
        # (A recipient its backend reported done while the delivery went on comes again
        # with the delivery's end.)
        done = [
            t
            for t in doneEarly(envelope, outcomes, now, noticeIDs)
            if id(t.recipient) not in early
        ]
        if not done:
            return
        delay = now - (envelope.arrival if envelope.arrival is not None else now)
        for t in done:
            early[id(t.recipient)] = t
            _logTransition(queueID, t, delay, t.logStatus, t.logDiagnostic)
        if queueID in self._earlySave:
            self._saveAgain.add(queueID)
            return
        saving = Deferred.fromCoroutine(self._saveEarly(queueID, envelope))
        if not saving.called:
            self._earlySave[queueID] = saving

    def _withEarly(self, envelope: Envelope) -> Envelope:
        """C{envelope} as the spool is to have it while its attempt runs: a copy with the
        recipients done early marked done (C{envelope} itself when there are none)."""
        early = self._early.get(envelope.queueID or "")
        if not early:
            return envelope
        recipients = []
        for r in envelope.recipients:
            t = early.get(id(r))
            if t is not None:
                r = replace(r)
                applyTo(r, t)
            recipients.append(r)
        return replace(envelope, recipients=recipients)

    async def _saveEarly(self, queueID: str, envelope: Envelope) -> None:
        """Record in the spool the recipients of C{envelope} done early (L{_withEarly}),
        until none is left unrecorded; what the spool cannot take is kept in memory (see
        C{_unsaved}), for the attempt's own record to save.  One record at a time: those
        done meanwhile go in the next one."""
        try:
            while True:
                self._saveAgain.discard(queueID)
                state = self._withEarly(envelope)
                try:
                    await self.spool.updateEnvelope(state)
                except Exception as e:
                    self._unsaved[queueID] = state.toJSON()
                    log.error(
                        "{queueID}: saving the delivery state failed: {error}; the state is "
                        "kept in memory and saved with the results of the attempt in progress",
                        queueID=queueID,
                        error=str(e) or repr(e),
                    )
                else:
                    self._unsaved.pop(queueID, None)
                if queueID not in self._saveAgain:
                    return
        finally:
            self._earlySave.pop(queueID, None)

    async def _conclude(
        self,
        queueID: str,
        envelope: Envelope,
        outcomes: list[Outcome],
        noticeIDs: dict[str, str] | None = None,
    ) -> float | None:
        """Decide what C{outcomes} mean, notify, log and record them; return when to
        schedule the entry next, or C{None} when it is gone.  Then enqueue the success
        notices queued under their marks' ids (L{mailrelay.queue.notify}), once the marks
        are recorded cleared (or the entry removed)."""
        now = self.clock.seconds()
        # A step of the clock from now on is not applied to the envelope in memory, whose
        # times are decided and recorded as of now: to the time returned, and to the record
        # at the next attempt (see clockStepped).
        self._concluding[queueID] = self._stepTotal
        try:
            early = self._early.pop(queueID, {})
            decision = decide(envelope, outcomes, self.policy, now, early, noticeIDs)
            apply(envelope, decision)
            queued = await self.notifier.notify(
                queueID, envelope, decision.notices, decision.discarded, now
            )
            _logTransitions(queueID, decision, early)
            due = await self._record(queueID, envelope, decision, now)
            if queueID not in self._unsaved:
                # (Not recorded: the marks in the spool still name them; the periodic look
                # into the spool finds them once they are cleared.)
                for dsnID in queued:
                    self.enqueue(dsnID)
        finally:
            stepped = self._stepTotal - self._concluding.pop(queueID)
        if stepped:
            self._stepped[queueID] = self._stepped.get(queueID, 0.0) + stepped
            due = None if due is None else due + stepped
        if self.observers.delivered:
            self.observers.deliveryAttempted(_events(envelope, outcomes, decision))
        return due

    async def _record(
        self, queueID: str, envelope: Envelope, decision: Decision, now: float
    ) -> float | None:
        """Store what the attempt changed (or remove the entry when nothing is left to do);
        return when to schedule the entry next, or C{None} when it is gone."""
        policy = self.policy
        # (A success notice the spool could not take keeps the entry: its recipients' marks.)
        stillPending = bool(envelope.pendingRecipients) or _marked(envelope)
        removalFailed = False
        if not stillPending and not decision.notices:
            # Every recipient is done and no notification depends on the recorded state: go
            # straight to removal (a crash before it means a duplicate, never a loss).  Only
            # if removal fails is the state saved, so that the retry repeats the removal,
            # not the deliveries.
            try:
                await self._removeEntry(queueID)
            except Exception as e:
                log.error(
                    "{queueID}: removing the queue entry failed: {error}; saving its state",
                    queueID=queueID,
                    error=str(e),
                )
                removalFailed = True
            else:
                log.info("{queueID}: removed", queueID=queueID)
                return None
        nextAttempt = decision.nextAttempt
        if nextAttempt is None and stillPending:
            nextAttempt = now + policy.minBackoff  # (only a notice owed is left)
        if stillPending:
            envelope.nextAttempt = nextAttempt
        try:
            await self.spool.updateEnvelope(envelope)
        except Exception as e:
            retry = nextAttempt if stillPending else now + policy.minBackoff
            assert retry is not None
            # Kept for the next attempts of this process: the recipients done are not sent
            # again (a restart before the state is saved may send them once more).
            self._unsaved[queueID] = envelope.toJSON()
            log.error(
                "{queueID}: saving the delivery state failed: {error}; the state is kept in "
                "memory and saved at the next attempt, in {delay:.0f}s (or at the stop)",
                queueID=queueID,
                error=str(e),
                delay=max(0.0, retry - now),
            )
            return retry
        self._unsaved.pop(queueID, None)
        if stillPending:
            return nextAttempt
        if removalFailed:
            return now + policy.minBackoff
        return await self._remove(queueID)

    async def _remove(self, queueID: str) -> float | None:
        try:
            await self._removeEntry(queueID)
        except Exception as e:
            log.error(
                "{queueID}: removing the queue entry failed: {error}; will try again",
                queueID=queueID,
                error=str(e),
            )
            return self.clock.seconds() + self.policy.minBackoff
        log.info("{queueID}: removed", queueID=queueID)
        return None

    async def _removeEntry(self, queueID: str) -> None:
        """Have the spool remove C{queueID} (its attempt or command in progress).  From now
        on the operator's commands find it gone: what they would store in its envelope could
        reach the spool only after the removal (and bring the envelope back without its
        message).  If the removal fails, they find it again."""
        self._removing.add(queueID)
        try:
            await self.spool.remove(queueID)
        except BaseException:
            self._removing.discard(queueID)
            raise
        self._forget(queueID)

    def _forget(self, queueID: str) -> None:
        """C{queueID} left the spool: forget what the operator said of it, and the clock's
        steps not yet written to it."""
        self._held.discard(queueID)
        self._forced.pop(queueID, None)
        self._unsaved.pop(queueID, None)
        self._stepped.pop(queueID, None)

    def timeoutFor(self, backend: str) -> float:
        """Seconds one delivery by C{backend} may take (0: no limit)."""
        return self.deliverer.timeoutFor(backend)

    # -- the operator's commands --------------------------------------------------------------

    def checkReady(self) -> None:
        """@raise QueueUnavailable: the manager does not deliver now (see L{state}), so it
        may not change the queue either (another queue manager may be delivering from the
        spool)."""
        if self.scheduler.enabled and not self._stopped:
            return
        state = self.state()
        if state == "waiting for the queue lock":
            holder = self.lock.holder() if self.lock is not None else "(unknown)"
            raise QueueUnavailable(
                f"the queue manager is waiting for the queue lock, held by process {holder} "
                "(a previous delivery process finishing its deliveries); try again shortly"
            )
        raise QueueUnavailable(f"the queue manager is {state}")

    def _checkPresent(self, queueID: str) -> None:
        """@raise EntryGone: C{queueID}'s removal is under way (its last recipient done, or
        the operator's delete or bounce), as if it were gone already."""
        if queueID in self._removing:
            raise EntryGone(f"no queue entry {queueID}", queueID=queueID)

    def _load(self, queueID: str, quarantine: bool = True) -> Envelope:
        """The envelope of C{queueID}, as stored (for an operator's command).

        @param quarantine: a damaged entry is moved to the spool's C{corrupt/}, as its next
            attempt would move it.
        @raise EntryGone: there is no such entry.
        @raise ValueError: C{queueID} is not a queue id.
        @raise SpoolError: it cannot be read (L{CorruptEntry}: it is damaged).
        """
        try:
            envelope = self.spool.loadEnvelope(queueID)
        except CorruptEntry as e:
            if quarantine:
                self.scheduler.unschedule(queueID)
                self._quarantine(queueID, str(e))
            raise
        return self._newest(queueID, envelope)

    def _newest(self, queueID: str, loaded: Envelope) -> Envelope:
        """C{loaded} (the spool's envelope of C{queueID}), or the newer state the spool
        could not take (see C{_unsaved}), carrying its queue id."""
        unsaved = self._unsaved.get(queueID)
        envelope = loaded if unsaved is None else Envelope.fromJSON(unsaved)
        envelope.queueID = queueID
        return envelope

    async def _command(
        self, queueID: str, work: Callable[[], Any], due: Callable[[], float | None]
    ) -> Any:
        """Run C{work} (a coroutine function) with C{queueID} active, so that no attempt
        starts meanwhile; then schedule the entry at what C{due()} says (C{None}: not at
        all; nor when it is on hold)."""
        self.scheduler.unschedule(queueID)
        self.scheduler.begin(queueID)
        try:
            return await work()
        finally:
            self._finish(queueID, due())

    async def hold(self, queueID: str) -> Done:
        """Put C{queueID} on hold: it stays queued, and is not delivered until released.  The
        hold is stored in its envelope (it survives a restart) before this returns.  An entry
        whose attempt is in progress is held from its end on: the attempt records its results
        with the hold.  Returns what was done (L{Done}).

        @raise EntryGone: there is no such entry.
        @raise QueueUnavailable: see L{checkReady}.
        """
        return await self._setHeld(queueID, True)

    async def release(self, queueID: str) -> Done:
        """Release C{queueID} from hold: it is delivered again, at its next attempt's time
        (at once if that has passed: a message held for longer than the queue lifetime is
        tried once more, then bounced if that fails).  Returns what was done.

        @raise EntryGone: there is no such entry.
        @raise QueueUnavailable: see L{checkReady}.
        """
        return await self._setHeld(queueID, False)

    async def _setHeld(self, queueID: str, held: bool) -> Done:
        self.checkReady()
        self._checkPresent(queueID)
        done = "placed on hold" if held else "released"
        unchanged = Done(False, "already on hold" if held else "not on hold")
        envelope = self._envelopes.get(queueID)
        if envelope is not None:
            # Its attempt in progress records the change with its results.
            if envelope.held == held:
                return unchanged
            await self._storeHeld(envelope, held)
            log.info(
                "{queueID}: {done} by the operator (during its delivery attempt)",
                queueID=queueID,
                done=done,
            )
            return Done(True, done + (" (its delivery attempt in progress ends first)" * held))
        self._checkIdle(queueID)
        envelope = self._load(queueID)
        if envelope.held == held:
            if held:
                self.scheduler.unschedule(queueID)
                self._held.add(queueID)
            return unchanged

        def due() -> float | None:
            if queueID in self._held:
                return None
            return max(self.clock.seconds(), envelope.nextAttempt or 0.0)

        await self._command(queueID, lambda: self._storeHeld(envelope, held), due)
        log.info("{queueID}: {done} by the operator", queueID=queueID, done=done)
        return Done(True, done)

    async def _storeHeld(self, envelope: Envelope, held: bool) -> None:
        """Record in C{envelope}, in memory and in the spool, whether it is on hold (as it
        was, if the spool fails)."""
        queueID = envelope.queueID
        assert queueID is not None
        before = envelope.held
        envelope.held = held
        if held:
            self._held.add(queueID)
            self._forced.pop(queueID, None)
        else:
            self._held.discard(queueID)
        try:
            await self.spool.updateEnvelope(self._withEarly(envelope))
        except Exception:
            envelope.held = before
            (self._held.add if before else self._held.discard)(queueID)
            raise

    def _checkIdle(self, queueID: str) -> None:
        """@raise QueueUnavailable: another command on C{queueID} is in progress."""
        if self.isActive(queueID):
            raise QueueUnavailable(f"another command on {queueID} is in progress; try again")

    def _afterItsAttempt(self, queueID: str, action: str, done: str) -> Done | None:
        """When C{queueID}'s attempt is in progress, have C{action} (C{"delete"},
        C{"bounce"}) done when it ends and say so; C{None} when there is no attempt.

        @raise EntryGone: its removal is under way.
        @raise QueueUnavailable: another command on C{queueID} is in progress.
        """
        self._checkPresent(queueID)
        if queueID not in self._envelopes:
            self._checkIdle(queueID)
            return None
        self._afterAttempt[queueID] = action
        log.info(
            "{queueID}: to be {done} by the operator once its delivery attempt in progress ends",
            queueID=queueID,
            done=done,
        )
        return Done(True, f"{done} when its delivery attempt in progress ends")

    def flush(self, queueID: str, *, check: bool = True, resume: bool = True) -> Done:
        """Attempt C{queueID} now, whatever its next attempt's time (as C{postqueue -i}),
        its own next hops too if they are suspended, but not the others (Postfix's flush
        server marks the one queue file, and qmgr unthrottles the queues its recipients go
        to: see L{Deliverer.deliver}'s C{flushed}).  Returns what was done: an entry on hold
        or being delivered is left alone.

        @param check: read the entry first (to refuse an unknown id, and to see a hold the
            manager has not seen yet); without, an id that is gone is only logged when its
            turn comes.
        @param resume: try its own suspended next hops again; not when the caller revived
            every one just before (L{resumeSuspended}: the flush of a domain), so that the
            first delivery that fails to reach a dead one again suspends it for the others.
        @raise EntryGone: there is no such entry (with C{check}), or its removal is under way.
        @raise QueueUnavailable: see L{checkReady}.
        """
        self.checkReady()
        self._checkPresent(queueID)
        if self.isActive(queueID):
            return Done(False, "being delivered now")
        if queueID not in self._held and check:
            if self._load(queueID).held:
                self._held.add(queueID)
                self.scheduler.unschedule(queueID)
        if queueID in self._held:
            return Done(False, "on hold (release it first)")
        self._forced[queueID] = resume
        self.scheduler.schedule(queueID, self.clock.seconds())
        self.scheduler.pump()
        return Done(True, "scheduled for delivery now")

    def resumeSuspended(self) -> None:
        """Try every next hop suspended after failures to reach it again (Postfix's
        C{QMGR_REQ_FLUSH_DEAD}, sent by C{postqueue -f} and C{-s})."""
        self.deliverer.resumeSuspended()

    def flushAll(self) -> int:
        """Attempt every entry not on hold now (as C{postqueue -f}), suspended next hops
        too; the number of entries scheduled (those being delivered are not counted).

        Every suspended next hop is revived once, here, as Postfix's C{postqueue -f} sends
        one C{QMGR_REQ_FLUSH_DEAD} (C{mail_flush_deferred()}), not once per entry: the first
        delivery that fails to reach a dead one again suspends it, and its other entries are
        deferred at once rather than each trying it (a retry storm).

        @raise QueueUnavailable: see L{checkReady}.
        """
        self.checkReady()
        self.resumeSuspended()
        count = 0
        for queueID in self.spool.queueIDs():
            if queueID in self._held or self.isActive(queueID):
                continue
            self._forced[queueID] = False
            self.scheduler.schedule(queueID, self.clock.seconds())
            count += 1
        self.scheduler.pump()
        return count

    async def delete(self, queueID: str) -> Done:
        """Remove C{queueID} from the queue, undelivered and unreported (as C{postsuper
        -d}); an entry whose attempt is in progress is removed when the attempt ends.
        Returns what was done.

        @raise EntryGone: there is no such entry.
        @raise QueueUnavailable: see L{checkReady}.
        """
        self.checkReady()
        later = self._afterItsAttempt(queueID, "delete", "deleted")
        if later is not None:
            return later
        try:
            self._load(queueID, quarantine=False)
        except CorruptEntry:
            pass  # removing it is what the operator wants
        removed: list[bool] = []

        async def work() -> None:
            await self._deleteNow(queueID)
            removed.append(True)

        await self._command(queueID, work, lambda: None if removed else self.clock.seconds())
        return Done(True, "deleted")

    async def _deleteNow(self, queueID: str) -> None:
        await self._removeEntry(queueID)
        log.info("{queueID}: removed by the operator", queueID=queueID)

    async def bounce(self, queueID: str) -> Done:
        """Return C{queueID} to its sender now: every recipient still pending is bounced
        (status L{RETURNED_STATUS}), with a notification as for any failure (RFC 3461's
        NOTIFY is obeyed; a message from the null sender goes to C{[queue] postmaster}, or
        nowhere), and the entry is removed.  An entry on hold is returned too; one whose
        attempt is in progress is returned when the attempt ends.  Returns what was done.

        @raise EntryGone: there is no such entry.
        @raise QueueUnavailable: see L{checkReady}.
        @raise SpoolError: the notification could not be queued (the entry stays queued).
        """
        self.checkReady()
        later = self._afterItsAttempt(queueID, "bounce", "returned to the sender")
        if later is not None:
            return later
        envelope = self._load(queueID)
        due: list[float | None] = [max(self.clock.seconds(), envelope.nextAttempt or 0.0)]

        async def work() -> None:
            due[0] = await self._returnToSender(queueID, envelope)

        await self._command(queueID, work, lambda: due[0])
        if envelope.pendingRecipients:
            raise SpoolError(
                f"{queueID} was not returned: its notification could not be queued (see the "
                "log); it stays queued",
                queueID=queueID,
            )
        return Done(True, "returned to the sender")

    async def _returnToSender(self, queueID: str, envelope: Envelope) -> float | None:
        """Bounce every pending recipient of C{envelope} now; when to schedule it next."""
        if envelope.arrival is None:
            envelope.arrival = self.clock.seconds()
        log.info("{queueID}: returned to the sender by the operator", queueID=queueID)
        outcomes = [
            Outcome(
                r,
                RecipientResult(
                    r.address, DeliveryStatus.PERMANENT, RETURNED_STATUS, RETURNED_DIAGNOSTIC
                ),
                "none",
            )
            for r in envelope.pendingRecipients
        ]
        if not outcomes and not _marked(envelope):
            return await self._remove(queueID)
        return await self._conclude(queueID, envelope, outcomes)

    def _noticeStillOwed(self, dsnID: str, queueID: str) -> bool:
        """Whether the success notice C{dsnID} is to wait: the recipients' marks of the
        message C{queueID} it reports on name it in the spool (the spool's record, not the
        state in memory, which a crash loses: that message may be about to queue it, and
        were it delivered and removed first, it would be made again).  That message
        enqueues it once it records the marks cleared."""
        try:
            envelope = self.spool.loadEnvelope(queueID)
        except (EntryGone, CorruptEntry, ValueError):
            return False  # (done with, or never to make it)
        except Exception as e:
            log.error(
                "{dsnID}: cannot read the envelope of {queueID}, the message it reports on: "
                "{error}; retrying in {delay:.0f}s",
                dsnID=dsnID,
                queueID=queueID,
                error=str(e) or repr(e),
                delay=self.policy.minBackoff,
            )
            # (As any envelope that cannot be read for now: see _load.)
            self.scheduler.schedule(dsnID, self.clock.seconds() + self.policy.minBackoff)
            return True
        owed = any(r.noticeID == dsnID for r in envelope.recipients)
        if owed:
            log.info(
                "{dsnID}: waits for {queueID}, the message it reports on, to record it queued",
                dsnID=dsnID,
                queueID=queueID,
            )
        return owed


def _marked(envelope: Envelope) -> bool:
    """Whether a recipient of C{envelope} is owed a success notice not yet queued."""
    return any(r.noticeOwed is not None for r in envelope.recipients)


def _noticeIDs(
    envelope: Envelope, pending: list[Recipient], newQueueID: Callable[[], str]
) -> dict[str, str]:
    """The queue ids (from C{newQueueID}) the success notices of an attempt on C{envelope}
    are to have, by action, when one of its C{pending} recipients may owe one (see
    L{mailrelay.queue.outcome.Notice.queueID})."""
    if not envelope.sender or not any(wants(r, "SUCCESS") for r in pending):
        return {}
    return {action: newQueueID() for action in SUCCESS_ACTIONS}


def _moveTimes(envelope: Envelope, step: float) -> None:
    """Move C{envelope}'s arrival and next attempt by a step of the wall clock (see
    L{QueueManager.clockStepped})."""
    if envelope.arrival is not None:
        envelope.arrival += step
    if envelope.nextAttempt is not None:
        envelope.nextAttempt += step


def _events(
    envelope: Envelope, outcomes: list[Outcome], decision: Decision
) -> list[DeliveryEvent]:
    """What the attempt made of each recipient, for the delivery observers (after L{apply}:
    a recipient whose bounce could not be queued is pending, so deferred)."""
    events = []
    for outcome, t in zip(outcomes, decision.transitions, strict=True):
        state = t.recipient.state
        kind = state if state in (DELIVERED, BOUNCED) else DEFERRED
        events.append(
            DeliveryEvent(
                envelope,
                t.recipient,
                kind,
                outcome.result,
                t.relay,
                t.attempts,
                decision.nextAttempt if kind == DEFERRED else None,
            )
        )
    return events


def _logTransitions(
    queueID: str, decision: Decision, logged: Mapping[int, Transition]
) -> None:
    """One line per recipient tried, once the notifications are committed (a recipient
    whose bounce could not be queued is pending again, and logged as deferred), but for
    those C{logged} already (done early, by the C{id} of their recipient)."""
    for t in decision.transitions:
        if id(t.recipient) in logged:
            continue
        status, diagnostic = t.logStatus, t.logDiagnostic
        if status == "bounced" and t.recipient.state == PENDING:
            status = "deferred"
            diagnostic += "; the bounce could not be queued, will retry"
        _logTransition(queueID, t, decision.delay, status, diagnostic)


def _logTransition(
    queueID: str, t: Transition, delay: float, status: str, diagnostic: str
) -> None:
    """The line (and the metrics) of one recipient tried, C{delay} seconds after its
    message arrived."""
    countNow(DELIVERIES, t.backend, status)  # (told before the line: kept if we are killed)
    if status == "sent":
        child(DELIVERY_DELAY, t.backend).observe(delay)
    log.info(
        "{queueID}: to=<{rcpt}>, relay={relay}, delay={delay:.1f}, attempts={attempts}, "
        "status={status} ({diagnostic}){tlsText}",
        queueID=queueID,
        rcpt=t.recipient.address,
        relay=t.relay,
        delay=delay,
        attempts=t.attempts,
        status=status,
        diagnostic=diagnostic,
        tls=t.tls,
        tlsText=f", tls={t.tls}" if t.tls else "",
    )
