"""Unit tests of the ESMTP server session, through the Twisted protocol on a StringTransport."""

from __future__ import annotations

import re

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from twisted.internet.defer import Deferred, fail
from zope.interface import implementer

from mailrelay.envelope import ClientInfo
from mailrelay.interfaces import IRecipientValidator, Verdict
from mailrelay.policy import ConfiguredValidator
from mailrelay.smtp.server import BodyData, EndOfData, ServerSession, SessionSettings, StartData
from mailrelay.testing import ServerHarness
from tests.test_bdat import (
    run as runCut,  # (imported here: an import inside a @given test is a nested @given)
)


def transaction(h: ServerHarness, body: bytes = b"Subject: hi\r\n\r\nhello\r\n", rcpt: bytes = b"<rcpt@example.org>") -> list[bytes]:
    h.send(b"EHLO client.example\r\n")
    return h.send(b"MAIL FROM:<sender@example.com>\r\nRCPT TO:" + rcpt + b"\r\nDATA\r\n" + body + b".\r\n")


def test_greeting_and_ehlo() -> None:
    h = ServerHarness()
    assert h.replies() == [b"220 relay.test ESMTP mailrelay"]
    lines = h.send(b"EHLO client.example\r\n")
    assert lines == [
        b"250-relay.test",
        b"250-PIPELINING",
        b"250-SIZE 10240000",
        b"250-8BITMIME",
        b"250-ENHANCEDSTATUSCODES",
        b"250-DSN",
        b"250-CHUNKING",
        b"250 SMTPUTF8",
    ]


def test_seed_session() -> None:
    h = ServerHarness()
    h.replies()
    assert h.send(b"HELO client.example\r\n") == [b"250 relay.test"]
    assert h.send(b"MAIL FROM:<a@example.com>\r\n") == [b"250 2.1.0 Ok"]
    assert h.send(b"RCPT TO:<b@example.org>\r\n") == [b"250 2.1.5 Ok"]
    assert h.send(b"DATA\r\n") == [b"354 End data with <CR><LF>.<CR><LF>"]
    h.send(b"Subject: test\r\n\r\nHello\r\n")
    (line,) = h.send(b".\r\n")
    assert line.startswith(b"250 2.0.0 Ok: queued as ")
    queueID = line.rsplit(b" ", 1)[1].decode()
    assert queueID in h.spool.committed
    assert h.send(b"QUIT\r\n") == [b"221 2.0.0 Bye"]
    assert h.closed
    envelope, message = h.spool.committed[queueID]
    assert envelope.sender == "a@example.com"
    assert [r.address for r in envelope.recipients] == ["b@example.org"]
    assert envelope.client.helo == "client.example"
    assert envelope.client.protocol == "SMTP"
    assert message.startswith(b"Received: from client.example (unknown [127.0.0.1])\r\n\tby relay.test (mailrelay) with SMTP id " + queueID.encode())
    assert b"\r\n\tfor <b@example.org>; " in message
    assert message.endswith(b"Subject: test\r\n" + b"Message-Id: <" + message.split(b"Message-Id: <")[1].split(b">")[0] + b">\r\n" + b"Date: " + message.split(b"\r\nDate: ")[1].split(b"\r\n")[0] + b"\r\n\r\nHello\r\n")


@pytest.mark.parametrize("bad", [b"\x00", b"\r"])
@pytest.mark.parametrize("at", [0, 4, 11])
def test_command_with_nul_or_bare_cr(bad: bytes, at: int) -> None:
    """A command line holding a NUL or a bare CR anywhere (its verb, its argument) is refused
    with 500 5.5.2 bad syntax, and the session goes on."""
    h = ServerHarness()
    h.replies()
    line = b"HELO client.example"
    assert h.send(line[:at] + bad + line[at:] + b"\r\n") == [b"500 5.5.2 Error: bad syntax"]
    assert h.send(line + b"\r\n") == [b"250 relay.test"]


@pytest.mark.parametrize(
    "commands,expected",
    [
        (b"MAIL FROM:<a@b.example>\r\n", [503]),
        (b"EHLO x\r\nRCPT TO:<a@b.example>\r\n", [250, 503]),
        (b"EHLO x\r\nDATA\r\n", [250, 503]),
        (b"EHLO x\r\nMAIL FROM:<a@b.example>\r\nDATA\r\n", [250, 250, 503]),
        (b"EHLO x\r\nMAIL FROM:<a@b.example>\r\nMAIL FROM:<a@b.example>\r\n", [250, 250, 503]),
        (b"EHLO\r\n", [501]),
        (b"HELO\r\n", [501]),
        (b"EHLO x\r\nMAIL TO:<a@b.example>\r\n", [250, 501]),
        (b"EHLO x\r\nMAIL FROM:<a@@b>\r\n", [250, 501]),
        (b"EHLO x\r\nMAIL FROM:<a@b.example> FOO=BAR\r\n", [250, 555]),
        (b"EHLO x\r\nMAIL FROM:<a@b.example> SIZE=abc\r\n", [250, 501]),
        (b"EHLO x\r\nMAIL FROM:<a@b.example> SIZE=99999999999\r\n", [250, 552]),
        (b"EHLO x\r\nMAIL FROM:<a@b.example> BODY=BINARYMIME\r\n", [250, 501]),
        (b"EHLO x\r\nMAIL FROM:<a@b.example> SIZE=1 SIZE=2\r\n", [250, 501]),
        (b"EHLO x\r\nMAIL FROM:<a@b.example> RET=FOO\r\n", [250, 501]),
        (b"EHLO x\r\nMAIL FROM:<a@b.example>\r\nRCPT TO:<c@d.example> NOTIFY=NEVER,SUCCESS\r\n", [250, 250, 501]),
        (b"EHLO x\r\nMAIL FROM:<a@b.example>\r\nRCPT TO:<c@d.example> FOO\r\n", [250, 250, 555]),
        (b"EHLO x\r\nMAIL FROM:<a@b.example>\r\nRCPT TO:<>\r\n", [250, 250, 501]),
        (b"EHLO x\r\nMAIL FROM:<a@b.example>\r\nRCPT TO:c@d.example\r\n", [250, 250, 250]),
        (b"EHLO x\r\nMAIL FROM:<a\xc3\xa9@b.example>\r\n", [250, 553]),
        (b"EHLO x\r\nMAIL FROM:<a\xc3\xa9@b.example> SMTPUTF8\r\n", [250, 250]),
        (b"NOOP\r\nRSET\r\nVRFY someone\r\nVRFY\r\nHELP\r\n", [250, 250, 252, 501, 214]),
        (b"EXPN list\r\nSTARTTLS\r\nBDAT 10\r\nRSET\r\nQUIT", [502, 502, 503]),  # 10 octets, not commands
        (b"FOO\r\n\r\nMAIL\r\n", [500, 500, 503]),
        (b"RSET x\r\nDATA x\r\n", [501, 501]),
        (b"\xff\xfe\r\n", [500]),
        (b"EHLO x\n", [250]),
    ],
)
def test_reply_codes(commands: bytes, expected: list[int]) -> None:
    h = ServerHarness()
    h.replies()
    assert h.codes(h.send(commands)) == expected


