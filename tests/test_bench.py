"""bench/run.py's CPU accounting: every thread of a process counts, and the busiest process
is named with its share of a core; bench/exactly_once.py stops what it started."""

from __future__ import annotations

import importlib.util
import os
import sys
import threading
import time
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest

pytestmark = pytest.mark.skipif(not os.path.exists("/proc/self/task"), reason="needs Linux /proc")


def _bench(name: str = "run") -> ModuleType:
    path = Path(__file__).resolve().parent.parent / "bench" / f"{name}.py"
    spec = importlib.util.spec_from_file_location(f"mailrelay_bench_{name}", path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # (dataclasses look their module up)
    try:
        spec.loader.exec_module(module)
    finally:
        del sys.modules[spec.name]
    return module


def _spin(seconds: float) -> None:
    end = time.thread_time() + seconds
    while time.thread_time() < end:
        pass


def test_threadsCpuSecondsCountsEveryThread() -> None:
    """CPU spent by a thread other than the main one is counted: /proc/PID/schedstat alone
    (the main thread's) left out mailrelay's spool committer."""
    bench = _bench()
    pid = os.getpid()
    before = bench.threads_cpu_seconds(pid)
    worker = threading.Thread(target=_spin, args=(0.3,))
    worker.start()
    worker.join()
    # The thread has ended: its time is in stat's utime + stime, which the tree sum takes
    # when it is more.
    assert bench.proc_tree_cpu_seconds([pid]) - before >= 0.25
    ready, stop = threading.Event(), threading.Event()

    def spinThenWait() -> None:
        _spin(0.3)
        ready.set()
        stop.wait(10)

    live = threading.Thread(target=spinThenWait)
    live.start()
    try:
        assert ready.wait(10)
        with open(f"/proc/{pid}/schedstat", "rb") as f:
            mainOnly = int(f.read().split()[0]) / 1e9
        assert bench.threads_cpu_seconds(pid) - mainOnly >= 0.25
    finally:
        stop.set()
        live.join()


def test_busiestProcess() -> None:
    bench = _bench()
    before = {1: ("twistd", 10.0), 2: ("mr-delivery", 3.0)}
    after = {1: ("twistd", 11.5), 2: ("mr-delivery", 5.0), 3: ("mr-acceptor", 0.2)}
    assert bench.busiest_process(before, after, 2.0) == ("mr-delivery", 1.0)
    after[1] = ("twistd", 13.0)
    assert bench.busiest_process(before, after, 2.0) == ("twistd", 1.5)
    assert bench.busiest_process(before, {}, 2.0) is None
    assert bench.busiest_process(before, after, 0.0) is None
    own = bench.proc_own_cpu_seconds([(os.getpid(), "pytest"), (2**22 + 12345, "gone")])
    assert list(own) == [os.getpid()] and own[os.getpid()][1] > 0


def test_machine_phase_probe(tmp_path: Path) -> None:
    """The probe taken before each run measures CPU and fsync, leaves nothing behind, and
    its summary gives median and range."""
    bench = _bench()
    probe = bench.machine_phase(tmp_path)
    assert probe["cpu_ms"] > 0 and probe["fsync_ms"] > 0
    assert list(tmp_path.iterdir()) == []
    line = bench.phase_summary([{"machine_phase": {"cpu_ms": 30.0, "fsync_ms": 1.0}},
                                {"machine_phase": {"cpu_ms": 36.0, "fsync_ms": 2.0}},
                                {"machine_phase": {"cpu_ms": 33.0, "fsync_ms": 1.5}}, {}])
    assert line.startswith("machine phase before each of 3 runs: CPU probe 33.00 ms (30.00-36.00)")
    assert "fsync probe 1.50 ms (1.00-2.00)" in line
    assert bench.phase_summary([{}]) is None


@pytest.mark.parametrize("failure", [RuntimeError("a bug, partway"), KeyboardInterrupt()])
def test_exactly_once_stops_what_it_started_when_a_run_fails(
    monkeypatch: pytest.MonkeyPatch, failure: BaseException
) -> None:
    """bench/exactly_once.py failing partway (a bug, or Ctrl-C) while the relay runs: the
    relay (twistd and its children) and every next hop it started are stopped, and the
    exception goes on.  They were left running: nothing stopped them but the end of a run
    that went well."""
    import socket

    from tests.test_e2e_delivery_process import _alive

    bench = _bench("exactly_once")
    relays: list[Any] = []
    hops: list[Any] = []
    pids: list[int] = []

    class Relay(bench.RelayProcess):  # type: ignore[name-defined,misc]
        def start(self, *args: Any, **kwargs: Any) -> Any:
            relays.append(self)
            return super().start(*args, **kwargs)

    class Hop(bench._TCPController):  # type: ignore[name-defined,misc]
        def start(self) -> None:
            hops.append(self)
            super().start()

    found = bench.descendants

    def failing(pid: int) -> dict[int, str]:
        # (At the first stop: the relay and its children run, and the next hops.)
        pids.append(pid)
        pids.extend(found(pid))
        raise failure

    monkeypatch.setattr(bench, "RelayProcess", Relay)
    monkeypatch.setattr(bench, "_TCPController", Hop)
    monkeypatch.setattr(bench, "descendants", failing)
    try:
        with pytest.raises(type(failure)):
            bench.main(["--messages", "20", "--stops", "1", "--rate", "0",
                        "--targets", "fast,slow", "--notify-success"])
        assert relays and pids and len(hops) == 3
        assert all(r.process is None for r in relays)
        deadline = time.monotonic() + 15
        while any(_alive(pid) for pid in pids) and time.monotonic() < deadline:
            time.sleep(0.05)
        assert not [pid for pid in pids if _alive(pid)]
        for hop in hops:
            with pytest.raises(ConnectionRefusedError):
                socket.create_connection(("127.0.0.1", hop.port), timeout=5).close()
    finally:  # (what the bench left running, should it fail to stop it)
        for relay in relays:
            relay.stop()
        for hop in hops:
            if hop._thread is not None:
                hop.stop()


def test_exactly_once_sends_to_the_fast_next_hop_whatever_the_order_of_targets() -> None:
    """C{--targets maildir,fast}: the smarthost is the fast next hop.  It was the one of the
    notices (the fast one's place among the targets taken for its place among the next hops
    started, which a maildir has none of): every message to it was lost."""
    bench = _bench("exactly_once")
    assert bench.main(["--messages", "3", "--stops", "0", "--rate", "0",
                       "--targets", "maildir,fast", "--drain-timeout", "15"]) == 0


def test_eodtracePerMessage() -> None:
    """bench/eodtrace.py cuts the relay's stamps into messages, from the read of each
    end-of-data to its 250 sent, keeping the first stamp of each name: a stamp before the
    first end of data (a batch of another kind) or after a 250 belongs to no message."""
    path = Path(__file__).resolve().parent.parent / "bench" / "eodtrace.py"
    spec = importlib.util.spec_from_file_location("mailrelay_bench_eodtrace", path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    stamps = [
        ["batch0", 1], ["batch1", 2],
        ["rx", 10], ["submit", 12], ["batch0", 15], ["synced", 20], ["synced", 21],
        ["batch1", 30], ["finished", 35], ["sent", 40],
        ["batch0", 41],
        ["rx", 50], ["submit", 51], ["sent", 60],
    ]
    assert module.perMessage(stamps) == [
        {"rx": 10, "submit": 12, "batch0": 15, "synced": 20, "batch1": 30, "finished": 35,
         "sent": 40},
        {"rx": 50, "submit": 51, "sent": 60},
    ]
