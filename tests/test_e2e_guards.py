"""End-to-end, with the real C{twistd -n mailrelay}: limits and checks that must hold against
a hostile or broken outside (issue 7, points 5 to 7).

- AUTH guessing: attempts sent at once on many connections are counted while in flight, so at
  most C{max_failures} passwords are ever checked per window per client.
- Damaged queue files are quarantined in C{corrupt/} with one log line, never retried nor
  relayed truncated; good entries beside them are delivered.
- A header stamper that fails or is too slow makes the message C{451 4.3.0}; refused commands
  are logged Postfix style (C{NOQUEUE: reject: ...}).  Bounces go through the same stampers
  as mail received by SMTP.
"""

from __future__ import annotations

import base64
import re
import signal
import smtplib
import time
from pathlib import Path

import pytest

from tests.harness import LineClient, RelayProcess
from tests.test_e2e_outbound import nexthop  # noqa: F401 - a fixture
from tests.test_e2e_tls_auth import PASSWORDS, Site

# AUTH guessing in parallel ------------------------------------------------------------------------

PARALLEL_AUTH = """
[relay]
networks = []

[auth]
password_file = "users"
throttle_after = 1000
failure_delay = 0
max_failures = 10

[[listeners]]
endpoint = "tcp:0:interface=127.0.0.1"
auth = true
auth_without_tls = true
max_connections_per_client = 0
"""

#: The log line of an AUTH attempt whose password was checked and found wrong.
CHECKED_FAILURE = re.compile(
    r"authentication failed from 127\.0\.0\.1: sasl_method=PLAIN sasl_username=alice "
    r"failures=\d+ \((wrong user name or password|answer delayed [^)]*|too many failures, closing)\)"
)


def memoryOf(pid: int) -> dict[str, int]:
    """The resident set (C{VmRSS}) and its peak so far (C{VmHWM}) of process C{pid}, in KiB."""
    fields = dict(line.split(":", 1) for line in Path(f"/proc/{pid}/status").read_text().splitlines())
    return {name: int(fields[name].split()[0]) for name in ("VmRSS", "VmHWM")}


def parallelAuth(tmp_path: Path, connections: int, password: str,
                 memory: dict[str, int] | None = None) -> tuple[list[bytes], str]:
    """C{connections} connections from 127.0.0.1 each send AUTH PLAIN as alice with
    C{password}, all at once, before any answer: the first line of each reply, and the
    relay's log.  C{memory}, when given, gets the relay's resident set before the AUTH
    commands (C{before}) and its peak once answered (C{peak}), in KiB."""
    site = Site(tmp_path / "relay")
    r = RelayProcess(site.directory, PARALLEL_AUTH, ("--spool", "spool", "--hostname", "relay.test"),
                     defaults=False, hold=True)
    clients: list[LineClient] = []
    try:
        r.start()
        for _ in range(connections):
            c = r.connect()
            clients.append(c)
            assert c.readReply()[0].startswith(b"220 ")
            c.send(b"EHLO client.example\r\n")
            assert c.readReply()[-1] == b"250 AUTH PLAIN LOGIN"
        login = b"AUTH PLAIN " + base64.b64encode(f"\0alice\0{password}".encode()) + b"\r\n"
        assert r.process is not None
        if memory is not None:
            memory["before"] = memoryOf(r.process.pid)["VmRSS"]
        for c in clients:
            c.send(login)
        replies = [c.readReply()[0] for c in clients]
        if memory is not None:
            memory["peak"] = memoryOf(r.process.pid)["VmHWM"]
    finally:
        for c in clients:
            c.close()
        text = r.log()
        r.stop()
    return replies, text


def test_parallel_auth_guesses_are_bounded_by_max_failures(tmp_path: Path) -> None:
    replies, text = parallelAuth(tmp_path, 50, "not the password")
    codes = [reply[:3] for reply in replies]
    assert set(codes) <= {b"535", b"421"}, replies
    checked = CHECKED_FAILURE.findall(text)
    assert len(checked) == 10, f"{len(checked)} passwords checked:\n{text}"
    assert codes.count(b"535") == 9 and codes.count(b"421") == 41, codes
    assert len(re.findall(r"too many failures, refused with 421 without checking", text)) == 40


