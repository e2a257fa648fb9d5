"""Tests for L{mailrelay.delivery.mime}: 8-bit and binary MIME made 7-bit for a next hop
without 8BITMIME (RFC 6152).

Property tests (hypothesis) build MIME messages -- nested multiparts, encapsulated messages,
text and binary leaves with 8-bit content -- and check that the conversion is 7-bit, keeps
every line within the limits, decodes (with the standard library's C{email}) to the very
same parts and contents, leaves 7-bit messages untouched and is idempotent.  Examples pin the
refusals (5.6.3 territory) and the details.
"""

from __future__ import annotations

import email
import email.policy
import re
from pathlib import Path
from typing import Any

import pytest
from hypothesis import assume, given, settings
from hypothesis import strategies as st

from mailrelay.delivery.mime import ConversionImpossible, downgrade, needsEncoding

CRLF = b"\r\n"
MARK = b"=_b"  # boundaries start with this, which no generated content holds


def _lineBytes(binary: bool) -> Any:
    if binary:
        return st.binary(max_size=120)
    # 8BITMIME content: CRLF lines, no NUL (RFC 6152).
    return st.binary(max_size=120).map(
        lambda b: b.replace(b"\r", b"").replace(b"\n", b"").replace(b"\0", b""))


@st.composite
def leaves(draw: Any, binary: bool) -> tuple[bytes, bytes]:
    """C{(header, body)} of a leaf entity: text or not, 8bit (or binary) encoded."""
    text = draw(st.booleans())
    ctype = (b"text/" + draw(st.sampled_from([b"plain", b"html"])) + b"; charset=utf-8"
             if text else draw(st.sampled_from([b"application/octet-stream", b"image/png"])))
    lines = draw(st.lists(_lineBytes(binary and not text), max_size=6))
    body = CRLF.join(lines) + (CRLF if lines and draw(st.booleans()) else b"")
    cte = draw(st.sampled_from([b"8bit", b"binary" if binary else b"8bit", None]))
    header = b"Content-Type: " + ctype + CRLF
    if cte is not None:
        header += b"Content-Transfer-Encoding: " + cte + CRLF
    if draw(st.booleans()):
        header += b"Content-Disposition: attachment;\r\n\tfilename=\"x.bin\"\r\n"
    return header, body


def entities(binary: bool) -> Any:
    """C{(header, body)} of any entity, nested up to a few levels."""
    return st.recursive(
        leaves(binary),
        lambda children: st.one_of(multiparts(children), encapsulated(children)),
        max_leaves=8,
    )


@st.composite
def multiparts(draw: Any, children: Any) -> tuple[bytes, bytes]:
    parts = draw(st.lists(children, min_size=1, max_size=4))
    boundary = MARK + str(draw(st.integers(0, 10**9))).encode()
    subtype = draw(st.sampled_from([b"mixed", b"alternative", b"related"]))
    header = b"Content-Type: multipart/" + subtype + b"; boundary=\"" + boundary + b"\"" + CRLF
    if draw(st.booleans()):
        header += b"Content-Transfer-Encoding: 8bit" + CRLF
    body = draw(st.sampled_from([b"", b"This is a multi-part message.\r\n"]))
    for h, b in parts:
        body += b"--" + boundary + CRLF + h + CRLF + b + CRLF
    body += b"--" + boundary + b"--" + CRLF + draw(st.sampled_from([b"", b"epilogue\r\n"]))
    return header, body


@st.composite
def encapsulated(draw: Any, children: Any) -> tuple[bytes, bytes]:
    h, b = draw(children)
    inner = b"Subject: attached\r\nMIME-Version: 1.0\r\n" + h + CRLF + b
    return b"Content-Type: message/rfc822\r\n", inner


@st.composite
def messages(draw: Any, binary: bool = False) -> bytes:
    header, body = draw(entities(binary))
    top = b"From: <a@example.org>\r\nSubject: test\r\nMIME-Version: 1.0\r\n"
    return top + header + CRLF + body


