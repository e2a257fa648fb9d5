"""MX resolution: the hosts and addresses an SMTP next hop stands for.

L{MXResolver} turns an SMTP next hop (C{"example.org"}, C{"example.org:2525"},
C{"[smtp.example.net]:587"}, C{"[192.0.2.1]"}, C{"[IPv6:2001:db8::1]"}) into the list of
L{MXHost}s to try, in order, without ever blocking the reactor; L{makeResolver} builds the DNS
resolver it uses.

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

import ipaddress
import os
import random as randomModule
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from twisted.internet import defer
from twisted.internet.defer import Deferred, inlineCallbacks
from twisted.internet.endpoints import TCP4ClientEndpoint, TCP6ClientEndpoint, connectProtocol
from twisted.logger import Logger
from twisted.names import cache, client, dns, resolve
from twisted.names import error as dnsError

from mailrelay.address import hostnameProblem
from mailrelay.errors import (
    DeliveryFailure,
    PermanentFailure,
    TransientFailure,
    describeValue,
    dnsAnswerCode,
)
from mailrelay.route.nexthop import parseNameserver, parseSMTPNexthop
from mailrelay.smtp.clientsettings import DANEPolicy, TLSARecord

log = Logger()

__all__ = ["TLSA", "MXHost", "MXResolver", "isSecure", "makeResolver"]


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
    @ivar secure: the answers that gave this host were DNSSEC-validated (the resolver set
        their AD bit, L{makeResolver}'s C{dnssec}): the MX records (or their absence) and
        the one that gave this address.  Only then may DANE apply (RFC 7672 section 2.2).
    @ivar expanded: when the address came through a CNAME chain from C{name} (C{name} is
        an alias), the chain's end, the owner of the address records (lower case, no
        trailing dot): where DANE looks for TLSA records first (RFC 7672 section 2.2.2,
        L{MXResolver.danePolicy}); else C{None}.
    @ivar domainExpanded: when the next hop's domain is an alias and its MX records came
        through a DNSSEC-validated CNAME chain, the chain's end (lower case, no trailing
        dot; Postfix's C{rname} of the MX RRset): a name a certificate verified by DANE-TA
        may be for (RFC 7672 section 3.2.3, L{MXResolver.danePolicy}); else C{None} -- never
        from an answer not validated, which could have been forged.
    """

    name: str
    address: str
    port: int
    preference: int | None = None
    secure: bool = False
    expanded: str | None = None
    domainExpanded: str | None = None

    @property
    def family(self) -> int:
        """4 or 6."""
        return _isIP(self.address)


def _records(result: Any, rtype: int) -> list[Any]:
    """The payloads of type C{rtype} in a lookup result."""
    answers = result[0] if isinstance(result, tuple) else result
    return [rr.payload for rr in answers if rr.type == rtype]


def isSecure(result: Any) -> bool:
    """Whether a lookup result came in an answer with the AD bit (L{makeResolver}'s
    C{dnssec}: the validating resolver vouches for it, RFC 4035 section 3.2.3)."""
    return bool(getattr(result, "secure", False))


class _Answer(tuple):
    """A lookup result, C{(answers, authority, additional)}, and whether it is DNSSEC-valid
    (L{isSecure}); C{name}, set by L{MXResolver._lookup}, the owner of its records: the
    name asked, or the end of the CNAME chain that led to them."""

    secure: bool = False
    name: str | None = None

    @classmethod
    def of(cls, result: Any, secure: bool) -> _Answer:
        """C{result} (the triple, or a list of answers) as an L{_Answer}."""
        answer = cls(result if isinstance(result, tuple) else (result, [], []))
        answer.secure = secure
        return answer


def _owner(name: bytes) -> bytes:
    """A DNS name as compared: lower case, without its final dot."""
    return name.lower().rstrip(b".")


def _exchangeProblem(name: bytes) -> str | None:
    """Why the exchange C{name} of an MX record (as DNS gives it, one final dot allowed) is
    not a host name, or C{None}: L{hostnameProblem} with underscores allowed, as Postfix's
    C{valid_hostname} takes them; an internationalized name is in its ASCII form
    (C{xn--}).  An IP address written as the exchange is taken (as the domain's host), but
    not one with a zone (C{%...}: any octets, naming a link of this host)."""
    try:
        text = name.decode("ascii")
    except UnicodeDecodeError:
        return "not ASCII: an internationalized name is given in its xn-- form"
    if "%" in text:
        return 'an address with a zone ("%") is not a mail exchanger'
    if _isIP(text[:-1] if text.endswith(".") else text):
        return None
    return hostnameProblem(text, underscore=True)


