"""End-to-end, the C{pipe} backend: the real C{twistd -n mailrelay} handing messages to a
command (a shell script) named by a C{[[backends]]} table, as Postfix's pipe(8): arguments
expanded one per item, never through a shell, the message on standard input, the exit status
read by sysexits (EX_TEMPFAIL deferred, others returned with the command's output in the
bounce), the command run as the configured user."""

from __future__ import annotations

import json
import os
import pwd
import shutil
from pathlib import Path

import pytest

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
from tests.test_pipe import USER, runs, script, workdir


@pytest.fixture
def work():
    directory = workdir()
    yield directory
    shutil.rmtree(directory, ignore_errors=True)


def _config(dns, tmp_path: Path, command: list[str], **options: object) -> str:
    template = str(tmp_path / "mail" / "{domain}" / "{local}" / "Maildir")
    (tmp_path / "mail" / "sender.test" / "alice").mkdir(parents=True, exist_ok=True)  # (a maildir route delivers only to users whose directory exists)
    text = config(dns, queue={"min_backoff": 1, "max_backoff": 2},
                  routes=[{"domain": "pipe.test", "backend": "procmail"},
                          {"domain": "sender.test", "backend": "maildir", "nexthop": template}])
    text += "[[backends]]\nname = \"procmail\"\nplugin = \"pipe\"\n"
    text += f"command = {json.dumps(command)}\nuser = {json.dumps(USER)}\ntimeout = 60\n"
    for key, value in options.items():
        text += f"{key} = {json.dumps(value)}\n"
    return text


def test_pipe_delivers(relay, dns, tmp_path: Path, work: Path) -> None:
    command = [script(work, "exit 0"), "-f", "{sender}", "-d", "{recipient}", "{queue_id}"]
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
        ["-f", "alice@sender.test", "-d", "bob@pipe.test", qid],
        ["-f", "alice@sender.test", "-d", "carol@pipe.test", qid],
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
