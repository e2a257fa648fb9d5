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

import errno
import fcntl
import os
import secrets
import stat
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, cast

from twisted.internet.defer import Deferred, fail
from twisted.internet.interfaces import IReactorFromThreads, IReactorTime
from twisted.logger import Logger, LogLevel
from zope.interface import implementer

from mailrelay.envelope import Envelope
from mailrelay.errors import CorruptEntry, EntryGone, SpoolError
from mailrelay.interfaces import ISpool
from mailrelay.lograte import RepeatedProblem
from mailrelay.spool.commit import (
    _FILE_MODE,
    _O_CLOEXEC,
    SYNC_METHODS,
    GroupCommitter,
    _Operation,
    _osError,
    _Quarantine,
    _Remove,
    _Update,
)
from mailrelay.spool.ids import isQueueID, newQueueID
from mailrelay.spool.writer import MessageWriter, _SpillFile

log = Logger(namespace="mailrelay.spool")

__all__ = ["MIN_FREE_INODES", "REMOVAL_SYNC_DELAY", "Spool"]

_DIR_MODE = 0o700

#: Seconds within which the relay's spools make a removal durable (the fsync of C{queue/}
#: after its unlinks, shared by every removal meanwhile; see L{mailrelay.spool.commit}).
REMOVAL_SYNC_DELAY = 1.0
_FREE_SPACE_CACHE_SECONDS = 1.0
#: Within this many octets above C{minFreeSpace}, the free space is read at every check: a
#: burst of messages within the second of a cached answer could go past the minimum.
_FREE_SPACE_MARGIN = 256 << 20
#: Inodes that must stay free on the spool's file system (when C{minFreeSpace} is set and
#: the file system counts inodes): a message takes two, and the queue needs some for its own
#: work (envelope updates, bounces).
MIN_FREE_INODES = 16
#: Below this many free inodes, they are read at every check (see L{_FREE_SPACE_MARGIN}).
_FREE_INODES_MARGIN = 4096


