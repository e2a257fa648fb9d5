"""The message C{mailrelay-sendmail} submits, made as Postfix's sendmail and cleanup make
mail submitted on the command line.

  - L{readInput}: standard input as Postfix's sendmail reads it: lines ended by LF (every CR
    before it dropped: C{sendmail_fix_line_endings}; a CR alone stays in its line), to the
    end of the input or, without C{-i}, to a line holding a single dot; bounded by the
    relay's message size limit.
  - L{parseMessage}: the header section and the body, a leading mbox C{From } line skipped.
  - L{prepareMessage}: the envelope recipients (those given, and with C{-t} those of the
    C{To:}, C{Cc:} and C{Bcc:} fields, or of the C{Resent-} ones when there is a
    C{Resent-To:}, C{-Cc:} or C{-Bcc:}), the C{Bcc:} fields removed, C{From:} (or
    C{Resent-From:} when there is any C{Resent-} field) added when missing, addresses
    without a domain qualified with the relay's host name (Postfix's C{myorigin}), a
    C{Received:} field naming the user id on top, a CR alone made a space in the header
    section and a line end in the body (the progress meters of cron output), and every line
    ended by CRLF and at most 998 octets long (a longer line is broken by inserting CRLF and
    a space, as Postfix's SMTP client does).  C{Date:} and C{Message-Id:} are added by the
    relay's stamper.

No I/O but the stream L{readInput} is given; the command is L{mailrelay.app.sendmail}.
"""

from __future__ import annotations

import os
import re
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from email.utils import formataddr, parseaddr
from typing import BinaryIO

from mailrelay.address import AddressError, parseForwardPath, parseReversePath
from mailrelay.smtp.wire import formatDate

#: RFC 5322 2.1.1: a line is at most 998 octets, CRLF excluded.
MAX_LINE = 998

#: The fields holding addresses that a missing domain is added to (Postfix's cleanup
#: rewrites the same ones for local mail), without and with C{Resent-}.
ADDRESS_FIELDS = frozenset(
    name
    for base in ("from", "sender", "reply-to", "to", "cc", "bcc")
    for name in (base, "resent-" + base)
)
_RECIPIENT_FIELDS = ("to", "cc", "bcc")
_RESENT_RECIPIENT_FIELDS = frozenset("resent-" + name for name in _RECIPIENT_FIELDS)
_RESENT = frozenset(
    "resent-" + name for name in ("date", "from", "sender", "to", "cc", "bcc", "message-id")
)
_FIELD_NAME = re.compile(rb"([!-9;-~]+)[ \t]*:")


class SubmitError(Exception):
    """Why a message cannot be submitted: C{message} for standard error, and the exit status
    (a C{sysexits.h} code, C{os.EX_*})."""

    def __init__(self, message: str, status: int) -> None:
        super().__init__(message)
        self.message = message
        self.status = status


class MessageTooLarge(SubmitError):
    """The input is over the size limit.  The message is C{lines} (read until the limit),
    then C{rest}: an iterator reading the remaining lines from the input only as it is
    consumed (to save the message in C{dead.letter} without holding it in memory)."""

    def __init__(self, message: str, status: int, lines: list[bytes], rest: Iterator[bytes]
                 ) -> None:
        super().__init__(message, status)
        self.lines = lines
        self.rest = rest


def _restOfInput(stream: BinaryIO, head: bytes, dotEnds: bool) -> Iterator[bytes]:
    """The lines of C{head} and of the rest of C{stream}, as L{readInput} cuts them (to the
    lone dot with C{dotEnds})."""
    data = head
    while True:
        chunk = stream.read(65536)
        data += chunk
        end = data.rfind(b"\n") + 1  # (complete lines only)
        if not chunk:
            end = len(data)
        for line in _split(data[:end]):
            if dotEnds and line == b".":
                return
            yield line
        data = data[end:]
        if not chunk:
            return


def readInput(stream: BinaryIO, *, dotEnds: bool, limit: int) -> list[bytes]:
    """The lines of the message on C{stream}, without their line ends.

    @param dotEnds: a line holding only C{"."} ends the message (Sendmail's default; C{-i}
        and C{-oi} turn it off), and is not part of it.
    @param limit: the most octets the relay accepts; more input is refused at once, without
        reading the rest.
    @raise MessageTooLarge: (C{EX_DATAERR}) for a message over C{limit}.
    @raise SubmitError: C{EX_IOERR} when the input cannot be read.
    """
    lines: list[bytes] = []
    size = 0
    pending = b""
    try:
        while True:
            chunk = stream.readline(65536) if dotEnds else stream.read(65536)
            if not chunk:
                break
            size += len(chunk)
            if size > limit:
                raise MessageTooLarge(
                    f"message too large: the relay accepts at most {limit} octets "
                    "([limits] message_size); nothing was sent",
                    os.EX_DATAERR,
                    lines,
                    _restOfInput(stream, pending + chunk, dotEnds),
                )
            pending += chunk
            if dotEnds:
                if not pending.endswith(b"\n"):
                    continue  # a line longer than the chunk
                line = pending[:-1].rstrip(b"\r")
                if line == b".":
                    pending = b""
                    break
                lines.extend(_split(pending))
                pending = b""
    except OSError as e:
        raise SubmitError(f"cannot read the message: {e.strerror or e}", os.EX_IOERR) from None
    if pending and not (dotEnds and pending.rstrip(b"\r") == b"."):
        lines.extend(_split(pending))
    return lines