def wellFormed(message: bytes) -> bool:
    """Whether the generated C{message} is a valid MIME message: no content line looks like a
    boundary, and no two multiparts share a boundary."""
    boundaries = re.findall(rb'boundary="(' + re.escape(MARK) + rb'\d+)"', message)
    if len(set(boundaries)) != len(boundaries):
        return False
    rest = re.sub(rb'boundary="' + re.escape(MARK) + rb'\d+"', b"", message)
    rest = re.sub(rb"(^|\r\n)--" + re.escape(MARK) + rb"\d+(--)?\r\n", b"\r\n", rest)
    return MARK not in rest


def leafContents(message: bytes) -> list[tuple[str, bytes | None]]:
    """The content type and decoded content of every part, in order (multiparts and
    messages: their type only)."""
    parsed = email.message_from_bytes(message, policy=email.policy.compat32)
    out: list[tuple[str, bytes | None]] = []
    for part in parsed.walk():
        if part.is_multipart():
            out.append((part.get_content_type(), None))
        else:
            out.append((part.get_content_type(), part.get_payload(decode=True)))
    return out


def unixLines(data: bytes) -> bytes:
    return data.replace(b"\r\n", b"\n")


@settings(max_examples=300, deadline=None)
@given(message=messages())
def test_downgradeIs7BitAndKeepsEveryPart(message: bytes) -> None:
    assume(wellFormed(message))
    converted, count = downgrade(message)
    assert not needsEncoding(converted, binary=True)  # 7-bit, CRLF lines, no NUL
    assert all(len(line) <= 998 for line in converted.split(CRLF))
    assert (count == 0) == (not needsEncoding(message))
    if count == 0:
        assert converted is message  # nothing to do: not a byte changed
    # The same tree of parts, with the same decoded contents.  (A text part's line breaks
    # decode as the parser sees them: compared without CRs, which the 8bit original keeps
    # and quoted-printable decoding does not.)
    before, after = leafContents(message), leafContents(converted)
    assert [t for t, _ in before] == [t for t, _ in after]
    for (ctype, a), (_, b) in zip(before, after, strict=True):
        if a is None:
            continue
        if ctype.startswith("text/"):
            assert unixLines(a) == unixLines(b)
        else:
            assert a == b
    assert downgrade(converted) == (converted, 0)  # idempotent


@settings(max_examples=200, deadline=None)
@given(message=messages(binary=True))
def test_binaryMIMEBecomes7Bit(message: bytes) -> None:
    """BINARYMIME content (bare CR, LF, NUL in non-text parts) is encoded too."""
    assume(wellFormed(message))
    converted, _ = downgrade(message, binary=True)
    assert not needsEncoding(converted, binary=True)
    before, after = leafContents(message), leafContents(converted)
    assert [t for t, _ in before] == [t for t, _ in after]
    for (ctype, a), (_, b) in zip(before, after, strict=True):
        if a is not None and not ctype.startswith("text/"):
            assert a == b


def test_onlyTheEightBitPartChanges() -> None:
    message = (b"MIME-Version: 1.0\r\nContent-Type: multipart/mixed; boundary=X\r\n\r\n"
               b"--X\r\nContent-Type: text/plain\r\n\r\nplain ascii\r\n"
               b"--X\r\nContent-Type: text/plain; charset=utf-8\r\n"
               b"Content-Transfer-Encoding: 8bit\r\n\r\ngr\xc3\xbc\xc3\x9fe  \r\n.\r\n"
               b"--X--\r\n")
    converted, count = downgrade(message)
    assert count == 1
    assert converted == (
        b"MIME-Version: 1.0\r\nContent-Type: multipart/mixed; boundary=X\r\n\r\n"
        b"--X\r\nContent-Type: text/plain\r\n\r\nplain ascii\r\n"
        b"--X\r\nContent-Type: text/plain; charset=utf-8\r\n"
        b"Content-Transfer-Encoding: quoted-printable\r\n\r\ngr=C3=BC=C3=9Fe =20\r\n=2E\r\n"
        b"--X--\r\n")


@pytest.mark.parametrize("ctype", [
    "message/global", "message/global-headers", "message/global-delivery-status",
    "message/global-disposition-notification"])
