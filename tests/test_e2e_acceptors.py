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
import socket
import time
from collections import Counter
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest

from tests.harness import RelayProcess
from tests.test_e2e_delivery_process import _alive
from tests.test_e2e_operating import get, metricsPort, scrape, value
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


def test_status_counts_the_acceptors_sessions(relay) -> None:
    """mailrelay status counted the relay's own sessions only (4 open of 8, said a bug
    hunt): the acceptor's are counted too, as it last said (within a second)."""
    r, _, _ = relay()
    onAcceptor = [_connectOnAcceptor(r) for _ in range(2)]
    onRelay = smtplib.SMTP("127.0.0.1", r.port, timeout=20)  # (either process)
    deadline = time.monotonic() + 10
    while "sessions: 3 open" not in (status := _status(r)):
        assert time.monotonic() < deadline, status
        time.sleep(0.2)
    for s in [*onAcceptor, onRelay]:
        s.quit()


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


def test_what_an_acceptor_of_a_killed_relay_queues_after_the_restart_is_delivered(
    relay,
) -> None:
    """kill -9 of the relay, restarted at once: its acceptor process, told by the end of its
    input, finishes its session in DATA -- after the new relay's delivery process scanned the
    spool -- and cannot tell anyone of the message it acknowledged.  The queue manager's
    periodic look into the spool ([queue] rescan_interval, short here) delivers it, once."""
    r, recorder, acceptor = relay("[queue]\nrescan_interval = 1\n")
    session = _connectOnAcceptor(r)
    try:
        session.mail("alice@example.com")
        session.rcpt("orphan@example.org")
        assert session.docmd("DATA")[0] == 354
        session.send(b"Subject: orphan\r\n\r\nfirst part\r\n")
        r.kill9()
        r.start()
        r.waitForLog(r"queue manager started: 0 queued entries", timeout=30)
        assert _alive(acceptor), "the old acceptor did not wait for its session"
        session.send(b"last part\r\n.\r\n")
        code, reply = session.getreply()
        assert code == 250, reply
        session.docmd("QUIT")
    finally:
        session.close()
    queueID = reply.decode().split()[-1]
    r.waitForLog(rf"{queueID}: the relay is gone; queued, delivered after its restart")
    recorder.waitTo("orphan@example.org", timeout=20)
    r.waitForLog(rf"{queueID}: removed")
    assert re.search(rf"{queueID}: in the spool but not known", r.log()), r.log()
    time.sleep(1.5)  # (a duplicate would come with the next looks)
    assert [m.rcptTos for m in recorder.accepted] == [["orphan@example.org"]]
    assert r.queued() == []


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


def test_kill9_of_the_acceptor_keeps_the_count_of_the_messages_it_accepted(relay) -> None:
    """An acceptor sends its metrics once a second: killed before the next snapshot, the
    messages it had accepted since were missing from mailrelay_messages_total, though the
    spool held them and they were delivered.  The relay counts those it saw queued."""
    r, recorder, acceptor = relay('[metrics]\nlisten = "tcp:0:interface=127.0.0.1"\n')
    port = metricsPort(r)
    with _relayStopped(r):
        for n in range(3):
            _send(r.port, f"m{n}@example.org")
        os.kill(acceptor, signal.SIGKILL)
    r.waitForLog(rf"acceptor process \(pid {acceptor}\) exited unexpectedly")
    samples = scrape(port)
    assert value(samples, "mailrelay_messages_total", reply="2xx", origin="smtp") == 3, samples
    for n in range(3):
        recorder.waitTo(f"m{n}@example.org", timeout=30)


