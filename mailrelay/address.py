"""RFC 5321 path parsing: reverse-paths, forward-paths, ESMTP parameters and xtext.

Everything here is sans-IO and pure: functions take text and return values or raise
L{AddressError}, which carries the L{Reply} to send to the client.

Addresses are returned as L{Mailbox} values in canonical form:

  - the local part keeps its case; a quoted-string whose content is a valid Dot-string is
    unquoted (C{"joe"@x} becomes C{joe@x}), any other quoted-string is re-quoted minimally
    (only C{"} and C{\\} are backslash-escaped);
  - the domain is lower-cased, loses one trailing dot, and has its U-labels converted to
    A-labels (UTS 46, non-transitional); address literals are kept in brackets, IPv4 in
    dotted-quad form without leading zeros and IPv6 as C{[IPv6:<compressed form>]}.

With C{utf8=True} (the client declared SMTPUTF8, RFC 6531) local parts may contain non-ASCII
characters and domains U-labels; without it such addresses are refused with 553 5.6.7.
"""

from __future__ import annotations

import ipaddress
import re
import unicodedata
from dataclasses import dataclass

import idna

from mailrelay.errors import describeValue
from mailrelay.interfaces import Reply

__all__ = [
    "DELIMITER_CHARACTERS",
    "AddressError",
    "IPAddress",
    "Mailbox",
    "clientIP",
    "domainProblem",
    "extendedLocalPart",
    "hostnameProblem",
    "normaliseDomain",
    "normaliseHostname",
    "parseForwardPath",
    "parseReversePath",
    "parseSenderPattern",
    "serverName",
    "splitArgument",
    "splitExtension",
    "unmappedAddress",
    "userParts",
    "utf8AddrXtext",
    "xtextDecode",
    "xtextEncode",
]

#: RFC 5321 section 4.5.3.1 limits, in octets.
MAX_LOCAL_PART = 64
MAX_DOMAIN = 255
MAX_PATH = 256
MAX_LABEL = 63

_ATEXT = frozenset(
    "abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789!#$%&'*+-/=?^_`{|}~"
)
_LDH_LABEL = re.compile(r"[a-z0-9](?:[a-z0-9-]*[a-z0-9])?", re.ASCII)
_IPV4 = re.compile(r"[0-9]{1,3}(?:\.[0-9]{1,3}){3}", re.ASCII)
_IPV6_CHARS = re.compile(r"[0-9A-Fa-f:.]+", re.ASCII)
# General-address-literal = Standardized-tag ":" 1*dcontent; dcontent = %d33-90 / %d94-126
_GENERAL_LITERAL = re.compile(r"[A-Za-z0-9-]*[A-Za-z0-9]:[\x21-\x5a\x5e-\x7e]+", re.ASCII)
_HOST_LABEL = re.compile(r"[A-Za-z0-9](?:[A-Za-z0-9-]{0,61}[A-Za-z0-9])?\Z")
_HOST_LABEL_UNDERSCORE = re.compile(r"[A-Za-z0-9_](?:[A-Za-z0-9_-]{0,61}[A-Za-z0-9_])?\Z")
_KEYWORD = re.compile(r"[A-Za-z0-9][A-Za-z0-9-]*", re.ASCII)
_HEX = frozenset("0123456789ABCDEFabcdef")
_ROUTING = frozenset("%!@")

_SYNTAX = "syntax"
_PLAIN = "plain"


class AddressError(ValueError):
    """Bad path or parameter syntax.

    @ivar reply: the L{Reply} to send to the client.
    """

    def __init__(self, reply: Reply) -> None:
        self.reply = reply
        super().__init__(str(reply))


def domainProblem(error: ValueError) -> str:
    """What C{error} (raised by L{normaliseDomain} or the path parsers) says is wrong, for a
    message that is not an SMTP reply: an L{AddressError}'s text without its reply code and
    C{"Error: "}; any other error's own text."""
    reply = getattr(error, "reply", None)
    text = getattr(reply, "text", None)
    if not isinstance(text, str):
        return str(error)
    return text.removeprefix("Error: ")


class _Bad(Exception):
    """Internal: a problem found while parsing, before the caller's reply code is known.

    @ivar detail: what is wrong, safe to put in a reply.
    @ivar kind: C{_SYNTAX} (reported as "bad ... syntax: detail") or C{_PLAIN} (the detail is
        the whole message, as for length limits).
    """

    def __init__(self, detail: str, kind: str = _SYNTAX) -> None:
        super().__init__(detail)
        self.detail = detail
        self.kind = kind


