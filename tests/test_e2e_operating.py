"""End-to-end tests of operating the relay (the real C{twistd -n mailrelay}): the log level,
metrics and the health check, the run user (C{--uid}/C{--gid})."""

from __future__ import annotations

import grp
import json
import os
import pwd
import random
import re
import shutil
import signal
import site
import smtplib
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

import pytest
from prometheus_client.parser import text_string_to_metric_families

from tests.harness import REPO, RelayProcess, freePort
from tests.test_e2e_outbound import (  # noqa: F401 - fixtures
    _mxRoutes,
    config,
    dns,
    message,
    nexthop,
    relay,
    smtpRoute,
    submit,
    waitRemoved,
    waitResult,
)

_DNS_CHATTER = ("Starting protocol <twisted.names.dns.DNSDatagramProtocol", "(UDP Port ")


def waitListening(port: int, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            return
        except OSError:
            time.sleep(0.05)
    raise AssertionError(f"nothing listens on port {port} after {timeout}s")


# ---------------------------------------------------------------------------------------------
# The log level


def test_logLevelInfoHidesDNSChatter(relay, nexthop, dns) -> None:
    """At the default level a delivery by MX lookup logs its result, not Twisted's lines
    about each DNS query's UDP port; at debug those lines are there."""
    hop, port = nexthop()
    notices, noticePort = nexthop()
    r = relay(config(dns, routes=_mxRoutes(port, noticePort)))
    qid = submit(r, "alice@sender.test", ["user@mx.test"], message("info"))
    assert waitResult(r, qid, "user@mx.test")["status"] == "sent"
    waitRemoved(r, qid)
    assert ("mx.test", "MX") in dns.queries()
    assert not any(chatter in r.log() for chatter in _DNS_CHATTER), r.log()

    r = relay(config(dns, routes=_mxRoutes(port, noticePort)) + '[log]\nlevel = "debug"\n')
    qid = submit(r, "alice@sender.test", ["user@mx.test"], message("debug"))
    assert waitResult(r, qid, "user@mx.test")["status"] == "sent"
    assert all(chatter in r.log() for chatter in _DNS_CHATTER), r.log()


def test_logLevelInfoHidesResolvConfChatter(tmp_path: Path) -> None:
    """With the embedded default configuration (the system's resolver) the relay and the
    delivery process do not log Twisted's lines of reading C{/etc/resolv.conf} at the
    default level; at debug both do."""
    chatter = re.compile(r"changed, reparsing|Resolver added .* to server list")
    r = RelayProcess(tmp_path / "info", None)
    try:
        r.start()
        r.waitForLog(r"queue manager started")
        assert not chatter.search(r.log()), r.log()
    finally:
        r.stop()
    r = RelayProcess(tmp_path / "debug", '[log]\nlevel = "debug"\n')
    try:
        r.start()
        r.waitForLog(r"queue manager started")
        r.waitForLog(r"(?s)(Resolver added .*){2}")
    finally:
        r.stop()


def test_logLevelWarnAndReload(tmp_path: Path) -> None:
    """At "warn" the relay logs its warnings only (not even where it listens); a reload
    back to "info" brings the connection lines back."""
    port = freePort()
    r = RelayProcess(tmp_path / "relay", '[log]\nlevel = "warn"\n',
                     args=("--listen", f"tcp:{port}:interface=127.0.0.1"), listeners=0, hold=True)
    r.start()
    r.ports = [port]
    try:
        waitListening(port)
        r.connect().close()
        r.waitForLog(r"queue\.hold is set")  # a warning
        time.sleep(0.5)
        assert "listening on" not in r.log() and "connect from" not in r.log(), r.log()
        r.configText = "[queue]\nhold = true\n[log]\nlevel = \"info\"\n"
        (r.directory / "mailrelay.toml").write_text(r.configText)
        assert r.process is not None
        r.process.send_signal(signal.SIGHUP)
        r.waitForLog(r"configuration reloaded")
        r.connect().close()
        r.waitForLog(r"connect from 127\.0\.0\.1")
    finally:
        r.stop()


def waitInFile(path: Path, text: bytes, timeout: float = 10.0) -> bytes:
    """The bytes of C{path} once they hold C{text}."""
    deadline = time.monotonic() + timeout
    while True:
        data = path.read_bytes() if path.exists() else b""
        if text in data or time.monotonic() > deadline:
            return data
        time.sleep(0.05)


def test_logFileTruncatedIsWrittenFromItsStart(tmp_path: Path) -> None:
    """twistd's --logfile truncated under the relay (logrotate's copytruncate) is written
    from its start: the relay appends, rather than writing at its old offset behind a hole
    of NUL bytes that makes grep call the log a binary file; so does the file twistd's
    rotation (SIGUSR1) opens."""
    port = freePort()
    logfile = tmp_path / "twistd.log"
    r = RelayProcess(tmp_path / "relay", args=("--listen", f"tcp:{port}:interface=127.0.0.1"),
                     listeners=0, hold=True)
    command = r.command()
    assert command[3] == "mailrelay"
    r.command = lambda: [*command[:3], "--logfile", str(logfile), *command[3:]]  # type: ignore
    r.start()
    r.ports = [port]
    try:
        waitListening(port)
        for rotate in (False, True):  # (rotated by twistd on SIGUSR1, the new file too)
            if rotate:
                assert r.process is not None
                r.process.send_signal(signal.SIGUSR1)
                waitInFile(Path(f"{logfile}.1"), b"disconnect from")
            r.connect().close()
            waitInFile(logfile, b"disconnect from")
            os.truncate(logfile, 0)  # (copytruncate's copy is made first)
            r.connect().close()
            text = waitInFile(logfile, b"disconnect from")
            assert b"connect from 127.0.0.1" in text and b"\0" not in text, text[:200]
    finally:
        r.stop()


def test_sigusr1WithoutLogFileDoesNotKill(tmp_path: Path) -> None:
    """SIGUSR1 rotates twistd's --logfile; a relay logging to standard output (twistd -n,
    as under systemd) has no file to rotate and goes on, saying so: SIGUSR1 left at its
    default killed it on the spot, its sessions cut and nothing drained."""
    r = RelayProcess(tmp_path / "relay", hold=True).start()
    try:
        assert r.process is not None
        r.process.send_signal(signal.SIGUSR1)
        r.waitForLog(r"SIGUSR1: no log file to rotate")
        assert r.process.poll() is None
        client = r.connect()
        assert client.readReply()[0].startswith(b"220 ")
        client.close()
    finally:
        r.stop()


# ---------------------------------------------------------------------------------------------
# Metrics and the health check

_METRICS = '''
[metrics]
listen = "tcp:0:interface=127.0.0.1"

[[recipient_validators]]
plugin = "regex"
rules = [{ pattern = '^nobody@', action = "reject" }]
'''


def metricsPort(r: RelayProcess) -> int:
    m = r.waitForLog(r"listening on 127\.0\.0\.1:(\d+) \(tcp:0:interface=127\.0\.0\.1; metrics\)")
    return int(m.group(1))


def get(port: int, path: str) -> tuple[int, str, str]:
    """C{(status, content type, body)} of C{GET path} with a real HTTP client."""
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=10) as response:
            return response.status, response.headers["Content-Type"], response.read().decode()
    except urllib.error.HTTPError as e:
        return e.code, e.headers["Content-Type"], e.read().decode()