@implementer(ISpool)
class Spool:
    """The spool directory: recovery at start-up, reading entries, message writers; the
    durable work goes through a L{GroupCommitter}.

    @ivar directory: the spool directory.
    @ivar minFreeSpace: octets that must stay free on the spool's file system.
    """

    def __init__(
        self,
        directory: Path,
        *,
        reactor: IReactorTime,
        minFreeSpace: int = 0,
        deferToThread: Callable[..., Deferred[Any]] | None = None,
        syncMethod: str = "syncfs",
        recover: bool = True,
        removalSyncDelay: float = 0.0,
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
        @param removalSyncDelay: 0: a removal is done once the fsync of C{queue/} after its
            unlinks is; else once unlinked, that fsync shared with later batches and done at
            most this many seconds later (L{mailrelay.spool.commit}; the relay uses
            L{REMOVAL_SYNC_DELAY}).
        """
        self.directory = Path(directory)
        self.minFreeSpace = minFreeSpace
        if syncMethod not in SYNC_METHODS:
            raise ValueError(f"syncMethod must be one of {SYNC_METHODS}, not {syncMethod!r}")
        self._recoverAtStart = recover
        self._reactor = reactor
        self._tmpDir = self.directory / "tmp"
        self._queueDir = self.directory / "queue"
        self._corruptDir = self.directory / "corrupt"
        self._lock = _DirectoryLock(self.directory / "lock")
        self._committer = GroupCommitter(
            self.directory,
            self._queueDir,
            # Only used when there is no deferToThread: then it is the reactor, which is both.
            cast(IReactorFromThreads, reactor),
            syncMethod=syncMethod,
            deferToThread=deferToThread,
            clock=reactor,
            removalSyncDelay=removalSyncDelay,
        )
        self._running = False
        self._updateSerial = 0
        self._freeSpaceCheckedAt: float | None = None
        self._freeSpace: int | None = None
        #: Free inodes, or C{None} when the file system counts none (btrfs).
        self._freeInodes: int | None = None
        #: The log of a lasting lack of room (L{hasFreeSpace}).
        self._noRoom = RepeatedProblem(log, lambda: self._reactor.seconds())

    # -- life cycle ---------------------------------------------------------------------------

    @property
    def running(self) -> bool:
        """Started and not stopped: it takes work."""
        return self._running

    def prepareFor(self, uid: int, gid: int) -> None:
        """Make the spool the user C{uid}'s (group C{gid}): create its directory and C{tmp/}
        and C{queue/} if missing (mode 0700), and give it, with everything in it, to that
        user (symbolic links are not followed).  For a relay started as root that drops its
        privileges (twistd's C{--uid}/C{--gid}): called as root, before the drop; L{start}
        comes after it, as that user.  (C{-1} leaves the owner or the group as it is.)

        @raise SpoolError: a directory cannot be created, or something cannot be given.
        """
        _makeDirectories([self.directory, self._tmpDir, self._queueDir])
        paths = [self.directory]
        for root, dirs, files in os.walk(self.directory):
            paths += [Path(root, name) for name in dirs + files]
        for path in paths:
            try:
                os.chown(path, uid, gid, follow_symlinks=False)
            except OSError as e:
                raise _osError(f"giving to user {uid} (group {gid})", path, e, None) from None

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
        if self._committer.busy:
            raise RuntimeError(f"spool {self.directory} still has operations from its last run")
        created = _makeDirectories([self.directory, self._tmpDir, self._queueDir])
        exclusive = self._lock.acquire(tryExclusive=self._recoverAtStart)
        try:
            _probeWritable(self._tmpDir)
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
            self._lock.share()
        except BaseException:
            self._lock.release()
            raise
        self._committer.start()
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
        self._committer.stop(whenIdle=self._lock.release)

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
                "spool recovery: removed message {path} without envelope (a commit or a removal "
                "cut short: never acknowledged, or done with)",
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

    def sweepTemporary(self, olderThan: float) -> list[str]:
        """Remove the files of C{tmp/} nobody has written to for C{olderThan} seconds: what
        a process that ended while it wrote left there (an acceptor process or C{sendmail}
        killed during a message, the delivery process during an envelope update).  Never
        acknowledged, and in no process's hands any more: a file being written is written
        to as the data arrives (and locked by its writer meanwhile, should a client trickle
        into the writer's buffer for long), and renamed within milliseconds once
        complete.  (A start that finds the spool free removes them all; a relay that
        runs for weeks does this every hour, off the reactor thread: L{sweepInThread}.)

        @return: the names removed.
        """
        return self._logSwept(_findAndRemoveStale(self._tmpDir, olderThan))

    def sweepInThread(self, olderThan: float) -> Deferred[list[str]]:
        """L{sweepTemporary} with its directory walk, stats and unlinks in the spool's
        thread (a large or slow C{tmp/} never stalls the reactor); its log lines are written
        when the L{Deferred} fires, on the reactor thread."""
        d = self._committer.deferToThread(_findAndRemoveStale, self._tmpDir, olderThan)
        return d.addCallback(self._logSwept)

    def _logSwept(self, swept: _Swept) -> list[str]:
        if swept.error is not None:
            log.warn("spool: cannot list {path}: {error}", path=str(self._tmpDir),
                     error=swept.error)
        for name, path, age in swept.removed:
            queueID = name.split(".", 1)[0]
            log.warn(
                "spool: removed stale partial file {path} (not written to for {hours:.0f} "
                "hours: left by a process that ended while writing it, never acknowledged)",
                path=path,
                hours=age / 3600,
                queueID=queueID if isQueueID(queueID) else None,
            )
        return [name for name, _, _ in swept.removed]

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
        moved: list[Path] = []
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

        The C{statvfs} result (or its failure) is reused for a second of C{reactor.seconds()},
        unless it was within L{_FREE_SPACE_MARGIN} of the minimum: then every check reads it
        again, as Postfix's smtpd does at each MAIL.  A C{statvfs} failure is logged and
        answers C{False}; so is a shortage (as a warning naming the octets free).  While
        it lasts, it is logged at most once a minute, and its end once
        (L{RepeatedProblem}): a full disk does not flood the log.

        Unless C{minFreeSpace} is 0, fewer than L{MIN_FREE_INODES} free inodes is a
        shortage too: mail is refused at MAIL, as Postfix's smtpd refuses it at MAIL when
        its cleanup cannot create the queue file, not after the whole message.
        """
        now = self._reactor.seconds()
        checkedAt = self._freeSpaceCheckedAt
        known = self._freeSpace
        near = known is not None and known - needed - self.minFreeSpace < _FREE_SPACE_MARGIN
        near = near or (self._freeInodes is not None and self._freeInodes < _FREE_INODES_MARGIN)
        if (checkedAt is None or near
                or not checkedAt <= now < checkedAt + _FREE_SPACE_CACHE_SECONDS):
            self._freeSpaceCheckedAt = now
            try:
                st = os.statvfs(self.directory)
            except OSError as e:
                self._freeSpace = None
                self._noRoom.occurred(
                    LogLevel.error,
                    "checking free space of spool {directory} failed: {error}",
                    directory=str(self.directory),
                    error=e.strerror or str(e),
                )
            else:
                self._freeSpace = st.f_bavail * st.f_frsize
                self._freeInodes = st.f_favail if st.f_files else None
        if self._freeSpace is None:
            return False
        inodes = self._freeInodes
        if self.minFreeSpace and inodes is not None and inodes < MIN_FREE_INODES:
            self._noRoom.occurred(
                LogLevel.warn,
                "not enough free inodes in spool {directory}: {inodes} free, fewer than "
                "{minimum}; new mail is refused (452 4.3.1)",
                directory=str(self.directory),
                inodes=inodes,
                minimum=MIN_FREE_INODES,
            )
            return False
        if self._freeSpace - needed >= self.minFreeSpace:
            self._noRoom.over(
                "enough free space in spool {directory} again: {free} free, min_free_space "
                "= {minimum}; new mail is accepted",
                directory=str(self.directory),
                free=self._freeSpace,
                minimum=self.minFreeSpace,
            )
            return True
        # As Postfix's smtpd: "warning: not enough free space in mail queue".
        self._noRoom.occurred(
            LogLevel.warn,
            "not enough free space in spool {directory} for {needed} more octets: "
            "{free} free, min_free_space = {minimum}; new mail is refused (452 4.3.1)",
            directory=str(self.directory),
            needed=needed,
            free=self._freeSpace,
            minimum=self.minFreeSpace,
        )
        return False

    # -- writing ------------------------------------------------------------------------------

    def _checkRunning(self, what: str) -> None:
        if not self._running:
            raise SpoolError(f"{what} in spool {self.directory}: the spool is not started")

    def newQueueID(self) -> str:
        """A new queue id (see L{ISpool.newQueueID})."""
        return newQueueID()

    def openMessage(self, queueID: str | None = None) -> MessageWriter:
        """Create C{tmp/<queueID>.eml} and return a writer for it.

        @param queueID: the message's queue id; C{None}: a new one (L{newQueueID}).
        @raise SpoolError: the file cannot be created (or the entry already exists).
        @raise ValueError: C{queueID} is not a queue id.
        """
        given = queueID is not None
        if queueID is None:
            queueID = newQueueID()
        self._checkID(queueID)
        self._checkRunning(f"cannot open message {queueID}")
        # A given id may be taken: say so now.  A new one cannot be (and should it ever be,
        # the commit refuses to replace an entry all the same): no lstat on the reactor's
        # thread for each message.
        for suffix in (".json", ".eml") if given else ():
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
            the entry does not exist, or a removal or quarantine of it comes before in its batch).
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
        C{queue/}, in the next batch (with C{removalSyncDelay}, done once unlinked, and the
        fsync shared, see L{mailrelay.spool.commit}).  Removing an entry that does not exist
        succeeds.

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

    def _fsyncDirectoryOrRaise(self, path: Path) -> None:
        self._committer.fsyncDirectoryOrRaise(path)

    def _submit(self, operation: _Operation) -> Deferred[None]:
        return self._committer.submit(operation)


# -- start-up helpers


def _unlinkUnlocked(path: str) -> bool:
    """Remove C{path} unless a process holds a lock on it (a message writer does while it
    writes: L{mailrelay.spool.writer}); whether it was removed."""
    fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | _O_CLOEXEC)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            return False
        os.unlink(path)
        return True
    finally:
        os.close(fd)


def _makeDirectories(paths: list[Path]) -> list[Path]:
    """Create each of C{paths} (mode 0700, the first with its parents) that is missing;
    return those created."""
    created = []
    for path in paths:
        if path.is_dir():
            continue
        try:
            if path == paths[0]:
                os.makedirs(path, _DIR_MODE)
            else:
                os.mkdir(path, _DIR_MODE)
        except OSError as e:
            raise _osError("creating spool directory", path, e, None) from None
        created.append(path)
        log.info("created spool directory {path}", path=str(path))
    return created


def _probeWritable(directory: Path) -> None:
    """Create and remove a file in C{directory}, or raise L{SpoolError}.

    A file system full (no inode left, or the quota reached) is no reason not to start: the
    queue is delivered, which frees space, while new mail gets 4xx replies (Postfix's qmgr
    starts too); it is logged.
    """
    probe = directory / f".probe-{os.getpid()}-{secrets.token_hex(4)}"
    try:
        fd = os.open(probe, os.O_WRONLY | os.O_CREAT | os.O_EXCL | _O_CLOEXEC, _FILE_MODE)
    except OSError as e:
        error = _osError("writing to spool directory", directory, e, None)
        if e.errno not in (errno.ENOSPC, errno.EDQUOT):
            raise error from None
        log.error(
            "spool {directory} is full: {error}; queued mail is delivered, new mail is "
            "refused until space is freed",
            directory=str(directory.parent),
            error=str(error),
        )
        return
    os.close(fd)
    try:
        os.unlink(probe)
    except OSError as e:
        raise _osError("removing", probe, e, None) from None


class _DirectoryLock:
    """The C{flock} on the spool's C{lock} file: shared by every process using the spool,
    exclusive for the one doing crash recovery."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._fd: int | None = None

    def acquire(self, tryExclusive: bool) -> bool:
        """Lock, exclusively if C{tryExclusive} and no other process holds it, else shared;
        return whether the lock is exclusive.  @raise SpoolError: it cannot be taken."""
        try:
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT | _O_CLOEXEC, _FILE_MODE)
        except OSError as e:
            raise _osError("opening spool lock", self.path, e, None) from None
        self._fd = fd
        try:
            if tryExclusive:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                return True
        except BlockingIOError:
            pass
        except OSError as e:
            self.release()
            raise _osError("locking", self.path, e, None) from None
        self.share()
        return False

    def share(self) -> None:
        """Turn the lock into a shared one.  @raise SpoolError: it cannot."""
        assert self._fd is not None
        try:
            fcntl.flock(self._fd, fcntl.LOCK_SH)
        except OSError as e:
            self.release()
            raise _osError("locking", self.path, e, None) from None

    def release(self) -> None:
        fd, self._fd = self._fd, None
        if fd is not None:
            os.close(fd)


@dataclass
class _Swept:
    """What a sweep of C{tmp/} did: the files removed, C{(name, path, age in seconds)}, and
    why C{tmp/} could not be listed (or C{None})."""

    removed: list[tuple[str, str, float]]
    error: str | None = None


def _findAndRemoveStale(tmpDir: Path, olderThan: float) -> _Swept:
    """The blocking part of L{Spool.sweepTemporary}: remove the regular files of C{tmp/}
    not written to for C{olderThan} seconds and not locked by their writer.  Logs nothing
    (it may run in a thread)."""
    now = time.time()
    try:
        entries = list(os.scandir(tmpDir))
    except OSError as e:
        return _Swept([], e.strerror or str(e))
    removed = []
    for entry in entries:
        try:
            info = entry.stat(follow_symlinks=False)
            if not stat.S_ISREG(info.st_mode) or now - info.st_mtime < olderThan:
                continue
            if not _unlinkUnlocked(entry.path):
                continue  # (its writer holds it: a message still being received)
        except OSError:
            continue  # (gone meanwhile, or not ours to remove: left as it is)
        removed.append((entry.name, entry.path, now - info.st_mtime))
    return _Swept(removed)
