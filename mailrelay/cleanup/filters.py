"""The message filters' side of the intake: what a filter sees (L{FilterContext}), what its
answer means (L{filterVerdict}), and the message with the fields the filters added.

The intake runs the filters (L{mailrelay.interfaces.IMessageFilter}) once a message is
complete, stamped and checked for hops, before the commit, as one chain of the policy runner
(given to the intake ready-made: a stage does not import another).  Each filter gets the same
L{FilterContext}: C{read()} reads the message from the spool writer (its temporary file, or
its memory for a small message) in the thread pool once, and gives every filter the message
as it stands, the fields of the filters before it included (and without the fields they
removed).  When the filters added, removed or replaced fields, the message is written
again so before it is committed.  A filter may also rewrite the envelope sender
(C{FilterResult.sender}), as Postfix's cleanup rewrites it with C{canonical_maps}: the
context's envelope has the new sender at once, and the intake keeps it.
"""

from __future__ import annotations

from collections.abc import Callable, Collection, Sequence
from typing import Any

from twisted.internet.defer import Deferred, fail, succeed
from twisted.python.failure import Failure
from zope.interface import implementer

from mailrelay.address import AddressError, parseReversePath
from mailrelay.cleanup.stamping import HEADER_SECTION_LIMIT, fieldProblem, parseHeaderSection
from mailrelay.envelope import ClientInfo, Envelope
from mailrelay.headers import needsEmptyLine
from mailrelay.interfaces import (
    CONTINUE,
    BadAnswer,
    FilterResult,
    IFilterContext,
    Verdict,
    VerdictKind,
    checkVerdict,
)

__all__ = ["FILTER_FAILED_TEXT", "FilterContext", "filterVerdict", "withFields"]

#: The text of the 451 refusing a message whose filter failed.
FILTER_FAILED_TEXT = "Error: temporary failure filtering the message, try again later"


def withFields(
    message: bytes,
    prepend: Sequence[bytes],
    append: Sequence[bytes],
    remove: Collection[bytes] = (),
) -> bytes:
    """C{message} with the header fields C{prepend} above its first field and C{append} after
    its last one (where the stampers insert theirs), and without the fields of its header
    section equal to one of C{remove}."""
    if not prepend and not append and not remove:
        return message
    fields, end = parseHeaderSection(message, HEADER_SECTION_LIMIT)
    head = message[:end]
    if remove:
        head = b"".join(raw for _, raw in fields if raw not in remove)
    added = b"".join(append)
    if (prepend or added) and needsEmptyLine(message, end):
        added += b"\r\n"  # (the rest is body)
    return b"".join(prepend) + head + added + message[end:]


