"""Routing table, next hops, MX resolution (fake resolver and a real DNS server on loopback)."""

from __future__ import annotations

import random
import re
from types import SimpleNamespace
from typing import Any

import pytest
from twisted.internet import defer, reactor
from twisted.internet.task import Clock
from twisted.logger import LogLevel, capturedLogs, formatEvent
from twisted.names import authority, dns, error, server
from twisted.python.failure import Failure
from twisted.trial import unittest
from zope.interface.verify import verifyObject

from mailrelay.envelope import Envelope, Recipient
from mailrelay.interfaces import PLATFORM_TRUST_STORE, IRouter, Route, RouteOptions
from mailrelay.route import (
    DeliveryFailure,
    MXHost,
    MXResolver,
    PermanentFailure,
    RouteRule,
    RoutingTable,
    SenderRoute,
    TransientFailure,
    makeResolver,
    parseNameserver,
    parseSMTPNexthop,
)
from mailrelay.route.nexthop import (
    LMTPNexthop,
    SMTPNexthop,
    checkMaildirTemplate,
    parseLMTPNexthop,
    parseRouteDomain,
)
from tests.harness import fired


def rcpt(address: str) -> Recipient:
    return Recipient(address=address)


ENV = Envelope(sender="a@example.com")


# ---------------------------------------------------------------------------------------------
# RoutingTable


def routeOf(table: RoutingTable, address: str) -> Route:
    return table.route(ENV, rcpt(address))


def test_provides_irouter() -> None:
    verifyObject(IRouter, RoutingTable())


def test_default_is_mx_of_the_domain() -> None:
    table = RoutingTable()
    assert routeOf(table, "bob@example.org") == Route("smtp", "example.org")


def test_address_literal_is_its_own_nexthop() -> None:
    table = RoutingTable()
    assert routeOf(table, "bob@[192.0.2.1]") == Route("smtp", "[192.0.2.1]")
    assert routeOf(table, "bob@[IPv6:2001:db8::1]") == Route("smtp", "[IPv6:2001:db8::1]")
    assert parseSMTPNexthop("[IPv6:2001:db8::1]") == SMTPNexthop("2001:db8::1", 25, False)


def test_smarthost_default() -> None:
    table = RoutingTable(smarthost=SMTPNexthop("relay.example.net", 587, mxLookup=False))
    assert routeOf(table, "bob@example.org") == Route("smtp", "[relay.example.net]:587")
    assert routeOf(table, "bob@[192.0.2.1]") == Route("smtp", "[relay.example.net]:587")
    table = RoutingTable(smarthost=parseSMTPNexthop("relay.example.net"))
    assert routeOf(table, "bob@example.org") == Route("smtp", "relay.example.net")
    table = RoutingTable(smarthost="[2001:db8::1]:2525")
    assert routeOf(table, "bob@example.org") == Route("smtp", "[2001:db8::1]:2525")
    assert parseSMTPNexthop(str(parseSMTPNexthop("[2001:db8::1]:2525"))) == SMTPNexthop(
        "2001:db8::1", 2525, False
    )


def test_most_specific_rule_wins() -> None:
    rules = [
        RouteRule("*", "smtp", "[fallback.example]"),
        RouteRule(".example.org", "smtp", "[sub.example]"),
        RouteRule(".deep.example.org", "lmtp", "unix:/run/lmtp"),
        RouteRule("example.org", "maildir", "/var/mail/{domain}/{local}"),
        RouteRule("x.deep.example.org", "discard"),
    ]
    table = RoutingTable(rules, smarthost="[smarthost.example]:25")
    assert routeOf(table, "a@example.org") == Route("maildir", "/var/mail/{domain}/{local}")
    assert routeOf(table, "a@a.example.org") == Route("smtp", "[sub.example]")
    assert routeOf(table, "a@b.a.example.org") == Route("smtp", "[sub.example]")
    assert routeOf(table, "a@deep.example.org") == Route("smtp", "[sub.example]")
    assert routeOf(table, "a@y.deep.example.org") == Route("lmtp", "unix:/run/lmtp")
    assert routeOf(table, "a@x.deep.example.org") == Route("discard", "discard")
    # "*" beats the smarthost.
    assert routeOf(table, "a@example.com") == Route("smtp", "[fallback.example]")
    assert routeOf(table, "a@notexample.org") == Route("smtp", "[fallback.example]")


def test_subdomain_rule_does_not_match_the_domain_itself() -> None:
    table = RoutingTable([RouteRule(".example.org", "discard")])
    assert routeOf(table, "a@example.org") == Route("smtp", "example.org")
    assert routeOf(table, "a@www.example.org") == Route("discard", "discard")


def test_patterns_are_normalised() -> None:
    table = RoutingTable(
        [RouteRule("Example.ORG.", "discard"), RouteRule(".BÜCHER.example", "discard", "x")]
    )
    assert routeOf(table, "a@example.org") == Route("discard", "discard")
    assert routeOf(table, "a@www.xn--bcher-kva.example") == Route("discard", "x")


def test_smtp_rule_without_nexthop_uses_recipient_domain_and_port() -> None:
    required, user, may = (
        RouteOptions(tls="required"),
        RouteOptions(username="u", password="p"),
        RouteOptions(tls="may"),
    )
    table = RoutingTable(
        [
            RouteRule(".example.org", "smtp", None, required, port=2525),
            RouteRule("example.net", "smtp", "[relay.example]", user, port=587),
            RouteRule("*", "smtp", None, may),
        ],
        smarthost="[ignored.example]",
    )
    assert routeOf(table, "a@www.example.org") == Route("smtp", "www.example.org:2525", required)
    assert routeOf(table, "a@example.net") == Route("smtp", "[relay.example]:587", user)
    assert routeOf(table, "a@example.com") == Route("smtp", "example.com", may)
    assert routeOf(table, "a@[192.0.2.7]") == Route("smtp", "[192.0.2.7]", may)


def test_routes_to_one_nexthop_keep_their_own_options() -> None:
    """A rule whose next hop is the smarthost's does not change the smarthost's options
    (issue 7: they were looked up by the next hop's name)."""
    smarthostOptions = RouteOptions(tls="required", caFile="/ca.pem")
    table = RoutingTable(
        [RouteRule("plain.example", "smtp", "[relay.example]:587", RouteOptions(tls="none"))],
        smarthost="[relay.example]:587",
        smarthostOptions=smarthostOptions,
    )
    plain = routeOf(table, "a@plain.example")
    other = routeOf(table, "a@example.com")
    assert plain == Route("smtp", "[relay.example]:587", RouteOptions(tls="none"))
    assert other == Route("smtp", "[relay.example]:587", smarthostOptions)
    assert plain != other and hash(plain) != hash(other)


def test_site_backend_and_smarthost_options() -> None:
    options = RouteOptions(tls="required")
    table = RoutingTable(
        [RouteRule("example.org", "acme-store")],
        smarthost="[relay.example]:587",
        smarthostOptions=options,
    )
    assert routeOf(table, "a@example.org") == Route("acme-store", "acme-store")
    assert routeOf(table, "a@example.com") == Route("smtp", "[relay.example]:587", options)


def test_from_config() -> None:
    """The table of a configuration: its routes (the configuration's rules, with their
    options) and its smarthost with the smarthost's options."""
    options = RouteOptions("required", "/ca.pem", "u", "pw", False)
    smarthostOptions = RouteOptions("may", PLATFORM_TRUST_STORE, None, None, False)
    config = SimpleNamespace(
        routes=(
            RouteRule(".example.net", "smtp", None, options),
            RouteRule("local.test", "maildir", "/m/{local}"),
        ),
        smarthost=SMTPNexthop("relay.example", 587, mxLookup=False),
        smarthostOptions=smarthostOptions,
        senderRoutes=(),
        recipientDelimiter="",
    )
    table = RoutingTable.fromConfig(config)
    assert routeOf(table, "a@x.example.net") == Route("smtp", "x.example.net", options)
    assert routeOf(table, "a@local.test") == Route("maildir", "/m/{local}")
    assert routeOf(table, "a@other.example") == Route(
        "smtp", "[relay.example]:587", smarthostOptions
    )


def test_route_options_are_checked() -> None:
    assert RouteOptions().changes() == {}
    assert RouteOptions(tls="none", authWithoutTLS=False).changes() == {
        "tls": "none",
        "authWithoutTLS": False,
    }
    assert "secret" not in repr(RouteOptions(username="u", password="secret"))
    for bad, message in [
        (dict(tls="maybe"), "tls must be one of none, may, required, implicit"),
        (dict(username="u"), "go together"),
        (dict(password="p"), "go together"),
        (dict(caFile=b"/ca.pem"), "caFile must be a non-empty string"),
        (dict(username="u\0", password="p"), "username must be"),
        (dict(authWithoutTLS="yes"), "authWithoutTLS must be a bool"),
        (dict(sourceAddress="2001:db8::1"), "sourceAddress must be an IPv4 address"),
        (dict(sourceAddress6="192.0.2.1"), "sourceAddress6 must be an IPv6 address"),
    ]:
        with pytest.raises(ValueError, match=message):
            RouteOptions(**bad)
    with pytest.raises(ValueError, match="not shown"):
        RouteOptions(username="u", password="")
    with pytest.raises(TypeError, match="RouteOptions"):
        Route("smtp", "example.org", (("tls", "none"),))  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="strings"):
        Route("smtp", None)  # type: ignore[arg-type]


