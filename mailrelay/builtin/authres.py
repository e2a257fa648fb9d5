"""The C{authres} message filter: SPF (RFC 7208), DKIM verification (RFC 6376) and DMARC
(RFC 7489) of mail from outside, written as an C{Authentication-Results:} field (RFC 8601)
and in C{envelope.notes["authres"]}; optionally, a DMARC C{p=reject} refused with C{550
5.7.1}.  See C{docs/plugin-authres.md}.

Every DNS query goes through the plugin context's resolver (C{twisted.names}, the name servers
of C{[dns]}), never through the libraries' own blocking DNS:

  - pyspf (C{spf}) evaluates on the reactor thread against the answers fetched so far; a
    name it asks that is not fetched yet ends the round, is fetched with the resolver, and
    the evaluation starts again (SPF is a pure function of the answers; the rounds are
    bounded by RFC 7208's lookup limits).  The evaluation is a subclass of pyspf's C{query}
    whose C{dns} method answers from the round's answers (L{_Query}): pyspf's module-level
    C{DNSLookup} is left as it is, for any other user of the library.
  - dkimpy gets the keys fetched beforehand (one TXT query per signature) through its
    C{dnsfunc}; parsing and verifying (hashing the body, RSA) run in the thread pool.
  - DMARC is evaluated here: the policy record of the C{From:} domain, else of its
    organizational domain (the public suffix list of C{publicsuffixlist}), relaxed or strict
    alignment of the SPF and DKIM identities.
"""

from __future__ import annotations

import email.utils
import random
import re
import socket
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from twisted.internet.defer import Deferred, gatherResults, succeed
from twisted.logger import Logger
from twisted.names import dns
from twisted.names.error import AuthoritativeDomainError, DNSNameError, DomainError
from twisted.python.failure import Failure
from zope.interface import implementer

from mailrelay.address import normaliseDomain
from mailrelay.builtin.headers import headerFields
from mailrelay.config.schema import Key, pluginOptions
from mailrelay.config.values import boolean, choice, integer, optionalHostname, seconds
from mailrelay.errors import describeFailure
from mailrelay.interfaces import CONTINUE, FilterResult, IMessageFilter, Verdict

try:
    import dkim  # type: ignore[import-untyped]
    import spf  # type: ignore[import-untyped]
    from dkim.util import parse_tag_value  # type: ignore[import-untyped]
    from publicsuffixlist import PublicSuffixList  # type: ignore[import-untyped]
except ImportError as e:  # pragma: no cover (setup.cfg installs them)
    raise ImportError(
        f"the authres plugin needs dkimpy, pyspf and publicsuffixlist ({e}): "
        "pip install dkimpy pyspf publicsuffixlist"
    ) from e

__all__ = ["AuthResults", "build", "authservID", "orgDomain"]

log = Logger()

#: At most this many DKIM signatures of a message are verified (the topmost ones).
MAX_SIGNATURES = 10
#: At most this many rounds of DNS queries for one SPF evaluation (RFC 7208 4.6.4 bounds an
#: evaluation to 10 mechanisms with lookups, 10 names per MX or PTR, 2 void lookups).
MAX_SPF_ROUNDS = 150

SCHEMA = pluginOptions(
    Key(
        "authserv_id",
        optionalHostname,
        "The authserv-id written in Authentication-Results: (default: the relay's hostname).",
    ),
    Key(
        "dmarc_reject",
        boolean,
        "Enforce DMARC: a failing message whose domain publishes p=reject is refused (550).",
        default=False,
    ),
    Key(
        "quarantine",
        choice("tag", "defer"),
        "With dmarc_reject, what p=quarantine does to a failing message: tag it, or defer it.",
        default="tag",
    ),
    Key(
        "check_relay_networks",
        boolean,
        "Check mail from clients in relay.networks too (authenticated clients never).",
        default=False,
    ),
    Key(
        "dns_timeout",
        seconds,
        "Seconds one DNS query may take before its result is temperror (keep it below the"
        " plugin's timeout, so that a dead name server tags instead of deferring).",
        default=10,
    ),
    Key(
        "min_key_bits",
        integer(512, 16384, "RSA keys shorter than 1024 bits are unsafe (RFC 8301)"),
        "The smallest RSA key a DKIM signature may use to pass.",
        default=1024,
    ),
)