def test_enhanced_codes_on_every_reply_but_greeting_ehlo_and_354() -> None:
    h = ServerHarness()
    h.replies()
    lines = h.send(
        b"EHLO x\r\nNOOP\r\nFOO\r\nMAIL FROM:<a@b.example>\r\nRCPT TO:<c@d.example>\r\nDATA\r\nhi\r\n.\r\nVRFY x\r\nQUIT\r\n"
    )
    assert lines[7] == b"250 SMTPUTF8"  # EHLO reply: no enhanced codes (RFC 2034)
    for line in lines[8:]:
        if line.startswith(b"354 "):
            continue
        assert re.match(rb"\d{3} [245]\.\d{1,3}\.\d{1,3} ", line), line


def test_relay_denied_for_outsiders() -> None:
    h = ServerHarness(peer="192.0.2.7", relay={"acceptDomains": ["ours.example"]})
    h.replies()
    h.send(b"EHLO x\r\nMAIL FROM:<a@b.example>\r\n")
    assert h.send(b"RCPT TO:<c@elsewhere.example>\r\n") == [b"554 5.7.1 Relay access denied"]
    assert h.send(b"RCPT TO:<c@ours.example>\r\n") == [b"250 2.1.5 Ok"]
    assert h.send(b"RCPT TO:<c@OURS.example.>\r\n") == [b"250 2.1.5 Ok"]  # duplicate once normalised


@pytest.mark.parametrize(
    "rcpt",
    [
        b"<c%elsewhere.example@ours.example>",
        b"<elsewhere.example!c@ours.example>",
        b'<"c@elsewhere.example"@ours.example>',
        b"<c@[192.0.2.1]>",
        b"<c@ours.example.evil.example>",
    ],
)
def test_address_tricks_do_not_open_the_relay(rcpt: bytes) -> None:
    h = ServerHarness(peer="192.0.2.7", relay={"acceptDomains": ["ours.example"]})
    h.replies()
    h.send(b"EHLO x\r\nMAIL FROM:<a@b.example>\r\n")
    assert h.send(b"RCPT TO:" + rcpt + b"\r\n") == [b"554 5.7.1 Relay access denied"]


def test_source_route_is_judged_on_the_mailbox() -> None:
    h = ServerHarness(peer="192.0.2.7", relay={"acceptDomains": ["ours.example"]})
    h.replies()
    h.send(b"EHLO x\r\nMAIL FROM:<a@b.example>\r\n")
    assert h.send(b"RCPT TO:<@ours.example:c@elsewhere.example>\r\n") == [b"554 5.7.1 Relay access denied"]
    assert h.send(b"RCPT TO:<@elsewhere.example:c@ours.example>\r\n") == [b"250 2.1.5 Ok"]


def test_postmaster_always_accepted() -> None:
    h = ServerHarness(peer="192.0.2.7")
    h.replies()
    h.send(b"EHLO x\r\nMAIL FROM:<a@b.example>\r\n")
    assert h.send(b"RCPT TO:<Postmaster>\r\n") == [b"250 2.1.5 Ok"]


def test_too_many_recipients() -> None:
    h = ServerHarness(maxRecipients=3)
    h.replies()
    h.send(b"EHLO x\r\nMAIL FROM:<a@b.example>\r\n")
    lines = h.send(b"".join(b"RCPT TO:<r%d@d.example>\r\n" % i for i in range(5)))
    assert lines == [b"250 2.1.5 Ok"] * 3 + [b"452 4.5.3 Error: too many recipients"] * 2
    assert h.protocol.session.errors == 0


def test_recipients_past_the_overshoot_limit_count_as_errors() -> None:
    """Postfix's smtpd_recipient_overshoot_limit (1000): the first recipients beyond the
    limit get 452 and no error; past that many more, each 452 is an error, so that a client
    cannot send RCPTs (and fill the log with their refusals) for ever.  The count starts
    again with each transaction."""
    h = ServerHarness(maxRecipients=2, recipientOvershootLimit=2, maxErrors=3, errorSleepTime=0)
    h.replies()
    h.send(b"EHLO x\r\n")
    rcpts = b"".join(b"RCPT TO:<r%d@d.example>\r\n" % i for i in range(4))
    assert h.codes(h.send(b"MAIL FROM:<a@b.example>\r\n" + rcpts)) == [250] * 3 + [452] * 2
    assert h.protocol.session.errors == 0
    assert h.codes(h.send(b"RCPT TO:<x@d.example>\r\n")) == [452]
    assert h.protocol.session.errors == 1
    assert h.codes(h.send(b"RSET\r\nMAIL FROM:<a@b.example>\r\n" + rcpts)) == [250] * 4 + [452] * 2
    assert h.protocol.session.errors == 1 and not h.closed
    assert h.send(b"RCPT TO:<x@d.example>\r\nRCPT TO:<y@d.example>\r\n") == [
        b"452 4.5.3 Error: too many recipients"] * 2 + [b"421 4.7.0 relay.test Error: too many errors"]
    assert h.closed


