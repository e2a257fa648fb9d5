"""Steps of the system clock, and the reactor's timers kept on the time that really passed.

Twisted's reactor times its calls (C{callLater}) on the wall clock, C{time.time()}.  When
that clock is stepped while the relay runs -- NTP correcting a wrong clock, a virtual machine
resumed, an administrator's C{date -s} -- every pending call moves with it: a step back of
an hour delays every timeout, retry and sweep by an hour, and a step forward of days fires
them all at once (connections dropped as timed out, the queue's retries bunched).

L{ClockSteps} notices a step -- the difference between the wall clock and the monotonic
clock changes by L{TOLERANCE} or more from one reactor turn to the next (NTP's slewing
changes it by half a millisecond a second at most) -- and moves every pending call by the
step, so that it fires after the delay it was given; then it tells its observers (the
queue manager moves its schedule the same way).  What is stored or shown (arrival times,
dates, the next attempt's time on disk) stays on the wall clock.

L{followClockSteps} installs it on a reactor: it checks before each turn's timed calls and
makes the reactor wake at least every L{CHECK_INTERVAL} seconds, so that a step back is
noticed while nothing else happens.
"""

from __future__ import annotations

import time
import weakref
from collections.abc import Callable
from datetime import timedelta
from typing import Any, Protocol

from twisted.internet.interfaces import IReactorTime
from twisted.logger import Logger

__all__ = [
    "CHECK_INTERVAL",
    "TOLERANCE",
    "ClockSteps",
    "StepObserver",
    "clockStepsOf",
    "followClockSteps",
]

log = Logger()

#: A change of the wall clock against the monotonic clock of this many seconds or more, from
#: one check to the next, is a step.
TOLERANCE = 1.0
#: The reactor sleeps at most this many seconds at once (see L{followClockSteps}).
CHECK_INTERVAL = 1.0


class StepObserver(Protocol):
    def clockStepped(self, step: float) -> None:
        """The wall clock was stepped by C{step} seconds (negative: back); the reactor's
        calls have been moved by as much."""


class ClockSteps:
    """Notices steps of C{reactor}'s clock and moves its pending calls by them.

    @ivar observers: told of each step after the calls moved (kept weakly: a replaced
        queue manager is not kept alive).
    """

    def __init__(
        self, reactor: IReactorTime, monotonic: Callable[[], float] = time.monotonic
    ) -> None:
        """
        @param reactor: the clock that steps (its C{seconds()}) and whose calls are moved.
        @param monotonic: the clock that does not step.
        """
        self.reactor = reactor
        self.monotonic = monotonic
        self.observers: weakref.WeakSet[StepObserver] = weakref.WeakSet()
        self._offset = reactor.seconds() - monotonic()

    def observe(self, observer: StepObserver) -> None:
        self.observers.add(observer)

    def check(self) -> float:
        """Look for a step since the last check; when there was one, move the reactor's
        pending calls by it, log it and tell the observers.  Return the step (0: none)."""
        now = self.reactor.seconds()
        offset = now - self.monotonic()
        step, self._offset = offset - self._offset, offset
        if abs(step) < TOLERANCE:
            return 0.0
        moved = 0
        for call in self.reactor.getDelayedCalls():
            if call.active():
                call.reset(max(0.0, call.getTime() + step - now))
                moved += 1
        log.warn(
            "the system clock was stepped {direction} by {step}; {count} timers moved with it, "
            "so that each fires after the delay it was given",
            direction="back" if step < 0 else "forward",
            step=str(timedelta(seconds=round(abs(step)))),
            count=moved,
        )
        for observer in list(self.observers):
            observer.clockStepped(step)
        return step


def clockStepsOf(reactor: Any) -> ClockSteps:
    """The L{ClockSteps} of C{reactor} (made at the first call), to observe: it checks only
    once L{followClockSteps} installed it (or when its C{check} is called)."""
    steps: ClockSteps | None = getattr(reactor, "_mailrelayClockSteps", None)
    if steps is None:
        steps = reactor._mailrelayClockSteps = ClockSteps(reactor)
    return steps


def followClockSteps(reactor: Any) -> ClockSteps:
    """Install L{clockStepsOf} C{reactor} (a L{twisted.internet.base.ReactorBase}): it
    checks before the timed calls of each turn of the reactor, which sleeps at most
    L{CHECK_INTERVAL} seconds at once.  Return it; a second call changes nothing."""
    steps = clockStepsOf(reactor)
    if getattr(reactor, "_mailrelayFollowsClockSteps", False):
        return steps
    runUntilCurrent, timeout = reactor.runUntilCurrent, reactor.timeout

    def checkThenRun() -> None:
        steps.check()
        runUntilCurrent()

    def boundedTimeout() -> float:
        t = timeout()
        return CHECK_INTERVAL if t is None else min(t, CHECK_INTERVAL)

    reactor.runUntilCurrent = checkThenRun
    reactor.timeout = boundedTimeout
    reactor._mailrelayFollowsClockSteps = True
    return steps
