"""Tests for L{mailrelay.queue.dsn}: RFC 3464 delivery status notifications."""

from __future__ import annotations

import email
import email.policy
import email.utils
import re
from pathlib import Path
from typing import Any

import pytest

from mailrelay.envelope import ClientInfo, Envelope, Recipient
from mailrelay.queue import dsn as dsnModule
from mailrelay.queue.dsn import (
    DSN_SOURCE,
    POSTMASTER_SOURCE,
    buildDSN,
    dsnEnvelope,
    isPostmasterNotice,
)

HOST = "relay.test"
QID = "01HZZZZZZZZZZZZZZZZZ"
ARRIVAL = 1_700_000_000.0
NOW = ARRIVAL + 3600
HEADERS = (
    b"Received: from client.example.org (client.example.org [192.0.2.1])\r\n"
    b"\tby relay.test (mailrelay) with ESMTP id " + QID.encode() + b"; Tue, 14 Nov 2023\r\n"
    b"From: Sender <sender@example.org>\r\n"
    b"To: a@example.com\r\n"
    b"Subject: the original\r\n"
    b"Message-Id: <orig@example.org>\r\n"
)
BODY = b"first body line\r\nsecond body line\r\n"
MESSAGE = HEADERS + b"\r\n" + BODY


@pytest.fixture
def original(tmp_path: Path) -> Path:
    path = tmp_path / f"{QID}.eml"
    path.write_bytes(MESSAGE)
    return path


def makeEnvelope(**kw: Any) -> Envelope:
    kw.setdefault("sender", "sender@example.org")
    return Envelope(
        queueID=QID,
        client=ClientInfo("192.0.2.1", helo="client.example.org"),
        arrival=ARRIVAL,
        messageSize=len(MESSAGE),
        **kw,
    )


def failedRecipient(address: str = "a@example.com", **kw: Any) -> Recipient:
    kw.setdefault("status", "5.1.1")
    kw.setdefault("lastResult", "smtp; 550 5.1.1 <a@example.com>: user unknown")
    kw.setdefault("remoteMTA", "dns; mx.example.com")
    kw.setdefault("finalTime", NOW - 10)
    return Recipient(address, address, state="bounced", attempts=1, **kw)


def build(
    original: Path,
    envelope: Envelope | None = None,
    recipients: list[Recipient] | None = None,
    action: str = "failed",
    **kw: Any,
) -> bytes:
    return buildDSN(
        envelope or makeEnvelope(),
        recipients or [failedRecipient()],
        action,
        hostname=HOST,
        messagePath=original,
        now=NOW,
        queueID=QID,
        **kw,
    )


def parse(dsn: bytes) -> email.message.EmailMessage:
    return email.message_from_bytes(dsn, policy=email.policy.default)  # type: ignore[return-value]


def parts(dsn: bytes) -> list[Any]:
    report = parse(dsn)
    assert report.get_content_type() == "multipart/report"
    return report.get_payload()  # type: ignore[return-value]


def deliveryStatus(dsn: bytes) -> tuple[Any, list[Any]]:
    part = parts(dsn)[1]
    assert part.get_content_type() == "message/delivery-status"
    blocks = part.get_payload()
    return blocks[0], blocks[1:]


def assertWellFormed(dsn: bytes) -> None:
    assert b"\r\n" in dsn
    assert b"\n" not in dsn.replace(b"\r\n", b""), "bare LF"
    assert b"\r" not in dsn.replace(b"\r\n", b""), "bare CR"
    assert dsn.endswith(b"\r\n")
    longest = max(len(line) for line in dsn.split(b"\r\n"))
    assert longest <= 998, f"a line of {longest} octets"
    report = parse(dsn)
    assert not report.defects
    for part in report.walk():
        assert not part.defects, (part.get_content_type(), part.defects)


# --- the top-level message ---------------------------------------------------------------------


def test_headerFields(original: Path) -> None:
    dsn = build(original)
    assertWellFormed(dsn)
    report = parse(dsn)
    assert report["From"].addresses[0].addr_spec == f"MAILER-DAEMON@{HOST}"
    assert f"From: MAILER-DAEMON@{HOST} (Mail Delivery System)\r\n".encode() in dsn
    assert b"To: <sender@example.org>\r\n" in dsn
    assert report["Subject"] == "Undelivered Mail Returned to Sender"
    # The intake's stampers add these, as to any message (tests/test_queue.py).
    assert "Date" not in report and "Message-Id" not in report and "Received" not in report
    assert report["Auto-Submitted"] == "auto-replied"
    assert report["MIME-Version"] == "1.0"
    assert report.get_content_type() == "multipart/report"
    assert report.get_param("report-type") == "delivery-status"
    assert [p.get_content_type() for p in parts(dsn)] == [
        "text/plain",
        "message/delivery-status",
        "text/rfc822-headers",
    ]