def test_bad_rules() -> None:
    with pytest.raises(ValueError, match="needs a nexthop"):
        RoutingTable([RouteRule("example.org", "lmtp")])
    with pytest.raises(ValueError, match="needs a nexthop"):
        RoutingTable([RouteRule("example.org", "maildir")])
    with pytest.raises(ValueError, match="already a route"):
        RoutingTable([RouteRule("example.org", "discard"), RouteRule("EXAMPLE.org", "discard")])
    with pytest.raises(ValueError, match="already"):
        RoutingTable([RouteRule("*", "discard"), RouteRule("*", "discard")])
    with pytest.raises(ValueError, match="not a valid domain"):
        RoutingTable([RouteRule("exa mple.org", "discard")])
    with pytest.raises(ValueError, match="port must be a number"):
        RoutingTable([RouteRule("example.org", "smtp", None, port=0)])
    with pytest.raises(ValueError, match="port is for smtp routes only"):
        RoutingTable([RouteRule("example.org", "lmtp", "unix:/run/lmtp", port=24)])
    with pytest.raises(ValueError, match="options must be RouteOptions"):
        RoutingTable([RouteRule("example.org", "smtp", None, ())])  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="smarthost's options"):
        RoutingTable(smarthost="[relay.example]", smarthostOptions=())  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="next hop"):
        RoutingTable([RouteRule("example.org", "smtp", "[relay.example")])
    with pytest.raises(ValueError):
        RoutingTable(smarthost="[nope")


@pytest.mark.parametrize("backend,nexthop,options,refused", [
    ("maildir", "/m/{local}", RouteOptions(tls="required"), "tls"),
    ("discard", None, RouteOptions(username="u", password="p"), "username, password"),
    ("acme-store", None, RouteOptions(sourceAddress="192.0.2.1"), "sourceAddress"),
    ("lmtp", "unix:/run/lmtp", RouteOptions(sourceAddress6="2001:db8::1"), "sourceAddress6"),
    ("lmtp", "unix:/run/lmtp", RouteOptions(fallbackRelay=("[relay.example]",)),
     "fallbackRelay"),
    ("maildir", "/m/{local}", RouteOptions(fallbackRelay=("[relay.example]",)),
     "fallbackRelay"),
])
def test_route_options_only_for_the_backends_that_take_them(
    backend: str, nexthop: str | None, options: RouteOptions, refused: str
) -> None:
    """A rule's options are a client connection's (TLS, CA file, AUTH, source address):
    a rule for another backend that sets them is refused, naming them, as the
    configuration refuses such a [[routes]] table, not kept and ignored at delivery (as
    Postfix's transport(5) gives per-transport options only to the transports that take
    them); an lmtp rule takes them but a source address."""
    problem = (f"an lmtp route takes no {refused}" if backend == "lmtp"
               else f'only smtp and lmtp routes take {refused}, not a "{backend}" route')
    with pytest.raises(ValueError, match=f"route 'example.org': {problem}"):
        RoutingTable([RouteRule("example.org", backend, nexthop, options)])
    RoutingTable([RouteRule("example.org", "lmtp", "unix:/run/lmtp", RouteOptions(tls="may"))])


@pytest.mark.parametrize("value,problem", [
    ((), "fallbackRelay must list at least one SMTP next hop, not ()"),
    ("[relay.example]", "fallbackRelay must be a tuple of SMTP next hops, not '[relay.example]'"),
    (("[relay.example]", ""), "fallbackRelay must be a tuple of SMTP next hops, not "),
    (("[relay.example]", 5), "fallbackRelay must be a tuple of SMTP next hops, not "),
])
def test_route_options_fallback_relay_is_a_list_of_next_hops(value: Any, problem: str) -> None:
    """A route's fallback relays (Postfix's smtp_fallback_relay) are a non-empty tuple of
    strings (parsed as SMTP next hops by the smtp backend); they are not client settings
    (RouteOptions.changes leaves them out) but make routes differ."""
    with pytest.raises(ValueError, match=re.escape(problem)):
        RouteOptions(fallbackRelay=value)
    options = RouteOptions(tls="may", fallbackRelay=("[relay.example]:587",))
    assert options.changes() == {"tls": "may"}
    assert options != RouteOptions(tls="may")
    assert options.refusedBy("smtp") is None


def test_recipient_without_domain() -> None:
    with pytest.raises(DeliveryFailure) as e:
        routeOf(RoutingTable(), "postmaster")
    assert isinstance(e.value, PermanentFailure) and e.value.code == "5.1.2"
    assert routeOf(RoutingTable(smarthost="[relay.example]:25"), "postmaster") == Route(
        "smtp", "[relay.example]:25"
    )


# Sender-dependent relay hosts (Postfix's sender_dependent_relayhost_maps with
# smtp_sender_dependent_authentication = yes)

A_OPTIONS = RouteOptions("required", PLATFORM_TRUST_STORE, "a-user", "a-pw", False)
B_OPTIONS = RouteOptions("required", PLATFORM_TRUST_STORE, "b-user", "b-pw", False)
SMARTHOST_OPTIONS = RouteOptions("may", PLATFORM_TRUST_STORE, None, None, False)


def senderTable(*rules: RouteRule, **kwargs: Any) -> RoutingTable:
    """A table with a smarthost and sender routes for @a.example, @b.example, one address of
    b.example, and the null sender."""
    return RoutingTable(
        rules,
        smarthost="[relay.example]:587",
        smarthostOptions=SMARTHOST_OPTIONS,
        senderRoutes=[
            SenderRoute("@a.example", "[smtp.a.example]:587", A_OPTIONS),
            SenderRoute("@B.Example", "[smtp.b.example]:587", B_OPTIONS),
            SenderRoute("boss@b.example", "[vip.b.example]:465", B_OPTIONS),
            SenderRoute("<>", "[bounces.example]", SMARTHOST_OPTIONS),
        ],
        **kwargs,
    )


def senderRouteOf(table: RoutingTable, sender: str, address: str = "x@example.org") -> Route:
    return table.route(Envelope(sender=sender), rcpt(address))


def test_sender_route_by_domain_with_its_own_options() -> None:
    """Each sender's domain goes to its own relay host with its own credentials; other
    senders go to the smarthost (Postfix looks up user@domain, then @domain)."""
    table = senderTable()
    assert senderRouteOf(table, "ann@a.example") == Route(
        "smtp", "[smtp.a.example]:587", A_OPTIONS
    )
    assert senderRouteOf(table, "bob@b.example") == Route(
        "smtp", "[smtp.b.example]:587", B_OPTIONS
    )
    assert senderRouteOf(table, "cy@c.example") == Route(
        "smtp", "[relay.example]:587", SMARTHOST_OPTIONS
    )
    # @a.example is that domain, not its subdomains (Postfix's @domain lookup key).
    assert senderRouteOf(table, "ann@sub.a.example").nexthop == "[relay.example]:587"


def test_sender_route_address_before_domain() -> None:
    table = senderTable()
    assert senderRouteOf(table, "boss@b.example") == Route(
        "smtp", "[vip.b.example]:465", B_OPTIONS
    )
    # Looked up without regard to case, as Postfix's tables fold the key.
    assert senderRouteOf(table, "Boss@B.EXAMPLE").nexthop == "[vip.b.example]:465"


def test_sender_route_address_extension() -> None:
    """With a recipient delimiter, user+ext@domain is looked up, then user@domain, then
    @domain (Postfix's mail_addr_find)."""
    table = senderTable(recipientDelimiter="+")
    assert senderRouteOf(table, "boss+news@b.example").nexthop == "[vip.b.example]:465"
    table = senderTable()
    assert senderRouteOf(table, "boss+news@b.example").nexthop == "[smtp.b.example]:587"


def test_null_sender_has_its_own_key() -> None:
    """The null sender is looked up as "<>" (Postfix's empty_address_relayhost_maps_lookup_key);
    without a "<>" route it goes where mail without a sender route goes."""
    table = senderTable()
    assert senderRouteOf(table, "") == Route("smtp", "[bounces.example]:25", SMARTHOST_OPTIONS)
    table = RoutingTable(
        smarthost="[relay.example]:587",
        senderRoutes=[SenderRoute("@a.example", "[smtp.a.example]:587", A_OPTIONS)],
    )
    assert senderRouteOf(table, "") == Route("smtp", "[relay.example]:587")
    assert table.route(None, rcpt("x@example.org")) == Route("smtp", "[relay.example]:587")


def test_recipient_routes_before_sender_routes() -> None:
    """A [[routes]] rule, "*" included, wins over a sender route, which wins over the
    smarthost and the MX lookup (Postfix's trivial-rewrite resolve.c: transport_maps before
    sender_dependent_relayhost_maps before relayhost before the recipient domain)."""
    table = senderTable(
        RouteRule("local.example", "maildir", "/m/{local}"),
        RouteRule(".mx.example", "smtp"),
    )
    assert senderRouteOf(table, "ann@a.example", "x@local.example") == Route(
        "maildir", "/m/{local}"
    )
    assert senderRouteOf(table, "ann@a.example", "x@h.mx.example") == Route("smtp", "h.mx.example")
    assert senderRouteOf(table, "ann@a.example", "postmaster").nexthop == "[smtp.a.example]:587"
    table = senderTable(RouteRule("*", "discard"))
    assert senderRouteOf(table, "ann@a.example") == Route("discard", "discard")
    noSmarthost = RoutingTable(
        senderRoutes=[SenderRoute("@a.example", "smtp.a.example:2525", A_OPTIONS)]
    )
    assert senderRouteOf(noSmarthost, "ann@a.example") == Route(
        "smtp", "smtp.a.example:2525", A_OPTIONS
    )
    assert senderRouteOf(noSmarthost, "bob@b.example") == Route("smtp", "example.org")


