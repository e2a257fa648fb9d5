"""The built-in plugin C{dnsbl}: DNS blocklists (RFC 5782) asked when a client connects.

For a client at 192.0.2.7 and the zone C{zen.spamhaus.org} it looks up the A records of
C{7.2.0.192.zen.spamhaus.org} (an IPv6 client: its 32 nibbles reversed, RFC 5782 2.4), every
zone in parallel, through the relay's resolver (C{[dns] nameservers}).  A zone lists the
client when it answers an address that the zone's filter accepts (any address without a
filter); each listing zone adds its weight to the client's score, and a score that reaches
the threshold refuses the client (C{action = "reject"}, at connect or at MAIL) or only notes
it (C{action = "tag"}: C{client.notes["dnsbl"]}, and a header field when asked).

A lookup that fails (a time-out, a server failure) counts as not listed, logged: a blocklist
fails open, as Postfix's C{reject_rbl_client} and postscreen do.  See
C{docs/plugin-dnsbl.md}.
"""

from __future__ import annotations

import ipaddress
import re
from dataclasses import dataclass
from typing import Any

from twisted.internet.defer import CancelledError, Deferred, TimeoutError, gatherResults
from twisted.logger import Logger
from twisted.names import dns
from twisted.names.error import (
    AuthoritativeDomainError,
    DNSFormatError,
    DNSNameError,
    DNSNotImplementedError,
    DNSQueryRefusedError,
    DNSServerError,
    DNSUnknownError,
    DomainError,
)
from zope.interface import implementer

from mailrelay.builtin.clients import EXEMPT_NETWORKS, EXEMPT_RELAY_CLIENTS, clientIP, isExempt
from mailrelay.config.schema import At, Key, Reading, pluginOptions
from mailrelay.config.values import choice, integer, seconds, string, stringList
from mailrelay.errors import ConfigError, describeFailure, describeValue
from mailrelay.interfaces import (
    CONTINUE,
    FilterResult,
    IConnectionPolicy,
    IMessageFilter,
    ISenderValidator,
    Verdict,
)

__all__ = ["DNSBL", "Zone", "build", "isNXDOMAIN", "parseZone", "queryName"]

log = Logger()

#: The longest reason from a zone's TXT record put in a reply.
REASON_MAXIMUM = 200

_OCTET = r"(?:\d{1,3}|\[[0-9.;,]+\])"
_ZONE = re.compile(
    rf"(?P<zone>[^=*\s]+)(?:=(?P<filter>{_OCTET}(?:\.{_OCTET}){{3}}))?(?:\*(?P<weight>-?\d+))?"
)
_FIELD_NAME = re.compile(r"[!-9;-~]{1,76}")


@dataclass(frozen=True)
class Zone:
    """One DNS list, as configured.

    @ivar name: the zone (C{"zen.spamhaus.org"}), lower case, without a trailing dot.
    @ivar filter: per octet of the answer, the values that count; C{None}: any answer.
    @ivar weight: what a listing adds to the client's score (negative: an allow list).
    @ivar text: the entry as written, for messages.
    """

    name: str
    filter: tuple[frozenset[int], ...] | None = None
    weight: int = 1
    text: str = ""

    def accepts(self, answer: str) -> bool:
        """Whether the answer C{answer} (a dotted quad) is a listing by this zone."""
        if self.filter is None:
            return True
        octets = answer.split(".")
        return len(octets) == 4 and all(
            int(o) in allowed for o, allowed in zip(octets, self.filter, strict=True)
        )


def _octet(text: str) -> frozenset[int]:
    """The values of one octet of a filter: C{"2"}, or C{"[2..11;15]"} (ranges and values
    separated by C{;}, as Postfix writes them; C{,} is taken too).

    @raise ValueError: a value above 255 or a range upside down.
    """
    items = text[1:-1].replace(",", ";").split(";") if text.startswith("[") else [text]
    values: set[int] = set()
    for item in items:
        low, dots, high = item.partition("..")
        if not low.isdigit() or (dots and not high.isdigit()):
            raise ValueError(f"{text!r} is not an octet, [n..m] range or [a;b] list")
        first, last = int(low), int(high) if dots else int(low)
        if last > 255 or first > last:
            raise ValueError(f"{text!r}: octets are 0 to 255, ranges low..high")
        values.update(range(first, last + 1))
    return frozenset(values)