# -- small helpers


def orgDomain(psl: Any, domain: str) -> str:
    """The organizational domain of C{domain} (RFC 7489 3.2): its public suffix and one label
    more, or C{domain} itself when it is a public suffix."""
    return psl.privatesuffix(domain) or domain


def authservID(value: bytes) -> str:
    """The authserv-id an C{Authentication-Results:} field's C{value} (what follows the colon)
    claims, lower case (C{""}: none): its first word, comments and folding skipped."""
    text = _skipCFWS(value.decode("ascii", "replace"))
    m = re.match(r'"([^"]*)"|([^\s;()]+)', text)
    return "" if m is None else (m.group(1) or m.group(2) or "").lower().rstrip(".")


def _skipCFWS(text: str) -> str:
    """C{text} after its leading CFWS (RFC 5322 3.2.2): white space and comments, which nest
    and hold quoted-pairs (C{"(a (b) \\) c)"} is one comment); C{""} when a comment is not
    closed."""
    depth = 0
    i = 0
    while i < len(text):
        char = text[i]
        if char == "(":
            depth += 1
        elif depth and char == ")":
            depth -= 1
        elif depth and char == "\\":
            i += 1  # (a quoted-pair: the next character is taken as it is)
        elif not depth and not char.isspace():
            return text[i:]
        i += 1
    return ""


_TOKEN = re.compile(r"[A-Za-z0-9!#$%&'*+\-./=?^_`{|}~@]+")


def _value(text: str) -> str | None:
    """C{text} as an RFC 8601 property value (a token, or a quoted-string), or C{None} when
    it cannot be written in ASCII, or is longer than any address or name can be (RFC 5321
    4.5.3.1: a path of 256 octets), which no line of the field could hold."""
    if len(text) > 256:
        return None
    if _TOKEN.fullmatch(text):
        return text
    if not text.isascii() or not text.isprintable():
        return None
    return '"' + text.replace("\\", "\\\\").replace('"', '\\"') + '"'


def _comment(text: str) -> str:
    """C{text} as a short, safe comment (C{" (text)"}), or C{""}."""
    clean = re.sub(r"[^\x20-\x7e]|[()\\]", "", text).strip()[:80]
    return f" ({clean})" if clean else ""


def _domainOf(address: str) -> str:
    return _aceDomain(address.rpartition("@")[2])


def _aceDomain(domain: str) -> str:
    """C{domain} in A-labels, lower case, as DKIM and DMARC compare domains (RFC 8616 4: a
    U-label From: domain aligns with the A-label d= of its signature); a text that is no
    domain, lower-cased."""
    try:
        return normaliseDomain(domain)
    except ValueError:
        return domain.lower().rstrip(".")


# -- DNS through the resolver


#: The failures that mean "no such name" (NXDOMAIN), from a server or an authority.
_NO_SUCH_NAME = (DomainError, DNSNameError, AuthoritativeDomainError)


class _TempError(Exception):
    """A DNS query failed for now (timeout, SERVFAIL, ...)."""


@dataclass(frozen=True)
class DNS:
    """The resolver to ask, and how long one query may take on the reactor's clock."""

    resolver: Any
    reactor: Any
    timeout: float


def _isDNSName(name: bytes) -> bool:
    """Whether C{name} can be asked: labels of 1 to 63 octets, 255 octets in all on the wire
    (RFC 1035 2.3.4)."""
    name = name.rstrip(b".")
    return len(name) <= 253 and all(0 < len(label) <= 63 for label in name.split(b"."))


def _records(dnsc: DNS, name: str, qtype: int) -> Deferred[list[Any]]:
    """The records of C{qtype} (and the CNAMEs) at C{name}: C{[]} for NXDOMAIN or NODATA,
    and for a name that is not a valid DNS name (a permanent error, RFC 6376 6.1.2: never
    asked); fails with L{_TempError} for any other failure (a timeout, SERVFAIL, REFUSED,
    ...: the other subclasses of C{DomainError})."""

    def failed(failure: Failure) -> list[Any]:
        if type(failure.value) in _NO_SUCH_NAME:
            return []
        raise _TempError(f"{name}: {describeFailure(failure, dnsc.timeout)}")

    try:
        query = dns.Query(name, qtype)
    except (ValueError, UnicodeError):  # a name that cannot be asked: no such name
        return succeed([])
    if not _isDNSName(query.name.name):  # (never sent: its failure would be temperror)
        return succeed([])
    d = dnsc.resolver.query(query)
    d.addTimeout(dnsc.timeout, dnsc.reactor)  # (a twisted TimeoutError: temperror)
    return d.addCallbacks(lambda result: list(result[0]), failed)


