"""Routing: which delivery backend and next hop each recipient goes to, and MX resolution.

L{RoutingTable} maps a recipient's domain to a L{Route}; L{MXResolver} turns an SMTP next hop
(C{"example.org"}, C{"example.org:2525"}, C{"[smtp.example.net]:587"}, C{"[192.0.2.1]"},
C{"[IPv6:2001:db8::1]"}) into the list of L{MXHost}s to try, in order, without ever blocking
the reactor; L{makeResolver} builds the DNS resolver it uses.

Next hop syntax (the SMTP backend's, read by L{parseSMTPNexthop
<mailrelay.route.nexthop.parseSMTPNexthop>}, written by L{SMTPNexthop.__str__
<mailrelay.route.nexthop.SMTPNexthop>}):

  - C{"domain"} or C{"domain:port"}: look up the MX records of C{domain} (RFC 5321 section
    5.1), falling back to the domain's own addresses when it has none; connect to C{port}
    (25 by default).
  - C{"[host]"} or C{"[host]:port"}: no MX lookup; connect to the addresses of C{host} (a name
    whose A/AAAA records are looked up, or an IP address).
  - C{"[192.0.2.1]"}, C{"[IPv6:2001:db8::1]"}, C{"[2001:db8::1]:2525"}, C{"192.0.2.1:2525"}:
    that address.
"""

from __future__ import annotations

import dataclasses
import ipaddress
import random as randomModule
from dataclasses import dataclass
from typing import Any, Iterable, Sequence

from twisted.internet import defer
from twisted.internet.defer import Deferred, inlineCallbacks
from twisted.logger import Logger
from twisted.names import client, dns
from twisted.names import error as dnsError
from zope.interface import implementer

from mailrelay.interfaces import PLATFORM_TRUST_STORE, IRouter, Route, RouteOptions
from mailrelay.route.nexthop import (
    DEFAULT_SMTP_PORT,
    checkMaildirTemplate,
    parseLMTPNexthop,
    parseNameserver,
    parseRouteDomain,
    parseSMTPNexthop,
)

log = Logger()

__all__ = [
    "DeliveryFailure",
    "MXHost",
    "MXResolver",
    "RouteRule",
    "RoutingTable",
    "makeResolver",
    "routeOptions",
]


class DeliveryFailure(Exception):
    """Delivery to a next hop cannot even start (DNS says no, or nothing to connect to).

    @ivar permanent: C{True} when retrying will not help (the recipients bounce).
    @ivar code: the RFC 3463 status (C{"5.1.2"}, C{"4.4.3"}); its class agrees with
        C{permanent}.
    @ivar diagnostic: an RFC 3464 diagnostic, C{"X-mailrelay; domain example.org does not
        exist"}.
    """

    def __init__(self, *, permanent: bool, code: str, diagnostic: str) -> None:
        self.permanent = permanent
        self.code = code
        self.diagnostic = diagnostic
        super().__init__(f"{code} {diagnostic}")

    def transient(self) -> DeliveryFailure:
        """This failure as a transient one (a C{4.x.x} code), or itself when already transient."""
        if not self.permanent:
            return self
        return DeliveryFailure(
            permanent=False, code="4" + self.code[1:], diagnostic=self.diagnostic
        )


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

    A recipient without a domain (RFC 5321 C{<postmaster>}) goes to the C{"*"} rule, the
    smarthost, or nowhere: L{route} then raises a permanent L{DeliveryFailure}.

    Each L{Route} carries the L{RouteOptions} of the rule (or of the smarthost) that chose
    it, and the backend is given that route: two rules with the same next hop keep their own
    TLS and AUTH settings.
    """

    @classmethod
    def fromConfig(cls, config: Any) -> RoutingTable:
        """The table of a L{mailrelay.config.Config}: its C{routes} and its C{smarthost},
        each with its transport options (L{mailrelay.config.TransportOptions}) as
        L{RouteOptions}.

        @raise ValueError: a route the table refuses (the message names it).
        """
        rules = [
            RouteRule(r.domain, r.backend, r.nexthop, routeOptions(r.options))
            for r in config.routes
        ]
        smarthostOptions = routeOptions(getattr(config, "smarthostOptions", None))
        return cls(rules, smarthost=config.smarthost, smarthostOptions=smarthostOptions)

    def __init__(
        self,
        rules: Iterable[RouteRule] = (),
        smarthost: Any = None,
        smarthostOptions: RouteOptions = RouteOptions(),
    ) -> None:
        """
        @param rules: the rules, in any order; two rules for the same pattern are an error.
        @param smarthost: a L{mailrelay.config.Smarthost}, its string form
            (C{"[relay.example]:587"}, C{"relay.example"}) or C{None}.
        @param smarthostOptions: the L{RouteOptions} of the smarthost route.
        @raise ValueError: a bad rule (the message names it).
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

    def _add(self, rule: RouteRule) -> None:
        pattern = parseRouteDomain(rule.domain)
        if not isinstance(rule.backend, str) or not rule.backend:
            raise ValueError(f"route {rule.domain!r}: backend must be a name, not {rule.backend!r}")
        if not isinstance(rule.options, RouteOptions):
            raise ValueError(
                f"route {rule.domain!r}: options must be RouteOptions, not {rule.options!r}"
            )
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

        @raise DeliveryFailure: the recipient has no domain and nothing routes it.
        """
        domain = recipient.domain
        pattern, route = self._match(domain)
        if route is not None and route.nexthop:
            return route
        if route is not None:
            # An smtp rule without nexthop: the recipient's own domain.
            _, port, options = self._implicit[pattern]  # type: ignore[index]
            if not domain:
                raise DeliveryFailure(
                    permanent=True,
                    code="5.1.2",
                    diagnostic=f"X-mailrelay; recipient {recipient.address} has no domain",
                )
            return Route(route.backend, nexthopForDomain(domain, port), options)
        if self.smarthost is not None:
            return Route("smtp", self.smarthost, self.smarthostOptions)
        if not domain:
            raise DeliveryFailure(
                permanent=True,
                code="5.1.2",
                diagnostic=f"X-mailrelay; recipient {recipient.address} has no domain",
            )
        return Route("smtp", nexthopForDomain(domain))


def routeOptions(transport: Any) -> RouteOptions:
    """The L{RouteOptions} of a route's L{mailrelay.config.TransportOptions} (which sets
    every field, defaults resolved: its C{caFile} C{None} is the platform's trust store, not
    the backend's default), or empty options for C{None}."""
    if transport is None:
        return RouteOptions()
    return RouteOptions(
        tls=transport.tls,
        caFile=PLATFORM_TRUST_STORE if transport.caFile is None else transport.caFile,
        username=transport.username,
        password=transport.password,
        authWithoutTLS=transport.authWithoutTLS,
    )