def test_parallel_auth_guesses_are_checked_a_few_at_a_time(tmp_path: Path) -> None:
    """Each argon2id check of mailrelay-passwd's hashes takes 64 MiB: ten guesses at once
    were ten checks at once in the reactor's thread pool, 640 MiB more for the relay; at
    most 4 run at once now (as many as the CPUs), the others wait their turn."""
    memory: dict[str, int] = {}
    replies, _ = parallelAuth(tmp_path, 10, "not the password", memory)
    assert sorted(reply[:3] for reply in replies) == [b"421"] + [b"535"] * 9, replies
    grown = (memory["peak"] - memory["before"]) / 1024
    assert grown < 5.5 * 64, f"the relay grew by {grown:.0f} MiB"


def test_parallel_good_logins_beyond_max_failures_all_succeed(tmp_path: Path) -> None:
    """An application opening twice max_failures connections at once, all with the right
    password: none is refused (those beyond the budget wait for the checks in flight; they
    were refused with 421 for failures nobody made)."""
    replies, _ = parallelAuth(tmp_path, 20, PASSWORDS["alice"])
    assert replies == [b"235 2.7.0 Authentication successful"] * 20, replies


# Damaged queue files ------------------------------------------------------------------------------


def deliveryConfig(port: int) -> str:
    return (
        '[dns]\nreverse_lookups = false\nnameservers = ["127.0.0.1:9"]\n'
        f'[[routes]]\ndomain = "good.test"\nbackend = "smtp"\nnexthop = "[127.0.0.1]:{port}"\n'
    )


def queueHeld(directory: Path, port: int, count: int) -> list[str]:
    """Queue C{count} messages (to r0@good.test, r1@good.test ...) in a relay on hold in
    C{directory}, then stop it; their queue ids, in order."""
    held = RelayProcess(directory, deliveryConfig(port), hold=True).start()
    try:
        for n in range(count):
            with smtplib.SMTP("127.0.0.1", held.port, timeout=15) as s:
                s.sendmail("a@example.com", [f"r{n}@good.test"],
                           f"Subject: message {n}\r\n\r\n".encode() + b"body line\r\n" * 200)
        held.waitForLog(r"(result=250 2\.0\.0 Ok: queued as \w+(.|\n)*){%d}" % count)
        ids = re.findall(r"result=250 2\.0\.0 Ok: queued as (\w+)", held.log())
    finally:
        held.stop()
    assert len(ids) == count and sorted(ids) == held.queued()
    return ids


