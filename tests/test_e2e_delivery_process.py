"""End-to-end: the queue manager in its own process (the default), restarted when it dies,
stopped with the relay; and the inline mode (`[queue] process = "inline"`)."""

from __future__ import annotations

import contextlib
import json
import os
import re
import signal
import smtplib
import time
from pathlib import Path
from typing import Any

import pytest

from tests.harness import RelayProcess
from tests.test_e2e_outbound import nexthop  # noqa: F401 - the aiosmtpd next-hop fixture


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    try:  # a zombie (exited, not yet reaped) does not count
        with open(f"/proc/{pid}/stat") as f:
            return f.read().split(") ", 1)[1][0] != "Z"
    except OSError:
        return False
    return True


def _send(port: int, to: str) -> None:
    with smtplib.SMTP("127.0.0.1", port, timeout=10) as s:
        s.sendmail("alice@example.com", [to], b"Subject: p\r\n\r\nbody\r\n")


@pytest.fixture
def relay(tmp_path: Path):
    started: list[RelayProcess] = []

    def start(config: str) -> RelayProcess:
        r = RelayProcess(tmp_path / f"relay{len(started)}", config)
        started.append(r)
        return r.start()

    yield start
    for r in started:
        r.stop()


def test_delivery_process_restarted_and_stopped_with_the_relay(relay, nexthop) -> None:  # noqa: F811
    recorder, port = nexthop()
    r = relay(f'[relay]\nsmarthost = "[127.0.0.1]:{port}"\n[dns]\nreverse_lookups = false\n')
    first = int(r.waitForLog(r"delivery process started \(pid (\d+)\)").group(1))
    _send(r.port, "one@example.org")
    recorder.waitTo("one@example.org")
    r.waitForLog(r": removed")

    os.kill(first, signal.SIGKILL)
    # It cannot know whether a next hop had taken a message it was delivering: the log says
    # those are sent again (Postfix's qmgr defers them too, without saying so).
    r.waitForLog(
        r"delivery process exited unexpectedly \(.*\); restarting in 1s; messages it was "
        r"delivering will be tried again, and any a next hop had already accepted will be "
        r"delivered twice \(a maildir finds its copy\)"
    )
    pids = [int(p) for p in re.findall(r"delivery process started \(pid (\d+)\)", r.log())]
    deadline = time.monotonic() + 15
    while len(pids) < 2 and time.monotonic() < deadline:
        time.sleep(0.1)
        pids = [int(p) for p in re.findall(r"delivery process started \(pid (\d+)\)", r.log())]
    assert len(pids) == 2 and pids[1] != first
    _send(r.port, "two@example.org")  # accepted meanwhile or after: delivered either way
    recorder.waitTo("two@example.org", timeout=20)

    # twistd ends by re-raising the SIGTERM it shut down on: -15 is a clean stop.
    assert r.stop() in (0, -signal.SIGTERM)
    assert "Traceback" not in r.log()
    deadline = time.monotonic() + 10
    while _alive(pids[1]) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not _alive(pids[1]), "the delivery process outlived the relay"


def test_a_second_sigterm_while_stopping_is_no_error(relay) -> None:
    """A delivery process told to stop twice (the whole process group signalled, or SIGTERM
    and then its relay's stop) while a delivery holds it: the second is no error.  It
    logged 'ReactorNotRunning' as critical, with a traceback (Twisted's handler stops the
    reactor again)."""
    import socket

    silent = socket.socket()  # a next hop that takes the connection and never answers
    silent.bind(("127.0.0.1", 0))
    silent.listen(5)
    try:
        port = silent.getsockname()[1]
        r = relay(f'drain_time = 2\n[relay]\nsmarthost = "[127.0.0.1]:{port}"\n'
                  "[dns]\nreverse_lookups = false\n")
        pid = int(r.waitForLog(r"delivery process started \(pid (\d+)\)").group(1))
        _send(r.port, "held@example.org")
        r.waitForLog(r"held@example\.org|queue active")
        time.sleep(0.5)  # (connected, waiting for the greeting)
        os.kill(pid, signal.SIGTERM)
        r.waitForLog(r"Received SIGTERM, shutting down")
        time.sleep(0.3)
        if _alive(pid):  # still finishing its delivery: the case
            os.kill(pid, signal.SIGTERM)
        r.waitForLog(r"delivery process exited", timeout=60)
        log = r.log()
        assert "ReactorNotRunning" not in log and "Traceback" not in log, log
    finally:
        silent.close()


