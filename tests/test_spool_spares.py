"""Tests for L{mailrelay.spool.spares}: empty files made ahead of need, which a commit renames
into place instead of creating its files (the dear step of a small message's commit on a
file system that scans recently freed inodes at each creation)."""

from __future__ import annotations

import errno
import fcntl
import os
import stat
import time
from pathlib import Path
from typing import Any

import pytest
from twisted.internet.task import Clock

from mailrelay.spool import Spool
from mailrelay.spool.spares import SpareFiles, isSpareName
from tests import test_spool as spoolTests
from tests.test_spool import (
    BIG,
    MESSAGE,
    ManualThreads,
    listing,
    makeEnvelope,
    resultOf,
    syncDeferToThread,
    writeMessage,
)


def waitFor(condition: Any, what: str, timeout: float = 10) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.005)


def locked(path: Path) -> bool:
    """Whether some open file description holds a lock on C{path}."""
    fd = os.open(path, os.O_RDONLY)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        return True
    finally:
        os.close(fd)
    return False


#: The spool's log events (the fixture of test_spool).
events = spoolTests.events


@pytest.fixture
def tmp(tmp_path: Path) -> Path:
    directory = tmp_path / "tmp"
    directory.mkdir()
    return directory


def test_take_renames_a_spare_into_place(tmp: Path) -> None:
    spares = SpareFiles(tmp, 3)
    spares.fill()
    names = listing(tmp)
    assert len(names) == 3 and len(spares) == 3
    for name in names:
        assert isSpareName(name) and name.startswith(f"spare-{os.getpid()}-")
        info = (tmp / name).stat()
        assert stat.S_IMODE(info.st_mode) == 0o600 and info.st_size == 0
        # Locked as a file being written is: the hourly sweep leaves it alone.
        assert locked(tmp / name)
    inodes = {(tmp / name).stat().st_ino for name in names}

    fd = spares.take(tmp / "01AAAAAAAAAAAAAAAAAA.eml")
    assert fd is not None
    os.write(fd, b"data")
    os.close(fd)
    target = tmp / "01AAAAAAAAAAAAAAAAAA.eml"
    assert target.read_bytes() == b"data" and target.stat().st_ino in inodes
    assert len(spares) == 2 and len([n for n in listing(tmp) if isSpareName(n)]) == 2
    spares.close()


def test_take_with_none_ready_is_none(tmp: Path) -> None:
    spares = SpareFiles(tmp, 2)
    assert spares.take(tmp / "x.eml") is None
    assert listing(tmp) == []


def test_take_never_replaces_a_file(tmp: Path) -> None:
    """As O_EXCL: a path that exists is an error, and the spare stays for the next."""
    spares = SpareFiles(tmp, 1)
    spares.fill()
    (tmp / "taken.eml").write_bytes(b"keep me")
    with pytest.raises(FileExistsError):
        spares.take(tmp / "taken.eml")
    assert (tmp / "taken.eml").read_bytes() == b"keep me"
    assert len(spares) == 1
    fd = spares.take(tmp / "free.eml")
    assert fd is not None
    os.close(fd)
    spares.close()


def test_a_spare_removed_meanwhile_is_skipped(tmp: Path) -> None:
    spares = SpareFiles(tmp, 2)
    spares.fill()
    first, second = sorted(listing(tmp), key=lambda n: int(n.rsplit("-", 1)[1]))
    os.unlink(tmp / first)
    fd = spares.take(tmp / "a.eml")
    assert fd is not None and not (tmp / second).exists() and (tmp / "a.eml").exists()
    os.close(fd)
    os.unlink(tmp / "a.eml")
    spares.fill()
    for name in listing(tmp):
        os.unlink(tmp / name)
    assert spares.take(tmp / "b.eml") is None and len(spares) == 0


def test_leftovers_of_a_process_of_the_same_pid_are_no_obstacle(tmp: Path) -> None:
    """A process id comes again (after a restart of a container, or in another PID
    namespace sharing the spool): the leftovers of the last one must not stop this one
    making its spares (each refused by O_EXCL, until its serials passed theirs)."""
    for serial in range(8):
        (tmp / f"spare-{os.getpid()}-{serial}").write_bytes(b"")
    spares = SpareFiles(tmp, 4)
    spares.fill()
    assert len(spares) == 4 and len(listing(tmp)) == 12
    spares.close()