def test_internationalizedMessageTypesAreEncodedLikeText(ctype: str) -> None:
    """Unlike message/rfc822 (RFC 2046: 7-bit only), the message/global types of RFC 6532
    and RFC 6533 may be sent quoted-printable or base64 over a 7-bit path.  Refused, the
    relay's own bounce of an SMTPUTF8 message (its message/global-headers part) could not
    go to a next hop without 8BITMIME and was discarded: the sender never told (found by a
    bug hunt)."""
    utf8 = b"From: <j\xc3\xb6rg@example.org>\r\nSubject: gr\xc3\xbc\xc3\x9fe\r\n"
    message = (b"MIME-Version: 1.0\r\nContent-Type: multipart/report; report-type=delivery-status;"
               b" boundary=R\r\n\r\n--R\r\nContent-Type: text/plain\r\n\r\nfailed\r\n"
               b"--R\r\nContent-Type: " + ctype.encode() + b"\r\n"
               b"Content-Transfer-Encoding: 8bit\r\n\r\n" + utf8 + b"--R--\r\n")
    converted, count = downgrade(message)
    assert count == 1 and not needsEncoding(converted, binary=False)
    assert converted == message.replace(b"8bit", b"quoted-printable").replace(
        utf8, b"From: <j=C3=B6rg@example.org>\r\nSubject: gr=C3=BC=C3=9Fe\r\n")


def test_messageWithoutMIME() -> None:
    converted, count = downgrade(b"Subject: hi\r\n\r\nK\xc3\xa4se\r\n")
    assert count == 1
    assert converted == (b"Subject: hi\r\nMIME-Version: 1.0\r\n"
                         b"Content-Type: text/plain; charset=unknown-8bit\r\n"
                         b"Content-Transfer-Encoding: quoted-printable\r\n\r\nK=C3=A4se\r\n")


def test_longLinesGetSoftBreaks() -> None:
    converted, _ = downgrade(b"MIME-Version: 1.0\r\n\r\n" + b"\xe9" * 500 + b"\r\n")
    lines = converted.split(CRLF)
    assert max(len(line) for line in lines) <= 76 and lines[-2].endswith(b"=E9")


@pytest.mark.parametrize("message, why", [
    (b"DKIM-Signature: v=1; a=rsa-sha256; d=example.org\r\nMIME-Version: 1.0\r\n\r\n\xff\r\n",
     "DKIM-signed"),
    (b"Subject: \xc3\xa9t\xc3\xa9\r\n\r\n\xff\r\n", "header section"),
    (b"MIME-Version: 1.0\r\nContent-Type: multipart/mixed; boundary=X\r\n\r\n--X\r\n"
     b"Content-Type: text/plain; name=\"\xc3\xa9\"\r\n\r\nx\r\n--X--\r\n", "header section"),
    (b"MIME-Version: 1.0\r\nContent-Type: multipart/mixed\r\n\r\n\xff\r\n", "no boundary"),
    (b"MIME-Version: 1.0\r\nContent-Type: multipart/mixed; boundary=X\r\n\r\n\xff\r\n--X\r\n"
     b"\r\nx\r\n--X--\r\n", "outside the parts"),
    (b"MIME-Version: 1.0\r\nContent-Type: text/plain\r\nContent-Transfer-Encoding: base64\r\n"
     b"\r\n\xff\r\n", "declared base64"),
    (b"MIME-Version: 1.0\r\nContent-Type: message/partial; id=1\r\n\r\n\xff\r\n",
     "message/partial"),
])
def test_conversionImpossible(message: bytes, why: str) -> None:
    with pytest.raises(ConversionImpossible, match=re.escape(why)):
        downgrade(message)


def test_dkimSignedButSevenBitIsUntouched() -> None:
    message = b"DKIM-Signature: v=1; d=example.org\r\nSubject: x\r\n\r\nascii\r\n"
    assert downgrade(message) == (message, 0)


def test_digestPartsDefaultToMessages() -> None:
    inner = b"Subject: one\r\nMIME-Version: 1.0\r\n\r\nna\xc3\xafve\r\n"
    message = (b"MIME-Version: 1.0\r\nContent-Type: multipart/digest; boundary=D\r\n\r\n"
               b"--D\r\n\r\n" + inner + b"--D--\r\n")
    converted, count = downgrade(message)
    assert count == 1
    assert b"\r\n--D\r\n\r\nSubject: one\r\nMIME-Version: 1.0\r\n" in converted
    assert b"na=C3=AFve" in converted