def nexthopForDomain(domain: str, port: int | None = None) -> str:
    """The SMTP next hop for a recipient domain: the domain itself (MX lookup), or an address
    literal as is (no lookup); with C{:port} when C{port} is given and not 25."""
    if port is None or port == DEFAULT_SMTP_PORT:
        return domain
    return f"{domain}:{port}"


# ---------------------------------------------------------------------------------------------
# Next hops and MX resolution


def _isIP(text: str) -> int:
    """4 or 6 when C{text} is an IP address of that version, else 0."""
    try:
        return ipaddress.ip_address(text).version
    except ValueError:
        return 0


@dataclass(frozen=True, slots=True)
class MXHost:
    """One address to try, in the order L{MXResolver.resolve} returns them.

    @ivar name: the host's name (the MX exchange, the bracketed host, or the domain itself
        for the implicit MX), lower case without trailing dot; for an IP address next hop, the
        address.  Use it for TLS server name checks and the Remote-MTA (C{"dns; " + name}).
    @ivar address: the IP address to connect to (C{"192.0.2.1"}, C{"2001:db8::1"}).
    @ivar port: the TCP port.
    @ivar preference: the MX preference, or C{None} when there was no MX lookup or no MX.
    """

    name: str
    address: str
    port: int
    preference: int | None = None

    @property
    def family(self) -> int:
        """4 or 6."""
        return _isIP(self.address)


def _records(result: Any, rtype: int) -> list[Any]:
    """The payloads of type C{rtype} in a lookup result."""
    answers = result[0] if isinstance(result, tuple) else result
    return [rr.payload for rr in answers if rr.type == rtype]


_NXDOMAIN = "nxdomain"
_NODATA = "nodata"
_ERROR = "error"


