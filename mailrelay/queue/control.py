"""The operator's view of the queue and commands on it (C{mailrelay queue ...}): what
Postfix's C{postqueue}, C{postsuper}, C{postcat} and C{qshape} do.

L{QueueControl} answers in plain JSON-able values (what the control channel carries,
L{mailrelay.queue.commands}).  It reads the spool through L{ISpool} (envelopes are read in a
thread, so that a long queue does not stall deliveries) and changes it only through the
queue manager's own commands (L{QueueManager.hold} ...), never behind its back.  Without a
queue manager (C{[queue] hold = true}, or in the relay's process while the delivery process
owns the queue) it can still list, show and summarise the queue; the commands that change it
raise L{QueueUnavailable} with the reason.

Each queued message is in one of Postfix's queues, by C{queue_name}:

  - C{active}: its delivery attempt (or a command on it) is in progress;
  - C{hold}: the operator put it on hold (C{held} in its envelope);
  - C{deferred}: an attempt failed for at least one recipient; it waits for the next;
  - C{incoming}: not attempted yet;
  - C{corrupt}: its files cannot be read (the queue manager moves it aside when it comes
    to it).
"""

from __future__ import annotations

import os
from bisect import bisect_right
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from typing import Any

from twisted.internet.defer import Deferred, DeferredLock, maybeDeferred
from twisted.internet.interfaces import IReactorTime
from twisted.logger import Logger
from twisted.python.failure import Failure

from mailrelay.envelope import PENDING, Envelope
from mailrelay.errors import CorruptEntry, EntryGone, SpoolError
from mailrelay.interfaces import ISpool
from mailrelay.queue.manager import QueueManager, QueueUnavailable

log = Logger(namespace="mailrelay.queue")

__all__ = [
    "AGE_BUCKETS",
    "QUEUE_NAMES",
    "BadRequest",
    "QueueControl",
    "QueueUnavailable",
    "UnknownEntry",
    "entryInfo",
    "queueName",
]

#: The queues a message can be in, in the order they are reported.
QUEUE_NAMES = ("active", "incoming", "deferred", "hold", "corrupt")

#: The upper bounds, in minutes, of the age columns of L{QueueControl.summary} (C{qshape}'s);
#: a last column counts the older ones.
AGE_BUCKETS = (5, 10, 20, 40, 80, 160, 320, 640, 1280)

#: The most octets of a message's header section (and of its body) L{QueueControl.show}
#: returns.
SHOW_LIMIT = 1024 * 1024

#: Commands on many entries run this many at once (so that their envelope updates share the
#: spool's group commits).
_CONCURRENCY = 64

#: How long, in seconds, the sorted queue ids the first page of a listing took are used for
#: its next pages (L{QueueControl.entries}).
LIST_SNAPSHOT_TTL = 60.0

#: The envelopes read at a time by the views of the whole queue (L{QueueControl._scan}).
_SCAN_CHUNK = 500


class UnknownEntry(Exception):
    """There is no queue entry of that id (or it is not a queue id)."""


class BadRequest(Exception):
    """A command's arguments make no sense (the message says why)."""


class NotPermitted(Exception):
    """The user asking may not run the command (the message says who may)."""


def queueName(envelope: Envelope, active: bool) -> str:
    """The queue a message is in (see the module's docstring)."""
    if active:
        return "active"
    if envelope.held:
        return "hold"
    return "deferred" if envelope.attempts else "incoming"


def _seconds(value: float | None) -> int | None:
    return None if value is None else int(value)


def entryInfo(queueID: str, envelope: Envelope, active: bool) -> dict[str, Any]:
    """One queued message as C{mailrelay queue list --json} shows it: the fields of Postfix's
    C{postqueue -j} (C{queue_name}, C{queue_id}, C{arrival_time}, C{message_size}, C{sender},
    C{recipients} with C{address} and C{delay_reason}) and mailrelay's own (C{attempts},
    C{next_attempt}; each recipient's C{state}, C{status} and C{attempts}).  Every recipient
    is listed, with its state (C{pending}, C{delivered}, C{bounced})."""
    recipients = []
    for r in envelope.recipients:
        item: dict[str, Any] = {
            "address": r.address,
            "state": r.state,
            "status": r.status,
            "attempts": r.attempts,
        }
        if r.lastResult is not None:
            item["delay_reason"] = r.reason or r.lastResult
        recipients.append(item)
    return {
        "queue_name": queueName(envelope, active),
        "queue_id": queueID,
        "arrival_time": _seconds(envelope.arrival),
        "message_size": envelope.messageSize,
        "sender": envelope.sender,
        "attempts": envelope.attempts,
        "next_attempt": _seconds(envelope.nextAttempt),
        "recipients": recipients,
    }


