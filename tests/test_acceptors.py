"""Unit tests of the acceptor processes (`[relay] processes`): the key, the relay's side
(AcceptorPool: spawning with the listening sockets, queued ids, restarts, reload, stop), the
sockets shared, the child's adopted listeners and its notifications, `mailrelay status`."""

from __future__ import annotations

import io
import json
import os
import socket
from pathlib import Path
from typing import Any

import pytest
from twisted.internet import defer, tcp
from twisted.internet.error import ProcessDone, ProcessTerminated
from twisted.internet.protocol import Factory, Protocol
from twisted.internet.task import Clock
from twisted.internet.testing import MemoryReactor
from twisted.logger import LogLevel, globalLogPublisher
from twisted.python.failure import Failure
from zope.interface.verify import verifyObject

from mailrelay.app.acceptorprocess import (
    RETIRE,
    AcceptorServices,
    RelayCounters,
    RelayUnavailable,
    _FromRelay,
    adoptPort,
    notifyRelay,
)
from mailrelay.app.acceptors import AcceptorPool, sharedSocket
from mailrelay.app.cli import printStatus
from mailrelay.app.logs import classicLogText
from mailrelay.config import loadConfig
from mailrelay.config.values import MAX_PROCESSES, resolveProcessCount
from mailrelay.errors import ConfigError
from mailrelay.interfaces import IRateLimiter
from mailrelay.queue.process import METRICS_RECORD, encodeLogEvent
from mailrelay.receive.auth import IAuthThrottle, MemoryAuthThrottle
from mailrelay.receive.limits import MemoryRateLimiter
from tests.test_metrics import samplesOf

QUEUE_ID = "0123456789ABCDEFGHJK"


# -- the key ------------------------------------------------------------------------------------


def _load(tmp_path: Path, text: str) -> Any:
    path = tmp_path / "mailrelay.toml"
    path.write_text(f'[spool]\ndirectory = "{tmp_path / "spool"}"\n' + text)
    return loadConfig(str(path))


def test_processes_default_is_one(tmp_path: Path) -> None:
    assert _load(tmp_path, "").processes == 1


@pytest.mark.parametrize("value", ["1", "4", '"auto"', str(MAX_PROCESSES)])
def test_processes_accepted(tmp_path: Path, value: str) -> None:
    assert _load(tmp_path, f"[relay]\nprocesses = {value}\n").processes == json.loads(value)


@pytest.mark.parametrize("value", ["0", "-1", '"two"', "true", "1.5", str(MAX_PROCESSES + 1)])
def test_processes_refused(tmp_path: Path, value: str) -> None:
    with pytest.raises(ConfigError) as e:
        _load(tmp_path, f"[relay]\nprocesses = {value}\n")
    assert "relay.processes" in str(e.value) and '"auto"' in str(e.value)


def test_auto_is_the_cores_we_may_use() -> None:
    assert resolveProcessCount("auto") == len(os.sched_getaffinity(0))
    assert resolveProcessCount(3) == 3


# -- the relay's side ---------------------------------------------------------------------------


class FakeProcess:
    def __init__(self, protocol: Any, pid: int) -> None:
        self.protocol = protocol
        self.pid = pid
        self.written: list[bytes] = []
        self.toChild: dict[int, bytes] = {}
        self.closed: list[int] = []
        self.stdinClosed = False
        self.signals: list[str] = []

    def write(self, data: bytes) -> None:
        self.written.append(data)

    def writeToChild(self, fd: int, data: bytes) -> None:
        self.toChild[fd] = data

    def closeChildFD(self, fd: int) -> None:
        self.closed.append(fd)

    def closeStdin(self) -> None:
        self.stdinClosed = True

    def signalProcess(self, name: str) -> None:
        self.signals.append(name)

    def end(self, status: int = 0) -> None:
        reason = ProcessDone(0) if status == 0 else ProcessTerminated(status)
        self.protocol.processEnded(Failure(reason))


class ProcessReactor(Clock):
    def __init__(self) -> None:
        super().__init__()
        self.spawned: list[tuple[FakeProcess, list[str], dict[int, Any]]] = []

    def spawnProcess(self, protocol: Any, executable: str, args: list[str], env: Any = None,
                     childFDs: Any = None) -> FakeProcess:
        process = FakeProcess(protocol, 1000 + len(self.spawned))
        protocol.makeConnection(process)
        self.spawned.append((process, args, childFDs))
        return process


def _pool(count: int = 2, sockets: Any = None) -> tuple[AcceptorPool, ProcessReactor, list[str]]:
    reactor = ProcessReactor()
    queued: list[str] = []
    pool = AcceptorPool(
        reactor, "/etc/mailrelay.toml", {"hostname": "relay.test"}, b"[relay]\n", count, 30.0,
        sockets or (lambda: [("tcp:25", 7, "inet"), ("unix:/run/s", 9, "unix")]), queued.append,
    )
    return pool, reactor, queued


def _argument(args: list[str], name: str) -> str:
    return args[args.index(name) + 1]


def test_pool_spawns_children_with_the_listening_sockets_and_the_configuration() -> None:
    pool, reactor, _ = _pool(2)
    pool.startService()
    assert len(reactor.spawned) == 2
    process, args, childFDs = reactor.spawned[0]
    assert args[1:3] == ["-m", "mailrelay.app.acceptorprocess"]
    assert childFDs == {0: "w", 1: "r", 2: 2, 3: "w", 4: 7, 5: 9}
    assert json.loads(_argument(args, "--listeners")) == [
        ["tcp:25", 4, "inet"], ["unix:/run/s", 5, "unix"],
    ]
    assert _argument(args, "--config-fd") == "3" and _argument(args, "--parent-pid") == str(
        os.getpid()
    )
    assert json.loads(_argument(args, "--overrides")) == {"hostname": "relay.test"}
    assert process.toChild == {3: b"[relay]\n"} and process.closed == [3]


def test_pool_of_none_spawns_nothing() -> None:
    pool, reactor, _ = _pool(0)
    pool.startService()
    assert reactor.spawned == []
    assert pool.stopService().called


def _published(process: Any, *pieces: bytes) -> list[dict[str, Any]]:
    """The log events published while the relay's end of the acceptor C{process} reads
    C{pieces} of its standard output."""
    events: list[dict[str, Any]] = []
    globalLogPublisher.addObserver(events.append)
    try:
        for piece in pieces:
            process.protocol.outReceived(piece)
    finally:
        globalLogPublisher.removeObserver(events.append)
    return events