def test_recipient_overshoot_limit_defaults_to_postfixs() -> None:
    h = ServerHarness(maxRecipients=1)
    h.replies()
    h.send(b"EHLO x\r\nMAIL FROM:<a@b.example>\r\n")
    lines = h.send(b"".join(b"RCPT TO:<r%d@d.example>\r\n" % i for i in range(1001)))
    assert h.codes(lines) == [250] + [452] * 1000 and h.protocol.session.errors == 0
    assert h.codes(h.send(b"RCPT TO:<x@d.example>\r\n")) == [452]
    assert h.protocol.session.errors == 1


def test_pipelining_answers_in_order_across_data() -> None:
    h = ServerHarness()
    h.replies()
    lines = h.send(
        b"EHLO x\r\nMAIL FROM:<a@b.example>\r\nRCPT TO:<c@d.example>\r\nRCPT TO:<e@f.example>\r\nDATA\r\n"
        b"Subject: one\r\n\r\nbody\r\n.\r\nMAIL FROM:<>\r\nRCPT TO:<g@h.example>\r\nDATA\r\nSubject: two\r\n\r\n.\r\nQUIT\r\n"
    )
    assert h.codes(lines) == [250, 250, 250, 250, 354, 250, 250, 250, 354, 250, 221]
    assert len(h.spool.committed) == 2
    first, second = sorted(h.spool.committed.values(), key=lambda em: em[0].queueID)
    assert first[0].sender == "a@b.example" and second[0].sender == ""
    assert first[1].endswith(b"\r\nbody\r\n") and second[1].endswith(b"Subject: two\r\n" + second[1].split(b"Subject: two\r\n")[1])


def test_pipelining_waits_for_slow_validator_and_keeps_order() -> None:
    pending: list[Deferred] = []

    @implementer(IRecipientValidator)
    class Slow:
        def validateRecipient(self, client, envelope, recipient):
            d: Deferred = Deferred()
            pending.append(d)
            return d

    h = ServerHarness(validators=[Slow()])
    h.replies()
    lines = h.send(b"EHLO x\r\nMAIL FROM:<a@b.example>\r\nRCPT TO:<c@d.example>\r\nRCPT TO:<e@f.example>\r\nNOOP\r\n")
    assert h.codes(lines) == [250, 250]
    assert h.transport.producerState == "paused"
    (first,) = pending
    first.callback(Verdict.reject("Error: no such user", 550, "5.1.1"))
    assert h.replies() == [b"550 5.1.1 Error: no such user"]
    assert h.transport.producerState == "paused"
    second = pending[1]
    second.callback(Verdict.accept())
    assert h.replies() == [b"250 2.1.5 Ok", b"250 2.0.0 Ok"]
    assert h.transport.producerState == "producing"


def test_validator_failure_and_timeout_defer_never_accept() -> None:
    @implementer(IRecipientValidator)
    class Broken:
        def validateRecipient(self, client, envelope, recipient):
            if recipient.address.startswith("boom"):
                raise RuntimeError("boom")
            if recipient.address.startswith("fail"):
                return fail(RuntimeError("failed"))
            if recipient.address.startswith("junk"):
                return "yes"
            return Deferred()  # never answers

    h = ServerHarness(validators=[ConfiguredValidator("broken", Broken(), 5)])
    h.replies()
    h.send(b"EHLO x\r\nMAIL FROM:<a@b.example>\r\n")
    for who in (b"boom", b"fail", b"junk"):
        assert h.send(b"RCPT TO:<" + who + b"@d.example>\r\n") == [
            b"451 4.3.0 Error: temporary failure checking recipient, try again later"
        ]
    assert h.send(b"RCPT TO:<slow@d.example>\r\n") == []
    h.clock.advance(5)
    assert h.replies() == [b"451 4.3.0 Error: temporary failure checking recipient, try again later"]
    assert h.send(b"DATA\r\n") == [b"554 5.5.1 Error: no valid recipients"]


def test_validator_chain_first_decision_wins() -> None:
    calls = []

    @implementer(IRecipientValidator)
    class V:
        def __init__(self, name, verdict):
            self.name, self.verdict = name, verdict

        def validateRecipient(self, client, envelope, recipient):
            calls.append(self.name)
            return self.verdict

    h = ServerHarness(validators=[V("a", Verdict.continue_()), V("b", Verdict.defer("later")), V("c", Verdict.accept())])
    h.replies()
    h.send(b"EHLO x\r\nMAIL FROM:<a@b.example>\r\n")
    assert h.send(b"RCPT TO:<c@d.example>\r\n") == [b"451 4.3.0 later"]
    assert calls == ["a", "b"]


def test_relay_control_runs_before_validators() -> None:
    @implementer(IRecipientValidator)
    class AcceptAll:
        def validateRecipient(self, client, envelope, recipient):
            return Verdict.accept()

    h = ServerHarness(validators=[AcceptAll()], peer="198.51.100.1")
    h.replies()
    h.send(b"EHLO x\r\nMAIL FROM:<a@b.example>\r\n")
    assert h.send(b"RCPT TO:<c@d.example>\r\n") == [b"554 5.7.1 Relay access denied"]


