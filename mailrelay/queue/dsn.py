"""Delivery status notifications (RFC 3464): the bounces, delay warnings and success reports the
queue manager sends.

L{buildDSN} makes the whole notification message: a C{multipart/report} (RFC 6522) with a
human-readable explanation, a C{message/delivery-status} part, and the returned original (its
header section, or the whole message when the sender asked with C{RET=FULL}, unless it is
binary: C{BODY=BINARYMIME}).
L{dsnEnvelope} makes the envelope to queue it under: null sender, one recipient.  The
notification enters the spool through the intake like any message
(L{mailrelay.interfaces.IIntake.submit}): the header stampers add its C{Received:},
C{Message-Id:} and C{Date:} (the same forms as on mail received by SMTP) and whatever fields
the site's stampers add.

Everything produced has CRLF line ends and no line longer than 998 octets, and parses with the
standard library's C{email} package (the delivery-status part splits into its per-message and
per-recipient field blocks).

Non-ASCII addresses (RFC 6533): the delivery-status part is always plain ASCII
C{message/delivery-status}; a non-ASCII address is written with address type C{utf-8} in the
C{utf-8-addr-xtext} form of RFC 6533 section 3 (C{\\x{HEX}} for each non-ASCII character), which
is valid in C{message/delivery-status} and survives any transport.  The human-readable part
shows such addresses as they are (UTF-8 text).  A returned header section with 8-bit octets is
sent as C{message/global-headers} (C{message/global} for a whole message), with C{8bit}
transfer encoding.
"""

from __future__ import annotations

import os
import re
import secrets
import textwrap
from collections.abc import Sequence
from pathlib import Path

from twisted.logger import Logger

from mailrelay.address import serverName, utf8AddrDecode, utf8AddrXtext, xtextEncode
from mailrelay.envelope import ClientInfo, Envelope, Recipient
from mailrelay.queue.outcome import POSTMASTER_SOURCE, isPostmasterNotice
from mailrelay.smtp.wire import formatDate

log = Logger(namespace="mailrelay.queue")

__all__ = [
    "ACTIONS",
    "DSN_SOURCE",
    "POSTMASTER_SOURCE",
    "buildDSN",
    "dsnEnvelope",
    "isPostmasterNotice",
]

#: The RFC 3464 actions L{buildDSN} reports.
ACTIONS = ("failed", "delayed", "delivered", "relayed")

#: The C{ClientInfo.listener} of notifications we generate (they come from no listener).
DSN_SOURCE = "local:dsn"

_SUBJECTS = {
    "failed": "Undelivered Mail Returned to Sender",
    "delayed": "Delayed Mail (still being retried)",
    "delivered": "Successful Mail Delivery Report",
    "relayed": "Successful Mail Delivery Report",
}

#: RFC 5322 section 2.1.1: at most 998 octets per line, excluding the CRLF.
_MAX_LINE = 998
#: Where header fields and text are folded or wrapped when they can be.
_FOLD_AT = 78
_TEXT_WIDTH = 76

_LINE_END = re.compile(rb"\r\n|\r|\n")
_UNSAFE_FIELD_TEXT = re.compile(r"[\x00-\x1f\x7f]+")
#: A word of a field value with the spaces before it (L{_fold} folds only before one): a
#: quoted string, spaces and all, is part of a word.
_FIELD_WORD = re.compile(r' *(?:"(?:[^"\\]|\\.)*"|[^ ])+| +$')


# ---------------------------------------------------------------------------------------------
# Encodings (xtext and utf-8-addr-xtext: L{mailrelay.address})


def _typedAddress(address: str) -> str:
    """C{rfc822; address}, or C{utf-8; <utf-8-addr-xtext>} for a non-ASCII address."""
    if address.isascii():
        return f"rfc822; {_fieldText(address)}"
    return f"utf-8; {utf8AddrXtext(address)}"