def _show(char: str) -> str:
    """Describe one character for a reply text without echoing controls or non-ASCII."""
    if 32 <= ord(char) <= 126:
        return f"'{char}'"
    return f"U+{ord(char):04X}"


def _octets(text: str) -> int:
    """Length of C{text} in UTF-8 octets (lone surrogates counted, never raising)."""
    return len(text.encode("utf-8", "surrogatepass"))


def _isUTF8Char(char: str) -> bool:
    """Whether C{char} is a non-ASCII character allowed in SMTPUTF8 local parts.

    C1 controls and surrogates (which cannot be sent as UTF-8) are refused, and so are line
    and paragraph separators and format characters (Unicode Zl, Zp, Cf: bidi overrides,
    zero-width characters): none is part of an address, and in a log line a separator
    starts a forged line for a Unicode-aware reader, an override reverses the text.
    """
    code = ord(char)
    if code < 0xA0 or 0xD800 <= code <= 0xDFFF:
        return False
    return unicodedata.category(char) not in ("Zl", "Zp", "Cf")


def _isDotString(text: str) -> bool:
    """Whether C{text} is an RFC 5321 Dot-string (non-ASCII atext allowed)."""
    if not text:
        return False
    for atom in text.split("."):
        if not atom:
            return False
        for char in atom:
            if char not in _ATEXT and not _isUTF8Char(char):
                return False
    return True


def _quote(content: str) -> str:
    """The canonical local part for the (unquoted) content of a quoted-string."""
    if _isDotString(content):
        return content
    return '"' + content.replace("\\", "\\\\").replace('"', '\\"') + '"'


def _unquote(localPart: str) -> str:
    """The content of a canonical local part: unescaped if it is a quoted-string."""
    if len(localPart) >= 2 and localPart[0] == '"' and localPart[-1] == '"':
        return re.sub(r"\\(.)", r"\1", localPart[1:-1], flags=re.DOTALL)
    return localPart


@dataclass(frozen=True, slots=True)
class Mailbox:
    """A canonical RFC 5321 mailbox (see the module docstring for the canonical form).

    @ivar localPart: the canonical local part, a Dot-string or a minimally quoted
        quoted-string; case preserved, non-ASCII kept as Unicode.
    @ivar domain: the canonical domain (lower-case A-labels, no trailing dot) or an address
        literal in brackets.
    """

    localPart: str
    domain: str

    def __str__(self) -> str:
        return f"{self.localPart}@{self.domain}"

    @property
    def isLiteral(self) -> bool:
        """Whether the domain is an address literal (C{[192.0.2.1]}, C{[IPv6:2001:db8::1]})."""
        return self.domain.startswith("[")

    @property
    def hasRouting(self) -> bool:
        """Whether the local part holds sender-specified routing.

        That is C{%}, C{!} or C{@} in the unquoted local part: C{user%host@relay},
        C{host!user@relay}, C{"user@host"@relay}.
        """
        return not _ROUTING.isdisjoint(_unquote(self.localPart))

    @property
    def isASCII(self) -> bool:
        """Whether the address is all ASCII (else it needs SMTPUTF8 to be sent on)."""
        return self.localPart.isascii() and self.domain.isascii()


# ---------------------------------------------------------------------------------------------
# Domains


def _literal(text: str) -> str:
    """Canonicalise an address literal C{text} (with its brackets)."""
    if not text.endswith("]") or len(text) < 2:
        raise _Bad("unterminated address literal")
    inner = text[1:-1]
    if _IPV4.fullmatch(inner):
        parts = [int(p) for p in inner.split(".")]
        if any(p > 255 for p in parts):
            raise _Bad("invalid IPv4 address literal")
        return "[" + ".".join(str(p) for p in parts) + "]"
    if inner[:5].lower() == "ipv6:":
        address = inner[5:]
        if not _IPV6_CHARS.fullmatch(address):
            raise _Bad("invalid IPv6 address literal")
        try:
            parsed = ipaddress.IPv6Address(address)
        except ValueError:
            raise _Bad("invalid IPv6 address literal") from None
        return f"[IPv6:{parsed.compressed}]"
    if _GENERAL_LITERAL.fullmatch(inner):
        raise _Bad(
            "general address literals are not supported (cannot deliver to them)", _PLAIN
        )
    raise _Bad("bad address literal")


