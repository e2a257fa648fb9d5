"""8-bit and binary MIME made 7-bit, for a next hop that does not offer 8BITMIME (RFC 6152
section 3: convert, or return the message) or BINARYMIME.

L{downgrade} rewrites only what must change, and keeps every other octet as it was: each leaf
body part holding 8-bit octets (or, for binary content, a bare CR or LF, a NUL or a line longer
than 998 octets) is encoded, C{quoted-printable} for C{text/*} and C{base64} for anything else
(the standard library's C{binascii}), and its C{Content-Transfer-Encoding} field says so;
multipart and C{message/rfc822} entities are walked into (their parts are converted, their own
encoding becomes C{7bit}).  A message without MIME (no C{MIME-Version}) is one C{text/plain}
entity: it gets C{MIME-Version: 1.0} and, when it has none, C{Content-Type: text/plain;
charset=unknown-8bit} (RFC 1428), as it cannot say which character set it is in.

Conversion is refused (L{ConversionImpossible}, a bounce with status 5.6.3) when:

  - the message carries a C{DKIM-Signature}: encoding changes the signed body (and usually the
    signed C{Content-Transfer-Encoding} field), so the signature would fail at the recipient
    and, under the author domain's DMARC policy, the message be refused or filed as spam
    without anyone being told.  The signer chose to sign 8-bit content (RFC 6376 section
    5.3 asks signers to encode first for this very reason); returning the message tells the
    sender plainly.  mailrelay holds no signing keys, so it cannot sign again after
    converting, as a signing relay of the author's domain could;
  - a header section (the message's, or a part's) has 8-bit octets: only SMTPUTF8 can carry
    them, and encoding them (RFC 2047) would change what the fields say;
  - a multipart entity has no boundary, or 8-bit octets outside its parts (preamble,
    epilogue), which have no encoding of their own;
  - a part declared C{quoted-printable} or C{base64} holds 8-bit octets (its content is not
    what it claims), or a C{message/*} type other than C{message/rfc822} does (RFC 2046: those
    are 7-bit only) -- but for the C{message/global} types of RFC 6532 and 6533, which may be
    encoded and are (C{quoted-printable}, as text).

The walk is over bytes, with the C{email} package's header parser reading each header section
(content type, boundary, encoding); nesting deeper than L{MAX_DEPTH} is refused.
"""

from __future__ import annotations

import binascii
import os
import re
import tempfile
from email.message import Message
from email.parser import BytesHeaderParser
from email.policy import compat32

__all__ = [
    "MAX_DEPTH",
    "ConversionImpossible",
    "convertFile",
    "downgrade",
    "isEightBit",
    "needsEncoding",
]

#: The deepest nesting of multiparts and messages converted.
MAX_DEPTH = 50

_CRLF = b"\r\n"
_HEADER_END = re.compile(rb"\r\n\r\n")
_BASE64_LINE = 76
#: A line longer than SMTP's 998 octets (in content whose only CR and LF are CRLF pairs).
_LONG_LINE = re.compile(rb"[^\r\n]{999}")
#: The C{message/*} types that may be encoded (RFC 6532 3.5, the RFC 6533 registrations:
#: quoted-printable or base64 over a 7-bit path), unlike the others (RFC 2046 5.2): UTF-8 text, so
#: quoted-printable, as a leaf (a message/global is not walked into).
_ENCODABLE_MESSAGES = frozenset({
    "message/global",
    "message/global-headers",
    "message/global-delivery-status",
    "message/global-disposition-notification",
})


class ConversionImpossible(Exception):
    """The message cannot be made 7-bit; the text says why (for the diagnostic)."""


def isEightBit(data: bytes) -> bool:
    """Whether C{data} has octets above 127."""
    return not data.isascii()


def needsEncoding(data: bytes, binary: bool = False) -> bool:
    """Whether C{data}, the content of one entity, cannot go as it is in 7-bit SMTP: 8-bit
    octets, or (C{binary}) a NUL, a CR or LF not in a CRLF pair, or a line longer than 998
    octets (RFC 5321 section 4.5.3.1.6; binary content has no line limit, RFC 3030)."""
    if isEightBit(data):
        return True
    if binary:
        lf = data.count(b"\n")
        return (b"\0" in data or data.count(b"\r") != lf or data.count(b"\r\n") != lf
                or _LONG_LINE.search(data) is not None)
    return False