@contextmanager
def _relayWithListener(directory: Path, listener: str, extra: str = "",
                       endpoint: str = "tcp:0:interface=127.0.0.1"):
    """A relay of two processes (held) whose one listener (on C{endpoint}) has the keys
    C{listener}; yields it and its acceptor's pid."""
    r = RelayProcess(
        directory,
        f"[relay]\nprocesses = 2\n[dns]\nreverse_lookups = false\n{extra}"
        f'[[listeners]]\nendpoint = "{endpoint}"\n{listener}',
        ("--spool", str(directory / "spool"), "--hostname", "relay.test"),
        defaults=False, hold=True,
    )
    try:
        r.start()
        acceptor = int(r.waitForLog(_STARTED).group(1))
        r.waitForLog(rf"acceptor process {acceptor}: accepting on", timeout=20)
        yield r, acceptor
    finally:
        if r.process is not None and r.process.poll() is None:
            os.kill(r.process.pid, signal.SIGCONT)
        r.stop()


def test_auth_failures_count_across_processes(tmp_path: Path) -> None:
    """`max_failures` holds per client whichever process takes its connections: failures
    made on the acceptor's connections lock the client out of the relay's own process too
    (the acceptor counts them in the relay's throttle), as with one process."""
    from tests.test_e2e_tls_auth import Site

    site = Site(tmp_path / "relay")
    with _relayWithListener(
        site.directory, "auth = true\nauth_without_tls = true\n",
        '[auth]\npassword_file = "users"\nthrottle_after = 10\nmax_failures = 3\n',
    ) as (r, acceptor):
        _authFailures(r, acceptor)


def _authFailures(r: RelayProcess, acceptor: int) -> None:
    from tests.test_e2e_tls_auth import PASSWORDS

    for n in range(2):
        s = _connectOnAcceptor(r)
        code, _ = s.docmd("AUTH", "PLAIN " + _plain("alice", f"wrong {n}"))
        assert code == 535
        s.close()
    r.waitForLog(rf"acceptor={acceptor}\] authentication failed from 127\.0\.0\.1: "
                 r"sasl_method=PLAIN sasl_username=alice failures=2 ")
    # The next connection on the relay's own process (the acceptor stopped meanwhile).
    os.kill(acceptor, signal.SIGSTOP)
    try:
        s = smtplib.SMTP("127.0.0.1", r.port, timeout=20)
        s.ehlo()
    finally:
        os.kill(acceptor, signal.SIGCONT)
    code, _ = s.docmd("AUTH", "PLAIN " + _plain("alice", "wrong 2"))
    assert code == 421  # the third failure of max_failures = 3 (one process: failures=1)
    s.close()
    r.waitForLog(r"\[mailrelay\.receive\.auth#warn\] authentication failed from "
                 r"127\.0\.0\.1: sasl_method=PLAIN sasl_username=alice failures=3 \(too many "
                 r"failures, closing\)")
    # Locked out on the acceptor too, even with the right password.
    s = _connectOnAcceptor(r)
    code, _ = s.docmd("AUTH", "PLAIN " + _plain("alice", PASSWORDS["alice"]))
    assert code == 421
    s.close()
    r.waitForLog(rf"acceptor={acceptor}\] authentication failed from 127\.0\.0\.1: "
                 r"sasl_method=PLAIN sasl_username=alice failures=3 \(too many failures, "
                 r"refused with 421 without checking\)")


def _plain(user: str, password: str) -> str:
    import base64

    return base64.b64encode(f"\0{user}\0{password}".encode()).decode()


def _openWhileStopped(r: RelayProcess, stopped: int) -> socket.socket:
    """A connection taken by the process that is not C{stopped} (a pid): only the other one
    can accept it meanwhile.  Its greeting is left to read."""
    os.kill(stopped, signal.SIGSTOP)
    try:
        sock = socket.create_connection(("127.0.0.1", r.port), timeout=20)
        time.sleep(0.5)  # (the running process accepts it meanwhile)
    finally:
        os.kill(stopped, signal.SIGCONT)
    return sock


def _greeting(sock: socket.socket) -> bytes:
    data = b""
    while not data.endswith(b"\r\n"):
        chunk = sock.recv(1024)
        if not chunk:
            break
        data += chunk
    return data