def _asciiLabel(label: str) -> str:
    """Check and lower-case one ASCII LDH label."""
    lowered = label.lower()
    if not _LDH_LABEL.fullmatch(lowered):
        if label.startswith("-") or label.endswith("-"):
            raise _Bad("domain label begins or ends with '-'")
        bad = next((c for c in label if not (c.isalnum() or c == "-")), None)
        if bad is not None:
            raise _Bad(f"invalid character {_show(bad)} in domain")
        raise _Bad("bad domain label")
    return lowered


def _domain(text: str) -> str:
    """Canonicalise a domain or address literal, raising L{_Bad}."""
    if not text:
        raise _Bad("missing domain")
    if text.startswith("["):
        return _literal(text)
    if not text.isascii():
        try:
            text = idna.uts46_remap(text, std3_rules=True, transitional=False)
        except (idna.IDNAError, UnicodeError, ValueError):
            raise _Bad("invalid internationalised domain name") from None
    if text.endswith("."):
        text = text[:-1]
    if not text:
        raise _Bad("missing domain")
    labels = []
    for label in text.split("."):
        if not label:
            raise _Bad("empty label in domain")
        if label.isascii():
            label = _asciiLabel(label)
        else:
            try:
                label = idna.alabel(label).decode("ascii")
            except (idna.IDNAError, UnicodeError, ValueError):
                raise _Bad("invalid internationalised domain label") from None
        if len(label) > MAX_LABEL:
            raise _Bad(f"domain label longer than {MAX_LABEL} octets", _PLAIN)
        labels.append(label)
    if labels[-1].isdigit():  # (RFC 1123 section 2.1: an IP address, not a domain)
        raise _Bad("the last label of a domain cannot be all digits (an IP address is "
                   "written in brackets: [192.0.2.1])")
    result = ".".join(labels)
    if len(result) > MAX_DOMAIN:
        raise _Bad(f"domain longer than {MAX_DOMAIN} octets", _PLAIN)
    return result


def normaliseDomain(domain: str) -> str:
    """Return the canonical form of C{domain}.

    Lower-cases it, strips one trailing dot and converts U-labels to A-labels (UTS 46,
    non-transitional).  Address literals (C{[192.0.2.1]}, C{[IPv6:...]}) are canonicalised
    too, so that C{normaliseDomain(mailbox.domain) == mailbox.domain} always holds.  The
    function is idempotent.  A-labels (C{xn--...}) are accepted as LDH labels and not
    checked further.

    @raise AddressError: (501 5.1.3) when C{domain} is not a valid domain.
    """
    try:
        return _domain(domain)
    except _Bad as e:
        if e.kind == _SYNTAX:
            text = f"Error: bad domain name syntax: {e.detail}"
        else:
            text = f"Error: {e.detail}"
        raise AddressError(Reply(501, "5.1.3", text)) from None


# ---------------------------------------------------------------------------------------------
# Paths


def _localPart(text: str) -> tuple[str, str]:
    """Parse the local part at the start of C{text}.

    @return: the canonical local part and the rest of C{text}, starting at the C{@}.
    """
    if text.startswith('"'):
        content = []
        i = 1
        while True:
            if i >= len(text):
                raise _Bad("unterminated quoted string")
            char = text[i]
            if char == '"':
                break
            if char == "\\":
                if i + 1 >= len(text):
                    raise _Bad("unterminated quoted string")
                char = text[i + 1]
                if not 32 <= ord(char) <= 126:
                    raise _Bad(f"invalid character {_show(char)} after '\\' in quoted string")
                i += 2
            else:
                if not (32 <= ord(char) <= 126 or _isUTF8Char(char)):
                    raise _Bad(f"invalid character {_show(char)} in quoted string")
                i += 1
            content.append(char)
        raw, rest = text[: i + 1], text[i + 1 :]
        if not rest.startswith("@"):
            if not rest:
                raise _Bad("missing '@'")
            raise _Bad(f"invalid character {_show(rest[0])} after quoted string")
        localPart = _quote("".join(content))
    else:
        raw, at, rest = text.partition("@")
        if not raw:
            raise _Bad("empty local part")
        for char in raw:
            if char != "." and char not in _ATEXT and not _isUTF8Char(char):
                raise _Bad(f"invalid character {_show(char)} in local part")
        if raw.startswith(".") or raw.endswith(".") or ".." in raw:
            raise _Bad("misplaced '.' in local part")
        if not at:
            raise _Bad("missing '@'")
        rest = at + rest
        localPart = raw
    if _octets(raw) > MAX_LOCAL_PART:
        raise _Bad(f"local part longer than {MAX_LOCAL_PART} octets", _PLAIN)
    return localPart, rest


