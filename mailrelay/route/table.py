"""The routing table: which delivery backend, next hop and options each recipient goes to.

L{RoutingTable} maps a recipient's domain to a L{Route}, by the rules of the
configuration's C{[[routes]]}, its sender routes (C{[[sender_routes]]}) and its
smarthost; each rule's next hop is checked by its backend's parser
(L{mailrelay.route.nexthop}).  L{mailrelay.route.mx} resolves the SMTP next hops it gives.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

from twisted.logger import Logger
from zope.interface import implementer

from mailrelay.address import userParts
from mailrelay.errors import PermanentFailure
from mailrelay.interfaces import IRouter, Route, RouteOptions
from mailrelay.route.nexthop import (
    DEFAULT_SMTP_PORT,
    NULL_SENDER_KEY,
    checkMaildirTemplate,
    parseLMTPNexthop,
    parseRouteDomain,
    parseSenderKey,
    parseSMTPNexthop,
)

log = Logger()

_NO_OPTIONS = RouteOptions()

__all__ = [
    "RouteRule",
    "RoutingTable",
    "SenderRoute",
]


# ---------------------------------------------------------------------------------------------
# Routing table


@dataclass(frozen=True)
class RouteRule:
    """One rule of a L{RoutingTable}.

    @ivar domain: which recipient domains the rule is for: C{"example.org"} (exactly that
        domain; also an address literal such as C{"[192.0.2.1]"}), C{".example.org"} (every
        subdomain of example.org, but not example.org itself), or C{"*"} (every domain).
    @ivar backend: the name of the delivery backend (C{"smtp"}, C{"lmtp"}, C{"maildir"},
        C{"discard"} or a site backend).
    @ivar nexthop: where the backend delivers (see L{Route}).  Optional for C{"smtp"}, where
        it defaults to the recipient's domain (an MX lookup); required for C{"lmtp"} and
        C{"maildir"}; for C{"discard"} and site backends it defaults to the backend's name
        (so that all the recipients of a message routed there form one delivery).
    @ivar options: the L{RouteOptions} the routes of this rule carry (TLS, CA file, AUTH).
    @ivar port: for C{"smtp"} only, the port folded into the next hop (C{nexthop =
        "relay.example"}, C{port = 2525} routes to C{"relay.example:2525"}; without a next
        hop, to the recipient domain's MX hosts on that port).
    """

    domain: str
    backend: str
    nexthop: str | None = None
    options: RouteOptions = RouteOptions()
    port: int | None = None


@dataclass(frozen=True)
class SenderRoute:
    """One sender route of a L{RoutingTable}: where the mail of some senders goes instead of
    to the smarthost (Postfix's C{sender_dependent_relayhost_maps}), with its own TLS and
    AUTH settings (C{smtp_sender_dependent_authentication}).

    @ivar sender: which senders: C{"user@example.org"}, C{"@example.org"} (every address in
        that domain) or C{"<>"} (the null sender) (L{parseSenderKey}).
    @ivar nexthop: an SMTP next hop, as a smarthost is written (C{"[smtp.example.net]:587"}).
    @ivar options: the L{RouteOptions} of its deliveries.
    """

    sender: str
    nexthop: str
    options: RouteOptions = RouteOptions()


def _checkNexthop(backend: str, nexthop: str, port: int | None) -> str:
    """A rule's next hop checked by its backend's parser (C{smtp}, C{lmtp}, C{maildir}; a
    site backend's is its own business), with C{port} folded into an C{smtp} one.

    @raise ValueError: the next hop is not one of the backend's.
    """
    if backend == "smtp":
        parsed = parseSMTPNexthop(nexthop)
        if port is not None:
            return str(dataclasses.replace(parsed, port=port))
    elif backend == "lmtp":
        parseLMTPNexthop(nexthop)
    elif backend == "maildir":
        checkMaildirTemplate(nexthop)
    return nexthop


@implementer(IRouter)
class RoutingTable:
    """Routes recipients by their domain.

    The most specific rule wins, whatever the order of the rules: a rule for exactly the
    recipient's domain, then the subdomain rule with the longest suffix (C{".mail.example.org"}
    before C{".example.org"}), then the C{"*"} rule.  When no rule matches, the recipient goes
    by SMTP to the smarthost if one is configured, otherwise to its own domain's MX hosts
    (C{Route("smtp", domain)}; an address literal such as C{"[192.0.2.1]"} is its own next hop
    and gets no MX lookup).  A C{"*"} rule takes precedence over the smarthost.

    A sender route (L{SenderRoute}) for the message's sender takes the smarthost's place:
    it overrides the smarthost and the MX lookup, but not the rules, as Postfix's
    C{sender_dependent_relayhost_maps} overrides C{relayhost} but not C{transport_maps}
    (trivial-rewrite's resolve.c).  The sender is looked up as Postfix's C{mail_addr_find}
    does, without regard to case: C{user+ext@domain}, C{user@domain} (without the address
    extension, with a recipient delimiter), then C{@domain}; the null sender as C{"<>"}
    only (Postfix's C{empty_address_relayhost_maps_lookup_key}).

    A recipient without a domain (RFC 5321 C{<postmaster>}) goes to the C{"*"} rule, the
    smarthost, or nowhere: L{route} then raises a L{PermanentFailure}.

    Each L{Route} carries the L{RouteOptions} of the rule (or of the smarthost) that chose
    it, and the backend is given that route: two rules with the same next hop keep their own
    TLS and AUTH settings.
    """

    @classmethod
    def fromConfig(cls, config: Any) -> RoutingTable:
        """The table of a L{mailrelay.config.Config}: its C{routes} (L{RouteRule}s) and its
        C{smarthost} with the smarthost's L{RouteOptions}.

        @raise ValueError: a route the table refuses (the message names it).
        """
        return cls(
            config.routes,
            smarthost=config.smarthost,
            smarthostOptions=config.smarthostOptions,
            senderRoutes=config.senderRoutes,
            recipientDelimiter=config.recipientDelimiter,
        )

    def __init__(
        self,
        rules: Iterable[RouteRule] = (),
        smarthost: Any = None,
        smarthostOptions: RouteOptions = _NO_OPTIONS,
        senderRoutes: Iterable[SenderRoute] = (),
        recipientDelimiter: str = "",
    ) -> None:
        """
        @param rules: the rules, in any order; two rules for the same pattern are an error.
        @param smarthost: an L{mailrelay.route.nexthop.SMTPNexthop}, its string form
            (C{"[relay.example]:587"}, C{"relay.example"}) or C{None}.
        @param smarthostOptions: the L{RouteOptions} of the smarthost route.
        @param senderRoutes: the L{SenderRoute}s, in any order; two for the same sender are an
            error.
        @param recipientDelimiter: the characters separating an address extension from the
            user (C{"+"}), for looking senders up without it; C{""} for none.
        @raise ValueError: a bad rule or sender route (the message names it).
        """
        self._exact: dict[str, Route] = {}
        self._subdomains: dict[str, Route] = {}
        self._wildcard: Route | None = None
        self._implicit: dict[str, tuple[str, int | None, RouteOptions]] = {}
        self.smarthost = None if smarthost is None or smarthost == "" else str(smarthost)
        if not isinstance(smarthostOptions, RouteOptions):
            raise ValueError(
                f"the smarthost's options must be RouteOptions, not {smarthostOptions!r}"
            )
        self.smarthostOptions = smarthostOptions
        if self.smarthost is not None:
            parseSMTPNexthop(self.smarthost, what="smarthost")
        for rule in rules:
            self._add(rule)
        self.recipientDelimiter = recipientDelimiter
        self._senders: dict[str, Route] = {}
        for senderRoute in senderRoutes:
            self._addSender(senderRoute)

    def _addSender(self, senderRoute: SenderRoute) -> None:
        try:
            key = parseSenderKey(senderRoute.sender)
            nexthop = parseSMTPNexthop(senderRoute.nexthop, what="smarthost")
        except ValueError as e:
            raise ValueError(f"sender route {senderRoute.sender!r}: {e}") from None
        if not isinstance(senderRoute.options, RouteOptions):
            raise ValueError(
                f"sender route {senderRoute.sender!r}: options must be RouteOptions, not "
                f"{senderRoute.options!r}"
            )
        if key in self._senders:
            raise ValueError(
                f"sender route {senderRoute.sender!r}: there is already a sender route for "
                f"{key!r}"
            )
        self._senders[key] = Route("smtp", str(nexthop), senderRoute.options)

    def _senderRoute(self, envelope: Any) -> Route | None:
        """The sender route of C{envelope}'s sender, or C{None} (see the class docstring)."""
        if not self._senders:
            return None
        sender = getattr(envelope, "sender", None)
        if sender is None:
            return None
        if not sender:
            return self._senders.get(NULL_SENDER_KEY)
        local, _, domain = sender.lower().rpartition("@")
        for part in userParts(local, self.recipientDelimiter):
            route = self._senders.get(f"{part}@{domain}")
            if route is not None:
                return route
        return self._senders.get("@" + domain)

    def _add(self, rule: RouteRule) -> None:
        pattern = parseRouteDomain(rule.domain)
        if not isinstance(rule.backend, str) or not rule.backend:
            raise ValueError(f"route {rule.domain!r}: backend must be a name, not {rule.backend!r}")
        if not isinstance(rule.options, RouteOptions):
            raise ValueError(
                f"route {rule.domain!r}: options must be RouteOptions, not {rule.options!r}"
            )
        refused = rule.options.refusedBy(rule.backend)
        if refused is not None:
            raise ValueError(f"route {rule.domain!r}: {refused}")
        port = rule.port
        if port is not None:
            if rule.backend != "smtp":
                raise ValueError(f"route {rule.domain!r}: port is for smtp routes only")
            if isinstance(port, bool) or not isinstance(port, int) or not 1 <= port <= 65535:
                raise ValueError(
                    f"route {rule.domain!r}: port must be a number from 1 to 65535, not {port!r}"
                )
        nexthop = rule.nexthop
        if nexthop is not None and not isinstance(nexthop, str):
            raise ValueError(f"route {rule.domain!r}: nexthop must be a string, not {nexthop!r}")
        if nexthop == "":
            nexthop = None
        if nexthop is None:
            if rule.backend in ("lmtp", "maildir"):
                raise ValueError(f"route {rule.domain!r}: backend {rule.backend!r} needs a nexthop")
            if rule.backend != "smtp":
                # discard and site backends: one delivery per message and backend.
                nexthop = rule.backend
        else:
            try:
                nexthop = _checkNexthop(rule.backend, nexthop, port)
            except ValueError as e:
                raise ValueError(f"route {rule.domain!r}: {e}") from None
        route = Route(rule.backend, nexthop or "", rule.options)
        if nexthop is None:
            # The next hop is the recipient's domain: remember the port and options.
            self._implicit[pattern] = (rule.backend, port, rule.options)
        if pattern == "*":
            if self._wildcard is not None:
                raise ValueError(f'route {rule.domain!r}: there is already a "*" route')
            self._wildcard = route
        else:
            table = self._subdomains if pattern.startswith(".") else self._exact
            if pattern in table:
                raise ValueError(f"route {rule.domain!r}: there is already a route for {pattern!r}")
            table[pattern] = route

    def _match(self, domain: str) -> tuple[str | None, Route | None]:
        """The most specific pattern matching C{domain}, and its route (C{(None, None)})."""
        if domain in self._exact:
            return domain, self._exact[domain]
        if domain and not domain.startswith("["):
            # Longest suffix first: walk up the labels.
            rest = domain
            while "." in rest:
                rest = rest.split(".", 1)[1]
                if "." + rest in self._subdomains:
                    return "." + rest, self._subdomains["." + rest]
        if self._wildcard is not None:
            return "*", self._wildcard
        return None, None

    def route(self, envelope: Any, recipient: Any) -> Route:
        """The L{Route} for C{recipient} (see the class docstring).

        @raise PermanentFailure: the recipient has no domain and nothing routes it.
        """
        domain = recipient.domain
        pattern, route = self._match(domain)
        if route is not None and route.nexthop:
            return route
        if route is not None:
            # An smtp rule without nexthop: the recipient's own domain.
            _, port, options = self._implicit[pattern]  # type: ignore[index]
            if not domain:
                raise PermanentFailure(
                    code="5.1.2",
                    diagnostic=f"X-mailrelay; recipient {recipient.address} has no domain",
                )
            return Route(route.backend, nexthopForDomain(domain, port), options)
        senderRoute = self._senderRoute(envelope)
        if senderRoute is not None:
            return senderRoute
        if self.smarthost is not None:
            return Route("smtp", self.smarthost, self.smarthostOptions)
        if not domain:
            raise PermanentFailure(
                code="5.1.2",
                diagnostic=f"X-mailrelay; recipient {recipient.address} has no domain",
            )
        return Route("smtp", nexthopForDomain(domain))


def nexthopForDomain(domain: str, port: int | None = None) -> str:
    """The SMTP next hop for a recipient domain: the domain itself (MX lookup), or an address
    literal as is (no lookup); with C{:port} when C{port} is given and not 25."""
    if port is None or port == DEFAULT_SMTP_PORT:
        return domain
    return f"{domain}:{port}"