def test_a_refused_rename_keeps_the_spare(tmp: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A rename refused for another reason than the spare being gone (ENOSPC: tmp/ must
    grow on a full file system) keeps the spare in the pool: given up on, it would stay in
    tmp/ unowned until the sweep a day later, logged as left by a process that ended (found
    by a bug hunt on a full ext4).  The caller creates its file itself and meets the error."""
    from mailrelay.spool import spares as sparesModule

    spares = SpareFiles(tmp, 4)
    spares.fill()

    def full(source: Any, destination: Any) -> None:
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(destination))

    monkeypatch.setattr(sparesModule, "_renameNoReplace", full)
    assert spares.take(tmp / "01AAAAAAAAAAAAAAAAAA.json") is None
    assert len(spares) == 4 and len(listing(tmp)) == 4
    spares.close()
    assert listing(tmp) == []


def test_fill_stops_quietly_where_files_cannot_be_made(tmp_path: Path) -> None:
    """The caller of take then creates its own file, and meets the error there."""
    spares = SpareFiles(tmp_path / "missing", 4)
    spares.fill()
    assert len(spares) == 0 and spares.take(tmp_path / "missing" / "x") is None


def test_a_spare_that_cannot_be_locked_is_not_kept(tmp: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Unlocked, the hourly sweep could remove it under its owner after a quiet day: it is
    removed at once, and filling stops there (the thread must not die of it)."""
    from mailrelay.spool import spares as sparesModule

    def flock(fd: int, operation: int) -> None:
        raise OSError(37, "No locks available")

    monkeypatch.setattr(sparesModule.fcntl, "flock", flock)
    spares = SpareFiles(tmp, 2)
    spares.fill()
    assert len(spares) == 0 and listing(tmp) == []


def test_pause_stops_the_filling_until_the_next_refill(tmp: Path) -> None:
    spares = SpareFiles(tmp, 4)
    spares.pause()
    spares.fill()
    assert len(spares) == 0
    spares.refill()  # (not started: the thread would call fill)
    spares.fill()
    assert len(spares) == 4
    spares.close()


def test_close_removes_the_spares_and_makes_no_more(tmp: Path) -> None:
    spares = SpareFiles(tmp, 4)
    spares.fill()
    spares.close()
    assert listing(tmp) == [] and len(spares) == 0
    spares.fill()
    assert listing(tmp) == [] and spares.take(tmp / "x") is None


def test_the_thread_fills_and_refills_once_half_are_gone(tmp: Path) -> None:
    spares = SpareFiles(tmp, 4)
    spares.start()
    try:
        waitFor(lambda: len(spares) == 4, "four spares")
        fd = spares.take(tmp / "a")
        assert fd is not None
        os.close(fd)
        spares.refill()  # more than half left: nothing to do
        time.sleep(0.05)
        assert len(spares) == 3
        for name in ("b", "c"):
            fd = spares.take(tmp / name)
            assert fd is not None
            os.close(fd)
        spares.refill()
        waitFor(lambda: len(spares) == 4, "the refill")
        with pytest.raises(RuntimeError):
            spares.start()
    finally:
        spares.close()
    assert spares._thread is not None
    spares._thread.join(5)
    assert not spares._thread.is_alive()
    assert sorted(listing(tmp)) == ["a", "b", "c"]


# --- in the spool -------------------------------------------------------------------------------


@pytest.fixture
def sparingSpool(tmp_path: Path) -> Any:
    s = Spool(tmp_path / "spool", reactor=Clock(), deferToThread=syncDeferToThread, spares=4)
    s.start()
    assert s._spares is not None
    waitFor(lambda: len(s._spares) == 4, "the spool's spares")  # type: ignore[arg-type]
    yield s
    s.stop()


def spareInodes(directory: Path) -> set[int]:
    return {(directory / n).stat().st_ino for n in listing(directory) if isSpareName(n)}


@pytest.mark.parametrize("data", [MESSAGE, BIG], ids=["in memory", "spilled"])
def test_a_commit_takes_its_files_from_the_spares(sparingSpool: Spool, tmp_path: Path,
                                                  data: bytes) -> None:
    """The message's file (written at commit, or spilled on the reactor's thread as it
    arrives) and its envelope are spares renamed, the entry exactly as without them; the
    spares are removed when the spool stops."""
    spoolDir = tmp_path / "spool"
    inodes = spareInodes(spoolDir / "tmp")
    writer = writeMessage(sparingSpool, data)
    envelope = makeEnvelope(writer.queueID)
    assert resultOf(writer.commit(envelope)) is None
    qid = writer.queueID
    message, stored = spoolDir / "queue" / f"{qid}.eml", spoolDir / "queue" / f"{qid}.json"
    assert message.read_bytes() == data and stored.read_bytes() == envelope.toJSON()
    assert {message.stat().st_ino, stored.stat().st_ino} <= inodes
    assert stat.S_IMODE(message.stat().st_mode) == 0o600
    sparingSpool.stop()
    assert listing(spoolDir / "tmp") == []
    assert sparingSpool.queueIDs() == [qid]


def test_without_spares_a_commit_creates_its_files(sparingSpool: Spool, tmp_path: Path) -> None:
    spoolDir = tmp_path / "spool"
    assert sparingSpool._spares is not None
    sparingSpool._spares.close()
    writer = writeMessage(sparingSpool)
    assert resultOf(writer.commit(makeEnvelope(writer.queueID))) is None
    assert (spoolDir / "queue" / f"{writer.queueID}.eml").read_bytes() == MESSAGE


def test_spares_are_made_only_while_the_committer_is_idle(tmp_path: Path) -> None:
    """Made again once a batch leaves the committer idle, not while batches follow each
    other (then the thread's work costs more than it saves), and paused when a batch
    starts (a spare being made would hold up its renames and syncs)."""

    class Spares:
        asked = paused = 0

        def take(self, path: Any) -> None:
            return None

        def refill(self) -> None:
            self.asked += 1

        def pause(self) -> None:
            self.paused += 1

        def close(self) -> None:
            pass

    threads = ManualThreads()
    s = Spool(tmp_path / "spool", reactor=Clock(), deferToThread=threads, syncMethod="fsync")
    s.start()
    spares = s._committer.spares = s._spares = Spares()  # type: ignore[assignment]
    first = writeMessage(s)
    d1 = first.commit(makeEnvelope(first.queueID))
    second = writeMessage(s)
    d2 = second.commit(makeEnvelope(second.queueID))  # waits for the next batch
    assert spares.paused == 1  # (the first batch started)
    threads.runNext()
    assert resultOf(d1) is None and not d2.called and spares.asked == 0
    assert spares.paused == 2  # the second
    threads.runNext()
    assert resultOf(d2) is None and spares.asked == 1
    s.stop()


def test_recovery_removes_spares_quietly(tmp_path: Path, events: list[dict[str, Any]]) -> None:
    """A process that ended without stopping its spool left its spares: recovery removes
    them with the rest of tmp/, as the empty files they are, not as partial messages."""
    spoolDir = tmp_path / "spool"
    (spoolDir / "tmp").mkdir(parents=True)
    (spoolDir / "tmp" / "spare-999999-0").write_bytes(b"")
    (spoolDir / "tmp" / "01AAAAAAAAAAAAAAAAAA.eml").write_bytes(b"partial")
    s = Spool(spoolDir, reactor=Clock(), deferToThread=syncDeferToThread)
    s.start()
    s.stop()
    assert listing(spoolDir / "tmp") == []
    texts = [e["log_format"] for e in events]
    removedLines = [e for e in events if "removed partial file" in e["log_format"]]
    assert [e["path"] for e in removedLines] == [str(spoolDir / "tmp" / "01AAAAAAAAAAAAAAAAAA.eml")]
    summary = [e for e in events if "spool recovered" in e["log_format"]]
    assert summary and summary[0]["removed"] == 1, texts


def test_the_sweep_removes_a_dead_processes_spares_not_live_ones(
    sparingSpool: Spool, tmp_path: Path, events: list[dict[str, Any]]
) -> None:
    tmp = tmp_path / "spool" / "tmp"
    old = time.time() - 2 * 86400
    (tmp / "spare-999999-3").write_bytes(b"")
    for name in listing(tmp):
        os.utime(tmp / name, (old, old))
    assert sparingSpool.sweepTemporary(86400) == ["spare-999999-3"]
    assert len([n for n in listing(tmp) if isSpareName(n)]) == 4  # the spool's own, locked
    sweptLines = [e for e in events if "removed spare file" in e["log_format"]]
    assert len(sweptLines) == 1 and sweptLines[0]["log_level"].name == "info"
    assert not [e for e in events if "stale partial" in e["log_format"]]
