"""MTA-STS (RFC 8461): the TLS policy a recipient domain publishes for mail to it.

A domain with a policy publishes a TXT record C{_mta-sts.<domain>} (C{v=STSv1; id=...}) and
the policy itself at C{https://mta-sts.<domain>/.well-known/mta-sts.txt}, fetched over HTTPS
with its certificate verified (so the policy cannot be forged by whoever forges DNS)::

    version: STSv1
    mode: enforce
    mx: mail.example.org
    mx: *.example.net
    max_age: 604800

In C{enforce} mode mail goes only to MX hosts the C{mx} patterns match, over TLS whose
certificate is verified for the MX host's name; else it is deferred (never sent in
plaintext, never to another host).  C{testing} only logs what C{enforce} would refuse;
C{none} is no policy.

L{MTASTS} finds the policy of a domain: it asks for the TXT record (at most every
L{RECHECK} seconds per domain), fetches the policy when its C{id} is new, and keeps each
policy for its C{max_age} -- in memory and in a JSON file in the spool, so that a restart
does not forget them (a policy is only useful if it outlives an attacker's DNS).  A domain
whose TXT record or policy cannot be had keeps the policy it had until that expires (RFC
8461 section 5.1); a domain that never had one has none.  DNS and HTTPS never block the
reactor (the cache file is read once, when first needed, and written, in a thread).
"""

from __future__ import annotations

import json
import math
import os
import re
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from typing import Any

from twisted.internet import defer
from twisted.internet.defer import Deferred, inlineCallbacks
from twisted.internet.endpoints import TCP4ClientEndpoint, TCP6ClientEndpoint, wrapClientTLS
from twisted.internet.protocol import Protocol
from twisted.logger import Logger, LogLevel
from twisted.names import dns
from twisted.names import error as dnsError
from twisted.python.failure import Failure

from mailrelay.interfaces import threadHandOff
from mailrelay.lograte import RepeatedProblem
from mailrelay.route.mx import MXResolver

log = Logger()

__all__ = [
    "MTASTS",
    "STSPolicy",
    "describeFetchError",
    "fetchPolicy",
    "parsePolicy",
    "parseRecord",
]

#: Seconds between two lookups of a domain's TXT record (its policy is kept meanwhile).
RECHECK = 300.0
#: The longest C{max_age} honoured (RFC 8461: about a year).
MAX_AGE = 31557600
#: The largest policy file read (RFC 8461 section 3.3: 64 KiB).
MAX_POLICY = 64 * 1024
#: Seconds the fetch of a policy may take.
FETCH_TIMEOUT = 60.0
#: Seconds a TXT lookup may take.
LOOKUP_TIMEOUT = 30.0
#: Domains known (policy or none) beyond which those without one to keep are forgotten.
MAX_KNOWN = 10000

_ID = re.compile(r"[A-Za-z0-9]{1,32}")
_MODES = ("enforce", "testing", "none")


class PolicyError(ValueError):
    """A TXT record or policy that is not one (the message says why)."""


@dataclass(frozen=True)
class STSPolicy:
    """A domain's MTA-STS policy.

    @ivar domain: the policy domain (the recipients' domain), lower case.
    @ivar id: the C{id} of the TXT record it was fetched for.
    @ivar mode: C{"enforce"}, C{"testing"} or C{"none"}.
    @ivar mx: the MX patterns (C{"mail.example.org"}, C{"*.example.net"}), lower case.
    @ivar maxAge: seconds it may be kept after C{fetched}.
    @ivar fetched: when it was fetched (seconds since the epoch).
    """

    domain: str
    id: str
    mode: str
    mx: tuple[str, ...]
    maxAge: int
    fetched: float

    def expired(self, now: float) -> bool:
        return now >= self.fetched + self.maxAge

    def matches(self, host: str) -> bool:
        """Whether the MX host C{host} is one the policy names (RFC 8461 section 4.1: a
        C{*.} pattern stands for exactly one label)."""
        host = host.lower().rstrip(".")
        for pattern in self.mx:
            if pattern.startswith("*."):
                first, dot, rest = host.partition(".")
                if dot and first and rest == pattern[2:]:
                    return True
            elif host == pattern:
                return True
        return False