@pytest.mark.parametrize(
    "action, subject",
    [
        ("failed", "Undelivered Mail Returned to Sender"),
        ("delayed", "Delayed Mail (still being retried)"),
        ("delivered", "Successful Mail Delivery Report"),
        ("relayed", "Successful Mail Delivery Report"),
    ],
)
def test_subjects(original: Path, action: str, subject: str) -> None:
    dsn = build(original, action=action, willRetryUntil=ARRIVAL + 5 * 86400)
    assertWellFormed(dsn)
    assert parse(dsn)["Subject"] == subject
    _, [block] = deliveryStatus(dsn)
    assert block["Action"] == action


def test_badArguments(original: Path) -> None:
    with pytest.raises(ValueError):
        build(original, action="bounced")
    with pytest.raises(ValueError):
        buildDSN(
            makeEnvelope(), [], "failed", hostname=HOST, messagePath=original, now=NOW, queueID=QID
        )


# --- the human-readable part -------------------------------------------------------------------


def test_textPartExplains(original: Path) -> None:
    text = parts(build(original))[0].get_content()
    assert f"mail system at host {HOST}" in text
    assert "could not be delivered" in text
    assert "<a@example.com>: host mx.example.com said: 550 5.1.1 <a@example.com>: user unknown" in (
        " ".join(text.split())
    )


def test_textPartSaysWhoSaidIt(original: Path) -> None:
    """A reason the relay found itself (an X-mailrelay diagnostic: a SIZE limit, a missing
    extension) is not presented as what the remote host said (it read 'host [127.0.0.51]
    said: message size 3196 exceeds ...'); a server's reply still is."""
    ours = Recipient("a@example.com", status="5.3.4", remoteMTA="dns; mx.example.com",
                     lastResult="X-mailrelay; message size 3196 exceeds the size limit 500 "
                                "of mx.example.com")
    text = " ".join(parts(build(original, recipients=[ours]))[0].get_content().split())
    assert ("<a@example.com>: message size 3196 exceeds the size limit 500 of mx.example.com"
            in text), text
    assert "said" not in text


def test_textPartDelayed(original: Path) -> None:
    dsn = build(
        original,
        recipients=[Recipient("a@example.com", status="4.2.0", lastResult="smtp; 451 4.2.0 later")],
        action="delayed",
        willRetryUntil=ARRIVAL + 5 * 86400,
    )
    text = parts(dsn)[0].get_content()
    assert "THIS IS A WARNING ONLY" in text
    assert "could not be delivered for 1 hour" in text
    assert "retried until" in text and "5 days after it arrived" in text


@pytest.mark.parametrize("action", ["delivered", "relayed"])
def test_successSaysDeliveredOrRelayed(original: Path, action: str) -> None:
    """A success report says whether the message reached the mailbox or a next hop that
    will not report further (RFC 3464 2.3.3), in its Action field and its text."""
    recipient = Recipient("a@example.com", status="2.0.0", lastResult="smtp; 250 2.0.0 Ok",
                          remoteMTA="dns; store.example.com")
    dsn = build(original, recipients=[recipient], action=action)
    _, [block] = deliveryStatus(dsn)
    assert (block["Action"], block["Status"]) == (action, "2.0.0")
    text = " ".join(parts(dsn)[0].get_content().split())
    assert f"<a@example.com>: {action} via store.example.com: 250 2.0.0 Ok" in text


def test_textWrapped(original: Path) -> None:
    long = "smtp; 550 " + " ".join(["word"] * 400)
    dsn = build(original, recipients=[failedRecipient(lastResult=long)])
    assertWellFormed(dsn)
    text = parts(dsn)[0].get_content()
    assert max(len(line) for line in text.splitlines()) <= 76


# --- the delivery-status part ------------------------------------------------------------------


def test_perMessageFields(original: Path) -> None:
    perMessage, _ = deliveryStatus(build(original, envelope=makeEnvelope(envid="id+1=2 x")))
    assert perMessage["Reporting-MTA"] == f"dns; {HOST}"
    assert perMessage["X-Mailrelay-Queue-ID"] == QID
    # The ENVID as the sender gave it, xtext decoded (as Postfix's bounce daemon writes it).
    assert perMessage["Original-Envelope-Id"] == "id+1=2 x"
    assert email.utils.parsedate_to_datetime(perMessage["Arrival-Date"]).timestamp() == ARRIVAL


