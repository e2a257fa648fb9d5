"""The open file limit raised for the listeners' connections (mailrelay.app.files)."""

from __future__ import annotations

import resource

import pytest
from twisted.logger import capturedLogs

from mailrelay.app.files import PER_DELIVERY, SPARE, needed, raiseFileLimit

INF = resource.RLIM_INFINITY


class Limits:
    def __init__(self, soft: int, hard: int) -> None:
        self.soft, self.hard = soft, hard
        self.set: list[tuple[int, int]] = []

    def getrlimit(self, which: int) -> tuple[int, int]:
        assert which == resource.RLIMIT_NOFILE
        return self.soft, self.hard

    def setrlimit(self, which: int, limits: tuple[int, int]) -> None:
        self.set.append(limits)
        self.soft, self.hard = limits


def raiseWith(limits: Limits, listeners: list[int]) -> int:
    return raiseFileLimit(listeners, limits.getrlimit, limits.setrlimit)


def test_needed() -> None:
    assert needed([1000]) == 1000 + SPARE
    assert needed([1000, 50]) == 1050 + SPARE
    assert needed([1000, 0]) is None
    assert needed([1000], 100) == 1000 + 2 * 100 + SPARE
    assert needed([0], 100) is None


def test_soft_limit_raised_to_what_the_listeners_need() -> None:
    limits = Limits(1024, 524288)
    assert raiseWith(limits, [1000, 1000]) == 2000 + SPARE
    assert limits.set == [(2000 + SPARE, 524288)]


def test_never_lowered() -> None:
    limits = Limits(65536, 524288)
    assert raiseWith(limits, [1000]) == 65536 and limits.set == []


def test_no_limit_on_a_listener_takes_the_hard_limit() -> None:
    limits = Limits(1024, 4096)
    assert raiseWith(limits, [0]) == 4096


def test_hard_limit_too_low_is_said_and_used() -> None:
    limits = Limits(512, 1024)
    with capturedLogs() as events:
        assert raiseWith(limits, [1000]) == 1024
    (event,) = [e for e in events if "open file limit" in e["log_format"]]
    assert event["hard"] == 1024 and event["want"] == 1000 + SPARE


def test_the_deliveries_count_in_the_need() -> None:
    """Each delivery in flight ([queue] delivery_limit) takes a connection, and the SMTP
    backend keeps as many open for the next ones: a limit that leaves them no room is said."""
    limits = Limits(512, 1200)
    with capturedLogs() as events:
        assert raiseFileLimit([1000], limits.getrlimit, limits.setrlimit,
                              deliveryLimit=100) == 1200
    (event,) = [e for e in events if "open file limit" in e["log_format"]]
    assert event["want"] == 1000 + PER_DELIVERY * 100 + SPARE
    assert "delivery_limit" in event["log_format"]


def test_unlimited_everywhere_is_left_alone() -> None:
    limits = Limits(INF, INF)
    assert raiseWith(limits, [0]) == INF and limits.set == []


@pytest.mark.skipif(resource.getrlimit(resource.RLIMIT_NOFILE)[1] == INF,
                    reason="this process has no hard limit of open files")
def test_real_limits_accept_the_call() -> None:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    try:
        assert raiseFileLimit([1]) == soft  # 1 + SPARE is below any usable soft limit
    finally:
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))


def test_e2e_relay_raises_its_soft_limit(relays) -> None:
    """twistd mailrelay started under a soft limit of 1024 (a login shell's) runs with what
    its two listeners of 1000 connections and its 100 deliveries in flight need."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    want = 2000 + PER_DELIVERY * 100 + SPARE
    if hard != INF and hard < want:
        pytest.skip(f"the hard limit of open files ({hard}) is below what the test needs")
    config = ('hostname = "relay.test"\n[spool]\ndirectory = "spool"\n'
              '[[listeners]]\nendpoint = "tcp:0:interface=127.0.0.1"\n'
              '[[listeners]]\nendpoint = "tcp:0:interface=127.0.0.2"\n')
    relay = relays(config, defaults=False, listeners=2)
    resource.setrlimit(resource.RLIMIT_NOFILE, (1024, hard))
    try:
        relay.start()
    finally:
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))
    assert relay.process is not None
    limits = open(f"/proc/{relay.process.pid}/limits").read()
    (line,) = [line for line in limits.splitlines() if line.startswith("Max open files")]
    assert line.split()[3] == str(want), line