def _scriptedNextHop(sessions: list[dict[bytes, Any]], received: list[bytes]) -> Any:
    """A next hop on a loopback port playing one script per connection: a reply to each
    command (by its first word), the message's bytes kept in C{received}; in a thread,
    stopped by closing the socket it returns.

    A script's C{b"STARTTLS"} reply is followed by what the client takes for its TLS: with
    C{b"TLS"} (an C{ssl.SSLContext}) a real handshake, then the script goes on over TLS
    (and C{b"DROP"}, a command's first word, closes the connection when it comes); without
    it, a line that is not TLS."""
    import socket
    import threading

    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen(5)
    server.settimeout(30)

    def play(conn: Any, replies: dict[bytes, Any]) -> None:
        reader = conn.makefile("rb")
        conn.sendall(b"220 hop.test ESMTP\r\n")
        for line in reader:
            verb = line.split(b" ", 1)[0].strip().upper().rstrip(b":")
            if verb == replies.get(b"DROP"):
                return
            if verb == b"DATA" and replies[b"DATA"].startswith(b"354"):
                conn.sendall(replies[b"DATA"])
                body = b"".join(iter(reader.readline, b".\r\n"))
                received.append(body)
                conn.sendall(replies[b"."])
                continue
            conn.sendall(replies.get(verb, b"250 ok\r\n"))
            if verb == b"STARTTLS" and b"STARTTLS" in replies:
                if b"TLS" in replies:
                    tls = replies[b"TLS"].wrap_socket(conn, server_side=True)
                    play(_Resumed(tls), {k: v for k, v in replies.items()
                                         if k not in (b"STARTTLS", b"TLS")} |
                         {b"EHLO": b"250-hop.test\r\n250 PIPELINING\r\n"})
                    return
                # No TLS here: what comes once the client starts its handshake (not with
                # the reply, which would be a response injection).
                time.sleep(0.3)
                conn.sendall(b"this is not TLS\r\n")
                return
            if verb == b"QUIT":
                return

    def serve() -> None:
        for replies in sessions:
            try:
                conn, _ = server.accept()
            except OSError:
                return
            with conn, contextlib.suppress(OSError):  # (the relay may reset it)
                conn.settimeout(30)
                play(conn, replies)

    threading.Thread(target=serve, daemon=True).start()
    return server


class _Resumed:
    """A TLS socket whose session starts with its own greeting skipped: after STARTTLS the
    server says nothing until the client's EHLO (L{_scriptedNextHop}'s C{play} greets)."""

    def __init__(self, tls: Any) -> None:
        self._tls = tls
        self._greeted = False

    def makefile(self, mode: str) -> Any:
        return self._tls.makefile(mode)

    def sendall(self, data: bytes) -> None:
        if not self._greeted:  # play's greeting: not after STARTTLS
            self._greeted = True
            return
        self._tls.sendall(data)


def test_a_next_hop_answering_data_with_250_is_a_protocol_error_and_retried(relay) -> None:
    """A next hop that answers DATA with 250 (not 354): the attempt fails at once, deferred
    as a protocol error, and the message goes at the next attempt.  It raised KeyError in
    the delivery process, twice, and the attempt never ended (the message stayed active for
    the one-hour delivery limit)."""
    received: list[bytes] = []
    good = {b"DATA": b"354 go\r\n", b".": b"250 2.0.0 queued\r\n", b"QUIT": b"221 bye\r\n"}
    server = _scriptedNextHop([{b"DATA": b"250 what\r\n", b"QUIT": b"221 bye\r\n"}, good],
                              received)
    try:
        port = server.getsockname()[1]
        r = relay(f'[relay]\nsmarthost = "[127.0.0.1]:{port}"\n[dns]\nreverse_lookups = false\n'
                  "[queue]\nmin_backoff = 1\n")
        _send(r.port, "bob@example.org")
        r.waitForLog(r"to=<bob@example\.org>.*status=deferred \(X-mailrelay; protocol error: "
                     r"unexpected reply to DATA 250 what .*while sending DATA", timeout=30)
        r.waitForLog(r"to=<bob@example\.org>.*status=sent", timeout=30)
        assert len(received) == 1 and b"Subject: p" in received[0]
        log = r.log()
        assert "Traceback" not in log and "Unhandled" not in log, log
    finally:
        server.close()


