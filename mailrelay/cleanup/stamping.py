"""Header stamping: C{Received:}, C{Message-Id:} and C{Date:}, and loop detection.

L{HeaderProcessor} sits between the session's message data and the spool: it holds back the
header section (bounded), lets the stampers add their fields once it is complete, then streams
the rest straight through.  The message is otherwise stored byte for byte as received.  A
header section longer than the bound is not stamped: the rest of the message is discarded,
and the intake refuses it (C{[limits] header_size}).

Stampers may answer with a Deferred (L{runStampers}), each within its configured C{timeout}:
the body that arrives meanwhile is held back, and the outcome is awaited at the end of data.
A stamper that raises, fails or is too slow makes the message L{STAMPING_FAILED} (451 4.3.0),
logged once with the stamper's name: a failing plugin never lets a message through
unstamped.
"""

from __future__ import annotations

import re
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from functools import lru_cache
from typing import Any

from twisted.internet.defer import (
    CancelledError,
    Deferred,
    TimeoutError,
    fail,
    maybeDeferred,
    succeed,
)
from twisted.logger import Logger
from twisted.python.failure import Failure
from zope.interface import implementer

from mailrelay.address import AddressError, clientIP, hostnameProblem, normaliseDomain
from mailrelay.envelope import ClientInfo, SavedFields, savePluginKept, undoPluginChanges
from mailrelay.headers import (
    FIELD_NAME,
    HEADER_SECTION_LIMIT,
    needsEmptyLine,
    parseHeaderSection,
)
from mailrelay.interfaces import IHeaderStamper, PluginContext, StampContext, StampResult
from mailrelay.metrics import dropAnswer, heldPast, heldText, timePlugin
from mailrelay.smtp.replies import Reply
from mailrelay.smtp.wire import formatDate

log = Logger()

#: The reply to a message whose stamping failed (a stamper raised, failed or was too slow).
STAMPING_FAILED = Reply(
    451, "4.3.0", "Error: temporary failure processing the message, try again later"
)


#: The stampers' hook, as the plugin time metric names it.
_HOOK = "header_stamper"

#: A field: name, colon, value; continuation lines start with white space; CRLF only.
WELL_FORMED_FIELD = re.compile(
    rb"[\x21-\x39\x3b-\x7e]+:[^\r\n\x00]*(?:\r\n[ \t][^\r\n\x00]*)*\r\n"
)
_HELO_UNSAFE = re.compile(r"[^A-Za-z0-9.\-_:\[\]]")


class HeaderProcessor:
    """Buffers the header section of one message, stamps it, then streams.

    @param sink: called with the bytes to store, in order.
    @param stamp: called once with the parsed header fields; returns the L{StampResult}, or
        a Deferred firing with it (the data written meanwhile is held until it fires).  It
        must not raise (a failure is a failed Deferred).
    """

    def __init__(
        self,
        sink: Callable[[bytes], None],
        stamp: Callable[[list[tuple[str, bytes]]], StampResult | Deferred[StampResult]],
        limit: int = HEADER_SECTION_LIMIT,
    ) -> None:
        self._sink = sink
        self._stamp = stamp
        self._limit = limit
        #: The start of the message held back until its header section is complete.
        self._pending: bytearray | None = bytearray()
        self.headers: list[tuple[str, bytes]] = []
        #: Whether L{headers} is the whole header section: not when it went on past
        #: C{limit}; the stamp callable is then never called and nothing more reaches the
        #: sink (the message is to be refused).  Set before the stamp callable is called.
        self.complete = True
        #: The header fields the stampers added, once they answered.
        self.added = b""
        #: The stamping, from the end of the header section on (see L{finish}).
        self._stamping: Deferred[Any] | None = None
        #: Data written while the stamping is in progress, in order.
        self._held: list[bytes] | None = None
        self._failure: Failure | None = None

    @property
    def stamping(self) -> bool:
        """The stampers have been called and have not answered yet."""
        return self._held is not None

    def write(self, data: bytes) -> None:
        pending = self._pending
        if pending is None:
            if self._held is not None:
                self._held.append(data)
            else:
                self._sink(data)
            return
        searchFrom = max(len(pending) - 3, 0)  # only the new data, and a CRLF CR before it
        pending += data
        # The section certainly ends by the first empty line, or is taken as ended at the limit.
        if (
            len(pending) > self._limit
            or pending.startswith(b"\r\n")
            or pending.find(b"\r\n\r\n", searchFrom) >= 0
        ):
            self._flush()

    def finish(self) -> Deferred[None]:
        """The message ended: stamp now if the header section never ended.

        @return: a Deferred firing once the whole stamped message is in the sink, or failing
            with the stampers' error (then nothing more is written to the sink).
        """
        if self._pending is not None:
            self._flush()
        if self._stamping is None:
            return succeed(None)  # stamped at once

        def outcome(_: None) -> Failure | None:
            return self._failure

        return self._stamping.addCallback(outcome)

    def abort(self) -> None:
        """The message is abandoned: stop stamping, write nothing more to the sink."""
        self._pending = self._held = None
        self._sink = _discard
        if self._stamping is not None:
            self._stamping.cancel()  # nothing once it has its result

    def count(self, name: str) -> int:
        lname = name.lower()
        return sum(1 for n, _ in self.headers if n.lower() == lname)

    def _flush(self) -> None:
        data = bytes(self._pending or b"")
        self._pending = None
        self.headers, end = parseHeaderSection(data, self._limit)
        # Cut at the limit, the section may go on with fields never parsed.
        self.complete = len(data) <= self._limit or FIELD_NAME.match(data, end) is None
        if not self.complete:
            self._sink = _discard
            return
        result = self._stamp(self.headers)
        if not isinstance(result, Deferred):
            self._stamped(result, data[:end], data[end:])
            return
        self._held = []
        self._stamping = result
        result.addCallbacks(
            self._stamped, self._stampingFailed, callbackArgs=(data[:end], data[end:])
        )

    def _stamped(self, result: StampResult, head: bytes, rest: bytes) -> None:
        held, self._held = self._held or [], None
        added = b"".join(result.append)
        if (head or result.prepend or added) and needsEmptyLine(rest, 0):
            added += b"\r\n"  # (the rest is body: Postfix's cleanup inserts the empty line)
        self.added = b"".join(result.prepend) + added
        self._sink(b"".join(result.prepend) + head + added + rest + b"".join(held))

    def _stampingFailed(self, failure: Failure) -> None:
        self._failure = failure
        self._held = None
        self._sink = _discard


