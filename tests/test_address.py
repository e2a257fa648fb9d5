"""Tests for L{mailrelay.address}: RFC 5321 paths, ESMTP parameters and xtext."""

from __future__ import annotations

import ipaddress

import pytest
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from mailrelay.address import (
    AddressError,
    Mailbox,
    normaliseDomain,
    parseForwardPath,
    parseReversePath,
    splitArgument,
    utf8AddrDecode,
    utf8AddrXtext,
    xtextDecode,
    xtextEncode,
)
from mailrelay.smtp.replies import Reply

PM = "example.org"

ATEXT = "abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789!#$%&'*+-/=?^_`{|}~"

fast = settings(
    max_examples=150,
    deadline=None,
    database=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much],
)


def forward(path: str, utf8: bool = False) -> Mailbox:
    """Parse C{path} as a forward-path with the test postmaster domain."""
    return parseForwardPath(path, utf8=utf8, postmasterDomain=PM)


def forwardError(path: str, utf8: bool = False) -> Reply:
    """The reply of the L{AddressError} raised parsing C{path} as a forward-path."""
    with pytest.raises(AddressError) as info:
        forward(path, utf8=utf8)
    return info.value.reply


def reverseError(path: str, utf8: bool = False) -> Reply:
    """The reply of the L{AddressError} raised parsing C{path} as a reverse-path."""
    with pytest.raises(AddressError) as info:
        parseReversePath(path, utf8=utf8)
    return info.value.reply


def domainOfLength(n: int) -> str:
    """A valid domain exactly C{n} octets long, in labels of at most 63 octets."""
    labels = []
    remaining = n
    while remaining > 63:
        labels.append("a" * 62)  # plus the dot: 63
        remaining -= 63
    labels.append("b" * remaining)
    result = ".".join(labels)
    assert len(result) == n and all(0 < len(label) <= 63 for label in labels)
    return result


# ---------------------------------------------------------------------------------------------
# Valid paths

VALID = [
    # (path, localPart, domain)
    ("<joe@example.com>", "joe", "example.com"),
    ("<Joe.Bloggs@Example.COM>", "Joe.Bloggs", "example.com"),
    ("<joe@example.com.>", "joe", "example.com"),
    ("<joe@EXAMPLE.com.>", "joe", "example.com"),
    ("<joe@localhost>", "joe", "localhost"),
    ("<a-b@x-y.example>", "a-b", "x-y.example"),
    ("<joe@123.example>", "joe", "123.example"),
    (f"<{ATEXT[:40]}@x.example>", ATEXT[:40], "x.example"),
    (f"<{ATEXT[40:]}@x.example>", ATEXT[40:], "x.example"),
    ("<a.b.c@x>", "a.b.c", "x"),
    # source routes are stripped
    ("<@a.example,@b.example:joe@c.example>", "joe", "c.example"),
    ("<@a.example:joe@c.example>", "joe", "c.example"),
    ("<@A.Example.:joe@c.example>", "joe", "c.example"),
    # quoted local parts
    ('<"joe"@x.example>', "joe", "x.example"),
    ('<"j\\o\\e"@x.example>', "joe", "x.example"),
    ('<"joe.bloggs"@x.example>', "joe.bloggs", "x.example"),
    ('<"j oe"@x.example>', '"j oe"', "x.example"),
    ('<"j\\ oe"@x.example>', '"j oe"', "x.example"),
    ('<"a\\"b"@x.example>', '"a\\"b"', "x.example"),
    ('<"a\\\\b"@x.example>', '"a\\\\b"', "x.example"),
    ('<".joe"@x.example>', '".joe"', "x.example"),
    ('<"a..b"@x.example>', '"a..b"', "x.example"),
    ('<""@x.example>', '""', "x.example"),
    ('<"a@b"@x.example>', '"a@b"', "x.example"),
    ('<"a>b"@x.example>', '"a>b"', "x.example"),
    ('<"(comment)"@x.example>', '"(comment)"', "x.example"),
    ('<"Joe"@x.example>', "Joe", "x.example"),
    # address literals
    ("<joe@[192.0.2.1]>", "joe", "[192.0.2.1]"),
    ("<joe@[001.002.003.004]>", "joe", "[1.2.3.4]"),
    ("<joe@[0.0.0.0]>", "joe", "[0.0.0.0]"),
    ("<joe@[255.255.255.255]>", "joe", "[255.255.255.255]"),
    ("<joe@[IPv6:2001:DB8:0:0:0:0:0:1]>", "joe", "[IPv6:2001:db8::1]"),
    ("<joe@[ipv6:2001:db8::1]>", "joe", "[IPv6:2001:db8::1]"),
    ("<joe@[IPV6:::1]>", "joe", "[IPv6:::1]"),
    ("<joe@[IPv6:0:0:0:0:0:0:0:0]>", "joe", "[IPv6:::]"),
    (
        "<joe@[IPv6:::ffff:192.0.2.1]>",
        "joe",
        f"[IPv6:{ipaddress.IPv6Address('::ffff:192.0.2.1').compressed}]",
    ),
]


@pytest.mark.parametrize("path,localPart,domain", VALID)
def test_validForward(path: str, localPart: str, domain: str) -> None:
    """Valid forward-paths parse to their canonical L{Mailbox}."""
    assert forward(path) == Mailbox(localPart, domain)