def _sourceRoute(text: str) -> str:
    """Check and strip an RFC 5321 source route (A-d-l ":") from the start of C{text}."""
    route, colon, rest = text.partition(":")
    if not colon:
        raise _Bad("source route without ':'")
    for atDomain in route.split(","):
        if not atDomain.startswith("@"):
            raise _Bad("bad source route")
        if atDomain.startswith("@["):
            raise _Bad("address literal in source route")
        _domain(atDomain[1:])
    return rest


def _mailbox(inner: str) -> Mailbox:
    """Parse the text between the angle brackets of a non-null path."""
    if inner.startswith("@"):
        inner = _sourceRoute(inner)
    localPart, rest = _localPart(inner)
    return Mailbox(localPart, _domain(rest[1:]))


def _parsePath(
    path: str, *, utf8: bool, who: str, status: str, postmasterDomain: str | None
) -> Mailbox | None:
    """The common part of L{parseReversePath} and L{parseForwardPath}."""
    try:
        if not path.startswith("<"):
            raise _Bad("missing '<'")
        if len(path) < 2 or not path.endswith(">"):
            raise _Bad("missing closing '>'")
        inner = path[1:-1]
        if inner == "":
            if postmasterDomain is None:
                return None
            raise _Bad("null recipient address")
        if postmasterDomain is not None and inner.lower() == "postmaster":
            return Mailbox("postmaster", _domain(postmasterDomain))
        mailbox = _mailbox(inner)
        if _unquote(mailbox.localPart).startswith("-"):
            # (Postfix's allow_min_user = no: a command could take it for an option.)
            raise _Bad("local part starts with '-'")
        if max(_octets(path), _octets(str(mailbox)) + 2) > MAX_PATH:
            raise _Bad(f"path longer than {MAX_PATH} octets", _PLAIN)
    except _Bad as e:
        if e.kind == _SYNTAX:
            text = f"Error: bad {who} address syntax: {e.detail}"
        else:
            text = f"Error: {e.detail}"
        raise AddressError(Reply(501, status, text)) from None
    if not utf8 and not path.isascii():
        raise AddressError(
            Reply(553, "5.6.7", f"Error: non-ASCII {who} address requires SMTPUTF8")
        )
    return mailbox


def parseReversePath(path: str, *, utf8: bool = False) -> Mailbox | None:
    """Parse the reverse-path of MAIL FROM, angle brackets included.

    A source route is accepted and stripped.

    @param utf8: whether the client declared SMTPUTF8.
    @return: the canonical L{Mailbox}, or C{None} for the null reverse-path C{<>}.
    @raise AddressError: 501 5.1.7 for bad syntax or a length limit exceeded, 553 5.6.7 for a
        non-ASCII address without C{utf8}.
    """
    return _parsePath(path, utf8=utf8, who="sender", status="5.1.7", postmasterDomain=None)


def parseSenderPattern(text: str) -> str | None:
    """Parse a pattern of senders written without angle brackets: an address
    (C{"a@example.com"}) or every address of a domain (C{"@example.com"}).

    @return: the pattern in canonical form (the address's, L{parseReversePath}; the domain's,
        L{normaliseDomain}), or C{None} for C{""} (the null sender).
    @raise AddressError: neither (L{domainProblem} says why).
    """
    if text.startswith("@"):
        return "@" + normaliseDomain(text[1:])
    mailbox = parseReversePath(f"<{text}>", utf8=True)
    return None if mailbox is None else str(mailbox)


def parseForwardPath(path: str, *, utf8: bool = False, postmasterDomain: str) -> Mailbox:
    """Parse the forward-path of RCPT TO, angle brackets included.

    C{<Postmaster>} (any case, no domain; RFC 5321 section 4.5.1) becomes
    C{postmaster@postmasterDomain}.  A source route is accepted and stripped.

    @param utf8: whether the client declared SMTPUTF8.
    @param postmasterDomain: the domain for a bare C{<Postmaster>}; it is normalised.
    @return: the canonical L{Mailbox}.
    @raise AddressError: 501 5.1.3 for bad syntax (including C{<>}) or a length limit
        exceeded, 553 5.6.7 for a non-ASCII address without C{utf8}.
    """
    mailbox = _parsePath(
        path, utf8=utf8, who="recipient", status="5.1.3", postmasterDomain=postmasterDomain
    )
    assert mailbox is not None
    return mailbox