def test_anEnvelopeIDNotPrintableASCIIStaysXtext(original: Path) -> None:
    """An ENVID that is not printable US-ASCII (non-ASCII, accepted at MAIL; a control, from
    sendmail -V) keeps its xtext form: the message/delivery-status part is ASCII, and the
    form keeps it exact."""
    for envid, shown in (("r\u00e9f+1", "r+C3+A9f+2B1"), ("a\tb", "a+09b")):
        envelope = makeEnvelope(envid=envid)
        perMessage, _ = deliveryStatus(build(original, envelope=envelope))
        assert perMessage["Original-Envelope-Id"] == shown


def test_noEnvelopeIDField(original: Path) -> None:
    perMessage, _ = deliveryStatus(build(original))
    assert "Original-Envelope-Id" not in perMessage


def test_perRecipientFields(original: Path) -> None:
    recipients = [
        failedRecipient(orcpt="rfc822;A@Example.COM"),
        Recipient(
            "b@example.net", state="bounced", status="5.7.1", lastResult=None, remoteMTA=None
        ),
    ]
    _, [a, b] = deliveryStatus(build(original, recipients=recipients))
    assert a["Original-Recipient"] == "rfc822; A@Example.COM"
    assert a["Final-Recipient"] == "rfc822; a@example.com"
    assert a["Action"] == "failed"
    assert a["Status"] == "5.1.1"
    assert a["Remote-MTA"] == "dns; mx.example.com"
    assert a["Diagnostic-Code"] == "smtp; 550 5.1.1 <a@example.com>: user unknown"
    assert email.utils.parsedate_to_datetime(a["Last-Attempt-Date"]).timestamp() == NOW - 10
    assert "Will-Retry-Until" not in a
    assert "Original-Recipient" not in b
    assert b["Final-Recipient"] == "rfc822; b@example.net"
    assert b["Status"] == "5.7.1"
    assert "Remote-MTA" not in b and "Diagnostic-Code" not in b
    assert email.utils.parsedate_to_datetime(b["Last-Attempt-Date"]).timestamp() == NOW


def test_statusDefaults(original: Path) -> None:
    for action, expected in (("failed", "5.0.0"), ("delayed", "4.0.0"), ("delivered", "2.0.0"),
                             ("relayed", "2.0.0")):
        dsn = build(original, recipients=[Recipient("a@example.com")], action=action)
        _, [block] = deliveryStatus(dsn)
        assert block["Status"] == expected


def test_willRetryUntilForDelayedOnly(original: Path) -> None:
    until = ARRIVAL + 5 * 86400
    _, [block] = deliveryStatus(build(original, action="delayed", willRetryUntil=until))
    assert email.utils.parsedate_to_datetime(block["Will-Retry-Until"]).timestamp() == until
    _, [block] = deliveryStatus(build(original, action="failed", willRetryUntil=until))
    assert "Will-Retry-Until" not in block


def test_utf8Recipient(original: Path) -> None:
    recipient = failedRecipient("jörg@example.com", orcpt="utf-8;Jörg@example.com")
    dsn = build(original, recipients=[recipient])
    assertWellFormed(dsn)
    _, [block] = deliveryStatus(dsn)
    assert block["Final-Recipient"] == "utf-8; j\\x{F6}rg@example.com"
    assert block["Original-Recipient"] == "utf-8; J\\x{F6}rg@example.com"
    assert parts(dsn)[1].as_bytes().isascii()  # message/delivery-status stays ASCII
    text = parts(dsn)[0]
    assert text.get_content_charset() == "utf-8"
    assert "<jörg@example.com>" in text.get_content()
    assert parse(dsn)["Content-Transfer-Encoding"] == "8bit"


@pytest.mark.parametrize(
    "orcpt",
    [
        "utf-8;rej\\x{FC}@dest.test",  # utf-8-addr-xtext, as a client without SMTPUTF8 sends it
        "utf-8;rejü@dest.test",  # utf-8-addr-unitext (SMTPUTF8)
        "utf-8;rej\\x{FC}@dest.test".replace("rej", "r\u00e9j").replace("\u00e9", "\\x{E9}"),
    ],
)
def test_utf8OriginalRecipientIsEncodedOnce(original: Path, orcpt: str) -> None:
    """A utf-8 ORCPT is kept as the client wrote it, \\x{HEX} escapes and all (RFC 6533):
    the report's Original-Recipient carries the address once encoded, not its escapes
    escaped again (it read 'rej\\x{5C}x{FC}@dest.test')."""
    recipient = failedRecipient("rejü@dest.test", orcpt=orcpt)
    _, [block] = deliveryStatus(build(original, recipients=[recipient]))
    expected = "r\\x{E9}j\\x{FC}@dest.test" if "x{E9}" in orcpt else "rej\\x{FC}@dest.test"
    assert block["Original-Recipient"] == f"utf-8; {expected}"