@pytest.mark.parametrize("path,localPart,domain", VALID)
def test_validReverse(path: str, localPart: str, domain: str) -> None:
    """Valid reverse-paths parse to their canonical L{Mailbox}."""
    assert parseReversePath(path) == Mailbox(localPart, domain)


@pytest.mark.parametrize("path,localPart,domain", VALID)
def test_validCanonicalIsFixedPoint(path: str, localPart: str, domain: str) -> None:
    """Parsing the canonical form again gives the same mailbox."""
    mailbox = forward(path)
    assert forward(f"<{mailbox}>") == mailbox
    assert normaliseDomain(mailbox.domain) == mailbox.domain


def test_mailboxStr() -> None:
    """C{str(Mailbox)} is local part, C{@}, domain."""
    assert str(Mailbox("joe", "example.com")) == "joe@example.com"
    assert str(forward('<"j oe"@X.example>')) == '"j oe"@x.example'
    assert str(forward("<joe@[IPv6:2001:db8:0::1]>")) == "joe@[IPv6:2001:db8::1]"


def test_mailboxIsFrozen() -> None:
    """L{Mailbox} is immutable and hashable."""
    mailbox = Mailbox("joe", "example.com")
    with pytest.raises(AttributeError):
        mailbox.localPart = "x"  # type: ignore[misc]
    assert {mailbox, Mailbox("joe", "example.com")} == {mailbox}


@pytest.mark.parametrize(
    "path,literal",
    [
        ("<joe@[192.0.2.1]>", True),
        ("<joe@[IPv6:::1]>", True),
        ("<joe@example.com>", False),
    ],
)
def test_isLiteral(path: str, literal: bool) -> None:
    """C{isLiteral} tells address literals from domains."""
    assert forward(path).isLiteral is literal


@pytest.mark.parametrize(
    "path,routing",
    [
        ("<user%host@relay.example>", True),
        ("<host!user@relay.example>", True),
        ('<"user@host"@relay.example>', True),
        ('<"user%host"@relay.example>', True),
        ('<"us er!host"@relay.example>', True),
        ("<@a.example:user@relay.example>", False),
        ("<user@relay.example>", False),
        ('<"us er"@relay.example>', False),
    ],
)
def test_hasRouting(path: str, routing: bool) -> None:
    """C{hasRouting} spots %, ! and @ in the unquoted local part."""
    assert forward(path).hasRouting is routing


def test_isASCII() -> None:
    """C{isASCII} is false for a Unicode local part; domains are always A-labels."""
    assert forward("<joe@example.com>").isASCII
    assert not forward("<jöe@example.com>", utf8=True).isASCII
    assert forward("<joe@bücher.example>", utf8=True).isASCII


# ---------------------------------------------------------------------------------------------
# Invalid paths

INVALID = [
    "",
    "joe@example.com",
    "<joe@example.com",
    "joe@example.com>",
    "<",
    ">",
    "<<joe@example.com>>",
    "< joe@example.com>",
    "<joe@example.com >",
    "<joe>",
    "<joe@>",
    "<@example.com>",
    "<joe@@example.com>",
    "<joe@a@example.com>",
    "<jo e@example.com>",
    "<.joe@example.com>",
    "<joe.@example.com>",
    "<jo..e@example.com>",
    "<.@example.com>",
    "<jo(e@example.com>",
    "<jo,e@example.com>",
    "<jo\"e@example.com>",
    "<jo\\e@example.com>",
    "<jo\x00e@example.com>",
    "<jo\te@example.com>",
    "<jo\re@example.com>",
    "<jo\ne@example.com>",
    "<jo\x7fe@example.com>",
    # quoted strings
    '<"joe@example.com>',
    '<"joe"x@example.com>',
    '<"joe".x@example.com>',
    '<x."joe"@example.com>',
    '<"jo\te"@example.com>',
    '<"jo\\\te"@example.com>',
    '<"jo\x7fe"@example.com>',
    '<"jo\\\x7fe"@example.com>',
    '<"joe\\"@example.com>',
    '<"joe">',
    # domains
    "<joe@.example.com>",
    "<joe@example..com>",
    "<joe@example.com..>",
    "<joe@.>",
    "<joe@-example.com>",
    "<joe@example-.com>",
    "<joe@exa_mple.com>",
    "<joe@exa mple.com>",
    "<joe@example.com\r>",
    "<joe@example.com:25>",
    f"<joe@{'a' * 64}.example>",
    # source routes
    "<@a.example joe@c.example>",
    "<@a.example,joe@c.example>",
    "<@a.example;@b.example:joe@c.example>",
    "<@a..example:joe@c.example>",
    "<@:joe@c.example>",
    "<@a.example,:joe@c.example>",
    "<@[192.0.2.1]:joe@c.example>",
    "<@a.example:>",
    "<@a.example:Postmaster>",
    # address literals
    "<joe@[300.1.1.1]>",
    "<joe@[1.2.3.256]>",
    "<joe@[1.2.3]>",
    "<joe@[1.2.3.4.5]>",
    "<joe@[1.2.3.4>",
    "<joe@[1.2.3.4]x>",
    "<joe@[1234.1.1.1]>",
    "<joe@[]>",
    "<joe@[a]>",
    "<joe@[IPv6:zz]>",
    "<joe@[IPv6:]>",
    "<joe@[IPv6:1::2::3]>",
    "<joe@[IPv6:1:2:3:4:5:6:7:8:9]>",
    "<joe@[IPv6:fe80::1%eth0]>",
    "<joe@[IPv6:192.0.2.1]>",
    "<joe@[IPv6 ::1]>",
    "<joe@[tag:xyz]>",
    "<joe@[x-tag:any.thing]>",
]


