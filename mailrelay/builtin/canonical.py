"""Sender address rewriting for a smarthost: the built-in message filter
C{sender-canonical}, Postfix's C{sender_canonical_maps} (and C{canonical_classes}).

A site's machines hand the relay mail from C{root@web1.internal} or C{nagios@localhost}; the
upstream provider refuses or spam-folders senders it does not know.  With a table in
Postfix's canonical(5) format (L{mailrelay.builtin.canonicalmap}), the filter rewrites:

  - C{envelope_sender}: the envelope sender (the null sender never), through
    C{FilterResult.sender}: the intake logs C{sender=<old> rewritten to <new>}, the queue
    and its DSNs use the new one;
  - C{header_sender}: the addresses of the header fields C{header_fields} (by default
    C{From:}, C{Sender:}, C{Reply-To:}), in place (L{mailrelay.builtin.addressfields}), of
    mail of ours only (made here, from an authenticated client, or from a client allowed to
    relay), as Postfix rewrites the headers of C{local_header_rewrite_clients} only.

It runs where the configuration puts it among the message filters, which must be before
C{dkim-sign} and any other signing filter when it rewrites header fields (it then declares
L{IRewritingFilter}, and the relay refuses the other order): the signature covers what
leaves.  Rewriting the envelope sender only (C{classes = ["envelope_sender"]}) declares
nothing: a DKIM signature covers header fields and the body, never the envelope (RFC 6376
3.7), so such an entry may come after C{dkim-sign} (whose C{sign_by = "sender"} then picks
the key by the sender as it was before the rewriting).  The
sender binding of C{[auth.senders]} judged MAIL FROM as the client gave it, long before (as
Postfix's smtpd checks before its cleanup rewrites).

The table file is read again when it changes (in the thread pool, at the next message).

Written on the public plugin API only (tests/test_layering.py).  See
docs/plugin-sender-canonical.md.
"""

from __future__ import annotations

from collections.abc import Collection
from dataclasses import dataclass
from typing import Any

from twisted.internet.defer import Deferred, succeed
from twisted.logger import Logger
from zope.interface import alsoProvides, implementer

from mailrelay.address import normaliseDomain
from mailrelay.builtin.addressfields import rewriteAddresses
from mailrelay.builtin.canonicalmap import MapFile
from mailrelay.builtin.headers import headerFields
from mailrelay.config.schema import At, Key, pluginOptions
from mailrelay.config.values import domains, fileName, strings
from mailrelay.errors import describeValue
from mailrelay.interfaces import CONTINUE, FilterResult, IMessageFilter, IRewritingFilter

__all__ = ["CLASSES", "SENDER_FIELDS", "SenderCanonical", "build"]

log = Logger()

#: The classes of addresses it may rewrite (Postfix's canonical_classes, senders only).
CLASSES = ("envelope_sender", "header_sender")

#: The header fields that hold senders (Postfix's header_opts.c, HDR_OPT_SENDER; not
#: Return-Path:, which [limits] drop_headers removes by default and the next hop adds).
SENDER_FIELDS = (
    "from", "sender", "reply-to", "resent-from", "resent-sender", "errors-to",
    "return-receipt-to", "disposition-notification-to", "mail-followup-to",
)  # fmt: skip


def _classes(value: Any, at: At) -> tuple[str, ...]:
    found: list[str] = []
    for index, name in enumerate(strings(value, at)):
        if name not in CLASSES:
            raise at.item(index).error(
                f"{describeValue(name)} is not a class: envelope_sender or header_sender"
            )
        if name not in found:
            found.append(name)
    if not found:
        raise at.error("must name envelope_sender, header_sender or both")
    return tuple(found)


def _fields(value: Any, at: At) -> tuple[str, ...]:
    found: list[str] = []
    for index, name in enumerate(strings(value, at)):
        if name.lower() not in SENDER_FIELDS:
            raise at.item(index).error(
                f"{describeValue(name)} is not a sender field: "
                + ", ".join(f.title() for f in SENDER_FIELDS)
            )
        if name.lower() not in found:
            found.append(name.lower())
    return tuple(found)


OPTIONS = pluginOptions(
    Key("map", fileName, "The table: canonical(5) lines, 'pattern result'.",
        required="is required: the canonical table file"),
    Key("classes", _classes, "What it rewrites: envelope_sender, header_sender.",
        default=list(CLASSES)),
    Key("header_fields", _fields, "The header fields header_sender rewrites.",
        default=["From", "Sender", "Reply-To"]),
    Key("local_domains", domains,
        "The domains a bare 'user' pattern matches (Postfix's myorigin and mydestination); "
        "default: the relay's host name, localhost and localhost.<its domain>."),
)  # fmt: skip


@dataclass(frozen=True)
class _Outcome:
    """What L{SenderCanonical.rewrite} found (in the thread pool) for one message."""

    sender: str | None = None
    replace: tuple[tuple[bytes, bytes], ...] = ()
    said: tuple[tuple[str, str], ...] = ()  # (log level, text)