def _discard(data: bytes) -> None:
    """The sink of a message whose stamping failed, or whose header section is too long: it
    will be refused."""


@lru_cache(maxsize=1024)
def _heloDomain(helo: str) -> str:
    """The HELO name as the C{From-domain} of C{Received:}: a host name or an address literal
    of valid syntax, as the client gave it (as Postfix's smtpd writes its HELO name: an
    IPv4-mapped literal stays C{[IPv6:::ffff:192.0.2.7]}, not hex), else C{"unknown"} (never
    free text: no comment can be spoofed)."""
    if helo.startswith("["):
        try:
            normaliseDomain(helo)
        except AddressError:
            return "unknown"
        return helo
    return helo if hostnameProblem(helo) is None else "unknown"


@lru_cache(maxsize=1024)
def _addressLiteral(ip: str) -> str:
    parsed = clientIP(ip)  # (without an IPv6 zone id; an IPv4-mapped one as IPv4)
    if parsed is None:
        return "[" + _HELO_UNSAFE.sub("?", ip) + "]"
    if parsed.version == 6:
        return f"[IPv6:{parsed.compressed}]"
    return f"[{parsed}]"


def protocolName(context: StampContext) -> str:
    """The C{with} protocol of RFC 3848 / RFC 6531 (UTF8SMTP when SMTPUTF8 was used)."""
    assert context.client is not None
    name = context.client.protocol
    if context.envelope.smtputf8 and name.startswith("ESMTP"):
        name = "UTF8SMTP" + name[5:]
    return name


def _receivedFrom(context: StampContext, client: ClientInfo, authUser: bool) -> str:
    """The RFC 5321 section 4.4 C{Received:} field of a message from C{client}, up to its date
    (with C{authUser}, the user name the client logged in with)."""
    envelope = context.envelope
    helo = _heloDomain(client.helo or "unknown")
    rdns = client.rdns or "unknown"
    received = (
        f"Received: from {helo} ({rdns} {_addressLiteral(client.address)})\r\n"
        f"\tby {context.hostname} (mailrelay) with {protocolName(context)}"
        f" id {envelope.queueID}"
    )
    if client.tls:
        received += f"\r\n\t(using {client.tls})"
    if client.authUser and authUser:
        received += f"\r\n\t(authenticated as {_HELO_UNSAFE.sub('?', client.authUser)})"
    if len(envelope.recipients) == 1:
        # As given at RCPT (Postfix's smtpd writes its RCPT address), not as rewritten.
        rcpt = envelope.recipients[0].original or envelope.recipients[0].address
        if "\r" not in rcpt and "\n" not in rcpt:
            received += f"\r\n\tfor <{rcpt}>"
    return received


#: The fields that make a message a resent one (Postfix's HDR_OPT_RR fields, header_opts.c).
_RESENT_FIELDS = frozenset(
    "resent-" + name
    for name in ("bcc", "cc", "date", "from", "message-id", "reply-to", "sender", "to")
)


