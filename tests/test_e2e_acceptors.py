"""End-to-end: `[relay] processes = 2`, the relay and an acceptor process sharing the
listening socket: mail from many connections accepted by both and delivered once; the
acceptor stopped with the relay, replaced by a reload (its sessions finished first),
restarted after kill -9 without losing what it acknowledged.

To make sure a connection lands on the acceptor, the relay's own process is stopped
(SIGSTOP) while the connection is made: only the acceptor can accept it then."""

from __future__ import annotations

import concurrent.futures
import json
import os
import re
import signal
import smtplib
import time
from collections import Counter
from contextlib import contextmanager
from pathlib import Path

import pytest

from tests.harness import RelayProcess
from tests.test_e2e_delivery_process import _alive
from tests.test_e2e_operating import get, metricsPort
from tests.test_e2e_outbound import nexthop  # noqa: F401 - the aiosmtpd next-hop fixture

_STARTED = r"acceptor process started \(pid (\d+)\)"


@pytest.fixture
def relay(tmp_path: Path, nexthop):  # noqa: F811
    started: list[RelayProcess] = []

    def start(extra: str = ""):
        recorder, port = nexthop()
        r = RelayProcess(
            tmp_path / "relay",
            f'[relay]\nprocesses = 2\nsmarthost = "[127.0.0.1]:{port}"\n'
            f"[dns]\nreverse_lookups = false\n{extra}",
        )
        started.append(r)
        r.start()
        pid = int(r.waitForLog(_STARTED).group(1))
        r.waitForLog(rf"acceptor process {pid}: accepting on", timeout=20)
        return r, recorder, pid

    yield start
    for r in started:
        if r.process is not None and r.process.poll() is None:
            os.kill(r.process.pid, signal.SIGCONT)
        r.stop()


def _acceptorPids(r: RelayProcess) -> list[int]:
    return [int(p) for p in re.findall(_STARTED, r.log())]


def _waitForAcceptor(r: RelayProcess, count: int, timeout: float = 20) -> int:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        pids = _acceptorPids(r)
        if len(pids) >= count:
            return pids[-1]
        time.sleep(0.1)
    raise AssertionError(f"no acceptor process number {count} started:\n{r.log()}")


def _send(port: int, to: str) -> str:
    """Send one message; the queue id of its 250."""
    with smtplib.SMTP("127.0.0.1", port, timeout=20) as s:
        s.ehlo()
        s.mail("alice@example.com")
        s.rcpt(to)
        code, reply = s.data(b"Subject: p\r\n\r\nbody\r\n")
        assert code == 250, reply
    return reply.decode().split()[-1]


@contextmanager
def _relayStopped(r: RelayProcess):
    """The relay's own process stopped: only the acceptor accepts meanwhile."""
    assert r.process is not None
    os.kill(r.process.pid, signal.SIGSTOP)
    try:
        yield
    finally:
        os.kill(r.process.pid, signal.SIGCONT)


def _connectOnAcceptor(r: RelayProcess) -> smtplib.SMTP:
    with _relayStopped(r):
        s = smtplib.SMTP("127.0.0.1", r.port, timeout=20)
        s.ehlo()
    return s


def test_both_processes_accept_and_each_message_is_delivered_once(relay) -> None:
    r, recorder, acceptor = relay()
    with concurrent.futures.ThreadPoolExecutor(10) as pool:
        ids = list(pool.map(lambda n: _send(r.port, f"many{n}@example.org"), range(40)))
    with _relayStopped(r):
        ids.append(_send(r.port, "acceptor@example.org"))  # accepted by the acceptor
    # A queue id ends with four characters of its process (pid and randomness): one per
    # process that accepted.
    processes = Counter(queueID[-4:] for queueID in ids)
    assert len(processes) == 2, processes
    recorder.waitFor(lambda acc: len(acc) >= 41, timeout=60, what="41 messages")
    time.sleep(1)  # (a duplicate would come right after)
    delivered = Counter(m.rcptTos[0] for m in recorder.accepted)
    expected = {f"many{n}@example.org" for n in range(40)} | {"acceptor@example.org"}
    assert set(delivered) == expected and set(delivered.values()) == {1}, delivered
    assert _alive(acceptor)
    # Each intake line names the acceptor that wrote it ([...,acceptor=PID]); the relay's
    # own lines name none.
    log = r.log()
    for queueID in ids:
        line = re.search(rf"\[([^\]]*)\] {queueID}: from=<alice@example.com> ", log)
        assert line is not None, queueID
        if queueID[-4:] == ids[-1][-4:]:
            assert line.group(1) == f"mailrelay.cleanup.intake#info,acceptor={acceptor}"
        else:
            assert line.group(1) == "mailrelay.cleanup.intake#info"

    status = _status(r)
    assert f"acceptor processes: 1 of 1 running (pid {acceptor} since" in status, status


