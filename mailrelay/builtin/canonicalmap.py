"""The address table of the built-in C{sender-canonical} plugin: Postfix's canonical(5)
table format and lookup order, read from a file and read again when the file changes.

The file: one C{pattern result} pair a logical line; blank lines and lines whose first
non-blank character is C{#} are ignored; a line starting with white space continues the one
before (as postmap(1) reads it), and is an error where there is none before it (Postfix
warns "logical line must not start with whitespace" and skips it).
Patterns, in the order canonical(5) looks them up:

  - C{user@domain}: that address (highest precedence);
  - C{user}: that user at one of the relay's own domains (Postfix: C{$myorigin},
    C{$mydestination}; here the plugin's C{local_domains});
  - C{@domain}: any other address in the domain (lowest precedence).

With recipient delimiters (C{[delivery] recipient_delimiter}), an address with an extension
is looked up whole, then without it, and a C{user@domain} result found so gets the
extension back (canonical(5) ADDRESS EXTENSION: L{CanonicalMap.lookup}).

Results: C{user@domain} (the address becomes it) or C{@domain} (the same local part, in that
domain).  Look-ups ignore case, as Postfix's indexed tables fold their keys (the local part
of an C{@domain} result keeps its case).  Local parts and domains may be UTF-8 (RFC 6531);
domains are kept as IDNA A-labels, as the relay keeps every address.

Written on the public plugin API only (tests/test_layering.py).
"""

from __future__ import annotations

import re
import threading
from collections.abc import Collection, Iterable
from dataclasses import dataclass, field

from mailrelay.address import (
    AddressError,
    extendedLocalPart,
    normaliseDomain,
    parseReversePath,
    splitExtension,
)
from mailrelay.errors import ConfigError
from mailrelay.namedfile import fileStamp, readError, readNamedFile

__all__ = ["CanonicalMap", "MapFile", "parseCanonicalMap", "readCanonicalMap"]

#: A pattern whose local part is a quoted-string, up to the white space after it.
_QUOTED_PATTERN = re.compile(r'"(?:[^"\\]|\\.)*"@\S*(?=\s|$)')


@dataclass(frozen=True)
class CanonicalMap:
    """A canonical table (see the module docstring).

    @ivar addresses: results by C{user@domain} (local part lower-cased).
    @ivar users: results by C{user} (lower-cased), for the local domains.
    @ivar domains: results by domain.
    @ivar source: the file it was read from, for messages.
    """

    addresses: dict[str, str] = field(default_factory=dict)
    users: dict[str, str] = field(default_factory=dict)
    domains: dict[str, str] = field(default_factory=dict)
    source: str = ""

    def __len__(self) -> int:
        return len(self.addresses) + len(self.users) + len(self.domains)

    def lookup(self, address: str, localDomains: Collection[str],
               delimiters: str = "") -> str | None:
        """What C{address} (canonical: C{local@domain}, domain in A-labels, lower case)
        becomes, or C{None} when no pattern matches it (or its result is the address
        itself).

        @param delimiters: the recipient delimiters (C{[delivery] recipient_delimiter}):
            an address with an extension (C{user+ext@domain}) is looked up whole, then
            without it (C{user@domain}), whose C{user@domain} result gets the extension
            back (canonical(5) ADDRESS EXTENSION; Postfix's mail_addr_find() and
            propagate_unmatched_extensions); the same for C{user+ext}, then C{user}.
        """
        local, at, domain = address.rpartition("@")
        if not at or not local:
            return None
        bare, extension = splitExtension(local, delimiters)
        users = [(local.lower(), "")] + ([(bare.lower(), extension)] if extension else [])
        tried = [(self.addresses, f"{user}@{domain}", kept) for user, kept in users]
        if domain in localDomains:
            tried += [(self.users, user, kept) for user, kept in users]
        result, kept = next(((table[key], kept) for table, key, kept in tried if key in table),
                            (self.domains.get(domain), ""))
        if result is None:
            return None
        if result.startswith("@"):
            result = local + result
        elif kept:
            user, _, resultDomain = result.rpartition("@")
            result = f"{extendedLocalPart(user, kept)}@{resultDomain}"
        return None if result == address else result


def _mailbox(text: str, what: str) -> str:
    """C{text}, an address, in canonical form (C{ValueError}: not one)."""
    try:
        mailbox = parseReversePath(f"<{text}>", utf8=True)
    except AddressError as e:
        raise ValueError(f"bad {what} {text!r} ({e.reply.text.removeprefix('Error: ')})") from None
    if mailbox is None or mailbox.isLiteral:
        raise ValueError(f"bad {what} {text!r} (an address in a domain, please)")
    return str(mailbox)


def _domain(text: str, what: str) -> str:
    try:
        return normaliseDomain(text)
    except ValueError as e:
        raise ValueError(f"bad {what} domain {text!r} ({e})") from None


