"""DNSSEC for DANE (RFC 7672 section 2.1, RFC 6840 section 5.7): the resolver of
L{makeResolver}'s C{dnssec} asks with the AD bit and keeps the answer's, the MX hosts say
whether their records were validated, and their TLSA records are looked up
(L{MXResolver.danePolicy}) -- over a fake UDP network on a L{Clock}."""

from __future__ import annotations

from typing import Any

import pytest
from twisted.internet import defer
from twisted.internet.task import Clock
from twisted.names import dns

from mailrelay.errors import TransientFailure
from mailrelay.route.mx import TLSA, MXHost, MXResolver, isSecure, makeResolver
from mailrelay.smtp.clientsettings import DANEPolicy, TLSARecord
from tests.harness import fired

SHA256 = bytes(range(32))


class _Transport:
    def __init__(self, network: Network, protocol: Any) -> None:
        self.network, self.protocol = network, protocol

    def write(self, datagram: bytes, address: Any) -> None:
        self.network.answer(self.protocol, datagram, address)

    def stopListening(self) -> None:
        pass


class Network(Clock):
    """A reactor (L{Clock}) whose UDP name server answers from C{zone}: C{(name, type)} ->
    C{(records, ad)} (a record of another owner, a CNAME's target, as a C{dns.RRHeader}),
    or an answer code; names not there are NXDOMAIN.  C{asked} keeps
    each query's name, type and AD bit."""

    def __init__(self, zone: dict[tuple[str, int], Any]) -> None:
        super().__init__()
        self.zone = zone
        self.asked: list[tuple[str, int, int]] = []

    def listenUDP(self, port: int, protocol: Any, interface: str = "", **kw: Any) -> Any:
        protocol.makeConnection(_Transport(self, protocol))
        return protocol.transport

    def answer(self, protocol: Any, datagram: bytes, address: Any) -> None:
        query = dns.Message()
        query.fromStr(datagram)
        q = query.queries[0]
        name = q.name.name.decode()
        self.asked.append((name, q.type, query.authenticData))
        entry = self.zone.get((name, q.type), dns.ENAME if not any(
            n == name for n, _ in self.zone) else ([], True))
        reply = dns.Message(id=query.id, answer=1, recDes=1, recAv=1)
        reply.queries = query.queries
        if isinstance(entry, int):
            reply.rCode = entry
        else:
            records, reply.authenticData = entry
            reply.answers = [r if isinstance(r, dns.RRHeader) else  # (another owner's)
                             dns.RRHeader(name, r.TYPE if r.TYPE is not None else TLSA,
                                          payload=r) for r in records]
        self.callLater(0, protocol.datagramReceived, reply.toStr(), address)

    def run(self, d: defer.Deferred) -> Any:
        for _ in range(50):
            self.advance(0)
        return fired(d)


def _tlsa(*fields: int, data: bytes = SHA256) -> dns.UnknownRecord:
    record = dns.UnknownRecord(bytes(fields) + data)
    return record


ZONE: dict[tuple[str, int], Any] = {
    ("example.org", dns.MX): ([dns.Record_MX(10, b"mx.example.org")], True),
    ("mx.example.org", dns.A): ([dns.Record_A("192.0.2.1")], True),
    ("mx.example.org", dns.AAAA): ([], True),
    ("_25._tcp.mx.example.org", TLSA): ([_tlsa(3, 1, 1), _tlsa(0, 0, 1)], True),
    ("insecure.example", dns.MX): ([dns.Record_MX(10, b"mx.example.org")], False),
    ("insecure-a.example", dns.MX): ([dns.Record_MX(10, b"mx.insecure-a.example")], True),
    ("mx.insecure-a.example", dns.A): ([dns.Record_A("192.0.2.2")], False),
    ("mx.insecure-a.example", dns.AAAA): ([], True),
}


