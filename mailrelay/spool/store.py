"""The durable message store: nothing accepted is ever lost.

Layout under the spool directory::

    lock              held (flock) by every process using the spool; see L{Spool.start}
    tmp/              in-progress writes; anything here after a crash is garbage
    queue/<ID>.eml    the message, exactly as it will be relayed (CRLF lines)
    queue/<ID>.json   the envelope (L{Envelope.toJSON}); its presence marks the entry committed
    corrupt/          damaged entries, kept for the operator: a C{.json} found without its
                      C{.eml}, or an entry whose envelope cannot be read or whose message is
                      not of the size its envelope records (L{Spool.quarantine})

A message is written to C{tmp/<ID>.eml} by a L{MessageWriter}.  L{MessageWriter.commit} makes
it durable: body fsynced, envelope written to C{tmp/<ID>.json} and fsynced, C{.eml} renamed
into C{queue/}, then C{.json}, then C{queue/} itself fsynced.  Only then does the commit's
L{Deferred} fire, and only then may the SMTP side say C{250}.

All fsync and rename work runs off the reactor thread, through a group committer: at most one
batch is in flight, and everything requested meanwhile runs as the next batch, sharing one
fsync of C{queue/}.
"""

from __future__ import annotations

import fcntl
import os
import secrets
from collections.abc import Callable
from pathlib import Path
from typing import Any

from twisted.internet.defer import Deferred, fail
from twisted.internet.threads import deferToThreadPool
from twisted.logger import Logger
from twisted.python.failure import Failure
from twisted.python.threadpool import ThreadPool
from zope.interface import implementer

from mailrelay.envelope import Envelope
from mailrelay.errors import CorruptEntry, EntryGone, SpoolError
from mailrelay.interfaces import ISpool
from mailrelay.spool import commit as commitModule
from mailrelay.spool.commit import (
    _FILE_MODE,
    _O_CLOEXEC,
    _O_DIRECTORY,
    SYNC_METHODS,
    _Operation,
    _osError,
    _Quarantine,
    _Remove,
    _Update,
)
from mailrelay.spool.ids import isQueueID, newQueueID
from mailrelay.spool.writer import MessageWriter, _SpillFile

log = Logger(namespace="mailrelay.spool")

__all__ = ["Spool"]

_DIR_MODE = 0o700
_FREE_SPACE_CACHE_SECONDS = 1.0