# ---------------------------------------------------------------------------------------------
# Command arguments


def _paramError(detail: str) -> AddressError:
    """An L{AddressError} for bad MAIL/RCPT argument syntax."""
    return AddressError(Reply(501, "5.5.4", f"Error: bad parameter syntax: {detail}"))


def _isValueChar(char: str) -> bool:
    """Whether C{char} may appear in an esmtp-value (non-ASCII allowed; the caller decides)."""
    code = ord(char)
    return (33 <= code <= 126 and code != 61) or code >= 128


#: The reply to a path whose angle bracket is never closed (L{splitArgument}).
_NO_CLOSING_BRACKET = Reply(501, "5.5.4", "Error: missing closing '>' in address")


def _pathEnd(text: str) -> int:
    """The index of the C{>} that ends the path C{text} starts (with C{<}), outside any
    quoted-string (where a backslash quotes the next character); -1 when there is none."""
    quoted = False
    i = 1
    while i < len(text):
        char = text[i]
        if quoted:
            if char == "\\":
                i += 1
            elif char == '"':
                quoted = False
        elif char == '"':
            quoted = True
        elif char == ">":
            return i
        i += 1
    return -1


def splitArgument(arg: str) -> tuple[str, list[tuple[str, str | None]]]:
    """Split the argument of MAIL FROM: or RCPT TO: into the path and ESMTP parameters.

    Leading spaces are skipped.  The path ends at the first C{>} outside a quoted-string; an
    argument not starting with C{<} is taken as a bare address up to the first space and
    returned wrapped in angle brackets.  Parameters follow after one or more spaces; trailing
    spaces are ignored.

    @return: C{(path, params)}: the path text with its angle brackets (not checked further),
        and a list of C{(KEYWORD, value)} in order, the keyword upper-cased, the value
        unchanged or C{None} when there is no C{=}.
    @raise AddressError: 501 5.5.4 for a missing address, an unterminated path or bad
        parameter syntax.
    """
    text = arg.lstrip(" ")
    if not text:
        raise AddressError(Reply(501, "5.5.4", "Error: missing address"))
    if text.startswith("<"):
        # (Without a quoted-string the path ends at the first ">": found without a loop.)
        i = text.find(">") if '"' not in text else _pathEnd(text)
        if i < 0:
            raise AddressError(_NO_CLOSING_BRACKET)
        path, rest = text[: i + 1], text[i + 1 :]
    else:
        bare, space, rest = text.partition(" ")
        path, rest = f"<{bare}>", space + rest
    if rest and not rest.startswith(" "):
        raise _paramError(f"invalid character {_show(rest[0])} after address")
    params: list[tuple[str, str | None]] = []
    for param in rest.split(" "):
        if not param:
            continue
        keyword, equals, value = param.partition("=")
        if not _KEYWORD.fullmatch(keyword):
            raise _paramError("bad keyword")
        if equals:
            if not value:
                raise _paramError(f"empty value for {keyword.upper()}")
            bad = next((c for c in value if not _isValueChar(c)), None)
            if bad is not None:
                raise _paramError(f"invalid character {_show(bad)} in {keyword.upper()} value")
            params.append((keyword.upper(), value))
        else:
            params.append((keyword.upper(), None))
    return path, params


# ---------------------------------------------------------------------------------------------
# xtext (RFC 3461 section 4)


def xtextDecode(s: str) -> str:
    """Decode RFC 3461 xtext: C{+HH} escapes (hex in any case) of UTF-8 octets.

    @raise AddressError: (501 5.5.4) for a character outside C{"!"}..C{"~"}, an unescaped
        C{=}, a bad escape, or escapes that do not decode as UTF-8.
    """
    out = bytearray()
    i = 0
    while i < len(s):
        char = s[i]
        if char == "+":
            hexDigits = s[i + 1 : i + 3]
            if len(hexDigits) != 2 or not _HEX.issuperset(hexDigits):
                raise AddressError(Reply(501, "5.5.4", "Error: bad xtext: invalid '+' escape"))
            out.append(int(hexDigits, 16))
            i += 3
            continue
        if not 33 <= ord(char) <= 126 or char == "=":
            raise AddressError(
                Reply(501, "5.5.4", f"Error: bad xtext: invalid character {_show(char)}")
            )
        out.append(ord(char))
        i += 1
    try:
        return out.decode("utf-8")
    except UnicodeDecodeError:
        raise AddressError(Reply(501, "5.5.4", "Error: bad xtext: not UTF-8")) from None