@pytest.mark.parametrize("path", INVALID)
def test_invalidForward(path: str) -> None:
    """Invalid forward-paths are refused with 501 5.1.3 and a specific message."""
    reply = forwardError(path)
    assert (reply.code, reply.enhanced) == (501, "5.1.3")
    assert reply.text.startswith("Error: ")
    assert "\r" not in reply.text and "\n" not in reply.text


@pytest.mark.parametrize("path", INVALID)
def test_invalidReverse(path: str) -> None:
    """Invalid reverse-paths are refused with 501 5.1.7."""
    reply = reverseError(path)
    assert (reply.code, reply.enhanced) == (501, "5.1.7")
    assert reply.text.startswith("Error: ")
    assert "sender" in reply.text or "octets" in reply.text or "literal" in reply.text


@pytest.mark.parametrize("path", INVALID)
def test_invalidEvenWithUTF8(path: str) -> None:
    """SMTPUTF8 does not make bad syntax acceptable."""
    assert forwardError(path, utf8=True).code == 501


@pytest.mark.parametrize(
    "path,fragment",
    [
        ("joe@example.com", "missing '<'"),
        ("<joe@example.com", "missing closing '>'"),
        ("<joe>", "missing '@'"),
        ("<joe@>", "missing domain"),
        ("<jo e@example.com>", "invalid character ' ' in local part"),
        ("<jo\re@example.com>", "invalid character U+000D in local part"),
        ("<jo..e@example.com>", "misplaced '.'"),
        ('<"joe@example.com>', "unterminated quoted string"),
        ("<joe@example..com>", "empty label"),
        ("<joe@-example.com>", "'-'"),
        ("<joe@[300.1.1.1]>", "invalid IPv4 address literal"),
        ("<joe@[IPv6:zz]>", "invalid IPv6 address literal"),
        ("<joe@[tag:xyz]>", "cannot deliver"),
        ("<@a.example joe@c.example>", "source route"),
    ],
)
def test_errorMessages(path: str, fragment: str) -> None:
    """Error replies say what is wrong."""
    reply = forwardError(path)
    assert fragment in reply.text
    assert reply.text.startswith("Error: ")


def test_syntaxMessageNamesRole() -> None:
    """Syntax errors name the sender or the recipient."""
    assert forwardError("<joe>").text == "Error: bad recipient address syntax: missing '@'"
    assert reverseError("<joe>").text == "Error: bad sender address syntax: missing '@'"


def test_generalLiteralRefused() -> None:
    """General address literals are well-formed but refused: we cannot deliver to them."""
    reply = forwardError("<joe@[tag:xyz]>")
    assert reply == Reply(
        501, "5.1.3", "Error: general address literals are not supported (cannot deliver to them)"
    )
    assert reverseError("<joe@[tag:xyz]>").enhanced == "5.1.7"


@pytest.mark.parametrize("path", ["<-oi@example.org>", '<"-x"@example.org>',
                                  "<@relay.example:-r@example.org>"])
def test_localPartStartingWithADashRefused(path: str) -> None:
    """An address whose local part starts with '-' is refused, as Postfix does by default
    (allow_min_user = no): a command it reaches (a pipe backend, a site's script, sendmail
    given a misplaced option as a recipient) could take it for an option."""
    text = "Error: bad {} address syntax: local part starts with '-'"
    assert forwardError(path) == Reply(501, "5.1.3", text.format("recipient"))
    assert reverseError(path) == Reply(501, "5.1.7", text.format("sender"))
    assert str(forward("<a-b@example.org>")) == "a-b@example.org"


# ---------------------------------------------------------------------------------------------
# Null path and Postmaster


def test_nullReversePath() -> None:
    """C{<>} is the null reverse-path."""
    assert parseReversePath("<>") is None
    assert parseReversePath("<>", utf8=True) is None


def test_nullForwardPath() -> None:
    """C{<>} is not a valid forward-path."""
    reply = forwardError("<>")
    assert (reply.code, reply.enhanced) == (501, "5.1.3")


@pytest.mark.parametrize("path", ["<Postmaster>", "<postmaster>", "<POSTMASTER>", "<PostMaster>"])
def test_postmaster(path: str) -> None:
    """C{<Postmaster>} without domain is postmaster at the given domain (RFC 5321 4.5.1)."""
    assert forward(path) == Mailbox("postmaster", PM)


def test_postmasterDomainNormalised() -> None:
    """The postmaster domain is normalised."""
    mailbox = parseForwardPath("<Postmaster>", postmasterDomain="Mail.Example.ORG.")
    assert mailbox == Mailbox("postmaster", "mail.example.org")


def test_postmasterWithDomain() -> None:
    """C{<Postmaster@domain>} is an ordinary address (case of the local part kept)."""
    assert forward("<Postmaster@Other.Example>") == Mailbox("Postmaster", "other.example")


def test_postmasterNotSender() -> None:
    """A bare C{<Postmaster>} is not a valid reverse-path."""
    assert reverseError("<Postmaster>").enhanced == "5.1.7"


@pytest.mark.parametrize("path", ['<"Postmaster">', "<Postmaster.>", "< Postmaster>"])
def test_postmasterLookalikes(path: str) -> None:
    """Only the exact word, unquoted, is special."""
    assert forwardError(path).code == 501


