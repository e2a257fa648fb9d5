"""End-to-end, the C{pipe} backend: the real C{twistd -n mailrelay} handing messages to a
command (a shell script) named by a C{[[backends]]} table, as Postfix's pipe(8): arguments
expanded one per item, never through a shell, the message on standard input, the exit status
read by sysexits (EX_TEMPFAIL deferred, others returned with the command's output in the
bounce), the command run as the configured user."""

from __future__ import annotations

import json
import os
import pwd
import re
import shutil
import time
from pathlib import Path

import pytest

from tests.test_delivery import BINARY_MESSAGE, PAYLOAD, binaryPart
from tests.test_e2e_outbound import (
    bounceID,
    config,
    dns,  # noqa: F401 - the module's DNS server fixture
    message,
    parseReport,
    relay,  # noqa: F401 - the relay fixture
    results,
    submit,
    waitEmpty,
    waitRemoved,
    waitResult,
)
from tests.test_e2e_protocol import bdat, replies, session
from tests.test_pipe import DETACHED, USER, killLeftovers, runs, script, workdir


@pytest.fixture
def work():
    directory = workdir()
    yield directory
    killLeftovers(directory)
    shutil.rmtree(directory, ignore_errors=True)


def _config(dns, tmp_path: Path, command: list[str], timeout: int = 60, **options: object) -> str:
    template = str(tmp_path / "mail" / "{domain}" / "{local}" / "Maildir")
    (tmp_path / "mail" / "sender.test" / "alice").mkdir(parents=True, exist_ok=True)  # (a maildir route delivers only to users whose directory exists)
    text = config(dns, queue={"min_backoff": 1, "max_backoff": 2},
                  routes=[{"domain": "pipe.test", "backend": "procmail"},
                          {"domain": "sender.test", "backend": "maildir", "nexthop": template}])
    text += "[[backends]]\nname = \"procmail\"\nplugin = \"pipe\"\n"
    text += f"command = {json.dumps(command)}\nuser = {json.dumps(USER)}\ntimeout = {timeout}\n"
    for key, value in options.items():
        text += f"{key} = {json.dumps(value)}\n"
    return text


def test_pipe_delivers(relay, dns, tmp_path: Path, work: Path) -> None:
    command = [script(work, "exit 0"), "-f", "{sender}", "-d", "{recipient}", "{queue_id}",
               "{nexthop}"]
    r = relay(_config(dns, tmp_path, command))
    msg = message("to a command", "Line\r\n.dot\r\n")
    qid = submit(r, "alice@sender.test", ["bob@pipe.test", "carol@pipe.test"], msg)
    for rcpt in ("bob@pipe.test", "carol@pipe.test"):
        m = waitResult(r, qid, rcpt)
        assert (m["status"], m["relay"]) == ("sent", "procmail"), m[0]  # (as Postfix's pipe)
        assert m["diagnostic"] == "X-mailrelay; delivered via procmail service"
    waitRemoved(r, qid)
    done = sorted(runs(work), key=lambda run: run["args"][3])
    assert [run["args"] for run in done] == [
        ["-f", "alice@sender.test", "-d", "bob@pipe.test", qid, "pipe.test"],
        ["-f", "alice@sender.test", "-d", "carol@pipe.test", qid, "pipe.test"],
    ]
    assert {run["uid"] for run in done} == {pwd.getpwnam(USER).pw_uid}
    stdin = done[0]["stdin"]
    assert stdin.startswith(b"Received: from client.test") and stdin.endswith(b"\nLine\n.dot\n")
    assert b"\r" not in stdin
    waitEmpty(r)