def test_a_failed_opportunistic_tls_handshake_is_retried_in_plaintext(relay) -> None:
    """tls = "may" (the default) and a next hop whose STARTTLS handshake fails: a new
    message is deferred; once it has been queued for [queue] min_backoff, the same address
    is tried again at once without TLS, and it goes -- as Postfix at its "may" level
    (RETRY_AS_PLAINTEXT after $minimal_backoff_time).  Before, it was sent in plaintext at
    the first failure (and, before that, deferred at every attempt until max_lifetime)."""
    received: list[bytes] = []
    ehlo = b"250-hop.test\r\n250 STARTTLS\r\n"
    broken = {b"EHLO": ehlo, b"STARTTLS": b"220 go ahead\r\n"}
    good = {b"EHLO": ehlo, b"DATA": b"354 go\r\n", b".": b"250 2.0.0 queued\r\n",
            b"QUIT": b"221 bye\r\n"}
    server = _scriptedNextHop([broken, broken, good], received)
    try:
        port = server.getsockname()[1]
        r = relay(f'[relay]\nsmarthost = "[127.0.0.1]:{port}"\n[dns]\nreverse_lookups = false\n'
                  "[queue]\nmin_backoff = 2\n")
        _send(r.port, "carol@example.org")
        r.waitForLog(r"to=<carol@example\.org>.*attempts=1, status=deferred \(X-mailrelay; "
                     r"TLS handshake with 127\.0\.0\.1\[127\.0\.0\.1\] failed", timeout=30)
        assert received == [] and "without TLS" not in r.log()
        r.waitForLog(r"to=<carol@example\.org>.*attempts=2, status=sent", timeout=30)
        assert len(received) == 1 and b"Subject: p" in received[0]
        log = r.log()
        assert re.search(r"TLS handshake with 127\.0\.0\.1\[127\.0\.0\.1\] failed.*trying "
                         r"127\.0\.0\.1\[127\.0\.0\.1\]:\d+ again without TLS", log), log
        assert "Traceback" not in log
    finally:
        server.close()


def test_a_tls_session_lost_mid_transaction_is_retried_in_plaintext(relay, tmp_path) -> None:
    """tls = "may" and a next hop that completes the TLS handshake but drops the connection
    in the transaction (Postfix's "TLS session failure"): deferred while the message is new,
    then, queued for min_backoff, sent again at once over a plaintext connection."""
    import ssl

    import trustme

    ca = trustme.CA()
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ca.issue_cert("127.0.0.1").configure_cert(context)
    received: list[bytes] = []
    ehlo = b"250-hop.test\r\n250 STARTTLS\r\n"
    dropping = {b"EHLO": ehlo, b"STARTTLS": b"220 go ahead\r\n", b"TLS": context,
                b"DROP": b"RCPT", b"DATA": b"354 go\r\n", b".": b"250 2.0.0 queued\r\n"}
    good = {b"EHLO": ehlo.replace(b"STARTTLS", b"8BITMIME"), b"DATA": b"354 go\r\n",
            b".": b"250 2.0.0 queued\r\n", b"QUIT": b"221 bye\r\n"}
    server = _scriptedNextHop([dropping, dropping, good], received)
    try:
        port = server.getsockname()[1]
        r = relay(f'[relay]\nsmarthost = "[127.0.0.1]:{port}"\n[dns]\nreverse_lookups = false\n'
                  "[queue]\nmin_backoff = 2\n")
        _send(r.port, "dave@example.org")
        r.waitForLog(r"to=<dave@example\.org>.*attempts=1, status=deferred \(X-mailrelay; "
                     r"lost connection with 127\.0\.0\.1\[127\.0\.0\.1\] while", timeout=30)
        assert received == []
        r.waitForLog(r"to=<dave@example\.org>.*attempts=2, status=sent", timeout=30)
        assert len(received) == 1 and b"Subject: p" in received[0]
        log = r.log()
        assert re.search(r"lost connection with 127\.0\.0\.1\[127\.0\.0\.1\] while sending "
                         r"RCPT TO; trying 127\.0\.0\.1\[127\.0\.0\.1\]:\d+ again without "
                         r"TLS", log), log
        assert "Traceback" not in log
    finally:
        server.close()