def scrape(port: int) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    """Every sample served at /metrics, parsed by prometheus_client's parser: C{(sample
    name, sorted labels) -> value}."""
    status, contentType, text = get(port, "/metrics")
    assert status == 200 and contentType.startswith("text/plain"), (status, contentType)
    samples = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            samples[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return samples


def value(samples: dict, name: str, **labels: str) -> float:
    return samples.get((name, tuple(sorted(labels.items()))), 0.0)


def waitSamples(port: int, predicate, what: str, timeout: float = 20.0) -> dict:
    """Scrape until C{predicate(samples)} holds (the delivery process reports every
    second)."""
    deadline = time.monotonic() + timeout
    while True:
        samples = scrape(port)
        if predicate(samples):
            return samples
        if time.monotonic() > deadline:
            raise AssertionError(f"{what} not scraped in {timeout}s: {samples}")
        time.sleep(0.2)


def sendSMTP(r: RelayProcess, sender: str, recipients: list[str], body: bytes) -> str | None:
    """Send through the relay with smtplib; the queue id, or C{None} if every RCPT failed."""
    with smtplib.SMTP("127.0.0.1", r.port, timeout=15) as s:
        s.ehlo("client.test")
        s.mail(sender)
        accepted = [rcpt for rcpt in recipients if s.rcpt(rcpt)[0] == 250]
        if not accepted:
            return None
        code, reply = s.data(body)
        assert code == 250, reply
    return reply.decode().rsplit(" ", 1)[1]


def _relayServingMetrics(relay, nexthop, dns) -> tuple[RelayProcess, int, Any]:  # noqa: F811
    """A relay serving /metrics, delivering example.org to a next hop that refuses gone@
    (550 5.1.1) and sender.test (the bounces) to another: C{(relay, metrics port, the
    bounces' next hop)}."""
    hop, port = nexthop()
    notices, noticePort = nexthop()
    hop.rcptReply = lambda address: "550 5.1.1 no such user" if address.startswith("gone@") else None
    routes = [smtpRoute("example.org", port), smtpRoute("sender.test", noticePort)]
    r = relay(config(dns, routes=routes) + _METRICS)
    return r, metricsPort(r), notices


def test_metricsScrapedWhileMailFlows(relay, nexthop, dns) -> None:
    """With mail flowing through the real relay (the delivery in its own process), /metrics
    serves Prometheus's text format that prometheus_client's parser reads, with the relay's
    and the delivery process's counts; they survive a reload that replaces the delivery
    process; /healthz says 200 with the delivery process's pid."""
    r, mport, notices = _relayServingMetrics(relay, nexthop, dns)
    body = message("metrics")
    ids = [sendSMTP(r, "alice@sender.test", ["bob@example.org", "carol@example.org"], body),
           sendSMTP(r, "alice@sender.test", ["nobody@example.org", "gone@example.org"], body)]
    assert all(ids)
    sizes = [int(r.waitForLog(rf"{qid}: from=<alice@sender\.test> nrcpt=\d size=(\d+) ").group(1))
             for qid in ids]
    notices.waitTo("alice@sender.test")  # the bounce of gone@
    samples = waitSamples(
        mport,
        lambda s: value(s, "mailrelay_deliveries_total", backend="smtp", status="sent") == 3
        and value(s, "mailrelay_dsns_total", action="failed") == 1
        and value(s, "mailrelay_queue_messages", state="active") == 0,
        "3 deliveries and a DSN",
    )
    listener = "tcp:0:interface=127.0.0.1"
    assert value(samples, "mailrelay_connections_total", listener=listener) == 2
    assert value(samples, "mailrelay_sessions_total", outcome="quit") == 2
    assert value(samples, "mailrelay_messages_total", reply="2xx", origin="smtp") == 2
    assert value(samples, "mailrelay_messages_total", reply="2xx", origin="local") == 1  # the DSN
    assert value(samples, "mailrelay_message_bytes_total", origin="smtp") == sum(sizes)
    assert value(samples, "mailrelay_refusals_total", command="RCPT", reply="5xx") == 1
    assert value(samples, "mailrelay_deliveries_total", backend="smtp", status="bounced") == 1
    assert value(samples, "mailrelay_delivery_seconds_count", backend="smtp") == 3
    assert value(samples, "mailrelay_delivery_seconds_bucket", backend="smtp", le="+Inf") == 3
    assert value(samples, "mailrelay_delivery_wait_seconds_count", backend="smtp") == 3
    assert value(samples, "mailrelay_delivery_delay_seconds_count", backend="smtp") == 3
    rcptChecks = value(samples, "mailrelay_plugin_seconds_count",
                       hook="rcpt", plugin="regex")
    assert rcptChecks == 4
    stamps = value(samples, "mailrelay_plugin_seconds_count", hook="header_stamper",
                   plugin="default")
    assert stamps == 3  # two messages and the DSN
    assert value(samples, "mailrelay_spool_sync_batch_size_count") >= 3
    assert value(samples, "mailrelay_queue_messages", state="scheduled") == 0
    assert not any(name.endswith("_created") for name, _ in samples)

    status, contentType, text = get(mport, "/healthz")
    report = json.loads(text)
    assert (status, contentType) == (200, "application/json"), text
    assert report["status"] == "ok" and report["spool"] == "up" and report["delivery"] == "up"
    assert report["listeners"] == {listener: "up"}
    pid = report["delivery_pid"]

    # A reload replaces the delivery process: its counts are kept.
    assert r.process is not None
    r.process.send_signal(signal.SIGHUP)
    r.waitForLog(rf"previous delivery process \(pid {pid}\) exited")
    assert sendSMTP(r, "alice@sender.test", ["dave@example.org"], body)
    samples = waitSamples(
        mport,
        lambda s: value(s, "mailrelay_deliveries_total", backend="smtp", status="sent") == 4,
        "the delivery after the reload",
    )
    assert value(samples, "mailrelay_dsns_total", action="failed") == 1
    assert value(samples, "mailrelay_delivery_seconds_count", backend="smtp") == 4
    assert json.loads(get(mport, "/healthz")[2])["delivery_pid"] != pid


def test_kill9_of_the_delivery_process_keeps_its_delivery_and_dsn_counts(
        relay, nexthop, dns) -> None:  # noqa: F811
    """The delivery process sends its metrics once a second: killed (SIGKILL) before the
    next snapshot, the recipients it had delivered or bounced since and the bounce it had
    queued were missing from mailrelay_deliveries_total and mailrelay_dsns_total, though
    the spool said they happened.  It tells the relay each at once: none is lost."""
    r, mport, notices = _relayServingMetrics(relay, nexthop, dns)
    pid = json.loads(get(mport, "/healthz")[2])["delivery_pid"]
    qid = sendSMTP(r, "alice@sender.test", ["bob@example.org", "carol@example.org",
                                            "gone@example.org"], message("killed"))
    dsnID = r.waitForLog(rf"{qid}: sender non-delivery notification: (\w+)").group(1)
    r.waitForLog(rf"{dsnID}: removed")
    os.kill(pid, signal.SIGKILL)
    r.waitForLog(r"delivery process exited unexpectedly")
    samples = scrape(mport)
    assert value(samples, "mailrelay_deliveries_total", backend="smtp", status="sent") == 3, samples
    assert value(samples, "mailrelay_deliveries_total", backend="smtp", status="bounced") == 1
    assert value(samples, "mailrelay_dsns_total", action="failed") == 1
    notices.waitTo("alice@sender.test")


def test_delivery_places_in_use_and_deliveries_waiting_are_served(relays, hop) -> None:
    """With C{delivery_limit = 1} and two deliveries to a slow next hop, /metrics (the
    delivery process's gauges, through the relay) says one place in use and one delivery
    waiting for it; once both are sent, none.  Each delivery's time
    (mailrelay_delivery_seconds) runs from when it has its place: the second's 4 s wait
    for it is mailrelay_delivery_wait_seconds, not delivery time."""
    slow, port = hop(4)
    text = (_METRICS + f'[relay]\nsmarthost = "[127.0.0.1]:{port}"\n'
            "[dns]\nreverse_lookups = false\n[queue]\ndelivery_limit = 1\n")
    r = relays(text).start()
    mport = metricsPort(r)
    body = b"Subject: places\r\n\r\nbody\r\n"
    for rcpt in ("a@example.org", "b@example.org"):
        with smtplib.SMTP("127.0.0.1", r.port, timeout=20) as s:
            s.sendmail("alice@example.com", [rcpt], body)
    waitSamples(
        mport,
        lambda s: value(s, "mailrelay_delivery_places_in_use") == 1
        and value(s, "mailrelay_deliveries_waiting") == 1,
        "one place in use, one delivery waiting",
    )
    samples = waitSamples(
        mport,
        lambda s: value(s, "mailrelay_deliveries_total", backend="smtp", status="sent") == 2,
        "both deliveries", timeout=30,
    )
    assert value(samples, "mailrelay_delivery_seconds_count", backend="smtp") == 2
    # Two deliveries of some 4 s each (with the wait, the second's took some 8 s: 12 s).
    assert 8 <= value(samples, "mailrelay_delivery_seconds_sum", backend="smtp") < 10.5
    assert value(samples, "mailrelay_delivery_wait_seconds_count", backend="smtp") == 2
    assert 3.5 <= value(samples, "mailrelay_delivery_wait_seconds_sum", backend="smtp") < 6
    waitSamples(
        mport,
        lambda s: ("mailrelay_delivery_places_in_use", ()) in s
        and value(s, "mailrelay_delivery_places_in_use") == 0
        and value(s, "mailrelay_deliveries_waiting") == 0,
        "no place in use",
    )
    assert slow.started == 2


def test_healthUnhealthy(relays) -> None:
    """/healthz says 503 when a part is not up: here the spool, below its minimum free
    space (the relay answers 452 to mail meanwhile)."""
    r = relays(_METRICS + "[spool]\nmin_free_space = 1000000000000000000\n", hold=True)
    r.start()
    status, _, text = get(metricsPort(r), "/healthz")
    report = json.loads(text)
    assert status == 503, text
    assert report["status"] == "unhealthy" and report["spool"] == "full"
    assert report["delivery"] == "held"  # hold: on purpose, not a fault


def test_a_spool_short_of_space_refuses_mail_and_warns(relays) -> None:
    """A spool below [spool] min_free_space: MAIL gets 452 4.3.1, and the log says why in a
    warning naming the spool, the octets free and the setting (as Postfix's smtpd warns "not
    enough free space in mail queue"), beside the refusal's line, which named none of them
    and was the only one, at level info."""
    r = relays("[spool]\nmin_free_space = 1000000000000000000\n", hold=True).start()
    with smtplib.SMTP("127.0.0.1", r.port, timeout=20) as s:
        s.ehlo("client.test")
        assert s.mail("alice@example.com", ["SIZE=5000"]) == (
            452, b"4.3.1 Error: insufficient system storage")
    line = r.waitForLog(r"#warn\].*not enough free space.*").group(0)
    assert f"spool {r.spool} for 5000 more octets" in line
    assert "min_free_space = 1000000000000000000" in line and "452 4.3.1" in line
    r.waitForLog(r"NOQUEUE: reject: MAIL from .*452 4\.3\.1.*from=<alice@example.com>")


def test_a_spool_short_of_space_warns_once_not_at_every_mail(relays) -> None:
    """Found by a review: the warning came at every MAIL while the disk stayed full, a log
    flood exactly when the disk is full; it comes once (then at most once a minute, see
    L{mailrelay.lograte}), while each MAIL is still refused and its refusal logged."""
    r = relays("[spool]\nmin_free_space = 1000000000000000000\n", hold=True).start()
    with smtplib.SMTP("127.0.0.1", r.port, timeout=20) as s:
        s.ehlo("client.test")
        for i in range(5):
            assert s.mail(f"m{i}@example.com")[0] == 452
            s.rset()
    r.waitForLog(r"(?s)(NOQUEUE: reject: MAIL from .*){5}")
    assert len(re.findall(r"not enough free space", r.log())) == 1, r.log()


# ---------------------------------------------------------------------------------------------
# Running as another user: twistd's --uid/--gid


def _needed(reason: str) -> None:
    """Skip (visibly) outside CI, fail under CI: the run-user tests must run there."""
    if os.environ.get("CI") == "true":
        pytest.fail(reason)
    pytest.skip(reason)


@pytest.fixture(scope="module")
def nobodyRuntime():
    """C{(python, directory)}: an interpreter the user C{nobody} can run, seeing this
    checkout and the test environment's packages (this one's interpreter may live where
    nobody can read, such as /root), and a directory nobody can reach (pytest's are
    root's only)."""
    if os.geteuid() != 0:
        _needed("the run-user tests start twistd as root")
    try:
        pwd.getpwnam("nobody")
        grp.getgrnam("nogroup")
    except KeyError:
        _needed("no user nobody or group nogroup")
    directory = Path(tempfile.mkdtemp(prefix="mailrelay-runas-"))
    directory.chmod(0o755)
    version = f"python{sys.version_info.major}.{sys.version_info.minor}"
    candidates = [Path(sys.executable).resolve(), Path("/usr/bin") / version,
                  Path("/usr/local/bin") / version]
    paths = [p for p in site.getsitepackages() if Path(p).is_dir()] + [str(REPO)]
    try:
        for interpreter in candidates:
            if not interpreter.exists():
                continue
            venvDir = directory / f"venv-{len(list(directory.iterdir()))}"
            subprocess.run([str(interpreter), "-m", "venv", "--without-pip", str(venvDir)],
                           check=True, timeout=120)
            python = venvDir / "bin" / "python"
            purelib = subprocess.check_output(
                [str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                text=True).strip()
            (Path(purelib) / "_mailrelay_tests.pth").write_text("\n".join(paths) + "\n")
            try:
                check = subprocess.run(
                    [str(python), "-c", "import twisted, mailrelay, prometheus_client, OpenSSL"],
                    user="nobody", group="nogroup", capture_output=True, timeout=120,
                )
            except PermissionError:  # nobody cannot run it at all
                continue
            if check.returncode == 0:
                yield python, directory
                return
        _needed(f"no {version} that nobody can run with this checkout and its packages")
    finally:
        shutil.rmtree(directory, ignore_errors=True)


def nobodyDirectory(top: Path) -> Path:
    """A new directory below C{top} that nobody may read (its configuration, logs, spool)."""
    directory = Path(tempfile.mkdtemp(dir=top))
    directory.chmod(0o755)
    return directory


def relayArgs(config: Path, directory: Path) -> tuple[int, tuple[str, ...]]:
    """A free port below 1024, and the relay's arguments: C{config}, a listener on that
    port, the spool in C{directory}."""
    port = privilegedPort()
    return port, ("--config", str(config), "--listen", f"tcp:{port}:interface=127.0.0.1",
                  "--spool", str(directory / "spool"))


def privilegedPort() -> int:
    """A port below 1024 free on 127.0.0.1, picked at random: two suites running at once
    (as beside each other on one machine) took the same first free one and one failed."""
    ports = list(range(600, 1024))
    random.shuffle(ports)
    for port in ports:
        with socket.socket() as s:
            try:
                s.bind(("127.0.0.1", port))
            except OSError:
                continue
            return port
    raise AssertionError("no free port below 1024")


def startAs(python: Path, directory: Path, *args: str, pidfile: str = "",
            asNobody: bool = False) -> subprocess.Popen[bytes]:
    """C{twistd -n --uid nobody --gid nogroup ... mailrelay ARGS} (started as root); with
    C{asNobody}, started as nobody (no C{--uid})."""
    log = open(directory / "relay.log", "ab")
    runAs = () if asNobody else ("--uid", "nobody", "--gid", "nogroup")
    become: dict[str, Any] = (
        {"user": "nobody", "group": "nogroup", "extra_groups": []} if asNobody else {})
    try:
        return subprocess.Popen(
            [str(python), "-c", "import sys; from twisted.scripts.twistd import run; "
             "sys.argv[0] = 'twistd'; run()", "-n", f"--pidfile={pidfile}", *runAs,
             "mailrelay", "--hostname", "relay.test", *args],
            cwd=directory, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
            **become,
        )
    finally:
        log.close()


def owner(pid: int) -> tuple[int, int]:
    """The real uid and gid of process C{pid}."""
    status = Path(f"/proc/{pid}/status").read_text()
    uid = int(re.search(r"^Uid:\s+(\d+)", status, re.M).group(1))
    gid = int(re.search(r"^Gid:\s+(\d+)", status, re.M).group(1))
    return uid, gid


def childrenOf(pid: int) -> list[int]:
    found = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                stat = (entry / "stat").read_text()
            except OSError:
                continue
            if int(stat.rpartition(")")[2].split()[1]) == pid:
                found.append(int(entry.name))
    return found


def test_runAsNobody(nobodyRuntime, nexthop) -> None:
    """Started as root with --uid nobody --gid nogroup: the listener on a port below 1024 is
    bound before the drop, the spool is created and owned by nobody, the relay and its
    delivery process run as nobody, and mail goes through."""
    python, top = nobodyRuntime
    directory = nobodyDirectory(top)
    hop, hopPort = nexthop()
    (directory / "mailrelay.toml").write_text(
        f'[[routes]]\ndomain = "example.org"\nbackend = "smtp"\nnexthop = "[127.0.0.1]:{hopPort}"\n')
    port = privilegedPort()
    spool = directory / "spool"
    process = startAs(python, directory, "--config", str(directory / "mailrelay.toml"),
                      "--listen", f"tcp:{port}:interface=127.0.0.1", "--spool", str(spool))
    nobody = (pwd.getpwnam("nobody").pw_uid, grp.getgrnam("nogroup").gr_gid)
    try:
        waitListening(port)
        with smtplib.SMTP("127.0.0.1", port, timeout=15) as s:
            s.sendmail("alice@sender.test", ["bob@example.org"], message("as nobody"))
        (got,) = hop.waitTo("bob@example.org")
        assert b"Subject: as nobody" in got.content
        assert owner(process.pid) == nobody
        # The delivery process, and the fork server that forked it (relay.fork_children).
        children = descendantsOf(process.pid)
        assert len(children) == 2 and [owner(child) for child in children] == [nobody] * 2
        assert "mr-delivery" in [Path(f"/proc/{child}/comm").read_text().strip()
                                 for child in children]
        for path in [spool, *spool.rglob("*")]:
            st = path.lstat()
            assert (st.st_uid, st.st_gid) == nobody, path
        assert (spool / "qmgr.lock").exists()
    finally:
        process.send_signal(signal.SIGTERM)
        code = process.wait(30)
    log = (directory / "relay.log").read_text()
    assert code in (0, -signal.SIGTERM), log  # (twistd ends by the signal that stopped it)
    assert "set uid/gid" in log and "status=sent" in log


def refusedStart(python: Path, directory: Path, *args: str) -> tuple[int | None, str]:
    """Start the relay as L{startAs} does, expecting it to refuse: its exit status (C{None}:
    still running after 30 s, then killed) and its log."""
    process = startAs(python, directory, *args)
    try:
        code = process.wait(30)
    except subprocess.TimeoutExpired:  # (its delivery process restarted for ever, say)
        code = None
    finally:
        if process.poll() is None:
            process.kill()
            process.wait(10)
    return code, (directory / "relay.log").read_text()


def test_runAsNobodyChecksTheSmarthostFilesAsNobody(nobodyRuntime) -> None:
    """Started as root with --uid nobody, a smarthost password file only root may read is
    refused at start, in one line naming the key, the file and the user (a CA file the same):
    read as root it passed, then each delivery process, reading it as nobody, refused the
    configuration and was restarted for ever while mail waited."""
    python, top = nobodyRuntime
    directory = nobodyDirectory(top)
    secret = directory / "smarthost.password"
    secret.write_text("s3cret\n")
    secret.chmod(0o600)  # root's
    config = directory / "mailrelay.toml"
    config.write_text('[relay]\nsmarthost = "[127.0.0.1]:2525"\n[smarthost]\n'
                      f'username = "relay"\npassword_file = "{secret}"\ntls = "required"\n')
    config.chmod(0o644)
    port, args = relayArgs(config, directory)
    code, log = refusedStart(python, directory, *args)
    assert code == 1, log
    assert (f'smarthost.password_file: cannot read the password file "{secret}" as user '
            "nobody, which the relay runs as once started: Permission denied") in log, log
    assert "s3cret" not in log


def test_runAsNobodyChecksPipeUserAsNobody(nobodyRuntime) -> None:
    """Started as root with --uid nobody, the relay checks a pipe backend's user as for the
    user its deliveries run as: another user is refused at start, in one line naming the key
    (it was taken as root, then refused by each delivery process, restarted for ever while
    mail waited); no user is nobody's own (it was refused as "required when the relay runs
    as root")."""
    python, top = nobodyRuntime
    directory = nobodyDirectory(top)
    pipe = ('[[backends]]\nname = "p"\nplugin = "pipe"\ncommand = ["/bin/cat"]\n{user}'
            '[[routes]]\ndomain = "example.org"\nbackend = "p"\n')
    config = directory / "mailrelay.toml"
    config.write_text(pipe.format(user='user = "daemon"\n'))
    config.chmod(0o644)
    port, args = relayArgs(config, directory)
    code, log = refusedStart(python, directory, *args)
    assert code == 1, log
    assert ('backends[0].user: "daemon": the relay runs as user nobody (not root), so '
            "commands run as that user only") in log, log

    config.write_text(pipe.format(user=""))
    process = startAs(python, directory, *args)
    try:
        waitListening(port)
        with smtplib.SMTP("127.0.0.1", port, timeout=15) as s:
            s.sendmail("alice@sender.test", ["bob@example.org"], message("piped"))
        deadline = time.monotonic() + 20
        while "status=sent" not in (directory / "relay.log").read_text():
            assert time.monotonic() < deadline, (directory / "relay.log").read_text()
            time.sleep(0.1)
    finally:
        process.send_signal(signal.SIGTERM)
        process.wait(30)


def descendantsOf(pid: int) -> list[int]:
    """The children of C{pid}, their children, and so on."""
    found = childrenOf(pid)
    for child in list(found):
        found += descendantsOf(child)
    return found


def processesMentioning(text: str) -> list[int]:
    """The processes whose command line holds C{text}."""
    found = []
    for entry in Path("/proc").iterdir():
        try:
            if entry.name.isdigit() and text.encode() in (entry / "cmdline").read_bytes():
                found.append(int(entry.name))
        except OSError:
            continue
    return found


def test_runAsFailedStartLeavesNoProcess(nobodyRuntime) -> None:
    """A start that fails after the drop (here: nobody cannot run the interpreter the relay
    was started with, so no delivery process can start) exits at once with one line saying
    why, and leaves no process behind; so does one that fails before (the port is taken)."""
    python, top = nobodyRuntime
    directory = nobodyDirectory(top)
    private = directory / "private"
    shutil.copytree(python.parent.parent, private / "venv", symlinks=True)
    private.chmod(0o700)  # root's only
    # (Children started as new processes: forked from the relay, they need no interpreter.)
    exec_ = directory / "exec.toml"
    exec_.write_text("[relay]\nfork_children = false\n")
    exec_.chmod(0o644)
    process = startAs(private / "venv" / "bin" / "python", directory, "--config", str(exec_),
                      "--listen", f"tcp:{privilegedPort()}:interface=127.0.0.1",
                      "--spool", str(directory / "spool"))
    try:
        assert process.wait(30) == 1
    finally:
        if process.poll() is None:  # hung: the test fails, the process goes
            process.kill()
            process.wait(10)
    log = (directory / "relay.log").read_text()
    assert "mailrelay: error: cannot start the delivery process" in log, log
    assert "Permission denied" in log and "Traceback" not in log, log
    assert processesMentioning(str(directory)) == []

    port = privilegedPort()
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", port))
        taken.listen()
        process = startAs(python, directory, "--listen", f"tcp:{port}:interface=127.0.0.1",
                          "--spool", str(directory / "spool"))
        assert process.wait(30) == 1
    log = (directory / "relay.log").read_text()
    assert f"mailrelay: error: --listen: cannot listen on tcp:{port}:interface=127.0.0.1" in log, log
    assert "Traceback" not in log


def test_unixListenerInAMissingDirectory(tmp_path: Path) -> None:
    """A unix: listener whose directory does not exist: the relay does not start, saying
    which listener, which directory and what to do (not Twisted's lock file's error)."""
    from tests.harness import TWISTD

    socketPath = tmp_path / "missing" / "smtp.sock"
    p = subprocess.run(
        [TWISTD, "-n", "--pidfile=", "mailrelay", "--hostname", "relay.test", "--spool",
         str(tmp_path / "spool"), "--listen", f"unix:{socketPath}"],
        cwd=tmp_path, capture_output=True, text=True, timeout=60, stdin=subprocess.DEVNULL,
    )
    assert p.returncode == 1, p
    output = p.stdout + p.stderr
    assert (f"mailrelay: error: --listen: cannot listen on unix:{socketPath}: the socket's "
            f"directory {socketPath.parent} does not exist: create it") in output, output
    assert ".lock" not in output and "Traceback" not in output, output


@pytest.mark.parametrize("daemonize", [True, False])
def test_failedStartWithPidfileExits(tmp_path: Path, daemonize: bool) -> None:
    """twistd without -n (the README's form for starting as root) daemonizes before the
    relay starts: a start that fails then (here: the port is taken) makes the command exit
    1 at once saying why, as with -n -- not wait forever for the daemon's word -- and leaves
    neither a process nor its pid file behind (with -n either)."""
    from tests.harness import TWISTD

    pidfile = tmp_path / "twistd.pid"
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        process = subprocess.Popen(
            [TWISTD, *(() if daemonize else ("-n",)), "--pidfile", str(pidfile),
             "--logfile", str(tmp_path / "twistd.log"),
             "mailrelay", "--hostname", "relay.test", "--spool", str(tmp_path / "spool"),
             "--listen", f"tcp:{port}:interface=127.0.0.1"],
            cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
        )
        try:
            output, _ = process.communicate(timeout=30)
        except subprocess.TimeoutExpired:
            process.kill()
            process.communicate(timeout=10)
            raise AssertionError("twistd waits forever for the daemon that failed to start")
        finally:
            deadline = time.monotonic() + 10  # (the daemon may be a moment behind)
            while (leftover := processesMentioning(str(tmp_path))) and time.monotonic() < deadline:
                time.sleep(0.05)
            for pid in leftover:
                os.kill(pid, signal.SIGKILL)
    assert process.returncode == 1, output
    if daemonize:  # (with -n, the log file has it)
        assert b"cannot listen on tcp:" in output, output
    log = (tmp_path / "twistd.log").read_text()
    assert f"mailrelay: error: --listen: cannot listen on tcp:{port}:interface" in log, log
    assert "Traceback" not in log, log
    assert leftover == [] and not pidfile.exists()


def test_secondRelayAsAnotherUserLeavesTheSpoolAlone(tmp_path: Path) -> None:
    """A second relay started as root with --uid on the spool of one running refuses to
    start (another relay answers on its control socket) before it touches the spool: it
    used to give the whole spool to its user first, so the running relay could no longer
    write it (every message 451, nothing delivered)."""
    if os.geteuid() != 0:
        _needed("starting a relay with --uid needs root")
    first = RelayProcess(tmp_path / "first", hold=True).start()
    try:
        spool = first.spool
        first.published()  # (its whole spool, as it stays while it runs)
        owners = {path: (path.lstat().st_uid, path.lstat().st_gid)
                  for path in [spool, *spool.rglob("*")]}
        second = subprocess.run(
            [sys.executable, "-c", "import sys; from twisted.scripts.twistd import run; "
             "sys.argv[0] = 'twistd'; run()", "-n", "--pidfile=", "--uid", "nobody",
             "--gid", "nogroup", "mailrelay", "--hostname", "relay.test",
             "--listen", "tcp:0:interface=127.0.0.1", "--spool", str(spool)],
            cwd=tmp_path, capture_output=True, timeout=60, stdin=subprocess.DEVNULL,
        )
        assert second.returncode == 1, second
        assert b"another relay is running on this spool" in second.stdout + second.stderr
        assert {path: (path.lstat().st_uid, path.lstat().st_gid)
                for path in [spool, *spool.rglob("*")]} == owners
    finally:
        first.stop()


def test_metricsInline(relay, nexthop, dns) -> None:
    """With the queue in the relay's own process (queue.process = "inline"), the same
    metrics come from it directly."""
    hop, port = nexthop()
    r = relay(config(dns, queue={"process": "inline"}, routes=[smtpRoute("example.org", port)])
              + _METRICS)
    mport = metricsPort(r)
    assert sendSMTP(r, "alice@sender.test", ["bob@example.org"], message("inline"))
    hop.waitTo("bob@example.org")
    samples = waitSamples(
        mport,
        lambda s: value(s, "mailrelay_deliveries_total", backend="smtp", status="sent") == 1,
        "the delivery",
    )
    assert value(samples, "mailrelay_messages_total", reply="2xx", origin="smtp") == 1
    status, _, text = get(mport, "/healthz")
    report = json.loads(text)
    assert status == 200 and report["delivery"] == "up" and "delivery_pid" not in report


@pytest.mark.parametrize("kind", ["tls_certificate", "ssl"])
def test_runAsNobodyWithARootOnlyKey(nobodyRuntime, nexthop, kind: str) -> None:
    """Started as root with --uid nobody and a TLS listener whose key only root may read
    (the usual case): the relay reads it before the drop, and its delivery process, which
    serves no listener, does not read it at all -- it did, failed 'Permission denied' and
    was restarted for ever, while the relay took mail it never delivered.  The same with
    an ssl: endpoint's privateKey= and certKey= (its check read them in the delivery
    process too)."""
    import trustme

    python, top = nobodyRuntime
    directory = nobodyDirectory(top)
    leaf = trustme.CA().issue_cert("relay.test")
    cert, key = directory / "relay.pem", directory / "relay.key"
    cert.write_bytes(b"".join(p.bytes() for p in leaf.cert_chain_pems))
    leaf.private_key_pem.write_to_path(str(key))
    for path in (cert, key):
        path.chmod(0o600)  # root's only
    hop, hopPort = nexthop()
    port = privilegedPort()
    (directory / "mailrelay.toml").write_text(
        f'[[routes]]\ndomain = "example.org"\nbackend = "smtp"\nnexthop = "[127.0.0.1]:{hopPort}"\n'
        + (f'[[listeners]]\nendpoint = "tcp:{port}:interface=127.0.0.1"\n'
           f'tls_certificate = "{cert}"\ntls_key = "{key}"\n' if kind == "tls_certificate" else
           f'[[listeners]]\nendpoint = "ssl:{port}:interface=127.0.0.1:privateKey={key}:'
           f'certKey={cert}"\n'))
    process = startAs(python, directory, "--config", str(directory / "mailrelay.toml"),
                      "--spool", str(directory / "spool"))
    try:
        waitListening(port)
        if kind == "ssl":
            import ssl

            client: smtplib.SMTP = smtplib.SMTP_SSL(
                "127.0.0.1", port, timeout=15, context=ssl._create_unverified_context())
        else:
            client = smtplib.SMTP("127.0.0.1", port, timeout=15)
        with client as s:
            s.sendmail("alice@sender.test", ["bob@example.org"], message("root-only key"))
        (got,) = hop.waitTo("bob@example.org")
        assert b"Subject: root-only key" in got.content
    finally:
        process.send_signal(signal.SIGTERM)
        process.wait(30)
    log = (directory / "relay.log").read_text()
    assert "Permission denied" not in log and "exited unexpectedly" not in log, log


def test_daemonFailedStartTellsTheWholeError(tmp_path: Path) -> None:
    """twistd without -n: the command that was run prints the whole reason a start failed
    (twistd's parent prints only 100 octets of its status pipe: half a message); and a
    start that works lets go of the command's standard error (the command's output reaches
    its end while the daemon runs)."""
    from tests.harness import TWISTD

    def daemon(name: str, *args: str) -> subprocess.CompletedProcess[str]:
        directory = tmp_path / name
        directory.mkdir()
        try:
            return subprocess.run(
                [TWISTD, "--pidfile", str(directory / "twistd.pid"), "--logfile",
                 str(directory / "twistd.log"), "mailrelay", "--hostname", "relay.test",
                 "--spool", str(directory / "spool"), *args],
                cwd=directory, capture_output=True, text=True, timeout=30,
                stdin=subprocess.DEVNULL,
            )
        finally:
            deadline = time.monotonic() + 10  # (the daemon may be a moment behind)
            pidfile = directory / "twistd.pid"
            while not pidfile.exists() and processesMentioning(str(directory)) \
                    and time.monotonic() < deadline:
                time.sleep(0.05)
            for pid in processesMentioning(str(directory)):
                os.kill(pid, signal.SIGTERM)
            while processesMentioning(str(directory)) and time.monotonic() < deadline:
                time.sleep(0.05)
            for pid in processesMentioning(str(directory)):
                os.kill(pid, signal.SIGKILL)

    socketPath = tmp_path / ("a-directory-that-does-not-exist-" + "x" * 60) / "smtp.sock"
    p = daemon("failed", "--listen", f"unix:{socketPath}")
    assert p.returncode == 1, p
    whole = (f"mailrelay: error: --listen: cannot listen on unix:{socketPath}: the socket's "
             f"directory {socketPath.parent} does not exist: create it (the relay makes its "
             "socket and a lock file beside it there), or name a socket in an existing "
             "directory\n")
    assert len(whole) > 200 and whole in p.stderr, p.stderr
    assert "the relay did not start: see the error above" in p.stderr, p.stderr

    p = daemon("started", "--listen", "tcp:0:interface=127.0.0.1")
    assert p.returncode == 0 and p.stderr == "", p


def test_a_pid_file_in_a_sticky_directory_is_said_at_start(nobodyRuntime) -> None:
    """A pid file in a sticky directory (as /tmp): started as root with --uid nobody, the
    relay says at start that nobody will not be able to remove it at the stop (twistd wrote
    it as root), and it stays; started as nobody on one left there by a process that is
    gone, which nobody may not remove, the start stops with one line naming the file (it
    was twistd's PermissionError traceback)."""
    python, top = nobodyRuntime
    directory = nobodyDirectory(top)
    sticky = directory / "tmp"
    sticky.mkdir()
    sticky.chmod(0o1777)
    pidfile = sticky / "mailrelay.pid"
    port = freePort()
    args = ("--listen", f"tcp:{port}:interface=127.0.0.1", "--spool", str(directory / "spool"))
    process = startAs(python, directory, *args, pidfile=str(pidfile))
    try:
        waitListening(port)
        log = (directory / "relay.log").read_text()
        assert (f"the pid file {pidfile} will stay after the relay stops: its directory "
                f"{sticky} is sticky (mode 1777) and the file is not the relay's user's") in log
    finally:
        process.terminate()
        process.wait(timeout=30)
    assert pidfile.exists() and pidfile.stat().st_uid == 0  # (what was said)
    (directory / "relay.log").unlink()
    # Started as nobody: the pid it names is gone (the relay above), the file is root's.
    process = startAs(python, directory, *args, pidfile=str(pidfile), asNobody=True)
    assert process.wait(timeout=60) == 1
    log = (directory / "relay.log").read_text()
    assert log.strip() == (
        f"mailrelay: error: the pid file {pidfile} is left by a process that is gone (pid "
        f"{pidfile.read_text().strip()}), and this user may not remove it: its directory "
        f"{sticky} is sticky (mode 1777) and the file is not this user's: only its owner, the "
        "directory's or root may remove it; remove it, or give twistd another --pidfile"), log


# ---------------------------------------------------------------------------------------------
# twistd's --rundir


@pytest.mark.parametrize("spool", ["relspool", None])
def test_rundirWithARelativeSpoolDeliversWhatItAccepts(relay, nexthop, dns, tmp_path: Path,
                                                         spool: str | None) -> None:
    """twistd's C{--rundir} changes directory after the relay is built, before its delivery
    process starts: a relative C{--spool} (or the default C{./mailrelay-spool}) is the one
    directory of the directory twistd was started in, in every process (as C{--config} and
    twistd's own C{--pidfile} are), and the mail accepted there is delivered."""
    handler, port = nexthop()
    rundir = tmp_path / "run"
    rundir.mkdir()
    args = ["--listen", "tcp:0:interface=127.0.0.1", "--hostname", "relay.test"]
    if spool is not None:
        args += ["--spool", spool]
    r = relay(config(dns, routes=[smtpRoute("example.org", port)]), *args, defaults=False,
              twistdArgs=("--rundir", str(rundir)))
    qid = submit(r, "alice@sender.test", ["bob@example.org"], message("rundir"))
    m = waitResult(r, qid, "bob@example.org")
    assert m["status"] == "sent", m[0]
    waitRemoved(r, qid)
    name = spool or "mailrelay-spool"
    assert (r.directory / name / "queue").is_dir()
    assert not (rundir / name).exists()
    assert [received.rcptTos for received in handler.accepted] == [["bob@example.org"]]
