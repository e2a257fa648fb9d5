"""The spool's durable operations (commit, envelope update, removal, quarantine), run in
batches off the reactor thread: each one writes its data, the data is made durable (one
syncfs(2) for the whole batch, or an fsync per file), then each one renames or unlinks, and one
fsync of C{queue/} makes that durable.  No entry becomes visible in C{queue/} before its data
is on disk.

Removals may instead be made durable lazily (C{removalSyncDelay}, which the relay's processes
use): a removal is done once its files are unlinked, and the fsync of C{queue/} that makes the
unlinks durable is shared -- the next batch that syncs C{queue/} anyway covers them, or else
one sync at most C{removalSyncDelay} seconds later (and one when the spool stops).  What that
changes for exactly-once delivery: once unlinked, an entry is gone for every process, so a
crash of the relay (C{kill -9}, the delivery process dying) after the unlink can never bring it
back -- as before; the window in which a crash repeats a delivery (the next hop's 250, then the
unlink) is no longer, since removals no longer wait behind a directory fsync.  Only a crash of
the machine (power loss, kernel panic) may undo unlinks not yet synced, and so repeat the
deliveries of at most the last C{removalSyncDelay} seconds -- where before it was those whose
removal's fsync had not finished (and Postfix never syncs a removal at all).  Nothing accepted
can be lost by it: only removals are deferred, never a commit or an envelope update.
"""

from __future__ import annotations

import errno
import os
import time
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

from twisted.internet.defer import Deferred, fail
from twisted.internet.interfaces import IDelayedCall, IReactorFromThreads, IReactorTime
from twisted.internet.threads import deferToThreadPool
from twisted.logger import Logger
from twisted.python.failure import Failure
from twisted.python.threadpool import ThreadPool

from mailrelay.errors import SpoolError
from mailrelay.metrics import SPOOL_SYNC_BATCH, SPOOL_SYNC_SECONDS

if TYPE_CHECKING:  # pragma: no cover
    from mailrelay.spool.store import Spool
    from mailrelay.spool.writer import MessageWriter

log = Logger(namespace="mailrelay.spool")

_FILE_MODE = 0o600
_O_CLOEXEC = getattr(os, "O_CLOEXEC", 0)
_O_DIRECTORY = getattr(os, "O_DIRECTORY", 0)

#: How a batch makes its data durable: one syncfs(2) of the spool's file system for the whole
#: batch ("syncfs", Linux), or an fsync of each file ("fsync").  Measured here for 40 small
#: files: 0.8 ms with syncfs, 5.9 ms with 40 fsyncs.
SYNC_METHODS = ("syncfs", "fsync")


def _libcFunction(name: str, *argtypes: Any) -> Any:
    """The C library's function C{name} (C{errno} kept for L{_raiseErrno}), taking
    C{argtypes}; C{None} where there is none."""
    try:
        import ctypes

        # (The process's own symbols, the C library's among them: ctypes.util.find_library
        # would run ldconfig and parse its output, costing a child's start-up a few hundred
        # KiB of pages it shared with the relay.)
        libc = ctypes.CDLL(None, use_errno=True)
        function = getattr(libc, name)
    except (OSError, AttributeError, ImportError):  # pragma: no cover - not Linux/glibc
        return None
    function.argtypes = list(argtypes)
    return function


def _raiseErrno(*filenames: Any) -> None:
    """Raise C{OSError} for the C{errno} a L{_libcFunction} call left."""
    import ctypes

    number = ctypes.get_errno()
    raise OSError(number, os.strerror(number), *filenames)


def _loadSyncfs() -> Callable[[int], None] | None:
    """C{syncfs(fd)} from the C library, raising C{OSError}; C{None} where there is none."""
    import ctypes

    function = _libcFunction("syncfs", ctypes.c_int)
    if function is None:  # pragma: no cover - not Linux
        return None

    def syncfs(fd: int) -> None:
        if function(fd) != 0:
            _raiseErrno()

    return syncfs


_syncfs = _loadSyncfs()


