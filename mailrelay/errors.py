"""Exceptions shared across mailrelay (configuration, spool), and how their messages name
values and keys."""

from __future__ import annotations

import datetime
import json
import re
from pathlib import Path
from typing import Any

from twisted.internet.defer import CancelledError

_BARE_KEY = re.compile(r"[A-Za-z0-9_-]+\Z")


class ConfigError(ValueError):
    """A configuration problem, reported to the operator and stopping start-up.

    The message names what is wrong: the file, the key (as a dotted path such as
    C{listeners[0].endpoint}) and the offending value.  Plugins raise it from
    L{IMailRelayPlugin.build} with a message naming their own key; the loader adds the file and
    the table the plugin was configured in.
    """

    def __init__(self, message: str, *, file: str | None = None, key: str | None = None) -> None:
        self.message = message
        self.file = file
        self.key = key
        super().__init__(self.__str__())

    def __str__(self) -> str:
        where = []
        if self.file:
            where.append(str(self.file))
        if self.key:
            where.append(self.key)
        return ": ".join(where + [self.message])

    def within(self, *, file: str | None = None, key: str | None = None) -> ConfigError:
        """Return a copy located in C{file} and under C{key} (prefixed to any existing key)."""
        newKey = key
        if key and self.key:
            newKey = f"{key}.{self.key}"
        elif self.key:
            newKey = self.key
        return ConfigError(self.message, file=file or self.file, key=newKey)


# -- spool errors (spool/ raises them; the queue and the intake handle them)


class SpoolError(Exception):
    """A write, fsync, rename or space failure in the spool.

    C{str()} says what failed and the path involved.

    @ivar path: the path the failure concerns, or C{None}.
    @ivar queueID: the queue id of the message concerned, or C{None}.
    """

    def __init__(
        self, message: str, *, path: Path | str | None = None, queueID: str | None = None
    ) -> None:
        super().__init__(message)
        self.path = path
        self.queueID = queueID


class CorruptEntry(SpoolError):
    """A committed entry is damaged: its envelope is empty, truncated or invalid, or its
    message file is missing or not of the size the envelope records.  Commits are atomic, so
    only something outside mailrelay (a disk error, an operator's editor, a bad restore) can
    leave one; trying again will not mend it (see L{mailrelay.spool.Spool.quarantine})."""



class EntryGone(SpoolError):
    """There is no committed entry of that queue id (any more): it was removed, or never
    committed.  Nothing to deliver and nothing to repair."""

# -- describing values and keys in messages


def describeValue(value: Any, limit: int = 80) -> str:
    """Render C{value} the way it is written in TOML, shortened to about C{limit} characters.

    Strings come out in double quotes (C{"ten"}), booleans as C{true}/C{false}, arrays in
    brackets and tables as inline tables.
    """
    text = _render(value)
    if len(text) > limit:
        text = text[: limit - 1] + "\u2026"
    return text