def _originalRecipient(orcpt: str) -> str:
    """The Original-Recipient value for an ORCPT parameter (as stored: C{type;address},
    xtext already decoded)."""
    kind, sep, address = orcpt.partition(";")
    if not sep:
        kind, address = "rfc822", orcpt
    kind = kind.strip() or "rfc822"
    address = address.strip()
    if not address.isascii() or kind.lower() == "utf-8":
        # RFC 6533: only the utf-8 type may carry a non-ASCII address, and in
        # message/delivery-status it must be in its xtext form.
        # (A utf-8 ORCPT is stored as the client wrote it, escapes and all: decoded first,
        # so that its escapes are not escaped again.)
        decoded = utf8AddrDecode(address) if kind.lower() == "utf-8" else address
        return f"utf-8; {utf8AddrXtext(decoded)}"
    return f"{_fieldText(kind)}; {_fieldText(address)}"


def _envelopeID(envid: str) -> str:
    """What C{Original-Envelope-Id:} says of C{envid} (the ENVID, xtext decoded): the text
    itself, as the sender gave it (RFC 3464 section 2.2.1: C{envelope-id = *text}, its case
    and spelling preserved; Postfix's bounce daemon writes the decoded ENVID); its xtext form
    when it is not printable US-ASCII (non-ASCII, or a control), which the ASCII
    C{message/delivery-status} part cannot carry as it is."""
    if envid.isascii() and envid.isprintable():
        return envid
    return xtextEncode(envid)


def _fieldText(text: str) -> str:
    """C{text} made safe for an ASCII header field: controls become spaces, non-ASCII C{?}."""
    text = _UNSAFE_FIELD_TEXT.sub(" ", text)
    return text.encode("ascii", "replace").decode("ascii")


def _fold(name: str, value: str) -> str:
    """One header field C{name: value}, folded near 78 characters, ending in CRLF.

    Unfolding gives the value back exactly (RFC 5322 section 2.2.3): a line is folded only
    before a space outside a quoted string (a quoted local part, C{"a  b"@example.org}, stays
    on one line, its spaces as they are).  No line is longer than 998 octets: a word too long
    for that is split across lines (the only change ever made to the value: a space added).
    """
    first = f"{name}:"
    lines: list[str] = []
    line = first
    for word in _FIELD_WORD.findall(f" {value}"):
        candidate = line + word
        if line != first and word.strip() and len(candidate.encode("utf-8")) > _FOLD_AT:
            lines.append(line)
            candidate = word
        line = candidate
        while len(line.encode("utf-8")) > _MAX_LINE:
            head, rest = _splitOctets(line, _MAX_LINE)
            lines.append(head)
            line = f" {rest}"
    lines.append(line)
    return "\r\n".join(lines) + "\r\n"


def _splitOctets(text: str, limit: int) -> tuple[str, str]:
    """Split C{text} so that the first piece is at most C{limit} octets of UTF-8."""
    encoded = text.encode("utf-8")[:limit]
    head = encoded.decode("utf-8", "ignore")
    return head, text[len(head) :]


def _wrap(text: str, indent: str = "") -> list[str]:
    """Wrap one paragraph of text to L{_TEXT_WIDTH} characters."""
    return textwrap.wrap(
        _UNSAFE_FIELD_TEXT.sub(" ", text),
        width=_TEXT_WIDTH,
        subsequent_indent=indent,
        break_long_words=True,
        break_on_hyphens=False,
    ) or [""]


def _duration(seconds: float) -> str:
    """A rough human duration: C{"3 minutes"}, C{"2.5 hours"}, C{"5 days"}."""
    seconds = max(0.0, seconds)
    for unit, size in (("day", 86400.0), ("hour", 3600.0), ("minute", 60.0)):
        if seconds >= size:
            value = round(seconds / size, 1)
            text = f"{value:g}"
            return f"{text} {unit}" + ("" if text == "1" else "s")
    value = int(seconds)
    return f"{value} second" + ("" if value == 1 else "s")


