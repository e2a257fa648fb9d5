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
crash anywhere in between may repeat a delivery or a notification, but loses nothing.

Everything runs on the reactor thread; the only blocking calls are the small reads of
envelopes (L{ISpool.loadEnvelope}, with a stat of the message) and of the original's header
section for notifications.  A damaged entry (L{mailrelay.errors.CorruptEntry}) is moved aside
(L{ISpool.quarantine}), never retried.

Every log event about a message carries C{queueID}, and its text starts with it, so that
grepping one id shows the message's whole life (Postfix style).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

from twisted.application.service import Service
from twisted.internet.defer import CancelledError, Deferred, DeferredList
from twisted.internet.interfaces import IReactorTime
from twisted.logger import Logger
from twisted.python.failure import Failure

from mailrelay.envelope import PENDING, Envelope
from mailrelay.errors import CorruptEntry, EntryGone, SpoolError
from mailrelay.interfaces import IDeliveryBackend, IIntake, ISpool
from mailrelay.metrics import DELIVERIES, DELIVERY_DELAY, QUEUE_STATES, child
from mailrelay.queue.attempt import Calls, Deliverer, DeliveryTimedOut
from mailrelay.queue.notify import Notifier
from mailrelay.queue.outcome import Decision, apply, decide
from mailrelay.queue.policy import QueuePolicy
from mailrelay.queue.scheduler import Scheduler

log = Logger(namespace="mailrelay.queue")

__all__ = ["DeliveryTimedOut", "IntakeFactory", "QueueManager"]

_DEFAULT_POLICY = QueuePolicy()