def _render(value: Any) -> str:
    """Render C{value} as TOML-like text, without shortening."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, str):
        return json.dumps(value, ensure_ascii=False)
    if isinstance(value, (int, float)):
        return repr(value)
    if isinstance(value, (datetime.date, datetime.time)):
        return value.isoformat()
    if isinstance(value, (list, tuple)):
        return "[" + ", ".join(_render(v) for v in value) + "]"
    if isinstance(value, dict):
        return "{" + ", ".join(f"{_keyPart(k)} = {_render(v)}" for k, v in value.items()) + "}"
    return repr(value)


def _keyPart(name: str) -> str:
    """One segment of a dotted key: bare when TOML allows it, quoted otherwise."""
    return name if _BARE_KEY.match(name) else json.dumps(name, ensure_ascii=False)


def joinKey(parent: str, name: str) -> str:
    """The dotted key of C{name} inside the table at C{parent} (C{""} for the top level)."""
    part = _keyPart(name)
    return f"{parent}.{part}" if parent else part


# -- delivery failures (route/, delivery/)


class DeliveryFailure(Exception):
    """A delivery cannot even start (DNS says no, nothing to connect to, no route): the base
    of L{TransientFailure} and L{PermanentFailure}, which routers and backends raise.

    C{DeliveryFailure(permanent=..., code=..., diagnostic=...)} makes the one of the two that
    C{permanent} names, so C{isinstance(e, PermanentFailure)} is the test to use.

    @ivar permanent: C{True} when retrying will not help (the recipients bounce).
    @ivar code: the RFC 3463 status (C{"5.1.2"}, C{"4.4.3"}); its class agrees with
        C{permanent}.
    @ivar diagnostic: an RFC 3464 diagnostic, C{"X-mailrelay; domain example.org does not
        exist"}.
    """

    permanent: bool

    def __new__(cls, *args: Any, **kwargs: Any) -> DeliveryFailure:
        if cls is DeliveryFailure:
            cls = PermanentFailure if kwargs.get("permanent") else TransientFailure
        return super().__new__(cls)

    def __init__(self, *, code: str, diagnostic: str, permanent: bool | None = None) -> None:
        """
        @param permanent: only for C{DeliveryFailure(...)} itself, which it chooses the class
            of; a subclass knows.
        @raise ValueError: C{code} is not of the class's kind (C{"5.x.x"} permanent,
            C{"4.x.x"} transient).
        """
        if permanent is not None and permanent is not self.permanent:
            raise ValueError(f"a {type(self).__name__} is not permanent={permanent}")
        if not isinstance(code, str) or code[:2] != ("5." if self.permanent else "4."):
            raise ValueError(
                f"a {type(self).__name__}'s code must be "
                f"{'5' if self.permanent else '4'}.x.x, not {code!r}"
            )
        self.code = code
        self.diagnostic = diagnostic
        super().__init__(f"{code} {diagnostic}")

    def transient(self) -> TransientFailure:
        """This failure as a transient one (a C{4.x.x} code), or itself when already transient."""
        if isinstance(self, TransientFailure):
            return self
        return TransientFailure(code="4" + self.code[1:], diagnostic=self.diagnostic)


class TransientFailure(DeliveryFailure):
    """A delivery failure that a later attempt may not have (C{4.x.x}): the recipients stay
    queued."""

    permanent = False


class PermanentFailure(DeliveryFailure):
    """A delivery failure no retry will mend (C{5.x.x}): the recipients bounce."""

    permanent = True


class DeliveryNotStarted(CancelledError):
    """A delivery cancelled (by its time-out, or the stop) while it waited for its place --
    among the deliveries in flight at once (C{[queue] delivery_limit}), or to its next hop
    (a backend's concurrency) -- before it did anything: nothing can have been sent."""


def notStartedDiagnostic(via: str) -> str:
    """The diagnostic of recipients whose delivery via C{via} (C{"backend:nexthop"}) the
    relay's stop kept from starting: nothing was sent (see L{stoppedBeforeStart})."""
    return f"X-mailrelay; delivery via {via} not started: the relay was stopping"


def stoppedBeforeStart(result: Any) -> bool:
    """Whether C{result} (a L{RecipientResult <mailrelay.interfaces.RecipientResult>}) is a
    deferral by the relay's stop before the delivery started (L{notStartedDiagnostic}): the
    queue attempts it again at the next start, not after a back-off (L{Outcome.stopped
    <mailrelay.queue.outcome.Outcome>})."""
    from mailrelay.interfaces import DeliveryStatus  # (it imports this module)

    return (result.status is DeliveryStatus.TRANSIENT and result.code == "4.3.0"
            and result.diagnostic.startswith("X-mailrelay; delivery via ")
            and result.diagnostic.endswith(" not started: the relay was stopping"))


def describeFailure(failure: Any, timeout: float | None = None) -> str:
    """A short text for why a query (a C{twisted.names} lookup, a store operation) failed: a
    name server's answer code in words (C{"server failure (SERVFAIL)"}; twisted.names gives
    the whole answer as the message, C{"<Message id=... rCode=2 ...>"}), a time-out with its
    limit (C{"timed out after 3 s"}; L{Deferred.addTimeout}'s reads C{"(3.0, 'Deferred')"}),
    else the exception's message, or its type's name when it has none.

    @param failure: a L{twisted.python.failure.Failure}.
    @param timeout: the seconds the query was given, if known.
    """
    from twisted.internet.defer import TimeoutError
    from twisted.names import error

    if failure.check(TimeoutError, error.DNSQueryTimeoutError):
        return "timed out" if timeout is None else f"timed out after {timeout:g} s"
    answer = dnsAnswerCode(failure)
    if answer is not None:
        code, words = answer
        return f"{words} ({code})" if code else words
    return failure.getErrorMessage() or failure.type.__name__


def dnsAnswerCode(failure: Any) -> tuple[str, str] | None:
    """The answer code of the name server's error C{failure} (a
    L{twisted.python.failure.Failure} of C{twisted.names}) and its meaning:
    C{("SERVFAIL", "server failure")}; C{("", "an unknown answer code")} for one
    C{twisted.names} does not name; C{None} when it is no name server's answer."""
    from twisted.names import error

    for kind, code, words in (
        (error.DNSServerError, "SERVFAIL", "server failure"),
        (error.DNSQueryRefusedError, "REFUSED", "refused"),
        (error.DNSFormatError, "FORMERR", "format error"),
        (error.DNSNotImplementedError, "NOTIMP", "not implemented"),
        (error.DNSNameError, "NXDOMAIN", "no such name"),
        (error.DNSUnknownError, "", "an unknown answer code"),
    ):
        if failure.check(kind):
            return code, words
    return None