def _diagnosticText(diagnostic: str) -> str:
    """The text of a Diagnostic-Code value without its type (C{"smtp; 550 x"} -> C{"550 x"})."""
    kind, sep, text = diagnostic.partition(";")
    if sep and re.fullmatch(r"[A-Za-z0-9-]+", kind.strip()):
        return text.strip()
    return diagnostic.strip()


# ---------------------------------------------------------------------------------------------
# The returned original


def _normaliseLines(data: bytes) -> bytes:
    """CRLF line ends only (the spool stores CRLF already; this is defensive)."""
    return _LINE_END.sub(b"\r\n", data)


def _hasLongLine(data: bytes) -> bool:
    return any(len(line) > _MAX_LINE for line in data.split(b"\r\n"))


def _splitLongHeaderLines(data: bytes) -> bytes:
    """Split header lines longer than 998 octets into continuation lines (a header section of
    a message we accepted never has them; this keeps the report valid whatever the spool
    holds)."""
    if not _hasLongLine(data):
        return data
    out = []
    for line in data.split(b"\r\n"):
        while len(line) > _MAX_LINE:
            out.append(line[:_MAX_LINE])
            line = b" " + line[_MAX_LINE:]
        out.append(line)
    return b"\r\n".join(out)


def _cutAtLine(data: bytes, limit: int) -> bytes:
    """The longest prefix of C{data} of at most C{limit} octets ending in CRLF (or C{b""})."""
    if len(data) <= limit:
        return data
    end = data.rfind(b"\r\n", 0, limit - 1)
    return data[: end + 2] if end >= 0 else b""


def _headerSection(data: bytes) -> tuple[bytes, bool]:
    """The header section at the start of C{data} (up to the first empty line, with the CRLF of
    its last field), and whether it ended within C{data}."""
    if data.startswith(b"\r\n"):
        return b"", True
    end = data.find(b"\r\n\r\n")
    if end >= 0:
        return data[: end + 2], True
    return data, False


class _Original:
    """What of the original message goes into the report's third part.

    @ivar contentType: C{message/rfc822}, C{message/global}, C{text/rfc822-headers} or
        C{message/global-headers}; C{None} when the original could not be read.
    @ivar content: the part's content (CRLF lines, ending in CRLF or empty).
    @ivar note: a sentence for the human-readable part, or C{None}.
    """

    def __init__(self, contentType: str | None, content: bytes, note: str | None) -> None:
        self.contentType = contentType
        self.content = content
        self.note = note

    @property
    def full(self) -> bool:
        return self.contentType in ("message/rfc822", "message/global")


def _readOriginal(
    path: Path, wantFull: bool, limit: int, queueID: str, binary: bool = False
) -> _Original:
    """Read what is to be returned of the message at C{path}: the whole message if
    C{wantFull} and it is at most C{limit} octets, else its header section (cut at a line
    boundary to C{limit} octets).

    A C{binary} message (C{BODY=BINARYMIME}, RFC 3030) is any octets, which no part of the
    report may carry (it goes as text, RFC 6152): only its header section is returned, and
    nothing if that holds a NUL (it is not text either).
    """
    try:
        with open(path, "rb") as f:
            size = os.fstat(f.fileno()).st_size
            full = wantFull and not binary and size <= limit
            data = f.read(size if full else limit + 1)
            atEnd = not f.read(1)
    except OSError as e:
        log.error(
            "{queueID}: cannot read the original message {path} for a notification: {error}",
            queueID=queueID,
            path=str(path),
            error=e.strerror or str(e),
        )
        return _Original(None, b"", "The original message could not be read.")
    data = _normaliseLines(data)
    note = None
    if full and atEnd:
        if not _hasLongLine(data):
            if data and not data.endswith(b"\r\n"):
                data += b"\r\n"
            headers, _ = _headerSection(data)
            kind = "message/rfc822" if headers.isascii() else "message/global"
            return _Original(kind, data, None)
        note = (
            "The original message has lines too long to be returned; only its header section "
            "is returned."
        )
    elif wantFull and binary:
        note = (
            "The original message is binary (BODY=BINARYMIME), which this report cannot "
            "carry unchanged; only its header section is returned."
        )
    elif wantFull:
        note = (
            f"The original message ({size} octets) is larger than the limit of {limit} octets "
            "for returned messages; only its header section is returned."
        )
    headers, complete = _headerSection(data)
    if not complete and atEnd:
        complete = True  # a message with no body
        if headers and not headers.endswith(b"\r\n"):
            headers += b"\r\n"
    if not complete or len(headers) > limit:
        headers = _cutAtLine(headers, limit)
        truncated = f"The header section was truncated to {len(headers)} octets."
        note = f"{note} {truncated}" if note else truncated
    if b"\0" in headers:
        return _Original(
            None, b"", "The original message is binary and its header section is not text; "
            "none of it is returned."
        )
    headers = _splitLongHeaderLines(headers)
    kind = "text/rfc822-headers" if headers.isascii() else "message/global-headers"
    return _Original(kind, headers, note)