def _loadRenameNoReplace() -> Callable[[str, str], None] | None:
    """C{renameat2(..., RENAME_NOREPLACE)} from the C library: a rename that fails with
    C{EEXIST} instead of replacing an existing entry, in one system call; C{None} where
    there is none (then L{_renameNoReplace} checks with C{lstat} first)."""
    import ctypes

    function = _libcFunction(
        "renameat2", ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint
    )
    if function is None:  # pragma: no cover - not Linux/glibc
        return None
    atFDCWD, noReplace = -100, 1

    def renameNoReplace(source: str, destination: str) -> None:
        if function(atFDCWD, os.fsencode(source), atFDCWD, os.fsencode(destination), noReplace):
            _raiseErrno(source, None, destination)

    return renameNoReplace


_renameat2 = _loadRenameNoReplace()


def _renameNoReplace(source: Path | str, destination: Path | str) -> None:
    """Rename C{source} to C{destination} unless C{destination} exists (C{FileExistsError}).
    With C{renameat2} one system call; where the kernel or file system lacks it (C{ENOSYS},
    C{EINVAL}), an C{lstat} first -- safe here as the committer's thread is the only one
    renaming into C{queue/}."""
    global _renameat2
    if _renameat2 is not None:
        try:
            _renameat2(str(source), str(destination))
            return
        except OSError as e:
            if e.errno not in (errno.ENOSYS, errno.EINVAL):
                raise
            _renameat2 = None
    if os.path.lexists(destination):
        raise FileExistsError(errno.EEXIST, os.strerror(errno.EEXIST), str(destination))
    os.rename(source, destination)


def _osError(what: str, path: Path | str, exc: BaseException, queueID: str | None) -> SpoolError:
    """Make a L{SpoolError} for C{exc} raised while doing C{what} to C{path}."""
    if isinstance(exc, OSError):
        reason = exc.strerror or str(exc)
        if exc.errno is not None:
            reason = f"{reason} ({errno.errorcode.get(exc.errno, exc.errno)})"
    else:
        reason = repr(exc)
    error = SpoolError(f"{what} {path} failed: {reason}", path=path, queueID=queueID)
    error.__cause__ = exc
    return error


# -- the operations (their run/rollback methods execute in the committer's thread)


def _unlinkQuietly(path: Path | str, problems: list[str]) -> bool:
    """Unlink C{path}; a missing file is fine; other errors are noted.  Return C{True} if a
    file was removed."""
    try:
        os.unlink(path)
    except FileNotFoundError:
        return False
    except OSError as e:
        problems.append(f"removing {path} failed: {e.strerror or e}")
        return False
    return True


def _openDirectory(path: Path | str) -> int:
    """A descriptor of the directory C{path}, to sync it; raises C{OSError}."""
    return os.open(path, os.O_RDONLY | _O_DIRECTORY | _O_CLOEXEC)


def _closeQuietly(fd: int | None) -> None:
    """Close C{fd} unless it is C{None}, ignoring a failure (nothing is left to tell)."""
    if fd is not None:
        try:
            os.close(fd)
        except OSError:  # pragma: no cover
            pass