def test_messages_accepted_while_delivery_process_is_down_are_delivered(relay, nexthop) -> None:  # noqa: F811
    recorder, port = nexthop()
    r = relay(f'[relay]\nsmarthost = "[127.0.0.1]:{port}"\n[dns]\nreverse_lookups = false\n')
    pid = int(r.waitForLog(r"delivery process started \(pid (\d+)\)").group(1))
    os.kill(pid, signal.SIGSTOP)  # hung, not dead: notifications pile up in its pipe
    try:
        for i in range(3):
            _send(r.port, f"held{i}@example.org")
    finally:
        os.kill(pid, signal.SIGCONT)
    for i in range(3):
        recorder.waitTo(f"held{i}@example.org", timeout=20)


def test_inline_queue_manager(relay, nexthop) -> None:  # noqa: F811
    recorder, port = nexthop()
    r = relay(
        f'[relay]\nsmarthost = "[127.0.0.1]:{port}"\n[queue]\nprocess = "inline"\n'
        "[dns]\nreverse_lookups = false\n"
    )
    _send(r.port, "inline@example.org")
    recorder.waitTo("inline@example.org")
    assert "delivery process started" not in r.log()


def test_delivery_process_logs_where_the_relay_logs(tmp_path: Path) -> None:
    """Its events reach the relay's own log file (as when daemonised), not a lost stdout."""
    import subprocess

    from tests.harness import TWISTD

    logfile = tmp_path / "relay.log"
    p = subprocess.Popen(
        [TWISTD, "-n", "--pidfile=", f"--logfile={logfile}", "mailrelay",
         "--listen", "tcp:0:interface=127.0.0.1", "--spool", str(tmp_path / "spool"),
         "--hostname", "relay.test", "--smarthost", "[127.0.0.1]:9"],
        cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
    )
    try:
        deadline = time.monotonic() + 20
        text = ""
        while time.monotonic() < deadline:
            text = logfile.read_text() if logfile.exists() else ""
            if "queue manager started" in text:
                break
            time.sleep(0.1)
        assert "[mailrelay.queue#info] queue manager started" in text, text
    finally:
        p.terminate()
        out, _ = p.communicate(timeout=20)
    assert b"queue manager" not in out  # nothing escaped to the terminal


def test_delivery_process_legacy_lines_keep_their_system(relay) -> None:
    """Twisted's own lines, logged through twisted.python.log (its resolver reading
    resolv.conf, at debug), read "[-]" when the delivery process logs them as when the relay
    does, never "[log_legacy#info]"."""
    resolvConf = Path("/etc/resolv.conf")
    assert resolvConf.exists()  # (what makes both processes log the line)
    r = relay('[relay]\nsmarthost = "[127.0.0.1]:9"\n[dns]\nreverse_lookups = false\n'
              '[log]\nlevel = "debug"\n')
    r.waitForLog(r"queue manager started")
    line = "[-] b'/etc/resolv.conf' changed, reparsing"
    deadline = time.monotonic() + 10
    while r.log().count(line) < 2 and time.monotonic() < deadline:
        time.sleep(0.1)
    assert r.log().count(line) == 2, r.log()  # the relay's, then the delivery process's
    assert "[log_legacy#" not in r.log()


def test_log_lines_round_trip() -> None:
    """What the delivery process writes is what the relay logs: level, namespace, time and
    text, newlines and backslashes included, and a failure's traceback."""
    from twisted.logger import LogLevel, formatEventAsClassicLogText
    from twisted.python.failure import Failure

    from mailrelay.queue.process import decodeLogEvent, encodeLogEvent

    try:
        1 / 0
    except ZeroDivisionError:
        failure = Failure()
    event = {"log_time": 1800000000.0, "log_namespace": "mailrelay.queue", "log_level": LogLevel.warn,
             "log_format": "{queueID}: odd {text}", "queueID": "Q1", "text": "a\\b\nc\td"}
    line = encodeLogEvent(event)
    assert line.count("\n") == 1 and line.endswith("\n")
    decoded = decodeLogEvent(line[:-1])
    assert formatEventAsClassicLogText(decoded) == formatEventAsClassicLogText(
        {**event, "log_format": "{queueID}: odd {text}"}
    )
    decoded = decodeLogEvent(encodeLogEvent({**event, "log_failure": failure})[:-1])
    assert decoded["log_text"].startswith("Q1: odd a\\b\nc\td\n") and "ZeroDivisionError" in decoded["log_text"]