# ---------------------------------------------------------------------------------------------
# The report


def _perRecipientFields(
    recipient: Recipient, action: str, now: float, willRetryUntil: float | None
) -> str:
    default = {"failed": "5.0.0", "delayed": "4.0.0", "delivered": "2.0.0", "relayed": "2.0.0"}[
        action
    ]
    status = recipient.status or default
    if not re.fullmatch(r"[245]\.\d{1,3}\.\d{1,3}", status):
        status = default
    fields = []
    if recipient.orcpt:
        fields.append(_fold("Original-Recipient", _originalRecipient(recipient.orcpt)))
    fields.append(_fold("Final-Recipient", _typedAddress(recipient.address)))
    fields.append(f"Action: {action}\r\n")
    fields.append(f"Status: {status}\r\n")
    if recipient.remoteMTA:
        fields.append(_fold("Remote-MTA", _fieldText(recipient.remoteMTA)))
    if recipient.lastResult:
        diagnostic = _fieldText(recipient.lastResult)
        if ";" not in diagnostic:
            diagnostic = f"X-mailrelay; {diagnostic}"
        fields.append(_fold("Diagnostic-Code", diagnostic))
    lastAttempt = recipient.finalTime if recipient.finalTime is not None else now
    fields.append(f"Last-Attempt-Date: {formatDate(lastAttempt)}\r\n")
    if action == "delayed" and willRetryUntil is not None:
        fields.append(f"Will-Retry-Until: {formatDate(willRetryUntil)}\r\n")
    return "".join(fields)


def _deliveryStatus(
    envelope: Envelope,
    recipients: Sequence[Recipient],
    action: str,
    hostname: str,
    queueID: str,
    now: float,
    willRetryUntil: float | None,
) -> bytes:
    perMessage = [f"Reporting-MTA: dns; {_fieldText(hostname)}\r\n"]
    perMessage.append(f"X-Mailrelay-Queue-ID: {_fieldText(queueID)}\r\n")
    if envelope.sender:
        perMessage.append(_fold("X-Mailrelay-Sender", _typedAddress(envelope.sender)))
    if envelope.envid:
        perMessage.append(_fold("Original-Envelope-Id", _envelopeID(envelope.envid)))
    arrival = envelope.arrival if envelope.arrival is not None else now
    perMessage.append(f"Arrival-Date: {formatDate(arrival)}\r\n")
    blocks = ["".join(perMessage)]
    blocks.extend(_perRecipientFields(r, action, now, willRetryUntil) for r in recipients)
    return "\r\n".join(blocks).encode("ascii")


