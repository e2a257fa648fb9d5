"""C{mailrelay-sendmail}, unit by unit: the command line, the input, the header processing of
local mail, the configuration it reads, the SMTP client against a scripted relay, the C{-bs}
pipe.  The end-to-end tests (real relay, real mail(1)) are in test_e2e_sendmail.py."""

from __future__ import annotations

import io
import os
import socket
import sys
import threading
import types
from pathlib import Path
from typing import Any

import pytest

from mailrelay.app import sendmail
from mailrelay.app.localmail import (
    MessageTooLarge,
    SubmitError,
    commandLineRecipients,
    parseMessage,
    prepareMessage,
    readInput,
    senderAddress,
)
from mailrelay.app.sendmail import (
    Envelope,
    LocalView,
    Options,
    SMTPPipe,
    UsageError,
    chooseListener,
    exitStatus,
    listenerAddress,
    parseArguments,
    runQueueCommand,
    submit,
)
from mailrelay.config import ConfigError, ListenerView, loadLocalView
from mailrelay.interfaces import Reply

# ---------------------------------------------------------------------------------------------
# The command line


def test_common_invocations() -> None:
    # mail(1) (bsd-mailx): -i -t; s-nail: -i -- rcpt...; cron: -FCronDaemon -i -B8BITMIME -oem
    o = parseArguments(["-i", "-t"])
    assert (o.action, o.extract, o.dotEnds, o.recipients) == ("send", True, False, [])
    o = parseArguments(["-i", "--", "a@example.org", "-b@example.org"])
    assert o.recipients == ["a@example.org", "-b@example.org"] and not o.dotEnds
    o = parseArguments(["-FCronDaemon", "-i", "-B8BITMIME", "-oem", "root"])
    assert (o.fullName, o.body, o.dotEnds, o.recipients) == ("CronDaemon", "8BITMIME", False,
                                                             ["root"])
    # PHP's default sendmail_path: "sendmail -t -i"; git send-email: -i -f addr rcpts
    o = parseArguments(["-i", "-f", "me@example.org", "you@example.org"])
    assert (o.sender, o.recipients) == ("me@example.org", ["you@example.org"])


def test_clusters_and_attached_values() -> None:
    o = parseArguments(["-tvfme@example.org", "-Fa b", "x@example.org"])
    assert o.extract and o.verbose and o.sender == "me@example.org" and o.fullName == "a b"
    o = parseArguments(["-ti", "-r", "r@example.org"])
    assert o.extract and not o.dotEnds and o.sender == "r@example.org"
    assert parseArguments(["-f", ""]).sender == ""
    assert parseArguments(["-oi"]).dotEnds is False
    assert parseArguments(["-o", "i"]).dotEnds is False
    assert parseArguments(["-OIgnoreDots=true"]).dotEnds is False
    assert parseArguments(["-OIgnoreDots=false"]).dotEnds is True


def test_options_end_at_the_first_recipient() -> None:
    # POSIX getopt, as Postfix calls it: "-f" after a recipient is a recipient.
    o = parseArguments(["a@example.org", "-f", "x"])
    assert o.recipients == ["a@example.org", "-f", "x"] and o.sender is None


def test_ignored_options() -> None:
    o = parseArguments(["-oem", "-odb", "-oQ/var/spool", "-h", "20", "-n", "-U", "-G", "-m",
                        "-L", "tag", "-X", "/tmp/log", "-Am", "-d0.1", "-e", "m", "-p", "smtp",
                        "a@example.org"])
    assert o == Options(recipients=["a@example.org"])


def test_modes_and_queue_options() -> None:
    assert parseArguments(["-bs"]).action == "smtp"
    assert parseArguments(["-bm", "x"]).action == "send"
    assert parseArguments(["-bp"]).action == "list"
    assert parseArguments([], "/usr/bin/mailq").action == "list"
    assert parseArguments([], "newaliases").action == "newaliases"
    assert parseArguments(["-bi"]).action == "newaliases"
    assert parseArguments(["-I"]).action == "newaliases"
    o = parseArguments(["-q"])
    assert (o.action, o.flush) == ("flush", [])
    o = parseArguments(["-qRexample.org"])
    assert (o.action, o.flush) == ("flush", ["--domain", "example.org"])
    o = parseArguments(["-qS@example.org"])
    assert o.flush == ["--domain", "example.org"]
    o = parseArguments(["-qI01K1ABC"])
    assert o.flush == ["01K1ABC"]
    assert parseArguments(["-q30m"]).action == "nothing"
    assert parseArguments(["--config=/etc/r.toml"]).config == "/etc/r.toml"
    assert parseArguments(["--config", "/etc/r.toml"]).config == "/etc/r.toml"
    assert parseArguments(["-C/etc/r.toml"]).config == "/etc/r.toml"
    assert parseArguments(["--help"]).action == "help"


def test_dsn_options() -> None:
    o = parseArguments(["-N", "success,delay", "-R", "hdrs", "-V", "id 1+", "x"])
    assert (o.notify, o.ret, o.envid) == ("SUCCESS,DELAY", "HDRS", "id+201+2B")
    assert parseArguments(["-Nnever"]).notify == "NEVER"


@pytest.mark.parametrize("argv, message", [
    (["-k"], "unknown option -k"),
    (["-f"], "option -f needs a value"),
    (["--frobnicate"], "unknown option --frobnicate"),
    (["-bv", "x"], "-bv is not supported"),
    (["-bz"], "unknown mode -bz"),
    (["-Nnever,success"], "-N takes never"),
    (["-Rall"], "-R takes full or hdrs"),
    (["-B", "BINARYMIME"], "-B takes 7BIT or 8BITMIME"),
    (["-qR"], "-qR needs a domain"),
    (["-qX"], "unknown queue option -qX"),
    (["-V", "\x01"], "bad envelope id"),
    (["--config"], "--config needs a file name"),
])
def test_bad_command_lines(argv: list[str], message: str) -> None:
    with pytest.raises(UsageError, match=message.replace("+", r"\+")):
        parseArguments(argv)


def test_main_reports_usage_errors(capsys: pytest.CaptureFixture[str]) -> None:
    assert sendmail.main(["-k"]) == os.EX_USAGE
    err = capsys.readouterr().err
    assert err.startswith("mailrelay-sendmail: unknown option -k\nusage: mailrelay-sendmail")