def test_queued_ids_reach_the_queue_manager_logs_and_metrics_the_relay() -> None:
    pool, reactor, queued = _pool(1)
    pool.startService()
    process = reactor.spawned[0][0]
    log = encodeLogEvent({"log_format": "hello {x}", "x": 1, "log_namespace": "n",
                          "log_time": 5.0})
    metrics = METRICS_RECORD + json.dumps([["mailrelay_x", "counter", "d", []]]) + "\n"
    data = (f"queued\t{QUEUE_ID}\n" + log + metrics + "queued\tnot-an-id\n").encode()
    events = _published(process, data[:10], data[10:])  # (records may come in pieces)
    assert queued == [QUEUE_ID]
    assert any(e.get("log_text") == "hello 1" for e in events)
    assert any("bad queue id" in e.get("log_format", "") for e in events)
    assert process.protocol in pool.metrics._live


def _messagesSnapshot(accepted: int) -> str:
    """An acceptor's metrics record saying it accepted C{accepted} messages."""
    sample = ["mailrelay_messages_total", {"reply": "2xx", "origin": "smtp"}, float(accepted)]
    return METRICS_RECORD + json.dumps([["mailrelay_messages", "counter", "d", [sample]]]) + "\n"


def test_a_killed_acceptor_counts_every_message_it_said_it_queued() -> None:
    """An acceptor sends its metrics once a second: killed (SIGKILL) before its next
    snapshot, the messages it queued since were not counted, though the spool holds them.
    The relay counts what it saw queued: at least that many accepted messages, never the
    same message twice."""
    pool, reactor, queued = _pool(3)
    pool.startService()
    killed, stopped, silent = (process for process, _, _ in reactor.spawned)
    killed.protocol.outReceived((_messagesSnapshot(1) + f"queued\t{QUEUE_ID}\n" * 3).encode())
    stopped.protocol.outReceived((f"queued\t{QUEUE_ID}\n" * 2 + _messagesSnapshot(2)).encode())
    silent.protocol.outReceived(f"queued\t{QUEUE_ID}\n".encode())
    killed.end(9)
    stopped.end(0)
    silent.end(9)
    assert len(queued) == 6
    merged = samplesOf(pool.metrics.merged([]))
    assert merged[("mailrelay_messages_total", (("origin", "smtp"), ("reply", "2xx")))] == 6


def test_the_relay_knows_how_many_sessions_each_acceptor_has_open() -> None:
    """mailrelay status counted the relay's own sessions only: with [relay] processes = 2
    it said 4 open of 8.  Each acceptor says its count when it changes; a retiring one's
    still count; one that ended has none."""
    pool, reactor, _ = _pool(2)
    pool.startService()
    first, second = (spawned[0] for spawned in reactor.spawned)
    assert pool.describe()["sessions"] == 0
    first.protocol.outReceived(b"sessions\t3\n")
    second.protocol.outReceived(b"sessions\t2\nsessions\t")
    second.protocol.outReceived(b"4\nsessions\tmany\n")  # (a bad record changes nothing)
    assert pool.describe()["sessions"] == 7
    pool.reload(b"[relay]\n", {"hostname": "relay.test"}, 2, 30.0)  # both retire, draining
    assert pool.describe()["sessions"] == 7
    first.end()
    assert pool.describe()["sessions"] == 4


def test_an_acceptor_says_its_sessions_when_their_number_changes() -> None:
    from mailrelay.app.acceptorprocess import reportSessions

    clock, written, live = Clock(), [], set()
    sessions = type("S", (), {"live": live})()
    report = reportSessions(sessions, clock, written.append)
    clock.advance(1)
    live.update({1, 2})
    clock.advance(1)
    clock.advance(1)
    live.discard(1)
    clock.advance(1)
    assert written == ["sessions\t2\n", "sessions\t1\n"]
    report.stop()


def test_an_acceptors_log_lines_name_it_in_their_system() -> None:
    """As Postfix's lines name the smtpd (C{postfix/smtpd[PID]}): an acceptor's lines carry
    C{,acceptor=PID} after their system, so that the log tells which process said what
    (the relay's own lines have none)."""
    pool, reactor, _ = _pool(1)
    pool.startService()
    process = reactor.spawned[0][0]
    lines = [
        encodeLogEvent({"log_format": "new", "log_namespace": "mailrelay.receive.protocol",
                        "log_level": LogLevel.info, "log_time": 5.0}),
        encodeLogEvent({"log_format": "legacy", "log_namespace": "log_legacy",
                        "log_level": LogLevel.info, "log_system": "-", "log_time": 5.0}),
    ]
    events = _published(process, "".join(lines).encode())
    systems = {e["log_text"]: e["log_system"] for e in events if "log_text" in e}
    assert systems == {
        "new": f"mailrelay.receive.protocol#info,acceptor={process.pid}",
        "legacy": f"-,acceptor={process.pid}",
    }
    line = classicLogText()(next(e for e in events if e.get("log_text") == "new"))
    assert line is not None
    assert f" [mailrelay.receive.protocol#info,acceptor={process.pid}] new\n" in line


# -- the AUTH throttle, shared ------------------------------------------------------------------


def _throttlePool() -> tuple[Any, FakeProcess, MemoryAuthThrottle, list[Any]]:
    pool, reactor, _ = _pool(1)
    throttle = MemoryAuthThrottle(reactor, window=60)
    current: list[Any] = [throttle]
    pool.throttle = lambda: current[0]
    pool.startService()
    return pool, reactor.spawned[0][0], throttle, current


def test_the_relay_counts_its_acceptors_auth_attempts() -> None:
    """An acceptor's AUTH attempts are reserved and settled in the relay's throttle, which
    answers with the counts (so every process sees the client's failures)."""
    _, process, throttle, _ = _throttlePool()
    throttle.settle("192.0.2.7", True)  # a failure made on the relay's own connections
    process.protocol.outReceived(b"ask\t1\treserve\t192.0.2.7\n")
    assert process.written == [b"answer\t1\t2\n"]  # one failure + this attempt
    assert throttle.inFlight("192.0.2.7") == 1
    process.protocol.outReceived(b"ask\t2\tsettle\t192.0.2.7\t1\n")
    assert process.written[-1] == b"answer\t2\t2\n"
    assert (throttle.failures("192.0.2.7"), throttle.inFlight("192.0.2.7")) == (2, 0)
    process.protocol.outReceived(b"ask\t3\treserve\t192.0.2.7\nask\t4\tsettle\t192.0.2.7\t0\n")
    assert process.written[-2:] == [b"answer\t3\t3\n", b"answer\t4\t2\n"]
    assert (throttle.failures("192.0.2.7"), throttle.inFlight("192.0.2.7")) == (2, 0)