def test_pipe_exit_statuses(relay, dns, tmp_path: Path, work: Path) -> None:
    """EX_NOUSER (67) bounces with the command's output; EX_TEMPFAIL (75) defers and the
    retry delivers (the script succeeds once a flag file exists)."""
    flag = work / "ok"
    body = (f'case "$1" in gone@*) echo "no mailbox for $1"; exit 67;; esac\n'
            f'[ -e {flag} ] && exit 0; echo "busy, try later"; exit 75')
    r = relay(_config(dns, tmp_path, [script(work, body), "{recipient}"]))
    qid = submit(r, "alice@sender.test", ["gone@pipe.test", "later@pipe.test"],
                 message("statuses"))
    m = waitResult(r, qid, "gone@pipe.test", "bounced")
    assert m["diagnostic"] == (f"x-unix; {work}/cmd exited with status 67 (user unknown): "
                               "no mailbox for gone@pipe.test")
    m = waitResult(r, qid, "later@pipe.test", "deferred")
    assert m["diagnostic"] == (f"x-unix; {work}/cmd exited with status 75 (temporary failure): "
                               "busy, try later")
    flag.touch()
    os.chmod(flag, 0o644)
    waitResult(r, qid, "later@pipe.test", "sent", timeout=20)
    waitRemoved(r, qid)
    assert [s for _, s, _ in results(r, qid, "later@pipe.test")][-1] == "sent"
    # The bounce carries the command's words.
    dsnID = bounceID(r, qid)
    waitRemoved(r, dsnID)
    box = tmp_path / "mail" / "sender.test" / "alice" / "Maildir" / "new"
    (report,) = [p.read_bytes() for p in box.iterdir()]
    _, _, [block], _ = parseReport(report.split(b"\n", 2)[2].replace(b"\n", b"\r\n"))
    assert (block["Action"], block["Status"]) == ("failed", "5.1.1")
    assert "no mailbox for gone@pipe.test" in " ".join(block["Diagnostic-Code"].split())
    waitEmpty(r)


def test_pipe_per_message(relay, dns, tmp_path: Path, work: Path) -> None:
    r = relay(_config(dns, tmp_path, [script(work, "exit 0"), "{recipient}"], per="message"))
    qid = submit(r, "alice@sender.test", ["a@pipe.test", "b@pipe.test"], message("once"))
    waitRemoved(r, qid)
    assert [run["args"] for run in runs(work)] == [["a@pipe.test", "b@pipe.test"]]


def test_binarymime_reaches_the_command_and_the_maildir_intact(relay, dns, tmp_path: Path,
                                                                work: Path) -> None:
    """Found by a bug hunt: a message taken with BODY=BINARYMIME (by BDAT, on a listener
    with binarymime = true) reached the command and the Maildir with the CRLF of its binary
    part made LF, the image broken, and the log said sent.  Its binary part arrives base64,
    the relay logging conversion=7bit, as for a next hop without BINARYMIME."""
    text = _config(dns, tmp_path, [script(work, "exit 0"), "{recipient}"])
    text += '[[listeners]]\nendpoint = "tcp:0:interface=127.0.0.1"\nbinarymime = true\n'
    r = relay(text, "--spool", "spool", "--hostname", "relay.test", defaults=False)
    c, ehlo = session(r, b"EHLO client.test")
    assert b"250-BINARYMIME" in ehlo
    c.send(b"MAIL FROM:<alice@sender.test> BODY=BINARYMIME\r\nRCPT TO:<bob@pipe.test>\r\n"
           b"RCPT TO:<alice@sender.test>\r\n" + bdat(BINARY_MESSAGE, True))
    got = replies(c, 4)
    c.close()
    m = re.fullmatch(rb"250 2\.0\.0 Ok: queued as ([0-9A-Z]{20})", got[3])
    assert m, got
    qid = m.group(1).decode()
    for rcpt in ("bob@pipe.test", "alice@sender.test"):
        assert waitResult(r, qid, rcpt)["status"] == "sent"
    waitRemoved(r, qid)
    (run,) = runs(work)
    box = tmp_path / "mail" / "sender.test" / "alice" / "Maildir" / "new"
    (stored,) = [p.read_bytes() for p in box.iterdir()]
    for content in (run["stdin"], stored):
        assert binaryPart(content) == PAYLOAD
        assert content.isascii() and b"\r" not in content
    for backend in ("procmail", "maildir"):
        assert re.search(rf"{qid}: conversion=7bit for {backend} \(no BINARYMIME\): 1 body "
                         r"part\(s\) encoded", r.log()), r.log()
    waitEmpty(r)


