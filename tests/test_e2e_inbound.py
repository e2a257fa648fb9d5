"""End-to-end: the real C{twistd -n mailrelay} with real clients (smtplib, swaks, raw sockets)."""

from __future__ import annotations

import json
import os
import re
import smtplib
import sqlite3
import subprocess
import time
from pathlib import Path

import pytest

from tests.harness import REPO, TWISTD, LineClient, RelayProcess, requireTool


@pytest.fixture
def relay(tmp_path: Path):
    started: list[RelayProcess] = []

    def start(config: str | None = None, *args: str, **kw) -> RelayProcess:
        kw.setdefault("hold", True)
        r = RelayProcess(tmp_path / f"relay{len(started)}", config, args, **kw)
        started.append(r)
        return r.start()

    yield start
    for r in started:
        r.stop()


def queuedMessage(relay: RelayProcess, queueID: str) -> tuple[dict, bytes]:
    base = relay.spool / "queue" / queueID
    return json.loads(base.with_suffix(".json").read_text()), base.with_suffix(".eml").read_bytes()


def test_seed_session_verbatim(relay) -> None:
    r = relay()
    c = r.connect()
    assert c.readReply() == [b"220 relay.test ESMTP mailrelay"]
    c.send(b"HELO client.example\r\n")
    assert c.readReply() == [b"250 relay.test"]
    c.send(b"MAIL FROM:<alice@example.com>\r\n")
    assert c.readReply() == [b"250 2.1.0 Ok"]
    c.send(b"RCPT TO:<bob@example.org>\r\n")
    assert c.readReply() == [b"250 2.1.5 Ok"]
    c.send(b"DATA\r\n")
    assert c.readReply() == [b"354 End data with <CR><LF>.<CR><LF>"]
    c.send(b"Subject: hello\r\n\r\nHi Bob.\r\n.\r\n")
    (reply,) = c.readReply()
    m = re.fullmatch(rb"250 2\.0\.0 Ok: queued as ([0-9A-Z]{20})", reply)
    assert m, reply
    c.send(b"QUIT\r\n")
    assert c.readReply() == [b"221 2.0.0 Bye"]
    c.expectClosed()
    queueID = m.group(1).decode()
    assert r.queued() == [queueID]
    envelope, message = queuedMessage(r, queueID)
    assert envelope["sender"] == "alice@example.com"
    assert [x["address"] for x in envelope["recipients"]] == ["bob@example.org"]
    assert envelope["recipients"][0]["state"] == "pending"
    assert envelope["client"]["address"] == "127.0.0.1"
    assert envelope["client"]["helo"] == "client.example"
    assert envelope["client"]["protocol"] == "SMTP"
    assert envelope["queueID"] == queueID and envelope["arrival"] > 0
    # Byte-exact: our trace field on top, the message, then the fields we add at the end of
    # the header section, then the body untouched.
    lines = message.split(b"\r\n")
    assert lines[0] == b"Received: from client.example (localhost [127.0.0.1])"
    assert lines[1] == b"\tby relay.test (mailrelay) with SMTP id " + m.group(1)
    assert re.fullmatch(rb"\tfor <bob@example\.org>; \w{3}, \d\d \w{3} \d{4} \d\d:\d\d:\d\d [+-]\d{4}", lines[2])
    assert lines[3] == b"Subject: hello"
    assert re.fullmatch(rb"Message-Id: <\d{14}\." + m.group(1) + rb"@relay\.test>", lines[4])
    assert lines[5].startswith(b"Date: ")
    assert lines[6:] == [b"", b"Hi Bob.", b""]
    assert f"{queueID}: from=<alice@example.com> nrcpt=1 size={len(message)} client=127.0.0.1 result=250 2.0.0 Ok: queued as {queueID}" in r.log()
    assert list((r.spool / "tmp").iterdir()) == []