# ---------------------------------------------------------------------------------------------
# Length limits


def test_localPartLimit() -> None:
    """The local part may be 64 octets, not 65."""
    assert forward(f"<{'a' * 64}@x.example>").localPart == "a" * 64
    reply = forwardError(f"<{'a' * 65}@x.example>")
    assert reply == Reply(501, "5.1.3", "Error: local part longer than 64 octets")
    reply = reverseError(f"<{'a' * 65}@x.example>")
    assert reply == Reply(501, "5.1.7", "Error: local part longer than 64 octets")


def test_localPartLimitCountsOctets() -> None:
    """The local part limit is in UTF-8 octets."""
    assert forward(f"<{'é' * 32}@x.example>", utf8=True).localPart == "é" * 32
    reply = forwardError(f"<{'é' * 32}a@x.example>", utf8=True)
    assert reply.text == "Error: local part longer than 64 octets"


def test_localPartLimitQuoted() -> None:
    """A quoted local part counts its quotes, as received."""
    assert forward(f'<"{"a" * 62}"@x.example>').localPart == "a" * 62
    assert forwardError(f'<"{"a" * 63}"@x.example>').text == (
        "Error: local part longer than 64 octets"
    )


def test_labelLimit() -> None:
    """A domain label may be 63 octets, not 64."""
    assert forward(f"<a@{'b' * 63}.example>").domain == "b" * 63 + ".example"
    assert normaliseDomain("b" * 63) == "b" * 63
    reply = forwardError(f"<a@{'b' * 64}.example>")
    assert reply == Reply(501, "5.1.3", "Error: domain label longer than 63 octets")
    with pytest.raises(AddressError):
        normaliseDomain("b" * 64)


def test_domainLimit() -> None:
    """A domain may be 255 octets, not 256."""
    assert normaliseDomain(domainOfLength(255)) == domainOfLength(255)
    assert normaliseDomain(domainOfLength(255) + ".") == domainOfLength(255)
    with pytest.raises(AddressError) as info:
        normaliseDomain(domainOfLength(256))
    assert info.value.reply == Reply(501, "5.1.3", "Error: domain longer than 255 octets")
    # In a path, a 256-octet domain is reported as such, before the path limit.
    reply = forwardError(f"<a@{domainOfLength(256)}>")
    assert reply.text == "Error: domain longer than 255 octets"
    assert reverseError(f"<a@{domainOfLength(256)}>").enhanced == "5.1.7"


def test_pathLimit() -> None:
    """A path may be 256 octets including the brackets, not 257."""
    path = f"<{'a' * 64}@{domainOfLength(189)}>"
    assert len(path) == 256
    assert str(forward(path)) == path[1:-1]
    path = f"<{'a' * 64}@{domainOfLength(190)}>"
    assert len(path) == 257
    assert forwardError(path) == Reply(501, "5.1.3", "Error: path longer than 256 octets")
    assert reverseError(path) == Reply(501, "5.1.7", "Error: path longer than 256 octets")


def test_pathLimitCountsOctets() -> None:
    """The path limit is in UTF-8 octets."""
    path = f"<{'é' * 32}@{domainOfLength(189)}>"
    assert len(path.encode("utf-8")) == 256
    forward(path, utf8=True)
    path = f"<{'é' * 32}@{domainOfLength(190)}>"
    assert forwardError(path, utf8=True).text == "Error: path longer than 256 octets"


def test_pathLimitSourceRoute() -> None:
    """The path limit applies to the path as received, source route included."""
    route = "@" + domainOfLength(200) + ":"
    assert forwardError(f"<{route}joe@{domainOfLength(60)}>").text == (
        "Error: path longer than 256 octets"
    )


def test_pathLimitCanonical() -> None:
    """A path is refused when its canonical (A-label) form exceeds 256 octets."""
    label = "ñçøåæœ"  # 12 octets as UTF-8, 16 as an A-label
    domain = ".".join([label] * 8) + "." + domainOfLength(85)
    path = f"<{'a' * 64}@{domain}>"
    assert len(path.encode("utf-8")) == 256
    mailbox = Mailbox("a" * 64, normaliseDomain(domain))
    assert len(str(mailbox)) + 2 > 256
    assert forwardError(path, utf8=True).text == "Error: path longer than 256 octets"


# ---------------------------------------------------------------------------------------------
# SMTPUTF8


@pytest.mark.parametrize(
    "path,mailbox",
    [
        ("<jöe@example.com>", Mailbox("jöe", "example.com")),
        ("<Jöe@example.com>", Mailbox("Jöe", "example.com")),
        ("<用户@例子.测试>", Mailbox("用户", "xn--fsqu00a.xn--0zwm56d")),
        ("<joe@Bücher.Example>", Mailbox("joe", "xn--bcher-kva.example")),
        ("<joe@faß.de>", Mailbox("joe", "xn--fa-hia.de")),
        ('<"jöe"@example.com>', Mailbox("jöe", "example.com")),
        ('<"j öe"@example.com>', Mailbox('"j öe"', "example.com")),
        ("<@bücher.example:joe@example.com>", Mailbox("joe", "example.com")),
        ("<joe@bücher。example>", Mailbox("joe", "xn--bcher-kva.example")),
    ],
)
def test_utf8(path: str, mailbox: Mailbox) -> None:
    """With SMTPUTF8, non-ASCII local parts and U-label domains are accepted."""
    assert forward(path, utf8=True) == mailbox
    assert parseReversePath(path, utf8=True) == mailbox
    assert forward(f"<{mailbox}>", utf8=True) == mailbox