def test_an_acceptor_that_ends_releases_its_attempts_in_flight() -> None:
    """Its attempts in flight are settled (not failed) when it ends: the client is not held
    by attempts nobody will settle."""
    _, process, throttle, _ = _throttlePool()
    process.protocol.outReceived(b"ask\t1\treserve\t192.0.2.7\nask\t2\treserve\t2001:db8::/64\n")
    assert throttle.inFlight("192.0.2.7") == throttle.inFlight("2001:db8::/64") == 1
    process.end(9 << 8)
    assert throttle.inFlight("192.0.2.7") == throttle.inFlight("2001:db8::/64") == 0
    assert throttle.failures("192.0.2.7") == 0


def test_an_attempt_is_settled_on_the_throttle_it_was_reserved_on() -> None:
    """A reload that changes the failure window makes a new throttle: an attempt reserved
    before is settled on the old one (its failure recorded there), as the relay's own
    attempts in flight are, never leaving the old one's count in flight."""
    _, process, old, current = _throttlePool()
    process.protocol.outReceived(b"ask\t1\treserve\t192.0.2.7\n")
    new = current[0] = MemoryAuthThrottle(Clock(), window=120)
    process.protocol.outReceived(b"ask\t2\tsettle\t192.0.2.7\t1\n")
    assert old.inFlight("192.0.2.7") == 0 and old.failures("192.0.2.7") == 1
    assert new.inFlight("192.0.2.7") == new.failures("192.0.2.7") == 0


def test_a_settle_without_its_reservation_touches_nothing() -> None:
    """A settle the relay has no reservation for (its reservation failed) is answered "-"
    and counts nothing: it must not settle another process's attempt in flight."""
    _, process, throttle, _ = _throttlePool()
    throttle.reserve("192.0.2.7")  # the relay's own attempt, in flight
    process.protocol.outReceived(b"ask\t4\tsettle\t192.0.2.7\t1\n")
    assert process.written == [b"answer\t4\t-\n"]
    assert (throttle.inFlight("192.0.2.7"), throttle.failures("192.0.2.7")) == (1, 0)


class SlowThrottle(MemoryAuthThrottle):
    def __init__(self) -> None:
        super().__init__(Clock())
        self.pending: list[defer.Deferred] = []

    def reserve(self, client: str) -> Any:
        count = super().reserve(client)
        self.pending.append(defer.Deferred())
        return self.pending[-1].addCallback(lambda _: count)


def test_a_reservation_answered_after_the_child_ended_is_released() -> None:
    """(A throttle that answers later, as a shared store would.)"""
    _, process, _, current = _throttlePool()
    slow = current[0] = SlowThrottle()
    process.protocol.outReceived(b"ask\t1\treserve\t192.0.2.7\n")
    process.end(9 << 8)
    slow.pending[0].callback(None)
    assert slow.inFlight("192.0.2.7") == 0 and process.written == []


def test_bad_auth_records_and_no_throttle() -> None:
    _, process, throttle, current = _throttlePool()
    events = _published(process, b"ask\tx\treserve\t192.0.2.7\n", b"ask\t1\tguess\ta\n",
                        b"ask\t1\tsettle\t192.0.2.7\n")
    assert process.written == [] and throttle.inFlight("192.0.2.7") == 0
    assert sum("bad question record" in e.get("log_format", "") for e in events) == 3
    current[0] = None  # the relay's configuration has no [auth] (any more)
    process.protocol.outReceived(b"ask\t5\treserve\t192.0.2.7\n")
    assert process.written == [b"answer\t5\t-\n"]


class FailingThrottle:
    def reserve(self, client: str) -> Any:
        raise RuntimeError("store down")


def test_a_throttle_that_fails_is_answered_as_such() -> None:
    _, process, _, current = _throttlePool()
    current[0] = FailingThrottle()
    events = _published(process, b"ask\t7\treserve\t192.0.2.7\n")
    assert process.written == [b"answer\t7\t-\n"]
    assert any(e.get("log_failure") is not None for e in events)


def _answered(d: Any) -> Any:
    box: list[Any] = []
    d.addBoth(box.append)
    return box[0] if box else None


def test_the_acceptor_asks_the_relay_and_takes_its_answers() -> None:
    clock, lines = Clock(), []
    throttle = RelayCounters(clock, lines.append).throttle
    verifyObject(IAuthThrottle, throttle)
    reserve = throttle.reserve("192.0.2.7")
    settle = throttle.settle("192.0.2.7", True)
    assert lines == ["ask\t1\treserve\t192.0.2.7\n", "ask\t2\tsettle\t192.0.2.7\t1\n"]
    assert not reserve.called
    throttle.counters.answer(2, "3")
    throttle.counters.answer(1, "4")
    assert (_answered(reserve), _answered(settle)) == (4, 3)
    throttle.counters.answer(1, "5")  # (a second answer: ignored)
    refused = throttle.reserve("192.0.2.8")
    throttle.counters.answer(3, "-")
    assert _answered(refused).check(RelayUnavailable)


def test_an_unanswered_reservation_fails_and_is_released() -> None:
    """No answer within the timeout: the attempt fails (454, never checked uncounted), and
    its reservation is settled at once so that the relay does not keep it in flight; the
    late answer is ignored."""
    clock, lines = Clock(), []
    counters = RelayCounters(clock, lines.append, timeout=10)
    throttle = counters.throttle
    d = throttle.reserve("192.0.2.7")
    clock.advance(10)
    assert _answered(d).check(defer.TimeoutError)
    assert lines[-1] == "ask\t2\tsettle\t192.0.2.7\t0\n"
    throttle.counters.answer(1, "1")  # late: ignored
    throttle.counters.answer(2, "0")  # (the release's answer: nobody waits for it)
    assert len(lines) == 2


def test_when_the_relay_stops_answering_questions_fail_at_once() -> None:
    """Our standard input ended (the relay stops, or is gone): a session still draining
    gets its 454 now, not after the timeout."""
    clock, lines = Clock(), []
    counters = RelayCounters(clock, lines.append, timeout=10)
    throttle = counters.throttle
    services = AcceptorServices(FakeSessions())
    services.counters = counters
    waiting = throttle.reserve("192.0.2.7")
    reactor = MemoryReactor()
    reactor.running = True
    _FromRelay(reactor, services, 30.0).readConnectionLost()
    assert reactor.hasStopped  # (and it stops us, as before)
    assert _answered(waiting).check(RelayUnavailable)
    assert _answered(throttle.settle("192.0.2.7", True)).check(RelayUnavailable)
    assert len(lines) == 1


def test_no_relay_no_count() -> None:
    def gone(line: str) -> None:
        raise BrokenPipeError(32, "Broken pipe")

    failure = _answered(RelayCounters(Clock(), gone).throttle.reserve("192.0.2.7"))
    assert failure.check(RelayUnavailable)
    assert str(failure.value) == "the relay is gone: Broken pipe"