def _resolve(zone: dict, nexthop: str, dnssec: bool = True) -> tuple[Any, Network]:
    network = Network(zone)
    resolver = makeResolver(["192.0.2.53"], reactor=network, dnssec=dnssec)
    return network.run(MXResolver(resolver, network).resolve(nexthop)), network


def test_queries_ask_with_the_ad_bit_and_answers_keep_it() -> None:
    """RFC 6840 5.7: a query with AD=1 asks a validating resolver to say whether it
    validated the answer; Postfix trusts the AD bit of its configured resolver."""
    network = Network(ZONE)
    resolver = makeResolver(["192.0.2.53"], reactor=network, dnssec=True)
    result = network.run(resolver.lookupMailExchange("example.org"))
    assert isSecure(result)
    assert network.asked == [("example.org", dns.MX, 1)]
    assert not isSecure(network.run(resolver.lookupMailExchange("insecure.example")))
    plain = Network(ZONE)
    result = plain.run(makeResolver(["192.0.2.53"], reactor=plain).lookupMailExchange(
        "example.org"))
    assert not isSecure(result)  # (without dnssec: no AD asked, none believed)
    assert plain.asked == [("example.org", dns.MX, 0)]


def test_mx_hosts_are_secure_when_their_mx_and_address_records_are() -> None:
    hosts, _ = _resolve(ZONE, "example.org")
    assert hosts == [MXHost("mx.example.org", "192.0.2.1", 25, 10, True)]
    hosts, _ = _resolve(ZONE, "insecure.example")
    assert [h.secure for h in hosts] == [False]
    hosts, _ = _resolve(ZONE, "insecure-a.example")
    assert [h.secure for h in hosts] == [False]
    hosts, _ = _resolve(ZONE, "example.org", dnssec=False)
    assert [h.secure for h in hosts] == [False]


def test_each_address_is_secure_as_the_answer_that_gave_it() -> None:
    """As Postfix's dnssec_valid of each address record: an IPv4 address from a validated
    answer stays secure when the AAAA query fails or is not validated (else dropping the
    AAAA answers would turn DANE off), and an IPv6 one from an answer not validated is not
    secure."""
    zone = {**ZONE, ("mx.example.org", dns.AAAA): dns.ESERVER}
    hosts, _ = _resolve(zone, "example.org")
    assert [(h.address, h.secure) for h in hosts] == [("192.0.2.1", True)]
    zone = {**ZONE, ("mx.example.org", dns.AAAA): ([dns.Record_AAAA("2001:db8::1")], False)}
    hosts, _ = _resolve(zone, "example.org")
    assert [(h.address, h.secure) for h in hosts] == [
        ("192.0.2.1", True), ("2001:db8::1", False)]


def _policy(zone: dict, host: MXHost, domain: str = "example.org") -> Any:
    network = Network(zone)
    resolver = MXResolver(makeResolver(["192.0.2.53"], reactor=network, dnssec=True), network)
    return network.run(resolver.danePolicy(host, domain)), network


SECURE = MXHost("mx.example.org", "192.0.2.1", 25, 10, True)


def test_the_tlsa_records_of_a_secure_host_give_its_usable_records() -> None:
    policy, network = _policy(ZONE, SECURE)
    assert policy == DANEPolicy("_25._tcp.mx.example.org", (TLSARecord(3, 1, 1, SHA256),),
                                ("mx.example.org", "example.org"))
    assert network.asked == [("_25._tcp.mx.example.org", TLSA, 1)]


def test_no_tlsa_lookup_for_an_insecure_host() -> None:
    policy, network = _policy(ZONE, MXHost("mx.example.org", "192.0.2.1", 25, 10, False))
    assert policy is None and network.asked == []


@pytest.mark.parametrize("answer", [
    ([_tlsa(3, 1, 1)], False),       # not validated
    ([], True),                      # no record (NODATA)
    dns.ENAME,                       # NXDOMAIN
])
def test_no_dane_without_secure_tlsa_records(answer: Any) -> None:
    """RFC 7672 2.2.3 and Postfix: an insecure answer, or none, is no DANE (opportunistic
    TLS)."""
    policy, _ = _policy({**ZONE, ("_25._tcp.mx.example.org", TLSA): answer}, SECURE)
    assert policy is None


