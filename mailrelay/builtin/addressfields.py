"""Rewriting the addresses of an address header field (C{From:}, C{Sender:}, C{Reply-To:}...)
in place, as Postfix's cleanup rewrites the address tokens of such a field with
C{canonical_maps}: only the addr-spec of each mailbox changes; its display name (encoded
words included), comments, white space and folding, the group syntax and the other addresses
of the field stay byte for byte (RFC 5322 section 3.4).

A field that cannot be read as RFC 5322 addresses (an unclosed quote, comment or angle
bracket, a mailbox that is no addr-spec), or whose line the new addresses would take past
998 octets, is left as it is: L{rewriteAddresses} says why, for
the log, and never returns half a field.  An address without a domain (C{From: root}) is not
looked up: on a smarthost the client qualifies it (Postfix's C{append_at_myorigin} is the
client's).

Written on the public plugin API only (tests/test_layering.py).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from mailrelay.address import AddressError, parseReversePath

__all__ = ["Rewritten", "rewriteAddresses"]

_SPECIALS = "<>,:;@."
#: The longest line of a header field, its CRLF left out (RFC 5322 section 2.1.1).
MAX_LINE = 998
_SPACE = " \t\r\n"


@dataclass(frozen=True)
class Rewritten:
    """What L{rewriteAddresses} made of a field.

    @ivar field: the field with its addresses rewritten, or C{None} (unchanged).
    @ivar changes: C{(old, new)} for each address rewritten (canonical forms).
    @ivar problem: why the field was left as it is, or C{None}.
    """

    field: bytes | None = None
    changes: tuple[tuple[str, str], ...] = ()
    problem: str | None = None


class _Unreadable(Exception):
    pass


def _closing(text: str, start: int, opener: str, closer: str, nests: bool) -> int:
    """The index after the C{closer} that ends what starts at C{text[start]}."""
    depth = 0
    i = start
    while i < len(text):
        char = text[i]
        if char == "\\":
            i += 2
            continue
        if char == closer:
            depth -= 1
            if depth == 0:
                return i + 1
        elif char == opener and (nests or depth == 0):
            depth += 1
        i += 1
    raise _Unreadable(f"unclosed {opener!r}")


def _tokens(text: str) -> list[tuple[str, int, int]]:
    """The lexical tokens of a field's value: C{(kind, start, end)}, kind C{" "} (white
    space), C{"("} (a comment), C{'"'} (a quoted-string), C{"["} (a domain literal), a
    special character, or C{"a"} (an atom, encoded words included)."""
    tokens = []
    i = 0
    while i < len(text):
        char = text[i]
        if char in _SPACE:
            end = i
            while end < len(text) and text[end] in _SPACE:
                end += 1
            tokens.append((" ", i, end))
        elif char == "(":
            end = _closing(text, i, "(", ")", nests=True)
            tokens.append(("(", i, end))
        elif char == '"':
            end = _quoted(text, i)
            tokens.append(('"', i, end))
        elif char == "[":
            end = _closing(text, i, "[", "]", nests=False)
            tokens.append(("[", i, end))
        elif char in _SPECIALS:
            tokens.append((char, i, i + 1))
            end = i + 1
        elif char in ")]\\":
            raise _Unreadable(f"a stray {char!r}")
        else:
            end = i
            while end < len(text) and text[end] not in _SPECIALS + _SPACE + '()"[]\\':
                end += 1
            tokens.append(("a", i, end))
        i = end
    return tokens


def _quoted(text: str, start: int) -> int:
    i = start + 1
    while i < len(text):
        if text[i] == "\\":
            i += 2
        elif text[i] == '"':
            return i + 1
        else:
            i += 1
    raise _Unreadable("unclosed '\"'")


def _mailboxes(tokens: list[tuple[str, int, int]]) -> list[list[tuple[str, int, int]]]:
    """The addr-spec tokens of each mailbox of an address list (groups opened; a mailbox
    without an addr-spec, the null C{<>}, left out)."""
    significant = [t for t in tokens if t[0] not in " ("]
    units: list[list[tuple[str, int, int]]] = []
    current: list[tuple[str, int, int]] = []
    angle: list[tuple[str, int, int]] | None = None
    inGroup = False
    for token in significant:
        kind = token[0]
        if angle is not None:
            if kind == ">":
                units.append(angle)
                angle, current = None, []
                current.append(("done", 0, 0))
            elif kind == "<":
                raise _Unreadable("'<' inside '<...>'")
            elif kind == ":":  # (the end of an obsolete route: @a,@b:user@domain)
                angle = []
            else:
                angle.append(token)
        elif kind == "<":
            angle = []
        elif kind == ">":
            raise _Unreadable("a stray '>'")
        elif kind == "," or kind == ";":
            if kind == ";":
                if not inGroup:
                    raise _Unreadable("a stray ';'")
                inGroup = False
            units.append(current)
            current = []
        elif kind == ":":
            if inGroup or any(t[0] == "done" for t in current):
                raise _Unreadable("a stray ':'")
            inGroup, current = True, []  # (the group's display name)
        else:
            current.append(token)
    if angle is not None:
        raise _Unreadable("unclosed '<'")
    if inGroup:
        raise _Unreadable("a group without its ';'")
    units.append(current)
    found = []
    for unit in units:
        if any(t[0] == "done" for t in unit):
            if any(t[0] != "done" for t in unit):
                raise _Unreadable("text after '<...>'")
            continue
        found.append(unit)
    return [unit for unit in found if unit]


def rewriteAddresses(field: bytes, rewrite: Callable[[str], str | None]) -> Rewritten:
    """C{field} (a whole header field, CRLF included) with each address C{rewrite} maps to
    another (it gets and returns canonical C{local@domain} forms, C{None}: unchanged) put in
    place of the old one, and nothing else of the field changed."""
    name, colon, value = field.partition(b":")
    if not colon:
        return Rewritten(problem="not a header field")
    text = value.decode("utf-8", "surrogateescape")
    try:
        tokens = _tokens(text)
        mailboxes = _mailboxes(tokens)
    except _Unreadable as e:
        return Rewritten(problem=f"cannot read its addresses: {e}")
    blanks = [t[1] for t in tokens if t[0] in " ("]
    edits: list[tuple[int, int, str]] = []
    changes: list[tuple[str, str]] = []
    for addrSpec in mailboxes:
        first, last = addrSpec[0][1], addrSpec[-1][2]
        if any(first <= s < last for s in blanks):
            return Rewritten(problem="cannot read its addresses: white space or a comment "
                                     "inside an address")
        if not any(t[0] == "@" for t in addrSpec):
            if len(addrSpec) == 1 or all(t[0] in 'a."' for t in addrSpec):
                continue  # (an unqualified address: left to the client)
            return Rewritten(problem="cannot read its addresses: a mailbox without an address")
        spec = text[first:last]
        try:
            mailbox = parseReversePath(f"<{spec}>", utf8=True)
        except (AddressError, UnicodeError):
            return Rewritten(problem=f"cannot read its addresses: bad address {spec!r}")
        if mailbox is None:
            continue
        old = str(mailbox)
        new = rewrite(old)
        if new is not None and new != old:
            edits.append((first, last, new))
            changes.append((old, new))
    if not edits:
        return Rewritten()
    for first, last, new in reversed(edits):
        text = text[:first] + new + text[last:]
    rewritten = name + b":" + text.encode("utf-8", "surrogateescape")
    if any(len(line) > MAX_LINE for line in rewritten.split(b"\r\n")):
        # (Not folded here: the field is the client's, its layout kept byte for byte.)
        return Rewritten(problem=f"a line would be longer than {MAX_LINE} octets (RFC 5322 "
                                 "section 2.1.1)")
    return Rewritten(rewritten, tuple(changes))