class MXResolver:
    """Resolves SMTP next hops to addresses, through a Twisted C{IResolver} (never blocking).

    MX records are ordered by preference, shuffled among equal preferences (RFC 5321 section
    5.1); each MX host's addresses are looked up (A and AAAA, concurrently), hosts without an
    address are skipped.  A domain without MX records is its own mail exchanger.  A domain
    whose only MX records have the exchange C{"."} has a null MX (RFC 7505).  An MX exchange
    written as an IP address is used as is.

    Failures raise L{DeliveryFailure}: NXDOMAIN of the domain is permanent (5.1.2), a null
    MX permanent (5.1.10), a DNS error or time-out transient (4.4.3), and no address for any
    host transient (4.4.4).
    """

    def __init__(
        self,
        resolver: Any,
        clock: Any,
        timeout: float = 30,
        *,
        random: randomModule.Random | None = None,
        families: Sequence[int] = (4, 6),
        maxAddresses: int = 10,
    ) -> None:
        """
        @param resolver: a C{twisted.internet.interfaces.IResolver} (see L{makeResolver}).
        @param clock: an C{IReactorTime}, for the time-out.
        @param timeout: seconds each DNS query may take before it counts as failed.
        @param random: the source of the shuffle among MX hosts of equal preference.
        @param families: the address families to look up, in the order their addresses are
            tried for each host: C{(4, 6)} (the default: IPv4 first), C{(6, 4)}, or C{(4,)}
            to never use IPv6.
        @param maxAddresses: at most this many addresses are returned (Postfix's
            C{smtp_mx_address_limit}), so that a domain of many dead MX hosts does not hold a
            delivery for hours.
        """
        self.resolver = resolver
        self.clock = clock
        self.timeout = timeout
        self.random = random if random is not None else randomModule.Random()
        if not families or any(f not in (4, 6) for f in families):
            raise ValueError(f"families must be a sequence of 4 and 6, not {families!r}")
        self.families = tuple(families)
        self.maxAddresses = maxAddresses

    def _query(self, method: str, name: str) -> Deferred:
        """Call C{resolver.method(name)} bounded by the time-out."""
        d = defer.maybeDeferred(getattr(self.resolver, method), name)
        d.addTimeout(self.timeout, self.clock)
        return d

    @staticmethod
    def _classify(failure: Any) -> str:
        if failure.check(dnsError.DNSNameError, dns.AuthoritativeDomainError):
            return _NXDOMAIN
        if failure.check(
            dnsError.DNSServerError,
            dnsError.DNSQueryRefusedError,
            dnsError.DNSFormatError,
            dnsError.DNSNotImplementedError,
            dnsError.DNSUnknownError,
        ):
            return _ERROR
        if failure.check(dnsError.DomainError):
            # Not from a name server: no resolver of a chain knew the name.
            return _NODATA
        return _ERROR

    @inlineCallbacks
    def _addresses(self, name: str) -> Any:
        """The addresses of host C{name}, in family order.

        @return: a Deferred firing with C{(addresses, problem)}: C{problem} is C{None},
            L{_NXDOMAIN}, L{_NODATA} or a description of a DNS error.
        """
        if _isIP(name):
            return [name], None
        methods = {4: "lookupAddress", 6: "lookupIPV6Address"}
        queries = [self._query(methods[f], name) for f in self.families]
        outcomes = yield defer.DeferredList(queries, consumeErrors=True)
        addresses: list[str] = []
        problems = []
        for family, (ok, result) in zip(self.families, outcomes):
            if ok:
                if family == 4:
                    found = [p.dottedQuad() for p in _records(result, dns.A)]
                else:
                    found = [
                        str(ipaddress.IPv6Address(p.address)) for p in _records(result, dns.AAAA)
                    ]
                for a in found:
                    if a not in addresses:
                        addresses.append(a)
            else:
                kind = self._classify(result)
                problems.append(kind if kind != _ERROR else _describe(result))
        if addresses:
            return addresses, None
        if problems and all(p == _NXDOMAIN for p in problems):
            return [], _NXDOMAIN
        errors = [p for p in problems if p not in (_NXDOMAIN, _NODATA)]
        if errors:
            return [], errors[0]
        return [], _NODATA

    def _orderMX(self, records: list[Any]) -> list[tuple[int, str]]:
        byPreference: dict[int, list[str]] = {}
        for record in records:
            name = str(record.name).rstrip(".").lower()
            byPreference.setdefault(record.preference, [])
            if name not in byPreference[record.preference]:
                byPreference[record.preference].append(name)
        ordered: list[tuple[int, str]] = []
        seen = set()
        for preference in sorted(byPreference):
            names = byPreference[preference]
            self.random.shuffle(names)
            for name in names:
                if name not in seen:
                    seen.add(name)
                    ordered.append((preference, name))
        return ordered

    def resolve(self, nexthop: str) -> Deferred:
        """Resolve C{nexthop} (see the module docstring for its forms).

        @return: a Deferred firing with a non-empty list of L{MXHost}, in the order to try
            them (for each host, its addresses in L{families} order), or failing with
            L{DeliveryFailure}.
        """
        return self._resolve(nexthop)

    @inlineCallbacks
    def _resolve(self, nexthop: str) -> Any:
        try:
            parsed = parseSMTPNexthop(nexthop, strict=False)
        except ValueError as e:
            raise DeliveryFailure(permanent=False, code="4.4.0", diagnostic=f"X-mailrelay; {e}")
        host, port, mxLookup = parsed.host, parsed.port, parsed.mxLookup
        if _isIP(host):
            return [MXHost(host, host, port)]
        if not mxLookup:
            addresses, problem = yield self._addresses(host)
            if not addresses:
                raise self._noAddress(host, problem, [host])
            return self._limit([MXHost(host, a, port) for a in addresses])

        try:
            result = yield self._query("lookupMailExchange", host)
        except Exception:
            failure = _currentFailure()
            kind = self._classify(failure)
            if kind == _NXDOMAIN:
                raise DeliveryFailure(
                    permanent=True,
                    code="5.1.2",
                    diagnostic=f"X-mailrelay; domain {host} does not exist",
                )
            if kind == _ERROR:
                raise DeliveryFailure(
                    permanent=False,
                    code="4.4.3",
                    diagnostic=f"X-mailrelay; cannot look up the MX records of {host}: "
                    f"{_describe(failure)}",
                )
            result = ([], [], [])
        records = _records(result, dns.MX)
        real = [r for r in records if str(r.name).rstrip(".") != ""]
        if records and not real:
            raise DeliveryFailure(
                permanent=True,
                code="5.1.10",
                diagnostic=f"X-mailrelay; domain {host} does not accept mail (null MX)",
            )
        if not real:
            # RFC 5321 section 5.1: no MX, the domain is its own mail exchanger.
            addresses, problem = yield self._addresses(host)
            if not addresses:
                if problem == _NXDOMAIN:
                    raise DeliveryFailure(
                        permanent=True,
                        code="5.1.2",
                        diagnostic=f"X-mailrelay; domain {host} does not exist",
                    )
                raise self._noAddress(host, problem, [host])
            return self._limit([MXHost(host, a, port) for a in addresses])

        ordered = self._orderMX(real)
        lookups = yield defer.gatherResults(
            [self._addresses(name) for _, name in ordered], consumeErrors=True
        )
        hosts: list[MXHost] = []
        problems = []
        for (preference, name), (addresses, problem) in zip(ordered, lookups):
            if not addresses:
                log.info(
                    "MX host {mx} of {domain} has no address: {problem}",
                    mx=name,
                    domain=host,
                    problem=problem,
                )
                problems.append(problem)
            for a in addresses:
                hosts.append(MXHost(name, a, port, preference))
        if not hosts:
            problem = next((p for p in problems if p not in (_NXDOMAIN, _NODATA)), _NODATA)
            raise self._noAddress(host, problem, [n for _, n in ordered])
        return self._limit(hosts)

    def _limit(self, hosts: list[MXHost]) -> list[MXHost]:
        return hosts[: self.maxAddresses] if self.maxAddresses > 0 else hosts

    @staticmethod
    def _noAddress(domain: str, problem: str | None, names: list[str]) -> DeliveryFailure:
        if problem in (None, _NXDOMAIN, _NODATA):
            if names == [domain]:
                text = f"host {domain} has no address"
            else:
                text = f"no MX host of {domain} has an address ({', '.join(names)})"
            return DeliveryFailure(permanent=False, code="4.4.4", diagnostic=f"X-mailrelay; {text}")
        return DeliveryFailure(
            permanent=False,
            code="4.4.3",
            diagnostic=f"X-mailrelay; cannot look up the address of {', '.join(names)}: {problem}",
        )