def test_records_all_unusable_give_a_policy_without_records() -> None:
    zone = {**ZONE, ("_25._tcp.mx.example.org", TLSA): ([_tlsa(1, 1, 1), _tlsa(3, 1, 9)], True)}
    policy, _ = _policy(zone, SECURE)
    assert policy is not None and policy.records == ()


def test_a_failing_tlsa_lookup_defers_the_host() -> None:
    """Postfix: "TLSA lookup error for host:port", 4.7.5: never opportunistic TLS then."""
    failure = _policy({**ZONE, ("_25._tcp.mx.example.org", TLSA): dns.ESERVER}, SECURE)[0]
    assert isinstance(failure.value, TransientFailure)
    assert failure.value.code == "4.7.5"
    assert failure.value.diagnostic.startswith(
        "X-mailrelay; TLSA lookup error for mx.example.org:25")


def test_the_tlsa_name_has_the_port_of_the_next_hop() -> None:
    zone = {("_2525._tcp.mx.example.org", TLSA): ([_tlsa(3, 1, 1)], True)}
    policy, _ = _policy(zone, MXHost("mx.example.org", "192.0.2.1", 2525, 10, True),
                        "Example.ORG.")
    assert policy.base == "_2525._tcp.mx.example.org"
    assert policy.names == ("mx.example.org", "example.org")


def test_the_system_resolver_under_dnssec_has_no_cache_nor_hosts_file() -> None:
    """Neither says whether an answer was validated: under DANE only the name servers of
    /etc/resolv.conf are asked (the validating resolver there)."""
    clock = Clock()
    resolver = makeResolver(None, reactor=clock, dnssec=True)
    assert (resolver.resolv, resolver.dnssec, resolver._reactor) == (
        b"/etc/resolv.conf", True, clock)
    assert not hasattr(resolver, "resolvers")  # (not a chain: no cache, no hosts file)


def _alias(target: str = "mx.provider.net") -> list[Any]:
    """The answer of a recursive resolver for C{mx.alias.example} A, an alias of C{target}."""
    return [dns.RRHeader("mx.alias.example", dns.CNAME,
                         payload=dns.Record_CNAME(target.encode())),
            dns.RRHeader(target, dns.A, payload=dns.Record_A("192.0.2.7"))]


CNAMED: dict[tuple[str, int], Any] = {
    ("alias.example", dns.MX): ([dns.Record_MX(10, b"mx.alias.example")], True),
    ("mx.alias.example", dns.A): (_alias(), True),
    ("mx.alias.example", dns.AAAA): (_alias()[:1], True),
    ("_25._tcp.mx.provider.net", TLSA): ([_tlsa(3, 1, 1)], True),
    ("_25._tcp.mx.alias.example", TLSA): ([_tlsa(3, 1, 2, data=bytes(64))], True),
}
CNAMED_HOST = MXHost("mx.alias.example", "192.0.2.7", 25, 10, True, "mx.provider.net")


def test_an_mx_host_reached_through_a_cname_keeps_its_expansion() -> None:
    hosts, _ = _resolve(CNAMED, "alias.example")
    assert hosts == [CNAMED_HOST]
    hosts, _ = _resolve(ZONE, "example.org")
    assert hosts[0].expanded is None  # (no alias)


def test_tlsa_records_are_sought_at_the_cname_expansion_first() -> None:
    """RFC 7672 section 2.2.2 (RFC 7671 section 7), as Postfix's tls_dane_resolve(): the
    expansion of a secure CNAME chain is asked first; its records are the host's, its name
    the TLSA base domain, a reference identifier (with the next hop's domain, as Postfix's
    DANE match list)."""
    policy, network = _policy(CNAMED, CNAMED_HOST, "alias.example")
    assert policy == DANEPolicy("_25._tcp.mx.provider.net", (TLSARecord(3, 1, 1, SHA256),),
                                ("mx.provider.net", "alias.example"))
    assert [a[0] for a in network.asked] == ["_25._tcp.mx.provider.net"]