def xtextEncode(s: str) -> str:
    """Encode C{s} as RFC 3461 xtext.

    Characters outside C{"!"}..C{"~"}, C{+} and C{=} become C{+HH} (upper-case hex) for each
    octet of their UTF-8 encoding.
    """
    out = []
    for char in s:
        if 33 <= ord(char) <= 126 and char not in "+=":
            out.append(char)
        else:
            out.extend(f"+{octet:02X}" for octet in char.encode("utf-8"))
    return "".join(out)


def utf8AddrXtext(address: str) -> str:
    """Encode C{address} in RFC 6533's C{utf-8-addr-xtext} form (section 3): ASCII only,
    each non-ASCII character (and C{+}, C{=}, C{\\}, controls, space) as C{\\x{HEX}} of its
    code point, at least two hex digits (C{\\x{2B}}, C{\\x{E9}}, C{\\x{65E5}}).

    For an address of type C{utf-8} where only ASCII may go: an ORCPT parameter relayed
    without SMTPUTF8, a C{message/delivery-status} field.
    """
    out = []
    for char in address:
        code = ord(char)
        if 0x21 <= code <= 0x7E and char not in "+=\\":
            out.append(char)
        else:
            out.append(f"\\x{{{code:02X}}}")
    return "".join(out)


_UTF8_ADDR_ESCAPE = re.compile(r"\\x\{([0-9A-Fa-f]{1,6})\}")


def utf8AddrDecode(text: str) -> str:
    """The address in C{text}, RFC 6533's C{utf-8-addr-xtext} or C{utf-8-addr-unitext} form
    (an ORCPT of type C{utf-8} as a client sent it): each C{\\x{HEX}} becomes its code point;
    anything else (raw UTF-8, a backslash that starts no escape) stays as it is."""

    def character(match: re.Match[str]) -> str:
        code = int(match.group(1), 16)
        return chr(code) if code <= 0x10FFFF else match.group(0)

    return _UTF8_ADDR_ESCAPE.sub(character, text)


# -- host names (HELO, the relay's own name, certificates, reverse DNS)


def hostnameProblem(text: str, underscore: bool = False) -> str | None:
    """Why C{text} is not a syntactically valid host name, or C{None} when it is.

    A host name is dot-separated labels of ASCII letters, digits and hyphens, each 1 to 63
    characters long, not starting or ending with a hyphen; one trailing dot is allowed; the whole
    is at most 253 characters.  An IP address is not a host name.  With C{underscore}, labels
    may hold underscores too (as Postfix's C{valid_hostname} takes the names it finds in the
    DNS).
    """
    pattern = _HOST_LABEL_UNDERSCORE if underscore else _HOST_LABEL
    allowed = "letters, digits, underscores and hyphens" if underscore else (
        "letters, digits and hyphens"
    )
    if not text:
        return "a host name cannot be empty"
    name = text[:-1] if text.endswith(".") else text
    if len(name) > 253:
        return "a host name is at most 253 characters long"
    for part in name.split("."):
        if not part:
            return "a host name cannot have an empty label (two dots in a row, or a leading dot)"
        if len(part) > 63:
            return f"label {describeValue(part, 30)} is longer than 63 characters"
        if not pattern.match(part):
            return (
                f"label {describeValue(part)} may hold only {allowed}, "
                "and cannot start or end with a hyphen"
            )
    try:
        ipaddress.ip_address(name)
    except ValueError:
        pass
    else:
        return "an IP address is not a host name"
    if name.rsplit(".", 1)[-1].isdigit():
        return "the last label cannot be all digits (as in an IP address)"
    return None


IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address


def clientIP(address: str) -> IPAddress | None:
    """The client's address C{address} (text) as an IP address, an IPv4-mapped IPv6
    address (C{::ffff:192.0.2.7}) as the IPv4 one; C{None} when it is no IP address."""
    try:
        ip = ipaddress.ip_address(address.split("%", 1)[0])
    except ValueError:
        return None
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        return ip.ipv4_mapped
    return ip