_LINE_END = re.compile(rb"\r*\n")


def _split(data: bytes) -> list[bytes]:
    """C{data} cut into lines at each LF, every CR before it dropped (Postfix's
    C{sendmail_fix_line_endings}: CR CR LF is one line end); a final line end adds no line,
    and a last line without one (the end of the input) loses its final CRs too."""
    lines = _LINE_END.split(data)
    if lines[-1] == b"":
        lines.pop()
    else:
        lines[-1] = lines[-1].rstrip(b"\r")
    return lines


@dataclass
class HeaderField:
    """One header field as it came: C{name} as written and its C{lines} (the first with the
    name, then the continuation lines)."""

    name: str
    lines: list[bytes]

    @property
    def key(self) -> str:
        """The name in lower case."""
        return self.name.lower()

    @property
    def value(self) -> str:
        """The field body, unfolded (non-UTF-8 octets kept as surrogate escapes)."""
        raw = b"".join(self.lines)
        text = raw.decode("utf-8", "surrogateescape")
        return text.split(":", 1)[1].strip()


@dataclass
class ParsedMessage:
    """A message cut into its header fields and its body lines.

    @ivar separated: the header section ended with an empty line (which is not in C{body});
        C{False} when the input had no header section, or one running into the body or into
        the end of the input.
    """

    headers: list[HeaderField] = field(default_factory=list)
    body: list[bytes] = field(default_factory=list)
    separated: bool = False

    def fields(self, *names: str) -> list[HeaderField]:
        """The fields called one of C{names} (lower case), in order."""
        return [h for h in self.headers if h.key in names]


def parseMessage(lines: Sequence[bytes]) -> ParsedMessage:
    """Cut C{lines} into header fields and body, as Postfix's cleanup does: the header
    section ends at an empty line, or at the first line that is neither a field nor the
    continuation of one (which then starts the body); a leading mbox C{From } line is
    dropped."""
    message = ParsedMessage()
    start = 1 if lines and lines[0].startswith(b"From ") else 0
    index = start
    while index < len(lines):
        line = lines[index].replace(b"\r", b" ")  # (in a field, a CR alone has no meaning)
        if line == b"":
            message.separated = True
            index += 1
            break
        if line[:1] in (b" ", b"\t") and message.headers:
            message.headers[-1].lines.append(line)
        else:
            match = _FIELD_NAME.match(line)
            if match is None:
                break
            message.headers.append(HeaderField(match.group(1).decode("ascii"), [line]))
        index += 1
    message.body = list(lines[index:])
    return message


def qualify(address: str, domain: str) -> str:
    """C{address} with C{@domain} added when it has no domain (Postfix's
    C{append_at_myorigin})."""
    if address and "@" not in address.rsplit('"', 1)[-1]:
        return f"{address}@{domain}"
    return address


def addressList(text: str, where: str) -> list[str]:
    """The addresses of C{text}, an address list (RFC 5322 3.4: mailboxes, groups) as
    written: an angle address's content, else the mailbox without its comments; an empty
    group (C{undisclosed-recipients:;}) gives none.

    @param where: where C{text} comes from, for the message (C{"the To: field"}).
    @raise SubmitError: C{EX_DATAERR} when its quotes, comments or angle brackets do not
        balance.
    """
    found = _scanAddresses(text)
    if found is None:
        raise SubmitError(
            f"bad address list {text.strip()!r} in {where}: its quotes, comments or angle "
            "brackets do not balance",
            os.EX_DATAERR,
        )
    return [address for address, _ in found]


def recipientAddress(text: str, hostname: str, where: str) -> str:
    """The canonical RFC 5321 form of recipient C{text}, qualified with C{hostname}.

    @param where: where C{text} comes from, for the message (C{"the command line"},
        C{"the To: field"}).
    @raise SubmitError: C{EX_DATAERR} for an address that cannot be a recipient.
    """
    address = qualify(text.strip(), hostname)
    try:
        return str(parseForwardPath(f"<{address}>", utf8=True, postmasterDomain=hostname))
    except AddressError as e:
        raise SubmitError(
            f"bad recipient address {text!r} in {where}: {_reason(e)}", os.EX_DATAERR
        ) from None