def test_command_line_limits() -> None:
    h = ServerHarness()
    h.replies()
    assert h.send(b"NOOP " + b"x" * 505 + b"\r\n") == [b"250 2.0.0 Ok"]  # 512 with CRLF
    assert h.send(b"NOOP " + b"x" * 506 + b"\r\n") == [b"500 5.5.2 Error: line too long"]
    assert not h.closed
    assert h.send(b"x" * 20000) == [b"421 4.7.0 relay.test Error: line too long, closing"]
    assert h.closed


def test_command_names_are_ascii() -> None:
    """A command name is ASCII letters: "maıl" (a dotless i) or "rſet" (a long s), which
    str.upper() makes "MAIL" and "RSET", are not commands (they were taken for them), as
    Postfix answers them."""
    h = ServerHarness()
    h.replies()
    assert h.send(b"EHLO client.test\r\n")[-1].startswith(b"250 ")
    for line in ("ma\u0131l FROM:<a@example.com>", "r\u017fet", "qu\u0131t", "NOOP\u0130"):
        assert h.send(f"{line}\r\n".encode()) == [b"500 5.5.2 Error: command not recognized"]
    assert not h.closed
    assert h.send(b"MAIL FROM:<a@example.com>\r\n") == [b"250 2.1.0 Ok"]


def test_error_limit_disconnects() -> None:
    h = ServerHarness(maxErrors=3)
    h.replies()
    lines = h.send(b"FOO\r\nFOO\r\nFOO\r\nNOOP\r\n")
    assert lines == [b"500 5.5.2 Error: command not recognized"] * 3 + [b"421 4.7.0 relay.test Error: too many errors"]
    assert h.closed


def test_replies_slow_down_past_the_soft_error_limit() -> None:
    """Postfix's smtpd_soft_error_limit (10) and smtpd_error_sleep_time (1 s): once a session
    has made that many errors, every reply waits that long first (smtpd_chat.c: "sleep on
    anything"), each of a pipelined batch too; the relay reads nothing meanwhile and blocks
    nothing else (a timer, not a sleep).  There was only the hang-up at the hard limit."""
    h = ServerHarness(softErrorLimit=2, errorSleepTime=1.0, maxErrors=5)
    h.replies()
    assert h.send(b"EHLO x\r\n")[-1].startswith(b"250 ")
    for _ in range(2):
        assert h.send(b"FOO\r\n") == [b"500 5.5.2 Error: command not recognized"]
    # Two errors: the third reply (an error or not) waits a second.
    assert h.send(b"FOO\r\n") == [] and h.transport.producerState == "paused"
    h.clock.advance(0.999)
    assert h.replies() == []
    h.clock.advance(0.001)
    assert h.replies() == [b"500 5.5.2 Error: command not recognized"]
    assert h.transport.producerState == "producing"
    # Pipelined: one second before each reply, in order.
    assert h.send(b"NOOP\r\nMAIL FROM:<a@example.com>\r\nFOO\r\n") == []
    got = []
    for _ in range(3):
        h.clock.advance(1)
        got.append(h.replies())
    assert got == [[b"250 2.0.0 Ok"], [b"250 2.1.0 Ok"], [b"500 5.5.2 Error: command not recognized"]]
    # The hard limit's 421 waits too (it is a reply), then the connection closes.
    assert h.send(b"FOO\r\n") == []
    h.clock.advance(1)
    assert h.replies() == [b"500 5.5.2 Error: command not recognized"] and not h.closed
    h.clock.advance(1)
    assert h.replies() == [b"421 4.7.0 relay.test Error: too many errors"] and h.closed


def test_a_message_delivered_forgives_the_errors_and_sleep_zero_is_off() -> None:
    """As Postfix, a message received resets the error count (and with it the slow-down);
    error_sleep_time = 0 turns the slow-down off; a client that leaves during the wait
    leaves nothing behind (no timer, no reply)."""
    h = ServerHarness(softErrorLimit=1, errorSleepTime=2.0)
    h.replies()
    h.send(b"EHLO x\r\n")
    assert h.send(b"FOO\r\n") == [b"500 5.5.2 Error: command not recognized"]
    h.send(b"MAIL FROM:<a@example.com>\r\nRCPT TO:<b@example.org>\r\nDATA\r\n")
    h.clock.pump([2, 2, 2])
    assert h.codes(h.replies()) == [250, 250, 354]
    # (Its 250 is not delayed: Postfix resets the count before it replies.)
    assert h.codes(h.send(b"Subject: x\r\n\r\nbody\r\n.\r\n")) == [250]
    assert h.send(b"NOOP\r\n") == [b"250 2.0.0 Ok"]
    assert h.send(b"FOO\r\n") == [b"500 5.5.2 Error: command not recognized"]
    assert h.send(b"NOOP\r\n") == []
    h.protocol.connectionLost(None)
    assert h.clock.getDelayedCalls() == [] and h.replies() == []
    off = ServerHarness(softErrorLimit=1, errorSleepTime=0)
    off.replies()
    assert off.send(b"FOO\r\nFOO\r\nNOOP\r\n") == [
        b"500 5.5.2 Error: command not recognized"] * 2 + [b"250 2.0.0 Ok"]


