"""Queue ids: short, sortable by arrival, safe as file names, unique across processes."""

from __future__ import annotations

import os
import re
import secrets
import time

__all__ = ["QUEUE_ID_ALPHABET", "QUEUE_ID_LENGTH", "isQueueID", "newQueueID"]

#: Crockford's base32 alphabet; its ASCII order is its numeric order.
QUEUE_ID_ALPHABET = "0123456789ABCDEFGHJKMNPQRSTVWXYZ"
QUEUE_ID_LENGTH = 20
_QUEUE_ID_RE = re.compile(r"[0-9A-HJKMNP-TV-Z]{20}")


def _encode(value: int, width: int) -> str:
    """Encode C{value} (which must fit) as C{width} base32 digits, most significant first."""
    digits = []
    for _ in range(width):
        digits.append(QUEUE_ID_ALPHABET[value & 31])
        value >>= 5
    return "".join(reversed(digits))


def isQueueID(text: str) -> bool:
    """Whether C{text} has the form of a queue id (and so is safe as a file name)."""
    return _QUEUE_ID_RE.fullmatch(text) is not None


class _QueueIDGenerator:
    """The state behind L{newQueueID}: last timestamp, counter, and per-process suffix."""

    _COUNTER_MODULUS = 32**4

    def __init__(self) -> None:
        self._lastMicros = 0
        self._counter = 0
        self._suffix: str | None = None

    def forked(self) -> None:
        """In a forked child: pick a new suffix, so the child cannot repeat the parent's ids."""
        self._suffix = None

    def _makeSuffix(self) -> str:
        # 10 bits of the pid keep concurrent processes apart; 10 random bits cover pid reuse
        # (a restarted process whose clock went back) and pids equal modulo 1024.
        return _encode(((os.getpid() & 0x3FF) << 10) | secrets.randbits(10), 4)

    def __call__(self) -> str:
        micros = int(time.time() * 1_000_000)
        if micros <= self._lastMicros:
            micros = self._lastMicros + 1
        self._lastMicros = micros
        counter = self._counter
        self._counter = (counter + 1) % self._COUNTER_MODULUS
        if self._suffix is None:
            self._suffix = self._makeSuffix()
        return _encode(micros, 12) + _encode(counter, 4) + self._suffix


_generator = _QueueIDGenerator()
if hasattr(os, "register_at_fork"):  # pragma: no branch
    os.register_at_fork(after_in_child=_generator.forked)


def newQueueID() -> str:
    """Return a new queue id.

    Twenty characters of L{QUEUE_ID_ALPHABET}: 12 of microseconds since the epoch (strictly
    increasing within the process, even if the clock steps back), 4 of a per-process counter
    and 4 derived from the process id and randomness.  Ids sort by arrival, are safe as file
    names, and two processes sharing a spool do not collide.  Call from one thread only.
    """
    return _generator()