def test_connections_per_client_count_across_processes(tmp_path: Path) -> None:
    """`max_connections_per_client` holds per client whichever process takes its
    connections: the acceptor counts its sessions in the relay's limiter."""
    with _relayWithListener(tmp_path, "max_connections_per_client = 2\nlimit_exceptions = []\n"
                            ) as (r, acceptor):
        _perClient(r, acceptor)


def _perClient(r: RelayProcess, acceptor: int) -> None:
    assert r.process is not None
    first = _openWhileStopped(r, r.process.pid)  # on the acceptor
    second = _openWhileStopped(r, acceptor)  # on the relay
    third = _openWhileStopped(r, r.process.pid)  # on the acceptor: its second, the third
    try:
        assert _greeting(first).startswith(b"220 ")
        assert _greeting(second).startswith(b"220 ")
        assert _greeting(third) == (
            b"421 4.7.0 relay.test Error: too many connections from 127.0.0.1\r\n")
        r.waitForLog(rf"acceptor={acceptor}\] connection from 127\.0\.0\.1 on \S+ refused: 3 "
                     r"connections at once is over the limit of 2")
    finally:
        for sock in (first, second, third):
            sock.close()
    # Once they have ended, the client may connect again (each process gave its back).
    deadline = time.monotonic() + 10
    while True:
        sock = _openWhileStopped(r, r.process.pid)
        try:
            greeting = _greeting(sock)
        finally:
            sock.close()
        if greeting.startswith(b"220 ") or time.monotonic() > deadline:
            break
    assert greeting.startswith(b"220 "), greeting


def _issue(ca: Any, directory: Path, name: str) -> None:
    """A certificate for C{name} of trustme's C{ca} in C{directory}/relay.pem, its key in
    relay.key."""
    leaf = ca.issue_cert(name)
    (directory / "relay.pem").write_bytes(b"".join(p.bytes() for p in leaf.cert_chain_pems))
    leaf.private_key_pem.write_to_path(str(directory / "relay.key"))


def _servedName(ca: Any, r: RelayProcess, starttls: bool = False) -> str:
    """The name (DNS subjectAltName) of the certificate C{r} serves, over implicit TLS or
    C{starttls}, checked against trustme's C{ca}."""
    import ssl

    context = ssl.create_default_context()
    ca.configure_trust(context)
    context.check_hostname = False
    if starttls:
        with smtplib.SMTP("127.0.0.1", r.port, timeout=20) as s:
            s.starttls(context=context)
            cert = s.sock.getpeercert()
    else:
        with smtplib.SMTP_SSL("127.0.0.1", r.port, timeout=20, context=context) as s:
            s.ehlo("client.example")
            cert = s.sock.getpeercert()
    return next(v for kind, v in cert["subjectAltName"] if kind == "DNS")


