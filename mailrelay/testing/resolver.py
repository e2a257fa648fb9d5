"""A DNS resolver answering from records in memory, for tests of plugins that look things up
(DNS lists, SPF, DKIM keys, MX hosts, reverse names): L{FakeResolver}.

    resolver = FakeResolver({
        "example.org": {"MX": [(10, "mx.example.org")], "TXT": ["v=spf1 ip4:192.0.2.0/24 -all"]},
        "mx.example.org": {"A": ["192.0.2.10"], "AAAA": ["2001:db8::10"]},
        "192.0.2.10": {"PTR": ["mx.example.org"]},            # an address: its reverse name
        "sel._domainkey.example.org": {"TXT": [("v=DKIM1; k=rsa; ", "p=MIIB...")]},
    })
    context = makePluginContext(tmp_path, resolver=resolver)

It is a C{twisted.names} resolver (C{IResolver}, by L{twisted.names.common.ResolverBase}):
C{lookupAddress}, C{lookupIPV6Address}, C{lookupMailExchange}, C{lookupText},
C{lookupPointer}, C{lookupNameservers}, C{lookupCanonicalName}, C{query}, ... answer with the
C{(answers, authority, additional)} lists of C{RRHeader}s a real one gives.  A name with no
records at all is C{NXDOMAIN} (the Deferred fails with C{DomainError}); a name with records,
but none of the type asked, is an empty answer (NODATA).  L{fail} makes a query fail (a
timeout, a server failure), and a C{clock} with a C{delay} makes answers come later.  Names
are compared without case and without a trailing dot; C{queries} records what was asked.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Mapping, Sequence
from typing import Any

from twisted.internet.defer import Deferred, TimeoutError, fail, succeed
from twisted.names import dns
from twisted.names.common import ResolverBase
from twisted.names.error import DNSServerError, DomainError

__all__ = ["SERVFAIL", "FakeResolver"]

#: The record types L{FakeResolver} takes, by name, and how a value becomes a record.
_RECORDS: dict[str, tuple[int, Any]] = {
    "A": (dns.A, lambda v: dns.Record_A(v)),
    "AAAA": (dns.AAAA, lambda v: dns.Record_AAAA(v)),
    "MX": (dns.MX, lambda v: dns.Record_MX(int(v[0]), _name(v[1]))),
    "TXT": (dns.TXT, lambda v: dns.Record_TXT(*_strings(v))),
    "PTR": (dns.PTR, lambda v: dns.Record_PTR(_name(v))),
    "NS": (dns.NS, lambda v: dns.Record_NS(_name(v))),
    "CNAME": (dns.CNAME, lambda v: dns.Record_CNAME(_name(v))),
}


def _strings(value: str | Sequence[str]) -> list[bytes]:
    """The character-strings of one TXT record: a string, or a sequence of them."""
    return [p.encode("utf-8") for p in ((value,) if isinstance(value, str) else value)]


def _name(text: str | bytes) -> bytes:
    """A name in a record: a string, IDNA-encoded; bytes as they are (a name no encoding
    makes, as a broken or hostile server can answer)."""
    if isinstance(text, bytes):
        return text
    return text.lower().rstrip(".").encode("idna")


def _key(name: str | bytes) -> str:
    """A name as the records are kept: lower case, no trailing dot; an IP address becomes
    its reverse name (C{in-addr.arpa}, C{ip6.arpa})."""
    text = name.decode("ascii", "replace") if isinstance(name, bytes) else name
    text = text.lower().rstrip(".")
    try:
        return ipaddress.ip_address(text).reverse_pointer
    except ValueError:
        return text


class FakeResolver(ResolverBase):
    """An C{IResolver} answering from records in memory (see the module docstring).

    @ivar queries: every query asked, as C{(name, type)} pairs (C{("example.org", "MX")}).
    """

    def __init__(
        self,
        records: Mapping[str, Mapping[str, Sequence[Any]]] | None = None,
        *,
        clock: Any = None,
        delay: float = 0.0,
        ttl: int = 300,
    ) -> None:
        """
        @param records: name (or IP address, for its C{PTR}) to record type to values: C{A},
            C{AAAA} addresses; C{MX} C{(preference, exchange)}; C{TXT} a string or a tuple of
            strings (one record of several character-strings); C{PTR}, C{NS}, C{CNAME}
            names (a name given as bytes is answered as it is, not encoded).
        @param clock: with C{delay}, answers come C{delay} seconds later on this clock.
        """
        super().__init__()
        self._records: dict[str, dict[int, list[Any]]] = {}
        self._failures: dict[tuple[str, int | None], Exception] = {}
        self.clock = clock
        self.delay = delay
        self.ttl = ttl
        self.queries: list[tuple[str, str]] = []
        for name, byType in (records or {}).items():
            for kind, values in byType.items():
                self.add(name, kind, *values)

    def add(self, name: str, kind: str, *values: Any) -> None:
        """Add records of type C{kind} (C{"A"}, C{"MX"}, ...) to C{name}.

        @raise ValueError: a type L{FakeResolver} does not know.
        """
        try:
            code, make = _RECORDS[kind.upper()]
        except KeyError:
            known = ", ".join(_RECORDS)
            raise ValueError(f"unknown record type {kind!r}; known: {known}") from None
        found = self._records.setdefault(_key(name), {}).setdefault(code, [])
        found.extend(make(v) for v in values)

    def fail(self, name: str, kind: str | None = None, error: Exception | None = None) -> None:
        """Make queries for C{name} (of type C{kind}, or any) fail with C{error} (by default
        a C{TimeoutError}, as a server that does not answer)."""
        code = None if kind is None else _RECORDS[kind.upper()][0]
        self._failures[(_key(name), code)] = error if error is not None else TimeoutError(name)

    def remove(self, name: str) -> None:
        """Forget every record of C{name} (it becomes NXDOMAIN) and its failures."""
        key = _key(name)
        self._records.pop(key, None)
        for failure in [f for f in self._failures if f[0] == key]:
            del self._failures[failure]

    def _lookup(
        self, name: bytes, cls: int, type: int, timeout: Any = None
    ) -> Deferred[tuple[list[Any], list[Any], list[Any]]]:
        key = _key(name)
        self.queries.append((key, dns.QUERY_TYPES.get(type, str(type))))
        error = self._failures.get((key, type)) or self._failures.get((key, None))
        if error is not None:
            return self._later(fail(error))
        records = self._records.get(key)
        if records is None:
            return self._later(fail(DomainError(name)))
        wanted = records.get(type, [])
        if type == dns.ALL_RECORDS:
            wanted = [r for found in records.values() for r in found]
        answers = [
            dns.RRHeader(key.encode("ascii"), record.TYPE, dns.IN, self.ttl, record)
            for record in wanted
        ]
        return self._later(succeed((answers, [], [])))

    def _later(self, d: Deferred[Any]) -> Deferred[Any]:
        if self.clock is None or self.delay <= 0:
            return d

        def cancel(_: Deferred[Any]) -> None:
            if call.active():
                call.cancel()

        later: Deferred[Any] = Deferred(cancel)
        call = self.clock.callLater(self.delay, d.chainDeferred, later)
        return later


#: A server failure (SERVFAIL) to give L{FakeResolver.fail}.
SERVFAIL = DNSServerError