def test_sender_routes_from_config() -> None:
    config = SimpleNamespace(
        routes=(),
        smarthost=None,
        smarthostOptions=SMARTHOST_OPTIONS,
        senderRoutes=(SenderRoute("@a.example", "[smtp.a.example]:587", A_OPTIONS),),
        recipientDelimiter="+",
    )
    table = RoutingTable.fromConfig(config)
    assert senderRouteOf(table, "ann+x@a.example") == Route(
        "smtp", "[smtp.a.example]:587", A_OPTIONS
    )


def test_bad_sender_routes() -> None:
    for bad, message in [
        (SenderRoute("a.example", "[h]"), 'sender route .a.example.: "a.example" is not an address, '
         '"@domain" or "<>"'),
        (SenderRoute("@exa mple", "[h]"), 'sender route .@exa mple.: .*not an address'),
        (SenderRoute("", "[h]"), "sender route '': .*not an address.*: it is empty"),
        (SenderRoute("@a.example", "[h"), 'sender route .@a.example.: .*not a valid'),
        (SenderRoute("@a.example", "[h]", ()), "options must be RouteOptions"),  # type: ignore[arg-type]
    ]:
        with pytest.raises(ValueError, match=message):
            RoutingTable(senderRoutes=[bad])
    with pytest.raises(ValueError, match="sender route '@A.example': there is already a sender "
                       "route for '@a.example'"):
        RoutingTable(senderRoutes=[SenderRoute("@a.example", "[h]"),
                                   SenderRoute("@A.example", "[h]")])


def test_parse_nexthop_errors() -> None:
    for bad in ["", "[x", "[x]y", "a:b:c", "host:0", "host:99999", "host:x", "[]", "a b"]:
        with pytest.raises(ValueError):
            parseSMTPNexthop(bad)


# ---------------------------------------------------------------------------------------------
# Next hop parsers (route/nexthop.py: the configuration's and the runtime's)


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("smtp.example.net", SMTPNexthop("smtp.example.net", 25, True)),
        ("SMTP.Example.NET.", SMTPNexthop("smtp.example.net", 25, True)),
        ("smtp.example.net:2525", SMTPNexthop("smtp.example.net", 2525, True)),
        ("[smtp.example.net]", SMTPNexthop("smtp.example.net", 25, False)),
        ("[smtp.example.net]:587", SMTPNexthop("smtp.example.net", 587, False)),
        ("localhost", SMTPNexthop("localhost", 25, True)),
        ("192.0.2.1", SMTPNexthop("192.0.2.1", 25, False)),
        ("192.0.2.1:26", SMTPNexthop("192.0.2.1", 26, False)),
        ("[192.0.2.1]:26", SMTPNexthop("192.0.2.1", 26, False)),
        ("[::1]:2525", SMTPNexthop("::1", 2525, False)),
        ("[2001:db8::1]", SMTPNexthop("2001:db8::1", 25, False)),
        ("[2001:DB8:0::1]:65535", SMTPNexthop("2001:db8::1", 65535, False)),
        ("[IPv6:2001:DB8::1]:587", SMTPNexthop("2001:db8::1", 587, False)),
        ("[ipv6:::1]", SMTPNexthop("::1", 25, False)),
        ("host:1", SMTPNexthop("host", 1, True)),
    ],
)
def test_parseSMTPNexthop(text: str, expected: SMTPNexthop) -> None:
    """Host names, IPv4 and bracketed IPv6 addresses (with or without RFC 5321's "IPv6:"
    tag), with and without port and brackets."""
    assert parseSMTPNexthop(text) == expected
    assert parseSMTPNexthop(str(expected)) == expected


@pytest.mark.parametrize(
    ("text", "fragment"),
    [
        ("", "host is missing"),
        (":25", "host is missing"),
        ("[]:25", "host is missing"),
        ("host:", "port"),
        ("host:0", "from 1 to 65535, not 0"),
        ("host:65536", "not 65536"),
        ("host:x25", 'not "x25"'),
        ("host:+25", 'not "+25"'),
        ("[host", '"[" without "]"'),
        ("[host]x", 'unexpected "x"'),
        ("[host]:", "port"),
        ("2001:db8::1", "brackets"),
        ("::1", "brackets"),
        ("[IPv6:192.0.2.1]", '"192.0.2.1" after "IPv6:" is not an IPv6 address'),
        ("bad_host.example", "letters, digits and hyphens"),
        ("-host.example", "hyphen"),
        ("a..b", "empty label"),
        ("host name", "letters, digits and hyphens"),
        ("[300.1.2.3]", "all digits"),
    ],
)
def test_parseSMTPNexthopErrors(text: str, fragment: str) -> None:
    """Bad next hops raise ValueError naming the value, what it is, the problem and the
    notations allowed."""
    with pytest.raises(ValueError) as e:
        parseSMTPNexthop(text, what="smarthost")
    assert f'"{text}" is not a valid smarthost: ' in str(e.value)
    assert fragment in str(e.value)
    assert str(e.value).endswith('(use "host", "host:port", "[host]:port" or "[2001:db8::1]:port")')
    with pytest.raises(ValueError, match="must be a smarthost as a string, not 25"):
        parseSMTPNexthop(25, what="smarthost")  # type: ignore[arg-type]


def test_parseSMTPNexthop_recipient_domain() -> None:
    """strict=False reads a host as a mail domain (what a recipient's domain, which the
    router makes a next hop of, may be), not as a host name."""
    for text in ["example.123", "bücher.example"]:
        with pytest.raises(ValueError):
            parseSMTPNexthop(text)
    # (An all-digit top label is no mail domain either: RFC 1123 section 2.1.)
    with pytest.raises(ValueError, match="the last label of a domain cannot be all digits"):
        parseSMTPNexthop("example.123:2525", strict=False)
    assert parseSMTPNexthop("mx-1.example:2525", strict=False) == SMTPNexthop(
        "mx-1.example", 2525)
    assert parseSMTPNexthop("Bücher.example", strict=False) == SMTPNexthop(
        "xn--bcher-kva.example"
    )
    assert parseSMTPNexthop("[IPv6:2001:db8::7]", strict=False) == SMTPNexthop(
        "2001:db8::7", 25, False
    )
    with pytest.raises(ValueError, match="invalid character ' ' in domain"):
        parseSMTPNexthop("a b.example", strict=False)


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("lmtp.example:24", LMTPNexthop("lmtp.example", 24)),
        ("[LMTP.Example.]:2003", LMTPNexthop("lmtp.example", 2003)),
        ("192.0.2.1:24", LMTPNexthop("192.0.2.1", 24)),
        ("[192.0.2.1]:24", LMTPNexthop("192.0.2.1", 24)),
        ("[2001:db8::1]:24", LMTPNexthop("2001:db8::1", 24)),
        ("[IPv6:2001:db8::1]:24", LMTPNexthop("2001:db8::1", 24)),
        ("unix:/run/dovecot/lmtp", LMTPNexthop(path="/run/dovecot/lmtp")),
        ("unix:/run/./x//lmtp", LMTPNexthop(path="/run/x/lmtp")),
    ],
)
def test_parseLMTPNexthop(text: str, expected: LMTPNexthop) -> None:
    """TCP servers (port required) and Unix sockets (absolute path), normalised."""
    assert parseLMTPNexthop(text) == expected
    assert parseLMTPNexthop(str(expected)) == expected


def test_LMTPNexthop_str() -> None:
    assert str(parseLMTPNexthop("[LMTP.Example.]:2003")) == "lmtp.example:2003"
    assert str(parseLMTPNexthop("[IPv6:2001:db8::1]:24")) == "[2001:db8::1]:24"
    assert str(parseLMTPNexthop("unix:/run/./x//lmtp")) == "unix:/run/x/lmtp"


@pytest.mark.parametrize(
    ("text", "fragment"),
    [
        ("lmtp.example", "the port is missing"),
        ("[lmtp.example]", "the port is missing"),
        ("[::1]", "the port is missing"),
        ("lmtp.example:0", "not 0"),
        ("unix:", "must be absolute"),
        ("unix:run/lmtp", "must be absolute"),
        ("2001:db8::1:24", "brackets"),
        ("bad_host:24", "letters, digits and hyphens"),
    ],
)
def test_parseLMTPNexthopErrors(text: str, fragment: str) -> None:
    """Bad LMTP servers raise ValueError naming the value."""
    with pytest.raises(ValueError) as e:
        parseLMTPNexthop(text)
    assert f'"{text}" is not a valid LMTP server' in str(e.value)
    assert fragment in str(e.value)


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("192.0.2.1", ("192.0.2.1", 53)),
        ("127.0.0.1:5353", ("127.0.0.1", 5353)),
        ("::1", ("::1", 53)),
        ("[::1]:53", ("::1", 53)),
        ("[::1]", ("::1", 53)),
        ("[2001:DB8:0::1]:5353", ("2001:db8::1", 5353)),
        ("[192.0.2.1]:54", ("192.0.2.1", 54)),
        # Without brackets the colons all belong to the address.
        ("::1:53", ("::1:53", 53)),
    ],
)
def test_parseNameserver(text: str, expected: tuple[str, int]) -> None:
    """IPv4 and IPv6 addresses, with and without port."""
    assert parseNameserver(text) == expected


@pytest.mark.parametrize(
    ("text", "fragment"),
    [
        ("ns.example.com", "not an IP address"),
        ("localhost:53", "not an IP address"),
        ("[ns.example.com]:53", "not an IP address"),
        ("", "host is missing"),
        (":53", "host is missing"),
        ("192.0.2.1:", "port"),
        ("192.0.2.1:65536", "not 65536"),
        ("192.0.2.1:dns", 'not "dns"'),
        ("[::1", '"[" without "]"'),
        ("[::1]53", 'unexpected "53"'),
        ("300.1.2.3", "all digits"),
    ],
)
def test_parseNameserverErrors(text: str, fragment: str) -> None:
    """Bad name servers raise ValueError naming the value."""
    with pytest.raises(ValueError) as e:
        parseNameserver(text)
    assert f'"{text}" is not a valid name server' in str(e.value)
    assert fragment in str(e.value)


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("*", "*"),
        ("Example.ORG.", "example.org"),
        (".BÜCHER.example", ".xn--bcher-kva.example"),
        ("[192.0.2.1]", "[192.0.2.1]"),
        ("[IPv6:2001:DB8::1]", "[IPv6:2001:db8::1]"),
    ],
)
def test_parseRouteDomain(text: str, expected: str) -> None:
    assert parseRouteDomain(text) == expected