#: At most this many MX hosts of a domain are used, the most preferred (Postfix's
#: C{dns_rr_list_limit}): a DNS answer may hold hundreds.
_MX_HOSTS_LIMIT = 100
#: The addresses of this many MX hosts are looked up at a time, in preference order, until
#: enough are known (L{MXResolver._lookedFarEnough}): not a query (and a UDP socket) for
#: each of hundreds of hosts at once.
_LOOKUP_BATCH = 10

#: At most this many CNAME indirections are followed (Postfix's dns_lookup()).
_CNAME_LIMIT = 10

_NXDOMAIN = "nxdomain"
_NODATA = "nodata"
_ERROR = "error"


class MXResolver:
    """Resolves SMTP next hops to addresses, through a Twisted C{IResolver} (never blocking).

    MX records are ordered by preference, shuffled among equal preferences (RFC 5321 section
    5.1); each MX host's addresses are looked up (A and AAAA, concurrently; ten hosts at a
    time, in order, until C{maxAddresses} addresses are known, more than half of them of
    each family looked up -- unlimited (L{resolve}), to the end of the preference reached;
    at most the first 100 hosts), hosts without an address are
    skipped; the addresses are cut to C{maxAddresses}, both families kept (L{limit}).  A
    domain without MX records is its own mail exchanger.  A domain with an MX record whose
    exchange is C{"."} has a null MX (RFC 7505), whatever other MX records it has (as
    Postfix).  An MX exchange written as an IP
    address is used as is.  An answer holding only a CNAME for the name asked is followed
    to its target, as a resolver does (L{_lookup}).

    Failures raise L{DeliveryFailure}: NXDOMAIN of the domain is permanent (5.1.2), a null
    MX permanent (5.1.10), a DNS error or time-out transient (4.4.3); no address for any
    host of a domain looked up (final answers: NXDOMAIN or no record) permanent (5.4.4, as
    Postfix), for a host named as the next hop (C{[host]}) transient (4.4.4: the operator's
    to fix).
    """

    def __init__(
        self,
        resolver: Any,
        clock: Any,
        timeout: float = 30,
        *,
        random: randomModule.Random | None = None,
        families: Sequence[int] = (4, 6),
        maxAddresses: int = 5,
    ) -> None:
        """
        @param resolver: a C{twisted.internet.interfaces.IResolver} (see L{makeResolver}).
        @param clock: an C{IReactorTime}, for the time-out.
        @param timeout: seconds each DNS query may take before it counts as failed.
        @param random: the source of the shuffle among MX hosts of equal preference.
        @param families: the address families to look up, in the order their addresses are
            tried for each host: C{(4, 6)} (the default: IPv4 first), C{(6, 4)}, or C{(4,)}
            to never use IPv6.
        @param maxAddresses: at most this many addresses are returned, 0 for no limit
            (Postfix's C{smtp_mx_address_limit}, 5 by default), so that a domain of many dead
            MX hosts does not hold a delivery for hours.
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

    @inlineCallbacks
    def _lookup(self, method: str, name: str, rtype: int) -> Any:
        """L{_query} for records of type C{rtype}, following a CNAME as a resolver does: an
        answer that holds no such record but a CNAME chain from C{name} (a name server that
        does not recurse: the alias's target is elsewhere) is asked again for the chain's
        target (RFC 1034 section 3.6.2; RFC 5321 section 5.1), at most L{_CNAME_LIMIT}
        times (Postfix's dns_lookup()); beyond, or round a loop, no record."""
        target = name
        secure = True  # (every answer of the chain must be: RFC 7672 section 2.1.2)
        for _ in range(_CNAME_LIMIT):
            result = yield self._query(method, target)
            secure = secure and isSecure(result)
            result = _Answer.of(result, secure)
            answers = result[0]
            aliases = {_owner(rr.name.name): _owner(rr.payload.name.name)
                       for rr in answers if rr.type == dns.CNAME}
            current, seen = _owner(target.encode("ascii", "replace")), set()
            while current in aliases and current not in seen:
                seen.add(current)
                current = aliases[current]
            result.name = current.decode("ascii", "replace")
            if any(rr.type == rtype for rr in answers) or not seen:
                return result  # (the records, or no alias: the answer stands)
            target = result.name
        log.info("{name}: CNAME chain longer than {limit} (or a loop): given up",
                 name=name, limit=_CNAME_LIMIT)
        return ([], [], [])

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

        @return: a Deferred firing with C{(addresses, problem, secure, expanded)}:
            C{problem} is C{None}, L{_NXDOMAIN}, L{_NODATA} or a description of a DNS error;
            C{secure}, the set of the addresses that came in DNSSEC-validated answers
            (L{isSecure}; as the C{dnssec_valid} of each of Postfix's address records);
            C{expanded}, the end of the CNAME chain that led to the addresses when C{name}
            is an alias (L{MXHost.expanded}; Postfix's C{rname}), else C{None}.
        """
        if _isIP(name):
            return [name], None, frozenset(), None
        methods = {4: ("lookupAddress", dns.A), 6: ("lookupIPV6Address", dns.AAAA)}
        queries = [self._lookup(methods[f][0], name, methods[f][1]) for f in self.families]
        outcomes = yield defer.DeferredList(queries, consumeErrors=True)
        addresses: list[str] = []
        problems = []
        secure: set[str] = set()
        expanded = None
        asked = _owner(name.encode("ascii", "replace")).decode("ascii", "replace")
        for family, (ok, result) in zip(self.families, outcomes, strict=True):
            if ok:
                owner = getattr(result, "name", None)
                if expanded is None and owner and owner != asked:
                    expanded = owner
                if family == 4:
                    found = [p.dottedQuad() for p in _records(result, dns.A)]
                else:
                    found = [
                        str(ipaddress.IPv6Address(p.address)) for p in _records(result, dns.AAAA)
                    ]
                for a in found:
                    if a not in addresses:
                        addresses.append(a)
                        if isSecure(result):
                            secure.add(a)
            else:
                kind = self._classify(result)
                problems.append(kind if kind != _ERROR else _describe(result))
        if addresses:
            return addresses, None, frozenset(secure), expanded
        if problems and all(p == _NXDOMAIN for p in problems):
            return [], _NXDOMAIN, frozenset(), None
        errors = [p for p in problems if p not in (_NXDOMAIN, _NODATA)]
        if errors:
            return [], errors[0], frozenset(), None
        return [], _NODATA, frozenset(), None

    @staticmethod
    def _hostNamesOnly(domain: str, records: list[Any]) -> list[Any]:
        """The MX C{records} of C{domain} whose exchange is a host name (L{_exchangeProblem});
        each other is skipped with a warning, as Postfix does.  None left: a permanent
        failure (Postfix's 5.4.4), the domain's own address is not tried."""
        valid = []
        for record in records:
            problem = _exchangeProblem(record.name.name)
            if problem is None:
                valid.append(record)
            else:
                log.warn(
                    "malformed domain name in resource data of MX record for {domain}: "
                    "{name} ({problem})",
                    domain=domain,
                    name=describeValue(record.name.name.decode("utf-8", "backslashreplace")),
                    problem=problem,
                )
        if not valid:
            raise PermanentFailure(
                code="5.4.4",
                diagnostic="X-mailrelay; malformed domain name in resource data of MX record "
                f"for {domain}",
            )
        return valid

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

    def resolve(self, nexthop: str, *, limited: bool = True) -> Deferred:
        """Resolve C{nexthop} (see the module docstring for its forms).

        @param limited: cut the addresses to C{maxAddresses} (L{limit}); else the caller
            does, after dropping the relay itself from them (the SMTP backend: Postfix's
            smtp_domain_addr() runs smtp_find_self() before smtp_balance_inet_proto()), and
            every MX host of the last preference looked up is (L{_lookedFarEnough}).
        @return: a Deferred firing with a non-empty list of L{MXHost}, in the order to try
            them (for each host, its addresses in L{families} order), or failing with
            L{DeliveryFailure}.
        """
        d = self._resolve(nexthop, wholePreference=not limited)
        return d.addCallback(self.limit) if limited else d

    @inlineCallbacks
    def _resolve(self, nexthop: str, wholePreference: bool = False) -> Any:
        """L{resolve}, without L{limit}; with C{wholePreference}, the MX hosts looked up
        go on to the end of the last preference reached (L{_lookedFarEnough})."""
        try:
            parsed = parseSMTPNexthop(nexthop, strict=False)
        except ValueError as e:
            raise TransientFailure(code="4.4.0", diagnostic=f"X-mailrelay; {e}") from None
        host, port, mxLookup = parsed.host, parsed.port, parsed.mxLookup
        if _isIP(host):
            return [MXHost(host, host, port)]
        if not mxLookup:
            addresses, problem, secure, expanded = yield self._addresses(host)
            if not addresses:
                raise self._noAddress(host, problem, [host])
            return [MXHost(host, a, port, secure=a in secure, expanded=expanded)
                    for a in addresses]

        try:
            result = yield self._lookup("lookupMailExchange", host, dns.MX)
        except Exception:
            failure = _currentFailure()
            kind = self._classify(failure)
            if kind == _NXDOMAIN:
                raise PermanentFailure(
                    code="5.1.2",
                    diagnostic=f"X-mailrelay; domain {host} does not exist",
                ) from None
            if kind == _ERROR:
                raise TransientFailure(
                    code="4.4.3",
                    diagnostic=f"X-mailrelay; cannot look up the MX records of {host}: "
                    f"{_describe(failure)}",
                ) from None
            result = ([], [], [])
        mxSecure = isSecure(result)
        records = _records(result, dns.MX)
        real = [r for r in records if r.name.name not in (b"", b".")]  # not "." (RFC 7505)
        if len(real) < len(records):
            # Any null MX in the answer, even beside real ones (which RFC 7505 section 3
            # forbids): the domain accepts no mail (Postfix's dns_lookup(), DNS_NULLMX).
            raise PermanentFailure(
                code="5.1.10",
                diagnostic=f"X-mailrelay; domain {host} does not accept mail (null MX)",
            )
        if real:
            real = self._hostNamesOnly(host, real)
        if not real:
            # RFC 5321 section 5.1: no MX, the domain is its own mail exchanger.
            addresses, problem, secure, expanded = yield self._addresses(host)
            if not addresses:
                if problem == _NXDOMAIN:
                    raise PermanentFailure(
                        code="5.1.2",
                        diagnostic=f"X-mailrelay; domain {host} does not exist",
                    )
                raise self._noAddress(host, problem, [host], final=True)
            return [MXHost(host, a, port, secure=mxSecure and a in secure, expanded=expanded)
                    for a in addresses]

        owner = getattr(result, "name", None)  # (the end of a CNAME chain from host)
        domainExpanded = (owner if mxSecure and owner and owner != host.lower().rstrip(".")
                          else None)
        ordered = self._orderMX(real)[:_MX_HOSTS_LIMIT]
        hosts: list[MXHost] = []
        problems = []
        looked = 0
        while looked < len(ordered) and not self._lookedFarEnough(hosts, ordered, looked,
                                                                  wholePreference):
            batch = ordered[looked : looked + _LOOKUP_BATCH]
            looked += len(batch)
            lookups = yield defer.gatherResults(
                [self._addresses(name) for _, name in batch], consumeErrors=True
            )
            for (preference, name), (addresses, problem, secure, expanded) in zip(
                    batch, lookups, strict=True):
                if not addresses:
                    log.info(
                        "MX host {mx} of {domain} has no address: {problem}",
                        mx=name,
                        domain=host,
                        problem=problem,
                    )
                    problems.append(problem)
                for a in addresses:
                    hosts.append(MXHost(name, a, port, preference, mxSecure and a in secure,
                                        expanded, domainExpanded))
        if not hosts:
            problem = next((p for p in problems if p not in (_NXDOMAIN, _NODATA)), _NODATA)
            raise self._noAddress(host, problem, [n for _, n in ordered], final=True)
        return hosts

    def _lookedFarEnough(self, hosts: list[MXHost], ordered: list[tuple[int, str]],
                         looked: int, wholePreference: bool) -> bool:
        """Whether the addresses of the first C{looked} MX hosts of C{ordered} (giving
        C{hosts}) are all that is needed: L{_enough} of them and, with
        C{wholePreference}, every host of the last preference looked up -- so that the
        relay, which drops itself and every host of its preference and beyond before the
        limit applies (the SMTP backend), is found wherever the shuffle put it among
        them, as Postfix's smtp_domain_addr() looks for itself (smtp_find_self) over the
        whole list.  A less preferred host cannot change what is kept: it is cut by the
        limit, or dropped with the relay.  (Bounded still: L{_MX_HOSTS_LIMIT} hosts.)"""
        if not self._enough(hosts):
            return False
        return not wholePreference or ordered[looked][0] != ordered[looked - 1][0]

    def _enough(self, hosts: list[MXHost]) -> bool:
        """Whether the addresses of more MX hosts cannot change what L{limit} keeps of
        C{hosts}: C{maxAddresses} are known and, when both families are looked up, more
        than half of them of each (else one found further down would be kept)."""
        limit = self.maxAddresses
        if not 0 < limit <= len(hosts):
            return False
        return all(sum(h.family == f for h in hosts) > limit // 2 for f in self.families)

    @inlineCallbacks
    def danePolicy(self, host: MXHost, domain: str) -> Any:
        """The DANE TLSA records of C{host} for mail to C{domain} (RFC 7672 section 2.2.3, as
        Postfix's tls_dane_resolve()): those of C{_<port>._tcp.<host name>}, asked only when
        C{host.secure} (its MX and address records were DNSSEC-validated), through a
        resolver of L{makeResolver}'s C{dnssec}.  When C{host.name} is an alias (a secure
        CNAME chain: C{host.secure} covers it), those of its expansion C{host.expanded} are
        asked first, and those of C{host.name} only when there are none there -- no record,
        NXDOMAIN, or an answer not validated (RFC 7672 section 2.2.2, RFC 7671 section 7).
        The name whose records are used is the TLSA base domain: a name the certificate
        may be for (DANE-TA), with C{host.domainExpanded} (C{domain}'s end of a secure
        CNAME chain) and C{domain} (RFC 7672 section 3.2.3; Postfix's DANE match list: the
        base domain, then the MX RRset's rname and qname).

        @return: a Deferred firing with a L{DANEPolicy} -- its usable records, none when
            the records published are all unusable -- or C{None}: no DANE for C{host}
            (insecure, no TLSA record, an insecure answer: opportunistic TLS).
        @raise TransientFailure: a TLSA lookup failed (4.7.5; Postfix defers the host:
            "TLSA lookup error for host:port"); the original name is then not asked.
        """
        if not host.secure:
            return None
        for name in dict.fromkeys(n for n in (host.expanded, host.name) if n):
            policy = yield self._tlsaAt(host, name, domain)
            if policy is not None:
                return policy
        return None

    @inlineCallbacks
    def _tlsaAt(self, host: MXHost, name: str, domain: str) -> Any:
        """The L{DANEPolicy} of the TLSA records of C{_<port>._tcp.<name>} for C{host}, or
        C{None} when there are none that are validated (see L{danePolicy})."""
        base = f"_{host.port}._tcp.{name}"
        try:
            result = yield self._lookup("lookupTLSA", base, TLSA)
        except Exception:
            failure = _currentFailure()
            if self._classify(failure) != _ERROR:  # (NXDOMAIN, no record: no DANE)
                return None
            raise TransientFailure(
                code="4.7.5",
                diagnostic=f"X-mailrelay; TLSA lookup error for {host.name}:{host.port}: "
                f"{_describe(failure)}",
            ) from None
        if not isSecure(result):
            log.info("TLSA records of {base} are not DNSSEC-validated: not used", base=base)
            return None
        found = [TLSARecord.fromWire(getattr(p, "data", b"")) for p in _records(result, TLSA)]
        records = [r for r in found if r is not None]
        if not records:
            return None
        usable = tuple(r for r in records if r.usable)
        if not usable:
            log.info("TLSA records of {base} are all unusable: TLS without verification "
                     "(RFC 7672 section 2.2)", base=base)
        names = tuple(dict.fromkeys(n for n in (name, host.domainExpanded,
                                                domain.lower().rstrip(".")) if n))
        return DANEPolicy(base, usable, names)

    def limit(self, hosts: list[MXHost]) -> list[MXHost]:
        """C{hosts} cut to C{maxAddresses}, neither family crowding the other out when both
        are in use (Postfix's C{smtp_balance_inet_protocols}, yes by default:
        smtp_balance_inet_proto() in smtp_addr.c): a family of at most half the limit keeps
        all its addresses and the other the rest; both of more, half each, the extra one of
        an odd limit to the first address's family.  The order is kept."""
        limit = self.maxAddresses
        if not 0 < limit < len(hosts):
            return hosts
        counts = {f: sum(h.family == f for h in hosts) for f in (4, 6)}
        if not counts[4] or not counts[6]:
            return hosts[:limit]
        if counts[6] <= limit // 2:
            keep = {6: counts[6], 4: limit - counts[6]}
        elif counts[4] <= limit // 2:
            keep = {4: counts[4], 6: limit - counts[4]}
        else:
            other = 6 if hosts[0].family == 4 else 4
            keep = {hosts[0].family: (limit + 1) // 2, other: limit // 2}
        kept = []
        for host in hosts:
            if keep[host.family] > 0:
                kept.append(host)
                keep[host.family] -= 1
        return kept

    @staticmethod
    def _noAddress(
        domain: str, problem: str | None, names: list[str], final: bool = False
    ) -> DeliveryFailure:
        """No address for C{names}: permanent (5.4.4) when C{final} (the domain's own
        lookup) and every answer was final (NXDOMAIN, no record), else transient."""
        if problem in (None, _NXDOMAIN, _NODATA):
            if names == [domain]:
                text = f"host {domain} has no address"
            else:
                text = f"no MX host of {domain} has an address ({', '.join(names)})"
            if final and problem is not None:
                return PermanentFailure(code="5.4.4", diagnostic=f"X-mailrelay; {text}")
            return TransientFailure(code="4.4.4", diagnostic=f"X-mailrelay; {text}")
        return TransientFailure(
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
    answer = dnsAnswerCode(failure)
    if answer is not None:
        return answer[0] or "unknown DNS error"
    return f"{failure.type.__name__}: {failure.getErrorMessage()}"


#: The answer codes after which the C library's resolver (C{res_send}) asks the next name
#: server: a server that fails, or will not answer, says nothing about the name.
_ASK_NEXT = frozenset((dns.ESERVER, dns.ENOTIMP, dns.EREFUSED))


#: Seconds a query over TCP (after a truncated answer) may take, as Twisted's C{queryTCP}.
_TCP_TIMEOUT = 10


#: The TLSA record type (RFC 6698), which Twisted does not know.
TLSA = 52


def _askingAD(protocol: Any, dnssec: bool) -> Any:
    """C{protocol} (a C{twisted.names} DNS protocol), its queries sent with the AD bit when
    C{dnssec}: a validating resolver then says whether it validated the answer (RFC 6840
    section 5.7), which Twisted's C{Resolver} gives no way to ask."""
    if dnssec:
        write = protocol.writeMessage

        def writeMessage(message: Any, *address: Any) -> None:
            message.authenticData = 1
            write(message, *address)

        protocol.writeMessage = writeMessage
    return protocol


def _question(message: Any) -> list[Any]:
    """The question section of C{message}, as compared: C{dns.Query}s are equal when their
    names (in any case), types and classes are."""
    return list(message.queries)


def _answersAsked(protocol: Any) -> Any:
    """C{protocol} (a C{dns.DNSDatagramProtocol}), an answer whose question section is not
    that of the query of its ID dropped, as never received: it answers something else (RFC
    5452 section 9.1; the C library's res_send checks it with res_queriesmatch() and waits
    on); so is a message that is no answer (its QR bit clear: the query sent back).
    Twisted matches an answer to its query by ID (and server) alone."""
    write = protocol.writeMessage
    receive = protocol.datagramReceived
    asked: dict[int, list[Any]] = {}

    def writeMessage(message: Any, *address: Any) -> None:
        asked[message.id] = _question(message)
        write(message, *address)

    def datagramReceived(data: bytes, address: Any) -> None:
        answer = dns.Message()
        try:
            answer.fromStr(data)
        except (EOFError, ValueError):
            return receive(data, address)  # (Twisted logs and drops it)
        expected = asked.get(answer.id)
        if expected is not None and not answer.answer:  # (QR clear: RFC 1035 section 4.1.1)
            log.info("DNS message from {server} dropped: not an answer (a query, sent back?)",
                     server=address)
            return None
        if expected is not None and _question(answer) != expected:
            log.info("DNS answer from {server} dropped: not the question asked ({got} "
                     "instead of {expected})", server=address, got=_question(answer),
                     expected=expected)
            return None
        return receive(data, address)

    protocol.writeMessage = writeMessage
    protocol.datagramReceived = datagramReceived
    return protocol


class _OneQuery:
    """The controller of a C{dns.DNSProtocol} that carries one query (L{_Resolver}): the
    protocol's own Deferred has the answer, there is nothing to be told."""

    def connectionMade(self, protocol: Any) -> None:
        pass

    def connectionLost(self, protocol: Any) -> None:
        pass

    def messageReceived(self, message: Any, protocol: Any, address: Any = None) -> None:
        pass


def _option(options: dict[str, str], key: str, default: int, most: int) -> int:
    """The number of resolv.conf's C{options key:n}, within 1 to C{most} as the C library
    bounds it, or C{default} when it is not given or not a number."""
    try:
        return min(max(int(options[key]), 1), most)
    except (KeyError, ValueError):
        return default


class _Resolver(client.Resolver):
    """C{client.Resolver} asking its name servers as the C library does for Postfix: in the
    order listed, the next one also when one answers SERVFAIL, NOTIMP or REFUSED (Twisted's
    asks the next only after a time-out, so one broken server deferred every lookup).
    Time-outs go round the servers as Twisted's do, each round with the next of the
    time-outs; when every server answered such a code, the last answer stands.  A truncated
    answer (TC) is asked again over TCP of the same server (Twisted's asked the next server
    of its round, which may be down); when that fails, the next server is asked.  From
    C{/etc/resolv.conf}, its C{options} C{timeout}, C{attempts} and C{rotate} are honoured
    too (L{parseConfig}).
    """

    #: Ask with the AD bit set and report it in the answers (L{makeResolver}'s C{dnssec}).
    dnssec = False
    #: Each query starts at the next name server (resolv.conf's C{options rotate}).
    rotate = False
    #: The time-out of each round (Twisted's C{timeout}: its annotation says C{None}).
    timeout: Any
    _given: Sequence[float] | None = None
    _turn = 0

    def parseConfig(self, resolvConf: Any) -> None:
        """Twisted's (the C{nameserver} lines), and the C{options} the C library's resolver
        takes from C{/etc/resolv.conf} for Postfix: C{timeout:n} seconds a server (1 to
        30; 5 by default), C{attempts:n} rounds (1 to 5; 2 by default), C{rotate}.  With
        neither C{timeout} nor C{attempts}, Twisted's time-outs stand.  (C{search},
        C{domain} and C{ndots} are not used: mail domains are never completed, as
        Postfix's resolver is told.)"""
        lines = list(resolvConf)
        super().parseConfig(lines)
        if self._given is None:
            self._given = self.timeout
        options: dict[str, str] = {}
        for line in lines:
            fields = line.split()
            if fields[:1] == [b"options"]:
                for option in fields[1:]:
                    key, _, value = option.decode("ascii", "replace").partition(":")
                    options[key] = value
        self.rotate = "rotate" in options
        timeout, attempts = _option(options, "timeout", 5, 30), _option(options, "attempts", 2, 5)
        if "timeout" in options or "attempts" in options:
            self.timeout = (timeout,) * attempts
        else:
            self.timeout = self._given

    def _connectedProtocol(self, interface: str = "") -> Any:
        return _askingAD(_answersAsked(super()._connectedProtocol(interface)), self.dnssec)

    def filterAnswers(self, message: Any) -> Any:
        """Twisted's, the result keeping the answer's AD bit when asked for it (L{isSecure}):
        set by a validating resolver for data it has validated (RFC 4035 section 3.2.3), as
        Postfix's dns_lookup() trusts it from the resolver it is configured with."""
        result = super().filterAnswers(message)
        if isinstance(result, tuple):
            return _Answer.of(result, self.dnssec and bool(message.authenticData))
        return result

    def lookupTLSA(self, name: str, timeout: Any = None) -> Deferred:
        """The TLSA records of C{name} (RFC 6698; C{dns.UnknownRecord} payloads), as the
        other C{lookup*} methods."""
        return self._lookup(name, dns.IN, TLSA, timeout)

    def queryUDP(self, queries: Any, timeout: Any = None) -> Deferred:
        timeouts: Sequence[float] = (self.timeout or ()) if timeout is None else timeout
        return Deferred.fromCoroutine(self._queryInTurn(queries, timeouts))

    async def _queryInTurn(self, queries: Any, timeouts: Sequence[float]) -> Any:
        servers: list[Any] = list(self.servers or ()) + list(self.dynServers or ())
        if not servers:
            raise OSError("No domain name servers available")
        if self.rotate:
            first, self._turn = self._turn % len(servers), self._turn + 1
            servers = servers[first:] + servers[:first]
        failed: Any = None
        tcpError: Exception | None = None
        answeredFailure: list[Any] = []
        for timeout in timeouts:
            for server in servers:
                if server in answeredFailure:
                    continue
                try:
                    message = await self._query(server, queries, timeout)
                except dnsError.DNSQueryTimeoutError:
                    continue
                if message.trunc:
                    try:
                        message = await self._queryOverTCP(server, queries)
                    except defer.CancelledError:
                        raise
                    except Exception as e:
                        tcpError = e
                        answeredFailure.append(server)
                        continue
                    # Truncated over TCP too: taken as it is, as res_send returns it and
                    # Postfix's dns_query() uses it (filterAnswers would ask over TCP again).
                    message.trunc = 0
                if message.rCode not in _ASK_NEXT:
                    return message
                failed = message
                answeredFailure.append(server)
            if len(answeredFailure) == len(servers):
                break
        if failed is not None:
            return failed
        if tcpError is not None:
            raise tcpError
        raise defer.TimeoutError(queries)

    async def _queryOverTCP(self, server: tuple[str, int], queries: Any) -> Any:
        """The answer of C{server} to C{queries} over a TCP connection of their own."""
        host, port = server
        endpointType = TCP6ClientEndpoint if _isIP(host) == 6 else TCP4ClientEndpoint
        endpoint = endpointType(self._reactor, host, port, timeout=_TCP_TIMEOUT)
        protocol = await connectProtocol(endpoint, _askingAD(
            dns.DNSProtocol(_OneQuery(), self._reactor), self.dnssec))
        try:
            answer = await protocol.query(queries, _TCP_TIMEOUT)
        finally:
            protocol.transport.loseConnection()
        if not answer.answer or _question(answer) != list(queries):  # (L{_answersAsked})
            raise dnsError.DNSFormatError(f"the answer of {host} port {port} over TCP is not "
                                          f"to the question asked: {_question(answer)}")
        return answer


#: The system resolver's configuration (the C library's).
RESOLV_CONF = b"/etc/resolv.conf"


def _isLoopback(host: str) -> bool:
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False  # (not an address: a name of resolv.conf, which the C library skips)


def remoteNameservers(resolver: Any) -> tuple[str, list[str]]:
    """Where the name servers of C{resolver} (a L{makeResolver} one of C{dnssec}) come
    from (C{[dns] nameservers}, or the path of resolv.conf), and those of them not on a
    loopback address (C{"192.0.2.53"}, C{"192.0.2.53 port 5353"}): their AD bit proves
    nothing to the relay but what the path to them lets through (RFC 4035 section 4.9.3:
    a stub resolver relies on a validating resolver's AD bit over a secure channel only;
    Postfix, which trusts the AD bit of the servers of resolv.conf whatever its
    C{trust-ad} says, recommends one on a loopback address)."""
    where = "[dns] nameservers" if resolver.resolv is None else os.fsdecode(resolver.resolv)
    remote = [
        host if port == 53 else f"{host} port {port}"
        for host, port in [*(resolver.servers or ()), *(resolver.dynServers or ())]
        if not _isLoopback(host)
    ]
    return where, remote


def makeResolver(nameservers: Sequence[Any] | None = None, *, reactor: Any = None,
                 dnssec: bool = False) -> Any:
    """A DNS resolver: the system's, or one asking only C{nameservers}.

    With C{dnssec}, it asks with the AD bit and its answers say whether the resolver
    validated them (L{isSecure}), as Postfix's C{smtp_dns_support_level = dnssec}; it then
    has no cache (its answers would not say), even for the system's
    resolver (the name servers of C{/etc/resolv.conf}), and has C{lookupTLSA}.

    @param nameservers: C{None} or empty for the system's resolver
        (C{twisted.names.client.createResolver()} without C{/etc/hosts}: a cache and the
        servers of C{/etc/resolv.conf}, as Postfix's default C{smtp_host_lookup = dns});
        otherwise name servers as C{"10.0.0.1"}, C{"127.0.0.1:5353"},
        C{"::1"} or C{"[::1]:53"} (or C{(address, port)} pairs, as
        L{mailrelay.config.Config.nameservers} holds them), asked in turn (L{_Resolver}),
        without cache and without the hosts file.
    @raise ValueError: a bad name server (the message names it).
    """
    if not nameservers and dnssec:
        resolver = _Resolver(RESOLV_CONF, reactor=reactor)
        resolver.dnssec = True
        return resolver
    if not nameservers:
        # client.createResolver() without its hosts file (it takes no reactor either): its
        # resolver re-reads resolv.conf every minute, and its cache expires entries, on the
        # relay's reactor.  No /etc/hosts: Postfix's default smtp_host_lookup = dns.
        return resolve.ResolverChain([
            cache.CacheResolver(reactor=reactor),
            _Resolver(RESOLV_CONF, reactor=reactor),
        ])
    servers = [
        (str(ns[0]), int(ns[1])) if isinstance(ns, tuple) else parseNameserver(ns)
        for ns in nameservers
    ]
    resolver = _Resolver(servers=servers, reactor=reactor)
    resolver.dnssec = dnssec
    return resolver