def test_pipelining_in_one_packet(relay) -> None:
    r = relay()
    c = r.connect()
    c.readReply()
    # RFC 2920: EHLO and DATA end a group; MAIL, RCPTs and DATA go in one packet, and so do
    # the end of a message and the next transaction's commands.
    c.send(b"EHLO client.example\r\n")
    ehlo = c.readReply()
    assert b"250-PIPELINING" in ehlo and ehlo[-1] == b"250 SMTPUTF8"
    c.send(b"MAIL FROM:<a@example.com>\r\nRCPT TO:<b@example.org>\r\nRCPT TO:<c@example.org>\r\nDATA\r\n")
    assert [c.readReply() for _ in range(4)] == [[b"250 2.1.0 Ok"], [b"250 2.1.5 Ok"], [b"250 2.1.5 Ok"], [b"354 End data with <CR><LF>.<CR><LF>"]]
    c.send(b"Subject: one\r\n\r\n.\r\nMAIL FROM:<>\r\nRCPT TO:<d@example.org>\r\nDATA\r\n")
    replies = [c.readReply()[0] for _ in range(4)]
    c.send(b"Subject: two\r\n\r\n..dot\r\n.\r\nQUIT\r\n")
    replies += [c.readReply()[0] for _ in range(2)]
    assert [x[:3] for x in replies] == [b"250", b"250", b"250", b"354", b"250", b"221"]
    c.expectClosed()
    assert len(r.queued()) == 2
    _, second = queuedMessage(r, replies[4].rsplit(b" ", 1)[1].decode())
    assert second.endswith(b"\r\n\r\n.dot\r\n")


def test_smtplib_and_size_and_utf8(relay) -> None:
    r = relay()
    with smtplib.SMTP("127.0.0.1", r.port, timeout=10) as s:
        code, _ = s.ehlo("client.example")
        assert code == 250
        assert s.has_extn("size") and s.esmtp_features["size"] == "10240000"
        assert s.has_extn("smtputf8") and s.has_extn("8bitmime") and s.has_extn("enhancedstatuscodes")
        refused = s.sendmail("a@example.com", ["b@example.org", "c@example.org"], b"Subject: x\r\n\r\nbody\r\n")
        assert refused == {}
        s.sendmail("pel\u00e9@example.com", ["\u00fcser@ex\u00e4mple.org"], "Subject: utf8\r\n\r\nbody\r\n".encode(), mail_options=["SMTPUTF8", "BODY=8BITMIME"])
    ids = r.queued()
    assert len(ids) == 2
    envelopes = [queuedMessage(r, i)[0] for i in ids]
    assert envelopes[1]["smtputf8"] is True
    assert envelopes[1]["recipients"][0]["address"] == "\u00fcser@xn--exmple-cua.org"
    _, message = queuedMessage(r, ids[1])
    assert b"with UTF8SMTP id" in message


def test_swaks(relay) -> None:
    swaks = requireTool("swaks")
    r = relay()
    out = subprocess.run(
        [swaks, "--server", f"127.0.0.1:{r.port}", "--from", "alice@example.com", "--to", "bob@example.org",
         "--helo", "swaks.example", "--header", "Subject: from swaks", "--body", "swaks body"],
        capture_output=True, text=True, timeout=30,
    )
    assert out.returncode == 0, out.stdout + out.stderr
    m = re.search(r"<-  250 2\.0\.0 Ok: queued as (\w+)", out.stdout)
    assert m, out.stdout
    _, message = queuedMessage(r, m.group(1))
    assert message.startswith(b"Received: from swaks.example (localhost [127.0.0.1])\r\n\tby relay.test (mailrelay) with ESMTP id ")
    assert b"Subject: from swaks\r\n" in message and b"\r\n\r\nswaks body\r\n" in message
    assert message.count(b"\n") == message.count(b"\r\n")


def test_relay_denied_when_not_in_relay_network(relay) -> None:
    r = relay(None, "--relay-network", "10.0.0.0/8", "--accept-domain", "ours.example")
    with smtplib.SMTP("127.0.0.1", r.port, timeout=10) as s:
        s.ehlo("client.example")
        s.mail("a@example.com")
        assert s.rcpt("b@elsewhere.example") == (554, b"5.7.1 Relay access denied")
        assert s.rcpt("b%elsewhere.example@ours.example") == (554, b"5.7.1 Relay access denied")
        assert s.rcpt("B@Ours.Example.") == (250, b"2.1.5 Ok")
        code, _ = s.data(b"Subject: local\r\n\r\nx\r\n")
        assert code == 250
    ((envelope, _),) = [queuedMessage(r, i) for i in r.queued()]
    assert [x["address"] for x in envelope["recipients"]] == ["B@ours.example"]