def parseRecord(records: list[str]) -> str | None:
    """The C{id} of the MTA-STS TXT records C{records} (each the strings of one record,
    joined); C{None} when none is an MTA-STS record.

    @raise PolicyError: more than one is, or the one is malformed (RFC 8461 section 3.1:
        then the domain has no policy record).
    """
    ours = [r for r in records if r.startswith("v=STSv1")]
    if not ours:
        return None
    if len(ours) > 1:
        raise PolicyError(f"{len(ours)} MTA-STS TXT records")
    fields = [f.strip() for f in ours[0].split(";") if f.strip()]
    if fields[0] != "v=STSv1":
        raise PolicyError(f"bad version field {fields[0]!r}")
    for field in fields[1:]:
        name, eq, value = field.partition("=")
        if name == "id":
            if not eq or not _ID.fullmatch(value):
                raise PolicyError(f"bad id {value!r} (1 to 32 letters and digits)")
            return value
    raise PolicyError("no id field")


def parsePolicy(text: str) -> tuple[str, tuple[str, ...], int]:
    """C{(mode, mx patterns, max_age)} of the policy file C{text}.

    @raise PolicyError: not an STSv1 policy (the message says what is wrong).
    """
    fields: dict[str, str] = {}
    mx: list[str] = []
    for line in text.replace("\r\n", "\n").split("\n"):
        if not line.strip():
            continue
        name, colon, value = line.partition(":")
        if not colon:
            raise PolicyError(f"bad line {line[:80]!r}")
        name, value = name.strip(), value.strip()
        if name == "mx":
            mx.append(value.lower().rstrip("."))
        elif name not in fields:
            fields[name] = value
    if fields.get("version") != "STSv1":
        raise PolicyError(f"version is {fields.get('version')!r}, not 'STSv1'")
    mode = fields.get("mode")
    if mode not in _MODES:
        raise PolicyError(f"mode is {mode!r}, not one of {', '.join(_MODES)}")
    age = fields.get("max_age", "")
    if not age.isdigit() or len(age) > 10:
        raise PolicyError(f"max_age is {age!r}, not a number of seconds")
    if mode != "none" and not mx:
        raise PolicyError(f"no mx pattern in a policy of mode {mode!r}")
    for pattern in mx:
        name = pattern[2:] if pattern.startswith("*.") else pattern
        if not name or "*" in name or " " in name or "." not in name:
            raise PolicyError(f"bad mx pattern {pattern!r}")
    return mode, tuple(mx), min(int(age), MAX_AGE)


class _Body(Protocol):
    """Reads a response body of at most L{MAX_POLICY} octets."""

    def __init__(self, done: Deferred[bytes]) -> None:
        self.done = done
        self.data: list[bytes] = []
        self.size = 0

    def dataReceived(self, data: bytes) -> None:
        self.size += len(data)
        if self.size > MAX_POLICY:
            self.transport.stopProducing()  # type: ignore[union-attr]
            if not self.done.called:
                self.done.errback(PolicyError(f"policy larger than {MAX_POLICY} octets"))
            return
        self.data.append(data)

    def connectionLost(self, reason: Any = None) -> None:
        if self.done.called:
            return
        from twisted.web.client import PotentialDataLoss, ResponseDone

        # (PotentialDataLoss: a server that ends the body by closing, without a length.)
        if reason.check(ResponseDone, PotentialDataLoss):
            self.done.callback(b"".join(self.data))
        else:
            self.done.errback(reason)