def test_delivery_process_that_fails_to_start_exits(tmp_path: Path) -> None:
    """A start-up failure of the delivery process ends it (status 1, the failure logged), so
    that the relay restarts it, instead of leaving it running deaf to the end of its input."""
    import subprocess
    import sys

    config = tmp_path / "relay.toml"
    config.write_text(f'[spool]\ndirectory = "{tmp_path}/spool"\n')
    script = (
        "import sys\n"
        "from mailrelay import queue\n"
        "from mailrelay.app import deliveryprocess\n"
        "def broken(self): raise RuntimeError('the queue cannot start')\n"
        "queue.QueueManager.startService = broken\n"
        "sys.exit(deliveryprocess._childMain(sys.argv[1:]))\n"
    )
    (tmp_path / "spool").mkdir()
    p = subprocess.run(
        [sys.executable, "-c", script, "--config", str(config)],
        stdin=subprocess.PIPE, capture_output=True, timeout=30, cwd=tmp_path,
    )  # stdin is a pipe held open: the child must not wait for its end
    assert p.returncode == 1, p
    assert b"start-up failed" in p.stdout and b"the queue cannot start" in p.stdout


def test_delivery_process_refusing_its_configuration_logs_why(tmp_path: Path) -> None:
    """A configuration the delivery process refuses (one the relay took: a site's plugin
    module edited since, imported anew here) is said as a log event, which the relay
    writes in its log: on the process's standard error it was lost (a forked child's is
    dropped, a daemon's is /dev/null)."""
    import subprocess
    import sys

    from twisted.logger import LogLevel, formatEventAsClassicLogText

    from mailrelay.queue.process import decodeLogEvent

    config = tmp_path / "relay.toml"
    config.write_text(f'[spool]\ndirectory = "{tmp_path}/spool"\n'
                      '[[plugins]]\nplugin = "no-such-plugin"\n')
    (tmp_path / "spool").mkdir()
    p = subprocess.run(
        [sys.executable, "-m", "mailrelay.app.deliveryprocess", "--config", str(config)],
        stdin=subprocess.PIPE, capture_output=True, timeout=30, cwd=tmp_path,
    )
    assert p.returncode == 1, p
    [record] = [decodeLogEvent(line) for line in p.stdout.decode().splitlines()
                if "configuration error" in line]
    assert record["log_level"] == LogLevel.error
    text = formatEventAsClassicLogText(record)
    assert "delivery process: configuration error: " in text
    assert "plugins[0].plugin: unknown plugin 'no-such-plugin'" in text
    assert b"configuration error" not in p.stderr


def test_why_a_delivery_process_cannot_start_is_logged(relay) -> None:
    """A delivery process that cannot start its spool (here after a reload, with the
    spool's tmp/ unusable; also a file system out of inodes) says why in the relay's log,
    before the relay restarts it: "delivery process exited unexpectedly (status 1)" was all
    there was, its error lost in the fork server."""
    r = relay('[relay]\nsmarthost = "[127.0.0.1]:9"\n[dns]\nreverse_lookups = false\n')
    r.waitForLog(r"queue manager started")
    tmp = r.spool / "tmp"
    tmp.rename(r.spool / "tmp.away")
    tmp.write_text("not a directory\n")
    try:
        r.process.send_signal(signal.SIGHUP)
        r.waitForLog(r"delivery process exited unexpectedly", timeout=20)
        line = r.waitForLog(r"#error\] delivery process: start-up failed.*").group(0)
        assert f"creating spool directory {tmp} failed: File exists (EEXIST)" in line
    finally:
        tmp.unlink()
        (r.spool / "tmp.away").rename(tmp)


def _recordedDelivered(r: RelayProcess, address: str) -> bool:
    """Whether an envelope in C{r}'s spool records C{address} delivered."""
    for path in (r.spool / "queue").glob("*.json"):
        try:
            recipients = json.loads(path.read_bytes())["recipients"]
        except (OSError, ValueError, KeyError):
            continue  # replaced under us: read it again next time
        if any(x["address"] == address and x["state"] == "delivered" for x in recipients):
            return True
    return False


