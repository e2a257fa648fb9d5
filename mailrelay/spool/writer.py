"""Writing one message into the spool's C{tmp/} until it is committed (L{MessageWriter})."""

from __future__ import annotations

import fcntl
import os
from pathlib import Path
from typing import TYPE_CHECKING, Any

from twisted.internet.defer import Deferred, fail
from twisted.logger import Logger
from zope.interface import implementer

from mailrelay.envelope import Envelope
from mailrelay.errors import SpoolError
from mailrelay.interfaces import IMessageWriter
from mailrelay.spool.commit import _Commit, _writeAll, openNew

if TYPE_CHECKING:  # pragma: no cover
    from mailrelay.spool.store import Spool

log = Logger(namespace="mailrelay.spool")

__all__ = ["MessageWriter"]

_WRITE_BUFFER = 64 * 1024
#: A message is held in memory up to this size, and written to its temporary file only at
#: commit time, in the committer's thread: creating a file can wait for the file system's
#: journal (measured here: 0.8 ms per open while other sessions fsync), which must not stall
#: the reactor.  Bigger messages spill to their file as they arrive.
_MEMORY_LIMIT = 256 * 1024


class _SpillFile:
    """A message's temporary file, held in memory until it grows past C{limit} bytes or its
    file is needed (L{flush}, L{fileno}: at commit time, in the committer's thread).

    A message still in memory at commit time is written with one C{write} on a plain
    descriptor (no buffered file object: its C{fstat} and C{lseek} were two more system calls,
    each a hand-over of the GIL between the committer's thread and the reactor's)."""

    def __init__(self, path: Path, limit: int = _MEMORY_LIMIT) -> None:
        self.path = path
        self._limit = limit
        self._chunks: list[bytes] = []
        self._size = 0
        #: The buffered file, once the message outgrew memory.
        self._file: Any = None
        #: The plain descriptor, once a message held in memory was written at commit time.
        self._fd: int | None = None
        self.closed = False

    def _create(self) -> int:
        return openNew(self.path)

    def _materialise(self) -> None:
        fd = self._create()
        # Held while it is written (a client may trickle into the buffer for long): the
        # sweep of stale files (Spool.sweepTemporary) leaves a locked file alone.
        fcntl.flock(fd, fcntl.LOCK_SH)
        self._file = os.fdopen(fd, "wb", buffering=_WRITE_BUFFER)
        chunks, self._chunks = self._chunks, []
        self._file.write(b"".join(chunks))

    def write(self, data: bytes) -> int:
        if self._file is not None:
            self._file.write(data)
        elif self._fd is not None:
            _writeAll(self._fd, data)
        else:
            self._chunks.append(data)
            self._size += len(data)
            if self._size > self._limit:
                self._materialise()
        return len(data)

    def flush(self) -> None:
        if self._file is not None:
            self._file.flush()
        elif self._fd is None:
            fd = self._create()
            try:
                _writeAll(fd, b"".join(self._chunks))
            except BaseException:
                os.close(fd)
                raise
            self._fd = fd
            self._chunks = []

    def fileno(self) -> int:
        if self._file is not None:
            return int(self._file.fileno())
        if self._fd is None:
            self.flush()
        assert self._fd is not None
        return self._fd

    def read(self) -> bytes:
        """Everything written so far (blocking, for a file: see L{MessageWriter.read})."""
        if self._file is None and self._fd is None:
            return b"".join(self._chunks)
        if self._file is not None:
            self._file.flush()
        with open(self.path, "rb") as f:
            return f.read()

    def close(self) -> None:
        self.closed = True
        self._chunks = []
        fd, self._fd = self._fd, None
        if fd is not None:
            os.close(fd)
        if self._file is not None:
            self._file.close()


_OPEN = "open"
_COMMITTING = "committing"
_COMMITTED = "committed"
_FAILED = "failed"
_ABORTED = "aborted"