def _humanText(
    envelope: Envelope,
    recipients: Sequence[Recipient],
    action: str,
    hostname: str,
    now: float,
    willRetryUntil: float | None,
    original: _Original,
) -> str:
    arrival = envelope.arrival if envelope.arrival is not None else now
    paragraphs = _explanation(action, hostname, now - arrival, willRetryUntil, arrival, original)
    if original.note:
        paragraphs.append(_wrap(original.note))
    paragraphs.append(["                   The mail system"])
    for r in recipients:
        paragraphs.append(_wrap(_recipientText(r, action, now - arrival), indent="    "))
    return "\r\n\r\n".join("\r\n".join(p) for p in paragraphs) + "\r\n"


def _explanation(
    action: str,
    hostname: str,
    delay: float,
    willRetryUntil: float | None,
    arrival: float,
    original: _Original,
) -> list[list[str]]:
    """The paragraphs that say what happened, before the recipients."""
    paragraphs: list[list[str]] = []
    if action == "delayed":
        paragraphs.append(
            [
                "#" * 68,
                "# THIS IS A WARNING ONLY.  YOU DO NOT NEED TO RESEND YOUR MESSAGE. #",
                "#" * 68,
            ]
        )
    paragraphs.append(_wrap(f"This is the mail system at host {hostname}."))
    if original.contentType is None:
        attached = ""
    elif original.full:
        attached = " It is attached below."
    else:
        attached = " Its header section is attached below."
    if action == "failed":
        paragraphs.append(
            _wrap(
                "I'm sorry to have to inform you that your message could not be delivered "
                f"to one or more recipients.{attached}"
            )
        )
        paragraphs.append(_wrap("For further assistance, please send mail to postmaster."))
        paragraphs.append(
            _wrap(
                "If you do so, please include this problem report. You can delete your own "
                "text from the attached returned message."
            )
        )
    elif action == "delayed":
        until = (
            f" It will be retried until {formatDate(willRetryUntil)}"
            f" ({_duration(willRetryUntil - arrival)} after it arrived)."
            if willRetryUntil is not None
            else ""
        )
        paragraphs.append(
            _wrap(f"Your message could not be delivered for {_duration(delay)}.{until}{attached}")
        )
        paragraphs.append(_wrap("For further assistance, please send mail to postmaster."))
    else:
        paragraphs.append(
            _wrap(
                "Your message was successfully delivered to the destination(s) listed below. "
                "If the message was delivered to a mailbox you will receive no further "
                "notifications. Otherwise you may still receive notifications of mail "
                f"delivery errors from other systems.{attached}"
            )
        )
    return paragraphs


def _recipientText(r: Recipient, action: str, delay: float) -> str:
    """What the report says of one recipient."""
    reason = r.reason or (_diagnosticText(r.lastResult) if r.lastResult else "")
    remote = serverName(r.remoteMTA)
    if action in ("delivered", "relayed"):
        # (As Postfix's trace.c, "delivery via name[address]:port: ": name[address].)
        text = f"<{r.address}>: " + (
            f"{action} via {serverName(r.remoteMTA, r.remoteAddress)}: " if remote else "")
        return text + (reason or action)
    # (Only a server's own reply is what it said: an X-mailrelay reason is ours.)
    # (Postfix's "host %s said: %s (in reply to %s command)", smtp_trouble.c.)
    inReplyTo = f" (in reply to {r.command} command)" if r.command else ""
    said = (f"host {serverName(r.remoteMTA, r.remoteAddress)} said: {reason}{inReplyTo}"
            if remote and reason and not r.reason
            and (r.lastResult or "").lower().startswith("smtp;") else None)
    if action == "failed" and (r.status or "").startswith("4."):
        # (A temporary status that failed: the message expired with it.  The host of the
        # last attempt named, as Postfix's bounce of an expired message gives the defer
        # log's "host H said: ...".)
        text = f"<{r.address}>: message expired after {_duration(delay)} in the queue"
        if said:
            return f"{text}; the last attempt: {said}"
        return text + (f"; the last attempt said: {reason}" if reason else "")
    return f"<{r.address}>: {said or reason or 'delivery failed'}"