@pytest.mark.parametrize(
    ("text", "fragment"),
    [
        ("", "missing domain"),
        (".", "missing domain"),
        ("exa mple.org", "invalid character ' ' in domain"),
        ("a..b", "empty label"),
        (".[192.0.2.1]", "an address literal has no subdomains"),
    ],
)
def test_parseRouteDomainErrors(text: str, fragment: str) -> None:
    with pytest.raises(ValueError) as e:
        parseRouteDomain(text)
    assert f'"{text}" is not a valid domain: ' in str(e.value)
    assert fragment in str(e.value)
    assert str(e.value).endswith('or "*" for every domain)')


@pytest.mark.parametrize(
    "text",
    ["/var/mail", "/var/mail/{domain}/{local}", "{address}", "rel/{local}", "/m/{local",
     "/m/}{", "/m/{{local}}", "/m/{a/b}"],
)
def test_checkMaildirTemplate(text: str) -> None:
    """Templates with the placeholders, or none, pass; lone braces are kept as they are."""
    checkMaildirTemplate(text)


@pytest.mark.parametrize(
    ("text", "fragment"),
    [
        ("", "empty string"),
        ("/m/{user}", 'unknown placeholder "{user}"'),
        ("/m/{Local}", 'unknown placeholder "{Local}"'),
        ("/m/{}", 'unknown placeholder "{}"'),
        ("/m/{0}", 'unknown placeholder "{0}"'),
        ("/m/{local!r}", 'unknown placeholder "{local!r}"'),
        ("/m/{domain:>9}", 'unknown placeholder "{domain:>9}"'),
        ("/m/{local}/{{x}}", 'unknown placeholder "{x}"'),
    ],
)
def test_checkMaildirTemplateErrors(text: str, fragment: str) -> None:
    """Placeholders other than the three are refused as likely mistakes."""
    with pytest.raises(ValueError) as e:
        checkMaildirTemplate(text)
    assert fragment in str(e.value)


def test_table_checks_each_nexthop_with_its_backends_parser() -> None:
    with pytest.raises(ValueError, match="is not a valid LMTP server: the port is missing"):
        RoutingTable([RouteRule("example.org", "lmtp", "store.example")])
    with pytest.raises(ValueError, match='unknown placeholder "{user}"'):
        RoutingTable([RouteRule("example.org", "maildir", "/var/mail/{user}")])
    with pytest.raises(ValueError, match="is not a valid smarthost"):
        RoutingTable(smarthost="[relay.example]:0")
    table = RoutingTable([RouteRule("example.org", "webhook", "anything: goes")])
    assert routeOf(table, "a@example.org") == Route("webhook", "anything: goes")


def test_make_resolver() -> None:
    from twisted.names import client

    r = makeResolver(["127.0.0.1:5353", "[::1]:53", "10.0.0.1", ("192.0.2.53", 5300)])
    assert isinstance(r, client.Resolver)
    assert r.servers == [("127.0.0.1", 5353), ("::1", 53), ("10.0.0.1", 53), ("192.0.2.53", 5300)]


def test_the_system_resolver_runs_on_the_reactor_it_is_given() -> None:
    """The system's resolver (no name servers configured) re-reads resolv.conf every minute
    and caches: on the relay's reactor, not the global one.  Relays built in a test process
    on a memory reactor left those timers on the global reactor, for ever, and a trial test
    running when one fired failed with an unclean reactor."""
    from twisted.internet import reactor as globalReactor
    from twisted.internet.task import Clock

    before = set(globalReactor.getDelayedCalls())
    clock = Clock()
    r = makeResolver(None, reactor=clock)
    assert set(globalReactor.getDelayedCalls()) == before
    assert [c.func.__name__ for c in clock.getDelayedCalls()] == ["maybeParseConfig"]
    cacheResolver, dnsResolver = r.resolvers
    assert (cacheResolver._reactor, dnsResolver._reactor) == (clock, clock)
    assert dnsResolver.resolv == b"/etc/resolv.conf"


def test_the_system_resolver_does_not_read_the_hosts_file() -> None:
    """Without C{[dns] nameservers}, an MX host's (or C{[host]}'s) addresses are asked of
    the DNS, not C{/etc/hosts} first: Postfix's default C{smtp_host_lookup = dns} (only
    C{native}, nsswitch.conf, reads the hosts file), and what the relay does with name
    servers named.  "localhost", in every hosts file, is asked of the name servers."""
    clock = Clock()
    r = makeResolver(None, reactor=clock)
    asked: list[bytes] = []

    def query(server: Any, queries: Any, timeout: Any) -> defer.Deferred:
        asked.append(queries[0].name.name)
        return defer.succeed(dns.Message(rCode=dns.ENAME, answer=1))

    r.resolvers[-1]._query = query
    f = failureOf(MXResolver(r, clock), "[localhost]")
    assert (f.permanent, f.code) == (False, "4.4.4")
    assert b"localhost" in asked


class AnsweringResolver:
    """makeResolver's resolver whose name servers answer from C{answers}: server -> a list of
    answer codes (C{None}: no answer, a time-out; C{"TC"}: a truncated answer), one per query
    it is sent, in turn; over TCP, the servers of C{tcp} answer theirs, the others refuse
    the connection."""

    def __new__(cls, answers: dict[tuple[str, int], list[Any]],
                tcp: dict[tuple[str, int], int] | None = None) -> Any:
        resolver = makeResolver(list(answers), reactor=Clock())
        asked: list[tuple[Any, ...]] = []

        def query(server: tuple[str, int], queries: Any, timeout: float) -> defer.Deferred:
            asked.append((server, timeout))
            code = answers[server].pop(0)
            if code is None:
                return defer.fail(error.DNSQueryTimeoutError(0))
            if code == "TC":
                return defer.succeed(dns.Message(rCode=dns.OK, answer=1, trunc=1))
            return defer.succeed(dns.Message(rCode=code, answer=1))

        async def queryOverTCP(server: tuple[str, int], queries: Any) -> dns.Message:
            asked.append((server, "tcp"))
            if server not in (tcp or {}):
                raise ConnectionRefusedError("refused")
            return dns.Message(rCode=(tcp or {})[server], answer=1)

        resolver._query = query
        resolver._queryOverTCP = queryOverTCP
        resolver.asked = asked
        return resolver


def test_resolver_asks_the_next_name_server_after_a_failing_answer() -> None:
    """SERVFAIL, NOTIMP and REFUSED send the query to the next name server, as the C
    library's res_send does; an answer (NXDOMAIN too) ends it; time-outs go round the servers
    with each time-out in turn; when every server failed, the last failing answer stands."""
    one, two, three = ("192.0.2.1", 53), ("192.0.2.2", 53), ("192.0.2.3", 5353)

    def ask(answers: dict[tuple[str, int], list[int | None]]) -> tuple[Any, list]:
        resolver = AnsweringResolver(answers)
        result = fired(resolver.queryUDP([dns.Query(b"example.org", dns.MX)], (1, 3)))
        return result, resolver.asked

    for code in (dns.ESERVER, dns.ENOTIMP, dns.EREFUSED):
        result, asked = ask({one: [code], two: [dns.OK], three: []})
        assert (result.rCode, asked) == (dns.OK, [(one, 1), (two, 1)])
    result, asked = ask({one: [dns.ENAME], two: [], three: []})
    assert (result.rCode, asked) == (dns.ENAME, [(one, 1)])
    result, asked = ask({one: [None, dns.OK], two: [dns.EREFUSED], three: [None]})
    assert (result.rCode, asked) == (dns.OK, [(one, 1), (two, 1), (three, 1), (one, 3)])
    result, asked = ask({one: [dns.ESERVER], two: [dns.EREFUSED], three: [dns.ENOTIMP]})
    assert (result.rCode, asked) == (dns.ENOTIMP, [(one, 1), (two, 1), (three, 1)])
    result, asked = ask({one: [dns.ESERVER], two: [None, None], three: [None, None]})
    assert (result.rCode, [server for server, _ in asked]) == (
        dns.ESERVER, [one, two, three, two, three])
    failure = fired(AnsweringResolver({one: [None, None]}).queryUDP([], (1, 3)))
    assert isinstance(failure, Failure) and failure.check(defer.TimeoutError), failure


def test_resolver_asks_a_truncated_answer_again_over_tcp_of_the_same_server() -> None:
    """TC: the same server over TCP (as res_send; Twisted asked the next server of its
    round); when that fails, the next server is asked."""
    one, two = ("192.0.2.1", 53), ("192.0.2.2", 53)
    resolver = AnsweringResolver({one: ["TC"], two: []}, tcp={one: dns.OK, two: dns.OK})
    result = fired(resolver.queryUDP([dns.Query(b"example.org", dns.MX)], (1, 3)))
    assert (result.rCode, result.trunc, resolver.asked) == (
        dns.OK, 0, [(one, 1), (one, "tcp")])
    resolver = AnsweringResolver({one: ["TC"], two: [dns.OK]})
    result = fired(resolver.queryUDP([dns.Query(b"example.org", dns.MX)], (1, 3)))
    assert (result.rCode, resolver.asked) == (dns.OK, [(one, 1), (one, "tcp"), (two, 1)])
    resolver = AnsweringResolver({one: ["TC"], two: ["TC"]}, tcp={two: dns.ENAME})
    result = fired(resolver.queryUDP([dns.Query(b"example.org", dns.MX)], (1, 3)))
    assert result.rCode == dns.ENAME
    failure = fired(AnsweringResolver({one: ["TC"], two: [None, None]}).queryUDP([], (1, 3)))
    assert isinstance(failure, Failure) and failure.check(ConnectionRefusedError), failure