def _stallFirstData(slow: Any) -> Any:
    """Have the next hop C{slow} (a L{Recorder}) answer its first end of data late: when the
    event returned is set (after a kill: to nobody), with a 451; the later ones at once."""
    import threading

    stall = threading.Event()

    def slowReply(received: Any, n: int) -> str:
        if n == 1:
            stall.wait(60)
            return "451 4.3.0 too late"
        return "250 2.0.0 OK"

    slow.dataReply = slowReply
    return stall


def _routes(**ports: int) -> str:
    """C{[[routes]]} sending each domain C{<name>.test} by SMTP to 127.0.0.1:C{port}."""
    return "".join(
        f'[[routes]]\ndomain = "{name}.test"\nbackend = "smtp"\n'
        f'nexthop = "[127.0.0.1]:{port}"\n'
        for name, port in ports.items()
    )


def _waitRecordedWhileStalled(r: RelayProcess, slow: Any, address: str) -> None:
    """Wait until C{r}'s spool records C{address} delivered and the next hop C{slow} has the
    message (its end of data stalled: L{_stallFirstData})."""
    # The log line is written when the record is asked for; a kill must come once the spool
    # holds it (a kill before that may send it again, as Postfix's may).
    deadline = time.monotonic() + 30
    while not _recordedDelivered(r, address) and time.monotonic() < deadline:
        time.sleep(0.02)
    assert _recordedDelivered(r, address), f"the spool never recorded {address}"
    while not slow.attempts and time.monotonic() < deadline:
        time.sleep(0.05)
    assert slow.attempts, "the slow next hop never got the message"


def test_a_recipient_done_before_a_crash_is_not_sent_again(relay, nexthop) -> None:  # noqa: F811
    """A message to a fast next hop and a slow one (its end of data answered late): the
    recipient the fast one took is logged as sent and marked done in the spool when its
    delivery ends, so that the delivery process killed (kill -9) while the slow one still
    runs does not make the restarted one send it again.  Both were recorded only once the
    slow delivery ended too: the restarted process sent the message to the fast next hop a
    second time, and the log had no line saying it had it."""
    fast, fastPort = nexthop()
    slow, slowPort = nexthop()
    stall = _stallFirstData(slow)
    try:
        r = relay("[dns]\nreverse_lookups = false\n" + _routes(fast=fastPort, slow=slowPort))
        first = int(r.waitForLog(r"delivery process started \(pid (\d+)\)").group(1))
        with smtplib.SMTP("127.0.0.1", r.port, timeout=10) as s:
            s.sendmail("alice@example.com", ["a@fast.test", "b@slow.test"],
                       b"Subject: p\r\n\r\nbody\r\n")
        fast.waitTo("a@fast.test", timeout=30)
        sent = r"to=<a@fast\.test>, relay=127\.0\.0\.1\[127\.0\.0\.1\]:\d+, .*status=sent"
        r.waitForLog(sent, timeout=30)
        _waitRecordedWhileStalled(r, slow, "a@fast.test")
        assert not re.search(r"b@slow\.test>.*status=", r.log())  # still delivering

        os.kill(first, signal.SIGKILL)
        stall.set()
        slow.waitTo("b@slow.test", timeout=30)
        r.waitForLog(r": removed", timeout=30)
    finally:
        stall.set()
    assert len(fast.to("a@fast.test")) == 1
    assert len(re.findall(sent, r.log())) == 1
    assert "Traceback" not in r.log()


def _finalRecipients(received: Any) -> list[bytes]:
    """The Final-Recipient addresses of the notice C{received}, in lower case."""
    return [m.lower() for m in re.findall(rb"^Final-Recipient: *rfc822; *(\S+)", received.content,
                                          re.MULTILINE | re.IGNORECASE)]


