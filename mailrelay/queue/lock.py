"""One queue manager per spool: an exclusive lock on C{<spool>/qmgr.lock}.

Two queue managers on one spool would each deliver every entry, and neither could record the
other's results: the duplicates of a relay restarted while its old delivery process was still
running.  Whoever runs a queue manager (the delivery process, or the relay's own process with
C{[queue] process = "inline"}) holds an exclusive C{flock(2)} on C{qmgr.lock} for as long as it
may deliver, and writes its process id into the file for the log of the one waiting.

The lock is taken without blocking the reactor: L{QueueLock.acquire} tries at once, then
again every C{interval} seconds, logging once (and then every minute) who holds it.  The
kernel releases it when its holder exits, however it exits, so a crashed holder never blocks
its successor.  A lock file that cannot be made or locked (no inode left on the spool's file
system, a file made unreadable by hand) is tried again every L{ERROR_INTERVAL} seconds,
saying why once a minute: the queue manager starts once the spool lets it, with no restart.
"""

from __future__ import annotations

import fcntl
import os
from pathlib import Path

from twisted.internet.defer import Deferred
from twisted.internet.interfaces import IDelayedCall, IReactorTime
from twisted.logger import Logger

log = Logger(namespace="mailrelay.queue")

__all__ = ["ERROR_INTERVAL", "LOCK_NAME", "QueueLock"]

#: The lock file's name in the spool directory.
LOCK_NAME = "qmgr.lock"
#: Seconds between two tries when the lock file cannot be made or locked.
ERROR_INTERVAL = 5.0


class QueueLock:
    """The exclusive right to run a queue manager on one spool.

    @ivar path: the lock file.
    @ivar held: whether this process holds it now.
    """

    def __init__(self, spoolDirectory: Path, clock: IReactorTime, interval: float = 0.2) -> None:
        self.path = Path(spoolDirectory) / LOCK_NAME
        self.clock = clock
        self.interval = interval
        self._fd: int | None = None
        self._waiting: Deferred[None] | None = None
        self._timer: IDelayedCall | None = None
        self._loggedAt: float | None = None

    @property
    def held(self) -> bool:
        return self._fd is not None

    def acquire(self) -> Deferred[None]:
        """A Deferred that fires once this process holds the lock (at once if it can be had).
        Cancelling it stops waiting.  While the lock file cannot be made or locked, it is
        tried again every L{ERROR_INTERVAL} seconds (the error logged once a minute)."""
        if self._waiting is not None:
            raise RuntimeError("already waiting for the queue lock")
        d: Deferred[None] = Deferred(lambda _: self._cancel())
        self._waiting = d
        self._try()
        return d

    def _cancel(self) -> None:
        self._waiting = None
        if self._timer is not None and self._timer.active():
            self._timer.cancel()
        self._timer = None

    def _try(self) -> None:
        self._timer = None
        d = self._waiting
        if d is None:
            return
        try:
            if self._tryLock():
                self._waiting = None
                if self._loggedAt is not None:
                    log.info("queue lock {path} acquired", path=str(self.path))
                    self._loggedAt = None
                d.callback(None)
                return
        except OSError as e:
            self._failed(e)
            return
        now = self.clock.seconds()
        if self._loggedAt is None or now - self._loggedAt >= 60:
            self._loggedAt = now
            log.warn(
                "waiting for the queue lock {path}, held by process {holder} (another queue "
                "manager on this spool: a previous delivery process finishing its deliveries, "
                "or a second relay using the same spool)",
                path=str(self.path),
                holder=self.holder(),
            )
        self._timer = self.clock.callLater(self.interval, self._try)

    def _failed(self, error: OSError) -> None:
        """The lock file could not be made or locked: say why (once a minute), try again."""
        now = self.clock.seconds()
        if self._loggedAt is None or now - self._loggedAt >= 60:
            self._loggedAt = now
            log.error(
                "cannot take the queue lock {path}: {error}; the queue manager waits, trying "
                "again every {interval:.0f} seconds",
                path=str(self.path),
                error=error.strerror or str(error),
                interval=ERROR_INTERVAL,
            )
        self._timer = self.clock.callLater(ERROR_INTERVAL, self._try)

    def _tryLock(self) -> bool:
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            return False
        except OSError:
            os.close(fd)
            raise
        try:
            os.ftruncate(fd, 0)
            os.pwrite(fd, f"{os.getpid()}\n".encode("ascii"), 0)
        except OSError:
            pass  # the pid is only for the log of a process waiting
        self._fd = fd
        return True

    def holder(self) -> str:
        """The process id written in the lock file by its holder, or C{"(unknown)"}."""
        try:
            text = self.path.read_text("ascii", "replace").strip()
        except OSError:
            text = ""
        return text if text.isdigit() else "(unknown)"

    def release(self) -> None:
        """Give the lock up (and stop waiting for it)."""
        if self._waiting is not None:
            self._waiting.cancel()  # its canceller stops the polling
        fd, self._fd = self._fd, None
        if fd is not None:
            os.close(fd)