def test_junk_commands_past_the_limit_count_as_errors() -> None:
    """Postfix's smtpd_junk_command_limit (100): past that many HELO, EHLO, RSET, NOOP, VRFY
    (and HELP) in a session, each one counts as an error, so that a client cannot hold a
    connection for ever with commands that never fail; its replies then slow down past the
    soft error limit, and it is closed at the hard one.  A message received forgives them."""
    h = ServerHarness(junkCommandLimit=3, maxErrors=2, errorSleepTime=0)
    h.replies()
    assert h.codes(h.send(b"EHLO x\r\nRSET\r\nNOOP\r\n")) == [250, 250, 250]
    assert h.send(b"VRFY <a@example.com>\r\n") == [b"252 2.0.0 Cannot VRFY user, but will accept message and attempt delivery"]
    assert h.protocol.session.errors == 1 and not h.closed
    assert h.codes(
        h.send(b"MAIL FROM:<a@example.com>\r\nRCPT TO:<b@example.org>\r\nDATA\r\n")
    ) == [250, 250, 354]
    assert h.codes(h.send(b"Subject: x\r\n\r\nbody\r\n.\r\n")) == [250]
    assert h.protocol.session.errors == 0
    assert h.codes(h.send(b"NOOP\r\nHELP\r\nRSET\r\n")) == [250, 214, 250]
    assert h.send(b"NOOP\r\n") == [b"250 2.0.0 Ok"]
    assert h.send(b"NOOP\r\n") == [b"250 2.0.0 Ok"]
    assert h.protocol.session.errors == 2 and not h.closed
    # The hard limit is checked at the next command, as Postfix's smtpd does.
    assert h.send(b"MAIL FROM:<a@example.com>\r\n") == [
        b"421 4.7.0 relay.test Error: too many errors"]
    assert h.closed


def test_junk_command_limit_defaults_to_postfixs() -> None:
    """100 junk commands are free, as with Postfix's default."""
    h = ServerHarness(errorSleepTime=0)
    h.replies()
    assert h.codes(h.send(b"NOOP\r\n" * 100)) == [250] * 100
    assert h.protocol.session.errors == 0
    h.send(b"NOOP\r\n")
    assert h.protocol.session.errors == 1


@pytest.mark.parametrize(("wire", "logged"), [
    (b"FOO\r\nRCPT TO:<a@b.example>\r\n", "too many errors after RCPT from 127.0.0.1, closing"),
    (b"NOOP\r\n" * 4, "too many errors after NOOP from 127.0.0.1, closing"),
    (b"x" * 20000, "line too long (more than 16384 octets without a line end) from 127.0.0.1, "
                   "closing"),
    (b"MAIL FROM:<a@b.example>\r\nRCPT TO:<c@d.example>\r\nBDAT 2000\r\n",
     "BDAT content beyond 1.5 times the message size limit (1500 octets) from 127.0.0.1, "
     "closing"),
    (b"BDAT ten\r\n", "malformed BDAT command from 127.0.0.1: 'BDAT ten', closing"),
])
def test_limits_that_close_the_session_are_logged(wire: bytes, logged: str) -> None:
    """A session the relay closes for a limit or a protocol error says why in the log, as
    Postfix's "too many errors after RCPT from host[addr]" (smtpd.c): there was only the
    disconnect line (errors=2), or nothing at all for an over-long line."""
    from twisted.logger import capturedLogs, formatEvent

    h = ServerHarness(maxErrors=2, junkCommandLimit=1, errorSleepTime=0, maxMessageSize=1000)
    h.replies()
    h.send(b"EHLO x\r\n")
    with capturedLogs() as events:
        h.send(wire)
    assert h.closed
    assert logged in [formatEvent(e) for e in events]


def test_idle_and_data_timeouts() -> None:
    h = ServerHarness(idleTimeout=300, dataTimeout=120)
    h.replies()
    h.clock.advance(299)
    h.send(b"EHLO x\r\n")
    h.clock.advance(299)
    assert not h.closed
    h.clock.advance(1)
    assert h.replies() == [b"421 4.4.2 relay.test Error: timeout exceeded"]
    assert h.closed

    h = ServerHarness(idleTimeout=300, dataTimeout=120)
    transaction(h, body=b"")
    h.send(b"MAIL FROM:<a@b.example>\r\nRCPT TO:<c@d.example>\r\nDATA\r\npartial line")
    h.replies()
    h.clock.advance(120)
    assert h.replies() == [b"421 4.4.2 relay.test Error: timeout exceeded"]
    assert h.spool.open == {}
    assert len(h.spool.committed) == 1


def test_premature_close_queues_nothing() -> None:
    h = ServerHarness()
    h.send(b"EHLO x\r\nMAIL FROM:<a@b.example>\r\nRCPT TO:<c@d.example>\r\nDATA\r\nSubject: x\r\n\r\nhalf")
    writer = next(iter(h.spool.open.values()))
    h.loseConnection()
    assert writer.aborted
    assert h.spool.committed == {}


def test_oversize_message_consumed_then_refused() -> None:
    h = ServerHarness(maxMessageSize=1000)
    h.replies()
    lines = transaction(h, body=b"Subject: x\r\n\r\n" + b"y" * 70 + b"\r\n" * 1 + (b"z" * 70 + b"\r\n") * 30)
    assert lines[-1] == b"552 5.3.4 Error: message size exceeds fixed limit"
    assert h.codes(lines) == [250, 250, 354, 552]
    assert h.spool.committed == {}
    assert h.send(b"NOOP\r\n") == [b"250 2.0.0 Ok"]


def test_long_line_consumed_then_refused() -> None:
    h = ServerHarness()
    h.replies()
    body = b"Subject: x\r\n\r\n" + b"a" * 999 + b"\r\nRSET\r\nQUIT\r\n"
    lines = transaction(h, body=body)
    assert lines[-1] == b"500 5.5.2 Error: message line longer than 998 octets"
    assert h.codes(lines) == [250, 250, 354, 500]
    assert not h.closed
    h2 = ServerHarness()
    h2.replies()
    assert h2.codes(transaction(h2, body=b"Subject: x\r\n\r\n" + b"a" * 998 + b"\r\n"))[-1] == 250


def test_long_line_split_across_reads() -> None:
    h = ServerHarness()
    h.replies()
    h.send(b"EHLO x\r\nMAIL FROM:<a@b.example>\r\nRCPT TO:<c@d.example>\r\nDATA\r\n")
    h.replies()
    for _ in range(10):
        h.send(b"b" * 100)
    assert h.send(b"\r\n.\r\n") == [b"500 5.5.2 Error: message line longer than 998 octets"]


