"""Refused MAIL, RCPT and DATA commands are reported by the session (L{Refused}) and logged
by the protocol, Postfix style (C{NOQUEUE: reject: ...})."""

from __future__ import annotations

from typing import Any

from twisted.logger import capturedLogs, formatEvent

from mailrelay.envelope import ClientInfo
from mailrelay.interfaces import Verdict
from mailrelay.smtp.replies import Reply
from mailrelay.smtp.server import CheckMail, CheckRecipient, Refused, ServerSession, SessionSettings
from mailrelay.testing import ServerHarness


def refusals(events: list[object]) -> list[tuple[Any, ...]]:
    return [(e.command, e.reply.code, e.sender, e.recipient) for e in events if isinstance(e, Refused)]


def test_session_reports_each_refused_command_once() -> None:
    s = ServerSession(SessionSettings("h", maxRecipients=1), ClientInfo("192.0.2.1"))
    assert refusals(s.dataReceived(b"MAIL FROM:<a@example.com>\r\n")) == [("MAIL", 503, "a@example.com", None)]
    s.dataReceived(b"EHLO c\r\n")
    assert refusals(s.dataReceived(b"MAIL TO:<x>\r\n")) == [("MAIL", 501, None, None)]
    assert refusals(s.dataReceived(b"RCPT TO:<b@example.org>\r\n")) == [("RCPT", 503, None, "b@example.org")]
    assert refusals(s.dataReceived(b"DATA\r\n")) == [("DATA", 503, None, None)]
    (question,) = s.dataReceived(b"MAIL FROM:<>\r\n")
    assert isinstance(question, CheckMail)
    assert refusals(s.answer(Verdict.accept())) == []
    assert refusals(s.dataReceived(b"RCPT TO:<b\x01@example.org> NOTIFY=NEVER\r\n")) == [("RCPT", 501, "", "b?@example.org")]
    assert refusals(s.dataReceived(b"DATA\r\n")) == [("DATA", 554, "", None)]
    (question,) = s.dataReceived(b"RCPT TO:<B@Example.ORG>\r\n")
    assert isinstance(question, CheckRecipient)
    assert refusals(s.answer(Verdict.reject("no such user", 550, "5.1.1"))) == [("RCPT", 550, "", "B@Example.ORG")]
    (question,) = s.dataReceived(b"RCPT TO:<c@example.org>\r\n")
    assert refusals(s.answer(Verdict.accept())) == []
    assert refusals(s.dataReceived(b"RCPT TO:<d@example.org>\r\n")) == [("RCPT", 452, "", "d@example.org")]
    # Other commands' errors are not refusals of a transaction.
    assert refusals(s.dataReceived(b"VRFY\r\nBOGUS\r\nRSET\r\n")) == []
    (question,) = s.dataReceived(b"MAIL FROM:<a@example.com>\r\n")
    assert refusals(s.answer(Verdict.disconnect("go away"))) == [("MAIL", 421, "a@example.com", None)]


def test_protocol_logs_postfix_style() -> None:
    h = ServerHarness(relay={"networks": ()}, peer="192.0.2.7")
    h.protocol.session.client.rdns = "mail.example.net"
    with capturedLogs() as events:
        h.send(b"HELO client.example\r\nMAIL FROM:<s@example.com>\r\nRCPT TO:<x@elsewhere.example>\r\n")
        h.send(b"DATA\r\n")
    lines = [formatEvent(e) for e in events if e.get("log_format", "").startswith("NOQUEUE")]
    assert lines == [
        "NOQUEUE: reject: RCPT from mail.example.net[192.0.2.7]: 554 5.7.1 Relay access denied; "
        "from=<s@example.com> to=<x@elsewhere.example> proto=SMTP helo=<client.example>",
        "NOQUEUE: reject: DATA from mail.example.net[192.0.2.7]: 554 5.5.1 Error: no valid "
        "recipients; from=<s@example.com> proto=SMTP helo=<client.example>",
    ]


def test_end_of_data_refusals_are_logged_with_the_queue_id_not_as_noqueue() -> None:
    h = ServerHarness()
    with capturedLogs() as events:
        lines = h.send(b"EHLO c\r\nMAIL FROM:<a@example.com>\r\nRCPT TO:<b@example.org>\r\nDATA\r\n"
                       b"Subject: x\r\n\r\n" + b"x" * 1000 + b"\r\n.\r\n")
    assert lines[-1] == Reply(500, "5.5.2", "Error: message line longer than 998 octets").toBytes()[:-2]
    assert not any(e.get("log_format", "").startswith("NOQUEUE") for e in events)


def test_an_ipv4_client_on_an_ipv6_socket_is_known_by_its_ipv4_address() -> None:
    """A listener on C{[::]} takes IPv4 clients as IPv4-mapped IPv6 addresses
    (C{::ffff:192.0.2.7}): they are known by the IPv4 address in the logs, the envelope
    and to plugins, as Postfix's smtpd (C{sane_sockaddr_to_hostaddr}) and its PROXY reader
    (C{haproxy_srvr_parse}) convert them."""
    h = ServerHarness(relay={"networks": ("192.0.2.0/24",)}, peer="::ffff:192.0.2.7", connect=False)
    with capturedLogs() as events:
        h.protocol.makeConnection(h.transport)
        h.send(b"HELO client.example\r\nMAIL FROM:<s@example.com>\r\nRCPT TO:<x@elsewhere.example>\r\n")
        h.send(b"RCPT TO:<bad\x01@elsewhere.example>\r\nDATA\r\nSubject: x\r\n\r\n.\r\nQUIT\r\n")
    ((envelope, message),) = h.spool.committed.values()
    assert envelope.client.address == "192.0.2.7" and envelope.client.relayAllowed
    assert message.startswith(b"Received: from client.example (unknown [192.0.2.7])")
    text = "\n".join(formatEvent(e) for e in events)
    assert "connect from 192.0.2.7:40000 on " in text and "NOQUEUE: reject: RCPT from unknown[192.0.2.7]: 501" in text
    assert "client=192.0.2.7 " in text
    assert "ffff" not in text