def _currentFailure() -> Any:
    from twisted.python.failure import Failure

    return Failure()


def _describe(failure: Any) -> str:
    """A short text for a DNS failure."""
    if failure.check(defer.TimeoutError, dnsError.DNSQueryTimeoutError, defer.CancelledError):
        return "DNS time-out"
    names = {
        dnsError.DNSServerError: "SERVFAIL",
        dnsError.DNSQueryRefusedError: "REFUSED",
        dnsError.DNSFormatError: "FORMERR",
        dnsError.DNSNotImplementedError: "NOTIMP",
        dnsError.DNSUnknownError: "unknown DNS error",
    }
    for kind, text in names.items():
        if failure.check(kind):
            return text
    return f"{failure.type.__name__}: {failure.getErrorMessage()}"


def makeResolver(nameservers: Sequence[Any] | None = None, *, reactor: Any = None) -> Any:
    """A DNS resolver: the system's, or one asking only C{nameservers}.

    @param nameservers: C{None} or empty for the system's resolver
        (C{twisted.names.client.createResolver()}: C{/etc/hosts}, a cache and the servers of
        C{/etc/resolv.conf}); otherwise name servers as C{"10.0.0.1"}, C{"127.0.0.1:5353"},
        C{"::1"} or C{"[::1]:53"} (or C{(address, port)} pairs, as
        L{mailrelay.config.Config.nameservers} holds them), asked in turn, without cache and
        without the hosts file.
    @raise ValueError: a bad name server (the message names it).
    """
    if not nameservers:
        return client.createResolver()
    servers = [
        (str(ns[0]), int(ns[1])) if isinstance(ns, tuple) else parseNameserver(ns)
        for ns in nameservers
    ]
    return client.Resolver(servers=servers, reactor=reactor)