def _status(r: RelayProcess) -> str:
    import subprocess

    from tests.harness import TWISTD

    mailrelay = str(Path(TWISTD).with_name("mailrelay"))
    done = subprocess.run(
        [mailrelay, "status", "--spool", str(r.spool)], capture_output=True, text=True,
        timeout=30,
    )
    assert done.returncode == 0, done.stderr
    return done.stdout


def test_sigterm_stops_the_acceptor_after_its_session(relay) -> None:
    r, recorder, acceptor = relay()
    session = _connectOnAcceptor(r)  # a session on the acceptor, in the middle of DATA
    try:
        session.mail("alice@example.com")
        session.rcpt("open@example.org")
        assert session.docmd("DATA")[0] == 354
        session.send(b"Subject: late\r\n\r\nfirst part\r\n")
        assert r.process is not None
        r.process.send_signal(signal.SIGTERM)
        r.waitForLog(r"relay stopping: 1 session\(s\) open")  # the acceptor's
        session.send(b"last part\r\n.\r\n")
        code, reply = session.getreply()
        assert code == 250, reply  # finished and queued, then 421 or 221
        session.docmd("QUIT")
    finally:
        session.close()
    assert r.process is not None
    assert r.process.wait(30) in (0, -signal.SIGTERM)
    assert "Traceback" not in r.log()
    deadline = time.monotonic() + 10
    while _alive(acceptor) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not _alive(acceptor), "the acceptor process outlived the relay"
    queueID = reply.decode().split()[-1]
    assert recorder.to("open@example.org") or queueID in r.queued(), (
        "the message the acceptor queued while stopping is gone"
    )


def test_sighup_replaces_the_acceptor_which_finishes_its_sessions(relay) -> None:
    r, recorder, old = relay()
    session = _connectOnAcceptor(r)
    try:
        assert r.process is not None
        r.process.send_signal(signal.SIGHUP)
        new = _waitForAcceptor(r, 2)
        assert new != old
        r.waitForLog(r"configuration reloaded")
        r.waitForLog(rf"acceptor process {new}: accepting on", timeout=20)
        assert _alive(old), "the old acceptor did not wait for its session"
        session.sendmail("alice@example.com", ["old@example.org"], b"Subject: o\r\n\r\nx\r\n")
        session.quit()
    finally:
        session.close()
    r.waitForLog(rf"previous acceptor process \(pid {old}\) exited", timeout=20)
    recorder.waitTo("old@example.org")
    with _relayStopped(r):
        _send(r.port, "new@example.org")  # the new acceptor accepts
    recorder.waitTo("new@example.org")
    assert _alive(new)


def _health(r: RelayProcess) -> tuple[int, dict]:
    status, _, text = get(metricsPort(r), "/healthz")
    return status, json.loads(text)


def test_kill9_of_the_acceptor_loses_nothing_it_acknowledged(relay) -> None:
    """...and /healthz says which acceptor runs, before and after."""
    r, recorder, acceptor = relay('[metrics]\nlisten = "tcp:0:interface=127.0.0.1"\n')
    assert r.process is not None
    status, health = _health(r)
    assert status == 200, health
    assert (health["acceptors"], health["acceptor_pids"]) == ("up", [acceptor]), health
    with _relayStopped(r):
        # The relay reads nothing meanwhile: the acceptor's queued ids wait in its pipe.
        for n in range(3):
            _send(r.port, f"k{n}@example.org")
        os.kill(acceptor, signal.SIGKILL)
    r.waitForLog(rf"acceptor process \(pid {acceptor}\) exited unexpectedly")
    for n in range(3):
        recorder.waitTo(f"k{n}@example.org", timeout=30)
    restarted = _waitForAcceptor(r, 2)
    assert restarted != acceptor
    r.waitForLog(rf"acceptor process {restarted}: accepting on", timeout=20)
    with _relayStopped(r):
        _send(r.port, "after@example.org")
    recorder.waitTo("after@example.org")
    assert len(recorder.accepted) == 4
    status, health = _health(r)
    assert status == 200, health
    assert (health["acceptors"], health["acceptor_pids"]) == ("up", [restarted]), health
