"""The header fields of a message as the relay itself reads them, for the built-in plugins
that must see the fields of a message dkimpy refuses to parse (dkimpy's C{rfc822_parse}
raises on RFC 5322 section 4.5's obsolete white space before the colon, and on a line that
is no field)."""

from __future__ import annotations

from mailrelay.headers import HEADER_SECTION_LIMIT, parseHeaderSection

__all__ = ["headerFields"]


def headerFields(message: bytes) -> list[tuple[bytes, bytes]]:
    """The header fields of C{message} (CRLF line ends) as C{(name, raw)} pairs: the name
    without the white space before its colon, and the field byte for byte (its continuation
    lines and CRLF included: what C{FilterResult.remove} takes).  As the relay reads them
    (L{parseHeaderSection}): the header section ends at the empty line, at the first line
    that is neither a field nor a continuation line (what follows is the body), or at
    L{HEADER_SECTION_LIMIT} (what follows is taken as body)."""
    fields, _ = parseHeaderSection(message, HEADER_SECTION_LIMIT)
    return [(name.encode("ascii"), raw) for name, raw in fields]