@implementer(IMessageWriter)
class MessageWriter:
    """Writes one message to C{tmp/<ID>.eml}; made by L{Spool.openMessage}.

    @ivar queueID: the message's queue id.
    @ivar size: octets written so far.
    @ivar path: the temporary file being written.
    """

    def __init__(self, spool: Spool, queueID: str, path: Path, file: Any) -> None:
        self._spool = spool
        self.queueID = queueID
        self.path = path
        self.size = 0
        self._file = file
        self._error: OSError | None = None
        self._state = _OPEN

    @property
    def failed(self) -> bool:
        """C{True} once a write has failed (the commit will fail)."""
        return self._error is not None

    def write(self, data: bytes) -> None:
        """Append C{data} (buffered).

        Never raises: an C{OSError} (disk full...) is logged once and remembered, later writes
        are ignored, and L{commit} fails.  Writes after L{commit} or L{abort} are ignored.
        """
        if self._error is not None:
            return
        if self._state != _OPEN:
            log.warn(
                "write to message {queueID} ignored: the writer is {state}",
                queueID=self.queueID,
                state=self._state,
            )
            return
        try:
            self._file.write(data)
        except OSError as e:
            self._error = e
            log.error(
                "writing message {queueID} to {path} failed: {error}; the message will be refused",
                queueID=self.queueID,
                path=str(self.path),
                error=e.strerror or str(e),
            )
            return
        self.size += len(data)

    def read(self) -> bytes:
        """What was written so far (see L{IMessageWriter.read}): from memory, or from the
        temporary file (blocking).

        @raise OSError: the file cannot be read, or a write had failed.
        """
        if self._error is not None:
            raise self._error
        data: bytes = self._file.read()
        return data

    def _finished(self, error: SpoolError | None) -> None:
        """The commit is over (on the reactor thread): it failed with C{error}, or not."""
        self._state = _FAILED if error is not None else _COMMITTED

    def _closeQuietly(self) -> None:
        f = self._file
        if f is not None and not f.closed:
            try:
                f.close()  # flushes, then closes even if the flush fails
            except Exception:
                pass

    def _discard(self) -> None:
        self._closeQuietly()
        try:
            os.unlink(self.path)
        except FileNotFoundError:
            pass
        except OSError as e:
            log.error(
                "removing {path} of message {queueID} failed: {error}",
                queueID=self.queueID,
                path=str(self.path),
                error=e.strerror or str(e),
            )

    def abort(self) -> None:
        """Close and remove the temporary file.

        Idempotent; safe after a failed commit.  Does nothing once L{commit} has been called
        and has not failed: a commit in progress is not interrupted, and a committed entry is
        only removed by L{Spool.remove}.
        """
        if self._state in (_OPEN, _FAILED):
            self._discard()
            if self._state == _OPEN:
                log.debug("message {queueID} aborted", queueID=self.queueID)
                self._state = _ABORTED

    def _refuse(self, message: str) -> Deferred[None]:
        error = SpoolError(message, path=self.path, queueID=self.queueID)
        log.error(
            "commit of message {queueID} failed: {error}", queueID=self.queueID, error=str(error)
        )
        self._discard()
        self._state = _FAILED
        return fail(error)

    def commit(self, envelope: Envelope) -> Deferred[None]:
        """Make the message and C{envelope} a durable queue entry.

        C{envelope.queueID} must be this writer's L{queueID}; C{envelope.messageSize} is set
        to the octets written.  The envelope is serialised now; later changes to it are not
        stored.

        @return: a L{Deferred} firing with C{None} once the entry is durable, or failing with
            L{SpoolError}; the temporary files (and anything already renamed into C{queue/})
            are then removed.
        """
        if self._state != _OPEN:
            return fail(
                SpoolError(
                    f"cannot commit message {self.queueID} ({self.path}): it is {self._state}",
                    path=self.path,
                    queueID=self.queueID,
                )
            )
        if envelope.queueID != self.queueID:
            return self._refuse(
                f"cannot commit {self.path}: envelope queue id {envelope.queueID!r} is not "
                f"{self.queueID!r}"
            )
        if self._error is not None:
            e = self._error
            return self._refuse(f"writing {self.path} failed: {e.strerror or e}")
        if not self._spool._running:
            return self._refuse(f"cannot commit {self.path}: the spool is stopped")
        envelope.messageSize = self.size  # checked when the entry is loaded
        try:
            data = envelope.toJSON()
        except Exception as e:
            return self._refuse(
                f"cannot commit {self.path}: serialising the envelope failed: {e!r}"
            )
        self._state = _COMMITTING
        return self._spool._submit(_Commit(self, data))
