"""Tests for L{mailrelay.spool}: durability, failure clean-up, recovery, group commit, ids."""

from __future__ import annotations

import errno
import json
import os
import re
import stat
import threading
import time
from pathlib import Path
from typing import Any, Callable

import pytest
from twisted.internet.defer import Deferred, fail, succeed
from twisted.internet.task import Clock
from twisted.logger import capturedLogs, formatEvent, globalLogPublisher
from twisted.python.failure import Failure
from zope.interface.verify import verifyObject

from mailrelay.envelope import DELIVERED, ClientInfo, Envelope, Recipient
from mailrelay.errors import CorruptEntry, EntryGone, SpoolError
from mailrelay.interfaces import IMessageWriter, ISpool
from mailrelay.spool import MessageWriter, Spool, isQueueID, newQueueID
from mailrelay.spool import commit as commitModule
from mailrelay.spool import ids as idsModule
from mailrelay.spool import writer as writerModule
from mailrelay.spool.memory import MemorySpool

QUEUE_ID_RE = re.compile(r"^[0-9A-HJKMNP-TV-Z]{20}$")
MESSAGE = b"Received: from client\r\nSubject: hi\r\n\r\nbody line 1\r\n.dotted\r\n"


# --- helpers -----------------------------------------------------------------------------------


def resultOf(d: Deferred[Any]) -> Any:
    """The result of an already-fired Deferred (fails the test if it has not fired or failed)."""
    results: list[Any] = []
    d.addBoth(results.append)
    assert results, "Deferred has not fired"
    if isinstance(results[0], Failure):
        results[0].raiseException()
    return results[0]


def failureOf(d: Deferred[Any], *types: type[BaseException]) -> Failure:
    """The failure of an already-failed Deferred, checked against C{types}."""
    results: list[Any] = []
    d.addBoth(results.append)
    assert results, "Deferred has not fired"
    assert isinstance(results[0], Failure), f"Deferred succeeded with {results[0]!r}"
    assert results[0].check(*types), results[0]
    return results[0]


def hasFired(d: Deferred[Any]) -> bool:
    return d.called


def syncDeferToThread(f: Callable[..., Any], *args: Any) -> Deferred[Any]:
    try:
        return succeed(f(*args))
    except BaseException:
        return fail()


class ManualThreads:
    """A deferToThread whose calls run only when the test says so."""

    def __init__(self) -> None:
        self.calls: list[tuple[Callable[..., Any], tuple[Any, ...], Deferred[Any]]] = []

    def __call__(self, f: Callable[..., Any], *args: Any) -> Deferred[Any]:
        d: Deferred[Any] = Deferred()
        self.calls.append((f, args, d))
        return d

    def runAll(self) -> None:
        """Run calls, including those queued by earlier ones, until none is left."""
        for _ in range(1000):
            if not self.calls:
                return
            self.runNext()
        raise AssertionError("thread calls keep coming")

    def runNext(self) -> None:
        f, args, d = self.calls.pop(0)
        try:
            result = f(*args)
        except BaseException:
            d.errback()
        else:
            d.callback(result)


def listing(path: Path) -> list[str]:
    return sorted(os.listdir(path)) if path.exists() else []


def makeEnvelope(queueID: str, **kw: Any) -> Envelope:
    return Envelope(
        sender="sender@example.org",
        recipients=[Recipient("a@example.com", "A@example.com"), Recipient("b@example.net")],
        queueID=queueID,
        client=ClientInfo("192.0.2.1", 4321, helo="client.example.org", esmtp=True),
        arrival=1700000000.5,
        messageSize=len(MESSAGE),
        **kw,
    )


@pytest.fixture
def events() -> Any:
    captured: list[dict[str, Any]] = []

    def observer(event: dict[str, Any]) -> None:
        if event.get("log_namespace") == "mailrelay.spool":
            captured.append(event)

    globalLogPublisher.addObserver(observer)
    yield captured
    globalLogPublisher.removeObserver(observer)


@pytest.fixture
def clock() -> Clock:
    return Clock()


@pytest.fixture
def spoolDir(tmp_path: Path) -> Path:
    return tmp_path / "spool"


@pytest.fixture
def spool(spoolDir: Path, clock: Clock) -> Any:
    # Per-file fsync, so that tests can inject the failure of one file's fsync; the syncfs
    # path has its own tests below.
    s = Spool(spoolDir, reactor=clock, deferToThread=syncDeferToThread, syncMethod="fsync")
    s.start()
    yield s
    s.stop()


@pytest.fixture
def threads() -> ManualThreads:
    return ManualThreads()


@pytest.fixture
def manualSpool(spoolDir: Path, clock: Clock, threads: ManualThreads) -> Any:
    s = Spool(spoolDir, reactor=clock, deferToThread=threads, syncMethod="fsync")
    s.start()
    yield s
    s.stop()


#: Bigger than what a writer keeps in memory: written to its temporary file at once.
BIG = b"x" * (writerModule._MEMORY_LIMIT + 1)


def writeMessage(spool: Spool, data: bytes = MESSAGE, queueID: str | None = None) -> MessageWriter:
    writer = spool.openMessage(queueID or newQueueID())
    step = 7 if len(data) < 4096 else 65536
    for i in range(0, len(data), step):
        writer.write(data[i : i + step])
    return writer


def countingDirectorySync(spool: Spool) -> list[Path]:
    calls: list[Path] = []
    original = spool._committer.fsyncDirectory

    def fsyncDirectory(path: Path) -> None:
        calls.append(Path(path))
        original(path)

    spool._committer.fsyncDirectory = fsyncDirectory  # type: ignore[method-assign]
    return calls


# --- commit ------------------------------------------------------------------------------------


def test_commitWritesBothFilesExactly(spool: Spool, spoolDir: Path) -> None:
    writer = writeMessage(spool)
    assert writer.size == len(MESSAGE)
    envelope = makeEnvelope(writer.queueID)
    assert resultOf(writer.commit(envelope)) is None

    qid = writer.queueID
    assert (spoolDir / "queue" / f"{qid}.eml").read_bytes() == MESSAGE
    assert (spoolDir / "queue" / f"{qid}.json").read_bytes() == envelope.toJSON()
    assert spool.loadEnvelope(qid) == envelope
    assert spool.messagePath(qid) == spoolDir / "queue" / f"{qid}.eml"
    assert spool.queueIDs() == [qid]
    assert listing(spoolDir / "tmp") == []
    for name in (f"{qid}.eml", f"{qid}.json"):
        assert stat.S_IMODE((spoolDir / "queue" / name).stat().st_mode) == 0o600
    # A committed entry is not touched by a late abort, and a second commit fails.
    writer.abort()
    assert spool.queueIDs() == [qid]
    failureOf(writer.commit(envelope), SpoolError)


def test_directoriesCreatedPrivate(spool: Spool, spoolDir: Path) -> None:
    for path in (spoolDir, spoolDir / "tmp", spoolDir / "queue"):
        assert stat.S_IMODE(path.stat().st_mode) == 0o700


def test_nothingVisibleBeforeCommitFires(
    manualSpool: Spool, spoolDir: Path, threads: ManualThreads
) -> None:
    writer = writeMessage(manualSpool)
    d = writer.commit(makeEnvelope(writer.queueID))
    assert not hasFired(d)
    assert listing(spoolDir / "queue") == []
    assert manualSpool.queueIDs() == []
    assert len(threads.calls) == 1
    threads.runNext()
    assert resultOf(d) is None
    assert listing(spoolDir / "queue") == [f"{writer.queueID}.eml", f"{writer.queueID}.json"]


def test_commitEnvelopeSnapshot(manualSpool: Spool, threads: ManualThreads) -> None:
    """The envelope is serialised when commit() is called."""
    spool = manualSpool
    writer = writeMessage(spool)
    envelope = makeEnvelope(writer.queueID)
    expected = envelope.toJSON()
    d = writer.commit(envelope)
    envelope.recipients.clear()
    threads.runNext()
    resultOf(d)
    assert (spool.messagePath(writer.queueID).with_suffix(".json")).read_bytes() == expected


def test_commitWrongQueueID(spool: Spool, spoolDir: Path) -> None:
    writer = writeMessage(spool)
    failureOf(writer.commit(makeEnvelope(newQueueID())), SpoolError)
    assert listing(spoolDir / "tmp") == []
    assert listing(spoolDir / "queue") == []


# --- failures ----------------------------------------------------------------------------------


def assertNothingLeft(spoolDir: Path) -> None:
    assert listing(spoolDir / "queue") == []
    assert listing(spoolDir / "tmp") == []