def unmappedAddress(host: str) -> str:
    """A client's address C{host} as the relay knows it: an IPv4-mapped IPv6 address (an
    IPv4 client of a listener on C{[::]}, C{::ffff:192.0.2.7}) as its IPv4 address
    (C{192.0.2.7}), as Postfix's C{sane_sockaddr_to_hostaddr} converts it; anything else as
    it is."""
    ip = clientIP(host)
    # (Only an IPv4-mapped address written as IPv6 comes back as IPv4.)
    return str(ip) if ip is not None and ip.version == 4 and ":" in host else host


def hostPort(host: str, port: int | str) -> str:
    """C{host} and C{port} as logs and status show them: C{host:port}, an IPv6 address in
    brackets (C{[2001:db8::7]:1234}) so that its colons are not taken for the port's."""
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def serverName(remoteMTA: str | None, address: str | None = None) -> str | None:
    """The server that gave a status, as texts name it: the name of its RFC 3464
    Remote-MTA (C{"dns; mx.example.org"}), with the C{address} the status came from as
    Postfix's texts give it, C{"mx.example.org[192.0.2.1]"} (its C{namaddr}: C{"host %s
    said: ..."}, smtp_proto.c); a literal next hop's name (C{"[192.0.2.1]"}) is its
    address, C{"192.0.2.1[192.0.2.1]"}.  The name alone without C{address} (not known, or
    recorded by an older relay); C{None} without C{remoteMTA}."""
    if not remoteMTA:
        return None
    kind, sep, name = remoteMTA.partition(";")
    name = name.strip() if sep else remoteMTA.strip()
    if not address:
        return name
    if name.startswith("[") and name.endswith("]"):
        name = name[1:-1]
    return f"{name}[{address}]"


def normaliseHostname(text: str) -> str:
    """Check a host name (see L{hostnameProblem}) and return it lower-cased, without a
    trailing dot.

    @raise ValueError: not a valid host name; the message names the value.
    """
    if not isinstance(text, str):
        raise ValueError(f"must be a host name (a string), not {describeValue(text)}")
    problem = hostnameProblem(text)
    if problem:
        raise ValueError(f"{describeValue(text)} is not a valid host name: {problem}")
    return text.rstrip(".").lower() if text.endswith(".") else text.lower()


#: The characters a recipient delimiter may be (Postfix's usual ones).
DELIMITER_CHARACTERS = "+-_=#~&%!$"

#: Local parts never split at a delimiter (Postfix's split_addr).
_UNSPLIT = ("postmaster", "mailer-daemon")


def userParts(local: str, delimiters: str) -> list[str]:
    """The local parts the user of C{local} is looked for under, in order, as Postfix's
    C{recipient_delimiter} and table search order: C{local} itself, then without its
    address extension -- up to the first of C{delimiters} that is not its first character
    (C{["bob+lists", "bob"]} with C{"+"}).  Never split, as Postfix's C{split_addr}:
    C{postmaster}, C{MAILER-DAEMON}, and with C{"-"} among the delimiters C{owner-*} and
    C{*-request}."""
    lowered = local.lower()
    if not delimiters or lowered in _UNSPLIT:
        return [local]
    if "-" in delimiters and (lowered.startswith("owner-") or lowered.endswith("-request")):
        return [local]
    for index, c in enumerate(local):
        if index and c in delimiters:
            return [local, local[:index]]
    return [local]


def splitExtension(localPart: str, delimiters: str) -> tuple[str, str]:
    """A canonical local part (L{Mailbox.localPart}) without its address extension, and the
    extension with its delimiter, split as L{userParts} splits (on the content of a
    quoted-string, as Postfix splits the unquoted form): C{("bob", "+lists")} for
    C{"bob+lists"} with C{"+"}; C{(localPart, "")} when it has none."""
    content = _unquote(localPart)
    parts = userParts(content, delimiters)
    if len(parts) == 1:
        return localPart, ""
    return _quote(parts[1]), content[len(parts[1]):]


def extendedLocalPart(localPart: str, extension: str) -> str:
    """The canonical local part C{localPart} with C{extension} (as L{splitExtension} gives
    it) appended, quoted as it then must be (Postfix's propagate_unmatched_extensions)."""
    if not extension:
        return localPart
    return _quote(_unquote(localPart) + extension)