def _limiterPool() -> tuple[FakeProcess, MemoryRateLimiter, list[Any]]:
    pool, reactor, _ = _pool(1)
    limiter = MemoryRateLimiter(reactor)
    current: list[Any] = [limiter]
    pool.limiter = lambda: current[0]
    pool.startService()
    return reactor.spawned[0][0], limiter, current


def test_the_relay_counts_its_acceptors_sessions_and_rates() -> None:
    """max_connections_per_client and the rate limits count in the relay's limiter: a
    client's connections on every process add up."""
    process, limiter, _ = _limiterPool()
    key = "tcp:25 conn 192.0.2.7"
    limiter.acquire(key)  # a session of the relay's own
    process.protocol.outReceived(f"ask\t1\tacquire\t{key}\n".encode())
    assert process.written == [b"answer\t1\t2\n"] and limiter.sessions(key) == 2
    process.protocol.outReceived("ask\t2\thit\ttcp:25 mail 192.0.2.7\t60.0\n".encode() * 2)
    assert process.written[-2:] == [b"answer\t2\t1\n", b"answer\t2\t2\n"]
    process.protocol.outReceived(f"ask\t3\trelease\t{key}\n".encode())
    assert process.written[-1] == b"answer\t3\t0\n" and limiter.sessions(key) == 1
    # A release it never acquired (its acquire failed): nothing given back.
    process.protocol.outReceived(f"ask\t4\trelease\t{key}\n".encode())
    assert process.written[-1] == b"answer\t4\t-\n" and limiter.sessions(key) == 1
    events = _published(process, f"ask\t5\thit\t{key}\tnan\n".encode(),
                        f"ask\t6\thit\t{key}\t-1\n".encode())
    assert sum("bad question record" in e.get("log_format", "") for e in events) == 2


def test_an_acceptor_that_ends_gives_back_its_sessions() -> None:
    process, limiter, current = _limiterPool()
    key = "tcp:25 conn 192.0.2.7"
    process.protocol.outReceived(f"ask\t1\tacquire\t{key}\n".encode() * 2)
    current[0] = MemoryRateLimiter(Clock())  # (a reload: released on the one counted on)
    process.protocol.outReceived(f"ask\t2\trelease\t{key}\n".encode())
    assert limiter.sessions(key) == 1
    process.end(9 << 8)
    assert limiter.sessions(key) == 0


def test_with_a_rate_limiter_plugin_the_acceptor_asks_the_relay_nothing() -> None:
    """A [rate_limiter] plugin is a shared store: each process has its own instance (the
    relay's limiter getter says None, and a question gets '-')."""
    process, _, current = _limiterPool()
    current[0] = None
    process.protocol.outReceived(b"ask\t1\tacquire\ttcp:25 conn 192.0.2.7\n")
    assert process.written == [b"answer\t1\t-\n"]


def test_the_acceptors_limiter_asks_the_relay() -> None:
    clock, lines = Clock(), []
    counters = RelayCounters(clock, lines.append, timeout=10)
    limiter = counters.limiter
    verifyObject(IRateLimiter, limiter)
    acquired = limiter.acquire("tcp:25 conn 192.0.2.7")
    hit = limiter.hit("tcp:25 mail 192.0.2.7", 60)
    released = limiter.release("tcp:25 conn 192.0.2.7")
    assert lines == ["ask\t1\tacquire\ttcp:25 conn 192.0.2.7\n",
                     "ask\t2\thit\ttcp:25 mail 192.0.2.7\t60.0\n",
                     "ask\t3\trelease\ttcp:25 conn 192.0.2.7\n"]
    for serial, count in ((1, "3"), (2, "7"), (3, "0")):
        counters.answer(serial, count)
    assert (_answered(acquired), _answered(hit), _answered(released)) == (3, 7, 0)
    # A key that cannot be sent on one line fails (the limit is then not applied).
    assert _answered(limiter.hit("tcp:25\tx", 60)).check(RelayUnavailable)
    assert len(lines) == 3


def test_an_acquire_given_up_is_released() -> None:
    """The limits give up on an answer after their own timeout (they cancel the question):
    what the relay may have counted is released."""
    clock, lines = Clock(), []
    counters = RelayCounters(clock, lines.append, timeout=10)
    d = counters.limiter.acquire("k")
    d.cancel()
    assert _answered(d).check(defer.CancelledError)
    assert lines[-1] == "ask\t2\trelease\tk\n"
    failed = counters.limiter.acquire("k")
    counters.answer(3, "-")  # not counted: nothing to release
    assert _answered(failed).check(RelayUnavailable) and len(lines) == 3


def test_sessions_ending_after_the_relay_stopped_answering_release_quietly() -> None:
    """At a stop (or the end of a retired acceptor, after a reload) our input ends; the
    releases then waiting for their answer, and those of the sessions still draining, end
    without an error in the log (the bug hunt saw "rate limiter release(...) failed" at
    every reload): the relay gives back all we held when we end."""
    lines: list[str] = []
    counters = RelayCounters(Clock(), lines.append)
    waiting = counters.limiter.release("k")
    reserving = counters.throttle.reserve("192.0.2.7")
    counters.close()
    assert _answered(waiting) == 0
    assert _answered(reserving).check(RelayUnavailable)  # (an AUTH attempt: 454)
    assert _answered(counters.limiter.release("k")) == 0 and len(lines) == 2


def test_the_acceptor_reads_the_relays_answers_on_its_input() -> None:
    services = AcceptorServices(FakeSessions())
    services.counters = RelayCounters(Clock(), lambda line: None)
    d = services.counters.throttle.reserve("192.0.2.7")
    feed = _FromRelay(Clock(), services, 30.0)
    feed.dataReceived(b"answer\t1\t2\n")
    assert _answered(d) == 2


def test_a_child_that_dies_is_restarted_with_backoff() -> None:
    pool, reactor, _ = _pool(2)
    rescans: list[None] = []
    pool.rescan = lambda: rescans.append(None)
    pool.startService()
    reactor.spawned[0][0].end(9)
    assert len(reactor.spawned) == 2 and pool.restarts == 1
    # What it committed and did not report is looked for (it waited for a restart).
    assert len(rescans) == 1
    reactor.advance(1)
    assert len(reactor.spawned) == 3
    reactor.spawned[2][0].end(9)
    reactor.advance(1)
    assert len(reactor.spawned) == 3  # the pause doubled
    reactor.advance(1)
    assert len(reactor.spawned) == 4
    assert [c["pid"] for c in pool.describe()["running"]] == [1001, 1003]
    assert pool.describe()["restarts"] == 2