class _Endpoints:
    """The endpoints of the policy fetches: the host's address looked up through the relay's
    own resolver (its C{[dns] nameservers}: A and AAAA, as for MX hosts), TLS verified for
    the host's name against the platform's trust store (C{clientTLS(host)})."""

    def __init__(self, reactor: Any, addresses: Callable[[str], Deferred],
                 clientTLS: Callable[[str], Any], port: int | None = None) -> None:
        self.reactor = reactor
        self.addresses = addresses
        self.clientTLS = clientTLS
        self.port = port

    def endpointForURI(self, uri: Any) -> Any:
        return _ResolvingEndpoint(
            self.reactor, self.addresses, self.clientTLS, uri.host.decode("ascii"),
            self.port or uri.port
        )


class _ResolvingEndpoint:
    def __init__(self, reactor: Any, addresses: Callable[[str], Deferred],
                 clientTLS: Callable[[str], Any], host: str, port: int) -> None:
        self.reactor = reactor
        self.addresses = addresses
        self.clientTLS = clientTLS
        self.host = host
        self.port = port

    @inlineCallbacks
    def connect(self, factory: Any) -> Any:
        found = yield self.addresses(self.host)
        if not found:
            raise PolicyError(f"no address for mta-sts host {self.host}")
        address = found[0]
        kind = TCP6ClientEndpoint if ":" in address else TCP4ClientEndpoint
        tcp = kind(self.reactor, address, self.port, timeout=FETCH_TIMEOUT)
        protocol = yield wrapClientTLS(self.clientTLS(self.host), tcp).connect(factory)
        return protocol


class _Discard(Protocol):
    """Reads no body: the connection is dropped at once."""

    def connectionMade(self) -> None:
        self.transport.stopProducing()  # type: ignore[union-attr]


def fetchPolicy(
    reactor: Any, addresses: Callable[[str], Deferred], domain: str,
    clientTLS: Callable[[str], Any], port: int | None = None
) -> Deferred:
    """The text of C{domain}'s policy file, fetched over HTTPS (no redirect followed, at most
    L{MAX_POLICY} octets, L{FETCH_TIMEOUT} seconds).

    @param addresses: C{addresses(host)}: a Deferred firing with the addresses of C{host}.
    @param clientTLS: C{clientTLS(host)}: the C{IOpenSSLClientConnectionCreator} that verifies
        C{host}'s certificate against the platform's trust store (RFC 8461 section 3.3).

    @param port: the HTTPS port (443, the only one RFC 8461 allows; tests use another).
    @return: a Deferred firing with the text, or failing (L{PolicyError} for an answer
        that is not a policy, the network's or TLS's errors otherwise).
    """
    from twisted.web.client import Agent
    from twisted.web.http_headers import Headers

    agent = Agent.usingEndpointFactory(reactor, _Endpoints(reactor, addresses, clientTLS, port))
    url = f"https://mta-sts.{domain}/.well-known/mta-sts.txt".encode("ascii")
    d = agent.request(b"GET", url, Headers({b"User-Agent": [b"mailrelay"]}))

    def got(response: Any) -> Deferred[bytes]:
        if response.code != 200:
            response.deliverBody(_Discard())
            raise PolicyError(f"HTTP status {response.code} (not 200)")
        types = response.headers.getRawHeaders(b"content-type") or [b""]
        if not types[0].lower().startswith(b"text/plain"):
            response.deliverBody(_Discard())
            raise PolicyError(f"content type {types[0].decode('latin-1')!r}, not text/plain")
        reader: list[_Body] = []

        def cancel(_: Deferred[bytes]) -> None:  # (the time-out): drop the connection
            if reader and reader[0].transport is not None:
                reader[0].transport.stopProducing()  # type: ignore[attr-defined]

        body: Deferred[bytes] = Deferred(cancel)
        reader.append(_Body(body))
        response.deliverBody(reader[0])
        return body

    d.addCallback(got)
    d.addTimeout(FETCH_TIMEOUT, reactor)
    return d


@dataclass
class _Known:
    """What is known of a domain: its policy (or C{None}), when its TXT record was last
    looked at (seconds since the epoch), and, without a policy, why none could be had then
    when that may pass (L{MTASTS.unknown}), else C{None}."""

    policy: STSPolicy | None
    checked: float
    unknown: str | None = None