def test_utf8Sender(original: Path) -> None:
    dsn = build(original, envelope=makeEnvelope(sender="rené@example.org", smtputf8=True))
    assertWellFormed(dsn)
    assert "To: <rené@example.org>\r\n".encode() in dsn  # RFC 6532 UTF-8 header


def test_quotedAddressesKeptExactly(original: Path) -> None:
    """A quoted local part keeps its runs of spaces in every field that names it (RFC 3464
    2.3.1-2.3.2: the address as given), and a field is never folded inside a quoted string:
    folding made '"x  y"@example.com' read '"x y"@example.com'."""
    sender = '"x  y"@example.com'
    long = '"' + "w " * 30 + ' z"@example.org'  # a field of more than 78 characters
    recipients = [
        failedRecipient('"a  b"@example.org', orcpt='rfc822;"a  b"@example.org'),
        failedRecipient(long, orcpt=f"rfc822;{long}"),
    ]
    dsn = build(original, envelope=makeEnvelope(sender=sender), recipients=recipients)
    assertWellFormed(dsn)
    assert b'\r\nTo: <"x  y"@example.com>\r\n' in dsn
    assert b'\r\nX-Mailrelay-Sender: rfc822; "x  y"@example.com\r\n' in dsn
    unfolded = re.sub(rb"\r\n(?=[ \t])", b"", dsn)  # RFC 5322 2.2.3
    for address in ('"a  b"@example.org', long):
        assert dsn.count(f" {address}\r\n".encode()) == 2  # on one line, not folded
        for name in ("Original-Recipient", "Final-Recipient"):
            assert f"\r\n{name}: rfc822; {address}\r\n".encode() in unfolded
    perMessage, [a, b] = deliveryStatus(dsn)
    assert perMessage["X-Mailrelay-Sender"] == f"rfc822; {sender}"
    assert a["Final-Recipient"] == 'rfc822; "a  b"@example.org'
    assert b["Original-Recipient"] == f"rfc822; {long}"


def test_foldingKeepsTheValue(original: Path) -> None:
    """A folded field unfolds to its value exactly (RFC 5322 2.2.3): folded only before a
    space, which stays, and runs of spaces are kept."""
    diagnostic = "smtp; 550 5.7.1  two  spaces" + " word" * 40 + "   three"
    dsn = build(original, recipients=[failedRecipient(lastResult=diagnostic)])
    assertWellFormed(dsn)
    field = re.search(rb"\r\nDiagnostic-Code: (.*?)\r\n(?![ \t])", dsn, re.S)
    assert field and b"\r\n " in field.group(1)  # folded
    assert field.group(1).replace(b"\r\n", b"").decode() == diagnostic


def test_longDiagnosticFolded(original: Path) -> None:
    diagnostic = "smtp; 550 5.7.1 " + "x" * 2500 + " and " + "y " * 300
    dsn = build(original, recipients=[failedRecipient(lastResult=diagnostic)])
    assertWellFormed(dsn)
    _, [block] = deliveryStatus(dsn)
    assert block["Diagnostic-Code"].startswith("smtp; 550 5.7.1 xxx")
    assert block["Diagnostic-Code"].replace(" ", "").count("x") == 2500


def test_controlCharactersInDiagnostic(original: Path) -> None:
    dsn = build(original, recipients=[failedRecipient(lastResult="smtp; 550 bad\r\nInjected: yes")])
    assertWellFormed(dsn)
    _, [block] = deliveryStatus(dsn)
    assert "Injected" not in block.keys()
    assert block["Diagnostic-Code"] == "smtp; 550 bad Injected: yes"


# --- the returned original ---------------------------------------------------------------------


def test_headersReturnedByDefault(original: Path) -> None:
    for ret in (None, "HDRS"):
        third = parts(build(original, envelope=makeEnvelope(ret=ret)))[2]
        assert third.get_content_type() == "text/rfc822-headers"
        content = third.get_payload(decode=True)
        assert content == HEADERS
        assert b"first body line" not in content