# ---------------------------------------------------------------------------------------------
# The input


def read(data: bytes, dotEnds: bool = True, limit: int = 10**6) -> list[bytes]:
    return readInput(io.BytesIO(data), dotEnds=dotEnds, limit=limit)


def test_a_single_dot_ends_the_input_unless_i() -> None:
    data = b"Subject: x\n\nbody\n..two\n.\nafter\n"
    assert read(data) == [b"Subject: x", b"", b"body", b"..two"]
    assert read(data, dotEnds=False) == [b"Subject: x", b"", b"body", b"..two", b".", b"after"]
    assert read(b"a\r\n.\r\nb\r\n") == [b"a"]
    assert read(b"a\n.") == [b"a"]


def test_the_dot_ends_the_input_without_waiting_for_its_end() -> None:
    # An interactive user types "." and sendmail goes on: nothing after it is read.
    stream = io.BytesIO(b"hello\n.\n")

    class Endless(io.RawIOBase):
        def readline(self, size: int = -1) -> bytes:
            line = stream.readline(size)
            if not line:
                raise AssertionError("read past the dot")
            return line

    assert readInput(Endless(), dotEnds=True, limit=100) == [b"hello"]  # type: ignore[arg-type]


def test_line_ends() -> None:
    # LF ends a line, with every CR before it dropped (Postfix's sendmail_fix_line_endings);
    # a CR alone stays in its line (the body cuts it there: see prepareMessage).
    assert read(b"a\r\nb\nc\rd\n", dotEnds=False) == [b"a", b"b", b"c\rd"]
    assert read(b"a\r\r\nb\r\r\r\n\r\r\n", dotEnds=False) == [b"a", b"b", b""]
    assert read(b"a\r\r\n.\r\r\nafter\n") == [b"a"]
    assert read(b"a\r\n.\r\r") == [b"a"]
    assert read(b"ends in a CR\r", dotEnds=False) == [b"ends in a CR"]
    assert read(b"no end", dotEnds=False) == [b"no end"]
    assert read(b"", dotEnds=False) == []
    long = b"x" * 200_000 + b"\n.\n"
    assert read(long) == [b"x" * 200_000]


def test_input_over_the_size_limit_is_refused() -> None:
    with pytest.raises(SubmitError) as e:
        read(b"x" * 101, dotEnds=False, limit=100)
    assert e.value.status == os.EX_DATAERR and "at most 100 octets" in e.value.message
    assert read(b"x" * 100, dotEnds=False, limit=100) == [b"x" * 100]


@pytest.mark.parametrize("dotEnds", [False, True])
def test_input_over_the_size_limit_can_still_be_saved(dotEnds: bool) -> None:
    """The refusal carries the whole message, read on only when it is saved: the lines read
    until the limit, then the rest of the input (to its end, or to the lone dot) line by
    line, CRLF cut across reads kept one line end."""
    data = b"Subject: big\r\n\r\n" + b"".join(b"line %d\r\n" % n for n in range(3000))
    with pytest.raises(MessageTooLarge) as e:
        read(data + b".\r\nafter\r\n", dotEnds=dotEnds, limit=1000)
    assert e.value.status == os.EX_DATAERR
    whole = [*e.value.lines, *e.value.rest]
    expected = [b"Subject: big", b""] + [b"line %d" % n for n in range(3000)]
    assert whole == (expected if dotEnds else expected + [b".", b"after"])
    # CR CR LF line ends, cut across reads anywhere, are one line end each.
    with pytest.raises(MessageTooLarge) as e:
        read(data.replace(b"\r\n", b"\r\r\n"), dotEnds=dotEnds, limit=1000)
    assert [*e.value.lines, *e.value.rest] == expected


# ---------------------------------------------------------------------------------------------
# The message


def test_parse_message() -> None:
    m = parseMessage([b"From alice Mon Jan 1 00:00:00 2024", b"Subject: a", b" folded",
                      b"To : b@example.org", b"", b"body", b""])
    assert [(h.name, h.lines) for h in m.headers] == [
        ("Subject", [b"Subject: a", b" folded"]), ("To", [b"To : b@example.org"])]
    assert m.headers[0].value == "a folded" and m.separated and m.body == [b"body", b""]
    m = parseMessage([b"hello world", b"Subject: not a header"])
    assert m.headers == [] and m.body == [b"hello world", b"Subject: not a header"]
    m = parseMessage([b"Subject: x", b"no colon here"])
    assert len(m.headers) == 1 and not m.separated and m.body == [b"no colon here"]


def prepare(text: str, recipients: tuple[str, ...] = (), extract: bool = True,
            sender: str = "alice@relay.test", fullName: str | None = None) -> tuple[list[str], str]:
    lines = read(text.encode("utf-8"), dotEnds=False)
    result = prepareMessage(lines, recipients=list(recipients), extract=extract, sender=sender,
                            fullName=fullName, hostname="relay.test", uid=1000, now=0.0)
    content = result.content.decode("utf-8")
    assert "\n" not in content.replace("\r\n", "")
    return list(result.recipients), content.replace("\r\n", "\n")


def headerSection(content: str) -> list[str]:
    return content.split("\n\n", 1)[0].split("\n")


def test_t_takes_to_cc_bcc_and_removes_bcc() -> None:
    rcpts, content = prepare(
        "To: Bob <bob@example.org>, carol@example.org\nCc: dave@example.net\n"
        "Bcc: eve@example.com,\n  Frank <frank@example.com>\nSubject: hi\n\nBcc: body line\n")
    assert rcpts == ["bob@example.org", "carol@example.org", "dave@example.net",
                     "eve@example.com", "frank@example.com"]
    head = headerSection(content)
    assert head[0] == "Received: by relay.test (mailrelay-sendmail, from userid 1000);"
    assert head[1].startswith("\t") and head[2:] == [
        "To: Bob <bob@example.org>, carol@example.org", "Cc: dave@example.net", "Subject: hi",
        "From: alice@relay.test"]
    assert content.endswith("\n\nBcc: body line\n")
    assert "eve" not in content and "frank" not in content.lower()