def test_oversize_message_is_refused_after_being_read(relay) -> None:
    r = relay("[limits]\nmessage_size = 2000\n")
    with smtplib.SMTP("127.0.0.1", r.port, timeout=10) as s:
        s.ehlo("client.example")
        assert s.esmtp_features["size"] == "2000"
        assert s.mail("a@example.com", ["SIZE=5000"]) == (552, b"5.3.4 Error: message size exceeds fixed limit")
        s.mail("a@example.com")
        s.rcpt("b@example.org")
        code, msg = s.data(b"Subject: big\r\n\r\n" + b"x" * 70 + b"\r\n" * 100 + (b"y" * 70 + b"\r\n") * 40)
        assert (code, msg) == (552, b"5.3.4 Error: message size exceeds fixed limit")
        assert s.noop()[0] == 250  # still in step: the session never left DATA early
    assert r.queued() == []
    assert list((r.spool / "tmp").iterdir()) == []


def test_long_line_and_bare_lf(relay) -> None:
    r = relay()
    c = r.connect()
    c.readReply()
    c.send(b"EHLO x\r\n")
    c.readReply()
    for body, expected in [
        (b"Subject: x\r\n\r\n" + b"a" * 999 + b"\r\nQUIT\r\n", b"500 5.5.2 Error: message line longer than 998 octets"),
        (b"Subject: x\r\n\r\nbare\nLF\n.\nMAIL FROM:<evil@example.com>\r\n", b"550 5.6.0 Error: message contains a bare LF; use CRLF line endings"),
    ]:
        c.send(b"MAIL FROM:<a@example.com>\r\nRCPT TO:<b@example.org>\r\nDATA\r\n")
        assert [c.readReply()[0][:3] for _ in range(3)] == [b"250", b"250", b"354"]
        c.send(body + b".\r\n")
        assert c.readReply() == [expected]
    c.send(b"NOOP\r\n")
    assert c.readReply() == [b"250 2.0.0 Ok"]
    assert r.queued() == []


def sentToALegacyListener(relay, content: bytes, bareNewline: str = "normalize") -> bytes:
    """C{content} (and the end of data) sent to a listener with C{bare_newline} as given:
    the message queued."""
    r = relay(
        f'[[listeners]]\nendpoint = "tcp:0:interface=127.0.0.1"\nbare_newline = "{bareNewline}"\n',
        "--spool", "spool", "--hostname", "relay.test", defaults=False,
    )
    c = r.connect()
    c.readReply()
    for command in (b"HELO x", b"MAIL FROM:<a@example.com>", b"RCPT TO:<b@example.org>", b"DATA"):
        c.send(command + b"\r\n")  # a HELO client may not pipeline
        assert c.readReply()[0][:3] in (b"250", b"354")
    c.send(content + b".\r\n")
    (reply,) = c.readReply()
    assert reply.startswith(b"250 2.0.0 Ok: queued as ")
    return queuedMessage(r, reply.rsplit(b" ", 1)[1].decode())[1]


def test_bare_lf_normalized_on_a_legacy_listener(relay) -> None:
    message = sentToALegacyListener(relay, b"Subject: legacy\n\nline one\nline two\r\n")
    assert message.endswith(b"Subject: legacy\r\n" + message.split(b"Subject: legacy\r\n")[1].split(b"\r\n\r\n")[0] + b"\r\n\r\nline one\r\nline two\r\n")
    assert message.count(b"\n") == message.count(b"\r\n")