class MTASTS:
    """The MTA-STS policies of recipient domains (see the module docstring).

    @param resolver: a C{twisted.names} C{IResolver} (TXT and address lookups).
    @param clock: the reactor (time-outs).
    @param cacheFile: the JSON file the policies are kept in across restarts, or C{None}.
    @param fetch: C{fetch(domain)}: a Deferred of the policy text (L{fetchPolicy}; tests
        give their own).
    @param deferToThread: runs the read and the writes of C{cacheFile} off the reactor
        thread.
    @param now: the wall clock (seconds since the epoch), for the policies' ages.
    @param describeTLS: says why a connection failed (L{describeFetchError}).
    @param clientTLS: C{clientTLS(host)}: verified TLS to C{host} (see L{fetchPolicy});
        required without C{fetch}.
    """

    def __init__(
        self,
        resolver: Any,
        clock: Any,
        cacheFile: str | None = None,
        fetch: Callable[[str], Deferred] | None = None,
        deferToThread: Callable[..., Deferred] | None = None,
        now: Callable[[], float] = time.time,
        describeTLS: Callable[[Failure], str] | None = None,
        clientTLS: Callable[[str], Any] | None = None,
    ) -> None:
        self.resolver = resolver
        self.clock = clock
        self.cacheFile = cacheFile
        self.describeTLS = describeTLS
        if fetch is None:
            if clientTLS is None:
                raise TypeError("MTASTS fetches policies only with clientTLS")
            verified = clientTLS
            hosts = MXResolver(resolver, clock)

            def addresses(host: str) -> Deferred:
                found = hosts.resolve(f"[{host}]:443")
                return found.addCallback(lambda mx: [h.address for h in mx])

            fetch = lambda domain: fetchPolicy(clock, addresses, domain, verified)  # noqa: E731
        self._fetch = fetch
        self._deferToThread = (
            deferToThread if deferToThread is not None else threadHandOff(clock)
        )
        self._now = now
        self._known: dict[str, _Known] = {}
        self._inFlight: dict[str, list[Deferred[STSPolicy | None]]] = {}
        self._saving = False
        self._saveAgain = False
        #: The log of a lasting failure to write the cache (a full disk): not one line a
        #: write.
        self._notWritten = RepeatedProblem(log, now)
        self._loaded = False
        #: the lookups waiting for the cache file to be read, or C{None}: not being read
        self._loading: list[Deferred[None]] | None = None

    def policy(self, domain: str) -> Deferred[STSPolicy | None]:
        """The policy of C{domain} to deliver with now, or C{None}; never fails."""
        domain = domain.lower().rstrip(".")
        if not self._loaded:  # (when first needed: a process that only checks never reads it)
            waiting: Deferred[None] = Deferred()
            found: Deferred[STSPolicy | None] = Deferred()
            waiting.addCallback(lambda _: self._policy(domain)).chainDeferred(found)
            if self._loading is not None:
                self._loading.append(waiting)
            else:
                self._loading = [waiting]
                self._load()  # (fires the waiting at once when it is read at once)
            return found
        return self._policy(domain)

    def unknown(self, domain: str) -> str | None:
        """Why C{domain}'s policy could not be had at its last look, when that may pass (its
        TXT record could not be looked up, or it has one and its policy could not be
        fetched, none cached): L{policy} then gave C{None}, as for a domain without
        MTA-STS (RFC 8461 section 5.1), but it may have a policy.  C{None} otherwise."""
        known = self._known.get(domain.lower().rstrip("."))
        return None if known is None or known.policy is not None else known.unknown

    def _policy(self, domain: str) -> Deferred[STSPolicy | None]:
        now = self._now()
        if len(self._known) > MAX_KNOWN:
            self._forget(now)
        known = self._known.get(domain)
        # (Checked "after" now: before a step back of the clock; checked again now.)
        if known is not None and 0 <= now - known.checked < RECHECK:
            policy = known.policy
            return defer.succeed(None if policy is None or policy.expired(now) else policy)
        if domain in self._inFlight:  # (one lookup per domain at a time; others wait)
            waiting: Deferred[STSPolicy | None] = Deferred()
            self._inFlight[domain].append(waiting)
            return waiting
        waiters: list[Deferred[STSPolicy | None]] = []
        self._inFlight[domain] = waiters

        def failed(failure: Any) -> None:
            log.failure("MTA-STS: looking up the policy of {domain}", failure, domain=domain)
            return None

        def done(policy: STSPolicy | None) -> STSPolicy | None:
            del self._inFlight[domain]
            for waiting in waiters:
                waiting.callback(policy)
            return policy

        d = self._refresh(domain, known.policy if known is not None else None)
        return d.addErrback(failed).addCallback(done)

    def _forget(self, now: float) -> None:
        """Drop what is known of domains without a policy to keep, once not checked for
        L{RECHECK}: a relay sending to many domains keeps them for minutes, not for ever."""
        for domain, known in list(self._known.items()):
            policy = known.policy
            if now - known.checked >= RECHECK and (policy is None or policy.expired(now)):
                del self._known[domain]

    @inlineCallbacks
    def _refresh(self, domain: str, cached: STSPolicy | None) -> Any:
        now = self._now()
        usable = None if cached is None or cached.expired(now) else cached
        try:
            recordID = yield self._lookup(domain)
        except Exception as e:
            if usable is not None or not isinstance(e, _NoRecord):
                log.info("MTA-STS: no TXT record of {domain} to be had ({error}); {keeping}",
                         domain=domain, error=str(e),
                         keeping="keeping its cached policy" if usable else "no policy")
            self._known[domain] = _Known(usable, now, None if usable or isinstance(
                e, _NoRecord) else f"its TXT record cannot be looked up: {e}")
            return usable
        if recordID is None:
            self._known[domain] = _Known(usable, now)
            return usable
        if usable is not None and usable.id == recordID:
            self._known[domain] = _Known(usable, now)
            return usable
        try:
            text = yield self._fetch(domain)
            if isinstance(text, bytes):
                text = text.decode("utf-8")
            mode, mx, maxAge = parsePolicy(text)
        except Exception as e:
            error = describeFetchError(e, describeTLS=self.describeTLS)
            log.warn(
                "MTA-STS: cannot fetch the policy of {domain} (id {id}): {error}; {keeping}",
                domain=domain,
                id=recordID,
                error=error,
                keeping="keeping its cached policy" if usable else "no policy",
            )
            self._known[domain] = _Known(usable, now, None if usable else (
                f"its policy (id {recordID}) cannot be fetched: {error}"))
            return usable
        policy = STSPolicy(domain, recordID, mode, mx, maxAge, self._now())
        log.info(
            "MTA-STS: policy of {domain} (id {id}): mode {mode}, {mx}max_age {maxAge}",
            domain=domain, id=recordID, mode=mode, maxAge=maxAge,
            mx=f"mx {' '.join(mx)}, " if mx else "",
        )
        self._known[domain] = _Known(policy, now)
        self._save()
        return policy

    @inlineCallbacks
    def _lookup(self, domain: str) -> Any:
        """The id of C{domain}'s MTA-STS TXT record, or C{None} (none, or a malformed one)."""
        name = f"_mta-sts.{domain}"
        try:
            answers, _, _ = yield self.resolver.lookupText(name, timeout=(LOOKUP_TIMEOUT,))
        except (dnsError.DomainError, dnsError.AuthoritativeDomainError):
            raise _NoRecord("no such name") from None
        # (Every TXT record of the answer: the name may be a CNAME, RFC 8461 section 3.1.)
        texts = [
            b"".join(a.payload.data).decode("utf-8", "replace")
            for a in answers
            if a.type == dns.TXT
        ]
        try:
            return parseRecord(texts)
        except PolicyError as e:
            log.warn("MTA-STS: TXT record of {domain} ignored: {error}", domain=domain,
                     error=str(e))
            return None

    # -- the cache file -------------------------------------------------------------------

    def _load(self) -> None:
        """Read the cache file in the thread pool (its size grows with the domains that
        publish a policy); the lookups asked meanwhile wait in C{_loading}."""
        if self.cacheFile is None:
            self._cacheRead(([], []))
            return
        d = self._deferToThread(_loadCache, self.cacheFile)
        d.addErrback(lambda failure: (failure, []))
        d.addCallback(self._cacheRead)

    def _notRead(self, failure: Failure) -> list[STSPolicy]:
        """Any failure (the lookups waiting must go on): logged, the cache not used."""
        error = failure.value
        log.warn("MTA-STS: cache {path} not read ({error}); starting without it",
                 path=self.cacheFile, error=str(error) or type(error).__name__)
        return []

    def _cacheRead(self, read: tuple[list[STSPolicy] | Failure, list[str]]) -> None:
        policies, removed = read
        for leftover in removed:
            log.info("MTA-STS: removed {path}, left by an interrupted write", path=leftover)
        if isinstance(policies, Failure):
            policies = self._notRead(policies)
        now = self._now()
        for loaded in policies:
            if not loaded.expired(now):
                self._known.setdefault(loaded.domain, _Known(loaded, 0.0))
        self._loaded = True
        waiting, self._loading = self._loading or [], None
        for d in waiting:
            d.callback(None)

    def _save(self) -> None:
        """Write the policies to the cache file (one write at a time; a change meanwhile
        writes again after)."""
        if self.cacheFile is None:
            return
        if self._saving:
            self._saveAgain = True
            return
        self._saving = True
        now = self._now()
        policies = [
            asdict(k.policy)
            for k in self._known.values()
            if k.policy is not None and not k.policy.expired(now)
        ]
        d = self._deferToThread(_writeCache, self.cacheFile, policies)

        def written(result: Any) -> None:
            self._saving = False
            if isinstance(result, Failure):
                error = result.value
                self._notWritten.occurred(
                    LogLevel.warn, "MTA-STS: cannot write the cache {path}: {error}",
                    path=self.cacheFile, error=(
                        error.strerror if isinstance(error, OSError) and error.strerror
                        else result.getErrorMessage()))
            else:
                self._notWritten.over("MTA-STS: the cache {path} is written again",
                                      path=self.cacheFile)
            if self._saveAgain:
                self._saveAgain = False
                self._save()

        d.addBoth(written)