def senderAddress(text: str, hostname: str) -> str:
    """The canonical form of the envelope sender given with C{-f}/C{-r}: C{""} (the null
    sender) for C{""} or C{"<>"}; C{"Name <address>"} gives its address; no domain: the
    relay's host name.

    @raise SubmitError: C{EX_USAGE} for an address that cannot be a sender.
    """
    address = text.strip()
    if address.startswith("<"):
        if not address.endswith(">"):
            raise SubmitError(f"bad sender address {text!r}: missing '>'", os.EX_USAGE)
        address = address[1:-1].strip()
    elif "<" in address:
        address = parseaddr(address)[1]
    if address == "":
        return ""
    address = qualify(address, hostname)
    try:
        mailbox = parseReversePath(f"<{address}>", utf8=True)
    except AddressError as e:
        raise SubmitError(f"bad sender address {text!r}: {_reason(e)}", os.EX_USAGE) from None
    return "" if mailbox is None else str(mailbox)


def _reason(error: AddressError) -> str:
    return error.reply.text.removeprefix("Error: ")


def commandLineRecipients(arguments: Iterable[str], hostname: str) -> list[str]:
    """The recipients given as arguments; one argument may hold several, separated by commas
    (C{"a@example.org, Bob <b@example.org>"}), as Sendmail allows."""
    result: list[str] = []
    for argument in arguments:
        addresses = addressList(argument, "the command line")
        if not addresses:
            raise SubmitError(
                f"bad recipient address {argument!r} on the command line", os.EX_USAGE
            )
        for address in addresses:
            result.append(recipientAddress(address, hostname, "the command line"))
    return result


@dataclass(frozen=True)
class Submission:
    """What L{prepareMessage} makes: the envelope recipients and the message, CRLF lines."""

    recipients: tuple[str, ...]
    content: bytes


def prepareMessage(
    lines: Sequence[bytes],
    *,
    recipients: Sequence[str],
    extract: bool,
    sender: str,
    fullName: str | None,
    hostname: str,
    uid: int,
    now: float,
) -> Submission:
    """The recipients and the message to submit (see the module's docstring).

    @param recipients: those given on the command line, canonical (see
        L{commandLineRecipients}); with C{extract} (C{-t}) those of the header are added, as
        Postfix does (Sendmail would drop them instead).
    @param sender: the envelope sender, canonical (C{""}: the null sender).
    @param fullName: the sender's full name (C{-F}, or C{$NAME}) for a C{From:} added.
    @param hostname: the relay's host name, the domain of addresses without one.
    @param uid: the submitting user's id, for the C{Received:} field.
    @param now: the time, for the C{Received:} field.
    @raise SubmitError: C{EX_USAGE} without any recipient, C{EX_DATAERR} for a bad address.
    """
    message = parseMessage(lines)
    resent = any(h.key in _RESENT for h in message.headers)
    # The Resent- recipients when there is a Resent-To:, -Cc: or -Bcc: (Postfix's sendmail).
    prefix = "resent-" if message.fields(*_RESENT_RECIPIENT_FIELDS) else ""
    found = list(recipients)
    if extract:
        for header in message.fields(*(prefix + name for name in _RECIPIENT_FIELDS)):
            for address in addressList(header.value, f"the {header.name}: field"):
                found.append(recipientAddress(address, hostname, f"the {header.name}: field"))
    unique = tuple(dict.fromkeys(found))
    if not unique:
        raise SubmitError(
            "no recipient addresses found in the message header (-t)"
            if extract
            else "recipient addresses must be given on the command line or with -t",
            os.EX_USAGE,
        )
    headers: list[list[bytes]] = []
    for header in message.headers:
        if header.key in ("bcc", "resent-bcc"):
            continue
        headers.append(_qualified(header, hostname))
    fromName = "Resent-From" if resent else "From"
    if not message.fields(fromName.lower()):
        author = sender or f"MAILER-DAEMON@{hostname}"
        headers.append(_field(fromName, [(fullName or "", author)] if sender else [("", author)]))
    received = (
        f"Received: by {hostname} (mailrelay-sendmail, from userid {uid});".encode("ascii"),
        b"\t" + formatDate(now).encode("ascii"),
    )
    out = [*received, *(line for h in headers for line in h), b""]
    if message.body or message.separated:
        out.extend(piece for line in message.body for piece in line.split(b"\r"))
    content = b"".join(piece + b"\r\n" for line in out for piece in _fold(line))
    return Submission(unique, content)