# The SMTP backend converts for a next hop without 8BITMIME -----------------------------------


def _backendTo(extensions: dict[str, str]) -> tuple[Any, list[tuple[Any, bytes, str, bool]]]:
    """The SMTP backend of L{tests.test_delivery}, its next hops offering C{extensions}; what
    each connection was given to send: C{(envelope body, content, path, lineEndsChecked)}."""
    from tests.test_delivery import FakeConnection, smtpBackend

    backend, net, _, _ = smtpBackend()
    given: list[tuple[Any, bytes, str, bool]] = []

    def newConnection(address: str, remoteMTA: str) -> FakeConnection:
        connection = FakeConnection(net, address, remoteMTA)
        connection.extensions = dict(extensions)
        send = connection.send

        def recording(envelope: Any, recipients: Any, path: Any, **kw: Any) -> Any:
            checked = kw.get("lineEndsChecked", False)
            given.append((envelope.body, Path(path).read_bytes(), str(path), checked))
            return send(envelope, recipients, path, **kw)

        connection.send = recording  # type: ignore[method-assign]
        net.connections.append(connection)
        return connection

    net.newConnection = newConnection  # type: ignore[method-assign]
    return backend, given


def _deliver(backend: Any, path: Path, body: str | None = "8BITMIME") -> list[Any]:
    from mailrelay.envelope import Envelope, Recipient
    from mailrelay.interfaces import Route
    from tests.test_delivery import result

    env = Envelope(sender="a@example.com", recipients=[Recipient("b@example.net")],
                   queueID="Q" * 20, body=body)
    return result(backend.deliver(env, env.recipients, Route("smtp", "example.net"), path))


EIGHT_BIT = b"Subject: x\r\nMIME-Version: 1.0\r\n\r\ncaf\xc3\xa9\r\n"


def test_backendConvertsForANextHopWithout8BITMIME(tmp_path: Path) -> None:
    path = tmp_path / "m.eml"
    path.write_bytes(EIGHT_BIT)
    backend, given = _backendTo({"PIPELINING": ""})
    (r,) = _deliver(backend, path)
    assert r.status.value == "delivered"
    [(body, content, sent, checked)] = given
    assert body is None  # no BODY=8BITMIME for a 7-bit message
    assert not checked  # a converted file is checked as it is sent
    assert content == downgrade(EIGHT_BIT)[0] and not needsEncoding(content)
    assert sent != str(path) and not Path(sent).exists()  # the converted copy is gone
    assert path.read_bytes() == EIGHT_BIT  # the spool file is never changed
    # (Undeclared 8-bit content is found and converted too.)
    backend, given = _backendTo({})
    _deliver(backend, path, body=None)
    assert given[0][1] == downgrade(EIGHT_BIT)[0]


def test_backendSendsAsIsWith8BITMIME(tmp_path: Path) -> None:
    path = tmp_path / "m.eml"
    path.write_bytes(EIGHT_BIT)
    backend, given = _backendTo({"8BITMIME": ""})
    _deliver(backend, path)
    # The spooled file, whose line ends the intake checked: streamed without checks.
    assert given == [("8BITMIME", EIGHT_BIT, str(path), True)]


def test_backendBouncesWhatCannotBeConverted(tmp_path: Path) -> None:
    path = tmp_path / "m.eml"
    path.write_bytes(b"DKIM-Signature: v=1; d=example.com\r\n" + EIGHT_BIT)
    backend, given = _backendTo({})
    (r,) = _deliver(backend, path)
    assert (r.status.value, r.code) == ("permanent", "5.6.3")
    assert r.diagnostic == (
        "X-mailrelay; mx.example.net does not support 8BITMIME, and the message cannot be "
        "converted to 7 bits: the message is DKIM-signed, and converting it would break the "
        "signature")
    assert given == []


