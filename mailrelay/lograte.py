"""A lasting problem logged without flooding the log (L{RepeatedProblem}).

A full disk makes every check of free space fail, and every write of a cache: logged at
each occurrence, they flood the log exactly when the disk is full.  Postfix logs such
problems through C{msg_rate_delay(3)}: no more than one message per interval, the rest
discarded (its C{dict_cache}, for its caches' errors).  Here the first occurrence is logged,
then at most one a L{INTERVAL} saying how many were not, and one line when it is over.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from twisted.logger import Logger, LogLevel

__all__ = ["INTERVAL", "RepeatedProblem"]

#: Seconds between two lines of one lasting problem.
INTERVAL = 60.0


class RepeatedProblem:
    """The log of one lasting problem (the spool short of space, a cache not written).

    L{occurred} logs a problem the first time, then the same problem (the same format) at
    most once every C{interval} seconds of C{seconds()}, saying how many times it occurred
    meanwhile; another problem is logged at once.  L{over} logs one line when it is over,
    if the problem was logged since the last such line (a problem that comes and goes
    logs at most two lines an interval).
    """

    def __init__(
        self, logger: Logger, seconds: Callable[[], float], interval: float = INTERVAL
    ) -> None:
        self._logger = logger
        self._seconds = seconds
        self.interval = interval
        #: The format of the problem last logged, when it was, and how many times it
        #: occurred since without being logged.
        self._format: str | None = None
        self._loggedAt = 0.0
        self._unsaid = 0
        #: The problem occurred since it was last said to be over.
        self._current = False
        #: It was logged since it was last said to be over.
        self._said = False

    @property
    def current(self) -> bool:
        """Whether the problem occurred since it was last over."""
        return self._current

    def occurred(self, level: LogLevel, format: str, **kwargs: Any) -> None:
        """The problem C{format} (with C{kwargs}) occurred: log it at C{level} unless the
        same was logged less than C{interval} seconds ago."""
        now = self._seconds()
        self._current = True
        if format == self._format and self._loggedAt <= now < self._loggedAt + self.interval:
            self._unsaid += 1
            return
        if format == self._format and self._unsaid:
            kwargs["repeated"] = self._unsaid
            format += " ({repeated} more times since the last such line)"
        else:
            self._format = format
        self._loggedAt, self._unsaid, self._said = now, 0, True
        self._logger.emit(level, format, **kwargs)

    def over(self, format: str, **kwargs: Any) -> None:
        """The problem is over: log C{format} (at level info) if it was logged since it
        was last over."""
        if not self._current:
            return
        self._current = False
        if self._said:
            self._said = False
            self._logger.info(format, **kwargs)