@pytest.mark.parametrize(
    "path",
    [
        "<jöe@example.com>",
        "<joe@bücher.example>",
        '<"jöe"@example.com>',
        "<@bücher.example:joe@example.com>",
    ],
)
def test_utf8Required(path: str) -> None:
    """Without SMTPUTF8, non-ASCII addresses are refused with 553 5.6.7."""
    reply = forwardError(path)
    assert (reply.code, reply.enhanced) == (553, "5.6.7")
    assert reply.text == "Error: non-ASCII recipient address requires SMTPUTF8"
    reply = reverseError(path)
    assert (reply.code, reply.enhanced) == (553, "5.6.7")
    assert reply.text == "Error: non-ASCII sender address requires SMTPUTF8"


@pytest.mark.parametrize(
    "path",
    [
        "<jö e@example.com>",
        "<jo\x85e@example.com>",
        "<jo\ud800e@example.com>",
        '<"jo\x9fe"@example.com>',
        '<"jo\\öe"@example.com>',
        "<joe@exa\u200dmple.example>",
        "<joe@\u0301abc.example>",
        "<joe@bü_cher.example>",
    ],
)
def test_utf8Invalid(path: str) -> None:
    """Bad non-ASCII syntax is refused with 501, with or without SMTPUTF8."""
    for utf8 in (True, False):
        reply = forwardError(path, utf8=utf8)
        assert (reply.code, reply.enhanced) == (501, "5.1.3")
        reply.toBytes()


# ---------------------------------------------------------------------------------------------
# normaliseDomain


@pytest.mark.parametrize(
    "domain,expected",
    [
        ("example.com", "example.com"),
        ("Example.COM", "example.com"),
        ("Example.COM.", "example.com"),
        ("localhost", "localhost"),
        ("Bücher.Example", "xn--bcher-kva.example"),
        ("xn--bcher-kva.example", "xn--bcher-kva.example"),
        ("XN--BCHER-KVA.example", "xn--bcher-kva.example"),
        ("faß.de", "xn--fa-hia.de"),
        ("ＥＸＡＭＰＬＥ.com", "example.com"),
        ("[192.0.2.1]", "[192.0.2.1]"),
        ("[IPv6:2001:DB8::1]", "[IPv6:2001:db8::1]"),
    ],
)
def test_normaliseDomain(domain: str, expected: str) -> None:
    """C{normaliseDomain} canonicalises and is idempotent."""
    assert normaliseDomain(domain) == expected
    assert normaliseDomain(expected) == expected


@pytest.mark.parametrize(
    "domain",
    [
        "",
        ".",
        "example.com..",
        ".example.com",
        "a..b",
        "-a.example",
        "a-.example",
        "a_b.example",
        "a b.example",
        "a@b.example",
        "[300.1.1.1]",
        "[tag:xyz]",
        "exa\u200dmple.com",
        "a\x00.example",
    ],
)
def test_normaliseDomainInvalid(domain: str) -> None:
    """C{normaliseDomain} refuses bad domains with 501 5.1.3."""
    with pytest.raises(AddressError) as info:
        normaliseDomain(domain)
    assert (info.value.reply.code, info.value.reply.enhanced) == (501, "5.1.3")
    assert info.value.reply.text.startswith("Error: ")


@pytest.mark.parametrize("domain", ["192.0.2.1", "192.0.2.1.", "mail.example.123", "1"])
def test_a_domain_whose_last_label_is_all_digits_is_refused(domain: str) -> None:
    """A domain whose top label is all digits is no domain (RFC 1123 section 2.1, RFC 3696
    section 2): an IP address written without brackets.  C{joe@192.0.2.1} was taken, and
    its mail sent to 192.0.2.1 with no DNS lookup, as if it were C{joe@[192.0.2.1]};
    Postfix refuses it (resolve_numeric_domain = no, its default: "Bad recipient address
    syntax")."""
    text = ("Error: bad {} address syntax: the last label of a domain cannot be all digits "
            "(an IP address is written in brackets: [192.0.2.1])")
    assert forwardError(f"<joe@{domain}>") == Reply(501, "5.1.3", text.format("recipient"))
    assert reverseError(f"<joe@{domain}>") == Reply(501, "5.1.7", text.format("sender"))
    assert forward("<joe@192.0.2.1.example>").domain == "192.0.2.1.example"
    assert forward("<joe@[192.0.2.1]>").domain == "[192.0.2.1]"


def test_addressErrorIsValueError() -> None:
    """L{AddressError} is a C{ValueError} carrying its reply."""
    error = AddressError(Reply(501, "5.1.3", "Error: x"))
    assert isinstance(error, ValueError)
    assert error.reply == Reply(501, "5.1.3", "Error: x")


# ---------------------------------------------------------------------------------------------
# splitArgument