def _qualified(header: HeaderField, hostname: str) -> list[bytes]:
    """The lines of C{header}, rewritten when it is an address field with an address lacking
    a domain: C{@hostname} is inserted after each such address where it stands, the rest
    of the field kept as written (groups, comments, display names, folding), as Postfix's
    cleanup rewrites address tokens (C{To: root} becomes C{To: root@relay.example},
    C{From: root (Cron Daemon)} C{From: root@relay.example (Cron Daemon)}).  A field whose
    quotes, comments or brackets do not balance is left as it is."""
    if header.key not in ADDRESS_FIELDS:
        return header.lines
    raw = b"\n".join(header.lines).decode("utf-8", "surrogateescape")
    start = raw.index(":") + 1
    found = _scanAddresses(raw[start:])
    missing = [end for address, end in found or () if qualify(address, hostname) != address]
    if not missing:  # (or a field that cannot be read: left as it is)
        return header.lines
    text = raw
    for end in reversed(missing):
        text = text[: start + end] + "@" + hostname + text[start + end :]
    return [line.encode("utf-8", "surrogateescape") for line in text.split("\n")]


def _scanAddresses(value: str) -> list[tuple[str, int]] | None:
    """The mailboxes of C{value}, an address list (RFC 5322 3.4): for each, its address (an
    angle address's content, else the mailbox's text without comments, stripped) and where
    it ends in C{value} (where C{@domain} would go); C{None} when its quotes, comments or
    angle brackets do not balance.  Group names and their C{;} are no mailboxes."""
    found: list[tuple[str, int]] = []
    quoted = False
    depth = 0  # of comments
    escaped = False
    angle: int | None = None  # where the open "<" is
    core: list[str] = []  # the mailbox's characters outside comments and angle brackets
    last = -1  # the last of them that is not white space
    angled: tuple[str, int] | None = None  # the angle address and where it ends, once closed

    def mailboxEnds() -> None:
        nonlocal core, last, angled
        if angled is not None:
            found.append(angled)
        elif "".join(core).strip():
            found.append(("".join(core).strip(), last + 1))
        core, last, angled = [], -1, None

    for index, char in enumerate(value):
        if escaped:
            escaped = False
            if angle is None and not depth:
                core.append(char)
                last = index
            continue
        if char == "\\" and (quoted or depth):
            escaped = True
            if angle is None and not depth:
                core.append(char)
            continue
        if depth:
            depth += {"(": 1, ")": -1}.get(char, 0)
            continue
        if angle is not None:
            if quoted:
                quoted = char != '"'
            elif char == '"':
                quoted = True
            elif char == ">":
                angled, angle = (value[angle + 1 : index].strip(), index), None
            continue
        if quoted:
            quoted = char != '"'
        elif char == '"':
            quoted = True
        elif char == "(":
            depth = 1
            continue
        elif char == "<":
            angle = index
            continue
        elif char in ",;":
            mailboxEnds()
            continue
        elif char == ":":  # a group's name ends (a route's ":" is within <...>)
            core, last, angled = [], -1, None
            continue
        core.append(char)
        if not char.isspace():
            last = index
    if quoted or depth or angle is not None:
        return None
    mailboxEnds()
    return found


def _field(name: str, pairs: list[tuple[str, str]]) -> list[bytes]:
    """An address field C{name} listing C{pairs}, folded after commas when long."""
    items = [_mailbox(name, address) for name, address in pairs]
    lines = [f"{name}: "]
    for index, item in enumerate(items):
        text = item + ("," if index < len(items) - 1 else "")
        if index and len(lines[-1]) + 1 + len(text) > 78:
            lines.append(" " + text)
        else:
            lines[-1] += ("" if lines[-1].endswith(": ") else " ") + text
    return [line.encode("utf-8", "surrogateescape") for line in lines]


def _mailbox(name: str, address: str) -> str:
    """C{address} with display name C{name} (quoted or encoded as C{formataddr} does); an
    SMTPUTF8 address as it is (RFC 6532 3.2), which C{formataddr} refuses."""
    if address.isascii():
        return formataddr((name, address))
    if not name:
        return address
    return formataddr((name, "x@x")).removesuffix("<x@x>") + f"<{address}>"


def _fold(line: bytes) -> list[bytes]:
    """C{line} as lines of at most L{MAX_LINE} octets: a longer one is broken, each further
    piece starting with a space (Postfix's C{smtp_line_length_limit})."""
    if len(line) <= MAX_LINE:
        return [line]
    pieces = [line[:MAX_LINE]]
    rest = line[MAX_LINE:]
    while rest:
        pieces.append(b" " + rest[: MAX_LINE - 1])
        rest = rest[MAX_LINE - 1 :]
    return pieces