def _part(headers: list[str], content: bytes) -> bytes:
    return "".join(headers).encode("utf-8") + b"\r\n" + content


def _boundary(queueID: str, contents: Sequence[bytes]) -> str:
    while True:
        boundary = f"{queueID}.{secrets.token_hex(8)}=_"
        marker = b"--" + boundary.encode("ascii")
        if not any(marker in content for content in contents):
            return boundary


def buildDSN(
    envelope: Envelope,
    recipients: Sequence[Recipient],
    action: str,
    *,
    hostname: str,
    messagePath: Path,
    now: float,
    queueID: str,
    maxOriginal: int = 102400,
    willRetryUntil: float | None = None,
    to: str | None = None,
) -> bytes:
    """Build the RFC 3464 delivery status notification about C{recipients} of a message.

    @param envelope: the original message's envelope (sender, RET, ENVID, arrival).
    @param recipients: the recipients to report on, with their C{status}, C{lastResult},
        C{remoteMTA}, C{orcpt} and C{finalTime} (the Last-Attempt-Date; C{now} when C{None}).
    @param action: C{"failed"}, C{"delayed"}, C{"delivered"} (to the mailbox) or C{"relayed"}
        (to a next hop that does not send notifications itself).
    @param hostname: this relay's host name (Reporting-MTA, From).
    @param messagePath: the original message (CRLF lines); its header section ends at the first
        empty line.  If it cannot be read, the report says so and has no third part.
    @param now: the time of the report.
    @param queueID: the original message's queue id (the X-Mailrelay-Queue-ID field).
    @param maxOriginal: the most octets of the original returned (nothing of a message sent
        with REQUIRETLS, RFC 8689: the report does not travel under its protection).  With
        C{RET=FULL} (honoured for C{failed} reports only, as Postfix does) a larger message is
        returned as its header section only, with a note saying so, and so is a binary one
        (C{BODY=BINARYMIME}) of any size; a header section larger than this is cut at a line
        boundary.
    @param willRetryUntil: for C{delayed}: when the relay gives up (Will-Retry-Until).
    @param to: the notification's recipient; the original sender by default.
    @return: the whole message: CRLF lines, none longer than 998 octets; no C{Message-Id:}
        nor C{Date:} (the intake's stampers add them).
    @raise ValueError: an unknown C{action}, or no recipients.
    """
    if action not in ACTIONS:
        raise ValueError(f"unknown DSN action {action!r}; expected one of {', '.join(ACTIONS)}")
    if not recipients:
        raise ValueError("a delivery status notification needs at least one recipient")
    to = envelope.sender if to is None else to
    wantFull = action == "failed" and (envelope.ret or "").upper() == "FULL"
    if envelope.requireTLS:
        # The sender wanted the message to travel only over verified TLS; the report may
        # not (it goes to the sender's domain as any mail): nothing of it is returned.
        original = _Original(None, b"", "The message was sent with REQUIRETLS, so none of it "
                                         "is returned in this report.")
    else:
        original = _readOriginal(
            Path(messagePath), wantFull, maxOriginal, queueID, envelope.body == "BINARYMIME"
        )
    text = _humanText(envelope, recipients, action, hostname, now, willRetryUntil, original)
    textBytes = text.encode("utf-8")
    status = _deliveryStatus(envelope, recipients, action, hostname, queueID, now, willRetryUntil)
    contents = [textBytes, status, original.content]
    boundary = _boundary(queueID, contents)
    eightBit = not all(content.isascii() for content in contents)
    headers = _headers(hostname, to, action, boundary, eightBit)
    delimiter = f"\r\n--{boundary}\r\n".encode("ascii")
    body = [b"This is a MIME-encapsulated message.\r\n"]
    for part in _parts(textBytes, status, original, action):
        body.append(delimiter)
        body.append(part)
    body.append(f"\r\n--{boundary}--\r\n".encode("ascii"))
    return "".join(headers).encode("utf-8") + b"\r\n" + b"".join(body)