@pytest.mark.parametrize(
    "arg,path,params",
    [
        ("<joe@example.com>", "<joe@example.com>", []),
        (" <joe@example.com>", "<joe@example.com>", []),
        ("   <joe@example.com>", "<joe@example.com>", []),
        ("<joe@example.com>   ", "<joe@example.com>", []),
        ("<>", "<>", []),
        ("<> SMTPUTF8", "<>", [("SMTPUTF8", None)]),
        ("joe@example.com", "<joe@example.com>", []),
        (" joe@example.com SIZE=10", "<joe@example.com>", [("SIZE", "10")]),
        (
            "<joe@example.com> SIZE=1000 BODY=8BITMIME",
            "<joe@example.com>",
            [("SIZE", "1000"), ("BODY", "8BITMIME")],
        ),
        (
            "<joe@example.com>  size=1000   body=8bitmime  ret ",
            "<joe@example.com>",
            [("SIZE", "1000"), ("BODY", "8bitmime"), ("RET", None)],
        ),
        (
            "<joe@example.com> NOTIFY=SUCCESS,FAILURE ORCPT=rfc822;joe+40example.com",
            "<joe@example.com>",
            [("NOTIFY", "SUCCESS,FAILURE"), ("ORCPT", "rfc822;joe+40example.com")],
        ),
        ('<"a> b"@example.com>', '<"a> b"@example.com>', []),
        ('<"a> b"@example.com> X-Y=z', '<"a> b"@example.com>', [("X-Y", "z")]),
        ('<"a\\"> b"@example.com> X=1', '<"a\\"> b"@example.com>', [("X", "1")]),
        ("<a@b> ORCPT=rfc822;jö@x", "<a@b>", [("ORCPT", "rfc822;jö@x")]),
        ("<a@b> 8BITMIME", "<a@b>", [("8BITMIME", None)]),
        ("<a@b> A=<x>", "<a@b>", [("A", "<x>")]),
        ("<a@b> A=B A=C", "<a@b>", [("A", "B"), ("A", "C")]),
        # Bare and odd paths are passed on for the path parser to judge.
        ("<a b@c>", "<a b@c>", []),
        ("<<a@b>", "<<a@b>", []),
        ("a@b>", "<a@b>>", []),
    ],
)
def test_splitArgument(arg: str, path: str, params: list[tuple[str, str | None]]) -> None:
    """C{splitArgument} finds the path and the parameters."""
    assert splitArgument(arg) == (path, params)


@pytest.mark.parametrize(
    "arg",
    [
        "",
        "   ",
        "<joe@example.com",
        '<"joe@example.com> SIZE=1',
        "<joe@example.com>SIZE=10",
        "<joe@example.com>x",
        "<joe@example.com>> SIZE=10",
        "<joe@example.com> =10",
        "<joe@example.com> -SIZE=10",
        "<joe@example.com> SI_ZE=10",
        "<joe@example.com> SIZE=",
        "<joe@example.com> SIZE=1=2",
        "<joe@example.com> SIZE=1\x002",
        "<joe@example.com> SIZE=1\t",
        "<joe@example.com>\tSIZE=1",
        "<joe@example.com> SÍZE=1",
        "<joe@example.com> SIZE=\x7f",
        "<joe@example.com> SIZE=a\r",
    ],
)
def test_splitArgumentInvalid(arg: str) -> None:
    """Malformed arguments are refused with 501 5.5.4."""
    with pytest.raises(AddressError) as info:
        splitArgument(arg)
    reply = info.value.reply
    assert (reply.code, reply.enhanced) == (501, "5.5.4")
    assert reply.text.startswith("Error: ")


def test_splitArgumentParamMessage() -> None:
    """Parameter errors say so."""
    with pytest.raises(AddressError) as info:
        splitArgument("<a@b>SIZE=1")
    assert info.value.reply.text.startswith("Error: bad parameter syntax")


def test_splitThenParse() -> None:
    """The path from C{splitArgument} feeds the path parsers."""
    path, params = splitArgument(' <@r.example:"j oe"@Example.COM.> SIZE=5')
    assert forward(path) == Mailbox('"j oe"', "example.com")
    assert params == [("SIZE", "5")]


# ---------------------------------------------------------------------------------------------
# xtext


@pytest.mark.parametrize(
    "encoded,decoded",
    [
        ("", ""),
        ("joe@example.com", "joe@example.com"),
        ("rfc822;joe+2Bx@example.com", "rfc822;joe+x@example.com"),
        ("a+3Db", "a=b"),
        ("a+3db", "a=b"),
        ("a+20b", "a b"),
        ("+C3+A9", "é"),
        ("+c3+a9", "é"),
        ("+2B+2B", "++"),
    ],
)
def test_xtextDecode(encoded: str, decoded: str) -> None:
    """xtext decoding undoes +HH escapes, whatever the case of the hex."""
    assert xtextDecode(encoded) == decoded


@pytest.mark.parametrize(
    "decoded,encoded",
    [
        ("", ""),
        ("joe@example.com", "joe@example.com"),
        ("a+b=c d", "a+2Bb+3Dc+20d"),
        ("é", "+C3+A9"),
        ("\x00\x7f~!", "+00+7F~!"),
    ],
)
def test_xtextEncode(decoded: str, encoded: str) -> None:
    """xtext encoding escapes +, = and characters outside ! .. ~ in upper-case hex."""
    assert xtextEncode(decoded) == encoded


@pytest.mark.parametrize(
    "address,encoded",
    [
        ("plain@example.com", "plain@example.com"),
        ("a+b=c\\d@x", "a\\x{2B}b\\x{3D}c\\x{5C}d@x"),
        ("日本@x", "\\x{65E5}\\x{672C}@x"),
        ("rené@x", "ren\\x{E9}@x"),
        ("a b\x01@x", "a\\x{20}b\\x{01}@x"),  # HEXPOINT: never fewer than two digits
        ("\U0001F600@x", "\\x{1F600}@x"),
    ],
)
def test_utf8AddrXtext(address: str, encoded: str) -> None:
    """RFC 6533 utf-8-addr-xtext: ASCII only; +, =, \\, space, controls and every non-ASCII
    character as \\x{HEX} of the code point, no leading zeros beyond two digits."""
    assert utf8AddrXtext(address) == encoded
    assert encoded.isascii()