def _texts(rrs: list[Any]) -> list[bytes]:
    """The TXT records among C{rrs}, each one's strings joined."""
    return [b"".join(rr.payload.data) for rr in rrs if rr.type == dns.TXT]


# -- SPF


class _Missing(BaseException):
    """An SPF evaluation asked a name not fetched yet (a BaseException: pyspf catches its
    own errors, and a bare C{except} it has still sees it recorded in L{_SPFRound.missing})."""


_TYPES = {"A": dns.A, "AAAA": dns.AAAA, "MX": dns.MX, "PTR": dns.PTR, "TXT": dns.TXT}


class _SPFRound:
    """The answers an SPF evaluation is given, and the names it missed."""

    def __init__(self) -> None:
        self.answers: dict[tuple[str, str], list[Any] | _TempError] = {}
        self.missing: list[tuple[str, str]] = []

    def lookup(self, name: str, qtype: str) -> list[Any]:
        key = (str(name).lower().rstrip("."), qtype)
        if qtype not in _TYPES:
            return []  # the SPF type (99) is obsolete (RFC 7208 3.1)
        try:
            found = self.answers[key]
        except KeyError:
            self.missing.append(key)
            raise _Missing() from None
        if isinstance(found, _TempError):
            raise spf.TempError(f"DNS {found}")
        return found

    def fetch(self, dnsc: DNS) -> Deferred[Any]:
        missing, self.missing = list(dict.fromkeys(self.missing)), []
        return gatherResults([self._fetch(dnsc, key) for key in missing], consumeErrors=True)

    def _fetch(self, dnsc: DNS, key: tuple[str, str]) -> Deferred[None]:
        name, qtype = key

        def got(rrs: list[Any]) -> None:
            answers = [_spfAnswer(name, qtype, rr) for rr in rrs if rr.type in
                       (_TYPES[qtype], dns.CNAME)]
            self.answers[key] = [answer for answer in answers if answer is not None]

        def failed(failure: Failure) -> None:
            failure.trap(_TempError)
            self.answers[key] = failure.value

        return _records(dnsc, name, _TYPES[qtype]).addCallbacks(got, failed)


def _spfAnswer(name: str, qtype: str, rr: Any) -> tuple[tuple[str, str], Any] | None:
    """One answer as pyspf's C{DNSLookup} gives it: C{((name, type), value)}; C{None} for
    one with a name that is not ASCII (what a domain's own server can answer: skipped, as
    a malformed MX is when delivering)."""
    try:
        owner = rr.name.name.decode("ascii").lower().rstrip(".")
        p = rr.payload
        if rr.type == dns.CNAME:
            return (owner, "CNAME"), p.name.name.decode("ascii")
        if rr.type == dns.A:
            return (owner, "A"), p.dottedQuad()
        if rr.type == dns.AAAA:
            return (owner, "AAAA"), socket.inet_ntop(socket.AF_INET6, p.address)
        if rr.type == dns.MX:
            return (owner, "MX"), (p.preference, p.name.name.decode("ascii"))
        if rr.type == dns.PTR:
            return (owner, "PTR"), p.name.name.decode("ascii")
    except UnicodeDecodeError:
        return None
    return (owner, "TXT"), list(p.data)