@implementer(IHeaderStamper)
class DefaultStamper:
    """Adds the RFC 5321 section 4.4 C{Received:} field, and C{Message-Id:} and C{Date:} when
    the message has none and the listener allows it (C{add_message_id}, C{add_date}); in a
    message with a C{Resent-} field, C{Resent-Message-Id:} and C{Resent-Date:} instead.

    A message the relay made itself (no client: a delivery status notification) gets the
    local form C{Received: by <host> (mailrelay) id <queue id>; <date>}.

    The user name a client logged in with is not shown to every recipient (the protocol,
    C{ESMTPSA}, says that it did), as Postfix's C{smtpd_sasl_authenticated_header = no}:
    with C{authUser}, C{(authenticated as USER)} follows the TLS comment.
    """

    def __init__(
        self, addMessageID: bool = True, addDate: bool = True, authUser: bool = False
    ) -> None:
        self.addMessageID = addMessageID
        self.addDate = addDate
        self.authUser = authUser

    def stamp(self, context: StampContext) -> StampResult:
        envelope = context.envelope
        date = formatDate(context.now)
        if context.client is None:
            received = f"Received: by {context.hostname} (mailrelay) id {envelope.queueID}"
        else:
            received = _receivedFrom(context, context.client, self.authUser)
        received += f"; {date}\r\n"
        result = StampResult(prepend=[received.encode("utf-8")])
        options = context.listenerOptions
        # A resent message (RFC 5322 3.6.6) gets the fields of its resent block instead, as
        # from Postfix's cleanup (cleanup_header_done_callback, cleanup_message.c).
        resent = "Resent-" if any(n.lower() in _RESENT_FIELDS for n, _ in context.headers) else ""
        # (A header section longer than the relay holds may have either past that.)
        addMessageID = self.addMessageID and options.get("add_message_id", True)
        addMessageID = addMessageID and context.complete
        if addMessageID and not context.hasHeader(resent + "Message-Id"):
            stamp = time.strftime("%Y%m%d%H%M%S", time.gmtime(context.now))
            result.append.append(
                f"{resent}Message-Id: <{stamp}.{envelope.queueID}@{context.hostname}>\r\n"
                .encode("ascii")
            )
        addDate = self.addDate and options.get("add_date", True) and context.complete
        if addDate and not context.hasHeader(resent + "Date"):
            result.append.append(f"{resent}Date: {date}\r\n".encode("ascii"))
        return result


def buildDefaultStamper(options: dict[str, Any], context: PluginContext) -> DefaultStamper:
    """Factory for the C{default} header stamper plugin (options: C{message_id}, C{date},
    C{auth_user})."""
    from mailrelay.errors import ConfigError

    allowed = {"message_id", "date", "auth_user"}
    for key, value in options.items():
        if key not in allowed:
            raise ConfigError(f"unknown option; allowed: {', '.join(sorted(allowed))}", key=key)
        if not isinstance(value, bool):
            raise ConfigError(f"must be true or false, not {value!r}", key=key)
    return DefaultStamper(
        addMessageID=options.get("message_id", True),
        addDate=options.get("date", True),
        authUser=options.get("auth_user", False),
    )


@dataclass(frozen=True)
class ConfiguredStamper:
    """A header stamper as configured.

    @ivar name: its plugin's name, for the log.
    @ivar stamper: the L{IHeaderStamper} provider.
    @ivar timeout: seconds it may take to answer.
    """

    name: str
    stamper: Any
    timeout: float


class StampingFailed(Exception):
    """A header stamper raised, failed, gave no answer in time, or returned something that
    is not a L{StampResult} of well-formed fields; already logged, naming the stamper."""