def _writeAll(fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        written = os.write(fd, view)
        view = view[written:]


#: The spool directories L{remakeDirectory} created again, to be logged on the reactor
#: thread (L{logRemade}); appended to by the committer's thread.
_remade: list[str] = []


def remakeDirectory(directory: str) -> bool:
    """Create again the spool's C{tmp/} or C{queue/} C{directory} (mode 0700) if it is missing
    (removed by hand), as Postfix's mail_queue_enter() and mail_queue_open() create a missing
    queue directory (global/mail_queue.c); whether it is there now.  Only in a spool that
    still has its C{lock} file: nothing is created where the spool itself is gone (emptied,
    or another file system mounted over it).  Logs nothing (it may run in a thread): see
    L{logRemade}.

    @raise OSError: it cannot be created, or its creation made durable.
    """
    parent = os.path.dirname(directory)
    if os.path.isdir(directory):
        return True
    if not os.path.exists(os.path.join(parent, "lock")):
        return False
    try:
        os.mkdir(directory, 0o700)
    except FileExistsError:
        return True
    fd = _openDirectory(parent)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
    _remade.append(directory)
    return True


def logRemade() -> None:
    """Log the spool directories created again since the last call (on the reactor
    thread)."""
    while _remade:
        log.warn(
            "spool: directory {path} was missing (removed by hand?); created again",
            path=_remade.pop(0),
        )


def openNew(path: Path | str) -> int:
    """Create the file C{path}, which must not exist, for writing (mode 0600); its
    directory too if it was removed by hand (L{remakeDirectory}).

    @raise OSError: it cannot be created.
    """
    flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | _O_CLOEXEC
    try:
        return os.open(path, flags, _FILE_MODE)
    except FileNotFoundError:
        if not remakeDirectory(os.path.dirname(path)):
            raise
    return os.open(path, flags, _FILE_MODE)


def _createAndWrite(path: Path | str, data: bytes, queueID: str | None) -> int:
    """Create C{path} (which must not exist) and write C{data}; return the open descriptor
    (to fsync, then close).  Raises L{SpoolError}, leaving nothing open."""
    try:
        fd = openNew(path)
    except OSError as e:
        raise _osError("creating", path, e, queueID) from None
    try:
        _writeAll(fd, data)
    except OSError as e:
        os.close(fd)
        raise _osError("writing", path, e, queueID) from None
    return fd


class _Operation:
    """One entry of a batch.

    L{run} and L{rollback} run in the committer's thread and must not log; anything worth
    telling the operator goes into L{problems} and is logged on the reactor thread.

    @ivar deferred: fired on the reactor thread with the entry's result.
    @ivar problems: clean-up failures to log.
    """

    kind = "operation"

    def __init__(self, spool: Spool, queueID: str) -> None:
        self.spool = spool
        self.queueID = queueID
        self.deferred: Deferred[None] = Deferred()
        self.problems: list[str] = []

    #: Does L{prepare} write data that must be made durable before L{publish}?
    hasData = True
    #: May the fsync of C{queue/} after L{publish} be deferred (see C{removalSyncDelay})?
    lazySync = False
    #: Does L{publish} take the entry out of C{queue/}?  An envelope update of it later in
    #: the same batch then fails (see L{GroupCommitter._runBatch}).
    removesEntry = False

    def run(self) -> None:
        """Do the work, short of the directory fsync; raise L{SpoolError} on failure."""
        self.prepare()
        self.syncData()
        self.publish()

    def prepare(self) -> None:
        """Write the data (not yet durable)."""

    def syncData(self) -> None:
        """fsync what L{prepare} wrote (unless the batch synced the whole file system)."""

    def publish(self) -> None:
        """Once the data is durable: the renames or unlinks that make the change visible."""

    def rollback(self) -> None:
        """Undo whatever L{run} did, after it failed; best effort."""

    def directorySyncFailed(self) -> None:
        """L{run} succeeded but the batch's directory fsync failed; undo if that is safe."""

    def finished(self, error: SpoolError | None) -> None:
        """On the reactor thread, before L{deferred} fires."""

    #: The open temporary envelope file written by L{prepare}, if any.
    envelopeFD: int | None = None

    def _closeEnvelope(self) -> None:
        fd, self.envelopeFD = self.envelopeFD, None
        _closeQuietly(fd)


class _Commit(_Operation):
    kind = "commit"

    def __init__(self, writer: MessageWriter, envelopeData: bytes) -> None:
        super().__init__(writer._spool, writer.queueID)
        self.writer = writer
        self.envelopeData = envelopeData
        spool = writer._spool
        # Plain strings, joined once: four Path objects a message were 4% of the reactor's
        # time under load.
        tmp, queue, queueID = f"{spool._tmpDir}/", f"{spool._queueDir}/", self.queueID
        self.tmpMessage = writer.path  # (the file the writer made)
        self.tmpEnvelope = tmp + queueID + ".json"
        self.message = queue + queueID + ".eml"
        self.envelope = queue + queueID + ".json"
        self.messageRenamed = False
        self.envelopeRenamed = False
        self.envelopeFD: int | None = None

    def prepare(self) -> None:
        """Write the body to its temporary file and the envelope beside it."""
        queueID = self.queueID
        f = self.writer._file
        assert f is not None
        try:
            f.flush()
        except OSError as e:
            raise _osError("writing", self.tmpMessage, e, queueID) from None
        self.envelopeFD = _createAndWrite(self.tmpEnvelope, self.envelopeData, queueID)

    def syncData(self) -> None:
        queueID = self.queueID
        f = self.writer._file
        try:
            os.fsync(f.fileno())
        except OSError as e:
            raise _osError("fsync of", self.tmpMessage, e, queueID) from None
        assert self.envelopeFD is not None
        try:
            os.fsync(self.envelopeFD)
        except OSError as e:
            raise _osError("fsync of", self.tmpEnvelope, e, queueID) from None

    def publish(self) -> None:
        """Rename the body, then the envelope (which marks the entry), into queue/."""
        queueID = self.queueID
        self._closeEnvelope()
        try:
            self.writer._file.close()
        except OSError as e:  # pragma: no cover - nothing left to flush
            raise _osError("closing", self.tmpMessage, e, queueID) from None
        # Never replace a committed entry (two writers given one id): each rename fails if
        # its destination exists (and the rollback then removes only what we renamed).
        try:
            try:
                _renameNoReplace(self.tmpMessage, self.message)
            except FileNotFoundError:
                if not remakeDirectory(os.path.dirname(self.message)):
                    raise
                _renameNoReplace(self.tmpMessage, self.message)
        except FileExistsError:
            self._exists(self.message)
        except OSError as e:
            where = f"{self.tmpMessage} to {self.message}"
            raise _osError("renaming", where, e, queueID) from None
        self.messageRenamed = True
        try:
            _renameNoReplace(self.tmpEnvelope, self.envelope)
        except FileExistsError:
            self._exists(self.envelope)
        except OSError as e:
            where = f"{self.tmpEnvelope} to {self.envelope}"
            raise _osError("renaming", where, e, queueID) from None
        self.envelopeRenamed = True

    def _exists(self, existing: str) -> None:
        raise SpoolError(
            f"committing message {self.queueID} failed: {existing} already exists",
            path=existing,
            queueID=self.queueID,
        )

    def rollback(self) -> None:
        """Close the body; remove the temporary files and anything renamed into queue/."""
        self._closeEnvelope()
        self.writer._closeQuietly()
        # The .json first: should we crash in between, an orphan .eml is what start() removes.
        if self.envelopeRenamed:
            _unlinkQuietly(self.envelope, self.problems)
        if self.messageRenamed:
            _unlinkQuietly(self.message, self.problems)
        _unlinkQuietly(self.tmpEnvelope, self.problems)
        _unlinkQuietly(self.tmpMessage, self.problems)
        self.messageRenamed = self.envelopeRenamed = False

    def directorySyncFailed(self) -> None:
        """Remove the entry from queue/."""
        # The entry is in queue/ but not known durable; the client will be told to retry, so
        # the entry must go (else it could be relayed twice, or half-survive a crash).
        self.rollback()

    def finished(self, error: SpoolError | None) -> None:
        """Record the outcome in the writer."""
        self.writer._finished(error)


class _Update(_Operation):
    kind = "envelope update"

    def __init__(self, spool: Spool, queueID: str, envelopeData: bytes, serial: int) -> None:
        super().__init__(spool, queueID)
        self.envelopeData = envelopeData
        self.tmpEnvelope = spool._tmpDir / f"{queueID}.update-{serial}.json"
        self.envelope = spool._queueDir / f"{queueID}.json"
        self.envelopeFD: int | None = None

    def prepare(self) -> None:
        """Write the new envelope in tmp/."""
        if not os.path.exists(self.envelope):
            raise self.noSuchEntry()
        self.envelopeFD = _createAndWrite(self.tmpEnvelope, self.envelopeData, self.queueID)

    def noSuchEntry(self) -> SpoolError:
        """The error of an update of an entry that is not (or no longer) in C{queue/}."""
        return SpoolError(
            f"updating envelope {self.envelope} failed: no such queue entry",
            path=self.envelope,
            queueID=self.queueID,
        )

    def syncData(self) -> None:
        try:
            os.fsync(self.envelopeFD)  # type: ignore[arg-type]
        except OSError as e:
            raise _osError("fsync of", self.tmpEnvelope, e, self.queueID) from None

    def publish(self) -> None:
        """Rename the new envelope over the old one."""
        self._closeEnvelope()
        try:
            os.rename(self.tmpEnvelope, self.envelope)
        except OSError as e:
            where = f"{self.tmpEnvelope} to {self.envelope}"
            raise _osError("renaming", where, e, self.queueID) from None

    def rollback(self) -> None:
        """Remove the temporary envelope."""
        self._closeEnvelope()
        _unlinkQuietly(self.tmpEnvelope, self.problems)


class _Remove(_Operation):
    kind = "removal"
    lazySync = True
    removesEntry = True

    def __init__(self, spool: Spool, queueID: str) -> None:
        super().__init__(spool, queueID)
        self.envelope = spool._queueDir / f"{queueID}.json"
        self.message = spool._queueDir / f"{queueID}.eml"

    hasData = False

    def publish(self) -> None:
        """Unlink the .json, then the .eml."""
        # The .json first: it is what marks the entry; a crash in between leaves an orphan
        # .eml, which start() removes.  Removing an entry already gone is not an error.
        for path in (self.envelope, self.message):
            try:
                os.unlink(path)
            except FileNotFoundError:
                pass
            except OSError as e:
                raise _osError("removing", path, e, self.queueID) from None


class _DirectorySync(_Operation):
    """Nothing but the batch's fsync of C{queue/}: for removals whose sync was deferred."""

    kind = "directory sync"
    hasData = False

    def __init__(self) -> None:
        self.queueID = ""
        self.deferred = Deferred()
        self.problems = []


class _Quarantine(_Operation):
    kind = "quarantine"
    removesEntry = True

    def __init__(self, spool: Spool, queueID: str) -> None:
        super().__init__(spool, queueID)
        self.moved: list[Path] = []

    hasData = False

    def publish(self) -> None:
        """Move the .eml, then the .json, to corrupt/."""
        self.moved = self.spool._moveToCorrupt(self.queueID)


# -- the group committer


class GroupCommitter:
    """Runs the spool's operations in batches off the reactor thread: at most one batch is in
    flight, and everything submitted meanwhile runs as the next batch, sharing one syncfs (or
    fsync per file) and one fsync of C{queue/}.

    @ivar threadPool: the thread pool it owns between L{start} and L{stop}, or C{None}.
    """

    def __init__(
        self,
        directory: Path,
        queueDir: Path,
        reactor: IReactorFromThreads,
        *,
        syncMethod: str,
        deferToThread: Callable[..., Deferred[Any]] | None = None,
        clock: IReactorTime | None = None,
        removalSyncDelay: float = 0.0,
    ) -> None:
        """
        @param directory: the spool directory (its file system is the one synced).
        @param queueDir: the directory fsynced after every batch.
        @param reactor: what the thread pool's results are handed back through (unused when
            C{deferToThread} is given).
        @param syncMethod: one of L{SYNC_METHODS}.
        @param deferToThread: C{callable(f, *args)} returning a L{Deferred} of C{f(*args)} run
            off the reactor thread and fired on it; C{None}: a thread pool of its own.
        @param clock: what schedules the deferred sync of removals (needed when
            C{removalSyncDelay} is positive).
        @param removalSyncDelay: 0: a removal is done once C{queue/} is fsynced after its
            unlinks, in its batch; else once unlinked, the fsync shared with later batches and
            done at most this many seconds later (see the module's docstring).
        """
        if removalSyncDelay < 0 or (removalSyncDelay and clock is None):
            raise ValueError("removalSyncDelay must be >= 0, and needs a clock")
        self._clock = clock
        self.removalSyncDelay = removalSyncDelay
        #: Removals unlinked whose directory fsync is still to come (set in the thread).
        self._unsynced = False
        self._syncCall: IDelayedCall | None = None
        self._running = False
        self.directory = directory
        self.queueDir = queueDir
        self._reactor = reactor
        self._syncMethod = syncMethod
        self._injectedDeferToThread = deferToThread
        self.threadPool: ThreadPool | None = None
        self._pending: list[_Operation] = []
        self._inFlight = False
        self._whenIdle: Callable[[], None] | None = None
        #: The spool directory (for syncfs), open between L{start} and the end of L{stop}
        #: (see L{_openDirectories}); C{None}: opened per use.
        self._directoryFD: int | None = None

    @property
    def busy(self) -> bool:
        """Whether a batch is in flight or operations wait for one."""
        return self._inFlight or bool(self._pending)

    def start(self) -> None:
        """Start the thread pool (unless C{deferToThread} was given)."""
        self._whenIdle = None
        self._running = True
        self._openDirectories()
        if self._injectedDeferToThread is None:
            self.threadPool = ThreadPool(minthreads=1, maxthreads=4, name="mailrelay-spool")
            self.threadPool.start()

    def stop(self, whenIdle: Callable[[], None]) -> None:
        """Stop the owned thread pool, and call C{whenIdle} once no operation is left.

        With the owned pool, waits for the batch in flight to finish its file work (its
        L{Deferred}s fire later, through the reactor) and runs any queued batch right here, so
        every operation submitted before C{stop} completes.  With an injected
        C{deferToThread}, queued operations keep going through it.
        """
        pool, self.threadPool = self.threadPool, None
        self._running = False
        if self._syncCall is not None and self._syncCall.active():
            self._syncCall.cancel()
        self._syncCall = None
        if pool is not None:
            pool.stop()
            if self._unsynced:
                self._pending.append(_DirectorySync())
            if self._pending:
                batch, self._pending = self._pending, []
                self._batchFinished(self._runBatch(batch), batch, fromStop=True)
            self._closeDirectories()
            whenIdle()
            return
        if self._unsynced:
            self.submit(_DirectorySync())
        if self.busy:
            self._whenIdle = whenIdle
        else:
            self._closeDirectories()
            whenIdle()

    def _openDirectories(self) -> None:
        """Open the spool directory once for every batch's C{syncfs} until L{stop}: an
        C{open} and a C{close} fewer in the committer's thread per batch.  One that cannot
        be opened here is opened per use, as before (its error then fails that batch's
        entries).  (Not C{queue/}, fsynced through a descriptor opened by its path each
        batch: a C{queue/} removed by hand and created again, by this process or another,
        is a new directory, and a descriptor kept from start would sync the removed one,
        leaving the renames into the new one not durable.  C{syncfs} syncs the whole file
        system, whichever of its directories it is given.)"""
        try:
            self._directoryFD = _openDirectory(self.directory)
        except OSError:
            self._directoryFD = None

    def _closeDirectories(self) -> None:
        """Close what L{_openDirectories} opened; when no batch is in flight."""
        fd, self._directoryFD = self._directoryFD, None
        _closeQuietly(fd)

    def fsyncDirectory(self, path: Path) -> None:
        """fsync the directory C{path}; raises C{OSError}.  Runs in the committer's thread."""
        fd = _openDirectory(path)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)

    def fsyncDirectoryOrRaise(self, path: Path) -> None:
        try:
            self.fsyncDirectory(path)
        except OSError as e:
            raise _osError("fsync of directory", path, e, None) from None

    def deferToThread(self, f: Callable[..., Any], *args: Any) -> Deferred[Any]:
        """C{f(*args)} in the committer's thread pool (or through the C{deferToThread} it
        was given), its result fired on the reactor thread; beside the batches, for the
        spool's other file work (the sweep of C{tmp/})."""
        if self._injectedDeferToThread is not None:
            return self._injectedDeferToThread(f, *args)
        assert self.threadPool is not None
        return deferToThreadPool(self._reactor, self.threadPool, f, *args)

    def submit(self, operation: _Operation) -> Deferred[None]:
        self._pending.append(operation)
        self._maybeStartBatch()
        return operation.deferred

    def _maybeStartBatch(self) -> None:
        if self._inFlight or not self._pending:
            return
        batch, self._pending = self._pending, []
        self._inFlight = True
        try:
            d = self.deferToThread(self._runBatch, batch)
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

        The entries publish in the order they were submitted, after all have prepared: an
        envelope update that follows a removal (or quarantine) of its entry fails as for an
        entry gone, since its rename would bring the C{.json} back without its message.
        """
        started = time.perf_counter()
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

        removed: set[str] = set()
        for index, operation in enumerate(batch):
            try:
                if isinstance(operation, _Update) and operation.queueID in removed:
                    raise operation.noSuchEntry()
                operation.prepare()
            except Exception as e:
                failed(index, e)
            if operation.removesEntry:
                removed.add(operation.queueID)
        withData = [i for i in alive() if batch[i].hasData]
        if withData:
            if self._syncMethod == "syncfs" and _syncfs is not None:
                try:
                    self._syncFilesystem()
                except Exception as e:
                    for index in withData:
                        queueID = batch[index].queueID
                        failed(index, _osError("syncfs of", self.directory, e, queueID))
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
        lazy = self.removalSyncDelay > 0
        if lazy and all(batch[i].lazySync for i in succeeded):
            # Removals only: done once unlinked; their fsync is shared with a later batch.
            self._unsynced = self._unsynced or bool(succeeded)
            succeeded = []
        if succeeded:
            try:
                self.fsyncDirectory(self.queueDir)
                self._unsynced = False  # the unlinks of earlier batches are durable too
            except Exception as e:
                for index in succeeded:
                    operation = batch[index]
                    if lazy and operation.lazySync:
                        self._unsynced = True  # unlinked all the same: synced later
                        continue
                    results[index] = _osError(
                        "fsync of directory", self.queueDir, e, operation.queueID
                    )
                    try:
                        operation.directorySyncFailed()
                    except Exception as e2:  # pragma: no cover
                        operation.problems.append(f"rollback failed: {e2!r}")
        SPOOL_SYNC_BATCH.observe(len(batch))
        SPOOL_SYNC_SECONDS.observe(time.perf_counter() - started)
        return results

    def _scheduleRemovalSync(self, justTried: bool) -> None:
        """Removals are unlinked but not synced: sync C{queue/} in C{removalSyncDelay}
        seconds; or, once stopped, before going idle (or here, once the owned pool is gone)."""
        if self._running:
            if self._syncCall is None:
                assert self._clock is not None
                self._syncCall = self._clock.callLater(self.removalSyncDelay, self._syncRemovals)
        elif self._injectedDeferToThread is not None:
            if not justTried:
                self._pending.append(_DirectorySync())
        else:
            try:
                self.fsyncDirectoryOrRaise(self.queueDir)
                self._unsynced = False
            except SpoolError as e:
                log.error("spool: syncing the removals at stop failed: {error}", error=str(e))

    def _syncRemovals(self) -> None:
        """The deferred fsync of C{queue/} after removals, unless a batch did it meanwhile;
        a failure (logged by L{_batchFinished}) is retried after the same delay."""
        self._syncCall = None
        if self._unsynced:
            self.submit(_DirectorySync()).addErrback(lambda _: None)

    def _syncFilesystem(self) -> None:
        """syncfs(2) of the spool's file system; raises C{OSError}.  In the committer's
        thread."""
        syncfs = _syncfs
        assert syncfs is not None
        if self._directoryFD is not None:
            syncfs(self._directoryFD)
            return
        fd = _openDirectory(self.directory)
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
        logRemade()
        try:
            for operation, error in zip(batch, results, strict=True):
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
            if self._unsynced and not fromStop:
                self._scheduleRemovalSync(any(isinstance(o, _DirectorySync) for o in batch))
            if not fromStop:
                self._inFlight = False
                self._maybeStartBatch()
                if self._whenIdle is not None and not self.busy:
                    whenIdle, self._whenIdle = self._whenIdle, None
                    self._closeDirectories()
                    whenIdle()