@implementer(IFilterContext)
class FilterContext:
    """What the message filters of one message see (see L{IFilterContext}).

    @ivar prepend: the fields the filters added above the header section so far (a later
        filter's above an earlier one's).
    @ivar append: the fields they added after it, in order.
    @ivar remove: the fields of the message they removed.
    @ivar replaced: the fields they put in place of others (L{replaceFields}), in order.
    @ivar originalSender: the envelope sender before a filter rewrote it, or C{None}.
    """

    def __init__(
        self,
        hostname: str,
        client: ClientInfo | None,
        envelope: Envelope,
        listenerOptions: dict[str, Any],
        size: int,
        readMessage: Callable[[], bytes],
        deferToThread: Callable[..., Deferred[Any]],
    ) -> None:
        """
        @param size: the octets of the message as stamped.
        @param readMessage: reads the stamped message (blocking: called in the thread pool).
        """
        self.hostname = hostname
        self.client = client
        self.envelope = envelope
        self.listenerOptions = listenerOptions
        self.deferToThread = deferToThread
        self._size = size
        self._readMessage = readMessage
        self._message: bytes | None = None
        self._failure: Failure | None = None
        self._waiting: list[Deferred[bytes]] = []
        self.prepend: list[bytes] = []
        self.append: list[bytes] = []
        self.remove: set[bytes] = set()
        self.replaced: list[bytes] = []
        self.originalSender: str | None = None
        self._removedSize = 0

    @property
    def size(self) -> int:
        added = sum(map(len, self.prepend)) + sum(map(len, self.append))
        return self._size + added - self._removedSize

    @property
    def changed(self) -> bool:
        """Whether the filters added, removed or replaced fields."""
        return bool(self.prepend or self.append or self.remove or self.replaced)

    def read(self) -> Deferred[bytes]:
        """The message as it stands (see L{IFilterContext.read})."""
        if self._message is not None:
            return succeed(self._current(self._message))
        if self._failure is not None:
            return fail(self._failure)
        d: Deferred[bytes] = Deferred()
        self._waiting.append(d)
        if len(self._waiting) == 1:
            reading = self.deferToThread(self._readMessage)
            reading.addCallbacks(self._read, self._notRead)
        return d

    def _read(self, message: bytes) -> None:
        self._message = message
        waiting, self._waiting = self._waiting, []
        for d in waiting:
            if not d.called:  # (a filter that timed out has cancelled its read)
                d.callback(self._current(message))

    def _notRead(self, failure: Failure) -> None:
        self._failure = failure
        waiting, self._waiting = self._waiting, []
        for d in waiting:
            if not d.called:
                d.errback(failure)

    def _current(self, message: bytes) -> bytes:
        return withFields(message, self.prepend, self.append, self.remove)

    def addFields(
        self,
        prepend: Sequence[bytes],
        append: Sequence[bytes],
        remove: Sequence[bytes] = (),
        replace: Sequence[tuple[bytes, bytes]] = (),
    ) -> None:
        """Add a filter's fields, remove those it removes and replace those it replaces.

        @raise BadAnswer: one is not a whole, well-formed header field, or one to remove is
            not in the message's header section, or one to replace is neither there nor
            added by an earlier filter (or the message was not read), or a replacement is a
            field of another name; then nothing is changed.
        """
        for field in (*prepend, *append):
            problem = fieldProblem(field, self.envelope.smtputf8)
            if problem is not None:
                raise BadAnswer(f"added {problem}")
        replacements = self._checkReplacements(replace)
        if remove:
            if self._message is None:
                raise BadAnswer("removed header fields without reading the message")
            fields = [raw for _, raw in parseHeaderSection(self._message, HEADER_SECTION_LIMIT)[0]]
            for field in remove:
                if not isinstance(field, bytes) or field not in fields:
                    raise BadAnswer(f"removed a header field the message does not have: {field!r}")
            self.remove.update(remove)
            self._removedSize = sum(len(raw) for raw in fields if raw in self.remove)
        self.prepend[:0] = prepend
        self.append.extend(append)
        if replacements:
            self._replace(replacements)

    def _checkReplacements(
        self, replace: Sequence[tuple[bytes, bytes]]
    ) -> dict[bytes, bytes]:
        """The replacements C{replace} asks for, checked (see L{addFields})."""
        if not replace:
            return {}
        if self._message is None:
            raise BadAnswer("replaced header fields without reading the message")
        names = {raw: name for name, raw in parseHeaderSection(self._message,
                                                               HEADER_SECTION_LIMIT)[0]}
        for added in (*self.prepend, *self.append):  # (the earlier filters', read with it)
            names.setdefault(added, added.partition(b":")[0].rstrip(b" \t").decode("ascii"))
        replacements: dict[bytes, bytes] = {}
        for pair in replace:
            old, new = pair if isinstance(pair, tuple) and len(pair) == 2 else (pair, None)
            if not isinstance(old, bytes) or old not in names or old in self.remove:
                raise BadAnswer(f"replaced a header field the message does not have: {old!r}")
            # (a field with 8-bit octets already may keep them: none are added)
            problem = fieldProblem(new, self.envelope.smtputf8 or not old.isascii())
            if problem is not None:
                raise BadAnswer(f"replaced a field by {problem}")
            assert isinstance(new, bytes)
            if new.partition(b":")[0].rstrip(b" \t").lower() != names[old].lower().encode():
                raise BadAnswer(f"replaced a {names[old]}: field by another field: {new!r}")
            replacements[old] = new
        return replacements

    def _replace(self, replacements: dict[bytes, bytes]) -> None:
        """Put each field of the message read, or that earlier filters added, that is a key
        of C{replacements} by its value, where it stands."""
        assert self._message is not None
        fields, end = parseHeaderSection(self._message, HEADER_SECTION_LIMIT)
        head = b"".join(replacements.get(raw, raw) for _, raw in fields)
        self._size += len(head) - end
        self._message = head + self._message[end:]
        self.prepend[:] = [replacements.get(f, f) for f in self.prepend]
        self.append[:] = [replacements.get(f, f) for f in self.append]
        self.replaced.extend(replacements.values())

    def checkedSender(self, sender: object) -> str:
        """C{sender}, a filter's new envelope sender, in canonical form.

        @raise BadAnswer: it is no address (or needs SMTPUTF8 the message does not have),
            is the null sender, or the sender is the null sender (never rewritten).
        """
        envelope = self.envelope
        if envelope.sender == "":
            raise BadAnswer(f"rewrote the null sender to {sender!r}")
        if not isinstance(sender, str):
            raise BadAnswer(f"rewrote the sender to {sender!r}, not a string")
        try:
            mailbox = parseReversePath(f"<{sender}>", utf8=envelope.smtputf8)
        except AddressError as e:
            raise BadAnswer(f"rewrote the sender to {sender!r}: {e.reply.text}") from None
        if mailbox is None:
            raise BadAnswer("rewrote the sender to the null sender")
        return str(mailbox)

    def rewriteSender(self, sender: str) -> None:
        """Make C{sender} (L{checkedSender}) the envelope sender, the first one kept in
        L{originalSender}."""
        if self.originalSender is None:
            self.originalSender = self.envelope.sender
        self.envelope.sender = sender

    def drop(self, fields: Collection[bytes]) -> None:
        """Remove C{fields}, fields of the message's header section as the relay parsed it
        (the intake's C{dropHeaders}), before any filter sees it."""
        if fields:
            self.remove.update(fields)
            self._removedSize += sum(map(len, fields))

    def message(self) -> Deferred[bytes]:
        """The message to commit: as read, with every field added (read now if no filter
        read it)."""
        return self.read()


def filterVerdict(answer: Any, args: Sequence[Any]) -> Verdict:
    """What a message filter's C{answer} means (the C{interpret} of its chain): the verdict,
    once the fields of a passing L{FilterResult} are added to the L{FilterContext} (the
    first of C{args}).

    @raise BadAnswer: the answer is none of C{FilterResult}, C{Verdict}, C{None}, or carries
        malformed fields.
    """
    if answer is None:
        return CONTINUE
    if isinstance(answer, Verdict):
        return checkVerdict(answer)
    if not isinstance(answer, FilterResult):
        raise BadAnswer(f"answered {answer!r}, not a FilterResult, a Verdict or None")
    verdict = checkVerdict(answer.verdict)
    if verdict.kind in (VerdictKind.CONTINUE, VerdictKind.ACCEPT):
        context: FilterContext = args[0]
        sender = None if answer.sender is None else context.checkedSender(answer.sender)
        context.addFields(
            tuple(answer.prepend), tuple(answer.append), tuple(answer.remove),
            tuple(answer.replace),
        )
        if sender is not None:
            context.rewriteSender(sender)
    return verdict