class _Query(spf.query):  # type: ignore[misc]
    """A pyspf query answered by an L{_SPFRound}, never by pyspf's own DNS (its
    module-level C{DNSLookup}, left as the library has it).

    pyspf's C{query.dns(name, qtype)} answers from the query's own DNS cache
    (C{query.cache}, C{(name, type)} to values) before it asks C{DNSLookup}: the round's
    answers for the name are put there first, and it goes on as it does (CNAMEs followed
    through the cache, its void lookup count).  A name the DNS has nothing for (or only
    names that are not ASCII) is answered here, counted as pyspf counts a void lookup
    (RFC 7208 section 4.6.4): pyspf would ask C{DNSLookup} again for it.
    """

    def __init__(self, answers: _SPFRound, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self._answers = answers

    def dns(self, name: Any, qtype: str, cnames: Any = None, ignore_void: bool = False) -> Any:
        key = str(name).lower()
        key = key[:-1] if key.endswith(".") else key
        valid = key and all(0 < len(label) < 64 for label in key.split("."))
        cached = lambda: self.cache.get((key, qtype)) or self.cache.get((key, "CNAME"))  # noqa: E731
        if valid and not cached():
            for (owner, kind), value in self._answers.lookup(key, qtype):
                if kind == "CNAME" or (qtype, kind) in self.SAFE2CACHE:
                    self.cache.setdefault((owner.lower(), kind), []).append(value)
        if not valid or cached():  # (pyspf then asks no DNS: an invalid name, or cached)
            return super().dns(name, qtype, cnames, ignore_void)
        if not ignore_void:
            self.void_lookups += 1
            if self.void_lookups > spf.MAX_VOID_LOOKUPS:
                raise spf.PermError(f"Void lookup limit of {spf.MAX_VOID_LOOKUPS} exceeded")
        return []


def checkSPF(
    dnsc: DNS, address: str, sender: str, helo: str, receiver: str
) -> Deferred[tuple[str, str]]:
    """The SPF result of C{sender} (or of C{helo} for the null sender) sending from
    C{address}: C{(result, explanation)}, C{result} one of RFC 8601's (C{pass}, C{fail},
    C{softfail}, C{neutral}, C{none}, C{temperror}, C{permerror})."""
    answers = _SPFRound()
    rounds = [0]

    def evaluate(_: object = None) -> Any:
        rounds[0] += 1
        if rounds[0] > MAX_SPF_ROUNDS:
            return ("permerror", "too many DNS lookups")
        query = _Query(answers, i=address, s=sender, h=helo, receiver=receiver)
        try:
            result, _code, explanation = query.check()
        except _Missing:
            result, explanation = "", ""
        except Exception as e:  # pyspf's own bug on some record: not the sender's pass
            log.failure("SPF evaluation of {sender} failed", Failure(), sender=sender)
            return ("permerror", f"SPF evaluation failed: {e}")
        if answers.missing:
            return answers.fetch(dnsc).addCallback(evaluate)
        return (result, explanation)

    return succeed(None).addCallback(evaluate)


# -- DKIM


@dataclass
class Signature:
    """One DKIM signature of a message and what became of it."""

    index: int
    domain: str = ""
    selector: str = ""
    b: str = ""
    result: str = ""
    reason: str = ""

    @property
    def keyName(self) -> str:
        return f"{self.selector}._domainkey.{self.domain}"


@dataclass
class _Parsed:
    """What the thread pool made of the message."""

    signer: Any
    signatures: list[Signature]
    forged: list[bytes]
    fromDomains: list[str]
    fromProblem: str = ""
    #: Why dkimpy could not parse the header section (C{signer} is then C{None}), or C{""}.
    unparsed: str = ""


def _parse(message: bytes, authserv: str, minKeyBits: int) -> _Parsed:
    """Parse C{message} (in a thread): its DKIM signatures, the forged Authentication-Results
    fields (claiming C{authserv}) and the domains of its C{From:}.  A header section dkimpy
    cannot parse (RFC 5322 4.5's obsolete syntax, a line that is no field: a permanent
    condition) is read as the relay reads it, each signature C{neutral}."""
    fields = headerFields(message)
    try:
        headers = [(name, name + b":" + value) for name, value in dkim.rfc822_parse(message)[0]]
        signer, unparsed = dkim.DKIM(message, minkey=minKeyBits), ""
    except dkim.MessageFormatError as e:
        headers, signer, unparsed = fields, None, str(e)
    except IndexError:  # (dkimpy's parser, on a first line starting with white space)
        headers, signer, unparsed = fields, None, "a continuation line before any field"
    # Those the relay reads as fields only: it removes no other (past 100 KiB, the rest of
    # a header section is body to it).
    forged = [
        raw
        for name, raw in fields
        if name.lower() == b"authentication-results" and authservID(_fieldValue(raw)) == authserv
    ]
    froms = [_fieldValue(raw) for name, raw in headers if name.lower() == b"from"]
    fromDomains: list[str] = []
    problem = ""
    if len(froms) != 1:
        problem = "no From field" if not froms else "several From fields"
    else:
        text = froms[0].decode("utf-8", "replace")
        addresses = [a for _, a in email.utils.getaddresses([text]) if a]
        fromDomains = sorted({_domainOf(a) for a in addresses if "@" in a})
        if not fromDomains:
            problem = "no address in From"
    signatures = []
    count = 0
    for name, raw in headers:
        if name.lower() != b"dkim-signature":
            continue
        count += 1
        if count > MAX_SIGNATURES:
            break
        signature = Signature(count - 1)
        try:
            tags = parse_tag_value(_fieldValue(raw))
        except Exception as e:
            signature.result, signature.reason = "neutral", f"bad signature: {e}"
        else:
            signature.domain = _aceDomain(tags.get(b"d", b"").decode("utf-8", "replace"))
            signature.selector = tags.get(b"s", b"").decode("ascii", "replace")
            signature.b = re.sub(r"\s+", "", tags.get(b"b", b"").decode("ascii", "replace"))[:8]
            if not signature.domain or not signature.selector:
                signature.result, signature.reason = "neutral", "no d= or s= tag"
        if unparsed and not signature.result:
            signature.result, signature.reason = "neutral", "the header section cannot be parsed"
        signatures.append(signature)
    return _Parsed(signer, signatures, forged, fromDomains, problem, unparsed)


def _fieldValue(raw: bytes) -> bytes:
    """What follows the colon of the header field C{raw}."""
    return raw.partition(b":")[2]


def _verify(parsed: _Parsed, keys: dict[str, bytes | None | _TempError]) -> None:
    """Verify each signature of C{parsed} not judged yet with the C{keys} fetched (in a
    thread)."""

    def dnsfunc(name: bytes, timeout: float = 5) -> bytes | None:
        text = name.decode("utf-8", "replace")
        try:  # (a d= in U-labels: its key was fetched under the A-labels)
            text = text.encode("idna").decode("ascii")
        except UnicodeError:
            pass
        key = keys.get(text.lower().rstrip("."))
        return key if isinstance(key, bytes) else None

    for signature in parsed.signatures:
        if signature.result:
            continue
        key = keys.get(signature.keyName.lower())
        if isinstance(key, _TempError):
            signature.result, signature.reason = "temperror", "key lookup failed"
            continue
        if key is None:
            signature.result, signature.reason = "permerror", "no key"
            continue
        try:
            ok = parsed.signer.verify(idx=signature.index, dnsfunc=dnsfunc)
        except dkim.MessageFormatError as e:
            signature.result, signature.reason = "neutral", str(e)
        except dkim.DKIMException as e:
            signature.result, signature.reason = "fail", str(e)
        except Exception as e:  # dkimpy's own error on odd input (bad base64, ...)
            signature.result, signature.reason = "neutral", f"cannot verify: {e}"
        else:
            signature.result = "pass" if ok else "fail"
            if not ok:
                signature.reason = "signature did not verify"


def _fetchKey(dnsc: DNS, name: str) -> Deferred[bytes | None | _TempError]:
    def got(rrs: list[Any]) -> bytes | None:
        texts = _texts(rrs)
        keys = [t for t in texts if t.lstrip().startswith(b"v=DKIM1")] or texts
        return keys[0] if keys else None

    def failed(failure: Failure) -> _TempError:
        failure.trap(_TempError)
        return failure.value  # type: ignore[return-value]

    return _records(dnsc, name, dns.TXT).addCallbacks(got, failed)


# -- DMARC


@dataclass
class Policy:
    """A DMARC policy record (RFC 7489 6.3), as far as a receiver applies it."""

    domain: str
    p: str
    sp: str
    adkim: str = "r"
    aspf: str = "r"
    pct: int = 100


#: The version tag a DMARC record starts with (RFC 7489 6.4: C{"v"} is a case-insensitive
#: ABNF string, C{DMARC1} is not; white space around the C{=}).
_DMARC_VERSION = re.compile(rb"[vV][ \t]*=[ \t]*DMARC1[ \t]*(;|$)")


def parsePolicy(domain: str, text: bytes) -> Policy | None:
    """The policy record C{text} found at C{_dmarc.<domain>}, or C{None} when it is not a
    valid DMARC record (no C{v=DMARC1} first, or no valid C{p=} and no C{rua=})."""
    tags: dict[str, str] = {}
    for part in text.decode("ascii", "replace").split(";"):
        name, sep, value = part.partition("=")
        if sep:
            tags.setdefault(name.strip().lower(), value.strip())
        elif part.strip():
            return None
    if not _DMARC_VERSION.match(text):
        return None
    p = tags.get("p", "").lower()
    if p not in ("none", "quarantine", "reject"):
        if "rua" not in tags:
            return None
        p = "none"  # RFC 7489 6.6.3: a record with rua= but a bad p= counts as p=none
    sp = tags.get("sp", "").lower()
    if sp not in ("none", "quarantine", "reject"):
        sp = p
    try:
        pct = min(100, max(0, int(tags.get("pct", "100"))))
    except ValueError:
        pct = 100
    adkim = "s" if tags.get("adkim", "r").lower() == "s" else "r"
    aspf = "s" if tags.get("aspf", "r").lower() == "s" else "r"
    return Policy(domain, p, sp, adkim, aspf, pct)


def _fetchPolicy(dnsc: DNS, domain: str) -> Deferred[Policy | None]:
    """The DMARC record at C{_dmarc.<domain>}: a L{Policy}, or C{None} when there is none (or
    several, RFC 7489 6.6.3); fails with L{_TempError}."""

    def got(rrs: list[Any]) -> Policy | None:
        texts = [t for t in _texts(rrs) if _DMARC_VERSION.match(t)]
        return parsePolicy(domain, texts[0]) if len(texts) == 1 else None

    return _records(dnsc, f"_dmarc.{domain}", dns.TXT).addCallback(got)


def findPolicy(dnsc: DNS, psl: Any, domain: str) -> Deferred[tuple[Policy | None, bool]]:
    """The policy for mail from C{domain}: its own record, else its organizational domain's;
    C{(policy, isSubdomain)} (whether C{sp=} applies).  Fails with L{_TempError}."""
    org = orgDomain(psl, domain)

    def own(policy: Policy | None) -> Any:
        if policy is not None or org == domain:
            return (policy, False)
        return _fetchPolicy(dnsc, org).addCallback(lambda p: (p, p is not None))

    return _fetchPolicy(dnsc, domain).addCallback(own)


# -- the filter


@dataclass
class Results:
    """The results for one message, as written in the field and the notes."""

    spf: str = "none"
    spfDomain: str = ""
    spfReason: str = ""
    signatures: list[Signature] = field(default_factory=list)
    dmarc: str = "none"
    headerFrom: str = ""
    policy: str = ""
    disposition: str = "none"
    dmarcReason: str = ""

    def notes(self) -> dict[str, Any]:
        return {
            "spf": self.spf,
            "spf_domain": self.spfDomain,
            "dkim": [
                {"result": s.result, "domain": s.domain, "selector": s.selector}
                for s in self.signatures
            ],
            "dmarc": self.dmarc,
            "header_from": self.headerFrom,
            "dmarc_policy": self.policy,
            "dmarc_disposition": self.disposition,
        }


@implementer(IMessageFilter)
class AuthResults:
    """The C{authres} filter (see the module docstring).

    @ivar random: C{random()} in [0, 1), to sample C{pct=} (replaceable in tests).
    """

    def __init__(self, options: Any, authserv: str, dnsc: DNS, psl: Any) -> None:
        self.options = options
        self.authserv = authserv
        self.dns = dnsc
        self.psl = psl
        self.random: Callable[[], float] = random.random

    def filterMessage(self, context: Any) -> Any:
        client = context.client
        if client is None or client.authUser:
            return CONTINUE  # mail the relay made, or a submission client's
        if client.relayAllowed and not self.options.checkRelayNetworks:
            return CONTINUE
        d = context.read()
        d.addCallback(
            lambda message: context.deferToThread(
                _parse, message, self.authserv, self.options.minKeyBits
            )
        )
        return d.addCallback(self._check, context)

    def _check(self, parsed: _Parsed, context: Any) -> Deferred[Any]:
        client, envelope = context.client, context.envelope
        results = Results(signatures=parsed.signatures)
        # (RFC 8616 4: SPF is evaluated for A-labels, an SMTPUTF8 domain's too)
        helo = _aceDomain(client.helo) if client.helo else ""
        sender = envelope.sender
        if "@" in sender:
            sender = f"{sender.rpartition('@')[0]}@{_domainOf(sender)}"
        results.spfDomain = _domainOf(sender) if sender else helo
        names = sorted({s.keyName.lower() for s in parsed.signatures if not s.result})
        keys: dict[str, Any] = {}

        def gotSPF(answer: tuple[str, str]) -> None:
            results.spf, results.spfReason = answer

        def gotKey(key: Any, name: str) -> None:
            keys[name] = key

        work = [
            checkSPF(self.dns, client.address, sender, helo, self.authserv)
            .addCallback(gotSPF),
            *[_fetchKey(self.dns, n).addCallback(gotKey, n) for n in names],
        ]
        policy: list[Any] = []
        if not parsed.fromProblem and len(parsed.fromDomains) == 1:
            results.headerFrom = parsed.fromDomains[0]

            def notFound(failure: Failure) -> None:
                failure.trap(_TempError)
                policy.append(failure.value)

            work.append(
                findPolicy(self.dns, self.psl, results.headerFrom)
                .addCallbacks(policy.append, notFound)
            )
        d = gatherResults(work, consumeErrors=True)
        d.addCallback(lambda _: context.deferToThread(_verify, parsed, keys))
        d.addCallback(lambda _: self._judge(parsed, results, policy, context))
        return d

    def _dmarc(self, parsed: _Parsed, results: Results, found: list[Any]) -> None:
        if parsed.fromProblem or len(parsed.fromDomains) != 1:
            results.dmarc = "permerror"
            results.dmarcReason = parsed.fromProblem or "several domains in From"
            return
        [answer] = found
        if isinstance(answer, _TempError):
            results.dmarc, results.dmarcReason = "temperror", "policy lookup failed"
            return
        policy, isSubdomain = answer
        if policy is None:
            results.dmarc = "none"
            return
        fromDomain = results.headerFrom

        def aligned(domain: str, mode: str) -> bool:
            if mode == "s":
                return domain == fromDomain
            return orgDomain(self.psl, domain) == orgDomain(self.psl, fromDomain)

        spfAligned = results.spf == "pass" and aligned(results.spfDomain, policy.aspf)
        dkimAligned = any(
            s.result == "pass" and aligned(s.domain, policy.adkim) for s in results.signatures
        )
        results.policy = policy.sp if isSubdomain else policy.p
        if spfAligned or dkimAligned:
            results.dmarc = "pass"
            return
        # Only an identifier aligned with the From: domain could have passed (RFC 7489 4.2):
        # a temporary failure of another one (anyone's d= or MAIL FROM) changes nothing.
        spfTemporary = results.spf == "temperror" and aligned(results.spfDomain, policy.aspf)
        temporary = spfTemporary or any(
            s.result == "temperror" and aligned(s.domain, policy.adkim) for s in results.signatures
        )
        if temporary:  # it might have passed: never a failure for a DNS problem
            results.dmarc, results.dmarcReason = "temperror", "SPF or DKIM lookup failed"
            return
        results.dmarc = "fail"
        disposition = results.policy
        if policy.pct < 100 and self.random() * 100 >= policy.pct:
            disposition = {"reject": "quarantine", "quarantine": "none"}.get(disposition, "none")
        results.disposition = disposition

    def _judge(
        self, parsed: _Parsed, results: Results, policy: list[Any], context: Any
    ) -> FilterResult:
        self._dmarc(parsed, results, policy)
        envelope = context.envelope
        envelope.notes["authres"] = results.notes()
        dkimShown = " ".join(f"{s.result}:{s.domain}" for s in results.signatures) or "none"
        log.info(
            "{queueID}: authres: spf={spf} dkim={dkim} dmarc={dmarc} from={headerFrom}"
            " policy={policy} disposition={disposition}",
            queueID=envelope.queueID,
            spf=results.spf,
            dkim=dkimShown,
            dmarc=results.dmarc,
            headerFrom=results.headerFrom or "-",
            policy=results.policy or "-",
            disposition=results.disposition,
        )
        if parsed.unparsed:
            log.info(
                "{queueID}: authres: DKIM not verified: dkimpy cannot parse the header section:"
                " {error}", queueID=envelope.queueID, error=parsed.unparsed,
            )  # fmt: skip
        verdict = CONTINUE
        if results.dmarc == "fail" and self.options.dmarcReject:
            domain = results.headerFrom
            if results.disposition == "reject":
                verdict = Verdict.reject(f"Error: rejected by DMARC policy for {domain}", 550,
                                         "5.7.1")
            elif results.disposition == "quarantine" and self.options.quarantine == "defer":
                verdict = Verdict.defer(
                    f"Error: deferred by DMARC quarantine policy for {domain}", 451, "4.7.1"
                )
        if verdict is not CONTINUE:
            return FilterResult(verdict)
        helo = context.client.helo
        header = self.field(context.envelope.sender, _aceDomain(helo) if helo else "", results)
        return FilterResult(prepend=(header,), remove=tuple(parsed.forged))

    def field(self, sender: str, helo: str, results: Results) -> bytes:
        """The C{Authentication-Results:} field of C{results}, one method a line."""
        if sender:
            identity = _value(sender) or _value(_domainOf(sender))
            spfPart = f"spf={results.spf}"
            spfPart += _comment(results.spfReason) if results.spf.endswith("error") else ""
            if identity:
                spfPart += f" smtp.mailfrom={identity}"
        else:
            spfPart = f"spf={results.spf}"
            shownHelo = _value(helo)
            if shownHelo:
                spfPart += f" smtp.helo={shownHelo}"
        parts = [spfPart]
        for s in results.signatures:
            part = f"dkim={s.result}"
            if s.result != "pass" and s.reason:
                part += _comment(s.reason)
            for name, value in (("header.d", s.domain), ("header.s", s.selector),
                                ("header.b", s.b)):
                shown = _value(value) if value else None
                if shown:
                    part += f" {name}={shown}"
            parts.append(part)
        if not results.signatures:
            parts.append("dkim=none")
        dmarc = f"dmarc={results.dmarc}"
        if results.dmarc in ("pass", "fail"):
            dmarc += f" (p={results.policy} dis={results.disposition})"
        elif results.dmarcReason:
            dmarc += _comment(results.dmarcReason)
        shownFrom = _value(results.headerFrom) if results.headerFrom else None
        if shownFrom:  # (quoted unless a token: a domain literal may hold "; dkim=pass")
            dmarc += f" header.from={shownFrom}"
        parts.append(dmarc)
        text = ";\r\n\t".join(
            _fold(part) for part in [f"Authentication-Results: {self.authserv}", *parts]
        )
        return f"{text}\r\n".encode("ascii")


def _fold(text: str, width: int = 78) -> str:
    """C{text} (one method's result) folded before its spaces (RFC 5322 2.1.1, 2.2.3) so that
    its lines, after the tab it is written after and the C{;} that ends it, keep within
    C{width} octets where they can; a longer word is left whole (no value is over 256 octets:
    L{_value})."""
    lines = []
    line = ""
    for word in text.split(" "):
        if line and len(line) + 1 + len(word) + 2 > width:
            lines.append(line)
            line = word
        else:
            line = f"{line} {word}" if line else word
    lines.append(line)
    return "\r\n ".join(lines)


def build(options: dict[str, Any], context: Any) -> AuthResults:
    """Build the C{authres} filter from its C{[[plugins]]} table (see L{SCHEMA})."""
    read = context.readOptions(SCHEMA, options)
    context.checkTimeout("dns_timeout", read.dnsTimeout)
    authserv = (read.authservId or context.hostname).lower()
    psl = context.keep("authres:psl", PublicSuffixList)
    dnsc = DNS(context.resolver, context.reactor, read.dnsTimeout)
    return AuthResults(read, authserv, dnsc, psl)