def test_a_success_notice_owed_at_a_crash_is_made_once(relay, nexthop) -> None:  # noqa: F811
    """A message to a fast next hop and one that stalls after DATA, NOTIFY=SUCCESS on both
    recipients (RFC 3461; neither next hop offers DSN: the relay sends the notices): the
    delivery process killed (kill -9) while the slow one stalls, the restarted one does not
    send the message to the fast one again, and each recipient gets exactly one success
    notice.  The recipient owed a notice was recorded done only at the attempt's end: the
    restarted process sent it a second copy."""
    fast, fastPort = nexthop()
    slow, slowPort = nexthop()
    notices, noticePort = nexthop()
    stall = _stallFirstData(slow)
    both = [b"a@fast.test", b"b@slow.test"]

    def reported(accepted: list[Any]) -> list[bytes]:
        return sorted(a for m in accepted for a in _finalRecipients(m))

    try:
        r = relay(
            "[dns]\nreverse_lookups = false\n[queue]\nmin_backoff = 1\nmax_backoff = 2\n"
            + _routes(fast=fastPort, slow=slowPort)
            + f'[[routes]]\ndomain = "example.com"\nbackend = "smtp"\n'
            f'nexthop = "[127.0.0.1]:{noticePort}"\n'
        )
        first = int(r.waitForLog(r"delivery process started \(pid (\d+)\)").group(1))
        with smtplib.SMTP("127.0.0.1", r.port, timeout=10) as s:
            s.sendmail("alice@example.com", ["a@fast.test", "b@slow.test"],
                       b"Subject: p\r\n\r\nbody\r\n", rcpt_options=["NOTIFY=SUCCESS"])
        fast.waitTo("a@fast.test", timeout=30)
        _waitRecordedWhileStalled(r, slow, "a@fast.test")
        assert not notices.accepted  # made at the attempt's end

        os.kill(first, signal.SIGKILL)
        stall.set()
        slow.waitTo("b@slow.test", timeout=30)
        notices.waitFor(lambda accepted: reported(accepted) == both, timeout=30,
                        what="a notice for each recipient")
        deadline = time.monotonic() + 30
        while list((r.spool / "queue").glob("*.json")) and time.monotonic() < deadline:
            time.sleep(0.05)
        assert not list((r.spool / "queue").glob("*.json")), "the queue never emptied"
    finally:
        stall.set()
    assert len(fast.to("a@fast.test")) == 1
    assert reported(notices.accepted) == both
    assert "Traceback" not in r.log()


def test_a_stop_with_hundreds_of_deliveries_waiting_for_a_next_hop(relay, nexthop) -> None:  # noqa: F811
    """600 messages for a next hop that takes one at a time (destination_concurrency = 1)
    and stalls on the first until the stop has begun: then the 599 waiting are not started,
    each ending at once as it gets the slot.  They ended one within the other (a Twisted DeferredSemaphore hands its token on
    from within the release), and past a few hundred a RecursionError broke the chain: the
    log said 'maximum recursion depth exceeded', and the delivery process never ended the
    attempts, holding the queue lock (after a kill -9 of twistd, for ever).  Now each is
    logged deferred, not started, and the delivery process exits within the drain time."""
    import threading

    recorder, port = nexthop()
    stall = threading.Event()
    recorder.dataReply = lambda received, n: (stall.wait(60), "451 4.3.0 late")[1]
    try:
        r = relay(
            "drain_time = 3\n[dns]\nreverse_lookups = false\n"
            "[delivery]\ndestination_concurrency = 1\n"
            f'[[routes]]\ndomain = "slow.test"\nbackend = "smtp"\nnexthop = "[127.0.0.1]:{port}"\n'
        )
        count = 600
        with smtplib.SMTP("127.0.0.1", r.port, timeout=30) as s:
            for n in range(count):
                s.sendmail("alice@example.com", ["b@slow.test"], f"Subject: m{n}\r\n\r\nx\r\n")
        deadline = time.monotonic() + 30
        while not recorder.attempts and time.monotonic() < deadline:
            time.sleep(0.05)
        assert recorder.attempts, "the next hop never got the first message"
        started = time.monotonic()
        assert r.process is not None
        r.process.send_signal(signal.SIGTERM)
        r.waitForLog(r"queue manager stopping: waiting for \d+ deliveries", timeout=30)
        stall.set()  # the delivery in flight ends, its slot going to the next, not started
        r.stop(signal.SIGTERM, timeout=60)
        stopped = time.monotonic() - started
    finally:
        stall.set()
    log = r.log()
    assert "recursion" not in log
    assert "Traceback" not in log
    assert len(re.findall(r"to=<b@slow\.test>.*status=deferred .*not started", log)) == count - 1
    assert stopped < 20, f"the relay took {stopped:.1f}s to stop"
    assert len(r.queued()) == count