def _failed(queueID: str, text: str) -> dict[str, Any]:
    return {"queue_id": queueID, "ok": False, "changed": False, "result": text}


def _corruptInfo(queueID: str, error: Exception) -> dict[str, Any]:
    return {"queue_name": "corrupt", "queue_id": queueID, "error": str(error)}


def _readPart(path: Any, body: bool) -> dict[str, Any]:
    """The header section of the message file C{path} (and its body, with C{body}), each at
    most L{SHOW_LIMIT} octets, decoded as UTF-8 (bad octets replaced)."""
    with open(path, "rb") as f:
        data = f.read(SHOW_LIMIT + 4)
        end = data.find(b"\r\n\r\n")
        headers = data if end < 0 else data[: end + 2]
        result: dict[str, Any] = {
            "headers": headers[:SHOW_LIMIT].decode("utf-8", "replace"),
            "headers_truncated": end < 0 and len(data) > SHOW_LIMIT,
        }
        if body:
            if end < 0:
                content = b""
            else:
                f.seek(end + 4)
                content = f.read(SHOW_LIMIT + 1)
            result["body"] = content[:SHOW_LIMIT].decode("utf-8", "replace")
            result["body_truncated"] = len(content) > SHOW_LIMIT
    return result


class QueueControl:
    """The queue as the operator sees it, and the commands on it.

    @ivar spool: the L{ISpool} of the queue.
    @ivar manager: the L{QueueManager} delivering from it, or C{None} when none runs here.
    """

    def __init__(
        self,
        spool: ISpool,
        manager: QueueManager | None,
        clock: IReactorTime,
        *,
        deferToThread: Callable[..., Deferred[Any]] | None = None,
        unavailable: str = "no queue manager runs",
    ) -> None:
        """
        @param clock: gives the time the ages are counted to.
        @param deferToThread: C{f(*args)} in a thread (the reactor's pool), as a L{Deferred}
            fired in the reactor thread; by default C{f} is called at once.
        @param unavailable: why the queue cannot be changed, when C{manager} is C{None}.
        """
        self.spool = spool
        self.manager = manager
        self.clock = clock
        self._deferToThread = deferToThread or maybeDeferred
        self.unavailable = unavailable
        #: Commands that change the queue run one at a time.
        self._lock = DeferredLock()
        #: When the queue ids the pages of a listing are served from were listed, and they
        #: (sorted), or C{None} (L{entries}).
        self._snapshot: tuple[float, list[str]] | None = None

    # -- reading ------------------------------------------------------------------------------

    def _isActive(self, queueID: str) -> bool:
        return self.manager is not None and self.manager.isActive(queueID)

    def _loadAll(self, queueIDs: Sequence[str]) -> list[tuple[str, Envelope | Exception]]:
        """(In a thread.)  Each entry's envelope, or why it cannot be read; entries gone
        meanwhile are left out."""
        loaded: list[tuple[str, Envelope | Exception]] = []
        for queueID in queueIDs:
            try:
                loaded.append((queueID, self.spool.loadEnvelope(queueID)))
            except EntryGone:
                continue
            except (SpoolError, ValueError) as e:
                loaded.append((queueID, e))
        return loaded

    async def _scan(self) -> AsyncIterator[tuple[str, Envelope | Exception]]:
        """Every entry's envelope (or why it cannot be read), oldest first, read in a
        thread C{_SCAN_CHUNK} at a time, each chunk looked at before the next is read: a
        large queue is never in memory all at once (as Postfix's tools read a queue file at
        a time)."""
        queueIDs = await self._deferToThread(self.spool.queueIDs)
        for start in range(0, len(queueIDs), _SCAN_CHUNK):
            chunk = queueIDs[start : start + _SCAN_CHUNK]
            for item in self._current(await self._deferToThread(self._loadAll, chunk)):
                yield item

    def _current(
        self, loaded: list[tuple[str, Envelope | Exception]]
    ) -> list[tuple[str, Envelope | Exception]]:
        """C{loaded}, its envelopes moved by the steps of the clock the queue manager has
        not written to the spool yet (L{QueueManager.withUnwrittenSteps})."""
        if self.manager is not None:
            for queueID, envelope in loaded:
                if not isinstance(envelope, Exception):
                    self.manager.withUnwrittenSteps(queueID, envelope)
        return loaded

    def _info(self, queueID: str, loaded: Envelope | Exception) -> dict[str, Any]:
        if isinstance(loaded, Exception):
            return _corruptInfo(queueID, loaded)
        return entryInfo(queueID, loaded, self._isActive(queueID))

    async def entries(self, cursor: str | None = None, limit: int = 200) -> dict[str, Any]:
        """A page of the queue, oldest first: C{{"entries": [...], "next": cursor}} with
        the L{entryInfo} of at most C{limit} entries after C{cursor} (a queue id; C{None}:
        from the start); C{next} is the cursor of the next page, or C{None} after the last."""
        if limit < 1:
            raise BadRequest(f"limit must be at least 1, not {limit}")

        snapshot = self._snapshot
        now = self.clock.seconds()
        if cursor is None or snapshot is None or now - snapshot[0] > LIST_SNAPSHOT_TTL:
            snapshot = None

        def page() -> tuple[list[str], list[tuple[str, Envelope | Exception]], str | None]:
            # The first page lists the spool directory; the next are served from that
            # listing (as Postfix's showq reads each queue directory once): an entry removed
            # meanwhile is skipped, one added meanwhile not shown.
            ids = self.spool.queueIDs() if snapshot is None else snapshot[1]
            start = 0 if cursor is None else bisect_right(ids, cursor)
            following = ids[start + limit - 1] if len(ids) - start > limit else None
            return ids, self._loadAll(ids[start : start + limit]), following

        ids, loaded, following = await self._deferToThread(page)
        # One snapshot at most, dropped after the last page or LIST_SNAPSHOT_TTL.
        if following is None:
            self._snapshot = None
        elif snapshot is None:
            self._snapshot = (now, ids)
        return {
            "entries": [self._info(queueID, item) for queueID, item in self._current(loaded)],
            "next": following,
        }

    async def show(self, queueID: str, body: bool = False) -> dict[str, Any]:
        """One entry (as C{postcat -q}): C{entry} (its L{entryInfo}), C{envelope} (all of
        it: the client, each recipient's original address, NOTIFY, ORCPT, remote MTA...),
        C{headers} (the message's header section) and, with C{body}, C{body}.

        @raise UnknownEntry: there is no such entry.
        """

        def read() -> tuple[Envelope, dict[str, Any]]:
            envelope = self.spool.loadEnvelope(queueID)
            return envelope, _readPart(self.spool.messagePath(queueID), body)

        try:
            envelope, parts = await self._deferToThread(read)
        except (EntryGone, FileNotFoundError):
            raise UnknownEntry(f"no queue entry {queueID}") from None
        except ValueError as e:
            raise UnknownEntry(str(e)) from None
        except OSError as e:
            raise SpoolError(f"cannot read {queueID}: {e.strerror or e}", queueID=queueID) from e
        if self.manager is not None:
            self.manager.withUnwrittenSteps(queueID, envelope)
        return {
            "entry": entryInfo(queueID, envelope, self._isActive(queueID)),
            "envelope": envelope.toDict(),
            **parts,
        }

    async def summary(
        self, senders: bool = False, states: Sequence[str] = ()
    ) -> dict[str, Any]:
        """The shape of the queue (as C{qshape}): for each destination domain (or sender
        domain, with C{senders}), how many messages are queued for it, in total and by age
        (minutes since arrival, in the columns of L{AGE_BUCKETS}).  A message counts once
        for each domain it has a recipient still pending in.

        @param states: only the messages in these queues (L{QUEUE_NAMES}); all by default.
        @return: C{{"labels": ["T", "5", ..., "1280+"], "total": [...], "rows": [[domain,
            T, ...], ...]}}, the busiest domains first.
        """
        unknown = [s for s in states if s not in QUEUE_NAMES]
        if unknown:
            raise BadRequest(
                f"unknown queue {unknown[0]!r}; the queues are: {', '.join(QUEUE_NAMES)}"
            )
        now = self.clock.seconds()
        width = len(AGE_BUCKETS) + 1
        total = [0] * (width + 1)
        rows: dict[str, list[int]] = {}
        async for queueID, envelope in self._scan():
            if isinstance(envelope, Exception):
                continue
            if states and queueName(envelope, self._isActive(queueID)) not in states:
                continue
            age = (now - envelope.arrival) / 60 if envelope.arrival is not None else 0.0
            column = 1 + next((i for i, b in enumerate(AGE_BUCKETS) if age <= b), width - 1)
            if senders:
                domains = {envelope.sender.rpartition("@")[2].lower() or "MAILER-DAEMON"}
            else:
                domains = {r.domain.lower() for r in envelope.pendingRecipients}
            if not domains:
                continue
            for counts in [total, *(rows.setdefault(d, [0] * (width + 1)) for d in domains)]:
                counts[0] += 1
                counts[column] += 1
        labels = ["T", *(str(b) for b in AGE_BUCKETS), f"{AGE_BUCKETS[-1]}+"]
        ordered = sorted(rows.items(), key=lambda item: (-item[1][0], item[0]))
        return {"labels": labels, "total": total, "rows": [[d, *c] for d, c in ordered]}

    async def status(self) -> dict[str, Any]:
        """How the queue is: C{manager} (what the queue manager does: C{running}, C{waiting
        for the queue lock}, ... or why none runs), C{pid} (of the process it runs in),
        C{messages} (queued), C{recipients} (still pending) and C{queues} (messages by
        queue, L{QUEUE_NAMES})."""
        queues = dict.fromkeys(QUEUE_NAMES, 0)
        recipients = messages = 0
        async for queueID, envelope in self._scan():
            messages += 1
            if isinstance(envelope, Exception):
                queues["corrupt"] += 1
                continue
            queues[queueName(envelope, self._isActive(queueID))] += 1
            recipients += sum(1 for r in envelope.recipients if r.state == PENDING)
        manager = self.manager
        return {
            "manager": manager.state() if manager is not None else self.unavailable,
            "pid": os.getpid(),
            "messages": messages,
            "recipients": recipients,
            "queues": queues,
        }

    # -- changing ----------------------------------------------------------------------------

    def _ready(self) -> QueueManager:
        if self.manager is None:
            raise QueueUnavailable(self.unavailable)
        self.manager.checkReady()
        return self.manager

    async def _serially(self, work: Callable[[], Awaitable[Any]]) -> Any:
        """Run C{work} when no other command that changes the queue runs."""
        await self._lock.acquire()
        try:
            return await work()
        finally:
            self._lock.release()

    async def _each(
        self, queueIDs: Sequence[str], command: Callable[[str], Any]
    ) -> dict[str, Any]:
        """Run C{command(queueID)} (a L{Done}, or a Deferred or coroutine of one) for each
        id, C{_CONCURRENCY} at once, in order; C{{"results": [{"queue_id", "ok", "changed",
        "result"}, ...], "count": the number changed}}.  An id given more than once is taken
        once (as C{postsuper}: not a second command on it while the first runs).  An unknown
        id, or a failure, is a result that is not ok; the queue manager becoming unavailable
        stops everything: the commands in flight end, no other starts, and it is raised."""
        queueIDs = list(dict.fromkeys(queueIDs))

        async def one(queueID: str) -> dict[str, Any]:
            try:
                done = await Deferred.fromCoroutine(_awaited(command(queueID)))
            except EntryGone:
                return _failed(queueID, "no such queue entry")
            except CorruptEntry as e:  # (moved aside by the queue manager)
                return _failed(queueID, f"damaged: {e}; moved to the spool's corrupt/")
            except ValueError as e:
                return _failed(queueID, str(e))
            except QueueUnavailable:
                raise
            except Exception as e:
                log.failure(
                    "{queueID}: the operator's command failed",
                    Failure(),
                    queueID=queueID,
                )
                return _failed(queueID, f"failed: {e}")
            return {"queue_id": queueID, "ok": True, "changed": done.changed, "result": done.text}

        # A few workers taking the ids in turn: a coroutine per id, started up front, would
        # hold tens of MiB for a queue of 50,000 while they wait.
        results: list[dict[str, Any]] = [{}] * len(queueIDs)
        todo = iter(enumerate(queueIDs))
        failures: list[QueueUnavailable] = []

        async def worker() -> None:
            for index, queueID in todo:
                if failures:
                    return
                try:
                    results[index] = await one(queueID)
                except QueueUnavailable as e:
                    failures.append(e)

        workers = [Deferred.fromCoroutine(worker()) for _ in range(_CONCURRENCY)]
        for d in workers:
            await d
        if failures:
            raise failures[0]
        return {"results": results, "count": sum(1 for r in results if r["changed"])}

    async def _matching(self, predicate: Callable[[str, Envelope], bool]) -> list[str]:
        """The queue ids of the readable entries C{predicate(queueID, envelope)} accepts."""
        return [
            queueID
            async for queueID, envelope in self._scan()
            if not isinstance(envelope, Exception) and predicate(queueID, envelope)
        ]

    def _ids(self, queueIDs: Sequence[str], everything: bool, what: str) -> None:
        if everything and queueIDs:
            raise BadRequest(f"give queue ids or {what}, not both")
        if not everything and not queueIDs:
            raise BadRequest(f"give one or more queue ids, or {what}")

    async def hold(self, ids: Sequence[str] = (), all_entries: bool = False) -> dict[str, Any]:
        """Put the entries C{ids} (or, with C{all_entries}, every entry) on hold (as
        C{postsuper -h})."""
        self._ids(ids, all_entries, "--all")
        manager = self._ready()

        async def work() -> dict[str, Any]:
            queueIDs = list(ids) if ids else self.spool.queueIDs()
            return await self._each(queueIDs, manager.hold)

        return await self._serially(work)

    async def release(
        self, ids: Sequence[str] = (), all_entries: bool = False
    ) -> dict[str, Any]:
        """Release the entries C{ids} (or, with C{all_entries}, every entry on hold) from
        hold (as C{postsuper -H})."""
        self._ids(ids, all_entries, "--all")
        manager = self._ready()

        async def work() -> dict[str, Any]:
            queueIDs = list(ids) or await self._matching(lambda _, e: e.held)
            return await self._each(queueIDs, manager.release)

        return await self._serially(work)

    async def flush(self, ids: Sequence[str] = (), domain: str | None = None) -> dict[str, Any]:
        """Attempt the entries C{ids} now; or those with a recipient still pending in
        C{domain} (as C{postqueue -s}); or, with neither, every entry not on hold (as
        C{postqueue -f}: the result then has C{count} only).  The entries' own suspended
        next hops are tried again; with C{domain} or neither, every suspended next hop, once
        (not once per entry: see L{QueueManager.flushAll})."""
        if ids and domain:
            raise BadRequest("give queue ids or --domain, not both")
        manager = self._ready()

        async def work() -> dict[str, Any]:
            if ids:
                return await self._each(ids, manager.flush)
            if domain is None:
                return {"results": [], "count": manager.flushAll()}
            manager.resumeSuspended()  # (as postqueue -s: every dead destination)
            wanted = domain.lower().rstrip(".")
            queueIDs = await self._matching(
                lambda _, e: any(r.domain.lower() == wanted for r in e.pendingRecipients)
            )
            return await self._each(
                queueIDs, lambda q: manager.flush(q, check=False, resume=False)
            )

        return await self._serially(work)

    async def delete(
        self, ids: Sequence[str] = (), all_deferred: bool = False
    ) -> dict[str, Any]:
        """Delete the entries C{ids} (or, with C{all_deferred}, every entry in the deferred
        queue) without delivering or reporting them (as C{postsuper -d})."""
        self._ids(ids, all_deferred, "--all-deferred")
        manager = self._ready()

        async def work() -> dict[str, Any]:
            queueIDs = list(ids) or await self._matching(
                lambda q, e: queueName(e, self._isActive(q)) == "deferred"
            )
            return await self._each(queueIDs, manager.delete)

        return await self._serially(work)

    async def bounce(self, ids: Sequence[str] = ()) -> dict[str, Any]:
        """Return the entries C{ids} to their senders now, with a notification (see
        L{QueueManager.bounce})."""
        if not ids:
            raise BadRequest("give one or more queue ids")
        manager = self._ready()
        return await self._serially(lambda: self._each(ids, manager.bounce))


async def _awaited(value: Any) -> Any:
    """The result of C{value}, awaited if it is a Deferred or a coroutine."""
    if isinstance(value, Deferred) or hasattr(value, "__await__"):
        return await value
    return value