class UDPReactor(Clock):
    """A clock whose C{listenUDP} connects the protocol (kept in C{protocols}) to a
    transport that keeps what it is told to send, as C{(datagram, address)}, in C{sent}."""

    def __init__(self) -> None:
        super().__init__()
        self.sent: list[tuple[bytes, Any]] = []
        self.protocols: list[Any] = []

    def listenUDP(self, port: int, protocol: Any, interface: str = "",
                  maxPacketSize: int = 8192) -> Any:
        sent = self.sent
        transport = SimpleNamespace(write=lambda data, address: sent.append((data, address)),
                                    stopListening=lambda: None)
        self.protocols.append(protocol)
        protocol.makeConnection(transport)
        return transport


def test_an_answer_truncated_over_tcp_too_is_taken_as_it_is() -> None:
    """An answer that says it is truncated over TCP too (a server that sets TC there, an
    answer beyond 64 KiB) is taken as it is, as the C library's resolver returns it and
    Postfix's dns_query() uses it.  Twisted's filterAnswers() asked again over TCP for
    each such answer, of whichever server came next, until the lookup's time-out: the
    mail was deferred ("DNS time-out") however often it was tried."""
    one = ("192.0.2.1", 53)
    resolver = AnsweringResolver({one: ["TC"]}, tcp={one: dns.OK})
    rr = dns.RRHeader(b"example.org", dns.MX, payload=dns.Record_MX(10, b"mx.example.org"))

    async def queryOverTCP(server: tuple[str, int], queries: Any) -> dns.Message:
        resolver.asked.append((server, "tcp"))
        message = dns.Message(rCode=dns.OK, answer=1, trunc=1)
        message.queries, message.answers = list(queries), [rr]
        return message

    resolver._queryOverTCP = queryOverTCP
    answers, _, _ = fired(resolver.lookupMailExchange("example.org"))
    assert ([a.payload.name.name for a in answers], resolver.asked) == (
        [b"mx.example.org"], [(one, 1), (one, "tcp")])


def test_an_answer_to_another_question_is_ignored() -> None:
    """A UDP answer whose question section is not the query's (right ID, right server) is
    not an answer to it (RFC 5452 section 9.1; the C library's res_send checks it with
    res_queriesmatch() and waits on): it is dropped, and the right one still counts.
    Twisted matched on the ID alone, and a name server answering another question (a
    forgery, a broken server or middlebox) had its records taken for the name asked."""
    from mailrelay.route.mx import _Resolver

    server = ("192.0.2.1", 53)
    reactor = UDPReactor()
    resolver = _Resolver(servers=[server], reactor=reactor)
    d = resolver.queryUDP([dns.Query(b"example.org", dns.MX)], (5,))
    ((data, address),) = reactor.sent
    asked = dns.Message()
    asked.fromStr(data)
    (protocol,) = reactor.protocols
    assert address == server

    def answer(name: bytes, exchange: bytes, qtype: int = dns.MX) -> bytes:
        reply = dns.Message(id=asked.id, answer=1)
        reply.queries = [dns.Query(name, qtype)]
        reply.answers = [dns.RRHeader(name, dns.MX, payload=dns.Record_MX(10, exchange))]
        return reply.toStr()

    with capturedLogs() as events:
        protocol.datagramReceived(answer(b"other.example", b"mx.other.example"), server)
        protocol.datagramReceived(answer(b"example.org", b"mx.other.example", dns.A), server)
    assert not d.called
    assert any("not the question asked" in formatEvent(e) for e in events), events
    protocol.datagramReceived(answer(b"EXAMPLE.org", b"mx.example.org"), server)
    result = fired(d)
    assert [rr.payload.name.name for rr in result.answers] == [b"mx.example.org"]


def test_a_message_that_is_no_answer_is_ignored() -> None:
    """A message that is not an answer (its QR bit clear: RFC 1035 section 4.1.1), such as
    the query itself sent back by an echo or a loop, is dropped; Twisted took it for an
    answer holding no record -- no MX, no address: the mail bounced (5.4.4)."""
    from mailrelay.route.mx import _Resolver

    server = ("192.0.2.1", 53)
    reactor = UDPReactor()
    resolver = _Resolver(servers=[server], reactor=reactor)
    d = resolver.queryUDP([dns.Query(b"example.org", dns.MX)], (5,))
    ((data, _),) = reactor.sent
    (protocol,) = reactor.protocols
    with capturedLogs() as events:
        protocol.datagramReceived(data, server)
    assert not d.called
    assert any("not an answer" in formatEvent(e) for e in events), events
    reply = dns.Message()
    reply.fromStr(data)
    reply.answer = 1
    protocol.datagramReceived(reply.toStr(), server)
    assert fired(d).answer == 1


def test_an_answer_over_tcp_to_another_question_is_not_taken() -> None:
    """Over TCP too (after a truncated answer), an answer to another question is not the
    answer: the lookup over TCP fails (the next name server is then asked)."""
    import struct

    from twisted.internet.testing import MemoryReactorClock, StringTransport

    from mailrelay.route.mx import _Resolver

    server = ("192.0.2.1", 53)
    reactor = MemoryReactorClock()
    resolver = _Resolver(servers=[server], reactor=reactor)

    def ask(name: bytes, answer: int = 1) -> Any:
        d = defer.Deferred.fromCoroutine(
            resolver._queryOverTCP(server, [dns.Query(b"example.org", dns.MX)]))
        factory = reactor.tcpClients.pop()[2]
        protocol = factory.buildProtocol(None)
        transport = StringTransport()
        protocol.makeConnection(transport)
        asked = dns.Message()
        asked.fromStr(transport.value()[2:])
        reply = dns.Message(id=asked.id, answer=answer)
        reply.queries = [dns.Query(name, dns.MX)]
        data = reply.toStr()
        protocol.dataReceived(struct.pack("!H", len(data)) + data)
        return fired(d)

    failure = ask(b"other.example")
    assert isinstance(failure, Failure) and failure.check(error.DNSFormatError), failure
    assert "not to the question asked" in failure.getErrorMessage()
    failure = ask(b"example.org", answer=0)  # (no answer: the query sent back)
    assert isinstance(failure, Failure) and failure.check(error.DNSFormatError), failure
    assert ask(b"Example.ORG").answer == 1


def test_the_system_resolver_honours_the_options_of_resolv_conf(tmp_path) -> None:
    """/etc/resolv.conf's C{options timeout:n attempts:n rotate} are honoured, as the C
    library's resolver honours them for Postfix: each server is given C{timeout} seconds,
    C{attempts} rounds, and with C{rotate} each query starts at the next server.  Twisted
    read only the C{nameserver} lines: an admin's C{timeout:1 attempts:1} for a quick
    failover was 1, 3, 11 and 45 seconds of each server.  A change of the file is
    followed; without options, Twisted's time-outs stand."""
    from mailrelay.route.mx import _Resolver

    one, two = ("192.0.2.1", 53), ("192.0.2.2", 53)
    conf = tmp_path / "resolv.conf"
    conf.write_text("nameserver 192.0.2.1\nnameserver 192.0.2.2\nsearch example.net\n"
                    "options ndots:3 timeout:2 attempts:3\noptions rotate\n")
    resolver = _Resolver(str(conf).encode(), reactor=Clock())
    asked: list[tuple[Any, float]] = []

    def query(server: tuple[str, int], queries: Any, timeout: float) -> defer.Deferred:
        asked.append((server, timeout))
        if server == two:
            return defer.succeed(dns.Message(rCode=dns.OK, answer=1))
        return defer.fail(error.DNSQueryTimeoutError(0))

    resolver._query = query
    assert resolver.timeout == (2, 2, 2)
    for _ in range(3):
        assert fired(resolver.queryUDP([dns.Query(b"example.org", dns.MX)])).rCode == dns.OK
    assert asked == [(one, 2), (two, 2), (two, 2), (one, 2), (two, 2)]
    conf.write_text("nameserver 192.0.2.1\noptions timeout:99 attempts:0\n")
    resolver.parseConfig(conf.open("rb"))
    assert resolver.timeout == (30,)  # (the C library's bounds: 30 seconds, 1 to 5 rounds)
    conf.write_text("nameserver 192.0.2.1\n")
    resolver.parseConfig(conf.open("rb"))
    assert resolver.timeout == (1, 3, 11, 45)


# ---------------------------------------------------------------------------------------------
# MXResolver with a fake IResolver