def _cached(entry: Any) -> STSPolicy:
    """The policy of an entry of the cache file.

    @raise ValueError: not one that file's writer writes (the file is then not used).
    """
    if not isinstance(entry, dict):
        raise ValueError(f"an entry is {type(entry).__name__}, not an object")
    domain, id, mode, mx = entry["domain"], entry["id"], entry["mode"], entry["mx"]
    maxAge, fetched = entry["maxAge"], entry["fetched"]
    if not (isinstance(domain, str) and isinstance(id, str) and _ID.fullmatch(id)):
        raise ValueError(f"bad domain or id in {entry!r:.100}")
    if mode not in _MODES or not isinstance(mx, list) or not all(isinstance(m, str) for m in mx):
        raise ValueError(f"bad mode or mx in {entry!r:.100}")
    if type(maxAge) is not int or not 0 <= maxAge <= MAX_AGE:
        raise ValueError(f"bad maxAge {maxAge!r:.30}")
    if type(fetched) not in (int, float) or not math.isfinite(fetched):
        raise ValueError(f"bad fetched {fetched!r:.30}")
    return STSPolicy(domain, id, mode, tuple(mx), maxAge, float(fetched))


def describeFetchError(
    error: BaseException,
    timeout: float = FETCH_TIMEOUT,
    describeTLS: Callable[[Failure], str] | None = None,
) -> str:
    """Why a policy fetch failed, in words for the log.

    @param describeTLS: says why a connection failed (the SMTP client's words for TLS:
        L{mailrelay.delivery.tls.describeTLSFailure}), or C{None}.
    """
    from twisted.web.client import ResponseFailed

    if isinstance(error, (defer.TimeoutError, defer.CancelledError)):
        return f"no answer within {timeout:g}s"
    if isinstance(error, ResponseFailed):  # (and ResponseNeverReceived): failures within
        reasons = [
            describeTLS(f) if describeTLS is not None else describeFetchError(f.value, timeout)
            for f in error.reasons
        ]
        return "; ".join(r for r in reasons if r) or type(error).__name__
    if isinstance(error, OSError) and error.strerror:
        return error.strerror
    text = str(error)
    return text if text and not text.startswith("[<") else type(error).__name__