def parseZone(text: str) -> Zone:
    """A zone as written: C{"zen.spamhaus.org"}, with an answer filter
    C{"zen.spamhaus.org=127.0.0.[2..11]"} and a weight C{"*3"} (postscreen_dnsbl_sites'
    syntax: C{"list.dnswl.org=127.0.[0..255].[1..3]*-2"}).

    @raise ValueError: it is none (the message says why).
    """
    m = _ZONE.fullmatch(text.strip())
    if m is None:
        raise ValueError(
            f"{describeValue(text)} is not a zone, zone=a.b.c.d filter or zone*weight "
            '(e.g. "zen.spamhaus.org=127.0.0.[2..11]*2")'
        )
    name = m.group("zone").lower().rstrip(".")
    labels = name.split(".")
    if len(labels) < 2 or not all(re.fullmatch(r"[a-z0-9_](?:[a-z0-9_-]{0,61}[a-z0-9_])?", label)
                                  for label in labels):
        raise ValueError(f"{describeValue(m.group('zone'))} is not a DNS zone name")
    try:
        octets = m.group("filter") and tuple(
            _octet(o) for o in re.findall(_OCTET, m.group("filter"))
        )
    except ValueError as e:
        raise ValueError(f"{describeValue(text)}: bad answer filter: {e}") from None
    weight = int(m.group("weight")) if m.group("weight") is not None else 1
    return Zone(name, octets or None, weight, text.strip())


def zoneList(value: Any, at: At) -> tuple[Zone, ...]:
    """The C{zones} option: a non-empty array of zones (L{parseZone}), each once."""
    found: list[Zone] = []
    for where, text in stringList(value, at):
        try:
            zone = parseZone(text)
        except ValueError as e:
            raise where.error(str(e)) from None
        if any(z.name == zone.name for z in found):
            raise where.error(f"the zone {zone.name!r} is listed twice")
        found.append(zone)
    if not found:
        raise at.error('must list at least one zone (e.g. ["zen.spamhaus.org"])')
    return tuple(found)


def fieldName(value: Any, at: At) -> str:
    """A header field name (C{""}: none)."""
    text = string(value, at)
    if text and not _FIELD_NAME.fullmatch(text):
        raise at.error(f"{describeValue(text)} is not a header field name")
    return text


def isNXDOMAIN(failure: Any) -> bool:
    """Whether C{failure} says the name does not exist (twisted.names raises subclasses of
    C{DomainError} for server failures and refusals too, which are failed lookups)."""
    failed = (DNSServerError, DNSFormatError, DNSQueryRefusedError, DNSNotImplementedError,
              DNSUnknownError)
    if failure.check(*failed):
        return False
    return bool(failure.check(DNSNameError, AuthoritativeDomainError, DomainError))


def queryName(ip: ipaddress.IPv4Address | ipaddress.IPv6Address, zone: str) -> str:
    """The name to look up for C{ip} in C{zone} (RFC 5782 2.1, 2.4): the octets of an IPv4
    address reversed, the 32 nibbles of an IPv6 address reversed."""
    reverse = ip.reverse_pointer
    return reverse.rsplit(".", 2)[0] + "." + zone


def _checkOptions(reading: Reading) -> None:
    weights = sum(z.weight for z in reading.fields["zones"] if z.weight > 0)
    if weights < reading.fields["threshold"]:
        raise reading.error(
            "threshold",
            f"{reading.fields['threshold']} can never be reached: the positive weights of "
            f"the zones add up to {weights}",
        )


SCHEMA = pluginOptions(
    Key("zones", zoneList, "The DNS lists asked.", required="is required: the DNS lists to ask"),
    Key("action", choice("reject", "tag"), "What a listed client gets.", default="reject"),
    Key("reject_at", choice("connect", "mail"), "When a listed client is refused.",
        default="connect"),
    Key("threshold", integer(1, 1000), "The score that makes a client listed.", default=1),
    Key("query_timeout", seconds, "Seconds the lookups may take.", default=10),
    Key("header", fieldName, "The header field naming the lists (tag).", default=""),
    EXEMPT_RELAY_CLIENTS,
    EXEMPT_NETWORKS,
    check=_checkOptions,
)