@implementer(ISpool)
class Spool:
    """The spool directory: recovery at start-up, message writers, and the group committer.

    @ivar directory: the spool directory.
    @ivar minFreeSpace: octets that must stay free on the spool's file system.
    """

    def __init__(
        self,
        directory: Path,
        *,
        reactor: Any,
        minFreeSpace: int = 0,
        deferToThread: Callable[..., Deferred[Any]] | None = None,
        syncMethod: str = "syncfs",
        recover: bool = True,
    ) -> None:
        """
        @param directory: the spool directory; created by L{start} if missing.
        @param syncMethod: one of L{SYNC_METHODS}: C{"syncfs"} (one syncfs(2) per batch; best
            on a file system of its own) or C{"fsync"} (each file); without syncfs (not
            Linux), C{"fsync"} is used.
        @param recover: do crash recovery in L{start} (when no other process uses the spool);
            C{False} for a process that joins a spool another one has recovered (the delivery
            process).
        @param reactor: provides C{seconds()} and, unless C{deferToThread} is given,
            C{callFromThread()}.
        @param minFreeSpace: see L{hasFreeSpace}.
        @param deferToThread: C{callable(f, *args)} returning a L{Deferred} of C{f(*args)} run
            off the reactor thread and fired on it.  When C{None}, the spool runs its own
            thread pool between L{start} and L{stop}.
        """
        self.directory = Path(directory)
        self.minFreeSpace = minFreeSpace
        if syncMethod not in SYNC_METHODS:
            raise ValueError(f"syncMethod must be one of {SYNC_METHODS}, not {syncMethod!r}")
        self._syncMethod = syncMethod
        self._recoverAtStart = recover
        self._reactor = reactor
        self._tmpDir = self.directory / "tmp"
        self._queueDir = self.directory / "queue"
        self._corruptDir = self.directory / "corrupt"
        self._lockPath = self.directory / "lock"
        self._lockFD: int | None = None
        self._injectedDeferToThread = deferToThread
        self._threadPool: ThreadPool | None = None
        self._running = False
        self._pending: list[_Operation] = []
        self._inFlight = False
        self._releaseLockWhenIdle = False
        self._updateSerial = 0
        self._freeSpaceCheckedAt: float | None = None
        self._freeSpace: int | None = None

    # -- life cycle ---------------------------------------------------------------------------

    def start(self) -> list[str]:
        """Create the spool if needed, recover from a crash, and get ready to write.

        Creates the directory, C{tmp/} and C{queue/} (mode 0700) if missing.  Then, unless
        another process is using the spool (see below): removes every file in C{tmp/} and every
        C{queue/<ID>.eml} without its C{.json} (never acknowledged), and moves every
        C{queue/<ID>.json} without its C{.eml} to C{corrupt/}.

        Every process using the spool holds a shared C{flock} on C{lock}; recovery needs an
        exclusive one, as removing another live process's partial files would break its
        commits in progress.

        @return: the committed queue ids, sorted (by arrival).
        @raise SpoolError: the spool directory cannot be created, locked or written.
        """
        if self._running:
            raise RuntimeError(f"spool {self.directory} is already started")
        if self._inFlight or self._pending:
            raise RuntimeError(f"spool {self.directory} still has operations from its last run")
        created = self._makeDirectories()
        self._lockFD, exclusive = self._lock(tryExclusive=self._recoverAtStart)
        try:
            self._probeWritable()
            if exclusive:
                queueIDs = self._recover()
            elif not self._recoverAtStart:
                queueIDs = self.queueIDs()  # the relay's own process recovers, not us
            else:
                queueIDs = self.queueIDs()
                log.warn(
                    "spool {directory} is in use by another process: crash recovery skipped, "
                    "{count} entries queued",
                    directory=str(self.directory),
                    count=len(queueIDs),
                )
            if created:
                for path in created:
                    self._fsyncDirectoryOrRaise(path.parent)
            fcntl.flock(self._lockFD, fcntl.LOCK_SH)
        except BaseException:
            self._unlock()
            raise
        if self._injectedDeferToThread is None:
            self._threadPool = ThreadPool(minthreads=1, maxthreads=4, name="mailrelay-spool")
            self._threadPool.start()
        self._running = True
        return queueIDs

    def stop(self) -> None:
        """Stop accepting work, and stop the owned thread pool.

        With the owned pool, waits for the batch in flight to finish its file work (its
        L{Deferred}s fire later, through the reactor) and runs any queued batch right here, so
        every commit requested before C{stop} completes.  With an injected C{deferToThread},
        queued operations keep going through it.
        """
        if not self._running:
            return
        self._running = False
        pool, self._threadPool = self._threadPool, None
        if pool is not None:
            pool.stop()
            if self._pending:
                batch, self._pending = self._pending, []
                self._batchFinished(self._runBatch(batch), batch, fromStop=True)
            self._unlock()
        elif self._inFlight or self._pending:
            self._releaseLockWhenIdle = True
        else:
            self._unlock()

    def _makeDirectories(self) -> list[Path]:
        created = []
        for path in (self.directory, self._tmpDir, self._queueDir):
            if path.is_dir():
                continue
            try:
                if path == self.directory:
                    os.makedirs(path, _DIR_MODE)
                else:
                    os.mkdir(path, _DIR_MODE)
            except OSError as e:
                raise _osError("creating spool directory", path, e, None) from None
            created.append(path)
            log.info("created spool directory {path}", path=str(path))
        return created

    def _lock(self, tryExclusive: bool = True) -> tuple[int, bool]:
        try:
            fd = os.open(self._lockPath, os.O_RDWR | os.O_CREAT | _O_CLOEXEC, _FILE_MODE)
        except OSError as e:
            raise _osError("opening spool lock", self._lockPath, e, None) from None
        try:
            if tryExclusive:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                return fd, True
        except BlockingIOError:
            pass
        except OSError as e:
            os.close(fd)
            raise _osError("locking", self._lockPath, e, None) from None
        try:
            fcntl.flock(fd, fcntl.LOCK_SH)
        except OSError as e:
            os.close(fd)
            raise _osError("locking", self._lockPath, e, None) from None
        return fd, False

    def _unlock(self) -> None:
        fd, self._lockFD = self._lockFD, None
        self._releaseLockWhenIdle = False
        if fd is not None:
            os.close(fd)

    def _probeWritable(self) -> None:
        probe = self._tmpDir / f".probe-{os.getpid()}-{secrets.token_hex(4)}"
        try:
            fd = os.open(probe, os.O_WRONLY | os.O_CREAT | os.O_EXCL | _O_CLOEXEC, _FILE_MODE)
        except OSError as e:
            raise _osError("writing to spool directory", self._tmpDir, e, None) from None
        os.close(fd)
        try:
            os.unlink(probe)
        except OSError as e:
            raise _osError("removing", probe, e, None) from None

    def _recover(self) -> list[str]:
        removed = 0
        quarantined = 0
        try:
            tmpNames = os.listdir(self._tmpDir)
            queueNames = os.listdir(self._queueDir)
        except OSError as e:
            raise _osError("listing", e.filename or self.directory, e, None) from None

        for name in sorted(tmpNames):
            path = self._tmpDir / name
            queueID = name.split(".", 1)[0]
            try:
                os.unlink(path)
            except IsADirectoryError:
                log.warn("spool recovery: leaving unexpected directory {path}", path=str(path))
                continue
            except FileNotFoundError:
                continue
            except OSError as e:
                raise _osError("removing partial file", path, e, None) from None
            removed += 1
            log.info(
                "spool recovery: removed partial file {path} (never acknowledged)",
                path=str(path),
                queueID=queueID if isQueueID(queueID) else None,
            )

        messages: set[str] = set()
        envelopes: set[str] = set()
        for name in queueNames:
            stem, dot, suffix = name.partition(".")
            if dot and isQueueID(stem) and suffix == "eml":
                messages.add(stem)
            elif dot and isQueueID(stem) and suffix == "json":
                envelopes.add(stem)
            else:
                log.warn(
                    "spool recovery: leaving unexpected file {path}",
                    path=str(self._queueDir / name),
                )

        changed = False
        for queueID in sorted(messages - envelopes):
            path = self._queueDir / f"{queueID}.eml"
            try:
                os.unlink(path)
            except FileNotFoundError:
                continue
            except OSError as e:
                raise _osError("removing orphan message", path, e, queueID) from None
            removed += 1
            changed = True
            log.info(
                "spool recovery: removed message {path} without envelope (never acknowledged)",
                path=str(path),
                queueID=queueID,
            )

        for queueID in sorted(envelopes - messages):
            self._quarantine(queueID)
            quarantined += 1
            changed = True

        if changed:
            self._fsyncDirectoryOrRaise(self._queueDir)
        committed = sorted(envelopes & messages)
        log.info(
            "spool recovered {count} entries, removed {removed} partial files, "
            "quarantined {quarantined} corrupt entries",
            count=len(committed),
            removed=removed,
            quarantined=quarantined,
        )
        return committed

    def _quarantine(self, queueID: str) -> None:
        source = self._queueDir / f"{queueID}.json"
        (target,) = self._moveToCorrupt(queueID)
        log.error(
            "spool recovery: envelope {path} has no message file; moved to {target} "
            "for the operator",
            path=str(source),
            target=str(target),
            queueID=queueID,
        )

    def _moveToCorrupt(self, queueID: str) -> list[Path]:
        """Move C{queue/<ID>.eml} if there is one, then C{queue/<ID>.json}, to C{corrupt/}
        (never over an earlier one of the same name: C{<ID>.json.1} ...), and fsync
        C{corrupt/}; the caller fsyncs C{queue/}.  Return where they went (the C{.json}'s
        path first).

        The message goes first: should the process die in between, the C{.json} left in
        C{queue/} is quarantined at the next start, whereas an C{.eml} left alone would be
        removed as never acknowledged.

        @raise SpoolError: a file cannot be moved.
        """
        try:
            os.mkdir(self._corruptDir, _DIR_MODE)
        except FileExistsError:
            pass
        except OSError as e:
            raise _osError("creating", self._corruptDir, e, queueID) from None
        names = [f"{queueID}.json"]
        if os.path.lexists(self._queueDir / f"{queueID}.eml"):
            names.append(f"{queueID}.eml")
        n = 0
        suffix = ""
        while any(os.path.lexists(self._corruptDir / (name + suffix)) for name in names):
            n += 1
            suffix = f".{n}"
        moved = []
        for name in reversed(names):
            source, target = self._queueDir / name, self._corruptDir / (name + suffix)
            try:
                os.rename(source, target)
            except OSError as e:
                where = f"{source} to {target}"
                raise _osError("moving corrupt entry", where, e, queueID) from None
            moved.insert(0, target)
        self._fsyncDirectoryOrRaise(self._corruptDir)
        return moved

    # -- reading ------------------------------------------------------------------------------

    def _checkID(self, queueID: str) -> None:
        if not isinstance(queueID, str) or not isQueueID(queueID):
            raise ValueError(f"not a queue id: {queueID!r}")

    def queueIDs(self) -> list[str]:
        """The committed queue ids, sorted (by arrival).

        An entry whose commit is in flight may show up before its L{Deferred} fires (and, if
        the batch's directory fsync fails, vanish again); use commit results to learn of new
        entries, and this to learn of old ones.
        """
        try:
            names = os.listdir(self._queueDir)
        except OSError as e:
            raise _osError("listing", self._queueDir, e, None) from None
        return sorted(
            name[:-5] for name in names if name.endswith(".json") and isQueueID(name[:-5])
        )

    def messagePath(self, queueID: str) -> Path:
        """The path of the committed message C{queueID} (C{queue/<ID>.eml})."""
        self._checkID(queueID)
        return self._queueDir / f"{queueID}.eml"

    def loadEnvelope(self, queueID: str) -> Envelope:
        """Read the envelope of the committed entry C{queueID}, and check that its message
        file has the size the envelope records (C{messageSize}; 0: not recorded).

        @raise EntryGone: there is no such entry (any more).
        @raise CorruptEntry: the envelope is not valid, or the message file is missing or of
            another size (see L{quarantine}).
        @raise SpoolError: the files cannot be read.
        """
        self._checkID(queueID)
        path = self._queueDir / f"{queueID}.json"
        try:
            with open(path, "rb") as f:
                data = f.read()
        except FileNotFoundError:
            raise EntryGone(
                f"no queue entry {queueID} ({path})", path=path, queueID=queueID
            ) from None
        except OSError as e:
            raise _osError("reading envelope", path, e, queueID) from None
        try:
            envelope = Envelope.fromJSON(data)
        except (ValueError, TypeError, KeyError, AttributeError) as e:
            problem = "empty" if not data else f"not a valid envelope: {e}"
            raise CorruptEntry(f"envelope {path} is {problem}", path=path, queueID=queueID) from e
        message = self._queueDir / f"{queueID}.eml"
        try:
            size = os.stat(message).st_size
        except FileNotFoundError:
            if not os.path.lexists(path):  # the whole entry was removed meanwhile
                raise EntryGone(
                    f"no queue entry {queueID} ({path})", path=path, queueID=queueID
                ) from None
            raise CorruptEntry(
                f"message file {message} is missing", path=message, queueID=queueID
            ) from None
        except OSError as e:
            raise _osError("checking", message, e, queueID) from None
        if envelope.messageSize and size != envelope.messageSize:
            raise CorruptEntry(
                f"message file {message} has {size} octets, the envelope records "
                f"{envelope.messageSize}",
                path=message,
                queueID=queueID,
            )
        return envelope

    def quarantine(self, queueID: str, problem: str) -> Deferred[list[Path]]:
        """Move the damaged entry C{queueID} (its C{.json}, and its C{.eml} if any) to
        C{corrupt/}, for the operator, in the next batch; log one line saying C{problem}
        and where the files went.

        @return: a L{Deferred} firing with the files' new paths, or failing with
            L{SpoolError} (the entry stays where it was).
        """
        self._checkID(queueID)
        if not self._running:
            return self._notStarted("quarantine", queueID)
        operation = _Quarantine(self, queueID)

        def moved(_: None) -> list[Path]:
            log.error(
                "{queueID}: damaged queue entry: {problem}; moved to {corrupt} ({names}) for "
                "the operator, not delivered",
                queueID=queueID,
                problem=problem,
                corrupt=str(self._corruptDir),
                names=", ".join(p.name for p in operation.moved),
            )
            return operation.moved

        return self._submit(operation).addCallback(moved)

    def hasFreeSpace(self, needed: int = 0) -> bool:
        """Whether C{needed} more octets leave at least C{minFreeSpace} free.

        The C{statvfs} result (or its failure) is reused for a second of C{reactor.seconds()}.
        A C{statvfs} failure is logged and answers C{False}.
        """
        now = self._reactor.seconds()
        checkedAt = self._freeSpaceCheckedAt
        if checkedAt is None or not (checkedAt <= now < checkedAt + _FREE_SPACE_CACHE_SECONDS):
            self._freeSpaceCheckedAt = now
            try:
                st = os.statvfs(self.directory)
            except OSError as e:
                self._freeSpace = None
                log.error(
                    "checking free space of spool {directory} failed: {error}",
                    directory=str(self.directory),
                    error=e.strerror or str(e),
                )
            else:
                self._freeSpace = st.f_bavail * st.f_frsize
        if self._freeSpace is None:
            return False
        return self._freeSpace - needed >= self.minFreeSpace

    # -- writing ------------------------------------------------------------------------------

    def _checkRunning(self, what: str) -> None:
        if not self._running:
            raise SpoolError(f"{what} in spool {self.directory}: the spool is not started")

    def openMessage(self, queueID: str | None = None) -> MessageWriter:
        """Create C{tmp/<queueID>.eml} and return a writer for it.

        @param queueID: the message's queue id; C{None}: a new one (L{newQueueID}).
        @raise SpoolError: the file cannot be created (or the entry already exists).
        @raise ValueError: C{queueID} is not a queue id.
        """
        if queueID is None:
            queueID = newQueueID()
        self._checkID(queueID)
        self._checkRunning(f"cannot open message {queueID}")
        for suffix in (".json", ".eml"):
            existing = self._queueDir / f"{queueID}{suffix}"
            if os.path.lexists(existing):
                raise SpoolError(
                    f"creating message {queueID} failed: {existing} already exists",
                    path=existing,
                    queueID=queueID,
                )
        path = self._tmpDir / f"{queueID}.eml"
        return MessageWriter(self, queueID, path, _SpillFile(path))

    def updateEnvelope(self, envelope: Envelope) -> Deferred[None]:
        """Durably replace the envelope of the committed entry C{envelope.queueID}.

        Written to a file in C{tmp/}, fsynced, renamed over C{queue/<ID>.json}, and C{queue/}
        fsynced, in the next batch.  After a crash the entry has the old or the new envelope.
        The envelope is serialised now.

        @return: a L{Deferred} firing with C{None}, or failing with L{SpoolError} (also when
            the entry does not exist).
        """
        queueID = envelope.queueID
        self._checkID(queueID)  # type: ignore[arg-type]
        assert queueID is not None
        if not self._running:
            return fail(
                SpoolError(
                    f"cannot update envelope {queueID}: spool {self.directory} is not started",
                    queueID=queueID,
                )
            )
        try:
            data = envelope.toJSON()
        except Exception as e:
            return fail(
                SpoolError(f"serialising envelope {queueID} failed: {e!r}", queueID=queueID)
            )
        self._updateSerial += 1
        return self._submit(_Update(self, queueID, data, self._updateSerial))

    def remove(self, queueID: str) -> Deferred[None]:
        """Remove the entry C{queueID}: its C{.json} first, then its C{.eml}, then fsync
        C{queue/}, in the next batch.  Removing an entry that does not exist succeeds.

        @return: a L{Deferred} firing with C{None}, or failing with L{SpoolError}.
        """
        self._checkID(queueID)
        if not self._running:
            return self._notStarted("remove", queueID)
        return self._submit(_Remove(self, queueID))

    def _notStarted(self, what: str, queueID: str) -> Deferred[Any]:
        return fail(
            SpoolError(
                f"cannot {what} {queueID}: spool {self.directory} is not started",
                queueID=queueID,
            )
        )

    # -- the group committer ------------------------------------------------------------------

    def _fsyncDirectory(self, path: Path) -> None:
        """fsync the directory C{path}; raises C{OSError}.  Runs in the committer's thread."""
        fd = os.open(path, os.O_RDONLY | _O_DIRECTORY | _O_CLOEXEC)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)

    def _fsyncDirectoryOrRaise(self, path: Path) -> None:
        try:
            self._fsyncDirectory(path)
        except OSError as e:
            raise _osError("fsync of directory", path, e, None) from None

    def _deferToThread(self, f: Callable[..., Any], *args: Any) -> Deferred[Any]:
        if self._injectedDeferToThread is not None:
            return self._injectedDeferToThread(f, *args)
        assert self._threadPool is not None
        return deferToThreadPool(self._reactor, self._threadPool, f, *args)

    def _submit(self, operation: _Operation) -> Deferred[None]:
        self._pending.append(operation)
        self._maybeStartBatch()
        return operation.deferred

    def _maybeStartBatch(self) -> None:
        if self._inFlight or not self._pending:
            return
        batch, self._pending = self._pending, []
        self._inFlight = True
        try:
            d = self._deferToThread(self._runBatch, batch)
        except Exception:
            d = fail()
        d.addBoth(self._batchFinished, batch)

    def _runBatch(self, batch: list[_Operation]) -> list[SpoolError | None]:
        """Run C{batch} (in the committer's thread).  Never raises: returns each entry's error
        or C{None}.

        Group commit in three steps: every entry writes its data; the data is made durable,
        with one C{syncfs} of the file system for the whole batch (or an fsync per file); then
        every entry renames or unlinks, and one fsync of C{queue/} makes that durable.  No
        entry becomes visible in C{queue/} before its data is on disk.
        """
        results: list[SpoolError | None] = [None] * len(batch)

        def failed(index: int, e: BaseException) -> None:
            operation = batch[index]
            if not isinstance(e, SpoolError):
                e = _osError(operation.kind, operation.queueID, e, operation.queueID)
            try:
                operation.rollback()
            except Exception as e2:  # pragma: no cover - rollback is best effort already
                operation.problems.append(f"rollback failed: {e2!r}")
            results[index] = e  # type: ignore[assignment]

        def alive() -> list[int]:
            return [i for i, r in enumerate(results) if r is None]

        for index, operation in enumerate(batch):
            try:
                operation.prepare()
            except Exception as e:
                failed(index, e)
        withData = [i for i in alive() if batch[i].hasData]
        if withData:
            if self._syncMethod == "syncfs" and commitModule._syncfs is not None:
                try:
                    self._syncFilesystem()
                except Exception as e:
                    for index in withData:
                        failed(index, _osError("syncfs of", self.directory, e, batch[index].queueID))
            else:
                for index in withData:
                    try:
                        batch[index].syncData()
                    except Exception as e:
                        failed(index, e)
        for index in alive():
            try:
                batch[index].publish()
            except Exception as e:
                failed(index, e)
        succeeded = alive()
        if succeeded:
            try:
                self._fsyncDirectory(self._queueDir)
            except Exception as e:
                for index in succeeded:
                    operation = batch[index]
                    results[index] = _osError(
                        "fsync of directory", self._queueDir, e, operation.queueID
                    )
                    try:
                        operation.directorySyncFailed()
                    except Exception as e2:  # pragma: no cover
                        operation.problems.append(f"rollback failed: {e2!r}")
        return results

    def _syncFilesystem(self) -> None:
        """syncfs(2) of the spool's file system; raises C{OSError}.  In the committer's
        thread."""
        syncfs = commitModule._syncfs
        assert syncfs is not None
        fd = os.open(self.directory, os.O_RDONLY | _O_DIRECTORY | _O_CLOEXEC)
        try:
            syncfs(fd)
        finally:
            os.close(fd)

    def _batchFinished(
        self,
        results: list[SpoolError | None] | Failure,
        batch: list[_Operation],
        fromStop: bool = False,
    ) -> None:
        """Fire each entry's Deferred (on the reactor thread), then start the next batch."""
        if isinstance(results, Failure):
            # Not the entries' failures (those come back as values): the thread call itself
            # failed, so the entries did not run.  Clean up here.
            log.failure("spool batch of {count} entries failed", results, count=len(batch))
            reason = results.getErrorMessage()
            errors: list[SpoolError | None] = []
            for operation in batch:
                operation.rollback()
                errors.append(
                    SpoolError(
                        f"{operation.kind} of {operation.queueID} in {self.directory} failed: "
                        f"{reason}",
                        queueID=operation.queueID,
                    )
                )
            results = errors
        try:
            for operation, error in zip(batch, results):
                for problem in operation.problems:
                    log.error(
                        "spool clean-up for {queueID}: {problem}",
                        queueID=operation.queueID,
                        problem=problem,
                    )
                operation.finished(error)
                if error is None:
                    # No log line here: the caller logs the outcome (one line per message).
                    operation.deferred.callback(None)
                else:
                    log.error(
                        "{kind} of {queueID} failed: {error}",
                        kind=operation.kind,
                        queueID=operation.queueID,
                        error=str(error),
                    )
                    operation.deferred.errback(error)
        finally:
            if not fromStop:
                self._inFlight = False
                self._maybeStartBatch()
                if self._releaseLockWhenIdle and not self._inFlight and not self._pending:
                    self._unlock()