def test_an_ssl_listener_is_served_by_the_acceptors_and_reloads_its_certificate(
        tmp_path: Path, nexthop) -> None:  # noqa: F811
    """An ssl: listener (implicit TLS, port 465) is served by the acceptor processes too,
    and a reload (SIGHUP, as `mailrelay reload`) serves the certificate renewed on disk
    (certbot) from every process; a certificate that does not load refuses the reload,
    naming the listener's endpoint, and the one in use stays.  The ssl: listener was
    served by the relay's process only (logged at start), and kept the certificate it
    started with until a restart."""
    import ssl

    import trustme

    ca = trustme.CA()
    directory = tmp_path / "relay"
    directory.mkdir()

    def issue(name: str) -> None:
        _issue(ca, directory, name)

    def served(r: RelayProcess) -> str:
        return _servedName(ca, r)

    recorder, port = nexthop()
    config = (f'[relay]\nprocesses = 2\nsmarthost = "[127.0.0.1]:{port}"\n'
              "[dns]\nreverse_lookups = false\n"
              '[[listeners]]\nendpoint = "ssl:0:interface=127.0.0.1:privateKey=relay.key:'
              'certKey=relay.pem"\n')
    issue("first.relay.test")
    r = RelayProcess(directory, config, defaults=False,
                     args=("--spool", str(directory / "spool"), "--hostname", "relay.test"))
    try:
        r.start()
        pid = int(r.waitForLog(_STARTED).group(1))
        r.waitForLog(rf"acceptor process {pid}: accepting on", timeout=20)
        assert "served by the relay's process only" not in r.log()
        assert served(r) == "first.relay.test"
        with _relayStopped(r):
            assert served(r) == "first.relay.test"  # the acceptor's
        issue("second.relay.test")  # renewed on disk
        assert served(r) == "first.relay.test"  # not before the reload
        assert r.process is not None
        r.process.send_signal(signal.SIGHUP)
        r.waitForLog(r"configuration reloaded from")
        new = _waitForAcceptor(r, 2)
        r.waitForLog(rf"acceptor process {new}: accepting on", timeout=20)
        assert served(r) == "second.relay.test"
        with _relayStopped(r):
            assert served(r) == "second.relay.test"  # the new acceptor's
        (directory / "relay.pem").write_text("not a certificate\n")
        r.process.send_signal(signal.SIGHUP)
        line = r.waitForLog(r"configuration not reloaded.*").group(0)
        assert "listeners[0].endpoint" in line, line
        assert served(r) == "second.relay.test"
        with _relayStopped(r):
            assert served(r) == "second.relay.test"
        with _relayStopped(r):
            with smtplib.SMTP_SSL("127.0.0.1", r.port, timeout=20,
                                  context=ssl._create_unverified_context()) as s:
                s.sendmail("alice@example.com", ["tls@example.org"], b"Subject: s\r\n\r\nx\r\n")
        recorder.waitTo("tls@example.org")
    finally:
        if r.process is not None and r.process.poll() is None:
            os.kill(r.process.pid, signal.SIGCONT)
        r.stop()


def test_an_acceptor_restarted_on_a_refused_password_file_serves_the_relays_users(
    tmp_path: Path,
) -> None:
    """The password file edited into a state the relay refuses (it keeps serving with the
    users it read), then the acceptor killed: the one started again serves with the
    relay's users, saying why in the log.  It exited at start, again and again, on the
    file's error: a crash loop beside a relay that served."""
    from tests.test_e2e_tls_auth import PASSWORDS, Site

    site = Site(tmp_path / "relay")
    with _relayWithListener(
        site.directory, "auth = true\nauth_without_tls = true\n",
        '[auth]\npassword_file = "users"\n',
    ) as (r, acceptor):
        with open(site.directory / "users", "a") as f:
            f.write("carol:plaintext\n")
        os.kill(acceptor, signal.SIGKILL)
        r.waitForLog(rf"acceptor process \(pid {acceptor}\) exited unexpectedly")
        again = _waitForAcceptor(r, 2)
        r.waitForLog(rf"acceptor process {again}: accepting on", timeout=20)
        said = r.waitForLog(rf"acceptor={again}\] (.*)auth\.password_file: .*users:3: .*; "
                            r"serving with the 2 user\(s\) the relay has")
        assert "mailrelay.toml" in said.group(1), said.group(0)
        s = _connectOnAcceptor(r)
        code, reply = s.docmd("AUTH", "PLAIN " + _plain("alice", PASSWORDS["alice"]))
        assert code == 235, reply
        s.close()
        r.waitForLog(rf"acceptor={again}\] .*sasl_username=alice")
        assert f"(pid {again}) exited" not in r.log()
        assert len(_acceptorPids(r)) == 2