def test_damaged_queue_files_are_quarantined_not_retried(tmp_path: Path, nexthop) -> None:
    recorder, port = nexthop()
    directory = tmp_path / "relay"
    ids = queueHeld(directory, port, 6)
    queue = directory / "spool" / "queue"
    truncatedJSON, emptyJSON, invalidJSON, truncatedEML, good1, good2 = ids
    data = (queue / f"{truncatedJSON}.json").read_bytes()
    (queue / f"{truncatedJSON}.json").write_bytes(data[: len(data) // 2])
    (queue / f"{emptyJSON}.json").write_bytes(b"")
    (queue / f"{invalidJSON}.json").write_bytes(b'{"version": 1, "recipients": "nonsense"}')
    eml = (queue / f"{truncatedEML}.eml").read_bytes()
    (queue / f"{truncatedEML}.eml").write_bytes(eml[:1000])
    damaged = [truncatedJSON, emptyJSON, invalidJSON, truncatedEML]

    r = RelayProcess(directory, deliveryConfig(port))
    try:
        r.start()
        recorder.waitFor(lambda accepted: len(accepted) >= 2, what="the two good messages")
        for queueID in damaged:
            r.waitForLog(rf"{queueID}: damaged queue entry: .*; moved to \S+corrupt")
        r.waitForLog(rf"{good1}: removed")
        r.waitForLog(rf"{good2}: removed")
    finally:
        text = r.log()
        r.stop()
    delivered = sorted(m.rcptTos[0] for m in recorder.accepted)
    assert delivered == ["r4@good.test", "r5@good.test"], recorder.accepted
    assert r.queued() == []
    corrupt = sorted(p.name for p in (r.spool / "corrupt").iterdir())
    assert corrupt == sorted([f"{q}.json" for q in damaged] + [f"{q}.eml" for q in damaged])
    assert (r.spool / "corrupt" / f"{truncatedEML}.eml").read_bytes() == eml[:1000]
    for queueID in damaged:
        lines = [line for line in text.splitlines() if queueID in line]
        assert len(lines) == 1, lines
    assert f"message file {queue}/{truncatedEML}.eml has 1000 octets, the envelope records {len(eml)}" in text
    assert "retrying" not in text


def test_envelope_with_fields_of_the_wrong_type_is_quarantined(tmp_path: Path, nexthop) -> None:
    """Valid JSON whose fields have the wrong types (an editor's slip, a bad restore) is as
    damaged as a truncated file: quarantined with one line, while the good entries beside it
    are delivered and the relay stops cleanly (one such envelope stopped every delivery)."""
    import json

    recorder, port = nexthop()
    directory = tmp_path / "relay"
    ids = queueHeld(directory, port, 5)
    queue = directory / "spool" / "queue"
    changes = [
        lambda e: e.update(nextAttempt="soon"),
        lambda e: e.update(arrival=[1]),
        lambda e: e["recipients"][0].update(address=5),
        lambda e: e["client"].update(port="25"),
    ]
    damaged = ids[: len(changes)]
    for queueID, change in zip(damaged, changes):
        path = queue / f"{queueID}.json"
        envelope = json.loads(path.read_bytes())
        change(envelope)
        path.write_text(json.dumps(envelope))

    r = RelayProcess(directory, deliveryConfig(port))
    try:
        r.start()
        for queueID in damaged:
            r.waitForLog(rf"{queueID}: damaged queue entry: envelope \S+ is not a valid envelope")
        r.waitForLog(rf"{ids[-1]}: removed")
    finally:
        text = r.log()
        code = r.stop()
    assert [m.rcptTos for m in recorder.accepted] == [[f"r{len(changes)}@good.test"]]
    assert r.queued() == []
    assert "Traceback" not in text, text
    assert code == -signal.SIGTERM, text  # stopped on SIGTERM, not killed after a hang



def test_envelope_written_by_a_later_relay_is_delivered_after_a_rollback(
    tmp_path: Path, nexthop
) -> None:
    """A relay rolled back over a spool written by a later one: the fields it does not know
    are skipped (Postfix skips queue file records it does not know), and the mail is
    delivered once, not moved to corrupt/ undelivered."""
    import json

    recorder, port = nexthop()
    directory = tmp_path / "relay"
    ids = queueHeld(directory, port, 2)
    queue = directory / "spool" / "queue"
    for queueID in ids:
        path = queue / f"{queueID}.json"
        envelope = json.loads(path.read_bytes())
        envelope["laterField"] = "x"
        envelope["client"]["laterField"] = 1
        envelope["recipients"][0]["laterField"] = {"a": 1}
        path.write_text(json.dumps(envelope))

    r = RelayProcess(directory, deliveryConfig(port))
    try:
        r.start()
        for queueID in ids:
            r.waitForLog(rf"{queueID}: removed")
    finally:
        text = r.log()
        r.stop()
    assert sorted(m.rcptTos[0] for m in recorder.accepted) == ["r0@good.test", "r1@good.test"]
    assert r.queued() == [] and not (r.spool / "corrupt").exists(), text
    assert "damaged queue entry" not in text, text

# Header stampers that fail or are slow ------------------------------------------------------------

STAMPER_MODULE = '''
"""Site plugins for the tests: a header stamper that raises, one that answers after a delay,
and a delivery backend that never answers."""
from twisted.internet.defer import Deferred
from twisted.internet.task import deferLater
from twisted.logger import Logger
from zope.interface import implementer

from mailrelay.interfaces import IDeliveryBackend, IHeaderStamper, StampResult

log = Logger()


@implementer(IHeaderStamper)
class Broken:
    def stamp(self, context):
        raise RuntimeError("the stamper's database is gone")


@implementer(IHeaderStamper)
class Slow:
    def __init__(self, reactor, delay):
        self.reactor = reactor
        self.delay = delay

    def stamp(self, context):
        field = f"X-Slow-Stamp: {context.envelope.queueID}\\r\\n".encode()
        return deferLater(self.reactor, self.delay, lambda: StampResult(append=[field]))


def buildBroken(options, context):
    return Broken()


def buildSlow(options, context):
    return Slow(context.reactor, float(options.get("delay", 0)))


@implementer(IDeliveryBackend)
class Silent:
    """A delivery backend that never answers."""

    def deliver(self, envelope, recipients, route, messagePath):
        return Deferred(lambda d: log.info("delivery cancelled {queueID}", queueID=envelope.queueID))


def buildSilent(options, context):
    return Silent()
'''

STAMPER_DROPIN = '''
from mailrelay.interfaces import IDeliveryBackend, IHeaderStamper
from mailrelay.plugins import MailRelayPlugin

broken = MailRelayPlugin(name="test-broken-stamper", provides=IHeaderStamper,
                         description="raises (tests only)", factory="site_stampers:buildBroken")
slow = MailRelayPlugin(name="test-slow-stamper", provides=IHeaderStamper,
                       description="answers late (tests only)", factory="site_stampers:buildSlow")
silent = MailRelayPlugin(name="test-silent-backend", provides=IDeliveryBackend,
                         description="never answers (tests only)", factory="site_stampers:buildSilent")
'''


def siteRelay(tmp_path: Path, config: str, hold: bool = True) -> RelayProcess:
    """A started relay with C{config} and the site plugins above on its C{PYTHONPATH}."""
    import os

    plugins = tmp_path / "site-plugins"
    (plugins / "twisted" / "plugins").mkdir(parents=True, exist_ok=True)
    (plugins / "site_stampers.py").write_text(STAMPER_MODULE)
    (plugins / "twisted" / "plugins" / "site_stampers_plugin.py").write_text(STAMPER_DROPIN)
    env = {"PYTHONPATH": os.pathsep.join([str(plugins), os.environ.get("PYTHONPATH", "")])}
    config = "[dns]\nreverse_lookups = false\n" + config
    return RelayProcess(tmp_path / "relay", config, env=env, hold=hold).start()


def stamperRelay(tmp_path: Path, stampers: str) -> RelayProcess:
    return siteRelay(tmp_path, '[[header_stampers]]\nplugin = "default"\n' + stampers)


def sendMessage(r: RelayProcess) -> list[bytes]:
    """One message on a raw connection; the reply to its end of data, then to QUIT."""
    c = r.connect()
    try:
        assert c.readReply()[0].startswith(b"220 ")
        c.send(b"EHLO client.example\r\n")
        c.readReply()
        c.send(b"MAIL FROM:<a@example.com>\r\nRCPT TO:<b@example.org>\r\nDATA\r\n")
        assert [c.readReply() for _ in range(3)] == [[b"250 2.1.0 Ok"], [b"250 2.1.5 Ok"],
                                                       [b"354 End data with <CR><LF>.<CR><LF>"]]
        c.send(b"Subject: stamped\r\n\r\n" + b"body\r\n" * 1000 + b".\r\n")
        (end,) = c.readReply()
        c.send(b"QUIT\r\n")
        return [end, c.readReply()[0]]
    finally:
        c.close()


def refusedByStamper(tmp_path: Path, stampers: str, logged: str) -> tuple[str, float]:
    """Send one message through a relay with C{stampers}: it must be refused with 451 (the
    session going on), nothing queued, and C{logged} logged.  The log and the seconds the
    end of data took."""
    r = stamperRelay(tmp_path, stampers)
    try:
        started = time.monotonic()
        end, bye = sendMessage(r)
        took = time.monotonic() - started
        assert end == b"451 4.3.0 Error: temporary failure processing the message, try again later"
        assert bye == b"221 2.0.0 Bye"
        assert r.queued() == []
        r.waitForLog(logged)
        return r.waitForLog(r"disconnect from 127\.0\.0\.1:\d+ .*").string, took
    finally:
        r.stop()


def test_stamper_that_raises_is_451_and_logged_once(tmp_path: Path) -> None:
    text, _ = refusedByStamper(tmp_path, '[[header_stampers]]\nplugin = "test-broken-stamper"\n',
                               r"header stamper test-broken-stamper failed")
    assert text.count("RuntimeError: the stamper's database is gone") == 1, text
    assert "client closed the connection" not in text


def test_stamper_timeout_is_honoured(tmp_path: Path) -> None:
    _, took = refusedByStamper(
        tmp_path, '[[header_stampers]]\nplugin = "test-slow-stamper"\ndelay = 60\ntimeout = 1\n',
        r"header stamper test-slow-stamper gave no answer in 1s")
    assert 0.9 <= took < 30, took


def test_stamper_answering_with_a_deferred(tmp_path: Path) -> None:
    r = stamperRelay(tmp_path, '[[header_stampers]]\nplugin = "test-slow-stamper"\ndelay = 0.3\ntimeout = 10\n')
    try:
        end, _ = sendMessage(r)
        assert end.startswith(b"250 2.0.0 Ok: queued as ")
        (queueID,) = r.queued()
        message = (r.spool / "queue" / f"{queueID}.eml").read_bytes()
    finally:
        r.stop()
    assert message.startswith(b"Received: from client.example")
    head, _, body = message.partition(b"\r\n\r\n")
    assert head.endswith(f"\r\nX-Slow-Stamp: {queueID}".encode())
    assert body == b"body\r\n" * 1000



@pytest.mark.parametrize("process", ["separate", "inline"])
def test_bounce_is_stamped_like_mail_received_by_smtp(tmp_path: Path, nexthop, process: str) -> None:
    """A bounce enters the spool through the intake, as mail received by SMTP does: the
    site's header stampers see it (here test-slow-stamper's X-Slow-Stamp), and the default
    stamper gives it a Message-Id of the same form, whichever process the queue manager
    runs in."""
    hop, port = nexthop()
    hop.rcptReply = lambda a: "550 5.1.1 no such user" if a == "gone@good.test" else None
    route = 'backend = "smtp"\nnexthop = "[127.0.0.1]:%d"\n' % port
    r = siteRelay(
        tmp_path,
        f'[queue]\nprocess = "{process}"\n'
        '[[header_stampers]]\nplugin = "default"\n'
        '[[header_stampers]]\nplugin = "test-slow-stamper"\ndelay = 0\ntimeout = 10\n'
        f'[[routes]]\ndomain = "good.test"\n{route}[[routes]]\ndomain = "example.com"\n{route}',
        hold=False,
    )
    try:
        with smtplib.SMTP("127.0.0.1", r.port, timeout=15) as s:
            s.sendmail("a@example.com", ["gone@good.test", "here@good.test"],
                       b"Subject: half of it bounces\r\n\r\nhi\r\n")
        queueID = r.waitForLog(r"result=250 2\.0\.0 Ok: queued as (\w+)").group(1)
        dsnID = r.waitForLog(rf"{queueID}: sender non-delivery notification: (\w+)").group(1)
        (mail,) = hop.waitTo("here@good.test")
        (bounce,) = hop.waitTo("a@example.com")
        text = r.waitForLog(rf"{dsnID}: removed").string
    finally:
        r.stop()
    assert bounce.mailFrom == "<>" and mail.mailFrom == "a@example.com"
    assert bounce.content.startswith(f"Received: by relay.test (mailrelay) id {dsnID}; ".encode())
    for content, qid in ((mail.content, queueID), (bounce.content, dsnID)):
        head = content.split(b"\r\n\r\n", 1)[0]
        # The default stamper's fields, then the site stamper's, after the message's own.
        assert re.search(rb"\r\nMessage-Id: <\d{14}\." + qid.encode() + rb"@relay\.test>\r\n"
                         rb"Date: [^\r\n]+\r\nX-Slow-Stamp: " + qid.encode() + rb"\Z", head), head
        assert head.count(b"\r\nMessage-Id: ") == 1 and head.count(b"\r\nDate: ") == 1
    assert f"{dsnID}: from=<> nrcpt=1 size=" in text  # the intake's line, as for any message


def test_site_backend_timeout_is_honoured(tmp_path: Path) -> None:
    """[[backends]] timeout bounds a delivery (it was parsed and ignored: every backend got
    3600 s): the delivery is cancelled, its recipient deferred with 4.4.2, retried later."""
    r = siteRelay(
        tmp_path,
        '[[backends]]\nname = "hook"\nplugin = "test-silent-backend"\ntimeout = 1\n'
        '[[routes]]\ndomain = "hooks.test"\nbackend = "hook"\n',
        hold=False,
    )
    try:
        started = time.monotonic()
        with smtplib.SMTP("127.0.0.1", r.port, timeout=10) as s:
            s.sendmail("a@example.com", ["x@hooks.test"], b"Subject: hook\r\n\r\nhi\r\n")
        line = r.waitForLog(r"to=<x@hooks\.test>, .*status=\w+ \(.*\)", timeout=30)[0]
        took = time.monotonic() - started
        text = r.log()
    finally:
        r.stop()
    assert ("status=deferred (X-mailrelay; delivery via hook:hook timed out after 1s (the next "
            "hop may have received the message: it may be sent more than once))") in line, line
    assert "delivery backend 'hook' did not answer within its timeout of 1s" in text
    assert "delivery cancelled" in text
    assert took < 20, took

# Refusals are logged, Postfix style ---------------------------------------------------------------


def test_refused_commands_are_logged_postfix_style(tmp_path: Path) -> None:
    table = tmp_path / "recipients"
    table.write_text("@ours.example OK\nnobody@ours.example REJECT User unknown\n")
    config = (
        '[relay]\nnetworks = []\naccept_domains = ["ours.example"]\n[dns]\nreverse_lookups = false\n'
        f'[limits]\nmessage_size = 100000\n[[recipient_validators]]\nplugin = "recipient-map"\nfile = "{table}"\n'
    )
    r = RelayProcess(tmp_path / "relay", config, hold=True).start()
    try:
        with smtplib.SMTP("127.0.0.1", r.port, timeout=10) as s:
            s.ehlo("client.example")
            assert s.mail("big@example.com", ["SIZE=200000"])[0] == 552
            assert s.mail("s@example.com")[0] == 250
            assert s.rcpt("x@elsewhere.example")[0] == 554
            assert s.rcpt("nobody@ours.example")[0] == 550
            assert s.docmd("RCPT TO:<broken>")[0] == 501
            code, _ = s.docmd("DATA")
            assert code == 554
        r.waitForLog(r"disconnect from 127\.0\.0\.1")
        text = r.log()
    finally:
        r.stop()
    expected = [
        "NOQUEUE: reject: MAIL from unknown[127.0.0.1]: 552 5.3.4 Error: message size exceeds "
        "fixed limit; from=<big@example.com> proto=ESMTP helo=<client.example>",
        "NOQUEUE: reject: RCPT from unknown[127.0.0.1]: 554 5.7.1 Relay access denied; "
        "from=<s@example.com> to=<x@elsewhere.example> proto=ESMTP helo=<client.example>",
        "NOQUEUE: reject: RCPT from unknown[127.0.0.1]: 550 5.1.1 User unknown; "
        "from=<s@example.com> to=<nobody@ours.example> proto=ESMTP helo=<client.example>",
        "NOQUEUE: reject: DATA from unknown[127.0.0.1]: 554 5.5.1 Error: no valid recipients; "
        "from=<s@example.com> proto=ESMTP helo=<client.example>",
    ]
    for line in expected:
        assert line in text, f"{line}\nnot in:\n{text}"
    assert re.search(r"NOQUEUE: reject: RCPT from unknown\[127\.0\.0\.1\]: 501 5\.1\.3 .*; "
                     r"from=<s@example\.com> to=<broken> proto=ESMTP", text), text
    assert text.count("NOQUEUE: reject:") == 5


# What the log says of a bounce that could not be queued -------------------------------------------


def test_recipient_whose_bounce_cannot_be_queued_is_logged_deferred(tmp_path: Path, nexthop) -> None:
    import shutil
    import threading

    recorder, port = nexthop()
    atRcpt, swapped = threading.Event(), threading.Event()

    def rcptReply(address: str) -> str:
        atRcpt.set()
        swapped.wait(20)
        return "550 5.1.1 <gone@good.test>: no such user"

    recorder.rcptReply = rcptReply
    r = RelayProcess(tmp_path / "relay", deliveryConfig(port)).start()
    tmp = r.spool / "tmp"
    try:
        with smtplib.SMTP("127.0.0.1", r.port, timeout=15) as s:
            s.sendmail("a@example.com", ["gone@good.test"], b"Subject: x\r\n\r\nhi\r\n")
        assert atRcpt.wait(20)
        # The spool's tmp/ becomes unusable (as on a failing disk): the bounce cannot be written.
        tmp.rename(tmp.with_name("tmp.away"))
        tmp.write_bytes(b"")
        swapped.set()
        r.waitForLog(r"queueing the failed notification to <a@example\.com> failed")
        line = r.waitForLog(r"to=<gone@good\.test>, relay=\S+, delay=\S+, attempts=1, status=\w+ \(.*\)")[0]
    finally:
        swapped.set()
        if tmp.is_file():
            tmp.unlink()
            tmp.with_name("tmp.away").rename(tmp)
        text = r.log()
        r.stop()
        shutil.rmtree(tmp.with_name("tmp.away"), ignore_errors=True)
    assert "status=bounced" not in text, text
    assert "status=deferred (smtp; 550 5.1.1 <gone@good.test>: no such user (in reply to RCPT TO command); the bounce could not be queued" in line, line
    assert len(recorder.accepted) == 0
