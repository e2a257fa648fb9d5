"""A spool kept in memory, for tests: the whole L{ISpool}, with failures and slow commits on
demand.  Entries are copies (an envelope is stored as its JSON form, as on disk), so what a
test changes in an envelope is not stored until it is committed or updated."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from twisted.internet.defer import Deferred, fail, succeed
from zope.interface import implementer

from mailrelay.envelope import Envelope
from mailrelay.errors import EntryGone, SpoolError
from mailrelay.interfaces import IMessageWriter, ISpool
from mailrelay.spool.ids import isQueueID, newQueueID

__all__ = ["MemorySpool"]


def _copy(envelope: Envelope) -> Envelope:
    return Envelope.fromJSON(envelope.toJSON())


@implementer(IMessageWriter)
@dataclass
class _MemoryWriter:
    spool: MemorySpool
    queueID: str
    chunks: list[bytes] = field(default_factory=list)
    size: int = 0
    aborted: bool = False
    done: bool = False

    def write(self, data: bytes) -> None:
        if self.done or self.aborted:
            return
        self.chunks.append(data)
        self.size += len(data)

    def abort(self) -> None:
        if self.done:
            return
        self.aborted = True
        self.spool.open.pop(self.queueID, None)

    def read(self) -> bytes:
        return b"".join(self.chunks)

    def commit(self, envelope: Envelope) -> Deferred[None]:
        self.spool.open.pop(self.queueID, None)
        if self.done or self.aborted:
            return fail(SpoolError(f"cannot commit message {self.queueID}: it is closed"))
        self.done = True
        if envelope.queueID != self.queueID:
            return fail(
                SpoolError(
                    f"cannot commit message {self.queueID}: envelope queue id "
                    f"{envelope.queueID!r} is not {self.queueID!r}",
                    queueID=self.queueID,
                )
            )
        if self.spool.failCommits:
            return fail(SpoolError("injected commit failure", queueID=self.queueID))
        envelope.messageSize = self.size
        if self.spool.holdCommits:
            d: Deferred[None] = Deferred()
            self.spool.held.append((d, self, _copy(envelope)))
            return d
        self.spool.committed[self.queueID] = (_copy(envelope), b"".join(self.chunks))
        return succeed(None)


@implementer(ISpool)
class MemorySpool:
    """The spool kept in memory.

    @ivar committed: queue id to C{(envelope, message bytes)}, in commit order.
    @ivar open: queue ids being written.
    @ivar quarantined: queue id to C{(envelope, message bytes, problem)} of the entries moved
        aside by L{quarantine}.
    @ivar failCommits: make every commit fail (to test 451 replies).
    @ivar holdCommits: keep commits pending in C{held} until released with L{release}.
    @ivar freeSpace: what L{hasFreeSpace} compares against.
    @ivar directory: where L{messagePath} writes a message for a backend to read, or C{None}.
    """

    def __init__(self, directory: Path | None = None) -> None:
        self.committed: dict[str, tuple[Envelope, bytes]] = {}
        self.open: dict[str, _MemoryWriter] = {}
        self.quarantined: dict[str, tuple[Envelope, bytes, str]] = {}
        self.failCommits = False
        self.holdCommits = False
        self.held: list[tuple[Deferred[None], _MemoryWriter, Envelope]] = []
        self.freeSpace = 1 << 40
        self.minFreeSpace = 0
        self.directory = Path(directory) if directory is not None else None

    def hasFreeSpace(self, needed: int = 0) -> bool:
        return self.freeSpace - needed >= self.minFreeSpace

    def newQueueID(self) -> str:
        """A new queue id (see L{ISpool.newQueueID})."""
        return newQueueID()

    def openMessage(self, queueID: str | None = None) -> _MemoryWriter:
        if queueID is None:
            queueID = newQueueID()
        self._checkID(queueID)
        if queueID in self.committed or queueID in self.open:
            raise SpoolError(f"creating message {queueID} failed: it exists", queueID=queueID)
        writer = _MemoryWriter(self, queueID)
        self.open[queueID] = writer
        return writer

    def release(self) -> None:
        """Let every held commit complete."""
        held, self.held = self.held, []
        for d, writer, envelope in held:
            self.committed[writer.queueID] = (envelope, b"".join(writer.chunks))
            d.callback(None)

    def messages(self) -> list[bytes]:
        """The committed messages, in commit order."""
        return [body for _, body in self.committed.values()]

    # -- what the queue manager uses ------------------------------------------------------------

    @staticmethod
    def _checkID(queueID: str) -> None:
        if not isinstance(queueID, str) or not isQueueID(queueID):
            raise ValueError(f"not a queue id: {queueID!r}")

    def _entry(self, queueID: str) -> tuple[Envelope, bytes]:
        self._checkID(queueID)
        try:
            return self.committed[queueID]
        except KeyError:
            raise EntryGone(f"no queue entry {queueID}", queueID=queueID) from None

    def queueIDs(self) -> list[str]:
        return sorted(self.committed)

    def messagePath(self, queueID: str) -> Path:
        """The message written to C{directory/<ID>.eml} (each call writes it again).

        @raise SpoolError: the spool has no C{directory}, or there is no such entry.
        """
        _, message = self._entry(queueID)
        if self.directory is None:
            raise SpoolError("this MemorySpool has no directory to write messages to")
        self.directory.mkdir(parents=True, exist_ok=True)
        path = self.directory / f"{queueID}.eml"
        path.write_bytes(message)
        return path

    def loadEnvelope(self, queueID: str) -> Envelope:
        return _copy(self._entry(queueID)[0])

    def updateEnvelope(self, envelope: Envelope) -> Deferred[None]:
        queueID = envelope.queueID
        if queueID is None or queueID not in self.committed:
            return fail(EntryGone(f"no queue entry {queueID}", queueID=queueID))
        self.committed[queueID] = (_copy(envelope), self.committed[queueID][1])
        return succeed(None)

    def remove(self, queueID: str) -> Deferred[None]:
        self._checkID(queueID)
        self.committed.pop(queueID, None)
        if self.directory is not None:
            (self.directory / f"{queueID}.eml").unlink(missing_ok=True)
        return succeed(None)

    def quarantine(self, queueID: str, problem: str) -> Deferred[list[Path]]:
        try:
            envelope, message = self._entry(queueID)
        except SpoolError as e:
            return fail(e)
        del self.committed[queueID]
        self.quarantined[queueID] = (envelope, message, problem)
        return succeed([])