def runStampers(
    stampers: Sequence[ConfiguredStamper], context: StampContext, clock: Any
) -> StampResult | Deferred[StampResult]:
    """Run every stamper, in order, each within its timeout (on C{clock}); later stampers'
    prepended fields go on top.

    @return: the combined L{StampResult} when every stamper answered at once; otherwise a
        Deferred firing with it, or failing with L{StampingFailed} (logged here, once,
        naming the stamper), or with C{CancelledError} when cancelled (the message was
        abandoned; not logged).
    """
    total = StampResult()
    queueID = context.envelope.queueID
    #: What the stamper being run must leave as it found it (L{savePluginKept}).
    kept: list[SavedFields] = []

    def watch() -> None:
        kept[:] = [savePluginKept((context,))]

    def run(d: Deferred[Any], configured: ConfiguredStamper) -> Deferred[None]:
        if not d.called:
            d.addTimeout(configured.timeout, clock)
        return d.addCallbacks(add, failed, callbackArgs=(configured,), errbackArgs=(configured,))

    def add(result: object, configured: ConfiguredStamper) -> None:
        # (A change is undone and named here: the intake's own check at the commit cannot
        # say which plugin made it.)
        problem = undoPluginChanges(kept[0]) if kept else None
        if problem is None:
            problem = _resultProblem(result, context.envelope.smtputf8)
            problem = None if problem is None else f"returned {problem}"
        if problem is not None:
            log.error(
                "{queueID}: header stamper {stamper} {problem}; the message is refused with 451",
                queueID=queueID,
                stamper=configured.name,
                problem=problem,
            )
            raise StampingFailed(f"header stamper {configured.name} {problem}")
        assert isinstance(result, StampResult)
        total.prepend[:0] = result.prepend
        total.append.extend(result.append)

    def failed(
        failure: Failure, configured: ConfiguredStamper, held: float | None = None
    ) -> Failure:
        if kept:
            undoPluginChanges(kept[0])  # (the failure is what the log says)
        if failure.check(CancelledError, StampingFailed):
            return failure
        if failure.check(TimeoutError):
            log.error(
                "{queueID}: header stamper {stamper} gave no answer in {timeout:g}s; the "
                "message is refused with 451{held}",
                queueID=queueID,
                stamper=configured.name,
                timeout=configured.timeout,
                held=heldText(held),
            )
            what = f"gave no answer in {configured.timeout:g}s"
        else:
            log.failure(
                "{queueID}: header stamper {stamper} failed; the message is refused with 451",
                failure,
                queueID=queueID,
                stamper=configured.name,
            )
            what = f"failed: {failure.getErrorMessage()}"
        return Failure(StampingFailed(f"header stamper {configured.name} {what}"))

    def tooLate(answer: object, configured: ConfiguredStamper, held: float) -> Failure:
        # (Its call held the reactor past its timeout, which could not fire: too late.)
        dropAnswer(answer)
        return failed(Failure(TimeoutError()), configured, held)

    def runNext(_: object, configured: ConfiguredStamper) -> Deferred[None]:
        started = time.perf_counter()
        watch()
        d = timePlugin(_HOOK, configured.name, maybeDeferred(configured.stamper.stamp, context),
                       started)
        held = heldPast(configured.timeout, started)
        return run(d, configured) if held is None else fail(tooLate(d, configured, held))

    # Stampers answering at once (the usual case) run in a plain loop; from the first one
    # answering with a Deferred on, the rest wait in its callback chain.
    for index, configured in enumerate(stampers):
        started = time.perf_counter()
        watch()
        try:
            result = configured.stamper.stamp(context)
        except Exception:
            timePlugin(_HOOK, configured.name, None, started)
            return fail(failed(Failure(), configured))
        timePlugin(_HOOK, configured.name, result, started)
        held = heldPast(configured.timeout, started)
        if held is not None:
            return fail(tooLate(result, configured, held))
        if isinstance(result, Deferred):
            d = run(result, configured)
            for later in stampers[index + 1 :]:
                d.addCallback(runNext, later)
            return d.addCallback(lambda _: total)
        try:
            add(result, configured)
        except StampingFailed:
            return fail()
    return total


def fieldProblem(field: object, smtputf8: bool) -> str | None:
    """What is wrong with a header field a plugin adds, or C{None}: it must be C{bytes}, one
    whole well-formed field, with no line over 998 octets (RFC 5322 2.1.1: the next hop
    may refuse it, and the message would bounce after our 250), and ASCII unless the
    message is SMTPUTF8 (RFC 6532: UTF-8 in the header needs it; else RFC 2047 encoded
    words)."""
    if not isinstance(field, bytes) or not WELL_FORMED_FIELD.fullmatch(field):
        return f"a malformed header field: {field!r}"
    if max(len(line) for line in field.split(b"\r\n")) > 998:
        return f"a header field with a line over 998 octets (fold it, RFC 5322 2.1.1): {field!r}"
    if not smtputf8 and not field.isascii():
        return (
            f"a header field with 8-bit octets in a message that is not SMTPUTF8 (encode "
            f"them as RFC 2047 says): {field!r}"
        )
    return None


def _resultProblem(result: object, smtputf8: bool) -> str | None:
    """What is wrong with a stamper's answer, or C{None}."""
    if not isinstance(result, StampResult):
        return f"{result!r}, not a StampResult"
    for fields in (result.prepend, result.append):
        if not isinstance(fields, (list, tuple)):
            return f"not a list of header fields: {fields!r}"
        for fieldBytes in fields:
            problem = fieldProblem(fieldBytes, smtputf8)
            if problem is not None:
                return problem
    return None