def test_reload_retires_the_children_and_starts_new_ones() -> None:
    pool, reactor, _ = _pool(1)
    pool.startService()
    old = reactor.spawned[0][0]
    pool.reload(b"[relay]\nprocesses = 3\n", {}, 2, 10.0)
    assert old.written == [RETIRE + b"\n"] and not old.stdinClosed  # ends with its sessions
    assert len(reactor.spawned) == 3
    assert reactor.spawned[1][0].toChild == {3: b"[relay]\nprocesses = 3\n"}
    assert pool.describe()["retiring"] == [old.pid]
    old.end(0)  # an old one exiting is not restarted
    reactor.advance(60)
    assert len(reactor.spawned) == 3 and pool.restarts == 0
    assert pool.describe()["retiring"] == []


def test_a_retired_child_that_does_not_end_is_killed() -> None:
    pool, reactor, _ = _pool(1)
    pool.startService()
    old = reactor.spawned[0][0]
    pool.reload(None, {}, 1, 10.0)
    reactor.advance(2 * 10.0 + 14)
    assert old.signals == []
    reactor.advance(2)
    assert old.signals == ["KILL"]


def test_stop_tells_every_child_and_waits_for_them() -> None:
    pool, reactor, _ = _pool(2)
    pool.startService()
    first, second = reactor.spawned[0][0], reactor.spawned[1][0]
    pool.reload(None, {}, 1, 30.0)  # first and second retiring, a third running
    third = reactor.spawned[2][0]
    d = pool.stopService()
    assert first.stdinClosed and second.stdinClosed and third.stdinClosed
    for process in (first, second):
        process.end(0)
    assert not d.called
    third.end(9)  # (signalled with the relay: not restarted)
    assert d.called
    reactor.advance(120)
    assert len(reactor.spawned) == 3


# -- the sockets shared ---------------------------------------------------------------------------


def test_shared_socket_of_tcp_and_unix_ports_only(tmp_path: Path) -> None:
    reactor = MemoryReactor()
    factory = Factory.forProtocol(Protocol)
    port = tcp.Port(0, factory, interface="127.0.0.1", reactor=reactor)
    port.startListening()
    try:
        assert sharedSocket(port, factory) == (port.fileno(), "inet")
        assert sharedSocket(port, Factory.forProtocol(Protocol)) is None  # wrapped (ssl:)
        assert sharedSocket(object(), factory) is None
        assert sharedSocket(None, factory) is None
    finally:
        port.socket.close()


# -- the child's side ---------------------------------------------------------------------------


def test_adopted_unix_listener_leaves_the_relays_socket_file(tmp_path: Path) -> None:
    path = str(tmp_path / "s.sock")
    listening = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    listening.bind(path)
    listening.listen(5)
    reactor = MemoryReactor()
    port = adoptPort(reactor, os.dup(listening.fileno()), socket.AF_UNIX,
                     Factory.forProtocol(Protocol))
    assert port.getHost().name == path.encode() or port.getHost().name == path
    port.connectionLost(None)
    assert os.path.exists(path), "closing the acceptor's copy removed the relay's socket"
    listening.close()


def test_notify_relay_writes_the_queue_id(monkeypatch: pytest.MonkeyPatch) -> None:
    out = io.StringIO()
    monkeypatch.setattr("sys.stdout", out)
    notifyRelay(QUEUE_ID)
    assert out.getvalue() == f"queued\t{QUEUE_ID}\n"


class FakeSessions:
    def __init__(self) -> None:
        from twisted.internet.defer import Deferred

        self.live = {object()}
        self.gone: Deferred[None] = Deferred()

    def whenGone(self) -> Any:
        return self.gone


class FakeListener:
    running = True

    def stopService(self) -> None:
        self.running = False


def test_retired_acceptor_stops_accepting_and_ends_with_its_sessions() -> None:
    sessions, clock = FakeSessions(), Clock()
    services = AcceptorServices(sessions)
    services.adopted = [FakeListener()]  # type: ignore[list-item]
    d = services.retire(clock, 30.0)
    assert not services.adopted[0].running and not d.called
    sessions.gone.callback(None)
    assert d.called


def test_retired_acceptor_ends_after_the_drain_time_at_most() -> None:
    sessions, clock = FakeSessions(), Clock()
    services = AcceptorServices(sessions)
    d = services.retire(clock, 30.0)
    clock.advance(30)
    assert d.called
    sessions.gone.callback(None)  # (later: nothing more happens)


# -- mailrelay status -----------------------------------------------------------------------------


def test_status_lists_the_acceptors() -> None:
    status = {
        "pid": 1, "version": "x", "started": 0.0, "config": "c", "hostname": "h", "spool": "s",
        "listeners": [], "sessions": 0, "delivery": {"mode": "inline", "state": "up"},
        "acceptors": {"count": 2, "running": [{"pid": 7, "since": 0.0}], "restarts": 3,
                      "retiring": [5]},
        "queue": {"error": "x"},
    }
    out = io.StringIO()
    printStatus(status, out)
    line = [t for t in out.getvalue().splitlines() if t.startswith("acceptor processes:")]
    assert len(line) == 1
    assert "1 of 2 running (pid 7 since" in line[0]
    assert "restarted 3 times" in line[0] and "previous ones finishing: 5" in line[0]
    status["acceptors"] = {"count": 2, "running": [], "restarts": 1, "retiring": []}
    out = io.StringIO()
    printStatus(status, out)
    assert "restarted 1 time" in out.getvalue() and "1 times" not in out.getvalue()
    status["acceptors"] = {"count": 0, "running": [], "restarts": 0, "retiring": []}
    out = io.StringIO()
    printStatus(status, out)
    assert "acceptor processes" not in out.getvalue()


def test_status_counts_in_words() -> None:
    """One message is 'message' (it read '1 messages, 1 recipients pending')."""
    status = {
        "pid": 1, "version": "x", "started": 0.0, "config": "c", "hostname": "h", "spool": "s",
        "listeners": [], "sessions": 0, "delivery": {"mode": "inline", "state": "up"},
        "queue": {"manager": "running", "messages": 1, "recipients": 1,
                  "queues": {"deferred": 1}},
    }
    out = io.StringIO()
    printStatus(status, out)
    assert "queue: 1 message, 1 recipient pending (1 deferred)\n" in out.getvalue()
    status["queue"] = {"manager": "running", "messages": 2, "recipients": 0, "queues": {}}
    out = io.StringIO()
    printStatus(status, out)
    assert "queue: 2 messages, 0 recipients pending\n" in out.getvalue()


