"""L{mailrelay.lograte}: a lasting problem logged without flooding the log."""

from __future__ import annotations

from twisted.internet.task import Clock
from twisted.logger import Logger, LogLevel, capturedLogs, formatEvent

from mailrelay.lograte import RepeatedProblem


def test_a_problem_that_comes_and_goes_logs_at_most_two_lines_an_interval() -> None:
    """Free space hovering at the minimum: refused, then room, then refused again.  Each
    change is not a line: after the first problem and its end, the problem is logged again
    once the interval is over, and its end only once it was; another problem at once."""
    clock = Clock()
    problem = RepeatedProblem(Logger(namespace="test"), clock.seconds, interval=60)
    with capturedLogs() as events:
        for _ in range(5):
            problem.occurred(LogLevel.warn, "full {n}", n=1)
            clock.advance(5)
            problem.over("room")
            clock.advance(5)
        assert problem.current is False
        clock.advance(10)  # a minute since the first line
        problem.occurred(LogLevel.warn, "full {n}", n=2)
        problem.over("room")
        problem.occurred(LogLevel.error, "broken")
    assert [(formatEvent(e), e["log_level"]) for e in events] == [
        ("full 1", LogLevel.warn), ("room", LogLevel.info),
        ("full 2 (4 more times since the last such line)", LogLevel.warn),
        ("room", LogLevel.info), ("broken", LogLevel.error)]