def test_stray_carriage_returns_do_not_end_the_header_section() -> None:
    """Lines ended by CR CR LF, or a CR alone within a field, left the rest of the header
    section in the body: its Bcc: shown to every recipient and its address not one of
    them.  Postfix's sendmail drops every CR before the LF and keeps a lone one in its
    line; a lone CR within a field becomes a space here, and in the body still ends a
    line (cron's progress meters)."""
    lines = read(b"To: a@example.org\r\r\nSubject: 50%\rdone\r\r\n"
                 b"Bcc: secret@example.org\r\r\n\r\r\nbody 10%\r20%\r\r\n", dotEnds=False)
    result = prepareMessage(lines, recipients=[], extract=True, sender="alice@relay.test",
                            fullName=None, hostname="relay.test", uid=1000, now=0.0)
    assert result.recipients == ("a@example.org", "secret@example.org")
    head, body = result.content.split(b"\r\n\r\n", 1)
    assert b"secret" not in result.content and b"\r" not in head.replace(b"\r\n", b"")
    assert b"\r\nSubject: 50% done\r\n" in head
    assert body == b"body 10%\r\n20%\r\n"


def test_t_adds_to_the_command_line_recipients_once() -> None:
    rcpts, _ = prepare("To: a@example.org, b@example.org\n\nx\n",
                       recipients=("b@example.org", "c@example.org"))
    assert rcpts == ["b@example.org", "c@example.org", "a@example.org"]


def test_without_t_the_header_gives_no_recipients_and_bcc_still_goes() -> None:
    rcpts, content = prepare("To: a@example.org\nBcc: hidden@example.org\n\nx\n",
                             recipients=("c@example.org",), extract=False)
    assert rcpts == ["c@example.org"] and "hidden" not in content


def test_resent_fields_are_used_when_present() -> None:
    rcpts, content = prepare(
        "From: orig@example.org\nTo: old@example.org\nResent-To: new@example.org\n"
        "Resent-Bcc: secret@example.org\n\nx\n")
    assert rcpts == ["new@example.org", "secret@example.org"]
    head = headerSection(content)
    assert "Resent-From: alice@relay.test" in head and "From: orig@example.org" in head
    assert not any("secret" in line for line in head)


def test_resent_recipients_only_when_there_are_resent_recipient_fields() -> None:
    """Postfix's sendmail takes the Resent- recipients only when there is a Resent-To:,
    -Cc: or -Bcc:; other Resent- fields (a redirect whose Resent-Bcc: is gone) leave the
    To:, Cc: and Bcc: recipients, where the message was refused for having none."""
    rcpts, content = prepare(
        "From: orig@example.org\nTo: carol@example.org\nResent-From: bob@example.org\n"
        "Resent-Date: Mon, 1 Jan 2024 00:00:00 +0000\nResent-Message-Id: <r@example.org>\n"
        "\nx\n")
    assert rcpts == ["carol@example.org"]
    head = headerSection(content)
    assert "Resent-From: bob@example.org" in head and "From: orig@example.org" in head
    assert not any(line.startswith("From: alice") for line in head)


def test_from_added_with_the_full_name_only_when_missing() -> None:
    _, content = prepare("Subject: x\n\nbody\n", recipients=("a@example.org",),
                         fullName="Alice Q. Liddell")
    assert 'From: "Alice Q. Liddell" <alice@relay.test>' in headerSection(content)
    _, content = prepare("Subject: x\n\nbody\n", recipients=("a@example.org",),
                         fullName="Jörg")
    assert "From: =?utf-8?b?SsO2cmc=?= <alice@relay.test>" in headerSection(content)
    _, content = prepare("From: Me <me@example.org>\n\nbody\n", recipients=("a@example.org",),
                         fullName="Ignored")
    assert [h for h in headerSection(content) if h.startswith("From")] == [
        "From: Me <me@example.org>"]
    _, content = prepare("Subject: x\n\n", recipients=("a@example.org",), sender="")
    assert "From: MAILER-DAEMON@relay.test" in headerSection(content)
    # An SMTPUTF8 sender (-f) is written as it is (RFC 6532), which formataddr refused.
    _, content = prepare("Subject: x\n\n", recipients=("a@example.org",),
                         sender="sénder@example.org", fullName="Jörg")
    assert "From: =?utf-8?b?SsO2cmc=?= <sénder@example.org>" in headerSection(content)


def test_addresses_without_domain_get_the_relays_hostname() -> None:
    # cron: "To: root" and "From: root (Cron Daemon)"; Postfix's myorigin.
    rcpts, content = prepare("From: root (Cron Daemon)\nTo: root\nSubject: cron\n\nout\n")
    assert rcpts == ["root@relay.test"]
    head = headerSection(content)
    assert "From: root@relay.test (Cron Daemon)" in head and "To: root@relay.test" in head
    assert commandLineRecipients(["bob", "x@example.org, Y <y@example.org>"], "relay.test") == [
        "bob@relay.test", "x@example.org", "y@example.org"]


@pytest.mark.parametrize(
    "field, written",
    [
        # Only the address tokens change, as Postfix's cleanup rewrites them: groups,
        # comments, display names, quoting and spacing stay as written.
        ("Cc: Friends: c@example.org, dave;", "Cc: Friends: c@example.org, dave@relay.test;"),
        ("To: x@example.org, Group: a, b@example.org;",
         "To: x@example.org, Group: a@relay.test, b@example.org;"),
        ("Cc: alice (the boss)", "Cc: alice@relay.test (the boss)"),
        ('To: "J. Doe, Jr." <jdoe>, <root> (ops)',
         'To: "J. Doe, Jr." <jdoe@relay.test>, <root@relay.test> (ops)'),
        ('Reply-To: "quoted local", undisclosed:;',
         'Reply-To: "quoted local"@relay.test, undisclosed:;'),
        ("To: a,\n b (folded\n  comment)", "To: a@relay.test,\n b@relay.test (folded\n  comment)"),
        ("To: a (x, y: z;), b@example.org", "To: a@relay.test (x, y: z;), b@example.org"),
    ],
)
def test_addresses_are_qualified_where_they_stand(field: str, written: str) -> None:
    _, content = prepare(f"Bcc: z@example.org\n{field}\nSubject: s\n\nbody\n")
    assert f"\n{written}\n" in content, content