def test_pipe_command_leaving_a_daemon(relay, dns, tmp_path: Path, work: Path) -> None:
    """A command that exits 0 leaving a daemon (in a session of its own) with its output
    open: delivered once, the command's exit status deciding.  The run waited for the
    output's end: the backend's timeout deferred it, and each retry delivered it again."""
    command = [script(work, f"{DETACHED}; echo started; exit 0"), "{recipient}"]
    r = relay(_config(dns, tmp_path, command, timeout=8))
    qid = submit(r, "alice@sender.test", ["bob@pipe.test"], message("daemon"))
    m = waitResult(r, qid, "bob@pipe.test")
    assert (m["status"], m["relay"]) == ("sent", "procmail"), m[0]
    waitRemoved(r, qid)
    assert [run["args"] for run in runs(work)] == [["bob@pipe.test"]]
    assert [s for _, s, _ in results(r, qid, "bob@pipe.test")] == ["sent"]
    waitEmpty(r)


def test_a_delivery_waiting_for_its_place_keeps_its_whole_timeout(relay, dns, tmp_path: Path,
                                                                  work: Path) -> None:
    """With C{delivery_limit = 1}, the delivery to the second command waits for the first
    to end; its timeout (2.5s) runs from when it gets its place, not from the attempt's
    start: both commands (1.5s each) are run to their end and delivered at the first
    attempt, none cut short as "may be sent more than once" (as Postfix's queue manager
    never times out its wait for a delivery agent)."""
    command = [script(work, "sleep 1.5; exit 0"), "{recipient}"]
    text = config(dns, queue={"delivery_limit": 1, "min_backoff": 60, "max_backoff": 60},
                  routes=[{"domain": "one.test", "backend": "first"},
                          {"domain": "two.test", "backend": "second"}])
    for name in ("first", "second"):
        text += (f'[[backends]]\nname = "{name}"\nplugin = "pipe"\n'
                 f"command = {json.dumps(command)}\nuser = {json.dumps(USER)}\ntimeout = 2.5\n")
    r = relay(text)
    qid = submit(r, "alice@sender.test", ["a@one.test", "b@two.test"], message("in turn"))
    for rcpt in ("a@one.test", "b@two.test"):
        m = waitResult(r, qid, rcpt, timeout=20)
        assert (m["attempts"], m["status"]) == ("1", "sent"), m[0]
    waitRemoved(r, qid)
    assert "may be sent more than once" not in r.log()
    assert sorted(run["args"][0] for run in runs(work)) == ["a@one.test", "b@two.test"]


def test_sigterm_during_a_run_keeps_its_result_and_defers_the_runs_not_started(
        relay, dns, tmp_path: Path, work: Path) -> None:
    """With C{delivery_limit = 1}, one command runs per recipient, the second waiting for
    the place of the first: SIGTERM while the first runs lets it end and records its
    recipient delivered; the second recipient, never run, stays queued and the restarted
    relay runs the command for it alone (each recipient once: nothing lost, nothing
    delivered twice)."""
    command = [script(work, "sleep 1.5; exit 0"), "{recipient}"]
    text = config(dns, queue={"delivery_limit": 1, "min_backoff": 60, "max_backoff": 60},
                  routes=[{"domain": "pipe.test", "backend": "procmail"}])
    text += (f'[[backends]]\nname = "procmail"\nplugin = "pipe"\n'
             f"command = {json.dumps(command)}\nuser = {json.dumps(USER)}\n")
    r = relay(text)
    qid = submit(r, "alice@sender.test", ["bob@pipe.test", "carol@pipe.test"],
                 message("one at a time"))
    for _ in range(200):  # the first run has started when its input file exists
        if list(work.glob("run.*.stdin")):
            break
        time.sleep(0.02)
    r.stop()
    log = r.log()
    first = runs(work)[0]["args"][0]
    second = ({"bob@pipe.test", "carol@pipe.test"} - {first}).pop()
    assert re.search(rf"to=<{re.escape(first)}>.*status=sent", log), log
    assert re.search(rf"to=<{re.escape(second)}>.*status=deferred .*not started: the relay "
                     r"was stopping", log), log
    assert r.queued() == [qid]
    r.start()
    waitRemoved(r, qid, timeout=20)
    assert sorted(run["args"][0] for run in runs(work)) == ["bob@pipe.test", "carol@pipe.test"]