def test_the_end_of_a_child_whose_status_is_unknown_says_so() -> None:
    """A child forked by a fork server that was then killed ends without a status the relay
    can read: the log said 'exited (status 255)', as if it had exited so, even when it was
    killed with SIGKILL."""
    from twisted.internet.error import ProcessDone, ProcessTerminated
    from twisted.python.failure import Failure

    from mailrelay.queue.process import endReason

    class Transport:
        statusUnknown = False

    transport = Transport()
    assert endReason(transport, Failure(ProcessTerminated(exitCode=3))) == "status 3"
    assert "signal 9" in endReason(transport, Failure(ProcessTerminated(signal=9)))
    transport.statusUnknown = True
    assert endReason(transport, Failure(ProcessTerminated(exitCode=255))) == (
        "its status unknown: the fork server that started it is gone")
    assert endReason(None, Failure(ProcessDone(0))) == "status 0"


def test_the_delivery_process_feed_takes_ids_and_a_rescan() -> None:
    """The delivery process's standard input: a queue id per line, or the rescan request
    the relay sends when an acceptor process ended unexpectedly."""
    from mailrelay.app.deliveryprocess import _Feed
    from mailrelay.queue.process import RESCAN

    class Queue:
        def __init__(self) -> None:
            self.calls: list[tuple[str, ...]] = []

        def enqueue(self, queueID: str) -> None:
            self.calls.append(("enqueue", queueID))

        def rescan(self) -> int:
            self.calls.append(("rescan",))
            return 0

    queue = Queue()
    feed = _Feed(queue, None)
    feed.dataReceived(b"01K1AP4J8VGG0000VZ3M7Q\n" + RESCAN.encode() + b"\n\n")
    assert queue.calls == [("enqueue", "01K1AP4J8VGG0000VZ3M7Q"), ("rescan",)]


def test_the_acceptors_count_in_the_throttle_of_the_running_configuration(
    tmp_path: Path,
) -> None:
    """A reload that changes [auth] failure_window builds a new throttle while it plans;
    the acceptors switch to it only when the new configuration runs (a reload that fails
    after planning leaves the relay's own listeners on the old one: so do the acceptors, and
    so does the next reload)."""
    from twisted.internet.testing import MemoryReactorClock

    from mailrelay.app.relay import makeRelayService
    from tests.test_config import HASH

    (tmp_path / "users").write_text(f"alice:{HASH}\n")

    def configured(window: int) -> Any:
        path = tmp_path / "mailrelay.toml"
        path.write_text(
            f'[spool]\ndirectory = "{tmp_path / "spool"}"\n[dns]\nreverse_lookups = false\n'
            'nameservers = ["127.0.0.1:5353"]\n'
            f'[auth]\npassword_file = "users"\nfailure_window = {window}\n'
            '[[listeners]]\nendpoint = "tcp:0:interface=127.0.0.1"\nauth = true\n'
            "auth_without_tls = true\n"
        )
        return loadConfig(str(path))

    top = makeRelayService(configured(60), MemoryReactorClock())
    running = top.throttle
    assert isinstance(running, MemoryAuthThrottle) and top.acceptors.throttle() is running
    plan = top.plan(configured(120), None)  # (and then, say, a listener cannot be opened)
    assert plan.throttle is not running and plan.carried.throttle is plan.throttle
    assert top.carried.throttle is running and top.acceptors.throttle() is running


def test_the_relays_children_do_not_say_again_what_the_relay_said(tmp_path: Path) -> None:
    """Found by a bug hunt: a plugin time limit its timeout cuts was warned of by the relay,
    by the delivery process and by every acceptor process, at start and at every reload.
    The children build their plugins quietly (the relay has said it)."""
    from twisted.internet.testing import MemoryReactorClock
    from twisted.logger import capturedLogs, formatEvent

    from mailrelay.app.acceptorprocess import makeAcceptorServices
    from mailrelay.app.deliveryprocess import makeDeliveryServices

    path = tmp_path / "mailrelay.toml"
    path.write_text(
        f'[spool]\ndirectory = "{tmp_path / "spool"}"\n'
        '[dns]\nreverse_lookups = false\nnameservers = ["127.0.0.1:5353"]\n'
        '[[plugins]]\nplugin = "dnsbl"\nzones = ["zen.example"]\ntimeout = 5\n'
    )
    config = loadConfig(str(path))
    with capturedLogs() as events:
        makeAcceptorServices(config, MemoryReactorClock(), [], lambda queueID: None)
        makeDeliveryServices(config, MemoryReactorClock())
    assert not [formatEvent(e) for e in events if "is not below" in formatEvent(e)]


# -- the users the relay has ----------------------------------------------------------------------


def test_the_pool_hands_each_child_the_users_the_relay_has() -> None:
    """With a password file, each child started gets the users the relay serves with (on a
    descriptor after its sockets, C{--users-fd}): one restarted after the file was edited
    into a state the relay refuses serves with them, rather than failing to start again
    and again.  Without (no [auth], or a site checker), nothing is passed."""
    users = {"/etc/mailrelay/users": {"alice": "$argon2id$v=19$m=65536,t=3,p=4$c2FsdA$aGFzaA"}}
    reactor = ProcessReactor()
    pool = AcceptorPool(
        reactor, "/etc/mailrelay.toml", {}, b"[relay]\n", 1, 30.0,
        lambda: [("tcp:25", 7, "inet"), ("unix:/run/s", 9, "unix")], [].append,
        users=lambda: users,
    )
    pool.startService()
    [(process, args, childFDs)] = reactor.spawned
    assert childFDs == {0: "w", 1: "r", 2: 2, 3: "w", 4: 7, 5: 9, 6: "w"}
    assert _argument(args, "--users-fd") == "6"
    assert json.loads(process.toChild[6]) == users and 6 in process.closed

    pool, reactor, _ = _pool(1)
    pool.startService()
    [(process, args, childFDs)] = reactor.spawned
    assert "--users-fd" not in args and 6 not in childFDs