def test_a_message_without_header_gets_one() -> None:
    rcpts, content = prepare("just text\nmore\n", recipients=("a@example.org",))
    head, body = content.split("\n\n", 1)
    assert head.split("\n")[-1] == "From: alice@relay.test" and body == "just text\nmore\n"
    # a header running into the body gets its empty line
    _, content = prepare("Subject: s\nnot a field\n", recipients=("a@example.org",))
    assert content.endswith("Subject: s\nFrom: alice@relay.test\n\nnot a field\n")


def test_long_lines_are_broken() -> None:
    _, content = prepare("Subject: x\n\n" + "y" * 2500 + "\n", recipients=("a@example.org",))
    body = content.split("\n\n", 1)[1].split("\n")
    assert [len(line) for line in body] == [998, 998, 506, 0]
    assert body[1].startswith(" y") and "".join(body).replace(" ", "") == "y" * 2500


def test_no_recipients() -> None:
    with pytest.raises(SubmitError, match="no recipient addresses found") as e:
        prepare("To: undisclosed-recipients:;\n\nx\n")
    assert e.value.status == os.EX_USAGE


def test_bad_addresses() -> None:
    with pytest.raises(SubmitError, match="bad recipient address .* in the To: field") as e:
        prepare("To: a@b@c\n\nx\n")
    assert e.value.status == os.EX_DATAERR
    with pytest.raises(SubmitError, match="bad recipient address") as e:
        commandLineRecipients(["a@"], "relay.test")
    assert senderAddress("<>", "relay.test") == "" and senderAddress("", "relay.test") == ""
    assert senderAddress("bob", "relay.test") == "bob@relay.test"
    assert senderAddress("Bob <bob@Example.ORG>", "relay.test") == "bob@example.org"
    with pytest.raises(SubmitError, match="bad sender address") as e:
        senderAddress("a b c@", "relay.test")
    assert e.value.status == os.EX_USAGE


@pytest.mark.parametrize(
    "text, quoted",
    [
        # Python's getaddresses made these other addresses: '<a@@b>' became 'b' (then
        # b@relay.test: mail to somebody else), 'a b c' became 'a', 'a@@b' became '@b'.
        ("<a@@b>", "a@@b"),
        ("a b c", "a b c"),
        ("a@@b", "a@@b"),
        ("ok@example.org, <x@@y>", "x@@y"),
        ('"unbalanced <a@b>', '"unbalanced <a@b>'),
    ],
)
def test_bad_addresses_are_refused_as_written(text: str, quoted: str) -> None:
    """An address that does not parse is refused, quoted as written, never read as another
    address (on the command line and in the header with -t)."""
    with pytest.raises(SubmitError) as e:
        commandLineRecipients([text], "relay.test")
    assert f"{quoted!r}" in e.value.message, e.value.message
    with pytest.raises(SubmitError) as e:
        prepare(f"To: {text}\n\nx\n")
    assert f"{quoted!r}" in e.value.message and "To:" in e.value.message, e.value.message


def test_address_lists() -> None:
    assert commandLineRecipients(
        ['a@example.org, Bob <b@example.org>, "x, y" <c@example.org>, d (comment), '
         "team: e@example.org, f;, undisclosed-recipients:;"], "relay.test") == [
        "a@example.org", "b@example.org", "c@example.org", "d@relay.test", "e@example.org",
        "f@relay.test"]


# ---------------------------------------------------------------------------------------------
# The configuration it reads, and the listener it picks


def test_local_view_defaults() -> None:
    view = loadLocalView(None)
    assert view.source is None and view.maxMessageSize == 10240000
    assert view.listeners == (ListenerView("tcp:2525:interface=127.0.0.1"),)


def test_local_view_reads_nothing_else(tmp_path: Path) -> None:
    # The certificate, the password file and the spool named here are not read (the user
    # running sendmail may not read them): only the keys the command needs are.
    path = tmp_path / "relay.toml"
    path.write_text(
        'hostname = "Relay.Example.ORG"\n[limits]\nmessage_size = 5000\n'
        '[spool]\ndirectory = "/nonexistent/unwritable"\n[auth]\npassword_file = "nope"\n'
        '[[listeners]]\nendpoint = "tcp:465"\nmode = "submissions"\ntls_certificate = "x.pem"\n'
        '[[listeners]]\nendpoint = "tcp:25"\nproxy_protocol = true\n'
        '[[listeners]]\nendpoint = "tcp:2526"\ntls_mode = "starttls"\ntls_certificate = "x"\n')
    view = loadLocalView(path)
    assert (view.hostname, view.maxMessageSize) == ("relay.example.org", 5000)
    assert view.spoolDirectory == "/nonexistent/unwritable"  # (its name only: not checked)
    assert view.listeners == (ListenerView("tcp:465", "submissions", None, False),
                              ListenerView("tcp:25", "relay", None, True),
                              ListenerView("tcp:2526", "relay", "starttls", False))
    listener, address = chooseListener(view)
    assert listener.endpoint == "tcp:2526" and address.text == "127.0.0.1:2526"


@pytest.mark.parametrize("text, message", [
    ('hostnme = "x"\n', 'unknown key "hostnme" (did you mean "hostname"?)'),
    ("[[listeners]]\nmode = \"relay\"\n", "listeners[0].endpoint: is required"),
    ("[[listeners]]\nendpoint = \"tcp:25\"\nmode = \"mx\"\n", "listeners[0].mode: must be"),
    ("listeners = []\n", "at least one listener is needed"),
    ("[limits]\nmessage_size = \"big\"\n", "limits.message_size"),
])
def test_local_view_errors(tmp_path: Path, text: str, message: str) -> None:
    path = tmp_path / "relay.toml"
    path.write_text(text)
    with pytest.raises(ConfigError) as e:
        loadLocalView(path)
    assert message in str(e.value) and str(path) in str(e.value)