@pytest.mark.parametrize("bareNewline", ["normalize", "reject"])
def test_bare_cr_in_a_header_field_is_a_space(relay, bareNewline: str) -> None:
    """A bare CR became CRLF, so "Subject: x<CR>Bcc: eve" was stored with a Bcc: field of the
    client's making; as Postfix (its cleanup's cleanup_replace_stray_cr_lf) it is a space.
    With bare_newline = "reject" too, which refused it: like Postfix's
    smtpd_forbid_bare_newline, that choice is about bare LF (a bare CR ends no line, RFC
    5321 2.3.8)."""
    message = sentToALegacyListener(
        relay, b"Subject: legacy\rBcc: eve@example.org\r\n\r\nbody\rCR\r\n", bareNewline)
    assert b"\r\nSubject: legacy Bcc: eve@example.org\r\n" in message
    assert b"\r\nBcc:" not in message and message.endswith(b"\r\n\r\nbody CR\r\n")
    assert message.count(b"\r") == message.count(b"\r\n")


def test_premature_close_queues_nothing(relay) -> None:
    r = relay()
    c = r.connect()
    c.readReply()
    c.send(b"EHLO x\r\n")
    c.readReply()
    c.send(b"MAIL FROM:<a@example.com>\r\nRCPT TO:<b@example.org>\r\nDATA\r\n")
    for _ in range(3):
        c.readReply()
    c.send(b"Subject: unfinished\r\n\r\n" + b"x" * 100000)
    time.sleep(0.3)
    port = c.sock.getsockname()[1]
    c.close()
    # The disconnect line names the session as the connect line does (address and port):
    # sessions from one address at once can be told apart.
    r.waitForLog(rf"connect from 127\.0\.0\.1:{port} on ")
    r.waitForLog(rf"disconnect from 127\.0\.0\.1:{port} .*client closed the connection")
    assert r.queued() == []
    assert list((r.spool / "tmp").iterdir()) == []


def test_restart_keeps_entries_and_cleans_partial_files(relay) -> None:
    r = relay()
    with smtplib.SMTP("127.0.0.1", r.port, timeout=10) as s:
        for i in range(3):
            s.sendmail("a@example.com", ["b@example.org"], b"Subject: %d\r\n\r\nbody\r\n" % i)
    ids = r.queued()
    assert len(ids) == 3
    before = {i: queuedMessage(r, i) for i in ids}
    r.kill9()
    # What a crash mid-write or mid-commit leaves behind:
    (r.spool / "tmp" / "0000000000000000ZZZZ.eml").write_bytes(b"partial")
    (r.spool / "queue" / "0000000000000001ZZZZ.eml").write_bytes(b"renamed body, envelope never committed")
    r.start()
    assert r.queued() == ids
    assert {i: queuedMessage(r, i) for i in ids} == before
    assert list((r.spool / "tmp").iterdir()) == []
    assert not (r.spool / "queue" / "0000000000000001ZZZZ.eml").exists()
    assert "spool " in r.log() and "3 queued entries" in r.log()


def test_replies_slow_down_past_the_soft_error_limit_on_the_wire(relay) -> None:
    """[limits] soft_errors and error_sleep_time (Postfix's smtpd_soft_error_limit and
    smtpd_error_sleep_time): after two errors each reply waits 0.4 s, and another client
    is served meanwhile (a timer, not a sleep)."""
    r = relay("[limits]\nsoft_errors = 2\nerror_sleep_time = 0.4\n")
    c = r.connect()
    c.readReply()
    c.send(b"EHLO x\r\n")
    c.readReply()
    waits = []
    for command in (b"FOO", b"FOO", b"FOO", b"NOOP"):
        start = time.monotonic()
        c.send(command + b"\r\n")
        assert c.readReply()[0][:3] in (b"500", b"250")
        waits.append(time.monotonic() - start)
    assert max(waits[:2]) < 0.3 and min(waits[2:]) >= 0.38, waits
    c.send(b"FOO\r\n")
    other = r.connect()  # (answered while the first session waits)
    start = time.monotonic()
    assert other.readReply()[0].startswith(b"220 ")
    other.send(b"NOOP\r\n")
    assert other.readReply() == [b"250 2.0.0 Ok"] and time.monotonic() - start < 0.3
    assert c.readReply() == [b"500 5.5.2 Error: command not recognized"]