@implementer(IConnectionPolicy, ISenderValidator, IMessageFilter)
class DNSBL:
    """The C{dnsbl} plugin (see the module docstring).

    At connect it looks the client up and notes what it found in C{client.notes["dnsbl"]}:
    C{{"score": 3, "listed": [{"zone": "zen.spamhaus.org", "answers": ["127.0.0.2"]}]}}
    (nothing when no zone lists the client).
    """

    def __init__(self, options: Any, resolver: Any, clock: Any) -> None:
        self.zones: tuple[Zone, ...] = options.zones
        self.action: str = options.action
        self.rejectAt: str = options.rejectAt
        self.threshold: int = options.threshold
        self.timeout: float = options.queryTimeout
        self.header: str = options.header
        self.exemptRelay: bool = options.exemptRelayClients
        self.exempt = options.exemptNetworks
        self.resolver = resolver
        self.clock = clock

    # -- connect

    def checkConnect(self, client: Any) -> Any:
        ip = clientIP(client.address)
        if ip is None or isExempt(client, ip, self.exemptRelay, self.exempt):
            return CONTINUE
        lookups = [self._lookup(queryName(ip, zone.name), zone) for zone in self.zones]
        d = gatherResults(lookups)
        d.addCallback(self._listed, client, ip)
        return d

    def checkHelo(self, client: Any, name: str) -> Any:
        return CONTINUE

    def _lookup(self, name: str, zone: Zone) -> Deferred[list[str]]:
        """The answers of C{zone} for C{name} that its filter accepts; C{[]} when not listed
        or when the lookup fails (logged) or takes longer than C{query_timeout}."""
        d = self.resolver.lookupAddress(name)
        d.addTimeout(self.timeout, self.clock)

        def answered(result: Any) -> list[str]:
            answers, _authority, _additional = result
            found = [a.payload.dottedQuad() for a in answers if a.type == dns.A]
            return [a for a in found if zone.accepts(a)]

        def failed(failure: Any) -> list[str]:
            if isNXDOMAIN(failure):  # not listed
                return []
            if failure.check(CancelledError):  # (the client left: nothing to say)
                return []
            if failure.check(TimeoutError):
                error = f"no answer within {self.timeout:g}s"
            else:
                error = describeFailure(failure)
            log.warn(
                "dnsbl: lookup of {name} failed, taken as not listed: {error}",
                name=name, zone=zone.name, error=error,
            )
            return []

        return d.addCallbacks(answered, failed)

    def _listed(self, results: list[list[str]], client: Any, ip: Any) -> Any:
        listed = [(z, answers) for z, answers in zip(self.zones, results, strict=True) if answers]
        if not listed:
            return CONTINUE
        score = sum(z.weight for z, _ in listed)
        client.notes["dnsbl"] = {
            "score": score,
            "listed": [{"zone": z.name, "answers": answers} for z, answers in listed],
        }
        blocked = score >= self.threshold
        log.info(
            "dnsbl: {client} listed by {zones} (score {score}{blocked})",
            client=client.address, zones=", ".join(z.name for z, _ in listed), score=score,
            blocked=", blocked" if blocked else "",
        )
        if not blocked or self.action != "reject" or self.rejectAt != "connect":
            return CONTINUE
        return self._refusal(client, ip)

    def _refusal(self, client: Any, ip: Any) -> Deferred[Verdict]:
        """The reject of C{client}, as Postfix words it: the first listing zone of positive
        weight named, with its TXT record's reason when it has one (asked now; none when the
        lookup fails or is slow)."""
        zone = next(
            z for z in self.zones
            if any(entry["zone"] == z.name for entry in client.notes["dnsbl"]["listed"])
            and z.weight > 0
        )
        text = f"Service unavailable; Client host [{client.address}] blocked using {zone.name}"
        d = self.resolver.lookupText(queryName(ip, zone.name))
        d.addTimeout(self.timeout, self.clock)

        def reason(result: Any) -> Verdict:
            answers, _authority, _additional = result
            for answer in answers:
                if answer.type == dns.TXT:
                    why = b"".join(answer.payload.data).decode("utf-8", "replace")
                    why = "".join(c if c.isprintable() else " " for c in why).strip()
                    if why:
                        return Verdict.reject(f"{text}; {why[:REASON_MAXIMUM]}", 554, "5.7.1")
            return Verdict.reject(text, 554, "5.7.1")

        return d.addCallbacks(reason, lambda _: Verdict.reject(text, 554, "5.7.1"))

    # -- MAIL (reject_at = "mail": clients that authenticated are not refused)

    def validateSender(self, client: Any, envelope: Any) -> Any:
        found = client.notes.get("dnsbl")
        if (
            self.action != "reject"
            or self.rejectAt != "mail"
            or not found
            or found["score"] < self.threshold
        ):
            return CONTINUE
        ip = clientIP(client.address)
        if ip is None or isExempt(client, ip, self.exemptRelay, self.exempt):
            return CONTINUE
        return self._refusal(client, ip)

    # -- end of data (header = "X-DNSBL")

    def filterMessage(self, context: Any) -> Any:
        client = context.client
        found = client.notes.get("dnsbl") if client is not None and self.header else None
        if not found:
            return CONTINUE
        lists = ", ".join(
            f"{entry['zone']}={'/'.join(entry['answers'])}" for entry in found["listed"]
        )
        field = f"{self.header}: {lists} (score {found['score']})\r\n".encode("ascii", "replace")
        return FilterResult(prepend=(field,))


def build(options: dict[str, Any], context: Any) -> DNSBL:
    """The C{dnsbl} plugin from its options (see C{docs/plugin-dnsbl.md})."""
    read = context.readOptions(SCHEMA, options)
    context.checkTimeout("query_timeout", read.queryTimeout)
    if context.resolver is None:
        raise ConfigError("dnsbl needs the relay's DNS resolver (the context has none)")
    return DNSBL(read, context.resolver, context.reactor)