def test_listener_addresses() -> None:
    assert listenerAddress("tcp:25").text == "127.0.0.1:25"
    assert listenerAddress("tcp:25:interface=0.0.0.0").address == ("127.0.0.1", 25)
    assert listenerAddress("tcp:2525:interface=192.0.2.7").text == "192.0.2.7:2525"
    six = listenerAddress(r"tcp6:25:interface=\:\:")
    assert six.family == socket.AF_INET6 and six.text == "[::1]:25"
    unix = listenerAddress("unix:/run/mailrelay/smtp.sock")
    assert unix.family == socket.AF_UNIX and unix.address == "/run/mailrelay/smtp.sock"
    assert listenerAddress("tcp:0:interface=127.0.0.1") is None


def test_no_usable_listener() -> None:
    view = LocalView("/etc/r.toml", "relay.test", 1000,
                     (ListenerView("tcp:587", "submission"), ListenerView("tcp:0")))
    with pytest.raises(SubmitError) as e:
        chooseListener(view)
    assert e.value.status == os.EX_CONFIG and e.value.message.startswith(
        "/etc/r.toml: no listener to submit to")


# ---------------------------------------------------------------------------------------------
# Exit statuses


@pytest.mark.parametrize("code, enhanced, stage, status", [
    (421, "4.3.2", "greeting", os.EX_TEMPFAIL),
    (451, "4.3.0", "DATA", os.EX_TEMPFAIL),
    (554, "", "greeting", os.EX_UNAVAILABLE),
    (550, "5.1.1", "RCPT", os.EX_NOUSER),
    (550, "5.1.2", "RCPT", os.EX_NOHOST),
    (553, "5.1.7", "MAIL", os.EX_DATAERR),
    (554, "5.7.1", "RCPT", os.EX_NOPERM),
    (552, "5.3.4", "DATA", os.EX_DATAERR),
    (550, "5.6.0", "DATA", os.EX_DATAERR),
    (500, "5.5.2", "MAIL", os.EX_PROTOCOL),
    (554, "5.4.6", "DATA", os.EX_UNAVAILABLE),
])
def test_exit_statuses(code: int, enhanced: str, stage: str, status: int) -> None:
    assert exitStatus(Reply(code, enhanced, "x"), stage) == status


# ---------------------------------------------------------------------------------------------
# The SMTP client, against a scripted relay


class ScriptedRelay:
    """The relay's side of a socket pair, in a thread: answers each command by the first
    entry of C{answers} whose prefix it starts with, records what it got."""

    def __init__(self, answers: dict[str, list[str]], greeting: str = "220 relay.test ESMTP"):
        self.ours, self.theirs = socket.socketpair()
        self.answers = answers
        self.greeting = greeting
        self.commands: list[str] = []
        self.messages: list[bytes] = []
        self.thread = threading.Thread(target=self._serve, daemon=True)
        self.thread.start()

    def connector(self, view: LocalView) -> tuple[socket.socket, str]:
        return self.theirs, "the scripted relay"

    def _serve(self) -> None:
        f = self.ours.makefile("rb")
        send = lambda text: self.ours.sendall(text.encode() + b"\r\n")  # noqa: E731
        send(self.greeting)
        while line := f.readline():
            command = line.decode().rstrip("\r\n")
            self.commands.append(command)
            if command == "DATA":
                send("354 go ahead")
                data = b""
                while (line := f.readline()) != b".\r\n":
                    data += line
                self.messages.append(data)
                command = "."
                self.commands.append(command)
            for prefix, replies in self.answers.items():
                if command.startswith(prefix):
                    reply = replies.pop(0) if len(replies) > 1 else replies[0]
                    if reply == "CLOSE":  # the connection lost, no answer
                        self.ours.close()
                        return
                    send(reply)
                    break
            else:
                send("250 2.0.0 Ok")
            if command == "QUIT":
                break
        self.ours.close()


VIEW = LocalView(None, "relay.test", 1000, (ListenerView("tcp:2525"),))


def submission(recipients: list[str], content: bytes = b"Subject: x\r\n\r\n.dot\r\n"):
    from mailrelay.app.localmail import Submission
    return Submission(tuple(recipients), content)


def test_submit_dialogue() -> None:
    relay = ScriptedRelay({"EHLO": ["250-relay.test\r\n250-SIZE 1000\r\n250 8BITMIME"],
                           ".": ["250 2.0.0 Ok: queued as ABC"]})
    transcript = io.StringIO()
    last = submit(VIEW, Envelope("a@relay.test", notify="NEVER", ret="HDRS", envid="e1"),
                  submission(["b@example.org"], "Subject: é\r\n\r\n.dot\r\n".encode()),
                  transcript, relay.connector)
    relay.thread.join(5)
    assert last == "250 2.0.0 Ok: queued as ABC"
    assert relay.commands == [
        "EHLO relay.test", "MAIL FROM:<a@relay.test> SIZE=21 BODY=8BITMIME RET=HDRS ENVID=e1",
        "RCPT TO:<b@example.org> NOTIFY=NEVER", "DATA", ".", "QUIT"]
    assert relay.messages == ["Subject: é\r\n\r\n..dot\r\n".encode()]
    assert ">>> MAIL FROM:<a@relay.test>" in transcript.getvalue()
    assert "250-SIZE 1000\n" in transcript.getvalue()


def test_a_refused_recipient_sends_nothing() -> None:
    relay = ScriptedRelay({"RCPT TO:<bad": ["550 5.1.1 no such user"]})
    with pytest.raises(SubmitError) as e:
        submit(VIEW, Envelope("a@relay.test"),
               submission(["good@example.org", "bad@example.org"]), None, relay.connector)
    relay.thread.join(1)
    assert e.value.status == os.EX_NOUSER
    assert e.value.message == ("<bad@example.org> refused: 550 5.1.1 no such user\n"
                               "nothing was sent")
    assert "DATA" not in relay.commands and relay.commands[-1] == "RSET"


def test_too_many_recipients_go_in_several_transactions() -> None:
    relay = ScriptedRelay({"RCPT TO:<r3": ["452 4.5.3 Error: too many recipients", "250 Ok"],
                           ".": ["250 2.0.0 Ok: queued as A", "250 2.0.0 Ok: queued as B"]})
    last = submit(VIEW, Envelope(""), submission([f"r{n}@example.org" for n in range(1, 5)]),
                  None, relay.connector)
    relay.thread.join(5)
    assert last == "250 2.0.0 Ok: queued as B" and len(relay.messages) == 2
    rcpts = [c for c in relay.commands if c.startswith(("RCPT", "MAIL", "."))]
    assert rcpts == ["MAIL FROM:<>", "RCPT TO:<r1@example.org>", "RCPT TO:<r2@example.org>",
                     "RCPT TO:<r3@example.org>", ".", "MAIL FROM:<>", "RCPT TO:<r3@example.org>",
                     "RCPT TO:<r4@example.org>", "."]