def test_huge_line_without_crlf_is_consumed_with_bounded_buffer() -> None:
    h = ServerHarness(maxMessageSize=10**9)
    h.replies()
    h.send(b"EHLO x\r\nMAIL FROM:<a@b.example>\r\nRCPT TO:<c@d.example>\r\nDATA\r\n")
    h.replies()
    for _ in range(100):
        h.send(b"c" * 65536)
        assert len(h.protocol.session._buf) - h.protocol.session._pos <= 2 * 65536
    assert h.send(b"\r\n.\r\n") == [b"500 5.5.2 Error: message line longer than 998 octets"]


@pytest.mark.parametrize(
    "body",
    [b"Subject: x\r\n\r\nbare\nLF\r\n", b"Subject: x\r\n\r\nbare\rCR\nLF\r\n", b"Subject: x\n\nall bare\r\n"],
)
def test_bare_newline_rejected_by_default(body: bytes) -> None:
    h = ServerHarness()
    h.replies()
    lines = transaction(h, body=body)
    assert lines[-1] == b"550 5.6.0 Error: message contains a bare LF; use CRLF line endings"
    assert h.spool.committed == {}


@pytest.mark.parametrize("body", [b"Subject: x\r\n\r\nbare\rCR\r\n", b"x\r\r\n"])
def test_bare_cr_is_a_space_by_default(body: bytes) -> None:
    """bare_newline = "reject" is about bare LF (Postfix's smtpd_forbid_bare_newline); a bare
    CR ends no line and is a space, as Postfix's cleanup makes it."""
    h = ServerHarness()
    h.replies()
    assert transaction(h, body=body)[-1].startswith(b"250 ")
    (message,) = h.spool.messages()
    want = body.replace(b"\r\r", b" \r").replace(b"\rCR", b" CR")
    assert message.endswith(b"\r\n" + want.split(b"\r\n\r\n")[-1]), message


def test_bare_newline_normalized_when_listener_says_so() -> None:
    h = ServerHarness(bareNewline="normalize")
    h.replies()
    lines = transaction(h, body=b"Subject: x\n\nbare\nLF\rCR\r\n")
    assert lines[-1].startswith(b"250 ")
    (message,) = h.spool.messages()
    assert message.endswith(b"Subject: x\r\n" + message.split(b"Subject: x\r\n", 1)[1].split(b"\r\n\r\n")[0] + b"\r\n\r\nbare\r\nLF CR\r\n")
    assert message.count(b"\n") == message.count(b"\r\n") == message.count(b"\r")


@pytest.mark.parametrize(
    "smuggle",
    [b"\n.\n", b"\n.\r\n", b"\r\n.\n", b"\r.\r\n", b"\r\n.\r", b"\n.\r"],
)
def test_smuggling_does_not_end_the_message(smuggle: bytes) -> None:
    for mode in ("reject", "normalize"):
        h = ServerHarness(bareNewline=mode)
        h.replies()
        body = b"Subject: x\r\n\r\nfirst" + smuggle + b"MAIL FROM:<evil@x.example>\r\nRCPT TO:<victim@y.example>\r\nDATA\r\nsmuggled\r\n"
        lines = transaction(h, body=body)
        # One message, one final reply: the smuggled commands are body text (a bare CR is
        # a space, a bare LF is refused or made CRLF).
        refused = mode == "reject" and b"\n" in smuggle.replace(b"\r\n", b"")
        assert h.codes(lines) == [250, 250, 354, 550 if refused else 250]
        if not refused:
            (message,) = h.spool.messages()
            assert b"MAIL FROM:<evil@x.example>" in message
            assert message.count(b"\n") == message.count(b"\r\n")


def test_loop_detection() -> None:
    h = ServerHarness()
    h.intake.maxHops = 3
    h.replies()
    assert h.codes(transaction(h, body=b"Received: a\r\n" * 3 + b"\r\nx\r\n"))[-1] == 250
    h.send(b"RSET\r\n")
    h.replies()
    lines = h.send(b"MAIL FROM:<a@b.example>\r\nRCPT TO:<c@d.example>\r\nDATA\r\n" + b"Received: a\r\n" * 4 + b"\r\nx\r\n.\r\n")
    assert lines[-1] == b"554 5.4.6 Error: too many hops (mail forwarding loop)"


def test_spool_failure_is_451_never_250() -> None:
    h = ServerHarness()
    h.spool.failCommits = True
    h.replies()
    assert transaction(h)[-1] == b"451 4.3.0 Error: queue file write error"


def test_low_disk_space_refuses_mail() -> None:
    h = ServerHarness()
    h.spool.freeSpace = 10
    h.spool.minFreeSpace = 100
    h.replies()
    h.send(b"EHLO x\r\n")
    assert h.send(b"MAIL FROM:<a@b.example>\r\n") == [b"452 4.3.1 Error: insufficient system storage"]


@pytest.mark.parametrize("content,codes", [
    (b"DATA\r\nSubject: hi\r\n\r\nhello\r\n.\r\n", [250, 250, 354]),
    (b"BDAT 15\r\nSubject: hi\r\n\r\nBDAT 7 LAST\r\nhello\r\n", [250, 250, 250]),  # RFC 3030
])
def test_commit_answered_asynchronously_keeps_pipelined_order(content: bytes, codes: list[int]) -> None:
    h = ServerHarness()
    h.spool.holdCommits = True
    h.replies()
    h.send(b"EHLO client.example\r\n")
    lines = h.send(b"MAIL FROM:<sender@example.com>\r\nRCPT TO:<rcpt@example.org>\r\n" + content)
    assert h.codes(lines) == codes
    assert h.send(b"NOOP\r\n") == []
    h.spool.release()
    lines = h.replies()
    assert lines[0].startswith(b"250 2.0.0 Ok: queued as ") and lines[1] == b"250 2.0.0 Ok"