@pytest.mark.parametrize("kind", ["tls_certificate", "ssl"])
def test_an_acceptor_restarted_on_a_refused_certificate_serves_the_relays(
    tmp_path: Path, kind: str
) -> None:
    """The listener's certificate edited into a state the relay refuses (a reload keeps
    the one in use), then the acceptor killed: the one started again serves the
    certificate the relay serves, handed to it by the relay.  It exited at start, again
    and again, on the file's error: a crash loop beside a relay that served."""
    import trustme

    ca = trustme.CA()
    directory = tmp_path / "relay"
    directory.mkdir()
    _issue(ca, directory, "first.relay.test")

    def served(r: RelayProcess) -> str:
        return _servedName(ca, r, starttls=kind == "tls_certificate")

    if kind == "ssl":
        listener = {"listener": "", "endpoint": "ssl:0:interface=127.0.0.1:privateKey="
                    f"{directory}/relay.key:certKey={directory}/relay.pem"}
    else:
        listener = {"listener": 'tls_certificate = "relay.pem"\ntls_key = "relay.key"\n'}
    with _relayWithListener(directory, **listener) as (r, acceptor):
        (directory / "relay.pem").write_text("not a certificate\n")
        assert r.process is not None
        r.process.send_signal(signal.SIGHUP)
        r.waitForLog(r"configuration not reloaded.*listeners\[0\]\.(tls_certificate|endpoint)")
        os.kill(acceptor, signal.SIGKILL)
        r.waitForLog(rf"acceptor process \(pid {acceptor}\) exited unexpectedly")
        again = _waitForAcceptor(r, 2)
        r.waitForLog(rf"acceptor process {again}: accepting on", timeout=20)
        with _relayStopped(r):
            assert served(r) == "first.relay.test"  # the restarted acceptor's
        assert served(r) == "first.relay.test"
        assert "configuration error" not in r.log()


def test_an_acceptor_restarted_without_the_dh_file_serves_the_relays_dh_parameters(
    tmp_path: Path
) -> None:
    """An ssl: listener's dhParameters= file removed (or made unreadable) after the start,
    then the acceptor killed: the one started again makes its TLS context of the bytes the
    relay read at the start and handed it, as the certificate's.  It read the file itself
    when its first client came: every TLS handshake it then took failed (and the relay's
    own too, had no client come before the file went)."""
    import trustme

    from tests.test_acceptors import FFDHE2048

    ca = trustme.CA()
    directory = tmp_path / "relay"
    directory.mkdir()
    _issue(ca, directory, "first.relay.test")
    (directory / "dh.pem").write_text(FFDHE2048)
    endpoint = (f"ssl:0:interface=127.0.0.1:privateKey={directory}/relay.key:"
                f"certKey={directory}/relay.pem:dhParameters={directory}/dh.pem")
    with _relayWithListener(directory, "", endpoint=endpoint) as (r, acceptor):
        (directory / "dh.pem").unlink()
        os.kill(acceptor, signal.SIGKILL)
        r.waitForLog(rf"acceptor process \(pid {acceptor}\) exited unexpectedly")
        again = _waitForAcceptor(r, 2)
        r.waitForLog(rf"acceptor process {again}: accepting on", timeout=20)
        with _relayStopped(r):
            assert _servedName(ca, r) == "first.relay.test"  # the restarted acceptor's
        assert _servedName(ca, r) == "first.relay.test"
        assert f"(pid {again}) exited" not in r.log()


def test_a_memory_greylist_with_several_processes_is_warned_of_once(relay) -> None:
    """docs/plugin-greylist.md: the memory store is per process; with processes = 2 a
    client whose retry reached the other process was greylisted again, without a word.
    The relay now warns at start, once (not again in the acceptor), naming the file, the
    key and the shared store to use."""
    r, _, _ = relay('[[plugins]]\nplugin = "greylist"\n')
    text = r.log()
    warning = (f'{r.directory / "mailrelay.toml"}: plugins[0].store = "memory" keeps the '
               "greylisting records in each process, and [relay] processes = 2: a client whose "
               'retry reaches another process is greylisted again; set store = "redis" to share '
               "them between the processes")
    assert text.count(warning) == 1, text
