"""Forward-confirmed reverse DNS of a client, never blocking the reactor.

The name is only used when one of its addresses is the client's address (as Postfix does;
one that does not resolve to it is logged as Postfix's smtpd does: "hostname X does not
resolve to address Y") and it is a host name of valid syntax (it goes into C{Received:} and
the logs: a PTR record may hold any octets, parentheses that would end the comment of
C{Received:} included); otherwise, or on any error or time-out, the client is "unknown".

An answer (a name or none) is remembered for L{REVERSE_CACHE_TIME} seconds per resolver, so
that a client opening many connections is looked up once, not at each of them; a failure or
time-out is not remembered.
"""

from __future__ import annotations

import os
from ipaddress import ip_address
from typing import Any
from weakref import WeakKeyDictionary

from twisted.internet.defer import Deferred, inlineCallbacks, succeed
from twisted.logger import Logger
from twisted.names import dns
from twisted.names.error import DomainError

from mailrelay.address import clientIP, hostnameProblem

log = Logger()

#: Seconds a client's reverse name (or its lack of one) is remembered.
REVERSE_CACHE_TIME = 60.0
#: Addresses remembered at most (per resolver); the oldest are forgotten first.
REVERSE_CACHE_SIZE = 4096
_caches: WeakKeyDictionary[Any, dict[str, tuple[float, str | None]]] = WeakKeyDictionary()


def _validName(name: str) -> bool:
    return hostnameProblem(name) is None


def _asciiName(name: bytes) -> str | None:
    """A name from the DNS, lower case, without its final dot; C{None} if it is not ASCII
    or ends with more than one dot (not a host name: skipped as one of bad syntax is)."""
    try:
        text = name.decode("ascii").lower()
    except UnicodeDecodeError:
        return None
    text = text[:-1] if text.endswith(".") else text
    return None if text.endswith(".") else text


def _answers(result: Any, rtype: int) -> list[Any]:
    answers = result[0] if isinstance(result, tuple) else result
    return [rr.payload for rr in answers if rr.type == rtype]


@inlineCallbacks
def _lookup(resolver: Any, host: str) -> Any:
    addr = clientIP(host)
    if addr is None:
        return None  # (reverseLookup asks for IP addresses only)
    ptr = yield resolver.lookupPointer(addr.reverse_pointer)
    names = [_asciiName(p.name.name) for p in _answers(ptr, dns.PTR)]
    names = [name for name in names if name is not None and _validName(name)]
    for name in names[:3]:
        try:
            if addr.version == 4:
                fwd = yield resolver.lookupAddress(name)
                found = {p.dottedQuad() for p in _answers(fwd, dns.A)}
            else:
                fwd = yield resolver.lookupIPV6Address(name)
                found = {str(ip_address(p.address)) for p in _answers(fwd, dns.AAAA)}
        except DomainError:  # (NXDOMAIN: a final answer, the next name is tried)
            log.warn("hostname {name} does not resolve to address {address}: the name does "
                     "not exist", name=name, address=str(addr))
            continue
        if str(addr) in found:
            return name
        # (As Postfix's smtpd_peer.c: a forged or stale name, told from no PTR record.)
        log.warn("hostname {name} does not resolve to address {address}", name=name,
                 address=str(addr))
    return None


_hostsCache: dict[str, tuple[tuple[int, int], dict[Any, str]]] = {}


def _hostsTable(path: str) -> dict[Any, str]:
    """Address to first name (of valid syntax), from C{path}; re-read only when the file
    changes."""
    st = os.stat(path)
    stamp = (st.st_mtime_ns, st.st_size)
    cached = _hostsCache.get(path)
    if cached is not None and cached[0] == stamp:
        return cached[1]
    table: dict[Any, str] = {}
    with open(path, encoding="utf-8", errors="replace") as f:
        for line in f:
            fields = line.split("#", 1)[0].split()
            names = [name.rstrip(".").lower() for name in fields[1:] if _validName(name)]
            if names:
                try:
                    table.setdefault(ip_address(fields[0]), names[0])
                except ValueError:
                    continue
    _hostsCache[path] = (stamp, table)
    return table


def hostsFileName(host: str, path: str = "/etc/hosts") -> str | None:
    """The first name C{path} gives the address C{host}, or C{None}."""
    ip = clientIP(host)
    if ip is None:
        return None
    try:
        return _hostsTable(path).get(ip)
    except (OSError, ValueError):
        return None


def reverseLookup(resolver: Any, host: str, timeout: float, clock: Any) -> Deferred:
    """Look up C{host}'s forward-confirmed name.

    Loopback addresses are looked up in C{/etc/hosts} only: they mean nothing in the DNS, and a
    relay should not send queries about them.

    @return: a Deferred firing with the name (lower case, no trailing dot) or C{None}; it never
        fails.
    """
    now = clock.seconds()
    try:
        cache = _caches.setdefault(resolver, {})
    except TypeError:  # (a resolver that cannot be weakly referenced: no cache)
        cache = {}
    cached = cache.get(host)
    # (One that would end later than it can was remembered before a step back of the clock.)
    if cached is not None and now < cached[0] <= now + REVERSE_CACHE_TIME:
        return succeed(cached[1])

    def remember(name: str | None) -> str | None:
        cache.pop(host, None)
        cache[host] = (now + REVERSE_CACHE_TIME, name)
        while len(cache) > REVERSE_CACHE_SIZE:
            del cache[next(iter(cache))]
        return name

    ip = clientIP(host)
    if ip is None:
        return succeed(None)
    if ip.is_loopback:
        return succeed(remember(hostsFileName(host)))
    d = _lookup(resolver, host)
    d.addTimeout(timeout, clock)
    d.addCallback(remember)

    def failed(failure: Any) -> None:
        log.debug(
            "reverse lookup of {host} failed: {error}", host=host, error=failure.getErrorMessage()
        )
        return None

    return d.addErrback(failed)