def test_dsn_parameters_kept_on_envelope() -> None:
    h = ServerHarness()
    h.replies()
    h.send(b"EHLO x\r\n")
    assert h.send(b"MAIL FROM:<a@b.example> RET=HDRS ENVID=abc+2Bdef BODY=8BITMIME SIZE=100\r\n") == [b"250 2.1.0 Ok"]
    assert h.send(b"RCPT TO:<c@d.example> NOTIFY=SUCCESS,FAILURE ORCPT=rfc822;c+40d.example\r\n") == [b"250 2.1.5 Ok"]
    h.send(b"DATA\r\nx\r\n.\r\n")
    ((envelope, _),) = h.spool.committed.values()
    assert (envelope.ret, envelope.envid, envelope.body, envelope.size) == ("HDRS", "abc+def", "8BITMIME", 100)
    assert envelope.recipients[0].notify == ("SUCCESS", "FAILURE")
    assert envelope.recipients[0].orcpt == "rfc822;c@d.example"


@pytest.mark.parametrize("verb", [b"EHLO", b"HELO"])
def test_helo_with_spaces_accepted_and_logged(verb: bytes) -> None:
    """As Postfix: the words are taken together (runs of blanks made one space), logged; the
    name is no host name, so Received: says unknown."""
    from twisted.logger import capturedLogs

    h = ServerHarness()
    h.replies()
    with capturedLogs() as events:
        assert h.codes(h.send(verb + b"  My \tComputer \r\n")) == [250]
    (event,) = [e for e in events if "argument with spaces" in e["log_format"]]
    assert (event["verb"], event["helo"]) == (verb.decode(), "My Computer")
    h.send(b"MAIL FROM:<a@b.example>\r\nRCPT TO:<c@d.example>\r\nDATA\r\nSubject: s\r\n\r\n.\r\n")
    ((envelope, message),) = h.spool.committed.values()
    assert envelope.client.helo == "My Computer"
    assert message.startswith(b"Received: from unknown (unknown [127.0.0.1])\r\n")


@pytest.mark.parametrize("line", [b"EHLO  \r\n", b"EHLO \t\r\n", b"HELO a\x01b\r\n", b"EHLO a \x0bb\r\n"])
def test_helo_without_a_name_or_with_controls_refused(line: bytes) -> None:
    h = ServerHarness()
    h.replies()
    assert h.codes(h.send(line)) == [501]
    assert h.codes(h.send(b"MAIL FROM:<a@b.example>\r\n")) == [503]


def test_received_header_sanitises_helo() -> None:
    h = ServerHarness()
    h.replies()
    h.send(b"EHLO evil\x01(x)\r\n")
    assert h.send(b"EHLO ev(i)l.example\r\n")[-1] == b"250 SMTPUTF8"
    h.send(b"MAIL FROM:<a@b.example>\r\nRCPT TO:<c@d.example>\r\nDATA\r\nSubject: s\r\n\r\n.\r\n")
    (message,) = h.spool.messages()
    assert message.startswith(b"Received: from unknown (unknown [127.0.0.1])\r\n")  # not a host name


def test_existing_message_id_and_date_are_kept_and_body_untouched() -> None:
    h = ServerHarness()
    h.replies()
    original = b"Message-ID: <x@y>\r\nDate: Mon, 1 Jan 2024 00:00:00 +0000\r\nSubject: s\r\n\r\n..leading dot\r\n.\r\n"
    h.send(b"EHLO x\r\nMAIL FROM:<a@b.example>\r\nRCPT TO:<c@d.example>\r\nDATA\r\n" + original + b".\r\n")
    (message,) = h.spool.messages()
    assert message.split(b"\r\n", 3)[3] == b"Message-ID: <x@y>\r\nDate: Mon, 1 Jan 2024 00:00:00 +0000\r\nSubject: s\r\n\r\n.leading dot\r\n"


def test_listener_can_turn_off_message_id_and_date() -> None:
    h = ServerHarness(addMessageID=False, addDate=False)
    h.replies()
    transaction(h, body=b"Subject: s\r\n\r\nb\r\n")
    (message,) = h.spool.messages()
    assert b"Message-Id" not in message and b"\r\nDate:" not in message


# Sans-IO framing, property-based ------------------------------------------------------------

def _runData(wire: bytes, cuts: list[int]) -> tuple[bytes, list[object]]:
    """The content stored and the events of a DATA transaction whose message part is
    C{wire}, cut at C{cuts} (see L{tests.test_bdat.run})."""
    start = b"EHLO x\r\nMAIL FROM:<a@b.example>\r\nRCPT TO:<c@d.example>\r\nDATA\r\n"
    return runCut(start + wire, [0, len(start)] + [len(start) + c for c in cuts], maxMessageSize=10**9)


def dotStuff(content: bytes) -> bytes:
    lines = content.split(b"\r\n")
    return b"\r\n".join(b"." + line if line.startswith(b".") else line for line in lines)


_line = st.binary(max_size=40).map(  # no CR, LF or NUL (refused: see tests/test_input.py)
    lambda b: b.replace(b"\r", b"").replace(b"\n", b"").replace(b"\0", b"")
)
_lines = st.lists(st.one_of(_line, st.sampled_from([b".", b"..", b".x", b"", b". ", b"...\t"])), max_size=30)