def _parseLine(line: str) -> tuple[str, str, str]:
    """The kind (C{"address"}, C{"user"}, C{"domain"}), key and result of one logical line
    (C{ValueError}: what is wrong with it)."""
    quoted = _QUOTED_PATTERN.match(line)  # ("jo smith"@lan.internal: a space in the pattern)
    words = [quoted.group(), *line[quoted.end():].split()] if quoted else line.split()
    if len(words) != 2:
        raise ValueError(
            "a line is a pattern and its result (user@domain, user or @domain, then "
            "user@domain or @domain)" if len(words) < 2
            else f"text after the result {words[1]!r}"
        )
    pattern, result = words
    if result.startswith("@"):
        result = "@" + _domain(result[1:], "result")
    elif "@" in result:
        result = _mailbox(result, "result address")
    else:
        raise ValueError(f"the result {result!r} must be user@domain or @domain")
    if pattern.startswith("@"):
        return "domain", _domain(pattern[1:], "pattern"), result
    if "@" in pattern:
        local, _, domain = _mailbox(pattern, "pattern address").rpartition("@")
        return "address", f"{local.lower()}@{domain}", result
    try:
        local = _mailbox(f"{pattern}@example.invalid", "pattern user").rpartition("@")[0]
    except ValueError as e:
        # (The message names the user as written, not the address it was checked as.)
        raise ValueError(str(e).replace(f"{pattern}@example.invalid", pattern, 1)) from None
    return "user", local.lower(), result


def parseCanonicalMap(lines: Iterable[str], source: str = "") -> CanonicalMap:
    """The table of C{lines} (see the module docstring).

    @param source: the file name, for messages.
    @raise ConfigError: a line is wrong (or a pattern given twice): the message names
        C{source:lineno} and the line (key C{map}).
    """
    table = CanonicalMap(source=source)
    seen: dict[tuple[str, str], int] = {}
    logical: list[tuple[int, str]] = []
    for lineno, raw in enumerate(lines, 1):
        if not raw.strip() or raw.lstrip().startswith("#"):
            continue
        if raw[0].isspace() and logical:
            first, text = logical[-1]
            logical[-1] = (first, f"{text} {raw.strip()}")
        else:
            logical.append((lineno, raw.rstrip()))
    for lineno, line in logical:
        try:
            if line[0].isspace():
                # Postfix's readllines() warns and skips it; a table line in error here.
                raise ValueError(
                    "a logical line must not start with white space (it continues no line "
                    "before it)"
                )
            kind, key, result = _parseLine(line)
            if (kind, key) in seen:
                raise ValueError(f"pattern given twice (first on line {seen[kind, key]})")
        except ValueError as e:
            raise ConfigError(f"{source}:{lineno}: {e}: {line!r}", key="map") from None
        seen[kind, key] = lineno
        {"address": table.addresses, "user": table.users, "domain": table.domains}[kind][key] = (
            result)
    return table


def readCanonicalMap(path: str) -> CanonicalMap:
    """The table in the file C{path} (UTF-8).

    @raise ConfigError: it cannot be read, is not UTF-8, or a line is wrong; the message
        names the file (and the line).
    """
    try:
        data = readNamedFile(path)
    except OSError as e:
        raise ConfigError(f"cannot read the map {path}: {readError(e)}", key="map") from None
    try:
        text = data.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        lineno = data[: e.start].count(b"\n") + 1
        raise ConfigError(f"{path}:{lineno}: not UTF-8 text", key="map") from None
    return parseCanonicalMap(text.splitlines(), path)


class MapFile:
    """A canonical table file, read again when it changes (its inode, modification time or
    size), as the AUTH password file is: a changed file that cannot be used leaves the
    table read before in use, and says why (once per change).  Safe to call from several
    threads of the pool at once (one reads the file, the others wait for it).

    @ivar path: the file.
    @ivar table: the table in use.
    """

    def __init__(self, path: str) -> None:
        self.path = path
        self._lock = threading.Lock()
        self._stamp: tuple[int, int, int, int] | None = None
        try:
            self._stamp = fileStamp(path)
        except OSError:
            pass
        self.table = readCanonicalMap(path)

    def current(self) -> tuple[CanonicalMap, str | None]:
        """The table, read again first if the file changed (blocking: call it in a thread),
        and what is wrong with the changed file (C{None}: nothing, or told already)."""
        with self._lock:
            return self._current()

    def _current(self) -> tuple[CanonicalMap, str | None]:
        try:
            stamp: tuple[int, int, int, int] | None = fileStamp(self.path)
        except OSError as e:
            stamp = None
            problem = f"cannot read the map {self.path}: {readError(e)}"
        if stamp == self._stamp:
            return self.table, None
        self._stamp = stamp
        if stamp is None:
            return self.table, problem
        try:
            self.table = readCanonicalMap(self.path)
        except ConfigError as e:
            return self.table, e.message
        return self.table, None
