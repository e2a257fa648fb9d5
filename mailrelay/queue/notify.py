"""Committing the notifications an attempt owes (L{mailrelay.queue.outcome.Notice}), before
the envelope they report on is recorded.

Each notification enters the spool through the intake (L{IIntake.submit}), as mail with no
client: the header stampers see it (and add its C{Received:}, C{Message-Id:} and C{Date:}),
the intake commits it, logs its C{from=<>} line and tells the queue manager, which delivers
it like any new entry.

A notice that cannot be committed is undone in the envelope, so that it is owed again at the
next attempt: its bounced recipients go back to pending, a delay warning is not marked as
sent, and a success report's recipients keep their marks: they stay delivered, never sent
again, and the entry stays queued until the report is committed.  (Postfix's sent() defers
the recipient when its trace record fails, global/sent.c, and so delivers it again.)

A success notice is made from its recipients' marks (L{Recipient.noticeOwed}), recorded with
their delivery, under the queue id they name, and its recipients' marks are cleared (the
caller records that).  So it is queued once: made again after a crash (the marks still
recorded), it is found queued under that id; and it is not delivered until the marks naming
it are cleared in the spool (see L{Envelope.noticeOf}): the caller enqueues it then.
"""

from __future__ import annotations

from collections.abc import Sequence

from twisted.internet.defer import Deferred
from twisted.logger import Logger

from mailrelay.envelope import PENDING, Envelope
from mailrelay.errors import CorruptEntry, EntryGone
from mailrelay.interfaces import IIntake, ISpool
from mailrelay.metrics import DSNS, countNow
from mailrelay.queue.dsn import buildDSN, dsnEnvelope
from mailrelay.queue.outcome import SUCCESS_ACTIONS, Discarded, Notice
from mailrelay.queue.policy import QueuePolicy

log = Logger(namespace="mailrelay.queue")

__all__ = ["Notifier"]

_KINDS = {
    "failed": "non-delivery notification",
    "delayed": "delay notification",
    "delivered": "delivery status notification",
    "relayed": "delivery status notification",
}


class Notifier:
    """Builds notifications and submits them to the intake."""

    def __init__(
        self,
        spool: ISpool,
        policy: QueuePolicy,
        *,
        hostname: str,
        intake: IIntake,
    ) -> None:
        """
        @param spool: the spool of the messages reported on (their returned content).
        @param hostname: this relay's host name, for the notifications.
        @param intake: the L{IIntake} notifications enter the spool through; it tells the
            queue manager of each one committed.
        """
        self.spool = spool
        self.policy = policy
        self.hostname = hostname
        self.intake = intake

    async def notify(
        self,
        queueID: str,
        envelope: Envelope,
        notices: Sequence[Notice],
        discarded: Discarded | None,
        now: float,
    ) -> list[str]:
        """Commit every notice (all at once) about the message C{queueID}; undo in
        C{envelope} what a notice that failed reported on, and clear the marks of the
        success notices' recipients.  Log the C{discarded} failures.  Return the queue ids
        of the success notices queued under the id their marks named (now, or before a
        crash), for the caller to enqueue once it has recorded the marks cleared."""
        if discarded is not None:
            log.warn(
                "{queueID}: undeliverable {what} discarded (to {addresses})",
                queueID=queueID,
                what=discarded.what,
                addresses=", ".join(f"<{a}>" for a in discarded.addresses),
            )
        commits = [
            Deferred.fromCoroutine(self._commit(queueID, envelope, notice, now))
            for notice in notices
        ]
        queued = []
        for notice, d in zip(notices, commits, strict=True):
            dsnID = await d
            if notice.action in SUCCESS_ACTIONS and dsnID is not None:
                for r in notice.recipients:
                    r.noticeOwed = r.noticeID = None
                if notice.queueID is not None:
                    queued.append(dsnID)
            if dsnID is None:
                self._undo(queueID, envelope, notice)
        return queued

    @staticmethod
    def _undo(queueID: str, envelope: Envelope, notice: Notice) -> None:
        if notice.action == "failed":
            for r in notice.recipients:
                r.state = PENDING
                r.finalTime = None
            log.warn(
                "{queueID}: bounce not queued; {count} recipient(s) stay queued and will be "
                "retried",
                queueID=queueID,
                count=len(notice.recipients),
            )
        elif notice.action == "delayed":
            envelope.delayWarned = False
        elif notice.action in SUCCESS_ACTIONS:
            # (The marks stay, recorded: the entry stays queued for them alone.)
            log.warn(
                "{queueID}: delivery status notification to <{to}> not queued; owed for "
                "{addresses}, queued at the next attempt (the message is not delivered again)",
                queueID=queueID,
                to=notice.to,
                addresses=", ".join(f"<{r.address}>" for r in notice.recipients),
            )

    async def _commit(
        self, queueID: str, envelope: Envelope, notice: Notice, now: float
    ) -> str | None:
        """Build one notification and submit it; its queue id, or C{None} on failure."""
        policy = self.policy
        arrival = envelope.arrival if envelope.arrival is not None else now
        kind = _KINDS[notice.action]
        who = "postmaster" if notice.postmaster else "sender"
        try:
            if notice.queueID is not None and self._queued(notice.queueID):
                log.info(
                    "{queueID}: {who} {kind}: {dsnID} (queued before the queue manager "
                    "stopped: not queued again)",
                    queueID=queueID,
                    who=who,
                    kind=kind,
                    dsnID=notice.queueID,
                )
                return notice.queueID
            message = buildDSN(
                envelope,
                notice.recipients,
                notice.action,
                hostname=self.hostname,
                messagePath=self.spool.messagePath(queueID),
                now=now,
                queueID=queueID,
                maxOriginal=policy.bounceSizeLimit,
                willRetryUntil=arrival + policy.lifetime(envelope.sender),
                to=notice.to,
            )
            dsn = dsnEnvelope(
                envelope,
                to=notice.to,
                now=now,
                hostname=self.hostname,
                message=message,
                postmasterNotice=notice.postmaster,
                noticeOf=None if notice.queueID is None else queueID,
            )
            dsnID = str(
                await self.intake.submit(
                    dsn, message, notify=notice.queueID is None, queueID=notice.queueID
                )
            )
        except Exception as e:  # MessageRefused (logged by the intake), or a bug
            log.error(
                "{queueID}: queueing the {action} notification to <{to}> failed: {error}",
                queueID=queueID,
                action=notice.action,
                to=notice.to,
                error=str(e) or repr(e),
            )
            return None
        countNow(DSNS, notice.action)
        log.info(
            "{queueID}: {who} {kind}: {dsnID}", queueID=queueID, who=who, kind=kind, dsnID=dsnID
        )
        return dsnID

    def _queued(self, dsnID: str) -> bool:
        """Whether the notice C{dsnID} is in the spool (damaged or not)."""
        try:
            self.spool.loadEnvelope(dsnID)
        except EntryGone:
            return False
        except CorruptEntry:
            pass  # (there, but damaged: moved aside when its turn comes)
        return True