class FakeResolver:
    """An C{IResolver} answering from a dict: name -> list of records, or an exception."""

    def __init__(self, records: dict[str, Any]) -> None:
        self.records = records
        self.queries: list[tuple[str, str]] = []
        self.held: dict[tuple[str, str], defer.Deferred] = {}

    def _answer(self, name: str, rtype: int, kind: str) -> defer.Deferred:
        self.queries.append((kind, name))
        entry = self.records.get((name, kind), self.records.get(name))
        if entry == "hold":
            d: defer.Deferred = defer.Deferred()
            self.held[(kind, name)] = d
            return d
        if isinstance(entry, Exception):
            return defer.fail(entry)
        if entry is None:
            return defer.fail(error.DNSNameError(name))
        answers = [
            dns.RRHeader(name=name, type=rec.TYPE, payload=rec)
            for rec in entry
            if rec.TYPE == rtype
        ] or [  # an alias: its CNAME only, as a server that does not recurse answers
            dns.RRHeader(name=name, type=rec.TYPE, payload=rec)
            for rec in entry
            if rec.TYPE == dns.CNAME
        ]
        return defer.succeed((answers, [], []))

    def lookupMailExchange(self, name: str, timeout: Any = None) -> defer.Deferred:
        return self._answer(name, dns.MX, "MX")

    def lookupAddress(self, name: str, timeout: Any = None) -> defer.Deferred:
        return self._answer(name, dns.A, "A")

    def lookupIPV6Address(self, name: str, timeout: Any = None) -> defer.Deferred:
        return self._answer(name, dns.AAAA, "AAAA")


def MX(pref: int, name: str) -> dns.Record_MX:
    return dns.Record_MX(pref, name.encode())


def A(address: str) -> dns.Record_A:
    return dns.Record_A(address)


def AAAA(address: str) -> dns.Record_AAAA:
    return dns.Record_AAAA(address)


def CNAME(name: str) -> dns.Record_CNAME:
    return dns.Record_CNAME(name.encode())


def resolveNow(resolver: MXResolver, nexthop: str) -> Any:
    """The result (or raised DeliveryFailure) of a resolution that completes synchronously."""
    out: list[Any] = []
    resolver.resolve(nexthop).addBoth(out.append)
    assert out, "resolution did not complete"
    result = out[0]
    if isinstance(result, Failure):
        result.raiseException()
    return result


def failureOf(resolver: MXResolver, nexthop: str) -> DeliveryFailure:
    with pytest.raises(DeliveryFailure) as e:
        resolveNow(resolver, nexthop)
    return e.value


ZONE: dict[str, Any] = {
    "example.org": [MX(20, "mx2.example.org."), MX(10, "mx1.example.org.")],
    "mx1.example.org": [A("192.0.2.1"), AAAA("2001:db8::1")],
    "mx2.example.org": [A("192.0.2.2")],
    "plain.example": [A("192.0.2.9")],
    "v6only.example": [AAAA("2001:db8::9")],
    "nullmx.example": [MX(0, ".")],
    "mixednull.example": [MX(10, "mx1.example.org."), MX(0, ".")],
    "broken.example": error.DNSServerError("SERVFAIL"),
    "refused.example": error.DNSQueryRefusedError("REFUSED"),
    "lame.example": [MX(10, "gone.example"), MX(20, "mx2.example.org")],
    "allgone.example": [MX(10, "gone.example"), MX(20, "gone2.example")],
    "noaddr.example": [MX(10, "empty.example")],
    "empty.example": [],
    "ipmx.example": [MX(10, "192.0.2.77")],
    "flaky.example": [MX(10, "flakymx.example")],
    "flakymx.example": error.DNSServerError("SERVFAIL"),
    "slow.example": "hold",
}


def makeMX(
    zone: dict[str, Any] = ZONE, seed: int = 1, **kw: Any
) -> tuple[MXResolver, FakeResolver, Clock]:
    fake = FakeResolver(zone)
    clock = Clock()
    return MXResolver(fake, clock, timeout=5, random=random.Random(seed), **kw), fake, clock


def test_mx_preference_order_and_addresses() -> None:
    resolver, fake, _ = makeMX()
    hosts = resolveNow(resolver, "example.org")
    assert hosts == [
        MXHost("mx1.example.org", "192.0.2.1", 25, 10),
        MXHost("mx1.example.org", "2001:db8::1", 25, 10),
        MXHost("mx2.example.org", "192.0.2.2", 25, 20),
    ]
    assert hosts[1].family == 6


def test_mx_port_and_families() -> None:
    resolver, _, _ = makeMX(families=(6, 4))
    hosts = resolveNow(resolver, "example.org:2525")
    assert [(h.address, h.port) for h in hosts] == [
        ("2001:db8::1", 2525),
        ("192.0.2.1", 2525),
        ("192.0.2.2", 2525),
    ]
    resolver, fake, _ = makeMX(families=(4,))
    hosts = resolveNow(resolver, "example.org")
    assert [h.address for h in hosts] == ["192.0.2.1", "192.0.2.2"]
    assert ("AAAA", "mx1.example.org") not in fake.queries


def test_equal_preferences_are_shuffled() -> None:
    zone = dict(ZONE)
    zone["many.example"] = [MX(10, f"mx{i}.many.example") for i in range(6)] + [
        MX(5, "first.many.example")
    ]
    for i in range(6):
        zone[f"mx{i}.many.example"] = [A(f"192.0.2.{10 + i}")]
    zone["first.many.example"] = [A("192.0.2.5")]
    orders = set()
    for seed in range(10):
        resolver, _, _ = makeMX(zone, seed=seed, maxAddresses=0)
        hosts = resolveNow(resolver, "many.example")
        assert hosts[0].name == "first.many.example"
        assert sorted(h.name for h in hosts[1:]) == [f"mx{i}.many.example" for i in range(6)]
        orders.add(tuple(h.name for h in hosts))
    assert len(orders) > 1
    # The same seed gives the same order.
    a = resolveNow(makeMX(zone, seed=3)[0], "many.example")
    b = resolveNow(makeMX(zone, seed=3)[0], "many.example")
    assert a == b


def test_no_mx_falls_back_to_addresses() -> None:
    resolver, fake, _ = makeMX()
    assert resolveNow(resolver, "plain.example") == [MXHost("plain.example", "192.0.2.9", 25)]
    assert resolveNow(resolver, "v6only.example") == [MXHost("v6only.example", "2001:db8::9", 25)]


def test_null_mx() -> None:
    resolver, _, _ = makeMX()
    f = failureOf(resolver, "nullmx.example")
    assert isinstance(f, PermanentFailure)
    assert (f.permanent, f.code) == (True, "5.1.10")
    assert f.diagnostic == "X-mailrelay; domain nullmx.example does not accept mail (null MX)"


def test_null_mx_among_other_mx_records() -> None:
    # Postfix's dns_lookup() returns DNS_NULLMX for any null MX in the answer (RFC 7505
    # section 3: a null MX is published alone; one beside real MX hosts still says "no mail").
    resolver, fake, _ = makeMX()
    f = failureOf(resolver, "mixednull.example")
    assert (f.permanent, f.code) == (True, "5.1.10")
    assert f.diagnostic == "X-mailrelay; domain mixednull.example does not accept mail (null MX)"
    assert ("A", "mx1.example.org") not in fake.queries


def test_nxdomain() -> None:
    resolver, _, _ = makeMX()
    f = failureOf(resolver, "nowhere.example")
    assert (f.permanent, f.code) == (True, "5.1.2")
    assert f.diagnostic == "X-mailrelay; domain nowhere.example does not exist"


def test_servfail_and_refused_are_transient() -> None:
    resolver, _, _ = makeMX()
    f = failureOf(resolver, "broken.example")
    assert isinstance(f, TransientFailure)
    assert (f.permanent, f.code) == (False, "4.4.3")
    assert "SERVFAIL" in f.diagnostic
    f = failureOf(resolver, "refused.example")
    assert (f.permanent, f.code) == (False, "4.4.3")
    assert "REFUSED" in f.diagnostic


def test_timeout_is_transient() -> None:
    resolver, fake, clock = makeMX()
    out: list[Any] = []
    resolver.resolve("slow.example").addBoth(out.append)
    assert out == []
    clock.advance(4.9)
    assert out == []
    clock.advance(0.2)
    assert len(out) == 1
    f = out[0].value
    assert isinstance(f, DeliveryFailure)
    assert (f.permanent, f.code) == (False, "4.4.3")
    assert "time-out" in f.diagnostic


def test_mx_hosts_without_address_are_skipped() -> None:
    resolver, _, _ = makeMX()
    hosts = resolveNow(resolver, "lame.example")
    assert hosts == [MXHost("mx2.example.org", "192.0.2.2", 25, 20)]
    # Every MX host without an address, by final answers (NXDOMAIN, no record): the
    # domain cannot get mail, bounced 5.4.4 as Postfix does ('Host or domain name not
    # found'); it was deferred for the queue's lifetime (found by a bug hunt).
    f = failureOf(resolver, "allgone.example")
    assert (f.permanent, f.code) == (True, "5.4.4")
    assert "gone.example" in f.diagnostic
    f = failureOf(resolver, "noaddr.example")
    assert (f.permanent, f.code) == (True, "5.4.4")
    # A DNS error among them: maybe later (4.4.3).
    f = failureOf(resolver, "flaky.example")
    assert (f.permanent, f.code) == (False, "4.4.3")


#: MX records whose exchange is not a host name (RFC 1035 2.3.1, with "_" as Postfix allows):
#: what a broken or hostile DNS server can answer, each with an address should it be asked.
MALFORMED_MX_NAMES = [
    b"mx\r\nX-Injected: 1.example",  # would end a DSN's Remote-MTA field
    b"bad name.example",
    b"fe80::1%\r\nX-Injected: 1",  # an IPv6 address with a "zone" (any octets), then CR LF
    b"fe80::1%eth0",  # a zone: a link of the relay's own host
    b"192.0.2.9...",  # an address with dots after it
    b"..",
    "mx\u00e9.example".encode(),  # not ASCII (an IDN is sent as xn--...)
    b"empty..label.example",
    b"-hyphen.example",
    b"hyphen-.example",
    b"a" * 64 + b".example",  # a label over 63 octets
    (b"a" * 60 + b".") * 5 + b"example",  # a name over 253 octets
    b"mx@example.org",
]