def test_fullMessageReturnedWithRetFull(original: Path) -> None:
    dsn = build(original, envelope=makeEnvelope(ret="FULL"))
    assertWellFormed(dsn)
    third = parts(dsn)[2]
    assert third.get_content_type() == "message/rfc822"
    [inner] = third.get_payload()
    assert inner["Subject"] == "the original"
    assert inner["Message-Id"] == "<orig@example.org>"
    assert inner.get_content() == BODY.decode()
    assert MESSAGE in dsn  # byte for byte
    assert "It is attached below." in parts(dsn)[0].get_content()


def test_retFullOnlyForFailures(original: Path) -> None:
    dsn = build(original, envelope=makeEnvelope(ret="FULL"), action="delayed")
    assert parts(dsn)[2].get_content_type() == "text/rfc822-headers"


def test_fullMessageTooLargeReturnsHeaders(original: Path) -> None:
    original.write_bytes(HEADERS + b"\r\n" + b"body line of some length\r\n" * 2000)
    dsn = build(original, envelope=makeEnvelope(ret="FULL"), maxOriginal=10_000)
    assertWellFormed(dsn)
    assert len(dsn) < 10_000
    third = parts(dsn)[2]
    assert third.get_content_type() == "text/rfc822-headers"
    assert b"body line" not in dsn
    text = parts(dsn)[0].get_content()
    assert "larger than the limit of 10000 octets" in " ".join(text.split())
    assert "Its header section is attached below." in text


def test_hugeHeaderSectionCutAtLineBoundary(original: Path) -> None:
    fields = b"".join(b"X-Filler-%04d: %s\r\n" % (i, b"v" * 50) for i in range(500))
    original.write_bytes(HEADERS + fields + b"\r\n" + BODY)
    dsn = build(original, maxOriginal=5000)
    assertWellFormed(dsn)
    content = parts(dsn)[2].get_payload(decode=True).replace(b"\r\n", b"\n")
    assert len(content) <= 5000
    assert content.endswith(b"\n")
    for line in content.splitlines():
        assert re.fullmatch(rb"(X-Filler-\d{4}: v{50}|[A-Za-z-]+: .*|\t.*)", line), line
    assert "truncated" in parts(dsn)[0].get_content()


def test_messageWithoutBody(original: Path) -> None:
    original.write_bytes(HEADERS)
    for ret in ("FULL", "HDRS"):
        dsn = build(original, envelope=makeEnvelope(ret=ret))
        assertWellFormed(dsn)
        third = parts(dsn)[2]
        assert HEADERS in dsn
        assert "truncated" not in parts(dsn)[0].get_content()
        assert third.get_content_type() in ("message/rfc822", "text/rfc822-headers")


def test_bareLineEndsInOriginalNormalised(original: Path) -> None:
    original.write_bytes(b"Subject: x\nFrom: a@b\r\n\nbody\rmore\n")
    for ret in ("FULL", "HDRS"):
        assertWellFormed(build(original, envelope=makeEnvelope(ret=ret)))


def test_overlongOriginalLines(original: Path) -> None:
    original.write_bytes(b"Subject: " + b"s" * 1500 + b"\r\n\r\n" + b"b" * 1500 + b"\r\n")
    dsn = build(original, envelope=makeEnvelope(ret="FULL"))
    assertWellFormed(dsn)
    assert parts(dsn)[2].get_content_type() == "text/rfc822-headers"
    assert "lines too long" in parts(dsn)[0].get_content()


def test_eightBitHeadersUseGlobalTypes(original: Path) -> None:
    original.write_bytes("Subject: Grüße\r\nFrom: jörg@example.org\r\n\r\nbody\r\n".encode())
    dsn = build(original, envelope=makeEnvelope(ret="HDRS"))
    assertWellFormed(dsn)
    third = parts(dsn)[2]
    assert third.get_content_type() == "message/global-headers"
    assert third["Content-Transfer-Encoding"] == "8bit"
    assert "Subject: Grüße\r\n".encode() in dsn
    dsn = build(original, envelope=makeEnvelope(ret="FULL"))
    assertWellFormed(dsn)
    assert parts(dsn)[2].get_content_type() == "message/global"


def test_eightBitBodyFull(original: Path) -> None:
    original.write_bytes(
        b"Subject: x\r\nContent-Type: text/plain; charset=latin-1\r\n\r\n\xe9t\xe9\r\n"
    )
    dsn = build(original, envelope=makeEnvelope(ret="FULL"))
    assertWellFormed(dsn)
    third = parts(dsn)[2]
    assert third.get_content_type() == "message/rfc822"
    assert third["Content-Transfer-Encoding"] == "8bit"
    assert b"\xe9t\xe9\r\n" in dsn


