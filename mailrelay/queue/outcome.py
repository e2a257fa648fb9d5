"""What one delivery attempt means for a message: a pure function of its envelope, the
attempt's results, the policy and the time.

L{decide} reads and never changes; it does no I/O and asks no clock.  It says, for every
recipient tried, what it becomes (delivered, bounced -- 5xx, or 4xx past the queue lifetime,
with that 4xx's status --, or still pending), which notifications are owed and to whom (the RFC 3461
NOTIFY rules; a failed bounce goes to the postmaster once, a failed postmaster notice to
nobody), whether the one delay warning is now due, and when to try again.  L{apply} then
writes the transitions into the envelope; committing the notices and recording the envelope
are the queue manager's (L{mailrelay.queue.notify}, L{mailrelay.queue.manager}).

A recipient delivered whose sender is owed a success notice is marked with it
(L{Recipient.noticeOwed} and L{Recipient.noticeID}, the queue id the notice is to have) in
the transition that marks it done, so that both are recorded in one write, as Postfix's
delivery agents mark the recipient done in the queue file and log what its notice needs in
the message's C{trace} log (C{DEL_REQ_FLAG_RECORD}; its qmgr asks the bounce daemon's
C{trace} service for the notice at the end).  The success notices are made from the marks
(the recipient's recorded reply, Remote-MTA, time and ORCPT), those of this attempt and any
left by one a crash cut short.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from mailrelay.envelope import BOUNCED, DELIVERED, PENDING, Envelope, Recipient
from mailrelay.interfaces import DeliveryStatus, RecipientResult
from mailrelay.queue.policy import QueuePolicy, backoff

__all__ = [
    "POSTMASTER_SOURCE",
    "SUCCESS_ACTIONS",
    "Decision",
    "Discarded",
    "Notice",
    "Outcome",
    "Transition",
    "apply",
    "applyTo",
    "decide",
    "doneEarly",
    "isPostmasterNotice",
    "owedNotices",
    "wants",
]

#: The success notices' actions (RFC 3464): delivered to the mailbox, or relayed to a next hop
#: that will not send one (it did not take the DSN request).
SUCCESS_ACTIONS = ("delivered", "relayed")

#: The C{ClientInfo.listener} of a notification sent to the postmaster because a bounce could
#: not be delivered; when one of these fails in turn it is dropped, never bounced again.
POSTMASTER_SOURCE = "local:postmaster-notice"


@dataclass(frozen=True)
class Outcome:
    """One recipient's result in one attempt, and where it went (for the log).

    @ivar recipient: the envelope's recipient.
    @ivar result: what the backend (or the attempt, for a failure of its own) said.
    @ivar relay: the next hop, as logged (C{relay=}).
    @ivar backend: the backend that delivered (or not), C{"none"} when routing failed.
    @ivar stopped: deferred because the relay stopped (its delivery not started, or cut
        short): the message is due again at the next start, not after a back-off.
    """

    recipient: Recipient
    result: RecipientResult
    relay: str
    backend: str = "none"
    stopped: bool = False


@dataclass(frozen=True)
class Transition:
    """What one attempt makes of one recipient.

    @ivar recipient: the envelope's recipient it applies to (unchanged until L{apply}).
    @ivar state: its new state (C{PENDING}, C{DELIVERED} or C{BOUNCED}).
    @ivar status: the RFC 3463 status code to record: the result's, also when the message
        expired (a 4.x.x then, as Postfix returns the deferred reason's status).
    @ivar lastResult: the diagnostic to record (the result's).
    @ivar reason: the reason to record beside it (the result's, L{RecipientResult.reason}).
    @ivar remoteMTA: the Remote-MTA to record (the result's).
    @ivar remoteAddress: the address its status came from, to record (the result's).
    @ivar command: the command whose reply refused or deferred it, to record (the
        result's), or C{None} (delivered, or no server's reply).
    @ivar finalTime: when it was delivered or bounced (its old value while pending).
    @ivar attempts: its attempt count, this one included.
    @ivar relay: where it went, for the log.
    @ivar logStatus: C{sent}, C{bounced} or C{deferred}, for the log.
    @ivar logDiagnostic: the log's explanation.
    @ivar backend: the backend of the attempt (the outcome's), for the metrics.
    @ivar tls: the TLS of the connection that answered (the result's), for the log.
    @ivar notice: the success notice a delivery owes the sender (C{delivered} or
        C{relayed}), or C{None}: recorded with the recipient until the notice is queued.
    @ivar noticeID: the queue id that notice is to have (or C{None}: the intake's choice).
    """

    recipient: Recipient
    state: str
    status: str
    lastResult: str
    remoteMTA: str | None
    reason: str | None
    finalTime: float | None
    attempts: int
    relay: str
    logStatus: str
    logDiagnostic: str
    backend: str = "none"
    tls: str | None = None
    notice: str | None = None
    noticeID: str | None = None
    remoteAddress: str | None = None
    command: str | None = None


@dataclass(frozen=True)
class Notice:
    """A notification owed, to be committed before the envelope is recorded.

    @ivar action: C{failed}, C{delayed}, C{delivered} or C{relayed} (RFC 3464).
    @ivar recipients: the recipients it reports on.
    @ivar to: whom it goes to.
    @ivar postmaster: a notice to the postmaster about a failed bounce.
    @ivar queueID: the queue id a success notice is to have (its recipients' marks name it),
        so that queueing it again, after a crash, finds it queued; or C{None}: the intake's
        choice.
    """

    action: str
    recipients: tuple[Recipient, ...]
    to: str
    postmaster: bool = False
    queueID: str | None = None


@dataclass(frozen=True)
class Discarded:
    """Failures of a message from the null sender that nobody is told of.

    @ivar what: C{"bounce"} (no postmaster configured) or C{"postmaster notification"} (it
        was itself about a failed bounce: never notified again).
    @ivar addresses: the failed recipients.
    """

    what: str
    addresses: tuple[str, ...]


@dataclass(frozen=True)
class Decision:
    """Everything one attempt decides.

    @ivar transitions: one per outcome, in the same order.
    @ivar notices: the notifications owed.
    @ivar nextAttempt: when to try again if a recipient is still pending once the notices
        are committed.
    @ivar delayWarned: the envelope's new C{delayWarned} (whether the delay warning is sent).
    @ivar attempts: the envelope's attempt count, this one included.
    @ivar delay: seconds since the message arrived.
    @ivar discarded: failures nobody will be told of, or C{None}.
    """

    transitions: tuple[Transition, ...]
    notices: tuple[Notice, ...]
    nextAttempt: float
    delayWarned: bool
    attempts: int
    delay: float
    discarded: Discarded | None = None


def isPostmasterNotice(envelope: Envelope) -> bool:
    """Whether C{envelope} is that of a notification sent to the postmaster about a failed
    bounce (see L{mailrelay.queue.dsn.dsnEnvelope}); such a message is never bounced."""
    client = envelope.client
    return envelope.isBounce and client is not None and client.listener == POSTMASTER_SOURCE


def wants(recipient: Recipient, kind: str) -> bool:
    """Whether C{recipient}'s NOTIFY asks for a C{kind} (FAILURE, DELAY, SUCCESS)
    notification; with no NOTIFY, failures and delays are reported."""
    if recipient.notify is None:
        return kind in ("FAILURE", "DELAY")
    return kind in {item.upper() for item in recipient.notify}


def _owesSuccessNotice(envelope: Envelope, outcome: Outcome) -> bool:
    """Whether C{outcome}, a delivery, owes C{envelope}'s sender a success notice: asked
    for (NOTIFY=SUCCESS), and not passed on to a next hop that took the DSN request (that
    one sends it, not us)."""
    return (
        bool(envelope.sender)
        and not outcome.result.dsnRelayed
        and wants(outcome.recipient, "SUCCESS")
    )


def doneEarly(
    envelope: Envelope,
    outcomes: Sequence[Outcome],
    now: float,
    noticeIDs: Mapping[str, str] | None = None,
) -> tuple[Transition, ...]:
    """What C{outcomes}, those of one delivery that ended at C{now} while others of its
    attempt still run, make of the recipients that may be recorded as done at once (as
    Postfix's delivery agents mark each recipient done when its delivery ends): those
    delivered, each with the success notice it owes, if any (made at the attempt's end from
    the mark).  Changes nothing.

    @param noticeIDs: the queue ids the attempt's success notices are to have, by action.
    """
    arrival = envelope.arrival if envelope.arrival is not None else now
    return tuple(
        _transition(envelope, o, now, now - arrival, False, noticeIDs)
        for o in outcomes
        if o.result.status is DeliveryStatus.DELIVERED
    )


def _transition(
    envelope: Envelope,
    outcome: Outcome,
    now: float,
    delay: float,
    expired: bool,
    noticeIDs: Mapping[str, str] | None,
) -> Transition:
    r, result = outcome.recipient, outcome.result
    notice = None
    state, status, finalTime = PENDING, result.code, r.finalTime
    diagnostic, logStatus = result.reason or result.diagnostic, "deferred"
    command = result.command if result.status is not DeliveryStatus.DELIVERED else None
    if command:
        # As Postfix says of a refusal: which command the server's reply answered.
        diagnostic += f" (in reply to {command} command)"
    if result.status is DeliveryStatus.DELIVERED:
        state, finalTime, logStatus = DELIVERED, now, "sent"
        if _owesSuccessNotice(envelope, outcome):
            notice = "delivered" if result.final else "relayed"
    elif result.status is DeliveryStatus.PERMANENT:
        state, finalTime, logStatus = BOUNCED, now, "bounced"
    elif expired:
        # The last reason's status, as Postfix's qmgr returns the defer log (adefer_flush()
        # in qmgr_active.c), not a 4.4.7 of our own: the text says it expired.
        state, finalTime, logStatus = BOUNCED, now, "bounced"
        diagnostic = (
            f"message expired after {delay:.0f}s in the queue; last error: {diagnostic}"
        )
    return Transition(
        recipient=r,
        state=state,
        status=status,
        lastResult=result.diagnostic,
        remoteMTA=result.remoteMTA,
        remoteAddress=result.remoteAddress,
        command=command or None,
        reason=result.reason,
        finalTime=finalTime,
        attempts=r.attempts + 1,
        relay=outcome.relay,
        logStatus=logStatus,
        logDiagnostic=diagnostic,
        backend=outcome.backend,
        tls=result.tls,
        notice=notice,
        noticeID=(noticeIDs or {}).get(notice) if notice else None,
    )


def owedNotices(
    envelope: Envelope, marks: Mapping[int, Transition] | None = None
) -> tuple[Notice, ...]:
    """The success notices owed for C{envelope}'s recipients, from their marks
    (L{Recipient.noticeOwed}, L{Recipient.noticeID}), or those of the transitions C{marks}
    (by the C{id} of their recipient) for the recipients they mark: one per action and
    queue id (an attempt's are one per action; a crash may have left another's)."""
    marks = marks or {}
    owed: dict[tuple[str, str | None], list[Recipient]] = {}
    for r in envelope.recipients:
        t = marks.get(id(r))
        action, noticeID = (t.notice, t.noticeID) if t is not None and t.notice else (
            r.noticeOwed, r.noticeID)
        if action in SUCCESS_ACTIONS:
            owed.setdefault((action, noticeID), []).append(r)
    return tuple(
        Notice(action, tuple(recipients), envelope.sender, queueID=noticeID)
        for (action, noticeID), recipients in sorted(
            owed.items(), key=lambda item: SUCCESS_ACTIONS.index(item[0][0]))
    )


def _toNullSender(
    envelope: Envelope, failed: list[Recipient], policy: QueuePolicy
) -> tuple[tuple[Notice, ...], Discarded | None]:
    """A message from the null sender notifies nobody; a failed bounce goes to the
    postmaster, once (a failed postmaster notice is dropped)."""
    if not failed:
        return (), None
    addresses = tuple(r.address for r in failed)
    if isPostmasterNotice(envelope) or (
        policy.postmaster is not None
        and envelope.isBounce
        and all(r.address == policy.postmaster for r in envelope.recipients)
    ):
        return (), Discarded("postmaster notification", addresses)
    if policy.postmaster is None:
        return (), Discarded("bounce", addresses)
    return (Notice("failed", tuple(failed), policy.postmaster, postmaster=True),), None


def decide(
    envelope: Envelope,
    outcomes: Sequence[Outcome],
    policy: QueuePolicy,
    now: float,
    early: Mapping[int, Transition] | None = None,
    noticeIDs: Mapping[str, str] | None = None,
) -> Decision:
    """What the attempt that gave C{outcomes} (one per recipient tried) at time C{now}
    means for C{envelope}.  Changes nothing.

    @param early: the transitions of the recipients recorded as done while the attempt ran
        (L{doneEarly}), by the C{id} of their recipient: kept as they were made.
    @param noticeIDs: the queue ids the attempt's success notices are to have, by action
        (see L{Notice.queueID}).
    """
    arrival = envelope.arrival if envelope.arrival is not None else now
    delay = now - arrival
    expired = delay >= policy.lifetime(envelope.sender)
    early = early or {}
    transitions = tuple(
        early.get(id(o.recipient)) or _transition(envelope, o, now, delay, expired, noticeIDs)
        for o in outcomes
    )
    newState = {id(t.recipient): t.state for t in transitions}
    pending = [r for r in envelope.recipients if newState.get(id(r), r.state) == PENDING]
    failed = [t.recipient for t in transitions if t.state == BOUNCED]
    warnNow = (
        policy.delayWarning > 0
        and not envelope.delayWarned
        and bool(pending)
        and delay >= policy.delayWarning
    )
    discarded = None
    if envelope.sender:
        owed = (
            ("failed", [r for r in failed if wants(r, "FAILURE")]),
            ("delayed", [r for r in pending if wants(r, "DELAY")] if warnNow else []),
        )
        notices = tuple(
            Notice(action, tuple(recipients), envelope.sender)
            for action, recipients in owed
            if recipients
        ) + owedNotices(envelope, {id(t.recipient): t for t in transitions})
    else:
        notices, discarded = _toNullSender(envelope, failed, policy)
    attempts = envelope.attempts + 1
    # (As Postfix's qmgr takes its active queue again at once when it starts: the stop, not
    # the next hop, ended the attempt of these.)
    stopped = any(o.stopped and newState[id(o.recipient)] == PENDING for o in outcomes)
    return Decision(
        transitions=transitions,
        notices=notices,
        nextAttempt=now if stopped else now + backoff(policy, delay),
        delayWarned=envelope.delayWarned or warnNow,
        attempts=attempts,
        delay=delay,
        discarded=discarded,
    )


def apply(envelope: Envelope, decision: Decision) -> None:
    """Write C{decision}'s transitions, attempt count and delay warning into C{envelope}
    (in memory: recording it is the caller's)."""
    envelope.attempts = decision.attempts
    envelope.delayWarned = decision.delayWarned
    for t in decision.transitions:
        applyTo(t.recipient, t)


def applyTo(r: Recipient, t: Transition) -> None:
    """Write the transition C{t} into the recipient C{r} (its own, or a copy's)."""
    r.state, r.status, r.lastResult = t.state, t.status, t.lastResult
    r.remoteMTA, r.finalTime, r.attempts = t.remoteMTA, t.finalTime, t.attempts
    r.remoteAddress, r.command = t.remoteAddress, t.command
    r.reason = t.reason
    if t.notice is not None:
        r.noticeOwed, r.noticeID = t.notice, t.noticeID
