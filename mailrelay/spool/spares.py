"""Empty files created ahead of need in the spool's C{tmp/} (L{SpareFiles}), so that writing
a message does not wait for its files to be created.

Creating a file is the dearest step of a small message's commit on some file systems: ext4
without a journal, for one, skips every inode freed in the last half minute when it looks
for a free one (C{recently_deleted} in the kernel's C{find_inode_bit}), so that each creation
in a spool whose delivered messages were just removed scans past thousands of them
(0.2-0.4 ms of CPU each, measured here; a message makes two).  A renaming into place takes
a few microseconds.  Postfix's smtpd likewise has its queue file created once the first
recipient is accepted (C{smtpd_delay_open_until_valid_rcpt}), long before the end of the
data.

A thread of its own makes them again once half or more of C{count} are gone and the
committer is idle (L{SpareFiles.refill}).  A process takes one with L{SpareFiles.take},
which renames it to the name it wanted (never over an existing file) and gives back its
open descriptor.  None ready (a burst used them all, or the file system refuses them): the
caller creates its file itself, as it would without spares.

Each spare is C{tmp/spare-<pid>-<random>-<serial>}, open and locked (a shared C{flock},
as a message's file being written is) by the process that made it, which removes its
spares when it stops.  What a process that ended without stopping left is removed with the
rest of C{tmp/} by recovery at start, or by the hourly sweep of files nobody holds
(L{mailrelay.spool.store.Spool.sweepTemporary}).
"""

from __future__ import annotations

import fcntl
import itertools
import os
import secrets
import threading
from collections import deque
from pathlib import Path

from mailrelay.spool.commit import _FILE_MODE, _O_CLOEXEC, _renameNoReplace

__all__ = ["SPARE_PREFIX", "SpareFiles", "isSpareName"]

#: The names of spare files begin so (never a queue id: those are upper case).
SPARE_PREFIX = "spare-"


def isSpareName(name: str) -> bool:
    """Whether C{name} (in C{tmp/}) is a spare file's."""
    return name.startswith(SPARE_PREFIX)


class SpareFiles:
    """Empty files kept ready in C{directory} (see the module's docstring).

    @ivar count: how many are made; made again once half or more are gone (L{refill}).
    """

    def __init__(self, directory: str | os.PathLike[str], count: int) -> None:
        if count < 1:
            raise ValueError("count must be at least 1")
        self.directory = os.fspath(directory)
        self.count = count
        self._files: deque[tuple[int, str]] = deque()
        self._serial = itertools.count()
        # The process id says whose they are; the random part keeps them apart from the
        # leftovers of an earlier process of the same id (a container restarted, another
        # PID namespace on the same spool), which O_EXCL would refuse one by one.
        self._prefix = f"{self.directory}/{SPARE_PREFIX}{os.getpid()}-{secrets.token_hex(4)}-"
        #: Set when the pool is low: the thread refills it.
        self._wanted = threading.Event()
        #: Held while a spare is being made, and by L{close}: none is made after it.
        self._lock = threading.Lock()
        self._closed = False
        #: Set by L{pause}: make no more until L{refill}.
        self._paused = False
        self._thread: threading.Thread | None = None

    def __len__(self) -> int:
        return len(self._files)

    def start(self) -> None:
        """Start the thread that keeps the pool filled (it fills it at once)."""
        if self._thread is not None:
            raise RuntimeError("spare files already started")
        self._thread = threading.Thread(
            target=self._run, name="mailrelay-spool-spares", daemon=True
        )
        self._wanted.set()
        self._thread.start()

    def take(self, path: str | Path) -> int | None:
        """Rename a spare file to C{path} and return its descriptor (open for writing, at
        offset 0, empty); C{None} when none is ready or the rename is refused (the caller
        then creates its file itself, and meets the error).  Any thread may call it.

        @raise FileExistsError: C{path} exists (as C{os.open} with C{O_EXCL} would); the
            spare stays in the pool.
        """
        while True:
            try:
                fd, spare = self._files.popleft()
            except IndexError:
                return None
            try:
                _renameNoReplace(spare, path)
            except FileExistsError:
                self._files.appendleft((fd, spare))
                raise
            except FileNotFoundError:
                # Gone (removed by hand?): drop it, try the next.
                os.close(fd)
                continue
            except OSError:
                # Refused (ENOSPC: tmp/ must grow on a full file system; EIO...): kept for
                # later; the caller creates its file itself and meets the error there.
                self._files.appendleft((fd, spare))
                return None
            return fd

    def refill(self) -> None:
        """Have the pool's thread make what is missing, if half or more are gone, until
        L{pause} (the committer asks when a batch leaves it idle, so that the files are made
        while the reactor answers, not while a batch waits for them; several at a time, so
        that the thread is woken once for several messages)."""
        self._paused = False
        if len(self._files) <= self.count // 2:
            self._wanted.set()

    def pause(self) -> None:
        """Make no more spares until L{refill}: the committer starts a batch, whose renames
        and syncs a spare being made would hold up (the one under way is finished)."""
        self._paused = True

    def fill(self) -> None:
        """Make spares until there are L{count} (in the caller's thread; the pool's own thread
        calls it).  Stops quietly at the first file the file system refuses: the caller of
        L{take} then creates its file itself, and meets the error there."""
        while len(self._files) < self.count and not self._paused:
            with self._lock:
                if self._closed:
                    return
                path = f"{self._prefix}{next(self._serial)}"
                try:
                    flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | _O_CLOEXEC
                    fd = os.open(path, flags, _FILE_MODE)
                except OSError:
                    return
                try:
                    fcntl.flock(fd, fcntl.LOCK_SH)
                except OSError:
                    # (Unlocked, the hourly sweep could take it from under us.)
                    os.close(fd)
                    _removeQuietly(path)
                    return
                self._files.append((fd, path))

    def _run(self) -> None:
        while True:
            self._wanted.wait()
            self._wanted.clear()
            if self._closed:
                return
            self.fill()

    def close(self) -> None:
        """Stop making spares, and remove those left (each closed and unlinked)."""
        with self._lock:
            self._closed = True
        self._wanted.set()
        files = []
        while True:  # (one popleft at a time: a concurrent take gets each spare or we do)
            try:
                files.append(self._files.popleft())
            except IndexError:
                break
        for fd, path in files:
            _removeQuietly(path)  # (then closed: never on disk unlocked)
            os.close(fd)


def _removeQuietly(path: str) -> None:
    try:
        os.unlink(path)
    except OSError:
        pass  # (recovery or the sweep removes it)
