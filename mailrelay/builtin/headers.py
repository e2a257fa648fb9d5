"""The header fields of a message as the relay itself reads them, for the built-in plugins
that must see the fields of a message dkimpy refuses to parse (dkimpy's C{rfc822_parse}
raises on RFC 5322 section 4.5's obsolete white space before the colon, and on a line that
is no field)."""

from __future__ import annotations

import re

__all__ = ["headerFields"]

#: A field's name, any (obsolete) white space after it, and its colon (RFC 5322 2.2, 4.5).
_FIELD_NAME = re.compile(rb"([\x21-\x39\x3b-\x7e]+)[ \t]*:")


def headerFields(message: bytes) -> list[tuple[bytes, bytes]]:
    """The header fields of C{message} (CRLF line ends) as C{(name, raw)} pairs: the name
    without the white space before its colon, and the field byte for byte (its continuation
    lines and CRLF included: what C{FilterResult.remove} takes).  As the relay's own parse,
    the header section ends at the empty line, or at the first line that is neither a field
    nor a continuation line (what follows is the body)."""
    fields: list[tuple[bytes, bytes]] = []
    for line in message.partition(b"\r\n\r\n")[0].split(b"\r\n"):
        if line[:1] in (b" ", b"\t") and fields:
            name, raw = fields[-1]
            fields[-1] = (name, raw + line + b"\r\n")
            continue
        m = _FIELD_NAME.match(line)
        if m is None:
            break
        fields.append((m.group(1), line + b"\r\n"))
    return fields
