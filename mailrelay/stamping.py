"""Header stamping: C{Received:}, C{Message-Id:} and C{Date:}, and loop detection.

L{HeaderProcessor} sits between the session's message data and the spool: it holds back the
header section (bounded), lets the stampers add their fields once it is complete, then streams
the rest straight through.  The message is otherwise stored byte for byte as received.
"""

from __future__ import annotations

import re
import time
from datetime import datetime
from email.utils import format_datetime
from ipaddress import ip_address
from typing import Any, Callable, Iterable

from twisted.logger import Logger
from zope.interface import implementer

from mailrelay.address import AddressError, normaliseDomain
from mailrelay.config import hostnameProblem
from mailrelay.interfaces import IHeaderStamper, PluginContext, StampContext, StampResult

log = Logger()

#: Like Postfix's header_size_limit: past this much, the rest is treated as body.
HEADER_SECTION_LIMIT = 102400

_FIELD_NAME = re.compile(rb"[\x21-\x39\x3b-\x7e]+[ \t]*:")
#: A field: name, colon, value; continuation lines start with white space; CRLF only.
_WELL_FORMED_FIELD = re.compile(rb"[\x21-\x39\x3b-\x7e]+:[^\r\n]*(?:\r\n[ \t][^\r\n]*)*\r\n")
_HELO_UNSAFE = re.compile(r"[^A-Za-z0-9.\-_:\[\]]")


def parseHeaderSection(
    data: bytes, limit: int | None = None
) -> tuple[list[tuple[str, bytes]], int]:
    """Split the header fields off the start of a message.

    Only complete lines (ending in CRLF) and complete fields are taken: where the section is
    cut short (at C{limit}, or by an unfinished line at the end of C{data}), a field whose next
    line is a continuation, or may be one, is left out.  So the offset returned is always the
    start of a line that does not continue a field: the place where fields may be inserted.

    @param data: the start of a message (CRLF line ends).
    @param limit: when C{data} is longer, only lines ending within its first C{limit} octets
        are parsed (what follows tells whether the last of them is continued).
    @return: the fields as C{(name, raw)} pairs (raw includes continuation lines and CRLF), and
        the offset where the header section ends (at the empty line, at the first line that
        is neither a field nor a continuation, at the end of C{data} or at the end of the last
        complete field within C{limit}).
    """
    starts: list[tuple[str, int]] = []
    pos = 0
    n = len(data) if limit is None else min(len(data), limit)
    while pos < n:
        eol = data.find(b"\r\n", pos, n)
        if eol < 0:
            break  # a line not complete within what may be parsed
        if data[pos : pos + 1] not in (b" ", b"\t") or not starts:
            m = _FIELD_NAME.match(data, pos, eol)
            if m is None:
                break
            starts.append((m.group(0)[:-1].rstrip(b" \t").decode("ascii"), pos))
        pos = eol + 2
    if starts and data[pos : pos + 1] in (b" ", b"\t"):
        # The last field goes on beyond what was parsed: it is not complete.
        pos = starts.pop()[1]
    ends = [start for _, start in starts[1:]] + [pos]
    return [(name, data[start:end]) for (name, start), end in zip(starts, ends)], pos


class HeaderProcessor:
    """Buffers the header section of one message, stamps it, then streams.

    @param sink: called with the bytes to store, in order.
    @param stamp: called once with the parsed header fields; returns the L{StampResult}.
    """

    def __init__(
        self,
        sink: Callable[[bytes], None],
        stamp: Callable[[list[tuple[str, bytes]]], StampResult],
        limit: int = HEADER_SECTION_LIMIT,
    ) -> None:
        self._sink = sink
        self._stamp = stamp
        self._limit = limit
        #: The start of the message held back until its header section is complete.
        self._pending: bytearray | None = bytearray()
        self.headers: list[tuple[str, bytes]] = []

    def write(self, data: bytes) -> None:
        pending = self._pending
        if pending is None:
            self._sink(data)
            return
        searchFrom = max(len(pending) - 3, 0)  # only the new data, and a CRLF CR before it
        pending += data
        # The section certainly ends by the first empty line, or is taken as ended at the limit.
        if (
            len(pending) > self._limit
            or pending.startswith(b"\r\n")
            or pending.find(b"\r\n\r\n", searchFrom) >= 0
        ):
            self._flush()

    def finish(self) -> None:
        """The message ended: stamp now if the header section never ended."""
        if self._pending is not None:
            self._flush()

    def count(self, name: str) -> int:
        lname = name.lower()
        return sum(1 for n, _ in self.headers if n.lower() == lname)

    def _flush(self) -> None:
        data = bytes(self._pending or b"")
        self._pending = None
        self.headers, end = parseHeaderSection(data, self._limit)
        result = self._stamp(self.headers)
        added = b"".join(result.append)
        if data[end : end + 1] in (b" ", b"\t") and (result.prepend or added):
            # A message starting with white space (no header section): the line would continue
            # the last field added; an empty line makes it the start of the body it is.
            added += b"\r\n"
        self._sink(b"".join(result.prepend) + data[:end] + added + data[end:])