BINARY_HEADERS = (
    b"Subject: bin\r\nMIME-Version: 1.0\r\nContent-Type: application/octet-stream\r\n"
    b"Content-Transfer-Encoding: binary\r\n"
)


@pytest.mark.parametrize("ret", ["FULL", "HDRS"])
def test_binaryMessageReturnsItsHeaderSection(original: Path, ret: str) -> None:
    """A BODY=BINARYMIME message (RFC 3030) is any octets, which no part of a report sent as
    text may carry (RFC 6152: no NUL, CRLF lines): with RET=FULL too, only its header section
    is returned, as it is, and the text says why.  The whole message used to come back with
    its bare CRs and LFs made CRLF and its NULs in a message/rfc822 part labelled 8bit."""
    original.write_bytes(BINARY_HEADERS + b"\r\n" + bytes(range(256)) + b"\nX\rY\r\n")
    dsn = build(original, envelope=makeEnvelope(ret=ret, body="BINARYMIME"))
    assertWellFormed(dsn)
    assert b"\0" not in dsn and dsn.isascii()
    third = parts(dsn)[2]
    assert third.get_content_type() == "text/rfc822-headers"
    assert third["Content-Transfer-Encoding"] == "7bit"
    assert third.get_payload(decode=True) == BINARY_HEADERS
    text = " ".join(parts(dsn)[0].get_content().split())
    assert "Its header section is attached below." in text
    assert ("The original message is binary (BODY=BINARYMIME)" in text) == (ret == "FULL")
    envelope = dsnEnvelope(makeEnvelope(), to="sender@example.org", now=NOW, message=dsn)
    assert envelope.body is None  # 7-bit


def test_binaryHeaderSectionWithNulNotReturned(original: Path) -> None:
    """A binary message whose header section has a NUL (or that has none, its first line
    binary): nothing of it is returned, as no text part may hold a NUL."""
    for content in (b"Subject: a\0b\r\n\r\nbody\r\n", b"\0\x01\x02\r\nmore\r\n"):
        original.write_bytes(content)
        dsn = build(original, envelope=makeEnvelope(ret="FULL", body="BINARYMIME"))
        assertWellFormed(dsn)
        assert b"\0" not in dsn
        assert len(parts(dsn)) == 2
        assert "not text" in " ".join(parts(dsn)[0].get_content().split())


def test_unreadableOriginal(tmp_path: Path) -> None:
    dsn = build(tmp_path / "missing.eml")
    assertWellFormed(dsn)
    assert len(parts(dsn)) == 2
    assert "could not be read" in parts(dsn)[0].get_content()


def test_nothingReturnedOfARequireTLSMessage(original: Path) -> None:
    """A report about a message sent with REQUIRETLS (RFC 8689) travels without that
    protection: none of the message is returned, not even with RET=FULL."""
    dsn = build(original, envelope=makeEnvelope(requireTLS=True, ret="FULL"))
    assertWellFormed(dsn)
    assert len(parts(dsn)) == 2
    assert b"Subject:" not in dsn.split(b"\r\n\r\n", 1)[1]
    assert "sent with REQUIRETLS, so none of it is returned" in " ".join(
        parts(dsn)[0].get_content().split())