def test_junk_commands_past_the_limit_end_the_session(relay) -> None:
    """[limits] junk_commands (Postfix's smtpd_junk_command_limit): a client that only
    repeats commands that never fail (NOOP, RSET...) was served until max_session_time; past
    the limit each one is an error, and the session ends with 421 at the error limit."""
    r = relay("[limits]\njunk_commands = 4\nerrors = 3\nerror_sleep_time = 0\n")
    c = r.connect()
    c.readReply()
    replies = []
    for command in (b"EHLO x", b"NOOP", b"RSET", b"VRFY <a@b.example>", b"NOOP", b"HELP",
                    b"NOOP", b"NOOP"):
        c.send(command + b"\r\n")
        replies.append(c.readReply()[-1][:3])
    assert replies == [b"250", b"250", b"250", b"252", b"250", b"214", b"250", b"421"]
    c.expectClosed()
    r.waitForLog(r"disconnect from 127\.0\.0\.1:\d+ messages=0 errors=3")


def test_recipients_past_the_overshoot_limit_end_the_session(relay) -> None:
    """[limits] recipient_overshoot (Postfix's smtpd_recipient_overshoot_limit): RCPTs past
    the recipient limit were refused (452) without end, each with a log line; past the
    overshoot limit each one is an error, and the session ends with 421 at the error limit."""
    r = relay("[limits]\nrecipients = 2\nrecipient_overshoot = 3\nerrors = 2\n"
              "error_sleep_time = 0\n")
    c = r.connect()
    c.readReply()
    c.send(b"EHLO x\r\n")
    c.readReply()
    c.send(b"MAIL FROM:<a@b.example>\r\n"
           + b"".join(b"RCPT TO:<r%d@d.example>\r\n" % i for i in range(100)))
    replies = [c.readReply()[0][:9] for _ in range(9)]
    assert replies == [b"250 2.1.0"] + [b"250 2.1.5"] * 2 + [b"452 4.5.3"] * 5 + [
        b"421 4.7.0"]
    c.expectClosed()
    r.waitForLog(r"disconnect from 127\.0\.0\.1:\d+ messages=0 errors=2")


def test_why_the_relay_closed_a_session_is_logged(relay) -> None:
    """Closing a session for too many errors, or for a line without end, said nothing in the
    log but the disconnect line; now it says why, as Postfix's "too many errors after RCPT
    from host[addr]"."""
    r = relay("[limits]\nerrors = 2\nerror_sleep_time = 0\n")
    c = r.connect()
    c.readReply()
    c.send(b"x" * 20000)
    assert c.readReply() == [b"421 4.7.0 relay.test Error: line too long, closing"]
    c.expectClosed()
    r.waitForLog(r"line too long \(more than 16384 octets without a line end\) from 127\.0\.0\.1, "
                 r"closing")
    c = r.connect()
    c.readReply()
    for command in (b"FOO", b"RCPT TO:<a@b.example>"):
        c.send(command + b"\r\n")
        c.readReply()
    assert c.readReply() == [b"421 4.7.0 relay.test Error: too many errors"]
    c.expectClosed()
    r.waitForLog(r"too many errors after RCPT from 127\.0\.0\.1, closing")


def test_commands_and_limits_on_the_wire(relay) -> None:
    r = relay("[limits]\nerrors = 3\nidle_timeout = 1\n")
    c = r.connect()
    c.readReply()
    replies = []
    for command in (b"RCPT TO:<a@b.example>", b"DATA", b"FOO"):
        c.send(command + b"\r\n")  # one at a time: no pipelining before EHLO
        replies.append(c.readReply())
    replies.append(c.readReply())
    assert replies == [
        [b"503 5.5.1 Error: need MAIL command"],
        [b"503 5.5.1 Error: need MAIL command"],
        [b"500 5.5.2 Error: command not recognized"],
        [b"421 4.7.0 relay.test Error: too many errors"],
    ]
    c.expectClosed()
    c = r.connect()
    c.readReply()
    start = time.monotonic()
    assert c.readReply() == [b"421 4.4.2 relay.test Error: timeout exceeded"]
    assert 0.5 < time.monotonic() - start < 5
    c.expectClosed()