@settings(max_examples=300, deadline=None)
@given(_lines, st.lists(st.integers(min_value=0, max_value=2000), max_size=8))
def test_dot_unstuffing_is_exact_whatever_the_chunking(lines: list[bytes], cuts: list[int]) -> None:
    content = b"".join(line + b"\r\n" for line in lines)
    wire = dotStuff(content[:-2]) + b"\r\n" if content else b""
    wire += b".\r\nNOOP\r\n"
    body, events = _runData(wire, [c % (len(wire) + 1) for c in cuts])
    assert body == content
    ends = [e for e in events if isinstance(e, EndOfData)]
    assert len(ends) == 1 and ends[0].error is None


@settings(max_examples=200, deadline=None)
@given(st.binary(max_size=300), st.lists(st.integers(min_value=0, max_value=400), max_size=6))
def test_message_only_ends_at_crlf_dot_crlf(payload: bytes, cuts: list[int]) -> None:
    while b"\r\n.\r\n" in payload:
        payload = payload.replace(b"\r\n.\r\n", b"\r\n..\r\n")
    if payload.startswith(b".\r\n"):
        payload = b"." + payload
    wire = payload + b"\r\n.\r\n"
    _, events = _runData(wire, [c % (len(wire) + 1) for c in cuts])
    ends = [e for e in events if isinstance(e, EndOfData)]
    assert len(ends) == 1


@pytest.mark.parametrize("how", ["connection lost", "peer closed", "still there"])
def test_a_client_gone_before_its_250_is_logged_as_a_possible_duplicate(how: str) -> None:
    """A client that leaves while its message is being committed (a slow fsync, a slow
    filter) never sees the 250: it will likely send the message again, a duplicate.  The log
    showed the 250, then the disconnect, and nothing more.  Now it says so: whether the
    connection was already lost, or (reading is paused while the commit runs, so the relay
    had not read it) the client had already closed its side when the 250 was written."""
    import socket

    from twisted.logger import capturedLogs, formatEvent

    from mailrelay.testing import MemorySpool

    spool = MemorySpool()
    spool.holdCommits = True
    h = ServerHarness(spool=spool)
    h.replies()
    ours, theirs = socket.socketpair()
    h.transport.socket = ours  # (what a TCP transport has; the peek looks at it)
    assert transaction(h) == [b"250 2.1.0 Ok", b"250 2.1.5 Ok", b"354 End data with <CR><LF>.<CR><LF>"]
    assert spool.held
    queueID = spool.held[0][1].queueID
    with capturedLogs() as events:
        if how == "connection lost":
            h.protocol.connectionLost(None)
        elif how == "peer closed":
            theirs.close()
        spool.release()
    ours.close()
    theirs.close()
    text = [formatEvent(e) for e in events]
    warned = [line for line in text if "may send it again" in line]
    if how == "still there":
        assert warned == [] and h.replies() == [f"250 2.0.0 Ok: queued as {queueID}".encode()]
        return
    assert warned == [
        f"{queueID}: the client 127.0.0.1 closed the connection before the reply to its "
        f"message was sent (250 2.0.0 Ok: queued as {queueID}): it probably never saw it, "
        "and may send it again (a duplicate)"
    ]
    assert [e["log_level"].name for e in events if "may send it again" in formatEvent(e)] == ["warn"]
    assert queueID in spool.committed





@pytest.mark.parametrize("starttls", [False, True])
@pytest.mark.parametrize("authWithoutTLS", [False, True])
def test_ehlo_and_greeting_made_once_per_settings_are_those_made_anew(
    starttls: bool, authWithoutTLS: bool
) -> None:
    """The greeting and the EHLO reply (without extensions) are made once per listener's
    settings and shared by its sessions: each session, with or without TLS, gets what a
    session on settings of its own gets."""
    from mailrelay.smtp.server import Reply

    def settings() -> SessionSettings:
        return SessionSettings("relay.test", starttls=starttls, authMechanisms=("PLAIN",),
                               authWithoutTLS=authWithoutTLS)

    def replies(shared: SessionSettings, tls: str | None) -> list[bytes]:
        session = ServerSession(shared, ClientInfo("192.0.2.1", tls=tls))
        events = session.greeting() + session.dataReceived(b"EHLO client.example\r\n")
        return [e.toBytes() for e in events if isinstance(e, Reply)]

    shared = settings()
    for tls in (None, "TLSv1.3 TLS_AES_256_GCM_SHA384", None, "TLSv1.2 other"):
        assert replies(shared, tls) == replies(settings(), tls)
    assert replies(shared, None) != replies(shared, "TLSv1.3 TLS_AES_256_GCM_SHA384")


def test_a_reply_of_a_subclass_is_sent_as_a_reply() -> None:
    """The protocol takes the session's replies by their exact type first (the commonest
    event); a plugin's verdict whose reply is of a subclass of Reply goes the general way and
    is sent, and logged as the last reply, exactly as the same Reply would be."""
    from mailrelay.interfaces import Reply, VerdictKind

    class OwnReply(Reply):
        pass

    def session(reply: Reply) -> tuple[list[bytes], object]:
        @implementer(IRecipientValidator)
        class Refusing:
            def validateRecipient(self, client, envelope, recipient):
                return Verdict(VerdictKind.REJECT, reply)

        h = ServerHarness(validators=[ConfiguredValidator("refusing", Refusing(), 5)])
        h.replies()
        lines = h.send(b"EHLO x\r\nMAIL FROM:<a@b.example>\r\nRCPT TO:<c@d.example>\r\n")
        return lines, h.protocol._lastReply

    plain, lastPlain = session(Reply(550, "5.1.1", "no such user\nhere"))
    own, lastOwn = session(OwnReply(550, "5.1.1", "no such user\nhere"))
    assert own == plain and plain[-2:] == [b"550-5.1.1 no such user", b"550 5.1.1 here"]
    assert type(lastOwn) is OwnReply and type(lastPlain) is Reply
    assert (lastOwn.code, lastOwn.text) == (lastPlain.code, lastPlain.text)  # type: ignore[attr-defined]