def test_backendsConversionFailuresNameNoRemoteMTA(tmp_path: Path) -> None:
    """A message the relay cannot convert for a next hop without 8BITMIME (5.6.3), or whose
    file it cannot read to convert (4.3.0), fails by the relay's own verdict: no Remote-MTA,
    as Postfix's smtp_mime_fail() reports with DSN_BY_LOCAL_MTA (RFC 3464 2.3.5)."""
    path = tmp_path / "m.eml"
    path.write_bytes(b"DKIM-Signature: v=1; d=example.com\r\n" + EIGHT_BIT)
    backend, given = _backendTo({})
    (impossible,) = _deliver(backend, path)
    backend, given = _backendTo({})
    (unreadable,) = _deliver(backend, tmp_path / "gone.eml")
    assert [(r.code, r.remoteMTA) for r in (impossible, unreadable)] == [
        ("5.6.3", None), ("4.3.0", None)]
    assert given == []


def test_backendConvertsBinaryForANextHopWithoutBINARYMIME(tmp_path: Path) -> None:
    path = tmp_path / "m.eml"
    binary = (b"MIME-Version: 1.0\r\nContent-Type: application/octet-stream\r\n"
              b"Content-Transfer-Encoding: binary\r\n\r\n\x00\n\r\xff")
    path.write_bytes(binary)
    backend, given = _backendTo({"8BITMIME": "", "CHUNKING": ""})
    _deliver(backend, path, body="BINARYMIME")
    [(body, content, _, checked)] = given
    assert body is None and not needsEncoding(content, binary=True) and not checked
    assert b"Content-Transfer-Encoding: base64\r\n\r\nAAoN/w==" in content
    backend, given = _backendTo({"BINARYMIME": "", "CHUNKING": ""})
    _deliver(backend, path, body="BINARYMIME")
    assert given == [("BINARYMIME", binary, str(path), False)]  # binary: no CRLF guarantee


def test_backendSendsBinaryThatNeedsNoConversionAsText(tmp_path: Path) -> None:
    """A C{BODY=BINARYMIME} message whose content is 7-bit text (CRLF lines, no NUL) needs
    no conversion for a next hop without BINARYMIME: it goes as it is, declared as text (no
    BODY=BINARYMIME, which the hop does not offer), instead of being returned with 5.6.3
    ("the message is binary")."""
    path = tmp_path / "m.eml"
    text = b"Subject: x\r\n\r\nplain text\r\n"
    path.write_bytes(text)
    for extensions in ({"8BITMIME": "", "CHUNKING": ""}, {}):
        backend, given = _backendTo(extensions)
        (r,) = _deliver(backend, path, body="BINARYMIME")
        assert r.status.value == "delivered", r
        assert given == [(None, text, str(path), True)]


def test_binaryLinesLongerThan998OctetsAreEncoded() -> None:
    """BINARYMIME content may have lines of any length (RFC 3030 section 3); a 7-bit path
    allows 998 octets (RFC 5321 section 4.5.3.1.6): a longer line is encoded too, though
    it is ASCII."""
    assert needsEncoding(b"a" * 998 + b"\r\n" + b"b" * 998, binary=True) is False
    assert needsEncoding(b"a\r\n" + b"b" * 999 + b"\r\nc", binary=True) is True
    assert needsEncoding(b"b" * 999, binary=False) is False  # (text: the intake refuses it)
    message = (b"Subject: x\r\nMIME-Version: 1.0\r\nContent-Type: multipart/mixed; boundary=B\r\n"
               b"\r\n--B\r\nContent-Type: text/plain\r\n\r\nshort\r\n"
               b"--B\r\nContent-Type: application/octet-stream\r\n\r\n" + b"z" * 2000 + b"\r\n"
               b"--B--\r\n")
    converted, count = downgrade(message, binary=True)
    assert count == 1
    assert max(len(line) for line in converted.split(b"\r\n")) <= 76
    assert b"\r\n--B\r\nContent-Type: text/plain\r\n\r\nshort\r\n" in converted
    parts = email.message_from_bytes(converted, policy=email.policy.compat32).get_payload()
    assert parts[1]["Content-Transfer-Encoding"] == "base64"
    assert parts[1].get_payload(decode=True) == b"z" * 2000
