"""The header section of a message as the relay reads it: where it ends, its fields, and
the size past which the rest is taken as body.  Values only: the stages (cleanup's
stampers and filters) and the built-in plugins read messages with it alike."""

from __future__ import annotations

import re

__all__ = ["FIELD_NAME", "HEADER_SECTION_LIMIT", "needsEmptyLine", "parseHeaderSection"]

#: Like Postfix's header_size_limit: past this much, the rest is treated as body.
HEADER_SECTION_LIMIT = 102400

#: A field's name, any (obsolete, RFC 5322 4.5) white space after it, and its colon.
FIELD_NAME = re.compile(rb"[\x21-\x39\x3b-\x7e]+[ \t]*:")


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
            m = FIELD_NAME.match(data, pos, eol)
            if m is None:
                break
            starts.append((m.group(0)[:-1].rstrip(b" \t").decode("ascii"), pos))
        pos = eol + 2
    if starts and data[pos : pos + 1] in (b" ", b"\t"):
        # The last field goes on beyond what was parsed: it is not complete.
        pos = starts.pop()[1]
    ends = [start for _, start in starts[1:]] + [pos]
    return [(name, data[start:end]) for (name, start), end in zip(starts, ends, strict=False)], pos


#: What may still become a field's name and colon once more of its line arrives.
_FIELD_START = re.compile(rb"[\x21-\x39\x3b-\x7e]*[ \t]*")


def needsEmptyLine(data: bytes, end: int) -> bool:
    """Whether an empty line must go at C{end} of C{data} (the start of a message, whose
    header section L{parseHeaderSection} found to end there): the line there is neither
    empty nor a field, nor (when C{data} ends within it) can still become either.  As in
    Postfix's cleanup (C{non_empty_end_of_header_action = fix_quietly}, cleanup_message.c),
    that line and what follows are the body: an empty line before it keeps them so for
    every later reader, and keeps it from joining header fields put before it (or
    continuing the last of them, when it starts with white space).  With C{end == 0} the
    message has no header section: the caller inserts the empty line only when it adds
    fields on top."""
    eol = data.find(b"\r\n", end)
    line = data[end:] if eol < 0 else data[end:eol]
    if eol < 0 and (line in (b"", b"\r") or _FIELD_START.fullmatch(line)):
        return False  # (not known yet)
    return eol != end and FIELD_NAME.match(line) is None