def _malformedZone() -> dict[str, Any]:
    zone = dict(ZONE)
    zone["mixed.example"] = [dns.Record_MX(5, n) for n in MALFORMED_MX_NAMES] + [
        MX(50, "mx2.example.org")
    ]
    zone["onlybad.example"] = [dns.Record_MX(10, n) for n in MALFORMED_MX_NAMES]
    for n in MALFORMED_MX_NAMES:
        zone[n.decode("utf-8", "replace").lower()] = [A("192.0.2.66")]
    return zone


def test_malformed_mx_names_are_skipped() -> None:
    """As Postfix does ("malformed domain name in resource data of MX record for ..."): an
    MX record whose exchange is not a host name is skipped with a warning showing the name
    quoted, its control characters escaped, and what is wrong with it; its name is never
    looked up, used for TLS or written into a DSN."""
    resolver, fake, _ = makeMX(_malformedZone())
    with capturedLogs() as events:
        hosts = resolveNow(resolver, "mixed.example")
    assert hosts == [MXHost("mx2.example.org", "192.0.2.2", 25, 50)]
    assert [q for q in fake.queries if q[0] != "MX"] == [
        ("A", "mx2.example.org"),
        ("AAAA", "mx2.example.org"),
    ]
    warnings = [formatEvent(e) for e in events if e["log_level"] == LogLevel.warn]
    assert len(warnings) == len(MALFORMED_MX_NAMES)
    assert all(
        w.startswith("malformed domain name in resource data of MX record for mixed.example: ")
        for w in warnings
    )
    assert ': "mx\\r\\nX-Injected: 1.example" (label ' in warnings[0]
    assert ': "mx\u00e9.example" (not ASCII: ' in warnings[6]
    assert ': "bad name.example" (label "bad name" may hold only letters' in warnings[1]
    assert ': "fe80::1%\\r\\nX-Injected: 1" (' in warnings[2]
    assert not any("\r" in w or "\n" in w for w in warnings)


def test_only_malformed_mx_names() -> None:
    """Every MX record malformed: a permanent failure (Postfix: 5.4.4), not an exception
    (a name not in ASCII raised UnicodeDecodeError) nor an address lookup of the domain."""
    resolver, fake, _ = makeMX(_malformedZone())
    f = failureOf(resolver, "onlybad.example")
    assert isinstance(f, PermanentFailure)
    assert (f.permanent, f.code) == (True, "5.4.4")
    assert f.diagnostic == (
        "X-mailrelay; malformed domain name in resource data of MX record for onlybad.example"
    )
    assert [q for q in fake.queries if q[0] != "MX"] == []


def test_mx_exchange_with_underscore() -> None:
    """An underscore in an exchange's name is taken, as Postfix's valid_hostname does."""
    zone = dict(ZONE)
    zone["under.example"] = [MX(10, "mx_1.under.example.")]
    zone["mx_1.under.example"] = [A("192.0.2.44")]
    resolver, _, _ = makeMX(zone)
    hosts = resolveNow(resolver, "under.example")
    assert hosts == [MXHost("mx_1.under.example", "192.0.2.44", 25, 10)]


def test_mx_exchange_written_as_ip() -> None:
    resolver, _, _ = makeMX()
    assert resolveNow(resolver, "ipmx.example") == [MXHost("192.0.2.77", "192.0.2.77", 25, 10)]


def test_bracketed_hosts_and_literals() -> None:
    resolver, fake, _ = makeMX()
    assert resolveNow(resolver, "[mx1.example.org]:587") == [
        MXHost("mx1.example.org", "192.0.2.1", 587),
        MXHost("mx1.example.org", "2001:db8::1", 587),
    ]
    assert ("MX", "mx1.example.org") not in fake.queries
    assert resolveNow(resolver, "[192.0.2.1]") == [MXHost("192.0.2.1", "192.0.2.1", 25)]
    assert resolveNow(resolver, "[IPv6:2001:DB8::1]") == [MXHost("2001:db8::1", "2001:db8::1", 25)]
    assert resolveNow(resolver, "[2001:db8::1]:2525") == [
        MXHost("2001:db8::1", "2001:db8::1", 2525)
    ]
    assert resolveNow(resolver, "192.0.2.3:26") == [MXHost("192.0.2.3", "192.0.2.3", 26)]
    # A bracketed host that does not exist: the operator's mistake, deferred.
    f = failureOf(resolver, "[nowhere.example]")
    assert (f.permanent, f.code) == (False, "4.4.4")
    f = failureOf(resolver, "[x")
    assert not f.permanent


def test_a_cname_in_an_answer_is_followed() -> None:
    """An answer that holds only a CNAME for the name asked (a name server that does not
    recurse, the alias's target elsewhere) is followed as a resolver follows it: the
    target is asked for the same type (RFC 1034 section 3.6.2; RFC 5321 section 5.1: "the
    resulting name is processed as if it were the initial name"), ten times at most, as
    Postfix's dns_lookup().  The relay took the answer as holding no record: an aliased
    MX host had no address, an aliased domain no MX."""
    zone = dict(ZONE)
    zone["alias.example"] = [CNAME("real.example.")]
    zone["real.example"] = [MX(10, "mxalias.real.example.")]
    zone["mxalias.real.example"] = [CNAME("mx.elsewhere.example.")]
    zone["mx.elsewhere.example"] = [A("192.0.2.50"), AAAA("2001:db8::50")]
    zone["hostalias.example"] = [CNAME("mx.elsewhere.example")]
    zone["loop1.example"] = [CNAME("loop2.example.")]
    zone["loop2.example"] = [CNAME("loop1.example.")]
    resolver, fake, _ = makeMX(zone)
    assert resolveNow(resolver, "alias.example") == [  # (the alias's end kept: for DANE)
        MXHost("mxalias.real.example", "192.0.2.50", 25, 10, expanded="mx.elsewhere.example"),
        MXHost("mxalias.real.example", "2001:db8::50", 25, 10,
               expanded="mx.elsewhere.example"),
    ]
    assert ("MX", "real.example") in fake.queries
    assert ("A", "mx.elsewhere.example") in fake.queries
    assert resolveNow(resolver, "[hostalias.example]:587") == [
        MXHost("hostalias.example", "192.0.2.50", 587, expanded="mx.elsewhere.example"),
        MXHost("hostalias.example", "2001:db8::50", 587, expanded="mx.elsewhere.example"),
    ]
    fake.queries.clear()
    f = failureOf(resolver, "[loop1.example]")
    assert (f.permanent, f.code) == (False, "4.4.4")
    assert len(fake.queries) == 20  # (ten A and ten AAAA, then given up)


def test_max_addresses() -> None:
    resolver, _, _ = makeMX(maxAddresses=2)
    assert len(resolveNow(resolver, "example.org")) == 2


def test_max_addresses_defaults_to_postfixs_mx_address_limit() -> None:
    """At most five addresses by default, Postfix's smtp_mx_address_limit: ten dead MX hosts
    would each take a connect or greeting time-out; 0 is no limit."""
    zone: dict[str, Any] = {"ten.example": [MX(n, f"mx{n}.ten.example") for n in range(10)]}
    for n in range(10):
        zone[f"mx{n}.ten.example"] = [A(f"192.0.2.{n + 1}")]
    resolver, _, _ = makeMX(zone)
    assert [h.address for h in resolveNow(resolver, "ten.example")] == [
        f"192.0.2.{n + 1}" for n in range(5)]
    resolver, _, _ = makeMX(zone, maxAddresses=0)
    assert len(resolveNow(resolver, "ten.example")) == 10


def test_max_addresses_keeps_both_families() -> None:
    """When the addresses are cut to maxAddresses and both families are in use, neither
    crowds the other out (Postfix's smtp_balance_inet_protocols, yes by default,
    smtp_balance_inet_proto() in smtp_addr.c): a family with at most half the limit keeps
    all its addresses, the other the rest; both with more, half each (the extra one of an
    odd limit to the first address's family); the order is kept."""
    zone: dict[str, Any] = {"six.example": [MX(n, f"mx{n}.six.example") for n in range(6)]}
    for n in range(6):
        zone[f"mx{n}.six.example"] = [AAAA(f"2001:db8::{n + 1}")]
    zone["mx5.six.example"] = [A("192.0.2.5"), AAAA("2001:db8::6")]
    resolver, _, _ = makeMX(zone, maxAddresses=5)
    assert [h.address for h in resolveNow(resolver, "six.example")] == [
        "2001:db8::1", "2001:db8::2", "2001:db8::3", "2001:db8::4", "192.0.2.5"]
    # Both families with more than half the limit: 3 of the first address's, 2 of the other.
    both: dict[str, Any] = {"both.example": [MX(n, f"mx{n}.both.example") for n in range(6)]}
    for n in range(6):
        both[f"mx{n}.both.example"] = [A(f"192.0.2.{n + 1}"), AAAA(f"2001:db8::{n + 1}")]
    resolver, _, _ = makeMX(both, maxAddresses=5)
    assert [h.address for h in resolveNow(resolver, "both.example")] == [
        "192.0.2.1", "2001:db8::1", "192.0.2.2", "2001:db8::2", "192.0.2.3"]
    resolver, _, _ = makeMX(both, maxAddresses=5, families=(6, 4))
    assert [h.address for h in resolveNow(resolver, "both.example")] == [
        "2001:db8::1", "192.0.2.1", "2001:db8::2", "192.0.2.2", "2001:db8::3"]
    # Beyond the first ten hosts looked up (a batch): the lookups go on for the other family.
    far: dict[str, Any] = {"far.example": [MX(n, f"mx{n}.far.example") for n in range(30)]}
    for n in range(30):
        far[f"mx{n}.far.example"] = [AAAA(f"2001:db8::{n + 1}")]
    far["mx25.far.example"] = [A("192.0.2.25")]
    resolver, fake, _ = makeMX(far, maxAddresses=5)
    assert [h.address for h in resolveNow(resolver, "far.example")] == [
        "2001:db8::1", "2001:db8::2", "2001:db8::3", "2001:db8::4", "192.0.2.25"]
    # A domain of hosts of one family: the limit alone, as before.
    resolver, _, _ = makeMX(far, maxAddresses=3)
    far["mx25.far.example"] = [AAAA("2001:db8::26")]
    assert [h.address for h in resolveNow(resolver, "far.example")] == [
        "2001:db8::1", "2001:db8::2", "2001:db8::3"]
    # The domain's own addresses (no MX) and a bracketed host are balanced too.
    resolver, _, _ = makeMX({"self.example": [AAAA("2001:db8::1"), AAAA("2001:db8::2"),
                                               A("192.0.2.1")]}, maxAddresses=2,
                              families=(6, 4))
    assert [h.address for h in resolveNow(resolver, "self.example")] == [
        "2001:db8::1", "192.0.2.1"]
    assert [h.address for h in resolveNow(resolver, "[self.example]")] == [
        "2001:db8::1", "192.0.2.1"]