class _NoRecord(Exception):
    """The domain has no TXT record of that name."""


def _loadCache(path: str) -> tuple[list[STSPolicy] | Failure, list[str]]:
    """In a thread: the policies of the cache file C{path} (L{_readCache}), or why they
    cannot be read, and the temporary files of interrupted writes removed beside it
    (L{_removeLeftovers})."""
    removed = _removeLeftovers(path)
    try:
        return _readCache(path), removed
    except Exception:
        return Failure(), removed


def _readCache(path: str) -> list[STSPolicy]:
    """The policies of the cache file C{path} (C{[]} when there is none).

    @raise ValueError: (and C{OSError}, C{KeyError}, C{TypeError}, C{RecursionError}) a
        file that cannot be read, or is not one L{_writeCache} writes.
    """
    try:
        with open(path, encoding="utf-8") as f:
            data = json.load(f)
    except FileNotFoundError:
        return []
    return [_cached(p) for p in data["policies"]]


def _temporary(path: str, pid: int) -> str:
    """The temporary file the process C{pid} writes the cache file C{path} to."""
    return f"{path}.{pid}.tmp"


def _removeLeftovers(path: str) -> list[str]:
    """Remove the temporary files of the cache file C{path} that writes of processes no
    longer running left (a crash, a power cut), as Postfix's postsuper does at start with
    those of its queue: the files removed.  A running process's (during a reload the old
    delivery process may be writing its own) is kept; so is what cannot be removed."""
    directory, name = os.path.split(path)
    pattern = re.compile(re.escape(name) + r"\.([0-9]{1,10})\.tmp")
    removed = []
    try:
        names = os.listdir(directory or ".")
    except OSError:
        return []
    for entry in names:
        match = pattern.fullmatch(entry)
        if match is None:
            continue
        pid = int(match.group(1))
        if pid != os.getpid() and _running(pid):
            continue
        leftover = _temporary(path, pid)
        try:
            os.unlink(leftover)
        except OSError:
            continue
        removed.append(leftover)
    return removed


def _running(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except (PermissionError, OverflowError, ValueError):  # (another user's)
        return True
    return True


def _writeCache(path: str, policies: list[dict[str, Any]]) -> None:
    """Write C{policies} to the cache file C{path}, whole: to a temporary file renamed onto
    it.  A write that fails removes its temporary file (the spool's disk full would keep
    it, filling the disk further at each failure).

    @raise OSError: the write failed.
    """
    # (A name of this process's: during a reload the old and new delivery processes may
    # both write; each renames a whole file of its own.)
    temporary = _temporary(path, os.getpid())
    # Mode 0600 whatever the umask, as the queue files: the spool directory is searchable
    # by all when other users may list the queue ([spool] mailq_users), and these are the
    # domains the relay sends mail to.
    fd = os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o600)
    try:
        os.fchmod(fd, 0o600)  # (a file left by a write that failed keeps its old mode)
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            fd = -1  # (the file object closes it)
            json.dump({"policies": policies}, f, sort_keys=True)
            f.flush()
            os.fsync(f.fileno())
        os.replace(temporary, path)
    except BaseException:
        if fd >= 0:
            os.close(fd)
        try:
            os.unlink(temporary)
        except OSError:
            pass  # (the failure said is the write's)
        raise