def test_a_child_serves_with_the_relays_users_when_the_file_is_refused(tmp_path: Path) -> None:
    """The configuration loaded with the relay's users (an acceptor's): a password file
    that is refused now is said in the log, naming the file and why, and the relay's users
    are served; a good file is read as always.  Without them the file's error stops the
    load, as at the relay's start."""
    from argon2 import PasswordHasher
    from twisted.logger import capturedLogs, formatEvent

    hashed = PasswordHasher(time_cost=1, memory_cost=8, parallelism=1).hash("secret")
    (tmp_path / "users").write_text(f"alice:{hashed}\n")
    relays = {str(tmp_path / "users"): {"alice": "$argon2id$the-relays"}}
    text = ('[auth]\npassword_file = "users"\n[[listeners]]\nendpoint = "tcp:2525"\n'
            "auth = true\nauth_without_tls = true\n")
    good = _load(tmp_path, text)
    assert loadConfig(str(tmp_path / "mailrelay.toml"), relayUsers=relays).auth.users == \
        good.auth.users != relays[str(tmp_path / "users")]
    with open(tmp_path / "users", "a") as f:
        f.write("carol:plaintext\n")
    with pytest.raises(ConfigError):
        _load(tmp_path, text)
    with capturedLogs() as events:
        config = loadConfig(str(tmp_path / "mailrelay.toml"), relayUsers=relays)
    assert config.auth.users == relays[str(tmp_path / "users")]
    said = [formatEvent(e) for e in events]
    assert len(said) == 1, said
    assert said[0].startswith(f"{tmp_path / 'mailrelay.toml'}: auth.password_file: "
                              f"{tmp_path / 'users'}:2: "), said
    assert said[0].endswith("; serving with the 1 user(s) the relay has (the file is read "
                            "again when it changes)"), said
    assert events[0]["log_level"] is LogLevel.error


# -- steps of the clock ---------------------------------------------------------------------------


def test_a_child_that_ran_long_through_a_step_back_of_the_clock_restarts_at_once() -> None:
    """A child's life is measured on the monotonic clock: one that ran for two hours, the
    wall clock stepped back three meanwhile (NTP, date -s), then died, ran well (the pause
    is back to a second), not for minus an hour (a crash loop, its pause kept doubled); and
    its start shown by C{mailrelay status} is the wall clock's now less its life."""
    pool, reactor, _ = _pool(1)
    monotonic = Clock()
    pool.monotonic = monotonic.seconds
    reactor.advance(1_800_000_000)
    pool.startService()
    for n in range(3):  # a crash loop: the pause doubles to 8 s
        reactor.spawned[-1][0].end(9)
        reactor.advance(2**n)
    assert len(reactor.spawned) == 4
    reactor.rightNow -= 3 * 3600  # the wall clock stepped back...
    reactor.advance(2 * 3600)  # ... while the child ran for two hours
    monotonic.advance(2 * 3600)
    [running] = pool.describe()["running"]
    assert running["since"] == reactor.seconds() - 2 * 3600
    reactor.spawned[-1][0].end(9)
    reactor.advance(1)
    assert len(reactor.spawned) == 5  # restarted after a second, not 8


# -- the certificates the relay serves ------------------------------------------------------------


def test_the_pool_hands_each_child_the_certificates_the_relay_serves() -> None:
    """Each child started gets the bytes of the listeners' certificates and keys the relay
    serves (on a descriptor after its sockets and the users', C{--tls-files-fd}): one
    restarted after a file was edited into a state the relay refuses serves them, rather
    than failing to start again and again.  Without any, nothing is passed."""
    import base64

    files = {"/etc/mailrelay/relay.pem": b"-----BEGIN CERTIFICATE-----\n...",
             "/etc/mailrelay/relay.key": b"\x00key"}
    reactor = ProcessReactor()
    pool = AcceptorPool(
        reactor, "/etc/mailrelay.toml", {}, b"[relay]\n", 1, 30.0,
        lambda: [("tcp:25", 7, "inet")], [].append,
        users=lambda: {"/etc/mailrelay/users": {}}, tlsFiles=lambda: files,
    )
    pool.startService()
    [(process, args, childFDs)] = reactor.spawned
    assert childFDs == {0: "w", 1: "r", 2: 2, 3: "w", 4: 7, 5: "w", 6: "w"}
    assert (_argument(args, "--users-fd"), _argument(args, "--tls-files-fd")) == ("5", "6")
    handed = json.loads(process.toChild[6])
    assert {path: base64.b64decode(data) for path, data in handed.items()} == files
    assert 6 in process.closed

    pool, reactor, _ = _pool(1)
    pool.startService()
    [(process, args, childFDs)] = reactor.spawned
    assert "--tls-files-fd" not in args and 6 not in childFDs


def test_a_child_serves_the_relays_certificate_whatever_the_file_holds(tmp_path: Path) -> None:
    """The configuration loaded with the relay's certificate and key (an acceptor's) serves
    them, not the files: one edited since into a state the relay refuses (its error stopped
    the child's start, again and again), or renewed on disk but not reloaded."""
    import trustme

    ca = trustme.CA()

    def issue(name: str) -> None:
        leaf = ca.issue_cert(name)
        (tmp_path / "relay.pem").write_bytes(b"".join(p.bytes() for p in leaf.cert_chain_pems))
        leaf.private_key_pem.write_to_path(str(tmp_path / "relay.key"))

    issue("first.relay.test")
    text = ('[[listeners]]\nendpoint = "tcp:2525"\ntls_certificate = "relay.pem"\n'
            'tls_key = "relay.key"\n')
    relays = _load(tmp_path, text).listeners[0].certificate
    assert set(relays.files) == {str(tmp_path / "relay.pem"), str(tmp_path / "relay.key")}
    (tmp_path / "relay.pem").write_text("not a certificate\n")
    with pytest.raises(ConfigError, match="holds no PEM certificate"):
        _load(tmp_path, text)
    config = loadConfig(str(tmp_path / "mailrelay.toml"), relayFiles=relays.files)
    assert config.listeners[0].certificate.subject == relays.subject
    issue("second.relay.test")
    config = loadConfig(str(tmp_path / "mailrelay.toml"), relayFiles=relays.files)
    served = config.listeners[0].certificate.options.certificate
    assert served == relays.options.certificate


#: RFC 7919's ffdhe2048 group, as C{openssl genpkey -genparam -algorithm DH -pkeyopt
#: group:ffdhe2048} writes it: DH parameters for an C{ssl:} endpoint's C{dhParameters=}.
FFDHE2048 = """\
-----BEGIN DH PARAMETERS-----
MIIBCAKCAQEA//////////+t+FRYortKmq/cViAnPTzx2LnFg84tNpWp4TZBFGQz
+8yTnc4kmz75fS/jY2MMddj2gbICrsRhetPfHtXV/WVhJDP1H18GbtCFY2VVPe0a
87VXE15/V8k1mE8McODmi3fipona8+/och3xWKE2rec1MKzKT0g6eXq8CrGCsyT7
YdEIqUuyyOP7uWrat2DX9GgdT0Kj3jlN9K5W7edjcrsZCwenyO4KbXCeAvzhzffi
7MA0BM0oNC9hkXL+nOmFg/+OTxIy7vKBg8P+OxtMb61zO7X8vC7CIAXFjvGDfRaD
ssbzSibBsu/6iGtCOGEoXJf//////////wIBAg==
-----END DH PARAMETERS-----
"""