def test_mx_hosts_are_looked_up_only_as_far_as_needed() -> None:
    """A domain of hundreds of MX records (what anyone's DNS may answer, to a message any
    client may send) does not make the relay ask for all their addresses at once -- a UDP
    socket each, 800 descriptors for 400 MX hosts: the hosts are looked up ten at a time,
    in preference order, until maxAddresses addresses are known (more than half of each
    family looked up: see test_max_addresses_keeps_both_families), and at most the first
    100 hosts (Postfix's dns_rr_list_limit)."""
    zone: dict[str, Any] = {"many.example": [MX(n, f"mx{n}.many.example") for n in range(400)],
                            "dead.example": [MX(n, f"gone{n}.example") for n in range(400)]}
    for n in range(400):
        zone[f"mx{n}.many.example"] = [A(f"192.0.2.{n % 250 + 1}")] if n % 2 else []
    resolver, fake, _ = makeMX(zone, maxAddresses=10, families=(4,))
    hosts = resolveNow(resolver, "many.example")
    assert [h.name for h in hosts] == [f"mx{n}.many.example" for n in range(1, 20, 2)]
    asked = {name for kind, name in fake.queries if kind != "MX"}
    assert asked == {f"mx{n}.many.example" for n in range(20)}
    # Looking for IPv6 addresses too, none found: on to the 100th host, ten at a time.
    resolver, fake, _ = makeMX(zone, maxAddresses=10)
    assert resolveNow(resolver, "many.example") == hosts
    asked = {name for kind, name in fake.queries if kind == "AAAA"}
    assert asked == {f"mx{n}.many.example" for n in range(100)}
    fake.queries.clear()
    f = failureOf(resolver, "dead.example")
    assert (f.permanent, f.code) == (True, "5.4.4")
    asked = [name for kind, name in fake.queries if kind == "A"]
    assert asked == [f"gone{n}.example" for n in range(100)]
    assert "gone99.example" in f.diagnostic and "gone100.example" not in f.diagnostic


def test_unlimited_the_hosts_of_the_last_preference_looked_up_are_all_looked_up() -> None:
    """Resolved for the SMTP backend (C{limited=False}: it drops the relay itself, then
    cuts to maxAddresses), the lookups go on past "enough" addresses to the end of the
    preference they reached: the relay, at that preference, is found wherever the shuffle
    put it, as Postfix's smtp_domain_addr() looks for itself over the whole list before
    smtp_mx_address_limit applies; no host of a less preferred one is looked up; still
    at most the first 100 hosts (Postfix's dns_rr_list_limit)."""
    zone: dict[str, Any] = {
        "equal.example": [MX(10, f"mx{n}.equal.example") for n in range(30)]
        + [MX(20, f"backup{n}.equal.example") for n in range(30)],
        "huge.example": [MX(10, f"h{n}.huge.example") for n in range(150)],
    }
    for n in range(30):
        zone[f"mx{n}.equal.example"] = [A(f"192.0.2.{n + 1}"), AAAA(f"2001:db8::{n + 1}")]
        zone[f"backup{n}.equal.example"] = [A(f"198.51.100.{n + 1}")]
    for n in range(150):
        zone[f"h{n}.huge.example"] = [A(f"203.0.113.{n % 250 + 1}"), AAAA(f"2001:db8::{n:x}")]

    def unlimited(resolver: MXResolver, nexthop: str) -> list[MXHost]:
        out: list[Any] = []
        resolver.resolve(nexthop, limited=False).addBoth(out.append)
        assert isinstance(out[0], list), out
        return out[0]

    resolver, fake, _ = makeMX(zone)
    hosts = unlimited(resolver, "equal.example")
    assert {h.name for h in hosts} == {f"mx{n}.equal.example" for n in range(30)}
    assert len(hosts) == 60
    asked = {name for kind, name in fake.queries if kind != "MX"}
    assert asked == {f"mx{n}.equal.example" for n in range(30)}
    # Limited (no relay to look for afterwards): as far as enough, the first batch.
    resolver, fake, _ = makeMX(zone)
    assert len(resolveNow(resolver, "equal.example")) == 5
    assert len({name for kind, name in fake.queries if kind == "A"}) == 10
    # One preference of 150 hosts: the first 100, no more.
    resolver, fake, _ = makeMX(zone)
    assert len(unlimited(resolver, "huge.example")) == 200
    assert len({name for kind, name in fake.queries if kind == "A"}) == 100


def test_transient_copy() -> None:
    f = DeliveryFailure(permanent=True, code="5.1.2", diagnostic="x")
    t = f.transient()
    assert isinstance(t, TransientFailure)
    assert (t.permanent, t.code, t.diagnostic) == (False, "4.1.2", "x")
    assert t.transient() is t


def test_delivery_failure_classes() -> None:
    """DeliveryFailure(permanent=...) makes the subclass it names; the code's class must
    agree with it."""
    f = DeliveryFailure(permanent=True, code="5.1.2", diagnostic="X-mailrelay; gone")
    assert type(f) is PermanentFailure and f.permanent
    assert (f.code, f.diagnostic) == ("5.1.2", "X-mailrelay; gone")
    assert str(f) == "5.1.2 X-mailrelay; gone"
    f = DeliveryFailure(permanent=False, code="4.4.3", diagnostic="x")
    assert type(f) is TransientFailure and not f.permanent
    assert isinstance(TransientFailure(code="4.4.4", diagnostic="x"), DeliveryFailure)
    assert PermanentFailure(code="5.1.10", diagnostic="x").permanent
    with pytest.raises(ValueError, match="code must be 4.x.x, not '5.1.1'"):
        TransientFailure(code="5.1.1", diagnostic="x")
    with pytest.raises(ValueError, match="code must be 5.x.x, not '4.1.1'"):
        DeliveryFailure(permanent=True, code="4.1.1", diagnostic="x")
    with pytest.raises(ValueError, match="is not permanent=False"):
        PermanentFailure(code="5.1.1", diagnostic="x", permanent=False)


# ---------------------------------------------------------------------------------------------
# A real DNS server on loopback


class DictAuthority(authority.FileAuthority):
    """An authority for one zone, from a list of (name, record) pairs."""

    def loadFile(self, zone: Any) -> None:
        origin, records = zone
        self.records = {}
        for name, record in records:
            if isinstance(record, dns.Record_SOA):
                self.soa = (name.encode(), record)
            self.records.setdefault(name.encode().lower(), []).append(record)


class RealDNSTests(unittest.TestCase):
    """MXResolver over real UDP against a twisted.names server on 127.0.0.1."""

    def setUp(self) -> None:
        soa = dns.Record_SOA(
            mname=b"ns.test.example", rname=b"root.test.example", serial=1, minimum=60, expire=60
        )
        records = [
            ("test.example", soa),
            ("test.example", dns.Record_MX(10, b"mx.test.example")),
            ("mx.test.example", dns.Record_A("127.0.0.1")),
            ("noemail.test.example", dns.Record_MX(0, b"")),
            ("plain.test.example", dns.Record_A("127.0.0.2")),
        ]
        auth = DictAuthority(("test.example", records))
        factory = server.DNSServerFactory(authorities=[auth])
        protocol = dns.DNSDatagramProtocol(factory)
        self.port = reactor.listenUDP(0, protocol, interface="127.0.0.1")
        self.addCleanup(self.port.stopListening)
        resolver = makeResolver([f"127.0.0.1:{self.port.getHost().port}"])
        self.mx = MXResolver(resolver, reactor, timeout=5, families=(4,))

    @defer.inlineCallbacks
    def test_mx(self) -> Any:
        hosts = yield self.mx.resolve("test.example")
        self.assertEqual(hosts, [MXHost("mx.test.example", "127.0.0.1", 25, 10)])

    @defer.inlineCallbacks
    def test_no_mx_uses_a(self) -> Any:
        hosts = yield self.mx.resolve("plain.test.example:2525")
        self.assertEqual(hosts, [MXHost("plain.test.example", "127.0.0.2", 2525)])

    @defer.inlineCallbacks
    def test_null_mx(self) -> Any:
        try:
            yield self.mx.resolve("noemail.test.example")
        except DeliveryFailure as e:
            self.assertEqual((e.permanent, e.code), (True, "5.1.10"))
        else:
            self.fail("no DeliveryFailure")

    @defer.inlineCallbacks
    def test_nxdomain(self) -> Any:
        try:
            yield self.mx.resolve("nowhere.test.example")
        except DeliveryFailure as e:
            self.assertEqual((e.permanent, e.code), (True, "5.1.2"))
        else:
            self.fail("no DeliveryFailure")