@pytest.mark.parametrize(
    "text,decoded",
    [
        ("rej\\x{FC}@dest.test", "rejü@dest.test"),
        ("rejü@dest.test", "rejü@dest.test"),  # unitext: raw UTF-8 stays
        ("a\\x{2B}b\\x{5C}c@x", "a+b\\c@x"),
        ("\\x{1F600}@x", "\U0001F600@x"),
        ("odd\\x{}\\x{ZZ}\\y@x", "odd\\x{}\\x{ZZ}\\y@x"),  # not escapes: kept
        ("\\x{110000}@x", "\\x{110000}@x"),  # beyond Unicode: kept
    ],
)
def test_utf8AddrDecode(text: str, decoded: str) -> None:
    """RFC 6533's utf-8-addr-xtext and -unitext decoded: each \\x{HEX} is its code point;
    and encoding what is decoded gives the xtext form."""
    assert utf8AddrDecode(text) == decoded
    assert utf8AddrDecode(utf8AddrXtext(decoded)) == decoded



@pytest.mark.parametrize(
    "bad", ["+", "+4", "a+", "+GG", "+4g", "a=b", "a b", "é", "\x00", "+FF", "+C3"]
)
def test_xtextDecodeInvalid(bad: str) -> None:
    """Bad xtext is refused with 501 5.5.4."""
    with pytest.raises(AddressError) as info:
        xtextDecode(bad)
    assert (info.value.reply.code, info.value.reply.enhanced) == (501, "5.5.4")


# ---------------------------------------------------------------------------------------------
# Properties

atoms = st.text(alphabet=ATEXT, min_size=1, max_size=8)
# (A local part starting with '-' is refused: test_localPartStartingWithADashRefused.)
dotStrings = st.lists(atoms, min_size=1, max_size=4).map(".".join).filter(
    lambda local: not local.startswith("-"))
labels = st.from_regex(r"[a-z0-9]([a-z0-9-]{0,10}[a-z0-9])?", fullmatch=True)
domains = st.lists(labels, min_size=1, max_size=4).map(".".join).filter(
    lambda domain: not domain.rsplit(".", 1)[-1].isdigit())  # (refused: see above)


@fast
@given(local=dotStrings, domain=domains)
def test_roundTrip(local: str, domain: str) -> None:
    """Canonical dot-string mailboxes survive formatting and parsing unchanged."""
    mailbox = Mailbox(local, domain)
    assert str(forward(f"<{mailbox}>")) == str(mailbox)
    assert parseReversePath(f"<{mailbox}>") == mailbox


@st.composite
def quotedLocalParts(draw: st.DrawFn) -> tuple[str, str]:
    """A quoted-string local part with arbitrary escaping, and its content."""
    printable = st.characters(min_codepoint=32, max_codepoint=126)
    content = draw(st.text(alphabet=printable, max_size=30).filter(
        lambda text: not text.startswith("-")))  # (refused: see above)
    out = ['"']
    for char in content:
        if char in '"\\' or draw(st.booleans()):
            out.append("\\")
        out.append(char)
    out.append('"')
    return "".join(out), content


@st.composite
def anyDomains(draw: st.DrawFn) -> str:
    """A domain in any case with an optional trailing dot, or an address literal."""
    kind = draw(st.sampled_from(["domain", "ipv4", "ipv6"]))
    if kind == "ipv4":
        return f"[{draw(st.ip_addresses(v=4))}]"
    if kind == "ipv6":
        address = draw(st.ip_addresses(v=6))
        text = draw(st.sampled_from([address.compressed, address.exploded]))
        return f"[{draw(st.sampled_from(['IPv6', 'ipv6']))}:{text.upper()}]"
    domain = draw(domains)
    domain = "".join(c.upper() if draw(st.booleans()) else c for c in domain)
    return domain + draw(st.sampled_from(["", "."]))


@fast
@given(
    local=st.one_of(dotStrings.map(lambda s: (s, s)), quotedLocalParts()),
    domain=anyDomains(),
)
@example(local=('"joe"', "joe"), domain="X.example.")
@example(local=('"\\"\\\\"', '"\\'), domain="[IPv6:0::1]")
def test_canonicalFixedPoint(local: tuple[str, str], domain: str) -> None:
    """Parsing the canonical form of any parsed mailbox gives the same mailbox."""
    text, content = local
    mailbox = forward(f"<{text}@{domain}>")
    assert forward(f"<{mailbox}>") == mailbox
    assert parseReversePath(f"<{mailbox}>") == mailbox
    assert normaliseDomain(mailbox.domain) == mailbox.domain
    assert mailbox.hasRouting == any(c in content for c in "%!@")
    if mailbox.localPart.startswith('"'):
        minimal = content.replace("\\", "\\\\").replace('"', '\\"')
        assert mailbox.localPart == f'"{minimal}"'
    else:
        assert mailbox.localPart == content


utf8Atoms = st.text(alphabet=ATEXT[:20] + "éüßøñ用户例ñ", min_size=1, max_size=6)
uLabels = st.sampled_from(["bücher", "Bücher", "例子", "测试", "faß", "ñçøåæœ", "example", "A1"])