def _heloDomain(helo: str) -> str:
    """The HELO name as the C{From-domain} of C{Received:}: a host name or an address literal
    of valid syntax, else C{"unknown"} (never free text: no comment can be spoofed)."""
    if helo.startswith("["):
        try:
            return normaliseDomain(helo)
        except AddressError:
            return "unknown"
    return helo if hostnameProblem(helo) is None else "unknown"


def _addressLiteral(ip: str) -> str:
    try:
        parsed = ip_address(ip.split("%", 1)[0])  # without an IPv6 zone id
    except ValueError:
        return "[" + _HELO_UNSAFE.sub("?", ip) + "]"
    if parsed.version == 6:
        if parsed.ipv4_mapped is not None:
            return f"[{parsed.ipv4_mapped}]"
        return f"[IPv6:{parsed.compressed}]"
    return f"[{parsed}]"


def protocolName(context: StampContext) -> str:
    """The C{with} protocol of RFC 3848 / RFC 6531 (UTF8SMTP when SMTPUTF8 was used)."""
    name = context.client.protocol
    if context.envelope.smtputf8 and name.startswith("ESMTP"):
        name = "UTF8SMTP" + name[5:]
    return name


def formatDate(when: float) -> str:
    return format_datetime(datetime.fromtimestamp(when).astimezone())


@implementer(IHeaderStamper)
class DefaultStamper:
    """Adds the RFC 5321 section 4.4 C{Received:} field, and C{Message-Id:} and C{Date:} when
    the message has none and the listener allows it (C{add_message_id}, C{add_date})."""

    def __init__(self, addMessageID: bool = True, addDate: bool = True) -> None:
        self.addMessageID = addMessageID
        self.addDate = addDate

    def stamp(self, context: StampContext) -> StampResult:
        client = context.client
        envelope = context.envelope
        date = formatDate(context.now)
        helo = _heloDomain(client.helo or "unknown")
        rdns = client.rdns or "unknown"
        received = (
            f"Received: from {helo} ({rdns} {_addressLiteral(client.address)})\r\n"
            f"\tby {context.hostname} (mailrelay) with {protocolName(context)}"
            f" id {envelope.queueID}"
        )
        if client.tls:
            received += f"\r\n\t(using {client.tls})"
        if client.authUser:
            received += f"\r\n\t(authenticated as {_HELO_UNSAFE.sub('?', client.authUser)})"
        if len(envelope.recipients) == 1:
            rcpt = envelope.recipients[0].address
            if "\r" not in rcpt and "\n" not in rcpt:
                received += f"\r\n\tfor <{rcpt}>"
        received += f"; {date}\r\n"
        result = StampResult(prepend=[received.encode("utf-8")])
        options = context.listenerOptions
        if self.addMessageID and options.get("add_message_id", True) and not context.hasHeader("Message-Id"):
            stamp = time.strftime("%Y%m%d%H%M%S", time.gmtime(context.now))
            result.append.append(
                f"Message-Id: <{stamp}.{envelope.queueID}@{context.hostname}>\r\n".encode("ascii")
            )
        if self.addDate and options.get("add_date", True) and not context.hasHeader("Date"):
            result.append.append(f"Date: {date}\r\n".encode("ascii"))
        return result


def buildDefaultStamper(options: dict[str, Any], context: PluginContext) -> DefaultStamper:
    """Factory for the C{default} header stamper plugin (options: C{message_id}, C{date})."""
    from mailrelay.errors import ConfigError

    allowed = {"message_id", "date"}
    for key, value in options.items():
        if key not in allowed:
            raise ConfigError(f"unknown option; allowed: {', '.join(sorted(allowed))}", key=key)
        if not isinstance(value, bool):
            raise ConfigError(f"must be true or false, not {value!r}", key=key)
    return DefaultStamper(
        addMessageID=options.get("message_id", True), addDate=options.get("date", True)
    )


def runStampers(stampers: Iterable[IHeaderStamper], context: StampContext) -> StampResult:
    """Run every stamper; later stampers' prepended fields go on top."""
    total = StampResult()
    for stamper in stampers:
        result = stamper.stamp(context)
        total.prepend[:0] = result.prepend
        total.append.extend(result.append)
    for fieldBytes in total.prepend + total.append:
        if not _WELL_FORMED_FIELD.fullmatch(fieldBytes):
            raise ValueError(f"a stamper returned a malformed header field: {fieldBytes!r}")
    return total