#: Makes the intake a queue manager's notifications enter the spool through, given the
#: manager's L{QueueManager.enqueue} for the intake to call with each queue id committed.
IntakeFactory = Callable[[Callable[[str], None]], IIntake]


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

    def snapshot(self) -> dict[str, Any]:
        """The queue's state: C{running}, C{active} (sorted queue ids) and C{scheduled}
        (C{(due time, queue id)} pairs, earliest first)."""
        return {
            "running": bool(self.running),
            "active": self.scheduler.activeIDs(),
            "scheduled": self.scheduler.scheduled(),
        }

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
            "queue manager started: {count} queued entries, active limit {limit}",
            count=self.scheduler.scheduledCount,
            limit=self.policy.activeLimit,
        )
        self.scheduler.pump()

    def stopService(self) -> Deferred[None]:
        """Start no more deliveries, cancel the timer, and wait for the attempts in progress
        to end and record their results.  Deliveries still running after
        C{policy.stopTimeout} seconds (the drain time) are interrupted: their recipients are
        recorded as deferred, to be retried at the next start (the next hop may have received
        the message: it may be sent twice).  Then the queue lock is released."""
        super().stopService()
        self._stopped = True
        self.scheduler.stop()
        QUEUE_STATES.discard(self)
        if self._locking is not None:
            self._locking.cancel()
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
        if self.lock is not None:
            self.lock.release()
        log.info("queue manager stopped")
        done.callback(None)

    def enqueue(self, queueID: str) -> None:
        """A new entry was committed: schedule it, due now.

        Call after each successful commit; the spool directory is not rescanned.  An id
        already scheduled is looked at now (but an envelope whose C{nextAttempt} is in the
        future is only rescheduled); an id being delivered is left alone.  Before
        L{startService} the id is remembered; after L{stopService} it is ignored (the next
        start finds it in the spool).
        """
        if self.scheduler.isActive(queueID) or self._stopped:
            return
        self.scheduler.schedule(queueID, self.clock.seconds())
        self.scheduler.pump()

    # -- activation ---------------------------------------------------------------------------

    def _activate(self, queueID: str, now: float) -> bool:
        """Load C{queueID} and start its attempt if it is due.  Return C{True} if an attempt
        started."""
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
            log.error(
                "{queueID}: cannot load envelope: {error}; retrying in {delay:.0f}s",
                queueID=queueID,
                error=str(e),
                delay=self.policy.maxBackoff,
            )
            self.scheduler.schedule(queueID, now + self.policy.maxBackoff)
            return False
        except Exception:
            log.failure("{queueID}: cannot load envelope; retrying later", queueID=queueID)
            self.scheduler.schedule(queueID, now + self.policy.maxBackoff)
            return False
        envelope.queueID = queueID
        if envelope.nextAttempt is not None and envelope.nextAttempt > now:
            self.scheduler.schedule(queueID, envelope.nextAttempt)
            return False
        log.info(
            "{queueID}: from=<{sender}>, size={size}, nrcpt={nrcpt} (queue active)",
            queueID=queueID,
            sender=envelope.sender,
            size=envelope.messageSize,
            nrcpt=len(envelope.pendingRecipients),
        )
        self.scheduler.begin(queueID)
        attempt = Deferred.fromCoroutine(self._attempt(queueID, envelope))
        attempt.addErrback(self._attemptFailed, queueID)
        attempt.addCallback(lambda due: self.scheduler.finish(queueID, due))
        return True

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

    async def _attempt(self, queueID: str, envelope: Envelope) -> float | None:
        """Deliver, decide, notify, record.  Return when to schedule the entry next, or
        C{None} when it is gone from the spool."""
        if envelope.arrival is None:
            envelope.arrival = self.clock.seconds()
        pending = envelope.pendingRecipients
        if not pending:
            # Finished before a crash, or by another process: only the removal is left.
            return await self._remove(queueID)
        outcomes = await self.deliverer.deliver(queueID, envelope, pending)
        now = self.clock.seconds()
        decision = decide(envelope, outcomes, self.policy, now)
        apply(envelope, decision)
        await self.notifier.notify(queueID, envelope, decision.notices, decision.discarded, now)
        _logTransitions(queueID, decision)
        return await self._record(queueID, envelope, decision, now)

    async def _record(
        self, queueID: str, envelope: Envelope, decision: Decision, now: float
    ) -> float | None:
        """Store what the attempt changed (or remove the entry when nothing is left to do);
        return when to schedule the entry next, or C{None} when it is gone."""
        policy = self.policy
        stillPending = bool(envelope.pendingRecipients)
        removalFailed = False
        if not stillPending and not decision.notices:
            # Every recipient is done and no notification depends on the recorded state: go
            # straight to removal (a crash before it means a duplicate, never a loss).  Only
            # if removal fails is the state saved, so that the retry repeats the removal,
            # not the deliveries.
            try:
                await self.spool.remove(queueID)
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
        if stillPending:
            envelope.nextAttempt = decision.nextAttempt
        try:
            await self.spool.updateEnvelope(envelope)
        except Exception as e:
            retry = decision.nextAttempt if stillPending else now + policy.minBackoff
            log.error(
                "{queueID}: saving the delivery state failed: {error}; the attempt will be "
                "repeated at {retry:.0f}",
                queueID=queueID,
                error=str(e),
                retry=retry,
            )
            return retry
        if stillPending:
            return decision.nextAttempt
        if removalFailed:
            return now + policy.minBackoff
        return await self._remove(queueID)

    async def _remove(self, queueID: str) -> float | None:
        try:
            await self.spool.remove(queueID)
        except Exception as e:
            log.error(
                "{queueID}: removing the queue entry failed: {error}; will try again",
                queueID=queueID,
                error=str(e),
            )
            return self.clock.seconds() + self.policy.minBackoff
        log.info("{queueID}: removed", queueID=queueID)
        return None

    def timeoutFor(self, backend: str) -> float:
        """Seconds one delivery by C{backend} may take (0: no limit)."""
        return self.deliverer.timeoutFor(backend)


def _logTransitions(queueID: str, decision: Decision) -> None:
    """One line per recipient tried, once the notifications are committed (a recipient
    whose bounce could not be queued is pending again, and logged as deferred)."""
    for t in decision.transitions:
        status, diagnostic = t.logStatus, t.logDiagnostic
        if status == "bounced" and t.recipient.state == PENDING:
            status = "deferred"
            diagnostic += "; the bounce could not be queued, will retry"
        child(DELIVERIES, t.backend, status).inc()
        if status == "sent":
            child(DELIVERY_DELAY, t.backend).observe(decision.delay)
        log.info(
            "{queueID}: to=<{rcpt}>, relay={relay}, delay={delay:.1f}, attempts={attempts}, "
            "status={status} ({diagnostic}){tlsText}",
            queueID=queueID,
            rcpt=t.recipient.address,
            relay=t.relay,
            delay=decision.delay,
            attempts=t.attempts,
            status=status,
            diagnostic=diagnostic,
            tls=t.tls,
            tlsText=f", tls={t.tls}" if t.tls else "",
        )