def downgrade(message: bytes, binary: bool = False) -> tuple[bytes, int]:
    """C{message} made 7-bit (see the module docstring).

    @param binary: the message is C{BODY=BINARYMIME}: bare CR, LF and NUL count as content to
        encode too.
    @return: the converted message (C{message} itself when nothing needed converting) and the
        number of body parts encoded.
    @raise ConversionImpossible: see the module docstring.
    """
    header, body = _split(message)
    fields = _parse(header)
    mime = fields.get("MIME-Version") is not None
    walker = _Walker(binary)
    if mime:
        header, body = walker.entity(header, body, fields, "text/plain", 0)
    elif needsEncoding(body, binary):
        _checkHeader(header)
        header += b"MIME-Version: 1.0\r\n"
        if fields.get("Content-Type") is None:
            header += b"Content-Type: text/plain; charset=unknown-8bit\r\n"
        header, body = walker.encodeLeaf(header, body, fields, "text/plain")
    else:
        _checkHeader(header)
    if not walker.encoded:
        return message, 0
    if any(name.lower() == "dkim-signature" for name in fields.keys()):
        raise ConversionImpossible(
            "the message is DKIM-signed, and converting it would break the signature"
        )
    return header + _CRLF + body, walker.encoded


def convertFile(path: str, binary: bool = False) -> tuple[str, int] | None:
    """The message file at C{path} made 7-bit (L{downgrade}) into a new temporary file
    (readable by this user only; the caller removes it).

    @return: C{None} when the message needs no conversion, else the temporary file's path and
        the number of body parts encoded.
    @raise ConversionImpossible: see L{downgrade}.
    @raise OSError: the file cannot be read, or the converted one written.
    """
    with open(path, "rb") as f:
        message = f.read()
    if not needsEncoding(message, binary):
        return None
    converted, count = downgrade(message, binary)
    if not count:  # pragma: no cover - 8-bit octets are always in a part or refused
        return None
    fd, name = tempfile.mkstemp(prefix="mailrelay-7bit-", suffix=".eml")
    try:
        with os.fdopen(fd, "wb") as out:
            out.write(converted)
    except BaseException:
        os.unlink(name)
        raise
    return name, count


# -- the walk -------------------------------------------------------------------------------------


class _Walker:
    def __init__(self, binary: bool) -> None:
        self.binary = binary
        self.encoded = 0

    def entity(
        self, header: bytes, body: bytes, fields: Message, defaultType: str, depth: int
    ) -> tuple[bytes, bytes]:
        """One entity (its header section with its final CRLF, and its body), converted."""
        _checkHeader(header)
        if depth > MAX_DEPTH:
            raise ConversionImpossible(f"MIME parts nested deeper than {MAX_DEPTH}")
        fields.set_default_type(defaultType)
        ctype = fields.get_content_type()
        if not needsEncoding(body, self.binary):
            return header, body
        if fields.get_content_maintype() == "multipart":
            body = self.multipart(body, fields, ctype, depth)
        elif ctype == "message/rfc822":
            inner, innerBody = _split(body)
            innerHeader, innerBody = self.entity(inner, innerBody, _parse(inner), "text/plain",
                                                 depth + 1)
            body = innerHeader + _CRLF + innerBody
        elif fields.get_content_maintype() == "message" and ctype not in _ENCODABLE_MESSAGES:
            raise ConversionImpossible(f"a {ctype} part has 8-bit content")
        else:
            return self.encodeLeaf(header, body, fields, ctype)
        if _encoding(fields) in ("8bit", "binary"):
            header = _setEncoding(header, b"7bit")
        return header, body

    def multipart(self, body: bytes, fields: Message, ctype: str, depth: int) -> bytes:
        boundary = fields.get_param("boundary")
        if not isinstance(boundary, str) or not boundary:
            raise ConversionImpossible(f"a {ctype} part has no boundary")
        delimiter = b"--" + boundary.encode("ascii", "replace")
        pieces = _splitParts(body, delimiter)
        if pieces is None:  # no delimiter at all: nothing but a preamble
            raise ConversionImpossible(f"8-bit octets in a {ctype} part without parts")
        preamble, parts, epilogue = pieces
        if needsEncoding(preamble, self.binary) or needsEncoding(epilogue, self.binary):
            raise ConversionImpossible(f"8-bit octets outside the parts of a {ctype} part")
        defaultType = "message/rfc822" if ctype == "multipart/digest" else "text/plain"
        out = [preamble]
        for delimiterLine, content in parts:
            if not needsEncoding(content, self.binary):
                out.append(delimiterLine + content)
                continue
            partHeader, partBody = _split(content)
            partHeader, partBody = self.entity(
                partHeader, partBody, _parse(partHeader), defaultType, depth + 1
            )
            out.append(delimiterLine + partHeader + _CRLF + partBody)
        out.append(epilogue)
        return b"".join(out)

    def encodeLeaf(
        self, header: bytes, body: bytes, fields: Message, ctype: str
    ) -> tuple[bytes, bytes]:
        encoding = _encoding(fields)
        if encoding in ("quoted-printable", "base64"):
            raise ConversionImpossible(
                f"a {ctype} part declared {encoding} has 8-bit octets"
            )
        if ctype.startswith("text/") or ctype in _ENCODABLE_MESSAGES:
            body, name = _quotedPrintable(body), b"quoted-printable"
        else:
            body, name = _base64(body), b"base64"
        self.encoded += 1
        return _setEncoding(header, name), body