def _parts(textBytes: bytes, status: bytes, original: _Original, action: str) -> list[bytes]:
    """The report's parts: the text, the delivery status, and the original if returned."""
    parts = [
        _part(
            [
                "Content-Description: Notification\r\n",
                "Content-Type: text/plain; charset="
                + ("us-ascii" if textBytes.isascii() else "utf-8")
                + "\r\n",
                "Content-Transfer-Encoding: "
                + ("7bit" if textBytes.isascii() else "8bit")
                + "\r\n",
            ],
            textBytes,
        ),
        _part(
            [
                "Content-Description: Delivery report\r\n",
                "Content-Type: message/delivery-status\r\n",
            ],
            status,
        ),
    ]
    if original.contentType is not None:
        description = "Undelivered Message" if action == "failed" else "Message"
        if not original.full:
            description += " Headers"
        parts.append(
            _part(
                [
                    f"Content-Description: {description}\r\n",
                    f"Content-Type: {original.contentType}\r\n",
                    "Content-Transfer-Encoding: "
                    + ("7bit" if original.content.isascii() else "8bit")
                    + "\r\n",
                ],
                original.content,
            )
        )
    return parts


def _headers(hostname: str, to: str, action: str, boundary: str, eightBit: bool) -> list[str]:
    """The report's header section, one field per item (C{Message-Id:} and C{Date:} are the
    stampers')."""
    headers = [
        f"From: MAILER-DAEMON@{hostname} (Mail Delivery System)\r\n",
        _fold("To", f"<{to}>"),
        f"Subject: {_SUBJECTS[action]}\r\n",
        "Auto-Submitted: auto-replied\r\n",
        "MIME-Version: 1.0\r\n",
        "Content-Type: multipart/report; report-type=delivery-status;\r\n"
        f'\tboundary="{boundary}"\r\n',
    ]
    if eightBit:
        headers.append("Content-Transfer-Encoding: 8bit\r\n")
    return headers


def dsnEnvelope(
    original: Envelope,
    *,
    to: str,
    now: float,
    queueID: str | None = None,
    hostname: str = "localhost",
    message: bytes | None = None,
    postmasterNotice: bool = False,
    noticeOf: str | None = None,
) -> Envelope:
    """The envelope to queue a notification about C{original} under.

    @param to: the notification's recipient (the original sender, or the postmaster).
    @param now: its arrival time.
    @param queueID: the notification's own queue id, if it has one yet (the intake gives it
        one).
    @param hostname: this relay's host name (the HELO of the local "client").
    @param message: the notification (from L{buildDSN}), to set C{messageSize} and C{BODY}/
        C{SMTPUTF8}: C{8BITMIME} when it has 8-bit octets, SMTPUTF8 when the recipient is
        non-ASCII or the original was sent with SMTPUTF8 and the notification is 8-bit.
    @param postmasterNotice: this notification goes to the postmaster because a bounce failed;
        it is marked (C{client.listener} is L{POSTMASTER_SOURCE}) so that, should it fail too,
        it is dropped instead of notifying anyone again.
    @param noticeOf: for a success notice made from its recipients' marks, the queue id of
        C{original} (see L{Envelope.noticeOf}).
    @return: an envelope with the null sender, one recipient, C{isBounce} set.
    """
    eightBit = message is not None and not message.isascii()
    return Envelope(
        sender="",
        recipients=[Recipient(address=to, original=to)],
        queueID=queueID,
        body="8BITMIME" if eightBit else None,
        smtputf8=not to.isascii() or (original.smtputf8 and eightBit),
        client=ClientInfo(
            address="127.0.0.1",
            rdns="localhost",
            helo=hostname,
            relayAllowed=True,
            listener=POSTMASTER_SOURCE if postmasterNotice else DSN_SOURCE,
        ),
        arrival=now,
        messageSize=len(message) if message is not None else 0,
        isBounce=True,
        noticeOf=noticeOf,
    )