def test_bad_configuration_stops_startup_with_a_clear_message(tmp_path: Path) -> None:
    config = tmp_path / "bad.toml"
    config.write_text("[limits]\nrecipients = \"ten\"\n")
    out = subprocess.run([TWISTD, "-n", "--pidfile=", "mailrelay", "--config", str(config)],
                         capture_output=True, text=True, cwd=tmp_path, timeout=60)
    assert out.returncode != 0
    assert f"{config}: limits.recipients" in out.stderr and "ten" in out.stderr
    config.write_text('[[recipient_validators]]\nplugin = "no-such-plugin"\n')
    out = subprocess.run([TWISTD, "-n", "--pidfile=", "mailrelay", "--config", str(config)],
                         capture_output=True, text=True, cwd=tmp_path, timeout=60)
    assert out.returncode != 0
    assert "recipient_validators[0].plugin" in out.stderr and "no-such-plugin" in out.stderr
    assert "recipient-map" in out.stderr  # lists what is installed
    out = subprocess.run([TWISTD, "-n", "--pidfile=", "mailrelay", "--listen", "tcp:0:interface=127.0.0.1", "--spool", "/proc/nope"],
                         capture_output=True, text=True, cwd=tmp_path, timeout=60)
    assert out.returncode != 0 and "spool directory /proc/nope" in out.stdout + out.stderr
    out = subprocess.run([TWISTD, "-n", "--pidfile=", "mailrelay", "--listen", "bogus:1"],
                         capture_output=True, text=True, cwd=tmp_path, timeout=60)
    assert out.returncode != 0 and "bogus:1" in out.stderr


def test_listen_failure_stops_startup(relay, tmp_path: Path) -> None:
    r = relay()
    out = subprocess.run([TWISTD, "-n", "--pidfile=", "mailrelay", "--listen", f"tcp:{r.port}:interface=127.0.0.1",
                          "--spool", str(tmp_path / "other")],
                         capture_output=True, text=True, cwd=tmp_path, timeout=60)
    assert out.returncode != 0
    assert f"--listen: cannot listen on tcp:{r.port}:interface=127.0.0.1" in out.stdout + out.stderr


def test_recipient_map_plugin_end_to_end(relay, tmp_path: Path) -> None:
    table = tmp_path / "recipients"
    table.write_text("alice@ours.example OK\n@ours.example REJECT\nbob@ours.example\n")
    r = relay(f'[relay]\naccept_domains = ["ours.example"]\nnetworks = []\n\n[[recipient_validators]]\nplugin = "recipient-map"\nfile = "{table}"\n')
    with smtplib.SMTP("127.0.0.1", r.port, timeout=10) as s:
        s.ehlo("client.example")
        s.mail("a@example.com")
        assert s.rcpt("alice@ours.example")[0] == 250
        assert s.rcpt("bob@ours.example")[0] == 250
        assert s.rcpt("carol@ours.example")[0] == 550
        assert s.rcpt("dave@elsewhere.example")[0] == 554


def test_example_site_plugin_from_its_own_dropin(relay, tmp_path: Path) -> None:
    example = REPO / "examples" / "sqlite-recipients"
    db = tmp_path / "users.db"
    with sqlite3.connect(db) as conn:
        conn.execute("CREATE TABLE recipients (address TEXT PRIMARY KEY, action TEXT)")
        conn.execute("CREATE TABLE domains (domain TEXT PRIMARY KEY)")
        conn.execute("INSERT INTO recipients VALUES ('alice@ours.example', 'OK')")
        conn.execute("INSERT INTO domains VALUES ('ours.example')")
    env = {"PYTHONPATH": os.pathsep.join([str(example), os.environ.get("PYTHONPATH", "")])}
    r = relay(f'[[recipient_validators]]\nplugin = "sqlite-recipients"\ndatabase = "{db}"\n', env=env)
    with smtplib.SMTP("127.0.0.1", r.port, timeout=10) as s:
        s.ehlo("client.example")
        s.mail("a@example.com")
        assert s.rcpt("alice@ours.example")[0] == 250
        assert s.rcpt("mallory@ours.example")[0] == 550
        assert s.rcpt("someone@other.example")[0] == 250  # not its domain: next in chain, accepted