# -- encodings ------------------------------------------------------------------------------------


def _quotedPrintable(body: bytes) -> bytes:
    """C{body} in quoted-printable: its CRLFs stay line breaks; any other CR or LF, and every
    8-bit octet, is encoded; lines are at most 76 characters (soft breaks)."""
    lines = body.split(_CRLF)
    encoded = [binascii.b2a_qp(line, quotetabs=False, istext=False, header=False)
               for line in lines]
    return _CRLF.join(e.replace(b"=\n", b"=\r\n") for e in encoded)


def _base64(body: bytes) -> bytes:
    """C{body} in base64, 76 characters a line, CRLF after each (the last one too when
    C{body} ended with a line break: a part's body is followed by the CRLF of the next
    delimiter)."""
    text = binascii.b2a_base64(body, newline=False)
    lines = [text[i:i + _BASE64_LINE] for i in range(0, len(text), _BASE64_LINE)]
    return _CRLF.join(lines) + (_CRLF if body.endswith(b"\n") else b"")


# -- header sections ------------------------------------------------------------------------------


def _split(entity: bytes) -> tuple[bytes, bytes]:
    """C{(header section with its last CRLF, body)}; an entity starting with an empty line has
    an empty header section; one without an empty line is all header."""
    if entity.startswith(_CRLF):
        return b"", entity[2:]
    m = _HEADER_END.search(entity)
    if m is None:
        return entity if entity.endswith(_CRLF) or not entity else entity + _CRLF, b""
    return entity[: m.start() + 2], entity[m.end():]


def _parse(header: bytes) -> Message:
    return BytesHeaderParser(policy=compat32).parsebytes(header + _CRLF)


def _checkHeader(header: bytes) -> None:
    if isEightBit(header):
        raise ConversionImpossible(
            "8-bit octets in a header section (they need SMTPUTF8, and cannot be encoded "
            "without changing the fields)"
        )


def _encoding(fields: Message) -> str:
    value = fields.get("Content-Transfer-Encoding")
    return str(value).strip().lower() if value is not None else "7bit"


_CTE_FIELD = re.compile(rb"^content-transfer-encoding[ \t]*:.*\r\n(?:[ \t].*\r\n)*",
                        re.IGNORECASE | re.MULTILINE)


def _setEncoding(header: bytes, name: bytes) -> bytes:
    """C{header} with its C{Content-Transfer-Encoding} fields replaced by one naming C{name},
    at the end of the section; every other field as it was."""
    return _CTE_FIELD.sub(b"", header) + b"Content-Transfer-Encoding: " + name + _CRLF


def _splitParts(
    body: bytes, delimiter: bytes
) -> tuple[bytes, list[tuple[bytes, bytes]], bytes] | None:
    """A multipart body split at its delimiter lines (RFC 2046 section 5.1.1): the preamble,
    each part as C{(its delimiter line, with the CRLF ahead of it and its own, its content)},
    and the close delimiter with the epilogue; C{None} when no delimiter line is found.
    Joining the pieces back gives C{body}."""
    pattern = re.compile(rb"^" + re.escape(delimiter) + rb"(--)?[ \t]*(?=\r\n|\Z)", re.MULTILINE)
    lines: list[tuple[int, int, bool]] = []
    previousEnd = 0
    for m in pattern.finditer(body):
        start = m.start()
        if start - 2 >= previousEnd and body[start - 2 : start] == _CRLF:
            start -= 2  # the CRLF before a delimiter is part of it
        end = m.end() + (2 if body[m.end() : m.end() + 2] == _CRLF else 0)
        lines.append((start, end, bool(m.group(1))))
        previousEnd = end
        if m.group(1):
            break
    if not lines:
        return None
    parts: list[tuple[bytes, bytes]] = []
    for index, (start, end, close) in enumerate(lines):
        if close:
            return body[: lines[0][0]], parts, body[start:]
        following = lines[index + 1][0] if index + 1 < len(lines) else len(body)
        parts.append((body[start:end], body[end:following]))
    return body[: lines[0][0]], parts, b""
