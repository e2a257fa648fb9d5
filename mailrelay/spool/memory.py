"""A spool kept in memory, for tests: what the SMTP server side uses of the spool
(C{openMessage}, C{hasFreeSpace}), with failures and slow commits on demand."""

from __future__ import annotations

from dataclasses import dataclass, field

from twisted.internet.defer import Deferred, fail, succeed

from mailrelay.envelope import Envelope


class _MemorySpoolError(Exception):
    pass


@dataclass
class _MemoryWriter:
    spool: "MemorySpool"
    queueID: str
    chunks: list[bytes] = field(default_factory=list)
    size: int = 0
    aborted: bool = False

    def write(self, data: bytes) -> None:
        self.chunks.append(data)
        self.size += len(data)

    def abort(self) -> None:
        self.aborted = True
        self.spool.open.pop(self.queueID, None)

    def commit(self, envelope: Envelope) -> Deferred:
        self.spool.open.pop(self.queueID, None)
        if self.spool.failCommits:
            return fail(_MemorySpoolError("injected commit failure"))
        if self.spool.holdCommits:
            d: Deferred = Deferred()
            self.spool.held.append((d, self, envelope))
            return d
        self.spool.committed[self.queueID] = (Envelope.fromJSON(envelope.toJSON()), b"".join(self.chunks))
        return succeed(None)


class MemorySpool:
    """The spool API kept in memory.

    @ivar committed: queue id to C{(envelope, message bytes)}.
    @ivar open: queue ids being written.
    @ivar failCommits: make every commit fail (to test 451 replies).
    @ivar holdCommits: keep commits pending in C{held} until released with L{release}.
    @ivar freeSpace: what L{hasFreeSpace} compares against.
    """

    def __init__(self) -> None:
        self.committed: dict[str, tuple[Envelope, bytes]] = {}
        self.open: dict[str, _MemoryWriter] = {}
        self.failCommits = False
        self.holdCommits = False
        self.held: list[tuple[Deferred, _MemoryWriter, Envelope]] = []
        self.freeSpace = 1 << 40
        self.minFreeSpace = 0

    def hasFreeSpace(self, needed: int = 0) -> bool:
        return self.freeSpace - needed >= self.minFreeSpace

    def openMessage(self, queueID: str) -> _MemoryWriter:
        writer = _MemoryWriter(self, queueID)
        self.open[queueID] = writer
        return writer

    def release(self) -> None:
        held, self.held = self.held, []
        for d, writer, envelope in held:
            self.committed[writer.queueID] = (envelope, b"".join(writer.chunks))
            d.callback(None)

    def messages(self) -> list[bytes]:
        return [body for _, body in self.committed.values()]