@implementer(IMessageFilter)
class SenderCanonical:
    """The C{sender-canonical} filter (see the module docstring).  An instance that rewrites
    header fields (C{header_sender}) provides L{IRewritingFilter}; one that rewrites only
    the envelope sender does not (a signature does not cover it).

    @ivar table: the L{MapFile}.
    @ivar classes: what it rewrites (of L{CLASSES}).
    @ivar fields: the header fields C{header_sender} covers (lower case).
    @ivar localDomains: the domains of C{user} patterns.
    @ivar delimiters: the recipient delimiters that split an address extension off
        (C{[delivery] recipient_delimiter}), C{""} for none.
    """

    def __init__(
        self,
        table: MapFile,
        classes: Collection[str] = CLASSES,
        fields: Collection[str] = ("from", "sender", "reply-to"),
        localDomains: Collection[str] = ("localhost",),
        delimiters: str = "",
    ) -> None:
        self.table = table
        self.classes = frozenset(classes)
        self.fields = frozenset(fields)
        self.localDomains = frozenset(localDomains)
        self.delimiters = delimiters
        if "header_sender" in self.classes:
            alsoProvides(self, IRewritingFilter)

    def __repr__(self) -> str:
        return f"<SenderCanonical {self.table.path}: {', '.join(sorted(self.classes))}>"

    def envelopeSender(self, sender: str, smtputf8: bool) -> tuple[str, str | None]:
        """The envelope sender this filter would give now a message whose sender is
        C{sender} (C{smtputf8}: the message is SMTPUTF8), by the table as L{rewrite} would
        use it: read again first if its file changed (for the rule of postmaster mail at
        RCPT, which asks the routing table with the sender the delivery will route by); and
        what is wrong with the changed file (C{None}: nothing, or told already).  Blocking:
        run in the thread pool."""
        if "envelope_sender" not in self.classes or not sender:
            return sender, None
        table, problem = self.table.current()
        new = table.lookup(sender, self.localDomains, self.delimiters)
        if new is None or not (smtputf8 or new.isascii()):
            return sender, problem
        return new, problem

    def filterMessage(self, context: Any) -> Any:
        envelope = context.envelope
        client = context.client
        sender = envelope.sender if "envelope_sender" in self.classes else ""
        headers = "header_sender" in self.classes and (
            client is None or bool(client.authUser) or bool(client.relayAllowed))
        if not sender and not headers:
            return CONTINUE
        d: Deferred[Any] = context.read() if headers else succeed(None)
        d.addCallback(
            lambda message: context.deferToThread(
                self.rewrite, message, sender, bool(envelope.smtputf8)))
        d.addCallback(self._answer, envelope.queueID)
        return d

    def rewrite(self, message: bytes | None, sender: str, smtputf8: bool) -> _Outcome:
        """What to rewrite in C{message} (its header fields; C{None}: none) and of
        C{sender} (C{""}: nothing), the table read again first if its file changed.
        Blocking: run in the thread pool."""
        table, problem = self.table.current()
        said: list[tuple[str, str]] = []
        if problem is not None:
            said.append(("error", f"the map changed but cannot be used, kept the one read "
                                  f"before: {problem}"))

        def lookup(address: str) -> str | None:
            new = table.lookup(address, self.localDomains, self.delimiters)
            if new is not None and not smtputf8 and not new.isascii():
                said.append(("warn", f"<{address}> not rewritten to <{new}>: the message is "
                                     "not SMTPUTF8"))
                return None
            return new

        newSender = lookup(sender) if sender else None
        replace: list[tuple[bytes, bytes]] = []
        for name, raw in headerFields(message) if message is not None else ():
            if name.lower().decode("ascii") not in self.fields:
                continue
            field = name.decode("ascii")
            rewritten = rewriteAddresses(raw, lookup)
            if rewritten.problem is not None:
                said.append(("warn", f"{field}: left as it is, {rewritten.problem}"))
            elif rewritten.field is not None:
                replace.append((raw, rewritten.field))
                said.extend(("info", f"{field}: <{old}> rewritten to <{new}>")
                            for old, new in rewritten.changes)
        return _Outcome(newSender, tuple(replace), tuple(said))

    def _answer(self, outcome: _Outcome, queueID: str) -> FilterResult:
        for level, text in outcome.said:
            getattr(log, level)("{queueID}: sender-canonical: {text}", queueID=queueID, text=text)
        return FilterResult(sender=outcome.sender, replace=outcome.replace)


def defaultLocalDomains(hostname: str) -> tuple[str, ...]:
    """Postfix's default C{mydestination}: C{$myhostname, localhost.$mydomain, localhost}."""
    found = [normaliseDomain(hostname)] if hostname else []
    parent = found[0].partition(".")[2] if found else ""
    for domain in (f"localhost.{parent}" if parent else "", "localhost"):
        if domain and domain not in found:
            found.append(domain)
    return tuple(found)


def build(options: dict[str, Any], context: Any) -> SenderCanonical:
    """The C{sender-canonical} plugin (see docs/plugin-sender-canonical.md)."""
    read = context.readOptions(OPTIONS, options)
    table = MapFile(read.map)  # (ConfigError: naming the file and line, under key "map")
    local = read.localDomains if read.localDomains is not None else defaultLocalDomains(
        context.hostname)
    if not context.quiet:
        log.info(
            "sender-canonical: {count} patterns from {path}; rewriting {classes}",
            count=len(table.table), path=read.map, classes=", ".join(read.classes),
        )  # fmt: skip
    return SenderCanonical(table, read.classes, read.headerFields, local,
                           context.recipientDelimiter)