@fast
@given(
    local=st.lists(utf8Atoms, min_size=1, max_size=3).map(".".join),
    quoted=st.booleans(),
    domain=st.lists(uLabels, min_size=1, max_size=3).map(".".join),
)
def test_utf8FixedPoint(local: str, quoted: bool, domain: str) -> None:
    """Unicode mailboxes parse with SMTPUTF8 to a canonical form that is a fixed point."""
    text = f'"{local}"' if quoted else local
    mailbox = forward(f"<{text}@{domain}>", utf8=True)
    assert mailbox.localPart == local
    assert mailbox.domain == normaliseDomain(domain) == normaliseDomain(mailbox.domain)
    assert mailbox.domain.isascii()
    assert forward(f"<{mailbox}>", utf8=True) == mailbox
    assert mailbox.isASCII == local.isascii()
    if not mailbox.isASCII or not domain.isascii():
        assert forwardError(f"<{text}@{domain}>").code == 553


@fast
@given(st.text())
@example("\x00+= é\ud7ff")
def test_xtextRoundTrip(text: str) -> None:
    """xtext encoding round-trips and yields only printable ASCII."""
    encoded = xtextEncode(text)
    assert xtextDecode(encoded) == text
    assert all(33 <= ord(c) <= 126 and c != "=" for c in encoded)


# Text biased towards the characters that matter to the grammar.
grammarText = st.lists(
    st.sampled_from(list('<>@".\\[]:,%! aZ9-_+=\x00\t\r\x7fü。ß') + ["IPv6:", "Postmaster"]),
    max_size=30,
).map("".join)
fuzzText = st.one_of(st.text(max_size=80), grammarText)


def checkParsed(mailbox: Mailbox | None, utf8: bool) -> None:
    """Invariants of any successfully parsed mailbox."""
    if mailbox is None:
        return
    again = forward(f"<{mailbox}>", utf8=utf8)
    assert again == mailbox
    assert len(mailbox.localPart.encode("utf-8")) <= 64
    assert len(mailbox.domain) <= 255
    assert len(str(mailbox).encode("utf-8")) + 2 <= 256
    assert mailbox.domain.isascii()
    assert utf8 or mailbox.isASCII


@fast
@given(text=fuzzText, utf8=st.booleans())
def test_fuzzParsers(text: str, utf8: bool) -> None:
    """The parsers raise only L{AddressError}, whose reply can be sent, on any text."""
    for candidate in (text, f"<{text}>", f"<a@{text}>", f"<{text}@x.example>"):
        for parse in (
            lambda p: parseReversePath(p, utf8=utf8),
            lambda p: parseForwardPath(p, utf8=utf8, postmasterDomain=PM),
        ):
            try:
                mailbox = parse(candidate)
            except AddressError as e:
                assert e.reply.code in (501, 553)
                e.reply.toBytes()
            else:
                checkParsed(mailbox, utf8)


@fast
@given(text=fuzzText)
def test_fuzzOthers(text: str) -> None:
    """splitArgument, normaliseDomain and xtextDecode raise only L{AddressError}."""
    for function in (splitArgument, normaliseDomain, xtextDecode):
        try:
            result = function(text)
        except AddressError as e:
            assert e.reply.code == 501
            e.reply.toBytes()
        else:
            if function is normaliseDomain:
                assert normaliseDomain(result) == result
            elif function is splitArgument:
                path, params = result
                assert path.startswith("<") and path.endswith(">")
                assert all(k == k.upper() and " " not in k for k, _ in params)


def test_hostPort() -> None:
    """A host and port as logs and status show them: an IPv6 address in brackets, so that
    its colons cannot be taken for the port's."""
    from mailrelay.address import hostPort

    assert hostPort("192.0.2.1", 25) == "192.0.2.1:25"
    assert hostPort("2001:db8::7", 1234) == "[2001:db8::7]:1234"
    assert hostPort("::1", 2525) == "[::1]:2525"
    assert hostPort("mx.example.org", 587) == "mx.example.org:587"


@pytest.mark.parametrize("char", ["\u2028", "\u2029", "\u202e", "\u200b", "\ufeff", "\u00ad"])
def test_line_separators_and_format_characters_are_refused_in_addresses(char: str) -> None:
    """A line or paragraph separator, a bidi override, a zero-width or other format
    character (Unicode Zl, Zp, Cf) in an SMTPUTF8 address: refused, as controls are.  They
    were accepted, and reached the log raw, where a line separator starts a forged line for
    any Unicode-aware reader and an override reverses what a terminal shows."""
    for text in (f"<a{char}b@example.org>", f'<"a{char}b"@example.org>'):
        with pytest.raises(AddressError):
            parseForwardPath(text, utf8=True, postmasterDomain="example.org")
    assert str(parseForwardPath("<jörg@example.org>", utf8=True,
                                postmasterDomain="example.org")) == "jörg@example.org"


@fast
@given(st.text(alphabet="<>\\ a@b.=X\x80", max_size=30))
@example("<a\\>b> SIZE=1")
@example("<a@b")
def test_path_end_without_quotes_is_the_loops(tail: str) -> None:
    """splitArgument finds the end of a path without a quoted-string by a plain search:
    the index the scanning loop (L{_pathEnd}, which the quoted paths still take) finds, and
    so the same path, parameters or 501."""
    from mailrelay.address import _pathEnd

    text = "<" + tail
    assert text.find(">") == _pathEnd(text)