def test_boundaryNotInContent(original: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    original.write_bytes(HEADERS + b"\r\n--" + QID.encode() + b".aaaaaaaaaaaaaaaa=_\r\nmore\r\n")
    tokens = iter(["aaaaaaaaaaaaaaaa", "bbbbbbbbbbbbbbbb", "cafe"])
    monkeypatch.setattr(dsnModule.secrets, "token_hex", lambda n: next(tokens))
    dsn = build(original, envelope=makeEnvelope(ret="FULL"))
    assertWellFormed(dsn)
    report = parse(dsn)
    assert report.get_boundary() == f"{QID}.bbbbbbbbbbbbbbbb=_"
    assert len(report.get_payload()) == 3
    assert MESSAGE.split(b"\r\n\r\n")[0] in dsn
    assert b"\r\n--" + QID.encode() + b".aaaaaaaaaaaaaaaa=_\r\nmore\r\n" in dsn


def test_boundariesAreRandom(original: Path) -> None:
    assert parse(build(original)).get_boundary() != parse(build(original)).get_boundary()


# --- the notification's envelope ---------------------------------------------------------------


def test_dsnEnvelope() -> None:
    dsn = b"Subject: x\r\n\r\nbody\r\n"
    env = dsnEnvelope(
        makeEnvelope(), to="sender@example.org", queueID="01J00000000000000000", now=NOW,
        hostname=HOST, message=dsn,
    )
    assert env.sender == ""
    assert [(r.address, r.state) for r in env.recipients] == [("sender@example.org", "pending")]
    assert env.queueID == "01J00000000000000000"
    assert env.isBounce
    assert env.arrival == NOW
    assert env.messageSize == len(dsn)
    assert env.body is None and not env.smtputf8
    assert env.ret is None and env.envid is None
    assert env.client is not None
    client = env.client
    assert (client.address, client.helo, client.listener) == ("127.0.0.1", HOST, DSN_SOURCE)
    assert env.client.relayAllowed
    assert not isPostmasterNotice(env)
    assert Envelope.fromJSON(env.toJSON()) == env


def test_dsnEnvelopeEightBitAndPostmaster() -> None:
    original = makeEnvelope(sender="rené@example.org", smtputf8=True)
    message = "To: <rené@example.org>\r\n\r\n".encode()
    env = dsnEnvelope(original, to="rené@example.org", queueID=QID, now=NOW, message=message)
    assert env.body == "8BITMIME" and env.smtputf8
    notice = dsnEnvelope(original, to="postmaster@x", queueID=QID, now=NOW, postmasterNotice=True)
    assert notice.client is not None and notice.client.listener == POSTMASTER_SOURCE
    assert isPostmasterNotice(notice)
    assert isPostmasterNotice(Envelope.fromJSON(notice.toJSON()))


def test_notificationToOtherAddress(original: Path) -> None:
    dsn = build(original, envelope=makeEnvelope(sender=""), to="postmaster@relay.test")
    assertWellFormed(dsn)
    assert b"To: <postmaster@relay.test>\r\n" in dsn
    perMessage, _ = deliveryStatus(dsn)
    assert "X-Mailrelay-Sender" not in perMessage


@pytest.mark.parametrize(("action", "text"), [
    ("delayed", "<a@example.com>: host mx.example.com[192.0.2.1] said: 421 4.3.2 busy "
                "(in reply to RCPT TO command)"),
    ("failed", "<a@example.com>: message expired after 1 hour in the queue; the last attempt: "
               "host mx.example.com[192.0.2.1] said: 421 4.3.2 busy (in reply to RCPT TO "
               "command)"),
])
def test_textPartNamesTheHostOfTheLastAttempt(original: Path, action: str, text: str) -> None:
    """Found by a review: the bounce after max_lifetime said "the last attempt said: 421 ..."
    without the host that said it, which the delay warning and Postfix's bounce name (the
    defer log's text: "host mx.example[192.0.2.1] said: 421 ..."); the host of the last
    attempt (its Remote-MTA) is named in both, where its reply is the server's."""
    deferred = Recipient(
        "a@example.com", status="4.3.2", remoteMTA="dns; mx.example.com[192.0.2.1]",
        lastResult="smtp; 421 4.3.2 busy", command="RCPT TO")
    dsn = build(original, recipients=[deferred], action=action,
                willRetryUntil=ARRIVAL + 86400 if action == "delayed" else None)
    assert text in " ".join(parts(dsn)[0].get_content().split())


@pytest.mark.parametrize(("remoteMTA", "address", "host"), [
    ("dns; mx.example.com", "192.0.2.1", "mx.example.com[192.0.2.1]"),
    ("dns; [192.0.2.1]", "192.0.2.1", "192.0.2.1[192.0.2.1]"),  # (a literal next hop)
    ("dns; mx.example.com", None, "mx.example.com"),  # (a record of an older relay)
])
def test_textPartNamesTheHostWithTheAddressItSpokeFrom(
    original: Path, remoteMTA: str, address: str | None, host: str
) -> None:
    """The text says which server said it as Postfix's does, name[address]
    (smtp_proto.c: "host %s said: %s", session->namaddr), from the address recorded with
    the status; the Remote-MTA field stays the name (RFC 3464 2.3.5).  A record without
    the address (written by an older relay) names the host alone."""
    refused = Recipient("a@example.com", status="5.1.1", remoteMTA=remoteMTA,
                        remoteAddress=address,
                        lastResult="smtp; 550 5.1.1 unknown", command="RCPT TO")
    dsn = build(original, recipients=[refused])
    _, [block] = deliveryStatus(dsn)
    assert block["Remote-MTA"] == remoteMTA
    text = " ".join(parts(dsn)[0].get_content().split())
    assert f"<a@example.com>: host {host} said: 550 5.1.1 unknown" in text, text


@pytest.mark.parametrize(("command", "said"), [
    ("RCPT TO", "550 5.1.1 unknown (in reply to RCPT TO command)"),
    ("end of DATA", "550 5.1.1 unknown (in reply to end of DATA command)"),
    (None, "550 5.1.1 unknown"),  # (a record of an older relay)
])
def test_textPartSaysWhichCommandTheReplyAnswered(original: Path, command: str | None,
                                                  said: str) -> None:
    """The text says to which command the server's reply answered, as Postfix's bounce
    (smtp_trouble.c: "host %s said: %s (in reply to %s command)"); the Diagnostic-Code
    field is the reply alone (RFC 3464 2.3.6).  A record without the command (written by
    an older relay) says the reply alone."""
    refused = Recipient("a@example.com", status="5.1.1", remoteMTA="dns; mx.example.com",
                        remoteAddress="192.0.2.1", lastResult="smtp; 550 5.1.1 unknown",
                        command=command)
    dsn = build(original, recipients=[refused])
    _, [block] = deliveryStatus(dsn)
    assert block["Diagnostic-Code"] == "smtp; 550 5.1.1 unknown"
    text = " ".join(parts(dsn)[0].get_content().split())
    assert text.endswith(f"<a@example.com>: host mx.example.com[192.0.2.1] said: {said}"), text


def test_textPartOfAnExpiredMessageWithoutAHost(original: Path) -> None:
    """Without a Remote-MTA (the connection refused), or a reason of the relay's own, the
    last attempt's words as they are."""
    refused = Recipient("a@example.com", status="4.4.1", remoteMTA="dns; mx.example.com",
                        lastResult="X-mailrelay; connection refused by mx.example.com")
    text = " ".join(parts(build(original, recipients=[refused]))[0].get_content().split())
    assert ("<a@example.com>: message expired after 1 hour in the queue; the last attempt "
            "said: connection refused by mx.example.com") in text, text


@pytest.mark.parametrize(("action", "text"), [
    ("delayed", "<a@example.com>: delivery temporarily suspended: host mx.example.com said: "
                "421 4.3.2 mx.example.com busy"),
    ("failed", "<a@example.com>: message expired after 1 hour in the queue; the last attempt "
               "said: delivery temporarily suspended: host mx.example.com said: 421 4.3.2 "
               "mx.example.com busy"),
])
def test_aReasonBesideTheDiagnostic(original: Path, action: str, text: str) -> None:
    """A recipient deferred by a suspended next hop (a reason recorded beside the failure's
    diagnostic): the Diagnostic-Code is the server's reply, typed smtp, with its Remote-MTA,
    and the text says the reason, as Postfix's bounce daemon writes a DSN's dtype; dtext and
    its reason apart.  Both said the reason, the Diagnostic-Code typed X-mailrelay."""
    suspended = Recipient(
        "a@example.com", status="4.3.2", remoteMTA="dns; mx.example.com",
        lastResult="smtp; 421 4.3.2 mx.example.com busy",
        reason="delivery temporarily suspended: host mx.example.com said: 421 4.3.2 "
               "mx.example.com busy")
    dsn = build(original, recipients=[suspended], action=action,
                willRetryUntil=ARRIVAL + 86400 if action == "delayed" else None)
    _, [block] = deliveryStatus(dsn)
    assert (block["Status"], block["Remote-MTA"], block["Diagnostic-Code"]) == (
        "4.3.2", "dns; mx.example.com", "smtp; 421 4.3.2 mx.example.com busy")
    assert text in " ".join(parts(dsn)[0].get_content().split())


def test_successTextNamesTheServerWithTheAddressItSpokeFrom(original: Path) -> None:
    """A success report's text names the server that took the message as a failure's
    does, name[address] (Postfix's trace.c: "delivery via %s: ", the session's namaddrport),
    from the address recorded with the status; the Remote-MTA field stays the name (RFC
    3464 2.3.5), and a record without the address names the host alone."""
    recipient = Recipient("a@example.com", status="2.0.0", lastResult="smtp; 250 2.0.0 Ok",
                          remoteMTA="dns; store.example.com", remoteAddress="192.0.2.7")
    dsn = build(original, recipients=[recipient], action="relayed")
    _, [block] = deliveryStatus(dsn)
    assert block["Remote-MTA"] == "dns; store.example.com"
    text = " ".join(parts(dsn)[0].get_content().split())
    assert "<a@example.com>: relayed via store.example.com[192.0.2.7]: 250 2.0.0 Ok" in text, text