@pytest.mark.parametrize("lost, said", [
    ("MAIL", "the message was sent to r1@example.org, r2@example.org only"),
    (".", "the message was sent to r1@example.org, r2@example.org; the relay may also have "
          "accepted it for r3@example.org, r4@example.org (the connection ended before its "
          "answer)"),
])
def test_a_connection_lost_after_some_recipients_says_which_were_sent(
    lost: str, said: str
) -> None:
    """The relay takes two recipients of four (452 4.5.3), the message goes to them, and the
    connection is lost in the second transaction: the error says which recipients the
    message went to (and, lost after the end of data, which it may have gone to), as a
    refusal there does.  It said only that the connection was lost: the user, sending the
    whole message again, sent it twice to those."""
    relay = ScriptedRelay({"RCPT TO:<r3": ["452 4.5.3 Error: too many recipients", "250 Ok"],
                           lost: ["250 2.0.0 Ok: queued as A", "CLOSE"]})
    with pytest.raises(SubmitError) as e:
        sendmail.RelaySession(VIEW, None, relay.connector).submit(
            Envelope(""), submission([f"r{n}@example.org" for n in range(1, 5)]))
    relay.thread.join(5)
    assert e.value.status == os.EX_TEMPFAIL
    assert e.value.message == (
        "connection to the relay at the scripted relay lost: the relay closed the connection\n"
        + said)


def test_an_interruption_after_some_recipients_says_which_were_sent(monkeypatch) -> None:
    """Ctrl-C (or a bug) in the second transaction, after the message went to the first
    recipients: the error says to which (it printed "interrupted; nothing was sent")."""
    relay = ScriptedRelay({"RCPT TO:<r3": ["452 4.5.3 Error: too many recipients", "250 Ok"]})
    command = sendmail.RelayClient.command
    mails = []

    def interrupted(self: Any, line: str, timeout: float = 1.0) -> Any:
        if line.startswith("MAIL"):
            mails.append(line)
            if len(mails) == 2:
                raise KeyboardInterrupt
        return command(self, line)

    monkeypatch.setattr(sendmail.RelayClient, "command", interrupted)
    session = sendmail.RelaySession(VIEW, None, relay.connector)
    with pytest.raises(SubmitError) as e:
        session.submit(Envelope(""), submission([f"r{n}@example.org" for n in range(1, 5)]))
    session.close()
    assert e.value.status == os.EX_TEMPFAIL
    assert e.value.message == (
        "interrupted\nthe message was sent to r1@example.org, r2@example.org only")


@pytest.mark.parametrize("answers, greeting, status, message", [
    ({}, "421 4.3.2 relay.test Service shutting down", os.EX_TEMPFAIL, "refused the connection"),
    ({"MAIL": ["451 4.3.0 try later"]}, "220 x", os.EX_TEMPFAIL, "sender <a@relay.test> refused"),
    ({".": ["552 5.3.4 too big"]}, "220 x", os.EX_DATAERR, "the message was refused: 552"),
])
def test_refusals(answers: dict, greeting: str, status: int, message: str) -> None:
    relay = ScriptedRelay(answers, greeting)
    with pytest.raises(SubmitError) as e:
        submit(VIEW, Envelope("a@relay.test"), submission(["b@example.org"]), None,
               relay.connector)
    assert e.value.status == status and message in e.value.message


def test_relay_closing_midway_is_a_temporary_failure() -> None:
    opened = []

    def connector(view: LocalView) -> tuple[socket.socket, str]:
        ours, theirs = socket.socketpair()
        ours.sendall(b"220 x\r\n")
        ours.close()
        opened.append(theirs)
        return theirs, "here"

    with pytest.raises(SubmitError) as e:
        submit(VIEW, Envelope("a@relay.test"), submission(["b@example.org"]), None, connector)
    assert e.value.status == os.EX_TEMPFAIL and "lost" in e.value.message
    assert len(opened) == 2  # opened again once


def test_a_connection_gone_while_the_input_came_is_opened_again() -> None:
    # The session is opened before the input is read; the relay may time it out meanwhile.
    first = ScriptedRelay({"EHLO": ["421 4.4.2 relay.test Error: timeout exceeded"]})
    second = ScriptedRelay({".": ["250 2.0.0 Ok: queued as B"]})
    relays = [first, second]
    session = sendmail.RelaySession(VIEW, None, lambda view: relays.pop(0).connector(view))
    session.open()
    assert session.submit(Envelope("a@relay.test"), submission(["b@example.org"])) == (
        "250 2.0.0 Ok: queued as B")
    session.close()
    second.thread.join(5)
    assert len(second.messages) == 1 and first.commands == ["EHLO relay.test"]


def test_dead_letter(tmp_path: Path) -> None:
    said = sendmail.saveDeadLetter([b"Subject: x", b"", b"From here", b">From there"],
                                   "a@relay.test", {"HOME": str(tmp_path)}, os.getuid())
    path = tmp_path / "dead.letter"
    assert said == f"the message was saved in {path}"
    text = path.read_bytes()
    assert text.startswith(b"From a@relay.test ") and text.endswith(
        b"\nSubject: x\n\n>From here\n>>From there\n\n")
    assert path.stat().st_mode & 0o777 == 0o600
    said = sendmail.saveDeadLetter([b"x"], "", {"HOME": str(tmp_path / "none")}, os.getuid())
    assert said.startswith("the message could not be saved in ") and "No such file" in said