def test_a_child_serves_the_relays_dh_parameters(tmp_path: Path) -> None:
    """An C{ssl:} endpoint's C{dhParameters=} file: the relay reads it once, with the
    certificate's files, and hands its bytes to the children too; a child (and the relay)
    makes its TLS context of those bytes.  The child read the file itself, when its first
    client came: a file only root may read, or one removed or broken since the start,
    failed every TLS handshake of an acceptor started after it."""
    import trustme

    leaf = trustme.CA().issue_cert("first.relay.test")
    leaf.cert_chain_pems[0].write_to_path(str(tmp_path / "relay.pem"))
    leaf.private_key_pem.write_to_path(str(tmp_path / "relay.key"))
    (tmp_path / "dh.pem").write_text(FFDHE2048)
    text = (f'[[listeners]]\nendpoint = "ssl:2465:privateKey={tmp_path}/relay.key:'
            f'certKey={tmp_path}/relay.pem:dhParameters={tmp_path}/dh.pem"\n')
    relays = _load(tmp_path, text).listeners[0]
    assert relays.endpointCertificate.files[str(tmp_path / "dh.pem")] == FFDHE2048.encode()
    (tmp_path / "dh.pem").unlink()
    relays.settings.endpointTLS.getContext()  # (made of what was read at the start)
    config = loadConfig(str(tmp_path / "mailrelay.toml"),
                        relayFiles=relays.endpointCertificate.files)
    config.listeners[0].settings.endpointTLS.getContext()
    (tmp_path / "dh.pem").write_text("not DH parameters\n")
    with pytest.raises(ConfigError, match=r"dh\.pem.* holds no PEM DH parameters"):
        _load(tmp_path, text)


def test_a_child_serves_the_relays_ssl_endpoint_certificate(tmp_path: Path) -> None:
    """So with an C{ssl:} endpoint's own files (C{privateKey=}, C{certKey=},
    C{extraCertChain=}): the relay keeps their bytes, and a child loaded with them serves
    them whatever the files hold (a broken one stopped its start again and again)."""
    import trustme

    ca = trustme.CA().create_child_ca()  # (a chain to send: the intermediate)
    leaf = ca.issue_cert("first.relay.test")
    leaf.cert_chain_pems[0].write_to_path(str(tmp_path / "relay.pem"))
    (tmp_path / "chain.pem").write_bytes(b"".join(p.bytes() for p in leaf.cert_chain_pems[1:]))
    leaf.private_key_pem.write_to_path(str(tmp_path / "relay.key"))
    text = (f'[[listeners]]\nendpoint = "ssl:2465:privateKey={tmp_path}/relay.key:'
            f'certKey={tmp_path}/relay.pem:extraCertChain={tmp_path}/chain.pem"\n')
    relays = _load(tmp_path, text).listeners[0]
    assert set(relays.endpointCertificate.files) == {
        str(tmp_path / name) for name in ("relay.pem", "relay.key", "chain.pem")}
    (tmp_path / "relay.pem").write_text("not a certificate\n")
    with pytest.raises(ConfigError, match="no start line"):
        _load(tmp_path, text)
    config = loadConfig(str(tmp_path / "mailrelay.toml"),
                        relayFiles=relays.endpointCertificate.files)
    served = config.listeners[0]
    assert served.endpointCertificate.subject == relays.endpointCertificate.subject
    mine, theirs = served.settings.endpointTLS, relays.settings.endpointTLS
    assert mine.certificate.to_cryptography() == theirs.certificate.to_cryptography()
    assert [c.to_cryptography() for c in mine.extraCertChain] == [
        c.to_cryptography() for c in theirs.extraCertChain] != []


def test_an_ssl_endpoints_chain_file_is_read_as_a_ca_file(tmp_path: Path) -> None:
    """C{extraCertChain=} is read with L{mailrelay.pem.pemCertificates}, as a CA file: a
    chain whose last certificate is cut short (no C{-----END CERTIFICATE-----}) stops the
    start, naming which (Twisted's reading left it out of the chain sent, silently)."""
    import trustme

    ca = trustme.CA().create_child_ca()
    leaf = ca.issue_cert("first.relay.test")
    leaf.cert_chain_pems[0].write_to_path(str(tmp_path / "relay.pem"))
    leaf.private_key_pem.write_to_path(str(tmp_path / "relay.key"))
    chain = b"".join(p.bytes() for p in leaf.cert_chain_pems[1:])
    text = (f'[[listeners]]\nendpoint = "ssl:2465:privateKey={tmp_path}/relay.key:'
            f'certKey={tmp_path}/relay.pem:extraCertChain={tmp_path}/chain.pem"\n')
    (tmp_path / "chain.pem").write_bytes(chain)
    endpointTLS = _load(tmp_path, text).listeners[0].settings.endpointTLS
    assert len(endpointTLS.extraCertChain) == 1
    cut = chain + chain[: len(chain) // 2]
    (tmp_path / "chain.pem").write_bytes(cut)
    with pytest.raises(ConfigError, match="certificate 2 of 2 cannot be read"):
        _load(tmp_path, text)
    (tmp_path / "chain.pem").write_text("no certificate\n")
    with pytest.raises(ConfigError, match="doesn't contain any valid certificates"):
        _load(tmp_path, text)


def test_a_delivery_process_that_ran_long_restarts_after_a_second() -> None:
    """The delivery process's pause before a restart doubles in a crash loop (to 60 s) and
    starts again from a second after a child that ran well for a while, as an acceptor's
    does: it was only reset by a reload, so a process killed now and then (the OOM killer)
    came to wait a minute each time, mail waiting."""
    from mailrelay.queue.process import DeliveryProcessService

    from twisted.internet.testing import StringTransport

    class Reactor(ProcessReactor):
        def adoptStreamConnection(self, fd: int, family: Any, factory: Any) -> None:
            factory.buildProtocol(None).makeConnection(StringTransport())

    reactor = Reactor()
    monotonic = Clock()
    service = DeliveryProcessService(reactor, None, {}, configText=b"[relay]\n")
    service.monotonic = monotonic.seconds
    service.startService()
    for n in range(3):  # a crash loop: the pause doubles to 8 s
        reactor.spawned[-1][0].end(9)
        reactor.advance(2**n)
        monotonic.advance(2**n)
    assert len(reactor.spawned) == 4
    reactor.advance(3600)  # it runs well for an hour
    monotonic.advance(3600)
    reactor.spawned[-1][0].end(9)
    reactor.advance(1)
    assert len(reactor.spawned) == 5  # restarted after a second, not 8
    service.beginShutdown()