def test_bodyFsyncFailure(spool: Spool, spoolDir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    writer = writeMessage(spool)

    def fsync(fd: int) -> None:
        raise OSError(errno.EIO, os.strerror(errno.EIO))

    monkeypatch.setattr(os, "fsync", fsync)
    f = failureOf(writer.commit(makeEnvelope(writer.queueID)), SpoolError)
    assert "fsync" in str(f.value)
    assert str(spoolDir / "tmp" / f"{writer.queueID}.eml") in str(f.value)
    assert f.value.queueID == writer.queueID
    monkeypatch.undo()
    assertNothingLeft(spoolDir)
    writer.abort()  # safe after a failed commit
    assertNothingLeft(spoolDir)


@pytest.mark.parametrize("failOn", [".eml", ".json"])
def test_renameFailure(
    spool: Spool, spoolDir: Path, monkeypatch: pytest.MonkeyPatch, failOn: str
) -> None:
    """A failed rename of either file leaves nothing, not even the already-renamed .eml."""
    writer = writeMessage(spool)
    realRename = commitModule._renameNoReplace
    renamed: list[str] = []

    def rename(src: Any, dst: Any) -> None:
        if str(dst).endswith(failOn):
            raise OSError(errno.EXDEV, os.strerror(errno.EXDEV))
        renamed.append(str(dst))
        realRename(src, dst)

    monkeypatch.setattr(commitModule, "_renameNoReplace", rename)
    f = failureOf(writer.commit(makeEnvelope(writer.queueID)), SpoolError)
    assert "renaming" in str(f.value)
    if failOn == ".json":
        assert renamed == [str(spoolDir / "queue" / f"{writer.queueID}.eml")]
    assertNothingLeft(spoolDir)


@pytest.mark.parametrize("withRenameat2", [True, False])
def test_renameNoReplaceNeverReplaces(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, withRenameat2: bool
) -> None:
    """The committer's rename refuses an existing destination, with renameat2 or without."""
    if not withRenameat2:
        monkeypatch.setattr(commitModule, "_renameat2", None)
    elif commitModule._renameat2 is None:  # pragma: no cover - not Linux/glibc
        pytest.skip("no renameat2 in this C library")
    source, destination = tmp_path / "new", tmp_path / "old"
    source.write_bytes(b"new")
    destination.write_bytes(b"committed")
    with pytest.raises(FileExistsError):
        commitModule._renameNoReplace(source, destination)
    assert destination.read_bytes() == b"committed" and source.read_bytes() == b"new"
    destination.unlink()
    commitModule._renameNoReplace(source, destination)
    assert destination.read_bytes() == b"new" and not source.exists()


def test_directoryFsyncFailure(spool: Spool, spoolDir: Path) -> None:
    """Renamed into queue/ but the directory fsync failed: not durable, so removed."""
    writer = writeMessage(spool)

    def fsyncDirectory(path: Path) -> None:
        raise OSError(errno.EIO, os.strerror(errno.EIO))

    spool._committer.fsyncDirectory = fsyncDirectory  # type: ignore[method-assign]
    f = failureOf(writer.commit(makeEnvelope(writer.queueID)), SpoolError)
    assert "directory" in str(f.value) and str(spoolDir / "queue") in str(f.value)
    assertNothingLeft(spoolDir)


class FullDisk:
    """Wraps a file; writes fail with ENOSPC once C{room} octets are used."""

    def __init__(self, file: Any, room: int, failFlush: bool = False) -> None:
        self.file = file
        self.room = room
        self.failFlush = failFlush
        self.writes = 0

    def write(self, data: bytes) -> int:
        self.writes += 1
        if len(data) > self.room:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        self.room -= len(data)
        return self.file.write(data)

    def flush(self) -> None:
        if self.failFlush:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        self.file.flush()

    def __getattr__(self, name: str) -> Any:
        return getattr(self.file, name)


def test_writeErrorRememberedAndCommitFails(
    spool: Spool, spoolDir: Path, events: list[dict[str, Any]]
) -> None:
    writer = spool.openMessage(newQueueID())
    disk = FullDisk(writer._file, room=10)
    writer._file = disk
    writer.write(b"0123456789")
    writer.write(b"this does not fit")  # must not raise
    writer.write(b"ignored")
    writer.write(b"ignored too")
    assert writer.size == 10
    assert writer.failed
    assert disk.writes == 2  # later writes are not even attempted
    errors = [e for e in events if "writing message" in e["log_format"]]
    assert len(errors) == 1 and errors[0]["queueID"] == writer.queueID
    f = failureOf(writer.commit(makeEnvelope(writer.queueID)), SpoolError)
    assert "No space left" in str(f.value) and writer.queueID in str(f.value)
    assertNothingLeft(spoolDir)
    writer.abort()


def test_flushErrorAtCommit(spool: Spool, spoolDir: Path) -> None:
    """ENOSPC showing up only when the buffer is flushed, in the committer."""
    writer = spool.openMessage(newQueueID())
    writer._file = FullDisk(writer._file, room=10**6, failFlush=True)
    writer.write(MESSAGE)
    f = failureOf(writer.commit(makeEnvelope(writer.queueID)), SpoolError)
    assert "writing" in str(f.value)
    writer._file.failFlush = False  # let the wrapped file close cleanly
    writer._file.close()
    assertNothingLeft(spoolDir)


def test_envelopeWriteError(spool: Spool, spoolDir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    writer = writeMessage(spool)
    realWrite = os.write
    calls = 0

    def write(fd: int, data: Any) -> int:
        # The message's own write (one, at commit time) succeeds; the envelope's fails.
        nonlocal calls
        calls += 1
        if calls > 1:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return realWrite(fd, data)

    monkeypatch.setattr(os, "write", write)
    f = failureOf(writer.commit(makeEnvelope(writer.queueID)), SpoolError)
    monkeypatch.undo()
    assert f"{writer.queueID}.json" in str(f.value)
    assertNothingLeft(spoolDir)


def test_messageWriteErrorAtCommit(
    spool: Spool, spoolDir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A message held in memory is written at commit time; ENOSPC then refuses the commit,
    naming the message's file, and leaves nothing behind."""
    writer = writeMessage(spool)

    def write(fd: int, data: Any) -> int:
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(os, "write", write)
    f = failureOf(writer.commit(makeEnvelope(writer.queueID)), SpoolError)
    monkeypatch.undo()
    assert f"{writer.queueID}.eml failed: No space left on device (ENOSPC)" in str(f.value)
    assertNothingLeft(spoolDir)


def test_abort(spool: Spool, spoolDir: Path) -> None:
    small = writeMessage(spool)
    small.abort()
    assertNothingLeft(spoolDir)
    writer = writeMessage(spool, BIG)  # spilled to its file
    assert listing(spoolDir / "tmp") == [f"{writer.queueID}.eml"]
    writer.abort()
    writer.abort()
    assertNothingLeft(spoolDir)
    writer.write(b"more")  # ignored, no exception
    failureOf(writer.commit(makeEnvelope(writer.queueID)), SpoolError)
    assertNothingLeft(spoolDir)


def test_openMessageErrors(spool: Spool, spoolDir: Path, clock: Clock) -> None:
    writer = writeMessage(spool)
    twin = writeMessage(spool, queueID=writer.queueID)
    resultOf(writer.commit(makeEnvelope(writer.queueID)))
    # A second writer of the same id can never replace the committed entry.
    f = failureOf(twin.commit(makeEnvelope(writer.queueID)), SpoolError)
    assert "already exists" in str(f.value)
    assert (spoolDir / "queue" / f"{writer.queueID}.eml").read_bytes() == MESSAGE
    with pytest.raises(SpoolError, match="already exists"):
        spool.openMessage(writer.queueID)  # never clobber a committed entry
    with pytest.raises(ValueError):
        spool.openMessage("../etc/passwd")
    stopped = Spool(spoolDir.parent / "other", reactor=clock, deferToThread=syncDeferToThread)
    with pytest.raises(SpoolError, match="not started"):
        stopped.openMessage(newQueueID())


def test_startFailsClearly(tmp_path: Path, clock: Clock) -> None:
    blocker = tmp_path / "file"
    blocker.write_bytes(b"")
    s = Spool(blocker / "spool", reactor=clock, deferToThread=syncDeferToThread)
    with pytest.raises(SpoolError) as info:
        s.start()
    assert str(blocker / "spool") in str(info.value)


@pytest.mark.parametrize("recover", [True, False])
def test_startOnAFullFileSystem(
    tmp_path: Path, clock: Clock, monkeypatch: Any, events: Any, recover: bool
) -> None:
    """The spool's file system has no inode left (or the quota is reached): the spool
    starts all the same, logging it, so that the queue is delivered and space freed (as
    Postfix's qmgr starts); the delivery process (C{recover=False}) could not start, after a
    reload or a restart of it, and nothing was delivered again until the operator freed
    space by hand.  Another error still stops the start."""
    first = Spool(tmp_path / "spool", reactor=clock, deferToThread=syncDeferToThread)
    first.start()
    queueID = newQueueID()
    writer = first.openMessage(queueID)
    writer.write(MESSAGE)
    resultOf(writer.commit(makeEnvelope(queueID)))
    first.stop()
    realOpen = os.open
    failure = [errno.ENOSPC]

    def full(path: Any, flags: int, *args: Any, **kw: Any) -> int:
        if os.path.basename(path).startswith(".probe-"):
            raise OSError(failure[0], os.strerror(failure[0]), path)
        return realOpen(path, flags, *args, **kw)

    monkeypatch.setattr(os, "open", full)
    s = Spool(tmp_path / "spool", reactor=clock, deferToThread=syncDeferToThread,
              recover=recover)
    assert s.start() == [queueID]
    s.stop()
    texts = [formatEvent(e) for e in events]
    assert any(f"spool {tmp_path / 'spool'} is full" in t and "(ENOSPC)" in t
               and "queued mail is delivered" in t for t in texts), texts
    failure[0] = errno.EACCES
    with pytest.raises(SpoolError, match="Permission denied"):
        Spool(tmp_path / "spool", reactor=clock, deferToThread=syncDeferToThread).start()


def test_startTwice(spool: Spool) -> None:
    with pytest.raises(RuntimeError):
        spool.start()


def test_stoppedSpoolRefusesWork(spoolDir: Path, clock: Clock) -> None:
    s = Spool(spoolDir, reactor=clock, deferToThread=syncDeferToThread)
    s.start()
    writer = writeMessage(s)
    s.stop()
    failureOf(writer.commit(makeEnvelope(writer.queueID)), SpoolError)
    failureOf(s.remove(newQueueID()), SpoolError)
    failureOf(s.updateEnvelope(makeEnvelope(newQueueID())), SpoolError)
    assertNothingLeft(spoolDir)


# --- recovery ----------------------------------------------------------------------------------


def test_recovery(spoolDir: Path, clock: Clock, events: list[dict[str, Any]]) -> None:
    tmp, queue = spoolDir / "tmp", spoolDir / "queue"
    tmp.mkdir(parents=True)
    queue.mkdir()
    committed = [newQueueID() for _ in range(3)]
    orphan, corrupt, partial = newQueueID(), newQueueID(), newQueueID()
    for qid in reversed(committed):
        (queue / f"{qid}.eml").write_bytes(MESSAGE)
        (queue / f"{qid}.json").write_bytes(makeEnvelope(qid).toJSON())
    (queue / f"{orphan}.eml").write_bytes(MESSAGE)
    (queue / f"{corrupt}.json").write_bytes(makeEnvelope(corrupt).toJSON())
    (queue / "README").write_bytes(b"not ours")
    (tmp / f"{partial}.eml").write_bytes(b"half a mess")
    (tmp / f"{partial}.json").write_bytes(b"{")
    (tmp / "junk").write_bytes(b"")

    s = Spool(spoolDir, reactor=clock, deferToThread=syncDeferToThread)
    assert s.start() == committed
    try:
        assert listing(tmp) == []
        assert listing(queue) == sorted(
            [f"{q}.eml" for q in committed] + [f"{q}.json" for q in committed] + ["README"]
        )
        assert listing(spoolDir / "corrupt") == [f"{corrupt}.json"]
        assert s.queueIDs() == committed
        assert s.loadEnvelope(committed[0]) == makeEnvelope(committed[0])

        summary = [e for e in events if e["log_format"].startswith("spool recovered")]
        assert len(summary) == 1
        assert (summary[0]["count"], summary[0]["removed"], summary[0]["quarantined"]) == (3, 4, 1)
        quarantine = [e for e in events if e.get("queueID") == corrupt]
        assert quarantine and quarantine[0]["log_level"].name == "error"
        assert any(e.get("queueID") == orphan for e in events)
        assert any(e.get("queueID") == partial for e in events)
    finally:
        s.stop()

    # A second quarantined envelope of the same name does not overwrite the first.
    (queue / f"{corrupt}.json").write_bytes(b"second")
    s.start()
    s.stop()
    assert listing(spoolDir / "corrupt") == [f"{corrupt}.json", f"{corrupt}.json.1"]


def test_sharedSpoolSkipsRecovery(spool: Spool, spoolDir: Path, clock: Clock) -> None:
    """A second process must not remove the first one's commits in progress."""
    writer = writeMessage(spool, BIG)
    other = Spool(spoolDir, reactor=clock, deferToThread=syncDeferToThread)
    assert other.start() == []
    try:
        assert listing(spoolDir / "tmp") == [f"{writer.queueID}.eml"]
        resultOf(writer.commit(makeEnvelope(writer.queueID)))
        assert other.queueIDs() == [writer.queueID]
    finally:
        other.stop()


# --- group commit ------------------------------------------------------------------------------


def test_groupCommit(manualSpool: Spool, spoolDir: Path, threads: ManualThreads) -> None:
    directorySyncs = countingDirectorySync(manualSpool)
    first = writeMessage(manualSpool)
    firstD = first.commit(makeEnvelope(first.queueID))
    assert len(threads.calls) == 1

    writers = [writeMessage(manualSpool) for _ in range(5)]
    ds = [w.commit(makeEnvelope(w.queueID)) for w in writers]
    assert len(threads.calls) == 1  # queued behind the batch in flight

    threads.runNext()
    assert resultOf(firstD) is None
    assert not any(hasFired(d) for d in ds)
    assert directorySyncs == [spoolDir / "queue"]
    assert len(threads.calls) == 1  # the next batch: all five together

    threads.runNext()
    assert [resultOf(d) for d in ds] == [None] * 5
    assert directorySyncs == [spoolDir / "queue"] * 2
    assert threads.calls == []
    assert manualSpool.queueIDs() == sorted([first.queueID] + [w.queueID for w in writers])


def test_groupCommitFailureIsPerEntry(
    manualSpool: Spool, spoolDir: Path, threads: ManualThreads, monkeypatch: pytest.MonkeyPatch
) -> None:
    directorySyncs = countingDirectorySync(manualSpool)
    busy = writeMessage(manualSpool)
    busyD = busy.commit(makeEnvelope(busy.queueID))  # occupies the committer
    writers = [writeMessage(manualSpool) for _ in range(3)]
    ds = [w.commit(makeEnvelope(w.queueID)) for w in writers]
    threads.runNext()
    resultOf(busyD)
    bad = writers[1].queueID
    realRename = commitModule._renameNoReplace

    def rename(src: Any, dst: Any) -> None:
        if str(dst).endswith(f"{bad}.json"):
            raise OSError(errno.EIO, os.strerror(errno.EIO))
        realRename(src, dst)

    monkeypatch.setattr(commitModule, "_renameNoReplace", rename)
    threads.runNext()
    resultOf(ds[0])
    failureOf(ds[1], SpoolError)
    resultOf(ds[2])
    assert len(directorySyncs) == 2
    assert manualSpool.queueIDs() == [busy.queueID, writers[0].queueID, writers[2].queueID]
    assert listing(spoolDir / "tmp") == []
    assert not (spoolDir / "queue" / f"{bad}.eml").exists()


def test_callbackCommittingAgainJoinsNextBatch(
    manualSpool: Spool, threads: ManualThreads
) -> None:
    """Work requested from a commit's callback waits for (and joins) the next batch."""
    first = writeMessage(manualSpool)
    later: list[Deferred[None]] = []

    def again(_: None) -> None:
        w = writeMessage(manualSpool)
        later.append(w.commit(makeEnvelope(w.queueID)))

    d = first.commit(makeEnvelope(first.queueID)).addCallback(again)
    second = writeMessage(manualSpool)
    secondD = second.commit(makeEnvelope(second.queueID))
    threads.runNext()
    resultOf(d)
    assert len(threads.calls) == 1
    threads.runNext()
    resultOf(secondD)
    resultOf(later[0])
    assert len(manualSpool.queueIDs()) == 3


# --- remove and update -------------------------------------------------------------------------


def committed(spool: Spool) -> tuple[str, Envelope]:
    writer = writeMessage(spool)
    envelope = makeEnvelope(writer.queueID)
    resultOf(writer.commit(envelope))
    return writer.queueID, envelope


def test_removeOrdering(spool: Spool, spoolDir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    qid, _ = committed(spool)
    other, _ = committed(spool)
    order: list[str] = []
    realUnlink = os.unlink
    original = spool._committer.fsyncDirectory

    def unlink(path: Any) -> None:
        order.append(Path(path).name)
        realUnlink(path)

    def fsyncDirectory(path: Path) -> None:
        order.append("fsync " + Path(path).name)
        original(path)

    monkeypatch.setattr(os, "unlink", unlink)
    spool._committer.fsyncDirectory = fsyncDirectory  # type: ignore[method-assign]
    assert resultOf(spool.remove(qid)) is None
    assert order == [f"{qid}.json", f"{qid}.eml", "fsync queue"]
    assert spool.queueIDs() == [other]
    assert resultOf(spool.remove(qid)) is None  # already gone: fine


def test_removeDirectoryFsyncFailure(spool: Spool) -> None:
    qid, _ = committed(spool)

    def fsyncDirectory(path: Path) -> None:
        raise OSError(errno.EIO, os.strerror(errno.EIO))

    spool._committer.fsyncDirectory = fsyncDirectory  # type: ignore[method-assign]
    failureOf(spool.remove(qid), SpoolError)


# --- removals synced lazily (removalSyncDelay) ---------------------------------------------------


@pytest.fixture
def lazySpool(spoolDir: Path, clock: Clock) -> Any:
    s = Spool(spoolDir, reactor=clock, deferToThread=syncDeferToThread, syncMethod="fsync",
              removalSyncDelay=1.0)
    s.start()
    yield s
    s.stop()


def test_lazyRemovalIsDoneOnceUnlinkedAndSyncedOnceLater(
    lazySpool: Spool, spoolDir: Path, clock: Clock
) -> None:
    """A removal fires once its files are unlinked (gone for every process); one fsync of
    queue/ covers every removal of the next removalSyncDelay seconds."""
    ids = [committed(lazySpool)[0] for _ in range(3)]
    syncs = countingDirectorySync(lazySpool)
    for qid in ids:
        assert resultOf(lazySpool.remove(qid)) is None
        assert not (spoolDir / "queue" / f"{qid}.json").exists()
        assert not (spoolDir / "queue" / f"{qid}.eml").exists()
    assert syncs == [] and lazySpool.queueIDs() == []
    clock.advance(0.999)
    assert syncs == []
    clock.advance(0.001)
    assert syncs == [spoolDir / "queue"]
    clock.advance(10)
    assert syncs == [spoolDir / "queue"]  # nothing more to sync
    # The next removal starts the delay again.
    qid, _ = committed(lazySpool)
    del syncs[:]
    resultOf(lazySpool.remove(qid))
    clock.advance(1)
    assert syncs == [spoolDir / "queue"]


def test_lazyRemovalsRideOnTheNextSyncingBatch(
    lazySpool: Spool, spoolDir: Path, clock: Clock
) -> None:
    """A batch that fsyncs queue/ anyway (a commit, an envelope update) makes the earlier
    unlinks durable: the deferred sync is not needed any more."""
    qid, _ = committed(lazySpool)
    syncs = countingDirectorySync(lazySpool)
    resultOf(lazySpool.remove(qid))
    assert syncs == []
    other, envelope = committed(lazySpool)
    assert syncs == [spoolDir / "queue"]
    clock.advance(5)
    assert syncs == [spoolDir / "queue"]
    resultOf(lazySpool.remove(other))
    resultOf(lazySpool.updateEnvelope(makeEnvelope(committed(lazySpool)[0])))
    clock.advance(5)
    assert len(syncs) == 3  # the commit's and the update's, none of the timer's


def test_lazyRemovalsAreSyncedWhenTheSpoolStops(spoolDir: Path, clock: Clock) -> None:
    s = Spool(spoolDir, reactor=clock, deferToThread=syncDeferToThread, syncMethod="fsync",
              removalSyncDelay=1.0)
    s.start()
    qid, _ = committed(s)
    syncs = countingDirectorySync(s)
    resultOf(s.remove(qid))
    s.stop()
    assert syncs == [spoolDir / "queue"]
    assert clock.getDelayedCalls() == []


def test_lazyRemovalsAreSyncedWhenTheOwnedPoolStops(spoolDir: Path) -> None:
    """With its own thread pool: the batch in flight at stop is finished, then its removals
    are synced before the spool is idle."""
    from twisted.internet import reactor

    s = Spool(spoolDir, reactor=reactor, syncMethod="fsync", removalSyncDelay=1.0)
    s.start()
    writer = writeMessage(s)
    s._committer._unsynced = True  # as after a batch of removals
    syncs = countingDirectorySync(s)
    writer.commit(makeEnvelope(writer.queueID))
    s.stop()
    assert syncs and not s._committer._unsynced


def test_lazyRemovalSyncFailureIsRetried(
    lazySpool: Spool, spoolDir: Path, clock: Clock, events: list[dict[str, Any]]
) -> None:
    """A removal is done once unlinked: a failing fsync of queue/ does not undo it; it is
    logged, and tried again after the same delay."""
    qid, _ = committed(lazySpool)
    failing = [True]
    syncs = countingDirectorySync(lazySpool)
    counting = lazySpool._committer.fsyncDirectory

    def fsyncDirectory(path: Path) -> None:
        if failing[0]:
            raise OSError(errno.EIO, os.strerror(errno.EIO))
        counting(path)

    lazySpool._committer.fsyncDirectory = fsyncDirectory  # type: ignore[method-assign]
    assert resultOf(lazySpool.remove(qid)) is None
    clock.advance(1)
    assert any("EIO" in str(e.get("error")) for e in events)
    assert syncs == []
    failing[0] = False
    clock.advance(1)
    assert syncs == [spoolDir / "queue"]
    clock.advance(5)
    assert syncs == [spoolDir / "queue"]


def test_lazyRemovalInABatchWhoseSyncFails(lazySpool: Spool, spoolDir: Path, clock: Clock) -> None:
    """In a batch with a commit whose directory fsync fails, the commit fails (its entry is
    rolled back) but the removal, unlinked, stays done and is synced later."""
    qid, _ = committed(lazySpool)
    threads = ManualThreads()
    lazySpool._committer._injectedDeferToThread = threads
    removal = lazySpool.remove(qid)  # starts a batch of its own, held by the test
    writer = writeMessage(lazySpool)
    commit = writer.commit(makeEnvelope(writer.queueID))
    removal2 = lazySpool.remove(qid)  # the same entry again: gone already, fine
    syncs = countingDirectorySync(lazySpool)
    counting = lazySpool._committer.fsyncDirectory
    failing = [True]

    def fsyncDirectory(path: Path) -> None:
        if failing[0]:
            raise OSError(errno.EIO, os.strerror(errno.EIO))
        counting(path)

    lazySpool._committer.fsyncDirectory = fsyncDirectory  # type: ignore[method-assign]
    threads.runAll()
    assert resultOf(removal) is None and resultOf(removal2) is None
    failureOf(commit, SpoolError)
    assert lazySpool.queueIDs() == []  # the removal stands, the commit is rolled back
    failing[0] = False
    clock.advance(1)
    threads.runAll()
    assert syncs == [spoolDir / "queue"]


def test_removalSyncDelayNeedsAClock(spoolDir: Path) -> None:
    from mailrelay.spool.commit import GroupCommitter

    with pytest.raises(ValueError):
        GroupCommitter(spoolDir, spoolDir, None, syncMethod="fsync",  # type: ignore[arg-type]
                       removalSyncDelay=1.0)
    with pytest.raises(ValueError):
        Spool(spoolDir, reactor=Clock(), removalSyncDelay=-1)


def test_updateEnvelope(spool: Spool, spoolDir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    qid, envelope = committed(spool)
    envelope.recipients[0].state = DELIVERED
    envelope.recipients[0].attempts = 1
    envelope.attempts = 1
    renames: list[tuple[Path, Path]] = []
    realRename = os.rename
    monkeypatch.setattr(
        os, "rename", lambda s, d: (renames.append((Path(s), Path(d))), realRename(s, d))[1]
    )
    directorySyncs = countingDirectorySync(spool)
    assert resultOf(spool.updateEnvelope(envelope)) is None
    assert spool.loadEnvelope(qid) == envelope
    assert len(renames) == 1
    assert renames[0][0].parent == spoolDir / "tmp"
    assert renames[0][1] == spoolDir / "queue" / f"{qid}.json"
    assert directorySyncs == [spoolDir / "queue"]
    assert listing(spoolDir / "tmp") == []
    assert spool.messagePath(qid).read_bytes() == MESSAGE


def test_updateEnvelopeFailureKeepsOld(
    spool: Spool, spoolDir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    qid, envelope = committed(spool)
    before = (spoolDir / "queue" / f"{qid}.json").read_bytes()
    envelope.attempts = 5

    def fsync(fd: int) -> None:
        raise OSError(errno.EIO, os.strerror(errno.EIO))

    monkeypatch.setattr(os, "fsync", fsync)
    failureOf(spool.updateEnvelope(envelope), SpoolError)
    monkeypatch.undo()
    assert (spoolDir / "queue" / f"{qid}.json").read_bytes() == before
    assert listing(spoolDir / "tmp") == []


def test_updateEnvelopeOfMissingEntry(spool: Spool, spoolDir: Path) -> None:
    qid = newQueueID()
    f = failureOf(spool.updateEnvelope(makeEnvelope(qid)), SpoolError)
    assert "no such queue entry" in str(f.value)
    assertNothingLeft(spoolDir)


@pytest.mark.parametrize("removal", ["remove", "quarantine"])
def test_updateAfterARemovalInTheSameBatchFails(
    manualSpool: Spool, spoolDir: Path, threads: ManualThreads, removal: str
) -> None:
    """An envelope update that follows a removal (or quarantine) of its entry in one batch
    fails as for an entry gone: its check that the entry exists ran before the removal's
    unlinks, and its rename then brought the .json back without its .eml (a delivered message
    back as a damaged entry).  An update before the removal is simply overtaken by it."""
    writer = writeMessage(manualSpool)
    qid, envelope = writer.queueID, makeEnvelope(writer.queueID)
    done = writer.commit(envelope)
    threads.runAll()
    resultOf(done)
    busy = writeMessage(manualSpool)
    busyD = busy.commit(makeEnvelope(busy.queueID))  # occupies the committer
    before = manualSpool.updateEnvelope(envelope)
    gone = getattr(manualSpool, removal)(qid, *(["damaged"] if removal == "quarantine" else []))
    envelope.held = True
    after = manualSpool.updateEnvelope(envelope)
    threads.runAll()
    resultOf(busyD)
    resultOf(before)
    resultOf(gone)
    f = failureOf(after, SpoolError)
    assert "no such queue entry" in str(f.value)
    assert manualSpool.queueIDs() == [busy.queueID]
    assert not any(name.startswith(qid) for name in listing(spoolDir / "queue"))
    assert listing(spoolDir / "tmp") == []


def test_loadEnvelopeErrors(spool: Spool, spoolDir: Path) -> None:
    with pytest.raises(EntryGone):
        spool.loadEnvelope(newQueueID())
    unreadable = newQueueID()
    (spoolDir / "queue" / f"{unreadable}.json").mkdir()  # not gone, but cannot be read
    with pytest.raises(SpoolError, match="reading envelope") as raised:
        spool.loadEnvelope(unreadable)
    assert not isinstance(raised.value, (EntryGone, CorruptEntry))
    (spoolDir / "queue" / f"{unreadable}.json").rmdir()
    qid, _ = committed(spool)
    (spoolDir / "queue" / f"{qid}.json").write_bytes(b'{"version": 99}')
    with pytest.raises(CorruptEntry, match="is not a valid envelope: unsupported envelope version 99"):
        spool.loadEnvelope(qid)


@pytest.mark.parametrize(
    "change, problem",
    [
        (lambda e: e.update(nextAttempt="soon"), "nextAttempt: 'soon' is not a finite number"),
        (lambda e: e.update(arrival=None, attempts=-1), "attempts: -1 is not an integer >= 0"),
        (lambda e: e.update(isBounce=1), "isBounce: 1 is not true or false"),
        (lambda e: e.update(requireTLS="yes"), "requireTLS: 'yes' is not true or false"),
        (lambda e: e.update(sender=None), "sender: None is not a string"),
        (lambda e: e.update(recipients={}), "recipients: {} is not a list"),
        (lambda e: e["recipients"].insert(0, ["x"]), "recipients[0]: ['x'] is not a JSON object"),
        (lambda e: e["recipients"][0].pop("address"), "recipients[0].address: missing"),
        (lambda e: e["recipients"][0].update(state="lost"), "recipients[0].state: 'lost' is not one of"),
        (lambda e: e["recipients"][0].update(notify=[1]), "recipients[0].notify: [1] is not a list of strings"),
        (lambda e: e["recipients"][0].update(finalTime=True), "recipients[0].finalTime: True is not a finite"),
        (lambda e: e["recipients"][0].update(reason=1), "recipients[0].reason: 1 is not a string"),
        (lambda e: e.update(client=[]), "client: [] is not a JSON object"),
        (lambda e: e.update(client={"port": 25}), "client.address: missing"),
    ],
)
def test_loadEnvelopeRefusesFieldsOfTheWrongType(
    spool: Spool, spoolDir: Path, change: Any, problem: str
) -> None:
    """Valid JSON is not enough: a field of the wrong type would fail where it is used (one
    stopped the queue manager), so the entry is damaged (and quarantined) when read."""
    qid, envelope = committed(spool)
    path = spoolDir / "queue" / f"{qid}.json"
    assert spool.loadEnvelope(qid).recipients == envelope.recipients  # well-formed: read back
    data = json.loads(path.read_bytes())
    change(data)
    path.write_text(json.dumps(data))
    with pytest.raises(CorruptEntry, match=re.escape(f"is not a valid envelope: {problem}")):
        spool.loadEnvelope(qid)


def test_loadEnvelopeSkipsFieldsALaterVersionAdded(spool: Spool, spoolDir: Path) -> None:
    """An envelope written by a later relay (rolled back from) loads: the fields this one
    does not know are skipped, not fatal (Postfix's rule for queue file records), instead
    of the entry being moved to corrupt/ undelivered."""
    qid, envelope = committed(spool)
    path = spoolDir / "queue" / f"{qid}.json"
    data = json.loads(path.read_bytes())
    data["laterField"] = {"any": "value"}
    data["client"]["laterField"] = 1
    data["recipients"][1]["laterField"] = None
    path.write_text(json.dumps(data))
    loaded = spool.loadEnvelope(qid)
    assert loaded.recipients == envelope.recipients and loaded.client == envelope.client
    assert loaded.toDict() == envelope.toDict()


def test_commitRecordsTheMessageSize(spool: Spool) -> None:
    writer = writeMessage(spool)
    envelope = makeEnvelope(writer.queueID)
    envelope.messageSize = 0  # not set by the caller: the writer knows
    resultOf(writer.commit(envelope))
    assert envelope.messageSize == len(MESSAGE)
    assert spool.loadEnvelope(writer.queueID).messageSize == len(MESSAGE)


def test_quarantineMovesBothFilesAside(spool: Spool, spoolDir: Path, events: list[dict[str, Any]]) -> None:
    qid, _ = committed(spool)
    corrupt = spoolDir / "corrupt"
    corrupt.mkdir()
    (corrupt / f"{qid}.eml").write_bytes(b"an earlier one")
    moved = resultOf(spool.quarantine(qid, "the envelope is empty"))
    assert moved == [corrupt / f"{qid}.json.1", corrupt / f"{qid}.eml.1"]
    assert listing(corrupt) == sorted([f"{qid}.eml", f"{qid}.json.1", f"{qid}.eml.1"])
    assert (corrupt / f"{qid}.eml.1").read_bytes() == MESSAGE
    assert spool.queueIDs() == [] and listing(spoolDir / "queue") == []
    (line,) = [e for e in events if e.get("queueID") == qid]
    assert line["log_level"].name == "error" and line["problem"] == "the envelope is empty"
    # An entry already gone cannot be moved: the failure says so.
    failureOf(spool.quarantine(qid, "again"), SpoolError)



def test_quarantineCutShortKeepsTheMessage(
    spool: Spool, spoolDir: Path, clock: Clock, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A crash between the two moves of a quarantine loses nothing: the next start finds the
    rest and quarantines it too (a .json moved first left the .eml an orphan, which start()
    deletes as never acknowledged: the damaged message's text was lost)."""
    qid, _ = committed(spool)
    realRename = os.rename
    renames: list[Any] = []

    def rename(source: Any, target: Any) -> None:
        renames.append(source)
        if len(renames) == 2:
            raise OSError(errno.EIO, "the process died here")
        realRename(source, target)

    monkeypatch.setattr(os, "rename", rename)
    failureOf(spool.quarantine(qid, "its message is truncated"), SpoolError)
    monkeypatch.undo()
    spool.stop()
    again = Spool(spoolDir, reactor=clock, deferToThread=syncDeferToThread, syncMethod="fsync")
    again.start()
    try:
        corrupt = spoolDir / "corrupt"
        assert listing(corrupt) == sorted([f"{qid}.eml", f"{qid}.json"])
        assert (corrupt / f"{qid}.eml").read_bytes() == MESSAGE
        assert listing(spoolDir / "queue") == []
    finally:
        again.stop()

# --- free space --------------------------------------------------------------------------------


class FakeStatvfs:
    def __init__(self, bavail: int, frsize: int = 4096, files: int = 0, favail: int = 0) -> None:
        self.f_bavail = bavail
        self.f_frsize = frsize
        self.f_files = files  # (0: the file system counts no inodes, as btrfs)
        self.f_favail = favail


def test_hasFreeSpace(
    spoolDir: Path, clock: Clock, monkeypatch: pytest.MonkeyPatch, events: list[dict[str, Any]]
) -> None:
    calls: list[Any] = []
    answer: list[Any] = [FakeStatvfs(1000)]  # 4 096 000 octets

    def statvfs(path: Any) -> Any:
        calls.append(path)
        if isinstance(answer[0], Exception):
            raise answer[0]
        return answer[0]

    monkeypatch.setattr(os, "statvfs", statvfs)
    s = Spool(spoolDir, reactor=clock, minFreeSpace=1_000_000, deferToThread=syncDeferToThread)
    assert s.hasFreeSpace()
    assert s.hasFreeSpace(3_096_000)
    assert not s.hasFreeSpace(3_096_001)
    assert Path(calls[0]) == spoolDir

    # Far above the minimum, the answer is reused for a second (a busy relay's MAILs).
    answer[0] = FakeStatvfs(10**7)  # 40 GB
    clock.advance(1)
    assert s.hasFreeSpace()
    calls.clear()
    answer[0] = FakeStatvfs(10)
    clock.advance(0.999)
    assert s.hasFreeSpace()  # cached
    assert calls == []
    clock.advance(0.001)
    assert not s.hasFreeSpace()
    assert len(calls) == 1

    answer[0] = OSError(errno.EIO, os.strerror(errno.EIO))
    clock.advance(1)
    assert not s.hasFreeSpace()
    assert any("free space" in e["log_format"] for e in events)
    answer[0] = FakeStatvfs(10**6)
    assert not s.hasFreeSpace()  # the failure is cached too
    clock.advance(1)
    assert s.hasFreeSpace()


def test_freeSpaceNearTheMinimumIsCheckedEveryTime(
    spoolDir: Path, clock: Clock, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Within the margin above min_free_space, every check reads the file system again: a
    burst of messages within one second was judged against the free space before it (eight
    1 MB messages accepted on a tmpfs with 1.3 MB left against a 2 MiB minimum), where
    Postfix's smtpd calls statvfs at every MAIL."""
    free = [8 << 20]
    monkeypatch.setattr(os, "statvfs", lambda path: FakeStatvfs(free[0] // 4096))
    s = Spool(spoolDir, reactor=clock, minFreeSpace=2 << 20, deferToThread=syncDeferToThread)
    for _ in range(6):  # 1 MiB written between checks, in the same second
        assert s.hasFreeSpace()
        free[0] -= 1 << 20
    assert not s.hasFreeSpace(1)  # 2 MiB left: the minimum, nothing more
    free[0] -= 1 << 20
    assert not s.hasFreeSpace()


#: The inodes a spool keeps free (the store's MIN_FREE_INODES).
MIN_INODES = 16


def test_aSpoolWithoutFreeInodesRefusesNewMailBeforeItsData(
    spoolDir: Path, clock: Clock, monkeypatch: pytest.MonkeyPatch, events: list[dict[str, Any]]
) -> None:
    """Room for the octets but (almost) no inode left: new mail is refused at MAIL (452
    4.3.1), as Postfix's smtpd answers at MAIL when cleanup cannot create the queue file,
    instead of after the whole message (451 at the end of data, each retry sending it
    again), and a few inodes stay for the queue's own needs (envelope updates,
    bounces).  A file system that counts no inodes (btrfs), or min_free_space = 0, is not
    checked."""
    answer = [FakeStatvfs(10**6, files=65536, favail=MIN_INODES)]
    monkeypatch.setattr(os, "statvfs", lambda path: answer[0])
    s = Spool(spoolDir, reactor=clock, minFreeSpace=1_000_000, deferToThread=syncDeferToThread)
    assert s.hasFreeSpace()
    answer[0] = FakeStatvfs(10**6, files=65536, favail=MIN_INODES - 1)
    assert not s.hasFreeSpace()
    assert [formatEvent(e) for e in events] == [
        f"not enough free inodes in spool {spoolDir}: {MIN_INODES - 1} free, "
        f"fewer than {MIN_INODES}; new mail is refused (452 4.3.1)"]
    answer[0] = FakeStatvfs(10**6, files=0, favail=0)
    assert s.hasFreeSpace()
    answer[0] = FakeStatvfs(10**6, files=65536, favail=0)
    s.minFreeSpace = 0
    assert s.hasFreeSpace()


# --- queue ids ---------------------------------------------------------------------------------


def test_queueIDs() -> None:
    ids = [newQueueID() for _ in range(10000)]
    assert len(set(ids)) == len(ids)
    assert all(QUEUE_ID_RE.match(i) for i in ids)
    assert all(a < b for a, b in zip(ids, ids[1:]))
    assert all(isQueueID(i) for i in ids[:10])
    assert not isQueueID("0123456789ABCDEFGHIJ")  # I is not Crockford
    assert not isQueueID(ids[0].lower())


def test_queueIDsMonotonicWhenClockGoesBack(monkeypatch: pytest.MonkeyPatch) -> None:
    now = [time.time() + 1000]

    def fakeTime() -> float:
        now[0] -= 0.5
        return now[0]

    monkeypatch.setattr(time, "time", fakeTime)
    ids = [newQueueID() for _ in range(100)]
    monkeypatch.setattr(time, "time", lambda: now[0])  # the clock stands still
    ids += [newQueueID() for _ in range(100)]
    assert len(set(ids)) == 200
    assert all(a < b for a, b in zip(ids, ids[1:]))


def test_queueIDProcessSuffix(monkeypatch: pytest.MonkeyPatch) -> None:
    """Two processes minting ids in the same microsecond with the same counter differ."""
    monkeypatch.setattr(time, "time", lambda: 1700000000.0)
    made = []
    for pid in (1000, 1001):
        monkeypatch.setattr(os, "getpid", lambda pid=pid: pid)
        generator = idsModule._QueueIDGenerator()
        made.append(generator())
    assert made[0][:16] == made[1][:16]
    assert made[0] != made[1]


# --- the owned thread pool ---------------------------------------------------------------------


class ThreadReactor(Clock):
    """A Clock that also queues callFromThread calls for the test to run."""

    def __init__(self) -> None:
        super().__init__()
        self.fromThreads: list[tuple[Callable[..., Any], tuple[Any, ...]]] = []
        self.lock = threading.Lock()

    def callFromThread(self, f: Callable[..., Any], *args: Any) -> None:
        with self.lock:
            self.fromThreads.append((f, args))

    def runFromThreads(self) -> None:
        with self.lock:
            calls, self.fromThreads = self.fromThreads, []
        for f, args in calls:
            f(*args)


def test_ownedThreadPool(spoolDir: Path) -> None:
    reactor = ThreadReactor()
    s = Spool(spoolDir, reactor=reactor)
    assert s._committer.threadPool is None
    s.start()
    pool = s._committer.threadPool
    assert pool is not None and pool.started and pool.name == "mailrelay-spool"
    assert (pool.min, pool.max) == (1, 4)

    # The first batch blocks in its thread until released; the second queues behind it.
    release = threading.Event()
    original = s._committer.fsyncDirectory

    syncThreads: list[threading.Thread] = []

    def slowFsyncDirectory(path: Path) -> None:
        syncThreads.append(threading.current_thread())
        assert release.wait(5)
        original(path)

    s._committer.fsyncDirectory = slowFsyncDirectory  # type: ignore[method-assign]
    first = writeMessage(s)
    firstD = first.commit(makeEnvelope(first.queueID))
    second = writeMessage(s)
    secondD = second.commit(makeEnvelope(second.queueID))
    assert not hasFired(firstD) and not hasFired(secondD)

    release.set()
    s.stop()  # waits for the batch in flight, then runs the queued one
    assert pool.joined and not pool.started
    assert s._committer.threadPool is None
    assert resultOf(secondD) is None
    assert not hasFired(firstD)  # its result comes through the reactor
    # The first batch ran in a pool thread; the queued one was run by stop() itself.
    assert syncThreads[0] is not threading.main_thread()
    assert syncThreads[1:] == [threading.main_thread()]
    reactor.runFromThreads()
    assert resultOf(firstD) is None
    assert s.queueIDs() == [first.queueID, second.queueID]
    failureOf(s.remove(first.queueID), SpoolError)  # stopped

    # A new pool on restart.
    assert s.start() == [first.queueID, second.queueID]
    assert s._committer.threadPool is not None and s._committer.threadPool is not pool and s._committer.threadPool.started
    s.stop()


def test_stopKeepsLockUntilIdle(
    spoolDir: Path, clock: Clock, threads: ManualThreads, events: list[dict[str, Any]]
) -> None:
    """With an injected deferToThread, stop() lets queued work finish before unlocking, so
    another process's recovery cannot remove files of a commit still in progress."""
    s = Spool(spoolDir, reactor=clock, deferToThread=threads)
    s.start()
    writer = writeMessage(s, BIG)
    d = writer.commit(makeEnvelope(writer.queueID))
    s.stop()
    other = Spool(spoolDir, reactor=clock, deferToThread=syncDeferToThread)
    other.start()  # still locked: no recovery
    other.stop()
    assert listing(spoolDir / "tmp") == [f"{writer.queueID}.eml"]
    assert any("recovery skipped" in e["log_format"] for e in events)
    threads.runNext()
    resultOf(d)
    del events[:]
    assert other.start() == [writer.queueID]  # now it recovers
    other.stop()
    assert any(e["log_format"].startswith("spool recovered") for e in events)


def test_deferToThreadFailing(spoolDir: Path, clock: Clock) -> None:
    """If the thread call itself fails, every entry fails and nothing is left behind."""

    def broken(f: Callable[..., Any], *args: Any) -> Deferred[Any]:
        raise RuntimeError("no threads today")

    s = Spool(spoolDir, reactor=clock, deferToThread=broken)
    s.start()
    writer = writeMessage(s)
    f = failureOf(writer.commit(makeEnvelope(writer.queueID)), SpoolError)
    assert "no threads today" in str(f.value)
    assertNothingLeft(spoolDir)
    s.stop()


# syncfs: one sync of the file system for the whole batch ------------------------------------


@pytest.fixture
def syncfsSpool(spoolDir: Path, clock: Clock, threads: ManualThreads) -> Any:
    if commitModule._syncfs is None:
        pytest.skip("no syncfs(2) on this platform")
    s = Spool(spoolDir, reactor=clock, deferToThread=threads, syncMethod="syncfs")
    s.start()
    yield s
    s.stop()


def test_syncfsBatchSyncsOnceAndPublishesAfter(
    syncfsSpool: Spool, spoolDir: Path, threads: ManualThreads, monkeypatch: pytest.MonkeyPatch
) -> None:
    calls: list[str] = []
    visible: list[set[str]] = []
    realSyncfs = commitModule._syncfs

    def syncfs(fd: int) -> None:
        calls.append("syncfs")
        visible.append({p.name for p in (spoolDir / "queue").iterdir()})
        realSyncfs(fd)

    monkeypatch.setattr(commitModule, "_syncfs", syncfs)
    realFsync = os.fsync
    monkeypatch.setattr(os, "fsync", lambda fd: (calls.append("fsync"), realFsync(fd))[1])
    first = writeMessage(syncfsSpool)
    d1 = first.commit(makeEnvelope(first.queueID))
    writers = [writeMessage(syncfsSpool) for _ in range(5)]
    ds = [w.commit(makeEnvelope(w.queueID)) for w in writers]
    threads.runAll()
    for d in [d1, *ds]:
        assert resultOf(d) is None
    # Two batches; each: one syncfs for the data, one fsync for the queue/ directory.
    assert calls == ["syncfs", "fsync", "syncfs", "fsync"]
    # Nothing of a batch is visible in queue/ before its data is durable.
    assert visible == [set(), {f"{first.queueID}.eml", f"{first.queueID}.json"}]
    assert sorted(p.name for p in (spoolDir / "queue").iterdir()) == sorted(
        f"{w.queueID}{ext}" for w in [first, *writers] for ext in (".eml", ".json")
    )
    assert list((spoolDir / "tmp").iterdir()) == []


@pytest.mark.parametrize("openable", [True, False])
def test_batchesSyncThroughTheDirectoriesOpenedAtStart(
    spoolDir: Path,
    clock: Clock,
    threads: ManualThreads,
    monkeypatch: pytest.MonkeyPatch,
    openable: bool,
) -> None:
    """The committer opens the spool directory once, at start, and every batch's syncfs goes
    through it; it is closed at stop.  queue/ is opened by its path for each batch's fsync
    (see test_aQueueDirectoryRemovedByHandIsSyncedWhereItIsCreatedAgain).  Where the spool
    directory cannot be opened at start, each batch opens it as before: the same syncs of
    the same directories, the same entries."""
    if commitModule._syncfs is None:
        pytest.skip("no syncfs(2) on this platform")
    for sub in ("tmp", "queue"):  # (else start() syncs the directories it creates)
        (spoolDir / sub).mkdir(parents=True)
    realOpenDirectory = commitModule._openDirectory
    if not openable:
        def refuse(path: Path | str) -> int:
            raise OSError(errno.EMFILE, os.strerror(errno.EMFILE))

        monkeypatch.setattr(commitModule, "_openDirectory", refuse)
    spool = Spool(spoolDir, reactor=clock, deferToThread=threads, syncMethod="syncfs")
    spool.start()
    monkeypatch.setattr(commitModule, "_openDirectory", realOpenDirectory)
    committer = spool._committer
    synced: list[tuple[str, int]] = []
    realSyncfs, realFsync, realOpen = commitModule._syncfs, os.fsync, os.open
    monkeypatch.setattr(
        commitModule, "_syncfs",
        lambda fd: (synced.append(("syncfs", os.fstat(fd).st_ino)), realSyncfs(fd))[1])
    monkeypatch.setattr(
        os, "fsync", lambda fd: (synced.append(("fsync", os.fstat(fd).st_ino)), realFsync(fd))[1])
    opened: list[str] = []
    monkeypatch.setattr(
        os, "open", lambda path, *a, **kw: (opened.append(str(path)), realOpen(path, *a, **kw))[1])
    writers = [writeMessage(spool) for _ in range(2)]
    for writer in writers:
        d = writer.commit(makeEnvelope(writer.queueID))
        threads.runAll()
        assert resultOf(d) is None
    directory, queue = os.stat(spoolDir).st_ino, os.stat(spoolDir / "queue").st_ino
    assert synced == [("syncfs", directory), ("fsync", queue)] * 2
    directoriesOpened = [p for p in opened if p in (str(spoolDir), str(spoolDir / "queue"))]
    assert directoriesOpened == (
        [str(spoolDir / "queue")] if openable else [str(spoolDir), str(spoolDir / "queue")]) * 2
    assert listing(spoolDir / "queue") == sorted(
        f"{w.queueID}{ext}" for w in writers for ext in (".eml", ".json"))
    fd = committer._directoryFD
    assert (fd is not None) is openable
    spool.stop()
    assert committer._directoryFD is None
    if fd is not None:
        with pytest.raises(OSError):
            os.fstat(fd)


def test_syncfsFailureFailsTheBatchAndLeavesNothing(
    syncfsSpool: Spool, spoolDir: Path, threads: ManualThreads, monkeypatch: pytest.MonkeyPatch
) -> None:
    def syncfs(fd: int) -> None:
        raise OSError(errno.EIO, os.strerror(errno.EIO))

    monkeypatch.setattr(commitModule, "_syncfs", syncfs)
    writers = [writeMessage(syncfsSpool) for _ in range(3)]
    ds = [w.commit(makeEnvelope(w.queueID)) for w in writers]
    threads.runAll()
    for d in ds:
        f = failureOf(d, SpoolError)
        assert "syncfs" in str(f.value) and "EIO" in str(f.value)
    assert list((spoolDir / "queue").iterdir()) == []
    assert list((spoolDir / "tmp").iterdir()) == []


def test_smallMessagesStayInMemoryUntilCommit(syncfsSpool: Spool, spoolDir: Path, threads: ManualThreads) -> None:
    writer = syncfsSpool.openMessage(newQueueID())
    writer.write(b"Subject: x\r\n\r\nbody\r\n")
    assert list((spoolDir / "tmp").iterdir()) == []  # no file created on the reactor thread
    big = syncfsSpool.openMessage(newQueueID())
    big.write(b"x" * (writerModule._MEMORY_LIMIT + 1))
    assert [p.name for p in (spoolDir / "tmp").iterdir()] == [f"{big.queueID}.eml"]
    d = writer.commit(makeEnvelope(writer.queueID))
    threads.runAll()
    assert resultOf(d) is None
    assert (spoolDir / "queue" / f"{writer.queueID}.eml").read_bytes() == b"Subject: x\r\n\r\nbody\r\n"
    big.abort()
    assert list((spoolDir / "tmp").iterdir()) == []


def test_joiningProcessDoesNotRecover(spoolDir: Path, clock: Clock, events: list[dict[str, Any]]) -> None:
    """The delivery process joins a spool the relay's process recovered: it removes nothing
    and warns of nothing."""
    first = Spool(spoolDir, reactor=clock, deferToThread=syncDeferToThread)
    first.start()
    first.stop()
    (spoolDir / "tmp" / f"{newQueueID()}.eml").write_bytes(b"partial")
    joiner = Spool(spoolDir, reactor=clock, deferToThread=syncDeferToThread, recover=False)
    assert joiner.start() == []
    try:
        assert len(listing(spoolDir / "tmp")) == 1
        assert not [e for e in events if "recovery" in e.get("log_format", "")]
    finally:
        joiner.stop()


# --- the ISpool contract, for the spool and the one in memory ---------------------------------


@pytest.fixture(params=["Spool", "MemorySpool"])
def anySpool(request: Any, spoolDir: Path, clock: Clock, tmp_path: Path) -> Any:
    if request.param == "MemorySpool":
        yield MemorySpool(tmp_path / "messages")
        return
    s = Spool(spoolDir, reactor=clock, deferToThread=syncDeferToThread)
    s.start()
    yield s
    s.stop()


def test_bothProvideISpool(anySpool: Any) -> None:
    assert verifyObject(ISpool, anySpool)
    writer = anySpool.openMessage()
    assert verifyObject(IMessageWriter, writer)
    writer.abort()


def test_contractCommitLoadUpdateRemove(anySpool: Any) -> None:
    writer = anySpool.openMessage()
    assert isQueueID(writer.queueID)
    writer.write(MESSAGE[:10])
    writer.write(MESSAGE[10:])
    assert writer.size == len(MESSAGE)
    envelope = makeEnvelope(writer.queueID)
    envelope.messageSize = 0
    assert anySpool.queueIDs() == []
    resultOf(writer.commit(envelope))
    assert envelope.messageSize == len(MESSAGE)
    assert anySpool.queueIDs() == [writer.queueID]
    assert anySpool.messagePath(writer.queueID).read_bytes() == MESSAGE
    loaded = anySpool.loadEnvelope(writer.queueID)
    assert loaded == envelope and loaded is not envelope
    loaded.recipients[0].state = DELIVERED
    assert anySpool.loadEnvelope(writer.queueID).recipients[0].state != DELIVERED
    resultOf(anySpool.updateEnvelope(loaded))
    assert anySpool.loadEnvelope(writer.queueID) == loaded
    resultOf(anySpool.remove(writer.queueID))
    resultOf(anySpool.remove(writer.queueID))  # already gone: fine
    assert anySpool.queueIDs() == []
    with pytest.raises(EntryGone):
        anySpool.loadEnvelope(writer.queueID)
    failureOf(anySpool.updateEnvelope(loaded), SpoolError)
    with pytest.raises(ValueError):
        anySpool.loadEnvelope("../etc/passwd")


def test_contractAbortAndRefusals(anySpool: Any) -> None:
    writer = anySpool.openMessage()
    writer.write(MESSAGE)
    writer.abort()
    writer.abort()
    failureOf(writer.commit(makeEnvelope(writer.queueID)), SpoolError)
    assert anySpool.queueIDs() == []
    other = anySpool.openMessage()
    failureOf(other.commit(makeEnvelope(newQueueID())), SpoolError)  # not its id
    assert anySpool.queueIDs() == []
    given = newQueueID()
    assert anySpool.openMessage(given).queueID == given  # an id allocated by the caller


def test_contractQuarantine(anySpool: Any) -> None:
    writer = anySpool.openMessage()
    writer.write(MESSAGE)
    resultOf(writer.commit(makeEnvelope(writer.queueID)))
    assert isinstance(resultOf(anySpool.quarantine(writer.queueID, "damaged")), list)
    assert anySpool.queueIDs() == []
    failureOf(anySpool.quarantine(writer.queueID, "again"), SpoolError)


def test_memorySpoolWithoutDirectoryHasNoPaths() -> None:
    spool = MemorySpool()
    writer = spool.openMessage()
    resultOf(writer.commit(makeEnvelope(writer.queueID)))
    with pytest.raises(SpoolError, match="no directory"):
        spool.messagePath(writer.queueID)
    assert spool.messages() == [b""]


# -- reading back what a writer holds (the message filters), and writing it again


@pytest.mark.parametrize("size", [100, 300 * 1024])
def test_a_writer_reads_back_what_it_holds(spool: Spool, spoolDir: Path, size: int) -> None:
    """In memory (small) or from its temporary file (big): the filters read the message
    before the commit; writing it again under the same id works once the first is dropped."""
    data = b"Subject: x\r\n\r\n" + b"y" * size + b"\r\n"
    writer = spool.openMessage()
    writer.write(data[:50])
    writer.write(data[50:])
    assert writer.read() == data
    queueID = writer.queueID
    writer.abort()
    again = spool.openMessage(queueID)
    again.write(b"X-Added: 1\r\n" + data)
    resultOf(again.commit(makeEnvelope(queueID)))
    assert (spoolDir / "queue" / f"{queueID}.eml").read_bytes() == b"X-Added: 1\r\n" + data


def test_requireTLSIsKeptAndDefaultsToFalse() -> None:
    """RFC 8689's REQUIRETLS is stored on the envelope; envelopes written before the field
    existed read back without it."""
    envelope = Envelope(sender="a@example.org", recipients=[Recipient("b@example.org")],
                        requireTLS=True)
    assert Envelope.fromJSON(envelope.toJSON()).requireTLS is True
    old = json.loads(envelope.toJSON())
    del old["requireTLS"]
    assert Envelope.fromDict(old).requireTLS is False


def test_aSuccessNoticeOwedIsKeptAndEarlierEnvelopesReadBack() -> None:
    """A recipient's success notice owed (its action and queue id) and a notice's message
    are stored on the envelope, only when set: an envelope without them is written as
    before, and one written before the fields existed reads back without them.  A damaged
    mark is refused, naming the field."""
    owed = Recipient("b@example.org", noticeOwed="relayed", noticeID=newQueueID())
    envelope = Envelope(sender="a@example.org", recipients=[owed, Recipient("c@example.org")],
                        noticeOf=newQueueID())
    back = Envelope.fromJSON(envelope.toJSON())
    assert (back.recipients[0].noticeOwed, back.recipients[0].noticeID) == (
        "relayed", owed.noticeID)
    assert back.noticeOf == envelope.noticeOf
    stored = json.loads(envelope.toJSON())
    assert "noticeOwed" not in stored["recipients"][1]
    assert "noticeID" not in stored["recipients"][1]
    for r in stored["recipients"]:
        r.pop("noticeOwed", None), r.pop("noticeID", None)
    del stored["noticeOf"]
    old = Envelope.fromDict(stored)
    assert old.noticeOf is None and all(r.noticeOwed is None for r in old.recipients)
    assert "noticeOf" not in json.loads(old.toJSON())
    stored["recipients"][0]["noticeOwed"] = "sent"
    with pytest.raises(ValueError, match=r"recipients\[0\]\.noticeOwed: 'sent' is not "
                                         r"delivered or relayed"):
        Envelope.fromDict(stored)


def test_stale_partial_files_are_swept(spool: Spool, spoolDir: Path, events) -> None:
    """A process that ends while it writes (an acceptor process or sendmail killed, the
    delivery process killed in an envelope update) leaves its file in tmp/; only a start
    of the relay that finds the spool free removed them, so a relay that runs for weeks
    kept every one.  sweepTemporary removes the files nobody has written to for the given
    time, never one being written."""
    tmp = spoolDir / "tmp"
    old = time.time() - 2 * 86400
    for name in ("01AAAAAAAAAAAAAAAAAA.eml", "01AAAAAAAAAAAAAAAAAA.json",
                 "01BBBBBBBBBBBBBBBBBB.update-3.json"):
        (tmp / name).write_bytes(b"partial")
        os.utime(tmp / name, (old, old))
    writing = writeMessage(spool, b"x" * 300 * 1024)  # being written (spilled): stays
    # ... even when its client has trickled for a day into the writer's buffer (the file
    # unchanged meanwhile: found by a bug hunt): its writer holds a lock on it.
    os.utime(tmp / f"{writing.queueID}.eml", (old, old))
    (tmp / "a-directory").mkdir()
    os.utime(tmp / "a-directory", (old, old))
    removed = spool.sweepTemporary(86400)
    assert sorted(removed) == ["01AAAAAAAAAAAAAAAAAA.eml", "01AAAAAAAAAAAAAAAAAA.json",
                               "01BBBBBBBBBBBBBBBBBB.update-3.json"]
    assert sorted(listing(tmp)) == sorted([f"{writing.queueID}.eml", "a-directory"])
    texts = [e["log_format"] for e in events]
    assert sum("removed stale partial file" in t for t in texts) == 3
    assert spool.sweepTemporary(86400) == []


def test_the_relays_spool_is_swept_every_hour(spoolDir: Path, clock: Clock, events) -> None:
    """The relay's own spool service sweeps tmp/ hourly (files unwritten for a day); the
    delivery and acceptor processes' (which do not recover the spool) do not.  The sweep's
    directory walk, stats and unlinks run in the spool's thread (found by a review: on the
    reactor thread, a large or slow tmp/ stalled every session); its log lines are written
    back on the reactor thread, and a sweep still running delays the next one."""
    from mailrelay.app.services import SWEEP_INTERVAL, SpoolService

    threads = ManualThreads()
    s = Spool(spoolDir, reactor=clock, deferToThread=threads)
    service = SpoolService(s, sweep=clock)
    service.privilegedStartService()
    service.startService()
    stale = spoolDir / "tmp" / "01AAAAAAAAAAAAAAAAAA.eml"
    stale.write_bytes(b"partial")
    old = time.time() - 2 * 86400
    os.utime(stale, (old, old))
    clock.advance(SWEEP_INTERVAL - 1)
    assert threads.calls == []
    clock.advance(1)
    assert stale.exists(), "the sweep ran on the reactor thread"
    assert len(threads.calls) == 1
    clock.advance(SWEEP_INTERVAL)  # the first sweep still runs: no second one meanwhile
    assert len(threads.calls) == 1
    caller = threading.current_thread()
    f, args, d = threads.calls.pop(0)
    seen: list[Any] = []
    worker = threading.Thread(target=lambda: seen.append(f(*args)))
    worker.start()
    worker.join(10)
    assert not stale.exists()
    assert not [e for e in events if "removed stale" in e["log_format"]]  # not from the thread
    d.callback(seen[0])
    assert caller is threading.current_thread()
    assert [formatEvent(e) for e in events if "removed stale" in e["log_format"]] == [
        f"spool: removed stale partial file {stale} (not written to for 48 hours: left by a "
        "process that ended while writing it, never acknowledged)"
    ]
    assert [e["queueID"] for e in events if "removed stale" in e["log_format"]] == [
        "01AAAAAAAAAAAAAAAAAA"]
    clock.advance(SWEEP_INTERVAL)
    assert len(threads.calls) == 1
    with capturedLogs() as logged:
        threads.calls.pop(0)[2].errback(Failure(OSError(errno.EIO, "I/O error")))
    assert [(formatEvent(e), e["log_failure"].value.errno) for e in logged] == [
        ("spool: the sweep of tmp/ failed", errno.EIO)]
    clock.advance(SWEEP_INTERVAL)  # a failed sweep does not end the hourly ones
    assert len(threads.calls) == 1
    threads.runAll()
    service.stopService()
    threads.runAll()
    clock.advance(SWEEP_INTERVAL)
    assert threads.calls == [] and clock.getDelayedCalls() == []
    joined = SpoolService(Spool(spoolDir, reactor=clock, deferToThread=syncDeferToThread,
                                recover=False))
    joined.privilegedStartService()
    joined.startService()
    assert clock.getDelayedCalls() == []
    joined.stopService()


def test_aRecipientsReasonIsKeptAndOlderRecordsLoad() -> None:
    """A recipient's reason (beside its diagnostic: a suspended next hop's deferral) is
    stored; a recipient without one is written without the field, as before it existed (a
    relay of the version before reads it), and one written then reads back without one."""
    reason = "delivery temporarily suspended: host mx.example.org said: 421 busy"
    envelope = Envelope(sender="a@example.org", recipients=[
        Recipient("b@example.org", lastResult="smtp; 421 busy", reason=reason),
        Recipient("c@example.org", lastResult="smtp; 451 later")])
    again = Envelope.fromJSON(envelope.toJSON())
    assert [(r.lastResult, r.reason) for r in again.recipients] == [
        ("smtp; 421 busy", reason), ("smtp; 451 later", None)]
    stored = json.loads(envelope.toJSON())
    assert "reason" not in stored["recipients"][1]
    del stored["recipients"][0]["reason"]
    assert Envelope.fromDict(stored).recipients[0].reason is None


def test_aRecipientsRemoteAddressIsKeptAndOlderRecordsLoad() -> None:
    """The address the last attempt's status came from (beside its Remote-MTA, the name) is
    stored; a recipient without one is written without the field, as before it existed (a
    relay of the version before reads it), and one written then reads back without one."""
    envelope = Envelope(sender="a@example.org", recipients=[
        Recipient("b@example.org", lastResult="smtp; 421 busy", remoteMTA="dns; mx.example.org",
                  remoteAddress="192.0.2.1"),
        Recipient("c@example.org", lastResult="X-mailrelay; connection refused")])
    again = Envelope.fromJSON(envelope.toJSON())
    assert [(r.remoteMTA, r.remoteAddress) for r in again.recipients] == [
        ("dns; mx.example.org", "192.0.2.1"), (None, None)]
    stored = json.loads(envelope.toJSON())
    assert "remoteAddress" not in stored["recipients"][1]
    del stored["recipients"][0]["remoteAddress"]
    assert Envelope.fromDict(stored).recipients[0].remoteAddress is None


def test_aRecipientsRefusedCommandIsKeptAndOlderRecordsLoad() -> None:
    """The command whose reply the last result is (C{RCPT TO}) is stored with the recipient;
    one without is written without the field, as before it existed (a relay of the version
    before reads it), and one written then reads back without one."""
    envelope = Envelope(sender="a@example.org", recipients=[
        Recipient("b@example.org", lastResult="smtp; 550 5.1.1 unknown", command="RCPT TO"),
        Recipient("c@example.org", lastResult="X-mailrelay; connection refused")])
    again = Envelope.fromJSON(envelope.toJSON())
    assert [r.command for r in again.recipients] == ["RCPT TO", None]
    stored = json.loads(envelope.toJSON())
    assert "command" not in stored["recipients"][1]
    del stored["recipients"][0]["command"]
    assert Envelope.fromDict(stored).recipients[0].command is None


@pytest.mark.parametrize("removed", ["tmp", "queue"])
@pytest.mark.parametrize("data", [MESSAGE, BIG], ids=["in memory", "spilled"])
def test_aSpoolDirectoryRemovedByHandIsCreatedAgain(
    spool: Spool, spoolDir: Path, events: Any, removed: str, data: bytes
) -> None:
    """C{tmp/} or C{queue/} removed by hand (C{rm -rf}) while the relay runs: the next
    commit creates it again (mode 0700) and succeeds, saying so, as Postfix's
    mail_queue_enter() and mail_queue_open() make a missing queue directory
    (global/mail_queue.c), instead of refusing every message (451) until a restart."""
    os.rmdir(spoolDir / removed)
    writer = writeMessage(spool, data)
    envelope = makeEnvelope(writer.queueID)
    envelope.messageSize = len(data)
    resultOf(writer.commit(envelope))
    assert spool.queueIDs() == [writer.queueID]
    assert spool.messagePath(writer.queueID).read_bytes() == data
    assert stat.S_IMODE(os.stat(spoolDir / removed).st_mode) == 0o700
    assert listing(spoolDir / "tmp") == []
    assert [formatEvent(e) for e in events if "created again" in formatEvent(e)] == [
        f"spool: directory {spoolDir / removed} was missing (removed by hand?); created again"
    ]


def test_aMissingSpoolDirectoryIsNotCreatedWhereTheSpoolIsGone(
    spool: Spool, spoolDir: Path
) -> None:
    """The spool's own files gone too (its C{lock}: the directory emptied, or another file
    system mounted over it): nothing is created there; the commit fails, naming the file."""
    os.rmdir(spoolDir / "tmp")
    os.unlink(spoolDir / "lock")
    writer = writeMessage(spool)
    f = failureOf(writer.commit(makeEnvelope(writer.queueID)), SpoolError)
    assert f"{spoolDir / 'tmp'}" in str(f.value) and "No such file or directory" in str(f.value)
    assert not (spoolDir / "tmp").exists()


@pytest.mark.parametrize("held", [False, True])
def test_envelope_json_is_what_a_getattr_per_field_makes(held: bool) -> None:
    """Envelope.toDict takes each object's field values in one call: its dict, and so the
    JSON written to the spool, is the one made field by field (every field of the
    envelope, of its client and of each recipient, in order), and reads back the same."""
    import dataclasses

    from mailrelay.envelope import ENVELOPE_VERSION

    client = ClientInfo("192.0.2.7", helo="client.example", rdns="client.example",
                        relayAllowed=True, authUser="u", tls="TLSv1.3 X", esmtp=True)
    recipients = [Recipient("a@example.org", notify=("SUCCESS", "FAILURE"), orcpt="rfc822;a@x"),
                  Recipient("b@example.org", state=DELIVERED, attempts=2)]
    envelope = Envelope(sender="s@example.com", recipients=recipients, client=client,
                        queueID="Q", held=held, utf8Header=True,
                        notes={"k": [1, "v"]}, parameters={"X": "y"})

    def byField(obj: Any) -> dict[str, Any]:
        return {f.name: getattr(obj, f.name) for f in dataclasses.fields(obj)}

    expected = byField(envelope)
    expected["version"] = ENVELOPE_VERSION
    if not held:
        del expected["held"]
    del expected["noticeOf"]  # (fields stored only when set)
    expected["client"] = {**byField(client), "protocol": client.protocol}
    expected["recipients"] = [
        {**byField(r), **({"notify": list(r.notify)} if r.notify is not None else {})}
        for r in recipients
    ]
    for r in expected["recipients"]:
        del r["reason"], r["noticeOwed"], r["noticeID"], r["remoteAddress"], r["command"]
    assert envelope.toDict() == expected
    assert list(envelope.toDict()) == list(expected)
    assert [list(r) for r in envelope.toDict()["recipients"]] == [list(r) for r in expected["recipients"]]
    assert Envelope.fromJSON(envelope.toJSON()) == envelope


def test_aQueueDirectoryRemovedByHandIsSyncedWhereItIsCreatedAgain(
    spoolDir: Path, clock: Clock, threads: ManualThreads, monkeypatch: pytest.MonkeyPatch
) -> None:
    """C{queue/} removed by hand while the relay runs and created again by the next commit:
    the fsync that makes that commit's renames durable is of the C{queue/} the entries are
    in, not of the removed one a descriptor kept open since start would name (the entries
    would then be visible but not durable: a power loss loses mail accepted with 250)."""
    for sub in ("tmp", "queue"):
        (spoolDir / sub).mkdir(parents=True)
    spool = Spool(spoolDir, reactor=clock, deferToThread=threads, syncMethod="fsync")
    spool.start()
    try:
        os.rmdir(spoolDir / "queue")
        fsynced: list[int] = []
        realFsync = os.fsync
        monkeypatch.setattr(
            os, "fsync", lambda fd: (fsynced.append(os.fstat(fd).st_ino), realFsync(fd))[1])
        writer = writeMessage(spool)
        d = writer.commit(makeEnvelope(writer.queueID))
        threads.runAll()
        assert resultOf(d) is None
        assert spool.queueIDs() == [writer.queueID]
        assert os.stat(spoolDir / "queue").st_ino in fsynced[-1:]
    finally:
        spool.stop()


def test_aLastingShortageIsLoggedOnceAMinuteAndItsEndOnce(
    spoolDir: Path, clock: Clock, monkeypatch: pytest.MonkeyPatch, events: list[dict[str, Any]]
) -> None:
    """Found by a review: while the disk stayed full, every MAIL (and every metrics scrape)
    logged "not enough free space": a flood exactly when the disk is full.  The first is
    logged, then at most one a minute saying how many were not (as Postfix's
    msg_rate_delay(3) does for its caches' errors), and one line when there is room again;
    another problem (no inode, statvfs failing) is logged at once."""
    answer: list[Any] = [FakeStatvfs(100)]  # 409600 octets: fewer than the minimum

    def statvfs(path: str) -> Any:
        if isinstance(answer[0], OSError):
            raise answer[0]
        return answer[0]

    monkeypatch.setattr(os, "statvfs", statvfs)
    s = Spool(spoolDir, reactor=clock, minFreeSpace=1_000_000, deferToThread=syncDeferToThread)
    said = lambda: [formatEvent(e) for e in events]  # noqa: E731
    short = (f"not enough free space in spool {spoolDir} for 0 more octets: 409600 free, "
             "min_free_space = 1000000; new mail is refused (452 4.3.1)")
    for _ in range(50):
        assert not s.hasFreeSpace()
        clock.advance(1)
    assert said() == [short]
    clock.advance(10)  # a minute since the first line
    assert not s.hasFreeSpace()
    assert said() == [short, short + " (49 more times since the last such line)"]
    answer[0] = FakeStatvfs(10**6)
    assert s.hasFreeSpace()
    assert s.hasFreeSpace()
    assert said()[2:] == [f"enough free space in spool {spoolDir} again: 4096000000 free, "
                          "min_free_space = 1000000; new mail is accepted"]
    answer[0] = OSError(errno.EIO, os.strerror(errno.EIO))
    clock.advance(1)
    for _ in range(5):
        assert not s.hasFreeSpace()
        clock.advance(1)
    assert said()[3:] == [
        f"checking free space of spool {spoolDir} failed: Input/output error"]


#: The stored fields 3fb096f's relay knew, by record: one of the relays before 001be84,
#: which refuse an entry with a field they do not know (the README's rollback check).
_KNOWN_BEFORE_SKIPPING = {
    "envelope": {"sender", "queueID", "size", "body", "smtputf8", "ret", "envid", "requireTLS",
                 "tlsRequiredNo", "utf8Header", "arrival", "messageSize", "attempts",
                 "nextAttempt", "delayWarned", "isBounce", "held", "parameters", "notes"},
    "recipient": {"address", "original", "notify", "orcpt", "state", "attempts", "lastResult",
                  "status", "remoteMTA", "finalTime", "parameters"},
}


def test_the_rollback_check_names_every_field_an_older_relay_refuses() -> None:
    """README's check before a rollback to a relay that moves an entry with a field it does
    not know to spool/corrupt/ (before 001be84) greps for every field added since: an entry
    carrying one it leaves out (remoteAddress, written with most deferrals since cf0a193)
    would be set aside undelivered by the relay rolled back to."""
    from mailrelay.envelope import _ENVELOPE_KINDS, _RECIPIENT_KINDS

    readme = (Path(__file__).parent.parent / "README.md").read_text(encoding="utf-8")
    (grep,) = re.findall(r"`grep -lE '\"\(([\w|]+)\)\"' spool/queue/\*\.json`", readme)
    added = ((set(_ENVELOPE_KINDS) - _KNOWN_BEFORE_SKIPPING["envelope"])
             | (set(_RECIPIENT_KINDS) - _KNOWN_BEFORE_SKIPPING["recipient"]))
    assert added - set(grep.split("|")) == set()