def test_an_unexpected_error_after_reading_keeps_the_message(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Whatever goes wrong once the message is read, it is saved in dead.letter (a crash
    lost it) and the command exits with EX_SOFTWARE, saying what happened."""

    class Session:
        hostname = None  # (the greeting's)

        def __init__(self, view: LocalView, verbose: object) -> None:
            pass

        def open(self) -> None:
            pass

        def submit(self, envelope: Envelope, submission: object) -> str:
            raise RuntimeError("a bug")

        def close(self) -> None:
            pass

    monkeypatch.setattr(sendmail, "loadLocalView", lambda config: VIEW)
    monkeypatch.setattr(sendmail, "RelaySession", Session)
    with pytest.raises(SubmitError) as e:
        sendmail.run(Options(recipients=["b@example.org"]), io.BytesIO(b"Subject: x\n\nkept\n"),
                     io.StringIO(), {"HOME": str(tmp_path)})
    assert e.value.status == os.EX_SOFTWARE
    assert e.value.message.split("\n") == [
        "internal error: RuntimeError('a bug')",
        f"the message was saved in {tmp_path}/dead.letter"]
    assert (tmp_path / "dead.letter").read_bytes().endswith(b"\nSubject: x\n\nkept\n\n")


@pytest.mark.parametrize(
    "greeting, domain",
    [
        ("220 running.test ESMTP mailrelay", "running.test"),  # the running relay's name
        ("220 Running.Test.", "running.test"),
        ("220 [127.0.0.1] ESMTP", "relay.test"),  # no host name: the file's
        ("220", "relay.test"),
    ],
)
def test_bare_names_get_the_running_relays_hostname(
        greeting: str, domain: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A name without a domain (C{-f root}, C{root} as a recipient, in C{To:}) is qualified
    with the host name the relay's greeting gives (its C{hostname}, also when C{--hostname}
    set it), as Postfix's cleanup appends the running system's C{myorigin}: the file's
    C{hostname} (C{relay.test} here) only when the greeting gives none."""
    relay = ScriptedRelay({}, greeting=greeting)
    monkeypatch.setattr(sendmail, "loadLocalView", lambda config: VIEW)
    session = sendmail.RelaySession
    monkeypatch.setattr(sendmail, "RelaySession",
                        lambda view, verbose: session(view, verbose, relay.connector))
    sendmail.run(Options(sender="root", recipients=["bob"]),
                 io.BytesIO(b"To: carol\n\nHi\n"), io.StringIO(), {"HOME": str(tmp_path)})
    relay.thread.join(5)
    assert relay.commands[1:3] == [f"MAIL FROM:<root@{domain}>", f"RCPT TO:<bob@{domain}>"]
    (content,) = relay.messages
    assert f"Received: by {domain} (mailrelay-sendmail".encode() in content
    assert f"To: carol@{domain}\r\n".encode() in content


def test_relay_down_is_a_temporary_failure(tmp_path: Path) -> None:
    path = tmp_path / "gone.sock"
    view = LocalView(None, "relay.test", 1000, (ListenerView(f"unix:{path}"),))
    with pytest.raises(SubmitError) as e:
        sendmail.connect(view)
    assert e.value.status == os.EX_TEMPFAIL
    assert f"cannot connect to the relay at {path}" in e.value.message
    assert "Nothing was sent" in e.value.message


# ---------------------------------------------------------------------------------------------
# -bs


def test_bs_pipe_passes_one_command_at_a_time() -> None:
    # The client writes its whole session at once, with LF line ends; the relay must get each
    # command after its previous reply (else it would see pipelining without PIPELINING).
    relay = ScriptedRelay({".": ["250 2.0.0 Ok: queued as Q"],
                           "QUIT": ["221 2.0.0 Bye"]})
    inRead, inWrite = os.pipe()
    outRead, outWrite = os.pipe()
    os.write(inWrite, b"EHLO me\nMAIL FROM:<a@b>\nRCPT TO:<c@d>\nDATA\nSubject: s\n\n..x\n.\n"
                      b"QUIT\n")
    os.close(inWrite)
    SMTPPipe(relay.theirs, inRead, outWrite).run()
    os.close(outWrite)
    out = b""
    while chunk := os.read(outRead, 65536):
        out += chunk
    os.close(inRead)
    os.close(outRead)
    relay.thread.join(5)
    assert relay.commands == ["EHLO me", "MAIL FROM:<a@b>", "RCPT TO:<c@d>", "DATA", ".",
                              "QUIT"]
    assert relay.messages == [b"Subject: s\r\n\r\n..x\r\n"]
    assert out.split(b"\r\n") == [b"220 relay.test ESMTP", b"250 2.0.0 Ok", b"250 2.0.0 Ok",
                                  b"250 2.0.0 Ok", b"354 go ahead", b"250 2.0.0 Ok: queued as Q",
                                  b"221 2.0.0 Bye", b""]


# ---------------------------------------------------------------------------------------------
# -bp and -q


def test_queue_commands_without_the_mailrelay_command(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(sendmail, "MAILRELAY_COMMAND", "mailrelay.app.no_such_module")
    with pytest.raises(SubmitError) as e:
        runQueueCommand(["list"], None)
    assert e.value.status == os.EX_UNAVAILABLE
    assert "run `mailrelay queue list`" in e.value.message and "nothing was done" in e.value.message


def test_queue_commands_call_the_mailrelay_command(monkeypatch: pytest.MonkeyPatch) -> None:
    calls: list[list[str]] = []
    fake = types.ModuleType("fake_mailrelay_cli")
    fake.main = lambda argv: calls.append(argv) or 3  # type: ignore[attr-defined]
    monkeypatch.setitem(sys.modules, "fake_mailrelay_cli", fake)
    monkeypatch.setattr(sendmail, "MAILRELAY_COMMAND", "fake_mailrelay_cli")
    assert sendmail.main(["-bp", "-C", "/etc/r.toml"]) == 3
    assert sendmail.main(["-qRexample.org"]) == 3
    assert sendmail.main(["-bp", "--spool", "/var/spool/r"]) == 3  # (the relay running there)
    assert calls == [["--config", "/etc/r.toml", "queue", "list"],
                     ["queue", "flush", "--domain", "example.org"],
                     ["--spool", "/var/spool/r", "queue", "list"]]


# ---------------------------------------------------------------------------------------------
# The running relay's listeners, published in its spool (--spool)


def test_spool_option() -> None:
    assert parseArguments(["--spool", "/var/spool/r", "-i", "a@b"]).spool == "/var/spool/r"
    assert parseArguments(["--spool=/var/spool/r", "a@b"]).spool == "/var/spool/r"
    assert parseArguments(["a@b"]).spool is None
    with pytest.raises(UsageError, match="option --spool needs a directory"):
        parseArguments(["--spool"])


def _published(tmp_path: Path, **changes: Any) -> Path:
    """A spool directory holding the listeners of a relay running as this process."""
    from mailrelay.app.published import publish

    spool = tmp_path / "spool"
    spool.mkdir(exist_ok=True)
    publish(spool, "relay.test", 5000, (
        ListenerView("tcp:465:interface=127.0.0.1", "submissions", "implicit", False),
        ListenerView("tcp:34567:interface=127.0.0.1", "relay", "none", False),
        ListenerView("unix:/run/a\\:b.sock", "relay", "starttls", True),
    ))
    if changes:
        import json

        path = spool / "listeners.json"
        path.write_text(json.dumps({**json.loads(path.read_text()), **changes}))
    return spool


def test_the_published_listeners_are_read_back(tmp_path: Path) -> None:
    """What the relay publishes (the addresses it listens on, its host name and size limit)
    is what the command reads: a view of the running relay, not of a file."""
    from mailrelay.app.published import readPublished

    spool = _published(tmp_path)
    path = spool / "listeners.json"
    assert oct(path.stat().st_mode & 0o777) == "0o644"  # (any local user may read it)
    view = readPublished(spool)
    assert view == LocalView(str(path), "relay.test", 5000, (
        ListenerView("tcp:465:interface=127.0.0.1", "submissions", "implicit", False),
        ListenerView("tcp:34567:interface=127.0.0.1", "relay", "none", False),
        ListenerView("unix:/run/a\\:b.sock", "relay", "starttls", True),
    ), str(spool))
    listener, address = chooseListener(view)
    assert address.text == "127.0.0.1:34567"


def test_no_published_listeners_is_no_relay(tmp_path: Path) -> None:
    """No file, or one left by a relay that is gone (killed: it could not remove it): no
    relay runs on that spool."""
    import subprocess

    from mailrelay.app.published import readPublished

    assert readPublished(tmp_path) is None
    gone = subprocess.Popen(["true"])
    gone.wait()
    assert readPublished(_published(tmp_path, pid=gone.pid)) is None


@pytest.mark.parametrize("changes, problem", [
    ({"pid": "1"}, "pid: not a process id"),
    ({"listeners": [{"endpoint": 25}]}, "listeners[0]: not a listener"),
    ({"message_size": None}, "message_size: not a number of octets"),
])
def test_a_published_file_that_is_not_the_relays_is_refused(
        tmp_path: Path, changes: dict, problem: str) -> None:
    from mailrelay.app.published import PublishedError, readPublished

    spool = _published(tmp_path, **changes)
    with pytest.raises(PublishedError) as e:
        readPublished(spool)
    assert str(e.value) == f"{spool / 'listeners.json'}: {problem}"
    (spool / "listeners.json").write_text("{")
    with pytest.raises(PublishedError, match="listeners.json: not JSON: "):
        readPublished(spool)


def test_the_listeners_published_are_those_bound(tmp_path: Path) -> None:
    """Each listener as it is bound: the port chosen for C{tcp:0}, the address of a
    listener named on the command line (C{--listen}), with its mode, TLS mode and PROXY
    setting; one not listening is left out."""
    from twisted.internet.address import IPv4Address, IPv6Address, UNIXAddress

    from mailrelay.app.published import boundListeners
    from mailrelay.config import loadConfig

    path = tmp_path / "relay.toml"
    path.write_text(
        '[[listeners]]\nendpoint = "tcp:0:interface=127.0.0.1"\n'
        '[[listeners]]\nendpoint = "tcp6:0:interface=\\\\:\\\\:"\nproxy_protocol = true\n'
        'proxy_networks = ["192.0.2.0/24"]\n'
        f'[[listeners]]\nendpoint = "unix:{tmp_path}/smtp.sock"\n'
        '[[listeners]]\nendpoint = "tcp:2526"\n')
    config = loadConfig(str(path))
    bound = {
        "tcp:0:interface=127.0.0.1": IPv4Address("TCP", "127.0.0.1", 34567),
        "tcp6:0:interface=\\:\\:": IPv6Address("TCP", "::", 34568),
        f"unix:{tmp_path}/smtp.sock": UNIXAddress(f"{tmp_path}/smtp.sock".encode()),
    }
    services = {
        endpoint: types.SimpleNamespace(port=types.SimpleNamespace(getHost=lambda a=address: a))
        for endpoint, address in bound.items()
    }
    services["tcp:2526"] = types.SimpleNamespace(port=None)  # (not listening)
    assert boundListeners(config, services) == (
        ListenerView("tcp:34567:interface=127.0.0.1", "relay", "none", False),
        ListenerView("tcp6:34568:interface=\\:\\:", "relay", "none", True),
        ListenerView(f"unix:{tmp_path}/smtp.sock", "relay", "none", False),
    )


def test_the_relay_is_found_by_its_spool(tmp_path: Path) -> None:
    """--spool DIR: the listeners the relay running on DIR publishes; the configuration
    file's spool directory likewise, before the file's own listeners (a relay started with
    --listen, or on tcp:0, is reached); without a relay publishing there, the file's."""
    spool = _published(tmp_path)
    view = sendmail.localView(Options(spool=str(spool)), None)
    assert chooseListener(view)[1].text == "127.0.0.1:34567"
    config = tmp_path / "relay.toml"
    config.write_text('[spool]\ndirectory = "spool"\n'
                      '[[listeners]]\nendpoint = "tcp:2525:interface=127.0.0.1"\n')
    view = sendmail.localView(Options(), str(config))
    assert chooseListener(view)[1].text == "127.0.0.1:34567"
    (spool / "listeners.json").unlink()
    view = sendmail.localView(Options(), str(config))
    assert view.source == str(config) and chooseListener(view)[1].text == "127.0.0.1:2525"
    with pytest.raises(SubmitError) as e:
        sendmail.localView(Options(spool=str(spool)), None)
    assert e.value.status == os.EX_TEMPFAIL
    assert e.value.message == (
        f"no relay runs on the spool directory {spool} (no relay publishes its listeners in "
        f"{spool / 'listeners.json'}); is mailrelay running? Nothing was sent; try again later")