@pytest.mark.parametrize("answer", [
    ([], True),                      # no record (NODATA)
    dns.ENAME,                       # NXDOMAIN
    ([_tlsa(3, 1, 1)], False),       # not validated
])
def test_without_tlsa_records_at_the_expansion_the_original_name_is_asked(
    answer: Any
) -> None:
    zone = {**CNAMED, ("_25._tcp.mx.provider.net", TLSA): answer}
    policy, network = _policy(zone, CNAMED_HOST, "alias.example")
    assert policy == DANEPolicy("_25._tcp.mx.alias.example",
                                (TLSARecord(3, 1, 2, bytes(64)),),
                                ("mx.alias.example", "alias.example"))
    assert [a[0] for a in network.asked] == ["_25._tcp.mx.provider.net",
                                             "_25._tcp.mx.alias.example"]


def test_a_failing_tlsa_lookup_at_the_expansion_is_not_followed_by_the_original_name() -> None:
    """As Postfix: a lookup error is not "nothing there"; the host is deferred."""
    zone = {**CNAMED, ("_25._tcp.mx.provider.net", TLSA): dns.ESERVER}
    failure, network = _policy(zone, CNAMED_HOST, "alias.example")
    assert isinstance(failure.value, TransientFailure)
    assert failure.value.diagnostic.startswith(
        "X-mailrelay; TLSA lookup error for mx.alias.example:25")
    assert [a[0] for a in network.asked] == ["_25._tcp.mx.provider.net"]


def _domainAlias(secure: bool) -> dict[tuple[str, int], Any]:
    """A zone where the domain shop.example is an alias of hosting.example (its CNAME
    answer validated when C{secure}), whose MX host has DANE-TA records."""
    return {
        ("shop.example", dns.MX): ([dns.RRHeader("shop.example", dns.CNAME,
                                                 payload=dns.Record_CNAME(b"hosting.example"))],
                                   secure),
        ("hosting.example", dns.MX): ([dns.Record_MX(10, b"mx.hosting.example")], True),
        ("mx.hosting.example", dns.A): ([dns.Record_A("192.0.2.8")], True),
        ("mx.hosting.example", dns.AAAA): ([], True),
        ("_25._tcp.mx.hosting.example", TLSA): ([_tlsa(2, 0, 1)], True),
    }


def test_a_securely_cname_expanded_next_hop_domain_is_a_reference_identifier() -> None:
    """RFC 7672 section 3.2.3, as Postfix's DANE match list (smtp_tls_policy.c: the TLSA
    base domain, then the MX RRset's rname and qname): when the next hop's domain is an
    alias and its MX records came through a DNSSEC-validated CNAME chain, a certificate a
    DANE-TA record vouches for may be for the chain's end (the hosting provider's domain)
    as for the domain itself or the MX host."""
    (host,), _ = _resolve(_domainAlias(True), "shop.example")
    assert host == MXHost("mx.hosting.example", "192.0.2.8", 25, 10, True,
                          domainExpanded="hosting.example")
    policy, _ = _policy(_domainAlias(True), host, "shop.example")
    assert policy.names == ("mx.hosting.example", "hosting.example", "shop.example")
    # Not through an alias: as before.
    (host,), _ = _resolve(ZONE, "example.org")
    assert host.domainExpanded is None


def test_an_insecure_cname_of_the_next_hop_domain_widens_nothing() -> None:
    """A CNAME answer that was not validated could have been forged: its target is not a
    name the certificate may be for (nor are the hosts found secure: no DANE at all)."""
    (host,), _ = _resolve(_domainAlias(False), "shop.example")
    assert (host.secure, host.domainExpanded) == (False, None)
